//! Configuration (TOML, like containerd's): what the daemon and the CLI share.
//!
//! Every option has a default, so a missing file is a valid configuration. Unknown keys
//! are rejected with the key's name: a misspelt option silently falling back to its
//! default is worse than refusing to start. docs/configuration.md lists every option.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::registry::auth::{Credentials, Secret};

/// Where the configuration file is looked for when none is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/sluice/config.toml";

/// A configuration that could not be read or is not acceptable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The underlying errors are part of the message rather than a `#[source]`: toml's
    // text is the useful part, and a source chain would print it twice.
    #[error("reading configuration file {path}: {reason}")]
    Read {
        path: PathBuf,
        reason: std::io::Error,
    },
    /// Syntax errors, wrong types and unknown keys; toml's message names the key.
    #[error(
        "parsing configuration file {path}: {reason}(see docs/configuration.md for the options)"
    )]
    Parse {
        path: PathBuf,
        reason: Box<toml::de::Error>,
    },
    #[error("configuration option `{option}`: {reason}")]
    Invalid {
        option: &'static str,
        reason: String,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub daemon: DaemonConfig,
    pub cache: CacheConfig,
    pub registry: RegistryConfig,
    pub fs: FsConfig,
    pub prefetch: PrefetchConfig,
    pub metrics: MetricsConfig,
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `host:port` to serve `GET /metrics` on; `None` serves no metrics.
    pub address: Option<std::net::SocketAddr>,
}

/// `[daemon]`: where the snapshotter keeps its state and listens.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// State directory: snapshot metadata and layer directories.
    pub root: PathBuf,
    /// Unix socket containerd connects to (`[proxy_plugins.sluice] address`).
    pub socket: PathBuf,
    /// A tracing filter directive: `info`, `debug`, `sluice=trace,info`, ...
    pub log_level: String,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/var/lib/sluice"),
            socket: PathBuf::from("/run/sluice/sluice.sock"),
            log_level: "info".to_owned(),
        }
    }
}

/// `[cache]`: fetched chunks.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Chunk directory; `None` means `<daemon.root>/cache` (see [`Config::cache_dir`]).
    pub dir: Option<PathBuf>,
    /// Bytes of hot chunks kept in memory.
    pub memory_bytes: u64,
    /// Bytes of chunks kept on disk before the least recently used are removed;
    /// 0 means no limit.
    pub disk_bytes: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            dir: None,
            memory_bytes: 256 * 1024 * 1024,
            disk_bytes: 0,
        }
    }
}

impl CacheConfig {
    /// The disk limit, `None` when unlimited.
    pub fn disk_limit(&self) -> Option<u64> {
        (self.disk_bytes > 0).then_some(self.disk_bytes)
    }
}

/// `[registry]`: how images are fetched.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Talk HTTP instead of HTTPS to every registry (test set-ups only).
    pub plain_http: bool,
    /// containerd-style `hosts.toml` tree (mirrors, CAs, per-host plain HTTP).
    pub hosts_dir: PathBuf,
    /// Docker `config.json` with registry credentials; `None` means
    /// `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
    /// Credentials by registry host (`"registry.example.com:5000"`), used before the
    /// Docker config.
    pub credentials: BTreeMap<String, RegistryCredentials>,
    /// Time limit for one HTTP request, in seconds.
    pub request_timeout_secs: u64,
    /// Further attempts after a transient failure (network error, 5xx, timeout).
    pub retries: u32,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            plain_http: false,
            hosts_dir: PathBuf::from("/etc/containerd/certs.d"),
            docker_config: None,
            credentials: BTreeMap::new(),
            request_timeout_secs: 30,
            retries: 3,
        }
    }
}

/// `[registry.credentials."HOST"]`: a username and password, or a bearer token.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryCredentials {
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<Secret>,
    /// A registry token sent as `Authorization: Bearer`, with no token exchange.
    #[serde(default)]
    pub token: Option<Secret>,
}

impl RegistryCredentials {
    /// What the registry client sends.
    pub fn to_client(&self) -> Credentials {
        match (&self.username, &self.password, &self.token) {
            (Some(user), Some(password), _) => Credentials::basic(user, password.expose()),
            (_, _, token) => Credentials {
                registry_token: token.clone(),
                ..Credentials::default()
            },
        }
    }
}

impl RegistryConfig {
    /// Credentials by host, as the registry client takes them.
    pub fn client_credentials(&self) -> std::collections::HashMap<String, Credentials> {
        self.credentials
            .iter()
            .map(|(host, credentials)| (host.clone(), credentials.to_client()))
            .collect()
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
}

/// `[fs]`: the lazily fetched layer filesystems.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FsConfig {
    /// How long a read may wait for its chunks before failing with EIO, in seconds.
    pub read_timeout_secs: u64,
    /// Stream the rest of each layer into the cache after it is mounted.
    pub background_fetch: bool,
    /// Cap for background fetching in bytes per second; 0 means no cap.
    pub background_bandwidth_bytes_per_sec: u64,
}

impl Default for FsConfig {
    fn default() -> Self {
        Self {
            read_timeout_secs: 60,
            background_fetch: true,
            // Half of a 1 Gbit/s link: streaming never starves the node or the registry.
            background_bandwidth_bytes_per_sec: 64 << 20,
        }
    }
}

impl FsConfig {
    pub fn read_timeout(&self) -> Duration {
        Duration::from_secs(self.read_timeout_secs)
    }

    /// The background bandwidth cap, `None` when unlimited.
    pub fn background_bandwidth(&self) -> Option<u64> {
        (self.background_bandwidth_bytes_per_sec > 0)
            .then_some(self.background_bandwidth_bytes_per_sec)
    }
}

/// `[prefetch]`: fetching the files an image lists as needed at start-up.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrefetchConfig {
    /// How long mounting a layer waits for its prefetch before going on, in seconds;
    /// 0 disables prefetching.
    pub timeout_secs: u64,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        Self { timeout_secs: 10 }
    }
}

impl PrefetchConfig {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

impl Config {
    /// Reads and validates `path`; a file that does not exist yields the defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(reason) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    reason,
                });
            }
        };
        let config = Self::parse(&text).map_err(|reason| ConfigError::Parse {
            path: path.to_owned(),
            reason: Box::new(reason),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text without validating it.
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// The chunk cache directory, `<daemon.root>/cache` unless set.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache
            .dir
            .clone()
            .unwrap_or_else(|| self.daemon.root.join("cache"))
    }

    /// Checks what the types cannot: absolute paths, usable limits, a valid log filter.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let absolute = |option: &'static str, path: &Path| {
            if path.is_absolute() {
                Ok(())
            } else {
                Err(ConfigError::Invalid {
                    option,
                    reason: format!("{} must be an absolute path", path.display()),
                })
            }
        };
        absolute("daemon.root", &self.daemon.root)?;
        absolute("daemon.socket", &self.daemon.socket)?;
        if let Some(dir) = &self.cache.dir {
            absolute("cache.dir", dir)?;
        }
        absolute("registry.hosts_dir", &self.registry.hosts_dir)?;
        if let Some(path) = &self.registry.docker_config {
            absolute("registry.docker_config", path)?;
        }
        if let Err(error) = tracing_subscriber::EnvFilter::try_new(&self.daemon.log_level) {
            return Err(ConfigError::Invalid {
                option: "daemon.log_level",
                reason: format!(
                    "{:?} is not a log filter ({error}); use e.g. \"info\" or \"sluice=debug,info\"",
                    self.daemon.log_level
                ),
            });
        }
        let positive = |option: &'static str, value: u64| {
            if value > 0 {
                Ok(())
            } else {
                Err(ConfigError::Invalid {
                    option,
                    reason: "must be greater than 0".to_owned(),
                })
            }
        };
        positive(
            "registry.request_timeout_secs",
            self.registry.request_timeout_secs,
        )?;
        positive("fs.read_timeout_secs", self.fs.read_timeout_secs)?;
        if self.registry.retries > 100 {
            return Err(ConfigError::Invalid {
                option: "registry.retries",
                reason: format!("{} is more than the limit of 100", self.registry.retries),
            });
        }
        for (host, credentials) in &self.registry.credentials {
            let password = credentials.username.is_some() && credentials.password.is_some();
            if password == credentials.token.is_some() {
                return Err(ConfigError::Invalid {
                    option: "registry.credentials",
                    reason: format!("{host:?} needs either username and password, or token"),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_is_the_defaults() {
        let doc = include_str!("../docs/configuration.md");
        let example = doc
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("docs/configuration.md has a toml example");
        let parsed: Config = toml::from_str(example).expect("the documented example parses");
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn empty_file_gives_defaults() {
        let config = Config::parse("").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.daemon.root, Path::new("/var/lib/sluice"));
        assert_eq!(config.cache_dir(), Path::new("/var/lib/sluice/cache"));
        config.validate().unwrap();
    }

    #[test]
    fn missing_file_gives_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::load(&dir.path().join("absent.toml")).unwrap();
        assert_eq!(config, Config::default());
    }

    #[test]
    fn options_are_read() {
        let config = Config::parse(
            r#"
            [daemon]
            root = "/srv/sluice"
            log_level = "debug"
            [cache]
            memory_bytes = 1024
            [registry]
            plain_http = true
            retries = 5
            [fs]
            background_fetch = false
            [prefetch]
            timeout_secs = 0
            "#,
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.cache_dir(), Path::new("/srv/sluice/cache"));
        assert_eq!(config.cache.memory_bytes, 1024);
        assert!(config.registry.plain_http);
        assert_eq!(config.registry.retries, 5);
        assert!(!config.fs.background_fetch);
        assert_eq!(config.prefetch.timeout(), Duration::ZERO);
    }

    #[test]
    fn unknown_key_is_named() {
        let error = Config::parse("[daemon]\nsockett = \"/x\"\n").unwrap_err();
        assert!(error.to_string().contains("sockett"), "{error}");
        let error = Config::parse("[nonsense]\n").unwrap_err();
        assert!(error.to_string().contains("nonsense"), "{error}");
    }

    #[test]
    fn credentials_are_read_and_redacted() {
        let config = Config::parse(
            "[registry.credentials.\"r.example:5000\"]\nusername = \"u\"\npassword = \"hunter2\"\n",
        )
        .unwrap();
        config.validate().unwrap();
        let printed = format!("{config:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        let client = config.registry.client_credentials();
        assert_eq!(client["r.example:5000"].password.expose(), "hunter2");
        let half = Config::parse("[registry.credentials.\"h\"]\nusername = \"u\"\n").unwrap();
        assert!(half.validate().is_err());
    }

    #[test]
    fn invalid_values_are_rejected() {
        let relative = Config::parse("[daemon]\nroot = \"var/lib\"\n").unwrap();
        assert!(matches!(
            relative.validate(),
            Err(ConfigError::Invalid {
                option: "daemon.root",
                ..
            })
        ));
        let zero = Config::parse("[fs]\nread_timeout_secs = 0\n").unwrap();
        assert!(matches!(
            zero.validate(),
            Err(ConfigError::Invalid {
                option: "fs.read_timeout_secs",
                ..
            })
        ));
        let level = Config::parse("[daemon]\nlog_level = \"sluice=loud\"\n").unwrap();
        assert!(matches!(
            level.validate(),
            Err(ConfigError::Invalid {
                option: "daemon.log_level",
                ..
            })
        ));
    }
}

//! Credentials from a Docker `config.json` (`auths` entries with a base64 `auth` or a
//! `username`/`password` pair), the file `docker login` writes.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use base64::Engine as _;

use super::auth::{Credentials, Secret};
use super::error::RegistryError;
use super::reference::DOCKER_HUB;

/// The parsed credentials of one config file.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    path: PathBuf,
    /// Keyed by normalised registry name (`127.0.0.1:5000`, `docker.io`).
    auths: HashMap<String, Credentials>,
    /// Registries whose credentials live in a helper program, which sluice does not run.
    helpers: HashMap<String, String>,
}

#[derive(serde::Deserialize)]
struct RawConfig {
    #[serde(default)]
    auths: HashMap<String, RawAuth>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(serde::Deserialize)]
struct RawAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
}

/// The default location: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub fn default_path() -> Option<PathBuf> {
    default_path_from(std::env::var_os("DOCKER_CONFIG"), std::env::var_os("HOME"))
}

fn default_path_from(docker_config: Option<OsString>, home: Option<OsString>) -> Option<PathBuf> {
    if let Some(dir) = docker_config.filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    home.filter(|h| !h.is_empty())
        .map(|home| PathBuf::from(home).join(".docker").join("config.json"))
}

/// `https://index.docker.io/v1/`, `http://host:5000/v2`, `host:5000` → a registry name.
pub(crate) fn normalize_key(key: &str) -> String {
    let without_scheme = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = without_scheme.split('/').next().unwrap_or("");
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            DOCKER_HUB.to_owned()
        }
        other => other.to_ascii_lowercase(),
    }
}

impl DockerConfig {
    /// Loads `explicit`, which must exist, or else the default location, which may be
    /// absent (then `Ok(None)`: anonymous access only).
    pub fn load(explicit: Option<&Path>) -> Result<Option<Self>, RegistryError> {
        match explicit {
            Some(path) => Self::load_file(path).map(Some),
            None => match default_path() {
                Some(path) if path.exists() => Self::load_file(&path).map(Some),
                _ => Ok(None),
            },
        }
    }

    pub fn load_file(path: &Path) -> Result<Self, RegistryError> {
        let text = std::fs::read(path).map_err(|e| RegistryError::Config {
            path: path.to_owned(),
            reason: format!("cannot read the docker config: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Parses config bytes; `path` is only used in messages.
    pub fn parse(path: &Path, text: &[u8]) -> Result<Self, RegistryError> {
        let err = |reason: String| RegistryError::Config {
            path: path.to_owned(),
            reason,
        };
        let raw: RawConfig = serde_json::from_slice(text).map_err(|e| {
            err(super::client::json_error_without_values(
                "docker config.json",
                &e,
            ))
        })?;
        let mut auths = HashMap::new();
        for (key, entry) in raw.auths {
            let registry = normalize_key(&key);
            let identity_token = entry
                .identitytoken
                .filter(|t| !t.is_empty())
                .map(Secret::new);
            let registry_token = entry
                .registrytoken
                .filter(|t| !t.is_empty())
                .map(Secret::new);
            let creds = match (entry.auth.filter(|a| !a.is_empty()), entry.username) {
                (Some(auth), _) => {
                    let decoded = base64::engine::general_purpose::STANDARD
                        .decode(auth.trim())
                        .map_err(|_| err(format!("auths[{key:?}].auth is not valid base64")))?;
                    let decoded = String::from_utf8(decoded)
                        .map_err(|_| err(format!("auths[{key:?}].auth is not UTF-8")))?;
                    let (user, pass) = decoded.split_once(':').ok_or_else(|| {
                        err(format!(
                            "auths[{key:?}].auth must encode \"username:password\""
                        ))
                    })?;
                    Credentials {
                        username: user.to_owned(),
                        password: Secret::new(pass),
                        identity_token,
                        registry_token,
                    }
                }
                (None, Some(username)) if !username.is_empty() => Credentials {
                    username,
                    password: Secret::new(entry.password.unwrap_or_default()),
                    identity_token,
                    registry_token,
                },
                (None, _) if identity_token.is_some() || registry_token.is_some() => Credentials {
                    identity_token,
                    registry_token,
                    ..Credentials::default()
                },
                // An empty entry (e.g. left by a credsStore login) carries no credentials.
                _ => continue,
            };
            auths.insert(registry, creds);
        }
        let mut helpers: HashMap<String, String> = raw
            .cred_helpers
            .into_iter()
            .map(|(k, v)| (normalize_key(&k), v))
            .collect();
        if let Some(store) = raw.creds_store.filter(|s| !s.is_empty()) {
            helpers.insert(String::new(), store);
        }
        Ok(Self {
            path: path.to_owned(),
            auths,
            helpers,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Credentials for a registry name as written in references (`docker.io`,
    /// `host:port`).
    pub fn credentials_for(&self, registry: &str) -> Option<&Credentials> {
        self.auths.get(&normalize_key(registry))
    }

    /// The credential helper configured for `registry`, if any: sluice does not run
    /// helpers, but says so when authentication fails.
    pub fn helper_for(&self, registry: &str) -> Option<&str> {
        self.helpers
            .get(&normalize_key(registry))
            .or_else(|| self.helpers.get(""))
            .map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_auth_forms() {
        let text = br#"{
          "auths": {
            "https://index.docker.io/v1/": {"auth": "aHViOnB3MQ=="},
            "127.0.0.1:5000": {"username": "u", "password": "p:w"},
            "http://Reg.Example:443/v2/": {"auth": "YTpiOmM="},
            "empty.example": {},
            "acr.example": {"auth": "MDAwMDAwMDAtMDAwMC0wMDAwLTAwMDAtMDAwMDAwMDAwMDAwOg==", "identitytoken": "rt-1"},
            "idonly.example": {"identitytoken": "rt-2"},
            "static.example": {"registrytoken": "st-1"}
          },
          "credHelpers": {"gcr.io": "gcloud"}
        }"#;
        let cfg = DockerConfig::parse(Path::new("/x/config.json"), text).unwrap();
        let hub = cfg.credentials_for("docker.io").unwrap();
        assert_eq!(hub.username, "hub");
        assert_eq!(hub.password.expose(), "pw1");
        let local = cfg.credentials_for("127.0.0.1:5000").unwrap();
        assert_eq!(
            (local.username.as_str(), local.password.expose()),
            ("u", "p:w")
        );
        let other = cfg.credentials_for("reg.example:443").unwrap();
        assert_eq!(
            (other.username.as_str(), other.password.expose()),
            ("a", "b:c")
        );
        assert!(cfg.credentials_for("empty.example").is_none());
        let acr = cfg.credentials_for("acr.example").unwrap();
        assert_eq!(acr.username, "00000000-0000-0000-0000-000000000000");
        assert_eq!(acr.identity_token.as_ref().unwrap().expose(), "rt-1");
        let id_only = cfg.credentials_for("idonly.example").unwrap();
        assert_eq!(id_only.identity_token.as_ref().unwrap().expose(), "rt-2");
        assert!(local.identity_token.is_none());
        let fixed = cfg.credentials_for("static.example").unwrap();
        assert_eq!(fixed.registry_token.as_ref().unwrap().expose(), "st-1");
        assert!(cfg.credentials_for("127.0.0.1:5001").is_none());
        assert_eq!(cfg.helper_for("gcr.io"), Some("gcloud"));
        assert_eq!(cfg.helper_for("quay.io"), None);
        assert!(!format!("{cfg:?}").contains("pw1"));
    }

    #[test]
    fn rejects_bad_configs() {
        for bad in [
            &b"not json"[..],
            br#"{"auths": {"h": {"auth": "!!!"}}}"#,
            br#"{"auths": {"h": {"auth": "bm9jb2xvbg=="}}}"#,
            br#"{"auths": []}"#,
        ] {
            let err = DockerConfig::parse(Path::new("/c.json"), bad).unwrap_err();
            assert!(err.to_string().contains("/c.json"), "{err}");
        }
    }

    #[test]
    fn default_location() {
        assert_eq!(
            default_path_from(Some("/cfg".into()), Some("/root".into())),
            Some(PathBuf::from("/cfg/config.json"))
        );
        assert_eq!(
            default_path_from(Some("".into()), Some("/root".into())),
            Some(PathBuf::from("/root/.docker/config.json"))
        );
        assert_eq!(default_path_from(None, None), None);
    }

    #[test]
    fn errors_never_quote_values() {
        let text = br#"{"auths": {"h": {"username": "u", "password": 987654}}}"#;
        let err = DockerConfig::parse(Path::new("/c.json"), text).unwrap_err();
        assert!(!err.to_string().contains("987654"), "{err}");
    }

    #[test]
    fn explicit_missing_file_is_an_error() {
        let err =
            DockerConfig::load(Some(Path::new("/nonexistent/sluice/config.json"))).unwrap_err();
        assert!(matches!(err, RegistryError::Config { .. }));
    }
}

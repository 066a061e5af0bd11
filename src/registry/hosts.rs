//! Where to send requests for a registry: containerd's `hosts.toml` mirrors
//! (`<hosts_dir>/<registry>/hosts.toml`, or `<hosts_dir>/_default/hosts.toml`), falling back
//! to the registry itself.
//!
//! Supported keys: `server`; per `[host."URL"]` table and at top level for the server:
//! `capabilities` (`pull`, `resolve`, `push`), `skip_verify`, `ca` (path or list, relative to
//! the file's directory), `override_path`, and `[...header]` tables with string or list
//! values. `client` (mutual TLS) is rejected with an error rather than silently ignored.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use reqwest::Url;

use super::error::RegistryError;
use super::reference::endpoint_host;

/// What a host may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Fetch content by digest (manifests and blobs).
    pub pull: bool,
    /// Resolve a tag to a digest.
    pub resolve: bool,
}

impl Capabilities {
    pub const ALL: Self = Self {
        pull: true,
        resolve: true,
    };
}

/// One host to try, in order.
#[derive(Clone, PartialEq, Eq)]
pub struct HostEndpoint {
    /// `scheme://authority[/path]/v2`, with no trailing slash.
    pub api_base: String,
    /// `host[:port]`, for messages, credentials and token caching.
    pub host: String,
    pub capabilities: Capabilities,
    pub skip_verify: bool,
    /// Extra root certificates (PEM files).
    pub ca: Vec<PathBuf>,
    /// Headers added to every request to this host.
    pub headers: Vec<(String, String)>,
    /// A mirror (as opposed to the registry itself / the `server` of hosts.toml).
    pub is_mirror: bool,
}

impl std::fmt::Debug for HostEndpoint {
    /// Header values are left out: hosts.toml may carry an `Authorization` override.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let header_names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("HostEndpoint")
            .field("api_base", &self.api_base)
            .field("host", &self.host)
            .field("capabilities", &self.capabilities)
            .field("skip_verify", &self.skip_verify)
            .field("ca", &self.ca)
            .field("header_names", &header_names)
            .field("is_mirror", &self.is_mirror)
            .finish()
    }
}

/// Whether `authority` (`host[:port]`) is on a loopback address; Docker talks plain HTTP
/// to those without configuration.
pub fn is_loopback(authority: &str) -> bool {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else if authority.matches(':').count() > 1 {
        authority // bare IPv6 without port
    } else {
        authority.split(':').next().unwrap_or("")
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The endpoint list without hosts.toml: the registry itself.
pub fn default_endpoints(registry: &str, plain_http: bool) -> Vec<HostEndpoint> {
    let host = endpoint_host(registry);
    let scheme = if plain_http || is_loopback(host) {
        "http"
    } else {
        "https"
    };
    vec![HostEndpoint {
        api_base: format!("{scheme}://{host}/v2"),
        host: host.to_owned(),
        capabilities: Capabilities::ALL,
        skip_verify: false,
        ca: Vec::new(),
        headers: Vec::new(),
        is_mirror: false,
    }]
}

/// The endpoints for `registry`: those of its hosts.toml (or `_default`'s) if present, the
/// registry itself otherwise.
pub fn endpoints_for(
    hosts_dir: Option<&Path>,
    registry: &str,
    plain_http: bool,
) -> Result<Vec<HostEndpoint>, RegistryError> {
    if let Some(dir) = hosts_dir {
        for name in [registry, "_default"] {
            let path = dir.join(name).join("hosts.toml");
            match std::fs::read_to_string(&path) {
                Ok(text) => return parse_hosts_toml(&path, &text, registry, plain_http),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(RegistryError::Config {
                        path,
                        reason: format!("cannot read: {e}"),
                    });
                }
            }
        }
    }
    Ok(default_endpoints(registry, plain_http))
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHost {
    #[serde(default)]
    capabilities: Option<Vec<String>>,
    #[serde(default)]
    skip_verify: Option<bool>,
    #[serde(default)]
    ca: Option<OneOrMany>,
    #[serde(default)]
    header: BTreeMap<String, OneOrMany>,
    #[serde(default)]
    override_path: Option<bool>,
    #[serde(default)]
    client: Option<toml::Value>,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

#[derive(serde::Deserialize)]
struct RawFile {
    #[serde(default)]
    server: Option<String>,
    #[serde(default)]
    host: BTreeMap<String, RawHost>,
    #[serde(flatten)]
    top: RawHost,
}

/// Parses one hosts.toml; `path` locates relative `ca` files and names the file in errors.
pub fn parse_hosts_toml(
    path: &Path,
    text: &str,
    registry: &str,
    plain_http: bool,
) -> Result<Vec<HostEndpoint>, RegistryError> {
    let err = |reason: String| RegistryError::Config {
        path: path.to_owned(),
        reason,
    };
    let raw: RawFile = toml::from_str(text).map_err(|e| err(format!("invalid TOML: {e}")))?;
    let base_dir = path.parent().unwrap_or(Path::new("/"));

    // toml tables come back sorted; hosts.toml order is the order of appearance.
    let mut mirrors: Vec<(usize, String, RawHost)> = raw
        .host
        .into_iter()
        .map(|(url, host)| {
            let position = [format!("\"{url}\""), format!("'{url}'")]
                .iter()
                .filter_map(|quoted| text.find(quoted.as_str()))
                .min()
                .or_else(|| text.find(url.as_str()))
                .unwrap_or(usize::MAX);
            (position, url, host)
        })
        .collect();
    mirrors.sort_by_key(|(position, _, _)| *position);

    let mut endpoints = Vec::new();
    for (_, url, host) in mirrors {
        endpoints.push(build_endpoint(&url, host, base_dir, true).map_err(&err)?);
    }
    let upstream = match raw.server {
        Some(server) => build_endpoint(&server, raw.top, base_dir, false).map_err(&err)?,
        None => {
            let mut upstream = default_endpoints(registry, plain_http).remove(0);
            let configured =
                build_endpoint(&upstream.api_base, raw.top, base_dir, false).map_err(&err)?;
            upstream.capabilities = configured.capabilities;
            upstream.skip_verify = configured.skip_verify;
            upstream.ca = configured.ca;
            upstream.headers = configured.headers;
            upstream
        }
    };
    endpoints.push(upstream);
    Ok(endpoints)
}

fn build_endpoint(
    url: &str,
    raw: RawHost,
    base_dir: &Path,
    is_mirror: bool,
) -> Result<HostEndpoint, String> {
    if raw.client.is_some() {
        return Err(format!(
            "host {url:?}: client certificates (`client`) are not supported by sluice"
        ));
    }
    let with_scheme = if url.contains("://") {
        url.to_owned()
    } else {
        format!("https://{url}")
    };
    let parsed = Url::parse(&with_scheme).map_err(|e| format!("host {url:?}: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("host {url:?}: scheme must be http or https"));
    }
    let host_name = parsed
        .host_str()
        .ok_or_else(|| format!("host {url:?} has no host name"))?;
    let authority = match parsed.port() {
        Some(port) => format!("{host_name}:{port}"),
        None => host_name.to_owned(),
    };
    let path = parsed.path().trim_end_matches('/');
    let api_path = if raw.override_path.unwrap_or(false) || path.ends_with("/v2") {
        path.to_owned()
    } else {
        format!("{path}/v2")
    };
    let capabilities = match raw.capabilities {
        None => Capabilities::ALL,
        Some(list) => {
            let mut caps = Capabilities {
                pull: false,
                resolve: false,
            };
            for cap in list {
                match cap.as_str() {
                    "pull" => caps.pull = true,
                    "resolve" => caps.resolve = true,
                    "push" => {}
                    other => return Err(format!("host {url:?}: unknown capability {other:?}")),
                }
            }
            caps
        }
    };
    let ca = raw
        .ca
        .map(OneOrMany::into_vec)
        .unwrap_or_default()
        .into_iter()
        .map(|p| base_dir.join(p))
        .collect();
    let headers = raw
        .header
        .into_iter()
        .flat_map(|(name, values)| {
            values
                .into_vec()
                .into_iter()
                .map(move |value| (name.clone(), value))
        })
        .collect();
    Ok(HostEndpoint {
        api_base: format!("{}://{authority}{api_path}", parsed.scheme()),
        host: authority,
        capabilities,
        skip_verify: raw.skip_verify.unwrap_or(false),
        ca,
        headers,
        is_mirror,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_detection() {
        for yes in [
            "localhost",
            "localhost:5000",
            "127.0.0.1",
            "127.1.2.3:80",
            "[::1]:5000",
            "[::1]",
            "::1",
        ] {
            assert!(is_loopback(yes), "{yes}");
        }
        for no in [
            "example.com",
            "10.0.0.1:5000",
            "[::2]:5000",
            "localhost.example",
        ] {
            assert!(!is_loopback(no), "{no}");
        }
        assert_eq!(
            default_endpoints("127.0.0.1:5000", false)[0].api_base,
            "http://127.0.0.1:5000/v2"
        );
        assert_eq!(
            default_endpoints("docker.io", false)[0].api_base,
            "https://registry-1.docker.io/v2"
        );
        assert_eq!(
            default_endpoints("reg.example:5000", true)[0].api_base,
            "http://reg.example:5000/v2"
        );
    }

    #[test]
    fn parses_hosts_toml_in_order() {
        let text = r#"
server = "https://registry-1.docker.io"

[host."https://zz-mirror.example"]
  capabilities = ["pull", "resolve"]
  ca = "certs/ca.pem"
  [host."https://zz-mirror.example".header]
    x-custom = "1"
    x-multi = ["a", "b"]

[host."http://aa-mirror.example:5000/prefix"]
  capabilities = ["pull"]
  skip_verify = true
  ca = ["/abs/a.pem", "b.pem"]

[host.'https://mm.example/v2/custom']
  override_path = true
"#;
        let eps = parse_hosts_toml(
            Path::new("/etc/hosts.d/docker.io/hosts.toml"),
            text,
            "docker.io",
            false,
        )
        .unwrap();
        assert_eq!(eps.len(), 4);
        assert_eq!(eps[0].api_base, "https://zz-mirror.example/v2");
        assert_eq!(eps[0].capabilities, Capabilities::ALL);
        assert_eq!(
            eps[0].ca,
            vec![PathBuf::from("/etc/hosts.d/docker.io/certs/ca.pem")]
        );
        assert_eq!(
            eps[0].headers,
            vec![
                ("x-custom".into(), "1".into()),
                ("x-multi".into(), "a".into()),
                ("x-multi".into(), "b".into())
            ]
        );
        assert!(eps[0].is_mirror);
        let shown = format!("{:?}", eps[0]);
        assert!(
            shown.contains("x-custom") && !shown.contains("\"1\""),
            "{shown}"
        );
        assert_eq!(eps[1].api_base, "http://aa-mirror.example:5000/prefix/v2");
        assert_eq!(eps[1].host, "aa-mirror.example:5000");
        assert!(eps[1].capabilities.pull && !eps[1].capabilities.resolve);
        assert!(eps[1].skip_verify);
        assert_eq!(
            eps[1].ca,
            vec![
                PathBuf::from("/abs/a.pem"),
                PathBuf::from("/etc/hosts.d/docker.io/b.pem")
            ]
        );
        assert_eq!(eps[2].api_base, "https://mm.example/v2/custom");
        assert_eq!(eps[3].api_base, "https://registry-1.docker.io/v2");
        assert!(!eps[3].is_mirror);
    }

    #[test]
    fn server_defaults_and_plain_http() {
        let eps = parse_hosts_toml(
            Path::new("/h/reg.example/hosts.toml"),
            "server = \"http://reg.example:8080\"\n",
            "reg.example",
            false,
        )
        .unwrap();
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].api_base, "http://reg.example:8080/v2");
        let eps = parse_hosts_toml(
            Path::new("/h/reg.example/hosts.toml"),
            "skip_verify = true\n",
            "reg.example",
            false,
        )
        .unwrap();
        assert_eq!(eps[0].api_base, "https://reg.example/v2");
        assert!(eps[0].skip_verify);
    }

    #[test]
    fn rejects_bad_hosts_toml() {
        for bad in [
            "server = 5",
            "[host.\"https://m\"]\ncapabilities = [\"fly\"]",
            "[host.\"ftp://m\"]",
            "[host.\"https://m\"]\nunknown_key = 1",
            "[host.\"https://m\"]\nclient = \"/c.pem\"",
            "not toml ===",
        ] {
            let err = parse_hosts_toml(Path::new("/h/x/hosts.toml"), bad, "x", false).unwrap_err();
            assert!(err.to_string().contains("/h/x/hosts.toml"), "{bad}: {err}");
        }
    }

    #[test]
    fn loads_from_directory_with_default_fallback() {
        let dir = tempfile::tempdir().unwrap();
        let eps = endpoints_for(Some(dir.path()), "reg.example", false).unwrap();
        assert_eq!(eps, default_endpoints("reg.example", false));
        std::fs::create_dir_all(dir.path().join("_default")).unwrap();
        std::fs::write(
            dir.path().join("_default/hosts.toml"),
            "[host.\"http://127.0.0.1:1\"]\n",
        )
        .unwrap();
        let eps = endpoints_for(Some(dir.path()), "reg.example", false).unwrap();
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[0].api_base, "http://127.0.0.1:1/v2");
    }
}

//! Registry authentication: `WWW-Authenticate` challenges, credentials, and the cache of
//! bearer tokens. Secrets live in [`Secret`], whose `Debug` never shows them.

use std::collections::HashMap;
use std::fmt;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use base64::Engine as _;

/// A password or token. `Debug` and `Display` are redacted so a secret cannot leak into
/// logs or error messages by accident.
#[derive(Clone, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; only for building an `Authorization` header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// How to authenticate to one registry: a user name and password, and/or a token.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
    /// OAuth2 refresh token (`identitytoken` in config.json) from registries whose login
    /// issues one; exchanged for access tokens instead of the password.
    pub identity_token: Option<Secret>,
    /// A bearer token sent as is (`registrytoken` in config.json), no token server.
    pub registry_token: Option<Secret>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &self.password)
            .field("identity_token", &self.identity_token)
            .field("registry_token", &self.registry_token)
            .finish()
    }
}

impl Credentials {
    pub fn basic(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            username: username.into(),
            password: Secret::new(password),
            ..Self::default()
        }
    }

    pub fn with_registry_token(token: impl Into<String>) -> Self {
        Self {
            registry_token: Some(Secret::new(token)),
            ..Self::default()
        }
    }

    /// The value of an `Authorization: Basic` header.
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password.expose());
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// One authentication challenge from a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic {
        realm: Option<String>,
    },
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses a `WWW-Authenticate` value such as
/// `Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull"`.
/// Quoted values may contain commas and `\"` escapes. Unknown schemes give `None`.
pub fn parse_www_authenticate(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = match header.find(|c: char| c.is_ascii_whitespace()) {
        Some(i) => (&header[..i], header[i..].trim_start()),
        None => (header, ""),
    };
    let params = parse_params(rest)?;
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    if scheme.eq_ignore_ascii_case("basic") {
        Some(Challenge::Basic {
            realm: get("realm"),
        })
    } else if scheme.eq_ignore_ascii_case("bearer") {
        Some(Challenge::Bearer {
            realm: get("realm").filter(|r| !r.is_empty())?,
            service: get("service"),
            scope: get("scope"),
        })
    } else {
        None
    }
}

fn parse_params(mut rest: &str) -> Option<Vec<(String, String)>> {
    let mut params = Vec::new();
    loop {
        rest = rest.trim_start_matches(|c: char| c == ',' || c.is_ascii_whitespace());
        if rest.is_empty() {
            return Some(params);
        }
        let eq = rest.find('=')?;
        let name = rest[..eq].trim().to_owned();
        if name.is_empty() || name.contains(|c: char| c.is_ascii_whitespace() || c == ',') {
            return None;
        }
        rest = rest[eq + 1..].trim_start();
        let value;
        if let Some(quoted) = rest.strip_prefix('"') {
            let mut out = String::new();
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => out.push(chars.next()?.1),
                    '"' => {
                        end = Some(i);
                        break;
                    }
                    c => out.push(c),
                }
            }
            rest = &quoted[end? + 1..];
            value = out;
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_owned();
            rest = &rest[end..];
        }
        params.push((name, value));
    }
}

/// The scope a pull of `repository` needs.
pub fn pull_scope(repository: &str) -> String {
    format!("repository:{repository}:pull")
}

/// Token endpoint answer (distribution token spec: `token` or OAuth2 `access_token`).
#[derive(serde::Deserialize)]
pub(crate) struct TokenResponse {
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub access_token: Option<String>,
    #[serde(default)]
    pub expires_in: Option<u64>,
}

/// The spec's default lifetime when the token server does not say.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

impl TokenResponse {
    pub(crate) fn into_token(self) -> Option<(Secret, Duration)> {
        let token = self
            .token
            .filter(|t| !t.is_empty())
            .or(self.access_token.filter(|t| !t.is_empty()))?;
        let lifetime = self
            .expires_in
            .filter(|&s| s > 0)
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TOKEN_LIFETIME);
        Some((Secret::new(token), lifetime))
    }
}

#[derive(Clone)]
struct CachedToken {
    token: Secret,
    usable_until: Instant,
}

/// Bearer tokens per registry host and repository scope, valid until shortly before they
/// expire so a request never carries a token that dies in flight. Nested maps so a lookup
/// on the read path borrows its keys instead of allocating them.
#[derive(Default)]
pub struct TokenCache {
    tokens: RwLock<HashMap<String, HashMap<String, CachedToken>>>,
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count: usize = self
            .tokens
            .read()
            .map(|t| t.values().map(HashMap::len).sum())
            .unwrap_or(0);
        f.debug_struct("TokenCache")
            .field("tokens", &count)
            .finish()
    }
}

impl TokenCache {
    pub fn get(&self, host: &str, scope: &str) -> Option<Secret> {
        let tokens = self.tokens.read().unwrap_or_else(|e| e.into_inner());
        tokens
            .get(host)?
            .get(scope)
            .filter(|t| t.usable_until > Instant::now())
            .map(|t| t.token.clone())
    }

    pub fn insert(&self, host: &str, scope: &str, token: Secret, lifetime: Duration) {
        // Keep a margin of a tenth of the lifetime, at most 30 s.
        let margin = (lifetime / 10).min(Duration::from_secs(30));
        let now = Instant::now();
        let mut tokens = self.tokens.write().unwrap_or_else(|e| e.into_inner());
        let for_host = tokens.entry(host.to_owned()).or_default();
        for_host.retain(|_, t| t.usable_until > now);
        for_host.insert(
            scope.to_owned(),
            CachedToken {
                token,
                usable_until: now + lifetime - margin,
            },
        );
    }

    pub fn remove(&self, host: &str, scope: &str) {
        let mut tokens = self.tokens.write().unwrap_or_else(|e| e.into_inner());
        if let Some(for_host) = tokens.get_mut(host) {
            for_host.remove(scope);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenge() {
        let c = parse_www_authenticate(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull,push""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/busybox:pull,push".into()),
            }
        );
        let c = parse_www_authenticate(r#"bearer  realm = "http://h/t" , error="invalid_token""#)
            .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "http://h/t".into(),
                service: None,
                scope: None
            }
        );
        let c = parse_www_authenticate(r#"Bearer realm="a\"b",service=plain"#).unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "a\"b".into(),
                service: Some("plain".into()),
                scope: None
            }
        );
    }

    #[test]
    fn parses_basic_and_rejects_garbage() {
        assert_eq!(
            parse_www_authenticate(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic {
                realm: Some("Registry Realm".into())
            })
        );
        assert_eq!(
            parse_www_authenticate("Basic"),
            Some(Challenge::Basic { realm: None })
        );
        for bad in [
            "",
            "Bearer",
            r#"Bearer service="x""#,
            r#"Bearer realm="unterminated"#,
            r#"Negotiate abc"#,
            r#"Bearer realm"#,
        ] {
            assert_eq!(parse_www_authenticate(bad), None, "{bad}");
        }
    }

    #[test]
    fn arbitrary_challenges_never_panic() {
        let alphabet: Vec<char> = "Bearer realm=\"\\,é✓ x".chars().collect();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 48) as usize;
            let text: String = (0..len)
                .map(|i| alphabet[((state >> (i % 50)) as usize + i * 11) % alphabet.len()])
                .collect();
            let _ = parse_www_authenticate(&text);
            let _ = parse_www_authenticate(&format!("Bearer {text}"));
        }
    }

    #[test]
    fn secrets_are_redacted() {
        let c = Credentials {
            username: "user".into(),
            password: Secret::new("hunter2"),
            identity_token: Some(Secret::new("refresh-me")),
            registry_token: Some(Secret::new("static-me")),
        };
        let shown = format!("{c:?}");
        assert!(shown.contains("user"));
        assert!(!shown.contains("hunter2") && !shown.contains("refresh-me"));
        assert!(!shown.contains("static-me"));
        assert_eq!(c.basic_header(), "Basic dXNlcjpodW50ZXIy");
    }

    #[test]
    fn token_cache_expires() {
        let cache = TokenCache::default();
        cache.insert("h", "s", Secret::new("t"), Duration::from_secs(300));
        assert_eq!(cache.get("h", "s").unwrap().expose(), "t");
        assert!(cache.get("h", "other").is_none());
        cache.insert("h", "z", Secret::new("t"), Duration::ZERO);
        assert!(cache.get("h", "z").is_none());
        cache.remove("h", "s");
        assert!(cache.get("h", "s").is_none());
        let r: TokenResponse =
            serde_json::from_str(r#"{"access_token":"abc","expires_in":0}"#).unwrap();
        let (token, lifetime) = r.into_token().unwrap();
        assert_eq!(token.expose(), "abc");
        assert_eq!(lifetime, DEFAULT_TOKEN_LIFETIME);
        let r: TokenResponse = serde_json::from_str(r#"{"token":""}"#).unwrap();
        assert!(r.into_token().is_none());
    }
}

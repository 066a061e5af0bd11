//! Image references (`host[:port]/repo[:tag][@digest]`) and platforms (`os/arch[/variant]`).
//!
//! Parsing follows the grammar of the distribution project so that every name `docker pull`
//! or `ctr pull` accepts is accepted here, normalised the way Docker does it
//! (`busybox` → `docker.io/library/busybox:latest`).

use std::fmt;
use std::str::FromStr;

use crate::digest::Digest;

use super::error::RegistryError;

/// The registry name Docker uses for Docker Hub in references and credentials.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that actually serves the Docker Hub distribution API.
pub const DOCKER_HUB_ENDPOINT: &str = "registry-1.docker.io";

const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// One repository on one registry, e.g. `127.0.0.1:5000` + `test/img`. Blobs are addressed
/// through a repository: registries authorise per repository, not per blob.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Repository {
    registry: String,
    name: String,
}

impl Repository {
    /// Builds a repository from an already-normalised registry (`docker.io`, `host:port`)
    /// and path (`library/busybox`), validating both.
    pub fn new(registry: &str, name: &str) -> Result<Self, RegistryError> {
        let input = format!("{registry}/{name}");
        validate_registry(registry).map_err(|reason| invalid(&input, reason))?;
        validate_path(name).map_err(|reason| invalid(&input, reason))?;
        Ok(Self {
            registry: registry.to_owned(),
            name: name.to_owned(),
        })
    }

    /// The registry as written in references (`docker.io`, `127.0.0.1:5000`, `[::1]:5000`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path (`library/busybox`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `host[:port]` that serves the API for this registry when no mirror is
    /// configured (Docker Hub is reached through `registry-1.docker.io`).
    pub fn endpoint_host(&self) -> &str {
        endpoint_host(&self.registry)
    }
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.name)
    }
}

/// The API host for a registry name.
pub fn endpoint_host(registry: &str) -> &str {
    if registry == DOCKER_HUB {
        DOCKER_HUB_ENDPOINT
    } else {
        registry
    }
}

/// A parsed, normalised image reference. At least one of tag and digest is present: a
/// reference with neither gets the tag `latest`, as Docker does.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageReference {
    repository: Repository,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl ImageReference {
    pub fn repository(&self) -> &Repository {
        &self.repository
    }

    pub fn registry(&self) -> &str {
        self.repository.registry()
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// What to ask the registry for in `/manifests/<reference>`: the digest when pinned
    /// (the tag is then only informative, as in Docker), else the tag.
    pub fn manifest_reference(&self) -> &str {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => digest.as_str(),
            (None, Some(tag)) => tag,
            (None, None) => "latest",
        }
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

fn invalid(input: &str, reason: impl Into<String>) -> RegistryError {
    RegistryError::InvalidReference {
        input: input.chars().take(300).collect(),
        reason: reason.into(),
    }
}

impl FromStr for ImageReference {
    type Err = RegistryError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        if input.is_empty() {
            return Err(invalid(input, "empty reference"));
        }
        if input.len() > MAX_NAME_LEN + MAX_TAG_LEN + 80 {
            return Err(invalid(input, "reference too long"));
        }
        let (rest, digest) = match input.rsplit_once('@') {
            Some((rest, digest)) => {
                let digest = digest
                    .parse::<Digest>()
                    .map_err(|e| invalid(input, e.to_string()))?;
                (rest, Some(digest))
            }
            None => (input, None),
        };
        // A tag follows the last ':' only if no '/' comes after it; otherwise the ':' is
        // a port separator (`host:5000/repo`).
        let (name, tag) = match rest.rfind(':') {
            Some(colon) if !rest[colon..].contains('/') => {
                (&rest[..colon], Some(rest[colon + 1..].to_owned()))
            }
            _ => (rest, None),
        };
        if let Some(tag) = &tag {
            validate_tag(tag).map_err(|reason| invalid(input, reason))?;
        }
        if name.is_empty() {
            return Err(invalid(input, "missing repository name"));
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, rest)) if looks_like_registry(first) => (first.to_owned(), rest),
            _ => (DOCKER_HUB.to_owned(), name),
        };
        let registry = if registry == "index.docker.io" {
            DOCKER_HUB.to_owned()
        } else {
            registry
        };
        let path = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_owned()
        };
        if registry.len() + 1 + path.len() > MAX_NAME_LEN {
            return Err(invalid(input, "repository name longer than 255 characters"));
        }
        validate_registry(&registry).map_err(|reason| invalid(input, reason))?;
        validate_path(&path).map_err(|reason| invalid(input, reason))?;
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_owned())
        } else {
            tag
        };
        Ok(Self {
            repository: Repository {
                registry,
                name: path,
            },
            tag,
            digest,
        })
    }
}

/// Docker's rule: the first component is a registry if it has a '.' or ':' (a domain or a
/// port), is `localhost`, or has upper-case letters (never valid in a repository path).
fn looks_like_registry(component: &str) -> bool {
    component.contains('.')
        || component.contains(':')
        || component == "localhost"
        || component.bytes().any(|b| b.is_ascii_uppercase())
}

fn validate_tag(tag: &str) -> Result<(), String> {
    let bytes = tag.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    match bytes.first() {
        None => Err("empty tag after ':'".into()),
        Some(_) if bytes.len() > MAX_TAG_LEN => Err("tag longer than 128 characters".into()),
        Some(&first) if !word(first) => Err(format!(
            "tag {tag:?} must start with a letter, digit or '_'"
        )),
        Some(_) if !bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-') => Err(format!(
            "tag {tag:?} may only contain letters, digits, '_', '.' and '-'"
        )),
        Some(_) => Ok(()),
    }
}

fn validate_registry(registry: &str) -> Result<(), String> {
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        // IPv6 literal: `[::1]` or `[::1]:5000`.
        let (addr, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("registry {registry:?} has an unclosed '['"))?;
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("registry {registry:?} is not a valid IPv6 address"));
        }
        match after {
            "" => (None, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return Err(format!("unexpected text after ']' in {registry:?}")),
            },
        }
    } else {
        match registry.split_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(registry), None),
        }
    };
    if let Some(host) = host {
        let label_ok = |label: &str| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        };
        if host.is_empty() || !host.split('.').all(label_ok) {
            return Err(format!(
                "registry host {host:?} is not a valid host name or IP address"
            ));
        }
    }
    if let Some(port) = port
        && port.parse::<u16>().is_err()
    {
        return Err(format!(
            "port {port:?} of registry {registry:?} is not a number from 0 to 65535"
        ));
    }
    Ok(())
}

/// Path components are lower-case alphanumerics joined by `.`, `_`, `__` or runs of `-`.
fn validate_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("missing repository path".into());
    }
    for component in path.split('/') {
        let bytes = component.as_bytes();
        let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        let ok = match (bytes.first(), bytes.last()) {
            (Some(&first), Some(&last)) if alnum(first) && alnum(last) => {
                let mut ok = true;
                let mut i = 0;
                while i < bytes.len() {
                    if alnum(bytes[i]) {
                        i += 1;
                        continue;
                    }
                    let start = i;
                    while i < bytes.len() && !alnum(bytes[i]) {
                        i += 1;
                    }
                    let sep = &component[start..i];
                    if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-'))
                    {
                        ok = false;
                        break;
                    }
                }
                ok
            }
            _ => false,
        };
        if !ok {
            return Err(format!(
                "repository path component {component:?} must be lower-case letters and digits, \
                 separated by '.', '_', '__' or '-'"
            ));
        }
    }
    Ok(())
}

/// The platform to pick from a multi-platform image index.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Default for Platform {
    fn default() -> Self {
        Self {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }
}

impl Platform {
    /// The platform of the machine sluice runs on.
    pub fn host() -> Self {
        let architecture = normalize_arch(std::env::consts::ARCH);
        Self {
            os: std::env::consts::OS.into(),
            architecture,
            variant: None,
        }
    }

    /// Whether an index entry for `candidate` can run here. An unspecified wanted variant
    /// accepts any; `arm64` without variant and `arm64/v8` are the same platform.
    pub fn matches(&self, candidate: &Platform) -> bool {
        if self.os != candidate.os
            || normalize_arch(&self.architecture) != normalize_arch(&candidate.architecture)
        {
            return false;
        }
        match &self.variant {
            None => true,
            Some(wanted) => {
                let arch = normalize_arch(&self.architecture);
                normalize_variant(&arch, Some(wanted))
                    == normalize_variant(&arch, candidate.variant.as_deref())
            }
        }
    }
}

fn normalize_arch(arch: &str) -> String {
    match arch {
        "x86_64" | "x86-64" => "amd64".into(),
        "aarch64" => "arm64".into(),
        "armhf" | "armel" => "arm".into(),
        "i386" | "i686" => "386".into(),
        other => other.to_ascii_lowercase(),
    }
}

fn normalize_variant(arch: &str, variant: Option<&str>) -> Option<String> {
    match (arch, variant) {
        ("arm64", None | Some("v8" | "8")) => None,
        ("arm", None | Some("7")) => Some("v7".into()),
        (_, Some(v)) if v.bytes().all(|b| b.is_ascii_digit()) => Some(format!("v{v}")),
        (_, v) => v.map(str::to_ascii_lowercase),
    }
}

impl FromStr for Platform {
    type Err = RegistryError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| RegistryError::InvalidPlatform {
            input: input.chars().take(100).collect(),
            reason: reason.into(),
        };
        let parts: Vec<&str> = input.split('/').collect();
        let part_ok = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        };
        if !(2..=3).contains(&parts.len()) {
            return Err(err("expected two or three '/'-separated parts"));
        }
        if !parts.iter().all(|p| part_ok(p)) {
            return Err(err(
                "parts must be non-empty letters, digits, '_', '-' or '.'",
            ));
        }
        let os = parts[0].to_ascii_lowercase();
        let architecture = normalize_arch(parts[1]);
        let variant = parts.get(2).map(|v| v.to_ascii_lowercase());
        Ok(Self {
            os,
            architecture,
            variant,
        })
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn parse(s: &str) -> ImageReference {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn docker_hub_normalisation() {
        let r = parse("busybox");
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.repository().name(), "library/busybox");
        assert_eq!(r.tag(), Some("latest"));
        assert_eq!(r.repository().endpoint_host(), "registry-1.docker.io");
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");

        let r = parse("user/app:1.0");
        assert_eq!(r.to_string(), "docker.io/user/app:1.0");
        let r = parse("index.docker.io/library/alpine:3");
        assert_eq!(r.to_string(), "docker.io/library/alpine:3");
        let r = parse("docker.io/busybox");
        assert_eq!(r.repository().name(), "library/busybox");
    }

    #[test]
    fn hosts_ports_tags_digests() {
        let r = parse("127.0.0.1:5000/test/img:v1");
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository().name(), "test/img");
        assert_eq!(r.tag(), Some("v1"));
        assert_eq!(r.manifest_reference(), "v1");

        let r = parse(&format!("localhost:5000/img@{D}"));
        assert_eq!(r.registry(), "localhost:5000");
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest().unwrap().as_str(), D);
        assert_eq!(r.manifest_reference(), D);

        let r = parse(&format!("ghcr.io/a/b/c:tag@{D}"));
        assert_eq!(r.repository().name(), "a/b/c");
        assert_eq!(r.tag(), Some("tag"));
        assert_eq!(r.manifest_reference(), D);

        let r = parse("localhost/img");
        assert_eq!(r.registry(), "localhost");
        let r = parse("[::1]:5000/img:t");
        assert_eq!(r.registry(), "[::1]:5000");
        assert_eq!(r.repository().name(), "img");
        let r = parse("my-registry.local:443/a__b/c.d-e--f:x");
        assert_eq!(r.repository().name(), "a__b/c.d-e--f");
        let r = parse("127.0.0.1:5000/img");
        assert_eq!(r.tag(), Some("latest"));
    }

    #[test]
    fn rejects_bad_references() {
        for bad in [
            "",
            ":tag",
            "UPPER",
            "docker.io/UPPER/x",
            "img:",
            "img:-tag",
            "img:t/a",
            "img@sha256:abc",
            "img@md5:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "host:99999/img",
            "host:port/img",
            "a//b",
            "a/b/",
            "-a/b",
            "a_/b",
            "a...b",
            "[::1/img",
            "[zz]:5000/img",
            "exa mple.com/img",
        ] {
            let err = bad.parse::<ImageReference>().expect_err(bad);
            assert!(
                matches!(err, RegistryError::InvalidReference { .. }),
                "{bad}: {err}"
            );
        }
        let long = format!("img:{}", "a".repeat(129));
        assert!(long.parse::<ImageReference>().is_err());
        let long = format!("h.io/{}", "a".repeat(300));
        assert!(long.parse::<ImageReference>().is_err());
    }

    /// Deterministic random strings over an alphabet of reference syntax, odd bytes and
    /// multi-byte characters: parsing must answer, never panic.
    #[test]
    fn arbitrary_input_never_panics() {
        let alphabet: Vec<char> = "aZ09:/@._-[]é✓ \t".chars().collect();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 40) as usize;
            let text: String = (0..len)
                .map(|i| alphabet[((state >> (i % 50)) as usize + i * 7) % alphabet.len()])
                .collect();
            let _ = text.parse::<ImageReference>();
            let _ = text.parse::<Platform>();
            let _ = format!("{text}@{D}").parse::<ImageReference>();
        }
    }

    #[test]
    fn platform_parsing_and_matching() {
        let p: Platform = "linux/amd64".parse().unwrap();
        assert_eq!(p, Platform::default());
        let p: Platform = "linux/aarch64".parse().unwrap();
        assert_eq!(p.architecture, "arm64");
        let p: Platform = "linux/arm/v7".parse().unwrap();
        assert_eq!(p.to_string(), "linux/arm/v7");
        for bad in ["", "linux", "linux/", "/amd64", "a/b/c/d", "linux/am d64"] {
            assert!(bad.parse::<Platform>().is_err(), "{bad}");
        }

        let arm64: Platform = "linux/arm64".parse().unwrap();
        let arm64v8: Platform = "linux/arm64/v8".parse().unwrap();
        assert!(arm64.matches(&arm64v8));
        assert!(arm64v8.matches(&arm64));
        let armv6: Platform = "linux/arm/v6".parse().unwrap();
        let armv7: Platform = "linux/arm/v7".parse().unwrap();
        assert!(!armv7.matches(&armv6));
        assert!(!Platform::default().matches(&arm64));
    }
}

//! Every way talking to a registry can fail. Each variant names the registry host, the
//! repository and the manifest reference or blob digest involved (`object`), and its
//! message ends with what the user can do about it.

use std::path::PathBuf;
use std::time::Duration;

use crate::digest::Digest;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid image reference {input:?}: {reason}")]
    InvalidReference { input: String, reason: String },

    #[error(
        "invalid platform {input:?}: {reason} (expected os/arch[/variant], e.g. linux/arm64/v8)"
    )]
    InvalidPlatform { input: String, reason: String },

    #[error("invalid configuration in {path}: {reason}")]
    Config { path: PathBuf, reason: String },

    #[error("cannot set up an HTTP client for {host}: {reason}")]
    HttpClient { host: String, reason: String },

    #[error(
        "cannot reach {host} for repository {repository} ({object}): {reason}; \
         check that the registry is running and reachable, or configure a mirror"
    )]
    Transport {
        host: String,
        repository: String,
        object: String,
        reason: String,
    },

    #[error(
        "TLS with {host} failed for repository {repository} ({object}): {reason}; \
         trust the registry's CA with `ca` in its hosts.toml, or set skip_verify = true \
         for a test registry"
    )]
    Tls {
        host: String,
        repository: String,
        object: String,
        reason: String,
    },

    #[error(
        "no response from {host} within {timeout:?} for repository {repository} ({object}); \
         the registry may be overloaded or hanging: retry later or raise the request timeout"
    )]
    Timeout {
        host: String,
        repository: String,
        object: String,
        timeout: Duration,
    },

    #[error("{status} from {host} for repository {repository} ({object}): {hint}")]
    Unauthorized {
        host: String,
        repository: String,
        object: String,
        status: u16,
        hint: String,
    },

    #[error(
        "{object} not found in repository {repository} on {host} (404): \
         check the image name, tag and digest"
    )]
    NotFound {
        host: String,
        repository: String,
        object: String,
    },

    #[error(
        "HTTP {status} from {host} for repository {repository} ({object}): {}",
        status_advice(*.status)
    )]
    Status {
        host: String,
        repository: String,
        object: String,
        status: u16,
        /// What the server asked for in `Retry-After`, if anything.
        retry_after: Option<Duration>,
    },

    #[error(
        "token server {realm} refused a token for repository {repository} on {host} \
         ({object}): {reason}"
    )]
    Token {
        host: String,
        repository: String,
        object: String,
        realm: String,
        reason: String,
        transient: bool,
    },

    #[error(
        "{object} from repository {repository} on {host} hashes to {actual}: \
         the registry, a mirror or a proxy served wrong or corrupted content; \
         retry, or remove the mirror that serves it"
    )]
    DigestMismatch {
        host: String,
        repository: String,
        object: String,
        actual: Digest,
    },

    #[error(
        "bad answer from {host} to a range request for bytes {start}..{end} of {digest} \
         in repository {repository}: {reason}; the registry or a proxy in front of it \
         mishandles Range requests"
    )]
    BadRange {
        host: String,
        repository: String,
        digest: Digest,
        start: u64,
        end: u64,
        reason: String,
    },

    #[error(
        "bytes {start}..{end} are outside blob {digest} of {size} bytes \
         (repository {repository} on {host}): the layer index and the blob disagree"
    )]
    RangeOutOfBounds {
        host: String,
        repository: String,
        digest: Digest,
        start: u64,
        end: u64,
        size: u64,
    },

    #[error(
        "invalid manifest {object} in repository {repository} on {host}: {reason}; \
         sluice supports OCI and Docker schema 2 manifests and indexes"
    )]
    InvalidManifest {
        host: String,
        repository: String,
        object: String,
        reason: String,
    },

    #[error(
        "no image for platform {platform} in {object} (repository {repository} on {host}); \
         available: {available}; choose one of these platforms"
    )]
    PlatformNotFound {
        host: String,
        repository: String,
        object: String,
        platform: String,
        available: String,
    },

    #[error("redirect from {host} for {object} in repository {repository} failed: {reason}")]
    Redirect {
        host: String,
        repository: String,
        object: String,
        reason: String,
    },

    #[error(
        "{object} in repository {repository} on {host} is larger than {limit} bytes; \
         refusing to load it into memory"
    )]
    TooLarge {
        host: String,
        repository: String,
        object: String,
        limit: u64,
    },
}

fn status_advice(status: u16) -> &'static str {
    match status {
        429 => "the registry is rate limiting: wait, authenticate, or use a mirror",
        500..=599 => "the registry failed: retry later",
        _ => "unexpected status: check the registry and any proxy in front of it",
    }
}

impl RegistryError {
    /// Whether a later attempt may succeed: network failures, timeouts, 5xx and 429.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport { .. } | Self::Timeout { .. } => true,
            Self::Status { status, .. } => *status == 429 || (500..=599).contains(status),
            Self::Token { transient, .. } => *transient,
            // A mismatch may be a truncated or corrupted transfer; fetching again is cheap
            // compared to failing a read.
            Self::DigestMismatch { .. } => true,
            _ => false,
        }
    }

    /// The delay the server asked for, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The registry host the error is about, when it is about one.
    pub fn host(&self) -> Option<&str> {
        match self {
            Self::InvalidReference { .. } | Self::InvalidPlatform { .. } | Self::Config { .. } => {
                None
            }
            Self::HttpClient { host, .. }
            | Self::Transport { host, .. }
            | Self::Tls { host, .. }
            | Self::Timeout { host, .. }
            | Self::Unauthorized { host, .. }
            | Self::NotFound { host, .. }
            | Self::Status { host, .. }
            | Self::Token { host, .. }
            | Self::DigestMismatch { host, .. }
            | Self::BadRange { host, .. }
            | Self::RangeOutOfBounds { host, .. }
            | Self::InvalidManifest { host, .. }
            | Self::PlatformNotFound { host, .. }
            | Self::Redirect { host, .. }
            | Self::TooLarge { host, .. } => Some(host),
        }
    }
}

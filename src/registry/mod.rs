//! OCI distribution client: resolve references, fetch manifests and blobs, and read
//! byte ranges of blobs — the only way bytes enter sluice.
//!
//! # Use
//!
//! ```no_run
//! # async fn demo() -> Result<(), sluice::registry::RegistryError> {
//! use std::sync::Arc;
//! use sluice::registry::{BlobSource, FetchPriority, ImageReference, Platform, RegistryClient, RegistryOptions};
//!
//! let client = RegistryClient::new(RegistryOptions::default(), Arc::default())?;
//! let reference: ImageReference = "127.0.0.1:5000/test/img:v1".parse()?;
//! let image = client.resolve(&reference, &Platform::default()).await?;
//! let layer = &image.layers[0];
//! let blob = client.remote_blob(reference.repository().clone(), layer.digest.clone(), layer.size);
//! let head = blob.read_range(0..512, FetchPriority::OnDemand).await;
//! # Ok(()) }
//! ```
//!
//! # Pieces
//!
//! - [`reference`]: `ImageReference`, `Repository`, `Platform` parsing and normalisation.
//! - [`manifest`]: serde types for manifests, indexes and configs; platform selection.
//! - [`auth`], [`docker_config`]: challenges, bearer tokens, credentials from `config.json`.
//! - [`hosts`]: containerd `hosts.toml` mirrors; loopback registries use plain HTTP.
//! - [`retry`]: backoff and `Retry-After`.
//! - [`client`]: `RegistryClient` (endpoints, auth, redirects, retries, verification) and
//!   `RemoteBlob`, the [`BlobSource`] over a registry.
//!
//! # Behaviour
//!
//! - **Hosts**: for registry `R`, `<hosts_dir>/R/hosts.toml` (else `_default/hosts.toml`)
//!   lists mirrors tried in file order, then the upstream `server`. Tag resolution uses
//!   hosts with `resolve`, digests and blobs hosts with `pull`. A mirror gets one attempt
//!   and, after a transient failure, is skipped for 30 s; the last host gets the retries.
//!   Without hosts.toml, loopback registries (`127.0.0.0/8`, `::1`, `localhost`) use
//!   `http://`, others `https://` unless `plain_http`. Mirror requests carry
//!   `?ns=<registry>` as containerd's do.
//! - **Auth**: requests go out anonymously (or with a cached token / basic credentials);
//!   a 401/403 with a `WWW-Authenticate` challenge triggers one authentication (bearer
//!   token from the realm, with basic credentials or an identity token when configured;
//!   or basic auth) and one retry. Tokens are cached per host and repository scope until
//!   shortly before expiry; concurrent refusals share one token fetch. Credentials come
//!   from a docker `config.json` (`auths`, `credHelpers`/`credsStore` helpers).
//! - **Redirects** (blob storage): followed without the registry's credentials; the
//!   final URL is cached per host and blob for 5 minutes and dropped on 400/401/403/404/410
//!   or a connection error, after which the registry is asked again.
//! - **Retries**: connection errors, timeouts, truncated bodies, digest mismatches, 5xx
//!   and 429 are retried with jittered exponential backoff (or `Retry-After`, capped at
//!   10 s): `on_demand_retries` for [`FetchPriority::OnDemand`] reads and for resolving,
//!   `background_retries` for prefetch/background. Every attempt is bounded by
//!   `request_timeout` (connect, headers, and each pause in the body).
//! - **Verification**: manifests are checked against the pinned digest or the
//!   `Docker-Content-Digest` header; whole blobs against their digest. Range reads check
//!   `Content-Range`; a server that ignores `Range` (200) is read up to the range's end
//!   only.
//! - **Metrics**: every HTTP request (including auth and redirect hops) and every body
//!   byte is counted in `on_demand_*` for on-demand reads and in `background_*` for
//!   everything else (prefetch, background, manifests, configs, whole blobs).
//! - **Secrets** (passwords, tokens, pre-signed URLs, hosts.toml header values) never
//!   appear in `Debug`, `Display` of errors, or logs.

use std::ops::Range;

use bytes::Bytes;
use futures::future::BoxFuture;

use crate::digest::Digest;

pub mod auth;
pub mod client;
pub mod docker_config;
pub mod error;
pub mod hosts;
pub mod manifest;
pub mod push;
pub mod reference;
pub mod retry;

pub use client::{RegistryClient, RegistryOptions, RemoteBlob, ResolvedImage};
pub use error::RegistryError;
pub use manifest::{Descriptor, ImageConfig, ImageIndex, ImageManifest};
pub use reference::{ImageReference, Platform, Repository};

/// How urgently a range is needed. A process blocked in `read(2)` gets more retries and
/// jumps the queue; background streaming gives up sooner and yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FetchPriority {
    /// A read a process is blocked on.
    OnDemand,
    /// Prefetch before the container starts.
    Prefetch,
    /// Streaming the rest of the layer after mount.
    Background,
}

/// A failed range read of one blob, with enough context to tell a user what to do.
#[derive(Debug, thiserror::Error)]
#[error("reading bytes {start}..{end} of blob {blob} from {registry}: {reason}")]
pub struct BlobReadError {
    pub registry: String,
    pub blob: String,
    pub start: u64,
    pub end: u64,
    pub reason: String,
    /// Whether a later attempt may succeed (network down, 5xx, timeout) as opposed to
    /// a permanent failure (404, auth refused, range outside the blob).
    pub transient: bool,
}

/// The compressed bytes of one layer blob, readable by range. The cache and the
/// filesystem depend on this trait only, so they can be tested without a registry.
pub trait BlobSource: Send + Sync + 'static {
    /// Digest of the whole blob.
    fn digest(&self) -> &Digest;
    /// Size of the whole blob in bytes.
    fn size(&self) -> u64;
    /// Read exactly `range` (end exclusive). Fails rather than returning fewer bytes.
    fn read_range(
        &self,
        range: Range<u64>,
        priority: FetchPriority,
    ) -> BoxFuture<'_, Result<Bytes, BlobReadError>>;
}

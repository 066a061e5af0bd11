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

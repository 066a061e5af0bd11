//! OCI distribution client: resolve references, fetch manifests and blobs, and read
//! byte ranges of blobs — the only way bytes enter sluice.

use std::ops::Range;

use bytes::Bytes;
use futures::future::BoxFuture;

use crate::digest::Digest;

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

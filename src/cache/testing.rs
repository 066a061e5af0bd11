//! Test doubles shared by unit tests, integration tests and benches: an in-memory
//! [`BlobSource`] that counts and can fail or hang, and a builder for chunked blobs
//! with a hand-made [`LayerIndex`]. Not used by the daemon.

use std::io::Write as _;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;

use crate::digest::Digest;
use crate::format::{
    Chunk, CompressedOffset, Entry, EntryId, EntryKind, FileOffset, LayerFormat, LayerIndex,
};
use crate::registry::{BlobReadError, BlobSource, FetchPriority};

/// What [`MemoryBlobSource`] does with the next requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SourceBehavior {
    Serve = 0,
    /// Fail every request with a transient error.
    Fail = 1,
    /// Never answer (until the request is dropped).
    Hang = 2,
    /// Serve bytes with one bit flipped in every request.
    Corrupt = 3,
}

/// A blob held in memory.
#[derive(Debug)]
pub struct MemoryBlobSource {
    digest: Digest,
    blob: Bytes,
    behavior: AtomicU8,
    requests: AtomicU64,
    ranges: Mutex<Vec<Range<u64>>>,
    latency: Duration,
}

impl MemoryBlobSource {
    pub fn new(blob: impl Into<Bytes>) -> Self {
        let blob = blob.into();
        Self {
            digest: Digest::sha256_of(&blob),
            blob,
            behavior: AtomicU8::new(SourceBehavior::Serve as u8),
            requests: AtomicU64::new(0),
            ranges: Mutex::new(Vec::new()),
            latency: Duration::ZERO,
        }
    }

    /// Delay every answer, like a registry round trip.
    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    pub fn set_behavior(&self, behavior: SourceBehavior) {
        self.behavior.store(behavior as u8, Ordering::SeqCst);
    }

    /// Range requests received so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Every range requested so far, in order.
    pub fn ranges(&self) -> Vec<Range<u64>> {
        self.ranges
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn behavior(&self) -> SourceBehavior {
        match self.behavior.load(Ordering::SeqCst) {
            1 => SourceBehavior::Fail,
            2 => SourceBehavior::Hang,
            3 => SourceBehavior::Corrupt,
            _ => SourceBehavior::Serve,
        }
    }
}

impl BlobSource for MemoryBlobSource {
    fn digest(&self) -> &Digest {
        &self.digest
    }

    fn size(&self) -> u64 {
        self.blob.len() as u64
    }

    fn read_range(
        &self,
        range: Range<u64>,
        _priority: FetchPriority,
    ) -> BoxFuture<'_, Result<Bytes, BlobReadError>> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.ranges
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(range.clone());
        let behavior = self.behavior();
        async move {
            if !self.latency.is_zero() {
                tokio::time::sleep(self.latency).await;
            }
            let error = |reason: &str| BlobReadError {
                registry: "memory".into(),
                blob: self.digest.to_string(),
                start: range.start,
                end: range.end,
                reason: reason.into(),
                transient: true,
            };
            match behavior {
                SourceBehavior::Hang => futures::future::pending().await,
                SourceBehavior::Fail => Err(error("the test source is failing")),
                _ if range.end > self.blob.len() as u64 || range.start > range.end => {
                    Err(BlobReadError {
                        transient: false,
                        ..error("range outside the blob")
                    })
                }
                SourceBehavior::Corrupt => {
                    let mut data = self.blob[range.start as usize..range.end as usize].to_vec();
                    let middle = data.len() / 2;
                    if let Some(byte) = data.get_mut(middle) {
                        *byte ^= 0x01;
                    }
                    Ok(Bytes::from(data))
                }
                SourceBehavior::Serve => {
                    Ok(self.blob.slice(range.start as usize..range.end as usize))
                }
            }
        }
        .boxed()
    }
}

/// Builds a chunked blob (each chunk its own gzip member or zstd frame) together
/// with the [`LayerIndex`] describing it. Entry 0 is the root directory.
#[derive(Debug)]
pub struct LayerBuilder {
    format: LayerFormat,
    blob: Vec<u8>,
    entries: Vec<Entry>,
}

impl LayerBuilder {
    pub fn new(format: LayerFormat) -> Self {
        Self {
            format,
            blob: Vec::new(),
            entries: vec![Self::entry("", EntryKind::Directory, 0o755)],
        }
    }

    fn entry(name: &str, kind: EntryKind, mode: u32) -> Entry {
        Entry {
            name: name.into(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime_secs: 1_700_000_000,
            mtime_nanos: 0,
            xattrs: Vec::new(),
        }
    }

    fn push(&mut self, entry: Entry) -> EntryId {
        self.entries.push(entry);
        EntryId(self.entries.len() as u32 - 1)
    }

    /// Change the last added entry (or the root, before anything is added).
    pub fn last_mut(&mut self) -> &mut Entry {
        self.entries.last_mut().expect("root entry exists")
    }

    pub fn root_mut(&mut self) -> &mut Entry {
        &mut self.entries[0]
    }

    pub fn dir(&mut self, name: &str, mode: u32) -> EntryId {
        self.push(Self::entry(name, EntryKind::Directory, mode))
    }

    /// A regular file split into chunks of `chunk_size` bytes.
    pub fn file(&mut self, name: &str, mode: u32, content: &[u8], chunk_size: usize) -> EntryId {
        let mut chunks = Vec::new();
        for (i, piece) in content.chunks(chunk_size.max(1)).enumerate() {
            let compressed = match self.format {
                LayerFormat::Estargz => {
                    let mut encoder =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    encoder.write_all(piece).expect("writing to a Vec");
                    encoder.finish().expect("writing to a Vec")
                }
                LayerFormat::ZstdChunked => zstd::encode_all(piece, 1).expect("writing to a Vec"),
            };
            chunks.push(Chunk {
                compressed_offset: CompressedOffset(self.blob.len() as u64),
                compressed_size: compressed.len() as u64,
                inner_offset: 0,
                file_offset: FileOffset((i * chunk_size) as u64),
                size: piece.len() as u64,
                digest: Digest::sha256_of(piece),
            });
            self.blob.extend_from_slice(&compressed);
        }
        self.push(Self::entry(
            name,
            EntryKind::Regular {
                size: content.len() as u64,
                chunks,
            },
            mode,
        ))
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> EntryId {
        self.push(Self::entry(
            name,
            EntryKind::Symlink {
                target: target.into(),
            },
            0o777,
        ))
    }

    pub fn hardlink(&mut self, name: &str, target: EntryId) -> EntryId {
        let mode = self.entries[target.0 as usize].mode;
        self.push(Self::entry(name, EntryKind::Hardlink { target }, mode))
    }

    pub fn node(&mut self, name: &str, kind: EntryKind, mode: u32) -> EntryId {
        self.push(Self::entry(name, kind, mode))
    }

    /// The index and the blob (a trailing pad stands in for the TOC).
    pub fn build(mut self) -> (LayerIndex, Bytes) {
        let toc_offset = CompressedOffset(self.blob.len() as u64);
        self.blob.extend_from_slice(b"TOC-AND-FOOTER");
        let index = LayerIndex {
            format: self.format,
            blob_size: self.blob.len() as u64,
            toc_offset,
            entries: self.entries,
            prefetch: Vec::new(),
            no_prefetch: false,
        };
        (index, Bytes::from(self.blob))
    }
}

/// Deterministic, poorly compressible bytes.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

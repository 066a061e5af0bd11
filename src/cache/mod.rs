//! Chunk cache: on disk, content-addressed by chunk digest; hot chunks in memory.
//!
//! A read asks for a byte range of a file. Each chunk covering it is answered from
//! memory, else from disk, else by a registry fetch. Fetches are single-flight (all
//! concurrent readers of a chunk share one request, keyed by the chunk digest, so the
//! same chunk in two layers is fetched once) and coalesced (adjacent missing chunks
//! are fetched with one `Range` request). Decompression and hashing run on the
//! blocking pool, never on the async executor threads.

mod disk;
mod memory;
mod stream;
pub mod testing;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use futures::future::{Shared, WeakShared};
use tokio::sync::{Notify, oneshot};

use self::disk::DiskStore;
use self::memory::MemoryCache;
pub use self::stream::{StreamHandle, StreamOptions, StreamProgress};
use crate::digest::Digest;
use crate::format::{Chunk, EntryId, EntryKind, FormatError, LayerIndex, SharedIndex};
use crate::metrics::Metrics;
use crate::registry::{BlobReadError, BlobSource, FetchPriority};

/// How the cache is laid out and bounded.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// Directory holding `chunks/`. Created if missing.
    pub dir: PathBuf,
    /// Upper bound on decompressed chunk bytes kept in memory.
    pub memory_bytes: u64,
    /// Independent locks the memory cache and the in-flight table are split into.
    pub shards: usize,
    /// Largest single range request built by joining adjacent chunks.
    pub max_coalesced_bytes: u64,
    /// Upper bound on chunk bytes kept on disk; `None` is unbounded.
    pub disk_bytes: Option<u64>,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            dir: PathBuf::new(),
            memory_bytes: 256 << 20,
            shards: 16,
            max_coalesced_bytes: 4 << 20,
            disk_bytes: None,
        }
    }
}

/// Everything needed to read one layer: its index, where its bytes come from, and a
/// label (image reference and layer digest) that names it in errors and logs.
pub struct Layer {
    label: String,
    index: SharedIndex,
    source: Arc<dyn BlobSource>,
}

impl Layer {
    pub fn new(
        label: impl Into<String>,
        index: SharedIndex,
        source: Arc<dyn BlobSource>,
    ) -> Arc<Self> {
        Arc::new(Self {
            label: label.into(),
            index,
            source,
        })
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn index(&self) -> &SharedIndex {
        &self.index
    }

    pub fn source(&self) -> &Arc<dyn BlobSource> {
        &self.source
    }
}

impl fmt::Debug for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Layer")
            .field("label", &self.label)
            .field("entries", &self.index.entries.len())
            .finish_non_exhaustive()
    }
}

/// Which chunk of which file an error is about.
#[derive(Debug, Clone)]
pub struct ChunkLocation {
    pub layer: String,
    pub path: String,
    pub compressed_offset: u64,
    pub file_offset: u64,
    pub digest: Digest,
}

impl fmt::Display for ChunkLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "layer {}, file {:?}, chunk at file offset {} (blob offset {}, {})",
            self.layer, self.path, self.file_offset, self.compressed_offset, self.digest
        )
    }
}

/// A failed cache operation. Cheap to clone: one failed fetch is reported to every
/// reader that waited for it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    #[error("chunk cache options: {reason}")]
    InvalidOptions { reason: &'static str },
    #[error(
        "opening chunk cache directory {}: {source} (check that it exists on a writable filesystem)",
        dir.display()
    )]
    OpenDir {
        dir: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    #[error("{chunk}: registry read failed: {source}")]
    Fetch {
        chunk: Box<ChunkLocation>,
        #[source]
        source: Arc<BlobReadError>,
    },
    #[error(
        "{chunk}: the registry's bytes do not decode to the chunk the TOC describes, so nothing was cached: {source} (the blob or its TOC is corrupt; re-push the image)"
    )]
    Corrupt {
        chunk: Box<ChunkLocation>,
        #[source]
        source: Arc<FormatError>,
    },
    #[error("{chunk}: disk cache file {}: {source}", file.display())]
    Disk {
        chunk: Box<ChunkLocation>,
        file: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    #[error("layer {layer}: entry {entry} {path:?} is not a regular file")]
    NotRegularFile {
        layer: String,
        entry: u32,
        path: String,
    },
    #[error("layer {layer}: no entry {entry} in the index")]
    NoSuchEntry { layer: String, entry: u32 },
    #[error("layer {layer}: file {path:?}: {problem} (the layer's TOC is inconsistent)")]
    BadIndex {
        layer: String,
        path: String,
        problem: &'static str,
    },
    #[error(
        "layer {layer}: prefetch of {files} files did not finish within {timeout:?}; the rest is fetched on demand"
    )]
    PrefetchTimeout {
        layer: String,
        files: usize,
        timeout: Duration,
    },
    #[error("layer {layer}: a decompression worker stopped: {reason}")]
    Worker { layer: String, reason: String },
}

impl CacheError {
    /// Whether retrying later may succeed (the registry was unreachable or overloaded).
    pub fn is_transient(&self) -> bool {
        match self {
            CacheError::Fetch { source, .. } => source.transient,
            CacheError::Disk { .. } | CacheError::Worker { .. } => true,
            CacheError::PrefetchTimeout { .. } => true,
            _ => false,
        }
    }
}

/// A chunk's identity in memory and in flight: its raw sha256.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ChunkKey([u8; 32]);

impl ChunkKey {
    fn of(digest: &Digest) -> Self {
        let mut raw = [0u8; 32];
        // A `Digest` always holds 64 lowercase hex digits.
        hex::decode_to_slice(digest.hex(), &mut raw).expect("Digest holds valid sha256 hex");
        Self(raw)
    }

    fn shard_hint(&self) -> usize {
        usize::from(u16::from_le_bytes([self.0[0], self.0[1]]))
    }
}

/// What a load does with chunks it finds or fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoadMode {
    /// The caller needs the bytes: read them from disk and keep them in memory.
    Read,
    /// Bring chunks to disk (and memory, since they are about to be read).
    Prefetch,
    /// Bring chunks to disk only, so streaming a layer does not flush the hot set.
    Stream,
}

/// Result for one chunk of a flight: bytes, or `None` when the chunk was already on
/// disk and the flight's mode did not need it loaded.
type ChunkOutcome = Result<Option<Bytes>, CacheError>;
type FlightOutput = Arc<[ChunkOutcome]>;
type FlightFuture = Shared<Pin<Box<dyn Future<Output = FlightOutput> + Send>>>;

/// A chunk claimed by a flight. The map holds only a weak handle: when every reader
/// waiting on a flight gives up (timeout), the fetch is dropped rather than left
/// hanging, and the next reader starts a fresh one.
struct InFlight {
    flight_id: u64,
    future: WeakShared<Pin<Box<dyn Future<Output = FlightOutput> + Send>>>,
    index: usize,
}

/// One chunk to load, with the file it was asked for (for error messages).
#[derive(Clone)]
struct Wanted {
    key: ChunkKey,
    entry: EntryId,
    chunk: Chunk,
}

/// The chunk cache shared by every mounted layer.
pub struct ChunkCache {
    options: CacheOptions,
    disk: DiskStore,
    memory: MemoryCache,
    in_flight: Box<[Mutex<HashMap<ChunkKey, InFlight>>]>,
    next_flight: AtomicU64,
    metrics: Arc<Metrics>,
    /// On-demand fetches in progress; background streaming waits while non-zero.
    on_demand_active: AtomicUsize,
    on_demand_idle: Notify,
}

impl fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkCache")
            .field("dir", &self.options.dir)
            .field("memory_bytes", &self.options.memory_bytes)
            .finish_non_exhaustive()
    }
}

/// Removes a flight's claims when it finishes or is dropped.
struct FlightClaims {
    cache: Arc<ChunkCache>,
    flight_id: u64,
    keys: Vec<ChunkKey>,
}

impl Drop for FlightClaims {
    fn drop(&mut self) {
        for key in &self.keys {
            let mut map = self.cache.in_flight_shard(key);
            if map.get(key).is_some_and(|f| f.flight_id == self.flight_id) {
                map.remove(key);
            }
        }
    }
}

/// Counts an on-demand fetch for as long as it runs.
struct OnDemandGuard<'a>(&'a ChunkCache);

impl Drop for OnDemandGuard<'_> {
    fn drop(&mut self) {
        if self.0.on_demand_active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.on_demand_idle.notify_waiters();
        }
    }
}

/// Where a joined read finds each of its chunks.
enum Source {
    Memory(Bytes),
    Flight { slot: usize, index: usize },
}

impl ChunkCache {
    pub fn open(options: CacheOptions, metrics: Arc<Metrics>) -> Result<Arc<Self>, CacheError> {
        if options.dir.as_os_str().is_empty() {
            return Err(CacheError::InvalidOptions {
                reason: "dir is empty; set it to a directory for cached chunks",
            });
        }
        if options.max_coalesced_bytes == 0 {
            return Err(CacheError::InvalidOptions {
                reason: "max_coalesced_bytes must be positive",
            });
        }
        let disk =
            DiskStore::open(&options.dir, options.disk_bytes).map_err(|e| CacheError::OpenDir {
                dir: options.dir.clone(),
                source: Arc::new(e),
            })?;
        let shards = options.shards.max(1);
        Ok(Arc::new(Self {
            memory: MemoryCache::new(options.memory_bytes, shards),
            in_flight: (0..shards).map(|_| Mutex::new(HashMap::new())).collect(),
            disk,
            options,
            next_flight: AtomicU64::new(1),
            metrics,
            on_demand_active: AtomicUsize::new(0),
            on_demand_idle: Notify::new(),
        }))
    }

    pub fn dir(&self) -> &Path {
        &self.options.dir
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The disk cache file holding exactly `chunk`'s data, after checking it against
    /// the chunk digest; `None` when it is not cached (or was damaged). Blocking disk
    /// I/O: call it off the async runtime. The filesystem uses it to hand whole
    /// single-chunk files to the kernel (FUSE passthrough).
    pub fn verified_chunk_file(&self, chunk: &Chunk) -> Option<PathBuf> {
        match self.disk.read(&chunk.digest, chunk.size) {
            Ok(Some(_)) => Some(self.disk.path(&chunk.digest)),
            _ => None,
        }
    }

    /// Decompressed bytes currently held in memory.
    pub fn memory_resident_bytes(&self) -> u64 {
        self.memory.resident_bytes()
    }

    fn in_flight_shard(
        &self,
        key: &ChunkKey,
    ) -> std::sync::MutexGuard<'_, HashMap<ChunkKey, InFlight>> {
        self.in_flight[key.shard_hint() % self.in_flight.len()]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Read `size` bytes at `offset` of a regular file (or a hard link to one). Short
    /// only at end of file. A read inside one chunk is a zero-copy slice of it.
    pub async fn read_file(
        self: &Arc<Self>,
        layer: &Arc<Layer>,
        entry: EntryId,
        offset: u64,
        size: u32,
        priority: FetchPriority,
    ) -> Result<Bytes, CacheError> {
        let (file, chunks, range) = match resolve_read(layer, entry, offset, size)? {
            Some(found) => found,
            None => return Ok(Bytes::new()),
        };
        if let Some(hit) = self.assemble_from_memory(layer, file, chunks, &range)? {
            return Ok(hit);
        }
        let wanted: Vec<Wanted> = chunks
            .iter()
            .map(|chunk| Wanted {
                key: ChunkKey::of(&chunk.digest),
                entry: file,
                chunk: chunk.clone(),
            })
            .collect();
        let loaded = self.load_for_read(layer, &wanted, priority).await?;
        assemble(layer, file, chunks, &loaded, &range)
    }

    /// Answer a read from memory alone, without suspending: the FUSE thread uses it
    /// to reply to hot reads directly. `None` when any chunk is not in memory.
    pub fn read_file_cached(
        &self,
        layer: &Layer,
        entry: EntryId,
        offset: u64,
        size: u32,
    ) -> Option<Result<Bytes, CacheError>> {
        let (file, chunks, range) = match resolve_read(layer, entry, offset, size) {
            Ok(Some(found)) => found,
            Ok(None) => return Some(Ok(Bytes::new())),
            Err(e) => return Some(Err(e)),
        };
        self.assemble_from_memory(layer, file, chunks, &range)
            .transpose()
    }

    fn assemble_from_memory(
        &self,
        layer: &Layer,
        file: EntryId,
        chunks: &[Chunk],
        range: &Range<u64>,
    ) -> Result<Option<Bytes>, CacheError> {
        if let [chunk] = chunks {
            let Some(data) = self.memory.get(&ChunkKey::of(&chunk.digest)) else {
                return Ok(None);
            };
            Metrics::add(&self.metrics.chunk_hits_memory, 1);
            return slice_chunk(layer, file, chunk, &data, range).map(Some);
        }
        let mut out = BytesMut::with_capacity((range.end - range.start) as usize);
        for chunk in chunks {
            let Some(data) = self.memory.get(&ChunkKey::of(&chunk.digest)) else {
                return Ok(None);
            };
            Metrics::add(&self.metrics.chunk_hits_memory, 1);
            out.extend_from_slice(&slice_chunk(layer, file, chunk, &data, range)?);
        }
        Ok(Some(out.freeze()))
    }

    /// Load chunks whose bytes the caller needs. A chunk another flight only brought
    /// to disk is read from disk in a second round.
    async fn load_for_read(
        self: &Arc<Self>,
        layer: &Arc<Layer>,
        wanted: &[Wanted],
        priority: FetchPriority,
    ) -> Result<Vec<Bytes>, CacheError> {
        let mut result: Vec<Option<Bytes>> = vec![None; wanted.len()];
        let mut pending: Vec<usize> = (0..wanted.len()).collect();
        for _round in 0..3 {
            let batch: Vec<Wanted> = pending.iter().map(|&i| wanted[i].clone()).collect();
            let outcomes = self.load(layer, &batch, LoadMode::Read, priority).await;
            let mut still = Vec::new();
            for (&i, outcome) in pending.iter().zip(outcomes) {
                match outcome? {
                    Some(data) => result[i] = Some(data),
                    None => still.push(i),
                }
            }
            if still.is_empty() {
                return Ok(result.into_iter().flatten().collect());
            }
            pending = still;
        }
        let missing = &wanted[pending[0]];
        Err(CacheError::Disk {
            chunk: Box::new(locate(layer, missing.entry, &missing.chunk)),
            file: self.disk.path(&missing.chunk.digest),
            source: Arc::new(io::Error::new(
                io::ErrorKind::NotFound,
                "chunk kept disappearing from the disk cache while being read",
            )),
        })
    }

    /// Load `wanted` through single-flight: join flights already running for some
    /// chunks, start one flight for the rest. Returns one outcome per wanted chunk.
    async fn load(
        self: &Arc<Self>,
        layer: &Arc<Layer>,
        wanted: &[Wanted],
        mode: LoadMode,
        priority: FetchPriority,
    ) -> Vec<ChunkOutcome> {
        let flight_id = self.next_flight.fetch_add(1, Ordering::Relaxed);
        let (claims_tx, claims_rx) = oneshot::channel::<(Vec<Wanted>, FlightClaims)>();
        let own: FlightFuture = {
            let cache = Arc::clone(self);
            let layer = Arc::clone(layer);
            let run: Pin<Box<dyn Future<Output = FlightOutput> + Send>> = Box::pin(async move {
                let Ok((claimed, _claims)) = claims_rx.await else {
                    return Arc::from(Vec::new());
                };
                cache.fly(&layer, claimed, mode, priority).await
            });
            run.shared()
        };
        let own_weak = own.downgrade();

        let mut flights: Vec<FlightFuture> = vec![own.clone()];
        let mut flight_ids: Vec<u64> = vec![flight_id];
        let mut sources = Vec::with_capacity(wanted.len());
        let mut claimed = Vec::new();
        let mut claimed_keys = Vec::new();
        for want in wanted {
            let mut map = self.in_flight_shard(&want.key);
            if let Some(existing) = map.get(&want.key)
                && let Some(future) = existing.future.upgrade()
            {
                let slot = match flight_ids.iter().position(|&id| id == existing.flight_id) {
                    Some(slot) => slot,
                    None => {
                        flight_ids.push(existing.flight_id);
                        flights.push(future);
                        flights.len() - 1
                    }
                };
                sources.push(Source::Flight {
                    slot,
                    index: existing.index,
                });
                continue;
            }
            // The flight that had this chunk may have just finished: look again.
            if mode == LoadMode::Read
                && let Some(data) = self.memory.get(&want.key)
            {
                Metrics::add(&self.metrics.chunk_hits_memory, 1);
                sources.push(Source::Memory(data));
                continue;
            }
            let index = claimed.len();
            map.insert(
                want.key,
                InFlight {
                    flight_id,
                    future: own_weak.clone().expect("own flight is alive"),
                    index,
                },
            );
            claimed_keys.push(want.key);
            claimed.push(want.clone());
            sources.push(Source::Flight { slot: 0, index });
        }
        let claims = FlightClaims {
            cache: Arc::clone(self),
            flight_id,
            keys: claimed_keys,
        };
        // The receiver lives in `own`, which we still hold.
        let _ = claims_tx.send((claimed, claims));
        let outputs = futures::future::join_all(flights).await;
        sources
            .into_iter()
            .map(|source| match source {
                Source::Memory(data) => Ok(Some(data)),
                Source::Flight { slot, index } => {
                    outputs[slot].get(index).cloned().unwrap_or_else(|| {
                        Err(CacheError::Worker {
                            layer: layer.label.clone(),
                            reason: "a shared fetch ended without a result".into(),
                        })
                    })
                }
            })
            .collect()
    }

    /// The body of one flight: look on disk, then fetch what is missing in coalesced
    /// runs, decode and verify, store, and report per chunk.
    async fn fly(
        self: Arc<Self>,
        layer: &Arc<Layer>,
        claimed: Vec<Wanted>,
        mode: LoadMode,
        priority: FetchPriority,
    ) -> FlightOutput {
        if claimed.is_empty() {
            return Arc::from(Vec::new());
        }
        let mut outcomes: Vec<Option<ChunkOutcome>> = vec![None; claimed.len()];

        let probe = {
            let cache = Arc::clone(&self);
            let chunks: Vec<(Digest, u64)> = claimed
                .iter()
                .map(|w| (w.chunk.digest.clone(), w.chunk.size))
                .collect();
            tokio::task::spawn_blocking(move || {
                chunks
                    .iter()
                    .map(|(digest, size)| {
                        if mode == LoadMode::Read {
                            cache.disk.read(digest, *size).map(|d| d.map(Bytes::from))
                        } else if cache.disk.contains(digest) {
                            Ok(Some(Bytes::new()))
                        } else {
                            Ok(None)
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .await
        };
        let mut missing = Vec::new();
        match probe {
            Ok(found) => {
                for (i, found) in found.into_iter().enumerate() {
                    match found {
                        Ok(Some(data)) => {
                            Metrics::add(&self.metrics.chunk_hits_disk, 1);
                            if mode == LoadMode::Read {
                                self.memory.insert(claimed[i].key, data.clone());
                                outcomes[i] = Some(Ok(Some(data)));
                            } else {
                                outcomes[i] = Some(Ok(None));
                            }
                        }
                        Ok(None) => missing.push(i),
                        Err(e) => {
                            tracing::warn!(
                                chunk = %locate(layer, claimed[i].entry, &claimed[i].chunk),
                                error = %e,
                                "reading the disk cache failed; fetching the chunk again"
                            );
                            missing.push(i);
                        }
                    }
                }
            }
            Err(join) => {
                tracing::warn!(layer = %layer.label, error = %join, "disk probe task failed; fetching");
                missing = (0..claimed.len()).collect();
            }
        }

        let runs = coalesce(&claimed, &missing, self.options.max_coalesced_bytes);
        let fetched = futures::future::join_all(
            runs.into_iter()
                .map(|run| self.fetch_run(layer, &claimed, run, mode, priority)),
        )
        .await;
        for run in fetched {
            for (i, outcome) in run {
                outcomes[i] = Some(outcome);
            }
        }
        outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Err(CacheError::Worker {
                        layer: layer.label.clone(),
                        reason: "a chunk was neither found nor fetched".into(),
                    })
                })
            })
            .collect::<Vec<_>>()
            .into()
    }

    /// One range request for a run of chunks, then decode, verify and store each.
    async fn fetch_run(
        &self,
        layer: &Arc<Layer>,
        claimed: &[Wanted],
        run: Run,
        mode: LoadMode,
        priority: FetchPriority,
    ) -> Vec<(usize, ChunkOutcome)> {
        let fail = |error: &dyn Fn(&Wanted) -> CacheError| {
            run.members
                .iter()
                .map(|&i| (i, Err(error(&claimed[i]))))
                .collect::<Vec<_>>()
        };
        let len = run.range.end - run.range.start;
        // Requests and bytes are counted by the registry client, which sees every
        // request (footers and TOCs too) exactly once.
        let _on_demand = (priority == FetchPriority::OnDemand).then(|| {
            self.on_demand_active.fetch_add(1, Ordering::AcqRel);
            OnDemandGuard(self)
        });
        let compressed = match layer.source.read_range(run.range.clone(), priority).await {
            Ok(data) if data.len() as u64 == len => data,
            Ok(data) => {
                let short = Arc::new(BlobReadError {
                    registry: String::new(),
                    blob: layer.source.digest().to_string(),
                    start: run.range.start,
                    end: run.range.end,
                    reason: format!("source returned {} bytes instead of {len}", data.len()),
                    transient: true,
                });
                return fail(&|w| CacheError::Fetch {
                    chunk: Box::new(locate(layer, w.entry, &w.chunk)),
                    source: short.clone(),
                });
            }
            Err(e) => {
                let e = Arc::new(e);
                return fail(&|w| CacheError::Fetch {
                    chunk: Box::new(locate(layer, w.entry, &w.chunk)),
                    source: e.clone(),
                });
            }
        };
        let start = run.range.start;
        let members: Vec<Wanted> = run.members.iter().map(|&i| claimed[i].clone()).collect();
        let format = layer.index.format;
        let disk = self.disk.clone();
        let label = layer.label.clone();
        // Decode, verify and store in one blocking task: one hop off the executor.
        let decoded = tokio::task::spawn_blocking(move || {
            members
                .iter()
                .map(|w| {
                    let from = (w.chunk.compressed_offset.0 - start) as usize;
                    let to = from + w.chunk.compressed_size as usize;
                    let mut out = Vec::with_capacity(w.chunk.size.min(16 << 20) as usize);
                    crate::format::decompress_chunk(
                        format,
                        &compressed[from..to],
                        &w.chunk,
                        &mut out,
                    )?;
                    // Only verified bytes reach the disk. A failed write only costs a
                    // refetch once the chunk leaves memory.
                    if let Err(e) = disk.write(&w.chunk.digest, &out) {
                        tracing::warn!(
                            layer = %label,
                            chunk = %w.chunk.digest,
                            file = %disk.path(&w.chunk.digest).display(),
                            error = %e,
                            "could not write a chunk to the disk cache"
                        );
                    }
                    Ok(Bytes::from(out))
                })
                .collect::<Vec<Result<Bytes, FormatError>>>()
        })
        .await;
        drop(_on_demand);
        let decoded = match decoded {
            Ok(decoded) => decoded,
            Err(join) => {
                let reason = join.to_string();
                return fail(&|_| CacheError::Worker {
                    layer: layer.label.clone(),
                    reason: reason.clone(),
                });
            }
        };
        let mut out = Vec::with_capacity(decoded.len());
        for (&i, result) in run.members.iter().zip(decoded) {
            let want = &claimed[i];
            match result {
                Ok(data) => {
                    Metrics::add(&self.metrics.chunk_fetches, 1);
                    if mode != LoadMode::Stream {
                        self.memory.insert(want.key, data.clone());
                    }
                    out.push((i, Ok(Some(data))));
                }
                Err(e) => {
                    Metrics::add(&self.metrics.chunk_verify_failures, 1);
                    out.push((
                        i,
                        Err(CacheError::Corrupt {
                            chunk: Box::new(locate(layer, want.entry, &want.chunk)),
                            source: Arc::new(e),
                        }),
                    ));
                }
            }
        }
        out
    }

    /// Fetch (coalesced) every chunk of `entries` into the cache, giving up after
    /// `timeout`. Files already cached cost only a look at the disk.
    pub async fn prefetch(
        self: &Arc<Self>,
        layer: &Arc<Layer>,
        entries: &[EntryId],
        timeout: Duration,
    ) -> Result<(), CacheError> {
        let mut wanted = Vec::new();
        for &entry in entries {
            let (file, chunks) = regular_chunks(layer, entry)?;
            wanted.extend(chunks.iter().map(|chunk| Wanted {
                key: ChunkKey::of(&chunk.digest),
                entry: file,
                chunk: chunk.clone(),
            }));
        }
        let work = self.load_batched(layer, wanted, LoadMode::Prefetch, FetchPriority::Prefetch);
        match tokio::time::timeout(timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(CacheError::PrefetchTimeout {
                layer: layer.label.clone(),
                files: entries.len(),
                timeout,
            }),
        }
    }

    /// Load chunks in batches of a few coalesced runs, so memory held by one call
    /// stays bounded however large the file set is.
    async fn load_batched(
        self: &Arc<Self>,
        layer: &Arc<Layer>,
        mut wanted: Vec<Wanted>,
        mode: LoadMode,
        priority: FetchPriority,
    ) -> Result<(), CacheError> {
        wanted.sort_by_key(|w| w.chunk.compressed_offset);
        wanted.dedup_by_key(|w| w.key);
        let budget = self.options.max_coalesced_bytes * 4;
        let mut start = 0;
        while start < wanted.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < wanted.len()
                && (end == start || bytes + wanted[end].chunk.compressed_size <= budget)
            {
                bytes += wanted[end].chunk.compressed_size;
                end += 1;
            }
            for outcome in self.load(layer, &wanted[start..end], mode, priority).await {
                outcome?;
            }
            start = end;
        }
        Ok(())
    }

    /// Whether every chunk of the layer is in the disk cache.
    pub async fn is_fully_cached(self: &Arc<Self>, layer: &Arc<Layer>) -> bool {
        let cache = Arc::clone(self);
        let index = Arc::clone(&layer.index);
        tokio::task::spawn_blocking(move || {
            all_chunks(&index).all(|chunk| cache.disk.contains(&chunk.digest))
        })
        .await
        .unwrap_or(false)
    }

    /// Start streaming the rest of `layer` into the disk cache in the background.
    /// Streaming stops when the returned handle is dropped.
    pub fn stream_layer(
        self: &Arc<Self>,
        layer: Arc<Layer>,
        options: StreamOptions,
        runtime: &tokio::runtime::Handle,
    ) -> StreamHandle {
        stream::start(Arc::clone(self), layer, options, runtime)
    }

    /// Wait until no on-demand fetch is running.
    async fn on_demand_quiet(&self) {
        loop {
            let idle = self.on_demand_idle.notified();
            if self.on_demand_active.load(Ordering::Acquire) == 0 {
                return;
            }
            // A bounded wait guards against a missed wake-up.
            let _ = tokio::time::timeout(Duration::from_millis(50), idle).await;
        }
    }
}

/// A run of chunks fetched with one range request.
struct Run {
    range: Range<u64>,
    /// Indexes into the flight's claimed chunks.
    members: Vec<usize>,
}

/// Group chunks whose compressed ranges touch or overlap into runs of at most
/// `max_bytes` (a single larger chunk is a run on its own).
fn coalesce(claimed: &[Wanted], missing: &[usize], max_bytes: u64) -> Vec<Run> {
    let mut order: Vec<usize> = missing.to_vec();
    order.sort_by_key(|&i| claimed[i].chunk.compressed_offset);
    let mut runs: Vec<Run> = Vec::new();
    for i in order {
        let chunk = &claimed[i].chunk;
        let start = chunk.compressed_offset.0;
        let end = start.saturating_add(chunk.compressed_size);
        if let Some(run) = runs.last_mut()
            && start <= run.range.end
            && end.max(run.range.end) - run.range.start <= max_bytes
        {
            run.range.end = run.range.end.max(end);
            run.members.push(i);
            continue;
        }
        runs.push(Run {
            range: start..end,
            members: vec![i],
        });
    }
    runs
}

/// Every chunk of every regular file, once per distinct digest, in blob order.
pub(crate) fn all_chunks(index: &LayerIndex) -> impl Iterator<Item = &Chunk> {
    index.entries.iter().flat_map(|entry| match &entry.kind {
        EntryKind::Regular { chunks, .. } => chunks.as_slice(),
        _ => &[],
    })
}

fn locate(layer: &Layer, entry: EntryId, chunk: &Chunk) -> ChunkLocation {
    ChunkLocation {
        layer: layer.label.clone(),
        path: layer
            .index
            .entries
            .get(entry.0 as usize)
            .map(|e| e.name.clone())
            .unwrap_or_default(),
        compressed_offset: chunk.compressed_offset.0,
        file_offset: chunk.file_offset.0,
        digest: chunk.digest.clone(),
    }
}

/// The regular file behind `entry` (following one hard link) and its chunks.
fn regular_chunks(layer: &Layer, entry: EntryId) -> Result<(EntryId, &[Chunk]), CacheError> {
    let index = &layer.index;
    let mut id = entry;
    // Hard links point at earlier entries; a bounded walk tolerates chains.
    for _ in 0..8 {
        let found = index
            .entries
            .get(id.0 as usize)
            .ok_or_else(|| CacheError::NoSuchEntry {
                layer: layer.label.clone(),
                entry: id.0,
            })?;
        match &found.kind {
            EntryKind::Regular { chunks, .. } => return Ok((id, chunks)),
            EntryKind::Hardlink { target } => id = *target,
            _ => break,
        }
    }
    Err(CacheError::NotRegularFile {
        layer: layer.label.clone(),
        entry: entry.0,
        path: index
            .entries
            .get(entry.0 as usize)
            .map(|e| e.name.clone())
            .unwrap_or_default(),
    })
}

type ResolvedRead<'a> = (EntryId, &'a [Chunk], Range<u64>);

/// The chunks covering `offset..offset+size` of a file, clamped to its size; `None`
/// when the range is empty.
fn resolve_read(
    layer: &Layer,
    entry: EntryId,
    offset: u64,
    size: u32,
) -> Result<Option<ResolvedRead<'_>>, CacheError> {
    let (file, chunks) = regular_chunks(layer, entry)?;
    let file_size = match &layer.index.entries[file.0 as usize].kind {
        EntryKind::Regular { size, .. } => *size,
        _ => 0,
    };
    let end = offset.saturating_add(u64::from(size)).min(file_size);
    if offset >= end {
        return Ok(None);
    }
    let first = chunks.partition_point(|c| c.file_offset.0.saturating_add(c.size) <= offset);
    let last = chunks.partition_point(|c| c.file_offset.0 < end);
    if first >= last || chunks[first].file_offset.0 > offset {
        return Err(CacheError::BadIndex {
            layer: layer.label.clone(),
            path: layer.index.entries[file.0 as usize].name.clone(),
            problem: "its chunks do not cover the requested bytes",
        });
    }
    Ok(Some((file, &chunks[first..last], offset..end)))
}

/// The part of one chunk's data that falls inside `range` (file offsets).
fn slice_chunk(
    layer: &Layer,
    file: EntryId,
    chunk: &Chunk,
    data: &Bytes,
    range: &Range<u64>,
) -> Result<Bytes, CacheError> {
    let chunk_start = chunk.file_offset.0;
    let from = range.start.max(chunk_start) - chunk_start;
    let to = range.end.min(chunk_start + data.len() as u64) - chunk_start;
    if data.len() as u64 != chunk.size || from > to {
        return Err(CacheError::BadIndex {
            layer: layer.label.clone(),
            path: layer.index.entries[file.0 as usize].name.clone(),
            problem: "a chunk's data is not the size its TOC entry says",
        });
    }
    Ok(data.slice(from as usize..to as usize))
}

fn assemble(
    layer: &Layer,
    file: EntryId,
    chunks: &[Chunk],
    loaded: &[Bytes],
    range: &Range<u64>,
) -> Result<Bytes, CacheError> {
    if let ([chunk], [data]) = (chunks, loaded) {
        return slice_chunk(layer, file, chunk, data, range);
    }
    let mut out = BytesMut::with_capacity((range.end - range.start) as usize);
    for (chunk, data) in chunks.iter().zip(loaded) {
        out.extend_from_slice(&slice_chunk(layer, file, chunk, data, range)?);
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests;

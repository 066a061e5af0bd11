//! Background streaming: after a layer is mounted, the chunks nobody has read yet are
//! brought into the disk cache in blob order, so the layer keeps working if the
//! registry goes away later. Streaming yields to on-demand fetches and can be capped
//! in bytes per second.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::{ChunkCache, ChunkKey, Layer, LoadMode, Wanted};
use crate::format::{EntryId, EntryKind};
use crate::registry::FetchPriority;

/// How a layer is streamed.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Average compressed bytes per second fetched by streaming; `None` is unlimited.
    pub bytes_per_sec: Option<u64>,
    /// Compressed bytes per streaming request: small enough that an on-demand read
    /// never waits long behind one.
    pub request_bytes: u64,
    /// First wait after a transient failure; doubled up to `max_retry_delay`.
    pub retry_delay: Duration,
    pub max_retry_delay: Duration,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self {
            bytes_per_sec: None,
            request_bytes: 1 << 20,
            retry_delay: Duration::from_millis(500),
            max_retry_delay: Duration::from_secs(30),
        }
    }
}

/// How far streaming of one layer has got.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamProgress {
    /// Distinct chunks in the layer.
    pub total_chunks: u64,
    /// Chunks known to be in the disk cache.
    pub cached_chunks: u64,
    /// Chunks given up on because their bytes are corrupt (they fail every read too).
    pub failed_chunks: u64,
    /// Streaming has finished: every chunk is cached or failed permanently.
    pub finished: bool,
}

impl StreamProgress {
    /// Every chunk of the layer is in the disk cache.
    pub fn fully_cached(&self) -> bool {
        self.finished && self.cached_chunks == self.total_chunks
    }
}

/// Stops streaming when dropped.
#[derive(Debug)]
pub struct StreamHandle {
    progress: watch::Receiver<StreamProgress>,
    task: AbortHandle,
}

impl StreamHandle {
    pub fn progress(&self) -> StreamProgress {
        self.progress.borrow().clone()
    }

    /// Wait until streaming has finished (every chunk cached or permanently failed).
    pub async fn wait_finished(&mut self) -> StreamProgress {
        let _ = self.progress.wait_for(|p| p.finished).await;
        self.progress()
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(super) fn start(
    cache: Arc<ChunkCache>,
    layer: Arc<Layer>,
    options: StreamOptions,
    runtime: &tokio::runtime::Handle,
) -> StreamHandle {
    let (tx, rx) = watch::channel(StreamProgress::default());
    let task = runtime.spawn(run(cache, layer, options, tx)).abort_handle();
    StreamHandle { progress: rx, task }
}

async fn run(
    cache: Arc<ChunkCache>,
    layer: Arc<Layer>,
    options: StreamOptions,
    progress: watch::Sender<StreamProgress>,
) {
    let mut seen = HashSet::new();
    let mut wanted: Vec<Wanted> = Vec::new();
    for (id, entry) in layer.index.entries.iter().enumerate() {
        if let EntryKind::Regular { chunks, .. } = &entry.kind {
            for chunk in chunks {
                let key = ChunkKey::of(&chunk.digest);
                if seen.insert(key) {
                    wanted.push(Wanted {
                        key,
                        entry: EntryId(id as u32),
                        chunk: chunk.clone(),
                    });
                }
            }
        }
    }
    wanted.sort_by_key(|w| w.chunk.compressed_offset);
    progress.send_modify(|p| p.total_chunks = wanted.len() as u64);

    let request_bytes = options.request_bytes.max(1);
    let mut next_allowed = Instant::now();
    let mut start = 0;
    let mut delay = options.retry_delay;
    while start < wanted.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < wanted.len()
            && (end == start || bytes + wanted[end].chunk.compressed_size <= request_bytes)
        {
            bytes += wanted[end].chunk.compressed_size;
            end += 1;
        }
        let unpacked: u64 = wanted[start..end].iter().map(|w| w.chunk.size).sum();
        if !cache.disk.has_room_for(unpacked) {
            // Streaming on would only push out chunks that containers read.
            tracing::info!(
                layer = %layer.label,
                used = cache.disk.used_bytes(),
                "disk cache at its limit (cache.disk_bytes): background streaming of this layer stops; the rest is fetched when read"
            );
            break;
        }
        cache.on_demand_quiet().await;
        tokio::time::sleep_until(next_allowed).await;
        let before = cache
            .metrics
            .background_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        let outcomes = cache
            .load(
                &layer,
                &wanted[start..end],
                LoadMode::Stream,
                FetchPriority::Background,
            )
            .await;
        let fetched = cache
            .metrics
            .background_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
            .saturating_sub(before);
        if let Some(rate) = options.bytes_per_sec.filter(|r| *r > 0) {
            // Other streams share the counter, so this over-throttles slightly when
            // several layers stream at once; it never exceeds the cap.
            next_allowed =
                Instant::now() + Duration::from_secs_f64(fetched.min(bytes) as f64 / rate as f64);
        }
        let mut transient = None;
        let mut cached = 0;
        let mut failed = 0;
        for outcome in &outcomes {
            match outcome {
                Ok(_) => cached += 1,
                Err(e) if e.is_transient() => transient = Some(e.clone()),
                Err(e) => {
                    tracing::warn!(error = %e, "background streaming skips a corrupt chunk");
                    failed += 1;
                }
            }
        }
        if let Some(error) = transient {
            tracing::warn!(
                layer = %layer.label,
                error = %error,
                retry_in = ?delay,
                "background streaming paused by a transient failure"
            );
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(options.max_retry_delay);
            continue;
        }
        delay = options.retry_delay;
        progress.send_modify(|p| {
            p.cached_chunks += cached;
            p.failed_chunks += failed;
        });
        start = end;
    }
    progress.send_modify(|p| p.finished = true);
    tracing::debug!(layer = %layer.label, "layer fully streamed into the disk cache");
}

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use super::testing::{LayerBuilder, MemoryBlobSource, SourceBehavior, pseudo_random_bytes};
use super::*;
use crate::format::LayerFormat;

const CHUNK: usize = 64 * 1024;

struct Fixture {
    _dir: tempfile::TempDir,
    cache: Arc<ChunkCache>,
    source: Arc<MemoryBlobSource>,
    layer: Arc<Layer>,
    content: Vec<u8>,
    file: EntryId,
}

fn options(dir: &Path) -> CacheOptions {
    CacheOptions {
        dir: dir.to_path_buf(),
        memory_bytes: 64 << 20,
        ..CacheOptions::default()
    }
}

fn layer_with_file(format: LayerFormat, len: usize, seed: u64) -> (LayerIndex, Bytes, Vec<u8>) {
    let content = pseudo_random_bytes(len, seed);
    let mut builder = LayerBuilder::new(format);
    builder.file("big.bin", 0o644, &content, CHUNK);
    let (index, blob) = builder.build();
    (index, blob, content)
}

fn fixture_with(latency: Duration, memory_bytes: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (index, blob, content) = layer_with_file(LayerFormat::Estargz, 10 * CHUNK + 123, 1);
    let source = Arc::new(MemoryBlobSource::new(blob).with_latency(latency));
    let layer = Layer::new("test/image:1 layer 0", Arc::new(index), source.clone());
    let cache = ChunkCache::open(
        CacheOptions {
            memory_bytes,
            ..options(dir.path())
        },
        Arc::new(Metrics::default()),
    )
    .unwrap();
    Fixture {
        _dir: dir,
        cache,
        source,
        layer,
        content,
        file: EntryId(1),
    }
}

fn fixture() -> Fixture {
    fixture_with(Duration::ZERO, 64 << 20)
}

impl Fixture {
    async fn read(&self, offset: u64, size: u32) -> Result<Bytes, CacheError> {
        self.cache
            .read_file(
                &self.layer,
                self.file,
                offset,
                size,
                FetchPriority::OnDemand,
            )
            .await
    }

    fn expect(&self, offset: u64, size: u32) -> &[u8] {
        let start = (offset as usize).min(self.content.len());
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(self.content.len());
        &self.content[start..end]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_return_file_bytes_at_any_offset() {
    let f = fixture();
    for (offset, size) in [
        (0, 10),
        (CHUNK as u64 - 5, 10),
        (3 * CHUNK as u64 + 7, 3 * CHUNK as u32),
        (10 * CHUNK as u64, 4096),
        (10 * CHUNK as u64 + 100, 4096),
        (f.content.len() as u64, 10),
        (u64::MAX - 1, 10),
    ] {
        let got = f.read(offset, size).await.unwrap();
        assert_eq!(
            &got[..],
            f.expect(offset, size),
            "offset {offset} size {size}"
        );
    }
    let whole = f.read(0, f.content.len() as u32 + 10).await.unwrap();
    assert_eq!(&whole[..], &f.content[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_of_one_chunk_share_one_fetch() {
    let f = Arc::new(fixture_with(Duration::from_millis(300), 64 << 20));
    let readers: Vec<_> = (0..16)
        .map(|i| {
            let f = f.clone();
            tokio::spawn(async move { f.read(2 * CHUNK as u64 + i * 100, 50).await })
        })
        .collect();
    for (i, reader) in readers.into_iter().enumerate() {
        let got = reader.await.unwrap().unwrap();
        assert_eq!(&got[..], f.expect(2 * CHUNK as u64 + i as u64 * 100, 50));
    }
    assert_eq!(f.source.requests(), 1);
    assert_eq!(f.cache.metrics.chunk_fetches.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adjacent_missing_chunks_are_fetched_in_one_request() {
    let f = fixture();
    let got = f.read(CHUNK as u64 + 10, 3 * CHUNK as u32).await.unwrap();
    assert_eq!(&got[..], f.expect(CHUNK as u64 + 10, 3 * CHUNK as u32));
    let ranges = f.source.ranges();
    assert_eq!(ranges.len(), 1, "{ranges:?}");
    let EntryKind::Regular { chunks, .. } = &f.layer.index.entries[1].kind else {
        unreachable!()
    };
    assert_eq!(ranges[0].start, chunks[1].compressed_offset.0);
    assert_eq!(
        ranges[0].end,
        chunks[4].compressed_offset.0 + chunks[4].compressed_size
    );
    assert_eq!(f.cache.metrics.chunk_fetches.load(Ordering::Relaxed), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_requests_respect_the_size_bound() {
    let dir = tempfile::tempdir().unwrap();
    let (index, blob, content) = layer_with_file(LayerFormat::ZstdChunked, 8 * CHUNK, 2);
    let source = Arc::new(MemoryBlobSource::new(blob));
    let layer = Layer::new("bounded", Arc::new(index), source.clone());
    let cache = ChunkCache::open(
        CacheOptions {
            // Room for about two incompressible chunks per request.
            max_coalesced_bytes: 2 * CHUNK as u64 + 1024,
            ..options(dir.path())
        },
        Arc::new(Metrics::default()),
    )
    .unwrap();
    let got = cache
        .read_file(
            &layer,
            EntryId(1),
            0,
            content.len() as u32,
            FetchPriority::OnDemand,
        )
        .await
        .unwrap();
    assert_eq!(&got[..], &content[..]);
    let ranges = source.ranges();
    assert_eq!(ranges.len(), 4, "{ranges:?}");
    assert!(
        ranges
            .iter()
            .all(|r| r.end - r.start <= 2 * CHUNK as u64 + 1024)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_chunk_fails_and_is_never_cached() {
    let f = fixture();
    f.source.set_behavior(SourceBehavior::Corrupt);
    let err = f.read(0, 100).await.unwrap_err();
    let CacheError::Corrupt { chunk, source } = &err else {
        panic!("expected a corrupt-chunk error, got {err}");
    };
    assert!(matches!(
        **source,
        FormatError::ChunkDigestMismatch { .. } | FormatError::ChunkUnreadable { .. }
    ));
    assert_eq!(chunk.path, "big.bin");
    assert_eq!(chunk.layer, "test/image:1 layer 0");
    assert!(err.to_string().contains("big.bin"));
    assert_eq!(
        f.cache
            .metrics
            .chunk_verify_failures
            .load(Ordering::Relaxed),
        1
    );
    assert_eq!(f.cache.memory_resident_bytes(), 0);
    assert!(!f.cache.disk.contains(&chunk.digest));

    // Nothing bad was kept: a good source serves the read afterwards.
    f.source.set_behavior(SourceBehavior::Serve);
    assert_eq!(&f.read(0, 100).await.unwrap()[..], f.expect(0, 100));
    assert_eq!(f.source.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_failure_names_layer_file_and_chunk() {
    let f = fixture();
    f.source.set_behavior(SourceBehavior::Fail);
    let err = f.read(5 * CHUNK as u64, 10).await.unwrap_err();
    assert!(err.is_transient());
    let CacheError::Fetch { chunk, .. } = &err else {
        panic!("expected a fetch error, got {err}");
    };
    assert_eq!(chunk.file_offset, 5 * CHUNK as u64);
    let text = err.to_string();
    assert!(
        text.contains("test/image:1 layer 0") && text.contains("big.bin"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_cache_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let (index, blob, content) = layer_with_file(LayerFormat::Estargz, 3 * CHUNK, 3);
    let index = Arc::new(index);
    {
        let source = Arc::new(MemoryBlobSource::new(blob.clone()));
        let layer = Layer::new("first", index.clone(), source.clone());
        let cache = ChunkCache::open(options(dir.path()), Arc::new(Metrics::default())).unwrap();
        cache
            .read_file(
                &layer,
                EntryId(1),
                0,
                content.len() as u32,
                FetchPriority::OnDemand,
            )
            .await
            .unwrap();
        assert_eq!(source.requests(), 1);
    }
    let source = Arc::new(MemoryBlobSource::new(blob));
    let layer = Layer::new("second", index, source.clone());
    let cache = ChunkCache::open(options(dir.path()), Arc::new(Metrics::default())).unwrap();
    let got = cache
        .read_file(
            &layer,
            EntryId(1),
            0,
            content.len() as u32,
            FetchPriority::OnDemand,
        )
        .await
        .unwrap();
    assert_eq!(&got[..], &content[..]);
    assert_eq!(source.requests(), 0);
    assert_eq!(cache.metrics.chunk_hits_disk.load(Ordering::Relaxed), 3);
    assert!(cache.is_fully_cached(&layer).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_chunks_in_two_layers_are_fetched_once() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(options(dir.path()), Arc::new(Metrics::default())).unwrap();
    let content = pseudo_random_bytes(2 * CHUNK, 4);
    let mut layers = Vec::new();
    for name in ["a", "b"] {
        let mut builder = LayerBuilder::new(LayerFormat::Estargz);
        builder.dir("etc", 0o755);
        builder.file(&format!("etc/{name}"), 0o644, &content, CHUNK);
        let (index, blob) = builder.build();
        let source = Arc::new(MemoryBlobSource::new(blob));
        layers.push((Layer::new(name, Arc::new(index), source.clone()), source));
    }
    for (layer, _) in &layers {
        let got = cache
            .read_file(
                layer,
                EntryId(2),
                0,
                content.len() as u32,
                FetchPriority::OnDemand,
            )
            .await
            .unwrap();
        assert_eq!(&got[..], &content[..]);
    }
    assert_eq!(layers[0].1.requests(), 1);
    assert_eq!(layers[1].1.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_cache_stays_within_its_bound() {
    let bound = 3 * CHUNK as u64 * 4; // 4 shards' worth below
    let dir = tempfile::tempdir().unwrap();
    let (index, blob, content) = layer_with_file(LayerFormat::Estargz, 40 * CHUNK, 5);
    let layer = Layer::new(
        "lru",
        Arc::new(index),
        Arc::new(MemoryBlobSource::new(blob)),
    );
    let cache = ChunkCache::open(
        CacheOptions {
            memory_bytes: bound,
            shards: 4,
            ..options(dir.path())
        },
        Arc::new(Metrics::default()),
    )
    .unwrap();
    for i in 0..40u64 {
        let got = cache
            .read_file(
                &layer,
                EntryId(1),
                i * CHUNK as u64,
                CHUNK as u32,
                FetchPriority::OnDemand,
            )
            .await
            .unwrap();
        assert_eq!(
            &got[..],
            &content[i as usize * CHUNK..(i as usize + 1) * CHUNK]
        );
        assert!(cache.memory_resident_bytes() <= bound);
    }
    assert!(cache.memory_resident_bytes() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_files_are_never_served() {
    let f = fixture();
    let EntryKind::Regular { chunks, .. } = &f.layer.index.entries[1].kind else {
        unreachable!()
    };
    let (first, second) = (&chunks[0], &chunks[1]);
    // A crash mid-write leaves a temp file: it is removed on open.
    let temp = f.cache.disk.temp_path_for_test(&first.digest);
    std::fs::create_dir_all(temp.parent().unwrap()).unwrap();
    std::fs::write(&temp, &f.content[..100]).unwrap();
    // A power loss after rename can leave a short final file: it is rejected on read.
    let final_path = f.cache.disk.path(&second.digest);
    std::fs::create_dir_all(final_path.parent().unwrap()).unwrap();
    std::fs::write(&final_path, &f.content[CHUNK..CHUNK + 100]).unwrap();

    let cache = ChunkCache::open(options(f.cache.dir()), Arc::new(Metrics::default())).unwrap();
    assert!(!temp.exists());
    let got = cache
        .read_file(
            &f.layer,
            f.file,
            0,
            2 * CHUNK as u32,
            FetchPriority::OnDemand,
        )
        .await
        .unwrap();
    assert_eq!(&got[..], f.expect(0, 2 * CHUNK as u32));
    assert_eq!(f.source.requests(), 1);
    assert_eq!(
        std::fs::read(&final_path).unwrap(),
        &f.content[CHUNK..2 * CHUNK]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_fetch_does_not_block_later_reads() {
    let f = fixture();
    f.source.set_behavior(SourceBehavior::Hang);
    let timed_out = tokio::time::timeout(Duration::from_millis(200), f.read(0, 10)).await;
    assert!(timed_out.is_err());
    f.source.set_behavior(SourceBehavior::Serve);
    let got = tokio::time::timeout(Duration::from_secs(10), f.read(0, 10))
        .await
        .expect("a fresh fetch replaces the abandoned one")
        .unwrap();
    assert_eq!(&got[..], f.expect(0, 10));
    assert_eq!(f.source.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_fills_the_cache_and_hard_links_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let mut builder = LayerBuilder::new(LayerFormat::Estargz);
    let small: Vec<Vec<u8>> = (0..5)
        .map(|i| pseudo_random_bytes(1000 + i, i as u64))
        .collect();
    let ids: Vec<EntryId> = small
        .iter()
        .enumerate()
        .map(|(i, c)| builder.file(&format!("f{i}"), 0o644, c, CHUNK))
        .collect();
    let link = builder.hardlink("link", ids[2]);
    let (index, blob) = builder.build();
    let source = Arc::new(MemoryBlobSource::new(blob));
    let layer = Layer::new("prefetch", Arc::new(index), source.clone());
    let cache = ChunkCache::open(options(dir.path()), Arc::new(Metrics::default())).unwrap();
    cache
        .prefetch(&layer, &ids, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        source.requests(),
        1,
        "five adjacent small files, one request"
    );
    for (id, content) in ids.iter().zip(&small) {
        let got = cache
            .read_file_cached(&layer, *id, 0, 4096)
            .unwrap()
            .unwrap();
        assert_eq!(&got[..], &content[..]);
    }
    let got = cache
        .read_file(&layer, link, 0, 4096, FetchPriority::OnDemand)
        .await
        .unwrap();
    assert_eq!(&got[..], &small[2][..]);
    assert_eq!(source.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_gives_up_after_its_timeout() {
    let f = fixture();
    f.source.set_behavior(SourceBehavior::Hang);
    let err = f
        .cache
        .prefetch(&f.layer, &[f.file], Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(
        matches!(err, CacheError::PrefetchTimeout { files: 1, .. }),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_caches_the_whole_layer_after_transient_failures() {
    let f = fixture();
    f.source.set_behavior(SourceBehavior::Fail);
    let mut handle = f.cache.stream_layer(
        f.layer.clone(),
        StreamOptions {
            request_bytes: 3 * CHUNK as u64,
            retry_delay: Duration::from_millis(20),
            ..StreamOptions::default()
        },
        &tokio::runtime::Handle::current(),
    );
    while f.source.requests() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!handle.progress().finished);
    f.source.set_behavior(SourceBehavior::Serve);
    let progress = tokio::time::timeout(Duration::from_secs(20), handle.wait_finished())
        .await
        .unwrap();
    assert!(progress.fully_cached(), "{progress:?}");
    assert_eq!(progress.total_chunks, 11);
    assert!(f.cache.is_fully_cached(&f.layer).await);
    // Streaming goes to disk, not memory: the hot set is left alone.
    assert_eq!(f.cache.memory_resident_bytes(), 0);
    let requests = f.source.requests();
    assert_eq!(&f.read(0, 100).await.unwrap()[..], f.expect(0, 100));
    assert_eq!(f.source.requests(), requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_handle_stops_streaming() {
    let f = fixture_with(Duration::from_millis(50), 64 << 20);
    let handle = f.cache.stream_layer(
        f.layer.clone(),
        StreamOptions {
            request_bytes: CHUNK as u64,
            ..StreamOptions::default()
        },
        &tokio::runtime::Handle::current(),
    );
    while f.source.requests() < 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(handle);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after_stop = f.source.requests();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(f.source.requests(), after_stop);
    assert!(after_stop < 11);
    assert!(!f.cache.is_fully_cached(&f.layer).await);
}

#[test]
fn empty_dir_is_rejected() {
    let err = ChunkCache::open(CacheOptions::default(), Arc::new(Metrics::default())).unwrap_err();
    assert!(matches!(err, CacheError::InvalidOptions { .. }));
}

/// Bytes of chunk files under the cache's `chunks/`.
fn chunk_bytes_on_disk(dir: &Path) -> u64 {
    let mut total = 0;
    for fanout in std::fs::read_dir(dir.join("chunks")).unwrap().flatten() {
        for file in std::fs::read_dir(fanout.path()).unwrap().flatten() {
            total += file.metadata().unwrap().len();
        }
    }
    total
}

#[tokio::test]
async fn a_disk_limit_evicts_the_least_recently_used_chunks() {
    let dir = tempfile::tempdir().unwrap();
    // Twenty 64 KiB chunks through a cache that holds eight on disk and none in memory.
    let (index, blob, content) = layer_with_file(LayerFormat::Estargz, 20 * CHUNK, 7);
    let source = Arc::new(MemoryBlobSource::new(blob));
    let layer = Layer::new("test/image:1 layer 0", Arc::new(index), source.clone());
    let limit = 8 * CHUNK as u64;
    let cache = ChunkCache::open(
        CacheOptions {
            memory_bytes: 0,
            disk_bytes: Some(limit),
            ..options(dir.path())
        },
        Arc::new(Metrics::default()),
    )
    .unwrap();
    let read = |chunk: usize| {
        let (cache, layer) = (Arc::clone(&cache), Arc::clone(&layer));
        async move {
            cache
                .read_file(
                    &layer,
                    EntryId(1),
                    (chunk * CHUNK) as u64,
                    CHUNK as u32,
                    FetchPriority::OnDemand,
                )
                .await
                .unwrap()
        }
    };
    // The first chunk is read again and again while the others stream past it; its
    // mtime is set back so that the read has to refresh it.
    assert_eq!(&read(0).await[..], &content[..CHUNK]);
    let chunks = regular_chunks(&layer, EntryId(1)).unwrap().1.to_vec();
    let first = cache.disk.path(&chunks[0].digest);
    for chunk in 1..20 {
        let old = SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(&first)
            .unwrap()
            .set_modified(old)
            .unwrap();
        // Distinct mtimes for the other chunks, oldest first.
        tokio::time::sleep(Duration::from_millis(15)).await;
        assert_eq!(&read(0).await[..], &content[..CHUNK], "after chunk {chunk}");
        let data = read(chunk).await;
        assert_eq!(&data[..], &content[chunk * CHUNK..(chunk + 1) * CHUNK]);
        let on_disk = chunk_bytes_on_disk(dir.path());
        assert!(
            on_disk <= limit,
            "after chunk {chunk}: {on_disk} bytes on disk, limit {limit}"
        );
    }
    assert!(first.is_file(), "the chunk read all along was evicted");
    let requests = source.requests();
    assert_eq!(
        requests, 20,
        "the hot chunk was fetched again ({requests} requests for 20 chunks)"
    );
    // The newest chunk stays, the oldest cold ones went.
    assert!(cache.disk.contains(&chunks[19].digest));
    assert!(!cache.disk.contains(&chunks[1].digest));

    // Reopened with a lower limit: it applies at once.
    drop(cache);
    let smaller = ChunkCache::open(
        CacheOptions {
            disk_bytes: Some(2 * CHUNK as u64),
            ..options(dir.path())
        },
        Arc::new(Metrics::default()),
    )
    .unwrap();
    assert!(chunk_bytes_on_disk(dir.path()) <= 2 * CHUNK as u64);
    assert_eq!(smaller.disk.used_bytes(), chunk_bytes_on_disk(dir.path()));
}

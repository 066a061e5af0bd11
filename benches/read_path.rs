//! Read path through a real FUSE mount, against an in-memory registry double (no
//! network latency: this measures sluice's own cost). Needs root and /dev/fuse.
//!
//! - `small_files_cold`: read 50 small files from a fresh mount with an empty cache.
//! - `small_files_disk_warm/{fuse,passthrough}`: read the same 50 files three times
//!   from a fresh mount whose disk cache has them, without and with FUSE passthrough.
//! - `big_file_sequential`: read a 64 MiB file sequentially through the mount when
//!   nothing is cached (`sluice_cold`), when its chunks are in the disk cache but not
//!   the page cache (`sluice_disk_warm`), and when the kernel page cache has it
//!   (`sluice_page_cache_warm`); and the same file on local disk, with cold and warm
//!   page cache.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sluice::cache::testing::{LayerBuilder, MemoryBlobSource, pseudo_random_bytes};
use sluice::cache::{CacheOptions, ChunkCache, Layer};
use sluice::format::{LayerFormat, LayerIndex};
use sluice::fs::{FsOptions, MountedLayer, mount_layer};
use sluice::metrics::Metrics;

const BIG_LEN: usize = 64 << 20;
const BIG_CHUNK: usize = 1 << 20;
const SMALL_FILES: usize = 50;

struct Mount {
    mount: Option<MountedLayer>,
    mountpoint: tempfile::TempDir,
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mount) = self.mount.take() {
            let _ = mount.unmount();
        }
    }
}

fn mount(
    runtime: &tokio::runtime::Runtime,
    index: &Arc<LayerIndex>,
    blob: &Bytes,
    cache_dir: &Path,
) -> Mount {
    mount_with(runtime, index, blob, cache_dir, FsOptions::default())
}

fn mount_with(
    runtime: &tokio::runtime::Runtime,
    index: &Arc<LayerIndex>,
    blob: &Bytes,
    cache_dir: &Path,
    options: FsOptions,
) -> Mount {
    let layer = Layer::new(
        "bench",
        index.clone(),
        Arc::new(MemoryBlobSource::new(blob.clone())),
    );
    let cache = ChunkCache::open(
        CacheOptions {
            dir: cache_dir.to_path_buf(),
            ..CacheOptions::default()
        },
        Arc::new(Metrics::default()),
    )
    .unwrap();
    let mountpoint = tempfile::tempdir().unwrap();
    let mounted = mount_layer(
        layer,
        cache,
        runtime.handle().clone(),
        mountpoint.path(),
        options,
    )
    .expect("the benchmark needs root and /dev/fuse");
    Mount {
        mount: Some(mounted),
        mountpoint,
    }
}

fn read_all(path: &Path, buf: &mut [u8]) -> usize {
    let mut file = File::open(path).unwrap();
    let mut total = 0;
    loop {
        let n = file.read(buf).unwrap();
        if n == 0 {
            return total;
        }
        total += n;
    }
}

fn drop_page_cache(path: &Path) {
    let file = File::open(path).unwrap();
    // SAFETY: a valid open descriptor; the advice only affects caching.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

fn benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut buf = vec![0u8; 1 << 20];

    // 50 small files.
    let mut builder = LayerBuilder::new(LayerFormat::Estargz);
    builder.dir("lib", 0o755);
    for i in 0..SMALL_FILES {
        let content = pseudo_random_bytes(2048 + i * 300, i as u64);
        builder.file(&format!("lib/f{i:02}"), 0o644, &content, 1 << 20);
    }
    let (index, blob) = builder.build();
    let index = Arc::new(index);
    c.bench_function("small_files_cold/50_files", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let cache_dir = tempfile::tempdir().unwrap();
                let m = mount(&runtime, &index, &blob, cache_dir.path());
                let start = Instant::now();
                for i in 0..SMALL_FILES {
                    read_all(&m.mountpoint.path().join(format!("lib/f{i:02}")), &mut buf);
                }
                spent += start.elapsed();
            }
            spent
        })
    });

    // The same files when their chunks are in the disk cache but nothing is in
    // memory or the page cache: through FUSE, and through passthrough.
    let warm_small = tempfile::tempdir().unwrap();
    {
        let m = mount(&runtime, &index, &blob, warm_small.path());
        for i in 0..SMALL_FILES {
            read_all(&m.mountpoint.path().join(format!("lib/f{i:02}")), &mut buf);
        }
    }
    for (name, passthrough) in [("fuse", false), ("passthrough", true)] {
        c.bench_function(&format!("small_files_disk_warm/{name}"), |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let m = mount_with(
                        &runtime,
                        &index,
                        &blob,
                        warm_small.path(),
                        FsOptions {
                            passthrough,
                            ..FsOptions::default()
                        },
                    );
                    let start = Instant::now();
                    for _ in 0..3 {
                        for i in 0..SMALL_FILES {
                            read_all(&m.mountpoint.path().join(format!("lib/f{i:02}")), &mut buf);
                        }
                    }
                    spent += start.elapsed();
                }
                spent
            })
        });
    }

    // One big file.
    let content = pseudo_random_bytes(BIG_LEN, 99);
    let mut builder = LayerBuilder::new(LayerFormat::Estargz);
    builder.file("big.bin", 0o644, &content, BIG_CHUNK);
    let (index, blob) = builder.build();
    let index = Arc::new(index);
    let local_dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let local = local_dir.path().join("big.bin");
    std::fs::write(&local, &content).unwrap();
    File::open(&local).unwrap().sync_all().unwrap();
    drop(content);

    let mut group = c.benchmark_group("big_file_sequential");
    group.throughput(Throughput::Bytes(BIG_LEN as u64));
    group.bench_function("sluice_cold", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let cache_dir = tempfile::tempdir().unwrap();
                let m = mount(&runtime, &index, &blob, cache_dir.path());
                let start = Instant::now();
                assert_eq!(
                    read_all(&m.mountpoint.path().join("big.bin"), &mut buf),
                    BIG_LEN
                );
                spent += start.elapsed();
            }
            spent
        })
    });
    let warm_cache = tempfile::tempdir().unwrap();
    {
        let m = mount(&runtime, &index, &blob, warm_cache.path());
        read_all(&m.mountpoint.path().join("big.bin"), &mut buf);
    }
    group.bench_function("sluice_disk_warm", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                // A new mount and cache instance: nothing in page cache or memory.
                let m = mount(&runtime, &index, &blob, warm_cache.path());
                let start = Instant::now();
                assert_eq!(
                    read_all(&m.mountpoint.path().join("big.bin"), &mut buf),
                    BIG_LEN
                );
                spent += start.elapsed();
            }
            spent
        })
    });
    let m = mount(&runtime, &index, &blob, warm_cache.path());
    let mounted_big = m.mountpoint.path().join("big.bin");
    read_all(&mounted_big, &mut buf);
    group.bench_function("sluice_page_cache_warm", |b| {
        b.iter(|| assert_eq!(read_all(&mounted_big, &mut buf), BIG_LEN))
    });
    drop(m);
    group.bench_function("local_disk_cold", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                drop_page_cache(&local);
                let start = Instant::now();
                assert_eq!(read_all(&local, &mut buf), BIG_LEN);
                spent += start.elapsed();
            }
            spent
        })
    });
    read_all(&local, &mut buf);
    group.bench_function("local_disk_warm", |b| {
        b.iter(|| assert_eq!(read_all(&local, &mut buf), BIG_LEN))
    });
    group.finish();
}

criterion_group! {
    name = read_path;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    targets = benches
}
criterion_main!(read_path);

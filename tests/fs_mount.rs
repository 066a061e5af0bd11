//! Mount layers built in memory with real FUSE and inspect them with std::fs.
//! Needs root and /dev/fuse.

use std::ffi::CString;
use std::fs;
use std::io::{ErrorKind, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sluice::cache::testing::{LayerBuilder, MemoryBlobSource, SourceBehavior, pseudo_random_bytes};
use sluice::cache::{CacheOptions, ChunkCache, Layer};
use sluice::digest::Digest;
use sluice::format::{EntryKind, LayerFormat};
use sluice::fs::{FsOptions, MountedLayer, mount_layer};
use sluice::metrics::Metrics;

const BIG_LEN: usize = 3 * 1024 * 1024 + 777;
const BIG_CHUNK: usize = 256 * 1024;

struct Mounted {
    // Field order matters: unmount before the directories are removed.
    mount: Option<MountedLayer>,
    source: Arc<MemoryBlobSource>,
    metrics: Arc<Metrics>,
    big: Vec<u8>,
    _runtime: tokio::runtime::Runtime,
    cache_dir: tempfile::TempDir,
    mountpoint: tempfile::TempDir,
}

impl Mounted {
    fn path(&self, rel: &str) -> std::path::PathBuf {
        self.mountpoint.path().join(rel)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(mount) = self.mount.take() {
            // Also runs while a failed test unwinds: never leave a mount behind.
            let _ = mount.unmount();
        }
    }
}

fn build_layer() -> (sluice::format::LayerIndex, bytes::Bytes, Vec<u8>) {
    let mut b = LayerBuilder::new(LayerFormat::Estargz);
    b.dir("etc", 0o755);
    b.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\n",
        4096,
    );
    b.dir("bin", 0o755);
    let sh = b.file("bin/sh", 0o4755, b"#!fake shell\n", 4096);
    {
        let e = b.last_mut();
        e.uid = 1000;
        e.gid = 2000;
        e.mtime_secs = 1_234_567_890;
        e.mtime_nanos = 123_456_789;
        e.xattrs = vec![
            ("user.origin".into(), b"test-suite".to_vec()),
            ("trusted.sluice".into(), vec![1, 0, 0, 2]),
        ];
    }
    b.symlink("bin/link", "sh");
    b.hardlink("bin/hard", sh);
    b.dir("dev", 0o755);
    b.node(
        "dev/null",
        EntryKind::CharDevice { major: 1, minor: 3 },
        0o666,
    );
    b.node(
        "dev/sda",
        EntryKind::BlockDevice { major: 8, minor: 0 },
        0o660,
    );
    b.node("dev/fifo", EntryKind::Fifo, 0o600);
    b.node(
        ".wh.gone",
        EntryKind::Regular {
            size: 0,
            chunks: vec![],
        },
        0o644,
    );
    b.dir("opaque", 0o700);
    b.node(
        "opaque/.wh..wh..opq",
        EntryKind::Regular {
            size: 0,
            chunks: vec![],
        },
        0o644,
    );
    b.file("opaque/kept", 0o644, b"kept", 4096);
    let big = pseudo_random_bytes(BIG_LEN, 42);
    b.file("big.bin", 0o644, &big, BIG_CHUNK);
    b.file("empty", 0o644, b"", 4096);
    let (index, blob) = b.build();
    (index, blob, big)
}

fn mount(read_timeout: Duration) -> Mounted {
    let cache_dir = tempfile::tempdir().unwrap();
    mount_on(cache_dir, read_timeout)
}

fn mount_on(cache_dir: tempfile::TempDir, read_timeout: Duration) -> Mounted {
    mount_built(cache_dir, read_timeout, build_layer())
}

fn mount_built(
    cache_dir: tempfile::TempDir,
    read_timeout: Duration,
    (index, blob, big): (sluice::format::LayerIndex, bytes::Bytes, Vec<u8>),
) -> Mounted {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mountpoint = tempfile::tempdir().unwrap();
    let source = Arc::new(MemoryBlobSource::new(blob));
    let layer = Layer::new(
        "test.local/fs:1 sha256:layer0",
        Arc::new(index),
        source.clone(),
    );
    let metrics = Arc::new(Metrics::default());
    let cache = ChunkCache::open(
        CacheOptions {
            dir: cache_dir.path().to_path_buf(),
            memory_bytes: 64 << 20,
            ..CacheOptions::default()
        },
        metrics.clone(),
    )
    .unwrap();
    let mount = mount_layer(
        layer,
        cache,
        runtime.handle().clone(),
        mountpoint.path(),
        FsOptions {
            read_timeout,
            fsname: "sluice-test".into(),
            ..FsOptions::default()
        },
    )
    .expect("mounting needs root and /dev/fuse");
    Mounted {
        mount: Some(mount),
        source,
        metrics,
        big,
        _runtime: runtime,
        cache_dir,
        mountpoint,
    }
}

fn xattr(path: &Path, name: &str) -> Result<Vec<u8>, std::io::Error> {
    let path = CString::new(path.as_os_str().as_bytes()).unwrap();
    let name = CString::new(name).unwrap();
    // SAFETY: both strings are NUL-terminated; a null buffer with size 0 asks for the size.
    let size = unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
    if size < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut value = vec![0u8; size as usize];
    if size > 1 {
        // A buffer one byte too small must fail with ERANGE (size 0 would be a probe).
        // SAFETY: the buffer has `size` bytes; we pass `size - 1`.
        let short = unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_mut_ptr().cast(),
                size as usize - 1,
            )
        };
        assert_eq!(short, -1);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::ERANGE)
        );
    }
    // SAFETY: the buffer has `value.len()` writable bytes.
    let got = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    assert_eq!(got, size);
    Ok(value)
}

fn xattr_names(path: &Path) -> Vec<String> {
    let path = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: NUL-terminated path; size 0 asks for the needed size.
    let size = unsafe { libc::llistxattr(path.as_ptr(), std::ptr::null_mut(), 0) };
    assert!(size >= 0);
    let mut buf = vec![0u8; size as usize];
    // SAFETY: the buffer has `buf.len()` writable bytes.
    let got = unsafe { libc::llistxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert_eq!(got, size);
    buf.split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8(s.to_vec()).unwrap())
        .collect()
}

#[test]
fn tree_metadata_and_overlay_conventions() {
    let m = mount(Duration::from_secs(10));

    let mut root: Vec<String> = fs::read_dir(m.path(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    root.sort();
    assert_eq!(
        root,
        ["big.bin", "bin", "dev", "empty", "etc", "gone", "opaque"]
    );
    let mut bin: Vec<String> = fs::read_dir(m.path("bin"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    bin.sort();
    assert_eq!(bin, ["hard", "link", "sh"]);

    let root_meta = fs::metadata(m.path("")).unwrap();
    assert!(root_meta.is_dir());
    assert_eq!(root_meta.mode() & 0o7777, 0o755);
    assert_eq!(root_meta.nlink(), 2 + 4, "root has four subdirectories");

    let sh = fs::symlink_metadata(m.path("bin/sh")).unwrap();
    assert!(sh.is_file());
    assert_eq!(sh.mode() & 0o7777, 0o4755);
    assert_eq!((sh.uid(), sh.gid()), (1000, 2000));
    assert_eq!((sh.mtime(), sh.mtime_nsec()), (1_234_567_890, 123_456_789));
    assert_eq!(sh.len(), 13);
    assert_eq!(sh.nlink(), 2);
    let hard = fs::symlink_metadata(m.path("bin/hard")).unwrap();
    assert_eq!(hard.ino(), sh.ino());
    assert_eq!(fs::read(m.path("bin/hard")).unwrap(), b"#!fake shell\n");

    let link = fs::symlink_metadata(m.path("bin/link")).unwrap();
    assert!(link.file_type().is_symlink());
    assert_eq!(fs::read_link(m.path("bin/link")).unwrap(), Path::new("sh"));
    assert_eq!(fs::read(m.path("bin/link")).unwrap(), b"#!fake shell\n");

    let null = fs::symlink_metadata(m.path("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), libc::makedev(1, 3));
    assert_eq!(null.mode() & 0o7777, 0o666);
    let sda = fs::symlink_metadata(m.path("dev/sda")).unwrap();
    assert!(sda.file_type().is_block_device());
    assert_eq!(sda.rdev(), libc::makedev(8, 0));
    assert!(
        fs::symlink_metadata(m.path("dev/fifo"))
            .unwrap()
            .file_type()
            .is_fifo()
    );

    // Whiteouts as overlayfs expects them.
    let gone = fs::symlink_metadata(m.path("gone")).unwrap();
    assert!(gone.file_type().is_char_device());
    assert_eq!(gone.rdev(), 0);
    assert!(fs::symlink_metadata(m.path(".wh.gone")).is_err());
    assert_eq!(
        fs::read_dir(m.path("opaque"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect::<Vec<_>>(),
        ["kept"]
    );
    assert_eq!(
        xattr(&m.path("opaque"), "trusted.overlay.opaque").unwrap(),
        b"y"
    );
    assert_eq!(
        xattr(&m.path("opaque"), "user.overlay.opaque")
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENODATA)
    );
    assert_eq!(
        xattr(&m.path("etc"), "trusted.overlay.opaque")
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENODATA)
    );

    assert_eq!(
        xattr(&m.path("bin/sh"), "user.origin").unwrap(),
        b"test-suite"
    );
    assert_eq!(
        xattr(&m.path("bin/hard"), "trusted.sluice").unwrap(),
        [1, 0, 0, 2]
    );
    let mut names = xattr_names(&m.path("bin/sh"));
    names.sort();
    assert_eq!(names, ["trusted.sluice", "user.origin"]);
    assert!(xattr_names(&m.path("etc")).is_empty());

    assert_eq!(
        fs::read(m.path("etc/passwd")).unwrap(),
        b"root:x:0:0:root:/root:/bin/sh\n"
    );
    assert_eq!(fs::read(m.path("empty")).unwrap(), b"");
    let big = fs::metadata(m.path("big.bin")).unwrap();
    assert_eq!(big.len(), BIG_LEN as u64);
    assert_eq!(big.blocks(), (BIG_LEN as u64).div_ceil(512));

    // Read-only.
    let err = fs::OpenOptions::new()
        .write(true)
        .open(m.path("etc/passwd"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    assert!(fs::create_dir(m.path("new")).is_err());
    let st = nix::sys::statvfs::statvfs(m.mountpoint.path()).unwrap();
    assert!(st.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY));
}

#[test]
fn multi_chunk_file_reads_sequentially_and_at_random_offsets() {
    let m = mount(Duration::from_secs(10));
    let mut data = Vec::new();
    fs::File::open(m.path("big.bin"))
        .unwrap()
        .read_to_end(&mut data)
        .unwrap();
    assert_eq!(Digest::sha256_of(&data), Digest::sha256_of(&m.big));

    let file = fs::File::open(m.path("big.bin")).unwrap();
    let mut state = 7u64;
    for _ in 0..200 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let offset = (state >> 11) as usize % (BIG_LEN + 100);
        let len = (state >> 40) as usize % 300_000;
        let mut buf = vec![0u8; len];
        let n = file.read_at(&mut buf, offset as u64).unwrap();
        let expect = &m.big[offset.min(BIG_LEN)..(offset + len).min(BIG_LEN)];
        assert!(n <= expect.len());
        assert_eq!(&buf[..n], &expect[..n], "offset {offset} len {len}");
    }
}

#[test]
fn failing_registry_gives_eio_within_timeout_then_recovers() {
    let timeout = Duration::from_secs(2);
    let m = mount(timeout);
    for behavior in [SourceBehavior::Hang, SourceBehavior::Fail] {
        m.source.set_behavior(behavior);
        let err = fs::read(m.path("etc/passwd")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{behavior:?}: {err}");
    }
    m.source.set_behavior(SourceBehavior::Serve);
    assert_eq!(
        fs::read(m.path("etc/passwd")).unwrap(),
        b"root:x:0:0:root:/root:/bin/sh\n"
    );
    let data = fs::read(m.path("big.bin")).unwrap();
    assert_eq!(Digest::sha256_of(&data), Digest::sha256_of(&m.big));
}

#[test]
fn lookups_of_missing_names_fail_cleanly() {
    let m = mount(Duration::from_secs(10));
    let err = fs::metadata(m.path("etc/nope")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let err = fs::metadata(m.path("etc/passwd/x")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTDIR));
}

#[test]
fn cached_single_chunk_files_bypass_sluice_through_passthrough() {
    let first = mount(Duration::from_secs(10));
    let passwd = b"root:x:0:0:root:/root:/bin/sh\n";
    // A handle opened before the chunk was cached keeps the inode in page-cache
    // mode; opening it again meanwhile must not switch to passthrough.
    let mut early = fs::File::open(first.path("etc/passwd")).unwrap();
    let mut buf = Vec::new();
    early.read_to_end(&mut buf).unwrap();
    assert_eq!(buf, passwd);
    assert_eq!(fs::read(first.path("etc/passwd")).unwrap(), passwd);
    drop(early);
    assert_eq!(fs::read(first.path("etc/passwd")).unwrap(), passwd);
    // A second mount over the same disk cache, with the registry gone.
    let shared = tempfile::TempDir::new_in(first.cache_dir.path()).unwrap();
    let chunks = first.cache_dir.path().join("chunks");
    fs::rename(&chunks, shared.path().join("chunks")).unwrap();
    let second = mount_on(shared, Duration::from_secs(2));
    second.source.set_behavior(SourceBehavior::Fail);
    assert!(
        second.mount.as_ref().unwrap().passthrough_active(),
        "this kernel offers FUSE passthrough (Linux 6.9+)"
    );
    // Two handles share one backing file; after both close, a new open registers it again.
    let a = fs::File::open(second.path("etc/passwd")).unwrap();
    let b = fs::File::open(second.path("etc/passwd")).unwrap();
    let mut buf = Vec::new();
    (&a).read_to_end(&mut buf).unwrap();
    assert_eq!(buf, passwd);
    drop((a, b));
    assert_eq!(fs::read(second.path("etc/passwd")).unwrap(), passwd);
    assert_eq!(
        fs::read(second.path("bin/hard"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EIO)
    );
    let m = &second.metrics;
    // Reads of the cached file never reached the cache: the kernel read the cache file.
    assert_eq!(
        m.chunk_hits_disk.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert_eq!(
        m.chunk_hits_memory
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert!(m.read_errors.load(std::sync::atomic::Ordering::Relaxed) >= 1);
}

/// A layer with no extended attributes and no opaque directory answers xattr
/// requests as a filesystem without xattr support (the kernel stops asking), and
/// stays fully readable and listable, also on a second pass (directory opens and
/// misses are then answered by the kernel).
#[test]
fn layer_without_xattrs_reports_no_xattr_support_and_stays_listable() {
    let mut b = LayerBuilder::new(LayerFormat::Estargz);
    b.dir("lib", 0o755);
    b.file("lib/a.py", 0o644, b"print('a')\n", 4096);
    b.file("lib/b.py", 0o644, b"print('b')\n", 4096);
    let (index, blob) = b.build();
    let m = mount_built(
        tempfile::tempdir().unwrap(),
        Duration::from_secs(10),
        (index, blob, Vec::new()),
    );
    // Readahead raised from the kernel's 128 KiB default to FsOptions::max_readahead.
    let dev = fs::metadata(m.path("")).unwrap().dev();
    let readahead = fs::read_to_string(format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    ))
    .unwrap();
    assert_eq!(
        readahead.trim(),
        (FsOptions::default().max_readahead / 1024).to_string()
    );
    for _ in 0..2 {
        let mut names: Vec<String> = fs::read_dir(m.path("lib"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["a.py", "b.py"]);
        assert_eq!(fs::read(m.path("lib/b.py")).unwrap(), b"print('b')\n");
        assert_eq!(
            fs::metadata(m.path("lib/missing.py"))
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ENOENT)
        );
        for path in ["lib", "lib/a.py"] {
            assert_eq!(
                xattr(&m.path(path), "trusted.overlay.metacopy")
                    .unwrap_err()
                    .raw_os_error(),
                Some(libc::EOPNOTSUPP)
            );
        }
    }
}

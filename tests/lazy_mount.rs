//! Issue "lazy layer filesystem": `sluice mount` against the real docker-registry and
//! real FUSE, with layers converted by Debian's ctr-remote.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::containerd::{ContainerdOptions, TestContainerd};
use common::images::{ImageFormat, PushedImage, publish};
use common::mount::is_mountpoint;
use common::proxy::TestProxy;
use common::registry::{RegistryOptions, TestRegistry};
use common::tree::{compare_trees, expected_layer_tree};
use sluice::format::{EntryKind, parse_footer, parse_toc};

/// A `sluice mount` process; killed and unmounted on drop, also when a test panics.
struct SluiceMount {
    child: Option<Child>,
    mountpoint: PathBuf,
    log: PathBuf,
}

impl SluiceMount {
    fn start(
        reference: &str,
        layer: usize,
        cache_dir: &Path,
        mountpoint: &Path,
        extra: &[&str],
    ) -> SluiceMount {
        std::fs::create_dir_all(mountpoint).unwrap();
        let log = mountpoint.with_extension("log");
        let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["--log-level", "info", "mount", reference])
            .arg(mountpoint)
            .args(["--layer", &layer.to_string(), "--cache-dir"])
            .arg(cache_dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn sluice mount");
        let mut mount = SluiceMount {
            child: Some(child),
            mountpoint: mountpoint.to_owned(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !is_mountpoint(mountpoint) {
            if let Some(status) = mount.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "sluice mount exited with {status} before mounting:\n{}",
                    mount.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "sluice mount did not mount in 60 s:\n{}",
                mount.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        mount
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.mountpoint.join(name)
    }

    /// SIGTERM, and the process must unmount and exit cleanly.
    fn stop(mut self) -> String {
        let mut child = self.child.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = child.wait().unwrap();
        let log = self.log_text();
        assert!(
            status.success(),
            "sluice mount exited with {status}:\n{log}"
        );
        assert!(
            !is_mountpoint(&self.mountpoint),
            "still mounted after sluice mount exited"
        );
        log
    }
}

impl Drop for SluiceMount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if is_mountpoint(&self.mountpoint) {
            let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn drop_page_cache() {
    // Forces reads to go through FUSE again, so the test exercises sluice's own cache.
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The chunks of `name` in a local copy of a layer blob, parsed with sluice's own
/// format code (the test checks the mount, not the parser).
fn chunks_of(blob: &Path, name: &str) -> Vec<sluice::format::Chunk> {
    let bytes = std::fs::read(blob).unwrap();
    let size = bytes.len() as u64;
    let tail_start = bytes
        .len()
        .saturating_sub(sluice::format::MAX_FOOTER_SIZE as usize);
    let footer = parse_footer(&bytes[tail_start..], size).unwrap();
    let range = footer.toc_range();
    let toc = parse_toc(
        &footer,
        &bytes[range.start as usize..range.end as usize],
        None,
        size,
    )
    .unwrap();
    let entry = toc
        .index
        .entries
        .iter()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("{name} not in layer"));
    match &entry.kind {
        EntryKind::Regular { chunks, .. } => chunks.clone(),
        other => panic!("{name} is {other:?}"),
    }
}

struct Setup {
    _containerd: TestContainerd,
    registry: TestRegistry,
    dir: tempfile::TempDir,
}

fn setup(options: RegistryOptions) -> Setup {
    assert!(
        common::have_root_and_fuse(),
        "integration tests need root and /dev/fuse"
    );
    Setup {
        _containerd: TestContainerd::start(ContainerdOptions::default()),
        registry: TestRegistry::start(options),
        dir: common::short_tempdir("sluice-lazy-"),
    }
}

impl Setup {
    fn publish(&self, format: ImageFormat) -> PushedImage {
        publish(&self._containerd, &self.registry, "everything", format)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Done-when 1: every layer of both formats, mounted by sluice, equals `tar -x` of the
/// same layer (names, types, modes, owners, mtimes, links, devices, xattrs, contents).
#[test]
fn mounted_layers_equal_tar_extraction() {
    let setup = setup(RegistryOptions::default());
    for format in [ImageFormat::Estargz, ImageFormat::ZstdChunked] {
        let image = setup.publish(format);
        for (index, _) in image.layers.iter().enumerate() {
            let name = format!("{}-{index}", format.tag());
            let expected = setup.path(&format!("{name}-expected"));
            std::fs::create_dir_all(&expected).unwrap();
            expected_layer_tree(&image.local_layer(index), &expected);
            let mount = SluiceMount::start(
                &image.reference,
                index,
                &setup.path(&format!("{name}-cache")),
                &setup.path(&format!("{name}-mnt")),
                &[],
            );
            let diff = compare_trees(&expected, &mount.mountpoint);
            assert!(
                diff.is_empty(),
                "{} layer {index}: mount differs from tar -x: {diff}",
                image.reference
            );
            mount.stop();
        }
    }
}

/// Done-when 2: one small file from a fresh mount, background streaming off, costs
/// under 5 % of the layer's bytes, counted in the registry's access log.
#[test]
fn small_read_transfers_a_small_fraction_of_the_layer() {
    let setup = setup(RegistryOptions::default());
    for format in [ImageFormat::Estargz, ImageFormat::ZstdChunked] {
        let image = setup.publish(format);
        let layer = &image.layers[0];
        let mark = setup.registry.mark();
        let mount = SluiceMount::start(
            &image.reference,
            0,
            &setup.path(&format!("{}-cache", format.tag())),
            &setup.path(&format!("{}-mnt", format.tag())),
            &["--no-background"],
        );
        let before_read = setup.registry.mark();
        assert_eq!(
            read_file(&mount.path("etc/hostname")).unwrap(),
            b"sluice-test\n"
        );
        // A cold read of one small file is one range request, no more.
        let read_requests = setup
            .registry
            .records_since(before_read)
            .iter()
            .filter(|r| r.blob_digest() == Some(layer.digest.as_str()))
            .count();
        assert_eq!(
            read_requests, 1,
            "{format:?}: the read took {read_requests} requests"
        );
        let served = setup.registry.blob_bytes_since(mark, &layer.digest);
        mount.stop();
        let limit = layer.size / 20;
        assert!(
            served > 0,
            "nothing was fetched from the registry for the layer"
        );
        assert!(
            served < limit,
            "{format:?}: reading one small file fetched {served} of the layer's {} bytes (limit {limit})",
            layer.size
        );
        eprintln!(
            "{format:?}: one small file cost {served} bytes of a {}-byte layer",
            layer.size
        );
    }
}

/// Done-when 3: a chunk the registry tampers with fails with EIO and a clear message,
/// is not cached, and other files still read; once the registry serves the right bytes
/// the same file reads correctly on the same mount.
#[test]
fn tampered_chunk_fails_with_eio_and_is_not_cached() {
    let setup = setup(RegistryOptions::default());
    let image = setup.publish(ImageFormat::Estargz);
    let proxy = TestProxy::start(setup.registry.addr());
    let layer = &image.layers[0];
    let chunks = chunks_of(&image.local_layer(0), "data/big.bin");
    assert!(chunks.len() > 10, "big.bin should have many chunks");
    let bad = &chunks[5];
    let start = bad.compressed_offset.0 + bad.compressed_size / 2;
    proxy.corrupt_blob_range(&layer.digest, start..start + 16);

    let reference = image
        .reference
        .replace(&setup.registry.host(), &proxy.host());
    let cache = setup.path("cache");
    let mount = SluiceMount::start(
        &reference,
        0,
        &cache,
        &setup.path("mnt"),
        &["--no-background"],
    );
    let big = mount.path("data/big.bin");

    for attempt in 0..2 {
        let error = read_file(&big).expect_err("reading a tampered chunk must fail");
        assert_eq!(
            error.raw_os_error(),
            Some(libc::EIO),
            "attempt {attempt}: {error}"
        );
        drop_page_cache();
    }
    let bad_chunk_file = cache
        .join("chunks")
        .join(&bad.digest.hex()[..2])
        .join(bad.digest.hex());
    assert!(
        !bad_chunk_file.exists(),
        "a chunk that failed verification was cached"
    );
    assert_eq!(
        read_file(&mount.path("etc/hostname")).unwrap(),
        b"sluice-test\n"
    );
    let log = mount.log_text();
    assert!(
        log.contains("data/big.bin"),
        "the error log does not name the file:\n{log}"
    );

    proxy.clear_corruption();
    drop_page_cache();
    let bytes = read_file(&big).expect("after the registry is fixed the file reads");
    let original = chunks.iter().map(|c| c.size).sum::<u64>();
    assert_eq!(bytes.len() as u64, original);
    for chunk in &chunks {
        let start = chunk.file_offset.0 as usize;
        let data = &bytes[start..start + chunk.size as usize];
        assert!(
            chunk.digest.matches(data),
            "big.bin at {start} does not match its chunk digest"
        );
    }
    assert!(
        bad_chunk_file.exists(),
        "the good chunk should be cached now"
    );
    mount.stop();
}

/// Done-when 4: basic auth with credentials from a docker config.json works; wrong
/// credentials fail with an error that names the registry.
#[test]
fn basic_auth_from_docker_config() {
    let setup = setup(RegistryOptions {
        htpasswd: Some(("sluice".into(), "s3cret-pass".into())),
        ..RegistryOptions::default()
    });
    let image = setup.publish(ImageFormat::Estargz);
    let host = setup.registry.host();
    let write_config = |name: &str, user: &str, password: &str| {
        use base64::Engine as _;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let path = setup.path(name);
        std::fs::write(
            &path,
            format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#),
        )
        .unwrap();
        path
    };
    let good = write_config("good.json", "sluice", "s3cret-pass");
    let bad = write_config("bad.json", "sluice", "wrong");

    let mount = SluiceMount::start(
        &image.reference,
        0,
        &setup.path("cache"),
        &setup.path("mnt"),
        &["--no-background", "--docker-config", good.to_str().unwrap()],
    );
    assert_eq!(
        read_file(&mount.path("etc/config")).unwrap(),
        b"version=1\n"
    );
    mount.stop();

    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "inspect",
            &image.reference,
            "--docker-config",
            bad.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "inspect with wrong credentials succeeded"
    );
    assert!(
        stderr.contains(&host),
        "error does not name the registry {host}:\n{stderr}"
    );
    assert!(
        !stderr.contains("wrong"),
        "error leaks the password:\n{stderr}"
    );
}

/// Done-when 5: with the registry stopped, uncached reads fail within the timeout,
/// cached ones keep working, and after a restart new reads succeed on the same mount.
#[test]
fn registry_outage_fails_fast_and_recovers() {
    let setup = setup(RegistryOptions::default());
    let image = setup.publish(ImageFormat::Estargz);
    let mount = SluiceMount::start(
        &image.reference,
        0,
        &setup.path("cache"),
        &setup.path("mnt"),
        &["--no-background", "--read-timeout", "3"],
    );
    assert_eq!(
        read_file(&mount.path("etc/hostname")).unwrap(),
        b"sluice-test\n"
    );

    setup.registry.stop();
    drop_page_cache();
    assert_eq!(
        read_file(&mount.path("etc/hostname")).unwrap(),
        b"sluice-test\n",
        "cached file must still read"
    );
    let started = Instant::now();
    let error = read_file(&mount.path("data/small/f100.txt"))
        .expect_err("uncached read with registry down");
    assert_eq!(error.raw_os_error(), Some(libc::EIO), "{error}");
    // Generous bound: the point is "fails, does not hang"; timing itself is benchmarked.
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the read hung for {:?}",
        started.elapsed()
    );

    setup.registry.restart();
    let bytes =
        read_file(&mount.path("data/small/f100.txt")).expect("read after the registry is back");
    assert!(!bytes.is_empty());
    mount.stop();
}

//! `sluice profile`: a recorded run through the real sluice-snapshotter and containerd
//! finds files static analysis cannot, and `sluice convert --prefetch FILE` puts them
//! first.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::containerd::{ContainerdOptions, TestContainerd};
use common::images::build_image;
use common::registry::{RegistryOptions, TestRegistry};
use common::snapshotter::SnapshotterDaemon;

const NAMESPACE: &str = "profile";

/// Field order is drop order: containerd (its shims and mounts) before the snapshotter.
struct Rig {
    containerd: TestContainerd,
    snapshotter: SnapshotterDaemon,
    registry: TestRegistry,
}

impl Rig {
    fn start() -> Rig {
        assert!(
            common::have_root_and_fuse(),
            "integration tests need root and /dev/fuse"
        );
        let registry = TestRegistry::start(RegistryOptions::default());
        // Background streaming would put every file in the cache, but recording sees
        // opens and reads, not fetches: keep it off so the run is what reaches FUSE.
        let snapshotter = SnapshotterDaemon::start("[fs]\nbackground_fetch = false\n");
        let containerd = TestContainerd::start(ContainerdOptions {
            proxy_snapshotter: Some(("sluice".into(), snapshotter.socket())),
            ..ContainerdOptions::default()
        });
        Rig {
            containerd,
            snapshotter,
            registry,
        }
    }

    fn ctr(&self, args: &[&str]) -> String {
        let mut all = vec!["--namespace", NAMESPACE];
        all.extend_from_slice(args);
        self.containerd
            .ctr(&all)
            .unwrap_or_else(|e| panic!("ctr {args:?}: {e}"))
    }
}

/// The recording hook of one FUSE mount, without containerd: opens and reads count,
/// each file once, in order, also when the page cache serves the content; stat,
/// listings and symlinks do not; other layers and times outside a recording do not.
#[test]
fn a_mount_records_first_opens_and_reads_only_while_recording() {
    use sluice::cache::testing::{LayerBuilder, MemoryBlobSource};
    use sluice::cache::{CacheOptions, ChunkCache, Layer};
    use sluice::digest::Digest;
    use sluice::format::LayerFormat;
    use sluice::fs::{FsOptions, mount_layer};
    use sluice::profile::Recorder;
    use sluice::registry::BlobSource;
    use std::sync::Arc;

    assert!(
        common::have_root_and_fuse(),
        "integration tests need root and /dev/fuse"
    );
    let mut builder = LayerBuilder::new(LayerFormat::Estargz);
    builder.file("a", 0o644, b"first file", 4096);
    builder.file("b", 0o644, b"second file", 4096);
    builder.dir("d", 0o755);
    builder.file("d/c", 0o644, b"third file", 4096);
    builder.symlink("link", "a");
    let (index, blob) = builder.build();
    let source = Arc::new(MemoryBlobSource::new(blob));
    let digest = source.digest().clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let mountpoint = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(
        CacheOptions {
            dir: cache_dir.path().to_path_buf(),
            ..CacheOptions::default()
        },
        Arc::default(),
    )
    .unwrap();
    let recorder = Arc::new(Recorder::new());
    let mount = mount_layer(
        Layer::new("test.local/profile sha256:layer", Arc::new(index), source),
        cache,
        runtime.handle().clone(),
        mountpoint.path(),
        FsOptions {
            recorder: Some(Arc::clone(&recorder)),
            ..FsOptions::default()
        },
    )
    .expect("mounting needs root and /dev/fuse");
    let path = |name: &str| mountpoint.path().join(name);

    // Read before any recording: the page cache then holds it.
    assert_eq!(std::fs::read(path("a")).unwrap(), b"first file");
    let other = recorder
        .start(vec![Digest::sha256_of(b"another layer")])
        .unwrap();
    let id = recorder.start(vec![digest]).unwrap();
    std::fs::metadata(path("b")).unwrap();
    std::fs::read_dir(mountpoint.path()).unwrap().for_each(drop);
    std::fs::read_link(path("link")).unwrap();
    assert_eq!(std::fs::read(path("d/c")).unwrap(), b"third file");
    assert_eq!(std::fs::read(path("link")).unwrap(), b"first file");
    assert_eq!(std::fs::read(path("d/c")).unwrap(), b"third file");
    drop(std::fs::File::open(path("b")).unwrap());
    let recording = recorder.stop(id).unwrap();
    let other = recorder.stop(other).unwrap();
    // Outside a recording nothing is kept.
    std::fs::read(path("b")).unwrap();
    mount.unmount().unwrap();

    let paths: Vec<&str> = recording.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, vec!["/d/c", "/a", "/b"]);
    assert!(other.files.is_empty(), "{other:?}");
    assert!(!recorder.is_recording());
}

fn sluice(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run sluice")
}

fn sluice_ok(args: &[&str]) -> String {
    let out = sluice(args);
    assert!(
        out.status.success(),
        "sluice {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn convert(layout: &Path, reference: &str, prefetch: &str) {
    sluice_ok(&[
        "convert",
        &format!("oci:{}", layout.display()),
        reference,
        "--prefetch",
        prefetch,
    ]);
}

/// `sluice inspect --prefetch`: each layer's prefetched files, in blob order.
fn prefetched_per_layer(reference: &str) -> Vec<Vec<String>> {
    let text = sluice_ok(&["inspect", "--prefetch", reference]);
    let mut layers: Vec<Vec<String>> = Vec::new();
    for line in text.lines() {
        if line.starts_with("layer ") {
            layers.push(Vec::new());
        } else if let Some(path) = line.strip_prefix("    /") {
            layers
                .last_mut()
                .expect("a prefetch line follows a layer line")
                .push(format!("/{path}"));
        }
    }
    layers
}

fn position(list: &[String], path: &str) -> usize {
    list.iter()
        .position(|p| p == path)
        .unwrap_or_else(|| panic!("{path} is not in the list: {list:?}"))
}

#[test]
fn a_recorded_run_finds_files_static_analysis_cannot_and_convert_puts_them_first() {
    let rig = Rig::start();
    let image = build_image("profile");
    let host = rig.registry.host();
    let plain = format!("{host}/sluice/profile:none");
    convert(&image.layout_dir, &plain, "none");

    // The static list, as `--prefetch entrypoint` computes it, for comparison.
    let static_ref = format!("{host}/sluice/profile:entrypoint");
    convert(&image.layout_dir, &static_ref, "entrypoint");
    let static_files: Vec<String> = prefetched_per_layer(&static_ref).concat();
    assert!(
        static_files.contains(&"/usr/bin/start".to_owned()),
        "{static_files:?}"
    );
    assert!(
        !static_files.contains(&"/data/ab.txt".to_owned()),
        "static analysis was not supposed to see the computed path: {static_files:?}"
    );

    let work = common::short_tempdir("sluice-prof-");
    let list_path = work.path().join("prefetch.txt");
    let address = rig.containerd.socket();
    let socket = rig.snapshotter.socket();
    let out = sluice(&[
        "profile",
        &plain,
        "--wait-line",
        "ready",
        "--timeout",
        "120",
        "--out",
        list_path.to_str().unwrap(),
        "--snapshotter-socket",
        socket.to_str().unwrap(),
        "--address",
        address.to_str().unwrap(),
        "--namespace",
        NAMESPACE,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "sluice profile failed:\n{stderr}\nsnapshotter log:\n{}",
        rig.snapshotter.log()
    );
    assert!(stderr.contains("printed the wait line"), "{stderr}");
    eprintln!("{stderr}");
    let text = std::fs::read_to_string(&list_path).expect("profile wrote the list");
    let list: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(str::to_owned)
        .collect();
    eprintln!("{text}");

    // Recorded in first-read order: the script, the shell it names, then the file
    // whose name the script computes.
    let start = position(&list, "/usr/bin/start");
    let shell = position(&list, "/bin/busybox");
    let data = position(&list, "/data/ab.txt");
    assert!(start < data && shell < data, "{list:?}");
    assert!(
        !list.contains(&"/data/never.txt".to_owned()),
        "a file never read was listed: {list:?}"
    );
    for file in &static_files {
        assert!(list.contains(file), "static file {file} missing: {list:?}");
    }
    let unique: std::collections::HashSet<&String> = list.iter().collect();
    assert_eq!(unique.len(), list.len(), "a path is listed twice: {list:?}");

    // Nothing of the run is left in containerd.
    assert_eq!(rig.ctr(&["containers", "ls", "-q"]).trim(), "");
    let snapshots = rig.ctr(&["snapshots", "--snapshotter", "sluice", "ls"]);
    assert!(
        !snapshots.contains("sluice-profile-"),
        "the run's snapshot was left behind:\n{snapshots}"
    );

    // Converting with the list puts the recorded files first, in the recorded order.
    let recorded_ref = format!("{host}/sluice/profile:recorded");
    convert(
        &image.layout_dir,
        &recorded_ref,
        list_path.to_str().unwrap(),
    );
    let layers = prefetched_per_layer(&recorded_ref);
    assert_eq!(layers.len(), 3, "{layers:?}");
    assert_eq!(layers[0].first().map(String::as_str), Some("/bin/busybox"));
    let top = &layers[2];
    assert!(
        position(top, "/usr/bin/start") < position(top, "/data/ab.txt"),
        "{top:?}"
    );
    assert!(!top.contains(&"/data/never.txt".to_owned()), "{top:?}");

    // `convert --prefetch record` does the three steps itself.
    let auto_ref = format!("{host}/sluice/profile:auto");
    sluice_ok(&[
        "convert",
        &format!("oci:{}", image.layout_dir.display()),
        &auto_ref,
        "--prefetch",
        "record",
        "--wait-line",
        "ready",
        "--timeout",
        "120",
        "--snapshotter-socket",
        socket.to_str().unwrap(),
        "--address",
        address.to_str().unwrap(),
        "--namespace",
        NAMESPACE,
    ]);
    let layers = prefetched_per_layer(&auto_ref);
    let top = &layers[2];
    assert!(
        position(top, "/usr/bin/start") < position(top, "/data/ab.txt"),
        "{top:?}"
    );
    assert!(!top.contains(&"/data/never.txt".to_owned()), "{top:?}");
    let images = rig.ctr(&["images", "ls", "-q"]);
    assert!(
        !images.lines().any(|l| l == auto_ref),
        "the profiled intermediate image was left in containerd:\n{images}"
    );
}

#[test]
fn profile_says_when_containerd_is_not_reachable() {
    let dir = common::short_tempdir("sluice-prof-");
    let out = sluice(&[
        "profile",
        "127.0.0.1:1/none:latest",
        "--snapshotter-socket",
        dir.path().join("absent.sock").to_str().unwrap(),
        "--address",
        dir.path().join("containerd.sock").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("containerd") && stderr.contains("not reachable"),
        "{stderr}"
    );
}

#[test]
fn convert_prefetch_record_needs_a_registry_destination() {
    let dir = common::short_tempdir("sluice-prof-");
    let out = sluice(&[
        "convert",
        &format!("oci:{}", dir.path().join("src").display()),
        &format!("oci:{}", dir.path().join("dst").display()),
        "--prefetch",
        "record",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("registry") && stderr.contains("sluice profile"),
        "{stderr}"
    );
    assert!(!dir.path().join("dst").exists());
}

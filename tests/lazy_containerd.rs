//! Lazy layers through containerd: the real sluice-snapshotter as containerd 1.6's
//! proxy snapshotter, eStargz images from the real registry, containers run by runc.

mod common;

use common::containerd::{ContainerdOptions, TestContainerd};
use common::images::{ImageFormat, PushedImage, publish};
use common::registry::{RegistryOptions, TestRegistry};
use common::snapshotter::SnapshotterDaemon;

const NAMESPACE: &str = "lazy";

/// Field order is drop order: containerd (its shims and mounts) before the snapshotter.
struct Rig {
    containerd: TestContainerd,
    snapshotter: SnapshotterDaemon,
    registry: TestRegistry,
}

impl Rig {
    fn start(config: &str) -> Rig {
        assert!(
            common::have_root_and_fuse(),
            "integration tests need root and /dev/fuse"
        );
        let snapshotter = SnapshotterDaemon::start(config);
        let containerd = TestContainerd::start(ContainerdOptions {
            proxy_snapshotter: Some(("sluice".into(), snapshotter.socket())),
            ..ContainerdOptions::default()
        });
        Rig {
            containerd,
            snapshotter,
            registry: TestRegistry::start(RegistryOptions::default()),
        }
    }

    fn publish(&self, name: &str, format: ImageFormat) -> PushedImage {
        publish(&self.containerd, &self.registry, name, format)
    }

    /// `ctr --namespace lazy ARGS`; a namespace apart from the one images were
    /// published from, so nothing is already in its content store.
    fn ctr(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["--namespace", NAMESPACE];
        all.extend_from_slice(args);
        self.containerd.ctr(&all)
    }

    /// stargz-snapshotter's own lazy pull client, pointed at sluice.
    fn try_rpull(&self, reference: &str) -> Result<String, String> {
        self.containerd.ctr_remote(&[
            "--namespace",
            NAMESPACE,
            "images",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "sluice",
            reference,
        ])
    }

    fn rpull(&self, reference: &str) {
        let out = self.try_rpull(reference);
        if let Err(error) = out {
            panic!(
                "rpull {reference}: {error}\nsnapshotter log:\n{}",
                self.snapshotter.log()
            );
        }
    }

    fn run(&self, reference: &str, id: &str, command: &[&str]) -> String {
        let mut args = vec!["run", "--rm", "--snapshotter", "sluice", reference, id];
        args.extend_from_slice(command);
        self.ctr(&args).unwrap_or_else(|e| {
            panic!(
                "ctr run {reference}: {e}\nsnapshotter log:\n{}",
                self.snapshotter.log()
            )
        })
    }

    fn layers_total(image: &PushedImage) -> u64 {
        image.layers.iter().map(|l| l.size).sum()
    }
}

/// An eStargz image pulled lazily runs, and the registry served fewer bytes than the
/// image's layers hold: the layers were mounted, not downloaded.
#[test]
fn estargz_image_runs_before_it_is_downloaded() {
    let rig = Rig::start("[fs]\nbackground_fetch = false\n");
    let image = rig.publish("app", ImageFormat::Estargz);
    let mark = rig.registry.mark();
    rig.rpull(&image.reference);
    let output = rig.run(&image.reference, "lazy-run", &[]);
    assert!(
        output.contains("hello from sluice"),
        "unexpected output: {output}"
    );
    let served = rig.registry.since(mark).bytes;
    let total = Rig::layers_total(&image);
    assert!(
        served < total,
        "the registry served {served} bytes, not less than the layers' {total}: the pull was not lazy"
    );
    // The layers are FUSE mounts of sluice, not unpacked directories.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = rig.snapshotter.root();
    let fuse_mounts = mounts
        .lines()
        .filter(|l| l.contains(root.to_str().unwrap()) && l.contains(" - fuse"))
        .count();
    assert_eq!(
        fuse_mounts,
        image.layers.len(),
        "one FUSE mount per layer expected:\n{mounts}"
    );
    eprintln!("lazy run: registry served {served} of {total} layer bytes");
}

/// After a restart the daemon mounts its remote layers again from what it kept — also
/// while the registry is down — and the image runs without a new pull.
#[test]
fn remote_layers_survive_a_restart_even_with_the_registry_down() {
    let mut rig = Rig::start("");
    let image = rig.publish("busybox", ImageFormat::Estargz);
    rig.rpull(&image.reference);
    assert!(
        rig.run(&image.reference, "before", &[])
            .contains("hello from sluice")
    );

    // What the first run read is in the chunk cache; the rest of the image is not
    // needed for the second run. Cut the registry.
    let cache = rig.snapshotter.cache_dir().join("chunks");
    assert!(
        std::fs::read_dir(&cache)
            .map(|d| d.count() > 0)
            .unwrap_or(false),
        "nothing reached the chunk cache in {}",
        cache.display()
    );
    rig.registry.stop();

    rig.snapshotter.stop();
    rig.snapshotter.spawn();
    let log = rig.snapshotter.log();
    assert!(
        !log.contains("remote layer not restored"),
        "restore failed:\n{log}"
    );
    // containerd reconnects to the proxy with a back-off; retry the run until it does.
    let mut output = String::new();
    let ran = common::wait_until(std::time::Duration::from_secs(60), || {
        match rig.ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "sluice",
            &image.reference,
            "after",
            "/bin/sh",
            "-c",
            "cat /etc/motd 2>/dev/null; echo restarted-ok",
        ]) {
            Ok(out) => {
                output = out;
                true
            }
            Err(_) => false,
        }
    });
    assert!(
        ran,
        "the image did not run after the restart:\n{}",
        rig.snapshotter.log()
    );
    assert!(output.contains("restarted-ok"), "{output}");
    let images = rig.ctr(&["images", "ls", "-q"]).unwrap();
    assert!(
        images.contains(&image.reference),
        "image record lost: {images}"
    );
}

/// Files before a layer's `.prefetch.landmark` are fetched before Prepare returns: the
/// container's start then reads them without asking the registry.
#[test]
fn prefetch_list_is_fetched_before_the_pull_returns() {
    let rig = Rig::start("[fs]\nbackground_fetch = false\n");
    let original = rig.publish("app", ImageFormat::Gzip);
    let work = common::short_tempdir("sluice-pf-");
    let record = work.path().join("record.json");
    let files = ["bin/busybox", "usr/bin/hello", "etc/passwd", "etc/group"];
    let lines: Vec<String> = files
        .iter()
        .map(|f| format!(r#"{{"path":"{f}"}}"#))
        .collect();
    std::fs::write(&record, lines.join("\n")).unwrap();
    let reference = format!("{}/sluice/app:prefetch", rig.registry.host());
    rig.containerd
        .ctr_remote(&[
            "images",
            "convert",
            "--oci",
            "--estargz",
            "--estargz-record-in",
            record.to_str().unwrap(),
            "sluice.test/app:latest",
            &reference,
        ])
        .expect("ctr-remote convert with a prefetch record");
    rig.containerd
        .ctr(&["images", "push", "--plain-http", &reference])
        .expect("push the prefetch image");
    assert!(!original.layers.is_empty());

    let before_pull = rig.registry.mark();
    rig.rpull(&reference);
    let during_pull = rig.registry.since(before_pull).bytes;
    let before_run = rig.registry.mark();
    let output = rig.run(&reference, "prefetched", &[]);
    assert!(
        output.contains("hello from sluice"),
        "unexpected output: {output}"
    );
    let during_run = rig.registry.since(before_run).bytes;
    eprintln!("prefetch: {during_pull} bytes during the pull, {during_run} while running");
    // busybox alone is several hundred KiB compressed: the pull must have fetched it.
    assert!(
        during_pull > 300_000,
        "only {during_pull} bytes during the pull: nothing prefetched"
    );
    assert!(
        during_run * 20 < during_pull,
        "the run still fetched {during_run} bytes after a {during_pull}-byte prefetch"
    );
}

/// kill -9 of the daemon in the middle of a lazy pull (after its first layer is mounted),
/// then a restart: the pull can be repeated and the image runs.
#[test]
fn kill_during_a_lazy_pull_then_the_pull_repeats() {
    let mut rig = Rig::start("[fs]\nbackground_fetch = false\n");
    let image = rig.publish("app", ImageFormat::Estargz);
    let mut pull = std::process::Command::new("ctr-remote")
        .arg("--address")
        .arg(rig.containerd.socket())
        .args(["--namespace", NAMESPACE, "images", "rpull", "--plain-http"])
        .args(["--snapshotter", "sluice", &image.reference])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn ctr-remote rpull");
    let root = rig.snapshotter.root();
    let mounted = common::wait_until(std::time::Duration::from_secs(60), || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains(root.to_str().unwrap()) && l.contains(" - fuse"))
    });
    assert!(mounted, "no layer was mounted:\n{}", rig.snapshotter.log());
    rig.snapshotter.kill9();
    let _ = pull.wait();

    rig.snapshotter.spawn();
    let mut output = String::new();
    let repeated = common::wait_until(std::time::Duration::from_secs(90), || {
        let pulled = rig.try_rpull(&image.reference).is_ok();
        pulled
            && match rig.ctr(&[
                "run",
                "--rm",
                "--snapshotter",
                "sluice",
                &image.reference,
                "after-kill",
            ]) {
                Ok(out) => {
                    output = out;
                    true
                }
                Err(_) => false,
            }
    });
    assert!(
        repeated,
        "the pull did not succeed again after the restart:\n{}",
        rig.snapshotter.log()
    );
    assert!(output.contains("hello from sluice"), "{output}");
}

//! sluice-snapshotter against the real thing: the built daemon, a private containerd 1.6
//! using it as `[proxy_plugins.sluice]`, and a real registry serving an offline-built
//! busybox image.
//!
//! Every test starts its own snapshotter first (containerd connects to proxy plugins
//! when it loads them), then containerd, then the registry. Images are published from
//! the harness namespace and pulled into the `pull` namespace, so with containerd's
//! isolated content sharing every pull really downloads and unpacks.

mod common;

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::containerd::{ContainerdOptions, TestContainerd};
use common::images::{ImageFormat, PushedImage, publish};
use common::registry::{RegistryOptions, TestRegistry};
use common::snapshotter::SnapshotterDaemon;
use common::{run_command, short_tempdir, wait_until};
use regex::Regex;
use sluice::api::containerd::services::snapshots::v1 as api;
use sluice::api::containerd::services::snapshots::v1::snapshots_client::SnapshotsClient;

const PULL_NAMESPACE: &str = "pull";
const SNAPSHOTTER: &str = "sluice";

/// Drop order matters: containerd (and its shims and mounts) first, then the
/// snapshotter, then the registry.
struct Rig {
    containerd: TestContainerd,
    snapshotter: SnapshotterDaemon,
    registry: TestRegistry,
}

impl Rig {
    fn start() -> Rig {
        let snapshotter = SnapshotterDaemon::start("");
        let containerd = TestContainerd::start(ContainerdOptions {
            proxy_snapshotter: Some((SNAPSHOTTER.to_owned(), snapshotter.socket())),
            ..ContainerdOptions::default()
        });
        let registry = TestRegistry::start(RegistryOptions::default());
        Rig {
            containerd,
            snapshotter,
            registry,
        }
    }

    fn publish(&self, name: &str) -> PushedImage {
        publish(&self.containerd, &self.registry, name, ImageFormat::Gzip)
    }

    /// `ctr --namespace pull ARGS`.
    fn ctr(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["--namespace", PULL_NAMESPACE];
        all.extend_from_slice(args);
        self.containerd.ctr(&all)
    }

    /// `ctr --namespace pull snapshots --snapshotter NAME ARGS`, which must succeed.
    fn snapshots(&self, snapshotter: &str, args: &[&str]) -> String {
        let mut all = vec!["snapshots", "--snapshotter", snapshotter];
        all.extend_from_slice(args);
        self.ctr(&all)
            .unwrap_or_else(|e| panic!("{e}\nsnapshotter log:\n{}", self.snapshotter.log()))
    }

    fn pull(&self, snapshotter: &str, reference: &str) -> Result<String, String> {
        self.ctr(&[
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            snapshotter,
            reference,
        ])
    }

    /// After the snapshotter restarts, containerd's client reconnects with a backoff;
    /// wait until a call really reaches the snapshotter (listings are answered from
    /// containerd's own metadata, so a prepare/remove probe is used).
    fn wait_reconnected(&self) {
        let mut attempt = 0;
        let ok = wait_until(Duration::from_secs(60), || {
            attempt += 1;
            let probe = format!("reconnect-probe-{attempt}");
            let prepared = self
                .ctr(&["snapshots", "--snapshotter", SNAPSHOTTER, "prepare", &probe])
                .is_ok();
            prepared
                && self
                    .ctr(&["snapshots", "--snapshotter", SNAPSHOTTER, "rm", &probe])
                    .is_ok()
        });
        assert!(ok, "containerd did not reach the restarted snapshotter");
    }

    /// containerd removes snapshots from a proxy snapshotter in its garbage collector,
    /// not when a container is deleted. Deleting an image with `--sync` runs a
    /// collection and waits for it.
    fn collect_garbage(&self, some_image: &str) {
        self.ctr(&[
            "images",
            "tag",
            "--force",
            some_image,
            "sluice.test/gc-trigger:latest",
        ])
        .unwrap();
        self.ctr(&["images", "rm", "--sync", "sluice.test/gc-trigger:latest"])
            .unwrap();
    }

    fn restart_snapshotter_gracefully(&mut self) {
        self.snapshotter.stop();
        self.snapshotter.spawn();
        self.wait_reconnected();
    }

    fn client(&self) -> Client {
        Client::connect(&self.snapshotter.socket())
    }
}

/// A tonic client of the generated API over the snapshotter's unix socket.
struct Client {
    runtime: tokio::runtime::Runtime,
    inner: SnapshotsClient<tonic::transport::Channel>,
}

impl Client {
    fn connect(socket: &Path) -> Client {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let socket = socket.to_owned();
        let channel = runtime
            .block_on(
                tonic::transport::Endpoint::from_static("http://[::1]:1").connect_with_connector(
                    tower::service_fn(move |_| {
                        let socket = socket.clone();
                        async move {
                            tokio::net::UnixStream::connect(socket)
                                .await
                                .map(hyper_util::rt::TokioIo::new)
                        }
                    }),
                ),
            )
            .expect("connect to snapshotter socket");
        Client {
            runtime,
            inner: SnapshotsClient::new(channel),
        }
    }

    fn prepare(
        &mut self,
        key: &str,
        parent: &str,
    ) -> Result<Vec<sluice::api::containerd::types::Mount>, tonic::Status> {
        let request = api::PrepareSnapshotRequest {
            key: key.into(),
            parent: parent.into(),
            ..Default::default()
        };
        let response = self.runtime.block_on(self.inner.prepare(request))?;
        Ok(response.into_inner().mounts)
    }

    fn commit(&mut self, name: &str, key: &str) -> Result<(), tonic::Status> {
        let request = api::CommitSnapshotRequest {
            name: name.into(),
            key: key.into(),
            ..Default::default()
        };
        self.runtime
            .block_on(self.inner.commit(request))
            .map(|_| ())
    }

    fn remove(&mut self, key: &str) -> Result<(), tonic::Status> {
        let request = api::RemoveSnapshotRequest {
            key: key.into(),
            ..Default::default()
        };
        self.runtime
            .block_on(self.inner.remove(request))
            .map(|_| ())
    }

    fn stat(&mut self, key: &str) -> Result<api::Info, tonic::Status> {
        let request = api::StatSnapshotRequest {
            key: key.into(),
            ..Default::default()
        };
        let response = self.runtime.block_on(self.inner.stat(request))?;
        Ok(response
            .into_inner()
            .info
            .expect("stat response carries info"))
    }

    fn mounts(
        &mut self,
        key: &str,
    ) -> Result<Vec<sluice::api::containerd::types::Mount>, tonic::Status> {
        let request = api::MountsRequest {
            key: key.into(),
            ..Default::default()
        };
        Ok(self
            .runtime
            .block_on(self.inner.mounts(request))?
            .into_inner()
            .mounts)
    }

    fn list(&mut self, filters: &[&str]) -> Result<Vec<api::Info>, tonic::Status> {
        let request = api::ListSnapshotsRequest {
            filters: filters.iter().map(|f| f.to_string()).collect(),
            ..Default::default()
        };
        self.runtime.block_on(async {
            let mut stream = self.inner.list(request).await?.into_inner();
            let mut infos = Vec::new();
            while let Some(batch) = stream.message().await? {
                infos.extend(batch.info);
            }
            Ok(infos)
        })
    }

    fn update(&mut self, info: api::Info, paths: &[&str]) -> Result<api::Info, tonic::Status> {
        let request = api::UpdateSnapshotRequest {
            info: Some(info),
            update_mask: Some(prost_types::FieldMask {
                paths: paths.iter().map(|p| p.to_string()).collect(),
            }),
            ..Default::default()
        };
        let response = self.runtime.block_on(self.inner.update(request))?;
        Ok(response
            .into_inner()
            .info
            .expect("update response carries info"))
    }
}

/// Replaces each snapshot directory by `<S>/#n`, numbering ids by first appearance, so
/// mount options from two snapshotters with different roots and ids compare equal.
fn normalize_paths(text: &str, snapshot_roots: &[PathBuf]) -> String {
    let mut text = text.to_owned();
    for root in snapshot_roots {
        text = text.replace(&format!("{}/", root.display()), "<S>/");
    }
    let ids = Regex::new(r"<S>/(\d+)").unwrap();
    let mut numbering: HashMap<String, usize> = HashMap::new();
    ids.replace_all(&text, |captures: &regex::Captures| {
        let next = numbering.len() + 1;
        let n = *numbering.entry(captures[1].to_owned()).or_insert(next);
        format!("<S>/#{n}")
    })
    .into_owned()
}

/// Drops timestamps (and the gc.root label, which holds one) and sorts `k=v,k=v` lists.
fn normalize_info(text: &str) -> String {
    let gc_root = Regex::new(r#"(containerd\.io/gc\.root"?[=:] ?"?)[0-9TZ:.-]+"#).unwrap();
    text.lines()
        .filter(|line| !line.contains("\"Created\"") && !line.contains("\"Updated\""))
        .map(|line| {
            let line = gc_root.replace_all(line, "${1}<time>").into_owned();
            if line.contains('=') && line.contains(',') && !line.contains(' ') {
                let mut items: Vec<&str> = line.split(',').collect();
                items.sort_unstable();
                items.join(",")
            } else {
                line.trim_end_matches(',').to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Mounts what `ctr snapshots mounts TARGET KEY` prints (`mount -t T S TARGET -o OPTS`).
fn mount_from_ctr(command_line: &str) {
    let words: Vec<&str> = command_line.split_whitespace().collect();
    assert_eq!(
        words.first(),
        Some(&"mount"),
        "unexpected mounts output: {command_line}"
    );
    run_command(Command::new("mount").args(&words[1..])).expect("mount the snapshot");
}

fn umount(target: &Path) {
    run_command(Command::new("umount").arg(target)).expect("unmount the snapshot");
}

fn layer_chain(rig: &Rig, snapshotter: &str) -> Vec<String> {
    rig.snapshots(snapshotter, &["ls"])
        .lines()
        .skip(1)
        .filter(|line| line.trim_end().ends_with("Committed"))
        .map(|line| line.split_whitespace().next().unwrap().to_owned())
        .collect()
}

/// The top layer of a pulled image: the committed snapshot nobody else names as parent.
fn top_layer(rig: &Rig, snapshotter: &str) -> String {
    let listing = rig.snapshots(snapshotter, &["ls"]);
    let rows: Vec<Vec<&str>> = listing
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    let parents: Vec<&str> = rows.iter().filter(|r| r.len() == 3).map(|r| r[1]).collect();
    rows.iter()
        .map(|r| r[0])
        .find(|key| !parents.contains(key))
        .unwrap_or_else(|| panic!("no top layer in\n{listing}"))
        .to_owned()
}

#[test]
fn pulled_image_runs() {
    let rig = Rig::start();
    let image = rig.publish("busybox");
    rig.pull(SNAPSHOTTER, &image.reference)
        .unwrap_or_else(|e| panic!("{e}\nsnapshotter log:\n{}", rig.snapshotter.log()));
    let output = rig
        .ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            SNAPSHOTTER,
            &image.reference,
            "run-hello",
        ])
        .unwrap_or_else(|e| panic!("{e}\nsnapshotter log:\n{}", rig.snapshotter.log()));
    assert_eq!(output.trim(), "hello from sluice");
    let output = rig
        .ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            SNAPSHOTTER,
            &image.reference,
            "run-cat",
            "/bin/cat",
            "/etc/group",
        ])
        .unwrap();
    assert_eq!(output, "root:x:0:\nnogroup:x:65534:\n");
    // Two image layers, committed, stored as two directories; the containers' writable
    // snapshots went away with --rm and containerd's garbage collection.
    assert_eq!(layer_chain(&rig, SNAPSHOTTER).len(), 2);
    rig.collect_garbage(&image.reference);
    assert_eq!(rig.snapshotter.snapshot_dirs(), ["1", "2"]);
}

#[test]
fn ctr_snapshots_commands_match_overlayfs() {
    let rig = Rig::start();
    let image = rig.publish("busybox");
    let roots = [
        rig.snapshotter.root().join("snapshots"),
        rig.containerd
            .root()
            .join("io.containerd.snapshotter.v1.overlayfs/snapshots"),
    ];
    let mut transcripts = Vec::new();
    for snapshotter in [SNAPSHOTTER, "overlayfs"] {
        rig.pull(snapshotter, &image.reference).unwrap();
        let mut transcript = Vec::new();
        let mut record = |title: &str, output: String| {
            transcript.push(format!(
                "## {title}\n{}",
                normalize_info(&normalize_paths(&output, &roots))
            ));
        };
        let top = top_layer(&rig, snapshotter);
        record("ls", rig.snapshots(snapshotter, &["ls"]));
        record("tree", rig.snapshots(snapshotter, &["tree"]));
        for layer in layer_chain(&rig, snapshotter) {
            record("info layer", rig.snapshots(snapshotter, &["info", &layer]));
        }
        record("usage", rig.snapshots(snapshotter, &["usage"]));

        rig.snapshots(snapshotter, &["prepare", "work", &top]);
        rig.snapshots(snapshotter, &["prepare", "scratch"]);
        let target = "/sluice-not-mounted";
        record(
            "mounts active",
            rig.snapshots(snapshotter, &["mounts", target, "work"]),
        );
        record(
            "mounts no parent",
            rig.snapshots(snapshotter, &["mounts", target, "scratch"]),
        );
        record(
            "label set",
            rig.snapshots(snapshotter, &["label", "work", "team=a", "tier=b"]),
        );
        record(
            "label clear",
            rig.snapshots(snapshotter, &["label", "work", "team="]),
        );
        record("info active", rig.snapshots(snapshotter, &["info", "work"]));
        record(
            "usage active",
            rig.snapshots(snapshotter, &["usage", "work"]),
        );
        record("ls with active", rig.snapshots(snapshotter, &["ls"]));
        record("tree with active", rig.snapshots(snapshotter, &["tree"]));
        // ctr gives views no gc.root label, so containerd may collect one as soon as
        // ctr exits: take its mounts from the creating command itself.
        record(
            "view",
            rig.snapshots(snapshotter, &["view", "--target", target, "look", &top]),
        );
        let refused = rig
            .ctr(&["snapshots", "--snapshotter", snapshotter, "rm", &top])
            .expect_err("removing a parent must fail");
        let reason = refused
            .lines()
            .find(|l| l.starts_with("ctr:"))
            .unwrap_or_default()
            .to_owned();
        record("rm parent", reason);
        rig.snapshots(snapshotter, &["rm", "work", "scratch"]);
        rig.collect_garbage(&image.reference);
        record("ls after rm", rig.snapshots(snapshotter, &["ls"]));
        transcripts.push(transcript.join("\n"));
    }
    assert_eq!(
        transcripts[0], transcripts[1],
        "sluice (left) and overlayfs (right) differ"
    );
    assert!(
        transcripts[0].contains("upperdir=<S>/#1/fs"),
        "{}",
        transcripts[0]
    );
    assert!(
        transcripts[0].contains("failed precondition"),
        "{}",
        transcripts[0]
    );
    // Removed snapshots' directories are gone, the layers' remain.
    assert_eq!(rig.snapshotter.snapshot_dirs(), ["1", "2"]);
}

#[test]
fn grpc_error_codes() {
    let rig = Rig::start();
    let mut client = rig.client();
    let code = |result: Result<(), tonic::Status>| result.expect_err("must fail").code();

    assert_eq!(code(client.stat("nope").map(|_| ())), tonic::Code::NotFound);
    assert_eq!(
        code(client.mounts("nope").map(|_| ())),
        tonic::Code::NotFound
    );
    assert_eq!(code(client.remove("nope")), tonic::Code::NotFound);
    assert_eq!(code(client.commit("x", "nope")), tonic::Code::NotFound);
    assert_eq!(
        code(client.prepare("orphan", "missing-parent").map(|_| ())),
        tonic::Code::NotFound
    );
    assert_eq!(
        code(client.prepare("", "").map(|_| ())),
        tonic::Code::InvalidArgument
    );

    let mounts = client.prepare("base", "").unwrap();
    assert_eq!(mounts.len(), 1);
    assert_eq!(mounts[0].r#type, "bind");
    assert_eq!(mounts[0].options, ["rw", "rbind"]);
    assert_eq!(
        code(client.prepare("base", "").map(|_| ())),
        tonic::Code::AlreadyExists
    );
    // An active snapshot cannot be a parent.
    assert_eq!(
        code(client.prepare("child", "base").map(|_| ())),
        tonic::Code::InvalidArgument
    );
    client.commit("layer", "base").unwrap();
    assert_eq!(
        code(client.commit("layer-again", "layer")),
        tonic::Code::FailedPrecondition
    );
    assert_eq!(
        code(client.mounts("layer").map(|_| ())),
        tonic::Code::FailedPrecondition
    );
    client.prepare("child", "layer").unwrap();
    assert_eq!(
        code(client.commit("layer", "child")),
        tonic::Code::AlreadyExists
    );
    assert_eq!(
        code(client.remove("layer")),
        tonic::Code::FailedPrecondition
    );

    let info = client.stat("child").unwrap();
    assert_eq!(info.kind, api::Kind::Active as i32);
    assert_eq!(info.parent, "layer");
    let mut changed = info.clone();
    changed
        .labels
        .insert("containerd.io/snapshot.ref".into(), "target".into());
    let updated = client
        .update(changed.clone(), &["labels.containerd.io/snapshot.ref"])
        .unwrap();
    assert_eq!(
        updated
            .labels
            .get("containerd.io/snapshot.ref")
            .map(String::as_str),
        Some("target")
    );
    assert_eq!(
        code(client.update(changed, &["parent"]).map(|_| ())),
        tonic::Code::InvalidArgument
    );
    // The filter containerd's metadata layer uses to find a remote snapshot.
    let found = client
        .list(&[r#"labels."containerd.io/snapshot.ref"==target,parent=="layer""#])
        .unwrap();
    assert_eq!(
        found.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
        ["child"]
    );
    let committed = client.list(&["kind==committed"]).unwrap();
    assert_eq!(
        committed
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>(),
        ["layer"]
    );
    assert_eq!(client.list(&[]).unwrap().len(), 2);
    assert_eq!(
        code(client.list(&["name=="]).map(|_| ())),
        tonic::Code::InvalidArgument
    );

    client.remove("child").unwrap();
    client.remove("layer").unwrap();
    assert!(client.list(&[]).unwrap().is_empty());
    assert!(rig.snapshotter.snapshot_dirs().is_empty());
}

#[test]
fn written_file_survives_restarts() {
    let mut rig = Rig::start();
    let image = rig.publish("busybox");
    rig.pull(SNAPSHOTTER, &image.reference).unwrap();
    let top = top_layer(&rig, SNAPSHOTTER);
    rig.snapshots(SNAPSHOTTER, &["prepare", "writable", &top]);
    let target = rig.containerd.scratch_dir("rootfs");
    let target_arg = target.to_string_lossy().into_owned();

    mount_from_ctr(&rig.snapshots(SNAPSHOTTER, &["mounts", &target_arg, "writable"]));
    assert_eq!(
        std::fs::read_to_string(target.join("etc/group")).unwrap(),
        "root:x:0:\nnogroup:x:65534:\n"
    );
    std::fs::write(target.join("root/note"), b"written before the restart\n").unwrap();
    umount(&target);

    rig.restart_snapshotter_gracefully();
    mount_from_ctr(&rig.snapshots(SNAPSHOTTER, &["mounts", &target_arg, "writable"]));
    assert_eq!(
        std::fs::read_to_string(target.join("root/note")).unwrap(),
        "written before the restart\n"
    );
    std::fs::write(target.join("root/second"), b"written before kill -9\n").unwrap();
    umount(&target);

    rig.snapshotter.kill9();
    rig.snapshotter.spawn();
    rig.wait_reconnected();
    mount_from_ctr(&rig.snapshots(SNAPSHOTTER, &["mounts", &target_arg, "writable"]));
    assert_eq!(
        std::fs::read_to_string(target.join("root/second")).unwrap(),
        "written before kill -9\n"
    );
    assert!(target.join("bin/busybox").exists());
    umount(&target);

    // A container started from the committed snapshot of that work sees the file.
    rig.snapshots(SNAPSHOTTER, &["commit", "with-note", "writable"]);
    // (prepare rather than view: ctr gives only prepared snapshots a gc.root label, so
    // a view could be garbage-collected before it is mounted.)
    rig.snapshots(SNAPSHOTTER, &["prepare", "check", "with-note"]);
    mount_from_ctr(&rig.snapshots(SNAPSHOTTER, &["mounts", &target_arg, "check"]));
    assert_eq!(
        std::fs::read_to_string(target.join("root/note")).unwrap(),
        "written before the restart\n"
    );
    umount(&target);
}

#[test]
fn kill_during_pull_leaves_consistent_store() {
    let mut rig = Rig::start();
    // The 52 MiB file in its bottom layer keeps containerd applying that layer long
    // enough to kill the snapshotter while it is being unpacked.
    let big = rig.publish("everything");
    let busybox = rig.publish("busybox");

    // Killed first as soon as the first Prepare touches the disk (around the metadata
    // transaction), then while containerd is writing a layer into a prepared snapshot.
    let snapshots_dir = rig.snapshotter.root().join("snapshots");
    interrupt_pull(&mut rig, &big.reference, "first prepare", || {
        std::fs::read_dir(&snapshots_dir).is_ok_and(|mut entries| entries.next().is_some())
    });
    assert_store_consistent(&rig);
    interrupt_pull(&mut rig, &big.reference, "unpacking", || {
        std::fs::read_dir(&snapshots_dir).is_ok_and(|entries| {
            entries.flatten().any(|entry| {
                std::fs::read_dir(entry.path().join("fs"))
                    .is_ok_and(|mut files| files.next().is_some())
            })
        })
    });
    assert_store_consistent(&rig);

    // The pull can be repeated, and its result is complete.
    rig.pull(SNAPSHOTTER, &big.reference)
        .unwrap_or_else(|e| panic!("{e}\nsnapshotter log:\n{}", rig.snapshotter.log()));
    let top = top_layer(&rig, SNAPSHOTTER);
    rig.snapshots(SNAPSHOTTER, &["prepare", "inspect", &top]);
    let target = rig.containerd.scratch_dir("inspect");
    let target_arg = target.to_string_lossy().into_owned();
    mount_from_ctr(&rig.snapshots(SNAPSHOTTER, &["mounts", &target_arg, "inspect"]));
    let big_file = std::fs::metadata(target.join("data/big.bin")).map(|m| m.len());
    let config = std::fs::read_to_string(target.join("etc/config"));
    umount(&target);
    assert_eq!(big_file.unwrap(), 52 * 1024 * 1024 + 12_345);
    assert_eq!(config.unwrap(), "version=2\n");

    // And a container runs on the restarted snapshotter.
    rig.pull(SNAPSHOTTER, &busybox.reference).unwrap();
    let output = rig
        .ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            SNAPSHOTTER,
            &busybox.reference,
            "after-crash",
        ])
        .unwrap();
    assert_eq!(output.trim(), "hello from sluice");
}

/// Starts pulling `reference`, kills the snapshotter with SIGKILL once `moment` holds,
/// waits for the pull to fail, and starts the snapshotter again.
fn interrupt_pull(rig: &mut Rig, reference: &str, what: &str, moment: impl FnMut() -> bool) {
    let mut pull = rig
        .containerd
        .ctr_command(&[
            "--namespace",
            PULL_NAMESPACE,
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            SNAPSHOTTER,
            reference,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ctr pull");
    let reached = wait_until_fast(Duration::from_secs(120), moment);
    rig.snapshotter.kill9();
    let pull_status = pull.wait().expect("wait for ctr pull");
    assert!(
        reached,
        "the pull never reached the moment to kill ({what})"
    );
    // The pull cannot finish without the snapshotter, which stays down until it exits.
    assert!(
        !pull_status.success(),
        "pull survived killing the snapshotter ({what})"
    );
    rig.snapshotter.spawn();
    rig.wait_reconnected();
}

/// Every snapshot's parent exists, every directory belongs to a snapshot (no temporary
/// or orphaned ones), and every active snapshot still mounts onto existing directories.
fn assert_store_consistent(rig: &Rig) {
    let mut client = rig.client();
    let infos = client.list(&[]).unwrap();
    let names: Vec<&str> = infos.iter().map(|i| i.name.as_str()).collect();
    for info in &infos {
        assert!(
            info.parent.is_empty() || names.contains(&info.parent.as_str()),
            "{} has a missing parent {}",
            info.name,
            info.parent
        );
        if info.kind == api::Kind::Active as i32 {
            let mounts = client.mounts(&info.name).unwrap();
            let upper = mounts[0]
                .options
                .iter()
                .find_map(|o| o.strip_prefix("upperdir="))
                .map_or_else(|| PathBuf::from(&mounts[0].source), PathBuf::from);
            assert!(
                upper.is_dir(),
                "{} has no directory {}",
                info.name,
                upper.display()
            );
        }
    }
    let dirs = rig.snapshotter.snapshot_dirs();
    assert_eq!(
        dirs.len(),
        infos.len(),
        "directories {dirs:?} vs snapshots {names:?}"
    );
    assert!(
        dirs.iter().all(|d| d.parse::<u64>().is_ok()),
        "leftover temporary directories: {dirs:?}"
    );
}

/// Like `wait_until`, polling every millisecond: used to catch a short-lived state.
fn wait_until_fast(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

#[test]
fn daemon_reads_config_and_rejects_unknown_keys() {
    let dir = short_tempdir("sluice-cfg-");
    let config = dir.path().join("config.toml");
    let binary = env!("CARGO_BIN_EXE_sluice-snapshotter");

    std::fs::write(&config, "[daemon]\nsockett = \"/tmp/x.sock\"\n").unwrap();
    let output = Command::new(binary)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("sockett"),
        "error does not name the key: {stderr}"
    );

    // Root and socket come from the file when no flags override them.
    let socket = dir.path().join("from-file/sluice.sock");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nroot = \"{}\"\nsocket = \"{}\"\n",
            dir.path().join("state").display(),
            socket.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(binary)
        .arg("--config")
        .arg(&config)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let listening = wait_until(Duration::from_secs(30), || {
        UnixStream::connect(&socket).is_ok()
    });
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
    let status = child.wait().unwrap();
    assert!(listening, "daemon did not listen on the configured socket");
    assert!(status.success(), "SIGINT shutdown exited with {status}");
    assert!(dir.path().join("state/metadata.redb").exists());
}

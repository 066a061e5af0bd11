//! `sluice pull` against the real thing: the built `sluice` CLI, the built
//! sluice-snapshotter daemon, a private containerd 1.6 using it as
//! `[proxy_plugins.sluice]`, and a real registry serving offline-built images.
//!
//! Images are published from the harness namespace and pulled into the `pull` namespace;
//! containerd's isolated content sharing makes every pull there really download.

mod common;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::containerd::{ContainerdOptions, TestContainerd, unmount_all_under};
use common::images::{ImageFormat, PushedImage, publish};
use common::registry::{RegistryOptions, TestRegistry};
use common::snapshotter::SnapshotterDaemon;
use common::tree::expected_layer_tree;
use common::{have_root_and_fuse, run_command, sha256_hex, short_tempdir, wait_until};
use futures::future::BoxFuture;
use sluice::snapshot::{
    OverlaySnapshotter, RemoteLayerError, RemoteLayerRequest, RemoteLayers, RemoteMount,
    RemoteSnapshot, SnapshotService,
};
use tempfile::TempDir;

const PULL_NAMESPACE: &str = "pull";
const SNAPSHOTTER: &str = "sluice";
/// What the busybox test image's default command prints.
const BUSYBOX_OUTPUT: &str = "hello from sluice";

/// Daemon configuration: no background streaming after a lazy mount, so the bytes the
/// registry serves are only what mounting and running needed.
const DAEMON_CONFIG: &str = "[fs]\nbackground_fetch = false\n";

/// Field order is drop order: containerd (with its shims and mounts) first, then the
/// snapshotter, then the registry.
struct Rig {
    containerd: TestContainerd,
    snapshotter: SnapshotterDaemon,
    registry: TestRegistry,
    /// An empty hosts directory, so no host configuration leaks into the test.
    hosts_dir: TempDir,
    /// The snapshotter's Prometheus endpoint.
    metrics: std::net::SocketAddr,
}

impl Rig {
    fn start() -> Rig {
        let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], common::free_port()));
        let snapshotter = SnapshotterDaemon::start(&format!(
            "{DAEMON_CONFIG}[metrics]\naddress = \"{metrics}\"\n"
        ));
        let containerd = TestContainerd::start(ContainerdOptions {
            proxy_snapshotter: Some((SNAPSHOTTER.to_owned(), snapshotter.socket())),
            ..ContainerdOptions::default()
        });
        let registry = TestRegistry::start(RegistryOptions::default());
        Rig {
            containerd,
            snapshotter,
            registry,
            hosts_dir: short_tempdir("sluice-hosts-"),
            metrics,
        }
    }

    /// Bytes the snapshotter says it fetched from registries, from its `/metrics`.
    fn fetched_bytes(&self) -> u64 {
        self.metric("sluice_on_demand_bytes_total") + self.metric("sluice_background_bytes_total")
    }

    /// One counter from the snapshotter's `/metrics`.
    fn metric(&self, name: &str) -> u64 {
        let (status, body) = common::http_get(self.metrics, "/metrics").expect("GET /metrics");
        assert_eq!(status, 200, "{body}");
        body.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{body}"))
    }

    /// `sluice pull` with the rig's containerd, `--namespace pull`, and `extra` args
    /// before the reference.
    fn sluice_pull(&self, reference: &str, extra: &[&str]) -> Output {
        sluice_pull_at(
            &self.containerd.socket(),
            reference,
            &[
                &["--hosts-dir", &self.hosts_dir.path().to_string_lossy()],
                extra,
            ]
            .concat(),
        )
    }

    /// `sluice pull` that must succeed; its stdout (the summary line).
    fn pull_ok(&self, reference: &str) -> String {
        let output = self.sluice_pull(reference, &[]);
        assert!(
            output.status.success(),
            "sluice pull {reference} failed with {}\nstderr:\n{}\nsnapshotter log:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            self.snapshotter.log()
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `ctr --namespace NS ARGS`, which must succeed.
    fn ctr_in(&self, namespace: &str, args: &[&str]) -> String {
        let mut all = vec!["--namespace", namespace];
        all.extend_from_slice(args);
        self.containerd
            .ctr(&all)
            .unwrap_or_else(|e| panic!("{e}\nsnapshotter log:\n{}", self.snapshotter.log()))
    }

    fn ctr(&self, args: &[&str]) -> String {
        self.ctr_in(PULL_NAMESPACE, args)
    }

    /// `(name, kind)` of every snapshot of the sluice snapshotter in `namespace`.
    fn snapshots_in(&self, namespace: &str) -> Vec<(String, String)> {
        let mut rows: Vec<(String, String)> = self
            .ctr_in(
                namespace,
                &["snapshots", "--snapshotter", SNAPSHOTTER, "ls"],
            )
            .lines()
            .skip(1)
            .filter_map(|line| {
                let words: Vec<&str> = line.split_whitespace().collect();
                Some((words.first()?.to_string(), words.last()?.to_string()))
            })
            .collect();
        rows.sort();
        rows
    }

    fn committed_snapshots(&self) -> Vec<String> {
        self.snapshots_in(PULL_NAMESPACE)
            .into_iter()
            .filter(|(_, kind)| kind == "Committed")
            .map(|(name, _)| name)
            .collect()
    }

    fn run_container(&self, reference: &str, id: &str) -> String {
        self.ctr(&["run", "--rm", "--snapshotter", SNAPSHOTTER, reference, id])
    }

    /// The labels of one content-store blob, as `ctr content ls` prints them.
    fn content_labels(&self, digest: &str) -> String {
        self.ctr(&["content", "ls"])
            .lines()
            .find(|line| line.starts_with(digest))
            .unwrap_or_else(|| panic!("{digest} is not in the content store"))
            .split_whitespace()
            .last()
            .unwrap_or_default()
            .to_owned()
    }
}

/// `sluice pull --address ADDRESS --namespace pull --plain-http EXTRA REFERENCE`, with
/// `--snapshotter sluice` unless `extra` names one.
fn sluice_pull_at(address: &Path, reference: &str, extra: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    command.arg("pull").arg("--address").arg(address).args([
        "--namespace",
        PULL_NAMESPACE,
        "--plain-http",
    ]);
    if !extra.contains(&"--snapshotter") {
        command.args(["--snapshotter", SNAPSHOTTER]);
    }
    command
        .args(extra)
        .arg(reference)
        .stdin(Stdio::null())
        .output()
        .expect("spawn sluice")
}

/// Chain ids computed here, independently of the library, from the config's diff ids.
fn expected_chain_ids(image: &PushedImage) -> Vec<String> {
    let mut chain: Vec<String> = Vec::new();
    for diff_id in &image.diff_ids {
        let next = match chain.last() {
            None => diff_id.clone(),
            Some(parent) => format!(
                "sha256:{}",
                sha256_hex(format!("{parent} {diff_id}").as_bytes())
            ),
        };
        chain.push(next);
    }
    chain
}

fn sorted(mut names: Vec<String>) -> Vec<String> {
    names.sort();
    names
}

/// Registry bytes served for the image's layer blobs since `mark`.
fn layer_bytes_since(
    registry: &mut TestRegistry,
    mark: common::registry::LogMark,
    image: &PushedImage,
) -> u64 {
    image
        .layers
        .iter()
        .map(|layer| registry.blob_bytes_since(mark, &layer.digest))
        .sum()
}

fn skip_without_root() -> bool {
    if have_root_and_fuse() {
        return false;
    }
    eprintln!("skipped: needs root and /dev/fuse");
    true
}

#[test]
fn gzip_image_pulls_runs_and_repulls_as_a_no_op() {
    if skip_without_root() {
        return;
    }
    let mut rig = Rig::start();
    let image = publish(&rig.containerd, &rig.registry, "busybox", ImageFormat::Gzip);
    let layers = image.layers.len();
    let chain = expected_chain_ids(&image);

    let mark = rig.registry.mark();
    let summary = rig.pull_ok(&image.reference);
    assert!(
        summary.contains(&format!(
            "{layers} layers: 0 mounted lazily, {layers} downloaded, 0 already present"
        )),
        "{summary}"
    );
    // The whole of every layer came from the registry (the snapshotter also reads the
    // tail of each, to see whether it can mount it lazily), and sluice says so.
    let total: u64 = image.layers.iter().map(|l| l.size).sum();
    assert!(layer_bytes_since(&mut rig.registry, mark, &image) >= total);
    assert!(
        summary.ends_with(&format!(
            "{} of layers fetched\n",
            indicatif::HumanBytes(total)
        )),
        "{summary}"
    );

    // The image record, the snapshots under their chain ids, and the config labelled with
    // the top one: what containerd's GC and `ctr run` look for.
    let images = rig.ctr(&["images", "ls", "-q"]);
    assert!(
        images.lines().any(|line| line == image.reference),
        "{images}"
    );
    assert_eq!(rig.committed_snapshots(), sorted(chain.clone()));
    assert!(
        rig.snapshots_in(PULL_NAMESPACE)
            .iter()
            .all(|(_, kind)| kind == "Committed"),
        "an active snapshot was left behind"
    );
    let config_labels = rig.content_labels(&image.config.digest);
    assert!(
        config_labels.contains(&format!(
            "containerd.io/gc.ref.snapshot.{SNAPSHOTTER}={}",
            chain.last().unwrap()
        )),
        "{config_labels}"
    );
    let manifest_labels = rig.content_labels(&image.manifest_digest);
    assert!(
        manifest_labels.contains(&format!(
            "containerd.io/gc.ref.content.config={}",
            image.config.digest
        )) && manifest_labels.contains(&format!(
            "containerd.io/gc.ref.content.l.0={}",
            image.layers[0].digest
        )),
        "{manifest_labels}"
    );

    // containerd's own pull with the same snapshotter names the snapshots identically.
    rig.ctr_in(
        "ctr-pull",
        &[
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            SNAPSHOTTER,
            &image.reference,
        ],
    );
    let by_ctr: Vec<String> = rig
        .snapshots_in("ctr-pull")
        .into_iter()
        .filter(|(_, kind)| kind == "Committed")
        .map(|(name, _)| name)
        .collect();
    assert_eq!(by_ctr, rig.committed_snapshots());

    assert_eq!(
        rig.run_container(&image.reference, "gzip-run").trim(),
        BUSYBOX_OUTPUT
    );
    // `ctr run` found the image unpacked: it made no snapshots of its own.
    assert_eq!(rig.committed_snapshots(), sorted(chain));

    let mark = rig.registry.mark();
    let again = rig.pull_ok(&image.reference);
    assert!(
        again.contains(&format!(
            "{layers} layers: 0 mounted lazily, 0 downloaded, {layers} already present"
        )),
        "{again}"
    );
    assert_eq!(layer_bytes_since(&mut rig.registry, mark, &image), 0);
    assert_eq!(
        rig.run_container(&image.reference, "gzip-rerun").trim(),
        BUSYBOX_OUTPUT
    );
}

/// eStargz and zstd:chunked layers are mounted lazily by sluice-snapshotter: the pull
/// downloads none of them, the image runs, and the registry serves less than the layers
/// hold. The `app` image is busybox plus 16 MiB its entrypoint never reads (running
/// busybox alone reads nearly all of busybox's layers).
#[test]
fn chunked_images_are_mounted_lazily_and_run() {
    if skip_without_root() {
        return;
    }
    let mut rig = Rig::start();
    for format in [ImageFormat::Estargz, ImageFormat::ZstdChunked] {
        let image = publish(&rig.containerd, &rig.registry, "app", format);
        let layers = image.layers.len();
        let total: u64 = image.layers.iter().map(|l| l.size).sum();

        let mark = rig.registry.mark();
        let fetched_before = rig.fetched_bytes();
        let summary = rig.pull_ok(&image.reference);
        assert!(
            summary.contains(&format!(
                "{layers} layers: {layers} mounted lazily, 0 downloaded, 0 already present; 0 B"
            )),
            "{format:?}: {summary}\nsnapshotter log:\n{}",
            rig.snapshotter.log()
        );
        // The variants share no layer, so each adds its own chain of snapshots.
        let committed = rig.committed_snapshots();
        assert!(
            expected_chain_ids(&image)
                .iter()
                .all(|chain_id| committed.contains(chain_id)),
            "{format:?}: {committed:?}"
        );
        let served = layer_bytes_since(&mut rig.registry, mark, &image);
        assert!(
            served < total,
            "{format:?}: the pull made the registry serve {served} layer bytes of {total}"
        );
        let id = format!("{}-run", format.tag());
        assert_eq!(
            rig.run_container(&image.reference, &id).trim(),
            BUSYBOX_OUTPUT,
            "{format:?}"
        );
        let served = layer_bytes_since(&mut rig.registry, mark, &image);
        assert!(
            served < total,
            "{format:?}: pull and run made the registry serve {served} layer bytes of {total}"
        );
        // The snapshotter's own account of what it fetched agrees with the registry's:
        // every layer byte served, plus at most what else was fetched (manifest, config).
        let fetched = rig.fetched_bytes() - fetched_before;
        let blob_bytes: u64 = rig
            .registry
            .records_since(mark)
            .iter()
            .filter(|r| r.method == "GET")
            .map(|r| r.bytes)
            .sum();
        assert!(
            (served..=blob_bytes).contains(&fetched),
            "{format:?}: /metrics counts {fetched} bytes fetched; the registry served \
             {served} layer bytes and {blob_bytes} bytes in all"
        );
        assert!(rig.metric("sluice_chunk_fetches_total") > 0, "{format:?}");
        // Nothing of the layers reached the content store.
        let content = rig.ctr(&["content", "ls", "-q"]);
        for layer in &image.layers {
            assert!(!content.contains(&layer.digest), "{format:?}: {content}");
        }
        let again = rig.pull_ok(&image.reference);
        assert!(
            again.contains(&format!("{layers} already present")),
            "{format:?}: {again}"
        );
    }
}

#[test]
fn containerd_not_running_is_named() {
    let dir = short_tempdir("sluice-nocd-");
    let socket = dir.path().join("containerd.sock");
    let output = sluice_pull_at(&socket, "127.0.0.1:1/sluice/busybox:gzip", &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "containerd at {} is not reachable: is containerd running?",
            socket.display()
        )),
        "{stderr}"
    );
}

#[test]
fn unknown_snapshotter_is_named_with_the_fix() {
    if skip_without_root() {
        return;
    }
    let rig = Rig::start();
    let output = rig.sluice_pull(
        &format!("{}/sluice/busybox:gzip", rig.registry.host()),
        &["--snapshotter", "nosuch"],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("snapshotter nosuch unknown to containerd")
            && stderr.contains("[proxy_plugins.nosuch]")
            && stderr.contains("sluice"),
        "{stderr}"
    );
}

#[test]
fn missing_tag_names_the_image() {
    if skip_without_root() {
        return;
    }
    let rig = Rig::start();
    let reference = format!("{}/sluice/busybox:no-such-tag", rig.registry.host());
    let output = rig.sluice_pull(&reference, &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&reference) && stderr.contains("not found"),
        "{stderr}"
    );
    assert!(rig.ctr(&["images", "ls", "-q"]).trim().is_empty());
}

/// A layer blob the registry no longer has: the error names it, and the pull leaves no
/// active snapshot and no image record behind.
#[test]
fn failed_layer_download_leaves_nothing_half_made() {
    if skip_without_root() {
        return;
    }
    let rig = Rig::start();
    let image = publish(&rig.containerd, &rig.registry, "busybox", ImageFormat::Gzip);
    let top = image.layers.last().unwrap();
    run_command(Command::new("curl").args([
        "-sS",
        "-f",
        "-X",
        "DELETE",
        &image.blob_url(&rig.registry.url(), &top.digest),
    ]))
    .expect("delete the top layer blob from the registry");

    let output = rig.sluice_pull(&image.reference, &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&image.reference)
            && stderr.contains(&format!("downloading layer {}", top.digest)),
        "{stderr}"
    );
    let snapshots = rig.snapshots_in(PULL_NAMESPACE);
    assert!(
        snapshots.iter().all(|(_, kind)| kind == "Committed"),
        "{snapshots:?}"
    );
    assert!(
        !snapshots
            .iter()
            .any(|(name, _)| name == expected_chain_ids(&image).last().unwrap()),
        "{snapshots:?}"
    );
    assert!(rig.ctr(&["images", "ls", "-q"]).trim().is_empty());
    let ingests = rig.ctr(&["content", "active"]);
    assert!(!ingests.contains("sluice-pull-"), "{ingests}");
}

/// Stands in for the lazy FUSE layers: "mounts" a layer by extracting the blob from a
/// local directory (never from the registry), and records what it was asked for.
#[derive(Default)]
struct LocalLayers {
    /// `sha256/` of a content store holding the blobs; set once containerd runs.
    blobs: Mutex<Option<PathBuf>>,
    /// `(layer digest, image reference, target)` of every request.
    requests: Mutex<Vec<(String, String, String)>>,
}

impl RemoteLayers for LocalLayers {
    fn prepare_remote<'a>(
        &'a self,
        request: &'a RemoteLayerRequest,
    ) -> BoxFuture<'a, Result<Option<RemoteMount>, RemoteLayerError>> {
        Box::pin(async move {
            self.requests.lock().unwrap().push((
                request.layer_digest.clone(),
                request.image_ref.clone(),
                request.target.clone(),
            ));
            let blobs = self.blobs.lock().unwrap().clone();
            let hex = request.layer_digest.trim_start_matches("sha256:");
            let Some(blob) = blobs.map(|dir| dir.join(hex)).filter(|b| b.exists()) else {
                return Ok(None);
            };
            let dir = request.mountpoint.clone();
            let target = dir.clone();
            tokio::task::spawn_blocking(move || expected_layer_tree(&blob, &target))
                .await
                .map_err(|error| RemoteLayerError {
                    layer: request.layer_digest.clone(),
                    source: Box::new(error),
                })?;
            Ok(Some(RemoteMount { dir }))
        })
    }

    fn restore<'a>(
        &'a self,
        snapshot: &'a RemoteSnapshot,
    ) -> BoxFuture<'a, Result<RemoteMount, RemoteLayerError>> {
        Box::pin(async move {
            Ok(RemoteMount {
                dir: snapshot.dir.clone(),
            })
        })
    }

    fn unmount<'a>(
        &'a self,
        _snapshot: &'a RemoteSnapshot,
    ) -> BoxFuture<'a, Result<(), RemoteLayerError>> {
        Box::pin(async { Ok(()) })
    }
}

/// The sluice snapshotter served from this process with [`LocalLayers`], on its own
/// runtime thread; stopped (and its state dir removed) on drop.
struct InProcessSnapshotter {
    dir: TempDir,
    layers: Arc<LocalLayers>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcessSnapshotter {
    fn start() -> InProcessSnapshotter {
        let dir = short_tempdir("sluice-ip-");
        let layers = Arc::new(LocalLayers::default());
        let socket = dir.path().join("sluice.sock");
        let root = dir.path().join("root");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let remote: Arc<dyn RemoteLayers> = layers.clone();
        let listening = socket.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("snapshotter runtime");
            runtime.block_on(async move {
                let snapshotter = Arc::new(
                    OverlaySnapshotter::open(&root, remote)
                        .await
                        .expect("open snapshotter state"),
                );
                let listener =
                    tokio::net::UnixListener::bind(&listening).expect("bind snapshotter socket");
                let served = tonic::transport::Server::builder()
                    .add_service(SnapshotService::new(Arc::clone(&snapshotter)).into_server())
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::UnixListenerStream::new(listener),
                        async {
                            let _ = stopped.await;
                        },
                    )
                    .await;
                snapshotter.shutdown().await;
                served.expect("serving the snapshots API");
            });
        });
        assert!(
            wait_until(Duration::from_secs(30), || UnixStream::connect(&socket)
                .is_ok()),
            "in-process snapshotter did not listen on {}",
            socket.display()
        );
        InProcessSnapshotter {
            dir,
            layers,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("sluice.sock")
    }
}

impl Drop for InProcessSnapshotter {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        unmount_all_under(self.dir.path());
    }
}

/// The lazy path end to end: the snapshotter answers `AlreadyExists` for every layer,
/// so `sluice pull` downloads nothing, yet the image is recorded, unpacked under its
/// chain ids and runs.
#[test]
fn layers_the_snapshotter_mounts_are_not_downloaded() {
    if skip_without_root() {
        return;
    }
    let snapshotter = InProcessSnapshotter::start();
    let containerd = TestContainerd::start(ContainerdOptions {
        proxy_snapshotter: Some((SNAPSHOTTER.to_owned(), snapshotter.socket())),
        ..ContainerdOptions::default()
    });
    let mut registry = TestRegistry::start(RegistryOptions::default());
    let hosts_dir = short_tempdir("sluice-hosts-");
    let image = publish(&containerd, &registry, "busybox", ImageFormat::Gzip);
    *snapshotter.layers.blobs.lock().unwrap() = Some(
        containerd
            .root()
            .join("io.containerd.content.v1.content/blobs/sha256"),
    );
    let ctr = |args: &[&str]| {
        let mut all = vec!["--namespace", PULL_NAMESPACE];
        all.extend_from_slice(args);
        containerd.ctr(&all).unwrap_or_else(|e| panic!("{e}"))
    };
    let pull = || {
        let output = sluice_pull_at(
            &containerd.socket(),
            &image.reference,
            &["--hosts-dir", &hosts_dir.path().to_string_lossy()],
        );
        assert!(
            output.status.success(),
            "sluice pull failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let layers = image.layers.len();
    let chain = expected_chain_ids(&image);

    let mark = registry.mark();
    let summary = pull();
    assert!(
        summary.contains(&format!(
            "{layers} layers: {layers} mounted lazily, 0 downloaded, 0 already present; 0 B"
        )),
        "{summary}"
    );
    assert_eq!(layer_bytes_since(&mut registry, mark, &image), 0);
    let asked: Vec<(String, String, String)> = image
        .layers
        .iter()
        .zip(&chain)
        .map(|(layer, target)| {
            (
                layer.digest.clone(),
                image.reference.clone(),
                target.clone(),
            )
        })
        .collect();
    assert_eq!(*snapshotter.layers.requests.lock().unwrap(), asked);

    let committed: Vec<String> = ctr(&["snapshots", "--snapshotter", SNAPSHOTTER, "ls"])
        .lines()
        .skip(1)
        .filter(|line| line.trim_end().ends_with("Committed"))
        .map(|line| line.split_whitespace().next().unwrap().to_owned())
        .collect();
    assert_eq!(sorted(committed), sorted(chain));
    // Nothing of the layers is in this namespace's content store.
    let content = ctr(&["content", "ls", "-q"]);
    for layer in &image.layers {
        assert!(!content.contains(&layer.digest), "{content}");
    }
    assert!(ctr(&["images", "ls", "-q"]).contains(&image.reference));
    let output = ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        SNAPSHOTTER,
        &image.reference,
        "lazy-run",
    ]);
    assert_eq!(output.trim(), BUSYBOX_OUTPUT);

    let again = pull();
    assert!(
        again.contains(&format!("{layers} already present")),
        "{again}"
    );
    assert_eq!(snapshotter.layers.requests.lock().unwrap().len(), layers);
}

/// A reference naming a multi-platform index: the index is stored too, with a GC label
/// per manifest, the image record points at it, and containerd picks the host's
/// manifest from it when running.
#[test]
fn index_reference_is_recorded_with_the_index_as_target() {
    if skip_without_root() {
        return;
    }
    let rig = Rig::start();
    let image = publish(&rig.containerd, &rig.registry, "busybox", ImageFormat::Gzip);
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    // The index must give the manifest's size as the registry serves it.
    let manifest_size = run_command(Command::new("curl").args([
        "-sS",
        "-f",
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
        "-H",
        "Accept: application/vnd.oci.image.manifest.v1+json",
        "-H",
        "Accept: application/vnd.docker.distribution.manifest.v2+json",
        &format!(
            "{}/v2/{}/manifests/{}",
            rig.registry.url(),
            image.repository,
            image.manifest_digest
        ),
    ]))
    .expect("size of the pushed manifest");
    let manifest_media_type = image.manifest["mediaType"]
        .as_str()
        .unwrap_or("application/vnd.oci.image.manifest.v1+json");
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": manifest_media_type,
                "digest": image.manifest_digest,
                "size": manifest_size.trim().parse::<u64>().unwrap(),
                "platform": {"os": "linux", "architecture": arch},
            },
        ],
    });
    let index_bytes = serde_json::to_vec(&index).unwrap();
    let index_digest = format!("sha256:{}", sha256_hex(&index_bytes));
    let index_file = rig.containerd.scratch_dir("index").join("index.json");
    std::fs::write(&index_file, &index_bytes).unwrap();
    run_command(Command::new("curl").args([
        "-sS",
        "-f",
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/vnd.oci.image.index.v1+json",
        "--data-binary",
        &format!("@{}", index_file.display()),
        &format!(
            "{}/v2/{}/manifests/multi",
            rig.registry.url(),
            image.repository
        ),
    ]))
    .expect("push the index");
    let reference = format!("{}/{}:multi", rig.registry.host(), image.repository);

    let summary = rig.pull_ok(&reference);
    assert!(summary.contains(&format!("({index_digest})")), "{summary}");
    let listing = rig.ctr(&["images", "ls"]);
    let row = listing
        .lines()
        .find(|line| line.starts_with(&reference))
        .unwrap_or_else(|| panic!("{reference} not in\n{listing}"));
    assert!(
        row.contains(&index_digest) && row.contains("application/vnd.oci.image.index.v1+json"),
        "{row}"
    );
    let index_labels = rig.content_labels(&index_digest);
    assert!(
        index_labels.contains(&format!(
            "containerd.io/gc.ref.content.m.0={}",
            image.manifest_digest
        )),
        "{index_labels}"
    );
    assert_eq!(
        rig.run_container(&reference, "index-run").trim(),
        BUSYBOX_OUTPUT
    );
}

/// Copies `from` to `to` in the registry with skopeo (a tag pushed again).
fn retag(from: &str, to: &str) {
    let out = Command::new("skopeo")
        .args([
            "copy",
            "--all",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            &format!("docker://{from}"),
            &format!("docker://{to}"),
        ])
        .output()
        .expect("skopeo must be installed");
    assert!(
        out.status.success(),
        "skopeo copy {from} {to}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_tag_pushed_again_is_mounted_lazily_again() {
    if skip_without_root() {
        return;
    }
    let rig = Rig::start();
    let first = publish(
        &rig.containerd,
        &rig.registry,
        "busybox",
        ImageFormat::Estargz,
    );
    let second = publish(
        &rig.containerd,
        &rig.registry,
        "app",
        ImageFormat::ZstdChunked,
    );
    let moving = format!("{}/sluice/moving:latest", rig.registry.host());
    for (round, image) in [&first, &second].into_iter().enumerate() {
        retag(&image.reference, &moving);
        let layers = image.layers.len();
        let summary = rig.pull_ok(&moving);
        // The daemon resolved the tag in the first round; the second one's new layers
        // must still be found and mounted, not downloaded.
        assert!(
            summary.contains(&format!(
                "{layers} layers: {layers} mounted lazily, 0 downloaded"
            )),
            "round {round}: {summary}\nsnapshotter log:\n{}",
            rig.snapshotter.log()
        );
        assert_eq!(
            rig.run_container(&moving, &format!("moving-{round}"))
                .trim(),
            BUSYBOX_OUTPUT,
        );
    }
}

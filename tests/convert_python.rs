//! Issue "Image conversion with prefetch indexes" on a real distribution image: the
//! `python` image of tools/mkbenchimages (Debian bookworm minbase + python3 + a script
//! importing a dozen stdlib modules), converted by `sluice convert` with the entrypoint
//! analysis to eStargz and zstd:chunked, then
//!
//! - run unchanged by containerd's overlayfs snapshotter, and lazily by sluice
//!   (`sluice pull` + `ctr run --snapshotter sluice`);
//! - every converted layer, mounted by `sluice mount`, equals `tar -x` of the original;
//! - the prefetch list `sluice inspect` shows holds what python really needs to start
//!   (and what strace saw it open at build time) and no unrelated big file;
//! - with that list, the container's start makes at least 5x fewer on-demand chunk
//!   requests than the same image converted with `--prefetch none`.
//!
//! One test: the image, its three conversions and the registry are shared by all checks.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use common::containerd::{ContainerdOptions, TestContainerd};
use common::mount::LayerMount;
use common::proxy::TestProxy;
use common::pyimage::{APP_SCRIPT, PythonImage, READY, build_python_image};
use common::registry::{RegistryOptions, TestRegistry};
use common::snapshotter::SnapshotterDaemon;
use common::tree::{compare_trees, expected_layer_tree};
use sluice::format::{EntryKind, LayerIndex, parse_footer, parse_toc};
use tempfile::TempDir;

const NAMESPACE: &str = "lazy";
const SNAPSHOTTER: &str = "sluice";
/// No background streaming after a lazy mount: the registry then only sees prefetch and
/// on-demand reads.
const DAEMON_CONFIG: &str = "[fs]\nbackground_fetch = false\n";
/// Files this big that the entrypoint never opens must not be prefetched.
const BIG_FILE: u64 = 1 << 20;

/// One conversion of the python image, pushed to the test registry.
struct Converted {
    /// `--format` value.
    format: &'static str,
    /// `--prefetch` value.
    prefetch: &'static str,
    /// Repository and tag inside the registry: `conv/python:TAG`.
    path: String,
    /// Converted layer digests, bottom first.
    layers: Vec<String>,
}

impl Converted {
    fn reference(&self, host: &str) -> String {
        format!("{host}/{}", self.path)
    }
}

fn sluice(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
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

fn convert(
    image: &PythonImage,
    registry: &TestRegistry,
    format: &'static str,
    prefetch: &'static str,
) -> Converted {
    let path = format!("conv/python:{format}-{prefetch}");
    let stdout = sluice_ok(&[
        "convert",
        &image.oci_location(),
        &format!("{}/{path}", registry.host()),
        "--format",
        format,
        "--prefetch",
        prefetch,
        // Debug build: the fastest level keeps the test short; the layout is the same.
        "--compression-level",
        "1",
    ]);
    let layers: Vec<String> = stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("layer "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    assert_eq!(layers.len(), image.layers.len(), "{stdout}");
    Converted {
        format,
        prefetch,
        path,
        layers,
    }
}

/// Where the registry keeps a blob on disk (its filesystem storage driver's layout).
fn registry_blob(registry: &TestRegistry, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    registry
        .storage_dir()
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data")
}

/// sluice's own index of a converted layer blob.
fn layer_index(blob: &Path) -> LayerIndex {
    let bytes = std::fs::read(blob).unwrap_or_else(|e| panic!("{}: {e}", blob.display()));
    let size = bytes.len() as u64;
    let tail_len = (sluice::format::MAX_FOOTER_SIZE as usize).min(bytes.len());
    let footer = parse_footer(&bytes[bytes.len() - tail_len..], size).expect("footer");
    let range = footer.toc_range();
    parse_toc(
        &footer,
        &bytes[range.start as usize..range.end as usize],
        None,
        size,
    )
    .expect("toc")
    .index
}

/// `sluice inspect --prefetch`: the prefetch list of each layer, bottom first.
fn inspect_prefetch(reference: &str) -> Vec<Vec<String>> {
    let text = sluice_ok(&["inspect", "--prefetch", reference]);
    let mut layers: Vec<Vec<String>> = Vec::new();
    for line in text.lines() {
        if line.starts_with("layer ") {
            layers.push(Vec::new());
        } else if let Some(path) = line.trim().strip_prefix('/') {
            layers
                .last_mut()
                .unwrap_or_else(|| panic!("prefetch path before any layer:\n{text}"))
                .push(path.to_owned());
        }
    }
    layers
}

/// Run `command` chrooted in the image's build root.
fn in_rootfs(image: &PythonImage, command: &[&str]) -> String {
    common::run_command(Command::new("chroot").arg(&image.rootfs).args(command))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The files the kernel and ld.so load to start `/usr/bin/python3`: the real binary
/// behind the symlink, its interpreter and every shared library, as image paths.
fn python_start_files(image: &PythonImage) -> Vec<String> {
    let resolve = |path: &str| {
        in_rootfs(image, &["readlink", "-f", path])
            .trim()
            .trim_start_matches('/')
            .to_owned()
    };
    let binary = resolve("/usr/bin/python3");
    let mut files = vec![binary.clone()];
    for line in in_rootfs(image, &["ldd", &format!("/{binary}")]).lines() {
        // `libm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x...)` or `/lib64/ld-linux... (0x...)`
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            files.push(resolve(path));
        }
    }
    files
}

/// The modules `/app/start.py` imports (top-level `import a, b.c` lines), without those
/// the interpreter has built in or frozen (they are never read from disk).
fn imported_modules(image: &PythonImage, script: &str) -> Vec<String> {
    let mut modules = Vec::new();
    for line in script.lines() {
        if let Some(names) = line.strip_prefix("import ") {
            modules.extend(names.split(',').map(|n| n.trim().to_owned()));
        }
    }
    let probe = format!(
        "import sys, _imp\nfor m in {modules:?}:\n    print(m, m in sys.builtin_module_names or _imp.is_frozen(m))\n"
    );
    let answer = in_rootfs(image, &["python3", "-c", &probe]);
    let in_memory: BTreeSet<&str> = answer
        .lines()
        .filter_map(|l| l.strip_suffix(" True"))
        .collect();
    assert!(
        in_memory.len() < modules.len() / 2,
        "most imports are built in? {answer}"
    );
    modules.retain(|m| !in_memory.contains(m.as_str()));
    modules
}

/// The bytecode files python reads for module `name` (`a.b` -> `a/__pycache__/b.*.pyc`
/// or `a/b/__pycache__/__init__.*.pyc`), relative to the stdlib directory.
fn module_bytecode(
    stdlib: &str,
    cache_tag: &str,
    name: &str,
    present: &BTreeSet<String>,
) -> String {
    let path = name.replace('.', "/");
    let (dir, base) = match path.rsplit_once('/') {
        Some((dir, base)) => (format!("{stdlib}/{dir}"), base.to_owned()),
        None => (stdlib.to_owned(), path.clone()),
    };
    let package = format!("{stdlib}/{path}/__pycache__/__init__.{cache_tag}.pyc");
    if present.contains(&package) {
        return package;
    }
    format!("{dir}/__pycache__/{base}.{cache_tag}.pyc")
}

/// The python layer of mkbenchimages names `usr/local/lib/python3.11/` but not its
/// parents `usr/local/` and `usr/local/lib/`. `tar -x` creates those with the time of
/// extraction; a lazily mounted layer has no time for them either and shows the epoch.
/// Only these directories get the epoch in the expected tree: every directory the layer
/// does describe keeps the time it has there.
fn zero_implicit_directory_mtimes(blob: &Path, tree: &Path) {
    let listing = common::run_command(Command::new("tar").arg("-tzf").arg(blob))
        .unwrap_or_else(|e| panic!("{e}"));
    let named: BTreeSet<&str> = listing.lines().map(|l| l.trim_end_matches('/')).collect();
    let mut implicit = Vec::new();
    for name in &named {
        let mut parent = Path::new(name).parent();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            let dir_name = dir.to_str().expect("utf-8 path");
            if !named.contains(dir_name) {
                implicit.push(dir_name.to_owned());
            }
            parent = dir.parent();
        }
    }
    for dir in implicit {
        let epoch = nix::sys::time::TimeSpec::new(0, 0);
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &tree.join(&dir),
            &epoch,
            &epoch,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap_or_else(|e| panic!("setting times of {dir}: {e}"));
    }
}

/// A fresh sluice-snapshotter (empty chunk cache) and a containerd using it. Field order
/// is drop order: containerd (its shims and mounts) before the snapshotter.
struct LazyRig {
    containerd: TestContainerd,
    snapshotter: SnapshotterDaemon,
    hosts_dir: TempDir,
}

/// What one lazy run made the registry do.
struct RunFetches {
    /// GET requests for the image's layer blobs between task start and exit.
    on_demand: usize,
    /// The same requests as the proxy in front of the registry saw them (with ranges).
    ranges: Vec<(String, String)>,
    /// GET requests for layer blobs during `sluice pull` (TOCs and prefetch).
    during_pull: usize,
}

impl LazyRig {
    fn start() -> LazyRig {
        let snapshotter = SnapshotterDaemon::start(DAEMON_CONFIG);
        let containerd = TestContainerd::start(ContainerdOptions {
            proxy_snapshotter: Some((SNAPSHOTTER.to_owned(), snapshotter.socket())),
            ..ContainerdOptions::default()
        });
        LazyRig {
            containerd,
            snapshotter,
            hosts_dir: common::short_tempdir("sluice-hosts-"),
        }
    }

    fn ctr(&self, args: &[&str]) -> String {
        let mut all = vec!["--namespace", NAMESPACE];
        all.extend_from_slice(args);
        self.containerd
            .ctr(&all)
            .unwrap_or_else(|e| panic!("{e}\nsnapshotter log:\n{}", self.snapshotter.log()))
    }

    /// `sluice pull`, then the image's entrypoint as a container; returns its output and
    /// the registry requests of the pull and of the task.
    fn pull_and_run(
        &self,
        registry: &TestRegistry,
        proxy: &TestProxy,
        image: &Converted,
    ) -> (String, RunFetches) {
        // Through the proxy, which records the Range of every request.
        let reference = image.reference(&proxy.host());
        let is_layer =
            |digest: Option<&str>| digest.is_some_and(|d| image.layers.iter().any(|l| l == d));
        let before_pull = registry.mark();
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("pull")
            .arg("--address")
            .arg(self.containerd.socket())
            .args(["--namespace", NAMESPACE, "--plain-http"])
            .args(["--snapshotter", SNAPSHOTTER, "--hosts-dir"])
            .arg(self.hosts_dir.path())
            .arg(&reference)
            .stdin(Stdio::null())
            .output()
            .expect("spawn sluice pull");
        assert!(
            out.status.success(),
            "sluice pull {reference}: {}\nsnapshotter log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.snapshotter.log()
        );
        let during_pull = registry
            .records_since(before_pull)
            .iter()
            .filter(|r| r.method == "GET" && is_layer(r.blob_digest()))
            .count();

        let id = format!("py-{}-{}", image.format, image.prefetch);
        self.ctr(&[
            "containers",
            "create",
            "--snapshotter",
            SNAPSHOTTER,
            &reference,
            &id,
        ]);
        let before_start = registry.mark();
        let proxy_before = proxy.records().len();
        let output = self.ctr(&["tasks", "start", &id]);
        let task_records = registry.records_since(before_start);
        let ranges = proxy.records()[proxy_before..]
            .iter()
            .filter(|r| r.method == "GET" && r.path.contains("/blobs/"))
            .map(|r| {
                (
                    r.path.rsplit('/').next().unwrap_or_default().to_owned(),
                    r.range.clone().unwrap_or_default(),
                )
            })
            .collect();
        self.ctr(&["containers", "rm", &id]);
        let on_demand = task_records
            .iter()
            .filter(|r| r.method == "GET" && is_layer(r.blob_digest()))
            .count();
        (
            output,
            RunFetches {
                on_demand,
                ranges,
                during_pull,
            },
        )
    }
}

/// Names the files (and prefetch membership) a `bytes=A-B` request of `digest` covers.
fn describe_range(digest: &str, range: &str, indexes: &BTreeMap<String, LayerIndex>) -> String {
    let Some(index) = indexes.get(digest) else {
        return format!("{digest} {range}: not a layer of this image");
    };
    let Some((start, end)) = range
        .strip_prefix("bytes=")
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
    else {
        return format!("{digest} {range}: whole blob or unparsable range");
    };
    let prefetched: BTreeSet<usize> = index.prefetch.iter().map(|id| id.0 as usize).collect();
    let mut hits = Vec::new();
    for (i, entry) in index.entries.iter().enumerate() {
        if let EntryKind::Regular { chunks, .. } = &entry.kind {
            for chunk in chunks {
                let r = chunk.compressed_range();
                if r.start <= end && start < r.end {
                    hits.push(format!(
                        "{}@{}{}",
                        entry.name,
                        chunk.file_offset.0,
                        if prefetched.contains(&i) {
                            " (PREFETCHED)"
                        } else {
                            ""
                        }
                    ));
                }
            }
        }
    }
    if start >= index.toc_offset.0 {
        hits.push("TOC/footer".into());
    }
    format!(
        "layer {digest} {range} ({} bytes): {}",
        end + 1 - start,
        hits.join(", ")
    )
}

#[test]
fn python_image_converts_runs_lazily_and_prefetches_what_it_starts() {
    if !common::have_root_and_fuse() {
        eprintln!("skipped: needs root and /dev/fuse");
        return;
    }
    let started = Instant::now();
    let image = build_python_image();
    let registry = TestRegistry::start(RegistryOptions::default());
    let variants = [
        convert(&image, &registry, "estargz", "entrypoint"),
        convert(&image, &registry, "zstd-chunked", "entrypoint"),
        convert(&image, &registry, "estargz", "none"),
    ];
    eprintln!("{:?}: image built and converted", started.elapsed());
    let indexes: BTreeMap<String, LayerIndex> = variants
        .iter()
        .flat_map(|v| v.layers.iter())
        .map(|digest| {
            (
                digest.clone(),
                layer_index(&registry_blob(&registry, digest)),
            )
        })
        .collect();

    // The prefetch lists `sluice inspect` shows.
    let script = String::from_utf8(
        Command::new("tar")
            .arg("-xzOf")
            .arg(image.blob_path(image.layers.last().unwrap()))
            .arg(APP_SCRIPT)
            .output()
            .expect("tar")
            .stdout,
    )
    .unwrap();
    let start_files = python_start_files(&image);
    let python = start_files[0].clone();
    assert!(python.starts_with("usr/bin/python3."), "{start_files:?}");
    let version = python.trim_start_matches("usr/bin/");
    let stdlib = format!("usr/lib/{version}");
    let cache_tag = format!(
        "cpython-{}",
        version.trim_start_matches("python").replace('.', "")
    );
    let modules = imported_modules(&image, &script);
    for variant in variants.iter().filter(|v| v.prefetch == "entrypoint") {
        let per_layer = inspect_prefetch(&variant.reference(&registry.host()));
        assert_eq!(per_layer.len(), image.layers.len());
        let listed: BTreeSet<String> = per_layer.iter().flatten().cloned().collect();
        let what = variant.format;
        for file in &start_files {
            assert!(
                listed.contains(file),
                "{what}: {file} not prefetched: {per_layer:?}"
            );
        }
        assert!(
            start_files.iter().any(|f| f.ends_with("/libc.so.6"))
                && start_files.iter().any(|f| f.contains("/ld-linux")),
            "ldd did not name libc and ld.so: {start_files:?}"
        );
        assert!(
            listed.contains(APP_SCRIPT),
            "{what}: no script: {per_layer:?}"
        );
        assert_eq!(
            per_layer.last().unwrap(),
            &vec![APP_SCRIPT.to_owned()],
            "{what}: the app layer prefetches its script only"
        );
        for module in &modules {
            let bytecode = module_bytecode(&stdlib, &cache_tag, module, &listed);
            assert!(
                listed.contains(&bytecode),
                "{what}: module {module} ({bytecode}) not prefetched"
            );
        }
        // Everything python opened under strace at build time is there.
        let missed: Vec<&String> = image
            .recorded_reads
            .iter()
            .filter(|f| !listed.contains(*f))
            .collect();
        assert!(
            missed.is_empty(),
            "{what}: read at start but not prefetched: {missed:?}"
        );
        // No big file the start does not read.
        let recorded: BTreeSet<&String> = image.recorded_reads.iter().collect();
        let mut prefetched_bytes = 0;
        let mut total_bytes = 0;
        for digest in &variant.layers {
            let index = &indexes[digest];
            let prefetched: BTreeSet<usize> =
                index.prefetch.iter().map(|id| id.0 as usize).collect();
            for (i, entry) in index.entries.iter().enumerate() {
                let EntryKind::Regular { size, .. } = &entry.kind else {
                    continue;
                };
                total_bytes += size;
                if prefetched.contains(&i) {
                    prefetched_bytes += size;
                    assert!(
                        *size < BIG_FILE || recorded.contains(&entry.name),
                        "{what}: {} ({size} bytes) is prefetched but python never reads it",
                        entry.name
                    );
                }
            }
        }
        eprintln!(
            "{what}: prefetch list of {} files, {prefetched_bytes} of {total_bytes} bytes",
            listed.len()
        );
        assert!(prefetched_bytes * 5 < total_bytes);
    }

    eprintln!("{:?}: prefetch lists checked", started.elapsed());

    // Lazily through sluice, each variant from a fresh daemon and an empty chunk cache.
    let proxy = TestProxy::start(registry.addr());
    let mut fetches = BTreeMap::new();
    for variant in &variants {
        let rig = LazyRig::start();
        let (output, run) = rig.pull_and_run(&registry, &proxy, variant);
        assert!(
            output.lines().any(|l| l == READY),
            "{}: {output}\nsnapshotter log:\n{}",
            variant.path,
            rig.snapshotter.log()
        );
        eprintln!(
            "{}: {} layer requests during the pull, {} on-demand after the task started",
            variant.path, run.during_pull, run.on_demand
        );
        if variant.prefetch == "entrypoint" {
            for (digest, range) in &run.ranges {
                eprintln!("  after start: {}", describe_range(digest, range, &indexes));
            }
        }
        fetches.insert((variant.format, variant.prefetch), run.on_demand);
    }
    let with = fetches[&("estargz", "entrypoint")];
    let without = fetches[&("estargz", "none")];
    eprintln!(
        "on-demand chunk fetches after task start (estargz): {with} with the entrypoint prefetch list, {without} without"
    );
    assert!(
        without > 0,
        "the run without prefetch fetched nothing on demand"
    );
    assert!(
        with * 5 <= without,
        "with prefetch {with} on-demand fetches, without {without}: less than 5x fewer"
    );

    // containerd's own overlayfs snapshotter runs the converted images unchanged.
    let plain = TestContainerd::start(ContainerdOptions::default());
    for variant in variants.iter().filter(|v| v.prefetch == "entrypoint") {
        let reference = variant.reference(&registry.host());
        plain
            .ctr(&["images", "pull", "--plain-http", &reference])
            .unwrap_or_else(|e| panic!("{e}"));
        let id = format!("overlay-{}", variant.format);
        let output = plain
            .ctr(&["run", "--rm", &reference, &id])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(output.lines().any(|l| l == READY), "{reference}: {output}");
    }
    drop(plain);

    eprintln!("{:?}: overlayfs runs done", started.elapsed());

    // Every converted layer, mounted by sluice, is the original layer's tree.
    let scratch = common::short_tempdir("sluice-pyc-");
    for (i, original) in image.layers.iter().enumerate() {
        let expected = scratch.path().join(format!("expected-{i}"));
        expected_layer_tree(&image.blob_path(original), &expected);
        zero_implicit_directory_mtimes(&image.blob_path(original), &expected);
        // Both formats at once: the walk is bound by the latency of the reads.
        std::thread::scope(|threads| {
            for variant in variants.iter().filter(|v| v.prefetch == "entrypoint") {
                let (expected, scratch) = (&expected, scratch.path());
                let reference = variant.reference(&registry.host());
                threads.spawn(move || {
                    let mountpoint = scratch.join(format!("mnt-{}-{i}", variant.format));
                    let cache = scratch.join(format!("cache-{}", variant.format));
                    let mount = LayerMount::start(&reference, i, &cache, &mountpoint, true);
                    let diff = compare_trees(expected, &mountpoint);
                    drop(mount);
                    assert!(
                        diff.is_empty(),
                        "{reference} layer {i}:\n{}",
                        diff.0.join("\n")
                    );
                });
            }
        });
        std::fs::remove_dir_all(&expected).unwrap();
    }
    drop(scratch);

    eprintln!("{:?}: trees compared", started.elapsed());
}

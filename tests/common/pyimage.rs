//! The `python` image of tools/mkbenchimages (Debian bookworm minbase + python3 in a
//! base and a python layer, plus an app layer whose script imports a dozen stdlib
//! modules and prints `ready`), built offline once and cached under
//! `target/test-fixtures/`.
//!
//! The first build runs debootstrap against the configured apt mirror (a few minutes);
//! every later run reuses the layout. The cache is keyed by a hash of mkbenchimages and
//! mkimage.py, so changing how the image is made rebuilds it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use serde_json::Value;

use super::{fixtures_dir, repo_root, run_command, sha256_hex};

/// What the image's entrypoint prints once its imports are done.
pub const READY: &str = "ready";
/// The script the entrypoint runs.
pub const APP_SCRIPT: &str = "app/start.py";

/// Serialises building within one test binary (mkbenchimages is not reentrant).
static BUILD_LOCK: Mutex<()> = Mutex::new(());

/// The built image: an OCI layout with tar+gzip layers, as mkbenchimages writes it.
#[derive(Debug, Clone)]
pub struct PythonImage {
    /// OCI image layout directory.
    pub layout_dir: PathBuf,
    /// Files the entrypoint opened or executed when run under strace at build time
    /// (paths relative to the image root, symlinks resolved), in the order read.
    pub recorded_reads: Vec<String>,
    /// Layer digests of the original image, bottom first.
    pub layers: Vec<String>,
    /// The debootstrap root the layers were made from (for inspecting binaries).
    pub rootfs: PathBuf,
}

impl PythonImage {
    /// Path of a blob inside the layout.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let (algorithm, hex) = digest
            .split_once(':')
            .unwrap_or_else(|| panic!("malformed digest {digest}"));
        self.layout_dir.join("blobs").join(algorithm).join(hex)
    }

    /// `oci:LAYOUT`, the source argument of `sluice convert`.
    pub fn oci_location(&self) -> String {
        format!("oci:{}", self.layout_dir.display())
    }
}

fn fingerprint(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    sha256_hex(&bytes)
}

/// Directory the image is cached in: `target/test-fixtures/bench-images-KEY/`.
pub fn cache_dir() -> PathBuf {
    let tools = repo_root().join("tools");
    let material =
        fingerprint(&tools.join("mkbenchimages")) + &fingerprint(&tools.join("mkimage.py"));
    fixtures_dir().join(format!(
        "bench-images-{}",
        &sha256_hex(material.as_bytes())[..16]
    ))
}

/// Build (or reuse) the python image.
pub fn build_python_image() -> PythonImage {
    let _guard = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let out = cache_dir();
    let dir = out.join("python");
    if !dir.join("complete").exists() {
        eprintln!(
            "building the python test image in {} (debootstrap, once)",
            out.display()
        );
        run_command(
            Command::new("python3")
                .arg(repo_root().join("tools/mkbenchimages"))
                .arg(&out)
                .args(["--images", "python"]),
        )
        .unwrap_or_else(|e| panic!("building the python image with tools/mkbenchimages: {e}"));
    }
    let layout_dir = dir.join("layout");
    let index = read_json(&layout_dir.join("index.json"));
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .expect("index.json without a manifest");
    let (_, hex) = manifest_digest.split_once(':').expect("digest");
    let manifest = read_json(&layout_dir.join("blobs/sha256").join(hex));
    let layers = manifest["layers"]
        .as_array()
        .expect("manifest without layers")
        .iter()
        .map(|l| l["digest"].as_str().expect("layer digest").to_owned())
        .collect();
    let recorded_reads = std::fs::read_to_string(dir.join("record.jsonl"))
        .expect("record.jsonl of the python image")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("record line is JSON")["path"]
                .as_str()
                .expect("record line has a path")
                .to_owned()
        })
        .collect();
    PythonImage {
        layout_dir,
        recorded_reads,
        layers,
        rootfs: out.join("rootfs-bookworm-python3"),
    }
}

fn read_json(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

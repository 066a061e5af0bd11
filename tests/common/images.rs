//! Offline test images: build them with tools/mkimage.py, import them into a
//! `TestContainerd`, convert them to eStargz and zstd:chunked with `ctr-remote`, push
//! every variant to a `TestRegistry`, and read the pushed manifests back.
//!
//! Built layouts and converted images are cached under `target/test-fixtures/`, keyed
//! by a hash of everything that determines their bytes, so only the first test of a
//! run (or of a changed spec) pays for building and converting.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use serde_json::Value;

use super::containerd::TestContainerd;
use super::registry::TestRegistry;
use super::{fixtures_dir, repo_root, run_command, sha256_hex};

/// eStargz chunk size used for conversion: small enough that the 52 MiB file of the
/// `everything` image spans many chunks.
pub const ESTARGZ_CHUNK_SIZE: u64 = 1024 * 1024;

/// Annotation ctr-remote puts on each converted layer descriptor.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Uncompressed size annotation ctr-remote puts on each converted layer descriptor.
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";

/// Where a zstd:chunked layer keeps its TOC: `offset:length:uncompressed_length:type`.
pub const ZSTD_MANIFEST_POSITION_ANNOTATION: &str = "io.containers.zstd-chunked.manifest-position";
/// Digest of the compressed zstd:chunked TOC.
pub const ZSTD_MANIFEST_CHECKSUM_ANNOTATION: &str = "io.containers.zstd-chunked.manifest-checksum";

/// Serialises building and converting within one test binary.
static FIXTURE_LOCK: Mutex<()> = Mutex::new(());

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ImageFormat {
    /// The original image: plain tar+gzip layers.
    Gzip,
    Estargz,
    ZstdChunked,
}

impl ImageFormat {
    pub const ALL: [ImageFormat; 3] = [
        ImageFormat::Gzip,
        ImageFormat::Estargz,
        ImageFormat::ZstdChunked,
    ];

    /// Tag used for this variant in the registry.
    pub fn tag(self) -> &'static str {
        match self {
            ImageFormat::Gzip => "gzip",
            ImageFormat::Estargz => "estargz",
            ImageFormat::ZstdChunked => "zstdchunked",
        }
    }

    fn convert_flags(self) -> Vec<String> {
        match self {
            ImageFormat::Gzip => Vec::new(),
            ImageFormat::Estargz => vec![
                "--estargz".into(),
                "--estargz-chunk-size".into(),
                ESTARGZ_CHUNK_SIZE.to_string(),
            ],
            ImageFormat::ZstdChunked => vec![
                "--zstdchunked".into(),
                "--estargz-chunk-size".into(),
                ESTARGZ_CHUNK_SIZE.to_string(),
            ],
        }
    }
}

/// An image built by tools/mkimage.py (original gzip layers).
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub name: String,
    /// OCI image layout directory.
    pub layout_dir: PathBuf,
    /// The layout as one tar for `ctr images import`.
    pub archive: PathBuf,
    /// Name recorded in the archive; what `ctr images import` creates.
    pub import_ref: String,
    pub manifest_digest: String,
    /// Layer descriptors, bottom first.
    pub layers: Vec<Descriptor>,
    /// Hash of the inputs; part of every cache path derived from this image.
    pub key: String,
}

impl BuiltImage {
    /// Path of a blob inside the layout.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        blob_path_in(&self.layout_dir.join("blobs"), digest)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    fn from_json(value: &Value) -> Descriptor {
        Descriptor {
            media_type: value["mediaType"].as_str().unwrap_or_default().to_string(),
            digest: value["digest"]
                .as_str()
                .expect("descriptor without digest")
                .to_string(),
            size: value["size"].as_u64().expect("descriptor without size"),
            annotations: value["annotations"]
                .as_object()
                .map(|map| {
                    map.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// The eStargz/zstd:chunked TOC digest annotation, if any.
    pub fn toc_digest(&self) -> Option<&str> {
        self.annotations
            .get(TOC_DIGEST_ANNOTATION)
            .map(String::as_str)
    }
}

/// One image variant as it is in the registry.
#[derive(Debug, Clone)]
pub struct PushedImage {
    pub format: ImageFormat,
    /// `127.0.0.1:PORT/sluice/NAME:TAG`.
    pub reference: String,
    /// `sluice/NAME` (repository path within the registry).
    pub repository: String,
    pub manifest_digest: String,
    /// The manifest as the registry serves it.
    pub manifest: Value,
    pub config: Descriptor,
    /// Layer descriptors from the pushed manifest, bottom first.
    pub layers: Vec<Descriptor>,
    /// Uncompressed layer digests from the image config, bottom first.
    pub diff_ids: Vec<String>,
    /// The containerd content store holding every pushed blob (valid while the
    /// `TestContainerd` used to publish lives).
    content_blobs: PathBuf,
}

impl PushedImage {
    /// Local copy of a blob of this image (in containerd's content store), for
    /// computing expected results without touching the registry.
    pub fn local_blob(&self, digest: &str) -> PathBuf {
        blob_path_in(&self.content_blobs, digest)
    }

    /// Local copy of layer `index` (bottom = 0).
    pub fn local_layer(&self, index: usize) -> PathBuf {
        self.local_blob(&self.layers[index].digest)
    }

    /// Registry URL of a blob, e.g. for range requests with curl.
    pub fn blob_url(&self, registry_url: &str, digest: &str) -> String {
        format!("{registry_url}/v2/{}/blobs/{digest}", self.repository)
    }
}

/// The three variants of one image.
#[derive(Debug, Clone)]
pub struct PublishedImages {
    pub gzip: PushedImage,
    pub estargz: PushedImage,
    pub zstdchunked: PushedImage,
}

impl PublishedImages {
    pub fn get(&self, format: ImageFormat) -> &PushedImage {
        match format {
            ImageFormat::Gzip => &self.gzip,
            ImageFormat::Estargz => &self.estargz,
            ImageFormat::ZstdChunked => &self.zstdchunked,
        }
    }
}

fn blob_path_in(blobs: &Path, digest: &str) -> PathBuf {
    let (algorithm, hex) = digest
        .split_once(':')
        .unwrap_or_else(|| panic!("malformed digest {digest}"));
    blobs.join(algorithm).join(hex)
}

fn file_fingerprint(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    sha256_hex(&bytes)
}

/// What determines the built image's bytes: the script, the image name and, for
/// `busybox`, the host's busybox binary.
fn image_key(name: &str) -> String {
    let mut material = file_fingerprint(&mkimage_script());
    material.push_str(name);
    if name != "everything" {
        material.push_str(&file_fingerprint(Path::new("/bin/busybox")));
    }
    sha256_hex(material.as_bytes())[..16].to_string()
}

fn mkimage_script() -> PathBuf {
    repo_root().join("tools/mkimage.py")
}

/// Build (or reuse) image `name` of tools/mkimage.py.
pub fn build_image(name: &str) -> BuiltImage {
    let _guard = FIXTURE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let key = image_key(name);
    let dir = fixtures_dir().join(format!("{name}-{key}"));
    let import_ref = format!("sluice.test/{name}:latest");
    if !dir.join("complete").exists() {
        // Build next to the final place, then rename: a concurrent test binary either
        // sees nothing or a complete layout.
        let staging = fixtures_dir().join(format!("{name}-{key}.staging-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).expect("create image staging dir");
        run_command(
            Command::new("python3")
                .arg(mkimage_script())
                .arg(name)
                .arg(staging.join("layout"))
                .arg("--archive")
                .arg(staging.join("image.tar"))
                .arg("--ref")
                .arg(&import_ref),
        )
        .unwrap_or_else(|e| panic!("building test image {name}: {e}"));
        std::fs::write(staging.join("complete"), b"").expect("mark image complete");
        if std::fs::rename(&staging, &dir).is_err() {
            // Another process finished first; its result is identical.
            let _ = std::fs::remove_dir_all(&staging);
        }
    }
    let layout_dir = dir.join("layout");
    let index: Value = read_json(&layout_dir.join("index.json"));
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .expect("index.json without manifest")
        .to_string();
    let manifest: Value = read_json(&blob_path_in(&layout_dir.join("blobs"), &manifest_digest));
    let layers = manifest["layers"]
        .as_array()
        .expect("manifest without layers")
        .iter()
        .map(Descriptor::from_json)
        .collect();
    BuiltImage {
        name: name.to_string(),
        archive: dir.join("image.tar"),
        layout_dir,
        import_ref,
        manifest_digest,
        layers,
        key,
    }
}

fn read_json(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// Identifies the converter, so a different ctr-remote invalidates cached conversions.
fn converter_key() -> String {
    let path = Path::new("/usr/bin/ctr-remote");
    let metadata =
        std::fs::metadata(path).expect("ctr-remote (stargz-snapshotter) must be installed");
    let modified = metadata
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    sha256_hex(format!("{}-{modified}-{ESTARGZ_CHUNK_SIZE}", metadata.len()).as_bytes())[..12]
        .to_string()
}

/// Put `format` of `image` into containerd under the local name `sluice.test/NAME:TAG`,
/// converting with ctr-remote unless a cached conversion exists.
fn import_variant(containerd: &TestContainerd, image: &BuiltImage, format: ImageFormat) -> String {
    let _guard = FIXTURE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let import = |archive: &Path| {
        containerd
            .ctr(&[
                "images",
                "import",
                "--no-unpack",
                &archive.to_string_lossy(),
            ])
            .unwrap_or_else(|e| panic!("importing {}: {e}", archive.display()))
    };
    let has_image = |reference: &str| {
        containerd
            .ctr(&["images", "ls", "-q"])
            .map(|list| list.lines().any(|l| l == reference))
            .unwrap_or(false)
    };
    if !has_image(&image.import_ref) {
        import(&image.archive);
    }
    if format == ImageFormat::Gzip {
        return image.import_ref.clone();
    }
    let local_ref = format!("sluice.test/{}:{}", image.name, format.tag());
    if has_image(&local_ref) {
        return local_ref;
    }
    let cached = fixtures_dir().join(format!(
        "{}-{}/{}-{}.tar",
        image.name,
        image.key,
        format.tag(),
        converter_key()
    ));
    if cached.exists() {
        import(&cached);
        if has_image(&local_ref) {
            return local_ref;
        }
    }
    let mut args = vec!["images".to_string(), "convert".into(), "--oci".into()];
    args.extend(format.convert_flags());
    args.push(image.import_ref.clone());
    args.push(local_ref.clone());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    containerd
        .ctr_remote(&args)
        .unwrap_or_else(|e| panic!("converting {} to {}: {e}", image.name, format.tag()));
    let staging = cached.with_extension(format!("tar.staging-{}", std::process::id()));
    containerd
        .ctr(&["images", "export", &staging.to_string_lossy(), &local_ref])
        .unwrap_or_else(|e| panic!("exporting converted {local_ref}: {e}"));
    std::fs::rename(&staging, &cached).expect("store converted image in the fixture cache");
    local_ref
}

/// Publish one variant of image `name` to `registry` as `HOST/sluice/NAME:TAG`.
pub fn publish(
    containerd: &TestContainerd,
    registry: &TestRegistry,
    name: &str,
    format: ImageFormat,
) -> PushedImage {
    let image = build_image(name);
    let local_ref = import_variant(containerd, &image, format);
    let repository = format!("sluice/{name}");
    let reference = format!("{}/{repository}:{}", registry.host(), format.tag());
    containerd
        .ctr(&["images", "tag", "--force", &local_ref, &reference])
        .unwrap_or_else(|e| panic!("tagging {local_ref} as {reference}: {e}"));
    let mut push = vec!["images", "push", "--plain-http"];
    let user = registry
        .credentials()
        .map(|(user, password)| format!("{user}:{password}"));
    if let Some(user) = &user {
        push.extend(["--user", user]);
    }
    push.push(&reference);
    containerd
        .ctr(&push)
        .unwrap_or_else(|e| panic!("pushing {reference}: {e}"));

    let manifest_bytes = fetch(
        registry,
        &format!("/v2/{repository}/manifests/{}", format.tag()),
        true,
    );
    let mut manifest: Value = serde_json::from_slice(&manifest_bytes).expect("manifest is JSON");
    let mut manifest_digest = format!("sha256:{}", sha256_hex(&manifest_bytes));
    if manifest.get("manifests").is_some() {
        let arch = host_arch();
        let chosen = manifest["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["platform"]["architecture"].as_str() == Some(arch))
            .unwrap_or_else(|| panic!("no {arch} manifest in index of {reference}"));
        manifest_digest = chosen["digest"].as_str().unwrap().to_string();
        let bytes = fetch(
            registry,
            &format!("/v2/{repository}/manifests/{manifest_digest}"),
            true,
        );
        manifest = serde_json::from_slice(&bytes).expect("manifest is JSON");
    }
    let config = Descriptor::from_json(&manifest["config"]);
    let layers: Vec<Descriptor> = manifest["layers"]
        .as_array()
        .expect("manifest without layers")
        .iter()
        .map(Descriptor::from_json)
        .collect();
    let config_json: Value = serde_json::from_slice(&fetch(
        registry,
        &format!("/v2/{repository}/blobs/{}", config.digest),
        false,
    ))
    .expect("image config is JSON");
    let diff_ids = config_json["rootfs"]["diff_ids"]
        .as_array()
        .expect("config without diff_ids")
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect();
    PushedImage {
        format,
        reference,
        repository,
        manifest_digest,
        manifest,
        config,
        layers,
        diff_ids,
        content_blobs: containerd
            .root()
            .join("io.containerd.content.v1.content/blobs"),
    }
}

/// Publish all three variants of image `name`.
pub fn publish_all(
    containerd: &TestContainerd,
    registry: &TestRegistry,
    name: &str,
) -> PublishedImages {
    PublishedImages {
        gzip: publish(containerd, registry, name, ImageFormat::Gzip),
        estargz: publish(containerd, registry, name, ImageFormat::Estargz),
        zstdchunked: publish(containerd, registry, name, ImageFormat::ZstdChunked),
    }
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// GET from the registry with curl (manifests with OCI/Docker Accept headers).
fn fetch(registry: &TestRegistry, path: &str, manifest: bool) -> Vec<u8> {
    let mut curl = Command::new("curl");
    curl.args(["-sS", "-f", "-L"]);
    if manifest {
        for media_type in [
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
        ] {
            curl.args(["-H", &format!("Accept: {media_type}")]);
        }
    }
    if let Some((user, password)) = registry.credentials() {
        curl.args(["-u", &format!("{user}:{password}")]);
    }
    curl.arg(format!("{}{path}", registry.url()));
    let output = curl.output().expect("spawn curl");
    assert!(
        output.status.success(),
        "GET {path} from {}: {}",
        registry.host(),
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

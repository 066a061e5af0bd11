//! `sluice convert`: rewrite an image's layers as eStargz or zstd:chunked, with the
//! files a container's start needs first.
//!
//! Per platform manifest: each layer is fetched into a temp file (its digest checked),
//! decompressed into a tar spool, and written by [`crate::format::writer`]; the config
//! gets the new diff_ids; the manifest gets the new descriptors. Nothing is half
//! written at the destination: an OCI layout is built in a sibling temp directory and
//! renamed into place; a registry receives every blob before the manifests, and the
//! tag is put last.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use crate::digest::{Digest, DigestWriter};
use crate::format::LayerFormat;
use crate::format::writer::{
    PrefetchOrder, TarMember, WriterError, WriterOptions, WrittenLayer, list_tar,
    write_chunked_layer,
};
use crate::prefetch::{
    ImageConfigInfo, ImagePath, LayerEntries, LayerEntry, LayerEntryKind, LayerPosition,
    LayerStackView, analyze_entrypoint,
};
use crate::registry::manifest::{
    DOCKER_CONFIG, DOCKER_MANIFEST, ManifestDocument, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST,
};
use crate::registry::{
    Descriptor, FetchPriority, ImageIndex, ImageManifest, ImageReference, Platform, RegistryClient,
    RegistryError, push,
};

const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
/// Bytes fetched per range request when downloading a layer, and so held in memory.
const DOWNLOAD_WINDOW: u64 = 8 << 20;

/// A conversion that failed, naming the image and, where it applies, the layer.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{image}: {source}")]
    Registry {
        image: String,
        #[source]
        source: Box<RegistryError>,
    },
    #[error("{image}: {reason}")]
    Layout { image: String, reason: String },
    #[error("{image}: no platform {platform} in the index (it has: {available})")]
    PlatformNotFound {
        image: String,
        platform: String,
        available: String,
    },
    #[error("{image}: {what} is not a valid image document: {reason}")]
    BadDocument {
        image: String,
        what: String,
        reason: String,
    },
    #[error(
        "{image}: layer {layer} has media type {media_type:?}, which sluice cannot convert \
         (supported: tar, tar+gzip, tar+zstd, OCI or Docker)"
    )]
    UnsupportedMediaType {
        image: String,
        layer: Digest,
        media_type: String,
    },
    #[error(
        "{image}: layer {layer} is corrupt: its content hashes to {actual}; \
         the source is damaged, fetch or rebuild it"
    )]
    LayerDigestMismatch {
        image: String,
        layer: Digest,
        actual: Digest,
    },
    #[error("{image}: layer {layer}: {reason}")]
    LayerUnreadable {
        image: String,
        layer: Digest,
        reason: String,
    },
    #[error("{image}: layer {layer}: {source}")]
    Write {
        image: String,
        layer: Digest,
        #[source]
        source: WriterError,
    },
    #[error("{image}: prefetch analysis: {reason}")]
    Prefetch { image: String, reason: String },
    #[error("reading the prefetch list {path}: {source}")]
    PrefetchFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid image location {location:?}: {reason}")]
    BadLocation { location: String, reason: String },
}

/// Where an image is read from or written to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageLocation {
    Registry(ImageReference),
    /// `oci:DIR[:TAG]`: an OCI image layout directory.
    Layout {
        dir: PathBuf,
        tag: Option<String>,
    },
}

impl FromStr for ImageLocation {
    type Err = ConvertError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = text.strip_prefix("oci:") {
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((dir, tag)) if !tag.contains('/') && !dir.is_empty() => {
                    (dir, Some(tag.to_owned()))
                }
                _ => (rest, None),
            };
            if dir.is_empty() {
                return Err(ConvertError::BadLocation {
                    location: text.into(),
                    reason: "no directory after oci:".into(),
                });
            }
            return Ok(Self::Layout {
                dir: PathBuf::from(dir),
                tag: tag.filter(|t| !t.is_empty()),
            });
        }
        text.parse()
            .map(Self::Registry)
            .map_err(|e: RegistryError| ConvertError::BadLocation {
                location: text.into(),
                reason: e.to_string(),
            })
    }
}

impl std::fmt::Display for ImageLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Registry(reference) => write!(f, "{reference}"),
            Self::Layout { dir, tag: None } => write!(f, "oci:{}", dir.display()),
            Self::Layout {
                dir,
                tag: Some(tag),
            } => write!(f, "oci:{}:{tag}", dir.display()),
        }
    }
}

/// Which files to put first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrefetchSource {
    /// The files [`crate::prefetch::analyze_entrypoint`] finds for the image's command.
    Entrypoint,
    /// These absolute paths, in this order.
    Files(Vec<String>),
    /// None: every layer gets `.no.prefetch.landmark`.
    None,
}

impl PrefetchSource {
    /// Reads a prefetch list: one absolute path per line; blank lines and `#` comments
    /// are skipped.
    pub fn from_file(path: &Path) -> Result<Self, ConvertError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConvertError::PrefetchFile {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self::Files(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned)
                .collect(),
        ))
    }
}

/// Which manifests of an index to convert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlatformChoice {
    /// One platform; the result is a single manifest.
    One(Platform),
    /// Every platform; the result is an index.
    All,
}

#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub format: LayerFormat,
    pub prefetch: PrefetchSource,
    pub chunk_size: u64,
    /// `None`: the format's default (gzip 9, zstd 3).
    pub compression_level: Option<i32>,
    /// Compression threads per layer.
    pub threads: usize,
    pub platforms: PlatformChoice,
    /// Progress bars on stderr when it is a terminal.
    pub progress: bool,
    /// Where temp files go (default: the system temp dir).
    pub temp_dir: Option<PathBuf>,
}

impl ConvertOptions {
    pub fn new(format: LayerFormat) -> Self {
        let defaults = WriterOptions::new(format);
        Self {
            format,
            prefetch: PrefetchSource::None,
            chunk_size: defaults.chunk_size,
            compression_level: None,
            threads: defaults.threads,
            platforms: PlatformChoice::One(Platform::default()),
            progress: true,
            temp_dir: None,
        }
    }
}

/// One converted manifest.
#[derive(Debug, Clone)]
pub struct ConvertedManifest {
    pub platform: Option<Platform>,
    pub manifest_digest: Digest,
    pub config_digest: Digest,
    pub layers: Vec<WrittenLayer>,
}

/// The result of a conversion.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    /// Digest and media type of what DST now names (a manifest or an index).
    pub digest: Digest,
    pub media_type: String,
    pub manifests: Vec<ConvertedManifest>,
}

/// Converts `src` into `dst`.
pub async fn convert_image(
    client: &Arc<RegistryClient>,
    src: &ImageLocation,
    dst: &ImageLocation,
    options: &ConvertOptions,
) -> Result<ConvertReport, ConvertError> {
    let image = src.to_string();
    let source = Source {
        client: Arc::clone(client),
        location: src.clone(),
        image: image.clone(),
    };
    let temp = tempfile::Builder::new()
        .prefix("sluice-convert-")
        .tempdir_in(options.temp_dir.clone().unwrap_or_else(std::env::temp_dir))
        .map_err(|source| ConvertError::Io {
            what: "creating a temp directory in",
            path: options.temp_dir.clone().unwrap_or_else(std::env::temp_dir),
            source,
        })?;
    let mut out = Output::new(client, dst)?;
    let (top_bytes, top_type, _) = source.top().await?;
    let doc = ManifestDocument::parse(&top_bytes, top_type.as_deref()).map_err(|reason| {
        ConvertError::BadDocument {
            image: image.clone(),
            what: "the top-level manifest".into(),
            reason,
        }
    })?;
    let progress = Progress::new(options.progress);
    let report = match doc {
        ManifestDocument::Image { manifest, .. } => {
            let converted = convert_manifest(
                &source,
                &mut out,
                manifest,
                None,
                options,
                &progress,
                temp.path(),
            )
            .await?;
            let (digest, media_type) = (converted.0.manifest_digest.clone(), OCI_MANIFEST);
            ConvertReport {
                digest,
                media_type: media_type.into(),
                manifests: vec![converted.0],
            }
        }
        ManifestDocument::Index { index, .. } => {
            let chosen: Vec<&Descriptor> =
                match &options.platforms {
                    PlatformChoice::All => index
                        .manifests
                        .iter()
                        .filter(|d| matches!(d.media_type.as_str(), OCI_MANIFEST | DOCKER_MANIFEST))
                        .filter(|d| !is_attestation(d))
                        .collect(),
                    PlatformChoice::One(platform) => {
                        vec![index.select(platform).ok_or_else(|| {
                            ConvertError::PlatformNotFound {
                                image: image.clone(),
                                platform: platform.to_string(),
                                available: index.platforms(),
                            }
                        })?]
                    }
                };
            let mut manifests = Vec::new();
            let mut descriptors = Vec::new();
            for descriptor in chosen {
                let bytes = source.manifest(&descriptor.digest).await?;
                let manifest = match ManifestDocument::parse(&bytes, Some(&descriptor.media_type)) {
                    Ok(ManifestDocument::Image { manifest, .. }) => manifest,
                    Ok(ManifestDocument::Index { .. }) => {
                        return Err(ConvertError::BadDocument {
                            image: image.clone(),
                            what: format!("manifest {}", descriptor.digest),
                            reason: "an index entry for a platform points to another index".into(),
                        });
                    }
                    Err(reason) => {
                        return Err(ConvertError::BadDocument {
                            image: image.clone(),
                            what: format!("manifest {}", descriptor.digest),
                            reason,
                        });
                    }
                };
                let (converted, size) = convert_manifest(
                    &source,
                    &mut out,
                    manifest,
                    descriptor.platform.clone(),
                    options,
                    &progress,
                    temp.path(),
                )
                .await?;
                descriptors.push(Descriptor {
                    media_type: OCI_MANIFEST.into(),
                    digest: converted.manifest_digest.clone(),
                    size,
                    annotations: descriptor.annotations.clone(),
                    platform: descriptor.platform.clone(),
                });
                manifests.push(converted);
            }
            if options.platforms == PlatformChoice::All {
                let new_index = ImageIndex {
                    schema_version: 2,
                    media_type: Some(OCI_INDEX.into()),
                    manifests: descriptors,
                    annotations: index.annotations.clone(),
                };
                let bytes = to_json(&new_index);
                let digest = Digest::sha256_of(&bytes);
                out.put_manifest(&digest, OCI_INDEX, bytes).await?;
                ConvertReport {
                    digest,
                    media_type: OCI_INDEX.into(),
                    manifests,
                }
            } else {
                ConvertReport {
                    digest: manifests[0].manifest_digest.clone(),
                    media_type: OCI_MANIFEST.into(),
                    manifests,
                }
            }
        }
    };
    out.commit(&report).await?;
    drop(temp);
    Ok(report)
}

fn is_attestation(d: &Descriptor) -> bool {
    d.annotations
        .get("vnd.docker.reference.type")
        .is_some_and(|t| t == "attestation-manifest")
}

fn to_json<T: serde::Serialize>(value: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("serializing plain structs cannot fail"))
}

/// A layer fetched and decompressed into a tar spool.
struct SpooledLayer {
    descriptor: Descriptor,
    tar: tempfile::NamedTempFile,
    members: Vec<TarMember>,
}

async fn convert_manifest(
    source: &Source,
    out: &mut Output,
    manifest: ImageManifest,
    platform: Option<Platform>,
    options: &ConvertOptions,
    progress: &Progress,
    temp: &Path,
) -> Result<(ConvertedManifest, u64), ConvertError> {
    let image = &source.image;
    let config_bytes = source.small_blob(&manifest.config.digest).await?;
    let mut config: Value =
        serde_json::from_slice(&config_bytes).map_err(|e| ConvertError::BadDocument {
            image: image.clone(),
            what: format!("config {}", manifest.config.digest),
            reason: e.to_string(),
        })?;
    for layer in &manifest.layers {
        decompressor_for(image, layer)?;
    }
    let mut spooled = Vec::with_capacity(manifest.layers.len());
    for layer in &manifest.layers {
        spooled.push(spool_layer(source, layer, temp, progress).await?);
    }
    let orders = prefetch_orders(image, &options.prefetch, &config_bytes, &spooled)?;
    let mut writer_options = WriterOptions::new(options.format);
    writer_options.chunk_size = options.chunk_size;
    writer_options.threads = options.threads.max(1);
    if let Some(level) = options.compression_level {
        writer_options.compression_level = level;
    }
    let mut written_layers = Vec::with_capacity(spooled.len());
    let mut new_layers = Vec::with_capacity(spooled.len());
    for (layer, order) in spooled.into_iter().zip(orders) {
        let bar = progress.bar(
            layer.tar.as_file().metadata().map_or(0, |m| m.len()),
            &format!("write {}", short(&layer.descriptor.digest)),
        );
        let mut blob =
            tempfile::NamedTempFile::new_in(temp).map_err(|source| ConvertError::Io {
                what: "creating a temp file in",
                path: temp.to_owned(),
                source,
            })?;
        let digest = layer.descriptor.digest.clone();
        let layer_digest = digest.clone();
        let image_name = image.clone();
        let opts = writer_options.clone();
        let (written, blob) = tokio::task::spawn_blocking(move || {
            let result = {
                let mut buffered = io::BufWriter::with_capacity(1 << 20, blob.as_file_mut());
                let report = |n: u64| bar.set_position(n);
                let written =
                    write_chunked_layer(layer.tar.as_file(), &mut buffered, &order, &opts, &report);
                written.and_then(|w| {
                    buffered.flush().map_err(WriterError::Output)?;
                    Ok(w)
                })
            };
            bar.finish_and_clear();
            result
                .map(|w| (w, blob))
                .map_err(|source| ConvertError::Write {
                    image: image_name,
                    layer: digest,
                    source,
                })
        })
        .await
        .map_err(|e| ConvertError::LayerUnreadable {
            image: image.clone(),
            layer: layer_digest.clone(),
            reason: format!("the layer writer thread failed: {e}"),
        })??;
        out.put_blob_file(&written.digest, written.size, blob)
            .await?;
        new_layers.push(Descriptor {
            media_type: written.media_type().into(),
            digest: written.digest.clone(),
            size: written.size,
            annotations: written.annotations.clone(),
            platform: None,
        });
        written_layers.push(written);
    }
    let diff_ids: Vec<Value> = written_layers
        .iter()
        .map(|w| Value::String(w.diff_id.to_string()))
        .collect();
    match config.pointer_mut("/rootfs/diff_ids") {
        Some(slot) => *slot = Value::Array(diff_ids),
        None => {
            return Err(ConvertError::BadDocument {
                image: image.clone(),
                what: format!("config {}", manifest.config.digest),
                reason: "it has no rootfs.diff_ids".into(),
            });
        }
    }
    let new_config = to_json(&config);
    let config_digest = Digest::sha256_of(&new_config);
    let config_descriptor = Descriptor {
        media_type: match manifest.config.media_type.as_str() {
            DOCKER_CONFIG => OCI_CONFIG.into(),
            other => other.into(),
        },
        digest: config_digest.clone(),
        size: new_config.len() as u64,
        annotations: manifest.config.annotations.clone(),
        platform: None,
    };
    out.put_blob_bytes(&config_digest, new_config).await?;
    let new_manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.into()),
        config: config_descriptor,
        layers: new_layers,
        annotations: manifest.annotations.clone(),
    };
    let bytes = to_json(&new_manifest);
    let size = bytes.len() as u64;
    let manifest_digest = Digest::sha256_of(&bytes);
    out.put_manifest(&manifest_digest, OCI_MANIFEST, bytes)
        .await?;
    Ok((
        ConvertedManifest {
            platform,
            manifest_digest,
            config_digest,
            layers: written_layers,
        },
        size,
    ))
}

fn short(digest: &Digest) -> &str {
    digest.hex().get(..12).unwrap_or_default()
}

#[derive(Clone, Copy)]
enum Decompressor {
    Gzip,
    Zstd,
    Plain,
}

fn decompressor_for(image: &str, layer: &Descriptor) -> Result<Decompressor, ConvertError> {
    let media_type = layer.media_type.as_str();
    let base = media_type
        .strip_prefix("application/vnd.oci.image.layer.nondistributable.v1.")
        .or_else(|| media_type.strip_prefix("application/vnd.oci.image.layer.v1."));
    match (base, media_type) {
        (Some("tar+gzip"), _) | (_, "application/vnd.docker.image.rootfs.diff.tar.gzip") => {
            Ok(Decompressor::Gzip)
        }
        (Some("tar+zstd"), _) | (_, "application/vnd.docker.image.rootfs.diff.tar.zstd") => {
            Ok(Decompressor::Zstd)
        }
        (Some("tar"), _) | (_, "application/vnd.docker.image.rootfs.diff.tar") => {
            Ok(Decompressor::Plain)
        }
        _ => Err(ConvertError::UnsupportedMediaType {
            image: image.into(),
            layer: layer.digest.clone(),
            media_type: media_type.into(),
        }),
    }
}

async fn spool_layer(
    source: &Source,
    layer: &Descriptor,
    temp: &Path,
    progress: &Progress,
) -> Result<SpooledLayer, ConvertError> {
    let image = source.image.clone();
    let decompressor = decompressor_for(&image, layer)?;
    let temp_file = || {
        tempfile::NamedTempFile::new_in(temp).map_err(|source| ConvertError::Io {
            what: "creating a temp file in",
            path: temp.to_owned(),
            source,
        })
    };
    let mut compressed = temp_file()?;
    let bar = progress.bar(layer.size, &format!("fetch {}", short(&layer.digest)));
    source
        .layer_to_file(layer, compressed.as_file_mut(), &bar)
        .await?;
    bar.finish_and_clear();
    let mut tar = temp_file()?;
    let descriptor = layer.clone();
    tokio::task::spawn_blocking(move || {
        let unreadable = |reason: String| ConvertError::LayerUnreadable {
            image: image.clone(),
            layer: descriptor.digest.clone(),
            reason,
        };
        let input = io::BufReader::with_capacity(
            1 << 20,
            compressed
                .reopen()
                .map_err(|e| unreadable(format!("reopening the downloaded blob: {e}")))?,
        );
        let mut reader: Box<dyn Read> = match decompressor {
            Decompressor::Gzip => Box::new(flate2::read::MultiGzDecoder::new(input)),
            Decompressor::Zstd => Box::new(
                zstd::stream::read::Decoder::with_buffer(input)
                    .map_err(|e| unreadable(format!("zstd: {e}")))?,
            ),
            Decompressor::Plain => Box::new(input),
        };
        let mut out = io::BufWriter::with_capacity(1 << 20, tar.as_file_mut());
        io::copy(&mut reader, &mut out).map_err(|e| unreadable(format!("decompressing: {e}")))?;
        out.flush()
            .map_err(|e| unreadable(format!("writing the tar spool: {e}")))?;
        drop(out);
        drop(compressed);
        let members = list_tar(tar.as_file()).map_err(|source| ConvertError::Write {
            image: image.clone(),
            layer: descriptor.digest.clone(),
            source,
        })?;
        Ok(SpooledLayer {
            descriptor,
            tar,
            members,
        })
    })
    .await
    .map_err(|e| ConvertError::LayerUnreadable {
        image: source.image.clone(),
        layer: layer.digest.clone(),
        reason: format!("the decompression thread failed: {e}"),
    })?
}

/// The per-layer file order for each spooled layer.
fn prefetch_orders(
    image: &str,
    prefetch: &PrefetchSource,
    config: &[u8],
    layers: &[SpooledLayer],
) -> Result<Vec<PrefetchOrder>, ConvertError> {
    match prefetch {
        PrefetchSource::None => Ok(vec![PrefetchOrder::None; layers.len()]),
        PrefetchSource::Files(files) => Ok(vec![PrefetchOrder::Files(files.clone()); layers.len()]),
        PrefetchSource::Entrypoint => {
            let info =
                ImageConfigInfo::from_oci_config(config).map_err(|e| ConvertError::Prefetch {
                    image: image.into(),
                    reason: format!("reading Entrypoint/Cmd from the config: {e}"),
                })?;
            let entries: Vec<LayerEntries> =
                layers.iter().map(|l| layer_entries(&l.members)).collect();
            let content = |layer: LayerPosition, path: &ImagePath, offset: u64, max_len: usize| {
                read_member(&layers[layer.0], path, offset, max_len)
            };
            let view = LayerStackView::new(entries, content);
            let list = analyze_entrypoint(&view, &info).map_err(|e| ConvertError::Prefetch {
                image: image.into(),
                reason: e.to_string(),
            })?;
            for warning in &list.warnings {
                tracing::info!(%image, %warning, "prefetch analysis");
            }
            Ok(view
                .split_by_layer(list.paths())
                .into_iter()
                .map(|paths| {
                    PrefetchOrder::Files(paths.iter().map(|p| p.as_str().to_owned()).collect())
                })
                .collect())
        }
    }
}

fn layer_entries(members: &[TarMember]) -> LayerEntries {
    members
        .iter()
        .filter(|m| !m.path.is_empty())
        .map(|m| {
            let kind = match m.kind {
                "reg" => LayerEntryKind::File { size: m.size },
                "dir" => LayerEntryKind::Dir,
                "symlink" => LayerEntryKind::Symlink {
                    target: m.link_target.clone().unwrap_or_default(),
                },
                "hardlink" => LayerEntryKind::Hardlink {
                    target: ImagePath::new(m.link_target.as_deref().unwrap_or_default()),
                },
                _ => LayerEntryKind::Other,
            };
            (ImagePath::new(&m.path), LayerEntry { kind, mode: m.mode })
        })
        .collect()
}

fn read_member(
    layer: &SpooledLayer,
    path: &ImagePath,
    offset: u64,
    max_len: usize,
) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let wanted = path.as_str().trim_start_matches('/');
    let member = layer
        .members
        .iter()
        .rev()
        .find(|m| m.path == wanted && m.kind == "reg")
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{wanted} not in layer")))?;
    let len = (max_len as u64).min(member.size.saturating_sub(offset)) as usize;
    let mut buf = vec![0u8; len];
    layer
        .tar
        .as_file()
        .read_exact_at(&mut buf, member.data_start + offset)?;
    Ok(buf)
}

/// Progress bars on a terminal; nothing otherwise.
struct Progress {
    multi: Option<MultiProgress>,
}

impl Progress {
    fn new(enabled: bool) -> Self {
        let multi = (enabled && io::stderr().is_terminal())
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Self { multi }
    }

    fn bar(&self, len: u64, label: &str) -> ProgressBar {
        let Some(multi) = &self.multi else {
            return ProgressBar::hidden();
        };
        let bar = multi.add(ProgressBar::new(len));
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:20} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(label.to_owned());
        bar
    }
}

/// Where the input comes from.
struct Source {
    client: Arc<RegistryClient>,
    location: ImageLocation,
    image: String,
}

impl Source {
    fn registry_error(&self, source: RegistryError) -> ConvertError {
        ConvertError::Registry {
            image: self.image.clone(),
            source: Box::new(source),
        }
    }

    fn layout_error(&self, reason: String) -> ConvertError {
        ConvertError::Layout {
            image: self.image.clone(),
            reason,
        }
    }

    /// The document SRC names: bytes, media type, digest.
    async fn top(&self) -> Result<(Bytes, Option<String>, Digest), ConvertError> {
        match &self.location {
            ImageLocation::Registry(reference) => self
                .client
                .fetch_manifest(reference.repository(), reference.manifest_reference())
                .await
                .map_err(|e| self.registry_error(e)),
            ImageLocation::Layout { dir, tag } => {
                let index_path = dir.join("index.json");
                let bytes = std::fs::read(&index_path).map_err(|e| {
                    self.layout_error(format!(
                        "cannot read {}: {e} (is it an OCI image layout?)",
                        index_path.display()
                    ))
                })?;
                let index: ImageIndex = serde_json::from_slice(&bytes).map_err(|e| {
                    self.layout_error(format!("{} is not an OCI index: {e}", index_path.display()))
                })?;
                let found: Vec<&Descriptor> = index
                    .manifests
                    .iter()
                    .filter(|d| match tag {
                        Some(tag) => d.annotations.get(REF_NAME_ANNOTATION) == Some(tag),
                        None => true,
                    })
                    .collect();
                let descriptor = match (found.as_slice(), tag) {
                    ([one], _) => *one,
                    ([], Some(tag)) => {
                        return Err(self.layout_error(format!("no image tagged {tag:?}")));
                    }
                    ([], None) => return Err(self.layout_error("the layout is empty".into())),
                    (_, _) => {
                        return Err(self.layout_error(
                            "the layout holds several images; name one as oci:DIR:TAG".into(),
                        ));
                    }
                };
                let bytes = self.manifest(&descriptor.digest).await?;
                Ok((
                    bytes,
                    Some(descriptor.media_type.clone()),
                    descriptor.digest.clone(),
                ))
            }
        }
    }

    async fn manifest(&self, digest: &Digest) -> Result<Bytes, ConvertError> {
        match &self.location {
            ImageLocation::Registry(reference) => self
                .client
                .fetch_manifest(reference.repository(), digest.as_str())
                .await
                .map(|(bytes, _, _)| bytes)
                .map_err(|e| self.registry_error(e)),
            ImageLocation::Layout { .. } => self.small_blob(digest).await,
        }
    }

    async fn small_blob(&self, digest: &Digest) -> Result<Bytes, ConvertError> {
        match &self.location {
            ImageLocation::Registry(reference) => self
                .client
                .fetch_blob(reference.repository(), digest)
                .await
                .map_err(|e| self.registry_error(e)),
            ImageLocation::Layout { dir, .. } => {
                let path = blob_path(dir, digest);
                let bytes = std::fs::read(&path).map_err(|e| {
                    self.layout_error(format!("cannot read blob {}: {e}", path.display()))
                })?;
                if !digest.matches(&bytes) {
                    return Err(self.layout_error(format!(
                        "blob {digest} is corrupt: its content hashes to {}",
                        Digest::sha256_of(&bytes)
                    )));
                }
                Ok(Bytes::from(bytes))
            }
        }
    }

    /// Copies a layer blob into `file`, checking size and digest.
    async fn layer_to_file(
        &self,
        layer: &Descriptor,
        file: &mut File,
        bar: &ProgressBar,
    ) -> Result<(), ConvertError> {
        let mut hasher = DigestWriter::new();
        let mut written = 0u64;
        let local = |e: io::Error| ConvertError::LayerUnreadable {
            image: self.image.clone(),
            layer: layer.digest.clone(),
            reason: format!("writing the downloaded blob to a temp file: {e}"),
        };
        match &self.location {
            ImageLocation::Registry(reference) => {
                while written < layer.size {
                    let end = (written + DOWNLOAD_WINDOW).min(layer.size);
                    let piece = self
                        .client
                        .read_range(
                            reference.repository(),
                            &layer.digest,
                            layer.size,
                            written..end,
                            FetchPriority::Prefetch,
                        )
                        .await
                        .map_err(|e| self.registry_error(e))?;
                    hasher.update(&piece);
                    file.write_all(&piece).map_err(local)?;
                    written = end;
                    bar.set_position(written);
                }
            }
            ImageLocation::Layout { dir, .. } => {
                let path = blob_path(dir, &layer.digest);
                let mut input = File::open(&path).map_err(|e| ConvertError::LayerUnreadable {
                    image: self.image.clone(),
                    layer: layer.digest.clone(),
                    reason: format!("cannot open {}: {e}", path.display()),
                })?;
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = input.read(&mut buf).map_err(local)?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    file.write_all(&buf[..n]).map_err(local)?;
                    written += n as u64;
                    bar.set_position(written);
                }
            }
        }
        file.flush().map_err(local)?;
        let actual = hasher.finish();
        if actual != layer.digest || written != layer.size {
            return Err(ConvertError::LayerDigestMismatch {
                image: self.image.clone(),
                layer: layer.digest.clone(),
                actual,
            });
        }
        Ok(())
    }
}

fn blob_path(dir: &Path, digest: &Digest) -> PathBuf {
    dir.join("blobs").join("sha256").join(digest.hex())
}

/// Where the output goes.
enum Output {
    Registry {
        client: Arc<RegistryClient>,
        reference: ImageReference,
        image: String,
    },
    Layout {
        final_dir: PathBuf,
        tag: Option<String>,
        staging: tempfile::TempDir,
        image: String,
    },
}

impl Output {
    fn new(client: &Arc<RegistryClient>, dst: &ImageLocation) -> Result<Self, ConvertError> {
        let image = dst.to_string();
        match dst {
            ImageLocation::Registry(reference) => Ok(Self::Registry {
                client: Arc::clone(client),
                reference: reference.clone(),
                image,
            }),
            ImageLocation::Layout { dir, tag } => {
                if dir.exists() && std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_some()) {
                    return Err(ConvertError::Layout {
                        image,
                        reason: "the destination directory exists and is not empty; \
                                 name a new directory"
                            .into(),
                    });
                }
                let parent = match dir.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
                    _ => PathBuf::from("."),
                };
                let staging = tempfile::Builder::new()
                    .prefix(".sluice-convert-")
                    .tempdir_in(&parent)
                    .map_err(|source| ConvertError::Io {
                        what: "creating a staging directory in",
                        path: parent.clone(),
                        source,
                    })?;
                let blobs = staging.path().join("blobs").join("sha256");
                std::fs::create_dir_all(&blobs).map_err(|source| ConvertError::Io {
                    what: "creating",
                    path: blobs.clone(),
                    source,
                })?;
                Ok(Self::Layout {
                    final_dir: dir.clone(),
                    tag: tag.clone(),
                    staging,
                    image,
                })
            }
        }
    }

    fn push_error(image: &str, source: RegistryError) -> ConvertError {
        ConvertError::Registry {
            image: image.to_owned(),
            source: Box::new(source),
        }
    }

    async fn put_blob_file(
        &mut self,
        digest: &Digest,
        size: u64,
        file: tempfile::NamedTempFile,
    ) -> Result<(), ConvertError> {
        match self {
            Self::Registry {
                client,
                reference,
                image,
            } => {
                push::push_blob_file(client, reference.repository(), digest, size, file.path())
                    .await
                    .map_err(|e| Self::push_error(image, e))?;
                Ok(())
            }
            Self::Layout { staging, .. } => {
                let path = blob_path(staging.path(), digest);
                file.persist(&path).map_err(|e| ConvertError::Io {
                    what: "storing the blob at",
                    path,
                    source: e.error,
                })?;
                Ok(())
            }
        }
    }

    async fn put_blob_bytes(&mut self, digest: &Digest, bytes: Bytes) -> Result<(), ConvertError> {
        match self {
            Self::Registry {
                client,
                reference,
                image,
            } => {
                push::push_blob_bytes(client, reference.repository(), digest, bytes)
                    .await
                    .map_err(|e| Self::push_error(image, e))?;
                Ok(())
            }
            Self::Layout { staging, .. } => {
                let path = blob_path(staging.path(), digest);
                std::fs::write(&path, &bytes).map_err(|source| ConvertError::Io {
                    what: "writing",
                    path,
                    source,
                })
            }
        }
    }

    /// Stores a manifest by digest (the tag comes in [`Self::commit`]).
    async fn put_manifest(
        &mut self,
        digest: &Digest,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<(), ConvertError> {
        match self {
            Self::Registry {
                client,
                reference,
                image,
            } => push::push_manifest(
                client,
                reference.repository(),
                digest.as_str(),
                media_type,
                bytes,
            )
            .await
            .map_err(|e| Self::push_error(image, e)),
            Self::Layout { .. } => self.put_blob_bytes(digest, bytes).await,
        }
    }

    /// Makes the result visible under DST's name.
    async fn commit(self, report: &ConvertReport) -> Result<(), ConvertError> {
        match self {
            Self::Registry {
                client,
                reference,
                image,
            } => {
                let tag = reference.manifest_reference();
                if tag == report.digest.as_str() {
                    return Ok(());
                }
                let bytes = client
                    .fetch_manifest(reference.repository(), report.digest.as_str())
                    .await
                    .map_err(|e| Self::push_error(&image, e))?
                    .0;
                push::push_manifest(
                    &client,
                    reference.repository(),
                    tag,
                    &report.media_type,
                    bytes,
                )
                .await
                .map_err(|e| Self::push_error(&image, e))
            }
            Self::Layout {
                final_dir,
                tag,
                staging,
                image,
            } => {
                let size = std::fs::metadata(blob_path(staging.path(), &report.digest))
                    .map_err(|source| ConvertError::Io {
                        what: "reading",
                        path: blob_path(staging.path(), &report.digest),
                        source,
                    })?
                    .len();
                let mut annotations = BTreeMap::new();
                if let Some(tag) = &tag {
                    annotations.insert(REF_NAME_ANNOTATION.to_owned(), tag.clone());
                }
                let platform = match report.manifests.as_slice() {
                    [one] if report.media_type == OCI_MANIFEST => one.platform.clone(),
                    _ => None,
                };
                let index = ImageIndex {
                    schema_version: 2,
                    media_type: Some(OCI_INDEX.into()),
                    manifests: vec![Descriptor {
                        media_type: report.media_type.clone(),
                        digest: report.digest.clone(),
                        size,
                        annotations,
                        platform,
                    }],
                    annotations: BTreeMap::new(),
                };
                let write = |name: &str, bytes: &[u8]| {
                    let path = staging.path().join(name);
                    std::fs::write(&path, bytes).map_err(|source| ConvertError::Io {
                        what: "writing",
                        path,
                        source,
                    })
                };
                write("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
                write("index.json", &to_json(&index))?;
                let staged = staging.keep();
                std::fs::rename(&staged, &final_dir).map_err(|source| {
                    let _ = std::fs::remove_dir_all(&staged);
                    ConvertError::Layout {
                        image,
                        reason: format!(
                            "moving the finished layout into place at {}: {source}",
                            final_dir.display()
                        ),
                    }
                })
            }
        }
    }
}

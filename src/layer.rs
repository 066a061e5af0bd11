//! Opening a remote layer: footer → TOC → validated [`LayerIndex`], ready for the cache
//! and the filesystem.
//!
//! The compressed TOC and the blob's tail are kept on disk (`<cache>/tocs/`), so a
//! restarted daemon mounts its layers again without asking the registry — also when
//! the registry is down at that moment. What is kept is re-validated on every open: the
//! same code path, and a damaged file is never trusted.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use crate::cache::Layer;
use crate::digest::Digest;
use crate::format::{self, Footer, FormatError, LayerFormat, LayerIndex};
use crate::registry::{
    BlobReadError, BlobSource, Descriptor, FetchPriority, RegistryClient, Repository,
};

/// Bytes read from the end of a blob on open. Most TOCs fit, so footer and TOC usually
/// arrive in one request instead of two.
const TAIL_READ: u64 = 64 << 10;

/// A layer that could not be opened, with the image and layer it was.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("layer {layer} of {image}: {source}")]
    Read {
        image: String,
        layer: Digest,
        #[source]
        source: BlobReadError,
    },
    #[error(
        "layer {layer} of {image} ({media_type}) is a plain compressed tar, not eStargz or zstd:chunked, \
         so it cannot be mounted lazily: convert the image (`sluice convert` or \
         `ctr-remote images convert --estargz --oci`) or pull it normally"
    )]
    NotChunked {
        image: String,
        layer: Digest,
        media_type: String,
    },
    #[error("layer {layer} of {image}: {source}")]
    Format {
        image: String,
        layer: Digest,
        #[source]
        source: FormatError,
    },
    #[error(
        "layer {layer} of {image}: the annotation {annotation} is not a valid digest: {value:?}"
    )]
    BadAnnotation {
        image: String,
        layer: Digest,
        annotation: &'static str,
        value: String,
    },
}

/// A layer ready to serve, and what was learned while opening it.
#[derive(Debug, Clone)]
pub struct OpenedLayer {
    pub layer: Arc<Layer>,
    pub footer: Footer,
    /// sha256 of the uncompressed TOC JSON.
    pub toc_digest: Digest,
    /// Whether the TOC came from the local TOC store rather than the registry.
    pub from_store: bool,
}

impl OpenedLayer {
    pub fn index(&self) -> &Arc<LayerIndex> {
        self.layer.index()
    }

    pub fn format(&self) -> LayerFormat {
        self.footer.format
    }
}

/// Where opened layers' TOCs are kept for restarts: `<dir>/<layer hex>.tail` (the
/// blob's last bytes, holding the footer) and `<dir>/<layer hex>.toc`.
#[derive(Debug, Clone)]
pub struct TocStore {
    dir: PathBuf,
}

impl TocStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn paths(&self, layer: &Digest) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{}.tail", layer.hex())),
            self.dir.join(format!("{}.toc", layer.hex())),
        )
    }

    async fn load(&self, layer: &Digest) -> Option<(Vec<u8>, Vec<u8>)> {
        let (tail, toc) = self.paths(layer);
        let tail = tokio::fs::read(tail).await.ok()?;
        let toc = tokio::fs::read(toc).await.ok()?;
        Some((tail, toc))
    }

    /// Best effort: a store that cannot be written only costs a registry round trip on
    /// the next open.
    async fn save(&self, layer: &Digest, tail: &[u8], toc: &[u8]) {
        let (tail_path, toc_path) = self.paths(layer);
        let result = async {
            tokio::fs::create_dir_all(&self.dir).await?;
            write_atomically(&toc_path, toc).await?;
            write_atomically(&tail_path, tail).await
        }
        .await;
        if let Err(error) = result {
            tracing::warn!(%layer, dir = %self.dir.display(), %error, "cannot keep the layer's TOC for restarts");
        }
    }

    /// Forget a layer's TOC (its snapshot was removed).
    pub async fn remove(&self, layer: &Digest) {
        let (tail, toc) = self.paths(layer);
        let _ = tokio::fs::remove_file(tail).await;
        let _ = tokio::fs::remove_file(toc).await;
    }
}

async fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    tokio::fs::write(&tmp, bytes).await?;
    tokio::fs::rename(&tmp, path).await
}

/// Open one layer of `image` (a label used in errors and logs, e.g. the reference).
/// The TOC comes from `store` when it has it, else from the registry (and is then kept
/// in `store`). The TOC must match the layer's TOC digest annotation when present.
pub async fn open_remote_layer(
    client: &Arc<RegistryClient>,
    image: &str,
    repository: &Repository,
    descriptor: &Descriptor,
    store: Option<&TocStore>,
) -> Result<OpenedLayer, LayerError> {
    let digest = &descriptor.digest;
    let expected_toc = match descriptor.annotations.get(format::TOC_DIGEST_ANNOTATION) {
        Some(value) => Some(
            value
                .parse::<Digest>()
                .map_err(|_| LayerError::BadAnnotation {
                    image: image.to_owned(),
                    layer: digest.clone(),
                    annotation: format::TOC_DIGEST_ANNOTATION,
                    value: value.clone(),
                })?,
        ),
        None => None,
    };
    let blob: Arc<dyn BlobSource> =
        Arc::new(client.remote_blob(repository.clone(), digest.clone(), descriptor.size));
    let label = format!("{image} layer {digest}");
    let format_error = |source| match source {
        FormatError::NotChunked { .. } => LayerError::NotChunked {
            image: image.to_owned(),
            layer: digest.clone(),
            media_type: descriptor.media_type.clone(),
        },
        source => LayerError::Format {
            image: image.to_owned(),
            layer: digest.clone(),
            source,
        },
    };

    if let Some(store) = store
        && let Some((tail, toc)) = store.load(digest).await
    {
        match parse(&tail, &toc, expected_toc.as_ref(), descriptor.size) {
            Ok((footer, parsed)) => {
                return Ok(OpenedLayer {
                    layer: Layer::new(label, Arc::new(parsed.index), blob),
                    footer,
                    toc_digest: parsed.toc_digest,
                    from_store: true,
                });
            }
            Err(error) => {
                tracing::warn!(%digest, %error, "kept TOC is unusable; fetching it again");
            }
        }
    }

    let size = descriptor.size;
    let read = |range: std::ops::Range<u64>| {
        let blob = Arc::clone(&blob);
        async move {
            blob.read_range(range, FetchPriority::OnDemand)
                .await
                .map_err(|source| LayerError::Read {
                    image: image.to_owned(),
                    layer: digest.clone(),
                    source,
                })
        }
    };
    let tail_start = size.saturating_sub(TAIL_READ.max(format::MAX_FOOTER_SIZE));
    let tail: Bytes = read(tail_start..size).await?;
    let footer = format::parse_footer(&tail, size).map_err(format_error)?;
    let toc_range = footer.toc_range();
    let toc: Bytes = if toc_range.start >= tail_start {
        let start = usize::try_from(toc_range.start - tail_start).unwrap_or(usize::MAX);
        let end = usize::try_from(toc_range.end - tail_start).unwrap_or(usize::MAX);
        tail.get(start..end)
            .map(Bytes::copy_from_slice)
            .ok_or_else(|| {
                format_error(FormatError::BadFooter {
                    format: footer.format,
                    reason: format!("TOC range {toc_range:?} is outside the blob"),
                })
            })?
    } else {
        read(toc_range).await?
    };
    let footer_tail_start = tail
        .len()
        .saturating_sub(usize::try_from(format::MAX_FOOTER_SIZE).unwrap_or(usize::MAX));
    let footer_tail = &tail[footer_tail_start..];
    let parsed =
        format::parse_toc(&footer, &toc, expected_toc.as_ref(), size).map_err(format_error)?;
    if let Some(store) = store {
        store.save(digest, footer_tail, &toc).await;
    }
    Ok(OpenedLayer {
        layer: Layer::new(label, Arc::new(parsed.index), blob),
        footer,
        toc_digest: parsed.toc_digest,
        from_store: false,
    })
}

fn parse(
    tail: &[u8],
    toc: &[u8],
    expected_toc: Option<&Digest>,
    size: u64,
) -> Result<(Footer, format::ParsedToc), FormatError> {
    let footer = format::parse_footer(tail, size)?;
    let parsed = format::parse_toc(&footer, toc, expected_toc, size)?;
    Ok((footer, parsed))
}

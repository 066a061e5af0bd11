//! `sluice pull`: pull an image into containerd so that layers the snapshotter can mount
//! lazily are never downloaded — what stargz-snapshotter's `ctr-remote image rpull` does,
//! over containerd's gRPC API.
//!
//! containerd's own pull (`ctr image pull`) downloads every layer before it asks the
//! snapshotter for anything, and it passes no labels that identify the layer, so a
//! remote snapshotter never gets the chance to decline the download. This module does
//! the pull itself:
//!
//! 1. resolve the image with [`RegistryClient`] (credentials and mirrors as everywhere
//!    else in sluice);
//! 2. store the index (if any), manifest and config in containerd's content store, with
//!    the garbage-collection labels containerd's pull sets;
//! 3. for each layer, base first, `Prepare` the snapshot named by its chain id with the
//!    labels that let the snapshotter recognise it (see [`crate::snapshot::remote`]). An
//!    `AlreadyExists` answer means the layer was mounted remotely. Otherwise the layer is
//!    downloaded into the content store, applied with containerd's diff service and
//!    committed, as containerd's unpacker does;
//! 4. create or update the image record, and label the config with the top snapshot so
//!    containerd's GC keeps the snapshots and `ctr run --snapshotter NAME` finds the image
//!    unpacked.
//!
//! Everything happens under a containerd lease, so nothing written half-way is collected
//! before the image record refers to it, and everything the pull made but did not keep is
//! collected once the lease is gone.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::diff_client::DiffClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::introspection_client::IntrospectionClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    AbortRequest, ApplyRequest, CreateImageRequest, CreateRequest as CreateLeaseRequest,
    DeleteRequest as DeleteLeaseRequest, Image, Info as ContentInfo, InfoRequest, PluginsRequest,
    UpdateImageRequest, UpdateRequest as UpdateContentRequest, WriteAction, WriteContentRequest,
};
use containerd_client::types::{Descriptor as ApiDescriptor, Mount};
use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::digest::Digest;
use crate::metrics::Metrics;
use crate::registry::{
    Descriptor, FetchPriority, ImageIndex, ImageReference, Platform, RegistryClient, RegistryError,
    RegistryOptions, ResolvedImage,
};
use crate::snapshot::{
    LABEL_CRI_IMAGE_REF, LABEL_CRI_LAYER_DIGEST, LABEL_SLUICE_IMAGE_REF, LABEL_SLUICE_LAYER_DIGEST,
    LABEL_TARGET_REF,
};

/// gRPC metadata key containerd reads the namespace from.
const NAMESPACE_HEADER: &str = "containerd-namespace";
/// gRPC metadata key containerd reads the lease from.
const LEASE_HEADER: &str = "containerd-lease";
/// Lease label after which containerd's GC drops the lease even if sluice never deletes
/// it (killed mid-pull).
const LABEL_GC_EXPIRE: &str = "containerd.io/gc.expire";
const LABEL_GC_REF_CONFIG: &str = "containerd.io/gc.ref.content.config";
const LABEL_GC_REF_LAYER_PREFIX: &str = "containerd.io/gc.ref.content.l.";
const LABEL_GC_REF_MANIFEST_PREFIX: &str = "containerd.io/gc.ref.content.m.";
const LABEL_GC_REF_SNAPSHOT_PREFIX: &str = "containerd.io/gc.ref.snapshot.";
/// Set by containerd on layer blobs once they are unpacked: the layer's diff id.
const LABEL_UNCOMPRESSED: &str = "containerd.io/uncompressed";
/// Where a blob came from, so containerd can push it elsewhere without re-uploading.
const LABEL_DISTRIBUTION_SOURCE_PREFIX: &str = "containerd.io/distribution.source.";
const SNAPSHOTTER_PLUGIN_TYPE: &str = "io.containerd.snapshotter.v1";

/// How long the pull's lease lives if sluice dies before deleting it.
const LEASE_EXPIRY: Duration = Duration::from_secs(60 * 60);
/// Bytes asked of the registry per range request while downloading a layer.
const FETCH_RANGE_BYTES: u64 = 4 << 20;
/// Bytes per content-store write message; containerd accepts up to 16 MiB per message.
const WRITE_MESSAGE_BYTES: usize = 1 << 20;

/// Where containerd is and how to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// containerd's gRPC socket.
    pub address: PathBuf,
    /// containerd namespace the image, content and snapshots go to.
    pub namespace: String,
    /// Snapshotter (as named in containerd's config) to unpack with.
    pub snapshotter: String,
    /// Platform to pick from a multi-platform image.
    pub platform: Platform,
    /// How to reach registries.
    pub registry: RegistryOptions,
    /// Draw per-layer progress on stderr (only sensible on a terminal).
    pub progress: bool,
}

/// What happened to one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerOutcome {
    /// Its snapshot already existed in containerd; nothing was done.
    AlreadyPresent,
    /// The snapshotter mounted it from the registry; nothing was downloaded.
    Lazy,
    /// Downloaded (unless its blob was already in the content store) and unpacked.
    Downloaded {
        /// Bytes fetched from the registry for it (0 if the blob was already stored).
        fetched: u64,
    },
}

/// One layer of a finished pull.
#[derive(Debug, Clone)]
pub struct PulledLayer {
    pub digest: Digest,
    pub chain_id: Digest,
    pub outcome: LayerOutcome,
}

/// The result of a pull.
#[derive(Debug, Clone)]
pub struct PullSummary {
    /// The image record's name.
    pub image: String,
    /// The image record's target: the index if the reference named one, else the manifest.
    pub target: Digest,
    /// Layers, base first.
    pub layers: Vec<PulledLayer>,
}

impl PullSummary {
    fn count(&self, wanted: fn(&LayerOutcome) -> bool) -> usize {
        self.layers.iter().filter(|l| wanted(&l.outcome)).count()
    }

    pub fn lazy_layers(&self) -> usize {
        self.count(|o| matches!(o, LayerOutcome::Lazy))
    }

    pub fn downloaded_layers(&self) -> usize {
        self.count(|o| matches!(o, LayerOutcome::Downloaded { .. }))
    }

    pub fn present_layers(&self) -> usize {
        self.count(|o| matches!(o, LayerOutcome::AlreadyPresent))
    }

    /// Layer bytes fetched from the registry by this pull.
    pub fn bytes_fetched(&self) -> u64 {
        self.layers
            .iter()
            .map(|l| match l.outcome {
                LayerOutcome::Downloaded { fetched } => fetched,
                _ => 0,
            })
            .sum()
    }
}

impl fmt::Display for PullSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {} layers: {} mounted lazily, {} downloaded, {} already present; {} of layers fetched",
            self.image,
            self.target,
            self.layers.len(),
            self.lazy_layers(),
            self.downloaded_layers(),
            self.present_layers(),
            HumanBytes(self.bytes_fetched()),
        )
    }
}

/// Every way a pull can fail. Each names the image (and the layer and containerd call
/// where there is one) and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("{image}: {source}")]
    Resolve {
        image: String,
        #[source]
        source: RegistryError,
    },

    #[error(
        "containerd at {} is not reachable: is containerd running? \
         (pass its socket with --address; {reason})",
        address.display()
    )]
    ContainerdUnreachable { address: PathBuf, reason: String },

    #[error(
        "namespace {namespace:?} cannot be used: containerd namespaces are letters, digits, \
         '.', '_' and '-'"
    )]
    InvalidNamespace { namespace: String },

    #[error(
        "snapshotter {snapshotter} unknown to containerd at {} (it has: {available}): add \
         [proxy_plugins.{snapshotter}] to containerd's config (see docs/containerd.md), start \
         sluice-snapshotter, then restart containerd",
        address.display()
    )]
    UnknownSnapshotter {
        snapshotter: String,
        address: PathBuf,
        available: String,
    },

    #[error(
        "snapshotter {snapshotter} did not load in containerd at {}: {reason}; check \
         containerd's log and the address under [proxy_plugins.{snapshotter}]",
        address.display()
    )]
    SnapshotterNotLoaded {
        snapshotter: String,
        address: PathBuf,
        reason: String,
    },

    #[error(
        "{image}: the manifest lists {layers} layers but the config has {diff_ids} diff ids; \
         the image is malformed: rebuild and push it again"
    )]
    LayerCountMismatch {
        image: String,
        layers: usize,
        diff_ids: usize,
    },

    #[error("{image}: the index it points to is not valid JSON ({reason})")]
    MalformedIndex { image: String, reason: String },

    #[error("{image}: downloading layer {layer}: {source}")]
    FetchLayer {
        image: String,
        layer: Digest,
        #[source]
        source: RegistryError,
    },

    #[error(
        "{image}: layer {layer} unpacked to {actual}, but the image config says {expected}; \
         the layer or the config is corrupt: push the image again"
    )]
    DiffIdMismatch {
        image: String,
        layer: Digest,
        expected: Digest,
        actual: String,
    },

    #[error(
        "{image}: containerd {call} for {subject} failed ({code:?}: {message}); {hint}",
        code = status.code(),
        message = status.message(),
        hint = hint(status.code()),
    )]
    Containerd {
        image: String,
        call: &'static str,
        subject: String,
        status: Status,
    },
}

/// What a user can do about a failed containerd call, by its gRPC code.
fn hint(code: Code) -> &'static str {
    match code {
        Code::Unavailable => {
            "containerd or the snapshotter stopped answering: check that both run, then pull again"
        }
        Code::NotFound | Code::Aborted => {
            "something was removed or changed while pulling (another client or garbage \
             collection): pull again"
        }
        Code::FailedPrecondition | Code::DataLoss => {
            "the data did not match its digest: pull again; if it persists the registry \
             serves corrupt data"
        }
        Code::PermissionDenied | Code::Unauthenticated => {
            "run as root or as a user allowed to use containerd's socket"
        }
        Code::InvalidArgument => {
            "containerd refused the request: check --namespace and --snapshotter"
        }
        Code::DeadlineExceeded | Code::Cancelled => "the call did not finish: pull again",
        _ => "see containerd's log for details",
    }
}

/// Adds the namespace (and the lease, once there is one) to every request.
#[derive(Clone)]
struct Headers {
    namespace: AsciiMetadataValue,
    lease: Option<AsciiMetadataValue>,
}

impl Interceptor for Headers {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        let metadata = request.metadata_mut();
        metadata.insert(NAMESPACE_HEADER, self.namespace.clone());
        if let Some(lease) = &self.lease {
            metadata.insert(LEASE_HEADER, lease.clone());
        }
        Ok(request)
    }
}

type Svc = InterceptedService<Channel, Headers>;

/// The containerd services a pull uses, all carrying the same headers.
struct Containerd {
    content: ContentClient<Svc>,
    snapshots: SnapshotsClient<Svc>,
    diff: DiffClient<Svc>,
    images: ImagesClient<Svc>,
    leases: LeasesClient<Svc>,
    introspection: IntrospectionClient<Svc>,
}

impl Containerd {
    fn new(channel: &Channel, headers: &Headers) -> Self {
        let h = || headers.clone();
        Self {
            content: ContentClient::with_interceptor(channel.clone(), h()),
            snapshots: SnapshotsClient::with_interceptor(channel.clone(), h()),
            diff: DiffClient::with_interceptor(channel.clone(), h()),
            images: ImagesClient::with_interceptor(channel.clone(), h()),
            leases: LeasesClient::with_interceptor(channel.clone(), h()),
            introspection: IntrospectionClient::with_interceptor(channel.clone(), h()),
        }
    }
}

/// The chain ids of a stack of layers, base first: the name containerd gives the
/// committed snapshot holding layers `0..=n`. `chain(0) = diff(0)`,
/// `chain(n) = sha256(chain(n-1) + " " + diff(n))`.
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut chain: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match chain.last() {
            None => diff_id.clone(),
            Some(parent) => Digest::sha256_of(format!("{parent} {diff_id}").as_bytes()),
        };
        chain.push(next);
    }
    chain
}

/// Pulls `reference` into containerd and unpacks it with `options.snapshotter`.
pub async fn pull(
    reference: &str,
    options: &PullOptions,
    metrics: Arc<Metrics>,
) -> Result<PullSummary, PullError> {
    let resolve_error = |source| PullError::Resolve {
        image: reference.to_owned(),
        source,
    };
    let image_ref: ImageReference = reference.parse().map_err(resolve_error)?;
    let namespace = AsciiMetadataValue::try_from(options.namespace.as_str())
        .ok()
        .filter(|_| !options.namespace.is_empty())
        .ok_or_else(|| PullError::InvalidNamespace {
            namespace: options.namespace.clone(),
        })?;
    let channel = containerd_client::connect(&options.address)
        .await
        .map_err(|error| PullError::ContainerdUnreachable {
            address: options.address.clone(),
            reason: if socket_present(&options.address) {
                error_chain(&error)
            } else {
                "no socket exists at that path".to_owned()
            },
        })?;
    let mut headers = Headers {
        namespace,
        lease: None,
    };
    let mut services = Containerd::new(&channel, &headers);
    check_snapshotter(&mut services, reference, options).await?;

    let registry = RegistryClient::new(options.registry.clone(), metrics).map_err(resolve_error)?;
    let resolved = registry
        .resolve(&image_ref, &options.platform)
        .await
        .map_err(resolve_error)?;
    let diff_ids = &resolved.config.rootfs.diff_ids;
    if diff_ids.len() != resolved.layers.len() {
        return Err(PullError::LayerCountMismatch {
            image: reference.to_owned(),
            layers: resolved.layers.len(),
            diff_ids: diff_ids.len(),
        });
    }

    let lease_id = format!("sluice-pull-{}", unique_suffix());
    let mut puller = Puller {
        reference,
        image_name: image_ref.to_string(),
        options,
        registry,
        resolved: &resolved,
        services,
        progress: Progress::new(options.progress),
    };
    puller.create_lease(&lease_id).await?;
    // The id is ASCII by construction, so the header value always exists.
    headers.lease = MetadataValue::try_from(lease_id.as_str()).ok();
    puller.services = Containerd::new(&channel, &headers);
    let outcome = puller.run().await;
    // The lease is only a guard while the image record is not there yet; without it, the
    // records and labels written above keep what has to stay.
    puller.services = Containerd::new(
        &channel,
        &Headers {
            lease: None,
            ..headers
        },
    );
    let released = puller.delete_lease(&lease_id).await;
    let summary = outcome?;
    released?;
    Ok(summary)
}

/// Fails early, with advice, when containerd does not know the snapshotter.
async fn check_snapshotter(
    services: &mut Containerd,
    reference: &str,
    options: &PullOptions,
) -> Result<(), PullError> {
    let request = PluginsRequest {
        filters: vec![format!("type=={SNAPSHOTTER_PLUGIN_TYPE}")],
    };
    let plugins = match services.introspection.plugins(request).await {
        Ok(response) => response.into_inner().plugins,
        // A channel that connected but whose first call fails is a socket that is not
        // containerd's, or a containerd that is going away.
        Err(status) if status.code() == Code::Unavailable || status.code() == Code::Unknown => {
            return Err(PullError::ContainerdUnreachable {
                address: options.address.clone(),
                reason: status.message().to_owned(),
            });
        }
        Err(status) => {
            return Err(PullError::Containerd {
                image: reference.to_owned(),
                call: "Introspection.Plugins",
                subject: format!("snapshotter {}", options.snapshotter),
                status,
            });
        }
    };
    match plugins.iter().find(|p| p.id == options.snapshotter) {
        Some(plugin) => match &plugin.init_err {
            Some(error) if error.code != 0 => Err(PullError::SnapshotterNotLoaded {
                snapshotter: options.snapshotter.clone(),
                address: options.address.clone(),
                reason: error.message.clone(),
            }),
            _ => Ok(()),
        },
        None => {
            // Snapshotters that failed to load (btrfs without btrfs, ...) are no option.
            let mut names: Vec<&str> = plugins
                .iter()
                .filter(|p| p.init_err.as_ref().is_none_or(|e| e.code == 0))
                .map(|p| p.id.as_str())
                .collect();
            names.sort_unstable();
            Err(PullError::UnknownSnapshotter {
                snapshotter: options.snapshotter.clone(),
                address: options.address.clone(),
                available: if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                },
            })
        }
    }
}

/// One layer to unpack, with where it goes.
#[derive(Clone, Copy)]
struct LayerJob<'a> {
    layer: &'a Descriptor,
    /// Its digest once uncompressed, from the image config.
    diff_id: &'a Digest,
    /// The committed snapshot it becomes.
    chain_id: &'a Digest,
    /// The snapshot below it; `None` for the base layer.
    parent: Option<&'a Digest>,
    bar: &'a ProgressBar,
}

struct Puller<'a> {
    /// The reference as the user gave it.
    reference: &'a str,
    /// The normalised reference: the image record's name.
    image_name: String,
    options: &'a PullOptions,
    registry: Arc<RegistryClient>,
    resolved: &'a ResolvedImage,
    services: Containerd,
    progress: Progress,
}

impl Puller<'_> {
    fn containerd_error(&self, call: &'static str, subject: String, status: Status) -> PullError {
        PullError::Containerd {
            image: self.reference.to_owned(),
            call,
            subject,
            status,
        }
    }

    async fn create_lease(&mut self, id: &str) -> Result<(), PullError> {
        let expires = SystemTime::now() + LEASE_EXPIRY;
        let request = CreateLeaseRequest {
            id: id.to_owned(),
            labels: HashMap::from([(LABEL_GC_EXPIRE.to_owned(), rfc3339(expires))]),
        };
        self.services
            .leases
            .create(request)
            .await
            .map_err(|status| {
                self.containerd_error("Leases.Create", format!("lease {id}"), status)
            })?;
        Ok(())
    }

    async fn delete_lease(&mut self, id: &str) -> Result<(), PullError> {
        let request = DeleteLeaseRequest {
            id: id.to_owned(),
            sync: false,
        };
        match self.services.leases.delete(request).await {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::NotFound => Ok(()),
            Err(status) => {
                Err(self.containerd_error("Leases.Delete", format!("lease {id}"), status))
            }
        }
    }

    async fn run(&mut self) -> Result<PullSummary, PullError> {
        let resolved = self.resolved;
        let source_label = self.distribution_source_label();

        self.store_content(
            "config",
            &resolved.manifest.config.media_type,
            &resolved.config_digest,
            resolved.config_bytes.clone(),
            HashMap::from([source_label.clone()]),
        )
        .await?;
        let mut manifest_labels = HashMap::from([
            source_label.clone(),
            (
                LABEL_GC_REF_CONFIG.to_owned(),
                resolved.config_digest.to_string(),
            ),
        ]);
        for (i, layer) in resolved.layers.iter().enumerate() {
            manifest_labels.insert(
                format!("{LABEL_GC_REF_LAYER_PREFIX}{i}"),
                layer.digest.to_string(),
            );
        }
        self.store_content(
            "manifest",
            &resolved.manifest_media_type,
            &resolved.manifest_digest,
            resolved.manifest_bytes.clone(),
            manifest_labels,
        )
        .await?;
        let mut target = ApiDescriptor {
            media_type: resolved.manifest_media_type.clone(),
            digest: resolved.manifest_digest.to_string(),
            size: resolved.manifest_bytes.len() as i64,
            annotations: HashMap::new(),
        };
        if let (Some(digest), Some(media_type), Some(bytes)) = (
            &resolved.index_digest,
            &resolved.index_media_type,
            &resolved.index_bytes,
        ) {
            let index: ImageIndex =
                serde_json::from_slice(bytes).map_err(|e| PullError::MalformedIndex {
                    image: self.reference.to_owned(),
                    reason: e.to_string(),
                })?;
            let mut labels = HashMap::from([source_label.clone()]);
            for (i, manifest) in index.manifests.iter().enumerate() {
                labels.insert(
                    format!("{LABEL_GC_REF_MANIFEST_PREFIX}{i}"),
                    manifest.digest.to_string(),
                );
            }
            self.store_content("index", media_type, digest, bytes.clone(), labels)
                .await?;
            target = ApiDescriptor {
                media_type: media_type.clone(),
                digest: digest.to_string(),
                size: bytes.len() as i64,
                annotations: HashMap::new(),
            };
        }

        let chain = chain_ids(&resolved.config.rootfs.diff_ids);
        let total = resolved.layers.len();
        let mut layers = Vec::with_capacity(total);
        for (i, layer) in resolved.layers.iter().enumerate() {
            let parent = i.checked_sub(1).map(|p| &chain[p]);
            let bar = self.progress.layer(i, total, &layer.digest);
            let job = LayerJob {
                layer,
                diff_id: &resolved.config.rootfs.diff_ids[i],
                chain_id: &chain[i],
                parent,
                bar: &bar,
            };
            let outcome = self.unpack_layer(&job).await;
            match &outcome {
                Ok(LayerOutcome::AlreadyPresent) => bar.finish_with_message("already present"),
                Ok(LayerOutcome::Lazy) => bar.finish_with_message("lazy (remote)"),
                Ok(LayerOutcome::Downloaded { fetched }) => {
                    bar.finish_with_message(format!("downloaded ({})", HumanBytes(*fetched)));
                }
                Err(_) => {
                    bar.abandon_with_message("failed");
                    self.progress.finish();
                }
            }
            layers.push(PulledLayer {
                digest: layer.digest.clone(),
                chain_id: chain[i].clone(),
                outcome: outcome?,
            });
        }

        self.progress.finish();
        if let Some(top) = chain.last() {
            self.label_config_with_snapshot(top).await?;
        }
        self.record_image(target).await?;
        Ok(PullSummary {
            image: self.image_name.clone(),
            target: resolved
                .index_digest
                .clone()
                .unwrap_or_else(|| resolved.manifest_digest.clone()),
            layers,
        })
    }

    fn distribution_source_label(&self) -> (String, String) {
        let repository = self.resolved.reference.repository();
        (
            format!(
                "{LABEL_DISTRIBUTION_SOURCE_PREFIX}{}",
                repository.registry()
            ),
            repository.name().to_owned(),
        )
    }

    async fn content_exists(&mut self, what: &str, digest: &Digest) -> Result<bool, PullError> {
        let request = InfoRequest {
            digest: digest.to_string(),
        };
        match self.services.content.info(request).await {
            Ok(_) => Ok(true),
            Err(status) if status.code() == Code::NotFound => Ok(false),
            Err(status) => {
                Err(self.containerd_error("Content.Info", format!("{what} {digest}"), status))
            }
        }
    }

    /// Stores a small blob already in memory, or just sets its labels if it is there.
    async fn store_content(
        &mut self,
        what: &str,
        media_type: &str,
        digest: &Digest,
        bytes: Bytes,
        labels: HashMap<String, String>,
    ) -> Result<(), PullError> {
        tracing::debug!(what, %digest, media_type, "storing content");
        if self.content_exists(what, digest).await? {
            return self.update_content_labels(what, digest, labels).await;
        }
        let size = bytes.len() as u64;
        let chunks = futures::stream::iter(std::iter::once(Ok::<_, PullError>(bytes)));
        self.write_content(what, digest, size, chunks, labels, &ProgressBar::hidden())
            .await
    }

    async fn update_content_labels(
        &mut self,
        what: &str,
        digest: &Digest,
        labels: HashMap<String, String>,
    ) -> Result<(), PullError> {
        if labels.is_empty() {
            return Ok(());
        }
        let paths = labels.keys().map(|key| format!("labels.{key}")).collect();
        let request = UpdateContentRequest {
            info: Some(ContentInfo {
                digest: digest.to_string(),
                labels,
                ..ContentInfo::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        };
        self.services
            .content
            .update(request)
            .await
            .map_err(|status| {
                self.containerd_error("Content.Update", format!("{what} {digest}"), status)
            })?;
        Ok(())
    }

    /// Streams `chunks` into the content store with containerd's write protocol: a stat
    /// that takes the ingest's lock, writes at increasing offsets, and a commit that
    /// checks size and digest and sets the labels. Content that appears meanwhile (another
    /// pull) only gets its labels updated.
    async fn write_content<S>(
        &mut self,
        what: &str,
        digest: &Digest,
        size: u64,
        chunks: S,
        labels: HashMap<String, String>,
        bar: &ProgressBar,
    ) -> Result<(), PullError>
    where
        S: futures::Stream<Item = Result<Bytes, PullError>> + Unpin,
    {
        use futures::StreamExt as _;
        let subject = format!("{what} {digest}");
        let ingest_ref = format!("sluice-pull-{digest}");
        let abort_ref = ingest_ref.clone();
        let (sender, receiver) = tokio::sync::mpsc::channel::<WriteContentRequest>(2);
        let base = WriteContentRequest {
            r#ref: ingest_ref,
            total: size as i64,
            expected: digest.to_string(),
            ..WriteContentRequest::default()
        };
        let stat = WriteContentRequest {
            action: WriteAction::Stat as i32,
            ..base.clone()
        };
        // The receiver was just created and has room: this cannot fail.
        let _ = sender.try_send(stat);
        let call = self
            .services
            .content
            .write(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await;
        let mut responses = match call {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == Code::AlreadyExists => {
                return self.update_content_labels(what, digest, labels).await;
            }
            Err(status) => return Err(self.containerd_error("Content.Write", subject, status)),
        };
        let mut exchange = async |request: Option<WriteContentRequest>| -> Result<(), Status> {
            if let Some(request) = request
                && sender.send(request).await.is_err()
            {
                // The server ended the stream; its status says why.
                return match responses.message().await {
                    Err(status) => Err(status),
                    Ok(_) => Err(Status::aborted("containerd closed the write stream")),
                };
            }
            match responses.message().await {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err(Status::aborted("containerd closed the write stream")),
                Err(status) => Err(status),
            }
        };
        let written: Result<(), Result<Status, PullError>> = async {
            // The stat's answer.
            exchange(None).await.map_err(Ok)?;
            let mut offset = 0u64;
            let mut chunks = chunks;
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk.map_err(Err)?;
                for piece in chunk.chunks(WRITE_MESSAGE_BYTES) {
                    let request = WriteContentRequest {
                        action: WriteAction::Write as i32,
                        offset: offset as i64,
                        data: piece.to_vec(),
                        ..base.clone()
                    };
                    exchange(Some(request)).await.map_err(Ok)?;
                    offset += piece.len() as u64;
                    bar.set_position(offset);
                }
            }
            let commit = WriteContentRequest {
                action: WriteAction::Commit as i32,
                offset: offset as i64,
                labels: labels.clone(),
                ..base.clone()
            };
            exchange(Some(commit)).await.map_err(Ok)
        }
        .await;
        // Closing our side makes containerd end the call and release the ingest; wait
        // for that, or the abort below finds the ingest still in use.
        drop(sender);
        let drained = async { while let Ok(Some(_)) = responses.message().await {} };
        let _ = tokio::time::timeout(Duration::from_secs(10), drained).await;
        let failure = match written {
            Ok(()) => return Ok(()),
            Err(Ok(status)) if status.code() == Code::AlreadyExists => {
                return self.update_content_labels(what, digest, labels).await;
            }
            Err(Ok(status)) => self.containerd_error("Content.Write", subject, status),
            Err(Err(error)) => error,
        };
        // Drop the partial data now rather than when the lease goes.
        let request = AbortRequest { r#ref: abort_ref };
        if let Err(status) = self.services.content.abort(request).await
            && status.code() != Code::NotFound
        {
            tracing::warn!(%digest, %status, "aborting the unfinished content write");
        }
        Err(failure)
    }

    async fn unpack_layer(&mut self, job: &LayerJob<'_>) -> Result<LayerOutcome, PullError> {
        let LayerJob {
            layer,
            chain_id,
            parent,
            bar,
            ..
        } = *job;
        let subject = || format!("layer {} (snapshot {chain_id})", layer.digest);
        if self.snapshot_exists(chain_id, &subject).await? {
            return Ok(LayerOutcome::AlreadyPresent);
        }
        bar.set_message("preparing");
        let key = format!("extract-{}-{chain_id}", unique_suffix());
        let snapshotter = self.options.snapshotter.clone();
        let parent = parent.map(ToString::to_string).unwrap_or_default();
        // containerd passes a proxy snapshotter only the labels under
        // `containerd.io/snapshot/` (and the target): the `sluice.io/` ones reach sluice
        // only when it is called directly, the CRI ones also through containerd.
        let mut labels = HashMap::from([
            (
                LABEL_SLUICE_LAYER_DIGEST.to_owned(),
                layer.digest.to_string(),
            ),
            (LABEL_SLUICE_IMAGE_REF.to_owned(), self.reference.to_owned()),
            (LABEL_CRI_LAYER_DIGEST.to_owned(), layer.digest.to_string()),
            (LABEL_CRI_IMAGE_REF.to_owned(), self.reference.to_owned()),
        ]);
        let commit_labels = labels.clone();
        labels.insert(LABEL_TARGET_REF.to_owned(), chain_id.to_string());
        let request = PrepareSnapshotRequest {
            snapshotter: snapshotter.clone(),
            key: key.clone(),
            parent,
            labels,
        };
        let mounts = match self.services.snapshots.prepare(request).await {
            Ok(response) => response.into_inner().mounts,
            Err(status) if status.code() == Code::AlreadyExists => {
                // The snapshotter committed the target itself: a remote layer. containerd
                // linked it into this namespace; make sure before saying so.
                if self.snapshot_exists(chain_id, &subject).await? {
                    return Ok(LayerOutcome::Lazy);
                }
                return Err(self.containerd_error("Snapshots.Prepare", subject(), status));
            }
            Err(status) => {
                return Err(self.containerd_error("Snapshots.Prepare", subject(), status));
            }
        };
        tracing::debug!(layer = %layer.digest, %chain_id, "snapshotter declined the layer; downloading");
        let applied = self
            .download_and_apply(job, &key, mounts, commit_labels)
            .await;
        if applied.is_err() {
            // Leave nothing half-made behind; the error that matters is the first one.
            let request = RemoveSnapshotRequest {
                snapshotter,
                key: key.clone(),
            };
            if let Err(status) = self.services.snapshots.remove(request).await {
                tracing::warn!(%key, %status, "removing the unfinished snapshot");
            }
        }
        applied
    }

    async fn snapshot_exists(
        &mut self,
        chain_id: &Digest,
        subject: &dyn Fn() -> String,
    ) -> Result<bool, PullError> {
        let request = StatSnapshotRequest {
            snapshotter: self.options.snapshotter.clone(),
            key: chain_id.to_string(),
        };
        match self.services.snapshots.stat(request).await {
            Ok(_) => Ok(true),
            Err(status) if status.code() == Code::NotFound => Ok(false),
            Err(status) => Err(self.containerd_error("Snapshots.Stat", subject(), status)),
        }
    }

    async fn download_and_apply(
        &mut self,
        job: &LayerJob<'_>,
        key: &str,
        mounts: Vec<Mount>,
        commit_labels: HashMap<String, String>,
    ) -> Result<LayerOutcome, PullError> {
        let LayerJob {
            layer,
            diff_id,
            chain_id,
            bar,
            ..
        } = *job;
        let subject = || format!("layer {} (snapshot {chain_id})", layer.digest);
        let mut fetched = 0;
        if !self.content_exists("layer", &layer.digest).await? {
            bar.set_length(layer.size);
            bar.set_style(download_style());
            bar.set_message("downloading");
            let labels = HashMap::from([
                self.distribution_source_label(),
                (LABEL_UNCOMPRESSED.to_owned(), diff_id.to_string()),
            ]);
            let chunks = layer_chunks(
                Arc::clone(&self.registry),
                self.resolved,
                self.reference,
                layer,
            );
            self.write_content("layer", &layer.digest, layer.size, chunks, labels, bar)
                .await?;
            fetched = layer.size;
        }
        bar.set_style(message_style());
        bar.set_message("unpacking");
        let request = ApplyRequest {
            diff: Some(ApiDescriptor {
                media_type: layer.media_type.clone(),
                digest: layer.digest.to_string(),
                size: layer.size as i64,
                annotations: layer.annotations.clone().into_iter().collect(),
            }),
            mounts,
            payloads: HashMap::new(),
            sync_fs: false,
        };
        let applied = self
            .services
            .diff
            .apply(request)
            .await
            .map_err(|status| self.containerd_error("Diff.Apply", subject(), status))?
            .into_inner()
            .applied
            .map(|d| d.digest)
            .unwrap_or_default();
        if applied != diff_id.as_str() {
            return Err(PullError::DiffIdMismatch {
                image: self.reference.to_owned(),
                layer: layer.digest.clone(),
                expected: diff_id.clone(),
                actual: applied,
            });
        }
        let request = CommitSnapshotRequest {
            snapshotter: self.options.snapshotter.clone(),
            name: chain_id.to_string(),
            key: key.to_owned(),
            labels: commit_labels,
        };
        match self.services.snapshots.commit(request).await {
            Ok(_) => Ok(LayerOutcome::Downloaded { fetched }),
            // Another pull of an image sharing this layer committed it first. Ours is
            // redundant, and the caller removes active snapshots only on error.
            Err(status) if status.code() == Code::AlreadyExists => {
                let request = RemoveSnapshotRequest {
                    snapshotter: self.options.snapshotter.clone(),
                    key: key.to_owned(),
                };
                if let Err(status) = self.services.snapshots.remove(request).await {
                    tracing::warn!(%key, %status, "removing the duplicate snapshot");
                }
                Ok(LayerOutcome::Downloaded { fetched })
            }
            Err(status) => Err(self.containerd_error("Snapshots.Commit", subject(), status)),
        }
    }

    async fn label_config_with_snapshot(&mut self, top: &Digest) -> Result<(), PullError> {
        let labels = HashMap::from([(
            format!("{LABEL_GC_REF_SNAPSHOT_PREFIX}{}", self.options.snapshotter),
            top.to_string(),
        )]);
        let config = self.resolved.config_digest.clone();
        self.update_content_labels("config", &config, labels).await
    }

    async fn record_image(&mut self, target: ApiDescriptor) -> Result<(), PullError> {
        let image = Image {
            name: self.image_name.clone(),
            labels: HashMap::new(),
            target: Some(target),
            created_at: None,
            updated_at: None,
        };
        let subject = || format!("image record {}", image.name);
        // Create, or replace an existing record; a record deleted in between is created.
        for _ in 0..3 {
            let request = CreateImageRequest {
                image: Some(image.clone()),
                source_date_epoch: None,
            };
            let status = match self.services.images.create(request).await {
                Ok(_) => return Ok(()),
                Err(status) if status.code() == Code::AlreadyExists => status,
                Err(status) => {
                    return Err(self.containerd_error("Images.Create", subject(), status));
                }
            };
            tracing::debug!(%status, "image exists; updating it");
            let request = UpdateImageRequest {
                image: Some(image.clone()),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["target".to_owned()],
                }),
                source_date_epoch: None,
            };
            match self.services.images.update(request).await {
                Ok(_) => return Ok(()),
                Err(status) if status.code() == Code::NotFound => continue,
                Err(status) => {
                    return Err(self.containerd_error("Images.Update", subject(), status));
                }
            }
        }
        Err(self.containerd_error(
            "Images.Create",
            subject(),
            Status::aborted("the image record kept appearing and disappearing"),
        ))
    }
}

/// The layer blob as a stream of verified-size ranges from the registry.
fn layer_chunks(
    registry: Arc<RegistryClient>,
    resolved: &ResolvedImage,
    reference: &str,
    layer: &Descriptor,
) -> impl futures::Stream<Item = Result<Bytes, PullError>> + Unpin + use<> {
    let repository = resolved.reference.repository().clone();
    let digest = layer.digest.clone();
    let size = layer.size;
    let image = reference.to_owned();
    Box::pin(futures::stream::unfold(0u64, move |start| {
        let registry = Arc::clone(&registry);
        let repository = repository.clone();
        let digest = digest.clone();
        let image = image.clone();
        async move {
            if start >= size {
                return None;
            }
            let end = (start + FETCH_RANGE_BYTES).min(size);
            let chunk = registry
                .read_range(
                    &repository,
                    &digest,
                    size,
                    start..end,
                    FetchPriority::Prefetch,
                )
                .await
                .map_err(|source| PullError::FetchLayer {
                    image,
                    layer: digest,
                    source,
                });
            // After an error the stream ends: the writer stops at the first one anyway.
            let next = if chunk.is_ok() { end } else { size };
            Some((chunk, next))
        }
    }))
}

/// Per-layer progress lines on stderr, or nothing.
struct Progress {
    bars: Option<MultiProgress>,
}

impl Progress {
    fn new(enabled: bool) -> Self {
        Self {
            bars: enabled.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
        }
    }

    fn layer(&self, index: usize, total: usize, digest: &Digest) -> ProgressBar {
        let Some(bars) = &self.bars else {
            return ProgressBar::hidden();
        };
        let bar = bars.add(ProgressBar::new(0));
        bar.set_style(message_style());
        bar.set_prefix(format!(
            "layer {}/{total} {}",
            index + 1,
            digest.hex().get(..12).unwrap_or_default()
        ));
        bar.set_message("checking");
        bar
    }
}

impl Progress {
    /// indicatif leaves the cursor at the end of the last bar; what is printed next
    /// (the summary, an error) starts on a line of its own.
    fn finish(&self) {
        if self.bars.is_some() {
            eprintln!();
        }
    }
}

fn message_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix} {msg}").unwrap_or_else(|_| ProgressStyle::default_bar())
}

fn download_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix} {msg} [{bar:30}] {bytes}/{total_bytes}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// Unique enough for names that must not collide with another pull's: nanoseconds plus
/// the process id.
fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{nanos}-{}", std::process::id())
}

/// `time` as RFC 3339 in UTC with second precision, as containerd's lease labels expect.
fn rfc3339(time: SystemTime) -> String {
    let seconds = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    prost_types::Timestamp {
        seconds: i64::try_from(seconds).unwrap_or(i64::MAX),
        nanos: 0,
    }
    .to_string()
}

/// An error and its sources on one line (tonic's transport errors hide the cause).
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Whether `path` is a unix socket, to tell "not running" from "refused".
fn socket_present(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> Digest {
        Digest::sha256_of(&[n])
    }

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let (a, b, c) = (digest(1), digest(2), digest(3));
        let chain = chain_ids(&[a.clone(), b.clone(), c.clone()]);
        assert_eq!(chain[0], a);
        let ab = format!("sha256:{}", {
            use sha2::Digest as _;
            hex::encode(sha2::Sha256::digest(format!("{a} {b}")))
        });
        assert_eq!(chain[1].as_str(), ab);
        assert_ne!(chain[2], chain[1]);
        assert_eq!(
            chain[2],
            Digest::sha256_of(format!("{} {c}", chain[1]).as_bytes())
        );
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let leap_day = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3_723);
        assert_eq!(rfc3339(leap_day), "2000-02-29T01:02:03Z");
        let new_year = UNIX_EPOCH + Duration::from_secs(1_798_761_599);
        assert_eq!(rfc3339(new_year), "2026-12-31T23:59:59Z");
    }

    #[test]
    fn summary_counts_and_line() {
        let layer = |outcome| PulledLayer {
            digest: digest(1),
            chain_id: digest(2),
            outcome,
        };
        let summary = PullSummary {
            image: "127.0.0.1:5000/app:1".into(),
            target: digest(9),
            layers: vec![
                layer(LayerOutcome::Lazy),
                layer(LayerOutcome::Downloaded { fetched: 2048 }),
                layer(LayerOutcome::AlreadyPresent),
                layer(LayerOutcome::Lazy),
            ],
        };
        assert_eq!(summary.lazy_layers(), 2);
        assert_eq!(summary.downloaded_layers(), 1);
        assert_eq!(summary.present_layers(), 1);
        assert_eq!(summary.bytes_fetched(), 2048);
        let line = summary.to_string();
        assert!(line.contains("4 layers: 2 mounted lazily, 1 downloaded, 1 already present"));
        assert!(line.contains("2.00 KiB"), "{line}");
    }

    #[test]
    fn errors_name_image_call_and_advice() {
        let error = PullError::Containerd {
            image: "r/app:1".into(),
            call: "Diff.Apply",
            subject: "layer sha256:ab".into(),
            status: Status::unavailable("connection reset"),
        };
        let text = error.to_string();
        assert!(text.starts_with("r/app:1: containerd Diff.Apply for layer sha256:ab"));
        assert!(text.contains("check that both run"), "{text}");
        let error = PullError::UnknownSnapshotter {
            snapshotter: "sluice".into(),
            address: "/run/containerd/containerd.sock".into(),
            available: "native, overlayfs".into(),
        };
        assert!(error.to_string().contains("add [proxy_plugins.sluice]"));
    }
}

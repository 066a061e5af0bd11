//! The containerd snapshotter: what `[proxy_plugins.sluice]` talks to.
//!
//! | file          | owns |
//! |---------------|------|
//! | `store.rs`    | snapshot metadata in redb, one transaction per operation |
//! | `overlay.rs`  | [`OverlaySnapshotter`]: directories, overlay/bind mounts, usage, crash recovery |
//! | `filter.rs`   | containerd's list filter syntax |
//! | `remote.rs`   | [`RemoteLayers`], the hook through which lazily fetched layers are mounted |
//! | `service.rs`  | [`SnapshotService`], the gRPC adapter from [`crate::api`] to a [`Snapshotter`] |
//!
//! Semantics follow containerd's own overlayfs snapshotter, so containerd (and `ctr
//! snapshots`) cannot tell the difference for ordinary layers.

mod filter;
mod overlay;
mod remote;
mod service;
mod store;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::SystemTime;

pub use filter::{Filter, FilterError};
pub use overlay::OverlaySnapshotter;
pub use remote::{
    LABEL_CRI_IMAGE_REF, LABEL_CRI_LAYER_DIGEST, LABEL_REMOTE, LABEL_SLUICE_IMAGE_REF,
    LABEL_SLUICE_LAYER_DIGEST, LABEL_TARGET_REF, NoRemoteLayers, RemoteLayerError,
    RemoteLayerRequest, RemoteLayers, RemoteMount, RemoteSnapshot,
};
pub use service::SnapshotService;

use crate::api::containerd::types::Mount;

/// Labels of a snapshot, ordered so listings and comparisons are stable.
pub type Labels = BTreeMap<String, String>;

/// containerd limits a label's key plus value to this many bytes.
pub const MAX_LABEL_BYTES: usize = 4096;

/// The state of a snapshot, as in containerd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    /// Read-only view of a committed snapshot; cannot be committed.
    View,
    /// Writable; becomes committed through `commit`.
    Active,
    /// Immutable; may be the parent of other snapshots.
    Committed,
}

impl Kind {
    /// The word containerd's filters use for this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// What is known about one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub name: String,
    /// Empty when the snapshot has no parent.
    pub parent: String,
    pub kind: Kind,
    pub labels: Labels,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
}

/// Disk use of one snapshot's own layer, not counting its parents.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// Bytes allocated on disk.
    pub size: i64,
    /// Files, directories and other inodes (hard links counted once).
    pub inodes: i64,
}

/// Why a snapshot operation failed. Each variant maps to one gRPC code that containerd
/// interprets (see [`SnapshotError::code`]); containerd's behaviour depends on them.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {key:?} does not exist")]
    NotFound { key: String },
    #[error("parent snapshot {parent:?} of {key:?} does not exist")]
    ParentNotFound { key: String, parent: String },
    #[error("snapshot {key:?} already exists")]
    AlreadyExists { key: String },
    #[error("snapshot {key:?} is {actual}, but {operation} needs a {expected} snapshot")]
    WrongKind {
        key: String,
        operation: &'static str,
        actual: &'static str,
        expected: &'static str,
    },
    #[error("snapshot {key:?} has children ({child:?} and maybe more); remove them first")]
    HasChildren { key: String, child: String },
    #[error("invalid argument: {reason}")]
    InvalidArgument { reason: String },
    #[error("invalid list filter: {0}")]
    Filter(#[from] FilterError),
    #[error(
        "remote layer {name:?} could not be restored after restart ({reason}); remove the image and pull it again"
    )]
    RemoteUnavailable { name: String, reason: String },
    #[error("snapshot metadata store {path} ({operation}): {source}")]
    Store {
        path: PathBuf,
        operation: &'static str,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("snapshot metadata of {key:?} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("{operation} {path}: {source}")]
    Io {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("background task of {operation} failed: {reason}")]
    Task {
        operation: &'static str,
        reason: String,
    },
}

impl SnapshotError {
    pub(crate) fn io(
        operation: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| SnapshotError::Io {
            operation,
            path,
            source,
        }
    }

    /// The gRPC code containerd expects for this failure.
    pub fn code(&self) -> tonic::Code {
        match self {
            SnapshotError::NotFound { .. } | SnapshotError::ParentNotFound { .. } => {
                tonic::Code::NotFound
            }
            SnapshotError::AlreadyExists { .. } => tonic::Code::AlreadyExists,
            SnapshotError::WrongKind { .. } | SnapshotError::HasChildren { .. } => {
                tonic::Code::FailedPrecondition
            }
            SnapshotError::InvalidArgument { .. } | SnapshotError::Filter(_) => {
                tonic::Code::InvalidArgument
            }
            SnapshotError::RemoteUnavailable { .. } => tonic::Code::Unavailable,
            SnapshotError::Corrupt { .. } => tonic::Code::DataLoss,
            SnapshotError::Store { .. } | SnapshotError::Io { .. } | SnapshotError::Task { .. } => {
                tonic::Code::Internal
            }
        }
    }
}

impl From<SnapshotError> for tonic::Status {
    fn from(error: SnapshotError) -> Self {
        tonic::Status::new(error.code(), error.to_string())
    }
}

/// A snapshotter as containerd sees it (the shape of the `containerd-snapshots` crate's
/// trait). [`SnapshotService`] serves any implementation over gRPC.
pub trait Snapshotter: Send + Sync + 'static {
    type Error: std::error::Error + Into<tonic::Status> + Send;

    fn stat(&self, key: String) -> impl Future<Output = Result<Info, Self::Error>> + Send;

    /// Changes labels; `fieldpaths` are `labels` or `labels.KEY`, empty meaning all.
    fn update(
        &self,
        info: Info,
        fieldpaths: Vec<String>,
    ) -> impl Future<Output = Result<Info, Self::Error>> + Send;

    fn usage(&self, key: String) -> impl Future<Output = Result<Usage, Self::Error>> + Send;

    fn mounts(&self, key: String) -> impl Future<Output = Result<Vec<Mount>, Self::Error>> + Send;

    /// `parent` empty means no parent.
    fn prepare(
        &self,
        key: String,
        parent: String,
        labels: Labels,
    ) -> impl Future<Output = Result<Vec<Mount>, Self::Error>> + Send;

    fn view(
        &self,
        key: String,
        parent: String,
        labels: Labels,
    ) -> impl Future<Output = Result<Vec<Mount>, Self::Error>> + Send;

    fn commit(
        &self,
        name: String,
        key: String,
        labels: Labels,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    fn remove(&self, key: String) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Snapshots matching any of `filters` (containerd syntax); all when empty.
    fn list(
        &self,
        filters: Vec<String>,
    ) -> impl Future<Output = Result<Vec<Info>, Self::Error>> + Send;

    /// Reclaims disk space no snapshot uses.
    fn cleanup(&self) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

//! The hook through which lazily fetched (remote) layers become snapshots.
//!
//! When containerd unpacks an image it calls `Prepare(key, parent)` for each layer with
//! the label [`LABEL_TARGET_REF`] naming the committed snapshot it wants in the end. If
//! the labels also identify the layer (digest and image), the snapshotter asks
//! [`RemoteLayers::prepare_remote`] for a directory holding the layer's files. When it
//! gets one, it commits the snapshot under the target name with that directory as its
//! contents and answers `AlreadyExists`, which tells containerd to skip downloading and
//! unpacking the layer — the protocol stargz-snapshotter established.

use std::path::PathBuf;

use futures::future::BoxFuture;

use super::Labels;

/// Name of the committed snapshot containerd wants `Prepare` to produce.
pub const LABEL_TARGET_REF: &str = "containerd.io/snapshot.ref";
/// Layer digest, set by containerd's CRI plugin when `disable_snapshot_annotations = false`.
pub const LABEL_CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// Image reference, set by containerd's CRI plugin alongside the layer digest.
pub const LABEL_CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// Image reference, set by stargz-snapshotter's `ctr-remote images rpull` (and nerdctl):
/// sluice accepts its pulls too.
pub const LABEL_STARGZ_IMAGE_REF: &str = "containerd.io/snapshot/remote/stargz.reference";
/// Layer digest, set alongside [`LABEL_STARGZ_IMAGE_REF`].
pub const LABEL_STARGZ_LAYER_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";
/// Layer digest for clients that call the snapshotter directly. containerd forwards to
/// proxy snapshotters only labels under `containerd.io/snapshot/`, so `sluice pull`
/// sends the CRI labels as well.
pub const LABEL_SLUICE_LAYER_DIGEST: &str = "sluice.io/layer-digest";
/// Image reference, alongside [`LABEL_SLUICE_LAYER_DIGEST`].
pub const LABEL_SLUICE_IMAGE_REF: &str = "sluice.io/image-ref";
/// Set on committed snapshots whose contents come from a [`RemoteLayers`] directory.
pub const LABEL_REMOTE: &str = "sluice.io/remote";

/// A layer containerd asked for that may be mountable without downloading it.
#[derive(Debug, Clone)]
pub struct RemoteLayerRequest {
    /// The active snapshot being prepared.
    pub key: String,
    /// Its parent snapshot, empty for the bottom layer.
    pub parent: String,
    /// The committed snapshot name containerd wants (the layer's chain id).
    pub target: String,
    /// Digest of the layer blob, as the label gave it (`sha256:...`).
    pub layer_digest: String,
    /// Image the layer belongs to, as the label gave it.
    pub image_ref: String,
    /// All labels of the request.
    pub labels: Labels,
    /// An empty directory owned by this snapshot, where the layer may be mounted.
    pub mountpoint: PathBuf,
}

impl RemoteLayerRequest {
    /// Recognises a remote layer request by its labels; `None` means a normal snapshot.
    pub fn from_labels(
        key: &str,
        parent: &str,
        labels: &Labels,
        mountpoint: PathBuf,
    ) -> Option<Self> {
        let target = labels.get(LABEL_TARGET_REF)?;
        let pair = |digest: &str, image: &str| Some((labels.get(digest)?, labels.get(image)?));
        let (layer_digest, image_ref) = pair(LABEL_SLUICE_LAYER_DIGEST, LABEL_SLUICE_IMAGE_REF)
            .or_else(|| pair(LABEL_CRI_LAYER_DIGEST, LABEL_CRI_IMAGE_REF))
            .or_else(|| pair(LABEL_STARGZ_LAYER_DIGEST, LABEL_STARGZ_IMAGE_REF))?;
        Some(Self {
            key: key.to_owned(),
            parent: parent.to_owned(),
            target: target.clone(),
            layer_digest: layer_digest.clone(),
            image_ref: image_ref.clone(),
            labels: labels.clone(),
            mountpoint,
        })
    }
}

/// Where a remote layer's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteMount {
    /// Directory used as this layer's overlay lower directory.
    pub dir: PathBuf,
}

/// A committed remote snapshot, as handed to [`RemoteLayers::restore`] and
/// [`RemoteLayers::unmount`].
#[derive(Debug, Clone)]
pub struct RemoteSnapshot {
    pub name: String,
    pub labels: Labels,
    /// The directory the snapshotter offered when the layer was prepared.
    pub mountpoint: PathBuf,
    /// The directory [`RemoteLayers`] returned last.
    pub dir: PathBuf,
}

/// A remote layer that could not be mounted, restored or unmounted.
#[derive(Debug, thiserror::Error)]
#[error("remote layer {layer}: {source}")]
pub struct RemoteLayerError {
    /// The layer digest or snapshot name concerned.
    pub layer: String,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Mounts lazily fetched layers. Implemented by the FUSE layer; [`NoRemoteLayers`]
/// declines every layer so all snapshots are ordinary.
pub trait RemoteLayers: Send + Sync + 'static {
    /// Mount the layer, or `Ok(None)` to let containerd download it normally. An error
    /// also falls back to a normal download (and is logged).
    fn prepare_remote<'a>(
        &'a self,
        request: &'a RemoteLayerRequest,
    ) -> BoxFuture<'a, Result<Option<RemoteMount>, RemoteLayerError>>;

    /// Called at start for every committed remote snapshot in the store: mount it again.
    fn restore<'a>(
        &'a self,
        snapshot: &'a RemoteSnapshot,
    ) -> BoxFuture<'a, Result<RemoteMount, RemoteLayerError>>;

    /// Called when a remote snapshot is removed and for each one at shutdown.
    fn unmount<'a>(
        &'a self,
        snapshot: &'a RemoteSnapshot,
    ) -> BoxFuture<'a, Result<(), RemoteLayerError>>;
}

/// Declines every layer: containerd downloads and unpacks everything itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRemoteLayers;

impl RemoteLayers for NoRemoteLayers {
    fn prepare_remote<'a>(
        &'a self,
        _request: &'a RemoteLayerRequest,
    ) -> BoxFuture<'a, Result<Option<RemoteMount>, RemoteLayerError>> {
        Box::pin(async { Ok(None) })
    }

    fn restore<'a>(
        &'a self,
        snapshot: &'a RemoteSnapshot,
    ) -> BoxFuture<'a, Result<RemoteMount, RemoteLayerError>> {
        // Nothing was mounted by this implementation, so whatever directory is recorded
        // is used as it is.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn recognises_cri_and_sluice_labels() {
        let cri = labels(&[
            (LABEL_TARGET_REF, "sha256:chain"),
            (LABEL_CRI_LAYER_DIGEST, "sha256:layer"),
            (LABEL_CRI_IMAGE_REF, "r/img:1"),
        ]);
        let request = RemoteLayerRequest::from_labels("k", "p", &cri, PathBuf::from("/m")).unwrap();
        assert_eq!(request.target, "sha256:chain");
        assert_eq!(request.layer_digest, "sha256:layer");
        assert_eq!(request.image_ref, "r/img:1");
        let own = labels(&[
            (LABEL_TARGET_REF, "t"),
            (LABEL_SLUICE_LAYER_DIGEST, "sha256:own"),
            (LABEL_SLUICE_IMAGE_REF, "i"),
        ]);
        let request = RemoteLayerRequest::from_labels("k", "", &own, PathBuf::from("/m")).unwrap();
        assert_eq!(request.layer_digest, "sha256:own");
    }

    #[test]
    fn needs_target_and_layer_identity() {
        let no_target = labels(&[(LABEL_CRI_LAYER_DIGEST, "d"), (LABEL_CRI_IMAGE_REF, "i")]);
        assert!(RemoteLayerRequest::from_labels("k", "", &no_target, PathBuf::new()).is_none());
        let no_image = labels(&[(LABEL_TARGET_REF, "t"), (LABEL_CRI_LAYER_DIGEST, "d")]);
        assert!(RemoteLayerRequest::from_labels("k", "", &no_image, PathBuf::new()).is_none());
    }
}

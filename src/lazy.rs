//! Lazy layers for the snapshotter: the [`RemoteLayers`] implementation that turns a
//! layer containerd asks for into a FUSE mount, instead of a download.
//!
//! Prepare: resolve the image (once per image), find the layer's descriptor, open it
//! (footer → TOC), mount it, fetch its prefetch list before answering (bounded), then
//! stream the rest in the background. The first Prepare of an image starts opening and
//! prefetching all of the image's layers at once, so later Prepares find them ready.
//! What a restart needs — the descriptor and the TOC — is kept under `<cache>/tocs/`,
//! so layers mount again without the registry.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use serde::{Deserialize, Serialize};

use crate::cache::{ChunkCache, Layer, StreamHandle, StreamOptions};
use crate::digest::Digest;
use crate::fs::{FsOptions, MountedLayer, mount_layer};
use crate::layer::{LayerError, TocStore, open_remote_layer};
use crate::registry::{
    Descriptor, ImageReference, Platform, RegistryClient, RegistryError, ResolvedImage,
};
use crate::snapshot::{
    RemoteLayerError, RemoteLayerRequest, RemoteLayers, RemoteMount, RemoteSnapshot,
};

/// How lazy layers are mounted and fetched.
#[derive(Debug, Clone)]
pub struct LazyOptions {
    pub fs: FsOptions,
    /// `None`: no background streaming after mount.
    pub stream: Option<StreamOptions>,
    /// How long Prepare waits for a layer's prefetch list; zero disables prefetch.
    pub prefetch_timeout: Duration,
    /// Platform picked from multi-platform images.
    pub platform: Platform,
}

/// Why a lazy layer could not be served.
#[derive(Debug, thiserror::Error)]
pub enum LazyLayerError {
    #[error("image {image}: {source}")]
    Registry {
        image: String,
        #[source]
        source: RegistryError,
    },
    #[error(
        "image {image} has no layer {layer} for {platform}; the labels containerd sent do not match the image"
    )]
    LayerNotInImage {
        image: String,
        layer: String,
        platform: String,
    },
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error(transparent)]
    Mount(#[from] crate::fs::FsError),
    #[error(
        "layer {layer}: nothing kept under {} to mount it again; remove the image and pull it again",
        dir.display()
    )]
    NotKept { layer: String, dir: PathBuf },
    #[error("layer {layer}: keeping its descriptor in {}: {source}", path.display())]
    Keep {
        layer: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a restart needs to mount a layer again, kept beside its TOC.
#[derive(Debug, Serialize, Deserialize)]
struct KeptLayer {
    image: String,
    descriptor: Descriptor,
}

struct Mounted {
    mount: MountedLayer,
    _stream: Option<StreamHandle>,
}

/// Serves layers containerd prepares with the remote-snapshot labels.
pub struct LazyLayers {
    client: Arc<RegistryClient>,
    cache: Arc<ChunkCache>,
    store: TocStore,
    store_dir: PathBuf,
    runtime: tokio::runtime::Handle,
    options: LazyOptions,
    /// Resolved images by reference: one manifest fetch per image, not per layer. Never
    /// held across a registry request, so pulls of different images do not queue here.
    images: Mutex<HashMap<String, Arc<ResolvedImage>>>,
    /// Mounted layers by mountpoint.
    mounted: Mutex<HashMap<PathBuf, Mounted>>,
    /// Layers being opened and prefetched ahead of their Prepare, by digest. An entry
    /// leaves the map when its work ends; a later Prepare finds the TOC and chunks on disk.
    warmups: Arc<Mutex<HashMap<Digest, Warmup>>>,
}

/// Opening and prefetching one layer ahead of its Prepare.
type Warmup = Shared<BoxFuture<'static, Warmed>>;

#[derive(Clone)]
enum Warmed {
    Layer(Arc<Layer>),
    /// Plain tar+gzip or similar: containerd downloads it.
    NotChunked,
    /// Prepare opens the layer again itself and reports the error.
    Failed,
}

impl LazyLayers {
    pub fn new(
        client: Arc<RegistryClient>,
        cache: Arc<ChunkCache>,
        runtime: tokio::runtime::Handle,
        options: LazyOptions,
    ) -> Self {
        let store_dir = cache.dir().join("tocs");
        Self {
            client,
            cache,
            store: TocStore::new(&store_dir),
            store_dir,
            runtime,
            options,
            images: Mutex::default(),
            mounted: Mutex::default(),
            warmups: Arc::default(),
        }
    }

    fn kept_path(&self, layer: &Digest) -> PathBuf {
        self.store_dir.join(format!("{}.layer.json", layer.hex()))
    }

    /// The image behind `image`, from the map unless `fresh`.
    async fn resolve(
        &self,
        image: &str,
        fresh: bool,
    ) -> Result<Arc<ResolvedImage>, LazyLayerError> {
        if !fresh && let Some(resolved) = self.images_lock().get(image) {
            return Ok(Arc::clone(resolved));
        }
        let registry_error = |source| LazyLayerError::Registry {
            image: image.to_owned(),
            source,
        };
        let reference: ImageReference = image.parse().map_err(registry_error)?;
        // Two layers of one image arriving together may both resolve it; the second
        // answer simply replaces the first.
        let resolved = Arc::new(
            self.client
                .resolve(&reference, &self.options.platform)
                .await
                .map_err(registry_error)?,
        );
        let mut images = self.images_lock();
        // Images are few per node; keep the map from growing without bound anyway.
        if images.len() >= 256 {
            images.clear();
        }
        images.insert(image.to_owned(), Arc::clone(&resolved));
        Ok(resolved)
    }

    fn images_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<ResolvedImage>>> {
        self.images.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn prepare(
        &self,
        request: &RemoteLayerRequest,
    ) -> Result<Option<RemoteMount>, LazyLayerError> {
        let has_layer = |resolved: &ResolvedImage| {
            resolved
                .layers
                .iter()
                .any(|layer| layer.digest.as_str() == request.layer_digest)
        };
        let mut resolved = self.resolve(&request.image_ref, false).await?;
        if !has_layer(&resolved) {
            // The tag may have been pushed again since it was resolved.
            resolved = self.resolve(&request.image_ref, true).await?;
        }
        let descriptor = resolved
            .layers
            .iter()
            .find(|layer| layer.digest.as_str() == request.layer_digest)
            .ok_or_else(|| LazyLayerError::LayerNotInImage {
                image: request.image_ref.clone(),
                layer: request.layer_digest.clone(),
                platform: self.options.platform.to_string(),
            })?;
        self.warm_image(&request.image_ref, &resolved);
        let warmup = self
            .warmups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&descriptor.digest)
            .cloned();
        let warmed = match warmup {
            Some(warmup) => warmup.await,
            None => Warmed::Failed,
        };
        let not_chunked = || {
            tracing::info!(image = %request.image_ref, layer = %descriptor.digest, "not lazily mountable; containerd downloads it");
        };
        let layer = match warmed {
            Warmed::Layer(layer) => layer,
            Warmed::NotChunked => {
                not_chunked();
                return Ok(None);
            }
            Warmed::Failed => match open_remote_layer(
                &self.client,
                &request.image_ref,
                resolved.reference.repository(),
                descriptor,
                Some(&self.store),
            )
            .await
            {
                Ok(opened) => opened.layer,
                Err(LayerError::NotChunked { .. }) => {
                    not_chunked();
                    return Ok(None);
                }
                Err(error) => return Err(error.into()),
            },
        };
        self.keep(&request.image_ref, descriptor).await?;
        self.mount(layer, &request.mountpoint, true).await?;
        Ok(Some(RemoteMount {
            dir: request.mountpoint.clone(),
        }))
    }

    /// Open and prefetch every layer of `image` at once, in the background.
    ///
    /// containerd prepares an image's layers one after another, each Prepare waiting
    /// for its layer's prefetch; started together, the layers' round trips and
    /// transfers overlap, and later Prepares find their work done or under way.
    fn warm_image(&self, image: &str, resolved: &ResolvedImage) {
        if self.options.prefetch_timeout.is_zero() {
            return;
        }
        let mut warmups = self.warmups.lock().unwrap_or_else(PoisonError::into_inner);
        for descriptor in &resolved.layers {
            if warmups.contains_key(&descriptor.digest) {
                continue;
            }
            let (client, cache, store) = (
                Arc::clone(&self.client),
                Arc::clone(&self.cache),
                self.store.clone(),
            );
            let (image, repository, descriptor) = (
                image.to_owned(),
                resolved.reference.repository().clone(),
                descriptor.clone(),
            );
            let timeout = self.options.prefetch_timeout;
            let digest = descriptor.digest.clone();
            let work: BoxFuture<'static, Warmed> = Box::pin(async move {
                let layer = match open_remote_layer(
                    &client,
                    &image,
                    &repository,
                    &descriptor,
                    Some(&store),
                )
                .await
                {
                    Ok(opened) => opened.layer,
                    Err(LayerError::NotChunked { .. }) => return Warmed::NotChunked,
                    Err(_) => return Warmed::Failed,
                };
                let list = &layer.index().prefetch;
                if !list.is_empty()
                    && let Err(error) = cache.prefetch(&layer, list, timeout).await
                {
                    tracing::debug!(layer = %layer.label(), %error, "prefetch ahead of Prepare incomplete");
                }
                Warmed::Layer(layer)
            });
            let work = work.shared();
            warmups.insert(digest.clone(), work.clone());
            let map = Arc::clone(&self.warmups);
            self.runtime.spawn(async move {
                work.await;
                map.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&digest);
            });
        }
    }

    async fn keep(&self, image: &str, descriptor: &Descriptor) -> Result<(), LazyLayerError> {
        let path = self.kept_path(&descriptor.digest);
        let kept = KeptLayer {
            image: image.to_owned(),
            descriptor: descriptor.clone(),
        };
        let bytes = serde_json::to_vec(&kept).expect("descriptor serializes");
        let keep_error = |source| LazyLayerError::Keep {
            layer: descriptor.digest.to_string(),
            path: path.clone(),
            source,
        };
        tokio::fs::create_dir_all(&self.store_dir)
            .await
            .map_err(keep_error)?;
        let tmp = path.with_extension("json.tmp");
        tokio::fs::write(&tmp, bytes).await.map_err(keep_error)?;
        tokio::fs::rename(&tmp, &path).await.map_err(keep_error)
    }

    /// Mount `layer` at `mountpoint`; prefetch its landmark files when `prefetch`.
    async fn mount(
        &self,
        layer: Arc<Layer>,
        mountpoint: &Path,
        prefetch: bool,
    ) -> Result<(), LazyLayerError> {
        // A daemon killed earlier leaves a dead FUSE mount behind ("transport endpoint
        // is not connected"); mounting over it would hide nothing and fail reads.
        let _ = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH);
        tokio::fs::create_dir_all(mountpoint)
            .await
            .map_err(|source| crate::fs::FsError::Mount {
                layer: layer.label().to_owned(),
                mountpoint: mountpoint.to_owned(),
                source,
            })?;
        let mount = {
            let (layer, cache, runtime) = (
                Arc::clone(&layer),
                Arc::clone(&self.cache),
                self.runtime.clone(),
            );
            let (mountpoint, options) = (mountpoint.to_owned(), self.options.fs.clone());
            tokio::task::spawn_blocking(move || {
                mount_layer(layer, cache, runtime, &mountpoint, options)
            })
            .await
            .expect("mount task does not panic")?
        };
        let prefetch_list = &layer.index().prefetch;
        if prefetch
            && !prefetch_list.is_empty()
            && !self.options.prefetch_timeout.is_zero()
            && let Err(error) = self
                .cache
                .prefetch(&layer, prefetch_list, self.options.prefetch_timeout)
                .await
        {
            // The container still starts: what was not prefetched is read on demand.
            tracing::warn!(layer = %layer.label(), %error, "prefetch incomplete");
        }
        let stream = self.options.stream.clone().map(|options| {
            self.cache
                .stream_layer(Arc::clone(&layer), options, &self.runtime)
        });
        self.mounted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                mountpoint.to_owned(),
                Mounted {
                    mount,
                    _stream: stream,
                },
            );
        Ok(())
    }

    async fn restore_layer(
        &self,
        snapshot: &RemoteSnapshot,
    ) -> Result<RemoteMount, LazyLayerError> {
        let request = RemoteLayerRequest::from_labels(
            &snapshot.name,
            "",
            &snapshot.labels,
            snapshot.mountpoint.clone(),
        );
        let layer = request
            .as_ref()
            .map(|r| r.layer_digest.clone())
            .unwrap_or_else(|| snapshot.name.clone());
        let not_kept = || LazyLayerError::NotKept {
            layer: layer.clone(),
            dir: self.store_dir.clone(),
        };
        let digest: Digest = layer.parse().map_err(|_| not_kept())?;
        let bytes = tokio::fs::read(self.kept_path(&digest))
            .await
            .map_err(|_| not_kept())?;
        let kept: KeptLayer = serde_json::from_slice(&bytes).map_err(|_| not_kept())?;
        let reference: ImageReference =
            kept.image
                .parse()
                .map_err(|source| LazyLayerError::Registry {
                    image: kept.image.clone(),
                    source,
                })?;
        let opened = open_remote_layer(
            &self.client,
            &kept.image,
            reference.repository(),
            &kept.descriptor,
            Some(&self.store),
        )
        .await?;
        self.mount(opened.layer, &snapshot.mountpoint, false)
            .await?;
        Ok(RemoteMount {
            dir: snapshot.mountpoint.clone(),
        })
    }

    async fn unmount_layer(&self, snapshot: &RemoteSnapshot) -> Result<(), LazyLayerError> {
        let mounted = self
            .mounted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&snapshot.mountpoint);
        if let Some(mounted) = mounted {
            drop(mounted._stream);
            let mount = mounted.mount;
            tokio::task::spawn_blocking(move || mount.unmount())
                .await
                .expect("unmount task does not panic")?;
        }
        Ok(())
    }
}

fn hook_error(layer: &str, error: LazyLayerError) -> RemoteLayerError {
    RemoteLayerError {
        layer: layer.to_owned(),
        source: Box::new(error),
    }
}

impl RemoteLayers for LazyLayers {
    fn prepare_remote<'a>(
        &'a self,
        request: &'a RemoteLayerRequest,
    ) -> BoxFuture<'a, Result<Option<RemoteMount>, RemoteLayerError>> {
        Box::pin(async move {
            self.prepare(request)
                .await
                .map_err(|error| hook_error(&request.layer_digest, error))
        })
    }

    fn restore<'a>(
        &'a self,
        snapshot: &'a RemoteSnapshot,
    ) -> BoxFuture<'a, Result<RemoteMount, RemoteLayerError>> {
        Box::pin(async move {
            self.restore_layer(snapshot)
                .await
                .map_err(|error| hook_error(&snapshot.name, error))
        })
    }

    fn unmount<'a>(
        &'a self,
        snapshot: &'a RemoteSnapshot,
    ) -> BoxFuture<'a, Result<(), RemoteLayerError>> {
        Box::pin(async move {
            self.unmount_layer(snapshot)
                .await
                .map_err(|error| hook_error(&snapshot.name, error))
        })
    }
}

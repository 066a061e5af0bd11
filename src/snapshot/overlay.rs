//! [`OverlaySnapshotter`]: snapshots as directories under `root/snapshots/<id>/{fs,work}`,
//! mounted with overlayfs, metadata in redb.
//!
//! Crash safety: a snapshot exists exactly when its record is committed in the store.
//! A new snapshot's directories are built under a temporary name and renamed to their id
//! inside the store transaction, just before it commits; removal commits first and
//! deletes afterwards. Whatever a crash leaves behind is a directory the store does not
//! name, and [`OverlaySnapshotter::open`] deletes those (after detaching mounts a killed
//! process left under the root).

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::RwLock;

use super::filter::Filter;
use super::remote::{
    LABEL_REMOTE, LABEL_TARGET_REF, RemoteLayerRequest, RemoteLayers, RemoteSnapshot,
};
use super::store::{Record, SnapshotId, Store, Timestamp};
use super::{Info, Kind, Labels, MAX_LABEL_BYTES, SnapshotError, Snapshotter, Usage};
use crate::api::containerd::types::Mount;

const TEMP_PREFIX: &str = "new-";

/// containerd's overlayfs snapshotter semantics, plus the remote-layer hook.
pub struct OverlaySnapshotter {
    inner: Arc<Inner>,
    remote: Arc<dyn RemoteLayers>,
    /// Held shared by operations that create directories, exclusively by `cleanup`, so
    /// cleanup never deletes a snapshot being built.
    building: RwLock<()>,
    /// Remote snapshots whose restore failed at start, with the reason.
    unavailable: Mutex<HashMap<String, String>>,
}

struct Inner {
    snapshots_dir: PathBuf,
    store: Store,
    /// Whether to pass `index=off` (the overlay module has the option), as containerd
    /// does: the inodes index would tie lower layers to the first overlay using them.
    overlay_index_off: bool,
}

impl OverlaySnapshotter {
    /// Opens the snapshotter state under `root` (created if needed), repairs what an
    /// earlier crash left, and asks `remote` to restore every remote snapshot.
    pub async fn open(root: &Path, remote: Arc<dyn RemoteLayers>) -> Result<Self, SnapshotError> {
        let root = root.to_owned();
        let inner = blocking("open", move || Inner::open(&root)).await?;
        let snapshotter = Self {
            inner: Arc::new(inner),
            remote,
            building: RwLock::new(()),
            unavailable: Mutex::new(HashMap::new()),
        };
        snapshotter.restore_remote().await?;
        Ok(snapshotter)
    }

    /// The directory holding the snapshot directories.
    pub fn snapshots_dir(&self) -> &Path {
        &self.inner.snapshots_dir
    }

    async fn restore_remote(&self) -> Result<(), SnapshotError> {
        for snapshot in self.remote_snapshots().await? {
            match self.remote.restore(&snapshot).await {
                Ok(mount) if mount.dir == snapshot.dir => {}
                Ok(mount) => {
                    let inner = Arc::clone(&self.inner);
                    let name = snapshot.name.clone();
                    blocking("restore", move || inner.set_remote_dir(&name, mount.dir)).await?;
                }
                Err(error) => {
                    tracing::error!(snapshot = %snapshot.name, %error, "remote layer not restored; containers using it cannot start");
                    self.unavailable_lock()
                        .insert(snapshot.name.clone(), error.to_string());
                }
            }
        }
        Ok(())
    }

    async fn remote_snapshots(&self) -> Result<Vec<RemoteSnapshot>, SnapshotError> {
        let inner = Arc::clone(&self.inner);
        let records = blocking("list", move || inner.store.all()).await?;
        Ok(records
            .into_iter()
            .filter_map(|(name, record)| self.remote_snapshot(name, record))
            .collect())
    }

    fn remote_snapshot(&self, name: String, record: Record) -> Option<RemoteSnapshot> {
        let dir = record.remote_dir?;
        Some(RemoteSnapshot {
            name,
            labels: record.labels,
            mountpoint: self.inner.fs_dir(record.id),
            dir,
        })
    }

    fn unavailable_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.unavailable
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Unmounts every remote layer through the hook; call before exiting.
    pub async fn shutdown(&self) {
        let snapshots = match self.remote_snapshots().await {
            Ok(snapshots) => snapshots,
            Err(error) => {
                tracing::error!(%error, "cannot list remote layers to unmount them");
                return;
            }
        };
        for snapshot in snapshots {
            if let Err(error) = self.remote.unmount(&snapshot).await {
                tracing::warn!(snapshot = %snapshot.name, %error, "unmounting remote layer");
            }
        }
    }

    async fn create(
        &self,
        kind: Kind,
        key: String,
        parent: String,
        labels: Labels,
    ) -> Result<Vec<Mount>, SnapshotError> {
        let _building = self.building.read().await;
        let inner = Arc::clone(&self.inner);
        blocking("prepare", move || {
            inner.create(kind, &key, &parent, labels)?;
            inner.mounts(&key)
        })
        .await
    }

    /// The remote-layer path of `Prepare`; `Ok(None)` means the hook declined and an
    /// ordinary active snapshot `key` exists.
    async fn prepare_remote(
        &self,
        key: &str,
        parent: &str,
        labels: &Labels,
    ) -> Result<Option<SnapshotError>, SnapshotError> {
        let Some(target) = labels.get(LABEL_TARGET_REF) else {
            return Ok(None);
        };
        let inner = Arc::clone(&self.inner);
        let target_name = target.clone();
        if blocking("stat", move || inner.store.get(&target_name))
            .await?
            .is_some()
        {
            return Ok(Some(SnapshotError::AlreadyExists {
                key: target.clone(),
            }));
        }
        let id = {
            // Only while the directory is being built: once committed, cleanup leaves it
            // alone, and the hook below may take long.
            let _building = self.building.read().await;
            let inner = Arc::clone(&self.inner);
            let (owned_key, owned_parent, owned_labels) =
                (key.to_owned(), parent.to_owned(), labels.clone());
            blocking("prepare", move || {
                inner.create(Kind::Active, &owned_key, &owned_parent, owned_labels)
            })
            .await?
        };
        let Some(request) =
            RemoteLayerRequest::from_labels(key, parent, labels, self.inner.fs_dir(id))
        else {
            return Ok(None);
        };
        let mount = match self.remote.prepare_remote(&request).await {
            Ok(Some(mount)) => mount,
            Ok(None) => return Ok(None),
            Err(error) => {
                tracing::warn!(%key, layer = %request.layer_digest, image = %request.image_ref, %error,
                    "remote layer unavailable; containerd will download it");
                return Ok(None);
            }
        };
        let mut committed_labels = labels.clone();
        committed_labels.insert(LABEL_REMOTE.to_owned(), "true".to_owned());
        let inner = Arc::clone(&self.inner);
        let (owned_key, owned_target, dir) = (key.to_owned(), target.clone(), mount.dir.clone());
        let committed = blocking("commit", move || {
            inner.commit_remote(&owned_key, &owned_target, committed_labels, dir)
        })
        .await;
        match committed {
            Ok(()) => {
                tracing::info!(%key, %target, layer = %request.layer_digest, "remote layer mounted");
                Ok(Some(SnapshotError::AlreadyExists {
                    key: target.clone(),
                }))
            }
            Err(error) => {
                // The layer was mounted for nothing: undo it and drop the active snapshot.
                let snapshot = RemoteSnapshot {
                    name: key.to_owned(),
                    labels: labels.clone(),
                    mountpoint: request.mountpoint.clone(),
                    dir: mount.dir,
                };
                if let Err(unmount_error) = self.remote.unmount(&snapshot).await {
                    tracing::warn!(%key, error = %unmount_error, "unmounting unused remote layer");
                }
                let inner = Arc::clone(&self.inner);
                let owned_key = key.to_owned();
                blocking("remove", move || inner.remove(&owned_key).map(|_| ())).await?;
                Err(error)
            }
        }
    }
}

/// Runs filesystem and database work off the async runtime.
async fn blocking<T: Send + 'static>(
    operation: &'static str,
    work: impl FnOnce() -> Result<T, SnapshotError> + Send + 'static,
) -> Result<T, SnapshotError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| SnapshotError::Task {
            operation,
            reason: error.to_string(),
        })?
}

fn validate_labels(labels: &Labels) -> Result<(), SnapshotError> {
    for (key, value) in labels {
        if key.is_empty() {
            return Err(SnapshotError::InvalidArgument {
                reason: "label key is empty".to_owned(),
            });
        }
        if key.len() + value.len() > MAX_LABEL_BYTES {
            return Err(SnapshotError::InvalidArgument {
                reason: format!(
                    "label {key:?} is longer than {MAX_LABEL_BYTES} bytes with its value"
                ),
            });
        }
    }
    Ok(())
}

fn validate_key(what: &str, key: &str) -> Result<(), SnapshotError> {
    if key.is_empty() {
        return Err(SnapshotError::InvalidArgument {
            reason: format!("{what} is empty"),
        });
    }
    Ok(())
}

impl Inner {
    fn open(root: &Path) -> Result<Self, SnapshotError> {
        let snapshots_dir = root.join("snapshots");
        std::fs::create_dir_all(&snapshots_dir)
            .map_err(SnapshotError::io("creating", &snapshots_dir))?;
        let store = Store::open(&root.join("metadata.redb"))?;
        let inner = Self {
            snapshots_dir,
            store,
            overlay_index_off: Path::new("/sys/module/overlay/parameters/index").exists(),
        };
        inner.detach_stale_mounts();
        inner.remove_unknown_dirs()?;
        Ok(inner)
    }

    fn dir(&self, id: SnapshotId) -> PathBuf {
        self.snapshots_dir.join(id.to_string())
    }

    fn fs_dir(&self, id: SnapshotId) -> PathBuf {
        self.dir(id).join("fs")
    }

    /// The directory a snapshot contributes as an overlay lower layer.
    fn lower_dir(&self, record: &Record) -> PathBuf {
        record
            .remote_dir
            .clone()
            .unwrap_or_else(|| self.fs_dir(record.id))
    }

    /// Mounts a killed predecessor left under the snapshots directory (FUSE layers whose
    /// server is gone) would make their directories impossible to delete or reuse.
    fn detach_stale_mounts(&self) {
        let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
            return;
        };
        let mut stale: Vec<PathBuf> = mountinfo
            .lines()
            .filter_map(|line| line.split(' ').nth(4))
            .map(|escaped| PathBuf::from(unescape_mountinfo(escaped)))
            .filter(|mountpoint| mountpoint.starts_with(&self.snapshots_dir))
            .collect();
        // Deepest first, so nested mounts go before the ones they sit on.
        stale.sort_by_key(|path| std::cmp::Reverse(path.components().count()));
        for mountpoint in stale {
            match nix::mount::umount2(&mountpoint, nix::mount::MntFlags::MNT_DETACH) {
                Ok(()) => {
                    tracing::info!(mountpoint = %mountpoint.display(), "detached stale mount")
                }
                Err(error) => {
                    tracing::warn!(mountpoint = %mountpoint.display(), %error, "detaching stale mount")
                }
            }
        }
    }

    /// Deletes directories under snapshots/ that no committed record names.
    fn remove_unknown_dirs(&self) -> Result<(), SnapshotError> {
        let known: HashSet<String> = self
            .store
            .all()?
            .into_iter()
            .map(|(_, record)| record.id.to_string())
            .collect();
        let entries = std::fs::read_dir(&self.snapshots_dir)
            .map_err(SnapshotError::io("listing", &self.snapshots_dir))?;
        for entry in entries {
            let entry = entry.map_err(SnapshotError::io("listing", &self.snapshots_dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if known.contains(&name) {
                continue;
            }
            let path = entry.path();
            tracing::info!(path = %path.display(), "removing directory of no snapshot");
            if let Err(error) = remove_tree(&path) {
                // Harmless where it is (no snapshot refers to it); do not refuse to start.
                tracing::warn!(%error, "cannot remove directory of no snapshot; will retry at cleanup");
            }
        }
        Ok(())
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: Labels,
    ) -> Result<SnapshotId, SnapshotError> {
        validate_key("snapshot key", key)?;
        validate_labels(&labels)?;
        let temp = self
            .snapshots_dir
            .join(format!("{TEMP_PREFIX}{:016x}", rand::random::<u64>()));
        let result = self.create_in(kind, key, parent, labels, &temp);
        if result.is_err() && temp.exists() {
            // Best effort: what stays behind is removed by the next start or cleanup.
            let _ = std::fs::remove_dir_all(&temp);
        }
        result
    }

    fn create_in(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: Labels,
        temp: &Path,
    ) -> Result<SnapshotId, SnapshotError> {
        std::fs::create_dir(temp).map_err(SnapshotError::io("creating", temp))?;
        let fs = temp.join("fs");
        std::fs::create_dir(&fs).map_err(SnapshotError::io("creating", &fs))?;
        if kind == Kind::Active {
            let work = temp.join("work");
            std::fs::create_dir(&work).map_err(SnapshotError::io("creating", &work))?;
        }
        let txn = self.store.begin()?;
        if txn.get(key)?.is_some() {
            return Err(SnapshotError::AlreadyExists {
                key: key.to_owned(),
            });
        }
        if !parent.is_empty() {
            let Some(parent_record) = txn.get(parent)? else {
                return Err(SnapshotError::ParentNotFound {
                    key: key.to_owned(),
                    parent: parent.to_owned(),
                });
            };
            if parent_record.kind != Kind::Committed {
                return Err(SnapshotError::InvalidArgument {
                    reason: format!(
                        "parent {parent:?} of {key:?} is {}, not committed",
                        parent_record.kind.as_str()
                    ),
                });
            }
        }
        let id = txn.next_id()?;
        let now = Timestamp::now();
        txn.put(
            key,
            &Record {
                id,
                kind,
                parent: parent.to_owned(),
                labels,
                created: now,
                updated: now,
                usage: None,
                remote_dir: None,
            },
        )?;
        let dir = self.dir(id);
        std::fs::rename(temp, &dir).map_err(SnapshotError::io("renaming", temp))?;
        if let Err(error) = txn.commit() {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(error);
        }
        Ok(id)
    }

    fn mounts(&self, key: &str) -> Result<Vec<Mount>, SnapshotError> {
        let chain = self.store.chain(key)?;
        let ((_, me), parents) = chain.split_first().ok_or_else(|| SnapshotError::NotFound {
            key: key.to_owned(),
        })?;
        let bind = |source: PathBuf, mode: &str| Mount {
            r#type: "bind".to_owned(),
            source: source.to_string_lossy().into_owned(),
            target: String::new(),
            options: vec![mode.to_owned(), "rbind".to_owned()],
        };
        match (me.kind, parents) {
            (Kind::Committed, _) => Err(SnapshotError::WrongKind {
                key: key.to_owned(),
                operation: "mounts",
                actual: "committed",
                expected: "active or view",
            }),
            (Kind::Active, []) => Ok(vec![bind(self.fs_dir(me.id), "rw")]),
            (Kind::View, []) => Ok(vec![bind(self.fs_dir(me.id), "ro")]),
            (Kind::View, [(_, only)]) => Ok(vec![bind(self.lower_dir(only), "ro")]),
            (kind, parents) => {
                let mut options = Vec::new();
                if self.overlay_index_off {
                    options.push("index=off".to_owned());
                }
                if kind == Kind::Active {
                    options.push(format!(
                        "workdir={}",
                        self.dir(me.id).join("work").display()
                    ));
                    options.push(format!("upperdir={}", self.fs_dir(me.id).display()));
                }
                let lowers: Vec<String> = parents
                    .iter()
                    .map(|(_, record)| self.lower_dir(record).to_string_lossy().into_owned())
                    .collect();
                options.push(format!("lowerdir={}", lowers.join(":")));
                Ok(vec![Mount {
                    r#type: "overlay".to_owned(),
                    source: "overlay".to_owned(),
                    target: String::new(),
                    options,
                }])
            }
        }
    }

    fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<(), SnapshotError> {
        validate_key("snapshot name", name)?;
        validate_labels(&labels)?;
        let record = self
            .store
            .get(key)?
            .ok_or_else(|| SnapshotError::NotFound {
                key: key.to_owned(),
            })?;
        // Measured before the transaction: containerd no longer writes to a snapshot it
        // commits, and walking the tree must not hold the write lock.
        let usage = disk_usage(&self.fs_dir(record.id))?;
        self.commit_with(name, key, labels, Some(usage), None, record.id)
    }

    fn commit_remote(
        &self,
        key: &str,
        name: &str,
        labels: Labels,
        dir: PathBuf,
    ) -> Result<(), SnapshotError> {
        let record = self
            .store
            .get(key)?
            .ok_or_else(|| SnapshotError::NotFound {
                key: key.to_owned(),
            })?;
        // The layer's bytes live in the chunk cache, not in this snapshot.
        self.commit_with(
            name,
            key,
            labels,
            Some(Usage::default()),
            Some(dir),
            record.id,
        )
    }

    fn commit_with(
        &self,
        name: &str,
        key: &str,
        labels: Labels,
        usage: Option<Usage>,
        remote_dir: Option<PathBuf>,
        measured_id: SnapshotId,
    ) -> Result<(), SnapshotError> {
        let txn = self.store.begin()?;
        if txn.get(name)?.is_some() {
            return Err(SnapshotError::AlreadyExists {
                key: name.to_owned(),
            });
        }
        let record = txn.get(key)?.ok_or_else(|| SnapshotError::NotFound {
            key: key.to_owned(),
        })?;
        if record.kind != Kind::Active {
            return Err(SnapshotError::WrongKind {
                key: key.to_owned(),
                operation: "commit",
                actual: record.kind.as_str(),
                expected: "active",
            });
        }
        if record.id != measured_id {
            // Removed and prepared again while we measured: the usage belongs to another.
            return Err(SnapshotError::NotFound {
                key: key.to_owned(),
            });
        }
        let now = Timestamp::now();
        txn.delete(key)?;
        txn.put(
            name,
            &Record {
                id: record.id,
                kind: Kind::Committed,
                parent: record.parent,
                labels,
                created: now,
                updated: now,
                usage,
                remote_dir,
            },
        )?;
        txn.commit()
    }

    /// Forgets `key` and deletes its directory; returns its record.
    fn remove(&self, key: &str) -> Result<Record, SnapshotError> {
        let txn = self.store.begin()?;
        let record = txn.get(key)?.ok_or_else(|| SnapshotError::NotFound {
            key: key.to_owned(),
        })?;
        if let Some(child) = txn.first_child(key)? {
            return Err(SnapshotError::HasChildren {
                key: key.to_owned(),
                child,
            });
        }
        txn.delete(key)?;
        txn.commit()?;
        Ok(record)
    }

    fn remove_dir_of(&self, record: &Record) {
        let dir = self.dir(record.id);
        if let Err(error) = remove_tree(&dir) {
            // The snapshot is gone already; cleanup or the next start retries.
            tracing::warn!(%error, "deleting directory of removed snapshot");
        }
    }

    fn update(&self, info: Info, fieldpaths: &[String]) -> Result<Info, SnapshotError> {
        validate_labels(&info.labels)?;
        let txn = self.store.begin()?;
        let mut record = txn
            .get(&info.name)?
            .ok_or_else(|| SnapshotError::NotFound {
                key: info.name.clone(),
            })?;
        if fieldpaths.is_empty() {
            record.labels = info.labels;
        } else {
            for path in fieldpaths {
                if path == "labels" {
                    record.labels = info.labels.clone();
                } else if let Some(label) = path.strip_prefix("labels.") {
                    match info.labels.get(label) {
                        Some(value) if !value.is_empty() => {
                            record.labels.insert(label.to_owned(), value.clone());
                        }
                        _ => {
                            record.labels.remove(label);
                        }
                    }
                } else {
                    return Err(SnapshotError::InvalidArgument {
                        reason: format!(
                            "cannot update field {path:?} of snapshot {:?}; only labels and labels.KEY are mutable",
                            info.name
                        ),
                    });
                }
            }
        }
        record.updated = Timestamp::now();
        txn.put(&info.name, &record)?;
        txn.commit()?;
        Ok(record.info(&info.name))
    }

    fn usage(&self, key: &str) -> Result<Usage, SnapshotError> {
        let record = self
            .store
            .get(key)?
            .ok_or_else(|| SnapshotError::NotFound {
                key: key.to_owned(),
            })?;
        match record.kind {
            Kind::Active => disk_usage(&self.fs_dir(record.id)),
            // Views own no data; containerd's overlayfs snapshotter reports zero too.
            Kind::View => Ok(Usage::default()),
            Kind::Committed => Ok(record.usage.unwrap_or_default()),
        }
    }

    fn set_remote_dir(&self, name: &str, dir: PathBuf) -> Result<(), SnapshotError> {
        let txn = self.store.begin()?;
        let mut record = txn.get(name)?.ok_or_else(|| SnapshotError::NotFound {
            key: name.to_owned(),
        })?;
        record.remote_dir = Some(dir);
        txn.put(name, &record)?;
        txn.commit()
    }
}

/// `rm -rf` that tolerates the path being gone already.
fn remove_tree(path: &Path) -> Result<(), SnapshotError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SnapshotError::Io {
            operation: "deleting",
            path: path.to_owned(),
            source,
        }),
    }
}

/// Allocated bytes and inodes under `root` (included), hard links counted once, not
/// crossing into other filesystems — what containerd's `fs.DiskUsage` reports.
fn disk_usage(root: &Path) -> Result<Usage, SnapshotError> {
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    let root_metadata =
        std::fs::symlink_metadata(root).map_err(SnapshotError::io("measuring", root))?;
    let device = root_metadata.dev();
    let mut pending = vec![(root.to_owned(), root_metadata)];
    while let Some((path, metadata)) = pending.pop() {
        if metadata.dev() != device || !seen.insert(metadata.ino()) {
            continue;
        }
        usage.size += i64::try_from(metadata.blocks().saturating_mul(512)).unwrap_or(i64::MAX);
        usage.inodes += 1;
        if metadata.is_dir() {
            let entries =
                std::fs::read_dir(&path).map_err(SnapshotError::io("measuring", &path))?;
            for entry in entries {
                let entry = entry.map_err(SnapshotError::io("measuring", &path))?;
                let child = entry.path();
                let child_metadata = std::fs::symlink_metadata(&child)
                    .map_err(SnapshotError::io("measuring", &child))?;
                pending.push((child, child_metadata));
            }
        }
    }
    Ok(usage)
}

/// Mount points in /proc/self/mountinfo escape space, tab, newline and backslash as
/// three octal digits.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'\\'
            && let Some(digits) = field.get(index + 1..index + 4)
            && let Ok(value) = u8::from_str_radix(digits, 8)
        {
            out.push(value);
            index += 4;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Snapshotter for OverlaySnapshotter {
    type Error = SnapshotError;

    async fn stat(&self, key: String) -> Result<Info, SnapshotError> {
        let inner = Arc::clone(&self.inner);
        blocking("stat", move || {
            let record = inner
                .store
                .get(&key)?
                .ok_or_else(|| SnapshotError::NotFound { key: key.clone() })?;
            Ok(record.info(&key))
        })
        .await
    }

    async fn update(&self, info: Info, fieldpaths: Vec<String>) -> Result<Info, SnapshotError> {
        let inner = Arc::clone(&self.inner);
        blocking("update", move || inner.update(info, &fieldpaths)).await
    }

    async fn usage(&self, key: String) -> Result<Usage, SnapshotError> {
        let inner = Arc::clone(&self.inner);
        blocking("usage", move || inner.usage(&key)).await
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>, SnapshotError> {
        let inner = Arc::clone(&self.inner);
        let chain_key = key.clone();
        let chain = blocking("mounts", move || inner.store.chain(&chain_key)).await?;
        {
            let unavailable = self.unavailable_lock();
            for (name, _) in &chain {
                if let Some(reason) = unavailable.get(name) {
                    return Err(SnapshotError::RemoteUnavailable {
                        name: name.clone(),
                        reason: reason.clone(),
                    });
                }
            }
        }
        let inner = Arc::clone(&self.inner);
        blocking("mounts", move || inner.mounts(&key)).await
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: Labels,
    ) -> Result<Vec<Mount>, SnapshotError> {
        validate_key("snapshot key", &key)?;
        validate_labels(&labels)?;
        if labels.contains_key(LABEL_TARGET_REF) {
            if let Some(answer) = self.prepare_remote(&key, &parent, &labels).await? {
                return Err(answer);
            }
            return self.mounts(key).await;
        }
        self.create(Kind::Active, key, parent, labels).await
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        labels: Labels,
    ) -> Result<Vec<Mount>, SnapshotError> {
        self.create(Kind::View, key, parent, labels).await
    }

    async fn commit(&self, name: String, key: String, labels: Labels) -> Result<(), SnapshotError> {
        let inner = Arc::clone(&self.inner);
        blocking("commit", move || inner.commit(&name, &key, labels)).await
    }

    async fn remove(&self, key: String) -> Result<(), SnapshotError> {
        let inner = Arc::clone(&self.inner);
        let name = key.clone();
        let record = blocking("remove", move || inner.remove(&key)).await?;
        if let Some(snapshot) = self.remote_snapshot(name.clone(), record.clone()) {
            if let Err(error) = self.remote.unmount(&snapshot).await {
                tracing::warn!(snapshot = %name, %error, "unmounting removed remote layer");
            }
            self.unavailable_lock().remove(&name);
        }
        let inner = Arc::clone(&self.inner);
        blocking("remove", move || {
            inner.remove_dir_of(&record);
            Ok(())
        })
        .await
    }

    async fn list(&self, filters: Vec<String>) -> Result<Vec<Info>, SnapshotError> {
        let filter = Filter::parse_all(&filters)?;
        let inner = Arc::clone(&self.inner);
        let records = blocking("list", move || inner.store.all()).await?;
        Ok(records
            .into_iter()
            .map(|(name, record)| record.info(&name))
            .filter(|info| filter.matches(info))
            .collect())
    }

    async fn cleanup(&self) -> Result<(), SnapshotError> {
        let _exclusive = self.building.write().await;
        let inner = Arc::clone(&self.inner);
        blocking("cleanup", move || inner.remove_unknown_dirs()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::NoRemoteLayers;

    async fn open(root: &Path) -> OverlaySnapshotter {
        OverlaySnapshotter::open(root, Arc::new(NoRemoteLayers))
            .await
            .unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b\\134c"), "/a b\\c");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/end\\04"), "/end\\04");
    }

    #[tokio::test]
    async fn chain_mounts_newest_first() {
        let root = tempfile::tempdir().unwrap();
        let s = open(root.path()).await;
        let base = s
            .prepare("a".into(), String::new(), Labels::new())
            .await
            .unwrap();
        assert_eq!(base[0].r#type, "bind");
        assert_eq!(base[0].options, ["rw", "rbind"]);
        std::fs::write(Path::new(&base[0].source).join("file"), b"hello").unwrap();
        s.commit("A".into(), "a".into(), Labels::new())
            .await
            .unwrap();
        let usage = s.usage("A".into()).await.unwrap();
        assert_eq!(usage.inodes, 2);
        assert!(usage.size > 0);

        let view = s.view("v".into(), "A".into(), Labels::new()).await.unwrap();
        assert_eq!(view[0].r#type, "bind");
        assert_eq!(view[0].options, ["ro", "rbind"]);
        assert!(Path::new(&view[0].source).join("file").exists());

        s.prepare("b".into(), "A".into(), Labels::new())
            .await
            .unwrap();
        s.commit("B".into(), "b".into(), Labels::new())
            .await
            .unwrap();
        let top = s
            .prepare("c".into(), "B".into(), Labels::new())
            .await
            .unwrap();
        assert_eq!(top[0].r#type, "overlay");
        let lower = top[0]
            .options
            .iter()
            .find_map(|o| o.strip_prefix("lowerdir="))
            .unwrap();
        let dirs: Vec<&str> = lower.split(':').collect();
        assert_eq!(dirs.len(), 2);
        assert!(
            dirs[0].ends_with("/3/fs") && dirs[1].ends_with("/1/fs"),
            "{dirs:?}"
        );
        assert!(top[0].options.iter().any(|o| o.starts_with("upperdir=")));

        let view2 = s
            .view("v2".into(), "B".into(), Labels::new())
            .await
            .unwrap();
        assert_eq!(view2[0].r#type, "overlay");
        assert!(!view2[0].options.iter().any(|o| o.starts_with("upperdir=")));
    }

    #[tokio::test]
    async fn error_kinds() {
        let root = tempfile::tempdir().unwrap();
        let s = open(root.path()).await;
        let code = |e: SnapshotError| e.code();
        assert_eq!(
            code(s.stat("nope".into()).await.unwrap_err()),
            tonic::Code::NotFound
        );
        assert_eq!(
            code(
                s.prepare("x".into(), "missing".into(), Labels::new())
                    .await
                    .unwrap_err()
            ),
            tonic::Code::NotFound
        );
        s.prepare("a".into(), String::new(), Labels::new())
            .await
            .unwrap();
        assert_eq!(
            code(
                s.prepare("a".into(), String::new(), Labels::new())
                    .await
                    .unwrap_err()
            ),
            tonic::Code::AlreadyExists
        );
        assert_eq!(
            code(
                s.prepare("y".into(), "a".into(), Labels::new())
                    .await
                    .unwrap_err()
            ),
            tonic::Code::InvalidArgument
        );
        s.commit("A".into(), "a".into(), Labels::new())
            .await
            .unwrap();
        assert_eq!(
            code(
                s.commit("A2".into(), "A".into(), Labels::new())
                    .await
                    .unwrap_err()
            ),
            tonic::Code::FailedPrecondition
        );
        s.prepare("b".into(), "A".into(), Labels::new())
            .await
            .unwrap();
        assert_eq!(
            code(s.remove("A".into()).await.unwrap_err()),
            tonic::Code::FailedPrecondition
        );
        s.remove("b".into()).await.unwrap();
        s.remove("A".into()).await.unwrap();
        assert_eq!(std::fs::read_dir(s.snapshots_dir()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn labels_update_and_filters() {
        let root = tempfile::tempdir().unwrap();
        let s = open(root.path()).await;
        s.prepare("a".into(), String::new(), labels(&[("x", "1"), ("y", "2")]))
            .await
            .unwrap();
        let mut info = s.stat("a".into()).await.unwrap();
        info.labels = labels(&[("x", "9")]);
        let updated = s
            .update(info.clone(), vec!["labels.x".into(), "labels.y".into()])
            .await
            .unwrap();
        assert_eq!(updated.labels, labels(&[("x", "9")]));
        info.labels = labels(&[("z", "3")]);
        let updated = s.update(info.clone(), vec![]).await.unwrap();
        assert_eq!(updated.labels, labels(&[("z", "3")]));
        assert_eq!(
            s.update(info, vec!["parent".into()])
                .await
                .unwrap_err()
                .code(),
            tonic::Code::InvalidArgument
        );
        s.prepare("b".into(), String::new(), Labels::new())
            .await
            .unwrap();
        let names = |infos: Vec<Info>| infos.into_iter().map(|i| i.name).collect::<Vec<_>>();
        assert_eq!(
            names(s.list(vec!["labels.z==3".into()]).await.unwrap()),
            ["a"]
        );
        assert_eq!(names(s.list(vec![]).await.unwrap()), ["a", "b"]);
        assert_eq!(
            names(s.list(vec!["name==b|labels.z".into()]).await.unwrap()),
            ["a", "b"]
        );
        assert_eq!(
            s.list(vec!["name==".into()]).await.unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[tokio::test]
    async fn unknown_directories_are_removed_on_open() {
        let root = tempfile::tempdir().unwrap();
        {
            let s = open(root.path()).await;
            s.prepare("a".into(), String::new(), Labels::new())
                .await
                .unwrap();
        }
        let snapshots = root.path().join("snapshots");
        std::fs::create_dir_all(snapshots.join("new-half/fs")).unwrap();
        std::fs::create_dir_all(snapshots.join("77/fs")).unwrap();
        let s = open(root.path()).await;
        let mut left: Vec<String> = std::fs::read_dir(&snapshots)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["1"]);
        assert!(s.stat("a".into()).await.is_ok());
    }

    /// Mounts every layer by pointing at a directory of its own; counts the calls.
    #[derive(Default)]
    struct FakeRemote {
        layers_dir: PathBuf,
        decline: bool,
        fail_restore: bool,
        prepared: std::sync::atomic::AtomicUsize,
        restored: std::sync::atomic::AtomicUsize,
        unmounted: std::sync::atomic::AtomicUsize,
    }

    impl RemoteLayers for FakeRemote {
        fn prepare_remote<'a>(
            &'a self,
            request: &'a RemoteLayerRequest,
        ) -> futures::future::BoxFuture<
            'a,
            Result<Option<super::super::RemoteMount>, super::super::RemoteLayerError>,
        > {
            Box::pin(async move {
                self.prepared
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                assert!(request.mountpoint.is_dir());
                if self.decline {
                    return Ok(None);
                }
                let dir = self.layers_dir.join(request.layer_digest.replace(':', "-"));
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join("from-registry"), request.image_ref.as_bytes()).unwrap();
                Ok(Some(super::super::RemoteMount { dir }))
            })
        }

        fn restore<'a>(
            &'a self,
            snapshot: &'a RemoteSnapshot,
        ) -> futures::future::BoxFuture<
            'a,
            Result<super::super::RemoteMount, super::super::RemoteLayerError>,
        > {
            Box::pin(async move {
                self.restored
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if self.fail_restore {
                    return Err(super::super::RemoteLayerError {
                        layer: snapshot.name.clone(),
                        source: "registry gone".into(),
                    });
                }
                Ok(super::super::RemoteMount {
                    dir: snapshot.dir.clone(),
                })
            })
        }

        fn unmount<'a>(
            &'a self,
            _snapshot: &'a RemoteSnapshot,
        ) -> futures::future::BoxFuture<'a, Result<(), super::super::RemoteLayerError>> {
            Box::pin(async move {
                self.unmounted
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            })
        }
    }

    fn remote_labels(target: &str, digest: &str) -> Labels {
        labels(&[
            (LABEL_TARGET_REF, target),
            (crate::snapshot::LABEL_CRI_LAYER_DIGEST, digest),
            (crate::snapshot::LABEL_CRI_IMAGE_REF, "registry.test/app:1"),
        ])
    }

    fn count(counter: &std::sync::atomic::AtomicUsize) -> usize {
        counter.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[tokio::test]
    async fn remote_layer_is_committed_under_target_and_answers_already_exists() {
        let root = tempfile::tempdir().unwrap();
        let remote = Arc::new(FakeRemote {
            layers_dir: root.path().join("remote"),
            ..FakeRemote::default()
        });
        let s = OverlaySnapshotter::open(&root.path().join("state"), remote.clone())
            .await
            .unwrap();

        let error = s
            .prepare(
                "extract-1".into(),
                String::new(),
                remote_labels("chain-1", "sha256:l1"),
            )
            .await
            .unwrap_err();
        assert_eq!(error.code(), tonic::Code::AlreadyExists);
        assert_eq!(count(&remote.prepared), 1);
        let committed = s.stat("chain-1".into()).await.unwrap();
        assert_eq!(committed.kind, Kind::Committed);
        assert_eq!(
            committed.labels.get(LABEL_REMOTE).map(String::as_str),
            Some("true")
        );
        assert_eq!(
            s.stat("extract-1".into()).await.unwrap_err().code(),
            tonic::Code::NotFound
        );
        assert_eq!(s.usage("chain-1".into()).await.unwrap(), Usage::default());

        // Found the way containerd's metadata layer looks for it.
        let found = s
            .list(vec![
                r#"labels."containerd.io/snapshot.ref"==chain-1,parent=="""#.into(),
            ])
            .await
            .unwrap();
        assert_eq!(found.len(), 1);

        // Asking again does not call the hook: the target exists.
        let again = s
            .prepare(
                "extract-2".into(),
                String::new(),
                remote_labels("chain-1", "sha256:l1"),
            )
            .await
            .unwrap_err();
        assert_eq!(again.code(), tonic::Code::AlreadyExists);
        assert_eq!(count(&remote.prepared), 1);

        // The remote directory is the lower layer of what is built on top.
        let view = s
            .view("v".into(), "chain-1".into(), Labels::new())
            .await
            .unwrap();
        assert_eq!(
            view[0].source,
            root.path().join("remote/sha256-l1").to_string_lossy()
        );
        let work = s
            .prepare("c".into(), "chain-1".into(), Labels::new())
            .await
            .unwrap();
        let expected = format!(
            "lowerdir={}",
            root.path().join("remote/sha256-l1").display()
        );
        assert!(work[0].options.contains(&expected), "{:?}", work[0].options);
        drop(s);

        // Restart: the hook restores the layer.
        let s = OverlaySnapshotter::open(&root.path().join("state"), remote.clone())
            .await
            .unwrap();
        assert_eq!(count(&remote.restored), 1);
        assert!(s.mounts("c".into()).await.is_ok());
        s.shutdown().await;
        assert_eq!(count(&remote.unmounted), 1);
        s.remove("c".into()).await.unwrap();
        s.remove("v".into()).await.unwrap();
        s.remove("chain-1".into()).await.unwrap();
        assert_eq!(count(&remote.unmounted), 2);
        assert_eq!(std::fs::read_dir(s.snapshots_dir()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn declined_remote_layer_is_an_ordinary_snapshot() {
        let root = tempfile::tempdir().unwrap();
        let remote = Arc::new(FakeRemote {
            decline: true,
            ..FakeRemote::default()
        });
        let s = OverlaySnapshotter::open(root.path(), remote.clone())
            .await
            .unwrap();
        let mounts = s
            .prepare(
                "extract-1".into(),
                String::new(),
                remote_labels("chain-1", "sha256:l1"),
            )
            .await
            .unwrap();
        assert_eq!(count(&remote.prepared), 1);
        assert_eq!(mounts[0].r#type, "bind");
        assert_eq!(s.stat("extract-1".into()).await.unwrap().kind, Kind::Active);
        // Without layer identity the hook is not asked at all.
        s.prepare(
            "plain".into(),
            String::new(),
            labels(&[(LABEL_TARGET_REF, "chain-2")]),
        )
        .await
        .unwrap();
        assert_eq!(count(&remote.prepared), 1);
    }

    #[tokio::test]
    async fn unrestorable_remote_layer_makes_mounts_unavailable() {
        let root = tempfile::tempdir().unwrap();
        let state = root.path().join("state");
        let remote = Arc::new(FakeRemote {
            layers_dir: root.path().join("remote"),
            ..FakeRemote::default()
        });
        {
            let s = OverlaySnapshotter::open(&state, remote).await.unwrap();
            let _ = s
                .prepare(
                    "extract-1".into(),
                    String::new(),
                    remote_labels("chain-1", "sha256:l1"),
                )
                .await;
            s.prepare("c".into(), "chain-1".into(), Labels::new())
                .await
                .unwrap();
        }
        let failing = Arc::new(FakeRemote {
            fail_restore: true,
            ..FakeRemote::default()
        });
        let s = OverlaySnapshotter::open(&state, failing).await.unwrap();
        assert_eq!(
            s.mounts("c".into()).await.unwrap_err().code(),
            tonic::Code::Unavailable
        );
        s.remove("c".into()).await.unwrap();
        s.remove("chain-1".into()).await.unwrap();
    }
}

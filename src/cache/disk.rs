//! Verified chunks on disk, content-addressed by chunk digest:
//! `<dir>/chunks/<first two hex digits>/<hex>`.
//!
//! A chunk file only ever appears through `rename` of a fully written temp file in
//! the same directory, so readers never see a partial chunk; temp files left by a
//! crash are removed on open. Reads re-verify the digest so that a file damaged after
//! a power loss (rename without fsync) is dropped and fetched again, never served.
//!
//! With a size limit, the least recently used chunks are removed once the store
//! grows past it, down to a low-water mark. "Used" is the file's mtime, refreshed by
//! reads at most once a minute: atime is unreliable (relatime, noatime), and one
//! `futimens` a minute per hot chunk costs nothing next to the read itself.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use crate::digest::Digest;

const TEMP_PREFIX: &str = ".tmp-";

/// A read refreshes a chunk's mtime when it is older than this.
const USE_REFRESH: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub(crate) struct DiskStore {
    root: PathBuf,
    /// Bytes the store may hold; `None` is unbounded.
    limit: Option<u64>,
    usage: Arc<Usage>,
}

#[derive(Default)]
struct Usage {
    /// Bytes of chunk files, as last scanned plus what was written since.
    bytes: AtomicU64,
    /// One eviction pass at a time; writers never wait for it.
    evicting: AtomicBool,
}

/// What one eviction pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Evicted {
    pub files: u64,
    pub bytes: u64,
}

impl DiskStore {
    pub(crate) fn open(dir: &Path, limit: Option<u64>) -> io::Result<Self> {
        let root = dir.join("chunks");
        fs::create_dir_all(&root)?;
        let mut bytes = 0;
        for fanout in fs::read_dir(&root)? {
            let fanout = fanout?;
            if !fanout.file_type()?.is_dir() {
                continue;
            }
            for file in fs::read_dir(fanout.path())? {
                let file = file?;
                if file
                    .file_name()
                    .as_encoded_bytes()
                    .starts_with(TEMP_PREFIX.as_bytes())
                {
                    fs::remove_file(file.path())?;
                } else {
                    bytes += file.metadata().map_or(0, |m| m.len());
                }
            }
        }
        let store = Self {
            root,
            limit,
            usage: Arc::default(),
        };
        store.usage.bytes.store(bytes, Ordering::Relaxed);
        // A limit lowered since the last run takes effect now, not at the next write.
        store.evict_if_over();
        Ok(store)
    }

    /// Bytes of chunks on disk (approximate between eviction passes).
    pub(crate) fn used_bytes(&self) -> u64 {
        self.usage.bytes.load(Ordering::Relaxed)
    }

    /// Whether `more` bytes fit under the limit without evicting anything.
    pub(crate) fn has_room_for(&self, more: u64) -> bool {
        self.limit
            .is_none_or(|limit| self.used_bytes().saturating_add(more) <= limit)
    }

    pub(crate) fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root.join(&hex[..2]).join(hex)
    }

    pub(crate) fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// The verified chunk, or `None` when it is absent or damaged (a damaged file is
    /// removed so the next fetch replaces it).
    pub(crate) fn read(&self, digest: &Digest, size: u64) -> io::Result<Option<Vec<u8>>> {
        let path = self.path(digest);
        let mut file = match fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        file.read_to_end(&mut data)?;
        if self.limit.is_some() {
            mark_used(&file);
        }
        if data.len() as u64 != size || !digest.matches(&data) {
            tracing::warn!(
                file = %path.display(),
                chunk = %digest,
                "cached chunk is damaged; removing it so it is fetched again"
            );
            fs::remove_file(&path)?;
            return Ok(None);
        }
        Ok(Some(data))
    }

    /// Store verified chunk bytes. Concurrent writers of the same chunk are harmless:
    /// each renames its own complete temp file over the same name.
    pub(crate) fn write(&self, digest: &Digest, data: &[u8]) -> io::Result<()> {
        let path = self.path(digest);
        if path.is_file() {
            return Ok(());
        }
        let dir = path.parent().unwrap_or(&self.root);
        fs::create_dir_all(dir)?;
        let temp = dir.join(format!(
            "{TEMP_PREFIX}{}-{:016x}",
            digest.hex(),
            rand::random::<u64>()
        ));
        let result = fs::File::create(&temp)
            .and_then(|mut file| file.write_all(data))
            .and_then(|()| fs::rename(&temp, &path));
        if result.is_err() {
            let _ = fs::remove_file(&temp);
            return result;
        }
        self.usage
            .bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.evict_if_over();
        Ok(())
    }

    /// Remove least recently used chunks when the store is over its limit, down to
    /// 90 % of it. Returns what was removed; nothing when another pass is running.
    pub(crate) fn evict_if_over(&self) -> Evicted {
        let Some(limit) = self.limit else {
            return Evicted::default();
        };
        if self.used_bytes() <= limit || self.usage.evicting.swap(true, Ordering::AcqRel) {
            return Evicted::default();
        }
        let evicted = self.evict_to(limit - limit / 10);
        self.usage.evicting.store(false, Ordering::Release);
        evicted
    }

    fn evict_to(&self, target: u64) -> Evicted {
        let mut files: Vec<(SystemTime, u64, PathBuf)> = Vec::new();
        let mut total = 0;
        for fanout in fs::read_dir(&self.root).into_iter().flatten().flatten() {
            for file in fs::read_dir(fanout.path()).into_iter().flatten().flatten() {
                if file
                    .file_name()
                    .as_encoded_bytes()
                    .starts_with(TEMP_PREFIX.as_bytes())
                {
                    continue;
                }
                let Ok(meta) = file.metadata() else { continue };
                total += meta.len();
                files.push((
                    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    meta.len(),
                    file.path(),
                ));
            }
        }
        files.sort_unstable_by_key(|(used, _, _)| *used);
        let mut evicted = Evicted::default();
        for (_, len, path) in files {
            if total <= target {
                break;
            }
            // A reader that has the file open keeps its bytes; the next one refetches.
            if fs::remove_file(&path).is_ok() {
                total -= len;
                evicted.files += 1;
                evicted.bytes += len;
            }
        }
        // The scan is the truth: it also corrects counts of racing writers.
        self.usage.bytes.store(total, Ordering::Relaxed);
        if evicted.files > 0 {
            tracing::info!(
                dir = %self.root.display(),
                files = evicted.files,
                bytes = evicted.bytes,
                remaining = total,
                "disk cache over its limit: removed least recently used chunks"
            );
        }
        evicted
    }

    /// Where a temp file for `digest` would live; tests use it to plant torn writes.
    #[cfg(test)]
    pub(crate) fn temp_path_for_test(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root
            .join(&hex[..2])
            .join(format!("{TEMP_PREFIX}{hex}-torn"))
    }
}

/// Refresh `file`'s mtime when it is older than [`USE_REFRESH`].
fn mark_used(file: &fs::File) {
    let now = SystemTime::now();
    let stale = file
        .metadata()
        .and_then(|m| m.modified())
        .map_or(true, |modified| {
            now.duration_since(modified).unwrap_or_default() > USE_REFRESH
        });
    if stale {
        // Best effort: a chunk that keeps an old mtime is only evicted sooner.
        let _ = file.set_modified(now);
    }
}

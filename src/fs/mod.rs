//! The read-only FUSE filesystem of one lazily fetched layer.
//!
//! Metadata is served from an inode table built once from the layer's index, so
//! everything except file content is answered on the FUSE thread without waiting.
//! Content reads that memory can answer are replied to at once; the rest are handed
//! to the tokio runtime, which replies when the chunks arrive or fails the read with
//! `EIO` after `read_timeout`, so a FUSE thread never waits on the network.
//!
//! Content is immutable, so entries and attributes are cached by the kernel for a
//! long time and files are opened with `FOPEN_KEEP_CACHE`: once read, a page is
//! served by the kernel's page cache and never reaches sluice again.

mod tree;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use fuser::{
    BackgroundSession, BackingId, Config, Errno, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyXattr, Request, SessionACL,
};

use self::tree::{Node, OPAQUE_XATTRS, Tree};
use crate::cache::{ChunkCache, Layer};
use crate::format::{EntryId, EntryKind};
use crate::metrics::Metrics;
use crate::profile::Recorder;
use crate::registry::FetchPriority;

/// How a layer is mounted.
#[derive(Debug, Clone)]
pub struct FsOptions {
    /// A read whose chunks do not arrive within this time fails with `EIO`.
    pub read_timeout: Duration,
    /// Shown as the mount's source in `/proc/mounts`.
    pub fsname: String,
    /// FUSE worker threads (each with its own `/dev/fuse` descriptor).
    pub threads: usize,
    /// How long the kernel may cache names and attributes.
    pub attr_ttl: Duration,
    /// Largest readahead the kernel may send in one request.
    pub max_readahead: u32,
    /// Honour device nodes and setuid bits, as a container root filesystem needs.
    pub allow_devices_and_setuid: bool,
    /// Let the kernel read single-chunk files whose chunk is in the disk cache
    /// straight from the cache file (FUSE passthrough, Linux 6.9+), when the kernel
    /// offers it. Such reads never reach sluice.
    pub passthrough: bool,
    /// Told about every open and read of a regular file while it records (see
    /// `sluice profile`); checking it costs one atomic load when it does not.
    pub recorder: Option<Arc<Recorder>>,
}

impl Default for FsOptions {
    fn default() -> Self {
        Self {
            read_timeout: Duration::from_secs(30),
            fsname: "sluice".into(),
            threads: 4,
            attr_ttl: Duration::from_secs(24 * 3600),
            max_readahead: 4 << 20,
            allow_devices_and_setuid: true,
            passthrough: true,
            recorder: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("layer {layer}: its index cannot be served as a filesystem: {reason}")]
    BadTree { layer: String, reason: String },
    #[error(
        "layer {layer}: mounting FUSE at {}: {source} (sluice must run as root with /dev/fuse available, and the mountpoint must be an existing directory)",
        mountpoint.display()
    )]
    Mount {
        layer: String,
        mountpoint: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "layer {layer}: unmounting {}: {source} (a process may still use files under it; it was detached and goes away when they are closed)",
        mountpoint.display()
    )]
    Unmount {
        layer: String,
        mountpoint: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A mounted layer. Dropping it unmounts.
#[derive(Debug)]
pub struct MountedLayer {
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
    label: String,
    passthrough_active: Arc<AtomicBool>,
}

impl MountedLayer {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Whether the kernel accepted FUSE passthrough for this mount.
    pub fn passthrough_active(&self) -> bool {
        self.passthrough_active.load(Ordering::Relaxed)
    }

    /// Unmount and wait for the FUSE threads to finish. If the mount is busy it is
    /// detached instead (it disappears once its last user closes it) and an error
    /// says so.
    pub fn unmount(mut self) -> Result<(), FsError> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> Result<(), FsError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        match session.umount_and_join() {
            Ok(()) => Ok(()),
            Err(source) => {
                // Leave nothing mounted at the path, even if busy.
                let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
                Err(FsError::Unmount {
                    layer: self.label.clone(),
                    mountpoint: self.mountpoint.clone(),
                    source,
                })
            }
        }
    }
}

impl Drop for MountedLayer {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            tracing::warn!(error = %e, "unmounting a layer on drop");
        }
    }
}

/// Mount `layer` read-only at `mountpoint`. Content reads run on `runtime`.
///
/// Blocks while the kernel handshake completes (milliseconds); from async code call
/// it through `spawn_blocking`. The same holds for [`MountedLayer::unmount`] and
/// for dropping a [`MountedLayer`], which wait for the FUSE threads to exit.
pub fn mount_layer(
    layer: Arc<Layer>,
    cache: Arc<ChunkCache>,
    runtime: tokio::runtime::Handle,
    mountpoint: &Path,
    options: FsOptions,
) -> Result<MountedLayer, FsError> {
    let label = layer.label().to_owned();
    let tree = Tree::build(layer.index(), &label).map_err(|reason| FsError::BadTree {
        layer: label.clone(),
        reason,
    })?;
    let mut mount_options = vec![
        MountOption::RO,
        MountOption::FSName(options.fsname.clone()),
        MountOption::Subtype("sluice".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
    ];
    if options.allow_devices_and_setuid {
        mount_options.extend([MountOption::Dev, MountOption::Suid]);
    }
    let mut config = Config::default();
    config.mount_options = mount_options;
    // containerd and runc reach the mount as other users inside containers.
    config.acl = SessionACL::All;
    config.n_threads = Some(options.threads.max(1));
    config.clone_fd = true;

    let passthrough_active = Arc::new(AtomicBool::new(false));
    let options_readahead = options.max_readahead;
    let has_xattrs =
        tree.has_opaque_dir() || layer.index().entries.iter().any(|e| !e.xattrs.is_empty());
    let fs = LayerFs {
        has_xattrs,
        tree,
        read: Arc::new(ReadContext {
            metrics: Arc::clone(cache.metrics()),
            cache,
            layer,
            timeout: options.read_timeout,
            log_gate: LogGate::new(),
        }),
        runtime,
        options,
        passthrough_active: Arc::clone(&passthrough_active),
        open_inodes: Mutex::new(HashMap::new()),
    };
    let session = fuser::Session::new(fs, mountpoint, &config)
        .and_then(fuser::Session::spawn)
        .map_err(|source| FsError::Mount {
            layer: label.clone(),
            mountpoint: mountpoint.to_path_buf(),
            source,
        })?;
    raise_readahead(mountpoint, options_readahead, &label);
    Ok(MountedLayer {
        session: Some(session),
        mountpoint: mountpoint.to_path_buf(),
        label,
        passthrough_active,
    })
}

/// The kernel offers FUSE at most its default readahead (128 KiB) at init, so a
/// binary mapped from the layer (e.g. `python3`, several MiB, through FUSE because it
/// spans chunks) faults in 128 KiB requests, each a round trip to sluice. The mount's
/// own backing device takes a larger value once init is done; FUSE then sends reads
/// of up to 1 MiB (its page limit). Best effort: without it reads are only smaller.
fn raise_readahead(mountpoint: &Path, bytes: u32, label: &str) {
    use std::os::unix::fs::MetadataExt;
    // The stat is answered only after the init handshake, whose reply would otherwise
    // lower the value again.
    let dev = match std::fs::metadata(mountpoint) {
        Ok(meta) => meta.dev(),
        Err(error) => {
            tracing::debug!(layer = label, %error, "cannot stat the mount to raise its readahead");
            return;
        }
    };
    let path = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    if let Err(error) = std::fs::write(&path, (bytes / 1024).to_string()) {
        tracing::debug!(layer = label, %error, path, "cannot raise the mount's readahead");
    }
}

/// Lets one warning through per interval and counts the rest, so a registry outage
/// under heavy reading does not flood the log.
struct LogGate {
    start: Instant,
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl LogGate {
    const INTERVAL_MS: u64 = 1000;

    fn new() -> Self {
        Self {
            start: Instant::now(),
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` with the number of suppressed messages when this one may be logged.
    fn admit(&self) -> Option<u64> {
        let now = self.start.elapsed().as_millis() as u64;
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now + Self::INTERVAL_MS,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// What a content read needs, shared with the tasks that answer reads.
struct ReadContext {
    cache: Arc<ChunkCache>,
    layer: Arc<Layer>,
    metrics: Arc<Metrics>,
    timeout: Duration,
    log_gate: LogGate,
}

impl ReadContext {
    fn fail(&self, entry: EntryId, offset: u64, size: u32, why: &dyn std::fmt::Display) {
        Metrics::add(&self.metrics.read_errors, 1);
        if let Some(suppressed) = self.log_gate.admit() {
            let path = self
                .layer
                .index()
                .entries
                .get(entry.0 as usize)
                .map_or("", |e| e.name.as_str());
            tracing::warn!(
                layer = self.layer.label(),
                file = path,
                offset,
                size,
                suppressed_since_last = suppressed,
                "read failed with EIO: {why}"
            );
        }
    }

    /// The chunk holding `offset` of a file, for a timeout message.
    fn describe_chunk(&self, entry: EntryId, offset: u64) -> String {
        let index = self.layer.index();
        let mut id = entry;
        for _ in 0..8 {
            match index.entries.get(id.0 as usize).map(|e| &e.kind) {
                Some(EntryKind::Hardlink { target }) => id = *target,
                Some(EntryKind::Regular { chunks, .. }) => {
                    let at = chunks.partition_point(|c| c.file_offset.0 + c.size <= offset);
                    return chunks.get(at).map_or_else(String::new, |c| {
                        format!(
                            "chunk at file offset {} (blob offset {}, {})",
                            c.file_offset.0, c.compressed_offset.0, c.digest
                        )
                    });
                }
                _ => break,
            }
        }
        String::new()
    }
}

struct LayerFs {
    tree: Tree,
    /// Whether any inode has an extended attribute. When none has, xattr requests
    /// are answered `ENOSYS`, which makes the kernel answer all later ones itself
    /// (`EOPNOTSUPP`, which overlayfs treats as "no such attribute"): overlayfs asks
    /// every lower file for its metacopy/origin/redirect/opaque attributes, and
    /// those round trips were a quarter of all requests of a Python start-up.
    has_xattrs: bool,
    read: Arc<ReadContext>,
    runtime: tokio::runtime::Handle,
    options: FsOptions,
    /// The kernel accepted passthrough at init.
    passthrough_active: Arc<AtomicBool>,
    /// Regular files with open handles; see [`LayerFs::open_mode`].
    open_inodes: Mutex<HashMap<INodeNo, OpenInode>>,
}

/// Open handles of one regular file, and the backing file they share when the
/// kernel reads it directly.
struct OpenInode {
    backing: Option<BackingId>,
    handles: u64,
}

/// The attributes of a cached miss: the kernel reads only the inode number (0).
const NEGATIVE_ENTRY: fuser::FileAttr = fuser::FileAttr {
    ino: INodeNo(0),
    size: 0,
    blocks: 0,
    atime: std::time::UNIX_EPOCH,
    mtime: std::time::UNIX_EPOCH,
    ctime: std::time::UNIX_EPOCH,
    crtime: std::time::UNIX_EPOCH,
    kind: FileType::RegularFile,
    perm: 0,
    nlink: 0,
    uid: 0,
    gid: 0,
    rdev: 0,
    blksize: 0,
    flags: 0,
};

/// File handles of regular-file opens, counted in `open_inodes` until released.
const CACHED_FH: FileHandle = FileHandle(1);
const PASSTHROUGH_FH: FileHandle = FileHandle(2);

impl LayerFs {
    fn backing_table(&self) -> std::sync::MutexGuard<'_, HashMap<INodeNo, OpenInode>> {
        self.open_inodes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Count an open of a regular file and decide its mode. The kernel requires all
    /// open handles of an inode to agree: once one is open through the page cache,
    /// passthrough is refused until all are closed, and once one is passthrough all
    /// must use the same backing id. So passthrough starts only at a first open,
    /// when the file's whole content is one verified chunk in the disk cache.
    fn open_mode(&self, node: &Node, reply: &ReplyOpen) -> bool {
        let mut table = self.backing_table();
        if let Some(open) = table.get_mut(&node.attr.ino) {
            open.handles += 1;
            return open.backing.is_some();
        }
        let backing = if self.passthrough_active.load(Ordering::Relaxed) {
            self.backing_file(node, reply)
        } else {
            None
        };
        let passthrough = backing.is_some();
        table.insert(
            node.attr.ino,
            OpenInode {
                backing,
                handles: 1,
            },
        );
        passthrough
    }

    fn backing_file(&self, node: &Node, reply: &ReplyOpen) -> Option<BackingId> {
        let index = self.read.layer.index();
        let Some(EntryKind::Regular { size, chunks }) =
            index.entries.get(node.entry.0 as usize).map(|e| &e.kind)
        else {
            return None;
        };
        let [chunk] = chunks.as_slice() else {
            return None;
        };
        if chunk.file_offset.0 != 0 || chunk.size != *size {
            return None;
        }
        let path = self.read.cache.verified_chunk_file(chunk)?;
        match std::fs::File::open(&path).and_then(|file| reply.open_backing(&file)) {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::debug!(file = %path.display(), error = %e, "passthrough refused; serving reads through FUSE");
                None
            }
        }
    }

    /// Tells an active recording that `node`'s file was opened or read.
    #[inline]
    fn note_access(&self, node: &Node) {
        if let Some(recorder) = &self.options.recorder
            && recorder.is_recording()
            && node.attr.kind == FileType::RegularFile
        {
            let layer = &self.read.layer;
            let name = layer
                .index()
                .entries
                .get(node.entry.0 as usize)
                .map_or("", |e| e.name.as_str());
            recorder.record(layer.source().digest(), node.entry, name);
        }
    }

    fn node(&self, ino: INodeNo) -> Result<&Node, Errno> {
        self.tree.node(ino).ok_or(Errno::ENOENT)
    }

    fn dir(&self, ino: INodeNo) -> Result<&Node, Errno> {
        let node = self.node(ino)?;
        if node.attr.kind != FileType::Directory {
            return Err(Errno::ENOTDIR);
        }
        Ok(node)
    }

    fn xattrs<'a>(&'a self, node: &'a Node) -> impl Iterator<Item = (&'a [u8], &'a [u8])> {
        let entry = self.read.layer.index().entries.get(node.entry.0 as usize);
        let own = entry
            .into_iter()
            .flat_map(|e| e.xattrs.iter())
            .map(|(k, v)| (k.as_bytes(), v.as_slice()));
        let opaque = OPAQUE_XATTRS
            .iter()
            .filter(move |_| node.opaque)
            .map(|k| (k.as_bytes(), b"y".as_slice()));
        own.filter(move |(k, _)| !(node.opaque && OPAQUE_XATTRS.iter().any(|o| o.as_bytes() == *k)))
            .chain(opaque)
    }

    /// The `.`/`..`/children listing of a directory, as (inode, kind, name).
    fn listing<'a>(&'a self, dir: &'a Node) -> impl Iterator<Item = (INodeNo, FileType, &'a [u8])> {
        [
            (dir.attr.ino, FileType::Directory, b".".as_slice()),
            (dir.parent, FileType::Directory, b"..".as_slice()),
        ]
        .into_iter()
        .chain(
            dir.children
                .iter()
                .map(|c| (c.ino, c.kind, c.name.as_bytes())),
        )
    }
}

fn reply_sized(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}

impl Filesystem for LayerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(nearest) = config.set_max_readahead(self.options.max_readahead) {
            let _ = config.set_max_readahead(nearest);
        }
        // Many reads may wait on the network at once; let the kernel queue more.
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        let wanted = InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_ASYNC_READ;
        let _ = config.add_capabilities(wanted & config.capabilities());
        if self.options.passthrough
            && config.capabilities().contains(InitFlags::FUSE_PASSTHROUGH)
            // Depth 1 keeps the mount usable as an overlayfs lower layer.
            && config.set_max_stack_depth(1).is_ok()
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
        {
            self.passthrough_active.store(true, Ordering::Relaxed);
            tracing::debug!(layer = self.read.layer.label(), "FUSE passthrough enabled");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = self
            .dir(parent)
            .and_then(|dir| self.tree.lookup(dir, name.as_bytes()).ok_or(Errno::ENOENT));
        match found {
            Ok(node) => reply.entry(&self.options.attr_ttl, &node.attr, Generation(0)),
            // The layer never changes, so a missing name stays missing: an entry with
            // inode 0 lets the kernel cache the miss (a plain ENOENT is asked again
            // on every lookup). Interpreters probe many absent paths at start-up, and
            // overlayfs repeats each probe in every lower layer.
            Err(Errno::ENOENT) => {
                reply.entry(&self.options.attr_ttl, &NEGATIVE_ENTRY, Generation(0))
            }
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino) {
            Ok(node) => reply.attr(&self.options.attr_ttl, &node.attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let node = match self.node(ino) {
            Ok(node) => node,
            Err(e) => return reply.error(e),
        };
        match self
            .read
            .layer
            .index()
            .entries
            .get(node.entry.0 as usize)
            .map(|e| &e.kind)
        {
            Some(EntryKind::Symlink { target }) => reply.data(target.as_bytes()),
            _ => reply.error(Errno::EINVAL),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.node(ino) {
            Ok(node) if node.attr.kind == FileType::Directory => reply.error(Errno::EISDIR),
            Ok(_) if flags.acc_mode() != OpenAccMode::O_RDONLY => reply.error(Errno::EROFS),
            Ok(node) => {
                self.note_access(node);
                if self.open_mode(node, &reply) {
                    let table = self.backing_table();
                    let backing = table.get(&node.attr.ino).and_then(|o| o.backing.as_ref());
                    match backing {
                        // The kernel rejects page-cache flags on passthrough opens:
                        // the backing file's own page cache serves them.
                        Some(id) => {
                            reply.opened_passthrough(PASSTHROUGH_FH, FopenFlags::empty(), id)
                        }
                        None => reply.error(Errno::EIO),
                    }
                } else {
                    reply.opened(CACHED_FH, FopenFlags::FOPEN_KEEP_CACHE);
                }
            }
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if fh == PASSTHROUGH_FH || fh == CACHED_FH {
            let mut table = self.backing_table();
            if let Some(open) = table.get_mut(&ino) {
                open.handles -= 1;
                if open.handles == 0 {
                    // Dropping a backing id unregisters it from the kernel.
                    table.remove(&ino);
                }
            }
        }
        reply.ok();
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let node = match self.node(ino) {
            Ok(node) if node.attr.kind == FileType::RegularFile => node,
            Ok(_) => return reply.error(Errno::EINVAL),
            Err(e) => return reply.error(e),
        };
        self.note_access(node);
        let entry = node.entry;
        let ctx = &self.read;
        match ctx.cache.read_file_cached(&ctx.layer, entry, offset, size) {
            Some(Ok(data)) => return reply.data(&data),
            Some(Err(e)) => {
                ctx.fail(entry, offset, size, &e);
                return reply.error(Errno::EIO);
            }
            None => {}
        }
        let ctx = Arc::clone(ctx);
        self.runtime.spawn(async move {
            let read =
                ctx.cache
                    .read_file(&ctx.layer, entry, offset, size, FetchPriority::OnDemand);
            match tokio::time::timeout(ctx.timeout, read).await {
                Ok(Ok(data)) => reply.data(&data),
                Ok(Err(e)) => {
                    ctx.fail(entry, offset, size, &e);
                    reply.error(Errno::EIO);
                }
                Err(_) => {
                    let chunk = ctx.describe_chunk(entry, offset);
                    ctx.fail(
                        entry,
                        offset,
                        size,
                        &format_args!("no data within {:?} for {chunk}", ctx.timeout),
                    );
                    reply.error(Errno::EIO);
                }
            }
        });
    }

    /// Directories need no per-open state: `ENOSYS` makes the kernel open them
    /// without asking again (and without RELEASEDIR), with `FOPEN_KEEP_CACHE |
    /// FOPEN_CACHE_DIR` as its default — what this would answer anyway.
    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.error(Errno::ENOSYS);
    }

    /// Nothing is written, so there is nothing to flush; `ENOSYS` makes the kernel
    /// stop sending FLUSH on every close.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let dir = match self.dir(ino) {
            Ok(dir) => dir,
            Err(e) => return reply.error(e),
        };
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (child, kind, name)) in self.listing(dir).enumerate().skip(skip) {
            if reply.add(child, i as u64 + 1, kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let dir = match self.dir(ino) {
            Ok(dir) => dir,
            Err(e) => return reply.error(e),
        };
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (child, _kind, name)) in self.listing(dir).enumerate().skip(skip) {
            let Some(node) = self.tree.node(child) else {
                continue;
            };
            let full = reply.add(
                child,
                i as u64 + 1,
                OsStr::from_bytes(name),
                &self.options.attr_ttl,
                &node.attr,
                Generation(0),
            );
            if full {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(
            self.tree.total_blocks.div_ceil(8),
            0,
            0,
            self.tree.inode_count,
            0,
            4096,
            255,
            4096,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if !self.has_xattrs {
            return reply.error(Errno::ENOSYS);
        }
        let node = match self.node(ino) {
            Ok(node) => node,
            Err(e) => return reply.error(e),
        };
        match self.xattrs(node).find(|(k, _)| *k == name.as_bytes()) {
            Some((_, value)) => reply_sized(reply, size, value),
            None => reply.error(Errno::ENODATA),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if !self.has_xattrs {
            return reply.error(Errno::ENOSYS);
        }
        let node = match self.node(ino) {
            Ok(node) => node,
            Err(e) => return reply.error(e),
        };
        let mut names = Vec::new();
        for (name, _) in self.xattrs(node) {
            names.extend_from_slice(name);
            names.push(0);
        }
        reply_sized(reply, size, &names);
    }
}

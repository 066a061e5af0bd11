//! Compare directory trees attribute by attribute, and produce the expected tree of a
//! layer from its blob with GNU tar — the reference a sluice mount is checked against.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CString, OsStr};
use std::fmt;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::run_command;

/// Files eStargz writes into the layer tar that are not part of the image content.
pub const ESTARGZ_ARTIFACTS: [&str; 3] = [
    "stargz.index.json",
    ".prefetch.landmark",
    ".no.prefetch.landmark",
];

/// Differences between two trees, one readable line each.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TreeDiff(pub Vec<String>);

impl TreeDiff {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for TreeDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} difference(s):", self.0.len())?;
        for line in &self.0 {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Dir,
    File { size: u64, sha256: String },
    Symlink(PathBuf),
    Char { major: u64, minor: u64 },
    Block { major: u64, minor: u64 },
    Fifo,
    Socket,
}

#[derive(Debug, Clone)]
struct Node {
    kind: Kind,
    /// Full st_mode including the file type bits, so suid/sgid/sticky are compared.
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    nlink: u64,
    inode: (u64, u64),
    xattrs: BTreeMap<String, Vec<u8>>,
}

/// Compare everything below `expected` and `actual` (the roots themselves are not
/// compared): names, types, modes, owners, mtimes (seconds), symlink targets, device
/// numbers, xattrs, sha256 of regular files, and hard-link structure (which names share
/// an inode, and their link count).
pub fn compare_trees(expected: &Path, actual: &Path) -> TreeDiff {
    let expected_nodes = scan(expected);
    let actual_nodes = scan(actual);
    let mut diffs = Vec::new();
    for (path, e) in &expected_nodes {
        let Some(a) = actual_nodes.get(path) else {
            diffs.push(format!(
                "{}: missing (expected {})",
                path.display(),
                describe(&e.kind)
            ));
            continue;
        };
        compare_node(path, e, a, &mut diffs);
    }
    for (path, a) in &actual_nodes {
        if !expected_nodes.contains_key(path) {
            diffs.push(format!(
                "{}: unexpected {}",
                path.display(),
                describe(&a.kind)
            ));
        }
    }
    compare_hardlinks(&expected_nodes, &actual_nodes, &mut diffs);
    TreeDiff(diffs)
}

/// Panic with the list of differences unless the trees are equal.
pub fn assert_trees_equal(expected: &Path, actual: &Path) {
    let diff = compare_trees(expected, actual);
    assert!(
        diff.is_empty(),
        "tree {} differs from expected {}: {diff}",
        actual.display(),
        expected.display()
    );
}

fn describe(kind: &Kind) -> String {
    match kind {
        Kind::Dir => "directory".into(),
        Kind::File { size, .. } => format!("regular file of {size} bytes"),
        Kind::Symlink(target) => format!("symlink to {}", target.display()),
        Kind::Char { major, minor } => format!("char device {major}:{minor}"),
        Kind::Block { major, minor } => format!("block device {major}:{minor}"),
        Kind::Fifo => "fifo".into(),
        Kind::Socket => "socket".into(),
    }
}

fn compare_node(path: &Path, e: &Node, a: &Node, diffs: &mut Vec<String>) {
    let p = path.display();
    if e.kind != a.kind {
        diffs.push(format!(
            "{p}: expected {}, found {}",
            describe(&e.kind),
            describe(&a.kind)
        ));
    }
    if e.mode != a.mode {
        diffs.push(format!(
            "{p}: mode expected {:o}, found {:o}",
            e.mode, a.mode
        ));
    }
    if (e.uid, e.gid) != (a.uid, a.gid) {
        diffs.push(format!(
            "{p}: owner expected {}:{}, found {}:{}",
            e.uid, e.gid, a.uid, a.gid
        ));
    }
    if e.mtime != a.mtime {
        diffs.push(format!(
            "{p}: mtime expected {}, found {}",
            e.mtime, a.mtime
        ));
    }
    if !matches!(e.kind, Kind::Dir) && e.nlink != a.nlink {
        diffs.push(format!(
            "{p}: nlink expected {}, found {}",
            e.nlink, a.nlink
        ));
    }
    if e.xattrs != a.xattrs {
        diffs.push(format!(
            "{p}: xattrs expected {}, found {}",
            show_xattrs(&e.xattrs),
            show_xattrs(&a.xattrs)
        ));
    }
}

fn show_xattrs(xattrs: &BTreeMap<String, Vec<u8>>) -> String {
    let items: Vec<String> = xattrs
        .iter()
        .map(|(k, v)| format!("{k}={:?}", String::from_utf8_lossy(v)))
        .collect();
    format!("{{{}}}", items.join(", "))
}

/// Names that share an inode must be the same groups in both trees.
fn compare_hardlinks(
    expected: &BTreeMap<PathBuf, Node>,
    actual: &BTreeMap<PathBuf, Node>,
    diffs: &mut Vec<String>,
) {
    fn groups(nodes: &BTreeMap<PathBuf, Node>) -> BTreeSet<Vec<PathBuf>> {
        let mut by_inode: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
        for (path, node) in nodes {
            if !matches!(node.kind, Kind::Dir) {
                by_inode.entry(node.inode).or_default().push(path.clone());
            }
        }
        by_inode.into_values().filter(|g| g.len() > 1).collect()
    }
    let expected_groups = groups(expected);
    let actual_groups = groups(actual);
    for group in expected_groups.difference(&actual_groups) {
        diffs.push(format!("hard links expected to share one inode: {group:?}"));
    }
    for group in actual_groups.difference(&expected_groups) {
        diffs.push(format!("names unexpectedly share one inode: {group:?}"));
    }
}

fn scan(root: &Path) -> BTreeMap<PathBuf, Node> {
    let mut nodes = BTreeMap::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let dir = root.join(&relative);
        let entries =
            std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
        for entry in entries {
            let entry = entry.unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
            let child = relative.join(entry.file_name());
            let node = read_node(&root.join(&child));
            if matches!(node.kind, Kind::Dir) {
                pending.push(child.clone());
            }
            nodes.insert(child, node);
        }
    }
    nodes
}

fn read_node(path: &Path) -> Node {
    let meta =
        std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
    let file_type = meta.file_type();
    let rdev = meta.rdev();
    let (major, minor) = (libc::major(rdev) as u64, libc::minor(rdev) as u64);
    let kind = if file_type.is_dir() {
        Kind::Dir
    } else if file_type.is_file() {
        Kind::File {
            size: meta.len(),
            sha256: sha256_file(path),
        }
    } else if file_type.is_symlink() {
        Kind::Symlink(
            std::fs::read_link(path).unwrap_or_else(|e| panic!("readlink {}: {e}", path.display())),
        )
    } else if file_type.is_char_device() {
        Kind::Char { major, minor }
    } else if file_type.is_block_device() {
        Kind::Block { major, minor }
    } else if file_type.is_fifo() {
        Kind::Fifo
    } else {
        Kind::Socket
    };
    Node {
        kind,
        mode: meta.mode(),
        uid: meta.uid(),
        gid: meta.gid(),
        mtime: meta.mtime(),
        nlink: meta.nlink(),
        inode: (meta.dev(), meta.ino()),
        xattrs: read_xattrs(path),
    }
}

fn sha256_file(path: &Path) -> String {
    use sha2::Digest as _;
    let mut file =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buffer)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    hex::encode(hasher.finalize())
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("path without NUL bytes")
}

/// All extended attributes of `path` itself (not a symlink's target).
pub fn read_xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let cpath = c_path(path);
    let mut names = vec![0u8; 4096];
    let len = loop {
        // SAFETY: cpath is NUL-terminated; the buffer pointer and length describe
        // `names`, which lives across the call.
        let n = unsafe { libc::llistxattr(cpath.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
        if n >= 0 {
            break n as usize;
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ERANGE) => names.resize(names.len() * 4, 0),
            Some(libc::ENOTSUP) => return BTreeMap::new(),
            _ => panic!("listxattr {}: {err}", path.display()),
        }
    };
    names.truncate(len);
    let mut xattrs = BTreeMap::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).expect("xattr name without NUL");
        let mut value = vec![0u8; 4096];
        let len = loop {
            // SAFETY: both strings are NUL-terminated; pointer and length describe
            // `value`, which lives across the call.
            let n = unsafe {
                libc::lgetxattr(
                    cpath.as_ptr(),
                    cname.as_ptr(),
                    value.as_mut_ptr().cast(),
                    value.len(),
                )
            };
            if n >= 0 {
                break n as usize;
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ERANGE) {
                value.resize(value.len() * 4, 0);
            } else {
                panic!(
                    "getxattr {} {}: {err}",
                    path.display(),
                    String::from_utf8_lossy(name)
                );
            }
        };
        value.truncate(len);
        xattrs.insert(String::from_utf8_lossy(name).into_owned(), value);
    }
    xattrs
}

/// Set an extended attribute on `path` itself (not following symlinks).
pub fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let cpath = c_path(path);
    let cname = CString::new(name).expect("xattr name without NUL");
    // SAFETY: both strings are NUL-terminated; pointer and length describe `value`.
    let rc = unsafe {
        libc::lsetxattr(
            cpath.as_ptr(),
            cname.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        panic!(
            "setxattr {} {name}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
}

/// Extract a layer blob (gzip, zstd or plain tar, told apart by magic bytes) into
/// `dest` with GNU tar, keeping owners, modes, xattrs of every namespace and mtimes.
pub fn extract_layer(blob: &Path, dest: &Path) {
    let mut magic = [0u8; 4];
    let read = std::fs::File::open(blob)
        .and_then(|mut f| f.read(&mut magic))
        .unwrap_or_else(|e| panic!("reading {}: {e}", blob.display()));
    let compression = match &magic[..read] {
        [0x1f, 0x8b, ..] => Some("--gzip"),
        [0x28, 0xb5, 0x2f, 0xfd] => Some("--zstd"),
        _ => None,
    };
    std::fs::create_dir_all(dest).unwrap_or_else(|e| panic!("creating {}: {e}", dest.display()));
    let mut tar = Command::new("tar");
    tar.args([
        "-x",
        "--xattrs",
        "--xattrs-include=*",
        "--numeric-owner",
        "--same-owner",
        "-p",
        // Links into a directory may come after the directory's other members
        // (hard links follow their target; eStargz reorders for prefetch).
        "--delay-directory-restore",
    ]);
    if let Some(flag) = compression {
        tar.arg(flag);
    }
    tar.arg("-f").arg(blob).arg("-C").arg(dest);
    run_command(&mut tar).unwrap_or_else(|e| panic!("extracting {}: {e}", blob.display()));
}

/// Turn an extracted layer into what a snapshotter presents to overlayfs: `.wh.NAME`
/// becomes a char device 0:0 named NAME (mode 0, owner 0:0, the whiteout's mtime);
/// `.wh..wh..opq` is removed and its directory gets `trusted.overlay.opaque=y`.
/// eStargz bookkeeping files at the root are removed. Directory mtimes are preserved.
pub fn convert_whiteouts(root: &Path) {
    for artifact in ESTARGZ_ARTIFACTS {
        let path = root.join(artifact);
        if std::fs::symlink_metadata(&path).is_ok() {
            with_dir_times_kept(root, || {
                std::fs::remove_file(&path)
                    .unwrap_or_else(|e| panic!("removing {}: {e}", path.display()))
            });
        }
    }
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
            .map(|e| e.expect("directory entry"))
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.as_bytes();
            if name == b".wh..wh..opq" {
                with_dir_times_kept(&dir, || {
                    std::fs::remove_file(&path)
                        .unwrap_or_else(|e| panic!("removing {}: {e}", path.display()));
                    set_xattr(&dir, "trusted.overlay.opaque", b"y");
                });
            } else if let Some(hidden) = name.strip_prefix(b".wh.") {
                let meta = std::fs::symlink_metadata(&path).expect("lstat whiteout");
                let target = dir.join(OsStr::from_bytes(hidden));
                with_dir_times_kept(&dir, || {
                    std::fs::remove_file(&path)
                        .unwrap_or_else(|e| panic!("removing {}: {e}", path.display()));
                    nix::sys::stat::mknod(
                        &target,
                        nix::sys::stat::SFlag::S_IFCHR,
                        nix::sys::stat::Mode::empty(),
                        nix::sys::stat::makedev(0, 0),
                    )
                    .unwrap_or_else(|e| panic!("mknod {}: {e}", target.display()));
                    std::os::unix::fs::lchown(&target, Some(0), Some(0))
                        .unwrap_or_else(|e| panic!("chown {}: {e}", target.display()));
                    set_times(&target, meta.atime(), meta.mtime(), meta.mtime_nsec());
                });
            } else if entry.file_type().expect("file type").is_dir() {
                pending.push(path);
            }
        }
    }
}

/// Extract a layer blob and convert it like a snapshotter would present it.
pub fn expected_layer_tree(blob: &Path, dest: &Path) {
    extract_layer(blob, dest);
    convert_whiteouts(dest);
}

fn set_times(path: &Path, atime: i64, mtime: i64, mtime_nsec: i64) {
    use nix::sys::time::TimeSpec;
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &TimeSpec::new(atime, 0),
        &TimeSpec::new(mtime, mtime_nsec),
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap_or_else(|e| panic!("setting times of {}: {e}", path.display()));
}

/// Run `change` inside `dir` without altering the directory's own timestamps.
fn with_dir_times_kept<T>(dir: &Path, change: impl FnOnce() -> T) -> T {
    let meta = std::fs::symlink_metadata(dir).expect("lstat directory");
    let result = change();
    set_times(dir, meta.atime(), meta.mtime(), meta.mtime_nsec());
    result
}

//! The inode table of one layer, built once from its index at mount time.
//!
//! Inode `n` is index entry `n - 1` (so the root, entry 0, is inode 1 as FUSE
//! requires). A hard link has no inode of its own: its name leads to its target's
//! inode, which therefore counts one more link. Overlayfs conventions are applied
//! here: a `.wh.NAME` entry becomes a 0/0 character device `NAME`, and a
//! `.wh..wh..opq` entry disappears and marks its directory opaque.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};

use crate::format::{Entry, EntryId, EntryKind, LayerIndex};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// The extended attribute that tells overlayfs to hide the lower layers' content of a
/// directory. Only the `trusted.` form: containerd mounts overlay as root, and
/// containerd's own unpacking (what a lazily mounted layer must equal) sets only this.
pub(crate) const OPAQUE_XATTRS: [&str; 1] = ["trusted.overlay.opaque"];

#[derive(Debug)]
pub(crate) struct DirChild {
    pub(crate) name: Box<str>,
    pub(crate) ino: INodeNo,
    pub(crate) kind: FileType,
}

#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) attr: FileAttr,
    /// The entry holding this inode's content and xattrs.
    pub(crate) entry: EntryId,
    pub(crate) parent: INodeNo,
    /// Sorted by name (bytewise) for lookup by binary search.
    pub(crate) children: Vec<DirChild>,
    pub(crate) opaque: bool,
    /// Whether this slot is a real inode (hard links and opaque markers are not).
    pub(crate) live: bool,
}

#[derive(Debug)]
pub(crate) struct Tree {
    nodes: Vec<Node>,
    pub(crate) total_blocks: u64,
    pub(crate) inode_count: u64,
}

pub(crate) fn ino_of(id: EntryId) -> INodeNo {
    INodeNo(u64::from(id.0) + 1)
}

impl Tree {
    pub(crate) fn node(&self, ino: INodeNo) -> Option<&Node> {
        let index = usize::try_from(ino.0.checked_sub(1)?).ok()?;
        self.nodes.get(index).filter(|n| n.live)
    }

    /// Whether some directory is opaque (and so answers an overlay xattr).
    pub(crate) fn has_opaque_dir(&self) -> bool {
        self.nodes.iter().any(|n| n.live && n.opaque)
    }

    pub(crate) fn lookup(&self, parent: &Node, name: &[u8]) -> Option<&Node> {
        let at = parent
            .children
            .binary_search_by(|c| c.name.as_bytes().cmp(name))
            .ok()?;
        self.node(parent.children[at].ino)
    }

    /// Build the tree. Entries that cannot be placed (missing parent, dangling hard
    /// link) are left out with a warning rather than failing the mount.
    pub(crate) fn build(index: &LayerIndex, label: &str) -> Result<Self, String> {
        match index.entries.first() {
            Some(Entry {
                kind: EntryKind::Directory,
                name,
                ..
            }) if name.is_empty() => {}
            _ => return Err("entry 0 is not the root directory".into()),
        }
        let mut nodes: Vec<Node> = index
            .entries
            .iter()
            .enumerate()
            .map(|(i, entry)| Node {
                attr: attr_of(INodeNo(i as u64 + 1), entry),
                entry: EntryId(i as u32),
                parent: INodeNo::ROOT,
                children: Vec::new(),
                opaque: false,
                live: i == 0,
            })
            .collect();
        let mut dirs: HashMap<&str, usize> = HashMap::new();
        dirs.insert("", 0);

        for (i, entry) in index.entries.iter().enumerate().skip(1) {
            let (parent_path, base) = entry.name.rsplit_once('/').unwrap_or(("", &entry.name));
            let Some(&parent) = dirs.get(parent_path) else {
                tracing::warn!(layer = label, path = %entry.name, "entry's parent directory is not in the index; leaving it out");
                continue;
            };
            if nodes[parent].attr.kind != FileType::Directory {
                continue;
            }
            if base == OPAQUE_MARKER {
                nodes[parent].opaque = true;
                continue;
            }
            let (ino, kind) = match &entry.kind {
                EntryKind::Hardlink { target } => match resolve_link(index, *target) {
                    Some(target) => {
                        let target_node = &mut nodes[target.0 as usize];
                        target_node.attr.nlink += 1;
                        (ino_of(target), target_node.attr.kind)
                    }
                    None => {
                        tracing::warn!(layer = label, path = %entry.name, "hard link to a missing entry; leaving it out");
                        continue;
                    }
                },
                _ => {
                    nodes[i].live = true;
                    nodes[i].parent = INodeNo(parent as u64 + 1);
                    if matches!(entry.kind, EntryKind::Directory) {
                        dirs.insert(&entry.name, i);
                        nodes[parent].attr.nlink += 1;
                    }
                    (INodeNo(i as u64 + 1), nodes[i].attr.kind)
                }
            };
            let name = match base.strip_prefix(WHITEOUT_PREFIX) {
                Some(hidden)
                    if !hidden.is_empty() && !matches!(entry.kind, EntryKind::Hardlink { .. }) =>
                {
                    let attr = &mut nodes[i].attr;
                    attr.kind = FileType::CharDevice;
                    // As containerd's unpacker makes them: mknod(S_IFCHR, 0), no permissions.
                    attr.perm = 0;
                    attr.rdev = 0;
                    attr.size = 0;
                    attr.blocks = 0;
                    hidden
                }
                _ => base,
            };
            nodes[parent].children.push(DirChild {
                name: name.into(),
                ino,
                kind: if name.len() != base.len() {
                    FileType::CharDevice
                } else {
                    kind
                },
            });
        }
        let mut total_blocks = 0;
        let mut inode_count = 0;
        for node in &mut nodes {
            // Stable sort keeps the first of two same-named entries (e.g. a whiteout
            // and a real file of the same name).
            node.children
                .sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
            node.children.dedup_by(|a, b| a.name == b.name);
            if node.live {
                inode_count += 1;
                total_blocks += node.attr.blocks;
            }
        }
        Ok(Self {
            nodes,
            total_blocks,
            inode_count,
        })
    }
}

/// Follow hard links (to earlier entries) to the entry that has the content.
fn resolve_link(index: &LayerIndex, mut target: EntryId) -> Option<EntryId> {
    for _ in 0..8 {
        match &index.entries.get(target.0 as usize)?.kind {
            EntryKind::Hardlink { target: next } => target = *next,
            EntryKind::Directory => return None,
            _ => return Some(target),
        }
    }
    None
}

/// Linux's `new_encode_dev`, the 32-bit device number FUSE carries.
fn encode_rdev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

fn mtime_of(entry: &Entry) -> SystemTime {
    let nanos = entry.mtime_nanos.min(999_999_999);
    if entry.mtime_secs >= 0 {
        UNIX_EPOCH + Duration::new(entry.mtime_secs as u64, nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(entry.mtime_secs.unsigned_abs())
            + Duration::from_nanos(u64::from(nanos))
    }
}

fn attr_of(ino: INodeNo, entry: &Entry) -> FileAttr {
    let (kind, size, rdev, nlink) = match &entry.kind {
        EntryKind::Directory => (FileType::Directory, 4096, 0, 2),
        EntryKind::Regular { size, .. } => (FileType::RegularFile, *size, 0, 1),
        EntryKind::Symlink { target } => (FileType::Symlink, target.len() as u64, 0, 1),
        EntryKind::Hardlink { .. } => (FileType::RegularFile, 0, 0, 1),
        EntryKind::CharDevice { major, minor } => {
            (FileType::CharDevice, 0, encode_rdev(*major, *minor), 1)
        }
        EntryKind::BlockDevice { major, minor } => {
            (FileType::BlockDevice, 0, encode_rdev(*major, *minor), 1)
        }
        EntryKind::Fifo => (FileType::NamedPipe, 0, 0, 1),
    };
    let mtime = mtime_of(entry);
    FileAttr {
        ino,
        size,
        blocks: size.div_ceil(512),
        atime: mtime,
        mtime,
        ctime: mtime,
        crtime: mtime,
        kind,
        perm: (entry.mode & 0o7777) as u16,
        nlink,
        uid: entry.uid,
        gid: entry.gid,
        rdev,
        blksize: 4096,
        flags: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rdev_matches_the_kernel_encoding() {
        assert_eq!(encode_rdev(1, 3), 0x103);
        assert_eq!(encode_rdev(8, 0x1234), 0x120_0834);
        assert_eq!(encode_rdev(0, 0), 0);
    }

    #[test]
    fn negative_mtimes_are_before_the_epoch() {
        let mut entry = Entry {
            name: "x".into(),
            kind: EntryKind::Fifo,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_secs: -10,
            mtime_nanos: 500,
            xattrs: Vec::new(),
        };
        assert_eq!(
            UNIX_EPOCH.duration_since(mtime_of(&entry)).unwrap(),
            Duration::from_secs(10) - Duration::from_nanos(500)
        );
        entry.mtime_secs = 5;
        assert_eq!(
            mtime_of(&entry).duration_since(UNIX_EPOCH).unwrap(),
            Duration::new(5, 500)
        );
    }

    #[test]
    fn whiteouts_opaque_markers_and_hard_links() {
        use crate::cache::testing::LayerBuilder;
        use crate::format::LayerFormat;
        let mut b = LayerBuilder::new(LayerFormat::Estargz);
        let dir = b.dir("d", 0o755);
        b.node(
            "d/.wh..wh..opq",
            EntryKind::Regular {
                size: 0,
                chunks: vec![],
            },
            0o644,
        );
        b.node(
            "d/.wh.gone",
            EntryKind::Regular {
                size: 0,
                chunks: vec![],
            },
            0o644,
        );
        let file = b.file("d/f", 0o644, b"hello", 4);
        b.hardlink("d/g", file);
        b.hardlink("h", file);
        let (index, _) = b.build();
        let tree = Tree::build(&index, "t").unwrap();
        let d = tree.node(ino_of(dir)).unwrap();
        assert!(d.opaque);
        let names: Vec<&str> = d.children.iter().map(|c| &*c.name).collect();
        assert_eq!(names, ["f", "g", "gone"]);
        let gone = tree.lookup(d, b"gone").unwrap();
        assert_eq!(gone.attr.kind, FileType::CharDevice);
        assert_eq!(gone.attr.rdev, 0);
        let f = tree.lookup(d, b"f").unwrap();
        assert_eq!(f.attr.nlink, 3);
        assert_eq!(tree.lookup(d, b"g").unwrap().attr.ino, f.attr.ino);
        let root = tree.node(INodeNo::ROOT).unwrap();
        assert_eq!(root.attr.nlink, 3);
        assert!(tree.lookup(root, b"missing").is_none());
        assert!(tree.node(INodeNo(0)).is_none());
        assert!(tree.node(INodeNo(u64::MAX)).is_none());
    }
}

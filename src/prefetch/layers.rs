//! The merged view of a stack of layers, built from their entry lists, with overlay
//! semantics: upper layers shadow lower ones, `.wh.NAME` hides `NAME` below, and
//! `.wh..wh..opq` hides everything below in its directory.

use std::collections::BTreeMap;
use std::fmt;
use std::io;

use super::view::{FileInfo, FileKind, ImageView};
use super::{ImagePath, PrefetchError};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Position of a layer in the stack; 0 is the bottom (the base image's first layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LayerPosition(pub usize);

impl fmt::Display for LayerPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// One entry of a layer, as its tar header (or TOC entry) describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerEntryKind {
    File {
        size: u64,
    },
    Dir,
    Symlink {
        target: String,
    },
    /// A hard link to an earlier entry of the same layer (or of a lower one).
    Hardlink {
        target: ImagePath,
    },
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerEntry {
    pub kind: LayerEntryKind,
    /// Permission bits (`0o7777`).
    pub mode: u32,
}

/// The entries of one layer, keyed by their normalized path (see [`ImagePath::new`]
/// for turning tar member names into keys). Whiteout entries are kept as they are
/// named in the layer; the stack interprets them.
pub type LayerEntries = BTreeMap<ImagePath, LayerEntry>;

/// Reads file contents out of a layer. The stack only says which layer holds the
/// bytes of a path; how they are fetched (a tar stream, a chunked blob, a cache) is
/// up to the implementation.
pub trait LayerContent {
    /// Up to `max_len` bytes of the regular file `path` of `layer`, from `offset`.
    fn read_at(
        &self,
        layer: LayerPosition,
        path: &ImagePath,
        offset: u64,
        max_len: usize,
    ) -> io::Result<Vec<u8>>;
}

impl<F> LayerContent for F
where
    F: Fn(LayerPosition, &ImagePath, u64, usize) -> io::Result<Vec<u8>>,
{
    fn read_at(
        &self,
        layer: LayerPosition,
        path: &ImagePath,
        offset: u64,
        max_len: usize,
    ) -> io::Result<Vec<u8>> {
        self(layer, path, offset, max_len)
    }
}

/// The entries of a chunked layer's validated TOC, for a [`LayerStackView`] of
/// layers that are already eStargz / zstd:chunked (content then comes from the
/// chunk cache). The root entry is left out; whiteouts keep their `.wh.` names.
pub fn layer_entries_from_index(index: &crate::format::LayerIndex) -> LayerEntries {
    use crate::format::EntryKind;
    index
        .entries
        .iter()
        .filter(|entry| !entry.name.is_empty())
        .map(|entry| {
            let kind = match &entry.kind {
                EntryKind::Directory => LayerEntryKind::Dir,
                EntryKind::Regular { size, .. } => LayerEntryKind::File { size: *size },
                EntryKind::Symlink { target } => LayerEntryKind::Symlink {
                    target: target.clone(),
                },
                EntryKind::Hardlink { target } => match index.entries.get(target.0 as usize) {
                    Some(linked) => LayerEntryKind::Hardlink {
                        target: ImagePath::new(&linked.name),
                    },
                    None => LayerEntryKind::Other,
                },
                EntryKind::CharDevice { .. } | EntryKind::BlockDevice { .. } | EntryKind::Fifo => {
                    LayerEntryKind::Other
                }
            };
            (
                ImagePath::new(&entry.name),
                LayerEntry {
                    kind,
                    mode: entry.mode,
                },
            )
        })
        .collect()
}

#[derive(Debug, Clone)]
struct Merged {
    info: FileInfo,
    /// The layer whose entry is visible here; `None` for directories no layer names.
    layer: Option<LayerPosition>,
    /// Where the content lives: (layer, path in that layer). Differs from the key for
    /// hard links.
    source: Option<(LayerPosition, ImagePath)>,
}

/// The filesystem a container sees when `layers` (bottom first) are stacked.
pub struct LayerStackView<C> {
    merged: BTreeMap<ImagePath, Merged>,
    layer_count: usize,
    content: C,
}

impl<C: LayerContent> LayerStackView<C> {
    /// Merges `layers`, bottom first. Merging never fails: entries that make no sense
    /// (a hard link to nothing) are dropped, as a runtime applying the layer would
    /// fail to create them.
    pub fn new(layers: Vec<LayerEntries>, content: C) -> LayerStackView<C> {
        let layer_count = layers.len();
        let mut merged: BTreeMap<ImagePath, Merged> = BTreeMap::new();
        merged.insert(ImagePath::root(), implicit_dir());
        for (position, layer) in layers.into_iter().enumerate() {
            let position = LayerPosition(position);
            // Whiteouts only hide what lies below, so they apply before this layer's entries.
            for path in layer.keys() {
                let name = path.file_name();
                if name == OPAQUE_MARKER {
                    remove_descendants(&mut merged, &path.parent());
                } else if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
                    let hidden = path.parent().join(hidden);
                    if !hidden.is_root() {
                        remove_descendants(&mut merged, &hidden);
                        merged.remove(&hidden);
                    }
                }
            }
            let mut hardlinks = Vec::new();
            for (path, entry) in layer {
                if path.file_name().starts_with(WHITEOUT_PREFIX) {
                    continue;
                }
                add_missing_parents(&mut merged, &path);
                let kind = match entry.kind {
                    LayerEntryKind::File { size } => (FileKind::File, size),
                    LayerEntryKind::Dir => (FileKind::Dir, 0),
                    LayerEntryKind::Symlink { target } => (FileKind::Symlink { target }, 0),
                    LayerEntryKind::Other => (FileKind::Other, 0),
                    LayerEntryKind::Hardlink { target } => {
                        hardlinks.push((path, target, entry.mode));
                        continue;
                    }
                };
                let info = FileInfo {
                    kind: kind.0,
                    size: kind.1,
                    mode: entry.mode & 0o7777,
                };
                let source = info.is_file().then(|| (position, path.clone()));
                insert(
                    &mut merged,
                    path,
                    Merged {
                        info,
                        layer: Some(position),
                        source,
                    },
                );
            }
            for (path, target, mode) in hardlinks {
                let Some(linked) = merged.get(&target).filter(|m| m.info.is_file()).cloned() else {
                    continue;
                };
                let info = FileInfo {
                    mode: mode & 0o7777,
                    ..linked.info
                };
                insert(
                    &mut merged,
                    path,
                    Merged {
                        info,
                        layer: Some(position),
                        source: linked.source,
                    },
                );
            }
        }
        LayerStackView {
            merged,
            layer_count,
            content,
        }
    }

    /// The layer whose entry is visible at `path` (the one the converter should move
    /// to the front); `None` when nothing is there or no layer names the directory.
    pub fn layer_of(&self, path: &ImagePath) -> Option<LayerPosition> {
        self.merged.get(path).and_then(|entry| entry.layer)
    }

    /// Where the bytes of the regular file at `path` live: a layer and the path in
    /// it, which differs from `path` for a hard link.
    pub fn content_source(&self, path: &ImagePath) -> Option<(LayerPosition, &ImagePath)> {
        self.merged
            .get(path)
            .and_then(|entry| entry.source.as_ref())
            .map(|(layer, source)| (*layer, source))
    }

    /// `paths` (a [`super::PrefetchList`]'s, in its order) grouped by the layer whose
    /// entry the container sees: index `i` is what to write first in layer `i`.
    /// Directories no layer names are left out. A hard link is grouped with its own
    /// layer; its target must stay before it in the tar stream.
    pub fn split_by_layer<'p>(
        &self,
        paths: impl IntoIterator<Item = &'p ImagePath>,
    ) -> Vec<Vec<ImagePath>> {
        let mut groups = vec![Vec::new(); self.layer_count];
        for path in paths {
            if let Some(layer) = self.layer_of(path) {
                groups[layer.0].push(path.clone());
            }
        }
        groups
    }
}

fn implicit_dir() -> Merged {
    Merged {
        info: FileInfo {
            kind: FileKind::Dir,
            size: 0,
            mode: 0o755,
        },
        layer: None,
        source: None,
    }
}

/// Adds `entry` at `path`; anything but a directory over a directory hides the
/// lower directory's content, and a directory over a directory keeps it.
fn insert(merged: &mut BTreeMap<ImagePath, Merged>, path: ImagePath, entry: Merged) {
    let keeps_children =
        entry.info.is_dir() && merged.get(&path).is_some_and(|lower| lower.info.is_dir());
    if !keeps_children {
        remove_descendants(merged, &path);
    }
    merged.insert(path, entry);
}

/// Tar streams may omit parent directories; the runtime creates them.
fn add_missing_parents(merged: &mut BTreeMap<ImagePath, Merged>, path: &ImagePath) {
    let mut parent = path.parent();
    let mut missing = Vec::new();
    while !merged.contains_key(&parent) {
        missing.push(parent.clone());
        parent = parent.parent();
    }
    for dir in missing {
        merged.insert(dir, implicit_dir());
    }
}

fn remove_descendants(merged: &mut BTreeMap<ImagePath, Merged>, dir: &ImagePath) {
    let (start, prefix) = dir.descendants_bound();
    let doomed: Vec<ImagePath> = merged
        .range(start..)
        .map(|(path, _)| path)
        .take_while(|path| path.as_str().starts_with(&prefix))
        .filter(|path| path.is_below(dir))
        .cloned()
        .collect();
    for path in doomed {
        merged.remove(&path);
    }
}

impl<C: LayerContent> ImageView for LayerStackView<C> {
    fn lstat(&self, path: &ImagePath) -> Result<Option<FileInfo>, PrefetchError> {
        Ok(self.merged.get(path).map(|entry| entry.info.clone()))
    }

    fn read_at(
        &self,
        path: &ImagePath,
        offset: u64,
        max_len: usize,
    ) -> Result<Vec<u8>, PrefetchError> {
        let Some((layer, source)) = self.merged.get(path).and_then(|e| e.source.as_ref()) else {
            return Err(PrefetchError::NotAFile { path: path.clone() });
        };
        self.content
            .read_at(*layer, source, offset, max_len)
            .map_err(|source| PrefetchError::Layer {
                layer: *layer,
                path: path.clone(),
                source,
            })
    }

    fn read_dir(&self, path: &ImagePath) -> Result<Vec<String>, PrefetchError> {
        if !self.merged.get(path).is_some_and(|e| e.info.is_dir()) {
            return Ok(Vec::new());
        }
        let (start, prefix) = path.descendants_bound();
        Ok(self
            .merged
            .range(start..)
            .map(|(child, _)| child)
            .take_while(|child| child.as_str().starts_with(&prefix))
            .filter(|child| child.parent() == *path && *child != path)
            .map(|child| child.file_name().to_owned())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prefetch::view::{ResolveFailure, resolve};

    fn file(contents: &str) -> LayerEntry {
        LayerEntry {
            kind: LayerEntryKind::File {
                size: contents.len() as u64,
            },
            mode: 0o644,
        }
    }

    fn entry(kind: LayerEntryKind) -> LayerEntry {
        LayerEntry { kind, mode: 0o755 }
    }

    fn layer(entries: &[(&str, LayerEntry)]) -> LayerEntries {
        entries
            .iter()
            .map(|(path, e)| (ImagePath::new(path), e.clone()))
            .collect()
    }

    /// Content is "<layer>:<path>", so tests see which layer answered.
    fn stack(layers: Vec<LayerEntries>) -> LayerStackView<impl LayerContent> {
        LayerStackView::new(
            layers,
            |layer: LayerPosition, path: &ImagePath, offset: u64, max: usize| {
                let text = format!("{}:{}", layer.0, path);
                let start = (offset as usize).min(text.len());
                let end = (start + max).min(text.len());
                Ok(text.as_bytes()[start..end].to_vec())
            },
        )
    }

    fn read(view: &dyn ImageView, path: &str) -> String {
        String::from_utf8(view.read(&ImagePath::new(path), 1024).unwrap()).unwrap()
    }

    fn exists(view: &dyn ImageView, path: &str) -> bool {
        view.lstat(&ImagePath::new(path)).unwrap().is_some()
    }

    #[test]
    fn upper_layers_shadow_lower_ones() {
        let view = stack(vec![
            layer(&[("etc/a", file("x")), ("etc/b", file("x"))]),
            layer(&[("./etc/a", file("x"))]),
        ]);
        assert_eq!(read(&view, "/etc/a"), "1:/etc/a");
        assert_eq!(
            view.layer_of(&ImagePath::new("/etc/a")),
            Some(LayerPosition(1))
        );
        assert_eq!(
            view.layer_of(&ImagePath::new("/etc/b")),
            Some(LayerPosition(0))
        );
        assert_eq!(read(&view, "/etc/b"), "0:/etc/b");
        assert!(exists(&view, "/etc"), "implicit parent directory");
        assert_eq!(
            view.read_dir(&ImagePath::new("/etc")).unwrap(),
            vec!["a", "b"]
        );
        assert_eq!(view.read_dir(&ImagePath::root()).unwrap(), vec!["etc"]);
    }

    #[test]
    fn whiteouts_hide_entries_and_whole_subtrees() {
        let view = stack(vec![
            layer(&[
                ("etc/a", file("x")),
                ("etc/keep", file("x")),
                ("opt/tool/bin/t", file("x")),
            ]),
            layer(&[("etc/.wh.a", file("")), ("opt/.wh.tool", file(""))]),
        ]);
        assert!(!exists(&view, "/etc/a"));
        assert!(exists(&view, "/etc/keep"));
        assert!(!exists(&view, "/opt/tool"));
        assert!(!exists(&view, "/opt/tool/bin/t"));
        assert!(!exists(&view, "/etc/.wh.a"), "whiteouts are not files");
        assert_eq!(
            view.read_dir(&ImagePath::new("/opt")).unwrap(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn whiteout_then_recreate_in_a_later_layer() {
        let view = stack(vec![
            layer(&[("a/old", file("x"))]),
            layer(&[(".wh.a", file(""))]),
            layer(&[("a/new", file("x"))]),
        ]);
        assert!(!exists(&view, "/a/old"));
        assert_eq!(read(&view, "/a/new"), "2:/a/new");
    }

    #[test]
    fn opaque_directories_hide_lower_content_but_keep_their_own() {
        let view = stack(vec![
            layer(&[
                ("app/old.py", file("x")),
                ("app/sub/deep.py", file("x")),
                ("apple", file("x")),
                ("app-x", file("x")),
                ("app.d/conf", file("x")),
            ]),
            layer(&[
                ("app", entry(LayerEntryKind::Dir)),
                ("app/.wh..wh..opq", file("")),
                ("app/new.py", file("x")),
            ]),
        ]);
        assert!(!exists(&view, "/app/old.py"));
        assert!(!exists(&view, "/app/sub/deep.py"));
        assert!(
            exists(&view, "/apple"),
            "a sibling sharing the prefix survives"
        );
        assert!(exists(&view, "/app-x") && exists(&view, "/app.d/conf"));
        assert_eq!(
            view.read_dir(&ImagePath::new("/app")).unwrap(),
            vec!["new.py"]
        );
    }

    #[test]
    fn a_file_over_a_directory_hides_its_content() {
        let view = stack(vec![
            layer(&[("lib/x.so", file("x"))]),
            layer(&[(
                "lib",
                entry(LayerEntryKind::Symlink {
                    target: "usr/lib".into(),
                }),
            )]),
        ]);
        assert!(!exists(&view, "/lib/x.so"));
        assert!(matches!(
            view.lstat(&ImagePath::new("/lib")).unwrap().unwrap().kind,
            FileKind::Symlink { .. }
        ));
    }

    #[test]
    fn symlinks_resolve_across_layers() {
        let view = stack(vec![
            layer(&[
                ("usr/lib/libc.so.6", file("x")),
                ("usr/bin/python3.11", file("x")),
            ]),
            layer(&[
                (
                    "lib",
                    entry(LayerEntryKind::Symlink {
                        target: "usr/lib".into(),
                    }),
                ),
                (
                    "usr/bin/python3",
                    entry(LayerEntryKind::Symlink {
                        target: "python3.11".into(),
                    }),
                ),
            ]),
            layer(&[(
                "usr/local/bin/py",
                entry(LayerEntryKind::Symlink {
                    target: "/usr/bin/python3".into(),
                }),
            )]),
        ]);
        let res = resolve(&view, &ImagePath::root(), "/usr/local/bin/py", true).unwrap();
        assert_eq!(res.path.as_str(), "/usr/bin/python3.11");
        assert_eq!(
            res.links,
            vec![
                ImagePath::new("/usr/local/bin/py"),
                ImagePath::new("/usr/bin/python3")
            ]
        );
        let lib = resolve(&view, &ImagePath::root(), "/lib/libc.so.6", true).unwrap();
        assert_eq!(lib.path.as_str(), "/usr/lib/libc.so.6");
        assert_eq!(read(&view, lib.path.as_str()), "0:/usr/lib/libc.so.6");
    }

    #[test]
    fn symlink_loops_across_layers_fail_softly() {
        let view = stack(vec![
            layer(&[(
                "a",
                entry(LayerEntryKind::Symlink {
                    target: "/b".into(),
                }),
            )]),
            layer(&[("b", entry(LayerEntryKind::Symlink { target: "a".into() }))]),
        ]);
        let res = resolve(&view, &ImagePath::root(), "/a/x", true).unwrap();
        assert_eq!(res.failure, Some(ResolveFailure::TooManySymlinks));
    }

    #[test]
    fn entries_from_a_chunked_layer_index() {
        use crate::format::{CompressedOffset, Entry, EntryId, EntryKind, LayerFormat, LayerIndex};
        let entry = |name: &str, kind| Entry {
            name: name.to_owned(),
            kind,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime_secs: 0,
            mtime_nanos: 0,
            xattrs: Vec::new(),
        };
        let index = LayerIndex {
            format: LayerFormat::Estargz,
            blob_size: 0,
            toc_offset: CompressedOffset(0),
            entries: vec![
                entry("", EntryKind::Directory),
                entry("bin", EntryKind::Directory),
                entry(
                    "bin/busybox",
                    EntryKind::Regular {
                        size: 7,
                        chunks: Vec::new(),
                    },
                ),
                entry("bin/sh", EntryKind::Hardlink { target: EntryId(2) }),
                entry(
                    "bin/ls",
                    EntryKind::Symlink {
                        target: "busybox".to_owned(),
                    },
                ),
                entry(
                    "etc/.wh.old",
                    EntryKind::Regular {
                        size: 0,
                        chunks: Vec::new(),
                    },
                ),
            ],
            prefetch: Vec::new(),
            no_prefetch: false,
        };
        let entries = layer_entries_from_index(&index);
        assert_eq!(entries.len(), 5);
        assert_eq!(
            entries[&ImagePath::new("/bin/sh")].kind,
            LayerEntryKind::Hardlink {
                target: ImagePath::new("/bin/busybox")
            }
        );
        let lower = layer(&[("etc/old", file("x"))]);
        let view = stack(vec![lower, entries]);
        assert!(!exists(&view, "/etc/old"));
        assert_eq!(read(&view, "/bin/sh"), "1:/bin/busybox");
    }

    #[test]
    fn hardlinks_read_their_target_content() {
        let view = stack(vec![layer(&[
            ("bin/busybox", file("x")),
            (
                "bin/sh",
                entry(LayerEntryKind::Hardlink {
                    target: ImagePath::new("/bin/busybox"),
                }),
            ),
            (
                "bin/dangling",
                entry(LayerEntryKind::Hardlink {
                    target: ImagePath::new("/nope"),
                }),
            ),
        ])]);
        assert_eq!(read(&view, "/bin/sh"), "0:/bin/busybox");
        let sh = ImagePath::new("/bin/sh");
        assert_eq!(view.layer_of(&sh), Some(LayerPosition(0)));
        assert_eq!(
            view.content_source(&sh),
            Some((LayerPosition(0), &ImagePath::new("/bin/busybox")))
        );
        assert_eq!(
            view.layer_of(&ImagePath::new("/bin")),
            None,
            "implied directory"
        );
        assert!(
            view.lstat(&ImagePath::new("/bin/sh"))
                .unwrap()
                .unwrap()
                .is_file()
        );
        assert!(!exists(&view, "/bin/dangling"));
        assert!(matches!(
            view.read(&ImagePath::new("/bin"), 10),
            Err(PrefetchError::NotAFile { .. })
        ));
    }
}

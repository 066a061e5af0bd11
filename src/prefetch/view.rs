//! The merged view of an image's filesystem that the analysis reads, and path
//! resolution on top of it.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{ImagePath, PrefetchError};

/// What a path names, without following a final symlink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
    Symlink {
        target: String,
    },
    /// Devices, FIFOs, sockets: never read by the analysis.
    Other,
}

/// `lstat` of one path in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    pub kind: FileKind,
    /// Content length for regular files; 0 otherwise.
    pub size: u64,
    /// Permission bits (`0o7777`), without the file-type bits.
    pub mode: u32,
}

impl FileInfo {
    pub fn is_file(&self) -> bool {
        self.kind == FileKind::File
    }

    pub fn is_dir(&self) -> bool {
        self.kind == FileKind::Dir
    }

    /// Whether any execute bit is set (what `execve` and a `PATH` search need).
    pub fn is_executable(&self) -> bool {
        self.mode & 0o111 != 0
    }
}

/// The merged filesystem of an image, as the container will see it.
///
/// Every method takes a normalized absolute path and interprets it literally: a
/// view never follows a symlink, neither the final component nor a parent (a path
/// whose parent is a symlink simply does not exist for the view). Symlinks are
/// followed by [`resolve`], which asks the view one component at a time, so every
/// symlink on the way is seen (and prefetched) and resolution can never leave the
/// image.
pub trait ImageView {
    /// `None` when nothing exists at `path`.
    fn lstat(&self, path: &ImagePath) -> Result<Option<FileInfo>, PrefetchError>;

    /// Up to `max_len` bytes of the regular file at `path`, starting at `offset`
    /// (fewer at the end of the file).
    fn read_at(
        &self,
        path: &ImagePath,
        offset: u64,
        max_len: usize,
    ) -> Result<Vec<u8>, PrefetchError>;

    /// The names in the directory at `path`, sorted; empty when it is not a directory.
    fn read_dir(&self, path: &ImagePath) -> Result<Vec<String>, PrefetchError>;

    /// The first `max_len` bytes of the regular file at `path`.
    fn read(&self, path: &ImagePath, max_len: usize) -> Result<Vec<u8>, PrefetchError> {
        self.read_at(path, 0, max_len)
    }
}

/// Why a path could not be resolved to something that exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ResolveFailure {
    /// A component does not exist.
    Missing,
    /// A component other than the last is neither a directory nor a symlink.
    NotADirectory,
    /// More than [`MAX_SYMLINKS`] symlinks were followed (a loop, or an absurd chain).
    TooManySymlinks,
}

impl std::fmt::Display for ResolveFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ResolveFailure::Missing => "missing",
            ResolveFailure::NotADirectory => "a parent is not a directory",
            ResolveFailure::TooManySymlinks => "too many symlinks (a loop?)",
        })
    }
}

/// How many symlinks one resolution follows before giving up, as Linux does (`ELOOP`).
pub const MAX_SYMLINKS: usize = 40;

/// The outcome of [`resolve`].
#[derive(Debug, Clone)]
pub struct Resolution {
    /// The canonical path reached: the target when found, else the path that failed.
    pub path: ImagePath,
    /// `lstat` of `path` when it exists (a symlink only when `follow_last` was false).
    pub info: Option<FileInfo>,
    /// Every symlink followed on the way, in order; the kernel reads each of them.
    pub links: Vec<ImagePath>,
    pub failure: Option<ResolveFailure>,
}

/// Resolves `path` (relative ones against `cwd`) the way the kernel's path walk does
/// inside a chroot at the image root: absolute symlink targets restart at the image
/// root and `..` never climbs above it.
pub fn resolve(
    view: &dyn ImageView,
    cwd: &ImagePath,
    path: &str,
    follow_last: bool,
) -> Result<Resolution, PrefetchError> {
    let mut current: Vec<String> = if path.starts_with('/') {
        Vec::new()
    } else {
        cwd.components().map(str::to_owned).collect()
    };
    // Components still to walk, next one last.
    let mut pending: Vec<String> = components_reversed(path);
    let mut links = Vec::new();
    let mut info = None;
    let failed = |current: &[String], name: &str, links, failure| Resolution {
        path: ImagePath::from_components(current.iter().map(String::as_str).chain([name])),
        info: None,
        links,
        failure: Some(failure),
    };
    while let Some(name) = pending.pop() {
        if name == "." {
            continue;
        }
        if name == ".." {
            current.pop();
            info = None;
            continue;
        }
        let candidate =
            ImagePath::from_components(current.iter().map(String::as_str).chain([name.as_str()]));
        let Some(found) = view.lstat(&candidate)? else {
            return Ok(failed(&current, &name, links, ResolveFailure::Missing));
        };
        let is_last = pending.is_empty();
        match &found.kind {
            FileKind::Symlink { target } if follow_last || !is_last => {
                if links.len() >= MAX_SYMLINKS {
                    return Ok(failed(
                        &current,
                        &name,
                        links,
                        ResolveFailure::TooManySymlinks,
                    ));
                }
                links.push(candidate);
                if target.starts_with('/') {
                    current.clear();
                }
                pending.extend(components_reversed(target));
                info = None;
            }
            FileKind::Dir => {
                current.push(name);
                info = Some(found);
            }
            _ if is_last => {
                current.push(name);
                info = Some(found);
            }
            _ => {
                return Ok(failed(
                    &current,
                    &name,
                    links,
                    ResolveFailure::NotADirectory,
                ));
            }
        }
    }
    let path = ImagePath::from_components(current.iter().map(String::as_str));
    let info = match info {
        Some(info) => Some(info),
        // Only reached when the walk ended on `..`/`.` or at the root.
        None => view.lstat(&path)?,
    };
    let failure = if info.is_some() {
        None
    } else {
        Some(ResolveFailure::Missing)
    };
    Ok(Resolution {
        path,
        info,
        links,
        failure,
    })
}

fn components_reversed(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|part| !part.is_empty())
        .rev()
        .map(str::to_owned)
        .collect()
}

/// An image whose merged filesystem is a directory on disk (an unpacked rootfs).
///
/// The directory is treated as `/`, like `chroot` would: no path handed to this view
/// can reach outside it, because no symlink is ever followed by the host (each
/// parent is checked with `lstat`, the final component is opened with `O_NOFOLLOW`).
#[derive(Debug, Clone)]
pub struct DirView {
    root: PathBuf,
}

impl DirView {
    /// A view of the rootfs at `root`, which must be a directory.
    pub fn new(root: impl Into<PathBuf>) -> Result<DirView, PrefetchError> {
        let root = root.into();
        let io_error = |source| PrefetchError::RootDir {
            root: root.clone(),
            source,
        };
        let meta = fs::metadata(&root).map_err(io_error)?;
        if !meta.is_dir() {
            return Err(io_error(io::Error::from(io::ErrorKind::NotADirectory)));
        }
        Ok(DirView { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn error(&self, path: &ImagePath, source: io::Error) -> PrefetchError {
        PrefetchError::Dir {
            root: self.root.clone(),
            path: path.clone(),
            source,
        }
    }

    /// The host path of `path`, when every parent of it is a real directory.
    fn host_path(&self, path: &ImagePath) -> Result<Option<PathBuf>, PrefetchError> {
        let mut host = self.root.clone();
        let mut components = path.components().peekable();
        while let Some(name) = components.next() {
            host.push(name);
            if components.peek().is_none() {
                break;
            }
            match fs::symlink_metadata(&host) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => return Ok(None),
                Err(err) if is_absent(&err) => return Ok(None),
                Err(err) => return Err(self.error(path, err)),
            }
        }
        Ok(Some(host))
    }
}

/// Errors that mean "no such file": also names no filesystem can hold (a NUL byte,
/// a component over 255 bytes), which hostile configs may contain.
fn is_absent(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::NotFound
            | io::ErrorKind::NotADirectory
            | io::ErrorKind::InvalidInput
            | io::ErrorKind::InvalidFilename
    )
}

impl ImageView for DirView {
    fn lstat(&self, path: &ImagePath) -> Result<Option<FileInfo>, PrefetchError> {
        let Some(host) = self.host_path(path)? else {
            return Ok(None);
        };
        let meta = match fs::symlink_metadata(&host) {
            Ok(meta) => meta,
            Err(err) if is_absent(&err) => return Ok(None),
            Err(err) => return Err(self.error(path, err)),
        };
        let file_type = meta.file_type();
        let kind = if file_type.is_file() {
            FileKind::File
        } else if file_type.is_dir() {
            FileKind::Dir
        } else if file_type.is_symlink() {
            let target = fs::read_link(&host).map_err(|err| self.error(path, err))?;
            FileKind::Symlink {
                target: target.to_string_lossy().into_owned(),
            }
        } else {
            FileKind::Other
        };
        Ok(Some(FileInfo {
            size: if kind == FileKind::File {
                meta.len()
            } else {
                0
            },
            kind,
            mode: meta.permissions().mode() & 0o7777,
        }))
    }

    fn read_at(
        &self,
        path: &ImagePath,
        offset: u64,
        max_len: usize,
    ) -> Result<Vec<u8>, PrefetchError> {
        let Some(host) = self.host_path(path)? else {
            return Err(self.error(path, io::Error::from(io::ErrorKind::NotFound)));
        };
        // O_NOFOLLOW keeps a final symlink from leading outside the root; O_NONBLOCK
        // keeps a FIFO from blocking the open.
        let file = File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&host)
            .map_err(|err| self.error(path, err))?;
        let meta = file.metadata().map_err(|err| self.error(path, err))?;
        if !meta.is_file() {
            return Err(PrefetchError::NotAFile { path: path.clone() });
        }
        let len = usize::try_from(meta.len().saturating_sub(offset))
            .unwrap_or(usize::MAX)
            .min(max_len);
        let mut buf = vec![0; len];
        let mut filled = 0;
        while filled < len {
            match file.read_at(&mut buf[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(self.error(path, err)),
            }
        }
        buf.truncate(filled);
        Ok(buf)
    }

    fn read_dir(&self, path: &ImagePath) -> Result<Vec<String>, PrefetchError> {
        match self.lstat(path)? {
            Some(info) if info.is_dir() => {}
            _ => return Ok(Vec::new()),
        }
        let Some(host) = self.host_path(path)? else {
            return Ok(Vec::new());
        };
        let entries = fs::read_dir(&host).map_err(|err| self.error(path, err))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|err| self.error(path, err))?;
            // Names that are not UTF-8 cannot be named by a config or an import.
            if let Ok(name) = entry.file_name().into_string() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn absolute_and_dotdot_symlinks_stay_inside_the_root() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), b"outside").unwrap();
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("etc")).unwrap();
        fs::write(r.join("etc/secret"), b"inside").unwrap();
        // Points outside on the host, but inside when the root is `/`.
        symlink(outside.path().join("secret"), r.join("abs")).unwrap();
        symlink("../../../../../../etc/secret", r.join("etc/up")).unwrap();
        symlink(outside.path(), r.join("outdir")).unwrap();
        symlink("/etc", r.join("etclink")).unwrap();
        let view = DirView::new(r).unwrap();
        let cwd = ImagePath::root();

        let abs = resolve(&view, &cwd, "/abs", true).unwrap();
        assert_eq!(abs.failure, Some(ResolveFailure::Missing));
        assert_eq!(abs.links, vec![ImagePath::new("/abs")]);
        assert!(abs.info.is_none());
        // The walk stops at the first component of the host path that the image lacks.
        let host_target = outside.path().join("secret");
        let first = ImagePath::new(host_target.to_str().unwrap());
        let first = first.components().next().unwrap();
        assert_eq!(abs.path, ImagePath::root().join(first));

        let up = resolve(&view, &cwd, "/etc/up", true).unwrap();
        assert_eq!(up.path.as_str(), "/etc/secret");
        assert_eq!(view.read(&up.path, 100).unwrap(), b"inside");

        let via = resolve(&view, &cwd, "/outdir/secret", true).unwrap();
        assert!(via.info.is_none(), "resolved outside the root: {via:?}");
        // Handing the view a path through a symlinked parent must not follow it either.
        assert_eq!(view.lstat(&ImagePath::new("/outdir/secret")).unwrap(), None);
        assert!(view.read(&ImagePath::new("/outdir/secret"), 10).is_err());
        assert!(view.read(&ImagePath::new("/abs"), 10).is_err());
        assert_eq!(
            view.read_dir(&ImagePath::new("/outdir")).unwrap(),
            Vec::<String>::new()
        );

        let through = resolve(&view, &cwd, "etclink/secret", true).unwrap();
        assert_eq!(through.path.as_str(), "/etc/secret");
        assert_eq!(through.links, vec![ImagePath::new("/etclink")]);
    }

    #[test]
    fn symlink_loops_end_with_a_failure_not_an_error() {
        let root = tempfile::tempdir().unwrap();
        symlink("b", root.path().join("a")).unwrap();
        symlink("/a", root.path().join("b")).unwrap();
        let view = DirView::new(root.path()).unwrap();
        let res = resolve(&view, &ImagePath::root(), "/a", true).unwrap();
        assert_eq!(res.failure, Some(ResolveFailure::TooManySymlinks));
        assert_eq!(res.links.len(), MAX_SYMLINKS);
        let unfollowed = resolve(&view, &ImagePath::root(), "/a", false).unwrap();
        assert!(matches!(
            unfollowed.info.map(|i| i.kind),
            Some(FileKind::Symlink { .. })
        ));
    }

    #[test]
    fn impossible_names_are_absent_not_errors() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(root.path().join("d")).unwrap();
        let view = DirView::new(root.path()).unwrap();
        assert_eq!(view.lstat(&ImagePath::new("/d/a\0b")).unwrap(), None);
        assert_eq!(view.lstat(&ImagePath::new(&"x".repeat(300))).unwrap(), None);
        let res = resolve(&view, &ImagePath::root(), "/d/a\0b/c", true).unwrap();
        assert_eq!(res.failure, Some(ResolveFailure::Missing));
    }

    #[test]
    fn read_at_reads_ranges_and_refuses_directories() {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("f"), b"0123456789").unwrap();
        let view = DirView::new(root.path()).unwrap();
        let f = ImagePath::new("/f");
        assert_eq!(view.read_at(&f, 3, 4).unwrap(), b"3456");
        assert_eq!(view.read_at(&f, 8, 100).unwrap(), b"89");
        assert_eq!(view.read_at(&f, 80, 100).unwrap(), b"");
        assert!(matches!(
            view.read(&ImagePath::root(), 10),
            Err(PrefetchError::NotAFile { .. })
        ));
        assert_eq!(
            view.read_dir(&ImagePath::root()).unwrap(),
            vec!["f".to_owned()]
        );
    }
}

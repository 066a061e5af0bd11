//! Absolute paths inside an image.

use std::fmt;

/// A normalized absolute path inside an image: starts with `/`, no `.`/`..`/empty
/// components, no trailing `/` (except the root itself, which is `/`).
///
/// Normalization is purely lexical; `..` is clamped at the root the way the kernel
/// treats `..` of `/`. Symlinks are resolved separately, by [`super::resolve`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ImagePath(String);

impl ImagePath {
    /// The image's root directory.
    pub fn root() -> ImagePath {
        ImagePath("/".to_owned())
    }

    /// Normalizes `path` as an absolute path (a relative one is taken from `/`).
    /// Tar member names such as `./usr/bin/` normalize to `/usr/bin`.
    pub fn new(path: &str) -> ImagePath {
        ImagePath::root().join(path)
    }

    /// `path` taken relative to `self` unless it is absolute, then normalized.
    pub fn join(&self, path: &str) -> ImagePath {
        let mut parts: Vec<&str> = if path.starts_with('/') {
            Vec::new()
        } else {
            self.components().collect()
        };
        for part in path.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    parts.pop();
                }
                name => parts.push(name),
            }
        }
        ImagePath::from_components(parts)
    }

    pub(crate) fn from_components<'a>(parts: impl IntoIterator<Item = &'a str>) -> ImagePath {
        let mut out = String::new();
        for part in parts {
            out.push('/');
            out.push_str(part);
        }
        if out.is_empty() {
            out.push('/');
        }
        ImagePath(out)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0 == "/"
    }

    /// The names from the root down; empty for the root.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|part| !part.is_empty())
    }

    /// The containing directory; the root is its own parent.
    pub fn parent(&self) -> ImagePath {
        match self.0.rfind('/') {
            Some(0) | None => ImagePath::root(),
            Some(at) => ImagePath(self.0[..at].to_owned()),
        }
    }

    /// The last component; empty for the root.
    pub fn file_name(&self) -> &str {
        match self.0.rfind('/') {
            Some(at) => &self.0[at + 1..],
            None => &self.0,
        }
    }

    /// Whether `self` lies strictly below `dir`.
    pub fn is_below(&self, dir: &ImagePath) -> bool {
        if dir.is_root() {
            return !self.is_root();
        }
        self.0.len() > dir.0.len()
            && self.0.starts_with(&dir.0)
            && self.0.as_bytes()[dir.0.len()] == b'/'
    }

    /// The prefix every strict descendant's string starts with (`/a/` for `/a`, `/`
    /// for the root), and the same string as a bound for ordered-map ranges: every
    /// descendant sorts at or after it, and all of them before anything else.
    pub(crate) fn descendants_bound(&self) -> (ImagePath, String) {
        let prefix = if self.is_root() {
            "/".to_owned()
        } else {
            format!("{}/", self.0)
        };
        (ImagePath(prefix.clone()), prefix)
    }
}

impl fmt::Display for ImagePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_lexically_and_clamps_dotdot_at_root() {
        assert_eq!(ImagePath::new("./usr/bin/").as_str(), "/usr/bin");
        assert_eq!(ImagePath::new("/../../etc//passwd").as_str(), "/etc/passwd");
        assert_eq!(ImagePath::new("").as_str(), "/");
        assert_eq!(ImagePath::new("/a/b").join("../c").as_str(), "/a/c");
        assert_eq!(ImagePath::new("/a/b").join("/x").as_str(), "/x");
    }

    #[test]
    fn parent_name_and_descendants() {
        let p = ImagePath::new("/usr/lib/x.so");
        assert_eq!(p.parent().as_str(), "/usr/lib");
        assert_eq!(p.file_name(), "x.so");
        assert_eq!(ImagePath::new("/usr").parent(), ImagePath::root());
        assert!(p.is_below(&ImagePath::new("/usr")));
        assert!(p.is_below(&ImagePath::root()));
        assert!(!ImagePath::new("/usrx/a").is_below(&ImagePath::new("/usr")));
        assert!(!ImagePath::new("/usr").is_below(&ImagePath::new("/usr")));
    }
}

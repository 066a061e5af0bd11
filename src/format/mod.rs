//! Chunked layer formats: eStargz (gzip) and zstd:chunked.
//!
//! A chunked layer is a valid (gzip or zstd) tar stream whose compressed members start
//! at chunk boundaries, followed by a table of contents (TOC, `stargz.index.json`) and a
//! footer that points at the TOC. Reading a layer lazily is: fetch the footer, fetch
//! the TOC, validate it into a [`LayerIndex`], then fetch each chunk's compressed byte
//! range on demand and decompress it with [`decompress_chunk`].
//!
//! Everything here treats its input as hostile: a TOC comes from a registry.
//!
//! # Use
//!
//! 1. Read the last [`MAX_FOOTER_SIZE`] bytes of the blob and call [`parse_footer`].
//!    [`FormatError::NotChunked`] means a plain gzip/zstd tar layer: not lazily
//!    mountable.
//! 2. Read [`Footer::toc_range`] and call [`parse_toc`] with the layer's
//!    [`TOC_DIGEST_ANNOTATION`]; it returns the [`LayerIndex`] and the TOC digest.
//! 3. For each chunk, read `compressed_offset .. compressed_offset + compressed_size`
//!    and call [`decompress_chunk`], which verifies the chunk's digest.
//!
//! # Errors
//!
//! A [`FormatError`] names the footer field, TOC entry (position and name) or chunk
//! at fault, never the layer: none of these functions knows which layer it is
//! reading. Callers wrap it with the layer's blob digest.

use std::sync::Arc;

use crate::digest::Digest;

mod chunk;
mod error;
mod footer;
#[cfg(test)]
mod golden_tests;
#[cfg(test)]
mod hostile_tests;
mod rfc3339;
mod toc;
pub mod writer;

pub use chunk::decompress_chunk;
pub use error::FormatError;
pub use footer::{Footer, MAX_FOOTER_SIZE, parse_footer};
pub use toc::{
    ParsedToc, TocLimits, decompress_toc, parse_toc, parse_toc_json, parse_toc_with_limits,
};

/// The layer annotation carrying the TOC digest: for both eStargz and zstd:chunked,
/// ctr-remote writes the sha256 of the *uncompressed* TOC JSON (the
/// `io.containers.zstd-chunked.manifest-checksum` annotation of zstd:chunked layers is
/// the digest of the compressed TOC instead and is not used here).
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// The layer annotation with the uncompressed size of the layer (eStargz).
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";
/// Files before this landmark are fetched before a container starts.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// Marks a layer whose writer asked for no prefetch.
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
/// The TOC's own tar entry name.
pub const TOC_TAR_NAME: &str = "stargz.index.json";

/// Which chunked layout a layer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum LayerFormat {
    /// eStargz: gzip members, TOC in a gzip'd tar entry, 51-byte gzip footer.
    Estargz,
    /// zstd:chunked as written by stargz-snapshotter: zstd frames, zstd'd TOC, skippable-frame footer.
    ZstdChunked,
}

impl std::fmt::Display for LayerFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LayerFormat::Estargz => "estargz",
            LayerFormat::ZstdChunked => "zstd:chunked",
        })
    }
}

/// A byte offset in the compressed blob, as the registry serves it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct CompressedOffset(pub u64);

/// A byte offset inside one file's uncompressed content.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct FileOffset(pub u64);

/// Index of an entry in [`LayerIndex::entries`].
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct EntryId(pub u32);

/// One chunk of a regular file's content.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Chunk {
    /// Where the compressed member holding this chunk starts in the blob.
    pub compressed_offset: CompressedOffset,
    /// Bytes from `compressed_offset` to the next member boundary that follows this
    /// chunk (the next chunk's offset, or the TOC offset for the last one).
    pub compressed_size: u64,
    /// Bytes to skip in the decompressed stream before this chunk's data starts
    /// (`innerOffset`; 0 for writers that start every chunk in a new member).
    pub inner_offset: u64,
    /// Where this chunk's data sits in the file.
    pub file_offset: FileOffset,
    /// Uncompressed length of this chunk.
    pub size: u64,
    /// `chunkDigest`: sha256 of the uncompressed chunk data. Always present: a chunk
    /// that cannot be verified is never served.
    pub digest: Digest,
}

impl Chunk {
    /// The blob bytes to fetch and hand to [`decompress_chunk`].
    pub fn compressed_range(&self) -> std::ops::Range<u64> {
        self.compressed_offset.0
            ..self
                .compressed_offset
                .0
                .saturating_add(self.compressed_size)
    }
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum EntryKind {
    Directory,
    /// A regular file; `chunks` are sorted by `file_offset`, contiguous, and cover `size`.
    Regular {
        size: u64,
        chunks: Vec<Chunk>,
    },
    Symlink {
        target: String,
    },
    /// A hard link to the entry `target` (an earlier entry in the TOC).
    Hardlink {
        target: EntryId,
    },
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
}

/// One validated TOC entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    /// Path inside the layer, relative, normalized, no `.`/`..` components, no
    /// leading or trailing `/`. The root directory is `""`.
    pub name: String,
    pub kind: EntryKind,
    /// Permission and special bits (`0o7777` mask), without the file-type bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, seconds since the epoch (may be negative).
    pub mtime_secs: i64,
    pub mtime_nanos: u32,
    /// Extended attributes, in TOC order.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// A layer's validated table of contents: everything needed to serve the layer's
/// tree and to locate any byte of any file in the blob.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerIndex {
    pub format: LayerFormat,
    /// Size of the whole compressed blob.
    pub blob_size: u64,
    /// Where the TOC starts; all chunk data lies before it.
    pub toc_offset: CompressedOffset,
    /// Entries with parents before children. Entry 0 is always the root directory
    /// (synthesized when the TOC has none). Landmark files and the TOC itself are
    /// not included.
    pub entries: Vec<Entry>,
    /// Regular files the layer asks to be fetched first, in layer order (those that
    /// precede `.prefetch.landmark`); empty when there is no landmark.
    pub prefetch: Vec<EntryId>,
    /// Whether the layer carried `.no.prefetch.landmark`.
    pub no_prefetch: bool,
}

impl LayerIndex {
    pub fn entry(&self, id: EntryId) -> &Entry {
        &self.entries[id.0 as usize]
    }
}

/// Shared handle to an immutable index.
pub type SharedIndex = Arc<LayerIndex>;

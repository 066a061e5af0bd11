//! Errors of the `format` module.
//!
//! These errors name the entry, chunk or footer field at fault but not the layer: the
//! caller knows which layer (blob digest) it is reading and wraps a [`FormatError`]
//! with it, e.g. `#[error("layer {layer}: {source}")]`.

use crate::digest::Digest;

use super::{CompressedOffset, FileOffset, LayerFormat};

/// Why a chunked layer's footer, TOC or chunk data cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The blob ends in neither an eStargz nor a zstd:chunked footer. It may be a plain
    /// gzip/zstd tar layer: it has to be pulled whole rather than mounted lazily.
    #[error(
        "no eStargz or zstd:chunked footer in the last {inspected} bytes of the {blob_size}-byte blob: \
         the layer is not lazily mountable (convert it with `ctr-remote images convert --estargz` \
         or pull it normally)"
    )]
    NotChunked { inspected: usize, blob_size: u64 },

    /// A footer was recognized but its content is inconsistent.
    #[error(
        "corrupt {format} footer: {reason}; the blob is damaged or was not written by an eStargz/zstd:chunked writer"
    )]
    BadFooter { format: LayerFormat, reason: String },

    /// The compressed TOC could not be decompressed or unpacked.
    #[error("cannot read the {format} TOC at blob offset {}: {reason}", offset.0)]
    TocUnreadable {
        format: LayerFormat,
        offset: CompressedOffset,
        reason: String,
    },

    /// The uncompressed TOC is larger than the configured limit (possible zip bomb).
    #[error(
        "the TOC decompresses to more than {limit} bytes; refusing it \
         (raise `max_toc_json_bytes` only if this layer is trusted)"
    )]
    TocTooLarge { limit: u64 },

    /// The TOC does not hash to the digest the manifest annotation announced.
    #[error(
        "TOC digest mismatch: the manifest announces {expected} but the TOC hashes to {actual}; \
         the blob or the manifest was tampered with or corrupted"
    )]
    TocDigestMismatch { expected: Digest, actual: Digest },

    /// The TOC is not the JSON document we expect.
    #[error("TOC is not valid stargz.index.json: {reason}")]
    TocJson { reason: String },

    /// The TOC declares an unsupported version.
    #[error("unsupported TOC version {version} (only version 1 is known)")]
    TocVersion { version: i64 },

    /// The TOC has more entries than the configured limit.
    #[error(
        "TOC has more than {limit} entries; refusing it (raise `max_entries` only if this layer is trusted)"
    )]
    TooManyEntries { limit: usize },

    /// One entry of the TOC is invalid.
    #[error("TOC entry {index} ({name:?}): {reason}")]
    BadEntry {
        /// Position in the TOC's `entries` array.
        index: usize,
        /// The name as the TOC spells it (truncated to 256 characters).
        name: String,
        reason: String,
    },

    /// A chunk's compressed bytes did not decompress to its data.
    #[error(
        "chunk at file offset {} (blob offset {}, {compressed_len} compressed bytes) of a {format} layer: {reason}",
        file_offset.0, compressed_offset.0
    )]
    ChunkUnreadable {
        format: LayerFormat,
        compressed_offset: CompressedOffset,
        compressed_len: usize,
        file_offset: FileOffset,
        reason: String,
    },

    /// A chunk decompressed but does not hash to its `chunkDigest`.
    #[error(
        "chunk at file offset {} (blob offset {}) hashes to {actual}, but the TOC says {expected}; \
         the blob is corrupt or was served wrongly (the chunk was not used)",
        file_offset.0, compressed_offset.0
    )]
    ChunkDigestMismatch {
        compressed_offset: CompressedOffset,
        file_offset: FileOffset,
        expected: Digest,
        actual: Digest,
    },
}

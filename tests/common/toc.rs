//! Read the table of contents of an eStargz or zstd:chunked layer blob independently of
//! sluice's own parser, so tests can aim at the compressed bytes of one chunk of one
//! file (e.g. to corrupt exactly that range through the proxy).

use std::io::Read;
use std::ops::Range;
use std::path::Path;

use serde_json::Value;

use super::images::{Descriptor, ZSTD_MANIFEST_POSITION_ANNOTATION};

/// Length of the eStargz footer (an empty gzip member whose extra field holds the TOC offset).
const ESTARGZ_FOOTER_LEN: usize = 51;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TocEntry {
    pub name: String,
    /// `reg`, `chunk`, `dir`, `symlink`, `hardlink`, `char`, `block`, `fifo`.
    pub kind: String,
    /// Size of the whole file (regular entries).
    pub size: u64,
    /// Where this entry's compressed payload starts in the blob (0: no payload).
    pub offset: u64,
    /// Where it ends at the latest: the next payload's offset, or the TOC's. The range
    /// may also hold the next entry's tar header, so the chunk's data is the first
    /// `chunk_size` bytes of what it decompresses to.
    pub end_offset: u64,
    /// Offset of this chunk within the file.
    pub chunk_offset: u64,
    /// Uncompressed length of this chunk.
    pub chunk_size: u64,
    pub chunk_digest: Option<String>,
}

impl TocEntry {
    /// Compressed byte range of this entry's payload within the blob (see `end_offset`).
    pub fn blob_range(&self) -> Range<u64> {
        self.offset..self.end_offset
    }

    /// Uncompressed byte range of this chunk within its file.
    pub fn file_range(&self) -> Range<u64> {
        self.chunk_offset..self.chunk_offset + self.chunk_size
    }
}

#[derive(Debug, Clone)]
pub struct LayerToc {
    pub entries: Vec<TocEntry>,
    /// Where the TOC itself starts in the blob.
    pub toc_offset: u64,
    /// The TOC JSON as stored in the layer.
    pub json: Value,
}

impl LayerToc {
    /// The payload chunks of regular file `name` (TOC path, no leading `/`), in file order.
    pub fn chunks_of(&self, name: &str) -> Vec<&TocEntry> {
        let mut chunks: Vec<&TocEntry> = self
            .entries
            .iter()
            .filter(|e| e.name == name && (e.kind == "reg" || e.kind == "chunk") && e.offset > 0)
            .collect();
        chunks.sort_by_key(|e| e.chunk_offset);
        chunks
    }

    pub fn entry(&self, name: &str) -> Option<&TocEntry> {
        self.entries.iter().find(|e| e.name == name)
    }
}

/// Read the TOC of the layer stored at `blob` described by `layer` (its media type and
/// annotations tell eStargz from zstd:chunked).
pub fn read_toc(blob: &Path, layer: &Descriptor) -> LayerToc {
    let bytes = std::fs::read(blob).unwrap_or_else(|e| panic!("reading {}: {e}", blob.display()));
    let (json, toc_offset) = if layer.media_type.ends_with("+zstd") {
        let position = layer
            .annotations
            .get(ZSTD_MANIFEST_POSITION_ANNOTATION)
            .unwrap_or_else(|| panic!("zstd layer {} without manifest position", layer.digest));
        let fields: Vec<u64> = position
            .split(':')
            .map(|f| f.parse().expect("numeric manifest position"))
            .collect();
        let (offset, length) = (fields[0], fields[1]);
        let compressed = &bytes[offset as usize..(offset + length) as usize];
        let json = zstd::decode_all(compressed).expect("zstd TOC decompresses");
        (json, offset)
    } else {
        let footer = &bytes[bytes.len() - ESTARGZ_FOOTER_LEN..];
        let marker = footer
            .windows(6)
            .position(|w| w == b"STARGZ")
            .expect("eStargz footer marker");
        let hex = std::str::from_utf8(&footer[marker - 16..marker]).expect("hex TOC offset");
        let offset = u64::from_str_radix(hex, 16).expect("hex TOC offset");
        let member = &bytes[offset as usize..bytes.len() - ESTARGZ_FOOTER_LEN];
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(member));
        let mut json = Vec::new();
        let mut entries = archive.entries().expect("TOC tar");
        let mut toc = entries
            .next()
            .expect("TOC tar has an entry")
            .expect("TOC tar entry");
        assert_eq!(
            toc.path().expect("TOC entry path").to_string_lossy(),
            "stargz.index.json"
        );
        toc.read_to_end(&mut json).expect("TOC content");
        (json, offset)
    };
    let json: Value = serde_json::from_slice(&json).expect("TOC is JSON");
    let raw_entries = json["entries"].as_array().expect("TOC entries");
    let mut payload_offsets: Vec<u64> = raw_entries
        .iter()
        .filter_map(|e| e["offset"].as_u64())
        .filter(|o| *o > 0)
        .chain(std::iter::once(toc_offset))
        .collect();
    payload_offsets.sort_unstable();
    payload_offsets.dedup();
    // Chunk entries carry no size; it is on the file's `reg` entry.
    let file_sizes: std::collections::HashMap<&str, u64> = raw_entries
        .iter()
        .filter(|e| e["type"] == "reg")
        .map(|e| {
            (
                e["name"].as_str().unwrap_or_default(),
                e["size"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let entries = raw_entries
        .iter()
        .map(|e| {
            let offset = e["offset"].as_u64().unwrap_or(0);
            let name = e["name"].as_str().unwrap_or_default();
            let size = e["size"]
                .as_u64()
                .or_else(|| file_sizes.get(name).copied())
                .unwrap_or(0);
            let chunk_offset = e["chunkOffset"].as_u64().unwrap_or(0);
            let chunk_size = match e["chunkSize"].as_u64().unwrap_or(0) {
                0 => size - chunk_offset.min(size),
                n => n,
            };
            let end_offset = if offset == 0 {
                0
            } else {
                payload_offsets
                    .iter()
                    .copied()
                    .find(|o| *o > offset)
                    .unwrap_or(toc_offset)
            };
            TocEntry {
                name: name.to_string(),
                kind: e["type"].as_str().unwrap_or_default().to_string(),
                size,
                offset,
                end_offset,
                chunk_offset,
                chunk_size,
                chunk_digest: e["chunkDigest"].as_str().map(str::to_string),
            }
        })
        .collect();
    LayerToc {
        entries,
        toc_offset,
        json,
    }
}

/// Decompress one payload range of a blob (a gzip member run or zstd frames).
pub fn decompress_range(blob_bytes: &[u8], range: Range<u64>, zstd: bool) -> Vec<u8> {
    let compressed = &blob_bytes[range.start as usize..range.end as usize];
    let mut out = Vec::new();
    if zstd {
        out = zstd::decode_all(compressed).expect("zstd chunk decompresses");
    } else {
        flate2::read::MultiGzDecoder::new(compressed)
            .read_to_end(&mut out)
            .expect("gzip chunk decompresses");
    }
    out
}

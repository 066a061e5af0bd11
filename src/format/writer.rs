//! Writing chunked layers: a tar stream in, an eStargz or zstd:chunked blob out.
//!
//! The output follows the layout stargz-snapshotter's `estargz` package produces, so
//! its tools and any eStargz reader accept it:
//!
//! * The blob is a sequence of independent compressed members (gzip members or zstd
//!   frames). Every chunk of a regular file's content starts a new member, so a reader
//!   can decompress any chunk alone from the TOC's `offset`. A member holds the
//!   chunk's data, the tar padding after it and the tar headers that follow, up to
//!   the next chunk.
//! * Files asked to be prefetched come first (their parent directories and hard-link
//!   targets just before them), then a one-byte `.prefetch.landmark`; a layer with
//!   nothing to prefetch gets `.no.prefetch.landmark` at the front instead.
//! * eStargz: the TOC is a tar entry `stargz.index.json` in a gzip member of its
//!   own, followed by the tar end-of-archive and the 51-byte footer.
//!   zstd:chunked: the end-of-archive is the last zstd frame of the tar stream; the
//!   TOC JSON is a zstd frame inside a skippable frame, then the 48-byte footer.
//!
//! Decompressed as a whole, the blob is a valid tar stream with the same entries as
//! the input (minus any old TOC and landmarks), so containerd can unpack it as a
//! plain layer. Output is deterministic: gzip headers carry no time or OS, members
//! are cut at the same places, and the TOC is serialized in entry order.
//!
//! Memory stays bounded: the input is a seekable tar file (a spooled temp file);
//! members are compressed in batches of at most [`WriterOptions::batch_bytes`],
//! spread over [`WriterOptions::threads`] worker threads.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;

use base64::Engine as _;
use serde::Serialize;

use crate::digest::{Digest, DigestWriter};

use super::{LayerFormat, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME};

const BLOCK: u64 = 512;
/// What a landmark file holds: one byte, as stargz-snapshotter writes it.
const LANDMARK_CONTENTS: u8 = 0x0f;
/// The layer annotations a zstd:chunked blob carries for containers/storage.
pub const ZSTD_CHUNKED_MANIFEST_CHECKSUM_ANNOTATION: &str =
    "io.containers.zstd-chunked.manifest-checksum";
pub const ZSTD_CHUNKED_MANIFEST_POSITION_ANNOTATION: &str =
    "io.containers.zstd-chunked.manifest-position";

/// A layer that could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("reading the input tar stream: {0}; the layer is not a valid tar archive")]
    Tar(#[source] io::Error),
    #[error(
        "tar entry {path:?} has type {kind:?}, which a chunked layer cannot represent \
         (GNU sparse files and volume headers are not supported); repack the layer without it"
    )]
    UnsupportedEntry { path: String, kind: char },
    #[error("tar entry {path:?}: {reason}")]
    BadEntry { path: String, reason: String },
    #[error("writing the converted layer: {0}")]
    Output(#[source] io::Error),
    #[error("{option} = {value} is out of range: {reason}")]
    BadOption {
        option: &'static str,
        value: u64,
        reason: &'static str,
    },
}

/// How to lay out and compress a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterOptions {
    pub format: LayerFormat,
    /// Largest uncompressed chunk of a file's content (stargz-snapshotter: 4 MiB).
    pub chunk_size: u64,
    /// gzip level 0..=9 or zstd level 1..=22.
    pub compression_level: i32,
    /// Threads compressing members (at least 1).
    pub threads: usize,
    /// Uncompressed bytes compressed per batch; bounds memory use together with
    /// `chunk_size`.
    pub batch_bytes: usize,
}

impl WriterOptions {
    pub fn new(format: LayerFormat) -> Self {
        Self {
            format,
            chunk_size: 4 << 20,
            compression_level: match format {
                LayerFormat::Estargz => 9,
                LayerFormat::ZstdChunked => 3,
            },
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            batch_bytes: 16 << 20,
        }
    }

    fn validate(&self) -> Result<(), WriterError> {
        let bad = |option, value: u64, reason| {
            Err(WriterError::BadOption {
                option,
                value,
                reason,
            })
        };
        if self.chunk_size == 0 || self.chunk_size > super::TocLimits::default().max_chunk_size {
            return bad(
                "chunk size",
                self.chunk_size,
                "must be between 1 byte and 64 MiB (readers refuse larger chunks)",
            );
        }
        let level = i64::from(self.compression_level);
        let (low, high) = match self.format {
            LayerFormat::Estargz => (0, 9),
            LayerFormat::ZstdChunked => (1, 22),
        };
        if level < low || level > high {
            return bad(
                "compression level",
                level as u64,
                "gzip takes 0..=9, zstd 1..=22",
            );
        }
        Ok(())
    }
}

/// Which files go first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrefetchOrder {
    /// Paths (absolute or relative to the layer root) in the order they should be
    /// fetched; those present in this layer as regular files come first, followed by
    /// `.prefetch.landmark`. When none is present the layer gets
    /// `.no.prefetch.landmark`.
    Files(Vec<String>),
    /// No prefetch: `.no.prefetch.landmark`.
    None,
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenLayer {
    pub format: LayerFormat,
    /// sha256 and size of the compressed blob.
    pub digest: Digest,
    pub size: u64,
    /// sha256 and size of the decompressed tar stream (the config's diff_id).
    pub diff_id: Digest,
    pub uncompressed_size: u64,
    /// sha256 of the uncompressed TOC JSON.
    pub toc_digest: Digest,
    pub toc_offset: u64,
    /// Layer-order paths (layer-relative, no leading `/`) written before the landmark.
    pub prefetched: Vec<String>,
    /// Descriptor annotations for this layer (TOC digest, uncompressed size, and for
    /// zstd:chunked the manifest position and checksum).
    pub annotations: BTreeMap<String, String>,
}

impl WrittenLayer {
    /// The OCI media type of the blob.
    pub fn media_type(&self) -> &'static str {
        match self.format {
            LayerFormat::Estargz => "application/vnd.oci.image.layer.v1.tar+gzip",
            LayerFormat::ZstdChunked => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// Progress callback: uncompressed input bytes consumed so far.
pub type Progress<'a> = &'a (dyn Fn(u64) + Sync);

/// Writes `tar` (an uncompressed tar archive in a file) as a chunked layer to `out`.
pub fn write_chunked_layer(
    tar: &File,
    out: &mut dyn Write,
    prefetch: &PrefetchOrder,
    options: &WriterOptions,
    progress: Progress<'_>,
) -> Result<WrittenLayer, WriterError> {
    options.validate()?;
    let entries = scan_tar(tar)?;
    let order = output_order(&entries, prefetch);
    let mut sink = Sink::new(out, options);
    let mut toc = Vec::with_capacity(entries.len() + 1);
    let mut builder = SegmentBuilder::default();

    let landmark = match &order.landmark {
        Landmark::Prefetch => PREFETCH_LANDMARK,
        Landmark::NoPrefetch => NO_PREFETCH_LANDMARK,
    };
    let mut landmark_at = order.prefetch_count;
    let mut consumed = 0u64;
    for position in 0..=order.entries.len() {
        if position == landmark_at {
            write_landmark(landmark, &mut builder, &mut sink, &mut toc)?;
            landmark_at = usize::MAX;
        }
        let Some(&id) = order.entries.get(position) else {
            break;
        };
        let entry = &entries[id];
        let mut headers = vec![0u8; (entry.data_start - entry.group_start) as usize];
        tar.read_exact_at(&mut headers, entry.group_start)
            .map_err(WriterError::Tar)?;
        builder.current.extend_from_slice(&headers);
        let mut toc_entry = entry.toc.clone();
        if entry.is_regular() && entry.size > 0 {
            write_file_chunks(
                tar,
                entry,
                &mut toc_entry,
                &mut builder,
                &mut sink,
                &mut toc,
            )?;
        } else {
            toc.push(TocItem::Entry(toc_entry));
        }
        builder
            .current
            .extend(std::iter::repeat_n(0, padding(entry.size)));
        consumed += entry.data_start - entry.group_start + entry.size;
        progress(consumed);
        sink.maybe_flush(&mut builder)?;
    }
    finish(builder, sink, toc, order.prefetched(&entries), options)
}

fn padding(size: u64) -> usize {
    ((BLOCK - size % BLOCK) % BLOCK) as usize
}

fn write_landmark(
    name: &str,
    builder: &mut SegmentBuilder,
    sink: &mut Sink<'_, '_>,
    toc: &mut Vec<TocItem>,
) -> Result<(), WriterError> {
    builder
        .current
        .extend_from_slice(&ustar_header(name, 1, b'0'));
    let segment = builder.start_chunk(sink, 1)?;
    builder.current.push(LANDMARK_CONTENTS);
    let digest = Digest::sha256_of(&[LANDMARK_CONTENTS]);
    toc.push(TocItem::Chunked {
        entry: TocEntry {
            name: name.to_owned(),
            kind: "reg",
            size: 1,
            digest: Some(digest.to_string()),
            ..TocEntry::default()
        },
        segment,
    });
    builder.current.extend(std::iter::repeat_n(0, padding(1)));
    Ok(())
}

fn write_file_chunks(
    tar: &File,
    entry: &TarEntry,
    toc_entry: &mut TocEntry,
    builder: &mut SegmentBuilder,
    sink: &mut Sink<'_, '_>,
    toc: &mut Vec<TocItem>,
) -> Result<(), WriterError> {
    let chunk_size = sink.options.chunk_size;
    let chunks = entry.size.div_ceil(chunk_size);
    let mut whole = (chunks > 1).then(DigestWriter::new);
    let mut offset = 0u64;
    let mut first = None;
    while offset < entry.size {
        let len = chunk_size.min(entry.size - offset);
        let segment = builder.start_chunk(sink, len as usize)?;
        let start = builder.current.len();
        builder.current.resize(start + len as usize, 0);
        tar.read_exact_at(&mut builder.current[start..], entry.data_start + offset)
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => WriterError::BadEntry {
                    path: entry.toc.name.clone(),
                    reason: "the archive ends inside this file's data".into(),
                },
                _ => WriterError::Tar(e),
            })?;
        if let Some(whole) = &mut whole {
            whole.update(&builder.current[start..]);
        }
        let item_entry = if offset == 0 {
            first = Some(toc.len());
            let mut e = toc_entry.clone();
            if chunks > 1 {
                e.chunk_size = len;
            }
            e
        } else {
            TocEntry {
                name: toc_entry.name.clone(),
                kind: "chunk",
                chunk_offset: offset,
                chunk_size: if offset + len < entry.size { len } else { 0 },
                ..TocEntry::default()
            }
        };
        toc.push(TocItem::Chunked {
            entry: item_entry,
            segment,
        });
        offset += len;
    }
    if let (Some(whole), Some(first)) = (whole, first)
        && let TocItem::Chunked { entry, .. } = &mut toc[first]
    {
        entry.digest = Some(whole.finish().to_string());
    }
    Ok(())
}

fn finish(
    mut builder: SegmentBuilder,
    mut sink: Sink<'_, '_>,
    toc: Vec<TocItem>,
    prefetched: Vec<String>,
    options: &WriterOptions,
) -> Result<WrittenLayer, WriterError> {
    let eoa = [0u8; 2 * BLOCK as usize];
    if options.format == LayerFormat::ZstdChunked {
        builder.current.extend_from_slice(&eoa);
    }
    builder.close_segment();
    sink.flush_all(&mut builder)?;
    let toc_offset = sink.offset;
    let entries: Vec<TocEntry> = toc
        .into_iter()
        .map(|item| match item {
            TocItem::Entry(entry) => entry,
            TocItem::Chunked {
                mut entry, segment, ..
            } => {
                entry.offset = sink.segment_offsets[segment];
                let digest = sink.chunk_digests[segment].to_string();
                if entry.kind == "reg" && entry.digest.is_none() {
                    entry.digest = Some(digest.clone());
                }
                entry.chunk_digest = Some(digest);
                entry
            }
        })
        .collect();
    let toc_json = serialize_toc(&entries);
    let toc_digest = Digest::sha256_of(&toc_json);
    let mut annotations = BTreeMap::new();
    match options.format {
        LayerFormat::Estargz => {
            let mut member = ustar_header(TOC_TAR_NAME, toc_json.len() as u64, b'0').to_vec();
            member.extend_from_slice(&toc_json);
            member.extend(std::iter::repeat_n(0, padding(toc_json.len() as u64)));
            member.extend_from_slice(&eoa);
            sink.diff.update(&member);
            sink.uncompressed += member.len() as u64;
            let compressed = gzip_member(&member, options.compression_level)?;
            sink.write(&compressed)?;
            sink.write(&estargz_footer(toc_offset))?;
        }
        LayerFormat::ZstdChunked => {
            let compressed = zstd::bulk::compress(&toc_json, options.compression_level)
                .map_err(WriterError::Output)?;
            let mut skippable = vec![0x50, 0x2a, 0x4d, 0x18];
            skippable.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
            sink.write(&skippable)?;
            let frame_offset = sink.offset;
            sink.write(&compressed)?;
            let mut footer = vec![0x50, 0x2a, 0x4d, 0x18];
            footer.extend_from_slice(&40u32.to_le_bytes());
            for value in [
                frame_offset,
                compressed.len() as u64,
                toc_json.len() as u64,
                1,
            ] {
                footer.extend_from_slice(&value.to_le_bytes());
            }
            footer.extend_from_slice(b"GnUlInUx");
            sink.write(&footer)?;
            annotations.insert(
                ZSTD_CHUNKED_MANIFEST_CHECKSUM_ANNOTATION.to_owned(),
                Digest::sha256_of(&compressed).to_string(),
            );
            annotations.insert(
                ZSTD_CHUNKED_MANIFEST_POSITION_ANNOTATION.to_owned(),
                format!("{frame_offset}:{}:{}:1", compressed.len(), toc_json.len()),
            );
        }
    }
    let toc_offset = match options.format {
        LayerFormat::Estargz => toc_offset,
        LayerFormat::ZstdChunked => toc_offset + 8,
    };
    annotations.insert(
        super::TOC_DIGEST_ANNOTATION.to_owned(),
        toc_digest.to_string(),
    );
    annotations.insert(
        super::UNCOMPRESSED_SIZE_ANNOTATION.to_owned(),
        sink.uncompressed.to_string(),
    );
    sink.out.flush().map_err(WriterError::Output)?;
    Ok(WrittenLayer {
        format: options.format,
        digest: sink.blob.finish(),
        size: sink.offset,
        diff_id: sink.diff.finish(),
        uncompressed_size: sink.uncompressed,
        toc_digest,
        toc_offset,
        prefetched,
        annotations,
    })
}

fn estargz_footer(toc_offset: u64) -> Vec<u8> {
    // An empty gzip member whose extra field carries the TOC offset: FLG = FEXTRA,
    // no mtime, XFL 0, OS "unknown", one 'SG' subfield of 22 bytes.
    let mut footer = vec![
        0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0,
    ];
    footer.extend_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    // An empty final stored block, then CRC32 and ISIZE of nothing.
    footer.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]);
    footer.extend_from_slice(&[0; 8]);
    footer
}

fn gzip_member(data: &[u8], level: i32) -> Result<Vec<u8>, WriterError> {
    let mut encoder = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(
            Vec::with_capacity(data.len() / 2 + 64),
            flate2::Compression::new(level as u32),
        );
    encoder.write_all(data).map_err(WriterError::Output)?;
    encoder.finish().map_err(WriterError::Output)
}

fn compress_member(data: &[u8], format: LayerFormat, level: i32) -> Result<Vec<u8>, WriterError> {
    match format {
        LayerFormat::Estargz => gzip_member(data, level),
        LayerFormat::ZstdChunked => zstd::bulk::compress(data, level).map_err(WriterError::Output),
    }
}

/// Cuts the uncompressed output into members.
#[derive(Default)]
struct SegmentBuilder {
    current: Vec<u8>,
    /// Bytes at the start of `current` that are chunk data (0: none).
    current_chunk: usize,
    /// Closed members not yet compressed: (bytes, chunk data length).
    pending: Vec<(Vec<u8>, usize)>,
    pending_bytes: usize,
    /// Index of the next member to be closed.
    next_index: usize,
}

impl SegmentBuilder {
    fn close_segment(&mut self) {
        if self.current.is_empty() {
            return;
        }
        let bytes = std::mem::take(&mut self.current);
        self.pending_bytes += bytes.len();
        self.pending.push((bytes, self.current_chunk));
        self.current_chunk = 0;
        self.next_index += 1;
    }

    /// Closes the current member and starts one for a chunk; returns its index.
    /// The caller appends the `len` bytes of chunk data next.
    fn start_chunk(&mut self, sink: &mut Sink<'_, '_>, len: usize) -> Result<usize, WriterError> {
        self.close_segment();
        sink.maybe_flush(self)?;
        self.current_chunk = len;
        Ok(self.next_index)
    }
}

/// The compressed output, hashed and counted as it is written.
struct Sink<'o, 'p> {
    out: &'o mut dyn Write,
    options: &'p WriterOptions,
    offset: u64,
    uncompressed: u64,
    blob: DigestWriter,
    diff: DigestWriter,
    segment_offsets: Vec<u64>,
    /// Digest of each member's chunk data; members that carry no file data (headers,
    /// landmarks) get the digest of nothing, which no TOC entry refers to.
    chunk_digests: Vec<Digest>,
}

impl<'o, 'p> Sink<'o, 'p> {
    fn new(out: &'o mut dyn Write, options: &'p WriterOptions) -> Self {
        Self {
            out,
            options,
            offset: 0,
            uncompressed: 0,
            blob: DigestWriter::new(),
            diff: DigestWriter::new(),
            segment_offsets: Vec::new(),
            chunk_digests: Vec::new(),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), WriterError> {
        self.out.write_all(bytes).map_err(WriterError::Output)?;
        self.blob.update(bytes);
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn maybe_flush(&mut self, builder: &mut SegmentBuilder) -> Result<(), WriterError> {
        if builder.pending_bytes >= self.options.batch_bytes || builder.pending.len() >= 4096 {
            self.flush_all(builder)?;
        }
        Ok(())
    }

    /// Compresses the pending members on the worker threads and writes them in order.
    fn flush_all(&mut self, builder: &mut SegmentBuilder) -> Result<(), WriterError> {
        let pending = std::mem::take(&mut builder.pending);
        builder.pending_bytes = 0;
        if pending.is_empty() {
            return Ok(());
        }
        let format = self.options.format;
        let level = self.options.compression_level;
        let threads = self.options.threads.max(1).min(pending.len());
        let per_thread = pending.len().div_ceil(threads);
        type Compressed = Vec<Result<(Vec<u8>, Option<Digest>), WriterError>>;
        let results: Vec<Compressed> = std::thread::scope(|scope| {
            let handles: Vec<_> = pending
                .chunks(per_thread)
                .map(|slice| {
                    scope.spawn(move || {
                        slice
                            .iter()
                            .map(|(bytes, chunk)| {
                                let digest =
                                    (*chunk > 0).then(|| Digest::sha256_of(&bytes[..*chunk]));
                                compress_member(bytes, format, level).map(|c| (c, digest))
                            })
                            .collect::<Compressed>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect()
        });
        let empty = Digest::sha256_of(&[]);
        for ((raw, _), result) in pending.iter().zip(results.into_iter().flatten()) {
            let (compressed, digest) = result?;
            self.diff.update(raw);
            self.uncompressed += raw.len() as u64;
            self.segment_offsets.push(self.offset);
            self.chunk_digests
                .push(digest.unwrap_or_else(|| empty.clone()));
            self.write(&compressed)?;
        }
        Ok(())
    }
}

/// A TOC entry as serialized: field order and omitted zero values as stargz-snapshotter.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct TocEntry {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "is_zero")]
    size: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    modtime: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    link_name: String,
    #[serde(skip_serializing_if = "is_zero")]
    mode: u64,
    #[serde(skip_serializing_if = "is_zero")]
    uid: u64,
    #[serde(skip_serializing_if = "is_zero")]
    gid: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    user_name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    group_name: String,
    #[serde(skip_serializing_if = "is_zero")]
    offset: u64,
    #[serde(skip_serializing_if = "is_zero")]
    dev_major: u64,
    #[serde(skip_serializing_if = "is_zero")]
    dev_minor: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    xattrs: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    digest: Option<String>,
    #[serde(skip_serializing_if = "is_zero")]
    chunk_offset: u64,
    #[serde(skip_serializing_if = "is_zero")]
    chunk_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    chunk_digest: Option<String>,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

enum TocItem {
    Entry(TocEntry),
    /// An entry whose chunk data starts member `segment`; offset and chunk digest are
    /// known once that member is written.
    Chunked {
        entry: TocEntry,
        segment: usize,
    },
}

fn serialize_toc(entries: &[TocEntry]) -> Vec<u8> {
    #[derive(Serialize)]
    struct Toc<'a> {
        version: u32,
        entries: &'a [TocEntry],
    }
    let mut json = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"\t");
    let mut serializer = serde_json::Serializer::with_formatter(&mut json, formatter);
    Toc {
        version: 1,
        entries,
    }
    .serialize(&mut serializer)
    .expect("serializing plain structs into a Vec cannot fail");
    json
}

/// A ustar header for a file the writer adds (landmarks, the TOC): root-owned, mode 0,
/// no mtime, so the output does not depend on when it was written.
fn ustar_header(name: &str, size: u64, kind: u8) -> [u8; BLOCK as usize] {
    let mut h = [0u8; BLOCK as usize];
    h[..name.len()].copy_from_slice(name.as_bytes());
    let octal = |field: &mut [u8], value: u64| {
        let text = format!("{value:0width$o}", width = field.len() - 1);
        field[..text.len()].copy_from_slice(text.as_bytes());
    };
    octal(&mut h[100..108], 0);
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], 0);
    h[156] = kind;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    octal(&mut h[329..337], 0);
    octal(&mut h[337..345], 0);
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let text = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(text.as_bytes());
    h
}

/// One entry of the input archive.
#[derive(Debug)]
struct TarEntry {
    /// Where its header group (extension headers included) starts.
    group_start: u64,
    /// Where its content starts (after all its headers).
    data_start: u64,
    /// Bytes of content stored in the archive.
    size: u64,
    /// Normalized path: no leading `./` or `/`, no trailing `/`.
    path: String,
    hardlink_target: Option<String>,
    toc: TocEntry,
}

impl TarEntry {
    fn is_regular(&self) -> bool {
        self.toc.kind == "reg"
    }
}

fn normalize(path: &str) -> String {
    let mut p = path;
    loop {
        if let Some(rest) = p.strip_prefix("./") {
            p = rest;
        } else if let Some(rest) = p.strip_prefix('/') {
            p = rest;
        } else {
            break;
        }
    }
    let p = p.trim_end_matches('/');
    if p == "." {
        String::new()
    } else {
        p.to_owned()
    }
}

fn scan_tar(file: &File) -> Result<Vec<TarEntry>, WriterError> {
    // The file's cursor may be anywhere (it was just written); read through a clone
    // rewound to the start, skipping content by seeking.
    let mut reader = file.try_clone().map_err(WriterError::Tar)?;
    io::Seek::seek(&mut reader, io::SeekFrom::Start(0)).map_err(WriterError::Tar)?;
    let mut archive = tar::Archive::new(io::BufReader::with_capacity(1 << 16, reader));
    let mut entries = Vec::new();
    let mut group_start = 0u64;
    for entry in archive.entries_with_seek().map_err(WriterError::Tar)? {
        let mut entry = entry.map_err(WriterError::Tar)?;
        let header = entry.header().clone();
        let kind_byte = header.entry_type().as_byte();
        let size = header.entry_size().map_err(WriterError::Tar)?;
        let data_start = entry.raw_file_position();
        let next_group = data_start + size + padding(size) as u64;
        if kind_byte == b'g' {
            // A global extended header applies to the entries after it; keep it in
            // front of the next entry's headers.
            continue;
        }
        let raw_path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let path = normalize(&raw_path);
        let start = group_start;
        group_start = next_group;
        if path.is_empty() && kind_byte != b'5' {
            return Err(WriterError::BadEntry {
                path: raw_path,
                reason: "a non-directory entry names the layer root".into(),
            });
        }
        if matches!(
            path.as_str(),
            TOC_TAR_NAME | PREFETCH_LANDMARK | NO_PREFETCH_LANDMARK
        ) {
            // Left by an earlier conversion: rewritten, not carried over.
            continue;
        }
        let kind = match kind_byte {
            b'0' | b'\0' | b'7' => "reg",
            b'1' => "hardlink",
            b'2' => "symlink",
            b'3' => "char",
            b'4' => "block",
            b'5' => "dir",
            b'6' => "fifo",
            other => {
                return Err(WriterError::UnsupportedEntry {
                    path: raw_path,
                    kind: other as char,
                });
            }
        };
        let link = entry
            .link_name_bytes()
            .map(|l| String::from_utf8_lossy(&l).into_owned());
        let mut xattrs = BTreeMap::new();
        if let Some(extensions) = entry.pax_extensions().map_err(WriterError::Tar)? {
            for ext in extensions {
                let ext = ext.map_err(WriterError::Tar)?;
                if let Some(name) = ext
                    .key_bytes()
                    .strip_prefix(b"SCHILY.xattr.")
                    .map(|n| String::from_utf8_lossy(n).into_owned())
                {
                    xattrs.insert(
                        name,
                        base64::engine::general_purpose::STANDARD.encode(ext.value_bytes()),
                    );
                }
            }
        }
        let mtime =
            pax_mtime(&mut entry).unwrap_or_else(|| (header.mtime().unwrap_or(0) as i64, 0));
        let hardlink_target =
            (kind == "hardlink").then(|| normalize(link.as_deref().unwrap_or("")));
        let link_name = match kind {
            "hardlink" => hardlink_target.clone().unwrap_or_default(),
            "symlink" => link.unwrap_or_default(),
            _ => String::new(),
        };
        let toc_name = if kind == "dir" && !path.is_empty() {
            format!("{path}/")
        } else {
            path.clone()
        };
        let toc = TocEntry {
            name: toc_name,
            kind,
            size: if kind == "reg" { size } else { 0 },
            modtime: format_rfc3339(mtime.0, mtime.1),
            link_name,
            mode: u64::from(header.mode().unwrap_or(0) & 0o7777),
            uid: header.uid().unwrap_or(0),
            gid: header.gid().unwrap_or(0),
            user_name: header
                .username()
                .ok()
                .flatten()
                .unwrap_or_default()
                .to_owned(),
            group_name: header
                .groupname()
                .ok()
                .flatten()
                .unwrap_or_default()
                .to_owned(),
            dev_major: header.device_major().ok().flatten().map_or(0, u64::from),
            dev_minor: header.device_minor().ok().flatten().map_or(0, u64::from),
            xattrs,
            digest: (kind == "reg" && size == 0).then(|| Digest::sha256_of(&[]).to_string()),
            ..TocEntry::default()
        };
        entries.push(TarEntry {
            group_start: start,
            data_start,
            size,
            path,
            hardlink_target,
            toc,
        });
    }
    Ok(entries)
}

/// One member of a tar archive, as [`list_tar`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarMember {
    /// Normalized path: no leading `./` or `/`, no trailing `/`.
    pub path: String,
    /// TOC type name: `reg`, `dir`, `symlink`, `hardlink`, `char`, `block` or `fifo`.
    pub kind: &'static str,
    pub size: u64,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    /// Where the content starts in the archive file.
    pub data_start: u64,
    /// Symlink target as written, or the normalized hard-link target.
    pub link_target: Option<String>,
}

/// The members of an uncompressed tar archive in a file, in archive order, leaving out
/// an earlier conversion's TOC and landmarks (as [`write_chunked_layer`] does).
pub fn list_tar(tar: &File) -> Result<Vec<TarMember>, WriterError> {
    Ok(scan_tar(tar)?
        .into_iter()
        .map(|e| TarMember {
            link_target: match e.toc.kind {
                "symlink" | "hardlink" => Some(e.toc.link_name.clone()),
                _ => None,
            },
            kind: e.toc.kind,
            size: e.size,
            mode: e.toc.mode as u32,
            data_start: e.data_start,
            path: e.path,
        })
        .collect())
}

fn pax_mtime<R: io::Read>(entry: &mut tar::Entry<'_, R>) -> Option<(i64, u32)> {
    let extensions = entry.pax_extensions().ok()??;
    for ext in extensions.flatten() {
        if ext.key_bytes() == b"mtime" {
            let value = ext.value().ok()?;
            let (secs, frac) = value.split_once('.').unwrap_or((value, ""));
            let secs: i64 = secs.parse().ok()?;
            let digits: String = frac.chars().take(9).collect();
            let nanos = if digits.is_empty() {
                0
            } else {
                digits.parse::<u32>().ok()? * 10u32.pow(9 - digits.len() as u32)
            };
            return Some((secs, nanos));
        }
    }
    None
}

/// Go's `time.RFC3339Nano` in UTC (trailing zeros of the fraction dropped).
fn format_rfc3339(secs: i64, nanos: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut text = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    if nanos > 0 {
        let fraction = format!("{nanos:09}");
        text.push('.');
        text.push_str(fraction.trim_end_matches('0'));
    }
    text.push('Z');
    text
}

enum Landmark {
    Prefetch,
    NoPrefetch,
}

struct OutputOrder {
    /// Indexes into the scanned entries, in output order.
    entries: Vec<usize>,
    /// How many of `entries` precede the landmark.
    prefetch_count: usize,
    /// The files asked for, in output order.
    prefetched_files: Vec<usize>,
    landmark: Landmark,
}

impl OutputOrder {
    fn prefetched(&self, entries: &[TarEntry]) -> Vec<String> {
        self.prefetched_files
            .iter()
            .map(|&i| entries[i].path.clone())
            .collect()
    }
}

fn output_order(entries: &[TarEntry], prefetch: &PrefetchOrder) -> OutputOrder {
    let wanted = match prefetch {
        PrefetchOrder::Files(files) => files.as_slice(),
        PrefetchOrder::None => &[],
    };
    // The last entry of a path wins, as on extraction.
    let by_path: HashMap<&str, usize> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.path.as_str(), i))
        .collect();
    let mut occurrences: HashMap<&str, usize> = HashMap::new();
    for entry in entries {
        *occurrences.entry(entry.path.as_str()).or_default() += 1;
    }
    let mut placed = vec![false; entries.len()];
    let mut front = Vec::new();
    let mut prefetched_files = Vec::new();
    let mut seen = HashSet::new();
    for raw in wanted {
        let path = normalize(raw);
        if !seen.insert(path.clone()) {
            continue;
        }
        let Some(&id) = by_path.get(path.as_str()) else {
            continue;
        };
        // A hard link is prefetched through its target, which goes first.
        let linkable = entries[id].is_regular() || entries[id].hardlink_target.is_some();
        // Moving one of several entries of a path ahead of the others would change
        // which one extraction leaves behind.
        let repeated = occurrences.get(path.as_str()).is_some_and(|&n| n > 1);
        if !linkable || placed[id] || repeated {
            continue;
        }
        place_with_parents(id, entries, &by_path, &mut placed, &mut front);
        prefetched_files.push(id);
    }
    let landmark = if prefetched_files.is_empty() {
        Landmark::NoPrefetch
    } else {
        Landmark::Prefetch
    };
    let prefetch_count = front.len();
    let mut order = front;
    order.extend((0..entries.len()).filter(|&i| !placed[i]));
    OutputOrder {
        entries: order,
        prefetch_count,
        prefetched_files,
        landmark,
    }
}

/// Puts an entry in front, after its parent directories and (for a hard link) its
/// target, so extraction in the new order makes the same tree.
fn place_with_parents(
    id: usize,
    entries: &[TarEntry],
    by_path: &HashMap<&str, usize>,
    placed: &mut [bool],
    front: &mut Vec<usize>,
) {
    let path = &entries[id].path;
    let mut parents = Vec::new();
    let mut p = path.as_str();
    while let Some((parent, _)) = p.rsplit_once('/') {
        parents.push(parent);
        p = parent;
    }
    for parent in parents.into_iter().rev() {
        if let Some(&pid) = by_path.get(parent)
            && !placed[pid]
            && pid < id
        {
            placed[pid] = true;
            front.push(pid);
        }
    }
    if let Some(target) = &entries[id].hardlink_target
        && let Some(&tid) = by_path.get(target.as_str())
        && !placed[tid]
        && tid < id
    {
        place_with_parents(tid, entries, by_path, placed, front);
    }
    placed[id] = true;
    front.push(id);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_go() {
        assert_eq!(format_rfc3339(1_700_000_000, 0), "2023-11-14T22:13:20Z");
        assert_eq!(format_rfc3339(0, 500_000_000), "1970-01-01T00:00:00.5Z");
        assert_eq!(format_rfc3339(-1, 0), "1969-12-31T23:59:59Z");
        assert_eq!(format_rfc3339(951_782_400, 0), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn footer_is_what_the_reader_expects() {
        let footer = estargz_footer(0x11db);
        assert_eq!(footer.len(), 51);
        let parsed = super::super::parse_footer(&footer, 0x11db + 100 + 51).unwrap();
        assert_eq!(parsed.toc_offset.0, 0x11db);
    }

    fn sample_tar() -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut b = tar::Builder::new(file.reopen().unwrap());
        let mut add = |name: &str, kind: tar::EntryType, data: &[u8], link: Option<&str>| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            h.set_mtime(1_700_000_000);
            if let Some(link) = link {
                h.set_link_name(link).unwrap();
            }
            b.append_data(&mut h, name, data).unwrap();
        };
        add("./etc/", tar::EntryType::Directory, b"", None);
        add("./etc/big", tar::EntryType::Regular, &vec![7u8; 2500], None);
        add("./etc/small", tar::EntryType::Regular, b"hello", None);
        add("./etc/empty", tar::EntryType::Regular, b"", None);
        add("./etc/hard", tar::EntryType::Link, b"", Some("./etc/small"));
        add("./etc/sym", tar::EntryType::Symlink, b"", Some("small"));
        add("./bin/", tar::EntryType::Directory, b"", None);
        add("./bin/sh", tar::EntryType::Regular, b"#!", None);
        add(".prefetch.landmark", tar::EntryType::Regular, b"\x0f", None);
        b.into_inner().unwrap().flush().unwrap();
        file
    }

    fn write(format: LayerFormat, prefetch: &PrefetchOrder) -> (Vec<u8>, WrittenLayer) {
        let tar = sample_tar();
        let mut options = WriterOptions::new(format);
        options.chunk_size = 1000;
        options.batch_bytes = 600;
        options.threads = 2;
        let mut out = Vec::new();
        let written =
            write_chunked_layer(tar.as_file(), &mut out, prefetch, &options, &|_| {}).unwrap();
        (out, written)
    }

    fn decompressed(format: LayerFormat, blob: &[u8]) -> Vec<u8> {
        let mut all = Vec::new();
        match format {
            LayerFormat::Estargz => {
                io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(blob), &mut all)
            }
            LayerFormat::ZstdChunked => io::Read::read_to_end(
                &mut zstd::stream::read::Decoder::new(blob).unwrap(),
                &mut all,
            ),
        }
        .unwrap();
        all
    }

    #[test]
    fn written_layers_read_back() {
        for format in [LayerFormat::Estargz, LayerFormat::ZstdChunked] {
            let prefetch = PrefetchOrder::Files(vec!["/bin/sh".into(), "/etc/hard".into()]);
            let (blob, written) = write(format, &prefetch);
            assert_eq!(written.size, blob.len() as u64);
            assert_eq!(written.digest, Digest::sha256_of(&blob));
            let tail = &blob[blob.len() - super::super::MAX_FOOTER_SIZE as usize..];
            let footer = super::super::parse_footer(tail, blob.len() as u64).unwrap();
            assert_eq!(footer.format, format);
            assert_eq!(footer.toc_offset.0, written.toc_offset);
            let toc = super::super::parse_toc(
                &footer,
                &blob[footer.toc_range().start as usize..footer.toc_range().end as usize],
                Some(&written.toc_digest),
                blob.len() as u64,
            )
            .unwrap();
            let index = toc.index;
            let mut names: Vec<&str> = index.entries.iter().map(|e| e.name.as_str()).collect();
            names.sort_unstable();
            assert_eq!(
                names,
                [
                    "",
                    "bin",
                    "bin/sh",
                    "etc",
                    "etc/big",
                    "etc/empty",
                    "etc/hard",
                    "etc/small",
                    "etc/sym"
                ],
                "{format}"
            );
            let prefetched: Vec<&str> = index
                .prefetch
                .iter()
                .map(|&id| index.entry(id).name.as_str())
                .collect();
            assert_eq!(prefetched, ["bin/sh", "etc/small"]);
            assert_eq!(written.prefetched, ["bin/sh", "etc/hard"]);
            let big = index.entries.iter().find(|e| e.name == "etc/big").unwrap();
            let super::super::EntryKind::Regular { size, chunks } = &big.kind else {
                panic!("etc/big is not regular");
            };
            assert_eq!((*size, chunks.len()), (2500, 3));
            let mut data = Vec::new();
            for chunk in chunks {
                let start = chunk.compressed_offset.0 as usize;
                let end = start + chunk.compressed_size as usize;
                super::super::decompress_chunk(format, &blob[start..end], chunk, &mut data)
                    .unwrap();
            }
            assert_eq!(data, vec![7u8; 2500]);
            // The whole blob is one tar stream with every input entry.
            let all = decompressed(format, &blob);
            assert_eq!(all.len() as u64, written.uncompressed_size);
            assert_eq!(Digest::sha256_of(&all), written.diff_id);
            let mut archive = tar::Archive::new(&all[..]);
            let listed: Vec<String> = archive
                .entries()
                .unwrap()
                .map(|e| e.unwrap().path().unwrap().display().to_string())
                .collect();
            let toc_entry = (format == LayerFormat::Estargz).then_some(TOC_TAR_NAME);
            let mut expected = vec![
                "bin/",
                "bin/sh",
                "etc/",
                "etc/small",
                "etc/hard",
                ".prefetch.landmark",
                "etc/big",
                "etc/empty",
                "etc/sym",
            ];
            expected.extend(toc_entry);
            assert_eq!(listed, expected, "{format}");
        }
    }

    #[test]
    fn no_prefetch_and_determinism() {
        for format in [LayerFormat::Estargz, LayerFormat::ZstdChunked] {
            let (a, wa) = write(format, &PrefetchOrder::None);
            let (b, wb) = write(format, &PrefetchOrder::None);
            assert_eq!(a, b);
            assert_eq!(wa, wb);
            let tail = &a[a.len() - super::super::MAX_FOOTER_SIZE as usize..];
            let footer = super::super::parse_footer(tail, a.len() as u64).unwrap();
            let range = footer.toc_range();
            let toc = super::super::parse_toc(
                &footer,
                &a[range.start as usize..range.end as usize],
                None,
                a.len() as u64,
            )
            .unwrap();
            assert!(toc.index.no_prefetch);
            assert!(toc.index.prefetch.is_empty());
            // Files not in the layer give no prefetch landmark either.
            let (_, missing) = write(format, &PrefetchOrder::Files(vec!["/nope".into()]));
            assert!(missing.prefetched.is_empty());
        }
    }
}

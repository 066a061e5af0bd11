//! The table of contents (`stargz.index.json`): decompression, JSON decoding and
//! validation into a [`LayerIndex`].
//!
//! TOC JSON as stargz-snapshotter writes it: `{"version": 1, "entries": [...]}`, each
//! entry with `name`, `type` (`dir`, `reg`, `symlink`, `hardlink`, `char`, `block`,
//! `fifo`, or `chunk` for the second and later chunks of a regular file, which follow
//! it), `size`, `modtime` (RFC 3339), `linkName`, `mode`, `uid`, `gid`, `userName`,
//! `groupName`, `devMajor`, `devMinor`, `xattrs` (base64 values), `digest` (whole
//! file), `offset` (compressed member start), `innerOffset`, `chunkOffset`,
//! `chunkSize` (0 = to the end of the file) and `chunkDigest`. Zero values are
//! omitted.
//!
//! The TOC digest (annotation [`super::TOC_DIGEST_ANNOTATION`]) is, for both eStargz
//! and zstd:chunked, the sha256 of the uncompressed TOC JSON: that is what ctr-remote
//! records and what stargz-snapshotter verifies.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::io::Read;

use base64::Engine as _;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::digest::Digest;

use super::{
    Chunk, CompressedOffset, Entry, EntryId, EntryKind, FileOffset, Footer, FormatError,
    LayerFormat, LayerIndex, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME, rfc3339,
};

/// Bounds on what an untrusted TOC may ask of us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TocLimits {
    /// Entries in the index, including synthesized parent directories.
    pub max_entries: usize,
    /// Bytes of uncompressed TOC JSON (guards the TOC decompression against bombs).
    pub max_toc_json_bytes: u64,
    /// Uncompressed bytes of one chunk, and of an `innerOffset` to skip: what
    /// [`super::decompress_chunk`] holds in memory or inflates for one chunk.
    pub max_chunk_size: u64,
    /// Bytes of an entry name, a hardlink target or a symlink target (`PATH_MAX`).
    pub max_path_bytes: usize,
    /// Extended attributes of one entry.
    pub max_xattrs_per_entry: usize,
    /// Bytes of one extended attribute value (`XATTR_SIZE_MAX`).
    pub max_xattr_value_bytes: usize,
}

impl Default for TocLimits {
    fn default() -> Self {
        Self {
            max_entries: 2_000_000,
            max_toc_json_bytes: 256 << 20,
            max_chunk_size: 64 << 20,
            max_path_bytes: 4096,
            max_xattrs_per_entry: 1024,
            max_xattr_value_bytes: 64 << 10,
        }
    }
}

/// A validated TOC and what identifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedToc {
    pub index: LayerIndex,
    /// sha256 of the uncompressed TOC JSON: the value of the layer's
    /// [`super::TOC_DIGEST_ANNOTATION`].
    pub toc_digest: Digest,
    /// Bytes of uncompressed TOC JSON.
    pub toc_json_size: u64,
}

/// Decompresses, verifies and validates a layer's TOC with the default [`TocLimits`].
///
/// `toc_bytes` are the blob bytes `footer.toc_range()`. When `expected_toc_digest`
/// (the layer's [`super::TOC_DIGEST_ANNOTATION`]) is given, the TOC JSON must hash to
/// it. Errors name the offending entry; the caller adds which layer it was.
pub fn parse_toc(
    footer: &Footer,
    toc_bytes: &[u8],
    expected_toc_digest: Option<&Digest>,
    blob_size: u64,
) -> Result<ParsedToc, FormatError> {
    parse_toc_with_limits(
        footer,
        toc_bytes,
        expected_toc_digest,
        blob_size,
        &TocLimits::default(),
    )
}

/// [`parse_toc`] with explicit limits.
pub fn parse_toc_with_limits(
    footer: &Footer,
    toc_bytes: &[u8],
    expected_toc_digest: Option<&Digest>,
    blob_size: u64,
    limits: &TocLimits,
) -> Result<ParsedToc, FormatError> {
    let unreadable = |reason: String| FormatError::TocUnreadable {
        format: footer.format,
        offset: footer.toc_offset,
        reason,
    };
    if toc_bytes.len() as u64 != footer.toc_size {
        return Err(unreadable(format!(
            "got {} bytes, the footer says the TOC is {} bytes",
            toc_bytes.len(),
            footer.toc_size
        )));
    }
    if footer
        .toc_offset
        .0
        .checked_add(footer.toc_size)
        .is_none_or(|end| end > blob_size)
    {
        return Err(unreadable(format!(
            "the TOC range {:?} lies outside the {blob_size}-byte blob",
            footer.toc_range()
        )));
    }
    let json = decompress_toc(footer, toc_bytes, limits)?;
    let toc_digest = Digest::sha256_of(&json);
    if let Some(expected) = expected_toc_digest
        && *expected != toc_digest
    {
        return Err(FormatError::TocDigestMismatch {
            expected: expected.clone(),
            actual: toc_digest,
        });
    }
    let index = parse_toc_json(&json, footer.format, footer.toc_offset, blob_size, limits)?;
    Ok(ParsedToc {
        index,
        toc_digest,
        toc_json_size: json.len() as u64,
    })
}

/// The uncompressed TOC JSON of a blob, at most `limits.max_toc_json_bytes` long.
pub fn decompress_toc(
    footer: &Footer,
    toc_bytes: &[u8],
    limits: &TocLimits,
) -> Result<Vec<u8>, FormatError> {
    let unreadable = |reason: String| FormatError::TocUnreadable {
        format: footer.format,
        offset: footer.toc_offset,
        reason,
    };
    let limit = limits.max_toc_json_bytes;
    let too_large = FormatError::TocTooLarge { limit };
    let read_bounded = |reader: &mut dyn Read, size_hint: u64| {
        let mut json = Vec::with_capacity(size_hint.min(limit).min(64 << 20) as usize);
        reader.take(limit + 1).read_to_end(&mut json).map(|_| json)
    };
    let json = match footer.format {
        LayerFormat::Estargz => {
            // One gzip member holding a tar with the single entry stargz.index.json.
            let mut decoder = flate2::read::GzDecoder::new(toc_bytes);
            let mut header = [0u8; TAR_BLOCK];
            decoder
                .read_exact(&mut header)
                .map_err(|e| unreadable(format!("reading the tar header: {e}")))?;
            let size = toc_tar_entry_size(&header).map_err(unreadable)?;
            if size > limit {
                return Err(too_large);
            }
            let json = read_bounded(&mut decoder.take(size), size)
                .map_err(|e| unreadable(format!("decompressing: {e}")))?;
            if json.len() as u64 != size {
                return Err(unreadable(format!(
                    "the tar header says {size} bytes of TOC JSON but the stream holds {}",
                    json.len()
                )));
            }
            json
        }
        LayerFormat::ZstdChunked => {
            let expected = footer.toc_json_size.unwrap_or(0);
            if expected > limit {
                return Err(too_large);
            }
            let mut decoder = zstd::stream::read::Decoder::with_buffer(toc_bytes)
                .map_err(|e| unreadable(format!("zstd decoder: {e}")))?;
            let json = read_bounded(&mut decoder, expected)
                .map_err(|e| unreadable(format!("decompressing: {e}")))?;
            if json.len() as u64 > limit {
                return Err(too_large);
            }
            if let Some(expected) = footer.toc_json_size
                && json.len() as u64 != expected
            {
                return Err(unreadable(format!(
                    "the footer says {expected} bytes of TOC JSON but it holds {}",
                    json.len()
                )));
            }
            json
        }
    };
    if json.len() as u64 > limit {
        return Err(too_large);
    }
    Ok(json)
}

const TAR_BLOCK: usize = 512;

/// Checks the tar header that precedes an eStargz TOC and returns its data size.
///
/// stargz writers emit a plain ustar header for a regular file named
/// `stargz.index.json`; anything else (PAX or GNU extension records in particular,
/// whose size would be attacker-chosen) is refused rather than interpreted.
fn toc_tar_entry_size(header: &[u8; TAR_BLOCK]) -> Result<u64, String> {
    let stored_checksum = parse_octal(&header[148..156]).ok_or("unreadable tar header checksum")?;
    let checksum: u64 = header
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                u64::from(b' ')
            } else {
                u64::from(b)
            }
        })
        .sum();
    if checksum != stored_checksum {
        return Err("tar header checksum mismatch".into());
    }
    let name_len = header[..100].iter().position(|&b| b == 0).unwrap_or(100);
    let prefix_len = header[345..500].iter().position(|&b| b == 0).unwrap_or(155);
    if &header[..name_len] != TOC_TAR_NAME.as_bytes() || prefix_len != 0 {
        return Err(format!(
            "the tar entry is {:?}, not {TOC_TAR_NAME}",
            String::from_utf8_lossy(&header[..name_len])
        ));
    }
    if !matches!(header[156], b'0' | 0) {
        return Err(format!(
            "the {TOC_TAR_NAME} tar entry has type {:?}, not a regular file",
            char::from(header[156])
        ));
    }
    parse_octal(&header[124..136]).ok_or_else(|| "unreadable tar size field".into())
}

/// A tar numeric field: octal digits, optionally space-padded, NUL/space terminated.
fn parse_octal(field: &[u8]) -> Option<u64> {
    let text = field
        .iter()
        .skip_while(|&&b| b == b' ')
        .take_while(|&&b| b != 0 && b != b' ');
    let mut value = 0u64;
    let mut digits = 0;
    for &b in text {
        if !(b'0'..=b'7').contains(&b) {
            return None;
        }
        value = value.checked_mul(8)?.checked_add(u64::from(b - b'0'))?;
        digits += 1;
    }
    (digits > 0).then_some(value)
}

/// Validates uncompressed TOC JSON into a [`LayerIndex`] for a blob of `blob_size`
/// bytes whose TOC starts at `toc_offset`.
pub fn parse_toc_json(
    json: &[u8],
    format: LayerFormat,
    toc_offset: CompressedOffset,
    blob_size: u64,
    limits: &TocLimits,
) -> Result<LayerIndex, FormatError> {
    if toc_offset.0 >= blob_size {
        return Err(FormatError::TocUnreadable {
            format,
            offset: toc_offset,
            reason: format!("TOC offset is not inside the {blob_size}-byte blob"),
        });
    }
    // ctr-remote's tab-indented entries take 300-400 bytes each: reserving for that
    // many avoids rehashing the name map while it grows, and a smaller guess for
    // compact JSON costs at most one growth.
    let expected_entries = (json.len() / 320).min(limits.max_entries);
    let mut builder = IndexBuilder::new(toc_offset, limits, expected_entries);
    let mut failure = None;
    let mut deserializer = serde_json::Deserializer::from_slice(json);
    let decoded = TocSeed {
        builder: &mut builder,
        failure: &mut failure,
    }
    .deserialize(&mut deserializer)
    .and_then(|version| deserializer.end().map(|()| version));
    if let Some(failure) = failure {
        return Err(failure);
    }
    let version = decoded.map_err(|e| FormatError::TocJson {
        reason: e.to_string(),
    })?;
    if version != 1 {
        return Err(FormatError::TocVersion { version });
    }
    builder.close_file()?;
    Ok(builder.finish(format, blob_size))
}

/// Text that borrows from the JSON when it has no escapes.
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(TextVisitor)
    }
}

/// `xattrs`: a JSON object of base64 values, kept in document order.
#[derive(Default)]
struct RawXattrs<'a>(Vec<(Text<'a>, Text<'a>)>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for RawXattrs<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct XattrVisitor;
        impl<'de> Visitor<'de> for XattrVisitor {
            type Value = RawXattrs<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of base64 strings")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(RawXattrs::default())
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut pairs = Vec::new();
                while let Some(pair) = map.next_entry::<Text, Text>()? {
                    pairs.push(pair);
                }
                Ok(RawXattrs(pairs))
            }
        }
        d.deserialize_any(XattrVisitor)
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEntry<'a> {
    #[serde(borrow)]
    name: Text<'a>,
    #[serde(borrow, rename = "type")]
    kind: Text<'a>,
    #[serde(default)]
    size: i64,
    #[serde(default, borrow, rename = "modtime")]
    mod_time: Option<Text<'a>>,
    #[serde(default, borrow)]
    link_name: Option<Text<'a>>,
    #[serde(default)]
    mode: i64,
    #[serde(default)]
    uid: i64,
    #[serde(default)]
    gid: i64,
    #[serde(default)]
    offset: i64,
    #[serde(default)]
    inner_offset: i64,
    #[serde(default)]
    dev_major: i64,
    #[serde(default)]
    dev_minor: i64,
    #[serde(default, borrow)]
    xattrs: RawXattrs<'a>,
    #[serde(default, borrow)]
    digest: Option<Text<'a>>,
    #[serde(default)]
    chunk_offset: i64,
    #[serde(default)]
    chunk_size: i64,
    #[serde(default, borrow)]
    chunk_digest: Option<Text<'a>>,
}

/// Decodes the top-level object and hands each entry to the builder as soon as it
/// is decoded, so the TOC is never held in memory twice. The value is the version.
struct TocSeed<'b, 'r, 'l> {
    builder: &'b mut IndexBuilder<'r, 'l>,
    /// Set when decoding stopped because of a validation error rather than bad JSON.
    failure: &'b mut Option<FormatError>,
}

impl<'de, 'b, 'l> DeserializeSeed<'de> for TocSeed<'b, 'de, 'l> {
    type Value = i64;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, 'b, 'l> Visitor<'de> for TocSeed<'b, 'de, 'l> {
    type Value = i64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a TOC object with \"version\" and \"entries\"")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut version = None;
        let mut seen_entries = false;
        while let Some(key) = map.next_key::<Text>()? {
            match key.0.as_ref() {
                "version" if version.is_none() => {
                    let found = map.next_value::<i64>()?;
                    if found != 1 {
                        // Entries of an unknown version mean something else: stop.
                        *self.failure = Some(FormatError::TocVersion { version: found });
                        return Err(de::Error::custom("unsupported version"));
                    }
                    version = Some(found);
                }
                "entries" if !seen_entries => {
                    seen_entries = true;
                    map.next_value_seed(EntriesSeed {
                        builder: &mut *self.builder,
                        failure: &mut *self.failure,
                    })?;
                }
                "version" | "entries" => {
                    return Err(de::Error::custom(format!("duplicate field `{}`", key.0)));
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if !seen_entries {
            return Err(de::Error::missing_field("entries"));
        }
        version.ok_or_else(|| de::Error::missing_field("version"))
    }
}

struct EntriesSeed<'b, 'r, 'l> {
    builder: &'b mut IndexBuilder<'r, 'l>,
    failure: &'b mut Option<FormatError>,
}

impl<'de, 'b, 'l> DeserializeSeed<'de> for EntriesSeed<'b, 'de, 'l> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, 'b, 'l> Visitor<'de> for EntriesSeed<'b, 'de, 'l> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of TOC entries")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let max_entries = self.builder.limits.max_entries;
        let mut position = 0;
        while let Some(entry) = seq.next_element::<RawEntry<'de>>()? {
            let result = if position == max_entries {
                Err(FormatError::TooManyEntries { limit: max_entries })
            } else {
                self.builder.add_toc_entry(position, entry)
            };
            if let Err(failure) = result {
                *self.failure = Some(failure);
                return Err(de::Error::custom("invalid TOC entry"));
            }
            position += 1;
        }
        Ok(())
    }
}

/// A regular file whose chunks are still being read from the TOC.
struct OpenFile<'r> {
    /// `None` for landmarks and other files left out of the index.
    id: Option<EntryId>,
    /// Position and name in the TOC of the file's `reg` entry, for error messages.
    toc_position: usize,
    toc_name: Cow<'r, str>,
    name_end: FileOffset,
    next_chunk: FileOffset,
}

struct IndexBuilder<'r, 'l> {
    limits: &'l TocLimits,
    toc_offset: CompressedOffset,
    entries: Vec<Entry>,
    /// Whether each entry came from the TOC (as opposed to a synthesized parent).
    from_toc: Vec<bool>,
    by_name: HashMap<Cow<'r, str>, EntryId>,
    /// Every member start of file data, in blob order, landmarks included.
    boundaries: Vec<u64>,
    /// The last chunk seen in blob order: (offset, end of its data in the member).
    last_chunk: Option<(u64, u64)>,
    open_file: Option<OpenFile<'r>>,
    /// Number of index entries that precede `.prefetch.landmark`.
    prefetch_cutoff: Option<usize>,
    no_prefetch: bool,
}

/// What an entry is called in error messages about its kind.
fn kind_word(kind: &EntryKind) -> &'static str {
    match kind {
        EntryKind::Directory => "directory",
        EntryKind::Regular { .. } => "regular file",
        EntryKind::Symlink { .. } => "symlink",
        EntryKind::Hardlink { .. } => "hardlink",
        EntryKind::CharDevice { .. } => "character device",
        EntryKind::BlockDevice { .. } => "block device",
        EntryKind::Fifo => "fifo",
    }
}

fn synthesized_dir(name: String) -> Entry {
    Entry {
        name,
        kind: EntryKind::Directory,
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime_secs: 0,
        mtime_nanos: 0,
        xattrs: Vec::new(),
    }
}

fn non_negative(value: i64, field: &str) -> Result<u64, String> {
    u64::try_from(value).map_err(|_| format!("negative {field} {value}"))
}

fn id32(value: i64, field: &str) -> Result<u32, String> {
    u32::try_from(value).map_err(|_| format!("{field} {value} is not a 32-bit unsigned number"))
}

impl<'r, 'l> IndexBuilder<'r, 'l> {
    fn new(toc_offset: CompressedOffset, limits: &'l TocLimits, expected_entries: usize) -> Self {
        let capacity = expected_entries.saturating_add(1);
        let mut builder = Self {
            limits,
            toc_offset,
            entries: Vec::with_capacity(capacity),
            from_toc: Vec::with_capacity(capacity),
            // Names come from the TOC: the default keyed hasher keeps crafted
            // collisions from turning inserts quadratic.
            by_name: HashMap::with_capacity(capacity),
            boundaries: Vec::new(),
            last_chunk: None,
            open_file: None,
            prefetch_cutoff: None,
            no_prefetch: false,
        };
        builder.entries.push(synthesized_dir(String::new()));
        builder.from_toc.push(false);
        builder.by_name.insert(Cow::Borrowed(""), EntryId(0));
        builder
    }

    /// Checks and normalizes a path: relative, no `..`, no NUL; `.` and empty
    /// components (`./a`, `a//b`, `dir/`) are dropped as tar readers do.
    fn normalize(&self, raw: Cow<'r, str>, what: &str) -> Result<Cow<'r, str>, String> {
        if raw.len() > self.limits.max_path_bytes {
            return Err(format!(
                "{what} is {} bytes long, more than the limit of {}",
                raw.len(),
                self.limits.max_path_bytes
            ));
        }
        if raw.contains('\0') {
            return Err(format!("{what} contains a NUL byte"));
        }
        if raw.starts_with('/') {
            return Err(format!("{what} is absolute"));
        }
        let mut clean = true;
        for component in raw.split('/') {
            match component {
                ".." => return Err(format!("{what} has a `..` component")),
                "" | "." => clean = false,
                _ if component.len() > 255 => {
                    return Err(format!("{what} has a component longer than 255 bytes"));
                }
                _ => {}
            }
        }
        if clean {
            return Ok(raw);
        }
        // The common unclean spellings are `dir/` and `./name`: borrow a subslice.
        if let Cow::Borrowed(text) = raw {
            let trimmed = text.trim_start_matches("./").trim_end_matches('/');
            if trimmed.split('/').all(|c| !c.is_empty() && c != ".") {
                return Ok(Cow::Borrowed(trimmed));
            }
        }
        let parts: Vec<&str> = raw
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .collect();
        Ok(Cow::Owned(parts.join("/")))
    }

    /// The directory that holds `name`, creating missing ancestors.
    fn parent_of(&mut self, name: &str) -> Result<EntryId, String> {
        let Some((parent, _)) = name.rsplit_once('/') else {
            return Ok(EntryId(0));
        };
        // Walk up to the nearest existing ancestor, then create the missing ones
        // top-down so parents precede children.
        let mut missing = Vec::new();
        let mut current = parent;
        let existing = loop {
            if let Some(&id) = self.by_name.get(current) {
                break id;
            }
            missing.push(current);
            match current.rsplit_once('/') {
                Some((up, _)) => current = up,
                None => break EntryId(0),
            }
        };
        let existing_entry = &self.entries[existing.0 as usize];
        if existing_entry.kind != EntryKind::Directory {
            return Err(format!(
                "parent {:?} is a {}, not a directory",
                existing_entry.name,
                kind_word(&existing_entry.kind)
            ));
        }
        let mut id = existing;
        for dir in missing.into_iter().rev() {
            id = self.push(synthesized_dir(dir.to_owned()), false)?;
            self.by_name.insert(Cow::Owned(dir.to_owned()), id);
        }
        Ok(id)
    }

    fn push(&mut self, entry: Entry, from_toc: bool) -> Result<EntryId, String> {
        if self.entries.len() >= self.limits.max_entries.min(u32::MAX as usize) {
            return Err(format!(
                "the index would exceed the limit of {} entries",
                self.limits.max_entries
            ));
        }
        let id = EntryId(self.entries.len() as u32);
        self.entries.push(entry);
        self.from_toc.push(from_toc);
        Ok(id)
    }

    /// Validates the TOC entry at `position` into the index.
    fn add_toc_entry(&mut self, position: usize, raw: RawEntry<'r>) -> Result<(), FormatError> {
        if raw.kind.0 != "chunk" {
            self.close_file()?;
        }
        let toc_name = raw.name.0.clone();
        self.add(position, raw)
            .map_err(|reason| FormatError::BadEntry {
                index: position,
                name: truncate(&toc_name),
                reason,
            })
    }

    fn add(&mut self, position: usize, mut raw: RawEntry<'r>) -> Result<(), String> {
        if raw.kind.0 == "chunk" {
            return self.add_chunk(&raw);
        }
        let toc_name = std::mem::take(&mut raw.name.0);
        let kind = raw.kind.0.as_ref();
        let name = self.normalize(toc_name.clone(), "name")?;
        if name.is_empty() && kind != "dir" {
            return Err(format!("a {kind} entry names the root directory"));
        }
        let excluded = !name.contains('/')
            && kind == "reg"
            && [PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK, TOC_TAR_NAME].contains(&name.as_ref());

        let mut entry = Entry {
            name: String::new(),
            kind: EntryKind::Fifo,
            mode: (non_negative(raw.mode, "mode")? & 0o7777) as u32,
            uid: id32(raw.uid, "uid")?,
            gid: id32(raw.gid, "gid")?,
            mtime_secs: 0,
            mtime_nanos: 0,
            xattrs: Vec::new(),
        };
        // Go writes no modtime for the epoch; an empty one means the same to Go readers.
        if let Some(text) = raw.mod_time.as_ref().filter(|t| !t.0.is_empty()) {
            (entry.mtime_secs, entry.mtime_nanos) = rfc3339::parse(&text.0)
                .ok_or_else(|| format!("modtime {:?} is not RFC 3339", truncate(&text.0)))?;
        }
        entry.xattrs = self.xattrs(&raw.xattrs)?;
        entry.kind = match kind {
            "dir" => EntryKind::Directory,
            "reg" => {
                let size = non_negative(raw.size, "size")?;
                EntryKind::Regular {
                    size,
                    chunks: Vec::new(),
                }
            }
            "symlink" => {
                let target = raw
                    .link_name
                    .as_ref()
                    .map(|t| t.0.as_ref())
                    .unwrap_or_default();
                if target.is_empty() {
                    return Err("symlink without a linkName".into());
                }
                if target.len() > self.limits.max_path_bytes || target.contains('\0') {
                    return Err("symlink target is too long or contains NUL".into());
                }
                EntryKind::Symlink {
                    target: target.to_owned(),
                }
            }
            "hardlink" => {
                let raw_target = raw.link_name.take().map(|t| t.0).unwrap_or_default();
                let target_name = self.normalize(raw_target, "hardlink target")?;
                let target = self.hardlink_target(&target_name)?;
                EntryKind::Hardlink { target }
            }
            "char" => EntryKind::CharDevice {
                major: id32(raw.dev_major, "devMajor")?,
                minor: id32(raw.dev_minor, "devMinor")?,
            },
            "block" => EntryKind::BlockDevice {
                major: id32(raw.dev_major, "devMajor")?,
                minor: id32(raw.dev_minor, "devMinor")?,
            },
            "fifo" => EntryKind::Fifo,
            other => return Err(format!("unknown type {:?}", truncate(other))),
        };

        if excluded {
            match name.as_ref() {
                PREFETCH_LANDMARK => {
                    self.prefetch_cutoff.get_or_insert(self.entries.len());
                }
                NO_PREFETCH_LANDMARK => self.no_prefetch = true,
                _ => {}
            }
            return self.open_regular(&raw, None, position, toc_name);
        }

        let id = if let Some(&existing) = self.by_name.get(name.as_ref()) {
            let slot = existing.0 as usize;
            if self.from_toc[slot] {
                return Err(format!(
                    "duplicate name (first at index entry {})",
                    existing.0
                ));
            }
            // A directory created for an earlier child (or the root) now gets its
            // own metadata; it stays where it is, before its children.
            if entry.kind != EntryKind::Directory {
                return Err(format!(
                    "earlier entries use it as a directory but it is a {}",
                    kind_word(&entry.kind)
                ));
            }
            entry.name = std::mem::take(&mut self.entries[slot].name);
            self.entries[slot] = entry;
            self.from_toc[slot] = true;
            existing
        } else {
            self.parent_of(&name)?;
            entry.name = name.as_ref().to_owned();
            let id = self.push(entry, true)?;
            self.by_name.insert(name, id);
            id
        };
        if kind == "reg" {
            self.open_regular(&raw, Some(id), position, toc_name)?;
        }
        Ok(())
    }

    fn xattrs(&self, raw: &RawXattrs<'_>) -> Result<Vec<(String, Vec<u8>)>, String> {
        if raw.0.len() > self.limits.max_xattrs_per_entry {
            return Err(format!(
                "{} xattrs, more than the limit of {}",
                raw.0.len(),
                self.limits.max_xattrs_per_entry
            ));
        }
        let mut xattrs = Vec::with_capacity(raw.0.len());
        for (key, value) in &raw.0 {
            let key = key.0.as_ref();
            if key.is_empty() || key.len() > 255 || key.contains('\0') {
                return Err(format!("invalid xattr name {:?}", truncate(key)));
            }
            let value = base64::engine::general_purpose::STANDARD
                .decode(value.0.as_bytes())
                .map_err(|e| format!("xattr {key:?} is not base64: {e}"))?;
            if value.len() > self.limits.max_xattr_value_bytes {
                return Err(format!("xattr {key:?} value is {} bytes", value.len()));
            }
            xattrs.push((key.to_owned(), value));
        }
        Ok(xattrs)
    }

    fn hardlink_target(&self, target_name: &str) -> Result<EntryId, String> {
        if target_name.is_empty() {
            return Err("hardlink without a linkName".into());
        }
        let Some(&target) = self.by_name.get(target_name) else {
            return Err(format!(
                "hardlink target {:?} is not an earlier entry",
                truncate(target_name)
            ));
        };
        let entry = &self.entries[target.0 as usize];
        match entry.kind {
            EntryKind::Directory => Err(format!(
                "hardlink target {:?} is a directory",
                truncate(target_name)
            )),
            // Links to links point at the file itself.
            EntryKind::Hardlink { target } => Ok(target),
            _ => Ok(target),
        }
    }

    fn open_regular(
        &mut self,
        raw: &RawEntry<'_>,
        id: Option<EntryId>,
        toc_position: usize,
        toc_name: Cow<'r, str>,
    ) -> Result<(), String> {
        let size = non_negative(raw.size, "size")?;
        self.open_file = Some(OpenFile {
            id,
            toc_position,
            toc_name,
            name_end: FileOffset(size),
            next_chunk: FileOffset(0),
        });
        if size > 0 {
            self.add_chunk_data(raw)?;
        }
        Ok(())
    }

    fn add_chunk(&mut self, raw: &RawEntry<'_>) -> Result<(), String> {
        let Some(open) = &self.open_file else {
            return Err("chunk entry does not follow a regular file".into());
        };
        if open.next_chunk == open.name_end {
            return Err("chunk entry after the file's data is complete".into());
        }
        // Readers go by position; a name, when given, must still be the file's.
        if let Some(id) = open.id {
            let file_name = &self.entries[id.0 as usize].name;
            let name = raw.name.0.as_ref();
            if !name.is_empty() && name != open.toc_name && name != file_name {
                return Err(format!(
                    "chunk entry belongs to {file_name:?}, not this name"
                ));
            }
        }
        self.add_chunk_data(raw)
    }

    fn add_chunk_data(&mut self, raw: &RawEntry<'_>) -> Result<(), String> {
        let open = self.open_file.as_ref().expect("caller opened a file");
        let file_size = open.name_end.0;
        let chunk_offset = non_negative(raw.chunk_offset, "chunkOffset")?;
        if chunk_offset != open.next_chunk.0 {
            return Err(format!(
                "chunk at file offset {chunk_offset}, but the previous chunk ends at {} \
                 (chunks must be contiguous and in order)",
                open.next_chunk.0
            ));
        }
        let remaining = file_size - chunk_offset;
        let size = match non_negative(raw.chunk_size, "chunkSize")? {
            0 => remaining,
            explicit if explicit > remaining => {
                return Err(format!(
                    "chunk of {explicit} bytes at file offset {chunk_offset} runs past the \
                     {file_size}-byte file"
                ));
            }
            explicit => explicit,
        };
        if size > self.limits.max_chunk_size {
            return Err(format!(
                "chunk of {size} bytes is larger than the limit of {}",
                self.limits.max_chunk_size
            ));
        }
        let offset = non_negative(raw.offset, "offset")?;
        if offset >= self.toc_offset.0 {
            return Err(format!(
                "chunk data offset {offset} is not before the TOC at {}",
                self.toc_offset.0
            ));
        }
        let inner_offset = non_negative(raw.inner_offset, "innerOffset")?;
        if inner_offset > self.limits.max_chunk_size {
            return Err(format!(
                "innerOffset {inner_offset} is larger than the limit of {}",
                self.limits.max_chunk_size
            ));
        }
        if let Some((last_offset, last_end)) = self.last_chunk
            && (offset < last_offset || (offset == last_offset && inner_offset < last_end))
        {
            return Err(format!(
                "chunk at blob offset {offset} (inner offset {inner_offset}) overlaps or \
                 precedes the previous chunk at blob offset {last_offset}"
            ));
        }
        let digest_text = match (&raw.chunk_digest, &raw.digest) {
            (Some(chunk_digest), _) => chunk_digest,
            // Single-chunk files: the whole-file digest is the chunk's digest.
            (None, Some(file_digest)) if size == file_size => file_digest,
            _ => {
                return Err(format!(
                    "chunk at file offset {chunk_offset} has no chunkDigest"
                ));
            }
        };
        let digest: Digest = digest_text
            .0
            .parse()
            .map_err(|e| format!("chunk at file offset {chunk_offset}: {e}"))?;

        self.last_chunk = Some((offset, inner_offset + size));
        if self.boundaries.last() != Some(&offset) {
            self.boundaries.push(offset);
        }
        let open = self.open_file.as_mut().expect("caller opened a file");
        open.next_chunk = FileOffset(chunk_offset + size);
        if let Some(id) = open.id
            && let EntryKind::Regular { chunks, .. } = &mut self.entries[id.0 as usize].kind
        {
            chunks.push(Chunk {
                compressed_offset: CompressedOffset(offset),
                compressed_size: 0,
                inner_offset,
                file_offset: FileOffset(chunk_offset),
                size,
                digest,
            });
        }
        Ok(())
    }

    /// Ends the regular file whose chunks were being read; a gap is blamed on the
    /// file's own TOC entry.
    fn close_file(&mut self) -> Result<(), FormatError> {
        if let Some(open) = self.open_file.take()
            && open.next_chunk != open.name_end
        {
            return Err(FormatError::BadEntry {
                index: open.toc_position,
                name: truncate(&open.toc_name),
                reason: format!(
                    "chunks cover only {} of the file's {} bytes",
                    open.next_chunk.0, open.name_end.0
                ),
            });
        }
        Ok(())
    }

    fn finish(mut self, format: LayerFormat, blob_size: u64) -> LayerIndex {
        let toc_offset = self.toc_offset.0;
        for entry in &mut self.entries {
            if let EntryKind::Regular { chunks, .. } = &mut entry.kind {
                for chunk in chunks {
                    let start = chunk.compressed_offset.0;
                    let next = self.boundaries.partition_point(|&b| b <= start);
                    let end = self.boundaries.get(next).copied().unwrap_or(toc_offset);
                    chunk.compressed_size = end - start;
                }
            }
        }
        let prefetch = match self.prefetch_cutoff {
            Some(cutoff) => self.entries[..cutoff]
                .iter()
                .enumerate()
                .filter(|(_, e)| matches!(&e.kind, EntryKind::Regular { chunks, .. } if !chunks.is_empty()))
                .map(|(i, _)| EntryId(i as u32))
                .collect(),
            None => Vec::new(),
        };
        LayerIndex {
            format,
            blob_size,
            toc_offset: self.toc_offset,
            entries: self.entries,
            prefetch,
            no_prefetch: self.no_prefetch,
        }
    }
}

fn truncate(text: &str) -> String {
    text.chars().take(256).collect()
}

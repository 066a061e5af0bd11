//! The footer at the end of a chunked blob, which locates the TOC.
//!
//! Layouts (as written by stargz-snapshotter's estargz package):
//!
//! * eStargz, 51 bytes: an empty gzip member whose header has `FLG = FEXTRA` and a
//!   26-byte extra field holding one subfield `'S' 'G'`, length 22, payload
//!   `"%016x" (TOC offset) + "STARGZ"`; then an empty stored deflate block and a zero
//!   CRC32/ISIZE.
//! * legacy stargz, 47 bytes: the same, but the 22-byte payload is the whole extra
//!   field (no subfield header).
//! * zstd:chunked, 48 bytes: a zstd skippable frame (magic `0x184D2A50`, length 40)
//!   whose payload is, little endian, `u64` TOC offset, `u64` compressed TOC length,
//!   `u64` uncompressed TOC length, `u64` manifest type (1 = CRFS TOC), then the
//!   8-byte magic `"GnUlInUx"`. The TOC offset points at the zstd frame itself, past
//!   the skippable-frame header that wraps it.

use std::ops::Range;

use super::{CompressedOffset, FormatError, LayerFormat};

const ESTARGZ_FOOTER_SIZE: usize = 51;
const LEGACY_STARGZ_FOOTER_SIZE: usize = 47;
const ZSTD_CHUNKED_FOOTER_SIZE: usize = 48;

/// How many bytes from the end of a blob [`parse_footer`] needs to see any footer.
pub const MAX_FOOTER_SIZE: u64 = ESTARGZ_FOOTER_SIZE as u64;

const STARGZ_MAGIC: &[u8] = b"STARGZ";
const ZSTD_SKIPPABLE_FRAME_MAGIC: [u8; 4] = [0x50, 0x2a, 0x4d, 0x18];
const ZSTD_CHUNKED_MAGIC: &[u8; 8] = b"GnUlInUx";
const ZSTD_CHUNKED_MANIFEST_TYPE_CRFS: u64 = 1;

/// What a blob's footer says about its TOC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    pub format: LayerFormat,
    /// Where the compressed TOC starts in the blob.
    pub toc_offset: CompressedOffset,
    /// Compressed TOC bytes: from `toc_offset` up to the footer.
    pub toc_size: u64,
    /// Size of the TOC JSON, when the footer records it (zstd:chunked only).
    pub toc_json_size: Option<u64>,
}

impl Footer {
    /// The blob range to fetch and hand to [`super::parse_toc`].
    pub fn toc_range(&self) -> Range<u64> {
        self.toc_offset.0..self.toc_offset.0 + self.toc_size
    }
}

/// Recognizes the footer at the end of a blob of `blob_size` bytes.
///
/// `tail` must be the last `min(MAX_FOOTER_SIZE, blob_size)` bytes of the blob (a
/// longer tail is accepted: only its end is looked at). Returns
/// [`FormatError::NotChunked`] when the blob ends in no known footer, e.g. a plain
/// gzip or zstd tar layer, and [`FormatError::BadFooter`] when a footer is
/// recognized but points outside the blob.
pub fn parse_footer(tail: &[u8], blob_size: u64) -> Result<Footer, FormatError> {
    if tail.len() as u64 > blob_size {
        return Err(FormatError::BadFooter {
            format: LayerFormat::Estargz,
            reason: format!(
                "{} tail bytes given for a blob of {blob_size} bytes",
                tail.len()
            ),
        });
    }
    if let Some(footer) = zstd_chunked_footer(tail, blob_size)? {
        return Ok(footer);
    }
    if let Some(footer) = estargz_footer(tail, blob_size)? {
        return Ok(footer);
    }
    Err(FormatError::NotChunked {
        inspected: tail.len(),
        blob_size,
    })
}

fn last(tail: &[u8], n: usize) -> Option<&[u8]> {
    tail.len().checked_sub(n).map(|start| &tail[start..])
}

fn u64_le(bytes: &[u8]) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(raw)
}

fn zstd_chunked_footer(tail: &[u8], blob_size: u64) -> Result<Option<Footer>, FormatError> {
    let Some(footer) = last(tail, ZSTD_CHUNKED_FOOTER_SIZE) else {
        return Ok(None);
    };
    if &footer[40..] != ZSTD_CHUNKED_MAGIC {
        return Ok(None);
    }
    let bad = |reason: String| FormatError::BadFooter {
        format: LayerFormat::ZstdChunked,
        reason,
    };
    if footer[..4] != ZSTD_SKIPPABLE_FRAME_MAGIC || footer[4..8] != 40u32.to_le_bytes() {
        return Err(bad(
            "the GnUlInUx magic is not inside a 40-byte skippable frame \
             (a containers/storage zstd:chunked variant this reader does not support?)"
                .into(),
        ));
    }
    let payload = &footer[8..];
    let toc_offset = u64_le(&payload[0..]);
    let toc_compressed = u64_le(&payload[8..]);
    let toc_json_size = u64_le(&payload[16..]);
    let manifest_type = u64_le(&payload[24..]);
    if manifest_type != ZSTD_CHUNKED_MANIFEST_TYPE_CRFS {
        return Err(bad(format!(
            "manifest type {manifest_type} is not 1 (CRFS TOC)"
        )));
    }
    let footer_start = blob_size - ZSTD_CHUNKED_FOOTER_SIZE as u64;
    if toc_offset >= footer_start {
        return Err(bad(format!(
            "TOC offset {toc_offset} is not before the footer at {footer_start}"
        )));
    }
    let toc_size = footer_start - toc_offset;
    if toc_compressed != toc_size {
        return Err(bad(format!(
            "compressed TOC length {toc_compressed} does not reach from the TOC offset \
             {toc_offset} to the footer at {footer_start}"
        )));
    }
    Ok(Some(Footer {
        format: LayerFormat::ZstdChunked,
        toc_offset: CompressedOffset(toc_offset),
        toc_size,
        toc_json_size: Some(toc_json_size),
    }))
}

fn estargz_footer(tail: &[u8], blob_size: u64) -> Result<Option<Footer>, FormatError> {
    // (footer size, extra field length, where the 22-byte payload starts)
    const LAYOUTS: [(usize, u16, usize); 2] = [
        (ESTARGZ_FOOTER_SIZE, 26, 16),
        (LEGACY_STARGZ_FOOTER_SIZE, 22, 12),
    ];
    for (size, xlen, payload_at) in LAYOUTS {
        let Some(footer) = last(tail, size) else {
            continue;
        };
        // gzip magic, deflate, FLG = FEXTRA only, then XLEN after MTIME/XFL/OS.
        if footer[..4] != [0x1f, 0x8b, 0x08, 0x04] || footer[10..12] != xlen.to_le_bytes() {
            continue;
        }
        if size == ESTARGZ_FOOTER_SIZE && footer[12..16] != [b'S', b'G', 22, 0] {
            continue;
        }
        let payload = &footer[payload_at..payload_at + 22];
        if &payload[16..] != STARGZ_MAGIC {
            continue;
        }
        let bad = |reason: String| FormatError::BadFooter {
            format: LayerFormat::Estargz,
            reason,
        };
        // The member must be empty: CRC32 and ISIZE of nothing are zero.
        if footer[size - 8..] != [0; 8] {
            return Err(bad("the footer's gzip member is not empty".into()));
        }
        let toc_offset = std::str::from_utf8(&payload[..16])
            .ok()
            .filter(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .ok_or_else(|| {
                bad(format!(
                    "TOC offset {:?} is not 16 hex digits",
                    String::from_utf8_lossy(&payload[..16])
                ))
            })?;
        let footer_start = blob_size - size as u64;
        if toc_offset >= footer_start {
            return Err(bad(format!(
                "TOC offset {toc_offset} is not before the footer at {footer_start}"
            )));
        }
        return Ok(Some(Footer {
            format: LayerFormat::Estargz,
            toc_offset: CompressedOffset(toc_offset),
            toc_size: footer_start - toc_offset,
            toc_json_size: None,
        }));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn estargz_footer_bytes(toc_offset: u64) -> Vec<u8> {
        let mut f = vec![
            0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0,
        ];
        f.extend_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
        f.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]);
        f.extend_from_slice(&[0; 8]);
        assert_eq!(f.len(), ESTARGZ_FOOTER_SIZE);
        f
    }

    fn legacy_footer_bytes(toc_offset: u64) -> Vec<u8> {
        let mut f = vec![0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff, 22, 0];
        f.extend_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
        f.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]);
        f.extend_from_slice(&[0; 8]);
        assert_eq!(f.len(), LEGACY_STARGZ_FOOTER_SIZE);
        f
    }

    fn zstd_footer_bytes(toc_offset: u64, compressed: u64, json: u64, kind: u64) -> Vec<u8> {
        let mut f = ZSTD_SKIPPABLE_FRAME_MAGIC.to_vec();
        f.extend_from_slice(&40u32.to_le_bytes());
        for v in [toc_offset, compressed, json, kind] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(ZSTD_CHUNKED_MAGIC);
        f
    }

    #[test]
    fn estargz_footer_is_found() {
        let footer = parse_footer(&estargz_footer_bytes(0x11db), 5627).unwrap();
        assert_eq!(
            footer,
            Footer {
                format: LayerFormat::Estargz,
                toc_offset: CompressedOffset(0x11db),
                toc_size: 5627 - 51 - 0x11db,
                toc_json_size: None,
            }
        );
        assert_eq!(footer.toc_range(), 0x11db..5627 - 51);
    }

    #[test]
    fn legacy_footer_is_found_behind_four_more_bytes() {
        let mut tail = vec![9, 9, 9, 9];
        tail.extend(legacy_footer_bytes(1000));
        let footer = parse_footer(&tail, 2000).unwrap();
        assert_eq!(footer.toc_offset, CompressedOffset(1000));
        assert_eq!(footer.toc_size, 2000 - 47 - 1000);
    }

    #[test]
    fn zstd_chunked_footer_is_found() {
        let blob_size = 3174;
        let footer = parse_footer(&zstd_footer_bytes(2131, 995, 3446, 1), blob_size).unwrap();
        assert_eq!(
            footer,
            Footer {
                format: LayerFormat::ZstdChunked,
                toc_offset: CompressedOffset(2131),
                toc_size: 995,
                toc_json_size: Some(3446),
            }
        );
    }

    #[test]
    fn plain_layers_are_not_chunked() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, &[0u8; 4096]).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::stream::encode_all(&[0u8; 4096][..], 3).unwrap();
        for blob in [&gz[..], &zst[..], b"", b"short"] {
            let tail = &blob[blob.len().saturating_sub(MAX_FOOTER_SIZE as usize)..];
            let err = parse_footer(tail, blob.len() as u64).unwrap_err();
            assert!(matches!(err, FormatError::NotChunked { .. }), "{err}");
        }
    }

    #[test]
    fn footers_pointing_outside_the_blob_are_rejected() {
        let cases = [
            (estargz_footer_bytes(5000), 5000u64 + 51),
            (estargz_footer_bytes(u64::MAX), 100),
            (legacy_footer_bytes(60), 100),
            (zstd_footer_bytes(100, 0, 10, 1), 148),
            (zstd_footer_bytes(u64::MAX, 1, 10, 1), 148),
            (zstd_footer_bytes(50, 49, 10, 1), 148),
            (zstd_footer_bytes(50, 50, 10, 2), 148),
        ];
        for (tail, blob_size) in cases {
            let err = parse_footer(&tail, blob_size).unwrap_err();
            assert!(matches!(err, FormatError::BadFooter { .. }), "{err}");
        }
    }

    #[test]
    fn malformed_footers_are_rejected() {
        let mut not_hex = estargz_footer_bytes(0);
        not_hex[16..32].copy_from_slice(b"00000000000000zz");
        let mut not_empty = estargz_footer_bytes(10);
        not_empty[50] = 1;
        let mut not_skippable = zstd_footer_bytes(50, 50, 10, 1);
        not_skippable[0] = 0;
        for tail in [not_hex, not_empty, not_skippable] {
            let err = parse_footer(&tail, 148).unwrap_err();
            assert!(matches!(err, FormatError::BadFooter { .. }), "{err}");
        }
    }

    #[test]
    fn tail_longer_than_blob_is_rejected() {
        let err = parse_footer(&estargz_footer_bytes(0), 10).unwrap_err();
        assert!(matches!(err, FormatError::BadFooter { .. }), "{err}");
    }
}

//! Turning the compressed bytes of one chunk into its verified data.

use std::io::{self, Read};

use crate::digest::Digest;

use super::{Chunk, FormatError, LayerFormat};

/// Upper bound on what is reserved up front in `out`: `chunk.size` comes from an
/// untrusted TOC, so a huge value must not turn into a huge allocation before any
/// data has been seen.
const MAX_UP_FRONT_RESERVE: u64 = 16 << 20;

/// Decompresses one chunk and appends exactly `chunk.size` bytes of file data to `out`.
///
/// `compressed` must be the blob bytes `chunk.compressed_offset ..
/// chunk.compressed_offset + chunk.compressed_size`: one or more whole gzip members
/// (eStargz) or zstd frames (zstd:chunked). The decompressed stream starts with
/// `chunk.inner_offset` bytes that belong to something else (tar headers, other small
/// files) and may continue past the chunk with tar padding and the next entries'
/// headers; both are skipped.
///
/// The appended data is checked against `chunk.digest`. On any error (corrupt or short
/// data, digest mismatch) `out` is restored to its previous length, so a caller never
/// sees unverified bytes.
pub fn decompress_chunk(
    format: LayerFormat,
    compressed: &[u8],
    chunk: &Chunk,
    out: &mut Vec<u8>,
) -> Result<(), FormatError> {
    let start = out.len();
    let result = match format {
        LayerFormat::Estargz => extract(flate2::read::MultiGzDecoder::new(compressed), chunk, out),
        LayerFormat::ZstdChunked => zstd::stream::read::Decoder::with_buffer(compressed)
            .and_then(|decoder| extract(decoder, chunk, out)),
    };
    let unreadable = |reason: String| FormatError::ChunkUnreadable {
        format,
        compressed_offset: chunk.compressed_offset,
        compressed_len: compressed.len(),
        file_offset: chunk.file_offset,
        reason,
    };
    match result {
        Ok(()) => {}
        Err(error) => {
            out.truncate(start);
            return Err(unreadable(error.to_string()));
        }
    }
    let got = (out.len() - start) as u64;
    if got != chunk.size {
        out.truncate(start);
        return Err(unreadable(format!(
            "data ends after {got} of {} bytes (inner offset {})",
            chunk.size, chunk.inner_offset
        )));
    }
    let actual = Digest::sha256_of(&out[start..]);
    if actual != chunk.digest {
        out.truncate(start);
        return Err(FormatError::ChunkDigestMismatch {
            compressed_offset: chunk.compressed_offset,
            file_offset: chunk.file_offset,
            expected: chunk.digest.clone(),
            actual,
        });
    }
    Ok(())
}

fn extract(mut decoder: impl Read, chunk: &Chunk, out: &mut Vec<u8>) -> io::Result<()> {
    let skipped = io::copy(
        &mut (&mut decoder).take(chunk.inner_offset),
        &mut io::sink(),
    )?;
    if skipped != chunk.inner_offset {
        // Nothing appended: the caller reports the chunk as short.
        return Ok(());
    }
    out.reserve(chunk.size.min(MAX_UP_FRONT_RESERVE) as usize);
    decoder.take(chunk.size).read_to_end(out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::format::{CompressedOffset, FileOffset};

    fn gzip_member(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn zstd_frame(data: &[u8]) -> Vec<u8> {
        zstd::stream::encode_all(data, 3).unwrap()
    }

    fn chunk_of(data: &[u8], inner_offset: u64, compressed_size: u64) -> Chunk {
        Chunk {
            compressed_offset: CompressedOffset(100),
            compressed_size,
            inner_offset,
            file_offset: FileOffset(4096),
            size: data.len() as u64,
            digest: Digest::sha256_of(data),
        }
    }

    fn compress(format: LayerFormat, data: &[u8]) -> Vec<u8> {
        match format {
            LayerFormat::Estargz => gzip_member(data),
            LayerFormat::ZstdChunked => zstd_frame(data),
        }
    }

    const FORMATS: [LayerFormat; 2] = [LayerFormat::Estargz, LayerFormat::ZstdChunked];

    #[test]
    fn appends_exactly_the_chunk_and_skips_inner_offset_and_trailer() {
        for format in FORMATS {
            let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
            // A tar header before and padding plus the next header after, in one member.
            let mut stream = vec![b'h'; 512];
            stream.extend_from_slice(&data);
            stream.extend_from_slice(&[0u8; 1024]);
            let compressed = compress(format, &stream);
            let chunk = chunk_of(&data, 512, compressed.len() as u64);
            let mut out = b"prefix".to_vec();
            decompress_chunk(format, &compressed, &chunk, &mut out).unwrap();
            assert_eq!(&out[..6], b"prefix");
            assert_eq!(&out[6..], &data[..], "{format}");
        }
    }

    #[test]
    fn reads_across_members() {
        for format in FORMATS {
            let data = b"first half|second half".to_vec();
            let mut compressed = compress(format, &data[..11]);
            compressed.extend(compress(format, &data[11..]));
            let chunk = chunk_of(&data, 0, compressed.len() as u64);
            let mut out = Vec::new();
            decompress_chunk(format, &compressed, &chunk, &mut out).unwrap();
            assert_eq!(out, data, "{format}");
        }
    }

    #[test]
    fn digest_mismatch_is_an_error_and_leaves_out_unchanged() {
        for format in FORMATS {
            let data = b"payload".to_vec();
            let compressed = compress(format, &data);
            let mut chunk = chunk_of(&data, 0, compressed.len() as u64);
            chunk.digest = Digest::sha256_of(b"something else");
            let mut out = b"keep".to_vec();
            let err = decompress_chunk(format, &compressed, &chunk, &mut out).unwrap_err();
            assert!(
                matches!(err, FormatError::ChunkDigestMismatch { .. }),
                "{err}"
            );
            assert_eq!(out, b"keep");
        }
    }

    #[test]
    fn short_data_is_an_error() {
        for format in FORMATS {
            let data = b"payload".to_vec();
            let compressed = compress(format, &data[..4]);
            let mut chunk = chunk_of(&data, 0, compressed.len() as u64);
            let mut out = Vec::new();
            let err = decompress_chunk(format, &compressed, &chunk, &mut out).unwrap_err();
            assert!(matches!(err, FormatError::ChunkUnreadable { .. }), "{err}");
            assert!(out.is_empty());
            // An inner offset past the end of the stream is short data too.
            chunk.inner_offset = 100;
            let compressed = compress(format, &data);
            let err = decompress_chunk(format, &compressed, &chunk, &mut out).unwrap_err();
            assert!(matches!(err, FormatError::ChunkUnreadable { .. }), "{err}");
        }
    }

    #[test]
    fn truncated_or_garbage_input_is_an_error() {
        for format in FORMATS {
            let data: Vec<u8> = (0..50_000u32).map(|i| (i * 31 % 253) as u8).collect();
            let compressed = compress(format, &data);
            let chunk = chunk_of(&data, 0, compressed.len() as u64);
            let mut out = Vec::new();
            let half = &compressed[..compressed.len() / 2];
            assert!(decompress_chunk(format, half, &chunk, &mut out).is_err());
            assert!(decompress_chunk(format, b"not compressed at all", &chunk, &mut out).is_err());
            assert!(decompress_chunk(format, &[], &chunk, &mut out).is_err());
            assert!(out.is_empty());
        }
    }

    #[test]
    fn huge_declared_size_does_not_allocate_up_front() {
        let data = b"tiny".to_vec();
        let compressed = gzip_member(&data);
        let mut chunk = chunk_of(&data, 0, compressed.len() as u64);
        chunk.size = u64::MAX;
        let mut out = Vec::new();
        let err =
            decompress_chunk(LayerFormat::Estargz, &compressed, &chunk, &mut out).unwrap_err();
        assert!(matches!(err, FormatError::ChunkUnreadable { .. }), "{err}");
    }
}

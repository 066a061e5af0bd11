//! Golden tests against real blobs written by ctr-remote (see
//! tests/fixtures/format/README.md).

use std::collections::HashMap;

use super::*;
use crate::digest::Digest;

const MTIME: i64 = 1_700_000_000;

struct Fixture {
    blob: &'static [u8],
    layer_json: &'static str,
}

const ESTARGZ: Fixture = Fixture {
    blob: include_bytes!("../../tests/fixtures/format/estargz.blob"),
    layer_json: include_str!("../../tests/fixtures/format/estargz.layer.json"),
};
const ZSTD_CHUNKED: Fixture = Fixture {
    blob: include_bytes!("../../tests/fixtures/format/zstdchunked.blob"),
    layer_json: include_str!("../../tests/fixtures/format/zstdchunked.layer.json"),
};
const ESTARGZ_PREFETCH: Fixture = Fixture {
    blob: include_bytes!("../../tests/fixtures/format/estargz-prefetch.blob"),
    layer_json: include_str!("../../tests/fixtures/format/estargz-prefetch.layer.json"),
};

fn big_file() -> Vec<u8> {
    (0..1500)
        .flat_map(|i| format!("line {i:06} of the multi-chunk file\n").into_bytes())
        .collect()
}

fn annotated_toc_digest(fixture: &Fixture) -> Digest {
    let layer: serde_json::Value = serde_json::from_str(fixture.layer_json).unwrap();
    assert_eq!(layer["size"].as_u64(), Some(fixture.blob.len() as u64));
    layer["annotations"][TOC_DIGEST_ANNOTATION]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn open(fixture: &Fixture) -> ParsedToc {
    let blob = fixture.blob;
    let size = blob.len() as u64;
    let tail = &blob[blob.len() - MAX_FOOTER_SIZE as usize..];
    let footer = parse_footer(tail, size).unwrap();
    let toc = &blob[footer.toc_range().start as usize..footer.toc_range().end as usize];
    parse_toc(&footer, toc, Some(&annotated_toc_digest(fixture)), size).unwrap()
}

fn entry(name: &str, kind: EntryKind, mode: u32) -> Entry {
    Entry {
        name: name.into(),
        kind,
        mode,
        uid: 0,
        gid: 0,
        mtime_secs: MTIME,
        mtime_nanos: 0,
        xattrs: Vec::new(),
    }
}

fn synthesized(name: &str) -> Entry {
    Entry {
        mtime_secs: 0,
        ..entry(name, EntryKind::Directory, 0o755)
    }
}

/// `members` are the compressed offsets of hello.txt, big's four chunks and
/// deep.txt; `next` maps each to the following member boundary.
fn expected_entries(members: [u64; 6], next: [u64; 6]) -> Vec<Entry> {
    let chunk = |i: usize, file_offset: u64, data: &[u8]| Chunk {
        compressed_offset: CompressedOffset(members[i]),
        compressed_size: next[i] - members[i],
        inner_offset: 0,
        file_offset: FileOffset(file_offset),
        size: data.len() as u64,
        digest: Digest::sha256_of(data),
    };
    let big = big_file();
    let hello = b"hello, sluice\n";
    let deep = b"deep file\n";
    vec![
        synthesized(""),
        entry("etc", EntryKind::Directory, 0o755),
        Entry {
            uid: 1000,
            gid: 1001,
            xattrs: vec![
                ("user.comment".into(), b"greeting".to_vec()),
                ("user.empty".into(), Vec::new()),
            ],
            ..entry(
                "etc/hello.txt",
                EntryKind::Regular {
                    size: 14,
                    chunks: vec![chunk(0, 0, hello)],
                },
                0o640,
            )
        },
        entry(
            "etc/empty",
            EntryKind::Regular {
                size: 0,
                chunks: Vec::new(),
            },
            0o644,
        ),
        entry("usr", EntryKind::Directory, 0o755),
        entry("usr/bin", EntryKind::Directory, 0o1755),
        entry(
            "usr/bin/big",
            EntryKind::Regular {
                size: 54_000,
                chunks: vec![
                    chunk(1, 0, &big[..16384]),
                    chunk(2, 16384, &big[16384..32768]),
                    chunk(3, 32768, &big[32768..49152]),
                    chunk(4, 49152, &big[49152..]),
                ],
            },
            0o4755,
        ),
        entry(
            "usr/bin/hard",
            EntryKind::Hardlink { target: EntryId(6) },
            0o4755,
        ),
        entry(
            "usr/bin/link",
            EntryKind::Symlink {
                target: "big".into(),
            },
            0o777,
        ),
        entry("dev", EntryKind::Directory, 0o755),
        entry(
            "dev/null",
            EntryKind::CharDevice { major: 1, minor: 3 },
            0o666,
        ),
        Entry {
            gid: 6,
            ..entry(
                "dev/sda",
                EntryKind::BlockDevice { major: 8, minor: 0 },
                0o660,
            )
        },
        entry("dev/fifo", EntryKind::Fifo, 0o600),
        synthesized("opt"),
        synthesized("opt/pkg"),
        entry(
            "opt/pkg/deep.txt",
            EntryKind::Regular {
                size: 10,
                chunks: vec![chunk(5, 0, deep)],
            },
            0o644,
        ),
    ]
}

fn assert_entries(actual: &LayerIndex, expected: &[Entry]) {
    assert_eq!(actual.entries.len(), expected.len());
    for (i, (a, e)) in actual.entries.iter().zip(expected).enumerate() {
        assert_eq!(a, e, "entry {i}");
    }
}

/// Every chunk decompresses from its own byte range to the file's content.
fn assert_files_readable(blob: &[u8], index: &LayerIndex) {
    let expected: HashMap<&str, Vec<u8>> = [
        ("etc/hello.txt", b"hello, sluice\n".to_vec()),
        ("etc/empty", Vec::new()),
        ("usr/bin/big", big_file()),
        ("opt/pkg/deep.txt", b"deep file\n".to_vec()),
    ]
    .into();
    let mut seen = 0;
    for entry in &index.entries {
        let EntryKind::Regular { chunks, .. } = &entry.kind else {
            continue;
        };
        let mut content = Vec::new();
        for chunk in chunks {
            let range = chunk.compressed_range();
            let compressed = &blob[range.start as usize..range.end as usize];
            decompress_chunk(index.format, compressed, chunk, &mut content).unwrap();
        }
        assert_eq!(content, expected[entry.name.as_str()], "{}", entry.name);
        seen += 1;
    }
    assert_eq!(seen, expected.len());
}

#[test]
fn estargz_golden() {
    let parsed = open(&ESTARGZ);
    let index = &parsed.index;
    assert_eq!(parsed.toc_digest, annotated_toc_digest(&ESTARGZ));
    assert_eq!(index.format, LayerFormat::Estargz);
    assert_eq!(index.blob_size, 5627);
    assert_eq!(index.toc_offset, CompressedOffset(0x11db));
    // The landmark's member at 85 is a boundary but not an entry.
    let members = [329, 507, 1640, 2776, 3899, 4532];
    let next = [507, 1640, 2776, 3899, 4532, 0x11db];
    assert_entries(index, &expected_entries(members, next));
    assert!(index.no_prefetch);
    assert!(index.prefetch.is_empty());
    assert_files_readable(ESTARGZ.blob, index);
}

#[test]
fn zstd_chunked_golden() {
    let parsed = open(&ZSTD_CHUNKED);
    let index = &parsed.index;
    assert_eq!(parsed.toc_digest, annotated_toc_digest(&ZSTD_CHUNKED));
    assert_eq!(parsed.toc_json_size, 3446);
    assert_eq!(index.format, LayerFormat::ZstdChunked);
    assert_eq!(index.blob_size, 3174);
    assert_eq!(index.toc_offset, CompressedOffset(2131));
    let members = [345, 515, 861, 1211, 1640, 2089];
    // The last member ends at the skippable frame that wraps the TOC.
    let next = [515, 861, 1211, 1640, 2089, 2131];
    assert_entries(index, &expected_entries(members, next));
    assert!(index.no_prefetch);
    assert!(index.prefetch.is_empty());
    assert_files_readable(ZSTD_CHUNKED.blob, index);
}

#[test]
fn estargz_prefetch_landmark_golden() {
    let parsed = open(&ESTARGZ_PREFETCH);
    let index = &parsed.index;
    assert_eq!(index.blob_size, 5622);
    assert_eq!(index.toc_offset, CompressedOffset(4570));
    let members = [238, 506, 1639, 2775, 3898, 4531];
    let next = [339, 1639, 2775, 3898, 4531, 4570];
    assert_entries(index, &expected_entries(members, next));
    assert!(!index.no_prefetch);
    assert_eq!(index.prefetch, vec![EntryId(2)]);
    assert_eq!(index.entry(EntryId(2)).name, "etc/hello.txt");
    assert_files_readable(ESTARGZ_PREFETCH.blob, index);
}

#[test]
fn wrong_toc_digest_is_rejected() {
    let blob = ESTARGZ.blob;
    let footer = parse_footer(&blob[blob.len() - 51..], blob.len() as u64).unwrap();
    let toc = &blob[footer.toc_range().start as usize..footer.toc_range().end as usize];
    let wrong = Digest::sha256_of(b"another toc");
    let err = parse_toc(&footer, toc, Some(&wrong), blob.len() as u64).unwrap_err();
    assert!(
        matches!(err, FormatError::TocDigestMismatch { .. }),
        "{err}"
    );
    let err = parse_toc(&footer, &toc[..toc.len() - 1], None, blob.len() as u64).unwrap_err();
    assert!(matches!(err, FormatError::TocUnreadable { .. }), "{err}");
}

#[test]
fn chunk_from_the_wrong_range_is_rejected() {
    let index = open(&ZSTD_CHUNKED).index;
    let EntryKind::Regular { chunks, .. } = &index.entry(EntryId(6)).kind else {
        panic!("usr/bin/big is not a regular file");
    };
    let (first, second) = (&chunks[0], &chunks[1]);
    let start = second.compressed_offset.0 as usize;
    let range = &ZSTD_CHUNKED.blob[start..start + second.compressed_size as usize];
    let err = decompress_chunk(index.format, range, first, &mut Vec::new()).unwrap_err();
    assert!(
        matches!(err, FormatError::ChunkDigestMismatch { .. }),
        "{err}"
    );
}

//! Hand-built hostile TOCs: each must be refused with an error that names the entry.

use std::io::Write;

use serde_json::{Value, json};

use super::*;
use crate::digest::Digest;

const TOC_OFFSET: u64 = 10_000;
const BLOB_SIZE: u64 = 20_000;

fn digest_of(text: &str) -> String {
    Digest::sha256_of(text.as_bytes()).to_string()
}

fn reg(name: &str, size: i64, offset: i64) -> Value {
    json!({"name": name, "type": "reg", "size": size, "offset": offset,
           "chunkDigest": digest_of(name)})
}

fn dir(name: &str) -> Value {
    json!({"name": name, "type": "dir"})
}

fn toc(entries: Vec<Value>) -> Vec<u8> {
    serde_json::to_vec(&json!({"version": 1, "entries": entries})).unwrap()
}

fn parse_with(json: &[u8], limits: &TocLimits) -> Result<LayerIndex, FormatError> {
    parse_toc_json(
        json,
        LayerFormat::Estargz,
        CompressedOffset(TOC_OFFSET),
        BLOB_SIZE,
        limits,
    )
}

fn parse(entries: Vec<Value>) -> Result<LayerIndex, FormatError> {
    parse_with(&toc(entries), &TocLimits::default())
}

/// Asserts a `BadEntry` for TOC position `index` whose reason mentions `needle`.
fn assert_bad_entry(result: Result<LayerIndex, FormatError>, index: usize, needle: &str) {
    match result {
        Err(FormatError::BadEntry {
            index: got,
            ref name,
            ref reason,
        }) => {
            assert_eq!(got, index, "wrong entry blamed: {name:?}: {reason}");
            assert!(reason.contains(needle), "{reason:?} lacks {needle:?}");
            let message = result.unwrap_err().to_string();
            assert!(message.contains(&format!("TOC entry {index}")), "{message}");
        }
        other => panic!("expected a bad entry {index} ({needle}), got {other:?}"),
    }
}

#[test]
fn names_with_dot_dot_absolute_nul_or_duplicates_are_rejected() {
    assert_bad_entry(parse(vec![dir("a/../../etc")]), 0, "..");
    assert_bad_entry(parse(vec![dir("..")]), 0, "..");
    assert_bad_entry(parse(vec![dir("/etc")]), 0, "absolute");
    assert_bad_entry(parse(vec![dir("a"), dir("b\0c")]), 1, "NUL");
    assert_bad_entry(parse(vec![dir("a"), dir("b"), dir("a/")]), 2, "duplicate");
    assert_bad_entry(parse(vec![dir("./"), dir(".")]), 1, "duplicate");
    let long = "x".repeat(256);
    assert_bad_entry(parse(vec![dir(&long)]), 0, "255");
    let deep = "a/".repeat(3000);
    assert_bad_entry(parse(vec![dir(&deep)]), 0, "limit");
}

#[test]
fn names_are_normalized_and_missing_parents_synthesized_in_order() {
    let index = parse(vec![
        json!({"name": "./a/b/c/", "type": "dir", "mode": 0o700}),
        json!({"name": "a//b/./f", "type": "reg", "mode": 0o100644}),
        json!({"name": "a", "type": "dir", "mode": 0o750, "uid": 7}),
        json!({"name": "./", "type": "dir", "mode": 0o711}),
    ])
    .unwrap();
    let names: Vec<&str> = index.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["", "a", "a/b", "a/b/c", "a/b/f"]);
    // Explicit entries that come after their children replace the synthesized ones.
    assert_eq!(
        (index.entries[0].mode, index.entries[1].mode),
        (0o711, 0o750)
    );
    assert_eq!(index.entries[1].uid, 7);
    assert_eq!(index.entries[2].mode, 0o755);
    assert_eq!(index.entries[3].mode, 0o700);
    // File-type bits in `mode` are dropped.
    assert_eq!(index.entries[4].mode, 0o644);
}

#[test]
fn children_of_non_directories_are_rejected() {
    assert_bad_entry(
        parse(vec![json!({"name": "a", "type": "fifo"}), dir("a/b")]),
        1,
        "not a directory",
    );
    assert_bad_entry(
        parse(vec![dir("a/b"), json!({"name": "a", "type": "fifo"})]),
        1,
        "directory",
    );
    assert_bad_entry(parse(vec![reg("", 0, 0)]), 0, "root");
}

#[test]
fn chunk_offsets_outside_the_data_are_rejected() {
    assert_bad_entry(
        parse(vec![reg("f", 10, TOC_OFFSET as i64)]),
        0,
        "before the TOC",
    );
    assert_bad_entry(parse(vec![reg("f", 10, i64::MAX)]), 0, "before the TOC");
    assert_bad_entry(parse(vec![reg("f", 10, -5)]), 0, "negative offset");
    let bad_toc = parse_toc_json(
        &toc(vec![]),
        LayerFormat::Estargz,
        CompressedOffset(BLOB_SIZE),
        BLOB_SIZE,
        &TocLimits::default(),
    );
    assert!(matches!(bad_toc, Err(FormatError::TocUnreadable { .. })));
}

#[test]
fn overlapping_or_backwards_chunks_are_rejected() {
    assert_bad_entry(
        parse(vec![reg("a", 10, 100), reg("b", 10, 100)]),
        1,
        "overlaps",
    );
    assert_bad_entry(
        parse(vec![reg("a", 10, 200), reg("b", 10, 100)]),
        1,
        "overlaps",
    );
    // Sharing a member is fine when inner offsets keep the data apart.
    let mut b = reg("b", 10, 100);
    b["innerOffset"] = json!(512 + 10);
    let mut a = reg("a", 10, 100);
    a["innerOffset"] = json!(512);
    let index = parse(vec![a.clone(), b, reg("c", 5, 300)]).unwrap();
    let chunk = |i: usize| match &index.entries[i].kind {
        EntryKind::Regular { chunks, .. } => chunks[0].clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        (chunk(1).inner_offset, chunk(1).compressed_size),
        (512, 200)
    );
    assert_eq!(
        (chunk(2).inner_offset, chunk(2).compressed_size),
        (522, 200)
    );
    assert_eq!(chunk(3).compressed_size, TOC_OFFSET - 300);
    let mut overlapping = reg("b", 10, 100);
    overlapping["innerOffset"] = json!(515);
    assert_bad_entry(parse(vec![a, overlapping]), 1, "overlaps");
}

#[test]
fn chunk_gaps_and_overruns_are_rejected() {
    let chunk = |offset: i64, chunk_offset: i64, chunk_size: i64| {
        json!({"name": "f", "type": "chunk", "offset": offset, "chunkOffset": chunk_offset,
               "chunkSize": chunk_size, "chunkDigest": digest_of("c")})
    };
    let mut first = reg("f", 100, 10);
    first["chunkSize"] = json!(40);
    // Gap between 40 and 50.
    assert_bad_entry(
        parse(vec![first.clone(), chunk(20, 50, 0)]),
        1,
        "contiguous",
    );
    // The file ends before its data is covered: the file is blamed.
    assert_bad_entry(
        parse(vec![first.clone(), chunk(20, 40, 30), dir("d")]),
        0,
        "only 70 of the file's 100 bytes",
    );
    assert_bad_entry(parse(vec![first.clone(), chunk(20, 40, 30)]), 0, "only 70");
    // A chunk running past the end of the file.
    assert_bad_entry(
        parse(vec![first.clone(), chunk(20, 40, 61)]),
        1,
        "runs past",
    );
    // One chunk too many.
    assert_bad_entry(
        parse(vec![first.clone(), chunk(20, 40, 0), chunk(30, 100, 0)]),
        2,
        "complete",
    );
    // A chunk naming another file.
    let mut stray = chunk(20, 40, 0);
    stray["name"] = json!("g");
    assert_bad_entry(parse(vec![first.clone(), stray]), 1, "belongs to");
    // Chunk names may repeat the file's unnormalized spelling.
    let mut spelled = first.clone();
    spelled["name"] = json!("./f");
    let mut same = chunk(20, 40, 0);
    same["name"] = json!("./f");
    assert!(parse(vec![spelled, same]).is_ok());
    // A chunk without a file.
    assert_bad_entry(parse(vec![dir("d"), chunk(20, 0, 0)]), 1, "follow");
    // Well-formed: 40 + 60 with the last chunk running to the end.
    let index = parse(vec![first, chunk(20, 40, 0)]).unwrap();
    let EntryKind::Regular { size, chunks } = &index.entries[1].kind else {
        panic!("not a file");
    };
    assert_eq!(*size, 100);
    let spans: Vec<(u64, u64, u64)> = chunks
        .iter()
        .map(|c| (c.file_offset.0, c.size, c.compressed_size))
        .collect();
    assert_eq!(spans, [(0, 40, 10), (40, 60, TOC_OFFSET - 20)]);
}

#[test]
fn chunks_without_a_usable_digest_are_rejected() {
    let mut no_digest = reg("f", 10, 100);
    no_digest.as_object_mut().unwrap().remove("chunkDigest");
    assert_bad_entry(parse(vec![no_digest.clone()]), 0, "no chunkDigest");
    // A single-chunk file may rely on its whole-file digest.
    no_digest["digest"] = json!(digest_of("f"));
    let index = parse(vec![no_digest]).unwrap();
    assert!(
        matches!(&index.entries[1].kind, EntryKind::Regular { chunks, .. }
        if chunks[0].digest == Digest::sha256_of(b"f"))
    );
    let mut bad = reg("f", 10, 100);
    bad["chunkDigest"] = json!("md5:00");
    assert_bad_entry(parse(vec![bad]), 0, "invalid digest");
}

#[test]
fn hardlinks_must_point_at_earlier_non_directory_entries() {
    let link =
        |name: &str, target: &str| json!({"name": name, "type": "hardlink", "linkName": target});
    assert_bad_entry(parse(vec![link("l", "missing")]), 0, "not an earlier entry");
    assert_bad_entry(
        parse(vec![link("l", "f"), reg("f", 0, 0)]),
        0,
        "not an earlier entry",
    );
    assert_bad_entry(parse(vec![dir("d"), link("l", "d")]), 1, "directory");
    assert_bad_entry(parse(vec![link("l", "l")]), 0, "not an earlier entry");
    assert_bad_entry(parse(vec![reg("f", 0, 0), link("l", "../f")]), 1, "..");
    assert_bad_entry(
        parse(vec![
            reg(".prefetch.landmark", 1, 5),
            link("l", ".prefetch.landmark"),
        ]),
        1,
        "not an earlier entry",
    );
    // Links to links resolve to the file.
    let index = parse(vec![reg("f", 0, 0), link("l1", "./f"), link("l2", "l1")]).unwrap();
    assert_eq!(
        index.entries[2].kind,
        EntryKind::Hardlink { target: EntryId(1) }
    );
    assert_eq!(
        index.entries[3].kind,
        EntryKind::Hardlink { target: EntryId(1) }
    );
}

#[test]
fn invalid_fields_are_rejected() {
    let with = |field: &str, value: Value| {
        let mut entry = json!({"name": "x", "type": "char"});
        entry[field] = value;
        parse(vec![entry])
    };
    assert_bad_entry(with("uid", json!(-1)), 0, "uid");
    assert_bad_entry(with("gid", json!(1u64 << 32)), 0, "gid");
    assert_bad_entry(with("mode", json!(-1)), 0, "mode");
    assert_bad_entry(with("devMajor", json!(-3)), 0, "devMajor");
    assert_bad_entry(with("modtime", json!("yesterday")), 0, "RFC 3339");
    assert_bad_entry(with("type", json!("socket")), 0, "unknown type");
    assert_bad_entry(with("xattrs", json!({"user.a": "%%%"})), 0, "base64");
    assert_bad_entry(with("xattrs", json!({"": "AA=="})), 0, "xattr name");
    assert_bad_entry(
        parse(vec![json!({"name": "s", "type": "symlink"})]),
        0,
        "linkName",
    );
    assert_bad_entry(parse(vec![reg("f", -1, 10)]), 0, "negative size");
    let mut huge_chunk = reg("f", 1 << 40, 10);
    huge_chunk["chunkSize"] = json!(0);
    assert_bad_entry(parse(vec![huge_chunk]), 0, "limit");
    let mut huge_inner = reg("f", 1, 10);
    huge_inner["innerOffset"] = json!(1u64 << 40);
    assert_bad_entry(parse(vec![huge_inner]), 0, "innerOffset");
    // Type errors are caught by the JSON decoder.
    assert!(matches!(
        with("uid", json!("0")),
        Err(FormatError::TocJson { .. })
    ));
    assert!(matches!(
        with("size", json!(1.5)),
        Err(FormatError::TocJson { .. })
    ));
}

#[test]
fn xattrs_keep_toc_order_and_decode() {
    // Raw text: serde_json's own maps would sort the keys.
    let json = br#"{"version": 1, "entries": [{"name": "x", "type": "fifo",
        "xattrs": {"user.z": "AQI=", "security.capability": "", "user.a": "eA=="}}]}"#;
    let index = parse_with(json, &TocLimits::default()).unwrap();
    assert_eq!(
        index.entries[1].xattrs,
        [
            ("user.z".to_string(), vec![1, 2]),
            ("security.capability".to_string(), vec![]),
            ("user.a".to_string(), b"x".to_vec()),
        ]
    );
}

#[test]
fn malformed_documents_are_rejected() {
    let limits = TocLimits::default();
    for bad in [
        &b""[..],
        b"[]",
        b"{\"version\": 1}",
        b"{\"entries\": []}",
        b"{\"version\": 1, \"entries\": []} trailing",
        b"{\"version\": 1, \"version\": 1, \"entries\": []}",
        b"{\"version\": 1, \"entries\": [{\"type\": \"dir\"}]}",
        b"{\"version\": 1, \"entries\": [{\"name\": 5, \"type\": \"dir\"}]}",
        b"\xff\xfe",
    ] {
        let result = parse_with(bad, &limits);
        assert!(
            matches!(result, Err(FormatError::TocJson { .. })),
            "{result:?}"
        );
    }
    let v2 = br#"{"version": 2, "entries": []}"#;
    assert!(matches!(
        parse_with(v2, &limits),
        Err(FormatError::TocVersion { version: 2 })
    ));
    // Unknown fields are ignored, as Go's decoder does.
    let extra =
        br#"{"version": 1, "x": {"y": [1]}, "entries": [{"name": "a", "type": "dir", "z": null}]}"#;
    assert_eq!(parse_with(extra, &limits).unwrap().entries.len(), 2);
}

#[test]
fn entry_count_is_limited() {
    let limits = TocLimits {
        max_entries: 3,
        ..TocLimits::default()
    };
    // Four TOC entries (a file and its three extra chunks) for two index entries.
    let chunk = |n: i64| {
        json!({"name": "f", "type": "chunk", "offset": 100 * n, "chunkOffset": 10 * n,
               "chunkSize": 10, "chunkDigest": digest_of("c")})
    };
    let mut file = reg("f", 40, 0);
    file["chunkSize"] = json!(10);
    let four = toc(vec![file, chunk(1), chunk(2), chunk(3)]);
    assert!(matches!(
        parse_with(&four, &limits),
        Err(FormatError::TooManyEntries { limit: 3 })
    ));
    // Synthesized parents count too: root + a + a/b + a/b/c would be four.
    let deep = toc(vec![dir("a/b/c")]);
    assert_bad_entry(parse_with(&deep, &limits), 0, "limit of 3 entries");
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn toc_tar(name: &str, json: &[u8], declared_size: u64) -> Vec<u8> {
    let mut header = tar::Header::new_ustar();
    header.set_path(name).unwrap();
    header.set_size(declared_size);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    let mut tar = header.as_bytes().to_vec();
    tar.extend_from_slice(json);
    tar.resize(tar.len().div_ceil(512) * 512 + 1024, 0);
    tar
}

fn estargz_footer(toc_len: usize) -> Footer {
    Footer {
        format: LayerFormat::Estargz,
        toc_offset: CompressedOffset(TOC_OFFSET),
        toc_size: toc_len as u64,
        toc_json_size: None,
    }
}

#[test]
fn estargz_toc_envelope_is_checked() {
    let json = toc(vec![dir("a")]);
    let good = gzip(&toc_tar(TOC_TAR_NAME, &json, json.len() as u64));
    let parsed = parse_toc(&estargz_footer(good.len()), &good, None, BLOB_SIZE).unwrap();
    assert_eq!(parsed.toc_digest, Digest::sha256_of(&json));
    assert_eq!(parsed.index.entries.len(), 2);

    for bad in [
        gzip(&toc_tar("other.json", &json, json.len() as u64)),
        gzip(&toc_tar(TOC_TAR_NAME, &json, json.len() as u64 + 5000)),
        gzip(b"short"),
        b"not gzip at all".to_vec(),
    ] {
        let err = parse_toc(&estargz_footer(bad.len()), &bad, None, BLOB_SIZE).unwrap_err();
        assert!(matches!(err, FormatError::TocUnreadable { .. }), "{err}");
    }
    let mut corrupt_header = toc_tar(TOC_TAR_NAME, &json, json.len() as u64);
    corrupt_header[0] = b'S';
    let corrupt_header = gzip(&corrupt_header);
    let err = parse_toc(
        &estargz_footer(corrupt_header.len()),
        &corrupt_header,
        None,
        BLOB_SIZE,
    )
    .unwrap_err();
    assert!(matches!(err, FormatError::TocUnreadable { .. }), "{err}");
}

#[test]
fn toc_decompression_bombs_are_refused() {
    let limits = TocLimits {
        max_toc_json_bytes: 1 << 20,
        ..TocLimits::default()
    };
    // 16 MiB of spaces compresses to ~16 KiB: refused without inflating it all.
    let zeros = vec![b' '; 16 << 20];
    let blob_size = TOC_OFFSET + (1 << 20);
    let bomb = gzip(&toc_tar(TOC_TAR_NAME, &zeros, zeros.len() as u64));
    let err = parse_toc_with_limits(&estargz_footer(bomb.len()), &bomb, None, blob_size, &limits)
        .unwrap_err();
    assert!(
        matches!(err, FormatError::TocTooLarge { limit } if limit == 1 << 20),
        "{err}"
    );

    let zstd_bomb = zstd::stream::encode_all(&zeros[..], 3).unwrap();
    for declared in [Some(100), Some(16 << 20), None] {
        let footer = Footer {
            format: LayerFormat::ZstdChunked,
            toc_offset: CompressedOffset(TOC_OFFSET),
            toc_size: zstd_bomb.len() as u64,
            toc_json_size: declared,
        };
        let err = parse_toc_with_limits(&footer, &zstd_bomb, None, blob_size, &limits).unwrap_err();
        assert!(matches!(err, FormatError::TocTooLarge { .. }), "{err}");
    }
}

#[test]
fn zstd_toc_size_must_match_the_footer() {
    let json = toc(vec![dir("a")]);
    let compressed = zstd::stream::encode_all(&json[..], 3).unwrap();
    let footer = Footer {
        format: LayerFormat::ZstdChunked,
        toc_offset: CompressedOffset(TOC_OFFSET),
        toc_size: compressed.len() as u64,
        toc_json_size: Some(json.len() as u64),
    };
    assert!(parse_toc(&footer, &compressed, None, BLOB_SIZE).is_ok());
    let lying = Footer {
        toc_json_size: Some(json.len() as u64 - 1),
        ..footer
    };
    let err = parse_toc(&lying, &compressed, None, BLOB_SIZE).unwrap_err();
    assert!(matches!(err, FormatError::TocUnreadable { .. }), "{err}");
    let outside = Footer {
        toc_offset: CompressedOffset(BLOB_SIZE - 1),
        ..footer
    };
    let err = parse_toc(&outside, &compressed, None, BLOB_SIZE).unwrap_err();
    assert!(matches!(err, FormatError::TocUnreadable { .. }), "{err}");
}

#[test]
fn landmarks_are_excluded_but_shape_prefetch_and_boundaries() {
    let index = parse(vec![
        dir("d"),
        reg("d/first", 5, 100),
        reg("second", 0, 0),
        reg(".prefetch.landmark", 1, 200),
        reg("d/later", 5, 300),
        reg("d/.prefetch.landmark", 1, 400),
    ])
    .unwrap();
    let names: Vec<&str> = index.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "",
            "d",
            "d/first",
            "second",
            "d/later",
            "d/.prefetch.landmark"
        ]
    );
    // Empty files need no fetching.
    assert_eq!(index.prefetch, [EntryId(2)]);
    assert!(!index.no_prefetch);
    let EntryKind::Regular { chunks, .. } = &index.entries[2].kind else {
        panic!("not a file");
    };
    // The landmark's member ends d/first's.
    assert_eq!(chunks[0].compressed_size, 100);
}

//! How long validating a large layer's TOC takes: a synthetic 100,000-entry TOC in
//! the shape ctr-remote writes (tab-indented JSON, one chunk per file).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use sluice::digest::Digest;
use sluice::format::{CompressedOffset, Footer, LayerFormat, TocLimits, parse_toc, parse_toc_json};

const DIRS: usize = 1_000;
const FILES_PER_DIR: usize = 99;

fn synthetic_toc_json() -> Vec<u8> {
    let mut entries = Vec::with_capacity(DIRS * (FILES_PER_DIR + 1));
    let mut offset = 100u64;
    for d in 0..DIRS {
        entries.push(serde_json::json!({
            "name": format!("usr/share/pkg{d:04}/"),
            "type": "dir",
            "modtime": "2023-11-14T22:13:20Z",
            "mode": 0o755,
        }));
        for f in 0..FILES_PER_DIR {
            let digest = Digest::sha256_of(format!("{d}/{f}").as_bytes()).to_string();
            entries.push(serde_json::json!({
                "name": format!("usr/share/pkg{d:04}/file-{f:03}.txt"),
                "type": "reg",
                "size": 1000 + f,
                "modtime": "2023-11-14T22:13:20Z",
                "mode": 0o644,
                "uid": 1000,
                "gid": 1000,
                "offset": offset,
                "digest": digest,
                "chunkDigest": digest,
            }));
            offset += 400;
        }
    }
    let toc = serde_json::json!({"version": 1, "entries": entries});
    let mut json = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"\t");
    let mut serializer = serde_json::Serializer::with_formatter(&mut json, formatter);
    serde::Serialize::serialize(&toc, &mut serializer).unwrap();
    json
}

fn toc_parse(c: &mut Criterion) {
    let json = synthetic_toc_json();
    let toc_offset = 100 + (DIRS * FILES_PER_DIR) as u64 * 400;
    let compressed = zstd::stream::encode_all(&json[..], 3).unwrap();
    let footer = Footer {
        format: LayerFormat::ZstdChunked,
        toc_offset: CompressedOffset(toc_offset),
        toc_size: compressed.len() as u64,
        toc_json_size: Some(json.len() as u64),
    };
    let blob_size = toc_offset + compressed.len() as u64 + 48;
    let limits = TocLimits::default();
    eprintln!(
        "synthetic TOC: {} entries, {} bytes of JSON, {} bytes zstd",
        DIRS * (FILES_PER_DIR + 1),
        json.len(),
        compressed.len()
    );

    let mut group = c.benchmark_group("toc_parse_100k");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(10));
    group.bench_function("json_to_index", |b| {
        b.iter(|| {
            let index = parse_toc_json(
                black_box(&json),
                LayerFormat::ZstdChunked,
                CompressedOffset(toc_offset),
                blob_size,
                &limits,
            )
            .unwrap();
            assert_eq!(index.entries.len(), DIRS * (FILES_PER_DIR + 1) + 3);
            index
        })
    });
    group.bench_function("zstd_toc_to_index", |b| {
        b.iter(|| parse_toc(&footer, black_box(&compressed), None, blob_size).unwrap())
    });
    group.finish();
}

criterion_group!(benches, toc_parse);
criterion_main!(benches);

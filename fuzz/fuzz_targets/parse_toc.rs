#![no_main]
//! Compressed TOC bytes (gzip'd tar for eStargz, a zstd frame for zstd:chunked)
//! must validate into a consistent index or fail cleanly, within the limits.

use libfuzzer_sys::fuzz_target;
use sluice::format::{
    CompressedOffset, EntryKind, Footer, LayerFormat, TocLimits, parse_toc_with_limits,
};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, toc)) = data.split_first() else {
        return;
    };
    let format = if selector & 1 == 0 {
        LayerFormat::Estargz
    } else {
        LayerFormat::ZstdChunked
    };
    let toc_offset = 1 << 20;
    let footer = Footer {
        format,
        toc_offset: CompressedOffset(toc_offset),
        toc_size: toc.len() as u64,
        toc_json_size: None,
    };
    let limits = TocLimits {
        max_entries: 10_000,
        max_toc_json_bytes: 4 << 20,
        ..TocLimits::default()
    };
    let blob_size = toc_offset + toc.len() as u64 + 51;
    if let Ok(parsed) = parse_toc_with_limits(&footer, toc, None, blob_size, &limits) {
        check(&parsed.index);
    }
});

fn check(index: &sluice::format::LayerIndex) {
    assert_eq!(index.entries[0].name, "");
    for (i, entry) in index.entries.iter().enumerate() {
        if let EntryKind::Regular { size, chunks } = &entry.kind {
            let mut next = 0;
            for chunk in chunks {
                assert_eq!(chunk.file_offset.0, next);
                assert!(chunk.compressed_size > 0);
                assert!(chunk.compressed_offset.0 + chunk.compressed_size <= index.toc_offset.0);
                next += chunk.size;
            }
            assert!(chunks.is_empty() && *size == 0 || next == *size);
        }
        if let EntryKind::Hardlink { target } = entry.kind {
            assert!((target.0 as usize) < i);
        }
        if i > 0 {
            let parent = entry.name.rsplit_once('/').map_or("", |(p, _)| p);
            assert!(
                index.entries[..i].iter().any(|e| e.name == parent),
                "parent of {} missing",
                entry.name
            );
        }
    }
}

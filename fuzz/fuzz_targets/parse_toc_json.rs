#![no_main]
//! TOC JSON straight into validation (skipping decompression, so the fuzzer spends
//! its time on the JSON decoder and the entry checks).

use libfuzzer_sys::fuzz_target;
use sluice::format::{CompressedOffset, EntryKind, LayerFormat, TocLimits, parse_toc_json};

fuzz_target!(|json: &[u8]| {
    let limits = TocLimits {
        max_entries: 10_000,
        ..TocLimits::default()
    };
    if let Ok(index) = parse_toc_json(
        json,
        LayerFormat::Estargz,
        CompressedOffset(1 << 20),
        2 << 20,
        &limits,
    ) {
        assert_eq!(index.entries[0].kind, EntryKind::Directory);
        let mut names: Vec<&str> = index.entries.iter().map(|e| e.name.as_str()).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "duplicate names in the index");
    }
});

#![no_main]
//! Any blob tail must give a footer that lies inside the blob, or an error.

use libfuzzer_sys::fuzz_target;
use sluice::format::{MAX_FOOTER_SIZE, parse_footer};

fuzz_target!(|data: &[u8]| {
    // The first 8 bytes pick the blob size, the rest is its tail.
    let (size, tail) = match data.split_first_chunk::<8>() {
        Some((size, tail)) => (u64::from_le_bytes(*size), tail),
        None => (data.len() as u64, data),
    };
    let tail = &tail[tail.len().saturating_sub(MAX_FOOTER_SIZE as usize)..];
    if let Ok(footer) = parse_footer(tail, size) {
        let range = footer.toc_range();
        assert!(footer.toc_size > 0);
        assert!(range.end <= size - tail.len().min(47) as u64);
    }
});

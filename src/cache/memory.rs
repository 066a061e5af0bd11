//! Hot decompressed chunks in memory, bounded by bytes. Sharded by chunk key so
//! concurrent readers of different chunks never contend on one lock.

use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use lru::LruCache;

use super::ChunkKey;

struct Shard {
    chunks: LruCache<ChunkKey, Bytes>,
    bytes: u64,
}

pub(crate) struct MemoryCache {
    shards: Box<[Mutex<Shard>]>,
    shard_capacity: u64,
}

impl MemoryCache {
    pub(crate) fn new(capacity_bytes: u64, shards: usize) -> Self {
        let shards = shards.max(1);
        Self {
            shards: (0..shards)
                .map(|_| {
                    Mutex::new(Shard {
                        chunks: LruCache::unbounded(),
                        bytes: 0,
                    })
                })
                .collect(),
            shard_capacity: capacity_bytes / shards as u64,
        }
    }

    fn shard(&self, key: &ChunkKey) -> &Mutex<Shard> {
        &self.shards[key.shard_hint() % self.shards.len()]
    }

    pub(crate) fn get(&self, key: &ChunkKey) -> Option<Bytes> {
        let mut shard = self
            .shard(key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        shard.chunks.get(key).cloned()
    }

    pub(crate) fn insert(&self, key: ChunkKey, data: Bytes) {
        let len = data.len() as u64;
        // A chunk larger than a whole shard would only evict everything else and then
        // itself; the disk cache serves it instead.
        if len > self.shard_capacity {
            return;
        }
        let mut shard = self
            .shard(&key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(old) = shard.chunks.put(key, data) {
            shard.bytes -= old.len() as u64;
        }
        shard.bytes += len;
        while shard.bytes > self.shard_capacity {
            match shard.chunks.pop_lru() {
                Some((_, evicted)) => shard.bytes -= evicted.len() as u64,
                None => break,
            }
        }
    }

    /// Bytes currently held, summed over shards.
    pub(crate) fn resident_bytes(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).bytes)
            .sum()
    }
}

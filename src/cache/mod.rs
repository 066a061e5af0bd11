//! Chunk cache: on disk, content-addressed by chunk digest; hot chunks in memory.

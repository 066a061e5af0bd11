//! The read-only FUSE filesystem of one lazily fetched layer.

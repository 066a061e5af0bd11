//! sluice: a containerd remote snapshotter that starts containers before their images
//! have been downloaded.
//!
//! # Map
//!
//! | module       | owns |
//! |--------------|------|
//! | [`registry`] | the OCI distribution client: references, auth, mirrors, manifests, range GETs, retries. Defines [`registry::BlobSource`], the one boundary the lower layers see. |
//! | [`format`]   | eStargz / zstd:chunked: footer, TOC, validation into a [`format::LayerIndex`], chunk decompression. |
//! | [`cache`]    | chunks on disk (content-addressed, atomic writes), hot chunks in memory, single-flight fetches, background streaming of a layer. |
//! | [`fs`]       | the read-only FUSE filesystem of one layer, built from its index. |
//! | [`snapshot`] | the containerd snapshotter: snapshot metadata (redb), overlay mounts, the gRPC service, the hook for remote layers. |
//! | [`api`]      | containerd's snapshots gRPC API, generated from proto/. |
//! | [`convert`]  | `sluice convert`: rewrite an image's layers as eStargz / zstd:chunked with prefetch-ordered files; OCI layouts and registries (push). |
//! | [`config`]   | TOML configuration shared by the daemon and the CLI. |
//! | [`prefetch`] | static prefetch lists: the files a container's start reads, from the image rootfs and config ([`prefetch::analyze_entrypoint`]). |
//! | [`profile`]  | `sluice profile`: record the files one run of an image reads (the daemon's [`profile::Recorder`] and `sluice.v1.Profiler` service) and merge them with the static list into a prefetch file. |
//! | [`pull`]     | `sluice pull`: pulls an image into containerd through its gRPC API, letting the snapshotter mount layers lazily and downloading only the others. |
//! | [`metrics`]  | counters in Prometheus text format. |
//! | [`bench`]    | `sluice bench`: cold container start-up latency through containerd over a shaped network. |
//!
//! # How a read travels
//!
//! 1. The kernel sends `READ(inode, offset, size)` to a FUSE worker thread in [`fs`].
//! 2. [`fs`] maps the inode to a file in the [`format::LayerIndex`], picks the chunks that
//!    cover the range, and hands the request to the tokio runtime; the FUSE thread returns
//!    to the kernel at once.
//! 3. [`cache`] answers each chunk from memory, else from disk, else joins or starts one
//!    registry fetch per run of adjacent missing chunks (single flight).
//! 4. [`registry`] sends one `Range` GET for that run, with retries and a timeout.
//! 5. [`format::decompress_chunk`] turns each member into data, which is checked against
//!    the chunk's digest, written to disk atomically, kept in memory, and returned.
//! 6. [`fs`] copies the requested slice into the reply. Content is immutable, so the
//!    kernel keeps it in its page cache and later reads never reach sluice.

pub mod api;
pub mod bench;
pub mod cache;
pub mod config;
pub mod convert;
pub mod digest;
pub mod format;
pub mod fs;
pub mod layer;
pub mod lazy;
pub mod metrics;
pub mod prefetch;
pub mod profile;
pub mod pull;
pub mod registry;
pub mod snapshot;

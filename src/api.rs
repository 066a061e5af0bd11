//! containerd's snapshots API v1 and sluice's own API, generated from proto/ by build.rs.
//!
//! `containerd::services::snapshots::v1` holds the messages, the server
//! (`snapshots_server`) and a client (`snapshots_client`, used by tests and tools);
//! `containerd::types::Mount` is the mount description returned to containerd.
//!
//! `sluice::v1` is sluice's own API (proto/sluice/v1/), served on the same socket:
//! `profiler_server` / `profiler_client` record which files a run reads.

// Generated code: its style is prost's and tonic's, not ours.
#![allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]

include!(concat!(env!("OUT_DIR"), "/containerd_api.rs"));

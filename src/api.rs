//! containerd's snapshots API v1, generated from proto/ by build.rs.
//!
//! `containerd::services::snapshots::v1` holds the messages, the server
//! (`snapshots_server`) and a client (`snapshots_client`, used by tests and tools);
//! `containerd::types::Mount` is the mount description returned to containerd.

// Generated code: its style is prost's and tonic's, not ours.
#![allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]

include!(concat!(env!("OUT_DIR"), "/containerd_api.rs"));

//! Shared test harness: real registry, HTTP fault-injecting proxy, private containerd,
//! offline test images and tree comparison. Every test binary includes this with
//! `mod common;` and uses only part of it.
//!
//! | module         | gives |
//! |----------------|-------|
//! | [`registry`]   | `TestRegistry`: Debian `docker-registry` on a free port; requests and bytes counted from its access log; stop/restart; optional htpasswd |
//! | [`proxy`]      | `TestProxy`: loopback HTTP proxy that counts, corrupts chosen blob ranges, fails, hangs or stalls mid-body |
//! | [`containerd`] | `TestContainerd`: private containerd 1.6 (isolated content, optional CRI, optional proxy snapshotter) with `ctr`/`ctr-remote` helpers |
//! | [`images`]     | build tools/mkimage.py images (`everything`, `busybox`), convert to eStargz / zstd:chunked, push, read manifests back |
//! | [`pyimage`]    | the `python` image of tools/mkbenchimages (Debian bookworm + python3), built once |
//! | [`mount`]      | `LayerMount`: one layer through `sluice mount` as a child process; `is_mountpoint` |
//! | [`toc`]        | independent TOC reader: which blob bytes hold which chunk of which file |
//! | [`tree`]       | extract a layer with GNU tar, convert whiteouts as a snapshotter presents them, compare trees |
//!
//! A typical test:
//!
//! ```ignore
//! let registry = TestRegistry::start(RegistryOptions::default());
//! let containerd = TestContainerd::start(ContainerdOptions::default());
//! let image = images::publish(&containerd, &registry, "everything", ImageFormat::Estargz);
//! let proxy = TestProxy::start(registry.addr());          // optional, for faults
//! // ... mount image.layers[0] through sluice from proxy.host() ...
//! let expected = short_tempdir("expected-");
//! tree::expected_layer_tree(&image.local_layer(0), expected.path());
//! tree::assert_trees_equal(expected.path(), mountpoint);
//! ```
#![allow(dead_code)]

pub mod containerd;
pub mod images;
pub mod mount;
pub mod proxy;
pub mod pyimage;
pub mod registry;
pub mod snapshotter;
pub mod toc;
pub mod tree;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// An unused TCP port on 127.0.0.1. The port is released before returning, so a
/// process started right after can bind it (a tiny race with other tests is handled by
/// the callers retrying on bind failure).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port on 127.0.0.1");
    listener
        .local_addr()
        .expect("local address of ephemeral listener")
        .port()
}

/// Poll `condition` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One blocking HTTP/1.1 GET without any client library, used for readiness probes and
/// log markers. Returns the status code.
pub fn http_get_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    http_get(addr, path).map(|(status, _)| status)
}

/// `GET path` over plain HTTP/1.1: the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no HTTP status line from {addr}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Run a command to completion; Ok(stdout) on success, Err with the command line,
/// exit status and stderr otherwise.
pub fn run_command(command: &mut Command) -> Result<String, String> {
    let output = command
        .output()
        .map_err(|e| format!("spawning {command:?}: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{command:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// Root of the repository (where Cargo.toml lives).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `target/test-fixtures/`, a cache for built test images shared by test runs.
pub fn fixtures_dir() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
        .join("test-fixtures");
    std::fs::create_dir_all(&dir).expect("create target/test-fixtures");
    dir
}

/// Whether the process can do what integration tests need: root and /dev/fuse.
pub fn have_root_and_fuse() -> bool {
    nix::unistd::geteuid().is_root() && Path::new("/dev/fuse").exists()
}

/// A temp dir under /tmp with a short path: unix socket paths must stay below 108 bytes.
pub fn short_tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .expect("create temp dir under /tmp")
}

/// Lowercase hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(data))
}

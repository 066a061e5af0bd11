//! Proves the test harness itself works: if these fail, every other integration test
//! result is meaningless.

mod common;

use std::process::Command;

use common::proxy::TestProxy;
use common::registry::{RegistryOptions, TestRegistry};

/// Deterministic, incompressible-looking bytes.
fn pattern(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn curl(args: &[&str]) -> Result<Vec<u8>, String> {
    let output = Command::new("curl")
        .args(["-sS", "-f"])
        .args(args)
        .output()
        .map_err(|e| format!("spawning curl: {e}"))?;
    if output.status.success() {
        Ok(output.stdout)
    } else {
        Err(format!(
            "curl {args:?}: {} {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

#[test]
fn registry_access_log_counts_bytes_per_request() {
    let mut registry = TestRegistry::start(RegistryOptions::default());
    let data = pattern(100_000);
    let digest = registry.upload_blob("smoke/blob", &data);
    let url = format!("{}/v2/smoke/blob/blobs/{digest}", registry.url());

    let mark = registry.mark();
    let part = curl(&["-H", "Range: bytes=1000-1999", &url]).unwrap();
    assert_eq!(part, &data[1000..2000]);
    let usage = registry.since(mark);
    assert_eq!(usage.requests, 1);
    assert_eq!(usage.bytes, 1000);
    assert_eq!(registry.blob_bytes_since(mark, &digest), 1000);

    let whole = curl(&[&url]).unwrap();
    assert_eq!(whole, data);
    assert_eq!(registry.blob_bytes_since(mark, &digest), 101_000);
    let records = registry.records_since(mark);
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].status, 206);
    assert_eq!(records[1].status, 200);

    let before_reset = registry.requests();
    assert!(before_reset >= 3, "upload + 2 reads, got {before_reset}");
    registry.reset_counters();
    assert_eq!(registry.requests(), 0);
    assert_eq!(registry.served_bytes(), 0);
}

#[test]
fn registry_restarts_on_same_port_with_same_storage() {
    let mut registry = TestRegistry::start(RegistryOptions::default());
    let data = pattern(5000);
    let digest = registry.upload_blob("smoke/restart", &data);
    let url = format!("{}/v2/smoke/restart/blobs/{digest}", registry.url());
    let host = registry.host();

    registry.stop();
    assert!(!registry.is_running());
    assert!(curl(&["--max-time", "5", &url]).is_err());

    registry.restart();
    assert_eq!(registry.host(), host);
    assert_eq!(curl(&[&url]).unwrap(), data);
}

#[test]
fn registry_with_htpasswd_requires_credentials() {
    let registry = TestRegistry::start(RegistryOptions {
        htpasswd: Some(("tester".into(), "s3cret".into())),
    });
    let url = format!("{}/v2/", registry.url());
    assert!(curl(&[&url]).is_err(), "anonymous access must be refused");
    assert!(curl(&["-u", "tester:wrong", &url]).is_err());
    curl(&["-u", "tester:s3cret", &url]).unwrap();
    let digest = registry.upload_blob("smoke/auth", b"authenticated");
    let blob = format!("{}/v2/smoke/auth/blobs/{digest}", registry.url());
    assert_eq!(
        curl(&["-u", "tester:s3cret", &blob]).unwrap(),
        b"authenticated"
    );
}

#[test]
fn proxy_forwards_counts_and_corrupts_only_the_chosen_range() {
    let mut registry = TestRegistry::start(RegistryOptions::default());
    let data = pattern(200_000);
    let digest = registry.upload_blob("smoke/proxy", &data);
    let proxy = TestProxy::start(registry.addr());
    let url = format!("{}/v2/smoke/proxy/blobs/{digest}", proxy.url());

    let part = curl(&["-H", "Range: bytes=0-4095", &url]).unwrap();
    assert_eq!(part, &data[..4096]);
    assert_eq!(proxy.requests(), 1);
    assert_eq!(proxy.served_bytes(), 4096);
    assert_eq!(
        registry.blob_bytes_since(common::registry::LogMark::default(), &digest),
        4096
    );

    proxy.corrupt_blob_range(&digest, 10_000..10_010);
    // A range that does not overlap stays intact.
    let clean = curl(&["-H", "Range: bytes=0-9999", &url]).unwrap();
    assert_eq!(clean, &data[..10_000]);
    // An overlapping range has exactly the chosen bytes flipped.
    let tampered = curl(&["-H", "Range: bytes=9995-10019", &url]).unwrap();
    assert_eq!(tampered.len(), 25);
    for (i, byte) in tampered.iter().enumerate() {
        let offset = 9995 + i;
        if (10_000..10_010).contains(&offset) {
            assert_eq!(*byte, !data[offset], "offset {offset} must be corrupted");
        } else {
            assert_eq!(*byte, data[offset], "offset {offset} must be intact");
        }
    }
    // So does a whole-blob GET.
    let whole = curl(&[&url]).unwrap();
    assert_eq!(whole.len(), data.len());
    assert_ne!(whole, data);
    assert_eq!(proxy.corrupted_responses(), 2);

    proxy.clear_corruption();
    assert_eq!(curl(&[&url]).unwrap(), data);
    let records = proxy.records();
    assert_eq!(records.len(), 5);
    assert_eq!(records[2].range.as_deref(), Some("bytes=9995-10019"));
    assert!(records[2].corrupted);
}

#[test]
fn proxy_hang_holds_requests_until_released() {
    let registry = TestRegistry::start(RegistryOptions::default());
    let digest = registry.upload_blob("smoke/hang", b"held");
    let proxy = TestProxy::start(registry.addr());
    let url = format!("{}/v2/smoke/hang/blobs/{digest}", proxy.url());

    proxy.set_hang(true);
    let err = curl(&["--max-time", "1", &url]).unwrap_err();
    assert!(
        err.contains("exit status: 28"),
        "expected a curl timeout: {err}"
    );
    assert_eq!(proxy.requests(), 0);

    // A request held while hanging completes once released.
    let held = std::thread::spawn({
        let url = url.clone();
        move || curl(&["--max-time", "30", &url])
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    proxy.set_hang(false);
    assert_eq!(held.join().unwrap().unwrap(), b"held");
    assert_eq!(curl(&[&url]).unwrap(), b"held");
}

#[test]
fn containerd_runs_privately_and_is_cleaned_up() {
    if !common::have_root_and_fuse() {
        panic!("integration tests need root and /dev/fuse");
    }
    let snapshotter_dir = common::short_tempdir("sluice-snap-");
    let snapshotter_socket = snapshotter_dir.path().join("snap.sock");
    // containerd dials proxy plugins lazily; a listening socket is enough to register it.
    let _listener = std::os::unix::net::UnixListener::bind(&snapshotter_socket).unwrap();
    let containerd =
        common::containerd::TestContainerd::start(common::containerd::ContainerdOptions {
            proxy_snapshotter: Some(("smoke-snap".into(), snapshotter_socket.clone())),
            ..Default::default()
        });
    assert!(containerd.socket().starts_with("/tmp"));
    let version = containerd.ctr(&["version"]).unwrap();
    assert!(version.contains("Server:"), "{version}");
    let plugins = containerd.ctr(&["plugins", "ls"]).unwrap();
    let proxy_line = plugins
        .lines()
        .find(|l| l.contains("smoke-snap"))
        .unwrap_or_else(|| panic!("proxy snapshotter not registered:\n{plugins}"));
    assert!(
        proxy_line.contains("io.containerd.snapshotter.v1"),
        "{proxy_line}"
    );
    assert!(
        !plugins
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("cri")),
        "CRI must be disabled unless asked:\n{plugins}"
    );
    let err = containerd
        .ctr(&["images", "pull", "--plain-http", "127.0.0.1:1/none:latest"])
        .unwrap_err();
    assert!(err.contains("stderr"), "{err}");

    let pid = containerd.pid().unwrap();
    drop(containerd);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "containerd {pid} must be gone after drop"
    );
}

#[test]
fn containerd_with_cri_loads_the_cri_plugin() {
    let containerd =
        common::containerd::TestContainerd::start(common::containerd::ContainerdOptions {
            enable_cri: true,
            ..Default::default()
        });
    let plugins = containerd.ctr(&["plugins", "ls"]).unwrap();
    let cri = plugins
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("cri"))
        .unwrap_or_else(|| panic!("CRI plugin missing:\n{plugins}"));
    assert_eq!(cri.split_whitespace().last(), Some("ok"), "{cri}");
}

#[test]
fn images_convert_push_and_carry_toc_annotations() {
    use common::images::{ImageFormat, publish_all};
    let mut registry = TestRegistry::start(RegistryOptions::default());
    let containerd =
        common::containerd::TestContainerd::start(common::containerd::ContainerdOptions::default());
    let published = publish_all(&containerd, &registry, "everything");

    for format in ImageFormat::ALL {
        let image = published.get(format);
        assert_eq!(image.layers.len(), 3, "{format:?}: {:#?}", image.manifest);
        assert_eq!(image.diff_ids.len(), 3);
        for (index, layer) in image.layers.iter().enumerate() {
            let local = std::fs::metadata(image.local_layer(index)).unwrap();
            assert_eq!(local.len(), layer.size, "{format:?} layer {index}");
            match format {
                ImageFormat::Gzip => assert!(layer.toc_digest().is_none()),
                _ => assert!(
                    layer.toc_digest().is_some_and(|d| d.starts_with("sha256:")),
                    "{format:?} layer {index} lacks the TOC digest annotation: {layer:#?}"
                ),
            }
        }
    }
    assert_ne!(
        published.estargz.layers[0].digest,
        published.gzip.layers[0].digest
    );
    assert_ne!(
        published.zstdchunked.layers[0].digest,
        published.estargz.layers[0].digest
    );
    // The three variants have the same uncompressed content.
    assert_eq!(
        published.estargz.diff_ids.len(),
        published.gzip.diff_ids.len()
    );

    // Fetching a range of a pushed layer shows up in the registry's access log.
    let layer = &published.estargz.layers[0];
    let url = published.estargz.blob_url(&registry.url(), &layer.digest);
    let mark = registry.mark();
    let bytes = curl(&["-H", "Range: bytes=100-4195", &url]).unwrap();
    assert_eq!(bytes.len(), 4096);
    let local = std::fs::read(published.estargz.local_layer(0)).unwrap();
    assert_eq!(bytes, &local[100..4196]);
    assert_eq!(registry.blob_bytes_since(mark, &layer.digest), 4096);
}

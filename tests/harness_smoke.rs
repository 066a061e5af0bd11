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
    let registry = TestRegistry::start(RegistryOptions::default());
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

    registry.delete_blob("smoke/blob", &digest);
    assert!(curl(&[&url]).is_err(), "deleted blob must be gone");

    let before_reset = registry.requests();
    assert!(
        before_reset >= 5,
        "upload + 2 reads + delete + read, got {before_reset}"
    );
    registry.reset_counters();
    assert_eq!(registry.requests(), 0);
    assert_eq!(registry.served_bytes(), 0);
}

#[test]
fn registry_restarts_on_same_port_with_same_storage() {
    let registry = TestRegistry::start(RegistryOptions::default());
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
        ..RegistryOptions::default()
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
    let registry = TestRegistry::start(RegistryOptions::default());
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

    proxy.fail_next(2, 503);
    for _ in 0..2 {
        let err = curl(&[&url]).unwrap_err();
        assert!(err.contains("503"), "{err}");
    }
    assert_eq!(curl(&[&url]).unwrap(), data);

    let records = proxy.records();
    assert_eq!(records.len(), 8);
    assert_eq!(records[5].status, 503);
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

    // Stalling mid-body: the client gets part of the body, then nothing.
    proxy.set_stall_mid_body(true);
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "1", &url])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(28), "expected a curl timeout");
    assert_eq!(output.stdout, b"he");
    proxy.set_stall_mid_body(false);
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
    let registry = TestRegistry::start(RegistryOptions::default());
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

#[test]
fn tree_comparison_accepts_identical_trees_and_finds_planted_differences() {
    use common::tree::{compare_trees, expected_layer_tree, set_xattr};
    use std::os::unix::fs::PermissionsExt;
    let image = common::images::build_image("everything");
    let work = common::short_tempdir("sluice-tree-");
    let blob = image.blob_path(&image.layers[0].digest);
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    expected_layer_tree(&blob, &a);
    expected_layer_tree(&blob, &b);
    let diff = compare_trees(&a, &b);
    assert!(diff.is_empty(), "{diff}");

    // The extraction kept what the image declares.
    let meta = std::fs::symlink_metadata(a.join("devices/null")).unwrap();
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    assert!(meta.file_type().is_char_device());
    assert_eq!(meta.rdev(), nix::sys::stat::makedev(1, 3));
    assert_eq!(
        std::fs::metadata(a.join("data/hard-orig")).unwrap().nlink(),
        3
    );
    assert_eq!(
        std::fs::metadata(a.join("bin/suid")).unwrap().mode() & 0o7777,
        0o4755
    );
    let xattrs = common::tree::read_xattrs(&a.join("data/xattrs"));
    assert_eq!(
        xattrs.get("user.comment").map(Vec::as_slice),
        Some(&b"hello sluice"[..])
    );
    assert_eq!(
        xattrs.get("trusted.sluice").map(Vec::as_slice),
        Some(&b"trusted value"[..])
    );
    assert_eq!(
        std::fs::metadata(a.join("data/big.bin")).unwrap().len(),
        52 * 1024 * 1024 + 12_345
    );

    // Plant one difference of each kind in b.
    std::fs::write(b.join("data/small/f000.txt"), b"changed").unwrap();
    std::fs::set_permissions(b.join("bin/suid"), std::fs::Permissions::from_mode(0o755)).unwrap();
    set_xattr(&b.join("data/empty"), "user.planted", b"1");
    std::fs::remove_file(b.join("data/link-rel")).unwrap();
    std::os::unix::fs::symlink("elsewhere", b.join("data/link-abs.new")).unwrap();
    std::os::unix::fs::lchown(b.join("data/owned-nobody"), Some(1), None).unwrap();
    std::fs::remove_file(b.join("data/hard-link1")).unwrap();
    std::fs::copy(b.join("data/hard-orig"), b.join("data/hard-link1")).unwrap();
    let diff = compare_trees(&a, &b);
    let text = diff.to_string();
    for needle in [
        "data/small/f000.txt: expected regular file",
        "bin/suid: mode expected 104755, found 100755",
        "data/empty: xattrs expected {}, found {user.planted=\"1\"}",
        "data/link-rel: missing",
        "data/link-abs.new: unexpected symlink",
        "data/owned-nobody: owner expected 65534:65534, found 1:65534",
        "data/hard-orig: nlink expected 3, found 2",
        "hard links expected to share one inode",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in {text}");
    }
}

#[test]
fn whiteouts_become_overlay_whiteouts_and_converted_layers_match_the_original() {
    use common::images::{ImageFormat, publish_all};
    use common::tree::{compare_trees, expected_layer_tree, read_xattrs};
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let registry = TestRegistry::start(RegistryOptions::default());
    let containerd =
        common::containerd::TestContainerd::start(common::containerd::ContainerdOptions::default());
    let published = publish_all(&containerd, &registry, "everything");
    let work = common::short_tempdir("sluice-wh-");
    for index in 0..3 {
        let original = work.path().join(format!("gzip-{index}"));
        expected_layer_tree(&published.gzip.local_layer(index), &original);
        for format in [ImageFormat::Estargz, ImageFormat::ZstdChunked] {
            let converted = work.path().join(format!("{}-{index}", format.tag()));
            expected_layer_tree(&published.get(format).local_layer(index), &converted);
            assert!(!converted.join("stargz.index.json").exists());
            let diff = compare_trees(&original, &converted);
            assert!(diff.is_empty(), "{format:?} layer {index}: {diff}");
        }
    }
    let upper = work.path().join("gzip-1");
    let whiteout = std::fs::symlink_metadata(upper.join("data/to-delete")).unwrap();
    assert!(whiteout.file_type().is_char_device());
    assert_eq!(whiteout.rdev(), 0);
    assert!(!upper.join("data/.wh.to-delete").exists());
    assert!(
        std::fs::symlink_metadata(upper.join("data/nested/gone-dir"))
            .unwrap()
            .file_type()
            .is_char_device()
    );
    assert!(!upper.join("data/opaque-dir/.wh..wh..opq").exists());
    assert_eq!(
        read_xattrs(&upper.join("data/opaque-dir"))
            .get("trusted.overlay.opaque")
            .map(Vec::as_slice),
        Some(&b"y"[..])
    );
}

#[test]
fn busybox_image_runs_a_container() {
    use common::images::{ImageFormat, publish};
    let registry = TestRegistry::start(RegistryOptions::default());
    let containerd =
        common::containerd::TestContainerd::start(common::containerd::ContainerdOptions::default());
    let image = publish(&containerd, &registry, "busybox", ImageFormat::Gzip);
    assert_eq!(image.layers.len(), 2);
    containerd
        .ctr(&["images", "pull", "--plain-http", &image.reference])
        .unwrap();
    let output = containerd
        .ctr(&["run", "--rm", &image.reference, "smoke-hello"])
        .unwrap();
    assert_eq!(output.trim(), "hello from sluice");
    let output = containerd
        .ctr(&[
            "run",
            "--rm",
            &image.reference,
            "smoke-sh",
            "/bin/sh",
            "-c",
            "echo $((6*7))",
        ])
        .unwrap();
    assert_eq!(output.trim(), "42");
}

#[test]
fn toc_reader_locates_every_chunk_of_the_big_file() {
    use common::images::{ImageFormat, publish};
    use common::toc::{decompress_range, read_toc};
    let registry = TestRegistry::start(RegistryOptions::default());
    let containerd =
        common::containerd::TestContainerd::start(common::containerd::ContainerdOptions::default());
    let image = common::images::build_image("everything");
    let work = common::short_tempdir("sluice-toc-");
    common::tree::extract_layer(&image.blob_path(&image.layers[0].digest), work.path());
    let big = std::fs::read(work.path().join("data/big.bin")).unwrap();

    for format in [ImageFormat::Estargz, ImageFormat::ZstdChunked] {
        let pushed = publish(&containerd, &registry, "everything", format);
        let layer = &pushed.layers[0];
        let toc = read_toc(&pushed.local_layer(0), layer);
        assert!(toc.toc_offset < layer.size);
        let blob = std::fs::read(pushed.local_layer(0)).unwrap();
        let chunks = toc.chunks_of("data/big.bin");
        assert!(chunks.len() >= 52, "{format:?}: {} chunks", chunks.len());
        let mut covered = 0;
        for chunk in &chunks {
            assert_eq!(
                chunk.chunk_offset, covered,
                "{format:?}: chunks must be contiguous"
            );
            let decompressed = decompress_range(
                &blob,
                chunk.blob_range(),
                format == ImageFormat::ZstdChunked,
            );
            let range = chunk.file_range();
            // The range may run on into the next entry's tar header; the chunk is its prefix.
            assert!(decompressed.len() as u64 >= chunk.chunk_size);
            let data = &decompressed[..chunk.chunk_size as usize];
            assert!(
                data == &big[range.start as usize..range.end as usize],
                "{format:?} chunk at {} does not hold the file's bytes",
                chunk.chunk_offset
            );
            if let Some(digest) = &chunk.chunk_digest {
                assert_eq!(digest, &format!("sha256:{}", common::sha256_hex(data)));
            }
            covered = range.end;
        }
        assert_eq!(covered, big.len() as u64);
    }
}

#[test]
fn images_publish_to_a_registry_requiring_credentials() {
    use common::images::{ImageFormat, publish};
    let registry = TestRegistry::start(RegistryOptions {
        htpasswd: Some(("pusher".into(), "pw".into())),
        ..RegistryOptions::default()
    });
    let containerd =
        common::containerd::TestContainerd::start(common::containerd::ContainerdOptions::default());
    let image = publish(&containerd, &registry, "busybox", ImageFormat::Estargz);
    assert_eq!(image.layers.len(), 2);
    assert!(image.layers.iter().all(|l| l.toc_digest().is_some()));
    let url = image.blob_url(&registry.url(), &image.layers[0].digest);
    assert!(curl(&[&url]).is_err(), "anonymous pull must be refused");
    let blob = curl(&["-u", "pusher:pw", &url]).unwrap();
    assert_eq!(blob.len() as u64, image.layers[0].size);
}

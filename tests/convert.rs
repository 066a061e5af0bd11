//! Issue "Image conversion with prefetch indexes": `sluice convert` against OCI layouts
//! built by tools/mkimage.py, the real docker-registry and real containerd.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::containerd::{ContainerdOptions, TestContainerd};
use common::images::{ImageFormat, build_image, publish};
use common::mount::LayerMount;
use common::registry::{RegistryOptions, TestRegistry};
use common::tree::{compare_trees, expected_layer_tree};
use serde_json::Value;
use sluice::digest::Digest;
use sluice::format::{EntryKind, LayerFormat, parse_footer, parse_toc};

const FORMATS: [(&str, LayerFormat); 2] = [
    ("estargz", LayerFormat::Estargz),
    ("zstd-chunked", LayerFormat::ZstdChunked),
];

fn sluice(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .output()
        .expect("run sluice")
}

fn convert_ok(args: &[&str]) -> String {
    let mut all = vec!["convert"];
    all.extend_from_slice(args);
    let out = sluice(&all);
    assert!(
        out.status.success(),
        "sluice {all:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    let (_, hex) = digest.split_once(':').unwrap();
    layout.join("blobs/sha256").join(hex)
}

/// The single image manifest of a layout (following one index level).
fn layout_manifest(layout: &Path) -> Value {
    let index = read_json(&layout.join("index.json"));
    let mut doc = read_json(&blob(
        layout,
        index["manifests"][0]["digest"].as_str().unwrap(),
    ));
    if doc.get("manifests").is_some() {
        doc = read_json(&blob(
            layout,
            doc["manifests"][0]["digest"].as_str().unwrap(),
        ));
    }
    doc
}

fn layer_digests(manifest: &Value) -> Vec<String> {
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect()
}

/// Parses a converted blob with sluice's reader, checking the descriptor's annotations.
fn read_index(blob_path: &Path, descriptor: &Value) -> sluice::format::LayerIndex {
    let bytes = std::fs::read(blob_path).unwrap();
    let size = bytes.len() as u64;
    assert_eq!(descriptor["size"].as_u64(), Some(size));
    let tail = &bytes[bytes.len() - sluice::format::MAX_FOOTER_SIZE as usize..];
    let footer = parse_footer(tail, size).unwrap();
    let toc_digest: Digest = descriptor["annotations"][sluice::format::TOC_DIGEST_ANNOTATION]
        .as_str()
        .expect("toc digest annotation")
        .parse()
        .unwrap();
    let range = footer.toc_range();
    parse_toc(
        &footer,
        &bytes[range.start as usize..range.end as usize],
        Some(&toc_digest),
        size,
    )
    .unwrap()
    .index
}

fn decompressed_digest(blob_path: &Path) -> (String, u64) {
    let bytes = std::fs::read(blob_path).unwrap();
    let mut data = Vec::new();
    if bytes.starts_with(&[0x1f, 0x8b]) {
        std::io::Read::read_to_end(
            &mut flate2::read::MultiGzDecoder::new(&bytes[..]),
            &mut data,
        )
        .unwrap();
    } else {
        std::io::Read::read_to_end(
            &mut zstd::stream::read::Decoder::new(&bytes[..]).unwrap(),
            &mut data,
        )
        .unwrap();
    }
    (Digest::sha256_of(&data).to_string(), data.len() as u64)
}

fn assert_same_tree(original: &Path, converted: &Path, what: &str) {
    let scratch = tempfile::tempdir().unwrap();
    let (a, b) = (scratch.path().join("a"), scratch.path().join("b"));
    expected_layer_tree(original, &a);
    expected_layer_tree(converted, &b);
    let diff = compare_trees(&a, &b);
    assert!(
        diff.is_empty(),
        "{what}: trees differ:\n{}",
        diff.0.join("\n")
    );
}

/// Checks a converted layout against the original: every layer parses, extracts to
/// the same tree, and the config's diff_ids are the converted streams' digests.
fn check_converted_layout(original: &Path, converted: &Path, format: LayerFormat) -> Value {
    let before = layout_manifest(original);
    let after = layout_manifest(converted);
    let config = read_json(&blob(
        converted,
        after["config"]["digest"].as_str().unwrap(),
    ));
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
    let layers = after["layers"].as_array().unwrap();
    assert_eq!(layers.len(), before["layers"].as_array().unwrap().len());
    for (i, (old, new)) in layer_digests(&before).iter().zip(layers.iter()).enumerate() {
        let path = blob(converted, new["digest"].as_str().unwrap());
        let index = read_index(&path, new);
        assert_eq!(index.format, format);
        let (diff_id, uncompressed) = decompressed_digest(&path);
        assert_eq!(
            diff_ids[i].as_str(),
            Some(diff_id.as_str()),
            "diff_id of layer {i}"
        );
        assert_eq!(
            new["annotations"][sluice::format::UNCOMPRESSED_SIZE_ANNOTATION].as_str(),
            Some(uncompressed.to_string().as_str())
        );
        assert_same_tree(&blob(original, old), &path, &format!("layer {i}"));
    }
    after
}

#[test]
fn layouts_convert_to_both_formats_with_the_same_trees() {
    for name in ["busybox", "everything"] {
        let image = build_image(name);
        for (flag, format) in FORMATS {
            let out = tempfile::tempdir().unwrap();
            let dst = out.path().join("layout");
            convert_ok(&[
                &format!("oci:{}", image.layout_dir.display()),
                &format!("oci:{}:conv", dst.display()),
                "--format",
                flag,
                "--compression-level",
                "1",
            ]);
            check_converted_layout(&image.layout_dir, &dst, format);
            let index = read_json(&dst.join("index.json"));
            assert_eq!(
                index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
                "conv"
            );
        }
    }
}

#[test]
fn converting_twice_is_deterministic_and_estargz_repacks() {
    let image = build_image("busybox");
    let out = tempfile::tempdir().unwrap();
    let mut digests = Vec::new();
    for run in ["a", "b"] {
        let dst = out.path().join(run);
        convert_ok(&[
            &format!("oci:{}", image.layout_dir.display()),
            &format!("oci:{}", dst.display()),
            "--chunk-size",
            "65536",
        ]);
        digests.push(read_json(&dst.join("index.json"))["manifests"][0]["digest"].clone());
    }
    assert_eq!(digests[0], digests[1]);

    // An eStargz image (with its TOC, landmark and footer) converted again: the old
    // bookkeeping is dropped and the trees are those of the original.
    for (flag, format) in FORMATS {
        let again = out.path().join(format!("again-{flag}"));
        convert_ok(&[
            &format!("oci:{}", out.path().join("a").display()),
            &format!("oci:{}", again.display()),
            "--format",
            flag,
        ]);
        let manifest = check_converted_layout(&image.layout_dir, &again, format);
        for layer in manifest["layers"].as_array().unwrap() {
            let listing = Command::new("tar")
                .arg("-t")
                .arg(if format == LayerFormat::Estargz {
                    "--gzip"
                } else {
                    "--zstd"
                })
                .arg("-f")
                .arg(blob(&again, layer["digest"].as_str().unwrap()))
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&listing.stdout);
            let landmarks = text
                .lines()
                .filter(|l| l.ends_with("prefetch.landmark"))
                .count();
            let tocs = text.lines().filter(|l| *l == "stargz.index.json").count();
            assert_eq!(landmarks, 1, "{text}");
            assert_eq!(tocs, usize::from(format == LayerFormat::Estargz), "{text}");
        }
    }
}

#[test]
fn corrupt_layers_and_unsupported_media_types_fail_without_output() {
    let image = build_image("busybox");
    let scratch = tempfile::tempdir().unwrap();
    let src = scratch.path().join("src");
    let status = Command::new("cp")
        .arg("-a")
        .arg(&image.layout_dir)
        .arg(&src)
        .status()
        .unwrap();
    assert!(status.success());
    let manifest = layout_manifest(&src);
    let layer = layer_digests(&manifest)[1].clone();
    let path = blob(&src, &layer);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();

    let dst = scratch.path().join("out");
    let out = sluice(&[
        "convert",
        &format!("oci:{}", src.display()),
        &format!("oci:{}", dst.display()),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&layer),
        "error does not name the layer: {stderr}"
    );
    assert!(stderr.contains("corrupt"), "{stderr}");
    assert!(
        !dst.exists(),
        "a half-written layout was left at {}",
        dst.display()
    );
    let leftovers: Vec<_> = std::fs::read_dir(scratch.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "src")
        .collect();
    assert!(leftovers.is_empty(), "staging left behind: {leftovers:?}");

    // The same layer announced with a media type sluice does not know.
    std::fs::write(&path, std::fs::read(image.blob_path(&layer)).unwrap()).unwrap();
    let mut odd = manifest.clone();
    odd["layers"][1]["mediaType"] = "application/x-odd".into();
    let odd_bytes = serde_json::to_vec(&odd).unwrap();
    let odd_digest = Digest::sha256_of(&odd_bytes).to_string();
    std::fs::write(blob(&src, &odd_digest), &odd_bytes).unwrap();
    let mut index = read_json(&src.join("index.json"));
    index["manifests"][0]["digest"] = odd_digest.clone().into();
    index["manifests"][0]["size"] = odd_bytes.len().into();
    std::fs::write(src.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    let out = sluice(&[
        "convert",
        &format!("oci:{}", src.display()),
        &format!("oci:{}", dst.display()),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("application/x-odd") && stderr.contains(&layer),
        "{stderr}"
    );
    assert!(!dst.exists());

    // A missing image.
    let out = sluice(&[
        "convert",
        &format!("oci:{}:nope", src.display()),
        &format!("oci:{}", dst.display()),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
    assert!(!dst.exists());
}

#[test]
fn registry_images_convert_mount_and_run() {
    let registry = TestRegistry::start(RegistryOptions::default());
    let containerd = TestContainerd::start(ContainerdOptions::default());
    for name in ["busybox", "everything"] {
        let original = publish(&containerd, &registry, name, ImageFormat::Gzip);
        for (flag, _) in FORMATS {
            let target = format!("{}/converted/{name}:{flag}", registry.host());
            convert_ok(&[
                &original.reference,
                &target,
                "--format",
                flag,
                "--compression-level",
                "1",
            ]);
            let scratch = common::short_tempdir("cv-");
            for i in 0..original.layers.len() {
                let expected = scratch.path().join(format!("expected-{i}"));
                expected_layer_tree(&original.local_layer(i), &expected);
                let mountpoint = scratch.path().join(format!("mnt-{i}"));
                let mount = LayerMount::start(
                    &target,
                    i,
                    &scratch.path().join("cache"),
                    &mountpoint,
                    false,
                );
                let diff = compare_trees(&expected, &mountpoint);
                drop(mount);
                assert!(
                    diff.is_empty(),
                    "{target} layer {i}:\n{}",
                    diff.0.join("\n")
                );
            }
            if name == "busybox" {
                // Plain containerd (overlayfs) pulls and runs the converted image.
                containerd
                    .ctr(&["images", "pull", "--plain-http", &target])
                    .unwrap();
                let id = format!("conv-{flag}");
                let output = containerd
                    .ctr(&[
                        "run",
                        "--rm",
                        &target,
                        &id,
                        "/bin/sh",
                        "-c",
                        "echo $((6*7))",
                    ])
                    .unwrap();
                assert_eq!(output.trim(), "42");
            }
        }
    }
}

#[test]
fn prefetch_file_orders_layers_and_inspect_lists_it() {
    let registry = TestRegistry::start(RegistryOptions::default());
    let image = build_image("busybox");
    let manifest = layout_manifest(&image.layout_dir);
    // Pick three regular files of the top layer, in an order unlike the tar's.
    let top = layer_digests(&manifest).last().unwrap().clone();
    let listing = Command::new("tar")
        .args(["-tvzf"])
        .arg(image.blob_path(&top))
        .output()
        .unwrap();
    let files: Vec<String> = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| format!("/{}", p.trim_start_matches("./")))
        .collect();
    assert!(!files.is_empty(), "no regular files in the top layer");
    let mut wanted: Vec<String> = files.iter().rev().take(3).cloned().collect();
    wanted.push("/does/not/exist".into());
    let scratch = tempfile::tempdir().unwrap();
    let list = scratch.path().join("prefetch.txt");
    std::fs::write(&list, wanted.join("\n") + "\n").unwrap();
    let present: Vec<String> = wanted
        .iter()
        .filter(|p| files.contains(p))
        .cloned()
        .collect();

    for (flag, format) in FORMATS {
        let dst = scratch.path().join(format!("out-{flag}"));
        convert_ok(&[
            &format!("oci:{}", image.layout_dir.display()),
            &format!("oci:{}", dst.display()),
            "--format",
            flag,
            "--prefetch",
            list.to_str().unwrap(),
        ]);
        let converted = layout_manifest(&dst);
        let layers = converted["layers"].as_array().unwrap();
        let top_layer = layers.last().unwrap();
        let index = read_index(
            &blob(&dst, top_layer["digest"].as_str().unwrap()),
            top_layer,
        );
        assert_eq!(index.format, format);
        let prefetched: Vec<String> = index
            .prefetch
            .iter()
            .map(|&id| format!("/{}", index.entry(id).name))
            .collect();
        assert_eq!(prefetched, present, "{flag}");
        // The tar stream: exactly those files, then the landmark.
        let listing = Command::new("tar")
            .arg("-t")
            .arg(if format == LayerFormat::Estargz {
                "--gzip"
            } else {
                "--zstd"
            })
            .arg("-f")
            .arg(blob(&dst, top_layer["digest"].as_str().unwrap()))
            .output()
            .unwrap();
        let names: Vec<String> = String::from_utf8_lossy(&listing.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        let landmark = names
            .iter()
            .position(|n| n == ".prefetch.landmark")
            .expect("landmark");
        let before: Vec<String> = names[..landmark]
            .iter()
            .filter(|n| !n.ends_with('/'))
            .map(|n| format!("/{}", n.trim_start_matches("./")))
            .collect();
        assert_eq!(before, present);
        // Lower layers hold none of the files: they say so.
        for layer in &layers[..layers.len() - 1] {
            let lower = read_index(&blob(&dst, layer["digest"].as_str().unwrap()), layer);
            assert!(lower.no_prefetch && lower.prefetch.is_empty());
        }
        for entry in &index.entries {
            if let EntryKind::Regular { chunks, .. } = &entry.kind {
                assert!(chunks.iter().all(|c| c.size <= 4 << 20));
            }
        }
    }

    // From the layout to the registry, then `sluice inspect --prefetch`.
    let target = format!("{}/converted/busybox:prefetch", registry.host());
    convert_ok(&[
        &format!("oci:{}", image.layout_dir.display()),
        &target,
        "--prefetch",
        list.to_str().unwrap(),
    ]);
    let out = sluice(&["inspect", "--prefetch", &target]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let listed: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with('/'))
        .map(str::to_owned)
        .collect();
    assert_eq!(listed, present, "{text}");
    assert!(text.contains(&format!("{} files", present.len())), "{text}");

    // --prefetch none: every layer carries .no.prefetch.landmark.
    let target = format!("{}/converted/busybox:none", registry.host());
    convert_ok(&[
        &format!("oci:{}", image.layout_dir.display()),
        &target,
        "--prefetch",
        "none",
    ]);
    let out = sluice(&["inspect", "--prefetch", &target]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.matches("none (.no.prefetch.landmark)").count(),
        layout_manifest(&image.layout_dir)["layers"]
            .as_array()
            .unwrap()
            .len(),
        "{text}"
    );
}

#[test]
fn entrypoint_prefetch_puts_the_start_files_first() {
    let image = build_image("busybox");
    let scratch = tempfile::tempdir().unwrap();
    let dst = scratch.path().join("out");
    convert_ok(&[
        &format!("oci:{}", image.layout_dir.display()),
        &format!("oci:{}", dst.display()),
        "--prefetch",
        "entrypoint",
    ]);
    let manifest = layout_manifest(&dst);
    let layers = manifest["layers"].as_array().unwrap();
    let prefetched: Vec<Vec<String>> = layers
        .iter()
        .map(|layer| {
            let index = read_index(&blob(&dst, layer["digest"].as_str().unwrap()), layer);
            index
                .prefetch
                .iter()
                .map(|&id| index.entry(id).name.clone())
                .collect()
        })
        .collect();
    // The image runs busybox from the base layer, with the runtime's user files and
    // the entry script from the top one.
    assert_eq!(prefetched[0], ["bin/busybox"], "{prefetched:?}");
    let top = prefetched.last().unwrap();
    assert!(
        top.iter().any(|p| p == "etc/passwd") && top.iter().any(|p| p == "etc/group"),
        "{prefetched:?}"
    );
}

/// The footers are laid out byte for byte as ctr-remote (stargz-snapshotter 0.12)
/// writes them: only the TOC offset (and for zstd:chunked the TOC sizes) differ.
#[test]
fn footers_match_ctr_remote_fixtures_byte_for_byte() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format");
    let image = build_image("busybox");
    for (flag, fixture, footer_len) in [
        ("estargz", "estargz.blob", 51usize),
        ("zstd-chunked", "zstdchunked.blob", 48),
    ] {
        let scratch = tempfile::tempdir().unwrap();
        let dst = scratch.path().join("out");
        convert_ok(&[
            &format!("oci:{}", image.layout_dir.display()),
            &format!("oci:{}", dst.display()),
            "--format",
            flag,
        ]);
        let reference = std::fs::read(fixtures.join(fixture)).unwrap();
        let reference = &reference[reference.len() - footer_len..];
        let manifest = layout_manifest(&dst);
        let layer = &manifest["layers"][0];
        let ours = std::fs::read(blob(&dst, layer["digest"].as_str().unwrap())).unwrap();
        let footer = &ours[ours.len() - footer_len..];
        let (fixed, varying): (Vec<usize>, Vec<usize>) = match flag {
            // gzip header, 'SG' subfield, then 16 hex digits of offset, "STARGZ", the
            // empty stored block and zero CRC/ISIZE.
            "estargz" => ((0..16).chain(32..51).collect(), (16..32).collect()),
            // skippable frame magic and length, 3 u64 sizes, manifest type, magic.
            _ => ((0..8).chain(32..48).collect(), (8..32).collect()),
        };
        for i in fixed {
            assert_eq!(footer[i], reference[i], "{flag} footer byte {i}");
        }
        assert!(varying.iter().any(|&i| footer[i] != 0), "{flag}");
        // The zstd:chunked TOC sits in a skippable frame right before the footer, like
        // ctr-remote's; the position annotation says where.
        if flag == "zstd-chunked" {
            let position = layer["annotations"]["io.containers.zstd-chunked.manifest-position"]
                .as_str()
                .unwrap();
            let parts: Vec<u64> = position.split(':').map(|p| p.parse().unwrap()).collect();
            let (offset, length) = (parts[0] as usize, parts[1] as usize);
            assert_eq!(&ours[offset - 8..offset - 4], &[0x50, 0x2a, 0x4d, 0x18]);
            assert_eq!(offset + length, ours.len() - footer_len);
        }
    }
}

/// Writes `doc` as a blob of `layout`; returns its descriptor fields.
fn write_json_blob(layout: &Path, doc: &Value) -> (String, usize) {
    let bytes = serde_json::to_vec(doc).unwrap();
    let digest = Digest::sha256_of(&bytes).to_string();
    std::fs::write(blob(layout, &digest), &bytes).unwrap();
    (digest, bytes.len())
}

/// A two-platform layout: linux/amd64 is the busybox image, linux/arm64 the `app`
/// image (its bytes do not matter to conversion, only that they differ).
fn multi_platform_layout(dir: &Path) -> (Value, Value) {
    let amd64 = build_image("busybox");
    let arm64 = build_image("app");
    let status = Command::new("cp")
        .arg("-a")
        .arg(&amd64.layout_dir)
        .arg(dir)
        .status()
        .unwrap();
    assert!(status.success());
    for entry in std::fs::read_dir(arm64.layout_dir.join("blobs/sha256")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(
            entry.path(),
            dir.join("blobs/sha256").join(entry.file_name()),
        )
        .unwrap();
    }
    let amd64_manifest = layout_manifest(&amd64.layout_dir);
    let mut arm64_manifest = layout_manifest(&arm64.layout_dir);
    let mut config = read_json(&blob(
        dir,
        arm64_manifest["config"]["digest"].as_str().unwrap(),
    ));
    config["architecture"] = "arm64".into();
    let (config_digest, config_size) = write_json_blob(dir, &config);
    arm64_manifest["config"]["digest"] = config_digest.into();
    arm64_manifest["config"]["size"] = config_size.into();
    let (amd64_digest, amd64_size) = write_json_blob(dir, &amd64_manifest);
    let (arm64_digest, arm64_size) = write_json_blob(dir, &arm64_manifest);
    let platform_index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": amd64_digest,
             "size": amd64_size, "platform": {"architecture": "amd64", "os": "linux"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": arm64_digest,
             "size": arm64_size, "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
        ],
    });
    let (index_digest, index_size) = write_json_blob(dir, &platform_index);
    let top = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json", "digest": index_digest,
            "size": index_size, "annotations": {"org.opencontainers.image.ref.name": "multi"},
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    (amd64_manifest, arm64_manifest)
}

/// Checks that `converted` (a manifest in layout `dst`) is `original` (in `src`)
/// converted to eStargz, layer by layer.
fn assert_converted_manifest(src: &Path, original: &Value, dst: &Path, converted: &Value) {
    let layers = converted["layers"].as_array().unwrap();
    let originals = layer_digests(original);
    assert_eq!(layers.len(), originals.len());
    for (i, (old, new)) in originals.iter().zip(layers).enumerate() {
        let path = blob(dst, new["digest"].as_str().unwrap());
        assert_eq!(read_index(&path, new).format, LayerFormat::Estargz);
        assert_same_tree(&blob(src, old), &path, &format!("layer {i}"));
    }
}

#[test]
fn multi_platform_indexes_convert_per_platform() {
    let scratch = tempfile::tempdir().unwrap();
    let src = scratch.path().join("src");
    let (amd64, arm64) = multi_platform_layout(&src);
    let source = format!("oci:{}:multi", src.display());

    // Every platform: the result is an index with one converted manifest per platform,
    // each keeping its platform and its own config.
    let all = scratch.path().join("all");
    convert_ok(&[
        &source,
        &format!("oci:{}", all.display()),
        "--all-platforms",
        "--compression-level",
        "1",
    ]);
    let top = read_json(&all.join("index.json"));
    let index = read_json(&blob(&all, top["manifests"][0]["digest"].as_str().unwrap()));
    assert_eq!(
        index["mediaType"], "application/vnd.oci.image.index.v1+json",
        "{index}"
    );
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{index}");
    for (entry, (arch, original)) in entries.iter().zip([("amd64", &amd64), ("arm64", &arm64)]) {
        assert_eq!(entry["platform"]["architecture"], arch, "{index}");
        let manifest = read_json(&blob(&all, entry["digest"].as_str().unwrap()));
        let config = read_json(&blob(&all, manifest["config"]["digest"].as_str().unwrap()));
        assert_eq!(config["architecture"], arch);
        assert_converted_manifest(&src, original, &all, &manifest);
    }
    assert_eq!(entries[1]["platform"]["variant"], "v8");

    // One platform: a single manifest, the chosen one.
    let one = scratch.path().join("one");
    convert_ok(&[
        &source,
        &format!("oci:{}", one.display()),
        "--platform",
        "linux/arm64",
        "--compression-level",
        "1",
    ]);
    let manifest = layout_manifest(&one);
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_converted_manifest(&src, &arm64, &one, &manifest);

    // A platform the index does not have: an error that lists what it has, no output.
    let none = scratch.path().join("none");
    let out = sluice(&[
        "convert",
        &source,
        &format!("oci:{}", none.display()),
        "--platform",
        "linux/s390x",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("linux/s390x") && stderr.contains("linux/arm64"),
        "{stderr}"
    );
    assert!(!none.exists());
}

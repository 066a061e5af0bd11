//! `sluice bench` end to end on the smallest image, unshaped: every available mode's
//! container reaches `ready`, and bench.json / bench.svg are complete. No timing is
//! asserted (timings belong to the benchmark's own report).

use std::process::Command;

use serde_json::Value;

const MODES: [&str; 5] = [
    "overlayfs",
    "sluice-lazy",
    "sluice-prefetch",
    "sluice-warm",
    "stargz",
];

#[test]
fn bench_tiny_reaches_ready_in_every_mode_and_writes_a_complete_report() {
    assert!(
        nix::unistd::geteuid().is_root() && std::path::Path::new("/dev/fuse").exists(),
        "the benchmark needs root and /dev/fuse"
    );
    let out = tempfile::Builder::new()
        .prefix("sluice-bench-out-")
        .tempdir_in("/tmp")
        .expect("temp dir for the report");
    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "bench",
            "--images",
            "tiny",
            "--runs",
            "1",
            "--network",
            "none",
        ])
        .arg("--out")
        .arg(out.path())
        .output()
        .expect("run sluice bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "sluice bench failed ({}):\n{stdout}\n{stderr}",
        output.status
    );

    let json: Value = serde_json::from_slice(
        &std::fs::read(out.path().join("bench.json")).expect("bench.json written"),
    )
    .expect("bench.json is JSON");
    assert_eq!(json["network"], "none");
    assert!(json["machine"]["cpus"].as_u64().unwrap_or(0) >= 1);
    let results = json["results"].as_array().expect("results array");
    let skipped: Vec<&str> = json["skipped"]
        .as_array()
        .expect("skipped array")
        .iter()
        .filter_map(|s| s["mode"].as_str())
        .collect();
    // stargz is the only mode that may be left out, and only with a reason.
    assert!(
        skipped.iter().all(|m| *m == "stargz"),
        "skipped: {skipped:?}"
    );
    for mode in MODES {
        let result = results
            .iter()
            .find(|r| r["mode"] == mode && r["image"] == "tiny");
        let Some(result) = result else {
            assert!(
                skipped.contains(&mode),
                "mode {mode} neither measured nor skipped"
            );
            continue;
        };
        assert_eq!(result["ok"], true, "{mode} did not reach ready: {result}");
        assert_eq!(result["runs"], 1, "{mode}");
        assert_eq!(result["ok_runs"], 1, "{mode}");
        for key in [
            "median_total_s",
            "median_pull_s",
            "median_create_start_s",
            "median_ready_s",
        ] {
            let value = result[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{mode}: {key} missing"));
            assert!(value >= 0.0, "{mode}: {key} = {value}");
        }
        assert!(result["median_total_s"].as_f64().unwrap() > 0.0, "{mode}");
        for key in ["total_s", "pull_s", "ready_s"] {
            let spread = &result[key];
            assert!(
                spread["min"].as_f64().unwrap() <= spread["max"].as_f64().unwrap(),
                "{mode}: {key} {spread}"
            );
        }
        assert_eq!(result["network"], "none");
        assert!(result["median_load1"].is_number(), "{mode}");
        let requests = result["registry_requests"].as_u64().expect("requests");
        let bytes = result["registry_bytes"].as_u64().expect("bytes");
        if mode == "sluice-warm" {
            // Only manifest and config: the layers' data came from the chunk cache.
            assert!(
                bytes
                    < result["image_facts"]["read_files_compressed_bytes"]
                        .as_u64()
                        .unwrap(),
                "{mode}: warm run fetched {bytes} bytes"
            );
        } else {
            assert!(requests > 0 && bytes > 0, "{mode}: nothing counted");
        }
        assert_eq!(result["per_run"].as_array().map(Vec::len), Some(1));
    }
    let svg = std::fs::read_to_string(out.path().join("bench.svg")).expect("bench.svg written");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("sluice-lazy") && svg.contains("overlayfs"));
    assert!(stdout.contains("tiny"), "no table printed:\n{stdout}");
}

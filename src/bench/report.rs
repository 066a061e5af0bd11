//! Results as a terminal table, `bench.json` and `bench.svg` (stacked bars per
//! image × mode: pull, create+start, start→ready).

use std::fmt::Write as _;
use std::path::Path;

use super::{BenchError, ModeResult, Report};

pub const JSON_FILE: &str = "bench.json";
pub const SVG_FILE: &str = "bench.svg";

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The table printed at the end (also used in docs/benchmarks.md).
pub fn table(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "network {}; {} CPUs; load {} → {}",
        report.network_description,
        report.machine.cpus,
        report.machine.loadavg_start,
        report.machine.loadavg_end
    );
    let _ = writeln!(
        out,
        "{:<7} {:<16} {:>4} {:>9} {:>9} {:>9} {:>9} {:>17} {:>10} {:>5}",
        "image",
        "mode",
        "runs",
        "pull s",
        "create s",
        "→ready s",
        "total s",
        "total min–max s",
        "MiB moved",
        "reqs"
    );
    for result in &report.results {
        if !result.ok {
            let _ = writeln!(
                out,
                "{:<7} {:<16} {:>4} FAILED ({} of {} runs reached ready)",
                result.image,
                result.mode.name(),
                result.runs,
                result.ok_runs,
                result.runs
            );
            continue;
        }
        let _ = writeln!(
            out,
            "{:<7} {:<16} {:>4} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>8.2}–{:<8.2} {:>10.1} {:>5}",
            result.image,
            result.mode.name(),
            result.runs,
            result.median_pull_s,
            result.median_create_start_s,
            result.median_ready_s,
            result.median_total_s,
            result.total_s.min,
            result.total_s.max,
            mib(result.registry_bytes),
            result.registry_requests
        );
    }
    for skipped in &report.skipped {
        let _ = writeln!(out, "skipped {}: {}", skipped.mode.name(), skipped.reason);
    }
    let mut images: Vec<&ModeResult> = Vec::new();
    for result in &report.results {
        if !images.iter().any(|r| r.image == result.image) {
            images.push(result);
        }
    }
    for result in images {
        let facts = &result.image_facts;
        let _ = writeln!(
            out,
            "{}: {} layers, {:.1} MiB compressed; entrypoint reads {} files, {:.1} MiB ({:.1} MiB compressed)",
            result.image,
            facts.layers,
            mib(facts.compressed_bytes),
            facts.read_files,
            mib(facts.read_files_bytes),
            mib(facts.read_files_compressed_bytes)
        );
    }
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Horizontal stacked bars, one per image × mode, on one linear time axis.
pub fn svg(report: &Report) -> String {
    const SEGMENTS: [(&str, &str); 3] = [
        ("pull", "#4e79a7"),
        ("create+start", "#f28e2b"),
        ("start→ready", "#59a14f"),
    ];
    let rows = report.results.len().max(1);
    let (label_width, bar_width, row_height, top) = (190.0, 560.0, 26.0, 60.0);
    let width = label_width + bar_width + 120.0;
    let height = top + rows as f64 * row_height + 50.0;
    let max_total = report
        .results
        .iter()
        .filter(|r| r.ok)
        .map(|r| r.median_pull_s + r.median_create_start_s + r.median_ready_s)
        .fold(0.0f64, f64::max)
        .max(0.001);
    let scale = bar_width / max_total;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="20" font-size="14" font-weight="bold">Container start-up, cold, median of runs — network {}</text>"#,
        escape(&report.network_description)
    );
    let mut legend_x = 10.0;
    for (name, color) in SEGMENTS {
        let _ = writeln!(
            out,
            r#"<rect x="{legend_x}" y="32" width="12" height="12" fill="{color}"/><text x="{}" y="42">{}</text>"#,
            legend_x + 16.0,
            escape(name)
        );
        legend_x += 120.0;
    }
    for (row, result) in report.results.iter().enumerate() {
        let y = top + row as f64 * row_height;
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="end">{} {}</text>"#,
            label_width - 8.0,
            y + 15.0,
            escape(&result.image),
            escape(result.mode.name())
        );
        if !result.ok {
            let _ = writeln!(
                out,
                r##"<text x="{label_width}" y="{}" fill="#c00">failed: did not print ready</text>"##,
                y + 15.0
            );
            continue;
        }
        let mut x = label_width;
        for ((name, color), value) in SEGMENTS.iter().zip([
            result.median_pull_s,
            result.median_create_start_s,
            result.median_ready_s,
        ]) {
            let w = value * scale;
            let _ = writeln!(
                out,
                r#"<rect x="{x:.1}" y="{y}" width="{w:.1}" height="{}" fill="{color}"><title>{} {}: {name} {value:.3} s</title></rect>"#,
                row_height - 6.0,
                escape(&result.image),
                escape(result.mode.name())
            );
            x += w;
        }
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{}">{:.2} s</text>"#,
            x + 6.0,
            y + 15.0,
            result.median_pull_s + result.median_create_start_s + result.median_ready_s
        );
    }
    let axis_y = top + rows as f64 * row_height + 10.0;
    let _ = writeln!(
        out,
        r#"<line x1="{label_width}" y1="{axis_y}" x2="{}" y2="{axis_y}" stroke="black"/>"#,
        label_width + bar_width
    );
    for tick in 0..=4 {
        let value = max_total * tick as f64 / 4.0;
        let x = label_width + value * scale;
        let _ = writeln!(
            out,
            r#"<line x1="{x:.1}" y1="{axis_y}" x2="{x:.1}" y2="{}" stroke="black"/><text x="{x:.1}" y="{}" text-anchor="middle">{value:.1} s</text>"#,
            axis_y + 5.0,
            axis_y + 20.0
        );
    }
    out.push_str("</svg>\n");
    out
}

/// Print the table and write `bench.json` and `bench.svg` into `out_dir`.
pub fn write_all(report: &Report, out_dir: &Path) -> Result<(), BenchError> {
    print!("{}", table(report));
    let json = serde_json::to_string_pretty(report).map_err(|error| BenchError::Setup {
        what: "JSON report".into(),
        reason: error.to_string(),
    })?;
    for (name, text) in [(JSON_FILE, json + "\n"), (SVG_FILE, svg(report))] {
        let path = out_dir.join(name);
        std::fs::write(&path, text).map_err(|source| BenchError::Io {
            what: format!("writing {}", path.display()),
            source,
        })?;
    }
    println!(
        "wrote {} and {}",
        out_dir.join(JSON_FILE).display(),
        out_dir.join(SVG_FILE).display()
    );
    Ok(())
}

//! `sluice bench`: container start-up latency, cold, through containerd — the default
//! overlayfs pull-then-run against sluice's lazy pull, with and without prefetch and with
//! a warm chunk cache — over a shaped network to a local registry.
//!
//! | file        | owns |
//! |-------------|------|
//! | `mod.rs`    | options, the run loop, timing of one run |
//! | [`net`]     | network namespace, veth, tbf, the delaying proxy |
//! | [`procs`]   | registry (with access-log accounting), containerd, snapshotters |
//! | [`images`]  | building, converting and pushing the benchmark images; their sizes |
//! | [`report`]  | terminal table, JSON, SVG chart |
//!
//! Every run is cold: fresh containerd (isolated content) and snapshotter state,
//! fresh namespace, empty chunk cache (except `sluice-warm`), page cache dropped.

pub mod images;
pub mod net;
pub mod procs;
pub mod report;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub use images::ImageFacts;
use images::{ImageCache, Variant};
pub use net::NetworkProfile;
use procs::{Daemons, Registry, Served, SnapshotterKind};

/// Something that stopped the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}):\n{stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{what}: {reason}")]
    Setup { what: String, reason: String },
    #[error("the benchmark needs root (network namespaces, mounts, containerd); run it with sudo")]
    NotRoot,
    #[error("interrupted; everything the benchmark started was stopped and removed")]
    Interrupted,
    #[error("unknown {what} {value:?}; choose from {choices}")]
    UnknownName {
        what: &'static str,
        value: String,
        choices: &'static str,
    },
}

/// Run a command to completion; stdout, or [`BenchError::Command`] with its stderr.
pub(crate) fn command_output(command: &mut Command) -> Result<String, BenchError> {
    let output = command.output().map_err(|source| BenchError::Io {
        what: format!("spawning {command:?}"),
        source,
    })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(BenchError::Command {
            command: format!("{command:?}"),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

/// How an image is pulled and run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Mode {
    /// containerd's default: full pull and unpack into overlayfs, then run.
    #[serde(rename = "overlayfs")]
    Overlayfs,
    /// sluice, eStargz without a prefetch list: everything on demand.
    #[serde(rename = "sluice-lazy")]
    SluiceLazy,
    /// sluice, eStargz whose entrypoint files are prefetched before the mount returns.
    #[serde(rename = "sluice-prefetch")]
    SluicePrefetch,
    /// sluice with its chunk cache already holding what the entrypoint reads.
    #[serde(rename = "sluice-warm")]
    SluiceWarm,
    /// stargz-snapshotter (`containerd-stargz-grpc`) with the prefetch variant.
    #[serde(rename = "stargz")]
    Stargz,
}

impl Mode {
    pub const ALL: [Mode; 5] = [
        Mode::Overlayfs,
        Mode::SluiceLazy,
        Mode::SluicePrefetch,
        Mode::SluiceWarm,
        Mode::Stargz,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Overlayfs => "overlayfs",
            Mode::SluiceLazy => "sluice-lazy",
            Mode::SluicePrefetch => "sluice-prefetch",
            Mode::SluiceWarm => "sluice-warm",
            Mode::Stargz => "stargz",
        }
    }

    fn variant(self) -> Variant {
        match self {
            Mode::Overlayfs => Variant::Gzip,
            Mode::SluiceLazy | Mode::SluiceWarm => Variant::Estargz,
            Mode::SluicePrefetch | Mode::Stargz => Variant::EstargzPrefetch,
        }
    }

    fn snapshotter(self) -> Option<SnapshotterKind> {
        match self {
            Mode::Overlayfs => None,
            Mode::Stargz => Some(SnapshotterKind::Stargz),
            _ => Some(SnapshotterKind::Sluice),
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = BenchError;
    fn from_str(text: &str) -> Result<Self, BenchError> {
        Mode::ALL
            .into_iter()
            .find(|mode| mode.name() == text)
            .ok_or_else(|| BenchError::UnknownName {
                what: "mode",
                value: text.to_owned(),
                choices: "overlayfs, sluice-lazy, sluice-prefetch, sluice-warm, stargz",
            })
    }
}

/// The images tools/mkbenchimages builds.
pub const IMAGES: [&str; 3] = ["tiny", "python", "large"];

/// What to benchmark and where to put the results.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub images: Vec<String>,
    pub modes: Vec<Mode>,
    pub network: NetworkProfile,
    pub runs: usize,
    pub out_dir: PathBuf,
    /// Built images, converted variants and the registry storage (kept between runs).
    pub image_cache: PathBuf,
    /// Directory holding `mkbenchimages` and `mkimage.py`.
    pub tools_dir: PathBuf,
    /// How long one container may take from start to `ready`.
    pub ready_timeout: Duration,
    /// The command line, recorded in the JSON.
    pub command_line: String,
    /// Copy every run's containerd and snapshotter logs, and the registry's access
    /// log, to `out_dir/logs/` (the work directory is removed at the end).
    pub keep_logs: bool,
    /// The sluice snapshotter's `daemon.log_level` (a tracing filter).
    pub snapshotter_log_level: String,
}

/// One measured run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RunRecord {
    pub run: usize,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    pub pull_s: f64,
    pub create_start_s: f64,
    pub ready_s: f64,
    pub total_s: f64,
    pub registry_bytes: u64,
    pub registry_requests: u64,
    /// 1-minute load average when the run began.
    pub load1: f64,
}

/// Median, min and max of one quantity over the successful runs.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Spread {
        if values.is_empty() {
            return Spread::default();
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Spread {
            median,
            min: values[0],
            max: values[n - 1],
        }
    }
}

/// One image × mode.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModeResult {
    pub image: String,
    pub mode: Mode,
    pub network: NetworkProfile,
    pub runs: usize,
    pub ok_runs: usize,
    /// False when any run's container did not print `ready`: the figures are not reported.
    pub ok: bool,
    pub median_total_s: f64,
    pub median_pull_s: f64,
    pub median_create_start_s: f64,
    pub median_ready_s: f64,
    pub total_s: Spread,
    pub pull_s: Spread,
    pub create_start_s: Spread,
    pub ready_s: Spread,
    /// Median over runs of what the registry served up to `ready`.
    pub registry_bytes: u64,
    pub registry_requests: u64,
    pub registry_bytes_min: u64,
    pub registry_bytes_max: u64,
    pub median_load1: f64,
    pub image_facts: ImageFacts,
    pub per_run: Vec<RunRecord>,
}

/// A mode left out, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Skipped {
    pub mode: Mode,
    pub reason: String,
}

/// Everything `sluice bench` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub command: String,
    pub network: NetworkProfile,
    pub network_description: String,
    pub machine: Machine,
    pub results: Vec<ModeResult>,
    pub skipped: Vec<Skipped>,
    pub wall_clock_s: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub kernel: String,
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub memory_total_kib: u64,
}

impl Machine {
    fn probe(loadavg_start: String) -> Machine {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            loadavg_start,
            loadavg_end: loadavg(),
            memory_total_kib: meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0),
        }
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn load1() -> f64 {
    loadavg()
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM set a flag; the run loop stops at its next check and the guards
/// tear everything down on the way out.
fn install_signal_handlers() -> Result<(), BenchError> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(signal, &action) }.map_err(|errno| BenchError::Io {
            what: format!("installing the {signal} handler"),
            source: errno.into(),
        })?;
    }
    Ok(())
}

fn check_interrupted() -> Result<(), BenchError> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err(BenchError::Interrupted)
    } else {
        Ok(())
    }
}

/// Where the registry runs for this benchmark; dropped last.
struct RegistrySetup {
    registry: Registry,
    /// Kept for its Drop: the namespace must outlive the registry inside it.
    _network: Option<net::ShapedNetwork>,
}

fn start_registry(
    network: NetworkProfile,
    storage: &Path,
    work_dir: &Path,
) -> Result<RegistrySetup, BenchError> {
    let registry_dir = work_dir.join("registry");
    std::fs::create_dir_all(&registry_dir).map_err(|source| BenchError::Io {
        what: format!("creating {}", registry_dir.display()),
        source,
    })?;
    match network.shape() {
        None => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|source| BenchError::Io {
                    what: "finding a free loopback port".into(),
                    source,
                })?
                .port();
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            let registry = Registry::start(&registry_dir, storage, addr, addr, None)?;
            Ok(RegistrySetup {
                registry,
                _network: None,
            })
        }
        Some((rate, rtt)) => {
            let mut shaped = net::ShapedNetwork::create(rate)?;
            let inside = std::net::SocketAddr::from(([127, 0, 0, 1], 5001));
            // The registry must listen before clients come through the proxy; it is
            // polled through the proxy, so start both, then wait.
            shaped.start_proxy(inside, rtt)?;
            let registry = Registry::start(
                &registry_dir,
                storage,
                inside,
                shaped.public_addr,
                Some(shaped.namespace_fd()),
            )?;
            Ok(RegistrySetup {
                registry,
                _network: Some(shaped),
            })
        }
    }
}

/// A work directory under /tmp (unix socket paths stay short), removed on drop.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        procs::unmount_all_under(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn drop_page_cache() {
    // SAFETY: sync has no arguments and no memory effects on us.
    unsafe { libc::sync() };
    // Not being able to drop caches (e.g. in a restricted container) makes runs less
    // cold, not wrong; it is reported once.
    if std::fs::write("/proc/sys/vm/drop_caches", "3").is_err() {
        static WARNED: AtomicBool = AtomicBool::new(false);
        if !WARNED.swap(true, Ordering::SeqCst) {
            eprintln!(
                "\nbench: cannot write /proc/sys/vm/drop_caches; runs are not page-cache cold"
            );
        }
    }
}

/// Run the benchmark; prints progress and the table, writes JSON and SVG to `out_dir`.
pub fn run(options: &BenchOptions) -> Result<Report, BenchError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(BenchError::NotRoot);
    }
    for image in &options.images {
        if !IMAGES.contains(&image.as_str()) {
            return Err(BenchError::UnknownName {
                what: "image",
                value: image.clone(),
                choices: "tiny, python, large",
            });
        }
    }
    install_signal_handlers()?;
    let started = Instant::now();
    let loadavg_start = loadavg();
    let work = WorkDir(PathBuf::from(format!(
        "/tmp/sluice-bench-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&work.0).map_err(|source| BenchError::Io {
        what: format!("creating {}", work.0.display()),
        source,
    })?;
    std::fs::create_dir_all(&options.out_dir).map_err(|source| BenchError::Io {
        what: format!("creating {}", options.out_dir.display()),
        source,
    })?;

    let cache = ImageCache {
        dir: options.image_cache.clone(),
    };
    eprintln!("bench: preparing images {}", options.images.join(","));
    cache.prepare(&options.images, &options.tools_dir, &work.0)?;
    check_interrupted()?;

    let mut skipped = Vec::new();
    let modes: Vec<Mode> = options
        .modes
        .iter()
        .copied()
        .filter(|mode| {
            if *mode == Mode::Stargz && !procs::on_path("containerd-stargz-grpc") {
                skipped.push(Skipped {
                    mode: *mode,
                    reason: "containerd-stargz-grpc is not on PATH (Debian's stargz-snapshotter package ships only ctr-remote)".into(),
                });
                false
            } else {
                true
            }
        })
        .collect();
    for skip in &skipped {
        eprintln!("bench: skipping {}: {}", skip.mode.name(), skip.reason);
    }

    let registry = start_registry(options.network, &cache.storage(), &work.0)?;
    let host = registry.registry.client_addr().to_string();
    let logs_dir = options.keep_logs.then(|| options.out_dir.join("logs"));
    let context = RunContext {
        registry: &registry.registry,
        work_dir: &work.0,
        ready_timeout: options.ready_timeout,
        logs_dir: logs_dir.as_deref(),
        snapshotter_log_level: &options.snapshotter_log_level,
    };
    let total_runs = options.images.len() * modes.len() * options.runs;
    let mut done = 0usize;
    let mut results = Vec::new();
    let mut run_counter = 0usize;
    for image in &options.images {
        let facts = cache.facts(image)?;
        for &mode in &modes {
            let reference = format!(
                "{host}/{}:{}",
                images::repository(image),
                mode.variant().tag()
            );
            let warm_cache = work.0.join(format!("warm-{image}"));
            let mut records = Vec::new();
            if mode == Mode::SluiceWarm {
                progress(done, total_runs, image, mode, "warming the chunk cache");
                run_counter += 1;
                let priming = run_once(
                    &context,
                    run_counter,
                    &format!("{image}-{}-warming", mode.name()),
                    &reference,
                    mode,
                    &warm_cache,
                )?;
                if !priming.ok {
                    eprintln!(
                        "\nbench: {image} {}: warming run failed: {}",
                        mode.name(),
                        priming.failure.clone().unwrap_or_default()
                    );
                }
            }
            for run in 1..=options.runs {
                check_interrupted()?;
                progress(
                    done,
                    total_runs,
                    image,
                    mode,
                    &format!("run {run}/{}", options.runs),
                );
                run_counter += 1;
                let cache_dir = if mode == Mode::SluiceWarm {
                    warm_cache.clone()
                } else {
                    work.0.join(format!("cache-{run_counter}"))
                };
                let mut record = run_once(
                    &context,
                    run_counter,
                    &format!("{image}-{}-{run}", mode.name()),
                    &reference,
                    mode,
                    &cache_dir,
                )?;
                if mode != Mode::SluiceWarm {
                    let _ = std::fs::remove_dir_all(&cache_dir);
                }
                record.run = run;
                if let Some(failure) = &record.failure {
                    eprintln!(
                        "\nbench: {image} {} run {run} failed: {failure}",
                        mode.name()
                    );
                }
                records.push(record);
                done += 1;
            }
            results.push(summarize(
                image,
                mode,
                options.network,
                facts.clone(),
                records,
            ));
        }
    }
    eprint!("\r\x1b[K");
    if let Some(logs) = &logs_dir {
        keep_log(
            &work.0.join("registry/registry.log"),
            &logs.join("registry.log"),
        );
    }
    drop(registry);
    let report = Report {
        command: options.command_line.clone(),
        network: options.network,
        network_description: options.network.describe(),
        machine: Machine::probe(loadavg_start),
        results,
        skipped,
        wall_clock_s: started.elapsed().as_secs_f64(),
    };
    report::write_all(&report, &options.out_dir)?;
    Ok(report)
}

fn progress(done: usize, total: usize, image: &str, mode: Mode, what: &str) {
    use std::io::Write;
    eprint!(
        "\r\x1b[K[{done}/{total}] {image} {} {what} (load {:.2})",
        mode.name(),
        load1()
    );
    let _ = std::io::stderr().flush();
}

fn summarize(
    image: &str,
    mode: Mode,
    network: NetworkProfile,
    image_facts: ImageFacts,
    per_run: Vec<RunRecord>,
) -> ModeResult {
    let ok_runs: Vec<&RunRecord> = per_run.iter().filter(|r| r.ok).collect();
    let ok = !per_run.is_empty() && ok_runs.len() == per_run.len();
    // A mode with a run that never printed `ready` gets no figures (null in the JSON):
    // medians of the runs that happened to work would flatter it.
    let spread = |f: fn(&RunRecord) -> f64| {
        if ok {
            Spread::of(ok_runs.iter().map(|r| f(r)).collect())
        } else {
            Spread {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
            }
        }
    };
    let (total_s, pull_s, create_start_s, ready_s) = (
        spread(|r| r.total_s),
        spread(|r| r.pull_s),
        spread(|r| r.create_start_s),
        spread(|r| r.ready_s),
    );
    let bytes = spread(|r| r.registry_bytes as f64);
    let requests = spread(|r| r.registry_requests as f64);
    ModeResult {
        image: image.to_owned(),
        mode,
        network,
        runs: per_run.len(),
        ok_runs: ok_runs.len(),
        ok,
        median_total_s: total_s.median,
        median_pull_s: pull_s.median,
        median_create_start_s: create_start_s.median,
        median_ready_s: ready_s.median,
        total_s,
        pull_s,
        create_start_s,
        ready_s,
        registry_bytes: bytes.median as u64,
        registry_requests: requests.median as u64,
        registry_bytes_min: bytes.min as u64,
        registry_bytes_max: bytes.max as u64,
        median_load1: spread(|r| r.load1).median,
        image_facts,
        per_run,
    }
}

/// Spawn `command` and wait for it, killing it on interrupt or after `timeout`.
fn timed(command: &mut Command, timeout: Duration) -> Result<Duration, BenchError> {
    let began = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| BenchError::Io {
            what: format!("spawning {command:?}"),
            source,
        })?;
    let stderr = collect(child.stderr.take());
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|source| BenchError::Io {
            what: format!("waiting for {command:?}"),
            source,
        })? {
            break status;
        }
        if INTERRUPTED.load(Ordering::SeqCst) {
            kill(&mut child);
            return Err(BenchError::Interrupted);
        }
        if began.elapsed() > timeout {
            kill(&mut child);
            return Err(BenchError::Command {
                command: format!("{command:?}"),
                status: format!("killed after {} s", timeout.as_secs()),
                stderr: String::new(),
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let elapsed = began.elapsed();
    if status.success() {
        Ok(elapsed)
    } else {
        Err(BenchError::Command {
            command: format!("{command:?}"),
            status: status.to_string(),
            stderr: stderr.join().unwrap_or_default(),
        })
    }
}

fn collect(stream: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut stream) = stream {
            let _ = stream.read_to_string(&mut text);
        }
        text
    })
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// What every run shares.
struct RunContext<'a> {
    registry: &'a Registry,
    work_dir: &'a Path,
    ready_timeout: Duration,
    logs_dir: Option<&'a Path>,
    snapshotter_log_level: &'a str,
}

/// Best effort: a log that cannot be kept is reported, the figures stand.
fn keep_log(from: &Path, to: &Path) {
    let copied = to
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::copy(from, to));
    if let Err(error) = copied {
        eprintln!(
            "\nbench: cannot keep {} as {}: {error}",
            from.display(),
            to.display()
        );
    }
}

/// One cold run: fresh daemons, pull, create, start, wait for `ready`.
///
/// A run whose container does not print `ready` is a failed record, not an error;
/// errors are for the benchmark's own machinery (and interrupts).
fn run_once(
    context: &RunContext<'_>,
    counter: usize,
    label: &str,
    reference: &str,
    mode: Mode,
    cache_dir: &Path,
) -> Result<RunRecord, BenchError> {
    let (registry, ready_timeout) = (context.registry, context.ready_timeout);
    let run_dir = context.work_dir.join(format!("r{counter}"));
    let load1 = load1();
    let daemons = Daemons::start(
        &run_dir,
        mode.snapshotter(),
        cache_dir,
        context.snapshotter_log_level,
    )?;
    // runc keeps container state under /run/containerd/runc/NAMESPACE/ID for every
    // containerd on the machine: names must not collide with another benchmark's.
    let namespace = format!("bench-{}-{counter}", std::process::id());
    let container = namespace.clone();
    drop_page_cache();
    let before = registry.served();
    let mut record = RunRecord {
        load1,
        ..RunRecord::default()
    };
    let outcome = measure(
        &daemons,
        &namespace,
        &container,
        reference,
        mode,
        ready_timeout,
    );
    let after = registry.served();
    let Served { requests, bytes } = after;
    record.registry_bytes = bytes - before.bytes;
    record.registry_requests = requests - before.requests;
    match outcome {
        Ok(times) => {
            record.ok = true;
            record.pull_s = times.pull.as_secs_f64();
            record.create_start_s = times.create_start.as_secs_f64();
            record.ready_s = times.ready.as_secs_f64();
            record.total_s = times.total.as_secs_f64();
        }
        Err(BenchError::Interrupted) => return Err(BenchError::Interrupted),
        Err(error) => {
            record.failure = Some(error.to_string());
        }
    }
    // Best effort: the daemons and everything they mounted go away on drop anyway.
    let _ = daemons.ctr(&namespace, &["tasks", "delete", "--force", &container]);
    let _ = daemons.ctr(&namespace, &["containers", "delete", &container]);
    drop(daemons);
    if let Some(logs) = context.logs_dir {
        for name in ["containerd.log", "snapshotter.log"] {
            let from = run_dir.join(name);
            if from.exists() {
                keep_log(&from, &logs.join(format!("r{counter}-{label}-{name}")));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&run_dir);
    Ok(record)
}

struct Times {
    pull: Duration,
    create_start: Duration,
    ready: Duration,
    total: Duration,
}

/// The entrypoint prints `started` from /bin/sh before the workload, then `ready`.
const STARTED_LINE: &str = "started";
const READY_LINE: &str = "ready";

fn measure(
    daemons: &Daemons,
    namespace: &str,
    container: &str,
    reference: &str,
    mode: Mode,
    ready_timeout: Duration,
) -> Result<Times, BenchError> {
    let began = Instant::now();
    let pull_timeout = Duration::from_secs(900);
    let pull = match mode.snapshotter() {
        None => timed(
            &mut daemons.command(
                "ctr",
                namespace,
                &["images", "pull", "--plain-http", reference],
            ),
            pull_timeout,
        )?,
        Some(SnapshotterKind::Sluice) => {
            timed(&mut daemons.sluice_pull(namespace, reference), pull_timeout)?
        }
        // stargz-snapshotter recognises layers by the labels its own client sets.
        Some(SnapshotterKind::Stargz) => timed(
            &mut daemons.command(
                "ctr-remote",
                namespace,
                &[
                    "images",
                    "rpull",
                    "--plain-http",
                    "--snapshotter",
                    SnapshotterKind::Stargz.plugin_name(),
                    reference,
                ],
            ),
            pull_timeout,
        )?,
    };
    let snapshotter = mode
        .snapshotter()
        .map_or("overlayfs", SnapshotterKind::plugin_name);
    let create = timed(
        &mut daemons.command(
            "ctr",
            namespace,
            &[
                "containers",
                "create",
                "--snapshotter",
                snapshotter,
                reference,
                container,
            ],
        ),
        ready_timeout,
    )?;
    let start_began = Instant::now();
    let mut command = daemons.command("ctr", namespace, &["tasks", "start", container]);
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| BenchError::Io {
            what: format!("spawning {command:?}"),
            source,
        })?;
    let stderr = collect(child.stderr.take());
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<(Instant, String)>();
    if let Some(stdout) = child.stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines_tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
    }
    let mut started_at = None;
    let mut ready_at = None;
    let mut output = String::new();
    while ready_at.is_none() {
        match lines_rx.recv_timeout(Duration::from_millis(5)) {
            Ok((at, line)) => {
                output.push_str(&line);
                output.push('\n');
                match line.trim() {
                    STARTED_LINE => started_at = Some(at),
                    READY_LINE => ready_at = Some(at),
                    _ => {}
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if INTERRUPTED.load(Ordering::SeqCst) {
            kill(&mut child);
            return Err(BenchError::Interrupted);
        }
        if start_began.elapsed() > ready_timeout {
            break;
        }
    }
    let Some(ready_at) = ready_at else {
        kill(&mut child);
        return Err(BenchError::Setup {
            what: format!("container of {reference} ({})", mode.name()),
            reason: format!(
                "did not print `ready` within {} s; output:\n{output}ctr stderr:\n{}",
                ready_timeout.as_secs(),
                stderr.join().unwrap_or_default()
            ),
        });
    };
    // The container exits right after `ready`; its exit is not part of the figures.
    if !procs::wait_until(Duration::from_secs(30), || {
        matches!(child.try_wait(), Ok(Some(_)))
    }) {
        kill(&mut child);
    }
    let _ = child.wait();
    let started_at = started_at.unwrap_or(ready_at);
    Ok(Times {
        pull,
        create_start: create + started_at.duration_since(start_began),
        ready: ready_at.duration_since(started_at),
        total: ready_at.duration_since(began),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(ok: bool, total_s: f64) -> RunRecord {
        RunRecord {
            ok,
            failure: (!ok).then(|| "did not print `ready`".to_owned()),
            pull_s: total_s / 2.0,
            create_start_s: total_s / 4.0,
            ready_s: total_s / 4.0,
            total_s,
            registry_bytes: 1000,
            registry_requests: 3,
            ..RunRecord::default()
        }
    }

    fn report(results: Vec<ModeResult>) -> Report {
        Report {
            command: "sluice bench".into(),
            network: NetworkProfile::None,
            network_description: NetworkProfile::None.describe(),
            machine: Machine {
                cpus: 2,
                kernel: String::new(),
                loadavg_start: String::new(),
                loadavg_end: String::new(),
                memory_total_kib: 0,
            },
            results,
            skipped: Vec::new(),
            wall_clock_s: 1.0,
        }
    }

    #[test]
    fn a_mode_with_a_run_that_never_got_ready_reports_no_figures() {
        let network = NetworkProfile::None;
        let good = summarize(
            "tiny",
            Mode::Overlayfs,
            network,
            ImageFacts::default(),
            vec![run(true, 3.0), run(true, 1.0), run(true, 2.0)],
        );
        assert!(good.ok);
        assert_eq!(good.median_total_s, 2.0);
        assert_eq!((good.total_s.min, good.total_s.max), (1.0, 3.0));

        // Two fast runs and one that never printed `ready`: no median that flatters.
        let bad = summarize(
            "tiny",
            Mode::SluiceLazy,
            network,
            ImageFacts::default(),
            vec![run(true, 0.5), run(false, 0.0), run(true, 0.6)],
        );
        assert!(!bad.ok);
        assert_eq!(bad.ok_runs, 2);
        assert!(bad.median_total_s.is_nan());

        let report = report(vec![good, bad]);
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(json["results"][0]["median_total_s"], 2.0);
        assert!(json["results"][1]["median_total_s"].is_null(), "{json}");
        assert_eq!(json["results"][1]["ok"], false);
        let table = report::table(&report);
        assert!(
            table.contains("sluice-lazy") && table.contains("FAILED (2 of 3 runs reached ready)"),
            "{table}"
        );
        assert!(!report::svg(&report).contains("NaN"));
    }
}

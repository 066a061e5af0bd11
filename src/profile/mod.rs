//! Prefetch lists from a recorded run: `sluice profile`.
//!
//! Static analysis ([`crate::prefetch`]) cannot see files a program decides to read at
//! run time. A recording can: sluice-snapshotter's FUSE mounts tell a [`Recorder`]
//! which files are opened or read while a recording is active, and the daemon serves
//! `sluice.v1.Profiler` ([`ProfilerService`]) on its socket to start and stop one.
//!
//! [`profile`] does one recorded run:
//!
//! 1. pull the image lazily into containerd through sluice ([`crate::pull`]);
//! 2. compute the static entrypoint list from the registry (the same analysis
//!    `sluice convert --prefetch entrypoint` does);
//! 3. start a recording of the image's layers in the daemon;
//! 4. run the image once with containerd's `ctr run --rm` until the container exits,
//!    prints the wait line, or the timeout passes (then it is killed);
//! 5. stop the recording and merge ([`merge`]): recorded files in first-access order,
//!    then the static list's files the run did not touch.
//!
//! The result ([`ProfileReport::prefetch_file`]) is the format `sluice convert
//! --prefetch FILE` reads.

mod recorder;
mod service;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

pub use recorder::{
    MAX_FILES_PER_RECORDING, MAX_RECORDINGS, RecordError, RecordedAccess, Recorder, Recording,
    RecordingId,
};
pub use service::ProfilerService;

use crate::api::sluice::v1 as api;
use crate::api::sluice::v1::profiler_client::ProfilerClient;
use crate::cache::{CacheOptions, ChunkCache};
use crate::digest::Digest;
use crate::format::EntryId;
use crate::layer::{LayerError, OpenedLayer, open_remote_layer};
use crate::metrics::Metrics;
use crate::prefetch::{
    ImageConfigInfo, ImagePath, LayerPosition, LayerStackView, analyze_entrypoint,
    layer_entries_from_index,
};
use crate::pull::{LayerOutcome, PullError, PullOptions, PullSummary, error_chain};
use crate::registry::{FetchPriority, ImageReference, RegistryClient, RegistryError};

/// Bytes of a container's stderr (from `ctr`) kept for error messages.
const STDERR_KEPT: usize = 16 << 10;
/// How long `ctr run` may take to return after its task was killed.
const KILL_GRACE: Duration = Duration::from_secs(30);

/// Where containerd and sluice are, and when the recorded run ends.
#[derive(Debug, Clone)]
pub struct ProfileOptions {
    /// containerd socket, namespace, snapshotter name, platform and registry access.
    pub pull: PullOptions,
    /// sluice-snapshotter's socket (the one in containerd's `[proxy_plugins.sluice]`).
    pub snapshotter_socket: PathBuf,
    /// Stop once the container prints a line equal to this (trailing whitespace
    /// ignored) on stdout.
    pub wait_line: Option<String>,
    /// Stop (and kill the container) after this long in any case.
    pub timeout: Duration,
    /// containerd's `ctr` binary, which runs the container.
    pub ctr: PathBuf,
}

/// Why the recorded run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// The container exited by itself; `ctr run`'s exit status (the container's).
    Exited { code: Option<i32> },
    /// The container printed the wait line; it was killed.
    WaitLine,
    /// The timeout passed; the container was killed.
    Timeout,
    /// `sluice profile` got SIGINT; the container was killed.
    Interrupted,
}

impl std::fmt::Display for RunEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunEnd::Exited { code: Some(code) } => write!(f, "the container exited with {code}"),
            RunEnd::Exited { code: None } => write!(f, "the container was killed by a signal"),
            RunEnd::WaitLine => write!(f, "the container printed the wait line"),
            RunEnd::Timeout => write!(f, "the timeout passed"),
            RunEnd::Interrupted => write!(f, "interrupted"),
        }
    }
}

/// What one recorded run found.
#[derive(Debug, Clone)]
pub struct ProfileReport {
    /// The image record's name in containerd.
    pub image: String,
    pub pull: PullSummary,
    /// Files the run opened or read, in first-access order.
    pub recorded: Vec<RecordedAccess>,
    /// The daemon's recording limit was reached.
    pub truncated: bool,
    /// Regular files of the static entrypoint analysis, in its order.
    pub static_files: Vec<String>,
    /// [`merge`] of the two: what the prefetch file lists.
    pub merged: Vec<String>,
    pub end: RunEnd,
}

impl ProfileReport {
    /// One line: how the run ended and how many files each source gave.
    pub fn summary(&self) -> String {
        format!(
            "{}: {}; {} files recorded, {} in the static list, {} in the prefetch list",
            self.image,
            self.end,
            self.recorded.len(),
            self.static_files.len(),
            self.merged.len()
        )
    }

    /// The prefetch file: `#` comments saying where it came from, then one absolute
    /// path per line (`sluice convert --prefetch FILE`).
    pub fn prefetch_file(&self) -> String {
        let recorded: HashSet<&str> = self.recorded.iter().map(|r| r.path.as_str()).collect();
        let mut out = format!(
            "# sluice profile {}: {} files recorded ({}), then {} more from the static entrypoint list\n",
            self.image,
            recorded.len(),
            self.end,
            self.merged.len() - recorded.len(),
        );
        if self.truncated {
            out.push_str("# the recording reached its limit; files read later are missing\n");
        }
        for path in &self.merged {
            out.push_str(path);
            out.push('\n');
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error(transparent)]
    Pull(#[from] PullError),
    #[error("{image}: {source}")]
    Registry {
        image: String,
        #[source]
        source: RegistryError,
    },
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error(
        "{image}: no layer was mounted lazily by snapshotter {snapshotter}, so sluice cannot see what the run reads; convert the image to eStargz or zstd:chunked first (`sluice convert`), and remove a copy containerd unpacked earlier (`ctr images rm`)"
    )]
    NoLazyLayers { image: String, snapshotter: String },
    #[error(
        "sluice-snapshotter at {} is not reachable: is it running, and is this its --address? ({reason})",
        socket.display()
    )]
    SnapshotterUnreachable { socket: PathBuf, reason: String },
    #[error(
        "sluice-snapshotter at {} refused {call}: {status} (a daemon older than `sluice profile` answers Unimplemented: upgrade it)",
        socket.display()
    )]
    Recording {
        socket: PathBuf,
        call: &'static str,
        status: tonic::Status,
    },
    #[error("{image}: static entrypoint analysis: {reason}")]
    StaticAnalysis { image: String, reason: String },
    #[error("{image}: opening a chunk cache for the static analysis in {}: {reason}", dir.display())]
    Cache {
        image: String,
        dir: PathBuf,
        reason: String,
    },
    #[error("running {}: {source} (is containerd's ctr installed? pass its path with --ctr)", ctr.display())]
    CtrSpawn {
        ctr: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{image}: interrupted; the container, its snapshot and the recording were removed, nothing was written"
    )]
    Interrupted { image: String },
    #[error(
        "{image}: the run read no file through sluice ({end}); ctr said:\n{stderr}\ncheck that the image runs with `ctr run --snapshotter {snapshotter}`"
    )]
    NothingRecorded {
        image: String,
        snapshotter: String,
        end: RunEnd,
        stderr: String,
    },
}

/// Recorded files first, in first-access order, then the static list's files the run
/// did not touch, in the static order. Each path appears once.
pub fn merge<'a>(
    recorded: impl IntoIterator<Item = &'a str>,
    static_files: impl IntoIterator<Item = &'a str>,
) -> Vec<String> {
    let mut seen = HashSet::new();
    recorded
        .into_iter()
        .chain(static_files)
        .filter(|path| seen.insert(*path))
        .map(str::to_owned)
        .collect()
}

/// One recorded run of `reference`; see the module documentation.
pub async fn profile(
    reference: &str,
    options: &ProfileOptions,
    metrics: Arc<Metrics>,
) -> Result<ProfileReport, ProfileError> {
    let pull = crate::pull::pull(reference, &options.pull, Arc::clone(&metrics)).await?;
    let lazy: Vec<String> = pull
        .layers
        .iter()
        // A layer already present may be a lazy mount from an earlier pull; recording
        // it costs nothing if it is not.
        .filter(|layer| !matches!(layer.outcome, LayerOutcome::Downloaded { .. }))
        .map(|layer| layer.digest.to_string())
        .collect();
    if lazy.is_empty() {
        return Err(ProfileError::NoLazyLayers {
            image: pull.image.clone(),
            snapshotter: options.pull.snapshotter.clone(),
        });
    }
    let static_files = static_list(reference, options, metrics).await?;

    let socket = &options.snapshotter_socket;
    let channel = containerd_client::connect(socket).await.map_err(|error| {
        ProfileError::SnapshotterUnreachable {
            socket: socket.clone(),
            reason: error_chain(&error),
        }
    })?;
    let mut profiler = ProfilerClient::new(channel);
    let refused = |call| {
        move |status| ProfileError::Recording {
            socket: socket.clone(),
            call,
            status,
        }
    };
    let recording_id = profiler
        .start_recording(api::StartRecordingRequest {
            layer_digests: lazy,
        })
        .await
        .map_err(refused("StartRecording"))?
        .into_inner()
        .recording_id;
    let container = format!(
        "sluice-profile-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    );
    let run = run_container(&pull.image, &container, options).await;
    // Stop before looking at how the run went: a recording left running would keep
    // every read of these layers paying for it.
    let stopped = profiler
        .stop_recording(api::StopRecordingRequest { recording_id })
        .await
        .map_err(refused("StopRecording"));
    remove_container(&container, options).await;
    let (end, stderr) = run?;
    let stopped = stopped?.into_inner();
    if end == RunEnd::Interrupted {
        return Err(ProfileError::Interrupted {
            image: pull.image.clone(),
        });
    }

    let recorded: Vec<RecordedAccess> = stopped
        .files
        .into_iter()
        .filter_map(|file| {
            Some(RecordedAccess {
                layer: file.layer_digest.parse::<Digest>().ok()?,
                path: file.path,
            })
        })
        .collect();
    if recorded.is_empty() {
        return Err(ProfileError::NothingRecorded {
            image: pull.image.clone(),
            snapshotter: options.pull.snapshotter.clone(),
            end,
            stderr,
        });
    }
    let merged = merge(
        recorded.iter().map(|r| r.path.as_str()),
        static_files.iter().map(String::as_str),
    );
    Ok(ProfileReport {
        image: pull.image.clone(),
        pull,
        recorded,
        truncated: stopped.truncated,
        static_files,
        merged,
        end,
    })
}

fn ctr(options: &ProfileOptions, args: &[&str]) -> Command {
    let mut command = Command::new(&options.ctr);
    command
        .arg("--address")
        .arg(&options.pull.address)
        .arg("--namespace")
        .arg(&options.pull.namespace)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// `ctr run --rm` the image until it exits, prints the wait line or times out.
/// Returns why it ended and what ctr wrote to stderr (its own errors).
async fn run_container(
    image: &str,
    container: &str,
    options: &ProfileOptions,
) -> Result<(RunEnd, String), ProfileError> {
    let mut child = ctr(
        options,
        &[
            "run",
            "--rm",
            "--snapshotter",
            &options.pull.snapshotter,
            image,
            container,
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .map_err(|source| ProfileError::CtrSpawn {
        ctr: options.ctr.clone(),
        source,
    })?;
    let stderr_task = child.stderr.take().map(|stderr| {
        tokio::spawn(async move {
            let mut kept = Vec::new();
            let _ = stderr.take(STDERR_KEPT as u64).read_to_end(&mut kept).await;
            String::from_utf8_lossy(&kept).into_owned()
        })
    });
    let stdout = child.stdout.take().expect("stdout is piped");
    let wait_line = options.wait_line.as_deref();
    let watch = async {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::info!(target: "sluice::profile::container", "{line}");
            if wait_line.is_some_and(|wanted| line.trim_end() == wanted) {
                return Some(RunEnd::WaitLine);
            }
        }
        // stdout closed: the container is gone; its status comes from wait below.
        None
    };
    // One deadline for the whole run, however it is spent.
    let deadline = tokio::time::Instant::now() + options.timeout;
    let run = async {
        match tokio::time::timeout_at(deadline, watch).await {
            Ok(Some(end)) => end,
            Ok(None) => match tokio::time::timeout_at(deadline, child.wait()).await {
                Ok(status) => RunEnd::Exited {
                    code: status.ok().and_then(|s: ExitStatus| s.code()),
                },
                Err(_) => RunEnd::Timeout,
            },
            Err(_) => RunEnd::Timeout,
        }
    };
    let end = tokio::select! {
        end = run => end,
        _ = tokio::signal::ctrl_c() => RunEnd::Interrupted,
    };
    if !matches!(end, RunEnd::Exited { .. }) {
        let _ = ctr(options, &["task", "kill", "--signal", "SIGKILL", container])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        if tokio::time::timeout(KILL_GRACE, child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }
    let stderr = match stderr_task {
        Some(task) => task.await.unwrap_or_default(),
        None => String::new(),
    };
    Ok((end, stderr))
}

/// Remove the image record `image` from containerd (its snapshots are then collected
/// by containerd). Failure is only logged: the record is harmless, merely stale.
pub async fn remove_image(image: &str, options: &ProfileOptions) {
    let outcome = ctr(options, &["images", "rm", image])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    tracing::debug!(
        image,
        ?outcome,
        "removed the profiled image from containerd"
    );
}

/// `ctr run --rm` removes the container and its snapshot when it returns normally;
/// this covers a `ctr` that was killed or failed half-way. Each step fails harmlessly
/// when there is nothing left to remove.
async fn remove_container(container: &str, options: &ProfileOptions) {
    let steps: [&[&str]; 3] = [
        &["task", "delete", "--force", container],
        &["containers", "delete", container],
        &[
            "snapshots",
            "--snapshotter",
            &options.pull.snapshotter,
            "rm",
            container,
        ],
    ];
    for step in steps {
        let outcome = ctr(options, step)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        tracing::debug!(?step, ?outcome, "cleanup");
    }
}

/// The regular files `sluice convert --prefetch entrypoint` would list for the image,
/// read from the registry (chunks land in a private temp cache, not the daemon's).
async fn static_list(
    reference: &str,
    options: &ProfileOptions,
    metrics: Arc<Metrics>,
) -> Result<Vec<String>, ProfileError> {
    let registry_error = |source| ProfileError::Registry {
        image: reference.to_owned(),
        source,
    };
    let image: ImageReference = reference.parse().map_err(registry_error)?;
    let client = RegistryClient::new(options.pull.registry.clone(), Arc::clone(&metrics))
        .map_err(registry_error)?;
    let resolved = client
        .resolve(&image, &options.pull.platform)
        .await
        .map_err(registry_error)?;
    let info = ImageConfigInfo::from_oci_config(&resolved.config_bytes).map_err(|e| {
        ProfileError::StaticAnalysis {
            image: reference.to_owned(),
            reason: format!("reading Entrypoint/Cmd from the config: {e}"),
        }
    })?;
    let mut layers: Vec<OpenedLayer> = Vec::with_capacity(resolved.layers.len());
    for descriptor in &resolved.layers {
        match open_remote_layer(
            &client,
            reference,
            resolved.reference.repository(),
            descriptor,
            None,
        )
        .await
        {
            Ok(opened) => layers.push(opened),
            // The analysis needs every layer's files; the recording alone still
            // covers the layers sluice mounts.
            Err(LayerError::NotChunked { .. }) => {
                tracing::warn!(image = reference, layer = %descriptor.digest, "layer is not eStargz / zstd:chunked; the list has the recorded files only, no static ones");
                return Ok(Vec::new());
            }
            Err(error) => return Err(error.into()),
        }
    }
    let scratch = tempfile::tempdir().map_err(|e| ProfileError::Cache {
        image: reference.to_owned(),
        dir: std::env::temp_dir(),
        reason: e.to_string(),
    })?;
    let cache = ChunkCache::open(
        CacheOptions {
            dir: scratch.path().to_owned(),
            memory_bytes: 64 << 20,
            ..CacheOptions::default()
        },
        metrics,
    )
    .map_err(|e| ProfileError::Cache {
        image: reference.to_owned(),
        dir: scratch.path().to_owned(),
        reason: e.to_string(),
    })?;
    let runtime = tokio::runtime::Handle::current();
    let image_name = reference.to_owned();
    let analysed = tokio::task::spawn_blocking(move || {
        let by_path: Vec<HashMap<ImagePath, EntryId>> = layers
            .iter()
            .map(|layer| {
                layer
                    .index()
                    .entries
                    .iter()
                    .enumerate()
                    .map(|(i, e)| (ImagePath::new(&e.name), EntryId(i as u32)))
                    .collect()
            })
            .collect();
        let entries = layers
            .iter()
            .map(|layer| layer_entries_from_index(layer.index()))
            .collect();
        let content = |position: LayerPosition, path: &ImagePath, offset: u64, max_len: usize| {
            let not_found = || std::io::Error::from(std::io::ErrorKind::NotFound);
            let layer = layers.get(position.0).ok_or_else(not_found)?;
            let entry = *by_path[position.0].get(path).ok_or_else(not_found)?;
            let size = u32::try_from(max_len).unwrap_or(u32::MAX);
            runtime
                .block_on(cache.read_file(
                    &layer.layer,
                    entry,
                    offset,
                    size,
                    FetchPriority::OnDemand,
                ))
                .map(|bytes| bytes.to_vec())
                .map_err(std::io::Error::other)
        };
        let view = LayerStackView::new(entries, content);
        analyze_entrypoint(&view, &info)
    })
    .await
    .map_err(|e| ProfileError::StaticAnalysis {
        image: image_name.clone(),
        reason: format!("the analysis thread failed: {e}"),
    })?
    .map_err(|e| ProfileError::StaticAnalysis {
        image: image_name,
        reason: e.to_string(),
    })?;
    for warning in &analysed.warnings {
        tracing::info!(image = reference, %warning, "static prefetch analysis");
    }
    drop(scratch);
    Ok(analysed.files().map(|p| p.as_str().to_owned()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_puts_recorded_first_and_adds_unseen_static_files() {
        let merged = merge(
            ["/usr/bin/start", "/bin/busybox", "/data/ab.txt"],
            [
                "/usr/bin/start",
                "/etc/passwd",
                "/bin/busybox",
                "/etc/passwd",
            ],
        );
        assert_eq!(
            merged,
            vec![
                "/usr/bin/start",
                "/bin/busybox",
                "/data/ab.txt",
                "/etc/passwd"
            ]
        );
    }

    #[test]
    fn merge_keeps_one_copy_of_a_path_read_from_two_layers() {
        assert_eq!(merge(["/a", "/b", "/a"], []), vec!["/a", "/b"]);
    }
}

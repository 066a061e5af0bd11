//! sluice-snapshotter: the daemon containerd talks to through `[proxy_plugins.sluice]`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use sluice::cache::{CacheOptions, ChunkCache, StreamOptions};
use sluice::config::{Config, DEFAULT_CONFIG_PATH};
use sluice::fs::FsOptions;
use sluice::lazy::{LazyLayers, LazyOptions};
use sluice::metrics::Metrics;
use sluice::profile::{ProfilerService, Recorder};
use sluice::registry::{Platform, RegistryClient, RegistryOptions};
use sluice::snapshot::{OverlaySnapshotter, SnapshotService};
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::UnixListenerStream;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "containerd remote snapshotter serving lazily fetched image layers"
)]
struct Args {
    /// Configuration file; a missing file means all defaults.
    #[arg(long, env = "SLUICE_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// State directory (overrides `daemon.root`).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Unix socket to serve on (overrides `daemon.socket`).
    #[arg(long)]
    address: Option<PathBuf>,
    /// Log filter such as `info` or `sluice=debug` (overrides `daemon.log_level`).
    #[arg(long)]
    log_level: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = Config::load(&args.config)?;
    if let Some(root) = args.root {
        config.daemon.root = root;
    }
    if let Some(address) = args.address {
        config.daemon.socket = address;
    }
    if let Some(level) = args.log_level {
        config.daemon.log_level = level;
    }
    config.validate()?;
    init_logging(&config.daemon.log_level)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(serve(config))
}

/// The only place logging is configured.
fn init_logging(filter: &str) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(filter)?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init()
        .map_err(|error| anyhow::anyhow!("setting up logging: {error}"))
}

fn bind(socket: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating socket directory {}", dir.display()))?;
    }
    // A socket left by a killed daemon would make bind fail with EADDRINUSE.
    match std::fs::remove_file(socket) {
        Ok(()) => tracing::info!(socket = %socket.display(), "removed stale socket"),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            return Err(error)
                .with_context(|| format!("removing stale socket {}", socket.display()));
        }
    }
    UnixListener::bind(socket).with_context(|| format!("listening on {}", socket.display()))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let root = &config.daemon.root;
    let metrics = Arc::new(Metrics::default());
    // Shared by every FUSE mount and the Profiler service (`sluice profile`).
    let recorder = Arc::new(Recorder::new());
    let lazy = Arc::new(lazy_layers(
        &config,
        Arc::clone(&metrics),
        Arc::clone(&recorder),
    )?);
    let snapshotter = Arc::new(
        OverlaySnapshotter::open(root, lazy)
            .await
            .with_context(|| format!("opening snapshotter state in {}", root.display()))?,
    );
    let metrics_server = match config.metrics.address {
        Some(address) => Some(serve_metrics(address, metrics).await?),
        None => None,
    };
    let listener = bind(&config.daemon.socket)?;
    tracing::info!(root = %root.display(), socket = %config.daemon.socket.display(), "serving containerd snapshots API and sluice.v1.Profiler");

    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = interrupt.recv() => tracing::info!("SIGINT: shutting down"),
        }
    };
    let served = tonic::transport::Server::builder()
        .add_service(SnapshotService::new(Arc::clone(&snapshotter)).into_server())
        .add_service(ProfilerService::new(recorder).into_server())
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    snapshotter.shutdown().await;
    if let Some(server) = metrics_server {
        server.abort();
    }
    if let Err(error) = std::fs::remove_file(&config.daemon.socket) {
        tracing::warn!(%error, "removing socket");
    }
    served.context("serving gRPC")?;
    tracing::info!("stopped");
    Ok(())
}

/// Start the Prometheus endpoint; the daemon does not start when the address is taken.
async fn serve_metrics(
    address: std::net::SocketAddr,
    metrics: Arc<Metrics>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| {
            format!("listening for metrics on {address}; change or remove `metrics.address`")
        })?;
    tracing::info!(%address, "serving Prometheus metrics on /metrics");
    Ok(tokio::spawn(async move {
        if let Err(error) =
            sluice::metrics::serve_http(listener, metrics, std::future::pending()).await
        {
            tracing::error!(%address, %error, "metrics endpoint stopped");
        }
    }))
}

/// The registry client, chunk cache and FUSE settings behind remote snapshots.
fn lazy_layers(
    config: &Config,
    metrics: Arc<Metrics>,
    recorder: Arc<Recorder>,
) -> anyhow::Result<LazyLayers> {
    let registry = &config.registry;
    let client = RegistryClient::new(
        RegistryOptions {
            plain_http: registry.plain_http,
            hosts_dir: Some(registry.hosts_dir.clone()),
            docker_config: registry.docker_config.clone(),
            credentials: registry.client_credentials(),
            request_timeout: registry.request_timeout(),
            on_demand_retries: registry.retries,
            // Background work gives up sooner; it is retried by the next stream pass.
            background_retries: registry.retries.min(2),
            ..RegistryOptions::default()
        },
        Arc::clone(&metrics),
    )?;
    let cache_dir = config.cache_dir();
    let cache = ChunkCache::open(
        CacheOptions {
            dir: cache_dir.clone(),
            memory_bytes: config.cache.memory_bytes,
            disk_bytes: config.cache.disk_limit(),
            ..CacheOptions::default()
        },
        metrics,
    )
    .with_context(|| format!("opening the chunk cache in {}", cache_dir.display()))?;
    Ok(LazyLayers::new(
        client,
        cache,
        tokio::runtime::Handle::current(),
        LazyOptions {
            fs: FsOptions {
                read_timeout: config.fs.read_timeout(),
                recorder: Some(recorder),
                ..FsOptions::default()
            },
            stream: config.fs.background_fetch.then(|| StreamOptions {
                bytes_per_sec: config.fs.background_bandwidth(),
                ..StreamOptions::default()
            }),
            prefetch_timeout: config.prefetch.timeout(),
            platform: Platform::host(),
        },
    ))
}

//! `sluice`: the command line. Thin: parsing and printing only; the work is in the library.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use sluice::cache::{CacheOptions, ChunkCache, StreamOptions};
use sluice::fs::{FsOptions, mount_layer};
use sluice::layer::{LayerError, TocStore, open_remote_layer};
use sluice::metrics::Metrics;
use sluice::registry::{
    Descriptor, ImageReference, Platform, RegistryClient, RegistryOptions, ResolvedImage,
};

#[derive(Parser)]
#[command(name = "sluice", version, about = "Lazy image layers for containerd")]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, global = true, default_value = "warn", env = "SLUICE_LOG")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mount one layer of an image lazily, in the foreground, until SIGINT/SIGTERM.
    Mount(MountArgs),
    /// Show each layer of an image: format, size, entries, TOC digest, prefetch list.
    Inspect(InspectArgs),
    /// Pull an image into containerd, letting the snapshotter mount layers lazily.
    Pull(PullArgs),
    /// Convert an image's layers to eStargz or zstd:chunked, prefetched files first.
    Convert(ConvertArgs),
    /// Run an image once through containerd and sluice-snapshotter, recording the files
    /// it reads, and write a prefetch list for `sluice convert --prefetch FILE`.
    Profile(ProfileArgs),
    /// Measure cold container start-up: overlayfs vs sluice, over a shaped network (root).
    Bench(BenchArgs),
}

#[derive(Args)]
struct ConvertArgs {
    /// Source image: a registry reference or an OCI layout, oci:DIR[:TAG].
    src: String,
    /// Destination: a registry reference or a new OCI layout directory, oci:DIR[:TAG].
    dst: String,
    /// Layer format to write.
    #[arg(long, value_enum, default_value = "estargz")]
    format: ConvertFormat,
    /// Files to put first: `entrypoint` (static analysis of the image's command), a
    /// file with one absolute path per line (`sluice profile` writes one), `record`
    /// (convert with `entrypoint`, run DST once through containerd and
    /// sluice-snapshotter recording what it reads, convert again with the merged
    /// list; DST must be a registry), or `none`.
    #[arg(long, default_value = "none")]
    prefetch: String,
    /// Largest uncompressed chunk of a file, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    chunk_size: u64,
    /// Compression level (gzip 0-9, default 9; zstd 1-22, default 3).
    #[arg(long)]
    compression_level: Option<i32>,
    /// Compression threads [default: the number of CPUs].
    #[arg(long)]
    threads: Option<usize>,
    /// Convert every platform of a multi-platform image (the result is an index).
    #[arg(long)]
    all_platforms: bool,
    /// Directory for temp files (downloaded and decompressed layers).
    #[arg(long)]
    temp_dir: Option<PathBuf>,
    /// With `--prefetch record`: how the recorded run of DST is made.
    #[command(flatten)]
    run: RecordedRunArgs,
    #[command(flatten)]
    registry: RegistryArgs,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ConvertFormat {
    Estargz,
    ZstdChunked,
}

#[derive(Args)]
struct BenchArgs {
    /// Images to run (built offline by tools/mkbenchimages).
    #[arg(long, value_delimiter = ',', default_value = "tiny,python,large")]
    images: Vec<String>,
    /// Modes: overlayfs, sluice-lazy, sluice-prefetch, sluice-warm, stargz.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "overlayfs,sluice-lazy,sluice-prefetch,sluice-warm,stargz"
    )]
    modes: Vec<String>,
    /// lan (1 Gbit/s, 0.5 ms), dc (100 Mbit/s, 20 ms), slow (20 Mbit/s, 50 ms), none.
    #[arg(long, default_value = "dc")]
    network: String,
    /// Cold runs per image and mode.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Where bench.json and bench.svg are written.
    #[arg(long, default_value = "bench-out")]
    out: PathBuf,
    /// Built images and the registry storage, kept between invocations.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/target/bench-images"))]
    image_cache: PathBuf,
    /// Directory with mkbenchimages and mkimage.py.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/tools"))]
    tools_dir: PathBuf,
    /// Seconds a container may take from start to `ready` before the run counts as failed.
    #[arg(long, default_value_t = 300)]
    ready_timeout: u64,
    /// Keep every run's containerd and snapshotter logs and the registry's access log
    /// in OUT/logs.
    #[arg(long)]
    keep_logs: bool,
    /// Log filter of the sluice snapshotter during runs (see --keep-logs).
    #[arg(long, default_value = "warn")]
    snapshotter_log_level: String,
}

#[derive(Args)]
struct RegistryArgs {
    /// Use plain HTTP for registries that are not on loopback (loopback always may).
    #[arg(long)]
    plain_http: bool,
    /// containerd hosts directory with `<registry>/hosts.toml` mirror configuration.
    #[arg(long, default_value = "/etc/containerd/certs.d")]
    hosts_dir: PathBuf,
    /// Docker config.json with registry credentials [default: $DOCKER_CONFIG/config.json
    /// or ~/.docker/config.json].
    #[arg(long)]
    docker_config: Option<PathBuf>,
    /// Platform to pick from a multi-platform image, os/arch[/variant].
    #[arg(long, default_value = "linux/amd64")]
    platform: String,
}

#[derive(Args)]
struct MountArgs {
    /// Image reference, e.g. 127.0.0.1:5000/app:esgz.
    reference: String,
    /// Existing directory to mount the layer on.
    mountpoint: PathBuf,
    /// Which layer: its index (0 is the base layer) or its digest.
    #[arg(long, default_value = "0")]
    layer: String,
    /// Where fetched chunks and TOCs are kept.
    #[arg(long, default_value = "/var/lib/sluice/cache")]
    cache_dir: PathBuf,
    /// Do not stream the rest of the layer into the cache after mounting.
    #[arg(long)]
    no_background: bool,
    /// Cap for background streaming, in bytes per second (0: no cap).
    #[arg(long, default_value_t = 64 << 20)]
    background_bytes_per_sec: u64,
    /// A read whose data does not arrive in this many seconds fails with EIO.
    #[arg(long, default_value_t = 30)]
    read_timeout: u64,
    /// Bytes of decompressed chunks kept in memory.
    #[arg(long, default_value_t = 256 << 20)]
    memory_cache_bytes: u64,
    #[command(flatten)]
    registry: RegistryArgs,
}

#[derive(Args)]
struct InspectArgs {
    /// Image reference.
    reference: String,
    /// Print the files each layer asks to be prefetched.
    #[arg(long)]
    prefetch: bool,
    #[command(flatten)]
    registry: RegistryArgs,
}

#[derive(Args)]
struct ProfileArgs {
    /// Image reference (eStargz or zstd:chunked layers, so sluice mounts them).
    reference: String,
    /// Write the prefetch list here instead of to stdout.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    run: RecordedRunArgs,
    #[command(flatten)]
    registry: RegistryArgs,
}

/// How `sluice profile` (and `convert --prefetch record`) reach containerd and
/// sluice-snapshotter, and when the recorded run ends.
#[derive(Args)]
struct RecordedRunArgs {
    /// Stop recording once the container prints this line on stdout.
    #[arg(long)]
    wait_line: Option<String>,
    /// Stop recording (and kill the container) after this many seconds in any case.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// sluice-snapshotter's socket.
    #[arg(long, default_value = "/run/sluice/sluice.sock")]
    snapshotter_socket: PathBuf,
    #[command(flatten)]
    containerd: ContainerdArgs,
    /// containerd's `ctr` binary, used to run the container.
    #[arg(long, default_value = "ctr")]
    ctr: PathBuf,
}

impl RecordedRunArgs {
    fn options(self, registry: &RegistryArgs) -> Result<sluice::profile::ProfileOptions> {
        Ok(sluice::profile::ProfileOptions {
            pull: sluice::pull::PullOptions {
                address: self.containerd.address,
                namespace: self.containerd.namespace,
                snapshotter: self.containerd.snapshotter,
                platform: registry.platform.parse()?,
                registry: RegistryOptions {
                    plain_http: registry.plain_http,
                    hosts_dir: Some(registry.hosts_dir.clone()),
                    docker_config: registry.docker_config.clone(),
                    ..RegistryOptions::default()
                },
                progress: false,
            },
            snapshotter_socket: self.snapshotter_socket,
            wait_line: self.wait_line,
            timeout: Duration::from_secs(self.timeout.max(1)),
            ctr: self.ctr,
        })
    }
}

#[derive(Args)]
struct PullArgs {
    /// Image reference; also the name of the image record in containerd.
    reference: String,
    #[command(flatten)]
    containerd: ContainerdArgs,
    #[command(flatten)]
    registry: RegistryArgs,
}

/// Which containerd, namespace and snapshotter a command works with.
#[derive(Args)]
struct ContainerdArgs {
    /// containerd's gRPC socket.
    #[arg(
        long,
        alias = "containerd-socket",
        default_value = "/run/containerd/containerd.sock"
    )]
    address: PathBuf,
    /// containerd namespace.
    #[arg(
        long,
        short = 'n',
        default_value = "default",
        env = "CONTAINERD_NAMESPACE"
    )]
    namespace: String,
    /// The snapshotter to unpack with, as named in containerd's config.
    #[arg(long, default_value = "sluice")]
    snapshotter: String,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log_level)
                .with_context(|| format!("invalid --log-level {:?}", cli.log_level))?,
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Mount(args) => runtime.block_on(mount(args)),
        Command::Inspect(args) => runtime.block_on(inspect(args)),
        Command::Pull(args) => runtime.block_on(pull(args)),
        Command::Convert(args) => runtime.block_on(convert(args)),
        Command::Profile(args) => runtime.block_on(profile(args)),
        Command::Bench(args) => bench(args),
    }
}

async fn resolve(
    args: &RegistryArgs,
    reference: &str,
    metrics: Arc<Metrics>,
) -> Result<(Arc<RegistryClient>, ImageReference, ResolvedImage)> {
    let image: ImageReference = reference.parse()?;
    let platform: Platform = args.platform.parse()?;
    let client = RegistryClient::new(
        RegistryOptions {
            plain_http: args.plain_http,
            hosts_dir: Some(args.hosts_dir.clone()),
            docker_config: args.docker_config.clone(),
            ..RegistryOptions::default()
        },
        metrics,
    )?;
    let resolved = client.resolve(&image, &platform).await?;
    Ok((client, image, resolved))
}

fn pick_layer<'a>(resolved: &'a ResolvedImage, wanted: &str) -> Result<(usize, &'a Descriptor)> {
    let layers = &resolved.layers;
    if let Ok(index) = wanted.parse::<usize>() {
        return match layers.get(index) {
            Some(layer) => Ok((index, layer)),
            None => bail!(
                "{} has {} layers (0..={}); there is no layer {index}",
                resolved.reference,
                layers.len(),
                layers.len().saturating_sub(1)
            ),
        };
    }
    layers
        .iter()
        .enumerate()
        .find(|(_, layer)| {
            layer.digest.as_str() == wanted || layer.digest.hex().starts_with(wanted)
        })
        .with_context(|| {
            format!(
                "{} has no layer {wanted:?}; run `sluice inspect {}` to list them",
                resolved.reference, resolved.reference
            )
        })
}

async fn mount(args: MountArgs) -> Result<()> {
    let metrics = Arc::new(Metrics::default());
    let (client, image, resolved) =
        resolve(&args.registry, &args.reference, Arc::clone(&metrics)).await?;
    let (index, descriptor) = pick_layer(&resolved, &args.layer)?;
    let cache = ChunkCache::open(
        CacheOptions {
            dir: args.cache_dir.clone(),
            memory_bytes: args.memory_cache_bytes,
            ..CacheOptions::default()
        },
        Arc::clone(&metrics),
    )?;
    let store = TocStore::new(args.cache_dir.join("tocs"));
    let opened = open_remote_layer(
        &client,
        &image.to_string(),
        image.repository(),
        descriptor,
        Some(&store),
    )
    .await?;
    let layer = Arc::clone(&opened.layer);
    let runtime = tokio::runtime::Handle::current();
    let mountpoint = args.mountpoint.clone();
    let options = FsOptions {
        read_timeout: Duration::from_secs(args.read_timeout.max(1)),
        fsname: format!(
            "sluice:{}",
            descriptor.digest.hex().get(..12).unwrap_or_default()
        ),
        ..FsOptions::default()
    };
    let mounted = {
        let (layer, cache) = (Arc::clone(&layer), Arc::clone(&cache));
        let runtime = runtime.clone();
        tokio::task::spawn_blocking(move || {
            mount_layer(layer, cache, runtime, &mountpoint, options)
        })
        .await??
    };
    let _stream = (!args.no_background).then(|| {
        cache.stream_layer(
            Arc::clone(&layer),
            StreamOptions {
                bytes_per_sec: (args.background_bytes_per_sec > 0)
                    .then_some(args.background_bytes_per_sec),
                ..StreamOptions::default()
            },
            &runtime,
        )
    });
    eprintln!(
        "mounted layer {index} ({}, {}, {} entries, {} bytes) of {image} at {}; Ctrl-C to unmount",
        descriptor.digest,
        opened.format(),
        opened.index().entries.len(),
        descriptor.size,
        args.mountpoint.display()
    );
    wait_for_signal().await?;
    drop(_stream);
    tokio::task::spawn_blocking(move || mounted.unmount()).await??;
    eprint!("{}", metrics.render());
    Ok(())
}

async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

async fn pull(args: PullArgs) -> Result<()> {
    let options = sluice::pull::PullOptions {
        address: args.containerd.address,
        namespace: args.containerd.namespace,
        snapshotter: args.containerd.snapshotter,
        platform: args.registry.platform.parse()?,
        registry: RegistryOptions {
            plain_http: args.registry.plain_http,
            hosts_dir: Some(args.registry.hosts_dir),
            docker_config: args.registry.docker_config,
            ..RegistryOptions::default()
        },
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let summary = sluice::pull::pull(&args.reference, &options, Arc::default()).await?;
    println!("{summary}");
    Ok(())
}

async fn profile(args: ProfileArgs) -> Result<()> {
    let options = args.run.options(&args.registry)?;
    let report = sluice::profile::profile(&args.reference, &options, Arc::default()).await?;
    let text = report.prefetch_file();
    match &args.out {
        Some(out) => std::fs::write(out, &text)
            .with_context(|| format!("writing the prefetch list to {}", out.display()))?,
        None => print!("{text}"),
    }
    eprintln!(
        "{}{}",
        report.summary(),
        args.out
            .as_ref()
            .map_or_else(String::new, |out| format!(" ({})", out.display()))
    );
    Ok(())
}

async fn inspect(args: InspectArgs) -> Result<()> {
    let metrics = Arc::new(Metrics::default());
    let (client, image, resolved) = resolve(&args.registry, &args.reference, metrics).await?;
    println!("image    {image}");
    println!("manifest {}", resolved.manifest_digest);
    println!("config   {}", resolved.config_digest);
    for (index, descriptor) in resolved.layers.iter().enumerate() {
        println!();
        println!("layer {index}  {}", descriptor.digest);
        println!("  media type      {}", descriptor.media_type);
        println!("  compressed size {}", descriptor.size);
        match open_remote_layer(
            &client,
            &image.to_string(),
            image.repository(),
            descriptor,
            None,
        )
        .await
        {
            Ok(opened) => {
                let index = opened.index();
                println!("  format          {}", opened.format());
                println!("  entries         {}", index.entries.len());
                println!("  toc digest      {}", opened.toc_digest);
                println!(
                    "  prefetch        {}",
                    if index.no_prefetch {
                        "none (.no.prefetch.landmark)".to_owned()
                    } else {
                        format!("{} files", index.prefetch.len())
                    }
                );
                if args.prefetch {
                    for &entry in &index.prefetch {
                        println!("    /{}", index.entry(entry).name);
                    }
                }
            }
            Err(LayerError::NotChunked { .. }) => {
                println!("  format          plain tar (not lazily mountable)");
            }
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

async fn convert(args: ConvertArgs) -> Result<()> {
    use sluice::convert::{
        ConvertOptions, ImageLocation, PlatformChoice, PrefetchSource, convert_image,
    };
    use sluice::format::LayerFormat;
    let format = match args.format {
        ConvertFormat::Estargz => LayerFormat::Estargz,
        ConvertFormat::ZstdChunked => LayerFormat::ZstdChunked,
    };
    let src: ImageLocation = args.src.parse()?;
    let dst: ImageLocation = args.dst.parse()?;
    let record = args.prefetch == "record";
    if record && (!matches!(dst, ImageLocation::Registry(_)) || args.all_platforms) {
        bail!(
            "--prefetch record runs DST through containerd, which pulls it from a registry: \
             DST must be a registry reference and --all-platforms cannot be used (convert to \
             a registry, or record with `sluice profile` and pass its list with --prefetch FILE)"
        );
    }
    let mut options = ConvertOptions::new(format);
    options.prefetch = match args.prefetch.as_str() {
        "none" => PrefetchSource::None,
        "entrypoint" => PrefetchSource::Entrypoint,
        "record" => PrefetchSource::Entrypoint,
        file => PrefetchSource::from_file(std::path::Path::new(file))?,
    };
    options.chunk_size = args.chunk_size;
    options.compression_level = args.compression_level;
    if let Some(threads) = args.threads {
        options.threads = threads.max(1);
    }
    options.platforms = if args.all_platforms {
        PlatformChoice::All
    } else {
        PlatformChoice::One(args.registry.platform.parse()?)
    };
    options.temp_dir = args.temp_dir;
    let client = RegistryClient::new(
        RegistryOptions {
            plain_http: args.registry.plain_http,
            hosts_dir: Some(args.registry.hosts_dir.clone()),
            docker_config: args.registry.docker_config.clone(),
            ..RegistryOptions::default()
        },
        Arc::new(Metrics::default()),
    )?;
    let mut report = convert_image(&client, &src, &dst, &options).await?;
    if record {
        let run = args.run.options(&args.registry)?;
        let recorded = sluice::profile::profile(&dst.to_string(), &run, Arc::default())
            .await
            .with_context(|| {
                format!("{dst} was converted with the static list but its run was not recorded")
            })?;
        eprintln!("{}", recorded.summary());
        // The image record points at the converted image about to be replaced.
        sluice::profile::remove_image(&recorded.image, &run).await;
        options.prefetch = PrefetchSource::Files(recorded.merged.clone());
        report = convert_image(&client, &src, &dst, &options).await?;
    }
    for manifest in &report.manifests {
        let platform = manifest
            .platform
            .as_ref()
            .map_or_else(String::new, |p| format!(" ({p})"));
        println!("manifest {}{platform}", manifest.manifest_digest);
        println!("  config {}", manifest.config_digest);
        for layer in &manifest.layers {
            println!(
                "  layer  {} {} {} bytes, toc {}, {} prefetched",
                layer.digest,
                layer.format,
                layer.size,
                layer.toc_digest,
                layer.prefetched.len()
            );
        }
    }
    println!("{} {} {}", dst, report.media_type, report.digest);
    Ok(())
}

fn bench(args: BenchArgs) -> Result<()> {
    let modes = args
        .modes
        .iter()
        .map(|m| m.parse())
        .collect::<Result<Vec<sluice::bench::Mode>, _>>()?;
    let options = sluice::bench::BenchOptions {
        images: args.images,
        modes,
        network: args.network.parse().map_err(anyhow::Error::msg)?,
        runs: args.runs.max(1),
        out_dir: args.out,
        image_cache: args.image_cache,
        tools_dir: args.tools_dir,
        ready_timeout: Duration::from_secs(args.ready_timeout.max(1)),
        command_line: std::env::args().collect::<Vec<_>>().join(" "),
        keep_logs: args.keep_logs,
        snapshotter_log_level: args.snapshotter_log_level,
    };
    let report = match sluice::bench::run(&options) {
        Ok(report) => report,
        Err(error @ sluice::bench::BenchError::Interrupted) => {
            eprintln!("\n{error}");
            std::process::exit(130);
        }
        Err(error) => return Err(error.into()),
    };
    let failed: Vec<String> = report
        .results
        .iter()
        .filter(|r| !r.ok)
        .map(|r| format!("{} {}", r.image, r.mode.name()))
        .collect();
    if !failed.is_empty() {
        bail!(
            "containers that did not print `ready`: {}",
            failed.join(", ")
        );
    }
    Ok(())
}

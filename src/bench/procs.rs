//! The processes a benchmark run needs — registry, containerd, a lazy snapshotter —
//! each owned by a guard that ends it by PID and removes what it mounted.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{BenchError, command_output};

/// Poll `condition` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM, a grace period, then SIGKILL; always reaped.
fn end_child(child: &mut Child, grace: Duration) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    if !wait_until(grace, || matches!(child.try_wait(), Ok(Some(_)))) {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// Detach every mount at or below `dir`, deepest first.
pub fn unmount_all_under(dir: &Path) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut mounts: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(field.replace("\\040", " ")))
        .filter(|path| path.starts_with(dir))
        .collect();
    mounts.sort_by_key(|path| std::cmp::Reverse(path.components().count()));
    for mount in mounts {
        let _ = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// One blocking HTTP/1.1 GET; the status code.
fn http_get_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    String::from_utf8_lossy(&response)
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no HTTP status line from {addr}")))
}

/// Requests and body bytes the registry served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Served {
    pub requests: u64,
    pub bytes: u64,
}

/// Marker requests flush the access log up to a point; they are not counted.
const MARK_PATH: &str = "/v2/?sluice-bench-mark=";

#[derive(Default)]
struct AccessLog {
    state: Mutex<(Served, u64)>,
    changed: Condvar,
}

impl AccessLog {
    /// distribution's access log: `... "GET /v2/... HTTP/1.1" 206 4096 "..." "..."`.
    fn ingest(&self, line: &str) {
        let Some((_, rest)) = line.split_once("] \"") else {
            return;
        };
        let Some((request, rest)) = rest.split_once("\" ") else {
            return;
        };
        let mut fields = rest.split(' ');
        let (Some(_status), Some(bytes)) = (fields.next(), fields.next()) else {
            return;
        };
        let bytes: u64 = bytes.parse().unwrap_or(0);
        let uri = request.split(' ').nth(1).unwrap_or_default();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mark) = uri.strip_prefix(MARK_PATH) {
            state.1 = state.1.max(mark.parse().unwrap_or(0));
        } else {
            state.0.requests += 1;
            state.0.bytes += bytes;
        }
        self.changed.notify_all();
    }
}

/// Debian's `docker-registry` serving a storage directory, optionally inside a network
/// namespace; what it serves is counted from its own access log.
pub struct Registry {
    child: Child,
    log: Arc<AccessLog>,
    /// Where marker requests are sent (the address clients use).
    client_addr: SocketAddr,
    next_mark: AtomicU64,
}

impl Registry {
    /// Serve `storage` on `listen`; `namespace_fd` puts the process in that network
    /// namespace. `client_addr` is how the host reaches it.
    pub fn start(
        work_dir: &Path,
        storage: &Path,
        listen: SocketAddr,
        client_addr: SocketAddr,
        namespace_fd: Option<i32>,
    ) -> Result<Registry, BenchError> {
        let config = work_dir.join("registry.yml");
        let text = format!(
            "version: 0.1\nlog:\n  level: warn\n  formatter: text\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: {listen}\n",
            storage.display()
        );
        std::fs::write(&config, text).map_err(|source| BenchError::Io {
            what: format!("writing {}", config.display()),
            source,
        })?;
        let mut command = Command::new("docker-registry");
        command
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(fd) = namespace_fd {
            // SAFETY: the closure runs in the forked child before exec and only calls
            // setns, which is async-signal-safe.
            unsafe {
                command.pre_exec(move || super::net::enter_namespace(fd));
            }
        }
        let mut child = command.spawn().map_err(|source| BenchError::Io {
            what: "spawning docker-registry (apt install docker-registry)".into(),
            source,
        })?;
        let log = Arc::new(AccessLog::default());
        let server_log = work_dir.join("registry.log");
        let streams: Vec<Box<dyn std::io::Read + Send>> = vec![
            Box::new(child.stdout.take().expect("piped stdout")),
            Box::new(child.stderr.take().expect("piped stderr")),
        ];
        for stream in streams {
            let log = Arc::clone(&log);
            let server_log = server_log.clone();
            std::thread::spawn(move || {
                use std::io::Write;
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(server_log)
                    .ok();
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if let Some(file) = file.as_mut() {
                        let _ = writeln!(file, "{line}");
                    }
                    log.ingest(&line);
                }
            });
        }
        let mut registry = Registry {
            child,
            log,
            client_addr,
            next_mark: AtomicU64::new(0),
        };
        let mut exited = false;
        let ready = wait_until(Duration::from_secs(20), || {
            exited = !matches!(registry.child.try_wait(), Ok(None));
            exited || http_get_status(client_addr, "/v2/").is_ok()
        });
        if !ready || exited {
            end_child(&mut registry.child, Duration::from_secs(1));
            return Err(BenchError::Setup {
                what: "registry".into(),
                reason: format!(
                    "docker-registry did not answer on {client_addr}; see {}",
                    server_log.display()
                ),
            });
        }
        Ok(registry)
    }

    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }

    /// Everything served so far, after making sure the access log caught up.
    pub fn served(&self) -> Served {
        let mark = self.next_mark.fetch_add(1, Ordering::SeqCst) + 1;
        if http_get_status(self.client_addr, &format!("{MARK_PATH}{mark}")).is_ok() {
            let state = self.log.state.lock().unwrap_or_else(|e| e.into_inner());
            let _ = self
                .log
                .changed
                .wait_timeout_while(state, Duration::from_secs(5), |s| s.1 < mark);
        }
        self.log.state.lock().unwrap_or_else(|e| e.into_inner()).0
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        end_child(&mut self.child, Duration::from_secs(2));
    }
}

/// A lazy snapshotter serving containerd as a proxy plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotterKind {
    Sluice,
    /// stargz-snapshotter's `containerd-stargz-grpc`, for comparison.
    Stargz,
}

impl SnapshotterKind {
    pub fn plugin_name(self) -> &'static str {
        match self {
            SnapshotterKind::Sluice => "sluice",
            SnapshotterKind::Stargz => "stargz",
        }
    }
}

/// A private containerd (isolated content, its own root/state/socket) plus, when
/// asked, a lazy snapshotter registered as its proxy plugin. Dropping it ends
/// containerd, the shims it started, the snapshotter, and their mounts.
pub struct Daemons {
    dir: PathBuf,
    containerd: Option<Child>,
    snapshotter: Option<Child>,
    pub snapshotter_kind: Option<SnapshotterKind>,
}

impl Daemons {
    /// Start in `dir` (short path: unix sockets). `cache_dir` is sluice's chunk cache,
    /// kept outside `dir` when a run must find it warm.
    pub fn start(
        dir: &Path,
        snapshotter: Option<SnapshotterKind>,
        cache_dir: &Path,
        snapshotter_log_level: &str,
    ) -> Result<Daemons, BenchError> {
        std::fs::create_dir_all(dir).map_err(|source| BenchError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        let mut daemons = Daemons {
            dir: dir.to_owned(),
            containerd: None,
            snapshotter: None,
            snapshotter_kind: snapshotter,
        };
        if let Some(kind) = snapshotter {
            daemons.start_snapshotter(kind, cache_dir, snapshotter_log_level)?;
        }
        daemons.start_containerd()?;
        Ok(daemons)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    fn snapshotter_socket(&self) -> PathBuf {
        self.dir.join("snapshotter.sock")
    }

    fn log_file(&self, name: &str) -> Result<std::fs::File, BenchError> {
        let path = self.dir.join(name);
        std::fs::File::create(&path).map_err(|source| BenchError::Io {
            what: format!("creating {}", path.display()),
            source,
        })
    }

    fn start_snapshotter(
        &mut self,
        kind: SnapshotterKind,
        cache_dir: &Path,
        log_level: &str,
    ) -> Result<(), BenchError> {
        let root = self.dir.join("snapshotter");
        let socket = self.snapshotter_socket();
        let log = self.log_file("snapshotter.log")?;
        let mut command = match kind {
            SnapshotterKind::Sluice => {
                let config = self.dir.join("sluice.toml");
                let text = format!(
                    "[daemon]\nroot = \"{root}\"\nsocket = \"{socket}\"\nlog_level = \"{log_level}\"\n\n\
                     [cache]\ndir = \"{cache}\"\n\n[registry]\nplain_http = true\n\n\
                     [fs]\nbackground_fetch = false\n\n[prefetch]\ntimeout_secs = 60\n",
                    root = root.display(),
                    socket = socket.display(),
                    cache = cache_dir.display(),
                    log_level = log_level.escape_default(),
                );
                std::fs::write(&config, text).map_err(|source| BenchError::Io {
                    what: format!("writing {}", config.display()),
                    source,
                })?;
                let mut command = Command::new(sibling_binary("sluice-snapshotter"));
                command.arg("--config").arg(config);
                command
            }
            SnapshotterKind::Stargz => {
                let config = self.dir.join("stargz.toml");
                std::fs::write(
                    &config,
                    "[[resolver.host.\"docker.io\".mirrors]]\nhost = \"none\"\n",
                )
                .map_err(|source| BenchError::Io {
                    what: format!("writing {}", config.display()),
                    source,
                })?;
                let mut command = Command::new("containerd-stargz-grpc");
                command
                    .arg("--address")
                    .arg(&socket)
                    .arg("--root")
                    .arg(&root)
                    .arg("--config")
                    .arg(config);
                command
            }
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|source| BenchError::Io {
                what: "duplicating the snapshotter log handle".into(),
                source,
            })?)
            .stderr(log)
            .spawn()
            .map_err(|source| BenchError::Io {
                what: format!("spawning the {} snapshotter", kind.plugin_name()),
                source,
            })?;
        self.snapshotter = Some(child);
        let up = wait_until(Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
        if !up {
            return Err(BenchError::Setup {
                what: format!("{} snapshotter", kind.plugin_name()),
                reason: format!(
                    "did not listen on {}; see {}",
                    socket.display(),
                    self.dir.join("snapshotter.log").display()
                ),
            });
        }
        Ok(())
    }

    fn start_containerd(&mut self) -> Result<(), BenchError> {
        let root = &self.dir;
        let mut config = format!(
            "version = 2\nroot = \"{root}/root\"\nstate = \"{root}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\n\
             [grpc]\n  address = \"{socket}\"\n\n[ttrpc]\n  address = \"{root}/ttrpc.sock\"\n\n\
             [debug]\n  address = \"{root}/debug.sock\"\n  level = \"warn\"\n\n\
             [plugins.\"io.containerd.metadata.v1.bolt\"]\n  content_sharing_policy = \"isolated\"\n\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{root}/opt\"\n",
            root = root.display(),
            socket = self.socket().display(),
        );
        if let Some(kind) = self.snapshotter_kind {
            config.push_str(&format!(
                "\n[proxy_plugins]\n  [proxy_plugins.\"{}\"]\n    type = \"snapshot\"\n    address = \"{}\"\n",
                kind.plugin_name(),
                self.snapshotter_socket().display()
            ));
        }
        let path = root.join("containerd.toml");
        std::fs::write(&path, config).map_err(|source| BenchError::Io {
            what: format!("writing {}", path.display()),
            source,
        })?;
        let log = self.log_file("containerd.log")?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|source| BenchError::Io {
                what: "duplicating the containerd log handle".into(),
                source,
            })?)
            .stderr(log)
            .spawn()
            .map_err(|source| BenchError::Io {
                what: "spawning containerd".into(),
                source,
            })?;
        self.containerd = Some(child);
        let ready = wait_until(Duration::from_secs(30), || {
            self.ctr("default", &["version"]).is_ok()
        });
        if !ready {
            return Err(BenchError::Setup {
                what: "containerd".into(),
                reason: format!(
                    "did not answer; see {}",
                    self.dir.join("containerd.log").display()
                ),
            });
        }
        Ok(())
    }

    /// A `ctr`/`ctr-remote` command against this containerd in `namespace`.
    pub fn command(&self, program: &str, namespace: &str, args: &[&str]) -> Command {
        let mut command = Command::new(program);
        command
            .arg("--address")
            .arg(self.socket())
            .args(["--namespace", namespace])
            .args(args);
        command
    }

    pub fn ctr(&self, namespace: &str, args: &[&str]) -> Result<String, BenchError> {
        command_output(&mut self.command("ctr", namespace, args))
    }

    /// `sluice pull` of `reference` into `namespace` through the sluice snapshotter.
    pub fn sluice_pull(&self, namespace: &str, reference: &str) -> Command {
        let mut command = Command::new(sibling_binary("sluice"));
        command
            .arg("pull")
            .arg("--address")
            .arg(self.socket())
            .args(["--namespace", namespace])
            .args(["--snapshotter", SnapshotterKind::Sluice.plugin_name()])
            .arg("--plain-http")
            .arg(reference);
        command
    }

    /// containerd's content store blobs (sha256/...).
    pub fn content_blobs(&self) -> PathBuf {
        self.dir.join("root/io.containerd.content.v1.content/blobs")
    }

    /// Shims (and their containers) carry our socket path on their command line.
    fn kill_shims(&self) {
        let socket = self.socket();
        let socket = socket.as_os_str().as_encoded_bytes();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            if cmdline.split(|b| *b == 0).any(|arg| arg == socket) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

impl Drop for Daemons {
    fn drop(&mut self) {
        if let Some(mut child) = self.containerd.take() {
            end_child(&mut child, Duration::from_secs(10));
        }
        self.kill_shims();
        unmount_all_under(&self.dir);
        if let Some(mut child) = self.snapshotter.take() {
            end_child(&mut child, Duration::from_secs(10));
        }
        unmount_all_under(&self.dir);
    }
}

/// A binary installed next to the running `sluice` (same cargo target directory or
/// the same bin directory), else found on PATH.
pub fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .filter(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Whether `program` is on PATH.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

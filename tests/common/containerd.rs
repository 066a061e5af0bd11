//! A private containerd 1.6 per test: its own root, state, socket and config in a temp
//! dir, so tests neither see nor disturb a system containerd or each other.
//!
//! A proxy snapshotter must already listen on its socket when containerd starts:
//! containerd connects to proxy plugins when it loads them, and a snapshotter that comes
//! up later is not retried.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::{run_command, short_tempdir, wait_until};

/// Namespace the helpers use unless a test passes `--namespace` itself.
pub const NAMESPACE: &str = "sluice-test";

#[derive(Debug, Clone, Default)]
pub struct ContainerdOptions {
    /// `(name, socket)` of a snapshotter served over gRPC, registered as a
    /// `[proxy_plugins]` entry of type `snapshot`. It must be listening already.
    pub proxy_snapshotter: Option<(String, PathBuf)>,
    /// Load the CRI plugin (disabled otherwise). It then uses the proxy snapshotter if
    /// one is given, passes snapshot annotations, and restricts oom_score_adj.
    pub enable_cri: bool,
    /// TOML appended verbatim to the generated config.
    pub extra_config: String,
}

/// A running containerd. On drop it is killed, shims it spawned are killed, and mounts
/// under its temp dir are removed.
pub struct TestContainerd {
    dir: TempDir,
    child: Option<Child>,
    options: ContainerdOptions,
}

impl TestContainerd {
    pub fn start(options: ContainerdOptions) -> TestContainerd {
        let dir = short_tempdir("sluice-ctd-");
        if let Some((name, socket)) = &options.proxy_snapshotter {
            assert!(
                socket.exists(),
                "proxy snapshotter {name}: socket {} does not exist; start the snapshotter before containerd",
                socket.display()
            );
        }
        let mut containerd = TestContainerd {
            dir,
            child: None,
            options,
        };
        containerd.spawn();
        containerd
    }

    fn write_config(&self) -> PathBuf {
        let root = self.dir.path();
        let mut config = format!(
            r#"version = 2
root = "{root}/root"
state = "{root}/state"
disabled_plugins = [{disabled}]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{root}/ttrpc.sock"

[debug]
  address = "{root}/debug.sock"
  level = "info"

[plugins."io.containerd.metadata.v1.bolt"]
  content_sharing_policy = "isolated"

[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt"

[plugins."io.containerd.gc.v1.scheduler"]
  startup_delay = "100ms"
"#,
            root = root.display(),
            socket = self.socket().display(),
            disabled = if self.options.enable_cri {
                String::new()
            } else {
                r#""io.containerd.grpc.v1.cri""#.to_string()
            },
        );
        if self.options.enable_cri {
            let snapshotter = self
                .options
                .proxy_snapshotter
                .as_ref()
                .map_or("overlayfs", |(name, _)| name.as_str());
            config.push_str(&format!(
                r#"
[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_tcp_service = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{snapshotter}"
    disable_snapshot_annotations = false
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{root}/cni/bin"
    conf_dir = "{root}/cni/net.d"
"#,
                root = root.display(),
            ));
        }
        if let Some((name, socket)) = &self.options.proxy_snapshotter {
            config.push_str(&format!(
                "\n[proxy_plugins]\n  [proxy_plugins.\"{name}\"]\n    type = \"snapshot\"\n    address = \"{}\"\n",
                socket.display()
            ));
        }
        config.push('\n');
        config.push_str(&self.options.extra_config);
        let path = root.join("config.toml");
        std::fs::write(&path, config).expect("write containerd config");
        path
    }

    fn spawn(&mut self) {
        let config = self.write_config();
        let log = std::fs::File::create(self.log_path()).expect("create containerd log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone containerd log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn containerd (is it installed?)");
        self.child = Some(child);
        let ready = wait_until(Duration::from_secs(30), || {
            !self.is_running() || self.ctr(&["version"]).is_ok()
        });
        if !ready || !self.is_running() {
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            self.shutdown();
            panic!("containerd did not become ready; log:\n{log}");
        }
    }

    /// gRPC socket path (`--address` for ctr and ctr-remote).
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// containerd's root directory (content store, metadata, snapshotters).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// A directory inside the test's temp area for the test's own use.
    pub fn scratch_dir(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join("scratch").join(name);
        std::fs::create_dir_all(&path).expect("create scratch dir");
        path
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("containerd.log")
    }

    /// Process id of the daemon, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    fn with_address(&self, program: &str, args: &[&str]) -> Command {
        let mut command = Command::new(program);
        command.arg("--address").arg(self.socket());
        if !args.iter().any(|a| *a == "--namespace" || *a == "-n") {
            command.args(["--namespace", NAMESPACE]);
        }
        command.args(args);
        command
    }

    /// `ctr --address SOCKET --namespace sluice-test ARGS`; stdout, or an error with the
    /// command line and stderr.
    pub fn ctr(&self, args: &[&str]) -> Result<String, String> {
        run_command(&mut self.with_address("ctr", args))
    }

    /// Same for `ctr-remote` (stargz-snapshotter's ctr with `images convert`).
    pub fn ctr_remote(&self, args: &[&str]) -> Result<String, String> {
        run_command(&mut self.with_address("ctr-remote", args))
    }

    /// A `ctr` command ready to run, for tests that need to control it (stdin, spawn).
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        self.with_address("ctr", args)
    }

    /// Kill containerd and everything it left behind, then start it again with the
    /// same root, state and config (for restart-recovery tests).
    pub fn restart(&mut self) {
        self.kill_daemon();
        self.spawn();
    }

    fn kill_daemon(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let exited = wait_until(Duration::from_secs(10), || {
                matches!(child.try_wait(), Ok(Some(_)))
            });
            if !exited {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }

    /// Shims (and through them containers) were started by our daemon: they carry our
    /// unique socket path on their command line.
    fn kill_shims(&self) {
        let socket = self.socket();
        let socket = socket.to_string_lossy();
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
            let is_our_shim = cmdline
                .split(|b| *b == 0)
                .any(|arg| arg == socket.as_bytes());
            if is_our_shim {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    fn shutdown(&mut self) {
        self.kill_daemon();
        self.kill_shims();
        unmount_all_under(self.dir.path());
    }
}

impl Drop for TestContainerd {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Detach every mount at or below `dir`, deepest first.
pub fn unmount_all_under(dir: &Path) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut mounts: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|path| path.starts_with(dir))
        .collect();
    mounts.sort_by_key(|path| std::cmp::Reverse(path.components().count()));
    for mount in mounts {
        let _ = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4].iter().all(u8::is_ascii_digit)
        {
            let octal = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("0");
            out.push(u8::from_str_radix(octal, 8).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

//! The real `sluice-snapshotter` binary with a private root and socket. Start it before
//! containerd: containerd connects to proxy plugins when it loads them.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::containerd::unmount_all_under;
use super::{short_tempdir, wait_until};

/// Dropping it kills the process (by PID) and detaches mounts left under its directory.
pub struct SnapshotterDaemon {
    dir: TempDir,
    child: Option<Child>,
    config: String,
}

impl SnapshotterDaemon {
    /// Start with `config` (TOML; empty for defaults) and wait until the socket answers.
    pub fn start(config: &str) -> SnapshotterDaemon {
        let mut daemon = SnapshotterDaemon {
            dir: short_tempdir("sluice-sd-"),
            child: None,
            config: config.to_owned(),
        };
        daemon.spawn();
        daemon
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("run/sluice.sock")
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.root().join("cache")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("snapshotter.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| child.try_wait().ok().flatten().is_none())
    }

    /// Start again after `stop` or `kill9`, with the same root, socket and config.
    pub fn spawn(&mut self) {
        let config = self.dir.path().join("config.toml");
        std::fs::write(&config, &self.config).expect("write snapshotter config");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open snapshotter log");
        let child = Command::new(env!("CARGO_BIN_EXE_sluice-snapshotter"))
            .arg("--config")
            .arg(&config)
            .arg("--root")
            .arg(self.root())
            .arg("--address")
            .arg(self.socket())
            .args(["--log-level", "sluice=debug,info"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn sluice-snapshotter");
        self.child = Some(child);
        let socket = self.socket();
        let mut exited = false;
        let ready = wait_until(Duration::from_secs(60), || {
            exited = !self.is_running();
            exited || UnixStream::connect(&socket).is_ok()
        });
        assert!(
            ready && !exited,
            "sluice-snapshotter did not listen on {}; log:\n{}",
            socket.display(),
            self.log()
        );
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait: the graceful path, which must exit 0.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("snapshotter running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("send SIGTERM");
        let status = child.wait().expect("wait for snapshotter");
        assert!(
            status.success(),
            "snapshotter exited with {status}; log:\n{}",
            self.log()
        );
        assert!(
            !self.socket().exists(),
            "socket left behind after graceful shutdown"
        );
    }

    /// Names of the entries in root/snapshots.
    pub fn snapshot_dirs(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.root().join("snapshots"))
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

impl Drop for SnapshotterDaemon {
    fn drop(&mut self) {
        self.kill9();
        unmount_all_under(self.dir.path());
    }
}

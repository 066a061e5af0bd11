//! `sluice mount` of one layer as a child process, and telling mount points apart.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `sluice mount` process; killed and unmounted on drop.
pub struct LayerMount {
    child: Child,
    mountpoint: PathBuf,
}

impl LayerMount {
    /// Mount layer `layer` of `reference` at `mountpoint` with chunk cache `cache`, and
    /// wait until the mount is there. `background`: stream the rest of the layer in,
    /// so a tree walk is not one round trip per file.
    pub fn start(
        reference: &str,
        layer: usize,
        cache: &Path,
        mountpoint: &Path,
        background: bool,
    ) -> LayerMount {
        std::fs::create_dir_all(mountpoint).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
        command
            .args(["mount", reference])
            .arg(mountpoint)
            .args(["--layer", &layer.to_string(), "--cache-dir"])
            .arg(cache);
        if !background {
            command.arg("--no-background");
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sluice mount");
        let mut mount = LayerMount {
            child,
            mountpoint: mountpoint.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !is_mountpoint(mountpoint) {
            assert!(
                mount.child.try_wait().unwrap().is_none(),
                "sluice mount of {reference} layer {layer} exited"
            );
            assert!(Instant::now() < deadline, "no mount after 60 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        mount
    }
}

impl Drop for LayerMount {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        if is_mountpoint(&self.mountpoint) {
            let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Whether something is mounted exactly at `path`.
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(path) = path.canonicalize() else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(path.to_str().unwrap_or_default()))
}

//! Configuration (TOML, like containerd's): what the daemon and the CLI share.

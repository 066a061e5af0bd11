//! containerd snapshotter.

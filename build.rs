//! Generates the containerd snapshots gRPC API and sluice's own API (client and
//! server) from proto/.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .include_file("containerd_api.rs")
        .compile_protos(
            &[
                "proto/containerd/types/mount.proto",
                "proto/containerd/services/snapshots/v1/snapshots.proto",
                "proto/sluice/v1/profiler.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}

//! Process-wide counters, exported in Prometheus text format. Plain atomics: the read
//! path only ever does relaxed increments.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared by the registry client, cache and filesystem.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Range requests sent for reads a process was blocked on.
    pub on_demand_requests: AtomicU64,
    pub on_demand_bytes: AtomicU64,
    /// Range requests sent by prefetch and background streaming.
    pub background_requests: AtomicU64,
    pub background_bytes: AtomicU64,
    /// Chunk reads answered from memory / disk / the registry.
    pub chunk_hits_memory: AtomicU64,
    pub chunk_hits_disk: AtomicU64,
    pub chunk_fetches: AtomicU64,
    /// Chunks whose bytes did not match their digest.
    pub chunk_verify_failures: AtomicU64,
    /// FUSE reads that failed with EIO.
    pub read_errors: AtomicU64,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Prometheus text exposition of every counter.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, help, value) in [
            (
                "sluice_on_demand_requests_total",
                "Registry range requests for blocked reads",
                &self.on_demand_requests,
            ),
            (
                "sluice_on_demand_bytes_total",
                "Bytes fetched for blocked reads",
                &self.on_demand_bytes,
            ),
            (
                "sluice_background_requests_total",
                "Registry range requests by prefetch and background streaming",
                &self.background_requests,
            ),
            (
                "sluice_background_bytes_total",
                "Bytes fetched by prefetch and background streaming",
                &self.background_bytes,
            ),
            (
                "sluice_chunk_hits_memory_total",
                "Chunk reads served from memory",
                &self.chunk_hits_memory,
            ),
            (
                "sluice_chunk_hits_disk_total",
                "Chunk reads served from the disk cache",
                &self.chunk_hits_disk,
            ),
            (
                "sluice_chunk_fetches_total",
                "Chunks fetched from the registry",
                &self.chunk_fetches,
            ),
            (
                "sluice_chunk_verify_failures_total",
                "Chunks rejected for a digest mismatch",
                &self.chunk_verify_failures,
            ),
            (
                "sluice_read_errors_total",
                "Reads answered with EIO",
                &self.read_errors,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        out
    }
}

/// Content type of the Prometheus text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serve `GET /metrics` (Prometheus text) on `listener` until `shutdown` completes.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    metrics: std::sync::Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = std::sync::Arc::clone(&metrics);
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, PROMETHEUS_TEXT)],
                    metrics.render(),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn metrics_are_served_over_http() {
        let metrics = std::sync::Arc::new(Metrics::default());
        Metrics::add(&metrics.on_demand_requests, 3);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_http(listener, metrics, async {
            let _ = stopped.await;
        }));
        let response = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain; version=0.0.4")
        );
        let body = response.text().await.unwrap();
        assert!(
            body.contains("\nsluice_on_demand_requests_total 3\n"),
            "{body}"
        );
        let missing = reqwest::get(format!("http://{addr}/other")).await.unwrap();
        assert_eq!(missing.status(), 404);
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}

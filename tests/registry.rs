//! Integration tests of the registry client against the real Debian `docker-registry`
//! (started per test on a free loopback port with a private storage directory) and
//! against small loopback servers that misbehave on purpose.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use futures::future::BoxFuture;
use sluice::digest::Digest;
use sluice::metrics::Metrics;
use sluice::registry::auth::Credentials;
use sluice::registry::manifest::{DOCKER_CONFIG, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST};
use sluice::registry::{
    BlobSource, Descriptor, FetchPriority, ImageReference, Platform, RegistryClient, RegistryError,
    RegistryOptions, Repository,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

mod common;

use common::free_port;
use common::registry::{RegistryOptions as TestRegistryOptions, TestRegistry};

// ---- harness: the real registry is common::registry::TestRegistry --------------------

/// A registry that wants basic auth as `user` / `pass`.
fn registry_options_with_user() -> TestRegistryOptions {
    TestRegistryOptions {
        htpasswd: Some(("user".into(), "pass".into())),
        ..TestRegistryOptions::default()
    }
}

/// For the test's own setup requests (pushing, probing), which trust any certificate.
fn test_http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap()
}

/// Pushes with the plain distribution API (monolithic uploads).
struct Pusher {
    http: reqwest::Client,
    base: String,
    auth: Option<(String, String)>,
}

impl Pusher {
    fn new(base: String, auth: Option<(&str, &str)>) -> Self {
        Self {
            http: test_http_client(),
            base,
            auth: auth.map(|(u, p)| (u.to_owned(), p.to_owned())),
        }
    }

    fn req(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, url);
        match &self.auth {
            Some((u, p)) => req.basic_auth(u, Some(p)),
            None => req,
        }
    }

    async fn blob(&self, repo: &str, data: &[u8]) -> Digest {
        let digest = Digest::sha256_of(data);
        let resp = self
            .req(
                reqwest::Method::POST,
                &format!("{}/v2/{repo}/blobs/uploads/", self.base),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202, "starting upload");
        let location = resp.headers()["location"].to_str().unwrap().to_owned();
        let url = reqwest::Url::parse(&self.base)
            .unwrap()
            .join(&location)
            .unwrap();
        let sep = if url.query().is_some() { '&' } else { '?' };
        let resp = self
            .req(reqwest::Method::PUT, &format!("{url}{sep}digest={digest}"))
            .header("content-type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201, "finishing upload");
        digest
    }

    async fn manifest(&self, repo: &str, reference: &str, media_type: &str, data: &[u8]) {
        let resp = self
            .req(
                reqwest::Method::PUT,
                &format!("{}/v2/{repo}/manifests/{reference}", self.base),
            )
            .header("content-type", media_type)
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    }
}

/// Deterministic bytes that do not compress away.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u8
        })
        .collect()
}

struct PushedImage {
    manifest_digest: Digest,
    config: Vec<u8>,
    layers: Vec<Vec<u8>>,
}

fn descriptor(media_type: &str, data: &[u8]) -> Descriptor {
    Descriptor {
        media_type: media_type.into(),
        digest: Digest::sha256_of(data),
        size: data.len() as u64,
        annotations: BTreeMap::new(),
        platform: None,
    }
}

async fn push_image(
    pusher: &Pusher,
    repo: &str,
    tag: Option<&str>,
    arch: &str,
    seed: u64,
) -> PushedImage {
    let layers = vec![pseudo_random(300_000, seed), pseudo_random(1_000, seed + 1)];
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| Digest::sha256_of(l).to_string()).collect::<Vec<_>>(),
        },
    }))
    .unwrap();
    for layer in &layers {
        pusher.blob(repo, layer).await;
    }
    pusher.blob(repo, &config).await;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, &config),
        "layers": layers
            .iter()
            .map(|l| descriptor("application/vnd.oci.image.layer.v1.tar+gzip", l))
            .collect::<Vec<_>>(),
    }))
    .unwrap();
    let manifest_digest = Digest::sha256_of(&manifest);
    let reference = tag
        .map(str::to_owned)
        .unwrap_or(manifest_digest.to_string());
    pusher
        .manifest(repo, &reference, OCI_MANIFEST, &manifest)
        .await;
    PushedImage {
        manifest_digest,
        config,
        layers,
    }
}

fn options() -> RegistryOptions {
    RegistryOptions {
        request_timeout: Duration::from_secs(10),
        on_demand_retries: 3,
        background_retries: 1,
        // Never pick up credentials of the machine running the tests.
        docker_config: Some(empty_docker_config()),
        ..RegistryOptions::default()
    }
}

fn empty_docker_config() -> PathBuf {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap());
    let path = dir.path().join("empty-config.json");
    if !path.exists() {
        std::fs::write(&path, "{}").unwrap();
    }
    path
}

fn docker_config_with(dir: &Path, host: &str, user: &str, pass: &str) -> PathBuf {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    let path = dir.join("config.json");
    std::fs::write(
        &path,
        serde_json::to_vec(&serde_json::json!({"auths": {host: {"auth": auth}}})).unwrap(),
    )
    .unwrap();
    path
}

fn new_client(options: RegistryOptions) -> (Arc<RegistryClient>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    (
        RegistryClient::new(options, Arc::clone(&metrics)).unwrap(),
        metrics,
    )
}

// ---- harness: small HTTP servers -------------------------------------------------------

#[derive(Debug, Clone)]
struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn new(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }
}

type Handler = Arc<dyn Fn(Request) -> BoxFuture<'static, Response> + Send + Sync>;

/// A loopback HTTP/1.1 server answering one request per connection; the accept loop is
/// aborted on drop.
struct TestServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    async fn start(handler: Handler) -> Self {
        Self::start_on("127.0.0.1:0", handler).await
    }

    async fn start_on(bind: &str, handler: Handler) -> Self {
        let listener = TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let handler = Arc::clone(&handler);
                tokio::spawn(async move {
                    let Some(request) = read_request(&mut stream).await else {
                        return;
                    };
                    let response = handler(request).await;
                    let mut head = format!("HTTP/1.1 {} X\r\n", response.status);
                    for (k, v) in &response.headers {
                        head.push_str(&format!("{k}: {v}\r\n"));
                    }
                    head.push_str(&format!(
                        "content-length: {}\r\nconnection: close\r\n\r\n",
                        response.body.len()
                    ));
                    let _ = stream.write_all(head.as_bytes()).await;
                    let _ = stream.write_all(&response.body).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Self { addr, task }
    }

    fn host(&self) -> String {
        self.addr.to_string()
    }
}

async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<Request> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let header_end = loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_owned();
    let path = first.next()?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[header_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(Request {
        method,
        path,
        headers,
        body,
    })
}

/// Answers a `Range: bytes=a-b` request on `data` like a registry would.
fn serve_range(data: &[u8], request: &Request) -> Response {
    let Some(range) = request
        .header("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
    else {
        return Response::new(200).body(data.to_vec());
    };
    let (first, last) = range;
    Response::new(206)
        .header(
            "content-range",
            format!("bytes {first}-{last}/{}", data.len()),
        )
        .body(data[first..=last].to_vec())
}

fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response> + Send + 'static,
{
    Arc::new(move |r| Box::pin(f(r)))
}

// ---- tests against the real registry -------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_fetch_and_read_ranges() {
    let registry = TestRegistry::start(TestRegistryOptions::default());
    let pusher = Pusher::new(registry.url(), None);
    let image = push_image(&pusher, "test/img", Some("v1"), "amd64", 1).await;
    let (client, metrics) = new_client(options());

    let reference: ImageReference = format!("{}/test/img:v1", registry.host()).parse().unwrap();
    let resolved = client
        .resolve(&reference, &Platform::default())
        .await
        .unwrap();
    assert_eq!(resolved.manifest_digest, image.manifest_digest);
    assert_eq!(resolved.manifest_media_type, OCI_MANIFEST);
    assert_eq!(resolved.index_digest, None);
    assert_eq!(resolved.config_bytes.as_ref(), image.config.as_slice());
    assert_eq!(resolved.config.rootfs.diff_ids.len(), 2);
    assert_eq!(resolved.layers.len(), 2);
    assert_eq!(resolved.layers[0].size, image.layers[0].len() as u64);
    assert_eq!(
        Digest::sha256_of(&resolved.manifest_bytes),
        image.manifest_digest
    );

    // By digest.
    let by_digest: ImageReference =
        format!("{}/test/img@{}", registry.host(), image.manifest_digest)
            .parse()
            .unwrap();
    let again = client
        .resolve(&by_digest, &Platform::default())
        .await
        .unwrap();
    assert_eq!(again.manifest_digest, image.manifest_digest);
    assert_eq!(again.layers, resolved.layers);

    // Whole blobs, verified.
    let repo = reference.repository();
    let whole = client
        .fetch_blob(repo, &resolved.layers[1].digest)
        .await
        .unwrap();
    assert_eq!(whole.as_ref(), image.layers[1].as_slice());

    // Ranges.
    let layer = &image.layers[0];
    let blob = client.remote_blob(
        repo.clone(),
        resolved.layers[0].digest.clone(),
        layer.len() as u64,
    );
    assert_eq!(blob.size(), layer.len() as u64);
    let before = metrics.on_demand_requests.load(Ordering::Relaxed);
    let len = layer.len() as u64;
    for range in [0..1, 0..4096, 1000..250_000, len - 1..len, 0..len, 77..77] {
        let bytes = blob
            .read_range(range.clone(), FetchPriority::OnDemand)
            .await
            .unwrap();
        assert_eq!(
            bytes.as_ref(),
            &layer[range.start as usize..range.end as usize],
            "{range:?}"
        );
    }
    assert_eq!(
        metrics.on_demand_requests.load(Ordering::Relaxed) - before,
        5
    );
    assert!(metrics.on_demand_bytes.load(Ordering::Relaxed) >= 1 + 4096 + 249_000 + 1 + len);
    let bg = blob
        .read_range(10..20, FetchPriority::Background)
        .await
        .unwrap();
    assert_eq!(bg.as_ref(), &layer[10..20]);
    assert!(metrics.background_bytes.load(Ordering::Relaxed) >= 10);

    let err = blob
        .read_range(len - 1..len + 1, FetchPriority::OnDemand)
        .await
        .unwrap_err();
    assert!(!err.transient);
    assert!(err.reason.contains("outside blob"), "{err}");

    // Unknown tag / digest: a 404 naming host, repository and reference.
    let missing: ImageReference = format!("{}/test/img:nope", registry.host())
        .parse()
        .unwrap();
    let err = client
        .resolve(&missing, &Platform::default())
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::NotFound { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&registry.host()) && text.contains("test/img") && text.contains("nope"),
        "{text}"
    );

    let bogus = Digest::sha256_of(b"not there");
    let err = client.fetch_blob(repo, &bogus).await.unwrap_err();
    assert!(matches!(err, RegistryError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains(bogus.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_with_two_platforms() {
    let registry = TestRegistry::start(TestRegistryOptions::default());
    let pusher = Pusher::new(registry.url(), None);
    let amd64 = push_image(&pusher, "multi/img", None, "amd64", 10).await;
    let arm64 = push_image(&pusher, "multi/img", None, "arm64", 20).await;
    let entry = |digest: &Digest, arch: &str, variant: Option<&str>| {
        let mut platform = serde_json::json!({"os": "linux", "architecture": arch});
        if let Some(v) = variant {
            platform["variant"] = v.into();
        }
        serde_json::json!({"mediaType": OCI_MANIFEST, "digest": digest, "size": 0, "platform": platform})
    };
    // Sizes must be right for the registry to accept the index.
    let manifest_size = |digest: &Digest| {
        let digest = digest.clone();
        let base = registry.url();
        async move {
            reqwest::Client::new()
                .get(format!("{base}/v2/multi/img/manifests/{digest}"))
                .header("accept", OCI_MANIFEST)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
                .len()
        }
    };
    let mut manifests = vec![
        entry(&amd64.manifest_digest, "amd64", None),
        entry(&arm64.manifest_digest, "arm64", Some("v8")),
    ];
    manifests[0]["size"] = manifest_size(&amd64.manifest_digest).await.into();
    manifests[1]["size"] = manifest_size(&arm64.manifest_digest).await.into();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests
    }))
    .unwrap();
    pusher
        .manifest("multi/img", "latest", OCI_INDEX, &index)
        .await;

    let (client, _) = new_client(options());
    let reference: ImageReference = format!("{}/multi/img", registry.host()).parse().unwrap();
    let default = client
        .resolve(&reference, &Platform::default())
        .await
        .unwrap();
    assert_eq!(default.manifest_digest, amd64.manifest_digest);
    assert_eq!(default.index_digest, Some(Digest::sha256_of(&index)));
    assert_eq!(default.config.architecture, "amd64");
    assert_eq!(default.config_bytes.as_ref(), amd64.config.as_slice());

    let arm: Platform = "linux/arm64".parse().unwrap();
    let resolved = client.resolve(&reference, &arm).await.unwrap();
    assert_eq!(resolved.manifest_digest, arm64.manifest_digest);
    assert_eq!(resolved.config.architecture, "arm64");
    let blob = client.remote_blob(
        reference.repository().clone(),
        resolved.layers[0].digest.clone(),
        resolved.layers[0].size,
    );
    let head = blob
        .read_range(0..100, FetchPriority::OnDemand)
        .await
        .unwrap();
    assert_eq!(head.as_ref(), &arm64.layers[0][..100]);

    let s390x: Platform = "linux/s390x".parse().unwrap();
    let err = client.resolve(&reference, &s390x).await.unwrap_err();
    assert!(
        matches!(err, RegistryError::PlatformNotFound { .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("linux/amd64")
            && text.contains("linux/arm64/v8")
            && text.contains(&registry.host()),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_with_docker_config() {
    let registry = TestRegistry::start(registry_options_with_user());
    let pusher = Pusher::new(registry.url(), Some(("user", "pass")));
    let image = push_image(&pusher, "test/img", Some("v1"), "amd64", 3).await;
    let reference: ImageReference = format!("{}/test/img:v1", registry.host()).parse().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let good = docker_config_with(dir.path(), &registry.host(), "user", "pass");
    let (client, _) = new_client(RegistryOptions {
        docker_config: Some(good),
        ..options()
    });
    let resolved = client
        .resolve(&reference, &Platform::default())
        .await
        .unwrap();
    assert_eq!(resolved.manifest_digest, image.manifest_digest);
    let blob = client.remote_blob(
        reference.repository().clone(),
        resolved.layers[0].digest.clone(),
        resolved.layers[0].size,
    );
    let bytes = blob
        .read_range(5..500, FetchPriority::OnDemand)
        .await
        .unwrap();
    assert_eq!(bytes.as_ref(), &image.layers[0][5..500]);

    // Wrong password: an error naming the registry, the repository and the config file.
    let bad_dir = tempfile::tempdir().unwrap();
    let bad = docker_config_with(bad_dir.path(), &registry.host(), "user", "wrong-secret");
    let (bad_client, _) = new_client(RegistryOptions {
        docker_config: Some(bad.clone()),
        ..options()
    });
    let err = bad_client
        .resolve(&reference, &Platform::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::Unauthorized { status: 401, .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains(&format!("401 from {}", registry.host())),
        "{text}"
    );
    assert!(text.contains("test/img"), "{text}");
    assert!(text.contains(&bad.display().to_string()), "{text}");
    assert!(!text.contains("wrong-secret") && !format!("{err:?}").contains("wrong-secret"));

    // Credentials given in the options win over the docker config.
    let mut configured = std::collections::HashMap::new();
    configured.insert(registry.host(), Credentials::basic("user", "pass"));
    let (with_options, _) = new_client(RegistryOptions {
        docker_config: Some(bad.clone()),
        credentials: configured,
        ..options()
    });
    let resolved = with_options
        .resolve(&reference, &Platform::default())
        .await
        .unwrap();
    assert_eq!(resolved.manifest_digest, image.manifest_digest);
    let mut wrong = std::collections::HashMap::new();
    wrong.insert(registry.host(), Credentials::basic("user", "nope"));
    let (wrong_options, _) = new_client(RegistryOptions {
        credentials: wrong,
        ..options()
    });
    let err = wrong_options
        .resolve(&reference, &Platform::default())
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err}");
    assert!(err.to_string().contains("registry settings"), "{err}");

    // Credentials from a credential helper named in credHelpers.
    let helper_dir = tempfile::tempdir().unwrap();
    let helper = helper_dir.path().join("docker-credential-sluicetest");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\nread server\n\
             if [ \"$1\" = get ] && [ \"$server\" = \"{}\" ]; then\n\
             printf '{{\"ServerURL\":\"%s\",\"Username\":\"user\",\"Secret\":\"pass\"}}' \"$server\"\n\
             else echo 'credentials not found in native keychain'; exit 1; fi\n",
            registry.host()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let helper_config = helper_dir.path().join("config.json");
    std::fs::write(
        &helper_config,
        serde_json::to_vec(&serde_json::json!({"credHelpers": {registry.host(): "sluicetest"}}))
            .unwrap(),
    )
    .unwrap();
    let (helped, _) = new_client(RegistryOptions {
        docker_config: Some(helper_config.clone()),
        credential_helper_dir: Some(helper_dir.path().to_owned()),
        ..options()
    });
    let resolved = helped
        .resolve(&reference, &Platform::default())
        .await
        .unwrap();
    assert_eq!(resolved.manifest_digest, image.manifest_digest);

    // A helper that knows nothing about this registry (credsStore for every host).
    let store_config = helper_dir.path().join("store.json");
    std::fs::write(&store_config, r#"{"credsStore": "sluicetest"}"#).unwrap();
    let other = TestRegistry::start(registry_options_with_user());
    let (stored, _) = new_client(RegistryOptions {
        docker_config: Some(store_config),
        credential_helper_dir: Some(helper_dir.path().to_owned()),
        ..options()
    });
    let other_ref: ImageReference = format!("{}/test/img:v1", other.host()).parse().unwrap();
    let err = stored
        .resolve(&other_ref, &Platform::default())
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err}");
    assert!(
        err.to_string().contains("docker-credential-sluicetest"),
        "{err}"
    );

    // No credentials at all.
    let (anonymous, _) = new_client(options());
    let err = anonymous
        .resolve(&reference, &Platform::default())
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err}");
    assert!(err.to_string().contains("no credentials for"), "{err}");
}

/// A token server and a gate that demands its tokens, in front of the real registry.
struct TokenSetup {
    _registry: TestRegistry,
    gate: TestServer,
    _token_server: TestServer,
    token_requests: Arc<Mutex<Vec<Request>>>,
    /// Tokens numbered below this are refused by the gate (revoked).
    oldest_valid: Arc<AtomicU64>,
    image: PushedImage,
}

async fn token_setup(require_credentials: bool) -> TokenSetup {
    let registry = TestRegistry::start(TestRegistryOptions::default());
    let image = push_image(
        &Pusher::new(registry.url(), None),
        "test/img",
        Some("v1"),
        "amd64",
        4,
    )
    .await;

    let token_requests = Arc::new(Mutex::new(Vec::new()));
    let issued = Arc::new(AtomicU64::new(0));
    let token_server = {
        let token_requests = Arc::clone(&token_requests);
        let issued = Arc::clone(&issued);
        TestServer::start(Arc::new(
            move |req: Request| -> BoxFuture<'static, Response> {
                token_requests.lock().unwrap().push(req.clone());
                let expected = format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode("alice:s3cret")
                );
                let n = issued.fetch_add(1, Ordering::SeqCst);
                // OAuth2 refresh-token grant (identity tokens) by POST, else the plain GET.
                if req.method == "POST" {
                    let form = String::from_utf8_lossy(&req.body).into_owned();
                    let fields: Vec<&str> = form.split('&').collect();
                    let valid = fields.contains(&"grant_type=refresh_token")
                        && fields.contains(&"refresh_token=refresh-xyz")
                        && fields.contains(&"scope=repository%3Atest%2Fimg%3Apull");
                    return Box::pin(async move {
                        if !valid {
                            return Response::new(401);
                        }
                        Response::new(200)
                            .header("content-type", "application/json")
                            .body(format!(r#"{{"access_token":"tok-{n}","expires_in":300}}"#))
                    });
                }
                let authorised = match req.header("authorization") {
                    Some(auth) => auth == expected,
                    None => !require_credentials,
                };
                Box::pin(async move {
                    if !authorised {
                        return Response::new(401);
                    }
                    Response::new(200)
                        .header("content-type", "application/json")
                        .body(format!(r#"{{"token":"tok-{n}","expires_in":300}}"#))
                })
            },
        ))
        .await
    };
    let realm = format!("http://{}/token", token_server.host());
    let upstream = registry.url();
    let oldest_valid = Arc::new(AtomicU64::new(0));
    let gate_oldest_valid = Arc::clone(&oldest_valid);
    let gate = TestServer::start(handler(move |req: Request| {
        let oldest_valid = Arc::clone(&gate_oldest_valid);
        let realm = realm.clone();
        let upstream = upstream.clone();
        async move {
            let oldest = oldest_valid.load(Ordering::SeqCst);
            let authorised = req
                .header("authorization")
                .and_then(|a| a.strip_prefix("Bearer tok-"))
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| n >= oldest);
            if !authorised {
                return Response::new(401).header(
                    "www-authenticate",
                    format!(
                        r#"Bearer realm="{realm}",service="gate.test",scope="repository:test/img:pull""#
                    ),
                );
            }
            let mut forward = reqwest::Client::new().get(format!("{upstream}{}", req.path));
            for name in ["accept", "range"] {
                if let Some(v) = req.header(name) {
                    forward = forward.header(name, v);
                }
            }
            let resp = forward.send().await.unwrap();
            let mut out = Response::new(resp.status().as_u16());
            for name in ["content-type", "content-range", "docker-content-digest"] {
                if let Some(v) = resp.headers().get(name) {
                    out = out.header(name, v.to_str().unwrap());
                }
            }
            out.body(resp.bytes().await.unwrap().to_vec())
        }
    }))
    .await;
    TokenSetup {
        _registry: registry,
        gate,
        _token_server: token_server,
        token_requests,
        oldest_valid,
        image,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_flow_with_credentials() {
    let setup = token_setup(true).await;
    let dir = tempfile::tempdir().unwrap();
    let config = docker_config_with(dir.path(), &setup.gate.host(), "alice", "s3cret");
    let (client, _) = new_client(RegistryOptions {
        docker_config: Some(config),
        ..options()
    });
    let reference: ImageReference = format!("{}/test/img:v1", setup.gate.host())
        .parse()
        .unwrap();
    let resolved = client
        .resolve(&reference, &Platform::default())
        .await
        .unwrap();
    assert_eq!(resolved.manifest_digest, setup.image.manifest_digest);
    let blob = client.remote_blob(
        reference.repository().clone(),
        resolved.layers[0].digest.clone(),
        resolved.layers[0].size,
    );
    for start in [0u64, 1000, 9000] {
        let bytes = blob
            .read_range(start..start + 100, FetchPriority::OnDemand)
            .await
            .unwrap();
        assert_eq!(
            bytes.as_ref(),
            &setup.image.layers[0][start as usize..start as usize + 100]
        );
    }
    // One token for the repository scope, reused for manifest, config and every range.
    let requests = setup.token_requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert!(
        requests[0].path.contains("service=gate.test"),
        "{}",
        requests[0].path
    );
    assert!(
        requests[0]
            .path
            .contains("scope=repository%3Atest%2Fimg%3Apull"),
        "{}",
        requests[0].path
    );

    // The gate revokes the token: one new token is fetched and the read succeeds.
    setup.oldest_valid.store(1, Ordering::SeqCst);
    let bytes = blob
        .read_range(0..100, FetchPriority::OnDemand)
        .await
        .unwrap();
    assert_eq!(bytes.as_ref(), &setup.image.layers[0][..100]);
    assert_eq!(setup.token_requests.lock().unwrap().len(), 2);

    // Wrong credentials: the token server refuses, and the error says where to look.
    let bad_dir = tempfile::tempdir().unwrap();
    let bad = docker_config_with(bad_dir.path(), &setup.gate.host(), "alice", "nope");
    let (bad_client, _) = new_client(RegistryOptions {
        docker_config: Some(bad),
        ..options()
    });
    let err = bad_client
        .resolve(&reference, &Platform::default())
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err}");
    assert!(err.to_string().contains(&setup.gate.host()), "{err}");
    assert!(err.to_string().contains("test/img"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_flow_anonymous() {
    let setup = token_setup(false).await;
    let (client, _) = new_client(options());
    let reference: ImageReference = format!("{}/test/img:v1", setup.gate.host())
        .parse()
        .unwrap();
    let resolved = client
        .resolve(&reference, &Platform::default())
        .await
        .unwrap();
    assert_eq!(resolved.manifest_digest, setup.image.manifest_digest);
    let requests = setup.token_requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].header("authorization"), None);

    // Readers refused together share one token fetch.
    let (fresh, _) = new_client(options());
    let blob = fresh.remote_blob(
        reference.repository().clone(),
        resolved.layers[0].digest.clone(),
        resolved.layers[0].size,
    );
    let reads =
        (0..8u64).map(|i| blob.read_range(i * 1000..i * 1000 + 10, FetchPriority::Prefetch));
    for (i, result) in futures::future::join_all(reads)
        .await
        .into_iter()
        .enumerate()
    {
        let start = i * 1000;
        assert_eq!(
            result.unwrap().as_ref(),
            &setup.image.layers[0][start..start + 10]
        );
    }
    assert_eq!(setup.token_requests.lock().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_from_hosts_dir() {
    let registry = TestRegistry::start(TestRegistryOptions::default());
    let image = push_image(
        &Pusher::new(registry.url(), None),
        "test/img",
        Some("v1"),
        "amd64",
        5,
    )
    .await;
    let dead = format!("127.0.0.1:{}", free_port());
    let hosts = tempfile::tempdir().unwrap();

    // The reference names a registry that is down; its hosts.toml sends us to a mirror.
    std::fs::create_dir_all(hosts.path().join(&dead)).unwrap();
    std::fs::write(
        hosts.path().join(&dead).join("hosts.toml"),
        format!(
            "server = \"http://{dead}\"\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            registry.host()
        ),
    )
    .unwrap();
    // The real registry lists a dead mirror first: we fall back to it.
    std::fs::create_dir_all(hosts.path().join(registry.host())).unwrap();
    std::fs::write(
        hosts.path().join(registry.host()).join("hosts.toml"),
        format!("[host.\"http://{dead}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"),
    )
    .unwrap();
    let (client, _) = new_client(RegistryOptions {
        hosts_dir: Some(hosts.path().to_owned()),
        ..options()
    });
    for host in [dead.clone(), registry.host()] {
        let reference: ImageReference = format!("{host}/test/img:v1").parse().unwrap();
        let resolved = client
            .resolve(&reference, &Platform::default())
            .await
            .unwrap();
        assert_eq!(resolved.manifest_digest, image.manifest_digest, "{host}");
        let blob = client.remote_blob(
            reference.repository().clone(),
            resolved.layers[1].digest.clone(),
            resolved.layers[1].size,
        );
        let bytes = blob
            .read_range(0..1000, FetchPriority::OnDemand)
            .await
            .unwrap();
        assert_eq!(bytes.as_ref(), image.layers[1].as_slice());
    }

    // Without hosts.toml the dead registry gives a transport error naming it.
    let (plain, _) = new_client(RegistryOptions {
        on_demand_retries: 0,
        ..options()
    });
    let reference: ImageReference = format!("{dead}/test/img:v1").parse().unwrap();
    let err = plain
        .resolve(&reference, &Platform::default())
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Transport { .. }), "{err}");
    assert!(err.to_string().contains(&dead), "{err}");
}

// ---- failure modes with small loopback servers --------------------------------------

fn blob_fixture() -> (Vec<u8>, Digest, Repository) {
    let data = pseudo_random(50_000, 99);
    let digest = Digest::sha256_of(&data);
    (
        data,
        digest,
        Repository::new("127.0.0.1:1", "test/img").unwrap(),
    )
}

fn repo_on(server: &TestServer) -> Repository {
    Repository::new(&server.host(), "test/img").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_on_5xx_and_429() {
    let (data, digest, _) = blob_fixture();
    let data = Arc::new(data);
    let hits = Arc::new(AtomicU64::new(0));
    let server = {
        let data = Arc::clone(&data);
        let hits = Arc::clone(&hits);
        TestServer::start(handler(move |req: Request| {
            let n = hits.fetch_add(1, Ordering::SeqCst);
            let data = Arc::clone(&data);
            async move {
                match n {
                    0 => Response::new(503),
                    1 => Response::new(429).header("retry-after", "0"),
                    2 => Response::new(500),
                    _ => serve_range(&data, &req),
                }
            }
        }))
        .await
    };
    let (client, metrics) = new_client(options());
    let blob = client.remote_blob(repo_on(&server), digest, data.len() as u64);
    let bytes = blob
        .read_range(100..200, FetchPriority::OnDemand)
        .await
        .unwrap();
    assert_eq!(bytes.as_ref(), &data[100..200]);
    assert_eq!(hits.load(Ordering::SeqCst), 4);
    assert_eq!(metrics.on_demand_requests.load(Ordering::Relaxed), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_reads_have_a_smaller_retry_budget() {
    let (data, digest, _) = blob_fixture();
    let hits = Arc::new(AtomicU64::new(0));
    let server = {
        let hits = Arc::clone(&hits);
        TestServer::start(handler(move |_req: Request| {
            hits.fetch_add(1, Ordering::SeqCst);
            async { Response::new(503).header("retry-after", "0") }
        }))
        .await
    };
    let (client, metrics) = new_client(RegistryOptions {
        on_demand_retries: 3,
        background_retries: 1,
        ..options()
    });
    let blob = client.remote_blob(repo_on(&server), digest, data.len() as u64);

    let err = blob
        .read_range(0..10, FetchPriority::OnDemand)
        .await
        .unwrap_err();
    assert_eq!(hits.swap(0, Ordering::SeqCst), 4);
    assert!(err.transient);
    assert_eq!(err.registry, server.host());
    assert!(err.reason.contains("503"), "{err}");

    let err = blob
        .read_range(0..10, FetchPriority::Background)
        .await
        .unwrap_err();
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    assert!(err.transient);
    assert_eq!(metrics.background_requests.load(Ordering::Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_registry_times_out() {
    // Accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let held = Arc::new(Mutex::new(Vec::new()));
    let accept = {
        let held = Arc::clone(&held);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                held.lock().unwrap().push(stream);
            }
        })
    };
    struct Abort(tokio::task::JoinHandle<()>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _accept = Abort(accept);

    let stall = TestServer::start(handler(|_req: Request| async {
        Response::new(206).header("content-range", "bytes 0-9/100")
    }))
    .await;

    let (client, _) = new_client(RegistryOptions {
        request_timeout: Duration::from_millis(300),
        on_demand_retries: 1,
        ..options()
    });
    let reference: ImageReference = format!("{host}/test/img:v1").parse().unwrap();
    let err = client
        .resolve(&reference, &Platform::default())
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains(&host), "{err}");

    let (_, digest, _) = blob_fixture();
    let blob = client.remote_blob(
        Repository::new(&host, "test/img").unwrap(),
        digest.clone(),
        100,
    );
    let err = blob
        .read_range(0..10, FetchPriority::OnDemand)
        .await
        .unwrap_err();
    assert!(err.transient, "{err}");
    assert!(err.reason.contains("no response"), "{err}");

    // A 206 that declares a body shorter than the range it claims: a broken server,
    // reported as such rather than retried.
    let blob = client.remote_blob(repo_on(&stall), digest, 100);
    let err = blob
        .read_range(0..10, FetchPriority::OnDemand)
        .await
        .unwrap_err();
    assert!(!err.transient, "{err}");
    assert!(err.reason.contains("206 with a body of 0 bytes"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_stall_times_out() {
    // Sends headers promising 10 bytes, then nothing.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = read_request(&mut stream).await;
            let _ = stream
                .write_all(
                    b"HTTP/1.1 206 X\r\ncontent-range: bytes 0-9/100\r\ncontent-length: 10\r\n\r\n",
                )
                .await;
            held.push(stream);
        }
    });
    let (client, _) = new_client(RegistryOptions {
        request_timeout: Duration::from_millis(300),
        on_demand_retries: 0,
        ..options()
    });
    let (_, digest, _) = blob_fixture();
    let repo = Repository::new(&host, "test/img").unwrap();
    let err = client
        .read_range(&repo, &digest, 100, 0..10, FetchPriority::OnDemand)
        .await
        .unwrap_err();
    task.abort();
    assert!(matches!(err, RegistryError::Timeout { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_followed_cached_and_re_resolved() {
    let (data, digest, _) = blob_fixture();
    let data = Arc::new(data);
    // Storage accepts only URLs of the current generation: older ones have "expired".
    let valid_generation = Arc::new(AtomicU64::new(1));
    let storage_hits = Arc::new(Mutex::new(Vec::<Request>::new()));
    let storage = {
        let data = Arc::clone(&data);
        let valid = Arc::clone(&valid_generation);
        let hits = Arc::clone(&storage_hits);
        TestServer::start(handler(move |req: Request| {
            hits.lock().unwrap().push(req.clone());
            let data = Arc::clone(&data);
            let current = valid.load(Ordering::SeqCst);
            async move {
                let generation: u64 = req
                    .path
                    .split('/')
                    .nth(2)
                    .and_then(|g| g.parse().ok())
                    .unwrap_or(0);
                if generation != current || !req.path.contains("sig=secret") {
                    return Response::new(403);
                }
                serve_range(&data, &req)
            }
        }))
        .await
    };
    let redirects = Arc::new(AtomicU64::new(0));
    let storage_host = storage.host();
    let registry = {
        let redirects = Arc::clone(&redirects);
        let digest = digest.clone();
        TestServer::start(handler(move |req: Request| {
            let expected = format!("/v2/test/img/blobs/{digest}");
            let generation = redirects.fetch_add(1, Ordering::SeqCst) + 1;
            let location = format!(
                "http://{storage_host}/storage/{generation}/{}?sig=secret",
                digest.hex()
            );
            async move {
                if req.path != expected {
                    return Response::new(404);
                }
                Response::new(307).header("location", location)
            }
        }))
        .await
    };

    let (client, _) = new_client(options());
    let blob = client.remote_blob(repo_on(&registry), digest.clone(), data.len() as u64);
    let read = |range: std::ops::Range<u64>| blob.read_range(range, FetchPriority::OnDemand);

    assert_eq!(read(0..10).await.unwrap().as_ref(), &data[0..10]);
    assert_eq!(redirects.load(Ordering::SeqCst), 1);
    assert_eq!(
        read(40_000..50_000).await.unwrap().as_ref(),
        &data[40_000..50_000]
    );
    assert_eq!(
        redirects.load(Ordering::SeqCst),
        1,
        "the storage URL is cached"
    );
    assert_eq!(storage_hits.lock().unwrap().len(), 2);

    // The cached URL expires: the client asks the registry again.
    valid_generation.store(2, Ordering::SeqCst);
    assert_eq!(read(123..456).await.unwrap().as_ref(), &data[123..456]);
    assert_eq!(redirects.load(Ordering::SeqCst), 2);
    let hits = storage_hits.lock().unwrap().clone();
    assert_eq!(hits.len(), 4);
    assert!(hits.iter().all(|r| r.method == "GET"
        && r.header("range").is_some()
        && r.header("authorization").is_none()));

    // Whole-blob fetches go through the same path and are verified.
    let whole = client.fetch_blob(blob.repository(), &digest).await.unwrap();
    assert_eq!(whole.as_ref(), data.as_slice());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_body_and_bad_range_answers() {
    let (data, digest, _) = blob_fixture();
    let data = Arc::new(data);
    // Ignores Range and always sends the whole blob.
    let full = {
        let data = Arc::clone(&data);
        TestServer::start(handler(move |_req: Request| {
            let data = Arc::clone(&data);
            async move { Response::new(200).body(data.to_vec()) }
        }))
        .await
    };
    let (client, _) = new_client(options());
    let blob = client.remote_blob(repo_on(&full), digest.clone(), data.len() as u64);
    let bytes = blob
        .read_range(30_000..30_100, FetchPriority::OnDemand)
        .await
        .unwrap();
    assert_eq!(bytes.as_ref(), &data[30_000..30_100]);

    // Answers every range with the wrong window.
    let wrong = {
        let data = Arc::clone(&data);
        TestServer::start(handler(move |_req: Request| {
            let data = Arc::clone(&data);
            async move {
                Response::new(206)
                    .header("content-range", format!("bytes 0-9/{}", data.len()))
                    .body(data[..10].to_vec())
            }
        }))
        .await
    };
    let blob = client.remote_blob(repo_on(&wrong), digest.clone(), data.len() as u64);
    let err = blob
        .read_range(100..110, FetchPriority::OnDemand)
        .await
        .unwrap_err();
    assert!(!err.transient);
    assert!(
        err.reason.contains("Content-Range") || err.reason.contains("asked for"),
        "{err}"
    );
    assert_eq!(err.registry, wrong.host());

    // A blob whose bytes do not match the digest is rejected.
    let corrupt = TestServer::start(handler(|_req: Request| async {
        Response::new(200).body(b"corrupted".to_vec())
    }))
    .await;
    let (strict, _) = new_client(RegistryOptions {
        on_demand_retries: 0,
        ..options()
    });
    let err = strict
        .fetch_blob(&repo_on(&corrupt), &digest)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(digest.as_str()), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_pinned_by_digest_is_verified() {
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "digest": Digest::sha256_of(b"x"), "size": 1},
        "layers": []
    }))
    .unwrap();
    let server = TestServer::start(handler(move |_req: Request| {
        let manifest = manifest.clone();
        async move {
            Response::new(200)
                .header("content-type", OCI_MANIFEST)
                .body(manifest)
        }
    }))
    .await;
    let (client, _) = new_client(RegistryOptions {
        on_demand_retries: 0,
        ..options()
    });
    let pinned = Digest::sha256_of(b"some other manifest");
    let reference: ImageReference = format!("{}/test/img@{pinned}", server.host())
        .parse()
        .unwrap();
    let err = client
        .resolve(&reference, &Platform::default())
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&server.host()) && text.contains(pinned.as_str()),
        "{text}"
    );
}

fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl must be installed");
    assert!(status.success(), "openssl {args:?}");
}

/// A test CA and a server certificate for 127.0.0.1 signed by it.
fn make_certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=sluice test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_hosts_toml_ca_and_skip_verify() {
    let certs = tempfile::tempdir().unwrap();
    make_certificates(certs.path());
    let registry = TestRegistry::start(TestRegistryOptions {
        tls: Some((
            certs.path().join("server.pem"),
            certs.path().join("server.key"),
        )),
        ..TestRegistryOptions::default()
    });
    let image = push_image(
        &Pusher::new(registry.url(), None),
        "test/img",
        Some("v1"),
        "amd64",
        6,
    )
    .await;
    let reference: ImageReference = format!("{}/test/img:v1", registry.host()).parse().unwrap();

    let hosts_dir_with = |extra: &str| {
        let dir = tempfile::tempdir().unwrap();
        let host_dir = dir.path().join(registry.host());
        std::fs::create_dir_all(&host_dir).unwrap();
        std::fs::copy(certs.path().join("ca.pem"), host_dir.join("ca.pem")).unwrap();
        std::fs::write(
            host_dir.join("hosts.toml"),
            format!("server = \"https://{}\"\n{extra}", registry.host()),
        )
        .unwrap();
        dir
    };

    // Trusting the test CA (relative `ca` path) works; so does skip_verify.
    for extra in ["ca = \"ca.pem\"\n", "skip_verify = true\n"] {
        let hosts = hosts_dir_with(extra);
        let (client, _) = new_client(RegistryOptions {
            hosts_dir: Some(hosts.path().to_owned()),
            ..options()
        });
        let resolved = client
            .resolve(&reference, &Platform::default())
            .await
            .unwrap();
        assert_eq!(resolved.manifest_digest, image.manifest_digest, "{extra}");
        let blob = client.remote_blob(
            reference.repository().clone(),
            resolved.layers[0].digest.clone(),
            resolved.layers[0].size,
        );
        let bytes = blob
            .read_range(7..77, FetchPriority::OnDemand)
            .await
            .unwrap();
        assert_eq!(bytes.as_ref(), &image.layers[0][7..77]);
    }

    // Without the CA the certificate is refused, and the error names the registry.
    let hosts = hosts_dir_with("");
    let (client, _) = new_client(RegistryOptions {
        hosts_dir: Some(hosts.path().to_owned()),
        on_demand_retries: 0,
        ..options()
    });
    let err = client
        .resolve(&reference, &Platform::default())
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Transport { .. }), "{err}");
    assert!(err.to_string().contains(&registry.host()), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_toml_headers_reach_the_mirror() {
    let (data, digest, _) = blob_fixture();
    let data = Arc::new(data);
    let upstream = format!("127.0.0.1:{}", free_port());
    let mirror = {
        let data = Arc::clone(&data);
        let upstream = upstream.clone();
        TestServer::start(handler(move |req: Request| {
            let data = Arc::clone(&data);
            let upstream = upstream.clone();
            async move {
                if req.header("x-mirror-key") != Some("k1") {
                    return Response::new(403);
                }
                if !req.path.ends_with(&format!("?ns={upstream}")) {
                    return Response::new(400);
                }
                serve_range(&data, &req)
            }
        }))
        .await
    };
    let hosts = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(hosts.path().join(&upstream)).unwrap();
    std::fs::write(
        hosts.path().join(&upstream).join("hosts.toml"),
        format!(
            "server = \"http://{upstream}\"\n\
             [host.\"http://{}\"]\n  capabilities = [\"pull\"]\n  \
             [host.\"http://{}\".header]\n    x-mirror-key = \"k1\"\n",
            mirror.host(),
            mirror.host()
        ),
    )
    .unwrap();
    let (client, _) = new_client(RegistryOptions {
        hosts_dir: Some(hosts.path().to_owned()),
        ..options()
    });
    let repo = Repository::new(&upstream, "test/img").unwrap();
    let bytes = client
        .read_range(
            &repo,
            &digest,
            data.len() as u64,
            10..20,
            FetchPriority::OnDemand,
        )
        .await
        .unwrap();
    assert_eq!(bytes.as_ref(), &data[10..20]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_mirror_is_skipped_for_a_while() {
    let (data, digest, _) = blob_fixture();
    let data = Arc::new(data);
    let mirror_hits = Arc::new(AtomicU64::new(0));
    let mirror = {
        let hits = Arc::clone(&mirror_hits);
        TestServer::start(handler(move |_req: Request| {
            hits.fetch_add(1, Ordering::SeqCst);
            async { Response::new(503) }
        }))
        .await
    };
    let upstream = {
        let data = Arc::clone(&data);
        TestServer::start(handler(move |req: Request| {
            let data = Arc::clone(&data);
            async move { serve_range(&data, &req) }
        }))
        .await
    };
    let hosts = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(hosts.path().join(upstream.host())).unwrap();
    std::fs::write(
        hosts.path().join(upstream.host()).join("hosts.toml"),
        format!("[host.\"http://{}\"]\n", mirror.host()),
    )
    .unwrap();
    let (client, _) = new_client(RegistryOptions {
        hosts_dir: Some(hosts.path().to_owned()),
        ..options()
    });
    let blob = client.remote_blob(repo_on(&upstream), digest, data.len() as u64);
    for start in [0u64, 100, 200] {
        let bytes = blob
            .read_range(start..start + 50, FetchPriority::OnDemand)
            .await
            .unwrap();
        assert_eq!(bytes.as_ref(), &data[start as usize..start as usize + 50]);
    }
    // Tried once, then left alone: a single attempt (no retries on a mirror).
    assert_eq!(mirror_hits.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_names_use_plain_http() {
    let (data, digest, _) = blob_fixture();
    let data = Arc::new(data);
    let serve = |data: Arc<Vec<u8>>| {
        handler(move |req: Request| {
            let data = Arc::clone(&data);
            async move { serve_range(&data, &req) }
        })
    };
    let v6 = TestServer::start_on("[::1]:0", serve(Arc::clone(&data))).await;
    let v4 = TestServer::start(serve(Arc::clone(&data))).await;
    let (client, _) = new_client(options());
    for registry in [
        format!("[::1]:{}", v6.addr.port()),
        format!("localhost:{}", v4.addr.port()),
    ] {
        let reference: ImageReference = format!("{registry}/test/img@{digest}").parse().unwrap();
        let bytes = client
            .read_range(
                reference.repository(),
                &digest,
                data.len() as u64,
                0..64,
                FetchPriority::OnDemand,
            )
            .await
            .unwrap_or_else(|e| panic!("{registry}: {e}"));
        assert_eq!(bytes.as_ref(), &data[..64]);
    }
}

/// Writes an OCI image layout with one real gzip'd tar layer; returns the layer bytes.
fn write_oci_layout(dir: &Path, tag: &str) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let content = pseudo_random(20_000, 7);
    let mut header = tar::Header::new_gnu();
    header.set_size(content.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, "data.bin", content.as_slice())
        .unwrap();
    let tar = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    let layer = gz.finish().unwrap();

    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| {
        let digest = Digest::sha256_of(data);
        std::fs::write(blobs.join(digest.hex()), data).unwrap();
        digest
    };
    put(&layer);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [Digest::sha256_of(&tar)]},
    }))
    .unwrap();
    put(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, &config),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", &layer)],
    }))
    .unwrap();
    let manifest_digest = put(&manifest);
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": manifest.len(),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }],
        }))
        .unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    layer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_pushed_by_skopeo_as_docker_schema2() {
    let registry = TestRegistry::start(TestRegistryOptions::default());
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let layer = write_oci_layout(&layout, "v1");
    let policy = work.path().join("policy.json");
    std::fs::write(
        &policy,
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )
    .unwrap();
    let copy = tokio::process::Command::new("skopeo")
        .arg("--policy")
        .arg(&policy)
        .args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--format",
            "v2s2",
        ])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://{}/test/docker:v1", registry.host()))
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), copy)
        .await
        .expect("skopeo copy did not finish")
        .expect("skopeo must be installed");
    assert!(
        output.status.success(),
        "skopeo copy: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    let (client, _) = new_client(options());
    let reference: ImageReference = format!("{}/test/docker:v1", registry.host())
        .parse()
        .unwrap();
    let resolved = client
        .resolve(&reference, &Platform::default())
        .await
        .unwrap();
    assert_eq!(
        resolved.manifest_media_type,
        sluice::registry::manifest::DOCKER_MANIFEST
    );
    assert_eq!(resolved.manifest.config.media_type, DOCKER_CONFIG);
    assert_eq!(resolved.layers.len(), 1);
    assert_eq!(
        resolved.layers[0].media_type,
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );
    assert_eq!(resolved.layers[0].digest, Digest::sha256_of(&layer));
    let blob = client.remote_blob(
        reference.repository().clone(),
        resolved.layers[0].digest.clone(),
        resolved.layers[0].size,
    );
    let size = layer.len() as u64;
    let tail = blob
        .read_range(size - 8..size, FetchPriority::OnDemand)
        .await
        .unwrap();
    assert_eq!(tail.as_ref(), &layer[layer.len() - 8..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_body_is_retried() {
    // The first answer is cut short after 5 of 10 bytes; the second is whole.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        let mut served = 0;
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = read_request(&mut stream).await;
            let body: &[u8] = if served == 0 { b"01234" } else { b"0123456789" };
            served += 1;
            let _ = stream
                .write_all(
                    b"HTTP/1.1 206 X\r\ncontent-range: bytes 0-9/100\r\ncontent-length: 10\r\n\
                      connection: close\r\n\r\n",
                )
                .await;
            let _ = stream.write_all(body).await;
            let _ = stream.shutdown().await;
        }
    });
    let (client, metrics) = new_client(options());
    let (_, digest, _) = blob_fixture();
    let repo = Repository::new(&host, "test/img").unwrap();
    let result = client
        .read_range(&repo, &digest, 100, 0..10, FetchPriority::OnDemand)
        .await;
    task.abort();
    assert_eq!(result.unwrap().as_ref(), b"0123456789");
    assert_eq!(metrics.on_demand_requests.load(Ordering::Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_flow_with_identity_token() {
    // The token server refuses anonymous GETs: only the refresh-token POST can succeed.
    let setup = token_setup(true).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        serde_json::to_vec(&serde_json::json!({"auths": {setup.gate.host(): {
            "auth": base64::engine::general_purpose::STANDARD
                .encode("00000000-0000-0000-0000-000000000000:"),
            "identitytoken": "refresh-xyz",
        }}}))
        .unwrap(),
    )
    .unwrap();
    let (client, _) = new_client(RegistryOptions {
        docker_config: Some(config),
        ..options()
    });
    let reference: ImageReference = format!("{}/test/img:v1", setup.gate.host())
        .parse()
        .unwrap();
    let resolved = client
        .resolve(&reference, &Platform::default())
        .await
        .unwrap();
    assert_eq!(resolved.manifest_digest, setup.image.manifest_digest);
    let requests = setup.token_requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].method, "POST");
    assert_eq!(
        requests[0].header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_registry_token_is_sent_as_is() {
    let (data, digest, _) = blob_fixture();
    let data = Arc::new(data);
    let hits = Arc::new(AtomicU64::new(0));
    let server = {
        let data = Arc::clone(&data);
        let hits = Arc::clone(&hits);
        TestServer::start(handler(move |req: Request| {
            hits.fetch_add(1, Ordering::SeqCst);
            let data = Arc::clone(&data);
            async move {
                if req.header("authorization") != Some("Bearer static-abc") {
                    // A realm nobody serves: the client must not go looking for a token.
                    return Response::new(401).header(
                        "www-authenticate",
                        r#"Bearer realm="http://127.0.0.1:1/token",service="x""#,
                    );
                }
                serve_range(&data, &req)
            }
        }))
        .await
    };
    let with_token = |token: &str| {
        let mut credentials = std::collections::HashMap::new();
        credentials.insert(server.host(), Credentials::with_registry_token(token));
        new_client(RegistryOptions {
            credentials,
            ..options()
        })
        .0
    };
    let repo = repo_on(&server);
    let good = with_token("static-abc");
    let bytes = good
        .read_range(
            &repo,
            &digest,
            data.len() as u64,
            5..15,
            FetchPriority::OnDemand,
        )
        .await
        .unwrap();
    assert_eq!(bytes.as_ref(), &data[5..15]);
    assert_eq!(hits.swap(0, Ordering::SeqCst), 1);

    let bad = with_token("static-wrong");
    let err = bad
        .read_range(
            &repo,
            &digest,
            data.len() as u64,
            5..15,
            FetchPriority::OnDemand,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err}");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

//! Integration tests of the registry client against the real Debian `docker-registry`
//! (started per test on a free loopback port with a private storage directory) and
//! against small loopback servers that misbehave on purpose.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use futures::future::BoxFuture;
use sluice::digest::Digest;
use sluice::metrics::Metrics;
use sluice::registry::manifest::{DOCKER_CONFIG, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST};
use sluice::registry::{
    BlobSource, Descriptor, FetchPriority, ImageReference, Platform, RegistryClient, RegistryError,
    RegistryOptions, Repository,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

// ---- harness: the real registry ----------------------------------------------------------

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `docker-registry serve` child, killed (by PID) and reaped on drop.
struct RealRegistry {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for RealRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RealRegistry {
    async fn start(htpasswd: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let auth = match htpasswd {
            Some(line) => {
                let path = dir.path().join("htpasswd");
                std::fs::write(&path, line).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: test-realm\n    path: {}\n",
                    path.display()
                )
            }
            None => String::new(),
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: sluice-test\n{auth}",
            dir.path().join("data").display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("docker-registry must be installed (Debian package docker-registry)");
        let registry = Self {
            child,
            port,
            _dir: dir,
        };
        let http = reqwest::Client::new();
        for _ in 0..200 {
            if let Ok(resp) = http.get(format!("{}/v2/", registry.base())).send().await
                && (resp.status().is_success() || resp.status() == 401)
            {
                return registry;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("docker-registry did not start on port {port}");
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
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
            http: reqwest::Client::new(),
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
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
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
    Some(Request {
        method,
        path,
        headers,
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
    let registry = RealRegistry::start(None).await;
    let pusher = Pusher::new(registry.base(), None);
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
    let registry = RealRegistry::start(None).await;
    let pusher = Pusher::new(registry.base(), None);
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
        let base = registry.base();
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
    let htpasswd = Command::new("htpasswd")
        .args(["-Bbn", "user", "pass"])
        .output()
        .expect("htpasswd (apache2-utils) must be installed");
    assert!(htpasswd.status.success());
    let registry = RealRegistry::start(Some(std::str::from_utf8(&htpasswd.stdout).unwrap())).await;
    let pusher = Pusher::new(registry.base(), Some(("user", "pass")));
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
    _registry: RealRegistry,
    gate: TestServer,
    _token_server: TestServer,
    token_requests: Arc<Mutex<Vec<Request>>>,
    image: PushedImage,
}

async fn token_setup(require_credentials: bool) -> TokenSetup {
    let registry = RealRegistry::start(None).await;
    let image = push_image(
        &Pusher::new(registry.base(), None),
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
        TestServer::start(handler(move |req: Request| {
            token_requests.lock().unwrap().push(req.clone());
            let expected = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("alice:s3cret")
            );
            let authorised = match req.header("authorization") {
                Some(auth) => auth == expected,
                None => !require_credentials,
            };
            let n = issued.fetch_add(1, Ordering::SeqCst);
            async move {
                if !authorised {
                    return Response::new(401);
                }
                Response::new(200)
                    .header("content-type", "application/json")
                    .body(format!(r#"{{"token":"tok-{n}","expires_in":300}}"#))
            }
        }))
        .await
    };
    let realm = format!("http://{}/token", token_server.host());
    let upstream = registry.base();
    let gate = TestServer::start(handler(move |req: Request| {
        let realm = realm.clone();
        let upstream = upstream.clone();
        async move {
            let authorised = req
                .header("authorization")
                .is_some_and(|a| a.starts_with("Bearer tok-"));
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_from_hosts_dir() {
    let registry = RealRegistry::start(None).await;
    let image = push_image(
        &Pusher::new(registry.base(), None),
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

    // A 206 whose body is shorter than the range it claims.
    let blob = client.remote_blob(repo_on(&stall), digest, 100);
    let err = blob
        .read_range(0..10, FetchPriority::OnDemand)
        .await
        .unwrap_err();
    assert!(err.transient, "{err}");
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

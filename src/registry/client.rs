//! The distribution-API client: endpoints (mirrors then upstream), authentication,
//! redirects to blob storage, retries, timeouts, and digest verification.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_RANGE, CONTENT_TYPE, HeaderMap, HeaderValue, LOCATION, RANGE,
    RETRY_AFTER, WWW_AUTHENTICATE,
};
use reqwest::{RequestBuilder, Response, StatusCode, Url};

use crate::digest::{Digest, DigestWriter};
use crate::metrics::Metrics;

use super::auth::{
    Challenge, Credentials, Secret, TokenCache, TokenResponse, parse_www_authenticate, pull_scope,
};
use super::docker_config::{self, DockerConfig};
use super::error::RegistryError;
use super::hosts::{self, HostEndpoint};
use super::manifest::{Descriptor, ImageConfig, ImageManifest, MANIFEST_ACCEPT, ManifestDocument};
use super::reference::{ImageReference, Platform, Repository};
use super::retry::{MAX_DELAY, backoff, parse_retry_after};
use super::{BlobReadError, BlobSource, FetchPriority};

/// Manifests and configs are small; anything bigger is a misbehaving server.
const MAX_MANIFEST_BYTES: u64 = 4 << 20;
const MAX_CONFIG_BYTES: u64 = 16 << 20;
const MAX_TOKEN_RESPONSE_BYTES: u64 = 1 << 20;
const MAX_REDIRECTS: usize = 5;
/// Storage URLs handed out by registries are pre-signed for minutes; re-asking the
/// registry after this long avoids using one that is about to expire.
const REDIRECT_CACHE_TTL: Duration = Duration::from_secs(5 * 60);

/// How to reach registries.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Use `http://` for every registry without a hosts.toml (loopback registries always
    /// use plain HTTP, as with Docker).
    pub plain_http: bool,
    /// containerd-style hosts directory: `<dir>/<registry>/hosts.toml`.
    pub hosts_dir: Option<PathBuf>,
    /// Docker config with credentials; `None` means `$DOCKER_CONFIG/config.json` or
    /// `~/.docker/config.json` if it exists. An explicit path must exist.
    pub docker_config: Option<PathBuf>,
    /// Credentials by registry (`host[:port]`, `docker.io`), used before the docker
    /// config.
    pub credentials: HashMap<String, Credentials>,
    /// Where to find `docker-credential-<name>` programs named by `credHelpers` /
    /// `credsStore`; `None` searches `PATH` (daemons often run with a short one).
    pub credential_helper_dir: Option<PathBuf>,
    /// Limit for connecting, for the response headers, and for each pause while the body
    /// streams in. A registry that stops answering fails within this time per attempt.
    pub request_timeout: Duration,
    /// Retries after the first attempt for reads a process is blocked on, and for
    /// manifest/config fetches.
    pub on_demand_retries: u32,
    /// Retries for prefetch and background streaming.
    pub background_retries: u32,
    pub user_agent: String,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        Self {
            plain_http: false,
            hosts_dir: None,
            docker_config: None,
            credentials: HashMap::new(),
            credential_helper_dir: None,
            request_timeout: Duration::from_secs(30),
            on_demand_retries: 5,
            background_retries: 2,
            user_agent: concat!("sluice/", env!("CARGO_PKG_VERSION")).to_owned(),
        }
    }
}

/// An image resolved for one platform.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    pub reference: ImageReference,
    /// The index / manifest list the reference pointed to, when it was one.
    pub index_digest: Option<Digest>,
    /// Media type of that index, when there was one.
    pub index_media_type: Option<String>,
    /// Bytes of that index as served (they hash to `index_digest`), when there was one.
    pub index_bytes: Option<Bytes>,
    /// The platform-specific image manifest.
    pub manifest_digest: Digest,
    pub manifest_media_type: String,
    pub manifest_bytes: Bytes,
    pub manifest: ImageManifest,
    pub config_digest: Digest,
    pub config_bytes: Bytes,
    pub config: ImageConfig,
    /// Compressed layers, base first.
    pub layers: Vec<Descriptor>,
}

/// One host to talk to, with the HTTP client that fits its TLS settings.
struct Endpoint {
    cfg: HostEndpoint,
    http: reqwest::Client,
    /// Registry name credentials are looked up by.
    credentials_key: String,
    /// From the options, else from `auths` in the docker config.
    credentials: Option<Credentials>,
    /// Otherwise the credential helper to ask, once, when the host asks for credentials.
    helper: Option<String>,
    helper_credentials: tokio::sync::OnceCell<Option<Credentials>>,
    /// `?ns=<registry>` on mirrors, as containerd sends it, so a mirror serving several
    /// upstreams knows which one is meant; empty for the registry itself.
    query: String,
    /// Storage URL this host redirected each blob to.
    redirects: RwLock<HashMap<Digest, CachedRedirect>>,
    /// A mirror that failed transiently is skipped until then (ms since the client's
    /// epoch), so a dead mirror does not cost every read a failed request.
    unhealthy_until_ms: AtomicU64,
}

const MIRROR_COOLDOWN: Duration = Duration::from_secs(30);

/// Beyond this many cached redirects, stale ones are dropped on insert.
const REDIRECT_CACHE_PRUNE_AT: usize = 1024;

impl Endpoint {
    fn remember_redirect(&self, digest: &Digest, repository: &str, url: String) {
        let mut redirects = self.redirects.write().unwrap_or_else(|e| e.into_inner());
        if redirects.len() >= REDIRECT_CACHE_PRUNE_AT {
            redirects.retain(|_, c| c.at.elapsed() < REDIRECT_CACHE_TTL);
        }
        redirects.insert(
            digest.clone(),
            CachedRedirect {
                repository: repository.to_owned(),
                url: url.into(),
                at: Instant::now(),
            },
        );
    }

    fn forget_redirect(&self, digest: &Digest) {
        self.redirects
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(digest);
    }
}

fn is_retryable_status(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// Which capability an operation needs from a host.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Need {
    Resolve,
    Pull,
}

/// What authorization a request carried.
#[derive(Clone, PartialEq, Eq, Debug)]
enum Sent {
    Nothing,
    CachedToken(Secret),
    /// The configured static bearer token: if it is refused, nothing else will do.
    RegistryToken,
    Basic,
    /// Produced by answering a challenge just now.
    Fresh,
}

struct CachedRedirect {
    /// The redirect was granted for this repository; reads through another one ask again.
    repository: String,
    url: Arc<str>,
    at: Instant,
}

/// Names what a request is about, for errors. Formatted only when an error is built, so
/// the read path does not pay for it.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    host: &'a str,
    repository: &'a str,
    object: Object<'a>,
}

#[derive(Clone, Copy)]
enum Object<'a> {
    Manifest(&'a str),
    Config(&'a Digest),
    Blob(&'a Digest),
    /// What a push request is about, already described ("blob sha256:…", "manifest v1").
    Push(&'a str),
}

impl fmt::Display for Object<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Manifest(reference) => write!(f, "manifest {reference}"),
            Self::Config(digest) => write!(f, "config {digest}"),
            Self::Blob(digest) => write!(f, "blob {digest}"),
            Self::Push(what) => f.write_str(what),
        }
    }
}

impl Ctx<'_> {
    fn transport(&self, error: reqwest::Error) -> RegistryError {
        // The URL may carry pre-signed credentials in its query; never show it.
        let error = error.without_url();
        let mut reason = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(inner) = source {
            reason.push_str(": ");
            reason.push_str(&inner.to_string());
            source = inner.source();
        }
        let host = self.host.to_owned();
        let repository = self.repository.to_owned();
        let object = self.object.to_string();
        if is_tls_failure(&error) {
            RegistryError::Tls {
                host,
                repository,
                object,
                reason,
            }
        } else {
            RegistryError::Transport {
                host,
                repository,
                object,
                reason,
            }
        }
    }

    fn timeout(&self, timeout: Duration) -> RegistryError {
        RegistryError::Timeout {
            host: self.host.to_owned(),
            repository: self.repository.to_owned(),
            object: self.object.to_string(),
            timeout,
        }
    }

    fn too_large(&self, limit: u64) -> RegistryError {
        RegistryError::TooLarge {
            host: self.host.to_owned(),
            repository: self.repository.to_owned(),
            object: self.object.to_string(),
            limit,
        }
    }

    fn invalid_manifest(&self, reason: String) -> RegistryError {
        RegistryError::InvalidManifest {
            host: self.host.to_owned(),
            repository: self.repository.to_owned(),
            object: self.object.to_string(),
            reason,
        }
    }

    fn mismatch(&self, actual: Digest) -> RegistryError {
        RegistryError::DigestMismatch {
            host: self.host.to_owned(),
            repository: self.repository.to_owned(),
            object: self.object.to_string(),
            actual,
        }
    }

    fn redirect(&self, reason: impl Into<String>) -> RegistryError {
        RegistryError::Redirect {
            host: self.host.to_owned(),
            repository: self.repository.to_owned(),
            object: self.object.to_string(),
            reason: reason.into(),
        }
    }

    fn bad_range(&self, digest: &Digest, range: &Range<u64>, reason: String) -> RegistryError {
        RegistryError::BadRange {
            host: self.host.to_owned(),
            repository: self.repository.to_owned(),
            digest: digest.clone(),
            start: range.start,
            end: range.end,
            reason,
        }
    }
}

/// One async lock per (host, scope), held while fetching a token.
type TokenFetchLocks = HashMap<(String, String), Arc<tokio::sync::Mutex<()>>>;

/// A client for all registries, shared by every image and layer (`Arc`).
pub struct RegistryClient {
    options: RegistryOptions,
    metrics: Arc<Metrics>,
    docker_config: Option<DockerConfig>,
    /// Where credentials were (or would have been) looked for, for error hints.
    docker_config_path: Option<PathBuf>,
    endpoints: RwLock<HashMap<String, Arc<[Endpoint]>>>,
    http_clients: Mutex<HashMap<(bool, Vec<PathBuf>), reqwest::Client>>,
    tokens: TokenCache,
    /// Serialises token fetches per (host, scope).
    token_fetches: Mutex<TokenFetchLocks>,
    /// Hosts that asked for basic auth: credentials are then sent up front.
    basic_hosts: RwLock<HashSet<String>>,
    warned_full_body: AtomicBool,
    /// Origin of the millisecond clock in `Endpoint::unhealthy_until_ms`.
    epoch: Instant,
}

impl fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryClient")
            .field("options", &self.options)
            .field("docker_config_path", &self.docker_config_path)
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

impl RegistryClient {
    /// Loads credentials and validates options. Hosts files are read lazily, per registry.
    pub fn new(
        options: RegistryOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, RegistryError> {
        let docker_config = DockerConfig::load(options.docker_config.as_deref())?;
        let docker_config_path = options
            .docker_config
            .clone()
            .or_else(docker_config::default_path);
        if HeaderValue::from_str(&options.user_agent).is_err() {
            return Err(RegistryError::HttpClient {
                host: "any registry".into(),
                reason: format!(
                    "user agent {:?} is not a valid header value",
                    options.user_agent
                ),
            });
        }
        Ok(Arc::new(Self {
            options,
            metrics,
            docker_config,
            docker_config_path,
            endpoints: RwLock::default(),
            http_clients: Mutex::default(),
            tokens: TokenCache::default(),
            token_fetches: Mutex::default(),
            epoch: Instant::now(),
            basic_hosts: RwLock::default(),
            warned_full_body: AtomicBool::new(false),
        }))
    }

    pub fn options(&self) -> &RegistryOptions {
        &self.options
    }

    /// Resolves `reference` to the image manifest for `platform` (picking from an index
    /// when needed), and fetches and verifies its config.
    pub async fn resolve(
        &self,
        reference: &ImageReference,
        platform: &Platform,
    ) -> Result<ResolvedImage, RegistryError> {
        let repo = reference.repository();
        let endpoints = self.endpoints(repo.registry())?;
        let retries = self.options.on_demand_retries;
        let need = if reference.digest().is_some() {
            Need::Pull
        } else {
            Need::Resolve
        };
        let top_ref = reference.manifest_reference();
        let (bytes, content_type, digest, host) = self
            .across_endpoints(&endpoints, need, retries, |ep| {
                self.fetch_manifest_once(ep, repo, top_ref, reference.digest())
            })
            .await?;
        let ctx = Ctx {
            host: &host,
            repository: repo.name(),
            object: Object::Manifest(top_ref),
        };
        let doc = ManifestDocument::parse(&bytes, content_type.as_deref())
            .map_err(|reason| ctx.invalid_manifest(reason))?;
        let mut index_document = None;
        let (index_digest, manifest_digest, media_type, manifest_bytes, manifest) = match doc {
            ManifestDocument::Image {
                media_type,
                manifest,
            } => (None, digest, media_type, bytes, manifest),
            ManifestDocument::Index {
                index,
                media_type: index_media_type,
            } => {
                index_document = Some((index_media_type, bytes));
                let chosen =
                    index
                        .select(platform)
                        .ok_or_else(|| RegistryError::PlatformNotFound {
                            host: host.clone(),
                            repository: repo.name().to_owned(),
                            object: ctx.object.to_string(),
                            platform: platform.to_string(),
                            available: index.platforms(),
                        })?;
                let child = chosen.digest.clone();
                let (child_bytes, child_type, _, child_host) = self
                    .across_endpoints(&endpoints, Need::Pull, retries, |ep| {
                        self.fetch_manifest_once(ep, repo, child.as_str(), Some(&child))
                    })
                    .await?;
                let child_ctx = Ctx {
                    host: &child_host,
                    repository: repo.name(),
                    object: Object::Manifest(child.as_str()),
                };
                match ManifestDocument::parse(&child_bytes, child_type.as_deref())
                    .map_err(|reason| child_ctx.invalid_manifest(reason))?
                {
                    ManifestDocument::Image {
                        media_type,
                        manifest,
                    } => (Some(digest), child, media_type, child_bytes, manifest),
                    ManifestDocument::Index { .. } => {
                        return Err(child_ctx.invalid_manifest(
                            "an index entry for a platform points to another index".into(),
                        ));
                    }
                }
            }
        };
        let config_digest = manifest.config.digest.clone();
        if manifest.config.size > MAX_CONFIG_BYTES {
            return Err(Ctx {
                host: &host,
                repository: repo.name(),
                object: Object::Config(&config_digest),
            }
            .too_large(MAX_CONFIG_BYTES));
        }
        let config_bytes = self
            .fetch_blob_with(
                repo,
                &config_digest,
                FetchPriority::Prefetch,
                retries,
                Some(MAX_CONFIG_BYTES),
            )
            .await?;
        let config: ImageConfig = serde_json::from_slice(&config_bytes).map_err(|e| {
            Ctx {
                host: &host,
                repository: repo.name(),
                object: Object::Config(&config_digest),
            }
            .invalid_manifest(format!("the image config is not valid: {e}"))
        })?;
        let layers = manifest.layers.clone();
        Ok(ResolvedImage {
            reference: reference.clone(),
            index_digest,
            index_media_type: index_document
                .as_ref()
                .map(|(media_type, _)| media_type.clone()),
            index_bytes: index_document.map(|(_, bytes)| bytes),
            manifest_digest,
            manifest_media_type: media_type,
            manifest_bytes,
            manifest,
            config_digest,
            config_bytes,
            config,
            layers,
        })
    }

    /// Fetches a whole blob into memory and verifies it against `digest`: meant for
    /// configs, TOCs and small blobs; read layers by range. Counted as prefetch traffic,
    /// with the on-demand retry budget (someone is waiting for it).
    pub async fn fetch_blob(
        &self,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<Bytes, RegistryError> {
        self.fetch_blob_with(
            repo,
            digest,
            FetchPriority::Prefetch,
            self.options.on_demand_retries,
            None,
        )
        .await
    }

    /// Reads `range` (end exclusive) of a blob of `size` bytes. The bytes cannot be verified
    /// here (the digest covers the whole blob); the caller checks chunk digests.
    pub async fn read_range(
        &self,
        repo: &Repository,
        digest: &Digest,
        size: u64,
        range: Range<u64>,
        priority: FetchPriority,
    ) -> Result<Bytes, RegistryError> {
        if range.start > range.end || range.end > size {
            return Err(RegistryError::RangeOutOfBounds {
                host: repo.endpoint_host().to_owned(),
                repository: repo.name().to_owned(),
                digest: digest.clone(),
                start: range.start,
                end: range.end,
                size,
            });
        }
        if range.start == range.end {
            return Ok(Bytes::new());
        }
        let endpoints = self.endpoints(repo.registry())?;
        let retries = self.retries_for(priority);
        self.across_endpoints(&endpoints, Need::Pull, retries, |ep| {
            self.read_range_once(ep, repo, digest, size, range.clone(), priority)
        })
        .await
    }

    /// A handle reading ranges of one blob, for the cache and filesystem.
    pub fn remote_blob(
        self: &Arc<Self>,
        repo: Repository,
        digest: Digest,
        size: u64,
    ) -> RemoteBlob {
        RemoteBlob {
            client: Arc::clone(self),
            repo,
            digest,
            size,
        }
    }

    fn retries_for(&self, priority: FetchPriority) -> u32 {
        match priority {
            FetchPriority::OnDemand => self.options.on_demand_retries,
            FetchPriority::Prefetch | FetchPriority::Background => self.options.background_retries,
        }
    }

    fn counters(&self, priority: FetchPriority) -> (&AtomicU64, &AtomicU64) {
        match priority {
            FetchPriority::OnDemand => (
                &self.metrics.on_demand_requests,
                &self.metrics.on_demand_bytes,
            ),
            FetchPriority::Prefetch | FetchPriority::Background => (
                &self.metrics.background_requests,
                &self.metrics.background_bytes,
            ),
        }
    }

    async fn fetch_blob_with(
        &self,
        repo: &Repository,
        digest: &Digest,
        priority: FetchPriority,
        retries: u32,
        limit: Option<u64>,
    ) -> Result<Bytes, RegistryError> {
        let endpoints = self.endpoints(repo.registry())?;
        self.across_endpoints(&endpoints, Need::Pull, retries, |ep| {
            self.fetch_blob_once(ep, repo, digest, priority, limit)
        })
        .await
    }

    // ---- endpoints -------------------------------------------------------------------

    fn endpoints(&self, registry: &str) -> Result<Arc<[Endpoint]>, RegistryError> {
        if let Some(found) = self
            .endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(registry)
        {
            return Ok(Arc::clone(found));
        }
        let configs = hosts::endpoints_for(
            self.options.hosts_dir.as_deref(),
            registry,
            self.options.plain_http,
        )?;
        let mut built = Vec::with_capacity(configs.len());
        for cfg in configs {
            let http = self.http_client(&cfg)?;
            let cfg_is_mirror = cfg.is_mirror;
            let credentials_key = if cfg.is_mirror {
                cfg.host.clone()
            } else {
                registry.to_owned()
            };
            let credentials = self
                .configured_credentials(&credentials_key)
                .or_else(|| {
                    self.docker_config
                        .as_ref()
                        .and_then(|c| c.credentials_for(&credentials_key))
                })
                .cloned();
            let helper = match credentials {
                Some(_) => None,
                None => self
                    .docker_config
                    .as_ref()
                    .and_then(|c| c.helper_for(&credentials_key))
                    .map(str::to_owned),
            };
            built.push(Endpoint {
                cfg,
                http,
                credentials_key,
                credentials,
                query: if cfg_is_mirror {
                    format!("?ns={registry}")
                } else {
                    String::new()
                },
                helper,
                helper_credentials: tokio::sync::OnceCell::new(),
                redirects: RwLock::default(),
                unhealthy_until_ms: AtomicU64::new(0),
            });
        }
        let built: Arc<[Endpoint]> = built.into();
        self.endpoints
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(registry.to_owned(), Arc::clone(&built));
        Ok(built)
    }

    fn http_client(&self, cfg: &HostEndpoint) -> Result<reqwest::Client, RegistryError> {
        let key = (cfg.skip_verify, cfg.ca.clone());
        let mut clients = self.http_clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = clients.get(&key) {
            return Ok(client.clone());
        }
        let fail = |reason: String| RegistryError::HttpClient {
            host: cfg.host.clone(),
            reason,
        };
        let mut builder = reqwest::Client::builder()
            .user_agent(self.options.user_agent.clone())
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(self.options.request_timeout)
            .read_timeout(self.options.request_timeout)
            .danger_accept_invalid_certs(cfg.skip_verify);
        for path in &cfg.ca {
            let pem = std::fs::read(path).map_err(|e| RegistryError::Config {
                path: path.clone(),
                reason: format!("cannot read CA certificate for {}: {e}", cfg.host),
            })?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| RegistryError::Config {
                    path: path.clone(),
                    reason: format!("not a PEM certificate bundle: {e}"),
                })?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder.build().map_err(|e| fail(e.to_string()))?;
        clients.insert(key, client.clone());
        Ok(client)
    }

    /// Runs `op` on each host able to do `need`, mirrors first; the first success wins.
    /// Mirrors get a single attempt so a dead mirror costs one failed request, not a
    /// whole backoff sequence; the last host gets the full retry budget.
    async fn across_endpoints<'a, T, F, Fut>(
        &self,
        endpoints: &'a [Endpoint],
        need: Need,
        retries: u32,
        op: F,
    ) -> Result<T, RegistryError>
    where
        F: Fn(&'a Endpoint) -> Fut,
        Fut: Future<Output = Result<T, RegistryError>>,
    {
        let capable = |ep: &Endpoint| match need {
            Need::Resolve => ep.cfg.capabilities.resolve,
            Need::Pull => ep.cfg.capabilities.pull,
        };
        let Some(last) = endpoints.iter().rposition(capable) else {
            let host = endpoints
                .last()
                .map(|ep| ep.cfg.host.as_str())
                .unwrap_or("");
            return Err(RegistryError::HttpClient {
                host: host.to_owned(),
                reason: format!(
                    "no host in its hosts.toml has the {need:?} capability; add it to a host"
                ),
            });
        };
        for ep in endpoints[..last].iter().filter(|ep| capable(ep)) {
            let now_ms = self.epoch.elapsed().as_millis() as u64;
            if ep.unhealthy_until_ms.load(Ordering::Relaxed) > now_ms {
                continue;
            }
            match op(ep).await {
                Ok(value) => return Ok(value),
                Err(e) if e.is_transient() => {
                    let until = now_ms + MIRROR_COOLDOWN.as_millis() as u64;
                    ep.unhealthy_until_ms.store(until, Ordering::Relaxed);
                    tracing::warn!(
                        mirror = %ep.cfg.host,
                        error = %e,
                        cooldown = ?MIRROR_COOLDOWN,
                        "mirror failed; skipping it for a while"
                    );
                }
                Err(e) => tracing::debug!(
                    mirror = %ep.cfg.host,
                    error = %e,
                    "mirror cannot serve this; trying the next host"
                ),
            }
        }
        let last = &endpoints[last];
        self.with_retries(retries, || op(last)).await
    }

    async fn with_retries<T, F, Fut>(&self, retries: u32, mut op: F) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, RegistryError>>,
    {
        let mut attempt = 0;
        loop {
            match op().await {
                Ok(value) => return Ok(value),
                Err(e) if e.is_transient() && attempt < retries => {
                    let delay = e
                        .retry_after()
                        .map(|d| d.min(MAX_DELAY))
                        .unwrap_or_else(|| backoff(attempt));
                    tracing::debug!(error = %e, attempt, ?delay, "retrying registry request");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    // ---- single attempts ---------------------------------------------------------------

    async fn fetch_manifest_once(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        reference: &str,
        pinned: Option<&Digest>,
    ) -> Result<(Bytes, Option<String>, Digest, String), RegistryError> {
        let ctx = Ctx {
            host: &ep.cfg.host,
            repository: repo.name(),
            object: Object::Manifest(reference),
        };
        let url = format!(
            "{}/{}/manifests/{}{}",
            ep.cfg.api_base,
            repo.name(),
            reference,
            ep.query
        );
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
        let resp = self
            .send_authorized(ep, &ctx, repo, &url, headers, FetchPriority::Prefetch)
            .await?;
        if !resp.status().is_success() {
            return Err(self.status_error(ep, &ctx, &resp));
        }
        let content_type = header_str(resp.headers(), CONTENT_TYPE.as_str()).map(str::to_owned);
        let served_digest = header_str(resp.headers(), "docker-content-digest")
            .and_then(|d| d.parse::<Digest>().ok());
        let bytes = self
            .read_body(
                resp,
                &ctx,
                Some(MAX_MANIFEST_BYTES),
                FetchPriority::Prefetch,
            )
            .await?;
        let actual = Digest::sha256_of(&bytes);
        if let Some(expected) = pinned.or(served_digest.as_ref())
            && *expected != actual
        {
            return Err(ctx.mismatch(actual));
        }
        Ok((bytes, content_type, actual, ep.cfg.host.clone()))
    }

    async fn fetch_blob_once(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        digest: &Digest,
        priority: FetchPriority,
        limit: Option<u64>,
    ) -> Result<Bytes, RegistryError> {
        let ctx = Ctx {
            host: &ep.cfg.host,
            repository: repo.name(),
            object: Object::Blob(digest),
        };
        let resp = self
            .blob_response(ep, &ctx, repo, digest, None, priority)
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(RegistryError::Status {
                host: ep.cfg.host.clone(),
                repository: repo.name().to_owned(),
                object: ctx.object.to_string(),
                status: resp.status().as_u16(),
                retry_after: None,
            });
        }
        let bytes = self.read_body(resp, &ctx, limit, priority).await?;
        let mut hasher = DigestWriter::new();
        hasher.update(&bytes);
        let actual = hasher.finish();
        if actual != *digest {
            return Err(ctx.mismatch(actual));
        }
        Ok(bytes)
    }

    async fn read_range_once(
        &self,
        ep: &Endpoint,
        repo: &Repository,
        digest: &Digest,
        size: u64,
        range: Range<u64>,
        priority: FetchPriority,
    ) -> Result<Bytes, RegistryError> {
        let ctx = Ctx {
            host: &ep.cfg.host,
            repository: repo.name(),
            object: Object::Blob(digest),
        };
        let resp = self
            .blob_response(ep, &ctx, repo, digest, Some(&range), priority)
            .await?;
        let wanted = range.end - range.start;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let content_range =
                    header_str(resp.headers(), CONTENT_RANGE.as_str()).ok_or_else(|| {
                        ctx.bad_range(digest, &range, "206 without Content-Range".into())
                    })?;
                let (first, last, total) = parse_content_range(content_range).ok_or_else(|| {
                    ctx.bad_range(
                        digest,
                        &range,
                        format!("unparseable Content-Range {content_range:?}"),
                    )
                })?;
                if first != range.start || last + 1 != range.end || total.is_some_and(|t| t != size)
                {
                    return Err(ctx.bad_range(
                        digest,
                        &range,
                        format!(
                            "asked for bytes {}-{}/{size}, got {content_range:?}",
                            range.start,
                            range.end - 1
                        ),
                    ));
                }
                if let Some(length) = resp.content_length()
                    && length != wanted
                {
                    return Err(ctx.bad_range(
                        digest,
                        &range,
                        format!("206 with a body of {length} bytes for {wanted} requested"),
                    ));
                }
                let bytes = self.read_body(resp, &ctx, Some(wanted), priority).await?;
                if bytes.len() as u64 != wanted {
                    return Err(short_body(&ctx, bytes.len() as u64, wanted));
                }
                Ok(bytes)
            }
            StatusCode::OK => {
                // The server ignored Range. Stream the body, keep the wanted window, and
                // hang up at its end: never more than `range.end` bytes are transferred.
                if let Some(length) = resp.content_length()
                    && length != size
                {
                    return Err(ctx.bad_range(
                        digest,
                        &range,
                        format!("200 with a body of {length} bytes for a blob of {size} bytes"),
                    ));
                }
                if !self.warned_full_body.swap(true, Ordering::Relaxed) {
                    tracing::warn!(host = %ep.cfg.host, "registry ignores Range requests; reads will be slow");
                }
                self.read_window(resp, &ctx, range, priority).await
            }
            other => Err(ctx.bad_range(
                digest,
                &range,
                format!("unexpected status {other} to a Range request"),
            )),
        }
    }

    // ---- HTTP plumbing -----------------------------------------------------------------

    /// The GET for a blob: through a cached redirect target when one is fresh, else from
    /// the registry, following redirects (without the registry's credentials) and caching
    /// the final URL. Returns only 200/206 responses.
    async fn blob_response(
        &self,
        ep: &Endpoint,
        ctx: &Ctx<'_>,
        repo: &Repository,
        digest: &Digest,
        range: Option<&Range<u64>>,
        priority: FetchPriority,
    ) -> Result<Response, RegistryError> {
        let range_header = range.map(|r| format!("bytes={}-{}", r.start, r.end - 1));
        let cached = ep
            .redirects
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
            .filter(|c| c.repository == repo.name() && c.at.elapsed() < REDIRECT_CACHE_TTL)
            .map(|c| Arc::clone(&c.url));
        if let Some(url) = cached {
            let mut req = ep.http.get(&*url);
            if let Some(r) = &range_header {
                req = req.header(RANGE, r);
            }
            match self.execute(req, ctx, priority).await {
                Ok(resp) if resp.status().is_success() => return Ok(resp),
                Ok(resp) if matches!(resp.status().as_u16(), 400 | 401 | 403 | 404 | 410) => {
                    // Typically an expired pre-signed URL: ask the registry again.
                    tracing::debug!(host = %ep.cfg.host, status = %resp.status(), "cached blob redirect rejected, re-resolving");
                    ep.forget_redirect(digest);
                }
                Ok(resp) => return Err(self.status_error(ep, ctx, &resp)),
                Err(e) => {
                    ep.forget_redirect(digest);
                    return Err(e);
                }
            }
        }

        let url = format!(
            "{}/{}/blobs/{}{}",
            ep.cfg.api_base,
            repo.name(),
            digest,
            ep.query
        );
        let mut headers = HeaderMap::new();
        if let Some(r) = &range_header {
            headers.insert(
                RANGE,
                HeaderValue::from_str(r).map_err(|_| ctx.redirect("invalid range header"))?,
            );
        }
        let mut resp = self
            .send_authorized(ep, ctx, repo, &url, headers, priority)
            .await?;
        let mut current = url;
        let mut hops = 0;
        while resp.status().is_redirection() {
            hops += 1;
            if hops > MAX_REDIRECTS {
                return Err(ctx.redirect(format!("more than {MAX_REDIRECTS} redirects")));
            }
            let location = header_str(resp.headers(), LOCATION.as_str())
                .ok_or_else(|| ctx.redirect(format!("{} without Location", resp.status())))?;
            let next = Url::parse(&current)
                .and_then(|base| base.join(location))
                .map_err(|e| ctx.redirect(format!("invalid Location: {e}")))?;
            if !matches!(next.scheme(), "http" | "https") {
                return Err(ctx.redirect(format!("Location with scheme {:?}", next.scheme())));
            }
            current = next.into();
            let mut req = ep.http.get(&current);
            if let Some(r) = &range_header {
                req = req.header(RANGE, r);
            }
            resp = self.execute(req, ctx, priority).await?;
        }
        let status = resp.status();
        if hops > 0 && !status.is_success() && !is_retryable_status(status) {
            // Not the registry's refusal: its credentials hint would mislead.
            let storage = Url::parse(&current)
                .ok()
                .and_then(|u| u.host_str().map(str::to_owned))
                .unwrap_or_default();
            return Err(ctx.redirect(format!("the storage host {storage} answered {status}")));
        }
        if !status.is_success() {
            return Err(self.status_error(ep, ctx, &resp));
        }
        if hops > 0 {
            ep.remember_redirect(digest, repo.name(), current);
        }
        Ok(resp)
    }

    /// A GET to the registry with the host's extra headers and cached authorization; on
    /// 401/403 it authenticates as the challenge asks and tries once more.
    async fn send_authorized(
        &self,
        ep: &Endpoint,
        ctx: &Ctx<'_>,
        repo: &Repository,
        url: &str,
        headers: HeaderMap,
        priority: FetchPriority,
    ) -> Result<Response, RegistryError> {
        let scope = pull_scope(repo.name());
        self.send_with_auth(ep, ctx, &scope, priority, || {
            ep.http.get(url).headers(headers.clone())
        })
        .await
    }

    /// Sends the request `build` makes, with the host's extra headers and the
    /// authorization cached for `scope`; on 401/403 it authenticates as the challenge
    /// asks and tries once more.
    async fn send_with_auth(
        &self,
        ep: &Endpoint,
        ctx: &Ctx<'_>,
        scope: &str,
        priority: FetchPriority,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<Response, RegistryError> {
        // After a challenge, the retry uses what authentication produced, not the cache,
        // so a token that is short-lived or evicted meanwhile still gets its one use.
        let mut fresh_authorization: Option<String> = None;
        let mut reauthenticated = false;
        loop {
            let mut req = build();
            for (name, value) in &ep.cfg.headers {
                req = req.header(name.as_str(), value.as_str());
            }
            let registry_token = ep
                .credentials
                .as_ref()
                .and_then(|c| c.registry_token.as_ref());
            let sent = match fresh_authorization.take() {
                Some(authorization) => {
                    req = req.header(AUTHORIZATION, authorization);
                    Sent::Fresh
                }
                None => match self.tokens.get(&ep.cfg.host, scope) {
                    Some(token) => {
                        req = req.header(AUTHORIZATION, format!("Bearer {}", token.expose()));
                        Sent::CachedToken(token)
                    }
                    None if registry_token.is_some() => {
                        let token = registry_token.map(Secret::expose).unwrap_or_default();
                        req = req.header(AUTHORIZATION, format!("Bearer {token}"));
                        Sent::RegistryToken
                    }
                    None if self.host_wants_basic(&ep.cfg.host) => {
                        match self.credentials(ep).await? {
                            Some(creds) => {
                                req = req.header(AUTHORIZATION, creds.basic_header());
                                Sent::Basic
                            }
                            None => Sent::Nothing,
                        }
                    }
                    None => Sent::Nothing,
                },
            };
            let resp = self.execute(req, ctx, priority).await?;
            let status = resp.status();
            if reauthenticated
                || !(status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN)
            {
                return Ok(resp);
            }
            reauthenticated = true;
            match self
                .authenticate(ep, ctx, scope, &resp, sent, priority)
                .await?
            {
                Some(authorization) => fresh_authorization = Some(authorization),
                None => return Ok(resp),
            }
        }
    }

    fn token_fetch_lock(&self, host: &str, scope: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.token_fetches.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            locks
                .entry((host.to_owned(), scope.to_owned()))
                .or_default(),
        )
    }

    /// The credentials for a host: from `auths`, else from its credential helper (asked
    /// once; a failed run is not remembered, so it is asked again next time).
    async fn credentials<'e>(
        &self,
        ep: &'e Endpoint,
    ) -> Result<Option<&'e Credentials>, RegistryError> {
        if let Some(creds) = &ep.credentials {
            return Ok(Some(creds));
        }
        let Some(helper) = &ep.helper else {
            return Ok(None);
        };
        let creds = ep
            .helper_credentials
            .get_or_try_init(|| self.run_credential_helper(helper, &ep.credentials_key))
            .await?;
        Ok(creds.as_ref())
    }

    /// Runs `docker-credential-<helper> get` (the docker credential-helper protocol: the
    /// server on stdin, `{"Username","Secret"}` on stdout). A helper that exits with an
    /// error has no credentials for the server; one that cannot be started is an error.
    async fn run_credential_helper(
        &self,
        helper: &str,
        registry: &str,
    ) -> Result<Option<Credentials>, RegistryError> {
        let config_path = self
            .docker_config
            .as_ref()
            .map(|c| c.path().to_owned())
            .unwrap_or_default();
        let fail = |reason: String| RegistryError::Config {
            path: config_path.clone(),
            reason,
        };
        if helper.is_empty()
            || !helper
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            || helper.starts_with('.')
        {
            return Err(fail(format!(
                "credential helper name {helper:?} may only contain letters, digits, '-', '_' and '.'"
            )));
        }
        let name = format!("docker-credential-{helper}");
        let program = match &self.options.credential_helper_dir {
            Some(dir) => dir.join(&name),
            None => PathBuf::from(&name),
        };
        let server = if registry == super::reference::DOCKER_HUB {
            "https://index.docker.io/v1/"
        } else {
            registry
        };
        let mut child = tokio::process::Command::new(&program)
            .arg("get")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                fail(format!(
                    "cannot run credential helper {} for {registry}: {e}; install it or \
                     put the credentials under \"auths\"",
                    program.display()
                ))
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            use tokio::io::AsyncWriteExt as _;
            // A helper that exits without reading its input is handled by its exit status.
            let _ = stdin.write_all(server.as_bytes()).await;
        }
        let output = tokio::time::timeout(self.options.request_timeout, child.wait_with_output())
            .await
            .map_err(|_| {
                fail(format!(
                    "credential helper {name} did not answer for {registry} within {:?}",
                    self.options.request_timeout
                ))
            })?
            .map_err(|e| {
                fail(format!(
                    "credential helper {name} failed for {registry}: {e}"
                ))
            })?;
        if !output.status.success() {
            tracing::info!(%registry, helper = %name, status = %output.status, "credential helper has no credentials; continuing anonymously");
            return Ok(None);
        }
        #[derive(serde::Deserialize)]
        struct HelperAnswer {
            #[serde(rename = "Username")]
            username: String,
            #[serde(rename = "Secret")]
            secret: String,
        }
        let answer: HelperAnswer = serde_json::from_slice(&output.stdout).map_err(|e| {
            fail(format!(
                "credential helper {name} for {registry}: {}",
                json_error_without_values("answer", &e)
            ))
        })?;
        // Docker's convention: user `<token>` means the secret is an identity token.
        Ok(Some(if answer.username == "<token>" {
            Credentials {
                identity_token: Some(Secret::new(answer.secret)),
                ..Credentials::default()
            }
        } else {
            Credentials::basic(answer.username, answer.secret)
        }))
    }

    fn host_wants_basic(&self, host: &str) -> bool {
        self.basic_hosts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(host)
    }

    /// Reacts to a 401/403: the `Authorization` value to retry with, or `None` when
    /// retrying cannot help (no credentials, or they were just refused).
    async fn authenticate(
        &self,
        ep: &Endpoint,
        ctx: &Ctx<'_>,
        scope: &str,
        resp: &Response,
        sent: Sent,
        priority: FetchPriority,
    ) -> Result<Option<String>, RegistryError> {
        if sent == Sent::RegistryToken {
            return Ok(None);
        }
        let challenges: Vec<Challenge> = resp
            .headers()
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(parse_www_authenticate)
            .collect();
        let bearer = challenges.iter().find_map(|c| match c {
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => Some((realm, service, scope)),
            Challenge::Basic { .. } => None,
        });
        if let Some((realm, service, challenge_scope)) = bearer {
            // One token fetch per host and scope at a time: readers refused together
            // share the token the first of them gets.
            let lock = self.token_fetch_lock(&ep.cfg.host, scope);
            let _fetching = lock.lock().await;
            if let Some(current) = self.tokens.get(&ep.cfg.host, scope)
                && sent != Sent::CachedToken(current.clone())
            {
                return Ok(Some(format!("Bearer {}", current.expose())));
            }
            let token_scope = challenge_scope.as_deref().unwrap_or(scope);
            let (token, lifetime) = self
                .fetch_token(ep, ctx, realm, service.as_deref(), token_scope, priority)
                .await?;
            let authorization = format!("Bearer {}", token.expose());
            self.tokens.insert(&ep.cfg.host, scope, token, lifetime);
            return Ok(Some(authorization));
        }
        if let Sent::CachedToken(_) = sent {
            // Refused without a new challenge: the token is no good any more.
            self.tokens.remove(&ep.cfg.host, scope);
        }
        let wants_basic = challenges
            .iter()
            .any(|c| matches!(c, Challenge::Basic { .. }));
        if !wants_basic || sent == Sent::Basic || sent == Sent::Fresh {
            return Ok(None);
        }
        match self.credentials(ep).await? {
            Some(creds) => {
                self.basic_hosts
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(ep.cfg.host.clone());
                Ok(Some(creds.basic_header()))
            }
            _ => Ok(None),
        }
    }

    async fn fetch_token(
        &self,
        ep: &Endpoint,
        ctx: &Ctx<'_>,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        priority: FetchPriority,
    ) -> Result<(Secret, Duration), RegistryError> {
        let token_error = |reason: String, transient: bool| RegistryError::Token {
            host: ctx.host.to_owned(),
            repository: ctx.repository.to_owned(),
            object: ctx.object.to_string(),
            realm: realm.to_owned(),
            reason,
            transient,
        };
        let realm_url = Url::parse(realm)
            .map_err(|e| token_error(format!("the realm is not a valid URL: {e}"), false))?;
        if !matches!(realm_url.scheme(), "http" | "https") {
            return Err(token_error("the realm is not an http(s) URL".into(), false));
        }
        let credentials = self.credentials(ep).await?;
        let mut resp = None;
        if let Some(refresh) = credentials.and_then(|c| c.identity_token.as_ref()) {
            // OAuth2 refresh-token grant, as docker does for `identitytoken` logins.
            let mut form = realm_url.clone();
            form.set_query(None);
            {
                let mut pairs = form.query_pairs_mut();
                pairs.append_pair("grant_type", "refresh_token");
                pairs.append_pair("refresh_token", refresh.expose());
                pairs.append_pair("client_id", "sluice");
                if let Some(service) = service {
                    pairs.append_pair("service", service);
                }
                pairs.append_pair("scope", scope);
            }
            let body = form.query().unwrap_or_default().to_owned();
            let req = ep
                .http
                .post(realm_url.clone())
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(body);
            let answer = self.execute(req, ctx, priority).await?;
            // A token server without OAuth2 support: fall back to the plain GET.
            if !matches!(answer.status().as_u16(), 404 | 405) {
                resp = Some(answer);
            }
        }
        let resp = match resp {
            Some(resp) => resp,
            None => {
                let mut url = realm_url;
                {
                    let mut query = url.query_pairs_mut();
                    if let Some(service) = service {
                        query.append_pair("service", service);
                    }
                    query.append_pair("scope", scope);
                }
                let mut req = ep.http.get(url);
                if let Some(creds) = credentials
                    && !creds.username.is_empty()
                {
                    req = req.header(AUTHORIZATION, creds.basic_header());
                }
                self.execute(req, ctx, priority).await?
            }
        };
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(RegistryError::Unauthorized {
                host: ctx.host.to_owned(),
                repository: ctx.repository.to_owned(),
                object: ctx.object.to_string(),
                status: status.as_u16(),
                hint: format!("token server {realm} refused: {}", self.auth_hint(ep)),
            });
        }
        if !status.is_success() {
            let transient = is_retryable_status(status);
            return Err(token_error(format!("HTTP {status}"), transient));
        }
        let body = self
            .read_body(resp, ctx, Some(MAX_TOKEN_RESPONSE_BYTES), priority)
            .await?;
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| token_error(json_error_without_values("token response", &e), false))?;
        parsed
            .into_token()
            .ok_or_else(|| token_error("the response has no token".into(), false))
    }

    /// Sends with the request timeout, counting the request.
    async fn execute(
        &self,
        req: RequestBuilder,
        ctx: &Ctx<'_>,
        priority: FetchPriority,
    ) -> Result<Response, RegistryError> {
        Metrics::add(self.counters(priority).0, 1);
        match tokio::time::timeout(self.options.request_timeout, req.send()).await {
            Err(_) => Err(ctx.timeout(self.options.request_timeout)),
            Ok(Err(e)) if e.is_timeout() => Err(ctx.timeout(self.options.request_timeout)),
            Ok(Err(e)) => Err(ctx.transport(e)),
            Ok(Ok(resp)) => Ok(resp),
        }
    }

    /// Reads a whole body, pausing at most the request timeout between pieces.
    async fn read_body(
        &self,
        mut resp: Response,
        ctx: &Ctx<'_>,
        limit: Option<u64>,
        priority: FetchPriority,
    ) -> Result<Bytes, RegistryError> {
        if let (Some(limit), Some(length)) = (limit, resp.content_length())
            && length > limit
        {
            return Err(ctx.too_large(limit));
        }
        let capacity = resp.content_length().unwrap_or(0).min(64 << 20) as usize;
        let mut body = BytesMut::with_capacity(capacity);
        let bytes_counter = self.counters(priority).1;
        while let Some(piece) = self.next_piece(&mut resp, ctx).await? {
            Metrics::add(bytes_counter, piece.len() as u64);
            body.extend_from_slice(&piece);
            if limit.is_some_and(|l| body.len() as u64 > l) {
                return Err(ctx.too_large(limit.unwrap_or_default()));
            }
        }
        Ok(body.freeze())
    }

    /// Keeps `range` of a full-body response and stops reading at its end.
    async fn read_window(
        &self,
        mut resp: Response,
        ctx: &Ctx<'_>,
        range: Range<u64>,
        priority: FetchPriority,
    ) -> Result<Bytes, RegistryError> {
        let wanted = range.end - range.start;
        let mut out = BytesMut::with_capacity(wanted as usize);
        let mut position = 0u64;
        let bytes_counter = self.counters(priority).1;
        while position < range.end {
            let Some(piece) = self.next_piece(&mut resp, ctx).await? else {
                return Err(short_body(ctx, out.len() as u64, wanted));
            };
            Metrics::add(bytes_counter, piece.len() as u64);
            let piece_start = position;
            let piece_end = position + piece.len() as u64;
            position = piece_end;
            let from = range.start.max(piece_start);
            let to = range.end.min(piece_end);
            if from < to {
                out.extend_from_slice(
                    &piece[(from - piece_start) as usize..(to - piece_start) as usize],
                );
            }
        }
        Ok(out.freeze())
    }

    async fn next_piece(
        &self,
        resp: &mut Response,
        ctx: &Ctx<'_>,
    ) -> Result<Option<Bytes>, RegistryError> {
        match tokio::time::timeout(self.options.request_timeout, resp.chunk()).await {
            Err(_) => Err(ctx.timeout(self.options.request_timeout)),
            Ok(Err(e)) if e.is_timeout() => Err(ctx.timeout(self.options.request_timeout)),
            Ok(Err(e)) => Err(ctx.transport(e)),
            Ok(Ok(piece)) => Ok(piece),
        }
    }

    fn status_error(&self, ep: &Endpoint, ctx: &Ctx<'_>, resp: &Response) -> RegistryError {
        let status = resp.status().as_u16();
        match status {
            404 => RegistryError::NotFound {
                host: ctx.host.to_owned(),
                repository: ctx.repository.to_owned(),
                object: ctx.object.to_string(),
            },
            401 | 403 => RegistryError::Unauthorized {
                host: ctx.host.to_owned(),
                repository: ctx.repository.to_owned(),
                object: ctx.object.to_string(),
                status,
                hint: self.auth_hint(ep),
            },
            _ => RegistryError::Status {
                host: ctx.host.to_owned(),
                repository: ctx.repository.to_owned(),
                object: ctx.object.to_string(),
                status,
                retry_after: header_str(resp.headers(), RETRY_AFTER.as_str())
                    .and_then(|v| parse_retry_after(v, SystemTime::now())),
            },
        }
    }

    /// Credentials given in the options for `registry`.
    fn configured_credentials(&self, registry: &str) -> Option<&Credentials> {
        let wanted = docker_config::normalize_key(registry);
        self.options
            .credentials
            .iter()
            .find(|(key, _)| docker_config::normalize_key(key) == wanted)
            .map(|(_, creds)| creds)
    }

    /// What to do about a refused request, given what credentials we had.
    fn auth_hint(&self, ep: &Endpoint) -> String {
        let key = &ep.credentials_key;
        if self.configured_credentials(key).is_some() {
            return format!(
                "check the credentials configured for {key} in sluice's registry settings, \
                 and that they may pull this repository"
            );
        }
        match (&self.docker_config, &self.docker_config_path) {
            (Some(config), _) => {
                let path = config.path().display();
                let from_helper = ep.helper_credentials.get().is_some_and(Option::is_some);
                if ep.credentials.is_some() {
                    format!(
                        "check credentials for {key} in {path}, and that they may pull this repository"
                    )
                } else if let Some(helper) = &ep.helper {
                    if from_helper {
                        format!(
                            "check the credentials for {key} kept by docker-credential-{helper} \
                             (named in {path}), and that they may pull this repository"
                        )
                    } else {
                        format!(
                            "docker-credential-{helper} (named in {path}) has no credentials for {key}: \
                             log in with docker login {key}"
                        )
                    }
                } else {
                    format!(
                        "no credentials for {key} in {path}: add them (docker login {key}) or check the repository name"
                    )
                }
            }
            (None, Some(path)) => format!(
                "no docker config at {}: run docker login {key} or pass a config file with credentials",
                path.display()
            ),
            (None, None) => {
                format!("no docker config found: pass a config file with credentials for {key}")
            }
        }
    }
}

/// Describes a JSON error by kind and position only: serde's message can quote the
/// offending value, which in a token response may be the token itself.
pub(crate) fn json_error_without_values(what: &str, error: &serde_json::Error) -> String {
    format!(
        "invalid {what} ({:?} error at line {} column {})",
        error.classify(),
        error.line(),
        error.column()
    )
}

/// A handshake the peer failed (bad certificate, not TLS at all): retrying cannot help.
/// The TLS stack reports these as `io::ErrorKind::InvalidData` inside the connect error.
fn is_tls_failure(error: &reqwest::Error) -> bool {
    if !error.is_connect() {
        return false;
    }
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        if let Some(io) = inner.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::InvalidData
        {
            return true;
        }
        source = inner.source();
    }
    false
}

fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn short_body(ctx: &Ctx<'_>, got: u64, wanted: u64) -> RegistryError {
    RegistryError::Transport {
        host: ctx.host.to_owned(),
        repository: ctx.repository.to_owned(),
        object: ctx.object.to_string(),
        reason: format!("the response ended after {got} of {wanted} bytes"),
    }
}

/// `bytes <first>-<last>/<total or *>` → (first, last, total).
fn parse_content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    let (span, total) = rest.split_once('/')?;
    let (first, last) = span.trim().split_once('-')?;
    let first: u64 = first.trim().parse().ok()?;
    let last: u64 = last.trim().parse().ok()?;
    if last < first {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((first, last, total))
}

/// One blob in one repository, readable by range: what the cache and filesystem see.
#[derive(Clone)]
pub struct RemoteBlob {
    client: Arc<RegistryClient>,
    repo: Repository,
    digest: Digest,
    size: u64,
}

impl fmt::Debug for RemoteBlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteBlob")
            .field("repository", &self.repo)
            .field("digest", &self.digest)
            .field("size", &self.size)
            .finish()
    }
}

impl RemoteBlob {
    pub fn repository(&self) -> &Repository {
        &self.repo
    }

    pub fn client(&self) -> &Arc<RegistryClient> {
        &self.client
    }
}

impl BlobSource for RemoteBlob {
    fn digest(&self) -> &Digest {
        &self.digest
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_range(
        &self,
        range: Range<u64>,
        priority: FetchPriority,
    ) -> BoxFuture<'_, Result<Bytes, BlobReadError>> {
        Box::pin(async move {
            self.client
                .read_range(&self.repo, &self.digest, self.size, range.clone(), priority)
                .await
                .map_err(|e| BlobReadError {
                    registry: e.host().unwrap_or(self.repo.registry()).to_owned(),
                    blob: format!("{} in {}", self.digest, self.repo),
                    start: range.start,
                    end: range.end,
                    transient: e.is_transient(),
                    reason: e.to_string(),
                })
        })
    }
}

/// Requests beyond the pull path, for the image converter (`crate::convert`) and the
/// pusher (`super::push`): they reuse the endpoints, authentication and retries above.
impl RegistryClient {
    /// Fetches a manifest or index by tag or digest from the first host able to resolve
    /// it; verifies it against the digest it was asked by (or the one the registry
    /// names). Returns the bytes, the served content type and the digest.
    pub(crate) async fn fetch_manifest(
        &self,
        repo: &Repository,
        reference: &str,
    ) -> Result<(Bytes, Option<String>, Digest), RegistryError> {
        let pinned: Option<Digest> = reference.parse().ok();
        let need = if pinned.is_some() {
            Need::Pull
        } else {
            Need::Resolve
        };
        let endpoints = self.endpoints(repo.registry())?;
        let (bytes, content_type, digest, _) = self
            .across_endpoints(&endpoints, need, self.options.on_demand_retries, |ep| {
                self.fetch_manifest_once(ep, repo, reference, pinned.as_ref())
            })
            .await?;
        Ok((bytes, content_type, digest))
    }

    /// Sends a request built by `build` (given the HTTP client and the registry's API
    /// base URL ending in `/v2/`) to the upstream host of `repo` (pushes never go to
    /// mirrors), with push authorization; retries network failures, 429 and 5xx.
    /// Other statuses are returned for the caller to judge with [`Self::push_status_error`].
    pub(crate) async fn send_push<F>(
        &self,
        repo: &Repository,
        object: &str,
        build: F,
    ) -> Result<Response, RegistryError>
    where
        F: Fn(&reqwest::Client, &Url) -> RequestBuilder,
    {
        let endpoints = self.endpoints(repo.registry())?;
        let Some(ep) = endpoints.iter().rfind(|ep| !ep.cfg.is_mirror) else {
            return Err(RegistryError::HttpClient {
                host: repo.registry().to_owned(),
                reason: "no upstream host to push to".into(),
            });
        };
        let base =
            Url::parse(&format!("{}/", ep.cfg.api_base.trim_end_matches('/'))).map_err(|e| {
                RegistryError::HttpClient {
                    host: ep.cfg.host.clone(),
                    reason: format!("API base {:?} is not a URL: {e}", ep.cfg.api_base),
                }
            })?;
        let ctx = Ctx {
            host: &ep.cfg.host,
            repository: repo.name(),
            object: Object::Push(object),
        };
        let scope = format!("repository:{}:pull,push", repo.name());
        self.with_retries(self.options.on_demand_retries, || async {
            let resp = self
                .send_with_auth(ep, &ctx, &scope, FetchPriority::OnDemand, || {
                    build(&ep.http, &base)
                })
                .await?;
            let status = resp.status();
            if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
                return Err(self.status_error(ep, &ctx, &resp));
            }
            Ok(resp)
        })
        .await
    }

    /// The error for an unexpected status of a push request.
    pub(crate) fn push_status_error(
        &self,
        repo: &Repository,
        object: &str,
        resp: &Response,
    ) -> RegistryError {
        let endpoints = self.endpoints(repo.registry());
        let ctx = Ctx {
            host: repo.registry(),
            repository: repo.name(),
            object: Object::Push(object),
        };
        match endpoints
            .as_ref()
            .ok()
            .and_then(|eps| eps.iter().rfind(|ep| !ep.cfg.is_mirror))
        {
            Some(ep) => self.status_error(ep, &ctx, resp),
            None => RegistryError::Status {
                host: repo.registry().to_owned(),
                repository: repo.name().to_owned(),
                object: object.to_owned(),
                status: resp.status().as_u16(),
                retry_after: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parsing() {
        assert_eq!(
            parse_content_range("bytes 0-99/1000"),
            Some((0, 99, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 5-5/*"), Some((5, 5, None)));
        for bad in [
            "",
            "bytes",
            "bytes 9-1/10",
            "items 0-1/2",
            "bytes -1/2",
            "bytes 0-1/x",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn debug_hides_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"auths":{"127.0.0.1:5000":{"username":"u","password":"topsecret"}}}"#,
        )
        .unwrap();
        let client = RegistryClient::new(
            RegistryOptions {
                docker_config: Some(path),
                ..RegistryOptions::default()
            },
            Arc::default(),
        )
        .unwrap();
        let repo = Repository::new("127.0.0.1:5000", "a/b").unwrap();
        let _ = client.endpoints(repo.registry()).unwrap();
        let shown = format!(
            "{client:?} {:?}",
            client.remote_blob(repo, Digest::sha256_of(b""), 0)
        );
        assert!(!shown.contains("topsecret"), "{shown}");
    }
}

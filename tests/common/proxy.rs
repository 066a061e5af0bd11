//! A fault-injecting HTTP/1.1 proxy on loopback, placed between the code under test and
//! a `TestRegistry`. It counts what it serves, can corrupt the bytes of chosen blob
//! ranges (to prove chunk verification), and can stop answering (to prove timeouts).
//!
//! It runs its own tokio runtime on a dedicated thread, so it works the same from plain
//! `#[test]`s and from `#[tokio::test]`s that block.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Corrupt response bytes of `digest` that fall in `range` (blob offsets, end exclusive).
#[derive(Debug, Clone)]
struct CorruptRule {
    digest: String,
    range: Range<u64>,
}

/// One request as seen by the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyRecord {
    pub method: String,
    pub path: String,
    /// The `Range` header, if any.
    pub range: Option<String>,
    pub status: u16,
    /// Response body bytes sent to the client.
    pub bytes: u64,
    /// Whether some of those bytes were deliberately corrupted.
    pub corrupted: bool,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    bytes: AtomicU64,
    corrupted_responses: AtomicU64,
}

struct Shared {
    upstream: SocketAddr,
    counters: Counters,
    records: Mutex<Vec<ProxyRecord>>,
    corrupt: Mutex<Vec<CorruptRule>>,
    hang: watch::Sender<bool>,
    stall_mid_body: watch::Sender<bool>,
    /// `(remaining, status)`: answer that many upcoming requests with `status`.
    failures: Mutex<(u64, u16)>,
}

/// A running proxy. Stopped on drop.
pub struct TestProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestProxy {
    /// Listen on a free 127.0.0.1 port and forward every request to `upstream`.
    pub fn start(upstream: SocketAddr) -> TestProxy {
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy on 127.0.0.1");
        std_listener
            .set_nonblocking(true)
            .expect("make proxy listener non-blocking");
        let addr = std_listener.local_addr().expect("proxy listener address");
        let (hang, _) = watch::channel(false);
        let (stall_mid_body, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            upstream,
            counters: Counters::default(),
            records: Mutex::new(Vec::new()),
            corrupt: Mutex::new(Vec::new()),
            hang,
            stall_mid_body,
            failures: Mutex::new((0, 0)),
        });
        let (shutdown, shutdown_rx) = oneshot::channel();
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("test-proxy-{}", addr.port()))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("build proxy runtime");
                runtime.block_on(async move {
                    let listener =
                        TcpListener::from_std(std_listener).expect("register proxy listener");
                    tokio::select! {
                        _ = shutdown_rx => {}
                        _ = accept_loop(listener, thread_shared) => {}
                    }
                });
                // Hung connections must not keep the test waiting.
                runtime.shutdown_background();
            })
            .expect("spawn proxy thread");
        TestProxy {
            addr,
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`, usable as the registry host of an image reference.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> u64 {
        self.shared.counters.requests.load(Ordering::SeqCst)
    }

    /// Response body bytes sent to clients so far.
    pub fn served_bytes(&self) -> u64 {
        self.shared.counters.bytes.load(Ordering::SeqCst)
    }

    /// Responses in which the proxy corrupted at least one byte.
    pub fn corrupted_responses(&self) -> u64 {
        self.shared
            .counters
            .corrupted_responses
            .load(Ordering::SeqCst)
    }

    pub fn records(&self) -> Vec<ProxyRecord> {
        self.shared.records.lock().unwrap().clone()
    }

    pub fn reset_counters(&self) {
        let counters = &self.shared.counters;
        counters.requests.store(0, Ordering::SeqCst);
        counters.bytes.store(0, Ordering::SeqCst);
        counters.corrupted_responses.store(0, Ordering::SeqCst);
        self.shared.records.lock().unwrap().clear();
    }

    /// From now on, flip every bit of the response bytes that lie in `range` (offsets
    /// within the blob) whenever blob `digest` (`sha256:...`) is read, by range or whole.
    pub fn corrupt_blob_range(&self, digest: &str, range: Range<u64>) {
        self.shared.corrupt.lock().unwrap().push(CorruptRule {
            digest: digest.to_string(),
            range,
        });
    }

    pub fn clear_corruption(&self) {
        self.shared.corrupt.lock().unwrap().clear();
    }

    /// Answer the next `count` requests with `status` (e.g. 503) and an empty body,
    /// without contacting the registry.
    pub fn fail_next(&self, count: u64, status: u16) {
        *self.shared.failures.lock().unwrap() = (count, status);
    }

    /// While true, connections are accepted and requests read, but nothing is answered.
    /// Switching back to false lets the held requests proceed.
    pub fn set_hang(&self, hang: bool) {
        self.shared.hang.send_replace(hang);
    }

    /// While true, responses send their headers and the first half of their body, then
    /// stall (connection open) until switched back to false, which sends the rest.
    pub fn set_stall_mid_body(&self, stall: bool) {
        self.shared.stall_mid_body.send_replace(stall);
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let _ = serve_connection(stream, shared).await;
        });
    }
}

struct Head {
    start_line: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn is_chunked(&self) -> bool {
        self.header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }

    fn content_length(&self) -> Option<u64> {
        self.header("content-length")
            .and_then(|v| v.trim().parse().ok())
    }
}

/// Read a request or response head; None at a clean end of stream.
async fn read_head<R: AsyncBufReadExt + Unpin>(reader: &mut R) -> std::io::Result<Option<Head>> {
    let mut start_line = String::new();
    if reader.read_line(&mut start_line).await? == 0 {
        return Ok(None);
    }
    let mut headers = Vec::new();
    let mut total = start_line.len();
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).await?;
        total += n;
        if n == 0 || total > MAX_HEAD_BYTES {
            return Err(std::io::Error::other("truncated or oversized HTTP head"));
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    Ok(Some(Head {
        start_line: start_line.trim_end_matches(['\r', '\n']).to_string(),
        headers,
    }))
}

/// Read a message body framed by chunked encoding, Content-Length, or (for responses
/// only, `until_eof`) the end of the stream.
async fn read_body<R: AsyncBufReadExt + Unpin>(
    reader: &mut R,
    head: &Head,
    until_eof: bool,
) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    if head.is_chunked() {
        loop {
            let mut size_line = String::new();
            reader.read_line(&mut size_line).await?;
            let size_text = size_line.trim().split(';').next().unwrap_or("");
            let size = usize::from_str_radix(size_text, 16)
                .map_err(|_| std::io::Error::other("bad chunk size"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    let mut trailer = String::new();
                    if reader.read_line(&mut trailer).await? == 0 || trailer.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..]).await?;
            let mut crlf = [0u8; 2];
            reader.read_exact(&mut crlf).await?;
        }
    } else if let Some(length) = head.content_length() {
        body.resize(length as usize, 0);
        reader.read_exact(&mut body).await?;
    } else if until_eof {
        reader.read_to_end(&mut body).await?;
    }
    Ok(body)
}

fn is_hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "content-length",
        "te",
        "trailer",
        "upgrade",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) -> std::io::Result<()> {
    let (read_half, mut write_half) = stream.into_split();
    let mut reader = BufReader::new(read_half);
    while let Some(request) = read_head(&mut reader).await? {
        let request_body = read_body(&mut reader, &request, false).await?;

        let mut hang = shared.hang.subscribe();
        // Holds the request until hanging is switched off; the connection stays open.
        hang.wait_for(|hanging| !*hanging)
            .await
            .map_err(|_| std::io::Error::other("proxy shutting down"))?;

        let mut parts = request.start_line.split(' ');
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let client_version = parts.next().unwrap_or("HTTP/1.1").to_string();
        let client_wants_close = client_version == "HTTP/1.0"
            || request
                .header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close"));

        let injected_failure = {
            let mut failures = shared.failures.lock().unwrap();
            if failures.0 > 0 {
                failures.0 -= 1;
                Some(failures.1)
            } else {
                None
            }
        };
        let (response, mut response_body) = match injected_failure {
            Some(status) => (
                Head {
                    start_line: format!("HTTP/1.1 {status} Injected Failure"),
                    headers: Vec::new(),
                },
                Vec::new(),
            ),
            None => forward(&shared.upstream, &request, &method, &path, &request_body).await?,
        };
        let status: u16 = response
            .start_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);

        let corrupted = corrupt_if_matching(&shared, &path, &response, &mut response_body);

        let mut out = format!("{}\r\n", response.start_line);
        for (name, value) in &response.headers {
            if !is_hop_by_hop(name) {
                out.push_str(&format!("{name}: {value}\r\n"));
            }
        }
        let body_len = response_body.len() as u64;
        if method == "HEAD" {
            if let Some(length) = response.content_length() {
                out.push_str(&format!("Content-Length: {length}\r\n"));
            }
        } else if !(status == 204 || status == 304 || (100..200).contains(&status)) {
            out.push_str(&format!("Content-Length: {body_len}\r\n"));
        }
        if client_wants_close {
            out.push_str("Connection: close\r\n");
        }
        out.push_str("\r\n");

        // Account before answering, so a client that has its response also sees it
        // counted.
        let sent = if method == "HEAD" { 0 } else { body_len };
        shared.counters.requests.fetch_add(1, Ordering::SeqCst);
        shared.counters.bytes.fetch_add(sent, Ordering::SeqCst);
        if corrupted {
            shared
                .counters
                .corrupted_responses
                .fetch_add(1, Ordering::SeqCst);
        }
        shared.records.lock().unwrap().push(ProxyRecord {
            method: method.clone(),
            path,
            range: request.header("range").map(str::to_string),
            status,
            bytes: sent,
            corrupted,
        });
        write_half.write_all(out.as_bytes()).await?;
        if method != "HEAD" {
            let mut stall = shared.stall_mid_body.subscribe();
            let mut rest = &response_body[..];
            if *stall.borrow_and_update() && response_body.len() > 1 {
                let (first, second) = response_body.split_at(response_body.len() / 2);
                write_half.write_all(first).await?;
                write_half.flush().await?;
                stall
                    .wait_for(|stalled| !*stalled)
                    .await
                    .map_err(|_| std::io::Error::other("proxy shutting down"))?;
                rest = second;
            }
            write_half.write_all(rest).await?;
        }
        write_half.flush().await?;
        if client_wants_close {
            break;
        }
    }
    Ok(())
}

/// Send one request upstream on a fresh connection and read the whole response.
async fn forward(
    upstream: &SocketAddr,
    request: &Head,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(Head, Vec<u8>)> {
    let mut upstream_stream = TcpStream::connect(upstream).await?;
    let mut out = format!("{method} {path} HTTP/1.1\r\n");
    for (name, value) in &request.headers {
        if !is_hop_by_hop(name) {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    if !body.is_empty() || request.content_length().is_some() || request.is_chunked() {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("Connection: close\r\n\r\n");
    upstream_stream.write_all(out.as_bytes()).await?;
    upstream_stream.write_all(body).await?;
    upstream_stream.flush().await?;

    let mut reader = BufReader::new(upstream_stream);
    let response = read_head(&mut reader)
        .await?
        .ok_or_else(|| std::io::Error::other("upstream closed without a response"))?;
    let status: u16 = response
        .start_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let no_body =
        method == "HEAD" || status == 204 || status == 304 || (100..200).contains(&status);
    let response_body = if no_body {
        Vec::new()
    } else {
        read_body(&mut reader, &response, true).await?
    };
    Ok((response, response_body))
}

/// Offset within the blob of the first response byte: from `Content-Range` for 206,
/// zero for a whole-blob 200.
fn response_blob_offset(response: &Head, status: u16) -> Option<u64> {
    match status {
        200 => Some(0),
        206 => {
            let value = response.header("content-range")?;
            let spec = value.trim().strip_prefix("bytes")?.trim();
            spec.split('-').next()?.trim().parse().ok()
        }
        _ => None,
    }
}

fn corrupt_if_matching(shared: &Shared, path: &str, response: &Head, body: &mut [u8]) -> bool {
    let Some((_, digest)) = path.split_once("/blobs/") else {
        return false;
    };
    let digest = digest.split('?').next().unwrap_or(digest);
    let status: u16 = response
        .start_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let Some(offset) = response_blob_offset(response, status) else {
        return false;
    };
    let rules = shared.corrupt.lock().unwrap();
    let mut corrupted = false;
    for rule in rules.iter().filter(|r| r.digest == digest) {
        let served = offset..offset + body.len() as u64;
        let start = rule.range.start.max(served.start);
        let end = rule.range.end.min(served.end);
        if start < end {
            for byte in &mut body[(start - offset) as usize..(end - offset) as usize] {
                *byte ^= 0xff;
            }
            corrupted = true;
        }
    }
    corrupted
}

//! A real OCI registry (Debian's `docker-registry`, distribution 2.8) on a free loopback
//! port, with request/byte accounting taken from its own access log.
//!
//! distribution writes one Apache "combined" line per response, e.g.
//! `127.0.0.1 - - [30/Nov/2026:00:32:44 +0000] "GET /v2/x/blobs/sha256:.. HTTP/1.1" 206 4096 "" "ua"`,
//! where the number after the status is the body bytes it wrote. Counting at the registry
//! (not in the client under test) is what makes "fetched only N bytes" assertions honest.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tempfile::TempDir;

use super::{free_port, http_get_status, run_command, short_tempdir, wait_until};

/// Path prefix of the marker requests used to flush the access log; never counted.
const MARK_PATH: &str = "/v2/?sluice-harness-mark=";

#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Require HTTP basic auth with this user and password (bcrypt htpasswd file).
    pub htpasswd: Option<(String, String)>,
    /// Serve HTTPS with this certificate and key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// One line of the registry access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRecord {
    pub method: String,
    /// Request URI as sent (path and query).
    pub uri: String,
    pub status: u16,
    /// Response body bytes the registry wrote.
    pub bytes: u64,
}

impl AccessRecord {
    /// The digest if this is a blob request (`/v2/<name>/blobs/<digest>`).
    pub fn blob_digest(&self) -> Option<&str> {
        let (_, digest) = self.uri.split_once("/blobs/")?;
        digest.starts_with("sha256:").then_some(digest)
    }
}

/// Totals over a stretch of the access log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub requests: u64,
    pub bytes: u64,
}

/// A position in the access log; `TestRegistry::since` reports what happened after it.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogMark(usize);

#[derive(Default)]
struct LogState {
    records: Vec<AccessRecord>,
    highest_mark: u64,
}

#[derive(Default)]
struct AccessLog {
    state: Mutex<LogState>,
    changed: Condvar,
}

impl AccessLog {
    fn ingest(&self, line: &str) {
        let Some(record) = parse_access_line(line) else {
            return;
        };
        let mut state = self.state.lock().unwrap();
        if let Some(mark) = record.uri.strip_prefix(MARK_PATH) {
            if let Ok(mark) = mark.parse::<u64>() {
                state.highest_mark = state.highest_mark.max(mark);
            }
        } else {
            state.records.push(record);
        }
        self.changed.notify_all();
    }
}

/// Parse an Apache combined log line; None for every other line the registry prints.
fn parse_access_line(line: &str) -> Option<AccessRecord> {
    let (_, rest) = line.split_once("] \"")?;
    let (request, rest) = rest.split_once("\" ")?;
    let mut request = request.split(' ');
    let method = request.next()?.to_string();
    let uri = request.next()?.to_string();
    if !request.next()?.starts_with("HTTP/") {
        return None;
    }
    let mut fields = rest.split(' ');
    let status = fields.next()?.parse().ok()?;
    let bytes = match fields.next()? {
        "-" => 0,
        n => n.parse().ok()?,
    };
    Some(AccessRecord {
        method,
        uri,
        status,
        bytes,
    })
}

/// A running `docker-registry`. Killed on drop (also when the test panics).
///
/// Every method takes `&self`, so a test can share it (e.g. in an `Arc`) and stop the
/// registry from one thread while another reads through it.
pub struct TestRegistry {
    dir: TempDir,
    port: AtomicU16,
    options: RegistryOptions,
    child: Mutex<Option<Child>>,
    log: Arc<AccessLog>,
    next_mark: AtomicU64,
}

impl TestRegistry {
    /// Start a registry with fresh storage on a free port and wait until `/v2/` answers.
    pub fn start(options: RegistryOptions) -> TestRegistry {
        let dir = short_tempdir("sluice-reg-");
        std::fs::create_dir_all(dir.path().join("storage")).expect("create registry storage dir");
        if let Some((user, password)) = &options.htpasswd {
            let htpasswd = run_command(Command::new("htpasswd").args(["-Bbn", user, password]))
                .expect("htpasswd (apache2-utils) must be installed");
            std::fs::write(dir.path().join("htpasswd"), htpasswd).expect("write htpasswd file");
        }
        let registry = TestRegistry {
            dir,
            port: AtomicU16::new(free_port()),
            options,
            child: Mutex::new(None),
            log: Arc::new(AccessLog::default()),
            next_mark: AtomicU64::new(0),
        };
        let mut last_error = String::new();
        // Another process may grab the free port between probing and binding: retry.
        for _ in 0..5 {
            match registry.spawn() {
                Ok(()) => return registry,
                Err(e) => {
                    last_error = e;
                    registry.port.store(free_port(), Ordering::SeqCst);
                }
            }
        }
        panic!("docker-registry did not start: {last_error}");
    }

    fn write_config(&self) -> PathBuf {
        let storage = self.storage_dir();
        let auth = match &self.options.htpasswd {
            Some(_) => format!(
                "auth:\n  htpasswd:\n    realm: sluice-test\n    path: {}\n",
                self.dir.path().join("htpasswd").display()
            ),
            None => String::new(),
        };
        let tls = match &self.options.tls {
            Some((certificate, key)) => format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                certificate.display(),
                key.display()
            ),
            None => String::new(),
        };
        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n  \
             maintenance:\n    uploadpurging:\n      enabled: false\n\
             {auth}\
             http:\n  addr: 127.0.0.1:{port}\n  secret: sluice-test\n  \
             headers:\n    X-Content-Type-Options: [nosniff]\n{tls}",
            storage = storage.display(),
            port = self.port(),
        );
        let path = self.dir.path().join("config.yml");
        std::fs::write(&path, config).expect("write registry config");
        path
    }

    fn port(&self) -> u16 {
        self.port.load(Ordering::SeqCst)
    }

    fn spawn(&self) -> Result<(), String> {
        let config = self.write_config();
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawning docker-registry (is it installed?): {e}"))?;
        let server_log = self.dir.path().join("registry.log");
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = Arc::clone(&self.log);
            let server_log = server_log.clone();
            std::thread::spawn(move || pump_log(stream, &log, &server_log));
        }
        *self.child.lock().unwrap() = Some(child);
        let addr = self.addr();
        let ready = wait_until(Duration::from_secs(15), || {
            if self.exited() {
                return true;
            }
            // Over TLS a plain probe gets no status line; a connection is enough there.
            if self.options.tls.is_some() {
                std::net::TcpStream::connect(addr).is_ok()
            } else {
                http_get_status(addr, "/v2/").is_ok()
            }
        });
        if !ready || self.exited() {
            self.kill();
            let log = std::fs::read_to_string(&server_log).unwrap_or_default();
            return Err(format!("port {}; registry log:\n{log}", self.port()));
        }
        Ok(())
    }

    fn exited(&self) -> bool {
        match &mut *self.child.lock().unwrap() {
            Some(child) => !matches!(child.try_wait(), Ok(None)),
            None => true,
        }
    }

    fn kill(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port()))
    }

    /// `127.0.0.1:PORT`, the host part of image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port())
    }

    /// `http://127.0.0.1:PORT` (`https://` when serving TLS).
    pub fn url(&self) -> String {
        let scheme = if self.options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.host())
    }

    pub fn credentials(&self) -> Option<(String, String)> {
        self.options.htpasswd.clone()
    }

    /// Where the registry keeps its blobs; survives `stop()`/`restart()`.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Kill the registry (SIGKILL, like a crash). Connections in flight are cut.
    pub fn stop(&self) {
        self.kill();
    }

    /// Start it again on the same port with the same storage.
    pub fn restart(&self) {
        self.kill();
        let mut last_error = String::new();
        // The old listener's port may linger briefly; retry a few times.
        for _ in 0..10 {
            match self.spawn() {
                Ok(()) => return,
                Err(e) => last_error = e,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("docker-registry did not restart: {last_error}");
    }

    pub fn is_running(&self) -> bool {
        !self.exited()
    }

    /// Wait until every response completed so far is in the access log: send a marker
    /// request and wait for its line. Only effective while the registry runs.
    fn sync(&self) {
        if self.exited() {
            return;
        }
        let mark = self.next_mark.fetch_add(1, Ordering::SeqCst) + 1;
        if http_get_status(self.addr(), &format!("{MARK_PATH}{mark}")).is_err() {
            return;
        }
        let state = self.log.state.lock().unwrap();
        let (_state, _timeout) = self
            .log
            .changed
            .wait_timeout_while(state, Duration::from_secs(5), |s| s.highest_mark < mark)
            .unwrap();
    }

    /// Every access-log record so far (marker requests excluded).
    pub fn access_log(&self) -> Vec<AccessRecord> {
        self.sync();
        self.log.state.lock().unwrap().records.clone()
    }

    /// Requests the registry has answered so far.
    pub fn requests(&self) -> u64 {
        self.since(LogMark(0)).requests
    }

    /// Response body bytes the registry has written so far.
    pub fn served_bytes(&self) -> u64 {
        self.since(LogMark(0)).bytes
    }

    /// Current end of the access log.
    pub fn mark(&self) -> LogMark {
        self.sync();
        LogMark(self.log.state.lock().unwrap().records.len())
    }

    /// Totals of the requests answered after `mark`.
    pub fn since(&self, mark: LogMark) -> Usage {
        self.records_since(mark)
            .iter()
            .fold(Usage::default(), |usage, record| Usage {
                requests: usage.requests + 1,
                bytes: usage.bytes + record.bytes,
            })
    }

    /// The records answered after `mark`.
    pub fn records_since(&self, mark: LogMark) -> Vec<AccessRecord> {
        self.sync();
        let state = self.log.state.lock().unwrap();
        state.records.get(mark.0..).unwrap_or_default().to_vec()
    }

    /// Bytes served for one blob (GET bodies) after `mark`.
    pub fn blob_bytes_since(&self, mark: LogMark, digest: &str) -> u64 {
        self.records_since(mark)
            .iter()
            .filter(|r| r.method == "GET" && r.blob_digest() == Some(digest))
            .map(|r| r.bytes)
            .sum()
    }

    /// Forget all records; counters restart at zero.
    pub fn reset_counters(&self) {
        self.sync();
        self.log.state.lock().unwrap().records.clear();
    }

    /// Upload `data` as a blob of repository `repo` (POST, then one monolithic PUT)
    /// and return its digest. Uses curl so it works outside any async runtime.
    pub fn upload_blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = format!("sha256:{}", super::sha256_hex(data));
        let file = tempfile::NamedTempFile::new().expect("temp file for blob upload");
        std::fs::write(file.path(), data).expect("write blob to upload");
        let credentials = self
            .options
            .htpasswd
            .as_ref()
            .map(|(user, password)| format!("{user}:{password}"));
        let curl = || {
            let mut curl = Command::new("curl");
            curl.args(["-sS", "-f"]);
            if let Some(credentials) = &credentials {
                curl.args(["-u", credentials]);
            }
            curl
        };
        let headers = run_command(
            curl()
                .args(["-X", "POST", "-D", "-", "-o", "/dev/null"])
                .arg(format!("{}/v2/{repo}/blobs/uploads/", self.url())),
        )
        .unwrap_or_else(|e| panic!("starting blob upload to {}: {e}", self.host()));
        let location = headers
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("location")
                    .then(|| value.trim().to_string())
            })
            .unwrap_or_else(|| panic!("no Location in upload response: {headers}"));
        let separator = if location.contains('?') { '&' } else { '?' };
        run_command(
            curl()
                .args(["-X", "PUT", "-H", "Content-Type: application/octet-stream"])
                .arg("--data-binary")
                .arg(format!("@{}", file.path().display()))
                .arg(format!("{location}{separator}digest={digest}")),
        )
        .unwrap_or_else(|e| panic!("finishing blob upload to {}: {e}", self.host()));
        digest
    }

    /// Delete a blob from repository `repo` (the registry runs with deletes enabled), so
    /// later reads of it get 404 — e.g. to prove that cached data no longer needs it.
    pub fn delete_blob(&self, repo: &str, digest: &str) {
        let mut curl = Command::new("curl");
        curl.args(["-sS", "-f", "-X", "DELETE"]);
        if let Some((user, password)) = &self.options.htpasswd {
            curl.args(["-u", &format!("{user}:{password}")]);
        }
        curl.arg(format!("{}/v2/{repo}/blobs/{digest}", self.url()));
        run_command(&mut curl)
            .unwrap_or_else(|e| panic!("deleting blob {digest} from {}: {e}", self.host()));
    }

    /// Path of the server's own log (non-access lines), for debugging failed tests.
    pub fn server_log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.kill();
    }
}

fn pump_log(stream: Box<dyn Read + Send>, log: &AccessLog, server_log: &Path) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(server_log)
        .ok();
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        if let Some(file) = file.as_mut() {
            let _ = writeln!(file, "{line}");
        }
        log.ingest(&line);
    }
}

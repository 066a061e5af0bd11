//! The benchmark's private network: a network namespace holding the registry, a veth
//! pair into it with addresses only we use, `tbf` rate limits on both ends, and a TCP
//! proxy inside the namespace that adds the round-trip time (the kernel here has no
//! `netem`). Everything is removed when [`ShapedNetwork`] is dropped.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{BenchError, command_output};

/// A network profile: rate and round-trip time between the host and the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkProfile {
    /// 1 Gbit/s, 0.5 ms RTT.
    Lan,
    /// 100 Mbit/s, 20 ms RTT.
    Dc,
    /// 20 Mbit/s, 50 ms RTT.
    Slow,
    /// Registry on the host's loopback, unshaped.
    None,
}

impl NetworkProfile {
    /// Rate in bits per second and round-trip time; `None` for the unshaped profile.
    pub fn shape(self) -> Option<(u64, Duration)> {
        match self {
            NetworkProfile::Lan => Some((1_000_000_000, Duration::from_micros(500))),
            NetworkProfile::Dc => Some((100_000_000, Duration::from_millis(20))),
            NetworkProfile::Slow => Some((20_000_000, Duration::from_millis(50))),
            NetworkProfile::None => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            NetworkProfile::Lan => "lan",
            NetworkProfile::Dc => "dc",
            NetworkProfile::Slow => "slow",
            NetworkProfile::None => "none",
        }
    }

    /// Human description for reports.
    pub fn describe(self) -> String {
        match self.shape() {
            Some((rate, rtt)) => format!(
                "{} ({} Mbit/s, {} ms RTT)",
                self.name(),
                rate / 1_000_000,
                rtt.as_secs_f64() * 1000.0
            ),
            None => "none (loopback, unshaped)".to_owned(),
        }
    }
}

impl std::str::FromStr for NetworkProfile {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "lan" => Ok(NetworkProfile::Lan),
            "dc" => Ok(NetworkProfile::Dc),
            "slow" => Ok(NetworkProfile::Slow),
            "none" => Ok(NetworkProfile::None),
            other => Err(format!("unknown network {other:?}: lan, dc, slow or none")),
        }
    }
}

/// Port the delaying proxy listens on inside the namespace (on the veth address).
const PROXY_PORT: u16 = 5000;

/// A namespace + veth pair + tbf + delay proxy. Drop tears it all down.
pub struct ShapedNetwork {
    namespace: String,
    host_link: String,
    namespace_fd: OwnedFd,
    /// The address containerd and sluice use for the registry (the proxy).
    pub public_addr: SocketAddr,
    proxy: Option<DelayProxy>,
}

fn ip(args: &[&str]) -> Result<String, BenchError> {
    command_output(Command::new("ip").args(args))
}

fn tc(args: &[&str]) -> Result<String, BenchError> {
    command_output(Command::new("tc").args(args))
}

impl ShapedNetwork {
    /// Create the namespace and links for `profile` (which must be shaped). The
    /// delay proxy is started later with [`ShapedNetwork::start_proxy`], once the
    /// registry listens inside the namespace.
    pub fn create(rate_bits: u64) -> Result<ShapedNetwork, BenchError> {
        let pid = std::process::id();
        let namespace = format!("sluice-bench-{pid}");
        let host_link = format!("sbh{pid}");
        let ns_link = format!("sbn{pid}");
        let subnet = pick_subnet()?;
        let host_ip = Ipv4Addr::new(10, 213, subnet, 1);
        let ns_ip = Ipv4Addr::new(10, 213, subnet, 2);
        ip(&["netns", "add", &namespace])?;
        // From here on, a failure still removes what was made: build the guard first.
        let namespace_fd = match std::fs::File::open(format!("/run/netns/{namespace}")) {
            Ok(file) => OwnedFd::from(file),
            Err(source) => {
                let _ = ip(&["netns", "del", &namespace]);
                return Err(BenchError::Io {
                    what: format!("opening /run/netns/{namespace}"),
                    source,
                });
            }
        };
        let network = ShapedNetwork {
            namespace: namespace.clone(),
            host_link: host_link.clone(),
            namespace_fd,
            public_addr: SocketAddr::V4(SocketAddrV4::new(ns_ip, PROXY_PORT)),
            proxy: None,
        };
        ip(&[
            "link", "add", &host_link, "type", "veth", "peer", "name", &ns_link,
        ])?;
        ip(&["link", "set", &ns_link, "netns", &namespace])?;
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_link])?;
        ip(&["link", "set", &host_link, "up"])?;
        let in_ns = |args: &[&str]| {
            let mut all = vec!["netns", "exec", namespace.as_str(), "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        in_ns(&["addr", "add", &format!("{ns_ip}/30"), "dev", &ns_link])?;
        in_ns(&["link", "set", &ns_link, "up"])?;
        in_ns(&["link", "set", "lo", "up"])?;
        // tbf needs a bucket of at least rate/HZ; 10 ms of traffic covers HZ >= 100.
        let rate = format!("{}bit", rate_bits);
        let burst = format!("{}", (rate_bits / 8 / 100).max(32 * 1024));
        for (namespace_arg, link) in [(None, host_link.as_str()), (Some(&namespace), &ns_link)] {
            let mut args: Vec<&str> = Vec::new();
            if let Some(ns) = namespace_arg {
                args.extend(["-n", ns.as_str()]);
            }
            args.extend([
                "qdisc", "add", "dev", link, "root", "tbf", "rate", &rate, "burst", &burst,
                "latency", "100ms",
            ]);
            tc(&args)?;
        }
        Ok(network)
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// File descriptor of the namespace, for `setns` in children and threads.
    pub fn namespace_fd(&self) -> i32 {
        self.namespace_fd.as_raw_fd()
    }

    /// Start the delaying proxy inside the namespace in front of `upstream` (an
    /// address inside the namespace).
    pub fn start_proxy(&mut self, upstream: SocketAddr, rtt: Duration) -> Result<(), BenchError> {
        self.proxy = Some(DelayProxy::start(
            self.namespace_fd(),
            self.public_addr,
            upstream,
            rtt,
        )?);
        Ok(())
    }
}

impl Drop for ShapedNetwork {
    fn drop(&mut self) {
        self.proxy.take();
        // Deleting the host end removes its peer; deleting the namespace removes the rest.
        let _ = ip(&["link", "del", &self.host_link]);
        let _ = ip(&["netns", "del", &self.namespace]);
    }
}

/// A /30 in 10.213.x.0/24 that no interface on the host uses yet.
fn pick_subnet() -> Result<u8, BenchError> {
    let used = ip(&["-4", "-o", "addr", "show"])?;
    let start = (std::process::id() % 250) as u8;
    (0..250u16)
        .map(|i| ((u16::from(start) + i) % 250) as u8 + 1)
        .find(|x| !used.contains(&format!("10.213.{x}.")))
        .ok_or_else(|| BenchError::Setup {
            what: "network".into(),
            reason: "every 10.213.x.0/30 is in use on this host".into(),
        })
}

/// Enter the network namespace `fd` on the calling thread (or, in `pre_exec`, in the
/// child about to exec).
pub fn enter_namespace(fd: i32) -> std::io::Result<()> {
    // SAFETY: setns only reads the descriptor and changes the calling thread's
    // namespace; it touches no memory of ours.
    let result = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A TCP proxy that holds every piece of data for half the RTT in each direction, and
/// each new connection for one RTT (the handshake), on a thread in the namespace.
struct DelayProxy {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DelayProxy {
    fn start(
        namespace_fd: i32,
        listen: SocketAddr,
        upstream: SocketAddr,
        rtt: Duration,
    ) -> Result<DelayProxy, BenchError> {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), BenchError>>();
        let thread = std::thread::Builder::new()
            .name("bench-delay-proxy".into())
            .spawn(move || {
                let setup = || -> Result<(tokio::runtime::Runtime, TcpListener), BenchError> {
                    enter_namespace(namespace_fd).map_err(|source| BenchError::Io {
                        what: "entering the benchmark network namespace".into(),
                        source,
                    })?;
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|source| BenchError::Io {
                            what: "starting the delay proxy runtime".into(),
                            source,
                        })?;
                    let listener =
                        runtime
                            .block_on(TcpListener::bind(listen))
                            .map_err(|source| BenchError::Io {
                                what: format!("binding the delay proxy on {listen}"),
                                source,
                            })?;
                    Ok((runtime, listener))
                };
                let (runtime, listener) = match setup() {
                    Ok(ok) => {
                        let _ = ready_tx.send(Ok(()));
                        ok
                    }
                    Err(error) => {
                        let _ = ready_tx.send(Err(error));
                        return;
                    }
                };
                runtime.block_on(async move {
                    tokio::select! {
                        _ = stop_rx => {}
                        _ = accept_loop(listener, upstream, rtt) => {}
                    }
                });
            })
            .map_err(|source| BenchError::Io {
                what: "spawning the delay proxy thread".into(),
                source,
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(DelayProxy {
                stop: Some(stop_tx),
                thread: Some(thread),
            }),
            Ok(Err(error)) => {
                let _ = thread.join();
                Err(error)
            }
            Err(_) => Err(BenchError::Setup {
                what: "delay proxy".into(),
                reason: "its thread ended before listening".into(),
            }),
        }
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, rtt: Duration) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            // The handshake of a real connection costs one round trip.
            tokio::time::sleep(rtt).await;
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            let one_way = rtt / 2;
            let up = tokio::spawn(delayed_copy(client_read, server_write, one_way));
            let down = tokio::spawn(delayed_copy(server_read, client_write, one_way));
            let _ = tokio::join!(up, down);
        });
    }
}

/// Copy `from` to `to`, each piece leaving `delay` after it arrived; order is kept and
/// throughput is not limited (the rate is tbf's job).
async fn delayed_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    // Bounded: the registry side is fast loopback, the client side is rate limited;
    // without back-pressure a whole layer would pile up here.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(64);
    let reader = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now(), buffer[..n].to_vec()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((arrived, data)) = rx.recv().await {
            tokio::time::sleep_until((arrived + delay).into()).await;
            if to.write_all(&data).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

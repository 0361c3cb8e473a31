//! Connecting to a route's backends: round robin, bounded failover, a timeout
//! per attempt.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::offload::Framed;
use crate::tls::UpstreamTls;

/// A TLS connection the gateway originated to a backend.
pub type BackendTls = TlsStream<Framed<TcpStream>>;

/// A connection to a backend: plain TCP, or TLS the gateway originated.
pub enum Upstream {
    Plain(TcpStream),
    Tls(Box<BackendTls>),
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_flush(cx),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no backend reachable after {attempts} attempt(s): {}", Failed::list(.failures))]
    AllFailed {
        attempts: usize,
        failures: Vec<Failed>,
    },
}

/// One attempt at a backend that failed: which backend, what kind of
/// failure (the metric's `reason`), and the error as the system said it.
#[derive(Debug)]
pub struct Failed {
    pub backend: String,
    pub reason: ConnectFailure,
    pub detail: String,
}

impl Failed {
    fn list(failures: &[Failed]) -> String {
        let each: Vec<String> = failures
            .iter()
            .map(|f| format!("{}: {}", f.backend, f.detail))
            .collect();
        each.join("; ")
    }
}

/// Why an attempt to reach a backend failed, in the words
/// `gateway_backend_connect_failures_total{reason}` counts it by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// Nothing listens there (a reset answered the SYN).
    Refused,
    /// No answer within `connect_timeout` (a blackhole, a full backlog).
    Timeout,
    /// No route to it, or the network is down.
    Unreachable,
    /// The guard's gate refused what a hostname resolved to, or it resolved
    /// to nothing.
    Gate,
    /// TCP connected; the TLS the gateway originates failed.
    Tls,
    /// Anything else the system reported.
    Other,
}

impl ConnectFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectFailure::Refused => "refused",
            ConnectFailure::Timeout => "timeout",
            ConnectFailure::Unreachable => "unreachable",
            ConnectFailure::Gate => "gate",
            ConnectFailure::Tls => "tls",
            ConnectFailure::Other => "other",
        }
    }

    /// The kind of a TCP connect's error.
    fn of(e: &io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => ConnectFailure::Refused,
            io::ErrorKind::TimedOut => ConnectFailure::Timeout,
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                ConnectFailure::Unreachable
            }
            _ => ConnectFailure::Other,
        }
    }
}

/// `host:port` with a non-empty host and a numeric port (IPv6 as `[::1]:80`).
pub fn split_host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.strip_suffix(']')?,
        None if host.contains(':') => return None,
        None => host,
    };
    (!host.is_empty()).then_some((host, port))
}

/// Called with a hostname backend (as the route names it, `name:port`) and
/// every address it resolves to, before the gateway connects to any of
/// them: the eBPF guard protects them first, so a name that starts
/// resolving elsewhere is never reachable around the gateway. An error
/// refuses the connect.
pub type Gate =
    std::sync::Arc<dyn Fn(&str, &[std::net::SocketAddr]) -> io::Result<()> + Send + Sync>;

pub struct Backends {
    addrs: Vec<String>,
    next: AtomicUsize,
    gate: std::sync::OnceLock<Gate>,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backends")
            .field("addrs", &self.addrs)
            .field("gated", &self.gate.get().is_some())
            .finish()
    }
}

impl Backends {
    pub fn new(addrs: Vec<String>) -> Self {
        Self {
            addrs,
            next: AtomicUsize::new(0),
            gate: std::sync::OnceLock::new(),
        }
    }

    /// The backends as the config names them.
    pub fn addrs(&self) -> impl Iterator<Item = &String> {
        self.addrs.iter()
    }

    /// Whether `addr` (as a connect reported it) is one of these backends.
    pub fn contains(&self, addr: &str) -> bool {
        self.addrs.iter().any(|a| a.eq_ignore_ascii_case(addr))
    }

    /// Resolves hostnames itself from now on and passes what they resolve
    /// to through `gate` before connecting (once; later calls keep the first).
    pub fn gate_with(&self, gate: Gate) {
        let _ = self.gate.set(gate);
    }

    /// Connects to the next backend in turn (with TLS when the route
    /// originates it); on failure tries the following ones, `attempts` in all
    /// (never more than there are backends). `timeout` bounds each attempt.
    /// A success comes with the attempts that failed before it.
    /// `preface` (a PROXY protocol header) is written on the TCP stream
    /// before anything else, TLS included, as HAProxy's `send-proxy-v2`
    /// does: whichever path then carries the bytes, kernel or userspace,
    /// the backend has read it first.
    pub async fn connect(
        &self,
        attempts: usize,
        timeout: Duration,
        tls: Option<&UpstreamTls>,
        preface: Option<&[u8]>,
    ) -> Result<(Upstream, String, Vec<Failed>), UpstreamError> {
        let attempts = attempts.clamp(1, self.addrs.len().max(1));
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut failures = Vec::new();
        for i in 0..attempts {
            let Some(addr) = self.addrs.get((start + i) % self.addrs.len().max(1)) else {
                break;
            };
            let (reason, detail) =
                match tokio::time::timeout(timeout, attempt(addr, tls, self.gate.get(), preface))
                    .await
                {
                    Ok(Ok(stream)) => return Ok((stream, addr.clone(), failures)),
                    Ok(Err((reason, e))) => (reason, e.to_string()),
                    Err(_) => (
                        ConnectFailure::Timeout,
                        format!("connect timed out after {timeout:?}"),
                    ),
                };
            failures.push(Failed {
                backend: addr.clone(),
                reason,
                detail,
            });
            tracing::debug!(backend = %addr, "backend connect failed, trying the next");
        }
        Err(UpstreamError::AllFailed { attempts, failures })
    }
}

async fn attempt(
    addr: &str,
    tls: Option<&UpstreamTls>,
    gate: Option<&Gate>,
    preface: Option<&[u8]>,
) -> Result<Upstream, (ConnectFailure, io::Error)> {
    let tcp = |e: io::Error| (ConnectFailure::of(&e), e);
    let stream = match (gate, addr.parse::<std::net::SocketAddr>()) {
        (Some(gate), Err(_)) => {
            // A hostname: what it resolves to now is protected before any
            // of it is connected to (and exactly that is connected to).
            let resolved: Vec<std::net::SocketAddr> = tokio::net::lookup_host(addr)
                .await
                .map_err(|e| (ConnectFailure::Gate, e))?
                .collect();
            gate(addr, &resolved).map_err(|e| (ConnectFailure::Gate, e))?;
            connect_any(&resolved).await.map_err(tcp)?
        }
        _ => TcpStream::connect(addr).await.map_err(tcp)?,
    };
    // Interactive protocols behind us: do not hold small writes back.
    let _ = stream.set_nodelay(true);
    let mut stream = stream;
    if let Some(preface) = preface {
        tokio::io::AsyncWriteExt::write_all(&mut stream, preface)
            .await
            .map_err(|e| {
                let e = io::Error::new(e.kind(), format!("sending the PROXY header: {e}"));
                (ConnectFailure::of(&e), e)
            })?;
    }
    match tls {
        None => Ok(Upstream::Plain(stream)),
        Some(tls) => {
            // Follow the record framing through the handshake: the kernel or
            // our record layer takes over at a record boundary.
            let stream = tls
                .connector
                .connect(tls.server_name.clone(), Framed::new(stream))
                .await
                .map_err(|e| {
                    let e = io::Error::new(e.kind(), format!("TLS to backend: {e}"));
                    (ConnectFailure::Tls, e)
                })?;
            Ok(Upstream::Tls(Box::new(stream)))
        }
    }
}

/// The first of `addrs` that accepts a connection, tried in order (as
/// `TcpStream::connect` tries what a name resolves to).
async fn connect_any(addrs: &[std::net::SocketAddr]) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolved to no address");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(split_host_port("127.0.0.1:9000"), Some(("127.0.0.1", 9000)));
        assert_eq!(
            split_host_port("backend.internal:80"),
            Some(("backend.internal", 80))
        );
        assert_eq!(split_host_port("[::1]:443"), Some(("::1", 443)));
        assert_eq!(split_host_port("::1:443"), None);
        assert_eq!(split_host_port("127.0.0.1"), None);
        assert_eq!(split_host_port(":80"), None);
        assert_eq!(split_host_port("h:99999"), None);
    }

    #[tokio::test]
    async fn fails_over_to_the_next_backend_and_round_robins() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_addr = live.local_addr().unwrap().to_string();
        // A port nobody listens on: bind, note it, close it.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_addr = dead.local_addr().unwrap().to_string();
        drop(dead);
        let b = Backends::new(vec![dead_addr.clone(), live_addr.clone()]);
        for _ in 0..4 {
            let (_s, used, failed) = b
                .connect(2, Duration::from_secs(2), None, None)
                .await
                .unwrap();
            assert_eq!(used, live_addr);
            for f in failed {
                assert_eq!(
                    (f.backend, f.reason),
                    (dead_addr.clone(), ConnectFailure::Refused)
                );
            }
        }
        let err = b.connect(1, Duration::from_secs(2), None, None).await;
        // With one attempt, every other call starts at the dead backend.
        let err2 = b.connect(1, Duration::from_secs(2), None, None).await;
        assert!(
            err.is_err() != err2.is_err(),
            "round robin alternates the start"
        );
    }

    #[tokio::test]
    async fn a_hostname_passes_the_gate_before_any_connect() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = live.local_addr().unwrap().port();
        let b = Backends::new(vec![format!("localhost:{port}")]);
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        b.gate_with(std::sync::Arc::new(
            move |_backend: &str, addrs: &[std::net::SocketAddr]| {
                record.lock().unwrap().extend_from_slice(addrs);
                Err(io::Error::other("not protected"))
            },
        ));
        let Err(err) = b.connect(1, Duration::from_secs(2), None, None).await else {
            panic!("connected past a gate that refused");
        };
        assert!(err.to_string().contains("not protected"), "{err}");
        assert!(
            seen.lock()
                .unwrap()
                .contains(&std::net::SocketAddr::from(([127, 0, 0, 1], port))),
            "the gate saw what the name resolved to"
        );
        let accepted = tokio::time::timeout(Duration::from_millis(200), live.accept()).await;
        assert!(accepted.is_err(), "a refused gate means no connect");
    }
}

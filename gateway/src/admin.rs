//! The admin endpoint (`admin` and `admin_socket` in the config): HTTP/1.1
//! served by hyper, with a small router and limits on everything a client
//! could stretch: connections at once, header size and count, time to send
//! the headers, body size, and a request's whole life.
//!
//! Two doors, for two kinds of caller:
//! - `admin` (TCP): read-only. `GET /metrics`, `/healthz`, `/readyz` to
//!   anyone who can reach it; `GET /block` and `GET /connections` (who is
//!   blocked, who is connected) only to clients in `admin_clients`
//!   (loopback by default) that name the endpoint by address or
//!   `localhost` in `Host` (a DNS-rebinding page names its own host).
//! - `GET /rollout/report?route=NAME&since=7d` (the audit report, see
//!   `rollout`: it names identities) as `/connections`.
//! - `GET /rollout/history` (the config revisions, see `revisions`) as
//!   `/connections`; `POST /rollout/revert` (`{"revision": N, "force":
//!   false}`) on `admin_socket` only, JSON only, like a block list change.
//! - `GET /readyz?strict` as `/readyz`, and 503 also while a certificate or
//!   CRL of the gateway's is inside its warning window (the same files,
//!   subjects and dates `/metrics` exports to the same callers).
//! - `admin_socket` (a Unix socket, mode 0600, owned by the user the
//!   gateway runs as): every route, including the changes (`POST /block`,
//!   `DELETE /block`). A source address proves nothing about who sent a
//!   request: any local user, or a browser page posting to 127.0.0.1, has
//!   one in `admin_clients`. The socket's owner and mode, and the peer's
//!   uid checked again at accept (root or the gateway's own user), do.
//!
//! A change must also say `Content-Type: application/json` (a cross-site
//! form cannot), may not block every source (`/0`), and blocks wider than
//! a /16 (IPv4) or /32 (IPv6) only with `"force": true`.
//!
//! When all connection slots of a door are taken, a new connection evicts
//! the oldest one that is still sending its headers or has been open
//! longer than any honest request takes (`EVICTABLE_AFTER`): slow clients
//! cannot keep a scrape out. Every refusal is counted in
//! `gateway_admin_refused_total{reason}`.
//!
//! `gateway block list|add|remove` is the client side ([`client`]).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use crate::admission::{Admission, AdmissionError, Blocked};
use crate::registry::{ConnectionView, Registry};

/// Admin connections served at once per door; past that a new one evicts
/// a slow one, or is closed at accept.
const MAX_CONNECTIONS: usize = 32;
/// Time to send a request's headers, from accept.
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// A connection's whole life: its headers, its body, the answer read.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// An honest request is read and answered in milliseconds: a connection
/// open longer than this may be evicted for a new one when all are taken.
const EVICTABLE_AFTER: Duration = Duration::from_secs(1);
/// hyper's read buffer: the headers must fit (its minimum is 8 KiB).
const MAX_HEADER_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 32;
const MAX_BODY_BYTES: usize = 16 * 1024;
/// Connections `GET /connections` lists at most (oldest first); it says
/// how many it left off.
pub const MAX_CONNECTIONS_LISTED: usize = 1000;
/// The widest block taken without `"force": true`.
const WIDEST_V4: u8 = 16;
const WIDEST_V6: u8 = 32;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin_socket {path}: {what}: {source}")]
    Socket {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("admin_socket {0}: another process is serving it (another gateway?)")]
    InUse(PathBuf),
    #[error("admin_socket {0}: exists and is not a socket; refusing to replace it")]
    NotSocket(PathBuf),
    #[error("admin_socket {path}: {why}")]
    UnsafeDir { path: PathBuf, why: String },
    #[error("admin_tls: {0}")]
    Tls(String),
}

/// Whether the gateway should get new clients: `GET /readyz`.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
    draining: AtomicBool,
    /// Why the gateway must not get new clients although it serves
    /// (another process listening where it accepts: `workers::Watch`).
    unsafe_to_serve: std::sync::Mutex<Option<String>>,
}

impl Health {
    /// Every listener is bound and serving (and the guard, where
    /// configured, installed: the gateway is not built without it).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    /// Shutdown began: new clients should go elsewhere while live ones
    /// drain. Never undone.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Some: not ready for that reason until it is set back to None.
    pub fn set_unsafe_to_serve(&self, why: Option<String>) {
        *self
            .unsafe_to_serve
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = why;
    }

    /// None: ready; otherwise why not.
    fn not_ready(&self) -> Option<String> {
        if self.draining.load(Ordering::SeqCst) {
            Some("draining".into())
        } else if !self.ready.load(Ordering::SeqCst) {
            Some("starting".into())
        } else {
            self.unsafe_to_serve
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        }
    }
}

/// What the endpoint serves.
pub struct Routes {
    /// The body of `GET /metrics`, made per request.
    pub metrics: Box<dyn Fn() -> String + Send + Sync>,
    /// The block list, where the endpoint has one (the gateway's, not the
    /// remote guard's).
    pub admission: Option<Arc<Admission>>,
    /// Who may read `/block` and `/connections` over TCP; a reload swaps
    /// it.
    pub clients: Arc<arc_swap::ArcSwap<Vec<IpNet>>>,
    pub health: Arc<Health>,
    /// The live connections, for `GET /connections` (the gateway's).
    pub registry: Option<Arc<Registry>>,
    /// The audit report, where the endpoint has one (the gateway's).
    pub rollout: Option<crate::rollout::ReportSource>,
    /// `admin_tls`: the TCP door speaks TLS and wants a client certificate.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// The revision history and revert (the gateway's, with a history).
    pub revisions: Option<Revisions>,
    /// `POST /reload` and `POST /reload/preview` (the gateway's, on
    /// admin_socket only).
    pub reloads: Option<Box<dyn Reloads>>,
}

/// What `revert` answers: the revision it became, or (status, why not).
pub type RevertAnswer = Result<Reverted, (u16, String)>;

/// `GET /rollout/history` and `POST /rollout/revert`.
pub struct Revisions {
    /// Reads and hashes files: called off the runtime's threads.
    pub history: Arc<dyn Fn() -> crate::revisions::History + Send + Sync>,
    #[allow(clippy::type_complexity)]
    pub revert: Box<
        dyn Fn(
                u64,
                bool,
            )
                -> std::pin::Pin<Box<dyn std::future::Future<Output = RevertAnswer> + Send>>
            + Send
            + Sync,
    >,
}

/// `POST /rollout/revert`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reverted {
    /// The revision the revert was recorded as (none: the history could
    /// not be written; the revert applies all the same).
    pub revision: Option<u64>,
    pub reverted_to: u64,
    pub connections_closed: usize,
    /// What changed, in words (as the log line says).
    pub changes: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevertRequest {
    revision: u64,
    #[serde(default)]
    force: bool,
}

/// An answer from the app: its status and JSON body.
pub struct Answer {
    pub status: u16,
    pub body: serde_json::Value,
}

pub type Answering<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Answer> + Send + 'a>>;

/// What the app does for `POST /reload` and `POST /reload/preview`.
pub trait Reloads: Send + Sync {
    /// Reloads the config file the gateway was started with; `force`:
    /// even over the reload guard.
    fn reload(&self, force: bool) -> Answering<'_>;
    /// Previews a reload to the config file at `config` (absolute).
    fn preview(&self, config: PathBuf, since: Option<Duration>) -> Answering<'_>;
}

/// `POST /reload`'s body (all optional).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadRequest {
    #[serde(default)]
    pub force: bool,
}

/// `POST /reload`'s answer when the reload applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reloaded {
    pub listeners_started: Vec<String>,
    pub listeners_stopped: Vec<String>,
    pub connections_closed: usize,
    /// What changed, in words (as the log line says it).
    pub changes: String,
}

/// `POST /reload/preview`'s body.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviewRequest {
    /// The candidate config file, an absolute path the gateway reads.
    pub config: PathBuf,
    /// The audit report's window (e.g. "7d"); none: all it remembers.
    #[serde(default)]
    pub since: Option<String>,
}

/// `admin_tls` as a TLS acceptor: the endpoint's chain and key (a key
/// others may read refused unless `allow_shared_keys`), clients verified
/// against `client_ca` alone.
pub fn tls_acceptor(
    tls: &crate::config::AdminTls,
    resolve: impl Fn(&std::path::Path) -> PathBuf,
    allow_shared_keys: bool,
) -> Result<tokio_rustls::TlsAcceptor, AdminError> {
    use crate::tls::certs;
    let err = |e: &dyn std::fmt::Display| AdminError::Tls(e.to_string());
    let (cert, key, ca) = (
        resolve(&tls.cert),
        resolve(&tls.key),
        resolve(&tls.client_ca),
    );
    if !allow_shared_keys {
        certs::check_key_private(&key).map_err(|e| err(&e))?;
    }
    let chain = certs::load_certs(&cert).map_err(|e| err(&e))?;
    let key = certs::load_key(&key).map_err(|e| err(&e))?;
    let roots = certs::load_roots(&ca).map_err(|e| err(&e))?;
    let provider = crate::tls::provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| err(&e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| err(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| {
            err(&format!(
                "{} and {}: {e}",
                tls.cert.display(),
                tls.key.display()
            ))
        })?;
    // A resumed session skips the client-certificate verifier: an expired
    // or replaced certificate would keep working. Full handshakes only.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Admin connections refused or cut, by reason.
#[derive(Debug, Default)]
struct Refusals {
    /// Every slot held by a request still being answered.
    connections: AtomicU64,
    /// Cut to make room for a new connection.
    evicted: AtomicU64,
    /// Headers not complete within `HEADER_TIMEOUT`.
    header_timeout: AtomicU64,
    /// Not done within `REQUEST_DEADLINE`.
    deadline: AtomicU64,
    /// A socket peer neither root nor the gateway's user.
    peer: AtomicU64,
    /// With `admin_tls`: no TLS handshake with a certificate from
    /// `client_ca` (plain HTTP, no certificate, another CA).
    tls: AtomicU64,
    /// A TCP peer not in `admin_clients` (403).
    client: AtomicU64,
    /// A Host that is not the endpoint's address or localhost (403).
    host: AtomicU64,
    /// A change (block list, reload, reload preview) over TCP (403).
    tcp_change: AtomicU64,
    /// A request hyper could not parse, or a malformed one (400).
    bad_request: AtomicU64,
    /// A method the route does not take (405).
    method: AtomicU64,
    /// A body that is not JSON (415).
    media_type: AtomicU64,
    /// Headers or a body over the limits (431, 413).
    too_large: AtomicU64,
}

/// Why a request was refused with a 403, carried in the reply's
/// extensions to where it is counted.
#[derive(Debug, Clone, Copy)]
enum Forbidden {
    Client,
    Host,
    TcpChange,
}

impl Refusals {
    /// Counts `reply` if it refuses the request.
    fn count(&self, reply: &Reply) {
        let counter = match reply.status() {
            StatusCode::FORBIDDEN => match reply.extensions().get::<Forbidden>() {
                Some(Forbidden::Client) => &self.client,
                Some(Forbidden::Host) => &self.host,
                Some(Forbidden::TcpChange) | None => &self.tcp_change,
            },
            StatusCode::BAD_REQUEST => &self.bad_request,
            StatusCode::METHOD_NOT_ALLOWED => &self.method,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => &self.media_type,
            StatusCode::PAYLOAD_TOO_LARGE => &self.too_large,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts what hyper refused before any route saw it (its 431 or 400).
    fn count_unparsed(&self, e: &hyper::Error) {
        if e.is_parse_too_large() {
            self.too_large.fetch_add(1, Ordering::Relaxed);
        } else if e.is_parse() {
            self.bad_request.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn render(&self, out: &mut String) {
        let series: Vec<(&'static str, u64)> = [
            ("connections", &self.connections),
            ("evicted", &self.evicted),
            ("header_timeout", &self.header_timeout),
            ("deadline", &self.deadline),
            ("peer", &self.peer),
            ("tls", &self.tls),
            ("client", &self.client),
            ("host", &self.host),
            ("tcp_change", &self.tcp_change),
            ("bad_request", &self.bad_request),
            ("method", &self.method),
            ("media_type", &self.media_type),
            ("too_large", &self.too_large),
        ]
        .into_iter()
        .map(|(reason, n)| (reason, n.load(Ordering::Relaxed)))
        .collect();
        out.push_str(&crate::metrics::render_with(move |e| {
            e.counter(
                "gateway_admin_refused_total",
                "Admin endpoint connections refused or cut: all slots busy (connections), cut for a new one (evicted), headers too slow (header_timeout), request too slow (deadline), a socket peer neither root nor the gateway's user (peer), no TLS handshake with a certificate from admin_tls.client_ca (tls), a TCP peer not in admin_clients (client), a Host not the endpoint's address or localhost (host), a change (block list, reload) over TCP (tcp_change), a malformed request (bad_request), a method the route does not take (method), a body not JSON (media_type), headers or a body over the limits (too_large).",
                series.iter().map(|&(reason, n)| ([("reason", reason)], n)),
            )
        }));
    }
}

/// Who is asking.
#[derive(Debug, Clone, Copy)]
enum Peer {
    Tcp(SocketAddr),
    /// On `admin_socket`, root or the gateway's own user (checked at
    /// accept).
    Socket,
}

struct Shared {
    routes: Routes,
    refused: Arc<Refusals>,
}

/// Serves `routes` on `tcp` and `socket` (whichever there are) until `stop`.
pub async fn serve(
    tcp: Option<TcpListener>,
    socket: Option<UnixListener>,
    routes: Routes,
    stop: CancellationToken,
) {
    let shared = Arc::new(Shared {
        routes,
        refused: Arc::default(),
    });
    let tcp = async {
        if let Some(tcp) = tcp {
            serve_tcp(tcp, &shared, &stop).await;
        }
    };
    let socket = async {
        if let Some(socket) = socket {
            serve_socket(socket, &shared, &stop).await;
        }
    };
    tokio::join!(tcp, socket);
}

async fn serve_tcp(socket: TcpListener, shared: &Arc<Shared>, stop: &CancellationToken) {
    let slots = Arc::new(Slots::default());
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => return,
            r = socket.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        match &shared.routes.tls {
            None => spawn_connection(async { Some(stream) }, Peer::Tcp(peer), shared, &slots),
            Some(tls) => {
                let (tls, refused) = (tls.clone(), shared.refused.clone());
                let handshake = async move {
                    match tls.accept(stream).await {
                        Ok(s) => Some(s),
                        Err(e) => {
                            refused.tls.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(%peer, error = %e, "admin: TLS handshake failed");
                            None
                        }
                    }
                };
                spawn_connection(handshake, Peer::Tcp(peer), shared, &slots);
            }
        }
    }
}

async fn serve_socket(socket: UnixListener, shared: &Arc<Shared>, stop: &CancellationToken) {
    let slots = Arc::new(Slots::default());
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            r = socket.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin socket accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // The file's mode keeps others out; this keeps them out should the
        // mode or owner be changed under the gateway.
        let uid = stream.peer_cred().map(|c| c.uid());
        let own = crate::privilege::effective_uid();
        match uid {
            Ok(uid) if uid == 0 || uid == own => {
                spawn_connection(async { Some(stream) }, Peer::Socket, shared, &slots);
            }
            other => {
                // Said once; any local user could otherwise fill the log.
                let before = shared.refused.peer.fetch_add(1, Ordering::Relaxed);
                if before == 0 {
                    tracing::warn!(peer_uid = ?other.ok(), "admin socket: a peer neither root nor the gateway's user; closed (counted in gateway_admin_refused_total{{reason=\"peer\"}}, logged once)");
                } else {
                    tracing::debug!(peer_uid = ?other.ok(), "admin socket: a peer neither root nor the gateway's user; closed");
                }
            }
        }
    }
}

/// Serves one connection in a slot; `io` gives its stream (after a TLS
/// handshake, which counts against the header timeout), or None when it
/// failed (counted by `io`).
fn spawn_connection<F, IO>(io: F, peer: Peer, shared: &Arc<Shared>, slots: &Arc<Slots>)
where
    F: std::future::Future<Output = Option<IO>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(slot) = slots.admit(&shared.refused) else {
        tracing::debug!(?peer, "admin: every connection slot busy; closed");
        return;
    };
    let shared = shared.clone();
    tokio::spawn(async move {
        let headers_due = tokio::time::sleep(HEADER_TIMEOUT);
        let mut headers_due = std::pin::pin!(headers_due);
        // A TLS handshake is part of the time to send the headers.
        let io = tokio::select! {
            io = io => io,
            // Counted by whoever evicted it.
            () = slot.slot.evict.cancelled() => return,
            () = &mut headers_due => {
                slot.refused.header_timeout.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let Some(io) = io else { return };
        let answering = slot.slot.clone();
        let service = hyper::service::service_fn(move |req| {
            let shared = shared.clone();
            answering.answering.store(true, Ordering::Relaxed);
            async move {
                let reply = route(&shared, peer, req).await;
                shared.refused.count(&reply);
                Ok::<_, Infallible>(reply)
            }
        });
        let mut http = hyper::server::conn::http1::Builder::new();
        // One request per connection: what scrapers and the CLI send, and
        // a connection's whole life then has one deadline. The header
        // timeout is this task's own (from accept, counted); hyper's is
        // only a backstop.
        http.timer(TokioTimer::new())
            .keep_alive(false)
            .header_read_timeout(REQUEST_DEADLINE)
            .max_buf_size(MAX_HEADER_BYTES)
            .max_headers(MAX_HEADERS);
        let conn = http.serve_connection(TokioIo::new(io), service);
        let refused = &slot.refused;
        let s = &slot.slot;
        let mut conn = std::pin::pin!(conn);
        let deadline = tokio::time::sleep(REQUEST_DEADLINE);
        let mut deadline = std::pin::pin!(deadline);
        // Whether the header timeout still applies: once the headers are
        // in, only the deadline does.
        let mut reading_headers = true;
        loop {
            tokio::select! {
                served = &mut conn => {
                    if let Err(e) = served {
                        refused.count_unparsed(&e);
                    }
                    break;
                }
                // Counted by whoever evicted it.
                () = s.evict.cancelled() => break,
                () = &mut headers_due, if reading_headers => {
                    if s.answering.load(Ordering::Relaxed) {
                        reading_headers = false;
                        continue;
                    }
                    refused.header_timeout.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                () = &mut deadline => {
                    refused.deadline.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
    });
}

/// A door's connection slots.
#[derive(Default)]
struct Slots {
    held: Mutex<Vec<Arc<Slot>>>,
    next: AtomicU64,
}

struct Slot {
    id: u64,
    opened: Instant,
    /// Its headers are in: it is being answered.
    answering: AtomicBool,
    evict: CancellationToken,
}

/// A slot held; given back when dropped.
struct Held {
    slots: Arc<Slots>,
    slot: Arc<Slot>,
    /// The door's counters, which the connection bumps as it is cut.
    refused: Arc<Refusals>,
}

impl Slots {
    /// A slot for a new connection: a free one, else one taken from the
    /// oldest connection still sending its headers or open longer than
    /// `EVICTABLE_AFTER`; None when every slot is a request being
    /// answered now.
    fn admit(self: &Arc<Self>, refused: &Arc<Refusals>) -> Option<Held> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.len() >= MAX_CONNECTIONS {
            let victim = held
                .iter()
                .enumerate()
                .filter(|(_, s)| {
                    !s.answering.load(Ordering::Relaxed) || s.opened.elapsed() >= EVICTABLE_AFTER
                })
                .min_by_key(|(_, s)| s.opened)
                .map(|(i, _)| i);
            let Some(i) = victim else {
                refused.connections.fetch_add(1, Ordering::Relaxed);
                return None;
            };
            let victim = held.swap_remove(i);
            victim.evict.cancel();
            refused.evicted.fetch_add(1, Ordering::Relaxed);
        }
        let slot = Arc::new(Slot {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            opened: Instant::now(),
            answering: AtomicBool::new(false),
            evict: CancellationToken::new(),
        });
        held.push(slot.clone());
        Some(Held {
            slots: self.clone(),
            slot,
            refused: refused.clone(),
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().unwrap_or_else(|p| p.into_inner());
        held.retain(|s| s.id != self.slot.id);
    }
}

type Reply = Response<Full<Bytes>>;

async fn route(shared: &Shared, peer: Peer, req: Request<Incoming>) -> Reply {
    let routes = &shared.routes;
    let path = req.uri().path().to_owned();
    // HEAD is GET without the body (hyper leaves it out).
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    match path.as_str() {
        "/metrics" | "/healthz" | "/readyz" | "/connections" | "/rollout/report"
        | "/rollout/history"
            if !read =>
        {
            not_allowed("GET, HEAD")
        }
        "/rollout/revert" if *req.method() != Method::POST => not_allowed("POST"),
        "/metrics" => {
            let mut body = (routes.metrics)();
            shared.refused.render(&mut body);
            text(StatusCode::OK, crate::metrics::CONTENT_TYPE, body)
        }
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => readyz(routes, req.uri().query()),
        "/reload" | "/reload/preview" => match (&routes.reloads, peer) {
            (_, Peer::Tcp(_)) => forbidden(
                Forbidden::TcpChange,
                format!(
                    "{path} is served on admin_socket only: the candidate makes the gateway read files (gateway check --against and gateway reload use the socket)"
                ),
            ),
            (None, _) => not_found(),
            (_, _) if *req.method() != Method::POST => not_allowed("POST"),
            (Some(reloads), Peer::Socket) => reload(reloads.as_ref(), &path, req).await,
        },
        "/connections" | "/block" | "/rollout/report" | "/rollout/history" | "/rollout/revert" => {
            if let Some(refusal) = untrusted(routes, peer, &req) {
                return refusal;
            }
            match (path.as_str(), &routes.registry, &routes.admission) {
                ("/connections", Some(registry), _) => connections(registry),
                ("/rollout/history", ..) if let Some(r) = &routes.revisions => {
                    // Every named file of every revision is hashed again:
                    // file I/O has no place on a worker serving the
                    // admin endpoint and the metrics.
                    let history = r.history.clone();
                    match tokio::task::spawn_blocking(move || history()).await {
                        Ok(h) => json(StatusCode::OK, &h),
                        Err(e) => text(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "text/plain; charset=utf-8",
                            format!("the history could not be read: {e}\n"),
                        ),
                    }
                }
                ("/rollout/revert", ..) if let Some(r) = &routes.revisions => {
                    revert(r, peer, req).await
                }
                ("/block", _, Some(admission)) => block(admission, peer, req).await,
                ("/rollout/report", ..) if let Some(r) = &routes.rollout => {
                    match r.answer(req.uri().query()) {
                        Ok(report) => json(StatusCode::OK, &report),
                        Err(crate::rollout::Unanswered(status, message)) => json(
                            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                            &Problem::new(message),
                        ),
                    }
                }
                _ => not_found(),
            }
        }
        _ => not_found(),
    }
}

/// `GET /readyz`: may the gateway get new clients (load balancers ask
/// this; it never looks at expiry). `GET /readyz?strict`: also no
/// certificate or CRL of the gateway's is inside its warning window
/// (`expiry::warns_at`) or has run out: else 503 with one line for each,
/// which file, what and when. Any other
/// parameter is refused, so a typo is not taken for the plain question.
fn readyz(routes: &Routes, query: Option<&str>) -> Reply {
    let mut strict = false;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair {
            "strict" => strict = true,
            other => {
                return text(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    format!("unknown parameter {other:?}: /readyz and /readyz?strict are known\n"),
                );
            }
        }
    }
    if let Some(why) = routes.health.not_ready() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("not ready: {why}\n"),
        );
    }
    let now = jiff::Timestamp::now().as_second();
    let expiring = match (&routes.rollout, strict) {
        (Some(r), true) => r.expiries.within_warning(now),
        _ => Vec::new(),
    };
    if expiring.is_empty() {
        return text(StatusCode::OK, "text/plain", "ready\n".into());
    }
    let mut body = format!(
        "not ready: {} certificate{} or CRL{} inside the warning window\n",
        expiring.len(),
        if expiring.len() == 1 { "" } else { "s" },
        if expiring.len() == 1 { "" } else { "s" },
    );
    for e in &expiring {
        body.push_str(&crate::expiry::describe(e, now));
        body.push('\n');
    }
    text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", body)
}

/// Who may read who is blocked and who is connected: the socket's peers,
/// and over TCP `admin_clients` naming the endpoint by address or
/// `localhost` (a page that rebound its own name to 127.0.0.1 sends that
/// name, and gets nothing). Some: the refusal to send.
fn untrusted(routes: &Routes, peer: Peer, req: &Request<Incoming>) -> Option<Reply> {
    let Peer::Tcp(addr) = peer else {
        return None;
    };
    if !allowed(&routes.clients.load(), addr.ip()) {
        return Some(forbidden(
            Forbidden::Client,
            format!(
                "{} is not in admin_clients: {} is not served to it",
                addr.ip(),
                req.uri().path()
            ),
        ));
    }
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !host_is_literal(host) {
        return Some(forbidden(
            Forbidden::Host,
            format!("Host {host:?}: name the admin endpoint by its address or localhost"),
        ));
    }
    None
}

fn allowed(clients: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    clients.iter().any(|n| n.contains(&ip))
}

/// `127.0.0.1`, `127.0.0.1:9901`, `[::1]:9901`, `localhost[:port]`.
fn host_is_literal(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        // An IPv6 literal without brackets or port has colons of its own.
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !name.ends_with(':') => {
            name
        }
        _ => host,
    };
    let name = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok()
}

/// `GET /connections`: the live connections, oldest first, at most
/// `MAX_CONNECTIONS_LISTED`.
fn connections(registry: &Registry) -> Reply {
    let (connections, total) = registry.connections(MAX_CONNECTIONS_LISTED);
    json(
        StatusCode::OK,
        &Connections {
            total,
            left_off: total.saturating_sub(connections.len()),
            connections,
        },
    )
}

/// `GET /connections` as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Connections {
    /// Live connections in all.
    pub total: usize,
    /// How many of them the listing left off (past its cap).
    pub left_off: usize,
    pub connections: Vec<ConnectionView>,
}

/// `/block`: list (both doors), add and remove (the socket only).
async fn block(admission: &Admission, peer: Peer, req: Request<Incoming>) -> Reply {
    let method = req.method().clone();
    if matches!(method, Method::GET | Method::HEAD) {
        return json(
            StatusCode::OK,
            &admission
                .blocked()
                .iter()
                .map(Entry::from)
                .collect::<Vec<_>>(),
        );
    }
    if !matches!(method, Method::POST | Method::DELETE) {
        return not_allowed("GET, HEAD, POST, DELETE");
    }
    if let Peer::Tcp(_) = peer {
        return forbidden(
            Forbidden::TcpChange,
            "the block list is changed through admin_socket only (gateway block add|remove uses it)"
                .into(),
        );
    }
    if method == Method::DELETE {
        return unblock(admission, &req);
    }
    let add: AddRequest = match read_json(req, "{\"source\": \"192.0.2.7\" or \"192.0.2.0/24\", \"for\": \"1h\" (optional), \"force\": true (optional)}").await {
        Ok(a) => a,
        Err(reply) => return reply,
    };
    let net = match parse_source(&add.source).and_then(|n| check_width(n, add.force)) {
        Ok(n) => n,
        Err(e) => return json(StatusCode::BAD_REQUEST, &Problem::new(e)),
    };
    let ttl = match add.r#for.as_deref().map(crate::config::duration::parse) {
        None => None,
        Some(Ok(d)) if !d.is_zero() => Some(d),
        Some(Ok(_)) => {
            return json(
                StatusCode::BAD_REQUEST,
                &Problem::new("\"for\" must be more than 0".into()),
            );
        }
        Some(Err(e)) => return json(StatusCode::BAD_REQUEST, &Problem::new(e)),
    };
    match admission.block(net, ttl) {
        Ok(b) => json(StatusCode::OK, &Entry::from(&b)),
        Err(e @ AdmissionError::Exempt(_)) => {
            json(StatusCode::CONFLICT, &Problem::new(e.to_string()))
        }
        Err(e @ AdmissionError::BlockListFull(_)) => json(
            StatusCode::INSUFFICIENT_STORAGE,
            &Problem::new(e.to_string()),
        ),
    }
}

/// `POST /rollout/revert`: the socket only (a revert changes what the
/// gateway enforces), JSON only.
async fn revert(revisions: &Revisions, peer: Peer, req: Request<Incoming>) -> Reply {
    if let Peer::Tcp(_) = peer {
        return forbidden(
            Forbidden::TcpChange,
            "a revert is asked for through admin_socket only (gateway rollout revert uses it)"
                .into(),
        );
    }
    let ask: RevertRequest =
        match read_json(req, "{\"revision\": N, \"force\": true (optional)}").await {
            Ok(a) => a,
            Err(reply) => return reply,
        };
    match (revisions.revert)(ask.revision, ask.force).await {
        Ok(done) => json(StatusCode::OK, &done),
        Err((status, message)) => json(
            StatusCode::from_u16(status).unwrap_or(StatusCode::CONFLICT),
            &Problem::new(message),
        ),
    }
}

/// A change's JSON body: `Content-Type: application/json` (a cross-site
/// form cannot send it), within `MAX_BODY_BYTES`, shaped like `expected`.
async fn read_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    expected: &str,
) -> Result<T, Reply> {
    let path = req.uri().path().to_owned();
    let json_body = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json_body {
        return Err(json(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            &Problem::new(format!("POST {path} takes Content-Type: application/json")),
        ));
    }
    let body = Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| {
            json(
                StatusCode::PAYLOAD_TOO_LARGE,
                &Problem::new(format!("reading the body: {e}")),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| {
        json(
            StatusCode::BAD_REQUEST,
            &Problem::new(format!("expected {expected}: {e}")),
        )
    })
}

/// `POST /reload` (`{"force": true}` optional) and `POST /reload/preview`
/// (`{"config": "/abs/candidate.toml", "since": "7d"}`).
async fn reload(reloads: &dyn Reloads, path: &str, req: Request<Incoming>) -> Reply {
    let answer = if path == "/reload" {
        // An empty body is `{}`.
        let empty = req
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() == b"0");
        let r: ReloadRequest = if empty {
            ReloadRequest::default()
        } else {
            match read_json(req, "{\"force\": true} (optional)").await {
                Ok(r) => r,
                Err(reply) => return reply,
            }
        };
        reloads.reload(r.force).await
    } else {
        let r: PreviewRequest = match read_json(
            req,
            "{\"config\": \"/absolute/candidate.toml\", \"since\": \"7d\" (optional)}",
        )
        .await
        {
            Ok(r) => r,
            Err(reply) => return reply,
        };
        if !r.config.is_absolute() {
            return json(
                StatusCode::BAD_REQUEST,
                &Problem::new(format!(
                    "config {:?}: an absolute path (the gateway's working directory is not yours)",
                    r.config
                )),
            );
        }
        let since = match r.since.as_deref().map(crate::config::duration::parse) {
            None => None,
            Some(Ok(d)) => Some(d),
            Some(Err(e)) => return json(StatusCode::BAD_REQUEST, &Problem::new(e)),
        };
        reloads.preview(r.config, since).await
    };
    json(
        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &answer.body,
    )
}

/// `DELETE /block?source=NET`.
fn unblock(admission: &Admission, req: &Request<Incoming>) -> Reply {
    let source = req.uri().query().unwrap_or("").split('&').find_map(|kv| {
        kv.strip_prefix("source=").map(|v| {
            v.replace("%2F", "/")
                .replace("%2f", "/")
                .replace("%3A", ":")
                .replace("%3a", ":")
        })
    });
    let Some(source) = source else {
        return json(
            StatusCode::BAD_REQUEST,
            &Problem::new("DELETE /block?source=192.0.2.7 (or 192.0.2.0/24)".into()),
        );
    };
    let net = match parse_source(&source) {
        Ok(n) => n,
        Err(e) => return json(StatusCode::BAD_REQUEST, &Problem::new(e)),
    };
    if admission.unblock(net) {
        json(
            StatusCode::OK,
            &Removed {
                removed: net.to_string(),
            },
        )
    } else {
        json(
            StatusCode::NOT_FOUND,
            &Problem::new(format!("{net} is not on the block list")),
        )
    }
}

/// A block of every source is never taken (it would refuse every client,
/// pinned across restarts); one wider than a /16 or /32 only when forced.
fn check_width(net: IpNet, force: bool) -> Result<IpNet, String> {
    if net.prefix_len() == 0 {
        return Err(format!(
            "{net} would block every source: never taken, forced or not"
        ));
    }
    let widest = match net {
        IpNet::V4(_) => WIDEST_V4,
        IpNet::V6(_) => WIDEST_V6,
    };
    if net.prefix_len() < widest && !force {
        return Err(format!(
            "{net} is wider than a /{widest}: say \"force\": true (gateway block add --force) to block it"
        ));
    }
    Ok(net)
}

/// Where `admin_socket` is served: its directory must be root's or this
/// user's and writable by no one else (else whoever can write there could
/// swap a name for a symlink and have root chown what it points to). Bound
/// 0600 under a temporary name, then linked into place, which fails rather
/// than replace anything that appeared there. A stale socket (no one
/// answers) is replaced; a live one or anything that is not a socket is
/// refused.
pub fn bind_socket(path: &Path) -> Result<(UnixListener, SocketFile), AdminError> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    crate::safe_dir::check_parent_of(path).map_err(|why| AdminError::UnsafeDir {
        path: path.to_owned(),
        why,
    })?;
    let err = |what, source| AdminError::Socket {
        path: path.to_owned(),
        what,
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(AdminError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(|e| err("removing the stale socket", e))?;
        }
        Ok(_) => return Err(AdminError::NotSocket(path.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("reading it", e)),
    }
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".{}.tmp", std::process::id()));
    let temporary = PathBuf::from(temporary);
    let _ = std::fs::remove_file(&temporary);
    let socket = bind_private(&temporary).map_err(|e| err("binding", e))?;
    // link(2) neither follows a symlink at the temporary name nor replaces
    // what is at `path`.
    let placed = std::fs::hard_link(&temporary, path).map_err(|e| err("moving it in place", e));
    let _ = std::fs::remove_file(&temporary);
    placed?;
    let meta = std::fs::symlink_metadata(path).map_err(|e| err("reading it", e))?;
    Ok((
        socket,
        SocketFile {
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
        },
    ))
}

/// Binds `path` under umask 0177, so the socket is 0600 from its first
/// moment. The umask is the process's: a file another thread creates
/// meanwhile is made 0600 too (tighter, never looser); it is restored at
/// once.
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    // SAFETY: umask has no preconditions and cannot fail.
    let before = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(before) };
    bound
}

/// The file `bind_socket` placed: removed at exit only while it is still
/// that file, not whatever has taken its name since.
#[derive(Debug, Clone)]
pub struct SocketFile {
    pub path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    pub fn remove(&self) {
        use std::os::unix::fs::MetadataExt as _;
        if std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| (m.dev(), m.ino()) == (self.dev, self.ino))
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Gives `admin_socket` to the user the gateway is about to become, so
/// that user (and root) can use it after the drop, and nobody else. Never
/// through a symlink (its directory is checked, but a chown as root should
/// not depend on that alone).
pub fn give_socket(path: &Path, uid: u32, gid: u32) -> Result<(), AdminError> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(|source| AdminError::Socket {
        path: path.to_owned(),
        what: "giving it to the gateway's user",
        source,
    })
}

/// An address (a /32 or /128) or a prefix.
pub fn parse_source(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map(|n| match n.addr() {
            // An IPv4-mapped address is the IPv4 source it stands for.
            IpAddr::V6(v6) if n.prefix_len() >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => IpNet::new(v4.into(), n.prefix_len() - 96).unwrap_or(n),
                None => n,
            },
            _ => n,
        })
        .map(|n| n.trunc())
        .map_err(|_| format!("{s:?} is neither an IP address nor a CIDR prefix"))
}

/// One block list entry, as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub source: String,
    pub reason: String,
    /// How wide: `address`, `prefix`, `network` (admission.ipv4_prefix,
    /// ipv6_prefix and narrower are `prefix`).
    #[serde(default)]
    pub level: String,
    /// None: until removed.
    pub expires_in_seconds: Option<u64>,
}

impl From<&Blocked> for Entry {
    fn from(b: &Blocked) -> Entry {
        Entry {
            source: b.net.to_string(),
            reason: b.reason.as_str().to_owned(),
            level: b.level.as_str().to_owned(),
            expires_in_seconds: b
                .expires
                .map(|e| e.saturating_duration_since(Instant::now()).as_secs()),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddRequest {
    source: String,
    #[serde(default)]
    r#for: Option<String>,
    /// Block a prefix wider than a /16 (IPv4) or /32 (IPv6).
    #[serde(default)]
    force: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Removed {
    removed: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Problem {
    error: String,
}

impl Problem {
    fn new(error: String) -> Problem {
        Problem { error }
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

fn json(status: StatusCode, value: &impl Serialize) -> Reply {
    let body = serde_json::to_string_pretty(value).unwrap_or_else(|_| "{}".into()) + "\n";
    let mut r = text(status, "application/json", body);
    // Who is blocked and who is connected: never kept by a cache, never
    // read by a browser as anything but JSON.
    let headers = r.headers_mut();
    headers.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    headers.insert(
        hyper::header::X_CONTENT_TYPE_OPTIONS,
        hyper::header::HeaderValue::from_static("nosniff"),
    );
    r
}

fn not_found() -> Reply {
    text(
        StatusCode::NOT_FOUND,
        "text/plain",
        "not found: GET /metrics, /healthz, /readyz, /connections, /rollout/report, /rollout/history, /block (GET; POST, DELETE on admin_socket), and POST /rollout/revert, /reload, /reload/preview (admin_socket)\n"
            .into(),
    )
}

/// A 403, marked with why for `gateway_admin_refused_total`.
fn forbidden(why: Forbidden, problem: String) -> Reply {
    let mut reply = json(StatusCode::FORBIDDEN, &Problem::new(problem));
    reply.extensions_mut().insert(why);
    reply
}

fn not_allowed(allow: &'static str) -> Reply {
    let mut r = text(
        StatusCode::METHOD_NOT_ALLOWED,
        "text/plain",
        format!("method not allowed; allowed: {allow}\n"),
    );
    r.headers_mut().insert(
        hyper::header::ALLOW,
        hyper::header::HeaderValue::from_static(allow),
    );
    r
}

/// The client side, for `gateway block list|add|remove`.
pub mod client {
    use super::*;

    /// Where the admin endpoint is: its TCP address (reads only) or its
    /// socket (reads and changes).
    #[derive(Debug, Clone)]
    pub enum Endpoint {
        Tcp(SocketAddr),
        Socket(PathBuf),
    }

    impl std::fmt::Display for Endpoint {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Endpoint::Tcp(a) => write!(f, "{a}"),
                Endpoint::Socket(p) => write!(f, "{}", p.display()),
            }
        }
    }

    #[derive(Debug, thiserror::Error)]
    pub enum ClientError {
        #[error("connecting to the admin endpoint {at}: {source}")]
        Connect {
            at: Endpoint,
            source: std::io::Error,
        },
        #[error("talking to the admin endpoint {at}: {reason}")]
        Http { at: Endpoint, reason: String },
        #[error("the admin endpoint {at} said {status}: {message}")]
        Refused {
            at: Endpoint,
            status: u16,
            message: String,
        },
    }

    /// One request to `at`; the response body when it succeeded.
    async fn request(
        at: &Endpoint,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<Bytes, ClientError> {
        let connect = |source| ClientError::Connect {
            at: at.clone(),
            source,
        };
        let timed_out = || connect(std::io::ErrorKind::TimedOut.into());
        let (status, body) = match at {
            Endpoint::Tcp(addr) => {
                let stream =
                    tokio::time::timeout(HEADER_TIMEOUT, tokio::net::TcpStream::connect(addr))
                        .await
                        .map_err(|_| timed_out())?
                        .map_err(connect)?;
                exchange(at, stream, &addr.to_string(), method, path, body).await?
            }
            Endpoint::Socket(p) => {
                let stream =
                    tokio::time::timeout(HEADER_TIMEOUT, tokio::net::UnixStream::connect(p))
                        .await
                        .map_err(|_| timed_out())?
                        .map_err(connect)?;
                exchange(at, stream, "localhost", method, path, body).await?
            }
        };
        if !status.is_success() {
            let message = serde_json::from_slice::<Problem>(&body)
                .map(|p| p.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).trim().to_owned());
            return Err(ClientError::Refused {
                at: at.clone(),
                status: status.as_u16(),
                message,
            });
        }
        Ok(body)
    }

    async fn exchange<IO>(
        at: &Endpoint,
        io: IO,
        host: &str,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<(StatusCode, Bytes), ClientError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let http = |reason: String| ClientError::Http {
            at: at.clone(),
            reason,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| http(e.to_string()))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, host)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| http(e.to_string()))?;
        tokio::time::timeout(REQUEST_DEADLINE, async {
            let response = sender
                .send_request(req)
                .await
                .map_err(|e| http(e.to_string()))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), 16 << 20)
                .collect()
                .await
                .map_err(|e| http(e.to_string()))?
                .to_bytes();
            Ok::<_, ClientError>((status, body))
        })
        .await
        .map_err(|_| http("no answer in time".into()))?
    }

    pub async fn list(at: &Endpoint) -> Result<Vec<Entry>, ClientError> {
        let body = request(at, Method::GET, "/block", None).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Http {
            at: at.clone(),
            reason: format!("not a block list: {e}"),
        })
    }

    /// Blocks `source` (for `ttl`, else until removed); `force` takes a
    /// prefix wider than a /16 or /32.
    pub async fn add(
        at: &Endpoint,
        source: &str,
        ttl: Option<&str>,
        force: bool,
    ) -> Result<Entry, ClientError> {
        let body = serde_json::to_string(&AddRequest {
            source: source.to_owned(),
            r#for: ttl.map(str::to_owned),
            force,
        })
        .unwrap_or_default();
        let body = request(at, Method::POST, "/block", Some(body)).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Http {
            at: at.clone(),
            reason: format!("not a block list entry: {e}"),
        })
    }

    /// `GET /rollout/report`, for `gateway rollout report`.
    pub async fn rollout_report(
        at: &Endpoint,
        route: Option<&str>,
        since: Option<&str>,
    ) -> Result<crate::rollout::Report, ClientError> {
        use crate::rollout::percent_encode;
        let mut query = Vec::new();
        if let Some(r) = route {
            query.push(format!("route={}", percent_encode(r)));
        }
        if let Some(s) = since {
            query.push(format!("since={}", percent_encode(s)));
        }
        let path = format!("/rollout/report?{}", query.join("&"));
        let body = request(at, Method::GET, &path, None).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Http {
            at: at.clone(),
            reason: format!("not an audit report: {e}"),
        })
    }

    /// `GET /rollout/history`, for `gateway rollout history`.
    pub async fn rollout_history(at: &Endpoint) -> Result<crate::revisions::History, ClientError> {
        let body = request(at, Method::GET, "/rollout/history", None).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Http {
            at: at.clone(),
            reason: format!("not a revision history: {e}"),
        })
    }

    /// `POST /rollout/revert`, for `gateway rollout revert N`.
    pub async fn rollout_revert(
        at: &Endpoint,
        revision: u64,
        force: bool,
    ) -> Result<Reverted, ClientError> {
        let body = serde_json::to_string(&RevertRequest { revision, force }).unwrap_or_default();
        let body = request(at, Method::POST, "/rollout/revert", Some(body)).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Http {
            at: at.clone(),
            reason: format!("not a revert's answer: {e}"),
        })
    }

    /// `POST /reload`, for `gateway reload`: the report, or the refusal
    /// (`ClientError::Refused`, 409 when the reload guard held it).
    pub async fn reload(at: &Endpoint, force: bool) -> Result<Reloaded, ClientError> {
        let body = serde_json::to_string(&ReloadRequest { force }).unwrap_or_default();
        let body = request(at, Method::POST, "/reload", Some(body)).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Http {
            at: at.clone(),
            reason: format!("not a reload report: {e}"),
        })
    }

    /// `POST /reload/preview`, for `gateway check --against`.
    pub async fn preview(
        at: &Endpoint,
        config: &Path,
        since: Option<&str>,
    ) -> Result<crate::preview::Preview, ClientError> {
        let body = serde_json::to_string(&PreviewRequest {
            config: config.to_owned(),
            since: since.map(str::to_owned),
        })
        .unwrap_or_default();
        let body = request(at, Method::POST, "/reload/preview", Some(body)).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Http {
            at: at.clone(),
            reason: format!("not a reload preview: {e}"),
        })
    }

    pub async fn remove(at: &Endpoint, source: &str) -> Result<(), ClientError> {
        let path = format!("/block?source={}", source.replace('/', "%2F"));
        request(at, Method::DELETE, &path, None).await.map(|_| ())
    }

    /// `GET /connections`.
    pub async fn connections(at: &Endpoint) -> Result<Connections, ClientError> {
        let body = request(at, Method::GET, "/connections", None).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Http {
            at: at.clone(),
            reason: format!("not a connection list: {e}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_that_name_the_endpoint_by_address_or_localhost() {
        for good in [
            "127.0.0.1",
            "127.0.0.1:9901",
            "[::1]:9901",
            "[::1]",
            "::1",
            "localhost",
            "LOCALHOST:80",
        ] {
            assert!(host_is_literal(good), "{good}");
        }
        for bad in [
            "",
            "evil.example",
            "evil.example:9901",
            "127.0.0.1.nip.io:80",
        ] {
            assert!(!host_is_literal(bad), "{bad}");
        }
    }

    #[test]
    fn blocks_wider_than_a_16_or_32_need_force_and_a_0_is_never_taken() {
        let net = |s: &str| parse_source(s).unwrap();
        assert!(check_width(net("192.0.0.0/16"), false).is_ok());
        assert!(check_width(net("2001:db8::/32"), false).is_ok());
        assert!(check_width(net("10.0.0.0/8"), false).is_err());
        assert!(check_width(net("10.0.0.0/8"), true).is_ok());
        assert!(check_width(net("2001::/16"), false).is_err());
        for every in ["0.0.0.0/0", "::/0", "::ffff:0.0.0.0/96"] {
            assert!(check_width(net(every), true).is_err(), "{every}");
        }
    }
}

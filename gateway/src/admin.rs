//! The admin endpoint (`admin` in the config): HTTP/1.1 served by hyper,
//! with a small router and limits on everything a client could stretch:
//! connections at once, header size and count, time to send the headers,
//! body size, and a connection's whole life.
//!
//! Routes:
//! - `GET /metrics`: Prometheus text, to anyone who can reach the socket.
//! - `GET /block`, `POST /block`, `DELETE /block?source=NET`: the block
//!   list as JSON, only to clients in `admin_clients` (loopback by
//!   default), since they show and change who may connect.
//!
//! `gateway block list|add|remove` is the client side ([`client`]).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admission::{Admission, AdmissionError, Blocked};

/// Admin connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 32;
/// Time to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection's whole life (reading the request, answering it).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// hyper's read buffer: the headers must fit (its minimum is 8 KiB).
const MAX_HEADER_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 32;
const MAX_BODY_BYTES: usize = 16 * 1024;

/// What the endpoint serves.
pub struct Routes {
    /// The body of `GET /metrics`, made per request.
    pub metrics: Box<dyn Fn() -> String + Send + Sync>,
    /// The block list, where the endpoint has one (the gateway's, not the
    /// remote guard's).
    pub admission: Option<Arc<Admission>>,
    /// Who may use `/block`.
    pub clients: Vec<IpNet>,
}

/// Serves `routes` on `socket` until `stop`.
pub async fn serve(socket: TcpListener, routes: Routes, stop: CancellationToken) {
    let routes = Arc::new(routes);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(client = %peer, "admin: too many connections; closed");
            continue;
        };
        let routes = routes.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let routes = routes.clone();
                async move { Ok::<_, Infallible>(route(&routes, peer, req).await) }
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            // One request per connection, as scrapers and the CLI use it.
            http.timer(TokioTimer::new())
                .keep_alive(false)
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES)
                .max_headers(MAX_HEADERS);
            let conn = http.serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
            drop(slot);
        });
    }
}

type Reply = Response<Full<Bytes>>;

async fn route(routes: &Routes, peer: SocketAddr, req: Request<Incoming>) -> Reply {
    let path = req.uri().path().to_owned();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/metrics") => text(
            StatusCode::OK,
            crate::metrics::CONTENT_TYPE,
            (routes.metrics)(),
        ),
        (_, "/metrics") => not_allowed("GET"),
        (_, "/block") => match &routes.admission {
            None => not_found(),
            Some(_) if !allowed(&routes.clients, peer.ip()) => json(
                StatusCode::FORBIDDEN,
                &Problem::new(format!(
                    "{} is not in admin_clients: /block is not served to it",
                    peer.ip()
                )),
            ),
            Some(admission) => block(admission, req).await,
        },
        _ => not_found(),
    }
}

fn allowed(clients: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    clients.iter().any(|n| n.contains(&ip))
}

/// `/block`: list, add, remove.
async fn block(admission: &Admission, req: Request<Incoming>) -> Reply {
    match *req.method() {
        Method::GET => json(
            StatusCode::OK,
            &admission
                .blocked()
                .iter()
                .map(Entry::from)
                .collect::<Vec<_>>(),
        ),
        Method::POST => {
            let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return json(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        &Problem::new(format!("reading the body: {e}")),
                    );
                }
            };
            let add: AddRequest = match serde_json::from_slice(&body) {
                Ok(a) => a,
                Err(e) => {
                    return json(
                        StatusCode::BAD_REQUEST,
                        &Problem::new(format!(
                            "expected {{\"source\": \"192.0.2.7\" or \"192.0.2.0/24\", \"for\": \"1h\" (optional)}}: {e}"
                        )),
                    );
                }
            };
            let net = match parse_source(&add.source) {
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
        Method::DELETE => {
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
        _ => not_allowed("GET, POST, DELETE"),
    }
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
struct AddRequest {
    source: String,
    #[serde(default)]
    r#for: Option<String>,
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
    text(status, "application/json", body)
}

fn not_found() -> Reply {
    text(
        StatusCode::NOT_FOUND,
        "text/plain",
        "not found: GET /metrics, and /block (GET, POST, DELETE) where there is a block list\n"
            .into(),
    )
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

    #[derive(Debug, thiserror::Error)]
    pub enum ClientError {
        #[error("connecting to the admin endpoint {addr}: {source}")]
        Connect {
            addr: SocketAddr,
            source: std::io::Error,
        },
        #[error("talking to the admin endpoint {addr}: {reason}")]
        Http { addr: SocketAddr, reason: String },
        #[error("the admin endpoint {addr} said {status}: {message}")]
        Refused {
            addr: SocketAddr,
            status: u16,
            message: String,
        },
    }

    /// One request to `addr`; the response body when it succeeded.
    async fn request(
        addr: SocketAddr,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<Bytes, ClientError> {
        let http = |reason: String| ClientError::Http { addr, reason };
        let stream = tokio::time::timeout(HEADER_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Connect {
                addr,
                source: std::io::ErrorKind::TimedOut.into(),
            })?
            .map_err(|source| ClientError::Connect { addr, source })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http(e.to_string()))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, addr.to_string())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| http(e.to_string()))?;
        let response = tokio::time::timeout(CONNECTION_LIFETIME, async {
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
        .map_err(|_| http("no answer in time".into()))??;
        let (status, body) = response;
        if !status.is_success() {
            let message = serde_json::from_slice::<Problem>(&body)
                .map(|p| p.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).trim().to_owned());
            return Err(ClientError::Refused {
                addr,
                status: status.as_u16(),
                message,
            });
        }
        Ok(body)
    }

    pub async fn list(addr: SocketAddr) -> Result<Vec<Entry>, ClientError> {
        let body = request(addr, Method::GET, "/block", None).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Http {
            addr,
            reason: format!("not a block list: {e}"),
        })
    }

    pub async fn add(
        addr: SocketAddr,
        source: &str,
        ttl: Option<&str>,
    ) -> Result<Entry, ClientError> {
        let body = serde_json::to_string(&AddRequest {
            source: source.to_owned(),
            r#for: ttl.map(str::to_owned),
        })
        .unwrap_or_default();
        let body = request(addr, Method::POST, "/block", Some(body)).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Http {
            addr,
            reason: format!("not a block list entry: {e}"),
        })
    }

    pub async fn remove(addr: SocketAddr, source: &str) -> Result<(), ClientError> {
        let path = format!("/block?source={}", source.replace('/', "%2F"));
        request(addr, Method::DELETE, &path, None).await.map(|_| ())
    }
}

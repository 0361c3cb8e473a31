//! The issuer's HTTPS service: TLS 1.3 (no resumption, so every request's
//! device certificate is checked in full), the device certificate checked
//! by the gateway's own `tls::Bundle` (chain, clientAuth, CRLs along the
//! path) and identity rules. A client without a certificate may connect
//! (`GET /v1/config` says where the provider is; `gateway login` presents
//! the device certificate for it too), but the endpoints that issue
//! answer 401 without one.
//!
//! Routes: `GET /v1/config`, `POST /v1/nonce`, `POST /v1/certificate`,
//! `POST /v1/renewal` (a refreshed ID token, `Grant::Refresh`); all but
//! the nonce take `?profile=NAME` (none: the `default` profile).
//! `GET /metrics` is served apart, in plain HTTP on a loopback address
//! (`metrics_listen`, `serve_metrics`), never here: this listener takes
//! clients without a certificate, and a scraper should not need a device
//! certificate (one that may also ask for nonces) to read counters.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{CertificateRequest, Grant, Issuer, Refusal};
use crate::identity::Identity;
use crate::tls::bundle::{Bundle, BundleFiles};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}")]
    Tls(String),
    #[error("{0}")]
    Config(#[from] super::config::ConfigError),
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "issuer.toml read again as user {user:?}, whom the issuer now runs as: {source}; every \
         SIGHUP reads it as that user, so each reload would fail and this start's config stay in \
         service whatever is changed: make it readable by that user (its group, or mode 0644: it \
         holds no secret), still root's and writable by root alone"
    )]
    NotReloadable {
        user: String,
        source: super::config::ConfigError,
    },
}

const MAX_BODY: usize = 64 << 10;
/// A connection's whole life: a login's requests take well under a second
/// besides a JWKS fetch (15 s at most).
const CONNECTION_DEADLINE: Duration = Duration::from_secs(30);
/// The TLS handshake and each request's headers: a client that sends
/// nothing gives its slot back soon.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection without a device certificate (`GET /v1/config`, one
/// request) is done well within this after its handshake; it does not get
/// the 30 s a device's certificate request may need.
pub const CERTLESS_DEADLINE: Duration = Duration::from_secs(5);
/// A request body (at most `MAX_BODY`) arrives within this.
const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// The device CA's check, as a route's verifier makes it: chain and CRLs by
/// the bundle, then the leaf must be an identity the gateway can read and
/// carry a device SAN under the configured prefix.
#[derive(Debug)]
struct DeviceVerifier {
    bundle: Bundle,
    prefix: String,
    /// The SSO CA's own keys: a chain through one of them is a user
    /// certificate, never a device's (see `SsoCa`).
    sso: SsoCa,
}

/// The SSO CA's public keys (root and intermediate, SPKI DER) and key
/// identifiers, from `ca_dir`. An issued user certificate carries the
/// device URI and clientAuth: were the SSO CA (or a cross-certificate of
/// its key) among the device trust, it would pass as a device certificate,
/// and its holder would get nonces and, with the user's token, new user
/// certificates without the device's key, past the device's revocation.
#[derive(Debug, Default)]
struct SsoCa {
    spkis: Vec<Vec<u8>>,
    key_ids: Vec<Vec<u8>>,
}

impl SsoCa {
    fn load(ca_dir: &std::path::Path) -> Result<SsoCa, ServerError> {
        use x509_parser::extensions::ParsedExtension;
        use x509_parser::prelude::FromDer as _;
        let mut sso = SsoCa::default();
        for name in ["ca.pem", "root.pem", "intermediate.pem"] {
            let path = ca_dir.join(name);
            // root.pem is only the root's copy of ca.pem.
            if name == "root.pem" && !path.exists() {
                continue;
            }
            let certs = crate::tls::certs::load_certs(&path)
                .map_err(|e| ServerError::Tls(format!("ca_dir: {e}")))?;
            for der in &certs {
                let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
                    .map_err(|e| ServerError::Tls(format!("{}: {e}", path.display())))?;
                sso.spkis
                    .push(cert.tbs_certificate.subject_pki.raw.to_vec());
                for ext in cert.extensions() {
                    if let ParsedExtension::SubjectKeyIdentifier(kid) = ext.parsed_extension() {
                        sso.key_ids.push(kid.0.to_vec());
                    }
                }
            }
        }
        Ok(sso)
    }

    fn has_key(&self, der: &[u8]) -> bool {
        use x509_parser::prelude::FromDer as _;
        x509_parser::certificate::X509Certificate::from_der(der).is_ok_and(|(_, c)| {
            self.spkis
                .iter()
                .any(|k| k.as_slice() == c.tbs_certificate.subject_pki.raw)
        })
    }

    /// Whether the leaf was signed by one of the SSO CA's keys, by its
    /// authorityKeyIdentifier (what the SSO CA puts in every leaf).
    fn issued(&self, leaf: &[u8]) -> bool {
        use x509_parser::extensions::ParsedExtension;
        use x509_parser::prelude::FromDer as _;
        let Ok((_, cert)) = x509_parser::certificate::X509Certificate::from_der(leaf) else {
            return false;
        };
        cert.extensions()
            .iter()
            .any(|ext| match ext.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(aki) => aki
                    .key_identifier
                    .as_ref()
                    .is_some_and(|k| self.key_ids.iter().any(|i| i.as_slice() == k.0)),
                _ => false,
            })
    }
}

impl ClientCertVerifier for DeviceVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        // Checked per endpoint, so a missing certificate gets a clear 401
        // rather than an alert (see the module comment).
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.bundle.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.bundle.verify(end_entity, intermediates, now)?;
        if self.sso.issued(end_entity) || intermediates.iter().any(|c| self.sso.has_key(c)) {
            tracing::warn!(
                "issuer: a certificate of the SSO CA presented as a device certificate refused"
            );
            return Err(Error::InvalidCertificate(CertificateError::UnknownIssuer));
        }
        let id = Identity::from_leaf(end_entity)
            .map_err(|_| Error::InvalidCertificate(CertificateError::NotValidForName))?;
        self.bundle
            .admits_uris(&id.uris)
            .map_err(|_| Error::InvalidCertificate(CertificateError::NotValidForName))?;
        if id.device(&self.prefix).is_none() {
            tracing::info!(identity = %id, "issuer: a certificate without a device SAN refused");
            return Err(Error::InvalidCertificate(CertificateError::NotValidForName));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, self.bundle.algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, self.bundle.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.bundle.algorithms().supported_schemes()
    }
}

/// The TLS acceptor for `config`: its certificate, device mTLS.
pub fn acceptor(
    config: &super::config::IssuerConfig,
) -> Result<tokio_rustls::TlsAcceptor, ServerError> {
    use crate::tls::certs;
    let err = |e: &dyn std::fmt::Display| ServerError::Tls(e.to_string());
    if !config.allow_shared_keys {
        certs::check_key_private(&config.key).map_err(|e| err(&e))?;
    }
    let provider = crate::tls::provider();
    let files = BundleFiles {
        ca: config.device_trust.ca.clone(),
        crls: config.device_trust.crls.clone(),
        crl_expired: config.device_trust.crl_expired,
        spiffe_trust_domains: None,
    };
    let bundle = Bundle::load(
        "issuer device_trust".into(),
        &files,
        provider.signature_verification_algorithms,
        Arc::new(AtomicU64::new(0)),
    )
    .map_err(|e| err(&e))?;
    // At start and at every reload: the SSO CA is never device trust.
    let sso = SsoCa::load(&config.ca_dir)?;
    let anchors = certs::load_certs(&config.device_trust.ca).map_err(|e| err(&e))?;
    if anchors.iter().any(|a| sso.has_key(a)) {
        return Err(ServerError::Tls(format!(
            "device_trust.ca {} holds the SSO CA's own key ({}): every user certificate \
             would then pass as a device certificate; give the device CA, never the SSO CA",
            config.device_trust.ca.display(),
            config.ca_dir.display()
        )));
    }
    let verifier = Arc::new(DeviceVerifier {
        bundle,
        prefix: config.device_san_prefix.clone(),
        sso,
    });
    let chain = certs::load_certs(&config.cert).map_err(|e| err(&e))?;
    let key = certs::load_key(&config.key).map_err(|e| err(&e))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| err(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| err(&format!("{}: {e}", config.cert.display())))?;
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(tls)))
}

/// Binds `addr` now, outside any runtime: `gateway issuer` binds before
/// it drops to `user` (a port below 1024 needs root), and the runtime is
/// built only after the drop (`privilege::drop_alone`).
pub fn bind_std(addr: SocketAddr) -> Result<std::net::TcpListener, ServerError> {
    let listen = |source| ServerError::Listen { addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(listen)?;
    // tokio takes only non-blocking sockets (`TcpListener::from_std`).
    listener.set_nonblocking(true).map_err(listen)?;
    Ok(listener)
}

/// Binds `config.listen`.
pub async fn bind(config: &super::config::IssuerConfig) -> Result<TcpListener, ServerError> {
    TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Listen {
            addr: config.listen,
            source,
        })
}

/// The acceptor in service; `reload` swaps in one built from the files
/// as they are now (the device CA and its CRLs, the issuer's certificate).
pub type Acceptor = Arc<arc_swap::ArcSwap<tokio_rustls::TlsAcceptor>>;

/// Builds the acceptor again and swaps it in; on failure the one in
/// service stays and the error is returned (never serve without the
/// device check).
pub fn reload(config: &super::config::IssuerConfig, current: &Acceptor) -> Result<(), ServerError> {
    let fresh = acceptor(config)?;
    current.store(Arc::new(fresh));
    Ok(())
}

/// SIGHUP: reads `path` (issuer.toml) again and, if it loads, may replace
/// the one in service (`IssuerConfig::check_reload`) and its TLS acceptor
/// builds (the device CA and CRLs, the issuer's certificate, as now
/// named), puts both in service. Otherwise nothing changes: the error is
/// logged, counted (`gateway_issuer_config_reload_failures_total`) and
/// returned, and the config in service keeps serving.
/// Right after a root start's drop to `user`: issuer.toml read again as
/// that user, as every SIGHUP does (`reload_config`). A file only root
/// can read (root's, 0600) passes every check at start and would make
/// each reload fail; it stops the start instead, like the other files the
/// user must read.
pub fn check_reloadable(path: &std::path::Path, user: &str) -> Result<(), ServerError> {
    super::config::IssuerConfig::load(path)
        .map(drop)
        .map_err(|source| ServerError::NotReloadable {
            user: user.to_owned(),
            source,
        })
}

pub fn reload_config(
    path: &std::path::Path,
    issuer: &Issuer,
    current: &Acceptor,
) -> Result<(), ServerError> {
    let fresh = super::config::IssuerConfig::load(path)
        .map_err(ServerError::from)
        .and_then(|new| {
            issuer.current_config().check_reload(&new, path)?;
            let acceptor = acceptor(&new)?;
            Ok((new, acceptor))
        });
    match fresh {
        Ok((new, acceptor)) => {
            current.store(Arc::new(acceptor));
            issuer.replace_config(new);
            Ok(())
        }
        Err(e) => {
            issuer.config_reload_failed(&e);
            Err(e)
        }
    }
}

/// Serves until `stop`. Each connection takes the acceptor in service
/// when it is accepted.
pub async fn serve(
    listener: TcpListener,
    acceptor: Acceptor,
    issuer: Arc<Issuer>,
    stop: CancellationToken,
) {
    // Summaries of refusals at accept are written when due, not only at
    // the next refusal.
    tokio::spawn({
        let (issuer, stop) = (issuer.clone(), stop.clone());
        async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(5)) => {
                        issuer.slots.flush_log(std::time::Instant::now());
                    }
                }
            }
        }
    });
    loop {
        let Some((tcp, peer)) = accept(&listener, &stop, "issuer").await else {
            return;
        };
        // Refused: counted and logged by `Slots`; the connection closes.
        let Ok(slot) = issuer.slots.take(peer.ip(), std::time::Instant::now()) else {
            continue;
        };
        let (acceptor, issuer) = (acceptor.load_full(), issuer.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let started = tokio::time::Instant::now();
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "issuer: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::info!(%peer, "issuer: no TLS handshake in time; closed");
                    return;
                }
            };
            let device = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|leaf| Identity::from_leaf(leaf).ok());
            if let Some(id) = &device {
                let prefix = &issuer.current_config().device_san_prefix;
                if let Some(name) = id.device(prefix) {
                    issuer
                        .slots
                        .device_verified(peer.ip(), name, std::time::Instant::now());
                }
            }
            // Only a device may keep a slot for a certificate request's
            // whole deadline; without one, a few seconds for `/v1/config`.
            let deadline = if device.is_some() {
                started + CONNECTION_DEADLINE
            } else {
                tokio::time::Instant::now() + CERTLESS_DEADLINE
            };
            let served = tokio::time::timeout_at(deadline, async {
                let device = Arc::new(device);
                let service = hyper::service::service_fn(move |req| {
                    let (issuer, device) = (issuer.clone(), device.clone());
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            handle(&issuer, device.as_ref().as_ref(), req).await,
                        )
                    }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HANDSHAKE_TIMEOUT)
                    .serve_connection(TokioIo::new(tls), service)
                    .await
                {
                    tracing::debug!(%peer, error = %e, "issuer: connection ended");
                }
            })
            .await;
            if served.is_err() {
                tracing::info!(%peer, "issuer: connection cut at its deadline");
            }
        });
    }
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &str, body: String) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn json(status: StatusCode, value: &serde_json::Value) -> Reply {
    reply(status, "application/json", value.to_string())
}

fn refusal(e: &Refusal) -> Reply {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::FORBIDDEN);
    json(
        status,
        &serde_json::json!({ "error": e.reason(), "message": e.to_string() }),
    )
}

async fn handle(issuer: &Issuer, device: Option<&Identity>, req: Request<Incoming>) -> Reply {
    let (parts, body) = req.into_parts();
    let profile = parts
        .uri
        .query()
        .and_then(|q| super::http::query_value(q, "profile"));
    let profile = profile.as_deref();
    match (parts.method.clone(), parts.uri.path()) {
        (Method::GET, "/v1/config") => {
            let c = issuer.current_config();
            // The profile's own rules that the sign-in must meet; an
            // unknown one is answered here already, with the names.
            let (name, p) = match super::profile_of(&c, profile) {
                Ok(p) => p,
                Err(e) => return refusal(&e),
            };
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "issuer": c.oidc.issuer,
                    "client_id": c.oidc.client_id,
                    "scopes": c.oidc.scopes,
                    "device_san_prefix": c.device_san_prefix,
                    "profile": name,
                    "profiles": c.profile.names(),
                    "max_age": p.max_auth_age.map(|d| d.as_secs()),
                    "refresh": p.refresh,
                }),
            )
        }
        (Method::POST, "/v1/nonce") => match issuer.nonce(device) {
            Ok(nonce) => json(StatusCode::OK, &serde_json::json!({ "nonce": nonce })),
            Err(e) => refusal(&e),
        },
        (Method::POST, path @ ("/v1/certificate" | "/v1/renewal")) => {
            let grant = if path == "/v1/renewal" {
                Grant::Refresh
            } else {
                Grant::SignIn
            };
            // No device, no reading: a client without one is told so before
            // it can hold the connection by trickling a body.
            if device.is_none() {
                let e = Refusal::NoDevice;
                issuer.refused_early(&e);
                return refusal(&e);
            }
            let body =
                match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY).collect())
                    .await
                {
                    Ok(Ok(b)) => b.to_bytes(),
                    Ok(Err(e)) => return refusal(&Refusal::BadRequest(format!("body: {e}"))),
                    Err(_) => {
                        return refusal(&Refusal::BadRequest(format!(
                            "body not received within {BODY_TIMEOUT:?}"
                        )));
                    }
                };
            let req: CertificateRequest = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => return refusal(&Refusal::BadRequest(format!("not a request: {e}"))),
            };
            match issuer.issue_as(device, req, grant, profile).await {
                Ok(answer) => match serde_json::to_value(&answer) {
                    Ok(v) => json(StatusCode::OK, &v),
                    Err(e) => refusal(&Refusal::Internal(e.to_string())),
                },
                Err(e) => refusal(&e),
            }
        }
        (_, "/v1/config" | "/v1/nonce" | "/v1/certificate" | "/v1/renewal") => json(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({ "error": "method" }),
        ),
        _ => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({ "error": "not_found" }),
        ),
    }
}

/// Connections the metrics listener serves at once (a scraper or two).
const METRICS_CONNECTIONS: usize = 8;
/// A scrape's whole connection: a request or two, well within this.
const METRICS_DEADLINE: Duration = Duration::from_secs(10);

/// Binds `metrics_listen`, if set.
pub async fn bind_metrics(
    config: &super::config::IssuerConfig,
) -> Result<Option<TcpListener>, ServerError> {
    let Some(addr) = config.metrics_listen else {
        return Ok(None);
    };
    TcpListener::bind(addr)
        .await
        .map(Some)
        .map_err(|source| ServerError::Listen { addr, source })
}

/// The next connection on `listener`, or None once `stop` is cancelled.
/// A failed accept (out of descriptors, mostly) is logged and tried
/// again a moment later, rather than spun on.
async fn accept(
    listener: &TcpListener,
    stop: &CancellationToken,
    what: &str,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            () = stop.cancelled() => return None,
            r = listener.accept() => match r {
                Ok(x) => return Some(x),
                Err(e) => {
                    tracing::warn!(error = %e, "{what}: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Connections holding a metrics slot that have not sent their request
/// yet, oldest first: each one's id and what cuts it.
type Waiting = Arc<std::sync::Mutex<std::collections::VecDeque<(u64, CancellationToken)>>>;

/// Serves `GET /metrics` in plain HTTP on `listener` (`metrics_listen`, a
/// loopback address) until `stop`, with the issuer's limits: a few
/// connections at once, each cut at `METRICS_DEADLINE`, one request each.
///
/// Every local user may connect to a loopback port, and one who held every
/// slot with silent connections kept every scrape out (and with it the
/// alert on `crl_publish_failures_total`). So when all slots are busy, a
/// new connection takes the slot of the one that has waited longest
/// without sending its request: a scraper sends it at once and is answered
/// at once, and a connection that has sent its request is closed once
/// answered (no keep-alive), so silence is the only way to hold a slot,
/// and silence gives it up.
pub async fn serve_metrics(listener: TcpListener, issuer: Arc<Issuer>, stop: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS));
    let waiting: Waiting = Arc::default();
    let mut next_id = 0u64;
    loop {
        let Some((tcp, peer)) = accept(&listener, &stop, "issuer metrics").await else {
            return;
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                let oldest = waiting
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .pop_front();
                let Some((_, cut)) = oldest else {
                    tracing::warn!(%peer, "issuer metrics: all connection slots busy answering; refused");
                    continue;
                };
                tracing::warn!(%peer, "issuer metrics: all connection slots busy; the longest silent connection closed for this one");
                cut.cancel();
                // Its task lets go of the slot as it ends.
                match tokio::time::timeout(
                    Duration::from_millis(500),
                    slots.clone().acquire_owned(),
                )
                .await
                {
                    Ok(Ok(slot)) => slot,
                    _ => continue,
                }
            }
        };
        next_id += 1;
        let id = next_id;
        let cut = CancellationToken::new();
        waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back((id, cut.clone()));
        let issuer = issuer.clone();
        let waiting = waiting.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let asked = waiting.clone();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let issuer = issuer.clone();
                // It asked: no longer one to close for a newcomer.
                asked
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|(i, _)| *i != id);
                async move {
                    Ok::<_, std::convert::Infallible>(match (req.method(), req.uri().path()) {
                        (&Method::GET, "/metrics") => reply(
                            StatusCode::OK,
                            "text/plain; version=0.0.4",
                            metrics(&issuer),
                        ),
                        (_, "/metrics") => json(
                            StatusCode::METHOD_NOT_ALLOWED,
                            &serde_json::json!({ "error": "method" }),
                        ),
                        _ => json(
                            StatusCode::NOT_FOUND,
                            &serde_json::json!({ "error": "not_found" }),
                        ),
                    })
                }
            });
            let served = tokio::select! {
                served = tokio::time::timeout(
                    METRICS_DEADLINE,
                    hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(HANDSHAKE_TIMEOUT)
                        .keep_alive(false)
                        .serve_connection(TokioIo::new(tcp), service),
                ) => served,
                () = cut.cancelled() => Ok(Ok(())),
            };
            waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|(i, _)| *i != id);
            if let Ok(Err(e)) = served {
                tracing::debug!(%peer, error = %e, "issuer metrics: connection ended");
            }
        });
    }
}

pub(crate) fn metrics(issuer: &Issuer) -> String {
    let super::Counters {
        by_profile,
        nonces,
        crl_published,
        crl_publish_failures,
        index_pruned,
        config_reloads,
        config_reload_failures,
        store_lock_timeouts,
        refusals_unlogged,
        intermediate_revoked,
        ..
    } = issuer.counters();
    let mut out = String::new();
    // Every configured profile has its line from the start (0 until used).
    let mut by_profile = by_profile;
    for name in issuer.current_config().profile.names() {
        by_profile.entry(name.to_owned()).or_default();
    }
    out.push_str("# HELP gateway_issuer_issued_total User certificates issued, by profile.\n");
    out.push_str("# TYPE gateway_issuer_issued_total counter\n");
    for (profile, c) in by_profile.iter().filter(|(p, _)| *p != super::NO_PROFILE) {
        out.push_str(&format!(
            "gateway_issuer_issued_total{{profile=\"{profile}\"}} {}\n",
            c.issued
        ));
    }
    out.push_str("# HELP gateway_issuer_refreshed_total User certificates issued on a refreshed ID token (gateway login --renew without the user; also in issued_total), by profile.\n");
    out.push_str("# TYPE gateway_issuer_refreshed_total counter\n");
    for (profile, c) in by_profile.iter().filter(|(p, _)| *p != super::NO_PROFILE) {
        out.push_str(&format!(
            "gateway_issuer_refreshed_total{{profile=\"{profile}\"}} {}\n",
            c.refreshed
        ));
    }
    out.push_str("# HELP gateway_issuer_nonces_total Nonces handed to devices.\n");
    out.push_str("# TYPE gateway_issuer_nonces_total counter\n");
    out.push_str(&format!("gateway_issuer_nonces_total {nonces}\n"));
    out.push_str(
        "# HELP gateway_issuer_crl_published_total The SSO CA's CRL re-signed by the issuer.\n",
    );
    out.push_str("# TYPE gateway_issuer_crl_published_total counter\n");
    out.push_str(&format!(
        "gateway_issuer_crl_published_total {crl_published}\n"
    ));
    out.push_str("# HELP gateway_issuer_crl_publish_failures_total Re-signing the SSO CA's CRL failed (retried every minute).\n");
    out.push_str("# TYPE gateway_issuer_crl_publish_failures_total counter\n");
    out.push_str(&format!(
        "gateway_issuer_crl_publish_failures_total {crl_publish_failures}\n"
    ));
    out.push_str("# HELP gateway_issuer_intermediate_revoked 1 when the root revoked the intermediate the issuer signs with (every sign-in refused), as the last CRL check read it.\n");
    out.push_str("# TYPE gateway_issuer_intermediate_revoked gauge\n");
    out.push_str(&format!(
        "gateway_issuer_intermediate_revoked {}\n",
        u8::from(intermediate_revoked)
    ));
    out.push_str("# HELP gateway_issuer_index_pruned_total SSO CA index entries dropped, expired more than index_retention ago.\n");
    out.push_str("# TYPE gateway_issuer_index_pruned_total counter\n");
    out.push_str(&format!(
        "gateway_issuer_index_pruned_total {index_pruned}\n"
    ));
    out.push_str("# HELP gateway_issuer_config_reloads_total issuer.toml read again and put in service (SIGHUP).\n");
    out.push_str("# TYPE gateway_issuer_config_reloads_total counter\n");
    out.push_str(&format!(
        "gateway_issuer_config_reloads_total {config_reloads}\n"
    ));
    out.push_str("# HELP gateway_issuer_config_reload_failures_total A new issuer.toml refused (invalid, unreadable, or a change that takes a restart); the previous one stays in service.\n");
    out.push_str("# TYPE gateway_issuer_config_reload_failures_total counter\n");
    out.push_str(&format!(
        "gateway_issuer_config_reload_failures_total {config_reload_failures}\n"
    ));
    out.push_str("# HELP gateway_issuer_store_lock_timeouts_total Waits for the SSO CA store's lock that gave up (a sign-in answered 503, or a CRL check failed).\n");
    out.push_str("# TYPE gateway_issuer_store_lock_timeouts_total counter\n");
    out.push_str(&format!(
        "gateway_issuer_store_lock_timeouts_total {store_lock_timeouts}\n"
    ));
    out.push_str("# HELP gateway_issuer_refusals_unlogged_total Refusals counted in refused_total but not logged: past the log lines one device gets for one reason (5, then one a minute).\n");
    out.push_str("# TYPE gateway_issuer_refusals_unlogged_total counter\n");
    out.push_str(&format!(
        "gateway_issuer_refusals_unlogged_total {refusals_unlogged}\n"
    ));
    out.push_str("# HELP gateway_issuer_refused_total Requests refused, by profile (\"-\": before one was known) and reason.\n");
    out.push_str("# TYPE gateway_issuer_refused_total counter\n");
    for (profile, c) in &by_profile {
        for (reason, n) in &c.refused {
            out.push_str(&format!(
                "gateway_issuer_refused_total{{profile=\"{profile}\",reason=\"{reason}\"}} {n}\n"
            ));
        }
    }
    issuer.slots.render_metrics(&mut out);
    out
}

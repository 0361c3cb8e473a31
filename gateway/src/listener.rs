//! Accepting connections and carrying each one through its life:
//! ClientHello → route by SNI → mTLS handshake (policy inside) → backend
//! connect → forward → one access-log line.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rustls::AlertDescription;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::StartHandshake;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use arc_swap::ArcSwap;

use crate::access_log::{AccessLog, AccessRecord, Verdict, now_rfc3339};
use crate::admission::{Admission, Answer, Refusal, Stage, Ticket};
use crate::config::Mode;
use crate::descriptors::{self, Reserve};
use crate::forward;
use crate::hello;
use crate::metrics::{HandshakeFailure, Metrics};
use crate::offload::{self, Fallback, Framed, KernelSupport, Offload, records, splice};
use crate::policy;
use crate::registry::{Generation, Live, Registry};
use crate::state::{ListenerState, Route};
use crate::tls::CertProblem;
use crate::upstream::{BackendTls, Upstream, UpstreamError};

/// How often one accept loop says its accepts fail (with how many it did
/// not say since).
const ACCEPT_WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Accepts until `stop` fires; each connection runs on `tracker` so shutdown
/// can wait for it. Every accept reads the listener's current state, so a
/// reload takes effect for the next connection and refuses none. Admission
/// decides at accept, before any byte is read, whether the connection may
/// start a handshake. One loop per worker and listener (see `workers`): a
/// connection's task is spawned on the loop's own runtime, so it stays on
/// the worker that accepted it, while the state, admission and registry it
/// is judged by are the ones every worker shares.
pub async fn accept_loop(
    current: Arc<ArcSwap<ListenerState>>,
    socket: TcpListener,
    shared: Shared,
    stop: CancellationToken,
    seat: crate::workers::Seat,
) {
    let name = current.load().name.clone();
    let pool = shared.admission.pool(&name);
    let mut reserve = Reserve::new();
    let (mut warned, mut quiet): (Option<Instant>, u64) = (None, 0);
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => break,
            r = socket.accept() => match r {
                Ok(x) => x,
                Err(e) if descriptors::exhausted(&e) && reserve.release() => {
                    refuse_without_descriptors(&socket, &name, &shared).await;
                    if !reserve.retake() {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                    continue;
                }
                Err(e) => {
                    // No reserve to refuse with, or another error: back off
                    // instead of spinning. A reserve another thread's
                    // descriptor took is taken back as soon as one is free
                    // (attacker review 9, F1: it never was, and every loop
                    // that lost it logged every 50 ms for good).
                    reserve.retake();
                    let now = Instant::now();
                    if warned.is_none_or(|w| now.saturating_duration_since(w) >= ACCEPT_WARN_EVERY) {
                        tracing::warn!(listener = %name, error = %e, since_last = quiet, "accept failed");
                        warned = Some(now);
                        quiet = 0;
                    } else {
                        quiet += 1;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // One spelling per client: a dual-stack listener sees an IPv4 client
        // as ::ffff:a.b.c.d. Policy, the registry, the access log and the
        // metrics all take this canonical address, so IPv4 source rules
        // hold for it.
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        // The generation first: if a reload publishes after this read, the
        // connection is judged again as it goes live (see `registry`).
        let judged_at = shared.registry.generation();
        let listener = current.load_full();
        let ticket = match shared.admission.admit(
            &pool,
            listener.max_connections,
            listener.max_handshakes_in_flight,
            peer,
            Some(&stream),
        ) {
            Answer::Admit(ticket) | Answer::Evict { ticket, .. } => ticket,
            Answer::Refuse(_) => {
                // Counted and logged (at a bounded rate) by admission; a
                // reset leaves no TIME_WAIT behind for a refused stranger.
                offload::reset_if_dropped(&stream, true);
                drop(stream);
                continue;
            }
        };
        let shared = shared.clone();
        let held = seat.admitted();
        shared.tracker.clone().spawn(async move {
            let record = serve(&listener, judged_at, stream, peer, &shared, &ticket).await;
            shared.log.emit(record);
            drop(ticket);
            drop(held);
        });
    }
    tracing::info!(listener = %name, worker = seat.worker(), "stopped accepting");
}

/// With the reserve descriptor given up: accepts the connection waiting in
/// the backlog and resets it, counted, rather than leave it waiting there
/// unanswered while the listener wakes up for it again and again.
async fn refuse_without_descriptors(socket: &TcpListener, name: &str, shared: &Shared) {
    // Only a connection already waiting: every worker wakes for each one
    // and all but one find none, and a reserve left given up while it
    // waits is a descriptor another thread takes (attacker review 9, F1).
    let waiting = tokio::time::timeout(std::time::Duration::ZERO, socket.accept()).await;
    if let Ok(Ok((stream, peer))) = waiting {
        offload::reset_if_dropped(&stream, true);
        drop(stream);
        shared
            .admission
            .refused_at_accept(name, Refusal::OutOfDescriptors, peer);
    }
}

/// What every connection task shares with the app.
#[derive(Clone)]
pub struct Shared {
    pub log: Arc<AccessLog>,
    pub tracker: TaskTracker,
    pub registry: Arc<Registry>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Who may start a handshake, and each listener's slots.
    pub admission: Arc<Admission>,
    /// Fires when the drain timeout is over: close what is left.
    pub close: CancellationToken,
}

/// What is known about a connection so far, for its access-log line.
struct Conn {
    started: Instant,
    listener: String,
    client: SocketAddr,
    route: Option<String>,
    /// The verified identity, handed to the registry once the connection is live.
    /// Boxed: it leaves for the registry, but its room would stay in the task.
    identity_value: Option<Box<crate::identity::Identity>>,
    /// What the chain check learned, for the registry's tick. Boxed, like
    /// the identity: it leaves for the registry, but its room would stay in
    /// the task.
    verified: Option<Box<crate::tls::bundle::Verified>>,
    /// The path that verified it (for admission's known sources).
    path: Option<Box<crate::tls::bundle::Path>>,
    mode: Option<&'static str>,
    sni: Option<String>,
    identity: Option<Vec<String>>,
    /// Names of a certificate whose key the peer never proved.
    claimed_identity: Option<Vec<String>>,
    verdict: Verdict,
    reason: String,
    backend: Option<String>,
    client_to_backend: u64,
    backend_to_client: u64,
    tls_version: Option<String>,
    cipher_suite: Option<String>,
    offload: Option<&'static str>,
    offload_reason: Option<String>,
    /// How its handshake failed, if it did: bounds its access-log line.
    failure: Option<HandshakeFailure>,
}

impl Conn {
    fn new(listener: &ListenerState, client: SocketAddr) -> Self {
        Self {
            started: Instant::now(),
            listener: listener.name.clone(),
            client,
            route: None,
            identity_value: None,
            verified: None,
            path: None,
            mode: None,
            sni: None,
            identity: None,
            claimed_identity: None,
            verdict: Verdict::Error,
            reason: String::new(),
            backend: None,
            client_to_backend: 0,
            backend_to_client: 0,
            tls_version: None,
            cipher_suite: None,
            offload: None,
            offload_reason: None,
            failure: None,
        }
    }

    /// Each way out of the handshake counts one failure, once.
    fn failed(&mut self, listener: &ListenerState, why: HandshakeFailure) {
        listener.stats.handshake_failed(why);
        self.failure = Some(why);
    }

    fn record(self) -> AccessRecord {
        AccessRecord {
            time: now_rfc3339(),
            listener: self.listener,
            route: self.route,
            mode: self.mode.map(str::to_owned),
            client: self.client.to_string(),
            sni: self.sni,
            identity: self.identity,
            claimed_identity: self.claimed_identity,
            verdict: self.verdict,
            reason: self.reason,
            backend: self.backend,
            client_to_backend_bytes: self.client_to_backend,
            backend_to_client_bytes: self.backend_to_client,
            duration_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            tls_version: self.tls_version,
            cipher_suite: self.cipher_suite,
            offload: self.offload.map(str::to_owned),
            offload_reason: self.offload_reason,
            failure: self.failure.map(HandshakeFailure::as_str),
        }
    }
}

/// What a known source is judged by at a reload
/// (`Admission::revalidate`): the identity, and the path its chain check
/// verified (its anchor, each of its certificates' issuer and serial),
/// not what else the client sent (attacker review 11, R11-5, R11-6).
pub(crate) fn proof(
    identity: &crate::identity::Identity,
    path: &crate::tls::bundle::Path,
) -> crate::admission::Proof {
    crate::admission::Proof {
        identity: identity.clone(),
        anchor: path.anchor.clone(),
        certs: path.certs.clone(),
    }
}

/// An `async` block, not an `async fn`, here and in `relay`: an async fn
/// keeps its arguments twice (as arguments and as the locals they move
/// into), and this future lives as long as the connection.
#[allow(clippy::manual_async_fn)]
fn serve<'a>(
    listener: &'a Arc<ListenerState>,
    judged_at: Generation,
    stream: TcpStream,
    peer: SocketAddr,
    shared: &'a Shared,
    ticket: &'a Ticket,
) -> impl Future<Output = AccessRecord> + 'a {
    async move {
        let close = &shared.close;
        let mut conn = Conn::new(listener, peer);
        let _ = stream.set_nodelay(true);
        // Eviction, and the minimum rate while it is the client's turn.
        let watch = ticket.watch(listener);
        // The address the client reached, for a PROXY header's destination.
        let local = stream.local_addr().ok();
        // Boxed, like the other steps that end before the transfer: a task's
        // future is as large as its largest state for the connection's whole
        // life, and the handshake's (rustls' whole connection) is the largest.
        let handshake = tokio::time::timeout(
            listener.handshake_timeout,
            Box::pin(handshake(
                listener,
                stream,
                &mut conn,
                &shared.metrics,
                ticket,
            )),
        );
        let tls = tokio::select! {
            r = handshake => match r {
                Ok(Ok(tls)) => tls,
                Ok(Err(why)) => {
                    conn.failed(listener, why);
                    if why.is_trust() && shared.admission.vouched(&listener.name, peer.ip()) {
                        listener.stats.known_source_failed_trust();
                    }
                    return conn.record();
                }
                Err(_) => {
                    ticket.refused(Refusal::HandshakeTimeout);
                    conn.failed(listener, HandshakeFailure::Timeout);
                    conn.reason = format!("handshake timeout after {:?}", listener.handshake_timeout);
                    return conn.record();
                }
            },
            cut = Box::pin(watch.cut()) => {
                ticket.cut(&cut);
                conn.failed(listener, failure_of(cut.refusal()));
                conn.reason = cut.to_string();
                return conn.record();
            }
            () = close.cancelled() => {
                conn.failed(listener, HandshakeFailure::Timeout);
                conn.reason = "closed during handshake: drain timeout at shutdown".into();
                return conn.record();
            }
        };
        if !ticket.established() {
            // Evicted as the handshake completed (both ready in one poll,
            // and the handshake won): its slot went to the newcomer, so it
            // is cut as evicted rather than served without one.
            let cut = watch.cut().await;
            ticket.cut(&cut);
            conn.failed(listener, failure_of(cut.refusal()));
            conn.reason = cut.to_string();
            return conn.record();
        }
        drop(watch);
        let (route, mut tls) = tls;
        // Made known once the registry takes it (under the state it was
        // judged by): its admission key, and what verified it.
        let mut known = None;
        if conn.verified.is_some() && conn.verdict == Verdict::Allow {
            // The admission identity key: the typed names as a JSON list
            // (names joined with "," made ["urn:a", "urn:b"] and
            // "urn:a,urn:b" one identity, sharing their `identity_share`
            // and known quota: review 7 F11; a URI SAN "dns:x" and a DNS
            // SAN "x" are two: review 10 R10-12).
            let typed = conn
                .identity_value
                .as_deref()
                .map(crate::identity::Identity::typed_names)
                .unwrap_or_default();
            let names = serde_json::to_string(&typed).unwrap_or_default();
            if let (Some(identity), Some(path)) =
                (conn.identity_value.as_deref(), conn.path.as_deref())
            {
                known = Some((names.clone(), proof(identity, path)));
            }
            if !ticket.authenticated(&names) {
                // One identity holds its share of the listener's slots.
                ticket.refused(Refusal::IdentityConnections);
                conn.failed(listener, HandshakeFailure::Policy);
                conn.verdict = Verdict::Error;
                conn.reason = format!(
                    "refused: its identity holds its share of the listener's connections (admission.identity_share) ({})",
                    conn.reason
                );
                offload::reset_if_dropped(tls.get_ref().0.get_ref(), true);
                return conn.record();
            }
        } else if !ticket.unauthenticated() {
            // Let through unauthenticated (audit, `off`), but its source
            // holds as many such connections as it may: one source of
            // certless peers does not hold every slot.
            ticket.refused(Refusal::SourceUnauthenticated);
            conn.failed(listener, HandshakeFailure::Policy);
            conn.verdict = Verdict::Error;
            conn.reason = format!(
                "refused: its source holds as many unauthenticated connections as it may ({})",
                conn.reason
            );
            offload::reset_if_dropped(tls.get_ref().0.get_ref(), true);
            return conn.record();
        }
        // The identity leaves for the registry; a PROXY header reports its CN.
        let common_name = conn
            .identity_value
            .as_ref()
            .and_then(|i| i.common_name.one())
            .map(str::to_owned);
        // From here the connection is live: reloads and the tick re-judge it.
        let registration = shared.registry.register(
            Live {
                state: listener.clone(),
                route: route.clone(),
                sni: conn.sni.clone(),
                client: peer,
                identity: conn.identity_value.take().map(|i| *i),
                chain: tls.get_ref().1.peer_certificates().unwrap_or_default(),
                verified: conn.verified.take().map(|v| *v).unwrap_or_default(),
                judged_at,
            },
            close,
        );
        let (registration, route) = match registration {
            Ok(r) => r,
            Err(refused) => {
                // Allowed by the state its handshake began with, refused by
                // the current one: it never reaches a backend.
                tracing::info!(listener = %listener.name, route = %route.name, client = %peer,
                    reason = %refused, "connection refused");
                conn.verdict = Verdict::Deny;
                conn.reason = refused.to_string();
                route.stats.denied.inc();
                conn.failed(listener, HandshakeFailure::Policy);
                // Reset, not close_notify: a refusal, not an orderly end.
                offload::reset_if_dropped(tls.get_ref().0.get_ref(), true);
                return conn.record();
            }
        };
        listener
            .stats
            .handshake
            .observe(conn.started.elapsed().as_secs_f64());
        // Allowed by the current state too (an audit route that now
        // would deny it earns nothing).
        if let Some((names, proof)) = known
            && registration.would_deny.is_none()
        {
            ticket.known(&names, proof, judged_at.get());
        }
        // The route as the current state has it (a reload during the
        // handshake may have changed its mode or backends): connect with it.
        conn.mode = Some(route.mode().as_str());
        if let Some(why) = &registration.would_deny
            && conn.verdict == Verdict::Allow
        {
            // Allowed by the state its handshake began with; the current
            // one puts the route in audit and would deny it: so it is
            // logged, counted, and told to the backend.
            tracing::warn!(listener = %listener.name, route = %route.name, client = %peer,
                reason = %why, "audit: would deny after a reload, letting through");
            conn.verdict = Verdict::Audit;
            conn.reason = format!("would deny (judged after a reload): {why}");
            route.stats.audited.inc();
        }
        // Let through unauthenticated: a newcomer to a full listener may
        // evict it; the registration's token closes it then.
        ticket.closes_with(&registration.close);
        let why = || {
            registration.reason().unwrap_or_else(|| {
                if ticket.stage() == Stage::Evicted {
                    "evicted: the listener was full and it was not authenticated".into()
                } else {
                    "drain timeout at shutdown".into()
                }
            })
        };
        let standing = crate::proxy_protocol::Standing {
            verdict: conn.verdict,
            mode: route.mode(),
            would_deny: registration.would_deny.is_some(),
        };
        let preface = match proxy_header(
            listener,
            &route,
            &conn,
            local,
            tls.get_ref().1,
            common_name,
            standing,
        ) {
            Ok(preface) => preface,
            Err(e) => {
                // A header the backend would misread (or cannot read)
                // is never sent; nor are the bytes without it.
                tracing::warn!(listener = %listener.name, route = %route.name, client = %peer, error = %e,
                    "closing client connection: no PROXY header");
                shared.metrics.refused(&listener.name, e.label());
                conn.verdict = Verdict::Error;
                conn.reason = format!("refused: {e} ({})", conn.reason);
                let _ = tokio::time::timeout(listener.connect_timeout, tls.shutdown()).await;
                return conn.record();
            }
        };
        // A header that tells the backend "verified, admitted" binds the
        // connection to what enforce would admit from now on, and is
        // checked once more against a reload that came after register.
        let presented = tls
            .get_ref()
            .1
            .peer_certificates()
            .is_some_and(|c| !c.is_empty());
        if preface.is_some()
            && standing.admits(presented)
            && let Err(why) = registration.told_admitted()
        {
            tracing::info!(listener = %listener.name, route = %route.name, client = %peer,
                reason = %why, "closing client connection: no longer admitted after a reload");
            route.stats.denied.inc();
            conn.verdict = Verdict::Deny;
            conn.reason = format!("no longer admitted after a reload: {why}");
            offload::reset_if_dropped(tls.get_ref().0.get_ref(), true);
            return conn.record();
        }
        let connecting = Instant::now();
        let connected = tokio::select! {
            r = Box::pin(route.backends.connect(
                listener.connect_attempts,
                listener.connect_timeout,
                route.upstream_tls.as_ref(),
                preface.as_deref(),
            )) => r,
            () = registration.close.cancelled() => {
                conn.reason = format!("{}; {}", conn.reason, forward::End::Closed(why()));
                return conn.record();
            }
        };
        let (backend, addr) = match connected {
            Ok((backend, addr, failed)) => {
                route
                    .stats
                    .connect
                    .observe(connecting.elapsed().as_secs_f64());
                for f in &failed {
                    shared
                        .metrics
                        .backend_failed(&listener.name, &route.name, f);
                }
                (backend, addr)
            }
            Err(e) => {
                let UpstreamError::AllFailed { failures, .. } = &e;
                shared
                    .metrics
                    .no_backend(&listener.name, &route.name, failures);
                tracing::warn!(listener = %listener.name, route = %route.name, client = %peer, error = %e,
                    "closing client connection: no backend");
                conn.reason = e.to_string();
                // close_notify, so the client sees an orderly end rather than a reset.
                let _ = tokio::time::timeout(listener.connect_timeout, tls.shutdown()).await;
                return conn.record();
            }
        };
        registration.connected(&addr);
        conn.backend = Some(addr);
        // A reload (or drain) may have closed it while the connect
        // finished: nothing goes to the backend then.
        if registration.close.is_cancelled() {
            conn.reason = format!("{}; {}", conn.reason, forward::End::Closed(why()));
            // Both cut, as a transfer the gateway closes is: reset.
            offload::reset_if_dropped(tls.get_ref().0.get_ref(), true);
            match &backend {
                Upstream::Plain(s) => offload::reset_if_dropped(s, true),
                Upstream::Tls(t) => offload::reset_if_dropped(t.get_ref().0.get_ref(), true),
            }
            return conn.record();
        }
        let transfer = relay(
            listener,
            &route,
            tls,
            backend,
            &mut conn,
            &shared.metrics,
            registration.close.clone(),
            why,
            registration.moved(),
        )
        .await;
        if ticket.stage() == Stage::Evicted {
            ticket.refused(Refusal::EvictedUnauthenticated);
        }
        conn.client_to_backend = transfer.client_to_backend;
        conn.backend_to_client = transfer.backend_to_client;
        route
            .stats
            .moved(transfer.client_to_backend, transfer.backend_to_client);
        if transfer.end != forward::End::Completed {
            // The policy verdict stays "allow"; append how it ended.
            conn.reason = format!("{}; {}", conn.reason, transfer.end);
        }
        conn.record()
    }
}

/// The PROXY v2 header the route sends its backends, if it sends one: the
/// client and the address it reached, the SNI, the TLS session, and what
/// `standing` lets the backend be told of the identity
/// (`proxy_protocol::header`).
fn proxy_header(
    listener: &ListenerState,
    route: &Route,
    conn: &Conn,
    local: Option<SocketAddr>,
    session: &rustls::ServerConnection,
    common_name: Option<String>,
    standing: crate::proxy_protocol::Standing,
) -> Result<Option<Vec<u8>>, crate::proxy_protocol::ProxyProtocolError> {
    use crate::proxy_protocol::{Session, header, openssl_cipher_name};
    if route.proxy_protocol.is_none() {
        return Ok(None);
    }
    let (sig_alg, key_alg) = listener.cert_algorithms.clone();
    let facts = Session {
        client: conn.client,
        local,
        sni: conn.sni.clone(),
        version: conn.tls_version.clone().unwrap_or_default(),
        cipher: session
            .negotiated_cipher_suite()
            .map(|s| openssl_cipher_name(s.suite())),
        sig_alg,
        key_alg,
        leaf: session
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|l| l.as_ref()),
        common_name,
        identity: conn.identity.clone(),
        route: route.name.clone(),
        send_client_cert: route.proxy_protocol_client_cert,
    };
    header(facts, standing).encode().map(Some)
}

/// Picks the connection's path, kernel TLS + splice or userspace, and moves
/// its bytes. Only a connection whose every TLS leg the kernel can take goes
/// to the kernel; the decision is made before anything changes hands.
///
/// The hand-off (flushing rustls, completing the record it stopped inside
/// of, moving the keys) waits on the peers, so it runs under the
/// handshake timeout and the connection's close token like the handshake
/// itself: a peer that stalls it holds nothing for long.
#[allow(clippy::too_many_arguments, clippy::manual_async_fn)]
fn relay<'a>(
    listener: &'a ListenerState,
    route: &'a Route,
    tls: Box<ClientTls>,
    backend: Upstream,
    conn: &'a mut Conn,
    metrics: &'a Metrics,
    close: CancellationToken,
    why: impl Fn() -> String + 'a,
    moved: &'a forward::Moved,
) -> impl Future<Output = forward::Transfer> + 'a {
    async move {
        let upstream_offload = route.upstream_tls.as_ref().map(|u| u.offload);
        // Only a flag outlives the decision: whatever is live here is kept
        // by the task for the connection's whole life.
        let kernel = match offload_plan(listener.offload, upstream_offload, &tls, &backend) {
            Ok(()) => {
                conn.offload = Some("kernel");
                metrics.offload(&listener.name, "kernel", "none");
                true
            }
            Err(fallback) => {
                if fallback != Fallback::Configured {
                    tracing::debug!(listener = %listener.name, client = %conn.client, reason = %fallback,
                        "userspace path");
                }
                conn.offload = Some("userspace");
                metrics.offload(&listener.name, "userspace", fallback.label());
                conn.offload_reason = Some(fallback.to_string());
                false
            }
        };
        moved.set_path(kernel);
        // A plain backend stays out of the hand-off, so that whatever ends
        // it can still reset the backend rather than close it cleanly; the
        // TLS legs reset if the hand-off drops them (each goes back to an
        // orderly close once it is handed over).
        let (plain, upstream_tls) = match backend {
            Upstream::Plain(s) => (Some(s), None),
            Upstream::Tls(t) => (None, Some(t)),
        };
        offload::reset_if_dropped(tls.get_ref().0.get_ref(), true);
        if let Some(t) = &upstream_tls {
            offload::reset_if_dropped(t.get_ref().0.get_ref(), true);
        }
        let failed = |end: forward::End, plain: Option<TcpStream>| {
            if let Some(s) = &plain {
                let _ = s.set_zero_linger();
            }
            forward::Transfer {
                client_to_backend: 0,
                backend_to_client: 0,
                end,
            }
        };
        if kernel {
            let upstream_no_pad = route
                .upstream_tls
                .as_ref()
                .is_some_and(|u| u.rx_expect_no_pad);
            let handed = bounded_hand_off(
                Box::pin(into_kernel(
                    *tls,
                    upstream_tls,
                    listener.rx_expect_no_pad,
                    upstream_no_pad,
                )),
                listener.handshake_timeout,
                &close,
                &why,
                &conn.client,
            )
            .await;
            let (client, backend) = match handed {
                Ok(x) => *x,
                Err(end) => return failed(end, plain),
            };
            let backend = backend.unwrap_or_else(|| splice::Side::Plain(plain_or_bug(plain)));
            splice::forward(client, backend, listener.idle_timeout, close, why, moved).await
        } else {
            let handed = bounded_hand_off(
                Box::pin(into_records(*tls, upstream_tls)),
                listener.handshake_timeout,
                &close,
                &why,
                &conn.client,
            )
            .await;
            let (client, backend) = match handed {
                Ok(x) => *x,
                Err(end) => return failed(end, plain),
            };
            let backend = backend.unwrap_or_else(|| records::Side::Plain(plain_or_bug(plain)));
            records::forward(client, backend, listener.idle_timeout, close, why, moved).await
        }
    }
}

/// The hand-off takes a TLS backend with it or leaves a plain one out:
/// one of the two is always there.
fn plain_or_bug(plain: Option<TcpStream>) -> TcpStream {
    match plain {
        Some(s) => s,
        None => unreachable!("a backend is either TLS (handed off) or plain"),
    }
}

/// Runs a hand-off under `deadline` and the close token; Err says how the
/// connection ended instead.
async fn bounded_hand_off<T>(
    handed: impl Future<Output = Result<T, offload::HandOffError>>,
    deadline: std::time::Duration,
    close: &CancellationToken,
    why: impl Fn() -> String,
    client: &SocketAddr,
) -> Result<T, forward::End> {
    let result = tokio::select! {
        // The close first, as in the transfer: nothing more for a
        // connection already closed.
        biased;
        () = close.cancelled() => return Err(forward::End::Closed(why())),
        r = tokio::time::timeout(deadline, handed) => match r {
            Ok(Ok(x)) => return Ok(x),
            Ok(Err(e)) => forward::End::Error(e.to_string()),
            Err(_) => forward::End::Error(format!(
                "kernel TLS or record layer hand-off timed out after {deadline:?} (handshake_timeout)"
            )),
        },
    };
    tracing::warn!(client = %client, error = %result, "closing connection: hand-off failed");
    Err(result)
}

type ClientTls = TlsStream<Framed<TcpStream>>;

/// Ok when every TLS leg can go to the kernel; then the kernel's TLS layer is
/// attached to each (still without keys, so falling back stays possible).
fn offload_plan(
    listener: Offload,
    upstream: Option<Offload>,
    tls: &ClientTls,
    backend: &Upstream,
) -> Result<(), Fallback> {
    if listener == Offload::Userspace || upstream == Some(Offload::Userspace) {
        return Err(Fallback::Configured);
    }
    let support = KernelSupport::get();
    let (io, session) = tls.get_ref();
    offload::precheck(support, session)?;
    if let Upstream::Tls(t) = backend {
        offload::precheck(support, t.get_ref().1)?;
    }
    offload::attach(io)?;
    if let Upstream::Tls(t) = backend {
        offload::attach(t.get_ref().0)?;
    }
    Ok(())
}

/// Hands every TLS leg's keys to the kernel. Past the first key there is no
/// way back, so an error here closes the connection.
async fn into_kernel(
    mut tls: ClientTls,
    upstream: Option<Box<BackendTls>>,
    client_no_pad: bool,
    upstream_no_pad: bool,
) -> Result<Box<(splice::Side, Option<splice::Side>)>, offload::HandOffError> {
    let flush = |e: std::io::Error| offload::HandOffError::new(format!("flushing rustls: {e}"));
    tls.flush().await.map_err(flush)?;
    let backend = match upstream {
        None => None,
        Some(mut t) => {
            t.flush().await.map_err(flush)?;
            let (io, session) = t.into_inner();
            Some(splice::Side::Kernel(
                offload::hand_off(io, session.into(), upstream_no_pad).await?,
            ))
        }
    };
    let (io, session) = tls.into_inner();
    let client = splice::Side::Kernel(offload::hand_off(io, session.into(), client_no_pad).await?);
    // Boxed: the caller's result stays in its (long-lived) task; a box is
    // 8 bytes of it, the two sides 160.
    Ok(Box::new((client, backend)))
}

/// Takes every TLS leg's keys out of rustls for the userspace record layer.
async fn into_records(
    mut tls: ClientTls,
    upstream: Option<Box<BackendTls>>,
) -> Result<Box<(records::Side, Option<records::Side>)>, offload::HandOffError> {
    let flush = |e: std::io::Error| offload::HandOffError::new(format!("flushing rustls: {e}"));
    tls.flush().await.map_err(flush)?;
    let backend = match upstream {
        None => None,
        Some(mut t) => {
            t.flush().await.map_err(flush)?;
            let (io, session) = t.into_inner();
            let f = offload::finish(io, session.into()).await?;
            Some(records::Side::Records(Box::new(records::RecordLeg::new(
                f,
            )?)))
        }
    };
    let (io, session) = tls.into_inner();
    let f = offload::finish(io, session.into()).await?;
    let client = records::Side::Records(Box::new(records::RecordLeg::new(f)?));
    Ok(Box::new((client, backend)))
}

/// Reads the ClientHello, picks the route and runs the handshake with that
/// route's policy in the verifier. Err says what kind of failure it was;
/// `conn` says why.
async fn handshake(
    listener: &ListenerState,
    stream: TcpStream,
    conn: &mut Conn,
    metrics: &Metrics,
    ticket: &Ticket,
) -> Result<(Arc<Route>, Box<ClientTls>), HandshakeFailure> {
    // The record framing is followed from the first byte: after the
    // handshake the kernel or our record layer takes over the stream at a
    // record boundary, and bytes the Acceptor reads past the ClientHello
    // are part of that count. Malformed record headers end it here.
    let mut stream = Framed::new(stream);
    let accepted = match hello::read(&mut stream).await {
        Ok(accepted) => accepted,
        Err(refused) => {
            ticket.refused(refused.refusal);
            conn.reason = refused.reason;
            return Err(failure_of(refused.refusal));
        }
    };
    ticket.hello_read();
    let sni = accepted.client_hello().server_name().map(str::to_owned);
    conn.sni = sni.clone();
    let Some(route) = listener.route_for(sni.as_deref()).cloned() else {
        let _ = stream
            .write_all(&crate::tls::plaintext_alert(
                AlertDescription::UnrecognisedName,
            ))
            .await;
        ticket.refused(Refusal::NoRoute);
        conn.reason = match sni {
            Some(s) => format!("no route for server name {s:?} and no default route"),
            None => "client sent no server name and there is no default route".into(),
        };
        return Err(HandshakeFailure::NoRoute);
    };
    conn.route = Some(route.name.clone());
    conn.mode = Some(route.mode().as_str());
    if route.mode() == Mode::Off
        && let Err(reason) = route
            .auth
            .policy
            .admits_source_at(conn.client.ip(), jiff::Timestamp::now())
    {
        // No certificate will be asked for, so nothing later could refuse:
        // sources and time windows are judged here, before the handshake.
        let _ = stream
            .write_all(&crate::tls::plaintext_alert(AlertDescription::AccessDenied))
            .await;
        tracing::info!(listener = %listener.name, route = %route.name, client = %conn.client,
            %reason, "connection refused before the handshake");
        conn.verdict = Verdict::Deny;
        conn.reason = reason.to_string();
        route.stats.denied.inc();
        return Err(HandshakeFailure::Policy);
    }
    let (config, decision) = match listener
        .tls
        .connection_config(&route.auth, conn.client.ip())
    {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(listener = %listener.name, route = %route.name, client = %conn.client,
                error = %e, "connection refused: no TLS configuration for its route");
            metrics.refused(
                &listener.name,
                match e {
                    crate::tls::TlsError::UnknownBundle(_) => "unknown_trust_bundle",
                    _ => "tls_config",
                },
            );
            conn.reason = format!("TLS config: {e}");
            // The route cannot be served as configured.
            return Err(HandshakeFailure::NoRoute);
        }
    };
    let result = StartHandshake::from_parts(accepted, stream)
        .into_stream(config)
        .await;
    let decision = decision.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let failed = result.as_ref().err().map(handshake_refusal);
    let tls = judge(&route, result, decision, conn);
    if let (Err(_), Some(refusal)) = (&tls, failed)
        && conn.verdict == Verdict::Error
    {
        // Failed before any verdict (a refused client is counted on its
        // route instead).
        ticket.refused(refusal);
    }
    let tls = tls?;
    let (_, session) = tls.get_ref();
    conn.tls_version = session.protocol_version().map(|v| match v {
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".to_owned(),
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".to_owned(),
        other => format!("{other:?}"),
    });
    conn.cipher_suite = session
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()));
    Ok((route, Box::new(tls)))
}

/// Turns what the verifier decided and how the handshake ended into the
/// access log's verdict and reason, and counts it on the route. Gives back
/// the connection only when it may go on; Err says what kind of failure
/// it was.
fn judge<T>(
    route: &Route,
    result: std::io::Result<T>,
    decision: crate::tls::Decision,
    conn: &mut Conn,
) -> Result<T, HandshakeFailure> {
    // A certificate names an identity; only its key's signature proves the
    // peer is it. Unproven names are logged apart and count for nothing.
    let unproven = decision.identity.is_some() && !decision.proven;
    if unproven {
        conn.claimed_identity = decision.identity.as_ref().map(|i| i.names());
    } else {
        conn.identity = decision.identity.as_ref().map(|i| i.names());
        conn.identity_value = decision.identity.map(Box::new);
        conn.verified = decision.verified.map(Box::new);
        conn.path = decision.path.map(Box::new);
    }
    // The audit report's name for the client: its names as the access log
    // lists them; none when no certificate reached the verifier.
    let audit_identity = conn.identity.as_deref().map(crate::identity::joined);
    // Nothing reached the verifier: "no certificate" is the refusal only
    // when that is what ended the handshake, not for a handshake that
    // failed before a certificate was asked for.
    let verifier_saw_nothing = decision.refused.is_none() && decision.verdict.is_none();
    // Why the client would be (or was) refused, if it would be, and what
    // kind of refusal that is.
    // The policy's own name for its refusal; else the handshake failure's.
    let mut reason_name = None;
    let objection = match (decision.refused, decision.verdict) {
        (Some(refused), _) => Some((
            refused,
            match decision.problem {
                Some(CertProblem::UnknownCa) => HandshakeFailure::UnknownCa,
                Some(CertProblem::Expired) => HandshakeFailure::Expired,
                Some(CertProblem::Revoked) => HandshakeFailure::Revoked,
                Some(CertProblem::Bad) | None => HandshakeFailure::BadCertificate,
            },
        )),
        // The policy judged a name the peer never proved to be: its verdict
        // is not the peer's. A handshake that failed failed for that;
        // one that completed without the proof is refused.
        (None, Some(_)) if unproven => result.is_ok().then(|| {
            (
                "the client did not prove it holds its certificate's key".to_owned(),
                HandshakeFailure::BadCertificate,
            )
        }),
        (None, Some(policy::Verdict::Deny(reason))) => {
            reason_name = Some(reason.kind());
            Some((reason.to_string(), HandshakeFailure::Policy))
        }
        (None, Some(policy::Verdict::Allow { matched })) => {
            conn.reason = format!("allowed by {matched}");
            None
        }
        // No certificate reached the verifier.
        (None, None) => Some((
            "client presented no certificate".to_owned(),
            HandshakeFailure::NoCertificate,
        )),
    };
    // Every route, any mode, each client let in with a verified
    // certificate: the report's expiring client certificates.
    if result.is_ok()
        && (objection.is_none() || route.mode() == Mode::Audit)
        && let Some(identity) = conn.identity_value.as_deref()
    {
        route.stats.audit.certificate(identity);
    }
    match (&result, objection) {
        (Ok(_), None) => {
            conn.verdict = Verdict::Allow;
            route.stats.allowed.inc();
            if route.mode() == Mode::Audit {
                route.stats.audit.seen(audit_identity, conn.client.ip());
            }
        }
        (Ok(_), Some((why, kind))) if route.mode() == Mode::Audit => {
            conn.verdict = Verdict::Audit;
            let reason = reason_name.unwrap_or(kind.as_str());
            route
                .stats
                .audit
                .would_deny(audit_identity, conn.client.ip(), reason);
            conn.reason = format!("would deny: {why}");
            route.stats.audited.inc();
            tracing::warn!(route = %route.name, client = %conn.client, reason = %why,
                "audit: would deny, letting through");
        }
        (Ok(_), Some((why, kind))) => {
            // An enforcing verifier never lets this happen; if it does, the
            // handshake's success is not a verdict: refuse rather than guess.
            tracing::error!(route = %route.name, client = %conn.client, reason = %why,
                "handshake completed on an enforcing route although the client was refused: closing");
            conn.verdict = Verdict::Deny;
            conn.reason = format!("refused after handshake: {why}");
            route.stats.denied.inc();
            return Err(kind);
        }
        (Err(e), objection) => {
            let is_refusal = decision_was_refusal(e, objection.is_some() && !verifier_saw_nothing);
            return Err(match (is_refusal, objection) {
                (true, Some((why, kind))) => {
                    conn.verdict = Verdict::Deny;
                    conn.reason = why;
                    route.stats.denied.inc();
                    kind
                }
                _ => {
                    conn.reason = format!("handshake failed: {e}");
                    failure_of(handshake_refusal(e))
                }
            });
        }
    }
    result.map_err(|_| HandshakeFailure::Protocol)
}

/// The handshake failure a refusal admission counted is.
fn failure_of(refusal: Refusal) -> HandshakeFailure {
    match refusal {
        Refusal::EvictedBeforeHello
        | Refusal::EvictedAfterHello
        | Refusal::HandshakeTooSlow
        | Refusal::HandshakeTimeout => HandshakeFailure::Timeout,
        Refusal::NoRoute => HandshakeFailure::NoRoute,
        Refusal::ClientClosed
        | Refusal::BadRecord
        | Refusal::BadClientHello
        | Refusal::ClientHelloTooLarge
        | Refusal::Incompatible
        | Refusal::HandshakeFailed => HandshakeFailure::Protocol,
        // Refused at accept, before any handshake, or past it: never
        // asked here.
        Refusal::SourceUnauthenticated
        | Refusal::IdentityConnections
        | Refusal::EvictedUnauthenticated
        | Refusal::MaxConnections
        | Refusal::MaxHandshakesInFlight
        | Refusal::Blocked
        | Refusal::SourceRate
        | Refusal::SourceHandshakes
        | Refusal::PrefixRate
        | Refusal::PrefixHandshakes
        | Refusal::NetworkRate
        | Refusal::NetworkHandshakes
        | Refusal::MaxTracked
        | Refusal::NetworksPerAllocation
        | Refusal::OutOfDescriptors => HandshakeFailure::Protocol,
    }
}

/// What a handshake that failed after its ClientHello is counted as.
fn handshake_refusal(e: &std::io::Error) -> Refusal {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(e @ rustls::Error::PeerIncompatible(_)) => hello::refusal_of(e),
        Some(_) => Refusal::HandshakeFailed,
        None if e.kind() == std::io::ErrorKind::InvalidData => Refusal::HandshakeFailed,
        None => Refusal::ClientClosed,
    }
}

/// A failed handshake is a refusal when the verifier objected, or when the
/// client sent no certificate to a route that requires one.
fn decision_was_refusal(e: &std::io::Error, verifier_objected: bool) -> bool {
    let no_cert = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| matches!(r, rustls::Error::NoCertificatesPresented));
    no_cert || verifier_objected
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{DenyReason, Policy};
    use crate::tls::Decision;

    fn conn() -> Conn {
        Conn::new(
            &crate::testing::listener_state(),
            "127.0.0.1:5000".parse().unwrap(),
        )
    }

    /// One side of a transfer, with nothing behind it.
    struct Side;

    impl forward::Leg for Side {
        fn abort(&self, _: Option<AlertDescription>) {}
    }

    /// A connection closed (by a reload, by drain) before its transfer
    /// starts moves no byte, even when both directions could move at once:
    /// the close is seen first.
    #[tokio::test]
    async fn a_transfer_closed_before_it_starts_moves_nothing() {
        use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
        for round in 0..64 {
            let close = CancellationToken::new();
            close.cancel();
            let pumped = AtomicUsize::new(0);
            let transfer = forward::both_ways(
                Side,
                Side,
                std::time::Duration::from_secs(60),
                close,
                || "revoked".to_owned(),
                async |_: &Side, _: &Side, moved: &AtomicU64, _: &forward::Activity| {
                    pumped.fetch_add(1, Ordering::Relaxed);
                    moved.fetch_add(14, Ordering::Relaxed);
                    Ok(())
                },
                &forward::Moved::default(),
            )
            .await;
            assert_eq!(
                transfer.end,
                forward::End::Closed("revoked".into()),
                "round {round}"
            );
            assert_eq!(pumped.load(Ordering::Relaxed), 0, "round {round}");
            assert_eq!(transfer.client_to_backend, 0, "round {round}");
        }
    }

    /// A handshake that completed although the verifier objected (no
    /// enforcing verifier would let that happen, but nothing else stops it):
    /// enforce refuses, audit lets it through as a would-deny.
    #[test]
    fn an_objection_after_a_completed_handshake_refuses_in_enforce() {
        let objections = [
            (
                Decision {
                    refused: Some("client certificate refused: test".into()),
                    problem: Some(CertProblem::Revoked),
                    ..Decision::default()
                },
                HandshakeFailure::Revoked,
            ),
            (
                Decision {
                    verdict: Some(crate::policy::Verdict::Deny(DenyReason::NoAllowRules)),
                    ..Decision::default()
                },
                HandshakeFailure::Policy,
            ),
            // No certificate reached the verifier at all.
            (Decision::default(), HandshakeFailure::NoCertificate),
        ];
        for (decision, kind) in objections {
            let enforce = crate::testing::route(Mode::Enforce, Policy::default());
            let mut c = conn();
            let admitted = judge(&enforce, Ok("stream"), decision.clone(), &mut c);
            assert_eq!(
                admitted,
                Err(kind),
                "{decision:?} must not pass an enforcing route"
            );
            assert_eq!(c.verdict, Verdict::Deny);
            assert!(
                c.reason.starts_with("refused after handshake: "),
                "{}",
                c.reason
            );
            assert_eq!(enforce.stats.denied.get(), 1);

            let audit = crate::testing::route(Mode::Audit, Policy::default());
            let mut c = conn();
            assert_eq!(judge(&audit, Ok("stream"), decision, &mut c), Ok("stream"));
            assert_eq!(c.verdict, Verdict::Audit);
        }
    }

    /// A name the peer never proved (no CertificateVerify signature
    /// verified) is only claimed: it is not the connection's identity, and
    /// the policy's verdict on it counts for nothing, even an allow.
    #[test]
    fn an_unproven_identity_is_only_claimed() {
        let claimed = crate::identity::Identity {
            uris: vec!["spiffe://example.internal/a".into()],
            ..Default::default()
        };
        let decision = Decision {
            identity: Some(claimed),
            verdict: Some(crate::policy::Verdict::Allow {
                matched: "spiffe://example.internal/a".into(),
            }),
            ..Decision::default()
        };
        // The handshake failed (a bad signature): a failure, not a verdict.
        let route = crate::testing::route(Mode::Enforce, Policy::default());
        let mut c = conn();
        let failed: std::io::Result<&str> = Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature),
        ));
        assert_eq!(
            judge(&route, failed, decision.clone(), &mut c),
            Err(HandshakeFailure::Protocol)
        );
        assert_eq!(c.verdict, Verdict::Error);
        assert_eq!(c.identity, None);
        assert_eq!(
            c.claimed_identity,
            Some(vec!["spiffe://example.internal/a".to_owned()])
        );
        assert!(c.identity_value.is_none());
        // Completed without the proof (rustls never does): refused.
        let mut c = conn();
        assert_eq!(
            judge(&route, Ok("stream"), decision.clone(), &mut c),
            Err(HandshakeFailure::BadCertificate)
        );
        assert_eq!(c.identity, None);
        // Proven: the connection's identity.
        let mut c = conn();
        let proven = Decision {
            proven: true,
            ..decision
        };
        assert_eq!(judge(&route, Ok("stream"), proven, &mut c), Ok("stream"));
        assert_eq!(c.verdict, Verdict::Allow);
        assert_eq!(
            c.identity,
            Some(vec!["spiffe://example.internal/a".to_owned()])
        );
        assert_eq!(c.claimed_identity, None);
    }
}

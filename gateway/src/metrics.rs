//! What an operator scrapes (served by `admin` as `GET /metrics`): the
//! Prometheus text format 0.0.4, encoded by `prometheus-client`.
//!
//! Two kinds of families. Instruments the connections count into
//! (counters, histograms) are registered families; a connection takes its
//! listener's and route's series once (`ListenerStats`, `RouteStats`, held
//! by the state) and counts into them with atomics, never a lookup or a
//! lock per read. What exists only at scrape time (live connections, the
//! expiries, the guard's and admission's tables and kernel maps) is read
//! then, through [`Exposition`].
//!
//! Series are keyed by listener and route name and live here, not in the
//! state, so a reload (which rebuilds every route) does not reset them.
//! Label values are the access log's words: one name for one idea. No
//! label holds a client's identity or address.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric as _,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry as Families;

use crate::app::ReloadStats;
use crate::registry::Registry;

/// The `Content-Type` of `GET /metrics`.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Upper bounds of `gateway_handshake_duration_seconds`: from a loopback
/// handshake (about a millisecond) to the default `handshake_timeout`.
const HANDSHAKE_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Upper bounds of `gateway_backend_connect_duration_seconds`: from a
/// backend on this host (tens of microseconds) to `connect_timeout` times
/// a few attempts.
const CONNECT_BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Why a handshake failed, as `gateway_handshake_failures_total{reason}`
/// counts it. Every connection admitted to a handshake either completes it
/// (and is observed in `gateway_handshake_duration_seconds`) or fails it,
/// counted once under one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The client sent no certificate where the route requires one.
    NoCertificate,
    /// Its chain does not lead to the route's CA (or a device route's
    /// device CA).
    UnknownCa,
    /// The leaf or a CA on its path is past its notAfter.
    Expired,
    /// The revocation check refused it: revoked, no CRL vouches for it
    /// where one must, or that CRL is past its nextUpdate
    /// (`crl_expired = "refuse"`).
    Revoked,
    /// Anything else about the certificate: a bad signature or encoding, not
    /// for client auth, not yet valid, names unusable as an identity, an
    /// identity outside its CA's trust domains.
    BadCertificate,
    /// The client is who it says, but the route's policy (identities,
    /// sources, time windows) refuses it, at the handshake or, for one that
    /// straddled a reload, by the state that took over.
    Policy,
    /// `handshake_timeout`, the minimum rate, eviction by a newer
    /// connection, or the drain timeout at shutdown.
    Timeout,
    /// Not TLS, no acceptable ClientHello, nothing in common to speak, a
    /// malformed message, or the client went away.
    Protocol,
    /// No route for the server name it asked for, or its route's TLS
    /// configuration cannot be built (a trust bundle not loaded).
    NoRoute,
}

impl HandshakeFailure {
    pub const ALL: [HandshakeFailure; 9] = [
        HandshakeFailure::NoCertificate,
        HandshakeFailure::UnknownCa,
        HandshakeFailure::Expired,
        HandshakeFailure::Revoked,
        HandshakeFailure::BadCertificate,
        HandshakeFailure::Policy,
        HandshakeFailure::Timeout,
        HandshakeFailure::Protocol,
        HandshakeFailure::NoRoute,
    ];

    /// A certificate that does not pass the trust configuration's check
    /// (`auto_revert` watches these): a CA bundle that no longer trusts
    /// the clients' CA, a chain that no longer verifies. Not a revocation
    /// or a policy refusal (an operator's deliberate refusals, which a
    /// revert must never undo), nor timeouts, protocol errors, unknown
    /// names or missing certificates (what any scanner causes).
    pub fn is_trust(self) -> bool {
        matches!(
            self,
            HandshakeFailure::UnknownCa
                | HandshakeFailure::BadCertificate
                | HandshakeFailure::Expired
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::NoCertificate => "no_certificate",
            HandshakeFailure::UnknownCa => "unknown_ca",
            HandshakeFailure::Expired => "expired",
            HandshakeFailure::Revoked => "revoked",
            HandshakeFailure::BadCertificate => "bad_certificate",
            HandshakeFailure::Policy => "policy",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Protocol => "protocol",
            HandshakeFailure::NoRoute => "no_route",
        }
    }
}

/// A listener's handshake series, taken once when its state is built.
#[derive(Debug)]
pub struct ListenerStats {
    /// From accept to the connection admitted (handshake done, verdict
    /// given, registered), for every connection that got there.
    pub handshake: Histogram,
    /// In the order of `HandshakeFailure::ALL`.
    failures: [Counter; 9],
    /// `Metrics::trust_failures`.
    trust_failures: Arc<AtomicU64>,
}

impl ListenerStats {
    /// A certificate check failed for a source admission vouches for
    /// (exempt, or served a verified certificate lately): what
    /// `auto_revert` counts. A peer that never held a certificate the PKI issued can
    /// present a self-signed one as often as it likes; counting those
    /// would let anyone revert any reload.
    pub fn known_source_failed_trust(&self) {
        self.trust_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn handshake_failed(&self, why: HandshakeFailure) {
        let [
            no_certificate,
            unknown_ca,
            expired,
            revoked,
            bad_certificate,
            policy,
            timeout,
            protocol,
            no_route,
        ] = &self.failures;
        match why {
            HandshakeFailure::NoCertificate => no_certificate,
            HandshakeFailure::UnknownCa => unknown_ca,
            HandshakeFailure::Expired => expired,
            HandshakeFailure::Revoked => revoked,
            HandshakeFailure::BadCertificate => bad_certificate,
            HandshakeFailure::Policy => policy,
            HandshakeFailure::Timeout => timeout,
            HandshakeFailure::Protocol => protocol,
            HandshakeFailure::NoRoute => no_route,
        }
        .inc();
    }
}

impl Default for ListenerStats {
    /// Series counted nowhere (unit tests' states).
    fn default() -> Self {
        ListenerStats {
            handshake: Histogram::new(HANDSHAKE_BUCKETS),
            failures: Default::default(),
            trust_failures: Arc::default(),
        }
    }
}

/// What a route decided and carried, counted since start (across reloads).
#[derive(Debug)]
pub struct RouteStats {
    pub allowed: Counter,
    pub denied: Counter,
    /// Would have been denied, but the route is in audit mode.
    pub audited: Counter,
    client_to_backend: Counter,
    backend_to_client: Counter,
    /// From the first connect attempt to a backend connection ready for
    /// bytes (failed attempts before it, upstream TLS and a PROXY header
    /// included), for every connection that reached a backend.
    pub connect: Histogram,
    /// Who the route let in and who enforcement would refuse, while it
    /// is in audit mode (the audit report).
    pub audit: crate::rollout::RouteAudit,
}

impl RouteStats {
    /// Counts a connection's bytes once it has ended (either path).
    pub fn moved(&self, client_to_backend: u64, backend_to_client: u64) {
        self.client_to_backend.inc_by(client_to_backend);
        self.backend_to_client.inc_by(backend_to_client);
    }
}

impl Default for RouteStats {
    /// Series counted nowhere (unit tests' routes).
    fn default() -> Self {
        RouteStats {
            allowed: Counter::default(),
            denied: Counter::default(),
            audited: Counter::default(),
            client_to_backend: Counter::default(),
            backend_to_client: Counter::default(),
            connect: Histogram::new(CONNECT_BUCKETS),
            audit: crate::rollout::RouteAudit::default(),
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerReason {
    listener: String,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    listener: String,
    route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteVerdict {
    listener: String,
    route: String,
    verdict: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteDirection {
    listener: String,
    route: String,
    direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OffloadLabels {
    listener: String,
    path: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendFailureLabels {
    listener: String,
    route: String,
    backend: String,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    commit: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// The registered families (each a handle on shared series: cloning one
/// is cheap and counts into the same).
#[derive(Debug, Clone)]
struct Instruments {
    route_decisions: Family<RouteVerdict, Counter>,
    refused: Family<ListenerReason, Counter>,
    handshake_duration: Histograms<ListenerLabels>,
    handshake_failures: Family<ListenerReason, Counter>,
    offload: Family<OffloadLabels, Counter>,
    bytes: Family<RouteDirection, Counter>,
    crl_refused: Family<ReasonLabel, Counter>,
    backend_connect_duration: Histograms<RouteLabels>,
    backend_failures: Family<BackendFailureLabels, Counter>,
    no_backend: Family<RouteLabels, Counter>,
}

impl Default for Instruments {
    fn default() -> Self {
        Instruments {
            route_decisions: Family::default(),
            refused: Family::default(),
            handshake_duration: Family::new_with_constructor(|| Histogram::new(HANDSHAKE_BUCKETS)),
            handshake_failures: Family::default(),
            offload: Family::default(),
            bytes: Family::default(),
            crl_refused: Family::default(),
            backend_connect_duration: Family::new_with_constructor(|| {
                Histogram::new(CONNECT_BUCKETS)
            }),
            backend_failures: Family::default(),
            no_backend: Family::default(),
        }
    }
}

impl Instruments {
    /// Registers every family in `families`, in the order they are served.
    /// Names are given without the `_total` the encoder adds to counters,
    /// and help without the full stop it adds.
    fn register(&self, families: &mut Families) {
        families.register(
            "gateway_route_decisions",
            "Client verdicts per route (allow, deny, audit), as in the access log",
            self.route_decisions.clone(),
        );
        families.register(
            "gateway_connections_refused",
            "Connections refused without a route decision, by reason",
            self.refused.clone(),
        );
        families.register(
            "gateway_handshake_duration_seconds",
            "Time from accept to a connection admitted (ClientHello, handshake, verdict), per listener",
            self.handshake_duration.clone(),
        );
        families.register(
            "gateway_handshake_failures",
            "Handshakes that did not admit a connection, by why: no_certificate, unknown_ca, expired, revoked, bad_certificate, policy, timeout, protocol, no_route",
            self.handshake_failures.clone(),
        );
        families.register(
            "gateway_offload",
            "Connections by where their bytes moved (kernel: kTLS + splice) and why a connection stayed in userspace",
            self.offload.clone(),
        );
        families.register(
            "gateway_bytes",
            "Bytes carried between clients and backends, per route and direction, counted as each connection ends (both paths)",
            self.bytes.clone(),
        );
        families.register(
            "gateway_crl_refused",
            "Reloads refused for their CRLs: two different CRLs of one issuer and scope with one number (ambiguous), a CRL older than one this process already enforced (rollback), or a configured CRL file that no longer holds a CRL for an issuer and scope it held, nor does another file of its bundle (withdrawn)",
            self.crl_refused.clone(),
        );
        families.register(
            "gateway_backend_connect_duration_seconds",
            "Time from the first connect attempt to a backend connection ready for bytes (failed attempts, upstream TLS and a PROXY header included), per route",
            self.backend_connect_duration.clone(),
        );
        families.register(
            "gateway_backend_connect_failures",
            "Attempts to reach a backend that failed, by reason (refused, timeout, unreachable, gate, tls, other)",
            self.backend_failures.clone(),
        );
        families.register(
            "gateway_no_backend",
            "Allowed connections closed because every attempt to reach a backend failed",
            self.no_backend.clone(),
        );
        families.register(
            "gateway_build",
            "The running gateway's version and the git commit it was built from (unknown outside a git checkout)",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                commit: env!("GATEWAY_COMMIT"),
            }),
        );
    }
}

#[derive(Debug)]
pub struct Metrics {
    instruments: Instruments,
    /// The serving state's certificates and CRLs, and `expiry_warning`
    /// (also read by `/readyz?strict` and the audit report).
    pub expiries: Arc<crate::expiry::Watched>,
    /// Checks that met a CRL past its nextUpdate, by bundle and its
    /// `crl_expired` (refused, or used with a warning).
    stale_crl_uses: Mutex<BTreeMap<(String, &'static str), Arc<AtomicU64>>>,
    /// Access-log lines that could not be written (a full disk, an I/O
    /// error), shared with the access log itself.
    pub access_log_lost: Arc<AtomicU64>,
    /// Access-log lines of failed unauthenticated handshakes held back
    /// over their reason's rate, shared with the access log.
    pub access_log_suppressed: Arc<crate::access_log::Suppressed>,
    /// The audit report's summary, kept across reloads like the counters.
    pub audit: Arc<crate::rollout::Audit>,
    /// Handshakes that failed their certificate check (`is_trust`) from
    /// sources admission vouches for (exempt, or a verified certificate
    /// within `admission.known_for`), all listeners together: what `auto_revert`
    /// watches after a reload.
    pub trust_failures: Arc<AtomicU64>,
    /// The revision history's errors and the automatic reverts.
    pub revisions: Arc<crate::revisions::Counters>,
    /// A fleet member's view of etcd (`fleet`); served only once enabled.
    pub fleet: Arc<FleetStatus>,
}

/// What a fleet member knows of its source: whether it hears etcd now,
/// the revision it applied, when it last heard from etcd, the revisions
/// it refused. Written by `fleet`, read at scrape time.
#[derive(Debug, Default)]
pub struct FleetStatus {
    pub enabled: std::sync::atomic::AtomicBool,
    /// Unix milliseconds when the member started following etcd.
    pub started_ms: std::sync::atomic::AtomicI64,
    pub connected: std::sync::atomic::AtomicBool,
    /// The etcd revision of the document serving now (0: none yet).
    pub revision: std::sync::atomic::AtomicI64,
    /// Unix milliseconds of the last answer from etcd's leader (a read, a
    /// lease keep-alive answer, a watch event; not a watch progress
    /// notice, which a member without a leader answers too); 0: never
    /// since start.
    pub last_heard_ms: std::sync::atomic::AtomicI64,
    /// Revisions refused (invalid document, missing file, refused reload).
    pub refused: AtomicU64,
    /// Of those, refused for their size (`fleet::MAX_VALUE`, `MAX_DOCUMENT`).
    pub too_large: AtomicU64,
}

impl FleetStatus {
    /// Seconds since etcd last answered, or since start when it never did.
    pub fn staleness(&self) -> f64 {
        let now = jiff::Timestamp::now().as_millisecond();
        let last = match self.last_heard_ms.load(Ordering::Relaxed) {
            0 => self.started_ms.load(Ordering::Relaxed),
            t => t,
        };
        (now - last).max(0) as f64 / 1000.0
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let instruments = Instruments::default();
        // Served at 0 from the start, so a rate over them is defined
        // before the first refusal.
        for reason in ["ambiguous", "rollback", "withdrawn"] {
            let _ = instruments
                .crl_refused
                .get_or_create(&ReasonLabel { reason });
        }
        Metrics {
            instruments,
            expiries: Arc::default(),
            stale_crl_uses: Mutex::default(),
            access_log_lost: Arc::default(),
            access_log_suppressed: Arc::default(),
            audit: Arc::default(),
            trust_failures: Arc::default(),
            revisions: Arc::default(),
            fleet: Arc::default(),
        }
    }
}

impl Metrics {
    /// The counters of a route, the same ones before and after a reload.
    pub fn route(&self, listener: &str, route: &str) -> Arc<RouteStats> {
        let i = &self.instruments;
        let verdict = |verdict| {
            i.route_decisions.get_or_create_owned(&RouteVerdict {
                listener: listener.to_owned(),
                route: route.to_owned(),
                verdict,
            })
        };
        let direction = |direction| {
            i.bytes.get_or_create_owned(&RouteDirection {
                listener: listener.to_owned(),
                route: route.to_owned(),
                direction,
            })
        };
        Arc::new(RouteStats {
            allowed: verdict("allow"),
            denied: verdict("deny"),
            audited: verdict("audit"),
            client_to_backend: direction("client_to_backend"),
            backend_to_client: direction("backend_to_client"),
            connect: i
                .backend_connect_duration
                .get_or_create_owned(&RouteLabels {
                    listener: listener.to_owned(),
                    route: route.to_owned(),
                }),
            audit: self.audit.route(listener, route),
        })
    }

    /// The handshake series of a listener, the same ones before and after
    /// a reload; every failure reason is served from the start, at 0.
    pub fn listener(&self, listener: &str) -> Arc<ListenerStats> {
        let i = &self.instruments;
        Arc::new(ListenerStats {
            handshake: i.handshake_duration.get_or_create_owned(&ListenerLabels {
                listener: listener.to_owned(),
            }),
            failures: HandshakeFailure::ALL.map(|why| {
                i.handshake_failures.get_or_create_owned(&ListenerReason {
                    listener: listener.to_owned(),
                    reason: why.as_str(),
                })
            }),
            trust_failures: self.trust_failures.clone(),
        })
    }

    /// The certificates and CRLs of the state now serving, and its
    /// `expiry_warning`.
    pub fn set_expiries(&self, expiries: Vec<crate::expiry::Expiry>, warning: Duration) {
        self.expiries.set(expiries, warning);
        self.audit.set_warning(warning);
    }

    /// Logs a warning for each certificate or CRL running out within `horizon`.
    pub fn warn_expiring(&self, horizon: Duration) {
        let now = jiff::Timestamp::now().as_second();
        let horizon = i64::try_from(horizon.as_secs()).unwrap_or(i64::MAX);
        for e in &self.expiries.all() {
            if e.seconds_left(now) <= horizon {
                tracing::warn!(file = %e.file.display(), "{}", crate::expiry::describe(e, now));
            }
        }
    }

    /// Counts a connection refused before any route decision: at accept
    /// (admission's reasons) or for a handshake that ended without one.
    pub fn refused(&self, listener: &str, reason: &'static str) {
        self.instruments
            .refused
            .get_or_create(&ListenerReason {
                listener: listener.to_owned(),
                reason,
            })
            .inc();
    }

    /// The counter of a bundle's checks that met a stale CRL, the same one
    /// across reloads.
    pub fn stale_crl_uses(
        &self,
        bundle: &str,
        policy: crate::config::CrlExpired,
    ) -> Arc<AtomicU64> {
        self.stale_crl_uses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((bundle.to_owned(), policy.as_str()))
            .or_default()
            .clone()
    }

    /// Counts a reload refused for its CRLs: `ambiguous` (two different
    /// CRLs in one place), `rollback` (older than one already enforced) or
    /// `withdrawn` (a configured file no longer fills a place it filled).
    pub fn crl_refused(&self, reason: &'static str) {
        self.instruments
            .crl_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts an allowed connection that reached no backend, and each
    /// attempt that failed on its way there.
    pub fn no_backend(&self, listener: &str, route: &str, failures: &[crate::upstream::Failed]) {
        self.instruments
            .no_backend
            .get_or_create(&RouteLabels {
                listener: listener.to_owned(),
                route: route.to_owned(),
            })
            .inc();
        for f in failures {
            self.backend_failed(listener, route, f);
        }
    }

    /// Counts a failed attempt at a backend that a later attempt made up
    /// for: the client was served, the backend still failed.
    pub fn backend_failed(&self, listener: &str, route: &str, failed: &crate::upstream::Failed) {
        self.instruments
            .backend_failures
            .get_or_create(&BackendFailureLabels {
                listener: listener.to_owned(),
                route: route.to_owned(),
                backend: failed.backend.clone(),
                reason: failed.reason.as_str(),
            })
            .inc();
    }

    /// Counts which path a connection took after its handshake, and why.
    pub fn offload(&self, listener: &str, path: &'static str, reason: &'static str) {
        self.instruments
            .offload
            .get_or_create(&OffloadLabels {
                listener: listener.to_owned(),
                path,
                reason,
            })
            .inc();
    }

    /// The families read at scrape time from this struct.
    fn expose(&self, out: &mut Exposition<'_>) -> std::fmt::Result {
        let stale: Vec<_> = self
            .stale_crl_uses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|((bundle, policy), n)| {
                (
                    [
                        ("bundle", bundle.clone()),
                        ("crl_expired", (*policy).into()),
                    ],
                    n.load(Ordering::Relaxed),
                )
            })
            .collect();
        out.counter(
            "gateway_crl_expired_total",
            "Client checks that met a CRL past its next update, by trust bundle and what its crl_expired made of it (refuse, warn).",
            stale,
        )?;
        out.counter(
            "gateway_audit_state_errors_total",
            "Failures to read (unreadable, corrupt) or write the audit report's state file (audit_state).",
            self.audit
                .state_errors()
                .into_iter()
                .map(|(reason, n)| ([("reason", reason)], n)),
        )?;
        out.counter(
            "gateway_revisions_errors_total",
            "Failures to write (write) or read (unreadable, corrupt) the config revision history (revisions_dir).",
            self.revisions
                .errors()
                .into_iter()
                .map(|(reason, n)| ([("reason", reason)], n)),
        )?;
        out.counter(
            "gateway_auto_reverts_total",
            "Reloads reverted by auto_revert after handshake failures jumped, by result (applied, failed).",
            self.revisions
                .auto_reverts()
                .into_iter()
                .map(|(result, n)| ([("result", result)], n)),
        )?;
        if self.fleet.enabled.load(Ordering::Relaxed) {
            let fleet = &self.fleet;
            out.gauge(
                "gateway_fleet_connected",
                "1 while the fleet member hears etcd's leader (watching its prefix), 0 while it serves its last good document without it.",
                [(NO_LABELS, i64::from(fleet.connected.load(Ordering::Relaxed)))],
            )?;
            out.gauge(
                "gateway_fleet_revision",
                "The etcd revision of the fleet document serving now.",
                [(NO_LABELS, fleet.revision.load(Ordering::Relaxed))],
            )?;
            out.gauge(
                "gateway_fleet_watch_age_seconds",
                "Seconds since etcd's leader last answered the fleet member (a lease keep-alive, a watch event, a read): staleness.",
                [(NO_LABELS, fleet.staleness())],
            )?;
            out.counter(
                "gateway_fleet_refused",
                "Fleet revisions refused (invalid document, a named file missing, refused by the reload); the last good one keeps serving.",
                [(NO_LABELS, fleet.refused.load(Ordering::Relaxed))],
            )?;
            out.counter(
                "gateway_fleet_too_large",
                "Fleet revisions refused for their size (over the per-key or whole-document limit); counted in gateway_fleet_refused too.",
                [(NO_LABELS, fleet.too_large.load(Ordering::Relaxed))],
            )?;
        }
        out.counter(
            "gateway_access_log_lost_total",
            "Access-log lines that could not be written (a full disk, an I/O error, the writer behind).",
            [(NO_LABELS, self.access_log_lost.load(Ordering::Relaxed))],
        )?;
        out.counter(
            "gateway_access_log_suppressed_total",
            "Access-log lines of failed handshakes and of connections served without a proven identity (unauthenticated), held back over their reason's rate (summarized in the log), by reason.",
            self.access_log_suppressed
                .counts()
                .into_iter()
                .map(|(reason, n)| ([("reason", reason)], n)),
        )?;
        let now = jiff::Timestamp::now().as_second();
        let expiries = self.expiries.all();
        out.gauge(
            "gateway_certificate_expiry_seconds",
            "Seconds until a certificate the config names expires (negative: expired).",
            expiries
                .iter()
                .filter(|e| e.kind == crate::expiry::Kind::Certificate)
                .map(|e| {
                    (
                        [
                            ("role", e.role.clone()),
                            ("file", e.file.display().to_string()),
                            ("subject", e.subject.clone()),
                        ],
                        e.seconds_left(now),
                    )
                }),
        )?;
        out.gauge(
            "gateway_crl_next_update_seconds",
            "Seconds until the next update of each CRL a bundle enforces (negative: stale; see crl_expired).",
            // One file may hold several issuers' CRLs (gateway pki's crl.pem).
            expiries.iter().filter_map(|e| {
                let crate::expiry::Kind::Crl(policy) = e.kind else {
                    return None;
                };
                Some((
                    [
                        ("role", e.role.clone()),
                        ("file", e.file.display().to_string()),
                        ("issuer", e.subject.clone()),
                        ("crl_expired", policy.as_str().to_owned()),
                    ],
                    e.seconds_left(now),
                ))
            }),
        )
    }
}

/// Everything `GET /metrics` reports on.
#[derive(Clone)]
pub struct Sources {
    pub metrics: Arc<Metrics>,
    pub registry: Arc<Registry>,
    pub reloads: Arc<ReloadStats>,
    pub guard: Option<Arc<crate::guard::Guard>>,
    pub admission: Option<Arc<crate::admission::Admission>>,
    /// Per worker connections (`workers`).
    pub workers: Option<Arc<crate::workers::Stats>>,
}

impl Sources {
    pub fn render(&self) -> String {
        let mut families = Families::default();
        self.metrics.instruments.register(&mut families);
        let sources = self.clone();
        families.register_collector(Box::new(AtScrape(move |out: &mut Exposition<'_>| {
            sources.expose(out)
        })));
        encode(&families)
    }

    fn expose(&self, out: &mut Exposition<'_>) -> std::fmt::Result {
        self.metrics.expose(out)?;
        out.gauge(
            "gateway_live_connections",
            "Connections past the handshake right now.",
            [(NO_LABELS, self.registry.len())],
        )?;
        out.counter(
            "gateway_reloads_total",
            "Reloads by result.",
            [
                (
                    [("result", "ok")],
                    self.reloads.succeeded.load(Ordering::Relaxed),
                ),
                (
                    [("result", "failed")],
                    self.reloads.failed.load(Ordering::Relaxed),
                ),
            ],
        )?;
        out.counter(
            "gateway_reload_guard_total",
            "Reloads the reload guard (max_reload_closes) held: refused (also counted as failed reloads), or forced through.",
            [
                (
                    [("result", "refused")],
                    self.reloads.guard_refused.load(Ordering::Relaxed),
                ),
                (
                    [("result", "forced")],
                    self.reloads.guard_forced.load(Ordering::Relaxed),
                ),
            ],
        )?;
        if let Some(guard) = &self.guard {
            guard.render_metrics(out)?;
        }
        if let Some(admission) = &self.admission {
            admission.render_metrics(out)?;
        }
        if let Some(workers) = &self.workers {
            workers.render_metrics(out)?;
        }
        Ok(())
    }
}

/// The text of families read only at scrape time, by `collect` (the
/// remote guard's endpoint, tests).
pub fn render_with(
    collect: impl Fn(&mut Exposition<'_>) -> std::fmt::Result + Send + Sync + 'static,
) -> String {
    let mut families = Families::default();
    families.register_collector(Box::new(AtScrape(collect)));
    encode(&families)
}

fn encode(families: &Families) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, families) {
        // Writing to a String fails only if an encoder refuses a value.
        tracing::error!(error = %e, "encoding the metrics failed");
    }
    out
}

/// Families read at scrape time, as a `prometheus-client` collector.
struct AtScrape<F>(F);

impl<F> std::fmt::Debug for AtScrape<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AtScrape")
    }
}

impl<F> Collector for AtScrape<F>
where
    F: Fn(&mut Exposition<'_>) -> std::fmt::Result + Send + Sync + 'static,
{
    fn encode(&self, encoder: DescriptorEncoder) -> std::fmt::Result {
        (self.0)(&mut Exposition(encoder))
    }
}

/// Where scrape-time families are written: each one its HELP and TYPE,
/// then each series as (labels, value). Labels are any label set the
/// encoder takes: `[("reason", "manual")]`, `NoLabelSet`, a derived one.
pub struct Exposition<'a>(DescriptorEncoder<'a>);

impl Exposition<'_> {
    /// A counter family; `name` ends in `_total` (as served).
    pub fn counter<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (L, u64)>,
    ) -> std::fmt::Result {
        // The encoder adds `_total` to a counter's name.
        let name = name.strip_suffix("_total").unwrap_or(name);
        let mut family = self
            .0
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, value) in series {
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// A gauge family.
    pub fn gauge<L: EncodeLabelSet, V: EncodeGaugeValue>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (L, V)>,
    ) -> std::fmt::Result {
        let mut family = self
            .0
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, value) in series {
            ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// The label set of a series without labels.
pub const NO_LABELS: [(&str, &str); 0] = [];

/// Writes one counter family (see [`Exposition::counter`]).
pub fn counter<L: EncodeLabelSet>(
    out: &mut Exposition<'_>,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, u64)>,
) -> std::fmt::Result {
    out.counter(name, help, series)
}

/// Writes one gauge family (see [`Exposition::gauge`]).
pub fn gauge<L: EncodeLabelSet, V: EncodeGaugeValue>(
    out: &mut Exposition<'_>,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, V)>,
) -> std::fmt::Result {
    out.gauge(name, help, series)
}

/// `metrics`' series alone: no live connections, guard or admission (for
/// unit tests here and in `admission`).
#[cfg(test)]
pub(crate) fn render_alone(metrics: Arc<Metrics>) -> String {
    Sources {
        metrics,
        registry: Arc::default(),
        reloads: Arc::default(),
        guard: None,
        admission: None,
        workers: None,
    }
    .render()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(metrics: Arc<Metrics>) -> String {
        render_alone(metrics)
    }

    /// A reload builds the state again and takes its series again: it must
    /// get the same ones, or every count would start over at 0.
    #[test]
    fn a_reload_counts_into_the_same_series() {
        let metrics = Arc::new(Metrics::default());
        for _ in 0..2 {
            let route = metrics.route("edge", "orders");
            route.allowed.inc();
            route.moved(10, 200);
            route.connect.observe(0.0003);
            let listener = metrics.listener("edge");
            listener.handshake.observe(0.002);
            listener.handshake_failed(HandshakeFailure::Policy);
        }
        let text = render(metrics);
        for line in [
            "gateway_route_decisions_total{listener=\"edge\",route=\"orders\",verdict=\"allow\"} 2",
            "gateway_route_decisions_total{listener=\"edge\",route=\"orders\",verdict=\"deny\"} 0",
            "gateway_bytes_total{listener=\"edge\",route=\"orders\",direction=\"client_to_backend\"} 20",
            "gateway_bytes_total{listener=\"edge\",route=\"orders\",direction=\"backend_to_client\"} 400",
            "gateway_backend_connect_duration_seconds_count{listener=\"edge\",route=\"orders\"} 2",
            "gateway_handshake_duration_seconds_count{listener=\"edge\"} 2",
            "gateway_handshake_failures_total{listener=\"edge\",reason=\"policy\"} 2",
            "gateway_handshake_failures_total{listener=\"edge\",reason=\"no_route\"} 0",
            "gateway_access_log_lost_total 0",
            "gateway_live_connections 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(
            text.contains("gateway_build_info{version=\"0.1.0\",commit=\""),
            "{text}"
        );
    }

    /// A name from the config cannot break the exposition: quotes,
    /// backslashes and newlines in label values are escaped.
    #[test]
    fn label_values_are_escaped() {
        let metrics = Arc::new(Metrics::default());
        metrics.refused("a\"b\\c\nd", "blocked");
        let text = render(metrics);
        assert!(
            text.contains(
                "gateway_connections_refused_total{listener=\"a\\\"b\\\\c\\nd\",reason=\"blocked\"} 1"
            ),
            "{text}"
        );
    }
}

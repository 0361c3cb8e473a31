//! Counters an operator scrapes, in Prometheus text (served by `admin`).
//!
//! Route counters are keyed by listener and route name and live here, not in
//! the route, so a reload (which rebuilds every route) does not reset them.
//! Label values are the access log's words: one name for one idea.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::app::ReloadStats;
use crate::registry::Registry;

/// What a route decided, counted since start (across reloads).
#[derive(Debug, Default)]
pub struct RouteStats {
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
    /// Would have been denied, but the route is in audit mode.
    pub audited: AtomicU64,
}

/// Listener, route, backend, and why an attempt at it failed.
type BackendFailure = (String, String, String, &'static str);

#[derive(Debug, Default)]
pub struct Metrics {
    routes: Mutex<BTreeMap<(String, String), Arc<RouteStats>>>,
    /// Connections refused without a route decision, by listener and reason.
    refused: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Connections by listener, path ("kernel", "userspace") and fallback reason.
    offload: Mutex<BTreeMap<(String, &'static str, &'static str), u64>>,
    expiries: Mutex<Vec<crate::expiry::Expiry>>,
    /// Checks that met a CRL past its nextUpdate, by bundle and its
    /// `crl_expired` (refused, or used with a warning).
    stale_crl_uses: Mutex<BTreeMap<(String, &'static str), Arc<AtomicU64>>>,
    /// Reloads refused for their CRLs, by reason (`ambiguous`, `rollback`,
    /// `withdrawn`).
    crl_refused: Mutex<BTreeMap<&'static str, u64>>,
    /// Failed attempts to reach a backend, by listener, route, backend and
    /// `upstream::ConnectFailure`.
    backend_failures: Mutex<BTreeMap<BackendFailure, u64>>,
    /// Allowed connections closed because no backend could be reached, by
    /// listener and route.
    no_backend: Mutex<BTreeMap<(String, String), u64>>,
    /// Access-log lines that could not be written (a full disk, an I/O
    /// error), shared with the access log itself.
    pub access_log_lost: Arc<AtomicU64>,
}

impl Metrics {
    /// The counters of a route, the same ones before and after a reload.
    pub fn route(&self, listener: &str, route: &str) -> Arc<RouteStats> {
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((listener.to_owned(), route.to_owned()))
            .or_default()
            .clone()
    }

    /// The certificates and CRLs of the state now serving.
    pub fn set_expiries(&self, expiries: Vec<crate::expiry::Expiry>) {
        *self.expiries.lock().unwrap_or_else(|p| p.into_inner()) = expiries;
    }

    /// Logs a warning for each certificate or CRL running out within `horizon`.
    pub fn warn_expiring(&self, horizon: std::time::Duration) {
        let now = jiff::Timestamp::now().as_second();
        let horizon = i64::try_from(horizon.as_secs()).unwrap_or(i64::MAX);
        for e in self
            .expiries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            if e.seconds_left(now) <= horizon {
                tracing::warn!(file = %e.file.display(), "{}", crate::expiry::describe(e, now));
            }
        }
    }

    /// Counts a connection refused before any route decision: `reason` is
    /// `max_connections` (at accept) or `unknown_trust_bundle` (a route names
    /// a bundle its listener does not have).
    pub fn refused(&self, listener: &str, reason: &'static str) {
        *self
            .refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((listener.to_owned(), reason))
            .or_default() += 1;
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
        *self
            .crl_refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(reason)
            .or_default() += 1;
    }

    /// Counts an allowed connection that reached no backend, and each
    /// attempt that failed on its way there.
    pub fn no_backend(&self, listener: &str, route: &str, failures: &[crate::upstream::Failed]) {
        *self
            .no_backend
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((listener.to_owned(), route.to_owned()))
            .or_default() += 1;
        for f in failures {
            self.backend_failed(listener, route, f);
        }
    }

    /// Counts a failed attempt at a backend that a later attempt made up
    /// for: the client was served, the backend still failed.
    pub fn backend_failed(&self, listener: &str, route: &str, failed: &crate::upstream::Failed) {
        *self
            .backend_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((
                listener.to_owned(),
                route.to_owned(),
                failed.backend.clone(),
                failed.reason.as_str(),
            ))
            .or_default() += 1;
    }

    /// Counts which path a connection took after its handshake, and why.
    pub fn offload(&self, listener: &str, path: &'static str, reason: &'static str) {
        *self
            .offload
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((listener.to_owned(), path, reason))
            .or_default() += 1;
    }

    /// Prometheus text exposition format.
    pub fn render(&self, registry: &Registry, reloads: &ReloadStats) -> String {
        let mut out = String::new();
        out.push_str("# HELP gateway_route_decisions_total Client verdicts per route (allow, deny, audit), as in the access log.\n");
        out.push_str("# TYPE gateway_route_decisions_total counter\n");
        for ((listener, route), s) in self.routes.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            for (verdict, n) in [
                ("allow", &s.allowed),
                ("deny", &s.denied),
                ("audit", &s.audited),
            ] {
                let _ = writeln!(
                    out,
                    "gateway_route_decisions_total{{listener=\"{}\",route=\"{}\",verdict=\"{verdict}\"}} {}",
                    escape(listener),
                    escape(route),
                    n.load(Ordering::Relaxed)
                );
            }
        }
        out.push_str("# HELP gateway_connections_refused_total Connections refused without a route decision, by reason.\n");
        out.push_str("# TYPE gateway_connections_refused_total counter\n");
        for ((listener, reason), n) in self
            .refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "gateway_connections_refused_total{{listener=\"{}\",reason=\"{reason}\"}} {n}",
                escape(listener)
            );
        }
        out.push_str("# HELP gateway_offload_total Connections by where their bytes moved (kernel: kTLS + splice) and why a connection stayed in userspace.\n");
        out.push_str("# TYPE gateway_offload_total counter\n");
        for ((listener, path, reason), n) in self
            .offload
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "gateway_offload_total{{listener=\"{}\",path=\"{path}\",reason=\"{reason}\"}} {n}",
                escape(listener)
            );
        }
        out.push_str("# HELP gateway_crl_expired_total Client checks that met a CRL past its next update, by trust bundle and what its crl_expired made of it (refuse, warn).\n");
        out.push_str("# TYPE gateway_crl_expired_total counter\n");
        for ((bundle, policy), n) in self
            .stale_crl_uses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "gateway_crl_expired_total{{bundle=\"{}\",crl_expired=\"{policy}\"}} {}",
                escape(bundle),
                n.load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP gateway_crl_refused_total Reloads refused for their CRLs: two different CRLs of one issuer and scope with one number (ambiguous), a CRL older than one this process already enforced (rollback), or a configured CRL file that no longer holds a CRL for an issuer and scope it held, nor does another file of its bundle (withdrawn).\n");
        out.push_str("# TYPE gateway_crl_refused_total counter\n");
        for (reason, n) in self
            .crl_refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(out, "gateway_crl_refused_total{{reason=\"{reason}\"}} {n}");
        }
        out.push_str("# HELP gateway_backend_connect_failures_total Attempts to reach a backend that failed, by reason (refused, timeout, unreachable, gate, tls, other).\n");
        out.push_str("# TYPE gateway_backend_connect_failures_total counter\n");
        for ((listener, route, backend, reason), n) in self
            .backend_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "gateway_backend_connect_failures_total{{listener=\"{}\",route=\"{}\",backend=\"{}\",reason=\"{reason}\"}} {n}",
                escape(listener),
                escape(route),
                escape(backend)
            );
        }
        out.push_str("# HELP gateway_no_backend_total Allowed connections closed because every attempt to reach a backend failed.\n");
        out.push_str("# TYPE gateway_no_backend_total counter\n");
        for ((listener, route), n) in self
            .no_backend
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "gateway_no_backend_total{{listener=\"{}\",route=\"{}\"}} {n}",
                escape(listener),
                escape(route)
            );
        }
        out.push_str("# HELP gateway_access_log_lost_total Access-log lines that could not be written (a full disk, an I/O error).\n");
        out.push_str("# TYPE gateway_access_log_lost_total counter\n");
        let _ = writeln!(
            out,
            "gateway_access_log_lost_total {}",
            self.access_log_lost.load(Ordering::Relaxed)
        );
        let now = jiff::Timestamp::now().as_second();
        out.push_str("# HELP gateway_certificate_expiry_seconds Seconds until a certificate the config names expires (negative: expired).\n");
        out.push_str("# TYPE gateway_certificate_expiry_seconds gauge\n");
        let expiries = self.expiries.lock().unwrap_or_else(|p| p.into_inner());
        for e in expiries
            .iter()
            .filter(|e| e.kind == crate::expiry::Kind::Certificate)
        {
            let _ = writeln!(
                out,
                "gateway_certificate_expiry_seconds{{role=\"{}\",file=\"{}\",subject=\"{}\"}} {}",
                escape(&e.role),
                escape(&e.file.display().to_string()),
                escape(&e.subject),
                e.seconds_left(now)
            );
        }
        out.push_str("# HELP gateway_crl_next_update_seconds Seconds until the next update of each CRL a bundle enforces (negative: stale; see crl_expired).\n");
        out.push_str("# TYPE gateway_crl_next_update_seconds gauge\n");
        for e in expiries.iter() {
            // One file may hold several issuers' CRLs (gateway pki's crl.pem).
            let crate::expiry::Kind::Crl(policy) = e.kind else {
                continue;
            };
            let _ = writeln!(
                out,
                "gateway_crl_next_update_seconds{{role=\"{}\",file=\"{}\",issuer=\"{}\",crl_expired=\"{}\"}} {}",
                escape(&e.role),
                escape(&e.file.display().to_string()),
                escape(&e.subject),
                policy.as_str(),
                e.seconds_left(now)
            );
        }
        drop(expiries);
        out.push_str("# HELP gateway_live_connections Connections past the handshake right now.\n");
        out.push_str("# TYPE gateway_live_connections gauge\n");
        let _ = writeln!(out, "gateway_live_connections {}", registry.len());
        out.push_str("# HELP gateway_reloads_total Reloads by result.\n");
        out.push_str("# TYPE gateway_reloads_total counter\n");
        let _ = writeln!(
            out,
            "gateway_reloads_total{{result=\"ok\"}} {}",
            reloads.succeeded.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "gateway_reloads_total{{result=\"failed\"}} {}",
            reloads.failed.load(Ordering::Relaxed)
        );
        out
    }
}

pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Everything `GET /metrics` reports on.
#[derive(Clone)]
pub struct Sources {
    pub metrics: Arc<Metrics>,
    pub registry: Arc<Registry>,
    pub reloads: Arc<ReloadStats>,
    pub guard: Option<Arc<crate::guard::Guard>>,
    pub admission: Option<Arc<crate::admission::Admission>>,
}

impl Sources {
    pub fn render(&self) -> String {
        let mut out = self.metrics.render(&self.registry, &self.reloads);
        if let Some(guard) = &self.guard {
            guard.render_metrics(&mut out);
        }
        if let Some(admission) = &self.admission {
            admission.render_metrics(&mut out);
        }
        out
    }
}

/// Writes one counter family: its HELP and TYPE lines, then each series as
/// (labels, value), labels written as they go between the braces ("" for
/// none).
pub fn counter(out: &mut String, name: &str, help: &str, series: &[(String, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} counter");
    for (labels, value) in series {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

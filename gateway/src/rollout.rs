//! The audit report: is a route in `audit` mode ready to enforce?
//!
//! Per route in audit mode the gateway keeps a bounded summary of the
//! clients it let in (`seen`) and of those enforcement would have refused
//! (`would_deny`): identity (none: no certificate), source prefix (/24 for
//! IPv4, /64 for IPv6: a report names networks, not hosts), reason (the
//! policy's `DenyReason` kind or the handshake failure's name), count, first
//! and last seen. Each table keeps at most `audit_entries` entries; a new
//! one beyond that evicts the entry with the fewest connections (the oldest
//! among equals) into the table's overflow tally, so the counts kept are
//! exact since the entry came in and nothing counted is ever forgotten.
//!
//! The summary lives for the process (keyed by listener and route name, so
//! a reload keeps it) and, with `audit_state`, in a JSON file written
//! atomically (temp file, fsync, rename; mode 0600) every few seconds when
//! it changed and at shutdown, and read at start. A file that cannot be
//! read or parsed is logged, counted (`gateway_audit_state_errors_total`)
//! and set aside as `<file>.corrupt`; the gateway starts with an empty
//! summary rather than refusing to start over evidence it cannot read.
//!
//! Every route, in any mode, also keeps the client certificates it let in
//! (identity as above, serial, notBefore, notAfter, last seen), at most
//! `audit_entries` of them: when full, a certificate not seen for a day
//! gives way first, then one outside its warning window, then the one that
//! runs out last, into an overflow count. The report lists those seen in
//! the last day that are inside their window: within `expiry_warning` of
//! notAfter, or within the last third of their lifetime when that is
//! shorter (a healthy client renews by then, so a one-hour credential is
//! not flagged all its life, but one still used with ten minutes left is).
//! It also lists the gateway's own certificates and CRLs inside their
//! window (the same rule, `expiry::warns_at`; a CRL's lifetime from its
//! thisUpdate); one that fails closed makes each route it serves not ready
//! (see [`Report`]).
//!
//! `GET /rollout/report` serves [`Report`]; `gateway rollout report` prints it.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::config::Mode;

/// Entries kept per table and route unless `audit_entries` says otherwise.
pub const DEFAULT_ENTRIES: usize = 256;
/// How often a changed summary is written to `audit_state`.
pub const SAVE_INTERVAL: Duration = Duration::from_secs(5);
/// A state file larger than this is not read (it cannot be one this
/// gateway wrote with a sane `audit_entries`).
const MAX_STATE_BYTES: u64 = 64 << 20;
/// 2 added the client certificates; 1 is read as having none.
const STATE_VERSION: u32 = 2;
/// A client certificate is listed when it was last seen within this.
pub const CLIENTS_SEEN_WITHIN: i64 = 86_400;

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("reading the audit state {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the audit state {path} is not one this gateway wrote: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("writing the audit state {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Its directory, or the file, is one another user could have
    /// written: never read as evidence, never written.
    #[error("the audit state {path} is not trusted: {reason}")]
    Untrusted { path: PathBuf, reason: String },
}

impl RolloutError {
    /// The `reason` label of `gateway_audit_state_errors_total`.
    pub fn as_str(&self) -> &'static str {
        match self {
            RolloutError::Unreadable { .. } => "unreadable",
            RolloutError::Corrupt { .. } => "corrupt",
            RolloutError::Write { .. } => "write",
            RolloutError::Untrusted { .. } => "unsafe",
        }
    }
}

/// One client (or, in `would_deny`, one refusal) as the summary keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
struct Key {
    /// None: the client presented no certificate.
    identity: Option<String>,
    /// The client's /24 or /64.
    source: IpNet,
    /// Why enforcement would refuse it; empty in `seen`.
    #[serde(default)]
    reason: String,
}

/// Connections and when they came (Unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Tally {
    count: u64,
    first_seen: i64,
    last_seen: i64,
}

impl Tally {
    fn new(now: i64) -> Tally {
        Tally {
            count: 1,
            first_seen: now,
            last_seen: now,
        }
    }

    fn absorb(&mut self, other: Tally) {
        self.count += other.count;
        self.first_seen = self.first_seen.min(other.first_seen);
        self.last_seen = self.last_seen.max(other.last_seen);
    }
}

/// What did not fit: entries evicted, and their connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Overflow {
    entries: u64,
    tally: Option<Tally>,
}

/// At most `limit` entries, the rest in `overflow`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Table {
    entries: HashMap<Key, Tally>,
    overflow: Overflow,
}

impl Table {
    fn record(&mut self, key: Key, now: i64, limit: usize) {
        if let Some(t) = self.entries.get_mut(&key) {
            t.count += 1;
            t.last_seen = t.last_seen.max(now);
            return;
        }
        self.shrink_to(limit.saturating_sub(1));
        if limit > 0 {
            self.entries.insert(key, Tally::new(now));
        } else {
            self.spill(Tally::new(now));
        }
    }

    /// Evicts the smallest entries (fewest connections, then oldest, then
    /// by key so the choice does not depend on hashing) until `len` remain.
    fn shrink_to(&mut self, len: usize) {
        while self.entries.len() > len {
            let Some(smallest) = self
                .entries
                .iter()
                .min_by(|(ka, a), (kb, b)| {
                    (a.count, a.last_seen, *ka).cmp(&(b.count, b.last_seen, *kb))
                })
                .map(|(k, _)| k.clone())
            else {
                return;
            };
            if let Some(t) = self.entries.remove(&smallest) {
                self.spill(t);
            }
        }
    }

    fn spill(&mut self, t: Tally) {
        self.overflow.entries += 1;
        self.spill_tally(t);
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct RouteSummary {
    seen: Table,
    would_deny: Table,
    clients: Certs,
}

/// A client certificate: whose, and which.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct CertKey {
    identity: String,
    serial: String,
}

/// When a client certificate is good, and when it was last used (Unix
/// seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct CertSeen {
    not_before: i64,
    not_after: i64,
    last_seen: i64,
}

impl CertSeen {
    /// When it enters its warning window: `warning` before notAfter, or
    /// the last third of its lifetime when that is shorter.
    fn warns_at(&self, warning: i64) -> i64 {
        crate::expiry::warns_at(self.not_before, self.not_after, warning)
    }

    fn listed(&self, now: i64, warning: i64) -> bool {
        now.saturating_sub(self.last_seen) <= CLIENTS_SEEN_WITHIN && now >= self.warns_at(warning)
    }
}

/// What did not fit the certificate table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct CertOverflow {
    entries: u64,
    /// Of those, the ones inside their window when they gave way, and the
    /// last time one of them was seen.
    listed: u64,
    listed_last_seen: Option<i64>,
}

/// At most `limit` client certificates, the rest counted in `overflow`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Certs {
    entries: HashMap<CertKey, CertSeen>,
    overflow: CertOverflow,
}

impl Certs {
    fn record(&mut self, key: CertKey, seen: CertSeen, warning: i64, limit: usize) {
        if let Some(s) = self.entries.get_mut(&key) {
            s.last_seen = s.last_seen.max(seen.last_seen);
            return;
        }
        self.entries.insert(key, seen);
        self.shrink_to(limit, seen.last_seen, warning);
    }

    /// Gives way, until `len` remain: the certificate not seen for the
    /// longest if that is over a day, else one outside its window, else
    /// the one that runs out last (by key among equals, so the choice
    /// does not depend on hashing).
    fn shrink_to(&mut self, len: usize, now: i64, warning: i64) {
        while self.entries.len() > len {
            let Some(last) = self
                .entries
                .iter()
                .max_by_key(|&(k, s)| {
                    let stale = now.saturating_sub(s.last_seen) > CLIENTS_SEEN_WITHIN;
                    (
                        stale,
                        stale.then_some(-s.last_seen),
                        !s.listed(now, warning),
                        s.not_after,
                        k,
                    )
                })
                .map(|(k, _)| k.clone())
            else {
                return;
            };
            if let Some(s) = self.entries.remove(&last) {
                self.overflow.entries += 1;
                if s.listed(now, warning) {
                    self.overflow.listed += 1;
                    self.overflow.listed_last_seen = Some(
                        self.overflow
                            .listed_last_seen
                            .map_or(s.last_seen, |l| l.max(s.last_seen)),
                    );
                }
            }
        }
    }
}

/// Every route's summary, shared by all generations of the state.
#[derive(Debug)]
pub struct Audit {
    routes: Mutex<BTreeMap<(String, String), RouteSummary>>,
    limit: AtomicUsize,
    /// `expiry_warning` in seconds, for the client certificates.
    warning: std::sync::atomic::AtomicI64,
    dirty: AtomicBool,
    /// State file errors by reason (see [`RolloutError::as_str`]).
    errors: Mutex<BTreeMap<&'static str, u64>>,
}

impl Default for Audit {
    fn default() -> Self {
        Audit {
            routes: Mutex::default(),
            limit: AtomicUsize::new(DEFAULT_ENTRIES),
            warning: std::sync::atomic::AtomicI64::new(30 * 86_400),
            dirty: AtomicBool::new(false),
            errors: Mutex::default(),
        }
    }
}

/// One route's handle on the summary.
#[derive(Debug, Clone)]
pub struct RouteAudit {
    audit: Arc<Audit>,
    listener: String,
    route: String,
}

impl Default for RouteAudit {
    /// Recorded nowhere anyone reads (unit tests' routes).
    fn default() -> Self {
        RouteAudit {
            audit: Arc::default(),
            listener: String::new(),
            route: String::new(),
        }
    }
}

impl RouteAudit {
    /// A client the route let in.
    pub fn seen(&self, identity: Option<String>, client: IpAddr) {
        self.audit
            .record_at(&self.listener, &self.route, identity, client, None, now());
    }

    /// A client enforcement would have refused for `reason`.
    pub fn would_deny(&self, identity: Option<String>, client: IpAddr, reason: &str) {
        self.audit.record_at(
            &self.listener,
            &self.route,
            identity,
            client,
            Some(reason),
            now(),
        );
    }
}

impl RouteAudit {
    /// A client the route let in with a verified certificate, in any mode.
    pub fn certificate(&self, identity: &crate::identity::Identity) {
        self.audit.certificate_at(
            &self.listener,
            &self.route,
            crate::identity::joined(&identity.names()),
            identity,
            now(),
        );
    }
}

fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// The /24 or /64 a client is reported under.
pub fn source_prefix(client: IpAddr) -> IpNet {
    let client = client.to_canonical();
    let len = if client.is_ipv4() { 24 } else { 64 };
    IpNet::new(client, len).map_or(IpNet::from(client), |n| n.trunc())
}

impl Audit {
    pub fn route(self: &Arc<Self>, listener: &str, route: &str) -> RouteAudit {
        RouteAudit {
            audit: self.clone(),
            listener: listener.to_owned(),
            route: route.to_owned(),
        }
    }

    /// Entries kept per table and route; fewer than before evicts now.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
        let mut routes = self.lock();
        let warning = self.warning.load(Ordering::Relaxed);
        for r in routes.values_mut() {
            r.seen.shrink_to(limit);
            r.would_deny.shrink_to(limit);
            r.clients.shrink_to(limit, now(), warning);
        }
    }

    /// `expiry_warning`: when a client certificate is listed.
    pub fn set_warning(&self, warning: Duration) {
        self.warning.store(
            i64::try_from(warning.as_secs()).unwrap_or(i64::MAX),
            Ordering::Relaxed,
        );
    }

    fn certificate_at(
        &self,
        listener: &str,
        route: &str,
        name: String,
        identity: &crate::identity::Identity,
        now: i64,
    ) {
        let limit = self.limit.load(Ordering::Relaxed);
        let warning = self.warning.load(Ordering::Relaxed);
        let key = CertKey {
            identity: name,
            serial: identity.serial.clone(),
        };
        let seen = CertSeen {
            not_before: identity.not_before,
            not_after: identity.not_after,
            last_seen: now,
        };
        let mut routes = self.lock();
        routes
            .entry((listener.to_owned(), route.to_owned()))
            .or_default()
            .clients
            .record(key, seen, warning, limit);
        self.dirty.store(true, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), RouteSummary>> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record_at(
        &self,
        listener: &str,
        route: &str,
        identity: Option<String>,
        client: IpAddr,
        reason: Option<&str>,
        now: i64,
    ) {
        let limit = self.limit.load(Ordering::Relaxed);
        let key = Key {
            identity,
            source: source_prefix(client),
            reason: reason.unwrap_or_default().to_owned(),
        };
        let mut routes = self.lock();
        let summary = routes
            .entry((listener.to_owned(), route.to_owned()))
            .or_default();
        let table = match reason {
            Some(_) => &mut summary.would_deny,
            None => &mut summary.seen,
        };
        table.record(key, now, limit);
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Counts a state file error for the metrics.
    pub fn state_error(&self, e: &RolloutError) {
        *self
            .errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(e.as_str())
            .or_default() += 1;
    }

    /// `gateway_audit_state_errors_total`, every reason from the start.
    pub fn state_errors(&self) -> Vec<(&'static str, u64)> {
        let errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        ["unreadable", "corrupt", "write", "unsafe"]
            .into_iter()
            .map(|r| (r, errors.get(r).copied().unwrap_or(0)))
            .collect()
    }

    /// Reads `path` into the summary (merging with what is there). A
    /// missing file is a first start; one that cannot be read or parsed is
    /// moved aside to `<path>.corrupt` (so later saves do not destroy it)
    /// and reported: the caller logs and counts it and goes on empty.
    pub fn load(&self, path: &Path) -> Result<(), RolloutError> {
        use crate::safe_dir::PrivateFileError;
        let untrusted = |reason| RolloutError::Untrusted {
            path: path.to_owned(),
            reason,
        };
        // A directory others can write: nothing in it is evidence, and
        // nothing is moved there (saves are refused too).
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        crate::safe_dir::check_dir(dir).map_err(untrusted)?;
        let text = match crate::safe_dir::read_private(path, MAX_STATE_BYTES) {
            Ok(t) => t,
            Err(PrivateFileError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(());
            }
            Err(PrivateFileError::Io(source)) => {
                return Err(RolloutError::Unreadable {
                    path: path.to_owned(),
                    source,
                });
            }
            Err(PrivateFileError::Untrusted(reason)) => {
                // Set aside like a corrupt file, so a later save does not
                // destroy what someone planted.
                return Err(untrusted(moved_aside(path, reason)));
            }
        };
        let state: StateFile = match serde_json::from_slice(&text) {
            Ok(s) => s,
            Err(e) => return Err(self.set_aside(path, e.to_string())),
        };
        if !(1..=STATE_VERSION).contains(&state.version) {
            return Err(self.set_aside(path, format!("version {}", state.version)));
        }
        let limit = self.limit.load(Ordering::Relaxed);
        let warning = self.warning.load(Ordering::Relaxed);
        let mut routes = self.lock();
        for r in state.routes {
            let summary = routes.entry((r.listener, r.route)).or_default();
            for c in r.clients.entries {
                let key = CertKey {
                    identity: c.identity,
                    serial: c.serial,
                };
                summary.clients.record(key, c.seen, warning, usize::MAX);
            }
            let o = &mut summary.clients.overflow;
            o.entries += r.clients.overflow.entries;
            o.listed += r.clients.overflow.listed;
            o.listed_last_seen = o.listed_last_seen.max(r.clients.overflow.listed_last_seen);
            summary.clients.shrink_to(limit, now(), warning);
            for (table, saved) in [
                (&mut summary.seen, r.seen),
                (&mut summary.would_deny, r.would_deny),
            ] {
                for e in saved.entries {
                    let key = Key {
                        identity: e.identity,
                        source: e.source,
                        reason: e.reason,
                    };
                    match table.entries.entry(key) {
                        std::collections::hash_map::Entry::Occupied(mut o) => {
                            o.get_mut().absorb(e.tally)
                        }
                        std::collections::hash_map::Entry::Vacant(v) => {
                            v.insert(e.tally);
                        }
                    }
                }
                table.overflow.entries += saved.overflow.entries;
                if let Some(t) = saved.overflow.tally {
                    table.spill_tally(t);
                }
                table.shrink_to(limit);
            }
        }
        Ok(())
    }

    fn set_aside(&self, path: &Path, reason: String) -> RolloutError {
        RolloutError::Corrupt {
            path: path.to_owned(),
            reason: moved_aside(path, reason),
        }
    }

    /// Writes the summary to `path` if it changed since the last save (or
    /// `force`): a temp file beside it, mode 0600, fsync, rename.
    pub fn save(&self, path: &Path, force: bool) -> Result<(), RolloutError> {
        if !self.dirty.swap(false, Ordering::Relaxed) && !force {
            return Ok(());
        }
        let state = self.snapshot();
        let body = serde_json::to_vec(&state).unwrap_or_default();
        let write = |source| RolloutError::Write {
            path: path.to_owned(),
            source,
        };
        if let Err(reason) = crate::safe_dir::check_parent_of(path) {
            self.dirty.store(true, Ordering::Relaxed);
            return Err(RolloutError::Untrusted {
                path: path.to_owned(),
                reason,
            });
        }
        if let Err(e) = crate::revisions::write_private(path, &body) {
            // Try again next time.
            self.dirty.store(true, Ordering::Relaxed);
            return Err(write(e));
        }
        Ok(())
    }

    fn snapshot(&self) -> StateFile {
        let routes = self.lock();
        StateFile {
            version: STATE_VERSION,
            routes: routes
                .iter()
                .map(|((listener, route), s)| SavedRoute {
                    listener: listener.clone(),
                    route: route.clone(),
                    seen: SavedTable::from(&s.seen),
                    would_deny: SavedTable::from(&s.would_deny),
                    clients: SavedCerts::from(&s.clients),
                })
                .collect(),
        }
    }

    /// The report on `routes` (listener, route, its current mode), counting
    /// only what was last seen within `since` of `now`.
    /// `expiring`: the gateway's certificates and CRLs within
    /// `expiry_warning` (see `expiry::Watched::within_warning`).
    pub fn report(
        &self,
        routes: &[(String, String, Mode)],
        since: Option<Duration>,
        expiring: &[crate::expiry::Expiry],
    ) -> Report {
        self.report_at(routes, since, expiring, now())
    }

    fn report_at(
        &self,
        routes: &[(String, String, Mode)],
        since: Option<Duration>,
        expiring: &[crate::expiry::Expiry],
        now: i64,
    ) -> Report {
        let warning = self.warning.load(Ordering::Relaxed);
        let from =
            since.map(|d| now.saturating_sub(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)));
        let within = |t: &Tally| from.is_none_or(|f| t.last_seen >= f);
        let summaries = self.lock();
        let empty = RouteSummary::default();
        let reports = routes
            .iter()
            .map(|(listener, route, mode)| {
                let s = summaries
                    .get(&(listener.clone(), route.clone()))
                    .unwrap_or(&empty);
                let mut would_deny: Vec<Refusal> = s
                    .would_deny
                    .entries
                    .iter()
                    .filter(|(_, t)| within(t))
                    .map(|(k, t)| Refusal {
                        identity: k.identity.clone(),
                        source: k.source.to_string(),
                        reason: k.reason.clone(),
                        count: t.count,
                        first_seen: timestamp(t.first_seen),
                        last_seen: timestamp(t.last_seen),
                    })
                    .collect();
                would_deny.sort_by(|a, b| {
                    (b.count, &a.identity, &a.reason, &a.source).cmp(&(
                        a.count,
                        &b.identity,
                        &b.reason,
                        &b.source,
                    ))
                });
                let seen: Vec<(&Key, &Tally)> =
                    s.seen.entries.iter().filter(|(_, t)| within(t)).collect();
                let mut clients: Vec<String> = seen
                    .iter()
                    .map(|(k, _)| who(k.identity.as_deref(), &k.reason))
                    .chain(
                        s.would_deny
                            .entries
                            .iter()
                            .filter(|(_, t)| within(t))
                            .map(|(k, _)| who(k.identity.as_deref(), &k.reason)),
                    )
                    .collect();
                clients.sort();
                clients.dedup();
                // Most connections first, as listed.
                let mut refused: Vec<String> = Vec::new();
                for r in &would_deny {
                    let w = who(r.identity.as_deref(), &r.reason);
                    if !refused.contains(&w) {
                        refused.push(w);
                    }
                }
                let overflow = |o: &Overflow| {
                    o.tally.filter(within).map(|t| Overflowed {
                        entries: o.entries,
                        connections: t.count,
                        last_seen: timestamp(t.last_seen),
                    })
                };
                let would_deny_overflow = overflow(&s.would_deny.overflow);
                let seen_overflow = overflow(&s.seen.overflow);
                let clients_seen = clients.len() as u64
                    + seen_overflow.as_ref().map_or(0, |o| o.entries)
                    + would_deny_overflow.as_ref().map_or(0, |o| o.entries);
                let window = match since {
                    Some(d) => format!("in the last {}", humantime(d)),
                    None => "in the summary".to_owned(),
                };
                let (ready, verdict) = match mode {
                    Mode::Enforce => (true, "enforce: already enforcing".to_owned()),
                    Mode::Off => (
                        false,
                        "off: nothing is checked, so there is no evidence; switch to audit first"
                            .to_owned(),
                    ),
                    Mode::Audit if !refused.is_empty() => (
                        false,
                        format!(
                            "not ready: {} {} would be refused {window}: {}",
                            refused.len(),
                            if refused.len() == 1 { "identity" } else { "identities" },
                            refused.join(", ")
                        ),
                    ),
                    Mode::Audit if would_deny_overflow.is_some() => (
                        false,
                        format!("not ready: would-deny entries that did not fit the summary were seen {window}"),
                    ),
                    Mode::Audit if clients_seen == 0 => (
                        false,
                        format!("not ready: no clients seen {window}, so no evidence either way"),
                    ),
                    Mode::Audit => (true, format!("ready: no would-deny {window}")),
                };
                let key = (listener.clone(), route.clone());
                let own: Vec<&crate::expiry::Expiry> =
                    expiring.iter().filter(|e| e.routes.contains(&key)).collect();
                // What fails closed when it runs out stops this route
                // whatever its mode: renew it before anything else.
                let blocking: Vec<String> = own
                    .iter()
                    .filter(|e| e.fails_closed())
                    .map(|e| format!("{} ({})", e.role, crate::expiry::when(e.at, now)))
                    .collect();
                let (ready, verdict) = if blocking.is_empty() {
                    (ready, verdict)
                } else {
                    (
                        false,
                        format!("not ready: renew first: {}; then {verdict}", blocking.join(", ")),
                    )
                };
                let mut expiring_clients: Vec<(&CertKey, &CertSeen)> = s
                    .clients
                    .entries
                    .iter()
                    .filter(|(_, c)| c.listed(now, warning))
                    .collect();
                expiring_clients.sort_by_key(|(k, c)| (c.not_after, *k));
                let o = &s.clients.overflow;
                let expiring_clients_overflow = (o.listed > 0
                    && o.listed_last_seen
                        .is_some_and(|l| now.saturating_sub(l) <= CLIENTS_SEEN_WITHIN))
                .then_some(o.listed);
                RouteReport {
                    listener: listener.clone(),
                    route: route.clone(),
                    mode: mode.as_str().to_owned(),
                    clients_seen,
                    allowed_connections: seen.iter().map(|(_, t)| t.count).sum::<u64>()
                        + seen_overflow.as_ref().map_or(0, |o| o.connections),
                    would_deny_connections: would_deny.iter().map(|r| r.count).sum::<u64>()
                        + would_deny_overflow.as_ref().map_or(0, |o| o.connections),
                    would_deny,
                    would_deny_overflow,
                    expiring: own.iter().map(|e| Expiring::new(e, now)).collect(),
                    expiring_clients: expiring_clients
                        .into_iter()
                        .map(|(k, c)| ExpiringClient {
                            identity: k.identity.clone(),
                            serial: k.serial.clone(),
                            not_after: timestamp(c.not_after),
                            seconds_left: c.not_after.saturating_sub(now),
                            last_seen: timestamp(c.last_seen),
                        })
                        .collect(),
                    expiring_clients_overflow,
                    ready,
                    verdict,
                }
            })
            .collect();
        Report {
            since_seconds: since.map(|d| d.as_secs()),
            expiry_warning_seconds: u64::try_from(warning).unwrap_or(0),
            expiring: expiring.iter().map(|e| Expiring::new(e, now)).collect(),
            routes: reports,
        }
    }
}

/// One client of a route's summary, for a reload's preview.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// As the summary keeps it; None: no certificate.
    pub identity: Option<String>,
    pub source: IpNet,
    /// Why enforcement would refuse it (`would_deny`); None: let in.
    pub reason: Option<String>,
    pub count: u64,
    pub last_seen: String,
}

impl Audit {
    /// The clients `listener`'s `route` let in or would have refused,
    /// last seen within `since`.
    pub fn clients(&self, listener: &str, route: &str, since: Option<Duration>) -> Vec<Client> {
        let now = now();
        let from =
            since.map(|d| now.saturating_sub(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)));
        let summaries = self.lock();
        let Some(s) = summaries.get(&(listener.to_owned(), route.to_owned())) else {
            return Vec::new();
        };
        let seen = s.seen.entries.iter().map(|e| (e, false));
        let denied = s.would_deny.entries.iter().map(|e| (e, true));
        seen.chain(denied)
            .filter(|((_, t), _)| from.is_none_or(|f| t.last_seen >= f))
            .map(|((k, t), denied)| Client {
                identity: k.identity.clone(),
                source: k.source,
                reason: denied.then(|| k.reason.clone()),
                count: t.count,
                last_seen: timestamp(t.last_seen),
            })
            .collect()
    }
}

impl Table {
    fn spill_tally(&mut self, t: Tally) {
        match &mut self.overflow.tally {
            Some(o) => o.absorb(t),
            None => self.overflow.tally = Some(t),
        }
    }
}

/// What `GET /rollout/report` reads: the summary, and the routes the
/// gateway serves now with their modes (listener, route, mode).
pub struct ReportSource {
    pub audit: Arc<Audit>,
    pub routes: Box<dyn Fn() -> Vec<(String, String, Mode)> + Send + Sync>,
    /// The gateway's certificates and CRLs.
    pub expiries: Arc<crate::expiry::Watched>,
}

/// Why a report request was not answered: the HTTP status and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unanswered(pub u16, pub String);

impl ReportSource {
    /// Answers `route=NAME&since=7d` (both optional; an unknown parameter
    /// or a route no listener serves is an error, not an empty report).
    pub fn answer(&self, query: Option<&str>) -> Result<Report, Unanswered> {
        let bad = |m: String| Unanswered(400, m);
        let (mut route, mut since) = (None, None);
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v).ok_or_else(|| bad(format!("{k}: bad percent-encoding")))?;
            match k {
                "route" => route = Some(v),
                "since" => {
                    let d = crate::config::duration::parse(&v).map_err(bad)?;
                    if d.is_zero() {
                        return Err(bad("since must be more than 0".into()));
                    }
                    since = Some(d);
                }
                other => {
                    return Err(bad(format!(
                        "unknown parameter {other:?}: route=NAME and since=7d are known"
                    )));
                }
            }
        }
        let mut routes = (self.routes)();
        routes.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        if let Some(name) = &route {
            routes.retain(|(_, r, _)| r == name);
            if routes.is_empty() {
                return Err(Unanswered(
                    404,
                    format!("no listener serves a route {name:?}"),
                ));
            }
        }
        let expiring = self.expiries.within_warning(now());
        Ok(self.audit.report(&routes, since, &expiring))
    }
}

/// `%XX` and `+` decoding of a query value; None when it is not UTF-8 or
/// an escape is cut short.
fn percent_decode(s: &str) -> Option<String> {
    let mut bytes = s.bytes();
    let mut out = Vec::with_capacity(s.len());
    while let Some(b) = bytes.next() {
        out.push(match b {
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?
            }
            b'+' => b' ',
            b => b,
        });
    }
    String::from_utf8(out).ok()
}

/// `%XX` for everything but unreserved characters, for the client side.
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// `path` moved to `<path>.corrupt` (so later saves do not destroy it),
/// and `reason` saying where it went.
fn moved_aside(path: &Path, reason: String) -> String {
    let mut aside = path.as_os_str().to_owned();
    aside.push(".corrupt");
    match std::fs::rename(path, &aside) {
        Ok(()) => format!("{reason} (moved to {})", Path::new(&aside).display()),
        Err(e) => format!("{reason} (could not move it aside: {e})"),
    }
}

fn timestamp(unix: i64) -> String {
    jiff::Timestamp::from_second(unix)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| unix.to_string())
}

/// A duration as the config would write it ("7d", "2h", "90s").
pub fn humantime(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s >= 86400 && s % 86400 == 0 => format!("{}d", s / 86400),
        s if s >= 3600 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// How a report names a client: its identity, or why it has none. A
/// certificate that did not verify (unknown CA, expired, revoked, bad) has
/// no identity the gateway would vouch for, so its names are not shown,
/// and it is not the same client as one that sent no certificate.
pub fn who(identity: Option<&str>, reason: &str) -> String {
    match identity {
        None if reason.is_empty() || reason == "no_certificate" => "(no certificate)".to_owned(),
        None => "(unverified certificate)".to_owned(),
        Some("") => "(no identity)".to_owned(),
        Some(i) => i.to_owned(),
    }
}

/// `GET /rollout/report`, and what `gateway rollout report` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The window asked for; none: everything the summary holds (which
    /// reaches back only as far as the process, or its state file).
    pub since_seconds: Option<u64>,
    /// `expiry_warning`.
    #[serde(default)]
    pub expiry_warning_seconds: u64,
    /// Every certificate and CRL of the gateway's config inside its
    /// warning window, soonest first, whichever routes it serves.
    #[serde(default)]
    pub expiring: Vec<Expiring>,
    pub routes: Vec<RouteReport>,
}

impl Report {
    /// What `gateway rollout report --format text` prints.
    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        for r in &self.routes {
            let _ = writeln!(
                out,
                "route {} (listener {}): {}",
                r.route, r.listener, r.mode
            );
            let _ = writeln!(
                out,
                "  clients seen: {} (connections: {} let in, {} would be refused)",
                r.clients_seen, r.allowed_connections, r.would_deny_connections
            );
            if !r.would_deny.is_empty() {
                let _ = writeln!(out, "  would be refused:");
                for d in &r.would_deny {
                    let _ = writeln!(
                        out,
                        "    {}  from {}  {}  {} connection{}  first {}  last {}",
                        who(d.identity.as_deref(), &d.reason),
                        d.source,
                        d.reason,
                        d.count,
                        if d.count == 1 { "" } else { "s" },
                        d.first_seen,
                        d.last_seen
                    );
                }
            }
            if let Some(o) = &r.would_deny_overflow {
                let _ = writeln!(
                    out,
                    "    and {} more entries ({} connections, last {}) that did not fit the summary",
                    o.entries, o.connections, o.last_seen
                );
            }
            if !r.expiring.is_empty() {
                let _ = writeln!(out, "  certificates and CRLs inside their warning window:");
                for e in &r.expiring {
                    let _ = writeln!(out, "    {}", e.description);
                }
            }
            if !r.expiring_clients.is_empty() || r.expiring_clients_overflow.is_some() {
                let _ = writeln!(
                    out,
                    "  client certificates seen in the last day inside their warning window:"
                );
                for c in &r.expiring_clients {
                    let _ = writeln!(
                        out,
                        "    {}  serial {}  not after {}  last seen {}",
                        c.identity, c.serial, c.not_after, c.last_seen
                    );
                }
                if let Some(n) = r.expiring_clients_overflow {
                    let _ = writeln!(out, "    and {n} more that did not fit the summary");
                }
            }
            let _ = writeln!(out, "  verdict: {}", r.verdict);
        }
        // What no route shown needs (a bundle no route names, or routes
        // left out by --route).
        let shown: Vec<&str> = self
            .routes
            .iter()
            .flat_map(|r| r.expiring.iter().map(|e| e.description.as_str()))
            .collect();
        let rest: Vec<&Expiring> = self
            .expiring
            .iter()
            .filter(|e| !shown.contains(&e.description.as_str()))
            .collect();
        if !rest.is_empty() {
            let _ = writeln!(
                out,
                "other certificates and CRLs inside their warning window:"
            );
            for e in rest {
                let _ = writeln!(out, "  {}", e.description);
            }
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteReport {
    pub listener: String,
    pub route: String,
    pub mode: String,
    /// Distinct identities (no certificate counting as one) let in or
    /// would-deny, plus entries that overflowed the summary.
    pub clients_seen: u64,
    pub allowed_connections: u64,
    pub would_deny_connections: u64,
    /// Most connections first.
    pub would_deny: Vec<Refusal>,
    pub would_deny_overflow: Option<Overflowed>,
    /// The gateway's certificates and CRLs inside their warning window
    /// that this route needs (its listener's certificate, the CA and CRLs it
    /// verifies clients with, its `upstream_tls`).
    #[serde(default)]
    pub expiring: Vec<Expiring>,
    /// Client certificates seen in the last day inside their warning
    /// window, soonest first.
    #[serde(default)]
    pub expiring_clients: Vec<ExpiringClient>,
    /// More of those that did not fit the summary.
    #[serde(default)]
    pub expiring_clients_overflow: Option<u64>,
    /// Ready to enforce: for `audit` the evidence says no one would be
    /// refused; for every mode nothing it needs that fails closed runs out
    /// within `expiry_warning`.
    pub ready: bool,
    pub verdict: String,
}

/// A certificate or CRL of the gateway's inside its warning window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expiring {
    /// What the file is for, e.g. "listener edge cert".
    pub role: String,
    /// "certificate" or "crl".
    pub kind: String,
    pub file: String,
    /// The certificate's subject or the CRL's issuer.
    pub subject: String,
    /// notAfter, or the CRL's nextUpdate.
    pub at: String,
    /// Negative: already run out.
    pub seconds_left: i64,
    /// Running out refuses clients or stops the route (every certificate;
    /// a CRL unless `crl_expired = "warn"`).
    pub fails_closed: bool,
    /// The line `gateway check` and the log say.
    pub description: String,
}

impl Expiring {
    fn new(e: &crate::expiry::Expiry, now: i64) -> Expiring {
        Expiring {
            role: e.role.clone(),
            kind: match e.kind {
                crate::expiry::Kind::Certificate => "certificate",
                crate::expiry::Kind::Crl(_) => "crl",
            }
            .to_owned(),
            file: e.file.display().to_string(),
            subject: e.subject.clone(),
            at: timestamp(e.at),
            seconds_left: e.seconds_left(now),
            fails_closed: e.fails_closed(),
            description: crate::expiry::describe(e, now),
        }
    }
}

/// A client certificate inside its warning window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpiringClient {
    /// As the audit report names clients: the certificate's names.
    pub identity: String,
    pub serial: String,
    pub not_after: String,
    /// Negative: expired (a client still let in on an audit route).
    pub seconds_left: i64,
    pub last_seen: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// None: no certificate.
    pub identity: Option<String>,
    pub source: String,
    pub reason: String,
    pub count: u64,
    pub first_seen: String,
    pub last_seen: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overflowed {
    pub entries: u64,
    pub connections: u64,
    pub last_seen: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    routes: Vec<SavedRoute>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedRoute {
    listener: String,
    route: String,
    seen: SavedTable,
    would_deny: SavedTable,
    /// Absent from version 1.
    #[serde(default)]
    clients: SavedCerts,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedCerts {
    entries: Vec<SavedCert>,
    overflow: CertOverflow,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedCert {
    identity: String,
    serial: String,
    #[serde(flatten)]
    seen: CertSeen,
}

impl From<&Certs> for SavedCerts {
    fn from(c: &Certs) -> SavedCerts {
        let mut entries: Vec<SavedCert> = c
            .entries
            .iter()
            .map(|(k, s)| SavedCert {
                identity: k.identity.clone(),
                serial: k.serial.clone(),
                seen: *s,
            })
            .collect();
        entries.sort_by(|a, b| (&a.identity, &a.serial).cmp(&(&b.identity, &b.serial)));
        SavedCerts {
            entries,
            overflow: c.overflow,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedTable {
    entries: Vec<SavedEntry>,
    overflow: Overflow,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedEntry {
    identity: Option<String>,
    source: IpNet,
    #[serde(default)]
    reason: String,
    #[serde(flatten)]
    tally: Tally,
}

impl From<&Table> for SavedTable {
    fn from(t: &Table) -> SavedTable {
        let mut entries: Vec<SavedEntry> = t
            .entries
            .iter()
            .map(|(k, t)| SavedEntry {
                identity: k.identity.clone(),
                source: k.source,
                reason: k.reason.clone(),
                tally: *t,
            })
            .collect();
        entries.sort_by(|a, b| (&a.identity, &a.reason).cmp(&(&b.identity, &b.reason)));
        SavedTable {
            entries,
            overflow: t.overflow,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// One client on edge/orders at `now`.
    fn at(audit: &Audit, identity: Option<String>, client: IpAddr, reason: Option<&str>, now: i64) {
        audit.record_at("edge", "orders", identity, client, reason, now);
    }

    fn routes(mode: Mode) -> Vec<(String, String, Mode)> {
        vec![("edge".into(), "orders".into(), mode)]
    }

    #[test]
    fn sources_are_reported_as_their_24_or_64() {
        assert_eq!(source_prefix(ip("192.0.2.77")).to_string(), "192.0.2.0/24");
        assert_eq!(
            source_prefix(ip("::ffff:192.0.2.77")).to_string(),
            "192.0.2.0/24"
        );
        assert_eq!(
            source_prefix(ip("2001:db8:1:2:3:4:5:6")).to_string(),
            "2001:db8:1:2::/64"
        );
    }

    #[test]
    fn counts_are_exact_and_grouped_by_identity_source_and_reason() {
        let audit = Audit::default();
        for _ in 0..3 {
            at(
                &audit,
                Some("spiffe://a".into()),
                ip("10.0.0.1"),
                Some("not_allowed"),
                100,
            );
        }
        at(
            &audit,
            Some("spiffe://a".into()),
            ip("10.0.0.2"),
            Some("not_allowed"),
            200,
        );
        at(&audit, None, ip("10.0.1.1"), Some("no_certificate"), 150);
        at(
            &audit,
            Some("spiffe://ok".into()),
            ip("10.0.0.1"),
            None,
            150,
        );
        let r = audit.report_at(&routes(Mode::Audit), None, &[], 300);
        let r = &r.routes[0];
        assert_eq!(r.clients_seen, 3);
        assert_eq!(r.allowed_connections, 1);
        assert_eq!(r.would_deny_connections, 5);
        assert_eq!(r.would_deny.len(), 2);
        assert_eq!(r.would_deny[0].identity.as_deref(), Some("spiffe://a"));
        assert_eq!(r.would_deny[0].count, 4);
        assert_eq!(r.would_deny[0].first_seen, timestamp(100));
        assert_eq!(r.would_deny[0].last_seen, timestamp(200));
        assert_eq!(r.would_deny[1].identity, None);
        assert_eq!(r.would_deny[1].reason, "no_certificate");
        assert!(!r.ready);
        assert!(
            r.verdict
                .starts_with("not ready: 2 identities would be refused"),
            "{}",
            r.verdict
        );
    }

    #[test]
    fn since_filters_on_last_seen() {
        let audit = Audit::default();
        at(
            &audit,
            Some("old".into()),
            ip("10.0.0.1"),
            Some("not_allowed"),
            100,
        );
        at(&audit, Some("ok".into()), ip("10.0.0.1"), None, 1000);
        let r = audit.report_at(
            &routes(Mode::Audit),
            Some(Duration::from_secs(500)),
            &[],
            1100,
        );
        assert!(r.routes[0].would_deny.is_empty());
        assert!(r.routes[0].ready, "{}", r.routes[0].verdict);
        assert_eq!(r.routes[0].verdict, "ready: no would-deny in the last 500s");
        let r = audit.report_at(&routes(Mode::Audit), None, &[], 1100);
        assert!(!r.routes[0].ready);
    }

    #[test]
    fn the_bound_holds_and_nothing_counted_is_lost() {
        let audit = Audit::default();
        audit.set_limit(3);
        // A heavy hitter first: it stays.
        for _ in 0..5 {
            at(
                &audit,
                Some("heavy".into()),
                ip("10.0.0.1"),
                Some("denied"),
                10,
            );
        }
        for i in 0..10 {
            at(
                &audit,
                Some(format!("id{i}")),
                ip("10.0.0.1"),
                Some("not_allowed"),
                20 + i,
            );
        }
        let r = audit.report_at(&routes(Mode::Audit), None, &[], 100);
        let r = &r.routes[0];
        assert_eq!(r.would_deny.len(), 3);
        assert_eq!(r.would_deny[0].identity.as_deref(), Some("heavy"));
        assert_eq!(r.would_deny[0].count, 5);
        let o = r.would_deny_overflow.as_ref().expect("overflow");
        assert_eq!(o.entries, 8);
        assert_eq!(o.connections, 8);
        assert_eq!(r.would_deny_connections, 15);
        // The newest are kept beside the heavy hitter.
        let kept: Vec<_> = r.would_deny[1..]
            .iter()
            .map(|x| x.identity.clone().unwrap())
            .collect();
        assert!(kept.contains(&"id9".to_owned()), "{kept:?}");
    }

    #[test]
    fn lowering_the_limit_evicts_now() {
        let audit = Audit::default();
        for i in 0..5 {
            at(&audit, Some(format!("id{i}")), ip("10.0.0.1"), None, 10);
        }
        audit.set_limit(2);
        let s = audit.lock();
        let t = &s[&("edge".to_owned(), "orders".to_owned())].seen;
        assert_eq!(t.entries.len(), 2);
        assert_eq!(t.overflow.entries, 3);
    }

    #[test]
    fn modes_other_than_audit_say_so() {
        let audit = Audit::default();
        let r = audit.report_at(&routes(Mode::Enforce), None, &[], 10);
        assert!(r.routes[0].ready);
        assert!(r.routes[0].verdict.starts_with("enforce"));
        let r = audit.report_at(&routes(Mode::Off), None, &[], 10);
        assert!(!r.routes[0].ready);
        assert!(r.routes[0].verdict.starts_with("off"));
        // Audit with nothing seen is no evidence.
        let r = audit.report_at(&routes(Mode::Audit), None, &[], 10);
        assert!(!r.routes[0].ready);
    }

    #[test]
    fn a_saved_summary_reads_back_the_same_and_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.json");
        let audit = Audit::default();
        audit.set_limit(1);
        at(&audit, Some("a".into()), ip("10.0.0.1"), Some("denied"), 10);
        at(&audit, Some("b".into()), ip("10.0.0.1"), Some("denied"), 11);
        at(&audit, None, ip("10.0.0.1"), None, 12);
        audit.save(&path, false).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let back = Audit::default();
        back.load(&path).unwrap();
        assert_eq!(*back.lock(), *audit.lock());
        // A temp file left behind readable by all does not lend its mode.
        let tmp = dir.path().join("audit.json.tmp");
        std::fs::write(&tmp, b"stale").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
        audit.save(&path, true).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!tmp.exists());
    }

    #[test]
    fn queries_are_parsed_strictly() {
        let source = ReportSource {
            audit: Arc::default(),
            routes: Box::new(|| routes(Mode::Audit)),
            expiries: Arc::default(),
        };
        assert_eq!(
            source
                .answer(Some("route=orders&since=7d"))
                .unwrap()
                .since_seconds,
            Some(7 * 86400)
        );
        assert_eq!(source.answer(None).unwrap().routes.len(), 1);
        assert_eq!(source.answer(Some("route=nope")).unwrap_err().0, 404);
        assert_eq!(source.answer(Some("since=soon")).unwrap_err().0, 400);
        assert_eq!(source.answer(Some("since=0s")).unwrap_err().0, 400);
        assert_eq!(source.answer(Some("who=me")).unwrap_err().0, 400);
        assert_eq!(
            source.answer(Some("route=%6Frders")).unwrap().routes.len(),
            1
        );
        assert_eq!(source.answer(Some("route=%zz")).unwrap_err().0, 400);
        assert_eq!(
            percent_decode(&percent_encode("a b/ü")).as_deref(),
            Some("a b/ü")
        );
    }

    const DAY: i64 = 86_400;

    /// A client certificate of `name` (serial = name) good from
    /// `not_before` to `not_after`, seen on edge/orders at `now`.
    fn cert(audit: &Audit, name: &str, not_before: i64, not_after: i64, now: i64) {
        let identity = crate::identity::Identity {
            uris: vec![name.to_owned()],
            serial: name.to_owned(),
            not_before,
            not_after,
            ..Default::default()
        };
        audit.certificate_at("edge", "orders", name.to_owned(), &identity, now);
    }

    fn listed(audit: &Audit, now: i64) -> Vec<String> {
        let r = audit.report_at(&routes(Mode::Enforce), None, &[], now);
        r.routes[0]
            .expiring_clients
            .iter()
            .map(|c| c.identity.clone())
            .collect()
    }

    /// Listed: seen within a day and inside the window, which is
    /// `expiry_warning` or the last third of the lifetime if shorter.
    #[test]
    fn client_certificates_are_listed_inside_their_window_when_seen_in_the_last_day() {
        let audit = Audit::default();
        audit.set_warning(Duration::from_secs(30 * DAY as u64));
        let now = 1_000 * DAY;
        // One hour of life: ten minutes left is past its renewal, fifty
        // five minutes left is a fresh one (not noise all its life).
        cert(&audit, "stale-1h", now - 50 * 60, now + 10 * 60, now);
        cert(&audit, "fresh-1h", now - 5 * 60, now + 55 * 60, now);
        // A year of life: the 30 days of expiry_warning decide.
        cert(
            &audit,
            "year-10d-left",
            now - 355 * DAY,
            now + 10 * DAY,
            now,
        );
        cert(
            &audit,
            "year-200d-left",
            now - 165 * DAY,
            now + 200 * DAY,
            now,
        );
        // Inside its window but last seen two days ago: renewed, or gone.
        cert(
            &audit,
            "gone",
            now - 355 * DAY,
            now + 5 * DAY,
            now - 2 * DAY,
        );
        // Expired and still let in (an audit route): listed, first.
        cert(&audit, "expired", now - 10 * DAY, now - 60, now);
        assert_eq!(
            listed(&audit, now),
            ["expired", "stale-1h", "year-10d-left"]
        );
        let r = audit.report_at(&routes(Mode::Enforce), None, &[], now);
        let c = &r.routes[0].expiring_clients[1];
        assert_eq!((c.seconds_left, c.serial.as_str()), (600, "stale-1h"));
        assert_eq!(c.not_after, timestamp(now + 600));
        // Client certificates are the clients' to renew: not the verdict's.
        assert!(r.routes[0].ready, "{}", r.routes[0].verdict);
        // A smaller expiry_warning narrows the long-lived ones' window.
        audit.set_warning(Duration::from_secs(7 * DAY as u64));
        assert_eq!(listed(&audit, now), ["expired", "stale-1h"]);
    }

    /// At most `audit_entries`: a certificate not seen for a day gives way
    /// first, then one outside its window, then the one running out last;
    /// what gives way is counted, and listed ones said in the report.
    #[test]
    fn the_client_certificate_table_is_bounded_soonest_first() {
        let audit = Audit::default();
        audit.set_limit(3);
        audit.set_warning(Duration::from_secs(30 * DAY as u64));
        let now = 1_000 * DAY;
        let year = |left: i64| (now + left - 365 * DAY, now + left);
        let (b, a) = year(2 * DAY);
        cert(&audit, "old-news", b, a, now - 3 * DAY);
        let (b, a) = year(300 * DAY);
        cert(&audit, "healthy", b, a, now);
        for i in 0..6 {
            let (b, a) = year((10 + i) * DAY);
            cert(&audit, &format!("soon{i}"), b, a, now);
        }
        let s = audit.lock();
        let t = &s[&("edge".to_owned(), "orders".to_owned())].clients;
        let mut kept: Vec<&str> = t.entries.keys().map(|k| k.identity.as_str()).collect();
        kept.sort();
        assert_eq!(kept, ["soon0", "soon1", "soon2"]);
        // old-news, healthy, soon3..5 gave way; three of them were listed.
        assert_eq!(t.overflow.entries, 5);
        assert_eq!(t.overflow.listed, 3);
        drop(s);
        let r = audit.report_at(&routes(Mode::Audit), None, &[], now);
        assert_eq!(r.routes[0].expiring_clients.len(), 3);
        assert_eq!(r.routes[0].expiring_clients_overflow, Some(3));
        // Lowering the limit evicts now, the latest first.
        audit.set_limit(1);
        assert_eq!(listed(&audit, now), ["soon0"]);
        // An overflow last seen over a day ago is not "seen in the last day".
        let r = audit.report_at(&routes(Mode::Audit), None, &[], now + 2 * DAY);
        assert_eq!(r.routes[0].expiring_clients_overflow, None);
    }

    /// Version 2 keeps the client certificates; a version 1 file (before
    /// them) still reads.
    #[test]
    fn client_certificates_are_saved_and_version_1_files_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.json");
        let audit = Audit::default();
        audit.set_limit(1);
        let now = 1_000 * DAY;
        cert(&audit, "a", now - 50 * 60, now + 10 * 60, now);
        cert(&audit, "b", now - 50 * 60, now + 20 * 60, now);
        audit.save(&path, false).unwrap();
        let back = Audit::default();
        back.load(&path).unwrap();
        assert_eq!(*back.lock(), *audit.lock());
        let v1 = r#"{"version":1,"routes":[{"listener":"edge","route":"orders",
            "seen":{"entries":[{"identity":"x","source":"10.0.0.0/24","count":2,
            "first_seen":5,"last_seen":6}],"overflow":{"entries":0,"tally":null}},
            "would_deny":{"entries":[],"overflow":{"entries":0,"tally":null}}}]}"#;
        std::fs::write(&path, v1).unwrap();
        let old = Audit::default();
        old.load(&path).unwrap();
        let s = old.lock();
        let r = &s[&("edge".to_owned(), "orders".to_owned())];
        assert_eq!(r.seen.entries.len(), 1);
        assert!(r.clients.entries.is_empty());
        drop(s);
        std::fs::write(&path, v1.replace("\"version\":1", "\"version\":3")).unwrap();
        assert_eq!(
            Audit::default().load(&path).unwrap_err().as_str(),
            "corrupt"
        );
    }

    /// The gateway's own certificates and CRLs: a route they serve is not
    /// ready while one that fails closed is inside expiry_warning, whatever
    /// its mode; a CRL used stale anyway is listed but does not block.
    #[test]
    fn expiring_certificates_and_crls_hold_the_routes_they_serve() {
        use crate::expiry::{Expiry, Kind};
        let audit = Audit::default();
        at(&audit, Some("ok".into()), ip("10.0.0.1"), None, 100);
        let e = |kind, role: &str, route: &str| Expiry {
            kind,
            role: role.to_owned(),
            file: "x.pem".into(),
            subject: "CN=x".into(),
            at: 100 + 3 * DAY,
            valid_from: 100 - 300 * DAY,
            routes: vec![("edge".into(), route.into())],
        };
        let warn = e(
            Kind::Crl(crate::config::CrlExpired::Warn),
            "trust t crl",
            "orders",
        );
        let r = audit.report_at(&routes(Mode::Audit), None, std::slice::from_ref(&warn), 100);
        assert!(r.routes[0].ready, "{}", r.routes[0].verdict);
        assert_eq!(r.routes[0].expiring.len(), 1);
        assert!(!r.routes[0].expiring[0].fails_closed);
        let cert = e(Kind::Certificate, "listener edge cert", "orders");
        let other = e(Kind::Certificate, "trust u ca", "billing");
        for mode in [Mode::Audit, Mode::Enforce] {
            let r = audit.report_at(&routes(mode), None, &[cert.clone(), other.clone()], 100);
            let route = &r.routes[0];
            assert!(!route.ready);
            assert!(
                route
                    .verdict
                    .starts_with("not ready: renew first: listener edge cert (expires in 3 days)"),
                "{}",
                route.verdict
            );
            // The whole gateway's list has both; the route only its own.
            assert_eq!(route.expiring.len(), 1);
            assert_eq!(r.expiring.len(), 2);
            assert!(
                r.text()
                    .contains("other certificates and CRLs inside their warning window")
            );
        }
    }

    #[test]
    fn audit_state_others_could_have_written_is_never_evidence() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let path = dir.path().join("audit.json");
        let audit = Audit::default();
        at(&audit, Some("ok".into()), ip("10.0.0.1"), None, 100);
        audit.save(&path, true).unwrap();
        assert!(Audit::default().load(&path).is_ok());
        // Group-writable: refused, set aside, nothing loaded.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o620)).unwrap();
        let fresh = Audit::default();
        let e = fresh.load(&path).unwrap_err();
        assert_eq!(e.as_str(), "unsafe");
        assert!(e.to_string().contains("writable by others"), "{e}");
        assert!(fresh.lock().is_empty());
        assert!(!path.exists());
        assert!(dir.path().join("audit.json.corrupt").exists());
        // A FIFO planted there does not block the start.
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert_eq!(fresh.load(&path).unwrap_err().as_str(), "unsafe");
        // The directory writable by others: nothing read, nothing written.
        audit.save(&path, true).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = Audit::default().load(&path).unwrap_err();
        assert_eq!(e.as_str(), "unsafe");
        assert!(path.exists(), "not moved within a directory others write");
        assert_eq!(audit.save(&path, true).unwrap_err().as_str(), "unsafe");
    }

    #[test]
    fn a_corrupt_file_is_set_aside_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.json");
        std::fs::write(&path, b"{\"version\":1,\"routes\":[{").unwrap();
        let audit = Audit::default();
        let e = audit.load(&path).unwrap_err();
        assert_eq!(e.as_str(), "corrupt");
        assert!(!path.exists());
        assert!(dir.path().join("audit.json.corrupt").exists());
        assert!(audit.lock().is_empty());
        // A missing file is a first start.
        assert!(audit.load(&path).is_ok());
    }
}

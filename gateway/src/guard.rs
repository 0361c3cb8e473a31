//! The gateway's side of the eBPF guard: which backends to protect (every
//! route's, resolved, plus explicit ones), the gateway's own cgroup, this
//! host's addresses (followed as they come and go, so a backend on this
//! host is protected on every one of them), and keeping the kernel maps in
//! step with reloads.
//!
//! Fail closed: when enforcement is configured and the programs cannot be
//! installed, the gateway does not start. A reload the guard cannot apply
//! whole (removing `[guard]`, turning it off, moving it to another cgroup
//! or pin directory, a rule set the maps cannot hold) is refused and the
//! guard stays exactly as it was.

use std::net::ToSocketAddrs as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::{Config, GuardEnforcement, GuardSettings};
use crate::ebpf::{
    self, BypassAttempt, EbpfError, Enforcement, GuardCounters, GuardSpec, LocalAttempts,
    LocalGuard, Protected,
};

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("guard: no cgroup v2 hierarchy is mounted (see /proc/mounts)")]
    NoCgroup2,
    #[error("guard: cannot put the gateway into its cgroup {path}: {source}")]
    JoinCgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "guard: uid = {configured}, but the gateway runs as uid {running}: it would refuse its own connects"
    )]
    WrongUid { configured: u32, running: u32 },
    #[error("guard: backend {backend:?} does not resolve: {reason}")]
    Resolve { backend: String, reason: String },
    #[error("guard: reading this host's addresses: {0}")]
    Addresses(std::io::Error),
    #[error(
        "guard: the gateway's cgroup {} already holds other processes ({}): their connects would pass as the gateway's; give the gateway a cgroup of its own",
        path.display(),
        describe(pids)
    )]
    CgroupNotEmpty { path: PathBuf, pids: Vec<u32> },
    #[error(
        "guard: {what} changes from {from} to {to} only on restart; the guard stays as it runs"
    )]
    NeedsRestart {
        what: &'static str,
        from: String,
        to: String,
    },
    #[error("guard: {0}")]
    Ebpf(#[from] EbpfError),
}

/// The installed guard.
pub struct Guard {
    running: Arc<Mutex<Running>>,
    stats: Arc<GuardStats>,
    /// What it was started with: a reload may not move it.
    started: GuardSettings,
    attempts: tokio::sync::broadcast::Sender<BypassAttempt>,
    summaries: tokio::sync::broadcast::Sender<Vec<LocalAttempts>>,
    /// The summary period; a reload may change it.
    summary_every: tokio::sync::watch::Sender<std::time::Duration>,
    /// Stops the background tasks when the guard goes.
    _tasks: tokio_util::sync::DropGuard,
}

/// The programs and the spec the maps hold now.
struct Running {
    local: LocalGuard,
    spec: GuardSpec,
    /// Close connections older than the rule (when enforcing).
    close_older: bool,
    /// The untallied count as of the last summary.
    untallied_logged: u64,
    /// Per hostname backend, every address the gate saw it resolve to.
    resolved: std::collections::HashMap<String, std::collections::BTreeSet<Protected>>,
}

/// What the gateway's side of the guard counts, for the metrics.
#[derive(Default)]
struct GuardStats {
    /// Connections to protected backends older than the rule covering them.
    older_closed: AtomicU64,
    older_kept: AtomicU64,
    /// Processes seen joining the gateway's cgroup after it started.
    intruders: AtomicU64,
    /// Addresses a hostname backend resolved to at connect time that had
    /// to be protected first.
    resolved: AtomicU64,
    /// Programs found detached and attached again, pins found removed and
    /// put back.
    repairs: AtomicU64,
    /// Looks at the attachments that could not be made.
    check_failures: AtomicU64,
    /// Following this host's addresses failed: the notifications (then:
    /// periodic reads), reading the addresses, or putting them into the
    /// maps (both: the maps keep the old ones).
    address_watch_failures: AddressWatchFailures,
}

/// Where following this host's addresses failed, per stage.
#[derive(Default)]
struct AddressWatchFailures {
    notify: AtomicU64,
    read: AtomicU64,
    apply: AtomicU64,
}

/// Protects what hostname backend `backend` resolved to, unless it already
/// is, then closes connections to it made before (from outside the
/// gateway's cgroup, when enforcing). What a name resolved to stays
/// protected across reloads while the name is a backend: DNS may answer
/// with part of a pool at a time.
fn protect_resolved(
    running: &Mutex<Running>,
    stats: &GuardStats,
    backend: &str,
    resolved: &[std::net::SocketAddr],
) -> std::io::Result<()> {
    let mut running = lock(running);
    let seen: Vec<Protected> = resolved.iter().map(|a| Protected::from(*a)).collect();
    let new: Vec<Protected> = seen
        .iter()
        .filter(|p| running.spec.protected.binary_search(p).is_err())
        .copied()
        .collect();
    if new.is_empty() {
        running
            .resolved
            .entry(backend.to_owned())
            .or_default()
            .extend(seen);
        return Ok(());
    }
    let mut protected = running.spec.protected.clone();
    protected.extend(&new);
    protected.sort();
    protected.dedup();
    let spec = GuardSpec {
        protected,
        ..running.spec.clone()
    };
    running.local.update(&spec).map_err(|e| {
        std::io::Error::other(format!(
            "the guard could not protect {resolved:?} before the connect: {e}"
        ))
    })?;
    running.spec = spec;
    running
        .resolved
        .entry(backend.to_owned())
        .or_default()
        .extend(seen);
    stats
        .resolved
        .fetch_add(new.len() as u64, Ordering::Relaxed);
    tracing::info!(%backend, addresses = ?resolved, "guard: a backend's name resolved to addresses not yet protected; protected before the connect");
    sweep_older_connections(&running, stats);
    Ok(())
}

/// Whether `backend` is a name to resolve rather than an address.
fn is_hostname(backend: &str) -> bool {
    backend.parse::<std::net::SocketAddr>().is_err()
}

/// Every backend the config's routes use, resolved, plus the explicit ones.
pub fn protected(config: &Config, settings: &GuardSettings) -> Result<Vec<Protected>, GuardError> {
    let mut out = settings.protect.clone();
    for l in &config.listeners {
        for r in &l.routes {
            for b in &r.backends {
                let addrs = b.to_socket_addrs().map_err(|e| GuardError::Resolve {
                    backend: b.clone(),
                    reason: e.to_string(),
                })?;
                out.extend(addrs.map(Protected::from));
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn enforcement(e: GuardEnforcement) -> Option<Enforcement> {
    match e {
        GuardEnforcement::Enforce => Some(Enforcement::Enforce),
        GuardEnforcement::Audit => Some(Enforcement::Audit),
        GuardEnforcement::Off => None,
    }
}

fn enforcement_name(e: GuardEnforcement) -> &'static str {
    match e {
        GuardEnforcement::Enforce => "enforce",
        GuardEnforcement::Audit => "audit",
        GuardEnforcement::Off => "off",
    }
}

/// What this host's local routing table delivers here, for the
/// local-address maps.
fn host_addresses() -> Result<Vec<ipnet::IpNet>, GuardError> {
    crate::netlink::local_addresses().map_err(GuardError::Addresses)
}

impl Guard {
    /// Installs the guard the config asks for (None when off or absent).
    pub fn install(config: &Config) -> Result<Option<Guard>, GuardError> {
        let Some(settings) = &config.guard else {
            return Ok(None);
        };
        let Some(mode) = enforcement(settings.enforcement) else {
            return Ok(None);
        };
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if let Some(uid) = settings.uid
            && uid != euid
        {
            // Otherwise the guard would refuse the gateway's own connects.
            return Err(GuardError::WrongUid {
                configured: uid,
                running: euid,
            });
        }
        let mount = ebpf::cgroup2_mount().ok_or(GuardError::NoCgroup2)?;
        let gateway_cgroup = mount.join(&settings.cgroup);
        // Whatever else sits in the gateway's cgroup passes as the gateway.
        let others = others_in(&gateway_cgroup);
        if !others.is_empty() {
            return Err(GuardError::CgroupNotEmpty {
                path: gateway_cgroup,
                pids: others,
            });
        }
        join_cgroup(&gateway_cgroup)?;
        // Subscribed before the addresses are read, so one added in between
        // is not missed.
        let address_changes = crate::netlink::Changes::subscribe(crate::netlink::Watch::Addresses)
            .map_err(GuardError::Addresses)?;
        let spec = GuardSpec {
            protected: protected(config, settings)?,
            gateway_cgroup: gateway_cgroup.clone(),
            gateway_uid: settings.uid,
            enforcement: mode,
            pin_dir: settings.pin.then(|| settings.pin_dir.clone()),
            local_addresses: host_addresses()?,
            every_local_address: settings.every_local_address,
        };
        let attach_to = mount.join(&settings.attach_to);
        let mut local = LocalGuard::install(&attach_to, &spec)?;
        let attempts = tokio::sync::broadcast::channel(1024).0;
        let events = local.take_events()?;
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(log_events(events, attempts.clone(), stop.clone()));
        tracing::info!(
            protected = spec.protected.len(),
            enforcement = ?mode,
            cgroup = %gateway_cgroup.display(),
            uid = ?settings.uid,
            attached = %attach_to.display(),
            every_local_address = settings.every_local_address,
            "guard installed: only the gateway reaches the backends"
        );
        let untallied_logged = local_untallied(&local);
        let running = Running {
            local,
            spec,
            close_older: settings.close_older_connections,
            untallied_logged,
            resolved: std::collections::HashMap::new(),
        };
        let stats = Arc::new(GuardStats::default());
        sweep_older_connections(&running, &stats);
        tokio::spawn(watch_cgroup(
            gateway_cgroup.clone(),
            stats.clone(),
            stop.clone(),
        ));
        let summaries = tokio::sync::broadcast::channel(16).0;
        let running = Arc::new(Mutex::new(running));
        tokio::spawn(watch_attachment(
            running.clone(),
            stats.clone(),
            stop.clone(),
        ));
        tokio::spawn(follow_addresses(
            address_changes,
            running.clone(),
            stats.clone(),
            stop.clone(),
        ));
        let summary_every = tokio::sync::watch::channel(settings.summary_every).0;
        tokio::spawn(summarize(
            running.clone(),
            summary_every.subscribe(),
            summaries.clone(),
            stop.clone(),
        ));
        Ok(Some(Guard {
            running,
            stats,
            summaries,
            summary_every,
            started: settings.clone(),
            attempts,
            _tasks: stop.drop_guard(),
        }))
    }

    /// Brings the maps in step with a new config (before it serves), or
    /// refuses it whole.
    pub fn update(&self, config: &Config) -> Result<(), GuardError> {
        let Some(settings) = &config.guard else {
            return Err(GuardError::NeedsRestart {
                what: "[guard]",
                from: "present".into(),
                to: "absent".into(),
            });
        };
        let Some(mode) = enforcement(settings.enforcement) else {
            return Err(GuardError::NeedsRestart {
                what: "enforcement",
                from: enforcement_name(self.started.enforcement).into(),
                to: "off".into(),
            });
        };
        let started = &self.started;
        let moved = |what: &'static str, from: String, to: String| {
            (from != to).then_some(GuardError::NeedsRestart { what, from, to })
        };
        let path = |p: &Path| format!("{:?}", p.display().to_string());
        if let Some(e) = moved("cgroup", path(&started.cgroup), path(&settings.cgroup))
            .or_else(|| {
                moved(
                    "attach_to",
                    path(&started.attach_to),
                    path(&settings.attach_to),
                )
            })
            .or_else(|| moved("pin", started.pin.to_string(), settings.pin.to_string()))
            .or_else(|| moved("pin_dir", path(&started.pin_dir), path(&settings.pin_dir)))
            .or_else(|| {
                moved(
                    "uid",
                    format!("{:?}", started.uid),
                    format!("{:?}", settings.uid),
                )
            })
        {
            return Err(e);
        }
        let mut protected = protected(config, settings)?;
        let mut running = lock(&self.running);
        // What hostname backends that stay resolved to before stays
        // protected; names that are gone take theirs with them.
        let names: std::collections::HashSet<&str> = config
            .listeners
            .iter()
            .flat_map(|l| &l.routes)
            .flat_map(|r| &r.backends)
            .map(String::as_str)
            .filter(|b| is_hostname(b))
            .collect();
        let resolved: std::collections::HashMap<_, _> = running
            .resolved
            .iter()
            .filter(|(name, _)| names.contains(name.as_str()))
            .map(|(name, seen)| (name.clone(), seen.clone()))
            .collect();
        protected.extend(resolved.values().flatten());
        protected.sort();
        protected.dedup();
        let spec = GuardSpec {
            protected,
            enforcement: mode,
            every_local_address: settings.every_local_address,
            ..running.spec.clone()
        };
        running.local.update(&spec)?;
        running.spec = spec;
        running.resolved = resolved;
        running.close_older = settings.close_older_connections;
        self.summary_every.send_if_modified(|every| {
            let changed = *every != settings.summary_every;
            if changed {
                tracing::info!(from = ?*every, to = ?settings.summary_every, "guard: summary period changed");
                *every = settings.summary_every;
            }
            changed
        });
        sweep_older_connections(&running, &self.stats);
        Ok(())
    }

    /// What hostname backends resolve to at connect time passes through
    /// this before the gateway connects: addresses not yet protected are
    /// added to the maps first (until the next reload recomputes the set).
    pub fn gate(&self) -> crate::upstream::Gate {
        let running = self.running.clone();
        let stats = self.stats.clone();
        Arc::new(move |backend: &str, resolved: &[std::net::SocketAddr]| {
            protect_resolved(&running, &stats, backend, resolved)
        })
    }

    /// Every summary of who tried from now on (each one complete: no
    /// event budget applies).
    pub fn summaries(&self) -> tokio::sync::broadcast::Receiver<Vec<LocalAttempts>> {
        self.summaries.subscribe()
    }

    /// Bypass attempts from now on (rate-limited in the kernel).
    pub fn attempts(&self) -> tokio::sync::broadcast::Receiver<BypassAttempt> {
        self.attempts.subscribe()
    }

    pub fn counters(&self) -> Result<GuardCounters, GuardError> {
        Ok(lock(&self.running).local.counters()?)
    }

    /// The guard's series for `GET /metrics`.
    pub fn render_metrics(&self, out: &mut crate::metrics::Exposition<'_>) -> std::fmt::Result {
        use crate::metrics::NO_LABELS;
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        match self.counters() {
            Ok(c) => out.counter(
                "gateway_guard_connects_total",
                "Connects, datagrams and raw packets to protected backends seen by the eBPF guard.",
                [
                    ([("verdict", "allow")], c.allowed),
                    ([("verdict", "deny")], c.refused),
                    ([("verdict", "audit")], c.audited),
                ],
            )?,
            Err(e) => tracing::warn!(error = %e, "reading guard counters"),
        }
        out.counter(
            "gateway_guard_cgroup_intruders_total",
            "Processes seen in the gateway's cgroup besides the gateway (their connects pass as the gateway's).",
            [(NO_LABELS, load(&self.stats.intruders))],
        )?;
        match lock(&self.running).local.untallied() {
            Ok(n) => out.counter(
                "gateway_guard_untallied_attempts_total",
                "Bypass attempts whose source found the per-source tallies full (counted, in no summary).",
                [(NO_LABELS, n)],
            )?,
            Err(e) => tracing::warn!(error = %e, "reading the untallied count"),
        }
        out.counter(
            "gateway_guard_repairs_total",
            "Guard programs found detached and attached again, and link pins found removed and put back.",
            [(NO_LABELS, load(&self.stats.repairs))],
        )?;
        out.counter(
            "gateway_guard_check_failures_total",
            "Looks at the guard's attachments that could not be made (each is logged; the next look tries again).",
            [(NO_LABELS, load(&self.stats.check_failures))],
        )?;
        let watch = &self.stats.address_watch_failures;
        out.counter(
            "gateway_guard_address_watch_failures_total",
            "Times following this host's addresses failed: the notifications (the guard then reads them every 5s), reading them, or putting them into the maps (then the maps keep the old ones).",
            [
                ([("stage", "notify")], load(&watch.notify)),
                ([("stage", "read")], load(&watch.read)),
                ([("stage", "apply")], load(&watch.apply)),
            ],
        )?;
        out.counter(
            "gateway_guard_resolved_addresses_total",
            "Addresses a hostname backend resolved to at connect time that the guard protected first.",
            [(NO_LABELS, load(&self.stats.resolved))],
        )?;
        out.counter(
            "gateway_guard_older_connections_total",
            "Connections to protected backends from outside the gateway's cgroup that were opened before the rule covering them, by what the guard did.",
            [
                ([("action", "closed")], load(&self.stats.older_closed)),
                ([("action", "kept")], load(&self.stats.older_kept)),
            ],
        )
    }
}

/// Connections older than the rule: at most this many are logged one by
/// one per sweep; the rest in one line.
const OLDER_LOGGED: usize = 64;

/// Looks for connections to protected backends that were opened before
/// the rule covering them existed (the connect hooks never saw them), from
/// outside the gateway's cgroup: each is counted and logged, and when the
/// guard enforces and close_older_connections is on, closed
/// (SOCK_DESTROY). In the gateway's network namespace only.
fn sweep_older_connections(running: &Running, stats: &GuardStats) {
    let gateway = match ebpf::cgroup_id(&running.spec.gateway_cgroup) {
        Ok(id) => id,
        Err(e) => {
            tracing::error!(error = %e, "guard: cannot look for connections older than the guard");
            return;
        }
    };
    let sockets = match crate::sock_diag::connected_sockets() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "guard: cannot list sockets (sock_diag); connections older than the guard are not looked for");
            return;
        }
    };
    let close = running.close_older && running.spec.enforcement == Enforcement::Enforce;
    let gateway_uid = running.spec.gateway_uid;
    let mut seen = 0usize;
    for s in sockets
        .iter()
        .filter(|s| running.local.protects(s.protocol, s.peer))
    {
        let whose = match s.cgroup {
            Some(c) if c == gateway && gateway_uid.is_none_or(|u| u == s.uid) => continue,
            Some(c) => c.to_string(),
            // Closing what might be the gateway's own would be no safer.
            None => "unknown (the kernel does not report socket cgroups)".into(),
        };
        let action = match (close, s.cgroup) {
            (true, Some(_)) => match crate::sock_diag::destroy(s) {
                Ok(()) => "closed",
                Err(e) => {
                    tracing::error!(error = %e, peer = %s.peer, "guard: cannot close a connection older than the guard (SOCK_DESTROY needs CONFIG_INET_DIAG_DESTROY)");
                    "kept"
                }
            },
            _ => "kept",
        };
        let counter = if action == "closed" {
            &stats.older_closed
        } else {
            &stats.older_kept
        };
        counter.fetch_add(1, Ordering::Relaxed);
        seen += 1;
        if seen <= OLDER_LOGGED {
            tracing::warn!(
                protocol = s.protocol.name(),
                local = %s.local,
                peer = %s.peer,
                uid = s.uid,
                cgroup = %whose,
                inode = s.inode,
                action,
                "guard: connection to a protected backend older than the guard"
            );
        }
    }
    if seen > OLDER_LOGGED {
        tracing::warn!(
            connections = seen,
            logged = OLDER_LOGGED,
            "guard: more connections older than the guard than logged one by one"
        );
    }
}

/// The untallied count now (0 when it cannot be read: the next summary
/// then reports everything counted so far).
fn local_untallied(local: &LocalGuard) -> u64 {
    local.untallied().unwrap_or(0)
}

impl Drop for Guard {
    /// The last summary: what was tallied since the previous one is not
    /// lost when the gateway stops.
    fn drop(&mut self) {
        let period = *self.summary_every.borrow();
        summarize_now(&self.running, period, &self.summaries);
    }
}

/// Refuses a reload that would add a guard to a gateway started without
/// one: its programs are installed only at start.
pub fn refuse_new_guard(config: &Config) -> Result<(), GuardError> {
    match &config.guard {
        Some(settings) if settings.enforcement != GuardEnforcement::Off => {
            Err(GuardError::NeedsRestart {
                what: "[guard]",
                from: "absent (or off)".into(),
                to: format!("enforcement = {:?}", enforcement_name(settings.enforcement)),
            })
        }
        _ => Ok(()),
    }
}

fn lock(running: &Mutex<Running>) -> MutexGuard<'_, Running> {
    // A panic elsewhere leaves the maps as they were: keep going.
    running
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Logs every bypass event and hands it to subscribers.
async fn log_events(
    mut events: ebpf::Events<BypassAttempt>,
    attempts: tokio::sync::broadcast::Sender<BypassAttempt>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let a = tokio::select! {
            () = stop.cancelled() => return,
            a = events.next() => a,
        };
        let Some(a) = a else { break };
        let source = a.source.map(|s| s.to_string());
        if a.audited {
            tracing::warn!(pid = a.pid, uid = a.uid, comm = %a.comm, cgroup = a.cgroup,
                destination = %a.destination, protocol = a.protocol.name(), layer = a.layer,
                source = ?source, "audit: bypass of the gateway let through");
        } else {
            tracing::warn!(pid = a.pid, uid = a.uid, comm = %a.comm, cgroup = a.cgroup,
                destination = %a.destination, protocol = a.protocol.name(), layer = a.layer,
                source = ?source, "bypass of the gateway refused");
        }
        // No subscriber is the normal case outside tests.
        let _ = attempts.send(a);
    }
    tracing::error!("guard events stopped: bypass attempts are still counted but no longer logged");
}

/// How often the guard reads this host's addresses even without a
/// notification (lost ones; failed notifications).
const ADDRESS_LOOK: std::time::Duration = std::time::Duration::from_secs(5);

/// Keeps the local-address maps in step with this host's addresses: a
/// backend on this host is then protected on an address the moment it
/// exists (well, the moment the kernel tells us; the egress program judges
/// what leaves through `lo` by port meanwhile). When the notifications
/// fail it says so, counts it, and keeps looking every [`ADDRESS_LOOK`].
async fn follow_addresses(
    changes: crate::netlink::Changes,
    running: Arc<Mutex<Running>>,
    stats: Arc<GuardStats>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut follow = crate::netlink::Follow::new(changes, ADDRESS_LOOK);
    let mut apply_failure = RepeatedFailure::default();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            next = follow.next() => if let Err(e) = next {
                stats.address_watch_failures.notify.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, every = ?ADDRESS_LOOK, "guard: address notifications failed; reading this host's addresses periodically instead");
            },
        }
        let addresses = match host_addresses() {
            Ok(a) => a,
            Err(e) => {
                stats
                    .address_watch_failures
                    .read
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "guard: this host's addresses changed but cannot be read; the maps keep the old ones");
                continue;
            }
        };
        let mut running = lock(&running);
        if running.spec.local_addresses == addresses {
            continue;
        }
        let spec = GuardSpec {
            local_addresses: addresses,
            ..running.spec.clone()
        };
        match running.local.update(&spec) {
            Ok(()) => {
                apply_failure = RepeatedFailure::default();
                tracing::info!(addresses = ?spec.local_addresses, "guard: this host's addresses changed; local backends are protected on each");
                running.spec = spec;
                sweep_older_connections(&running, &stats);
            }
            Err(e) => {
                stats
                    .address_watch_failures
                    .apply
                    .fetch_add(1, Ordering::Relaxed);
                // The same failure comes back at every look (every 5 s):
                // counted each time, logged when it is new and then now
                // and again.
                if let Some(unlogged) = apply_failure.log(&e.to_string(), std::time::Instant::now())
                {
                    tracing::error!(error = %e, repeated_unlogged = unlogged, "guard: this host's addresses changed but the maps could not follow; they keep the old ones");
                }
            }
        }
    }
}

/// How often a failure that repeats unchanged is logged again.
const REPEAT_LOG: std::time::Duration = std::time::Duration::from_secs(600);

/// Whether a failure that recurs at every look deserves a log line: the
/// first time, when what failed changes, and then once every
/// [`REPEAT_LOG`], saying how many went unlogged in between (the metrics
/// count every one).
#[derive(Default)]
struct RepeatedFailure {
    last: Option<(String, std::time::Instant)>,
    unlogged: u64,
}

impl RepeatedFailure {
    /// Some(how many went unlogged since the last line) when `what` is
    /// to be logged now.
    fn log(&mut self, what: &str, now: std::time::Instant) -> Option<u64> {
        match &self.last {
            Some((same, at)) if same == what && now.duration_since(*at) < REPEAT_LOG => {
                self.unlogged += 1;
                None
            }
            _ => {
                self.last = Some((what.to_owned(), now));
                Some(std::mem::take(&mut self.unlogged))
            }
        }
    }
}

/// Processes in cgroup `dir` other than this one (none when it does not
/// exist yet).
fn others_in(dir: &Path) -> Vec<u32> {
    let ours = std::process::id();
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|pid| *pid != ours)
        .collect()
}

/// "4242 (sleep), 4243 (sh)": pids with their command names.
fn describe(pids: &[u32]) -> String {
    pids.iter()
        .map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            format!("{pid} ({})", comm.trim())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Sources named per summary line: every one is named, in lines of this
/// many, so a process flooding connects costs the log lines, not another
/// process its mention.
const SOURCES_PER_LINE: usize = 32;

/// Logs, every `summary_every` (which a reload may change), who tried to
/// reach protected backends around the gateway. The kernel's events are
/// rate-limited (64 per CPU per second), so one process's flood can hide
/// another's attempt there; the tallies count every attempt of every
/// source (cgroup and uid).
async fn summarize(
    running: Arc<Mutex<Running>>,
    mut every: tokio::sync::watch::Receiver<std::time::Duration>,
    summaries: tokio::sync::broadcast::Sender<Vec<LocalAttempts>>,
    stop: tokio_util::sync::CancellationToken,
) {
    let start = |period: std::time::Duration| {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    };
    let mut period = *every.borrow_and_update();
    let mut tick = start(period);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = every.changed() => {
                if changed.is_ok() {
                    period = *every.borrow_and_update();
                    tick = start(period);
                }
                continue;
            }
            _ = tick.tick() => {}
        }
        summarize_now(&running, period, &summaries);
    }
}

/// Takes the tallies, logs every source with its attempts (and, when a
/// flood filled the tallies, how many attempts no summary names), and
/// hands them to subscribers.
fn summarize_now(
    running: &Mutex<Running>,
    period: std::time::Duration,
    summaries: &tokio::sync::broadcast::Sender<Vec<LocalAttempts>>,
) {
    let (tallies, untallied) = {
        let mut running = lock(running);
        let tallies = running.local.take_tallies();
        let untallied = match running.local.untallied() {
            Ok(total) => total - std::mem::replace(&mut running.untallied_logged, total),
            Err(_) => 0,
        };
        (tallies, untallied)
    };
    let tallies = match tallies {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "guard: reading the per-source tallies");
            return;
        }
    };
    if untallied > 0 {
        tracing::warn!(
            attempts = untallied,
            sources_named = tallies.len(),
            period = ?period,
            "guard: bypass attempts from more distinct sources than the tallies hold; counted, but their sources are not named (the first ones of the period are)"
        );
    }
    if tallies.is_empty() {
        return;
    }
    let attempts: u64 = tallies.iter().map(|t| t.attempts).sum();
    for chunk in tallies.chunks(SOURCES_PER_LINE) {
        let who: Vec<String> = chunk
            .iter()
            .map(|t| {
                let source = if t.arrived() {
                    "from outside this host's sockets".to_owned()
                } else {
                    format!("cgroup {} uid {}", t.cgroup, t.uid)
                };
                format!(
                    "{source}×{} (last {}:{})",
                    t.attempts,
                    t.protocol.name(),
                    t.destination
                )
            })
            .collect();
        tracing::warn!(
            sources = tallies.len(),
            attempts,
            period = ?period,
            who = %who.join(", "),
            "guard: bypass attempts by source"
        );
    }
    // No subscriber is the normal case outside tests.
    let _ = summaries.send(tallies);
}

/// How often the gateway's cgroup is looked at for other processes.
const CGROUP_WATCH: std::time::Duration = std::time::Duration::from_secs(1);

/// Alerts (an error line and a count) for every process that joins the
/// gateway's cgroup: its connects would pass as the gateway's. cgroup v2
/// sends no event when a process joins, so this looks once a second.
async fn watch_cgroup(
    dir: PathBuf,
    stats: Arc<GuardStats>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut alerted: std::collections::HashSet<u32> = std::collections::HashSet::new();
    let mut tick = tokio::time::interval(CGROUP_WATCH);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now: std::collections::HashSet<u32> = others_in(&dir).into_iter().collect();
        for pid in now.difference(&alerted) {
            stats.intruders.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                process = %describe(&[*pid]),
                cgroup = %dir.display(),
                "guard: another process joined the gateway's cgroup; its connects to protected backends pass as the gateway's"
            );
        }
        // Forget the ones that left, so a pid used again is seen again.
        alerted = now;
    }
}

/// How often the guard looks whether its programs are still attached and
/// its links still pinned.
const ATTACHMENT_CHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// Looks every [`ATTACHMENT_CHECK`] whether every program is still
/// attached and every link still pinned, and puts right what is not: the
/// guard holds its links, so a removed pin never detaches them while it
/// runs, but after it exits the pins are all that keeps protection.
async fn watch_attachment(
    running: Arc<Mutex<Running>>,
    stats: Arc<GuardStats>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(ATTACHMENT_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match lock(&running).local.check_attachment() {
            Ok(repairs) => {
                for repair in repairs {
                    stats.repairs.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(%repair, "guard: an attachment was undone behind its back; put right");
                }
            }
            Err(e) => {
                stats.check_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "guard: cannot look whether its programs are still attached; trying again");
            }
        }
    }
}

/// Creates the cgroup if needed and moves this whole process into it.
fn join_cgroup(dir: &Path) -> Result<(), GuardError> {
    let err = |source| GuardError::JoinCgroup {
        path: dir.to_owned(),
        source,
    };
    if !dir.is_dir() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    // "0" means the writing process, threads and all.
    std::fs::write(dir.join("cgroup.procs"), "0").map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_that_repeats_at_every_look_is_logged_now_and_again() {
        let start = std::time::Instant::now();
        let look = ADDRESS_LOOK;
        let mut failure = RepeatedFailure::default();
        assert_eq!(failure.log("more than 4096", start), Some(0), "the first");
        // A day of looks every 5 s: logged once every REPEAT_LOG, not
        // 17,280 times, each line saying how many it stands for.
        let looks = (24 * 3600 / look.as_secs()) as u32;
        let logged: Vec<u64> = (1..=looks)
            .filter_map(|i| failure.log("more than 4096", start + look * i))
            .collect();
        let per_day = (24 * 3600 / REPEAT_LOG.as_secs()) as usize;
        assert_eq!(logged.len(), per_day, "{logged:?}");
        assert!(
            logged
                .iter()
                .all(|&n| n == REPEAT_LOG.as_secs() / look.as_secs() - 1)
        );
        // Another failure is logged at once.
        let later = start + look * (looks + 1);
        assert_eq!(failure.log("permission denied", later), Some(0));
    }
}

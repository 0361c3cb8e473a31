//! `gateway guard --config guard.toml`: the remote guard on a backend host.
//! Only the gateways' addresses reach the protected ports; everyone else's
//! packets are dropped (or counted and passed, in audit) and logged.
//!
//! ```toml
//! interfaces = ["eth0"]                     # the TC layer: early drops
//! socket_layer = true                       # judge at the sockets too (the default)
//! cgroup = ""                               # whose sockets: the whole host
//! allow = ["10.0.1.10", "fd00::10"]         # the gateways (CIDR prefixes)
//! protect = ["tcp:9000", "tcp:9100-9199"]   # udp:PORT too
//! enforcement = "enforce"                   # or "audit"
//! pin_dir = "/sys/fs/bpf/gateway-guard"     # the default; pin = false: detach on exit
//! admin = "127.0.0.1:9902"                  # optional: GET /metrics
//! summary_every = "10s"                     # who tried, per source and port
//! ```
//!
//! Fail closed: when a layer cannot be attached, the guard does not start.
//! SIGHUP reloads the file and updates the maps in place, all or nothing.
//! Interfaces that are deleted and created again get the guard again.
//! Pinned (the default), protection stays when the guard stops and a
//! restart takes over without a gap; `gateway guard --uninstall --config
//! guard.toml` removes it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::ebpf::Enforcement;
use crate::ebpf::remote::{
    IngressCounters, InterfaceChange, LayerCounters, PortRule, RemoteGuard, RemoteSpec,
    SourceAttempts,
};

#[derive(Debug, thiserror::Error)]
pub enum RemoteGuardError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {field}: {message}", path.display())]
    Parse {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("guard: {0}")]
    Ebpf(#[from] crate::ebpf::EbpfError),
}

impl RemoteGuardError {
    fn invalid(path: &Path, message: String) -> Self {
        RemoteGuardError::Invalid {
            path: path.to_owned(),
            message,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    interfaces: Vec<String>,
    #[serde(default = "default_true")]
    socket_layer: bool,
    /// The socket layer's cgroup, relative to the cgroup v2 mount.
    #[serde(default)]
    cgroup: PathBuf,
    allow: Vec<String>,
    protect: Vec<String>,
    #[serde(default = "enforce")]
    enforcement: EnforcementSetting,
    #[serde(default = "default_true")]
    pin: bool,
    #[serde(default = "default_pin_dir")]
    pin_dir: PathBuf,
    /// Where to serve `GET /metrics` (fixed at start).
    #[serde(default)]
    admin: Option<std::net::SocketAddr>,
    #[serde(
        default = "default_summary_every",
        deserialize_with = "crate::config::duration::deserialize"
    )]
    summary_every: Duration,
}

/// A checked guard.toml.
pub struct GuardFile {
    pub spec: RemoteSpec,
    pub admin: Option<std::net::SocketAddr>,
    /// How often the per-source tallies are logged.
    pub summary_every: Duration,
}

fn default_true() -> bool {
    true
}

/// Beside the gateway's own /sys/fs/bpf/gateway, so one host can run both.
fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/gateway-guard")
}

fn default_summary_every() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum EnforcementSetting {
    Enforce,
    Audit,
}

fn enforce() -> EnforcementSetting {
    EnforcementSetting::Enforce
}

/// Where the guard in `path` pins, for `--uninstall`; None when unpinned.
pub fn pin_dir(path: &Path) -> Result<Option<PathBuf>, RemoteGuardError> {
    load(path).map(|file| file.spec.pin_dir)
}

/// Reads and checks guard.toml.
pub fn load(path: &Path) -> Result<GuardFile, RemoteGuardError> {
    let text = std::fs::read_to_string(path).map_err(|source| RemoteGuardError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, path)
}

/// Checks the text of guard.toml (`path` names it in errors).
pub fn parse(text: &str, path: &Path) -> Result<GuardFile, RemoteGuardError> {
    let de = toml::Deserializer::parse(text).map_err(|e| RemoteGuardError::Parse {
        path: path.to_owned(),
        field: String::new(),
        message: e.to_string(),
    })?;
    let file: File = serde_path_to_error::deserialize(de).map_err(|e| RemoteGuardError::Parse {
        path: path.to_owned(),
        field: e.path().to_string(),
        message: e.into_inner().message().to_owned(),
    })?;
    if file.interfaces.is_empty() && !file.socket_layer {
        return Err(RemoteGuardError::invalid(
            path,
            "interfaces: name at least one, or keep socket_layer = true".into(),
        ));
    }
    if file.allow.is_empty() {
        // Nothing could ever reach the protected ports; almost surely a mistake.
        return Err(RemoteGuardError::invalid(
            path,
            "allow: name the gateways' addresses (an empty list would cut every backend off)"
                .into(),
        ));
    }
    if file.protect.is_empty() {
        return Err(RemoteGuardError::invalid(
            path,
            "protect: name at least one port".into(),
        ));
    }
    if file.summary_every < Duration::from_secs(1) {
        return Err(RemoteGuardError::invalid(
            path,
            "summary_every: at least \"1s\"".into(),
        ));
    }
    if file.cgroup.is_absolute() || file.cgroup.components().any(|c| c.as_os_str() == "..") {
        return Err(RemoteGuardError::invalid(
            path,
            format!(
                "cgroup: {:?} must be relative to the cgroup v2 mount (\"\" is the whole host)",
                file.cgroup
            ),
        ));
    }
    // A bare address is the one host: /32 or /128.
    let allow = file
        .allow
        .iter()
        .map(|a| {
            a.parse::<IpNet>()
                .or_else(|_| a.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| format!("allow: {a:?} is neither an address nor a CIDR prefix"))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| RemoteGuardError::invalid(path, e))?;
    let protect = file
        .protect
        .iter()
        .map(|p| p.parse::<PortRule>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| RemoteGuardError::invalid(path, format!("protect: {e}")))?;
    let sockets = if file.socket_layer {
        let mount = crate::ebpf::cgroup2_mount().ok_or_else(|| {
            RemoteGuardError::invalid(
                path,
                "socket_layer: no cgroup v2 hierarchy is mounted (see /proc/mounts)".into(),
            )
        })?;
        Some(mount.join(&file.cgroup))
    } else {
        None
    };
    let spec = RemoteSpec {
        interfaces: file.interfaces,
        sockets,
        allow,
        protect,
        enforcement: match file.enforcement {
            EnforcementSetting::Enforce => Enforcement::Enforce,
            EnforcementSetting::Audit => Enforcement::Audit,
        },
        pin_dir: file.pin.then_some(file.pin_dir),
    };
    Ok(GuardFile {
        spec,
        admin: file.admin,
        summary_every: file.summary_every,
    })
}

/// The guard's counters for `GET /metrics`.
fn render(
    guard: &Mutex<RemoteGuard>,
    stats: &RunStats,
    out: &mut crate::metrics::Exposition<'_>,
) -> std::fmt::Result {
    use crate::metrics::NO_LABELS;
    use std::sync::atomic::Ordering::Relaxed;
    let guard = lock(guard);
    match guard.counters() {
        Ok(c) => {
            let layers = [("tc", c.tc), ("socket", c.socket)];
            let mut packets = Vec::new();
            for (layer, l) in layers {
                for (verdict, n) in [
                    ("allow", l.allowed),
                    ("drop", l.dropped),
                    ("audit", l.audited),
                ] {
                    packets.push(([("layer", layer), ("verdict", verdict)], n));
                }
            }
            out.counter(
                "gateway_guard_ingress_packets_total",
                "Packets to protected ports (and unparsable ones) seen by the remote guard, by layer and verdict.",
                packets,
            )?;
            out.counter(
                "gateway_guard_unparsable_packets_total",
                "Packets whose ports could not be read, judged as if protected, by layer.",
                layers.map(|(layer, l)| ([("layer", layer)], l.unparsable)),
            )?;
        }
        Err(e) => tracing::warn!(error = %e, "guard: reading counters"),
    }
    match guard.drops_per_rule() {
        Ok(rules) => out.counter(
            "gateway_guard_rule_drops_total",
            "Dropped (or, in audit, passed) bypass packets per protected port rule.",
            rules
                .iter()
                .map(|(rule, n)| ([("rule", rule.to_string())], *n)),
        )?,
        Err(e) => tracing::warn!(error = %e, "guard: reading rule counters"),
    }
    let programs = guard.program_stats();
    out.counter(
        "gateway_guard_program_runs_total",
        "Runs of each layer's program (counted while kernel.bpf_stats_enabled is on).",
        programs
            .iter()
            .map(|(program, runs, _)| ([("program", *program)], *runs)),
    )?;
    out.counter(
        "gateway_guard_program_run_nanoseconds_total",
        "Time in each layer's program (counted while kernel.bpf_stats_enabled is on).",
        programs.iter().map(|(program, _, time)| {
            (
                [("program", *program)],
                u64::try_from(time.as_nanos()).unwrap_or(u64::MAX),
            )
        }),
    )?;
    out.counter(
        "gateway_guard_reloads_total",
        "Reloads of guard.toml by result.",
        [
            ([("result", "ok")], stats.reloads_ok.load(Relaxed)),
            ([("result", "failed")], stats.reloads_failed.load(Relaxed)),
        ],
    )?;
    out.counter(
        "gateway_guard_interfaces_reattached_total",
        "Protected interfaces attached again after they were deleted and created.",
        [(NO_LABELS, stats.reattached.load(Relaxed))],
    )?;
    match guard.untallied() {
        Ok(n) => out.counter(
            "gateway_guard_untallied_attempts_total",
            "Bypass attempts whose source found the per-source tallies full (counted, in no summary).",
            [(NO_LABELS, n)],
        )?,
        Err(e) => tracing::warn!(error = %e, "guard: reading the untallied count"),
    }
    out.counter(
        "gateway_guard_repairs_total",
        "Layers found detached and attached again, and link pins found removed and put back.",
        [(NO_LABELS, stats.repairs.load(Relaxed))],
    )?;
    out.counter(
        "gateway_guard_reconcile_failures_total",
        "Looks at the interfaces and attachments that failed (each is logged; the next look tries again).",
        [(NO_LABELS, stats.reconcile_failures.load(Relaxed))],
    )?;
    out.counter(
        "gateway_guard_bypass_sources_total",
        "Bypass sources (per source, port and summary period) the guard tallied.",
        [(NO_LABELS, stats.sources.load(Relaxed))],
    )
}

/// What the runner itself counts, for the metrics.
#[derive(Default)]
struct RunStats {
    /// Reloads by outcome.
    reloads_ok: std::sync::atomic::AtomicU64,
    reloads_failed: std::sync::atomic::AtomicU64,
    /// Interfaces attached again after they were created anew.
    reattached: std::sync::atomic::AtomicU64,
    /// Distinct (source, port) pairs seen in the tallies.
    sources: std::sync::atomic::AtomicU64,
    /// Detached layers attached again, removed pins put back.
    repairs: std::sync::atomic::AtomicU64,
    /// Looks at the interfaces and attachments that failed.
    reconcile_failures: std::sync::atomic::AtomicU64,
}

/// Sources named per summary line (`10.0.2.7×3 10.0.2.9×1 …`): every
/// source is named, in lines of this many, so a flood of spoofed sources
/// costs the log lines, not the real source its mention.
const SOURCES_PER_LINE: usize = 32;

/// Logs who tried the protected ports since the last summary: every source
/// with its attempts, busiest first, grouped by port; and, when a flood of
/// distinct sources filled the tallies, how many attempts no line names.
fn log_summary(
    tallies: &[SourceAttempts],
    untallied: u64,
    every: Duration,
    enforcement: Enforcement,
) {
    let enforcement = match enforcement {
        Enforcement::Enforce => "enforce",
        Enforcement::Audit => "audit",
    };
    if untallied > 0 {
        tracing::warn!(
            attempts = untallied,
            sources_named = tallies.len(),
            enforcement,
            period = ?every,
            "guard: bypass attempts from more distinct sources than the tallies hold; counted, but their sources are not named (the first ones of the period are)"
        );
    }
    let mut by_port: std::collections::BTreeMap<(u16, &str), Vec<&SourceAttempts>> =
        std::collections::BTreeMap::new();
    for t in tallies {
        by_port.entry((t.port, t.protocol)).or_default().push(t);
    }
    for ((port, protocol), sources) in by_port {
        let attempts: u64 = sources.iter().map(|t| t.attempts).sum();
        let total = sources.len();
        for chunk in sources.chunks(SOURCES_PER_LINE) {
            let named: Vec<String> = chunk
                .iter()
                .map(|t| format!("{}×{}", t.source, t.attempts))
                .collect();
            tracing::warn!(
                port,
                protocol,
                sources = total,
                attempts,
                enforcement,
                period = ?every,
                who = %named.join(" "),
                "guard: bypass attempts by source"
            );
        }
    }
}

/// Takes the tallies and logs them (see [`log_summary`]).
fn summarize(
    guard: &Mutex<RemoteGuard>,
    stats: &RunStats,
    untallied_logged: &mut u64,
    every: Duration,
    enforcement: Enforcement,
) {
    let (tallies, untallied) = {
        let mut g = lock(guard);
        (g.take_tallies(), g.untallied())
    };
    let untallied = match untallied {
        Ok(total) => total - std::mem::replace(untallied_logged, total),
        Err(_) => 0,
    };
    match tallies {
        Ok(tallies) => {
            stats
                .sources
                .fetch_add(tallies.len() as u64, std::sync::atomic::Ordering::Relaxed);
            log_summary(&tallies, untallied, every, enforcement);
        }
        Err(e) => tracing::warn!(error = %e, "guard: reading the per-source tallies"),
    }
}

/// Logs what `reconcile` found.
fn log_changes(changes: &[InterfaceChange], stats: &RunStats) {
    for change in changes {
        match change {
            InterfaceChange::Reattached { interface, index } => {
                stats
                    .reattached
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(interface = %interface, index, "guard: interface created anew; attached again");
            }
            InterfaceChange::Gone { interface } => tracing::error!(
                interface = %interface,
                "guard: interface gone; its TC layer is attached again when it comes back (the socket layer still judges)"
            ),
            InterfaceChange::NotFirst { interface } => tracing::error!(
                interface = %interface,
                "guard: another TCX program now runs before the guard; what it passes with TC_ACT_OK skips the TC layer"
            ),
            InterfaceChange::SocketLayerReattached => {
                stats
                    .repairs
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(
                    "guard: the socket layer had been detached from its cgroup; attached again"
                );
            }
            InterfaceChange::Repinned { link } => {
                stats
                    .repairs
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(link = %link, "guard: a link's pin was removed or replaced; pinned again (the guard held the link meanwhile)");
            }
        }
    }
}

/// Looks at the interfaces and attachments again; a look that fails is
/// logged and counted, and the next one (at most 5 s later) tries again.
fn reconcile(guard: &Mutex<RemoteGuard>, stats: &RunStats) {
    match lock(guard).reconcile() {
        Ok(changes) => log_changes(&changes, stats),
        Err(e) => {
            stats
                .reconcile_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(error = %e, "guard: looking at the interfaces and attachments failed; trying again within 5s");
        }
    }
}

/// Installs the guard, logs every intrusion, reloads on SIGHUP, follows
/// interfaces that come and go, and stops on SIGTERM/SIGINT.
pub async fn run(path: &Path) -> Result<(), RemoteGuardError> {
    use tokio::signal::unix::{SignalKind, signal};
    let GuardFile {
        spec,
        admin,
        mut summary_every,
    } = load(path)?;
    let admin_at = admin;
    // Bound before anything is installed: a taken port changes nothing.
    let admin = match admin {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            RemoteGuardError::invalid(path, format!("admin: cannot listen on {addr}: {e}"))
        })?),
        None => None,
    };
    // Subscribed before attaching, so an interface recreated in between is seen.
    let mut link_changes = crate::netlink::Changes::subscribe(crate::netlink::Watch::Links)
        .map_err(|e| {
            RemoteGuardError::invalid(path, format!("watching interfaces (rtnetlink): {e}"))
        })?;
    let mut guard = RemoteGuard::install(&spec)?;
    let mut events = guard.take_events()?;
    let guard = Arc::new(Mutex::new(guard));
    let stats = Arc::new(RunStats::default());
    let stop = tokio_util::sync::CancellationToken::new();
    if let Some(socket) = admin {
        if let Ok(addr) = socket.local_addr() {
            tracing::info!(%addr, "guard: admin endpoint: GET /metrics");
        }
        let guard = guard.clone();
        let stats = stats.clone();
        // Ready once serving: the guard was installed before this point.
        let health = Arc::new(crate::admin::Health::default());
        health.set_ready();
        tokio::spawn(crate::admin::serve(
            Some(socket),
            None,
            crate::admin::Routes {
                metrics: Box::new(move || {
                    let (guard, stats) = (guard.clone(), stats.clone());
                    crate::metrics::render_with(move |out| render(&guard, &stats, out))
                }),
                admission: None,
                clients: Arc::new(arc_swap::ArcSwap::from_pointee(Vec::new())),
                health,
                registry: None,
                tls: None,
                rollout: None,
                revisions: None,
                reloads: None,
            },
            stop.clone(),
        ));
    }
    // Before the line that says it is protecting: a SIGHUP sent on seeing
    // it must reload, not kill the guard by the signal's default action.
    let signals = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    );
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = signals else {
        return Err(RemoteGuardError::invalid(
            path,
            "cannot install signal handlers".into(),
        ));
    };
    tracing::info!(
        interfaces = ?spec.interfaces,
        sockets = ?spec.sockets,
        allow = ?spec.allow.iter().map(ToString::to_string).collect::<Vec<_>>(),
        protect = ?spec.protect.iter().map(ToString::to_string).collect::<Vec<_>>(),
        enforcement = ?spec.enforcement,
        pin_dir = ?spec.pin_dir,
        "guard: protecting"
    );
    let mut enforcement = spec.enforcement;
    let mut untallied_logged = lock(&guard).untallied().unwrap_or(0);
    // The first summary one period from now (not at once, mid-way through
    // whatever is being tallied).
    let mut summary =
        tokio::time::interval_at(tokio::time::Instant::now() + summary_every, summary_every);
    summary.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Netlink notifications can be lost: look again now and then anyway.
    let mut look_again = tokio::time::interval(Duration::from_secs(5));
    look_again.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut links_watched = true;
    loop {
        tokio::select! {
            e = events.next() => match e {
                Some(i) => tracing::warn!(
                    source = %i.source, destination = %i.destination, protocol = i.protocol,
                    ifindex = i.ifindex, layer = i.layer, unparsable = i.unparsable,
                    verdict = if i.audited { "audit" } else { "drop" },
                    "guard: bypass attempt"
                ),
                None => {
                    tracing::error!("guard: the event ring buffer can no longer be read; counters and summaries still count");
                    std::future::pending::<()>().await;
                }
            },
            changed = link_changes.changed(), if links_watched => {
                if let Err(e) = changed {
                    tracing::error!(error = %e, "guard: interface notifications failed; looking every 5s instead");
                    links_watched = false;
                }
                reconcile(&guard, &stats);
            }
            _ = look_again.tick() => reconcile(&guard, &stats),
            _ = summary.tick() => summarize(&guard, &stats, &mut untallied_logged, summary_every, enforcement),
            _ = hup.recv() => match load(path).and_then(|f| {
                if f.admin != admin_at {
                    return Err(RemoteGuardError::invalid(path, format!(
                        "admin: changes from {admin_at:?} to {:?} only on restart", f.admin
                    )));
                }
                lock(&guard).update(&f.spec).map(|()| f).map_err(Into::into)
            }) {
                Ok(now) => {
                    enforcement = now.spec.enforcement;
                    if now.summary_every != summary_every {
                        tracing::info!(from = ?summary_every, to = ?now.summary_every, "guard: summary period changed");
                        summary_every = now.summary_every;
                        summary = tokio::time::interval_at(
                            tokio::time::Instant::now() + summary_every,
                            summary_every,
                        );
                        summary.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                    stats.reloads_ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!("guard: reloaded {}", path.display());
                }
                Err(e) => {
                    stats.reloads_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::error!(error = %e, "guard: reload failed; every rule stays as it was");
                }
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    summarize(
        &guard,
        &stats,
        &mut untallied_logged,
        summary_every,
        enforcement,
    );
    let counters = lock(&guard).counters()?;
    stop.cancel();
    let IngressCounters { tc, socket } = counters;
    let LayerCounters {
        protected,
        allowed,
        dropped,
        audited,
        unparsable,
    } = tc;
    let pinned = spec.pin_dir.as_ref().map(|d| d.display().to_string());
    tracing::info!(
        protected,
        allowed,
        dropped,
        audited,
        unparsable,
        socket_protected = socket.protected,
        socket_allowed = socket.allowed,
        socket_dropped = socket.dropped,
        socket_audited = socket.audited,
        pin_dir = ?pinned,
        "{}",
        if pinned.is_some() {
            "guard: stopping; protection stays pinned (gateway guard --uninstall --config removes it)"
        } else {
            "guard: stopping; protection ends"
        }
    );
    Ok(())
}

fn lock(guard: &Mutex<RemoteGuard>) -> MutexGuard<'_, RemoteGuard> {
    // A panic elsewhere leaves the maps as they were: keep going.
    guard
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

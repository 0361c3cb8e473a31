//! `gateway guard --config guard.toml`: the remote guard on a backend host.
//! Only the gateways' addresses reach the protected ports; everyone else's
//! packets are dropped (or counted and passed, in audit) and logged.
//!
//! ```toml
//! interfaces = ["eth0"]
//! allow = ["10.0.1.10", "fd00::10"]         # the gateways (CIDR prefixes)
//! protect = ["tcp:9000", "tcp:9100-9199"]   # udp:PORT too
//! enforcement = "enforce"                   # or "audit"
//! pin_dir = "/sys/fs/bpf/gateway-guard"     # the default; pin = false: detach on exit
//! admin = "127.0.0.1:9902"                  # optional: GET /metrics
//! ```
//!
//! Fail closed: when the program cannot be attached, the guard does not
//! start. SIGHUP reloads the file and updates the maps in place. Pinned (the
//! default), protection stays when the guard stops and a restart takes over
//! without a gap; `gateway guard --uninstall --config guard.toml` removes it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use ipnet::IpNet;
use serde::Deserialize;

use crate::ebpf::Enforcement;
use crate::ebpf::remote::{IngressCounters, PortRule, RemoteGuard, RemoteSpec};

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
    interfaces: Vec<String>,
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
}

/// A checked guard.toml.
pub struct GuardFile {
    pub spec: RemoteSpec,
    pub admin: Option<std::net::SocketAddr>,
}

fn default_true() -> bool {
    true
}

/// Beside the gateway's own /sys/fs/bpf/gateway, so one host can run both.
fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/gateway-guard")
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
    let de = toml::Deserializer::parse(&text).map_err(|e| RemoteGuardError::Parse {
        path: path.to_owned(),
        field: String::new(),
        message: e.to_string(),
    })?;
    let file: File = serde_path_to_error::deserialize(de).map_err(|e| RemoteGuardError::Parse {
        path: path.to_owned(),
        field: e.path().to_string(),
        message: e.into_inner().message().to_owned(),
    })?;
    if file.interfaces.is_empty() {
        return Err(RemoteGuardError::invalid(
            path,
            "interfaces: name at least one".into(),
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
    let spec = RemoteSpec {
        interfaces: file.interfaces,
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
    })
}

/// The guard's counters in the Prometheus text format.
fn render(guard: &Mutex<RemoteGuard>) -> String {
    use std::fmt::Write as _;
    let guard = lock(guard);
    let mut out = String::new();
    match guard.counters() {
        Ok(c) => {
            out.push_str("# HELP gateway_guard_ingress_packets_total Packets to protected ports seen by the remote guard, by verdict.\n");
            out.push_str("# TYPE gateway_guard_ingress_packets_total counter\n");
            for (verdict, n) in [
                ("allow", c.allowed),
                ("drop", c.dropped),
                ("audit", c.audited),
            ] {
                let _ = writeln!(
                    out,
                    "gateway_guard_ingress_packets_total{{verdict=\"{verdict}\"}} {n}"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "guard: reading counters"),
    }
    match guard.drops_per_rule() {
        Ok(rules) => {
            out.push_str("# HELP gateway_guard_rule_drops_total Dropped (or, in audit, passed) bypass packets per protected port rule.\n");
            out.push_str("# TYPE gateway_guard_rule_drops_total counter\n");
            for (rule, n) in rules {
                let _ = writeln!(out, "gateway_guard_rule_drops_total{{rule=\"{rule}\"}} {n}");
            }
        }
        Err(e) => tracing::warn!(error = %e, "guard: reading rule counters"),
    }
    out
}

/// Installs the guard, logs every intrusion, reloads on SIGHUP and stops
/// (detaching) on SIGTERM/SIGINT.
pub async fn run(path: &Path) -> Result<(), RemoteGuardError> {
    use tokio::signal::unix::{SignalKind, signal};
    let GuardFile { spec, admin } = load(path)?;
    // Bound before anything is installed: a taken port changes nothing.
    let admin = match admin {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            RemoteGuardError::invalid(path, format!("admin: cannot listen on {addr}: {e}"))
        })?),
        None => None,
    };
    let mut guard = RemoteGuard::install(&spec)?;
    let mut events = guard.take_events()?;
    let guard = Arc::new(Mutex::new(guard));
    let stop = tokio_util::sync::CancellationToken::new();
    if let Some(socket) = admin {
        if let Ok(addr) = socket.local_addr() {
            tracing::info!(%addr, "guard: admin endpoint: GET /metrics");
        }
        let guard = guard.clone();
        tokio::spawn(crate::metrics::serve_admin(
            socket,
            move || render(&guard),
            stop.clone(),
        ));
    }
    tracing::info!(
        interfaces = ?spec.interfaces,
        allow = ?spec.allow.iter().map(ToString::to_string).collect::<Vec<_>>(),
        protect = ?spec.protect.iter().map(ToString::to_string).collect::<Vec<_>>(),
        enforcement = ?spec.enforcement,
        pin_dir = ?spec.pin_dir,
        "guard: protecting"
    );
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
    loop {
        tokio::select! {
            e = events.next() => match e {
                Some(i) => tracing::warn!(
                    source = %i.source, destination = %i.destination, protocol = i.protocol,
                    ifindex = i.ifindex, verdict = if i.audited { "audit" } else { "drop" },
                    "guard: bypass attempt"
                ),
                None => {
                    tracing::error!("guard: the event ring buffer can no longer be read; counters still count");
                    std::future::pending::<()>().await;
                }
            },
            _ = hup.recv() => match load(path).and_then(|f| {
                lock(&guard).update(&f.spec).map_err(Into::into)
            }) {
                Ok(()) => tracing::info!("guard: reloaded {}", path.display()),
                Err(e) => tracing::error!(error = %e, "guard: reload failed; the previous rules stay"),
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    let IngressCounters {
        protected,
        allowed,
        dropped,
        audited,
    } = lock(&guard).counters()?;
    stop.cancel();
    match &spec.pin_dir {
        Some(dir) => tracing::info!(
            protected,
            allowed,
            dropped,
            audited,
            pin_dir = %dir.display(),
            "guard: stopping; protection stays pinned (gateway guard --uninstall --config removes it)"
        ),
        None => tracing::info!(
            protected,
            allowed,
            dropped,
            audited,
            "guard: stopping; protection ends"
        ),
    }
    Ok(())
}

fn lock(guard: &Mutex<RemoteGuard>) -> MutexGuard<'_, RemoteGuard> {
    // A panic elsewhere leaves the maps as they were: keep going.
    guard
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

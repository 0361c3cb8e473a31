//! The gateway's side of the eBPF guard: which backends to protect (every
//! route's, resolved, plus explicit ones), the gateway's own cgroup, and
//! keeping the kernel maps in step with reloads.
//!
//! Fail closed: when enforcement is configured and the programs cannot be
//! installed, the gateway does not start.

use std::net::ToSocketAddrs as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::config::{Config, GuardEnforcement, GuardSettings};
use crate::ebpf::{
    self, BypassAttempt, EbpfError, Enforcement, GuardCounters, GuardSpec, LocalGuard, Protected,
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
    #[error("guard: {0}")]
    Ebpf(#[from] EbpfError),
}

/// The installed guard.
pub struct Guard {
    local: Mutex<LocalGuard>,
    gateway_cgroup: PathBuf,
    gateway_uid: Option<u32>,
    attempts: tokio::sync::broadcast::Sender<BypassAttempt>,
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
        join_cgroup(&gateway_cgroup)?;
        let spec = GuardSpec {
            protected: protected(config, settings)?,
            gateway_cgroup: gateway_cgroup.clone(),
            gateway_uid: settings.uid,
            enforcement: mode,
            pin_dir: settings.pin.then(|| settings.pin_dir.clone()),
        };
        let attach_to = mount.join(&settings.attach_to);
        let mut local = LocalGuard::install(&attach_to, &spec)?;
        let attempts = tokio::sync::broadcast::channel(1024).0;
        let mut events = local.take_events()?;
        let tx = attempts.clone();
        tokio::spawn(async move {
            while let Some(a) = events.next().await {
                if a.audited {
                    tracing::warn!(pid = a.pid, uid = a.uid, comm = %a.comm, cgroup = a.cgroup,
                        destination = %a.destination, protocol = a.protocol.name(), "audit: bypass of the gateway let through");
                } else {
                    tracing::warn!(pid = a.pid, uid = a.uid, comm = %a.comm, cgroup = a.cgroup,
                        destination = %a.destination, protocol = a.protocol.name(), "bypass of the gateway refused");
                }
                // No subscriber is the normal case outside tests.
                let _ = tx.send(a);
            }
            tracing::error!(
                "guard events stopped: bypass attempts are still counted but no longer logged"
            );
        });
        tracing::info!(
            protected = spec.protected.len(),
            enforcement = ?mode,
            cgroup = %gateway_cgroup.display(),
            uid = ?settings.uid,
            attached = %attach_to.display(),
            "guard installed: only the gateway reaches the backends"
        );
        Ok(Some(Guard {
            local: Mutex::new(local),
            gateway_cgroup,
            gateway_uid: settings.uid,
            attempts,
        }))
    }

    /// Brings the maps in step with a new config (before it serves).
    pub fn update(&self, config: &Config) -> Result<(), GuardError> {
        let Some(settings) = &config.guard else {
            return Ok(());
        };
        // Turning the guard off or moving it needs a restart; a reload only
        // changes what it protects and how strictly.
        let mode = enforcement(settings.enforcement).unwrap_or(Enforcement::Audit);
        let spec = GuardSpec {
            protected: protected(config, settings)?,
            gateway_cgroup: self.gateway_cgroup.clone(),
            // Like the cgroup, fixed at start: the running process's uid.
            gateway_uid: self.gateway_uid,
            enforcement: mode,
            // Maps are already pinned (or not); an update only writes them.
            pin_dir: None,
        };
        self.local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .update(&spec)?;
        Ok(())
    }

    /// Bypass attempts from now on (rate-limited in the kernel).
    pub fn attempts(&self) -> tokio::sync::broadcast::Receiver<BypassAttempt> {
        self.attempts.subscribe()
    }

    pub fn counters(&self) -> Result<GuardCounters, GuardError> {
        Ok(self
            .local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .counters()?)
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

//! The whole gateway as a value: `build(config)` loads and binds everything,
//! `run()` serves until shut down, reloading when asked. Tests run exactly
//! this, in-process.
//!
//! Reload builds a whole new state first and changes nothing when any part of
//! it is invalid; otherwise it swaps each listener's state atomically (the
//! next accept sees it, no accept is refused), starts new listeners, lets
//! removed ones drain, and re-judges every live connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::{AccessLog, AccessLogError, AccessRecord};
use crate::admission::Admission;
use crate::config::Config;
use crate::listener::{self, Shared};
use crate::metrics::Metrics;
use crate::registry::{self, Registry};
use crate::revisions::{How, Revision, RevisionError};
use crate::state::{ListenerState, Route, State, StateError};
use crate::tls::{TlsError, crl};

/// After the drain timeout, how long closed connections get to write their
/// last access-log line before run() returns anyway.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How often expiring certificates and CRLs are logged again.
const EXPIRY_CHECK: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    AccessLog(#[from] AccessLogError),
    /// The config's `user`, looked up (for the access log's directory).
    #[error(transparent)]
    Privilege(#[from] crate::privilege::PrivilegeError),
    #[error(transparent)]
    Guard(#[from] crate::guard::GuardError),
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    #[error("listener {listener:?}: cannot bind {bind}: {source}")]
    Bind {
        listener: String,
        bind: SocketAddr,
        source: std::io::Error,
    },
    /// A listener's sockets (one per worker).
    #[error("listener {listener:?}: {source}")]
    Workers {
        listener: String,
        source: crate::workers::WorkerError,
    },
    /// A worker's thread or runtime.
    #[error(transparent)]
    StartWorkers(crate::workers::WorkerError),
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("reload refused, running state kept: {0}")]
    Invalid(String),
    /// The reload guard (`max_reload_closes`) held it: see `preview`.
    #[error("reload refused, running state kept: {}", .0.refusal())]
    Guarded(crate::preview::GuardCheck),
    #[error("the gateway is shutting down")]
    ShuttingDown,
}

impl ReloadError {
    /// Why, without the "reload refused" the log line's message says.
    pub fn reason(&self) -> String {
        match self {
            ReloadError::Invalid(why) => why.clone(),
            ReloadError::Guarded(check) => check.refusal(),
            e => e.to_string(),
        }
    }
}

/// The log line for a refused reload: the message says what happened, the
/// field says why, each once.
fn log_refused(e: &ReloadError) {
    match e {
        ReloadError::Guarded(check) => {
            let counted: Vec<String> = check
                .counted
                .iter()
                .map(|(l, n)| format!("{l}={n}"))
                .collect();
            tracing::error!(reason = %e.reason(), max_reload_closes = check.limit.unwrap_or(0),
                closes = %counted.join(","), "reload refused by the reload guard, running state kept");
        }
        _ => tracing::error!(reason = %e.reason(), "reload refused, running state kept"),
    }
}

/// What a successful reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    pub listeners_started: Vec<String>,
    pub listeners_stopped: Vec<String>,
    /// Live connections closed because the new state no longer allows them.
    pub connections_closed: usize,
    /// The revision it was recorded as (none: no history, or it could not
    /// be written).
    pub revision: Option<u64>,
    /// What it did to the CAs the listeners trust (see `anchors_change`):
    /// `auto_revert` watches only a reload that changed them other than by
    /// removing some.
    pub trust_anchors: AnchorChange,
}

/// Why `gateway rollout revert N` was not applied.
#[derive(Debug, thiserror::Error)]
pub enum RevertError {
    #[error("no revision history: set revisions_dir (or audit_state)")]
    NoHistory,
    #[error(transparent)]
    Revision(#[from] RevisionError),
    #[error(
        "revision {number} named files that changed since it ran: {files}; its config would now apply them as they are (revert --force does)"
    )]
    FilesChanged { number: u64, files: String },
    #[error("revision {number} was read from {was}, the gateway now runs {now}: not reverted")]
    OtherFile {
        number: u64,
        was: PathBuf,
        now: PathBuf,
    },
    #[error("revision {number}'s config does not parse any more: {reason}")]
    Unparsable { number: u64, reason: String },
    /// A fleet member's config comes from etcd: a revert here would be
    /// undone by the next revision, and would diverge from the fleet.
    #[error(
        "revision {number} is a fleet document: revert the fleet by pushing the older document (gateway fleet push), not one member"
    )]
    Fleet { number: u64 },
    #[error(transparent)]
    Reload(#[from] ReloadError),
}

impl RevertError {
    /// The admin endpoint's status for it.
    pub fn status(&self) -> u16 {
        match self {
            RevertError::NoHistory | RevertError::Revision(RevisionError::Unknown(_)) => 404,
            RevertError::Reload(ReloadError::ShuttingDown) => 503,
            RevertError::Reload(ReloadError::Invalid(_)) | RevertError::Unparsable { .. } => 422,
            _ => 409,
        }
    }
}

/// For the log line: what changed, in words.
impl std::fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if !self.listeners_started.is_empty() {
            parts.push(format!(
                "listeners started: {}",
                self.listeners_started.join(", ")
            ));
        }
        if !self.listeners_stopped.is_empty() {
            parts.push(format!(
                "listeners stopped: {}",
                self.listeners_stopped.join(", ")
            ));
        }
        parts.push(match self.connections_closed {
            0 => "every live connection still allowed".to_owned(),
            1 => "1 connection closed by re-verification".to_owned(),
            n => format!("{n} connections closed by re-verification"),
        });
        f.write_str(&parts.join("; "))
    }
}

/// Reloads since start.
#[derive(Debug, Default)]
pub struct ReloadStats {
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    /// Refused by the reload guard (also counted in `failed`).
    pub guard_refused: AtomicU64,
    /// Applied by force over the reload guard.
    pub guard_forced: AtomicU64,
}

struct ReloadRequest {
    config: Config,
    /// What the revision history records it as: a reload, or a revert
    /// to a revision (whose text is then written back to the config file).
    revert_to: Option<u64>,
    /// Apply it even if the reload guard would hold it.
    force: bool,
    reply: oneshot::Sender<Result<ReloadReport, ReloadError>>,
}

struct PreviewRequest {
    config: Config,
    /// The audit report's window for `seen_refused`.
    since: Option<Duration>,
    reply: oneshot::Sender<crate::preview::Preview>,
}

/// Asks the running app to reload, or to preview a reload.
#[derive(Clone)]
pub struct ReloadHandle {
    tx: mpsc::Sender<ReloadRequest>,
    preview_tx: mpsc::Sender<PreviewRequest>,
    stats: Arc<ReloadStats>,
    revisions: Option<Arc<crate::revisions::Store>>,
    /// Where "read the config again" goes when the config is more than
    /// its file (a fleet member: the host file and the document from
    /// etcd); set once by that source.
    reapply: Arc<std::sync::OnceLock<Reapply>>,
}

/// Applies the config again from its source, forced or not (SIGHUP,
/// `POST /reload` on a fleet member).
pub type Reapply = Arc<
    dyn Fn(
            bool,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<ReloadReport, ReloadError>> + Send>,
        > + Send
        + Sync,
>;

impl ReloadHandle {
    /// Makes `reload_file` read the config from `reapply` instead of the
    /// file alone (the first call wins).
    pub fn set_reapply(&self, reapply: Reapply) {
        let _ = self.reapply.set(reapply);
    }

    /// Applies `config` whole or not at all; systemd hears `RELOADING=1`
    /// before and `READY=1` after, whichever it was.
    pub async fn reload(&self, config: Config) -> Result<ReloadReport, ReloadError> {
        self.reload_forced(config, false).await
    }

    /// As `reload`; with `force`, the reload guard does not hold it.
    pub async fn reload_forced(
        &self,
        config: Config,
        force: bool,
    ) -> Result<ReloadReport, ReloadError> {
        crate::systemd::reloading();
        let result = self.apply(config, force).await;
        crate::systemd::reloaded(&result);
        result
    }

    async fn apply(&self, config: Config, force: bool) -> Result<ReloadReport, ReloadError> {
        self.send(config, None, force).await
    }

    async fn send(
        &self,
        config: Config,
        revert_to: Option<u64>,
        force: bool,
    ) -> Result<ReloadReport, ReloadError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(ReloadRequest {
                config,
                revert_to,
                force,
                reply,
            })
            .await
            .map_err(|_| ReloadError::ShuttingDown)?;
        rx.await.map_err(|_| ReloadError::ShuttingDown)?
    }

    /// Restores revision `number` through the same validate-then-swap path
    /// as any reload; its text is written back to the config file first,
    /// so the next reload from the file keeps it. Refused when a file it
    /// named no longer hashes the same, unless `force`.
    pub async fn revert(&self, number: u64, force: bool) -> Result<ReloadReport, RevertError> {
        crate::systemd::reloading();
        let result = self.revert_unannounced(number, force).await;
        match &result {
            Ok(report) => crate::systemd::reloaded::<_, ReloadError>(&Ok(report)),
            Err(e) => {
                if !matches!(e, RevertError::Reload(_)) {
                    // Refused before reaching the reload: count and log it
                    // as the reload would.
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(revision = number, reason = %e, "revert refused, running state kept");
                }
                crate::systemd::reloaded::<(), _>(&Err(e));
            }
        }
        result
    }

    async fn revert_unannounced(
        &self,
        number: u64,
        force: bool,
    ) -> Result<ReloadReport, RevertError> {
        let store = self.revisions.as_ref().ok_or(RevertError::NoHistory)?;
        let config = revision_config(store, number, force)?;
        // A revert is a change like any other: the reload guard holds it
        // unless forced.
        Ok(self.send(config, Some(number), force).await?)
    }

    /// What reloading to `config` would do, with nothing changed: the
    /// candidate built and every live connection judged against it by the
    /// reload's own code (see `preview`).
    pub async fn preview(
        &self,
        config: Config,
        since: Option<Duration>,
    ) -> Result<crate::preview::Preview, ReloadError> {
        let (reply, rx) = oneshot::channel();
        self.preview_tx
            .send(PreviewRequest {
                config,
                since,
                reply,
            })
            .await
            .map_err(|_| ReloadError::ShuttingDown)?;
        rx.await.map_err(|_| ReloadError::ShuttingDown)
    }

    /// Reads the config file again and reloads; a file that does not parse is
    /// a failed reload like any other.
    pub async fn reload_file(&self, path: &Path) -> Result<ReloadReport, ReloadError> {
        self.reload_file_forced(path, false).await
    }

    /// As `reload_file`; with `force`, the reload guard does not hold it.
    pub async fn reload_file_forced(
        &self,
        path: &Path,
        force: bool,
    ) -> Result<ReloadReport, ReloadError> {
        if let Some(reapply) = self.reapply.get() {
            return reapply(force).await;
        }
        match Config::load(path) {
            Ok(config) => self.reload_forced(config, force).await,
            Err(e) => {
                crate::systemd::reloading();
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                let e = ReloadError::Invalid(e.to_string());
                log_refused(&e);
                let refused = Err(e);
                crate::systemd::reloaded(&refused);
                refused
            }
        }
    }

    pub fn stats(&self) -> &ReloadStats {
        &self.stats
    }
}

/// Revision `number`'s config, if it may be restored: intact, from the
/// config file the gateway runs, its named files unchanged (or `force`).
fn revision_config(
    store: &crate::revisions::Store,
    number: u64,
    force: bool,
) -> Result<Config, RevertError> {
    let revision = store.get(number)?;
    if let Some(now) = store.current().map(|c| c.config_path)
        && now != revision.config_path
    {
        return Err(RevertError::OtherFile {
            number,
            was: revision.config_path,
            now,
        });
    }
    let changed = revision.changed_files();
    if !changed.is_empty() && !force {
        let files: Vec<String> = changed.iter().map(|p| p.display().to_string()).collect();
        return Err(RevertError::FilesChanged {
            number,
            files: files.join(", "),
        });
    }
    let config = revision.config().map_err(|e| RevertError::Unparsable {
        number,
        reason: e.to_string(),
    })?;
    if config.fleet.is_some() {
        return Err(RevertError::Fleet { number });
    }
    Ok(config)
}

/// Where a bound socket accepts connections (its port resolved when
/// `bind` said 0): its address, and for a dual-stack `[::]` socket also
/// `0.0.0.0` on its port. Whether `[::]` takes IPv4 too is the socket's
/// IPV6_V6ONLY (from `net.ipv6.bindv6only` unless set, or inherited), so
/// it is read back: the kernel block list must not drop IPv4 SYNs to
/// another service's `0.0.0.0` on that port when it does not (#19).
fn accepting(socket: &std::net::TcpListener) -> Vec<SocketAddr> {
    let Ok(addr) = socket.local_addr() else {
        return Vec::new();
    };
    let mut at = vec![addr];
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        match v6_only(socket) {
            Ok(false) => at.push(SocketAddr::from(([0, 0, 0, 0], addr.port()))),
            Ok(true) => {}
            // Unknown: leave IPv4 out; a blocked IPv4 source is then
            // refused at accept rather than dropped in the kernel.
            Err(e) => tracing::warn!(%addr, error = %e,
                "cannot read IPV6_V6ONLY of a [::] listener: its IPv4 side gets no kernel block list"),
        }
    }
    at
}

/// The socket's IPV6_V6ONLY.
fn v6_only(socket: &std::net::TcpListener) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd as _;
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the fd is the listener's, open while it is borrowed;
    // getsockopt writes at most `len` bytes into `value`, which has them.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(value != 0)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Accept loops of serving listeners that ended (a loop ends by itself
/// only by panicking): an error line once each, and why the gateway is not
/// ready. Its duplicate of the socket closed with it and the other workers
/// take its share; one worker fewer is still a fault to repair (restart).
fn dead_loops<'a>(
    listeners: impl Iterator<Item = (&'a str, &'a CancellationToken, &'a [JoinHandle<()>])>,
    said: &mut std::collections::HashSet<(String, usize)>,
) -> Option<String> {
    let mut dead = Vec::new();
    let mut names = Vec::new();
    for (name, stop, tasks) in listeners {
        names.push(name);
        if stop.is_cancelled() {
            continue;
        }
        for (worker, task) in tasks.iter().enumerate() {
            if task.is_finished() {
                if said.insert((name.to_owned(), worker)) {
                    tracing::error!(listener = %name, worker, "an accept loop ended while its listener serves (a panic): the other workers take its share; restart the gateway");
                }
                dead.push(format!(
                    "listener {name}: worker {worker}'s accept loop ended"
                ));
            }
        }
    }
    said.retain(|(name, _)| names.contains(&name.as_str()));
    (!dead.is_empty()).then(|| dead.join(", "))
}

/// How long a reload waits for a removed listener's accept loops to end.
const LOOP_STOP: Duration = Duration::from_secs(1);

/// A listener that is serving: an accept loop on every worker.
struct Running {
    bind: SocketAddr,
    /// Where it accepts connections (see `accepting`).
    local: Vec<SocketAddr>,
    /// One for every worker: a reload's swap reaches them all at once.
    current: Arc<ArcSwap<ListenerState>>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

pub struct App {
    /// Each listener with its sockets, one per worker.
    bound: Vec<(Arc<ListenerState>, Vec<std::net::TcpListener>)>,
    /// `workers`, resolved: how many accept loops per listener.
    workers: std::num::NonZeroUsize,
    worker_stats: Arc<crate::workers::Stats>,
    drain_timeout: Duration,
    access_log: Arc<AccessLog>,
    shutdown: CancellationToken,
    registry: Arc<Registry>,
    reload_tx: mpsc::Sender<ReloadRequest>,
    reload_rx: mpsc::Receiver<ReloadRequest>,
    preview_tx: mpsc::Sender<PreviewRequest>,
    preview_rx: mpsc::Receiver<PreviewRequest>,
    reload_stats: Arc<ReloadStats>,
    metrics: Arc<Metrics>,
    admin: Option<TcpListener>,
    admin_clients: Arc<arc_swap::ArcSwap<Vec<ipnet::IpNet>>>,
    /// `admin_socket`: where, and the socket bound there.
    admin_socket: Option<(crate::admin::SocketFile, tokio::net::UnixListener)>,
    /// `admin_tls`, for the TCP door.
    admin_tls: Option<tokio_rustls::TlsAcceptor>,
    /// What `GET /readyz` answers.
    health: Arc<crate::admin::Health>,
    expiry_warning: Duration,
    guard: Option<Arc<crate::guard::Guard>>,
    /// The newest CRL put into service per issuer, scope and key: a reload
    /// bringing an older one is refused (see `tls::crl`).
    crls: crl::Enforced,
    admission: Arc<Admission>,
    /// Where the audit report's summary is kept (`audit_state`).
    audit_state: Option<PathBuf>,
    /// The revision history (`revisions_dir`), and the config started
    /// with, recorded once `run` starts (after any privilege drop, as the
    /// user that will write the later ones).
    revisions: Option<Arc<crate::revisions::Store>>,
    start_revision: Option<Revision>,
    auto_revert: Option<crate::revisions::AutoRevert>,
    /// The serving config's `max_reload_closes`: the guard judges a
    /// candidate by it, so a candidate (or a revision) without the line
    /// cannot unguard itself.
    max_reload_closes: std::sync::Mutex<Option<usize>>,
    /// The config file it was started with (`POST /reload` reads it
    /// again); None: built from a config that came from no file.
    config_file: Option<PathBuf>,
    /// Shared with every `ReloadHandle` (see `ReloadHandle::set_reapply`).
    reapply: Arc<std::sync::OnceLock<Reapply>>,
}

/// Starts the shutdown sequence: stop accepting, drain, close.
#[derive(Clone, Debug)]
pub struct ShutdownHandle(CancellationToken);

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.0.cancel();
    }
}

/// A listener's sockets, one per worker (see `workers::bind`).
fn bind(
    l: &ListenerState,
    workers: std::num::NonZeroUsize,
) -> Result<Vec<std::net::TcpListener>, AppError> {
    crate::workers::bind(l.bind, workers).map_err(|source| AppError::Workers {
        listener: l.name.clone(),
        source,
    })
}

/// Loads and checks all state, then binds every listener. Errors here are the
/// operator's to fix; nothing has been served yet.
pub async fn build(config: &Config) -> Result<App, AppError> {
    let metrics = Arc::new(Metrics::default());
    let wants_kernel = config
        .listeners
        .iter()
        .any(|l| l.offload != crate::offload::Offload::Userspace);
    if wants_kernel {
        // Probed once; every connection's offload decision reads this.
        tracing::info!("{}", crate::offload::KernelSupport::get().describe());
    }
    // Measured once here rather than on the first connection's hand-off;
    // every listener may use the userspace path, if only as the fallback.
    tracing::info!("{}", crate::offload::cipher::Choice::get().describe());
    metrics.audit.set_limit(config.audit_entries);
    let audit_state = config.audit_state.as_ref().map(|p| config.resolve(p));
    if let Some(path) = &audit_state {
        // Evidence that cannot be read is no reason not to serve: start
        // with an empty summary, loudly.
        if let Err(e) = metrics.audit.load(path) {
            tracing::error!(error = %e, "audit report: starting with an empty summary");
            metrics.audit.state_error(&e);
        }
    }
    let state = State::build(config, &metrics)?;
    let crls = crl::Enforced::default();
    crls.record(&served_crls(&state));
    metrics.set_expiries(crate::expiry::collect(config), config.expiry_warning);
    // Before any socket: with enforcement configured, no guard means no start.
    let guard = crate::guard::Guard::install(config)?.map(Arc::new);
    gate_backends(&state, guard.as_deref());
    // Opened as root, before the drop to `user`: that user must not be
    // able to move the log's directory (review 10, S10-1).
    let drops_to = crate::privilege::Target::resolve(config)?;
    let access_log = Arc::new(AccessLog::open(
        &config.access_log,
        &config.base_dir,
        drops_to.as_ref(),
        metrics.access_log_lost.clone(),
        metrics.access_log_suppressed.clone(),
        config.admission.log_every,
    )?);
    let workers = crate::workers::count(config.workers);
    let mut bound = Vec::new();
    for l in state.listeners {
        let sockets = bind(&l, workers)?;
        bound.push((l, sockets));
    }
    // After binding (the ports are known) and before serving; the kernel
    // block list is attached here, while the gateway has the privileges.
    let admission = Admission::new(&config.admission, metrics.clone());
    // The workers' sockets of a listener share its address.
    let listening: Vec<SocketAddr> = bound
        .iter()
        .flat_map(|(_, s)| s.first().map(accepting).unwrap_or_default())
        .collect();
    admission.configure(&config.admission, &listening);
    let admin = match config.admin {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| AppError::Bind {
                    listener: "admin".into(),
                    bind: addr,
                    source,
                })?,
        ),
        None => None,
    };
    let admin_tls = match &config.admin_tls {
        Some(tls) => Some(crate::admin::tls_acceptor(
            tls,
            |p| config.resolve(p),
            config.allow_shared_keys,
        )?),
        None => None,
    };
    if let Some(addr) = config.admin
        && !addr.ip().is_loopback()
        && admin_tls.is_none()
    {
        tracing::warn!(%addr, "admin endpoint beyond loopback without admin_tls: /metrics, /healthz and /readyz answer anyone who can reach it, /block and /connections whoever admin_clients names by address");
    }
    let admin_socket = match &config.admin_socket {
        Some(path) => {
            let path = config.resolve(path);
            let (socket, file) = crate::admin::bind_socket(&path)?;
            Some((file, socket))
        }
        None => None,
    };
    let (reload_tx, reload_rx) = mpsc::channel(4);
    let revisions = config.revisions_dir().map(|dir| {
        Arc::new(
            crate::revisions::Store::new(dir, config.revisions_keep)
                .counting(metrics.revisions.clone()),
        )
    });
    let start_revision = revisions
        .as_ref()
        .map(|_| Revision::of(config, How::Start, None));
    let (preview_tx, preview_rx) = mpsc::channel(4);
    Ok(App {
        bound,
        workers,
        worker_stats: Arc::new(crate::workers::Stats::new(workers)),
        drain_timeout: state.drain_timeout,
        access_log,
        shutdown: CancellationToken::new(),
        registry: Arc::new(Registry::default()),
        reload_tx,
        reload_rx,
        preview_tx,
        preview_rx,
        reload_stats: Arc::default(),
        metrics,
        admin,
        admin_clients: Arc::new(arc_swap::ArcSwap::from_pointee(
            config.admin_clients.clone(),
        )),
        admin_socket,
        admin_tls,
        health: Arc::default(),
        expiry_warning: config.expiry_warning,
        guard,
        crls,
        admission,
        audit_state,
        revisions,
        start_revision,
        auto_revert: config.auto_revert(),
        max_reload_closes: std::sync::Mutex::new(config.max_reload_closes),
        config_file: Some(config.source.clone()).filter(|p| p.is_file()),
        reapply: Arc::default(),
    })
}

/// Every bundle's CRLs in a state, and the files they come from.
pub(crate) fn served_crls(state: &State) -> Vec<crl::Served<'_>> {
    state
        .listeners
        .iter()
        .flat_map(|l| l.tls.served_crls())
        .collect()
}

impl App {
    /// The address a listener is bound to (its port when the config said 0).
    pub fn local_addr(&self, listener: &str) -> Option<SocketAddr> {
        self.bound
            .iter()
            .find(|(l, _)| l.name == listener)
            .and_then(|(_, s)| s.first()?.local_addr().ok())
    }

    /// A listener's routes (with their counters), as built.
    pub fn routes(&self, listener: &str) -> Vec<Arc<Route>> {
        self.bound
            .iter()
            .filter(|(l, _)| l.name == listener)
            .flat_map(|(l, _)| l.routes.iter().cloned())
            .collect()
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown.clone())
    }

    pub fn reload_handle(&self) -> ReloadHandle {
        ReloadHandle {
            tx: self.reload_tx.clone(),
            preview_tx: self.preview_tx.clone(),
            stats: self.reload_stats.clone(),
            revisions: self.revisions.clone(),
            reapply: self.reapply.clone(),
        }
    }

    /// The metrics the app counts into (a source such as `fleet` writes
    /// its own status there).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The eBPF guard, when the config enables it.
    pub fn guard(&self) -> Option<Arc<crate::guard::Guard>> {
        self.guard.clone()
    }

    /// Admission: the block list, each listener's slots.
    pub fn admission(&self) -> Arc<Admission> {
        self.admission.clone()
    }

    /// The admin endpoint's address, when configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|s| s.local_addr().ok())
    }

    /// Where `admin_socket` is served, when configured.
    pub fn admin_socket(&self) -> Option<std::path::PathBuf> {
        self.admin_socket.as_ref().map(|(f, _)| f.path.clone())
    }

    /// Live connections right now.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// Every access-log record from now on.
    pub fn access_log(&self) -> broadcast::Receiver<AccessRecord> {
        self.access_log.subscribe()
    }

    /// Serves until the shutdown handle fires, reloading on request; then
    /// stops accepting, lets live connections finish for up to the drain
    /// timeout, and closes the rest. A gateway that cannot start its
    /// workers serves nothing (logged); `serve` says so to its caller.
    pub async fn run(self) {
        if let Err(e) = self.serve().await {
            tracing::error!(error = %e, "the gateway did not start serving");
        }
    }

    /// `run`, with the error that kept it from serving at all.
    pub async fn serve(mut self) -> Result<(), AppError> {
        // Here, not in `build`: after any privilege drop, so the threads
        // inherit the narrowed capabilities (see `workers`).
        let workers =
            crate::workers::Workers::start(self.workers).map_err(AppError::StartWorkers)?;
        tracing::info!(workers = workers.len(), "workers started");
        let shared = Shared {
            log: self.access_log.clone(),
            tracker: TaskTracker::new(),
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
            admission: self.admission.clone(),
            close: CancellationToken::new(),
        };
        // The admin endpoint outlives the listeners: through the drain it
        // answers /readyz with 503, so load balancers move new clients on.
        let admin_stop = CancellationToken::new();
        // Also when `run` itself is dropped (aborted) before its end: the
        // endpoint holds the guard and admission, whose drop says goodbye.
        let _admin_stop_on_drop = admin_stop.clone().drop_guard();
        let admin_socket = self.admin_socket.take();
        let admin_file = admin_socket.as_ref().map(|(f, _)| f.clone());
        if self.admin.is_some() || admin_socket.is_some() {
            if let Some(addr) = self.admin.as_ref().and_then(|s| s.local_addr().ok()) {
                tracing::info!(%addr, "admin endpoint: GET /metrics, /healthz, /readyz, /block, /connections");
            }
            if let Some(file) = &admin_file {
                tracing::info!(path = %file.path.display(), "admin socket: every admin route, and block list changes");
            }
            let sources = crate::metrics::Sources {
                metrics: self.metrics.clone(),
                registry: self.registry.clone(),
                reloads: self.reload_stats.clone(),
                guard: self.guard.clone(),
                admission: Some(self.admission.clone()),
                workers: Some(self.worker_stats.clone()),
            };
            tokio::spawn(crate::admin::serve(
                self.admin.take(),
                admin_socket.map(|(_, s)| s),
                crate::admin::Routes {
                    metrics: Box::new(move || sources.render()),
                    admission: Some(self.admission.clone()),
                    clients: self.admin_clients.clone(),
                    health: self.health.clone(),
                    registry: Some(self.registry.clone()),
                    tls: self.admin_tls.take(),
                    revisions: self.revisions.clone().map(|store| {
                        let handle = self.reload_handle();
                        crate::admin::Revisions {
                            history: Arc::new(move || store.history()),
                            revert: Box::new(move |number, force| {
                                let handle = handle.clone();
                                Box::pin(async move {
                                    handle
                                        .revert(number, force)
                                        .await
                                        .map(|report| crate::admin::Reverted {
                                            revision: report.revision,
                                            reverted_to: number,
                                            connections_closed: report.connections_closed,
                                            changes: report.to_string(),
                                        })
                                        .map_err(|e| (e.status(), e.to_string()))
                                })
                            }),
                        }
                    }),
                    rollout: Some(crate::rollout::ReportSource {
                        audit: self.metrics.audit.clone(),
                        routes: {
                            let registry = self.registry.clone();
                            Box::new(move || registry.routes())
                        },
                        expiries: self.metrics.expiries.clone(),
                    }),
                    reloads: Some(Box::new(AdminReloads {
                        handle: self.reload_handle(),
                        config_file: self.config_file.clone(),
                    })),
                },
                admin_stop.clone(),
            ));
        }
        self.registry.publish(
            self.bound
                .iter()
                .map(|(l, _)| (l.name.clone(), l.clone()))
                .collect(),
            self.drain_timeout,
        );
        let mut running = HashMap::new();
        for (l, sockets) in std::mem::take(&mut self.bound) {
            let name = l.name.clone();
            running.insert(name, self.start(l, sockets, &shared, &workers));
        }
        // Every listener is bound and accepting, the guard (if any) was
        // installed by `build`.
        self.health.set_ready();
        let mut drain_timeout = self.drain_timeout;
        let mut expiry_warning = self.expiry_warning;
        // Fires at once, then hourly: expiring certificates are said again
        // until someone renews them.
        let mut expiry_check = tokio::time::interval(EXPIRY_CHECK);
        let mut tick = tokio::time::interval(registry::TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ended_loops = std::collections::HashSet::new();
        let mut audit_save = tokio::time::interval(crate::rollout::SAVE_INTERVAL);
        audit_save.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        if let Some(store) = &self.revisions {
            tracing::info!(dir = %store.dir().display(), auto_revert = self.auto_revert.is_some(), "revision history: every applied config is kept (gateway rollout history, revert)");
            // What a revert could never use: said and counted once.
            for e in store.list().1 {
                tracing::error!(error = %e, "revision history: an entry is skipped");
                // The store counts what it found untrusted itself.
                if e.as_str() != "unsafe" {
                    self.metrics.revisions.error(&e);
                }
            }
        }
        if let Some(start) = self.start_revision.take() {
            self.record(start);
        }
        let mut rollback = Rollback {
            started: tokio::time::Instant::now(),
            samples: crate::revisions::Samples::default(),
            armed: None,
            settings: self.auto_revert,
        };
        loop {
            let job = tokio::select! {
                () = self.shutdown.cancelled() => break,
                Some(req) = self.preview_rx.recv() => {
                    let _ = req.reply.send(self.preview(&req.config, req.since));
                    continue;
                }
                Some(req) = self.reload_rx.recv() => Job {
                    how: if req.revert_to.is_some() { How::Revert } else { How::Reload },
                    config: req.config,
                    revert_to: req.revert_to,
                    force: req.force,
                    reply: Some(req.reply),
                },
                _ = tick.tick() => {
                    self.registry.tick();
                    self.admission.tick();
                    self.health.set_unsafe_to_serve(dead_loops(
                        running.iter().map(|(n, r)| (n.as_str(), &r.stop, r.tasks.as_slice())),
                        &mut ended_loops,
                    ));
                    match self.watch_rollback(&mut rollback) {
                        Some(job) => job,
                        None => continue,
                    }
                }
                _ = expiry_check.tick() => {
                    self.metrics.warn_expiring(expiry_warning);
                    continue;
                }
                _ = audit_save.tick(), if self.audit_state.is_some() => {
                    self.save_audit(false).await;
                    continue;
                }
            };
            let before = self.current_revision();
            if job.how == How::AutoRevert {
                // Asked-for reloads tell systemd in `ReloadHandle`.
                crate::systemd::reloading();
            }
            let mut result = self
                .apply(
                    &job.config,
                    job.revert_to,
                    job.force,
                    (&mut running, &workers),
                    &shared,
                )
                .await;
            if job.how == How::AutoRevert {
                crate::systemd::reloaded(&result);
            }
            match &mut result {
                Ok(report) => {
                    report.revision =
                        self.record(Revision::of(&job.config, job.how, job.revert_to));
                    drain_timeout = job.config.drain_timeout;
                    expiry_warning = job.config.expiry_warning;
                    self.metrics.audit.set_limit(job.config.audit_entries);
                    self.metrics
                        .set_expiries(crate::expiry::collect(&job.config), expiry_warning);
                    self.metrics.warn_expiring(expiry_warning);
                    self.reload_stats.succeeded.fetch_add(1, Ordering::Relaxed);
                    match job.how {
                        How::AutoRevert => {
                            self.metrics
                                .revisions
                                .auto_applied
                                .fetch_add(1, Ordering::Relaxed);
                            tracing::error!(
                                revision = ?report.revision,
                                reverted_to = ?job.revert_to,
                                changes = %report,
                                "auto_revert: reverted to the previous revision"
                            );
                        }
                        How::Revert => tracing::warn!(
                            revision = ?report.revision,
                            reverted_to = ?job.revert_to,
                            changes = %report,
                            "reverted"
                        ),
                        How::Reload | How::Start => {
                            tracing::info!(changes = %report, "reloaded")
                        }
                    }
                    let unwatched = if job.force {
                        Some("the reload was forced")
                    } else if job.config.auto_revert().is_none() {
                        Some("the reload's own config turns auto_revert off")
                    } else if report.trust_anchors == AnchorChange::OnlyRemoved {
                        Some("the reload only removes trust anchors")
                    } else if report.trust_anchors == AnchorChange::Same {
                        Some("the reload does not change which CAs are trusted")
                    } else {
                        None
                    };
                    rollback.applied(job.how, before, report.revision, unwatched, &self.metrics);
                    rollback.settings = job.config.auto_revert();
                }
                Err(e) => {
                    self.reload_stats.failed.fetch_add(1, Ordering::Relaxed);
                    log_refused(e);
                    if job.how == How::AutoRevert {
                        self.metrics
                            .revisions
                            .auto_failed
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::error!(reverted_to = ?job.revert_to, reason = %e.reason(), "auto_revert: the revert was refused: the reload that broke handshakes still serves");
                    }
                }
            }
            if let Some(reply) = job.reply {
                let _ = reply.send(result);
            }
        }
        self.health.set_draining();
        for (_, r) in running.drain() {
            r.stop.cancel();
            // Each loop exits on the token; its socket closes with it.
            for task in r.tasks {
                let _ = task.await;
            }
        }
        let tracker = shared.tracker;
        tracker.close();
        tracing::info!(
            connections = tracker.len(),
            drain_timeout = ?drain_timeout,
            "shutting down: draining live connections"
        );
        if tokio::time::timeout(drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                connections = tracker.len(),
                "drain timeout reached: closing the remaining connections"
            );
            shared.close.cancel();
            let _ = tokio::time::timeout(CLOSE_GRACE, tracker.wait()).await;
        }
        // Whatever the close left is dropped with the workers' runtimes.
        workers.stop().await;
        self.save_audit(true).await;
        // The last lines and summaries, before the process ends with them.
        self.access_log.close(CLOSE_GRACE).await;
        admin_stop.cancel();
        if let Some(file) = admin_file {
            file.remove();
        }
        tracing::info!("shutdown complete");
        Ok(())
    }

    /// The revision serving now, when there is a history.
    fn current_revision(&self) -> Option<u64> {
        self.revisions
            .as_ref()
            .and_then(|s| s.current())
            .map(|r| r.number)
    }

    /// Records an applied config in the history; a history that cannot be
    /// written is logged and counted, and serving goes on.
    fn record(&self, revision: Revision) -> Option<u64> {
        let store = self.revisions.as_ref()?;
        let how = revision.how;
        match store.record(revision) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(how = how.as_str(), error = %e, "revision history: this config was not recorded");
                self.metrics.revisions.error(&e);
                None
            }
        }
    }

    /// Each tick: sample the trust failures; when a watched reload made
    /// them jump, the revert to the revision it replaced.
    fn watch_rollback(&self, rollback: &mut Rollback) -> Option<Job> {
        use crate::revisions::Judgement;
        let now = rollback.started.elapsed().as_secs_f64();
        let count = self.metrics.trust_failures.load(Ordering::Relaxed);
        rollback.samples.push(now, count);
        let (armed, settings) = rollback.armed.as_ref()?;
        match armed.judge(settings, now, count) {
            Judgement::Watching => return None,
            Judgement::Passed => {
                tracing::info!(
                    revision = armed.revision,
                    failures = count.saturating_sub(armed.count_at),
                    "auto_revert: the reload passed its window"
                );
                rollback.armed = None;
                return None;
            }
            Judgement::Revert => {}
        }
        let (armed, settings) = rollback.armed.take()?;
        tracing::error!(
            revision = armed.revision,
            previous = armed.previous,
            failures = count.saturating_sub(armed.count_at),
            seconds = now - armed.at,
            baseline_per_second = armed.baseline,
            factor = settings.factor,
            "auto_revert: certificate check failures jumped after the reload: reverting to the previous revision"
        );
        let refused = |why: String| {
            self.metrics
                .revisions
                .auto_failed
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!(revision = armed.previous, reason = %why, "auto_revert: the revert was refused: the reload that broke handshakes still serves");
            None
        };
        // Never past a revision a newer reload replaced (a newer reload
        // re-arms, so this is the last line of defence).
        if self.current_revision() != Some(armed.revision) {
            return refused(format!("revision {} no longer serves", armed.revision));
        }
        let store = self.revisions.as_ref()?;
        match revision_config(store, armed.previous, false) {
            Ok(config) => Some(Job {
                config,
                how: How::AutoRevert,
                revert_to: Some(armed.previous),
                // Held by the reload guard like any change: a jump in
                // failures an attacker can cause must not close more live
                // connections than the operator allows.
                force: false,
                reply: None,
            }),
            Err(e) => refused(e.to_string()),
        }
    }

    /// A reload, and for a revert the revision's text written back to the
    /// config file first (so the next reload from the file, SIGHUP or a
    /// watched change, keeps the revert rather than silently undoing it);
    /// a revert whose text cannot be written is not applied, and a reload
    /// that fails puts the file's old text back.
    async fn apply(
        &self,
        config: &Config,
        revert_to: Option<u64>,
        force: bool,
        running: Serving<'_>,
        shared: &Shared,
    ) -> Result<ReloadReport, ReloadError> {
        let Some(number) = revert_to else {
            return self.reload(config, None, force, running, shared).await;
        };
        let path = &config.source;
        let old = std::fs::read(path).map_err(|e| {
            ReloadError::Invalid(format!(
                "revert to revision {number}: cannot read the config file {}: {e}",
                path.display()
            ))
        })?;
        crate::revisions::replace_file(path, config.text.as_bytes()).map_err(|e| {
            ReloadError::Invalid(format!(
                "revert to revision {number}: cannot write its config back to {} (the next reload from the file would undo it): {e}",
                path.display()
            ))
        })?;
        let result = self.reload(config, revert_to, force, running, shared).await;
        if result.is_err()
            && let Err(e) = crate::revisions::replace_file(path, &old)
        {
            tracing::error!(path = %path.display(), error = %e, "revert failed and the config file's previous text could not be put back");
        }
        result
    }

    /// Writes the audit summary to `audit_state` (when it changed, or
    /// `force`), off the runtime's threads: it ends in an fsync.
    async fn save_audit(&self, force: bool) {
        let Some(path) = self.audit_state.clone() else {
            return;
        };
        let audit = self.metrics.audit.clone();
        let result = tokio::task::spawn_blocking(move || audit.save(&path, force)).await;
        if let Ok(Err(e)) = result {
            tracing::error!(error = %e, "audit report: the summary was not saved");
            self.metrics.audit.state_error(&e);
        }
    }

    /// An accept loop for `l` on every worker, each on its own socket.
    fn start(
        &self,
        l: Arc<ListenerState>,
        sockets: Vec<std::net::TcpListener>,
        shared: &Shared,
        workers: &crate::workers::Workers,
    ) -> Running {
        let local = sockets.first().and_then(|s| s.local_addr().ok());
        match local {
            Some(addr) => {
                tracing::info!(listener = %l.name, %addr, routes = l.routes.len(), workers = sockets.len(), "listening")
            }
            None => tracing::warn!(listener = %l.name, "listening (address unknown)"),
        }
        let bind = l.bind;
        let at = sockets.first().map(accepting).unwrap_or_default();
        let current = Arc::new(ArcSwap::new(l));
        let stop = self.shutdown.child_token();
        let tasks = sockets
            .into_iter()
            .enumerate()
            .map(|(worker, socket)| {
                let (current, shared, stop) = (current.clone(), shared.clone(), stop.clone());
                let seat = crate::workers::Seat::new(self.worker_stats.clone(), worker);
                workers.spawn(worker, async move {
                    // Registered with the worker's own runtime, which
                    // then drives every connection it accepts.
                    match TcpListener::from_std(socket) {
                        Ok(socket) => {
                            listener::accept_loop(current, socket, shared, stop, seat).await
                        }
                        Err(e) => {
                            let name = current.load().name.clone();
                            tracing::error!(listener = %name, worker, error = %e, "a worker cannot accept on the listener's socket: the other workers take its share")
                        }
                    }
                })
            })
            .collect();
        Running {
            bind,
            local: at,
            current,
            stop,
            tasks,
        }
    }

    /// The reload of `config` up to its swap, with nothing changed: the
    /// candidate built (with counters of its own, so no series appears),
    /// its CRLs checked against those in service without recording them,
    /// and the dry run `reload` makes and the guard reads. A candidate
    /// that does not build is the preview's `refused`.
    fn preview(&self, config: &Config, since: Option<Duration>) -> crate::preview::Preview {
        use crate::preview::{GuardCheck, Preview};
        let name = config.source.display().to_string();
        let state = match State::from_config(config) {
            Ok(s) => s,
            Err(e) => {
                let mut p = Preview::new(name, None);
                p.refused = Some(e.to_string());
                return p;
            }
        };
        let candidate = listeners_of(&state);
        let dry = self.registry.dry_run(&candidate);
        let mut p = Preview::new(name, Some(&dry));
        p.refused = self
            .crls
            .check(&served_crls(&state))
            .err()
            .map(|e| e.to_string());
        p.routes = crate::preview::route_changes(
            &self.registry.routes(),
            &registry::routes_of(&candidate),
        );
        p.guard = GuardCheck::judge(
            self.serving_max_reload_closes(),
            &p.would_close,
            self.brings_crl(&candidate),
        );
        p.since_seconds = since.map(|d| d.as_secs());
        p.seen_refused = crate::preview::seen_refused(&self.metrics.audit, &candidate, since);
        p
    }

    fn serving_max_reload_closes(&self) -> Option<usize> {
        *self
            .max_reload_closes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// `candidate` enforces a CRL the running state does not: news of
    /// revocation, which the reload guard never holds back.
    fn brings_crl(&self, candidate: &registry::Listeners) -> bool {
        let now: std::collections::HashSet<[u8; 32]> = self
            .registry
            .listeners()
            .values()
            .flat_map(|l| l.tls.crls().map(|c| c.digest))
            .collect();
        candidate
            .values()
            .flat_map(|l| l.tls.crls())
            .any(|c| !now.contains(&c.digest))
    }

    async fn reload(
        &self,
        config: &Config,
        revert_to: Option<u64>,
        force: bool,
        (running, workers): Serving<'_>,
        shared: &Shared,
    ) -> Result<ReloadReport, ReloadError> {
        let refused_crl = |e: &crl::CrlError| {
            if let Some(reason) = e.label() {
                self.metrics.crl_refused(reason);
            }
        };
        let state = State::build(config, &self.metrics).map_err(|e| {
            if let StateError::Listener {
                source: TlsError::Crl(c),
                ..
            } = &e
            {
                refused_crl(c);
            }
            ReloadError::Invalid(e.to_string())
        })?;
        // A replayed older CRL, or a file no longer holding the CRL it
        // held, would un-revoke: refuse the reload whole.
        self.crls.check(&served_crls(&state)).map_err(|e| {
            refused_crl(&e);
            ReloadError::Invalid(e.to_string())
        })?;
        // The dry run a preview shows: the guard counts it, and once the
        // states are published it is what closes connections.
        let candidate = listeners_of(&state);
        let dry = self.registry.dry_run(&candidate);
        // A revert to a revision without a CRL in service now would lift
        // its revocations: never automatically, by hand only when forced.
        if let Some(number) = revert_to
            && !force
        {
            let now = self.registry.listeners();
            let lifted: Vec<String> = candidate
                .iter()
                .filter_map(|(name, l)| Some((now.get(name)?, l)))
                .flat_map(|(now, l)| crl::lifted(now.tls.crls(), l.tls.crls()))
                .collect();
            if !lifted.is_empty() {
                self.metrics.crl_refused("withdrawn");
                return Err(ReloadError::Invalid(format!(
                    "revision {number} enforces no CRL of {} (in service now): reverting to it would lift those revocations; `gateway rollout revert {number} --force` does it on purpose",
                    lifted.join(", ")
                )));
            }
        }
        let check = crate::preview::GuardCheck::judge(
            self.serving_max_reload_closes(),
            &dry.closes(),
            self.brings_crl(&candidate),
        );
        if check.holds() {
            if !force {
                self.reload_stats
                    .guard_refused
                    .fetch_add(1, Ordering::Relaxed);
                return Err(ReloadError::Guarded(check));
            }
            self.reload_stats
                .guard_forced
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(reason = %check.refusal(), "reload guard overridden: forced");
        }
        // Bind what is new before touching anything, so a port in use leaves
        // the running state whole.
        let mut fresh = Vec::new();
        for l in &state.listeners {
            let same = running.get(&l.name).is_some_and(|r| r.bind == l.bind);
            if !same {
                // Every worker's socket, or none: a worker left out would
                // leave the kernel sending it clients nobody accepts.
                let sockets =
                    bind(l, self.workers).map_err(|e| ReloadError::Invalid(e.to_string()))?;
                fresh.push((l.clone(), sockets));
            }
        }
        // New backends are protected before any route can send to them (the
        // swap comes after); a failed update leaves the old state serving.
        match &self.guard {
            Some(guard) => guard.update(config),
            None => crate::guard::refuse_new_guard(config),
        }
        .map_err(|e| ReloadError::Invalid(e.to_string()))?;
        gate_backends(&state, self.guard.as_deref());
        let mut report = ReloadReport {
            trust_anchors: anchors_change(&self.registry.listeners(), &candidate),
            ..ReloadReport::default()
        };
        let keep: std::collections::HashSet<&str> =
            state.listeners.iter().map(|l| l.name.as_str()).collect();
        let gone: Vec<String> = running
            .iter()
            .filter(|(name, r)| {
                !keep.contains(name.as_str())
                    || fresh
                        .iter()
                        .any(|(l, _)| &l.name == *name && l.bind != r.bind)
            })
            .map(|(name, _)| name.clone())
            .collect();
        let mut stopping = Vec::new();
        for name in gone {
            if let Some(r) = running.remove(&name) {
                // Stop accepting; its live connections drain on their own.
                r.stop.cancel();
                stopping.extend(r.tasks);
                report.listeners_stopped.push(name);
            }
        }
        // Reported stopped once its sockets are closed (each loop drops its
        // own as it ends), not while a worker may still accept on one.
        for task in stopping {
            if tokio::time::timeout(LOOP_STOP, task).await.is_err() {
                tracing::warn!(
                    "an accept loop of a removed listener did not stop within {LOOP_STOP:?}; it stops when its worker next runs"
                );
            }
        }
        for l in &state.listeners {
            if let Some(r) = running.get(&l.name) {
                r.current.store(l.clone());
            }
        }
        for (l, sockets) in fresh {
            report.listeners_started.push(l.name.clone());
            let name = l.name.clone();
            running.insert(name, self.start(l, sockets, shared, workers));
        }
        let listening: Vec<SocketAddr> = running
            .values()
            .flat_map(|r| r.local.iter().copied())
            .collect();
        self.admission.configure(&config.admission, &listening);
        // After every swap and before re-verifying: a handshake that read
        // an older state sees the generation moved when it goes live and is
        // judged again then; one that went live before is in the snapshot.
        self.registry.publish(candidate, state.drain_timeout);
        report.connections_closed = self.registry.apply(dry);
        // Known sources stay known where the new state would admit them
        // again, and only there: a daily CRL that revokes no one forgets
        // no one (review 7 F8, review 10 R10-1, R10-3, R10-11).
        let listeners = self.registry.listeners();
        let forgotten =
            self.admission
                .revalidate(self.registry.generation().get(), |name, source, proof| {
                    listeners
                        .get(name)
                        .is_some_and(|l| crate::admission::still_admits(l, source, proof))
                });
        if forgotten > 0 {
            tracing::info!(
                forgotten,
                "admission: known sources this reload no longer trusts or allows are known no more"
            );
        }
        self.crls.record(&served_crls(&state));
        // Read at each request: a narrowed list applies to the next one.
        self.admin_clients
            .store(Arc::new(config.admin_clients.clone()));
        *self
            .max_reload_closes
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = config.max_reload_closes;
        Ok(report)
    }
}

/// The listeners serving, and the workers their loops run on.
type Serving<'a> = (
    &'a mut HashMap<String, Running>,
    &'a crate::workers::Workers,
);

/// A config to apply: asked for (a reload or a revert, answered on
/// `reply`) or decided by `auto_revert`.
struct Job {
    config: Config,
    how: How,
    revert_to: Option<u64>,
    /// Past the reload guard (`max_reload_closes`).
    force: bool,
    reply: Option<oneshot::Sender<Result<ReloadReport, ReloadError>>>,
}

/// `auto_revert`'s state in the run loop.
struct Rollback {
    started: tokio::time::Instant,
    samples: crate::revisions::Samples,
    /// The reload being watched, with the settings in force when it came.
    armed: Option<(crate::revisions::Armed, crate::revisions::AutoRevert)>,
    /// The serving config's `auto_revert`.
    settings: Option<crate::revisions::AutoRevert>,
}

impl Rollback {
    /// After a config was applied: a reload to a new revision is watched
    /// (with the settings of the config it replaced); a revert is never
    /// watched (no loop), and a reload that changed nothing leaves the
    /// watch as it is. Nor is a reload the operator meant beyond doubt
    /// (`unwatched` says why: forced, its own config turns auto_revert
    /// off, or it only removes trust anchors): failures an attacker can
    /// cause must not veto it.
    fn applied(
        &mut self,
        how: How,
        before: Option<u64>,
        now: Option<u64>,
        unwatched: Option<&str>,
        metrics: &Metrics,
    ) {
        if how == How::Reload && now.is_some() && now == before {
            return;
        }
        self.armed = None;
        if let (How::Reload, Some(_), Some(why)) = (how, self.settings, unwatched) {
            tracing::warn!(revision = ?now, "auto_revert: not watched: {why}");
            return;
        }
        let (How::Reload, Some(settings), Some(previous), Some(revision)) =
            (how, self.settings, before, now)
        else {
            return;
        };
        let at = self.started.elapsed().as_secs_f64();
        let count = metrics.trust_failures.load(Ordering::Relaxed);
        self.armed = Some((
            crate::revisions::Armed {
                at,
                count_at: count,
                baseline: self.samples.rate_before(at, count, settings.window),
                revision,
                previous,
            },
            settings,
        ));
    }
}

/// `POST /reload` and `POST /reload/preview` on the admin socket.
struct AdminReloads {
    handle: ReloadHandle,
    config_file: Option<PathBuf>,
}

fn answer(status: u16, body: impl serde::Serialize) -> crate::admin::Answer {
    crate::admin::Answer {
        status,
        body: serde_json::to_value(body).unwrap_or_default(),
    }
}

fn problem(status: u16, error: String) -> crate::admin::Answer {
    answer(status, serde_json::json!({ "error": error }))
}

impl crate::admin::Reloads for AdminReloads {
    fn reload(&self, force: bool) -> crate::admin::Answering<'_> {
        Box::pin(async move {
            let Some(path) = &self.config_file else {
                return problem(
                    409,
                    "the gateway was not started from a config file: nothing to read again".into(),
                );
            };
            tracing::info!(force, "reload requested on the admin socket");
            match self.handle.reload_file_forced(path, force).await {
                Ok(report) => answer(
                    200,
                    crate::admin::Reloaded {
                        listeners_started: report.listeners_started.clone(),
                        listeners_stopped: report.listeners_stopped.clone(),
                        connections_closed: report.connections_closed,
                        changes: report.to_string(),
                    },
                ),
                Err(e @ ReloadError::Guarded(_)) => problem(409, e.to_string()),
                Err(e @ ReloadError::ShuttingDown) => problem(503, e.to_string()),
                Err(e @ ReloadError::Invalid(_)) => problem(422, e.to_string()),
            }
        })
    }

    fn preview(&self, config: PathBuf, since: Option<Duration>) -> crate::admin::Answering<'_> {
        Box::pin(async move {
            // Read as a reload reads its file: relative paths in it
            // against its own directory.
            let candidate = match Config::load(&config) {
                Ok(c) => c,
                // What a reload of that file would say: refused.
                Err(e) => {
                    let mut p = crate::preview::Preview::new(config.display().to_string(), None);
                    p.refused = Some(e.to_string());
                    return answer(200, p);
                }
            };
            match self.handle.preview(candidate, since).await {
                Ok(p) => answer(200, p),
                Err(e) => problem(503, e.to_string()),
            }
        })
    }
}

/// A state's listeners by name, as the registry holds them.
fn listeners_of(state: &State) -> registry::Listeners {
    state
        .listeners
        .iter()
        .map(|l| (l.name.clone(), l.clone()))
        .collect()
}

/// What a reload does to the CAs each listener trusts (its `client_ca`
/// and its routes' `trust` bundles), as `auto_revert` weighs it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AnchorChange {
    /// The same CAs, listener by listener: the reload cannot have broken a
    /// certificate check (revocations and policy are not what
    /// `auto_revert` counts), so failures after it are not its doing. A
    /// certificate-check failure is anyone's to cause: watching such a
    /// reload would let a peer undo a narrowing or a switch to enforce.
    #[default]
    Same,
    /// Some removed, none added: a deliberate withdrawal (a compromised CA
    /// taken out), which the removed CA's holders could otherwise undo
    /// just by connecting.
    OnlyRemoved,
    /// Added, or replaced (some removed, some added): how a broken bundle
    /// looks. Watched.
    Other,
}

/// Per listener: a CA taken off one listener while another still trusts
/// it is a withdrawal there all the same; a new listener's CAs are added.
fn anchors_change(now: &registry::Listeners, candidate: &registry::Listeners) -> AnchorChange {
    use std::collections::HashSet;
    let anchors = |ls: &registry::Listeners| -> HashSet<(String, Vec<u8>, Vec<u8>)> {
        ls.iter()
            .flat_map(|(name, l)| {
                l.tls
                    .trust_anchors()
                    .map(move |(s, k)| (name.clone(), s.to_vec(), k.to_vec()))
            })
            .collect()
    };
    let (now, candidate) = (anchors(now), anchors(candidate));
    if candidate == now {
        AnchorChange::Same
    } else if candidate.is_subset(&now) {
        AnchorChange::OnlyRemoved
    } else {
        AnchorChange::Other
    }
}

/// Hostname backends resolve at connect time: the guard protects each
/// address before the gateway uses it.
fn gate_backends(state: &State, guard: Option<&crate::guard::Guard>) {
    if let Some(guard) = guard {
        for l in &state.listeners {
            for r in &l.routes {
                r.backends.gate_with(guard.gate());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::revisions::AutoRevert;

    fn rollback(settings: Option<AutoRevert>) -> Rollback {
        Rollback {
            started: tokio::time::Instant::now(),
            samples: crate::revisions::Samples::default(),
            armed: None,
            settings,
        }
    }

    const ON: AutoRevert = AutoRevert {
        window: Duration::from_secs(60),
        factor: 10.0,
        min_failures: 10,
    };

    /// (revision watched, the one it would go back to).
    fn watched(r: &Rollback) -> Option<(u64, u64)> {
        r.armed.as_ref().map(|(a, _)| (a.revision, a.previous))
    }

    #[tokio::test]
    async fn an_accept_loop_that_panicked_is_said_once_and_keeps_the_gateway_unready() {
        let live = tokio::spawn(std::future::pending::<()>());
        let panicked = tokio::spawn(async { panic!("an accept loop's bug") });
        while !panicked.is_finished() {
            tokio::task::yield_now().await;
        }
        let tasks = vec![live, panicked];
        let serving = CancellationToken::new();
        let mut said = std::collections::HashSet::new();
        let listeners = || std::iter::once(("edge", &serving, tasks.as_slice()));
        let why = dead_loops(listeners(), &mut said);
        assert_eq!(
            why.as_deref(),
            Some("listener edge: worker 1's accept loop ended")
        );
        assert_eq!(said.len(), 1);
        // Still unready at the next look, not said again.
        assert!(dead_loops(listeners(), &mut said).is_some());
        assert_eq!(said.len(), 1);
        // A listener being stopped ends its loops: no fault.
        serving.cancel();
        assert_eq!(dead_loops(listeners(), &mut said), None);
        // A listener gone is forgotten.
        assert_eq!(dead_loops(std::iter::empty(), &mut said), None);
        assert!(said.is_empty());
    }

    #[tokio::test]
    async fn a_reload_is_watched_a_revert_never_and_a_newer_reload_replaces_the_watch() {
        let metrics = Metrics::default();
        let mut r = rollback(Some(ON));
        r.applied(How::Reload, Some(1), Some(2), None, &metrics);
        assert_eq!(watched(&r), Some((2, 1)));
        // A reload that changed nothing (the same revision) keeps watching.
        r.applied(How::Reload, Some(2), Some(2), None, &metrics);
        assert_eq!(watched(&r), Some((2, 1)));
        // A newer reload: the watch moves to it, and would go back to 2,
        // never past it to 1.
        r.applied(How::Reload, Some(2), Some(3), None, &metrics);
        assert_eq!(watched(&r), Some((3, 2)));
        // A revert, by hand or automatic, is never watched: no loop.
        for how in [How::Revert, How::AutoRevert] {
            r.applied(How::Reload, Some(3), Some(4), None, &metrics);
            r.applied(how, Some(4), Some(5), None, &metrics);
            assert_eq!(watched(&r), None, "{how:?}");
        }
        // No history written (no revision number): nothing to go back to.
        r.applied(How::Reload, Some(5), None, None, &metrics);
        assert_eq!(watched(&r), None);
        // auto_revert off in the config serving before the reload.
        let mut off = rollback(None);
        off.applied(How::Reload, Some(1), Some(2), None, &metrics);
        assert_eq!(watched(&off), None);
    }

    #[tokio::test]
    async fn a_reload_the_operator_meant_beyond_doubt_is_never_watched() {
        let metrics = Metrics::default();
        let mut r = rollback(Some(ON));
        r.applied(How::Reload, Some(1), Some(2), None, &metrics);
        assert_eq!(watched(&r), Some((2, 1)));
        // Forced, switching auto_revert off, only removing trust anchors:
        // not watched, and the earlier watch ends (it no longer serves).
        for why in [
            "forced",
            "turns auto_revert off",
            "only removes trust anchors",
        ] {
            r.applied(How::Reload, Some(1), Some(2), None, &metrics);
            r.applied(How::Reload, Some(2), Some(3), Some(why), &metrics);
            assert_eq!(watched(&r), None, "{why}");
        }
    }
}

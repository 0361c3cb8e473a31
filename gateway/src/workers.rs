//! The accept workers (`workers`): one accept loop per worker and
//! listener, each on a listening socket of its own that the kernel
//! balances connections across (`SO_REUSEPORT`), each worker a
//! current-thread runtime, so a connection lives its whole life on the
//! thread that accepted it: no work stealing, no cross-core wake-ups.
//!
//! Every worker is a thread started here. The runtime the app runs on (in
//! `gateway run`, the main thread's) keeps the control plane: the admin
//! endpoint, signals, reloads and the fleet watch. A reload builds and
//! re-judges synchronously (certificates, CRLs, every live connection), so
//! on a worker's thread it would stall that worker's connections for as
//! long. Everything the workers decide with is shared, not
//! copied: the registry, admission (slots, per-source tallies, the block
//! list), the listener's state behind one `ArcSwap`, the metrics and the
//! access log; the stop and close tokens reach every worker.
//!
//! The threads are started by `App::run`, after any privilege drop:
//! capabilities are per thread and a new thread inherits its creator's, so
//! a worker started after the drop holds no more than the main thread kept.

use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::Exposition;

/// How long a worker's runtime waits for its blocking pool as it ends.
const RUNTIME_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(1);

/// The kernel's accept queue per listening socket, as tokio's own bind uses.
const BACKLOG: i32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot bind {bind}: {source}")]
    Bind {
        bind: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "cannot set SO_REUSEPORT on a socket for {bind}, which workers = {workers} needs to give each worker a listening socket of its own: {source} (workers = 1 needs none)"
    )]
    Reuseport {
        bind: SocketAddr,
        workers: usize,
        source: std::io::Error,
    },
    #[error(
        "cannot steer {bind}'s connections to the workers' own sockets (SO_ATTACH_REUSEPORT_CBPF): {source}"
    )]
    Steer {
        bind: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "another process listens where {bind} accepts, and would take a share of its clients: {foreign}; stop it (`ss -ltnpe 'sport = :{port}'` names it), or use workers = 1, which shares the port with nobody",
        port = bind.port(),
        foreign = list(foreign)
    )]
    Foreign {
        bind: SocketAddr,
        foreign: Vec<Foreign>,
    },
    #[error(
        "cannot check that no other process listens where {bind} accepts (sock_diag): {source}; workers = 1 shares the port with nobody and needs no check"
    )]
    Check {
        bind: SocketAddr,
        source: std::io::Error,
    },
    #[error("worker {worker}: cannot start its thread or runtime: {source}")]
    Start {
        worker: usize,
        source: std::io::Error,
    },
}

/// How many workers when the config does not say: one per CPU the process
/// may run on (its affinity mask, and a cgroup's CPU quota), at most
/// `MAX_WORKERS`.
pub fn count(configured: Option<NonZeroUsize>) -> NonZeroUsize {
    let most = NonZeroUsize::new(crate::config::MAX_WORKERS).unwrap_or(NonZeroUsize::MIN);
    configured
        .or_else(|| std::thread::available_parallelism().ok())
        .unwrap_or(NonZeroUsize::MIN)
        .min(most)
}

/// One listening socket per worker on `addr`, non-blocking, listening.
/// With more than one worker they share the port through `SO_REUSEPORT`;
/// a socket that cannot have it fails the bind (never fewer sockets than
/// workers, never a worker silently left out).
///
/// `SO_REUSEPORT` would also let the sockets join a group another process
/// of the same user already listens in, splitting its clients with it: so
/// the port is first bound without it, which fails as a port in use does
/// without workers, and only then shared. Once they listen, a program
/// steers each new connection to one of these sockets (another process of
/// the user could still join the group: it gets none), and no other
/// process may listen where they accept (see `foreign_listeners`: such a
/// socket, there in the moment between the probe and the last listen, or
/// bound to a narrower address, would take clients the steering cannot).
pub fn bind(
    addr: SocketAddr,
    workers: NonZeroUsize,
) -> Result<Vec<std::net::TcpListener>, WorkerError> {
    let bind_err = |bind, source| WorkerError::Bind { bind, source };
    let n = workers.get();
    if n == 1 {
        return Ok(vec![listen(addr, false).map_err(|e| bind_err(addr, e))?]);
    }
    // The probe: it conflicts with any socket bound there, reuseport or not.
    let probe = socket(addr).map_err(|e| bind_err(addr, e))?;
    probe.bind(&addr.into()).map_err(|e| bind_err(addr, e))?;
    let addr = probe
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or_else(|| bind_err(addr, std::io::Error::other("no local address after bind")))?;
    drop(probe);
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = socket(addr).map_err(|e| bind_err(addr, e))?;
        socket
            .set_reuse_port(true)
            .map_err(|source| WorkerError::Reuseport {
                bind: addr,
                workers: n,
                source,
            })?;
        socket.bind(&addr.into()).map_err(|e| bind_err(addr, e))?;
        socket.listen(BACKLOG).map_err(|e| bind_err(addr, e))?;
        sockets.push(socket.into());
    }
    if let Some(first) = sockets.first() {
        steer(first, n).map_err(|source| WorkerError::Steer { bind: addr, source })?;
    }
    let ours = inodes(&sockets);
    let at = accepting(addr, sockets.first());
    let foreign = foreign_listeners(&at, &ours)
        .map_err(|source| WorkerError::Check { bind: addr, source })?;
    if !foreign.is_empty() {
        return Err(WorkerError::Foreign {
            bind: addr,
            foreign,
        });
    }
    Ok(sockets)
}

/// Attaches to the `SO_REUSEPORT` group of `socket` a classic BPF program
/// that picks one of its first `n` sockets (the workers', which joined it
/// first and in order) at random for each new connection. Without it the
/// kernel picks by a hash over every socket of the group: another process
/// of the same user that joined later would get its share, and a client
/// choosing its source ports could aim its handshakes at one worker.
fn steer(socket: &std::net::TcpListener, n: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let n = u32::try_from(n).map_err(std::io::Error::other)?;
    // A = a random u32 (SKF_AD_RANDOM); A %= n; return A: an index into
    // the group's sockets.
    let mut program = [
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: (libc::SKF_AD_OFF + libc::SKF_AD_RANDOM) as u32,
        },
        libc::sock_filter {
            code: (libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: n,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_A) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        },
    ];
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: the fd is the listener's, open while it is borrowed; the
    // kernel copies the `len` instructions `fprog` points at, which live
    // on this stack frame for the whole call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&raw const fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The socket inode of each of `sockets` (as sock_diag and
/// `/proc/<pid>/fd` name them).
pub fn inodes(sockets: &[std::net::TcpListener]) -> Vec<u64> {
    use std::os::fd::AsRawFd as _;
    sockets
        .iter()
        .filter_map(|s| socket_inode(&format!("/proc/self/fd/{}", s.as_raw_fd())))
        .collect()
}

/// The inode of the socket a `/proc/<pid>/fd/<n>` link points at.
fn socket_inode(link: &str) -> Option<u64> {
    let target = std::fs::read_link(link).ok()?;
    target
        .to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Where a listening socket bound at `addr` accepts connections: its
/// address, canonical (an IPv4-mapped IPv6 address takes IPv4), and for a
/// dual-stack `[::]` also `0.0.0.0`. `socket` tells a `[::]` socket's
/// IPV6_V6ONLY; without one, `[::]` is taken as dual-stack.
pub fn accepting(addr: SocketAddr, socket: Option<&std::net::TcpListener>) -> Vec<SocketAddr> {
    let v6_only = socket
        .map(|s| socket2::SockRef::from(s).only_v6().unwrap_or(false))
        .unwrap_or(false);
    accepting_at(addr, v6_only)
}

fn accepting_at(addr: SocketAddr, v6_only: bool) -> Vec<SocketAddr> {
    let canonical = SocketAddr::new(addr.ip().to_canonical(), addr.port());
    let mut at = vec![canonical];
    if addr.is_ipv6() && addr.ip().is_unspecified() && !v6_only {
        at.push(SocketAddr::from(([0, 0, 0, 0], addr.port())));
    }
    at
}

/// Whether a connection could be meant for both: one port, one family,
/// and one address or a wildcard on either side.
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// A listening socket of another process where a listener accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Foreign {
    pub local: SocketAddr,
    pub uid: u32,
    pub inode: u64,
}

impl std::fmt::Display for Foreign {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (uid {}, socket inode {})",
            self.local, self.uid, self.inode
        )
    }
}

fn list(foreign: &[Foreign]) -> String {
    foreign
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The listening TCP sockets that would take connections meant for `at`
/// (a listener's `accepting` addresses) and that this process does not
/// hold. With its sockets in an `SO_REUSEPORT` group, the kernel lets any
/// process of the same user bind there too (`ours` are the listener's
/// own, which need no look in `/proc`): into the group, or to a narrower
/// address (127.0.0.1 under 0.0.0.0) or an IPv4 wildcard under a
/// dual-stack `[::]`, which the kernel prefers to the gateway's sockets.
pub fn foreign_listeners(at: &[SocketAddr], ours: &[u64]) -> std::io::Result<Vec<Foreign>> {
    let candidates: Vec<Foreign> = crate::sock_diag::tcp_listeners()?
        .into_iter()
        .filter(|s| !ours.contains(&u64::from(s.inode)))
        .filter(|s| {
            accepting_at(s.local, s.v6_only)
                .into_iter()
                .any(|theirs| at.iter().any(|&mine| overlap(mine, theirs)))
        })
        .map(|s| Foreign {
            local: s.local,
            uid: s.uid,
            inode: u64::from(s.inode),
        })
        .collect();
    if candidates.is_empty() {
        return Ok(candidates);
    }
    // Another listener of this gateway, or the one a reload is replacing:
    // held here, so not another process's.
    let held = held_sockets()?;
    Ok(candidates
        .into_iter()
        .filter(|f| !held.contains(&f.inode))
        .collect())
}

/// The inodes of every socket this process holds.
fn held_sockets() -> std::io::Result<std::collections::HashSet<u64>> {
    let mut held = std::collections::HashSet::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let path = entry?.path();
        if let Some(inode) = path.to_str().and_then(socket_inode) {
            held.insert(inode);
        }
    }
    Ok(held)
}

fn socket(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM.nonblocking().cloexec(),
        Some(socket2::Protocol::TCP),
    )?;
    // As tokio's bind: a restart is not refused for the last run's
    // TIME_WAIT connections.
    socket.set_reuse_address(true)?;
    Ok(socket)
}

fn listen(addr: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    let socket = socket(addr)?;
    socket.set_reuse_port(reuse_port)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// The running workers. Dropping this (a `run` aborted) ends the
/// workers' runtimes, and with them whatever still runs there.
pub struct Workers {
    workers: Vec<Worker>,
}

struct Worker {
    handle: Handle,
    exit: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Workers {
    /// Each worker gets a thread and a current-thread runtime.
    pub fn start(count: NonZeroUsize) -> Result<Workers, WorkerError> {
        let mut workers = Vec::with_capacity(count.get());
        for worker in 0..count.get() {
            let start = |source| WorkerError::Start { worker, source };
            let exit = CancellationToken::new();
            let (tx, rx) = std::sync::mpsc::channel();
            let until = exit.clone();
            let thread = std::thread::Builder::new()
                .name(format!("gateway-w{worker}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = tx.send(Ok(runtime.handle().clone()));
                    runtime.block_on(until.cancelled());
                    // Its tasks end with it; a blocking call still running
                    // in its pool gets a moment, not the shutdown's hold.
                    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
                })
                .map_err(start)?;
            let handle = rx
                .recv()
                .map_err(|_| {
                    start(std::io::Error::other(
                        "the thread ended before its runtime started",
                    ))
                })?
                .map_err(start)?;
            workers.push(Worker {
                handle,
                exit,
                thread: Some(thread),
            });
        }
        Ok(Workers { workers })
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Runs `task` on `worker` (taken modulo their number: there is always
    /// one).
    pub fn spawn<F>(&self, worker: usize, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self.workers.get(worker % self.workers.len().max(1)) {
            Some(w) => w.handle.spawn(task),
            // `start` makes at least one; were there none, the caller's
            // runtime serves rather than nobody.
            None => tokio::spawn(task),
        }
    }

    /// Ends the workers' runtimes (after the drain: whatever still runs
    /// there is dropped) and waits for their threads.
    pub async fn stop(mut self) {
        let threads: Vec<_> = self
            .workers
            .iter_mut()
            .filter_map(|w| {
                w.exit.cancel();
                w.thread.take()
            })
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for w in &self.workers {
            w.exit.cancel();
        }
    }
}

/// Per worker: connections admitted, and open now (from admission to
/// close, handshakes included). Per listener: other processes' sockets
/// found listening where it accepts (see `Watch`).
#[derive(Debug)]
pub struct Stats {
    workers: Vec<Counts>,
    foreign: std::sync::Mutex<std::collections::BTreeMap<String, ForeignCounts>>,
    checks_failed: AtomicU64,
}

#[derive(Debug, Default, Clone, Copy)]
struct ForeignCounts {
    now: u64,
    seen: u64,
}

#[derive(Debug, Default)]
struct Counts {
    admitted: AtomicU64,
    open: AtomicU64,
}

impl Stats {
    pub fn new(count: NonZeroUsize) -> Stats {
        Stats {
            workers: (0..count.get()).map(|_| Counts::default()).collect(),
            foreign: std::sync::Mutex::default(),
            checks_failed: AtomicU64::new(0),
        }
    }

    /// `gateway_worker_connections_total{worker}` and
    /// `gateway_worker_open_connections{worker}`.
    pub fn render_metrics(&self, out: &mut Exposition<'_>) -> std::fmt::Result {
        let each = |read: fn(&Counts) -> u64| {
            self.workers
                .iter()
                .enumerate()
                .map(move |(i, c)| ([("worker", i.to_string())], read(c)))
        };
        out.counter(
            "gateway_worker_connections_total",
            "Connections admitted to a handshake, by the worker that accepted them (the kernel spreads them over the workers' sockets).",
            each(|c| c.admitted.load(Ordering::Relaxed)),
        )?;
        out.gauge(
            "gateway_worker_open_connections",
            "Connections a worker holds now, from admission to close (handshakes included).",
            each(|c| c.open.load(Ordering::Relaxed)),
        )?;
        let foreign: Vec<(String, ForeignCounts)> = self
            .foreign
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default();
        out.gauge(
            "gateway_listener_foreign_sockets",
            "Other processes' sockets listening now where a listener with workers > 1 accepts (they could take its clients); /readyz is 503 while there is one.",
            foreign.iter().map(|(l, c)| ([("listener", l.clone())], c.now)),
        )?;
        out.counter(
            "gateway_listener_foreign_sockets_seen_total",
            "Other processes' sockets found listening where a listener with workers > 1 accepts, each counted once.",
            foreign.iter().map(|(l, c)| ([("listener", l.clone())], c.seen)),
        )?;
        out.counter(
            "gateway_listener_foreign_checks_failed_total",
            "Looks for other processes' listening sockets that could not be made (sock_diag); /readyz is 503 until one succeeds.",
            [(crate::metrics::NO_LABELS, self.checks_failed.load(Ordering::Relaxed))],
        )
    }
}

/// The once-a-second look for other processes listening where the
/// listeners accept (`foreign_listeners`): an error line for each socket
/// as it appears, a line as it goes, the metrics, and the reason `/readyz`
/// is 503 while any is there (or the look cannot be made).
#[derive(Debug, Default)]
pub struct Watch {
    alerted: std::collections::HashSet<(String, u64)>,
    failing: bool,
}

/// What one listener's look needs: where it accepts and its own sockets.
#[derive(Debug, Clone)]
pub struct Group {
    pub at: Vec<SocketAddr>,
    pub ours: Vec<u64>,
}

impl Watch {
    /// Looks at every `(listener, group)`; returns why the gateway is not
    /// ready, if it is not.
    pub fn look<'a>(
        &mut self,
        groups: impl Iterator<Item = (&'a str, &'a Group)>,
        stats: &Stats,
    ) -> Option<String> {
        let mut found: Vec<(String, Foreign)> = Vec::new();
        let mut listeners = Vec::new();
        let mut failed = None;
        for (listener, group) in groups {
            listeners.push(listener.to_owned());
            match foreign_listeners(&group.at, &group.ours) {
                Ok(f) => found.extend(f.into_iter().map(|f| (listener.to_owned(), f))),
                Err(e) => failed = Some(format!("listener {listener}: {e}")),
            }
        }
        if let Some(why) = &failed {
            stats.checks_failed.fetch_add(1, Ordering::Relaxed);
            if !self.failing {
                tracing::error!(error = %why, "cannot look for other processes listening where the listeners accept (sock_diag): not ready until it can");
            }
        } else if self.failing {
            tracing::info!("looking for other processes' listening sockets works again");
        }
        self.failing = failed.is_some();
        let now: std::collections::HashSet<(String, u64)> =
            found.iter().map(|(l, f)| (l.clone(), f.inode)).collect();
        let mut counts = stats.foreign.lock().unwrap_or_else(|p| p.into_inner());
        counts.retain(|l, _| listeners.contains(l));
        for l in &listeners {
            counts.entry(l.clone()).or_default().now = 0;
        }
        for (listener, f) in &found {
            let c = counts.entry(listener.clone()).or_default();
            c.now += 1;
            if !self.alerted.contains(&(listener.clone(), f.inode)) {
                c.seen += 1;
                tracing::error!(
                    listener = %listener,
                    socket = %f,
                    "another process listens where the listener accepts and can take a share of its clients: not ready while it does (stop it; `ss -ltnpe` names it)"
                );
            }
        }
        drop(counts);
        for (listener, inode) in self.alerted.difference(&now) {
            tracing::info!(listener = %listener, inode, "the other process's listening socket is gone");
        }
        self.alerted = now;
        if !found.is_empty() {
            Some(format!(
                "another process listens where a listener accepts: {}",
                found
                    .iter()
                    .map(|(l, f)| format!("listener {l}: {f}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        } else {
            failed.map(|why| format!("cannot look for other processes' listening sockets: {why}"))
        }
    }
}

/// What one worker's accept loops count into.
#[derive(Debug, Clone)]
pub struct Seat {
    stats: Arc<Stats>,
    worker: usize,
}

impl Seat {
    pub fn new(stats: Arc<Stats>, worker: usize) -> Seat {
        Seat { stats, worker }
    }

    pub fn worker(&self) -> usize {
        self.worker
    }

    /// A connection admitted here; open until the `Held` is dropped.
    pub fn admitted(&self) -> Held {
        if let Some(c) = self.stats.workers.get(self.worker) {
            c.admitted.fetch_add(1, Ordering::Relaxed);
            c.open.fetch_add(1, Ordering::Relaxed);
        }
        Held(self.clone())
    }
}

/// A connection open on a worker.
#[derive(Debug)]
pub struct Held(Seat);

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(c) = self.0.stats.workers.get(self.0.worker) {
            c.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two() -> NonZeroUsize {
        NonZeroUsize::new(2).unwrap()
    }

    #[test]
    fn workers_share_a_port_no_one_else_listens_on() {
        let sockets = bind("127.0.0.1:0".parse().unwrap(), two()).unwrap();
        assert_eq!(sockets.len(), 2);
        let addrs: Vec<_> = sockets.iter().filter_map(|s| s.local_addr().ok()).collect();
        assert_eq!(addrs.len(), 2);
        assert_eq!(addrs[0], addrs[1], "one port for every worker");
    }

    #[test]
    fn a_port_another_reuseport_socket_holds_is_in_use() {
        // Another process of this user sharing the port (a second gateway
        // started by mistake) must not get half the clients.
        let other = listen("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let addr = other.local_addr().unwrap();
        let err = bind(addr, two()).err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("cannot bind") && e.contains("in use")),
            "{err:?}"
        );
    }

    #[test]
    fn where_a_socket_accepts_and_what_overlaps_it() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            accepting_at(a("[::]:443"), false),
            [a("[::]:443"), a("0.0.0.0:443")]
        );
        assert_eq!(accepting_at(a("[::]:443"), true), [a("[::]:443")]);
        assert_eq!(
            accepting_at(a("[::ffff:127.0.0.1]:443"), false),
            [a("127.0.0.1:443")]
        );
        // A narrower address under the wildcard, and the wildcard over it.
        assert!(overlap(a("0.0.0.0:443"), a("127.0.0.1:443")));
        assert!(overlap(a("127.0.0.1:443"), a("0.0.0.0:443")));
        assert!(overlap(a("[::]:443"), a("[::1]:443")));
        assert!(overlap(a("127.0.0.1:443"), a("127.0.0.1:443")));
        // Another address, port or family takes nothing meant for it.
        assert!(!overlap(a("127.0.0.1:443"), a("127.0.0.2:443")));
        assert!(!overlap(a("0.0.0.0:443"), a("0.0.0.0:444")));
        assert!(!overlap(a("0.0.0.0:443"), a("[::]:443")));
    }

    #[test]
    fn the_workers_own_sockets_and_any_this_process_holds_are_not_foreign() {
        let sockets = bind("127.0.0.1:0".parse().unwrap(), two()).unwrap();
        let addr = sockets[0].local_addr().unwrap();
        let at = accepting(addr, sockets.first());
        let ours = inodes(&sockets);
        assert_eq!(ours.len(), 2);
        assert_eq!(foreign_listeners(&at, &ours).unwrap(), []);
        // Not the listener's own, but held here (a reload's old sockets).
        assert_eq!(foreign_listeners(&at, &[]).unwrap(), []);
    }

    #[test]
    fn a_held_connection_counts_until_dropped() {
        let stats = Arc::new(Stats::new(two()));
        let seat = Seat::new(stats.clone(), 1);
        let held = seat.admitted();
        let read = |i: usize| {
            let c = &stats.workers[i];
            (
                c.admitted.load(Ordering::Relaxed),
                c.open.load(Ordering::Relaxed),
            )
        };
        assert_eq!((read(0), read(1)), ((0, 0), (1, 1)));
        drop(held);
        assert_eq!(read(1), (1, 0));
    }
}

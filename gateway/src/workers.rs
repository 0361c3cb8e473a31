//! The accept workers (`workers`): one accept loop per worker and
//! listener, all on the listener's one listening socket (each worker
//! waits on a duplicate of it, and whichever wakes first accepts), each
//! worker a current-thread runtime, so a connection lives its whole life
//! on the thread that accepted it: no work stealing, no cross-core
//! wake-ups. Not `SO_REUSEPORT`: any process of the socket's owner could
//! join such a group and take a share of the clients (or replace the
//! group's steering program), which no check can close in time (attacker
//! review 8); one socket without it is the gateway's alone.
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

/// One listening socket on `addr`, non-blocking, listening, and a
/// duplicate of it for each further worker: every worker's runtime waits
/// on the same socket, so the port takes no other listener (the kernel
/// refuses any other bind there, whoever asks), and a connection goes to
/// whichever worker wakes first.
pub fn bind(
    addr: SocketAddr,
    workers: NonZeroUsize,
) -> Result<Vec<std::net::TcpListener>, WorkerError> {
    let bind_err = |bind, source| WorkerError::Bind { bind, source };
    let first = listen(addr).map_err(|e| bind_err(addr, e))?;
    let mut sockets = Vec::with_capacity(workers.get());
    for _ in 1..workers.get() {
        sockets.push(first.try_clone().map_err(|e| bind_err(addr, e))?);
    }
    sockets.insert(0, first);
    Ok(sockets)
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

fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket(addr)?;
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
/// close, handshakes included).
#[derive(Debug)]
pub struct Stats {
    workers: Vec<Counts>,
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
            "Connections admitted to a handshake, by the worker that accepted them (whichever free worker wakes first takes one).",
            each(|c| c.admitted.load(Ordering::Relaxed)),
        )?;
        out.gauge(
            "gateway_worker_open_connections",
            "Connections a worker holds now, from admission to close (handshakes included).",
            each(|c| c.open.load(Ordering::Relaxed)),
        )
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
        let other =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        other.set_reuse_port(true).unwrap();
        other
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        other.listen(8).unwrap();
        let addr = other.local_addr().unwrap().as_socket().unwrap();
        let err = bind(addr, two()).err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("cannot bind") && e.contains("in use")),
            "{err:?}"
        );
    }

    /// The socket an `SO_REUSEPORT` bind of `addr` would get, or its error.
    fn joiner(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.bind(&addr.into())?;
        s.listen(8)?;
        Ok(s)
    }

    #[test]
    fn no_socket_can_join_or_narrow_the_workers_port() {
        // Attacker review 8: with SO_REUSEPORT sockets, another socket of
        // the same user could join the group, or bind a narrower address
        // under the wildcard, and take clients.
        let sockets = bind("127.0.0.1:0".parse().unwrap(), two()).unwrap();
        let at = sockets[0].local_addr().unwrap();
        let err = joiner(at).err().map(|e| e.kind());
        assert_eq!(err, Some(std::io::ErrorKind::AddrInUse));
        let wide = bind("0.0.0.0:0".parse().unwrap(), two()).unwrap();
        let port = wide[0].local_addr().unwrap().port();
        for narrow in ["127.0.0.1", "127.0.0.2"] {
            let err = joiner(SocketAddr::new(narrow.parse().unwrap(), port))
                .err()
                .map(|e| e.kind());
            assert_eq!(err, Some(std::io::ErrorKind::AddrInUse), "{narrow}");
        }
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

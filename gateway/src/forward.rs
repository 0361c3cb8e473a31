//! What both forwarding paths share: how a transfer ended, and the idle
//! clock. The paths themselves are `offload::records` (userspace) and
//! `offload::splice` (kernel TLS).

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// How a transfer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Both sides closed their sending direction.
    Completed,
    /// No byte moved either way for this long.
    IdleTimeout(Duration),
    /// The gateway closed it: drain timeout, or continuous verification.
    Closed(String),
    /// A read or write failed.
    Error(String),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Completed => f.write_str("completed"),
            End::IdleTimeout(d) => write!(f, "idle timeout after {d:?}"),
            End::Closed(why) => write!(f, "closed by gateway: {why}"),
            End::Error(e) => write!(f, "transfer error: {e}"),
        }
    }
}

/// Why one direction of a transfer stopped before its end.
#[derive(Debug)]
pub(crate) struct Broken {
    pub(crate) why: String,
    /// The peer this direction reads from broke the TLS protocol: it is
    /// told so with this fatal alert before its connection closes.
    pub(crate) alert: Option<rustls::AlertDescription>,
    /// It failed writing to the peer this direction sends to, not reading
    /// from its own: the log names the side whose socket failed.
    pub(crate) writing: bool,
}

impl Broken {
    /// A failure writing to the destination (a reset by the receiver, say).
    pub(crate) fn writing(why: impl Into<String>) -> Self {
        Broken {
            why: why.into(),
            alert: None,
            writing: true,
        }
    }

    /// A protocol error by the peer being read, answered with `alert`.
    pub(crate) fn protocol(alert: rustls::AlertDescription, why: impl Into<String>) -> Self {
        Broken {
            why: why.into(),
            alert: Some(alert),
            writing: false,
        }
    }
}

impl From<String> for Broken {
    fn from(why: String) -> Self {
        Broken {
            why,
            alert: None,
            writing: false,
        }
    }
}

impl From<&str> for Broken {
    fn from(why: &str) -> Self {
        Broken::from(why.to_owned())
    }
}

/// One side of a transfer, as the end of the transfer sees it.
pub(crate) trait Leg {
    /// Ends this side after anything but a completed transfer, so its peer
    /// can tell the stream was cut: a TLS peer that broke the protocol gets
    /// `alert` (where the stream is at a record boundary); every other peer
    /// gets a reset, never the FIN or close_notify of an orderly end.
    fn abort(&self, alert: Option<rustls::AlertDescription>);
}

/// The bytes a live connection has moved each way and the path they take,
/// written by its forwarder as they move and read by `GET /connections`
/// (it lives in the registry's entry: 24 bytes, no allocation of its own).
#[derive(Debug, Default)]
pub struct Moved {
    pub client_to_backend: AtomicU64,
    pub backend_to_client: AtomicU64,
    /// 0: no path yet (connecting), then `PATH_KERNEL` or `PATH_USERSPACE`.
    path: AtomicU8,
}

const PATH_KERNEL: u8 = 1;
const PATH_USERSPACE: u8 = 2;

impl Moved {
    /// Which path the transfer takes: "kernel" (kTLS + splice) or
    /// "userspace", as the access log's `offload` names it.
    pub fn set_path(&self, kernel: bool) {
        let path = if kernel { PATH_KERNEL } else { PATH_USERSPACE };
        self.path.store(path, Ordering::Relaxed);
    }

    pub fn path(&self) -> Option<&'static str> {
        match self.path.load(Ordering::Relaxed) {
            PATH_KERNEL => Some("kernel"),
            PATH_USERSPACE => Some("userspace"),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Transfer {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
    pub end: End,
}

/// Waits until `s` is readable. Unlike `TcpStream::readable()`, whose
/// future holds a wait-queue entry (152 bytes at every await point, kept by
/// every idle connection), this leaves the waker in the socket's own
/// registration. Each direction of a socket is waited on by one task only.
pub(crate) async fn read_ready(s: &TcpStream) -> std::io::Result<()> {
    std::future::poll_fn(|cx| s.poll_read_ready(cx)).await
}

/// Waits until `s` is writable; see [`read_ready`].
pub(crate) async fn write_ready(s: &TcpStream) -> std::io::Result<()> {
    std::future::poll_fn(|cx| s.poll_write_ready(cx)).await
}

/// Moves bytes both ways, `pump(src, dst, moved, activity)` once per
/// direction, until both directions end, the connection idles out, or
/// `close` fires (then `why` says what closed it). Both forwarding paths
/// are this with their own pump. Any end but a completed one aborts both
/// sides (`Leg::abort`).
///
/// An `async` block, not an `async fn`: an async fn keeps its arguments
/// twice (as arguments and as the locals they move into), 160 bytes per
/// live connection here.
#[allow(clippy::manual_async_fn)]
///
/// `moved` counts the bytes each way as they go (the registry's entry for
/// the connection, so `GET /connections` sees them while it lives).
pub(crate) fn both_ways<'m, S, P>(
    client: S,
    backend: S,
    idle: Duration,
    close: tokio_util::sync::CancellationToken,
    why: impl FnOnce() -> String + 'm,
    pump: P,
    moved: &'m Moved,
) -> impl std::future::Future<Output = Transfer> + 'm
where
    S: Leg + 'm,
    P: AsyncFn(&S, &S, &AtomicU64, &Activity) -> Result<(), Broken> + 'm,
{
    async move {
        let activity = Activity::new();
        let from_client = &moved.client_to_backend;
        let from_backend = &moved.backend_to_client;
        let both = std::pin::pin!(async {
            tokio::try_join!(
                async {
                    let r = pump(&client, &backend, from_client, &activity).await;
                    symptom_waits(r, &activity)
                        .await
                        .map_err(|b| (Peer::Client, b))
                },
                async {
                    let r = pump(&backend, &client, from_backend, &activity).await;
                    symptom_waits(r, &activity)
                        .await
                        .map_err(|b| (Peer::Backend, b))
                },
            )
        });
        let (end, culprit) = until_done(both, &activity, idle, close, why).await;
        if end != End::Completed {
            let alert_for = |peer| culprit.filter(|(p, _)| *p == peer).map(|(_, a)| a);
            client.abort(alert_for(Peer::Client));
            backend.abort(alert_for(Peer::Backend));
        }
        Transfer {
            client_to_backend: from_client.load(Ordering::Relaxed),
            backend_to_client: from_backend.load(Ordering::Relaxed),
            end,
        }
    }
}

/// How long a direction that failed writing to a peer waits for the other
/// direction, the one reading from that peer, to say why.
const CAUSE_GRACE: Duration = Duration::from_millis(100);

/// A direction that failed writing to a peer has often seen only the
/// symptom (a broken pipe, a reset) of what the other direction is about to
/// read from that same peer: its fatal alert, say a backend's
/// `certificate_required` after a TLS 1.3 handshake the gateway thought
/// complete. So a write failure is held back for `CAUSE_GRACE`, and a
/// reading failure of the other direction in that time is what the transfer
/// ends with. The wait is bounded, and a close or the idle timeout still
/// cuts it short (`until_done`). Meanwhile the other direction may still
/// move what it reads, but never ends in order (`Activity::unless_failed`): the
/// failed write took the socket's pending reset, so the peer's next read
/// there returns 0 as if it had closed, and a half-close passed on would
/// tell the other side a cut stream was whole (`Activity::unless_failed`).
async fn symptom_waits(r: Result<(), Broken>, activity: &Activity) -> Result<(), Broken> {
    if r.is_err() {
        activity.fail();
    }
    if let Err(b) = &r
        && b.writing
    {
        // Boxed: this wait comes once in a connection's life, if at all;
        // inline, its timer would be part of every live connection's task.
        Box::pin(tokio::time::sleep(CAUSE_GRACE)).await;
    }
    r
}

/// Runs `both` directions of a transfer until they end, the connection
/// idles out, or `close` fires (then `why` says what closed it). Both
/// forwarding paths end their connections through here.
///
/// `both` comes pinned in the caller's frame: taken by value it would sit in
/// this future twice (as the argument and inside `select!`), about 900 bytes
/// more per live connection for the connection's whole life.
async fn until_done<F>(
    both: std::pin::Pin<&mut F>,
    activity: &Activity,
    idle: Duration,
    close: tokio_util::sync::CancellationToken,
    why: impl FnOnce() -> String,
) -> (End, Option<(Peer, rustls::AlertDescription)>)
where
    F: std::future::Future<Output = Result<((), ()), (Peer, Broken)>>,
{
    tokio::select! {
        // The close first: a connection closed before (or while) it was
        // polled must not move a byte more, as an unbiased pick could.
        biased;
        () = close.cancelled() => (End::Closed(why()), None),
        r = both => match r {
            Ok(_) => (End::Completed, None),
            Err((peer, broken)) => (
                End::Error(format!(
                    "{}: {} {}: {}",
                    peer.describe(),
                    if broken.writing { "writing to" } else { "reading from" },
                    if broken.writing { peer.other() } else { peer }.name(),
                    broken.why
                )),
                broken.alert.map(|a| (peer, a)),
            ),
        },
        () = activity.idle_for(idle) => (End::IdleTimeout(idle), None),
    }
}

/// Which peer a direction reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peer {
    Client,
    Backend,
}

impl Peer {
    fn other(self) -> Peer {
        match self {
            Peer::Client => Peer::Backend,
            Peer::Backend => Peer::Client,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Peer::Client => "the client",
            Peer::Backend => "the backend",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Peer::Client => "client → backend",
            Peer::Backend => "backend → client",
        }
    }
}

/// When bytes last moved either way, for the idle timeout. Shared by the
/// userspace record layer and the kernel splice path.
pub(crate) struct Activity {
    clock: Instant,
    /// Milliseconds after `clock`.
    last: AtomicU64,
    /// A direction failed: the transfer ends in resets, and the other
    /// direction must not end in order (close_notify, FIN) meanwhile.
    failed: std::sync::atomic::AtomicBool,
}

impl Activity {
    pub(crate) fn new() -> Self {
        Self {
            clock: Instant::now(),
            last: AtomicU64::new(0),
            failed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub(crate) fn fail(&self) {
        self.failed.store(true, Ordering::Relaxed);
    }

    /// Called by a direction about to end in order (pass on a close).
    /// If the other direction already failed, this never returns: the
    /// transfer ends with that failure (both sides reset, the failure as
    /// the reason) once its `CAUSE_GRACE` is over, not in order.
    pub(crate) async fn unless_failed(&self) {
        if self.failed.load(Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
    }

    pub(crate) fn touch(&self) {
        let ms = u64::try_from(self.clock.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `idle`.
    pub(crate) async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.clock + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One side of a transfer, with nothing behind it.
    struct Side {
        backend: bool,
    }

    impl Leg for Side {
        fn abort(&self, _: Option<rustls::AlertDescription>) {}
    }

    /// A transfer whose client direction fails writing to the backend (the
    /// symptom) and whose backend direction fails `after` with `backend_says`.
    async fn transfer(after: Duration, backend_says: Broken) -> End {
        let backend_says = std::sync::Mutex::new(Some(backend_says));
        let pump = async |src: &Side, _: &Side, _: &AtomicU64, _: &Activity| {
            if !src.backend {
                return Err(Broken::writing("Broken pipe (os error 32)"));
            }
            tokio::time::sleep(after).await;
            let said = backend_says.lock().ok().and_then(|mut s| s.take());
            Err(said.unwrap_or_else(|| Broken::from("said twice")))
        };
        let moved = Moved::default();
        both_ways(
            Side { backend: false },
            Side { backend: true },
            Duration::from_secs(60),
            tokio_util::sync::CancellationToken::new(),
            String::new,
            pump,
            &moved,
        )
        .await
        .end
    }

    /// A backend that refuses the gateway (a TLS 1.3 backend's
    /// certificate_required comes after the gateway's side of the handshake
    /// is over) shows first as a broken pipe to the direction writing to
    /// it; the log names the alert it sent, not the broken pipe.
    #[tokio::test]
    async fn a_write_failure_gives_way_to_what_the_peer_said() {
        let alert = "peer sent fatal TLS alert CertificateRequired";
        let end = transfer(Duration::from_millis(10), Broken::from(alert)).await;
        assert_eq!(
            end,
            End::Error(format!(
                "backend → client: reading from the backend: {alert}"
            ))
        );
    }

    /// The wait for a cause is bounded: a peer that says nothing more
    /// leaves the write failure as the reason, after `CAUSE_GRACE`.
    #[tokio::test]
    async fn a_write_failure_is_reported_when_no_cause_follows() {
        let start = Instant::now();
        let late = Broken::from("peer sent fatal TLS alert CertificateRequired");
        let end = transfer(Duration::from_secs(30), late).await;
        let waited = start.elapsed();
        assert_eq!(
            end,
            End::Error(
                "client → backend: writing to the backend: Broken pipe (os error 32)".into()
            )
        );
        assert!(
            waited >= CAUSE_GRACE && waited < Duration::from_secs(10),
            "{waited:?}"
        );
        // Another write failure is no cause either.
        let end = transfer(Duration::from_millis(5), Broken::writing("reset")).await;
        assert!(
            matches!(&end, End::Error(e) if e.contains("Broken pipe")),
            "{end:?}"
        );
    }

    /// Review 5, S5-1: README ("A reset mid-stream by either side ends the
    /// other with a reset too (never an orderly end that would pass a cut
    /// stream for a whole one)"). With `CAUSE_GRACE`, a direction whose
    /// write met the backend's reset waits 100 ms while the other direction
    /// goes on; but the write took the socket's pending ECONNRESET, so that
    /// direction's next read of the backend returns 0, an end of stream:
    /// a plain backend's "EOF" is passed on as the client's orderly end
    /// (FIN here; close_notify and FIN to a TLS client, `records::pump`'s
    /// end, and `splice::half_close` on the kernel path). Only 100 ms later
    /// is the client reset, after it has taken the cut stream for a whole
    /// one. Steps: the backend streams to a client that does not read yet
    /// (the gateway's backend → client direction waits to write), then the
    /// backend dies with a reset; the client sends a byte (its request's
    /// next part: the gateway's write to the backend fails), then reads.
    /// Control: the same reset without the client's byte reaches the client
    /// as a reset, as before the grace. Measured before the fix: the
    /// client's `read_to_end` was `Ok` (an orderly end); faults.rs's
    /// backend-reset test failed 18 of 20 runs. Fixed: while a write
    /// failure is held, the other direction fails instead of passing on an
    /// end (`Activity::unless_failed`): the client is reset either way.
    #[tokio::test]
    async fn s5_1_a_backends_reset_reaches_the_client_as_an_orderly_end_once_a_write_met_it() {
        use crate::offload::records::{self, Side};
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        use tokio::net::{TcpListener, TcpSocket};

        const SMALL: u32 = 4096;
        /// A connection whose accepting end sends into, and whose
        /// connecting end receives from, small buffers: little is in
        /// flight, so a reader that stops stalls the writer soon.
        async fn pair() -> (TcpStream, TcpStream) {
            let l = TcpSocket::new_v4().unwrap();
            l.set_send_buffer_size(SMALL).unwrap();
            l.bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let l: TcpListener = l.listen(8).unwrap();
            let c = TcpSocket::new_v4().unwrap();
            c.set_recv_buffer_size(SMALL).unwrap();
            let (c, a) = tokio::join!(c.connect(l.local_addr().unwrap()), l.accept());
            (c.unwrap(), a.unwrap().0)
        }

        /// What the client's read to the end says, and the transfer's end.
        async fn run(client_writes: bool) -> (std::io::Result<usize>, End) {
            // client (connects, small receive buffer) ↔ gateway (accepted,
            // small send buffer); gateway (connects) ↔ backend (accepted).
            let (mut client, gw_client) = pair().await;
            let (gw_backend, backend) = pair().await;
            let moved: &'static Moved = Box::leak(Box::new(Moved::default()));
            let transfer = tokio::spawn(records::forward(
                Side::Plain(gw_client),
                Side::Plain(gw_backend),
                Duration::from_secs(30),
                tokio_util::sync::CancellationToken::new(),
                String::new,
                moved,
            ));
            // The backend streams until everything between it and the
            // client is full: the gateway waits to write to the client.
            let chunk = vec![7u8; 64 * 1024];
            let mut stalled = 0;
            while stalled < 20 {
                match backend.try_write(&chunk) {
                    Ok(_) => stalled = 0,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        stalled += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err(e) => panic!("backend write: {e}"),
                }
            }
            // The backend dies mid-response: a reset.
            backend.set_zero_linger().unwrap();
            drop(backend);
            tokio::time::sleep(Duration::from_millis(50)).await;
            if client_writes {
                client.write_all(b"x").await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let mut got = Vec::new();
            let read = client.read_to_end(&mut got).await;
            let end = transfer.await.unwrap().end;
            (read, end)
        }

        // Control: the reading direction finds the reset, and resets.
        let (read, end) = run(false).await;
        assert_eq!(
            read.as_ref().map_err(std::io::Error::kind).err(),
            Some(std::io::ErrorKind::ConnectionReset),
            "control: {read:?}, {end:?}"
        );
        assert!(
            matches!(&end, End::Error(e) if e.contains("reading from the backend")),
            "control: {end:?}"
        );
        // The client's write met the reset first: the client is reset too,
        // never given an orderly end; the log says the transfer failed.
        let (read, end) = run(true).await;
        assert_eq!(
            read.as_ref().map_err(std::io::Error::kind).err(),
            Some(std::io::ErrorKind::ConnectionReset),
            "{read:?} ({end:?})"
        );
        assert!(
            matches!(&end, End::Error(e) if e.contains("writing to the backend")),
            "{end:?}"
        );
    }
}

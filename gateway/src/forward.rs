//! Moving bytes between the client's TLS stream and the backend, in userspace.
//!
//! Both directions run at once with a bounded buffer each, so a slow reader
//! holds its writer back (backpressure) instead of growing memory. EOF on one
//! side shuts down writing on the other (half-close; on the TLS side that is
//! close_notify then FIN), and the other direction keeps flowing.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Per-direction buffer: large enough for full TLS records, small enough that
/// ten thousand idle connections cost little.
const BUFFER: usize = 16 * 1024;

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

#[derive(Debug, Clone)]
pub struct Transfer {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
    pub end: End,
}

/// Copies both ways until both directions are done, the connection idles out,
/// or `close` fires (then `why` says what closed it).
pub async fn copy<C, B>(
    client: C,
    backend: B,
    idle: Duration,
    close: CancellationToken,
    why: impl FnOnce() -> String,
) -> Transfer
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Arc::new(Activity::new());
    let from_client = Arc::new(AtomicU64::new(0));
    let from_backend = Arc::new(AtomicU64::new(0));
    let mut client = Metered::new(client, from_client.clone(), activity.clone());
    let mut backend = Metered::new(backend, from_backend.clone(), activity.clone());

    let copy = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut backend, BUFFER, BUFFER);
    let end = tokio::select! {
        r = copy => match r {
            Ok(_) => End::Completed,
            Err(e) => End::Error(describe_io(&e)),
        },
        () = activity.idle_for(idle) => End::IdleTimeout(idle),
        () = close.cancelled() => End::Closed(why()),
    };
    Transfer {
        client_to_backend: from_client.load(Ordering::Relaxed),
        backend_to_client: from_backend.load(Ordering::Relaxed),
        end,
    }
}

fn describe_io(e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        "peer closed the connection without close_notify".into()
    } else {
        e.to_string()
    }
}

/// When bytes last moved either way, for the idle timeout. Shared by the
/// userspace copy and the kernel splice path.
pub(crate) struct Activity {
    clock: Instant,
    /// Milliseconds after `clock`.
    last: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Self {
        Self {
            clock: Instant::now(),
            last: AtomicU64::new(0),
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

/// A stream that counts the bytes read from it and stamps activity both ways.
struct Metered<S> {
    inner: S,
    read: Arc<AtomicU64>,
    activity: Arc<Activity>,
}

impl<S> Metered<S> {
    fn new(inner: S, read: Arc<AtomicU64>, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            read,
            activity,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.fetch_add(n as u64, Ordering::Relaxed);
            self.activity.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_and_propagates_half_close() {
        let (client, mut client_peer) = tokio::io::duplex(1024);
        let (backend, mut backend_peer) = tokio::io::duplex(1024);
        let t = tokio::spawn(copy(
            client,
            backend,
            Duration::from_secs(5),
            CancellationToken::new(),
            String::new,
        ));
        client_peer.write_all(b"hello").await.unwrap();
        client_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        backend_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello", "client EOF reaches the backend as EOF");
        backend_peer.write_all(b"world!").await.unwrap();
        backend_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        client_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"world!");
        let t = t.await.unwrap();
        assert_eq!(
            (t.client_to_backend, t.backend_to_client, t.end),
            (5, 6, End::Completed)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_time_out() {
        let (client, _c) = tokio::io::duplex(64);
        let (backend, _b) = tokio::io::duplex(64);
        let t = copy(
            client,
            backend,
            Duration::from_secs(30),
            CancellationToken::new(),
            String::new,
        )
        .await;
        assert_eq!(t.end, End::IdleTimeout(Duration::from_secs(30)));
    }
}

//! Forwarding between two sockets inside the kernel: each direction splices
//! socket → pipe → socket. A kTLS side decrypts on the way out of its socket
//! and encrypts on the way in, so userspace never touches a payload byte.
//!
//! What splice will not move, a kTLS socket's control records (alerts,
//! post-handshake messages), is read with `recvmsg` and handled here:
//! close_notify becomes a half-close towards the other side; anything the
//! kernel cannot take (a KeyUpdate) ends the connection with a reason.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use rustls::{AlertDescription, ContentType};

use super::post_handshake::{Control, PeerRules};
use super::{KernelLeg, sys};
use crate::forward::{self, Activity, Broken, Moved, Transfer, read_ready, write_ready};

const ALERT: u8 = 21;
const APPLICATION_DATA: u8 = 23;
const CLOSE_NOTIFY: u8 = 0;

/// One end of a kernel-path connection.
pub enum Side {
    Kernel(KernelLeg),
    Plain(TcpStream),
}

impl Side {
    fn stream(&self) -> &TcpStream {
        match self {
            Side::Kernel(k) => &k.stream,
            Side::Plain(s) => s,
        }
    }

    fn kernel(&self) -> Option<&KernelLeg> {
        match self {
            Side::Kernel(k) => Some(k),
            Side::Plain(_) => None,
        }
    }
}

/// Moves bytes both ways until both directions end, the connection idles
/// out, or `close` fires (then `why` says what closed it); `moved` counts
/// the bytes each way as they go.
pub fn forward<'m>(
    client: Side,
    backend: Side,
    idle: Duration,
    close: CancellationToken,
    why: impl FnOnce() -> String + 'm,
    moved: &'m Moved,
) -> impl Future<Output = Transfer> + 'm {
    forward::both_ways(client, backend, idle, close, why, pump, moved)
}

/// One direction: `src` → pipe → `dst`, then the half-close.
async fn pump(
    src: &Side,
    dst: &Side,
    moved: &AtomicU64,
    activity: &Activity,
) -> Result<(), Broken> {
    let pipe = sys::Pipe::new().map_err(|e| format!("pipe: {e}"))?;
    let capacity = pipe.capacity();
    let (from, to) = (src.stream(), dst.stream());

    if let Some(k) = src.kernel()
        && !k.early.is_empty()
    {
        // Boxed, like every rare step here: a pump's future is as large as
        // its largest await, and an idle connection keeps it.
        Box::pin(write_all(to, &k.early)).await?;
        moved.fetch_add(k.early.len() as u64, Ordering::Relaxed);
        activity.touch();
    }
    let mut open = !src.kernel().is_some_and(|k| k.peer_closed);
    // What a kernel-TLS peer may send besides data, judged as the record
    // layer judges it.
    let mut rules = src.kernel().map(|k| PeerRules::new(k.version, k.peer));
    while open {
        // A kTLS socket whose record parser refused a header reports only
        // an error (EPOLLERR, no EPOLLIN, on 6.12): its reader must wake on
        // errors too, and then run the splice that reports the error.
        let interest = match &rules {
            Some(_) => kernel_read_ready(from).await,
            None => read_ready(from).await.map(|()| Interest::READABLE),
        }
        .map_err(|e| format!("waiting to read: {e}"))?;
        let spliced = from.try_io(interest, || sys::splice(from, &pipe.write, capacity));
        let n = match spliced {
            Ok(0) => match &mut rules {
                None => break,
                // splice returns 0 for an empty record as for the end of the
                // stream: only the peer's FIN says which.
                Some(rules) if !peer_finished(from)? => {
                    rules.empty()?;
                    continue;
                }
                Some(_) => {
                    return Err(
                        "truncation: the sender closed the connection without close_notify".into(),
                    );
                }
            },
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => match &mut rules {
                Some(rules) => {
                    match Box::pin(control_record(from, to, rules, moved, activity)).await? {
                        Control::Closed => open = false,
                        Control::None => {}
                    }
                    continue;
                }
                None => return Err(describe(&e, false)),
            },
            Err(e) => return Err(describe(&e, rules.is_some())),
        };
        moved.fetch_add(n as u64, Ordering::Relaxed);
        activity.touch();
        if let Some(rules) = &mut rules {
            rules.data();
        }
        if let Some(k) = src.kernel() {
            check_records(k, sys::TLS_RX, capacity)?;
        }
        let mut left = n;
        while left > 0 {
            write_ready(to)
                .await
                .map_err(|e| Broken::writing(format!("waiting to write: {e}")))?;
            match to.try_io(Interest::WRITABLE, || sys::splice(&pipe.read, to, left)) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(Broken::writing(e.to_string())),
            }
        }
        activity.touch();
        if let Some(k) = dst.kernel() {
            check_records(k, sys::TLS_TX, capacity)?;
        }
    }
    activity.unless_failed().await;
    Box::pin(half_close(dst)).await
}

/// Waits until a kernel-TLS socket is readable or has an error, and says
/// which readiness to try the read under.
///
/// One interest, never a combination: tokio checks a combined interest
/// against nothing in `try_io`, which would then skip the read and spin.
async fn kernel_read_ready(s: &TcpStream) -> io::Result<Interest> {
    // Boxed, like every rare wait here: it holds a wait-queue entry that
    // plain readiness does not.
    let ready = Box::pin(s.ready(Interest::READABLE | Interest::ERROR)).await?;
    Ok(
        if ready.is_readable() || ready.is_read_closed() || !ready.is_error() {
            Interest::READABLE
        } else {
            Interest::ERROR
        },
    )
}

/// Whether the peer has sent its FIN.
fn peer_finished(s: &TcpStream) -> Result<bool, Broken> {
    sys::peer_finished(s).map_err(|e| format!("polling for the peer's FIN: {e}").into())
}

/// Reads the record that stopped splice (kTLS answers EINVAL when the next
/// record is not application data) and judges it with `rules`.
///
/// Such a record is already decrypted and waiting, so recvmsg has it at
/// once. When it does not, the kernel's record parser stopped on a header
/// it refused (a wrong version, say) and nothing will ever come: that is
/// the peer's protocol error, not a record to wait for.
async fn control_record(
    from: &TcpStream,
    to: &TcpStream,
    rules: &mut PeerRules,
    moved: &AtomicU64,
    activity: &Activity,
) -> Result<Control, Broken> {
    // A record is at most 2^14 bytes of plaintext (plus padding slack).
    let mut buf = vec![0u8; 16 * 1024 + 256];
    let (kind, n) = match sys::recv_record(from, &mut buf) {
        Ok(Some(x)) => x,
        Ok(None) => {
            return Err(Broken::protocol(
                AlertDescription::DecodeError,
                "peer sent a record the kernel refused to parse (malformed header)",
            ));
        }
        Err(e) => return Err(describe(&e, true)),
    };
    let Some(kind) = kind else {
        // Nothing was handed out: a stopped record parser (6.12 reads so
        // where 6.1 says EAGAIN).
        return Err(Broken::protocol(
            AlertDescription::DecodeError,
            "peer sent a record the kernel refused to parse (malformed header)",
        ));
    };
    let record = buf.get(..n).unwrap_or_default();
    if kind == APPLICATION_DATA {
        // Data after all (recvmsg found no control record): pass it on.
        if n == 0 {
            if peer_finished(from)? {
                return Err(
                    "truncation: the sender closed the connection without close_notify".into(),
                );
            }
            rules.empty()?;
            return Ok(Control::None);
        }
        rules.data();
        write_all(to, record).await?;
        moved.fetch_add(n as u64, Ordering::Relaxed);
        activity.touch();
        return Ok(Control::None);
    }
    rules.record(ContentType::from(kind), record)
}

/// Closes before a key has sealed or opened more records than its cipher
/// allows; the kernel would carry on.
fn check_records(leg: &KernelLeg, direction: libc::c_int, capacity: usize) -> Result<(), Broken> {
    // Headroom for one more full pipe of minimum-size records in flight.
    let margin = (capacity / 16384) as u64 + 8;
    let seq = sys::record_sequence(&leg.stream, direction, leg.layout_len)
        .map_err(|e| format!("reading the kernel's record sequence: {e}"))?;
    if seq.saturating_add(margin) >= leg.record_limit {
        let which = if direction == sys::TLS_TX {
            "sent"
        } else {
            "received"
        };
        return Err(format!(
            "record limit reached: {seq} records {which} under one {} key (limit {}); the kernel cannot rekey, closing",
            leg.cipher, leg.record_limit
        )
        .into());
    }
    Ok(())
}

/// EOF reached the other side: close_notify first where it speaks TLS.
async fn half_close(dst: &Side) -> Result<(), Broken> {
    let stream = dst.stream();
    if dst.kernel().is_some() {
        loop {
            write_ready(stream)
                .await
                .map_err(|e| Broken::writing(format!("waiting to write: {e}")))?;
            match stream.try_io(Interest::WRITABLE, || {
                sys::send_record(stream, ALERT, &[1, CLOSE_NOTIFY])
            }) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(Broken::writing(format!("sending close_notify: {e}"))),
            }
        }
    }
    match sys::shutdown_write(stream) {
        Ok(()) => Ok(()),
        // The peer is already gone; nothing left to tell it.
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
        Err(e) => Err(Broken::writing(format!("half-close: {e}"))),
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> Result<(), Broken> {
    while !data.is_empty() {
        write_ready(to)
            .await
            .map_err(|e| Broken::writing(format!("waiting to write: {e}")))?;
        match to.try_write(data) {
            Ok(n) => data = data.get(n..).unwrap_or_default(),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(Broken::writing(e.to_string())),
        }
    }
    Ok(())
}

fn describe(e: &io::Error, kernel_tls: bool) -> Broken {
    match e.raw_os_error() {
        Some(libc::EBADMSG) if kernel_tls => Broken::protocol(
            AlertDescription::BadRecordMac,
            "a TLS record failed to decrypt (EBADMSG)",
        ),
        Some(libc::EMSGSIZE) if kernel_tls => Broken::protocol(
            AlertDescription::RecordOverflow,
            "peer sent an oversized TLS record",
        ),
        _ => e.to_string().into(),
    }
}

impl forward::Leg for Side {
    fn abort(&self, alert: Option<AlertDescription>) {
        let stream = self.stream();
        if let (Side::Kernel(_), Some(alert)) = (self, alert) {
            // The kernel frames records itself, so an alert is always whole;
            // a half-close keeps a reset from overtaking it. A decryption
            // failure leaves EBADMSG pending on the socket, which would fail
            // the send: read it off first.
            let _ = stream.take_error();
            let sent = sys::send_record(stream, ALERT, &[2, u8::from(alert)])
                .and_then(|()| sys::shutdown_write(stream));
            if sent.is_ok() {
                return;
            }
        }
        // SO_LINGER 0: the close that follows sends a reset.
        if let Err(e) = stream.set_zero_linger() {
            tracing::debug!(error = %e, "setting SO_LINGER 0 to reset the connection");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::End;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// The splice pump between plain sockets (this much runs without kTLS):
    /// byte-exact both ways at once, EOF passed on as a half-close.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn splices_both_ways_and_propagates_half_close() {
        let (mut client, client_side) = pair().await;
        let (backend_side, mut backend) = pair().await;
        let relay = tokio::spawn(forward(
            Side::Plain(client_side),
            Side::Plain(backend_side),
            Duration::from_secs(20),
            CancellationToken::new(),
            String::new,
            // The task must own what it borrows: one counter per test run.
            Box::leak(Box::default()),
        ));
        let up: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 241) as u8).collect();
        let (mut cr, mut cw) = client.split();
        let (mut br, mut bw) = backend.split();
        let send_up = async {
            cw.write_all(&up).await.unwrap();
            cw.shutdown().await.unwrap();
        };
        let recv_up = async {
            let mut got = Vec::new();
            br.read_to_end(&mut got).await.unwrap();
            // The client's EOF arrived; the backend still answers.
            bw.write_all(&down).await.unwrap();
            bw.shutdown().await.unwrap();
            got
        };
        let recv_down = async {
            let mut got = Vec::new();
            cr.read_to_end(&mut got).await.unwrap();
            got
        };
        let ((), got_up, got_down) = tokio::join!(send_up, recv_up, recv_down);
        assert!(got_up == up, "client → backend byte-exact");
        assert!(got_down == down, "backend → client byte-exact");
        let t = relay.await.unwrap();
        assert_eq!(
            (t.client_to_backend, t.backend_to_client, t.end),
            (up.len() as u64, down.len() as u64, End::Completed)
        );
    }
}

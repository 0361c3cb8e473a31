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

use rustls::AlertDescription;

use super::{KernelLeg, PeerRole, sys};
use crate::forward::{self, Activity, Broken, Transfer, read_ready, write_ready};

const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;
const CLOSE_NOTIFY: u8 = 0;
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;

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
/// out, or `close` fires (then `why` says what closed it).
pub fn forward(
    client: Side,
    backend: Side,
    idle: Duration,
    close: CancellationToken,
    why: impl FnOnce() -> String,
) -> impl Future<Output = Transfer> {
    forward::both_ways(client, backend, idle, close, why, pump)
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
    while open {
        read_ready(from)
            .await
            .map_err(|e| format!("waiting to read: {e}"))?;
        let n = match from.try_io(Interest::READABLE, || {
            sys::splice(from, &pipe.write, capacity)
        }) {
            Ok(0) => {
                if src.kernel().is_some() {
                    return Err(
                        "truncation: the sender closed the connection without close_notify".into(),
                    );
                }
                break;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && src.kernel().is_some() => {
                let peer = src.kernel().map_or(PeerRole::Client, |k| k.peer);
                match Box::pin(control_record(from, to, peer)).await? {
                    Control::Closed => open = false,
                    Control::Continue => {}
                }
                continue;
            }
            Err(e) => return Err(describe(&e, src.kernel().is_some())),
        };
        moved.fetch_add(n as u64, Ordering::Relaxed);
        activity.touch();
        if let Some(k) = src.kernel() {
            check_records(k, sys::TLS_RX, capacity)?;
        }
        let mut left = n;
        while left > 0 {
            write_ready(to)
                .await
                .map_err(|e| format!("waiting to write: {e}"))?;
            match to.try_io(Interest::WRITABLE, || sys::splice(&pipe.read, to, left)) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(describe(&e, false)),
            }
        }
        activity.touch();
        if let Some(k) = dst.kernel() {
            check_records(k, sys::TLS_TX, capacity)?;
        }
    }
    Box::pin(half_close(dst)).await
}

#[derive(Debug)]
enum Control {
    /// close_notify: this direction is done.
    Closed,
    /// Handled; splice on.
    Continue,
}

/// Reads the control record that stopped splice and acts on it.
async fn control_record(
    from: &TcpStream,
    to: &TcpStream,
    peer: PeerRole,
) -> Result<Control, Broken> {
    // A record is at most 2^14 bytes of plaintext (plus padding slack).
    let mut buf = vec![0u8; 16 * 1024 + 256];
    let (kind, n) = loop {
        read_ready(from)
            .await
            .map_err(|e| format!("waiting to read: {e}"))?;
        match from.try_io(Interest::READABLE, || {
            sys::recv_record(from, &mut buf)
                .and_then(|r| r.ok_or_else(|| io::ErrorKind::WouldBlock.into()))
        }) {
            Ok(x) => break x,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(describe(&e, true)),
        }
    };
    let record = &buf[..n];
    let unexpected = |why: String| Broken::protocol(AlertDescription::UnexpectedMessage, why);
    match kind {
        ALERT => match record {
            [_, CLOSE_NOTIFY] => Ok(Control::Closed),
            [level, description] => Err(format!(
                "peer sent TLS alert {:?} (level {level})",
                AlertDescription::from(*description)
            )
            .into()),
            _ => Err(Broken::protocol(
                AlertDescription::DecodeError,
                format!("peer sent a malformed alert ({n} bytes)"),
            )),
        },
        HANDSHAKE => handshake_messages(record, peer),
        APPLICATION_DATA => {
            // Data after all (recvmsg found no control record): pass it on.
            write_all(to, record).await?;
            Ok(Control::Continue)
        }
        other => Err(unexpected(format!(
            "peer sent a TLS record of type {other} after the handshake"
        ))),
    }
}

/// Post-handshake messages: a server's tickets are not used (no
/// resumption towards backends), a KeyUpdate needs receive rekeying these
/// kernels lack, and a client sends neither tickets nor anything else.
fn handshake_messages(mut record: &[u8], peer: PeerRole) -> Result<Control, Broken> {
    let unexpected = |why: String| Broken::protocol(AlertDescription::UnexpectedMessage, why);
    if record.is_empty() {
        return Err(unexpected("peer sent an empty handshake record".into()));
    }
    while !record.is_empty() {
        let [kind, a, b, c, rest @ ..] = record else {
            return Err(unexpected(
                "peer sent a handshake message split across records".into(),
            ));
        };
        let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
        if rest.len() < len {
            return Err(unexpected(
                "peer sent a handshake message split across records".into(),
            ));
        }
        match (*kind, peer) {
            (NEW_SESSION_TICKET, PeerRole::Server) => {
                tracing::debug!("ignoring a session ticket after the kernel TLS hand-off");
            }
            (KEY_UPDATE, _) => {
                return Err(
                    "peer sent a TLS KeyUpdate; kernel TLS cannot take new receive keys, closing"
                        .into(),
                );
            }
            (other, _) => {
                return Err(unexpected(format!(
                    "peer sent handshake message type {other} after the handshake"
                )));
            }
        }
        record = &rest[len..];
    }
    Ok(Control::Continue)
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
                .map_err(|e| format!("waiting to write: {e}"))?;
            match stream.try_io(Interest::WRITABLE, || {
                sys::send_record(stream, ALERT, &[1, CLOSE_NOTIFY])
            }) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("sending close_notify: {e}").into()),
            }
        }
    }
    match sys::shutdown_write(stream) {
        Ok(()) => Ok(()),
        // The peer is already gone; nothing left to tell it.
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
        Err(e) => Err(format!("half-close: {e}").into()),
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> Result<(), Broken> {
    while !data.is_empty() {
        write_ready(to)
            .await
            .map_err(|e| format!("waiting to write: {e}"))?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(describe(&e, false)),
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
            // a half-close keeps a reset from overtaking it.
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

    #[test]
    fn post_handshake_messages() {
        let ticket = [NEW_SESSION_TICKET, 0, 0, 2, 0xAA, 0xBB];
        let server = PeerRole::Server;
        assert!(matches!(
            handshake_messages(&ticket, server),
            Ok(Control::Continue)
        ));
        let two = [ticket.as_slice(), ticket.as_slice()].concat();
        assert!(matches!(
            handshake_messages(&two, server),
            Ok(Control::Continue)
        ));
        let key_update = [KEY_UPDATE, 0, 0, 1, 0];
        let err = handshake_messages(&key_update, server).err().unwrap();
        assert!(err.why.contains("KeyUpdate"), "{err:?}");
        let truncated = [NEW_SESSION_TICKET, 0, 0, 9, 1];
        assert!(handshake_messages(&truncated, server).is_err());
        let hello_request = [0, 0, 0, 0];
        assert!(handshake_messages(&hello_request, server).is_err());
        // A client has no tickets to give; an empty record is no message.
        let err = handshake_messages(&ticket, PeerRole::Client).unwrap_err();
        assert_eq!(err.alert, Some(AlertDescription::UnexpectedMessage));
        assert!(handshake_messages(&[], server).is_err());
    }
}

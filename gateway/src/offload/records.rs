//! The userspace path: after rustls finishes the handshake, the gateway
//! opens and seals TLS records itself with the keys rustls negotiated, the
//! way kernel TLS would.
//!
//! Why not keep rustls' buffered stream: it reads 4 KiB per syscall and
//! copies every byte three times on the way through (into its deframer, into
//! its plaintext queue, out to the caller), and it keeps its buffers for the
//! life of the connection. Here one read takes up to 64 KiB, records are
//! decrypted in place and their payloads written to the other side straight
//! from the read buffer, and a connection with nothing in flight holds no
//! buffer at all.
//!
//! Like the kernel path, this one cannot take new keys: rustls' buffered
//! connection hands over the traffic keys but not the secrets they come
//! from, so a TLS 1.3 KeyUpdate ends the connection with that reason, and
//! our side closes before a cipher's record limit (for AES-GCM about 2^24.5
//! records, some 380 GB in one direction of one connection).

use std::io::{self, IoSlice, IoSliceMut};
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rustls::AlertDescription;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::record_layer::{Control, MAX_FRAGMENT, RecordLayer, Slots};
use super::{Finished, HandOffError, PeerRole};
use crate::forward::{self, Activity, Broken, Moved, Transfer, read_ready, write_ready};
/// Bytes one read may take. Large enough that a fast sender costs few
/// syscalls per MiB; it is only held while data is in flight.
pub(crate) const READ: usize = 64 * 1024;

/// One end of a userspace-path connection.
pub enum Side {
    Records(Box<RecordLeg>),
    Plain(TcpStream),
}

impl Side {
    fn stream(&self) -> &TcpStream {
        match self {
            Side::Records(r) => &r.stream,
            Side::Plain(s) => s,
        }
    }
}

/// A TLS leg whose records the gateway opens and seals itself.
pub struct RecordLeg {
    pub stream: TcpStream,
    layer: RecordLayer,
    /// A batch of records is partly written: an alert now would land inside
    /// a record.
    tx_midway: AtomicBool,
    /// Plaintext rustls had already decrypted: it goes out first.
    early: Vec<u8>,
    /// The peer's close_notify arrived before the hand-off.
    peer_closed: bool,
}

impl RecordLeg {
    /// Takes the keys out of a finished rustls connection. Past this point
    /// there is no rustls stream to fall back to.
    pub(crate) fn new(f: Finished) -> Result<RecordLeg, HandOffError> {
        let peer = PeerRole::of(&f.conn);
        let secrets = f
            .conn
            .dangerous_extract_secrets()
            .map_err(|e| HandOffError::new(format!("extracting secrets: {e}")))?;
        let layer =
            RecordLayer::from_secrets(f.version, peer, secrets.rx, secrets.tx, f.record_limit)
                .map_err(HandOffError::new)?;
        super::reset_if_dropped(&f.stream, false);
        Ok(RecordLeg {
            stream: f.stream,
            layer,
            tx_midway: AtomicBool::new(false),
            early: f.early,
            peer_closed: f.peer_closed,
        })
    }

    /// Writes whole sealed records; while they are on their way the leg is
    /// not at a record boundary.
    async fn send_records(&self, records: &[u8]) -> Result<(), String> {
        self.tx_midway.store(true, Ordering::Relaxed);
        write_all_vectored(&self.stream, vec![IoSlice::new(records)]).await?;
        self.tx_midway.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// Sends a fatal alert now, without waiting, if the stream is at a
    /// record boundary and the socket takes it whole; then half-closes so
    /// the alert is not lost to a reset. True if it went out.
    fn try_send_alert(&self, alert: AlertDescription) -> bool {
        if self.tx_midway.load(Ordering::Relaxed) {
            return false;
        }
        let Ok(record) = self.layer.seal_alert(alert) else {
            return false;
        };
        match self.stream.try_write(&record) {
            Ok(n) if n == record.len() => shutdown_write(&self.stream).is_ok(),
            _ => false,
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

/// One direction: read from `src`, open its records if it is TLS, seal them
/// for `dst` if that is TLS, write, and half-close `dst` at the end. Only
/// payload moved restarts the idle clock: records that carry nothing, or a
/// record trickled in byte by byte, do not keep a connection alive.
async fn pump(
    src: &Side,
    dst: &Side,
    moved: &AtomicU64,
    activity: &Activity,
) -> Result<(), Broken> {
    let from = src.stream();
    let mut open = true;
    if let Side::Records(leg) = src {
        if !leg.early.is_empty() {
            let all = std::iter::once(0..leg.early.len()).collect::<Vec<_>>();
            Box::pin(send(dst, &all, &leg.early)).await?;
            moved.fetch_add(leg.early.len() as u64, Ordering::Relaxed);
            activity.touch();
        }
        open = !leg.peer_closed;
    }
    // Held only while bytes are in flight: an idle connection owns no
    // buffer, and no list of record ranges either.
    let mut buf = Buffer::default();
    // Plaintext bound for a TLS leg is read straight into record slots and
    // sealed where it lies: no copy, no second buffer. The slot layout
    // follows the negotiated suite, so it is fixed for the connection's life.
    let sealing = match (src, dst) {
        (Side::Plain(_), Side::Records(leg)) => Some((leg, leg.layer.slots())),
        _ => None,
    };
    while open {
        read_ready(from)
            .await
            .map_err(|e| format!("waiting to read: {e}"))?;
        let read = match sealing {
            Some((_, slots)) => read_into_slots(from, buf.get(), slots),
            None => {
                let filled = buf.filled;
                from.try_read(buf.get().get_mut(filled..).unwrap_or_default())
            }
        };
        let n = match read {
            Ok(0) => {
                if matches!(src, Side::Records(_)) {
                    return Err(if buf.filled == 0 {
                        "truncation: the sender closed the connection without close_notify".into()
                    } else {
                        "truncation: the sender closed the connection inside a TLS record".into()
                    });
                }
                break;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if buf.filled == 0 {
                    buf.release();
                } else {
                    buf.park();
                }
                continue;
            }
            Err(e) => return Err(e.to_string().into()),
        };
        if let Some((leg, _)) = sealing {
            activity.touch();
            let wire = leg.layer.seal_slots(buf.get(), n)?;
            // Boxed: the write's state (224 bytes) would otherwise be part
            // of every idle connection's task; one small allocation per
            // batch costs less than a read of it.
            let records = buf.get().get(..wire).ok_or("sealed past the buffer")?;
            Box::pin(leg.send_records(records))
                .await
                .map_err(Broken::writing)?;
            moved.fetch_add(n as u64, Ordering::Relaxed);
            activity.touch();
            continue;
        }
        buf.filled += n;
        let filled = buf.filled;
        let (data, ranges) = buf.parts();
        let data = data.get_mut(..filled).ok_or("filled past the buffer")?;
        ranges.clear();
        let (consumed, refused) = match src {
            Side::Plain(_) => {
                ranges.push(0..data.len());
                (data.len(), None)
            }
            Side::Records(leg) => {
                let opened = leg.layer.open(data, ranges);
                if opened.control == Control::Closed {
                    open = false;
                }
                (opened.taken, opened.refused)
            }
        };
        let n: usize = ranges.iter().map(|r| r.len()).sum();
        if n > 0 {
            activity.touch();
            Box::pin(send(dst, ranges, data))
                .await
                .map_err(Broken::writing)?;
            moved.fetch_add(n as u64, Ordering::Relaxed);
            activity.touch();
        }
        // What came before a refused record is delivered, as rustls would.
        if let Some(broken) = refused {
            return Err(broken);
        }
        // Keep only the start of a record still on its way.
        data.copy_within(consumed.., 0);
        buf.filled -= consumed;
    }
    drop(buf);
    activity.unless_failed().await;
    if let Side::Records(leg) = dst {
        let close_notify = leg.layer.seal_alert(AlertDescription::CloseNotify)?;
        Box::pin(leg.send_records(&close_notify))
            .await
            .map_err(Broken::writing)?;
    }
    match dst.stream().try_io(tokio::io::Interest::WRITABLE, || {
        shutdown_write(dst.stream())
    }) {
        Ok(()) => Ok(()),
        // The peer already went away: nothing is lost by not half-closing.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        Err(e) => Err(Broken::writing(format!("half-closing: {e}"))),
    }
}

impl forward::Leg for Side {
    fn abort(&self, alert: Option<AlertDescription>) {
        if let (Side::Records(leg), Some(alert)) = (self, alert)
            && leg.try_send_alert(alert)
        {
            return;
        }
        // SO_LINGER 0: the close that follows sends a reset.
        if let Err(e) = self.stream().set_zero_linger() {
            tracing::debug!(error = %e, "setting SO_LINGER 0 to reset the connection");
        }
    }
}

/// A read buffer borrowed from a process-wide pool while bytes are in
/// flight, and given back when the connection goes quiet. The pool spares
/// the allocator a 64 KiB malloc/free (and glibc its heap trims) on every
/// request of a request/response protocol; it keeps at most `POOL` buffers.
/// Buffers are zeroed once, when allocated, so reads (scattered ones too)
/// go into initialised memory; `filled` says how much of it holds data.
#[derive(Default)]
struct Buffer {
    data: Option<Vec<u8>>,
    filled: usize,
    /// The payload ranges of the records in `data`. Released with it: a
    /// burst of tiny records (thousands in one read) must not leave its
    /// peak size with the connection for its life.
    ranges: Vec<Range<usize>>,
    /// The start of a record while the buffer is back in the pool (`park`).
    parked: Box<[u8]>,
}

const POOL: usize = 64;
/// A 64 KiB read, with room for the headers and tags of the records it
/// becomes when it is sealed in place.
pub(crate) const CAPACITY: usize = READ + 4 * 32;
static BUFFERS: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

impl Buffer {
    fn get(&mut self) -> &mut [u8] {
        let data = self.data.get_or_insert_with(|| {
            BUFFERS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop()
                .unwrap_or_else(|| vec![0; CAPACITY])
        });
        if let Some(room) = data.get_mut(..self.parked.len())
            && !self.parked.is_empty()
        {
            room.copy_from_slice(&self.parked);
            self.parked = Box::default();
        }
        data
    }

    /// Nothing more to read for now, but the start of a record is here: it
    /// waits in an allocation of its own size, and the 64 KiB buffer goes
    /// back to the pool. A peer trickling a record holds what it sent, at
    /// most one record, not a read buffer and a list of ranges.
    fn park(&mut self) {
        if let Some(data) = &self.data {
            self.parked = data.get(..self.filled).unwrap_or_default().into();
        }
        let filled = self.filled;
        self.release();
        self.filled = filled;
    }

    /// The buffer (taken from the pool if need be) and its range list.
    fn parts(&mut self) -> (&mut [u8], &mut Vec<Range<usize>>) {
        self.get();
        match &mut self.data {
            Some(data) => (data, &mut self.ranges),
            None => unreachable!("get() just filled it"),
        }
    }

    fn release(&mut self) {
        self.filled = 0;
        self.ranges = Vec::new();
        if let Some(b) = self.data.take() {
            let mut pool = BUFFERS.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < POOL {
                pool.push(b);
            }
        }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        self.release();
    }
}
/// Reads into the payload part of each record slot of `buf` in turn; one
/// readv fills them as a plain read would fill the buffer.
fn read_into_slots(from: &TcpStream, buf: &mut [u8], slots: Slots) -> io::Result<usize> {
    let mut iov: Vec<IoSliceMut<'_>> = buf
        .chunks_exact_mut(slots.stride)
        .filter_map(|slot| slot.get_mut(slots.prefix..slots.prefix + MAX_FRAGMENT))
        .map(IoSliceMut::new)
        .collect();
    from.try_read_vectored(&mut iov)
}

fn shutdown_write(s: &TcpStream) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: shutdown on a socket we own for the duration of the call.
    let r = unsafe { libc::shutdown(s.as_raw_fd(), libc::SHUT_WR) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Writes the bytes of `buf` in `ranges` to `dst`, sealed into records if it is TLS.
async fn send(dst: &Side, ranges: &[Range<usize>], buf: &[u8]) -> Result<(), String> {
    match dst {
        Side::Plain(s) => {
            let slices: Vec<IoSlice<'_>> = ranges
                .iter()
                .map(|r| IoSlice::new(buf.get(r.clone()).unwrap_or_default()))
                .collect();
            write_all_vectored(s, slices).await
        }
        Side::Records(leg) => {
            let records = leg.layer.seal(
                ranges
                    .iter()
                    .map(|r| buf.get(r.clone()).unwrap_or_default()),
            )?;
            leg.send_records(&records).await
        }
    }
}

async fn write_all_vectored(s: &TcpStream, mut slices: Vec<IoSlice<'_>>) -> Result<(), String> {
    let mut rest: &mut [IoSlice<'_>] = &mut slices;
    IoSlice::advance_slices(&mut rest, 0);
    while !rest.is_empty() {
        write_ready(s)
            .await
            .map_err(|e| format!("waiting to write: {e}"))?;
        match s.try_write_vectored(rest) {
            Ok(0) => return Err("peer stopped accepting data".into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle connection holds nothing: after a burst of tiny records,
    /// release gives back the read buffer and the list of their ranges.
    #[test]
    fn a_released_buffer_holds_no_allocation() {
        let mut buf = Buffer::default();
        let (data, ranges) = buf.parts();
        assert_eq!(data.len(), CAPACITY);
        // A 64 KiB read of TLS 1.3 records carrying one byte each.
        ranges.extend((0..READ / 23).map(|i| i * 23..i * 23 + 1));
        assert!(buf.ranges.capacity() >= READ / 23);
        buf.release();
        assert!(buf.data.is_none());
        assert_eq!(buf.ranges.capacity(), 0);
        assert_eq!(
            std::mem::size_of_val(&buf.ranges),
            24,
            "three words, no heap"
        );
    }

    /// A record trickled in: between reads the connection keeps the bytes
    /// it has of it, not the read buffer or the ranges of a burst before
    /// it; the next read finds them where they were.
    #[test]
    fn a_partial_record_is_parked_in_its_own_size() {
        let mut buf = Buffer::default();
        let (data, ranges) = buf.parts();
        ranges.extend((0..READ / 23).map(|i| i * 23..i * 23 + 1));
        data[..7].copy_from_slice(b"partial");
        buf.filled = 7;
        buf.park();
        assert!(buf.data.is_none(), "the 64 KiB buffer went back");
        assert_eq!(buf.ranges.capacity(), 0);
        assert_eq!(&buf.parked[..], b"partial");
        assert_eq!(buf.filled, 7);
        assert_eq!(&buf.get()[..7], b"partial");
        assert!(buf.parked.is_empty());
    }
}

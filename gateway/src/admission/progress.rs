//! A handshake must make progress: whenever it is the client's turn, it
//! must send at least `handshake_min_rate` bytes per second once
//! `handshake_grace` has passed (like a slow-request timeout), or it is cut
//! long before `handshake_timeout`. A slowloris trickling a ClientHello one
//! byte every two seconds is cut at about the grace.
//!
//! Progress is what the kernel counts for the socket (TCP_INFO: bytes
//! received from the client, bytes sent to it), so it does not depend on
//! when the gateway gets round to reading. The client's turn starts at
//! accept and again each time the gateway sends (its flight, a
//! HelloRetryRequest); while the gateway holds a complete ClientHello and
//! has sent nothing yet, the turn is the gateway's and the clock is held:
//! a busy gateway does not count against its clients. (Before Linux 4.19
//! the kernel does not count bytes sent, so after the ClientHello only
//! `handshake_timeout` applies there.)
//!
//! The counts are read from a duplicate of the socket (an extra descriptor
//! for the handshake's length, made at admission), so a socket that has
//! been closed and whose number went to another connection is never read.

use std::os::fd::{AsRawFd as _, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Refusal, Stage, Ticket};

/// Why admission cut a connection during its handshake.
#[derive(Debug, Clone, PartialEq)]
pub enum Cut {
    /// A newer connection took its slot: the listener was full and this
    /// handshake had made the least progress.
    Evicted { after: Duration },
    /// The client sent less than the minimum rate on its turn.
    TooSlow {
        received: u64,
        turn: Duration,
        min_rate: u32,
        grace: Duration,
    },
}

impl Cut {
    pub fn refusal(&self) -> Refusal {
        match self {
            Cut::Evicted { .. } => Refusal::Evicted,
            Cut::TooSlow { .. } => Refusal::HandshakeTooSlow,
        }
    }
}

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cut::Evicted { after } => write!(
                f,
                "evicted after {after:.1?} in the handshake: the listener was full and this \
                 handshake had made the least progress"
            ),
            Cut::TooSlow {
                received,
                turn,
                min_rate,
                grace,
            } => write!(
                f,
                "handshake too slow: {received} bytes in {turn:.1?} of the client's turn, \
                 below handshake_min_rate ({min_rate} bytes/s after handshake_grace {grace:?})"
            ),
        }
    }
}

/// What the kernel counted on one socket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Counted {
    pub received: u64,
    pub sent: u64,
}

/// Watches one handshake for its ticket.
pub struct Watch<'a> {
    ticket: &'a Ticket,
    /// None when the socket could not be duplicated (no descriptors left):
    /// then only eviction applies, and `handshake_timeout`.
    socket: Option<Arc<OwnedFd>>,
    min_rate: u32,
    grace: Duration,
}

impl<'a> Watch<'a> {
    pub(super) fn new(ticket: &'a Ticket, min_rate: u32, grace: Duration) -> Watch<'a> {
        Watch {
            ticket,
            socket: ticket.socket(),
            min_rate,
            grace,
        }
    }

    /// Completes when the handshake must end: evicted, or too slow. Never
    /// completes otherwise (race it against the handshake). A cut socket
    /// is reset when closed, not shut down in order.
    pub async fn cut(&self) -> Cut {
        let cut = self.until_cut().await;
        if let Some(fd) = &self.socket {
            crate::offload::reset_if_dropped(&**fd, true);
        }
        cut
    }

    async fn until_cut(&self) -> Cut {
        let evicted = self.ticket.evicted_token();
        let Some(fd) = self.socket.as_ref().filter(|_| self.min_rate > 0) else {
            evicted.cancelled().await;
            return self.evicted();
        };
        let mut turn = self.ticket.accepted();
        let mut at_turn = Counted::default();
        loop {
            let counted = counted(fd).unwrap_or(at_turn);
            let received = counted.received.saturating_sub(at_turn.received);
            let allowed =
                self.grace + Duration::from_secs_f64(received as f64 / f64::from(self.min_rate));
            let deadline = turn + allowed;
            tokio::select! {
                () = evicted.cancelled() => return self.evicted(),
                () = tokio::time::sleep_until(deadline.into()) => {}
            }
            let now = Instant::now();
            let counted = match self::counted(fd) {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "admission: TCP_INFO failed; only the handshake's timeout applies");
                    evicted.cancelled().await;
                    return self.evicted();
                }
            };
            let unanswered = self.ticket.stage() == Stage::Answered && counted.sent == 0;
            if counted.sent > at_turn.sent || unanswered {
                // Our answer went out (the client's turn starts now), or we
                // hold a ClientHello and have sent nothing yet (our turn).
                turn = now;
                at_turn = counted;
                continue;
            }
            let received = counted.received - at_turn.received;
            let allowed =
                self.grace + Duration::from_secs_f64(received as f64 / f64::from(self.min_rate));
            if now >= turn + allowed {
                return Cut::TooSlow {
                    received,
                    turn: now - turn,
                    min_rate: self.min_rate,
                    grace: self.grace,
                };
            }
        }
    }

    fn evicted(&self) -> Cut {
        Cut::Evicted {
            after: self.ticket.accepted().elapsed(),
        }
    }
}

/// Bytes received from and sent to the peer, as the kernel counts them
/// (TCP_INFO; `sent` needs Linux 4.19, and reads 0 before).
pub(super) fn counted(fd: &OwnedFd) -> std::io::Result<Counted> {
    // SAFETY: tcp_info is plain data; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which is
    // that large, and sets `len`; the descriptor is ours and open.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Counted {
        received: info.tcpi_bytes_received,
        sent: info.tcpi_bytes_sent,
    })
}

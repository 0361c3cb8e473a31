//! A handshake must make progress: whenever it is the client's turn, it
//! must send at least `handshake_min_rate` bytes per second once
//! `handshake_grace` has passed (like a slow-request timeout), or it is cut
//! long before `handshake_timeout`. A slowloris trickling a ClientHello one
//! byte every two seconds is cut at about the grace.
//!
//! Progress is what the kernel counts for the socket (TCP_INFO: bytes
//! received from the client, bytes the gateway wrote to it), so it does
//! not depend on when the gateway gets round to reading. The client's turn
//! starts at accept and again each time the gateway writes (its flight, a
//! HelloRetryRequest); while the gateway holds a complete ClientHello and
//! has written nothing yet, the turn is the gateway's and the clock is
//! held: a busy gateway does not count against its clients.
//!
//! A write counts when the gateway hands it to the kernel, not when the
//! client has it: time our flight waits unsent or unacknowledged is the
//! client's (a client that closes its receive window, or never reads,
//! cannot look like it waits on the gateway, nor restart its turn by
//! letting a few bytes through). When the flight has all been delivered,
//! the kernel's clock of the last data sent says when it went out; before,
//! the turn is taken to start at the last look before the write, the
//! earliest it can have. (Before Linux 4.19 the kernel does not count bytes
//! sent, so after the ClientHello only `handshake_timeout` applies there,
//! and such handshakes are not weighed for eviction.)
//!
//! The same turn is what eviction weighs (`pool`): the client's bytes in
//! its current turn, per second of it, with the grace counted as if sent at
//! the minimum rate. That is how far the handshake is from being cut for
//! slowness, so a newcomer evicts the one closest to it, and a client
//! answering at a client's speed (milliseconds) is far from it.
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
    /// handshake, in `stage`, had made the least progress.
    Evicted { after: Duration, stage: Stage },
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
            Cut::Evicted {
                stage: Stage::Hello,
                ..
            } => Refusal::EvictedBeforeHello,
            Cut::Evicted { .. } => Refusal::EvictedAfterHello,
            Cut::TooSlow { .. } => Refusal::HandshakeTooSlow,
        }
    }
}

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cut::Evicted { after, stage } => write!(
                f,
                "evicted after {after:.1?} in the handshake ({}): the listener was full and this \
                 handshake had made the least progress",
                match stage {
                    Stage::Hello => "before its ClientHello was complete",
                    _ => "past its ClientHello",
                }
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
    /// Bytes received from the client.
    pub received: u64,
    /// Bytes the gateway handed to the kernel for the client: sent once,
    /// or waiting to be (0 before Linux 4.19, which does not count them).
    pub written: u64,
    /// Everything written has been sent and acknowledged.
    pub delivered: bool,
    /// Since the last segment with data went out (a retransmission too).
    pub since_sent: Duration,
    /// Bytes received and not read by the gateway yet.
    pub unread: u32,
}

/// The minimum rate a handshake is held to, and its grace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Pace {
    pub min_rate: u32,
    pub grace: Duration,
}

impl Pace {
    /// Until the listener's pace is known (the moment between admission
    /// and the handshake's start): the defaults.
    pub const DEFAULT: Pace = Pace {
        min_rate: 256,
        grace: Duration::from_secs(2),
    };

    /// The bytes the grace is worth: what a turn is credited with from its
    /// start. With no minimum rate, still the grace at the default rate,
    /// so that a turn just begun is not the least progressed.
    fn credit(self) -> f64 {
        let rate = if self.min_rate == 0 {
            Pace::DEFAULT.min_rate
        } else {
            self.min_rate
        };
        f64::from(rate) * self.grace.as_secs_f64()
    }
}

/// Where a handshake is, as of a look at its counts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Now {
    /// The gateway holds the client's ClientHello and has written nothing
    /// yet, or has bytes of the client's it has not read: the turn is the
    /// gateway's.
    Gateway,
    /// The client's turn, `age` long, in which it sent `received` bytes.
    Client { age: Duration, received: u64 },
}

impl Now {
    /// Progress for eviction: bytes per second of the client's turn, its
    /// start credited with the grace at the minimum rate. None while it is
    /// the gateway's turn (a busy gateway does not count against its
    /// clients).
    pub fn progress(self, pace: Pace) -> Option<f64> {
        match self {
            Now::Gateway => None,
            Now::Client { age, received } => {
                Some((received as f64 + pace.credit()) / age.as_secs_f64().max(1e-3))
            }
        }
    }
}

/// The client's current turn, kept from look to look.
#[derive(Debug, Clone, Copy)]
pub(super) struct Turn {
    /// When the client's current turn began.
    since: Instant,
    /// Bytes received from the client, and written by the gateway, then.
    received: u64,
    written: u64,
    /// The last look, and the bytes received by then: a write first seen
    /// at a later look happened after it.
    looked: Instant,
    looked_received: u64,
}

impl Turn {
    /// Accepted: the client's turn (its ClientHello) starts.
    pub fn new(at: Instant) -> Turn {
        Turn {
            since: at,
            received: 0,
            written: 0,
            looked: at,
            looked_received: 0,
        }
    }

    /// The ClientHello is read (with `counted` as of then, if known): the
    /// gateway's turn until it writes.
    pub fn answered(&mut self, counted: Option<Counted>, now: Instant) {
        let received = counted.map_or(0, |c| c.received);
        self.since = now;
        self.received = received;
        self.written = counted.map_or(0, |c| c.written);
        self.looked = now;
        self.looked_received = received;
    }

    /// Takes a look at `counted` at `now`.
    pub fn look(&mut self, stage: Stage, counted: Counted, now: Instant) -> Now {
        if counted.written > self.written {
            // The gateway wrote since the last look: the client's turn
            // began then, and no earlier than that look.
            let sent_at = now.checked_sub(counted.since_sent).unwrap_or(self.looked);
            self.since = if counted.delivered {
                sent_at.max(self.looked)
            } else {
                self.looked
            };
            self.received = self.looked_received;
            self.written = counted.written;
        }
        self.looked = now;
        self.looked_received = counted.received;
        if stage == Stage::Answered && (self.written == 0 || counted.unread > 0) {
            return Now::Gateway;
        }
        Now::Client {
            age: now.saturating_duration_since(self.since),
            received: counted.received.saturating_sub(self.received),
        }
    }

    /// Without counts (no descriptor to read them from): the turn as of
    /// the last stage change, as if the client sent nothing since.
    pub fn unmeasured(&self, now: Instant) -> Now {
        Now::Client {
            age: now.saturating_duration_since(self.since),
            received: 0,
        }
    }
}

/// Watches one handshake for its ticket.
pub struct Watch<'a> {
    ticket: &'a Ticket,
    /// None when the socket could not be duplicated (no descriptors left):
    /// then only eviction applies, and `handshake_timeout`.
    socket: Option<Arc<OwnedFd>>,
    pace: Pace,
}

impl<'a> Watch<'a> {
    pub(super) fn new(ticket: &'a Ticket, min_rate: u32, grace: Duration) -> Watch<'a> {
        let pace = Pace { min_rate, grace };
        ticket.place().set_pace(pace);
        Watch {
            ticket,
            socket: ticket.socket(),
            pace,
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
        if self.socket.is_none() || self.pace.min_rate == 0 {
            evicted.cancelled().await;
            return self.evicted();
        }
        let Pace { min_rate, grace } = self.pace;
        let place = self.ticket.place();
        loop {
            let now = Instant::now();
            let next = match place.look(now) {
                Some(Ok(Now::Client { age, received })) => {
                    let allowed =
                        grace + Duration::from_secs_f64(received as f64 / f64::from(min_rate));
                    if age >= allowed {
                        return Cut::TooSlow {
                            received,
                            turn: age,
                            min_rate,
                            grace,
                        };
                    }
                    now + (allowed - age)
                }
                // The gateway's turn: look again a grace later.
                Some(Ok(Now::Gateway)) => now + grace,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "admission: TCP_INFO failed; only the handshake's timeout applies");
                    evicted.cancelled().await;
                    return self.evicted();
                }
                // Evicted meanwhile, or the descriptor gone.
                None => {
                    evicted.cancelled().await;
                    return self.evicted();
                }
            };
            tokio::select! {
                () = evicted.cancelled() => return self.evicted(),
                () = tokio::time::sleep_until(next.into()) => {}
            }
        }
    }

    fn evicted(&self) -> Cut {
        Cut::Evicted {
            after: self.ticket.accepted().elapsed(),
            stage: self.ticket.place().evicted_in(),
        }
    }
}

/// What the kernel counted on one socket (TCP_INFO).
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
    // Older kernels fill less of the structure (bytes sent and
    // retransmitted: Linux 4.19): then nothing counts as written.
    let full = len as usize >= std::mem::offset_of!(libc::tcp_info, tcpi_bytes_retrans) + 8;
    let written = if full {
        info.tcpi_bytes_sent.saturating_sub(info.tcpi_bytes_retrans)
            + u64::from(info.tcpi_notsent_bytes)
    } else {
        0
    };
    Ok(Counted {
        received: info.tcpi_bytes_received,
        written,
        delivered: info.tcpi_unacked == 0 && info.tcpi_notsent_bytes == 0,
        since_sent: Duration::from_millis(u64::from(info.tcpi_last_data_sent)),
        unread: unread(fd)?,
    })
}

/// Bytes in the socket's receive queue, not read yet (FIONREAD).
fn unread(fd: &OwnedFd) -> std::io::Result<u32> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which points
    // at `n`; the descriptor is ours and open.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &raw mut n) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(u32::try_from(n).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn counted(received: u64, written: u64, delivered: bool, since_sent: Duration) -> Counted {
        Counted {
            received,
            written,
            delivered,
            since_sent,
            unread: 0,
        }
    }

    #[test]
    fn the_turn_is_the_gateways_until_it_writes_then_the_clients() {
        let t0 = Instant::now();
        let mut turn = Turn::new(t0);
        assert_eq!(
            turn.look(Stage::Hello, counted(100, 0, true, MS), t0 + 50 * MS),
            Now::Client {
                age: 50 * MS,
                received: 100
            }
        );
        turn.answered(Some(counted(300, 0, true, MS)), t0 + 100 * MS);
        // A busy gateway: the clock is held.
        assert_eq!(
            turn.look(Stage::Answered, counted(300, 0, true, MS), t0 + 900 * MS),
            Now::Gateway
        );
        // The client's next flight came in and waits to be read: the
        // gateway's turn again.
        let mut waiting = counted(340, 2000, true, 30 * MS);
        waiting.unread = 40;
        let mut copy = turn;
        assert_eq!(
            copy.look(Stage::Answered, waiting, t0 + 1000 * MS),
            Now::Gateway
        );
        // Written and delivered 30 ms ago: the client's turn began then.
        assert_eq!(
            turn.look(
                Stage::Answered,
                counted(340, 2000, true, 30 * MS),
                t0 + 1000 * MS
            ),
            Now::Client {
                age: 30 * MS,
                received: 40
            }
        );
    }

    /// A client that closes its window (or does not acknowledge) on the
    /// gateway's flight: the wait is its own turn, from the last look
    /// before the write, and letting a few more bytes through later does
    /// not start a new one.
    #[test]
    fn an_undelivered_flight_is_the_clients_turn() {
        let t0 = Instant::now();
        let mut turn = Turn::new(t0);
        turn.answered(Some(counted(300, 0, true, MS)), t0);
        let look = turn.look(
            Stage::Answered,
            counted(300, 3000, false, MS),
            t0 + 500 * MS,
        );
        assert_eq!(
            look,
            Now::Client {
                age: 500 * MS,
                received: 0
            }
        );
        // Some of it sent since (the window opened a crack): same turn.
        let look = turn.look(
            Stage::Answered,
            counted(300, 3000, false, MS),
            t0 + 2000 * MS,
        );
        assert_eq!(
            look,
            Now::Client {
                age: 2000 * MS,
                received: 0
            }
        );
        let pace = Pace::DEFAULT;
        let silent = look.progress(pace).unwrap();
        let busy = Now::Client {
            age: 2000 * MS,
            received: 1000,
        };
        assert!(silent < busy.progress(pace).unwrap());
        assert_eq!(Now::Gateway.progress(pace), None);
    }

    /// The kernel's clock of the last send cannot date a write before the
    /// last look that had not seen it.
    #[test]
    fn a_write_is_dated_no_earlier_than_the_look_before_it() {
        let t0 = Instant::now();
        let mut turn = Turn::new(t0);
        turn.answered(Some(counted(300, 0, true, MS)), t0 + 400 * MS);
        assert_eq!(
            turn.look(
                Stage::Answered,
                counted(300, 2000, true, 900 * MS),
                t0 + 1000 * MS
            ),
            Now::Client {
                age: 600 * MS,
                received: 0
            }
        );
    }
}

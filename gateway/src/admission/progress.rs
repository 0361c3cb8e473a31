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
//! Eviction (`pool`) weighs the same turn, but by milestones and time,
//! not bytes: whether the ClientHello is complete, and how long the
//! client's turn has lasted against the round trip to it
//! ([`Now::standing`]). Bytes that do not complete a step (junk inside a
//! record that never parses) earn a peer nothing there.
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
    /// Bytes received from the client (a FIN counts one).
    pub received: u64,
    /// Segments with data received from the client (a FIN alone is none;
    /// None before Linux 4.6, which does not count them).
    pub data_in: Option<u32>,
    /// Bytes the gateway handed to the kernel for the client: sent once,
    /// or waiting to be (0 before Linux 4.19, which does not count them).
    pub written: u64,
    /// Everything written has been sent and acknowledged.
    pub delivered: bool,
    /// Since the last segment with data went out (a retransmission too).
    pub since_sent: Duration,
    /// Bytes received and not read by the gateway yet.
    pub unread: u32,
    /// The kernel's smoothed round-trip time to the client (from the TCP
    /// handshake on).
    pub rtt: Duration,
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

/// How readily a handshake is evicted, lowest first (see `standing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Class {
    /// Still without a complete ClientHello, well after a real client's
    /// would have come (it is the client's first flight).
    StalledHello,
    /// Past its ClientHello, the client's turn well past when its answer
    /// would have come.
    StalledTurn,
    /// Still without a complete ClientHello, not long accepted (a round
    /// trip and a twentieth of the grace, 100 ms, protect it, the time its
    /// ClientHello takes to come in behind the TCP handshake).
    NewHello,
    /// Not otherwise to be evicted, but its source (an IPv4 /24, an IPv6
    /// /64) or its network (/16, /48) holds at least two more handshakes
    /// of the share than the newcomer's, another network's, and its source
    /// is not known (`pool`): peers that each sent a real ClientHello do not
    /// keep out a source that holds none.
    Crowded,
    /// Not otherwise to be evicted, its source not known: a known newcomer (a verified certificate within `known_for`)
    /// displaces it, the longest waiting first (`pool`). So too a known
    /// source's handshake past what a known source is spared (`pool`: its
    /// source's and network's oldest few, half the share in all), crowded
    /// or not: weighed like a stranger's, never before a crowded one.
    Unknown,
}

/// The longest round trip that earns a handshake more time before it is
/// overdue.
const MAX_RTT: Duration = Duration::from_millis(500);

/// A handshake's standing for eviction: its class, then the longest
/// waited first.
pub(super) type Standing = (Class, std::cmp::Reverse<Duration>);

impl Now {
    /// Standing for eviction; None while it may not be evicted: the turn
    /// is the gateway's (a busy gateway does not count against its
    /// clients), or the client is still early in its turn past the
    /// ClientHello: a client answers the gateway's flight one round trip
    /// and a signature later, be it 1 ms or 300 ms away.
    ///
    /// Only milestones a peer cannot fake cheaply count: a complete,
    /// parsed ClientHello, and the gateway's answer to the client's
    /// flight. Bytes do not: junk inside a record that never parses
    /// looks the same to the kernel as a real hello, so a peer that
    /// streams it earns nothing. A turn is overdue after three round
    /// trips (the kernel's estimate), and at least a tenth of the grace
    /// for a ClientHello (200 ms by default), half the grace for the
    /// client's answer (1 s).
    pub fn standing(self, stage: Stage, pace: Pace, rtt: Duration) -> Option<Standing> {
        let Now::Client { age, .. } = self else {
            return None;
        };
        // A peer can inflate the kernel's estimate (by acknowledging
        // late); past `MAX_RTT` it buys nothing more.
        let rtt = rtt.min(MAX_RTT);
        let class = if stage == Stage::Hello {
            // A real ClientHello comes right behind the TCP handshake.
            if age < rtt.max(pace.grace / 20) {
                return None;
            } else if age < (3 * rtt).max(pace.grace / 10) {
                Class::NewHello
            } else {
                Class::StalledHello
            }
        } else if age < (3 * rtt).max(pace.grace / 2) {
            return None;
        } else {
            Class::StalledTurn
        };
        Some((class, std::cmp::Reverse(age)))
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
    /// The kernel's round-trip time to the client, as of the last look.
    rtt: Duration,
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
            rtt: Duration::ZERO,
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
        self.rtt = counted.rtt;
        if stage == Stage::Answered && (self.written == 0 || counted.unread > 0) {
            return Now::Gateway;
        }
        Now::Client {
            age: now.saturating_duration_since(self.since),
            received: counted.received.saturating_sub(self.received),
        }
    }

    /// The round-trip time to the client, as of the last look.
    pub fn rtt(&self) -> Duration {
        self.rtt
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
        ticket.place().watched();
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
            // Evicted already (asked after the handshake won the race).
            if evicted.is_cancelled() {
                return self.evicted();
            }
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
    let segs = len as usize >= std::mem::offset_of!(libc::tcp_info, tcpi_data_segs_in) + 4;
    Ok(Counted {
        received: info.tcpi_bytes_received,
        data_in: segs.then_some(info.tcpi_data_segs_in),
        written,
        delivered: info.tcpi_unacked == 0 && info.tcpi_notsent_bytes == 0,
        since_sent: Duration::from_millis(u64::from(info.tcpi_last_data_sent)),
        unread: unread(fd)?,
        rtt: Duration::from_micros(u64::from(info.tcpi_rtt)),
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
            data_in: None,
            written,
            delivered,
            since_sent,
            unread: 0,
            rtt: Duration::ZERO,
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
        // Two seconds into its turn, past the ClientHello: overdue, and
        // bytes sent in the turn (junk or not) do not change that.
        let pace = Pace::DEFAULT;
        let busy = Now::Client {
            age: 2000 * MS,
            received: 16_000,
        };
        assert_eq!(
            look.standing(Stage::Answered, pace, MS),
            busy.standing(Stage::Answered, pace, MS)
        );
        assert!(look.standing(Stage::Answered, pace, MS).is_some());
        assert_eq!(Now::Gateway.standing(Stage::Answered, pace, MS), None);
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

    /// A client early in its turn past the ClientHello is not evicted,
    /// however few bytes it sent, for three round trips and at least half
    /// the grace; a handshake without its ClientHello goes first once a
    /// real one would have come, however many bytes it sent.
    #[test]
    fn only_milestones_and_time_count_for_eviction_not_bytes() {
        let pace = Pace::DEFAULT;
        let client = |age, received| Now::Client { age, received };
        // A client 300 ms away (its round trip as the kernel sees it):
        // 800 ms into its turn, not to be evicted; 10 ms away, not before
        // 1 s.
        assert_eq!(
            client(800 * MS, 0).standing(Stage::Answered, pace, 300 * MS),
            None
        );
        assert_eq!(
            client(990 * MS, 0).standing(Stage::Answered, pace, 10 * MS),
            None
        );
        let stalled = client(1000 * MS, 0).standing(Stage::Answered, pace, 10 * MS);
        assert_eq!(stalled.map(|s| s.0), Some(Class::StalledTurn));
        // Before the ClientHello: 16 KB of it in 150 ms is no better than
        // silence; past 200 ms (three round trips of 1 ms), overdue, and
        // evicted before any overdue turn, then the oldest first.
        assert_eq!(client(90 * MS, 0).standing(Stage::Hello, pace, MS), None);
        let young = client(150 * MS, 16_000).standing(Stage::Hello, pace, MS);
        assert_eq!(young.map(|s| s.0), Some(Class::NewHello));
        let busy = client(300 * MS, 16_000).standing(Stage::Hello, pace, MS);
        let silent = client(250 * MS, 0).standing(Stage::Hello, pace, MS);
        assert_eq!(busy.map(|s| s.0), Some(Class::StalledHello));
        assert!(busy < silent && silent < stalled && stalled < young);
        // Far away (300 ms round trip): its hello is not overdue before 900 ms.
        assert_eq!(
            client(800 * MS, 0)
                .standing(Stage::Hello, pace, 300 * MS)
                .map(|s| s.0),
            Some(Class::NewHello)
        );
    }
}

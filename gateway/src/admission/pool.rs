//! A listener's slots: `max_connections` in all, of which at most
//! `max_handshakes_in_flight` may still be in their handshake.
//!
//! Handshakes are kept in two queues by stage, each oldest first: those
//! still waiting for a complete ClientHello, and those past it. When the
//! listener is full, a new connection evicts a handshake that has not
//! delivered its ClientHello: of the oldest few, the one whose client sent
//! the fewest bytes per second of its life (as the kernel counts them, so
//! a ClientHello that arrived but is not read yet counts). A slowloris
//! goes; a client that sent its ClientHello a moment ago stays, even when
//! a burst of newcomers arrives before the gateway read it. A handshake
//! past its ClientHello, and any connection past its handshake, is never
//! evicted by a newcomer (which has made no progress at all); when there
//! is nothing to evict, the newcomer is refused.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use super::progress::{Counted, counted};
use super::{Refusal, Stage};

/// How many of the oldest waiting handshakes are weighed for eviction.
const CANDIDATES: usize = 8;

/// One listener's slots, kept across reloads (by listener name).
pub struct Pool {
    listener: String,
    slots: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    /// Connections holding a slot: in their handshake or past it.
    connections: usize,
    next: u64,
    /// Waiting for a complete ClientHello, by admission order.
    hello: BTreeMap<u64, Arc<Place>>,
    /// Past the ClientHello, the handshake not done yet.
    answered: BTreeMap<u64, Arc<Place>>,
}

/// What the pool and a connection's ticket share about its place.
pub(super) struct Place {
    stage: AtomicU8,
    evicted: CancellationToken,
    client: SocketAddr,
    accepted: Instant,
    /// A duplicate of the connection's socket, for the kernel's counts of
    /// its progress, while it is in its handshake (None once past it, or
    /// when no descriptor was left to duplicate it).
    socket: Mutex<Option<Arc<OwnedFd>>>,
}

impl Place {
    pub fn stage(&self) -> Stage {
        Stage::from_u8(self.stage.load(Ordering::Acquire))
    }

    pub fn evicted(&self) -> &CancellationToken {
        &self.evicted
    }

    pub fn accepted(&self) -> Instant {
        self.accepted
    }

    /// The socket's duplicate, while the handshake lasts.
    pub fn socket(&self) -> Option<Arc<OwnedFd>> {
        self.socket
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Bytes per second the client sent over its life so far.
    fn rate(&self, now: Instant) -> f64 {
        let received = self
            .socket()
            .and_then(|fd| counted(&fd).ok())
            .map_or(0, |c: Counted| c.received);
        received as f64
            / now
                .saturating_duration_since(self.accepted)
                .as_secs_f64()
                .max(1e-3)
    }
}

/// A place taken: its id, and the handshake it evicted, if any.
pub(super) struct Taken {
    pub id: u64,
    pub place: Arc<Place>,
    pub evicted: Option<SocketAddr>,
}

impl Pool {
    pub(super) fn new(listener: &str) -> Pool {
        Pool {
            listener: listener.to_owned(),
            slots: Mutex::default(),
        }
    }

    pub fn listener(&self) -> &str {
        &self.listener
    }

    /// Connections holding a slot right now.
    pub fn connections(&self) -> usize {
        self.lock().connections
    }

    /// Of those, the ones still in their handshake.
    pub fn handshakes(&self) -> usize {
        let s = self.lock();
        s.hello.len() + s.answered.len()
    }

    /// A slot for `client`, evicting the least progressed handshake when
    /// the listener (or its handshake share) is full.
    pub(super) fn take(
        &self,
        client: SocketAddr,
        socket: Option<OwnedFd>,
        max_connections: usize,
        max_handshakes: usize,
    ) -> Result<Taken, Refusal> {
        let now = Instant::now();
        let mut s = self.lock();
        let handshakes = s.hello.len() + s.answered.len();
        let full = s.connections >= max_connections;
        let mut evicted = None;
        if full || handshakes >= max_handshakes {
            // A reload may have lowered the limits below what is held: one
            // newcomer evicts one, so the excess drains as connections end.
            let slowest = s
                .hello
                .iter()
                .take(CANDIDATES)
                .map(|(id, p)| (*id, p.rate(now)))
                .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
                .map(|(id, _)| id);
            let Some(victim) = slowest.and_then(|id| s.hello.remove(&id)) else {
                return Err(if full {
                    Refusal::MaxConnections
                } else {
                    Refusal::MaxHandshakesInFlight
                });
            };
            victim.stage.store(Stage::Evicted as u8, Ordering::Release);
            victim.evicted.cancel();
            s.connections -= 1;
            evicted = Some(victim.client);
        }
        s.next += 1;
        let id = s.next;
        let place = Arc::new(Place {
            stage: AtomicU8::new(Stage::Hello as u8),
            evicted: CancellationToken::new(),
            client,
            accepted: now,
            socket: Mutex::new(socket.map(Arc::new)),
        });
        s.hello.insert(id, place.clone());
        s.connections += 1;
        Ok(Taken { id, place, evicted })
    }

    /// Moves a handshake on: to `Answered` (out of the eviction queue) or
    /// `Established` (out of the handshake share). Nothing for one that
    /// was evicted meanwhile.
    pub(super) fn advance(&self, id: u64, place: &Place, to: Stage) {
        let mut s = self.lock();
        let from = place.stage();
        if from == Stage::Evicted || from >= to {
            return;
        }
        let moved = match from {
            Stage::Hello => s.hello.remove(&id),
            Stage::Answered => s.answered.remove(&id),
            Stage::Established | Stage::Evicted => None,
        };
        if to == Stage::Answered
            && let Some(p) = moved
        {
            s.answered.insert(id, p);
        }
        place.stage.store(to as u8, Ordering::Release);
        if to == Stage::Established {
            // Its progress no longer matters; the descriptor goes back.
            *place.socket.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// Gives the slot back; says whether the connection was still in its
    /// handshake (or evicted from it).
    pub(super) fn release(&self, id: u64, place: &Place) -> bool {
        let mut s = self.lock();
        match place.stage() {
            Stage::Hello => {
                s.hello.remove(&id);
            }
            Stage::Answered => {
                s.answered.remove(&id);
            }
            Stage::Established => {
                s.connections -= 1;
                return false;
            }
            // Its slot went to the connection that evicted it.
            Stage::Evicted => return true,
        }
        s.connections -= 1;
        true
    }

    fn lock(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Pool {
        /// `take` without a socket to read progress from: every waiting
        /// handshake has sent nothing, so the oldest goes first.
        fn take_plain(&self, c: SocketAddr, max: usize, max_hs: usize) -> Result<Taken, Refusal> {
            self.take(c, None, max, max_hs)
        }
    }

    fn client(n: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], n))
    }

    #[test]
    fn a_full_listener_evicts_the_oldest_handshake_without_a_client_hello() {
        let pool = Pool::new("edge");
        let a = pool.take_plain(client(1), 4, 4).unwrap();
        let b = pool.take_plain(client(2), 4, 4).unwrap();
        let c = pool.take_plain(client(3), 4, 4).unwrap();
        let d = pool.take_plain(client(4), 4, 4).unwrap();
        // a is the oldest, but it sent its ClientHello; b is next.
        pool.advance(a.id, &a.place, Stage::Answered);
        pool.advance(d.id, &d.place, Stage::Established);
        let e = pool.take_plain(client(5), 4, 4).unwrap();
        assert_eq!(e.evicted, Some(client(2)));
        assert!(b.place.evicted().is_cancelled());
        assert_eq!(b.place.stage(), Stage::Evicted);
        let f = pool.take_plain(client(6), 4, 4).unwrap();
        assert_eq!(f.evicted, Some(client(3)));
        assert!(c.place.evicted().is_cancelled());
        assert_eq!(pool.connections(), 4);
        // Left: a past its ClientHello, d established, e and f waiting.
        // The next evicts e, then f; then nothing can be evicted.
        assert_eq!(
            pool.take_plain(client(7), 4, 4).unwrap().evicted,
            Some(client(5))
        );
        let _ = pool.release(e.id, &e.place);
        assert_eq!(pool.connections(), 4);
    }

    #[test]
    fn a_connection_past_the_handshake_is_never_evicted() {
        let pool = Pool::new("edge");
        let live: Vec<Taken> = (0..3)
            .map(|i| pool.take_plain(client(i), 3, 3).unwrap())
            .collect();
        for t in &live {
            pool.advance(t.id, &t.place, Stage::Established);
        }
        assert_eq!(
            pool.take_plain(client(9), 3, 3).err(),
            Some(Refusal::MaxConnections)
        );
        assert!(live.iter().all(|t| !t.place.evicted().is_cancelled()));
        assert!(!pool.release(live[0].id, &live[0].place));
        pool.take_plain(client(9), 3, 3).unwrap();
    }

    #[test]
    fn the_handshake_share_is_bounded_apart_from_the_connections() {
        let pool = Pool::new("edge");
        let a = pool.take_plain(client(1), 10, 2).unwrap();
        let b = pool.take_plain(client(2), 10, 2).unwrap();
        pool.advance(a.id, &a.place, Stage::Answered);
        pool.advance(b.id, &b.place, Stage::Answered);
        // Both handshakes are past their ClientHello: a third is refused
        // although 8 connection slots are free.
        assert_eq!(
            pool.take_plain(client(3), 10, 2).err(),
            Some(Refusal::MaxHandshakesInFlight)
        );
        pool.advance(a.id, &a.place, Stage::Established);
        assert_eq!(pool.handshakes(), 1);
        pool.take_plain(client(3), 10, 2).unwrap();
    }

    #[test]
    fn an_evicted_connection_gives_back_nothing_twice() {
        let pool = Pool::new("edge");
        let a = pool.take_plain(client(1), 1, 1).unwrap();
        let b = pool.take_plain(client(2), 1, 1).unwrap();
        assert_eq!(b.evicted, Some(client(1)));
        // The evicted connection's task ends later and releases.
        assert!(pool.release(a.id, &a.place));
        // Advancing it meanwhile changes nothing.
        pool.advance(a.id, &a.place, Stage::Answered);
        assert_eq!((pool.connections(), pool.handshakes()), (1, 1));
        assert!(pool.release(b.id, &b.place));
        assert_eq!((pool.connections(), pool.handshakes()), (0, 0));
    }
}

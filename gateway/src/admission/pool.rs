//! A listener's slots: `max_connections` in all, of which at most
//! `max_handshakes_in_flight` may still be in their handshake.
//!
//! Handshakes are kept in two queues by stage, each oldest first: those
//! still waiting for a complete ClientHello, and those past it. When the
//! listener is full, a new connection evicts the handshake that has made
//! the least progress: of the oldest few of each queue, the one whose
//! client sent the fewest bytes per second of its current turn (since
//! accept, or since the gateway's last write), the grace credited at the
//! minimum rate (`progress`). Counts are the kernel's, so a ClientHello
//! that arrived but is not read yet counts. When equally slow, a handshake
//! still without its ClientHello goes first, then the oldest.
//!
//! A slowloris goes, and so does a client that sent its ClientHello and
//! then trickles junk, or closes its window on the gateway's flight; a
//! client answering at a client's speed (milliseconds) is far ahead of
//! them. A handshake whose ClientHello the gateway holds unanswered, or
//! whose bytes it has not read yet, is not weighed (the turn is the
//! gateway's), and a connection past its handshake is never evicted by a
//! newcomer; when there is nothing to evict, the newcomer is refused.
//!
//! A source (an IPv4 address, an IPv6 /64) whose handshake was evicted
//! does not evict in turn for that handshake's grace: it is refused while
//! the listener is full. Otherwise attackers that reconnect when evicted
//! evict one another in a chain, hundreds a second, so that every one of
//! them is always young in its turn, and an allowed client in its own turn
//! (milliseconds) looks no different from them. A known source (a verified
//! certificate lately) is not held back so: an allowed client evicted in a
//! stall must not have its address's next clients refused for the grace.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use super::progress::{Now, Pace, Turn, counted};
use super::{Refusal, Stage};

/// How many of the oldest handshakes of each stage are weighed for
/// eviction.
const CANDIDATES: usize = 8;

/// Sources remembered as just evicted, at most (per listener); past it,
/// those whose time is up are forgotten, and if none is, no more are
/// remembered until some are.
const MAX_EVICTED_SOURCES: usize = 16_384;

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
    /// Sources whose handshake was evicted, until when they may not evict.
    evicted_sources: HashMap<IpAddr, Instant>,
}

impl Slots {
    fn may_evict(&self, source: IpAddr, now: Instant) -> bool {
        self.evicted_sources
            .get(&source)
            .is_none_or(|&until| until <= now)
    }

    fn evicted_from(&mut self, source: IpAddr, until: Instant, now: Instant) {
        if self.evicted_sources.len() >= MAX_EVICTED_SOURCES {
            self.evicted_sources.retain(|_, &mut u| u > now);
        }
        if self.evicted_sources.len() < MAX_EVICTED_SOURCES {
            self.evicted_sources.insert(source, until);
        }
    }
}

/// The source an eviction is remembered for: the address, or for IPv6
/// its /64 (one host may hold all of it).
fn source_of(client: SocketAddr) -> IpAddr {
    match client.ip().to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
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
    /// The client's current turn, as of the last look at its counts.
    turn: Mutex<Turn>,
    /// The minimum rate and grace it is held to.
    pace: Mutex<Pace>,
    /// The stage it was evicted in (its stage before `Evicted`).
    evicted_in: AtomicU8,
    /// Evicted when already below the minimum rate (past the point where
    /// its watch cuts it for slowness, the cut not yet made).
    evicted_slow: AtomicBool,
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

    pub(super) fn set_pace(&self, pace: Pace) {
        *self.pace.lock().unwrap_or_else(|p| p.into_inner()) = pace;
    }

    /// The stage it was in when evicted.
    pub(super) fn evicted_in(&self) -> Stage {
        Stage::from_u8(self.evicted_in.load(Ordering::Acquire))
    }

    /// Whether it was evicted below the minimum rate: it had earned its
    /// cut for slowness (and the strike that goes with it) on its own.
    pub(super) fn evicted_slow(&self) -> bool {
        self.evicted_slow.load(Ordering::Acquire)
    }

    /// Looks at the kernel's counts: whose turn it is, and the client's
    /// progress in it. None without a descriptor to read them from.
    pub(super) fn look(&self, now: Instant) -> Option<std::io::Result<Now>> {
        let fd = self.socket()?;
        Some(counted(&fd).map(|c| self.turn().look(self.stage(), c, now)))
    }

    /// Progress for eviction (see `progress`); None while the turn is the
    /// gateway's. Without counts, judged as if the client sent nothing in
    /// its turn: an unmeasured handshake is no safer than a silent one.
    fn progress(&self, now: Instant) -> Option<f64> {
        let turn = match self.look(now) {
            Some(Ok(turn)) => turn,
            Some(Err(_)) | None => self.turn().unmeasured(now),
        };
        turn.progress(*self.pace.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn turn(&self) -> MutexGuard<'_, Turn> {
        self.turn.lock().unwrap_or_else(|p| p.into_inner())
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
    /// the listener (or its handshake share) is full. A `known` client (a
    /// verified certificate lately, `sources`) may evict even just after
    /// its source was evicted: the chain breaker is for attackers who
    /// reconnect when evicted, and one allowed client evicted (a stall of
    /// its own) must not have the next ones from its address refused for
    /// the grace.
    pub(super) fn take(
        &self,
        client: SocketAddr,
        socket: Option<OwnedFd>,
        max_connections: usize,
        max_handshakes: usize,
        known: bool,
    ) -> Result<Taken, Refusal> {
        let now = Instant::now();
        let mut s = self.lock();
        let handshakes = s.hello.len() + s.answered.len();
        let full = s.connections >= max_connections;
        let mut evicted = None;
        if full || handshakes >= max_handshakes {
            let refused = if full {
                Refusal::MaxConnections
            } else {
                Refusal::MaxHandshakesInFlight
            };
            if !known && !s.may_evict(source_of(client), now) {
                return Err(refused);
            }
            // A reload may have lowered the limits below what is held: one
            // newcomer evicts one, so the excess drains as connections end.
            let slowest = s
                .hello
                .iter()
                .take(CANDIDATES)
                .chain(s.answered.iter().take(CANDIDATES))
                .filter_map(|(id, p)| Some((p.progress(now)?, p.stage(), *id)))
                .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
            let victim = slowest.and_then(|(progress, stage, id)| {
                let victim = match stage {
                    Stage::Hello => s.hello.remove(&id),
                    _ => s.answered.remove(&id),
                }?;
                Some((victim, progress))
            });
            let Some((victim, progress)) = victim else {
                return Err(refused);
            };
            let pace = *victim.pace.lock().unwrap_or_else(|p| p.into_inner());
            s.evicted_from(source_of(victim.client), now + pace.grace, now);
            // At or below the minimum rate, its watch is due to cut it
            // (progress, the grace credited, is exactly what the watch
            // holds it to); a newcomer that comes first must not spare it
            // the strike. Under load, when watches run late, those are the
            // very handshakes eviction picks.
            victim.evicted_slow.store(
                pace.min_rate > 0 && progress <= f64::from(pace.min_rate),
                Ordering::Release,
            );
            victim
                .evicted_in
                .store(victim.stage() as u8, Ordering::Release);
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
            turn: Mutex::new(Turn::new(now)),
            pace: Mutex::new(Pace::DEFAULT),
            evicted_in: AtomicU8::new(Stage::Hello as u8),
            evicted_slow: AtomicBool::new(false),
        });
        s.hello.insert(id, place.clone());
        s.connections += 1;
        Ok(Taken { id, place, evicted })
    }

    /// Moves a handshake on: to `Answered` (the gateway's turn until it
    /// writes) or `Established` (out of the handshake share). Nothing for one that
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
            let counted = p.socket().and_then(|fd| counted(&fd).ok());
            p.turn().answered(counted, Instant::now());
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
    use std::io::{Read as _, Write as _};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    use super::*;

    impl Pool {
        /// `take` without a socket to read progress from: every handshake
        /// is judged as if its client sent nothing in its turn.
        fn take_plain(&self, c: SocketAddr, max: usize, max_hs: usize) -> Result<Taken, Refusal> {
            self.take(c, None, max, max_hs, false)
        }
    }

    fn client(n: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, n as u8], 1000 + n))
    }

    /// A loopback connection: the client's end, and the gateway's.
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    /// Takes a place for the gateway's end `s`, which stays usable.
    fn take_socket(pool: &Pool, s: &TcpStream, n: u16, max: usize) -> Taken {
        let fd = s.try_clone().unwrap().into();
        pool.take(client(n), Some(fd), max, max, false).unwrap()
    }

    #[test]
    fn a_full_listener_evicts_the_least_progressed_handshake_hello_first() {
        let pool = Pool::new("edge");
        let a = pool.take_plain(client(1), 4, 4).unwrap();
        let b = pool.take_plain(client(2), 4, 4).unwrap();
        let c = pool.take_plain(client(3), 4, 4).unwrap();
        let d = pool.take_plain(client(4), 4, 4).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        // a is the oldest, but its turn (past the ClientHello) just began;
        // b, silent since accept, is next.
        pool.advance(a.id, &a.place, Stage::Answered);
        pool.advance(d.id, &d.place, Stage::Established);
        let e = pool.take_plain(client(5), 4, 4).unwrap();
        assert_eq!(e.evicted, Some(client(2)));
        assert!(b.place.evicted().is_cancelled());
        assert_eq!(b.place.stage(), Stage::Evicted);
        assert_eq!(b.place.evicted_in(), Stage::Hello);
        let f = pool.take_plain(client(6), 4, 4).unwrap();
        assert_eq!(f.evicted, Some(client(3)));
        assert!(c.place.evicted().is_cancelled());
        assert_eq!(pool.connections(), 4);
        // Left: a past its ClientHello, d established, e and f waiting
        // for theirs, silent: they go before a, whose turn is credited
        // with the grace. With them established, a goes.
        pool.advance(e.id, &e.place, Stage::Established);
        pool.advance(f.id, &f.place, Stage::Established);
        assert_eq!(
            pool.take_plain(client(7), 4, 4).unwrap().evicted,
            Some(client(1))
        );
        assert_eq!(a.place.evicted_in(), Stage::Answered);
        assert_eq!(
            pool.take_plain(client(8), 4, 4).unwrap().evicted,
            Some(client(7))
        );
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

    /// The handshake share is bounded apart from the connections: past it,
    /// a newcomer evicts, and when every handshake waits on the gateway
    /// (its ClientHello read, nothing written yet), it is refused although
    /// connection slots are free.
    #[test]
    fn the_handshake_share_is_bounded_apart_from_the_connections() {
        let pool = Pool::new("edge");
        let (mut ca, sa) = pair();
        let (mut cb, sb) = pair();
        let a = pool
            .take(
                client(1),
                Some(sa.try_clone().unwrap().into()),
                10,
                2,
                false,
            )
            .unwrap();
        let b = pool
            .take(
                client(2),
                Some(sb.try_clone().unwrap().into()),
                10,
                2,
                false,
            )
            .unwrap();
        ca.write_all(b"hello").unwrap();
        cb.write_all(b"hello").unwrap();
        // The gateway reads each ClientHello.
        let mut hello = [0u8; 5];
        (&sa).read_exact(&mut hello).unwrap();
        (&sb).read_exact(&mut hello).unwrap();
        pool.advance(a.id, &a.place, Stage::Answered);
        pool.advance(b.id, &b.place, Stage::Answered);
        assert_eq!(
            pool.take_plain(client(3), 10, 2).err(),
            Some(Refusal::MaxHandshakesInFlight)
        );
        // The gateway answers b: b's turn is the client's, and a newcomer
        // evicts it rather than grow the share.
        (&sb).write_all(b"flight").unwrap();
        let mut got = [0u8; 6];
        cb.read_exact(&mut got).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let c = pool.take_plain(client(3), 10, 2).unwrap();
        assert_eq!(c.evicted, Some(client(2)));
        assert_eq!(pool.handshakes(), 2);
        pool.advance(a.id, &a.place, Stage::Established);
        assert_eq!(pool.handshakes(), 1);
        assert_eq!(pool.take_plain(client(4), 10, 2).unwrap().evicted, None);
        drop((ca, sa));
    }

    /// Past the ClientHello, the client that keeps sending in its turn
    /// stays, and the one that went silent goes, although it is younger:
    /// progress, not age, decides.
    #[test]
    fn an_answered_handshake_making_steady_progress_is_not_chosen_over_a_stalled_one() {
        let pool = Pool::new("edge");
        let (mut steady, s_steady) = pair();
        let (mut stalled, s_stalled) = pair();
        let older = take_socket(&pool, &s_steady, 1, 2);
        let younger = take_socket(&pool, &s_stalled, 2, 2);
        for (c, s, t) in [
            (&mut steady, &s_steady, &older),
            (&mut stalled, &s_stalled, &younger),
        ] {
            c.write_all(&[0x16; 300]).unwrap();
            let mut s = s;
            s.read_exact(&mut [0u8; 300]).unwrap();
            pool.advance(t.id, &t.place, Stage::Answered);
            // The gateway's flight, delivered: the client's turn.
            s.write_all(&[0x16; 2000]).unwrap();
            let mut flight = [0u8; 2000];
            c.read_exact(&mut flight).unwrap();
        }
        // 60 bytes every 20 ms (3 KB/s) from one, nothing from the other.
        // (The gateway reads them as they come.)
        for _ in 0..15 {
            steady.write_all(&[0x17; 60]).unwrap();
            (&s_steady).read_exact(&mut [0u8; 60]).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        let newcomer = pool.take_plain(client(3), 2, 2).unwrap();
        assert_eq!(newcomer.evicted, Some(client(2)));
        assert!(younger.place.evicted().is_cancelled());
        assert!(!older.place.evicted().is_cancelled());
        assert_eq!(older.place.stage(), Stage::Answered);
    }

    /// A source whose handshake was just evicted does not evict another in
    /// turn (no chain of reconnects evicting one another); others do, and
    /// it may again once the evicted handshake's grace is over. For IPv6
    /// the source is the /64.
    #[test]
    fn a_source_just_evicted_does_not_evict_in_turn() {
        let v6 = |host: u16| SocketAddr::from(([0x2001, 0xdb8, 0, 1, 0, 0, 0, host], 443));
        let pool = Pool::new("edge");
        let a = pool.take_plain(v6(1), 2, 2).unwrap();
        a.place.set_pace(Pace {
            min_rate: 256,
            grace: Duration::from_millis(100),
        });
        pool.take_plain(client(2), 2, 2).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            pool.take_plain(client(3), 2, 2).unwrap().evicted,
            Some(v6(1))
        );
        // Another host of that /64 comes at once: refused, nothing evicted.
        assert_eq!(
            pool.take_plain(v6(2), 2, 2).err(),
            Some(Refusal::MaxConnections)
        );
        assert_eq!(pool.connections(), 2);
        std::thread::sleep(Duration::from_millis(120));
        assert!(pool.take_plain(v6(2), 2, 2).unwrap().evicted.is_some());
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

//! A listener's slots: `max_connections` in all, of which at most
//! `max_handshakes_in_flight` may still be in their handshake.
//!
//! Handshakes are kept in two queues by stage, each oldest first: those
//! still waiting for a complete ClientHello, and those past it. When the
//! listener is full, a new connection evicts, of the oldest few of each
//! queue, the handshake furthest behind a real client (`progress`):
//! first one still without its ClientHello well after a real client's
//! would have come, then one past it whose client is well past when its
//! answer would have come, then one just accepted; the longest waiting
//! first. Only milestones a peer cannot fake cheaply count (a complete,
//! parsed ClientHello; the client's flight, answered by the gateway), and
//! time measured against the round trip to the client: bytes do not, so a
//! peer streaming junk earns nothing by it. A client early in its turn
//! past the ClientHello (three round trips, and at least half the grace:
//! a client 300 ms away signing its answer) is never evicted; nor is a
//! handshake whose bytes the gateway has not read yet, or whose
//! ClientHello it holds unanswered (the turn is the gateway's), nor a
//! connection past its handshake. A source (an IPv4 /24, an IPv6 /64)
//! holding two more handshakes of the share than the newcomer's gives way
//! to it regardless (the most crowded first): peers that send real
//! ClientHellos and keep their turns short cannot keep out a source that
//! holds none. A newcomer whose source is known (a verified certificate
//! lately) displaces, besides, the oldest handshake of a source not known.
//! A known source's handshakes are spared both, the oldest few of its
//! source, its network and its identity, and half the share in all
//! (`Slots::spare`); past that they are weighed like a stranger's, after
//! every crowded one. When there is nothing to evict, the newcomer is
//! refused.
//!
//! Evicting is budgeted per evicting source (an IPv4 /24, an IPv6 /64):
//! a few a second, with a burst; a known newcomer displaces a stranger's
//! handshake outside it. Attackers that reconnect when evicted and evict
//! one another churn the handshake share only as fast as their sources'
//! budgets allow; the victims' sources are not barred, so a client
//! evicted once may come straight back.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::progress::{Class, Now, Pace, Standing, Turn, counted};
use super::sources::Lru;
use super::{Refusal, Stage};

/// How many of the oldest handshakes of each stage are weighed for
/// eviction.
const CANDIDATES: usize = 8;

/// Evictions a source (an IPv4 /24, an IPv6 /64) may make, per second
/// and at once.
const EVICTIONS_PER_SECOND: u32 = 16;
pub(super) const EVICTION_BURST: u32 = 32;

/// A known source's handshakes spared a newcomer's displacement
/// (crowding, the known lane): the oldest this many of its source (an
/// IPv4 /24, an IPv6 /64) and `KNOWN_SPARED_PER_NETWORK` of its network
/// (an IPv4 /16, an IPv6 /48), and half the share in all (at least
/// `KNOWN_SPARED_PER_SOURCE`: one client's own). A client already served
/// keeps a few parallel handshakes, a busy NAT its oldest few, but one
/// certificate verified from a few addresses or networks cannot hold the
/// share; only known handshakes count, so certless peers in a known
/// client's /16 do not strip it of its own (review 10, R10-4 to R10-6).
const KNOWN_SPARED_PER_SOURCE: u32 = 4;
const KNOWN_SPARED_PER_NETWORK: u32 = 16;

/// One identity's spared handshakes (a known handshake's identities are
/// its known slot's, the certificates that lately verified from its exact
/// address: `Sources::identities_here`, handed over by `admit`): a
/// source's worth per network, and a quarter of the spared half in all
/// (at least a source's worth). One certificate verified from four /24s
/// of a known client's /16 held the /16's 16 spared places for good, and
/// from share/32 /48s the spared half: the clients served before were
/// displaced before the flood (review 12, R12-1, R12-1b). Several
/// certificates are needed to hold a network's or the share's, each
/// issued by the PKI and revocable.
const KNOWN_SPARED_PER_IDENTITY_NETWORK: u32 = KNOWN_SPARED_PER_SOURCE;

/// One identity's spared handshakes per source (an IPv4 /24, an IPv6
/// /64).
const KNOWN_SPARED_PER_IDENTITY_SOURCE: u32 = KNOWN_SPARED_PER_SOURCE;

/// A known address's spared handshakes: a source's worth of its own,
/// while its source (/24, /64) holds twice that: one certificate verified
/// from one address of a known client's /24 held all of the /24's spared
/// places, and the client was never spared (review 14, R14-1); now it
/// holds its identity's 4 of the /24's 8, and the client's address has
/// its own.
const KNOWN_SPARED_PER_ADDRESS: u32 = KNOWN_SPARED_PER_SOURCE;
const KNOWN_SPARED_PER_SOURCE_IN_ALL: u32 = 2 * KNOWN_SPARED_PER_SOURCE;

/// A shared address's spared handshakes (a NAT address several
/// identities verified from within `known_for`) stand apart from the
/// /24's (/64's) and the network's places at single-identity addresses,
/// within the address's 4, this many per network (/16, /48), and a
/// quarter of the share in all (`shared_cap`); each is charged to every
/// identity present in all (its share/8, with its own places), as any
/// handshake there may be any one's, but to none per network. Anyone
/// behind a NAT address, certificate or not, holds its places as its
/// users do: the network's and the share's parts bound what hosts behind
/// NAT addresses take (review 19, R19-3: with neither, certless hosts at
/// share/8 CGNAT addresses of one /16 held the spared half), and a
/// single-identity address keeps the rest. The rules it took: counted
/// in the network's 16, one certificate at a few NAT addresses of a /16
/// held them (review 14, R14-3); charged to none, two certificates
/// verified from the same addresses filled every network's (review 16);
/// charged to the identity with the most room, one certificate at NAT
/// addresses held the spared half (review 17); charged 4 per identity
/// per network, 4 handshakes at one NAT address unspared every other NAT
/// address of the /16 where that identity had verified (review 18,
/// R18-1). The prices: hosts behind two NAT addresses of a network hold
/// its 8; behind NAT addresses of share/32 networks, every NAT's; and a
/// NAT address where a certificate holder verified is spared nothing
/// while that identity holds its share/8 (review 15, R15-1).
const KNOWN_SPARED_SHARED_PER_NETWORK: u32 = 8;

/// Evicting sources tracked per listener, at most: past it, the least
/// recently seen whose budget is whole again is forgotten (bounded work);
/// when none is, the newcomer does not evict.
const MAX_EVICTING_SOURCES: usize = 16_384;

/// One listener's slots, kept across reloads (by listener name).
pub struct Pool {
    listener: String,
    slots: Mutex<Slots>,
    /// The pool's tests' stand-in for the known table (`served_as`).
    #[cfg(test)]
    served: Mutex<HashMap<IpAddr, Vec<u64>>>,
}

struct Slots {
    /// Connections holding a slot: in their handshake or past it.
    connections: usize,
    next: u64,
    /// Waiting for a complete ClientHello, by admission order.
    hello: BTreeMap<u64, Arc<Place>>,
    /// Past the ClientHello, the handshake not done yet.
    answered: BTreeMap<u64, Arc<Place>>,
    /// Handshakes in the share by source: at most one entry per
    /// handshake.
    sources: HashMap<IpAddr, u32>,
    /// The same by network (an IPv4 /16, an IPv6 /48): sources rotated
    /// within one network still add up there.
    networks: HashMap<IpAddr, u32>,
    /// Spared known handshakes (`Place::spared`) by source, by network,
    /// and in all.
    spared_sources: HashMap<IpAddr, u32>,
    spared_addresses: HashMap<IpAddr, u32>,
    spared_networks: HashMap<IpAddr, u32>,
    spared: usize,
    /// The same by identity: in all (own and shared places, each of a
    /// shared place's identities charged), and for own places by network
    /// and by source.
    spared_identities: HashMap<u64, u32>,
    spared_identity_networks: HashMap<(u64, IpAddr), u32>,
    spared_identity_sources: HashMap<(u64, IpAddr), u32>,
    /// Spared at shared addresses, by network and in all.
    spared_shared: HashMap<IpAddr, u32>,
    spared_shared_in_all: usize,
    /// Known handshakes not spared, oldest first, whichever their stage:
    /// a newcomer weighs the oldest few for displacement past the oldest
    /// of each queue, so spared handshakes cannot shield them, and finds
    /// them without a walk (review 10, R10-6, R10-8).
    unspared: BTreeMap<u64, Arc<Place>>,
    /// The same by source and by network: when a spared handshake
    /// leaves, the oldest waiting of its source, of its network, or of
    /// the share that fits is spared in its place (a NAT keeps its oldest
    /// few spared, not whichever came last; a handshake refused the spare
    /// when it joined is not refused it for life: review 12, R12-2).
    waiting: HashMap<IpAddr, BTreeSet<u64>>,
    waiting_networks: HashMap<IpAddr, BTreeSet<u64>>,
    /// Handshakes of sources not known, oldest first: the ones a known
    /// newcomer displaces, found without a walk.
    strangers: BTreeMap<u64, Arc<Place>>,
    /// Established connections not authenticated (audit would-deny,
    /// `mode = "off"`) by source: at most one entry per connection.
    unauthenticated: HashMap<IpAddr, u32>,
    /// The same connections by admission order: when the listener is full
    /// and no handshake can be evicted, a newcomer evicts the oldest.
    unauthenticated_queue: BTreeMap<u64, Arc<Place>>,
    /// Established authenticated connections by identity (a keyed hash of
    /// its names): at most one entry per connection.
    identities: HashMap<u64, u32>,
    /// Keys the identities' hashes.
    hasher: std::hash::RandomState,
    /// `max_connections` as of the last newcomer.
    max_connections: usize,
    /// `max_handshakes_in_flight` as of the last newcomer.
    max_handshakes: usize,
    /// Evicting sources' budgets: when each is whole again (a GCRA's
    /// theoretical arrival time).
    evicting: Lru<IpAddr, Instant>,
}

impl Default for Slots {
    fn default() -> Slots {
        Slots {
            connections: 0,
            next: 0,
            hello: BTreeMap::new(),
            answered: BTreeMap::new(),
            sources: HashMap::new(),
            networks: HashMap::new(),
            spared_sources: HashMap::new(),
            spared_addresses: HashMap::new(),
            spared_networks: HashMap::new(),
            spared: 0,
            spared_identities: HashMap::new(),
            spared_identity_networks: HashMap::new(),
            spared_identity_sources: HashMap::new(),
            spared_shared: HashMap::new(),
            spared_shared_in_all: 0,
            unspared: BTreeMap::new(),
            waiting: HashMap::new(),
            waiting_networks: HashMap::new(),
            strangers: BTreeMap::new(),
            unauthenticated: HashMap::new(),
            unauthenticated_queue: BTreeMap::new(),
            identities: HashMap::new(),
            hasher: std::hash::RandomState::new(),
            max_connections: 0,
            max_handshakes: 0,
            evicting: Lru::new(MAX_EVICTING_SOURCES),
        }
    }
}

/// One eviction's share of a source's budget.
const EVICTION_COST: Duration = Duration::from_nanos(1_000_000_000 / EVICTIONS_PER_SECOND as u64);

impl Slots {
    /// Handshakes `source` holds in the share.
    fn held(&self, source: IpAddr) -> u32 {
        self.sources.get(&source).copied().unwrap_or(0)
    }

    /// Handshakes `network` holds in the share.
    fn held_in(&self, network: IpAddr) -> u32 {
        self.networks.get(&network).copied().unwrap_or(0)
    }

    /// A handshake of `place`'s source joined the share: a known one is
    /// spared if its source, its network, its identity and the share have
    /// room, else waits for room.
    fn joined(&mut self, place: &Arc<Place>) {
        *self.sources.entry(place.source).or_default() += 1;
        *self.networks.entry(place.network).or_default() += 1;
        if !place.known {
            self.strangers.insert(place.id, place.clone());
        } else if !self.spare(place) {
            self.unspared.insert(place.id, place.clone());
            self.waiting
                .entry(place.source)
                .or_default()
                .insert(place.id);
            self.waiting_networks
                .entry(place.network)
                .or_default()
                .insert(place.id);
        }
    }

    /// Spares a known handshake if its address and the share have room,
    /// and: at a single-identity address, its source's and network's own
    /// places and its identity in all, in the network and in the source;
    /// at a shared address, the network's and the share's shared places
    /// and every one of its identities in all. Says whether it did.
    fn spare(&mut self, place: &Place) -> bool {
        let cap = (self.max_handshakes / 2).max(KNOWN_SPARED_PER_SOURCE as usize);
        let per_identity =
            u32::try_from((self.max_handshakes / 8).max(KNOWN_SPARED_PER_SOURCE as usize))
                .unwrap_or(u32::MAX);
        if self.spared >= cap
            || count(&self.spared_addresses, &place.client.ip().to_canonical())
                >= KNOWN_SPARED_PER_ADDRESS
        {
            return false;
        }
        match place.identities.as_slice() {
            // No identity to charge: never spared (fail closed).
            [] => return false,
            [i] => {
                if count(&self.spared_sources, &place.source) >= KNOWN_SPARED_PER_SOURCE_IN_ALL
                    || count(&self.spared_networks, &place.network) >= KNOWN_SPARED_PER_NETWORK
                    || count(&self.spared_identities, i) >= per_identity
                    || count(&self.spared_identity_networks, &(*i, place.network))
                        >= KNOWN_SPARED_PER_IDENTITY_NETWORK
                    || count(&self.spared_identity_sources, &(*i, place.source))
                        >= KNOWN_SPARED_PER_IDENTITY_SOURCE
                {
                    return false;
                }
                *self.spared_identities.entry(*i).or_default() += 1;
                *self
                    .spared_identity_networks
                    .entry((*i, place.network))
                    .or_default() += 1;
                *self
                    .spared_identity_sources
                    .entry((*i, place.source))
                    .or_default() += 1;
                *self.spared_sources.entry(place.source).or_default() += 1;
                *self.spared_networks.entry(place.network).or_default() += 1;
            }
            many => {
                // A quarter of the share, one address's 4 at least: 8 at
                // least was the whole spared half below a share of 32
                // (review 20, R20-4).
                let shared_cap = (self.max_handshakes / 4).max(KNOWN_SPARED_PER_ADDRESS as usize);
                if self.spared_shared_in_all >= shared_cap
                    || count(&self.spared_shared, &place.network) >= KNOWN_SPARED_SHARED_PER_NETWORK
                    || !many
                        .iter()
                        .all(|i| count(&self.spared_identities, i) < per_identity)
                {
                    return false;
                }
                for i in many {
                    *self.spared_identities.entry(*i).or_default() += 1;
                }
                *self.spared_shared.entry(place.network).or_default() += 1;
                self.spared_shared_in_all += 1;
            }
        }
        *self
            .spared_addresses
            .entry(place.client.ip().to_canonical())
            .or_default() += 1;
        self.spared += 1;
        place.spared.store(true, Ordering::Relaxed);
        true
    }

    /// A handshake of `place`'s source left the share (and its queue): a
    /// spared one makes room for the oldest waiting handshake that fits,
    /// of the oldest few of its source, of its network and of the share
    /// (bounded work). The oldest, not its own source's first: an
    /// attacker handing its spare over (its next handshake opened, then
    /// the old one closed) does not keep it from a client that waited
    /// longer.
    fn left(&mut self, place: &Place) {
        less(&mut self.sources, &place.source);
        less(&mut self.networks, &place.network);
        if place.spared.swap(false, Ordering::Relaxed) {
            less(
                &mut self.spared_addresses,
                &place.client.ip().to_canonical(),
            );
            // Uncharged as it was charged: its identities are fixed when
            // it is taken.
            match place.identities.as_slice() {
                [] => {}
                [i] => {
                    less(&mut self.spared_identities, i);
                    less(&mut self.spared_identity_networks, &(*i, place.network));
                    less(&mut self.spared_identity_sources, &(*i, place.source));
                    less(&mut self.spared_sources, &place.source);
                    less(&mut self.spared_networks, &place.network);
                }
                many => {
                    for i in many {
                        less(&mut self.spared_identities, i);
                    }
                    less(&mut self.spared_shared, &place.network);
                    self.spared_shared_in_all -= 1;
                }
            }
            self.spared -= 1;
            let mut next: Vec<u64> = self
                .waiting
                .get(&place.source)
                .into_iter()
                .chain(self.waiting_networks.get(&place.network))
                .flat_map(|w| w.iter().take(CANDIDATES))
                .chain(self.unspared.keys().take(CANDIDATES))
                .copied()
                .collect();
            next.sort_unstable();
            next.dedup();
            for id in next {
                let Some(p) = self.hello.get(&id).or_else(|| self.answered.get(&id)) else {
                    continue;
                };
                let p = p.clone();
                if self.spare(&p) {
                    self.unwait(&p);
                    break;
                }
            }
        } else if place.known {
            self.unwait(place);
        } else {
            self.strangers.remove(&place.id);
        }
    }

    /// A known handshake no longer waits to be spared.
    fn unwait(&mut self, place: &Place) {
        self.unspared.remove(&place.id);
        for (waiting, key) in [
            (&mut self.waiting, place.source),
            (&mut self.waiting_networks, place.network),
        ] {
            if let Some(w) = waiting.get_mut(&key) {
                w.remove(&place.id);
                if w.is_empty() {
                    waiting.remove(&key);
                }
            }
        }
    }

    /// An unauthenticated connection leaves its source's count and the
    /// queue.
    fn unauthenticated_left(&mut self, id: u64, place: &Place) {
        if place.unauthenticated.swap(false, Ordering::Relaxed) {
            self.unauthenticated_queue.remove(&id);
            if let Some(n) = self.unauthenticated.get_mut(&place.source) {
                *n -= 1;
                if *n == 0 {
                    self.unauthenticated.remove(&place.source);
                }
            }
        }
    }

    /// Whether `source` may evict now (its budget is not spent).
    fn may_evict(&mut self, source: IpAddr, now: Instant) -> bool {
        let burst = EVICTION_COST * EVICTION_BURST;
        match self.evicting.get_mut(&source) {
            Some(whole) => whole.saturating_duration_since(now) + EVICTION_COST <= burst,
            None => true,
        }
    }

    /// Spends one eviction of `source`'s budget; false when there was no
    /// room to track it (then it must not evict).
    fn spend(&mut self, source: IpAddr, now: Instant) -> bool {
        let Some(whole) = self.evicting.entry(&source, || now, |&whole| whole <= now) else {
            return false;
        };
        *whole = (*whole).max(now) + EVICTION_COST;
        true
    }
}

/// `key`'s count, 0 when it has none.
fn count<K: Hash + Eq>(counts: &HashMap<K, u32>, key: &K) -> u32 {
    counts.get(key).copied().unwrap_or(0)
}

/// One less for `key`, forgotten at 0.
fn less<K: Hash + Eq>(counts: &mut HashMap<K, u32>, key: &K) {
    if let Some(n) = counts.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(key);
        }
    }
}

/// The source an eviction budget is kept for: an IPv4 /24, an IPv6 /64
/// (one host may hold all of it).
fn source_of(client: SocketAddr) -> IpAddr {
    match client.ip().to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        IpAddr::V4(v4) => IpAddr::V4((u32::from(v4) & !0xff).into()),
    }
}

/// The network a source is weighed in besides (an IPv4 /16, an IPv6
/// /48): an attacker rotating its /24s or /64s stays inside a few.
fn network_of(client: SocketAddr) -> IpAddr {
    match client.ip().to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 80) - 1)).into()),
        IpAddr::V4(v4) => IpAddr::V4((u32::from(v4) & !0xffff).into()),
    }
}

/// What the pool and a connection's ticket share about its place.
pub(super) struct Place {
    stage: AtomicU8,
    evicted: CancellationToken,
    client: SocketAddr,
    /// Its source, as evictions are budgeted and the share weighed.
    source: IpAddr,
    /// Its network, as the share is weighed too.
    network: IpAddr,
    /// Its id in the pool's queues.
    id: u64,
    /// Its source was known (a verified certificate within `known_for`)
    /// when admitted.
    known: bool,
    /// Known and spared (`Slots::spare`): only the ranking evicts it,
    /// never a newcomer's crowding or a known newcomer. Changed under the
    /// pool's lock only.
    spared: AtomicBool,
    /// The identities it is counted as (a known one's: its known slot's,
    /// `Sources::identities_here`; none for a stranger).
    identities: Vec<u64>,
    accepted: Instant,
    /// When its handshake task first looked at it (`Watch`): a close read
    /// then was there before the gateway could see it, however late the
    /// task ran.
    watched: std::sync::OnceLock<Instant>,
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
    /// Evicted at its own fault: already below the minimum rate (past the
    /// point where its watch cuts it for slowness, the cut not yet made),
    /// or past its ClientHello without a byte in the turn it had overrun.
    evicted_slow: AtomicBool,
    /// Established without being authenticated, and counted so.
    unauthenticated: AtomicBool,
    /// Established authenticated, counted against this identity's share.
    identity: Mutex<Option<u64>>,
    /// What closes it once registered (an unauthenticated connection's).
    close: Mutex<Option<CancellationToken>>,
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

    /// Its handshake task looks at it from now on (the first call counts).
    pub(super) fn watched(&self) {
        let _ = self.watched.set(Instant::now());
    }

    /// Since when the gateway could have seen the client close: its task's
    /// first look, or admission when no task looked.
    pub(super) fn looked_since(&self) -> Instant {
        self.watched.get().copied().unwrap_or(self.accepted)
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

    /// Whether it was evicted at its own fault: below the minimum rate (it
    /// had earned its cut for slowness, and the strike that goes with it),
    /// or silent past its ClientHello well after its answer was due (a
    /// peer holding a place with a replayed ClientHello).
    pub(super) fn evicted_slow(&self) -> bool {
        self.evicted_slow.load(Ordering::Acquire)
    }

    /// Whether its client is at or past the point where its watch cuts it
    /// for slowness (`handshake_min_rate` after the grace, on its turn).
    fn below_min_rate(&self, now: Instant) -> bool {
        let pace = *self.pace.lock().unwrap_or_else(|p| p.into_inner());
        let turn = match self.look(now) {
            Some(Ok(turn)) => turn,
            Some(Err(_)) | None => self.turn().unmeasured(now),
        };
        match turn {
            Now::Client { age, received } if pace.min_rate > 0 => {
                age >= pace.grace
                    + Duration::from_secs_f64(received as f64 / f64::from(pace.min_rate))
            }
            _ => false,
        }
    }

    /// Looks at the kernel's counts: whose turn it is, and the client's
    /// progress in it. None without a descriptor to read them from.
    pub(super) fn look(&self, now: Instant) -> Option<std::io::Result<Now>> {
        let fd = self.socket()?;
        Some(counted(&fd).map(|c| self.turn().look(self.stage(), c, now)))
    }

    /// Standing for eviction (see `progress`); None while it may not be
    /// evicted. Without counts, judged as if the client sent nothing in
    /// its turn: an unmeasured handshake is no safer than a silent one.
    fn standing(&self, now: Instant) -> Option<Standing> {
        let turn = match self.look(now) {
            Some(Ok(turn)) => turn,
            Some(Err(_)) | None => self.turn().unmeasured(now),
        };
        let rtt = self.turn().rtt();
        turn.standing(self.stage(), self.pace(), rtt)
    }

    pub(super) fn pace(&self) -> Pace {
        *self.pace.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Known and spared (read under the pool's lock).
    pub(super) fn spared(&self) -> bool {
        self.spared.load(Ordering::Relaxed)
    }

    /// Its standing when a newcomer may displace it although the ranking
    /// protects it; never a spared one's (a client already served keeps a
    /// few handshakes early in their turns; past that a known source's is
    /// weighed as a stranger's: one certificate from a few addresses must
    /// not hold the share, nor strip a busy NAT of its oldest). A known
    /// newcomer displaces any other (`Unknown`): the lane for clients
    /// already served, which no number of sources each holding one place
    /// can close. A newcomer from another network displaces one whose
    /// source, or network, holds two more of the share than its own
    /// (`Crowded`; a known source's past what it is spared, `Unknown`):
    /// peers sending real ClientHellos do not keep out a network that
    /// holds none.
    fn displaceable(&self, now: Instant, crowded: bool, newcomer_known: bool) -> Option<Standing> {
        if self.spared() || !(crowded || newcomer_known) {
            return None;
        }
        let waited = std::cmp::Reverse(now.saturating_duration_since(self.accepted));
        // A known source's handshake past what it is spared is weighed
        // like a stranger's that is not crowded: after every crowded
        // stranger's (a busy NAT's clients do not go before a flood's
        // crowded places), with the others by age (an attacker known from
        // a few addresses gives up its own oldest, not a first-time
        // client's new handshake).
        let class = if crowded && !self.known {
            Class::Crowded
        } else {
            Class::Unknown
        };
        Some((class, waited))
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
            #[cfg(test)]
            served: Mutex::default(),
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

    /// Of those, the known ones: spared displacement, and waiting for a
    /// spare (`Slots::spare`).
    pub fn known_handshakes(&self) -> (usize, usize) {
        let s = self.lock();
        (s.spared, s.unspared.len())
    }

    /// A slot for `client`, evicting the handshake furthest behind when
    /// the listener (or its handshake share) is full. A known client (a
    /// verified certificate lately from its exact address, `sources`:
    /// `known` holds the identities that verified from it) evicts a
    /// source not known's handshake, or its own identity's in its own
    /// source, outside any budget; another known client's within its own.
    /// Its handshake is spared as one of those identities: the pool keeps
    /// no record of its own (which forgot addresses), so a known address
    /// is never counted as its network's anonymous share.
    pub(super) fn take(
        &self,
        client: SocketAddr,
        socket: Option<OwnedFd>,
        max_connections: usize,
        max_handshakes: usize,
        known: Option<Vec<u64>>,
    ) -> Result<Taken, Refusal> {
        let now = Instant::now();
        let mut s = self.lock();
        s.max_connections = max_connections;
        s.max_handshakes = max_handshakes;
        let handshakes = s.hello.len() + s.answered.len();
        let full = s.connections >= max_connections;
        let mut evicted = None;
        // Known without an identity (never from `admit`): spared as none,
        // so never spared (`Slots::spare`).
        let (known, identities) = match known {
            Some(ids) => (true, ids),
            None => (false, Vec::new()),
        };
        if full || handshakes >= max_handshakes {
            let refused = if full {
                Refusal::MaxConnections
            } else {
                Refusal::MaxHandshakesInFlight
            };
            let evictor = source_of(client);
            // Whether the newcomer's budget allows one more eviction: a
            // known newcomer without it still displaces a source not
            // known's handshake (the lane) and its own source's, never
            // another known source's (review 10, R10-5: one certificate
            // from a few networks evicted a busy NAT's clients outside
            // any budget). Its own: out of budget, an attacker known from
            // a few addresses of one /24 otherwise gave up first-time
            // clients' handshakes rather than its own older ones.
            let budget = s.may_evict(evictor, now);
            if !known && !budget {
                return Err(refused);
            }
            // Its own: of its source and one of its identities (its exact
            // address's, as lately authenticated). Of its source alone, a
            // certificate holder in a known client's /24 or /64 (a NAT's
            // other user, a hosting /24) evicted every handshake of the
            // client's past what it is spared, outside any budget (review
            // 12, R12-3). Users of one NAT address remain one another's.
            // Every identity of the place must be the newcomer's: with one
            // in common, a certificate that verified once from a client's
            // NAT address (its co-user there for `known_for`) evicted the
            // client's handshakes for free from any other address of the
            // /24 (review 14, R14-2). And past its exact address, only a
            // single identity's: from a shared address a newcomer counts as
            // every co-user there, and a certificate that verified once
            // from a client's NAT address evicted the client's other
            // address's handshakes for free (review 16, R16-3).
            let at = client.ip().to_canonical();
            let own = |p: &Place| {
                p.source == evictor
                    && !p.identities.is_empty()
                    && p.identities.iter().all(|i| identities.contains(i))
                    && (p.client.ip().to_canonical() == at || identities.len() == 1)
            };
            let costs = |p: &Place| p.known && !own(p);
            let may_take = |p: &Place| budget || !costs(p);
            // A reload may have lowered the limits below what is held: one
            // newcomer evicts one, so the excess drains as connections end.
            // Past the ranking, a crowded source or network gives way (the
            // most crowded first), and a known newcomer displaces the
            // oldest handshake not spared (`displaceable`).
            let network = network_of(client);
            let (mine, mine_in) = (s.held(evictor), s.held_in(network));
            let weigh = |p: &Place| {
                let (held, held_in) = (s.held(p.source), s.held_in(p.network));
                // Only across networks: peers of one network crowding one
                // another would keep the whole share young, where nothing
                // is old enough to give way to anyone else (its prefixes'
                // caps of handshakes in flight bound a /24 among its
                // neighbours).
                let crowded = p.network != network && (held >= mine + 2 || held_in >= mine_in + 2);
                (crowded, std::cmp::Reverse((held, held_in)))
            };
            let ranked = s
                .hello
                .iter()
                .take(CANDIDATES)
                .chain(s.answered.iter().take(CANDIDATES))
                .filter(|(_, p)| may_take(p))
                .filter_map(|(id, p)| {
                    let (crowded, most) = weigh(p);
                    let standing = match p.standing(now) {
                        Some(standing) => standing,
                        None => p.displaceable(now, crowded, known)?,
                    };
                    Some((standing, most, *id, costs(p)))
                });
            // Besides, the oldest few handshakes not spared, wherever they
            // are in the queues, for displacement alone (their standing
            // unread: past the oldest of each queue the ranking does not
            // look, as before): a source not known's, a known source's
            // within the budget, and the newcomer's own source's oldest.
            // Spared handshakes, however old, cannot shield the others,
            // and no newcomer walks the share.
            let own = s
                .waiting
                .get(&evictor)
                .into_iter()
                .flat_map(|w| w.iter().take(CANDIDATES))
                .filter_map(|id| {
                    s.hello
                        .get_key_value(id)
                        .or_else(|| s.answered.get_key_value(id))
                })
                .find(|(_, p)| own(p));
            let displaced = s
                .strangers
                .iter()
                .take(CANDIDATES)
                .chain(
                    s.unspared
                        .iter()
                        .take(CANDIDATES)
                        .filter(|(_, p)| may_take(p)),
                )
                .chain(own)
                .filter_map(|(id, p)| {
                    let (crowded, most) = weigh(p);
                    Some((p.displaceable(now, crowded, known)?, most, *id, costs(p)))
                });
            let furthest_behind = ranked.chain(displaced).min();
            // Then, with every slot held, the oldest connection let through
            // unauthenticated (audit would-deny, `mode = "off"`).
            let (id, class, costs) = match furthest_behind {
                Some(((class, _), _, id, costs)) => (id, Some(class), costs),
                None if full => match s.unauthenticated_queue.first_key_value() {
                    Some((&id, _)) => (id, None, false),
                    None => return Err(refused),
                },
                None => return Err(refused),
            };
            if (!known || costs) && !s.spend(evictor, now) {
                return Err(refused);
            }
            let victim = s
                .hello
                .remove(&id)
                .or_else(|| s.answered.remove(&id))
                .or_else(|| s.unauthenticated_queue.get(&id).cloned());
            let Some(victim) = victim else {
                return Err(refused);
            };
            if victim.stage() == Stage::Established {
                s.unauthenticated_left(id, &victim);
                if let Some(close) = &*victim.close.lock().unwrap_or_else(|p| p.into_inner()) {
                    close.cancel();
                }
            } else {
                s.left(&victim);
                // At or below the minimum rate, its watch is due to cut it;
                // a newcomer that comes first must not spare it the strike.
                // Under load, when watches run late, those are the very
                // handshakes eviction picks.
                // Past its ClientHello, silent through a turn it overran
                // (measured: a client whose counts cannot be read is not
                // blamed): a strike, so that peers replaying a ClientHello
                // from many sources to hold the share pay for it, their
                // addresses and their networks' spread scores.
                // So too a hello silent (not a byte, not a FIN) well past
                // when its ClientHello was due: two sources of an attacker's
                // evicting each other's silent places held each up to the
                // grace, never struck, where a silent place closed past
                // grace/20 is (review 12, R12-5).
                let silent = matches!(class, Some(Class::StalledTurn | Class::StalledHello))
                    && matches!(victim.look(now), Some(Ok(Now::Client { received: 0, .. })));
                victim
                    .evicted_slow
                    .store(silent || victim.below_min_rate(now), Ordering::Release);
            }
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
            source: source_of(client),
            network: network_of(client),
            id,
            known,
            spared: AtomicBool::new(false),
            identities,
            accepted: now,
            watched: std::sync::OnceLock::new(),
            socket: Mutex::new(socket.map(Arc::new)),
            turn: Mutex::new(Turn::new(now)),
            pace: Mutex::new(Pace::DEFAULT),
            evicted_in: AtomicU8::new(Stage::Hello as u8),
            evicted_slow: AtomicBool::new(false),
            unauthenticated: AtomicBool::new(false),
            identity: Mutex::new(None),
            close: Mutex::new(None),
        });
        s.hello.insert(id, place.clone());
        s.joined(&place);
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
        if to == Stage::Established
            && let Some(p) = &moved
        {
            s.left(p);
        }
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

    /// Counts an established connection that was not authenticated against
    /// its source's cap (a quarter of `max_connections`): one source (or
    /// a NAT, or a /64) of certless peers on an audit or `off` route may
    /// not hold every slot. False when the cap is reached.
    pub(super) fn unauthenticated(&self, id: u64, place: &Arc<Place>) -> bool {
        let mut s = self.lock();
        if place.stage() != Stage::Established {
            return false;
        }
        if place.unauthenticated.load(Ordering::Relaxed) {
            return true;
        }
        let cap = u32::try_from((s.max_connections / 4).max(1)).unwrap_or(u32::MAX);
        let held = s.unauthenticated.entry(place.source).or_default();
        if *held >= cap {
            return false;
        }
        *held += 1;
        place.unauthenticated.store(true, Ordering::Relaxed);
        s.unauthenticated_queue.insert(id, place.clone());
        true
    }

    /// Counts an established authenticated connection against its
    /// identity's share of `max_connections` (`share`, at least one
    /// slot; 1.0 or more: no cap). False when the share is held: one
    /// certificate holder must not keep every other client out.
    pub(super) fn identified(&self, place: &Place, identity: &str, share: f64) -> bool {
        let mut s = self.lock();
        if place.stage() != Stage::Established {
            return false;
        }
        let mut counted = place.identity.lock().unwrap_or_else(|p| p.into_inner());
        if counted.is_some() {
            return true;
        }
        let key = std::hash::BuildHasher::hash_one(&s.hasher, identity);
        if share < 1.0 {
            // Rounded down, at least one (NaN is refused by the config).
            let cap = ((s.max_connections as f64) * share).max(1.0) as u32;
            if s.identities.get(&key).copied().unwrap_or(0) >= cap {
                return false;
            }
        }
        *s.identities.entry(key).or_default() += 1;
        *counted = Some(key);
        true
    }

    /// `close` closes `place`'s connection if it is evicted (at once if
    /// it was already).
    pub(super) fn closes_with(&self, place: &Place, close: &CancellationToken) {
        let _s = self.lock();
        if place.stage() == Stage::Evicted {
            close.cancel();
        } else if place.unauthenticated.load(Ordering::Relaxed) {
            *place.close.lock().unwrap_or_else(|p| p.into_inner()) = Some(close.clone());
        }
    }

    /// Gives the slot back; says whether the connection was still in its
    /// handshake (or evicted from it).
    pub(super) fn release(&self, id: u64, place: &Place) -> bool {
        let mut s = self.lock();
        match place.stage() {
            Stage::Hello | Stage::Answered => {
                let queue = if place.stage() == Stage::Hello {
                    &mut s.hello
                } else {
                    &mut s.answered
                };
                if let Some(p) = queue.remove(&id) {
                    s.left(&p);
                }
            }
            Stage::Established => {
                s.unauthenticated_left(id, place);
                if let Some(key) = place
                    .identity
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                    && let Some(n) = s.identities.get_mut(&key)
                {
                    *n -= 1;
                    if *n == 0 {
                        s.identities.remove(&key);
                    }
                }
                s.connections -= 1;
                return false;
            }
            // Its slot went to the connection that evicted it (past its
            // handshake if it was established).
            Stage::Evicted => return place.evicted_in() != Stage::Established,
        }
        s.connections -= 1;
        true
    }

    fn lock(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// For the pool's own tests, which have no known table: notes that
    /// `identity` verified from `client` (as the known table's slot would
    /// hold it, at most four, the newest last) for `take_served`.
    #[cfg(test)]
    pub(super) fn served_as(&self, client: IpAddr, identity: &str) {
        let key = std::hash::BuildHasher::hash_one(&self.lock().hasher, identity);
        let mut served = self.served.lock().unwrap_or_else(|p| p.into_inner());
        let ids = served.entry(client.to_canonical()).or_default();
        ids.retain(|&i| i != key);
        ids.push(key);
        if ids.len() > 4 {
            ids.remove(0);
        }
    }

    /// `take`, for the pool's own tests: a `known` client with the
    /// identities `served_as` noted for its address; one the test named
    /// none for verified as its network's certificate (the tests written
    /// before identities counted: one client per network).
    #[cfg(test)]
    pub(super) fn take_served(
        &self,
        client: SocketAddr,
        socket: Option<OwnedFd>,
        max_connections: usize,
        max_handshakes: usize,
        known: bool,
    ) -> Result<Taken, Refusal> {
        let identities = known.then(|| {
            let served = self.served.lock().unwrap_or_else(|p| p.into_inner());
            match served.get(&client.ip().to_canonical()) {
                Some(ids) => ids.clone(),
                None => vec![std::hash::BuildHasher::hash_one(
                    &self.lock().hasher,
                    network_of(client),
                )],
            }
        });
        self.take(client, socket, max_connections, max_handshakes, identities)
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
            self.take_served(c, None, max, max_hs, false)
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
        pool.take_served(client(n), Some(fd), max, max, false)
            .unwrap()
    }

    /// A pace whose grace makes a ClientHello overdue after 40 ms and a
    /// turn past it after 200 ms (on loopback, three round trips are less).
    const QUICK: Pace = Pace {
        min_rate: 256,
        grace: Duration::from_millis(400),
    };

    fn from(ip: [u8; 4]) -> SocketAddr {
        SocketAddr::from((ip, 1000))
    }

    /// With no grace: overdue as soon as taken.
    const NO_GRACE: Pace = Pace {
        min_rate: 256,
        grace: Duration::ZERO,
    };

    /// `take_plain`, the place overdue at once.
    fn take_overdue(pool: &Pool, c: SocketAddr, max: usize) -> Result<Taken, Refusal> {
        let t = pool.take_plain(c, max, max)?;
        t.place.set_pace(NO_GRACE);
        Ok(t)
    }

    /// A handshake still without its ClientHello well after a real
    /// client's would have come goes first, although younger than one
    /// past its ClientHello; a client early in its turn is never evicted;
    /// an overdue turn goes before a hello just begun.
    #[test]
    fn a_stalled_hello_goes_first_and_a_client_early_in_its_turn_never() {
        let pool = Pool::new("edge");
        let a = pool.take_plain(client(1), 2, 2).unwrap();
        a.place.set_pace(QUICK);
        pool.advance(a.id, &a.place, Stage::Answered);
        let b = pool.take_plain(client(2), 2, 2).unwrap();
        b.place.set_pace(QUICK);
        std::thread::sleep(Duration::from_millis(50));
        let c = pool.take_plain(client(3), 2, 2).unwrap();
        assert_eq!(c.evicted, Some(client(2)));
        assert_eq!(b.place.evicted_in(), Stage::Hello);
        // Just accepted, c may not be evicted yet (its ClientHello is on
        // its way); nor a, early in its turn: the newcomer is refused.
        assert_eq!(
            pool.take_plain(client(9), 2, 2).err(),
            Some(Refusal::MaxConnections)
        );
        // c, past 100 ms, its hello not overdue yet (200 ms), goes before
        // a, early in its turn (not evicted before 200 ms).
        c.place.set_pace(Pace {
            min_rate: 256,
            grace: Duration::from_millis(1000),
        });
        std::thread::sleep(Duration::from_millis(55));
        let d = pool.take_plain(client(4), 2, 2).unwrap();
        assert_eq!(d.evicted, Some(client(3)));
        assert_eq!(a.place.stage(), Stage::Answered);
        // With d's hello overdue too, and a's turn not: d goes.
        d.place.set_pace(QUICK);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            pool.take_plain(client(5), 2, 2).unwrap().evicted,
            Some(client(4))
        );
        // a's turn overdue (past 200 ms): before a hello just begun.
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(
            pool.take_plain(client(6), 2, 2).unwrap().evicted,
            Some(client(1))
        );
        assert_eq!(a.place.evicted_in(), Stage::Answered);
        assert_eq!(pool.connections(), 2);
    }

    /// Only clients early in their turn: nothing to evict, the newcomer is
    /// refused.
    #[test]
    fn clients_early_in_their_turn_are_not_evicted_the_newcomer_is_refused() {
        let pool = Pool::new("edge");
        let a = pool.take_plain(client(1), 10, 1).unwrap();
        pool.advance(a.id, &a.place, Stage::Answered);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            pool.take_plain(client(2), 10, 1).err(),
            Some(Refusal::MaxHandshakesInFlight)
        );
        assert!(!a.place.evicted().is_cancelled());
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
            .take_served(
                client(1),
                Some(sa.try_clone().unwrap().into()),
                10,
                2,
                false,
            )
            .unwrap();
        let b = pool
            .take_served(
                client(2),
                Some(sb.try_clone().unwrap().into()),
                10,
                2,
                false,
            )
            .unwrap();
        a.place.set_pace(QUICK);
        b.place.set_pace(QUICK);
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
        // The gateway answers b: b's turn is the client's, and once it is
        // overdue a newcomer evicts it rather than grow the share.
        (&sb).write_all(b"flight").unwrap();
        let mut got = [0u8; 6];
        cb.read_exact(&mut got).unwrap();
        std::thread::sleep(Duration::from_millis(250));
        let c = pool.take_plain(client(3), 10, 2).unwrap();
        assert_eq!(c.evicted, Some(client(2)));
        assert_eq!(pool.handshakes(), 2);
        pool.advance(a.id, &a.place, Stage::Established);
        assert_eq!(pool.handshakes(), 1);
        assert_eq!(pool.take_plain(client(4), 10, 2).unwrap().evicted, None);
        drop((ca, sa));
    }

    /// Past the ClientHello, bytes in the client's turn that do not end
    /// it (junk in a record that never completes) earn nothing: of two
    /// overdue turns the older goes, the one streaming 3 KB/s.
    #[test]
    fn junk_in_the_clients_turn_does_not_protect_it() {
        let pool = Pool::new("edge");
        let (mut junk, s_junk) = pair();
        let (mut silent, s_silent) = pair();
        let older = take_socket(&pool, &s_junk, 1, 2);
        let younger = take_socket(&pool, &s_silent, 2, 2);
        for (c, s, t) in [
            (&mut junk, &s_junk, &older),
            (&mut silent, &s_silent, &younger),
        ] {
            t.place.set_pace(QUICK);
            c.write_all(&[0x16; 300]).unwrap();
            let mut s = s;
            s.read_exact(&mut [0u8; 300]).unwrap();
            pool.advance(t.id, &t.place, Stage::Answered);
            // The gateway's flight, delivered: the client's turn.
            s.write_all(&[0x16; 2000]).unwrap();
            let mut flight = [0u8; 2000];
            c.read_exact(&mut flight).unwrap();
            // A look, so that the turn is dated from this flight.
            assert!(t.place.standing(Instant::now()).is_none());
            if t.id == older.id {
                // 60 bytes every 20 ms (3 KB/s), read as they come.
                for _ in 0..10 {
                    c.write_all(&[0x17; 60]).unwrap();
                    (&s_junk).read_exact(&mut [0u8; 60]).unwrap();
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(250));
        let newcomer = pool.take_plain(client(3), 2, 2).unwrap();
        assert_eq!(newcomer.evicted, Some(client(1)));
        assert!(older.place.evicted().is_cancelled());
        assert_eq!(younger.place.stage(), Stage::Answered);
    }

    /// Evicting is budgeted per evicting source (/24), not barred for the
    /// victim's: a client evicted once may evict in turn at once; one /24
    /// evicts at most its burst at once, and another /24 still may.
    #[test]
    fn evicting_is_budgeted_per_evicting_source_not_barred_for_the_victim() {
        let pool = Pool::new("edge");
        take_overdue(&pool, from([192, 0, 2, 1]), 1).unwrap();
        let b = take_overdue(&pool, from([198, 51, 100, 1]), 1).unwrap();
        assert_eq!(b.evicted, Some(from([192, 0, 2, 1])));
        // The victim comes straight back, and evicts.
        let back = take_overdue(&pool, from([192, 0, 2, 1]), 1).unwrap();
        assert_eq!(back.evicted, Some(from([198, 51, 100, 1])));
        // One /24, many addresses: its burst, then refused.
        let mut evicted = 0;
        for host in 1..=(EVICTION_BURST as u8 + 5) {
            match take_overdue(&pool, from([203, 0, 113, host]), 1) {
                Ok(t) => {
                    assert!(t.evicted.is_some());
                    evicted += 1;
                }
                Err(refusal) => assert_eq!(refusal, Refusal::MaxConnections),
            }
        }
        assert_eq!(evicted, EVICTION_BURST);
        assert!(take_overdue(&pool, from([203, 0, 114, 1]), 1).is_ok());
        // IPv6: the /64.
        let v6 = |host: u16| SocketAddr::from(([0x2001, 0xdb8, 0, 1, 0, 0, 0, host], 443));
        for host in 0..EVICTION_BURST as u16 {
            take_overdue(&pool, v6(host), 1).unwrap();
        }
        assert_eq!(
            take_overdue(&pool, v6(999), 1).err(),
            Some(Refusal::MaxConnections)
        );
    }

    /// Handshakes no newcomer may evict (early in their turns) still give
    /// way to a newcomer of another network whose source holds two fewer
    /// of the share: a few sources that each send real ClientHellos do not
    /// keep out one that holds none; balanced sources evict none; a known
    /// source's handshakes are never crowded out.
    #[test]
    fn a_crowded_source_gives_way_to_one_that_holds_none() {
        let pool = Pool::new("edge");
        let mine: Vec<Taken> = (1..=2)
            .map(|h| pool.take_plain(from([203, 0, 113, h]), 10, 2).unwrap())
            .collect();
        for t in &mine {
            pool.advance(t.id, &t.place, Stage::Answered);
        }
        assert_eq!(
            pool.take_plain(from([203, 0, 113, 3]), 10, 2).err(),
            Some(Refusal::MaxHandshakesInFlight)
        );
        let other = pool.take_plain(from([198, 51, 100, 1]), 10, 2).unwrap();
        assert_eq!(other.evicted, Some(from([203, 0, 113, 1])));
        pool.advance(other.id, &other.place, Stage::Answered);
        // One each: balanced, nothing gives way.
        assert_eq!(
            pool.take_plain(from([192, 0, 2, 1]), 10, 2).err(),
            Some(Refusal::MaxHandshakesInFlight)
        );
        assert_eq!(pool.handshakes(), 2);
        // A known client's parallel handshakes, early in their turns.
        let pool = Pool::new("edge");
        for h in 1..=2 {
            let t = pool
                .take_served(from([203, 0, 113, h]), None, 10, 2, true)
                .unwrap();
            pool.advance(t.id, &t.place, Stage::Answered);
        }
        assert_eq!(
            pool.take_plain(from([198, 51, 100, 1]), 10, 2).err(),
            Some(Refusal::MaxHandshakesInFlight)
        );
    }

    /// Review 7 F1: a known source's handshakes are spared crowding only
    /// up to four of its /24 (and sixteen of its /16), the oldest: past
    /// that, one certificate verified from a few addresses gives way to a
    /// newcomer from another network like any other source, and to a
    /// known newcomer, its handshakes past the four first (review 10
    /// R10-5: a busy NAT keeps its oldest four).
    #[test]
    fn a_known_source_holding_more_than_a_few_handshakes_is_crowded_like_any() {
        let pool = Pool::new("edge");
        for h in 1..=4 {
            let t = pool
                .take_served(from([203, 0, 113, h]), None, 20, 4, true)
                .unwrap();
            pool.advance(t.id, &t.place, Stage::Answered);
        }
        assert_eq!(
            pool.take_plain(from([198, 51, 100, 1]), 20, 4).err(),
            Some(Refusal::MaxHandshakesInFlight)
        );
        let pool = Pool::new("edge");
        for h in 1..=5 {
            let t = pool
                .take_served(from([203, 0, 113, h]), None, 20, 5, true)
                .unwrap();
            pool.advance(t.id, &t.place, Stage::Answered);
        }
        let other = pool.take_plain(from([198, 51, 100, 1]), 20, 5).unwrap();
        assert_eq!(other.evicted, Some(from([203, 0, 113, 5])));
        pool.advance(other.id, &other.place, Stage::Answered);
        // (Back to four: spared again; the stranger gives way.)
        let known = pool
            .take_served(from([192, 0, 2, 1]), None, 20, 5, true)
            .unwrap();
        assert_eq!(known.evicted, Some(from([198, 51, 100, 1])));
        // Seventeen of one /16, four per /24 at most: its network is over.
        let pool = Pool::new("edge");
        for n in 0..17u8 {
            let t = pool
                .take_served(from([203, 0, n / 4, 1 + n % 4]), None, 40, 17, true)
                .unwrap();
            pool.advance(t.id, &t.place, Stage::Answered);
        }
        let other = pool.take_plain(from([198, 51, 100, 1]), 40, 17).unwrap();
        assert!(other.evicted.is_some());
    }

    /// Sources rotated within one network (/16) add up there: each /24
    /// holds one, yet their /16 gives way to a newcomer from another.
    #[test]
    fn sources_rotated_within_a_network_add_up_there() {
        let pool = Pool::new("edge");
        for n in 1..=3 {
            let t = pool.take_plain(from([203, 0, n, 1]), 10, 3).unwrap();
            pool.advance(t.id, &t.place, Stage::Answered);
        }
        // From the same /16: nothing gives way.
        assert_eq!(
            pool.take_plain(from([203, 0, 9, 1]), 10, 3).err(),
            Some(Refusal::MaxHandshakesInFlight)
        );
        let other = pool.take_plain(from([198, 51, 100, 1]), 10, 3).unwrap();
        assert_eq!(other.evicted, Some(from([203, 0, 1, 1])));
    }

    /// HIGH 1 of the second review: a share held by handshakes early in
    /// their turns, each source holding one, refuses an unknown newcomer;
    /// a known one displaces the oldest of a source not known, and never a
    /// known source's handshake.
    #[test]
    fn a_known_newcomer_displaces_a_stranger_early_in_its_turn_never_a_known_client() {
        let pool = Pool::new("edge");
        let served = pool
            .take_served(from([192, 0, 2, 1]), None, 10, 3, true)
            .unwrap();
        pool.advance(served.id, &served.place, Stage::Answered);
        for n in 1..=2 {
            let t = pool.take_plain(from([203, n, 0, 1]), 10, 3).unwrap();
            pool.advance(t.id, &t.place, Stage::Answered);
        }
        assert_eq!(
            pool.take_plain(from([198, 51, 100, 1]), 10, 3).err(),
            Some(Refusal::MaxHandshakesInFlight)
        );
        let known = pool
            .take_served(from([192, 0, 2, 7]), None, 10, 3, true)
            .unwrap();
        assert_eq!(known.evicted, Some(from([203, 1, 0, 1])));
        pool.advance(known.id, &known.place, Stage::Answered);
        let again = pool
            .take_served(from([192, 0, 3, 7]), None, 10, 3, true)
            .unwrap();
        assert_eq!(again.evicted, Some(from([203, 2, 0, 1])));
        pool.advance(again.id, &again.place, Stage::Answered);
        // Only known clients' handshakes left, early in their turns.
        assert_eq!(
            pool.take_served(from([192, 0, 4, 7]), None, 10, 3, true)
                .err(),
            Some(Refusal::MaxHandshakesInFlight)
        );
        assert_eq!(served.place.stage(), Stage::Answered);
    }

    /// Connections established without authentication count against
    /// their source's cap, a quarter of `max_connections`; one ending
    /// frees its place; other sources have their own.
    #[test]
    fn a_source_holds_at_most_a_quarter_of_the_slots_unauthenticated() {
        let pool = Pool::new("edge");
        let certless = |pool: &Pool, ip| {
            let t = pool.take_plain(from(ip), 8, 8).unwrap();
            pool.advance(t.id, &t.place, Stage::Established);
            let held = pool.unauthenticated(t.id, &t.place);
            (t, held)
        };
        let (a, ok) = certless(&pool, [203, 0, 113, 1]);
        assert!(ok);
        let (_b, ok) = certless(&pool, [203, 0, 113, 2]);
        assert!(ok);
        let (_c, ok) = certless(&pool, [203, 0, 113, 3]);
        assert!(!ok, "a third of 8 slots from one /24");
        assert!(certless(&pool, [198, 51, 100, 1]).1);
        assert!(!pool.release(a.id, &a.place));
        assert!(certless(&pool, [203, 0, 113, 4]).1);
    }

    /// With every slot held and no handshake to evict, a newcomer evicts
    /// the oldest connection let through unauthenticated, closing it (at
    /// once if registered later); authenticated ones never.
    #[test]
    fn a_full_listener_evicts_the_oldest_unauthenticated_connection() {
        let pool = Pool::new("edge");
        let certless = pool.take_plain(from([203, 0, 113, 1]), 2, 2).unwrap();
        pool.advance(certless.id, &certless.place, Stage::Established);
        assert!(pool.unauthenticated(certless.id, &certless.place));
        let close = CancellationToken::new();
        pool.closes_with(&certless.place, &close);
        let authed = pool.take_plain(from([203, 0, 113, 2]), 2, 2).unwrap();
        pool.advance(authed.id, &authed.place, Stage::Established);
        let newcomer = pool.take_plain(from([198, 51, 100, 1]), 2, 2).unwrap();
        assert_eq!(newcomer.evicted, Some(from([203, 0, 113, 1])));
        assert!(close.is_cancelled());
        assert_eq!(certless.place.evicted_in(), Stage::Established);
        // Its end is no failed handshake, and gives back nothing.
        assert!(!pool.release(certless.id, &certless.place));
        assert_eq!(pool.connections(), 2);
        pool.advance(newcomer.id, &newcomer.place, Stage::Established);
        assert_eq!(
            pool.take_plain(from([198, 51, 100, 2]), 2, 2).err(),
            Some(Refusal::MaxConnections)
        );
        assert_eq!(authed.place.stage(), Stage::Established);
    }

    /// MEDIUM 8 of the second review: one identity holds at most its
    /// share of `max_connections` established; another identity is not
    /// held back by it; a connection ending frees its place.
    #[test]
    fn one_identity_holds_at_most_its_share_of_the_slots() {
        let pool = Pool::new("edge");
        let live = |pool: &Pool, n: u16, identity: &str| {
            let t = pool.take_plain(client(n), 10, 10).unwrap();
            pool.advance(t.id, &t.place, Stage::Established);
            let ok = pool.identified(&t.place, identity, 0.5);
            (t, ok)
        };
        let held: Vec<Taken> = (0..5)
            .map(|n| {
                let (t, ok) = live(&pool, n, "batch");
                assert!(ok);
                t
            })
            .collect();
        assert!(!live(&pool, 5, "batch").1, "a sixth of 10 slots");
        assert!(live(&pool, 6, "frontend").1);
        assert!(!pool.release(held[0].id, &held[0].place));
        assert!(live(&pool, 7, "batch").1);
        // 1.0: no cap.
        let pool = Pool::new("edge");
        for n in 0..10 {
            let t = pool.take_plain(client(n), 10, 10).unwrap();
            pool.advance(t.id, &t.place, Stage::Established);
            assert!(pool.identified(&t.place, "batch", 1.0));
        }
    }

    #[test]
    fn an_evicted_connection_gives_back_nothing_twice() {
        let pool = Pool::new("edge");
        let a = take_overdue(&pool, client(1), 1).unwrap();
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

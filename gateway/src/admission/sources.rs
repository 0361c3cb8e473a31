//! Per-source accounting: for each source address, each prefix (/24, /64
//! by default) and each network (/16, /48), a token bucket of handshakes,
//! the handshakes in flight, and strikes (failed handshakes and refusals)
//! within a window. A source's strike is a strike of its prefix and its
//! network too, each with its own threshold: an attacker who spreads over
//! many addresses (a /48 of IPv6 holds 65536 /64s) gets the prefix or the
//! network blocked instead.
//!
//! An attacker chooses how many sources there are, so the tables are
//! bounded: each holds at most `max_tracked` entries. A new one makes the
//! least recently seen *idle* entry go (nothing in flight, no strikes in
//! the window, a full bucket: forgetting it loses nothing). Entries that
//! are not idle are never forgotten: otherwise one connection from each of
//! 65536 fresh /64s would wipe an attacker's strikes. When no idle entry
//! is found for its address (or prefix), a new source is tracked by its
//! coarser groups alone, admitted or refused by their limits: an attacker
//! holding the table busy cannot have every new source refused. Only when
//! the networks' table is full too is it refused (`max_tracked`): fail
//! closed.
//!
//! Except for a *known* source: an address whose connection on a listener
//! authenticated with a verified certificate within `known_for`,
//! remembered per listener in a table of its own (`max_known`, least
//! recently verified forgotten first; only a verified certificate makes
//! an entry, so an attacker without one cannot fill it), with what
//! verified it ([`Proof`]), which each reload judges again. A known
//! source passes a full networks table, held to its own address's limits
//! (its entry in the known table counts them when the addresses' table
//! has no room; the other addresses of its IPv6 /64 share another count):
//! an attacker spread over thousands of networks keeps new sources out,
//! not the clients who were already served.
//!
//! Strikes within a window catch an attacker who fails often; one who
//! spreads thin (one failure per address per window, over many addresses
//! of a prefix) stays under every threshold. So each prefix and network
//! also keeps a *spread* score over a longer horizon: each address adds
//! at most one point a window for its failures, each address that
//! authenticated with a verified certificate takes at most one point a
//! window away (never below zero), and the score halves every
//! `spread_half_life`. At `prefix_spread_block_after`
//! (`network_spread_block_after`) the group is blocked. One address alone
//! can never get there (the config must set the threshold above what one
//! point a window adds up to), and a prefix whose clients keep succeeding
//! pays its failing ones' points back.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher as _, Hash, RandomState};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::config::AdmissionSettings;

use super::Refusal;

/// Entries looked at, oldest first, for one to forget before a new source
/// is refused: a bound on the work a full table costs per connection.
/// Each busy entry looked at goes to the back, so the next search starts
/// past it.
const SEARCH: usize = 32;

/// A map of at most `capacity` entries: inserting into a full one forgets
/// the least recently used idle entry. Lookups and inserts are O(log n).
pub(super) struct Lru<K, V> {
    map: HashMap<K, (V, u64)>,
    order: BTreeMap<u64, K>,
    clock: u64,
    capacity: usize,
    /// Entries forgotten to make room, since start.
    pub forgotten: u64,
    /// The keys forgotten since the last [`Lru::take_gone`], for a table
    /// whose keys are counted elsewhere (None: not kept).
    gone: Option<Vec<K>>,
}

impl<K: Hash + Eq + Clone, V> Lru<K, V> {
    pub fn new(capacity: usize) -> Self {
        Lru {
            map: HashMap::new(),
            order: BTreeMap::new(),
            clock: 0,
            capacity: capacity.max(1),
            forgotten: 0,
            gone: None,
        }
    }

    /// Keeps the keys it forgets for [`Lru::take_gone`].
    pub fn keeping_gone(mut self) -> Self {
        self.gone = Some(Vec::new());
        self
    }

    /// The keys forgotten since the last call.
    pub fn take_gone(&mut self) -> Vec<K> {
        self.gone.as_mut().map(std::mem::take).unwrap_or_default()
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.map.keys()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.map.iter().map(|(k, (v, _))| (k, v))
    }

    /// The entry for `key`, if it is still tracked (not marked as used).
    pub fn get(&self, key: &K) -> Option<&V> {
        self.map.get(key).map(|(v, _)| v)
    }

    /// Forgets `key`'s entry; false when there was none.
    pub fn remove(&mut self, key: &K) -> bool {
        match self.map.remove(key) {
            Some((_, stamp)) => {
                self.order.remove(&stamp);
                true
            }
            None => false,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// A smaller capacity forgets idle entries at once, least recently
    /// used first; busy ones stay (the table refuses newcomers until it
    /// is back within bounds).
    pub fn set_capacity(&mut self, capacity: usize, idle: impl Fn(&V) -> bool) {
        self.capacity = capacity.max(1);
        let excess = self.map.len().saturating_sub(self.capacity);
        let gone: Vec<(u64, K)> = self
            .order
            .iter()
            .filter(|(_, k)| self.map.get(*k).is_some_and(|(v, _)| idle(v)))
            .take(excess)
            .map(|(s, k)| (*s, k.clone()))
            .collect();
        for (stamp, key) in gone {
            self.order.remove(&stamp);
            self.map.remove(&key);
            self.forgotten += 1;
            if let Some(g) = &mut self.gone {
                g.push(key);
            }
        }
    }

    /// The entry for `key`, made with `make` if there is none, marked as
    /// just used; None when the table is full and no idle entry was found
    /// to make room.
    pub fn entry(
        &mut self,
        key: &K,
        make: impl FnOnce() -> V,
        idle: impl Fn(&V) -> bool,
    ) -> Option<&mut V> {
        if let Some((_, at)) = self.map.get(key) {
            let old = *at;
            self.order.remove(&old);
        } else {
            while self.map.len() >= self.capacity {
                if !self.forget_idle(&idle) {
                    return None;
                }
            }
            self.map.insert(key.clone(), (make(), 0));
        }
        self.clock += 1;
        let stamp = self.clock;
        self.order.insert(stamp, key.clone());
        let slot = self.map.get_mut(key)?;
        slot.1 = stamp;
        Some(&mut slot.0)
    }

    /// The least recently used entry.
    pub fn oldest(&self) -> Option<&V> {
        let (_, key) = self.order.first_key_value()?;
        self.map.get(key).map(|(v, _)| v)
    }

    /// Forgets the least recently used entry, busy or not, and gives it
    /// back: for a table whose entries are counted elsewhere.
    pub fn pop_oldest(&mut self) -> Option<(K, V)> {
        let (_, key) = self.order.pop_first()?;
        let (value, _) = self.map.remove(&key)?;
        self.forgotten += 1;
        Some((key, value))
    }

    /// The entry for `key`, if it is still tracked (not marked as used).
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.map.get_mut(key).map(|(v, _)| v)
    }

    /// Forgets the least recently used idle entry among the `SEARCH`
    /// oldest; false when there is none.
    fn forget_idle(&mut self, idle: &impl Fn(&V) -> bool) -> bool {
        for _ in 0..SEARCH {
            let Some((_, key)) = self.order.pop_first() else {
                return false;
            };
            if self.map.get(&key).is_some_and(|(v, _)| idle(v)) {
                self.map.remove(&key);
                self.forgotten += 1;
                if let Some(g) = &mut self.gone {
                    g.push(key);
                }
                return true;
            }
            self.clock += 1;
            let stamp = self.clock;
            if let Some(slot) = self.map.get_mut(&key) {
                slot.1 = stamp;
            }
            self.order.insert(stamp, key);
        }
        false
    }
}

/// Handshakes as tokens: `burst` at most, refilled at `rate` per second.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: u32, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(burst),
            at: now,
        }
    }

    fn tokens_at(&self, rate: u32, burst: u32, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + elapsed * f64::from(rate)).min(f64::from(burst))
    }

    /// Takes one token if there is one.
    fn take(&mut self, rate: u32, burst: u32, now: Instant) -> bool {
        self.tokens = self.tokens_at(rate, burst, now);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What is known about one source, prefix or network.
#[derive(Debug, Clone)]
pub(super) struct Tally {
    bucket: Bucket,
    in_flight: u32,
    strikes: u32,
    /// Strikes of an address passed on to its prefix and network in the
    /// window (pay-back does not take them back).
    lent: u32,
    strikes_since: Instant,
    /// A prefix's or network's spread score, as of `spread_at`.
    spread: f64,
    spread_at: Instant,
    /// When an address last gave its groups' spread scores a point, and
    /// when it last took one off.
    pointed: Option<Instant>,
    credited: Option<Instant>,
}

impl Tally {
    /// Past `block_window` since its strikes began: a new window, with no
    /// strikes and nothing lent.
    fn roll_window(&mut self, window: std::time::Duration, now: Instant) {
        if now.saturating_duration_since(self.strikes_since) > window {
            self.strikes = 0;
            self.lent = 0;
            self.strikes_since = now;
        }
    }

    fn new(burst: u32, now: Instant) -> Tally {
        Tally {
            bucket: Bucket::full(burst, now),
            in_flight: 0,
            strikes: 0,
            lent: 0,
            strikes_since: now,
            spread: 0.0,
            spread_at: now,
            pointed: None,
            credited: None,
        }
    }

    /// The spread score at `now`: halved every `half_life`.
    fn spread_at(&self, half_life: Duration, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.spread_at).as_secs_f64();
        self.spread * (-elapsed / half_life.as_secs_f64().max(1e-3)).exp2()
    }

    /// Adds `points` (negative: takes them away, never below zero).
    fn add_spread(&mut self, points: f64, half_life: Duration, now: Instant) -> f64 {
        self.spread = (self.spread_at(half_life, now) + points).max(0.0);
        self.spread_at = now;
        self.spread
    }

    /// Whether forgetting it now loses nothing: no handshake in flight, no
    /// strike within the window, a bucket full again, a spread score below
    /// a quarter of its threshold (a lone failure's point is not kept for
    /// the whole horizon: that would let an attacker hold a network's
    /// entry busy with one failure every few minutes instead of one a
    /// window).
    fn idle(&self, limits: &Limits, settings: &AdmissionSettings, now: Instant) -> bool {
        self.in_flight == 0
            // (An address that gave its point this window keeps it given:
            // forgotten, it would give another.)
            && self
                .pointed
                .is_none_or(|p| now.saturating_duration_since(p) > settings.block_window)
            && (limits.spread_after == 0
                || self.spread_at(settings.spread_half_life, now)
                    < f64::from(limits.spread_after) / 4.0)
            && (self.strikes == 0
                || now.saturating_duration_since(self.strikes_since) > settings.block_window)
            && (limits.rate == 0
                || self.bucket.tokens_at(limits.rate, limits.burst, now) >= f64::from(limits.burst))
    }
}

/// How coarse a group of sources is: the tables, and the levels of
/// blocks (`gateway_blocks_total{level}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Level {
    /// One address (/32, /128).
    Address,
    /// `ipv4_prefix`, `ipv6_prefix` (/24, /64).
    Prefix,
    /// `ipv4_network`, `ipv6_network` (/16, /48).
    Network,
}

impl Level {
    pub const ALL: [Level; 3] = [Level::Address, Level::Prefix, Level::Network];

    pub fn as_str(self) -> &'static str {
        match self {
            Level::Address => "address",
            Level::Prefix => "prefix",
            Level::Network => "network",
        }
    }

    /// The level a block list entry's width falls in: a single address;
    /// as narrow as a prefix; wider.
    pub fn of(net: IpNet, settings: &AdmissionSettings) -> Level {
        let prefix = match net {
            IpNet::V4(_) => settings.ipv4_prefix,
            IpNet::V6(_) => settings.ipv6_prefix,
        };
        if net.prefix_len() == net.max_prefix_len() {
            Level::Address
        } else if net.prefix_len() >= prefix {
            Level::Prefix
        } else {
            Level::Network
        }
    }

    /// The group of this level `source` is in.
    pub fn group(self, source: IpAddr, settings: &AdmissionSettings) -> IpNet {
        let len = match (self, source) {
            (Level::Address, _) => return IpNet::from(source),
            (Level::Prefix, IpAddr::V4(_)) => settings.ipv4_prefix,
            (Level::Prefix, IpAddr::V6(_)) => settings.ipv6_prefix,
            (Level::Network, IpAddr::V4(_)) => settings.ipv4_network,
            (Level::Network, IpAddr::V6(_)) => settings.ipv6_network,
        };
        // The lengths are checked when the config is read.
        IpNet::new(source, len)
            .map(|n| n.trunc())
            .unwrap_or_else(|_| IpNet::from(source))
    }

    /// What exceeding this level's rate or in-flight cap is refused as.
    fn refusals(self) -> (Refusal, Refusal) {
        match self {
            Level::Address => (Refusal::SourceRate, Refusal::SourceHandshakes),
            Level::Prefix => (Refusal::PrefixRate, Refusal::PrefixHandshakes),
            Level::Network => (Refusal::NetworkRate, Refusal::NetworkHandshakes),
        }
    }
}

/// The limits of one table.
#[derive(Debug, Clone, Copy)]
struct Limits {
    rate: u32,
    burst: u32,
    in_flight: u32,
    /// Strikes within `block_window` that block the group; 0: never.
    block_after: u32,
    /// The spread score that blocks the group; 0: never (an address has
    /// none).
    spread_after: u32,
}

impl Limits {
    fn of(level: Level, s: &AdmissionSettings) -> Limits {
        match level {
            Level::Address => Limits {
                rate: s.source_handshakes_per_second,
                burst: s.source_handshake_burst,
                in_flight: s.source_handshakes_in_flight,
                block_after: s.block_after,
                spread_after: 0,
            },
            Level::Prefix => Limits {
                rate: s.prefix_handshakes_per_second,
                burst: s.prefix_handshake_burst,
                in_flight: s.prefix_handshakes_in_flight,
                block_after: s.prefix_block_after,
                spread_after: s.prefix_spread_block_after,
            },
            Level::Network => Limits {
                rate: s.network_handshakes_per_second,
                burst: s.network_handshake_burst,
                in_flight: s.network_handshakes_in_flight,
                block_after: s.network_block_after,
                spread_after: s.network_spread_block_after,
            },
        }
    }
}

/// The IPv6 allocation (`ipv6_allocation`) `source` is in, while a quota
/// of networks per allocation is set.
fn allocation(source: IpAddr, settings: &AdmissionSettings) -> Option<IpNet> {
    match source {
        IpAddr::V6(_) if settings.networks_per_allocation > 0 => {
            IpNet::new(source, settings.ipv6_allocation)
                .ok()
                .map(|n| n.trunc())
        }
        _ => None,
    }
}

/// The address, prefix and network a handshake was counted in (None: not
/// tracked at that level, its table full), and where the address's count
/// is when it is in the known table (a known source past full tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Groups {
    nets: [Option<IpNet>; 3],
    known: Option<(KnownKey, Counted)>,
}

/// Which count of a known entry a handshake past full tables is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counted {
    /// The exact address that verified: its own limits (review 10,
    /// R10-10: a host of its /64 that never verified does not use them).
    Exact(IpAddr),
    /// Any other address of a known /64: one count of handshakes for all
    /// of them (their strikes are each address's own, `Known::struck`).
    Strangers,
}

impl Groups {
    fn tracked(&self) -> impl Iterator<Item = (Level, IpNet)> + use<> {
        Level::ALL
            .into_iter()
            .zip(self.nets)
            .filter_map(|(level, g)| g.map(|g| (level, g)))
    }
}

/// The key a source is known by: an IPv4 address, an IPv6 /64 (a host's
/// privacy addresses rotate within it).
fn known_key(source: IpAddr) -> IpAddr {
    match source {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

/// A known entry is per listener (a keyed hash of its name: a certificate
/// one listener allows earns nothing on another, review 10 R10-11) and
/// per [`known_key`].
type KnownKey = (u64, IpAddr);

/// One known slot, as a reload judges it ([`Sources::judging`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotRef(KnownKey, IpAddr);

impl SlotRef {
    /// The exact address that verified.
    pub fn addr(&self) -> IpAddr {
        self.1
    }
}

/// Exact addresses one identity keeps per known entry (its newest that
/// verified): an IPv6 host rotating its privacy addresses verifies from a
/// few at a time.
const EXACT: usize = 4;

/// Exact addresses per known entry, all identities together: a /64 shared
/// by several certificate holders (an office LAN, a node's pods).
const SLOTS: usize = 8;

/// Other identities' proofs one exact address keeps (the newest that
/// verified from it before its slot's identity): behind a NAT, a reload
/// that refuses the last verifier falls back on one of them, so revoking
/// one co-user does not forget the address for everyone behind it
/// (attacker review 11, R11-2).
const CO_USERS: usize = 3;

/// Addresses of a known /64 that never verified there, each with its own
/// strikes (the least recently struck forgotten first): a strangers'
/// block falls on an address that failed `block_after` times itself, not
/// on whichever address struck last (attacker review 11, R11-3: a
/// neighbour's failures got a known client's rotated address blocked).
const STRANGERS: usize = 8;

/// What a known address's certificate was verified with: what a reload
/// needs to tell whether its new trust and policy would still admit it
/// ([`super::Admission::revalidate`]), without keeping the chain.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Proof {
    /// What the routes' policies judge.
    pub identity: crate::identity::Identity,
    /// The anchor its path ended at: subject (DER name) and key.
    pub anchor: (Vec<u8>, Vec<u8>),
    /// The issuer (its DER name, as webpki and a CRL spell it) and serial
    /// of each certificate of the verified path, leaf first (at most
    /// 1 + `MAX_INTERMEDIATES`, whatever else the client sent).
    pub certs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// One exact address of a known entry.
#[derive(Debug, Clone)]
struct Slot {
    addr: IpAddr,
    /// When it last verified.
    at: Instant,
    /// The identity it last verified as (a keyed hash of its names).
    identity: u64,
    proof: Arc<Proof>,
    /// Other identities that verified from the address before
    /// ([`CO_USERS`], newest first), with when and what verified them.
    others: Vec<(u64, Instant, Arc<Proof>)>,
    /// Its address's count when the addresses' table has no room.
    tally: Tally,
}

/// A known source (an IPv4 address, an IPv6 /64) on one listener: the
/// exact addresses that verified (only they get the privileges a
/// certificate earns beyond being admitted past full tables), and one
/// count for the entry's other addresses.
/// A co-user's proof at a slot: its identity, when it verified, what
/// verified it.
type CoUser = (u64, Instant, Arc<Proof>);

/// Whether a co-user taking over a slot may make room in its identity's
/// quota (a reload's judgement, once per slot) or must find it there (a
/// quota's own displacement: no chain of them).
#[derive(Clone, Copy)]
enum Room {
    Make,
    AsItIs,
}

#[derive(Debug, Clone)]
struct Known {
    slots: Vec<Slot>,
    /// The count of its other addresses' handshakes (in flight, rate).
    strangers: Tally,
    /// Their strikes, per address ([`STRANGERS`], least recently struck
    /// first).
    struck: Vec<(IpAddr, Tally)>,
    /// The network its identities' quotas count it in (as of its making).
    net: IpNet,
}

impl Known {
    /// When its newest slot verified.
    fn newest(&self) -> Option<Instant> {
        self.slots.iter().map(|s| s.at).max()
    }

    /// When `identity` last verified here.
    fn last_of(&self, identity: u64) -> Option<Instant> {
        self.slots
            .iter()
            .filter(|s| s.identity == identity)
            .map(|s| s.at)
            .max()
    }

    fn holds(&self, identity: u64) -> bool {
        self.slots.iter().any(|s| s.identity == identity)
    }

    /// Notes that `source` verified as `identity`: its own slot, or its
    /// identity's oldest past [`EXACT`], or room among [`SLOTS`]. A full
    /// entry takes a slot from the identity that holds the most, never
    /// the last of another (review 10 R10-7: a co-tenant of a /64 with
    /// another certificate cannot push a client out), else one past
    /// `known_for`; else `source` is not remembered (None). Gives back
    /// the other identities whose slot it took.
    fn place(
        &mut self,
        source: IpAddr,
        identity: u64,
        proof: Arc<Proof>,
        known_for: Duration,
        burst: u32,
        now: Instant,
    ) -> Option<Vec<u64>> {
        let mut lost = Vec::new();
        if let Some(s) = self.slots.iter_mut().find(|s| s.addr == source) {
            if s.identity != identity {
                lost.push(s.identity);
                s.others.retain(|(id, _, _)| *id != identity);
                s.others.insert(0, (s.identity, s.at, s.proof.clone()));
                s.others.truncate(CO_USERS);
                s.identity = identity;
            }
            s.at = now;
            s.proof = proof;
            s.tally.strikes = s.tally.strikes.saturating_sub(1);
        } else {
            let oldest_of = |slots: &[Slot], id: u64| {
                slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.identity == id)
                    .min_by_key(|(_, s)| s.at)
                    .map(|(i, _)| i)
            };
            let count = |slots: &[Slot], id: u64| slots.iter().filter(|s| s.identity == id).count();
            let victim = if count(&self.slots, identity) >= EXACT {
                oldest_of(&self.slots, identity)
            } else if self.slots.len() < SLOTS {
                None
            } else {
                let top = self
                    .slots
                    .iter()
                    .map(|s| (count(&self.slots, s.identity), s.identity))
                    .max_by_key(|(n, _)| *n);
                match top {
                    Some((n, id)) if n > 1 => oldest_of(&self.slots, id),
                    _ => {
                        let stale = self
                            .slots
                            .iter()
                            .enumerate()
                            .filter(|(_, s)| now.saturating_duration_since(s.at) > known_for)
                            .min_by_key(|(_, s)| s.at)
                            .map(|(i, _)| i);
                        let Some(i) = stale else {
                            // Every slot of another identity, each its
                            // last, each within `known_for`.
                            return None;
                        };
                        Some(i)
                    }
                }
            };
            let slot = Slot {
                addr: source,
                at: now,
                identity,
                proof,
                others: Vec::new(),
                tally: Tally::new(burst, now),
            };
            match victim.and_then(|i| self.slots.get_mut(i)) {
                Some(old) => {
                    if old.identity != identity {
                        lost.push(old.identity);
                    }
                    *old = slot;
                }
                None => self.slots.push(slot),
            }
        }
        Some(lost)
    }
}

/// One identity's known entries on one listener: running counts (no scan
/// at a verification, review 10 R10-9) and the order they verified in.
#[derive(Debug, Default)]
struct Holder {
    entries: u32,
    /// Its entries per network (/16, /48): each gets at most a quarter of
    /// the identity's quota (review 10 R10-2), with their own queue (as
    /// `order`) to take the least recently verified from at the quota
    /// (R11-4).
    per_net: HashMap<IpNet, (u32, VecDeque<(IpAddr, Instant)>)>,
    /// Its networks by how many entries each holds: the largest without
    /// a scan.
    sizes: BTreeSet<(u32, IpNet)>,
    /// Its entries' keys as they verified, oldest first (near enough: an
    /// entry another identity took a slot of is queued again), each with
    /// when: an item whose entry verified again since is stale, dropped
    /// when met at the front, and the queue is compacted past twice its
    /// entries.
    order: VecDeque<(IpAddr, Instant)>,
}

impl Holder {
    fn in_net(&self, net: &IpNet) -> u32 {
        self.per_net.get(net).map_or(0, |(n, _)| *n)
    }

    /// One more entry, in `net`.
    fn gained(&mut self, net: IpNet) {
        self.entries += 1;
        let n = self.per_net.entry(net).or_default();
        self.sizes.remove(&(n.0, net));
        n.0 += 1;
        self.sizes.insert((n.0, net));
    }

    /// One entry less, in `net`.
    fn lost(&mut self, net: IpNet) {
        self.entries = self.entries.saturating_sub(1);
        if let Some(n) = self.per_net.get_mut(&net) {
            self.sizes.remove(&(n.0, net));
            n.0 = n.0.saturating_sub(1);
            if n.0 == 0 {
                self.per_net.remove(&net);
            } else {
                self.sizes.insert((n.0, net));
            }
        }
    }

    /// Its entry `addr` (in `net`) verified at `at`. Whether its queues
    /// want compacting.
    fn queue(&mut self, addr: IpAddr, at: Instant, net: IpNet) -> bool {
        self.order.push_back((addr, at));
        let mut long = self.order.len() > 2 * self.entries as usize + 8;
        if let Some((n, q)) = self.per_net.get_mut(&net) {
            q.push_back((addr, at));
            long |= q.len() > 2 * *n as usize + 8;
        }
        long
    }
}

/// Source addresses, prefixes and networks, each in a bounded table (by
/// [`Level`]), and the known sources.
pub(super) struct Sources {
    addresses: Lru<IpNet, Tally>,
    prefixes: Lru<IpNet, Tally>,
    networks: Lru<IpNet, Tally>,
    known: Lru<KnownKey, Known>,
    /// Per (listener, identity): its known entries.
    holders: HashMap<(u64, u64), Holder>,
    /// Per identity: its known entries over all listeners, held to a
    /// quarter of the table (one certificate allowed on four listeners
    /// must not flush the clients already served: attacker review 11,
    /// R11-9).
    across: HashMap<u64, u32>,
    /// The listeners known entries are of, by their key's hash.
    listeners: HashMap<u64, Arc<str>>,
    /// Exact addresses a reload made known no more, with when they last
    /// verified: no privilege, but still the clients served before that
    /// reload that `auto_revert` listens to ([`Sources::vouched`]).
    formerly: Lru<(u64, IpAddr), Instant>,
    /// Keys the identity and listener hashes (an attacker chooses no
    /// collisions).
    identities: RandomState,
    /// The generation the known entries were last judged at
    /// ([`Sources::revalidated`]): a handshake judged by an older state
    /// makes no one known (review 10 R10-3).
    judged: u64,
    /// Entries of the networks' table per IPv6 allocation
    /// (`ipv6_allocation`), while `networks_per_allocation` is set: at most
    /// as many keys as the networks' table has entries.
    allocations: HashMap<IpNet, u32>,
    /// Handshakes of known sources admitted past a full networks table,
    /// since start.
    pub known_admitted: u64,
    /// Verifications not remembered: the known table was full of entries
    /// verified within `known_for`.
    pub known_full: u64,
}

impl Sources {
    pub fn new(settings: &AdmissionSettings) -> Sources {
        let n = settings.max_tracked as usize;
        Sources {
            addresses: Lru::new(n),
            prefixes: Lru::new(n),
            networks: Lru::new(n).keeping_gone(),
            known: Lru::new(settings.max_known as usize),
            holders: HashMap::new(),
            across: HashMap::new(),
            listeners: HashMap::new(),
            formerly: Lru::new(settings.max_known as usize),
            identities: RandomState::new(),
            judged: 0,
            allocations: HashMap::new(),
            known_admitted: 0,
            known_full: 0,
        }
    }

    fn listener_key(&self, listener: &str) -> u64 {
        self.identities.hash_one(("listener", listener))
    }

    /// The count of `group` at `level`: in its table, or for a known
    /// source's address, in the known table.
    fn counted(
        &mut self,
        level: Level,
        group: IpNet,
        known: Option<(KnownKey, Counted)>,
    ) -> Option<&mut Tally> {
        if level == Level::Address
            && let Some((key, counted)) = known
        {
            let k = self.known.get_mut(&key)?;
            return match counted {
                Counted::Exact(a) => k
                    .slots
                    .iter_mut()
                    .find(|s| s.addr == a)
                    .map(|s| &mut s.tally),
                Counted::Strangers => Some(&mut k.strangers),
            };
        }
        self.table(level).get_mut(&group)
    }

    /// Whether `source` is known on `listener`: a verified certificate
    /// within `known_for` from it, or (IPv6) from its /64: enough to be
    /// admitted past a full networks table (a host whose privacy address
    /// rotated is still served), nothing more (see
    /// [`Sources::verified_here`]).
    pub fn is_known(
        &mut self,
        listener: &str,
        source: IpAddr,
        settings: &AdmissionSettings,
        now: Instant,
    ) -> bool {
        let key = (self.listener_key(listener), known_key(source));
        settings.max_known > 0
            && self
                .known
                .get(&key)
                .and_then(Known::newest)
                .is_some_and(|at| now.saturating_duration_since(at) <= settings.known_for)
    }

    /// Whether a certificate verified on `listener` from exactly `source`
    /// within `known_for`: what the stronger privileges need (handshakes
    /// not displaced, evicting outside a budget, passing strike blocks of
    /// its prefix and network, being vouched for). A host without a
    /// certificate in a known client's /64 (an office LAN, a hosting /64)
    /// gets none. (`admit` asks [`Sources::identities_here`], which says
    /// the same and who.)
    #[cfg(test)]
    pub fn verified_here(
        &mut self,
        listener: &str,
        source: IpAddr,
        settings: &AdmissionSettings,
        now: Instant,
    ) -> bool {
        self.identities_here(listener, source, settings, now)
            .is_some()
    }

    /// The identities a handshake from exactly `source` on `listener` is
    /// counted as, when a certificate verified from it within
    /// `known_for` ([`Sources::verified_here`]; None otherwise): its
    /// slot's, and its co-users' that verified from it within
    /// `known_for` too (a NAT's several users), at most 1 + [`CO_USERS`].
    /// What the pool spares a known handshake as: however many addresses
    /// an attacker holds, each is known as the certificates that verified
    /// from it, never as a network's anonymous share (review 12's gap:
    /// the pool's own record forgot addresses, and a forgotten one
    /// counted as its whole /48, one identity per /48). One entry's
    /// slots, no scan of the table.
    pub fn identities_here(
        &mut self,
        listener: &str,
        source: IpAddr,
        settings: &AdmissionSettings,
        now: Instant,
    ) -> Option<Vec<u64>> {
        if settings.max_known == 0 {
            return None;
        }
        let key = (self.listener_key(listener), known_key(source));
        let lately = |at: Instant| now.saturating_duration_since(at) <= settings.known_for;
        let slot = self
            .known
            .get(&key)?
            .slots
            .iter()
            .find(|s| s.addr == source && lately(s.at))?;
        let mut ids = Vec::with_capacity(1 + CO_USERS);
        ids.push(slot.identity);
        ids.extend(
            slot.others
                .iter()
                .filter(|(id, at, _)| lately(*at) && *id != slot.identity)
                .map(|(id, _, _)| *id),
        );
        Some(ids)
    }

    fn verified_at(
        &self,
        key: KnownKey,
        source: IpAddr,
        settings: &AdmissionSettings,
        now: Instant,
    ) -> bool {
        settings.max_known > 0
            && self.known.get(&key).is_some_and(|k| {
                k.slots.iter().any(|s| {
                    s.addr == source && now.saturating_duration_since(s.at) <= settings.known_for
                })
            })
    }

    /// Whether `source` is vouched for on `listener`: verified here, or
    /// was until a reload judged it no longer admitted, within
    /// `known_for`: what `auto_revert` listens to, the clients served
    /// before the reload it watches (one that broke the trust bundle
    /// makes them known no more, and their failures are what tells).
    pub fn vouched(
        &mut self,
        listener: &str,
        source: IpAddr,
        settings: &AdmissionSettings,
        now: Instant,
    ) -> bool {
        let lid = self.listener_key(listener);
        self.verified_at((lid, known_key(source)), source, settings, now)
            || (settings.max_known > 0
                && self
                    .formerly
                    .get(&(lid, source))
                    .is_some_and(|at| now.saturating_duration_since(*at) <= settings.known_for))
    }

    /// Whether `source` is verified here on any listener: a block list
    /// entry holds for every listener, so one that would refuse it is
    /// kept out of the way as for a known source.
    pub fn verified_anywhere(
        &self,
        source: IpAddr,
        settings: &AdmissionSettings,
        now: Instant,
    ) -> bool {
        self.listeners
            .keys()
            .any(|l| self.verified_at((*l, known_key(source)), source, settings, now))
    }

    fn table(&mut self, level: Level) -> &mut Lru<IpNet, Tally> {
        match level {
            Level::Address => &mut self.addresses,
            Level::Prefix => &mut self.prefixes,
            Level::Network => &mut self.networks,
        }
    }

    pub fn configure(&mut self, settings: &AdmissionSettings, now: Instant) {
        for level in Level::ALL {
            let limits = Limits::of(level, settings);
            self.table(level)
                .set_capacity(settings.max_tracked as usize, |t| {
                    t.idle(&limits, settings, now)
                });
        }
        // Only a verified certificate makes an entry: the least recently
        // verified go first, busy or not (counted out of their
        // identities' quotas).
        while self.known.len() > (settings.max_known as usize).max(1) {
            match self.known.pop_oldest() {
                Some((key, k)) => self.drop_entry(key, &k),
                None => break,
            }
        }
        self.known
            .set_capacity(settings.max_known as usize, |_| false);
        self.formerly
            .set_capacity(settings.max_known as usize, |_| true);
        // Counted afresh: the allocation's length or quota may have
        // changed.
        self.networks.take_gone();
        self.allocations.clear();
        let keys: Vec<IpNet> = self.networks.keys().copied().collect();
        for net in keys {
            if let Some(a) = allocation(net.addr(), settings) {
                *self.allocations.entry(a).or_default() += 1;
            }
        }
    }

    /// Whether `source`'s network is not tracked and its IPv6 allocation
    /// already holds `networks_per_allocation` entries of the networks'
    /// table: an attacker in one allocation (a /32 holds 65536 /48s)
    /// cannot fill the table for everyone.
    fn over_quota(&mut self, source: IpAddr, settings: &AdmissionSettings) -> bool {
        allocation(source, settings).is_some_and(|a| {
            self.allocations.get(&a).copied().unwrap_or(0) >= settings.networks_per_allocation
        }) && self
            .networks
            .get_mut(&Level::Network.group(source, settings))
            .is_none()
    }

    /// The entry of `source`'s group at `level`, made if need be; None when
    /// its table is full of entries that may not be forgotten.
    fn tally(
        &mut self,
        level: Level,
        source: IpAddr,
        settings: &AdmissionSettings,
        now: Instant,
    ) -> Option<&mut Tally> {
        let limits = Limits::of(level, settings);
        let group = level.group(source, settings);
        if level != Level::Network {
            return self.table(level).entry(
                &group,
                || Tally::new(limits.burst, now),
                |t| t.idle(&limits, settings, now),
            );
        }
        if self.over_quota(source, settings) {
            return None;
        }
        let fresh = self.networks.get_mut(&group).is_none();
        let made = self
            .networks
            .entry(
                &group,
                || Tally::new(limits.burst, now),
                |t| t.idle(&limits, settings, now),
            )
            .is_some();
        for gone in self.networks.take_gone() {
            if let Some(a) = allocation(gone.addr(), settings)
                && let Some(n) = self.allocations.get_mut(&a)
            {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.allocations.remove(&a);
                }
            }
        }
        if made
            && fresh
            && let Some(a) = allocation(source, settings)
        {
            *self.allocations.entry(a).or_default() += 1;
        }
        self.networks.get_mut(&group)
    }

    /// Counts a handshake `source` wants to start on `listener`, or says
    /// which limit it would exceed (counting nothing then). Admitted, it
    /// is in flight until [`Sources::ended`] with the groups returned: the
    /// ones counted now, even if a reload changes the prefix lengths
    /// meanwhile.
    pub fn start(
        &mut self,
        listener: &str,
        source: IpAddr,
        settings: &AdmissionSettings,
        now: Instant,
    ) -> Result<Groups, Refusal> {
        // Which levels the source is tracked at: a table full of busy
        // entries (an attacker holding one strike per entry per window)
        // leaves the source to its coarser groups' limits rather than
        // refusing it; only a full table of networks, the coarsest,
        // refuses (fail closed).
        let mut nets = [None; 3];
        for (level, slot) in Level::ALL.into_iter().zip(nets.iter_mut()) {
            if self.tally(level, source, settings, now).is_some() {
                *slot = Some(level.group(source, settings));
            }
        }
        let [address, prefix, network] = nets;
        let mut known = None;
        let past_full = network.is_none();
        let address = if past_full {
            // A known source still gets in, counted as an address (in the
            // known table if need be): an exact address that verified by
            // its own count, the other addresses of a known /64 by one
            // count for all of them (review 10 R10-10).
            let key = (self.listener_key(listener), known_key(source));
            let counted = if self.verified_at(key, source, settings, now) {
                Counted::Exact(source)
            } else if self.is_known(listener, source, settings, now) {
                Counted::Strangers
            } else {
                return Err(if self.over_quota(source, settings) {
                    Refusal::NetworksPerAllocation
                } else {
                    Refusal::MaxTracked
                });
            };
            if address.is_none() {
                known = Some((key, counted));
            }
            Some(IpNet::from(source))
        } else {
            address
        };
        let groups = Groups {
            nets: [address, prefix, network],
            known,
        };
        // In flight first: a refusal for it takes no token.
        for (level, group) in groups.tracked() {
            let cap = Limits::of(level, settings).in_flight;
            let t = self
                .counted(level, group, groups.known)
                .ok_or(Refusal::MaxTracked)?;
            if cap > 0 && t.in_flight >= cap {
                return Err(level.refusals().1);
            }
        }
        // Then the buckets, narrowest first: a source over its own rate
        // does not drain its prefix's bucket for its neighbours.
        for (level, group) in groups.tracked() {
            let limits = Limits::of(level, settings);
            let t = self
                .counted(level, group, groups.known)
                .ok_or(Refusal::MaxTracked)?;
            if limits.rate > 0 && !t.bucket.take(limits.rate, limits.burst, now) {
                return Err(level.refusals().0);
            }
        }
        for (level, group) in groups.tracked() {
            if let Some(t) = self.counted(level, group, groups.known) {
                t.in_flight += 1;
            }
        }
        if past_full {
            self.known_admitted += 1;
        }
        Ok(groups)
    }

    /// A handshake counted in `groups` is over (done, failed or evicted).
    pub fn ended(&mut self, groups: &Groups) {
        for (level, group) in groups.tracked() {
            if let Some(t) = self.counted(level, group, groups.known) {
                t.in_flight = t.in_flight.saturating_sub(1);
            }
        }
    }

    /// The known count of `source`'s strikes on `listener`, for an
    /// address the addresses' table cannot hold: its own slot's if it
    /// verified from there, else its own among its /64's strangers
    /// ([`STRANGERS`]; one not among them takes the place of the least
    /// recently struck).
    fn known_tally(&mut self, listener: &str, source: IpAddr, now: Instant) -> Option<&mut Tally> {
        let key = (self.listener_key(listener), known_key(source));
        let k = self.known.get_mut(&key)?;
        if let Some(i) = k.slots.iter().position(|s| s.addr == source) {
            return k.slots.get_mut(i).map(|s| &mut s.tally);
        }
        let t = match k.struck.iter().position(|(a, _)| *a == source) {
            Some(i) => k.struck.remove(i).1,
            None => {
                if k.struck.len() >= STRANGERS {
                    k.struck.remove(0);
                }
                Tally::new(0, now)
            }
        };
        k.struck.push((source, t));
        k.struck.last_mut().map(|(_, t)| t)
    }

    /// Adds a strike against `source`'s groups from level `from` up (from
    /// its address: the address, its prefix and its network); returns the
    /// groups that now have their `block_after` within `block_window` (and
    /// whose counts start again), narrowest first. `listener`: where it
    /// was, for a known source's count.
    pub fn strike(
        &mut self,
        listener: &str,
        source: IpAddr,
        from: Level,
        settings: &AdmissionSettings,
        now: Instant,
    ) -> Vec<(Level, IpNet)> {
        let mut due = Vec::new();
        if from != Level::Address && !self.lends(listener, source, settings, now) {
            return due;
        }
        // Whether this failure is the address's first of its window (or
        // the address is not tracked: fail closed): a point for its
        // groups' spread scores.
        let mut spreads = from == Level::Address;
        for level in Level::ALL.into_iter().filter(|l| *l >= from) {
            let limits = Limits::of(level, settings);
            if spreads && level != Level::Address && limits.spread_after > 0 {
                let half_life = settings.spread_half_life;
                if let Some(t) = self.tally(level, source, settings, now)
                    && t.add_spread(1.0, half_life, now) >= f64::from(limits.spread_after)
                {
                    t.spread = 0.0;
                    due.push((level, level.group(source, settings)));
                    // Blocked whole: its strikes within the window go with
                    // it.
                    continue;
                }
            }
            // A table full of busy entries: this level's strike is lost,
            // the source's own (whose entry holds its handshake) is not,
            // nor a known source's (in the known table).
            let tracked = self.tally(level, source, settings, now).is_some();
            let t = match (tracked, level) {
                (true, _) => self.tally(level, source, settings, now),
                (false, Level::Address) => self.known_tally(listener, source, now),
                (false, _) => continue,
            };
            // Untracked, it has no count of what it lent: it lends
            // nothing, and adds no spread point (fail open for its
            // neighbours; its own limits still refuse).
            let Some(t) = t else { break };
            if level == Level::Address {
                spreads = t
                    .pointed
                    .is_none_or(|p| now.saturating_duration_since(p) > settings.block_window);
                if spreads {
                    t.pointed = Some(now);
                }
            }
            let after = limits.block_after;
            if after == 0 {
                continue;
            }
            t.roll_window(settings.block_window, now);
            t.strikes += 1;
            // One address gives its prefix and network at most
            // `block_after` strikes a window, whatever it paid back: their
            // thresholds are above it, so one address alone (a certificate
            // holder alternating failures and successes) never gets its
            // neighbours blocked.
            let lends = level != Level::Address || t.lent < after;
            if level == Level::Address && lends {
                t.lent += 1;
            }
            if t.strikes >= after {
                t.strikes = 0;
                t.strikes_since = now;
                due.push((level, level.group(source, settings)));
            }
            if !lends {
                break;
            }
        }
        due
    }

    /// A refusal for a shared limit (its prefix's or network's bucket or
    /// handshakes in flight) strikes that group, not the address; but the
    /// strike is lent by the address, within the same `block_after` a
    /// window as its own strikes lend: one address draining its /24's
    /// bucket never gets the /24 (and its neighbours) blocked alone. An
    /// address the tables cannot hold lends nothing: with no count of what
    /// it lent, one address could otherwise get its neighbours blocked.
    fn lends(
        &mut self,
        listener: &str,
        source: IpAddr,
        settings: &AdmissionSettings,
        now: Instant,
    ) -> bool {
        let after = settings.block_after;
        let tracked = self.tally(Level::Address, source, settings, now).is_some();
        let t = if tracked {
            self.tally(Level::Address, source, settings, now)
        } else {
            self.known_tally(listener, source, now)
        };
        let Some(t) = t else { return false };
        t.roll_window(settings.block_window, now);
        if after > 0 && t.lent >= after {
            return false;
        }
        t.lent += 1;
        true
    }

    /// A handshake of `source` authenticated with a verified certificate:
    /// one strike of the address is paid back. Only the address's
    /// strikes: its prefix and network keep theirs, so that one
    /// certificate cannot launder its neighbours' failures; their spread
    /// scores lose one point, at most once a window per address, as one
    /// failing address adds at most one.
    pub fn paid_back(&mut self, source: IpAddr, settings: &AdmissionSettings, now: Instant) {
        let mut credits = false;
        if let Some(t) = self.addresses.get_mut(&IpNet::from(source)) {
            t.strikes = t.strikes.saturating_sub(1);
            credits = t
                .credited
                .is_none_or(|c| now.saturating_duration_since(c) > settings.block_window);
            if credits {
                t.credited = Some(now);
            }
        }
        if credits {
            for level in [Level::Prefix, Level::Network] {
                if let Some(t) = self.table(level).get_mut(&level.group(source, settings)) {
                    t.add_spread(-1.0, settings.spread_half_life, now);
                }
            }
        }
    }

    /// `source`'s connection on `listener`, authenticated as `identity`
    /// (its certificate's names) with a verified certificate (`proof`),
    /// went live under the state of generation `judged` (see the module's
    /// comment): the source is known there. Not when a reload judged the
    /// known entries since (`judged` older than theirs): its handshake
    /// may have been verified by a trust or policy that no longer admits
    /// it (review 10 R10-3).
    #[allow(clippy::too_many_arguments)]
    pub fn remember(
        &mut self,
        listener: &str,
        source: IpAddr,
        identity: &str,
        proof: Arc<Proof>,
        judged: u64,
        settings: &AdmissionSettings,
        now: Instant,
    ) {
        if settings.max_known == 0 || judged < self.judged {
            return;
        }
        let lid = self.listener_key(listener);
        let key = (lid, known_key(source));
        let identity = self.identities.hash_one(identity);
        let net = self
            .known
            .get(&key)
            .map_or_else(|| Level::Network.group(source, settings), |k| k.net);
        let present = self.known.get(&key).is_some_and(|k| k.holds(identity));
        // The table's room first: at its quota the identity gives up one
        // of its entries for the new one, which must then find a place
        // (review 21, R21-2: it gave up a client and remembered no one).
        if self.known.get(&key).is_none() {
            while self.known.len() >= (settings.max_known as usize).max(1) {
                // Only a stale entry (none of its slots verified within
                // `known_for`) gives way: a few certificates, each within
                // its quota, verifying from fresh addresses flushed every
                // client served before (review 20, R20-3: 0 of 20 still
                // known). A table full of recent entries remembers no one
                // new, counted: it keeps out new sources' privileges at
                // worst, never the clients already served.
                let stale = self.known.oldest().is_some_and(|k| {
                    k.newest()
                        .is_none_or(|at| now.saturating_duration_since(at) > settings.known_for)
                });
                if !stale {
                    self.known_full += 1;
                    return;
                }
                match self.known.pop_oldest() {
                    Some((old, k)) => self.drop_entry(old, &k),
                    None => break,
                }
            }
        }
        // At its quota (or its network's part of it), an identity's new
        // address is not remembered (its known ones are refreshed as they
        // verify again): one holder of a shared identity must not flush
        // that identity's other clients (review 7 F5), nor take the whole
        // quota from one network (review 10 R10-2).
        if !present && !self.has_room(lid, identity, net, settings, now) {
            return;
        }
        let burst = settings.source_handshake_burst;
        let Some(k) = self.known.entry(
            &key,
            || Known {
                slots: Vec::new(),
                strangers: Tally::new(burst, now),
                struck: Vec::new(),
                net,
            },
            |_| false,
        ) else {
            return;
        };
        let placed = k.place(source, identity, proof, settings.known_for, burst, now);
        let empty = k.slots.is_empty();
        let Some(lost) = placed else {
            if empty {
                self.known.remove(&key);
            }
            return;
        };
        self.listeners
            .entry(lid)
            .or_insert_with(|| Arc::from(listener));
        for id in lost {
            self.moved(key, id, net);
        }
        let h = self.holders.entry((lid, identity)).or_default();
        if !present {
            h.gained(net);
        }
        if h.queue(key.1, now, net) {
            self.compact(lid, identity);
        }
        if !present {
            *self.across.entry(identity).or_default() += 1;
        }
    }

    /// Whether `identity` has room for an entry in `net` without making
    /// any (`has_room` without forgetting or displacing).
    fn room_as_it_is(
        &self,
        lid: u64,
        identity: u64,
        net: IpNet,
        settings: &AdmissionSettings,
    ) -> bool {
        if settings.known_per_identity == 0 {
            return true;
        }
        let part = (settings.max_known / 4).max(1);
        let quota = settings.known_per_identity.min(part);
        let per_net = (quota / 4).max(1);
        let everywhere = self.across.get(&identity).copied().unwrap_or(0);
        let (entries, here) = self
            .holders
            .get(&(lid, identity))
            .map_or((0, 0), |h| (h.entries, h.in_net(&net)));
        here < per_net && entries < quota && everywhere < part
    }

    /// Whether `identity` may hold one more entry on listener `lid`, in
    /// `net`: below its quota (`known_per_identity`, at most a quarter of
    /// the table; 0: no quota), below a quarter of that in `net`, and
    /// below a quarter of the table over all listeners (R11-9). Its
    /// entries past `known_for` are forgotten first, oldest first: they
    /// are no longer known, and must not hold the quota. At the quota, the
    /// least recently verified entry of its largest network makes room if
    /// that network holds at least two more than `net` (max-min fairness
    /// across networks: one holder of a shared identity in four networks
    /// cannot squat the quota, attacker review 11 R11-4, and a network
    /// holding no more than the newcomer's is never flushed, so a holder
    /// cannot flush a network it is not in beyond an equal share). Running
    /// counts and one pass over its queue at most (review 10 R10-9).
    fn has_room(
        &mut self,
        lid: u64,
        identity: u64,
        net: IpNet,
        settings: &AdmissionSettings,
        now: Instant,
    ) -> bool {
        if settings.known_per_identity == 0 {
            return true;
        }
        let part = (settings.max_known / 4).max(1);
        let quota = settings.known_per_identity.min(part);
        let per_net = (quota / 4).max(1);
        loop {
            let everywhere = self.across.get(&identity).copied().unwrap_or(0);
            let (entries, here) = self
                .holders
                .get(&(lid, identity))
                .map_or((0, 0), |h| (h.entries, h.in_net(&net)));
            if here >= per_net {
                // Its network's part: the holder's other addresses there
                // must not flush its clients (review 7 F5, R10-2).
                if !self.forget_stale(lid, identity, settings, now) {
                    return false;
                }
                continue;
            }
            if entries < quota && everywhere < part {
                return true;
            }
            if entries < quota {
                // Its quarter of the table, over all listeners: only its
                // stale entries here make room.
                if !self.forget_stale(lid, identity, settings, now) {
                    return false;
                }
                continue;
            }
            if !self.forget_stale(lid, identity, settings, now) {
                return self.displace(lid, identity, here, settings, now);
            }
        }
    }

    /// Forgets `identity`'s oldest entry on `lid` if past `known_for`
    /// (dropping stale queue items on the way); false if its oldest is
    /// still known (so are the others) or it has none.
    fn forget_stale(
        &mut self,
        lid: u64,
        identity: u64,
        settings: &AdmissionSettings,
        now: Instant,
    ) -> bool {
        loop {
            let Some(h) = self.holders.get_mut(&(lid, identity)) else {
                return false;
            };
            let Some((addr, at)) = h.order.front().copied() else {
                return false;
            };
            let key = (lid, addr);
            let last = self.known.get(&key).and_then(|k| k.last_of(identity));
            if last == Some(at) && now.saturating_duration_since(at) <= settings.known_for {
                return false;
            }
            h.order.pop_front();
            if last == Some(at) {
                self.give_up(key, identity, settings, now);
                return true;
            }
        }
    }

    /// At its quota, `identity` (with `here` entries in the newcomer's
    /// network) gives up the least recently verified entry of its largest
    /// network, if that holds at least two more than `here`.
    fn displace(
        &mut self,
        lid: u64,
        identity: u64,
        here: u32,
        settings: &AdmissionSettings,
        now: Instant,
    ) -> bool {
        let known = &self.known;
        let Some(h) = self.holders.get_mut(&(lid, identity)) else {
            return true;
        };
        let Some((most, big)) = h.sizes.last().copied() else {
            return false;
        };
        if most < here.saturating_add(2) {
            return false;
        }
        let Some((_, q)) = h.per_net.get_mut(&big) else {
            return false;
        };
        // Its queue's front, past the stale items (dropped: amortised).
        let victim = loop {
            let Some((addr, at)) = q.pop_front() else {
                return false;
            };
            if known
                .get(&(lid, addr))
                .is_some_and(|k| k.last_of(identity) == Some(at))
            {
                break addr;
            }
        };
        self.give_up((lid, victim), identity, settings, now);
        true
    }

    /// `identity` gives up its slots of entry `key` (its quota made room,
    /// or they went stale): each falls back on its newest co-user's proof
    /// that is recent and whose identity has room as things are (no room
    /// made for it: no chain of displacements), else goes. Dropped whole,
    /// a NAT address's slot took its other users' proofs with it: one
    /// certificate at its quota, the last to verify there, made them
    /// strangers (review 18, R18-4); offered to the newest alone, one
    /// co-user at its own quota did the same (review 19, R19-1).
    fn give_up(
        &mut self,
        key: KnownKey,
        identity: u64,
        settings: &AdmissionSettings,
        now: Instant,
    ) {
        let slots: Vec<(IpAddr, Vec<CoUser>)> = self.known.get(&key).map_or_else(Vec::new, |k| {
            k.slots
                .iter()
                .filter(|s| s.identity == identity)
                .map(|s| (s.addr, s.others.clone()))
                .collect()
        });
        for (addr, others) in slots {
            // At most `CO_USERS` tries, newest first.
            let taken = others.into_iter().any(|next| {
                self.takes_over(key, addr, identity, next, Room::AsItIs, settings, now)
            });
            if !taken {
                self.unslot(key, |s| s.addr == addr && s.identity == identity);
            }
        }
    }

    /// Keeps of `identity`'s queue only the items that are its entries'
    /// latest.
    fn compact(&mut self, lid: u64, identity: u64) {
        let Some(h) = self.holders.get_mut(&(lid, identity)) else {
            return;
        };
        let known = &self.known;
        let latest = |addr: &IpAddr, at: &Instant, seen: &mut HashSet<IpAddr>| {
            known.get(&(lid, *addr)).and_then(|k| k.last_of(identity)) == Some(*at)
                && seen.insert(*addr)
        };
        let mut seen = HashSet::new();
        h.order.retain(|(addr, at)| latest(addr, at, &mut seen));
        for (_, q) in h.per_net.values_mut() {
            let mut seen = HashSet::new();
            q.retain(|(addr, at)| latest(addr, at, &mut seen));
        }
    }

    /// `identity` no longer holds a slot of an entry in `net`.
    fn lose(&mut self, lid: u64, identity: u64, net: IpNet) {
        let Some(h) = self.holders.get_mut(&(lid, identity)) else {
            return;
        };
        h.lost(net);
        if let Some(n) = self.across.get_mut(&identity) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.across.remove(&identity);
            }
        }
        if h.entries == 0 {
            self.holders.remove(&(lid, identity));
        }
    }

    /// An entry left the known table: out of its identities' counts.
    fn drop_entry(&mut self, key: KnownKey, k: &Known) {
        let mut ids: Vec<u64> = k.slots.iter().map(|s| s.identity).collect();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            self.lose(key.0, id, k.net);
        }
    }

    /// Forgets the slots of entry `key` that `gone` picks (and the entry
    /// when none is left).
    fn unslot(&mut self, key: KnownKey, gone: impl Fn(&Slot) -> bool) {
        let Some(k) = self.known.get_mut(&key) else {
            return;
        };
        let mut lost: Vec<u64> = k
            .slots
            .iter()
            .filter(|s| gone(s))
            .map(|s| s.identity)
            .collect();
        k.slots.retain(|s| !gone(s));
        lost.sort_unstable();
        lost.dedup();
        let (net, empty) = (k.net, k.slots.is_empty());
        if empty {
            self.known.remove(&key);
            self.known.forgotten += 1;
        }
        for id in lost {
            self.moved(key, id, net);
        }
    }

    /// `identity` lost a slot of entry `key`: out of its counts if it
    /// holds none there any more, else queued again at its latest one
    /// (the item for that one may have gone as stale).
    fn moved(&mut self, key: KnownKey, identity: u64, net: IpNet) {
        match self.known.get(&key).and_then(|k| k.last_of(identity)) {
            None => self.lose(key.0, identity, net),
            Some(at) => {
                if let Some(h) = self.holders.get_mut(&(key.0, identity))
                    && h.queue(key.1, at, net)
                {
                    self.compact(key.0, identity);
                }
            }
        }
    }

    /// Every known slot, for a reload to judge (outside the lock): its
    /// listener, its entry, its address, and what verified it. From now
    /// on a connection judged by a state older than `generation` makes no
    /// one known.
    pub fn judging(&mut self, generation: u64) -> Vec<(Arc<str>, SlotRef, Arc<Proof>)> {
        self.judged = self.judged.max(generation);
        let names = &self.listeners;
        self.known
            .iter()
            .flat_map(|(key, k)| {
                let name = names.get(&key.0).cloned();
                k.slots.iter().flat_map(move |s| {
                    let name = name.clone();
                    std::iter::once(&s.proof)
                        .chain(s.others.iter().map(|(_, _, p)| p))
                        .filter_map(move |p| {
                            Some((name.clone()?, SlotRef(*key, s.addr), p.clone()))
                        })
                })
            })
            .collect()
    }

    /// Forgets the proofs a reload judged no longer trusted or allowed
    /// (the same verification it judged: one made since stays). A slot
    /// whose proof goes falls back on its newest co-user's still admitted
    /// (within `known_for` and its identity's quota), else is forgotten.
    pub fn forget(
        &mut self,
        gone: &[(SlotRef, Arc<Proof>)],
        settings: &AdmissionSettings,
        now: Instant,
    ) {
        // The co-users' refused proofs first: a slot falls back only on
        // one still admitted.
        for (SlotRef(key, addr), proof) in gone {
            if let Some(s) = self
                .known
                .get_mut(key)
                .and_then(|k| k.slots.iter_mut().find(|s| s.addr == *addr))
            {
                s.others.retain(|(_, _, p)| !Arc::ptr_eq(p, proof));
            }
        }
        for (SlotRef(key, addr), proof) in gone {
            let same = |s: &Slot| s.addr == *addr && Arc::ptr_eq(&s.proof, proof);
            let Some((at, was, next)) = self
                .known
                .get(key)
                .and_then(|k| k.slots.iter().find(|s| same(s)))
                .map(|s| (s.at, s.identity, s.others.first().cloned()))
            else {
                continue;
            };
            if let Some((id, then, p)) = next
                && self.takes_over(*key, *addr, was, (id, then, p), Room::Make, settings, now)
            {
                continue;
            }
            if let Some(v) = self.formerly.entry(&(key.0, *addr), || at, |_| true) {
                *v = at;
            }
            self.unslot(*key, same);
        }
    }

    /// Forgets the names of listeners no known entry is of any more (after
    /// [`Sources::forget`]).
    pub fn prune_listeners(&mut self) {
        let live: HashSet<u64> = self.known.keys().map(|k| k.0).collect();
        self.listeners.retain(|l, _| live.contains(l));
    }

    /// Slot `addr` of entry `key`, whose proof (of identity `was`) a
    /// reload refused, is held by its newest co-user's (`next`) instead:
    /// only within `known_for` and the co-user identity's quota.
    #[allow(clippy::too_many_arguments)]
    fn takes_over(
        &mut self,
        key: KnownKey,
        addr: IpAddr,
        was: u64,
        next: (u64, Instant, Arc<Proof>),
        room: Room,
        settings: &AdmissionSettings,
        now: Instant,
    ) -> bool {
        let (id, at, proof) = next;
        if now.saturating_duration_since(at) > settings.known_for {
            return false;
        }
        let Some((net, present)) = self.known.get(&key).map(|k| (k.net, k.holds(id))) else {
            return false;
        };
        let fits = match room {
            Room::Make => self.has_room(key.0, id, net, settings, now),
            Room::AsItIs => self.room_as_it_is(key.0, id, net, settings),
        };
        if !present && !fits {
            return false;
        }
        // `has_room` may have forgotten stale slots: looked up again.
        let Some(s) = self.known.get_mut(&key).and_then(|k| {
            k.slots
                .iter_mut()
                .find(|s| s.addr == addr && s.identity == was)
        }) else {
            return false;
        };
        s.others.retain(|(o, _, _)| *o != id);
        let before = (s.identity, s.at, std::mem::replace(&mut s.proof, proof));
        s.identity = id;
        s.at = at;
        if let Room::AsItIs = room {
            // Given up for its quota, not refused: it still verified from
            // here, a co-user the pool charges for the address's places.
            s.others.insert(0, before);
            s.others.truncate(CO_USERS);
        }
        self.moved(key, was, net);
        let h = self.holders.entry((key.0, id)).or_default();
        if !present {
            h.gained(net);
        }
        if h.queue(key.1, at, net) {
            self.compact(key.0, id);
        }
        if !present {
            *self.across.entry(id).or_default() += 1;
        }
        true
    }

    /// Whether an address in `net` verified (in the known table, lately
    /// or not, on any listener): a scan of the table, for the rare prefix
    /// or network block.
    pub fn knows_in(&self, net: IpNet) -> bool {
        self.known
            .iter()
            .any(|(_, k)| k.slots.iter().any(|s| net.contains(&s.addr)))
    }

    /// Entries tracked per level, and known sources.
    pub fn lens(&self) -> [usize; 4] {
        let [a, p, n] = [&self.addresses, &self.prefixes, &self.networks].map(Lru::len);
        [a, p, n, self.known.len()]
    }

    /// Entries forgotten per level, and known sources, since start.
    pub fn forgotten(&self) -> [u64; 4] {
        let [a, p, n] = [&self.addresses, &self.prefixes, &self.networks].map(|t| t.forgotten);
        [a, p, n, self.known.forgotten]
    }

    /// A verified handshake as the listener reports it (strike paid
    /// back, then known), judged by the current state.
    #[cfg(test)]
    pub fn verified(
        &mut self,
        listener: &str,
        source: IpAddr,
        identity: &str,
        settings: &AdmissionSettings,
        now: Instant,
    ) {
        self.paid_back(source, settings, now);
        let judged = self.judged;
        self.remember(
            listener,
            source,
            identity,
            Arc::default(),
            judged,
            settings,
            now,
        );
    }

    /// The generation the known entries were last judged at.
    #[cfg(test)]
    pub fn judged(&self) -> u64 {
        self.judged
    }

    /// Handshakes in flight from `source` as counted here.
    #[cfg(test)]
    pub fn in_flight(&mut self, source: IpAddr) -> u32 {
        self.addresses
            .get_mut(&IpNet::from(source))
            .map_or(0, |a| a.in_flight)
    }

    /// Strikes of `source` (its address) in the current window.
    #[cfg(test)]
    pub fn strikes(&mut self, source: IpAddr) -> u32 {
        self.addresses
            .get_mut(&IpNet::from(source))
            .map_or(0, |a| a.strikes)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn settings() -> AdmissionSettings {
        AdmissionSettings {
            source_handshakes_per_second: 2,
            source_handshake_burst: 3,
            source_handshakes_in_flight: 4,
            prefix_handshakes_per_second: 100,
            prefix_handshake_burst: 100,
            prefix_handshakes_in_flight: 6,
            block_after: 3,
            ..AdmissionSettings::default()
        }
    }

    const L: &str = "edge";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A refusal for its prefix's shared limit strikes the prefix, but one
    /// address lends it at most `block_after` such strikes a window: alone
    /// it never gets the /24 (its neighbours) blocked. Two addresses can.
    #[test]
    fn one_address_draining_its_prefix_never_gets_the_prefix_blocked_alone() {
        let s = AdmissionSettings {
            block_after: 3,
            prefix_block_after: 5,
            network_block_after: 0,
            prefix_spread_block_after: 0,
            network_spread_block_after: 0,
            ..settings()
        };
        let mut t = Sources::new(&s);
        let now = Instant::now();
        let one = ip("192.0.2.1");
        let mut blocked = Vec::new();
        for _ in 0..50 {
            blocked.extend(t.strike(L, one, Level::Prefix, &s, now));
        }
        assert!(blocked.is_empty(), "{blocked:?}");
        // A second address's strikes add to the first one's.
        for _ in 0..3 {
            blocked.extend(t.strike(L, ip("192.0.2.2"), Level::Prefix, &s, now));
        }
        assert_eq!(
            blocked,
            vec![(Level::Prefix, "192.0.2.0/24".parse::<IpNet>().unwrap())]
        );
    }

    /// MEDIUM 3 of the second review: with the addresses' table full of
    /// busy entries, an address it cannot hold lends its prefix and
    /// network nothing, neither strikes nor spread points: it alone never
    /// gets its neighbours blocked.
    #[test]
    fn an_untracked_address_lends_its_neighbours_nothing() {
        let s = AdmissionSettings {
            max_tracked: 10,
            block_after: 3,
            prefix_block_after: 5,
            network_block_after: 0,
            prefix_spread_block_after: 4,
            network_spread_block_after: 0,
            ..settings()
        };
        let mut t = Sources::new(&s);
        let now = Instant::now();
        for i in 1..=10u8 {
            t.strike(L, IpAddr::from([10, 0, 0, i]), Level::Address, &s, now);
        }
        let mut blocked = Vec::new();
        for _ in 0..200 {
            blocked.extend(t.strike(L, ip("192.0.2.66"), Level::Address, &s, now));
            blocked.extend(t.strike(L, ip("192.0.2.66"), Level::Prefix, &s, now));
        }
        assert!(blocked.is_empty(), "{blocked:?}");
    }

    /// MEDIUM 9 of the second review: an IPv6 client is known by its /64,
    /// so a rotated privacy address is still known; another /64 is not.
    #[test]
    fn an_ipv6_client_is_known_by_its_64() {
        let s = settings();
        let mut t = Sources::new(&s);
        let now = Instant::now();
        t.verified(L, ip("2001:db8:1:2::a"), "id", &s, now);
        assert!(t.is_known(L, ip("2001:db8:1:2:ffff::b"), &s, now));
        assert!(!t.is_known(L, ip("2001:db8:1:3::a"), &s, now));
        t.verified(L, ip("192.0.2.1"), "id", &s, now);
        assert!(t.is_known(L, ip("192.0.2.1"), &s, now));
        assert!(!t.is_known(L, ip("192.0.2.2"), &s, now));
        // Review 7 F2: only the exact addresses that verified (the newest
        // four of the /64) have the stronger privileges.
        assert!(t.verified_here(L, ip("2001:db8:1:2::a"), &s, now));
        assert!(!t.verified_here(L, ip("2001:db8:1:2:ffff::b"), &s, now));
        assert!(t.verified_here(L, ip("192.0.2.1"), &s, now));
        for i in 1..=4u16 {
            t.verified(
                L,
                IpAddr::from([0x2001, 0xdb8, 1, 2, 0, 0, 0, 0x100 + i]),
                "id",
                &s,
                now,
            );
        }
        assert!(!t.verified_here(L, ip("2001:db8:1:2::a"), &s, now));
        assert!(t.verified_here(L, ip("2001:db8:1:2::101"), &s, now));
        assert!(t.verified_here(L, ip("2001:db8:1:2::104"), &s, now));
        assert_eq!(t.lens()[3], 2);
        assert!(t.knows_in("2001:db8:1:2::/64".parse().unwrap()));
        assert!(!t.knows_in("2001:db8:1:3::/64".parse().unwrap()));
    }

    /// What the pool spares a known handshake as: the identities that
    /// verified from exactly its address within `known_for` (the slot's,
    /// a NAT's co-users'), each of them; none for an address of a known
    /// /64 that never verified, nor once the slot is past `known_for`; a
    /// co-user past it no longer counts.
    #[test]
    fn a_known_address_is_known_as_the_identities_that_verified_from_it() {
        let s = settings();
        let mut t = Sources::new(&s);
        let now = Instant::now();
        let hash = |t: &Sources, id: &str| t.identities.hash_one(id);
        let nat = ip("192.0.2.1");
        t.verified(L, nat, "alice", &s, now);
        let later = now + s.known_for / 2;
        t.verified(L, nat, "bob", &s, later);
        let mut ids = t.identities_here(L, nat, &s, later).unwrap();
        ids.sort_unstable();
        let mut both = vec![hash(&t, "alice"), hash(&t, "bob")];
        both.sort_unstable();
        assert_eq!(ids, both);
        assert_eq!(t.identities_here(L, ip("192.0.2.2"), &s, later), None);
        assert_eq!(t.identities_here("other", nat, &s, later), None);
        // Alice's verification is past `known_for`, Bob's is not.
        let past = now + s.known_for + Duration::from_secs(1);
        assert_eq!(
            t.identities_here(L, nat, &s, past),
            Some(vec![hash(&t, "bob")])
        );
        let gone = later + s.known_for + Duration::from_secs(1);
        assert_eq!(t.identities_here(L, nat, &s, gone), None);
        // IPv6: the exact address, not its /64.
        t.verified(L, ip("2001:db8:1:2::a"), "carol", &s, now);
        assert_eq!(
            t.identities_here(L, ip("2001:db8:1:2::a"), &s, now),
            Some(vec![hash(&t, "carol")])
        );
        assert_eq!(t.identities_here(L, ip("2001:db8:1:2::b"), &s, now), None);
    }

    /// MEDIUM 4 of the second review: one identity verifying from many
    /// addresses holds at most its quota of the known table (here a
    /// quarter of 8), never another identity's entries. Review 7 F5: nor
    /// its own: at its quota a new address is not remembered, so one
    /// holder of a shared identity cannot flush that identity's clients;
    /// an entry past `known_for` makes room. (Each address in a /16 of
    /// its own: a network holds at most a quarter of the quota.)
    #[test]
    fn one_identity_cannot_flush_the_known_table() {
        let s = AdmissionSettings {
            max_known: 8,
            known_for: Duration::from_secs(60),
            ..settings()
        };
        let mut t = Sources::new(&s);
        let now = Instant::now();
        t.verified(L, ip("192.0.2.1"), "frontend", &s, now);
        for i in 1..=50u8 {
            t.verified(L, IpAddr::from([10, i, 0, 1]), "batch", &s, now);
        }
        assert!(t.is_known(L, ip("192.0.2.1"), &s, now));
        assert_eq!(t.lens()[3], 3);
        // The batch identity's first two are kept, the others not added.
        assert!(t.is_known(L, ip("10.1.0.1"), &s, now));
        assert!(t.is_known(L, ip("10.2.0.1"), &s, now));
        assert!(!t.is_known(L, ip("10.50.0.1"), &s, now));
        // Verifying again from a known address refreshes it.
        let later = now + Duration::from_secs(40);
        t.verified(L, ip("10.2.0.1"), "batch", &s, later);
        t.verified(L, ip("10.50.0.1"), "batch", &s, later);
        assert!(!t.is_known(L, ip("10.50.0.1"), &s, later));
        // Past `known_for`, 10.1.0.1's entry gives way; 10.2.0.1's,
        // refreshed, does not.
        let much_later = now + Duration::from_secs(70);
        t.verified(L, ip("10.50.0.1"), "batch", &s, much_later);
        assert!(t.is_known(L, ip("10.50.0.1"), &s, much_later));
        assert!(t.is_known(L, ip("10.2.0.1"), &s, much_later));
        assert!(!t.is_known(L, ip("10.1.0.1"), &s, much_later));
        assert_eq!(t.lens()[3], 3);
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let s = settings();
        let mut t = Sources::new(&s);
        let now = Instant::now();
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            let g = t.start(L, a, &s, now).unwrap();
            t.ended(&g);
        }
        assert_eq!(t.start(L, a, &s, now), Err(Refusal::SourceRate));
        // Half a second later, one token is back (2 per second).
        let g = t.start(L, a, &s, now + Duration::from_millis(500)).unwrap();
        assert_eq!(
            t.start(L, a, &s, now + Duration::from_millis(500)),
            Err(Refusal::SourceRate)
        );
        // A refused start left nothing in flight.
        t.ended(&g);
        assert_eq!(t.in_flight(a), 0);
    }

    #[test]
    fn in_flight_caps_hold_per_source_and_per_prefix() {
        let s = AdmissionSettings {
            source_handshakes_per_second: 0,
            ..settings()
        };
        let mut t = Sources::new(&s);
        let now = Instant::now();
        let first = t.start(L, ip("192.0.2.1"), &s, now).unwrap();
        for _ in 1..4 {
            t.start(L, ip("192.0.2.1"), &s, now).unwrap();
        }
        assert_eq!(
            t.start(L, ip("192.0.2.1"), &s, now),
            Err(Refusal::SourceHandshakes)
        );
        // Another address of the same /24 has two left of the prefix's six.
        t.start(L, ip("192.0.2.2"), &s, now).unwrap();
        t.start(L, ip("192.0.2.2"), &s, now).unwrap();
        assert_eq!(
            t.start(L, ip("192.0.2.3"), &s, now),
            Err(Refusal::PrefixHandshakes)
        );
        // Another /24 is not affected; an ended handshake frees its place.
        t.start(L, ip("192.0.3.1"), &s, now).unwrap();
        t.ended(&first);
        t.start(L, ip("192.0.2.3"), &s, now).unwrap();
    }

    #[test]
    fn ipv6_sources_share_their_64() {
        let s = AdmissionSettings {
            source_handshakes_per_second: 0,
            ..settings()
        };
        let mut t = Sources::new(&s);
        let now = Instant::now();
        for i in 0..6 {
            t.start(L, ip(&format!("2001:db8:1:2::{i:x}")), &s, now)
                .unwrap();
        }
        assert_eq!(
            t.start(L, ip("2001:db8:1:2:ffff::1"), &s, now),
            Err(Refusal::PrefixHandshakes)
        );
        t.start(L, ip("2001:db8:1:3::1"), &s, now).unwrap();
    }

    #[test]
    fn strikes_block_within_the_window_only() {
        let s = settings();
        let mut t = Sources::new(&s);
        let now = Instant::now();
        let a = ip("192.0.2.9");
        assert!(t.strike(L, a, Level::Address, &s, now).is_empty());
        assert!(t.strike(L, a, Level::Address, &s, now).is_empty());
        // The window (10 s) passed: the count starts again.
        let later = now + Duration::from_secs(11);
        assert!(t.strike(L, a, Level::Address, &s, later).is_empty());
        assert!(t.strike(L, a, Level::Address, &s, later).is_empty());
        assert_eq!(
            t.strike(L, a, Level::Address, &s, later),
            vec![(Level::Address, "192.0.2.9/32".parse().unwrap())]
        );
    }

    #[test]
    fn strikes_add_up_per_prefix_and_network_across_addresses() {
        let s = AdmissionSettings {
            block_after: 3,
            prefix_block_after: 4,
            network_block_after: 6,
            ..settings()
        };
        let mut t = Sources::new(&s);
        let now = Instant::now();
        // Two strikes each (never enough for an address): the second
        // address's second makes its /64's fourth.
        assert!(
            t.strike(L, ip("2001:db8:1:1::1"), Level::Address, &s, now)
                .is_empty()
        );
        assert!(
            t.strike(L, ip("2001:db8:1:1::1"), Level::Address, &s, now)
                .is_empty()
        );
        assert!(
            t.strike(L, ip("2001:db8:1:1::2"), Level::Address, &s, now)
                .is_empty()
        );
        assert_eq!(
            t.strike(L, ip("2001:db8:1:1::2"), Level::Address, &s, now),
            vec![(Level::Prefix, "2001:db8:1:1::/64".parse().unwrap())]
        );
        // Other /64s of the same /48 bring it to six.
        assert!(
            t.strike(L, ip("2001:db8:1:2::1"), Level::Address, &s, now)
                .is_empty()
        );
        assert_eq!(
            t.strike(L, ip("2001:db8:1:3::1"), Level::Address, &s, now),
            vec![(Level::Network, "2001:db8:1::/48".parse().unwrap())]
        );
        // An IPv4 source's network is its /16.
        assert_eq!(
            Level::Network.group(ip("198.51.7.9"), &s),
            "198.51.0.0/16".parse::<IpNet>().unwrap()
        );
    }

    #[test]
    fn a_network_has_its_own_rate_and_in_flight_cap() {
        let s = AdmissionSettings {
            source_handshakes_per_second: 0,
            prefix_handshakes_per_second: 0,
            prefix_handshakes_in_flight: 0,
            network_handshakes_per_second: 0,
            network_handshakes_in_flight: 3,
            ..settings()
        };
        let mut t = Sources::new(&s);
        let now = Instant::now();
        for i in 0..3 {
            t.start(L, ip(&format!("2001:db8:7:{i:x}::1")), &s, now)
                .unwrap();
        }
        assert_eq!(
            t.start(L, ip("2001:db8:7:ffff::1"), &s, now),
            Err(Refusal::NetworkHandshakes)
        );
        t.start(L, ip("2001:db8:8::1"), &s, now).unwrap();
        let s = AdmissionSettings {
            network_handshakes_in_flight: 0,
            network_handshakes_per_second: 1,
            network_handshake_burst: 2,
            ..s
        };
        let mut t = Sources::new(&s);
        t.start(L, ip("10.1.1.1"), &s, now).unwrap();
        t.start(L, ip("10.1.2.1"), &s, now).unwrap();
        assert_eq!(
            t.start(L, ip("10.1.3.1"), &s, now),
            Err(Refusal::NetworkRate)
        );
        t.start(L, ip("10.2.3.1"), &s, now).unwrap();
    }

    #[test]
    fn a_source_over_its_rate_leaves_its_prefix_bucket_to_its_neighbours() {
        let s = AdmissionSettings {
            prefix_handshakes_per_second: 1,
            prefix_handshake_burst: 5,
            prefix_handshakes_in_flight: 0,
            ..settings()
        };
        let mut t = Sources::new(&s);
        let now = Instant::now();
        let loud = ip("192.0.2.1");
        for _ in 0..3 {
            t.start(L, loud, &s, now).unwrap();
        }
        for _ in 0..100 {
            assert_eq!(t.start(L, loud, &s, now), Err(Refusal::SourceRate));
        }
        // Two of the prefix's five tokens are left for the others.
        t.start(L, ip("192.0.2.2"), &s, now).unwrap();
        t.start(L, ip("192.0.2.3"), &s, now).unwrap();
        assert_eq!(
            t.start(L, ip("192.0.2.4"), &s, now),
            Err(Refusal::PrefixRate)
        );
    }

    #[test]
    fn the_tables_stay_bounded_by_forgetting_the_least_recently_seen_idle() {
        let s = AdmissionSettings {
            max_tracked: 100,
            source_handshakes_per_second: 1,
            source_handshake_burst: 1,
            prefix_handshakes_per_second: 0,
            network_handshakes_per_second: 0,
            ..settings()
        };
        let mut t = Sources::new(&s);
        let mut now = Instant::now();
        // Holds a handshake the whole time: never forgotten, though never
        // seen again.
        let kept = ip("198.51.100.1");
        t.start(L, kept, &s, now).unwrap();
        for i in 0..10_000u32 {
            // A second apart: each one's bucket is full again by the next.
            now += Duration::from_secs(1);
            let a = IpAddr::from((0x0a00_0000 + (i << 8)).to_be_bytes());
            let g = t.start(L, a, &s, now).unwrap();
            t.ended(&g);
        }
        assert!(t.lens().iter().all(|n| *n <= 100), "{:?}", t.lens());
        assert!(t.forgotten()[0] >= 9_900, "{:?}", t.forgotten());
        assert_eq!(t.in_flight(kept), 1);
    }

    #[test]
    fn a_table_full_of_busy_entries_refuses_newcomers_and_forgets_nothing() {
        let s = AdmissionSettings {
            max_tracked: 100,
            block_after: 3,
            ..settings()
        };
        let mut t = Sources::new(&s);
        let now = Instant::now();
        let striker = ip("2001:db8:dead::1");
        t.strike(L, striker, Level::Address, &s, now);
        t.strike(L, striker, Level::Address, &s, now);
        // One failed handshake from each of 10,000 /64s (distinct /48s):
        // each entry holds a strike, so none may be forgotten.
        let mut refused = 0;
        for i in 0..10_000u32 {
            let a = IpAddr::from(
                (0x2001_0000_0000_0000_0000_0000_0000_0001u128 | (u128::from(i) << 80))
                    .to_be_bytes(),
            );
            match t.start(L, a, &s, now) {
                Ok(g) => {
                    t.ended(&g);
                    t.strike(L, a, Level::Address, &s, now);
                }
                Err(r) => {
                    assert_eq!(r, Refusal::MaxTracked);
                    refused += 1;
                }
            }
        }
        assert!(refused >= 9_800, "{refused}");
        assert_eq!(t.forgotten(), [0, 0, 0, 0]);
        assert_eq!(t.strikes(striker), 2);
        assert_eq!(
            t.strike(L, striker, Level::Address, &s, now),
            vec![(Level::Address, IpNet::from(striker))]
        );
        // Once the window has passed, they are idle and make room again.
        let later = now + s.block_window + Duration::from_secs(5);
        t.start(L, ip("192.0.2.1"), &s, later).unwrap();
    }

    /// An attacker spread thin over a /24: one failure a second, each
    /// address failing once every 254 s, far below every threshold of a
    /// window (`prefix_block_after` is 400 a window). Its failures add up
    /// over the longer horizon: the /24 is blocked within bounded time
    /// (about 139 s with the defaults: a point a second against a score
    /// halving every 10 minutes, to 128).
    #[test]
    fn a_thin_spread_of_failures_gets_its_prefix_blocked_in_bounded_time() {
        let s = AdmissionSettings::default();
        let mut t = Sources::new(&s);
        let start = Instant::now();
        let mut blocked = None;
        for n in 0..600u32 {
            let now = start + Duration::from_secs(u64::from(n));
            let a = IpAddr::from([10, 9, 9, (n % 254 + 1) as u8]);
            let due = t.strike(L, a, Level::Address, &s, now);
            if !due.is_empty() {
                blocked = Some((n, due));
                break;
            }
        }
        let (after, due) = blocked.expect("never blocked");
        assert_eq!(
            due,
            vec![(Level::Prefix, "10.9.9.0/24".parse::<IpNet>().unwrap())]
        );
        assert!((120..=150).contains(&after), "blocked after {after} s");
    }

    /// One address of an office's /24 fails once a second for six hours
    /// (a misconfigured client): the address may be blocked, never its
    /// /24 or /16, on either horizon.
    #[test]
    fn one_failing_address_never_gets_its_prefix_blocked() {
        let s = AdmissionSettings::default();
        let mut t = Sources::new(&s);
        let start = Instant::now();
        for n in 0..6 * 3600u64 {
            let now = start + Duration::from_secs(n);
            for (level, net) in t.strike(L, ip("10.20.30.40"), Level::Address, &s, now) {
                assert_eq!(level, Level::Address, "{net} blocked after {n} s");
            }
        }
    }

    /// Three addresses of a /24 fail once a second each, for hours: on the
    /// long horizon that is a spread, and the /24 is blocked. With five
    /// other addresses authenticating (a verified certificate) every few
    /// seconds, the clients that succeed pay the failing ones' points
    /// back, and the /24 is never blocked.
    #[test]
    fn succeeding_clients_of_a_prefix_weigh_against_its_failing_ones() {
        let s = AdmissionSettings::default();
        let first_block = |with_successes: bool| {
            let mut t = Sources::new(&s);
            let start = Instant::now();
            for n in 0..3 * 3600u64 {
                let now = start + Duration::from_secs(n);
                if with_successes && n % 5 == 0 {
                    for i in 0..5u8 {
                        let a = IpAddr::from([10, 30, 1, 100 + i]);
                        let g = t.start(L, a, &s, now).unwrap();
                        t.ended(&g);
                        t.verified(L, a, "id", &s, now);
                    }
                }
                for i in 0..3u8 {
                    let a = IpAddr::from([10, 30, 1, 10 + i]);
                    for (level, net) in t.strike(L, a, Level::Address, &s, now) {
                        if level != Level::Address {
                            return Some((n, net));
                        }
                    }
                }
            }
            None
        };
        let (after, net) = first_block(false).expect("never blocked");
        assert_eq!(net, "10.30.1.0/24".parse::<IpNet>().unwrap());
        assert!(after < 3600, "blocked after {after} s");
        assert_eq!(first_block(true), None);
    }

    /// The networks' table is full of busy entries: a new source is
    /// refused, a known one (a verified certificate within `known_for`)
    /// is admitted, held to its own cap (counted in the known table, the
    /// addresses' being full too), until `known_for` has passed.
    #[test]
    fn a_known_source_passes_a_full_networks_table_until_known_for_has_passed() {
        let s = AdmissionSettings {
            max_tracked: 10,
            known_for: Duration::from_secs(60),
            source_handshakes_per_second: 0,
            ..settings()
        };
        let mut t = Sources::new(&s);
        let now = Instant::now();
        let known = ip("192.0.2.50");
        t.verified(L, known, "id", &s, now);
        let hold = |t: &mut Sources, at: Instant| {
            for i in 0..10u8 {
                t.strike(L, IpAddr::from([10, i, 0, 1]), Level::Address, &s, at);
            }
        };
        hold(&mut t, now);
        assert_eq!(
            t.start(L, ip("198.51.100.1"), &s, now),
            Err(Refusal::MaxTracked)
        );
        let held: Vec<Groups> = (0..4)
            .map(|_| t.start(L, known, &s, now).unwrap())
            .collect();
        assert_eq!(t.start(L, known, &s, now), Err(Refusal::SourceHandshakes));
        t.ended(&held[0]);
        t.start(L, known, &s, now).unwrap();
        assert_eq!(t.known_admitted, 5);
        // A minute and more later (the attack still holding the table):
        // no longer known.
        let later = now + Duration::from_secs(61);
        hold(&mut t, later);
        assert_eq!(t.start(L, known, &s, later), Err(Refusal::MaxTracked));
    }

    /// One failed handshake from each of many /48s of one /32 (cheap in
    /// IPv6): past `networks_per_allocation`, that /32's new networks are
    /// refused, so the networks' table keeps room, and a new source from
    /// elsewhere is admitted. Once the window has passed, the /32's
    /// entries are idle again and give way.
    #[test]
    fn one_ipv6_allocation_cannot_fill_the_networks_table() {
        let s = AdmissionSettings {
            max_tracked: 100,
            networks_per_allocation: 10,
            ..settings()
        };
        let mut t = Sources::new(&s);
        let now = Instant::now();
        let mut refused = 0;
        for i in 0..200u32 {
            let a = ip(&format!("2001:db8:{:x}::1", 0x100 + i));
            match t.start(L, a, &s, now) {
                Ok(g) => {
                    t.ended(&g);
                    t.strike(L, a, Level::Address, &s, now);
                }
                Err(r) => {
                    assert_eq!(r, Refusal::NetworksPerAllocation);
                    refused += 1;
                }
            }
        }
        assert_eq!(refused, 190);
        assert_eq!(t.lens()[2], 10);
        // Another /32, and IPv4, are not affected.
        t.start(L, ip("2001:db9:1::1"), &s, now).unwrap();
        t.start(L, ip("192.0.2.1"), &s, now).unwrap();
        // A network already tracked is not refused for the quota.
        t.start(L, ip("2001:db8:100::2"), &s, now).unwrap();
        // The quota counts entries, so a reload that tightens it counts
        // what is there.
        let tight = AdmissionSettings {
            networks_per_allocation: 5,
            ..s.clone()
        };
        t.configure(&tight, now);
        assert_eq!(
            t.start(L, ip("2001:db8:ffff::1"), &tight, now),
            Err(Refusal::NetworksPerAllocation)
        );
        // Once idle, the /32's entries give way to newcomers, and the
        // count follows.
        let later = now + s.block_window + Duration::from_secs(5);
        let big = AdmissionSettings {
            max_tracked: 12,
            ..s.clone()
        };
        t.configure(&big, later);
        // (The /48 of 2001:db8:100::2 stays: its handshake is in flight.)
        for i in 0..9u8 {
            let g = t
                .start(L, IpAddr::from([10, i, 0, 1]), &big, later)
                .unwrap();
            t.ended(&g);
        }
        assert_eq!(
            t.allocations
                .get(&"2001:db8::/32".parse::<IpNet>().unwrap()),
            Some(&1)
        );
        let g = t.start(
            L,
            ip("2001:db8:ffff::1"),
            &big,
            later + Duration::from_secs(1),
        );
        g.unwrap();
    }
}

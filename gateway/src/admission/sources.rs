//! Per-source accounting: for each source address and each prefix (/24,
//! /64 by default), a token bucket of handshakes, the handshakes in flight,
//! and strikes (failed handshakes and refusals) within a window.
//!
//! An attacker chooses how many sources there are, so both tables are
//! bounded: each holds at most `max_tracked` entries, and a new one makes
//! the least recently seen go. What is forgotten is only what that source
//! did lately; a source forgotten while it held handshakes is undercounted
//! until they end, and the listeners' own slots (`max_handshakes_in_flight`
//! and eviction) still bound everyone together.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::net::IpAddr;
use std::time::Instant;

use ipnet::IpNet;

use crate::config::AdmissionSettings;

use super::Refusal;

/// A map of at most `capacity` entries: inserting into a full one forgets
/// the least recently used. Lookups and inserts are O(log n).
pub(super) struct Lru<K, V> {
    map: HashMap<K, (V, u64)>,
    order: BTreeMap<u64, K>,
    clock: u64,
    capacity: usize,
    /// Entries forgotten to make room, since start.
    pub forgotten: u64,
}

impl<K: Hash + Eq + Clone, V> Lru<K, V> {
    pub fn new(capacity: usize) -> Self {
        Lru {
            map: HashMap::new(),
            order: BTreeMap::new(),
            clock: 0,
            capacity: capacity.max(1),
            forgotten: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// A smaller capacity forgets the least recently used at once.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(1);
        while self.map.len() > self.capacity {
            self.forget_oldest();
        }
    }

    /// The entry for `key`, made with `make` if there is none, marked as
    /// just used.
    pub fn entry(&mut self, key: &K, make: impl FnOnce() -> V) -> &mut V {
        self.clock += 1;
        let stamp = self.clock;
        if let Some((_, at)) = self.map.get(key) {
            let old = *at;
            self.order.remove(&old);
        } else {
            if self.map.len() >= self.capacity {
                self.forget_oldest();
            }
            self.map.insert(key.clone(), (make(), stamp));
        }
        self.order.insert(stamp, key.clone());
        let slot = match self.map.get_mut(key) {
            Some(slot) => slot,
            None => unreachable!("inserted above"),
        };
        slot.1 = stamp;
        &mut slot.0
    }

    /// The entry for `key`, if it is still tracked (not marked as used).
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.map.get_mut(key).map(|(v, _)| v)
    }

    fn forget_oldest(&mut self) {
        if let Some((_, key)) = self.order.pop_first() {
            self.map.remove(&key);
            self.forgotten += 1;
        }
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

    /// Takes one token if there is one.
    fn take(&mut self, rate: u32, burst: u32, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(rate)).min(f64::from(burst));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What is known about one source or prefix.
#[derive(Debug, Clone)]
pub(super) struct Tally {
    bucket: Bucket,
    in_flight: u32,
    strikes: u32,
    strikes_since: Instant,
}

impl Tally {
    fn new(burst: u32, now: Instant) -> Tally {
        Tally {
            bucket: Bucket::full(burst, now),
            in_flight: 0,
            strikes: 0,
            strikes_since: now,
        }
    }
}

/// The limits of one table.
#[derive(Debug, Clone, Copy)]
struct Limits {
    rate: u32,
    burst: u32,
    in_flight: u32,
}

/// Source addresses and prefixes, each in a bounded table.
pub(super) struct Sources {
    pub addresses: Lru<IpAddr, Tally>,
    pub prefixes: Lru<IpNet, Tally>,
}

impl Sources {
    pub fn new(settings: &AdmissionSettings) -> Sources {
        Sources {
            addresses: Lru::new(settings.max_tracked as usize),
            prefixes: Lru::new(settings.max_tracked as usize),
        }
    }

    pub fn configure(&mut self, settings: &AdmissionSettings) {
        self.addresses.set_capacity(settings.max_tracked as usize);
        self.prefixes.set_capacity(settings.max_tracked as usize);
    }

    /// Counts a handshake `source` wants to start, or says which limit it
    /// would exceed (counting nothing then). Admitted, it is in flight
    /// until [`Sources::ended`].
    pub fn start(
        &mut self,
        source: IpAddr,
        settings: &AdmissionSettings,
        now: Instant,
    ) -> Result<(), Refusal> {
        let prefix = prefix_of(source, settings);
        let own = Limits {
            rate: settings.source_handshakes_per_second,
            burst: settings.source_handshake_burst,
            in_flight: settings.source_handshakes_in_flight,
        };
        let shared = Limits {
            rate: settings.prefix_handshakes_per_second,
            burst: settings.prefix_handshake_burst,
            in_flight: settings.prefix_handshakes_in_flight,
        };
        // In flight first: a refusal for it takes no token. Then the
        // source's own bucket, so that a source over its rate does not
        // drain its prefix's bucket for its neighbours.
        let a = self.addresses.entry(&source, || Tally::new(own.burst, now));
        if own.in_flight > 0 && a.in_flight >= own.in_flight {
            return Err(Refusal::SourceHandshakes);
        }
        let p = self
            .prefixes
            .entry(&prefix, || Tally::new(shared.burst, now));
        if shared.in_flight > 0 && p.in_flight >= shared.in_flight {
            return Err(Refusal::PrefixHandshakes);
        }
        let a = self.addresses.entry(&source, || Tally::new(own.burst, now));
        if own.rate > 0 && !a.bucket.take(own.rate, own.burst, now) {
            return Err(Refusal::SourceRate);
        }
        let p = self
            .prefixes
            .entry(&prefix, || Tally::new(shared.burst, now));
        if shared.rate > 0 && !p.bucket.take(shared.rate, shared.burst, now) {
            return Err(Refusal::PrefixRate);
        }
        p.in_flight += 1;
        let a = self.addresses.entry(&source, || Tally::new(own.burst, now));
        a.in_flight += 1;
        Ok(())
    }

    /// A handshake of `source` is over (done, failed or evicted).
    pub fn ended(&mut self, source: IpAddr, settings: &AdmissionSettings) {
        if let Some(a) = self.addresses.get_mut(&source) {
            a.in_flight = a.in_flight.saturating_sub(1);
        }
        if let Some(p) = self.prefixes.get_mut(&prefix_of(source, settings)) {
            p.in_flight = p.in_flight.saturating_sub(1);
        }
    }

    /// Adds a strike against `source`; true when it now has `block_after`
    /// within `block_window` (and its count starts again).
    pub fn strike(&mut self, source: IpAddr, settings: &AdmissionSettings, now: Instant) -> bool {
        if settings.block_after == 0 {
            return false;
        }
        let burst = settings.source_handshake_burst;
        let a = self.addresses.entry(&source, || Tally::new(burst, now));
        if now.saturating_duration_since(a.strikes_since) > settings.block_window {
            a.strikes = 0;
            a.strikes_since = now;
        }
        a.strikes += 1;
        if a.strikes >= settings.block_after {
            a.strikes = 0;
            a.strikes_since = now;
            return true;
        }
        false
    }

    /// Handshakes in flight from `source` as counted here.
    #[cfg(test)]
    pub fn in_flight(&mut self, source: IpAddr) -> u32 {
        self.addresses.get_mut(&source).map_or(0, |a| a.in_flight)
    }
}

/// The prefix `source` is grouped in.
pub(super) fn prefix_of(source: IpAddr, settings: &AdmissionSettings) -> IpNet {
    let len = match source {
        IpAddr::V4(_) => settings.ipv4_prefix,
        IpAddr::V6(_) => settings.ipv6_prefix,
    };
    // The lengths are checked when the config is read.
    IpNet::new(source, len)
        .map(|n| n.trunc())
        .unwrap_or_else(|_| IpNet::from(source))
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

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let s = settings();
        let mut t = Sources::new(&s);
        let now = Instant::now();
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            t.start(a, &s, now).unwrap();
            t.ended(a, &s);
        }
        assert_eq!(t.start(a, &s, now), Err(Refusal::SourceRate));
        // Half a second later, one token is back (2 per second).
        t.start(a, &s, now + Duration::from_millis(500)).unwrap();
        assert_eq!(
            t.start(a, &s, now + Duration::from_millis(500)),
            Err(Refusal::SourceRate)
        );
        // A refused start left nothing in flight.
        t.ended(a, &s);
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
        for _ in 0..4 {
            t.start(ip("192.0.2.1"), &s, now).unwrap();
        }
        assert_eq!(
            t.start(ip("192.0.2.1"), &s, now),
            Err(Refusal::SourceHandshakes)
        );
        // Another address of the same /24 has two left of the prefix's six.
        t.start(ip("192.0.2.2"), &s, now).unwrap();
        t.start(ip("192.0.2.2"), &s, now).unwrap();
        assert_eq!(
            t.start(ip("192.0.2.3"), &s, now),
            Err(Refusal::PrefixHandshakes)
        );
        // Another /24 is not affected; an ended handshake frees its place.
        t.start(ip("192.0.3.1"), &s, now).unwrap();
        t.ended(ip("192.0.2.1"), &s);
        t.start(ip("192.0.2.3"), &s, now).unwrap();
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
            t.start(ip(&format!("2001:db8:1:2::{i:x}")), &s, now)
                .unwrap();
        }
        assert_eq!(
            t.start(ip("2001:db8:1:2:ffff::1"), &s, now),
            Err(Refusal::PrefixHandshakes)
        );
        t.start(ip("2001:db8:1:3::1"), &s, now).unwrap();
    }

    #[test]
    fn strikes_block_within_the_window_only() {
        let s = settings();
        let mut t = Sources::new(&s);
        let now = Instant::now();
        let a = ip("192.0.2.9");
        assert!(!t.strike(a, &s, now));
        assert!(!t.strike(a, &s, now));
        // The window (10 s) passed: the count starts again.
        let later = now + Duration::from_secs(11);
        assert!(!t.strike(a, &s, later));
        assert!(!t.strike(a, &s, later));
        assert!(t.strike(a, &s, later));
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
            t.start(loud, &s, now).unwrap();
        }
        for _ in 0..100 {
            assert_eq!(t.start(loud, &s, now), Err(Refusal::SourceRate));
        }
        // Two of the prefix's five tokens are left for the others.
        t.start(ip("192.0.2.2"), &s, now).unwrap();
        t.start(ip("192.0.2.3"), &s, now).unwrap();
        assert_eq!(t.start(ip("192.0.2.4"), &s, now), Err(Refusal::PrefixRate));
    }

    #[test]
    fn the_tables_stay_bounded_by_forgetting_the_least_recently_seen() {
        let s = AdmissionSettings {
            max_tracked: 100,
            source_handshakes_per_second: 1,
            source_handshake_burst: 1,
            prefix_handshakes_per_second: 0,
            ..settings()
        };
        let mut t = Sources::new(&s);
        let now = Instant::now();
        let kept = ip("198.51.100.1");
        t.start(kept, &s, now).unwrap();
        for i in 0..10_000u32 {
            let a = IpAddr::from((0x0a00_0000 + i).to_be_bytes());
            let _ = t.start(a, &s, now);
            if i % 50 == 0 {
                // Seen again: stays tracked, its bucket still empty.
                assert_eq!(t.start(kept, &s, now), Err(Refusal::SourceRate));
            }
        }
        assert!(t.addresses.len() <= 100 && t.prefixes.len() <= 100);
        assert!(t.addresses.forgotten >= 9_900, "{}", t.addresses.forgotten);
        assert_eq!(t.in_flight(kept), 1);
    }
}

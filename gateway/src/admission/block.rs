//! The block list: source addresses and prefixes refused at accept, each
//! until its expiry (or until removed). Bounded: at most `max_blocked`
//! entries; when full, the entry that expires first gives way to a new one
//! (an entry without expiry never does: then the new one is not added).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::sources::Level;

/// Why an entry is on the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockReason {
    /// Too many failed handshakes or refusals within `block_window`.
    Strikes,
    /// Added by an operator (`gateway block add`).
    Manual,
}

impl BlockReason {
    pub fn as_str(self) -> &'static str {
        match self {
            BlockReason::Strikes => "strikes",
            BlockReason::Manual => "manual",
        }
    }
}

/// One entry, as `gateway block list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub net: IpNet,
    pub reason: BlockReason,
    /// How wide it is (as the config's prefix lengths were when it was
    /// added).
    pub level: Level,
    /// None: until removed.
    pub expires: Option<Instant>,
    /// Kept out of the kernel's copy: a strikes block of a prefix or
    /// network that held a known source when it was made (decided once
    /// then, so that a reload does not scan the known table per block
    /// under the lock every accept takes; attacker review 12, R12-6).
    pub spares_known: bool,
}

/// What adding an entry did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Added {
    /// It is on the list (and this one, if any, gave way).
    Yes { displaced: Option<IpNet> },
    /// The list is full of entries that do not expire.
    Full,
}

pub(super) struct BlockList {
    entries: HashMap<IpNet, Blocked>,
    /// Entries with an expiry, soonest first.
    by_expiry: BTreeSet<(Instant, IpNet)>,
    /// Prefix lengths in use, with how many entries each: a lookup tries
    /// only those.
    lengths: BTreeMap<(bool, u8), usize>,
    capacity: usize,
    /// Entries that gave way to newer ones, since start.
    pub displaced: u64,
}

impl BlockList {
    pub fn new(capacity: usize) -> BlockList {
        BlockList {
            entries: HashMap::new(),
            by_expiry: BTreeSet::new(),
            lengths: BTreeMap::new(),
            capacity: capacity.max(1),
            displaced: 0,
        }
    }

    pub fn set_capacity(&mut self, capacity: usize) -> Vec<IpNet> {
        self.capacity = capacity.max(1);
        let mut gone = Vec::new();
        while self.entries.len() > self.capacity {
            match self.soonest() {
                Some(net) => {
                    self.remove(&net);
                    self.displaced += 1;
                    gone.push(net);
                }
                None => break,
            }
        }
        gone
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The entry blocking `source` now, if any (the longest prefix).
    pub fn lookup(&self, source: IpAddr, now: Instant) -> Option<&Blocked> {
        let v6 = source.is_ipv6();
        self.lengths
            .keys()
            .rev()
            .filter(|(family, _)| *family == v6)
            .find_map(|(_, len)| {
                let net = IpNet::new(source, *len).ok()?.trunc();
                self.entries
                    .get(&net)
                    .filter(|b| b.expires.is_none_or(|e| e > now))
            })
    }

    /// Whether an entry as wide as `net` or wider blocks all of it now.
    pub fn covers(&self, net: IpNet, now: Instant) -> bool {
        self.covers_where(net, now, |_| true)
    }

    /// Whether an entry as wide as `net` or wider, one that `pick` picks,
    /// blocks all of it now.
    pub fn covers_where(&self, net: IpNet, now: Instant, pick: impl Fn(&Blocked) -> bool) -> bool {
        let v6 = net.addr().is_ipv6();
        self.lengths
            .keys()
            .filter(|(family, len)| *family == v6 && *len <= net.prefix_len())
            .any(|(_, len)| {
                IpNet::new(net.addr(), *len).is_ok_and(|wider| {
                    self.entries
                        .get(&wider.trunc())
                        .is_some_and(|b| b.expires.is_none_or(|e| e > now) && pick(b))
                })
            })
    }

    /// The entry for exactly `net`, if any.
    pub fn get(&self, net: &IpNet) -> Option<&Blocked> {
        self.entries.get(net)
    }

    /// The entries `pick` picks.
    pub fn select(&self, pick: impl Fn(&Blocked) -> bool) -> Vec<IpNet> {
        self.entries
            .values()
            .filter(|b| pick(b))
            .map(|b| b.net)
            .collect()
    }

    /// Blocks `net` (truncated to its prefix) for `ttl` (None: until
    /// removed), replacing an entry for the same prefix.
    pub fn add(
        &mut self,
        net: IpNet,
        reason: BlockReason,
        level: Level,
        ttl: Option<Duration>,
        now: Instant,
    ) -> Added {
        let net = net.trunc();
        let mut displaced = None;
        if !self.entries.contains_key(&net) && self.entries.len() >= self.capacity {
            match self.soonest() {
                Some(old) => {
                    self.remove(&old);
                    self.displaced += 1;
                    displaced = Some(old);
                }
                None => return Added::Full,
            }
        }
        self.remove(&net);
        let expires = ttl.map(|t| now + t);
        if let Some(e) = expires {
            self.by_expiry.insert((e, net));
        }
        *self
            .lengths
            .entry((net.addr().is_ipv6(), net.prefix_len()))
            .or_default() += 1;
        self.entries.insert(
            net,
            Blocked {
                net,
                reason,
                level,
                expires,
                spares_known: false,
            },
        );
        Added::Yes { displaced }
    }

    /// Marks the entry for exactly `net` as kept out of the kernel's copy.
    pub fn spare_known(&mut self, net: &IpNet) {
        if let Some(b) = self.entries.get_mut(net) {
            b.spares_known = true;
        }
    }

    /// Removes the entry for exactly `net`; false when there was none.
    pub fn remove(&mut self, net: &IpNet) -> bool {
        let net = net.trunc();
        let Some(old) = self.entries.remove(&net) else {
            return false;
        };
        if let Some(e) = old.expires {
            self.by_expiry.remove(&(e, net));
        }
        let key = (net.addr().is_ipv6(), net.prefix_len());
        if let Some(n) = self.lengths.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.lengths.remove(&key);
            }
        }
        true
    }

    /// Removes and returns every entry expired by `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<IpNet> {
        let due: Vec<IpNet> = self
            .by_expiry
            .iter()
            .take_while(|(e, _)| *e <= now)
            .map(|(_, n)| *n)
            .collect();
        for n in &due {
            self.remove(n);
        }
        due
    }

    /// Every entry, most specific prefixes and soonest expiries last.
    pub fn list(&self) -> Vec<Blocked> {
        let mut v = self.snapshot();
        v.sort_by_key(|b| b.net);
        v
    }

    /// Every entry, in no order: a copy to take under the admission lock
    /// and sort or count after it is released.
    pub fn snapshot(&self) -> Vec<Blocked> {
        self.entries.values().cloned().collect()
    }

    fn soonest(&self) -> Option<IpNet> {
        self.by_expiry.first().map(|(_, n)| *n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_and_prefixes_block_until_they_expire() {
        let mut b = BlockList::new(10);
        let now = Instant::now();
        b.add(
            net("192.0.2.7/32"),
            BlockReason::Strikes,
            Level::Address,
            Some(Duration::from_secs(5)),
            now,
        );
        b.add(
            net("198.51.100.0/24"),
            BlockReason::Manual,
            Level::Prefix,
            None,
            now,
        );
        b.add(
            net("2001:db8::/64"),
            BlockReason::Manual,
            Level::Prefix,
            Some(Duration::from_secs(60)),
            now,
        );
        assert!(b.lookup(ip("192.0.2.7"), now).is_some());
        assert!(b.lookup(ip("192.0.2.8"), now).is_none());
        assert_eq!(
            b.lookup(ip("198.51.100.99"), now).map(|e| e.reason),
            Some(BlockReason::Manual)
        );
        assert!(b.lookup(ip("2001:db8::1:2"), now).is_some());
        assert!(b.lookup(ip("2001:db8:0:1::1"), now).is_none());
        // Expired: no longer blocks, even before the sweep takes it out.
        let later = now + Duration::from_secs(6);
        assert!(b.lookup(ip("192.0.2.7"), later).is_none());
        assert_eq!(b.expire(later), vec![net("192.0.2.7/32")]);
        assert_eq!(b.len(), 2);
        assert!(b.remove(&net("198.51.100.0/24")));
        assert!(b.lookup(ip("198.51.100.99"), later).is_none());
        assert!(!b.remove(&net("198.51.100.0/24")));
    }

    #[test]
    fn a_full_list_makes_room_by_the_soonest_expiry_never_a_permanent_entry() {
        let mut b = BlockList::new(3);
        let now = Instant::now();
        let s = |n| Some(Duration::from_secs(n));
        b.add(
            net("10.0.0.1/32"),
            BlockReason::Manual,
            Level::Address,
            None,
            now,
        );
        b.add(
            net("10.0.0.2/32"),
            BlockReason::Strikes,
            Level::Address,
            s(100),
            now,
        );
        b.add(
            net("10.0.0.3/32"),
            BlockReason::Strikes,
            Level::Address,
            s(50),
            now,
        );
        assert_eq!(
            b.add(
                net("10.0.0.4/32"),
                BlockReason::Strikes,
                Level::Address,
                s(100),
                now
            ),
            Added::Yes {
                displaced: Some(net("10.0.0.3/32"))
            }
        );
        assert_eq!(b.len(), 3);
        // 2 and 4 expire together; then only permanent entries are left.
        b.add(
            net("10.0.0.5/32"),
            BlockReason::Strikes,
            Level::Address,
            s(100),
            now,
        );
        b.add(
            net("10.0.0.6/32"),
            BlockReason::Manual,
            Level::Address,
            None,
            now,
        );
        b.add(
            net("10.0.0.7/32"),
            BlockReason::Manual,
            Level::Address,
            None,
            now,
        );
        assert_eq!(
            b.add(
                net("10.0.0.8/32"),
                BlockReason::Strikes,
                Level::Address,
                s(100),
                now
            ),
            Added::Full
        );
        assert!(b.lookup(ip("10.0.0.1"), now).is_some());
        assert!(b.lookup(ip("10.0.0.8"), now).is_none());
        assert_eq!(b.displaced, 4);
        // Replacing an entry needs no room.
        assert!(matches!(
            b.add(
                net("10.0.0.1/32"),
                BlockReason::Manual,
                Level::Address,
                s(1),
                now
            ),
            Added::Yes { displaced: None }
        ));
    }

    #[test]
    fn a_prefix_written_with_host_bits_is_the_prefix() {
        let mut b = BlockList::new(3);
        let now = Instant::now();
        b.add(
            net("203.0.113.77/24"),
            BlockReason::Manual,
            Level::Prefix,
            None,
            now,
        );
        assert_eq!(b.list()[0].net, net("203.0.113.0/24"));
        assert!(b.remove(&net("203.0.113.1/24")));
    }
}

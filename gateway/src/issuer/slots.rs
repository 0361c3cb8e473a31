//! Who may hold one of the issuer's connections before its TLS handshake
//! says who they are.
//!
//! The issuer takes clients without a certificate (`GET /v1/config`), so
//! anyone who can reach it may hold a connection until the handshake
//! deadline. Each source network (IPv4 /24, IPv6 /64) holds at most
//! `PER_SOURCE`, all together `MAX_CONNECTIONS`; but an attacker with
//! a handful of networks (16 /24s, or 16 /64s of any IPv6 customer's /56)
//! could still keep every slot busy, handshake deadline after handshake
//! deadline, and no enrolled device could sign in. So `KNOWN_RESERVE` of
//! the slots are kept for networks where a device certificate verified
//! within `KNOWN_FOR`: a device's own office, home or VPN egress keeps
//! getting in under such a flood; only a device at a network new to the
//! issuer may be crowded out while it lasts.
//!
//! Every refusal is counted (`gateway_issuer_connections_refused_total`,
//! by reason) and logged at a bounded rate (`admission::RefusalLog`): a
//! line per refused connection would be a second flood.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::admission::RefusalLog;

/// Connections the issuer serves at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Connections one source network may hold, so one host cannot take every
/// slot: an IPv4 /24 or an IPv6 /64 (one host holds a whole /64, and a
/// /24 is what one attacker cheaply has; see `source_key`).
pub const PER_SOURCE: usize = 16;
/// Of `MAX_CONNECTIONS`, those only a known network may take.
pub const KNOWN_RESERVE: usize = 64;
/// A network is known this long after a device certificate last verified
/// from it: a week covers a laptop that signs in on workdays.
pub const KNOWN_FOR: Duration = Duration::from_secs(7 * 24 * 3600);
/// Known networks remembered at most; past that the one known longest ago
/// makes room. Only a device's verified handshake adds one.
pub const KNOWN_NETWORKS: usize = 4096;
/// Of the reserve, what one known network may hold: an enrolled user's
/// networks (or an egress a device shares with others) take their part of
/// it, not all of it.
pub const RESERVE_PER_NETWORK: usize = PER_SOURCE / 4;
/// Networks one device keeps known at most; a fifth replaces its oldest,
/// so one device can neither spread over the reserve nor flush the table.
pub const KNOWN_PER_DEVICE: usize = 4;
/// Devices' claims one network keeps: the most recent (an office's
/// laptops keep it known; one device's claim going leaves the others').
pub const CLAIMS_PER_NETWORK: usize = 8;
/// Refusals of one kind are logged one by one at most once this often;
/// the rest are summarized.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Why a connection got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its network holds `PER_SOURCE` connections.
    NetworkFull,
    /// Every slot it may take is busy (for an unknown network, all but
    /// the reserve).
    Busy,
}

impl Refused {
    /// The `reason` label and the log's.
    pub fn reason(self) -> &'static str {
        match self {
            Refused::NetworkFull => "network_full",
            Refused::Busy => "busy",
        }
    }
}

/// One connection's slot, given back when dropped.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    _source: SourceSlot,
    /// Its network's count in the reserve, if it took from it.
    _reserved: Option<SourceSlot>,
    /// It took one of the known networks' reserve.
    pub reserved: bool,
}

/// A network known from a device: when it last verified there, and which
/// device (`KNOWN_PER_DEVICE`).
struct Known {
    at: Instant,
    device: String,
}

/// The issuer's connection slots.
pub struct Slots {
    /// `MAX_CONNECTIONS - KNOWN_RESERVE`: anyone's.
    open: Arc<Semaphore>,
    /// `KNOWN_RESERVE`: known networks' once `open` is full.
    reserve: Arc<Semaphore>,
    sources: Arc<Sources>,
    /// Reserved connections per network (`RESERVE_PER_NETWORK`).
    reserved_by: Arc<Sources>,
    /// Network → when and by which device a certificate last verified
    /// from it.
    known: Mutex<HashMap<IpAddr, Vec<Known>>>,
    refused_network_full: AtomicU64,
    refused_busy: AtomicU64,
    /// Connections a known network got from the reserve.
    reserved: AtomicU64,
    log: RefusalLog,
}

impl Default for Slots {
    fn default() -> Self {
        Slots {
            open: Arc::new(Semaphore::new(MAX_CONNECTIONS - KNOWN_RESERVE)),
            reserve: Arc::new(Semaphore::new(KNOWN_RESERVE)),
            sources: Arc::default(),
            reserved_by: Arc::default(),
            known: Mutex::default(),
            refused_network_full: AtomicU64::new(0),
            refused_busy: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
            log: RefusalLog::default(),
        }
    }
}

impl Slots {
    /// A slot for a connection from `peer`, or why not (counted and
    /// logged here).
    pub fn take(&self, peer: IpAddr, now: Instant) -> Result<Slot, Refused> {
        let taken = self.try_take(peer, now);
        if let Err(refused) = taken {
            let counter = match refused {
                Refused::NetworkFull => &self.refused_network_full,
                Refused::Busy => &self.refused_busy,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            self.log
                .note("issuer", refused.reason(), peer, LOG_EVERY, now, || {
                    tracing::warn!(%peer, reason = refused.reason(),
                        "issuer: connection refused before its handshake ({})",
                        match refused {
                            Refused::NetworkFull => "its network holds all the connections one network may",
                            Refused::Busy => "every connection slot it may take is busy",
                        });
                });
        }
        taken
    }

    fn try_take(&self, peer: IpAddr, now: Instant) -> Result<Slot, Refused> {
        let source = self.sources.take(peer).ok_or(Refused::NetworkFull)?;
        if let Ok(permit) = self.open.clone().try_acquire_owned() {
            return Ok(Slot {
                _permit: permit,
                _source: source,
                _reserved: None,
                reserved: false,
            });
        }
        if !self.is_known(source.1, now) {
            return Err(Refused::Busy);
        }
        let share = self
            .reserved_by
            .take_up_to(peer, RESERVE_PER_NETWORK)
            .ok_or(Refused::Busy)?;
        let permit = self
            .reserve
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refused::Busy)?;
        self.reserved.fetch_add(1, Ordering::Relaxed);
        Ok(Slot {
            _permit: permit,
            _source: source,
            _reserved: Some(share),
            reserved: true,
        })
    }

    fn is_known(&self, network: IpAddr, now: Instant) -> bool {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let Some(claims) = known.get_mut(&network) else {
            return false;
        };
        claims.retain(|k| now.saturating_duration_since(k.at) < KNOWN_FOR);
        if claims.is_empty() {
            known.remove(&network);
            return false;
        }
        true
    }

    /// `device`'s certificate verified from `peer`: its network is known
    /// for `KNOWN_FOR` from now, by that device's claim, one of its last
    /// `KNOWN_PER_DEVICE`. Claims are each device's own: a device giving
    /// up a network (for a newer one) drops its claim only, and a network
    /// others verified from stays known by theirs.
    pub fn device_verified(&self, peer: IpAddr, device: &str, now: Instant) {
        let network = source_key(peer);
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = |k: &Known| now.saturating_duration_since(k.at) < KNOWN_FOR;
        if let Some(claim) = known
            .get_mut(&network)
            .and_then(|c| c.iter_mut().find(|k| k.device == device))
        {
            claim.at = now;
            return;
        }
        // This device's oldest claim makes room for its newest.
        let mine: Vec<(IpAddr, Instant)> = known
            .iter()
            .flat_map(|(n, c)| c.iter().filter(|k| k.device == device).map(|k| (*n, k.at)))
            .collect();
        if mine.len() >= KNOWN_PER_DEVICE
            && let Some((n, _)) = mine.iter().min_by_key(|(_, at)| *at)
        {
            let n = *n;
            if let Some(c) = known.get_mut(&n) {
                c.retain(|k| k.device != device);
                if c.is_empty() {
                    known.remove(&n);
                }
            }
        }
        if !known.contains_key(&network) && known.len() >= KNOWN_NETWORKS {
            known.retain(|_, c| {
                c.retain(fresh);
                !c.is_empty()
            });
            let stalest = known
                .iter()
                .min_by_key(|(_, c)| c.iter().map(|k| k.at).max())
                .map(|(n, _)| *n);
            if known.len() >= KNOWN_NETWORKS
                && let Some(n) = stalest
            {
                known.remove(&n);
            }
        }
        let claims = known.entry(network).or_default();
        if claims.len() >= CLAIMS_PER_NETWORK
            && let Some(i) = claims
                .iter()
                .enumerate()
                .min_by_key(|(_, k)| k.at)
                .map(|(i, _)| i)
        {
            claims.swap_remove(i);
        }
        claims.push(Known {
            at: now,
            device: device.to_owned(),
        });
    }

    /// Writes summaries of refusals that are due.
    pub fn flush_log(&self, now: Instant) {
        self.log.flush(LOG_EVERY, now);
    }

    /// The refusals and the reserve's use, in the exposition format.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "# HELP gateway_issuer_connections_refused_total Connections the issuer closed before their handshake: their network held {PER_SOURCE} (network_full), or every slot they may take was busy (busy)."
        );
        let _ = writeln!(
            out,
            "# TYPE gateway_issuer_connections_refused_total counter"
        );
        for (reason, n) in [
            ("network_full", &self.refused_network_full),
            ("busy", &self.refused_busy),
        ] {
            let _ = writeln!(
                out,
                "gateway_issuer_connections_refused_total{{reason=\"{reason}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP gateway_issuer_connections_reserved_total Connections from a network where a device certificate verified recently, served from the {KNOWN_RESERVE} slots kept for such networks because the others were busy."
        );
        let _ = writeln!(
            out,
            "# TYPE gateway_issuer_connections_reserved_total counter"
        );
        let _ = writeln!(
            out,
            "gateway_issuer_connections_reserved_total {}",
            self.reserved.load(Ordering::Relaxed)
        );
        let known = self.known.lock().map(|k| k.len()).unwrap_or_default();
        let _ = writeln!(
            out,
            "# HELP gateway_issuer_known_networks Source networks (IPv4 /24, IPv6 /64) where a device certificate verified within {} days.",
            KNOWN_FOR.as_secs() / 86400
        );
        let _ = writeln!(out, "# TYPE gateway_issuer_known_networks gauge");
        let _ = writeln!(out, "gateway_issuer_known_networks {known}");
    }
}

/// Connections open per source network.
#[derive(Default)]
struct Sources(Mutex<HashMap<IpAddr, usize>>);

/// One connection's place in `Sources`, given back when dropped.
struct SourceSlot(Arc<Sources>, IpAddr);

/// The network a peer is counted under: its IPv4 /24 or IPv6 /64 (an
/// IPv4-mapped IPv6 address as IPv4). Per exact address, 16 addresses
/// (any host's /64 has 2^64) held every slot.
pub fn source_key(ip: IpAddr) -> IpAddr {
    let v4 = |a: Ipv4Addr| IpAddr::V4(Ipv4Addr::from(a.to_bits() & 0xffff_ff00));
    match ip {
        IpAddr::V4(a) => v4(a),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(m) => v4(m),
            None => IpAddr::V6(Ipv6Addr::from(a.to_bits() & !u128::from(u64::MAX))),
        },
    }
}

impl Sources {
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        self.take_up_to(ip, PER_SOURCE)
    }

    /// A place for `ip`'s network if it holds fewer than `most`.
    fn take_up_to(self: &Arc<Self>, ip: IpAddr, most: usize) -> Option<SourceSlot> {
        let key = source_key(ip);
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key).or_default();
        if *n >= most {
            if *n == 0 {
                map.remove(&key);
            }
            return None;
        }
        *n += 1;
        Some(SourceSlot(self.clone(), key))
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut map = self.0.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.1) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_counted_per_ipv4_24_and_ipv6_64() {
        let key = |s: &str| source_key(s.parse().unwrap()).to_string();
        assert_eq!(key("192.0.2.77"), "192.0.2.0");
        assert_eq!(key("::ffff:192.0.2.77"), "192.0.2.0");
        assert_eq!(key("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::");
        assert_ne!(key("2001:db8:1:3::1"), key("2001:db8:1:2::1"));
    }

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    /// Unknown networks fill every slot but the reserve; a known network
    /// still gets in, up to the reserve; an unknown one does not.
    #[test]
    fn the_reserve_is_for_networks_where_a_device_verified() {
        let slots = Slots::default();
        let now = Instant::now();
        let mut held = Vec::new();
        for i in 0..(MAX_CONNECTIONS - KNOWN_RESERVE) {
            let net = u8::try_from(i / PER_SOURCE).unwrap();
            held.push(slots.take(v4(10, 0, net, 1), now).unwrap());
        }
        let office = v4(192, 0, 2, 7);
        assert_eq!(slots.take(office, now).err(), Some(Refused::Busy));
        slots.device_verified(v4(192, 0, 2, 200), "laptop-1", now);
        let mut reserved = Vec::new();
        for _ in 0..RESERVE_PER_NETWORK {
            let slot = slots.take(office, now).unwrap();
            assert!(slot.reserved);
            reserved.push(slot);
        }
        assert_eq!(
            slots.take(office, now).err(),
            Some(Refused::Busy),
            "the network's part of the reserve"
        );
        assert_eq!(
            slots.take(v4(198, 51, 100, 1), now).err(),
            Some(Refused::Busy),
            "the attacker's next network"
        );
        // A network at its 16 is full, known or not.
        assert_eq!(
            slots.take(v4(10, 0, 0, 1), now).err(),
            Some(Refused::NetworkFull)
        );
        // Known long ago is not known.
        let later = now + KNOWN_FOR;
        drop(reserved);
        assert_eq!(
            slots.take(v4(192, 0, 2, 8), later).err(),
            Some(Refused::Busy)
        );
        let mut metrics = String::new();
        slots.render_metrics(&mut metrics);
        assert!(
            metrics.contains("gateway_issuer_connections_refused_total{reason=\"busy\"} 4\n"),
            "{metrics}"
        );
        assert!(
            metrics
                .contains("gateway_issuer_connections_refused_total{reason=\"network_full\"} 1\n"),
            "{metrics}"
        );
        assert!(metrics.contains("gateway_issuer_connections_reserved_total 4\n"));
        // Given back, the open slots serve anyone again.
        drop(held);
        assert!(!slots.take(v4(198, 51, 100, 1), later).unwrap().reserved);
    }

    /// Known networks are bounded: a device at ever new networks makes
    /// room by the one known longest ago, not by growing the table.
    #[test]
    fn known_networks_are_bounded() {
        let slots = Slots::default();
        let now = Instant::now();
        let first = v4(10, 0, 0, 1);
        slots.device_verified(first, "laptop-0", now);
        for i in 1..=KNOWN_NETWORKS as u32 {
            let net = IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + (i << 8)));
            let at = now + Duration::from_millis(u64::from(i));
            slots.device_verified(net, &format!("laptop-{i}"), at);
        }
        let known = slots.known.lock().unwrap();
        assert_eq!(known.len(), KNOWN_NETWORKS);
        assert!(
            !known.contains_key(&source_key(first)),
            "the oldest made room"
        );
    }

    /// One device keeps its last `KNOWN_PER_DEVICE` networks known: an
    /// enrolled user's handshakes from ever new networks neither spread
    /// over the reserve nor push others' networks out.
    #[test]
    fn one_device_keeps_few_networks_known() {
        let slots = Slots::default();
        let now = Instant::now();
        let office = v4(192, 0, 2, 7);
        slots.device_verified(office, "laptop-1", now);
        for n in 0..40u8 {
            let at = now + Duration::from_millis(u64::from(n) + 1);
            slots.device_verified(v4(172, 16, n, 9), "insider", at);
        }
        let known = slots.known.lock().unwrap();
        assert_eq!(known.len(), 1 + KNOWN_PER_DEVICE);
        assert!(known.contains_key(&source_key(office)), "others' stay");
        assert!(
            known.contains_key(&source_key(v4(172, 16, 39, 9))),
            "its last"
        );
        assert!(!known.contains_key(&source_key(v4(172, 16, 0, 9))));
    }
}

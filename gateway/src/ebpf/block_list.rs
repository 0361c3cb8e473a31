//! The admission block list in the kernel: the `block_list` XDP program on
//! the interfaces the gateway's listeners are reached through, and its maps
//! (blocked prefixes with their expiry, the listeners' addresses, each
//! interface's link header length, drop counters).
//!
//! The gateway owns the list (`admission::block`); this is its early copy,
//! so that a blocked source's new connections die before the kernel builds
//! a socket for them. Everything here fails open: an interface the program
//! cannot attach to is reported to the caller, which logs and counts it and
//! serves on.
//!
//! Pinned (`pin_dir`), the maps survive a restart: the next gateway takes
//! over the list that was there, with each entry's expiry. The attachments
//! are not pinned: the program drops nothing once the gateway is gone, when
//! there is nothing to protect on those ports anyway.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use aya::maps::HashMap as AyaHashMap;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::programs::xdp::XdpLinkId;
use aya::programs::{Xdp, XdpMode};
use gateway_common::{
    BlockEntry, BlockListener, LinkKind, MAX_BLOCK_LISTENERS, MAX_BLOCKED, block_counter,
    block_reason,
};
use ipnet::IpNet;

use super::{
    EbpfError, PinDirLock, loader_with_pins, lock_pin_dir, object, per_cpu_sum, program_mut,
};

const PROGRAM: &str = "block_list";

const MAPS: [&str; 5] = [
    "BLOCK_V4",
    "BLOCK_V6",
    "BLOCK_LISTENERS",
    "BLOCK_LINKS",
    "BLOCK_COUNTERS",
];

/// How the program runs on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// In the driver, before any socket buffer exists.
    Native,
    /// In the stack (generic XDP), for drivers without XDP (and `lo`).
    Generic,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::Generic => "generic",
        }
    }
}

/// Why an entry is on the list, as the kernel counts its drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Put there by the gateway: too many strikes.
    Strikes,
    /// Put there by an operator.
    Manual,
}

impl Reason {
    fn code(self) -> u32 {
        match self {
            Reason::Strikes => block_reason::STRIKES,
            Reason::Manual => block_reason::MANUAL,
        }
    }

    fn from_code(code: u32) -> Reason {
        if code == block_reason::MANUAL {
            Reason::Manual
        } else {
            Reason::Strikes
        }
    }
}

/// The program's counters, summed over the CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// New connections dropped, per reason.
    pub dropped_strikes: u64,
    pub dropped_manual: u64,
    /// New connections to a listener's port that were looked up.
    pub judged: u64,
    /// Of those, from a source whose entry had expired (passed).
    pub expired: u64,
    /// Packets passed unparsed (fail open).
    pub unparsed: u64,
}

/// The loaded program and its maps; detached from every interface when
/// dropped.
pub struct BlockFilter {
    ebpf: aya::Ebpf,
    attached: BTreeMap<String, (u32, Mode, XdpLinkId)>,
    _lock: Option<PinDirLock>,
}

impl BlockFilter {
    /// Loads the program and its maps (taking over pinned ones in
    /// `pin_dir`); attaches nowhere yet.
    pub fn load(pin_dir: Option<&Path>) -> Result<BlockFilter, EbpfError> {
        if object().is_empty() {
            return Err(EbpfError::NotBuilt);
        }
        let mut loader = loader_with_pins(pin_dir, &MAPS)?;
        let lock = pin_dir.map(lock_pin_dir).transpose()?;
        if let Some(dir) = pin_dir {
            // The listeners by port alone, before they were judged by
            // address too: nothing reads it any more.
            let _ = std::fs::remove_file(dir.join("BLOCK_PORTS"));
        }
        let mut ebpf = loader.load(object())?;
        let program: &mut Xdp = program_mut(&mut ebpf, PROGRAM)?;
        program.load().map_err(|source| EbpfError::Program {
            name: PROGRAM,
            source,
        })?;
        let mut filter = BlockFilter {
            ebpf,
            attached: BTreeMap::new(),
            _lock: lock,
        };
        // Interfaces a previous gateway recorded are not ours any more.
        let mut links = filter.links_map()?;
        let stale: Vec<u32> = links.keys().filter_map(Result::ok).collect();
        for index in stale {
            let _ = links.remove(&index);
        }
        Ok(filter)
    }

    /// Attaches to `iface`: natively where the driver can, else generic.
    /// Fails when the interface is unknown, its link header is not one the
    /// program reads, or another XDP program holds it.
    pub fn attach(&mut self, iface: &str) -> Result<Mode, EbpfError> {
        let on_iface = |reason: String| EbpfError::Interface {
            interface: iface.to_owned(),
            reason,
        };
        if let Some((_, mode, _)) = self.attached.get(iface) {
            return Ok(*mode);
        }
        let link = crate::netlink::link(iface)
            .map_err(|e| on_iface(format!("listing interfaces: {e}")))?
            .ok_or_else(|| on_iface("no such interface".into()))?;
        let l2_len = link.link_header_len().ok_or_else(|| {
            on_iface(format!(
                "link type {} is neither Ethernet-like nor without a link header",
                link.kind
            ))
        })?;
        let name = "BLOCK_LINKS";
        self.links_map()?
            .insert(link.index, LinkKind { l2_len }, 0)
            .map_err(|source| EbpfError::MapWrite { name, source })?;
        let program: &mut Xdp = program_mut(&mut self.ebpf, PROGRAM)?;
        let attached = match program.attach_to_if_index(link.index, XdpMode::Driver) {
            Ok(id) => Ok((id, Mode::Native)),
            Err(native) => program
                .attach_to_if_index(link.index, XdpMode::Skb)
                .map(|id| (id, Mode::Generic))
                .map_err(|generic| format!("native: {native}; generic: {generic}")),
        };
        match attached {
            Ok((id, mode)) => {
                self.attached
                    .insert(iface.to_owned(), (link.index, mode, id));
                Ok(mode)
            }
            Err(reason) => {
                let _ = self.links_map()?.remove(&link.index);
                Err(on_iface(reason))
            }
        }
    }

    /// Detaches from `iface` (nothing when not attached).
    pub fn detach(&mut self, iface: &str) {
        let Some((index, _, id)) = self.attached.remove(iface) else {
            return;
        };
        if let Ok(program) = program_mut::<Xdp>(&mut self.ebpf, PROGRAM) {
            let _ = program.detach(id);
        }
        if let Ok(mut links) = self.links_map() {
            let _ = links.remove(&index);
        }
    }

    /// The interfaces attached to, with how.
    pub fn attached(&self) -> Vec<(String, Mode)> {
        self.attached
            .iter()
            .map(|(name, (_, mode, _))| (name.clone(), *mode))
            .collect()
    }

    /// Makes `listening` the listeners (TCP): only new connections to
    /// them are judged, by address and port (an unspecified address: any
    /// local address of its family; `[::]` takes IPv4 too, as a dual-stack
    /// socket does).
    pub fn set_listeners(&mut self, listening: &[SocketAddr]) -> Result<(), EbpfError> {
        let name = "BLOCK_LISTENERS";
        let wanted: BTreeSet<([u8; 16], u16, u8)> =
            listening.iter().flat_map(|a| listener_keys(*a)).collect();
        if wanted.len() > MAX_BLOCK_LISTENERS as usize {
            return Err(EbpfError::TooManyListeners {
                count: wanted.len(),
                max: MAX_BLOCK_LISTENERS,
            });
        }
        let mut map: AyaHashMap<_, BlockListener, u8> =
            AyaHashMap::try_from(self.map_mut(name)?).map_err(|_| EbpfError::MissingMap(name))?;
        // New listeners first, then the ones that are gone.
        for (addr, port, family) in &wanted {
            let key = BlockListener {
                addr: *addr,
                port: *port,
                family: *family,
                _pad: 0,
            };
            map.insert(key, 1, 0)
                .map_err(|source| EbpfError::MapWrite { name, source })?;
        }
        let stale: Vec<BlockListener> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains(&(k.addr, k.port, k.family)))
            .collect();
        for key in stale {
            match map.remove(&key) {
                Err(source) if !absent(&source) => {
                    return Err(EbpfError::MapWrite { name, source });
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Blocks `net` until `expires_ns` (CLOCK_MONOTONIC; `u64::MAX`: no
    /// expiry), replacing any entry for it.
    pub fn insert(&mut self, net: IpNet, reason: Reason, expires_ns: u64) -> Result<(), EbpfError> {
        let entry = BlockEntry {
            expires_ns,
            reason: reason.code(),
            prefix_len: u32::from(net.prefix_len()),
        };
        match net.trunc().addr() {
            IpAddr::V4(a) => self.write::<4>("BLOCK_V4", net, a.octets(), Some(entry)),
            IpAddr::V6(a) => self.write::<16>("BLOCK_V6", net, a.octets(), Some(entry)),
        }
    }

    /// Unblocks `net` (nothing when it is not there).
    pub fn remove(&mut self, net: IpNet) -> Result<(), EbpfError> {
        match net.trunc().addr() {
            IpAddr::V4(a) => self.write::<4>("BLOCK_V4", net, a.octets(), None),
            IpAddr::V6(a) => self.write::<16>("BLOCK_V6", net, a.octets(), None),
        }
    }

    /// Inserts (Some) or removes (None) one prefix of a family's trie.
    fn write<const N: usize>(
        &mut self,
        name: &'static str,
        net: IpNet,
        octets: [u8; N],
        entry: Option<BlockEntry>,
    ) -> Result<(), EbpfError> {
        let mut trie: LpmTrie<_, [u8; N], BlockEntry> =
            LpmTrie::try_from(self.map_mut(name)?).map_err(|_| EbpfError::MissingMap(name))?;
        let key = Key::new(u32::from(net.prefix_len()), octets);
        let written = match entry {
            Some(entry) => trie.insert(&key, entry, 0),
            None => trie.remove(&key),
        };
        match written {
            Err(source) if entry.is_some() || !absent(&source) => {
                Err(EbpfError::MapWrite { name, source })
            }
            _ => Ok(()),
        }
    }

    /// Every entry in the maps (a previous gateway's, when pinned), with
    /// its reason and expiry.
    pub fn entries(&self) -> Result<Vec<(IpNet, Reason, u64)>, EbpfError> {
        let mut out = Vec::new();
        self.entries_of::<4>("BLOCK_V4", &mut out)?;
        self.entries_of::<16>("BLOCK_V6", &mut out)?;
        Ok(out)
    }

    fn entries_of<const N: usize>(
        &self,
        name: &'static str,
        out: &mut Vec<(IpNet, Reason, u64)>,
    ) -> Result<(), EbpfError>
    where
        IpAddr: From<[u8; N]>,
    {
        let trie: LpmTrie<_, [u8; N], BlockEntry> =
            LpmTrie::try_from(self.ebpf.map(name).ok_or(EbpfError::MissingMap(name))?)
                .map_err(|_| EbpfError::MissingMap(name))?;
        for key in trie.keys() {
            let key = key.map_err(|source| EbpfError::Map { name, source })?;
            let Ok(entry) = trie.get(&key, 0) else {
                continue;
            };
            if let Ok(net) = IpNet::new(IpAddr::from(key.data()), key.prefix_len() as u8) {
                out.push((net, Reason::from_code(entry.reason), entry.expires_ns));
            }
        }
        Ok(())
    }

    pub fn counters(&self) -> Result<Counters, EbpfError> {
        let sum = |index| per_cpu_sum(&self.ebpf, "BLOCK_COUNTERS", index);
        Ok(Counters {
            dropped_strikes: sum(block_reason::STRIKES)?,
            dropped_manual: sum(block_reason::MANUAL)?,
            judged: sum(block_counter::JUDGED)?,
            expired: sum(block_counter::EXPIRED)?,
            unparsed: sum(block_counter::UNPARSED)?,
        })
    }

    /// How many entries the kernel maps hold per address family.
    pub fn capacity() -> u32 {
        MAX_BLOCKED
    }

    fn links_map(
        &mut self,
    ) -> Result<AyaHashMap<&mut aya::maps::MapData, u32, LinkKind>, EbpfError> {
        let name = "BLOCK_LINKS";
        AyaHashMap::try_from(self.map_mut(name)?).map_err(|_| EbpfError::MissingMap(name))
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, EbpfError> {
        self.ebpf.map_mut(name).ok_or(EbpfError::MissingMap(name))
    }
}

impl Drop for BlockFilter {
    fn drop(&mut self) {
        let names: Vec<String> = self.attached.keys().cloned().collect();
        for name in names {
            self.detach(&name);
        }
    }
}

/// The program's keys for a listener bound to `addr`: (address, port,
/// family), the address all zero for a wildcard. `[::]` is IPv6's only:
/// a dual-stack socket is listed with `0.0.0.0` too (`app::accepting`),
/// as only the socket knows whether it takes IPv4.
fn listener_keys(addr: SocketAddr) -> Vec<([u8; 16], u16, u8)> {
    let port = addr.port();
    let v4 = |octets: [u8; 4]| {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&octets);
        (a, port, 4)
    };
    match addr.ip().to_canonical() {
        IpAddr::V4(ip) => vec![v4(ip.octets())],
        IpAddr::V6(ip) => vec![(ip.octets(), port, 6)],
    }
}

/// Whether a map error says the key was not there.
fn absent(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock the program's expiry is
/// compared with (bpf_ktime_get_ns).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass; CLOCK_MONOTONIC
    // always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_are_keyed_by_address_a_wildcard_by_zeros() {
        let key = |a: &str| listener_keys(a.parse().unwrap());
        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&[10, 0, 0, 1]);
        assert_eq!(key("10.0.0.1:443"), vec![(v4, 443, 4)]);
        // A mapped address is the IPv4 one the packets carry.
        assert_eq!(key("[::ffff:10.0.0.1]:443"), vec![(v4, 443, 4)]);
        assert_eq!(key("0.0.0.0:443"), vec![([0; 16], 443, 4)]);
        // IPv6's wildcard only: whether it takes IPv4 too is the
        // socket's to say (`app::accepting` lists 0.0.0.0 then).
        assert_eq!(key("[::]:443"), vec![([0; 16], 443, 6)]);
        let v6: std::net::Ipv6Addr = "fd00::1".parse().unwrap();
        assert_eq!(key("[fd00::1]:443"), vec![(v6.octets(), 443, 6)]);
        // The map's key has no implicit padding: what userspace writes is
        // what the program hashes.
        assert_eq!(std::mem::size_of::<BlockListener>(), 20);
        assert_eq!(std::mem::size_of::<BlockEntry>(), 16);
    }
}

//! `block_list`: the gateway's admission block list, an XDP program on the
//! interfaces its listeners are reached through (native where the driver
//! has XDP, generic elsewhere). A new connection (a TCP SYN without ACK) to
//! a listener (its address and port; a wildcard listener's port on any
//! local address) from a blocked source is dropped before the kernel
//! builds a request socket for it; every other packet passes, so
//! connections a blocked source already holds, and the host's other
//! services on the same port of another address, are left alone.
//!
//! Fail open: this is the early copy of a list the gateway also checks at
//! accept, so a packet the program cannot parse (an unknown interface,
//! VLAN tags or IPv6 extension headers deeper than it walks, a fragment)
//! passes, counted. An entry past its expiry blocks nothing: a list nobody
//! tends any more cannot block anyone for longer than it was told. Past an
//! expired entry the program looks for a wider one still in force (as the
//! gateway does), up to `BLOCK_LEVELS` entries deep.

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, xdp_action},
    macros::{map, xdp},
    maps::{HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use gateway_common::{
    BLOCK_LEVELS, BlockEntry, BlockListener, LinkKind, MAX_BLOCK_LISTENERS, MAX_BLOCKED,
    MAX_INTERFACES, block_counter, block_reason,
};

use crate::budget::{bump, now_ns};

/// Blocked sources, as prefixes (a single address is a /32 or /128).
#[map]
static BLOCK_V4: LpmTrie<[u8; 4], BlockEntry> =
    LpmTrie::with_max_entries(MAX_BLOCKED, BPF_F_NO_PREALLOC);

#[map]
static BLOCK_V6: LpmTrie<[u8; 16], BlockEntry> =
    LpmTrie::with_max_entries(MAX_BLOCKED, BPF_F_NO_PREALLOC);

/// The gateway's listeners (address and port; an all-zero address for a
/// wildcard listener): only new connections to them are judged.
#[map]
static BLOCK_LISTENERS: HashMap<BlockListener, u8> =
    HashMap::with_max_entries(MAX_BLOCK_LISTENERS, BPF_F_NO_PREALLOC);

/// The interfaces the program is attached to (by ifindex) and where their
/// network header starts.
#[map]
static BLOCK_LINKS: HashMap<u32, LinkKind> =
    HashMap::with_max_entries(MAX_INTERFACES, BPF_F_NO_PREALLOC);

/// Drops per [`block_reason`], then the [`block_counter`]s.
#[map]
static BLOCK_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(block_counter::COUNT, 0);

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const IPPROTO_TCP: u8 = 6;
const MAX_VLAN_TAGS: usize = 2;

#[xdp]
pub fn block_list(ctx: XdpContext) -> u32 {
    if dropped(&ctx) {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

/// A pointer to a `T` at `offset` into the packet, if the packet holds one.
#[inline(always)]
fn at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    // SAFETY: `at` checked that the packet holds a T there; the read is
    // unaligned because headers are not aligned in the frame.
    at::<T>(ctx, offset).map(|p| unsafe { core::ptr::read_unaligned(p) })
}

/// What the parser found: a new connection to judge, or not.
enum Parsed {
    /// A TCP SYN from `source` to `dest`:`port` (IPv4 in the first 4
    /// bytes, the rest zero).
    Syn {
        v6: bool,
        source: [u8; 16],
        dest: [u8; 16],
        port: u16,
    },
    /// Not a new TCP connection: passes unjudged.
    Other,
    /// Could not be read far enough: passes, counted.
    Unparsed,
}

fn dropped(ctx: &XdpContext) -> bool {
    let (v6, source, dest, port) = match parse(ctx) {
        Parsed::Syn {
            v6,
            source,
            dest,
            port,
        } => (v6, source, dest, port),
        Parsed::Other => return false,
        Parsed::Unparsed => {
            bump(&BLOCK_COUNTERS, block_counter::UNPARSED);
            return false;
        }
    };
    if !to_listener(v6, dest, port) {
        return false;
    }
    bump(&BLOCK_COUNTERS, block_counter::JUDGED);
    match blocking(v6, source) {
        Found::Blocked(reason) => {
            bump(&BLOCK_COUNTERS, reason);
            true
        }
        Found::Expired => {
            bump(&BLOCK_COUNTERS, block_counter::EXPIRED);
            false
        }
        Found::Nothing => false,
    }
}

/// Whether one of the gateway's listeners is on `dest`:`port`: bound to
/// that address, or to the family's wildcard.
#[inline(always)]
fn to_listener(v6: bool, dest: [u8; 16], port: u16) -> bool {
    let mut key = BlockListener {
        addr: dest,
        port,
        family: if v6 { 6 } else { 4 },
        _pad: 0,
    };
    // SAFETY: the value is only tested for presence.
    if unsafe { BLOCK_LISTENERS.get(&key) }.is_some() {
        return true;
    }
    key.addr = [0; 16];
    // SAFETY: as above.
    unsafe { BLOCK_LISTENERS.get(&key) }.is_some()
}

/// What the block list holds for a source.
enum Found {
    /// An entry in force, with its reason's counter.
    Blocked(u32),
    /// Only entries past their expiry (passes).
    Expired,
    Nothing,
}

/// The entry in force for `source`: the longest matching prefix, and when
/// that one has expired the longest one shorter than it, and so on, up to
/// `BLOCK_LEVELS` entries (the gateway's own check looks at every level).
#[inline(always)]
fn blocking(v6: bool, source: [u8; 16]) -> Found {
    let now = now_ns();
    let mut len: u32 = if v6 { 128 } else { 32 };
    let mut found = Found::Nothing;
    let mut level = 0;
    while level < BLOCK_LEVELS {
        let entry = if v6 {
            BLOCK_V6.get(&Key::new(len, source)).copied()
        } else {
            BLOCK_V4
                .get(&Key::new(len, [source[0], source[1], source[2], source[3]]))
                .copied()
        };
        let Some(entry) = entry else {
            return found;
        };
        if now <= entry.expires_ns {
            let reason = if entry.reason < block_reason::COUNT {
                entry.reason
            } else {
                block_reason::STRIKES
            };
            return Found::Blocked(reason);
        }
        found = Found::Expired;
        // Wider than this one, or nothing left to look for (a /0, an
        // entry without its length, or one the trie could not have
        // matched at `len`).
        if entry.prefix_len == 0 || entry.prefix_len > len {
            return found;
        }
        len = entry.prefix_len - 1;
        level += 1;
    }
    found
}

fn parse(ctx: &XdpContext) -> Parsed {
    let ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: the value is copied out at once; entries are not preallocated.
    let Some(link) = (unsafe { BLOCK_LINKS.get(&ifindex) }).copied() else {
        return Parsed::Unparsed;
    };
    let mut at = link.l2_len as usize;
    let mut ethertype = if at == 0 {
        // No link header (tun, WireGuard): the IP version says which.
        // (Read as the 20 bytes every IP header has: a one-byte read at
        // offset 0 compiles to a bounds check the verifier cannot use.)
        match read::<[u8; 20]>(ctx, 0) {
            Some(h) if h[0] >> 4 == 4 => ETH_P_IP,
            Some(h) if h[0] >> 4 == 6 => ETH_P_IPV6,
            Some(_) => return Parsed::Other,
            None => return Parsed::Unparsed,
        }
    } else if at == 14 {
        match read::<[u8; 2]>(ctx, 12) {
            Some(t) => u16::from_be_bytes(t),
            None => return Parsed::Unparsed,
        }
    } else {
        return Parsed::Unparsed;
    };
    let mut tags = 0;
    while tags < MAX_VLAN_TAGS && matches!(ethertype, ETH_P_8021Q | ETH_P_8021AD) {
        match read::<[u8; 2]>(ctx, at + 2) {
            Some(t) => ethertype = u16::from_be_bytes(t),
            None => return Parsed::Unparsed,
        }
        at += 4;
        tags += 1;
    }
    match ethertype {
        ETH_P_IP => parse_v4(ctx, at),
        ETH_P_IPV6 => parse_v6(ctx, at),
        ETH_P_8021Q | ETH_P_8021AD => Parsed::Unparsed,
        _ => Parsed::Other,
    }
}

fn parse_v4(ctx: &XdpContext, ip: usize) -> Parsed {
    let Some(head) = read::<[u8; 20]>(ctx, ip) else {
        return Parsed::Unparsed;
    };
    if head[0] >> 4 != 4 || head[9] != IPPROTO_TCP {
        return Parsed::Other;
    }
    let ihl = usize::from(head[0] & 0x0f) * 4;
    if ihl < 20 {
        return Parsed::Unparsed;
    }
    // A fragment past the first has no TCP header; a SYN is never one.
    if u16::from_be_bytes([head[6], head[7]]) & 0x1fff != 0 {
        return Parsed::Other;
    }
    let mut source = [0u8; 16];
    source[0] = head[12];
    source[1] = head[13];
    source[2] = head[14];
    source[3] = head[15];
    let mut dest = [0u8; 16];
    dest[0] = head[16];
    dest[1] = head[17];
    dest[2] = head[18];
    dest[3] = head[19];
    tcp_syn(ctx, ip + ihl, false, source, dest)
}

const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const DEST_OPTS: u8 = 60;
const MAX_EXTENSION_HEADERS: usize = 4;

fn parse_v6(ctx: &XdpContext, ip: usize) -> Parsed {
    let Some(head) = read::<[u8; 40]>(ctx, ip) else {
        return Parsed::Unparsed;
    };
    if head[0] >> 4 != 6 {
        return Parsed::Other;
    }
    let mut source = [0u8; 16];
    let mut dest = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        source[i] = head[8 + i];
        dest[i] = head[24 + i];
        i += 1;
    }
    let mut next = head[6];
    let mut at = ip + 40;
    let mut walked = 0;
    while walked < MAX_EXTENSION_HEADERS
        && matches!(next, HOP_BY_HOP | ROUTING | FRAGMENT | DEST_OPTS)
    {
        let Some(ext) = read::<[u8; 4]>(ctx, at) else {
            return Parsed::Unparsed;
        };
        if next == FRAGMENT {
            if u16::from_be_bytes([ext[2], ext[3]]) >> 3 != 0 {
                return Parsed::Other;
            }
            at += 8;
        } else {
            at += (usize::from(ext[1]) + 1) * 8;
        }
        next = ext[0];
        walked += 1;
    }
    match next {
        IPPROTO_TCP => tcp_syn(ctx, at, true, source, dest),
        HOP_BY_HOP | ROUTING | FRAGMENT | DEST_OPTS => Parsed::Unparsed,
        _ => Parsed::Other,
    }
}

/// The TCP header at `l4`: a SYN without ACK is a new connection.
fn tcp_syn(ctx: &XdpContext, l4: usize, v6: bool, source: [u8; 16], dest: [u8; 16]) -> Parsed {
    let Some(head) = read::<[u8; 14]>(ctx, l4) else {
        return Parsed::Unparsed;
    };
    let flags = head[13];
    if flags & 0x02 == 0 || flags & 0x10 != 0 {
        return Parsed::Other;
    }
    Parsed::Syn {
        v6,
        source,
        dest,
        port: u16::from_be_bytes([head[2], head[3]]),
    }
}

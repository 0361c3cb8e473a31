//! `block_list`: the gateway's admission block list, an XDP program on the
//! interfaces its listeners are reached through (native where the driver
//! has XDP, generic elsewhere). A new connection (a TCP SYN without ACK) to
//! a listener's port from a blocked source is dropped before the kernel
//! builds a request socket for it; every other packet passes, so
//! connections a blocked source already holds are left to the gateway.
//!
//! Fail open: this is the early copy of a list the gateway also checks at
//! accept, so a packet the program cannot parse (an unknown interface,
//! VLAN tags or IPv6 extension headers deeper than it walks, a fragment)
//! passes, counted. An entry past its expiry passes too: a list nobody
//! tends any more cannot block anyone for longer than it was told.

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, xdp_action},
    macros::{map, xdp},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use gateway_common::{
    BlockEntry, LinkKind, MAX_BLOCKED, MAX_INTERFACES, block_counter, block_reason,
};

use crate::budget::{bump, now_ns};

/// Blocked sources, as prefixes (a single address is a /32 or /128).
#[map]
static BLOCK_V4: LpmTrie<[u8; 4], BlockEntry> =
    LpmTrie::with_max_entries(MAX_BLOCKED, BPF_F_NO_PREALLOC);

#[map]
static BLOCK_V6: LpmTrie<[u8; 16], BlockEntry> =
    LpmTrie::with_max_entries(MAX_BLOCKED, BPF_F_NO_PREALLOC);

/// Per TCP port: nonzero when one of the gateway's listeners is bound to it.
#[map]
static BLOCK_PORTS: Array<u8> = Array::with_max_entries(65536, 0);

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
    /// A TCP SYN to `port` from `source` (IPv4 in the first 4 bytes).
    Syn {
        v6: bool,
        source: [u8; 16],
        port: u16,
    },
    /// Not a new TCP connection: passes unjudged.
    Other,
    /// Could not be read far enough: passes, counted.
    Unparsed,
}

fn dropped(ctx: &XdpContext) -> bool {
    let (v6, source, port) = match parse(ctx) {
        Parsed::Syn { v6, source, port } => (v6, source, port),
        Parsed::Other => return false,
        Parsed::Unparsed => {
            bump(&BLOCK_COUNTERS, block_counter::UNPARSED);
            return false;
        }
    };
    if !BLOCK_PORTS.get(u32::from(port)).is_some_and(|p| *p != 0) {
        return false;
    }
    bump(&BLOCK_COUNTERS, block_counter::JUDGED);
    let entry = if v6 {
        BLOCK_V6.get(&Key::new(128, source)).copied()
    } else {
        BLOCK_V4
            .get(&Key::new(32, [source[0], source[1], source[2], source[3]]))
            .copied()
    };
    let Some(entry) = entry else {
        return false;
    };
    if now_ns() > entry.expires_ns {
        bump(&BLOCK_COUNTERS, block_counter::EXPIRED);
        return false;
    }
    let reason = if entry.reason < block_reason::COUNT {
        entry.reason
    } else {
        block_reason::STRIKES
    };
    bump(&BLOCK_COUNTERS, reason);
    true
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
    tcp_syn(ctx, ip + ihl, false, source)
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
    let mut i = 0;
    while i < 16 {
        source[i] = head[8 + i];
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
        IPPROTO_TCP => tcp_syn(ctx, at, true, source),
        HOP_BY_HOP | ROUTING | FRAGMENT | DEST_OPTS => Parsed::Unparsed,
        _ => Parsed::Other,
    }
}

/// The TCP header at `l4`: a SYN without ACK is a new connection.
fn tcp_syn(ctx: &XdpContext, l4: usize, v6: bool, source: [u8; 16]) -> Parsed {
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
        port: u16::from_be_bytes([head[2], head[3]]),
    }
}

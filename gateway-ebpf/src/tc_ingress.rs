//! `ingress`: the remote guard's early layer, a TC classifier on each
//! protected interface (clsact or TCX, attached first). It judges packets
//! before the stack spends anything on them; what it cannot see (reassembled
//! fragments, `lo`, bridges and veths it is not on, ports rewritten by NAT)
//! the socket layer judges.
//!
//! Fail closed: a packet that claims to be IP and whose ports cannot be read
//! (a first fragment too short for its transport header, VLAN tags or IPv6
//! extension headers deeper than the guard walks, a truncated header, an
//! interface whose link header the guard does not know) is judged as if it
//! went to a protected port. Passing returns TCX_NEXT (TC_ACT_UNSPEC for a
//! netlink filter), so programs after the guard still run.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, tcx_action_base::TCX_NEXT},
    macros::classifier,
    programs::TcContext,
};
use gateway_common::{MAX_VLAN_TAGS, layer};

use crate::remote::{
    Flow, INGRESS_LINKS, IPPROTO_TCP, IPPROTO_UDP, NO_RULE, Verdict, judge, port_rule,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

#[classifier]
pub fn ingress(ctx: TcContext) -> i32 {
    match try_ingress(&ctx) {
        Verdict::Pass => TCX_NEXT,
        Verdict::Drop => TC_ACT_SHOT as i32,
    }
}

fn try_ingress(ctx: &TcContext) -> Verdict {
    // SAFETY: the kernel passes a valid __sk_buff for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let mut flow = Flow::new(layer::TC, ifindex);
    if !parse(ctx, &mut flow) {
        return Verdict::Pass;
    }
    let rule = if flow.unparsable {
        NO_RULE
    } else {
        match port_rule(flow.protocol, flow.dst_port) {
            Some(rule) => rule,
            None => return Verdict::Pass,
        }
    };
    judge(&flow, rule)
}

/// Fills `flow` from the packet. False: not a TCP or UDP packet the stack
/// will deliver by its ports (not IP, another protocol, a later fragment,
/// which reassembles only with a first one judged here). True: judge it;
/// `flow.unparsable` stays set unless the ports were read.
fn parse(ctx: &TcContext, flow: &mut Flow) -> bool {
    // The protocol the stack dispatches on: after the kernel took the outer
    // VLAN tag out of the frame, it names the next one.
    // SAFETY: as in try_ingress.
    let mut ethertype = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
    if !matches!(
        ethertype,
        ETH_P_IP | ETH_P_IPV6 | ETH_P_8021Q | ETH_P_8021AD
    ) {
        return false;
    }
    // L3 devices (tun, WireGuard, ipip, GRE) have no link header: the
    // network header is where the packet starts. An interface the guard
    // did not record is judged, not guessed.
    // SAFETY: the value is copied out at once; entries are not preallocated.
    let Some(link) = (unsafe { INGRESS_LINKS.get(flow.ifindex) }).copied() else {
        return true;
    };
    let mut at = link.l2_len as usize;
    // Tags left in the frame: the kernel strips a priority tag (VLAN 0)
    // after TC and delivers what is inside, so they are walked here.
    let mut tags = 0;
    while tags < MAX_VLAN_TAGS && matches!(ethertype, ETH_P_8021Q | ETH_P_8021AD) {
        match ctx.load::<u16>(at + 2) {
            Ok(next) => ethertype = u16::from_be(next),
            Err(_) => return true,
        }
        at += 4;
        tags += 1;
    }
    match ethertype {
        ETH_P_IP => parse_v4(ctx, at, flow),
        ETH_P_IPV6 => parse_v6(ctx, at, flow),
        // More tags than walked: judged, not guessed.
        ETH_P_8021Q | ETH_P_8021AD => true,
        _ => false,
    }
}

fn parse_v4(ctx: &TcContext, ip: usize, flow: &mut Flow) -> bool {
    flow.family = 4;
    let Ok(head) = ctx.load::<[u8; 20]>(ip) else {
        return true;
    };
    flow.src[0] = u32::from_ne_bytes([head[12], head[13], head[14], head[15]]);
    flow.dst[0] = u32::from_ne_bytes([head[16], head[17], head[18], head[19]]);
    flow.protocol = head[9];
    let ihl = usize::from(head[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([head[2], head[3]]));
    if head[0] >> 4 != 4 || ihl < 20 || total < ihl {
        return true;
    }
    if flow.protocol != IPPROTO_TCP && flow.protocol != IPPROTO_UDP {
        return false;
    }
    // A later fragment has no ports; it reassembles only with a first one,
    // which is judged here (and the whole datagram again at the socket).
    let fragment = u16::from_be_bytes([head[6], head[7]]) & 0x1fff;
    if fragment != 0 {
        return false;
    }
    transport(ctx, ip + ihl, total - ihl, flow);
    true
}

/// IPv6 extension headers walked to find the transport header.
const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const DEST_OPTS: u8 = 60;
const MAX_EXTENSION_HEADERS: usize = 4;

fn parse_v6(ctx: &TcContext, ip: usize, flow: &mut Flow) -> bool {
    flow.family = 6;
    let Ok(head) = ctx.load::<[u8; 40]>(ip) else {
        return true;
    };
    let word = |i: usize| u32::from_ne_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    flow.src = [word(8), word(12), word(16), word(20)];
    flow.dst = [word(24), word(28), word(32), word(36)];
    if head[0] >> 4 != 6 {
        return true;
    }
    // 0 is a jumbogram's: its length is in a hop-by-hop option, not checked.
    let payload = usize::from(u16::from_be_bytes([head[4], head[5]]));
    let mut next = head[6];
    let mut at = ip + 40;
    let mut walked = 0;
    while walked < MAX_EXTENSION_HEADERS
        && matches!(next, HOP_BY_HOP | ROUTING | FRAGMENT | DEST_OPTS)
    {
        let Ok(ext) = ctx.load::<[u8; 4]>(at) else {
            flow.protocol = next;
            return true;
        };
        if next == FRAGMENT {
            if u16::from_be_bytes([ext[2], ext[3]]) >> 3 != 0 {
                return false;
            }
            at += 8;
        } else {
            at += (usize::from(ext[1]) + 1) * 8;
        }
        next = ext[0];
        walked += 1;
    }
    flow.protocol = next;
    if matches!(next, HOP_BY_HOP | ROUTING | FRAGMENT | DEST_OPTS) {
        // Its ports are hidden too deep to judge.
        return true;
    }
    if next != IPPROTO_TCP && next != IPPROTO_UDP {
        return false;
    }
    let headers = at - ip - 40;
    let remaining = if payload == 0 {
        usize::MAX
    } else if payload < headers {
        return true;
    } else {
        payload - headers
    };
    transport(ctx, at, remaining, flow);
    true
}

/// Reads the ports (and TCP flags) at `l4`, where `len` bytes of transport
/// header and payload are left in this packet (or first fragment). Fewer
/// than a whole header leaves the flow unparsable: RFC 1858's tiny
/// fragment, which no legitimate sender produces.
fn transport(ctx: &TcContext, l4: usize, len: usize, flow: &mut Flow) {
    let header = if flow.protocol == IPPROTO_TCP { 20 } else { 8 };
    if len < header {
        return;
    }
    let Ok(ports) = ctx.load::<[u8; 4]>(l4) else {
        return;
    };
    let opens = if flow.protocol == IPPROTO_TCP {
        match ctx.load::<u8>(l4 + 13) {
            // A SYN, not a SYN-ACK.
            Ok(flags) => flags & 0x02 != 0 && flags & 0x10 == 0,
            Err(_) => return,
        }
    } else {
        true
    };
    flow.src_port = u16::from_be_bytes([ports[0], ports[1]]);
    flow.dst_port = u16::from_be_bytes([ports[2], ports[3]]);
    flow.unparsable = false;
    flow.opens = opens;
}

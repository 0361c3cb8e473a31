//! `cgroup_skb/egress`: the local guard on the way out, by the packet's
//! final headers. The connect() and sendmsg() hooks judge the address a
//! process names; netfilter's NAT (Docker's published ports, kube-proxy,
//! any `dnat` in the output chain) rewrites it afterwards, and raw sockets
//! (CAP_NET_RAW) build their headers themselves. So here, after routing and
//! NAT, a TCP SYN, a UDP datagram or a raw socket's TCP or UDP packet to a
//! protected destination from outside the gateway's cgroup is dropped,
//! whatever kind of socket sent it (an SCTP socket sends UDP when it
//! tunnels over UDP; the connect hooks never judge SCTP) (UDP
//! and raw senders get EPERM; a TCP connect times out, since TCP retries a
//! SYN the stack failed to send). A packet routed to this host (it leaves
//! through `lo`) is judged by port whatever its address, so an address the
//! maps do not know yet is no way in.
//!
//! A TCP reset without payload, unfragmented, from a raw socket made for
//! TCP passes: the kernel sends its own resets from such a socket in the
//! root cgroup, and a reset opens and delivers nothing. A fragmented one
//! is judged: its first fragment can be a bare header and the payload
//! follow in fragments this program does not read.
//!
//! Established TCP packets are not read: they belong to connections whose
//! SYN was judged (or that are older than the guard, which the gateway
//! looks for). Packet sockets (AF_PACKET) skip the IP layer and this hook
//! too; the README says so.

use aya_ebpf::{
    bindings::{BPF_TCP_SYN_SENT, bpf_hdr_start_off::BPF_HDR_START_NET, bpf_sock},
    helpers::generated::{
        bpf_get_socket_cookie, bpf_get_socket_uid, bpf_sk_fullsock, bpf_skb_cgroup_id,
        bpf_skb_load_bytes_relative,
    },
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use gateway_common::{local_layer, protocol};

use crate::local::{ALLOW, Dest, REFUSE, Source, Who, judge, rule_for};

/// The comm a packet's events carry: it leaves where no task can be
/// asked; the socket's owner is what the cgroup and uid name.
const RAW_SOCKET: [u8; 16] = *b"(raw socket)\0\0\0\0";
const PACKET: [u8; 16] = *b"(packet)\0\0\0\0\0\0\0\0";

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const SOCK_RAW: u32 = 3;
const TCP_RST: u8 = 0x04;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
/// Every network namespace's `lo`.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// The packet's full socket, if it has one (request and time-wait
/// sockets are not).
pub fn full_socket(ctx: &SkBuffContext) -> Option<*mut bpf_sock> {
    // SAFETY: the kernel passes a valid __sk_buff; sk is checked for null.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: sk is a non-null socket pointer from the context.
    let full: *mut bpf_sock = unsafe { bpf_sk_fullsock(sk) };
    (!full.is_null()).then_some(full)
}

#[cgroup_skb(egress)]
pub fn local_egress(ctx: SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    let Some(full) = full_socket(&ctx) else {
        return ALLOW;
    };
    // SAFETY: a full socket from the helper, valid for the program's run.
    let (kind, proto, state) = unsafe { ((*full).type_, (*full).protocol, (*full).state) };
    // What is judged: every TCP or UDP packet of a raw socket; a TCP
    // socket's SYN (its state says so: its other packets are not read);
    // every datagram of a UDP socket. A socket of any other kind (SCTP over
    // UDP, whose UDP port any user sets, or whatever a kernel adds) is
    // judged by its packet's header: UDP datagrams, and TCP SYNs without
    // ACK, which open connections.
    let (layer, only_syn) = match kind {
        SOCK_RAW => (local_layer::RAW, false),
        SOCK_STREAM if proto == u32::from(protocol::TCP) => {
            if state != BPF_TCP_SYN_SENT {
                return ALLOW;
            }
            (local_layer::EGRESS, false)
        }
        SOCK_DGRAM if proto == u32::from(protocol::UDP) => (local_layer::EGRESS, false),
        _ => (local_layer::EGRESS, true),
    };
    // SAFETY: as above.
    let (ethertype, ifindex) = unsafe { (u16::from_be((*skb).protocol as u16), (*skb).ifindex) };
    let on_loopback = ifindex == LOOPBACK_IFINDEX;
    // A packet whose headers cannot be read is refused: it could be
    // anything, and the kernel builds none such for TCP or UDP sockets.
    let dest = match ethertype {
        ETH_P_IP => destination_v4(&ctx),
        ETH_P_IPV6 => destination_v6(&ctx),
        _ => return ALLOW,
    };
    let (dest, l4, whole) = match dest {
        Ok(Some(found)) => found,
        Ok(None) => return ALLOW,
        Err(()) => return REFUSE,
    };
    if dest.protocol == protocol::TCP && (only_syn || layer == local_layer::RAW) {
        let Ok([offset, flags]) = load::<2>(&ctx, l4 + 12) else {
            return REFUSE;
        };
        if only_syn && flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
            return ALLOW;
        }
        // SAFETY: as above; the packet's length from its network header.
        let len = unsafe { (*skb).len } as usize;
        let header_end = l4 + usize::from(offset >> 4) * 4;
        if layer == local_layer::RAW
            && proto == u32::from(protocol::TCP)
            && whole
            && flags & (TCP_RST | TCP_SYN) == TCP_RST
            && header_end == len
        {
            // A reset that carries nothing: the kernel answers a segment
            // for a connection it does not know from its own per-CPU raw
            // TCP socket, which lives in the root cgroup (attach_to = "").
            // It opens nothing and delivers nothing. The kernel never
            // fragments its resets; a fragment's length says nothing of
            // the payload in the fragments after it, which are not read.
            return ALLOW;
        }
    }
    match rule_for(&dest, on_loopback) {
        Some(rule) => judge(rule, &dest, &owner(&ctx, layer), layer, Source::NONE),
        None => ALLOW,
    }
}

/// The socket's owner: its cgroup and uid (the socket's, not the running
/// task's, which 6.1 does not let cgroup_skb programs ask for), and its
/// cookie.
fn owner(ctx: &SkBuffContext, layer: u8) -> Who {
    // SAFETY: the helpers take the program's own __sk_buff.
    let (cgroup, uid, cookie) = unsafe {
        (
            bpf_skb_cgroup_id(ctx.skb.skb),
            bpf_get_socket_uid(ctx.skb.skb),
            bpf_get_socket_cookie(ctx.skb.skb.cast()),
        )
    };
    Who {
        cgroup,
        uid,
        pid: 0,
        comm: if layer == local_layer::RAW {
            RAW_SOCKET
        } else {
            PACKET
        },
        cookie,
    }
}

/// Reads `N` bytes at `offset` from the network header.
pub fn load<const N: usize>(ctx: &SkBuffContext, offset: usize) -> Result<[u8; N], ()> {
    // Not zeroed first: that would be a call to memset, which 6.1's
    // verifier refuses to pass a stack pointer to as a global function.
    let mut out = core::mem::MaybeUninit::<[u8; N]>::uninit();
    // SAFETY: out is a buffer of N bytes; the helper checks bounds and
    // fills all of them on success.
    let rc = unsafe {
        bpf_skb_load_bytes_relative(
            ctx.skb.skb as *const _,
            offset as u32,
            out.as_mut_ptr().cast(),
            N as u32,
            BPF_HDR_START_NET,
        )
    };
    if rc != 0 {
        return Err(());
    }
    // SAFETY: filled by the helper when it returns 0.
    Ok(unsafe { out.assume_init() })
}

/// Where an IPv4 TCP or UDP packet goes, where its TCP or UDP header
/// starts, and whether it is whole (no fragment); None for other protocols
/// and later fragments (which carry no ports; the first one was judged).
fn destination_v4(ctx: &SkBuffContext) -> Result<Option<(Dest, usize, bool)>, ()> {
    let head = load::<20>(ctx, 0)?;
    let proto = head[9];
    if proto != protocol::TCP && proto != protocol::UDP {
        return Ok(None);
    }
    let ihl = usize::from(head[0] & 0x0f) * 4;
    let fragment = u16::from_be_bytes([head[6], head[7]]);
    if fragment & 0x1fff != 0 {
        return Ok(None);
    }
    // More fragments follow.
    let whole = fragment & 0x2000 == 0;
    if ihl < 20 {
        return Err(());
    }
    let ports = load::<4>(ctx, ihl)?;
    let dest = Dest {
        family: 4,
        addr: [
            u32::from_ne_bytes([head[16], head[17], head[18], head[19]]),
            0,
            0,
            0,
        ],
        port: u16::from_ne_bytes([ports[2], ports[3]]),
        protocol: proto,
    };
    Ok(Some((dest, ihl, whole)))
}

/// As [`destination_v4`] for IPv6, through up to 4 extension headers (a
/// packet hiding its ports deeper is refused).
fn destination_v6(ctx: &SkBuffContext) -> Result<Option<(Dest, usize, bool)>, ()> {
    let head = load::<40>(ctx, 0)?;
    let mut next = head[6];
    let mut at = 40;
    let mut walked = 0;
    let mut whole = true;
    while walked < 4 && matches!(next, 0 | 43 | 44 | 60) {
        let ext = load::<4>(ctx, at)?;
        if next == 44 {
            if u16::from_be_bytes([ext[2], ext[3]]) >> 3 != 0 {
                return Ok(None);
            }
            // A first fragment (or an atomic one, RFC 6946): not whole
            // either way, nothing the kernel sends as a reset.
            whole = false;
            at += 8;
        } else {
            at += (usize::from(ext[1]) + 1) * 8;
        }
        next = ext[0];
        walked += 1;
    }
    if matches!(next, 0 | 43 | 44 | 60) {
        return Err(());
    }
    if next != protocol::TCP && next != protocol::UDP {
        return Ok(None);
    }
    let ports = load::<4>(ctx, at)?;
    let word = |i: usize| u32::from_ne_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    let dest = Dest {
        family: 6,
        addr: [word(24), word(28), word(32), word(36)],
        port: u16::from_ne_bytes([ports[2], ports[3]]),
        protocol: next,
    };
    Ok(Some((dest, at, whole)))
}

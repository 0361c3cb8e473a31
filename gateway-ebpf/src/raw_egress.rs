//! `cgroup_skb/egress`: packets raw sockets (CAP_NET_RAW) built themselves
//! never pass connect() or sendmsg() hooks, so the local guard judges their
//! IP and transport headers on the way out: a TCP or UDP packet to a
//! protected destination from outside the gateway's cgroup is dropped (the
//! sender gets EPERM). Packet sockets (AF_PACKET) skip the IP layer and this
//! hook too; the README says so.

use aya_ebpf::{
    bindings::{bpf_hdr_start_off::BPF_HDR_START_NET, bpf_sock},
    helpers::generated::{
        bpf_get_socket_uid, bpf_sk_fullsock, bpf_skb_cgroup_id, bpf_skb_load_bytes_relative,
    },
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use gateway_common::protocol;

use crate::local::{ALLOW, Dest, REFUSE, Who, verdict};

/// The comm a raw socket's events carry: the packet leaves where no task
/// can be asked, and the socket's owner is what the cgroup and uid name.
const RAW_SOCKET: [u8; 16] = *b"(raw socket)\0\0\0\0";

const SOCK_RAW: u32 = 3;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

#[cgroup_skb(egress)]
pub fn raw_egress(ctx: SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: the kernel passes a valid __sk_buff; sk is checked for null.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return ALLOW;
    }
    // SAFETY: sk is a non-null socket pointer from the context.
    let full: *mut bpf_sock = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return ALLOW;
    }
    // SAFETY: a full socket from the helper, valid for the program's run.
    if unsafe { (*full).type_ } != SOCK_RAW {
        return ALLOW;
    }
    // SAFETY: as above.
    let ethertype = u16::from_be(unsafe { (*skb).protocol } as u16);
    // A raw packet whose headers cannot be read is refused: it could be
    // anything, and the gateway never sends one.
    let outcome = match ethertype {
        ETH_P_IP => judge_v4(&ctx),
        ETH_P_IPV6 => judge_v6(&ctx),
        _ => Some(ALLOW),
    };
    outcome.unwrap_or(REFUSE)
}

/// The raw socket's owner: its cgroup and uid (the socket's, not the
/// running task's, which 6.1 does not let cgroup_skb programs ask for).
fn owner(ctx: &SkBuffContext) -> Who {
    // SAFETY: the helpers take the program's own __sk_buff.
    let (cgroup, uid) = unsafe {
        (
            bpf_skb_cgroup_id(ctx.skb.skb),
            bpf_get_socket_uid(ctx.skb.skb),
        )
    };
    Who {
        cgroup,
        uid,
        pid: 0,
        comm: RAW_SOCKET,
    }
}

/// Reads `N` bytes at `offset` from the network header.
fn load<const N: usize>(ctx: &SkBuffContext, offset: usize) -> Option<[u8; N]> {
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
    // SAFETY: filled by the helper when it returns 0.
    (rc == 0).then(|| unsafe { out.assume_init() })
}

fn judge_v4(ctx: &SkBuffContext) -> Option<i32> {
    let head = load::<20>(ctx, 0)?;
    let proto = head[9];
    if proto != protocol::TCP && proto != protocol::UDP {
        return Some(ALLOW);
    }
    let ihl = usize::from(head[0] & 0x0f) * 4;
    let fragment = u16::from_be_bytes([head[6], head[7]]) & 0x1fff;
    if fragment != 0 {
        // Later fragments carry no ports; the first one was judged.
        return Some(ALLOW);
    }
    if ihl < 20 {
        return None;
    }
    let ports = load::<4>(ctx, ihl)?;
    let addr = u32::from_ne_bytes([head[16], head[17], head[18], head[19]]);
    let port = u16::from_ne_bytes([ports[2], ports[3]]);
    Some(verdict(
        &Dest {
            family: 4,
            addr: [addr, 0, 0, 0],
            port,
            protocol: proto,
        },
        || owner(ctx),
    ))
}

fn judge_v6(ctx: &SkBuffContext) -> Option<i32> {
    let head = load::<40>(ctx, 0)?;
    let mut next = head[6];
    let mut at = 40;
    // Extension headers, bounded; a raw packet hiding its ports deeper is refused.
    let mut walked = 0;
    while walked < 4 && matches!(next, 0 | 43 | 44 | 60) {
        let ext = load::<4>(ctx, at)?;
        if next == 44 {
            if u16::from_be_bytes([ext[2], ext[3]]) >> 3 != 0 {
                return Some(ALLOW);
            }
            at += 8;
        } else {
            at += (usize::from(ext[1]) + 1) * 8;
        }
        next = ext[0];
        walked += 1;
    }
    if matches!(next, 0 | 43 | 44 | 60) {
        return None;
    }
    if next != protocol::TCP && next != protocol::UDP {
        return Some(ALLOW);
    }
    let ports = load::<4>(ctx, at)?;
    let word = |i: usize| u32::from_ne_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    let addr = [word(24), word(28), word(32), word(36)];
    let port = u16::from_ne_bytes([ports[2], ports[3]]);
    Some(verdict(
        &Dest {
            family: 6,
            addr,
            port,
            protocol: next,
        },
        || owner(ctx),
    ))
}

//! `sock_ingress`: the remote guard at the sockets, a `cgroup_skb/ingress`
//! program on the backend host's cgroup tree. The kernel runs it for every
//! packet it delivers to a socket of a process in that tree: after
//! reassembly, after NAT, whichever interface it came in on (`lo`,
//! bridges, veths, tunnels). The port judged is the receiving socket's own,
//! so nothing in the packet can disguise it; only the source is read.

use aya_ebpf::{
    bindings::{BPF_TCP_LISTEN, bpf_sock},
    helpers::generated::bpf_sk_fullsock,
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use gateway_common::layer;

use crate::remote::{Flow, IPPROTO_TCP, IPPROTO_UDP, Verdict, judge, port_rule};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

#[cgroup_skb(ingress)]
pub fn sock_ingress(ctx: SkBuffContext) -> i32 {
    match try_sock_ingress(&ctx) {
        Verdict::Pass => 1,
        Verdict::Drop => 0,
    }
}

fn try_sock_ingress(ctx: &SkBuffContext) -> Verdict {
    let skb = ctx.skb.skb;
    // SAFETY: the kernel passes a valid __sk_buff; sk is checked for null.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return Verdict::Pass;
    }
    // SAFETY: sk is a non-null socket pointer from the context.
    let full: *mut bpf_sock = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return Verdict::Pass;
    }
    // SAFETY: a full socket from the helper, valid for the program's run.
    let (protocol, state) = unsafe { ((*full).protocol, (*full).state) };
    let protocol = match protocol {
        6 => IPPROTO_TCP,
        17 => IPPROTO_UDP,
        _ => return Verdict::Pass,
    };
    // SAFETY: as above; the socket's local port, host byte order.
    let port = unsafe { (*skb).local_port } as u16;
    let Some(rule) = port_rule(protocol, port) else {
        return Verdict::Pass;
    };
    // SAFETY: as above.
    let (ethertype, ifindex) = unsafe { (u16::from_be((*skb).protocol as u16), (*skb).ifindex) };
    let mut flow = Flow::new(layer::SOCKET, ifindex);
    flow.protocol = protocol;
    flow.dst_port = port;
    // UDP datagrams, and SYNs to a listener: once per connection
    // attempt, not per packet of a connection (the handshake's last ACK
    // reaches the listener too).
    let listening = state == BPF_TCP_LISTEN;
    flow.opens = protocol == IPPROTO_UDP;
    // The data starts at the network header here.
    match ethertype {
        ETH_P_IP => {
            if let Ok(head) = ctx.load::<[u8; 20]>(0) {
                flow.family = 4;
                flow.src[0] = u32::from_ne_bytes([head[12], head[13], head[14], head[15]]);
                flow.dst[0] = u32::from_ne_bytes([head[16], head[17], head[18], head[19]]);
                let ihl = usize::from(head[0] & 0x0f) * 4;
                note_transport(ctx, ihl, listening, &mut flow);
                flow.unparsable = false;
            }
        }
        ETH_P_IPV6 => {
            if let Ok(head) = ctx.load::<[u8; 40]>(0) {
                let word =
                    |i: usize| u32::from_ne_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
                flow.family = 6;
                flow.src = [word(8), word(12), word(16), word(20)];
                flow.dst = [word(24), word(28), word(32), word(36)];
                // Only for the event: behind extension headers the port
                // stays 0 and every packet to a listener counts as opening.
                if head[6] == protocol {
                    note_transport(ctx, 40, listening, &mut flow);
                } else {
                    flow.opens |= listening;
                }
                flow.unparsable = false;
            }
        }
        // A socket of ours got something that is not IP: judged, not guessed.
        _ => {}
    }
    judge(&flow, rule)
}

/// The source port, and whether a TCP packet is a SYN to a listener, from
/// the transport header at `l4` (for the event only: the verdict never
/// depends on it).
fn note_transport(ctx: &SkBuffContext, l4: usize, listening: bool, flow: &mut Flow) {
    if let Ok(p) = ctx.load::<[u8; 2]>(l4) {
        flow.src_port = u16::from_be_bytes(p);
    }
    if flow.protocol == IPPROTO_TCP && listening {
        flow.opens = ctx
            .load::<u8>(l4 + 13)
            .map_or(true, |flags| flags & 0x02 != 0 && flags & 0x10 == 0);
    }
}

//! `cgroup_skb/ingress`: the local guard where packets arrive. Everything
//! this host's own sockets send to a local backend comes through `lo` and
//! was judged where it was sent (connect, sendmsg, egress). A packet that
//! reaches a local backend's socket any other way came from outside this
//! host's sockets: another host, a tunnel decapsulated here (VXLAN, GRE,
//! WireGuard), a tun or tap device its owner writes into, a VM, a
//! container's namespace behind a veth. The gateway never sends from
//! there, so such a packet to a protected port is dropped (or, in audit,
//! counted and passed). The port judged is the receiving socket's own;
//! for a rule on every local address (the default) and a socket in the
//! gateway's network namespace the address is not asked at all: anything
//! that reached such a socket is addressed here. A socket in another
//! namespace (a container's own service) is addressed at that namespace:
//! the cgroup hooks run for it too (they do not look at namespaces), and
//! there only the address maps say whether it is this host's.

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_TCP_LISTEN, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
    },
    helpers::generated::{bpf_sk_lookup_udp, bpf_sk_release},
    macros::{cgroup_skb, map},
    maps::Array,
    programs::SkBuffContext,
};
use gateway_common::{enforcement, local_layer, protocol};

use crate::local::{ALLOW, Dest, REFUSE, Source, Who, config, judge, local_port_known, rule_for};
use crate::local_egress::{LOOPBACK_IFINDEX, full_socket, load};

/// The port (network byte order) of a UDP socket the gateway holds bound
/// to 127.0.0.1 in its own network namespace: a namespace where a lookup
/// finds a socket there is the gateway's. 0 until the gateway sets it.
/// Not pinned: each gateway's programs get their own, set before they are
/// attached.
#[map]
static NETNS_MARK: Array<u16> = Array::with_max_entries(1, 0);

/// The comm an arriving packet's events carry: no task sent it here.
const ARRIVED: [u8; 16] = *b"(arrived)\0\0\0\0\0\0\0";
/// `skb->pkt_type` of a broadcast or multicast copy looped back to local
/// sockets (it keeps the output device, not `lo`).
const PACKET_LOOPBACK: u32 = 5;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

#[cgroup_skb(ingress)]
pub fn local_ingress(ctx: SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    let Some(full) = full_socket(&ctx) else {
        return ALLOW;
    };
    // SAFETY: a full socket from the helper, valid for the program's run.
    let (proto, state) = unsafe { ((*full).protocol, (*full).state) };
    let proto = match proto {
        6 => protocol::TCP,
        17 => protocol::UDP,
        _ => return ALLOW,
    };
    // SAFETY: as above; the receiving socket's port, host byte order.
    let port = (unsafe { (*skb).local_port } as u16).to_be();
    // Most packets end here: their socket's port is no local backend's.
    if !local_port_known(port, proto) {
        return ALLOW;
    }
    // SAFETY: as above.
    let (ifindex, pkt_type, ethertype) = unsafe {
        (
            (*skb).ifindex,
            (*skb).pkt_type,
            u16::from_be((*skb).protocol as u16),
        )
    };
    if ifindex == LOOPBACK_IFINDEX || pkt_type == PACKET_LOOPBACK {
        // Sent by a socket of this host: judged on its way out.
        return ALLOW;
    }
    let Some(config) = config() else {
        return REFUSE;
    };
    // SAFETY: the helper takes the program's own __sk_buff.
    let receiver = unsafe { aya_ebpf::helpers::generated::bpf_skb_cgroup_id(skb) };
    if receiver == config.gateway_cgroup {
        // The gateway's own socket (an answer from a remote backend).
        return ALLOW;
    }
    let Ok((dest, source)) = (match ethertype {
        ETH_P_IP => addresses_v4(&ctx, port, proto),
        ETH_P_IPV6 => addresses_v6(&ctx, port, proto),
        // A local backend got something that is not IP: judged, not guessed.
        _ => Err(()),
    }) else {
        return REFUSE;
    };
    // In the gateway's namespace, judged as arriving "on loopback":
    // whatever its address, it reached a socket of this host, so it was
    // delivered here, and a rule for every local address covers it by its
    // port. The address maps know only the main local table, hold at most
    // MAX_LOCAL_ADDRESSES and follow changes late; a local route in another
    // table (policy routing), an address beyond what the maps hold or one
    // just added would otherwise let it in. A socket in another namespace
    // (a container's service on the same port number) got a packet
    // addressed to that namespace: judged by the address maps.
    let Some(rule) = rule_for(&dest, in_gateway_netns(&ctx)) else {
        return ALLOW;
    };
    if config.enforcement == enforcement::AUDIT
        && proto == protocol::TCP
        && !(state == BPF_TCP_LISTEN && is_syn(&ctx, &dest))
    {
        // In audit a connection from outside counts once, at its SYN, not
        // per packet (when enforcing, every packet is dropped and counted).
        return ALLOW;
    }
    let who = Who {
        cgroup: 0,
        uid: gateway_common::ANY_UID,
        pid: 0,
        comm: ARRIVED,
        cookie: 0,
    };
    judge(rule, &dest, &who, local_layer::INGRESS, source)
}

/// Whether the packet's namespace (its device's: the receiving socket's)
/// is the gateway's: the gateway's marker socket is found there. Before
/// the mark is set it is taken to be (by port, the stricter judgement:
/// fail closed). Another namespace that binds the marker's port makes only
/// its own sockets judged by port. While no gateway runs (its pinned
/// programs stay) there is no marker: every namespace is judged by the
/// address maps, as it was before arrivals were judged by port.
fn in_gateway_netns(ctx: &SkBuffContext) -> bool {
    let port = match NETNS_MARK.get(0) {
        Some(&port) if port != 0 => port,
        _ => return true,
    };
    let loopback = u32::from_ne_bytes([127, 0, 0, 1]);
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
            ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                saddr: loopback,
                daddr: loopback,
                sport: port,
                dport: port,
            },
        },
    };
    // SAFETY: the program's own __sk_buff and a tuple on the stack of the
    // size given (its IPv4 part); a socket found is released at once.
    unsafe {
        let found = bpf_sk_lookup_udp(
            ctx.skb.skb.cast(),
            &raw mut tuple,
            core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        );
        if found.is_null() {
            return false;
        }
        bpf_sk_release(found.cast());
    }
    true
}

/// Whether a TCP packet is a SYN without ACK (its header right after the
/// IP header; behind IPv6 extension headers it counts as one).
fn is_syn(ctx: &SkBuffContext, dest: &Dest) -> bool {
    let l4 = if dest.family == 4 {
        match load::<1>(ctx, 0) {
            Ok([v]) => usize::from(v & 0x0f) * 4,
            Err(()) => return true,
        }
    } else {
        40
    };
    load::<1>(ctx, l4 + 13).map_or(true, |[flags]| flags & 0x12 == 0x02)
}

fn addresses_v4(ctx: &SkBuffContext, port: u16, proto: u8) -> Result<(Dest, Source), ()> {
    let head = load::<20>(ctx, 0)?;
    let ihl = usize::from(head[0] & 0x0f) * 4;
    // The source port, for the event only (a fragment's is not there).
    let source_port = load::<2>(ctx, ihl).map_or(0, u16::from_ne_bytes);
    Ok((
        Dest {
            family: 4,
            addr: [
                u32::from_ne_bytes([head[16], head[17], head[18], head[19]]),
                0,
                0,
                0,
            ],
            port,
            protocol: proto,
        },
        Source {
            addr: [
                u32::from_ne_bytes([head[12], head[13], head[14], head[15]]),
                0,
                0,
                0,
            ],
            port: source_port,
        },
    ))
}

fn addresses_v6(ctx: &SkBuffContext, port: u16, proto: u8) -> Result<(Dest, Source), ()> {
    let head = load::<40>(ctx, 0)?;
    let word = |i: usize| u32::from_ne_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    // Behind extension headers the source port stays 0 (the event only).
    let source_port = if head[6] == proto {
        load::<2>(ctx, 40).map_or(0, u16::from_ne_bytes)
    } else {
        0
    };
    Ok((
        Dest {
            family: 6,
            addr: [word(24), word(28), word(32), word(36)],
            port,
            protocol: proto,
        },
        Source {
            addr: [word(8), word(12), word(16), word(20)],
            port: source_port,
        },
    ))
}

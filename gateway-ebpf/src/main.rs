//! The gateway's eBPF programs, one file per attach point.
//!
//! The local guard (on the gateway's host), in `sock_addr`: `connect4`/
//! `connect6` run on every connect() in the cgroup subtree they are attached
//! to, `sendmsg4`/`sendmsg6` on every UDP datagram sent with an address.
//! Reaching a protected backend passes only from the gateway's own cgroup;
//! from anywhere else it is refused with EPERM (or, in audit, counted and
//! let through). `local_egress` does the same for packets on their way out,
//! by their final headers (after NAT; raw sockets' own), and
//! `local_ingress` for packets that reach a local backend from outside this
//! host's sockets (other hosts, tunnels, tun devices, containers). What
//! they share (maps, the judgement) is in `local`.
//!
//! The remote guard (on a backend host): `tc_ingress` is a TC classifier on
//! the interfaces, the early layer; `sock_ingress` a `cgroup_skb/ingress`
//! program at the sockets, which sees what the stack delivers (reassembled,
//! after NAT, on every interface). A packet to a protected port passes only
//! from an allowed (gateway) source. What they share is in `remote`.
//!
//! The admission block list (on the gateway's host): `block_list`, an XDP
//! program on the interfaces the listeners are reached through, drops new
//! connections from blocked sources before the kernel builds a socket.
#![no_std]
#![no_main]

mod block_list;
mod budget;
mod local;
mod local_egress;
mod local_ingress;
mod remote;
mod sock_addr;
mod sock_ingress;
mod tc_ingress;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

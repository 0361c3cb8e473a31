//! `cgroup/connect4`, `connect6`, `sendmsg4`, `sendmsg6`: the local guard at
//! the moment a process names a destination (connect, or a UDP datagram
//! sent with an address, which reaches a UDP backend without any connect).
//! io_uring's connect goes through the same hooks.

use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
};
use gateway_common::protocol;

use crate::local::{ALLOW, Dest, Who, seen, verdict};

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    judge_v4(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    judge_v6(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    judge_v4(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    judge_v6(&ctx)
}

/// The task making the call, and the socket's cookie (which ties an audited
/// call to its packet at the egress program).
fn caller(ctx: &SockAddrContext) -> Who {
    // SAFETY: the helper takes the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    Who::current(cookie)
}

/// The socket's protocol as the maps key it; other protocols (ICMP, SCTP)
/// are never protected here.
fn protocol_of(raw: u32) -> Option<u8> {
    match raw as u8 {
        p @ (protocol::TCP | protocol::UDP) if raw < 256 => Some(p),
        _ => None,
    }
}

fn judge_v4(ctx: &SockAddrContext) -> i32 {
    seen();
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's run.
    let sa = unsafe { &*ctx.sock_addr };
    let Some(protocol) = protocol_of(sa.protocol) else {
        return ALLOW;
    };
    let addr = sa.user_ip4;
    // The port is the low 16 bits, already in network byte order.
    let port = sa.user_port as u16;
    verdict(
        &Dest {
            family: 4,
            addr: [addr, 0, 0, 0],
            port,
            protocol,
        },
        || caller(ctx),
    )
}

fn judge_v6(ctx: &SockAddrContext) -> i32 {
    seen();
    let sa = ctx.sock_addr;
    // The verifier only allows ctx loads at constant offsets from ctx itself:
    // copying the array would walk a modified ctx pointer, so read each word.
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's run.
    let word = |i: usize| unsafe { core::ptr::read_volatile(&(*sa).user_ip6[i]) };
    // SAFETY: as above.
    let Some(protocol) = protocol_of(unsafe { (*sa).protocol }) else {
        return ALLOW;
    };
    let addr = [word(0), word(1), word(2), word(3)];
    // SAFETY: as above.
    let port = unsafe { (*sa).user_port } as u16;
    verdict(
        &Dest {
            family: 6,
            addr,
            port,
            protocol,
        },
        || caller(ctx),
    )
}

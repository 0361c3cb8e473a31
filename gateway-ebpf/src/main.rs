//! The gateway's eBPF programs.
//!
//! `connect4` is attached to the gateway's cgroup v2 hierarchy. For now it only
//! counts connect() calls and lets them through; the guard (backend-only
//! reachability) fills in the refusal logic and its maps.
#![no_std]
#![no_main]

use aya_ebpf::{
    macros::{cgroup_sock_addr, map},
    maps::PerCpuArray,
    programs::SockAddrContext,
};
use gateway_common::GuardCounter;

/// Verdicts a cgroup/connect program returns to the kernel.
const ALLOW: i32 = 1;

#[map]
static GUARD_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(GuardCounter::COUNT, 0);

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    try_connect4(&ctx).unwrap_or(ALLOW)
}

fn try_connect4(_ctx: &SockAddrContext) -> Result<i32, i64> {
    bump(GuardCounter::Seen);
    bump(GuardCounter::Allowed);
    Ok(ALLOW)
}

fn bump(counter: GuardCounter) {
    if let Some(slot) = GUARD_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer comes from the map lookup for this CPU's slot and
        // stays valid for the program's run; per-CPU slots have no concurrent writer.
        unsafe { *slot += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

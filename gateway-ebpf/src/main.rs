//! The gateway's eBPF programs: the local guard.
//!
//! `connect4`/`connect6` run on every connect() in the cgroup subtree they
//! are attached to. A connect to a protected backend passes only from the
//! gateway's own cgroup; from anywhere else it is refused with EPERM (or, in
//! audit, counted and let through). Everything else passes untouched.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, generated::bpf_ktime_get_ns,
    },
    macros::{cgroup_sock_addr, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::SockAddrContext,
};
use gateway_common::{
    BackendV4, BackendV6, BypassEvent, EVENTS_PER_SECOND, GuardConfig, GuardCounter, MAX_RULES,
    enforcement,
};

/// Verdicts a cgroup/connect program returns to the kernel.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

#[map]
static GUARD_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(GuardCounter::COUNT, 0);

#[map]
static GUARD_CONFIG: Array<GuardConfig> = Array::with_max_entries(1, 0);

/// Protected backends → rule id (index into RULE_REFUSALS).
#[map]
static PROTECTED_V4: HashMap<BackendV4, u32> = HashMap::with_max_entries(MAX_RULES, 0);

#[map]
static PROTECTED_V6: HashMap<BackendV6, u32> = HashMap::with_max_entries(MAX_RULES, 0);

/// Bypass attempts for userspace to log, rate-limited per CPU.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

/// Per CPU: [second of the current window, events sent in it].
#[map]
static EVENT_BUDGET: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// Refusals (and audited would-be refusals) per rule.
#[map]
static RULE_REFUSALS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2 * MAX_RULES, 0);

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    try_connect4(&ctx).unwrap_or(ALLOW)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    try_connect6(&ctx).unwrap_or(ALLOW)
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i64> {
    bump(&GUARD_COUNTERS, GuardCounter::Seen as u32);
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's run.
    let sa = unsafe { &*ctx.sock_addr };
    let key = BackendV4 {
        addr: sa.user_ip4,
        // The port is the low 16 bits, already in network byte order.
        port: sa.user_port as u16,
        _pad: 0,
    };
    // SAFETY: the value is read once and copied out; the map is not resized.
    match unsafe { PROTECTED_V4.get(&key) } {
        Some(rule) => Ok(judge(
            *rule,
            Dest {
                family: 4,
                addr: [key.addr, 0, 0, 0],
                port: key.port,
            },
        )),
        None => Ok(ALLOW),
    }
}

fn try_connect6(ctx: &SockAddrContext) -> Result<i32, i64> {
    bump(&GUARD_COUNTERS, GuardCounter::Seen as u32);
    let sa = ctx.sock_addr;
    // The verifier only allows ctx loads at constant offsets from ctx itself:
    // copying the array would walk a modified ctx pointer, so read each word.
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's run.
    let word = |i: usize| unsafe { core::ptr::read_volatile(&(*sa).user_ip6[i]) };
    let key = BackendV6 {
        addr: [word(0), word(1), word(2), word(3)],
        // SAFETY: as above.
        port: unsafe { (*sa).user_port } as u16,
        _pad: 0,
    };
    // SAFETY: as in connect4.
    match unsafe { PROTECTED_V6.get(&key) } {
        Some(rule) => Ok(judge(
            *rule + MAX_RULES,
            Dest {
                family: 6,
                addr: key.addr,
                port: key.port,
            },
        )),
        None => Ok(ALLOW),
    }
}

/// Where a connect was going, for the event.
struct Dest {
    family: u16,
    addr: [u32; 4],
    port: u16,
}

/// A connect to a protected backend: the gateway's cgroup passes.
fn judge(rule: u32, dest: Dest) -> i32 {
    let Some(config) = GUARD_CONFIG.get(0) else {
        // No config yet: refuse rather than guess (fail closed).
        return REFUSE;
    };
    // SAFETY: the helper has no preconditions in cgroup programs.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    if cgroup == config.gateway_cgroup {
        bump(&GUARD_COUNTERS, GuardCounter::Allowed as u32);
        return ALLOW;
    }
    bump(&RULE_REFUSALS, rule);
    let audited = config.enforcement == enforcement::AUDIT;
    report(cgroup, &dest, audited);
    if audited {
        bump(&GUARD_COUNTERS, GuardCounter::Audited as u32);
        ALLOW
    } else {
        bump(&GUARD_COUNTERS, GuardCounter::Refused as u32);
        REFUSE
    }
}

/// Sends a bypass event unless this CPU already sent its share this second.
fn report(cgroup: u64, dest: &Dest, audited: bool) {
    let Some(budget) = EVENT_BUDGET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let second = unsafe { bpf_ktime_get_ns() } / 1_000_000_000;
    // SAFETY: this CPU's slot, valid for the program's run, no concurrent writer.
    let budget = unsafe { &mut *budget };
    if budget[0] != second {
        budget[0] = second;
        budget[1] = 0;
    }
    if budget[1] >= EVENTS_PER_SECOND {
        return;
    }
    budget[1] += 1;
    let Some(mut entry) = EVENTS.reserve::<BypassEvent>(0) else {
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    entry.write(BypassEvent {
        pid: (pid_tgid >> 32) as u32,
        uid: uid_gid as u32,
        cgroup,
        addr: dest.addr,
        family: dest.family,
        port: dest.port,
        audited: audited as u32,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    });
    entry.submit(0);
}

fn bump(map: &PerCpuArray<u64>, index: u32) {
    if let Some(slot) = map.get_ptr_mut(index) {
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

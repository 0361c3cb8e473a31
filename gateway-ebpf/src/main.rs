//! The gateway's eBPF programs: the local guard and the remote guard.
//!
//! `connect4`/`connect6` run on every connect() in the cgroup subtree they
//! are attached to, `sendmsg4`/`sendmsg6` on every UDP datagram sent with an
//! address. Reaching a protected backend (protocol, address, port) passes
//! only from the gateway's own cgroup; from anywhere else it is refused with
//! EPERM (or, in audit, counted and let through). Everything else passes
//! untouched.
//!
//! `ingress` is a TC classifier on a backend host's interfaces: a TCP or UDP
//! packet to a protected port passes only from an allowed (gateway) source;
//! from anyone else it is dropped (or, in audit, counted and passed).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, generated::bpf_ktime_get_ns,
    },
    macros::{cgroup_sock_addr, classifier, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{SockAddrContext, TcContext},
};
use gateway_common::{
    ANY_UID, BackendV4, BackendV6, BypassEvent, EVENTS_PER_SECOND, GuardConfig, GuardCounter,
    IngressConfig, IngressCounter, IngressEvent, MAX_ALLOWED_SOURCES, MAX_PORT_RULES,
    MAX_PROTECTED_PORTS, MAX_RULES, enforcement, protocol,
};

/// Verdicts a cgroup/connect program returns to the kernel.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

#[map]
static GUARD_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(GuardCounter::COUNT, 0);

#[map]
static GUARD_CONFIG: Array<GuardConfig> = Array::with_max_entries(1, 0);

/// Protected backends (one entry per port of a rule) → rule id (index into
/// RULE_REFUSALS). Not preallocated: most hosts protect a handful.
#[map]
static PROTECTED_V4: HashMap<BackendV4, u32> =
    HashMap::with_max_entries(MAX_PROTECTED_PORTS, BPF_F_NO_PREALLOC);

#[map]
static PROTECTED_V6: HashMap<BackendV6, u32> =
    HashMap::with_max_entries(MAX_PROTECTED_PORTS, BPF_F_NO_PREALLOC);

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

// UDP datagrams sent with a destination (sendto/sendmsg): a UDP backend is
// reached without any connect().
#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    try_connect4(&ctx).unwrap_or(ALLOW)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    try_connect6(&ctx).unwrap_or(ALLOW)
}

/// The socket's protocol as the maps key it; other protocols (raw, ICMP)
/// are never protected.
fn protocol_of(raw: u32) -> Option<u8> {
    match raw as u8 {
        p @ (protocol::TCP | protocol::UDP) if raw < 256 => Some(p),
        _ => None,
    }
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i64> {
    bump(&GUARD_COUNTERS, GuardCounter::Seen as u32);
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's run.
    let sa = unsafe { &*ctx.sock_addr };
    let Some(protocol) = protocol_of(sa.protocol) else {
        return Ok(ALLOW);
    };
    let key = BackendV4 {
        addr: sa.user_ip4,
        // The port is the low 16 bits, already in network byte order.
        port: sa.user_port as u16,
        protocol,
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
                protocol,
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
    // SAFETY: as above.
    let Some(protocol) = protocol_of(unsafe { (*sa).protocol }) else {
        return Ok(ALLOW);
    };
    let key = BackendV6 {
        addr: [word(0), word(1), word(2), word(3)],
        // SAFETY: as above.
        port: unsafe { (*sa).user_port } as u16,
        protocol,
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
                protocol,
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
    protocol: u8,
}

/// A connect to a protected backend: the gateway's cgroup passes.
fn judge(rule: u32, dest: Dest) -> i32 {
    let Some(config) = GUARD_CONFIG.get(0) else {
        // No config yet: refuse rather than guess (fail closed).
        return REFUSE;
    };
    // SAFETY: the helper has no preconditions in cgroup programs.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    let uid = bpf_get_current_uid_gid() as u32;
    if cgroup == config.gateway_cgroup
        && (config.gateway_uid == ANY_UID || uid == config.gateway_uid)
    {
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
    if !within_budget(&EVENT_BUDGET) {
        return;
    }
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
        audited: audited as u8,
        protocol: dest.protocol,
        _pad: 0,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    });
    entry.submit(0);
}

/// Whether this CPU may send one more event this second (and counts it).
fn within_budget(budget: &PerCpuArray<[u64; 2]>) -> bool {
    let Some(budget) = budget.get_ptr_mut(0) else {
        return false;
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
        return false;
    }
    budget[1] += 1;
    true
}

fn bump(map: &PerCpuArray<u64>, index: u32) {
    if let Some(slot) = map.get_ptr_mut(index) {
        // SAFETY: the pointer comes from the map lookup for this CPU's slot and
        // stays valid for the program's run; per-CPU slots have no concurrent writer.
        unsafe { *slot += 1 };
    }
}

// ---- The remote guard: TC ingress on a backend host ----

/// Per destination port: 0 when unprotected, else the rule id + 1.
#[map]
static INGRESS_TCP_PORTS: Array<u32> = Array::with_max_entries(65536, 0);

#[map]
static INGRESS_UDP_PORTS: Array<u32> = Array::with_max_entries(65536, 0);

/// Sources that may reach protected ports (the gateways), as prefixes.
#[map]
static INGRESS_ALLOW_V4: LpmTrie<[u8; 4], u8> =
    LpmTrie::with_max_entries(MAX_ALLOWED_SOURCES, BPF_F_NO_PREALLOC);

#[map]
static INGRESS_ALLOW_V6: LpmTrie<[u8; 16], u8> =
    LpmTrie::with_max_entries(MAX_ALLOWED_SOURCES, BPF_F_NO_PREALLOC);

#[map]
static INGRESS_CONFIG: Array<IngressConfig> = Array::with_max_entries(1, 0);

#[map]
static INGRESS_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(IngressCounter::COUNT, 0);

/// Drops (and audited would-be drops) per port rule.
#[map]
static INGRESS_RULE_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_PORT_RULES, 0);

#[map]
static INGRESS_EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

#[map]
static INGRESS_EVENT_BUDGET: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

const ETH_HEADER: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

#[classifier]
pub fn ingress(ctx: TcContext) -> i32 {
    // A packet too short to parse is no connection to a protected port.
    try_ingress(&ctx).unwrap_or(TC_ACT_OK as i32)
}

/// Where a packet came from and was going, as far as the guard cares.
struct Flow {
    family: u8,
    protocol: u8,
    /// IPv6 whose transport header is behind too many extension headers.
    opaque: bool,
    /// Opens something: a UDP datagram, or a TCP SYN (not SYN-ACK). Only
    /// these become events, so an audited connection logs once, not per packet.
    opens: bool,
    src: [u32; 4],
    dst: [u32; 4],
    src_port: u16,
    dst_port: u16,
}

fn try_ingress(ctx: &TcContext) -> Result<i32, i64> {
    let ethertype = u16::from_be(ctx.load::<u16>(12)?);
    let flow = match ethertype {
        ETH_P_IP => parse_v4(ctx)?,
        ETH_P_IPV6 => parse_v6(ctx)?,
        _ => None,
    };
    let Some(flow) = flow else {
        return Ok(TC_ACT_OK as i32);
    };
    let rule = if flow.opaque {
        None
    } else {
        let ports = if flow.protocol == IPPROTO_TCP {
            &INGRESS_TCP_PORTS
        } else {
            &INGRESS_UDP_PORTS
        };
        match ports.get(u32::from(flow.dst_port)) {
            Some(r) if *r != 0 => Some(*r - 1),
            _ => return Ok(TC_ACT_OK as i32),
        }
    };
    bump(&INGRESS_COUNTERS, IngressCounter::Protected as u32);
    if source_allowed(&flow) {
        bump(&INGRESS_COUNTERS, IngressCounter::Allowed as u32);
        return Ok(TC_ACT_OK as i32);
    }
    if let Some(rule) = rule {
        bump(&INGRESS_RULE_DROPS, rule);
    }
    // No config yet: drop rather than guess (fail closed).
    let audited = INGRESS_CONFIG
        .get(0)
        .is_some_and(|c| c.enforcement == enforcement::AUDIT);
    if flow.opens {
        report_ingress(ctx, &flow, audited);
    }
    if audited {
        bump(&INGRESS_COUNTERS, IngressCounter::Audited as u32);
        Ok(TC_ACT_OK as i32)
    } else {
        bump(&INGRESS_COUNTERS, IngressCounter::Dropped as u32);
        Ok(TC_ACT_SHOT as i32)
    }
}

fn parse_v4(ctx: &TcContext) -> Result<Option<Flow>, i64> {
    let ip = ETH_HEADER;
    let ihl = usize::from(ctx.load::<u8>(ip)? & 0x0f) * 4;
    let protocol = ctx.load::<u8>(ip + 9)?;
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return Ok(None);
    }
    // A later fragment has no ports; without its first one it never
    // reassembles, and the first one carries the ports we judge.
    let fragment = u16::from_be(ctx.load::<u16>(ip + 6)?) & 0x1fff;
    if fragment != 0 || ihl < 20 {
        return Ok(None);
    }
    let l4 = ip + ihl;
    Ok(Some(Flow {
        family: 4,
        protocol,
        opaque: false,
        opens: opens(ctx, protocol, l4)?,
        src: [ctx.load::<u32>(ip + 12)?, 0, 0, 0],
        dst: [ctx.load::<u32>(ip + 16)?, 0, 0, 0],
        src_port: u16::from_be(ctx.load::<u16>(l4)?),
        dst_port: u16::from_be(ctx.load::<u16>(l4 + 2)?),
    }))
}

/// IPv6 extension headers the guard walks to find the transport header.
const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const DEST_OPTS: u8 = 60;

fn parse_v6(ctx: &TcContext) -> Result<Option<Flow>, i64> {
    let ip = ETH_HEADER;
    let mut next = ctx.load::<u8>(ip + 6)?;
    let mut at = ip + 40;
    // Bounded: a packet that hides its transport header behind more
    // extension headers than this is treated as going to a protected port
    // from a stranger (below), so it cannot be used to slip past.
    let mut walked = 0;
    while walked < 4 && matches!(next, HOP_BY_HOP | ROUTING | FRAGMENT | DEST_OPTS) {
        let header_next = ctx.load::<u8>(at)?;
        if next == FRAGMENT {
            let offset = u16::from_be(ctx.load::<u16>(at + 2)?) >> 3;
            if offset != 0 {
                return Ok(None);
            }
            at += 8;
        } else {
            at += (usize::from(ctx.load::<u8>(at + 1)?) + 1) * 8;
        }
        next = header_next;
        walked += 1;
    }
    let word = |o: usize| ctx.load::<u32>(o);
    let src = [
        word(ip + 8)?,
        word(ip + 12)?,
        word(ip + 16)?,
        word(ip + 20)?,
    ];
    let dst = [
        word(ip + 24)?,
        word(ip + 28)?,
        word(ip + 32)?,
        word(ip + 36)?,
    ];
    if matches!(next, HOP_BY_HOP | ROUTING | FRAGMENT | DEST_OPTS) {
        // Its ports are hidden too deep to judge: a stranger's is dropped
        // as if it went to a protected port, so this cannot slip past.
        return Ok(Some(Flow {
            family: 6,
            protocol: next,
            opaque: true,
            opens: true,
            src,
            dst,
            src_port: 0,
            dst_port: 0,
        }));
    }
    if next != IPPROTO_TCP && next != IPPROTO_UDP {
        return Ok(None);
    }
    Ok(Some(Flow {
        family: 6,
        protocol: next,
        opaque: false,
        opens: opens(ctx, next, at)?,
        src,
        dst,
        src_port: u16::from_be(ctx.load::<u16>(at)?),
        dst_port: u16::from_be(ctx.load::<u16>(at + 2)?),
    }))
}

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

fn opens(ctx: &TcContext, protocol: u8, l4: usize) -> Result<bool, i64> {
    if protocol != IPPROTO_TCP {
        return Ok(true);
    }
    let flags = ctx.load::<u8>(l4 + 13)?;
    Ok(flags & TCP_SYN != 0 && flags & TCP_ACK == 0)
}

fn source_allowed(flow: &Flow) -> bool {
    if flow.family == 4 {
        let key = Key::new(32, flow.src[0].to_ne_bytes());
        INGRESS_ALLOW_V4.get(&key).is_some()
    } else {
        let mut a = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let b = flow.src[i].to_ne_bytes();
            a[i * 4] = b[0];
            a[i * 4 + 1] = b[1];
            a[i * 4 + 2] = b[2];
            a[i * 4 + 3] = b[3];
            i += 1;
        }
        INGRESS_ALLOW_V6.get(&Key::new(128, a)).is_some()
    }
}

fn report_ingress(ctx: &TcContext, flow: &Flow, audited: bool) {
    if !within_budget(&INGRESS_EVENT_BUDGET) {
        return;
    }
    let Some(mut entry) = INGRESS_EVENTS.reserve::<IngressEvent>(0) else {
        return;
    };
    // SAFETY: the skb pointer is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    entry.write(IngressEvent {
        src: flow.src,
        dst: flow.dst,
        ifindex,
        src_port: flow.src_port,
        dst_port: flow.dst_port,
        family: flow.family,
        protocol: flow.protocol,
        audited: audited as u8,
        _pad: 0,
    });
    entry.submit(0);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

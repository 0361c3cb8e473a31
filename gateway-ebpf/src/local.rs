//! The local guard's maps and judgement, shared by the sock_addr hooks
//! (connect, sendmsg), the egress program (TCP SYNs, UDP datagrams and raw
//! sockets' packets by their final header) and the ingress program
//! (packets that reach a local backend from outside this host's sockets).
//!
//! A destination is protected when (protocol, address, port) is a protected
//! backend, or when the address is this host's (loopback, the host's own
//! addresses, the wildcard that the kernel turns into loopback after the
//! hook ran, broadcast and multicast that loop back) and a backend on this
//! host has that port: a server listening on all addresses answers there
//! too. IPv4-mapped IPv6 addresses are judged as the IPv4 address they are.

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid,
    },
    macros::map,
    maps::{
        Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, lpm_trie::Key,
    },
};
use gateway_common::{
    ANY_UID, BackendV4, BackendV6, BypassEvent, EVERY_LOCAL_ADDRESS, GuardConfig, GuardCounter,
    LocalPort, LocalSourceKey, LocalTally, MAX_LOCAL_ADDRESSES, MAX_PROTECTED_PORTS, MAX_RULES,
    MAX_TALLIED_SOURCES, enforcement, local_layer,
};

use crate::budget::{bump, now_ns, within_budget};

/// Verdicts the cgroup programs return to the kernel.
pub const ALLOW: i32 = 1;
pub const REFUSE: i32 = 0;

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

/// Ports of protected backends on this host → the index of their rule's
/// counter in RULE_REFUSALS, with EVERY_LOCAL_ADDRESS when the rule covers
/// every local address.
#[map]
static LOCAL_PORTS: HashMap<LocalPort, u32> =
    HashMap::with_max_entries(MAX_PROTECTED_PORTS, BPF_F_NO_PREALLOC);

/// This host's addresses besides 127.0.0.0/8 and ::1, kept current by the
/// gateway as they come and go (and subnet broadcast addresses).
#[map]
static LOCAL_V4: LpmTrie<[u8; 4], u8> =
    LpmTrie::with_max_entries(MAX_LOCAL_ADDRESSES, BPF_F_NO_PREALLOC);

#[map]
static LOCAL_V6: LpmTrie<[u8; 16], u8> =
    LpmTrie::with_max_entries(MAX_LOCAL_ADDRESSES, BPF_F_NO_PREALLOC);

/// Bypass attempts for userspace to log, rate-limited per CPU.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

/// Per CPU: [second of the current window, events sent in it].
#[map]
static EVENT_BUDGET: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// Every bypass attempt, tallied per (cgroup, uid) and CPU: userspace
/// logs and empties the tallies every summary period, so each process is
/// named even when another used up the event budget. Not an LRU: the
/// first sources of a period stay, and what finds it full is counted in
/// TALLY_UNTALLIED.
#[map]
static LOCAL_TALLIES: PerCpuHashMap<LocalSourceKey, LocalTally> =
    PerCpuHashMap::with_max_entries(MAX_TALLIED_SOURCES, 0);

/// Attempts whose source found the tallies full.
#[map]
static TALLY_UNTALLIED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Where a new tally is put together before it goes into LOCAL_TALLIES.
#[map]
static TALLY_SCRATCH: PerCpuArray<LocalTally> = PerCpuArray::with_max_entries(1, 0);

/// Refusals (and audited would-be refusals) per rule: IPv4 rules first,
/// IPv6 rules from MAX_RULES on.
#[map]
static RULE_REFUSALS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2 * MAX_RULES, 0);

/// In audit, what a connect() or sendmsg() hook last let through per
/// socket (by cookie): its packet then passes the egress program without
/// being counted a second time. Only a destination the hooks never saw
/// (rewritten by NAT on the way) is counted there. Not pinned: it matters
/// only between a call and its packet.
#[map]
static AUDITED_CALLS: LruHashMap<u64, Audited> = LruHashMap::with_max_entries(4096, 0);

/// A destination a hook let through in audit, as the packet will carry it:
/// IPv4-mapped addresses as IPv4, the wildcard as "any local address".
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Audited {
    addr: [u32; 4],
    port: u16,
    protocol: u8,
    /// 4 or 6; 0 for the wildcard (the kernel picks a local address).
    family: u8,
}

/// Who is trying: the task making a connect or sendmsg, or the owner of a
/// raw socket whose packet is leaving (egress programs run where no task
/// can be asked, and before 6.x kernels cannot ask).
pub struct Who {
    pub cgroup: u64,
    pub uid: u32,
    pub pid: u32,
    pub comm: [u8; 16],
    /// The socket's cookie (0: none asked), which ties a call the hooks
    /// audited to its packet.
    pub cookie: u64,
}

impl Who {
    /// The task making the call on the socket with `cookie`.
    pub fn current(cookie: u64) -> Who {
        Who {
            // SAFETY: the helper has no preconditions in cgroup programs.
            cgroup: unsafe { bpf_get_current_cgroup_id() },
            uid: bpf_get_current_uid_gid() as u32,
            pid: (bpf_get_current_pid_tgid() >> 32) as u32,
            comm: bpf_get_current_comm().unwrap_or([0; 16]),
            cookie,
        }
    }
}

/// Where something was going, for the event.
pub struct Dest {
    pub family: u16,
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub protocol: u8,
}

/// Where a packet came from (arriving packets only), for the event.
#[derive(Clone, Copy)]
pub struct Source {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
}

impl Source {
    pub const NONE: Source = Source {
        addr: [0; 4],
        port: 0,
    };
}

pub fn seen() {
    bump(&GUARD_COUNTERS, GuardCounter::Seen as u32);
}

/// `::ffff:0:0/96` as the third word of an address (network byte order read
/// as a native word).
const MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
const LOOPBACK_V6_LAST: u32 = u32::from_ne_bytes([0, 0, 0, 1]);

/// The rule (its counter index) that protects an IPv4 destination, if any.
/// `addr` and `port` in network byte order.
fn rule_v4(addr: u32, port: u16, protocol: u8) -> Option<u32> {
    let key = BackendV4 {
        addr,
        port,
        protocol,
        _pad: 0,
    };
    // SAFETY: the value is read once and copied out; entries are not preallocated.
    if let Some(rule) = unsafe { PROTECTED_V4.get(&key) } {
        return Some(*rule);
    }
    let o = addr.to_ne_bytes();
    // 0.0.0.0 becomes the socket's own address or 127.0.0.1 after the hook;
    // broadcast and multicast datagrams loop back to sockets on this host.
    let anywhere_here = addr == 0 || addr == u32::MAX || (o[0] & 0xf0) == 224;
    if anywhere_here {
        return local_rule(port, protocol, true);
    }
    if o[0] == 127 || LOCAL_V4.get(Key::new(32, o)).is_some() {
        return local_rule(port, protocol, false);
    }
    None
}

/// As [`rule_v4`] for IPv6 (an IPv4-mapped address is judged as IPv4).
fn rule_v6(addr: [u32; 4], port: u16, protocol: u8) -> Option<u32> {
    if addr[0] == 0 && addr[1] == 0 && addr[2] == MAPPED_PREFIX {
        return rule_v4(addr[3], port, protocol);
    }
    let key = BackendV6 {
        addr,
        port,
        protocol,
        _pad: 0,
    };
    // SAFETY: as in rule_v4.
    if let Some(rule) = unsafe { PROTECTED_V6.get(&key) } {
        return Some(*rule + MAX_RULES);
    }
    let unspecified = addr[0] == 0 && addr[1] == 0 && addr[2] == 0;
    let first = addr[0].to_ne_bytes();
    if (unspecified && addr[3] == 0) || first[0] == 0xff {
        return local_rule(port, protocol, true);
    }
    if unspecified && addr[3] == LOOPBACK_V6_LAST {
        return local_rule(port, protocol, false);
    }
    let mut o = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = addr[i].to_ne_bytes();
        o[i * 4] = b[0];
        o[i * 4 + 1] = b[1];
        o[i * 4 + 2] = b[2];
        o[i * 4 + 3] = b[3];
        i += 1;
    }
    if LOCAL_V6.get(Key::new(128, o)).is_some() {
        return local_rule(port, protocol, false);
    }
    None
}

/// Whether `port` (network byte order) and `protocol` are a local
/// backend's.
pub fn local_port_known(port: u16, protocol: u8) -> bool {
    let key = LocalPort {
        port,
        protocol,
        _pad: 0,
    };
    // SAFETY: only presence is read.
    unsafe { LOCAL_PORTS.get(&key) }.is_some()
}

/// A local address with a port of a backend on this host: judged when the
/// rule covers every local address, or when the address is one that lands
/// on any of them (`anywhere_here`).
fn local_rule(port: u16, protocol: u8, anywhere_here: bool) -> Option<u32> {
    let key = LocalPort {
        port,
        protocol,
        _pad: 0,
    };
    // SAFETY: as in rule_v4.
    let value = *unsafe { LOCAL_PORTS.get(&key) }?;
    (anywhere_here || value & EVERY_LOCAL_ADDRESS != 0).then_some(value & !EVERY_LOCAL_ADDRESS)
}

/// The rule covering `dest`, if any. `on_loopback`: the packet is being
/// routed to this host (it leaves through `lo`, or it arrived at one of
/// this host's sockets), so whatever its address, a local backend's port
/// is judged: an address the maps do not know (just added, an AnyIP route,
/// a local route in another table, one beyond what the maps hold) lands
/// here too.
pub fn rule_for(dest: &Dest, on_loopback: bool) -> Option<u32> {
    let rule = if dest.family == 4 {
        rule_v4(dest.addr[0], dest.port, dest.protocol)
    } else {
        rule_v6(dest.addr, dest.port, dest.protocol)
    };
    match rule {
        Some(rule) => Some(rule),
        None if on_loopback => local_rule(dest.port, dest.protocol, false),
        None => None,
    }
}

/// The verdict on a connect() or sendmsg() to `dest`: judged when a rule
/// covers it (`who` is asked only then), else allowed.
pub fn verdict(dest: &Dest, who: impl FnOnce() -> Who) -> i32 {
    match rule_for(dest, false) {
        Some(rule) => judge(rule, dest, &who(), local_layer::CALL, Source::NONE),
        None => ALLOW,
    }
}

/// Whether the gateway (its cgroup, and uid when configured) is `who`.
pub fn is_gateway(config: &GuardConfig, who: &Who) -> bool {
    who.cgroup == config.gateway_cgroup
        && (config.gateway_uid == ANY_UID || who.uid == config.gateway_uid)
}

pub fn config() -> Option<&'static GuardConfig> {
    GUARD_CONFIG.get(0)
}

/// An attempt on a protected destination (`rule`): the gateway passes,
/// anyone else is refused (or audited), counted, tallied and reported.
pub fn judge(rule: u32, dest: &Dest, who: &Who, layer: u8, source: Source) -> i32 {
    let Some(config) = config() else {
        // No config yet: refuse rather than guess (fail closed).
        return REFUSE;
    };
    if is_gateway(config, who) {
        // A TCP SYN or UDP datagram of the gateway's was counted at its
        // connect() or sendmsg().
        if layer != local_layer::EGRESS {
            bump(&GUARD_COUNTERS, GuardCounter::Allowed as u32);
        }
        return ALLOW;
    }
    let audited = config.enforcement == enforcement::AUDIT;
    if audited && layer == local_layer::EGRESS && already_audited(who.cookie, dest) {
        return ALLOW;
    }
    bump(&RULE_REFUSALS, rule);
    tally(who.cgroup, who.uid, dest);
    report(who, dest, audited, layer, source);
    if audited {
        if layer == local_layer::CALL && who.cookie != 0 {
            remember_audited(who.cookie, dest);
        }
        bump(&GUARD_COUNTERS, GuardCounter::Audited as u32);
        ALLOW
    } else {
        bump(&GUARD_COUNTERS, GuardCounter::Refused as u32);
        REFUSE
    }
}

/// `dest` as its packet will carry it.
fn as_sent(dest: &Dest) -> Audited {
    let mut a = Audited {
        addr: dest.addr,
        port: dest.port,
        protocol: dest.protocol,
        family: dest.family as u8,
    };
    if a.family == 6 && a.addr[0] == 0 && a.addr[1] == 0 && a.addr[2] == MAPPED_PREFIX {
        a.addr = [a.addr[3], 0, 0, 0];
        a.family = 4;
    }
    if a.addr[0] == 0 && a.addr[1] == 0 && a.addr[2] == 0 && a.addr[3] == 0 {
        // 0.0.0.0, ::, ::ffff:0.0.0.0: the kernel picks a local address.
        a.family = 0;
    }
    a
}

fn remember_audited(cookie: u64, dest: &Dest) {
    let _ = AUDITED_CALLS.insert(&cookie, &as_sent(dest), 0);
}

/// Whether the packet to `dest` of the socket with `cookie` is one a hook
/// already audited (so it is not counted twice).
fn already_audited(cookie: u64, dest: &Dest) -> bool {
    // SAFETY: the value is copied out at once.
    let Some(seen) = (unsafe { AUDITED_CALLS.get(&cookie) }) else {
        return false;
    };
    let sent = as_sent(dest);
    if seen.port != sent.port || seen.protocol != sent.protocol {
        return false;
    }
    // A wildcard call lands on a local address, which the egress program
    // judges by port.
    seen.family == 0
        || (seen.family == sent.family
            && seen.addr[0] == sent.addr[0]
            && seen.addr[1] == sent.addr[1]
            && seen.addr[2] == sent.addr[2]
            && seen.addr[3] == sent.addr[3])
}

/// Adds the attempt to its source's tally (or, when the tally is full,
/// to the untallied count).
fn tally(cgroup: u64, uid: u32, dest: &Dest) {
    let key = LocalSourceKey {
        cgroup,
        uid,
        _pad: 0,
    };
    let now = now_ns();
    for _ in 0..2 {
        if let Some(t) = LOCAL_TALLIES.get_ptr_mut(&key) {
            // SAFETY: this CPU's value, from the lookup, valid for the
            // program's run; per-CPU values have no concurrent writer.
            unsafe {
                (*t).attempts += 1;
                (*t).last_ns = now;
                (*t).addr = dest.addr;
                (*t).port = dest.port;
                (*t).protocol = dest.protocol;
                (*t).family = dest.family as u8;
            }
            return;
        }
        // Built in a per-CPU scratch slot, not on the stack.
        let Some(fresh) = TALLY_SCRATCH.get_ptr_mut(0) else {
            break;
        };
        // SAFETY: this CPU's scratch slot, valid for the program's run,
        // no concurrent writer.
        let fresh = unsafe {
            *fresh = LocalTally {
                attempts: 1,
                first_ns: now,
                last_ns: now,
                addr: dest.addr,
                port: dest.port,
                protocol: dest.protocol,
                family: dest.family as u8,
                _pad: 0,
            };
            &*fresh
        };
        if LOCAL_TALLIES
            .insert(&key, fresh, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return;
        }
        // Another CPU put the key in first (then it is there now), or
        // the tally is full.
    }
    bump(&TALLY_UNTALLIED, 0);
}

/// Sends a bypass event unless this CPU already sent its share this second.
fn report(who: &Who, dest: &Dest, audited: bool, layer: u8, source: Source) {
    if !within_budget(&EVENT_BUDGET) {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<BypassEvent>(0) else {
        return;
    };
    // Field by field into the ring buffer: a whole event built on the
    // stack first would not fit beside the callers' frames.
    let e = entry.as_mut_ptr();
    // SAFETY: e points at a reserved entry of the event's size, ours until
    // submitted; every field is written before it is.
    unsafe {
        (*e).pid = who.pid;
        (*e).uid = who.uid;
        (*e).cgroup = who.cgroup;
        (*e).addr = dest.addr;
        (*e).family = dest.family;
        (*e).port = dest.port;
        (*e).audited = audited as u8;
        (*e).protocol = dest.protocol;
        (*e).layer = layer;
        (*e)._pad = 0;
        (*e).comm = who.comm;
        (*e).source = source.addr;
        (*e).source_port = source.port;
        (*e)._pad2 = [0; 6];
    }
    entry.submit(0);
}

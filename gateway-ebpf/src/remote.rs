//! The remote guard's maps and judgement, shared by its two layers (the TC
//! classifier and the socket-level `cgroup_skb/ingress` program): a packet
//! to a protected port, or one whose ports could not be read, passes only
//! from an allowed (gateway) source.

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, PerCpuHashMap, RingBuf, lpm_trie::Key},
};
use gateway_common::{
    IngressConfig, IngressCounter, IngressEvent, LinkKind, MAX_ALLOWED_SOURCES, MAX_INTERFACES,
    MAX_PORT_RULES, MAX_TALLIED_SOURCES, SourceKey, SourceTally, enforcement, layer, reason,
};

use crate::budget::{bump, now_ns, within_budget};

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

/// Per layer, [`IngressCounter::COUNT`] counters.
#[map]
static INGRESS_COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(IngressCounter::COUNT * layer::COUNT, 0);

/// Drops (and audited would-be drops) per port rule.
#[map]
static INGRESS_RULE_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_PORT_RULES, 0);

#[map]
static INGRESS_EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

#[map]
static INGRESS_EVENT_BUDGET: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// The interfaces the TC layer is attached to (by ifindex) and where their
/// network header starts.
#[map]
pub static INGRESS_LINKS: HashMap<u32, LinkKind> =
    HashMap::with_max_entries(MAX_INTERFACES, BPF_F_NO_PREALLOC);

/// Every bypass attempt, tallied per (source, port) and CPU: userspace
/// takes and logs the tallies, so each source is named even when a flood
/// of others used up the event budget. Not an LRU: the first sources of a
/// summary period stay (a flood of spoofed ones cannot push out a real one
/// already seen), and attempts that find it full are counted in
/// INGRESS_UNTALLIED.
#[map]
static INGRESS_TALLIES: PerCpuHashMap<SourceKey, SourceTally> =
    PerCpuHashMap::with_max_entries(MAX_TALLIED_SOURCES, 0);

/// Attempts whose source found the tallies full.
#[map]
static INGRESS_UNTALLIED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// What a layer hands to the judgement.
pub enum Verdict {
    Pass,
    Drop,
}

/// A packet to judge: where it came from and was going.
pub struct Flow {
    pub layer: u8,
    /// 4 or 6 (0 when not even the IP header could be read).
    pub family: u8,
    pub protocol: u8,
    /// Its ports could not be read: judged as if it went to a protected port.
    pub unparsable: bool,
    /// Opens something: a UDP datagram, a TCP SYN, a packet to a listener,
    /// or an unparsable one. Only these become events, so an audited
    /// connection logs once, not per packet.
    pub opens: bool,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub ifindex: u32,
}

impl Flow {
    pub const fn new(layer: u8, ifindex: u32) -> Flow {
        Flow {
            layer,
            family: 0,
            protocol: 0,
            unparsable: true,
            opens: true,
            src: [0; 4],
            dst: [0; 4],
            src_port: 0,
            dst_port: 0,
            ifindex,
        }
    }
}

/// The port rule (its id) protecting `port`, if any.
pub fn port_rule(protocol: u8, port: u16) -> Option<u32> {
    let ports = match protocol {
        IPPROTO_TCP => &INGRESS_TCP_PORTS,
        IPPROTO_UDP => &INGRESS_UDP_PORTS,
        _ => return None,
    };
    match ports.get(u32::from(port)) {
        Some(r) if *r != 0 => Some(*r - 1),
        _ => None,
    }
}

fn count(layer: u8, counter: IngressCounter) {
    bump(&INGRESS_COUNTERS, counter.index(layer));
}

/// `judge`'s rule for a packet that matched none (an unparsable one).
/// A plain sentinel, not an Option: the verifier rejects a callee that
/// reads the payload register of a None the caller never set.
pub const NO_RULE: u32 = u32::MAX;

/// A packet to a protected port (`rule`), or an unparsable one: an allowed
/// source passes, anyone else is dropped (or, in audit, passed), counted,
/// tallied and reported.
pub fn judge(flow: &Flow, rule: u32) -> Verdict {
    count(flow.layer, IngressCounter::Protected);
    if flow.unparsable {
        count(flow.layer, IngressCounter::Unparsable);
    }
    if source_allowed(flow) {
        count(flow.layer, IngressCounter::Allowed);
        return Verdict::Pass;
    }
    if rule != NO_RULE {
        bump(&INGRESS_RULE_DROPS, rule);
    }
    // No config yet: drop rather than guess (fail closed).
    let audited = INGRESS_CONFIG
        .get(0)
        .is_some_and(|c| c.enforcement == enforcement::AUDIT);
    let new_source = tally(flow);
    if flow.opens || new_source {
        report(flow, audited);
    }
    if audited {
        count(flow.layer, IngressCounter::Audited);
        Verdict::Pass
    } else {
        count(flow.layer, IngressCounter::Dropped);
        Verdict::Drop
    }
}

fn source_allowed(flow: &Flow) -> bool {
    match flow.family {
        4 => {
            let key = Key::new(32, flow.src[0].to_ne_bytes());
            INGRESS_ALLOW_V4.get(&key).is_some()
        }
        6 => {
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
        // Not even the source could be read.
        _ => false,
    }
}

/// Adds the attempt to its source's tally (or, when the tally is full, to
/// the untallied count); true when the source is new.
fn tally(flow: &Flow) -> bool {
    let key = SourceKey {
        addr: flow.src,
        port: flow.dst_port,
        family: flow.family,
        protocol: flow.protocol,
    };
    let now = now_ns();
    for _ in 0..2 {
        if let Some(t) = INGRESS_TALLIES.get_ptr_mut(&key) {
            // SAFETY: this CPU's value, from the lookup, valid for the
            // program's run; per-CPU values have no concurrent writer.
            unsafe {
                (*t).attempts += 1;
                (*t).last_ns = now;
            }
            return false;
        }
        let fresh = SourceTally {
            attempts: 1,
            first_ns: now,
            last_ns: now,
        };
        if INGRESS_TALLIES
            .insert(&key, &fresh, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return true;
        }
    }
    bump(&INGRESS_UNTALLIED, 0);
    // Not named in any summary: at least the event (within its budget).
    true
}

/// Sends a bypass event unless this CPU already sent its share this second.
fn report(flow: &Flow, audited: bool) {
    if !within_budget(&INGRESS_EVENT_BUDGET) {
        return;
    }
    let Some(mut entry) = INGRESS_EVENTS.reserve::<IngressEvent>(0) else {
        return;
    };
    entry.write(IngressEvent {
        src: flow.src,
        dst: flow.dst,
        ifindex: flow.ifindex,
        src_port: flow.src_port,
        dst_port: flow.dst_port,
        family: flow.family,
        protocol: flow.protocol,
        audited: audited as u8,
        layer: flow.layer,
        reason: if flow.unparsable {
            reason::UNPARSABLE
        } else {
            reason::PROTECTED_PORT
        },
        _pad: [0; 3],
    });
    entry.submit(0);
}

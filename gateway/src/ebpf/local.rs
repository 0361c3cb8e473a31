//! The local guard: `connect4`/`connect6`/`sendmsg4`/`sendmsg6`,
//! `local_egress` (TCP SYNs, UDP datagrams and raw sockets' packets by their
//! final, after-NAT headers) and `local_ingress` (packets that reach a
//! local backend's socket from outside this host's sockets) on a cgroup v2
//! subtree refuse to let anyone but the gateway's own cgroup reach a
//! protected backend.
//!
//! A backend on this host is protected on every local address by default:
//! a server listening on all addresses answers on 127.0.0.2, on the host's
//! own addresses, on `[::1]` and under the wildcard address (which the
//! kernel turns into loopback only after the hook ran), so its port is
//! judged on all of them. The host's addresses are data the caller keeps
//! current (the gateway follows rtnetlink). IPv4-mapped IPv6 addresses are
//! judged as the IPv4 address they are.
//!
//! Maps change in place, all or nothing: an update is planned whole and
//! checked before the first write; a write that fails puts back every one
//! before it. New entries go in before stale ones come out, so there is no
//! gap. Programs stay attached.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;

use aya::Ebpf;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap as AyaHashMap, MapData};
use aya::programs::links::{FdLink, LinkError};
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr};
use gateway_common::{
    ANY_UID, BackendV4, BackendV6, BypassEvent, EVERY_LOCAL_ADDRESS, GuardConfig, GuardCounter,
    LocalPort, LocalSourceKey, LocalTally, MAX_LOCAL_ADDRESSES, MAX_PROTECTED_PORTS, MAX_RULES,
    enforcement, local_layer,
};

use super::{
    EbpfError, Enforcement, Events, HeldLink, PinDirLock, Protected, Protocol, Target,
    attached_programs, loader_with_pins, lock_pin_dir, object, per_cpu_sum, program_mut,
    remove_obsolete_pins, take_tallies,
};

/// What the local guard protects, and for whom.
#[derive(Debug, Clone)]
pub struct GuardSpec {
    /// Backends only the gateway may connect (or, UDP, send) to.
    pub protected: Vec<Protected>,
    /// The gateway's own cgroup v2 directory: connects from it pass.
    pub gateway_cgroup: PathBuf,
    /// When set, connects from the gateway's cgroup pass only with this uid
    /// too (another service started into that cgroup by mistake does not).
    pub gateway_uid: Option<u32>,
    pub enforcement: Enforcement,
    /// Where maps and links are pinned in bpffs, so protection survives the
    /// gateway's exit and a restart takes over the same maps. None: the
    /// programs detach when the guard is dropped.
    pub pin_dir: Option<PathBuf>,
    /// What this host's local routing table delivers here, as prefixes
    /// (its addresses, subnet broadcast and anycast addresses, AnyIP
    /// routes): a backend at one of them is on this host, and each is a way
    /// to reach such a backend. Loopback is always this host.
    pub local_addresses: Vec<IpNet>,
    /// A backend on this host is protected on every local address. False:
    /// only on the address named (and the wildcard and broadcast addresses,
    /// which can land on it).
    pub every_local_address: bool,
}

/// The id the kernel gives a cgroup v2 directory (its inode number), as
/// `bpf_get_current_cgroup_id` returns it.
pub fn cgroup_id(dir: &Path) -> Result<u64, EbpfError> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(dir)
        .map(|m| m.ino())
        .map_err(|source| EbpfError::Cgroup {
            path: dir.to_owned(),
            source,
        })
}

/// Counters the guard keeps, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuardCounters {
    pub seen: u64,
    /// Connects to protected backends from the gateway.
    pub allowed: u64,
    /// Bypass attempts refused with EPERM.
    pub refused: u64,
    /// Bypass attempts let through in audit.
    pub audited: u64,
}

/// The local guard's programs and maps, attached to a cgroup subtree.
/// Unpinned, detached when dropped.
pub struct LocalGuard {
    ebpf: Ebpf,
    /// What the protected-backend maps hold: the rule id (within its
    /// family) of every protected port.
    entries: HashMap<Target, u32>,
    /// Rule ids, stable across updates while a rule stays.
    rule_ids: HashMap<Protected, u32>,
    /// What the local-port map holds: counter index (and flag) per port.
    local_ports: HashMap<(Protocol, u16), u32>,
    /// What the local-address tries hold.
    local_addresses: HashSet<IpNet>,
    /// Entries a previous version left with a key this one does not read:
    /// removed by the first update, after the new ones are in.
    foreign_v4: Vec<BackendV4>,
    foreign_v6: Vec<BackendV6>,
    /// The cgroup subtree the programs are attached to.
    attach_to: PathBuf,
    pin_dir: Option<PathBuf>,
    /// Pinned: each program's link, held open while the guard runs.
    held: HashMap<&'static str, HeldLink>,
    /// Bound to 127.0.0.1 in the gateway's network namespace, where the
    /// ingress program's lookup finds it (NETNS_MARK): held as long as
    /// the guard.
    netns_mark: std::net::UdpSocket,
    _lock: Option<PinDirLock>,
}

/// What [`LocalGuard::check_attachment`] found wrong and put right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    /// The program was no longer attached: attached again.
    Reattached(&'static str),
    /// Its link's pin was gone or replaced: pinned again.
    Repinned(&'static str),
}

impl std::fmt::Display for Repair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Repair::Reattached(p) => write!(f, "program {p} was detached; attached again"),
            Repair::Repinned(p) => {
                write!(f, "the pin of program {p}'s link was removed; pinned again")
            }
        }
    }
}

/// Where a program attaches.
#[derive(Debug, Clone, Copy)]
enum Hook {
    SockAddr,
    Skb(CgroupSkbAttachType),
}

/// The programs, their hook, and the `bpf_attach_type` BPF_PROG_QUERY
/// lists them under.
const PROGRAMS: [(&str, Hook, u32); 6] = [
    ("connect4", Hook::SockAddr, 10),
    ("connect6", Hook::SockAddr, 11),
    ("sendmsg4", Hook::SockAddr, 14),
    ("sendmsg6", Hook::SockAddr, 15),
    (EGRESS, Hook::Skb(CgroupSkbAttachType::Egress), 1),
    (INGRESS, Hook::Skb(CgroupSkbAttachType::Ingress), 0),
];
const EGRESS: &str = "local_egress";
const INGRESS: &str = "local_ingress";
/// Link pins of programs earlier versions attached and this one replaces:
/// let go once the new links are in, so there is no gap.
const OBSOLETE_LINKS: [&str; 1] = ["raw_egress"];
const MAPS: [&str; 12] = [
    "GUARD_COUNTERS",
    "GUARD_CONFIG",
    "PROTECTED_V4",
    "PROTECTED_V6",
    "LOCAL_PORTS",
    "LOCAL_V4",
    "LOCAL_V6",
    "RULE_REFUSALS",
    "EVENTS",
    "EVENT_BUDGET",
    "LOCAL_TALLIES",
    "TALLY_UNTALLIED",
];
/// Pinned maps of earlier versions this one replaced.
const OBSOLETE_MAPS: [&str; 1] = ["LOCAL_SOURCES"];

/// One map write of an update (and, returned by `apply`, its undo).
#[derive(Debug, Clone, Copy)]
enum Write {
    V4(BackendV4, Option<u32>),
    V6(BackendV6, Option<u32>),
    Port(LocalPort, Option<u32>),
    Address(IpNet, bool),
    Config(GuardConfig),
}

impl LocalGuard {
    /// Loads the programs, fills the maps, then attaches to `attach_to`, so
    /// protection starts complete (no connect sees half a rule set).
    pub fn install(attach_to: &Path, spec: &GuardSpec) -> Result<Self, EbpfError> {
        if object().is_empty() {
            return Err(EbpfError::NotBuilt);
        }
        let mut loader = loader_with_pins(spec.pin_dir.as_deref(), &MAPS)?;
        let lock = spec.pin_dir.as_deref().map(lock_pin_dir).transpose()?;
        let netns_mark = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0))
            .map_err(EbpfError::NetnsMark)?;
        let mut guard = Self {
            ebpf: loader.load(object())?,
            entries: HashMap::new(),
            rule_ids: HashMap::new(),
            local_ports: HashMap::new(),
            local_addresses: HashSet::new(),
            foreign_v4: Vec::new(),
            foreign_v6: Vec::new(),
            attach_to: attach_to.to_owned(),
            pin_dir: spec.pin_dir.clone(),
            held: HashMap::new(),
            netns_mark,
            _lock: lock,
        };
        guard.setnetns_mark()?;
        guard.adopt_existing_rules()?;
        guard.update(spec)?;
        for (name, hook, _) in PROGRAMS {
            let failed = |source| EbpfError::Program { name, source };
            match hook {
                Hook::SockAddr => program_mut::<CgroupSockAddr>(&mut guard.ebpf, name)?
                    .load()
                    .map_err(failed)?,
                Hook::Skb(_) => program_mut::<CgroupSkb>(&mut guard.ebpf, name)?
                    .load()
                    .map_err(failed)?,
            }
        }
        for (name, hook, _) in PROGRAMS {
            guard.attach(name, hook)?;
        }
        if let Some(pin_dir) = &spec.pin_dir {
            for name in OBSOLETE_LINKS {
                remove_links(pin_dir, name, None);
            }
        }
        remove_obsolete_pins(spec.pin_dir.as_deref(), &OBSOLETE_MAPS);
        Ok(guard)
    }

    /// Tells the ingress program which network namespace is the
    /// gateway's: the one where its marker socket's port is bound (set
    /// before the programs are attached).
    fn setnetns_mark(&mut self) -> Result<(), EbpfError> {
        let port = self
            .netns_mark
            .local_addr()
            .map_err(EbpfError::NetnsMark)?
            .port();
        let name = "NETNS_MARK";
        let mut array: Array<_, u16> = typed_mut(&mut self.ebpf, name)?;
        array
            .set(0, port.to_be(), 0)
            .map_err(|source| EbpfError::MapWrite { name, source })
    }

    /// Attaches program `name` to the subtree; pinned, pins its link and
    /// holds it, then lets go of any a previous gateway pinned for it: both
    /// judge in between, so there is no gap.
    fn attach(&mut self, name: &'static str, hook: Hook) -> Result<(), EbpfError> {
        let failed = |source| EbpfError::Program { name, source };
        let cgroup = open_cgroup(&self.attach_to)?;
        let pinned = self.pin_dir.is_some();
        // Single: on kernels with BPF links (5.7+) aya attaches by link,
        // which never displaces other programs and refuses ALLOW_MULTI.
        let link: Option<Result<FdLink, LinkError>> = match hook {
            Hook::SockAddr => {
                let program: &mut CgroupSockAddr = program_mut(&mut self.ebpf, name)?;
                let id = program
                    .attach(cgroup, CgroupAttachMode::Single)
                    .map_err(failed)?;
                pinned
                    .then(|| program.take_link(id).map(TryInto::try_into))
                    .transpose()
                    .map_err(failed)?
            }
            Hook::Skb(kind) => {
                let program: &mut CgroupSkb = program_mut(&mut self.ebpf, name)?;
                let id = program
                    .attach(cgroup, kind, CgroupAttachMode::Single)
                    .map_err(failed)?;
                pinned
                    .then(|| program.take_link(id).map(TryInto::try_into))
                    .transpose()
                    .map_err(failed)?
            }
        };
        if let (Some(link), Some(pin_dir)) = (link, &self.pin_dir) {
            let link = link.map_err(|e| EbpfError::Pin {
                path: pin_dir.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
            let path = pin_dir.join(format!("link-{name}-{}", std::process::id()));
            let held = HeldLink::pin(link, path)?;
            remove_links(pin_dir, name, Some(&held.path));
            self.held.insert(name, held);
        }
        Ok(())
    }

    /// Looks whether every program is still attached and, pinned, every
    /// link still pinned; puts right what is not and says what it did.
    pub fn check_attachment(&mut self) -> Result<Vec<Repair>, EbpfError> {
        let mut repairs = Vec::new();
        for (name, hook, attach_type) in PROGRAMS {
            let ours = self
                .ebpf
                .program(name)
                .ok_or(EbpfError::MissingProgram(name))?
                .info()
                .map_err(|source| EbpfError::Program { name, source })?
                .id();
            if !attached_programs(&self.attach_to, attach_type)?.contains(&ours) {
                self.attach(name, hook)?;
                repairs.push(Repair::Reattached(name));
                continue;
            }
            if let Some(held) = self.held.get_mut(name)
                && held.check()?
            {
                repairs.push(Repair::Repinned(name));
            }
        }
        Ok(repairs)
    }

    /// Takes over what a previous gateway left in pinned maps, so stale
    /// entries are removed by the next update rather than lingering.
    fn adopt_existing_rules(&mut self) -> Result<(), EbpfError> {
        let (mut foreign_v4, mut foreign_v6) = (Vec::new(), Vec::new());
        let v4: AyaHashMap<_, BackendV4, u32> = typed(&self.ebpf, "PROTECTED_V4")?;
        for item in v4.iter() {
            let (k, id) = item.map_err(|source| EbpfError::Map {
                name: "PROTECTED_V4",
                source,
            })?;
            let ip = std::net::Ipv4Addr::from(k.addr.to_ne_bytes());
            match Protocol::from_number(k.protocol) {
                Some(protocol) => {
                    let addr = SocketAddr::from((ip, u16::from_be(k.port)));
                    self.entries.insert(Target { protocol, addr }, id);
                }
                None => foreign_v4.push(k),
            }
        }
        let v6: AyaHashMap<_, BackendV6, u32> = typed(&self.ebpf, "PROTECTED_V6")?;
        for item in v6.iter() {
            let (k, id) = item.map_err(|source| EbpfError::Map {
                name: "PROTECTED_V6",
                source,
            })?;
            let addr = SocketAddr::from((words_to_v6(k.addr), u16::from_be(k.port)));
            match Protocol::from_number(k.protocol) {
                Some(protocol) => {
                    self.entries.insert(Target { protocol, addr }, id);
                }
                None => foreign_v6.push(k),
            }
        }
        let ports: AyaHashMap<_, LocalPort, u32> = typed(&self.ebpf, "LOCAL_PORTS")?;
        for item in ports.iter() {
            let (k, value) = item.map_err(|source| EbpfError::Map {
                name: "LOCAL_PORTS",
                source,
            })?;
            if let Some(protocol) = Protocol::from_number(k.protocol) {
                self.local_ports
                    .insert((protocol, u16::from_be(k.port)), value);
            }
        }
        let v4: LpmTrie<_, [u8; 4], u8> = typed(&self.ebpf, "LOCAL_V4")?;
        for key in v4.keys() {
            let key = key.map_err(|source| EbpfError::Map {
                name: "LOCAL_V4",
                source,
            })?;
            self.local_addresses
                .extend(prefix(key.data(), key.prefix_len()));
        }
        let v6: LpmTrie<_, [u8; 16], u8> = typed(&self.ebpf, "LOCAL_V6")?;
        for key in v6.keys() {
            let key = key.map_err(|source| EbpfError::Map {
                name: "LOCAL_V6",
                source,
            })?;
            self.local_addresses
                .extend(prefix(key.data(), key.prefix_len()));
        }
        self.foreign_v4 = foreign_v4;
        self.foreign_v6 = foreign_v6;
        Ok(())
    }

    /// Changes the protected set and settings in place, programs attached:
    /// new entries go in before stale ones come out, so there is no gap.
    /// All or nothing: everything is worked out and checked before the
    /// first write, and a failed write puts back every one before it.
    pub fn update(&mut self, spec: &GuardSpec) -> Result<(), EbpfError> {
        let config = GuardConfig {
            gateway_cgroup: cgroup_id(&spec.gateway_cgroup)?,
            enforcement: match spec.enforcement {
                Enforcement::Enforce => enforcement::ENFORCE,
                Enforcement::Audit => enforcement::AUDIT,
            },
            gateway_uid: spec.gateway_uid.unwrap_or(ANY_UID),
        };
        let mut rules: Vec<Protected> = spec.protected.clone();
        rules.sort();
        rules.dedup();
        for v6 in [false, true] {
            let family = rules.iter().filter(|r| r.ip.is_ipv6() == v6);
            if family.clone().count() > MAX_RULES as usize {
                return Err(EbpfError::TooManyRules(MAX_RULES));
            }
            if family.map(|r| r.ports()).sum::<usize>() > MAX_PROTECTED_PORTS as usize {
                return Err(EbpfError::TooManyRules(MAX_PROTECTED_PORTS));
            }
        }
        // Loopback is judged without a lookup.
        let loopback: [IpNet; 2] = [
            IpNet::V4(ipnet::Ipv4Net::new_assert(
                std::net::Ipv4Addr::new(127, 0, 0, 0),
                8,
            )),
            IpNet::from(IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
        ];
        let addresses: HashSet<IpNet> = spec
            .local_addresses
            .iter()
            .map(IpNet::trunc)
            .filter(|n| !loopback.iter().any(|l| l.contains(n)))
            .collect();
        for v6 in [false, true] {
            let during = addresses
                .union(&self.local_addresses)
                .filter(|a| a.addr().is_ipv6() == v6)
                .count();
            if during > MAX_LOCAL_ADDRESSES as usize {
                return Err(EbpfError::TooManyRules(MAX_LOCAL_ADDRESSES));
            }
        }
        let ids = self.rule_ids_for(&rules)?;
        let mut wanted: HashMap<Target, u32> = HashMap::new();
        let mut ports: HashMap<(Protocol, u16), u32> = HashMap::new();
        let flag = if spec.every_local_address {
            EVERY_LOCAL_ADDRESS
        } else {
            0
        };
        for rule in &rules {
            // rule_ids_for gave every rule an id; one without is a bug, and
            // an update that cannot say which rule it is refused whole.
            let Some(&id) = ids.get(rule) else {
                return Err(EbpfError::Unchangeable(format!("no rule id for {rule}")));
            };
            let ip = rule.ip.to_canonical();
            let local = ip.is_loopback()
                || ip.is_unspecified()
                || addresses.iter().any(|n| n.contains(&ip));
            let counter = if rule.ip.is_ipv4() {
                id
            } else {
                id + MAX_RULES
            };
            for target in rule.targets() {
                wanted.insert(target, id);
                if local {
                    let slot = ports
                        .entry((rule.protocol, target.addr.port()))
                        .or_insert(counter | flag);
                    // The lowest counter wins, so the choice is stable.
                    *slot = (*slot & !EVERY_LOCAL_ADDRESS).min(counter) | flag;
                }
            }
        }
        if ports.len() > MAX_PROTECTED_PORTS as usize {
            return Err(EbpfError::TooManyRules(MAX_PROTECTED_PORTS));
        }

        let mut plan = Vec::new();
        for (target, id) in &wanted {
            if self.entries.get(target) != Some(id) {
                plan.push(backend_write(*target, Some(*id)));
            }
        }
        for (&(protocol, port), &value) in &ports {
            if self.local_ports.get(&(protocol, port)) != Some(&value) {
                plan.push(Write::Port(local_port(protocol, port), Some(value)));
            }
        }
        for a in addresses.difference(&self.local_addresses) {
            plan.push(Write::Address(*a, true));
        }
        plan.push(Write::Config(config));
        for target in self.entries.keys().filter(|t| !wanted.contains_key(t)) {
            plan.push(backend_write(*target, None));
        }
        for &(protocol, port) in self.local_ports.keys().filter(|k| !ports.contains_key(k)) {
            plan.push(Write::Port(local_port(protocol, port), None));
        }
        for a in self.local_addresses.difference(&addresses) {
            plan.push(Write::Address(*a, false));
        }
        let mut undo = Vec::new();
        for write in plan {
            match self.apply(write) {
                Ok(previous) => undo.push(previous),
                Err(e) => {
                    for previous in undo.into_iter().rev() {
                        if let Err(again) = self.apply(previous) {
                            tracing::error!(error = %again, "guard: putting back a map entry after a failed update");
                        }
                    }
                    return Err(e);
                }
            }
        }
        self.entries = wanted;
        self.local_ports = ports;
        self.local_addresses = addresses;
        self.rule_ids = ids;
        for key in std::mem::take(&mut self.foreign_v4) {
            let _ = self.hash_map::<BackendV4>("PROTECTED_V4")?.remove(&key);
        }
        for key in std::mem::take(&mut self.foreign_v6) {
            let _ = self.hash_map::<BackendV6>("PROTECTED_V6")?.remove(&key);
        }
        Ok(())
    }

    /// A rule keeps its id (and so its counter) while it stays; a new one
    /// takes over the id its ports had, else the lowest free one. Two
    /// passes, so a new rule never takes an id a staying one keeps.
    fn rule_ids_for(&self, rules: &[Protected]) -> Result<HashMap<Protected, u32>, EbpfError> {
        let mut ids: HashMap<Protected, u32> = HashMap::new();
        let mut taken: HashSet<(bool, u32)> = HashSet::new();
        for rule in rules {
            let v6 = rule.ip.is_ipv6();
            let previous = self
                .rule_ids
                .get(rule)
                .or_else(|| rule.targets().find_map(|t| self.entries.get(&t)))
                .copied();
            if let Some(id) = previous
                && taken.insert((v6, id))
            {
                ids.insert(*rule, id);
            }
        }
        for rule in rules {
            let v6 = rule.ip.is_ipv6();
            if !ids.contains_key(rule) {
                let id = (0..MAX_RULES)
                    .find(|id| !taken.contains(&(v6, *id)))
                    .ok_or(EbpfError::TooManyRules(MAX_RULES))?;
                taken.insert((v6, id));
                ids.insert(*rule, id);
            }
        }
        Ok(ids)
    }

    /// Makes one write; returns the write that undoes it.
    fn apply(&mut self, write: Write) -> Result<Write, EbpfError> {
        match write {
            Write::V4(key, value) => {
                let name = "PROTECTED_V4";
                let mut map = self.hash_map::<BackendV4>(name)?;
                let previous = map.get(&key, 0).ok();
                set_or_remove(&mut map, &key, value)
                    .map_err(|source| EbpfError::MapWrite { name, source })?;
                Ok(Write::V4(key, previous))
            }
            Write::V6(key, value) => {
                let name = "PROTECTED_V6";
                let mut map = self.hash_map::<BackendV6>(name)?;
                let previous = map.get(&key, 0).ok();
                set_or_remove(&mut map, &key, value)
                    .map_err(|source| EbpfError::MapWrite { name, source })?;
                Ok(Write::V6(key, previous))
            }
            Write::Port(key, value) => {
                let name = "LOCAL_PORTS";
                let mut map = self.hash_map::<LocalPort>(name)?;
                let previous = map.get(&key, 0).ok();
                set_or_remove(&mut map, &key, value)
                    .map_err(|source| EbpfError::MapWrite { name, source })?;
                Ok(Write::Port(key, previous))
            }
            Write::Address(net, add) => {
                let prefix = u32::from(net.prefix_len());
                match net.addr() {
                    IpAddr::V4(a) => {
                        let name = "LOCAL_V4";
                        let mut trie: LpmTrie<_, [u8; 4], u8> = typed_mut(&mut self.ebpf, name)?;
                        let key = Key::new(prefix, a.octets());
                        if add {
                            trie.insert(&key, 1, 0)
                        } else {
                            trie.remove(&key)
                        }
                        .map_err(|source| EbpfError::MapWrite { name, source })?;
                    }
                    IpAddr::V6(a) => {
                        let name = "LOCAL_V6";
                        let mut trie: LpmTrie<_, [u8; 16], u8> = typed_mut(&mut self.ebpf, name)?;
                        let key = Key::new(prefix, a.octets());
                        if add {
                            trie.insert(&key, 1, 0)
                        } else {
                            trie.remove(&key)
                        }
                        .map_err(|source| EbpfError::MapWrite { name, source })?;
                    }
                }
                Ok(Write::Address(net, !add))
            }
            Write::Config(config) => {
                let name = "GUARD_CONFIG";
                let mut array: Array<_, GuardConfig> = typed_mut(&mut self.ebpf, name)?;
                let previous = array.get(&0, 0).unwrap_or_default();
                array
                    .set(0, config, 0)
                    .map_err(|source| EbpfError::MapWrite { name, source })?;
                Ok(Write::Config(previous))
            }
        }
    }

    fn hash_map<K: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<AyaHashMap<&mut MapData, K, u32>, EbpfError> {
        typed_mut(&mut self.ebpf, name)
    }

    /// Whether a connection to `peer` reaches a protected backend, judged
    /// as the programs judge a connect to it now (for connections that were
    /// made before: a peer is never the wildcard).
    pub fn protects(&self, protocol: Protocol, peer: SocketAddr) -> bool {
        let ip = peer.ip().to_canonical();
        let peer = SocketAddr::new(ip, peer.port());
        if self.entries.contains_key(&Target {
            protocol,
            addr: peer,
        }) {
            return true;
        }
        let anywhere_here = match ip {
            IpAddr::V4(a) => a.is_broadcast() || a.is_multicast(),
            IpAddr::V6(a) => a.is_multicast(),
        };
        let local = ip.is_loopback() || self.local_addresses.iter().any(|n| n.contains(&ip));
        self.local_ports
            .get(&(protocol, peer.port()))
            .is_some_and(|v| anywhere_here || (local && v & EVERY_LOCAL_ADDRESS != 0))
    }

    pub fn counters(&self) -> Result<GuardCounters, EbpfError> {
        let sum = |c: GuardCounter| per_cpu_sum(&self.ebpf, "GUARD_COUNTERS", c as u32);
        Ok(GuardCounters {
            seen: sum(GuardCounter::Seen)?,
            allowed: sum(GuardCounter::Allowed)?,
            refused: sum(GuardCounter::Refused)?,
            audited: sum(GuardCounter::Audited)?,
        })
    }

    /// Every source tallied since the last call (pinned: also while no
    /// gateway ran), busiest first, and the tallies emptied.
    pub fn take_tallies(&mut self) -> Result<Vec<LocalAttempts>, EbpfError> {
        let mut out: Vec<LocalAttempts> =
            take_tallies::<LocalSourceKey, LocalTally>(&mut self.ebpf, "LOCAL_TALLIES")?
                .into_iter()
                .filter_map(|(key, per_cpu)| {
                    let attempts: u64 = per_cpu.iter().map(|t| t.attempts).sum();
                    let last = per_cpu
                        .iter()
                        .filter(|t| t.attempts > 0)
                        .max_by_key(|t| t.last_ns)?;
                    let port = u16::from_be(last.port);
                    let destination = if last.family == 4 {
                        SocketAddr::from((
                            std::net::Ipv4Addr::from(last.addr[0].to_ne_bytes()),
                            port,
                        ))
                    } else {
                        SocketAddr::from((words_to_v6(last.addr), port))
                    };
                    Some(LocalAttempts {
                        cgroup: key.cgroup,
                        uid: key.uid,
                        destination,
                        protocol: Protocol::from_number(last.protocol).unwrap_or(Protocol::Tcp),
                        attempts,
                    })
                })
                .collect();
        out.sort_by(|a, b| {
            b.attempts
                .cmp(&a.attempts)
                .then((a.cgroup, a.uid).cmp(&(b.cgroup, b.uid)))
        });
        Ok(out)
    }

    /// Attempts, ever, whose source found the tallies full (a flood of
    /// distinct sources): counted, but in no summary.
    pub fn untallied(&self) -> Result<u64, EbpfError> {
        per_cpu_sum(&self.ebpf, "TALLY_UNTALLIED", 0)
    }

    /// How often the kernel ran each program and for how long, as
    /// (program, runs, time). Counted only while BPF run-time statistics
    /// are on (`sysctl kernel.bpf_stats_enabled=1`); zero otherwise.
    pub fn program_stats(&self) -> Vec<(&'static str, u64, std::time::Duration)> {
        PROGRAMS
            .iter()
            .filter_map(|(name, _, _)| {
                let info = self.ebpf.program(name)?.info().ok()?;
                Some((*name, info.run_count(), info.run_time()))
            })
            .collect()
    }

    /// The bypass events (once; later calls fail). Needs a tokio runtime.
    pub fn take_events(&mut self) -> Result<Events<BypassAttempt>, EbpfError> {
        Events::take(&mut self.ebpf, "EVENTS", parse_event)
    }

    /// Bypass attempts (refused or audited) against the rule that protects
    /// one TCP backend.
    pub fn attempts(&self, backend: SocketAddr) -> Result<u64, EbpfError> {
        self.attempts_on(Target {
            protocol: Protocol::Tcp,
            addr: backend,
        })
    }

    /// Bypass attempts against the rule that protects `target` (a rule
    /// covering a range counts the whole range).
    pub fn attempts_on(&self, target: Target) -> Result<u64, EbpfError> {
        let Some(id) = self.entries.get(&target) else {
            return Ok(0);
        };
        let index = if target.addr.is_ipv4() {
            *id
        } else {
            id + MAX_RULES
        };
        per_cpu_sum(&self.ebpf, "RULE_REFUSALS", index)
    }
}

fn open_cgroup(dir: &Path) -> Result<std::fs::File, EbpfError> {
    std::fs::File::open(dir).map_err(|source| EbpfError::Cgroup {
        path: dir.to_owned(),
        source,
    })
}

/// The prefix an LPM trie key names.
fn prefix<const N: usize>(data: [u8; N], len: u32) -> Option<IpNet>
where
    IpAddr: From<[u8; N]>,
{
    IpNet::new(IpAddr::from(data), u8::try_from(len).ok()?).ok()
}

/// Removes the link pins of program `name` in `pin_dir` but `keep`: the
/// last reference to an old link, so removing it detaches it.
fn remove_links(pin_dir: &Path, name: &str, keep: Option<&Path>) {
    let prefix = format!("link-{name}-");
    for old in std::fs::read_dir(pin_dir).into_iter().flatten().flatten() {
        let path = old.path();
        if old.file_name().to_string_lossy().starts_with(&prefix) && Some(path.as_path()) != keep {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// A map of `ebpf` by name, as the type `T` reads it.
fn typed<'a, T>(ebpf: &'a Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<&'a aya::maps::Map>,
{
    T::try_from(ebpf.map(name).ok_or(EbpfError::MissingMap(name))?)
        .map_err(|_| EbpfError::MissingMap(name))
}

fn typed_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<&'a mut aya::maps::Map>,
{
    T::try_from(ebpf.map_mut(name).ok_or(EbpfError::MissingMap(name))?)
        .map_err(|_| EbpfError::MissingMap(name))
}

fn set_or_remove<K: aya::Pod>(
    map: &mut AyaHashMap<&mut MapData, K, u32>,
    key: &K,
    value: Option<u32>,
) -> Result<(), aya::maps::MapError> {
    match value {
        Some(v) => map.insert(key, v, 0),
        None => match map.remove(key) {
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            other => other,
        },
    }
}

fn backend_write(target: Target, id: Option<u32>) -> Write {
    match target.addr {
        SocketAddr::V4(a) => Write::V4(key_v4(a, target.protocol), id),
        SocketAddr::V6(a) => Write::V6(key_v6(a, target.protocol), id),
    }
}

fn local_port(protocol: Protocol, port: u16) -> LocalPort {
    LocalPort {
        port: port.to_be(),
        protocol: protocol.number(),
        _pad: 0,
    }
}

/// Attempts from one (cgroup, uid) since the tallies were last taken.
/// Packets that arrived from outside this host's sockets are one source:
/// cgroup 0, uid [`ANY_UID`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalAttempts {
    pub cgroup: u64,
    pub uid: u32,
    /// Where its latest attempt went.
    pub destination: SocketAddr,
    pub protocol: Protocol,
    pub attempts: u64,
}

impl LocalAttempts {
    /// Whether these are packets from outside this host's sockets.
    pub fn arrived(&self) -> bool {
        self.cgroup == 0 && self.uid == ANY_UID
    }
}

/// Who tried to reach a protected backend around the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BypassAttempt {
    /// 0 for a packet (no task could be asked).
    pub pid: u32,
    pub uid: u32,
    pub cgroup: u64,
    pub comm: String,
    pub destination: SocketAddr,
    pub protocol: Protocol,
    /// Let through because enforcement is audit (else refused with EPERM).
    pub audited: bool,
    /// Where it was judged: "call" (connect/sendmsg), "egress" (a packet
    /// on its way out, after NAT), "raw" (a raw socket's packet) or
    /// "ingress" (a packet arriving from outside this host's sockets).
    pub layer: &'static str,
    /// Where an arriving packet came from (ingress only).
    pub source: Option<SocketAddr>,
}

fn parse_event(bytes: &[u8]) -> Option<BypassAttempt> {
    if bytes.len() < std::mem::size_of::<BypassEvent>() {
        return None;
    }
    // SAFETY: the length is checked above, BypassEvent is plain old data
    // (every bit pattern valid) and read_unaligned needs no alignment.
    let e: BypassEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let at = |words: [u32; 4], port: u16| {
        let port = u16::from_be(port);
        if e.family == 4 {
            SocketAddr::from((std::net::Ipv4Addr::from(words[0].to_ne_bytes()), port))
        } else {
            SocketAddr::from((words_to_v6(words), port))
        }
    };
    Some(BypassAttempt {
        pid: e.pid,
        uid: e.uid,
        cgroup: e.cgroup,
        comm: String::from_utf8_lossy(e.comm.split(|b| *b == 0).next().unwrap_or_default())
            .into_owned(),
        destination: at(e.addr, e.port),
        protocol: Protocol::from_number(e.protocol).unwrap_or(Protocol::Tcp),
        audited: e.audited != 0,
        layer: match e.layer {
            local_layer::EGRESS => "egress",
            local_layer::RAW => "raw",
            local_layer::INGRESS => "ingress",
            _ => "call",
        },
        source: (e.layer == local_layer::INGRESS).then(|| at(e.source, e.source_port)),
    })
}

/// An IPv6 address from the four words the kernel hands the programs
/// (network byte order, read as native words).
fn words_to_v6(words: [u32; 4]) -> std::net::Ipv6Addr {
    let mut o = [0u8; 16];
    for (chunk, w) in o.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&w.to_ne_bytes());
    }
    std::net::Ipv6Addr::from(o)
}

fn key_v4(a: std::net::SocketAddrV4, protocol: Protocol) -> BackendV4 {
    BackendV4 {
        // The kernel's user_ip4 is the address in network byte order read as
        // a native u32: the same bytes, in memory order.
        addr: u32::from_ne_bytes(a.ip().octets()),
        port: a.port().to_be(),
        protocol: protocol.number(),
        _pad: 0,
    }
}

fn key_v6(a: std::net::SocketAddrV6, protocol: Protocol) -> BackendV6 {
    let [
        a0,
        a1,
        a2,
        a3,
        b0,
        b1,
        b2,
        b3,
        c0,
        c1,
        c2,
        c3,
        d0,
        d1,
        d2,
        d3,
    ] = a.ip().octets();
    BackendV6 {
        addr: [
            u32::from_ne_bytes([a0, a1, a2, a3]),
            u32::from_ne_bytes([b0, b1, b2, b3]),
            u32::from_ne_bytes([c0, c1, c2, c3]),
            u32::from_ne_bytes([d0, d1, d2, d3]),
        ],
        port: a.port().to_be(),
        protocol: protocol.number(),
        _pad: 0,
    }
}

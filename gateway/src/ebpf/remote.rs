//! The remote guard: on a backend host, only the gateways' addresses reach
//! the protected ports. Two layers share one set of maps:
//!
//! - `ingress`, a TC classifier on each named interface: the early layer.
//!   It drops a stranger's packet before the stack spends anything on it,
//!   and attaches to any interface (veth, bonds, tunnels, NICs without
//!   native XDP) next to what else the host runs there. Attached first
//!   (TCX) or at priority 1 (netlink), and passing with TCX_NEXT, so no
//!   program before it can switch it off and programs after it still run.
//! - `sock_ingress`, a `cgroup_skb/ingress` program on a cgroup tree (the
//!   whole host by default): the kernel runs it for every packet it delivers
//!   to a socket in that tree, after reassembly and NAT, on every interface
//!   (`lo`, bridges, veths, tunnels). The port it judges is the receiving
//!   socket's own. It closes what TC cannot see.
//!
//! Maps are filled before anything attaches and updated in place (new
//! entries before stale ones go), all or nothing: an update that fails
//! halfway puts back what it changed.
//!
//! Pinned (the default), protection outlives the process: the maps live in
//! bpffs, and so do the attachments. On 6.6+ kernels TC attaches through
//! TCX, whose link is pinned like any BPF link; older kernels attach through
//! netlink, where the filter itself holds the program; it sits at a fixed
//! priority and handle so that a restart replaces it in place, and a
//! `netlink-<interface>` directory in the pin directory records it for
//! `--uninstall`. The socket layer's cgroup link is pinned too. A restart
//! swaps the programs in and takes over the maps, so there is no moment
//! without protection. An interface that is deleted and created again (a
//! bond, a veth) loses its attachment with it: `reconcile` attaches again.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap as AyaHashMap};
use aya::programs::links::{FdLink, Link as _, PinnedLink};
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{
    CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, LinkOrder, SchedClassifier, TcAttachType, tc,
};
use aya::util::KernelVersion;
use gateway_common::{
    IngressConfig, IngressCounter, IngressEvent, LinkKind, MAX_ALLOWED_SOURCES, MAX_INTERFACES,
    MAX_PORT_RULES, SourceKey, SourceTally, enforcement, layer, reason,
};
use ipnet::IpNet;

pub use super::Protocol;
use super::{
    EbpfError, Enforcement, Events, HeldLink, PinDirLock, attached_programs, loader_with_pins,
    lock_pin_dir, object, per_cpu_sum, port_range, program_mut, remove_obsolete_pins, take_tallies,
};

/// One protected port or range: `tcp:9000`, `udp:5000-5010`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRule {
    pub protocol: Protocol,
    pub first: u16,
    pub last: u16,
}

impl std::str::FromStr for PortRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("{s:?}: expected tcp:PORT, tcp:FIRST-LAST, udp:PORT or udp:FIRST-LAST");
        let (proto, ports) = s.split_once(':').ok_or_else(bad)?;
        let protocol = match proto {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            _ => return Err(bad()),
        };
        let (first, last) = port_range(s, ports, bad)?;
        Ok(PortRule {
            protocol,
            first,
            last,
        })
    }
}

impl std::fmt::Display for PortRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.first == self.last {
            write!(f, "{}:{}", self.protocol.name(), self.first)
        } else {
            write!(f, "{}:{}-{}", self.protocol.name(), self.first, self.last)
        }
    }
}

/// What the remote guard protects, where, and for whom.
#[derive(Debug, Clone)]
pub struct RemoteSpec {
    /// Interfaces the TC layer attaches to (may be empty).
    pub interfaces: Vec<String>,
    /// The cgroup v2 directory whose sockets the socket layer guards (the
    /// mount point itself: every socket on the host); None: no socket layer.
    pub sockets: Option<PathBuf>,
    /// The gateways' addresses (prefixes): the only sources let through.
    pub allow: Vec<IpNet>,
    pub protect: Vec<PortRule>,
    pub enforcement: Enforcement,
    /// Where maps and attachments are pinned so protection survives the
    /// guard's exit; None: everything detaches when the guard stops.
    pub pin_dir: Option<PathBuf>,
}

/// Counters of one layer, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerCounters {
    /// Packets to protected ports (and unparsable ones).
    pub protected: u64,
    /// From an allowed source.
    pub allowed: u64,
    pub dropped: u64,
    pub audited: u64,
    /// Of `protected`, the packets whose ports could not be read.
    pub unparsable: u64,
}

/// Counters of both layers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngressCounters {
    pub tc: LayerCounters,
    pub socket: LayerCounters,
}

impl IngressCounters {
    /// Both layers together (a packet dropped by TC never reaches the socket layer).
    pub fn dropped(&self) -> u64 {
        self.tc.dropped + self.socket.dropped
    }
}

/// What happened to one protected interface when the guard looked again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterfaceChange {
    /// It was created again (a new index): attached again.
    Reattached { interface: String, index: u32 },
    /// It is gone: nothing to attach to until it comes back.
    Gone { interface: String },
    /// Another TCX program now runs before the guard on it.
    NotFirst { interface: String },
    /// The socket layer was no longer attached to its cgroup: attached again.
    SocketLayerReattached,
    /// The pin of a link (an interface's, or "sockets") was removed or
    /// replaced: pinned again (the guard held the link meanwhile).
    Repinned { link: String },
}

/// The remote guard's programs and maps. Unpinned, they stay attached while
/// this value lives; pinned, until `--uninstall`.
pub struct RemoteGuard {
    ebpf: aya::Ebpf,
    rules: Vec<PortRule>,
    allowed: HashSet<IpNet>,
    interfaces: Vec<String>,
    /// Interface name → the index the TC layer is attached under.
    attached: HashMap<String, u32>,
    /// Interfaces last seen gone (reported once, not on every look).
    gone: HashSet<String>,
    pin_dir: Option<PathBuf>,
    sockets: Option<PathBuf>,
    /// Pinned links (TCX per interface, the socket layer's), held open
    /// while the guard runs: removing a pin does not detach them, and
    /// `reconcile` pins them again.
    held: HashMap<String, HeldLink>,
    _lock: Option<PinDirLock>,
}

/// The key of the socket layer's link among the held ones (interface
/// names cannot contain a '/').
const SOCKET_LINK: &str = "/sockets";

const TC_PROGRAM: &str = "ingress";
const SOCKET_PROGRAM: &str = "sock_ingress";

const MAPS: [&str; 12] = [
    "INGRESS_TCP_PORTS",
    "INGRESS_UDP_PORTS",
    "INGRESS_ALLOW_V4",
    "INGRESS_ALLOW_V6",
    "INGRESS_CONFIG",
    "INGRESS_COUNTERS",
    "INGRESS_RULE_DROPS",
    "INGRESS_EVENTS",
    "INGRESS_EVENT_BUDGET",
    "INGRESS_LINKS",
    "INGRESS_TALLIES",
    "INGRESS_UNTALLIED",
];
/// Pinned maps of earlier versions this one replaced.
const OBSOLETE_MAPS: [&str; 1] = ["INGRESS_SOURCES"];

/// Where a netlink (pre-6.6) attachment sits, so a restart replaces it and
/// `--uninstall` finds it: priority 1, before any filter added with a
/// priority of its own or without one. Earlier versions used 1000; a filter
/// found there is removed.
const NETLINK_PRIORITY: u16 = 1;
const LEGACY_NETLINK_PRIORITY: u16 = 1000;
const NETLINK_HANDLE: TcHandle = TcHandle::new(0, 0x6777);

/// The pin of a TCX link on `iface`, and the marker of a netlink filter.
const TCX_PIN_PREFIX: &str = "link-ingress-";
pub(super) const NETLINK_MARKER_PREFIX: &str = "netlink-";
/// The pins of the socket layer's cgroup link (one per process that made it).
const SOCKET_PIN_PREFIX: &str = "link-sock_ingress-";

fn uses_tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

impl RemoteGuard {
    pub fn install(spec: &RemoteSpec) -> Result<Self, EbpfError> {
        if object().is_empty() {
            return Err(EbpfError::NotBuilt);
        }
        let mut loader = loader_with_pins(spec.pin_dir.as_deref(), &MAPS)?;
        let lock = spec.pin_dir.as_deref().map(lock_pin_dir).transpose()?;
        let mut guard = RemoteGuard {
            ebpf: loader.load(object())?,
            rules: Vec::new(),
            allowed: HashSet::new(),
            interfaces: spec.interfaces.clone(),
            attached: HashMap::new(),
            gone: HashSet::new(),
            pin_dir: spec.pin_dir.clone(),
            sockets: spec.sockets.clone(),
            held: HashMap::new(),
            _lock: lock,
        };
        guard.adopt_existing_rules()?;
        // Whole before it sees a packet.
        guard.update(spec)?;
        let program = guard.tc_program()?;
        program.load().map_err(|source| EbpfError::Program {
            name: TC_PROGRAM,
            source,
        })?;
        for iface in &spec.interfaces {
            guard.attach_interface(iface)?;
        }
        guard
            .socket_program()?
            .load()
            .map_err(|source| EbpfError::Program {
                name: SOCKET_PROGRAM,
                source,
            })?;
        if let Some(cgroup) = &spec.sockets {
            guard.attach_sockets(cgroup)?;
        }
        if let Some(dir) = &spec.pin_dir {
            // What a previous guard protected and this one does not.
            for stale in pinned_interfaces(dir)
                .into_iter()
                .filter(|i| !spec.interfaces.contains(i))
            {
                tracing::info!(interface = %stale, "guard: no longer protecting");
                detach_pinned(dir, &stale)?;
            }
            if spec.sockets.is_none() {
                remove_pins(dir, SOCKET_PIN_PREFIX, None);
            }
        }
        guard.forget_stale_links()?;
        remove_obsolete_pins(spec.pin_dir.as_deref(), &OBSOLETE_MAPS);
        Ok(guard)
    }

    fn tc_program(&mut self) -> Result<&mut SchedClassifier, EbpfError> {
        program_mut(&mut self.ebpf, TC_PROGRAM)
    }

    fn socket_program(&mut self) -> Result<&mut CgroupSkb, EbpfError> {
        program_mut(&mut self.ebpf, SOCKET_PROGRAM)
    }

    /// Attaches the TC layer to `iface` (first in line), after telling the
    /// program where that interface's network header starts.
    fn attach_interface(&mut self, iface: &str) -> Result<u32, EbpfError> {
        let on_iface = |reason: String| EbpfError::Interface {
            interface: iface.to_owned(),
            reason,
        };
        let link = crate::netlink::link(iface)
            .map_err(|e| on_iface(format!("listing interfaces: {e}")))?
            .ok_or_else(|| on_iface("no such interface".into()))?;
        let l2_len = link.link_header_len().ok_or_else(|| {
            on_iface(format!(
                "link type {} is neither Ethernet-like nor without a link header; the guard cannot find its packets' IP header",
                link.kind
            ))
        })?;
        let name = "INGRESS_LINKS";
        let mut links: AyaHashMap<_, u32, LinkKind> =
            AyaHashMap::try_from(self.map_mut(name)?).map_err(|_| EbpfError::MissingMap(name))?;
        links
            .insert(link.index, LinkKind { l2_len }, 0)
            .map_err(|source| EbpfError::MapWrite { name, source })?;
        // The clsact qdisc may be there already (ours or another tool's).
        let exists = |e: &tc::TcError| match e {
            tc::TcError::AlreadyAttached => true,
            tc::TcError::NetlinkError(n) => n.raw_os_error() == Some(libc::EEXIST),
            _ => false,
        };
        if let Err(e) = tc::qdisc_add_clsact(iface)
            && !exists(&e)
        {
            return Err(on_iface(e.to_string()));
        }
        let pin_dir = self.pin_dir.clone();
        let program = self.tc_program()?;
        match &pin_dir {
            None if uses_tcx() => {
                program
                    .attach_with_options(
                        iface,
                        TcAttachType::Ingress,
                        TcAttachOptions::TcxOrder(LinkOrder::first()),
                    )
                    .map_err(|e| on_iface(e.to_string()))?;
            }
            None => {
                program
                    .attach_with_options(iface, TcAttachType::Ingress, netlink_options())
                    .map_err(|e| on_iface(e.to_string()))?;
            }
            Some(dir) if uses_tcx() => {
                let link = attach_tcx_pinned(program, iface, dir)?;
                let held = HeldLink::pin(link, dir.join(format!("{TCX_PIN_PREFIX}{iface}")))?;
                self.held.insert(iface.to_owned(), held);
            }
            Some(dir) => attach_netlink_pinned(program, iface, dir)?,
        }
        if let Some(old) = self.attached.insert(iface.to_owned(), link.index)
            && old != link.index
        {
            let _ = self.links_map()?.remove(&old);
        }
        self.gone.remove(iface);
        Ok(link.index)
    }

    fn links_map(
        &mut self,
    ) -> Result<AyaHashMap<&mut aya::maps::MapData, u32, LinkKind>, EbpfError> {
        let name = "INGRESS_LINKS";
        AyaHashMap::try_from(self.map_mut(name)?).map_err(|_| EbpfError::MissingMap(name))
    }

    /// Drops link entries a previous guard left for interfaces that are no
    /// longer attached.
    fn forget_stale_links(&mut self) -> Result<(), EbpfError> {
        let current: HashSet<u32> = self.attached.values().copied().collect();
        let mut links = self.links_map()?;
        let stale: Vec<u32> = links
            .keys()
            .filter_map(Result::ok)
            .filter(|i| !current.contains(i))
            .collect();
        for index in stale {
            let _ = links.remove(&index);
        }
        Ok(())
    }

    /// Attaches the socket layer to `cgroup` (a link, which never displaces
    /// other programs there; the kernel runs them all and drops when any
    /// says so). Pinned: the new link is pinned first, then any a previous
    /// guard left is let go, so both judge in between and there is no gap.
    fn attach_sockets(&mut self, cgroup: &Path) -> Result<(), EbpfError> {
        let dir = std::fs::File::open(cgroup).map_err(|source| EbpfError::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        let pin_dir = self.pin_dir.clone();
        let program = self.socket_program()?;
        let failed = |source| EbpfError::Program {
            name: SOCKET_PROGRAM,
            source,
        };
        let link = program
            .attach(dir, CgroupSkbAttachType::Ingress, CgroupAttachMode::Single)
            .map_err(failed)?;
        if let Some(pin_dir) = &pin_dir {
            let fd_link: FdLink = program
                .take_link(link)
                .map_err(failed)?
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| EbpfError::Pin {
                    path: pin_dir.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?;
            let ours = pin_dir.join(format!("{SOCKET_PIN_PREFIX}{}", std::process::id()));
            let held = HeldLink::pin(fd_link, ours)?;
            remove_pins(pin_dir, SOCKET_PIN_PREFIX, Some(&held.path));
            self.held.insert(SOCKET_LINK.to_owned(), held);
        }
        Ok(())
    }

    /// Looks at every protected interface again: one created anew (deleted
    /// and added, as bonds and veths are) gets the guard attached again,
    /// one that went is reported once, and with TCX, one where another
    /// program now runs before the guard is reported.
    pub fn reconcile(&mut self) -> Result<Vec<InterfaceChange>, EbpfError> {
        let links = crate::netlink::links().map_err(|e| EbpfError::Interface {
            interface: String::new(),
            reason: format!("listing interfaces: {e}"),
        })?;
        let mut changes = Vec::new();
        for iface in self.interfaces.clone() {
            match links.iter().find(|l| l.name == iface) {
                None => {
                    if self.gone.insert(iface.clone()) {
                        changes.push(InterfaceChange::Gone { interface: iface });
                    }
                }
                Some(link) if self.attached.get(&iface) != Some(&link.index) => {
                    let index = self.attach_interface(&iface)?;
                    changes.push(InterfaceChange::Reattached {
                        interface: iface,
                        index,
                    });
                }
                Some(_) if uses_tcx() && !self.runs_first(&iface)? => {
                    changes.push(InterfaceChange::NotFirst { interface: iface });
                }
                Some(_) => {}
            }
        }
        self.forget_stale_links()?;
        if let Some(cgroup) = self.sockets.clone() {
            let ours = self
                .socket_program()?
                .info()
                .map_err(|source| EbpfError::Program {
                    name: SOCKET_PROGRAM,
                    source,
                })?
                .id();
            // BPF_CGROUP_INET_INGRESS
            if !attached_programs(&cgroup, 0)?.contains(&ours) {
                self.attach_sockets(&cgroup)?;
                changes.push(InterfaceChange::SocketLayerReattached);
            }
        }
        for (name, held) in &mut self.held {
            if held.check()? {
                changes.push(InterfaceChange::Repinned {
                    link: name.trim_start_matches('/').to_owned(),
                });
            }
        }
        Ok(changes)
    }

    /// Whether the guard is the first TCX program on `iface`'s ingress.
    fn runs_first(&mut self, iface: &str) -> Result<bool, EbpfError> {
        let ours = self
            .tc_program()?
            .info()
            .map_err(|source| EbpfError::Program {
                name: TC_PROGRAM,
                source,
            })?
            .id();
        let (_, programs) =
            SchedClassifier::query_tcx(iface, TcAttachType::Ingress).map_err(|source| {
                EbpfError::Program {
                    name: TC_PROGRAM,
                    source,
                }
            })?;
        Ok(programs.first().is_some_and(|p| p.id() == ours))
    }

    /// Takes over the rules a previous guard left in pinned maps, so the
    /// next update removes what is stale instead of leaving it behind.
    fn adopt_existing_rules(&mut self) -> Result<(), EbpfError> {
        for (protocol, name) in [
            (Protocol::Tcp, "INGRESS_TCP_PORTS"),
            (Protocol::Udp, "INGRESS_UDP_PORTS"),
        ] {
            let array: Array<_, u32> =
                Array::try_from(self.ebpf.map(name).ok_or(EbpfError::MissingMap(name))?)
                    .map_err(|_| EbpfError::MissingMap(name))?;
            for (port, value) in array.iter().enumerate() {
                let value = value.map_err(|source| EbpfError::Map { name, source })?;
                if value != 0 {
                    let port = port as u16;
                    self.rules.push(PortRule {
                        protocol,
                        first: port,
                        last: port,
                    });
                }
            }
        }
        self.adopt_allowed::<4>("INGRESS_ALLOW_V4")?;
        self.adopt_allowed::<16>("INGRESS_ALLOW_V6")
    }

    /// The allowed sources already in one family's LPM trie.
    fn adopt_allowed<const N: usize>(&mut self, name: &'static str) -> Result<(), EbpfError>
    where
        IpAddr: From<[u8; N]>,
    {
        let trie: LpmTrie<_, [u8; N], u8> =
            LpmTrie::try_from(self.ebpf.map(name).ok_or(EbpfError::MissingMap(name))?)
                .map_err(|_| EbpfError::MissingMap(name))?;
        for key in trie.keys() {
            let key = key.map_err(|source| EbpfError::Map { name, source })?;
            if let Ok(net) = IpNet::new(IpAddr::from(key.data()), key.prefix_len() as u8) {
                self.allowed.insert(net);
            }
        }
        Ok(())
    }

    /// Changes what is protected and who passes, programs attached: new
    /// entries go in before stale ones come out, so there is no gap. All or
    /// nothing: everything is checked before the first write, and a write
    /// that fails puts back every one before it. Where the guard attaches
    /// (interfaces, the socket layer's cgroup) is fixed at install.
    pub fn update(&mut self, spec: &RemoteSpec) -> Result<(), EbpfError> {
        if spec.interfaces != self.interfaces || spec.sockets != self.sockets {
            return Err(EbpfError::Unchangeable(format!(
                "interfaces {:?} and the socket layer's cgroup {:?} change only on restart (running with {:?} and {:?})",
                spec.interfaces, spec.sockets, self.interfaces, self.sockets
            )));
        }
        if spec.protect.len() > MAX_PORT_RULES as usize {
            return Err(EbpfError::TooManyRules(MAX_PORT_RULES));
        }
        if spec.interfaces.len() > MAX_INTERFACES as usize {
            return Err(EbpfError::TooManyRules(MAX_INTERFACES));
        }
        let wanted: HashSet<IpNet> = spec.allow.iter().map(IpNet::trunc).collect();
        // New prefixes go in before stale ones leave: both must fit at once.
        for v6 in [false, true] {
            let during = wanted
                .union(&self.allowed)
                .filter(|n| n.addr().is_ipv6() == v6)
                .count();
            if during > MAX_ALLOWED_SOURCES as usize {
                return Err(EbpfError::TooManyRules(MAX_ALLOWED_SOURCES));
            }
        }
        let mut plan = Vec::new();
        // Allowed sources first: a reload that moves the gateway to a new
        // address must not drop its connections in between.
        plan.extend(
            wanted
                .difference(&self.allowed)
                .map(|n| Write::Allow(*n, true)),
        );
        plan.push(Write::Config(IngressConfig {
            enforcement: match spec.enforcement {
                Enforcement::Enforce => enforcement::ENFORCE,
                Enforcement::Audit => enforcement::AUDIT,
            },
            _pad: 0,
        }));
        // Ports: every port of every rule gets its rule id (+1), then ports
        // no rule covers any more are cleared.
        let mut covered: HashSet<(Protocol, u16)> = HashSet::new();
        for (id, rule) in spec.protect.iter().enumerate() {
            for port in rule.first..=rule.last {
                covered.insert((rule.protocol, port));
                plan.push(Write::Port(rule.protocol, port, id as u32 + 1));
            }
        }
        for rule in &self.rules {
            for port in rule.first..=rule.last {
                if !covered.contains(&(rule.protocol, port)) {
                    plan.push(Write::Port(rule.protocol, port, 0));
                }
            }
        }
        plan.extend(
            self.allowed
                .difference(&wanted)
                .map(|n| Write::Allow(*n, false)),
        );
        let mut undo = Vec::new();
        for write in plan {
            match self.apply(&write) {
                Ok(previous) => undo.push(previous),
                Err(e) => {
                    for previous in undo.into_iter().rev() {
                        if let Err(again) = self.apply(&previous) {
                            tracing::error!(error = %again, "guard: putting back a map entry after a failed update");
                        }
                    }
                    return Err(e);
                }
            }
        }
        self.allowed = wanted;
        self.rules = spec.protect.clone();
        Ok(())
    }

    /// Makes one write; returns the write that undoes it.
    fn apply(&mut self, write: &Write) -> Result<Write, EbpfError> {
        match *write {
            Write::Config(config) => {
                let name = "INGRESS_CONFIG";
                let mut array: Array<_, IngressConfig> = Array::try_from(self.map_mut(name)?)
                    .map_err(|_| EbpfError::MissingMap(name))?;
                let previous = array.get(&0, 0).unwrap_or_default();
                array
                    .set(0, config, 0)
                    .map_err(|source| EbpfError::MapWrite { name, source })?;
                Ok(Write::Config(previous))
            }
            Write::Port(protocol, port, value) => {
                let name = match protocol {
                    Protocol::Tcp => "INGRESS_TCP_PORTS",
                    Protocol::Udp => "INGRESS_UDP_PORTS",
                };
                let mut array: Array<_, u32> = Array::try_from(self.map_mut(name)?)
                    .map_err(|_| EbpfError::MissingMap(name))?;
                let previous = array
                    .get(&u32::from(port), 0)
                    .map_err(|source| EbpfError::Map { name, source })?;
                array
                    .set(u32::from(port), value, 0)
                    .map_err(|source| EbpfError::MapWrite { name, source })?;
                Ok(Write::Port(protocol, port, previous))
            }
            Write::Allow(net, add) => {
                self.allow(&net, add)?;
                Ok(Write::Allow(net, !add))
            }
        }
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, EbpfError> {
        self.ebpf.map_mut(name).ok_or(EbpfError::MissingMap(name))
    }

    fn allow(&mut self, net: &IpNet, add: bool) -> Result<(), EbpfError> {
        let prefix = u32::from(net.prefix_len());
        match net.addr() {
            IpAddr::V4(a) => {
                let name = "INGRESS_ALLOW_V4";
                let mut trie: LpmTrie<_, [u8; 4], u8> = LpmTrie::try_from(self.map_mut(name)?)
                    .map_err(|_| EbpfError::MissingMap(name))?;
                let key = Key::new(prefix, a.octets());
                if add {
                    trie.insert(&key, 1, 0)
                } else {
                    trie.remove(&key)
                }
                .map_err(|source| EbpfError::MapWrite { name, source })
            }
            IpAddr::V6(a) => {
                let name = "INGRESS_ALLOW_V6";
                let mut trie: LpmTrie<_, [u8; 16], u8> = LpmTrie::try_from(self.map_mut(name)?)
                    .map_err(|_| EbpfError::MissingMap(name))?;
                let key = Key::new(prefix, a.octets());
                if add {
                    trie.insert(&key, 1, 0)
                } else {
                    trie.remove(&key)
                }
                .map_err(|source| EbpfError::MapWrite { name, source })
            }
        }
    }

    fn per_cpu_sum(&self, name: &'static str, index: u32) -> Result<u64, EbpfError> {
        per_cpu_sum(&self.ebpf, name, index)
    }

    pub fn counters(&self) -> Result<IngressCounters, EbpfError> {
        let of = |layer: u8| -> Result<LayerCounters, EbpfError> {
            let sum = |c: IngressCounter| self.per_cpu_sum("INGRESS_COUNTERS", c.index(layer));
            Ok(LayerCounters {
                protected: sum(IngressCounter::Protected)?,
                allowed: sum(IngressCounter::Allowed)?,
                dropped: sum(IngressCounter::Dropped)?,
                audited: sum(IngressCounter::Audited)?,
                unparsable: sum(IngressCounter::Unparsable)?,
            })
        };
        Ok(IngressCounters {
            tc: of(layer::TC)?,
            socket: of(layer::SOCKET)?,
        })
    }

    /// Drops (or audited would-be drops) per rule, in the spec's order.
    pub fn drops_per_rule(&self) -> Result<Vec<(PortRule, u64)>, EbpfError> {
        self.rules
            .iter()
            .enumerate()
            .map(|(i, r)| Ok((*r, self.per_cpu_sum("INGRESS_RULE_DROPS", i as u32)?)))
            .collect()
    }

    /// How often the kernel ran each layer's program and for how long, as
    /// (program, runs, time). Counted only while BPF run-time statistics
    /// are on (`sysctl kernel.bpf_stats_enabled=1`); zero otherwise.
    pub fn program_stats(&self) -> Vec<(&'static str, u64, std::time::Duration)> {
        [TC_PROGRAM, SOCKET_PROGRAM]
            .into_iter()
            .filter_map(|name| {
                let info = self.ebpf.program(name)?.info().ok()?;
                Some((name, info.run_count(), info.run_time()))
            })
            .collect()
    }

    /// The drop events (once; later calls fail). Needs a tokio runtime.
    pub fn take_events(&mut self) -> Result<Events<Intrusion>, EbpfError> {
        Events::take(&mut self.ebpf, "INGRESS_EVENTS", parse)
    }

    /// Every source tallied since the last call, busiest first, and the
    /// tallies emptied.
    pub fn take_tallies(&mut self) -> Result<Vec<SourceAttempts>, EbpfError> {
        let mut out: Vec<SourceAttempts> =
            take_tallies::<SourceKey, SourceTally>(&mut self.ebpf, "INGRESS_TALLIES")?
                .into_iter()
                .map(|(key, per_cpu)| SourceAttempts {
                    source: address(key.family, key.addr),
                    port: key.port,
                    protocol: protocol_name(key.protocol, key.port == 0),
                    attempts: per_cpu.iter().map(|t| t.attempts).sum(),
                })
                .filter(|t| t.attempts > 0)
                .collect();
        out.sort_by(|a, b| b.attempts.cmp(&a.attempts).then(a.source.cmp(&b.source)));
        Ok(out)
    }

    /// Attempts, ever, whose source found the tallies full (a flood of
    /// distinct sources): counted, but in no summary.
    pub fn untallied(&self) -> Result<u64, EbpfError> {
        self.per_cpu_sum("INGRESS_UNTALLIED", 0)
    }
}

/// One map write of an update (and, returned by `apply`, its undo).
enum Write {
    Config(IngressConfig),
    Port(Protocol, u16, u32),
    Allow(IpNet, bool),
}

fn netlink_options() -> TcAttachOptions {
    TcAttachOptions::Netlink(NlOptions {
        priority: NETLINK_PRIORITY,
        handle: NETLINK_HANDLE,
        classid: None,
    })
}

/// Removes the pins in `dir` whose names start with `prefix`, except `keep`
/// (the last reference to a link: removing it detaches it).
fn remove_pins(dir: &Path, prefix: &str, keep: Option<&Path>) {
    for old in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = old.path();
        if old.file_name().to_string_lossy().starts_with(prefix) && Some(path.as_path()) != keep {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Attempts from one source at one port since the tallies were last taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceAttempts {
    pub source: IpAddr,
    /// 0 when the packets' ports could not be read.
    pub port: u16,
    pub protocol: &'static str,
    pub attempts: u64,
}

fn address(family: u8, words: [u32; 4]) -> IpAddr {
    if family == 6 {
        let mut o = [0u8; 16];
        for (chunk, w) in o.chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(o)
    } else {
        IpAddr::from(words[0].to_ne_bytes())
    }
}

fn protocol_name(protocol: u8, unparsable: bool) -> &'static str {
    match (protocol, unparsable) {
        (_, true) => "unparsable",
        (6, _) => "tcp",
        (17, _) => "udp",
        _ => "other",
    }
}

/// Attaches through TCX, first in line; a link a previous guard pinned
/// gets the new program swapped in (one atomic update, no gap). The caller
/// pins (again) and holds what this returns.
fn attach_tcx_pinned(
    program: &mut SchedClassifier,
    iface: &str,
    dir: &Path,
) -> Result<FdLink, EbpfError> {
    let on_iface = |e: &dyn std::fmt::Display| EbpfError::Interface {
        interface: iface.to_owned(),
        reason: e.to_string(),
    };
    let pin = dir.join(format!("{TCX_PIN_PREFIX}{iface}"));
    let replaced = PinnedLink::from_pin(&pin)
        .ok()
        .and_then(|old| SchedClassifierLink::try_from(FdLink::from(old)).ok())
        .and_then(|old| program.attach_to_link(old).ok());
    let id = match replaced {
        // The pin already names this link.
        Some(id) => id,
        // None pinned, or its interface went away (a defunct link).
        None => program
            .attach_with_options(
                iface,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .map_err(|e| on_iface(&e))?,
    };
    program
        .take_link(id)
        .map_err(|e| on_iface(&e))?
        .try_into()
        .map_err(|e: aya::programs::links::LinkError| on_iface(&e))
}

/// Attaches through netlink at the guard's own priority and handle, and
/// leaves the filter in place when the process exits. A filter a previous
/// guard left there gets the new program in place (one netlink replace).
fn attach_netlink_pinned(
    program: &mut SchedClassifier,
    iface: &str,
    dir: &Path,
) -> Result<(), EbpfError> {
    let on_iface = |e: &dyn std::fmt::Display| EbpfError::Interface {
        interface: iface.to_owned(),
        reason: e.to_string(),
    };
    // Create refuses (EEXIST) without touching a filter already there.
    let id = match program.attach_with_options(iface, TcAttachType::Ingress, netlink_options()) {
        Ok(id) => id,
        Err(create) => {
            let old = SchedClassifierLink::attached(
                iface,
                TcAttachType::Ingress,
                NETLINK_PRIORITY,
                NETLINK_HANDLE,
                None,
            )
            .map_err(|e| on_iface(&e))?;
            program
                .attach_to_link(old)
                .map_err(|replace| on_iface(&format!("{create}; replacing: {replace}")))?
        }
    };
    let link = program.take_link(id).map_err(|e| on_iface(&e))?;
    // Dropping the link would detach the filter: it is the pin.
    std::mem::forget(link);
    detach_netlink(iface, LEGACY_NETLINK_PRIORITY);
    let marker = dir.join(format!("{NETLINK_MARKER_PREFIX}{iface}"));
    match std::fs::create_dir(&marker) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(EbpfError::Pin {
            path: marker,
            source: e,
        }),
        _ => Ok(()),
    }
}

/// The interfaces a pinned guard is attached to, from its pin directory.
fn pinned_interfaces(dir: &Path) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix(TCX_PIN_PREFIX)
                .or_else(|| name.strip_prefix(NETLINK_MARKER_PREFIX))
                .map(str::to_owned)
        })
        .collect();
    found.sort();
    found.dedup();
    found
}

/// Detaches the guard from `iface` and removes its pin or marker. An
/// interface that is gone took its attachment with it.
pub(super) fn detach_pinned(dir: &Path, iface: &str) -> Result<(), EbpfError> {
    let pin = dir.join(format!("{TCX_PIN_PREFIX}{iface}"));
    match std::fs::remove_file(&pin) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(EbpfError::Pin {
                path: pin,
                source: e,
            });
        }
        _ => {}
    }
    let marker = dir.join(format!("{NETLINK_MARKER_PREFIX}{iface}"));
    if marker.is_dir() {
        detach_netlink(iface, NETLINK_PRIORITY);
        detach_netlink(iface, LEGACY_NETLINK_PRIORITY);
        std::fs::remove_dir(&marker).map_err(|source| EbpfError::Pin {
            path: marker,
            source,
        })?;
    }
    Ok(())
}

/// Detaches the guard's netlink filter at `priority` from `iface`, if there
/// is one (it fails only when the filter is already gone).
fn detach_netlink(iface: &str, priority: u16) {
    if let Ok(link) =
        SchedClassifierLink::attached(iface, TcAttachType::Ingress, priority, NETLINK_HANDLE, None)
    {
        let _ = link.detach();
    }
}

/// A packet from a stranger to a protected port (or one that could not be
/// parsed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intrusion {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub protocol: &'static str,
    pub ifindex: u32,
    /// Passed because enforcement is audit (else dropped).
    pub audited: bool,
    /// Which layer judged it: "tc" or "socket".
    pub layer: &'static str,
    /// Its ports could not be read (judged as if they were protected).
    pub unparsable: bool,
}

fn parse(bytes: &[u8]) -> Option<Intrusion> {
    if bytes.len() < std::mem::size_of::<IngressEvent>() {
        return None;
    }
    // SAFETY: the length is checked above, IngressEvent is plain old data
    // (every bit pattern valid) and read_unaligned needs no alignment.
    let e: IngressEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let unparsable = e.reason == reason::UNPARSABLE;
    Some(Intrusion {
        source: SocketAddr::new(address(e.family, e.src), e.src_port),
        destination: SocketAddr::new(address(e.family, e.dst), e.dst_port),
        protocol: protocol_name(e.protocol, unparsable),
        ifindex: e.ifindex,
        audited: e.audited != 0,
        layer: if e.layer == layer::SOCKET {
            "socket"
        } else {
            "tc"
        },
        unparsable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_rules_parse_and_say_what_is_wrong() {
        assert_eq!(
            "tcp:9000".parse::<PortRule>(),
            Ok(PortRule {
                protocol: Protocol::Tcp,
                first: 9000,
                last: 9000
            })
        );
        let r: PortRule = "udp:5000-5010".parse().unwrap();
        assert_eq!((r.protocol, r.first, r.last), (Protocol::Udp, 5000, 5010));
        assert_eq!(r.to_string(), "udp:5000-5010");
        for bad in [
            "9000",
            "sctp:1",
            "tcp:0",
            "tcp:10-9",
            "tcp:70000",
            "tcp:a-b",
        ] {
            assert!(bad.parse::<PortRule>().is_err(), "{bad}");
        }
    }
}

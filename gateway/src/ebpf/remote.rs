//! The remote guard: on a backend host, the `ingress` TC classifier lets
//! only the gateways' addresses reach the protected ports.
//!
//! TC rather than XDP: a TC classifier attaches to every interface the
//! kernel has (veth, bonds, tunnels, NICs whose driver lacks native XDP)
//! through the clsact qdisc, next to whatever else the host runs there, and
//! sees the packet after GRO, one check per aggregate. XDP would drop a flood
//! earlier, which is not this guard's job: it keeps bypass connections out.
//!
//! Maps are filled before the program attaches and updated in place (new
//! entries before stale ones go), so protection starts whole and has no gap
//! on reload.
//!
//! Pinned (the default), protection outlives the process: the maps live in
//! bpffs, and so does the attachment. On 6.6+ kernels aya attaches through
//! TCX, whose link is pinned like any BPF link. Older kernels attach through
//! netlink, where the filter itself holds the program; it sits at a fixed
//! priority and handle so that a restart replaces it in place, and a
//! `netlink-<interface>` directory in the pin directory records it for
//! `--uninstall`. Either way a restart swaps the program atomically and
//! takes over the maps, so there is no moment without protection.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use aya::maps::Array;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::programs::links::{FdLink, Link as _, PinnedLink};
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, tc};
use aya::util::KernelVersion;
use gateway_common::{
    IngressConfig, IngressCounter, IngressEvent, MAX_ALLOWED_SOURCES, MAX_PORT_RULES, enforcement,
};
use ipnet::IpNet;

pub use super::Protocol;
use super::{
    EbpfError, Enforcement, Events, loader_with_pins, object, per_cpu_sum, pin_failed, port_range,
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

/// What the remote guard protects, on which interfaces, and for whom.
#[derive(Debug, Clone)]
pub struct RemoteSpec {
    pub interfaces: Vec<String>,
    /// The gateways' addresses (prefixes): the only sources let through.
    pub allow: Vec<IpNet>,
    pub protect: Vec<PortRule>,
    pub enforcement: Enforcement,
    /// Where maps and attachments are pinned so protection survives the
    /// guard's exit; None: the program detaches when the guard stops.
    pub pin_dir: Option<PathBuf>,
}

/// Counters the remote guard keeps, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngressCounters {
    /// Packets to protected ports.
    pub protected: u64,
    /// From an allowed source.
    pub allowed: u64,
    pub dropped: u64,
    pub audited: u64,
}

/// The `ingress` classifier attached to the spec's interfaces. Unpinned, it
/// stays attached while this value lives; pinned, until `--uninstall`.
pub struct RemoteGuard {
    ebpf: aya::Ebpf,
    rules: Vec<PortRule>,
    allowed: HashSet<IpNet>,
    interfaces: Vec<String>,
}

const PROGRAM: &str = "ingress";

const MAPS: [&str; 9] = [
    "INGRESS_TCP_PORTS",
    "INGRESS_UDP_PORTS",
    "INGRESS_ALLOW_V4",
    "INGRESS_ALLOW_V6",
    "INGRESS_CONFIG",
    "INGRESS_COUNTERS",
    "INGRESS_RULE_DROPS",
    "INGRESS_EVENTS",
    "INGRESS_EVENT_BUDGET",
];

/// Where a netlink (pre-6.6) attachment sits, so a restart replaces it and
/// `--uninstall` finds it. Below tc's automatic priorities (49152 down), so
/// the guard runs before filters added without one.
const NETLINK_PRIORITY: u16 = 1000;
const NETLINK_HANDLE: TcHandle = TcHandle::new(0, 0x6777);

/// The pin of a TCX link on `iface`, and the marker of a netlink filter.
const TCX_PIN_PREFIX: &str = "link-ingress-";
pub(super) const NETLINK_MARKER_PREFIX: &str = "netlink-";

fn uses_tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

impl RemoteGuard {
    pub fn install(spec: &RemoteSpec) -> Result<Self, EbpfError> {
        if object().is_empty() {
            return Err(EbpfError::NotBuilt);
        }
        let mut loader = loader_with_pins(spec.pin_dir.as_deref(), &MAPS)?;
        let mut guard = RemoteGuard {
            ebpf: loader.load(object())?,
            rules: Vec::new(),
            allowed: HashSet::new(),
            interfaces: spec.interfaces.clone(),
        };
        guard.adopt_existing_rules()?;
        // Whole before it sees a packet.
        guard.update(spec)?;
        let program: &mut SchedClassifier = guard
            .ebpf
            .program_mut(PROGRAM)
            .ok_or(EbpfError::MissingProgram(PROGRAM))?
            .try_into()
            .map_err(|source| EbpfError::Program {
                name: PROGRAM,
                source,
            })?;
        program.load().map_err(|source| EbpfError::Program {
            name: PROGRAM,
            source,
        })?;
        for iface in &spec.interfaces {
            // The clsact qdisc may be there already (ours or another tool's).
            let exists = |e: &tc::TcError| match e {
                tc::TcError::AlreadyAttached => true,
                tc::TcError::NetlinkError(n) => n.raw_os_error() == Some(libc::EEXIST),
                _ => false,
            };
            if let Err(e) = tc::qdisc_add_clsact(iface)
                && !exists(&e)
            {
                return Err(EbpfError::Interface {
                    interface: iface.clone(),
                    reason: e.to_string(),
                });
            }
            let on_iface = |e: &dyn std::fmt::Display| EbpfError::Interface {
                interface: iface.clone(),
                reason: e.to_string(),
            };
            match &spec.pin_dir {
                None => {
                    program
                        .attach(iface, TcAttachType::Ingress)
                        .map_err(|e| on_iface(&e))?;
                }
                Some(dir) if uses_tcx() => attach_tcx_pinned(program, iface, dir)?,
                Some(dir) => attach_netlink_pinned(program, iface, dir)?,
            }
        }
        if let Some(dir) = &spec.pin_dir {
            // Interfaces a previous guard protected and this one does not.
            for stale in pinned_interfaces(dir)
                .into_iter()
                .filter(|i| !spec.interfaces.contains(i))
            {
                tracing::info!(interface = %stale, "guard: no longer protecting");
                detach_pinned(dir, &stale)?;
            }
        }
        Ok(guard)
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

    /// Changes what is protected and who passes, program attached: new
    /// entries go in before stale ones come out. Interfaces are fixed at
    /// install (a change needs a restart).
    pub fn update(&mut self, spec: &RemoteSpec) -> Result<(), EbpfError> {
        if spec.interfaces != self.interfaces {
            tracing::warn!(
                from = ?self.interfaces,
                to = ?spec.interfaces,
                "guard: interfaces change only on restart; keeping the current ones"
            );
        }
        if spec.protect.len() > MAX_PORT_RULES as usize {
            return Err(EbpfError::TooManyRules(MAX_PORT_RULES));
        }
        let config = IngressConfig {
            enforcement: match spec.enforcement {
                Enforcement::Enforce => enforcement::ENFORCE,
                Enforcement::Audit => enforcement::AUDIT,
            },
            _pad: 0,
        };
        let mut array: Array<_, IngressConfig> =
            Array::try_from(self.map_mut("INGRESS_CONFIG")?)
                .map_err(|_| EbpfError::MissingMap("INGRESS_CONFIG"))?;
        array.set(0, config, 0).map_err(|source| EbpfError::Map {
            name: "INGRESS_CONFIG",
            source,
        })?;

        // Allowed sources first: a reload that moves the gateway to a new
        // address must not drop its connections in between.
        let wanted: HashSet<IpNet> = spec.allow.iter().map(IpNet::trunc).collect();
        if wanted.iter().filter(|n| n.addr().is_ipv4()).count() > MAX_ALLOWED_SOURCES as usize
            || wanted.iter().filter(|n| n.addr().is_ipv6()).count() > MAX_ALLOWED_SOURCES as usize
        {
            return Err(EbpfError::TooManyRules(MAX_ALLOWED_SOURCES));
        }
        let (new, stale): (Vec<IpNet>, Vec<IpNet>) = (
            wanted.difference(&self.allowed).copied().collect(),
            self.allowed.difference(&wanted).copied().collect(),
        );
        for net in &new {
            self.allow(net, true)?;
        }
        for net in &stale {
            self.allow(net, false)?;
        }
        self.allowed = wanted;

        // Ports: every port of every rule gets its rule id (+1), then ports
        // no rule covers any more are cleared.
        let mut covered: HashSet<(Protocol, u16)> = HashSet::new();
        for (id, rule) in spec.protect.iter().enumerate() {
            for port in rule.first..=rule.last {
                covered.insert((rule.protocol, port));
                self.set_port(rule.protocol, port, id as u32 + 1)?;
            }
        }
        for rule in self.rules.clone() {
            for port in rule.first..=rule.last {
                if !covered.contains(&(rule.protocol, port)) {
                    self.set_port(rule.protocol, port, 0)?;
                }
            }
        }
        self.rules = spec.protect.clone();
        Ok(())
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, EbpfError> {
        self.ebpf.map_mut(name).ok_or(EbpfError::MissingMap(name))
    }

    fn set_port(&mut self, protocol: Protocol, port: u16, value: u32) -> Result<(), EbpfError> {
        let name = match protocol {
            Protocol::Tcp => "INGRESS_TCP_PORTS",
            Protocol::Udp => "INGRESS_UDP_PORTS",
        };
        let mut array: Array<_, u32> =
            Array::try_from(self.map_mut(name)?).map_err(|_| EbpfError::MissingMap(name))?;
        array
            .set(u32::from(port), value, 0)
            .map_err(|source| EbpfError::Map { name, source })
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
                .map_err(|source| EbpfError::Map { name, source })
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
                .map_err(|source| EbpfError::Map { name, source })
            }
        }
    }

    fn per_cpu_sum(&self, name: &'static str, index: u32) -> Result<u64, EbpfError> {
        per_cpu_sum(&self.ebpf, name, index)
    }

    pub fn counters(&self) -> Result<IngressCounters, EbpfError> {
        let sum = |c: IngressCounter| self.per_cpu_sum("INGRESS_COUNTERS", c as u32);
        Ok(IngressCounters {
            protected: sum(IngressCounter::Protected)?,
            allowed: sum(IngressCounter::Allowed)?,
            dropped: sum(IngressCounter::Dropped)?,
            audited: sum(IngressCounter::Audited)?,
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

    /// The drop events (once; later calls fail). Needs a tokio runtime.
    pub fn take_events(&mut self) -> Result<Events<Intrusion>, EbpfError> {
        Events::take(&mut self.ebpf, "INGRESS_EVENTS", parse)
    }
}

/// Attaches through TCX and pins the link; a link a previous guard pinned
/// gets the new program swapped in (one atomic update, no gap).
fn attach_tcx_pinned(
    program: &mut SchedClassifier,
    iface: &str,
    dir: &Path,
) -> Result<(), EbpfError> {
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
        None => {
            // None pinned, or its interface went away (a defunct link).
            let id = program
                .attach_with_options(
                    iface,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(|e| on_iface(&e))?;
            let link: FdLink = program
                .take_link(id)
                .map_err(|e| on_iface(&e))?
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| on_iface(&e))?;
            // Pinned beside, then renamed over any defunct pin, so the pin
            // path always names a link. (bpffs refuses names with a dot.)
            let fresh = dir.join(format!(
                "new-{TCX_PIN_PREFIX}{iface}-{}",
                std::process::id()
            ));
            let _ = std::fs::remove_file(&fresh);
            link.pin(&fresh).map_err(|e| pin_failed(&fresh, e))?;
            return std::fs::rename(&fresh, &pin).map_err(|source| EbpfError::Pin {
                path: pin.clone(),
                source,
            });
        }
    };
    // Dropping our fd leaves the pinned link attached.
    let link: FdLink = program
        .take_link(id)
        .map_err(|e| on_iface(&e))?
        .try_into()
        .map_err(|e: aya::programs::links::LinkError| on_iface(&e))?;
    drop(link);
    Ok(())
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
    let options = TcAttachOptions::Netlink(NlOptions {
        priority: NETLINK_PRIORITY,
        handle: NETLINK_HANDLE,
        classid: None,
    });
    // Create refuses (EEXIST) without touching a filter already there.
    let id = match program.attach_with_options(iface, TcAttachType::Ingress, options) {
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
        if let Ok(link) = SchedClassifierLink::attached(
            iface,
            TcAttachType::Ingress,
            NETLINK_PRIORITY,
            NETLINK_HANDLE,
            None,
        ) {
            // Fails only when the filter is already gone.
            let _ = link.detach();
        }
        std::fs::remove_dir(&marker).map_err(|source| EbpfError::Pin {
            path: marker,
            source,
        })?;
    }
    Ok(())
}

/// A packet from a stranger to a protected port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intrusion {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub protocol: &'static str,
    pub ifindex: u32,
    /// Passed because enforcement is audit (else dropped).
    pub audited: bool,
}

fn parse(bytes: &[u8]) -> Option<Intrusion> {
    if bytes.len() < std::mem::size_of::<IngressEvent>() {
        return None;
    }
    // SAFETY: the length is checked above, IngressEvent is plain old data
    // (every bit pattern valid) and read_unaligned needs no alignment.
    let e: IngressEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let addr = |words: [u32; 4]| -> IpAddr {
        if e.family == 4 {
            IpAddr::from(words[0].to_ne_bytes())
        } else {
            let mut o = [0u8; 16];
            for (i, w) in words.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::from(o)
        }
    };
    Some(Intrusion {
        source: SocketAddr::new(addr(e.src), e.src_port),
        destination: SocketAddr::new(addr(e.dst), e.dst_port),
        protocol: match e.protocol {
            6 => "tcp",
            17 => "udp",
            _ => "ipv6-extension-headers",
        },
        ifindex: e.ifindex,
        audited: e.audited != 0,
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

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

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

use aya::maps::Array;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::programs::{SchedClassifier, TcAttachType, tc};
use gateway_common::{
    IngressConfig, IngressCounter, IngressEvent, MAX_ALLOWED_SOURCES, MAX_PORT_RULES, enforcement,
};
use ipnet::IpNet;

use super::{EbpfError, Enforcement, Events, object, per_cpu_sum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

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
        let (first, last) = match ports.split_once('-') {
            Some((a, b)) => (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?),
            None => {
                let p: u16 = ports.parse().map_err(|_| bad())?;
                (p, p)
            }
        };
        if first == 0 || first > last {
            return Err(format!("{s:?}: ports run from 1 to 65535, first <= last"));
        }
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

/// The `ingress` classifier attached to the spec's interfaces. It stays
/// attached while this value lives: run `gateway guard` as a service.
pub struct RemoteGuard {
    ebpf: aya::Ebpf,
    rules: Vec<PortRule>,
    allowed: HashSet<IpNet>,
    interfaces: Vec<String>,
}

const PROGRAM: &str = "ingress";

impl RemoteGuard {
    pub fn install(spec: &RemoteSpec) -> Result<Self, EbpfError> {
        if object().is_empty() {
            return Err(EbpfError::NotBuilt);
        }
        let mut guard = RemoteGuard {
            ebpf: aya::EbpfLoader::new().load(object())?,
            rules: Vec::new(),
            allowed: HashSet::new(),
            interfaces: spec.interfaces.clone(),
        };
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
            if let Err(e) = tc::qdisc_add_clsact(iface)
                && !matches!(e, tc::TcError::AlreadyAttached)
                && !e.to_string().contains("exists")
            {
                return Err(EbpfError::Interface {
                    interface: iface.clone(),
                    reason: e.to_string(),
                });
            }
            program
                .attach(iface, TcAttachType::Ingress)
                .map_err(|e| EbpfError::Interface {
                    interface: iface.clone(),
                    reason: e.to_string(),
                })?;
        }
        Ok(guard)
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

//! The only module that talks to the kernel's BPF side (through aya).
//!
//! The local guard: `connect4`/`connect6` on a cgroup v2 subtree refuse
//! connects to protected backends from any process outside the gateway's own
//! cgroup. Maps change in place, programs stay attached.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use aya::Ebpf;
use aya::maps::{Array, HashMap as AyaHashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use gateway_common::{
    ANY_UID, BackendV4, BackendV6, BypassEvent, GuardConfig, GuardCounter, MAX_PROTECTED_PORTS,
    MAX_RULES, enforcement, protocol,
};
use tokio::io::unix::AsyncFd;

pub mod remote;

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("the eBPF programs were not built (AYA_BUILD_SKIP was set at build time)")]
    NotBuilt,
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name:?}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF program {0:?} missing from the object")]
    MissingProgram(&'static str),
    #[error("eBPF map {0:?} missing or of the wrong type")]
    MissingMap(&'static str),
    #[error("reading eBPF map {name:?}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("more than {0} protected rules, ports, addresses or interfaces of a kind")]
    TooManyRules(u32),
    #[error("{0}")]
    Unchangeable(String),
    #[error("watching the guard's event ring buffer: {0}")]
    Events(std::io::Error),
    #[error("bpffs pin {path}: {source}")]
    Pin {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("interface {interface:?}: {reason}")]
    Interface { interface: String, reason: String },
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "pin directory {path} is in use by another guard{}: two guards on one directory would take over each other's rules and links (give each its own pin_dir)",
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    PinDirInUse { path: PathBuf, holder: Option<u32> },
}

/// The eBPF object built by build.rs; aya needs it 8-byte aligned.
fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway"))
}

/// Where file systems of type `kind` are mounted, from /proc/mounts.
fn mounts_of(kind: &str) -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (_dev, dir, fs) = (f.next()?, f.next()?, f.next()?);
            (fs == kind).then(|| PathBuf::from(dir))
        })
        .collect()
}

/// Where cgroup v2 is mounted (not always /sys/fs/cgroup: hybrid hosts mount
/// it at /sys/fs/cgroup/unified).
pub fn cgroup2_mount() -> Option<PathBuf> {
    mounts_of("cgroup2").into_iter().next()
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    /// Refuse bypass attempts with EPERM.
    Enforce,
    /// Count bypass attempts and let them through (staged rollout).
    Audit,
}

/// TCP or UDP: what the guards tell apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    fn number(self) -> u8 {
        match self {
            Protocol::Tcp => protocol::TCP,
            Protocol::Udp => protocol::UDP,
        }
    }

    fn from_number(n: u8) -> Option<Protocol> {
        match n {
            protocol::TCP => Some(Protocol::Tcp),
            protocol::UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

/// A backend only the gateway may reach: one address, one port or a range.
/// Written `10.0.0.5:9000`, `tcp:10.0.0.5:9000-9099`, `udp:[fd00::5]:5353`
/// (TCP when no protocol is named).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Protected {
    pub protocol: Protocol,
    pub ip: IpAddr,
    pub first: u16,
    pub last: u16,
}

/// One (protocol, address, port) the maps hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Target {
    pub protocol: Protocol,
    pub addr: SocketAddr,
}

impl Protected {
    fn targets(self) -> impl Iterator<Item = Target> {
        (self.first..=self.last).map(move |port| Target {
            protocol: self.protocol,
            addr: SocketAddr::new(self.ip, port),
        })
    }

    fn ports(self) -> usize {
        usize::from(self.last - self.first) + 1
    }
}

impl From<SocketAddr> for Protected {
    /// A TCP backend, as routes name them.
    fn from(a: SocketAddr) -> Self {
        Protected {
            protocol: Protocol::Tcp,
            ip: a.ip(),
            first: a.port(),
            last: a.port(),
        }
    }
}

impl std::str::FromStr for Protected {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "{s:?}: expected [tcp:|udp:]ADDRESS:PORT or ADDRESS:FIRST-LAST \
                 (IPv6 in brackets: udp:[fd00::5]:5353)"
            )
        };
        let (protocol, rest) = match s.split_once(':') {
            Some(("tcp", rest)) => (Protocol::Tcp, rest),
            Some(("udp", rest)) => (Protocol::Udp, rest),
            _ => (Protocol::Tcp, s),
        };
        let (ip, ports) = rest.rsplit_once(':').ok_or_else(bad)?;
        let ip: IpAddr = match ip.strip_prefix('[').and_then(|v6| v6.strip_suffix(']')) {
            Some(v6) => v6.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?.into(),
            // Unbracketed, "fd00::5:53" would be one address or another.
            None if ip.contains(':') => return Err(bad()),
            None => ip.parse::<std::net::Ipv4Addr>().map_err(|_| bad())?.into(),
        };
        let (first, last) = port_range(s, ports, bad)?;
        Ok(Protected {
            protocol,
            ip,
            first,
            last,
        })
    }
}

/// `PORT` or `FIRST-LAST` out of `ports` (part of `whole`, for the error).
fn port_range(whole: &str, ports: &str, bad: impl Fn() -> String) -> Result<(u16, u16), String> {
    let (first, last) = match ports.split_once('-') {
        Some((a, b)) => (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?),
        None => {
            let p: u16 = ports.parse().map_err(|_| bad())?;
            (p, p)
        }
    };
    if first == 0 || first > last {
        return Err(format!(
            "{whole:?}: ports run from 1 to 65535, first <= last"
        ));
    }
    Ok((first, last))
}

/// An eBPF loader that reuses (or creates) the named maps pinned in
/// `pin_dir`, so a restart takes over what the previous process left.
fn loader_with_pins(
    pin_dir: Option<&Path>,
    maps: &[&'static str],
) -> Result<aya::EbpfLoader<'static>, EbpfError> {
    let mut loader = aya::EbpfLoader::new();
    if let Some(dir) = pin_dir {
        prepare_pin_dir(dir)?;
        for name in maps {
            loader.map_pin_path(name, dir.join(name));
        }
    }
    Ok(loader)
}

impl<'de> serde::Deserialize<'de> for Protected {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for Protected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = SocketAddr::new(self.ip, self.first);
        write!(f, "{}:{at}", self.protocol.name())?;
        if self.last != self.first {
            write!(f, "-{}", self.last)?;
        }
        Ok(())
    }
}

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

/// The local guard: `connect4`/`connect6` attached to a cgroup subtree,
/// refusing connects to protected backends from anyone but the gateway.
/// Detached when dropped.
pub struct LocalGuard {
    ebpf: Ebpf,
    /// What the maps hold: the rule id (index into the per-rule counters)
    /// of every protected port.
    entries: HashMap<Target, u32>,
    /// Rule ids, stable across updates while a rule stays.
    rule_ids: HashMap<Protected, u32>,
    /// Entries a previous version left with a key this one does not read:
    /// removed by the first update, after the new ones are in.
    foreign_v4: Vec<BackendV4>,
    foreign_v6: Vec<BackendV6>,
}

const PROGRAMS: [&str; 4] = ["connect4", "connect6", "sendmsg4", "sendmsg6"];
const MAPS: [&str; 7] = [
    "GUARD_COUNTERS",
    "GUARD_CONFIG",
    "PROTECTED_V4",
    "PROTECTED_V6",
    "RULE_REFUSALS",
    "EVENTS",
    "EVENT_BUDGET",
];

/// A failed pin as the OS error behind it ("`BPF_OBJ_PIN` failed" alone
/// does not say why).
fn pin_failed(path: &Path, e: aya::pin::PinError) -> EbpfError {
    let source = match e {
        aya::pin::PinError::SyscallError(s) => s.io_error,
        other => std::io::Error::other(other.to_string()),
    };
    EbpfError::Pin {
        path: path.to_owned(),
        source,
    }
}

/// Mounts bpffs at `dir`'s bpffs root (/sys/fs/bpf) when nothing is mounted
/// there yet, and creates `dir`.
fn prepare_pin_dir(dir: &Path) -> Result<(), EbpfError> {
    let root = Path::new("/sys/fs/bpf");
    if dir.starts_with(root) && !mounts_of("bpf").iter().any(|m| m == root) {
        // SAFETY: all pointers are valid NUL-terminated static strings; no
        // data argument is passed.
        let rc = unsafe {
            libc::mount(
                c"bpffs".as_ptr(),
                c"/sys/fs/bpf".as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(EbpfError::Pin {
                path: root.to_owned(),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| EbpfError::Pin {
        path: dir.to_owned(),
        source,
    })
}

/// An exclusive hold on a pin directory for as long as a guard uses it:
/// one guard per directory, so a second one cannot adopt, rewrite and
/// remove the first one's rules and links. Released when dropped (or when
/// the process exits), so a restart takes over.
pub struct PinDirLock {
    _dir: std::fs::File,
}

/// Locks `dir` (an flock on the directory itself: bpffs holds no regular
/// files). Fails at once when another process holds it.
pub fn lock_pin_dir(dir: &Path) -> Result<PinDirLock, EbpfError> {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::fs::MetadataExt as _;
    let pin_err = |source| EbpfError::Pin {
        path: dir.to_owned(),
        source,
    };
    let file = std::fs::File::open(dir).map_err(pin_err)?;
    // SAFETY: flock on a descriptor we own; the result is checked.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(PinDirLock { _dir: file });
    }
    let e = std::io::Error::last_os_error();
    if e.kind() != std::io::ErrorKind::WouldBlock {
        return Err(pin_err(e));
    }
    let inode = file.metadata().map(|m| m.ino()).ok();
    Err(EbpfError::PinDirInUse {
        path: dir.to_owned(),
        holder: inode.and_then(flock_holder),
    })
}

/// The pid holding an flock on `inode`, from /proc/locks
/// ("1: FLOCK  ADVISORY  WRITE 4242 00:2a:1234 0 EOF").
fn flock_holder(inode: u64) -> Option<u32> {
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (kind, pid, file) = (f.get(1)?, f.get(4)?, f.get(5)?);
        let ino: u64 = file.rsplit(':').next()?.parse().ok()?;
        (*kind == "FLOCK" && ino == inode)
            .then(|| pid.parse().ok())
            .flatten()
    })
}

/// Removes every pin under `dir` (links detach, maps go once unused; a remote
/// guard's netlink filters are detached) and `dir`. Refused while a guard
/// runs with it.
pub fn uninstall(dir: &Path) -> Result<usize, EbpfError> {
    if !dir.exists() {
        return Ok(0);
    }
    let _lock = lock_pin_dir(dir)?;
    let pin_err = |path: &Path| {
        let path = path.to_owned();
        move |source| EbpfError::Pin { path, source }
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(pin_err(dir)(e)),
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        match name.strip_prefix(remote::NETLINK_MARKER_PREFIX) {
            // A remote guard's netlink filter: not a pin, so detach it.
            Some(iface) if path.is_dir() => remote::detach_pinned(dir, iface)?,
            _ => std::fs::remove_file(&path).map_err(pin_err(&path))?,
        }
        removed += 1;
    }
    std::fs::remove_dir(dir).map_err(pin_err(dir))?;
    Ok(removed)
}

impl LocalGuard {
    /// Loads the programs, fills the maps, then attaches to `attach_to`, so
    /// protection starts complete (no connect sees half a rule set).
    pub fn install(attach_to: &Path, spec: &GuardSpec) -> Result<Self, EbpfError> {
        if object().is_empty() {
            return Err(EbpfError::NotBuilt);
        }
        let mut loader = loader_with_pins(spec.pin_dir.as_deref(), &MAPS)?;
        let mut guard = Self {
            ebpf: loader.load(object())?,
            entries: HashMap::new(),
            rule_ids: HashMap::new(),
            foreign_v4: Vec::new(),
            foreign_v6: Vec::new(),
        };
        guard.adopt_existing_rules()?;
        guard.update(spec)?;
        for name in PROGRAMS {
            let program: &mut CgroupSockAddr = guard
                .ebpf
                .program_mut(name)
                .ok_or(EbpfError::MissingProgram(name))?
                .try_into()
                .map_err(|source| EbpfError::Program { name, source })?;
            program
                .load()
                .map_err(|source| EbpfError::Program { name, source })?;
            let dir = std::fs::File::open(attach_to).map_err(|source| EbpfError::Cgroup {
                path: attach_to.to_owned(),
                source,
            })?;
            // Single: on kernels with BPF links (5.7+) aya attaches by link,
            // which never displaces other programs and refuses ALLOW_MULTI.
            let link = program
                .attach(dir, CgroupAttachMode::Single)
                .map_err(|source| EbpfError::Program { name, source })?;
            if let Some(pin_dir) = &spec.pin_dir {
                // Pin the new link first, then let go of any a previous
                // gateway pinned: both refuse in between, so no gap.
                let fd_link: aya::programs::links::FdLink = program
                    .take_link(link)
                    .map_err(|source| EbpfError::Program { name, source })?
                    .try_into()
                    .map_err(|e: aya::programs::links::LinkError| EbpfError::Pin {
                        path: pin_dir.clone(),
                        source: std::io::Error::other(e.to_string()),
                    })?;
                let ours = pin_dir.join(format!("link-{name}-{}", std::process::id()));
                let _ = std::fs::remove_file(&ours);
                fd_link.pin(&ours).map_err(|e| pin_failed(&ours, e))?;
                let prefix = format!("link-{name}-");
                for old in std::fs::read_dir(pin_dir).into_iter().flatten().flatten() {
                    let path = old.path();
                    let is_old =
                        old.file_name().to_string_lossy().starts_with(&prefix) && path != ours;
                    if is_old {
                        // The last reference to an old link: removing it detaches it.
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
        }
        Ok(guard)
    }

    /// Takes over the rules a previous gateway left in pinned maps, so
    /// stale entries are removed by the next update rather than lingering.
    fn adopt_existing_rules(&mut self) -> Result<(), EbpfError> {
        let mut found = Vec::new();
        let (mut foreign_v4, mut foreign_v6) = (Vec::new(), Vec::new());
        for item in self.v4()?.iter() {
            let (k, id) = item.map_err(|source| EbpfError::Map {
                name: "PROTECTED_V4",
                source,
            })?;
            let ip = std::net::Ipv4Addr::from(k.addr.to_ne_bytes());
            match Protocol::from_number(k.protocol) {
                Some(protocol) => found.push((
                    Target {
                        protocol,
                        addr: SocketAddr::from((ip, u16::from_be(k.port))),
                    },
                    id,
                )),
                None => foreign_v4.push(k),
            }
        }
        for item in self.v6()?.iter() {
            let (k, id) = item.map_err(|source| EbpfError::Map {
                name: "PROTECTED_V6",
                source,
            })?;
            let mut o = [0u8; 16];
            for (i, w) in k.addr.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            let addr = SocketAddr::from((std::net::Ipv6Addr::from(o), u16::from_be(k.port)));
            match Protocol::from_number(k.protocol) {
                Some(protocol) => found.push((Target { protocol, addr }, id)),
                None => foreign_v6.push(k),
            }
        }
        self.entries.extend(found);
        self.foreign_v4 = foreign_v4;
        self.foreign_v6 = foreign_v6;
        Ok(())
    }

    /// Changes the protected set and settings in place, programs attached:
    /// new entries go in before stale ones come out, so there is no gap.
    pub fn update(&mut self, spec: &GuardSpec) -> Result<(), EbpfError> {
        let config = GuardConfig {
            gateway_cgroup: cgroup_id(&spec.gateway_cgroup)?,
            enforcement: match spec.enforcement {
                Enforcement::Enforce => enforcement::ENFORCE,
                Enforcement::Audit => enforcement::AUDIT,
            },
            gateway_uid: spec.gateway_uid.unwrap_or(ANY_UID),
        };
        let mut array: Array<_, GuardConfig> = Array::try_from(
            self.ebpf
                .map_mut("GUARD_CONFIG")
                .ok_or(EbpfError::MissingMap("GUARD_CONFIG"))?,
        )
        .map_err(|_| EbpfError::MissingMap("GUARD_CONFIG"))?;
        array.set(0, config, 0).map_err(|source| EbpfError::Map {
            name: "GUARD_CONFIG",
            source,
        })?;

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
        // A rule keeps its id (and so its counter) while it stays; a new
        // one takes over the id its ports had, else the lowest free one.
        // Two passes, so a new rule never takes an id a staying one keeps.
        let mut ids: HashMap<Protected, u32> = HashMap::new();
        let mut taken: HashSet<(bool, u32)> = HashSet::new();
        for rule in &rules {
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
        for rule in &rules {
            let v6 = rule.ip.is_ipv6();
            if !ids.contains_key(rule) {
                let id = (0..MAX_RULES)
                    .find(|id| !taken.contains(&(v6, *id)))
                    .ok_or(EbpfError::TooManyRules(MAX_RULES))?;
                taken.insert((v6, id));
                ids.insert(*rule, id);
            }
        }
        let mut wanted: HashSet<Target> = HashSet::new();
        for rule in &rules {
            let id = ids[rule];
            for target in rule.targets() {
                wanted.insert(target);
                if self.entries.get(&target) != Some(&id) {
                    self.insert(target, id)?;
                    self.entries.insert(target, id);
                }
            }
        }
        let stale: Vec<Target> = self
            .entries
            .keys()
            .filter(|t| !wanted.contains(t))
            .copied()
            .collect();
        for target in stale {
            self.remove(target)?;
            self.entries.remove(&target);
        }
        for key in std::mem::take(&mut self.foreign_v4) {
            let _ = self.v4()?.remove(&key);
        }
        for key in std::mem::take(&mut self.foreign_v6) {
            let _ = self.v6()?.remove(&key);
        }
        self.rule_ids = ids;
        Ok(())
    }

    fn insert(&mut self, target: Target, id: u32) -> Result<(), EbpfError> {
        match target.addr {
            SocketAddr::V4(a) => {
                let mut map: AyaHashMap<_, BackendV4, u32> = self.v4()?;
                map.insert(key_v4(a, target.protocol), id, 0)
                    .map_err(|source| EbpfError::Map {
                        name: "PROTECTED_V4",
                        source,
                    })
            }
            SocketAddr::V6(a) => {
                let mut map: AyaHashMap<_, BackendV6, u32> = self.v6()?;
                map.insert(key_v6(a, target.protocol), id, 0)
                    .map_err(|source| EbpfError::Map {
                        name: "PROTECTED_V6",
                        source,
                    })
            }
        }
    }

    fn remove(&mut self, target: Target) -> Result<(), EbpfError> {
        match target.addr {
            SocketAddr::V4(a) => {
                let mut map: AyaHashMap<_, BackendV4, u32> = self.v4()?;
                map.remove(&key_v4(a, target.protocol))
                    .map_err(|source| EbpfError::Map {
                        name: "PROTECTED_V4",
                        source,
                    })
            }
            SocketAddr::V6(a) => {
                let mut map: AyaHashMap<_, BackendV6, u32> = self.v6()?;
                map.remove(&key_v6(a, target.protocol))
                    .map_err(|source| EbpfError::Map {
                        name: "PROTECTED_V6",
                        source,
                    })
            }
        }
    }

    fn v4(&mut self) -> Result<AyaHashMap<&mut aya::maps::MapData, BackendV4, u32>, EbpfError> {
        AyaHashMap::try_from(
            self.ebpf
                .map_mut("PROTECTED_V4")
                .ok_or(EbpfError::MissingMap("PROTECTED_V4"))?,
        )
        .map_err(|_| EbpfError::MissingMap("PROTECTED_V4"))
    }

    fn v6(&mut self) -> Result<AyaHashMap<&mut aya::maps::MapData, BackendV6, u32>, EbpfError> {
        AyaHashMap::try_from(
            self.ebpf
                .map_mut("PROTECTED_V6")
                .ok_or(EbpfError::MissingMap("PROTECTED_V6"))?,
        )
        .map_err(|_| EbpfError::MissingMap("PROTECTED_V6"))
    }

    fn per_cpu_sum(&self, name: &'static str, index: u32) -> Result<u64, EbpfError> {
        per_cpu_sum(&self.ebpf, name, index)
    }

    pub fn counters(&self) -> Result<GuardCounters, EbpfError> {
        let sum = |c: GuardCounter| self.per_cpu_sum("GUARD_COUNTERS", c as u32);
        Ok(GuardCounters {
            seen: sum(GuardCounter::Seen)?,
            allowed: sum(GuardCounter::Allowed)?,
            refused: sum(GuardCounter::Refused)?,
            audited: sum(GuardCounter::Audited)?,
        })
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
        self.per_cpu_sum("RULE_REFUSALS", index)
    }
}

/// Who tried to reach a protected backend around the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BypassAttempt {
    pub pid: u32,
    pub uid: u32,
    pub cgroup: u64,
    pub comm: String,
    pub destination: SocketAddr,
    pub protocol: Protocol,
    /// Let through because enforcement is audit (else refused with EPERM).
    pub audited: bool,
}

/// A guard's events as they arrive from its ring buffer, parsed.
pub struct Events<T> {
    ring: AsyncFd<RingBuf<MapData>>,
    parse: fn(&[u8]) -> Option<T>,
}

impl<T> Events<T> {
    /// Takes the ring buffer `name` out of `ebpf` (once; later calls fail).
    /// Needs a tokio runtime.
    fn take(
        ebpf: &mut Ebpf,
        name: &'static str,
        parse: fn(&[u8]) -> Option<T>,
    ) -> Result<Self, EbpfError> {
        let map = ebpf.take_map(name).ok_or(EbpfError::MissingMap(name))?;
        let ring = RingBuf::try_from(map).map_err(|_| EbpfError::MissingMap(name))?;
        // SAFETY: the ring buffer owns its map fd; it stays open and the same
        // for as long as the AsyncFd owns the RingBuf.
        let ring = unsafe { AsyncFd::register(ring) }.map_err(|e| EbpfError::Events(e.into()))?;
        Ok(Events { ring, parse })
    }

    /// The next event; None when the ring buffer can no longer be watched.
    pub async fn next(&mut self) -> Option<T> {
        loop {
            let mut ready = self.ring.readable_mut().await.ok()?;
            if let Some(item) = ready.get_inner_mut().next() {
                match (self.parse)(&item) {
                    Some(event) => return Some(event),
                    None => continue,
                }
            }
            ready.clear_ready();
        }
    }
}

/// One counter of a per-CPU array, summed over the CPUs.
fn per_cpu_sum(ebpf: &Ebpf, name: &'static str, index: u32) -> Result<u64, EbpfError> {
    let map = ebpf.map(name).ok_or(EbpfError::MissingMap(name))?;
    let array: PerCpuArray<_, u64> =
        PerCpuArray::try_from(map).map_err(|_| EbpfError::MissingMap(name))?;
    let values = array
        .get(&index, 0)
        .map_err(|source| EbpfError::Map { name, source })?;
    Ok(values.iter().sum())
}

fn parse_event(bytes: &[u8]) -> Option<BypassAttempt> {
    if bytes.len() < std::mem::size_of::<BypassEvent>() {
        return None;
    }
    // SAFETY: the length is checked above, BypassEvent is plain old data
    // (every bit pattern valid) and read_unaligned needs no alignment.
    let e: BypassEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let port = u16::from_be(e.port);
    let bytes_of = |w: u32| w.to_ne_bytes();
    let destination = if e.family == 4 {
        SocketAddr::from((std::net::Ipv4Addr::from(bytes_of(e.addr[0])), port))
    } else {
        let mut o = [0u8; 16];
        for (i, w) in e.addr.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&bytes_of(*w));
        }
        SocketAddr::from((std::net::Ipv6Addr::from(o), port))
    };
    let comm_len = e.comm.iter().position(|b| *b == 0).unwrap_or(e.comm.len());
    Some(BypassAttempt {
        pid: e.pid,
        uid: e.uid,
        cgroup: e.cgroup,
        comm: String::from_utf8_lossy(&e.comm[..comm_len]).into_owned(),
        destination,
        protocol: Protocol::from_number(e.protocol).unwrap_or(Protocol::Tcp),
        audited: e.audited != 0,
    })
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
    let o = a.ip().octets();
    let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    BackendV6 {
        addr: [word(0), word(4), word(8), word(12)],
        port: a.port().to_be(),
        protocol: protocol.number(),
        _pad: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protected_backends_parse_and_say_what_is_wrong() {
        let p: Protected = "10.0.0.5:9000".parse().unwrap();
        assert_eq!(
            p,
            Protected::from("10.0.0.5:9000".parse::<SocketAddr>().unwrap())
        );
        let p: Protected = "udp:[fd00::5]:5000-5010".parse().unwrap();
        assert_eq!(
            (p.protocol, p.ip.to_string(), p.first, p.last, p.ports()),
            (Protocol::Udp, "fd00::5".to_owned(), 5000, 5010, 11)
        );
        assert_eq!(p.to_string(), "udp:[fd00::5]:5000-5010");
        assert_eq!(
            "tcp:10.0.0.5:1-2".parse::<Protected>().unwrap().to_string(),
            "tcp:10.0.0.5:1-2"
        );
        for bad in [
            "10.0.0.5",
            "sctp:10.0.0.5:1",
            "10.0.0.5:0",
            "10.0.0.5:10-9",
            "fd00::5:53",
            "host.example:80",
            "udp:10.0.0.5:70000",
        ] {
            assert!(bad.parse::<Protected>().is_err(), "{bad}");
        }
    }
}

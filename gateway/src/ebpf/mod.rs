//! The only module that talks to the kernel's BPF side (through aya).
//!
//! `local`: the local guard on the gateway's host (cgroup hooks that
//! refuse connects, datagrams and raw packets to protected backends from
//! anyone but the gateway). `remote`: the remote guard on a backend host (a
//! TC classifier and a socket-level program that let only the gateways'
//! addresses reach protected ports). `block_list`: the admission block
//! list's XDP program on the gateway's host (new connections from blocked
//! sources dropped before a socket exists). Here: what they share: the
//! rule types, pins and their lock, event ring buffers, counters.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

use aya::Ebpf;
use aya::maps::{MapData, PerCpuArray, RingBuf};
use gateway_common::protocol;
use tokio::io::unix::AsyncFd;

pub mod block_list;
pub mod local;
pub mod remote;

pub use local::{
    BypassAttempt, GuardCounters, GuardSpec, LocalAttempts, LocalGuard, Repair, cgroup_id,
};

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
    #[error("writing eBPF map {name:?}: {source}")]
    MapWrite {
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
    #[error("{count} listener addresses, more than the {max} the block list judges")]
    TooManyListeners { count: usize, max: u32 },
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
    #[error(
        "pin directory {path}: {reason}; whoever can write there can remove the guard's pins (and with them its programs) or plant others: use a directory only root can write"
    )]
    UnsafePinDir { path: PathBuf, reason: String },
    #[error(
        "pin directory {} belongs to {}, not to this user ({}): someone made it before the gateway could ({} lets every user create directories); its pins could be removed or replaced by them. Look at what is in it, remove it (`rm -r {}`) and start again, or create the pin directory at boot before users can (systemd-tmpfiles: `{}`)",
        path.display(),
        describe_user(*owner),
        gateway.describe(),
        path.parent().unwrap_or(path).display(),
        path.display(),
        gateway.tmpfiles_line(path)
    )]
    PinDirTaken {
        path: PathBuf,
        owner: u32,
        gateway: Account,
    },
    #[error(
        "pin directory {} belongs to root, but the gateway runs as {}: it cannot pin there (the directory must be the gateway's own, writable by no one else). Make it the gateway's (`chown {}:{} {}`) or create it so at boot (systemd-tmpfiles: `{}`)",
        path.display(),
        gateway.describe(),
        gateway.user,
        gateway.group,
        path.display(),
        gateway.tmpfiles_line(path)
    )]
    PinDirOfRoot { path: PathBuf, gateway: Account },
    #[error("binding the socket that marks the gateway's network namespace: {0}")]
    NetnsMark(std::io::Error),
    #[error("asking which programs are attached to {path}: {source}")]
    Query {
        path: PathBuf,
        source: std::io::Error,
    },
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
/// there yet (root's alone: mode 0700), and creates `dir` (0700), refusing
/// one that anyone but this user could write: there the pins, which keep
/// the programs attached, could be removed or replaced. Every directory
/// above it must be this user's or root's and writable by no one else
/// (or sticky, like /tmp and bpffs' own root), and none a symlink.
fn prepare_pin_dir(dir: &Path) -> Result<(), EbpfError> {
    use std::os::unix::fs::MetadataExt as _;
    let root = Path::new("/sys/fs/bpf");
    if dir.starts_with(root) && !is_bpffs(root) {
        // SAFETY: all pointers are valid NUL-terminated static strings.
        let rc = unsafe {
            libc::mount(
                c"bpffs".as_ptr(),
                c"/sys/fs/bpf".as_ptr(),
                c"bpf".as_ptr(),
                0,
                c"mode=0700".as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(EbpfError::Pin {
                path: root.to_owned(),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    let unsafe_dir = |reason: String| EbpfError::UnsafePinDir {
        path: dir.to_owned(),
        reason,
    };
    if !dir.is_absolute() {
        return Err(unsafe_dir("not an absolute path".into()));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let ancestors: Vec<&Path> = dir.ancestors().skip(1).collect();
    for above in ancestors.into_iter().rev() {
        let meta = match std::fs::symlink_metadata(above) {
            Ok(m) => m,
            // Created below, 0700.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
            Err(e) => return Err(unsafe_dir(format!("{}: {e}", above.display()))),
        };
        crate::safe_dir::check(&meta, euid, true)
            .map_err(|why| unsafe_dir(format!("{} {why}", above.display())))?;
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| EbpfError::Pin {
            path: dir.to_owned(),
            source,
        })?;
    // What is there now, whoever made it, through a handle that does not
    // follow a symlink.
    let meta = open_dir_nofollow(dir)
        .and_then(|d| d.metadata())
        .map_err(|e| unsafe_dir(e.to_string()))?;
    if meta.uid() != euid {
        return Err(pin_dir_not_ours(dir, meta.uid(), Account::effective()));
    }
    crate::safe_dir::check(&meta, euid, false).map_err(|why| unsafe_dir(format!("it {why}")))
}

/// Why a pin directory owned by `owner` is refused to `gateway`, which
/// does not own it. Root's (made at boot for a gateway running as root,
/// or by hand) is no one's attack: say it needs to be the gateway's. Any
/// other user's may be one: in a world-writable parent (bpffs' root is
/// 1777 on most hosts) any user may make it first.
fn pin_dir_not_ours(dir: &Path, owner: u32, gateway: Account) -> EbpfError {
    if owner == 0 {
        EbpfError::PinDirOfRoot {
            path: dir.to_owned(),
            gateway,
        }
    } else {
        EbpfError::PinDirTaken {
            path: dir.to_owned(),
            owner,
            gateway,
        }
    }
}

/// The user and group the gateway runs as, named as systemd-tmpfiles and
/// chown take them (the number where /etc/passwd or /etc/group has no
/// name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub uid: u32,
    pub user: String,
    pub group: String,
}

impl Account {
    fn effective() -> Account {
        // SAFETY: geteuid and getegid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        Account::named(
            uid,
            gid,
            &read_or_empty("/etc/passwd"),
            &read_or_empty("/etc/group"),
        )
    }

    /// From the contents of /etc/passwd and /etc/group.
    fn named(uid: u32, gid: u32, passwd: &str, group: &str) -> Account {
        Account {
            uid,
            user: name_of(passwd, uid).unwrap_or_else(|| uid.to_string()),
            group: name_of(group, gid).unwrap_or_else(|| gid.to_string()),
        }
    }

    /// "uid 998 (gateway)".
    fn describe(&self) -> String {
        if self.user == self.uid.to_string() {
            format!("uid {}", self.uid)
        } else {
            format!("uid {} ({})", self.uid, self.user)
        }
    }

    /// The systemd-tmpfiles line that makes `dir` at boot, the gateway's.
    fn tmpfiles_line(&self, dir: &Path) -> String {
        format!("d {} 0700 {} {} -", dir.display(), self.user, self.group)
    }
}

fn read_or_empty(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The name in /etc/passwd or /etc/group (`name:x:id:...`) whose id is `id`.
fn name_of(table: &str, id: u32) -> Option<String> {
    table.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        (fields.nth(1)?.parse::<u32>().ok()? == id).then(|| name.to_owned())
    })
}

/// "uid 65534 (nobody)": a uid with its name from /etc/passwd, if it has one.
fn describe_user(uid: u32) -> String {
    match name_of(&read_or_empty("/etc/passwd"), uid) {
        Some(name) => format!("uid {uid} ({name})"),
        None => format!("uid {uid}"),
    }
}

/// Whether `path` is on a BPF file system (what is mounted there, as this
/// thread sees it).
fn is_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let Ok(at) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain data; zero is a valid starting value.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid path and a statfs to fill.
    let rc = unsafe { libc::statfs(at.as_ptr(), &raw mut fs) };
    rc == 0 && fs.f_type as i64 == BPF_FS_MAGIC
}

/// Opens directory `dir` itself, never what a symlink there points to.
fn open_dir_nofollow(dir: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)
}

/// The ids of the programs attached directly to cgroup `cgroup` for
/// `attach_type` (a `bpf_attach_type`), by `BPF_PROG_QUERY`.
fn attached_programs(cgroup: &Path, attach_type: u32) -> Result<Vec<u32>, EbpfError> {
    use std::os::fd::AsRawFd as _;
    const BPF_PROG_QUERY: libc::c_long = 16;
    let failed = |source| EbpfError::Query {
        path: cgroup.to_owned(),
        source,
    };
    let target = std::fs::File::open(cgroup).map_err(failed)?;
    let mut ids = vec![0u32; 64];
    loop {
        // union bpf_attr, query: target_fd, attach_type, query_flags,
        // attach_flags, prog_ids (u64), prog_cnt.
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&(target.as_raw_fd() as u32).to_ne_bytes());
        attr[4..8].copy_from_slice(&attach_type.to_ne_bytes());
        attr[16..24].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
        attr[24..28].copy_from_slice(&(ids.len() as u32).to_ne_bytes());
        // SAFETY: attr is a zero-padded bpf_attr of the size passed; the
        // kernel writes at most prog_cnt ids into `ids`, which has room.
        let rc =
            unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_QUERY, attr.as_mut_ptr(), attr.len()) };
        let count = u32::from_ne_bytes([attr[24], attr[25], attr[26], attr[27]]) as usize;
        if rc == 0 {
            ids.truncate(count.min(ids.len()));
            return Ok(ids);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOSPC) && count > ids.len() && count <= 65536 {
            ids = vec![0u32; count];
            continue;
        }
        return Err(failed(e));
    }
}

/// A link the guard made and pinned, held open while the guard runs: the
/// program stays attached even when someone removes the pin, and
/// [`HeldLink::check`] puts the pin back.
struct HeldLink {
    /// A reference of our own (by id), so pinning again never risks it.
    fd: std::os::fd::OwnedFd,
    path: PathBuf,
    id: u32,
}

impl HeldLink {
    /// Pins `link` at `path` (replacing whatever is there) and holds it.
    fn pin(link: aya::programs::links::FdLink, path: PathBuf) -> Result<HeldLink, EbpfError> {
        let failed = |source| EbpfError::Pin {
            path: path.clone(),
            source,
        };
        let id = link
            .info()
            .map_err(|e| failed(std::io::Error::other(e.to_string())))?
            .id();
        let fd = bpf_fd(BPF_LINK_GET_FD_BY_ID, &id.to_ne_bytes()).map_err(failed)?;
        let _ = std::fs::remove_file(&path);
        // aya's own descriptor goes; ours holds the link from here on.
        link.pin(&path).map_err(|e| pin_failed(&path, e))?;
        Ok(HeldLink { fd, path, id })
    }

    /// Whether the pin still names this link; if not (removed, replaced),
    /// pins it again and says so (true).
    fn check(&mut self) -> Result<bool, EbpfError> {
        let pinned = aya::programs::links::PinnedLink::from_pin(&self.path)
            .ok()
            .map(aya::programs::links::FdLink::from)
            .and_then(|l| l.info().ok())
            .map(|info| info.id());
        if pinned == Some(self.id) {
            return Ok(false);
        }
        use std::os::fd::AsRawFd as _;
        use std::os::unix::ffi::OsStrExt as _;
        let failed = |source| EbpfError::Pin {
            path: self.path.clone(),
            source,
        };
        let path = std::ffi::CString::new(self.path.as_os_str().as_bytes())
            .map_err(|e| failed(std::io::Error::other(e)))?;
        let _ = std::fs::remove_file(&self.path);
        // bpf_attr for BPF_OBJ_PIN: pathname (u64), bpf_fd, file_flags.
        let mut attr = [0u8; 16];
        attr[0..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
        attr[8..12].copy_from_slice(&(self.fd.as_raw_fd() as u32).to_ne_bytes());
        bpf_call(BPF_OBJ_PIN, &attr).map_err(failed)?;
        Ok(true)
    }
}

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;

/// One bpf(2) call with `attr` (zero-padded to the kernel's bpf_attr).
fn bpf_call(cmd: libc::c_long, attr: &[u8]) -> std::io::Result<libc::c_long> {
    let mut full = [0u8; 128];
    let Some(room) = full.get_mut(..attr.len()) else {
        return Err(std::io::Error::from_raw_os_error(libc::E2BIG));
    };
    room.copy_from_slice(attr);
    // SAFETY: full is a zero-padded bpf_attr of the size passed; pointers
    // in it point at memory that outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, full.as_mut_ptr(), full.len()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

/// A bpf(2) call that returns a new descriptor.
fn bpf_fd(cmd: libc::c_long, attr: &[u8]) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    let fd = bpf_call(cmd, attr)?;
    // SAFETY: a fresh descriptor the kernel gave this process.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
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
    let file = open_dir_nofollow(dir).map_err(pin_err)?;
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

/// Program `name` of `ebpf`, as the type its attach point takes.
fn program_mut<'a, T>(ebpf: &'a mut aya::Ebpf, name: &'static str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(EbpfError::MissingProgram(name))?
        .try_into()
        .map_err(|source| EbpfError::Program { name, source })
}

/// Empties a per-CPU tally map: every key with its values, one per CPU. A
/// key gone between listing and reading is skipped.
fn take_tallies<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<Vec<(K, Vec<V>)>, EbpfError> {
    let mut map: aya::maps::PerCpuHashMap<_, K, V> =
        aya::maps::PerCpuHashMap::try_from(ebpf.map_mut(name).ok_or(EbpfError::MissingMap(name))?)
            .map_err(|_| EbpfError::MissingMap(name))?;
    let keys: Vec<K> = map.keys().filter_map(Result::ok).collect();
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        let Ok(values) = map.get(&key, 0) else {
            continue;
        };
        let _ = map.remove(&key);
        out.push((key, values.iter().copied().collect()));
    }
    Ok(out)
}

/// Removes pins of maps earlier versions used and this one does not (a
/// map whose key or kind changed gets a new name, so an old pin is never
/// reused with the wrong layout).
fn remove_obsolete_pins(pin_dir: Option<&Path>, names: &[&str]) {
    for name in names {
        if let Some(dir) = pin_dir {
            let _ = std::fs::remove_file(dir.join(name));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_dir_not_the_gateway_s_is_refused_with_advice_that_works_for_its_user() {
        let passwd = "root:x:0:0::/root:/bin/sh\ngateway:x:998:997::/:/usr/sbin/nologin\nnobody:x:65534:65534::/:/bin/false\n";
        let group = "root:x:0:\ngateway:x:997:\n";
        let dir = Path::new("/sys/fs/bpf/gateway");
        let service = Account::named(998, 997, passwd, group);
        // Root's directory for a gateway running as uid 998 with
        // capabilities: nobody's attack, and following the advice must
        // give a directory the gateway accepts (its own, not root's).
        let err = pin_dir_not_ours(dir, 0, service.clone()).to_string();
        assert!(!err.contains("someone made it"), "{err}");
        for says in [
            "belongs to root",
            "uid 998 (gateway)",
            "`d /sys/fs/bpf/gateway 0700 gateway gateway -`",
            "`chown gateway:gateway /sys/fs/bpf/gateway`",
        ] {
            assert!(err.contains(says), "the error says {says:?}: {err}");
        }
        // Another user's directory may be an attack, whoever the gateway is.
        let err = pin_dir_not_ours(dir, 65534, service).to_string();
        for says in [
            "someone made it",
            "uid 65534",
            "`rm -r /sys/fs/bpf/gateway`",
            "`d /sys/fs/bpf/gateway 0700 gateway gateway -`",
        ] {
            assert!(err.contains(says), "the error says {says:?}: {err}");
        }
        assert!(!err.contains("root root"), "{err}");
        let root = Account::named(0, 0, passwd, group);
        let err = pin_dir_not_ours(dir, 65534, root).to_string();
        assert!(
            err.contains("`d /sys/fs/bpf/gateway 0700 root root -`"),
            "{err}"
        );
        // Ids without names are given as numbers, which tmpfiles takes too.
        let unnamed = Account::named(4242, 4343, passwd, group);
        let err = pin_dir_not_ours(dir, 0, unnamed).to_string();
        assert!(
            err.contains("`d /sys/fs/bpf/gateway 0700 4242 4343 -`"),
            "{err}"
        );
    }

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

//! Running as an unprivileged user once everything privileged is done.
//!
//! `user = "gateway"`: after every listener and the admin endpoint are
//! bound and the eBPF programs installed, the process changes its user,
//! group and supplementary groups, and keeps only the capabilities the
//! configured features still need after start (`kept`), each for a reason
//! the log and the README give.
//!
//! User and groups change process-wide (glibc runs setgroups, setresgid
//! and setresuid on every thread), but capabilities are per thread, and the
//! runtime's workers exist before the gateway is built. So the order is:
//! 1. `Gate::prepare`, while the process has one thread: keep-caps on (it
//!    is inherited by every thread created after), so the change of user
//!    leaves each thread's permitted set for it to narrow;
//! 2. the runtime starts; each of its threads waits in `Gate::hook` (its
//!    start hook) before running any task;
//! 3. the gateway is built on the main thread (binding, eBPF);
//! 4. `Gate::drop_to`: the user changes on every thread, the main thread
//!    narrows its capabilities, then opens the gate: every waiting thread
//!    narrows its own; threads created later inherit the narrow set (the
//!    accept workers beyond the main thread, see `workers`, are started
//!    only after this, by `App::serve`);
//! 5. every thread of the process is read back from /proc and compared
//!    with the target: any difference, or a thread that did not get there
//!    in time, and the gateway does not start.

use std::collections::HashSet;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use caps::{CapSet, Capability, CapsHashSet};

use crate::config::Config;

/// How long the runtime's threads get to narrow their capabilities once
/// the gate opens.
const SETTLE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("user {0:?}: no such user")]
    UnknownUser(String),
    #[error("group {0:?}: no such group")]
    UnknownGroup(String),
    #[error("{what} {name:?}: lookup failed: {source}")]
    Lookup {
        what: &'static str,
        name: String,
        source: std::io::Error,
    },
    #[error("user {0:?} is root: running as it drops nothing; name an unprivileged user")]
    Root(String),
    /// Group 0 is root's group: files root's group may write or read
    /// (root:root 0640 and 0660 ones) stay open to the dropped process.
    #[error(
        "user {user:?}: {what} is root's (gid 0): running with it keeps access to what root's group may read or write; name a user (or `group`) that is not in group root"
    )]
    RootGroup { user: String, what: &'static str },
    #[error(
        "user {user:?} (uid {uid}) is the gateway's ({why}): the issuer runs as a user of its own \
         (the package's gateway-issuer), or code running in the network-facing gateway could read \
         the SSO CA's key and a compromised issuer write the gateway's files; set \
         user = \"gateway-issuer\" and chown -R gateway-issuer: the CA directory"
    )]
    GatewaysUser { user: String, uid: u32, why: String },
    #[error("user = {user:?} needs the gateway started as root (running as uid {euid})")]
    NotRoot { user: String, euid: u32 },
    #[error(
        "the process has {0} threads before the runtime starts; capabilities are per thread, \
         so the drop must begin single-threaded"
    )]
    Threads(usize),
    #[error("cannot drop privileges: {what}: {source}")]
    Syscall {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot drop privileges: {what}: {reason}")]
    Caps { what: &'static str, reason: String },
    #[error("privileges not dropped on every thread: {0}")]
    Verify(String),
    #[error("the runtime's threads were not released (the gateway failed before the drop)")]
    Abandoned,
    #[error(
        "the config {path} could be rewritten by user {user:?}, whom the gateway drops to: {why}; \
         root reads it at the next start, so a compromised gateway could make that start keep root \
         (remove `user`). Make the config and every directory above it root's and writable by \
         root alone, none of them sticky and world-writable like /tmp (chown root: FILE DIR; \
         chmod go-w FILE DIR)"
    )]
    ConfigWritable {
        path: PathBuf,
        user: String,
        why: String,
    },
    /// The gateway's config could not be read as a regular file: what it
    /// says (the user the gateway drops to) would go unchecked.
    #[error(
        "cannot read the gateway's config {path} to learn whom the gateway drops to: {source}; \
         the issuer's start is refused rather than left unchecked (it must be a regular file)"
    )]
    GatewayConfig {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A capability kept after the drop, and the feature that needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kept {
    pub capability: Capability,
    pub why: &'static str,
}

/// Who the gateway becomes, and what it keeps.
#[derive(Debug, Clone)]
pub struct Target {
    pub user: String,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    /// Supplementary groups: the user's, from the group database (a key
    /// readable by group `ssl-cert` stays readable), or only `gid` when the
    /// config names `group`.
    pub groups: Vec<libc::gid_t>,
    pub kept: Vec<Kept>,
}

impl Target {
    /// The config's `user` (and `group`), looked up, with the capabilities
    /// its features need; None when it names no user.
    pub fn resolve(config: &Config) -> Result<Option<Target>, PrivilegeError> {
        let Some(user) = &config.user else {
            return Ok(None);
        };
        let (uid, user_gid) = lookup_user(user)?;
        if uid == 0 {
            return Err(PrivilegeError::Root(user.clone()));
        }
        let (gid, groups) = match &config.group {
            Some(group) => {
                let gid = lookup_group(group)?;
                (gid, vec![gid])
            }
            None => (user_gid, group_list(user, user_gid)?),
        };
        if gid == 0 {
            return Err(PrivilegeError::RootGroup {
                user: user.clone(),
                what: if config.group.is_some() {
                    "`group`"
                } else {
                    "its primary group"
                },
            });
        }
        if groups.contains(&0) {
            return Err(PrivilegeError::RootGroup {
                user: user.clone(),
                what: "one of its supplementary groups",
            });
        }
        Ok(Some(Target {
            user: user.clone(),
            uid,
            gid,
            groups,
            kept: kept(config),
        }))
    }

    /// Refuses a config (`path`) the dropped-to user could rewrite: the
    /// file or any directory above it, on the path as given and through
    /// every symlink (see `safe_dir::writable_by`). Only for a
    /// start as root: a gateway already running as its user reads what
    /// that user can write, and nothing is gained by refusing it.
    pub fn check_config(&self, path: &Path) -> Result<(), PrivilegeError> {
        let mut groups = self.groups.clone();
        groups.push(self.gid);
        match crate::safe_dir::writable_by(path, self.uid, &groups) {
            None => Ok(()),
            Some(why) => Err(PrivilegeError::ConfigWritable {
                path: path.to_owned(),
                user: self.user.clone(),
                why,
            }),
        }
    }

    fn capabilities(&self) -> CapsHashSet {
        self.kept.iter().map(|k| k.capability).collect()
    }
}

/// What each configured feature still does after start, and so keeps:
/// - the guard (enforcement not off): re-attaches a detached program and
///   re-pins its link (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN for a link by
///   id), reads its attachments (CAP_NET_ADMIN), closes older connections
///   to protected backends (SOCK_DESTROY: CAP_NET_ADMIN), writes its maps
///   as addresses and backends change (CAP_BPF: kernels before 6.5 refuse
///   any bpf() call without it when unprivileged BPF is off), and pins into
///   its root-owned pin directory (CAP_DAC_OVERRIDE);
/// - the kernel block list: attaches XDP to interfaces a reload adds
///   (CAP_NET_ADMIN, CAP_BPF) and writes its maps (CAP_BPF);
/// - a listener or the admin endpoint on a port below
///   net.ipv4.ip_unprivileged_port_start: a reload may bind another
///   (CAP_NET_BIND_SERVICE). Without one, a reload that moves a listener
///   to such a port fails: the port is refused, the running state kept.
///
/// Nothing else: TLS, kTLS, splice and the access log need none.
pub fn kept(config: &Config) -> Vec<Kept> {
    let mut out: Vec<Kept> = Vec::new();
    let mut keep = |capability, why| {
        if !out.iter().any(|k| k.capability == capability) {
            out.push(Kept { capability, why });
        }
    };
    let guard = config
        .guard
        .as_ref()
        .is_some_and(|g| g.enforcement != crate::config::GuardEnforcement::Off);
    if guard {
        keep(Capability::CAP_BPF, "guard: map updates, re-attach");
        keep(
            Capability::CAP_NET_ADMIN,
            "guard: re-attach, attachment queries, closing older connections",
        );
        keep(
            Capability::CAP_SYS_ADMIN,
            "guard: re-pinning its link by id",
        );
        keep(
            Capability::CAP_DAC_OVERRIDE,
            "guard: pins in its root-owned pin directory",
        );
    }
    if config.admission.kernel_block_list {
        keep(
            Capability::CAP_BPF,
            "kernel block list: map updates, attach",
        );
        keep(
            Capability::CAP_NET_ADMIN,
            "kernel block list: XDP on interfaces a reload adds",
        );
    }
    let first_free = unprivileged_port_start();
    let low = config
        .listeners
        .iter()
        .map(|l| l.bind.port())
        .chain(config.admin.map(|a| a.port()))
        .any(|p| p != 0 && p < first_free);
    if low {
        keep(
            Capability::CAP_NET_BIND_SERVICE,
            "a port below net.ipv4.ip_unprivileged_port_start: reloads may bind another",
        );
    }
    out
}

/// The first port an unprivileged process may bind (1024 unless the
/// sysctl says otherwise; unreadable: 1024, the kernel's default).
fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// The runtime's threads wait.
    Pending,
    /// The user changed; each thread narrows to these.
    Dropped(Vec<Capability>),
    /// The gateway failed before the drop: the threads run on, to let the
    /// runtime shut down; the process is exiting.
    Abandoned,
}

type Shared = Arc<(Mutex<Phase>, Condvar)>;

/// Holds the runtime's threads until the drop (see the module's steps).
pub struct Gate {
    shared: Shared,
}

impl Gate {
    /// Step 1: before the runtime, while the process has one thread.
    pub fn prepare(target: &Target) -> Result<Gate, PrivilegeError> {
        root_and_alone(target)?;
        caps::securebits::set_keepcaps(true).map_err(caps_error("keep capabilities"))?;
        Ok(Gate {
            shared: Arc::new((Mutex::new(Phase::Pending), Condvar::new())),
        })
    }

    /// Step 2: the runtime's thread-start hook.
    pub fn hook(&self) -> impl Fn() + Send + Sync + 'static {
        let shared = self.shared.clone();
        move || {
            let (lock, ready) = &*shared;
            let mut phase = lock.lock().unwrap_or_else(|p| p.into_inner());
            while *phase == Phase::Pending {
                phase = ready.wait(phase).unwrap_or_else(|p| p.into_inner());
            }
            if let Phase::Dropped(kept) = &*phase
                && let Err(e) = narrow(&kept.iter().copied().collect())
            {
                // A worker holding more than it should must not run a
                // single task.
                tracing::error!(error = %e, "a runtime thread could not drop its capabilities");
                std::process::abort();
            }
        }
    }

    /// Steps 4 and 5, on the main thread once the gateway is built.
    pub fn drop_to(&self, target: &Target) -> Result<(), PrivilegeError> {
        change_user(target)?;
        let kept = target.capabilities();
        narrow(&kept)?;
        {
            let (lock, ready) = &*self.shared;
            let mut phase = lock.lock().unwrap_or_else(|p| p.into_inner());
            *phase = Phase::Dropped(kept.iter().copied().collect());
            ready.notify_all();
        }
        verify(target, &kept)
    }
}

impl Drop for Gate {
    /// A gateway that fails before the drop releases the runtime's threads,
    /// or the runtime would wait for them forever as it shuts down.
    fn drop(&mut self) {
        let (lock, ready) = &*self.shared;
        let mut phase = lock.lock().unwrap_or_else(|p| p.into_inner());
        if *phase == Phase::Pending {
            *phase = Phase::Abandoned;
            ready.notify_all();
        }
    }
}

fn caps_error(what: &'static str) -> impl Fn(caps::errors::CapsError) -> PrivilegeError {
    move |e| PrivilegeError::Caps {
        what,
        reason: e.to_string(),
    }
}

fn os_result(what: &'static str, rc: libc::c_int) -> Result<(), PrivilegeError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(PrivilegeError::Syscall {
            what,
            source: std::io::Error::last_os_error(),
        })
    }
}

/// Groups before the group, the group before the user: each needs the
/// privilege the next takes away. glibc applies each to every thread.
fn change_user(target: &Target) -> Result<(), PrivilegeError> {
    // SAFETY: the pointer and length describe `target.groups`, alive for
    // the call; setgroups only reads them.
    let rc = unsafe { libc::setgroups(target.groups.len(), target.groups.as_ptr()) };
    os_result("setgroups", rc)?;
    // SAFETY: plain integer arguments.
    let rc = unsafe { libc::setresgid(target.gid, target.gid, target.gid) };
    os_result("setresgid", rc)?;
    // SAFETY: plain integer arguments.
    let rc = unsafe { libc::setresuid(target.uid, target.uid, target.uid) };
    os_result("setresuid", rc)
}

/// This thread's capabilities down to `kept`: in the permitted, effective
/// and bounding sets; none inherited or ambient (the gateway executes
/// nothing); keep-caps off and no new privileges from here on.
fn narrow(kept: &CapsHashSet) -> Result<(), PrivilegeError> {
    // The change of user emptied the effective set; the bounding set is
    // narrowed with CAP_SETPCAP, still permitted.
    let permitted = caps::read(None, CapSet::Permitted).map_err(caps_error("read permitted"))?;
    caps::set(None, CapSet::Effective, &permitted).map_err(caps_error("raise effective"))?;
    let bounding = caps::read(None, CapSet::Bounding).map_err(caps_error("read bounding"))?;
    for cap in bounding.difference(kept) {
        caps::drop(None, CapSet::Bounding, *cap).map_err(caps_error("narrow bounding"))?;
    }
    caps::clear(None, CapSet::Ambient).map_err(caps_error("clear ambient"))?;
    caps::clear(None, CapSet::Inheritable).map_err(caps_error("clear inheritable"))?;
    caps::set(None, CapSet::Effective, kept).map_err(caps_error("narrow effective"))?;
    caps::set(None, CapSet::Permitted, kept).map_err(caps_error("narrow permitted"))?;
    caps::securebits::set_keepcaps(false).map_err(caps_error("keep-caps off"))?;
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    os_result("no new privileges", rc)
}

/// Every thread of the process, read back until all match or `SETTLE`
/// passes.
fn verify(target: &Target, kept: &CapsHashSet) -> Result<(), PrivilegeError> {
    let mask = kept.iter().fold(0u64, |m, c| m | c.bitmask());
    let deadline = Instant::now() + SETTLE;
    loop {
        let mut wrong = Vec::new();
        for tid in thread_ids()? {
            // A thread that ended in between has nothing left to check.
            let Ok(status) = std::fs::read_to_string(format!("/proc/self/task/{tid}/status"))
            else {
                continue;
            };
            if let Some(why) = mismatch(&status, target, mask) {
                wrong.push(format!("thread {tid}: {why}"));
            }
        }
        if wrong.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(PrivilegeError::Verify(wrong.join("; ")));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Target {
    /// `gateway issuer`'s `user`: that user's uid and primary group, no
    /// supplementary groups, no capabilities. The issuer needs nothing
    /// privileged once its listeners are bound.
    pub fn alone(user: &str) -> Result<Target, PrivilegeError> {
        let (uid, gid) = lookup_user(user)?;
        if uid == 0 {
            return Err(PrivilegeError::Root(user.to_owned()));
        }
        if gid == 0 {
            return Err(PrivilegeError::RootGroup {
                user: user.to_owned(),
                what: "its primary group",
            });
        }
        Ok(Target {
            user: user.to_owned(),
            uid,
            gid,
            groups: Vec::new(),
            kept: Vec::new(),
        })
    }
}

impl Target {
    /// The user and groups this process runs as, for the checks a start
    /// without `user` makes (`not_the_gateways`): its supplementary groups
    /// too, which a unit (User=) gives it from the group database and its
    /// SupplementaryGroups= (review 10, S10-2).
    pub fn current() -> Result<Target, PrivilegeError> {
        let uid = effective_uid();
        // SAFETY: getegid has no preconditions and cannot fail.
        let gid = unsafe { libc::getegid() };
        // Named by its uid: `not_the_gateways` compares uids, and the
        // passwd lookup by uid is not thread-safe.
        let user = format!("uid {uid}");
        Ok(Target {
            user,
            uid,
            gid,
            groups: process_groups()?,
            kept: Vec::new(),
        })
    }

    /// This target (from `alone`) with the groups it may hold as the
    /// issuer, for `not_the_gateways` only, never for the drop (which keeps
    /// none): the group database's (getgrouplist, what a unit with User=
    /// gives it), and this process's own when it already runs as the user
    /// (a unit's SupplementaryGroups= as well). Whether root or a unit
    /// starts it, a group shared with the gateway's user is refused alike.
    pub fn in_its_groups(&self) -> Result<Target, PrivilegeError> {
        let mut groups = group_list(&self.user, self.gid)?;
        if effective_uid() == self.uid {
            // The process's own group too: a unit's Group= (root's, say)
            // is the egid, which getgroups need not list (S13-2).
            // SAFETY: getegid has no preconditions and cannot fail.
            let egid = unsafe { libc::getegid() };
            for g in std::iter::once(egid).chain(process_groups()?) {
                if !groups.contains(&g) {
                    groups.push(g);
                }
            }
        }
        Ok(Target {
            groups,
            ..self.clone()
        })
    }

    /// Its primary group and supplementary groups, group 0 aside (which
    /// `not_the_gateways` refuses before it compares), which
    /// `not_the_gateways` compares with the gateway's.
    fn all_groups(&self) -> Vec<libc::gid_t> {
        let mut all = vec![self.gid];
        for g in &self.groups {
            if !all.contains(g) {
                all.push(*g);
            }
        }
        all.retain(|g| *g != 0);
        all
    }
}

/// A group in both lists, if any.
fn shared_group(ours: &[libc::gid_t], theirs: &[libc::gid_t]) -> Option<libc::gid_t> {
    ours.iter().copied().find(|g| *g != 0 && theirs.contains(g))
}

/// This process's supplementary groups (getgroups).
fn process_groups() -> Result<Vec<libc::gid_t>, PrivilegeError> {
    let failed = || PrivilegeError::Syscall {
        what: "getgroups",
        source: std::io::Error::last_os_error(),
    };
    for _ in 0..4 {
        // SAFETY: a size of 0 only asks how many there are.
        let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
        let len = usize::try_from(n).map_err(|_| failed())?;
        let mut groups = vec![0 as libc::gid_t; len];
        // SAFETY: `groups` holds `n` entries; getgroups writes at most that many.
        let got = unsafe { libc::getgroups(n, groups.as_mut_ptr()) };
        match usize::try_from(got) {
            Ok(got) => {
                groups.truncate(got);
                return Ok(groups);
            }
            // EINVAL: more groups than a moment ago (another thread's
            // setgroups): ask again.
            Err(_) if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) => {}
            Err(_) => return Err(failed()),
        }
    }
    Err(failed())
}

/// The gateway's own user as the package makes it (packaging/deb/postinst)
/// and examples/gateway.service runs it.
pub const GATEWAY_USER: &str = "gateway";
/// The gateway's config as the package installs it.
pub const GATEWAY_CONFIG: &str = "/etc/gateway/gateway.toml";

impl Target {
    /// Refuses the gateway's user as the issuer's (S4-4: the SSO CA's key
    /// must be out of the network-facing gateway's reach, and the issuer
    /// must not write the gateway's files). The gateway's user is known by
    /// more than its name: refused are the name `gateway` and any user with
    /// its uid, and, when the gateway's config (`gateway_config`) exists,
    /// its owner unless root (a gateway started as its user, owning its
    /// config) and the `user` it names (a gateway started as root). A group
    /// shared gives each the other's group-readable files, so any group of
    /// this target's (`all_groups`: primary and supplementary) is refused
    /// when it is one of the gateway's user's (primary or supplementary:
    /// the gateway keeps its user's groups after the drop), the config's
    /// `group`, or the config file's group (reviews 9 and 10, S9-4, S10-2).
    pub fn not_the_gateways(&self, gateway_config: &Path) -> Result<(), PrivilegeError> {
        use std::os::unix::fs::MetadataExt as _;
        let refuse = |why: String| {
            Err(PrivilegeError::GatewaysUser {
                user: self.user.clone(),
                uid: self.uid,
                why,
            })
        };
        if self.user == GATEWAY_USER {
            return refuse(format!("the package's gateway runs as {GATEWAY_USER:?}"));
        }
        // Root's group is refused outright, not compared: an issuer a unit
        // runs with Group=root or SupplementaryGroups=root (or whose user
        // the group database puts in group root) reads root:root 0640
        // files, which `Target::alone` (the database's primary group
        // only) and `mismatch` (drops from root only) never saw (review
        // 13, S13-2).
        if self.gid == 0 {
            return Err(PrivilegeError::RootGroup {
                user: self.user.clone(),
                what: "its primary group",
            });
        }
        if self.groups.contains(&0) {
            return Err(PrivilegeError::RootGroup {
                user: self.user.clone(),
                what: "one of its supplementary groups (the group database's, or a unit's SupplementaryGroups=)",
            });
        }
        let ours = self.all_groups();
        match lookup_user(GATEWAY_USER) {
            Ok((uid, _)) if uid == self.uid => {
                return refuse(format!("{GATEWAY_USER:?} has the same uid"));
            }
            Ok((_, gid)) => {
                if let Some(g) = shared_group(&ours, &group_list(GATEWAY_USER, gid)?) {
                    return refuse(format!(
                        "{GATEWAY_USER:?} is in group {g}, and so is it{}",
                        if g == gid { " (its primary group)" } else { "" }
                    ));
                }
            }
            Err(PrivilegeError::UnknownUser(_)) => {}
            Err(e) => return Err(e),
        }
        let Ok(meta) = std::fs::metadata(gateway_config) else {
            return Ok(());
        };
        if meta.uid() == self.uid {
            return refuse(format!("it owns {}", gateway_config.display()));
        }
        if let Some(g) = shared_group(&ours, &[meta.gid()]) {
            return refuse(format!("its group {g} owns {}", gateway_config.display()));
        }
        // Only the top-level `user` and `group`; a config that does not
        // parse as TOML names neither here, and the gateway refuses it.
        // Read as a named file is (`read_bounded`): a FIFO at its name,
        // which whoever may write /etc/gateway can put there, hung the
        // issuer's start for good with no log line, and a link to
        // /dev/zero took its memory (review 13, S13-4). Anything but a
        // regular file refuses the start, the file named. A config the
        // issuer may not read (root:gateway 0640, the issuer run by its
        // unit) names no one it can check, as before.
        let text = match crate::safe_dir::read_bounded(
            gateway_config,
            crate::safe_dir::MAX_NAMED_FILE_BYTES,
        ) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => None,
            Err(source) => {
                return Err(PrivilegeError::GatewayConfig {
                    path: gateway_config.to_owned(),
                    source,
                });
            }
        };
        let table = text
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .and_then(|text| text.parse::<toml::Table>().ok());
        let named = |key: &str| {
            table
                .as_ref()
                .and_then(|t| t.get(key)?.as_str().map(str::to_owned))
        };
        if let Some(named) = named("user") {
            let looked_up = lookup_user(&named).ok();
            let same = named == self.user || looked_up.is_some_and(|(uid, _)| uid == self.uid);
            if same {
                return refuse(format!(
                    "{} drops to user = {named:?}",
                    gateway_config.display()
                ));
            }
            // Every group of the named user's, even with `group` set
            // (which the gateway then runs with alone): stricter than the
            // drop, never looser.
            if let Some((_, gid)) = looked_up
                && let Some(g) = shared_group(&ours, &group_list(&named, gid)?)
            {
                return refuse(format!(
                    "{} drops to user = {named:?}, which is in group {g}, and so is it",
                    gateway_config.display()
                ));
            }
        }
        if let Some(group) = named("group")
            && let Ok(gid) = lookup_group(&group)
            && let Some(g) = shared_group(&ours, &[gid])
        {
            return refuse(format!(
                "{} drops to group = {group:?} ({g}), a group of its too",
                gateway_config.display()
            ));
        }
        Ok(())
    }
}

/// What a drop needs before it starts: root, and one thread (capabilities
/// are per thread: one made before the drop would keep them).
fn root_and_alone(target: &Target) -> Result<(), PrivilegeError> {
    let euid = effective_uid();
    if euid != 0 {
        return Err(PrivilegeError::NotRoot {
            user: target.user.clone(),
            euid,
        });
    }
    let threads = thread_ids()?.len();
    if threads != 1 {
        return Err(PrivilegeError::Threads(threads));
    }
    Ok(())
}

/// Drops to `target` (from `Target::alone`) for good: the bounding set
/// emptied while still root, then no supplementary groups, the group and
/// the user (setgroups, setresgid, setresuid: with keep-caps off the
/// kernel empties the permitted and effective sets), no inherited or
/// ambient capabilities, no new privileges; then every thread is read
/// back from /proc (`verify_alone`). Only while the process has one
/// thread, so before the runtime: capabilities and no-new-privileges are
/// per thread, and every thread made later inherits them from this one.
pub fn drop_alone(target: &Target) -> Result<(), PrivilegeError> {
    root_and_alone(target)?;
    caps::securebits::set_keepcaps(false).map_err(caps_error("keep-caps off"))?;
    caps::clear(None, CapSet::Bounding).map_err(caps_error("clear bounding"))?;
    change_user(target)?;
    caps::clear(None, CapSet::Ambient).map_err(caps_error("clear ambient"))?;
    caps::clear(None, CapSet::Inheritable).map_err(caps_error("clear inheritable"))?;
    caps::clear(None, CapSet::Effective).map_err(caps_error("clear effective"))?;
    caps::clear(None, CapSet::Permitted).map_err(caps_error("clear permitted"))?;
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    os_result("no new privileges", rc)?;
    verify_alone(target)
}

/// Every thread of the process runs as `target` with no capabilities, no
/// supplementary groups and no new privileges (read from
/// /proc/self/task/*/status): after `drop_alone`, and again once the
/// runtime's threads exist, before anything is served.
pub fn verify_alone(target: &Target) -> Result<(), PrivilegeError> {
    let mut wrong = Vec::new();
    for tid in thread_ids()? {
        let Ok(status) = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")) else {
            continue;
        };
        let groups = status
            .lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .map(str::trim);
        let why = [
            mismatch(&status, target, 0),
            (groups != Some("")).then(|| format!("supplementary groups {groups:?}")),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>();
        if !why.is_empty() {
            wrong.push(format!("thread {tid}: {}", why.join(", ")));
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(PrivilegeError::Verify(wrong.join("; ")))
    }
}

/// What in one thread's /proc status differs from the target, if anything
/// (group 0 among its groups included, whatever the target).
pub fn mismatch(status: &str, target: &Target, mask: u64) -> Option<String> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    let ids = |name: &str, want: u32| {
        let got: Vec<&str> = field(name)?.split_whitespace().collect();
        (got.len() != 4 || got.iter().any(|g| *g != want.to_string()))
            .then(|| format!("{name} {}", got.join(" ")))
    };
    // Group root never, whatever the target says: a target with gid 0
    // (refused when resolved) must not pass as dropped either.
    let root_group = |name: &str| {
        let got = field(name)?;
        got.split_whitespace()
            .any(|g| g == "0")
            .then(|| format!("{name} {got} includes root's group 0"))
    };
    let set = |name: &str, want: u64| {
        let got = field(name).and_then(|v| u64::from_str_radix(v, 16).ok());
        (got != Some(want)).then(|| format!("{name} {:?}, want {want:016x}", field(name)))
    };
    let problems: Vec<String> = [
        ids("Uid", target.uid),
        ids("Gid", target.gid),
        root_group("Gid"),
        root_group("Groups"),
        set("CapPrm", mask),
        set("CapEff", mask),
        set("CapInh", 0),
        set("CapAmb", 0),
        set("CapBnd", mask),
        (field("NoNewPrivs") != Some("1")).then(|| "NoNewPrivs not set".to_owned()),
    ]
    .into_iter()
    .flatten()
    .collect();
    (!problems.is_empty()).then(|| problems.join(", "))
}

fn thread_ids() -> Result<Vec<u32>, PrivilegeError> {
    let read = |source| PrivilegeError::Syscall {
        what: "list /proc/self/task",
        source,
    };
    let mut ids = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").map_err(read)? {
        if let Some(id) = entry
            .map_err(read)?
            .file_name()
            .to_str()
            .and_then(|s| s.parse().ok())
        {
            ids.push(id);
        }
    }
    Ok(ids)
}

/// Makes the process not dumpable: no other process of its user may read
/// its memory (its private keys), attach to it, or take a copy of its
/// listening sockets with `pidfd_getfd` (attacker review 9, F3). A drop to
/// `user` does this too; a gateway started as that user does not.
pub fn not_dumpable() -> std::io::Result<()> {
    // SAFETY: PR_SET_DUMPABLE takes integers only; nothing is read or
    // written through a pointer.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The user the process runs as now (after a drop, the dropped-to one).
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Room for one passwd or group entry's strings; glibc says ERANGE when a
/// group's member list needs more, and the buffer grows.
const ENTRY_BUFFER: usize = 16 * 1024;
const ENTRY_BUFFER_MAX: usize = 1024 * 1024;

fn c_name(what: &'static str, name: &str) -> Result<CString, PrivilegeError> {
    CString::new(name).map_err(|e| PrivilegeError::Lookup {
        what,
        name: name.to_owned(),
        source: std::io::Error::other(e),
    })
}

/// One `get*nam_r` lookup by `name`, growing the buffer while glibc says
/// ERANGE. `call` makes the lookup into the buffer it is given and says
/// glibc's return code and what it found (None: no such entry).
fn lookup<T>(
    what: &'static str,
    name: &str,
    mut call: impl FnMut(&std::ffi::CStr, &mut [libc::c_char]) -> (libc::c_int, Option<T>),
) -> Result<Option<T>, PrivilegeError> {
    let c = c_name(what, name)?;
    let mut size = ENTRY_BUFFER;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        match call(&c, &mut buf) {
            (0, found) => return Ok(found),
            (libc::ERANGE, _) if size < ENTRY_BUFFER_MAX => size *= 4,
            (e, _) => {
                return Err(PrivilegeError::Lookup {
                    what,
                    name: name.to_owned(),
                    source: std::io::Error::from_raw_os_error(e),
                });
            }
        }
    }
}

fn lookup_user(name: &str) -> Result<(libc::uid_t, libc::gid_t), PrivilegeError> {
    lookup("user", name, |c, buf| {
        // SAFETY: an all-zero passwd is a valid value of the plain C struct.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call and `buf.len()` is
        // its size; only the integer fields are read after, not the strings
        // pointing into `buf`.
        let rc = unsafe {
            libc::getpwnam_r(
                c.as_ptr(),
                &mut entry,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        (
            rc,
            (!found.is_null()).then_some((entry.pw_uid, entry.pw_gid)),
        )
    })?
    .ok_or_else(|| PrivilegeError::UnknownUser(name.to_owned()))
}

fn lookup_group(name: &str) -> Result<libc::gid_t, PrivilegeError> {
    lookup("group", name, |c, buf| {
        // SAFETY: an all-zero group is a valid value of the plain C struct.
        let mut entry: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: as in lookup_user; only gr_gid is read after.
        let rc = unsafe {
            libc::getgrnam_r(
                c.as_ptr(),
                &mut entry,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        (rc, (!found.is_null()).then_some(entry.gr_gid))
    })?
    .ok_or_else(|| PrivilegeError::UnknownGroup(name.to_owned()))
}

/// The user's groups from the group database, its own group first.
fn group_list(user: &str, gid: libc::gid_t) -> Result<Vec<libc::gid_t>, PrivilegeError> {
    let c = c_name("user", user)?;
    let mut n: libc::c_int = 32;
    loop {
        let mut groups = vec![0 as libc::gid_t; usize::try_from(n).unwrap_or(0)];
        let mut len = n;
        // SAFETY: `groups` holds `len` entries; getgrouplist writes at most
        // that many and sets `len` to how many there are.
        let rc = unsafe { libc::getgrouplist(c.as_ptr(), gid, groups.as_mut_ptr(), &mut len) };
        if rc >= 0 {
            groups.truncate(usize::try_from(len).unwrap_or(0));
            let mut seen = HashSet::new();
            groups.retain(|g| seen.insert(*g));
            return Ok(groups);
        }
        // Too few entries: `len` says how many are needed.
        if len <= n || len > 65536 {
            return Err(PrivilegeError::Lookup {
                what: "groups of user",
                name: user.to_owned(),
                source: std::io::Error::other("getgrouplist failed"),
            });
        }
        n = len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config with `top` at the top level and `admission` in
    /// [admission] (the kernel block list off unless it says otherwise).
    fn config(top: &str, admission: &str) -> Config {
        let admission = if admission.is_empty() {
            "kernel_block_list = false"
        } else {
            admission
        };
        let text = format!(
            "{top}\n[admission]\n{admission}\n[[listeners]]\nname = \"edge\"\nbind = \"127.0.0.1:8443\"\ncert = \"c.pem\"\n\
             key = \"k.key\"\nclient_ca = \"ca.pem\"\n[[listeners.routes]]\nname = \"r\"\n\
             backends = [\"127.0.0.1:1\"]\n"
        );
        Config::parse(
            &text,
            std::path::Path::new("g.toml"),
            std::path::Path::new("/"),
        )
        .unwrap()
    }

    #[test]
    fn nothing_kept_without_privileged_features() {
        assert_eq!(kept(&config("", "")), vec![]);
    }

    #[test]
    fn a_low_port_keeps_bind_service() {
        let c = config("admin = \"127.0.0.1:443\"", "");
        let caps: Vec<_> = kept(&c).iter().map(|k| k.capability).collect();
        assert_eq!(caps, vec![Capability::CAP_NET_BIND_SERVICE]);
    }

    #[test]
    fn the_kernel_block_list_keeps_bpf_and_net_admin() {
        let c = config("", "kernel_block_list = true");
        let caps: HashSet<_> = kept(&c).iter().map(|k| k.capability).collect();
        assert_eq!(
            caps,
            HashSet::from([Capability::CAP_BPF, Capability::CAP_NET_ADMIN])
        );
    }

    #[test]
    fn group_without_user_is_refused() {
        let text = "group = \"nogroup\"\n[[listeners]]\nname = \"e\"\nbind = \"127.0.0.1:1\"\n\
                    cert = \"c\"\nkey = \"k\"\nclient_ca = \"a\"\n\
                    [[listeners.routes]]\nname = \"r\"\nbackends = [\"127.0.0.1:1\"]\n";
        let e = Config::parse(
            text,
            std::path::Path::new("g.toml"),
            std::path::Path::new("/"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("group is set without user"), "{e}");
    }

    #[test]
    fn the_issuers_user_is_alone_and_never_root() {
        let t = Target::alone("nobody").unwrap();
        assert_eq!((t.uid, t.groups.len(), t.kept.len()), (65534, 0, 0));
        assert!(matches!(
            Target::alone("root"),
            Err(PrivilegeError::Root(_))
        ));
        assert!(matches!(
            Target::alone("no-such-user-here"),
            Err(PrivilegeError::UnknownUser(_))
        ));
    }

    /// A user of this host's group database with a supplementary group
    /// (not its primary one, not root's): (user, group name, gid), from
    /// /etc/group's member lists; None on a host without one.
    fn member_of_a_supplementary_group() -> Option<(String, String, libc::gid_t)> {
        let groups = std::fs::read_to_string("/etc/group").ok()?;
        groups.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            let [name, _, gid, members] = fields[..] else {
                return None;
            };
            let gid: libc::gid_t = gid.parse().ok()?;
            members.split(',').find_map(|member| {
                let (uid, primary) = lookup_user(member).ok()?;
                (gid != 0 && uid != 0 && uid != 65534 && primary != gid)
                    .then(|| (member.to_owned(), name.to_owned(), gid))
            })
        })
    }

    /// S10-2: a group the issuer and the gateway's user share as a
    /// supplementary one is refused like a primary one, either way round:
    /// the gateway's user in the issuer's group, and the issuer's `user`
    /// in the gateway's `group` by the group database (what a unit with
    /// User= gives it), though the drop from root keeps no groups.
    #[test]
    fn a_group_shared_with_the_gateway_as_a_supplementary_one_is_refused() {
        let Some((member, group, gid)) = member_of_a_supplementary_group() else {
            eprintln!("skipped: no user with a supplementary group in /etc/group");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("gateway.toml");
        // The gateway's user is in `group`, not as its primary group.
        std::fs::write(&config, format!("user = {member:?}\n")).unwrap();
        let issuer = |gid: libc::gid_t| Target {
            user: "gw-issuer".into(),
            uid: 4243,
            gid,
            groups: Vec::new(),
            kept: Vec::new(),
        };
        let e = issuer(gid).not_the_gateways(&config).unwrap_err();
        assert!(
            e.to_string().contains(&format!(
                "drops to user = {member:?}, which is in group {gid}, and so is it"
            )),
            "{e}"
        );
        // Control: a group of its own.
        issuer(4243).not_the_gateways(&config).unwrap();

        // The issuer's `user` is in the group the gateway drops to.
        std::fs::write(&config, format!("user = \"nobody\"\ngroup = {group:?}\n")).unwrap();
        let alone = Target::alone(&member).unwrap();
        assert!(alone.groups.is_empty(), "the drop keeps no groups");
        let theirs = alone.in_its_groups().unwrap();
        assert!(theirs.groups.contains(&gid), "{:?}", theirs.groups);
        let e = theirs.not_the_gateways(&config).unwrap_err();
        assert!(
            e.to_string().contains(&format!(
                "drops to group = {group:?} ({gid}), a group of its too"
            )),
            "{e}"
        );
    }

    #[test]
    fn mismatch_names_what_differs() {
        let t = Target {
            user: "nobody".into(),
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
            kept: vec![],
        };
        let good = "Uid:\t65534\t65534\t65534\t65534\nGid:\t65534\t65534\t65534\t65534\n\
                    CapInh:\t0000000000000000\nCapPrm:\t0000000000000000\n\
                    CapEff:\t0000000000000000\nCapBnd:\t0000000000000000\n\
                    CapAmb:\t0000000000000000\nNoNewPrivs:\t1\n";
        assert_eq!(mismatch(good, &t, 0), None);
        let root = good.replace("Uid:\t65534", "Uid:\t0");
        assert!(mismatch(&root, &t, 0).unwrap().contains("Uid"));
        let caps = good.replace("CapEff:\t0000000000000000", "CapEff:\t0000000000000400");
        assert!(mismatch(&caps, &t, 0).unwrap().contains("CapEff"));
    }
}

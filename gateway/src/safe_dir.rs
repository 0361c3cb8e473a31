//! Directories the gateway creates files in by name while it may still be
//! root (pins, `admin_socket`): safe only when no one else can write there,
//! or a user who can could swap a name for a symlink between two calls and
//! have root chmod, chown or write whatever it points to.

use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::Path;

/// Why a directory on the way to a file (`sticky_ok`) or the file's own
/// directory is not safe, if it is not: a symlink, not a directory, another
/// user's (root's is fine on the way), or writable by group or others.
pub fn check(meta: &std::fs::Metadata, euid: u32, sticky_ok: bool) -> Result<(), String> {
    if meta.file_type().is_symlink() {
        return Err("is a symbolic link".into());
    }
    if !meta.is_dir() {
        return Err("is not a directory".into());
    }
    let owner = meta.uid();
    let ours = owner == euid || (sticky_ok && owner == 0);
    if !ours {
        return Err(format!("belongs to uid {owner}"));
    }
    let mode = meta.mode();
    let sticky = mode & libc::S_ISVTX != 0;
    if mode & 0o022 != 0 && !(sticky_ok && sticky) {
        return Err(format!("is writable by others (mode {:o})", mode & 0o7777));
    }
    Ok(())
}

/// The effective user id of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Why `file`'s directory is no place for this process to create `file`
/// in, if it is not: it must be this user's or root's and writable by no
/// one else (not even sticky: the name is known in advance). A gateway
/// started as root with `user` set must not use a directory that user can
/// write: that user is who the drop contains.
pub fn check_parent_of(file: &Path) -> Result<(), String> {
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let euid = euid();
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let owner = meta.uid();
    check(&meta, euid, false)
        .or_else(|why| {
            // Root's directory, writable by root alone, is as safe.
            if owner == 0 && !meta.file_type().is_symlink() && meta.mode() & 0o022 == 0 {
                Ok(())
            } else {
                Err(why)
            }
        })
        .map_err(|why| {
            format!(
                "its directory {} {why}: anyone who can write there could redirect what is done to it; use a directory owned by root (or the user the gateway starts as) and writable by no one else (chown root: {0}; chmod go-w {0}), such as /run/gateway made by systemd's RuntimeDirectory= for a gateway started as its user",
                dir.display()
            )
        })
}

/// The user a gateway started as root drops to (`user`), once known: what
/// it wrote (`audit_state`, revisions, in its `StateDirectory=`) is read
/// back by root at the next start. Unset: `u32::MAX`, no such user.
static DROPS_TO: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(u32::MAX);

/// Records the user this process drops to (before anything is read).
pub fn set_drops_to(uid: u32) {
    DROPS_TO.store(uid, std::sync::atomic::Ordering::Relaxed);
}

/// Whose files and directories this process trusts to read from: its
/// own, root's, and the user it drops to (the gateway itself, later).
fn trusted_owner(owner: u32, euid: u32) -> bool {
    owner == euid || owner == 0 || owner == DROPS_TO.load(std::sync::atomic::Ordering::Relaxed)
}

/// `dir` as a place to read private state files from (revisions,
/// `audit_state`): not a symlink, a directory of a trusted owner (this
/// user, root, or the user the gateway drops to), writable by no one
/// else. A directory others can write is as unsafe to read from as to
/// write to: whatever is there may have been planted. (Reads need no more:
/// each file is opened without following links and checked on its
/// descriptor. Writes, by name, use `check_parent_of`.)
pub fn check_dir(dir: &Path) -> Result<(), String> {
    let fail = |why: String| {
        format!(
            "the directory {} {why}: anyone who can write there could plant what is read from it; make it the gateway's user's (or root's) and writable by no one else (chmod go-w {0})",
            dir.display()
        )
    };
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if meta.file_type().is_symlink() {
        return Err(fail("is a symbolic link".into()));
    }
    if !meta.is_dir() {
        return Err(fail("is not a directory".into()));
    }
    if !trusted_owner(meta.uid(), euid()) {
        return Err(fail(format!("belongs to uid {}", meta.uid())));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(fail(format!(
            "is writable by others (mode {:o})",
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

/// Why a private state file cannot be trusted, or reading it failed.
#[derive(Debug, thiserror::Error)]
pub enum PrivateFileError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Not a regular file this user (or root) owns and no one else can
    /// write: someone else made it, or could have changed it.
    #[error("{0}")]
    Untrusted(String),
}

/// Why an open file (`meta` from fstat) is no private state file of this
/// process, if it is not: a regular file, owned by `euid`, root or the
/// user the gateway drops to, not writable by group or others.
pub fn check_private_file(meta: &std::fs::Metadata, euid: u32) -> Result<(), String> {
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    let owner = meta.uid();
    if !trusted_owner(owner, euid) {
        return Err(format!("belongs to uid {owner}, not this process's {euid}"));
    }
    let mode = meta.mode();
    if mode & 0o022 != 0 {
        return Err(format!("is writable by others (mode {:o})", mode & 0o7777));
    }
    Ok(())
}

/// A private state file's bytes, at most `max`: in a directory
/// `check_dir` accepts, opened without following a symlink and without
/// blocking (a FIFO planted there must not stall the caller), then checked
/// by `check_private_file` on the open descriptor (no race with a swap).
/// One open path for revisions and `audit_state`.
pub fn read_private(path: &Path, max: u64) -> Result<Vec<u8>, PrivateFileError> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    check_dir(dir).map_err(PrivateFileError::Untrusted)?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)?;
    let meta = f.metadata()?;
    check_private_file(&meta, euid())
        .map_err(|why| PrivateFileError::Untrusted(format!("{} {why}", path.display())))?;
    if meta.len() > max {
        return Err(PrivateFileError::Untrusted(format!(
            "{} is larger than {max} bytes",
            path.display()
        )));
    }
    let mut out = Vec::new();
    f.take(max + 1).read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(PrivateFileError::Untrusted(format!(
            "{} is larger than {max} bytes",
            path.display()
        )));
    }
    Ok(out)
}

/// Why `path` (the config a root-started gateway reads) could be rewritten
/// by the user it drops to (`uid`, in `groups`), if it could: the file, or
/// any directory its resolution goes through, `/` first, each symlink
/// followed from the directory it is in (`resolution`), owned by that user
/// or writable by one of its groups or by anyone. A config the dropped process can
/// rewrite is one root reads at the next start: a compromised gateway
/// could delete `user` from it. Every directory above counts, not only the
/// file's own: whoever may write any of them can rename the one below
/// away and put a directory of their own, with their config, in its place.
/// A sticky world-writable directory (/tmp) is refused too: the sticky bit
/// keeps others from renaming root's entries, but a name in it that goes
/// away (a reboot, a tmp cleaner) is anyone's to take.
pub fn writable_by(path: &Path, uid: u32, groups: &[u32]) -> Option<String> {
    let given = match absolute(path) {
        Ok(given) => given,
        Err(e) => return Some(e),
    };
    // Every directory the path's resolution goes through, and the file:
    // each checked as met (a symlink can only be replaced through the
    // directory it is in, which was met before it).
    match resolution(&given) {
        Ok(met) => met.iter().find_map(|p| match std::fs::metadata(p) {
            Ok(meta) => writable_for(p, &meta, uid, groups).or_else(|| has_acl(p)),
            Err(e) => Some(format!("{}: {e}", p.display())),
        }),
        Err(e) => Some(e),
    }
}

/// Why `meta` (of `what`) may be written by `uid` or one of `groups`, if
/// it may: theirs, writable by one of their groups, or by anyone (sticky
/// or not).
fn writable_for(what: &Path, meta: &std::fs::Metadata, uid: u32, groups: &[u32]) -> Option<String> {
    let mode = meta.mode();
    if meta.uid() == uid && uid != 0 {
        Some(format!("{} belongs to uid {uid}", what.display()))
    } else if mode & 0o020 != 0 && groups.contains(&meta.gid()) {
        Some(format!(
            "{} is writable by its group {} (mode {:o})",
            what.display(),
            meta.gid(),
            mode & 0o7777
        ))
    } else if mode & 0o002 != 0 {
        let sticky = if mode & libc::S_ISVTX != 0 {
            "; sticky, but a name in it that goes away is anyone's to take"
        } else {
            ""
        };
        Some(format!(
            "{} is writable by others (mode {:o}{sticky})",
            what.display(),
            mode & 0o7777
        ))
    } else {
        None
    }
}

/// The directory a file root creates or writes by name is in (the access
/// log, the pid file), opened by walking to it one name at a time from
/// `/`, each name looked up through the descriptor of the directory before
/// it, with the file's name, what is left to open there. With `user` (the
/// uid and groups a start as root drops to): every directory a name is
/// looked up in, but the file's own, is judged on its descriptor and must
/// be out of that user's reach (`writable_for`, an ACL), and `refuse`
/// says why otherwise; only the file's name is looked up in a directory
/// the user may write, and the caller opens it O_NOFOLLOW.
///
/// By path, the check and the open each resolved the path: a link `log ->
/// .` in the user's directory entered no directory, so the check left that
/// directory out as the log's own, and the open, resolving `log` again,
/// was raced into any directory (review 13, S13-1). Here what is judged is
/// what is held, and the file is opened in it (`Dir::open_append`,
/// `Dir::open_new`). A symlink on the way is followed from the directory
/// it is in (judged, so out of the user's reach); one at the file's name
/// only with `follow_last` and when that directory is root's and writable
/// by root alone (an operator's link): otherwise the name is left for the
/// O_NOFOLLOW open to refuse. At most 40 links, as the kernel.
///
/// The directory is held O_PATH: names are opened, looked at and removed
/// in it, and nothing is read from it (no read permission needed, as a
/// lookup by path needs none); `set_mode` is not for it.
pub fn reach_parent(
    path: &Path,
    user: Option<(u32, &[u32])>,
    follow_last: bool,
    refuse: &dyn Fn(String) -> std::io::Error,
) -> std::io::Result<(Dir, String)> {
    use std::collections::VecDeque;
    use std::os::fd::AsRawFd as _;
    use std::path::Component;
    let given = absolute(path).map_err(std::io::Error::other)?;
    let mut todo: VecDeque<std::ffi::OsString> = VecDeque::new();
    let push_front = |todo: &mut VecDeque<std::ffi::OsString>, p: &Path| {
        for c in p.components().rev() {
            todo.push_front(c.as_os_str().to_owned());
        }
    };
    push_front(&mut todo, &given);
    let root = || Dir::open_path(Path::new("/"));
    let (mut cur, mut shown) = (root()?, std::path::PathBuf::from("/"));
    let judge = |dir: &Dir, shown: &Path| -> std::io::Result<()> {
        let Some((uid, groups)) = user else {
            return Ok(());
        };
        let meta = dir.metadata()?;
        match writable_for(shown, &meta, uid, groups)
            .map_or_else(|| dir.acl(shown), |w| Ok(Some(w)))?
        {
            None => Ok(()),
            Some(why) => Err(refuse(why)),
        }
    };
    let mut links = 0;
    while let Some(part) = todo.pop_front() {
        let Some(kind) = Path::new(&part).components().next() else {
            continue;
        };
        // The file's name: nothing after it but ".".
        let last = todo.iter().all(|p| p == ".");
        match kind {
            Component::RootDir | Component::Prefix(_) => {
                (cur, shown) = (root()?, std::path::PathBuf::from("/"));
            }
            Component::CurDir => {}
            Component::ParentDir if last => {
                return Err(std::io::Error::other(format!(
                    "{}: does not end in a file name",
                    path.display()
                )));
            }
            Component::ParentDir => {
                judge(&cur, &shown)?;
                cur = cur.open_dir_at(c"..")?;
                shown.pop();
            }
            Component::Normal(name) => {
                let name = name.to_str().ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("{}: a name that is not UTF-8", path.display()),
                    )
                })?;
                let c = component(name)?;
                if !last {
                    judge(&cur, &shown)?;
                }
                let at = match cur.openat(&c, libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC, 0)
                {
                    Ok(at) => at,
                    Err(e) if last && e.kind() == std::io::ErrorKind::NotFound => {
                        return Ok((cur, name.to_owned()));
                    }
                    Err(e) => {
                        return Err(std::io::Error::new(
                            e.kind(),
                            format!("{}: {e}", shown.join(name).display()),
                        ));
                    }
                };
                let kind = at.metadata()?.file_type();
                if kind.is_symlink() {
                    if last && !(follow_last && cur.root_only()?) {
                        return Ok((cur, name.to_owned()));
                    }
                    links += 1;
                    if links > 40 {
                        return Err(std::io::Error::other(format!(
                            "{}: too many symlinks",
                            path.display()
                        )));
                    }
                    push_front(&mut todo, &read_link_fd(at.as_raw_fd())?);
                } else if last {
                    return Ok((cur, name.to_owned()));
                } else if kind.is_dir() {
                    cur = Dir { fd: at };
                    shown.push(name);
                } else {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::NotADirectory,
                        format!("{}: not a directory", shown.join(name).display()),
                    ));
                }
            }
        }
    }
    Err(std::io::Error::other(format!(
        "{}: does not end in a file name",
        path.display()
    )))
}

/// The target of the symlink `fd` (O_PATH|O_NOFOLLOW) is: readlinkat on
/// the link opened, not on a name someone could swap meanwhile.
fn read_link_fd(fd: std::os::fd::RawFd) -> std::io::Result<std::path::PathBuf> {
    use std::os::unix::ffi::OsStringExt as _;
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: `fd` is open, the empty name is NUL-terminated, and `buf`
    // holds `buf.len()` bytes.
    let n = unsafe { libc::readlinkat(fd, c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    let n = usize::try_from(n).map_err(|_| std::io::Error::last_os_error())?;
    if n >= buf.len() {
        return Err(std::io::Error::other("a symlink's target too long"));
    }
    buf.truncate(n);
    Ok(std::ffi::OsString::from_vec(buf).into())
}

/// The most `read_bounded` reads: a CA bundle or a large CA's CRL is a
/// few MiB.
pub const MAX_NAMED_FILE_BYTES: u64 = 64 << 20;

/// A file the config names (a certificate, a CA bundle, a CRL), read
/// whole, as only a regular file is: opened O_NONBLOCK (a FIFO at its
/// name neither blocks the open nor is read: the gateway reloads inline
/// in its control loop, and a FIFO the issuer's user put at `sso/crl.pem`
/// froze that loop for good, review 12, S12-1), its type checked on the
/// descriptor (a link to /dev/zero is a device, refused), and at most
/// `max` bytes, by its size and by what is read (a sparse file, or one
/// that grows while read, cannot take the host's memory). Symlinks are
/// followed: operators keep certificates behind them. O_NOCTTY: a link to
/// a terminal the issuer's user holds made it the controlling terminal of
/// a gateway started without one (a systemd service), and a `^\` typed
/// there killed it (review 14, S14-3); every file this process opens by a
/// name someone else may shape is opened so.
pub fn read_bounded(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    read_bounded_with(path, max, 0)
}

/// `read_bounded`, but a symbolic link at the name is not followed (the
/// open fails with ELOOP): for a file named on `gateway pki`'s command
/// line that root reads.
pub fn read_bounded_nofollow(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    read_bounded_with(path, max, libc::O_NOFOLLOW)
}

fn read_bounded_with(path: &Path, max: u64, flags: libc::c_int) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other(format!(
            "not a regular file ({}): refused",
            if meta.file_type().is_fifo() {
                "a FIFO"
            } else if meta.is_dir() {
                "a directory"
            } else {
                "a device or socket"
            }
        )));
    }
    let too_large = || std::io::Error::other(format!("larger than {} MiB: refused", max >> 20));
    if meta.len() > max {
        return Err(too_large());
    }
    let mut data = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(max + 1).read_to_end(&mut data)?;
    if data.len() as u64 > max {
        return Err(too_large());
    }
    Ok(data)
}

/// `path` relative to the directory the process runs in, as it is opened.
fn absolute(path: &Path) -> Result<std::path::PathBuf, String> {
    if path.is_absolute() {
        return Ok(path.to_owned());
    }
    std::env::current_dir()
        .map(|cwd| cwd.join(path))
        .map_err(|e| format!("the current directory: {e}"))
}

/// Why someone besides root, this process's user and the user it drops
/// to could change what `path` resolves to (the file, or a directory on
/// the way to it, through every symlink, as `writable_by` walks it), if
/// anyone could: another owner, group write for a group other than root's,
/// write for others (but a sticky directory: the entry below it is checked
/// on its own), a POSIX ACL. For a warning: a trust anchor another user
/// may replace decides whom the gateway lets in.
pub fn writable_by_another(path: &Path) -> Option<String> {
    let euid = euid();
    let given = match absolute(path) {
        Ok(given) => given,
        Err(e) => return Some(e),
    };
    let met = match resolution(&given) {
        Ok(met) => met,
        Err(e) => return Some(e),
    };
    met.iter().find_map(|p| {
        let meta = match std::fs::metadata(p) {
            Ok(meta) => meta,
            Err(e) => return Some(format!("{}: {e}", p.display())),
        };
        let mode = meta.mode();
        if !trusted_owner(meta.uid(), euid) {
            Some(format!("{} belongs to uid {}", p.display(), meta.uid()))
        } else if mode & 0o020 != 0 && meta.gid() != 0 {
            Some(format!(
                "{} is writable by its group {} (mode {:o})",
                p.display(),
                meta.gid(),
                mode & 0o7777
            ))
        } else if mode & 0o002 != 0 && !(meta.is_dir() && mode & libc::S_ISVTX != 0) {
            Some(format!(
                "{} is writable by others (mode {:o})",
                p.display(),
                mode & 0o7777
            ))
        } else {
            has_acl(p)
        }
    })
}

/// A POSIX access ACL on `p`: it may grant the user (or a group of its)
/// what the mode bits do not show, so the mode-based check cannot judge
/// it: refused (review 9, S9-2). A file system without ACLs has none.
fn has_acl(p: &Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    // SAFETY: both strings are NUL-terminated; a null buffer of size 0
    // only asks for the attribute's size.
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            c"system.posix_acl_access".as_ptr(),
            std::ptr::null_mut(),
            0,
        )
    };
    (n > 0).then(|| {
        format!(
            "{} has a POSIX ACL (getfacl shows it), which may let others write where its mode does not: remove it (setfacl -b)",
            p.display()
        )
    })
}

/// The paths the kernel goes through to open `path` (absolute), one
/// component at a time: `/`, each directory, the file; a symlink met on
/// the way is followed from where it is (its target's components taken
/// next), so a link reached through another link has its own directory
/// on the list too. Neither the path's ancestors nor its canonical
/// path's hold that one (review 9, S9-1). More than 40 links: an error,
/// as the kernel's ELOOP.
fn resolution(path: &Path) -> Result<Vec<std::path::PathBuf>, String> {
    use std::collections::VecDeque;
    use std::path::Component;
    let mut todo: VecDeque<std::ffi::OsString> = VecDeque::new();
    let push_front = |todo: &mut VecDeque<std::ffi::OsString>, p: &Path| {
        for c in p.components().rev() {
            todo.push_front(c.as_os_str().to_owned());
        }
    };
    push_front(&mut todo, path);
    let mut cur = std::path::PathBuf::from("/");
    let mut met = vec![cur.clone()];
    let mut links = 0;
    while let Some(part) = todo.pop_front() {
        let Some(component) = Path::new(&part).components().next() else {
            continue;
        };
        match component {
            Component::RootDir | Component::Prefix(_) => cur = std::path::PathBuf::from("/"),
            Component::CurDir => {}
            Component::ParentDir => {
                cur.pop();
            }
            Component::Normal(name) => {
                let next = cur.join(name);
                let meta = std::fs::symlink_metadata(&next)
                    .map_err(|e| format!("{}: {e}", next.display()))?;
                if meta.file_type().is_symlink() {
                    links += 1;
                    if links > 40 {
                        return Err(format!("{}: too many symlinks", path.display()));
                    }
                    let target = std::fs::read_link(&next)
                        .map_err(|e| format!("{}: {e}", next.display()))?;
                    push_front(&mut todo, &target);
                } else {
                    cur = next;
                    met.push(cur.clone());
                }
            }
        }
    }
    Ok(met)
}

/// Writes `dir/name` whole by rename: `Dir::write_replacing_owned` in
/// `dir`, opened once (a link at its name is followed, as this
/// caller's directory, checked by it, may be one).
pub fn write_replacing(dir: &Path, name: &str, contents: &[u8], mode: u32) -> std::io::Result<()> {
    Dir::open_following(dir)?.write_replacing_owned(name, contents, mode, None)
}

/// A directory held open, and everything done in it done relative to
/// that descriptor (openat, renameat): its path is resolved once, at the
/// open, so whoever may rename it or its name (the owner of the directory
/// above) cannot move later steps elsewhere. Root writing into the SSO
/// store of the issuer's user, which owns `/var/lib/gateway-issuer`,
/// stat'ed the store by path, then created and renamed by path: a swap of
/// `sso` with a symlink in between made root create that user's files in
/// a directory only root may write (review 11, S11-4).
#[derive(Debug)]
pub struct Dir {
    /// Opened O_RDONLY|O_DIRECTORY: fstat, fchmod, and the dirfd of the
    /// *at calls (O_PATH, briefly, in `open_name`, and for good from
    /// `reach_parent`, which reads nothing from it).
    fd: std::fs::File,
}

/// A name in a directory as the *at calls take it: one component, never
/// `.` or `..`, never with a '/' (which would walk through whatever the
/// component before it is).
fn component(name: &str) -> std::io::Result<std::ffi::CString> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{name:?} is not a file name in the directory"),
        ));
    }
    std::ffi::CString::new(name)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL in a file name"))
}

impl Dir {
    /// Opens the directory `path` names itself: a symlink at its last
    /// name is refused (O_NOFOLLOW), and so is a FIFO or a file there,
    /// without blocking on it: a FIFO at the store's name hung root's
    /// `pki revoke` until someone wrote to it (S11-5). The directories
    /// above are followed, as any open does.
    pub fn open(path: &Path) -> std::io::Result<Dir> {
        Dir::open_name(path, false)
    }

    /// `open`, following a symlink at the last name: for a caller that
    /// checked the directory (and accepts a link there) and wants its
    /// files' creation and rename in one and the same directory.
    pub fn open_following(path: &Path) -> std::io::Result<Dir> {
        Dir::open_name(path, true)
    }

    /// Whatever is at the name first (O_PATH: opens a symlink or a FIFO
    /// as itself, blocks on nothing), its type from fstat, then, a
    /// directory, that very directory opened for reading (openat "."):
    /// no second lookup by name for anyone to race, and the refusal says
    /// what was there (O_DIRECTORY|O_NOFOLLOW alone answers ENOTDIR for a
    /// symlink and a FIFO alike).
    fn open_name(path: &Path, follow: bool) -> std::io::Result<Dir> {
        use std::os::fd::FromRawFd as _;
        use std::os::unix::ffi::OsStrExt as _;
        // As components: a trailing '/' (`--dir sso/`) makes the kernel
        // follow a link at the last name whatever O_NOFOLLOW says.
        let path: std::path::PathBuf = path.components().collect();
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL in a path")
        })?;
        let nofollow = if follow { 0 } else { libc::O_NOFOLLOW };
        // SAFETY: a NUL-terminated path and flags; no mode (no O_CREAT).
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC | nofollow) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by open, and nothing else owns it.
        let at = Dir {
            fd: unsafe { std::fs::File::from_raw_fd(fd) },
        };
        let kind = at.fd.metadata()?.file_type();
        if !kind.is_dir() {
            let what = if kind.is_symlink() {
                "is a symbolic link"
            } else if kind.is_fifo() {
                "is a FIFO, not a directory"
            } else {
                "is not a directory"
            };
            let why = if follow {
                what.to_owned()
            } else {
                format!(
                    "{what}: name the directory itself, not a link to it (it is opened once, never through a link at its name)"
                )
            };
            return Err(std::io::Error::new(std::io::ErrorKind::NotADirectory, why));
        }
        Ok(Dir { fd: at.reopen()? })
    }

    /// `path` itself opened O_PATH (for `reach_parent`'s walk).
    fn open_path(path: &Path) -> std::io::Result<Dir> {
        use std::os::unix::fs::OpenOptionsExt as _;
        Ok(Dir {
            fd: std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
                .open(path)?,
        })
    }

    /// The directory `name` (`..` too) opened O_PATH, never through a
    /// symlink.
    fn open_dir_at(&self, name: &std::ffi::CStr) -> std::io::Result<Dir> {
        Ok(Dir {
            fd: self.openat(
                name,
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0,
            )?,
        })
    }

    /// Root's, and writable by root alone: an operator's link in it is
    /// the operator's.
    fn root_only(&self) -> std::io::Result<bool> {
        let meta = self.metadata()?;
        // An ACL, or one that cannot be read: not followed (the open
        // then refuses the link).
        Ok(meta.uid() == 0
            && meta.mode() & 0o022 == 0
            && matches!(self.acl(Path::new("")), Ok(None)))
    }

    /// A POSIX access ACL on this directory (`has_acl`), through a
    /// descriptor of its own opened for reading (getxattr needs one that
    /// is not O_PATH). Fails closed: a directory that cannot be looked at
    /// is refused by the caller.
    fn acl(&self, shown: &Path) -> std::io::Result<Option<String>> {
        use std::os::fd::AsRawFd as _;
        let fd = self.reopen()?;
        // SAFETY: `fd` is open; the name is NUL-terminated; a null buffer
        // of size 0 only asks for the attribute's size.
        let n = unsafe {
            libc::fgetxattr(
                fd.as_raw_fd(),
                c"system.posix_acl_access".as_ptr(),
                std::ptr::null_mut(),
                0,
            )
        };
        if n > 0 {
            return Ok(Some(format!(
                "{} has a POSIX ACL (getfacl shows it), which may let others write where its mode does not: remove it (setfacl -b)",
                shown.display()
            )));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            _ if n == 0 => Ok(None),
            Some(libc::ENODATA) | Some(libc::EOPNOTSUPP) => Ok(None),
            _ => Err(e),
        }
    }

    /// `name` opened to append, created (with `mode`, less the umask) if
    /// missing: never through a symlink at the name (ELOOP), never
    /// blocking on a FIFO no one reads (ENXIO; the caller may clear
    /// O_NONBLOCK once it knows what it opened).
    pub fn open_append(&self, name: &str, mode: u32) -> std::io::Result<std::fs::File> {
        self.openat(
            &component(name)?,
            libc::O_WRONLY
                | libc::O_APPEND
                | libc::O_CREAT
                | libc::O_NOFOLLOW
                | libc::O_NONBLOCK
                | libc::O_NOCTTY
                | libc::O_CLOEXEC,
            mode,
        )
    }

    /// `name` created for writing, only if nothing (a symlink neither) is
    /// there: O_CREAT|O_EXCL, with `mode` (less the umask).
    pub fn open_new(&self, name: &str, mode: u32) -> std::io::Result<std::fs::File> {
        self.openat(
            &component(name)?,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode,
        )
    }

    /// Unlinks `name` in this directory (not a directory; a symlink is
    /// removed itself, never followed).
    pub fn remove(&self, name: &str) -> std::io::Result<()> {
        use std::os::fd::AsRawFd as _;
        let c = component(name)?;
        // SAFETY: the directory's descriptor is open while `self` lives;
        // `c` is NUL-terminated; no flags.
        if unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// openat in this directory, the result owned.
    fn openat(
        &self,
        name: &std::ffi::CStr,
        flags: libc::c_int,
        mode: u32,
    ) -> std::io::Result<std::fs::File> {
        use std::os::fd::{AsRawFd as _, FromRawFd as _};
        // SAFETY: the directory's descriptor is open while `self` lives,
        // `name` is NUL-terminated, and the mode is read only with
        // O_CREAT.
        let fd = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                name.as_ptr(),
                flags,
                mode as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by openat, and nothing else owns it.
        Ok(unsafe { std::fs::File::from_raw_fd(fd) })
    }

    /// The directory's own metadata (fstat: the directory opened, not
    /// whatever its name is now).
    pub fn metadata(&self) -> std::io::Result<std::fs::Metadata> {
        self.fd.metadata()
    }

    /// Sets the directory's mode (fchmod).
    pub fn set_mode(&self, mode: u32) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        self.fd
            .set_permissions(std::fs::Permissions::from_mode(mode))
    }

    /// `name` opened for reading: not through a symlink (ELOOP), and not
    /// blocking on a FIFO (O_NONBLOCK); the caller checks the type on the
    /// descriptor.
    pub fn open_read(&self, name: &str) -> std::io::Result<std::fs::File> {
        self.openat(
            &component(name)?,
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC,
            0,
        )
    }

    /// `name`'s own metadata, a symlink's included (not followed).
    pub fn symlink_metadata(&self, name: &str) -> std::io::Result<std::fs::Metadata> {
        self.openat(
            &component(name)?,
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0,
        )?
        .metadata()
    }

    /// Whether anything (a symlink too) is there by `name`.
    pub fn exists(&self, name: &str) -> std::io::Result<bool> {
        match self.symlink_metadata(name) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The directory opened again, a new open file description of the
    /// same directory (whatever its name is now): flock excludes per
    /// description, so two holders sharing one descriptor would not
    /// exclude each other, and each lock needs its own.
    pub fn reopen(&self) -> std::io::Result<std::fs::File> {
        self.openat(
            c".",
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            0,
        )
    }

    /// Writes `name` whole by rename, through a temporary file that this
    /// call creates: a random name, O_CREAT|O_EXCL (a file someone left
    /// there, with their mode or owner, is never reused) and O_NOFOLLOW (a
    /// planted symlink is not followed), with exactly `mode` from its
    /// creation (set again with fchmod: the caller's umask does not apply,
    /// so a root with umask 077 does not leave a public file only root can
    /// read). With `owner` (uid, gid) the file is given to them before it
    /// takes its name (root writing into another user's store: the file
    /// stays that user's). A reader never sees half a file; the temporary
    /// file is removed if anything fails. Every step in this directory,
    /// by its descriptor.
    pub fn write_replacing_owned(
        &self,
        name: &str,
        contents: &[u8],
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> std::io::Result<()> {
        use std::io::Write as _;
        use std::os::fd::AsRawFd as _;
        use std::os::unix::fs::PermissionsExt as _;
        let target = component(name)?;
        let mut random = [0u8; 8];
        aws_lc_rs::rand::fill(&mut random).map_err(|_| std::io::Error::other("no randomness"))?;
        let suffix: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let tmp = component(&format!(".{name}.{suffix}.tmp"))?;
        let mut created = false;
        let result = (|| {
            let mut f = self.openat(
                &tmp,
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                mode,
            )?;
            created = true;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
            }
            // After fchown, which clears set-id bits.
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
            f.write_all(contents)?;
            f.sync_all()?;
            let dir = self.fd.as_raw_fd();
            // SAFETY: the directory's descriptor is open while `self`
            // lives; both names are NUL-terminated.
            if unsafe { libc::renameat(dir, tmp.as_ptr(), dir, target.as_ptr()) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })();
        if result.is_err() && created {
            // SAFETY: as above; a name, no flags (not a directory).
            unsafe { libc::unlinkat(self.fd.as_raw_fd(), tmp.as_ptr(), 0) };
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn a_directory_others_may_write_is_refused_and_ones_own_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("admin.sock");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(check_parent_of(&file), Ok(()));
        for mode in [0o775, 0o757, 0o1777] {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap();
            let why = check_parent_of(&file).unwrap_err();
            assert!(why.contains("writable by others"), "{mode:o}: {why}");
            assert!(why.contains(&dir.path().display().to_string()), "{why}");
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = tempfile::tempdir().unwrap();
        let linked = link.path().join("run");
        std::os::unix::fs::symlink(dir.path(), &linked).unwrap();
        let why = check_parent_of(&linked.join("admin.sock")).unwrap_err();
        assert!(why.contains("symbolic link"), "{why}");
    }

    #[test]
    fn a_private_file_is_read_only_when_it_is_a_regular_file_no_one_else_could_write() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let file = dir.path().join("state.json");
        std::fs::write(&file, b"ours").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_private(&file, 100).unwrap(), b"ours");
        let untrusted = |path: &Path| match read_private(path, 100) {
            Err(PrivateFileError::Untrusted(why)) => why,
            other => panic!("{}: {other:?}", path.display()),
        };
        // Larger than asked for.
        assert!(
            matches!(read_private(&file, 2), Err(PrivateFileError::Untrusted(w)) if w.contains("larger"))
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o620)).unwrap();
        assert!(untrusted(&file).contains("writable by others"));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        if euid() == 0 {
            std::os::unix::fs::chown(&file, Some(65534), None).unwrap();
            assert!(untrusted(&file).contains("belongs to uid 65534"));
            std::os::unix::fs::chown(&file, Some(0), None).unwrap();
        }
        // A FIFO is refused without blocking on it.
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(untrusted(&fifo).contains("not a regular file"));
        // A symlink is not followed.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(matches!(
            read_private(&link, 100),
            Err(PrivateFileError::Io(_))
        ));
        // Nothing is read from a directory others can write.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(untrusted(&file).contains("writable by others"));
    }

    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    /// `Dir::open` takes the directory at the name itself: a symlink
    /// there (spelt with a trailing '/' too, which makes the kernel follow
    /// it despite O_NOFOLLOW), a FIFO or a file is refused at once and
    /// says which (S11-4, S11-5). `open_following` takes a link to a
    /// directory, never a FIFO.
    #[test]
    fn a_directory_is_opened_as_itself_never_through_a_link_and_never_waiting_on_a_fifo() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let fifo = d.path().join("fifo");
        mkfifo(&fifo);
        let file = d.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let refused = |p: &Path| {
            let e = Dir::open(p).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::NotADirectory, "{e}");
            e.to_string()
        };
        let trailing = std::path::PathBuf::from(format!("{}/", link.display()));
        for p in [&link, &trailing] {
            let e = refused(p);
            assert!(e.contains("is a symbolic link"), "{e}");
            assert!(e.contains("name the directory itself"), "{e}");
        }
        let started = std::time::Instant::now();
        assert!(refused(&fifo).contains("is a FIFO"));
        assert!(Dir::open_following(&fifo).is_err());
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        assert!(refused(&file).contains("is not a directory"));
        assert_eq!(
            Dir::open(&d.path().join("none")).unwrap_err().kind(),
            std::io::ErrorKind::NotFound
        );
        assert!(Dir::open(&real).unwrap().metadata().unwrap().is_dir());
        assert!(Dir::open(&trailing.join("..").join("real/")).is_ok());
        assert!(Dir::open_following(&link).is_ok());
    }

    /// Once open, a `Dir` is where everything happens, whatever its name
    /// becomes: a file written after the directory was moved away and a
    /// symlink put at its name goes into the directory opened, not where
    /// the link points (S11-4). Names are single components; a failed
    /// write leaves no temporary file.
    #[test]
    fn what_is_done_in_an_open_directory_stays_there_when_its_name_is_swapped() {
        use std::os::unix::fs::MetadataExt as _;
        let d = tempfile::tempdir().unwrap();
        let store = d.path().join("sso");
        std::fs::create_dir(&store).unwrap();
        let elsewhere = d.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let dir = Dir::open(&store).unwrap();
        let ino = dir.metadata().unwrap().ino();
        let moved = d.path().join("moved");
        std::fs::rename(&store, &moved).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &store).unwrap();

        dir.write_replacing_owned("index.json", b"{}", 0o600, None)
            .unwrap();
        assert_eq!(std::fs::read(moved.join("index.json")).unwrap(), b"{}");
        assert_eq!(
            std::fs::metadata(moved.join("index.json"))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777,
            0o600
        );
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
        assert_eq!(dir.metadata().unwrap().ino(), ino);
        assert!(dir.exists("index.json").unwrap());
        assert!(!dir.exists("crl.pem").unwrap());
        let mut text = String::new();
        std::io::Read::read_to_string(&mut dir.open_read("index.json").unwrap(), &mut text)
            .unwrap();
        assert_eq!(text, "{}");
        // A symlink in it: seen as one, never read through.
        std::os::unix::fs::symlink("index.json", moved.join("link")).unwrap();
        assert!(
            dir.symlink_metadata("link")
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            dir.open_read("link").unwrap_err().raw_os_error(),
            Some(libc::ELOOP)
        );
        // One component only.
        for name in ["", ".", "..", "../elsewhere/x", "a/b"] {
            assert_eq!(
                dir.write_replacing_owned(name, b"x", 0o644, None)
                    .unwrap_err()
                    .kind(),
                std::io::ErrorKind::InvalidInput,
                "{name:?}"
            );
        }
        // The rename fails (a directory has the name): no temporary left.
        std::fs::create_dir(moved.join("busy")).unwrap();
        assert!(
            dir.write_replacing_owned("busy", b"x", 0o644, None)
                .is_err()
        );
        let left: Vec<_> = std::fs::read_dir(&moved)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        // fchmod of the directory opened.
        dir.set_mode(0o711).unwrap();
        assert_eq!(
            std::fs::metadata(&moved).unwrap().permissions().mode() & 0o7777,
            0o711
        );
    }

    /// `reach_parent` holds what it judged: a directory of the user's is
    /// only ever the last one, a link in it (`dot -> .` too) is refused,
    /// a link at the name is followed only when asked and in a directory
    /// root's alone, and a file made after the walk goes into the
    /// directory walked to, whatever its name has become (S13-1, S13-3).
    #[test]
    fn a_files_directory_is_reached_through_descriptors_and_only_its_name_in_the_users() {
        use std::os::unix::fs::PermissionsExt as _;
        if euid() != 0 {
            return;
        }
        const USER: u32 = 4343;
        // Beside the test binary: every directory above is root's, not
        // the sticky /tmp (refused with a user).
        let exe = std::env::current_exe().unwrap();
        let d = tempfile::Builder::new()
            .tempdir_in(exe.parent().unwrap())
            .unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mkdir = |p: &Path, owner: u32| {
            std::fs::create_dir(p).unwrap();
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::os::unix::fs::chown(p, Some(owner), Some(owner)).unwrap();
        };
        let user = Some((USER, &[USER][..]));
        let refuse = |why: String| std::io::Error::other(format!("REFUSED {why}"));
        let reach = |p: &Path, user: Option<(u32, &[u32])>, follow: bool| {
            reach_parent(p, user, follow, &refuse)
        };
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        let users = d.path().join("users");
        mkdir(&users, USER);
        let logs = d.path().join("logs");
        mkdir(&logs, 0);

        // The user's directory as the file's own: reached.
        let (dir, name) = reach(&users.join("x.log"), user, true).unwrap();
        assert_eq!(
            (dir.metadata().unwrap().ino(), name.as_str()),
            (ino(&users), "x.log")
        );
        // Below it, or through a link in it (`dot -> .`): refused.
        mkdir(&users.join("sub"), USER);
        std::os::unix::fs::symlink(".", users.join("dot")).unwrap();
        for p in [users.join("sub/x.log"), users.join("dot/x.log")] {
            let e = reach(&p, user, true).unwrap_err().to_string();
            assert!(
                e.contains("REFUSED") && e.contains("belongs to uid 4343"),
                "{}: {e}",
                p.display()
            );
            // Without a user to keep out: reached.
            reach(&p, None, true).unwrap();
        }
        // `..` and `.` on the way, through root's directories: reached.
        let (dir, _) = reach(&d.path().join("logs/../logs/./x.log"), user, true).unwrap();
        assert_eq!(dir.metadata().unwrap().ino(), ino(&logs));
        // A link at the name in a directory root's alone: followed only
        // when asked.
        std::os::unix::fs::symlink("logs/x.log", d.path().join("link.log")).unwrap();
        let (dir, name) = reach(&d.path().join("link.log"), user, true).unwrap();
        assert_eq!(
            (dir.metadata().unwrap().ino(), name.as_str()),
            (ino(&logs), "x.log")
        );
        let (dir, name) = reach(&d.path().join("link.log"), user, false).unwrap();
        assert_eq!(
            (dir.metadata().unwrap().ino(), name.as_str()),
            (ino(d.path()), "link.log")
        );
        // A missing directory on the way is said as such.
        let e = reach(&d.path().join("none/x.log"), user, true).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);

        // What is held is what was judged: `logs` moved away and a link
        // put at its name after the walk; the file goes into the
        // directory walked to.
        let (dir, name) = reach(&logs.join("x.log"), user, true).unwrap();
        let moved = d.path().join("moved");
        std::fs::rename(&logs, &moved).unwrap();
        std::os::unix::fs::symlink(&users, &logs).unwrap();
        drop(dir.open_new(&name, 0o640).unwrap());
        assert!(moved.join("x.log").is_file());
        assert!(!users.join("x.log").exists());
        dir.remove(&name).unwrap();
        assert!(!moved.join("x.log").exists());
    }

    /// Each `reopen` is an open file description of its own: flock on
    /// one excludes the other, as two processes' opens would (two issuer
    /// threads sharing one `Dir` must still exclude each other).
    #[test]
    fn each_reopen_of_a_directory_takes_its_own_lock() {
        let d = tempfile::tempdir().unwrap();
        let dir = Dir::open(d.path()).unwrap();
        let first = dir.reopen().unwrap();
        let second = dir.reopen().unwrap();
        first.try_lock().unwrap();
        assert!(matches!(
            second.try_lock(),
            Err(std::fs::TryLockError::WouldBlock)
        ));
        drop(first);
        second.try_lock().unwrap();
    }

    /// Root started with `user` reads back what the gateway wrote as that
    /// user: that user's directory and files are trusted for reading, no
    /// other user's.
    #[test]
    fn what_the_user_dropped_to_wrote_is_read_back_by_root() {
        use std::os::unix::fs::PermissionsExt as _;
        if euid() != 0 {
            return;
        }
        // A uid no other test uses: the setting is process-wide.
        const USER: u32 = 4242;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.json");
        std::fs::write(&file, b"{}").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::chown(dir.path(), Some(USER), None).unwrap();
        std::os::unix::fs::chown(&file, Some(USER), None).unwrap();
        assert!(
            check_dir(dir.path())
                .unwrap_err()
                .contains("belongs to uid 4242")
        );
        set_drops_to(USER);
        assert_eq!(read_private(&file, 100).unwrap(), b"{}");
        // Still never a place root creates files in by name.
        assert!(check_parent_of(&file).is_err());
    }
}

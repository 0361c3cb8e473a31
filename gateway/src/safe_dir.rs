//! Directories the gateway creates files in by name while it may still be
//! root (pins, `admin_socket`): safe only when no one else can write there,
//! or a user who can could swap a name for a symlink between two calls and
//! have root chmod, chown or write whatever it points to.

use std::os::unix::fs::MetadataExt as _;
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
}

//! Attacker review 17 (s8/review17, see /work/helpers/s8/review17/findings.md):
//! the S16 fixes (635c310 init writes --root-key-out and --ca-out itself).
//! Each test asserts the HARM (it passes on the code as reviewed) beside a
//! control, and is meant to be turned round once fixed.

use super::*;

use std::os::unix::fs::PermissionsExt as _;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A directory whose every ancestor is root's and writable by root alone
/// (not under /tmp).
fn root_only_dir() -> tempfile::TempDir {
    let exe = std::env::current_exe().unwrap();
    let dir = tempfile::Builder::new()
        .prefix(".attack17-")
        .tempdir_in(exe.parent().unwrap())
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// S17-1: init checks `--root-key-out`, `--ca-out` and `--root-crl-out`
/// one by one ("no file there yet") but not against each other, and
/// writes them in turn (anchor, key, then the root's CRL) by replacing
/// rename. An operator who gives the key the CRL's path (or the anchor's)
/// gets a successful init whose root key is overwritten by the CRL: the
/// only copy of the root key is gone, and the intermediate can never be
/// revoked by the root. Measured: init succeeds, and the file init says
/// holds the root key holds no private key. Control: distinct paths keep
/// the key.
#[test]
fn s17_1_init_with_the_same_path_for_root_key_and_root_crl_destroys_the_root_key() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    for same in [true, false] {
        let base = root_only_dir();
        let etc = base.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        let crl_out = etc.join("sso-root.crl.pem");
        let key_out = if same {
            crl_out.clone()
        } else {
            etc.join("sso-root.key")
        };
        let anchor = etc.join("sso-ca.pem");
        let made = Store::open(&base.path().join("sso"))
            .with_root_crl_out(Some(&crl_out))
            .with_init_outs(Some(&key_out), Some(&anchor))
            .init(&super::attack12::spec());
        assert!(made.is_ok(), "same {same}: {made:?}");
        let key = std::fs::read_to_string(&key_out).unwrap();
        assert!(!base.path().join("sso/root.key").exists());
        if same {
            assert!(
                !key.contains("PRIVATE KEY"),
                "the root key survived: {key:.40}"
            );
            assert!(key.contains("BEGIN X509 CRL"));
        } else {
            assert!(key.contains("PRIVATE KEY"), "control");
        }
    }
}

/// S17-1 (the anchor): the same with `--root-key-out` = `--ca-out`: init
/// succeeds and the routes' trust anchor is the root's private key (no
/// certificate: routes fail to load), the key in /etc/gateway.
#[test]
fn s17_1_init_with_the_same_path_for_root_key_and_ca_out_puts_the_key_as_the_anchor() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    for same in [true, false] {
        let base = root_only_dir();
        let etc = base.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        let anchor = etc.join("sso-ca.pem");
        let key_out = if same {
            anchor.clone()
        } else {
            etc.join("sso-root.key")
        };
        let made = Store::open(&base.path().join("sso"))
            .with_root_crl_out(Some(&etc.join("sso-root.crl.pem")))
            .with_init_outs(Some(&key_out), Some(&anchor))
            .init(&super::attack12::spec());
        assert!(made.is_ok(), "same {same}: {made:?}");
        let a = std::fs::read_to_string(&anchor).unwrap();
        assert_eq!(a.contains("BEGIN CERTIFICATE"), !same, "same {same}");
        assert_eq!(a.contains("PRIVATE KEY"), same, "same {same}");
    }
}

/// The issuer's user, as these tests play it (nobody).
const USER: u32 = 65534;

/// `USER` runs `sh -c script` in `cwd`; whether it succeeded.
fn as_user(cwd: &Path, script: &str) -> bool {
    use std::os::unix::process::CommandExt as _;
    std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(cwd)
        .uid(USER)
        .gid(USER)
        .status()
        .unwrap()
        .success()
}

/// S17-2: the S16-2 rule (with no store yet, no one but root anywhere on
/// the way to an out file) applies only when the store is missing. When
/// the store directory is already there and root's (the operator made it
/// first, `install -d -m 0711 sso`, which init accepts), `owner_for_root`
/// is None and only the out file's immediate directory is checked: a
/// root-owned `root/` inside the issuer's user's directory passes for
/// `--ca-out`, and the user then renames `root/` away and puts its own
/// anchor at the path routes trust. Measured: init succeeds, and after the
/// user's swap the anchor is the user's file. Control: the same with no
/// store made first: init refuses (the S16-2 fix), nothing written.
#[test]
fn s17_2_a_store_made_first_by_root_skips_the_whole_path_check_for_ca_out() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    use std::os::unix::fs::chown;
    for made_first in [true, false] {
        let base = root_only_dir();
        let state = base.path().join("gateway-issuer");
        std::fs::create_dir(&state).unwrap();
        chown(&state, Some(USER), Some(USER)).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o711)).unwrap();
        // Root's directory inside the user's (an operator's mistake).
        let roots = state.join("root");
        std::fs::create_dir(&roots).unwrap();
        std::fs::set_permissions(&roots, std::fs::Permissions::from_mode(0o755)).unwrap();
        let sso = state.join("sso");
        if made_first {
            std::fs::create_dir(&sso).unwrap();
            std::fs::set_permissions(&sso, std::fs::Permissions::from_mode(0o711)).unwrap();
        }
        let etc = base.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        let anchor = roots.join("sso-ca.pem");
        let made = Store::open(&sso)
            .with_root_crl_out(Some(&etc.join("sso-root.crl.pem")))
            .with_init_outs(Some(&etc.join("sso-root.key")), Some(&anchor))
            .init(&super::attack12::spec());
        assert_eq!(
            made.is_ok(),
            made_first,
            "made_first {made_first}: {made:?}"
        );
        if !made_first {
            assert!(!anchor.exists());
            continue;
        }
        let real = std::fs::read_to_string(&anchor).unwrap();
        assert!(real.contains("BEGIN CERTIFICATE"));
        let swapped = as_user(
            &state,
            "mv root root.old && mkdir root && echo users-own-ca > root/sso-ca.pem",
        );
        assert!(swapped);
        assert_eq!(
            std::fs::read_to_string(&anchor).unwrap().trim(),
            "users-own-ca"
        );
    }
}

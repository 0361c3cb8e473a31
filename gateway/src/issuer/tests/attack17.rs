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

/// S17-1: init checked `--root-key-out`, `--ca-out` and `--root-crl-out`
/// one by one but not against each other. Before the fix an operator who
/// gave the key the CRL's path got a successful init whose only root key
/// was overwritten by the CRL (measured: the file held no private key).
/// Now two of them naming one file are refused before anything is made.
/// Control: distinct paths keep the key.
#[test]
fn s17_1_init_refuses_one_path_for_root_key_and_root_crl() {
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
        if same {
            // Now refused before anything is made.
            let e = made.unwrap_err().to_string();
            assert!(e.contains("named twice"), "{e}");
            assert!(!key_out.exists() && !base.path().join("sso").exists());
        } else {
            assert!(made.is_ok(), "control: {made:?}");
            let key = std::fs::read_to_string(&key_out).unwrap();
            assert!(key.contains("PRIVATE KEY"), "control");
        }
    }
}

/// S17-1 (the anchor): the same with `--root-key-out` = `--ca-out`: before
/// the fix init succeeded and the routes' trust anchor was the root's
/// private key. Now refused, nothing written.
#[test]
fn s17_1_init_refuses_one_path_for_root_key_and_ca_out() {
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
        if same {
            let e = made.unwrap_err().to_string();
            assert!(e.contains("named twice"), "{e}");
            assert!(!anchor.exists());
        } else {
            assert!(made.is_ok(), "control: {made:?}");
            let a = std::fs::read_to_string(&anchor).unwrap();
            assert!(a.contains("BEGIN CERTIFICATE") && !a.contains("PRIVATE KEY"));
        }
    }
}

/// The issuer's user, as these tests play it (nobody).
const USER: u32 = 65534;

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
fn s17_2_a_store_made_first_by_root_keeps_the_whole_path_check_for_ca_out() {
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
        // Refused either way now (before the fix a store made first let
        // it pass, and the user then swapped `root/` for its own anchor).
        let e = made.unwrap_err().to_string();
        assert!(
            e.contains("belongs to uid 65534"),
            "made_first {made_first}: {e}"
        );
        assert!(!anchor.exists());
    }
}

//! Attacker review 16 (s8/review16, see /work/helpers/s8/review16/findings.md):
//! the S15 fixes (590bf3b init makes the store itself and refuses another
//! user's directory; --root-crl-out refuses a sticky directory when the
//! store is unopenable). Each test asserts the HARM (it passes on the code
//! as reviewed) beside a control, and is meant to be turned round once
//! fixed.

use super::*;

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::sync::atomic::AtomicU64;

use crate::tls::bundle::BundleFiles;

/// The issuer's user, as these tests play it (nobody).
const USER: u32 = 65534;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn chown_r(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid)).unwrap();
    if std::fs::symlink_metadata(path).unwrap().is_dir() {
        for e in std::fs::read_dir(path).unwrap() {
            chown_r(&e.unwrap().path(), uid);
        }
    }
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A directory whose every ancestor is root's and writable by root alone
/// (not under /tmp), 0755 so that `USER` may walk through it.
fn root_only_dir() -> tempfile::TempDir {
    let exe = std::env::current_exe().unwrap();
    let dir = tempfile::Builder::new()
        .prefix(".attack16-")
        .tempdir_in(exe.parent().unwrap())
        .unwrap();
    chmod(dir.path(), 0o755);
    dir
}

/// `USER` runs `sh -c script` in `cwd`; whether it succeeded.
fn as_user(cwd: &Path, script: &str) -> bool {
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

/// Whether a gateway with the documented route (`ca` the anchor root
/// copied, `crls` = sso/crl.pem and the root's file) takes `chain`.
fn route_accepts(anchor: &Path, crls: Vec<std::path::PathBuf>, chain: &str) -> Result<(), String> {
    let files = BundleFiles {
        ca: anchor.to_owned(),
        crls,
        crl_expired: crate::config::CrlExpired::Refuse,
        spiffe_trust_domains: None,
    };
    let bundle = crate::tls::bundle::Bundle::load(
        "trust sso".into(),
        &files,
        crate::tls::provider().signature_verification_algorithms,
        std::sync::Arc::new(AtomicU64::new(0)),
    )
    .map_err(|e| e.to_string())?;
    super::attack12::verify(&bundle, chain)
}

/// S16-1: after init, docs/sso.md had root read `root.key` and `ca.pem`
/// back by name from the store, whose name lies in the issuer's user's
/// directory: the user renamed root's fresh `sso` away and put a store of
/// its own there, and root copied the user's root certificate into the
/// routes' trust anchor (measured before the fix: the anchor the user's
/// CA, a gateway with the documented route taking a chain the user
/// signed). Now init writes the anchor (`--ca-out`) and the root key
/// (`--root-key-out`) itself, from memory, to root-only places, and the
/// docs copy nothing out of the store: whatever the user swaps in after,
/// the anchor is the root init made, the user's chain is refused, and the
/// root key never was in the store. Control: the same with the directory
/// above the store root's.
#[test]
fn s16_1_init_writes_the_anchor_and_root_key_itself_so_a_swapped_store_gives_nothing() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    for users_parent in [true, false] {
        let base = root_only_dir();
        let state = base.path().join("gateway-issuer");
        std::fs::create_dir(&state).unwrap();
        if users_parent {
            chown_r(&state, USER);
        }
        chmod(&state, 0o711);
        let etc = base.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        let out = etc.join("sso-root.crl.pem");

        // The user's own CA, made wherever it likes (here: beside, its).
        let mine = base.path().join("mine");
        std::fs::create_dir(&mine).unwrap();
        chmod(&mine, 0o755);
        let fake = mine.join("sso");
        // Named apart from root's CA: the gateway would not use two CRLs
        // numbered alike from one issuer name (fail closed).
        Store::open(&fake)
            .init(&InitSpec {
                name: "SSO.",
                key_type: crate::pki::KeyType::P256,
                permitted_dns: None,
            })
            .unwrap();
        chown_r(&mine, USER);
        let user_chain = super::attack12::alice_chain(&Store::open(&fake));

        // Root's documented init of the (new) SSO CA, fixed: root's store.
        let sso = state.join("sso");
        let offline = base.path().join("offline");
        std::fs::create_dir(&offline).unwrap();
        let anchor = etc.join("sso-ca.pem");
        Store::open(&sso)
            .with_root_crl_out(Some(&out))
            .with_init_outs(Some(&offline.join("root.key")), Some(&anchor))
            .init(&super::attack12::spec())
            .unwrap();
        assert_eq!(std::fs::metadata(&sso).unwrap().uid(), 0);
        assert!(
            !sso.join("root.key").exists(),
            "the root key never in the store"
        );
        let real_root = std::fs::read_to_string(sso.join("root.pem")).unwrap();

        // The user, watching its directory, swaps the store.
        let swapped = as_user(
            &state,
            &format!("mv sso sso.root && mv {} sso", fake.display()),
        );
        assert_eq!(swapped, users_parent);

        // Nothing is copied out of the store by name any more.
        let anchored = std::fs::read_to_string(&anchor).unwrap();
        let key = std::fs::metadata(offline.join("root.key")).unwrap();
        assert_eq!((key.uid(), key.mode() & 0o777), (0, 0o600));

        let accepted = route_accepts(&anchor, vec![sso.join("crl.pem"), out.clone()], &user_chain);
        assert_eq!(anchored, real_root, "users_parent {users_parent}");
        assert!(accepted.is_err(), "users_parent {users_parent}");
    }
}

/// S16-2: with no store yet (init), `--root-crl-out` was checked only by
/// `check_parent_of`, its immediate directory: a root-owned directory
/// inside the issuer's user's directory passed, and the user then renamed
/// it away and put its own file at the path routes list (measured before
/// the fix). Now a store not there yet holds the file to the stricter
/// rule, no one but root anywhere on the way: refused, nothing made.
/// Control: the user's own directory as the file's: refused.
#[test]
fn s16_2_init_refuses_a_root_crl_out_below_a_directory_of_the_issuers_user() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let base = root_only_dir();
    let state = base.path().join("gateway-issuer");
    std::fs::create_dir(&state).unwrap();
    chown_r(&state, USER);
    chmod(&state, 0o711);
    let rootdir = state.join("root");
    std::fs::create_dir(&rootdir).unwrap();
    chmod(&rootdir, 0o755);
    let out = rootdir.join("sso-root.crl.pem");

    // Control: the user's own directory as the out's directory: refused.
    let e = Store::open(&base.path().join("sso-a"))
        .with_root_crl_out(Some(&state.join("sso-root.crl.pem")))
        .init(&super::attack12::spec())
        .unwrap_err()
        .to_string();
    assert!(e.contains("--root-crl-out"), "{e}");

    // One level down, under a directory of root's in the user's: refused
    // too (before the fix init wrote it there, and the user then put its
    // own file where routes read the root's CRL).
    let e = Store::open(&base.path().join("sso-b"))
        .with_root_crl_out(Some(&out))
        .init(&super::attack12::spec())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--root-crl-out") && e.contains("belongs to uid"),
        "{e}"
    );
    assert!(!out.exists() && !base.path().join("sso-b").exists());
}

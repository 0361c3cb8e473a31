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

/// S16-1: init's fix (590bf3b) keeps the issuer's user out of the store
/// while init runs, but the store's name still lies in that user's
/// directory (/var/lib/gateway-issuer, 0711, the user's), and the steps
/// docs/sso.md has root take right after init read it by that name: `mv
/// sso/root.key` to offline media, `install -m 0644 sso/ca.pem
/// /etc/gateway/sso-ca.pem`. The user renames root's fresh `sso` away
/// (a rename in its own directory: no right on `sso` needed) and puts a
/// store of its own there: root then copies the user's root certificate
/// into the routes' trust anchor and files the user's root key as the
/// offline one. Measured: the anchor is the user's CA, not the root init
/// made, and a gateway with the documented route takes a user
/// certificate the user signed with its own intermediate. This is the
/// harm S15-1 named ("ca.pem copied next into the routes' trust anchor
/// was its to replace"), with the new CA set up where the docs put it
/// ("the same when a new SSO CA replaces a revoked one").
/// Control: with the directory above the store root's, the user's rename
/// is refused and the anchor is the root init made; the user's chain is
/// refused.
#[test]
fn s16_1_the_issuers_user_swaps_the_new_store_before_roots_documented_copy_of_ca_pem() {
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
        Store::open(&sso)
            .with_root_crl_out(Some(&out))
            .init(&super::attack12::spec())
            .unwrap();
        assert_eq!(std::fs::metadata(&sso).unwrap().uid(), 0);
        let real_root = std::fs::read_to_string(sso.join("root.pem")).unwrap();

        // The user, watching its directory, swaps the store.
        let swapped = as_user(
            &state,
            &format!("mv sso sso.root && mv {} sso", fake.display()),
        );
        assert_eq!(swapped, users_parent);

        // Root's next documented steps, by name.
        let offline = base.path().join("offline");
        std::fs::create_dir(&offline).unwrap();
        std::fs::rename(sso.join("root.key"), offline.join("root.key")).unwrap();
        let anchor = etc.join("sso-ca.pem");
        std::fs::copy(sso.join("ca.pem"), &anchor).unwrap();
        let anchored = std::fs::read_to_string(&anchor).unwrap();

        let accepted = route_accepts(&anchor, vec![sso.join("crl.pem"), out.clone()], &user_chain);
        if users_parent {
            // HARM: the routes' anchor is the user's CA, and they take
            // whatever it signs.
            assert_ne!(anchored, real_root);
            assert!(accepted.is_ok(), "{accepted:?}");
        } else {
            assert_eq!(anchored, real_root);
            assert!(accepted.is_err());
        }
    }
}

/// S16-2: with no store yet (init, the new CA's store), `--root-crl-out`
/// is checked only by `check_parent_of`, its immediate directory: a
/// root-owned 0755 directory inside the issuer's user's directory passes,
/// though that user may rename it away and put its own file at the path
/// the routes list (the "anyone but root anywhere on the way" rule holds
/// for every later root command, not for init). Measured: init writes
/// the root's CRL to state/root/sso-root.crl.pem (state the user's), and
/// the user then replaces the file routes read with one of its own.
/// Control: the same out path directly in the user's directory is
/// refused by init.
#[test]
fn s16_2_init_takes_a_root_crl_out_below_a_directory_of_the_issuers_user() {
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

    // HARM: one level down, under a directory of root's, init writes it.
    Store::open(&base.path().join("sso-b"))
        .with_root_crl_out(Some(&out))
        .init(&super::attack12::spec())
        .unwrap();
    assert!(out.exists());
    // And the user puts its own file where routes read the root's CRL.
    assert!(as_user(
        &state,
        "mv root root.old && mkdir root && echo garbage > root/sso-root.crl.pem"
    ));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "garbage\n");
}

//! Attacker review 15 (s8/review15, see /work/helpers/s8/review15/findings.md):
//! the S14 fixes (414fc3e only init and sign_root_crl write the root's
//! file, O_NOCTTY, 1024 CRLs a file; 8797919 an unopenable store no longer
//! stops the root) and the S13 merge (95b2cd2). Each test asserts the HARM
//! (it passes on the code as reviewed) beside a control, and is meant to
//! be turned round into the refusal once fixed.

use super::*;

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use rustls_pki_types::UnixTime;

use crate::tls::bundle::{Bundle, BundleFiles};

/// The issuer's user, as these tests play it (nobody).
const USER: u32 = 65534;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn spec() -> InitSpec<'static> {
    InitSpec {
        name: "SSO",
        key_type: KeyType::P256,
        permitted_dns: None,
    }
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid)).unwrap();
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A directory whose every ancestor is root's and writable by root alone
/// (not under /tmp, which `--root-crl-out`'s check refuses on the way),
/// 0755 so that `USER` may walk through it as it walks to
/// /var/lib/gateway-issuer.
fn root_only_dir() -> tempfile::TempDir {
    let exe = std::env::current_exe().unwrap();
    let dir = tempfile::Builder::new()
        .prefix(".attack15-")
        .tempdir_in(exe.parent().unwrap())
        .unwrap();
    chmod(dir.path(), 0o755);
    dir
}

/// What `USER` reads of `path` (None: refused).
fn read_as_user(path: &Path) -> Option<Vec<u8>> {
    let out = std::process::Command::new("cat")
        .arg(path)
        .uid(USER)
        .gid(USER)
        .output()
        .unwrap();
    out.status.success().then_some(out.stdout)
}

/// S15-1: `pki init` wrote the new CA, root key included, into whatever
/// directory was at `--dir`: one the issuer's user made there (it owns
/// /var/lib/gateway-issuer, StateDirectory=) was taken as the store, and
/// every file given to that directory's owner, `root.key` too. Measured
/// before the fix: after the documented init into the user's `sso`,
/// `root.key` was uid 65534's and that uid read the private key, and
/// `ca.pem` (copied next into the routes' trust anchor) was its to
/// replace. Now init refuses a store that is not the runner's ("belongs to
/// uid 65534"), creating nothing in it. Control: where nothing stood at
/// the name, init makes the directory, root's, and the user cannot read
/// root.key.
#[test]
fn s15_1_init_refuses_a_directory_the_issuers_user_made() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let base = root_only_dir();
    let state = base.path().join("gateway-issuer");
    std::fs::create_dir(&state).unwrap();
    chown(&state, USER);
    chmod(&state, 0o711);
    let etc = base.path().join("etc");
    std::fs::create_dir(&etc).unwrap();

    // The user's `mkdir sso` (the old store moved to sso.revoked).
    let sso = state.join("sso");
    std::fs::create_dir(&sso).unwrap();
    chown(&sso, USER);
    chmod(&sso, 0o700);
    // The documented init, as root: refused, nothing in it.
    let e = Store::open(&sso)
        .with_root_crl_out(Some(&etc.join("sso2-root.crl.pem")))
        .init(&spec())
        .unwrap_err()
        .to_string();
    assert!(e.contains("belongs to uid 65534"), "{e}");
    assert_eq!(std::fs::read_dir(&sso).unwrap().count(), 0);
    assert!(!etc.join("sso2-root.crl.pem").exists());

    // Control: nothing at the name; init makes the directory, root's.
    let fresh = state.join("sso-new");
    Store::open(&fresh)
        .with_root_crl_out(Some(&etc.join("sso3-root.crl.pem")))
        .init(&spec())
        .unwrap();
    let key = std::fs::metadata(fresh.join("root.key")).unwrap();
    assert_eq!(key.uid(), 0);
    assert!(read_as_user(&fresh.join("root.key")).is_none());
}

/// The documented SSO store, as root, then given to `USER` (`chown -R
/// gateway-issuer: sso`) under a directory of `USER`'s: root key offline
/// with a copy of intermediate.pem, the anchor at etc/sso-ca.pem, the
/// root's CRL at etc/sso-root.crl.pem. Returns (sso, offline, anchor,
/// out).
fn users_store(
    base: &Path,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let state = base.join("gateway-issuer");
    std::fs::create_dir(&state).unwrap();
    let etc = base.join("etc");
    std::fs::create_dir(&etc).unwrap();
    let out = etc.join("sso-root.crl.pem");
    let sso = state.join("sso");
    Store::open(&sso)
        .with_root_crl_out(Some(&out))
        .init(&spec())
        .unwrap();
    let offline = base.join("offline");
    std::fs::create_dir(&offline).unwrap();
    std::fs::rename(sso.join("root.key"), offline.join("root.key")).unwrap();
    std::fs::copy(
        sso.join("intermediate.pem"),
        offline.join("intermediate.pem"),
    )
    .unwrap();
    let anchor = etc.join("sso-ca.pem");
    std::fs::copy(sso.join("root.pem"), &anchor).unwrap();
    chown(&state, USER);
    chmod(&state, 0o711);
    chown(&sso, USER);
    for e in std::fs::read_dir(&sso).unwrap() {
        chown(&e.unwrap().path(), USER);
    }
    (sso, offline, anchor, out)
}

/// S15-3: when the store cannot be opened (8797919), `--root-crl-out` was
/// judged by `writable_by_another`, said to be the stricter rule, which
/// passes a sticky world-writable directory on the way (`writable_by`
/// refuses it). Before the fix the store's owner, with a FIFO at the
/// store's name, turned root's refusal of an out path under /tmp/gw/ into
/// a CRL signed and written there. Now that rule refuses any directory
/// others may write, sticky included: refused either way, nothing
/// written. Control: the store as it is: refused.
#[test]
fn s15_3_a_fifo_at_the_stores_name_does_not_let_root_write_under_a_sticky_directory() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let base = root_only_dir();
    let (sso, offline, anchor, first) = users_store(base.path());
    let (real, _) = Store::open(&sso).intermediate_fingerprint().unwrap();
    // The operator's out path: a root-owned 0755 directory in a sticky
    // world-writable one (/tmp).
    let sticky = base.path().join("tmp");
    std::fs::create_dir(&sticky).unwrap();
    chmod(&sticky, 0o1777);
    let gw = sticky.join("gw");
    std::fs::create_dir(&gw).unwrap();
    chmod(&gw, 0o755);
    let out = gw.join("sso-root.crl.pem");
    std::fs::copy(&first, &out).unwrap();
    let before = std::fs::read(&out).unwrap();
    let operator = || {
        Store::open(&sso)
            .with_root_key(Some(&offline.join("root.key")))
            .with_root_cert(Some(&anchor))
            .with_root_crl_out(Some(&out))
    };
    let named = offline.join("intermediate.pem");
    let named = named.to_str().unwrap();

    // Control: the store opens; refused, nothing written.
    let e = operator()
        .revoke_intermediate(named)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sticky"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), before);

    // The store's owner: mv sso sso.real; mkfifo sso.
    std::fs::rename(&sso, sso.with_file_name("sso.real")).unwrap();
    let c = std::ffi::CString::new(sso.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    chown(&sso, USER);
    let e = operator()
        .revoke_intermediate(named)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sticky") && e.contains("nothing signed"), "{e}");
    assert_eq!(
        std::fs::read(&out).unwrap(),
        before,
        "nothing written under the sticky directory"
    );
    drop(real);
}

fn route_files(sso: &Path, out: &Path, anchor: &Path) -> BundleFiles {
    BundleFiles {
        ca: anchor.to_owned(),
        crls: vec![sso.join("crl.pem"), out.to_owned()],
        crl_expired: crate::config::CrlExpired::Refuse,
        spiffe_trust_domains: None,
    }
}

fn load(files: &BundleFiles) -> Bundle {
    Bundle::load(
        "trust sso".into(),
        files,
        crate::tls::provider().signature_verification_algorithms,
        Arc::new(AtomicU64::new(0)),
    )
    .unwrap()
}

/// The least time of `n` verifications of `chain`, and the result.
fn verify_time(bundle: &Bundle, chain: &str, n: usize) -> (Duration, Result<(), String>) {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    let mut least = Duration::MAX;
    let mut result = Ok(());
    for _ in 0..n {
        let t = Instant::now();
        result = bundle
            .verify(&certs[0], &certs[1..], UnixTime::now())
            .map(|_| ())
            .map_err(|e| format!("{e:?}"));
        least = least.min(t.elapsed());
    }
    (least, result)
}

/// S15-2: the S14-2 fix counts CRLs (at most 1024 a file), not their size.
/// One CRL of the intermediate (the issuer's user holds its key; a forged
/// one costs the same and then fails every user) listing many serials
/// loads, and webpki verifies the CRL's signature, so hashes all of it, on
/// every handshake that reaches that issuer (webpki issue #81). Every SSO
/// sign-in then costs the gateway a hash of up to 48 MiB (a 64 MiB PEM
/// file) on the thread that runs the handshake, and each reload parses it
/// whole, in the control loop, into a map of every serial. Measured: the
/// least verification time with a CRL of 200 000 serials against the
/// usual one, and the load. Control: the usual crl.pem.
#[test]
fn s15_2_one_large_crl_costs_every_handshake_a_hash_of_all_of_it() {
    let base = tempfile::tempdir().unwrap();
    let sso = base.path().join("sso");
    let etc = base.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    let out = etc.join("sso-root.crl.pem");
    let store = Store::open(&sso).with_root_crl_out(Some(&out));
    store.init(&spec()).unwrap();
    let anchor = etc.join("sso-ca.pem");
    std::fs::copy(sso.join("root.pem"), &anchor).unwrap();
    let sans = vec!["email:alice@example.internal".to_owned(), LAPTOP.to_owned()];
    let (chain, _) = store
        .sign_request(
            "alice",
            &csr(),
            &sans,
            time::OffsetDateTime::now_utc() + time::Duration::hours(8),
            None,
        )
        .unwrap();
    let files = route_files(&sso, &out, &anchor);

    // Control: the usual crl.pem.
    let (small, ok) = verify_time(&load(&files), &chain, 20);
    assert_eq!(ok, Ok(()));

    // The owner: one CRL of the intermediate, 200 000 serials (not alice's).
    let stolen = crate::pki::Authority::load(
        &std::fs::read_to_string(sso.join("intermediate.pem")).unwrap(),
        &std::fs::read_to_string(sso.join("intermediate.key")).unwrap(),
    )
    .unwrap();
    const N: u32 = 200_000;
    let serials: Vec<Vec<u8>> = (0..N)
        .map(|i| {
            let mut s = vec![0x7f; 16];
            s[12..].copy_from_slice(&i.to_be_bytes());
            s
        })
        .collect();
    let serials: Vec<&[u8]> = serials.iter().map(Vec::as_slice).collect();
    let big = stolen
        .crl_until(
            1000,
            &serials,
            time::OffsetDateTime::now_utc() + time::Duration::days(7),
        )
        .unwrap();
    let root_crl = std::fs::read_to_string(sso.join("root.crl.pem")).unwrap();
    std::fs::write(sso.join("crl.pem"), format!("{big}{root_crl}")).unwrap();
    let size = std::fs::metadata(sso.join("crl.pem")).unwrap().len();

    let t = Instant::now();
    let bundle = load(&files);
    let loaded = t.elapsed();
    let (large, ok) = verify_time(&bundle, &chain, 20);
    assert_eq!(ok, Ok(()), "it loads and alice still passes");
    let per_mib = large.as_secs_f64() / (size as f64 / f64::from(1 << 20));
    eprintln!(
        "s15_2: crl.pem {size} bytes ({N} serials): load {loaded:?}; one verification {small:?} -> {large:?} \
         (x{:.0}); at 64 MiB ≈ {:.0} ms a handshake, load ≈ {:.0} s (debug)",
        large.as_secs_f64() / small.as_secs_f64(),
        per_mib * 64.0 * 1000.0,
        loaded.as_secs_f64() * 64.0 / (size as f64 / f64::from(1 << 20)),
    );
    assert!(
        large > small * 5,
        "a verification with the large CRL: {large:?}, with the usual one: {small:?}"
    );
}

/// S15-4: root's commands read the store's `root.crl.pem` and `crl.pem`
/// (each up to 64 MiB) and verify every CRL in the root's name in them,
/// one signature each, with no cap on their count (the gateway's 1024 a
/// file is not applied here): the store's owner fills both with copies of
/// `init`'s public root CRL and every `revoke --intermediate` and `crl
/// --root` spends that long before it writes `--root-crl-out` (forged
/// copies cost the same, and print one WARNING line each). Measured: the
/// time of `crl --root` with 4 000 copies in each file against none, and
/// the estimate for 64 MiB each. Control: the same command on the store as
/// it was.
#[test]
fn s15_4_the_stores_owner_fills_root_crl_pem_and_root_verifies_every_copy() {
    let base = tempfile::tempdir().unwrap();
    let sso = base.path().join("sso");
    let etc = base.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    let out = etc.join("sso-root.crl.pem");
    Store::open(&sso)
        .with_root_crl_out(Some(&out))
        .init(&spec())
        .unwrap();
    let offline = base.path().join("offline");
    std::fs::create_dir(&offline).unwrap();
    std::fs::rename(sso.join("root.key"), offline.join("root.key")).unwrap();
    let anchor = etc.join("sso-ca.pem");
    std::fs::copy(sso.join("root.pem"), &anchor).unwrap();
    let operator = || {
        Store::open(&sso)
            .with_root_key(Some(&offline.join("root.key")))
            .with_root_cert(Some(&anchor))
            .with_root_crl_out(Some(&out))
    };
    let inits = std::fs::read_to_string(sso.join("root.crl.pem")).unwrap();

    // Control.
    let t = Instant::now();
    let (_, signed) = operator()
        .republish_root_crl(time::Duration::days(7))
        .unwrap();
    let usual = t.elapsed();
    assert_eq!(signed.crl_number, 2);

    // The owner: 4 000 copies of init's CRL in each file.
    const COPIES: usize = 4000;
    let filled = inits.repeat(COPIES);
    std::fs::write(sso.join("root.crl.pem"), &filled).unwrap();
    let intermediate = std::fs::read_to_string(sso.join("crl.pem")).unwrap();
    std::fs::write(sso.join("crl.pem"), format!("{intermediate}{filled}")).unwrap();
    let t = Instant::now();
    let (_, signed) = operator()
        .republish_root_crl(time::Duration::days(7))
        .unwrap();
    let slowed = t.elapsed();
    assert_eq!(signed.crl_number, 3);
    let per_byte = slowed.as_secs_f64() / (2.0 * filled.len() as f64);
    eprintln!(
        "s15_4: crl --root {usual:?} -> {slowed:?} with {COPIES} copies ({} bytes) in each file; \
         at 64 MiB each ≈ {:.0} s (debug)",
        filled.len(),
        per_byte * 2.0 * f64::from(64u32 << 20),
    );
    assert!(slowed > usual * 20, "{usual:?} -> {slowed:?}");
}

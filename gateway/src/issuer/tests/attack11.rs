//! Attacker review 11 (s7/review11, see /work/helpers/s7/review11/findings.md):
//! the S7 fixes in the pki store (085f256 and the rest of s7fix) and the
//! access log's links (4f1a52d). Each test asserts the HARM (it passes on
//! the code as reviewed) beside a control, and is meant to be turned round
//! into the refusal once fixed.

use std::os::unix::fs::MetadataExt as _;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use rustls_pki_types::UnixTime;

use super::*;
use crate::tls::bundle::{Bundle, BundleFiles};
use crate::tls::crl::Enforced;

const NOBODY: u32 = 65534;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn fresh_store(dir: &Path) -> Store {
    let store = Store::open(dir);
    store
        .init(&InitSpec {
            name: "SSO",
            key_type: KeyType::P256,
            permitted_dns: None,
        })
        .unwrap();
    store
}

/// Alice's user certificate (leaf, intermediate) as the issuer answers it.
fn alice_chain(store: &Store) -> String {
    let sans = vec!["email:alice@example.internal".to_owned(), LAPTOP.to_owned()];
    store
        .sign_request(
            "alice",
            &csr(),
            &sans,
            time::OffsetDateTime::now_utc() + time::Duration::hours(8),
            None,
        )
        .unwrap()
        .0
}

/// Where the documented operator writes the root's CRL (`--root-crl-out`):
/// beside the store, in a directory only root (the test) writes.
fn root_crl_out(ca_dir: &Path) -> std::path::PathBuf {
    ca_dir
        .parent()
        .unwrap()
        .join("etc")
        .join("sso-root.crl.pem")
}

/// A route's bundle as the gateway loads it: `ca.pem` as `client_ca`,
/// `crl.pem` and, once written, the root's CRL outside the store (as
/// docs/sso.md's route lists them) as its `crls`, stale CRLs refused.
fn bundle(ca_dir: &Path) -> Bundle {
    let out = root_crl_out(ca_dir);
    let mut crls = vec![ca_dir.join("crl.pem")];
    if out.exists() {
        crls.push(out);
    }
    bundle_of(ca_dir, crls)
}

fn bundle_of(ca_dir: &Path, crls: Vec<std::path::PathBuf>) -> Bundle {
    Bundle::load(
        "trust users".into(),
        &BundleFiles {
            ca: ca_dir.join("ca.pem"),
            crls,
            crl_expired: crate::config::CrlExpired::Refuse,
            spiffe_trust_domains: None,
        },
        crate::tls::provider().signature_verification_algorithms,
        Arc::new(AtomicU64::new(0)),
    )
    .unwrap()
}

/// Whether the gateway's chain check (webpki, the route's CRLs) takes
/// `chain` now (a gateway started now, or one that took the reload).
fn gateway_accepts(ca_dir: &Path, chain: &str) -> Result<(), String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    bundle(ca_dir)
        .verify(&certs[0], &certs[1..], UnixTime::now())
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

fn serial_of_pem(pem: &[u8]) -> String {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).unwrap();
    crate::pki::store::hex(pem.parse_x509().unwrap().tbs_certificate.raw_serial())
}

/// A running gateway's CRL memory, having put the store's crl.pem into
/// service as it is now.
fn running_gateway(ca_dir: &Path) -> Enforced {
    let enforced = Enforced::default();
    let b = bundle(ca_dir);
    enforced.check(&[b.served()]).unwrap();
    enforced.record(&[b.served()]);
    enforced
}

/// An SSO store as documented after 085f256: the root key moved to
/// offline media, with a copy of intermediate.pem. Returns the store, the
/// operator's view of it (`--root-key`), the offline copy and the key.
fn documented_store(dir: &Path) -> (Store, Store, std::path::PathBuf) {
    let ca = dir.join("sso");
    let out = root_crl_out(&ca);
    std::fs::create_dir(out.parent().unwrap()).unwrap();
    // As docs/sso.md inits it: the root's CRL outside the store from the
    // start.
    let store = Store::open(&ca).with_root_crl_out(Some(&out));
    store
        .init(&InitSpec {
            name: "SSO",
            key_type: KeyType::P256,
            permitted_dns: None,
        })
        .unwrap();
    let offline = dir.join("offline");
    std::fs::create_dir(&offline).unwrap();
    std::fs::rename(ca.join("root.key"), offline.join("root.key")).unwrap();
    std::fs::copy(
        ca.join("intermediate.pem"),
        offline.join("intermediate.pem"),
    )
    .unwrap();
    let operator = Store::open(&ca)
        .with_root_key(Some(&offline.join("root.key")))
        .with_root_crl_out(Some(&out));
    (store, operator, offline)
}

/// S11-1: "only a certificate the root's key signed is revoked as the
/// intermediate" (085f256) took the root's own certificate too: self-signed
/// by the root's key, in the root's name, a CA. Before the fix, with the
/// store's owner (the issuer's user, holding the stolen intermediate key)
/// having copied `root.pem` over `intermediate.pem`, the documented
/// `revoke --intermediate sso/intermediate.pem` succeeded with "revoked
/// intermediate: serial <the root's>", the root's CRL listed the root's
/// own serial (on no verifier's path: a trust anchor is not checked
/// against a CRL), and alice went on being accepted; with the root's
/// certificate put before the intermediate in a chain file the operator
/// named, the same, and a running gateway took the reload at once. Now
/// the root's own certificate is never the one revoked: the swapped file
/// (by path or by serial) is refused, and in a chain the intermediate
/// after it is found.
#[test]
fn s11_1_the_roots_own_certificate_is_never_revoked_as_the_intermediate() {
    // A: intermediate.pem replaced by root.pem.
    let dir = tempfile::tempdir().unwrap();
    let (store, operator, _offline) = documented_store(dir.path());
    let ca = dir.path().join("sso");
    let chain = alice_chain(&store);
    let (real, _) = store.intermediate_fingerprint().unwrap();
    let root_serial = serial_of_pem(&std::fs::read(ca.join("root.pem")).unwrap());
    assert_ne!(real, root_serial);
    let int_path = ca.join("intermediate.pem");
    std::fs::copy(ca.join("root.pem"), &int_path).unwrap();
    let index_before = std::fs::read_to_string(ca.join("index.json")).unwrap();
    let out_before = std::fs::read(root_crl_out(&ca)).unwrap();
    let e = operator
        .revoke_intermediate(int_path.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("holds no certificate the root's key signed but the root's own"),
        "{e}"
    );
    let e = operator
        .revoke_intermediate(&root_serial)
        .unwrap_err()
        .to_string();
    assert!(e.contains("is the root's own certificate"), "{e}");
    assert_eq!(
        std::fs::read_to_string(ca.join("index.json")).unwrap(),
        index_before,
        "nothing recorded"
    );
    assert_eq!(
        std::fs::read(root_crl_out(&ca)).unwrap(),
        out_before,
        "nothing signed"
    );
    assert_eq!(gateway_accepts(&ca, &chain), Ok(()), "A: nothing revoked");

    // B: a chain file with the root's certificate before the
    // intermediate: the intermediate after it is the one revoked.
    let dir = tempfile::tempdir().unwrap();
    let (store, operator, _offline_b) = documented_store(dir.path());
    let ca = dir.path().join("sso");
    let chain = alice_chain(&store);
    let (real, real_fingerprint) = store.intermediate_fingerprint().unwrap();
    let gateway = running_gateway(&ca);
    let root_pem = std::fs::read_to_string(ca.join("root.pem")).unwrap();
    let end = chain.find("-----END CERTIFICATE-----").unwrap() + "-----END CERTIFICATE-----".len();
    let (leaf, intermediate) = chain.split_at(end);
    let planted = ca.join("web.pem");
    std::fs::write(&planted, format!("{leaf}\n{root_pem}{intermediate}")).unwrap();
    let done = operator
        .revoke_intermediate(planted.to_str().unwrap())
        .unwrap();
    assert_eq!(done.entry.serial, real);
    assert_eq!(done.fingerprint, real_fingerprint);
    assert_eq!(
        done.intermediate_crl,
        crate::pki::store::IntermediateCrl::Kept
    );
    let reload = bundle(&ca);
    gateway
        .check(&[reload.served()])
        .expect("the running gateway takes the reload");
    let e = gateway_accepts(&ca, &chain).unwrap_err();
    assert!(e.contains("Revoked"), "B: {e}");
}

/// S11-2: the root's revocation reached routes only through `sso/crl.pem`,
/// which the store's owner writes. The owner put back the crl.pem from
/// before (a fresh intermediate CRL, it holds the key, and the root's CRL
/// from `init`, valid until the intermediate expires): before the fix a
/// gateway that had not polled yet took it, and every gateway started
/// afterwards (and every host fed a copy of `sso/crl.pem`) trusted the
/// intermediate again. Now the root also writes its CRL outside the store
/// (`--root-crl-out`, required), routes list it beside crl.pem, and the
/// newest root CRL of the two wins: the put-back changes nothing, for a
/// running gateway, a restarted one, or a route that (as docs/sso.md says
/// to after a compromise) lists the root's file alone.
#[test]
fn s11_2_the_owner_puts_back_crl_pem_and_the_roots_revocation_still_holds() {
    let dir = tempfile::tempdir().unwrap();
    let (store, operator, offline) = documented_store(dir.path());
    let ca = dir.path().join("sso");
    let chain = alice_chain(&store);
    let init_root_crl = std::fs::read_to_string(ca.join("root.crl.pem")).unwrap();
    let gateway = running_gateway(&ca);

    // Without --root-crl-out the root signs nothing.
    let e = Store::open(&ca)
        .with_root_key(Some(&offline.join("root.key")))
        .revoke_intermediate(offline.join("intermediate.pem").to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("--root-crl-out"), "{e}");

    let done = operator
        .revoke_intermediate(offline.join("intermediate.pem").to_str().unwrap())
        .unwrap();
    assert_eq!(done.root_crl.listed.len(), 1);
    let out = root_crl_out(&ca);
    let meta = std::fs::metadata(&out).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o644);
    assert_eq!(meta.uid(), crate::safe_dir::euid());
    let e = gateway_accepts(&ca, &chain).unwrap_err();
    assert!(e.contains("Revoked"), "{e}");
    let taken = running_gateway(&ca);

    // The owner, at once: a fresh CRL of the intermediate (the stolen
    // key), numbered above everything, and init's root CRL.
    let int = crate::pki::Authority::load(
        &std::fs::read_to_string(ca.join("intermediate.pem")).unwrap(),
        &std::fs::read_to_string(ca.join("intermediate.key")).unwrap(),
    )
    .unwrap();
    let fresh = int.crl(1000, &[]).unwrap();
    std::fs::write(ca.join("crl.pem"), format!("{fresh}{init_root_crl}")).unwrap();
    // The gateway that had not polled yet takes the reload (a newer
    // intermediate CRL; the root's place filled by the newer root CRL in
    // the root's file), and in it alice is refused.
    let reload = bundle(&ca);
    gateway
        .check(&[reload.served()])
        .expect("the root's newer CRL fills its place");
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    let e = reload
        .verify(&certs[0], &certs[1..], UnixTime::now())
        .unwrap_err();
    assert!(format!("{e:?}").contains("Revoked"), "{e:?}");
    // One that took the revocation refuses the older root CRL? No: the
    // newer one is still served beside it; the reload is taken, alice out.
    taken.check(&[reload.served()]).unwrap();
    // A gateway started now (a restart, another host).
    let e = gateway_accepts(&ca, &chain).unwrap_err();
    assert!(e.contains("Revoked"), "restarted: {e}");
    // The route after a compromise, as documented: the root's file alone.
    let alone = bundle_of(&ca, vec![out.clone()]);
    let e = alone
        .verify(&certs[0], &certs[1..], UnixTime::now())
        .unwrap_err();
    assert!(
        format!("{e:?}").contains("Revoked"),
        "root's file alone: {e:?}"
    );
    // Whatever the owner makes of crl.pem: gone, or another file.
    std::fs::write(ca.join("crl.pem"), fresh).unwrap();
    let e = gateway_accepts(&ca, &chain).unwrap_err();
    assert!(e.contains("Revoked"), "crl.pem without the root's: {e}");
}

/// S11-3: the root CRL lists the union of index.json and every earlier
/// root CRL that verifies under the root's key, numbered above them.
/// Before the fix "every earlier" meant those still in the store: the
/// owner deleted `root.crl.pem`, left crl.pem with the intermediate's CRL
/// only, emptied `revoked_intermediates` and set `root_crl_number` to 50,
/// and root's next `pki crl --root --root-key` signed #51 listing no
/// intermediate, with no warning; a running gateway took it as newer. Now
/// the root's own copy (`--root-crl-out`, outside the store) is history
/// too: the serial is kept and reported, the missing file is named; and
/// with no earlier root CRL left anywhere, nothing is signed.
#[test]
fn s11_3_an_emptied_store_history_does_not_un_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let (store, operator, offline) = documented_store(dir.path());
    let ca = dir.path().join("sso");
    let chain = alice_chain(&store);
    let real = operator
        .revoke_intermediate(offline.join("intermediate.pem").to_str().unwrap())
        .unwrap()
        .entry
        .serial;
    let gateway = running_gateway(&ca);
    assert!(gateway_accepts(&ca, &chain).is_err(), "revoked");

    // The owner wipes the history it owns.
    let index_path = ca.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    index["revoked_intermediates"] = json!([]);
    index["root_crl_number"] = json!(50);
    std::fs::write(&index_path, index.to_string()).unwrap();
    std::fs::remove_file(ca.join("root.crl.pem")).unwrap();
    let int = crate::pki::Authority::load(
        &std::fs::read_to_string(ca.join("intermediate.pem")).unwrap(),
        &std::fs::read_to_string(ca.join("intermediate.key")).unwrap(),
    )
    .unwrap();
    std::fs::write(ca.join("crl.pem"), int.crl(7, &[]).unwrap()).unwrap();

    // A --root-crl-out with no file (a typo, another path): refused, not
    // taken as no history (S12-3); with --root-crl-new, no earlier root
    // CRL anywhere in the store: nothing signed either.
    let elsewhere = dir.path().join("etc").join("elsewhere.crl.pem");
    let elsewhere_store = Store::open(&ca)
        .with_root_key(Some(&offline.join("root.key")))
        .with_root_crl_out(Some(&elsewhere));
    let e = elsewhere_store
        .republish_root_crl(time::Duration::days(7))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no file here") && e.contains("--root-crl-new"),
        "{e}"
    );
    let e = elsewhere_store
        .with_root_crl_new(true)
        .republish_root_crl(time::Duration::days(7))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no CRL of the root in the store verifies"),
        "{e}"
    );
    assert!(!elsewhere.exists());

    let (_, signed) = operator
        .republish_root_crl(time::Duration::days(7))
        .expect("pki crl --root --root-key --root-crl-out");
    assert_eq!(signed.listed, vec![real.clone()]);
    assert_eq!(signed.restored, vec![real.clone()], "reported");
    assert!(
        signed
            .unverified
            .iter()
            .any(|u| u.contains("root.crl.pem: missing")),
        "{:?}",
        signed.unverified
    );
    // Numbered after the root's own history (init's #1, the revocation's
    // #2): the index's 50 decides nothing.
    assert_eq!(signed.crl_number, 3);
    let reload = bundle(&ca);
    gateway.check(&[reload.served()]).unwrap();
    let e = gateway_accepts(&ca, &chain).unwrap_err();
    assert!(e.contains("Revoked"), "still revoked: {e}");
}

/// S11-2's `--root-crl-out` must be out of the store owner's reach: not
/// in the store, not in a directory others may write. Root only (the
/// owner is another user); skipped otherwise.
#[test]
fn s11_2_the_roots_crl_file_is_refused_where_the_stores_owner_could_write_it() {
    use std::os::unix::fs::PermissionsExt as _;
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_store, _operator, offline) = documented_store(dir.path());
    let ca = dir.path().join("sso");
    let chown = std::process::Command::new("chown")
        .args(["-R", &format!("{NOBODY}:{NOBODY}")])
        .arg(&ca)
        .status()
        .unwrap();
    assert!(chown.success());
    let owners = dir.path().join("owners");
    std::fs::create_dir(&owners).unwrap();
    std::os::unix::fs::chown(&owners, Some(NOBODY), Some(NOBODY)).unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    for (out, why) in [
        (ca.join("root-crl.pem"), "--root-crl-out"),
        (owners.join("root-crl.pem"), "--root-crl-out"),
        (shared.join("root-crl.pem"), "--root-crl-out"),
    ] {
        let e = Store::open(&ca)
            .with_root_key(Some(&offline.join("root.key")))
            .with_root_crl_out(Some(&out))
            .revoke_intermediate(offline.join("intermediate.pem").to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(why) && e.contains("nothing signed"),
            "{}: {e}",
            out.display()
        );
        assert!(!out.exists());
    }
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path and a mode.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// S11-5: the store directory itself was opened blocking, through links.
/// `/var/lib/gateway-issuer` is the issuer's user's (StateDirectory=), so
/// that user may put a FIFO (or a symlink) at `sso`. Root's `pki revoke
/// --dir …/sso SERIAL` (and `--device`, and `pki crl`) opened the
/// directory for its lock with a plain open. Before the fix: it waited
/// until someone wrote to the FIFO, without end (still waiting after
/// 1.5 s; it ended, Err, only once a writer opened the FIFO). S7-4's
/// O_NONBLOCK covered the files in the store and the file named, not the
/// store. Fixed: the store is opened once, O_PATH|O_NOFOLLOW, its type
/// checked on that descriptor (`safe_dir::Dir::open`): every command
/// fails at once, naming a FIFO, and no writer is needed. Control:
/// `revoke --intermediate` (which reads `sso/root.pem` first) failed at
/// once before too.
#[test]
fn s11_5_a_fifo_at_the_stores_name_hangs_roots_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("gateway-issuer");
    std::fs::create_dir(&state).unwrap();
    let (_, _, offline) = documented_store(&state);
    std::fs::rename(state.join("sso"), state.join("sso.real")).unwrap();
    let sso = state.join("sso");
    mkfifo(&sso);

    // Control: --intermediate reads sso/root.pem first: refused at once.
    let started = std::time::Instant::now();
    let e = Store::open(&sso)
        .with_root_key(Some(&offline.join("root.key")))
        .revoke_intermediate(offline.join("intermediate.pem").to_str().unwrap())
        .unwrap_err();
    assert!(started.elapsed() < std::time::Duration::from_secs(2), "{e}");

    // Each in a thread, so a hang fails the test rather than stalls it.
    let at_once = |what: &str, run: fn(&Path) -> Result<(), crate::pki::PkiError>| {
        let (tx, rx) = std::sync::mpsc::channel();
        let at = sso.clone();
        std::thread::spawn(move || {
            let _ = tx.send(run(&at));
        });
        let e = rx
            .recv_timeout(std::time::Duration::from_secs(2))
            .unwrap_or_else(|_| panic!("{what}: still waiting on the FIFO after 2 s"))
            .expect_err(what)
            .to_string();
        assert!(e.contains("is a FIFO, not a directory"), "{what}: {e}");
        assert!(e.contains(&sso.display().to_string()), "{what}: {e}");
    };
    at_once("revoke SERIAL", |at| {
        Store::open(at).revoke("0a0b").map(|_| ())
    });
    at_once("revoke --device", |at| {
        Store::open(at)
            .revoke_device("spiffe://example.internal/device/laptop-7")
            .map(|_| ())
    });
    at_once("pki crl", |at| {
        Store::open(at)
            .publish_crl(time::Duration::days(7))
            .map(|_| ())
    });

    // A symlink at the name, to the real store: refused too, named.
    std::fs::remove_file(&sso).unwrap();
    std::os::unix::fs::symlink(state.join("sso.real"), &sso).unwrap();
    let e = Store::open(&sso).revoke("0a0b").unwrap_err().to_string();
    assert!(e.contains("is a symbolic link"), "{e}");
    assert!(e.contains("name the directory itself"), "{e}");
    // Also spelt with a trailing '/', which makes the kernel follow a
    // link at the last name whatever O_NOFOLLOW says.
    let slash = std::path::PathBuf::from(format!("{}/", sso.display()));
    let e = Store::open(&slash).revoke("0a0b").unwrap_err().to_string();
    assert!(e.contains("is a symbolic link"), "{e}");
}

/// S11-4: the store's path was resolved anew at every step, and root
/// decided whose a file is (`owner_for_root`, a stat of the path) apart
/// from where it created it (`write_replacing_owned`, by the same path
/// later). The issuer's user owns the directory above `sso` and swaps
/// `sso` with a symlink to a directory only root may write (here a stand-in
/// for `/etc/bash_completion.d`, whose every file root's interactive shells
/// source) in a loop (renameat2 RENAME_EXCHANGE). Root's `pki crl` (any
/// root command that writes: `revoke --intermediate`, `crl --root`)
/// then created a file in that directory owned by the issuer's user, who
/// may rewrite it. Before the fix: `index.json` owned by uid 65534
/// appeared there after 323–7021 attempts (0.02–1.1 s), 6 runs of 6.
/// Fixed: the store is opened once (O_NOFOLLOW: a link at its name is
/// refused) and every step, the owner's fstat, the temporary file, its
/// fchown and the rename, goes through that descriptor: with the same
/// swap loop, nothing of the owner's appears in root's directory; each
/// root command either works in the real store or is refused, naming the
/// link. Root only; skipped otherwise. Control: without the swap, the
/// store's own file stays the owner's.
#[test]
fn s11_4_a_swapped_store_path_makes_root_create_the_owners_files_in_roots_directory() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("gateway-issuer");
    std::fs::create_dir(&state).unwrap();
    let sso = state.join("sso");
    fresh_store(&sso);
    let chown = std::process::Command::new("chown")
        .args(["-R", &format!("{NOBODY}:{NOBODY}")])
        .arg(&sso)
        .status()
        .unwrap();
    assert!(chown.success());
    let roots = dir.path().join("bash_completion.d");
    std::fs::create_dir(&roots).unwrap();
    // Anything at all in root's directory: it is never root's store.
    let planted = |roots: &Path| -> Vec<(String, u32)> {
        std::fs::read_dir(roots)
            .unwrap()
            .filter_map(|e| {
                let e = e.ok()?;
                let m = std::fs::symlink_metadata(e.path()).ok()?;
                Some((e.file_name().to_string_lossy().into_owned(), m.uid()))
            })
            .collect()
    };
    // Control: root's pki crl in the store, no swap.
    Store::open(&sso)
        .publish_crl(time::Duration::days(7))
        .unwrap();
    assert!(planted(&roots).is_empty(), "control");
    assert_eq!(
        std::fs::metadata(sso.join("crl.pem")).unwrap().uid(),
        NOBODY,
        "control: the store's own file stays the owner's"
    );

    let alt = state.join("alt");
    std::os::unix::fs::symlink(&roots, &alt).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let stop = stop.clone();
        let a = std::ffi::CString::new(sso.as_os_str().as_encoded_bytes()).unwrap();
        let b = std::ffi::CString::new(alt.as_os_str().as_encoded_bytes()).unwrap();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: two NUL-terminated paths; renameat2 with
                // RENAME_EXCHANGE swaps them atomically.
                unsafe {
                    libc::syscall(
                        libc::SYS_renameat2,
                        libc::AT_FDCWD,
                        a.as_ptr(),
                        libc::AT_FDCWD,
                        b.as_ptr(),
                        libc::RENAME_EXCHANGE,
                    );
                }
            }
        })
    };
    // Until 300 root commands opened the real store while the swap ran
    // (most meet the link: that refusal is quick), at most 5 s. Before
    // the fix the file came after 1.1 s at most.
    let started = std::time::Instant::now();
    let (mut worked, mut refused) = (0, 0);
    let mut found = Vec::new();
    let mut other = Vec::new();
    while worked < 300 && started.elapsed() < std::time::Duration::from_secs(5) {
        match Store::open(&sso).publish_crl(time::Duration::days(7)) {
            Ok(_) => worked += 1,
            Err(e) if e.to_string().contains("is a symbolic link") => refused += 1,
            Err(e) => other.push(e.to_string()),
        }
        found = planted(&roots);
        if !found.is_empty() {
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    swapper.join().unwrap();
    eprintln!(
        "{worked} worked, {refused} refused in {:?}: {found:?}",
        started.elapsed()
    );
    assert!(
        found.is_empty(),
        "nothing of root's commands in root's directory: {found:?}"
    );
    assert!(other.is_empty(), "failed other than cleanly: {other:?}");
    // The swap did race the commands: some met the link at the name.
    assert!(
        worked > 0 && refused > 0,
        "{worked} worked, {refused} refused"
    );
    // What worked, worked in the real store, which stays the owner's.
    let real = if std::fs::symlink_metadata(&sso)
        .unwrap()
        .file_type()
        .is_symlink()
    {
        &alt
    } else {
        &sso
    };
    for name in ["crl.pem", "index.json"] {
        assert_eq!(
            std::fs::metadata(real.join(name)).unwrap().uid(),
            NOBODY,
            "{name}"
        );
    }
}

/// S11-4, the odds for one root command: the owner watches its store with
/// inotify and starts swapping only once root has read `intermediate.key`
/// (the last read before `pki crl` writes `index.json`). Prints how many
/// single `pki crl` runs planted a file. A measurement, not a check:
/// `cargo test … s11_4_odds -- --ignored --nocapture`. Before the fix:
/// 9 and 16 of 300 (3–5%) on a loaded 2-core host; since the store is
/// opened once (S11-4 above), none is expected.
#[test]
#[ignore]
fn s11_4_odds_for_one_root_command_with_inotify() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("gateway-issuer");
    std::fs::create_dir(&state).unwrap();
    let sso = state.join("sso");
    fresh_store(&sso);
    let real = std::fs::canonicalize(&sso).unwrap();
    assert!(
        std::process::Command::new("chown")
            .args(["-R", &format!("{NOBODY}:{NOBODY}")])
            .arg(&sso)
            .status()
            .unwrap()
            .success()
    );
    let roots = dir.path().join("bash_completion.d");
    std::fs::create_dir(&roots).unwrap();
    let alt = state.join("alt");
    std::os::unix::fs::symlink(&roots, &alt).unwrap();
    let a = std::ffi::CString::new(sso.as_os_str().as_encoded_bytes()).unwrap();
    let b = std::ffi::CString::new(alt.as_os_str().as_encoded_bytes()).unwrap();
    let swap = || unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    // SAFETY: plain inotify calls on a path we own.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK) };
    let watched = std::ffi::CString::new(real.as_os_str().as_encoded_bytes()).unwrap();
    assert!(unsafe { libc::inotify_add_watch(fd, watched.as_ptr(), libc::IN_CLOSE_NOWRITE) } >= 0);
    let trials = 300;
    let mut wins = 0;
    for _ in 0..trials {
        // sso is the real directory again, and nothing planted.
        if std::fs::symlink_metadata(&sso)
            .unwrap()
            .file_type()
            .is_symlink()
        {
            swap();
        }
        for e in std::fs::read_dir(&roots).unwrap() {
            let _ = std::fs::remove_file(e.unwrap().path());
        }
        let mut buf = [0u8; 4096];
        while unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let root = {
            let (sso, done) = (sso.clone(), done.clone());
            std::thread::spawn(move || {
                let _ = Store::open(&sso).publish_crl(time::Duration::days(7));
                done.store(true, std::sync::atomic::Ordering::SeqCst);
            })
        };
        // Wait for root's close of intermediate.key, then swap until it ends.
        let mut seen = false;
        while !seen && !done.load(std::sync::atomic::Ordering::SeqCst) {
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                seen = String::from_utf8_lossy(&buf[..n as usize]).contains("intermediate.key");
            }
        }
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            swap();
        }
        root.join().unwrap();
        if std::fs::read_dir(&roots).unwrap().any(|e| {
            let e = e.unwrap();
            !e.file_name().to_string_lossy().starts_with('.')
                && std::fs::symlink_metadata(e.path()).unwrap().uid() == NOBODY
        }) {
            wins += 1;
        }
    }
    unsafe { libc::close(fd) };
    eprintln!("planted by {wins} of {trials} single root `pki crl` runs");
}

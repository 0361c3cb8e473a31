//! Attacker review 7 (s7/review7, see /work/helpers/s7/review7/findings.md):
//! the S4-2, S4-3 and S4-7 fixes (e0455b6, d9d603d, 9959dd8). Each test
//! asserted the HARM beside a control; those fixed (branch s7fix) now
//! assert the fixed behaviour, and their comments keep what was measured.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use rustls_pki_types::UnixTime;

use super::*;
use crate::tls::bundle::{Bundle, BundleFiles};

/// A fresh store, as root's commands see it: with `--root-crl-out`
/// beside it (S11-2).
fn fresh_store(dir: &Path) -> Store {
    let store = Store::open(dir).with_root_crl_out(Some(&root_crl_out(dir)));
    store
        .init(&InitSpec {
            name: "SSO",
            key_type: KeyType::P256,
            permitted_dns: None,
        })
        .unwrap();
    store
}

fn root_crl_out(ca_dir: &Path) -> std::path::PathBuf {
    ca_dir.parent().unwrap().join("root-crl.pem")
}

/// Alice's user certificate on the laptop, straight from the store: the
/// chain (leaf, intermediate) as the issuer answers it.
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

/// A route's bundle as the gateway loads it: `ca.pem` as `client_ca`,
/// `crl.pem` as its `crls`, stale CRLs refused.
fn bundle(ca_dir: &Path) -> Bundle {
    Bundle::load(
        "trust users".into(),
        &BundleFiles {
            ca: ca_dir.join("ca.pem"),
            crls: vec![ca_dir.join("crl.pem")],
            crl_expired: crate::config::CrlExpired::Refuse,
            spiffe_trust_domains: None,
        },
        crate::tls::provider().signature_verification_algorithms,
        Arc::new(AtomicU64::new(0)),
    )
    .unwrap()
}

/// Whether the gateway's chain check (webpki, the route's CRLs) takes
/// `chain` now.
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

/// S7-1: `gateway pki revoke --intermediate` is the documented remedy for
/// a compromised SSO intermediate key (docs/sso.md "The SSO CA's CRL"),
/// run in the issuer's store (`--dir sso`). What the root signed was
/// decided by files the store's owner (the issuer's user, the likeliest
/// way the key was lost) writes. Measured before the fix:
/// 1. the owner put another certificate at `intermediate.pem` (the
///    intermediate's name and key, self-signed, another serial); the
///    operator's revoke succeeded, naming a serial that is not the
///    intermediate's, and a route's bundle (ca.pem + crl.pem, loaded and
///    checked as the gateway does) still took alice's certificate from
///    the real intermediate;
/// 2. after a correct revocation, the owner dropped the entry from
///    `index.json`; the operator's next `pki crl --root` signed a newer
///    root CRL without it, which the gateway's rollback guard took as the
///    newest: the intermediate was trusted again;
/// 3. the root key was read from `DIR/root.key` only ("bring root.key back
///    into …"), so it sat in the owner's directory; `root.pem` was not
///    checked against it.
///
/// Now: a certificate the root's key did not sign is refused, and a copy
/// the operator trusts revokes the real one; the root's CRL never lists
/// less than the one before it (verified under the root's key), and says
/// what it kept; the key comes from `--root-key`, and a `root.pem` of
/// another key is refused. Control: the documented revoke refuses alice's
/// certificate, and prints the fingerprint `init` printed.
#[test]
fn s7_1_the_roots_revocation_of_the_intermediate_is_decided_by_files_the_issuers_user_writes() {
    // Control: the revocation as documented, nothing swapped.
    let control = tempfile::tempdir().unwrap();
    let ca = control.path().join("sso");
    let store = fresh_store(&ca);
    let (serial_at_init, fingerprint_at_init) = store.intermediate_fingerprint().unwrap();
    let chain = alice_chain(&store);
    assert_eq!(gateway_accepts(&ca, &chain), Ok(()), "control: before");
    let int_path = ca.join("intermediate.pem");
    let real = serial_of_pem(&std::fs::read(&int_path).unwrap());
    assert_eq!(serial_at_init, real);
    let done = store
        .revoke_intermediate(int_path.to_str().unwrap())
        .unwrap();
    assert_eq!(done.entry.serial, real);
    assert_eq!(done.fingerprint, fingerprint_at_init, "what init printed");
    assert_eq!(done.root_crl.listed, vec![real.clone()]);
    assert!(done.root_crl.restored.is_empty() && done.root_crl.unverified.is_empty());
    let e = gateway_accepts(&ca, &chain).unwrap_err();
    assert!(e.contains("Revoked"), "control: refused once revoked: {e}");

    // 1. The store's owner (who holds the intermediate's key) swaps
    // intermediate.pem for a certificate of the same name and key, and
    // another serial. The operator kept a copy of the real one with the
    // root key (or takes it from any user's chain).
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("sso");
    let store = fresh_store(&ca);
    let chain = alice_chain(&store);
    let int_path = ca.join("intermediate.pem");
    let real = serial_of_pem(&std::fs::read(&int_path).unwrap());
    let kept = dir.path().join("intermediate.pem.offline");
    std::fs::copy(&int_path, &kept).unwrap();
    let running = bundle(&ca);
    let enforced = crate::tls::crl::Enforced::default();
    enforced.check(&[running.served()]).unwrap();
    enforced.record(&[running.served()]);
    let decoy = {
        let key = rcgen::KeyPair::from_pem(
            &std::fs::read_to_string(ca.join("intermediate.key")).unwrap(),
        )
        .unwrap();
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "SSO issuing CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.serial_number = Some(rcgen::SerialNumber::from(vec![0x4d, 0x49, 0x4e, 0x45]));
        params.self_signed(&key).unwrap().pem()
    };
    std::fs::write(&int_path, decoy).unwrap();
    // The operator, as documented: refused, nothing revoked.
    let e = store
        .revoke_intermediate(int_path.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("holds no certificate the root's key signed") && e.contains("nothing revoked"),
        "{e}"
    );
    // By serial (the real one): intermediate.pem is still not the root's.
    let e = store.revoke_as(&real, true).unwrap_err().to_string();
    assert!(
        e.contains("holds no certificate the root's key signed"),
        "{e}"
    );
    assert!(store.index().unwrap().revoked_intermediates.is_empty());
    // A user's chain names the real intermediate too (its second
    // certificate), and so does the copy kept offline.
    let users = dir.path().join("alice.pem");
    std::fs::write(&users, &chain).unwrap();
    let done = store.revoke_intermediate(users.to_str().unwrap()).unwrap();
    assert_eq!(done.entry.serial, real, "the real intermediate revoked");
    let again = store.revoke_intermediate(kept.to_str().unwrap()).unwrap();
    assert_eq!(again.entry.serial, real);
    let reload = bundle(&ca);
    enforced.check(&[reload.served()]).unwrap();
    let e = gateway_accepts(&ca, &chain).unwrap_err();
    assert!(e.contains("Revoked"), "the route refuses alice: {e}");

    // 2. A correct revocation; the owner then empties the index's record.
    // The root's next re-signing keeps it (its earlier CRL, verified under
    // its key, listed it) and reports it.
    let dir2 = tempfile::tempdir().unwrap();
    let ca2 = dir2.path().join("sso");
    let store2 = fresh_store(&ca2);
    let chain2 = alice_chain(&store2);
    let real2 = store2
        .revoke_as(ca2.join("intermediate.pem").to_str().unwrap(), true)
        .unwrap()
        .serial;
    assert!(gateway_accepts(&ca2, &chain2).is_err(), "revoked");
    let enforced = crate::tls::crl::Enforced::default();
    let before = bundle(&ca2);
    enforced.check(&[before.served()]).unwrap();
    enforced.record(&[before.served()]);
    let index_path = ca2.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    index["revoked_intermediates"] = json!([]);
    index["root_crl_number"] = json!(0);
    std::fs::write(&index_path, index.to_string()).unwrap();
    let (_, signed) = store2
        .republish_root_crl(time::Duration::days(7))
        .expect("pki crl --root");
    assert_eq!(signed.restored, vec![real2.clone()], "reported");
    assert_eq!(signed.listed, vec![real2.clone()], "kept");
    assert!(
        store2
            .index()
            .unwrap()
            .revoked_intermediates
            .iter()
            .any(|e| e.serial == real2),
        "written back to the index"
    );
    let after = bundle(&ca2);
    enforced
        .check(&[after.served()])
        .expect("newer than the CRL before, whatever the index said");
    let e = gateway_accepts(&ca2, &chain2).unwrap_err();
    assert!(e.contains("Revoked"), "still revoked: {e}");
    // Both files' root CRLs gone too (the owner deletes them): what is
    // left cannot be verified, and the command says what it used.
    std::fs::write(&index_path, index.to_string()).unwrap();
    std::fs::remove_file(ca2.join("root.crl.pem")).unwrap();
    std::fs::write(
        ca2.join("crl.pem"),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let (_, signed) = store2.republish_root_crl(time::Duration::days(7)).unwrap();
    assert!(
        signed.unverified.iter().any(|u| u.starts_with("crl.pem:")),
        "{:?}",
        signed.unverified
    );

    // 3. The root key from outside the store; root.pem checked against it.
    let dir3 = tempfile::tempdir().unwrap();
    let ca3 = dir3.path().join("sso");
    let store3 = fresh_store(&ca3);
    let offline = dir3.path().join("root.key");
    std::fs::rename(ca3.join("root.key"), &offline).unwrap();
    let e = store3
        .revoke_intermediate(ca3.join("intermediate.pem").to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("needs the root key") && e.contains("--root-key"),
        "{e}"
    );
    let with_key = Store::open(&ca3)
        .with_root_key(Some(&offline))
        .with_root_crl_out(Some(&root_crl_out(&ca3)));
    let (_, signed) = with_key
        .republish_root_crl(time::Duration::days(7))
        .unwrap();
    assert!(signed.listed.is_empty());
    // A root.pem of another key (the owner's own "root"): refused.
    let saved = std::fs::read(ca3.join("root.pem")).unwrap();
    let other = crate::pki::Authority::root("SSO root CA").unwrap();
    std::fs::write(ca3.join("root.pem"), &other.cert_pem).unwrap();
    let e = with_key
        .revoke_intermediate(ca3.join("intermediate.pem").to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("is not the certificate of the root key"), "{e}");
    std::fs::write(ca3.join("root.pem"), saved).unwrap();
    let done = with_key
        .revoke_intermediate(ca3.join("intermediate.pem").to_str().unwrap())
        .unwrap();
    assert!(!done.key_in_store);
}

/// S7-2: `pki revoke --device URI` recorded any text as a revoked device
/// and said "URI recorded as revoked: the issuer signs nothing more for
/// it"; the issuer matches the record byte for byte against the device
/// URI SAN. Measured: six misspellings (the device's name alone, another
/// case in the path, the scheme in capitals, a trailing slash, a
/// percent-encoded character, a leading space) were each recorded, and
/// the laptop got a certificate after every one.
///
/// Now: what no device certificate can carry is refused and nothing
/// recorded; blanks and the case of the scheme are normalised away (the
/// laptop is then revoked); another valid SPIFFE ID (a name in capitals) is
/// recorded, as it could be a device, but said never bound. Control: the
/// exact URI gives 403 `device_revoked`.
#[tokio::test]
async fn s7_2_revoke_device_takes_any_text_and_the_issuer_matches_it_byte_for_byte() {
    let s = setup(
        "[limits]\nper_user = { burst = 50, per_hour = 1000 }\nper_device = { burst = 50, per_hour = 1000 }",
    );
    let laptop = device(LAPTOP);
    s.issuer
        .issue(Some(&laptop), request(s.token(|_| {})))
        .await
        .unwrap();
    let operator = Store::open(&s.ca_dir);
    for typo in [
        "laptop-7",
        "spiffe://example.internal/device/laptop-7/",
        "spiffe://example.internal/device/laptop%2D7",
        "spiffe:example.internal/device/laptop-7",
    ] {
        let e = operator.revoke_device(typo).unwrap_err().to_string();
        assert!(e.contains("nothing recorded"), "{typo}: {e}");
    }
    assert!(operator.index().unwrap().revoked_devices.is_empty());
    // A valid SPIFFE ID no certificate was bound to: recorded, and said.
    let other = operator
        .revoke_device_uri("spiffe://example.internal/device/Laptop-7")
        .unwrap();
    assert!(!other.ever_bound && other.revoked.is_empty());
    s.issuer
        .issue(Some(&laptop), request(s.token(|_| {})))
        .await
        .expect("another device");
    // Blanks and the scheme's case: the laptop's own URI.
    for spelling in [
        " spiffe://example.internal/device/laptop-7\n",
        "SPIFFE://Example.Internal/device/laptop-7",
    ] {
        let done = operator.revoke_device_uri(spelling).unwrap();
        assert_eq!(done.uri, LAPTOP, "{spelling:?}");
        assert!(done.ever_bound);
        let e = s
            .issuer
            .issue(Some(&laptop), request(s.token(|_| {})))
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "device_revoked", "{spelling:?}: {e}");
    }
    // Control: the exact URI.
    assert!(operator.revoke_device_uri(LAPTOP).unwrap().ever_bound);
    let e = s
        .issuer
        .issue(Some(&laptop), request(s.token(|_| {})))
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "device_revoked", "control: {e}");
}

/// S7-3: the issuer let a revoked device in again when its certificate's
/// notBefore was after the revocation, which it took as a re-enrolment,
/// but never compared the certificate itself. A device CA whose clock
/// runs ahead of the issuer's host (or that dates notBefore forward) gave
/// the laptop a certificate whose notBefore is after the revocation made
/// minutes after the enrolment. Measured: the very certificate the index
/// recorded with the laptop's user certificates (`device_serial`) signed
/// in again after `revoke --device`.
///
/// Now the revocation records those serials, and the issuer refuses them
/// whatever the notBefore. Control: the same certificate dated before is
/// refused, and a re-enrolment (another serial, dated after) signs in.
#[tokio::test]
async fn s7_3_a_revoked_device_whose_certificate_is_dated_after_the_revocation_signs_in_again() {
    let s = setup("");
    // Enrolled a minute ago by a device CA two minutes ahead (notBefore
    // one minute from now; `pki issue` would even date it five back).
    let ahead = Identity {
        not_before: now() as i64 + 60,
        ..device(LAPTOP)
    };
    s.issuer
        .issue(Some(&ahead), request(s.token(|_| {})))
        .await
        .unwrap();
    let operator = Store::open(&s.ca_dir);
    let index = operator.index().unwrap();
    assert!(
        index
            .issued
            .iter()
            .any(|e| e.device.as_deref() == Some(LAPTOP)
                && e.device_serial.as_deref() == Some("0a0b")),
        "the index knows this device certificate's serial"
    );
    assert_eq!(operator.revoke_device(LAPTOP).unwrap().len(), 1);
    let revoked = operator.index().unwrap().revoked_devices;
    assert_eq!(revoked[0].device_serials, vec!["0a0b".to_owned()]);
    let e = s
        .issuer
        .issue(Some(&ahead), request(s.token(|_| {})))
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "device_revoked", "its own certificate: {e}");
    // Control: the same certificate, dated five minutes back.
    let back = Identity {
        not_before: now() as i64 - 300,
        ..device(LAPTOP)
    };
    let e = s
        .issuer
        .issue(Some(&back), request(s.token(|_| {})))
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "device_revoked", "control: {e}");
    // A re-enrolment: a new certificate (serial), dated after.
    let mut again = device(LAPTOP);
    again.not_before = now() as i64 + 60;
    again.serial = "0c:0d".into();
    s.issuer
        .issue(Some(&again), request(s.token(|_| {})))
        .await
        .expect("re-enrolled");
}

/// S7-4: e0455b6 reads store files without following links and without
/// blocking, but `pki revoke` read the certificate file it is given
/// (`gateway pki revoke --dir devices devices/laptop-7.pem`, `--dir sso
/// --intermediate sso/intermediate.pem`: in the store, as documented)
/// with a plain open and read. Measured: a FIFO the store's owner left at
/// that name stalled the command (root's too) for as long as no one wrote
/// to it (still waiting after 1.5 s), and a link was followed.
///
/// Now the file is opened as the store's own are (O_NOFOLLOW, O_NONBLOCK,
/// a regular file, bounded): both are refused at once. Control: the same
/// certificate as a regular file is revoked.
#[test]
fn s7_4_the_certificate_file_a_revoke_names_is_opened_blocking_and_through_links() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("sso");
    let store = fresh_store(&ca);
    let fifo = ca.join("laptop-7.pem");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let (tx, rx) = std::sync::mpsc::channel();
    let (store2, what) = (store.clone(), fifo.to_str().unwrap().to_owned());
    let waiting = std::thread::spawn(move || {
        let r = store2.revoke_as(&what, false).map(|_| ());
        tx.send(r.map_err(|e| e.to_string())).unwrap();
    });
    let r = rx.recv_timeout(std::time::Duration::from_secs(2));
    if r.is_err() {
        // Release it (a writer that writes nothing) before failing.
        drop(std::fs::OpenOptions::new().write(true).open(&fifo).unwrap());
    }
    let e = r
        .expect("refused at once, not waiting on the FIFO")
        .unwrap_err();
    assert!(e.contains("not a regular file"), "{e}");
    waiting.join().unwrap();
    // Through a link: refused too (here to a real certificate elsewhere).
    std::fs::remove_file(&fifo).unwrap();
    let elsewhere = dir.path().join("alice.pem");
    std::fs::write(&elsewhere, alice_chain(&store)).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &fifo).unwrap();
    let e = store
        .revoke_as(fifo.to_str().unwrap(), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("symbolic link"), "{e}");
    // The same with --intermediate.
    let int_link = ca.join("int-link.pem");
    std::os::unix::fs::symlink(ca.join("intermediate.pem"), &int_link).unwrap();
    let e = store
        .revoke_as(int_link.to_str().unwrap(), true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("symbolic link"), "{e}");
    // Control: the file itself.
    store
        .revoke_as(elsewhere.to_str().unwrap(), false)
        .expect("control: a regular file");
}

/// S7-5: the issuer read `ca_dir/ca.pem` with a plain read that followed
/// links and checked nothing in it, and returned its text whole as `ca`
/// in every certificate answer (`gateway login` writes it to the user's
/// `ca.pem`). Started as root without `user` (warned, not refused), that
/// is root reading a file the store's owner names and handing it to
/// every user who signs in: the S4-2 leak by another path. Measured:
/// `answer.ca` carried "SECRET-HASH" from the linked file.
///
/// Now `ca.pem` is read as a store file (the link refused, the issuer does
/// not start) and only its certificates are served, re-encoded. Control:
/// a regular `ca.pem` is served as the root's certificate.
#[tokio::test]
async fn s7_5_the_issuer_serves_whatever_its_ca_pem_links_to() {
    let s = setup("");
    let ca = s.ca_dir.join("ca.pem");
    let root = std::fs::read_to_string(&ca).unwrap();
    let outside = s.ca_dir.parent().unwrap().join("secret");
    std::fs::write(&outside, "root:$6$SECRET-HASH:19000:0:99999:7:::\n").unwrap();
    std::fs::remove_file(&ca).unwrap();
    std::os::unix::fs::symlink(&outside, &ca).unwrap();
    let e = Issuer::new(s.issuer.config(), Box::new(s.keys.clone()))
        .err()
        .expect("refused at start")
        .to_string();
    assert!(e.contains("symbolic link") && !e.contains("SECRET"), "{e}");
    // Text around the certificate, and a key block after it: refused.
    std::fs::remove_file(&ca).unwrap();
    std::fs::write(
        &ca,
        format!(
            "SECRET-HASH\n{root}-----BEGIN PRIVATE KEY-----\nU0VDUkVU\n-----END PRIVATE KEY-----\n"
        ),
    )
    .unwrap();
    let e = Issuer::new(s.issuer.config(), Box::new(s.keys.clone()))
        .err()
        .expect("refused at start")
        .to_string();
    assert!(e.contains("where only certificates belong"), "{e}");
    // Control: the certificate alone, text around it dropped.
    std::fs::write(&ca, format!("# the SSO root\n{root}")).unwrap();
    let issuer = Issuer::new(s.issuer.config(), Box::new(s.keys.clone())).unwrap();
    let laptop = device(LAPTOP);
    let nonce = issuer.nonce(Some(&laptop)).unwrap();
    let answer = issuer
        .issue(Some(&laptop), request(token(&s.key, &claims(&nonce))))
        .await
        .unwrap();
    assert_eq!(answer.ca, root, "control");
}

/// S7-6: `revoke --intermediate` (and the issuer's check) writes `crl.pem`
/// as "the intermediate's CRL already there" and the root's; when that
/// CRL could not be read (crl.pem holding anything but CRLs, or, for
/// root, another uid's), `crl_state` said nothing and `crl.pem` was
/// written with the root's CRL alone (a warning), while the CLI said the
/// intermediate's CRL "was kept". Measured: a running gateway that
/// enforced the intermediate's CRL from that file refused the reload
/// (`CrlError::Withdrawn` for "SSO issuing CA"), keeping the state in
/// which the intermediate is not revoked.
///
/// Now: with the intermediate's key here, its CRL is signed afresh and the
/// reload is taken; without it, nothing is written and the revoke says
/// "NOT published" and why. Control: with crl.pem readable the CRL is kept,
/// the reload taken and the revocation enforced.
#[test]
fn s7_6_an_unreadable_crl_pem_makes_the_roots_revocation_a_reload_the_gateway_refuses() {
    use crate::pki::store::IntermediateCrl;
    let setup_one = || {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("sso");
        let store = fresh_store(&ca);
        let chain = alice_chain(&store);
        let enforced = crate::tls::crl::Enforced::default();
        let running = bundle(&ca);
        enforced.check(&[running.served()]).unwrap();
        enforced.record(&[running.served()]);
        (dir, ca, store, chain, enforced)
    };
    let spoil = |ca: &Path| {
        let crl = ca.join("crl.pem");
        let mut text = std::fs::read_to_string(&crl).unwrap();
        text.push_str("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
        std::fs::write(&crl, &text).unwrap();
        text
    };
    // Control.
    let (_d, ca, store, chain, enforced) = setup_one();
    std::fs::rename(ca.join("intermediate.key"), ca.join("away.key")).unwrap();
    let done = store
        .revoke_intermediate(ca.join("intermediate.pem").to_str().unwrap())
        .unwrap();
    assert_eq!(done.intermediate_crl, IntermediateCrl::Kept);
    let reload = bundle(&ca);
    enforced.check(&[reload.served()]).expect("control");
    assert!(gateway_accepts(&ca, &chain).is_err(), "control: revoked");

    // crl.pem unreadable to the revoke (a stray block after the CRLs),
    // the intermediate's key here: its CRL is signed afresh.
    let (_d, ca, store, chain, enforced) = setup_one();
    spoil(&ca);
    let done = store
        .revoke_intermediate(ca.join("intermediate.pem").to_str().unwrap())
        .unwrap();
    assert_eq!(done.intermediate_crl, IntermediateCrl::Signed);
    let reload = bundle(&ca);
    enforced
        .check(&[reload.served()])
        .expect("the gateway takes the reload");
    let e = gateway_accepts(&ca, &chain).unwrap_err();
    assert!(e.contains("Revoked"), "{e}");

    // The same, its key moved away: refused, crl.pem left as it was.
    let (_d, ca, store, _chain, _enforced) = setup_one();
    std::fs::rename(ca.join("intermediate.key"), ca.join("away.key")).unwrap();
    let spoiled = spoil(&ca);
    let e = store
        .revoke_intermediate(ca.join("intermediate.pem").to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("NOT published")
            && e.contains("holds no CRL of the intermediate that could be kept"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_to_string(ca.join("crl.pem")).unwrap(),
        spoiled
    );
}

/// S7-7: S4-4 moved the issuer to a user of its own (`gateway-issuer`) so
/// that code running in the gateway cannot read the SSO CA's key, but the
/// texts an operator reads when setting `user` still name the gateway's
/// user: docs/sso.md's `issuer.toml` example (`user = "gateway"`), its
/// "Running as its user" ("The shipped unit starts the issuer as `gateway`
/// (`User=gateway`)", `chown -R gateway: …/sso`), and the warning a root
/// start logs ("set user = \"gateway\" (the store chowned to it)").
/// Followed, they gave the gateway's user the key again. Control: the
/// shipped unit runs the issuer as `gateway-issuer`. Fixed with S6-2
/// (987acdc): the texts name `gateway-issuer`, and the issuer refuses the
/// gateway's user (attack6::s6_2_*).
#[test]
fn s7_7_the_docs_and_the_root_start_warning_still_name_the_gateways_user_for_the_issuer() {
    let sso = include_str!("../../../../docs/sso.md");
    let main = include_str!("../../../src/main.rs");
    let unit = include_str!("../../../../examples/gateway-issuer.service");
    assert!(unit.contains("\nUser=gateway-issuer\n"), "control");
    assert!(!sso.contains("# user = \"gateway\" "), "the example");
    assert!(
        !sso.contains("The shipped unit starts the issuer as `gateway`\n(`User=gateway`)")
            && !sso.contains("The shipped unit starts the issuer as `gateway` (`User=gateway`)"),
        "Running as its user"
    );
    assert!(
        !sso.contains("chown -R gateway: …/sso"),
        "the error's example"
    );
    assert!(
        !main.contains("set user = \\\"gateway\\\" (the store chowned to it)"),
        "the warning"
    );
    assert!(sso.contains("# user = \"gateway-issuer\""), "names its own");
}

/// S7-8: after `pki revoke --intermediate` ("Users sign in again only
/// after a new SSO CA is set up", docs/sso.md) the issuer went on
/// signing user certificates with the revoked intermediate whenever its
/// key is still in the store: `sign_user_request` never read
/// `revoked_intermediates`. Measured: each sign-in answered 200, counted
/// as issued (2); the certificate was refused by a route whose `crl.pem`
/// has the root's new CRL, and taken by one whose copy predates it.
///
/// Now the store refuses to sign with it (500, the reason said, not
/// counted as issued), and `pki issue` too. Control: that route refuses a
/// certificate of the same intermediate signed before the revocation, so
/// refusing to sign takes nothing that works.
#[tokio::test]
async fn s7_8_the_issuer_keeps_signing_with_an_intermediate_the_root_revoked() {
    let s = setup("");
    let laptop = device(LAPTOP);
    let before = s
        .issuer
        .issue(Some(&laptop), request(s.token(|_| {})))
        .await
        .unwrap();
    let operator = Store::open(&s.ca_dir)
        .with_root_crl_out(Some(&root_crl_out(&s.ca_dir)))
        .with_root_crl_new(true);
    operator
        .revoke_as(s.ca_dir.join("intermediate.pem").to_str().unwrap(), true)
        .unwrap();
    assert!(
        gateway_accepts(&s.ca_dir, &before.certificate).is_err(),
        "control: revoked"
    );
    let e = s
        .issuer
        .issue(Some(&laptop), request(s.token(|_| {})))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 500, "{e}");
    assert!(
        e.to_string().contains("the root revoked this intermediate"),
        "{e}"
    );
    assert_eq!(s.issuer.counters().issued, 1);
    let e = operator
        .issue(
            crate::pki::store::Kind::Client,
            "web",
            &["dns:web.example.internal".into()],
            None,
            KeyType::P256,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("the root revoked this intermediate"), "{e}");
    // And the issuer's CRL check says so, once, and shows it.
    assert!(!s.issuer.counters().intermediate_revoked);
    s.issuer.maintain_crl().unwrap();
    assert!(s.issuer.counters().intermediate_revoked);
    assert!(super::server::metrics(&s.issuer).contains("gateway_issuer_intermediate_revoked 1\n"));
}

/// S7-9: e0455b6 keeps root from copying a file only it may read into
/// `crl.pem` (parsed CRLs only, re-encoded), but root's `pki issue`
/// copied `intermediate.pem`'s text whole into `NAME.pem` (0644, given to
/// the store's owner): rcgen reads only its first PEM block, and
/// `Authority::load` kept the text as it was. A root-owned file that
/// starts with a certificate (a server's combined cert-and-key PEM, as
/// haproxy and others keep them) reaches `intermediate.pem` by a hard link
/// where `fs.protected_hardlinks` is off, or by a rename of a file root
/// left in the store. Measured: `web.pem` held the key block, mode 0644,
/// uid 65534.
///
/// Now the intermediate's certificate is parsed and re-encoded, one and
/// nothing else: that file is refused and nothing is written. Control:
/// with the plain `intermediate.pem` back, `issue` writes a chain of the
/// leaf and the intermediate.
#[test]
fn s7_9_roots_issue_copies_intermediate_pem_whole_into_a_file_the_owner_reads() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root (root's pki command in another user's store)");
        return;
    }
    const NOBODY: u32 = 65534;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ca = dir.path().join("sso");
    let store = fresh_store(&ca);
    let int_path = ca.join("intermediate.pem");
    let int_pem = std::fs::read_to_string(&int_path).unwrap();
    for e in std::fs::read_dir(&ca).unwrap() {
        std::os::unix::fs::lchown(e.unwrap().path(), Some(NOBODY), Some(NOBODY)).unwrap();
    }
    std::os::unix::fs::chown(&ca, Some(NOBODY), Some(NOBODY)).unwrap();
    // A server's combined PEM, root's and 0600 (here a certificate that
    // parses, followed by its "key").
    let combined = dir.path().join("site.pem");
    std::fs::write(
        &combined,
        format!(
            "{int_pem}-----BEGIN PRIVATE KEY-----\nU0VDUkVULUtFWQ==\n-----END PRIVATE KEY-----\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&combined, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::remove_file(&int_path).unwrap();
    std::fs::hard_link(&combined, &int_path).unwrap();
    // Root issues in the store: refused, nothing written.
    let e = store
        .issue(
            crate::pki::store::Kind::Server,
            "web",
            &["dns:web.example.internal".into()],
            None,
            KeyType::P256,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("where only certificates belong"), "{e}");
    assert!(!ca.join("web.pem").exists());
    // Control: the intermediate's certificate alone.
    std::fs::remove_file(&int_path).unwrap();
    std::fs::write(&int_path, &int_pem).unwrap();
    std::os::unix::fs::chown(&int_path, Some(NOBODY), Some(NOBODY)).unwrap();
    let (cert, _) = store
        .issue(
            crate::pki::store::Kind::Server,
            "web",
            &["dns:web.example.internal".into()],
            None,
            KeyType::P256,
        )
        .unwrap();
    let out = std::fs::read_to_string(&cert).unwrap();
    assert!(out.ends_with(&int_pem) && !out.contains("PRIVATE KEY"));
    let meta = std::fs::metadata(&cert).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.uid()), (0o644, NOBODY));
}

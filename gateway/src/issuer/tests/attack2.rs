//! Attacks of the second review of single sign-on issuance (reviews2, see
//! /work/helpers/s6/reviews2/findings.md). Each test asserts the HARM the
//! reviewed code allows (it passes on that code), with a control showing
//! the same steps without the attacker's part succeed; a fix turns it round.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::time::{Duration, Instant};

use super::*;

const NOBODY: u32 = 65534;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether someone holds the store's directory lock (flock on the directory).
fn lock_held(dir: &Path) -> bool {
    let d = std::fs::File::open(dir).unwrap();
    match d.try_lock() {
        Ok(()) => false,
        Err(std::fs::TryLockError::WouldBlock) => true,
        Err(e) => panic!("{e}"),
    }
}

/// S2-1: the store's lock is an flock on the directory, and `gateway pki
/// init` made the directory 0755 (umask 022, as docs/sso.md's "Setting it
/// up" runs it): any local user who could open the directory could take the
/// lock, for as long as they liked (`flock sso sleep infinity`), and the
/// issuer's `lock()` waited without bound. Measured before the fix: with
/// `nobody` holding it for 4 s, the CRL re-signing and a sign-in were both
/// still waiting after 1.5 s with nothing logged or counted
/// (`crl_publish_failures == 0`), and finished only when `nobody` let go
/// (a sign-in blocked a tokio worker meanwhile). Fixed: `init` leaves the
/// directory 0711 (no one else may open it; crl.pem is still reachable by
/// name), the issuer refuses at start a `ca_dir` others may read, and a
/// wait for the lock gives up after `LOCK_WAIT`: the re-signing fails,
/// logged and counted, and the sign-in is answered 503 `store_busy`.
#[test]
fn s2_1_a_local_user_holds_the_store_lock_and_signing_and_crl_re_signing_hang_uncounted() {
    if !is_root() {
        eprintln!("skipped: needs root to act as another local user");
        return;
    }
    let s = setup("");
    // The store's parent readable as /etc/gateway is; the store as `pki
    // init` made it.
    let parent = s.ca_dir.parent().unwrap();
    std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mode = std::fs::metadata(&s.ca_dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o711, "pki init's directory: others may not open it");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // Control: nobody holds it; a check and a sign-in are immediate.
    let t = Instant::now();
    assert!(matches!(
        s.issuer.maintain_crl().unwrap(),
        CrlRefresh::Fresh { .. }
    ));
    rt.block_on(
        s.issuer
            .issue(Some(&device(LAPTOP)), request(s.token(|_| {}))),
    )
    .unwrap();
    assert!(t.elapsed() < Duration::from_secs(2));

    // The CRL is due (5 days left of 7), as a day later.
    Store::open(&s.ca_dir)
        .publish_crl(time::Duration::days(5))
        .unwrap();
    let token = s.token(|_| {});

    // An unprivileged local user cannot take the lock: the directory will
    // not open for them.
    let out = std::process::Command::new("flock")
        .arg(&s.ca_dir)
        .args(["sleep", "4"])
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    assert!(!out.status.success(), "nobody's flock ran: {out:?}");
    assert!(!lock_held(&s.ca_dir));

    // The issuer refuses a store others may open, e.g. one an older `pki
    // init` left 0755.
    std::fs::set_permissions(&s.ca_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let why = Store::open(&s.ca_dir).check_lock_private().unwrap_err();
    assert!(why.to_string().contains("chmod go-r"), "{why}");
    std::fs::set_permissions(&s.ca_dir, std::fs::Permissions::from_mode(0o711)).unwrap();

    // Whoever holds it (here root, in this process), the wait is bounded,
    // logged and counted.
    let held = Store::open(&s.ca_dir).lock().unwrap();
    let started = Instant::now();
    std::thread::scope(|scope| {
        let resign = scope.spawn(|| s.issuer.maintain_crl());
        let sign = scope.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(s.issuer.issue(Some(&device(LAPTOP)), request(token)))
        });
        let resigned = resign.join().unwrap();
        assert!(
            matches!(resigned, Err(crate::pki::PkiError::Locked { .. })),
            "{resigned:?}"
        );
        let e = sign.join().unwrap().unwrap_err();
        assert_eq!((e.status(), e.reason()), (503, "store_busy"), "{e}");
    });
    let waited = started.elapsed();
    assert!(
        waited >= crate::pki::store::LOCK_WAIT && waited < crate::pki::store::LOCK_WAIT * 2,
        "{waited:?}"
    );
    let c = s.issuer.counters();
    assert_eq!(c.crl_publish_failures, 1, "the held lock is a failure");
    assert_eq!(c.store_lock_timeouts, 2);
    assert_eq!(c.refused.get("store_busy"), Some(&1));
    assert!(server::metrics(&s.issuer).contains("gateway_issuer_store_lock_timeouts_total 2\n"));
    // Released, the next check re-signs.
    drop(held);
    assert!(matches!(
        s.issuer.maintain_crl(),
        Ok(CrlRefresh::Published { .. })
    ));
}

/// The issuer's user's half of S2-2: a sign-in in the store `GATEWAY_TEST_STORE`
/// (what `Issuer::issue` does last).
#[test]
#[ignore = "run by another test, as another user"]
fn as_the_issuers_user_sign_in_the_store() {
    let Ok(dir) = std::env::var("GATEWAY_TEST_STORE") else {
        return;
    };
    let sans = vec!["email:alice@example.internal".to_owned(), LAPTOP.to_owned()];
    Store::open(Path::new(&dir))
        .sign_request(
            "alice",
            &csr(),
            &sans,
            time::OffsetDateTime::now_utc() + time::Duration::hours(1),
            None,
        )
        .unwrap();
}

/// Runs a helper test of this binary, as `uid` (None: this process's),
/// with `umask`; its output and whether it passed.
fn helper(name: &str, store: &Path, serial: &str, uid: Option<u32>, umask: u32) -> (bool, String) {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", name, "--ignored", "--nocapture"])
        .env("GATEWAY_TEST_STORE", store)
        .env("GATEWAY_TEST_SERIAL", serial);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    // SAFETY: umask is async-signal-safe and cannot fail.
    unsafe {
        cmd.pre_exec(move || {
            libc::umask(umask as libc::mode_t);
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && said.contains("1 passed"), said)
}

/// S2-2: docs/sso.md says `gateway pki revoke` beside the issuer "works
/// whoever runs the command, root included, as long as the issuer's user
/// may read the directory". But the store writes each file with the
/// caller's umask: root with a hardened umask (027, as CIS benchmarks ask,
/// and sudo keeps it) rewrites index.json as root's 0640 (and crl.pem too),
/// and the issuer's user can no longer read the index: every sign-in and
/// every CRL re-signing fails from then on (until someone chmods it), and
/// a gateway reading crl.pem as its own user cannot load the CRL that
/// carries the revocation. Control: the same revoke under umask 022 leaves
/// the issuer's user signing. Measured before the fix: under umask 027,
/// index.json and crl.pem were root's 0640 and `nobody`'s sign-in failed
/// with "index.json: Permission denied". Fixed: the store writes each file
/// 0644 (keys 0600) whatever the umask, and root's writes into another
/// user's store stay that user's; under 027 and 077 alike the issuer's
/// user signs on.
#[test]
fn s2_2_root_revoking_with_a_hardened_umask_leaves_an_index_the_issuers_user_cannot_read() {
    if !is_root() {
        eprintln!("skipped: needs root to act as two users");
        return;
    }
    let run = |umask: u32| {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("sso");
        let store = new_store(&ca, "SSO");
        let sans = vec!["email:alice@example.internal".to_owned(), LAPTOP.to_owned()];
        let serial = store
            .sign_request(
                "alice",
                &csr(),
                &sans,
                time::OffsetDateTime::now_utc() + time::Duration::hours(1),
                None,
            )
            .unwrap()
            .1
            .serial;
        // The store is the issuer's user's, as /var/lib/gateway-issuer/sso.
        let own = |p: &Path| std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
        own(dir.path());
        own(&ca);
        for f in std::fs::read_dir(&ca).unwrap() {
            own(&f.unwrap().path());
        }
        // Root revokes (`sudo gateway pki revoke --dir … SERIAL`).
        let (ok, said) = helper(
            "issuer::tests::as_another_user_revoke_in_the_store",
            &ca,
            &serial,
            None,
            umask,
        );
        assert!(ok, "root's revoke: {said}");
        let meta = std::fs::metadata(ca.join("index.json")).unwrap();
        let crl = std::fs::metadata(ca.join("crl.pem")).unwrap();
        // The issuer's user signs the next user in.
        let (signed, said) = helper(
            "issuer::tests::attack2::as_the_issuers_user_sign_in_the_store",
            &ca,
            "",
            Some(NOBODY),
            0o077,
        );
        (
            signed,
            said,
            std::os::unix::fs::MetadataExt::uid(&meta),
            meta.permissions().mode() & 0o777,
            crl.permissions().mode() & 0o777,
        )
    };
    // Control: root's umask 022; then the hardened ones.
    for umask in [0o022, 0o027, 0o077] {
        let (signed, said, owner, mode, crl_mode) = run(umask);
        assert!(signed, "umask {umask:o}: the issuer's user signs: {said}");
        assert_eq!(
            (owner, mode, crl_mode),
            (NOBODY, 0o600, 0o644),
            "umask {umask:o}: the store's files stay its owner's: the index its alone, the CRL readable"
        );
    }
}

/// The subjectPublicKeyInfo (DER) of the first certificate or CSR in `pem`
/// whose PEM line starts a line (as x509-parser reads PEM).
fn spki_of(pem: &str) -> Vec<u8> {
    use x509_parser::prelude::FromDer as _;
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    if p.label.ends_with("CERTIFICATE REQUEST") {
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&p.contents)
                .unwrap();
        csr.certification_request_info.subject_pki.raw.to_vec()
    } else {
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&p.contents).unwrap();
        cert.tbs_certificate.subject_pki.raw.to_vec()
    }
}

/// S2-3: the CSR key policy (`csr_key`) reads the first PEM block whose
/// `-----BEGIN` starts a line (x509-parser), but the signer (rcgen's
/// `from_pem`, the `pem` crate) takes the first `-----BEGIN ` anywhere,
/// mid-line too. A `csr` of `x` + CSR A, then CSR B: the policy checks B,
/// the certificate is for A's key, and the issuance log's `key` names B's.
/// What still refuses a weak A (RSA-1024, P-521) is only rcgen's own
/// self-signature check (x509-parser's verify with aws-lc-rs: RSA
/// 2048-8192, P-256/P-384, Ed25519; SHA-1 RSA from 1024 bits, which rcgen
/// then does not take), answered 400 `csr`, not the policy's `csr_key`.
/// Control: A alone is checked by the policy (`csr_key` for RSA-1024).
/// Measured before the fix: with A = RSA-2048 and B = P-256 the
/// certificate was for A's key; a smuggled RSA-1024 A came back `csr`
/// (rcgen's check), past the policy. Fixed: the policy and the signer
/// read the same DER, and anything but exactly one CERTIFICATE REQUEST
/// block (text before or after it, a second block) is refused.
#[tokio::test]
async fn s2_3_the_csr_key_policy_checks_another_pem_block_than_the_one_signed() {
    let s = setup("[limits]\nper_user = { burst = 20, per_hour = 20 }");
    let ask = |i: usize, csr: String| {
        let laptop = device(&format!("spiffe://example.internal/device/key-{i}"));
        let nonce = s.issuer.nonce(Some(&laptop)).unwrap();
        let req = CertificateRequest {
            id_token: token(&s.key, &claims(&nonce)),
            csr,
            lifetime: None,
        };
        let issuer = &s.issuer;
        async move { issuer.issue(Some(&laptop), req).await }
    };
    // A: RSA-2048 (allowed, but not what the policy looked at).
    let a = super::csr_for(&rcgen::PKCS_RSA_SHA256);
    let b = csr();
    for (i, smuggled) in [format!("x{a}{b}"), format!("{a}{b}"), format!("{b}x")]
        .into_iter()
        .enumerate()
    {
        let e = ask(i, smuggled).await.unwrap_err();
        assert_eq!(e.reason(), "csr", "{e}");
        assert!(e.to_string().contains("one PEM"), "{e}");
    }
    // Alone, each is signed for its own key, whitespace around it aside.
    let answer = ask(3, format!("\n {a}\n")).await.unwrap();
    assert_eq!(spki_of(&answer.certificate), spki_of(&a), "signed: A's key");
    let weak = super::openssl_csr(&["-newkey", "rsa:1024"]);
    let e = ask(4, weak.clone()).await.unwrap_err();
    assert_eq!(e.reason(), "csr_key", "control: alone, the policy: {e}");
    let e = ask(5, format!("x{weak}{}", csr())).await.unwrap_err();
    assert_eq!(
        e.reason(),
        "csr",
        "smuggled: refused before the policy: {e}"
    );
    assert!(e.to_string().contains("one PEM"), "{e}");
}

/// One scrape of `GET /metrics` at `addr`: the answer, or what it got.
async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Ok(mut tcp) = tokio::net::TcpStream::connect(addr).await else {
        return "connect failed".into();
    };
    let _ = tcp
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// S2-4: `metrics_listen` serves 8 connections at once, each kept up to
/// `HANDSHAKE_TIMEOUT` (5 s) silent and `METRICS_DEADLINE` (10 s) in all,
/// with no per-peer share: any local user on the issuer's host opens 8
/// silent connections (again as each is cut) and every scrape is closed
/// unanswered. The counters docs/sso.md says to alert on
/// (`gateway_issuer_crl_publish_failures_total`, "six days remain before
/// users are refused") go dark, with S2-1's uncounted hang behind them.
/// Control: without the 8, the scrape is answered. Measured before the
/// fix: with 8 silent connections held, 3 scrapes in a row got no
/// `gateway_issuer_` text. Fixed: a newcomer takes the slot of the
/// longest silent connection, so every scrape is answered.
#[tokio::test]
async fn s2_4_a_local_user_holds_every_metrics_connection_and_scrapes_go_unanswered() {
    let s = setup("");
    let issuer = Arc::new(s.issuer);
    let stop = tokio_util::sync::CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server::serve_metrics(
        listener,
        issuer.clone(),
        stop.clone(),
    ));
    // Control.
    assert!(scrape(addr).await.starts_with("HTTP/1.1 200"));
    // 8 silent connections, and more as they are cut: the scraper is
    // still answered.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..3 {
        let answer = scrape(addr).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "scraped: {answer}");
        assert!(answer.contains("gateway_issuer_"), "scraped: {answer}");
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        scrape(addr).await.starts_with("HTTP/1.1 200"),
        "control after"
    );
    stop.cancel();
}

/// S2-5: `gateway pki revoke` writes the revocation into index.json, then
/// signs the CRL; when the signing fails (here the intermediate key is
/// unreadable for a moment; a full disk, a crash, S2-2's files do the
/// same) the command errs but the index says revoked. The issuer's
/// minute check looks only at the CRL's nextUpdate: the CRL is "fresh",
/// nothing is re-signed, and the certificate the index calls revoked
/// passes routes until the CRL is due (up to a day with the defaults, up
/// to `crl_next_update - crl_republish_before`). A second `revoke` of the
/// same serial would publish, if the operator knew to. Control: a revoke
/// that signs lists the serial at once. Measured before the fix:
/// `maintain_crl` returned `Fresh` and the serial stayed off the CRL.
/// Fixed: the check re-signs when the index lists a revoked serial the CRL
/// lacks, and `revoke` says the revocation is recorded but not published.
#[tokio::test]
async fn s2_5_a_revocation_whose_crl_failed_stays_unpublished_while_the_crl_is_fresh() {
    let s = setup("");
    let operator = Store::open(&s.ca_dir);
    let sign = || {
        let sans = vec!["email:alice@example.internal".to_owned(), LAPTOP.to_owned()];
        operator
            .sign_request(
                "alice",
                &csr(),
                &sans,
                time::OffsetDateTime::now_utc() + time::Duration::hours(8),
                None,
            )
            .unwrap()
            .1
            .serial
    };
    // Control.
    let first = sign();
    operator.revoke(&first).unwrap();
    assert!(super::sso_crl(&s.ca_dir, &first).3);
    // The CRL's signing fails after the index was written.
    let second = sign();
    let key = s.ca_dir.join("intermediate.key");
    let away = s.ca_dir.join("intermediate.key.away");
    std::fs::rename(&key, &away).unwrap();
    let e = operator.revoke(&second).unwrap_err().to_string();
    assert!(
        e.contains("recorded") && e.contains("NOT published") && e.contains("gateway pki crl"),
        "{e}"
    );
    std::fs::rename(&away, &key).unwrap();
    let entry = operator
        .index()
        .unwrap()
        .issued
        .into_iter()
        .find(|e| e.serial == second)
        .unwrap();
    assert!(entry.revoked_at.is_some(), "the index says revoked");
    // The issuer's next check publishes it, though the CRL is fresh.
    assert!(matches!(
        s.issuer.maintain_crl().unwrap(),
        CrlRefresh::Published { .. }
    ));
    assert!(
        super::sso_crl(&s.ca_dir, &second).3,
        "the revoked serial is on the CRL routes read"
    );
    // And then it is fresh again.
    assert!(matches!(
        s.issuer.maintain_crl().unwrap(),
        CrlRefresh::Fresh { .. }
    ));
}

/// S2-7: `gateway pki revoke SERIAL_OR_CERT` takes its argument as a
/// certificate file whenever a file of that name exists in the operator's
/// working directory. The holder of the certificate being revoked, a local
/// user who knows its serial (it is theirs), plants a file named as that
/// serial in a directory others can write (/tmp, a shared work directory)
/// holding another certificate of the same CA (their own older one, or
/// another user's); the operator's `cd /tmp; gateway pki revoke --dir sso
/// SERIAL` then revokes that one instead and prints "revoked
/// alice@example.internal (serial …)": the certificate meant stays valid.
/// (With root.key still beside the store, a planted `intermediate.pem`
/// revokes the SSO intermediate and with it every user.) Control: the
/// same command in a directory with no such file revokes the serial.
/// Measured before the fix: with the decoy planted under the target's
/// serial, the decoy was revoked and the target neither revoked nor on
/// the CRL. Fixed: a bare word is only ever a serial (a file needs a
/// path with a '/'), and the intermediate needs `--intermediate`.
#[test]
fn s2_7_a_file_named_as_the_serial_in_the_operators_directory_revokes_another_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("sso");
    let store = new_store(&ca, "SSO");
    let sans = vec!["email:alice@example.internal".to_owned(), LAPTOP.to_owned()];
    let sign = || {
        store
            .sign_request(
                "alice@example.internal",
                &csr(),
                &sans,
                time::OffsetDateTime::now_utc() + time::Duration::hours(8),
                None,
            )
            .unwrap()
    };
    let revoked = |serial: &str| {
        store
            .index()
            .unwrap()
            .issued
            .into_iter()
            .any(|e| e.serial == serial && e.revoked_at.is_some())
    };
    let run_in = |cwd: &Path, serial: &str| {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "issuer::tests::as_another_user_revoke_in_the_store",
                "--ignored",
                "--nocapture",
            ])
            .env("GATEWAY_TEST_STORE", &ca)
            .env("GATEWAY_TEST_SERIAL", serial)
            .current_dir(cwd)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    // Control: in a clean directory, the serial is revoked.
    let (_, first) = sign();
    let clean = tempfile::tempdir().unwrap();
    run_in(clean.path(), &first.serial);
    assert!(revoked(&first.serial));
    assert!(super::sso_crl(&ca, &first.serial).3);

    // The attacker's certificate (to be revoked) and a decoy planted
    // under its serial: the serial typed is what is revoked.
    let (_, target) = sign();
    let (decoy_pem, decoy) = sign();
    let shared = tempfile::tempdir().unwrap();
    std::fs::write(shared.path().join(&target.serial), &decoy_pem).unwrap();
    run_in(shared.path(), &target.serial);
    assert!(revoked(&target.serial), "the serial typed is revoked");
    assert!(super::sso_crl(&ca, &target.serial).3, "and on the CRL");
    assert!(!revoked(&decoy.serial), "the planted certificate is not");

    // A bare file name is no serial, and the intermediate's own serial is
    // refused without --intermediate.
    let int_pem = std::fs::read_to_string(ca.join("intermediate.pem")).unwrap();
    let e = store.revoke("intermediate.pem").unwrap_err();
    assert!(e.to_string().contains("not a hex serial"), "{e}");
    let int_serial = {
        let (_, p) = x509_parser::pem::parse_x509_pem(int_pem.as_bytes()).unwrap();
        crate::pki::store::hex(p.parse_x509().unwrap().tbs_certificate.raw_serial())
    };
    let e = store.revoke(&int_serial).unwrap_err();
    assert!(e.to_string().contains("--intermediate"), "{e}");
    assert!(store.index().unwrap().revoked_intermediates.is_empty());
    // Asked for, it is revoked.
    let entry = store
        .clone()
        .with_root_crl_out(Some(&dir.path().join("root-crl.pem")))
        .with_root_crl_new(true)
        .revoke_as(&int_serial, true)
        .unwrap();
    assert_eq!(entry.serial, int_serial);
    assert_eq!(store.index().unwrap().revoked_intermediates.len(), 1);
}

/// An issuer serving on loopback with `device_trust_ca` (relative to its
/// directory) as its device CA; its SSO CA in `sso`, its TLS certificate
/// `tls/localhost.pem`. Returns the port and what stops it.
async fn serve_with_device_ca(
    dir: &Path,
    device_trust_ca: &str,
) -> (u16, tokio_util::sync::CancellationToken) {
    let config = config_with_device_ca(dir, device_trust_ca);
    let acceptor: server::Acceptor = Arc::new(arc_swap::ArcSwap::from_pointee(
        server::acceptor(&config).unwrap(),
    ));
    serve_config(config, acceptor).await
}

/// The config `serve_with_device_ca` writes, parsed, for `device_trust_ca`.
pub(super) fn config_with_device_ca(dir: &Path, device_trust_ca: &str) -> IssuerConfig {
    let text = format!(
        r#"
listen = "127.0.0.1:0"
cert = "tls/localhost.pem"
key = "tls/localhost.key"
ca_dir = "sso"
device_trust = {{ ca = "{device_trust_ca}" }}
device_san_prefix = "spiffe://example.internal/device/"
[oidc]
issuer = "{ISS}"
client_id = "gateway"
[profile]
email_domains = ["example.internal"]
"#
    );
    IssuerConfig::parse(&text, Path::new("issuer.toml"), dir).unwrap()
}

async fn serve_config(
    config: IssuerConfig,
    acceptor: server::Acceptor,
) -> (u16, tokio_util::sync::CancellationToken) {
    let issuer = Arc::new(Issuer::new(config, Box::new(TestKeys::default())).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(server::serve(listener, acceptor, issuer, stop.clone()));
    (port, stop)
}

/// S2-8: docs/sso.md: "the SSO CA is never the issuer's device trust, so
/// an issued certificate cannot be used to obtain another". Nothing
/// enforces it: `device_trust.ca` may name the SSO CA's own `ca.pem` (an
/// operator keeping one CA for devices and users), the config loads, and
/// a user certificate the issuer signed (clientAuth, carrying the device
/// URI) is then a device certificate: its holder asks for nonces and, with
/// a token, new user certificates, from any machine, without the device's
/// key, past the device's revocation in its own CA, for as long as they
/// keep renewing. Control: with a separate device CA, the user
/// certificate is refused at the handshake. Measured before the fix: with
/// `sso/ca.pem` as device trust the config and acceptor loaded, and the
/// user certificate got 200 and a nonce from `POST /v1/nonce`. Fixed: at
/// start and every reload the acceptor refuses a device trust holding an
/// SSO CA key, and a presented chain through an SSO CA key (a
/// cross-certificate) is refused at the handshake.
#[tokio::test]
async fn s2_8_with_the_sso_ca_as_device_trust_a_user_certificate_is_a_device_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let sso = new_store(&dir.path().join("sso"), "SSO");
    new_store(&dir.path().join("devices"), "Devices");
    let tls = new_store(&dir.path().join("tls"), "TLS");
    localhost_cert(&tls);
    // A user certificate as the issuer signs it, with its key.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let user_csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let sans = vec![
        "email:alice@example.internal".to_owned(),
        "spiffe://example.internal/device/laptop-7".to_owned(),
    ];
    let (chain, _) = sso
        .sign_request(
            "alice@example.internal",
            &user_csr,
            &sans,
            time::OffsetDateTime::now_utc() + time::Duration::hours(8),
            None,
        )
        .unwrap();
    let (user_pem, user_key) = (dir.path().join("user.pem"), dir.path().join("user.key"));
    std::fs::write(&user_pem, chain).unwrap();
    std::fs::write(&user_key, key.serialize_pem()).unwrap();
    std::fs::set_permissions(&user_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let client = http::client_config(
        Some(&dir.path().join("tls/ca.pem")),
        Some((&user_pem, &user_key)),
    )
    .unwrap();
    let nonce = |port: u16| {
        let client = client.clone();
        async move {
            http::request(
                &client,
                hyper::Method::POST,
                &format!("https://localhost:{port}/v1/nonce"),
                None,
                Vec::new(),
            )
            .await
            .map(|(status, body)| (status, String::from_utf8_lossy(&body).into_owned()))
        }
    };
    // Control: a separate device CA refuses the user certificate.
    let (port, stop) = serve_with_device_ca(dir.path(), "devices/ca.pem").await;
    assert!(
        nonce(port).await.is_err(),
        "control: refused at the handshake"
    );
    stop.cancel();
    // The SSO CA as device trust (its root, its intermediate, or beside
    // the device CA in one file) does not load.
    let both = dir.path().join("both.pem");
    std::fs::write(
        &both,
        std::fs::read_to_string(dir.path().join("devices/ca.pem")).unwrap()
            + &std::fs::read_to_string(dir.path().join("sso/ca.pem")).unwrap(),
    )
    .unwrap();
    for ca in ["sso/ca.pem", "sso/intermediate.pem", "both.pem"] {
        let e = server::acceptor(&config_with_device_ca(dir.path(), ca))
            .err()
            .unwrap_or_else(|| panic!("{ca}: loaded"));
        assert!(e.to_string().contains("SSO CA's own key"), "{ca}: {e}");
    }
    // A device CA that cross-certified the SSO intermediate's key: the
    // chain verifies, and is still refused as a user certificate.
    let int_pem = std::fs::read_to_string(dir.path().join("sso/intermediate.pem")).unwrap();
    let int_key = rcgen::KeyPair::from_pem(
        &std::fs::read_to_string(dir.path().join("sso/intermediate.key")).unwrap(),
    )
    .unwrap();
    let devices_root = rcgen::Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(dir.path().join("devices/root.pem")).unwrap(),
        rcgen::KeyPair::from_pem(
            &std::fs::read_to_string(dir.path().join("devices/root.key")).unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    // The SSO intermediate's name (a CN, as `gateway pki` makes it) and key.
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "SSO issuing CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let cross = params.signed_by(&int_key, &devices_root).unwrap();
    assert!(int_pem.contains("-----BEGIN CERTIFICATE-----"));
    let leaf = std::fs::read_to_string(&user_pem).unwrap();
    let leaf = &leaf[..leaf.find("-----END CERTIFICATE-----").unwrap() + 26];
    std::fs::write(&user_pem, format!("{leaf}{}", cross.pem())).unwrap();
    let crossed = http::client_config(
        Some(&dir.path().join("tls/ca.pem")),
        Some((&user_pem, &user_key)),
    )
    .unwrap();
    let (port, stop) = serve_with_device_ca(dir.path(), "devices/ca.pem").await;
    let answer = http::request(
        &crossed,
        hyper::Method::POST,
        &format!("https://localhost:{port}/v1/nonce"),
        None,
        Vec::new(),
    )
    .await;
    assert!(answer.is_err(), "cross-certified: refused at the handshake");
    stop.cancel();
}

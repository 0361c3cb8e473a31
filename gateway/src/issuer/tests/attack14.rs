//! Attacker review 14 (s8/review14, see /work/helpers/s8/review14/findings.md):
//! the S12 fixes (1b3a2d4 bounded PEM reads, 497e7fc the root's CRL signed
//! from what root holds). Each test asserts the HARM (it passes on the code
//! as reviewed) beside a control, and is meant to be turned round into the
//! refusal once fixed.

use super::*;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustls_pki_types::UnixTime;

use crate::tls::bundle::{Bundle, BundleFiles};
use crate::tls::crl::Enforced;

// Helpers as in attack12 (private there).

fn spec() -> InitSpec<'static> {
    InitSpec {
        name: "SSO",
        key_type: KeyType::P256,
        permitted_dns: None,
    }
}

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

fn root_crl_out(ca_dir: &Path) -> std::path::PathBuf {
    ca_dir
        .parent()
        .unwrap()
        .join("etc")
        .join("sso-root.crl.pem")
}

/// Each CRL in `pem`: its CRL number (u64::MAX if larger) and the serials
/// (hex) it lists.
fn crls_in(pem: &str) -> Vec<(u64, Vec<String>)> {
    use x509_parser::prelude::FromDer as _;
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .map(|p| p.unwrap())
        .map(|p| {
            let (_, crl) =
                x509_parser::revocation_list::CertificateRevocationList::from_der(&p.contents)
                    .unwrap();
            let number = crl
                .crl_number()
                .map_or(0, |n| match n.to_u64_digits().as_slice() {
                    [] => 0,
                    [n] => *n,
                    _ => u64::MAX,
                });
            let listed = crl
                .iter_revoked_certificates()
                .map(|r| crate::pki::store::hex(r.raw_serial()))
                .collect();
            (number, listed)
        })
        .collect()
}

fn bundle_files(ca_dir: &Path, crls: Vec<std::path::PathBuf>) -> BundleFiles {
    BundleFiles {
        ca: ca_dir.parent().unwrap().join("etc").join("sso-ca.pem"),
        crls,
        crl_expired: crate::config::CrlExpired::Refuse,
        spiffe_trust_domains: None,
    }
}

fn load(files: &BundleFiles) -> Result<Bundle, String> {
    Bundle::load(
        "trust sso".into(),
        files,
        crate::tls::provider().signature_verification_algorithms,
        Arc::new(AtomicU64::new(0)),
    )
    .map_err(|e| e.to_string())
}

/// The route as docs/sso.md "The route" lists it.
fn route(ca_dir: &Path) -> Vec<std::path::PathBuf> {
    vec![ca_dir.join("crl.pem"), root_crl_out(ca_dir)]
}

fn verify(bundle: &Bundle, chain: &str) -> Result<(), String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    bundle
        .verify(&certs[0], &certs[1..], UnixTime::now())
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

/// Whether a gateway started now with the documented route takes `chain`.
fn gateway_accepts(ca_dir: &Path, chain: &str) -> Result<(), String> {
    verify(&load(&bundle_files(ca_dir, route(ca_dir)))?, chain)
}

/// A running gateway that put the documented route's CRLs into service
/// as they are now.
fn running_gateway(ca_dir: &Path) -> Enforced {
    let enforced = Enforced::default();
    let b = load(&bundle_files(ca_dir, route(ca_dir))).unwrap();
    enforced.check(&[b.served()]).unwrap();
    enforced.record(&[b.served()]);
    enforced
}

/// The documented SSO store (as attack12's): root key offline with a copy
/// of intermediate.pem, the routes' trust anchor copied to
/// etc/sso-ca.pem, the root's CRL at `--root-crl-out`. Returns the store,
/// the operator's view (`--root-key`, `--root-cert`, `--root-crl-out`)
/// and the offline directory.
fn documented_store(dir: &Path) -> (Store, Store, std::path::PathBuf) {
    let ca = dir.join("sso");
    let store = Store::open(&ca);
    store.init(&spec()).unwrap();
    let offline = dir.join("offline");
    std::fs::create_dir(&offline).unwrap();
    std::fs::rename(ca.join("root.key"), offline.join("root.key")).unwrap();
    std::fs::copy(
        ca.join("intermediate.pem"),
        offline.join("intermediate.pem"),
    )
    .unwrap();
    let out = root_crl_out(&ca);
    std::fs::create_dir(out.parent().unwrap()).unwrap();
    let anchor = out.parent().unwrap().join("sso-ca.pem");
    std::fs::copy(ca.join("root.pem"), &anchor).unwrap();
    let operator = Store::open(&ca)
        .with_root_key(Some(&offline.join("root.key")))
        .with_root_cert(Some(&anchor))
        .with_root_crl_out(Some(&out));
    operator
        .clone()
        .with_root_crl_new(true)
        .republish_root_crl(time::Duration::days(7))
        .expect("pki crl --root --root-crl-new");
    (store, operator, offline)
}

/// S14-1: after `sign_root_crl` has written the right CRL to
/// `--root-crl-out`, `record_root_crl` goes on in the store, and on one
/// path calls `publish_crl_locked`, which signs the root's CRL AGAIN
/// through `publish_root_crl_locked` when `root.crl.pem` is missing: from
/// the store alone (its number from the owner's `index.json`, its serials
/// from the owner's files) and writes it to `--root-crl-out`, over the
/// root's history. `pki crl --root` takes that path whenever the store's
/// `intermediate.pem` is not the one revoked (the owner puts any pair of
/// its own there); the owner deletes `root.crl.pem` and puts back an
/// `index.json` with no revoked intermediate and `root_crl_number`
/// u64::MAX-1 in a loop while the command runs. The command succeeds and
/// says its CRL lists the intermediate; the root's file then holds CRL
/// #u64::MAX listing nothing: the documented route (running gateways
/// too: the number is higher) takes alice again, and the root can never
/// sign another CRL. Control: a trial the loop loses leaves the root's
/// file listing the serial.
#[test]
fn s14_1_pki_crl_root_signs_a_second_crl_from_the_owners_index_over_root_crl_out() {
    let started = Instant::now();
    let mut trials = 0;
    let mut lost = 0;
    loop {
        assert!(
            trials < 40 && started.elapsed() < Duration::from_secs(40),
            "never won in {trials} trials"
        );
        trials += 1;
        let dir = tempfile::tempdir().unwrap();
        let (store, operator, offline) = documented_store(dir.path());
        let ca = dir.path().join("sso");
        let out = root_crl_out(&ca);
        let chain = alice_chain(&store);
        let (real, _) = store.intermediate_fingerprint().unwrap();
        let stolen = crate::pki::Authority::load(
            &std::fs::read_to_string(ca.join("intermediate.pem")).unwrap(),
            &std::fs::read_to_string(ca.join("intermediate.key")).unwrap(),
        )
        .unwrap();
        // The documented revocation (step 1): in force.
        operator
            .revoke_intermediate(offline.join("intermediate.pem").to_str().unwrap())
            .unwrap();
        let revoked = crls_in(&std::fs::read_to_string(&out).unwrap());
        assert_eq!(revoked, vec![(3, vec![real.clone()])]);
        assert!(
            gateway_accepts(&ca, &chain)
                .unwrap_err()
                .contains("Revoked")
        );
        let gateway = running_gateway(&ca);

        // The owner: a pair of its own as intermediate.pem/.key, crl.pem
        // without the root's CRL, and the loop.
        let other = crate::pki::Authority::root("owner's").unwrap();
        std::fs::write(ca.join("intermediate.pem"), &other.cert_pem).unwrap();
        std::fs::write(ca.join("intermediate.key"), &other.key_pem).unwrap();
        std::fs::remove_file(ca.join("crl.pem")).unwrap();
        let mut index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(ca.join("index.json")).unwrap()).unwrap();
        index["revoked_intermediates"] = json!([]);
        index["root_crl_number"] = json!(u64::MAX - 1);
        let owners = index.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let owner = {
            let (stop, ca) = (stop.clone(), ca.clone());
            std::thread::spawn(move || {
                let tmp = ca.join(".owner.tmp");
                while !stop.load(Ordering::Relaxed) {
                    let _ = std::fs::remove_file(ca.join("root.crl.pem"));
                    if std::fs::write(&tmp, &owners).is_ok() {
                        let _ = std::fs::rename(&tmp, ca.join("index.json"));
                    }
                }
            })
        };
        // The documented re-signing (docs/sso.md: "If root.crl.pem itself
        // missed it, run gateway pki crl --dir sso --root …"; "The same
        // command re-signs the root's CRL before it runs out").
        let done = operator.republish_root_crl(time::Duration::days(7));
        stop.store(true, Ordering::Relaxed);
        owner.join().unwrap();
        let now = crls_in(&std::fs::read_to_string(&out).unwrap());
        if now != vec![(u64::MAX, vec![])] {
            // Lost: the root's file lists the serial (control).
            assert!(
                now.iter().all(|(_, l)| l.contains(&real)),
                "trial {trials}: {now:?} {done:?}"
            );
            lost += 1;
            continue;
        }
        // Won. The command succeeded and said it listed the intermediate.
        let (_, signed) = done.unwrap();
        assert_eq!(signed.listed, vec![real.clone()], "what it printed");
        assert_eq!(signed.crl_number, 4);
        // The owner's crl.pem: a fresh CRL of the real intermediate (the
        // stolen key), numbered above what gateways enforce.
        std::fs::write(
            ca.join("crl.pem"),
            stolen
                .crl_until(
                    1 << 40,
                    &[],
                    time::OffsetDateTime::now_utc() + time::Duration::days(7),
                )
                .unwrap(),
        )
        .unwrap();
        // A gateway started now takes alice, and a running one takes the
        // reload (nothing older, nothing withdrawn) and then alice.
        assert_eq!(gateway_accepts(&ca, &chain), Ok(()));
        let reload = load(&bundle_files(&ca, route(&ca))).unwrap();
        assert!(gateway.check(&[reload.served()]).is_ok());
        assert_eq!(verify(&reload, &chain), Ok(()));
        // And the root cannot sign again.
        let e = operator
            .revoke_intermediate(offline.join("intermediate.pem").to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot grow any more"), "{e}");
        eprintln!(
            "S14-1 won at trial {trials} ({lost} lost) after {:?}",
            started.elapsed()
        );
        return;
    }
}

/// `n` CRLs as one PEM file, each in the name of a different issuer: one
/// CRL signed once, its issuer's name patched (nothing in a load checks
/// a signature). Returns the text.
fn crls_of_distinct_issuers(n: usize) -> String {
    use base64::Engine as _;
    let ca = crate::pki::Authority::root("q00000000").unwrap();
    let pem = ca.crl(1, &[]).unwrap();
    let der = x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .contents;
    let at = der
        .windows(9)
        .position(|w| w == b"q00000000")
        .expect("the issuer's name in the CRL");
    let mut text = String::new();
    for i in 0..n {
        let mut d = der.clone();
        d[at..at + 9].copy_from_slice(format!("q{i:08}").as_bytes());
        text.push_str("-----BEGIN X509 CRL-----\n");
        text.push_str(&base64::engine::general_purpose::STANDARD.encode(&d));
        text.push_str("\n-----END X509 CRL-----\n");
    }
    text
}

/// S14-2: 1b3a2d4 bounds what the gateway reads of a CRL file (64 MiB,
/// no FIFO, no device), but not what it then does with it, inline in the
/// control loop (`app.rs` `reload` -> `State::build` -> `Bundle::load` ->
/// `crl::load` -> `crl::newest`): for each CRL, a linear search of the
/// places kept so far (`kept.iter_mut().find(same_scope)`), so a file of
/// n CRLs of n different issuers costs n²/2 comparisons. `sso/crl.pem`
/// is the issuer's user's to write (signatures are not checked at load),
/// and a gateway reloads it by itself within 0.5 s of a change. Measured
/// here (debug build): 2 000 CRLs ~0.06 s, 16 000 CRLs ~2.3 s (x30 or more
/// for 8x; linear would be x8); a file under 64 MiB holds ~206 000 such
/// CRLs (325 bytes each in PEM), ~400 s at that rate (printed; a release
/// build is faster by a constant factor only), every reload and every
/// start, with the control loop (reloads, `gateway reload`, the
/// once-a-second tick) waiting. Control: the same count of CRLs of one
/// issuer (one
/// place, numbered) loads in linear time.
#[test]
fn s14_2_a_crl_file_of_many_issuers_costs_the_control_loop_quadratic_time() {
    let dir = tempfile::tempdir().unwrap();
    let time_load = |name: &str, text: &str| -> Duration {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let started = Instant::now();
        let loaded = crate::tls::crl::load(&[path]).map(|c| c.len());
        let took = started.elapsed();
        assert!(loaded.is_ok(), "{name}: {:?}", loaded.err());
        took
    };
    let (small, large) = (2_000, 16_000);
    let small_text = crls_of_distinct_issuers(small);
    let large_text = crls_of_distinct_issuers(large);
    let per_crl = large_text.len() / large;
    // The least of three: the small load is short enough for other
    // tests running beside it to blur.
    let t_small = (0..3)
        .map(|_| time_load("small.pem", &small_text))
        .min()
        .unwrap();
    let t_large = time_load("large.pem", &large_text);
    let ratio = t_large.as_secs_f64() / t_small.as_secs_f64();
    let fits = (crate::safe_dir::MAX_NAMED_FILE_BYTES as usize) / per_crl;
    let scale = fits as f64 / large as f64;
    eprintln!(
        "S14-2: {small} CRLs {t_small:?}, {large} CRLs {t_large:?} (x{ratio:.1}); \
         {per_crl} bytes each, {fits} fit in 64 MiB: ~{:.0} s at this rate",
        t_large.as_secs_f64() * scale * scale
    );
    // Linear would be x8; quadratic x64.
    assert!(ratio > 16.0, "quadratic: x{ratio:.1} for 8x the CRLs");

    // Control: as many CRLs of one issuer (one place): linear.
    let ca = crate::pki::Authority::root("one issuer").unwrap();
    let one: String = (1..=large as u64)
        .map(|n| ca.crl(n, &[]).unwrap())
        .collect();
    let t_one = time_load("one.pem", &one);
    eprintln!("S14-2 control: {large} CRLs of one issuer {t_one:?}");
    assert!(t_one * 4 < t_large, "{t_one:?} vs {t_large:?}");
}

/// The child side of S14-3, run only by that test (as a fresh process,
/// a session leader with no controlling terminal, as systemd starts a
/// service): loads the CRL file `S14_3_LINK` names as the gateway does
/// (`safe_dir::read_bounded`), or, with `S14_3_NOCTTY`, opens it
/// O_NOCTTY (the control), says whether it now has a controlling
/// terminal, and waits.
#[test]
#[ignore = "run by s14_3 as a child process"]
fn s14_3_child() {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let Ok(link) = std::env::var("S14_3_LINK") else {
        return;
    };
    let e = if std::env::var_os("S14_3_NOCTTY").is_some() {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(&link)
            .map(|_| ())
            .map_err(|e| e.to_string())
    } else {
        crate::safe_dir::read_bounded(Path::new(&link), 1 << 20)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    // tty_nr, field 7 of /proc/self/stat: the controlling terminal.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let tty_nr = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(4)
        .unwrap()
        .to_owned();
    println!("S14_3 tty_nr={tty_nr} load={e:?}");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    println!("S14_3 alive");
}

/// S14-3: `read_bounded` opens the file a route names without O_NOCTTY,
/// and only then checks its type. A process that is a session leader
/// with no controlling terminal (every systemd service) and opens a
/// terminal for reading acquires it as its controlling terminal. The
/// issuer's user links `sso/crl.pem` to a pseudo-terminal of its own
/// (`/dev/pts/N`, made 0666 by that user, or any when the gateway runs
/// as root or keeps CAP_DAC_OVERRIDE with the guard; PrivateDevices=
/// keeps /dev/pts): the next load refuses "a device", but the gateway now
/// has that terminal, and the user, holding its master, sends ^\ (SIGQUIT,
/// not handled: the process dumps core and dies) or ^C to the gateway's
/// process group whenever it likes, long after `crl.pem` is a good file
/// again. Measured with a child process set up as systemd does (setsid):
/// after the refused load its tty_nr is the pts, and one byte 0x1c on the
/// master kills it by SIGQUIT. Control: the same open with O_NOCTTY
/// leaves tty_nr 0, and the byte does nothing (it prints "alive").
#[test]
fn s14_3_a_link_to_a_terminal_at_sso_crl_pem_makes_it_the_gateways_controlling_terminal() {
    use std::io::{BufRead as _, Write as _};
    use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
    // SAFETY: posix_openpt/grantpt/unlockpt/ptsname on a fresh master fd.
    let (master, pts) = unsafe {
        let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        assert!(fd >= 0);
        assert_eq!(libc::grantpt(fd), 0);
        assert_eq!(libc::unlockpt(fd), 0);
        let name = std::ffi::CStr::from_ptr(libc::ptsname(fd))
            .to_str()
            .unwrap()
            .to_owned();
        (
            <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd),
            name,
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("crl.pem");
    std::os::unix::fs::symlink(&pts, &link).unwrap();
    let run = |noctty: bool| {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--ignored",
            "--exact",
            "issuer::tests::attack14::s14_3_child",
            "--nocapture",
        ])
        .env("S14_3_LINK", &link)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
        if noctty {
            cmd.env("S14_3_NOCTTY", "1");
        }
        // SAFETY: setsid and setrlimit are async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                let none = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &none);
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let said = lines
            .by_ref()
            .map(|l| l.unwrap())
            .find(|l| l.starts_with("S14_3 tty_nr="))
            .expect("the child's line");
        // The owner, holding the master: ^\ .
        (&master).write_all(b"\x1c").unwrap();
        let status = child.wait().unwrap();
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        (said, status, rest)
    };
    let (said, status, _) = run(false);
    assert!(said.contains("a device"), "{said}");
    assert!(!said.contains("tty_nr=0 "), "acquired a terminal: {said}");
    assert_eq!(status.signal(), Some(libc::SIGQUIT), "{said} {status:?}");
    // Control: O_NOCTTY.
    let (said, status, rest) = run(true);
    assert!(said.contains("tty_nr=0 "), "{said}");
    assert!(status.success(), "{status:?}");
    assert!(rest.iter().any(|l| l.contains("S14_3 alive")), "{rest:?}");
}

/// S14-4: the root's CRL is to be written "before it touches the store,
/// so nothing the issuer's user does in sso/ keeps the revocation from
/// routes" (docs/sso.md step 1). But `revoke_intermediate` first checks
/// `--root-crl-out` (`check_root_crl_out`), which asks the store's owner
/// (`owner_for_root`, through `Store::opened`), and any error there but
/// "no such file" stops the command before anything is signed. The
/// issuer's user owns the directory above the store (StateDirectory=) and
/// puts a symbolic link (or a FIFO, or a file) at `sso`'s name, ahead of
/// time: no code need run during root's command, and a running issuer,
/// which keeps the store it opened, goes on signing; gateways read
/// `sso/crl.pem` through the link. The documented command then fails and
/// nothing is written at `--root-crl-out`: alice stays in. Control: with
/// nothing at `sso`'s name (moved away), the same command writes the
/// revocation.
/// What one S14-4 case gave: the command, what the root's file lists,
/// and whether the documented route takes alice.
type Case = (
    Result<(), String>,
    Vec<(u64, Vec<String>)>,
    Result<(), String>,
);

#[test]
fn s14_4_a_link_at_the_stores_name_keeps_the_root_from_signing_anything() {
    let case = |what: &str, spoil: &dyn Fn(&Path)| -> Case {
        let dir = tempfile::tempdir().unwrap();
        let (store, _, offline) = documented_store(dir.path());
        let ca = dir.path().join("sso");
        let out = root_crl_out(&ca);
        let chain = alice_chain(&store);
        let before = std::fs::read(&out).unwrap();
        spoil(&ca);
        // The documented command, a fresh process.
        let operator = Store::open(&ca)
            .with_root_key(Some(&offline.join("root.key")))
            .with_root_cert(Some(&out.parent().unwrap().join("sso-ca.pem")))
            .with_root_crl_out(Some(&out));
        let result = operator
            .revoke_intermediate(offline.join("intermediate.pem").to_str().unwrap())
            .map(|_| ())
            .map_err(|e| e.to_string());
        let after = std::fs::read(&out).unwrap();
        if result.is_err() && what != "moved away" {
            assert_eq!(before, after, "{what}: nothing written");
        }
        let listed = crls_in(&String::from_utf8(after).unwrap());
        eprintln!("S14-4 {what}: {result:?}");
        (result, listed, gateway_accepts(&ca, &chain))
    };
    // A link at the store's name (to the store, moved beside it).
    let (result, listed, accepts) = case("link", &|ca| {
        let real = ca.with_file_name("sso.real");
        std::fs::rename(ca, &real).unwrap();
        std::os::unix::fs::symlink(&real, ca).unwrap();
    });
    assert!(result.unwrap_err().contains("is a symbolic link"));
    assert_eq!(
        listed,
        vec![(2, vec![])],
        "nothing revoked at the root's file"
    );
    assert_eq!(accepts, Ok(()), "alice stays in");
    // A FIFO at its name (the owner's code, while root runs).
    let (result, listed, _) = case("fifo", &|ca| {
        let real = ca.with_file_name("sso.real");
        std::fs::rename(ca, &real).unwrap();
        let c = std::ffi::CString::new(ca.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path and a mode.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    });
    assert_eq!(listed, vec![(2, vec![])]);
    assert!(result.unwrap_err().contains("is a FIFO"));
    // Control: nothing at its name: signed and written at the root's
    // file (the store's part said not done).
    let (result, listed, _) = case("moved away", &|ca| {
        std::fs::rename(ca, ca.with_file_name("sso.real")).unwrap();
    });
    assert!(
        result.unwrap_err().contains("is signed and written to"),
        "the store's part only"
    );
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].0, listed[0].1.len()), (3, 1));
}

/// Waits (at most 3 s) until a process opens the file `name` in the
/// directory the inotify descriptor `fd` watches (IN_OPEN: the store's
/// owner may watch its own directory). False on timeout.
fn wait_for_open(fd: i32, name: &str) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd of ours.
        if unsafe { libc::poll(&mut pfd, 1, 3000) } != 1 {
            return false;
        }
        // SAFETY: reading into a buffer we own, of its length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        assert!(n > 0);
        let mut at = 0usize;
        while at + 16 <= n as usize {
            let len = u32::from_ne_bytes(buf[at + 12..at + 16].try_into().unwrap()) as usize;
            let raw = &buf[at + 16..at + 16 + len];
            let got = raw.split(|b| *b == 0).next().unwrap_or_default();
            if got == name.as_bytes() {
                return true;
            }
            at += 16 + len;
        }
    }
}

/// S14-1, in the documented revocation itself (docs/sso.md step 1), with
/// the owner's code still running (step 1's `pkill` missed it: a crontab
/// line of that user starts it again, say). `revoke --intermediate` writes
/// the right CRL at `--root-crl-out`, then `record_root_crl` ->
/// `publish_root_beside_locked`: with `crl.pem` unreadable (the owner's
/// garbage) and the intermediate's key still in the store, it signs the
/// intermediate's CRL afresh (`publish_crl_locked`), which, finding no
/// `root.crl.pem`, signs the root's CRL again from the owner's index and
/// writes it over `--root-crl-out`. The owner watches its directory with
/// inotify: at root's first open of `intermediate.key` (after root read
/// `root.crl.pem`) it deletes `root.crl.pem` and puts its `index.json`
/// back, in a loop for 0.3 s. Measured: the root's file ends with
/// #u64::MAX listing nothing, the documented route takes alice, and the
/// command succeeded printing the right serial.
#[test]
fn s14_1b_the_documented_revocation_is_overwritten_the_same_way() {
    let started = Instant::now();
    let mut trials = 0;
    loop {
        assert!(
            trials < 30 && started.elapsed() < Duration::from_secs(40),
            "never won in {trials} trials"
        );
        trials += 1;
        let dir = tempfile::tempdir().unwrap();
        let (store, operator, offline) = documented_store(dir.path());
        let ca = dir.path().join("sso");
        let out = root_crl_out(&ca);
        let chain = alice_chain(&store);
        let (real, _) = store.intermediate_fingerprint().unwrap();
        let stolen = crate::pki::Authority::load(
            &std::fs::read_to_string(ca.join("intermediate.pem")).unwrap(),
            &std::fs::read_to_string(ca.join("intermediate.key")).unwrap(),
        )
        .unwrap();
        std::fs::write(ca.join("crl.pem"), "garbage").unwrap();
        let mut index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(ca.join("index.json")).unwrap()).unwrap();
        index["revoked_intermediates"] = json!([]);
        index["root_crl_number"] = json!(u64::MAX - 1);
        let owners = index.to_string();
        // SAFETY: inotify on a directory path we own.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        assert!(fd >= 0);
        let c = std::ffi::CString::new(ca.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert!(unsafe { libc::inotify_add_watch(fd, c.as_ptr(), libc::IN_OPEN) } >= 0);
        let owner = {
            let ca = ca.clone();
            std::thread::spawn(move || {
                if !wait_for_open(fd, "intermediate.key") {
                    // SAFETY: our descriptor.
                    unsafe { libc::close(fd) };
                    return;
                }
                let tmp = ca.join(".owner.tmp");
                let until = Instant::now() + Duration::from_millis(300);
                while Instant::now() < until {
                    let _ = std::fs::remove_file(ca.join("root.crl.pem"));
                    if std::fs::write(&tmp, &owners).is_ok() {
                        let _ = std::fs::rename(&tmp, ca.join("index.json"));
                    }
                }
                // SAFETY: our descriptor.
                unsafe { libc::close(fd) };
            })
        };
        let done = operator
            .revoke_intermediate(offline.join("intermediate.pem").to_str().unwrap())
            .map_err(|e| e.to_string());
        owner.join().unwrap();
        let now = crls_in(&std::fs::read_to_string(&out).unwrap());
        if now != vec![(u64::MAX, vec![])] {
            assert!(
                now.iter().all(|(_, l)| l.contains(&real)),
                "trial {trials}: {now:?} {done:?}"
            );
            continue;
        }
        // What the operator is told: the right serial, listed (or, when
        // the store's part then failed, that the revocation is "signed
        // and written to" the root's file, "in force").
        match &done {
            Ok(done) => {
                assert_eq!(done.entry.serial, real, "what it printed");
                assert_eq!(done.root_crl.listed, vec![real.clone()], "what it printed");
            }
            Err(e) => assert!(
                e.contains(&format!("revoking {real} is signed and written to")),
                "{e}"
            ),
        }
        std::fs::write(
            ca.join("crl.pem"),
            stolen
                .crl_until(
                    1 << 40,
                    &[],
                    time::OffsetDateTime::now_utc() + time::Duration::days(7),
                )
                .unwrap(),
        )
        .unwrap();
        assert_eq!(gateway_accepts(&ca, &chain), Ok(()));
        eprintln!(
            "S14-1b won at trial {trials} after {:?}; the command: {}",
            started.elapsed(),
            match &done {
                Ok(_) => "succeeded".to_owned(),
                Err(e) => e.clone(),
            }
        );
        return;
    }
}

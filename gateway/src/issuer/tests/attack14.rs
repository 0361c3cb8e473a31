//! Attacker review 14 (s8/review14, see /work/helpers/s8/review14/findings.md):
//! the S12 fixes (1b3a2d4 bounded PEM reads, 497e7fc the root's CRL signed
//! from what root holds). Each test asserts the HARM (it passes on the code
//! as reviewed) beside a control, and is meant to be turned round into the
//! refusal once fixed.

use super::*;
// The documented route and store helpers, as review 12 wrote them.
use super::attack12::{
    alice_chain, bundle_files, gateway_accepts, load, root_crl_out, route, running_gateway, spec,
    verify,
};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

// Helpers as in attack12 (private there).

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

/// S14-1: after `sign_root_crl` had written the right CRL to
/// `--root-crl-out`, `record_root_crl` went on in the store, and on one
/// path called `publish_crl_locked`, which signed the root's CRL AGAIN
/// through `publish_root_crl_locked` when `root.crl.pem` was missing: from
/// the store alone (its number from the owner's `index.json`, its serials
/// from the owner's files), written over `--root-crl-out`. With the owner
/// deleting `root.crl.pem` and putting back an `index.json` with no revoked
/// intermediate and `root_crl_number` u64::MAX-1 in a loop, `pki crl
/// --root` succeeded and left the root's file holding CRL #u64::MAX
/// listing nothing (won at the first trial in every run): alice in again,
/// and the root could never sign another CRL. Now only `init` and
/// `sign_root_crl` write the root's file, and a root command never signs
/// a root CRL from the store: with the owner's loop running, every trial
/// leaves the root's file listing the serial, numbered 4, and the root
/// can sign again.
#[test]
fn s14_1_pki_crl_root_never_signs_a_second_crl_from_the_owners_index() {
    let started = Instant::now();
    let mut trials = 0;
    while trials < 8 && started.elapsed() < Duration::from_secs(20) {
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
        assert_eq!(
            now,
            vec![(4, vec![real.clone()])],
            "trial {trials}: {done:?}"
        );
        assert!(
            gateway_accepts(&ca, &chain)
                .unwrap_err()
                .contains("Revoked"),
            "trial {trials}"
        );
        // A running gateway either takes the reload, in which alice is
        // refused, or refuses it (the owner withdrew crl.pem's CRLs) and
        // keeps the state that refused her.
        let reload = load(&bundle_files(&ca, route(&ca))).unwrap();
        if gateway.check(&[reload.served()]).is_ok() {
            assert!(verify(&reload, &chain).unwrap_err().contains("Revoked"));
        }
        // And the root signs again, numbered after its own history.
        let (_, again) = operator
            .republish_root_crl(time::Duration::days(7))
            .unwrap_or_else(|e| panic!("trial {trials}: {e}"));
        assert_eq!(again.crl_number, 5);
        assert_eq!(again.listed, vec![real.clone()]);
        drop(stolen);
    }
    assert!(trials >= 2, "{trials} trials");
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

/// S14-2: 1b3a2d4 bounded what the gateway reads of a CRL file (64 MiB,
/// no FIFO, no device), but not what it then did with it, inline in the
/// control loop: picking the newest CRL of each place is a linear search
/// of the places kept so far, so a file of n CRLs of n made-up issuers
/// (`sso/crl.pem` is the issuer's user's; signatures are not checked at
/// load) cost n²/2 comparisons. Measured before the fix (debug build):
/// 2 000 CRLs ~0.06 s, 16 000 ~2.3-4.4 s, and ~206 000 fit in 64 MiB
/// (minutes, at every reload and start). Now a CRL file holds at most
/// `MAX_CRLS_PER_FILE` (1024): more is refused at once, naming the file,
/// and 1024 made-up issuers load in well under a second. Control: 1024
/// CRLs load.
#[test]
fn s14_2_a_crl_file_of_many_issuers_is_refused_past_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let cap = crate::tls::certs::MAX_CRLS_PER_FILE;
    let at_cap = dir.path().join("at-cap.pem");
    std::fs::write(&at_cap, crls_of_distinct_issuers(cap)).unwrap();
    let started = Instant::now();
    assert_eq!(crate::tls::crl::load(&[at_cap]).unwrap().len(), cap);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let over = dir.path().join("over.pem");
    std::fs::write(&over, crls_of_distinct_issuers(16_000)).unwrap();
    let started = Instant::now();
    let e = match crate::tls::crl::load(std::slice::from_ref(&over)) {
        Ok(_) => panic!("16 000 CRLs loaded"),
        Err(e) => e.to_string(),
    };
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(
        e.contains("over.pem") && e.contains("more than 1024 CRLs"),
        "{e}"
    );
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

/// S14-3: `read_bounded` opened the file a route names without O_NOCTTY,
/// and only then checked its type. A session leader with no controlling
/// terminal (every systemd service) that opens a terminal acquires it: the
/// issuer's user linked `sso/crl.pem` to a pseudo-terminal of its own, the
/// load refused "a device", but the gateway then had that terminal, and
/// one byte 0x1c on the master killed it by SIGQUIT (measured before the
/// fix with a child set up as systemd does, setsid). Now every file opened
/// by a name someone else may shape is opened O_NOCTTY: the refused load
/// leaves tty_nr 0 and the byte does nothing ("alive"). Control: a plain
/// O_NOCTTY open, the same.
#[test]
fn s14_3_a_link_to_a_terminal_at_sso_crl_pem_never_becomes_the_gateways_terminal() {
    use std::io::{BufRead as _, Write as _};
    use std::os::unix::process::CommandExt as _;
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
    // read_bounded: refused, and no terminal acquired; ^\ does nothing.
    let (said, status, rest) = run(false);
    assert!(said.contains("a device"), "{said}");
    assert!(said.contains("tty_nr=0 "), "acquired a terminal: {said}");
    assert!(status.success(), "{said} {status:?}");
    assert!(rest.iter().any(|l| l.contains("S14_3 alive")), "{rest:?}");
    // Control: a plain O_NOCTTY open, the same.
    let (said, status, rest) = run(true);
    assert!(said.contains("tty_nr=0 "), "{said}");
    assert!(status.success(), "{status:?}");
    assert!(rest.iter().any(|l| l.contains("S14_3 alive")), "{rest:?}");
}

/// What one S14-4 case gave: the command, what the root's file lists,
/// and whether the documented route takes alice.
type Case = (
    Result<(), String>,
    Vec<(u64, Vec<String>)>,
    Result<(), String>,
);

/// S14-4: before 8797919, `revoke_intermediate` first checked where
/// `--root-crl-out` may go by asking the store for its owner, and any
/// error there but "no such file" stopped the command before anything
/// was signed: the issuer's user (owner of the directory above the store)
/// put a symbolic link or a FIFO at `sso`'s name ahead of time, and the
/// documented command failed with nothing at `--root-crl-out` while
/// alice stayed in. Now the root's file is then held to the stricter rule
/// (no one but root on the way) and the revocation is signed and written;
/// only the store's part fails, said ("is signed and written to"). Control:
/// nothing at its name (moved away), the same.
#[test]
fn s14_4_a_link_at_the_stores_name_does_not_keep_the_root_from_signing() {
    let case = |what: &str, spoil: &dyn Fn(&Path)| -> (Case, String) {
        // Not under /tmp: with the store unopenable, no directory others
        // may write (sticky included) may be on the way to the root's file.
        let exe = std::env::current_exe().unwrap();
        let dir = tempfile::tempdir_in(exe.parent().unwrap()).unwrap();
        let (store, _, offline) = documented_store(dir.path());
        let ca = dir.path().join("sso");
        let out = root_crl_out(&ca);
        let chain = alice_chain(&store);
        let (real, _) = store.intermediate_fingerprint().unwrap();
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
        let listed = crls_in(&String::from_utf8(after).unwrap());
        eprintln!("S14-4 {what}: {result:?}");
        ((result, listed, gateway_accepts(&ca, &chain)), real)
    };
    for (what, spoil) in [
        (
            "link",
            &(|ca: &Path| {
                let real = ca.with_file_name("sso.real");
                std::fs::rename(ca, &real).unwrap();
                std::os::unix::fs::symlink(&real, ca).unwrap();
            }) as &dyn Fn(&Path),
        ),
        ("fifo", &|ca: &Path| {
            let real = ca.with_file_name("sso.real");
            std::fs::rename(ca, &real).unwrap();
            let c = std::ffi::CString::new(ca.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: a NUL-terminated path and a mode.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        }),
        ("moved away", &|ca: &Path| {
            std::fs::rename(ca, ca.with_file_name("sso.real")).unwrap();
        }),
    ] {
        let ((result, listed, accepts), real) = case(what, spoil);
        let e = result.unwrap_err();
        assert!(e.contains("is signed and written to"), "{what}: {e}");
        assert_eq!(listed, vec![(3, vec![real])], "{what}");
        if what == "link" {
            // Gateways read sso/ through the link: alice refused.
            assert!(accepts.unwrap_err().contains("Revoked"), "{what}");
        }
    }
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
/// line of that user starts it again, say). Before the fix, `revoke
/// --intermediate` wrote the right CRL at `--root-crl-out`, then, with
/// `crl.pem` unreadable (the owner's garbage) and the intermediate's key
/// still in the store, signed the intermediate's CRL afresh
/// (`publish_crl_locked`), which, finding no `root.crl.pem` (the owner,
/// watching with inotify, deleted it at root's open of `intermediate.key`
/// and put its `index.json` back), signed the root's CRL again from the
/// owner's index over `--root-crl-out`: #u64::MAX listing nothing, won
/// within 1-4 trials. Now nothing after `sign_root_crl` writes that file:
/// every trial leaves it listing the serial, and the route refuses alice.
#[test]
fn s14_1b_the_documented_revocation_is_never_overwritten() {
    let started = Instant::now();
    let mut trials = 0;
    while trials < 8 && started.elapsed() < Duration::from_secs(20) {
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
        assert_eq!(
            now,
            vec![(3, vec![real.clone()])],
            "trial {trials}: {done:?}"
        );
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
        // Whatever the owner makes of crl.pem: a fresh CRL of the
        // intermediate numbered far above.
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
        assert!(
            gateway_accepts(&ca, &chain)
                .unwrap_err()
                .contains("Revoked"),
            "trial {trials}"
        );
    }
    assert!(trials >= 2, "{trials} trials");
}

//! Attacker review 13 (s8/review13, see /work/helpers/s8/review13/findings.md):
//! the S10-1 and S10-2 fixes (81adcf0, ff64d0e, 593f948). Each test
//! asserts the HARM (it passes on the code as reviewed) beside a control,
//! and is meant to be turned round into the refusal once fixed.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::privilege::Target;

const NOBODY: u32 = 65534;
/// `daemon` on Debian: a user that is neither nobody nor root.
const DAEMON: u32 = 1;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A temporary directory whose every ancestor is root's and writable by
/// root alone (beside the test binary, not in /tmp), mode 0755.
fn root_only_tempdir() -> tempfile::TempDir {
    let exe = std::env::current_exe().unwrap();
    let dir = tempfile::Builder::new()
        .tempdir_in(exe.parent().unwrap())
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn mkdir(p: &Path, mode: u32, owner: u32) {
    std::fs::create_dir(p).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    std::os::unix::fs::chown(p, Some(owner), Some(owner)).unwrap();
}

/// `sh -c script` as nobody (uid and gid 65534, no groups).
fn as_nobody(script: &str) -> std::process::Output {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap()
}

/// The user a root start with `user = "nobody"` drops to.
fn nobody_target() -> Target {
    Target::alone("nobody").unwrap()
}

fn open_log(log: &Path) -> Result<crate::access_log::AccessLog, crate::access_log::AccessLogError> {
    crate::access_log::AccessLog::open(
        log.to_str().unwrap(),
        Path::new("/"),
        Some(&nobody_target()),
        Arc::new(std::sync::atomic::AtomicU64::new(0)),
        Arc::new(crate::access_log::Suppressed::default()),
        Duration::from_secs(60),
    )
}

fn check_log(log: &Path) -> Result<(), crate::access_log::AccessLogError> {
    crate::access_log::AccessLog::check(
        log.to_str().unwrap(),
        Path::new("/"),
        Some(&nobody_target()),
    )
}

/// The lib test binary re-run as `uid`/`gid` (with `extra` as setpriv's
/// arguments), running the ignored test `name` with `envs`.
fn child(name: &str, setpriv: &[String], envs: &[(&str, &Path)]) -> std::process::Command {
    let mut c = std::process::Command::new("setpriv");
    c.args(setpriv).arg(std::env::current_exe().unwrap()).args([
        "--exact",
        &format!("issuer::tests::attack13::{name}"),
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    for (k, v) in envs {
        c.env(k, v);
    }
    c
}

fn have_setpriv() -> bool {
    std::process::Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok()
}

/// Child side of S13-1, run as nobody: swaps `DIR/log` and `DIR/alt`
/// (two symlinks of its own, in its own directory) with
/// renameat2(RENAME_EXCHANGE) every few microseconds, until `DIR/stop` appears
/// or 20 s pass. Ignored: only the parent test runs it.
#[test]
#[ignore]
fn s13_1_flipper() {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(dir) = std::env::var("ATTACK13_FLIP_DIR") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let (log, alt, stop) = (c(&dir.join("log")), c(&dir.join("alt")), dir.join("stop"));
    // SAFETY: getuid has no preconditions.
    assert_eq!(unsafe { libc::getuid() }, NOBODY);
    std::fs::write(dir.join("ready"), b"").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n: u64 = 0;
    loop {
        // SAFETY: two NUL-terminated paths, AT_FDCWD, a known flag.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                log.as_ptr(),
                libc::AT_FDCWD,
                alt.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        n += 1;
        // A short sleep, not a busy loop: on a loaded host (one core for
        // both) each wake-up preempts root's open at a random point,
        // rather than flipping only within its own time slice.
        std::thread::sleep(Duration::from_micros(10));
        if n.is_multiple_of(64) && (stop.exists() || Instant::now() > deadline) {
            break;
        }
    }
    // Leave `log` as it was found ("."), whatever the count.
    if n % 2 == 1 {
        // SAFETY: as above.
        unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                log.as_ptr(),
                libc::AT_FDCWD,
                alt.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
    }
    println!("FLIPS {n}");
}

/// S13-1: `writable_above` left out the last directory the walk
/// *entered*, taking it for the log's own directory. A symlink `log ->
/// "."` in the user's directory `state` enters nothing: the walk of
/// `state/log` ended in `state`, left it out, and judged only root's
/// directories above it. So `access_log = ".../state/log/access.log"`,
/// which the S10-1 fix refuses while `state/log` is a directory, passed
/// `check` and open once the user had made `log` a link to "." — though
/// `state/log` is reached through `state`, the user's, which is what
/// README's rule forbids. The user's own link in its own directory was
/// then looked up again at the open (by path), so a user with a process
/// alive at root's start swapped `log` between "." and a link to any
/// directory (renameat2 RENAME_EXCHANGE), and root's open, after a walk
/// that saw ".", created `access.log` in the other directory: S10-1's
/// harm, through a race. Before the fix: a nobody child flipping
/// `state/log` between "." and `protected`; `AccessLog::open` as root,
/// retried, made `protected/access.log` (root's, 0640) where nobody cannot
/// write, after 1 to 80 opens (about 10 ms); held still, the log went to
/// `state/access.log`. Now the log's directory is reached one name at a
/// time through descriptors (`safe_dir::reach_parent`), every directory a
/// name is looked up in but the log's own judged on its descriptor, and
/// the log opened in the directory judged: `state/log -> .` is refused
/// held still, and with the flipper running every open for 2 s is refused
/// and nothing is made in `protected`. Controls: nobody cannot create
/// `protected/access.log`; `state/log` as a directory of nobody's, and
/// `state/log -> protected` held still, are refused (the S10-1 fix holds);
/// `state/access.log` itself (the user's directory as the log's own) opens.
#[tokio::test]
async fn s13_1_a_dot_link_in_the_users_directory_is_refused_and_cannot_race_the_open() {
    if !is_root() || !have_setpriv() {
        return;
    }
    let d = root_only_tempdir();
    let protected = d.path().join("protected");
    mkdir(&protected, 0o755, 0);
    let victim = protected.join("access.log");
    // Control: nobody cannot make the victim itself.
    let out = as_nobody(&format!("touch {}", victim.display()));
    assert!(!out.status.success(), "control: {out:?}");

    let state = d.path().join("state");
    mkdir(&state, 0o755, NOBODY);
    let log_dir = state.join("log");
    let log = log_dir.join("access.log");
    // Control: `state/log` a directory of nobody's: refused (S10-1 fix).
    mkdir(&log_dir, 0o755, NOBODY);
    let e = check_log(&log).unwrap_err().to_string();
    assert!(e.contains("is reached through a directory user"), "{e}");
    std::fs::remove_dir(&log_dir).unwrap();
    // Control: `state/log -> protected` held still: refused.
    let out = as_nobody(&format!(
        "ln -s {} {}",
        protected.display(),
        log_dir.display()
    ));
    assert!(out.status.success(), "{out:?}");
    let e = check_log(&log).unwrap_err().to_string();
    assert!(e.contains("is reached through a directory user"), "{e}");
    assert!(open_log(&log).is_err());
    assert!(!victim.exists());

    // Control: the user's directory as the log's own: opens there.
    drop(open_log(&state.join("access.log")).unwrap());
    std::fs::remove_file(state.join("access.log")).unwrap();

    // The user's `state/log -> "."` (and `alt -> protected` beside it).
    let out = as_nobody(&format!(
        "cd {} && rm log && ln -s . log && ln -s {} alt",
        state.display(),
        protected.display()
    ));
    assert!(out.status.success(), "{out:?}");
    // Held still: refused by check and open, nothing made in `state`.
    let e = check_log(&log).unwrap_err().to_string();
    assert!(e.contains("is reached through a directory user"), "{e}");
    let e = open_log(&log).err().expect("open passed").to_string();
    assert!(e.contains("is reached through a directory user"), "{e}");
    assert!(!state.join("access.log").exists());
    assert!(!victim.exists());

    // The race: nobody flips `log` between "." and `protected`.
    let flipper = child(
        "s13_1_flipper",
        &[
            format!("--reuid={NOBODY}"),
            format!("--regid={NOBODY}"),
            "--clear-groups".to_owned(),
        ],
        &[("ATTACK13_FLIP_DIR", &state)],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let ready = Instant::now() + Duration::from_secs(10);
    while !state.join("ready").exists() {
        assert!(Instant::now() < ready, "the flipper did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    let (mut tries, mut refused, mut opened) = (0u32, 0u32, 0u32);
    while !victim.exists() && Instant::now() < deadline {
        tries += 1;
        match open_log(&log) {
            Ok(l) => {
                opened += 1;
                drop(l);
            }
            Err(_) => refused += 1,
        }
    }
    std::fs::write(state.join("stop"), b"").unwrap();
    let out = flipper.wait_with_output().unwrap();
    assert!(out.status.success(), "flipper: {out:?}");
    eprintln!(
        "S13-1: {tries} opens ({opened} passed, {refused} refused), {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    // No harm: every open refused, nothing made in `protected` or `state`.
    assert!(!victim.exists(), "root's open landed in protected/");
    assert_eq!(opened, 0, "an open passed during the flips");
    assert!(refused > 0);
    assert!(!state.join("access.log").exists());
}

/// Child side of S13-2: run as another user and group (by `setpriv`),
/// prints what the issuer's start checks say in its two unit paths (no
/// `user`: `Target::current`; `user = "daemon"` started as daemon:
/// `Target::alone(..).in_its_groups()`), this process's ids, and whether
/// it reads ATTACK13_ROOT_FILE (root:root, 0640). Ignored: only the
/// parent test runs it.
#[test]
#[ignore]
fn s13_2_child() {
    let Ok(config) = std::env::var("ATTACK13_GATEWAY_CONFIG") else {
        return;
    };
    let config = Path::new(&config);
    let verdict = |r: Result<(), crate::privilege::PrivilegeError>| match r {
        Ok(()) => "passed".to_owned(),
        Err(e) => format!("refused: {e}"),
    };
    let current = Target::current().and_then(|t| t.not_the_gateways(config));
    let with_user = Target::alone("daemon")
        .and_then(|t| t.in_its_groups())
        .and_then(|t| t.not_the_gateways(config));
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .unwrap_or("")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    let read = std::env::var("ATTACK13_ROOT_FILE")
        .map(|f| std::fs::read_to_string(f).is_ok())
        .unwrap_or(false);
    println!(
        "CURRENT {}\nWITH_USER {}\n{}\n{}\nREADS_ROOT_FILE {read}",
        verdict(current),
        verdict(with_user),
        line("Gid:"),
        line("Groups:")
    );
}

/// S13-2: "gid 0 aside (refused on its own: RootGroup, mismatch)"
/// (privilege.rs, `all_groups`): `not_the_gateways` left group 0 out of
/// its comparison because it was said to be refused elsewhere, and
/// docs/sso.md listed "its primary group is root's (gid 0)" among the
/// refusals. Neither held for the issuer a unit starts (User=, the
/// documented way): `Target::alone` looks only at the group database's
/// primary group, `mismatch` and `RootGroup` only at drops from root.
/// Before the fix a unit with `Group=root` (or `SupplementaryGroups=root`,
/// or `usermod -aG root gateway-issuer`) ran the network-facing issuer,
/// with the SSO CA's key, in root's group, and its start passed. Measured
/// then (the lib test binary re-run by setpriv as uid 1): with gid 0, and
/// with gid 1 plus supplementary group 0, both the path without `user` and
/// the path with `user = "daemon"` started as daemon passed; /proc showed
/// `Gid: 0 …` / `Groups: 0`, and the child read a root:root 0640 file.
/// Now `not_the_gateways` refuses gid 0 among the issuer's groups (its
/// egid too, which `in_its_groups` now adds) on both paths, naming root's
/// group. Controls: the gateway's user's group (65534, gateway.toml names
/// user = "nobody") as a supplementary group is refused in both paths (the
/// S10-2 fix holds); with gid 1 alone, it passes and the root file is
/// unreadable.
#[test]
fn s13_2_an_issuer_in_roots_group_started_by_its_unit_is_refused() {
    if !is_root() || !have_setpriv() {
        return;
    }
    let d = root_only_tempdir();
    let config = d.path().join("gateway.toml");
    std::fs::write(&config, "user = \"nobody\"\n").unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let root_file = d.path().join("root-group.conf");
    std::fs::write(&root_file, "secret = 1\n").unwrap();
    std::fs::set_permissions(&root_file, std::fs::Permissions::from_mode(0o640)).unwrap();
    let run = |gid: u32, groups: &str| {
        let out = child(
            "s13_2_child",
            &[
                format!("--reuid={DAEMON}"),
                format!("--regid={gid}"),
                format!("--groups={groups}"),
            ],
            &[
                ("ATTACK13_GATEWAY_CONFIG", &config),
                ("ATTACK13_ROOT_FILE", &root_file),
            ],
        )
        .output()
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(stdout.contains("CURRENT"), "child: {out:?}");
        stdout
    };
    // Control: the gateway's user's group, supplementary: refused both ways.
    let out = run(DAEMON, &NOBODY.to_string());
    assert!(
        out.contains("CURRENT refused") && out.contains("WITH_USER refused"),
        "control: {out}"
    );
    // Control: a group of its own alone: passes, root's file unreadable.
    let out = run(DAEMON, &DAEMON.to_string());
    assert!(
        out.contains("CURRENT passed") && out.contains("READS_ROOT_FILE false"),
        "control: {out}"
    );
    // Root's group as a supplementary group (it does read root's file):
    // refused on both paths, root's group named.
    let out = run(DAEMON, "0");
    assert!(
        out.contains("Groups: 0") && out.contains("READS_ROOT_FILE true"),
        "supplementary group 0: {out}"
    );
    for path in ["CURRENT", "WITH_USER"] {
        let line = out
            .lines()
            .find(|l| l.contains(&format!("{path} ")))
            .unwrap_or("");
        assert!(
            line.contains("refused") && line.contains("is root's (gid 0)"),
            "supplementary group 0, {path}: {out}"
        );
    }
    // Root's group as the primary group (a unit's Group=root): refused.
    let out = run(0, &DAEMON.to_string());
    assert!(
        out.contains("Gid: 0 0 0 0") && out.contains("READS_ROOT_FILE true"),
        "primary group 0: {out}"
    );
    for path in ["CURRENT", "WITH_USER"] {
        let line = out
            .lines()
            .find(|l| l.contains(&format!("{path} ")))
            .unwrap_or("");
        assert!(
            line.contains("refused") && line.contains("is root's (gid 0)"),
            "primary group 0, {path}: {out}"
        );
    }
}

/// The gateway binary beside the lib test binary (`cargo build --bin
/// gateway` with the same target directory), if built.
fn gateway_binary() -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("gateway");
    bin.exists().then_some(bin)
}

/// `gateway run --config CONFIG --pid-file PID_FILE` as root, stopped
/// (SIGTERM, as systemd does) once `until` holds or 15 s pass.
fn run_gateway_until(
    bin: &Path,
    config: &Path,
    pid_file: &Path,
    until: impl Fn() -> bool,
) -> (u32, String) {
    let mut gw = std::process::Command::new(bin)
        .arg("run")
        .arg("--config")
        .arg(config)
        .arg("--pid-file")
        .arg(pid_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = gw.id();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !until() && Instant::now() < deadline {
        if gw.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: a signal to the child this test started.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let out = gw.wait_with_output().unwrap();
    (pid, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// S13-3: the S10-1 fix covered the access log only; the pid file, which
/// root writes at every start just before the drop (main.rs
/// `PidFile::write`: unlink what is at the name, then O_CREAT|O_EXCL|
/// O_NOFOLLOW, by path), had no check on the directories above its own.
/// README: "so a directory the user may write cannot turn root's write
/// into one anywhere else". With `--pid-file .../state/run/gateway.pid`
/// and `state` the user's (its StateDirectory= or home), the user swapped
/// `run` for a symlink, and root's next start unlinked the file of that
/// name in any directory and created its own there (root's, 0644, its
/// pid), where the user cannot write. Before the fix (the built binary,
/// `user = "nobody"`): root's `protected/gateway.pid` ("precious", one
/// inode) was replaced by a new file holding the gateway's pid. Now the
/// pid file's directory is reached as the access log's is
/// (`safe_dir::reach_parent`): the start is refused, naming the user's
/// directory, and `protected/gateway.pid` keeps its inode and bytes.
/// Controls: nobody cannot remove the file itself; with the pid file's
/// own directory nobody's (as RuntimeDirectory= makes /run/gateway) and
/// root's above, the pid file is written there and removed at exit;
/// `state/run` a directory of nobody's in nobody's `state` is refused as
/// the access log's directory is, and `protected` is untouched.
#[test]
fn s13_3_a_link_above_the_pid_files_directory_is_refused() {
    use std::os::unix::fs::MetadataExt as _;
    if !is_root() {
        return;
    }
    let Some(bin) = gateway_binary() else {
        eprintln!("skipped: no gateway binary (cargo build --bin gateway)");
        return;
    };
    let d = root_only_tempdir();
    let ca = crate::pki::Authority::root("attack13 CA").unwrap();
    let leaf = ca
        .issue(&crate::pki::LeafSpec::server("gw", &["dns:gw.example"]))
        .unwrap();
    let (cert, key, roots) = (
        d.path().join("s.pem"),
        d.path().join("s.key"),
        d.path().join("ca.pem"),
    );
    std::fs::write(&cert, &leaf.cert_pem).unwrap();
    std::fs::write(&key, &leaf.key_pem).unwrap();
    std::fs::write(&roots, &ca.cert_pem).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&key, Some(NOBODY), Some(NOBODY)).unwrap();
    let config = d.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "user = \"nobody\"\naccess_log = \"off\"\n[admission]\nkernel_block_list = false\n\
             [[listeners]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\ncert = {cert:?}\nkey = {key:?}\nclient_ca = {roots:?}\n\
             [[listeners.routes]]\nname = \"r\"\nserver_names = []\nbackends = [\"127.0.0.1:9\"]\nallow = [\"spiffe://x/y\"]\n"
        ),
    )
    .unwrap();

    let protected = d.path().join("protected");
    mkdir(&protected, 0o755, 0);
    let precious = protected.join("gateway.pid");
    std::fs::write(&precious, "precious\n").unwrap();
    // A second name for root's file, kept out of the way: its inode stays
    // taken (no reuse), and its link count says whether `precious` lost it.
    let keep = d.path().join("keep");
    std::fs::hard_link(&precious, &keep).unwrap();
    let inode = precious.metadata().unwrap().ino();
    // Control: nobody cannot remove it.
    let out = as_nobody(&format!("rm -f {}", precious.display()));
    assert!(!out.status.success(), "control: {out:?}");

    // Control: the pid file's own directory the user's (as systemd's
    // RuntimeDirectory= makes /run/gateway), root's above: written there
    // (and removed at exit, as the gateway's own).
    let runtime = d.path().join("runtime");
    mkdir(&runtime, 0o755, NOBODY);
    let own = runtime.join("gateway.pid");
    let seen = std::sync::Mutex::new(None);
    let (pid, err) = run_gateway_until(&bin, &config, &own, || {
        let now = std::fs::read_to_string(&own).ok();
        let done = now.as_ref().is_some_and(|s| s.ends_with('\n'));
        *seen.lock().unwrap() = now;
        done
    });
    assert_eq!(
        seen.lock().unwrap().clone(),
        Some(format!("{pid}\n")),
        "control: {err}"
    );
    assert!(!own.exists(), "removed at exit");

    let state = d.path().join("state");
    mkdir(&state, 0o755, NOBODY);
    let run = state.join("run");
    mkdir(&run, 0o755, NOBODY);
    let pid_file = run.join("gateway.pid");
    // Control: `state/run` nobody's directory in nobody's `state`: refused
    // (the access log's rule, S10-1), nothing written.
    let (_, err) = run_gateway_until(&bin, &config, &pid_file, || false);
    assert!(err.contains("is reached through a directory user"), "{err}");
    assert!(!pid_file.exists());
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "precious\n");

    // The dropped user swaps `run` for a link to `protected`.
    let out = as_nobody(&format!(
        "rm -rf {r} && ln -s {p} {r}",
        r = run.display(),
        p = protected.display()
    ));
    assert!(out.status.success(), "{out:?}");
    let replaced = || std::fs::read_to_string(&precious).is_ok_and(|s| s != "precious\n");
    let (_, err) = run_gateway_until(&bin, &config, &pid_file, replaced);
    // No harm: the start refused, root's file in `protected` as it was.
    assert!(
        err.contains("cannot write pid file")
            && err.contains("is reached through a directory user"),
        "{err}"
    );
    let meta = precious.metadata().unwrap();
    assert_eq!(meta.ino(), inode, "replaced: {err}");
    assert_eq!(keep.metadata().unwrap().nlink(), 2, "unlinked by root");
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "precious\n");
}

/// S13-4: `not_the_gateways` (the issuer's start, root's or its unit's,
/// with `user` or without) read the gateway's config whole, by path,
/// blocking (`std::fs::read_to_string(gateway_config)`), to learn the
/// `user` and `group` the gateway drops to. A FIFO at that name, which
/// whoever may write the config's directory can put there (a gateway
/// started as its user and owning `/etc/gateway`, the layout whose owner
/// the check names), hung the issuer's start with no end and no log line:
/// the compromised gateway kept SSO from coming back (a link to /dev/zero
/// there grew the issuer's memory without bound). Before the fix:
/// `Target::not_the_gateways` on a FIFO had not returned after 300 ms, and
/// returned (passing) once a writer came and went. Now it is read as a
/// named file is (`safe_dir::read_bounded`): a FIFO or a device there
/// refuses the start at once, the file named. Control: a regular file
/// passes at once.
#[test]
fn s13_4_a_fifo_at_the_gateways_config_refuses_the_issuers_start_at_once() {
    let d = tempfile::tempdir().unwrap();
    let issuer = Target {
        user: "gw-issuer-13".into(),
        uid: 4313,
        gid: 4313,
        groups: Vec::new(),
        kept: Vec::new(),
    };
    let config = d.path().join("gateway.toml");
    let check = |path: &Path| {
        let (issuer, path) = (issuer.clone(), path.to_owned());
        std::thread::spawn(move || issuer.not_the_gateways(&path))
    };
    // Control: a regular file: at once.
    std::fs::write(&config, "user = \"nobody\"\n").unwrap();
    let t = check(&config);
    std::thread::sleep(Duration::from_millis(300));
    assert!(t.is_finished(), "control: a regular file");
    t.join().unwrap().unwrap();

    std::fs::remove_file(&config).unwrap();
    let c = std::ffi::CString::new(config.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let t = check(&config);
    std::thread::sleep(Duration::from_millis(300));
    if !t.is_finished() {
        // Release it (a writer that writes nothing and goes) before failing.
        drop(
            std::fs::OpenOptions::new()
                .write(true)
                .open(&config)
                .unwrap(),
        );
        panic!("the issuer's check still waits on a FIFO after 300 ms");
    }
    let e = t.join().unwrap().unwrap_err().to_string();
    assert!(
        e.contains(&config.display().to_string()) && e.contains("a FIFO"),
        "{e}"
    );

    // A link to /dev/zero: a device, refused, nothing read.
    std::fs::remove_file(&config).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &config).unwrap();
    let e = issuer.not_the_gateways(&config).unwrap_err().to_string();
    assert!(e.contains("a device"), "{e}");
}

//! Attacker review 10 (s7/review10, see /work/helpers/s7/review10/findings.md):
//! the S9-1..S9-5 fixes (39454b5, fe20b13, fa4bddc, 059bf48). Each test
//! asserts the HARM (it passes on the code as reviewed) beside a control,
//! and is meant to be turned round into the refusal once fixed.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;

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

fn mkdir(p: &Path, mode: u32) {
    std::fs::create_dir(p).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
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

/// The user a root start with `user = "nobody"` drops to.
fn nobody_target() -> Target {
    Target::alone("nobody").unwrap()
}

/// S10-1: fe20b13 opens the access log O_NOFOLLOW, which guards the last
/// component only. When the log sits one directory (or more) below a
/// directory the dropped user may write (`access_log =
/// "/var/lib/gateway/log/access.log"`, the user's state or home
/// directory), the user replaces that middle directory by a symlink, and
/// root, at the next start, creates and appends to `access.log` in any
/// directory it names. README ("a link the dropped user planted there is
/// refused, never made the file root writes to") said more than that.
/// Before the fix: nobody swapped `state/log` for `state/log ->
/// protected`; `AccessLog::check` and `AccessLog::open` as root succeeded
/// and `protected/access.log` appeared, root's, where nobody cannot write.
/// Fixed: a log whose directory is reached through a directory the user
/// it drops to may write (its own directory aside) is refused at `check`
/// and at open, before and after the swap, the directory named; through a
/// root-made link too (the path as the kernel resolves it). Controls:
/// nobody cannot create the victim itself; a log directory of nobody's in
/// root's directory (LogsDirectory=) is the log; a link at the log's own
/// name is still refused.
#[tokio::test]
async fn s10_1_root_follows_a_symlink_the_user_put_above_the_access_logs_name() {
    if !is_root() {
        return;
    }
    let d = root_only_tempdir();
    let protected = d.path().join("protected");
    mkdir(&protected, 0o755);
    let victim = protected.join("access.log");
    // Control: nobody cannot make the victim itself.
    let out = as_nobody(&format!("touch {}", victim.display()));
    assert!(!out.status.success(), "control: {out:?}");

    // Control: the log's own directory nobody's, in root's (the
    // LogsDirectory= layout): the log is made there.
    let logs = d.path().join("logs");
    mkdir(&logs, 0o755);
    std::os::unix::fs::chown(&logs, Some(NOBODY), Some(NOBODY)).unwrap();
    let own = logs.join("access.log");
    check_log(&own).unwrap();
    drop(open_log(&own).unwrap());
    assert!(own.symlink_metadata().unwrap().is_file());
    // Control: a link at the log's own name is refused (fe20b13 holds).
    std::fs::remove_file(&own).unwrap();
    let out = as_nobody(&format!("ln -s {} {}", victim.display(), own.display()));
    assert!(out.status.success(), "{out:?}");
    assert!(open_log(&own).is_err(), "control: the link at the name");
    assert!(!victim.exists());

    // The log one directory below nobody's: refused before any swap.
    let state = d.path().join("state");
    mkdir(&state, 0o755);
    std::os::unix::fs::chown(&state, Some(NOBODY), Some(NOBODY)).unwrap();
    let logdir = state.join("log");
    mkdir(&logdir, 0o755);
    std::os::unix::fs::chown(&logdir, Some(NOBODY), Some(NOBODY)).unwrap();
    let log = logdir.join("access.log");
    let refused = |e: crate::access_log::AccessLogError| {
        let e = e.to_string();
        assert!(
            e.contains("is reached through a directory user \"nobody\"")
                && e.contains(&format!("{} belongs to uid {NOBODY}", state.display())),
            "{e}"
        );
    };
    refused(check_log(&log).unwrap_err());
    refused(open_log(&log).err().expect("open refused"));
    assert!(!log.exists());
    // Reached through a root-made link in root's directory: the same.
    let link = d.path().join("link");
    std::os::unix::fs::symlink(&logdir, &link).unwrap();
    refused(check_log(&link.join("access.log")).unwrap_err());

    // The dropped user swaps the directory above the log for a link.
    let out = as_nobody(&format!(
        "rm -rf {l} && ln -s {p} {l}",
        l = logdir.display(),
        p = protected.display()
    ));
    assert!(out.status.success(), "{out:?}");
    // `gateway check` and `gateway run` both refuse; nothing is made.
    refused(check_log(&log).unwrap_err());
    refused(open_log(&log).err().expect("open refused"));
    assert!(
        victim.symlink_metadata().is_err(),
        "root made access.log in the protected directory"
    );
}

/// S10-3: a FIFO at the log's name is taken (fe20b13: "a regular file of
/// one name, or a FIFO"), opened for writing without O_NONBLOCK, which
/// blocks until someone reads. The dropped user plants one with mkfifo in
/// its log directory: root's next `gateway check` (and `gateway run`)
/// hangs at the open instead of failing (read_private opens O_NONBLOCK
/// for exactly this). Measured: `AccessLog::check` as root has not
/// returned after 300 ms; it returns once the test opens a reader.
/// Control: a regular file at the name returns at once. Fixed: the log is
/// opened O_NONBLOCK (blocking again once open, for a FIFO): a FIFO no one
/// reads fails at once, naming it; one with a reader is taken.
#[test]
fn s10_3_a_fifo_the_user_plants_at_the_logs_name_hangs_roots_start() {
    if !is_root() {
        return;
    }
    let d = root_only_tempdir();
    let logs = d.path().join("logs");
    mkdir(&logs, 0o755);
    std::os::unix::fs::chown(&logs, Some(NOBODY), Some(NOBODY)).unwrap();
    let log = logs.join("access.log");
    let check = |log: &Path| {
        let log = log.to_owned();
        std::thread::spawn(move || {
            crate::access_log::AccessLog::check(log.to_str().unwrap(), Path::new("/"), None)
        })
    };
    // Control: the user's regular file: returns at once.
    let out = as_nobody(&format!("touch {}", log.display()));
    assert!(out.status.success(), "{out:?}");
    let t = check(&log);
    std::thread::sleep(Duration::from_millis(300));
    assert!(t.is_finished(), "control: a regular file");
    t.join().unwrap().unwrap();
    std::fs::remove_file(&log).unwrap();

    let out = as_nobody(&format!("mkfifo {}", log.display()));
    assert!(out.status.success(), "{out:?}");
    let t = check(&log);
    std::thread::sleep(Duration::from_millis(300));
    assert!(t.is_finished(), "root's check did not block on the FIFO");
    let e = t.join().unwrap().unwrap_err();
    assert!(e.to_string().contains("a FIFO no one reads"), "{e}");
    // With a reader (a log reader's pipe), it is taken.
    use std::os::unix::fs::OpenOptionsExt as _;
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&log)
        .unwrap();
    check(&log).join().unwrap().unwrap();
}

/// Child side of S10-2: run as another user (by `setpriv`), prints
/// whether `Target::current().not_the_gateways` refuses, and this
/// process's groups. Ignored: only the parent test runs it.
#[test]
#[ignore]
fn s10_2_child() {
    let Ok(config) = std::env::var("ATTACK10_GATEWAY_CONFIG") else {
        return;
    };
    let target = Target::current().unwrap();
    let verdict = match target.not_the_gateways(Path::new(&config)) {
        Ok(()) => "VERDICT passed".to_owned(),
        Err(e) => format!("VERDICT refused: {e}"),
    };
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let groups = status
        .lines()
        .find(|l| l.starts_with("Groups:"))
        .unwrap_or("")
        .to_owned();
    println!("{verdict}\n{groups}\nCURRENT groups={:?}", target.groups);
}

/// S10-2: 39454b5 refused an issuer started (without `user`) as a user
/// that "shares the gateway's group", but `Target::current` knew only
/// the effective gid (`groups: Vec::new()`) and `not_the_gateways`
/// compared only `gid`. A unit (User=gateway-issuer) runs the issuer with
/// that user's supplementary groups (initgroups); one of them the
/// gateway's group passed. Nor was a supplementary group of the gateway's
/// user compared (the gateway keeps its user's groups after the drop).
/// docs/sso.md: "the user is the gateway's, or shares its group".
/// Before the fix (the lib test binary re-run as the child through
/// setpriv): gateway.toml names user = "nobody" (primary group 65534). As
/// uid 1 gid 1 with supplementary group 65534: passed, while /proc said
/// Groups 65534 and `Target::current().groups` was `[]`. Fixed:
/// `Target::current` reads the process's groups (getgroups), and any
/// group of the issuer's (primary or supplementary) that is one of the
/// gateway's user's (primary or supplementary), its `group` or the
/// config's group is refused, the group named (the gateway user's
/// supplementary groups and the `user` path's group database:
/// `privilege::tests::a_group_shared_with_the_gateway_as_a_supplementary_one_is_refused`).
/// Control: as uid 1 with gid 65534: refused; as uid 1 with gid 1 and no
/// other group: passes.
#[test]
fn s10_2_the_issuer_in_the_gateways_group_as_a_supplementary_group_passes() {
    // With `user`, the issuer is checked in the groups its user's unit
    // gives it (the privilege test has that path's cases).
    let main = include_str!("../../main.rs");
    let start = main.find("fn issuer(path").unwrap();
    let body = &main[start..start + main[start..].find("None => {").unwrap()];
    assert!(
        body.contains(".in_its_groups()?\n                .not_the_gateways("),
        "{body}"
    );
    if !is_root()
        || std::process::Command::new("setpriv")
            .arg("--version")
            .output()
            .is_err()
    {
        return;
    }
    let d = root_only_tempdir();
    let config = d.path().join("gateway.toml");
    std::fs::write(&config, "user = \"nobody\"\n").unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let run = |gid: u32, groups: &str| {
        let out = std::process::Command::new("setpriv")
            .arg(format!("--reuid={DAEMON}"))
            .arg(format!("--regid={gid}"))
            .arg(format!("--groups={groups}"))
            .arg(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "issuer::tests::attack10::s10_2_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("ATTACK10_GATEWAY_CONFIG", &config)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(stdout.contains("VERDICT"), "child: {out:?}");
        stdout
    };
    // Control: the gateway's user's group as the primary group: refused.
    let out = run(NOBODY, &DAEMON.to_string());
    assert!(out.contains("VERDICT refused"), "control: {out}");
    // Control: a group of its own alone: passes.
    let out = run(DAEMON, &DAEMON.to_string());
    assert!(out.contains("VERDICT passed"), "control: {out}");
    // The same group as a supplementary one: refused, the group named.
    let out = run(DAEMON, &NOBODY.to_string());
    assert!(
        out.contains("VERDICT refused")
            && out.contains("drops to user = \"nobody\", which is in group 65534, and so is it"),
        "a supplementary group shared: {out}"
    );
    assert!(out.contains("CURRENT groups=[65534]"), "{out}");
}

/// S10-4 (a legitimate setup now refused): fe20b13's O_NOFOLLOW refuses
/// every symlink at the log's name, not only one the dropped user could
/// plant: `access_log = "/dev/stdout"` (a container habit; /dev/stdout is
/// a link to /proc/self/fd/1), and an operator's link in a directory only
/// root may write (`/var/log/gateway/access.log -> /data/...`), both of
/// which started before. Measured: `AccessLog::check` refused both with
/// "never followed". Control: "stdout" and the link's target itself pass.
/// Fixed: "/dev/stdout" and "/dev/stderr" are the streams; a link at the
/// log's name is followed while it sits in a directory only root may
/// write (a link in the user's is still refused, attack9::s9_5_*).
#[test]
fn s10_4_a_root_made_link_or_dev_stdout_as_the_log_is_refused() {
    use crate::access_log::AccessLog;
    if !is_root() {
        return;
    }
    AccessLog::check("stdout", Path::new("/"), None).unwrap();
    AccessLog::check("/dev/stdout", Path::new("/"), None).unwrap();

    let d = root_only_tempdir();
    let data = d.path().join("data");
    mkdir(&data, 0o755);
    let real = data.join("access.log");
    std::fs::write(&real, "").unwrap();
    let logs = d.path().join("logs");
    mkdir(&logs, 0o755);
    let link = logs.join("access.log");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    // Control: the target itself, in root's directory, is a log.
    AccessLog::check(real.to_str().unwrap(), Path::new("/"), None).unwrap();
    // The root-made link in a root-only directory is the log.
    AccessLog::check(link.to_str().unwrap(), Path::new("/"), None).unwrap();
}

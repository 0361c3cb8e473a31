//! The gateway binary as a child process: reaped if a test fails, signalled,
//! scraped, its log and memory read from outside.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::STEP;

/// Kills the child if the test fails before it is reaped.
pub struct Reap(pub Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends `signal` ("TERM", "HUP") to the gateway.
pub fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{signal} failed");
}

/// How the child exited, waiting at most `STEP`; panics naming `after`.
pub fn exit_status(child: &mut Child, after: &str) -> std::process::ExitStatus {
    let until = Instant::now() + STEP;
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return s;
        }
        assert!(Instant::now() < until, "no exit after {after}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET /metrics` from an admin endpoint at `admin`.
pub async fn scrape(admin: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(admin)
        .await
        .expect("admin connect");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n")
        .await
        .expect("request");
    let mut out = String::new();
    tokio::time::timeout(STEP, s.read_to_string(&mut out))
        .await
        .expect("admin answered")
        .expect("admin response");
    out
}

/// The value of one series (name and labels exactly as rendered) in a
/// scrape; 0 when it is not there.
pub fn series(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

/// How many JSON log lines with this message the gateway has written.
pub fn log_count(stderr: &Path, message: &str) -> usize {
    std::fs::read_to_string(stderr)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == message)
        .count()
}

/// Polls `done` every 50 ms for up to a step.
pub fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + STEP;
    while !done() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The resident set of process `pid` in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"))
}

/// Waits up to `limit` for the child to exit, and returns its status.
pub fn exits_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let until = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return Some(s);
        }
        if Instant::now() > until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The binary's admin address, from its "admin endpoint" log line.
pub fn admin_addr(stderr: &Path) -> SocketAddr {
    let mut found = None;
    wait_for("the admin endpoint's log line", || {
        let log = std::fs::read_to_string(stderr).unwrap_or_default();
        found = log.lines().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            v["fields"]["message"]
                .as_str()?
                .starts_with("admin endpoint")
                .then(|| v["fields"]["addr"].as_str()?.parse().ok())?
        });
        found.is_some()
    });
    found.unwrap()
}

/// `gateway rollout report --admin ADMIN ARGS` with the built binary:
/// (exit code, stdout, stderr).
pub fn rollout_report(admin: SocketAddr, args: &[&str]) -> (i32, String, String) {
    let admin = admin.to_string();
    let mut all = vec!["rollout", "report", "--admin", &admin];
    all.extend(args);
    cli(&all)
}

/// The address the binary says it listens on (its stderr), once it does.
pub fn wait_listening(stderr: &Path) -> SocketAddr {
    crate::listening_addr(stderr).unwrap_or_else(|e| panic!("{e}"))
}

/// `gateway --log-format json run --config CONFIG EXTRA…`, its stderr in
/// `stderr`.
pub fn run_binary(config: &Path, stderr: &Path, extra: &[&std::ffi::OsStr]) -> Reap {
    let child = Command::new(crate::gateway_binary())
        .args(["--log-format", "json", "run", "--config"])
        .arg(config)
        .args(extra)
        .stderr(std::fs::File::create(stderr).unwrap())
        .spawn()
        .unwrap();
    Reap(child)
}

/// Every thread of process `pid`: (Uid line, Gid line, CapPrm, CapEff).
pub fn credentials_of(pid: u32) -> Vec<(String, String, u64, u64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(status) = std::fs::read_to_string(task.unwrap().path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        let mask = |name: &str| u64::from_str_radix(&field(name), 16).unwrap();
        out.push((
            field("Uid:"),
            field("Gid:"),
            mask("CapPrm:"),
            mask("CapEff:"),
        ));
    }
    out
}

/// Hands the PKI's files to `nobody`, as an operator hands the gateway's
/// keys to its user; the directory and the config (`gateway.toml`) stay
/// root's and writable by root alone: a start as root refuses a config the
/// user it drops to could rewrite.
pub fn give_to_nobody(pki: &crate::Pki) {
    use std::os::unix::fs::PermissionsExt as _;
    let status = Command::new("chown")
        .args(["-R", "nobody:"])
        .arg(pki.path(""))
        .status()
        .unwrap();
    assert!(status.success());
    let mut root_s = vec![pki.path("")];
    if pki.path("gateway.toml").exists() {
        root_s.push(pki.path("gateway.toml"));
    }
    let status = Command::new("chown")
        .arg("root:")
        .args(&root_s)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::set_permissions(pki.path(""), std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Whether the user database knows `name` (a busybox VM has none).
pub fn user_exists(name: &str) -> bool {
    std::fs::read_to_string("/etc/passwd")
        .is_ok_and(|p| p.lines().any(|l| l.split(':').next() == Some(name)))
}

/// `gateway ARGS` with the built binary: (exit code, stdout, stderr).
pub fn cli<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (i32, String, String) {
    let out = Command::new(crate::gateway_binary())
        .args(args)
        .output()
        .expect("gateway runs");
    (
        out.status.code().expect("exited"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

//! The gateway under systemd, as systemd sees it: the `sd_notify` messages
//! of a `Type=notify-reload` service (read off a fake `NOTIFY_SOCKET`), and
//! `examples/gateway.service` as `systemd-analyze` judges it.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use gateway_tests::process::*;
use gateway_tests::*;

/// The next datagram, as the `KEY=value` lines systemd would read.
fn next_message(sock: &UnixDatagram, log: &Path) -> Vec<String> {
    let mut buf = vec![0u8; 4096];
    let n = sock.recv(&mut buf).unwrap_or_else(|e| {
        panic!(
            "no sd_notify message ({e}); gateway log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        )
    });
    String::from_utf8(buf[..n].to_vec())
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn value<'a>(message: &'a [String], key: &str) -> Option<&'a str> {
    message
        .iter()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// CLOCK_MONOTONIC as systemd reads MONOTONIC_USEC, approximated by
/// /proc/uptime (the same clock while the machine does not suspend).
fn uptime_usec() -> u64 {
    let text = std::fs::read_to_string("/proc/uptime").unwrap();
    let secs: f64 = text.split_whitespace().next().unwrap().parse().unwrap();
    (secs * 1e6) as u64
}

fn assert_reloading(message: &[String]) -> u64 {
    assert_eq!(value(message, "RELOADING"), Some("1"), "{message:?}");
    let usec: u64 = value(message, "MONOTONIC_USEC")
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC: {message:?}"))
        .parse()
        .unwrap();
    let now = uptime_usec();
    assert!(
        usec.abs_diff(now) < 5_000_000,
        "MONOTONIC_USEC {usec} is CLOCK_MONOTONIC ({now})"
    );
    usec
}

#[test]
fn sd_notify_ready_reloading_ready_stopping() {
    let pki = Pki::new();
    let backend = dead_port();
    let toml = format!(
        "access_log = \"off\"\nwatch_files = false\ndrain_timeout = \"5s\"\n{}{}",
        listener_toml(&pki, "edge", ""),
        route_toml("plain", &[], &[backend], &[SPIFFE_FRONTEND])
    );
    let config = pki.write("gateway.toml", &toml);
    let socket_path = pki.path("notify.sock");
    let sock = UnixDatagram::bind(&socket_path).unwrap();
    sock.set_read_timeout(Some(STEP)).unwrap();
    let log = pki.path("gateway.stderr");
    let child = Command::new(gateway_binary())
        .args(["--log-format", "json", "run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut gw = Reap(child);

    let ready = next_message(&sock, &log);
    assert_eq!(value(&ready, "READY"), Some("1"), "{ready:?}");
    assert_eq!(value(&ready, "STATUS"), Some("serving 1 listener(s)"));
    // READY=1 means serving: the listener takes connections now.
    let addr = listening_addr(&log).unwrap();
    std::net::TcpStream::connect(addr).expect("listening when READY=1 arrives");

    signal(&gw.0, "HUP");
    let first = assert_reloading(&next_message(&sock, &log));
    let done = next_message(&sock, &log);
    assert_eq!(value(&done, "READY"), Some("1"), "{done:?}");
    let status = value(&done, "STATUS").unwrap();
    assert!(
        status.starts_with("last reload ") && status.ends_with(": applied"),
        "{status}"
    );

    // A broken config: the reload is refused, the gateway still serves and
    // says so.
    std::fs::write(&config, toml.replace("backends", "backend")).unwrap();
    signal(&gw.0, "HUP");
    let second = assert_reloading(&next_message(&sock, &log));
    assert!(second > first, "each reload has its own timestamp");
    let done = next_message(&sock, &log);
    assert_eq!(value(&done, "READY"), Some("1"), "{done:?}");
    let status = value(&done, "STATUS").unwrap();
    assert!(
        status.contains("refused, running state kept") && status.contains("backend"),
        "{status}"
    );

    signal(&gw.0, "TERM");
    let stopping = next_message(&sock, &log);
    assert_eq!(value(&stopping, "STOPPING"), Some("1"), "{stopping:?}");
    assert_eq!(
        value(&stopping, "STATUS"),
        Some("draining 0 live connection(s)")
    );
    let status = exit_status(&mut gw.0, "SIGTERM");
    assert!(status.success(), "{status}");
}

fn unit_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/gateway.service")
}

/// `systemd-analyze` from `SYSTEMD_ANALYZE` or PATH, if it is `min` or
/// newer: 253 knows `Type=notify-reload`, 250 `security --offline`.
fn systemd_analyze(test: &str, min: u32) -> Option<PathBuf> {
    let bin = std::env::var_os("SYSTEMD_ANALYZE")
        .map(PathBuf::from)
        .unwrap_or_else(|| "systemd-analyze".into());
    let Ok(out) = Command::new(&bin).arg("--version").output() else {
        eprintln!(
            "SKIP {test}: no systemd-analyze (apt-get install systemd, or set SYSTEMD_ANALYZE)"
        );
        return None;
    };
    let version: u32 = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    if version < min {
        eprintln!(
            "SKIP {test}: systemd-analyze {version} is older than {min} (253: Type=notify-reload); \
             set SYSTEMD_ANALYZE to a newer one (bookworm-backports' systemd)"
        );
        return None;
    }
    Some(bin)
}

/// The unit as installed, but starting the binary this test built, and the
/// man page its Documentation= names where `man` finds it.
fn unit_in(dir: &Path) -> (PathBuf, PathBuf) {
    let unit = std::fs::read_to_string(unit_file())
        .unwrap()
        .replace("/usr/bin/gateway", &gateway_binary().display().to_string());
    let path = dir.join("gateway.service");
    std::fs::write(&path, unit).unwrap();
    let man = dir.join("man/man1");
    std::fs::create_dir_all(&man).unwrap();
    let page = Command::new(gateway_binary()).arg("man").output().unwrap();
    assert!(page.status.success());
    std::fs::write(man.join("gateway.1"), page.stdout).unwrap();
    (path, dir.join("man"))
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let Some(analyze) = systemd_analyze("the_unit_passes_systemd_analyze_verify", 253) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (unit, manpath) = unit_in(dir.path());
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&unit)
        .env("MANPATH", manpath)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // verify reports some problems (an unknown setting, a bad value) as
    // warnings only: none is acceptable.
    assert!(stderr.trim().is_empty(), "{stderr}");
}

#[test]
fn the_unit_is_hardened_to_exposure_4_or_lower() {
    let Some(analyze) = systemd_analyze("the_unit_is_hardened_to_exposure_4_or_lower", 250) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (unit, _) = unit_in(dir.path());
    let out = Command::new(analyze)
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level:\n{stdout}"));
    let level: f64 = line
        .split(':')
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    eprintln!("{}", line.trim());
    assert!(level <= 4.0, "{line}");
    // Exactly the default features' capability: binding ports below 1024.
    let unit = std::fs::read_to_string(unit_file()).unwrap();
    let caps: Vec<&str> = unit
        .lines()
        .filter(|l| {
            l.starts_with("CapabilityBoundingSet=") || l.starts_with("AmbientCapabilities=")
        })
        .collect();
    assert_eq!(
        caps,
        [
            "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
            "AmbientCapabilities=CAP_NET_BIND_SERVICE"
        ]
    );
}

/// `examples/systemd-user/`: the timer and service that renew a user's
/// single sign-on certificate (docs/sso.md) are valid units. Verified as
/// system units: `--user` needs a user manager, which a CI runner lacks;
/// the units use nothing that differs between the two.
#[test]
fn the_sso_renewal_timer_and_service_pass_systemd_analyze_verify() {
    let Some(analyze) = systemd_analyze(
        "the_sso_renewal_timer_and_service_pass_systemd_analyze_verify",
        250,
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (_, manpath) = unit_in(dir.path());
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/systemd-user");
    for name in ["gateway-login.service", "gateway-login.timer"] {
        let unit = std::fs::read_to_string(examples.join(name))
            .unwrap()
            .replace("/usr/bin/gateway", &gateway_binary().display().to_string());
        std::fs::write(dir.path().join(name), unit).unwrap();
    }
    let out = Command::new(analyze)
        .arg("verify")
        .arg(dir.path().join("gateway-login.service"))
        .arg(dir.path().join("gateway-login.timer"))
        .env("MANPATH", manpath)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.trim().is_empty(), "{stderr}");
    // What the service runs is what `gateway login` takes.
    let unit = std::fs::read_to_string(examples.join("gateway-login.service")).unwrap();
    let exec = unit
        .split("ExecStart=/usr/bin/gateway ")
        .nth(1)
        .unwrap()
        .split("\n# ")
        .next()
        .unwrap()
        .replace("\\\n", " ");
    let args: Vec<&str> = exec.split_whitespace().collect();
    let out = Command::new(gateway_binary())
        .args(args.iter().map(|a| a.replace("%h", "/nonexistent")))
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{exec}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `examples/gateway-issuer.service` (docs/sso.md): a valid unit, hardened
/// like the gateway's, and what it runs is what `gateway issuer` takes.
#[test]
fn the_issuer_unit_passes_verify_and_is_hardened_to_exposure_4_or_lower() {
    let Some(analyze) = systemd_analyze(
        "the_issuer_unit_passes_verify_and_is_hardened_to_exposure_4_or_lower",
        250,
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (_, manpath) = unit_in(dir.path());
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/gateway-issuer.service");
    let text = std::fs::read_to_string(&source).unwrap();
    let unit = dir.path().join("gateway-issuer.service");
    std::fs::write(
        &unit,
        text.replace("/usr/bin/gateway", &gateway_binary().display().to_string()),
    )
    .unwrap();
    let out = Command::new(&analyze)
        .arg("verify")
        .arg(&unit)
        .env("MANPATH", manpath)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.trim().is_empty(), "{stderr}");
    let out = Command::new(&analyze)
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level:\n{stdout}"));
    let level: f64 = line
        .split(':')
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(level <= 4.0, "{line}");
    let exec = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart=/usr/bin/gateway "))
        .unwrap();
    let out = Command::new(gateway_binary())
        .args(exec.split_whitespace())
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{exec}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

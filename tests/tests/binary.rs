//! The built `gateway` binary, driven as an operator would: `check`, `run`,
//! `openssl s_client` through it, SIGTERM.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gateway_tests::process::*;
use gateway_tests::*;

fn openssl_available() -> bool {
    Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A config on disk for the binary, on an ephemeral port.
fn write_config(pki: &Pki, backend: std::net::SocketAddr) -> std::path::PathBuf {
    let toml = format!(
        "access_log = \"{}\"\ndrain_timeout = \"5s\"\n",
        pki.path("access.log").display()
    ) + &listener_toml(pki, "edge", "")
        + &route_toml("plain", &[], &[backend], &[SPIFFE_FRONTEND]);
    pki.write("gateway.toml", &toml)
}

/// `run_binary` with its stderr in the PKI's `gateway.stderr`, once it
/// listens.
fn run_listening(pki: &Pki, config: &std::path::Path) -> (Reap, std::net::SocketAddr) {
    let gw = run_binary(config, &pki.path("gateway.stderr"), &[]);
    (gw, wait_listening(&pki.path("gateway.stderr")))
}

/// `gateway COMMAND --config CONFIG`, run to its end.
fn gateway_on(command: &str, config: &std::path::Path) -> std::process::Output {
    Command::new(gateway_binary())
        .args([command, "--config"])
        .arg(config)
        .output()
        .unwrap()
}

/// The soft and hard "Max open files" of process `pid`.
fn nofile_of(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

/// The gateway raises its open-files soft limit to the hard limit at start.
#[tokio::test]
async fn the_open_files_soft_limit_is_raised_to_the_hard_limit() {
    let pki = Pki::new();
    let config = write_config(&pki, dead_port());
    let (gw, _) = run_with_nofile(&pki, &config, 256, 4096);
    assert_eq!(nofile_of(gw.0.id()), (4096, 4096));
}

/// With its descriptors used up, the gateway keeps running: a connection
/// it has no descriptor for is accepted with the listener's reserve and
/// reset at once (a refusal the client sees, counted as
/// `out_of_descriptors`, logged a bounded number of times), and once
/// descriptors are back it serves again.
#[tokio::test]
async fn running_out_of_descriptors_refuses_counted_and_recovers() {
    use gateway_tests::attack::*;
    const ORDERS: &str = "orders.example.internal";
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let admin = dead_port();
    let toml = format!("access_log = \"off\"\nadmin = \"{admin}\"\nworkers = 1\n")
        + &listener_toml(
            &pki,
            "edge",
            "handshake_timeout = \"60s\"\nhandshake_grace = \"60s\"",
        )
        + &route_toml("orders", &[ORDERS], &[backend.addr], &[SPIFFE_FRONTEND])
        + "\n[admission]\nlog_every = \"60s\"\n";
    let config = pki.write("gateway.toml", &toml);
    let (mut gw, addr) = run_with_nofile(&pki, &config, 64, 64);
    // Idle handshakes hold two descriptors each (the socket, and its
    // duplicate watched for progress): 100 of them are more than 64.
    let mut idle = Vec::new();
    let mut reset = 0;
    for _ in 0..100 {
        // The reset may come before connect() returns.
        match tcp_from("127.0.4.1", addr).await {
            Ok(s) => idle.push(s),
            Err(_) => reset += 1,
        }
    }
    for s in &mut idle {
        if closed_within(s, Duration::from_millis(200)).await.is_some() {
            reset += 1;
        }
    }
    assert!(
        (30..100).contains(&reset),
        "{reset} of 100 reset: the descriptors should have run out part way"
    );
    assert!(
        allowed_from(&pki, ORDERS, "127.0.0.1", addr).await.is_err(),
        "served with no descriptor left"
    );
    assert!(gw.0.try_wait().unwrap().is_none(), "the gateway exited");
    drop(idle);
    tokio::time::sleep(Duration::from_millis(500)).await;
    allowed_from(&pki, ORDERS, "127.0.0.1", addr).await.unwrap();
    let metrics = scrape(admin).await;
    let counted: u64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "gateway_connections_refused_total{listener=\"edge\",reason=\"out_of_descriptors\"}",
            )?
            .trim()
            .parse()
            .ok()
        })
        .unwrap_or(0);
    // Every reset idle connection, and the allowed client's attempt.
    assert_eq!(counted, reset + 1, "{metrics}");
    let log = std::fs::read_to_string(pki.path("gateway.stderr")).unwrap();
    let lines = log
        .lines()
        .filter(|l| l.contains("out_of_descriptors"))
        .count();
    assert!(
        lines <= 2,
        "{lines} log lines for {counted} refusals:\n{log}"
    );
}

/// `run_listening` with `RLIMIT_NOFILE` set to (soft, hard) for the
/// gateway (through util-linux `prlimit`, which execs it).
fn run_with_nofile(
    pki: &Pki,
    config: &std::path::Path,
    soft: u64,
    hard: u64,
) -> (Reap, std::net::SocketAddr) {
    let child = Command::new("prlimit")
        .arg(format!("--nofile={soft}:{hard}"))
        .arg("--")
        .arg(gateway_binary())
        .args(["--log-format", "json", "run", "--config"])
        .arg(config)
        .stderr(std::fs::File::create(pki.path("gateway.stderr")).unwrap())
        .spawn()
        .unwrap();
    (Reap(child), wait_listening(&pki.path("gateway.stderr")))
}

#[tokio::test]
async fn check_accepts_a_good_config_and_names_a_typo() {
    let pki = Pki::new();
    let config = write_config(&pki, dead_port());
    let out = gateway_on("check", &config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));

    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("backends", "backend");
    std::fs::write(&config, text).unwrap();
    let out = gateway_on("check", &config);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("gateway.toml")
            && err.contains("listeners[0].routes[0]")
            && err.contains("backend"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn openssl_s_client_through_the_binary_then_sigterm_drains_and_exits_0() {
    if !openssl_available() {
        panic!("openssl is not installed: run `cargo xtask setup`");
    }
    let pki = Pki::new();
    let (backend, accepted) = one_line_backend().await;
    let config = write_config(&pki, backend);
    let (mut gw, addr) = run_listening(&pki, &config);
    let gw_log = || std::fs::read_to_string(pki.path("gateway.stderr")).unwrap_or_default();
    let frontend = pki.frontend();

    let ca = pki.path("server-roots.pem");
    let creds = Some((frontend.cert_path.clone(), frontend.key_path.clone()));
    let (stdout, stderr) = tokio::task::spawn_blocking({
        let ca = ca.clone();
        move || s_client(addr, ca, creds, "hello through openssl\n")
    })
    .await
    .unwrap();
    assert_eq!(
        stdout,
        "hello through openssl\n",
        "s_client: {stderr}\ngateway: {}",
        gw_log()
    );

    let (stdout, stderr) =
        tokio::task::spawn_blocking(move || s_client(addr, ca, None, "no cert\n"))
            .await
            .unwrap();
    assert!(stdout.is_empty(), "refused client got data: {stdout}");
    assert!(
        stderr.contains("certificate required"),
        "openssl should name the alert: {stderr}"
    );
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "only the client with a certificate reached the backend"
    );

    // SIGTERM: drains (nothing live), exits 0.
    signal(&gw.0, "TERM");
    let status = exit_status(&mut gw.0, "SIGTERM");
    assert!(status.success(), "exit status after SIGTERM: {status}");

    let log = std::fs::read_to_string(pki.path("access.log")).unwrap();
    let records: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 2, "{log}");
    assert_eq!(records[0]["verdict"], "allow");
    assert_eq!(records[0]["client_to_backend_bytes"], 22);
    assert_eq!(records[1]["verdict"], "deny");
    assert_eq!(records[1]["reason"], "client presented no certificate");
}

/// `openssl s_client` as a user would run it; stdin closes after `input`, so
/// s_client sends close_notify and prints whatever came back.
fn s_client(
    addr: std::net::SocketAddr,
    ca: std::path::PathBuf,
    creds: Option<(std::path::PathBuf, std::path::PathBuf)>,
    input: &str,
) -> (String, String) {
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-quiet",
        "-verify_return_error",
        "-connect",
        &addr.to_string(),
    ])
    .args(["-servername", "orders.example.internal", "-CAfile"])
    .arg(ca);
    if let Some((cert, key)) = creds {
        // -cert sends only the leaf; -cert_chain adds the intermediate.
        cmd.arg("-cert")
            .arg(&cert)
            .arg("-cert_chain")
            .arg(&cert)
            .arg("-key")
            .arg(key);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl s_client starts");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A backend that answers one line with the same line and closes, as a user
/// trying the gateway by hand would set up: s_client exits when it closes.
async fn one_line_backend() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut s = tokio::io::BufReader::new(s);
                let mut line = String::new();
                if s.read_line(&mut line).await.is_ok() {
                    let _ = s.get_mut().write_all(line.as_bytes()).await;
                }
                let _ = s.get_mut().shutdown().await;
            });
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_and_changed_files_reload_the_running_binary() {
    let pki = Pki::new();
    let (backend, _) = one_line_backend().await;
    let config = write_config(&pki, backend);
    let allowing = std::fs::read_to_string(&config).unwrap();
    let stderr = pki.path("gateway.stderr");
    let gw = run_binary(&config, &stderr, &[]);
    let addr = wait_listening(&stderr);
    let client = pki.frontend_config();
    let sni = "orders.example.internal";
    let tls = connect(addr, sni, client.clone()).await.unwrap();
    assert_eq!(
        echo_roundtrip(tls, b"hi\n".to_vec()).await.unwrap(),
        b"hi\n"
    );

    // SIGHUP after taking the frontend off the allow list.
    std::fs::write(&config, allowing.replace(SPIFFE_FRONTEND, SPIFFE_OTHER)).unwrap();
    signal(&gw.0, "HUP");
    wait_for("a reload", || log_count(&stderr, "reloaded") >= 1);
    assert_eq!(
        refusal(addr, sni, client.clone()).await,
        rustls::AlertDescription::AccessDenied
    );

    // No signal: the file watcher sees the change.
    let reloads = log_count(&stderr, "reloaded");
    std::fs::write(&config, &allowing).unwrap();
    wait_for("the watcher's reload", || {
        log_count(&stderr, "reloaded") > reloads
    });
    let tls = connect(addr, sni, client.clone()).await.unwrap();
    assert_eq!(
        echo_roundtrip(tls, b"back\n".to_vec()).await.unwrap(),
        b"back\n"
    );

    // A broken file is refused and the running state stays.
    std::fs::write(
        &config,
        allowing.replace("[[listeners]]", "[[listeners]]\nbogus = 1"),
    )
    .unwrap();
    wait_for("the refused reload", || {
        log_count(&stderr, "reload refused, running state kept") >= 1
    });
    let log = std::fs::read_to_string(&stderr).unwrap();
    assert!(log.contains("bogus"), "the refusal names the field: {log}");
    // Written for people: each thing said once, no Rust debug output.
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let refused = lines
        .iter()
        .find(|v| v["fields"]["message"] == "reload refused, running state kept")
        .unwrap();
    let reason = refused["fields"]["reason"].as_str().unwrap();
    assert!(
        !reason.contains("reload refused") && reason.contains("bogus"),
        "{reason}"
    );
    let reloaded = lines
        .iter()
        .find(|v| v["fields"]["message"] == "reloaded")
        .unwrap();
    assert_eq!(
        reloaded["fields"]["changes"], "every live connection still allowed",
        "{log}"
    );
    assert!(
        !log.contains("ReloadReport") && !log.contains("[\\\""),
        "{log}"
    );
    let tls = connect(addr, sni, client).await.unwrap();
    assert_eq!(
        echo_roundtrip(tls, b"still\n".to_vec()).await.unwrap(),
        b"still\n"
    );
}

/// A fatal error is said once: one line, without its cause repeated.
#[test]
fn a_fatal_error_is_printed_once() {
    let pki = Pki::new();
    let missing = pki.path("no-such.toml");
    let out = Command::new(gateway_binary())
        .args(["check", "--config"])
        .arg(&missing)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert_eq!(err.matches("No such file").count(), 1, "{err}");

    // `run` says it as a log line (its stderr is a log), once.
    let config = write_config(&pki, dead_port());
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replace(
        &pki.path("access.log").display().to_string(),
        &pki.path("missing-dir/access.log").display().to_string(),
    );
    std::fs::write(&config, text).unwrap();
    let out = Command::new(gateway_binary())
        .args(["--log-format", "json", "run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let fatal: Vec<&str> = err.lines().filter(|l| l.contains("missing-dir")).collect();
    assert_eq!(fatal.len(), 1, "{err}");
    let line: serde_json::Value = serde_json::from_str(fatal[0]).unwrap();
    assert_eq!(line["level"], "ERROR", "{err}");
    assert_eq!(fatal[0].matches("No such file").count(), 1, "{err}");
}

/// `check` refuses what `run` will: an access log that cannot be opened.
#[test]
fn check_refuses_an_access_log_that_run_cannot_open() {
    let pki = Pki::new();
    let config = write_config(&pki, dead_port());
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &pki.path("access.log").display().to_string(),
        &pki.path("missing-dir/access.log").display().to_string(),
    );
    std::fs::write(&config, text).unwrap();
    let check = gateway_on("check", &config);
    let err = String::from_utf8_lossy(&check.stderr);
    assert!(!check.status.success(), "check passed a config run refuses");
    assert!(
        err.contains("cannot open access log") && err.contains("missing-dir"),
        "{err}"
    );
    // A good one passes and leaves no file behind.
    let config = write_config(&pki, dead_port());
    let check = gateway_on("check", &config);
    assert!(check.status.success());
    assert!(
        !pki.path("access.log").exists(),
        "check created the access log"
    );
}

/// Started as root with `user`, `check` and `run` refuse an access log
/// whose directory is reached through a directory that user may write:
/// it could put a symlink there in place of the log's directory, and root
/// would create the log wherever it points (review 10, S10-1). The log's
/// own directory of the user's, in root's directory (LogsDirectory=),
/// passes.
#[test]
fn an_access_log_below_a_directory_the_user_may_write_stops_a_start_as_root() {
    use std::os::unix::fs::PermissionsExt as _;
    if !is_root() {
        eprintln!("skipped: needs root to drop from");
        return;
    }
    let pki = Pki::new_root_only();
    give_to_nobody(&pki);
    let mkdir = |p: &std::path::Path| {
        std::fs::create_dir(p).unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(p, Some(65534), Some(65534)).unwrap();
    };
    let (state, logs) = (pki.path("state"), pki.path("logs"));
    mkdir(&state);
    mkdir(&state.join("log"));
    mkdir(&logs);
    let config = |log: &std::path::Path| {
        let toml = format!("user = \"nobody\"\naccess_log = \"{}\"\n", log.display())
            + &listener_toml(&pki, "edge", "")
            + &route_toml("plain", &[], &[dead_port()], &[SPIFFE_FRONTEND]);
        pki.write("gateway.toml", &toml)
    };
    let below = state.join("log/access.log");
    let config_below = config(&below);
    for command in ["check", "run"] {
        // A `run` that is not refused serves: stopped after 20 s.
        let out = Command::new("timeout")
            .arg("20")
            .arg(gateway_binary())
            .args([command, "--config"])
            .arg(&config_below)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{command} passed: {err}");
        assert!(
            err.contains("is reached through a directory user \"nobody\"")
                && err.contains(&format!("{} belongs to uid 65534", state.display())),
            "{command}: {err}"
        );
        assert!(!below.exists(), "{command} made the log");
    }
    // Control: the log's own directory nobody's, in root's.
    let check = gateway_on("check", &config(&logs.join("access.log")));
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

/// Every close by re-verification begins with one documented prefix, and
/// the stderr line names the client with its port, as the access log does.
#[tokio::test(flavor = "multi_thread")]
async fn a_close_by_reload_has_one_prefix_and_names_the_clients_port() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new();
    let (backend, accepted) = one_line_backend().await;
    let config = write_config(&pki, backend);
    let allowing = std::fs::read_to_string(&config).unwrap();
    let stderr = pki.path("gateway.stderr");
    let gw = run_binary(&config, &stderr, &[]);
    let addr = wait_listening(&stderr);
    let mut tls = connect(addr, "orders.example.internal", pki.frontend_config())
        .await
        .unwrap();
    let port = tls.get_ref().0.local_addr().unwrap().port();
    // Half a line: the backend waits for the rest, the connection stays.
    tls.write_all(b"held").await.unwrap();
    tls.flush().await.unwrap();
    wait_for("the backend's accept", || {
        accepted.load(std::sync::atomic::Ordering::SeqCst) == 1
    });

    std::fs::write(&config, allowing.replace(SPIFFE_FRONTEND, SPIFFE_OTHER)).unwrap();
    signal(&gw.0, "HUP");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(STEP, tls.read_to_end(&mut rest)).await;
    wait_for("the closing line", || {
        log_count(&stderr, "closing live connection") == 1
    });
    let log = std::fs::read_to_string(&stderr).unwrap();
    let line: serde_json::Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "closing live connection")
        .unwrap();
    assert_eq!(
        line["fields"]["client"],
        format!("127.0.0.1:{port}"),
        "{log}"
    );
    assert!(
        line["fields"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("no longer allowed after reload: "),
        "{log}"
    );
    wait_for("the access-log line", || {
        std::fs::read_to_string(pki.path("access.log")).is_ok_and(|l| l.lines().count() == 1)
    });
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pki.path("access.log")).unwrap()).unwrap();
    assert_eq!(record["client"], format!("127.0.0.1:{port}"));
    assert!(
        record["reason"]
            .as_str()
            .unwrap()
            .contains("closed by gateway: no longer allowed after reload: "),
        "{record}"
    );
}

/// `--pid-file` names this gateway, so a reload signals it and no other
/// gateway on the host; the file goes when the gateway stops.
#[tokio::test(flavor = "multi_thread")]
async fn the_pid_file_names_the_serving_gateway_until_it_stops() {
    let pki = Pki::new();
    let config = write_config(&pki, dead_port());
    let pid_file = pki.path("gateway.pid");
    let stderr = pki.path("gateway.stderr");
    let mut gw = run_binary(
        &config,
        &stderr,
        &["--pid-file".as_ref(), pid_file.as_os_str()],
    );
    wait_listening(&stderr);
    wait_for("the pid file", || pid_file.exists());
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    assert_eq!(pid.trim(), gw.0.id().to_string());
    let status = Command::new("sh")
        .args([
            "-c",
            &format!("kill -HUP \"$(cat {})\"", pid_file.display()),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    wait_for("a reload", || log_count(&stderr, "reloaded") == 1);
    signal(&gw.0, "TERM");
    wait_for("the exit", || gw.0.try_wait().unwrap().is_some());
    assert!(!pid_file.exists(), "the pid file outlived the gateway");
}

/// A pid file name that is a symlink (planted by whoever may write the
/// pid file's directory) is replaced, never followed: the file it points
/// to stays as it was. At exit the pid file goes only while it is still
/// the one written.
#[tokio::test(flavor = "multi_thread")]
async fn a_symlink_at_the_pid_file_is_replaced_not_written_through() {
    let pki = Pki::new();
    let config = write_config(&pki, dead_port());
    let victim = pki.write("victim", "precious\n");
    let pid_file = pki.path("gateway.pid");
    std::os::unix::fs::symlink(&victim, &pid_file).unwrap();
    let stderr = pki.path("gateway.stderr");
    let mut gw = run_binary(
        &config,
        &stderr,
        &["--pid-file".as_ref(), pid_file.as_os_str()],
    );
    wait_listening(&stderr);
    wait_for("the pid file", || {
        std::fs::symlink_metadata(&pid_file).is_ok_and(|m| m.file_type().is_file())
    });
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        gw.0.id().to_string()
    );
    // Replaced behind the gateway's back: not its file to remove. (Moved
    // aside, not deleted, so the new file cannot reuse its inode.)
    std::fs::rename(&pid_file, pki.path("moved.pid")).unwrap();
    std::fs::write(&pid_file, "someone else's\n").unwrap();
    signal(&gw.0, "TERM");
    assert!(exit_status(&mut gw.0, "SIGTERM").success());
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap(),
        "someone else's\n"
    );
}

/// A SIGHUP sent the moment the gateway says it listens reloads it: the
/// handlers are in place before the first line that says it is up, so the
/// signal's default action (exit) never applies.
#[tokio::test(flavor = "multi_thread")]
async fn a_sighup_as_soon_as_it_listens_reloads_and_does_not_kill() {
    let pki = Pki::new();
    let config = write_config(&pki, dead_port());
    let stderr = pki.path("gateway.stderr");
    let mut gw = run_binary(&config, &stderr, &[]);
    let until = Instant::now() + STEP;
    while log_count(&stderr, "listening") == 0 {
        assert!(Instant::now() < until, "the gateway never said it listens");
        assert!(
            gw.0.try_wait().unwrap().is_none(),
            "exited before listening"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    signal(&gw.0, "HUP");
    wait_for("a reload", || log_count(&stderr, "reloaded") == 1);
    assert!(
        gw.0.try_wait().unwrap().is_none(),
        "the SIGHUP killed the gateway"
    );
    signal(&gw.0, "TERM");
    wait_for("the exit", || gw.0.try_wait().unwrap().is_some());
}

/// A flood of refusals is logged in a bounded number of lines: the first at
/// once, then a summary per `log_every` with the count, never a line per
/// refused connection (and no access-log line for any of them).
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_refusals_takes_a_bounded_number_of_log_lines() {
    let pki = Pki::new();
    let toml = format!("access_log = \"{}\"\n", pki.path("access.log").display())
        + &listener_toml(&pki, "edge", "")
        + &route_toml("plain", &[], &[dead_port()], &[SPIFFE_FRONTEND])
        + "\n[admission]\nsource_handshakes_per_second = 1\nsource_handshake_burst = 1\n\
           block_after = 0\nprefix_block_after = 0\nnetwork_block_after = 0\nlog_every = \"1s\"\n";
    let config = pki.write("gateway.toml", &toml);
    let (_gw, addr) = run_listening(&pki, &config);
    // One admitted (and closed without a ClientHello), 500 over the rate.
    for _ in 0..501 {
        // The reset may come before connect() returns: refused either way.
        let _ = tokio::net::TcpStream::connect(addr).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let log = std::fs::read_to_string(pki.path("gateway.stderr")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| {
            v["fields"]["reason"] == "source_rate"
                || v["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("source_rate"))
        })
        .collect();
    assert!(
        (2..=4).contains(&lines.len()),
        "{} lines about source_rate:\n{log}",
        lines.len()
    );
    let summarized: u64 = lines
        .iter()
        .filter_map(|v| v["fields"]["count"].as_u64())
        .sum();
    // One token a second: a refill or two may admit a connection or two.
    assert!(
        (497..=500).contains(&(summarized + 1)),
        "every refusal is in a line's count ({summarized} + 1):\n{log}"
    );
    // Refusals at accept write no access-log line: only the admitted ones
    // (the first, and one per refill while the loop ran) are there.
    let access = std::fs::read_to_string(pki.path("access.log")).unwrap_or_default();
    assert_eq!(
        access.lines().count() as u64,
        501 - (summarized + 1),
        "{access}"
    );
}

/// `gateway block list|add|remove --config` as an operator runs it, against
/// the running binary's admin endpoint: an entry added shows in the list
/// and refuses its source at accept, and once removed it is gone.
#[tokio::test]
async fn gateway_block_edits_the_running_gateways_block_list() {
    use gateway_tests::attack::*;
    let pki = Pki::new();
    let admin = dead_port();
    let toml =
        format!("access_log = \"off\"\nadmin = \"{admin}\"\nadmin_socket = \"admin.sock\"\n")
            + &listener_toml(&pki, "edge", "")
            + &route_toml("plain", &[], &[dead_port()], &[SPIFFE_FRONTEND])
            + "\n[admission]\nkernel_block_list = false\n";
    let config = pki.write("gateway.toml", &toml);
    let (_gw, addr) = run_listening(&pki, &config);
    let block = |args: &[&str]| {
        let out = Command::new(gateway_binary())
            .arg("block")
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "gateway block {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(block(&["list"]).contains("empty"));
    let added = block(&["add", "127.0.5.0/24", "--for", "1h"]);
    assert!(added.contains("blocked 127.0.5.0/24 for"), "{added}");
    let list = block(&["list"]);
    assert!(
        list.contains("127.0.5.0/24") && list.contains("manual"),
        "{list}"
    );
    let mut s = tcp_from("127.0.5.9", addr).await;
    if let Ok(s) = &mut s {
        assert!(
            closed_within(s, Duration::from_secs(2)).await.is_some(),
            "a blocked source was not refused"
        );
    }
    let metrics = scrape(admin).await;
    assert!(
        metrics
            .contains("gateway_connections_refused_total{listener=\"edge\",reason=\"blocked\"} 1"),
        "{metrics}"
    );
    block(&["remove", "127.0.5.0/24"]);
    assert!(block(&["list"]).contains("empty"));
    let out = Command::new(gateway_binary())
        .args(["block", "remove", "127.0.5.0/24", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "removing what is not there succeeded"
    );
}

/// `GET /readyz` through SIGTERM: 200 while serving, 503 from the signal
/// on while a live connection drains (a load balancer sends new clients
/// elsewhere first), `/healthz` 200 throughout; the drain then ends as
/// before.
#[tokio::test(flavor = "multi_thread")]
async fn readyz_is_503_from_sigterm_on_while_the_binary_drains() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let admin = dead_port();
    let toml = format!("access_log = \"off\"\nadmin = \"{admin}\"\ndrain_timeout = \"10s\"\n")
        + &listener_toml(&pki, "edge", "")
        + &route_toml("plain", &[], &[backend.addr], &[SPIFFE_FRONTEND]);
    let config = pki.write("gateway.toml", &toml);
    let (mut gw, addr) = run_listening(&pki, &config);
    let get = |path: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(
            &mut s,
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        let _ = tokio::time::timeout(
            STEP,
            tokio::io::AsyncReadExt::read_to_string(&mut s, &mut out),
        )
        .await;
        out
    };
    assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
    let mut tls = connect(addr, "orders.example.internal", pki.frontend_config())
        .await
        .unwrap();
    let mut buf = [0u8; 4];
    tokio::io::AsyncWriteExt::write_all(&mut tls, b"ping")
        .await
        .unwrap();
    tokio::io::AsyncReadExt::read_exact(&mut tls, &mut buf)
        .await
        .unwrap();
    signal(&gw.0, "TERM");
    let until = Instant::now() + Duration::from_secs(2);
    let ready = loop {
        let r = get("/readyz").await;
        if !r.starts_with("HTTP/1.1 200") || Instant::now() > until {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        ready.starts_with("HTTP/1.1 503") && ready.ends_with("not ready: draining\n"),
        "{ready}"
    );
    assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
    // Still draining, still served; once it closes, the gateway exits 0.
    tokio::io::AsyncWriteExt::write_all(&mut tls, b"pong")
        .await
        .unwrap();
    tokio::io::AsyncReadExt::read_exact(&mut tls, &mut buf)
        .await
        .unwrap();
    assert_eq!(&buf, b"pong");
    drop(tls);
    let status = exit_status(&mut gw.0, "SIGTERM");
    assert!(status.success(), "exit status after SIGTERM: {status}");
}

/// The binary serving `top` (top-level settings) and one route, its PKI
/// owned by nobody, once it has dropped to nobody: the gateway, the
/// config's path, its stderr and its listener's address.
async fn run_as_nobody(
    pki: &Pki,
    top: &str,
) -> (
    Reap,
    std::path::PathBuf,
    std::path::PathBuf,
    std::net::SocketAddr,
) {
    let (backend, _) = one_line_backend().await;
    let config = pki.write(
        "gateway.toml",
        &(format!("user = \"nobody\"\n{top}\n")
            + &listener_toml(pki, "edge", "")
            + &route_toml("plain", &[], &[backend], &[SPIFFE_FRONTEND])),
    );
    give_to_nobody(pki);
    let stderr = pki.path("gateway.stderr");
    let gw = run_binary(&config, &stderr, &[]);
    let addr = wait_listening(&stderr);
    wait_for("the drop", || log_count(&stderr, "dropped privileges") == 1);
    (gw, config, stderr, addr)
}

const NOBODY: &str = "65534 65534 65534 65534";
const NOGROUP: &str = "65534 65534 65534 65534";
/// CAP_NET_ADMIN (12) and CAP_BPF (39): the kernel block list's.
const BLOCK_LIST_CAPS: u64 = (1 << 12) | (1 << 39);

/// `user = "nobody"`: once serving, every thread runs as nobody with
/// exactly the kernel block list's capabilities; it serves, reloads on
/// SIGHUP, and edits the block list (a map write) as nobody.
#[tokio::test(flavor = "multi_thread")]
async fn user_drops_every_thread_to_the_documented_capabilities_and_still_reloads() {
    if !is_root() {
        eprintln!("skipped: needs root to drop from");
        return;
    }
    let pki = Pki::new_root_only();
    let admin = dead_port();
    // root's, as its directory must be when root binds it for nobody.
    let run_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        run_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let socket = run_dir.path().join("admin.sock");
    // Two workers: the second's thread starts after the drop and must
    // hold no more than the main thread kept.
    let top = format!(
        "workers = 2\nadmin = \"{admin}\"\nadmin_socket = \"{}\"\naccess_log = \"{}\"",
        socket.display(),
        pki.path("access.log").display()
    );
    let (gw, config, stderr, addr) = run_as_nobody(&pki, &top).await;
    // The admin socket is the dropped-to user's, and only its.
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(
        (
            std::os::unix::fs::MetadataExt::uid(&meta),
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777
        ),
        (65534, 0o600)
    );
    let threads = credentials_of(gw.0.id());
    assert!(threads.len() > 1, "the workers' threads too: {threads:?}");
    for (uid, gid, prm, eff) in &threads {
        assert_eq!(
            (uid.as_str(), gid.as_str()),
            (NOBODY, NOGROUP),
            "{threads:?}"
        );
        assert_eq!(
            (*prm, *eff),
            (BLOCK_LIST_CAPS, BLOCK_LIST_CAPS),
            "{threads:?}"
        );
    }

    let client = pki.frontend_config();
    let sni = "orders.example.internal";
    let tls = connect(addr, sni, client.clone()).await.unwrap();
    assert_eq!(
        echo_roundtrip(tls, b"hi\n".to_vec()).await.unwrap(),
        b"hi\n"
    );
    // Reload as nobody: the frontend taken off the allow list is refused.
    let allowing = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, allowing.replace(SPIFFE_FRONTEND, SPIFFE_OTHER)).unwrap();
    signal(&gw.0, "HUP");
    wait_for("a reload", || log_count(&stderr, "reloaded") >= 1);
    assert_eq!(
        refusal(addr, sni, client).await,
        rustls::AlertDescription::AccessDenied
    );
    // The block list still takes edits: a write to a BPF map, as nobody.
    let out = Command::new(gateway_binary())
        .args(["block", "add", "192.0.2.0/24", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(credentials_of(gw.0.id())[0].0, NOBODY, "still nobody");
}

/// Started as root with `user = "nobody"`, the admin socket may not be
/// set up in a directory nobody can write: there nobody (whom the drop
/// contains, and who can force a restart by making the gateway exit) could
/// swap the socket's names for symlinks and have root chown any file to it.
/// The start stops, naming the directory; nothing is bound there.
#[tokio::test(flavor = "multi_thread")]
async fn an_admin_socket_in_a_directory_the_user_may_write_stops_a_start_as_root() {
    if !is_root() {
        eprintln!("skipped: needs root to drop from");
        return;
    }
    let pki = Pki::new_root_only();
    let (backend, _) = one_line_backend().await;
    let socket = pki.path("admin.sock");
    // The config in root's own directory (one nobody could write is
    // refused first, see a_config_the_user_could_rewrite_stops_a_start_as_root).
    let etc = gateway_tests::root_only_tempdir();
    let config = etc.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "user = \"nobody\"\nadmin_socket = \"{}\"\naccess_log = \"off\"\n",
            socket.display()
        ) + &listener_toml(&pki, "edge", "")
            + &route_toml("plain", &[], &[backend], &[SPIFFE_FRONTEND]),
    )
    .unwrap();
    give_to_nobody(&pki);
    // The socket's directory nobody's.
    let status = Command::new("chown")
        .arg("nobody:")
        .arg(pki.path(""))
        .status()
        .unwrap();
    assert!(status.success());
    let stderr = pki.path("gateway.stderr");
    let mut gw = run_binary(&config, &stderr, &[]);
    let status = exit_status(&mut gw.0, "a start with an unsafe socket directory");
    assert!(!status.success());
    let err = std::fs::read_to_string(&stderr).unwrap();
    let dir = pki.path("").display().to_string();
    let dir = dir.trim_end_matches('/');
    assert!(
        err.contains(&format!("its directory {dir} belongs to uid 65534")),
        "{err}"
    );
    assert!(!socket.exists(), "bound anyway");
    assert_eq!(log_count(&stderr, "dropped privileges"), 0, "{err}");
}

/// A start as root with `user` set refuses a config the user could
/// rewrite (the file or its directory theirs, or writable by their group or
/// anyone): root reads it at the next start, so a compromised gateway
/// could delete `user` and be root after a restart. Nothing is bound.
#[tokio::test(flavor = "multi_thread")]
async fn a_config_the_user_could_rewrite_stops_a_start_as_root() {
    use std::os::unix::fs::PermissionsExt as _;
    if !is_root() {
        eprintln!("skipped: needs root to drop from");
        return;
    }
    let pki = Pki::new_root_only();
    let (backend, _) = one_line_backend().await;
    let config = pki.write(
        "gateway.toml",
        &("user = \"nobody\"\naccess_log = \"off\"\n".to_owned()
            + &listener_toml(&pki, "edge", "")
            + &route_toml("plain", &[], &[backend], &[SPIFFE_FRONTEND])),
    );
    give_to_nobody(&pki);
    let dir = pki.path("").display().to_string();
    let dir = dir.trim_end_matches('/').to_owned();
    let file = config.display().to_string();
    let chown = |who: &str, path: &str| {
        assert!(
            Command::new("chown")
                .args([who, path])
                .status()
                .unwrap()
                .success()
        );
    };
    type Step<'a> = Box<dyn Fn() + 'a>;
    let cases: [(&str, Step, Step, String); 3] = [
        (
            "the file nobody's",
            Box::new(|| chown("nobody:", &file)),
            Box::new(|| chown("root:", &file)),
            format!("{file} belongs to uid 65534"),
        ),
        (
            "the directory nobody's",
            Box::new(|| chown("nobody:", &dir)),
            Box::new(|| chown("root:", &dir)),
            format!("{dir} belongs to uid 65534"),
        ),
        (
            "the file writable by anyone",
            Box::new(|| {
                std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o666)).unwrap()
            }),
            Box::new(|| {
                std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap()
            }),
            format!("{file} is writable by others (mode 666)"),
        ),
    ];
    for (what, make, undo, says) in cases {
        make();
        // Bounded: a start the check let through would serve on.
        let out = Command::new("timeout")
            .arg("20")
            .arg(gateway_binary())
            .args(["run", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        undo();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: started: {err}");
        assert!(
            err.contains("could be rewritten by user \"nobody\"") && err.contains(&says),
            "{what}: {err}"
        );
        assert!(!err.contains("dropped privileges"), "{what}: {err}");
    }
    // Root's file in root's directory: it starts and drops.
    let stderr = pki.path("gateway.stderr");
    let _gw = run_binary(&config, &stderr, &[]);
    wait_listening(&stderr);
    wait_for("the drop", || log_count(&stderr, "dropped privileges") == 1);
}

/// Under `user`, the config root reads at start is root's, so the gateway
/// cannot write a revert back: `rollout revert` is refused, saying why, the
/// config file and the running state are unchanged (the operator reverts
/// by hand, as root, from the revision's file).
#[tokio::test(flavor = "multi_thread")]
async fn a_revert_under_user_is_refused_and_changes_nothing() {
    use std::os::unix::fs::PermissionsExt as _;
    if !is_root() {
        eprintln!("skipped: needs root to drop from");
        return;
    }
    let pki = Pki::new_root_only();
    let revisions = pki.path("revisions");
    std::fs::create_dir(&revisions).unwrap();
    std::fs::set_permissions(&revisions, std::fs::Permissions::from_mode(0o700)).unwrap();
    let socket = pki.path("admin.sock");
    let top = format!(
        "access_log = \"off\"\nwatch_files = false\nadmin_socket = \"{}\"\nrevisions_dir = \"{}\"\n[admission]\nkernel_block_list = false",
        socket.display(),
        revisions.display()
    );
    let (gw, config, stderr, _) = run_as_nobody(&pki, &top).await;
    let v1 = std::fs::read_to_string(&config).unwrap();
    let v2 = v1.replace("access_log = \"off\"", "access_log = \"off\"\n# v2");
    std::fs::write(&config, &v2).unwrap();
    signal(&gw.0, "HUP");
    wait_for("the reload", || log_count(&stderr, "reloaded") == 1);
    let sock = socket.display().to_string();
    let (code, out, err) = cli(&["rollout", "history", "--socket", &sock]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("*    2  "), "{out}");
    let (code, _, err) = cli(&["rollout", "revert", "1", "--socket", &sock]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("cannot write its config back to") && err.contains("Permission denied"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), v2);
    let (_, out, _) = cli(&["rollout", "history", "--socket", &sock]);
    assert!(out.starts_with("*    2  "), "still revision 2: {out}");
    // What the operator restores by hand: the revision's own text.
    let rev1: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(revisions.join("rev-0000000001.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(rev1["config_text"].as_str(), Some(v1.as_str()));
    drop(gw);
}

/// Without a feature that needs one, nothing is kept; and a key only root
/// can read stops the start (a reload as nobody could not read it).
#[tokio::test(flavor = "multi_thread")]
async fn user_without_privileged_features_keeps_nothing_and_refuses_unreadable_files() {
    if !is_root() {
        eprintln!("skipped: needs root to drop from");
        return;
    }
    let pki = Pki::new_root_only();
    let top = "access_log = \"off\"\n[admission]\nkernel_block_list = false";
    let (gw, config, _, _) = run_as_nobody(&pki, top).await;
    for (uid, _, prm, eff) in credentials_of(gw.0.id()) {
        assert_eq!((uid.as_str(), prm, eff), (NOBODY, 0, 0));
    }
    drop(gw);

    let status = Command::new("chown")
        .arg("root")
        .arg(pki.path("server.key"))
        .status()
        .unwrap();
    assert!(status.success());
    let out = gateway_on("run", &config);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("running as \"nobody\", the config's files are not all readable")
            && err.contains("server.key"),
        "{err}"
    );
}

/// A private key group or others can read is refused, naming the file and
/// its mode; `allow_shared_keys = true` accepts it.
#[test]
fn a_key_readable_by_others_is_refused_unless_allowed() {
    use std::os::unix::fs::PermissionsExt as _;
    let pki = Pki::new();
    let backend: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let config = write_config(&pki, backend);
    std::fs::set_permissions(
        pki.path("server.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let check = || gateway_on("check", &config);
    let out = check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "{}: private key readable by group or others (mode 0644)",
            pki.path("server.key").display()
        )) && err.contains("allow_shared_keys = true"),
        "{err}"
    );
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("allow_shared_keys = true\n{text}")).unwrap();
    let out = check();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Started as an unprivileged user (no `user` to drop to), the gateway
/// is not dumpable: another process of that user can neither read its
/// memory (its keys) nor take a copy of its listening socket through
/// `pidfd_getfd` (attacker review 9, F3). The kernel shows it by giving
/// the process's /proc entries to root.
#[tokio::test]
async fn started_as_a_plain_user_the_gateway_is_not_dumpable() {
    use std::os::unix::fs::MetadataExt as _;
    use std::os::unix::process::CommandExt as _;
    if !is_root() {
        eprintln!("skipped: needs root to start it as nobody");
        return;
    }
    let pki = Pki::new();
    let (backend, _) = one_line_backend().await;
    let config = pki.write(
        "gateway.toml",
        &(listener_toml(&pki, "edge", "")
            + &route_toml("plain", &[], &[backend], &[SPIFFE_FRONTEND])),
    );
    give_to_nobody(&pki);
    let stderr = pki.path("gateway.stderr");
    let child = std::process::Command::new(gateway_binary())
        .args(["--log-format", "json", "run", "--config"])
        .arg(&config)
        .stderr(std::fs::File::create(&stderr).unwrap())
        .uid(65534)
        .gid(65534)
        .spawn()
        .unwrap();
    let gw = Reap(child);
    let addr = wait_listening(&stderr);
    let fd_dir = std::fs::metadata(format!("/proc/{}/fd", gw.0.id())).unwrap();
    assert_eq!(
        fd_dir.uid(),
        0,
        "its /proc entries are its user's: dumpable"
    );
    // And it serves as that user.
    let tls = connect(addr, "orders.example.internal", pki.frontend_config())
        .await
        .unwrap();
    assert_eq!(
        echo_roundtrip(tls, b"hi\n".to_vec()).await.unwrap(),
        b"hi\n"
    );
}

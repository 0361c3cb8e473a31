//! Attacker review 9 of the shared listening socket (b940340): every worker
//! accepts on a dup() of one socket without SO_REUSEPORT. Kept as
//! regression tests: no other process's bind overlaps the socket, and one
//! worker out of descriptors resets every connection. With four workers
//! (F1) a reserve is still lost now and then to another loop's accept
//! (17 of 20 left hanging in one of four runs after the fix, 0 in the
//! others; README states it), so that case is not asserted here; nor is
//! the wake-up count per connection (F2, every idle worker wakes).
//!
//! `cargo build -p gateway && cargo test -p gateway-tests --test review9_workers`

use std::process::Command;
use std::time::Duration;

use gateway_tests::attack::*;
use gateway_tests::process::*;
use gateway_tests::*;

const ORDERS: &str = "orders.example.internal";

/// What another process gets when it binds `addr` (Python `(host, port)`)
/// in `family` with the socket options of `setup` (Python statements on
/// `s`) and listens: "listening", or the error's text.
fn another_process(family: &str, host: &str, port: u16, setup: &str) -> String {
    let script = format!(
        "import socket\n\
         s=socket.socket(socket.{family})\n\
         {setup}\n\
         try:\n  s.bind(('{host}', {port}))\n  s.listen(1024)\n  print('listening')\n\
         except OSError as e:\n  print(e.strerror)\n"
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

const REUSE: &str = "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); \
                     s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)";
const DEVICE: &str = "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); \
                      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1); \
                      s.setsockopt(socket.SOL_SOCKET, 25, b'lo')";
const DUAL: &str = "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); \
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)";

fn config(pki: &Pki, backend: std::net::SocketAddr, workers: usize, bind: &str) -> String {
    format!("admin = \"127.0.0.1:0\"\nworkers = {workers}\n")
        + &listener_toml(pki, "edge", "").replace("127.0.0.1:0", bind)
        + &route_toml("orders", &[ORDERS], &[backend], &[SPIFFE_FRONTEND])
}

/// Q1: every bind of another process where a listener accepts is refused:
/// the same address, narrower addresses under 0.0.0.0, the IPv4 wildcard
/// (and a dual-stack [::]) over a narrow listener, v4-mapped, bound to a
/// device, without any reuse option. Passes (no takeover by bind).
#[tokio::test]
async fn no_bind_of_another_process_overlaps_a_shared_socket() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let narrow = RunningGateway::start(&pki, &config(&pki, backend.addr, 4, "127.0.0.1:0")).await;
    let p = narrow.app_addr.port();
    let wide = RunningGateway::start(&pki, &config(&pki, backend.addr, 4, "0.0.0.0:0")).await;
    let w = wide.app_addr.port();
    let dual = RunningGateway::start(&pki, &config(&pki, backend.addr, 4, "[::]:0")).await;
    let d = dual.app_addr.port();
    let cases: Vec<(&str, &str, u16, &str)> = vec![
        ("AF_INET", "127.0.0.1", p, REUSE),
        ("AF_INET", "127.0.0.1", p, ""),
        ("AF_INET", "0.0.0.0", p, REUSE),
        ("AF_INET", "127.0.0.1", p, DEVICE),
        ("AF_INET6", "::ffff:127.0.0.1", p, REUSE),
        ("AF_INET6", "::", p, DUAL),
        ("AF_INET", "127.0.0.1", w, REUSE),
        ("AF_INET", "127.0.0.2", w, DEVICE),
        ("AF_INET6", "::ffff:127.0.0.1", w, REUSE),
        ("AF_INET", "0.0.0.0", d, REUSE),
        ("AF_INET", "127.0.0.1", d, DEVICE),
        ("AF_INET6", "::1", d, REUSE),
    ];
    let mut took = Vec::new();
    for (family, host, port, setup) in cases {
        let said = another_process(family, host, port, setup);
        if said != "Address already in use" {
            took.push(format!("{family} {host}:{port} [{setup}]: {said}"));
        }
    }
    assert!(took.is_empty(), "binds that were not refused: {took:#?}");
}

/// `prlimit --nofile=N:N gateway run`, listening.
fn run_with_nofile(pki: &Pki, config: &std::path::Path, n: u64) -> (Reap, std::net::SocketAddr) {
    let child = Command::new("prlimit")
        .arg(format!("--nofile={n}:{n}"))
        .arg("--")
        .arg(gateway_binary())
        .args(["--log-format", "json", "run", "--config"])
        .arg(config)
        .stderr(std::fs::File::create(pki.path("gateway.stderr")).unwrap())
        .spawn()
        .unwrap();
    (Reap(child), wait_listening(&pki.path("gateway.stderr")))
}

/// Runs out of descriptors twice with `workers` workers: 100 idle
/// handshakes (two descriptors each, more than 64), then, still out, 20
/// more connections, each of which should be reset by a loop's reserve.
/// Returns (reset in the first wave, left hanging in the second wave,
/// "accept failed" warnings logged).
async fn out_of_descriptors(workers: usize) -> (usize, usize, usize) {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let admin = dead_port();
    let toml = format!("access_log = \"off\"\nadmin = \"{admin}\"\nworkers = {workers}\n")
        + &listener_toml(
            &pki,
            "edge",
            "handshake_timeout = \"60s\"\nhandshake_grace = \"60s\"",
        )
        + &route_toml("orders", &[ORDERS], &[backend.addr], &[SPIFFE_FRONTEND])
        + "\n[admission]\nlog_every = \"60s\"\n";
    let config = pki.write("gateway.toml", &toml);
    let (gw, addr) = run_with_nofile(&pki, &config, 64);
    let mut idle = Vec::new();
    let mut reset = 0;
    for _ in 0..100 {
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
    // Still out of descriptors (the idle ones hold them): every new
    // connection should be reset at once by a reserve.
    let mut hanging = 0;
    for _ in 0..20 {
        if let Ok(mut s) = tcp_from("127.0.4.2", addr).await
            && closed_within(&mut s, Duration::from_millis(1000))
                .await
                .is_none()
        {
            hanging += 1;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = std::fs::read_to_string(pki.path("gateway.stderr")).unwrap();
    let warned = log.lines().filter(|l| l.contains("accept failed")).count();
    drop(idle);
    drop(gw);
    eprintln!(
        "workers={workers}: first wave reset {reset}/100, second wave hanging {hanging}/20, 'accept failed' lines {warned}"
    );
    (reset, hanging, warned)
}

/// Control: one worker keeps its reserve through the first wave and
/// resets every connection of the second.
#[tokio::test]
async fn one_worker_out_of_descriptors_resets_every_connection() {
    let (_, hanging, _) = out_of_descriptors(1).await;
    assert_eq!(hanging, 0);
}

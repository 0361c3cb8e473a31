//! A fleet member (`[fleet]`) against a real etcd: pushed routes and CRLs
//! reach it within a second through the reload, a broken document written
//! straight into etcd is refused and changes nothing, and etcd going away
//! stops nothing (staleness reported, a restart served from the cache,
//! convergence when etcd is back).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use gateway_tests::etcd::Etcd;
use gateway_tests::process::*;
use gateway_tests::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const PREFIX: &str = "/gateway/test";
const ORDERS: &str = "orders.example.internal";
const BILLING: &str = "billing.example.internal";

/// The shared document: the listener (its cert and key host paths, its
/// client CA and CRL plain names beside it) and `routes`.
fn document(pki: &Pki, routes: &str) -> String {
    format!(
        r#"
[[listeners]]
name = "edge"
bind = "127.0.0.1:0"
cert = "{cert}"
key = "{key}"
client_ca = "client-roots.pem"
crls = ["clients.crl.pem"]
{routes}"#,
        cert = pki.path("server-chain.pem").display(),
        key = pki.path("server.key").display(),
    )
}

fn route(name: &str, sni: &str, backend: SocketAddr) -> String {
    route_toml(name, &[sni], &[backend], &[SPIFFE_FRONTEND])
}

/// The member's host file: its admin endpoint, and `[fleet]`.
fn host_file(pki: &Pki, etcd: &[&Etcd], admin: SocketAddr) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let state = pki.path("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let endpoints: Vec<String> = etcd.iter().map(|e| format!("{:?}", e.url())).collect();
    pki.write(
        "host.toml",
        &format!(
            "access_log = \"off\"\nadmin = \"{admin}\"\n[fleet]\netcd = [{}]\nprefix = \"{PREFIX}\"\nname = \"gw-1\"\ncache = \"{}\"\n",
            endpoints.join(", "),
            state.join("fleet.json").display()
        ),
    )
}

/// `gateway fleet push`, which must succeed.
fn push(pki: &Pki, host: &Path, doc: &str) {
    let from = pki.write("shared.toml", doc);
    let out = Command::new(gateway_binary())
        .args(["fleet", "push", "--config"])
        .arg(host)
        .arg("--from")
        .arg(&from)
        // The test PKI's CRLs run for a day.
        .args(["--fail-within", "1h"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "push refused: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `gateway fleet status --format json`: exit code and answer.
fn fleet_status(host: &Path) -> (i32, serde_json::Value) {
    let out = Command::new(gateway_binary())
        .args(["fleet", "status", "--format", "json", "--config"])
        .arg(host)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!("{e}: {text}{}", String::from_utf8_lossy(&out.stderr))
    });
    (out.status.code().unwrap_or(-1), value)
}

/// Whether a client with `creds` gets an echo through route `sni`.
async fn echoes(addr: SocketAddr, sni: &str, pki: &Pki) -> bool {
    match connect(addr, sni, pki.frontend_config()).await {
        Ok(tls) => echo_roundtrip(tls, b"ping".to_vec())
            .await
            .is_ok_and(|b| b == b"ping"),
        Err(_) => false,
    }
}

/// How long until route `sni` serves, polling every 20 ms up to `limit`.
async fn serves_within(
    addr: SocketAddr,
    sni: &str,
    pki: &Pki,
    limit: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if echoes(addr, sni, pki).await {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

fn value(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
}

/// Starts the member and waits until it listens.
fn run_member(pki: &Pki, host: &Path, log: &str) -> (Reap, SocketAddr) {
    let gw = run_binary(host, &pki.path(log), &[]);
    let addr = wait_listening(&pki.path(log));
    (gw, addr)
}

#[tokio::test]
async fn pushed_routes_and_crls_apply_within_a_second_and_a_broken_document_changes_nothing() {
    let etcd = Etcd::start().await;
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    pki.write("clients.crl.pem", &pki.intermediate.crl(1, &[]).unwrap());
    let admin = dead_port();
    let host = host_file(&pki, &[&etcd], admin);
    push(
        &pki,
        &host,
        &document(&pki, &route("orders", ORDERS, backend.addr)),
    );
    let (_gw, addr) = run_member(&pki, &host, "gw.stderr");
    assert!(echoes(addr, ORDERS, &pki).await);
    assert!(!echoes(addr, BILLING, &pki).await, "no billing route yet");

    // A route pushed to etcd serves within a second of the push.
    let both = route("orders", ORDERS, backend.addr) + &route("billing", BILLING, backend.addr);
    push(&pki, &host, &document(&pki, &both));
    let took = serves_within(addr, BILLING, &pki, Duration::from_secs(1)).await;
    assert!(took.is_some(), "billing not served within 1 s of the push");
    eprintln!("route served {took:?} after the push");

    // A CRL pushed closes the revoked client's live connection within a
    // second; another client's stream stays byte-exact.
    let (doomed, serial) = pki.revocable_frontend("doomed");
    let mut a = connect(addr, ORDERS, pki.client_config(Some(&doomed)))
        .await
        .unwrap();
    let b = connect(addr, ORDERS, pki.frontend_config()).await.unwrap();
    a.write_all(b"a").await.unwrap();
    let mut one = [0u8; 1];
    a.read_exact(&mut one).await.unwrap();
    pki.write(
        "clients.crl.pem",
        &pki.intermediate.crl(2, &[&serial]).unwrap(),
    );
    let data = payload(1 << 20);
    let writer = {
        let data = data.clone();
        let (mut r, mut w) = tokio::io::split(b);
        let sent = tokio::spawn(async move {
            for chunk in data.chunks(16 << 10) {
                w.write_all(chunk).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            w
        });
        let got = tokio::spawn(async move {
            let mut back = vec![0u8; 1 << 20];
            r.read_exact(&mut back).await.map(|_| back)
        });
        (sent, got)
    };
    push(&pki, &host, &document(&pki, &both));
    let pushed = Instant::now();
    let mut buf = [0u8; 64];
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(2), a.read(&mut buf)).await {
            Err(_) => break None,
            Ok(Ok(0) | Err(_)) => break Some(pushed.elapsed()),
            Ok(Ok(_)) => {}
        }
    };
    let closed = closed.expect("the revoked client's connection stayed open");
    assert!(closed < Duration::from_secs(1), "closed after {closed:?}");
    eprintln!("revoked client closed {closed:?} after the push");
    let _w = writer.0.await.unwrap();
    let back = writer.1.await.unwrap().unwrap();
    assert!(back == data, "the other client's stream changed");

    // The member says so in etcd: on the latest document.
    let before = value(&scrape(admin).await, "gateway_fleet_revision");
    let (code, status) = fleet_status(&host);
    assert_eq!(code, 0, "{status}");
    let members = status["members"].as_array().unwrap();
    assert_eq!(members.len(), 1, "{status}");
    assert_eq!(members[0]["name"], "gw-1");
    assert_eq!(members[0]["revision"].as_f64(), Some(before), "{status}");
    assert_eq!(members[0]["on_latest"], true);

    // A broken document written straight into etcd: refused, counted,
    // nothing changes.
    let mut client = etcd.client().await.unwrap();
    // Names a file etcd does not hold: fail closed.
    let missing = document(&pki, &route("orders", ORDERS, backend.addr))
        .replace("clients.crl.pem", "gone.crl.pem");
    client
        .put(format!("{PREFIX}/config"), missing, None)
        .await
        .unwrap();
    // Does not parse as a config at all.
    client
        .put(
            format!("{PREFIX}/config"),
            "[[listeners]]\nname = 7\n",
            None,
        )
        .await
        .unwrap();
    wait_for("both broken revisions refused", || {
        let log = std::fs::read_to_string(pki.path("gw.stderr")).unwrap();
        log.matches("fleet: revision refused").count() >= 2
    });
    let metrics = scrape(admin).await;
    assert!(
        value(&metrics, "gateway_fleet_refused_total") >= 2.0,
        "{metrics}"
    );
    assert_eq!(value(&metrics, "gateway_fleet_revision"), before);
    assert_eq!(value(&metrics, "gateway_fleet_connected"), 1.0);
    assert!(
        echoes(addr, BILLING, &pki).await,
        "the last good document serves on"
    );
    assert!(
        refusal(addr, ORDERS, pki.client_config(Some(&doomed))).await
            == rustls::AlertDescription::CertificateRevoked,
        "the revocation stays"
    );
}

#[tokio::test]
async fn without_etcd_the_member_serves_reports_staleness_restarts_from_its_cache_and_converges() {
    let mut etcd = Etcd::start().await;
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    pki.write("clients.crl.pem", &pki.intermediate.crl(1, &[]).unwrap());
    let admin = dead_port();
    let host = host_file(&pki, &[&etcd], admin);
    push(
        &pki,
        &host,
        &document(&pki, &route("orders", ORDERS, backend.addr)),
    );
    let (gw, addr) = run_member(&pki, &host, "gw.stderr");
    assert!(echoes(addr, ORDERS, &pki).await);
    let revision = value(&scrape(admin).await, "gateway_fleet_revision");
    assert!(revision > 0.0);

    // etcd stopped: still serving, staleness reported.
    etcd.stop();
    let mut live = connect(addr, ORDERS, pki.frontend_config()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let metrics = scrape(admin).await;
    assert_eq!(value(&metrics, "gateway_fleet_connected"), 0.0, "{metrics}");
    assert!(
        value(&metrics, "gateway_fleet_watch_age_seconds") >= 2.0,
        "{metrics}"
    );
    assert_eq!(value(&metrics, "gateway_fleet_revision"), revision);
    assert!(echoes(addr, ORDERS, &pki).await);
    live.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    live.read_exact(&mut one).await.unwrap();

    // Restarted while etcd is down: it serves from its cache.
    drop(gw);
    let (_gw, addr) = run_member(&pki, &host, "gw2.stderr");
    assert!(
        echoes(addr, ORDERS, &pki).await,
        "not served from the cache"
    );
    let metrics = scrape(admin).await;
    assert_eq!(value(&metrics, "gateway_fleet_revision"), revision);
    assert_eq!(value(&metrics, "gateway_fleet_connected"), 0.0);

    // etcd back: the member catches up with a push made since.
    etcd.run();
    etcd.wait_ready().await;
    let both = route("orders", ORDERS, backend.addr) + &route("billing", BILLING, backend.addr);
    push(&pki, &host, &document(&pki, &both));
    let took = serves_within(addr, BILLING, &pki, Duration::from_secs(10)).await;
    assert!(took.is_some(), "did not converge once etcd returned");
    let metrics = scrape(admin).await;
    assert_eq!(value(&metrics, "gateway_fleet_connected"), 1.0);
    assert!(value(&metrics, "gateway_fleet_revision") > revision);
}

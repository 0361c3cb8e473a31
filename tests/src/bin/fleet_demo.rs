//! `cargo xtask demo --fleet`: one etcd and two gateways following it, on
//! loopback with a throwaway PKI. A route is pushed and reaches both, a
//! revocation is pushed and closes the revoked client on both, etcd is
//! stopped and both keep serving. One line per case; exits non-zero if any
//! case misbehaves.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use gateway_tests::etcd::Etcd;
use gateway_tests::process::Reap;
use gateway_tests::*;
use tokio::io::AsyncReadExt as _;

const ORDERS: &str = "orders.example.internal";
const BILLING: &str = "billing.example.internal";

#[tokio::main]
async fn main() -> ExitCode {
    let Some(binary) = std::env::args().nth(1).map(PathBuf::from) else {
        eprintln!("usage: fleet_demo PATH-TO-GATEWAY-BINARY");
        return ExitCode::from(2);
    };
    match demo(&binary).await {
        Ok(true) => {
            println!("fleet demo: all cases behaved as expected");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("fleet demo: FAILED: a case did not behave as expected");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("fleet demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn document(routes: &str) -> String {
    format!(
        "[[listeners]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\ncert = \"server-chain.pem\"\nkey = \"server.key\"\nclient_ca = \"client-roots.pem\"\ncrls = [\"clients.crl.pem\"]\n{routes}"
    )
}

fn push(binary: &Path, pki: &Pki, host: &Path, doc: &str) -> Result<(), String> {
    let from = pki.write("shared.toml", doc);
    let out = Command::new(binary)
        .args(["fleet", "push", "--fail-within", "1h", "--config"])
        .arg(host)
        .arg("--from")
        .arg(&from)
        .output()
        .map_err(|e| e.to_string())?;
    print!(
        "  $ gateway fleet push: {}",
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
    );
    println!();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

async fn echoes(addr: SocketAddr, sni: &str, pki: &Pki) -> bool {
    match connect(addr, sni, pki.frontend_config()).await {
        Ok(tls) => echo_roundtrip(tls, b"ping".to_vec())
            .await
            .is_ok_and(|b| b == b"ping"),
        Err(_) => false,
    }
}

fn say(ok: bool, what: &str) -> bool {
    println!("{}  {what}", if ok { "PASS" } else { "FAIL" });
    ok
}

async fn demo(binary: &Path) -> Result<bool, String> {
    let mut etcd = Etcd::start().await;
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    pki.write(
        "clients.crl.pem",
        &pki.intermediate.crl(1, &[]).map_err(|e| e.to_string())?,
    );
    println!(
        "fleet demo: etcd on {}, throwaway PKI in {} (removed on exit)",
        etcd.url(),
        pki.dir.path().display()
    );
    let route =
        |name: &str, sni: &str| route_toml(name, &[sni], &[backend.addr], &[SPIFFE_FRONTEND]);
    let mut gateways: Vec<(Reap, SocketAddr)> = Vec::new();
    let mut hosts = Vec::new();
    for i in 0..2 {
        let state = pki.path(&format!("state-{i}"));
        std::fs::create_dir_all(&state).map_err(|e| e.to_string())?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| e.to_string())?;
        hosts.push(pki.write(
            &format!("host-{i}.toml"),
            &format!(
                "access_log = \"off\"\n[admission]\nexempt = [\"127.0.0.0/8\"]\n[fleet]\netcd = [\"{}\"]\nprefix = \"/gateway/demo\"\nname = \"gw-{i}\"\ncache = \"{}\"\n",
                etcd.url(),
                state.join("fleet.json").display()
            ),
        ));
    }
    push(binary, &pki, &hosts[0], &document(&route("orders", ORDERS)))?;
    for (i, host) in hosts.iter().enumerate() {
        let log = pki.path(&format!("gw-{i}.stderr"));
        let child = Command::new(binary)
            .args(["--log-format", "json", "run", "--config"])
            .arg(host)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let child = Reap(child);
        let addr = listening_addr(&log)?;
        println!("fleet demo: gw-{i} listening on {addr}");
        gateways.push((child, addr));
    }
    let mut ok = true;
    for (i, (_, addr)) in gateways.iter().enumerate() {
        ok &= say(
            echoes(*addr, ORDERS, &pki).await,
            &format!("gw-{i} serves the route from etcd"),
        );
    }

    let both = route("orders", ORDERS) + &route("billing", BILLING);
    push(binary, &pki, &hosts[0], &document(&both))?;
    let pushed = Instant::now();
    for (i, (_, addr)) in gateways.iter().enumerate() {
        let mut served = false;
        while !served && pushed.elapsed() < Duration::from_secs(1) {
            served = echoes(*addr, BILLING, &pki).await;
        }
        ok &= say(
            served,
            &format!(
                "gw-{i} serves the pushed route {:?} after the push",
                pushed.elapsed()
            ),
        );
    }

    let (doomed, serial) = pki.revocable_frontend("doomed");
    let mut live = Vec::new();
    for (_, addr) in &gateways {
        live.push(
            connect(*addr, ORDERS, pki.client_config(Some(&doomed)))
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    pki.write(
        "clients.crl.pem",
        &pki.intermediate
            .crl(2, &[&serial])
            .map_err(|e| e.to_string())?,
    );
    push(binary, &pki, &hosts[0], &document(&both))?;
    let pushed = Instant::now();
    for (i, tls) in live.iter_mut().enumerate() {
        let mut buf = [0u8; 64];
        let closed = loop {
            match tokio::time::timeout(Duration::from_secs(2), tls.read(&mut buf)).await {
                Err(_) => break false,
                Ok(Ok(0) | Err(_)) => break true,
                Ok(Ok(_)) => {}
            }
        };
        ok &= say(
            closed && pushed.elapsed() < Duration::from_secs(1),
            &format!(
                "gw-{i} closed the revoked client's live connection {:?} after the push",
                pushed.elapsed()
            ),
        );
    }

    let status = Command::new(binary)
        .args(["fleet", "status", "--config"])
        .arg(&hosts[0])
        .output()
        .map_err(|e| e.to_string())?;
    println!("  $ gateway fleet status");
    for line in String::from_utf8_lossy(&status.stdout).lines() {
        println!("  {line}");
    }
    ok &= say(
        status.status.success(),
        "gateway fleet status: every member on the latest document",
    );

    etcd.stop();
    println!("fleet demo: etcd stopped");
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (i, (_, addr)) in gateways.iter().enumerate() {
        ok &= say(
            echoes(*addr, BILLING, &pki).await,
            &format!("gw-{i} serves on without etcd"),
        );
    }
    let status = Command::new(binary)
        .args(["fleet", "status", "--config"])
        .arg(&hosts[0])
        .output()
        .map_err(|e| e.to_string())?;
    ok &= say(
        status.status.code() == Some(2),
        "gateway fleet status says etcd could not be asked (exit 2)",
    );
    Ok(ok)
}

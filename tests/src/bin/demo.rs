//! `cargo xtask demo`: the gateway binary on a throwaway PKI, tried by an
//! allowed client, a client without a certificate and a client with another
//! identity. One line per case; exits non-zero if any case misbehaves.

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use gateway::pki::LeafSpec;
use gateway_tests::*;
use rustls::AlertDescription;

#[tokio::main]
async fn main() -> ExitCode {
    let Some(binary) = std::env::args().nth(1).map(PathBuf::from) else {
        eprintln!("usage: demo PATH-TO-GATEWAY-BINARY");
        return ExitCode::from(2);
    };
    match demo(&binary).await {
        Ok(true) => {
            println!("demo: all cases behaved as expected");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("demo: FAILED: a case did not behave as expected");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn demo(binary: &std::path::Path) -> Result<bool, String> {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let toml = format!("access_log = \"{}\"\n", pki.path("access.log").display())
        + &listener_toml(&pki, "edge", "")
        + &route_toml(
            "orders",
            &["orders.example.internal"],
            &[backend.addr],
            &[SPIFFE_FRONTEND],
        );
    let config = pki.write("gateway.toml", &toml);
    println!(
        "demo: throwaway PKI and config in {} (removed on exit)",
        pki.dir.path().display()
    );
    println!("demo: echo backend on {}", backend.addr);

    let stderr = pki.path("gateway.stderr");
    let mut child = Command::new(binary)
        .args(["--log-format", "json", "run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    let result = cases(&pki, &backend, &stderr).await;
    // Stop the gateway whatever happened: SIGTERM, then wait for it.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let until = Instant::now() + Duration::from_secs(10);
    let exited = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            _ if Instant::now() > until => break None,
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let stopped_ok = match exited {
        Some(status) if status.success() => {
            println!("PASS  gateway stopped on SIGTERM and exited 0");
            true
        }
        other => {
            let _ = child.kill();
            println!("FAIL  gateway did not stop cleanly on SIGTERM: {other:?}");
            false
        }
    };
    let log = std::fs::read_to_string(pki.path("access.log")).unwrap_or_default();
    println!("demo: access log:");
    for line in log.lines() {
        println!("  {line}");
    }
    Ok(result? && stopped_ok)
}

async fn cases(pki: &Pki, backend: &EchoBackend, stderr: &std::path::Path) -> Result<bool, String> {
    let addr = listening_addr(stderr)?;
    println!("demo: gateway listening on {addr}");
    let sni = "orders.example.internal";
    let mut ok = true;

    let data = payload(1 << 20);
    let allowed = match connect(addr, sni, pki.frontend_config()).await {
        Ok(tls) => echo_roundtrip(tls, data.clone())
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match allowed {
        Ok(got) if got == data => {
            println!("PASS  allowed client {SPIFFE_FRONTEND}: 1 MiB echoed byte-exact")
        }
        Ok(got) => {
            ok = false;
            println!(
                "FAIL  allowed client: echoed {} bytes, not the 1 MiB sent",
                got.len()
            );
        }
        Err(e) => {
            ok = false;
            println!("FAIL  allowed client: {e}");
        }
    }

    let expect = |case: &str, got: AlertDescription, want: AlertDescription, ok: &mut bool| {
        if got == want {
            println!("PASS  {case}: refused with {want:?}");
        } else {
            *ok = false;
            println!("FAIL  {case}: refused with {got:?}, expected {want:?}");
        }
    };
    let alert = refusal(addr, sni, pki.client_config(None)).await;
    expect(
        "client without a certificate",
        alert,
        AlertDescription::CertificateRequired,
        &mut ok,
    );
    let other = pki.client("intruder", &LeafSpec::client("intruder", &[SPIFFE_OTHER]));
    let alert = refusal(addr, sni, pki.client_config(Some(&other))).await;
    expect(
        &format!("client {SPIFFE_OTHER}"),
        alert,
        AlertDescription::AccessDenied,
        &mut ok,
    );

    if backend.accepted() == 1 {
        println!("PASS  only the allowed client reached the backend");
    } else {
        ok = false;
        println!(
            "FAIL  backend saw {} connections, expected 1",
            backend.accepted()
        );
    }
    Ok(ok)
}

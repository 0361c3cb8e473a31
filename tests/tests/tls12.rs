//! TLS 1.2's own pitfalls, on the legs where the gateway allows it: every
//! GCM record's explicit nonce unique under its key on the userspace path
//! (the kernel path's check runs in the VM, `ktls.rs`), and no session
//! without the extended master secret (RFC 7627), towards clients and
//! towards backends.

use std::path::Path;
use std::process::{Command, Stdio};

use gateway_tests::*;
use rustls::CipherSuite;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_path_never_repeats_a_gcm_nonce() {
    for suite in [
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    ] {
        let (record, ..) = tls12_gcm_nonces_through("userspace", suite).await;
        assert_eq!(record.offload.as_deref(), Some("userspace"));
        assert_eq!(record.tls_version.as_deref(), Some("TLSv1.2"));
    }
}

/// An OpenSSL config that turns the extended master secret off, as an old
/// or misconfigured peer would.
fn no_ems_config(pki: &Pki) -> std::path::PathBuf {
    pki.write(
        "no-ems.cnf",
        "openssl_conf = default_conf\n[default_conf]\nssl_conf = ssl_sect\n[ssl_sect]\n\
         system_default = system_default_sect\n[system_default_sect]\n\
         Options = -ExtendedMasterSecret\n",
    )
}

/// `openssl s_client -tls1_2` through the gateway, optionally with `conf`;
/// true when it got data back through the route.
fn s_client_tls12(pki: &Pki, addr: std::net::SocketAddr, conf: Option<&Path>) -> bool {
    let client = pki.frontend();
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-tls1_2", "-quiet", "-connect"])
        .arg(addr.to_string())
        .args(["-servername", "orders.example.internal", "-CAfile"])
        .arg(pki.path("server-roots.pem"))
        .arg("-cert")
        .arg(&client.cert_path)
        .arg("-cert_chain")
        .arg(&client.cert_path)
        .arg("-key")
        .arg(&client.key_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(conf) = conf {
        cmd.env("OPENSSL_CONF", conf);
    }
    let mut child = cmd.spawn().expect("openssl s_client");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        let _ = stdin.write_all(b"ping\n");
    }
    let out = child.wait_with_output().expect("s_client ran");
    String::from_utf8_lossy(&out.stdout).contains("ping")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls12_client_without_extended_master_secret_is_refused() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    // s_client -quiet waits for the server to close: a short idle timeout
    // ends the served session.
    let toml = listener_toml(
        &pki,
        "edge",
        "tls_versions = [\"1.2\"]\nidle_timeout = \"1s\"",
    ) + &route_toml(
        "orders",
        &["orders.example.internal"],
        &[backend.addr],
        &[SPIFFE_FRONTEND],
    );
    let mut gw = RunningGateway::start(&pki, &toml).await;
    let addr = gw.app_addr;
    let conf = no_ems_config(&pki);
    let (pki, ok) = tokio::task::spawn_blocking(move || {
        let ok = s_client_tls12(&pki, addr, None);
        (pki, ok)
    })
    .await
    .unwrap();
    assert!(
        ok,
        "the same client with the extended master secret is served"
    );
    let served = gw.next_record().await;
    assert_eq!(served.tls_version.as_deref(), Some("TLSv1.2"), "{served:?}");
    let refused = tokio::task::spawn_blocking(move || s_client_tls12(&pki, addr, Some(&conf)))
        .await
        .unwrap();
    assert!(!refused, "no data through a session without it");
    let record = gw.next_record().await;
    assert!(
        record.reason.contains("ExtendedMasterSecret"),
        "{}",
        record.reason
    );
    assert_eq!(
        backend.accepted(),
        1,
        "only the first client reached the backend"
    );
}

/// `openssl s_server -tls1_2` as the backend, answering with `conf`.
struct OpensslServer(std::process::Child, std::net::SocketAddr);

impl OpensslServer {
    fn start(pki: &Pki, conf: Option<&Path>) -> OpensslServer {
        let leaf = pki
            .intermediate
            .issue(&gateway::pki::LeafSpec::server(
                "backend",
                &["dns:orders.backend.internal"],
            ))
            .expect("backend leaf");
        let cert = pki.write(
            "openssl-backend.pem",
            &format!("{}{}", leaf.cert_pem, pki.intermediate.cert_pem),
        );
        let key = pki.write("openssl-backend.key", &leaf.key_pem);
        let port = dead_port().port();
        let mut cmd = Command::new("openssl");
        cmd.args(["s_server", "-tls1_2", "-quiet", "-rev", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(&cert)
            .arg("-cert_chain")
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(conf) = conf {
            cmd.env("OPENSSL_CONF", conf);
        }
        let child = cmd.spawn().expect("openssl s_server");
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = std::time::Instant::now() + STEP;
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(std::time::Instant::now() < deadline, "s_server listening");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        OpensslServer(child, addr)
    }
}

impl Drop for OpensslServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls12_backend_without_extended_master_secret_is_refused() {
    let pki = Pki::new();
    let conf = no_ems_config(&pki);
    for (conf, served) in [(None, true), (Some(conf.as_path()), false)] {
        let backend = OpensslServer::start(&pki, conf);
        let toml = listener_toml(&pki, "edge", "")
            + &route_toml(
                "orders",
                &["orders.example.internal"],
                &[backend.1],
                &[SPIFFE_FRONTEND],
            )
            + &format!(
                "upstream_tls = {{ ca = \"{}\", server_name = \"orders.backend.internal\" }}\n",
                pki.path("server-roots.pem").display()
            );
        let mut gw = RunningGateway::start(&pki, &toml).await;
        let tls = connect(
            gw.app_addr,
            "orders.example.internal",
            pki.frontend_config(),
        )
        .await
        .expect("client handshake");
        let got = echo_line(tls, b"ping\n").await;
        let record = gw.next_record().await;
        if served {
            assert_eq!(got.as_deref(), Some(&b"gnip\n"[..]), "{record:?}");
        } else {
            assert_eq!(got, None, "nothing through a backend session without EMS");
            assert!(
                record.reason.contains("ExtendedMasterSecret"),
                "{}",
                record.reason
            );
        }
    }
}

/// Sends a line and reads one back; None when the connection ends first.
async fn echo_line(
    mut tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    line: &[u8],
) -> Option<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(line).await.ok()?;
    let mut got = vec![0u8; line.len()];
    tokio::time::timeout(STEP, tls.read_exact(&mut got))
        .await
        .ok()?
        .ok()?;
    Some(got)
}

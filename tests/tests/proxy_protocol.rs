//! `proxy_protocol = "v2"`: what a backend learns about the client, read
//! with a maintained parser (the `proxy-header` crate) and with HAProxy
//! itself as the backend.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use gateway::access_log::Verdict;
use gateway::pki::{Authority, LeafSpec};
use gateway_tests::attack::{metric, refused};
use gateway_tests::*;
use proxy_header::{ParseConfig, ProxyHeader, Tlv};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;

const SNI: &str = "orders.example.internal";
const BACKEND: &str = "orders.backend.internal";

fn config(pki: &Pki, backend: SocketAddr, extra: &str) -> String {
    listener_toml(pki, "edge", "")
        + &route_toml("orders", &[SNI], &[backend], &[SPIFFE_FRONTEND])
        + "proxy_protocol = \"v2\"\n"
        + extra
}

/// Connects, round-trips `msg`, and gives back the client's own address.
async fn talk(gw: &RunningGateway, client: std::sync::Arc<rustls::ClientConfig>) -> SocketAddr {
    let tls = connect(gw.app_addr, SNI, client).await.unwrap();
    let me = tls.get_ref().0.local_addr().unwrap();
    let msg = payload(70_000);
    let back = echo_roundtrip(tls, msg.clone()).await.unwrap();
    assert!(
        back == msg,
        "the bytes after the header are the client's, unchanged"
    );
    me
}

async fn next_header(rx: &mut mpsc::Receiver<Vec<u8>>) -> Vec<u8> {
    tokio::time::timeout(STEP, rx.recv())
        .await
        .expect("the backend read a header in time")
        .expect("backend alive")
}

fn custom(header: &ProxyHeader<'_>, kind: u8) -> Option<Vec<u8>> {
    header
        .tlvs()
        .find_map(|t| match t.expect("well-formed TLV") {
            Tlv::Custom(k, v) if k == kind => Some(v.into_owned()),
            _ => None,
        })
}

/// Every fact an admitted client's header carries, as the parser reads it.
fn assert_admitted_header(bytes: &[u8], client: SocketAddr, gateway: SocketAddr) {
    let (header, used) = ProxyHeader::parse(bytes, ParseConfig::default()).expect("parses");
    assert_eq!(used, bytes.len(), "the announced length is the header");
    let addr = header.proxied_address().expect("PROXY, not LOCAL");
    assert_eq!(addr.source, client, "source: the client");
    assert_eq!(addr.destination, gateway, "destination: the listener");
    assert_eq!(header.authority(), Some(SNI));
    let ssl = header.ssl().expect("PP2_TYPE_SSL");
    assert!(ssl.client_ssl() && ssl.client_cert_conn() && ssl.client_cert_sess());
    assert_eq!(ssl.verify(), 0, "verified");
    assert_eq!(ssl.version(), Some("TLSv1.3"));
    assert_eq!(ssl.cn(), Some("frontend"));
    assert_eq!(ssl.cipher(), Some("TLS_AES_256_GCM_SHA384"));
    assert_eq!(
        ssl.sig_alg(),
        Some("ecdsa-with-SHA256"),
        "the listener certificate's"
    );
    assert_eq!(ssl.key_alg(), Some("EC256"), "the listener certificate's");
    let identity: Vec<String> =
        serde_json::from_slice(&custom(&header, 0xE0).expect("identity TLV")).unwrap();
    assert_eq!(identity, [SPIFFE_FRONTEND]);
    assert_eq!(custom(&header, 0xE1).as_deref(), Some(&b"orders"[..]));
}

#[tokio::test]
async fn the_backend_reads_who_the_client_was_before_any_byte() {
    let pki = Pki::new();
    let (backend, mut headers) = proxy_header_backend(None).await;
    let mut gw = RunningGateway::start(&pki, &config(&pki, backend, "")).await;
    let client = talk(&gw, pki.frontend_config()).await;
    assert_admitted_header(&next_header(&mut headers).await, client, gw.app_addr);
    let rec = gw.next_record().await;
    assert_eq!(
        rec.client_to_backend_bytes, 70_000,
        "the header is not the client's bytes"
    );
}

#[tokio::test]
async fn with_upstream_tls_the_header_precedes_the_backend_handshake() {
    let pki = Pki::new();
    let tls = backend_server_config(&pki, &[BACKEND], false, rustls::DEFAULT_VERSIONS, |_| true);
    let (backend, mut headers) = proxy_header_backend(Some(tls)).await;
    let upstream = format!(
        "upstream_tls = {{ ca = \"{}\", server_name = \"{BACKEND}\" }}\n",
        pki.path("server-roots.pem").display()
    );
    let gw = RunningGateway::start(&pki, &config(&pki, backend, &upstream)).await;
    let client = talk(&gw, pki.frontend_config()).await;
    assert_admitted_header(&next_header(&mut headers).await, client, gw.app_addr);
}

#[tokio::test]
async fn the_client_certificate_goes_along_only_when_asked_for() {
    let pki = Pki::new();
    let (backend, mut headers) = proxy_header_backend(None).await;
    let creds = pki.frontend();
    let gw = RunningGateway::start(
        &pki,
        &config(&pki, backend, "proxy_protocol_client_cert = true\n"),
    )
    .await;
    talk(&gw, pki.client_config(Some(&creds))).await;
    let bytes = next_header(&mut headers).await;
    let (header, _) = ProxyHeader::parse(&bytes, ParseConfig::default()).unwrap();
    let ssl = header.ssl().unwrap();
    let cert = ssl.tlvs().find_map(|t| match t.unwrap() {
        Tlv::Custom(0x28, der) => Some(der.into_owned()),
        _ => None,
    });
    assert_eq!(
        cert.as_deref(),
        Some(creds.chain[0].as_ref()),
        "the leaf, DER"
    );

    let (backend, mut headers) = proxy_header_backend(None).await;
    let gw = RunningGateway::start(&pki, &config(&pki, backend, "")).await;
    talk(&gw, pki.frontend_config()).await;
    let bytes = next_header(&mut headers).await;
    let (header, _) = ProxyHeader::parse(&bytes, ParseConfig::default()).unwrap();
    assert!(
        header
            .ssl()
            .unwrap()
            .tlvs()
            .all(|t| !matches!(t, Ok(Tlv::Custom(0x28, _)))),
        "no certificate unless the route sends it"
    );
}

/// Audit lets a client through that the policy would refuse: the backend
/// must not read that as a verified identity.
#[tokio::test]
async fn an_audited_would_deny_is_not_sent_as_verified() {
    let pki = Pki::new();
    let (backend, mut headers) = proxy_header_backend(None).await;
    let gw = RunningGateway::start(&pki, &config(&pki, backend, "mode = \"audit\"\n")).await;
    let intruder = pki.client("intruder", &LeafSpec::client("intruder", &[SPIFFE_OTHER]));
    talk(&gw, pki.client_config(Some(&intruder))).await;
    let bytes = next_header(&mut headers).await;
    let (header, _) = ProxyHeader::parse(&bytes, ParseConfig::default()).unwrap();
    let ssl = header.ssl().unwrap();
    assert!(ssl.client_cert_conn());
    assert_ne!(ssl.verify(), 0, "not verified");
    assert_eq!(
        ssl.cn(),
        None,
        "no CN for a would-deny (HAProxy sends it; its certificate may name anyone)"
    );
    assert_eq!(custom(&header, 0xE0), None, "no identity TLV");
    assert_eq!(custom(&header, 0xE1).as_deref(), Some(&b"orders"[..]));
}

/// What the backend is told of the client, from a header's bytes:
/// (`CERT_CONN`, `verify`, the identity TLV, the client certificate).
struct Told {
    cert_conn: bool,
    verify: u32,
    identity: Option<Vec<u8>>,
    cert: Option<Vec<u8>>,
}

fn told(bytes: &[u8]) -> Told {
    let (header, _) = ProxyHeader::parse(bytes, ParseConfig::default()).expect("parses");
    let ssl = header.ssl().expect("PP2_TYPE_SSL");
    Told {
        cert_conn: ssl.client_cert_conn(),
        verify: ssl.verify(),
        identity: custom(&header, 0xE0),
        cert: ssl
            .tlvs()
            .find_map(|t| match t.expect("well-formed sub-TLV") {
                Tlv::Custom(0x28, der) => Some(der.into_owned()),
                _ => None,
            }),
    }
}

/// The spec: verify is "zero if the client presented a certificate and it
/// was successfully verified"; go-proxyproto's `Verified()` reads 0 as
/// verified. A client with none (audit's would-deny, any client of `off`)
/// must not read as verified.
#[tokio::test]
async fn a_client_without_a_certificate_is_not_sent_as_verified() {
    let pki = Pki::new();
    for (mode, allow) in [("audit", &[SPIFFE_FRONTEND][..]), ("off", &[])] {
        let (backend, mut headers) = proxy_header_backend(None).await;
        let toml = listener_toml(&pki, "edge", "")
            + &route_toml("orders", &[SNI], &[backend], allow)
            + &format!("proxy_protocol = \"v2\"\nmode = \"{mode}\"\n");
        let gw = RunningGateway::start(&pki, &toml).await;
        talk(&gw, pki.client_config(None)).await;
        let t = told(&next_header(&mut headers).await);
        assert!(!t.cert_conn, "{mode}");
        assert_ne!(t.verify, 0, "{mode}: no certificate, not verified");
        assert_eq!(t.identity, None, "{mode}");
    }
}

/// Audit lets through a certificate of any issuer, self-signed included:
/// the backend must not be handed it as the client's certificate.
#[tokio::test]
async fn audit_forwards_no_unverified_certificate() {
    let pki = Pki::new();
    let (backend, mut headers) = proxy_header_backend(None).await;
    let gw = RunningGateway::start(
        &pki,
        &config(
            &pki,
            backend,
            "mode = \"audit\"\nproxy_protocol_client_cert = true\n",
        ),
    )
    .await;
    let evil = Authority::root("evil root").unwrap();
    let issued = evil
        .issue(&LeafSpec::client("frontend", &[SPIFFE_FRONTEND]))
        .unwrap();
    let forged = pki.creds("forged", &issued, &evil);
    talk(&gw, pki.client_config(Some(&forged))).await;
    let t = told(&next_header(&mut headers).await);
    assert!(t.cert_conn);
    assert_ne!(t.verify, 0);
    assert_eq!(t.identity, None);
    assert_eq!(t.cert, None, "the forged leaf does not reach the backend");
}

/// A header HAProxy could not read within its 16 KiB buffer (a large
/// client certificate) is not sent: the connection is refused, counted
/// and logged as such, and the backend sees nothing.
#[tokio::test]
async fn a_header_too_large_for_the_backend_is_refused_and_counted() {
    let pki = Pki::new();
    let (backend, mut headers) = proxy_header_backend(None).await;
    let toml = format!(
        "admin = \"127.0.0.1:0\"\n{}",
        config(&pki, backend, "proxy_protocol_client_cert = true\n")
    );
    let mut gw = RunningGateway::start(&pki, &toml).await;
    // Some 20 KB of DNS names beside the identity the route allows.
    let label = "a".repeat(60);
    let names: Vec<String> = (0..80)
        .map(|i| format!("dns:{label}.{label}.{label}.n{i}.example.internal"))
        .collect();
    let mut sans = vec![SPIFFE_FRONTEND];
    sans.extend(names.iter().map(String::as_str));
    let big = pki.client("big", &LeafSpec::client("frontend", &sans));
    assert!(big.chain[0].len() > gateway::proxy_protocol::MAX_HEADER_LEN);
    let mut tls = connect(gw.app_addr, SNI, pki.client_config(Some(&big)))
        .await
        .expect("the handshake itself succeeds");
    let _ = tls.write_all(b"hello").await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(STEP, tls.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(matches!(n, Ok(0) | Err(_)), "closed, nothing echoed: {n:?}");
    let rec = gw.next_record().await;
    assert_eq!(rec.verdict, Verdict::Error, "{rec:?}");
    assert!(rec.reason.contains("PROXY v2 header"), "{rec:?}");
    assert_eq!(rec.backend, None, "{rec:?}");
    assert_eq!(
        metric(&gw, &refused("proxy_header_too_large")).await,
        1,
        "counted"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), headers.recv())
            .await
            .is_err(),
        "the backend was sent nothing"
    );
}

/// Connects and holds the TCP connection without a byte, so its
/// handshake begins under the state of now.
async fn hold(gw: &RunningGateway) -> TcpStream {
    let held = TcpStream::connect(gw.app_addr).await.unwrap();
    // Accepted (and so pinned to this state) before the reload.
    tokio::time::sleep(Duration::from_millis(300)).await;
    held
}

/// Completes the held connection's handshake after a reload and sends a
/// few bytes.
async fn finish(held: TcpStream, client: std::sync::Arc<rustls::ClientConfig>) {
    let name = ServerName::try_from(SNI.to_owned()).unwrap();
    let mut tls = tokio::time::timeout(STEP, TlsConnector::from(client).connect(name, held))
        .await
        .expect("handshake in time")
        .expect("handshake");
    tls.write_all(b"hello").await.unwrap();
    let mut back = [0u8; 5];
    tokio::time::timeout(STEP, tls.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("echo");
}

/// A handshake that straddles a reload is judged by the new state, and so
/// is what its backend is told: a reload that puts the route in audit with
/// an allow list the client is not on leaves it a would-deny, sent as
/// unverified and logged and counted as `audit`.
#[tokio::test]
async fn a_reload_to_audit_during_the_handshake_is_not_sent_as_admitted() {
    let pki = Pki::new();
    let (backend, mut headers) = proxy_header_backend(None).await;
    let mut gw = RunningGateway::start(&pki, &config(&pki, backend, "")).await;
    let held = hold(&gw).await;
    let narrower = listener_toml(&pki, "edge", "")
        + &route_toml("orders", &[SNI], &[backend], &[SPIFFE_OTHER])
        + "proxy_protocol = \"v2\"\nmode = \"audit\"\n";
    gw.reload_toml(&pki, &narrower)
        .await
        .expect("reload applied");
    finish(held, pki.frontend_config()).await;
    let t = told(&next_header(&mut headers).await);
    assert!(t.cert_conn);
    assert_ne!(t.verify, 0, "not admitted by the current state");
    assert_eq!(t.identity, None);
    let rec = gw.next_record().await;
    assert_eq!(rec.verdict, Verdict::Audit, "{rec:?}");
    assert!(
        rec.reason.contains("would deny (judged after a reload)"),
        "the handshake straddled the reload: {rec:?}"
    );
    assert_eq!(gw.stats("orders").2, 1, "counted as audited");
}

/// The same when the reload changes nothing but a CRL that revokes the
/// client's certificate, on a route that audits all along.
#[tokio::test]
async fn a_certificate_revoked_during_the_handshake_is_not_sent_as_admitted() {
    let pki = Pki::new();
    let (creds, serial) = pki.revocable_frontend("victim");
    pki.write("int.crl.pem", &pki.intermediate.crl(1, &[]).unwrap());
    let (backend, mut headers) = proxy_header_backend(None).await;
    let toml = listener_toml(&pki, "edge", &pki.crls_line(&["int.crl.pem"]))
        + &route_toml("orders", &[SNI], &[backend], &[SPIFFE_FRONTEND])
        + "proxy_protocol = \"v2\"\nproxy_protocol_client_cert = true\nmode = \"audit\"\n";
    let mut gw = RunningGateway::start(&pki, &toml).await;
    let held = hold(&gw).await;
    pki.write("int.crl.pem", &pki.intermediate.crl(2, &[&serial]).unwrap());
    gw.reload_toml(&pki, &toml).await.expect("reload applied");
    finish(held, pki.client_config(Some(&creds))).await;
    let t = told(&next_header(&mut headers).await);
    assert!(t.cert_conn);
    assert_ne!(t.verify, 0, "revoked: not verified");
    assert_eq!(t.identity, None);
    assert_eq!(t.cert, None, "no revoked certificate for the backend");
    let rec = gw.next_record().await;
    assert_eq!(rec.verdict, Verdict::Audit, "{rec:?}");
    assert!(
        rec.reason.contains("judged after a reload"),
        "the handshake straddled the reload: {rec:?}"
    );
    assert!(rec.reason.to_lowercase().contains("revoked"), "{rec:?}");
}

/// A reload to `off` during the handshake: `off` checks no certificate, so
/// the backend is told of none verified and gets no identity.
#[tokio::test]
async fn a_reload_to_off_during_the_handshake_sends_no_identity() {
    let pki = Pki::new();
    let (backend, mut headers) = proxy_header_backend(None).await;
    let mut gw = RunningGateway::start(&pki, &config(&pki, backend, "")).await;
    let held = hold(&gw).await;
    let off = listener_toml(&pki, "edge", "")
        + &route_toml("orders", &[SNI], &[backend], &[])
        + "proxy_protocol = \"v2\"\nmode = \"off\"\n";
    gw.reload_toml(&pki, &off).await.expect("reload applied");
    finish(held, pki.frontend_config()).await;
    let t = told(&next_header(&mut headers).await);
    assert_ne!(t.verify, 0);
    assert_eq!(t.identity, None, "no identity on an off route");
    let rec = gw.next_record().await;
    assert_eq!(rec.mode.as_deref(), Some("off"), "{rec:?}");
    // An `off` route asks for no certificate: one read means the
    // handshake began under the enforcing state.
    assert!(
        rec.identity.is_some(),
        "the handshake straddled the reload: {rec:?}"
    );
}

/// A reload that turns the header off while a connection is still
/// connecting (its backend has the header, or is about to): the backend,
/// set up for the new setting, would misread it, so the connection is
/// closed like one whose backend left the route.
#[tokio::test]
async fn a_proxy_protocol_change_closes_a_connection_still_connecting() {
    let pki = Pki::new();
    // Takes the header, then never answers the upstream TLS handshake.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = silent.local_addr().unwrap();
    let (tx, mut reached) = mpsc::channel(1);
    tokio::spawn(async move {
        let (mut tcp, _) = silent.accept().await.unwrap();
        let mut fixed = [0u8; 16];
        let _ = tcp.read_exact(&mut fixed).await;
        let _ = tx.send(()).await;
        tokio::time::sleep(STEP).await;
    });
    let upstream = format!(
        "upstream_tls = {{ ca = \"{}\", server_name = \"{BACKEND}\" }}\n",
        pki.path("server-roots.pem").display()
    );
    let with = |pp: &str| {
        listener_toml(&pki, "edge", "connect_timeout = \"10s\"")
            + &route_toml("orders", &[SNI], &[backend], &[SPIFFE_FRONTEND])
            + pp
            + &upstream
    };
    let mut gw = RunningGateway::start(&pki, &with("proxy_protocol = \"v2\"\n")).await;
    let mut tls = connect(gw.app_addr, SNI, pki.frontend_config())
        .await
        .unwrap();
    tls.write_all(b"hello").await.unwrap();
    tokio::time::timeout(STEP, reached.recv())
        .await
        .expect("the gateway reached the backend");
    gw.reload_toml(&pki, &with(""))
        .await
        .expect("reload applied");
    let started = std::time::Instant::now();
    let rec = gw.next_record().await;
    assert!(
        rec.reason.contains("PROXY protocol setting"),
        "closed for the change, not by the connect timeout: {rec:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "{rec:?}");
}

#[tokio::test]
async fn without_the_setting_the_backend_reads_only_the_clients_bytes() {
    let pki = Pki::new();
    let backend = ObservingBackend::start().await;
    let toml = listener_toml(&pki, "edge", "")
        + &route_toml("orders", &[SNI], &[backend.addr], &[SPIFFE_FRONTEND]);
    let gw = RunningGateway::start(&pki, &toml).await;
    let mut backend = backend;
    let mut tls = connect(gw.app_addr, SNI, pki.frontend_config())
        .await
        .unwrap();
    tls.write_all(b"hello").await.unwrap();
    tls.shutdown().await.unwrap();
    let (got, _) = tokio::time::timeout(STEP, backend.next_end())
        .await
        .unwrap();
    assert_eq!(got, b"hello");
}

/// A config that names `proxy_protocol_client_cert` without a header to
/// put it in is refused, naming the field.
#[test]
fn client_cert_without_proxy_protocol_is_refused() {
    let pki = Pki::new();
    let toml = format!(
        "access_log = \"off\"\n{}{}proxy_protocol_client_cert = true\n",
        listener_toml(&pki, "edge", ""),
        route_toml("orders", &[SNI], &[dead_port()], &[SPIFFE_FRONTEND])
    );
    let err = gateway::Config::parse(&toml, std::path::Path::new("t.toml"), pki.dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("proxy_protocol_client_cert"), "{err}");
    let toml = toml.replace(
        "proxy_protocol_client_cert = true",
        "proxy_protocol = \"v3\"",
    );
    let err = gateway::Config::parse(&toml, std::path::Path::new("t.toml"), pki.dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("proxy_protocol"), "{err}");
}

/// HAProxy as the backend (`accept-proxy`): it takes the header, TLVs and
/// all, and logs the client, the listener and the SNI it read there; from
/// HAProxy 2.9 on also the identity and route TLVs (`fc_pp_tlv`).
#[tokio::test]
async fn haproxy_accepts_the_header_and_logs_what_it_read() {
    let Some(version) = haproxy_version() else {
        eprintln!("SKIP: no haproxy binary (apt-get install haproxy)");
        return;
    };
    let pki = Pki::new();
    let echo = EchoBackend::start().await;
    let port = dead_port();
    let has_tlv = version >= (2, 9);
    let tlvs = if has_tlv {
        " identity=%[fc_pp_tlv(0xE0)] route=%[fc_pp_tlv(0xE1)]"
    } else {
        ""
    };
    let cfg = format!(
        "global\n  log stdout format raw local0\n\
         defaults\n  mode tcp\n  log global\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n\
         listen pp\n  bind {port} accept-proxy\n  \
         log-format \"pp src=%ci:%cp dst=%fi:%fp authority=%[fc_pp_authority]{tlvs}\"\n  \
         server echo {}\n",
        echo.addr
    );
    let cfg_path = pki.write("haproxy.cfg", &cfg);
    let mut haproxy = tokio::process::Command::new("haproxy")
        .args(["-db", "-f"])
        .arg(&cfg_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("haproxy starts");
    let deadline = tokio::time::Instant::now() + STEP;
    while TcpStream::connect(port).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "haproxy never listened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gw = RunningGateway::start(
        &pki,
        &config(&pki, port, "proxy_protocol_client_cert = true\n"),
    )
    .await;
    let client = talk(&gw, pki.frontend_config()).await;
    let mut stdout = haproxy.stdout.take().unwrap();
    let mut log = String::new();
    let mut buf = [0u8; 4096];
    while !log.contains('\n') {
        let n = tokio::time::timeout(STEP, stdout.read(&mut buf))
            .await
            .expect("haproxy logged the connection")
            .unwrap();
        assert!(n > 0, "haproxy exited: {log}");
        log.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let _ = haproxy.kill().await;
    let line = log
        .lines()
        .find(|l| l.starts_with("pp "))
        .unwrap_or_else(|| panic!("{log}"));
    let mut want = format!(
        "pp src={}:{} dst={}:{} authority={SNI}",
        client.ip(),
        client.port(),
        gw.app_addr.ip(),
        gw.app_addr.port()
    );
    if has_tlv {
        want += &format!(" identity=[\"{SPIFFE_FRONTEND}\"] route=orders");
    } else {
        eprintln!(
            "haproxy {version:?} predates fc_pp_tlv (2.9): the identity and route TLVs were \
             accepted but not logged"
        );
    }
    assert_eq!(line, want);
}

fn haproxy_version() -> Option<(u32, u32)> {
    let out = std::process::Command::new("haproxy")
        .arg("-v")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.split_whitespace().nth(2)?;
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

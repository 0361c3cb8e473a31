//! The whole proxy in-process: bytes through it, refusals with their alerts,
//! routing, failures and limits, drain. Each test builds its own PKI and
//! backends on 127.0.0.1.

use std::time::Duration;

use gateway::access_log::Verdict;
use gateway::pki::{LeafSpec, Profile};
use gateway_tests::*;
use rustls::AlertDescription;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ORDERS: &str = "orders.example.internal";
const BILLING: &str = "billing.example.internal";

/// One listener, one route for ORDERS allowing the frontend SPIFFE ID.
async fn standard(pki: &Pki, backend: &EchoBackend, listener_extra: &str) -> RunningGateway {
    let toml = listener_toml(pki, "edge", listener_extra)
        + &route_toml(
            "orders",
            &[ORDERS],
            &[backend.addr],
            &[SPIFFE_FRONTEND, "dns:batch.example.internal"],
        );
    RunningGateway::start(pki, &toml).await
}

#[tokio::test]
async fn allowed_client_echoes_8_mib_byte_exact_and_is_logged() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let mut gw = standard(&pki, &backend, "").await;
    let tls = connect(gw.app_addr, ORDERS, pki.frontend_config())
        .await
        .expect("handshake");
    let data = payload(8 << 20);
    let got = echo_roundtrip(tls, data.clone()).await.expect("echo");
    assert_eq!(got.len(), data.len());
    assert!(got == data, "echoed bytes differ");

    let rec = gw.next_record().await;
    assert_eq!(rec.verdict, Verdict::Allow);
    assert_eq!(rec.listener, "edge");
    assert_eq!(rec.route.as_deref(), Some("orders"));
    assert_eq!(rec.sni.as_deref(), Some(ORDERS));
    assert_eq!(rec.identity, Some(vec![SPIFFE_FRONTEND.to_owned()]));
    assert_eq!(rec.reason, format!("allowed by {SPIFFE_FRONTEND}"));
    assert_eq!(rec.backend, Some(backend.addr.to_string()));
    assert_eq!(rec.client_to_backend_bytes, 8 << 20);
    assert_eq!(rec.backend_to_client_bytes, 8 << 20);
    assert_eq!(rec.tls_version.as_deref(), Some("TLSv1.3"));
    assert!(
        rec.cipher_suite
            .as_deref()
            .is_some_and(|s| s.starts_with("TLS13_")),
        "{rec:?}"
    );
}

#[tokio::test]
async fn empty_stream_closes_cleanly() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let mut gw = standard(&pki, &backend, "").await;
    let tls = connect(gw.app_addr, ORDERS, pki.frontend_config())
        .await
        .expect("handshake");
    let got = echo_roundtrip(tls, Vec::new()).await.expect("clean close");
    assert!(got.is_empty());
    let rec = gw.next_record().await;
    assert_eq!(
        (
            rec.verdict,
            rec.client_to_backend_bytes,
            rec.backend_to_client_bytes
        ),
        (Verdict::Allow, 0, 0)
    );
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test]
async fn client_half_close_reaches_the_backend_and_the_reply_still_flows() {
    let pki = Pki::new();
    // A backend that reads to EOF and only then answers: it needs the
    // client's FIN to arrive while its own direction stays open.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let backend = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        s.write_all(format!("got {} bytes", got.len()).as_bytes())
            .await
            .unwrap();
        s.shutdown().await.unwrap();
    });
    let toml = listener_toml(&pki, "edge", "")
        + &route_toml("orders", &[ORDERS], &[addr], &[SPIFFE_FRONTEND]);
    let _gw = RunningGateway::start(&pki, &toml).await;
    let mut tls = connect(_gw.app_addr, ORDERS, pki.frontend_config())
        .await
        .unwrap();
    tls.write_all(&payload(100_000)).await.unwrap();
    tls.shutdown().await.unwrap(); // close_notify + FIN
    let mut reply = Vec::new();
    tokio::time::timeout(STEP, tls.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, b"got 100000 bytes");
    backend.await.unwrap();
}

#[tokio::test]
async fn backend_half_close_reaches_the_client_and_the_client_can_still_send() {
    let pki = Pki::new();
    // A backend that greets, closes its sending side at once, then reads.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let backend = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"hello, then silence").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        got
    });
    let toml = listener_toml(&pki, "edge", "")
        + &route_toml("orders", &[ORDERS], &[addr], &[SPIFFE_FRONTEND]);
    let gw = RunningGateway::start(&pki, &toml).await;
    let mut tls = connect(gw.app_addr, ORDERS, pki.frontend_config())
        .await
        .unwrap();
    let mut greeting = Vec::new();
    // EOF here is the backend's FIN, turned into close_notify by the gateway.
    tokio::time::timeout(STEP, tls.read_to_end(&mut greeting))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(greeting, b"hello, then silence");
    tls.write_all(b"late words").await.unwrap();
    tls.shutdown().await.unwrap();
    let got = tokio::time::timeout(STEP, backend).await.unwrap().unwrap();
    assert_eq!(got, b"late words");
}

#[tokio::test]
async fn refusals_carry_the_right_alert_and_never_reach_the_backend() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let mut gw = standard(&pki, &backend, "").await;
    let addr = gw.app_addr;
    let now = time::OffsetDateTime::now_utc();

    // No certificate at all.
    let alert = refusal(addr, ORDERS, pki.client_config(None)).await;
    assert_eq!(alert, AlertDescription::CertificateRequired);
    let rec = gw.next_record().await;
    assert_eq!(
        (rec.verdict, rec.reason.as_str()),
        (Verdict::Deny, "client presented no certificate")
    );

    // A valid certificate for another identity.
    let other = pki.client("intruder", &LeafSpec::client("intruder", &[SPIFFE_OTHER]));
    assert_eq!(
        refusal(addr, ORDERS, pki.client_config(Some(&other))).await,
        AlertDescription::AccessDenied
    );
    let rec = gw.next_record().await;
    assert_eq!(rec.verdict, Verdict::Deny);
    assert_eq!(rec.identity, Some(vec![SPIFFE_OTHER.to_owned()]));
    assert!(
        rec.reason.contains("not in the route's allow list"),
        "{}",
        rec.reason
    );

    // Issued by a CA the listener does not trust.
    let foreign_root = gateway::pki::Authority::root("foreign root").unwrap();
    let foreign = foreign_root
        .issue(&LeafSpec::client("frontend", &[SPIFFE_FRONTEND]))
        .unwrap();
    let foreign = pki.creds("foreign", &foreign, &foreign_root);
    assert_eq!(
        refusal(addr, ORDERS, pki.client_config(Some(&foreign))).await,
        AlertDescription::UnknownCA
    );

    // Expired, and not yet valid.
    let mut spec = LeafSpec::client("frontend", &[SPIFFE_FRONTEND]);
    spec.not_before = now - time::Duration::days(10);
    spec.not_after = now - time::Duration::days(1);
    let expired = pki.client("expired", &spec);
    assert_eq!(
        refusal(addr, ORDERS, pki.client_config(Some(&expired))).await,
        AlertDescription::CertificateExpired
    );
    spec.not_before = now + time::Duration::days(1);
    spec.not_after = now + time::Duration::days(10);
    let future = pki.client("future", &spec);
    assert_eq!(
        refusal(addr, ORDERS, pki.client_config(Some(&future))).await,
        AlertDescription::CertificateExpired
    );

    // A wildcard SAN is never an identity, even next to an allowed one.
    let wildcard = pki.client(
        "wildcard",
        &LeafSpec::client("w", &[SPIFFE_FRONTEND, "dns:*.example.internal"]),
    );
    assert_eq!(
        refusal(addr, ORDERS, pki.client_config(Some(&wildcard))).await,
        AlertDescription::BadCertificate
    );

    // A server certificate (serverAuth only) and one without any EKU.
    let server_cert = pki.client(
        "server-as-client",
        &LeafSpec::server("frontend", &[SPIFFE_FRONTEND]),
    );
    assert_eq!(
        refusal(addr, ORDERS, pki.client_config(Some(&server_cert))).await,
        AlertDescription::UnsupportedCertificate
    );
    let no_eku = pki.client(
        "no-eku",
        &LeafSpec::new(Profile::NoEku, "frontend", &[SPIFFE_FRONTEND]),
    );
    assert_eq!(
        refusal(addr, ORDERS, pki.client_config(Some(&no_eku))).await,
        AlertDescription::UnsupportedCertificate
    );

    // A CA certificate used as a client leaf.
    let mut ca_spec = LeafSpec::client("frontend", &[SPIFFE_FRONTEND]);
    ca_spec.is_ca = true;
    let ca_leaf = pki.client("ca-leaf", &ca_spec);
    let alert = refusal(addr, ORDERS, pki.client_config(Some(&ca_leaf))).await;
    assert!(
        matches!(
            alert,
            AlertDescription::CertificateUnknown | AlertDescription::BadCertificate
        ),
        "{alert:?}"
    );

    // A leaf with a critical extension the gateway cannot process
    // (RFC 5280 §4.2: it must be refused, not ignored).
    let mut critical = LeafSpec::client("frontend", &[SPIFFE_FRONTEND]);
    critical.unknown_critical_extension = true;
    let critical = pki.client("unknown-critical", &critical);
    assert_eq!(
        refusal(addr, ORDERS, pki.client_config_unchecked(&critical)).await,
        AlertDescription::CertificateUnknown
    );

    assert_eq!(
        backend.accepted(),
        0,
        "no refused client may reach the backend"
    );
}

#[tokio::test]
async fn common_name_is_ignored_unless_the_route_opts_in() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let cn_only = pki.client("legacy", &LeafSpec::client("legacy-client", &[]));
    // Same CN, no opt-in: the CN is not an identity.
    let gw = standard(&pki, &backend, "").await;
    assert_eq!(
        refusal(gw.app_addr, ORDERS, pki.client_config(Some(&cn_only))).await,
        AlertDescription::AccessDenied
    );
    let toml = listener_toml(&pki, "legacy", "")
        + &route_toml("legacy", &[], &[backend.addr], &["cn:legacy-client"])
            .replace("allow =", "match_common_name = true\nallow =");
    let gw = RunningGateway::start(&pki, &toml).await;
    let tls = connect(gw.app_addr, ORDERS, pki.client_config(Some(&cn_only)))
        .await
        .unwrap();
    assert_eq!(echo_roundtrip(tls, b"cn".to_vec()).await.unwrap(), b"cn");
}

#[tokio::test]
async fn sni_routes_to_different_backends_with_a_default_and_unknown_names_refused() {
    let pki = Pki::new();
    let orders = EchoBackend::start().await;
    let billing = EchoBackend::start().await;
    let toml = listener_toml(&pki, "edge", "")
        + &route_toml("orders", &[ORDERS], &[orders.addr], &[SPIFFE_FRONTEND])
        + &route_toml("billing", &[BILLING], &[billing.addr], &[SPIFFE_FRONTEND]);
    let mut gw = RunningGateway::start(&pki, &toml).await;
    let client = pki.frontend_config();
    for (sni, backend) in [
        (ORDERS, &orders),
        (BILLING, &billing),
        ("ORDERS.example.internal", &orders),
    ] {
        let tls = connect(gw.app_addr, sni, client.clone()).await.unwrap();
        assert_eq!(
            echo_roundtrip(tls, sni.as_bytes().to_vec()).await.unwrap(),
            sni.as_bytes()
        );
        assert_eq!(
            gw.next_record().await.backend,
            Some(backend.addr.to_string())
        );
    }
    assert_eq!((orders.accepted(), billing.accepted()), (2, 1));

    let err = connect(gw.app_addr, "unknown.example.internal", client.clone())
        .await
        .unwrap_err();
    assert_eq!(
        alert_of(&err),
        Some(AlertDescription::UnrecognisedName),
        "{err}"
    );
    let rec = gw.next_record().await;
    assert_eq!(rec.verdict, Verdict::Error);
    assert!(
        rec.reason.contains("no route for server name"),
        "{}",
        rec.reason
    );

    // With a default route, the unknown name lands there.
    let fallback = EchoBackend::start().await;
    let toml = listener_toml(&pki, "edge", "")
        + &route_toml("orders", &[ORDERS], &[orders.addr], &[SPIFFE_FRONTEND])
        + &route_toml("fallback", &[], &[fallback.addr], &[SPIFFE_FRONTEND]);
    let gw = RunningGateway::start(&pki, &toml).await;
    // A name the server certificate covers but no route claims.
    let tls = connect(gw.app_addr, "gateway.example.internal", client)
        .await
        .unwrap();
    assert_eq!(echo_roundtrip(tls, b"x".to_vec()).await.unwrap(), b"x");
    assert_eq!(fallback.accepted(), 1);
}

#[tokio::test]
async fn failover_skips_a_dead_backend_and_all_down_closes_promptly() {
    let pki = Pki::new();
    let live = EchoBackend::start().await;
    let dead = dead_port();
    let toml = listener_toml(&pki, "edge", "")
        + &route_toml("orders", &[ORDERS], &[dead, live.addr], &[SPIFFE_FRONTEND]);
    let gw = RunningGateway::start(&pki, &toml).await;
    let client = pki.frontend_config();
    for _ in 0..4 {
        let tls = connect(gw.app_addr, ORDERS, client.clone()).await.unwrap();
        assert_eq!(echo_roundtrip(tls, b"ok".to_vec()).await.unwrap(), b"ok");
    }
    assert_eq!(live.accepted(), 4);

    let toml = listener_toml(&pki, "edge", "")
        + &route_toml(
            "orders",
            &[ORDERS],
            &[dead, dead_port()],
            &[SPIFFE_FRONTEND],
        );
    let mut gw = RunningGateway::start(&pki, &toml).await;
    let started = std::time::Instant::now();
    let mut tls = connect(gw.app_addr, ORDERS, client).await.unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(STEP, tls.read_to_end(&mut buf))
        .await
        .expect("closed, not hung");
    assert!(
        r.is_ok() && buf.is_empty(),
        "orderly close without data: {r:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed promptly"
    );
    let rec = gw.next_record().await;
    assert_eq!(rec.verdict, Verdict::Allow);
    assert!(
        rec.reason
            .contains("no backend reachable after 2 attempt(s)"),
        "{}",
        rec.reason
    );
}

#[tokio::test]
async fn max_connections_refuses_the_one_too_many() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let toml = format!(
        "admin = \"127.0.0.1:0\"\n{}",
        listener_toml(&pki, "edge", "max_connections = 2")
    ) + &route_toml("orders", &[ORDERS], &[backend.addr], &[SPIFFE_FRONTEND]);
    let mut gw = RunningGateway::start(&pki, &toml).await;
    let client = pki.frontend_config();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut tls = connect(gw.app_addr, ORDERS, client.clone()).await.unwrap();
        tls.write_all(b"hold").await.unwrap();
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.unwrap();
        held.push(tls);
    }
    let third = connect(gw.app_addr, ORDERS, client.clone()).await;
    assert!(third.is_err(), "third connection must be refused");
    // Refused at accept: counted (and logged at a bounded rate), with no
    // access-log line, which a flood would turn into a second flood.
    assert!(gw.scrape().await.contains(
        "gateway_connections_refused_total{listener=\"edge\",reason=\"max_connections\"} 1"
    ));
    // A slot frees when a connection ends: on the worker that served it,
    // which may say so a moment after its access-log line, while the next
    // connection lands on another worker.
    let first = held.remove(0);
    echo_roundtrip(first, Vec::new()).await.unwrap();
    let _ = gw.next_record().await;
    let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let tls = loop {
        match connect(gw.app_addr, ORDERS, client.clone()).await {
            Ok(tls) => break tls,
            Err(e) => assert!(
                std::time::Instant::now() < until,
                "the freed slot was never given again: {e}"
            ),
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(
        echo_roundtrip(tls, b"again".to_vec()).await.unwrap(),
        b"again"
    );
}

#[tokio::test]
async fn handshake_timeout_closes_a_silent_client() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let mut gw = standard(&pki, &backend, "handshake_timeout = \"300ms\"").await;
    let mut silent = TcpStream::connect(gw.app_addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(STEP, silent.read(&mut buf))
        .await
        .expect("closed, not hung");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(started.elapsed() >= Duration::from_millis(250));
    let rec = gw.next_record().await;
    assert_eq!(rec.reason, "handshake timeout after 300ms");
}

#[tokio::test]
async fn tls12_only_when_the_listener_opts_in() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let tls12 = pki.client_config_versions(Some(&pki.frontend()), &[&rustls::version::TLS12]);
    let gw = standard(&pki, &backend, "").await;
    let err = connect(gw.app_addr, ORDERS, tls12.clone())
        .await
        .unwrap_err();
    assert_eq!(
        alert_of(&err),
        Some(AlertDescription::ProtocolVersion),
        "{err}"
    );

    let mut gw = standard(&pki, &backend, "tls_versions = [\"1.2\", \"1.3\"]").await;
    let tls = connect(gw.app_addr, ORDERS, tls12).await.unwrap();
    assert_eq!(
        echo_roundtrip(tls, payload(70_000)).await.unwrap(),
        payload(70_000)
    );
    assert_eq!(
        gw.next_record().await.tls_version.as_deref(),
        Some("TLSv1.2")
    );
}

#[tokio::test]
async fn drain_on_shutdown_lets_a_live_transfer_finish_and_refuses_new_ones() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let mut gw = standard(&pki, &backend, "").await;
    let client = pki.frontend_config();
    let mut tls = connect(gw.app_addr, ORDERS, client.clone()).await.unwrap();
    tls.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    tls.read_exact(&mut buf).await.unwrap();

    gw.shutdown.shutdown();
    // The listener closes: new connections are refused.
    let mut refused = false;
    for _ in 0..50 {
        if TcpStream::connect(gw.app_addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "listener still accepting after shutdown");
    // The live connection keeps working to the end.
    let data = payload(2 << 20);
    let got = echo_roundtrip(tls, data.clone()).await.unwrap();
    assert!(got == data);
    // A probe connect accepted just before the loops stopped has a line
    // of its own (no bytes); the live connection's is the one that moved
    // bytes.
    let rec = loop {
        let rec = gw.next_record().await;
        if rec.client_to_backend_bytes > 0 {
            break rec;
        }
    };
    assert_eq!(rec.client_to_backend_bytes, 6 + (2 << 20));
    tokio::time::timeout(STEP, gw.task.as_mut().expect("in-runtime gateway"))
        .await
        .expect("run() returns after drain")
        .unwrap();
}

#[tokio::test]
async fn drain_timeout_closes_what_is_left() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let toml = format!(
        "drain_timeout = \"300ms\"\n{}",
        listener_toml(&pki, "edge", "")
    ) + &route_toml("orders", &[ORDERS], &[backend.addr], &[SPIFFE_FRONTEND]);
    let mut gw = RunningGateway::start(&pki, &toml).await;
    let mut tls = connect(gw.app_addr, ORDERS, pki.frontend_config())
        .await
        .unwrap();
    tls.write_all(b"idle after this").await.unwrap();
    let mut buf = [0u8; 15];
    tls.read_exact(&mut buf).await.unwrap();
    gw.shutdown.shutdown();
    tokio::time::timeout(STEP, gw.task.as_mut().expect("in-runtime gateway"))
        .await
        .expect("run() returns")
        .unwrap();
    let rec = gw.next_record().await;
    assert!(rec.reason.contains("drain timeout"), "{}", rec.reason);
}

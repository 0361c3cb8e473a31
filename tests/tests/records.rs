//! The userspace path: after the rustls handshake the gateway opens and seals
//! TLS records itself. Every suite and version must interoperate with a
//! rustls peer byte for byte, half-close must carry close_notify both ways,
//! and what the record layer cannot take must end the connection with a
//! reason, never garbage.

use gateway_tests::*;
use rustls::CipherSuite;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: usize = 1024 * 1024;

fn gateway_toml(pki: &Pki, backend: std::net::SocketAddr) -> String {
    let mut toml = listener_toml(
        pki,
        "edge",
        "tls_versions = [\"1.2\", \"1.3\"]\noffload = \"userspace\"",
    );
    toml.push_str(&route_toml(
        "orders",
        &["orders.example.internal"],
        &[backend],
        &[SPIFFE_FRONTEND],
    ));
    toml
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_suite_is_byte_exact_through_the_record_layer() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let mut gw = RunningGateway::start(&pki, &gateway_toml(&pki, backend.addr)).await;
    let matrix = [
        (
            &rustls::version::TLS13,
            CipherSuite::TLS13_AES_128_GCM_SHA256,
        ),
        (
            &rustls::version::TLS13,
            CipherSuite::TLS13_AES_256_GCM_SHA384,
        ),
        (
            &rustls::version::TLS13,
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        ),
        (
            &rustls::version::TLS12,
            CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ),
        (
            &rustls::version::TLS12,
            CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        ),
        (
            &rustls::version::TLS12,
            CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ),
    ];
    for (version, suite) in matrix {
        let tls = connect(
            gw.app_addr,
            "orders.example.internal",
            pki.client_with_suite(version, suite),
        )
        .await
        .unwrap_or_else(|e| panic!("{suite:?}: handshake: {e}"));
        // Odd sizes: records split across reads and writes at every offset.
        let data = payload(8 * MIB + 12_345);
        let got = echo_roundtrip(tls, data.clone())
            .await
            .unwrap_or_else(|e| panic!("{suite:?}: echo: {e}"));
        assert!(got == data, "{suite:?}: came back byte-exact");
        let record = gw.next_record().await;
        assert_eq!(record.offload.as_deref(), Some("userspace"), "{record:?}");
        assert_eq!(record.client_to_backend_bytes, data.len() as u64);
        assert_eq!(record.backend_to_client_bytes, data.len() as u64);
        assert!(
            record.reason.contains("allowed by") && !record.reason.contains("error"),
            "{suite:?}: ended cleanly with close_notify both ways: {record:?}"
        );
    }
}

/// The client half-closes (close_notify): the backend sees EOF, keeps
/// writing, and its EOF reaches the client as close_notify (a clean EOF for rustls).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_carries_close_notify_both_ways() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let mut gw = RunningGateway::start(&pki, &gateway_toml(&pki, backend.addr)).await;
    let mut tls = connect(
        gw.app_addr,
        "orders.example.internal",
        pki.frontend_config(),
    )
    .await
    .expect("handshake");
    tls.write_all(b"last words").await.unwrap();
    tls.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(STEP, tls.read_to_end(&mut back))
        .await
        .expect("not hung")
        .expect("clean EOF: the gateway sent close_notify");
    assert_eq!(back, b"last words");
    let record = gw.next_record().await;
    assert!(!record.reason.contains("error"), "{record:?}");
}

/// A TLS 1.3 KeyUpdate: the record layer has the traffic keys but not the
/// secrets to derive new ones, so it ends the connection and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_update_closes_with_a_reason() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let mut gw = RunningGateway::start(&pki, &gateway_toml(&pki, backend.addr)).await;
    let mut tls = connect(
        gw.app_addr,
        "orders.example.internal",
        pki.frontend_config(),
    )
    .await
    .expect("handshake");
    tls.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    tls.read_exact(&mut buf).await.unwrap();
    tls.get_mut()
        .1
        .refresh_traffic_keys()
        .expect("key update queued");
    tls.write_all(b"after").await.unwrap();
    tls.flush().await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(STEP, tls.read_to_end(&mut rest))
        .await
        .expect("closed, not hung");
    let record = gw.next_record().await;
    assert!(record.reason.contains("KeyUpdate"), "{record:?}");
    assert_eq!(
        record.client_to_backend_bytes, 6,
        "nothing after the KeyUpdate passed"
    );
}

/// Bytes that are not a TLS record from the peer: the connection ends with
/// the record layer's reason and nothing reaches the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_record_ends_the_connection() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let mut gw = RunningGateway::start(&pki, &gateway_toml(&pki, backend.addr)).await;
    let tls = connect(
        gw.app_addr,
        "orders.example.internal",
        pki.frontend_config(),
    )
    .await
    .expect("handshake");
    // One byte there and back first: the record layer has the connection
    // now. Sent any sooner, the forged record could still reach rustls'
    // handshake, which refuses it with its own words.
    let mut tls = tls;
    tls.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    tokio::time::timeout(STEP, tls.read_exact(&mut one))
        .await
        .expect("echoed, not hung")
        .expect("echoed");
    // Underneath rustls: an application-data record whose tag cannot verify.
    let (mut tcp, _session) = tls.into_inner();
    let mut forged = vec![23, 3, 3, 0, 40];
    forged.extend_from_slice(&[0xAB; 40]);
    tcp.write_all(&forged).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(STEP, tcp.read_to_end(&mut rest))
        .await
        .expect("closed, not hung");
    let record = gw.next_record().await;
    assert!(record.reason.contains("failed to decrypt"), "{record:?}");
    assert_eq!(
        record.client_to_backend_bytes, 1,
        "only the byte before the forgery"
    );
    assert_eq!(backend.accepted(), 1);
}

/// A connection on which nothing moves either way is closed after the
/// listener's idle_timeout, and the access log says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_time_out() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let toml = gateway_toml(&pki, backend.addr).replace(
        "offload = \"userspace\"",
        "offload = \"userspace\"\nidle_timeout = \"300ms\"",
    );
    let mut gw = RunningGateway::start(&pki, &toml).await;
    let mut tls = connect(
        gw.app_addr,
        "orders.example.internal",
        pki.frontend_config(),
    )
    .await
    .expect("handshake");
    tls.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(STEP, tls.read_to_end(&mut rest))
        .await
        .expect("closed by the gateway, not hung");
    let record = gw.next_record().await;
    assert!(
        record.reason.contains("idle timeout after 300ms"),
        "{record:?}"
    );
}

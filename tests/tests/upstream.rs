//! Stage 1 of the rollout: the gateway originates mTLS to backends that
//! require it, verifying them by CA and name.

use std::sync::atomic::Ordering;

use gateway::pki::LeafSpec;
use gateway_tests::*;

const SNI: &str = "orders.example.internal";
const BACKEND: &str = "orders.backend.internal";

fn route(pki: &Pki, backend: std::net::SocketAddr, server_name: &str, with_cert: bool) -> String {
    let cert = if with_cert {
        let gw = pki
            .intermediate
            .issue(&LeafSpec::client(
                "gateway",
                &["spiffe://example.internal/gateway"],
            ))
            .unwrap();
        pki.write(
            "gw-client.pem",
            &format!("{}{}", gw.cert_pem, pki.intermediate.cert_pem),
        );
        pki.write("gw-client.key", &gw.key_pem);
        format!(
            ", cert = \"{}\", key = \"{}\"",
            pki.path("gw-client.pem").display(),
            pki.path("gw-client.key").display()
        )
    } else {
        String::new()
    };
    listener_toml(pki, "edge", "")
        + &route_toml("orders", &[SNI], &[backend], &[SPIFFE_FRONTEND])
        + &format!(
            "upstream_tls = {{ ca = \"{}\", server_name = \"{server_name}\"{cert} }}\n",
            pki.path("server-roots.pem").display()
        )
}

#[tokio::test]
async fn mtls_to_a_backend_that_requires_a_client_certificate() {
    let pki = Pki::new();
    let (backend, accepted) = tls_echo_backend(&pki, &[BACKEND], true).await;
    let mut gw = RunningGateway::start(&pki, &route(&pki, backend, BACKEND, true)).await;
    let tls = connect(gw.app_addr, SNI, pki.frontend_config())
        .await
        .unwrap();
    let data = payload(1 << 20);
    let got = echo_roundtrip(tls, data.clone()).await.unwrap();
    assert!(
        got == data,
        "bytes through client TLS and backend TLS match"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    let rec = gw.next_record().await;
    assert_eq!(
        (rec.client_to_backend_bytes, rec.backend_to_client_bytes),
        (1 << 20, 1 << 20)
    );
}

#[tokio::test]
async fn a_backend_with_the_wrong_name_is_refused() {
    let pki = Pki::new();
    let (backend, accepted) = tls_echo_backend(&pki, &["impostor.backend.internal"], false).await;
    let mut gw = RunningGateway::start(&pki, &route(&pki, backend, BACKEND, true)).await;
    let mut tls = connect(gw.app_addr, SNI, pki.frontend_config())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(
        STEP,
        tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut buf),
    )
    .await
    .unwrap();
    assert!(r.is_ok() && buf.is_empty(), "closed without data: {r:?}");
    let rec = gw.next_record().await;
    assert!(
        rec.reason.contains("TLS to backend") && rec.reason.contains("not valid for name"),
        "{}",
        rec.reason
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn without_our_client_certificate_a_strict_backend_refuses() {
    let pki = Pki::new();
    let (backend, accepted) = tls_echo_backend(&pki, &[BACKEND], true).await;
    let mut gw = RunningGateway::start(&pki, &route(&pki, backend, BACKEND, false)).await;
    let tls = connect(gw.app_addr, SNI, pki.frontend_config())
        .await
        .unwrap();
    let r = echo_roundtrip(tls, b"anyone?".to_vec()).await;
    assert!(r.as_ref().map_or(true, |got| got.is_empty()), "{r:?}");
    let rec = gw.next_record().await;
    // TLS 1.3: the gateway's side of the handshake is over before the
    // backend judges its (missing) certificate, so the backend's alert
    // comes either to the handshake's end or after the first write, which
    // then meets a closed connection: either way the log says what the
    // backend said, not the broken pipe the write saw.
    assert!(rec.reason.contains("CertificateRequired"), "{}", rec.reason);
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
}

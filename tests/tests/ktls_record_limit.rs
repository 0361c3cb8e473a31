//! The kernel does not stop a key at its cipher's record limit, so the
//! gateway reads the kernel's record sequence and closes before it. The limit
//! is lowered for this process (its own test binary, so no other test shares
//! it) to reach it with megabytes instead of terabytes.

use gateway_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_closes_before_the_record_limit() {
    if !kernel_tls_or_skip("connection_closes_before_the_record_limit") {
        return;
    }
    const LIMIT: u64 = 500;
    gateway::offload::set_record_limit_for_tests(LIMIT);
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let mut toml = listener_toml(&pki, "edge", "offload = \"kernel\"");
    toml.push_str(&route_toml(
        "orders",
        &["orders.example.internal"],
        &[backend.addr],
        &[SPIFFE_FRONTEND],
    ));
    let mut gw = RunningGateway::start(&pki, &toml).await;
    let tls = connect(
        gw.app_addr,
        "orders.example.internal",
        pki.frontend_config(),
    )
    .await
    .expect("handshake");
    let (mut r, mut w) = tokio::io::split(tls);
    // At least twice the records the limit allows (a record holds 16 KiB).
    let data = payload(16 << 20);
    let writer = tokio::spawn(async move {
        let _ = w.write_all(&data).await;
        let _ = w.shutdown().await;
    });
    let mut got = Vec::new();
    let end = tokio::time::timeout(STEP * 3, r.read_to_end(&mut got))
        .await
        .expect("the connection ends, it does not hang");
    assert!(end.is_err(), "cut off, not a clean close_notify end");
    writer.abort();
    let record = gw.next_record().await;
    assert!(record.reason.contains("record limit"), "{record:?}");
    assert_eq!(record.offload.as_deref(), Some("kernel"));
    assert!(
        record.client_to_backend_bytes <= LIMIT * 16384,
        "stopped by the limit: {record:?}"
    );
}

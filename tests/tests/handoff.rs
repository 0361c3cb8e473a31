//! The hand-off, as an attacker plays it: the moment between the end of the
//! handshake and the start of forwarding, when rustls gives the stream to
//! the kernel or to the record layer. Hand-crafted bytes (`raw`), slow and
//! truncating peers; whatever they do, the gateway keeps serving, ends what
//! it must on time, and never makes a cut stream look like a complete one.

use std::time::Duration;

use gateway_tests::raw::{RawClient, extractable};
use gateway_tests::*;
use tokio::io::AsyncWriteExt;

fn gateway_toml(pki: &Pki, backend: std::net::SocketAddr, listener_extra: &str) -> String {
    let mut toml = format!(
        "drain_timeout = \"1s\"\n{}",
        listener_toml(pki, "edge", listener_extra)
    );
    toml.push_str(&route_toml(
        "orders",
        &["orders.example.internal"],
        &[backend],
        &[SPIFFE_FRONTEND],
    ));
    // An unauthenticated route: anyone can reach the hand-off here.
    toml.push_str(&format!(
        "\n[[listeners.routes]]\nname = \"public\"\nserver_names = [\"billing.example.internal\"]\nbackends = [\"{backend}\"]\nmode = \"off\"\n"
    ));
    toml
}

/// The review's reproduction: clients that end their handshake with
/// Finished, close_notify and the first three bytes of a record header in
/// one segment, then the header's last two bytes. rustls reads nothing
/// after close_notify; the gateway used to feed it the header's rest in a
/// loop that never ended, pinning its thread: no new connection served,
/// and SIGTERM no longer ended it. No certificate is needed on an `off`
/// route. The gateway runs on one thread, as each worker does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_notify_and_a_cut_header_at_the_hand_off_do_not_stop_the_gateway() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let mut gw = RunningGateway::start_on_own_thread(&pki, &gateway_toml(&pki, backend.addr, ""));
    let mut attackers = Vec::new();
    for _ in 0..3 {
        let (mut raw, mut last) = RawClient::until_last_flight(
            gw.app_addr,
            "billing.example.internal",
            pki.client_config(None),
        )
        .await
        .expect("handshake up to the last flight");
        raw.conn.send_close_notify();
        last.extend(raw.pending());
        last.extend([0x17, 0x03, 0x03]);
        raw.tcp.write_all(&last).await.expect("one segment");
        tokio::time::sleep(Duration::from_millis(100)).await;
        raw.tcp.write_all(&[0, 0]).await.expect("the header's rest");
        attackers.push(raw);
    }
    // An allowed client is served as ever.
    let data = payload(64 * 1024);
    let served = tokio::time::timeout(STEP, async {
        let tls = connect(
            gw.app_addr,
            "orders.example.internal",
            pki.frontend_config(),
        )
        .await?;
        echo_roundtrip(tls, data.clone()).await
    })
    .await
    .expect("the gateway still serves new connections")
    .expect("echo through the gateway");
    assert!(served == data, "byte-exact");
    assert!(
        gw.shuts_down_within(Duration::from_secs(10)).await,
        "the gateway shuts down"
    );
}

/// One byte after Finished, then silence: the gateway waits for the rest
/// of that record before it can hand the stream over. It used to wait
/// without a deadline, holding a slot and a backend connection forever.
/// Now the hand-off runs under the handshake timeout, and the backend sees
/// the stream cut (a reset), not finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stalls_the_hand_off_is_closed_at_the_handshake_timeout() {
    let pki = Pki::new();
    let mut backend = ObservingBackend::start().await;
    let mut gw = RunningGateway::start(
        &pki,
        &gateway_toml(&pki, backend.addr, "handshake_timeout = \"1s\""),
    )
    .await;
    let (mut raw, mut last) = RawClient::until_last_flight(
        gw.app_addr,
        "orders.example.internal",
        pki.frontend_config(),
    )
    .await
    .expect("handshake up to the last flight");
    last.push(0x17);
    raw.tcp.write_all(&last).await.expect("flight and one byte");
    let record = gw.next_record().await;
    assert!(
        record.reason.contains("hand-off timed out"),
        "{}",
        record.reason
    );
    assert_eq!(backend.next_end().await, (Vec::new(), StreamEnd::Reset));
    assert_eq!(gw.registry.len(), 0, "nothing is held");
    // The client too is told the stream was cut, not ended.
    let mut rest = [0u8; 64];
    let read = tokio::time::timeout(STEP, tokio::io::AsyncReadExt::read(&mut raw.tcp, &mut rest))
        .await
        .expect("closed, not hung");
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "a reset, not the FIN of an orderly end"
    );
}

/// The same stall with a long handshake timeout: shutdown's drain timeout
/// still ends it, so SIGTERM always ends the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_ends_a_connection_stalled_in_the_hand_off() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let mut gw = RunningGateway::start(
        &pki,
        &gateway_toml(&pki, backend.addr, "handshake_timeout = \"60s\""),
    )
    .await;
    let (mut raw, mut last) = RawClient::until_last_flight(
        gw.app_addr,
        "orders.example.internal",
        pki.frontend_config(),
    )
    .await
    .expect("handshake up to the last flight");
    last.push(0x17);
    raw.tcp.write_all(&last).await.expect("flight and one byte");
    // The connection is live (registered) and stalled.
    let deadline = tokio::time::Instant::now() + STEP;
    while gw.registry.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(gw.registry.len(), 1);
    assert!(
        gw.shuts_down_within(Duration::from_secs(5)).await,
        "drain_timeout (1s) ends the stalled hand-off"
    );
}

/// Finished and three bytes of the next record header, then FIN without
/// close_notify: the stream was cut inside the hand-off. The backend must
/// see a reset, never the FIN of a request that ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncation_at_the_hand_off_resets_a_plain_backend() {
    let pki = Pki::new();
    let mut backend = ObservingBackend::start().await;
    let mut gw = RunningGateway::start(&pki, &gateway_toml(&pki, backend.addr, "")).await;
    let (mut raw, mut last) = RawClient::until_last_flight(
        gw.app_addr,
        "orders.example.internal",
        pki.frontend_config(),
    )
    .await
    .expect("handshake up to the last flight");
    last.extend([0x17, 0x03, 0x03]);
    raw.tcp
        .write_all(&last)
        .await
        .expect("flight and a cut header");
    raw.tcp.shutdown().await.expect("FIN");
    assert_eq!(backend.next_end().await, (Vec::new(), StreamEnd::Reset));
    let record = gw.next_record().await;
    assert!(
        record.reason.contains("hand-off from rustls failed")
            // Inside the record or (when rustls saw the FIN first) before
            // close_notify: the client's stream was cut, and the line says so.
            && record
                .reason
                .contains("truncation: the client closed the connection"),
        "{}",
        record.reason
    );
}

/// In steady state: data, then FIN without close_notify. The data reaches
/// the backend, then a reset (the client's stream was truncated), and the
/// access log calls it truncation from the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncation_after_data_resets_a_plain_backend() {
    let pki = Pki::new();
    let mut backend = ObservingBackend::start().await;
    let mut gw = RunningGateway::start(&pki, &gateway_toml(&pki, backend.addr, "")).await;
    let (raw, last) = RawClient::until_last_flight(
        gw.app_addr,
        "orders.example.internal",
        extractable(&pki.frontend_config()),
    )
    .await
    .expect("handshake up to the last flight");
    let mut records = raw.into_records();
    let mut bytes = last;
    bytes.extend(records.seal(rustls::ContentType::ApplicationData, b"GET / HTTP/1.0\r\n"));
    records
        .send(&bytes)
        .await
        .expect("flight and a partial request");
    // The echo comes back: the request reached the backend.
    let (typ, echoed) = records.recv().await.expect("echo").expect("a record");
    assert_eq!(
        (typ, &echoed[..]),
        (
            rustls::ContentType::ApplicationData,
            &b"GET / HTTP/1.0\r\n"[..]
        )
    );
    records
        .tcp
        .shutdown()
        .await
        .expect("FIN without close_notify");
    let (got, end) = backend.next_end().await;
    assert_eq!(got, b"GET / HTTP/1.0\r\n");
    assert_eq!(
        end,
        StreamEnd::Reset,
        "the backend must not see the cut request as complete"
    );
    let record = gw.next_record().await;
    assert!(
        record.reason.contains("client → backend") && record.reason.contains("truncation"),
        "{}",
        record.reason
    );
}

/// A record split between the ClientHello's segment and the last flight's
/// (here a ChangeCipherSpec, which a TLS 1.3 client may send): the gateway
/// follows the framing from the first byte, so the hand-off starts at the
/// right record and the connection works byte-exact. Counting from after
/// the ClientHello misaligned the hand-off: the connection stalled or broke.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_split_across_the_hello_keeps_the_hand_off_aligned() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let mut gw = RunningGateway::start(
        &pki,
        &gateway_toml(&pki, backend.addr, "handshake_timeout = \"5s\""),
    )
    .await;
    let mut raw = RawClient::start(
        gw.app_addr,
        "orders.example.internal",
        extractable(&pki.frontend_config()),
    )
    .await
    .expect("connect");
    let mut hello = raw.pending();
    hello.extend([0x14, 0x03, 0x03]);
    raw.tcp
        .write_all(&hello)
        .await
        .expect("hello and half a CCS");
    // Unsent: what the client sends after its hello must follow the
    // half record, whichever reads the server's flight arrives in.
    let last = raw.handshake_unsent().await.expect("server flight");
    let mut records = raw.into_records();
    let mut bytes = vec![0x00, 0x01, 0x01];
    bytes.extend(last);
    let data = payload(100_000);
    for chunk in data.chunks(16384) {
        bytes.extend(records.seal(rustls::ContentType::ApplicationData, chunk));
    }
    records.send(&bytes).await.expect("the rest");
    let mut echoed = Vec::new();
    while echoed.len() < data.len() {
        match records.recv().await.expect("records from the gateway") {
            Some((rustls::ContentType::ApplicationData, p)) => echoed.extend(p),
            other => panic!("expected the echo, got {other:?}"),
        }
    }
    assert!(echoed == data, "byte-exact through an aligned hand-off");
    let close = records.seal(rustls::ContentType::Alert, &[1, 0]);
    records.send(&close).await.expect("close_notify");
    let record = gw.next_record().await;
    assert_eq!(
        record.client_to_backend_bytes,
        data.len() as u64,
        "{record:?}"
    );
}

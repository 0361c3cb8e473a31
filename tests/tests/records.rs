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

mod strict {
    //! What the record layer refuses, fed hand-crafted records sealed with
    //! the client's real keys (`raw`): each refusal ends the connection
    //! with the alert rustls would send for it, says why in the access
    //! log, and lets nothing from the offending record reach the backend.

    use super::*;
    use gateway_tests::raw::{RawRecords, established, handshake_message};
    use rustls::{AlertDescription, ContentType};

    /// A connection past its handshake, its record layer in charge (one
    /// byte has been there and back).
    async fn session(
        gw: &RunningGateway,
        pki: &Pki,
        version: &'static rustls::SupportedProtocolVersion,
    ) -> RawRecords {
        // TLS 1.2 with ChaCha20: rustls' own GCM sealing key refuses to
        // start past sequence number 0, where a TLS 1.2 client's keys are
        // once its Finished is sent.
        let config = if version.version == rustls::ProtocolVersion::TLSv1_2 {
            pki.client_with_suite(
                version,
                CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            )
        } else {
            pki.client_config_versions(Some(&pki.frontend()), &[version])
        };
        established(gw.app_addr, "orders.example.internal", config)
            .await
            .expect("an established session")
    }

    struct Case {
        name: &'static str,
        version: &'static rustls::SupportedProtocolVersion,
        records: fn(&mut RawRecords) -> Vec<u8>,
        alert: Option<AlertDescription>,
        reason: &'static str,
    }

    const TLS13: &rustls::SupportedProtocolVersion = &rustls::version::TLS13;
    const TLS12: &rustls::SupportedProtocolVersion = &rustls::version::TLS12;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn malformed_and_forbidden_records_are_refused_with_rustls_alerts() {
        let pki = Pki::new();
        let backend = EchoBackend::start().await;
        let mut gw = RunningGateway::start(&pki, &gateway_toml(&pki, backend.addr)).await;
        let cases = [
            Case {
                name: "a zero-length handshake record",
                version: TLS13,
                records: |r| r.seal(ContentType::Handshake, &[]),
                alert: Some(AlertDescription::UnexpectedMessage),
                reason: "empty handshake record",
            },
            Case {
                name: "a session ticket from the client",
                version: TLS13,
                records: |r| r.seal(ContentType::Handshake, &handshake_message(4, &[0; 16])),
                alert: Some(AlertDescription::UnexpectedMessage),
                reason: "session ticket",
            },
            Case {
                name: "a TLS 1.2 ClientHello after the handshake (renegotiation)",
                version: TLS12,
                records: |r| r.seal(ContentType::Handshake, &handshake_message(1, &[0; 40])),
                alert: Some(AlertDescription::NoRenegotiation),
                reason: "renegotiate",
            },
            Case {
                name: "33 empty records in a row",
                version: TLS13,
                records: |r| {
                    (0..33)
                        .flat_map(|_| r.seal(ContentType::ApplicationData, &[]))
                        .collect()
                },
                alert: Some(AlertDescription::UnexpectedMessage),
                reason: "empty records in a row",
            },
            Case {
                name: "a TLS 1.3 record body over 2^14 + 256 bytes",
                version: TLS13,
                records: |_| {
                    let mut rec = vec![23, 3, 3, 0x41, 0x01];
                    rec.extend(std::iter::repeat_n(0, 0x4101));
                    rec
                },
                alert: Some(AlertDescription::RecordOverflow),
                reason: "oversized",
            },
            Case {
                name: "TLS 1.3 plaintext of 2^14 + 1 bytes",
                version: TLS13,
                records: |r| r.seal(ContentType::ApplicationData, &[7; 16385]),
                alert: Some(AlertDescription::RecordOverflow),
                reason: "more than 2^14",
            },
            Case {
                name: "TLS 1.2 plaintext of 2^14 + 1 bytes",
                version: TLS12,
                records: |r| r.seal(ContentType::ApplicationData, &[7; 16385]),
                alert: Some(AlertDescription::RecordOverflow),
                reason: "more than 2^14",
            },
            Case {
                name: "a TLS 1.3 record whose outer type is not application data",
                version: TLS13,
                records: |r| {
                    let mut rec = r.seal(ContentType::ApplicationData, b"hidden");
                    rec[0] = 22;
                    rec
                },
                alert: Some(AlertDescription::UnexpectedMessage),
                reason: "outer type 22",
            },
            Case {
                name: "a record that is not version 3.x",
                version: TLS13,
                records: |r| {
                    let mut rec = r.seal(ContentType::ApplicationData, b"hidden");
                    rec[1] = 4;
                    rec
                },
                alert: Some(AlertDescription::DecodeError),
                reason: "version 4",
            },
            Case {
                // rustls would take any 3.x here; the kernel's TLS 1.3
                // records say 3.3, and the two paths must agree.
                name: "a TLS 1.3 record that says version 3.1",
                version: TLS13,
                records: |r| {
                    let mut rec = r.seal(ContentType::ApplicationData, b"hidden");
                    rec[2] = 1;
                    rec
                },
                alert: Some(AlertDescription::DecodeError),
                reason: "version 3.1",
            },
            Case {
                name: "a record whose tag does not verify",
                version: TLS13,
                records: |r| {
                    let mut rec = r.seal(ContentType::ApplicationData, b"hidden");
                    let last = rec.len() - 1;
                    rec[last] ^= 1;
                    rec
                },
                alert: Some(AlertDescription::BadRecordMac),
                reason: "bad record MAC",
            },
            Case {
                name: "a TLS 1.3 warning alert other than user_canceled",
                version: TLS13,
                records: |r| r.seal(ContentType::Alert, &[1, 42]),
                alert: Some(AlertDescription::DecodeError),
                reason: "TLS 1.3 does not allow",
            },
            Case {
                name: "an alert of unknown level",
                version: TLS13,
                records: |r| r.seal(ContentType::Alert, &[7, 0]),
                alert: Some(AlertDescription::IllegalParameter),
                reason: "unknown level",
            },
            Case {
                name: "a malformed alert",
                version: TLS13,
                records: |r| r.seal(ContentType::Alert, &[2, 40, 0]),
                alert: Some(AlertDescription::DecodeError),
                reason: "malformed TLS alert",
            },
            Case {
                // Nothing a client may send here can be taken: refused on
                // its first byte, before the rest is read or kept.
                name: "the first byte of a client's handshake message",
                version: TLS13,
                records: |r| r.seal(ContentType::Handshake, &[20]),
                alert: Some(AlertDescription::UnexpectedMessage),
                reason: "client sent handshake message 20",
            },
            Case {
                name: "a KeyUpdate split across two records",
                version: TLS13,
                records: |r| {
                    let msg = handshake_message(24, &[0]);
                    let mut bytes = r.seal(ContentType::Handshake, &msg[..3]);
                    bytes.extend(r.seal(ContentType::Handshake, &msg[3..]));
                    bytes
                },
                // Not the peer's fault: the layer cannot take new keys.
                alert: None,
                reason: "KeyUpdate",
            },
            Case {
                name: "a fatal alert from the client",
                version: TLS13,
                records: |r| r.seal(ContentType::Alert, &[2, 40]),
                alert: None,
                reason: "fatal TLS alert HandshakeFailure",
            },
        ];
        for case in cases {
            let mut r = session(&gw, &pki, case.version).await;
            let mut bytes = (case.records)(&mut r);
            // Data after the offending record must never reach the backend.
            bytes.extend(r.seal(ContentType::ApplicationData, b"after"));
            r.send(&bytes).await.expect(case.name);
            let alert = r.closing_alert().await.expect(case.name);
            assert_eq!(
                alert, case.alert,
                "{}: the alert the client sees",
                case.name
            );
            let record = gw.next_record().await;
            assert!(
                record.reason.contains(case.reason),
                "{}: {}",
                case.name,
                record.reason
            );
            assert_eq!(
                record.client_to_backend_bytes, 1,
                "{}: only the byte before it reached the backend",
                case.name
            );
        }
    }

    /// What rustls lets pass, so does the layer: 32 empty records in a row,
    /// TLS 1.3's user_canceled warning, a few TLS 1.2 warnings.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_rustls_tolerates_passes() {
        let pki = Pki::new();
        let backend = EchoBackend::start().await;
        let mut gw = RunningGateway::start(&pki, &gateway_toml(&pki, backend.addr)).await;
        for (version, noise) in [
            (TLS13, (ContentType::ApplicationData, &[][..], 32)),
            (TLS13, (ContentType::Alert, &[1, 90][..], 1)),
            (TLS12, (ContentType::Alert, &[1, 100][..], 4)),
        ] {
            let mut r = session(&gw, &pki, version).await;
            let (typ, payload, times) = noise;
            let mut bytes: Vec<u8> = (0..times).flat_map(|_| r.seal(typ, payload)).collect();
            bytes.extend(r.seal(ContentType::ApplicationData, b"data"));
            r.send(&bytes).await.unwrap();
            let (typ, echo) = r.recv().await.unwrap().expect("echo");
            assert_eq!(
                (typ, &echo[..]),
                (ContentType::ApplicationData, &b"data"[..])
            );
            let close = r.seal(ContentType::Alert, &[1, 0]);
            r.send(&close).await.unwrap();
            let record = gw.next_record().await;
            assert_eq!(record.client_to_backend_bytes, 5, "{record:?}");
        }
    }

    /// Records that carry nothing are not activity: a peer trickling empty
    /// records is closed at the idle timeout like a silent one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn empty_records_do_not_keep_a_connection_alive() {
        let pki = Pki::new();
        let backend = EchoBackend::start().await;
        let toml = gateway_toml(&pki, backend.addr).replace(
            "offload = \"userspace\"",
            "offload = \"userspace\"\nidle_timeout = \"1s\"",
        );
        let mut gw = RunningGateway::start(&pki, &toml).await;
        let mut r = session(&gw, &pki, TLS13).await;
        let started = std::time::Instant::now();
        // Fewer than 32 in a row are allowed; a close_notify-free trickle.
        let trickle = async {
            for _ in 0..20 {
                let empty = r.seal(ContentType::ApplicationData, &[]);
                if r.send(&empty).await.is_err() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        };
        let record = tokio::join!(trickle, gw.next_record()).1;
        assert!(
            record.reason.contains("idle timeout after 1s"),
            "{}",
            record.reason
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(3));
    }
}

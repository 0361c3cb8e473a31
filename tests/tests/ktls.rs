//! Kernel TLS offload, end to end: which path a connection takes and why,
//! and, on a kernel with kTLS (`cargo xtask vm-test` boots such kernels),
//! that the bytes really move through the kernel.
//!
//! Tests that need kTLS skip with a message on a kernel without it; the
//! fallback tests run everywhere.

use std::collections::HashMap;

use gateway::offload::KernelSupport;
use gateway_tests::*;
use rustls::CipherSuite;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: usize = 1024 * 1024;

/// `/proc/net/tls_stat` as name → value.
fn tls_stat() -> HashMap<String, u64> {
    std::fs::read_to_string("/proc/net/tls_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_owned(), it.next()?.parse().ok()?))
        })
        .collect()
}

fn stat_delta(before: &HashMap<String, u64>, after: &HashMap<String, u64>, name: &str) -> u64 {
    after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0)
}

fn gateway_toml(pki: &Pki, backend: std::net::SocketAddr, listener_extra: &str) -> String {
    let mut toml = listener_toml(
        pki,
        "edge",
        &format!("tls_versions = [\"1.2\", \"1.3\"]\n{listener_extra}"),
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
async fn auto_offload_says_which_path_and_why() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let toml = format!(
        "admin = \"127.0.0.1:0\"\n{}",
        gateway_toml(&pki, backend.addr, "offload = \"auto\"")
    );
    let mut gw = RunningGateway::start(&pki, &toml).await;
    let tls = connect(
        gw.app_addr,
        "orders.example.internal",
        pki.frontend_config(),
    )
    .await
    .expect("handshake");
    let data = payload(MIB);
    assert_eq!(echo_roundtrip(tls, data.clone()).await.expect("echo"), data);
    let record = gw.next_record().await;
    let metrics = gw.scrape().await;
    if KernelSupport::get().available() {
        assert_eq!(record.offload.as_deref(), Some("kernel"), "{record:?}");
        assert_eq!(record.offload_reason, None);
        assert!(
            metrics.contains(
                "gateway_offload_total{listener=\"edge\",path=\"kernel\",reason=\"none\"} 1"
            ),
            "{metrics}"
        );
    } else {
        assert_eq!(record.offload.as_deref(), Some("userspace"), "{record:?}");
        let reason = record.offload_reason.unwrap_or_default();
        assert!(reason.contains("tls ULP"), "{reason}");
        assert!(
            metrics.contains(
                "gateway_offload_total{listener=\"edge\",path=\"userspace\",reason=\"no_tls_ulp\"} 1"
            ),
            "{metrics}"
        );
    }
    assert_eq!(record.client_to_backend_bytes, MIB as u64);
    assert_eq!(record.backend_to_client_bytes, MIB as u64);
    // The metric counts what the access log does, on whichever path.
    for direction in ["client_to_backend", "backend_to_client"] {
        let line = format!(
            "gateway_bytes_total{{listener=\"edge\",route=\"orders\",direction=\"{direction}\"}} {MIB}"
        );
        assert!(metrics.lines().any(|l| l == line), "no {line} in {metrics}");
    }
}

#[tokio::test]
async fn offload_kernel_refuses_to_start_without_kernel_tls() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let toml = format!(
        "access_log = \"off\"\n{}",
        gateway_toml(&pki, backend.addr, "offload = \"kernel\"")
    );
    let config = gateway::Config::parse(&toml, &pki.path("gateway.toml"), pki.dir.path())
        .expect("config parses");
    let built = gateway::build(&config).await;
    if KernelSupport::get().available() {
        assert!(
            built.is_ok(),
            "kernel TLS is available, so the gateway starts"
        );
    } else {
        let err = built
            .err()
            .expect("no kernel TLS: start refused")
            .to_string();
        assert!(
            err.contains("offload = \"kernel\"") && err.contains("tls ULP"),
            "the error names the setting and the kernel's lack: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_userspace_path_says_configured() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let mut gw = RunningGateway::start(
        &pki,
        &gateway_toml(&pki, backend.addr, "offload = \"userspace\""),
    )
    .await;
    let tls = connect(
        gw.app_addr,
        "orders.example.internal",
        pki.frontend_config(),
    )
    .await
    .expect("handshake");
    let data = payload(4 * MIB);
    assert_eq!(echo_roundtrip(tls, data.clone()).await.expect("echo"), data);
    let record = gw.next_record().await;
    assert_eq!(record.offload.as_deref(), Some("userspace"));
    assert!(
        record
            .offload_reason
            .as_deref()
            .unwrap_or_default()
            .contains("offload = \"userspace\""),
        "{record:?}"
    );
}

/// 16 MiB each way through kTLS + splice for each suite the kernel offers,
/// proven to be the kernel's path three ways: the access log, the kernel's
/// TLS counters, and the gateway thread's read/write byte counts.
///
/// 16 MiB is 1,024 full records and 256 pipe refills each way; more only
/// adds emulated AES under TCG, where CI runs this test.
#[test]
fn kernel_path_is_byte_exact_for_every_suite() {
    const PER_SUITE: usize = 16 * MIB;
    if !kernel_tls_or_skip("kernel_path_is_byte_exact_for_every_suite") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let pki = Pki::new();
        let backend = EchoBackend::start().await;
        let mut gw = RunningGateway::start_on_own_thread(
            &pki,
            &gateway_toml(&pki, backend.addr, "offload = \"kernel\""),
        );
        let matrix = [
            (&rustls::version::TLS13, CipherSuite::TLS13_AES_128_GCM_SHA256),
            (&rustls::version::TLS13, CipherSuite::TLS13_AES_256_GCM_SHA384),
            (&rustls::version::TLS13, CipherSuite::TLS13_CHACHA20_POLY1305_SHA256),
            (&rustls::version::TLS12, CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256),
            (&rustls::version::TLS12, CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384),
            (&rustls::version::TLS12, CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256),
        ];
        let mut ran = 0;
        for (version, suite) in matrix {
            let support = KernelSupport::get();
            if support.admits(version.version, suite).is_err() {
                eprintln!("{suite:?}: not offered by this kernel ({}), skipped", support.describe());
                continue;
            }
            let stat_before = tls_stat();
            let (r0, w0) = gw.thread_io();
            let tls = connect(gw.app_addr, "orders.example.internal", pki.client_with_suite(version, suite))
                .await
                .unwrap_or_else(|e| panic!("{suite:?}: handshake: {e}"));
            let data = payload(PER_SUITE);
            let got = echo_roundtrip(tls, data.clone())
                .await
                .unwrap_or_else(|e| panic!("{suite:?}: echo: {e}"));
            assert!(got == data, "{suite:?}: 16 MiB came back byte-exact");
            let record = gw.next_record().await;
            assert_eq!(record.offload.as_deref(), Some("kernel"), "{suite:?}: {record:?}");
            assert_eq!(record.client_to_backend_bytes, PER_SUITE as u64);
            assert_eq!(record.backend_to_client_bytes, PER_SUITE as u64);
            assert!(
                record.reason.contains("allowed by"),
                "{suite:?}: ended cleanly, close_notify both ways: {record:?}"
            );
            let (r1, w1) = gw.thread_io();
            // The handshake is a few KiB; 32 MiB through userspace would show here.
            assert!(
                r1 - r0 < MIB as u64 && w1 - w0 < MIB as u64,
                "{suite:?}: the gateway thread read {} and wrote {} bytes: splice did not move the payload",
                r1 - r0,
                w1 - w0
            );
            let stat_after = tls_stat();
            assert_eq!(stat_delta(&stat_before, &stat_after, "TlsTxSw"), 1, "{suite:?}: one kTLS TX");
            assert_eq!(stat_delta(&stat_before, &stat_after, "TlsRxSw"), 1, "{suite:?}: one kTLS RX");
            assert_eq!(stat_delta(&stat_before, &stat_after, "TlsDecryptError"), 0);
            eprintln!("{suite:?}: 16 MiB each way through kTLS + splice, byte-exact");
            ran += 1;
        }
        assert!(ran >= 1, "the kernel offloads at least one suite");
    });
}

/// Half-close both ways through the kernel path: the client's close_notify
/// reaches the backend as EOF, the backend keeps writing, and its EOF comes
/// back to the client as close_notify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_path_half_close_and_close_notify() {
    if !kernel_tls_or_skip("kernel_path_half_close_and_close_notify") {
        return;
    }
    let pki = Pki::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = listener.local_addr().unwrap();
    let backend = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"ready").await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        // The client is done sending; we still answer, then close.
        s.write_all(b"after your EOF: ").await.unwrap();
        s.write_all(&got).await.unwrap();
        s.shutdown().await.unwrap();
        got
    });
    let mut gw = RunningGateway::start(
        &pki,
        &gateway_toml(&pki, backend_addr, "offload = \"kernel\""),
    )
    .await;
    let mut tls = connect(
        gw.app_addr,
        "orders.example.internal",
        pki.frontend_config(),
    )
    .await
    .expect("handshake");
    // Bytes from the backend mean the connection is past its hand-off (a
    // FIN before it would keep the connection in userspace).
    let mut ready = [0u8; 5];
    tls.read_exact(&mut ready).await.unwrap();
    assert_eq!(&ready, b"ready");
    // Live on the kernel path: the registry (GET /connections) says so,
    // and counts what the splice moved.
    let until = std::time::Instant::now() + STEP;
    loop {
        let (live, _) = gw.registry.connections(10);
        let seen = live
            .first()
            .map(|c| (c.offload.as_deref(), c.backend_to_client_bytes));
        if seen == Some((Some("kernel"), 5)) {
            break;
        }
        assert!(std::time::Instant::now() < until, "{live:?}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    tls.write_all(b"question").await.unwrap();
    tls.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(STEP, tls.read_to_end(&mut answer))
        .await
        .expect("not hung")
        .expect("clean end: the gateway sent close_notify");
    assert_eq!(answer, b"after your EOF: question");
    assert_eq!(backend.await.unwrap(), b"question");
    let record = gw.next_record().await;
    assert_eq!(record.offload.as_deref(), Some("kernel"), "{record:?}");
    assert!(
        !record.reason.contains(';'),
        "completed without error: {record:?}"
    );
}

/// The gateway originates mTLS to the backend and both legs run in the kernel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_path_on_both_legs_with_upstream_mtls() {
    if !kernel_tls_or_skip("kernel_path_on_both_legs_with_upstream_mtls") {
        return;
    }
    let pki = Pki::new();
    let (backend, accepted) = tls_echo_backend(&pki, &["backend.internal"], true).await;
    let gw_client = pki.client(
        "gateway-client",
        &gateway::pki::LeafSpec::client("gateway", &["spiffe://example.internal/gateway"]),
    );
    let mut toml = gateway_toml(&pki, backend, "offload = \"kernel\"");
    toml.push_str(&format!(
        "[listeners.routes.upstream_tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nserver_name = \"backend.internal\"\noffload = \"kernel\"\n",
        pki.path("server-roots.pem").display(),
        gw_client.cert_path.display(),
        gw_client.key_path.display(),
    ));
    let stat_before = tls_stat();
    let mut gw = RunningGateway::start(&pki, &toml).await;
    let tls = connect(
        gw.app_addr,
        "orders.example.internal",
        pki.frontend_config(),
    )
    .await
    .expect("handshake");
    let data = payload(16 * MIB);
    assert!(echo_roundtrip(tls, data.clone()).await.expect("echo") == data);
    let record = gw.next_record().await;
    assert_eq!(record.offload.as_deref(), Some("kernel"), "{record:?}");
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    let stat_after = tls_stat();
    assert_eq!(
        stat_delta(&stat_before, &stat_after, "TlsTxSw"),
        2,
        "both legs send through kTLS"
    );
    assert_eq!(
        stat_delta(&stat_before, &stat_after, "TlsRxSw"),
        2,
        "both legs receive through kTLS"
    );
}

/// `proxy_protocol = "v2"` on the kernel path: the header goes on the
/// backend's TCP stream before its TLS handshake, as on the userspace path
/// (one `upstream::connect` for both), and the legs still reach the kernel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_path_sends_the_proxy_header_before_the_backend_handshake() {
    if !kernel_tls_or_skip("kernel_path_sends_the_proxy_header_before_the_backend_handshake") {
        return;
    }
    let pki = Pki::new();
    let config = backend_server_config(
        &pki,
        &["backend.internal"],
        false,
        rustls::DEFAULT_VERSIONS,
        |_| true,
    );
    let (backend, mut headers) = proxy_header_backend(Some(config)).await;
    let mut toml = gateway_toml(&pki, backend, "offload = \"kernel\"");
    toml.push_str(&format!(
        "proxy_protocol = \"v2\"\n[listeners.routes.upstream_tls]\nca = \"{}\"\nserver_name = \"backend.internal\"\noffload = \"kernel\"\n",
        pki.path("server-roots.pem").display(),
    ));
    let mut gw = RunningGateway::start(&pki, &toml).await;
    let tls = connect(
        gw.app_addr,
        "orders.example.internal",
        pki.frontend_config(),
    )
    .await
    .expect("handshake");
    let client = tls.get_ref().0.local_addr().unwrap();
    let data = payload(MIB);
    assert!(echo_roundtrip(tls, data.clone()).await.expect("echo") == data);
    let header = tokio::time::timeout(STEP, headers.recv())
        .await
        .unwrap()
        .unwrap();
    let (header, _) =
        proxy_header::ProxyHeader::parse(&header, proxy_header::ParseConfig::default()).unwrap();
    assert_eq!(header.proxied_address().unwrap().source, client);
    assert_eq!(header.authority(), Some("orders.example.internal"));
    assert_eq!(header.ssl().unwrap().verify(), 0);
    let record = gw.next_record().await;
    assert_eq!(record.offload.as_deref(), Some("kernel"), "{record:?}");
    assert_eq!(record.client_to_backend_bytes, MIB as u64);
}

/// With the upstream leg pinned to userspace the whole connection stays in
/// userspace (a half-offloaded connection is not a path we run), and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_userspace_keeps_the_connection_in_userspace() {
    let pki = Pki::new();
    let (backend, _) = tls_echo_backend(&pki, &["backend.internal"], false).await;
    let mut toml = gateway_toml(&pki, backend, "offload = \"auto\"");
    toml.push_str(&format!(
        "[listeners.routes.upstream_tls]\nca = \"{}\"\nserver_name = \"backend.internal\"\noffload = \"userspace\"\n",
        pki.path("server-roots.pem").display(),
    ));
    let mut gw = RunningGateway::start(&pki, &toml).await;
    let tls = connect(
        gw.app_addr,
        "orders.example.internal",
        pki.frontend_config(),
    )
    .await
    .expect("handshake");
    let data = payload(2 * MIB);
    assert!(echo_roundtrip(tls, data.clone()).await.expect("echo") == data);
    let record = gw.next_record().await;
    assert_eq!(record.offload.as_deref(), Some("userspace"), "{record:?}");
    assert!(
        record
            .offload_reason
            .unwrap_or_default()
            .contains("offload = \"userspace\"")
    );
}

/// A TLS 1.3 KeyUpdate from the client: these kernels cannot take new receive
/// keys, so the gateway closes the connection and says why; it does not
/// crash and does not pass garbage on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_update_closes_with_a_reason() {
    if !kernel_tls_or_skip("key_update_closes_with_a_reason") {
        return;
    }
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let mut gw = RunningGateway::start(
        &pki,
        &gateway_toml(&pki, backend.addr, "offload = \"kernel\""),
    )
    .await;
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
    assert_eq!(&buf, b"before");
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
        "nothing after the KeyUpdate reached the backend"
    );
}

/// The fd of this process's TCP socket connected from `peer` (the gateway
/// runs in-process, so its sockets are ours to inspect).
fn socket_with_peer(peer: std::net::SocketAddr) -> Option<i32> {
    for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: sockaddr_storage is plain data; getpeername writes at most len bytes.
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: as above; a non-socket fd fails with ENOTSOCK.
        if unsafe { libc::getpeername(fd, (&raw mut ss).cast(), &mut len) } != 0 {
            continue;
        }
        if ss.ss_family as i32 != libc::AF_INET {
            continue;
        }
        // SAFETY: the family says it is a sockaddr_in.
        let sin: libc::sockaddr_in = unsafe { std::ptr::read((&raw const ss).cast()) };
        let addr = std::net::SocketAddr::from((
            std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
            u16::from_be(sin.sin_port),
        ));
        if addr == peer {
            return Some(fd);
        }
    }
    None
}

/// `rx_expect_no_pad = true` reaches the kernel on a TLS 1.3 kernel-path
/// connection, and data stays byte-exact with no padding violations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rx_expect_no_pad_reaches_the_kernel() {
    if !kernel_tls_or_skip("rx_expect_no_pad_reaches_the_kernel") {
        return;
    }
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let mut gw = RunningGateway::start(
        &pki,
        &gateway_toml(
            &pki,
            backend.addr,
            "offload = \"kernel\"\nrx_expect_no_pad = true",
        ),
    )
    .await;
    let before = tls_stat();
    let mut tls = connect(
        gw.app_addr,
        "orders.example.internal",
        pki.client_with_suite(
            &rustls::version::TLS13,
            CipherSuite::TLS13_AES_128_GCM_SHA256,
        ),
    )
    .await
    .expect("handshake");
    // One round trip, so the gateway has handed the connection to the kernel.
    tls.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.unwrap();
    let client = tls.get_ref().0.local_addr().unwrap();
    let fd = socket_with_peer(client).expect("the gateway's socket for this client");
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: reads an int option into `v`; SOL_TLS = 282, TLS_RX_EXPECT_NO_PAD = 4.
    let rc = unsafe { libc::getsockopt(fd, 282, 4, (&raw mut v).cast(), &mut len) };
    assert_eq!(
        (rc, v),
        (0, 1),
        "TLS_RX_EXPECT_NO_PAD is set on the gateway's socket"
    );
    let data = payload(16 * MIB);
    let got = echo_roundtrip(tls, data.clone()).await.expect("echo");
    assert!(got == data, "byte-exact with no-pad decryption");
    let record = gw.next_record().await;
    assert_eq!(record.offload.as_deref(), Some("kernel"), "{record:?}");
    let after = tls_stat();
    assert_eq!(stat_delta(&before, &after, "TlsRxNoPadViolation"), 0);
    assert_eq!(stat_delta(&before, &after, "TlsDecryptError"), 0);
}

/// TLS 1.2 AES-GCM on both legs through the kernel: the kernel counts its
/// explicit nonces up from the IV it is given, rustls XORed its sequence
/// into it. Given rustls' IV as is, the kernel's first record repeated the
/// nonce of rustls' Finished (GCM key recovery). Every record the gateway
/// sealed on either leg, Finished included, is read off the wire here and
/// its nonce must be new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_path_never_repeats_a_tls12_gcm_nonce() {
    if !kernel_tls_or_skip("kernel_path_never_repeats_a_tls12_gcm_nonce") {
        return;
    }
    let support = KernelSupport::get();
    let mut ran = 0;
    for suite in [
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    ] {
        if support
            .admits(rustls::ProtocolVersion::TLSv1_2, suite)
            .is_err()
        {
            eprintln!("{suite:?}: not offered by this kernel, skipped");
            continue;
        }
        let (record, client_leg, backend_leg) = tls12_gcm_nonces_through("kernel", suite).await;
        assert_eq!(record.offload.as_deref(), Some("kernel"), "{record:?}");
        eprintln!(
            "{suite:?}: {client_leg} records to the client, {backend_leg} to the backend, no nonce twice"
        );
        ran += 1;
    }
    assert!(ran >= 1, "the kernel offloads TLS 1.2 AES-GCM");
}

/// What the kernel path does with records a peer should not send, as the
/// record layer's tests (`records.rs`) check it for the userspace path:
/// each ends the connection with the alert rustls would send (the kernel
/// leaves a decryption failure pending on the socket, which must not stop
/// the alert), says why, and lets nothing after it through. A header the
/// kernel's parser refuses must end the connection, not stall it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_path_refuses_bad_records_with_alerts() {
    use gateway_tests::raw::{established, handshake_message};
    use rustls::{AlertDescription, ContentType};

    if !kernel_tls_or_skip("kernel_path_refuses_bad_records_with_alerts") {
        return;
    }
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let mut gw = RunningGateway::start(
        &pki,
        &gateway_toml(
            &pki,
            backend.addr,
            "offload = \"kernel\"\nidle_timeout = \"60s\"",
        ),
    )
    .await;
    type Records = fn(&mut gateway_tests::raw::RawRecords) -> Vec<u8>;
    let cases: [(&str, Records, AlertDescription, &str); 6] = [
        (
            "a record whose tag does not verify",
            |r| {
                let mut rec = r.seal(ContentType::ApplicationData, b"hidden");
                let last = rec.len() - 1;
                rec[last] ^= 1;
                rec
            },
            AlertDescription::BadRecordMac,
            "EBADMSG",
        ),
        (
            "a header the kernel refuses (version 3.1)",
            |r| {
                let mut rec = r.seal(ContentType::ApplicationData, b"hidden");
                rec[2] = 1;
                rec
            },
            AlertDescription::DecodeError,
            "refused to parse",
        ),
        (
            "a body over 2^14 + 256 bytes",
            |_| {
                let mut rec = vec![23, 3, 3, 0x41, 0x01];
                rec.extend(std::iter::repeat_n(0, 0x4101));
                rec
            },
            AlertDescription::RecordOverflow,
            "oversized",
        ),
        (
            "a session ticket from the client",
            |r| r.seal(ContentType::Handshake, &handshake_message(4, &[0; 16])),
            AlertDescription::UnexpectedMessage,
            "session ticket",
        ),
        (
            "an empty handshake record",
            |r| r.seal(ContentType::Handshake, &[]),
            AlertDescription::UnexpectedMessage,
            "empty handshake record",
        ),
        (
            "33 empty records in a row",
            |r| {
                (0..33)
                    .flat_map(|_| r.seal(ContentType::ApplicationData, &[]))
                    .collect()
            },
            AlertDescription::UnexpectedMessage,
            "empty records in a row",
        ),
    ];
    for (name, records, alert, reason) in cases {
        let mut r = established(
            gw.app_addr,
            "orders.example.internal",
            pki.frontend_config(),
        )
        .await
        .expect(name);
        let mut bytes = records(&mut r);
        bytes.extend(r.seal(ContentType::ApplicationData, b"after"));
        r.send(&bytes).await.expect(name);
        let seen = tokio::time::timeout(STEP, r.closing_alert())
            .await
            .unwrap_or_else(|_| panic!("{name}: the connection stalled"))
            .expect(name);
        assert_eq!(seen, Some(alert), "{name}: the alert the client sees");
        let record = gw.next_record().await;
        assert_eq!(record.offload.as_deref(), Some("kernel"), "{name}");
        assert!(record.reason.contains(reason), "{name}: {}", record.reason);
        assert_eq!(
            record.client_to_backend_bytes, 1,
            "{name}: nothing after it"
        );
    }
    // And what rustls takes, the kernel path takes: 32 empty records (splice
    // reads each as 0 bytes, which is no end of stream), then data.
    let mut r = established(
        gw.app_addr,
        "orders.example.internal",
        pki.frontend_config(),
    )
    .await
    .expect("session");
    let mut bytes: Vec<u8> = (0..32)
        .flat_map(|_| r.seal(ContentType::ApplicationData, &[]))
        .collect();
    bytes.extend(r.seal(ContentType::ApplicationData, b"data"));
    r.send(&bytes).await.unwrap();
    let (typ, echo) = r.recv().await.unwrap().expect("echo after empty records");
    assert_eq!(
        (typ, &echo[..]),
        (ContentType::ApplicationData, &b"data"[..])
    );
}

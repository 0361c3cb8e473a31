//! The admin endpoint as its callers meet it: who may change the block
//! list and how (the socket, JSON, no block of everyone), health and
//! readiness through a drain, the live connections, HEAD. Everything runs
//! on loopback and in the test's temporary directory.

use std::path::Path;
use std::time::{Duration, Instant};

use gateway::admin::client::{self, Endpoint};
use gateway_tests::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

const ORDERS: &str = "orders.example.internal";

/// A gateway with `extra` at the top of its config (before any table).
async fn gateway(pki: &Pki, backend: &EchoBackend, extra: &str) -> RunningGateway {
    let toml = format!(
        "admin = \"127.0.0.1:0\"\n{extra}\n{}",
        listener_toml(pki, "edge", "")
    ) + &route_toml("orders", &[ORDERS], &[backend.addr], &[SPIFFE_FRONTEND]);
    RunningGateway::start(pki, &toml).await
}

/// Sends `request` as it is and reads the whole response.
async fn exchange(mut s: impl AsyncRead + AsyncWrite + Unpin, request: &str) -> String {
    let _ = s.write_all(request.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(STEP, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

async fn over_tcp(gw: &RunningGateway, request: &str) -> String {
    exchange(
        TcpStream::connect(gw.admin_addr.unwrap()).await.unwrap(),
        request,
    )
    .await
}

async fn over_socket(path: &Path, request: &str) -> String {
    exchange(UnixStream::connect(path).await.unwrap(), request).await
}

fn status(response: &str) -> u16 {
    response
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"))
}

fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

fn post_block(content_type: &str, json: &str) -> String {
    format!(
        "POST /block HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{json}",
        json.len()
    )
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
}

/// Over TCP, even from loopback (in `admin_clients`), the block list is
/// read-only: a local user or a browser page posting to 127.0.0.1 changes
/// nothing, whatever it sends.
#[tokio::test]
async fn the_block_list_cannot_be_changed_over_tcp() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let gw = gateway(&pki, &backend, "").await;
    for content_type in ["application/json", "text/plain"] {
        let r = over_tcp(
            &gw,
            &post_block(content_type, r#"{"source": "127.0.0.0/8", "force": true}"#),
        )
        .await;
        assert_eq!(status(&r), 403, "{r}");
    }
    let r = over_tcp(
        &gw,
        "DELETE /block?source=127.0.0.9 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    )
    .await;
    assert_eq!(status(&r), 403, "{r}");
    let list = client::list(&Endpoint::Tcp(gw.admin_addr.unwrap()))
        .await
        .unwrap();
    assert!(list.is_empty(), "{list:?}");
    allowed_from_loopback(&pki, &gw).await;
}

async fn allowed_from_loopback(pki: &Pki, gw: &RunningGateway) {
    passes(gw.app_addr, ORDERS, pki.frontend_config(), b"still served").await;
}

/// The socket takes changes: it is 0600, a body must say it is JSON (a
/// cross-site form cannot), a block of every source is never taken, and
/// one wider than a /16 or /32 only with force.
#[tokio::test]
async fn the_socket_takes_json_changes_within_bounds() {
    use std::os::unix::fs::PermissionsExt as _;
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let gw = gateway(&pki, &backend, "admin_socket = \"admin.sock\"").await;
    let path = gw.admin_socket.clone().unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let sock = Endpoint::Socket(path.clone());
    let json = r#"{"source": "127.0.9.0/24"}"#;
    for content_type in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        let r = over_socket(&path, &post_block(content_type, json)).await;
        assert_eq!(status(&r), 415, "{content_type}: {r}");
    }
    for every in ["0.0.0.0/0", "::/0", "::ffff:0.0.0.0/96"] {
        let r = over_socket(
            &path,
            &post_block(
                "application/json",
                &format!(r#"{{"source": "{every}", "force": true}}"#),
            ),
        )
        .await;
        assert_eq!(status(&r), 400, "{every}: {r}");
        assert!(body(&r).contains("every source"), "{r}");
    }
    for wide in ["10.0.0.0/8", "2001:db8::/24"] {
        let err = client::add(&sock, wide, None, false)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("400") && err.contains("force"), "{err}");
    }
    assert!(client::list(&sock).await.unwrap().is_empty());
    let e = client::add(&sock, "10.0.0.0/8", None, true).await.unwrap();
    assert_eq!(e.source, "10.0.0.0/8");
    let e = client::add(&sock, "10.1.0.0/16", Some("1h"), false)
        .await
        .unwrap();
    assert_eq!(e.source, "10.1.0.0/16");
    let e = client::add(&sock, "2001:db8::/32", None, false)
        .await
        .unwrap();
    assert_eq!(e.source, "2001:db8::/32");
    let r = over_socket(&path, &post_block("application/json; charset=utf-8", json)).await;
    assert_eq!(status(&r), 200, "{r}");
    assert_eq!(client::list(&sock).await.unwrap().len(), 4);
    client::remove(&sock, "10.0.0.0/8").await.unwrap();
    assert_eq!(client::list(&sock).await.unwrap().len(), 3);
}

/// Another user cannot use the socket: the mode keeps it out, and should
/// the mode be loosened under the gateway, the peer check at accept does
/// (closed unanswered, counted).
#[tokio::test]
async fn another_user_cannot_use_the_socket() {
    use std::os::unix::fs::PermissionsExt as _;
    if !is_root() {
        eprintln!("skipped: acting as another user needs root");
        return;
    }
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let gw = gateway(&pki, &backend, "admin_socket = \"admin.sock\"").await;
    let path = gw.admin_socket.clone().unwrap();
    // The temporary directory is root's 0700: let nobody reach the socket.
    std::fs::set_permissions(pki.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let tried = as_nobody(&path).await;
    assert_eq!(
        tried.as_ref().map_err(std::io::Error::kind).err(),
        Some(std::io::ErrorKind::PermissionDenied),
        "{tried:?}"
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let answer = as_nobody(&path)
        .await
        .expect("connects once the mode allows");
    assert!(answer.is_empty(), "answered another user: {answer:?}");
    let metrics = gw.scrape().await;
    assert!(
        metrics.contains("gateway_admin_refused_total{reason=\"peer\"} 1"),
        "{metrics}"
    );
}

/// `GET /block` on `path` from a thread running as nobody (65534): what
/// came back, or why it could not connect. Credentials are per thread in
/// the kernel; the raw system call changes this thread's only (glibc's
/// setresuid would change every thread of the test process).
async fn as_nobody(path: &Path) -> std::io::Result<String> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        std::thread::spawn(move || {
            // SAFETY: setresuid takes three integers and touches no memory.
            let r = unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) };
            assert_eq!(r, 0, "setresuid: {}", std::io::Error::last_os_error());
            let mut s = std::os::unix::net::UnixStream::connect(&path)?;
            s.set_read_timeout(Some(STEP))?;
            let _ = std::io::Write::write_all(&mut s, get("/block").as_bytes());
            let mut out = String::new();
            let _ = std::io::Read::read_to_string(&mut s, &mut out);
            Ok(out)
        })
        .join()
        .expect("thread")
    })
    .await
    .expect("blocking task")
}

/// `/healthz` answers while the process runs; `/readyz` once it serves,
/// and 503 from the moment shutdown begins, while live connections drain.
#[tokio::test]
async fn readyz_says_draining_from_shutdown_on_while_healthz_stays_up() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let mut gw = gateway(&pki, &backend, "drain_timeout = \"10s\"").await;
    let r = over_tcp(&gw, &get("/healthz")).await;
    assert_eq!((status(&r), body(&r)), (200, "ok\n"), "{r}");
    let r = over_tcp(&gw, &get("/readyz")).await;
    assert_eq!((status(&r), body(&r)), (200, "ready\n"), "{r}");
    // A live connection keeps the drain going.
    let mut tls = connect(gw.app_addr, ORDERS, pki.frontend_config())
        .await
        .unwrap();
    tls.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.unwrap();
    gw.shutdown.shutdown();
    let until = Instant::now() + Duration::from_secs(2);
    let r = loop {
        let r = over_tcp(&gw, &get("/readyz")).await;
        if status(&r) != 200 || Instant::now() > until {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        (status(&r), body(&r)),
        (503, "not ready: draining\n"),
        "{r}"
    );
    let r = over_tcp(&gw, &get("/healthz")).await;
    assert_eq!(status(&r), 200, "{r}");
    // Still draining: the live connection is served.
    tls.write_all(b"pong").await.unwrap();
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    drop(tls);
    assert!(gw.shuts_down_within(STEP).await);
}

/// `GET /connections`: each live connection with its listener, route,
/// identity and source, and its bytes growing as it echoes; to
/// `admin_clients` naming the endpoint by address only.
#[tokio::test]
async fn connections_lists_each_live_connection_and_its_bytes() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let gw = gateway(&pki, &backend, "admin_socket = \"admin.sock\"").await;
    let tcp = Endpoint::Tcp(gw.admin_addr.unwrap());
    let mut a = connect(gw.app_addr, ORDERS, pki.frontend_config())
        .await
        .unwrap();
    let echo = async |tls: &mut tokio_rustls::client::TlsStream<TcpStream>, n: usize| {
        let data = payload(n);
        tls.write_all(&data).await.unwrap();
        let mut back = vec![0u8; n];
        tls.read_exact(&mut back).await.unwrap();
        assert_eq!(back, data);
    };
    // a is live (its bytes came back) before b connects: a is the older.
    echo(&mut a, 1000).await;
    let mut b = connect(gw.app_addr, ORDERS, pki.frontend_config())
        .await
        .unwrap();
    echo(&mut b, 10).await;
    let source_a = a.get_ref().0.local_addr().unwrap().to_string();
    let source_b = b.get_ref().0.local_addr().unwrap().to_string();
    let find = |list: &gateway::admin::Connections, source: &str| {
        list.connections
            .iter()
            .find(|c| c.source == source)
            .cloned()
            .unwrap_or_else(|| panic!("{source} not in {list:?}"))
    };
    // The forwarder counts a write just after it returns, and the client
    // may have read it first: the listing catches up within moments.
    let settled = async |at: &Endpoint, source: &str, bytes: u64| {
        let until = Instant::now() + Duration::from_secs(2);
        loop {
            let listed = client::connections(at).await.unwrap();
            let c = find(&listed, source);
            let moved = (c.client_to_backend_bytes, c.backend_to_client_bytes);
            if moved == (bytes, bytes) || Instant::now() > until {
                return listed;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    settled(&tcp, &source_a, 1000).await;
    let listed = settled(&tcp, &source_b, 10).await;
    assert_eq!((listed.total, listed.left_off), (2, 0), "{listed:?}");
    for (source, bytes) in [(&source_a, 1000), (&source_b, 10)] {
        let c = find(&listed, source);
        assert_eq!((c.listener.as_str(), c.route.as_str()), ("edge", "orders"));
        assert_eq!(c.identity, Some(vec![SPIFFE_FRONTEND.to_owned()]));
        assert_eq!(c.backend, Some(backend.addr.to_string()));
        assert_eq!(
            (c.client_to_backend_bytes, c.backend_to_client_bytes),
            (bytes, bytes),
            "{c:?}"
        );
        assert!(
            matches!(c.offload.as_deref(), Some("kernel" | "userspace")),
            "{c:?}"
        );
        assert!(c.age_seconds < 60);
    }
    // Capped: the oldest first, the rest counted as left off.
    let (first, total) = gw.registry.connections(1);
    assert_eq!((first.len(), total), (1, 2));
    assert_eq!(first[0].source, source_a);
    echo(&mut a, 5000).await;
    let socket = Endpoint::Socket(gw.admin_socket.clone().unwrap());
    let c = find(&settled(&socket, &source_a, 6000).await, &source_a);
    assert_eq!(
        (c.client_to_backend_bytes, c.backend_to_client_bytes),
        (6000, 6000)
    );
    // A page that rebound its own name to 127.0.0.1 names itself in Host.
    let r = over_tcp(
        &gw,
        "GET /connections HTTP/1.1\r\nHost: evil.example:9901\r\n\r\n",
    )
    .await;
    assert_eq!(status(&r), 403, "{r}");
    assert!(!r.contains(SPIFFE_FRONTEND), "{r}");
    drop((a, b));
    let until = Instant::now() + STEP;
    while client::connections(&tcp).await.unwrap().total != 0 {
        assert!(Instant::now() < until, "closed connections still listed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// HEAD is GET without the body; other methods on a read-only route are
/// 405 with `Allow`.
#[tokio::test]
async fn head_answers_like_get_without_a_body() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let gw = gateway(&pki, &backend, "").await;
    for path in ["/metrics", "/healthz", "/readyz", "/connections"] {
        let r = over_tcp(
            &gw,
            &format!("HEAD {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
        )
        .await;
        assert_eq!(status(&r), 200, "{path}: {r}");
        assert!(r.ends_with("\r\n\r\n"), "{path}: a body came: {r}");
        let length: usize = r
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{path}: no content-length: {r}"));
        assert!(length > 0, "{path}: {r}");
    }
    let r = over_tcp(
        &gw,
        "POST /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert_eq!(status(&r), 405, "{r}");
    assert!(r.to_ascii_lowercase().contains("allow: get, head"), "{r}");
}

/// `admin_tls`: the TCP door speaks TLS 1.3 and serves only clients with
/// a certificate from its own `client_ca`; plain HTTP, no certificate and
/// another CA's certificate get nothing, each counted as `tls`.
#[tokio::test]
async fn with_admin_tls_only_clients_of_its_ca_are_served() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let tls = format!(
        "[admin_tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
        pki.path("server-chain.pem").display(),
        pki.path("server.key").display(),
        pki.path("client-roots.pem").display(),
    );
    // [admin_tls] is a table: after every top-level key, before the listeners.
    let toml = format!("admin = \"127.0.0.1:0\"\n{tls}")
        + &listener_toml(&pki, "edge", "")
        + &route_toml("orders", &[ORDERS], &[backend.addr], &[SPIFFE_FRONTEND]);
    let gw = RunningGateway::start(&pki, &toml).await;
    let admin = gw.admin_addr.unwrap();
    let name = rustls::pki_types::ServerName::try_from("gateway.example.internal").unwrap();
    let over_tls = async |config: std::sync::Arc<rustls::ClientConfig>, request: &str| {
        let tcp = TcpStream::connect(admin).await.unwrap();
        match tokio_rustls::TlsConnector::from(config)
            .connect(name.clone(), tcp)
            .await
        {
            Ok(s) => exchange(s, request).await,
            // TLS 1.3: a refused client certificate shows on the first read.
            Err(e) => format!("handshake failed: {e}"),
        }
    };

    let ok = over_tls(pki.frontend_config(), &get("/metrics")).await;
    assert_eq!(status(&ok), 200, "{ok}");
    assert!(body(&ok).contains("gateway_build_info"), "{ok}");

    // No resumption: a resumed session would skip the certificate check
    // (an expired or replaced certificate would keep working).
    let resuming = pki.frontend_config();
    for _ in 0..2 {
        let tcp = TcpStream::connect(admin).await.unwrap();
        let mut s = tokio_rustls::TlsConnector::from(resuming.clone())
            .connect(name.clone(), tcp)
            .await
            .unwrap();
        assert_eq!(
            s.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Full)
        );
        // Read the answer (and any ticket the server would send).
        let mut out = Vec::new();
        s.write_all(get("/healthz").as_bytes()).await.unwrap();
        let _ = tokio::time::timeout(STEP, s.read_to_end(&mut out)).await;
    }

    // Plain HTTP on the TLS door: a TLS alert, no HTTP answer.
    let plain = over_tcp(&gw, &get("/metrics")).await;
    assert!(!plain.contains("HTTP/1.1"), "{plain:?}");
    // No certificate, and a certificate from another CA: no answer.
    let none = over_tls(pki.client_config(None), &get("/metrics")).await;
    assert!(!none.starts_with("HTTP/1.1"), "{none}");
    let stranger = Pki::new();
    let theirs = stranger.client(
        "theirs",
        &gateway::pki::LeafSpec::client("frontend", &[SPIFFE_FRONTEND]),
    );
    // It trusts our server, and presents its own CA's certificate.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.root_der()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(gateway::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(theirs.chain.clone(), theirs.key())
        .unwrap();
    let other = over_tls(std::sync::Arc::new(config), &get("/metrics")).await;
    assert!(!other.starts_with("HTTP/1.1"), "{other}");

    let metrics = over_tls(pki.frontend_config(), &get("/metrics")).await;
    assert!(
        metrics.contains("gateway_admin_refused_total{reason=\"tls\"} 3"),
        "{metrics}"
    );
}

/// A `"for"` that parses but would overflow the clock is answered with a
/// 400 naming the limit, not a panic of the connection's task.
#[tokio::test]
async fn a_block_for_beyond_ten_years_is_a_400_not_a_panic() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let gw = gateway(&pki, &backend, "admin_socket = \"admin.sock\"").await;
    let path = gw.admin_socket.clone().unwrap();
    let r = over_socket(
        &path,
        &post_block(
            "application/json",
            r#"{"source": "192.0.2.7", "for": "213503982334601d"}"#,
        ),
    )
    .await;
    assert_eq!(status(&r), 400, "{r:?} (empty: the task panicked)");
    assert!(body(&r).contains("at most 10 years"), "{r}");
    // Nothing was taken, and the endpoint still answers.
    let list = over_socket(&path, &get("/block")).await;
    assert_eq!(status(&list), 200, "{list}");
    assert!(!body(&list).contains("192.0.2.7"), "{list}");
}

/// The refused count of `reason` in a `/metrics` body.
fn refused(metrics: &str, reason: &str) -> u64 {
    let series = format!("gateway_admin_refused_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series)?.parse().ok())
        .unwrap_or_else(|| panic!("no {series}in {metrics}"))
}

/// Every refusal is counted, under its reason: hyper's own (too many
/// headers, garbage), a rebinding page's Host, a change over TCP, a wrong
/// method, a body that is not JSON, one too large.
#[tokio::test]
async fn every_refusal_is_counted_by_reason() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let gw = gateway(&pki, &backend, "admin_socket = \"admin.sock\"").await;
    let path = gw.admin_socket.clone().unwrap();
    let many: String = (0..40).map(|i| format!("X-{i}: a\r\n")).collect();
    let huge = format!("{{\"source\": \"{}\"}}", "1".repeat(20_000));
    let tcp = [
        (
            format!("GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n{many}\r\n"),
            "too_large",
        ),
        ("GARBAGE\r\n\r\n".to_owned(), "bad_request"),
        (
            "GET /connections HTTP/1.1\r\nHost: rebind.example\r\n\r\n".to_owned(),
            "host",
        ),
        (post_block("application/json", "{}"), "tcp_change"),
        (
            "PUT /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".to_owned(),
            "method",
        ),
    ];
    let socket = [
        (post_block("text/plain", "{}"), "media_type"),
        (post_block("application/json", &huge), "too_large"),
        (
            post_block("application/json", "{\"source\": 7}"),
            "bad_request",
        ),
    ];
    for (request, reason) in tcp.iter().chain(&socket) {
        let before = refused(&gw.scrape().await, reason);
        let r = if tcp.iter().any(|(q, _)| q == request) {
            over_tcp(&gw, request).await
        } else {
            over_socket(&path, request).await
        };
        assert!(!r.starts_with("HTTP/1.1 2"), "{r}");
        assert_eq!(
            refused(&gw.scrape().await, reason),
            before + 1,
            "{reason}: {r}"
        );
    }
}

/// A reload that narrows `admin_clients` applies to the next request:
/// loopback, taken off the list, is refused /connections (and counted);
/// widened again, it is served.
#[tokio::test]
async fn a_reload_of_admin_clients_applies_to_the_next_request() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let gw = gateway(&pki, &backend, "").await;
    let toml = |extra: &str| {
        format!(
            "admin = \"127.0.0.1:0\"\n{extra}\n{}",
            listener_toml(&pki, "edge", "")
        ) + &route_toml("orders", &[ORDERS], &[backend.addr], &[SPIFFE_FRONTEND])
    };
    assert_eq!(status(&over_tcp(&gw, &get("/connections")).await), 200);
    gw.reload_toml(&pki, &toml("admin_clients = [\"192.0.2.0/24\"]"))
        .await
        .unwrap();
    let r = over_tcp(&gw, &get("/connections")).await;
    assert_eq!(status(&r), 403, "{r}");
    assert!(body(&r).contains("not in admin_clients"), "{r}");
    assert_eq!(refused(&gw.scrape().await, "client"), 1);
    gw.reload_toml(&pki, &toml("")).await.unwrap();
    assert_eq!(status(&over_tcp(&gw, &get("/connections")).await), 200);
}

/// JSON answers (the block list, the connections, refusals) are kept by no
/// cache and read by no browser as anything but JSON.
#[tokio::test]
async fn json_answers_are_not_stored_nor_sniffed() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let gw = gateway(&pki, &backend, "").await;
    for path in ["/connections", "/block"] {
        let r = over_tcp(&gw, &get(path)).await.to_ascii_lowercase();
        assert!(r.contains("\r\ncache-control: no-store\r\n"), "{r}");
        assert!(r.contains("\r\nx-content-type-options: nosniff\r\n"), "{r}");
    }
}

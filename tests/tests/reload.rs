//! Hot reload and continuous verification: a reload changes everything or
//! nothing, drops no connection that is still allowed, and closes those that
//! no longer are, with the reason in the access log.

use std::time::{Duration, Instant};

use gateway::access_log::Verdict;
use gateway::app::ReloadError;
use gateway::pki::LeafSpec;
use gateway_tests::*;
use rustls::AlertDescription;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SNI: &str = "orders.example.internal";

/// No minimum handshake rate: a test holds a handshake's last flight
/// across a reload, however long the reload takes on a busy machine (the
/// connection's worker keeps its own time, so a reload no longer holds its
/// timers back).
const HOLDS: &str = "handshake_min_rate = 0";

fn config(
    pki: &Pki,
    backend: &EchoBackend,
    listener_extra: &str,
    allow: &[&str],
    route_extra: &str,
) -> String {
    listener_toml(pki, "edge", &format!("{HOLDS}\n{listener_extra}"))
        + &route_toml("orders", &[SNI], &[backend.addr], allow)
        + route_extra
}

use gateway_tests::tls_closed_within as closed_within;

#[tokio::test]
async fn crl_update_closes_the_revoked_client_within_a_second_while_others_flow() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    pki.write("clients.crl.pem", &pki.intermediate.crl(1, &[]).unwrap());
    let crls = pki.crls_line(&["clients.crl.pem"]);
    let toml = config(&pki, &backend, &crls, &[SPIFFE_FRONTEND], "");
    let mut gw = RunningGateway::start(&pki, &toml).await;

    let (doomed, doomed_serial) = pki.revocable_frontend("doomed");
    let mut a = connect(gw.app_addr, SNI, pki.client_config(Some(&doomed)))
        .await
        .unwrap();
    let mut b = connect(gw.app_addr, SNI, pki.frontend_config())
        .await
        .unwrap();
    ping(&mut a, b"a before").await.unwrap();
    ping(&mut b, b"b before").await.unwrap();

    pki.write(
        "clients.crl.pem",
        &pki.intermediate.crl(2, &[&doomed_serial]).unwrap(),
    );
    let started = Instant::now();
    let report = gw.reload_toml(&pki, &toml).await.unwrap();
    assert_eq!(report.connections_closed, 1);
    closed_within(&mut a, Duration::from_secs(1)).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "revoked client closed in {:?}",
        started.elapsed()
    );

    let rec = gw.next_record().await;
    assert_eq!(
        rec.verdict,
        Verdict::Allow,
        "it was allowed when it connected"
    );
    assert!(
        rec.reason.contains("no longer allowed after reload") && rec.reason.contains("Revoked"),
        "{}",
        rec.reason
    );
    // The other client keeps flowing, byte-exact.
    let data = payload(1 << 20);
    b.write_all(&data).await.unwrap();
    let mut back = vec![0u8; data.len()];
    b.read_exact(&mut back).await.unwrap();
    assert!(back == data);
    // And the revoked certificate cannot come back.
    assert_eq!(
        refusal(gw.app_addr, SNI, pki.client_config(Some(&doomed))).await,
        rustls::AlertDescription::CertificateRevoked
    );
}

#[tokio::test]
async fn a_broken_config_on_reload_changes_nothing_and_is_reported() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let toml = config(&pki, &backend, "", &[SPIFFE_FRONTEND], "");
    let gw = RunningGateway::start(&pki, &toml).await;
    let mut live = connect(gw.app_addr, SNI, pki.frontend_config())
        .await
        .unwrap();
    ping(&mut live, b"before").await.unwrap();

    // A missing key file, and (separately) a port that cannot be bound: both
    // would be half-applied states; neither may change anything.
    let broken = toml
        .replace("server.key", "missing.key")
        .replace(SPIFFE_FRONTEND, SPIFFE_OTHER);
    match gw.reload_toml(&pki, &broken).await {
        Err(ReloadError::Invalid(e)) => assert!(
            e.contains("missing.key") && e.contains("cannot read"),
            "{e}"
        ),
        other => panic!("broken reload accepted: {other:?}"),
    }
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = blocker.local_addr().unwrap();
    let second = listener_toml(&pki, "second", "").replace("127.0.0.1:0", &taken.to_string())
        + &route_toml("r", &[], &[backend.addr], &[SPIFFE_FRONTEND]);
    let with_taken_port = toml.replace(SPIFFE_FRONTEND, SPIFFE_OTHER) + &second;
    match gw.reload_toml(&pki, &with_taken_port).await {
        Err(ReloadError::Invalid(e)) => assert!(e.contains("cannot bind"), "{e}"),
        other => panic!("reload with a taken port accepted: {other:?}"),
    }
    assert_eq!(
        gw.reload
            .stats()
            .failed
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    // The old policy still holds: the live connection flows, the same client connects anew.
    ping(&mut live, b"after").await.unwrap();
    let tls = connect(gw.app_addr, SNI, pki.frontend_config())
        .await
        .unwrap();
    assert_eq!(echo_roundtrip(tls, b"new".to_vec()).await.unwrap(), b"new");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_200_concurrent_streams_loses_no_bytes_and_no_connection() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let toml = config(&pki, &backend, "", &[SPIFFE_FRONTEND], "");
    let gw = RunningGateway::start(&pki, &toml).await;
    let client = pki.frontend_config();
    let addr = gw.app_addr;
    let mut streams = Vec::new();
    for i in 0..200u32 {
        let client = client.clone();
        streams.push(tokio::spawn(async move {
            let mut tls = connect(addr, SNI, client).await?;
            // 32 rounds of 2 KiB each, so the streams span the reloads.
            let data = payload(64 << 10);
            for (round, chunk) in data.chunks(2048).enumerate() {
                ping(&mut tls, chunk).await?;
                if round % 8 == 0 {
                    tokio::time::sleep(Duration::from_millis(10 + u64::from(i % 7))).await;
                }
            }
            tls.shutdown().await?;
            Ok::<_, std::io::Error>(data.len())
        }));
    }
    // Reload repeatedly while they run: the allow list grows, nothing of ours changes.
    let mut reloads = 0;
    for n in 0..5 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        let extra = format!("dns:extra-{n}.example.internal");
        let toml = config(&pki, &backend, "", &[SPIFFE_FRONTEND, &extra], "");
        let report = gw.reload_toml(&pki, &toml).await.unwrap();
        assert_eq!(report.connections_closed, 0);
        reloads += 1;
        // New connections during the switch are served too.
        let tls = connect(addr, SNI, client.clone()).await.unwrap();
        assert_eq!(
            echo_roundtrip(tls, b"during".to_vec()).await.unwrap(),
            b"during"
        );
    }
    let mut total = 0;
    for s in streams {
        total += s.await.unwrap().expect("stream survived the reloads");
    }
    assert_eq!(total, 200 * (64 << 10));
    assert_eq!(reloads, 5);
    assert_eq!(
        gw.reload
            .stats()
            .succeeded
            .load(std::sync::atomic::Ordering::Relaxed),
        5
    );
}

#[tokio::test]
async fn policy_changes_close_connections_that_are_no_longer_allowed() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let other = pki.client("intruder", &LeafSpec::client("intruder", &[SPIFFE_OTHER]));
    // Audit first: the intruder passes, as a would-deny.
    let audit = config(&pki, &backend, "", &[SPIFFE_FRONTEND], "mode = \"audit\"\n");
    let mut gw = RunningGateway::start(&pki, &audit).await;
    let mut intruder = connect(gw.app_addr, SNI, pki.client_config(Some(&other)))
        .await
        .unwrap();
    let mut friend = connect(gw.app_addr, SNI, pki.frontend_config())
        .await
        .unwrap();
    ping(&mut intruder, b"watched").await.unwrap();
    ping(&mut friend, b"fine").await.unwrap();

    // Flip to enforce: the would-deny becomes a close; the friend stays.
    let enforce = config(&pki, &backend, "", &[SPIFFE_FRONTEND], "");
    assert_eq!(
        gw.reload_toml(&pki, &enforce)
            .await
            .unwrap()
            .connections_closed,
        1
    );
    closed_within(&mut intruder, Duration::from_secs(1)).await;
    let rec = gw.next_record().await;
    assert_eq!(rec.verdict, Verdict::Audit);
    assert!(
        rec.reason.contains("not in the route's allow list"),
        "{}",
        rec.reason
    );
    ping(&mut friend, b"still fine").await.unwrap();

    // Roll back to audit: nothing closes. Then take the friend off the list.
    assert_eq!(
        gw.reload_toml(&pki, &audit)
            .await
            .unwrap()
            .connections_closed,
        0
    );
    let nobody = config(
        &pki,
        &backend,
        "",
        &["dns:someone-else.example.internal"],
        "",
    );
    assert_eq!(
        gw.reload_toml(&pki, &nobody)
            .await
            .unwrap()
            .connections_closed,
        1
    );
    closed_within(&mut friend, Duration::from_secs(1)).await;
    let rec = gw.next_record().await;
    assert!(
        rec.reason.contains("no longer allowed after reload"),
        "{}",
        rec.reason
    );
}

#[tokio::test]
async fn a_connection_never_outlives_its_client_certificate() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let toml = config(&pki, &backend, "", &[SPIFFE_FRONTEND], "");
    let mut gw = RunningGateway::start(&pki, &toml).await;
    let mut spec = LeafSpec::client("frontend", &[SPIFFE_FRONTEND]);
    spec.not_after = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
    let short = pki.client("short", &spec);
    let mut tls = connect(gw.app_addr, SNI, pki.client_config(Some(&short)))
        .await
        .unwrap();
    ping(&mut tls, b"while valid").await.unwrap();
    closed_within(&mut tls, Duration::from_secs(5)).await;
    let rec = gw.next_record().await;
    assert!(
        rec.reason.contains("client certificate expired"),
        "{}",
        rec.reason
    );
}

#[tokio::test]
async fn max_connection_lifetime_closes_old_connections() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let toml = config(
        &pki,
        &backend,
        "max_connection_lifetime = \"1s\"",
        &[SPIFFE_FRONTEND],
        "",
    );
    let mut gw = RunningGateway::start(&pki, &toml).await;
    let mut tls = connect(gw.app_addr, SNI, pki.frontend_config())
        .await
        .unwrap();
    ping(&mut tls, b"x").await.unwrap();
    let took = closed_within(&mut tls, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(500), "{took:?}");
    assert!(
        gw.next_record()
            .await
            .reason
            .contains("max_connection_lifetime (1s) reached")
    );
}

#[tokio::test]
async fn new_listeners_start_and_removed_ones_drain() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let first = config(&pki, &backend, "", &[SPIFFE_FRONTEND], "");
    let gw = RunningGateway::start(&pki, &first).await;
    let mut on_first = connect(gw.app_addr, SNI, pki.frontend_config())
        .await
        .unwrap();
    ping(&mut on_first, b"first").await.unwrap();

    let port = dead_port();
    let second = listener_toml(&pki, "second", "").replace("127.0.0.1:0", &port.to_string())
        + &route_toml("orders", &[SNI], &[backend.addr], &[SPIFFE_FRONTEND]);
    let report = gw.reload_toml(&pki, &second).await.unwrap();
    assert_eq!(report.listeners_started, vec!["second".to_string()]);
    assert_eq!(report.listeners_stopped, vec!["edge".to_string()]);
    let tls = connect(port, SNI, pki.frontend_config()).await.unwrap();
    assert_eq!(
        echo_roundtrip(tls, b"second".to_vec()).await.unwrap(),
        b"second"
    );
    // The removed listener accepts nothing new, but its connection goes on.
    let mut refused = false;
    for _ in 0..50 {
        if TcpStream::connect(gw.app_addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "removed listener still accepting");
    ping(&mut on_first, b"still here").await.unwrap();
    // The second listener's connection leaves the registry as its task
    // ends, on the worker that accepted it: perhaps just after the client
    // read its close.
    let until = Instant::now() + STEP;
    while gw.registry.len() != 1 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(gw.registry.len(), 1);
}

#[tokio::test]
async fn decisions_are_counted_on_the_admin_endpoint_across_reloads() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let audit = format!(
        "admin = \"127.0.0.1:0\"\n{}",
        config(&pki, &backend, "", &[SPIFFE_FRONTEND], "mode = \"audit\"\n")
    );
    let gw = RunningGateway::start(&pki, &audit).await;
    let other = pki.client("intruder", &LeafSpec::client("intruder", &[SPIFFE_OTHER]));
    let tls = connect(gw.app_addr, SNI, pki.client_config(Some(&other)))
        .await
        .unwrap();
    echo_roundtrip(tls, b"watched".to_vec()).await.unwrap();
    let audited =
        "gateway_route_decisions_total{listener=\"edge\",route=\"orders\",verdict=\"audit\"} 1";
    let metrics = gw.scrape().await;
    assert!(metrics.contains(audited), "{metrics}");

    // Enforce after a reload: the audit count stays, the denial adds to it.
    let enforce = format!(
        "admin = \"127.0.0.1:0\"\n{}",
        config(&pki, &backend, "", &[SPIFFE_FRONTEND], "")
    );
    gw.reload_toml(&pki, &enforce).await.unwrap();
    assert_eq!(
        refusal(gw.app_addr, SNI, pki.client_config(Some(&other))).await,
        rustls::AlertDescription::AccessDenied
    );
    // The client reads the alert as the gateway's connection task goes
    // on to count it: the count may come a moment later.
    let denied =
        "gateway_route_decisions_total{listener=\"edge\",route=\"orders\",verdict=\"deny\"} 1";
    let until = Instant::now() + STEP;
    let mut metrics = gw.scrape().await;
    while !metrics.contains(denied) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
        metrics = gw.scrape().await;
    }
    assert!(metrics.contains(audited), "{metrics}");
    assert!(metrics.contains(denied), "{metrics}");
    assert!(
        metrics.contains("gateway_reloads_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("gateway_live_connections 0"), "{metrics}");
}

/// A client driven by hand: its handshake can be held at any flight.
struct HeldClient {
    tcp: TcpStream,
    tls: rustls::ClientConnection,
}

impl HeldClient {
    /// Connects, sends the ClientHello and reads the gateway's whole flight,
    /// up to the point where the client would send its Certificate,
    /// CertificateVerify and Finished; returns those bytes, unsent.
    async fn up_to_the_last_flight(
        addr: std::net::SocketAddr,
        config: std::sync::Arc<rustls::ClientConfig>,
    ) -> (HeldClient, Vec<u8>) {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(SNI).unwrap();
        let mut tls = rustls::ClientConnection::new(config, name).unwrap();
        let mut hello = Vec::new();
        while tls.wants_write() {
            tls.write_tls(&mut hello).unwrap();
        }
        tcp.write_all(&hello).await.unwrap();
        let mut buf = vec![0u8; 16 << 10];
        // Until the server's whole flight is read: the client queues its
        // middlebox-compatibility ChangeCipherSpec on the ServerHello
        // already, so stopping at the first thing it wants to write held
        // back only that whenever the flight came in two reads, and the
        // gateway then waited for the rest until its handshake timeout.
        while tls.is_handshaking() {
            let n = tokio::time::timeout(STEP, tcp.read(&mut buf))
                .await
                .expect("the gateway's flight")
                .unwrap();
            assert!(n > 0, "the gateway closed during the handshake");
            tls.read_tls(&mut &buf[..n]).unwrap();
            tls.process_new_packets().unwrap();
        }
        let mut last = Vec::new();
        while tls.wants_write() {
            tls.write_tls(&mut last).unwrap();
        }
        (HeldClient { tcp, tls }, last)
    }

    /// Sends `msg` and returns what comes back before the gateway closes
    /// (or the echo, when it does not).
    async fn exchange(&mut self, msg: &[u8]) -> Vec<u8> {
        use std::io::{Read as _, Write as _};
        self.tls.writer().write_all(msg).unwrap();
        let mut out = Vec::new();
        while self.tls.wants_write() {
            self.tls.write_tls(&mut out).unwrap();
        }
        // The gateway may already have closed: a failed write is an answer too.
        let _ = self.tcp.write_all(&out).await;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 16 << 10];
        while got.len() < msg.len() {
            let n = match tokio::time::timeout(STEP, self.tcp.read(&mut buf)).await {
                Err(_) => panic!("the gateway neither answered nor closed"),
                Ok(Ok(0) | Err(_)) => break,
                Ok(Ok(n)) => n,
            };
            if self.tls.read_tls(&mut &buf[..n]).is_err() || self.tls.process_new_packets().is_err()
            {
                break;
            }
            let mut plain = vec![0u8; msg.len()];
            if let Ok(k) = self.tls.reader().read(&mut plain) {
                got.extend_from_slice(&plain[..k]);
            }
        }
        got
    }
}

/// The gateway reads a listener's state when it accepts. A client that
/// holds its last flight until a reload has revoked it must still be judged
/// by the state that is current when its connection goes live: refused,
/// never connected to the backend. One that is still allowed goes on.
#[tokio::test]
async fn a_handshake_held_across_a_revoking_reload_never_reaches_the_backend() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    pki.write("clients.crl.pem", &pki.intermediate.crl(1, &[]).unwrap());
    let crls = pki.crls_line(&["clients.crl.pem"]);
    let toml = config(&pki, &backend, &crls, &[SPIFFE_FRONTEND], "");
    let mut gw = RunningGateway::start(&pki, &toml).await;
    let (doomed, doomed_serial) = pki.revocable_frontend("doomed");

    let (mut held, last_flight) =
        HeldClient::up_to_the_last_flight(gw.app_addr, pki.client_config(Some(&doomed))).await;
    let (mut friend, friend_flight) =
        HeldClient::up_to_the_last_flight(gw.app_addr, pki.frontend_config()).await;
    pki.write(
        "clients.crl.pem",
        &pki.intermediate.crl(2, &[&doomed_serial]).unwrap(),
    );
    let report = gw.reload_toml(&pki, &toml).await.unwrap();
    assert_eq!(report.connections_closed, 0, "neither was live yet");

    held.tcp.write_all(&last_flight).await.unwrap();
    assert_eq!(held.exchange(b"let me in").await, b"", "nothing came back");
    let rec = gw.next_record().await;
    assert_eq!(rec.verdict, Verdict::Deny, "{rec:?}");
    assert!(
        rec.reason.contains("Revoked") && rec.backend.is_none(),
        "{rec:?}"
    );
    assert_eq!(
        backend.accepted(),
        0,
        "the revoked client reached the backend"
    );

    friend.tcp.write_all(&friend_flight).await.unwrap();
    assert_eq!(friend.exchange(b"still fine").await, b"still fine");
    assert_eq!(backend.accepted(), 1);

    // A listener removed (here: renamed) during the handshake has no state
    // left to judge by: refused too.
    let (mut orphan, orphan_flight) =
        HeldClient::up_to_the_last_flight(gw.app_addr, pki.frontend_config()).await;
    let renamed = toml.replace("name = \"edge\"", "name = \"edge-renamed\"");
    gw.reload_toml(&pki, &renamed).await.unwrap();
    orphan.tcp.write_all(&orphan_flight).await.unwrap();
    assert_eq!(orphan.exchange(b"anyone?").await, b"");
    let rec = loop {
        let rec = gw.next_record().await;
        if rec.verdict == Verdict::Deny {
            break rec;
        }
    };
    assert!(
        rec.reason
            .contains("no longer allowed after reload: listener \"edge\" was removed"),
        "{rec:?}"
    );
    assert_eq!(backend.accepted(), 1);
}

/// webpki checks every CA certificate's validity at the handshake; the
/// tick ends the connection when the first of them expires, not only when
/// the leaf does.
#[tokio::test]
async fn a_connection_never_outlives_a_ca_certificate_in_its_chain() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let toml = config(&pki, &backend, "", &[SPIFFE_FRONTEND], "");
    let mut gw = RunningGateway::start(&pki, &toml).await;
    let short = pki
        .root
        .intermediate_until(
            "short-lived issuing CA",
            time::OffsetDateTime::now_utc() + time::Duration::seconds(2),
        )
        .unwrap();
    let leaf = short
        .issue(&LeafSpec::client("frontend", &[SPIFFE_FRONTEND]))
        .unwrap();
    let creds = pki.creds("under-short", &leaf, &short);
    let mut tls = connect(gw.app_addr, SNI, pki.client_config(Some(&creds)))
        .await
        .unwrap();
    ping(&mut tls, b"while valid").await.unwrap();
    closed_within(&mut tls, Duration::from_secs(6)).await;
    let rec = gw.next_record().await;
    assert!(
        rec.reason
            .contains("a CA certificate in the client's chain expired"),
        "{}",
        rec.reason
    );
}

/// A CRL past its nextUpdate refuses new handshakes (crl_expired =
/// "refuse", the default); a live connection it covered is closed then
/// too, as a new handshake would be refused. With "warn" it stays.
#[tokio::test]
async fn a_live_connection_ends_when_its_crl_goes_stale_unless_warned_about() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let soon = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
    pki.write(
        "clients.crl.pem",
        &pki.intermediate.crl_until(1, &[], soon).unwrap(),
    );
    let crls = pki.crls_line(&["clients.crl.pem"]);
    let strict = config(&pki, &backend, &crls, &[SPIFFE_FRONTEND], "");
    let mut gw = RunningGateway::start(&pki, &strict).await;
    let mut tls = connect(gw.app_addr, SNI, pki.frontend_config())
        .await
        .unwrap();
    ping(&mut tls, b"fresh").await.unwrap();
    closed_within(&mut tls, Duration::from_secs(6)).await;
    let rec = gw.next_record().await;
    assert!(
        rec.reason
            .contains("a CRL covering the client's chain is past its next update"),
        "{}",
        rec.reason
    );

    let soon = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
    pki.write(
        "clients.crl.pem",
        &pki.intermediate.crl_until(2, &[], soon).unwrap(),
    );
    let lenient = config(
        &pki,
        &backend,
        &format!("{crls}\ncrl_expired = \"warn\""),
        &[SPIFFE_FRONTEND],
        "",
    );
    gw.reload_toml(&pki, &lenient).await.unwrap();
    let mut tls = connect(gw.app_addr, SNI, pki.frontend_config())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    ping(&mut tls, b"stale but warned").await.unwrap();
}

/// A listener removed or renamed by a reload stops accepting, but its live
/// connections are still judged until they end: revocation published since
/// (a CRL the new state reads), certificate expiry, the lifetime it had,
/// and at last the drain timeout, as at shutdown.
#[tokio::test]
async fn a_removed_or_renamed_listeners_connections_are_still_judged_until_they_end() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    pki.write("clients.crl.pem", &pki.intermediate.crl(1, &[]).unwrap());
    let crls = pki.crls_line(&["clients.crl.pem"]);
    let (port_a, port_b) = (dead_port(), dead_port());
    let listener = |name: &str, port: std::net::SocketAddr, extra: &str| {
        listener_toml(&pki, name, &format!("{crls}\n{extra}"))
            .replace("127.0.0.1:0", &port.to_string())
            + &route_toml("orders", &[SNI], &[backend.addr], &[SPIFFE_FRONTEND])
    };
    let edge = config(&pki, &backend, &crls, &[SPIFFE_FRONTEND], "");
    let before = format!("drain_timeout = \"4s\"\n{edge}")
        + &listener("a", port_a, "max_connection_lifetime = \"2s\"")
        + &listener("b", port_b, "");
    let mut gw = RunningGateway::start(&pki, &before).await;

    let (doomed, doomed_serial) = pki.revocable_frontend("doomed");
    let mut spec = LeafSpec::client("frontend", &[SPIFFE_FRONTEND]);
    spec.not_after = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
    let short = pki.client("short", &spec);
    let mut on_a = connect(port_a, SNI, pki.frontend_config()).await.unwrap();
    let mut revoked_on_b = connect(port_b, SNI, pki.client_config(Some(&doomed)))
        .await
        .unwrap();
    let mut expiring_on_b = connect(port_b, SNI, pki.client_config(Some(&short)))
        .await
        .unwrap();
    let mut draining_on_b = connect(port_b, SNI, pki.frontend_config()).await.unwrap();
    for tls in [
        &mut on_a,
        &mut revoked_on_b,
        &mut expiring_on_b,
        &mut draining_on_b,
    ] {
        ping(tls, b"live").await.unwrap();
    }

    // "a" removed, "b" renamed (on another port); the CRL revokes one client.
    pki.write(
        "clients.crl.pem",
        &pki.intermediate.crl(2, &[&doomed_serial]).unwrap(),
    );
    let after = format!("drain_timeout = \"4s\"\n{edge}") + &listener("b-renamed", dead_port(), "");
    let report = gw.reload_toml(&pki, &after).await.unwrap();
    assert_eq!(report.connections_closed, 1, "{report:?}");
    closed_within(&mut revoked_on_b, Duration::from_secs(1)).await;
    closed_within(&mut expiring_on_b, Duration::from_secs(4)).await;
    closed_within(&mut on_a, Duration::from_secs(4)).await;
    closed_within(&mut draining_on_b, Duration::from_secs(6)).await;

    let mut reasons = Vec::new();
    for _ in 0..4 {
        reasons.push(gw.next_record().await.reason);
    }
    for expected in [
        "no longer allowed after reload: client certificate refused: invalid peer certificate: Revoked",
        "client certificate expired",
        "max_connection_lifetime (2s) reached",
        "its listener was removed by a reload and drain_timeout (4s) passed",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(expected)),
            "{expected:?} in {reasons:#?}"
        );
    }
}

/// Reads access-log records until one matching `want`, so the records of
/// other connections ending meanwhile do not matter.
async fn record_where(
    gw: &mut RunningGateway,
    want: impl Fn(&gateway::access_log::AccessRecord) -> bool,
) -> gateway::access_log::AccessRecord {
    for _ in 0..16 {
        let rec = gw.next_record().await;
        if want(&rec) {
            return rec;
        }
    }
    panic!("no such access-log record");
}

/// A connection is judged by the route its server name maps to now, not by
/// a route that happens to keep its name. Here a reload moves the server
/// name and its sensitive backend to a new route `vault` that allows
/// someone else, and keeps a route called `orders` (the old name) for
/// another server name and backend, still allowing the client: the live
/// connection is closed, and a handshake held across the reload never
/// reaches the sensitive backend.
#[tokio::test]
async fn a_connection_is_judged_by_the_route_its_server_name_now_maps_to() {
    let pki = Pki::new();
    let sensitive = EchoBackend::start().await;
    let public = EchoBackend::start().await;
    let before = listener_toml(&pki, "edge", HOLDS)
        + &route_toml("orders", &[SNI], &[sensitive.addr], &[SPIFFE_FRONTEND]);
    let mut gw = RunningGateway::start(&pki, &before).await;
    let mut live = connect(gw.app_addr, SNI, pki.frontend_config())
        .await
        .unwrap();
    ping(&mut live, b"before").await.unwrap();
    let (mut held, held_flight) =
        HeldClient::up_to_the_last_flight(gw.app_addr, pki.frontend_config()).await;

    let after = listener_toml(&pki, "edge", HOLDS)
        + &route_toml("vault", &[SNI], &[sensitive.addr], &[SPIFFE_OTHER])
        + &route_toml(
            "orders",
            &["billing.example.internal"],
            &[public.addr],
            &[SPIFFE_FRONTEND],
        );
    let report = gw.reload_toml(&pki, &after).await.unwrap();
    assert_eq!(report.connections_closed, 1, "{report:?}");
    closed_within(&mut live, Duration::from_secs(1)).await;
    let rec = record_where(&mut gw, |r| r.backend.is_some()).await;
    assert!(
        rec.reason.contains(&format!(
            "server name {SNI:?} now goes to route \"vault\", not \"orders\""
        )),
        "{rec:?}"
    );

    held.tcp.write_all(&held_flight).await.unwrap();
    assert_eq!(held.exchange(b"let me in").await, b"", "nothing came back");
    let rec = record_where(&mut gw, |r| r.verdict == Verdict::Deny).await;
    assert!(
        rec.reason.contains("now goes to route \"vault\"") && rec.backend.is_none(),
        "{rec:?}"
    );
    assert_eq!(sensitive.accepted(), 1, "only the first connection");
    assert_eq!(public.accepted(), 0);
}

/// A connection talks only to a backend its route still has. A reload that
/// moves the route to another backend closes the live connection, and a
/// handshake held across it connects to the route's backend as it is now.
#[tokio::test]
async fn a_connection_only_talks_to_a_backend_its_route_still_has() {
    let pki = Pki::new();
    let sensitive = EchoBackend::start().await;
    let public = EchoBackend::start().await;
    let on = |backend: &EchoBackend| {
        listener_toml(&pki, "edge", HOLDS)
            + &route_toml("orders", &[SNI], &[backend.addr], &[SPIFFE_FRONTEND])
    };
    let mut gw = RunningGateway::start(&pki, &on(&sensitive)).await;
    let mut live = connect(gw.app_addr, SNI, pki.frontend_config())
        .await
        .unwrap();
    ping(&mut live, b"before").await.unwrap();
    let (mut held, held_flight) =
        HeldClient::up_to_the_last_flight(gw.app_addr, pki.frontend_config()).await;

    let report = gw.reload_toml(&pki, &on(&public)).await.unwrap();
    assert_eq!(report.connections_closed, 1, "{report:?}");
    closed_within(&mut live, Duration::from_secs(1)).await;
    let rec = gw.next_record().await;
    assert!(
        rec.reason.contains(&format!(
            "backend {} is no longer one of route \"orders\"'s backends",
            sensitive.addr
        )),
        "{rec:?}"
    );

    held.tcp.write_all(&held_flight).await.unwrap();
    assert_eq!(held.exchange(b"straddled").await, b"straddled");
    assert_eq!(sensitive.accepted(), 1, "only the first connection");
    assert_eq!(
        public.accepted(),
        1,
        "the held one, on the route as it is now"
    );
}

/// What a reload does to a handshake under way: the route its server name
/// maps to is removed (no default route left), or flips from `off` to
/// `enforce` while the client presented no certificate. Either way it is
/// refused as it goes live and never reaches the backend.
#[tokio::test]
async fn a_handshake_is_refused_when_a_reload_removes_or_tightens_its_route() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let orders = config(&pki, &backend, "", &[SPIFFE_FRONTEND], "");
    let mut gw = RunningGateway::start(&pki, &orders).await;
    let (mut held, held_flight) =
        HeldClient::up_to_the_last_flight(gw.app_addr, pki.frontend_config()).await;
    let elsewhere = listener_toml(&pki, "edge", HOLDS)
        + &route_toml(
            "billing",
            &["billing.example.internal"],
            &[backend.addr],
            &[SPIFFE_FRONTEND],
        );
    gw.reload_toml(&pki, &elsewhere).await.unwrap();
    held.tcp.write_all(&held_flight).await.unwrap();
    assert_eq!(held.exchange(b"gone?").await, b"");
    let rec = gw.next_record().await;
    assert_eq!(rec.verdict, Verdict::Deny, "{rec:?}");
    assert!(
        rec.reason.contains(&format!(
            "no longer allowed after reload: no route for server name {SNI:?}"
        )),
        "{rec:?}"
    );

    let off = listener_toml(&pki, "edge", HOLDS)
        + &route_toml("orders", &[SNI], &[backend.addr], &[])
        + "mode = \"off\"\n";
    gw.reload_toml(&pki, &off).await.unwrap();
    let (mut held, held_flight) =
        HeldClient::up_to_the_last_flight(gw.app_addr, pki.client_config(None)).await;
    gw.reload_toml(&pki, &orders).await.unwrap();
    held.tcp.write_all(&held_flight).await.unwrap();
    assert_eq!(held.exchange(b"no cert").await, b"");
    let rec = gw.next_record().await;
    assert_eq!(rec.verdict, Verdict::Deny, "{rec:?}");
    assert!(
        rec.reason
            .contains("route now enforces and the client presented no certificate"),
        "{rec:?}"
    );
    assert_eq!(backend.accepted(), 0);
}

/// A listener whose accept queue is full: a connect to it gets no answer
/// (the kernel drops the SYN) until the caller gives up. The fillers keep
/// the queue full while the value lives.
struct Unanswering {
    addr: std::net::SocketAddr,
    _socket: tokio::net::TcpListener,
    _fillers: Vec<std::net::TcpStream>,
}

impl Unanswering {
    fn start() -> Unanswering {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let socket = socket.listen(0).unwrap();
        let addr = socket.local_addr().unwrap();
        let mut fillers = Vec::new();
        for _ in 0..8 {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(s) => fillers.push(s),
                Err(_) => {
                    return Unanswering {
                        addr,
                        _socket: socket,
                        _fillers: fillers,
                    };
                }
            }
        }
        panic!("the accept queue of {addr} never filled");
    }
}

/// A reload that revokes a client while the gateway is still connecting to
/// its backend ends the connection there: the request the client sent
/// reaches no backend, neither the one that does not answer nor the next
/// one the failover would try. Each round runs on a fresh gateway, so the
/// round robin starts at the backend that does not answer.
#[tokio::test]
async fn a_client_revoked_while_its_backend_connect_is_pending_reaches_no_backend() {
    let pki = Pki::new();
    let stuck = Unanswering::start();
    let sink = EchoBackend::start().await;
    for round in 0..3 {
        pki.write("clients.crl.pem", &pki.intermediate.crl(1, &[]).unwrap());
        let toml = listener_toml(
            &pki,
            "edge",
            &format!(
                "{}\nconnect_timeout = \"1s\"\nconnect_attempts = 2",
                pki.crls_line(&["clients.crl.pem"])
            ),
        ) + &route_toml(
            "orders",
            &[SNI],
            &[stuck.addr, sink.addr],
            &[SPIFFE_FRONTEND],
        );
        let mut gw = RunningGateway::start(&pki, &toml).await;
        let (doomed, serial) = pki.revocable_frontend(&format!("doomed-{round}"));
        let mut tls = connect(gw.app_addr, SNI, pki.client_config(Some(&doomed)))
            .await
            .unwrap();
        tls.write_all(b"secret request").await.unwrap();
        tls.flush().await.unwrap();
        // The gateway is now waiting on the backend that does not answer.
        tokio::time::sleep(Duration::from_millis(200)).await;
        pki.write(
            "clients.crl.pem",
            &pki.intermediate.crl(2, &[&serial]).unwrap(),
        );
        let report = gw.reload_toml(&pki, &toml).await.unwrap();
        assert_eq!(report.connections_closed, 1, "round {round}: {report:?}");
        closed_within(&mut tls, Duration::from_secs(1)).await;
        let rec = gw.next_record().await;
        assert!(
            rec.reason.contains("no longer allowed after reload") && rec.backend.is_none(),
            "round {round}: {rec:?}"
        );
        // Past the connect timeout: had the failover gone on, it would have
        // reached the sink by now.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(
            sink.accepted(),
            0,
            "round {round}: the request reached the sink"
        );
    }
}

/// CRLs are public, signed files: whoever sits on the path a CRL file is
/// fetched over can hand back last month's. A reload that brings an older
/// CRL of an issuer than the gateway already enforced is refused whole, so
/// the revocation stays; two different CRLs with one number are refused
/// too (which is current cannot be told). Both are counted.
#[tokio::test]
async fn a_replayed_older_crl_is_refused_and_its_revocations_stay() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let before_revocation = pki.intermediate.crl(1, &[]).unwrap();
    pki.write("clients.crl.pem", &before_revocation);
    let crls = pki.crls_line(&["clients.crl.pem"]);
    let toml = format!(
        "admin = \"127.0.0.1:0\"\n{}",
        config(&pki, &backend, &crls, &[SPIFFE_FRONTEND], "")
    );
    let gw = RunningGateway::start(&pki, &toml).await;
    let (doomed, serial) = pki.revocable_frontend("doomed");
    passes(gw.app_addr, SNI, pki.client_config(Some(&doomed)), b"ok").await;

    pki.write(
        "clients.crl.pem",
        &pki.intermediate.crl(2, &[&serial]).unwrap(),
    );
    gw.reload_toml(&pki, &toml).await.unwrap();
    let revoked = || async {
        assert_eq!(
            refusal(gw.app_addr, SNI, pki.client_config(Some(&doomed))).await,
            AlertDescription::CertificateRevoked
        );
    };
    revoked().await;

    // The old file comes back: refused, and the client stays revoked.
    pki.write("clients.crl.pem", &before_revocation);
    let err = gw.reload_toml(&pki, &toml).await.unwrap_err().to_string();
    assert!(
        err.contains("holds CRL #1 of issuer") && err.contains("already enforced CRL #2"),
        "{err}"
    );
    revoked().await;

    // Another CRL #2, without the revocation: ambiguous, refused.
    pki.write("clients.crl.pem", &pki.intermediate.crl(2, &[]).unwrap());
    let err = gw.reload_toml(&pki, &toml).await.unwrap_err().to_string();
    assert!(err.contains("two different CRLs #2"), "{err}");
    revoked().await;

    let metrics = gw.scrape().await;
    for counted in [
        "gateway_crl_refused_total{reason=\"rollback\"} 1",
        "gateway_crl_refused_total{reason=\"ambiguous\"} 1",
        "gateway_reloads_total{result=\"failed\"} 2",
    ] {
        assert!(metrics.contains(counted), "{counted} in {metrics}");
    }

    // A newer CRL is taken as ever.
    pki.write("clients.crl.pem", &pki.intermediate.crl(3, &[]).unwrap());
    gw.reload_toml(&pki, &toml).await.unwrap();
    passes(
        gw.app_addr,
        SNI,
        pki.client_config(Some(&doomed)),
        b"unrevoked by #3",
    )
    .await;
}

/// Writes the intermediate's CRL (`int.crl.pem`, revoking nothing) and the
/// root's (`root.crl.pem`, revoking the intermediate); the `crls` line
/// naming both.
fn root_revokes_the_intermediate(pki: &Pki) -> String {
    let serial = pki.intermediate.serial().unwrap();
    pki.write("int.crl.pem", &pki.intermediate.crl(1, &[]).unwrap());
    pki.write("root.crl.pem", &pki.root.crl(1, &[&serial]).unwrap());
    pki.crls_line(&["int.crl.pem", "root.crl.pem"])
}

/// Hands `root.crl.pem` back holding the intermediate's CRL (a valid CRL
/// of another issuer): the reload is refused as withdrawn, naming the file.
async fn swap_the_root_crl_for_the_intermediates(pki: &Pki, gw: &RunningGateway, toml: &str) {
    pki.write(
        "root.crl.pem",
        &std::fs::read_to_string(pki.path("int.crl.pem")).unwrap(),
    );
    let err = gw.reload_toml(pki, toml).await.unwrap_err().to_string();
    assert!(
        err.contains("root.crl.pem") && err.contains("no longer holds"),
        "{err}"
    );
}

/// A CRL file that carried an issuer's CRL can be handed back holding
/// another valid CRL (the intermediate's, say) instead: nothing older
/// comes back, but the root's revocation of the intermediate would be gone.
/// While the file is still configured, the reload is refused, naming the
/// file and the issuer, and the intermediate stays revoked; counted.
#[tokio::test]
async fn a_crl_file_that_no_longer_holds_its_issuers_crl_is_refused() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let crls = root_revokes_the_intermediate(&pki);
    let toml = format!(
        "admin = \"127.0.0.1:0\"\n{}",
        config(&pki, &backend, &crls, &[SPIFFE_FRONTEND], "")
    );
    let gw = RunningGateway::start(&pki, &toml).await;
    let revoked = || async {
        assert_eq!(
            refusal(gw.app_addr, SNI, pki.frontend_config()).await,
            AlertDescription::CertificateRevoked
        );
    };
    revoked().await;

    swap_the_root_crl_for_the_intermediates(&pki, &gw, &toml).await;
    revoked().await;
    let metrics = gw.scrape().await;
    assert!(
        metrics.contains("gateway_crl_refused_total{reason=\"withdrawn\"} 1"),
        "{metrics}"
    );
}

/// A root that re-keys under the same name (new key, its next CRL signed
/// with it) keeps its place in the CRL file: the file holding the new
/// key's CRL, alone or beside the old key's, is taken on reload, and the
/// new CRL's revocations are enforced. The old key's CRL handed back
/// afterwards is refused (it was signed before the new key's), and so is
/// another issuer's CRL in the file.
#[tokio::test]
async fn a_root_that_re_keys_under_its_name_keeps_its_crl_place() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let new_root = gateway::pki::Authority::root("gateway test root").unwrap();
    let new_int = new_root
        .intermediate("gateway test intermediate, new key")
        .unwrap();
    pki.write(
        "client-roots.pem",
        &format!("{}{}", pki.root.cert_pem, new_root.cert_pem),
    );
    let old_root_crl = pki.root.crl(1, &[]).unwrap();
    pki.write("int.crl.pem", &pki.intermediate.crl(1, &[]).unwrap());
    pki.write("new-int.crl.pem", &new_int.crl(1, &[]).unwrap());
    pki.write("root.crl.pem", &old_root_crl);
    let crls = pki.crls_line(&["int.crl.pem", "new-int.crl.pem", "root.crl.pem"]);
    let toml = format!(
        "admin = \"127.0.0.1:0\"\n{}",
        config(&pki, &backend, &crls, &[SPIFFE_FRONTEND], "")
    );
    let gw = RunningGateway::start(&pki, &toml).await;
    let issued = new_int
        .issue(&LeafSpec::client("frontend", &[SPIFFE_FRONTEND]))
        .unwrap();
    let new_client = pki.client_config(Some(&pki.creds("new-frontend", &issued, &new_int)));
    passes(gw.app_addr, SNI, pki.frontend_config(), b"old key").await;

    // The re-key: the root's next CRL, signed with the new key.
    pki.write("root.crl.pem", &new_root.crl(2, &[]).unwrap());
    gw.reload_toml(&pki, &toml).await.unwrap();
    passes(gw.app_addr, SNI, new_client.clone(), b"new key").await;

    // Both keys' CRLs in the file; the new one revokes the new intermediate.
    let revoking = new_root.crl(3, &[&new_int.serial().unwrap()]).unwrap();
    pki.write("root.crl.pem", &format!("{old_root_crl}{revoking}"));
    gw.reload_toml(&pki, &toml).await.unwrap();
    let revoked = || async {
        assert_eq!(
            refusal(gw.app_addr, SNI, new_client.clone()).await,
            AlertDescription::CertificateRevoked
        );
    };
    revoked().await;

    // The old key's CRL alone again: older than the new key's, refused.
    pki.write("root.crl.pem", &old_root_crl);
    let err = gw.reload_toml(&pki, &toml).await.unwrap_err().to_string();
    assert!(
        err.contains("holds CRL #1 of issuer")
            && err.contains("already enforced CRL #3 of issuer key"),
        "{err}"
    );
    revoked().await;

    // Another issuer's CRL in the root's file: withdrawn, as before.
    swap_the_root_crl_for_the_intermediates(&pki, &gw, &toml).await;
    revoked().await;
    let metrics = gw.scrape().await;
    for counted in [
        "gateway_crl_refused_total{reason=\"rollback\"} 1",
        "gateway_crl_refused_total{reason=\"withdrawn\"} 1",
    ] {
        assert!(metrics.contains(counted), "{counted} in {metrics}");
    }
}

/// Dropping a CRL on purpose is done in the config: with the file no
/// longer named, the reload is taken, and the root's revocation of the
/// intermediate with it. Named again later, the file is read afresh.
#[tokio::test]
async fn a_crl_removed_from_the_config_on_purpose_is_no_longer_enforced() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let both = root_revokes_the_intermediate(&pki);
    let gw =
        RunningGateway::start(&pki, &config(&pki, &backend, &both, &[SPIFFE_FRONTEND], "")).await;
    assert_eq!(
        refusal(gw.app_addr, SNI, pki.frontend_config()).await,
        AlertDescription::CertificateRevoked
    );

    let int_only = pki.crls_line(&["int.crl.pem"]);
    gw.reload_toml(
        &pki,
        &config(&pki, &backend, &int_only, &[SPIFFE_FRONTEND], ""),
    )
    .await
    .unwrap();
    passes(gw.app_addr, SNI, pki.frontend_config(), b"root CRL dropped").await;

    // Named again, holding something else: no memory of what it held.
    pki.write(
        "root.crl.pem",
        &std::fs::read_to_string(pki.path("int.crl.pem")).unwrap(),
    );
    gw.reload_toml(&pki, &config(&pki, &backend, &both, &[SPIFFE_FRONTEND], ""))
        .await
        .unwrap();
    passes(gw.app_addr, SNI, pki.frontend_config(), b"named again").await;
}

/// A removed listener's connections keep their old trust anchors and policy
/// until they drain (README: "Reload and continuous verification"); the
/// drain_timeout that ends them is the new config's, so a reload with a
/// short one cuts them at once.
#[tokio::test]
async fn a_removed_listeners_connections_drain_by_the_new_configs_drain_timeout() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let port = dead_port();
    let edge = config(&pki, &backend, "", &[SPIFFE_FRONTEND], "");
    let doomed = listener_toml(&pki, "doomed", "").replace("127.0.0.1:0", &port.to_string())
        + &route_toml("orders", &[SNI], &[backend.addr], &[SPIFFE_FRONTEND]);
    let gw = RunningGateway::start(&pki, &format!("drain_timeout = \"60s\"\n{edge}{doomed}")).await;
    let mut orphan = connect(port, SNI, pki.frontend_config()).await.unwrap();
    ping(&mut orphan, b"live").await.unwrap();
    gw.reload_toml(&pki, &format!("drain_timeout = \"1s\"\n{edge}"))
        .await
        .unwrap();
    ping(&mut orphan, b"still, while it drains").await.unwrap();
    closed_within(&mut orphan, Duration::from_secs(4)).await;
}

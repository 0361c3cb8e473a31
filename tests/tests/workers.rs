//! Many workers (`workers`), one gateway: the workers share each
//! listener's one socket, and what is one today stays one
//! across them: the listener's limits, the registry a reload re-verifies,
//! the listeners a reload adds or removes, the drain at shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gateway_tests::*;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const SNI: &str = "orders.example.internal";
const WORKERS: usize = 2;
/// Enough connections that no worker is left without
/// one (the odds of that are 2 in 2^24).
const SPREAD: usize = 24;

fn config(pki: &Pki, backend: &EchoBackend, top: &str, listener: &str) -> String {
    format!("admin = \"127.0.0.1:0\"\nworkers = {WORKERS}\n{top}\n")
        + &listener_toml(pki, "edge", listener)
        + &route_toml("orders", &[SNI], &[backend.addr], &[SPIFFE_FRONTEND])
}

/// `family{worker="i"}` for each worker, from a scrape.
fn per_worker(scrape: &str, family: &str) -> Vec<u64> {
    (0..WORKERS)
        .map(|i| {
            let prefix = format!("{family}{{worker=\"{i}\"}} ");
            scrape
                .lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no {prefix} in:\n{scrape}"))
        })
        .collect()
}

/// `n` live connections, each past a round trip.
async fn hold(
    addr: std::net::SocketAddr,
    n: usize,
    config: std::sync::Arc<rustls::ClientConfig>,
) -> Vec<TlsStream<TcpStream>> {
    let mut held = Vec::new();
    for i in 0..n {
        let mut tls = connect(addr, SNI, config.clone()).await.unwrap();
        ping(&mut tls, format!("hold {i}").as_bytes())
            .await
            .unwrap();
        held.push(tls);
    }
    held
}

#[tokio::test]
async fn every_worker_serves_a_share_of_the_connections() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let gw = RunningGateway::start(&pki, &config(&pki, &backend, "", "")).await;
    for i in 0..SPREAD {
        let tls = connect(gw.app_addr, SNI, pki.frontend_config())
            .await
            .unwrap();
        let msg = format!("conn {i}").into_bytes();
        assert_eq!(echo_roundtrip(tls, msg.clone()).await.unwrap(), msg);
    }
    let scrape = gw.scrape().await;
    let served = per_worker(&scrape, "gateway_worker_connections_total");
    assert_eq!(served.iter().sum::<u64>(), SPREAD as u64, "{served:?}");
    assert!(
        served.iter().all(|&n| n > 0),
        "a worker served none: {served:?}"
    );
}

/// A revocation reaches the connections of every worker: the registry is
/// one, whichever runtime a connection lives on.
#[tokio::test]
async fn a_revoking_reload_closes_the_clients_connections_on_every_worker() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    pki.write("clients.crl.pem", &pki.intermediate.crl(1, &[]).unwrap());
    let crls = pki.crls_line(&["clients.crl.pem"]);
    let toml = config(&pki, &backend, "", &crls);
    let gw = RunningGateway::start(&pki, &toml).await;
    let (doomed, serial) = pki.revocable_frontend("doomed");
    let mut doomed = hold(gw.app_addr, SPREAD, pki.client_config(Some(&doomed))).await;
    let mut kept = hold(gw.app_addr, 1, pki.frontend_config()).await;
    let open = per_worker(&gw.scrape().await, "gateway_worker_open_connections");
    assert!(open.iter().all(|&n| n > 0), "not on every worker: {open:?}");
    assert_eq!(open.iter().sum::<u64>(), SPREAD as u64 + 1);

    pki.write(
        "clients.crl.pem",
        &pki.intermediate.crl(2, &[&serial]).unwrap(),
    );
    let report = gw.reload_toml(&pki, &toml).await.unwrap();
    assert_eq!(report.connections_closed, SPREAD);
    for tls in &mut doomed {
        tls_closed_within(tls, Duration::from_secs(1)).await;
    }
    ping(&mut kept[0], b"still flowing").await.unwrap();
    let mut open = Vec::new();
    for _ in 0..50 {
        open = per_worker(&gw.scrape().await, "gateway_worker_open_connections");
        if open.iter().sum::<u64>() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(open.iter().sum::<u64>(), 1, "{open:?}");
}

/// `max_connections` is the listener's, not each worker's: with two
/// workers and a limit of 4, the fifth live client is refused wherever
/// the kernel sends it.
#[tokio::test]
async fn max_connections_is_one_limit_across_workers() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let toml = config(
        &pki,
        &backend,
        "",
        "max_connections = 4\nmax_handshakes_in_flight = 4\nhandshake_min_rate = 0",
    );
    let gw = RunningGateway::start(&pki, &toml).await;
    let mut live = Vec::new();
    let mut refused = 0;
    for i in 0..SPREAD {
        let attempt = async {
            let mut tls = connect(gw.app_addr, SNI, pki.frontend_config()).await?;
            ping(&mut tls, format!("try {i}").as_bytes()).await?;
            Ok::<_, std::io::Error>(tls)
        };
        match attempt.await {
            Ok(tls) => live.push(tls),
            Err(_) => refused += 1,
        }
    }
    assert_eq!(live.len(), 4, "{refused} refused");
    assert_eq!(gw.registry.len(), 4);
    for tls in &mut live {
        ping(tls, b"the four still flow").await.unwrap();
    }
}

/// A listener a reload adds is accepted on by every worker; one it
/// removes is unbound on every worker (a socket left on one would take
/// every connection).
#[tokio::test]
async fn a_listener_a_reload_adds_or_removes_does_so_on_every_worker() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let first = config(&pki, &backend, "", "");
    let gw = RunningGateway::start(&pki, &first).await;
    let before = per_worker(&gw.scrape().await, "gateway_worker_connections_total");
    let port = dead_port();
    let second = first.clone()
        + &listener_toml(&pki, "second", "").replace("127.0.0.1:0", &port.to_string())
        + &route_toml("orders", &[SNI], &[backend.addr], &[SPIFFE_FRONTEND]);
    let report = gw.reload_toml(&pki, &second).await.unwrap();
    assert_eq!(report.listeners_started, vec!["second".to_string()]);
    for i in 0..SPREAD {
        let tls = connect(port, SNI, pki.frontend_config()).await.unwrap();
        let msg = format!("second {i}").into_bytes();
        assert_eq!(echo_roundtrip(tls, msg.clone()).await.unwrap(), msg);
    }
    let after = per_worker(&gw.scrape().await, "gateway_worker_connections_total");
    assert!(
        before.iter().zip(&after).all(|(b, a)| a > b),
        "a worker took none on the new listener: {before:?} → {after:?}"
    );

    let report = gw.reload_toml(&pki, &first).await.unwrap();
    assert_eq!(report.listeners_stopped, vec!["second".to_string()]);
    // The reload answers once the removed listener's loops have ended
    // (review 5, L1): from then on every connect is refused.
    let mut accepted = 0;
    for _ in 0..SPREAD {
        if TcpStream::connect(port).await.is_ok() {
            accepted += 1;
        }
    }
    assert_eq!(
        accepted, 0,
        "a worker still listens on the removed listener"
    );
}

/// Shutdown stops every worker's accept loops, lets every worker's
/// connections run through the drain, then closes them all.
#[tokio::test]
async fn shutdown_drains_and_closes_every_workers_connections() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let toml = config(&pki, &backend, "drain_timeout = \"1s\"", "");
    let mut gw = RunningGateway::start(&pki, &toml).await;
    let mut held = hold(gw.app_addr, SPREAD, pki.frontend_config()).await;
    let open = per_worker(&gw.scrape().await, "gateway_worker_open_connections");
    assert!(open.iter().all(|&n| n > 0), "not on every worker: {open:?}");
    let addr = gw.app_addr;
    gw.shutdown.shutdown();
    // Draining: no new connection, the live ones still flow.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut accepted = 0;
    for _ in 0..SPREAD {
        if TcpStream::connect(addr).await.is_ok() {
            accepted += 1;
        }
    }
    assert_eq!(accepted, 0, "a worker still accepts while draining");
    for tls in &mut held {
        ping(tls, b"draining").await.unwrap();
    }
    // Past the drain timeout: every worker's connections are closed.
    for tls in &mut held {
        tls_closed_within(tls, Duration::from_secs(3)).await;
    }
    assert!(gw.shuts_down_within(Duration::from_secs(10)).await);
}

/// Admission is one for all workers: a source's handshakes in flight are
/// counted once whichever worker accepted them, and a block refuses it on
/// every worker.
#[tokio::test]
async fn a_sources_limits_and_its_block_hold_across_workers() {
    use gateway_tests::attack::*;
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let toml = config(
        &pki,
        &backend,
        "admin_socket = \"admin.sock\"",
        "handshake_min_rate = 0",
    ) + "\n[admission]\nexempt = [\"127.0.0.1/32\"]\nsource_handshakes_in_flight = 4\n\
         block_after = 0\nprefix_block_after = 0\nnetwork_block_after = 0\n";
    let gw = RunningGateway::start(&pki, &toml).await;
    // Stalled handshakes (no ClientHello) from one address: four hold,
    // the rest are reset at accept, wherever the kernel sent them.
    let mut stalls = Vec::new();
    for _ in 0..SPREAD {
        if let Ok(s) = tcp_from("127.0.20.1", gw.app_addr).await {
            stalls.push(s);
        }
    }
    let mut open = 0;
    for s in &mut stalls {
        if closed_within(s, Duration::from_millis(300)).await.is_none() {
            open += 1;
        }
    }
    assert_eq!(open, 4, "one source's handshakes in flight");
    assert_eq!(
        metric(&gw, &refused("source_handshakes")).await,
        SPREAD as u64 - 4
    );

    let admin = gateway::admin::client::Endpoint::Socket(gw.admin_socket.clone().unwrap());
    gateway::admin::client::add(&admin, "127.0.21.0/24", None, false)
        .await
        .unwrap();
    for _ in 0..SPREAD {
        match tcp_from("127.0.21.1", gw.app_addr).await {
            Ok(mut s) => assert!(closed_within(&mut s, STEP).await.is_some()),
            // Reset before connect() returned: refused all the same.
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
    }
    assert_eq!(metric(&gw, &refused("blocked")).await, SPREAD as u64);
    let served = per_worker(&gw.scrape().await, "gateway_worker_connections_total");
    assert_eq!(served.iter().sum::<u64>(), 4, "only the four were admitted");
}

/// A reload runs on the control plane's thread, never a worker's: it
/// builds and re-judges synchronously (here a 150,000-entry CRL, seconds in
/// a debug build), and on a worker's thread it stalled that worker's
/// connections for the whole reload (attacker review 5: 15 of 24
/// connections stalled 4-6.6 s while the other worker's answered in ms).
#[tokio::test]
async fn a_reload_does_not_stall_any_workers_connections() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    pki.write("clients.crl.pem", &pki.intermediate.crl(1, &[]).unwrap());
    let crls = pki.crls_line(&["clients.crl.pem"]);
    let toml = config(&pki, &backend, "", &crls);
    let gw = RunningGateway::start_on_own_thread(&pki, &toml);
    let mut held = Vec::new();
    for i in 0..SPREAD {
        let mut tls: TlsStream<TcpStream> = connect(gw.app_addr, SNI, pki.frontend_config())
            .await
            .unwrap();
        ping(&mut tls, format!("hold {i}").as_bytes())
            .await
            .unwrap();
        held.push(tls);
    }

    // A CRL with many revoked serials, none of them ours.
    const REVOKED: u32 = 150_000;
    let serials: Vec<Vec<u8>> = (0..REVOKED)
        .map(|i| {
            let mut s = vec![0x7f, 0x01];
            s.extend_from_slice(&i.to_be_bytes());
            s
        })
        .collect();
    let refs: Vec<&[u8]> = serials.iter().map(|s| s.as_slice()).collect();
    pki.write("clients.crl.pem", &pki.intermediate.crl(2, &refs).unwrap());

    // Every held connection pings on its own task; its worst round trip
    // during the reload is what its user saw.
    let done = Arc::new(AtomicBool::new(false));
    let worst: Vec<Arc<AtomicU64>> = (0..SPREAD).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let mut pingers = Vec::new();
    for (mut tls, worst) in held.into_iter().zip(worst.iter().cloned()) {
        let done = done.clone();
        pingers.push(tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                let t = Instant::now();
                if ping(&mut tls, b"during the reload").await.is_err() {
                    break;
                }
                worst.fetch_max(t.elapsed().as_millis() as u64, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            tls
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let report = gw.reload_toml(&pki, &toml).await;
    let reload_ms = started.elapsed().as_millis();
    tokio::time::sleep(Duration::from_millis(50)).await;
    done.store(true, Ordering::SeqCst);
    for p in pingers {
        let _ = p.await;
    }
    assert!(report.is_ok(), "{report:?}");
    let mut worst: Vec<u64> = worst.iter().map(|w| w.load(Ordering::SeqCst)).collect();
    worst.sort_unstable();
    let stalled = worst.iter().filter(|&&ms| ms >= 1000).count();
    assert_eq!(
        stalled, 0,
        "a {reload_ms} ms reload stalled {stalled} of {SPREAD} connections for >= 1 s \
         (worst round trips, ms, sorted: {worst:?})"
    );
}

/// What another process of the gateway's user gets when it binds with
/// SO_REUSEPORT at `at` and listens: Ok while it could, or the error.
fn another_process_listens(at: std::net::SocketAddr) -> Result<(), String> {
    let script = format!(
        "import socket,sys\n\
         s=socket.socket(socket.AF_INET)\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n\
         try:\n  s.bind(('{}', {}))\n  s.listen(1024)\nexcept OSError as e:\n  print(e.strerror); sys.exit(0)\n\
         print('listening')\n",
        at.ip(),
        at.port()
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3");
    let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if said == "listening" {
        Ok(())
    } else {
        Err(said)
    }
}

/// SO_REUSEPORT let any process of the socket's owner join the workers'
/// group, or bind a narrower address of the port, and take clients
/// (attacker reviews 5 and 8): the workers share one socket without it,
/// which the kernel lets no one else bind beside.
#[tokio::test]
async fn no_other_process_can_listen_where_the_workers_accept() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let gw = RunningGateway::start(&pki, &config(&pki, &backend, "", "")).await;
    assert_eq!(
        another_process_listens(gw.app_addr),
        Err("Address already in use".to_owned())
    );
    let toml =
        config(&pki, &backend, "", "").replace("bind = \"127.0.0.1:0\"", "bind = \"0.0.0.0:0\"");
    let wide = RunningGateway::start(&pki, &toml).await;
    let port = wide.app_addr.port();
    for narrow in [[127, 0, 0, 1], [127, 0, 0, 2]] {
        assert_eq!(
            another_process_listens(std::net::SocketAddr::from((narrow, port))),
            Err("Address already in use".to_owned()),
            "{narrow:?}"
        );
    }
    // And both still serve, every worker of each.
    for gw in [&gw, &wide] {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], gw.app_addr.port()));
        let tls = connect(addr, SNI, pki.frontend_config()).await.unwrap();
        assert_eq!(
            echo_roundtrip(tls, b"still".to_vec()).await.unwrap(),
            b"still"
        );
    }
}

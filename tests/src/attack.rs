//! What the admission and bad-input tests do as an attacker and as the
//! allowed client beside it: connections from other loopback addresses,
//! raw ClientHellos, waiting for the gateway to hang up, and reading the
//! refusal counters.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::{Pki, RunningGateway, STEP, echo_roundtrip};

/// A TCP connection to `to` from the loopback address `from`.
pub async fn tcp_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(from.parse().expect("address"), 0))?;
    tokio::time::timeout(STEP, s.connect(to))
        .await
        .map_err(|_| std::io::Error::other("connect hung"))?
}

/// A ClientHello as rustls sends it for `sni`, with the allowed client's
/// configuration.
pub fn client_hello(pki: &Pki, sni: &str) -> Vec<u8> {
    let name = ServerName::try_from(sni.to_owned()).expect("name");
    let mut c = rustls::ClientConnection::new(pki.frontend_config(), name).expect("client");
    let mut out = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut out).expect("hello");
    }
    out
}

/// How long until the gateway closed `s` (EOF or reset), if within `limit`.
pub async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((start + limit).into(), s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(start.elapsed()),
            // An alert or a server flight: keep reading until it closes.
            Ok(Ok(_)) => continue,
        }
    }
}

/// One allowed client through the gateway from `from`: handshake for
/// `sni`, and an echo.
pub async fn allowed_from(pki: &Pki, sni: &str, from: &str, gw: SocketAddr) -> Result<(), String> {
    let tcp = tcp_from(from, gw).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from(sni.to_owned()).expect("name");
    let tls = tokio::time::timeout(
        STEP,
        tokio_rustls::TlsConnector::from(pki.frontend_config()).connect(name, tcp),
    )
    .await
    .map_err(|_| "handshake hung".to_owned())?
    .map_err(|e| format!("handshake: {e}"))?;
    let back = echo_roundtrip(tls, b"ping".to_vec())
        .await
        .map_err(|e| format!("echo: {e}"))?;
    if back != b"ping" {
        return Err(format!("echo said {back:?}"));
    }
    Ok(())
}

/// The value of one series on the gateway's metrics endpoint (0 if absent).
pub async fn metric(gw: &RunningGateway, series: &str) -> u64 {
    gw.scrape()
        .await
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Every series of `gateway_connections_refused_total` the gateway serves.
pub async fn refusal_series(gw: &RunningGateway) -> Vec<String> {
    gw.scrape()
        .await
        .lines()
        .filter(|l| l.starts_with("gateway_connections_refused_total"))
        .map(str::to_owned)
        .collect()
}

/// The series of `gateway_connections_refused_total` for listener `edge`.
pub fn refused(reason: &str) -> String {
    format!("gateway_connections_refused_total{{listener=\"edge\",reason=\"{reason}\"}}")
}

/// A relay that stands for a client far away: it connects to `gw` from
/// 127.0.0.1 and hands the gateway's bytes to the client `delay` late (a
/// one-way delay, as on a long path, or a client whose key signs slowly).
/// The kernel sees a loopback round trip: only the floor protects it.
pub async fn far_relay(gw: SocketAddr, delay: Duration) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(up) = tcp_from("127.0.0.1", gw).await else {
                    return;
                };
                let _ = up.set_nodelay(true);
                let _ = client.set_nodelay(true);
                let (mut cr, mut cw) = client.into_split();
                let (mut ur, mut uw) = up.into_split();
                let up_task = tokio::spawn(async move {
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = cr.read(&mut buf).await {
                        if n == 0 || uw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = uw.shutdown().await;
                });
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
                let reader = tokio::spawn(async move {
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = ur.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        let _ = tx.send((Instant::now() + delay, buf[..n].to_vec()));
                    }
                });
                while let Some((at, bytes)) = rx.recv().await {
                    tokio::time::sleep_until(at.into()).await;
                    if cw.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                let _ = cw.shutdown().await;
                reader.abort();
                up_task.abort();
            });
        }
    });
    addr
}

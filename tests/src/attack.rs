//! What the admission and bad-input tests do as an attacker and as the
//! allowed client beside it: connections from other loopback addresses,
//! raw ClientHellos, waiting for the gateway to hang up, and reading the
//! refusal counters.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::AsyncReadExt as _;
use tokio::net::{TcpSocket, TcpStream};

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

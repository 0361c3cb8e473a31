//! A backend told in a PROXY header that the client was verified and
//! admitted never holds a client the gateway would now refuse: a reload
//! after register (while the gateway is still connecting, on failover, or
//! once the connection is established) that revokes the client and moves
//! the route to audit or off closes the connection, as enforce would.
//! (From an attacker review of the first fix; each failed on 7da6a52.)
use std::net::SocketAddr;
use std::time::Duration;

use gateway_tests::*;
use proxy_header::{ParseConfig, ProxyHeader, Tlv};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

const SNI: &str = "orders.example.internal";

/// A loopback port whose accept queue is full: SYNs to it are dropped, so a
/// connect to it hangs until the gateway's connect_timeout.
async fn black_hole() -> (SocketAddr, Vec<TcpStream>) {
    let s = TcpSocket::new_v4().unwrap();
    s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = s.listen(0).unwrap();
    let addr = l.local_addr().unwrap();
    let mut fill = Vec::new();
    for _ in 0..2 {
        if let Ok(Ok(c)) =
            tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await
        {
            fill.push(c);
        }
    }
    std::mem::forget(l);
    (addr, fill)
}

async fn run(new_mode: &str) {
    let pki = Pki::new();
    let (creds, serial) = pki.revocable_frontend("victim");
    pki.write("int.crl.pem", &pki.intermediate.crl(1, &[]).unwrap());
    let (hole, _fill) = black_hole().await;
    let (good, mut headers) = proxy_header_backend(None).await;
    let toml = |mode: &str| {
        listener_toml(
            &pki,
            "edge",
            &format!(
                "connect_timeout = \"3s\"\nconnect_attempts = 2\n{}",
                pki.crls_line(&["int.crl.pem"])
            ),
        ) + &route_toml(
            "orders",
            &[SNI],
            &[hole, good],
            if mode == "off" {
                &[]
            } else {
                &[SPIFFE_FRONTEND]
            },
        ) + &format!(
            "proxy_protocol = \"v2\"\nproxy_protocol_client_cert = true\nmode = \"{mode}\"\n"
        )
    };
    let mut gw = RunningGateway::start(&pki, &toml("enforce")).await;
    let mut tls = connect(gw.app_addr, SNI, pki.client_config(Some(&creds)))
        .await
        .unwrap();
    tls.write_all(b"hello").await.unwrap();
    // The gateway is now connecting to `hole` (first in round robin).
    tokio::time::sleep(Duration::from_millis(700)).await;
    pki.write("int.crl.pem", &pki.intermediate.crl(2, &[&serial]).unwrap());
    gw.reload_toml(&pki, &toml(new_mode))
        .await
        .expect("reload applied");
    let reloaded = std::time::Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(8), headers.recv()).await;
    eprintln!(
        "{new_mode}: backend {good} (hole {hole}) read the header {:?} after the reload had been applied",
        reloaded.elapsed()
    );
    drop(tls);
    let rec = gw.next_record().await;
    eprintln!(
        "RECORD after reload to {new_mode}: verdict={:?} mode={:?} backend={:?} reason={:?}",
        rec.verdict, rec.mode, rec.backend, rec.reason
    );
    let Ok(Some(bytes)) = got else {
        eprintln!("{new_mode}: backend got no header (connection closed): secure");
        return;
    };
    let (h, _) = ProxyHeader::parse(&bytes, ParseConfig::default()).expect("parses");
    let ssl = h.ssl().unwrap();
    let identity = h.tlvs().find_map(|t| match t.unwrap() {
        Tlv::Custom(0xE0, v) => Some(v.into_owned()),
        _ => None,
    });
    let cert = ssl.tlvs().find_map(|t| match t.unwrap() {
        Tlv::Custom(0x28, v) => Some(v.len()),
        _ => None,
    });
    eprintln!(
        "{new_mode}: header written AFTER the reload (revoked cert): verify={} identity={:?} cert28={:?}",
        ssl.verify(),
        identity.as_deref().map(String::from_utf8_lossy),
        cert
    );
    assert_ne!(
        ssl.verify(),
        0,
        "{new_mode}: revoked client sent as verified after the reload"
    );
    assert_eq!(
        identity, None,
        "{new_mode}: identity sent for a revoked client"
    );
    assert_eq!(
        cert, None,
        "{new_mode}: revoked certificate forwarded in 0x28"
    );
}

#[tokio::test]
async fn reload_to_audit_with_revocation_during_failover_connect() {
    run("audit").await;
}

#[tokio::test]
async fn reload_to_off_with_revocation_during_failover_connect() {
    run("off").await;
}

/// An established connection whose header told the backend "verified" with
/// the identity: a reload to audit revoking its certificate leaves it open,
/// the backend still holding the "verified" claim.
#[tokio::test]
async fn established_connection_told_verified_survives_revocation_under_audit() {
    use tokio::io::AsyncReadExt;
    let pki = Pki::new();
    let (creds, serial) = pki.revocable_frontend("victim");
    pki.write("int.crl.pem", &pki.intermediate.crl(1, &[]).unwrap());
    let (good, mut headers) = proxy_header_backend(None).await;
    let toml = |mode: &str| {
        listener_toml(&pki, "edge", &pki.crls_line(&["int.crl.pem"]))
            + &route_toml("orders", &[SNI], &[good], &[SPIFFE_FRONTEND])
            + &format!("proxy_protocol = \"v2\"\nmode = \"{mode}\"\n")
    };
    let mut gw = RunningGateway::start(&pki, &toml("enforce")).await;
    let mut tls = connect(gw.app_addr, SNI, pki.client_config(Some(&creds)))
        .await
        .unwrap();
    tls.write_all(b"hello").await.unwrap();
    let mut b = [0u8; 5];
    tls.read_exact(&mut b).await.unwrap();
    let bytes = headers.recv().await.unwrap();
    let (h, _) = ProxyHeader::parse(&bytes, ParseConfig::default()).unwrap();
    assert_eq!(h.ssl().unwrap().verify(), 0, "admitted at first");
    pki.write("int.crl.pem", &pki.intermediate.crl(2, &[&serial]).unwrap());
    gw.reload_toml(&pki, &toml("audit"))
        .await
        .expect("reload applied");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _ = tls.write_all(b"again").await;
    let r = tokio::time::timeout(Duration::from_secs(3), tls.read_exact(&mut b)).await;
    eprintln!(
        "after revocation + reload to audit: read {:?} {:?}",
        r.as_ref().map(|x| x.as_ref().map_err(|e| e.kind())),
        std::str::from_utf8(&b)
    );
    let _ = &mut gw;
    assert!(
        !matches!(r, Ok(Ok(_))),
        "the revoked client's connection goes on; its backend was told it is verified"
    );
}

/// One connection, two decisions: counted `allow` at its handshake and
/// `audit` at register.
#[tokio::test]
async fn control_reload_enforce_with_revocation_during_failover_connect() {
    run("enforce").await;
}

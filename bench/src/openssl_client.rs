//! The OpenSSL-based load client: stunnel in client mode in front of the
//! plain-TCP load generator, so each peer is also measured against the TLS
//! stack most of its users' clients run, beside the rustls client of
//! `load.rs`. The same job: TLS 1.3, TLS_AES_128_GCM_SHA256, P-256, the same
//! client chain and key, SNI `bench.internal`, no resumption (every
//! connection is a full handshake), and the server's handshake signature
//! checked but not its chain (OpenSSL always checks CertificateVerify; with
//! no `verifyChain` stunnel skips the chain, as `load::SignatureOnly` does).
//!
//! It runs pinned to the load's CPUs, like the rustls client, so its work
//! never lands on the proxy's CPU; only the proxy's own process tree is
//! charged (procstat.rs).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};

use crate::peers;
use crate::pki::{self, Files};

/// One stunnel client, forwarding plain connections on `addr` to one peer.
pub struct OpensslClient {
    pub addr: SocketAddr,
    child: Child,
}

impl OpensslClient {
    pub fn start(
        pki: &Files,
        server: SocketAddr,
        dir: &Path,
        cpus: &[usize],
    ) -> anyhow::Result<OpensslClient> {
        std::fs::create_dir_all(dir)?;
        let addr = peers::free_port()?;
        let config = peers::write(dir, "stunnel-client.conf", &config(pki, addr, server))?;
        let mut cmd = Command::new("stunnel4");
        cmd.arg(config);
        let child = peers::spawn_listening(cmd, "stunnel client", addr, dir, cpus)?;
        Ok(OpensslClient { addr, child })
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for OpensslClient {
    fn drop(&mut self) {
        peers::stop(&mut self.child);
    }
}

/// The client's stunnel configuration.
fn config(pki: &Files, addr: SocketAddr, server: SocketAddr) -> String {
    format!(
        "foreground = yes
pid =
debug = 3
[client]
client = yes
accept = {addr}
connect = {server}
sni = {name}
cert = {chain}
key = {key}
sslVersionMin = TLSv1.3
sslVersionMax = TLSv1.3
ciphersuites = TLS_AES_128_GCM_SHA256
curves = prime256v1
sessionResume = no
TIMEOUTclose = 0
TIMEOUTidle = 600
",
        name = pki::SERVER_NAME,
        chain = pki.client_chain_pem.display(),
        key = pki.client_key_pem.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_offers_what_the_rustls_client_does_and_never_resumes() {
        let dir = std::env::temp_dir().join(format!("openssl-client-{}", std::process::id()));
        let pki = pki::create(&dir).expect("pki");
        let text = config(
            &pki,
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        let _ = std::fs::remove_dir_all(&dir);
        for line in [
            "client = yes",
            "sslVersionMin = TLSv1.3",
            "sslVersionMax = TLSv1.3",
            "ciphersuites = TLS_AES_128_GCM_SHA256",
            "curves = prime256v1",
            "sessionResume = no",
            "sni = bench.internal",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        assert!(!text.contains("verifyChain"), "{text}");
    }
}

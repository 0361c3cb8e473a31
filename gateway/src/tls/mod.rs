//! TLS termination: what each listener serves with and how a connection's
//! `ServerConfig` is put together once its route is known (by SNI).

pub mod certs;
pub mod verifier;

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{
    ClientHello, NoServerSessionStorage, ResolvesServerCert, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, SupportedProtocolVersion};

use crate::config::TlsVersion;
use crate::policy::Policy;
pub use certs::CertError;
use verifier::{ConnectionVerifier, Decision};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("{path}: cannot build a client verifier from these CAs: {reason}")]
    Verifier { path: String, reason: String },
    #[error("TLS configuration refused: {0}")]
    Config(#[from] rustls::Error),
}

/// The crypto every TLS context in the gateway uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A listener's TLS material, loaded and checked once.
pub struct ListenerTls {
    provider: Arc<CryptoProvider>,
    server_key: Arc<CertifiedKey>,
    client_chain: Arc<dyn ClientCertVerifier>,
    versions: Vec<&'static SupportedProtocolVersion>,
}

impl fmt::Debug for ListenerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenerTls")
            .field("versions", &self.versions)
            .finish_non_exhaustive()
    }
}

impl ListenerTls {
    pub fn load(
        cert: &Path,
        key: &Path,
        client_ca: &Path,
        versions: &[TlsVersion],
    ) -> Result<Self, TlsError> {
        let provider = provider();
        let server_key = certs::load_server_identity(cert, key, &provider)?;
        let roots = certs::load_roots(client_ca)?;
        let client_chain =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| TlsError::Verifier {
                    path: client_ca.display().to_string(),
                    reason: e.to_string(),
                })?;
        let versions = versions
            .iter()
            .map(|v| match v {
                TlsVersion::Tls12 => &rustls::version::TLS12,
                TlsVersion::Tls13 => &rustls::version::TLS13,
            })
            .collect();
        Ok(Self {
            provider,
            server_key,
            client_chain,
            versions,
        })
    }

    /// A `ServerConfig` for one connection on `policy`'s route; the verifier
    /// writes what it decides into the returned slot.
    pub fn connection_config(
        &self,
        policy: Arc<Policy>,
    ) -> Result<(Arc<ServerConfig>, Arc<Mutex<Decision>>), TlsError> {
        let decision = Arc::new(Mutex::new(Decision::default()));
        let verifier = ConnectionVerifier::new(self.client_chain.clone(), policy, decision.clone());
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&self.versions)?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(Arc::new(OneCert(self.server_key.clone())));
        // No resumption: a resumed session skips the client-certificate
        // verifier, and with it the route's policy. Every connection proves
        // itself in full.
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok((Arc::new(config), decision))
    }
}

#[derive(Debug)]
struct OneCert(Arc<CertifiedKey>);

impl ResolvesServerCert for OneCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A fatal TLS alert as a plaintext record, for refusing before any TLS
/// state exists (unknown SNI: no route, so no config to refuse with).
pub fn plaintext_alert(description: rustls::AlertDescription) -> [u8; 7] {
    // ContentType alert (21), legacy version TLS 1.2, length 2, level fatal (2).
    [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, u8::from(description)]
}

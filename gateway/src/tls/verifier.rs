//! The client-certificate verifier: webpki's chain checks, then our identity
//! rules, then the route's policy, all inside the handshake.
//!
//! One `ConnectionVerifier` is made per connection so that what it decided
//! (identity, verdict, reason) reaches the access log; the heavy parts (trust
//! anchors, webpki) are shared.

use std::sync::{Arc, Mutex};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::identity::{Identity, IdentityError};
use crate::policy::{Policy, Verdict};

/// What the verifier concluded about the client, for the access log.
#[derive(Debug, Clone, Default)]
pub struct Decision {
    pub identity: Option<Identity>,
    pub verdict: Option<Verdict>,
    /// Why the certificate itself was refused, before policy ran.
    pub refused: Option<String>,
}

#[derive(Debug)]
pub struct ConnectionVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    policy: Arc<Policy>,
    decision: Arc<Mutex<Decision>>,
}

impl ConnectionVerifier {
    pub fn new(
        chain: Arc<dyn ClientCertVerifier>,
        policy: Arc<Policy>,
        decision: Arc<Mutex<Decision>>,
    ) -> Self {
        Self {
            chain,
            policy,
            decision,
        }
    }

    fn record(&self, f: impl FnOnce(&mut Decision)) {
        // A poisoned lock only means another thread panicked mid-write; the
        // record is advisory (logging), so keep going with what is there.
        let mut d = self.decision.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut d);
    }
}

impl ClientCertVerifier for ConnectionVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        if let Err(e) = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)
        {
            self.record(|d| d.refused = Some(format!("client certificate refused: {e}")));
            return Err(e);
        }
        let identity = match Identity::from_leaf(end_entity) {
            Ok(id) => id,
            Err(e) => {
                self.record(|d| d.refused = Some(format!("client certificate refused: {e}")));
                return Err(Error::InvalidCertificate(match e {
                    // unsupported_certificate, as webpki answers for a
                    // serverAuth-only leaf.
                    IdentityError::NoClientAuth => CertificateError::InvalidPurpose,
                    // bad_certificate: trusted, but what it names is not
                    // usable as an identity.
                    _ => CertificateError::NotValidForName,
                }));
            }
        };
        let verdict = self.policy.decide(&identity);
        let allowed = matches!(verdict, Verdict::Allow { .. });
        self.record(|d| {
            d.identity = Some(identity);
            d.verdict = Some(verdict);
        });
        if allowed {
            Ok(ClientCertVerified::assertion())
        } else {
            // access_denied: the client is who it says, but may not use this route.
            Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

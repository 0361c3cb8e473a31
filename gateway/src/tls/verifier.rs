//! The client-certificate verifier: webpki's chain checks (the route's trust
//! bundle, CRLs, and the device CA where required), then our identity rules,
//! then the route's policy, all inside the handshake.
//!
//! One `ConnectionVerifier` is made per connection, so it knows the client's
//! source address and can hand what it decided (identity, verdict, reason) to
//! the access log; the heavy parts (trust anchors, CRLs) are shared.
//!
//! In `audit` mode nothing here refuses: every would-deny is recorded and the
//! handshake goes on, so operators can watch before they block.
//!
//! A certificate is public; only the CertificateVerify signature proves
//! the peer holds its key, and rustls asks for it after
//! `verify_client_cert`. So the identity counts as `proven` only once that
//! signature verified, and a policy refusal waits for it: without the key
//! a peer learns nothing about the policy (the alert is the signature's),
//! and the access log does not name an identity it never proved (#19).

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};

use super::Bundle;
use super::bundle::Verified;
use crate::config::Mode;
use crate::identity::{Identity, IdentityError};
use crate::policy::{Policy, Subject, Verdict};

/// What the verifier concluded about the client, for the access log.
#[derive(Debug, Clone, Default)]
pub struct Decision {
    pub identity: Option<Identity>,
    pub verdict: Option<Verdict>,
    /// Why the certificate itself was refused, before policy ran.
    pub refused: Option<String>,
    /// What kind of problem that was.
    pub problem: Option<CertProblem>,
    /// What the chain check learned (see `bundle::Verified`).
    pub verified: Option<Verified>,
    /// The path the chain check verified (what a reload judges a known
    /// source by).
    pub path: Option<super::bundle::Path>,
    /// The client's CertificateVerify signature verified with the
    /// certificate's key: `identity` is the peer's, not only named by a
    /// certificate it sent.
    pub proven: bool,
}

/// What kind of problem refused a certificate: the `reason` of
/// `gateway_handshake_failures_total` it is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertProblem {
    /// The chain leads to none of the bundle's anchors.
    UnknownCa,
    /// The leaf or a CA of its path is past its notAfter.
    Expired,
    /// Revoked, or the revocation check could not vouch for it: no CRL
    /// covers it where one must, or that CRL is stale and the bundle
    /// refuses stale CRLs.
    Revoked,
    /// Anything else (signature, encoding, purpose, validity not begun,
    /// names unusable as an identity, outside the CA's trust domains).
    Bad,
}

impl CertProblem {
    fn of(error: &Error) -> CertProblem {
        let Error::InvalidCertificate(e) = error else {
            return CertProblem::Bad;
        };
        match e {
            CertificateError::UnknownIssuer => CertProblem::UnknownCa,
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                CertProblem::Expired
            }
            CertificateError::Revoked
            | CertificateError::UnknownRevocationStatus
            | CertificateError::ExpiredRevocationList
            | CertificateError::ExpiredRevocationListContext { .. } => CertProblem::Revoked,
            _ => CertProblem::Bad,
        }
    }
}

#[derive(Debug)]
pub(super) struct ConnectionVerifier {
    pub(super) chain: Arc<Bundle>,
    /// `chain` is a device route's device CA.
    pub(super) device: bool,
    pub(super) policy: Arc<Policy>,
    pub(super) mode: Mode,
    pub(super) source: IpAddr,
    pub(super) decision: Arc<Mutex<Decision>>,
}

impl ConnectionVerifier {
    fn record(&self, f: impl FnOnce(&mut Decision)) {
        // A poisoned lock only means another thread panicked mid-write; the
        // record is advisory (logging), so keep going with what is there.
        let mut d = self.decision.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut d);
    }

    /// Refuses in enforce mode; lets the handshake go on in audit mode.
    fn refuse(&self, error: Error) -> Result<ClientCertVerified, Error> {
        if self.mode == Mode::Audit {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(error)
        }
    }

    /// The peer proved it holds the key: now the policy's refusal, if
    /// any, is given (access_denied: the client is who it says, but may not
    /// use this route).
    fn proven(&self, valid: HandshakeSignatureValid) -> Result<HandshakeSignatureValid, Error> {
        let mut denied = false;
        self.record(|d| {
            d.proven = true;
            denied = matches!(d.verdict, Some(Verdict::Deny(_)));
        });
        if denied && self.mode != Mode::Audit {
            Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        } else {
            Ok(valid)
        }
    }

    fn refuse_certificate(&self, why: String, error: Error) -> Result<ClientCertVerified, Error> {
        self.record(|d| {
            d.refused = Some(format!("client certificate refused: {why}"));
            d.problem = Some(CertProblem::of(&error));
        });
        self.refuse(error)
    }
}

impl ClientCertVerifier for ConnectionVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mode == Mode::Enforce
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
        let (verified, path) = match self.chain.verify_path(end_entity, intermediates, now) {
            Ok(v) => v,
            // unknown_ca when it does not chain to the device CA at all.
            Err(e) if self.device => {
                return self.refuse_certificate(format!("not issued by the device CA: {e}"), e);
            }
            Err(e) => return self.refuse_certificate(e.to_string(), e),
        };
        let identity = match Identity::from_leaf(end_entity) {
            Ok(id) => id,
            Err(e) => {
                // A trusted CA signed a name no rule can be written for:
                // worth an operator's look, not only an access-log line.
                tracing::warn!(client = %self.source, reason = %e,
                    "client certificate refused: its names are not usable as an identity");
                let error = Error::InvalidCertificate(match e {
                    // unsupported_certificate, as webpki answers for a
                    // serverAuth-only leaf.
                    IdentityError::NoClientAuth => CertificateError::InvalidPurpose,
                    // bad_certificate: trusted, but what it names is not
                    // usable as an identity.
                    _ => CertificateError::NotValidForName,
                });
                return self.refuse_certificate(e.to_string(), error);
            }
        };
        // Whatever CA signed it, a bundle only vouches for its own trust
        // domains: an identity outside them is not one this CA may name.
        if let Err(why) = self.chain.admits_uris(&identity.uris) {
            tracing::warn!(client = %self.source, reason = %why,
                "client certificate refused: an identity outside its CA's trust domains");
            return self.refuse_certificate(
                why,
                Error::InvalidCertificate(CertificateError::NotValidForName),
            );
        }
        let verdict = self.policy.decide(Subject {
            identity: &identity,
            source: self.source,
            now: jiff::Timestamp::now(),
        });
        // A refusal by policy waits for the signature (`proven`): before
        // it, the peer may hold the certificate without its key.
        self.record(|d| {
            d.identity = Some(identity);
            d.verdict = Some(verdict);
            d.verified = Some(verified);
            d.path = Some(path);
        });
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        let valid =
            rustls::crypto::verify_tls12_signature(message, cert, dss, self.chain.algorithms())?;
        self.proven(valid)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        let valid =
            rustls::crypto::verify_tls13_signature(message, cert, dss, self.chain.algorithms())?;
        self.proven(valid)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.algorithms().supported_schemes()
    }
}

//! `gateway pki inspect FILE`: what the gateway would see in a certificate
//! (identity, EKU, validity, issuer chain) and why it would refuse it.

use std::fmt::Write as _;
use std::path::Path;

use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::Identity;
use crate::tls::certs;

/// The report, as lines for a terminal, and whether the gateway would accept
/// the certificate as a client (with `client_ca`, the chain is checked too).
pub struct Report {
    pub text: String,
    pub refusals: Vec<String>,
}

pub fn inspect(path: &Path, client_ca: Option<&Path>) -> Result<Report, certs::CertError> {
    let chain = certs::load_certs(path)?;
    let mut text = String::new();
    let mut refusals = Vec::new();
    for (i, der) in chain.iter().enumerate() {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| certs::CertError::BadCertificate {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        let role = if i == 0 { "leaf" } else { "chain" };
        let _ = writeln!(text, "{role}[{i}]: subject {}", cert.subject());
        let _ = writeln!(text, "  issuer:   {}", cert.issuer());
        let _ = writeln!(
            text,
            "  serial:   {}",
            cert.tbs_certificate.raw_serial_as_string().replace(':', "")
        );
        let v = cert.validity();
        let _ = writeln!(text, "  validity: {} .. {}", v.not_before, v.not_after);
        if i > 0 {
            continue;
        }
        let eku = match cert.extended_key_usage() {
            Ok(Some(e)) => {
                let mut uses = Vec::new();
                if e.value.server_auth {
                    uses.push("serverAuth");
                }
                if e.value.client_auth {
                    uses.push("clientAuth");
                }
                if e.value.any {
                    uses.push("any");
                }
                uses.join(", ")
            }
            _ => "(none)".into(),
        };
        let _ = writeln!(text, "  EKU:      {eku}");
        let is_ca = cert.is_ca();
        let _ = writeln!(text, "  CA:       {is_ca}");
        match Identity::from_leaf(der) {
            Ok(id) => {
                let _ = writeln!(
                    text,
                    "  identity: {}",
                    if id.is_empty() {
                        "(none)".into()
                    } else {
                        id.to_string()
                    }
                );
                if id.is_empty() {
                    refusals.push("no URI, DNS or email SAN: no identity to allow".into());
                }
            }
            Err(e) => refusals.push(e.to_string()),
        }
        let now = x509_parser::time::ASN1Time::now();
        if v.not_after < now {
            refusals.push(format!("expired at {}", v.not_after));
        }
        if v.not_before > now {
            refusals.push(format!("not valid before {}", v.not_before));
        }
        if is_ca {
            refusals.push("a CA certificate used as a leaf".into());
        }
    }
    if let Some(ca) = client_ca {
        let roots = certs::load_roots(ca)?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            crate::tls::provider(),
        )
        .build()
        .map_err(|e| certs::CertError::BadTrustAnchor {
            path: ca.to_owned(),
            reason: e.to_string(),
        })?;
        // load_certs never returns an empty chain.
        let Some((leaf, rest)) = chain.split_first() else {
            return Ok(Report { text, refusals });
        };
        let rest: &[CertificateDer<'_>] = rest;
        match verifier.verify_client_cert(leaf, rest, UnixTime::now()) {
            Ok(_) => {
                let _ = writeln!(text, "chain:    verifies to {} as a client", ca.display());
            }
            Err(e) => refusals.push(format!("chain does not verify to {}: {e}", ca.display())),
        }
    }
    if refusals.is_empty() {
        let _ = writeln!(
            text,
            "verdict:  usable as a client certificate (the route's policy decides the rest)"
        );
    } else {
        for r in &refusals {
            let _ = writeln!(text, "refused:  {r}");
        }
    }
    Ok(Report { text, refusals })
}

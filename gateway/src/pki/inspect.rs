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

/// `crl`: the CRLs to check the chain against (None: not checked).
pub fn inspect(
    path: &Path,
    client_ca: Option<&Path>,
    crl: Option<&Path>,
) -> Result<Report, certs::CertError> {
    let chain = certs::load_certs(path)?;
    let mut text = String::new();
    let mut refusals = Vec::new();
    if let Some(crl) = crl {
        revocation(&chain, crl, &mut text, &mut refusals)?;
    }
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

/// Whether a CRL in `crl_path` lists a certificate of the chain, as the
/// gateway's bundle with `crls = [crl_path]` would find; a stale CRL is
/// said too (with `crl_expired = "refuse"` it refuses every client it
/// covers).
fn revocation(
    chain: &[CertificateDer<'static>],
    crl_path: &Path,
    text: &mut String,
    refusals: &mut Vec<String>,
) -> Result<(), certs::CertError> {
    let crls = crate::tls::crl::load_all(&[crl_path.to_owned()])?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut covered = false;
    for der in chain {
        let Ok((_, cert)) = X509Certificate::from_der(der) else {
            continue;
        };
        let issuer = cert.issuer().to_string();
        for crl in crls.iter().filter(|c| c.issuer == issuer) {
            covered = true;
            if crl.next_update.is_some_and(|t| t <= now) {
                refusals.push(format!(
                    "the CRL of {issuer} in {} is past its next update",
                    crl_path.display()
                ));
            }
            if let Ok(Some(_)) = crl.crl.find_serial(cert.tbs_certificate.raw_serial()) {
                refusals.push(format!(
                    "{} is revoked by the CRL of {issuer} in {}",
                    cert.subject(),
                    crl_path.display()
                ));
            }
        }
    }
    let _ = writeln!(
        text,
        "CRL:      {}{}",
        crl_path.display(),
        if covered {
            ""
        } else {
            " (names none of this chain's issuers: revocation not checked)"
        }
    );
    Ok(())
}

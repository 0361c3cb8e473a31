//! What a verified client certificate says about who the client is.
//!
//! Only the leaf's SANs count (URI, DNS, email); the subject CN is kept for
//! routes that opt in and is otherwise ignored. A wildcard anywhere makes the
//! certificate unusable as an identity: a client is one name, never a pattern.
//!
//! Each name has one spelling, so a rule written one way cannot be dodged by
//! a certificate written another: a URI claiming the `spiffe` scheme must be
//! a valid SPIFFE ID (see `spiffe`; otherwise the certificate is unusable),
//! DNS names are lower-cased and lose a trailing dot (`a.example.` and
//! `a.example` are one name), and an email address's domain is lower-cased
//! (its local part is kept exactly, as RFC 5321 leaves it to the mailbox).

use std::fmt;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub uris: Vec<String>,
    pub dns: Vec<String>,
    pub emails: Vec<String>,
    pub common_name: Option<String>,
    /// Serial number, hex, for logs.
    pub serial: String,
    /// notAfter, seconds since the epoch.
    pub not_after: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("certificate is not valid DER: {0}")]
    BadDer(String),
    #[error("certificate has a wildcard SAN {0:?}: wildcards are never an identity")]
    Wildcard(String),
    #[error("certificate has a malformed subjectAltName extension: {0}")]
    BadSan(String),
    #[error("certificate lacks the clientAuth extended key usage")]
    NoClientAuth,
    #[error("certificate has a URI SAN {uri:?} that is not a valid SPIFFE ID: {why}")]
    BadSpiffeId {
        uri: String,
        why: crate::spiffe::SpiffeError,
    },
    #[error("certificate has a malformed DNS SAN {0:?}")]
    BadDnsName(String),
}

impl Identity {
    /// Reads the identity of a client leaf (already chain-verified by webpki).
    ///
    /// webpki treats a missing EKU extension as "any purpose"; a client
    /// identity must say clientAuth explicitly.
    pub fn from_leaf(der: &[u8]) -> Result<Identity, IdentityError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| IdentityError::BadDer(e.to_string()))?;
        let client_auth =
            matches!(cert.extended_key_usage(), Ok(Some(eku)) if eku.value.client_auth);
        if !client_auth {
            return Err(IdentityError::NoClientAuth);
        }
        let mut id = Identity {
            serial: cert.tbs_certificate.raw_serial_as_string(),
            not_after: cert.validity().not_after.timestamp(),
            common_name: cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_owned),
            ..Identity::default()
        };
        let san = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::BadSan(e.to_string()))?;
        if let Some(san) = san {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(u) => push(&mut id.uris, uri(checked(u)?)?),
                    GeneralName::DNSName(d) => push(&mut id.dns, dns(checked(d)?)?),
                    GeneralName::RFC822Name(e) => push(&mut id.emails, email(checked(e)?)),
                    // x509-parser's answer for a name that is not valid
                    // text (a URI, DNS or email SAN that is not UTF-8):
                    // skipping it would let it dodge every rule and the
                    // trust domains.
                    GeneralName::Invalid(tag, _) => {
                        return Err(IdentityError::BadSan(format!(
                            "an entry (tag {}) that is not valid text",
                            tag.0
                        )));
                    }
                    // Not names an identity rule can be written for.
                    _ => {}
                }
            }
        }
        Ok(id)
    }

    /// The first URI SAN under `prefix`: the device this certificate is bound to.
    pub fn device(&self, prefix: &str) -> Option<&str> {
        self.uris
            .iter()
            .map(String::as_str)
            .find(|u| u.starts_with(prefix) && u.len() > prefix.len())
    }

    /// No SAN-based identity at all.
    pub fn is_empty(&self) -> bool {
        self.uris.is_empty() && self.dns.is_empty() && self.emails.is_empty()
    }
}

fn checked(name: &str) -> Result<&str, IdentityError> {
    if name.contains('*') {
        return Err(IdentityError::Wildcard(name.to_owned()));
    }
    Ok(name)
}

/// Two spellings of one name are one name.
fn push(names: &mut Vec<String>, name: String) {
    if !names.contains(&name) {
        names.push(name);
    }
}

fn uri(u: &str) -> Result<String, IdentityError> {
    if crate::spiffe::claims_spiffe(u) {
        crate::spiffe::SpiffeId::parse(u).map_err(|why| IdentityError::BadSpiffeId {
            uri: u.to_owned(),
            why,
        })?;
    }
    Ok(u.to_owned())
}

fn dns(d: &str) -> Result<String, IdentityError> {
    normalise_dns(d).ok_or_else(|| IdentityError::BadDnsName(d.to_owned()))
}

fn email(e: &str) -> String {
    normalise_email(e)
}

/// A DNS name in its one spelling: lower case, without the root's trailing
/// dot. None when no name is left or a label is empty.
pub fn normalise_dns(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.split('.').any(str::is_empty) {
        return None;
    }
    Some(name.to_ascii_lowercase())
}

/// An email address with its domain in lower case; the local part as written.
pub fn normalise_email(address: &str) -> String {
    match address.rsplit_once('@') {
        Some((local, domain)) => format!("{local}@{}", domain.to_ascii_lowercase()),
        None => address.to_owned(),
    }
}

/// The form logs and the access log use: every SAN, in the allow-entry syntax.
impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        parts.extend(self.uris.iter().cloned());
        parts.extend(self.dns.iter().map(|d| format!("dns:{d}")));
        parts.extend(self.emails.iter().map(|e| format!("email:{e}")));
        if parts.is_empty()
            && let Some(cn) = &self.common_name
        {
            parts.push(format!("cn:{cn}"));
        }
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Authority, LeafSpec};
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    fn leaf(sans: &[&str]) -> Result<Identity, IdentityError> {
        let root = Authority::root("identity test root").unwrap();
        let issued = root.issue(&LeafSpec::client("c", sans)).unwrap();
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        Identity::from_leaf(&der)
    }

    #[test]
    fn names_are_read_in_one_spelling() {
        let id = leaf(&[
            "dns:Batch.Example.Internal.",
            "dns:batch.example.internal",
            "email:Ops@Example.Internal",
            "spiffe://example.internal/ns/shop/sa/Frontend",
            "https://Example.internal/kept/as/written/",
        ])
        .unwrap();
        assert_eq!(id.dns, ["batch.example.internal"]);
        assert_eq!(id.emails, ["Ops@example.internal"]);
        assert_eq!(
            id.uris,
            [
                "spiffe://example.internal/ns/shop/sa/Frontend",
                "https://Example.internal/kept/as/written/"
            ]
        );
    }

    /// A client leaf whose subjectAltName extension is `san` (its DER
    /// contents), self-signed: `from_leaf` reads names, not signatures.
    fn leaf_with_raw_san(san: Vec<u8>) -> Result<Identity, IdentityError> {
        let mut params = rcgen::CertificateParams::default();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params
            .custom_extensions
            .push(rcgen::CustomExtension::from_oid_content(
                &[2, 5, 29, 17],
                san,
            ));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Identity::from_leaf(cert.der())
    }

    /// DER: a SEQUENCE of one GeneralName with this context tag and bytes.
    fn one_name(tag: u8, bytes: &[u8]) -> Vec<u8> {
        let mut name = vec![0x80 | tag, bytes.len() as u8];
        name.extend_from_slice(bytes);
        let mut seq = vec![0x30, name.len() as u8];
        seq.extend(name);
        seq
    }

    /// A SAN that is not UTF-8 is no name any rule or trust domain could
    /// judge: the certificate is refused, not read without it.
    #[test]
    fn a_san_that_is_not_text_makes_the_certificate_unusable() {
        let (email, dns, uri) = (1, 2, 6);
        assert_eq!(
            leaf_with_raw_san(one_name(uri, b"spiffe://example.internal/ok"))
                .unwrap()
                .uris,
            ["spiffe://example.internal/ok"]
        );
        for (tag, bytes) in [
            (uri, &b"spiffe://evil.internal/sa/\xff"[..]),
            (dns, b"evil\xc3.internal"),
            (email, b"mallory@\xfe.internal"),
        ] {
            match leaf_with_raw_san(one_name(tag, bytes)) {
                Err(IdentityError::BadSan(why)) => assert!(why.contains("not valid text"), "{why}"),
                other => panic!("tag {tag}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_uri_claiming_spiffe_must_be_a_valid_spiffe_id() {
        for bad in [
            "spiffe://example.internal/ns/shop/sa/bad/",
            "spiffe://example.internal/ns/shop/./sa/bad",
            "spiffe://example.internal/ns/shop/sa/%62ad",
            "spiffe://EXAMPLE.internal/ns/shop/sa/bad",
            "SPIFFE://example.internal/ns/shop/sa/bad",
            "spiffe://example.internal/ns/shop/sa/bad?x",
        ] {
            match leaf(&["spiffe://example.internal/ok", bad]) {
                Err(IdentityError::BadSpiffeId { uri, .. }) => assert_eq!(uri, bad),
                other => panic!("{bad}: {other:?}"),
            }
        }
        assert!(matches!(
            leaf(&["dns:a..example"]),
            Err(IdentityError::BadDnsName(_))
        ));
    }
}

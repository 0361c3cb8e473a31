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
//! `a.example` are one name), and an email address's domain is read as a
//! DNS name is (its local part is kept exactly, as RFC 5321 leaves it to
//! the mailbox). Names that no rule could be written for are refused: a DNS
//! label of anything but letters, digits, `-` and `_`, an email address
//! that is not a plain dot-atom, a URI with spaces, control or non-ASCII
//! characters. A route that matches common names takes one readable CN or
//! none; more than one is refused there.
//!
//! Logs show an identity as a JSON array of its names (`Display`), and the
//! access log records that array: no name can pass for two.

use std::fmt;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub uris: Vec<String>,
    pub dns: Vec<String>,
    pub emails: Vec<String>,
    /// The subject's common name, for routes with `match_common_name`.
    pub common_name: CommonName,
    /// Serial number, hex, for logs.
    pub serial: String,
    /// notAfter, seconds since the epoch.
    pub not_after: i64,
    /// notBefore, seconds since the epoch: with notAfter, the lifetime the
    /// audit report judges renewal by.
    pub not_before: i64,
}

/// A subject's common name as `match_common_name` may use it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CommonName {
    #[default]
    None,
    One(String),
    /// More than one CN, or one that is not plain text: which name a `cn:`
    /// rule would be judged against is not clear, so a route that matches
    /// common names refuses the certificate (says why).
    Ambiguous(&'static str),
}

impl CommonName {
    /// The common name, when there is exactly one.
    pub fn one(&self) -> Option<&str> {
        match self {
            CommonName::One(cn) => Some(cn),
            _ => None,
        }
    }
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
    #[error(
        "certificate has a DNS SAN {0:?} that is not a host name (labels of 1 to 63 letters, digits, '-' or '_')"
    )]
    BadDnsName(String),
    #[error(
        "certificate has an email SAN {0:?} that is not a plain address (a dot-atom local part, @, a host name)"
    )]
    BadEmail(String),
    #[error(
        "certificate has a URI SAN {0:?} with a character no URI has (space, control or non-ASCII)"
    )]
    BadUri(String),
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
        let mut cns = cert.subject().iter_common_name();
        let common_name = match (cns.next(), cns.next()) {
            (None, _) => CommonName::None,
            (Some(_), Some(_)) => {
                CommonName::Ambiguous("the subject has more than one common name")
            }
            (Some(cn), None) => match cn.as_str() {
                Ok(text) if !text.is_empty() && !text.chars().any(char::is_control) => {
                    CommonName::One(text.to_owned())
                }
                _ => CommonName::Ambiguous("the subject's common name is not plain text"),
            },
        };
        let mut id = Identity {
            serial: cert.tbs_certificate.raw_serial_as_string(),
            not_after: cert.validity().not_after.timestamp(),
            not_before: cert.validity().not_before.timestamp(),
            common_name,
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
                    GeneralName::RFC822Name(e) => push(&mut id.emails, email(checked(e)?)?),
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
    if !is_uri_text(u) {
        return Err(IdentityError::BadUri(u.to_owned()));
    }
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

fn email(e: &str) -> Result<String, IdentityError> {
    normalise_email(e).ok_or_else(|| IdentityError::BadEmail(e.to_owned()))
}

/// Whether `uri` holds only characters a URI may (RFC 3986: printable
/// ASCII, no space).
pub fn is_uri_text(uri: &str) -> bool {
    uri.bytes().all(|b| b.is_ascii_graphic())
}

/// The longest DNS name, and label, in bytes (RFC 1035).
const MAX_DNS_NAME: usize = 253;
const MAX_DNS_LABEL: usize = 63;

/// A DNS name in its one spelling: lower case, without the root's trailing
/// dot. None unless every label is 1 to 63 letters, digits, `-` or `_`
/// (host names, and the underscore service labels some PKIs issue):
/// nothing else belongs in a name, least of all separators a log line
/// could be forged with.
pub fn normalise_dns(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let label_ok = |l: &str| {
        (1..=MAX_DNS_LABEL).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.len() > MAX_DNS_NAME || !name.split('.').all(label_ok) {
        return None;
    }
    Some(name.to_ascii_lowercase())
}

/// The longest local part of an address, in bytes (RFC 5321).
const MAX_LOCAL_PART: usize = 64;

/// An email address in its one spelling: the local part as written (a
/// dot-atom of RFC 5322: no quoted strings, comments or spaces), the domain
/// as `normalise_dns` spells it (`A.Example.` is `a.example`). None for
/// anything else.
pub fn normalise_email(address: &str) -> Option<String> {
    let (local, domain) = address.rsplit_once('@')?;
    let atext = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b);
    let local_ok = (1..=MAX_LOCAL_PART).contains(&local.len())
        && local
            .split('.')
            .all(|atom| !atom.is_empty() && atom.bytes().all(atext));
    if !local_ok {
        return None;
    }
    Some(format!("{local}@{}", normalise_dns(domain)?))
}

impl Identity {
    /// Every name, in the allow-entry syntax: the URI SANs, `dns:`,
    /// `email:`, and `cn:` when there is no SAN and one common name.
    pub fn names(&self) -> Vec<String> {
        let mut names = Vec::new();
        names.extend(self.uris.iter().cloned());
        names.extend(self.dns.iter().map(|d| format!("dns:{d}")));
        names.extend(self.emails.iter().map(|e| format!("email:{e}")));
        if names.is_empty()
            && let Some(cn) = self.common_name.one()
        {
            names.push(format!("cn:{cn}"));
        }
        names
    }
}

/// One line for a list of names, as the audit report and the reload
/// preview key and print an identity: joined with ",", each name's own "%"
/// and "," written "%25" and "%2C" first. A URI may hold a comma, so a bare
/// join read the one name `spiffe://a/x,dns:b` and the two names
/// `spiffe://a/x` and `dns:b` alike: two identities counted as one in the
/// report. Names without either character read as they are.
pub fn joined(names: &[String]) -> String {
    let mut line = String::new();
    for (i, name) in names.iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        for c in name.chars() {
            match c {
                '%' => line.push_str("%25"),
                ',' => line.push_str("%2C"),
                c => line.push(c),
            }
        }
    }
    line
}

impl Identity {
    /// Every name with its type spelled out, URIs too (`uri:`): what
    /// admission keys an identity by. `names` writes URIs as allow entries
    /// do, bare, so a URI SAN `dns:a.example` (a valid URI) and a DNS SAN
    /// `a.example` read alike there; here they are two identities, with a
    /// share and a known quota each (review 10 R10-12).
    pub fn typed_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        names.extend(self.uris.iter().map(|u| format!("uri:{u}")));
        names.extend(self.dns.iter().map(|d| format!("dns:{d}")));
        names.extend(self.emails.iter().map(|e| format!("email:{e}")));
        if names.is_empty()
            && let Some(cn) = self.common_name.one()
        {
            names.push(format!("cn:{cn}"));
        }
        names
    }
}

/// The form logs use: the names as a JSON array, so one name can never read
/// as two (a URI or CN may hold a comma, quotes, brackets).
impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let json = serde_json::to_string(&self.names()).map_err(|_| fmt::Error)?;
        f.write_str(&json)
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
    fn joined_names_never_read_as_another_list() {
        let one = vec!["spiffe://a/x,dns:b".to_owned()];
        let two = vec!["spiffe://a/x".to_owned(), "dns:b".to_owned()];
        assert_ne!(joined(&one), joined(&two));
        assert_eq!(joined(&two), "spiffe://a/x,dns:b");
        assert_eq!(joined(&one), "spiffe://a/x%2Cdns:b");
        // The escape itself is escaped, so no name can spell another's escape.
        assert_ne!(
            joined(&["a%2Cb".to_owned()]),
            joined(&["a".to_owned(), "b".to_owned()])
        );
        assert_eq!(joined(&[]), "");
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
            "spiffe://example.internal./ns/shop/sa/bad",
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

    /// Names are refused where they are not names at all, so a SAN can never
    /// pass for two, in a rule or in the log.
    #[test]
    fn names_that_could_forge_a_log_line_or_dodge_a_rule_are_refused() {
        for (bad, want) in [
            (
                "dns:batch.example.internal,email:ceo@example.internal",
                "DNS",
            ),
            ("dns:batch.example.internal email:ceo", "DNS"),
            ("dns:a\nb.example", "DNS"),
            ("email:a,email:ceo@example.internal", "email"),
            ("email:\"ceo\"@example.internal", "email"),
            ("email:ceo@example.internal,dns:x", "email"),
            ("email:ceo@@example.internal", "email"),
            ("https://example.internal/a b", "URI"),
            ("https://example.internal/a\tb", "URI"),
        ] {
            let err = match leaf(&[bad]) {
                Err(e) => e.to_string(),
                Ok(id) => panic!("{bad:?} read as {id:?}"),
            };
            assert!(err.contains(want), "{bad:?}: {err}");
        }
        // One spelling for an email domain too: a trailing dot, upper case.
        let id = leaf(&["email:mallory@Example.Internal."]).unwrap();
        assert_eq!(id.emails, ["mallory@example.internal"]);
        // A URI may hold a comma; the log's array keeps it one name.
        let id = leaf(&["https://example.internal/a,dns:admin", "dns:batch"]).unwrap();
        assert_eq!(
            id.to_string(),
            r#"["https://example.internal/a,dns:admin","dns:batch"]"#
        );
    }

    #[test]
    fn one_readable_common_name_or_an_ambiguous_one() {
        let der = |names: &[&str]| {
            let mut params = rcgen::CertificateParams::default();
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            params.distinguished_name = rcgen::DistinguishedName::new();
            // rcgen keeps one value per attribute type; a second CN goes
            // in under the CN's OID spelled as a custom type.
            for (i, n) in names.iter().enumerate() {
                let ty = match i {
                    0 => rcgen::DnType::CommonName,
                    _ => rcgen::DnType::CustomDnType(vec![2, 5, 4, 3]),
                };
                params.distinguished_name.push(ty, *n);
            }
            let key = rcgen::KeyPair::generate().unwrap();
            params.self_signed(&key).unwrap().der().to_vec()
        };
        let cn = |names: &[&str]| Identity::from_leaf(&der(names)).unwrap().common_name;
        assert_eq!(cn(&[]), CommonName::None);
        assert_eq!(cn(&["legacy"]), CommonName::One("legacy".into()));
        assert!(matches!(cn(&["legacy", "admin"]), CommonName::Ambiguous(_)));
        assert!(matches!(cn(&["legacy\nadmin"]), CommonName::Ambiguous(_)));
    }
}

//! What a verified client certificate says about who the client is.
//!
//! Only the leaf's SANs count (URI, DNS, email); the subject CN is kept for
//! routes that opt in and is otherwise ignored. A wildcard anywhere makes the
//! certificate unusable as an identity: a client is one name, never a pattern.

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
                    GeneralName::URI(u) => id.uris.push(checked(u)?),
                    GeneralName::DNSName(d) => id.dns.push(checked(d)?),
                    GeneralName::RFC822Name(e) => id.emails.push(checked(e)?),
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

fn checked(name: &str) -> Result<String, IdentityError> {
    if name.contains('*') {
        return Err(IdentityError::Wildcard(name.to_owned()));
    }
    Ok(name.to_owned())
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

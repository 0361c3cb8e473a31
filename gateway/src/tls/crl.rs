//! CRLs as a trust bundle uses them: read once from the files the config
//! names, parsed for webpki and described for logs.

use std::path::{Path, PathBuf};

use rustls_pki_types::CertificateRevocationListDer;
use webpki::{CertRevocationList, OwnedCertRevocationList};
use x509_parser::num_bigint::BigUint;
use x509_parser::prelude::{CertificateRevocationList, FromDer};

use super::certs::{self, CertError};

/// One CRL, parsed for webpki and described for people.
pub struct Crl {
    pub file: PathBuf,
    pub crl: CertRevocationList<'static>,
    /// The issuer's name, for logs.
    pub issuer: String,
    /// The cRLNumber extension; None for a CRL without one (v1).
    pub number: Option<BigUint>,
    /// thisUpdate, seconds since the epoch.
    pub this_update: i64,
    /// nextUpdate, seconds since the epoch; None when the CRL has none.
    pub next_update: Option<i64>,
}

impl Crl {
    /// Whether, at `now` (seconds since the epoch), the CRL is past its
    /// nextUpdate: its issuer may have revoked more since.
    pub fn is_stale(&self, now: i64) -> bool {
        self.next_update.is_some_and(|next| next <= now)
    }
}

fn parse(path: &Path, der: &CertificateRevocationListDer<'_>) -> Result<Crl, CertError> {
    let bad = |reason: String| CertError::BadCrl {
        path: path.to_owned(),
        reason,
    };
    let owned = OwnedCertRevocationList::from_der(der).map_err(|e| bad(format!("{e:?}")))?;
    let (_, meta) = CertificateRevocationList::from_der(der).map_err(|e| bad(e.to_string()))?;
    Ok(Crl {
        file: path.to_owned(),
        crl: CertRevocationList::Owned(owned),
        issuer: meta.issuer().to_string(),
        number: meta.crl_number().cloned(),
        this_update: meta.last_update().timestamp(),
        next_update: meta.next_update().map(|t| t.timestamp()),
    })
}

/// Every CRL in `paths`, in order.
pub fn load_all(paths: &[PathBuf]) -> Result<Vec<Crl>, CertError> {
    let mut out = Vec::new();
    for path in paths {
        for der in certs::load_crls(path)? {
            out.push(parse(path, &der)?);
        }
    }
    Ok(out)
}

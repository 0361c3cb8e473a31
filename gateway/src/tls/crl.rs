//! CRLs as a trust bundle uses them: read once from the files the config
//! names, and for each issuer only the newest.
//!
//! webpki checks a certificate against the first CRL it finds for the
//! certificate's issuer, so with two CRLs from one issuer in a bundle (last
//! week's file left beside today's, or one file in two bundles' lists) the
//! order of the config decided which revocations counted. RFC 5280 numbers
//! an issuer's CRLs in the order it issues them; the highest number is the
//! issuer's current word, so that one is kept and the others are dropped
//! with a log line. CRLs are grouped by issuer and issuing distribution
//! point, since one issuer may partition its revocations across scopes.
//! `expiry` reads the same selection, so monitoring watches exactly the
//! CRLs that are enforced.

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

impl AsRef<Crl> for Crl {
    fn as_ref(&self) -> &Crl {
        self
    }
}

impl Crl {
    /// Whether, at `now` (seconds since the epoch), the CRL is past its
    /// nextUpdate: its issuer may have revoked more since.
    pub fn is_stale(&self, now: i64) -> bool {
        self.next_update.is_some_and(|next| next <= now)
    }

    fn number_text(&self) -> String {
        match &self.number {
            Some(n) => format!("#{n}"),
            None => "without a CRL number".into(),
        }
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

/// The CRLs in `paths`, one per issuer and scope: the highest CRL number
/// (then the latest thisUpdate) wins; the others are logged and dropped.
pub fn load(paths: &[PathBuf]) -> Result<Vec<Crl>, CertError> {
    Ok(newest(load_all(paths)?))
}

/// Keeps the newest CRL of each issuer and scope, in first-seen order
/// (owned CRLs, or shared ones).
pub fn newest<C: AsRef<Crl>>(crls: Vec<C>) -> Vec<C> {
    let mut kept: Vec<C> = Vec::new();
    for crl in crls {
        let c = crl.as_ref();
        let same_scope = kept.iter().position(|k| {
            let k = k.as_ref();
            k.crl.issuer() == c.crl.issuer()
                && k.crl.issuing_distribution_point() == c.crl.issuing_distribution_point()
        });
        let Some(at) = same_scope else {
            kept.push(crl);
            continue;
        };
        let old = kept[at].as_ref();
        // The same CRL twice (one file in two lists): nothing to say.
        if (&c.number, c.this_update) == (&old.number, old.this_update) {
            continue;
        }
        let newer = (&c.number, c.this_update) > (&old.number, old.this_update);
        let (winner, loser) = if newer { (c, old) } else { (old, c) };
        tracing::info!(issuer = %loser.issuer, ignored = %loser.file.display(),
            used = %winner.file.display(),
            "ignoring CRL {} of this issuer: CRL {} supersedes it",
            loser.number_text(), winner.number_text());
        if newer {
            kept[at] = crl;
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Authority;

    fn write(dir: &Path, name: &str, pem: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    }

    #[test]
    fn the_highest_crl_number_of_each_issuer_wins_whatever_the_order() {
        let dir = tempfile::tempdir().unwrap();
        let a = Authority::root("crl issuer a").unwrap();
        let b = Authority::root("crl issuer b").unwrap();
        let a7 = write(dir.path(), "a7.pem", &a.crl(7, &[b"\x01"]).unwrap());
        let a3 = write(dir.path(), "a3.pem", &a.crl(3, &[]).unwrap());
        let b1 = write(dir.path(), "b1.pem", &b.crl(1, &[]).unwrap());
        let a12 = write(dir.path(), "a12.pem", &a.crl(12, &[]).unwrap());
        for order in [
            vec![a7.clone(), a3.clone(), b1.clone(), a12.clone()],
            vec![a12.clone(), b1.clone(), a3.clone(), a7.clone()],
        ] {
            let kept = load(&order).unwrap();
            let mut files: Vec<_> = kept.iter().map(|c| c.file.clone()).collect();
            files.sort();
            let mut want = vec![a12.clone(), b1.clone()];
            want.sort();
            assert_eq!(files, want, "{order:?}");
        }
        // Numbers compare as numbers, not as text or bytes: 300 > 12.
        let a300 = write(dir.path(), "a300.pem", &a.crl(300, &[]).unwrap());
        let kept = load(&[a300.clone(), a12]).unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].file, a300);
    }
}

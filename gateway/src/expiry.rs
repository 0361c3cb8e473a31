//! When things run out: every certificate and CRL the config names, with the
//! moment it stops being good. `gateway check` warns and fails on horizons,
//! the running gateway logs warnings and exports seconds-to-expiry.

use std::path::{Path, PathBuf};

use x509_parser::prelude::{CertificateRevocationList, FromDer, X509Certificate};

use crate::config::Config;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A certificate's notAfter.
    Certificate,
    /// A CRL's nextUpdate: after it, the CRL is stale.
    Crl,
}

#[derive(Debug, Clone)]
pub struct Expiry {
    pub kind: Kind,
    /// What the file is for, e.g. "listener edge cert".
    pub role: String,
    pub file: PathBuf,
    pub subject: String,
    /// Seconds since the epoch.
    pub at: i64,
}

impl Expiry {
    pub fn seconds_left(&self, now: i64) -> i64 {
        self.at - now
    }
}

/// Every certificate and CRL the config names; files that do not parse are
/// skipped (loading the state reports those).
pub fn collect(config: &Config) -> Vec<Expiry> {
    let mut out = Vec::new();
    for l in &config.listeners {
        certs(
            &mut out,
            &format!("listener {} cert", l.name),
            &config.resolve(&l.cert),
        );
        certs(
            &mut out,
            &format!("listener {} client_ca", l.name),
            &config.resolve(&l.client_ca),
        );
        for c in &l.crls {
            crls(
                &mut out,
                &format!("listener {} crl", l.name),
                &config.resolve(c),
            );
        }
    }
    for (name, b) in &config.trust {
        certs(
            &mut out,
            &format!("trust {name} ca"),
            &config.resolve(&b.ca),
        );
        for c in &b.crls {
            crls(&mut out, &format!("trust {name} crl"), &config.resolve(c));
        }
    }
    out
}

fn pem_blocks(path: &Path) -> Vec<Vec<u8>> {
    let Ok(data) = std::fs::read(path) else {
        return Vec::new();
    };
    x509_parser::pem::Pem::iter_from_buffer(&data)
        .filter_map(Result::ok)
        .map(|p| p.contents)
        .collect()
}

fn certs(out: &mut Vec<Expiry>, role: &str, path: &Path) {
    for der in pem_blocks(path) {
        if let Ok((_, c)) = X509Certificate::from_der(&der) {
            out.push(Expiry {
                kind: Kind::Certificate,
                role: role.to_owned(),
                file: path.to_owned(),
                subject: c.subject().to_string(),
                at: c.validity().not_after.timestamp(),
            });
        }
    }
}

fn crls(out: &mut Vec<Expiry>, role: &str, path: &Path) {
    for der in pem_blocks(path) {
        if let Ok((_, crl)) = CertificateRevocationList::from_der(&der)
            && let Some(next) = crl.next_update()
        {
            out.push(Expiry {
                kind: Kind::Crl,
                role: role.to_owned(),
                file: path.to_owned(),
                subject: crl.issuer().to_string(),
                at: next.timestamp(),
            });
        }
    }
}

/// A line for an operator: what, which file, and when.
pub fn describe(e: &Expiry, now: i64) -> String {
    let left = e.seconds_left(now);
    let what = match e.kind {
        Kind::Certificate => "certificate",
        Kind::Crl => "CRL (next update)",
    };
    let when = if left <= 0 {
        format!("expired {} ago", human(-left))
    } else {
        format!("expires in {}", human(left))
    };
    format!(
        "{} {what} {} in {}: {when}",
        e.role,
        e.subject,
        e.file.display()
    )
}

fn human(secs: i64) -> String {
    match secs {
        s if s >= 2 * 86_400 => format!("{} days", s / 86_400),
        s if s >= 2 * 3_600 => format!("{} hours", s / 3_600),
        s if s >= 120 => format!("{} minutes", s / 60),
        s => format!("{s} seconds"),
    }
}

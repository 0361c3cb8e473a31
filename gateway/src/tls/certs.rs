//! Loading PEM files and checking our own certificate before we serve with it.
//!
//! Every error names the file and what is wrong with it, because the operator
//! reading it is about to edit that file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate found")]
    NoCertificates { path: PathBuf },
    #[error("{path}: not a PEM private key (PKCS#8, SEC1 or PKCS#1): {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("{path}: unsupported private key: {reason}")]
    UnsupportedKey { path: PathBuf, reason: String },
    #[error("{key}: private key does not match the certificate in {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error(
        "{path}: private key readable by group or others (mode {mode:04o}): \
         chmod 600 it, or set allow_shared_keys = true"
    )]
    KeyShared { path: PathBuf, mode: u32 },
    #[error("{path}: certificate is not valid DER: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{path}: certificate {subject} expired at {not_after}")]
    Expired {
        path: PathBuf,
        subject: String,
        not_after: String,
    },
    #[error("{path}: certificate {subject} is not valid before {not_before}")]
    NotYetValid {
        path: PathBuf,
        subject: String,
        not_before: String,
    },
    #[error("{path}: certificate {subject} has no serverAuth extended key usage")]
    NoServerAuth { path: PathBuf, subject: String },
    #[error("{path}: certificate {subject} has no clientAuth extended key usage")]
    NoClientAuth { path: PathBuf, subject: String },
    #[error("{path}: chain does not verify: {reason}")]
    ChainDoesNotVerify { path: PathBuf, reason: String },
    #[error("{path}: not a PEM certificate revocation list: {reason}")]
    BadCrl { path: PathBuf, reason: String },
    #[error("{path}: not a usable trust anchor: {reason}")]
    BadTrustAnchor { path: PathBuf, reason: String },
}

/// Every PEM file the gateway loads (certificates, CA bundles, CRLs,
/// keys): `safe_dir::read_bounded`.
fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    crate::safe_dir::read_bounded(path, crate::safe_dir::MAX_NAMED_FILE_BYTES).map_err(|source| {
        CertError::Read {
            path: path.to_owned(),
            source,
        }
    })
}

/// Every certificate in a PEM file, in order.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::BadCertificate {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CertError::NoCertificates {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| CertError::BadKey {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Refuses a private key file that anyone but its owner may read: a key
/// that group or others can read has already left the gateway's hands
/// (whoever shares the host, a backup agent, a log shipper). The mode is
/// the file's, after symlinks, as the key is read through them.
pub fn check_key_private(path: &Path) -> Result<(), CertError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path)
        .map_err(|source| CertError::Read {
            path: path.to_owned(),
            source,
        })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(CertError::KeyShared {
            path: path.to_owned(),
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

/// A trust-anchor bundle (client CAs).
pub fn load_roots(path: &Path) -> Result<RootCertStore, CertError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| CertError::BadTrustAnchor {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// Every CRL in a PEM file (at least one).
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, CertError> {
    let pem = read(path)?;
    let bad = |reason: String| CertError::BadCrl {
        path: path.to_owned(),
        reason,
    };
    // Counted before anything is kept: picking the newest CRL of each
    // issuer is quadratic in the issuers, in the control loop, and a file
    // of 16 000 CRLs of made-up issuers (signatures are checked later,
    // per handshake) held it for seconds (review 14, S14-2).
    let mut crls = Vec::new();
    for crl in CertificateRevocationListDer::pem_slice_iter(&pem) {
        if crls.len() == MAX_CRLS_PER_FILE {
            return Err(bad(format!(
                "holds more than {MAX_CRLS_PER_FILE} CRLs, more than any set of CAs publishes in one file"
            )));
        }
        crls.push(crl.map_err(|e| bad(e.to_string()))?);
    }
    if crls.is_empty() {
        return Err(bad("no X509 CRL block found".into()));
    }
    Ok(crls)
}

/// The most CRLs one file may hold (`load_crls`).
pub const MAX_CRLS_PER_FILE: usize = 1024;

/// Loads the gateway's client chain and key (for upstream mTLS) with the
/// same start-up checks as the server identity, but for clientAuth.
pub fn load_client_identity(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CertError> {
    let (chain, key, _) = load_identity(cert_path, key_path, provider)?;
    let leaf = chain.first().ok_or_else(|| CertError::NoCertificates {
        path: cert_path.to_owned(),
    })?;
    let cert = parse(cert_path, leaf)?;
    if !matches!(cert.extended_key_usage(), Ok(Some(eku)) if eku.value.client_auth) {
        return Err(CertError::NoClientAuth {
            path: cert_path.to_owned(),
            subject: cert.subject().to_string(),
        });
    }
    Ok((chain, key))
}

/// A chain and its key, loaded, matched to each other and valid now.
fn load_identity(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<
    (
        Vec<CertificateDer<'static>>,
        PrivateKeyDer<'static>,
        CertifiedKey,
    ),
    CertError,
> {
    let chain = load_certs(cert_path)?;
    let key = load_key(key_path)?;
    let signing_key = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| CertError::UnsupportedKey {
            path: key_path.to_owned(),
            reason: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain.clone(), signing_key);
    certified.keys_match().map_err(|_| CertError::KeyMismatch {
        cert: cert_path.to_owned(),
        key: key_path.to_owned(),
    })?;
    let leaf = chain.first().ok_or_else(|| CertError::NoCertificates {
        path: cert_path.to_owned(),
    })?;
    check_validity_now(cert_path, leaf)?;
    Ok((chain, key, certified))
}

/// Loads the server chain and key and checks what would otherwise only show as
/// failing handshakes: validity now, serverAuth, the key matching, the chain.
pub fn load_server_identity(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, CertError> {
    let (chain, _, certified) = load_identity(cert_path, key_path, provider)?;
    let leaf = chain.first().ok_or_else(|| CertError::NoCertificates {
        path: cert_path.to_owned(),
    })?;
    check_server_auth(cert_path, leaf)?;
    check_chain(cert_path, &chain, provider)?;
    Ok(Arc::new(certified))
}

fn parse<'a>(path: &Path, der: &'a [u8]) -> Result<X509Certificate<'a>, CertError> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| CertError::BadCertificate {
            path: path.to_owned(),
            reason: e.to_string(),
        })
}

fn check_validity_now(path: &Path, der: &CertificateDer<'_>) -> Result<(), CertError> {
    let cert = parse(path, der)?;
    let now = x509_parser::time::ASN1Time::now();
    let v = cert.validity();
    if v.not_after < now {
        return Err(CertError::Expired {
            path: path.to_owned(),
            subject: cert.subject().to_string(),
            not_after: v.not_after.to_string(),
        });
    }
    if v.not_before > now {
        return Err(CertError::NotYetValid {
            path: path.to_owned(),
            subject: cert.subject().to_string(),
            not_before: v.not_before.to_string(),
        });
    }
    Ok(())
}

fn check_server_auth(path: &Path, der: &CertificateDer<'_>) -> Result<(), CertError> {
    let cert = parse(path, der)?;
    let ok = match cert.extended_key_usage() {
        Ok(Some(eku)) => eku.value.server_auth || eku.value.any,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(CertError::NoServerAuth {
            path: path.to_owned(),
            subject: cert.subject().to_string(),
        })
    }
}

/// With intermediates in the file, the leaf must chain to the last of them:
/// a file with the wrong intermediate makes every client fail later.
fn check_chain(
    path: &Path,
    chain: &[CertificateDer<'static>],
    provider: &CryptoProvider,
) -> Result<(), CertError> {
    let [leaf, middle @ .., top] = chain else {
        return Ok(());
    };
    let anchor =
        webpki::anchor_from_trusted_cert(top).map_err(|e| CertError::ChainDoesNotVerify {
            path: path.to_owned(),
            reason: format!("last certificate is not a CA: {e}"),
        })?;
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| CertError::BadCertificate {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    ee.verify_for_usage(
        provider.signature_verification_algorithms.all,
        &[anchor],
        middle,
        UnixTime::now(),
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| CertError::ChainDoesNotVerify {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

//! A client CA bundle (a listener's `client_ca` or a `[trust.NAME]`): its
//! trust anchors and CRLs, and the chain check every client certificate
//! goes through, on webpki directly.
//!
//! rustls' `WebPkiClientVerifier` would do the chain check too, but it
//! answers only yes or no; the gateway needs the verified path (the tick
//! closes a connection when a CA certificate in it expires) and its own
//! revocation policy (see `verify`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::{CertRevocationListError, CertificateError, DistinguishedName, Error, OtherError};
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use webpki::{
    CertRevocationList, EndEntityCert, ExpirationPolicy, RevocationCheckDepth,
    RevocationOptionsBuilder, UnknownStatusPolicy,
};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::TlsError;
use super::certs;
use super::crl::{self, Crl};
use crate::config::CrlExpired;

/// A client CA bundle as the config names it, before loading.
#[derive(Debug, Clone)]
pub struct BundleFiles {
    pub ca: PathBuf,
    pub crls: Vec<PathBuf>,
    pub crl_expired: CrlExpired,
    pub spiffe_trust_domains: Option<Vec<String>>,
}

/// A loaded bundle.
pub struct Bundle {
    /// `listener edge client_ca` or `trust users`, for logs.
    pub name: String,
    anchors: Vec<TrustAnchor<'static>>,
    subjects: Vec<DistinguishedName>,
    /// One per issuer and scope, the newest (see `crl`).
    crls: Vec<Arc<Crl>>,
    /// The CRL files the config names, whose places a reload must keep
    /// filled (see `crl::Enforced`).
    crl_files: Vec<PathBuf>,
    crl_expired: CrlExpired,
    /// Connections whose check met a CRL past its nextUpdate (kept by the
    /// metrics across reloads).
    stale_crl_uses: Arc<AtomicU64>,
    /// Whether the warning for a stale CRL was logged, per entry of `crls`
    /// (once per load: the count says how often it mattered).
    stale_crl_logged: Vec<AtomicBool>,
    /// The SPIFFE trust domains the bundle's CAs may vouch for; None: any.
    spiffe_trust_domains: Option<Vec<String>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("name", &self.name)
            .field("anchors", &self.anchors.len())
            .field("crls", &self.crls.len())
            .finish_non_exhaustive()
    }
}

/// What a successful check learned about the chain: when it stops being
/// good without anything being reloaded. The tick closes the connection then.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Verified {
    /// The earliest notAfter (seconds since the epoch) of the CA
    /// certificates in the verified path, trust anchor excepted (webpki
    /// does not read an anchor's validity); None when the leaf is issued by
    /// the anchor itself.
    pub ca_not_after: Option<i64>,
    /// With `crl_expired = "refuse"`: the earliest nextUpdate of the CRLs
    /// that covered the path. Past it, a new handshake would be refused.
    pub crl_next_update: Option<i64>,
}

/// The path a successful check verified, as admission keeps it for a
/// known source (`admission::Proof`): the anchor it ended at (subject and
/// key: a CA re-keyed under the same name is another anchor) and each of
/// its certificates' issuer and serial, the leaf first; at most
/// 1 + [`MAX_INTERMEDIATES`] of them, whatever else the client sent
/// (attacker review 11, R11-5, R11-6).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Path {
    /// The anchor's subject (DER name) and SubjectPublicKeyInfo.
    pub anchor: (Vec<u8>, Vec<u8>),
    /// Issuer (DER name, as a CRL spells it) and serial, leaf first.
    pub certs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Bundle {
    /// Loads the anchors and CRLs; `algorithms` verify signatures (the
    /// gateway's remember CA signatures, see `remember`).
    pub fn load(
        name: String,
        files: &BundleFiles,
        algorithms: WebPkiSupportedAlgorithms,
        stale_crl_uses: Arc<AtomicU64>,
    ) -> Result<Bundle, TlsError> {
        let roots = certs::load_roots(&files.ca)?;
        if roots.is_empty() {
            return Err(TlsError::Verifier {
                path: files.ca.display().to_string(),
                reason: "no trust anchors".into(),
            });
        }
        let crls: Vec<Arc<Crl>> = crl::load(&files.crls)?.into_iter().map(Arc::new).collect();
        let now = UnixTime::now().as_secs() as i64;
        for c in crls.iter().filter(|c| c.is_stale(now)) {
            let effect = match files.crl_expired {
                CrlExpired::Refuse => "clients it covers are refused until a fresh one is loaded",
                CrlExpired::Warn => "crl_expired = \"warn\": used anyway",
            };
            tracing::warn!(bundle = %name, file = %c.file.display(), issuer = %c.issuer,
                "CRL is past its next update: {effect}");
        }
        Ok(Bundle {
            name,
            subjects: roots.subjects(),
            anchors: roots.roots,
            stale_crl_logged: crls.iter().map(|_| AtomicBool::new(false)).collect(),
            crls,
            crl_files: files.crls.clone(),
            crl_expired: files.crl_expired,
            stale_crl_uses,
            spiffe_trust_domains: files.spiffe_trust_domains.clone(),
            algorithms,
        })
    }

    /// The CAs this bundle trusts.
    pub fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    /// The CRLs this bundle enforces.
    pub fn crls(&self) -> &[Arc<Crl>] {
        &self.crls
    }

    /// The CRLs this bundle enforces and the files they come from.
    pub fn served(&self) -> crl::Served<'_> {
        crl::Served {
            files: &self.crl_files,
            crls: &self.crls,
        }
    }

    /// This bundle with `more` CRLs besides its own (of each issuer and
    /// scope the newest wins, quietly: the loads said what they dropped):
    /// for a connection whose listener a reload removed, so revocations
    /// published since still reach it. Err when two different CRLs claim
    /// one place.
    pub fn with_more_crls(&self, more: &[Arc<Crl>]) -> Result<Bundle, TlsError> {
        let crls = crl::newest(self.crls.iter().chain(more).cloned().collect(), |_, _| {})?;
        Ok(Bundle {
            name: self.name.clone(),
            anchors: self.anchors.clone(),
            subjects: self.subjects.clone(),
            stale_crl_logged: crls.iter().map(|_| AtomicBool::new(false)).collect(),
            crls,
            crl_files: self.crl_files.clone(),
            crl_expired: self.crl_expired,
            stale_crl_uses: self.stale_crl_uses.clone(),
            spiffe_trust_domains: self.spiffe_trust_domains.clone(),
            algorithms: self.algorithms,
        })
    }

    /// Whether this bundle's CAs may vouch for the URI identities `uris`:
    /// with `spiffe_trust_domains` set, each must be a SPIFFE ID in one of
    /// them (name constraints in CA certificates cover DNS names only).
    /// Err names the first that is not.
    pub fn admits_uris(&self, uris: &[String]) -> Result<(), String> {
        let Some(domains) = &self.spiffe_trust_domains else {
            return Ok(());
        };
        for uri in uris {
            let inside = crate::spiffe::SpiffeId::parse(uri)
                .is_ok_and(|id| domains.iter().any(|d| d == id.trust_domain()));
            if !inside {
                return Err(format!(
                    "URI SAN {uri:?} is outside the SPIFFE trust domains of {} ({})",
                    self.name,
                    domains.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// The CA names a client is told it may chain to.
    pub fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.subjects
    }

    pub fn algorithms(&self) -> &WebPkiSupportedAlgorithms {
        &self.algorithms
    }

    /// Checks a client chain: a path to one of the anchors, validity,
    /// clientAuth, and revocation.
    ///
    /// Revocation runs along the whole path: every certificate whose issuer
    /// has a CRL in the bundle is checked against it, so an intermediate is
    /// revoked by its root's CRL. The leaf is held to more: with CRLs in the
    /// bundle its issuer must have one, or its status is unknown and it is
    /// refused (fail closed), while an intermediate whose issuer has no CRL
    /// here passes (its root may not publish one). webpki takes one policy
    /// for the whole path, so the path is checked leniently and the leaf's
    /// CRL is then required by name: webpki checks a certificate against
    /// any CRL of its issuer without an issuing distribution point. Only
    /// when the leaf's issuer has scoped CRLs alone does a second, strict
    /// pass over the leaf decide, with webpki's own scope rules.
    ///
    /// A chain with more than [`MAX_INTERMEDIATES`] CA certificates is
    /// refused before any path search (see there).
    pub fn verify(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<Verified, Error> {
        self.verify_path(leaf, intermediates, now).map(|(v, _)| v)
    }

    /// As [`Bundle::verify`], with the path it verified.
    pub fn verify_path(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(Verified, Path), Error> {
        let intermediates = &path_candidates(intermediates).inspect_err(|why| {
            tracing::debug!(reason = %why, "client chain refused");
        })?;
        let ee = EndEntityCert::try_from(leaf).map_err(pki_error)?;
        let chain = self.check(
            &ee,
            intermediates,
            now,
            RevocationCheckDepth::Chain,
            UnknownStatusPolicy::Allow,
        )?;
        if !self.crls.is_empty() {
            let issuer = ee.issuer();
            let of_issuer = || self.crls.iter().filter(|c| c.crl.issuer() == issuer);
            if of_issuer().all(|c| c.crl.issuing_distribution_point().is_some()) {
                if of_issuer().next().is_none() {
                    return Err(CertificateError::UnknownRevocationStatus.into());
                }
                self.check(
                    &ee,
                    intermediates,
                    now,
                    RevocationCheckDepth::EndEntity,
                    UnknownStatusPolicy::Deny,
                )?;
            }
        }
        Ok(chain)
    }

    /// One webpki pass over the chain with this revocation policy.
    fn check(
        &self,
        ee: &EndEntityCert<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        depth: RevocationCheckDepth,
        unknown: UnknownStatusPolicy,
    ) -> Result<(Verified, Path), Error> {
        let crls: Vec<&CertRevocationList<'_>> = self.crls.iter().map(|c| &c.crl).collect();
        let expiration = match self.crl_expired {
            CrlExpired::Refuse => ExpirationPolicy::Enforce,
            CrlExpired::Warn => ExpirationPolicy::Ignore,
        };
        let revocation = RevocationOptionsBuilder::new(&crls).ok().map(|b| {
            b.with_depth(depth)
                .with_status_policy(unknown)
                .with_expiration_policy(expiration)
                .build()
        });
        let path = ee
            .verify_for_usage(
                self.algorithms.all,
                &self.anchors,
                intermediates,
                now,
                webpki::KeyUsage::client_auth(),
                revocation,
                None,
            )
            .map_err(|e| {
                if matches!(e, webpki::Error::CrlExpired { .. }) {
                    self.stale_crl_uses.fetch_add(1, Ordering::Relaxed);
                }
                pki_error(e)
            })?;
        // The CRLs webpki may have consulted: those of the path's issuers
        // whose scope covers the certificate checked (the leaf, or a CA).
        // A CA-only CRL says nothing about the leaf: its staleness must not
        // end a connection no new handshake would refuse.
        let covering = || {
            std::iter::once((ee.issuer(), false))
                .chain(
                    path.intermediate_certificates()
                        .map(|ca| (ca.issuer(), true)),
                )
                .flat_map(|(issuer, ca)| {
                    self.crls
                        .iter()
                        .zip(&self.stale_crl_logged)
                        .filter(move |(c, _)| c.crl.issuer() == issuer && c.scope.covers(ca))
                })
        };
        // The strict second pass re-reads CRLs the first already noted.
        if self.crl_expired == CrlExpired::Warn && depth == RevocationCheckDepth::Chain {
            self.note_stale_crls(covering(), now);
        }
        let crl_next_update = match self.crl_expired {
            CrlExpired::Refuse => covering().filter_map(|(c, _)| c.next_update).min(),
            CrlExpired::Warn => None,
        };
        let ca_not_after = earliest_not_after(path.intermediate_certificates().map(|ca| ca.der()))?;
        let anchor = path.anchor();
        let ids = Path {
            anchor: (
                anchor.subject.as_ref().to_vec(),
                anchor.subject_public_key_info.as_ref().to_vec(),
            ),
            certs: std::iter::once((ee.issuer(), ee.serial()))
                .chain(
                    path.intermediate_certificates()
                        .map(|ca| (ca.issuer(), ca.serial())),
                )
                .map(|(issuer, serial)| (issuer.to_vec(), serial.to_vec()))
                .collect(),
        };
        Ok((
            Verified {
                ca_not_after,
                crl_next_update,
            },
            ids,
        ))
    }
}

/// The most CA certificates a client may send after its leaf, roots not
/// counted. A real chain is a leaf and one to three CAs. webpki's path
/// search tries every certificate whose subject matches an issuer it looks
/// for, a signature check each, so a chain of look-alikes named like a real
/// CA (its name is public) costs the gateway 30 to 60 times an allowed
/// handshake at 60 certificates, before anything tells the sender from a
/// client; at four the search is a few checks.
pub const MAX_INTERMEDIATES: usize = 4;

/// The most certificates after the leaf that are looked at at all.
const MAX_SENT: usize = 16;

/// What the path search gets of the CAs a client sent: at most
/// [`MAX_INTERMEDIATES`] of them once self-issued certificates (roots) are
/// set aside. A root the client sends cannot help: the path must end at an
/// anchor of the bundle, which webpki looks among first. So a client that
/// sends its root too, as some do, is served, while look-alike roots cost
/// nothing. (A self-issued key-rollover link certificate is set aside too:
/// a client chain needing one is not supported.)
fn path_candidates<'a, 'b>(
    intermediates: &'a [CertificateDer<'b>],
) -> Result<std::borrow::Cow<'a, [CertificateDer<'b>]>, Error> {
    let refuse = |why: ChainTooLong| Err(CertificateError::Other(OtherError(Arc::new(why))).into());
    if intermediates.len() > MAX_SENT {
        return refuse(ChainTooLong::Sent(intermediates.len()));
    }
    let self_issued = |der: &CertificateDer<'_>| {
        X509Certificate::from_der(der).is_ok_and(|(_, cert)| {
            cert.tbs_certificate.subject.as_raw() == cert.tbs_certificate.issuer.as_raw()
        })
    };
    let cas = if intermediates.iter().any(self_issued) {
        std::borrow::Cow::Owned(
            intermediates
                .iter()
                .filter(|der| !self_issued(der))
                .cloned()
                .collect(),
        )
    } else {
        std::borrow::Cow::Borrowed(intermediates)
    };
    if cas.len() > MAX_INTERMEDIATES {
        return refuse(ChainTooLong::Cas(cas.len()));
    }
    Ok(cas)
}

/// A client chain longer than [`path_candidates`] looks at.
#[derive(thiserror::Error)]
enum ChainTooLong {
    #[error("the client sent {0} certificates after its leaf; at most {MAX_SENT} are looked at")]
    Sent(usize),
    #[error(
        "the client sent {0} CA certificates after its leaf, roots not counted; at most {MAX_INTERMEDIATES} are accepted"
    )]
    Cas(usize),
}

/// rustls shows an `OtherError` with `Debug`: say it in words there too.
impl std::fmt::Debug for ChainTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// A CA certificate webpki verified but the gateway cannot read: its
/// notAfter would go unwatched, so the chain is refused.
#[derive(thiserror::Error)]
#[error(
    "a CA certificate of the verified path cannot be read, so its expiry could not be watched: {0}"
)]
struct UnreadableCa(String);

/// rustls shows an `OtherError` with `Debug`: say it in words there too.
impl std::fmt::Debug for UnreadableCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// The earliest notAfter of these CA certificates, or Err (the chain is
/// refused) when one of them cannot be read: skipping it would leave the
/// tick blind to its expiry.
fn earliest_not_after<'a>(
    cas: impl Iterator<Item = CertificateDer<'a>>,
) -> Result<Option<i64>, Error> {
    let mut earliest: Option<i64> = None;
    for der in cas {
        let not_after = match X509Certificate::from_der(&der) {
            Ok((_, cert)) => cert.validity().not_after.timestamp(),
            Err(e) => {
                let why = UnreadableCa(e.to_string());
                tracing::warn!(reason = %why, "client chain refused");
                return Err(CertificateError::Other(OtherError(Arc::new(why))).into());
            }
        };
        earliest = Some(earliest.map_or(not_after, |t| t.min(not_after)));
    }
    Ok(earliest)
}

impl Bundle {
    /// With `crl_expired = "warn"`: counts (and logs once) a check that
    /// used a CRL past its nextUpdate, of these (each with its "logged"
    /// flag).
    fn note_stale_crls<'a>(
        &self,
        crls: impl Iterator<Item = (&'a Arc<Crl>, &'a AtomicBool)>,
        now: UnixTime,
    ) {
        let now = now.as_secs() as i64;
        let mut stale = false;
        for (c, logged) in crls.filter(|(c, _)| c.is_stale(now)) {
            stale = true;
            if !logged.swap(true, Ordering::Relaxed) {
                tracing::warn!(bundle = %self.name, file = %c.file.display(), issuer = %c.issuer,
                    "a client was checked against a CRL past its next update (crl_expired = \"warn\")");
            }
        }
        if stale {
            self.stale_crl_uses.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// webpki's answer as the rustls error the handshake reports (and whose
/// alert the client sees), as rustls' own verifier maps it.
fn pki_error(error: webpki::Error) -> Error {
    use webpki::Error::*;
    match error {
        BadDer | BadDerTime | TrailingData(_) => CertificateError::BadEncoding.into(),
        CertNotValidYet { time, not_before } => {
            CertificateError::NotValidYetContext { time, not_before }.into()
        }
        CertExpired { time, not_after } => {
            CertificateError::ExpiredContext { time, not_after }.into()
        }
        InvalidCertValidity => CertificateError::Expired.into(),
        UnknownIssuer => CertificateError::UnknownIssuer.into(),
        CertRevoked => CertificateError::Revoked.into(),
        UnknownRevocationStatus => CertificateError::UnknownRevocationStatus.into(),
        CrlExpired { time, next_update } => {
            CertificateError::ExpiredRevocationListContext { time, next_update }.into()
        }
        IssuerNotCrlSigner => CertRevocationListError::IssuerInvalidForCrl.into(),
        InvalidSignatureForPublicKey => CertificateError::BadSignature.into(),
        #[allow(deprecated)]
        UnsupportedSignatureAlgorithm | UnsupportedSignatureAlgorithmForPublicKey => {
            CertificateError::UnsupportedSignatureAlgorithm.into()
        }
        UnsupportedSignatureAlgorithmContext(cx) => {
            CertificateError::UnsupportedSignatureAlgorithmContext {
                signature_algorithm_id: cx.signature_algorithm_id,
                supported_algorithms: cx.supported_algorithms,
            }
            .into()
        }
        UnsupportedSignatureAlgorithmForPublicKeyContext(cx) => {
            CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext {
                signature_algorithm_id: cx.signature_algorithm_id,
                public_key_algorithm_id: cx.public_key_algorithm_id,
            }
            .into()
        }
        InvalidCrlSignatureForPublicKey => CertRevocationListError::BadSignature.into(),
        #[allow(deprecated)]
        UnsupportedCrlSignatureAlgorithm | UnsupportedCrlSignatureAlgorithmForPublicKey => {
            CertRevocationListError::UnsupportedSignatureAlgorithm.into()
        }
        UnsupportedCrlSignatureAlgorithmContext(cx) => {
            CertRevocationListError::UnsupportedSignatureAlgorithmContext {
                signature_algorithm_id: cx.signature_algorithm_id,
                supported_algorithms: cx.supported_algorithms,
            }
            .into()
        }
        UnsupportedCrlSignatureAlgorithmForPublicKeyContext(cx) => {
            CertRevocationListError::UnsupportedSignatureAlgorithmForPublicKeyContext {
                signature_algorithm_id: cx.signature_algorithm_id,
                public_key_algorithm_id: cx.public_key_algorithm_id,
            }
            .into()
        }
        // unsupported_certificate, as for rustls' verifier (whose mapping
        // to the context variant is not public).
        #[allow(deprecated)]
        RequiredEkuNotFound | RequiredEkuNotFoundContext(_) => {
            CertificateError::InvalidPurpose.into()
        }
        other => CertificateError::Other(OtherError(Arc::new(other))).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Authority, LeafSpec};
    use rcgen::CrlScope;
    use rustls_pki_types::pem::PemObject;

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    /// A bundle of `root` with these CRLs (PEM), refusing stale ones.
    fn bundle(dir: &std::path::Path, root: &Authority, crls: &[String]) -> Bundle {
        std::fs::write(dir.join("ca.pem"), &root.cert_pem).unwrap();
        let paths = crls
            .iter()
            .enumerate()
            .map(|(i, pem)| {
                let path = dir.join(format!("{i}.crl.pem"));
                std::fs::write(&path, pem).unwrap();
                path
            })
            .collect();
        let files = BundleFiles {
            ca: dir.join("ca.pem"),
            crls: paths,
            crl_expired: CrlExpired::Refuse,
            spiffe_trust_domains: None,
        };
        Bundle::load(
            "test".into(),
            &files,
            super::super::remember::algorithms(),
            Arc::default(),
        )
        .unwrap()
    }

    /// A reload merges the current CRLs into a removed listener's bundles
    /// for every kept state; that merge drops superseded CRLs quietly (the
    /// loads already said so), or each reload would log a line per
    /// superseded CRL and kept state.
    #[test]
    fn merging_newer_crls_into_a_kept_bundle_logs_nothing() {
        #[derive(Clone, Default)]
        struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Captured {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let root = Authority::root("merge root").unwrap();
        let int = root.intermediate("merge intermediate").unwrap();
        let kept = bundle(dir.path(), &root, &[int.crl(1, &[]).unwrap()]);
        let newer = dir.path().join("newer.pem");
        std::fs::write(&newer, int.crl(2, &[]).unwrap()).unwrap();
        let newer: Vec<Arc<Crl>> = crl::load(&[newer])
            .unwrap()
            .into_iter()
            .map(Arc::new)
            .collect();
        let logs = Captured::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .finish();
        let merged =
            tracing::subscriber::with_default(subscriber, || kept.with_more_crls(&newer).unwrap());
        assert_eq!(merged.crls().len(), 1);
        assert_eq!(merged.crls()[0].number, newer[0].number);
        let logged = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        assert_eq!(logged, "");
    }

    /// Four CAs after the leaf verify, look-alikes among them, and a root
    /// sent too is set aside; one more CA refuses the whole chain before
    /// webpki searches it, saying why, and so do more than 16 certificates
    /// of any kind.
    #[test]
    fn a_chain_longer_than_max_intermediates_is_refused_before_any_search() {
        let dir = tempfile::tempdir().unwrap();
        let root = Authority::root("long root").unwrap();
        let int = root.intermediate("long intermediate").unwrap();
        let leaf = der(&int
            .issue(&LeafSpec::client("c", &["dns:c.example"]))
            .unwrap()
            .cert_pem);
        let other = Authority::root("other root").unwrap();
        let look_alike = || der(&other.intermediate("long intermediate").unwrap().cert_pem);
        let mut chain = vec![look_alike(), der(&int.cert_pem)];
        chain.extend((2..MAX_INTERMEDIATES).map(|_| look_alike()));
        chain.push(der(&root.cert_pem));
        let bundle = bundle(dir.path(), &root, &[]);
        let now = UnixTime::now();
        bundle
            .verify(&leaf, &chain, now)
            .expect("four CAs and the root verify");
        chain.push(look_alike());
        let err = bundle.verify(&leaf, &chain, now).unwrap_err();
        assert!(
            err.to_string()
                .contains("sent 5 CA certificates after its leaf, roots not counted; at most 4"),
            "{err}"
        );
        let roots: Vec<_> = (0..=MAX_SENT)
            .map(|_| der(&Authority::root("long intermediate").unwrap().cert_pem))
            .collect();
        let err = bundle.verify(&leaf, &roots, now).unwrap_err();
        assert!(
            err.to_string()
                .contains("sent 17 certificates after its leaf; at most 16 are looked at"),
            "{err}"
        );
        bundle
            .verify(&leaf, &[der(&int.cert_pem)], now)
            .expect("the plain chain verifies");
    }

    /// The tick closes a connection once a CRL covering its chain is past
    /// its next update. Only CRLs whose scope covers the certificate count:
    /// a CA-only CRL of the leaf's issuer says nothing about the leaf.
    #[test]
    fn only_crls_whose_scope_covers_a_certificate_time_its_connection() {
        let dir = tempfile::tempdir().unwrap();
        let root = Authority::root("scope root").unwrap();
        let int = root.intermediate("scope intermediate").unwrap();
        let leaf = der(&int
            .issue(&LeafSpec::client("c", &["dns:c.example"]))
            .unwrap()
            .cert_pem);
        let chain = [der(&int.cert_pem)];
        let now = time::OffsetDateTime::now_utc();
        let (soon, later) = (
            now + time::Duration::hours(1),
            now + time::Duration::days(2),
        );
        let b = bundle(
            dir.path(),
            &root,
            &[
                int.crl_scoped_until(1, &[], CrlScope::UserCertsOnly, later)
                    .unwrap(),
                int.crl_scoped_until(1, &[], CrlScope::CaCertsOnly, soon)
                    .unwrap(),
            ],
        );
        let verified = b.verify(&leaf, &chain, UnixTime::now()).unwrap();
        assert_eq!(verified.crl_next_update, Some(later.unix_timestamp()));
    }

    /// The tick closes a connection when a CA of its path expires; a CA
    /// the gateway cannot read would escape that, so it refuses the chain.
    #[test]
    fn a_ca_certificate_that_cannot_be_read_refuses_the_chain() {
        let root = Authority::root("readable root").unwrap();
        let int = root.intermediate("readable intermediate").unwrap();
        let readable = der(&int.cert_pem);
        let expected = X509Certificate::from_der(&readable)
            .unwrap()
            .1
            .validity()
            .not_after
            .timestamp();
        assert_eq!(
            earliest_not_after([readable.clone()].into_iter()),
            Ok(Some(expected))
        );
        assert_eq!(earliest_not_after(std::iter::empty()), Ok(None));
        let unreadable = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        let err = earliest_not_after([readable, unreadable].into_iter()).unwrap_err();
        assert!(err.to_string().contains("cannot be read"), "{err}");
    }

    /// When the leaf's issuer has only CRLs limited by an issuing
    /// distribution point, webpki's own scope rules decide whether one
    /// covers the leaf: a CA-only CRL does not, and the leaf is unknown.
    #[test]
    fn scoped_crls_cover_a_leaf_only_when_their_scope_includes_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = Authority::root("scoped root").unwrap();
        let int = root.intermediate("scoped intermediate").unwrap();
        let good = der(&int
            .issue(&LeafSpec::client("good", &["dns:good.example"]))
            .unwrap()
            .cert_pem);
        let bad = int
            .issue(&LeafSpec::client("bad", &["dns:bad.example"]))
            .unwrap();
        let bad_serial = bad.serial.clone();
        let bad = der(&bad.cert_pem);
        let chain = [der(&int.cert_pem)];
        let now = UnixTime::now();

        let users = bundle(
            dir.path(),
            &root,
            &[int
                .crl_scoped(1, &[&bad_serial], CrlScope::UserCertsOnly)
                .unwrap()],
        );
        assert!(users.verify(&good, &chain, now).is_ok());
        assert_eq!(
            users.verify(&bad, &chain, now),
            Err(CertificateError::Revoked.into())
        );

        let cas_only = bundle(
            dir.path(),
            &root,
            &[int.crl_scoped(1, &[], CrlScope::CaCertsOnly).unwrap()],
        );
        assert_eq!(
            cas_only.verify(&good, &chain, now),
            Err(CertificateError::UnknownRevocationStatus.into())
        );
    }
}

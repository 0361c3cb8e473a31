//! Signature checks over CA certificates, remembered.
//!
//! Every client of a fleet presents the same few intermediates, so each full
//! handshake would check the same root signature over the same intermediate
//! again: one of the three P-256 verifications in a handshake (leaf,
//! intermediate, CertificateVerify), about 45 µs of a core. A successful
//! check is a fact about three byte strings (this key signed exactly this
//! message with exactly this signature, under this algorithm); it does not
//! depend on time, revocation, trust configuration or path. So the answer is
//! kept, keyed by a SHA-256 over all of them, and webpki still does every
//! other check (validity, name constraints, usage, revocation, the path to a
//! trusted root) on every handshake.
//!
//! Only signatures over CA certificates and CRLs are kept: a bundle has a
//! few of each, checked on every handshake (webpki verifies the signature
//! of every CRL it consults, the leaf's issuer's and, with revocation along
//! the chain, the root's), while leaves differ per client and would churn
//! the set, and the TLS CertificateVerify is new on every handshake.
//! Failures are never kept.

use std::collections::BTreeSet;
use std::sync::{Mutex, OnceLock};

use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls_pki_types::{AlgorithmIdentifier, InvalidSignature, SignatureVerificationAlgorithm};

/// Distinct CA signatures kept; a fleet has a handful. Full: start over.
const CAPACITY: usize = 1024;

/// The provider's verification algorithms, each remembering CA signatures in
/// one process-wide set. Built once; rustls wants them `'static`.
pub(super) fn algorithms() -> WebPkiSupportedAlgorithms {
    static ALGORITHMS: OnceLock<WebPkiSupportedAlgorithms> = OnceLock::new();
    static VERIFIED: Verified = Verified::new();
    *ALGORITHMS.get_or_init(|| {
        let plain = rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms;
        let wrap = |inner| -> &'static dyn SignatureVerificationAlgorithm {
            Box::leak(Box::new(Remembered {
                inner,
                verified: &VERIFIED,
            }))
        };
        let all: Vec<_> = plain.all.iter().map(|a| wrap(*a)).collect();
        let mapping: Vec<_> = plain
            .mapping
            .iter()
            .map(|(scheme, algs)| {
                let algs: Vec<_> = algs.iter().map(|a| wrap(*a)).collect();
                (*scheme, &*Box::leak(algs.into_boxed_slice()))
            })
            .collect();
        WebPkiSupportedAlgorithms {
            all: Box::leak(all.into_boxed_slice()),
            mapping: Box::leak(mapping.into_boxed_slice()),
        }
    })
}

struct Verified(Mutex<BTreeSet<[u8; 32]>>);

impl Verified {
    const fn new() -> Self {
        Verified(Mutex::new(BTreeSet::new()))
    }

    fn contains(&self, key: &[u8; 32]) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(key)
    }

    fn insert(&self, key: [u8; 32]) {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if set.len() >= CAPACITY {
            set.clear();
        }
        set.insert(key);
    }
}

struct Remembered {
    inner: &'static dyn SignatureVerificationAlgorithm,
    verified: &'static Verified,
}

impl std::fmt::Debug for Remembered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Remembered").field(&self.inner).finish()
    }
}

impl Remembered {
    fn key(&self, public_key: &[u8], message: &[u8], signature: &[u8]) -> [u8; 32] {
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        // Length-prefixed, so no two different inputs concatenate alike.
        for part in [
            self.inner.public_key_alg_id().as_ref(),
            self.inner.signature_alg_id().as_ref(),
            public_key,
            message,
            signature,
        ] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(ctx.finish().as_ref());
        key
    }
}

impl SignatureVerificationAlgorithm for Remembered {
    fn verify_signature(
        &self,
        public_key: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), InvalidSignature> {
        if !names_a_ca(message) && !is_a_crl(message) {
            return self.inner.verify_signature(public_key, message, signature);
        }
        let key = self.key(public_key, message, signature);
        if self.verified.contains(&key) {
            return Ok(());
        }
        self.inner
            .verify_signature(public_key, message, signature)?;
        self.verified.insert(key);
        Ok(())
    }

    fn public_key_alg_id(&self) -> AlgorithmIdentifier {
        self.inner.public_key_alg_id()
    }

    fn signature_alg_id(&self) -> AlgorithmIdentifier {
        self.inner.signature_alg_id()
    }

    fn fips(&self) -> bool {
        self.inner.fips()
    }
}

/// Whether signed bytes look like a certificate with basicConstraints
/// cA = TRUE. A byte pattern rather than a parse, because it runs on every
/// signature check; a wrong guess only decides whether a correct answer is
/// kept, never what the answer is.
fn names_a_ca(tbs: &[u8]) -> bool {
    // extnID basicConstraints (2.5.29.19)
    const OID: [u8; 5] = [0x06, 0x03, 0x55, 0x1d, 0x13];
    tbs.windows(OID.len())
        .enumerate()
        .filter(|(_, w)| *w == OID)
        .any(|(at, _)| {
            let mut rest = tbs.get(at + OID.len()..).unwrap_or_default();
            // critical BOOLEAN, when present
            if let [0x01, 0x01, _, tail @ ..] = rest {
                rest = tail;
            }
            // OCTET STRING { SEQUENCE { cA BOOLEAN TRUE, ... } }
            matches!(rest, [0x04, _, 0x30, _, 0x01, 0x01, 0xff, ..])
        })
}

/// Whether signed bytes look like a CRL's TBSCertList: a SEQUENCE whose
/// first element is the v2 version (INTEGER 1) or, in a v1 CRL, the
/// signature AlgorithmIdentifier (a SEQUENCE). A certificate's TBS starts
/// with its explicit [0] version or its serial number; a v1 certificate
/// with serial 1 looks alike, and is then merely kept (see `names_a_ca`).
fn is_a_crl(tbs: &[u8]) -> bool {
    let body = match tbs {
        [0x30, len, rest @ ..] if *len < 0x80 => rest,
        [0x30, 0x81, _, rest @ ..] => rest,
        [0x30, 0x82, _, _, rest @ ..] => rest,
        [0x30, 0x83, _, _, _, rest @ ..] => rest,
        _ => return false,
    };
    matches!(body, [0x02, 0x01, 0x01, 0x30, ..] | [0x30, ..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Authority, LeafSpec};
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use x509_parser::prelude::{CertificateRevocationList, FromDer, X509Certificate};

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    /// Counts the checks that reach the real algorithm.
    #[derive(Debug)]
    struct Counting(AtomicUsize);

    impl SignatureVerificationAlgorithm for Counting {
        fn verify_signature(&self, k: &[u8], m: &[u8], s: &[u8]) -> Result<(), InvalidSignature> {
            self.0.fetch_add(1, Ordering::Relaxed);
            webpki::aws_lc_rs::ECDSA_P256_SHA256.verify_signature(k, m, s)
        }
        fn public_key_alg_id(&self) -> AlgorithmIdentifier {
            webpki::aws_lc_rs::ECDSA_P256_SHA256.public_key_alg_id()
        }
        fn signature_alg_id(&self) -> AlgorithmIdentifier {
            webpki::aws_lc_rs::ECDSA_P256_SHA256.signature_alg_id()
        }
    }

    struct Fleet {
        root: CertificateDer<'static>,
        intermediate: CertificateDer<'static>,
        leaves: Vec<CertificateDer<'static>>,
    }

    fn fleet() -> Fleet {
        let root = Authority::root("remember root").unwrap();
        let intermediate = root.intermediate("remember intermediate").unwrap();
        let leaves = ["a", "b"]
            .iter()
            .map(|n| {
                let spiffe = format!("spiffe://example.internal/{n}");
                let spec = LeafSpec::client(n, &[spiffe.as_str()]);
                der(&intermediate.issue(&spec).unwrap().cert_pem)
            })
            .collect();
        Fleet {
            root: der(&root.cert_pem),
            intermediate: der(&intermediate.cert_pem),
            leaves,
        }
    }

    /// Runs webpki's whole chain check through `alg`.
    fn check(
        alg: &'static Remembered,
        f: &Fleet,
        leaf: &CertificateDer<'_>,
        intermediate: &CertificateDer<'_>,
    ) -> Result<(), webpki::Error> {
        let anchor: TrustAnchor<'_> = webpki::anchor_from_trusted_cert(&f.root)?;
        let ee = webpki::EndEntityCert::try_from(leaf)?;
        ee.verify_for_usage(
            &[alg],
            &[anchor],
            std::slice::from_ref(intermediate),
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map(|_| ())
    }

    fn remembered() -> (&'static Counting, &'static Remembered) {
        let counting: &'static Counting = Box::leak(Box::new(Counting(AtomicUsize::new(0))));
        let verified: &'static Verified = Box::leak(Box::new(Verified::new()));
        let alg = Box::leak(Box::new(Remembered {
            inner: counting,
            verified,
        }));
        (counting, alg)
    }

    #[test]
    fn the_intermediate_is_checked_once_and_every_leaf_every_time() {
        let f = fleet();
        let (counting, alg) = remembered();
        check(alg, &f, &f.leaves[0], &f.intermediate).unwrap();
        assert_eq!(
            counting.0.load(Ordering::Relaxed),
            2,
            "leaf and intermediate"
        );
        check(alg, &f, &f.leaves[0], &f.intermediate).unwrap();
        check(alg, &f, &f.leaves[1], &f.intermediate).unwrap();
        assert_eq!(
            counting.0.load(Ordering::Relaxed),
            4,
            "the same and another leaf, each checked; the intermediate remembered"
        );
    }

    #[test]
    fn a_bad_signature_is_refused_every_time_and_never_kept() {
        let f = fleet();
        let (counting, alg) = remembered();
        // The intermediate's signature, last bytes of the DER, broken.
        let mut broken = f.intermediate.to_vec();
        let last = broken.len() - 2;
        broken[last] ^= 0x55;
        let broken = CertificateDer::from(broken);
        for _ in 0..2 {
            assert!(check(alg, &f, &f.leaves[0], &broken).is_err());
        }
        assert!(alg.verified.0.lock().unwrap().is_empty());
        // The genuine intermediate still verifies, and is kept from then on.
        check(alg, &f, &f.leaves[0], &f.intermediate).unwrap();
        let before = counting.0.load(Ordering::Relaxed);
        check(alg, &f, &f.leaves[0], &f.intermediate).unwrap();
        assert_eq!(counting.0.load(Ordering::Relaxed), before + 1);
    }

    #[test]
    fn a_crl_signature_is_checked_once() {
        let root = Authority::root("remember root").unwrap();
        let intermediate = root.intermediate("remember intermediate").unwrap();
        let leaf = |n: &str| {
            let spiffe = format!("spiffe://example.internal/{n}");
            der(&intermediate
                .issue(&LeafSpec::client(n, &[spiffe.as_str()]))
                .unwrap()
                .cert_pem)
        };
        let crl = rustls_pki_types::CertificateRevocationListDer::from_pem_slice(
            intermediate.crl(1, &[]).unwrap().as_bytes(),
        )
        .unwrap();
        let crl = webpki::OwnedCertRevocationList::from_der(&crl).unwrap();
        let crl = webpki::CertRevocationList::Owned(crl);
        let (counting, alg) = remembered();
        let anchor_der = der(&root.cert_pem);
        let anchor = webpki::anchor_from_trusted_cert(&anchor_der).unwrap();
        let intermediate_der = der(&intermediate.cert_pem);
        for (n, checks) in [("a", 3), ("b", 4)] {
            let crls = [&crl];
            let revocation = webpki::RevocationOptionsBuilder::new(&crls)
                .unwrap()
                .with_depth(webpki::RevocationCheckDepth::EndEntity)
                .build();
            let leaf = leaf(n);
            webpki::EndEntityCert::try_from(&leaf)
                .unwrap()
                .verify_for_usage(
                    &[alg],
                    std::slice::from_ref(&anchor),
                    std::slice::from_ref(&intermediate_der),
                    UnixTime::now(),
                    webpki::KeyUsage::client_auth(),
                    Some(revocation),
                    None,
                )
                .unwrap();
            assert_eq!(
                counting.0.load(Ordering::Relaxed),
                checks,
                "leaf {n}: the intermediate and the CRL once, each leaf every time"
            );
        }
    }

    #[test]
    fn only_ca_certificates_look_like_cas() {
        let f = fleet();
        assert!(names_a_ca(&f.root));
        assert!(names_a_ca(&f.intermediate));
        assert!(!names_a_ca(&f.leaves[0]));
        assert!(!names_a_ca(b"TLS 1.3, client CertificateVerify"));
        // What webpki has verified: the signed parts.
        let tbs = |der: &[u8]| {
            let (_, cert) = X509Certificate::from_der(der).unwrap();
            cert.tbs_certificate.as_ref().to_vec()
        };
        assert!(!is_a_crl(&tbs(&f.leaves[0])));
        assert!(!is_a_crl(&tbs(&f.intermediate)));
        assert!(!is_a_crl(b"TLS 1.3, client CertificateVerify"));
        let crl_pem = Authority::root("r").unwrap().crl(1, &[]).unwrap();
        let crl_der =
            rustls_pki_types::CertificateRevocationListDer::from_pem_slice(crl_pem.as_bytes())
                .unwrap();
        let (_, crl) = CertificateRevocationList::from_der(&crl_der).unwrap();
        assert!(is_a_crl(crl.tbs_cert_list.as_ref()));
    }

    #[test]
    fn every_scheme_rustls_offers_is_wrapped() {
        let plain = rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms;
        let ours = algorithms();
        assert_eq!(ours.all.len(), plain.all.len());
        let schemes =
            |a: &WebPkiSupportedAlgorithms| a.mapping.iter().map(|(s, _)| *s).collect::<Vec<_>>();
        assert_eq!(schemes(&ours), schemes(&plain));
    }
}

//! Certificates from rcgen: a root, intermediates and leaves with the
//! profiles the gateway expects (serverAuth for servers, clientAuth for
//! clients and devices). `gateway pki` keeps them in a directory (`store`);
//! tests, the demo and the benchmark build throwaway ones with this.

pub mod inspect;
pub mod store;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer, X509Certificate};

/// The scope of a CRL from `Authority::crl_scoped` (leaves or CAs only).
pub use rcgen::CrlScope;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("SAN {0:?}: expected spiffe://… (or another URI), dns:NAME or email:ADDR")]
    BadSan(String),
    #[error("SAN {0:?}: wildcards are refused: a certificate names one identity")]
    Wildcard(String),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: the store's lock is held by another process; gave up after {waited:?} (retry; if it stays held, find who holds it: fuser -v {path})"
    )]
    Locked {
        path: std::path::PathBuf,
        waited: std::time::Duration,
    },
    #[error("{path}: {message}")]
    Store {
        path: std::path::PathBuf,
        message: String,
    },
    /// `gateway pki revoke --device` recorded the device, and its
    /// certificate is from before that.
    #[error(
        "the device {uri} was revoked at {revoked_at} (gateway pki revoke --device) and its device certificate is from before: enrol it again with a new device certificate"
    )]
    DeviceRevoked { uri: String, revoked_at: String },
}

/// The DER of a PEM certificate request that is exactly one `CERTIFICATE
/// REQUEST` block (`NEW CERTIFICATE REQUEST` too), nothing before or after
/// it but whitespace. PEM readers disagree on the rest (x509-parser takes
/// a `-----BEGIN` only at a line's start, the `pem` crate rcgen uses takes
/// one mid-line): the key the issuer's policy checks and the key it signs
/// must come from the same bytes, so anything they could read differently
/// is refused.
pub fn csr_der(pem: &str) -> Result<Vec<u8>, String> {
    let text = pem.trim();
    let mut lines = text.lines().map(|l| l.trim_end_matches('\r'));
    let first = lines.next().unwrap_or_default();
    let label = first
        .strip_prefix("-----BEGIN ")
        .and_then(|l| l.strip_suffix("-----"))
        .filter(|l| *l == "CERTIFICATE REQUEST" || *l == "NEW CERTIFICATE REQUEST")
        .ok_or("not one PEM CERTIFICATE REQUEST block: it must start the text")?;
    let last = lines.next_back().unwrap_or_default();
    if last != format!("-----END {label}-----") {
        return Err(format!("not one PEM {label} block: it must end the text"));
    }
    if lines.any(|l| l.contains('-') || l.contains(':')) {
        return Err(format!("not one PEM {label} block: one block, no headers"));
    }
    let (rest, parsed) =
        x509_parser::pem::parse_x509_pem(text.as_bytes()).map_err(|e| e.to_string())?;
    if !rest.iter().all(u8::is_ascii_whitespace) || parsed.label != label {
        return Err(format!("not one PEM {label} block"));
    }
    Ok(parsed.contents)
}

/// Key algorithms for new keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyType {
    #[default]
    P256,
    Ed25519,
    Rsa2048,
}

impl KeyType {
    fn generate(self) -> Result<KeyPair, PkiError> {
        Ok(match self {
            KeyType::P256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
            KeyType::Ed25519 => KeyPair::generate_for(&rcgen::PKCS_ED25519)?,
            KeyType::Rsa2048 => KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)?,
        })
    }
}

/// A fresh serial: 16 random bytes, the top bit clear so the INTEGER is
/// positive in 16 bytes (RFC 5280 §4.1.2.2 allows 20; CA/B BR want at
/// least 64 random bits). Not rcgen's default, a hash of the subject's
/// public key: for a CSR that is the requester's choice, and two
/// certificates for one key would share a serial.
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes)
        .map_err(|_| PkiError::Rcgen(rcgen::Error::RingUnspecified))?;
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

/// The start of an Ed25519 key in PKCS#8 v2 (RFC 5958: version 1, the
/// algorithm, the 32-byte seed), after the outer SEQUENCE's tag and length.
const ED25519_V2_AFTER_LEN: [u8; 14] = [
    0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// The same, PKCS#8 v1 (RFC 8410 §7), whole but for the seed.
const ED25519_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// A key as PEM that OpenSSL 3.0 and the gateway both load: an Ed25519 key
/// comes out of the crypto library as PKCS#8 v2 (with the public key),
/// which OpenSSL 3.0's `s_client` refuses, so it is written as v1 (the
/// seed alone, from which every reader derives the public key).
fn key_pem(key: &KeyPair) -> String {
    let der = key.serialize_der();
    let seed = match der.as_slice() {
        [0x30, _, rest @ ..] if rest.starts_with(&ED25519_V2_AFTER_LEN) => {
            rest.get(ED25519_V2_AFTER_LEN.len()..ED25519_V2_AFTER_LEN.len() + 32)
        }
        _ => None,
    };
    let v1 = seed.and_then(|seed| {
        let der: Vec<u8> = ED25519_V1_PREFIX.iter().chain(seed).copied().collect();
        // rcgen keeps the DER it was given; it loads only what is sound.
        KeyPair::try_from(der.as_slice()).ok()
    });
    v1.as_ref().unwrap_or(key).serialize_pem()
}

/// A certificate authority that can sign.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    /// This CA's certificate, PEM.
    pub cert_pem: String,
    /// This CA's private key, PEM (keep it 0600; the root's belongs offline).
    pub key_pem: String,
}

/// What a leaf is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Server,
    Client,
    /// No extended key usage at all (to test that it is refused).
    NoEku,
}

/// How to issue one leaf.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    pub common_name: String,
    /// `spiffe://…` (any URI), `dns:NAME`, `email:ADDR`.
    pub sans: Vec<String>,
    pub profile: Profile,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// Mark the leaf as a CA (to test that a CA is refused as a client).
    pub is_ca: bool,
    /// Add a critical extension no one knows (to test that it is refused:
    /// RFC 5280 §4.2 says a verifier must reject what it cannot process).
    pub unknown_critical_extension: bool,
    pub key_type: KeyType,
    /// The subject's OU, e.g. the issuer profile a user certificate was
    /// signed under (routes ignore it; people and audits read it).
    pub organizational_unit: Option<String>,
}

impl LeafSpec {
    pub fn new(profile: Profile, common_name: &str, sans: &[&str]) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            common_name: common_name.to_owned(),
            sans: sans.iter().map(|s| (*s).to_owned()).collect(),
            profile,
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(1),
            is_ca: false,
            unknown_critical_extension: false,
            key_type: KeyType::P256,
            organizational_unit: None,
        }
    }

    /// A server leaf valid for 90 days, as `gateway pki` issues them.
    pub fn server(common_name: &str, sans: &[&str]) -> Self {
        let mut spec = Self::new(Profile::Server, common_name, sans);
        spec.not_after = OffsetDateTime::now_utc() + Duration::days(90);
        spec
    }

    pub fn client(common_name: &str, sans: &[&str]) -> Self {
        Self::new(Profile::Client, common_name, sans)
    }
}

/// An issued leaf: its certificate and its key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// The certificate's serial number, as it would appear in a CRL.
    pub serial: Vec<u8>,
}

/// A leaf signed for someone else's key (`Authority::sign_request`).
#[derive(Debug, Clone)]
pub struct Signed {
    pub cert_pem: String,
    /// The certificate's serial number, as it would appear in a CRL.
    pub serial: Vec<u8>,
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn san(s: &str) -> Result<SanType, PkiError> {
    let bad = || PkiError::BadSan(s.to_owned());
    let ia5 = |v: &str| v.to_owned().try_into().map_err(|_| bad());
    if let Some(d) = s.strip_prefix("dns:") {
        Ok(SanType::DnsName(ia5(d)?))
    } else if let Some(e) = s.strip_prefix("email:") {
        Ok(SanType::Rfc822Name(ia5(e)?))
    } else if s.contains("://") {
        Ok(SanType::URI(ia5(s)?))
    } else {
        Err(bad())
    }
}

impl Authority {
    /// A self-signed root that may sign one level of intermediates.
    pub fn root(common_name: &str) -> Result<Self, PkiError> {
        Self::new_root(common_name, KeyType::P256, 3650)
    }

    pub fn new_root(common_name: &str, key_type: KeyType, days: i64) -> Result<Self, PkiError> {
        let mut params = ca_params(common_name, 1);
        params.not_after = OffsetDateTime::now_utc() + Duration::days(days);
        let key = key_type.generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self::from_parts(params, key, cert.pem()))
    }

    /// An intermediate that signs leaves only.
    pub fn intermediate(&self, common_name: &str) -> Result<Self, PkiError> {
        self.new_intermediate(common_name, KeyType::P256, 365, None)
    }

    /// An intermediate that signs leaves only; `permitted_dns` adds a name
    /// constraint so it cannot issue for DNS names outside that domain.
    pub fn new_intermediate(
        &self,
        common_name: &str,
        key_type: KeyType,
        days: i64,
        permitted_dns: Option<&str>,
    ) -> Result<Self, PkiError> {
        let not_after = OffsetDateTime::now_utc() + Duration::days(days);
        self.intermediate_with(common_name, key_type, not_after, permitted_dns)
    }

    /// An intermediate valid until `not_after` (to test one that expires
    /// while its leaves are still valid).
    pub fn intermediate_until(
        &self,
        common_name: &str,
        not_after: OffsetDateTime,
    ) -> Result<Self, PkiError> {
        self.intermediate_with(common_name, KeyType::P256, not_after, None)
    }

    fn intermediate_with(
        &self,
        common_name: &str,
        key_type: KeyType,
        not_after: OffsetDateTime,
        permitted_dns: Option<&str>,
    ) -> Result<Self, PkiError> {
        let mut params = ca_params(common_name, 0);
        params.not_after = not_after;
        if let Some(domain) = permitted_dns {
            params.name_constraints = Some(rcgen::NameConstraints {
                permitted_subtrees: vec![rcgen::GeneralSubtree::DnsName(domain.to_owned())],
                excluded_subtrees: vec![],
            });
        }
        let key = key_type.generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Self::from_parts(params, key, cert.pem()))
    }

    fn from_parts(params: CertificateParams, key: KeyPair, cert_pem: String) -> Self {
        let key_pem = key_pem(&key);
        Self {
            issuer: Issuer::new(params, key),
            cert_pem,
            key_pem,
        }
    }

    /// A CA from its certificate and key, as `gateway pki` stores them.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        Ok(Self {
            issuer: Issuer::from_ca_cert_pem(cert_pem, key)?,
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
        })
    }

    /// This CA's serial number, as a CRL of its issuer would list it.
    pub fn serial(&self) -> Result<Vec<u8>, PkiError> {
        let bad = |message: String| PkiError::Store {
            path: "CA certificate".into(),
            message,
        };
        let (_, pem) = x509_parser::pem::parse_x509_pem(self.cert_pem.as_bytes())
            .map_err(|e| bad(e.to_string()))?;
        let cert = pem.parse_x509().map_err(|e| bad(e.to_string()))?;
        Ok(cert.tbs_certificate.raw_serial().to_vec())
    }

    pub fn issue(&self, spec: &LeafSpec) -> Result<Issued, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&spec.common_name);
        params.subject_alt_names = spec.sans.iter().map(|s| san(s)).collect::<Result<_, _>>()?;
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        params.use_authority_key_identifier_extension = true;
        if spec.is_ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::DigitalSignature,
            ];
        } else {
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        }
        params.extended_key_usages = match spec.profile {
            Profile::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Profile::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Profile::NoEku => vec![],
        };
        if spec.unknown_critical_extension {
            // 1.3.6.1.4.1.55555.1: a private arc no verifier can know.
            let mut ext = rcgen::CustomExtension::from_oid_content(
                &[1, 3, 6, 1, 4, 1, 55555, 1],
                vec![0x05, 0x00],
            );
            ext.set_criticality(true);
            params.custom_extensions.push(ext);
        }
        params.serial_number = Some(random_serial()?);
        let key = spec.key_type.generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let serial = X509Certificate::from_der(cert.der())
            .map(|(_, c)| c.tbs_certificate.raw_serial().to_vec())
            .unwrap_or_default();
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key_pem(&key),
            serial,
        })
    }

    /// Signs a leaf for the key in a certificate signing request (PEM).
    /// The request's self-signature must verify (its sender holds the
    /// key); nothing else in it is used: names, validity and usage come
    /// from `spec`, as the issuer decided them. The private key never
    /// leaves the requester. `spec.key_type`, `is_ca` and the unknown
    /// extension are not used.
    pub fn sign_request(&self, csr_pem: &str, spec: &LeafSpec) -> Result<Signed, PkiError> {
        // The same DER the issuer's key policy checked (`csr_der`), not
        // rcgen's own PEM reading, which takes another block.
        let der = csr_der(csr_pem)
            .map_err(|_| PkiError::Rcgen(rcgen::Error::CouldNotParseCertificationRequest))?;
        let csr = rcgen::CertificateSigningRequestParams::from_der(&der.into())?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&spec.common_name);
        if let Some(ou) = &spec.organizational_unit {
            params
                .distinguished_name
                .push(DnType::OrganizationalUnitName, ou.as_str());
        }
        params.subject_alt_names = spec.sans.iter().map(|s| san(s)).collect::<Result<_, _>>()?;
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        params.use_authority_key_identifier_extension = true;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match spec.profile {
            Profile::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Profile::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Profile::NoEku => vec![],
        };
        params.serial_number = Some(random_serial()?);
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        let serial = X509Certificate::from_der(cert.der())
            .map(|(_, c)| c.tbs_certificate.raw_serial().to_vec())
            .unwrap_or_default();
        Ok(Signed {
            cert_pem: cert.pem(),
            serial,
        })
    }

    /// A CRL signed by this CA revoking `serials`, valid for a day.
    pub fn crl(&self, crl_number: u64, serials: &[&[u8]]) -> Result<String, PkiError> {
        self.crl_until(
            crl_number,
            serials,
            OffsetDateTime::now_utc() + Duration::days(1),
        )
    }

    /// A CRL signed by this CA revoking `serials`, with its next-update time.
    pub fn crl_until(
        &self,
        crl_number: u64,
        serials: &[&[u8]],
        next_update: OffsetDateTime,
    ) -> Result<String, PkiError> {
        let this_update = OffsetDateTime::now_utc() - Duration::minutes(1);
        self.crl_with(crl_number, serials, this_update, next_update, None)
    }

    /// A CRL valid for a day whose issuing distribution point limits it to
    /// leaves or to CAs (to test scoped CRLs; `gateway pki` issues none).
    pub fn crl_scoped(
        &self,
        crl_number: u64,
        serials: &[&[u8]],
        scope: CrlScope,
    ) -> Result<String, PkiError> {
        let next_update = OffsetDateTime::now_utc() + Duration::days(1);
        self.crl_scoped_until(crl_number, serials, scope, next_update)
    }

    /// `crl_scoped` with its next-update time.
    pub fn crl_scoped_until(
        &self,
        crl_number: u64,
        serials: &[&[u8]],
        scope: CrlScope,
        next_update: OffsetDateTime,
    ) -> Result<String, PkiError> {
        let idp = rcgen::CrlIssuingDistributionPoint {
            distribution_point: rcgen::CrlDistributionPoint {
                uris: vec!["http://crl.example.internal/scoped.crl".into()],
            },
            scope: Some(scope),
        };
        let this_update = OffsetDateTime::now_utc() - Duration::minutes(1);
        self.crl_with(crl_number, serials, this_update, next_update, Some(idp))
    }

    /// A CRL published at `this_update` (to test one that has aged).
    pub fn crl_published(
        &self,
        crl_number: u64,
        serials: &[&[u8]],
        this_update: OffsetDateTime,
        next_update: OffsetDateTime,
    ) -> Result<String, PkiError> {
        self.crl_with(crl_number, serials, this_update, next_update, None)
    }

    fn crl_with(
        &self,
        crl_number: u64,
        serials: &[&[u8]],
        this_update: OffsetDateTime,
        next_update: OffsetDateTime,
        issuing_distribution_point: Option<rcgen::CrlIssuingDistributionPoint>,
    ) -> Result<String, PkiError> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update,
            next_update,
            crl_number: SerialNumber::from(crl_number),
            issuing_distribution_point,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(s),
                    revocation_time: now - Duration::minutes(1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}

fn ca_params(common_name: &str, path_len: u8) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = name(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(365);
    params
}

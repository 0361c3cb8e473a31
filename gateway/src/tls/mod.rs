//! TLS termination: what each listener serves with and how a connection's
//! `ServerConfig` is put together once its route is known (by SNI).

pub mod bundle;
pub mod certs;
pub mod crl;
mod remember;
pub mod verifier;

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, SupportedProtocolVersion};

use crate::config::{Mode, TlsVersion};
use crate::offload::{KernelSupport, Offload};
use crate::policy::{Policy, Verdict};
pub use bundle::{Bundle, BundleFiles};
pub use certs::CertError;
use verifier::ConnectionVerifier;
pub use verifier::{CertProblem, Decision};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Cert(#[from] CertError),
    /// Boxed: it names two files and two CRLs, and every TlsError would
    /// carry its room.
    #[error(transparent)]
    Crl(Box<crl::CrlError>),
    #[error("{path}: cannot build a client verifier from these CAs: {reason}")]
    Verifier { path: String, reason: String },
    #[error("TLS configuration refused: {0}")]
    Config(#[from] rustls::Error),
    #[error("offload = \"kernel\", but {0}")]
    Offload(String),
    /// A route names a trust bundle its listener did not load. Config
    /// checks make this unreachable; if it happens anyway the connection is
    /// refused, never judged by another bundle.
    #[error("trust bundle {0:?} is not loaded for this listener")]
    UnknownBundle(String),
}

impl From<crl::CrlError> for TlsError {
    fn from(e: crl::CrlError) -> Self {
        TlsError::Crl(Box::new(e))
    }
}

/// The crypto every TLS context in the gateway uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The provider for a context with this offload setting: with `kernel`, only
/// the suites the kernel can take are offered, so every connection offloads.
fn provider_for(offload: Offload) -> Result<Arc<CryptoProvider>, TlsError> {
    if offload != Offload::Kernel {
        return Ok(provider());
    }
    let support = KernelSupport::get();
    if !support.available() {
        return Err(TlsError::Offload(support.describe()));
    }
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites.retain(|s| support.takes_suite(s));
    if p.cipher_suites.is_empty() {
        return Err(TlsError::Offload(format!(
            "no cipher suite the gateway offers is one the kernel takes ({})",
            support.describe()
        )));
    }
    Ok(Arc::new(p))
}

/// What a route asks of its clients' certificates.
#[derive(Debug)]
pub struct RouteAuth {
    pub mode: Mode,
    /// The trust bundle clients must chain to (None: the listener's
    /// `client_ca`). On a device route, `device.trust`: the CA that issues
    /// device-bound user certificates is the route's trust (a client
    /// presents one chain; see README, "Devices").
    pub trust: Option<String>,
    /// Whether `trust` is a device route's device CA (for the refusal's words).
    pub device: bool,
    pub policy: Arc<Policy>,
}

/// A listener's TLS material, loaded and checked once.
pub struct ListenerTls {
    provider: Arc<CryptoProvider>,
    server_key: Arc<CertifiedKey>,
    /// The listener's own `client_ca` (+ CRLs).
    default_bundle: Arc<Bundle>,
    /// Named `[trust.NAME]` bundles that routes narrow to.
    bundles: HashMap<String, Arc<Bundle>>,
    versions: Vec<&'static SupportedProtocolVersion>,
    /// Keep the session keys extractable for a kernel TLS hand-off.
    extract_secrets: bool,
}

impl fmt::Debug for ListenerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenerTls")
            .field("versions", &self.versions)
            .field("bundles", &self.bundles.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl ListenerTls {
    /// `stale_crl_uses` gives each bundle (by name and `crl_expired`) the
    /// counter of checks that met a CRL past its nextUpdate.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        listener: &str,
        cert: &Path,
        key: &Path,
        client_ca: &BundleFiles,
        bundles: &HashMap<String, BundleFiles>,
        versions: &[TlsVersion],
        offload: Offload,
        stale_crl_uses: &dyn Fn(&str, crate::config::CrlExpired) -> Arc<AtomicU64>,
    ) -> Result<Self, TlsError> {
        let provider = provider_for(offload)?;
        let server_key = certs::load_server_identity(cert, key, &provider)?;
        // The same crypto, with signatures over CA certificates remembered:
        // a fleet's intermediates are checked once, not on every handshake.
        let algorithms = remember::algorithms();
        let load = |name: String, files: &BundleFiles| {
            let uses = stale_crl_uses(&name, files.crl_expired);
            Bundle::load(name, files, algorithms, uses).map(Arc::new)
        };
        let default_bundle = load(format!("listener {listener} client_ca"), client_ca)?;
        let bundles = bundles
            .iter()
            .map(|(name, files)| Ok((name.clone(), load(format!("trust {name}"), files)?)))
            .collect::<Result<_, TlsError>>()?;
        let versions = versions
            .iter()
            .map(|v| match v {
                TlsVersion::Tls12 => &rustls::version::TLS12,
                TlsVersion::Tls13 => &rustls::version::TLS13,
            })
            .collect();
        Ok(Self {
            provider,
            server_key,
            default_bundle,
            bundles,
            versions,
            extract_secrets: true,
        })
    }

    /// The named bundle, or the listener's own `client_ca` for `None`. A
    /// name that is not loaded is an error, not the default: falling back
    /// would let the listener's CAs in where the route named others.
    fn bundle(&self, name: Option<&str>) -> Result<Arc<Bundle>, TlsError> {
        match name {
            None => Ok(self.default_bundle.clone()),
            Some(n) => self
                .bundles
                .get(n)
                .cloned()
                .ok_or_else(|| TlsError::UnknownBundle(n.to_owned())),
        }
    }

    /// The bundle `route`'s handshakes verify with (None: a bundle name
    /// not loaded, which refuses every handshake of the route).
    pub fn route_bundle(&self, route: &RouteAuth) -> Option<&Arc<Bundle>> {
        match route.trust.as_deref() {
            None => Some(&self.default_bundle),
            Some(n) => self.bundles.get(n),
        }
    }

    /// Every CRL this listener's bundles enforce.
    pub fn crls(&self) -> impl Iterator<Item = &Arc<crl::Crl>> {
        self.all_bundles().flat_map(|b| b.crls())
    }

    /// Every CA this listener trusts (its `client_ca` and the `trust`
    /// bundles its routes narrow to), each as its subject and key: a
    /// reload that only removes some is a deliberate withdrawal.
    pub fn trust_anchors(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.all_bundles().flat_map(|b| {
            b.anchors()
                .iter()
                .map(|a| (a.subject.as_ref(), a.subject_public_key_info.as_ref()))
        })
    }

    /// Each of this listener's bundles' CRLs and the files they come from.
    pub fn served_crls(&self) -> impl Iterator<Item = crl::Served<'_>> {
        self.all_bundles().map(|b| b.served())
    }

    fn all_bundles(&self) -> impl Iterator<Item = &Arc<Bundle>> {
        std::iter::once(&self.default_bundle).chain(self.bundles.values())
    }

    /// This listener's TLS with `more` CRLs besides each bundle's own (of
    /// each issuer and scope the newest wins): for the connections of a
    /// listener a reload removed, so revocations published since still
    /// reach them. Built once per kept state and reload.
    pub fn with_more_crls(&self, more: &[Arc<crl::Crl>]) -> Result<ListenerTls, TlsError> {
        let merged = |b: &Arc<Bundle>| b.with_more_crls(more).map(Arc::new);
        Ok(ListenerTls {
            provider: self.provider.clone(),
            server_key: self.server_key.clone(),
            default_bundle: merged(&self.default_bundle)?,
            bundles: self
                .bundles
                .iter()
                .map(|(name, b)| Ok((name.clone(), merged(b)?)))
                .collect::<Result<_, TlsError>>()?,
            versions: self.versions.clone(),
            extract_secrets: self.extract_secrets,
        })
    }

    fn verifier(
        &self,
        route: &RouteAuth,
        mode: Mode,
        source: IpAddr,
        decision: Arc<Mutex<Decision>>,
    ) -> Result<ConnectionVerifier, TlsError> {
        Ok(ConnectionVerifier {
            chain: self.bundle(route.trust.as_deref())?,
            device: route.device,
            policy: route.policy.clone(),
            mode,
            source,
            decision,
        })
    }

    /// The path `route`'s bundle verifies for this chain now, if any.
    #[cfg(test)]
    pub fn verified_path(
        &self,
        route: &RouteAuth,
        leaf: &rustls_pki_types::CertificateDer<'_>,
        intermediates: &[rustls_pki_types::CertificateDer<'_>],
    ) -> Option<bundle::Path> {
        self.bundle(route.trust.as_deref())
            .ok()?
            .verify_path(leaf, intermediates, rustls_pki_types::UnixTime::now())
            .ok()
            .map(|(_, path)| path)
    }

    /// Verifies a live connection's client chain again, as its handshake
    /// did but against this (possibly reloaded) state and enforcing. Err
    /// says why the client would be refused now, and whether for
    /// revocation (which a reload's guard never holds back).
    pub fn recheck(
        &self,
        route: &RouteAuth,
        source: IpAddr,
        leaf: &rustls_pki_types::CertificateDer<'_>,
        intermediates: &[rustls_pki_types::CertificateDer<'_>],
    ) -> Result<bundle::Verified, Rejected> {
        let decision = Arc::new(Mutex::new(Decision::default()));
        let verifier = self
            .verifier(route, Mode::Enforce, source, decision.clone())
            .map_err(|e| Rejected::other(e.to_string()))?;
        let checked =
            verifier.verify_client_cert(leaf, intermediates, rustls_pki_types::UnixTime::now());
        let d = decision.lock().unwrap_or_else(|p| p.into_inner());
        // The key was proven in the handshake; a policy refusal, which the
        // verifier holds back until that proof, is the recheck's to give.
        match (checked, &d.refused, &d.verdict) {
            (Ok(_), None, Some(Verdict::Allow { .. })) => Ok(d.verified.unwrap_or_default()),
            (_, Some(refused), _) => Err(Rejected {
                why: refused.clone(),
                revoked: d.problem == Some(verifier::CertProblem::Revoked),
            }),
            (_, None, Some(Verdict::Deny(reason))) => Err(Rejected::other(reason.to_string())),
            (Err(e), None, _) => Err(Rejected::other(e.to_string())),
            (Ok(_), None, None) => Err(Rejected::other(
                "the verifier reached no verdict".to_owned(),
            )),
        }
    }

    /// A `ServerConfig` for one connection from `source` on a route; the
    /// verifier writes what it decides into the returned slot.
    pub fn connection_config(
        &self,
        route: &RouteAuth,
        source: IpAddr,
    ) -> Result<(Arc<ServerConfig>, Arc<Mutex<Decision>>), TlsError> {
        let decision = Arc::new(Mutex::new(Decision::default()));
        let builder = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&self.versions)?;
        let builder = if route.mode == Mode::Off {
            if let Ok(mut d) = decision.lock() {
                d.verdict = Some(Verdict::Allow {
                    matched: "mode off (no client authentication)".into(),
                });
            }
            builder.with_no_client_auth()
        } else {
            let verifier = self.verifier(route, route.mode, source, decision.clone())?;
            builder.with_client_cert_verifier(Arc::new(verifier))
        };
        let mut config = builder.with_cert_resolver(Arc::new(OneCert(self.server_key.clone())));
        // No resumption: a resumed session skips the client-certificate
        // verifier, and with it the route's policy. Every connection proves
        // itself in full.
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        // TLS 1.2 without the extended master secret (RFC 7627) lets a
        // man in the middle synchronise two sessions' keys: refuse it.
        config.require_ems = true;
        config.enable_secret_extraction = self.extract_secrets;
        Ok((Arc::new(config), decision))
    }
}

#[derive(Debug)]
struct OneCert(Arc<CertifiedKey>);

impl ResolvesServerCert for OneCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// TLS towards a route's backends: their CA, the expected name, and our
/// client certificate when they require one.
pub struct UpstreamTls {
    pub connector: tokio_rustls::TlsConnector,
    pub server_name: rustls_pki_types::ServerName<'static>,
    /// The backends' trust anchors, to tell whether a reload changed whom
    /// the gateway accepts as the backend (`verifies_like`).
    anchors: Vec<rustls_pki_types::TrustAnchor<'static>>,
    pub offload: Offload,
    /// As the listener's `rx_expect_no_pad`, for the backend's records.
    pub rx_expect_no_pad: bool,
}

impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl UpstreamTls {
    pub fn load(
        ca: &Path,
        client: Option<(&Path, &Path)>,
        server_name: &str,
        offload: Offload,
    ) -> Result<Self, TlsError> {
        let provider = provider_for(offload)?;
        let roots = certs::load_roots(ca)?;
        let anchors = roots.roots.clone();
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)?
            .with_root_certificates(roots);
        let mut config = match client {
            Some((cert, key)) => {
                let certified = certs::load_client_identity(cert, key, &provider)?;
                builder.with_client_auth_cert(certified.0, certified.1)?
            }
            None => builder.with_no_client_auth(),
        };
        // The keys leave rustls after the handshake on every path.
        config.enable_secret_extraction = true;
        // As towards clients: no TLS 1.2 session without RFC 7627.
        config.require_ems = true;
        let server_name =
            rustls_pki_types::ServerName::try_from(server_name.to_owned()).map_err(|e| {
                TlsError::Verifier {
                    path: ca.display().to_string(),
                    reason: format!("server_name {server_name:?}: {e}"),
                }
            })?;
        Ok(Self {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name,
            anchors,
            offload,
            rx_expect_no_pad: false,
        })
    }
}

impl UpstreamTls {
    /// Whether a backend this verified would pass `other` too: the same
    /// name under the same trust anchors.
    pub fn verifies_like(&self, other: &UpstreamTls) -> bool {
        self.server_name == other.server_name && self.anchors == other.anchors
    }
}

/// A fatal TLS alert as a plaintext record, for refusing before any TLS
/// state exists (unknown SNI: no route, so no config to refuse with).
pub fn plaintext_alert(description: rustls::AlertDescription) -> [u8; 7] {
    // ContentType alert (21), legacy version TLS 1.2, length 2, level fatal (2).
    [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, u8::from(description)]
}

/// Why a re-check refuses a live connection's client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub why: String,
    /// The chain's revocation check refused it (revoked, or no CRL could
    /// vouch for it): what a reload's guard never holds back.
    pub revoked: bool,
}

impl Rejected {
    pub fn other(why: String) -> Rejected {
        Rejected {
            why,
            revoked: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Authority, LeafSpec};
    use rustls_pki_types::pem::PemObject;
    use std::path::PathBuf;

    /// A listener's TLS material on disk: server chain and key, a client CA.
    struct Files {
        dir: tempfile::TempDir,
        intermediate: Authority,
    }

    impl Files {
        fn new() -> Files {
            let dir = tempfile::tempdir().unwrap();
            let root = Authority::root("tls test root").unwrap();
            let intermediate = root.intermediate("tls test intermediate").unwrap();
            let server = intermediate
                .issue(&LeafSpec::server("gw", &["dns:gw.example.internal"]))
                .unwrap();
            let write =
                |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
            write(
                "server.pem",
                &format!("{}{}", server.cert_pem, intermediate.cert_pem),
            );
            write("server.key", &server.key_pem);
            write("ca.pem", &root.cert_pem);
            Files { dir, intermediate }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn load(&self, bundles: &[&str]) -> ListenerTls {
            let files = BundleFiles {
                ca: self.path("ca.pem"),
                crls: vec![],
                crl_expired: crate::config::CrlExpired::Refuse,
                spiffe_trust_domains: None,
            };
            let bundles = bundles
                .iter()
                .map(|n| (n.to_string(), files.clone()))
                .collect();
            ListenerTls::load(
                "edge",
                &self.path("server.pem"),
                &self.path("server.key"),
                &files,
                &bundles,
                &[TlsVersion::Tls13],
                Offload::Userspace,
                &|_, _| Arc::default(),
            )
            .unwrap()
        }
    }

    fn route(trust: Option<&str>, device: bool) -> RouteAuth {
        RouteAuth {
            mode: Mode::Enforce,
            trust: trust.map(str::to_owned),
            device,
            policy: Arc::new(Policy::default()),
        }
    }

    #[test]
    fn a_bundle_name_the_listener_lacks_refuses_instead_of_falling_back() {
        let files = Files::new();
        let tls = files.load(&["users"]);
        let source = IpAddr::from([127, 0, 0, 1]);
        let leaf = files
            .intermediate
            .issue(&LeafSpec::client("c", &["spiffe://example.internal/c"]))
            .unwrap();
        let leaf =
            rustls_pki_types::CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap();
        let intermediate = rustls_pki_types::CertificateDer::from_pem_slice(
            files.intermediate.cert_pem.as_bytes(),
        )
        .unwrap();
        assert!(
            tls.connection_config(&route(Some("users"), false), source)
                .is_ok()
        );
        for auth in [route(Some("nope"), false), route(Some("nope"), true)] {
            let err = tls
                .connection_config(&auth, source)
                .err()
                .unwrap_or_else(|| panic!("{auth:?} got a config"));
            assert!(err.to_string().contains("\"nope\""), "{err}");
            // A reload's re-check refuses too, though the default bundle
            // would have verified this chain.
            let why = tls
                .recheck(&auth, source, &leaf, std::slice::from_ref(&intermediate))
                .expect_err("re-check of a route with an unknown bundle");
            assert!(why.why.contains("\"nope\""), "{}", why.why);
        }
    }
}

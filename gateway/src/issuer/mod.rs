//! `gateway issuer`: single sign-on to short-lived, device-bound client
//! certificates (see docs/sso.md).
//!
//! An enrolled device (mTLS with its device certificate, checked by the
//! gateway's own `tls::Bundle`) brings a user's OIDC ID token and a CSR;
//! the issuer checks the token (`oidc`), that its nonce is one it gave this
//! device (`nonce`), the profile's MFA requirement, maps the claims to the
//! user's names, and signs the CSR with the SSO CA (`pki::store`) for a
//! short lifetime. Every decision is logged and counted.

pub mod config;
pub mod http;
pub mod limit;
pub mod nonce;
pub mod oidc;
pub mod server;
pub mod slots;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::identity::Identity;
use crate::pki::store::{CrlRefresh, Store};
use config::IssuerConfig;
use limit::{Limiter, LogLimiter};
use nonce::{Authentications, NonceError, Nonces, SignIns, UsedTokens};
use oidc::{Claims, KeySource, OidcError, TokenVerifier};

/// How long a nonce handed to a device stays usable: the time a user
/// takes to finish the provider's login and MFA.
pub const NONCE_TTL: Duration = Duration::from_secs(600);

/// Why a request was refused: what the requester is told (HTTP status
/// and message) and the `reason` it is counted under.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(
        "a device certificate is required: connect with the device's certificate (--device-cert)"
    )]
    NoDevice,
    #[error("{0}")]
    Token(#[from] OidcError),
    #[error("{0}")]
    Nonce(#[from] NonceError),
    #[error(
        "MFA required: the ID token's amr {amr:?} has none of {want_amr:?} and its acr {acr:?} is none of {want_acr:?}"
    )]
    NoMfa {
        amr: Vec<String>,
        acr: Option<String>,
        want_amr: Vec<String>,
        want_acr: Vec<String>,
    },
    #[error(
        "the sign-in at the provider was {age:?} ago, more than this profile's max_auth_age {max:?}: sign in again (a token without auth_time counts as too old)"
    )]
    AuthTooOld {
        age: Option<Duration>,
        max: Duration,
    },
    /// A nonce-less ID token (the device grant's) that the user did not
    /// authenticate for just now: a refreshed token looks the same.
    #[error(
        "an ID token without a nonce is taken only from a sign-in the user just authenticated for (device grant), and {0}: sign in again with the device flow"
    )]
    NotFreshSignIn(String),
    #[error(
        "the ID token's auth_time {auth_time} is after now ({now}, seconds since the epoch) by more than the leeway: a sign-in cannot be in the future (check the provider's clock)"
    )]
    AuthInFuture { auth_time: u64, now: u64 },
    #[error("ID token has no verified email (email_verified must be true)")]
    NoVerifiedEmail,
    #[error("user {0:?} is not one this issuer may name (email domain or address not usable)")]
    UserNotMapped(String),
    #[error("too many certificates for {who}: retry in {retry_after:?}")]
    RateLimited {
        who: &'static str,
        retry_after: Duration,
    },
    #[error("lifetime {asked:?} is above this profile's maximum {max:?}")]
    Lifetime { asked: Duration, max: Duration },
    #[error(
        "the device certificate runs out at {device_not_after} (seconds since the epoch), in under a minute: renew the device's enrolment first"
    )]
    DeviceExpiring { device_not_after: i64 },
    /// The SSO store records the device revoked (`gateway pki revoke
    /// --device`), and its certificate is from before.
    #[error("{0}")]
    DeviceRevoked(String),
    #[error(
        "this issuer's profile does not renew with refresh tokens (refresh = false): sign in again with `gateway login`"
    )]
    RefreshNotAllowed,
    #[error("{}", unknown_profile(asked.as_deref(), known))]
    UnknownProfile {
        asked: Option<String>,
        known: Vec<String>,
    },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("certificate signing request refused: {0}")]
    Csr(String),
    #[error(
        "the CSR's key is {0}: the issuer signs only ECDSA P-256 or P-384, Ed25519, or RSA of at least {MIN_RSA_BITS} bits; make the key with `gateway login` (P-256) or one of those"
    )]
    CsrKey(String),
    #[error("issuing failed: {0}")]
    Internal(String),
    /// The store's lock stayed held past `LOCK_WAIT` (an operator's long
    /// command, or worse): refused rather than queued without bound.
    #[error("the CA is busy, try again shortly: {0}")]
    Busy(String),
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoDevice => "no_device_certificate",
            Refusal::Token(e) => e.reason(),
            // `/v1/nonce`'s own refusal, apart from a token's `nonce` (its
            // log lines too: see `refused`).
            Refusal::Nonce(NonceError::TooMany) => "nonce_quota",
            Refusal::Nonce(_) => "nonce",
            Refusal::NoMfa { .. } => "no_mfa",
            Refusal::AuthTooOld { .. } => "auth_too_old",
            Refusal::NotFreshSignIn(_) => "not_fresh_sign_in",
            Refusal::AuthInFuture { .. } => "auth_time_in_future",
            Refusal::NoVerifiedEmail | Refusal::UserNotMapped(_) => "user_not_mapped",
            Refusal::RateLimited { .. } => "rate_limited",
            Refusal::Lifetime { .. } => "lifetime",
            Refusal::DeviceExpiring { .. } => "device_expiring",
            Refusal::DeviceRevoked(_) => "device_revoked",
            Refusal::RefreshNotAllowed => "refresh_not_allowed",
            Refusal::UnknownProfile { .. } => "unknown_profile",
            Refusal::BadRequest(_) => "bad_request",
            Refusal::Csr(_) => "csr",
            Refusal::CsrKey(_) => "csr_key",
            Refusal::Internal(_) => "internal",
            Refusal::Busy(_) => "store_busy",
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            Refusal::NoDevice => 401,
            Refusal::RateLimited { .. } => 429,
            Refusal::BadRequest(_)
            | Refusal::UnknownProfile { .. }
            | Refusal::Csr(_)
            | Refusal::CsrKey(_)
            | Refusal::Lifetime { .. } => 400,
            Refusal::Token(OidcError::Fetch(_)) => 502,
            Refusal::Internal(_) => 500,
            Refusal::Busy(_) => 503,
            _ => 403,
        }
    }
}

/// What `Refusal::UnknownProfile` tells the requester: which profiles
/// there are, and how to pick one. A name the requester made up is
/// quoted, and cut short.
fn unknown_profile(asked: Option<&str>, known: &[String]) -> String {
    let known = known.join(", ");
    match asked {
        Some(a) => {
            let a: String = a.chars().take(40).collect();
            format!(
                "no profile {a:?} on this issuer (it has: {known}): name one of them with `gateway login --profile`"
            )
        }
        None => format!(
            "this issuer has no default profile: name one with `gateway login --profile` (it has: {known})"
        ),
    }
}

/// How the ID token was obtained, by the endpoint it came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// `POST /v1/certificate`: the user signed in just now, with a nonce
    /// this issuer gave the device (or, with `device_grant`, none).
    SignIn,
    /// `POST /v1/renewal`: `gateway login --renew` traded its refresh
    /// token for this ID token, with no one at the provider; it carries
    /// the nonce of the sign-in it continues (see `nonce::SignIns`).
    Refresh,
}

impl Grant {
    /// For the issuance log line.
    pub fn name(self) -> &'static str {
        match self {
            Grant::SignIn => "sign_in",
            Grant::Refresh => "refresh",
        }
    }
}

/// `POST /v1/certificate` and `POST /v1/renewal`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateRequest {
    pub id_token: String,
    /// PEM. Only its key is used.
    pub csr: String,
    /// Shorter than the profile's default, or longer up to its maximum
    /// ("4h"); none: the default.
    #[serde(default)]
    pub lifetime: Option<String>,
}

/// The answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertificateResponse {
    /// Leaf then intermediate, PEM.
    pub certificate: String,
    /// The SSO CA's root, PEM (what `openssl s_client -CAfile` wants to
    /// check the chain).
    pub ca: String,
    pub serial: String,
    /// RFC 3339.
    pub not_after: String,
    pub sans: Vec<String>,
    /// The profile it was signed under (also its subject's OU).
    #[serde(default)]
    pub profile: String,
    /// Whether refreshed ID tokens may continue this sign-in
    /// (`POST /v1/renewal`): the profile renews so, and the sign-in was
    /// remembered (it carried this issuer's nonce). `gateway login` keeps
    /// a refresh token only then. Absent from older issuers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewable: Option<bool>,
}

/// One profile's issuances and refusals.
#[derive(Debug, Default, Clone)]
pub struct ProfileCounters {
    pub issued: u64,
    pub refreshed: u64,
    pub refused: BTreeMap<&'static str, u64>,
}

/// The profile label of a refusal decided before the request's profile
/// was known (no device certificate, an unknown profile): never a name
/// the requester sent, so labels stay the configured ones.
pub const NO_PROFILE: &str = "-";

/// Issuances, refusals and the CRL's re-signing, for `/metrics`.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    /// By profile (`NO_PROFILE` for refusals before one was known); the
    /// totals below sum them.
    pub by_profile: BTreeMap<String, ProfileCounters>,
    pub issued: u64,
    /// Of `issued`, those on a refreshed ID token (`Grant::Refresh`).
    pub refreshed: u64,
    pub refused: BTreeMap<&'static str, u64>,
    pub nonces: u64,
    /// The SSO CA's CRL re-signed (`maintain_crl`).
    pub crl_published: u64,
    /// Re-signing it failed (retried at the next check).
    pub crl_publish_failures: u64,
    /// Index entries dropped, expired more than `index_retention` ago.
    pub index_pruned: u64,
    /// `issuer.toml` read again and put in service (SIGHUP).
    pub config_reloads: u64,
    /// A new `issuer.toml` refused (unreadable, invalid, or a change that
    /// takes a restart); the previous one stayed in service.
    pub config_reload_failures: u64,
    /// Waits for the store's lock that ran out (`LOCK_WAIT`), by a
    /// sign-in or a CRL check: someone held it far longer than a change.
    pub store_lock_timeouts: u64,
    /// Refusals counted in `refused` but not logged: past `LogLimiter`'s
    /// lines for their device and reason.
    pub refusals_unlogged: u64,
    /// The root revoked the intermediate the issuer signs with, as the
    /// last CRL check read the store: every sign-in is refused (500).
    pub intermediate_revoked: bool,
}

pub struct Issuer {
    /// Swapped whole on SIGHUP (`replace_config`); each request reads it
    /// once and decides on that one.
    config: arc_swap::ArcSwap<IssuerConfig>,
    tokens: TokenVerifier,
    nonces: Nonces,
    /// Tokens taken without a nonce to consume (with `profile.device_grant`,
    /// and refreshed ones), and, with `profile.refresh`, every token taken,
    /// so a sign-in's own token is not taken again as a renewal.
    used: UsedTokens,
    /// Sign-ins a refreshed token may continue (with `profile.refresh`).
    sign_ins: SignIns,
    /// Recent sign-ins' `sub` and `auth_time`: a nonce-less token naming
    /// one is a refresh of it (`fresh_sign_in`).
    authentications: Authentications,
    per_user: Limiter,
    per_device: Limiter,
    /// The refusal log lines, per device and reason (see `LogLimiter`).
    refusal_lines: LogLimiter,
    /// One signer at a time (the index is read, extended and rewritten)
    /// by the store's own lock, across processes and threads alike: no
    /// Mutex here, which a sign-in would wait on inside the runtime.
    store: Store,
    ca_pem: String,
    counters: Mutex<Counters>,
    /// The listener's connection slots (`server::serve`), here so
    /// `/metrics` reports their refusals.
    pub(crate) slots: slots::Slots,
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The smallest RSA key the issuer signs for: `gateway pki`'s own RSA
/// keys are 2048 bits (`KeyType::Rsa2048`), as is the floor of the
/// gateway's TLS stack (rustls/webpki verify RSA from 2048 bits).
pub const MIN_RSA_BITS: usize = 2048;

/// The CSR's key is one the issuer signs for: ECDSA on P-256 or P-384,
/// Ed25519, or RSA of at least `MIN_RSA_BITS`. The issuer decides every
/// name in the certificate, but the key is the requester's: a weak one
/// (RSA-1024) or one the gateway's verifier cannot use (P-521,
/// secp256k1) would make a certificate that is forgeable or useless.
/// Returns the key's kind for the log.
fn csr_key(csr_pem: &str) -> Result<String, Refusal> {
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::oid_registry as oid;
    use x509_parser::prelude::FromDer as _;
    let bad = |what: &str| Refusal::Csr(format!("not a PEM certificate request: {what}"));
    // Exactly one block, read as the signer reads it (`pki::csr_der`).
    let der = crate::pki::csr_der(csr_pem).map_err(|e| bad(&e))?;
    let (_, csr) = X509CertificationRequest::from_der(&der).map_err(|e| bad(&e.to_string()))?;
    let spki = &csr.certification_request_info.subject_pki;
    let alg = &spki.algorithm.algorithm;
    if *alg == oid::OID_SIG_ED25519 {
        return Ok("Ed25519".into());
    }
    if *alg == oid::OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.clone().oid().ok());
        return match curve {
            Some(c) if c == oid::OID_EC_P256 => Ok("ECDSA P-256".into()),
            Some(c) if c == oid::OID_NIST_EC_P384 => Ok("ECDSA P-384".into()),
            Some(c) => Err(Refusal::CsrKey(format!("ECDSA on the curve {c}"))),
            None => Err(Refusal::CsrKey("ECDSA without a named curve".into())),
        };
    }
    if *alg == oid::OID_PKCS1_RSAENCRYPTION {
        let Ok(x509_parser::public_key::PublicKey::RSA(rsa)) = spki.parsed() else {
            return Err(Refusal::CsrKey("an RSA key that does not parse".into()));
        };
        // The modulus' bits, leading zero bytes (DER's sign byte) aside.
        let modulus = rsa
            .modulus
            .iter()
            .position(|&b| b != 0)
            .and_then(|i| rsa.modulus.get(i..))
            .unwrap_or_default();
        let bits = modulus.first().map_or(0, |&top| {
            (modulus.len() - 1) * 8 + (8 - top.leading_zeros() as usize)
        });
        return if bits >= MIN_RSA_BITS {
            Ok(format!("RSA-{bits}"))
        } else {
            Err(Refusal::CsrKey(format!("RSA of {bits} bits")))
        };
    }
    Err(Refusal::CsrKey(format!("of the algorithm {alg}")))
}

/// The user's names from the token's verified email, by the profile's rules.
fn user_sans(profile: &config::Profile, claims: &Claims) -> Result<Vec<String>, Refusal> {
    let email = match (&claims.email, claims.email_verified) {
        (Some(e), Some(true)) => e,
        _ => return Err(Refusal::NoVerifiedEmail),
    };
    let not_mapped = || Refusal::UserNotMapped(email.clone());
    let (local, domain) = email.rsplit_once('@').ok_or_else(not_mapped)?;
    // One spelling per user: routes compare `email:` and URIs exactly
    // (the local part with its case, as RFC 5321 allows), and providers
    // hand out `Alice@` and `alice@` for one mailbox; the issuer owns the
    // mapping, so it names every user in lower case (a `deny` rule or
    // per-user limit for alice is not dodged by the provider's spelling).
    let local = local.to_ascii_lowercase();
    let local = local.as_str();
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    if !profile
        .email_domains
        .iter()
        .any(|d| d.trim_end_matches('.').eq_ignore_ascii_case(&domain))
    {
        return Err(not_mapped());
    }
    // Only names a route's rule can be written for: a plain local part
    // that is also a SPIFFE path segment, so the email and the user URI
    // name the same person one way each.
    let plain = !local.is_empty()
        && local
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..");
    if !plain {
        return Err(not_mapped());
    }
    let mut sans = vec![format!("email:{local}@{domain}")];
    if let Some(t) = &profile.user_uri {
        let uri = t.replace("{local}", local).replace("{domain}", &domain);
        crate::spiffe::SpiffeId::parse(&uri).map_err(|_| not_mapped())?;
        sans.push(uri);
    }
    // Only listed groups, each once, in the profile's order (checked as
    // SPIFFE IDs when the config was read).
    if let Some(t) = &profile.group_uri {
        for g in profile.groups.iter().filter(|g| claims.groups.contains(g)) {
            sans.push(t.replace("{group}", g));
        }
    }
    Ok(sans)
}

/// A nonce-less ID token names no sign-in of this issuer, so on its own it
/// cannot be told from a refreshed one (a provider that leaves the nonce
/// out of refreshed tokens, or a refresh token of a device-grant sign-in):
/// taken as a sign-in, a stolen refresh token would sign its thief in on
/// any enrolled device, under any device-grant profile, after restarts.
/// A refreshed token keeps the original `auth_time` (OIDC Core §12.2); a
/// device-grant sign-in's is when the user authenticated for it
/// (`gateway login --device-flow` asks `max_age=0`), minutes before the
/// token's `iat` at most. So the token must carry `auth_time`, no more
/// than `max_token_age` (and the leeway) before its `iat`; the caller also
/// refuses one whose `sub` and `auth_time` a sign-in taken within those
/// minutes had (`Authentications`).
fn fresh_sign_in(claims: &Claims, within: Duration, leeway: Duration) -> Result<u64, Refusal> {
    let Some(auth_time) = claims.auth_time else {
        return Err(Refusal::NotFreshSignIn(
            "this one has no auth_time to tell when".into(),
        ));
    };
    let before = claims.iat.saturating_sub(auth_time);
    if before > within.as_secs().saturating_add(leeway.as_secs()) {
        return Err(Refusal::NotFreshSignIn(format!(
            "this one's user authenticated {before} s before it was issued (more than max_token_age {within:?}): a refreshed token, or a provider session reused"
        )));
    }
    Ok(auth_time)
}

/// The profile `asked` names in `config` (none: `default`), or why not.
pub fn profile_of<'a>(
    config: &'a IssuerConfig,
    asked: Option<&str>,
) -> Result<(&'a str, &'a config::Profile), Refusal> {
    config
        .profile
        .get(asked)
        .ok_or_else(|| Refusal::UnknownProfile {
            asked: asked.map(str::to_owned),
            known: config
                .profile
                .names()
                .into_iter()
                .map(str::to_owned)
                .collect(),
        })
}

/// An `auth_time` no later than now and `leeway` (the clock skew allowed
/// on `iat` and `nbf`). A later one is refused whatever the profile: its
/// age would count as 0, so it passed `max_auth_age` however long the
/// provider's clock (or a token crafted with it) put it ahead, and a
/// sign-in remembered for renewal with it stayed young for as long.
fn auth_time_not_in_future(auth_time: Option<u64>, leeway: Duration) -> Result<(), Refusal> {
    let now = jsonwebtoken::get_current_timestamp();
    match auth_time {
        Some(t) if t > now.saturating_add(leeway.as_secs()) => {
            Err(Refusal::AuthInFuture { auth_time: t, now })
        }
        _ => Ok(()),
    }
}

/// With `max_auth_age`: the user authenticated (and did the MFA the token
/// reports) within it. `amr`/`acr` say how, not when: a provider session
/// signed into weeks ago completes a sign-in silently.
/// `auth_time` is the token's, or on renewal the sign-in's.
fn auth_age(
    profile: &config::Profile,
    auth_time: Option<u64>,
    leeway: Duration,
) -> Result<(), Refusal> {
    auth_time_not_in_future(auth_time, leeway)?;
    let Some(max) = profile.max_auth_age else {
        return Ok(());
    };
    let now = jsonwebtoken::get_current_timestamp();
    let age = auth_time.map(|t| Duration::from_secs(now.saturating_sub(t)));
    match age {
        Some(age) if age <= max + leeway => Ok(()),
        age => Err(Refusal::AuthTooOld { age, max }),
    }
}

fn mfa(profile: &config::Profile, claims: &Claims) -> Result<(), Refusal> {
    if profile.require_amr.is_empty() && profile.require_acr.is_empty() {
        return Ok(());
    }
    let amr = claims.amr.clone().unwrap_or_default();
    let by_amr = amr.iter().any(|m| profile.require_amr.contains(m));
    let by_acr = claims
        .acr
        .as_ref()
        .is_some_and(|a| profile.require_acr.contains(a));
    if by_amr || by_acr {
        Ok(())
    } else {
        Err(Refusal::NoMfa {
            amr,
            acr: claims.acr.clone(),
            want_amr: profile.require_amr.clone(),
            want_acr: profile.require_acr.clone(),
        })
    }
}

impl Issuer {
    /// The issuer for `config`; `keys` is where the provider's JWKS comes
    /// from (`http::ProviderKeys` in service).
    pub fn new(config: IssuerConfig, keys: Box<dyn KeySource>) -> Result<Issuer, Refusal> {
        let store = Store::open(&config.ca_dir);
        // Fail at start, not at the first user: the CA must be there.
        store
            .index()
            .map_err(|e| Refusal::Internal(format!("ca_dir: {e}")))?;
        // And no other local user may hold its lock (see `Store::lock`).
        store
            .check_lock_private()
            .map_err(|e| Refusal::Internal(format!("ca_dir: {e}")))?;
        // The key that signs every user certificate: one others can read
        // has left the issuer's hands (as the gateway refuses for its own).
        if !config.allow_shared_keys {
            crate::tls::certs::check_key_private(&store.path("intermediate.key"))
                .map_err(|e| Refusal::Internal(format!("ca_dir: {e}")))?;
        }
        // As a store file, and its certificates only (S7-5).
        let ca_pem = store
            .ca_pem()
            .map_err(|e| Refusal::Internal(format!("ca_dir: {e}")))?;
        Ok(Issuer {
            tokens: TokenVerifier::new(&config.oidc, keys),
            nonces: Nonces::new(NONCE_TTL),
            used: UsedTokens::new(config.oidc.max_token_age + config.oidc.leeway * 2),
            sign_ins: SignIns::default(),
            // A refresh passes `fresh_sign_in` while its `iat` is within
            // `max_token_age` (and the leeway) of the sign-in's
            // `auth_time`, and is taken while that `iat` is no older than
            // `max_token_age` (and the leeway): held that long, both ways.
            authentications: Authentications::new(
                config.oidc.max_token_age * 2 + config.oidc.leeway * 3,
            ),
            per_user: Limiter::new(config.limits.per_user),
            per_device: Limiter::new(config.limits.per_device),
            refusal_lines: LogLimiter::default(),
            store,
            ca_pem,
            counters: Mutex::new(Counters::default()),
            slots: slots::Slots::default(),
            config: arc_swap::ArcSwap::from_pointee(config),
        })
    }

    /// The config in service (a copy: a SIGHUP may replace it meanwhile).
    pub fn config(&self) -> IssuerConfig {
        (*self.config.load_full()).clone()
    }

    /// The config in service, shared: what a request decides on.
    pub fn current_config(&self) -> std::sync::Arc<IssuerConfig> {
        self.config.load_full()
    }

    /// Puts `new` in service (SIGHUP, after `IssuerConfig::check_reload`
    /// and the new TLS acceptor were accepted): the next request decides
    /// on it. Logged and counted.
    pub fn replace_config(&self, new: IssuerConfig) {
        let profiles = new.profile.names().join(", ");
        self.config.store(std::sync::Arc::new(new));
        self.count(|c| c.config_reloads += 1);
        tracing::info!(target: "gateway::issuer", event = "config_reloaded", profiles,
            "issuer.toml read again and in service");
    }

    /// A new config that was not put in service: logged and counted; the
    /// one in service stays.
    pub fn config_reload_failed(&self, error: &dyn std::fmt::Display) {
        self.count(|c| c.config_reload_failures += 1);
        tracing::error!(target: "gateway::issuer", event = "config_reload_failed", error = %error,
            "issuer.toml not reloaded; the previous config stays in service");
    }

    fn count(&self, f: impl FnOnce(&mut Counters)) {
        f(&mut self.counters.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> Counters {
        self.counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-signs the SSO CA's CRL when it is due (`crl_republish_before`),
    /// as `Store::refresh_crl` decides under the store's lock. `gateway
    /// issuer` calls it at start, on SIGHUP and every minute, so a failure (a full
    /// disk, an unreadable key, the lock held) is retried a minute later;
    /// each is logged and counted, never dropped.
    pub fn maintain_crl(&self) -> Result<CrlRefresh, crate::pki::PkiError> {
        let config = self.current_config();
        let result = {
            self.store.refresh_crl(
                time::Duration::try_from(config.crl_next_update).unwrap_or(time::Duration::days(7)),
                time::Duration::try_from(config.crl_republish_before)
                    .unwrap_or(time::Duration::days(6)),
                time::Duration::try_from(config.index_retention)
                    .unwrap_or(time::Duration::days(30)),
            )
        };
        match &result {
            Ok(CrlRefresh::Fresh { .. }) => {}
            Ok(CrlRefresh::RootPublished {
                revoked_intermediates,
            }) => {
                self.count(|c| c.crl_published += 1);
                tracing::warn!(target: "gateway::issuer", event = "root_crl_published",
                    revoked_intermediates,
                    "crl.pem lacked the root's revocation of the intermediate: published now, beside the intermediate's CRL as it was");
            }
            Ok(CrlRefresh::Published {
                crl_number,
                next_update,
                revoked,
                pruned,
            }) => {
                self.count(|c| {
                    c.crl_published += 1;
                    c.index_pruned += *pruned as u64;
                });
                tracing::info!(target: "gateway::issuer", event = "crl_published",
                    crl_number, next_update = %rfc3339(*next_update), revoked, pruned,
                    "the SSO CA's CRL re-signed");
            }
            Err(e) => {
                self.count(|c| {
                    c.crl_publish_failures += 1;
                    if matches!(e, crate::pki::PkiError::Locked { .. }) {
                        c.store_lock_timeouts += 1;
                    }
                });
                tracing::error!(target: "gateway::issuer", event = "crl_publish_failed",
                    error = %e, "re-signing the SSO CA's CRL failed; retried in a minute");
            }
        }
        self.note_intermediate_revoked();
        result
    }

    /// Says once, at the first check that sees it (and at start), that the
    /// root revoked the intermediate: every sign-in fails from then on, a
    /// 500 each, and an operator alerting on one line or a gauge
    /// (`gateway_issuer_intermediate_revoked`) learns why at once. A store
    /// that cannot be read leaves the state as it was (the CRL check logs
    /// that failure itself).
    fn note_intermediate_revoked(&self) {
        let Ok(revoked) = self.store.intermediate_revoked() else {
            return;
        };
        let was = self.counters().intermediate_revoked;
        self.count(|c| c.intermediate_revoked = revoked.is_some());
        if let Some(serial) = revoked
            && !was
        {
            tracing::error!(target: "gateway::issuer", event = "intermediate_revoked", serial,
                "the root revoked the SSO intermediate this issuer signs with: every sign-in is refused \
                 until a new SSO CA is set up (docs/sso.md, \"The SSO CA's CRL\")");
        }
    }

    /// The device's name from its verified certificate.
    fn device<'a>(&self, device: Option<&'a Identity>) -> Result<&'a str, Refusal> {
        self.device_id(device).map(|(_, name)| name)
    }

    /// The device's certificate and name.
    fn device_id<'a>(
        &self,
        device: Option<&'a Identity>,
    ) -> Result<(&'a Identity, &'a str), Refusal> {
        device
            .and_then(|d| {
                let prefix = &self.config.load().device_san_prefix;
                Some((d, d.device(prefix)?))
            })
            .ok_or(Refusal::NoDevice)
    }

    /// `POST /v1/nonce`. A nonce handed out costs nothing (a device holds
    /// at most a few), but a refusal (`nonce_quota`) takes from the
    /// device's rate like any other refusal it can repeat: a device asking
    /// on and on is stopped at its rate (`rate_limited`).
    pub fn nonce(&self, device: Option<&Identity>) -> Result<String, Refusal> {
        let result = self.device(device).and_then(|d| {
            self.nonces.issue(d).or_else(|e| {
                self.per_device
                    .take(d, Instant::now())
                    .map_err(|retry_after| Refusal::RateLimited {
                        who: "this device",
                        retry_after,
                    })?;
                Err(e.into())
            })
        });
        match &result {
            Ok(_) => self.count(|c| c.nonces += 1),
            Err(e) => self.refused(e, device, None, NO_PROFILE),
        }
        result
    }

    /// A refusal decided before `issue` (by the server, e.g. no device
    /// certificate): logged and counted the same way.
    pub fn refused_early(&self, e: &Refusal) {
        self.refused(e, None, None, NO_PROFILE);
    }

    fn refused(&self, e: &Refusal, device: Option<&Identity>, user: Option<&str>, profile: &str) {
        let reason = e.reason();
        self.count(|c| {
            *c.refused.entry(reason).or_default() += 1;
            *c.by_profile
                .entry(profile.to_owned())
                .or_default()
                .refused
                .entry(reason)
                .or_default() += 1;
        });
        let device = device
            .and_then(|d| d.device(&self.config.load().device_san_prefix))
            .unwrap_or("-");
        // Counted above whatever happens; logged within the device's
        // lines for this reason (a refusal without a device shares "-"),
        // and once a token is verified, the user's: refusals that name no
        // user (or another) cannot spend the lines of one that names its
        // victim.
        let key = match user {
            Some(user) => format!("{device}|{user}|{reason}"),
            None => format!("{device}|{reason}"),
        };
        let Some(unlogged) = self.refusal_lines.admit(&key, Instant::now()) else {
            self.count(|c| c.refusals_unlogged += 1);
            return;
        };
        tracing::warn!(target: "gateway::issuer", event = "refused", reason, device,
            user = user.unwrap_or("-"), profile, unlogged, error = %e, "certificate refused");
    }

    /// `POST /v1/certificate`: the whole decision, then the signature.
    pub async fn issue(
        &self,
        device: Option<&Identity>,
        req: CertificateRequest,
    ) -> Result<CertificateResponse, Refusal> {
        self.issue_as(device, req, Grant::SignIn, None).await
    }

    /// `POST /v1/certificate` (`Grant::SignIn`) or `POST /v1/renewal`
    /// (`Grant::Refresh`), under the profile the request names
    /// (`?profile=NAME`; none: `default`): the same decision, but for how
    /// the token's replay is stopped, by that profile's rules.
    pub async fn issue_as(
        &self,
        device: Option<&Identity>,
        req: CertificateRequest,
        grant: Grant,
        profile: Option<&str>,
    ) -> Result<CertificateResponse, Refusal> {
        let mut user = None;
        let mut named = None;
        let result = self
            .issue_inner(device, req, grant, profile, &mut user, &mut named)
            .await;
        if let Err(e) = &result {
            self.refused(
                e,
                device,
                user.as_deref(),
                named.as_deref().unwrap_or(NO_PROFILE),
            );
        }
        result
    }

    async fn issue_inner(
        &self,
        device: Option<&Identity>,
        req: CertificateRequest,
        grant: Grant,
        asked: Option<&str>,
        user: &mut Option<String>,
        named: &mut Option<String>,
    ) -> Result<CertificateResponse, Refusal> {
        let config = self.current_config();
        let (device_cert, device) = self.device_id(device)?;
        let profile = profile_of(&config, asked);
        if let Ok((name, _)) = &profile {
            *named = Some((*name).to_owned());
        }
        // The device's bucket before anything else a device can repeat
        // cheaply to be refused (an unknown profile, a lifetime over the
        // maximum), and before any work on the token: a device that
        // floods is stopped at its rate.
        self.per_device
            .take(device, Instant::now())
            .map_err(|retry_after| Refusal::RateLimited {
                who: "this device",
                retry_after,
            })?;
        let (profile_name, profile) = profile?;
        if grant == Grant::Refresh && !profile.refresh {
            return Err(Refusal::RefreshNotAllowed);
        }
        let lifetime = match &req.lifetime {
            None => profile.default_lifetime,
            Some(l) => crate::config::duration::parse(l).map_err(Refusal::BadRequest)?,
        };
        if lifetime > profile.max_lifetime {
            return Err(Refusal::Lifetime {
                asked: lifetime,
                max: profile.max_lifetime,
            });
        }
        if lifetime < Duration::from_secs(60) {
            return Err(Refusal::BadRequest("lifetime under a minute".into()));
        }
        let claims = self.tokens.verify(&req.id_token).await?;
        *user = claims.email.clone().or(Some(claims.sub.clone()));
        // Replay: a sign-in's token uses up its nonce; a refreshed token's
        // nonce was used by the sign-in it continues, which must be this
        // device's and this user's, and the token itself is taken once,
        // by what the provider signed (as a nonce-less device-grant one).
        // A refreshed token always needs its nonce, `device_grant` or not:
        // without one it names no sign-in, and would renew on any device,
        // under any profile, after a restart.
        // On renewal, the MFA's age is the sign-in's `auth_time` as the
        // issuer checked it (or the token's, if earlier), never a later one
        // a refreshed token claims.
        let mut auth_time = claims.auth_time;
        match (grant, claims.nonce.as_deref()) {
            (Grant::Refresh, nonce) => {
                let signed_in = self
                    .sign_ins
                    .check(nonce, device, &claims.sub, profile_name)?;
                auth_time = Some(auth_time.map_or(signed_in, |t| t.min(signed_in)));
                self.used.first_use(&req.id_token)?;
            }
            (Grant::SignIn, None) if profile.device_grant => {
                let at = fresh_sign_in(&claims, config.oidc.max_token_age, config.oidc.leeway)?;
                // Within those minutes: a refresh of a sign-in this issuer
                // took (any sign-in, with a nonce or without) keeps that
                // sign-in's `auth_time`, as the provider wrote it.
                // The token itself first: one taken before is a replay.
                self.used.first_use(&req.id_token)?;
                if self.authentications.taken(&claims.sub, at) {
                    return Err(Refusal::NotFreshSignIn(
                        "this one has the user and authentication time of a sign-in this issuer took minutes ago: a refreshed token, or a second sign-in on one provider session (sign in afresh at the provider: log out there, or let it ask again)".into(),
                    ));
                }
                self.authentications.record(&claims.sub, at);
            }
            (Grant::SignIn, nonce) => {
                self.nonces.consume(nonce, device)?;
                if profile.refresh {
                    self.used.first_use(&req.id_token)?;
                }
                if let Some(at) = claims.auth_time {
                    self.authentications.record(&claims.sub, at);
                }
            }
        }
        mfa(profile, &claims)?;
        // The token's own `auth_time` too: on renewal `auth_time` is the
        // earlier of it and the sign-in's, which would hide a later one.
        auth_time_not_in_future(claims.auth_time, config.oidc.leeway)?;
        auth_age(profile, auth_time, config.oidc.leeway)?;
        let mut sans = user_sans(profile, &claims)?;
        let email = sans.first().cloned().unwrap_or_default();
        *user = Some(email.clone());
        self.per_user
            .take(&email, Instant::now())
            .map_err(|retry_after| Refusal::RateLimited {
                who: "this user",
                retry_after,
            })?;
        // The email SAN only from the one profile that issues it (config:
        // no two profiles issue the same name); the others' CN names their
        // profile too, so a `cn:` rule written for the email matches none.
        let cn = if profile.email_san {
            email.trim_start_matches("email:").to_owned()
        } else {
            sans.retain(|s| *s != email);
            format!("{profile_name}:{}", email.trim_start_matches("email:"))
        };
        sans.push(device.to_owned());
        let life =
            time::Duration::try_from(lifetime).map_err(|e| Refusal::Internal(e.to_string()))?;
        // Device-bound means no longer than the device: a certificate
        // carrying the device's SAN past the device's own notAfter would
        // keep passing routes' `device.trust` after the enrolment ended.
        let now = time::OffsetDateTime::now_utc();
        let now = now.replace_nanosecond(0).unwrap_or(now);
        let device_end = time::OffsetDateTime::from_unix_timestamp(device_cert.not_after)
            .map_err(|e| Refusal::Internal(format!("device notAfter: {e}")))?;
        let not_after = (now + life).min(device_end);
        if not_after - now < time::Duration::minutes(1) {
            return Err(Refusal::DeviceExpiring {
                device_not_after: device_cert.not_after,
            });
        }
        let key = csr_key(&req.csr)?;
        let bound = crate::pki::store::BoundDevice {
            uri: device.to_owned(),
            serial: device_cert.serial.replace(':', "").to_ascii_lowercase(),
            not_before: device_cert.not_before,
        };
        // Off the runtime: the store's lock may be waited for (up to
        // `LOCK_WAIT`), and a blocked worker serves no one else.
        let store = self.store.clone();
        let (cn_, csr_, sans_, profile_) = (
            cn.clone(),
            req.csr.clone(),
            sans.clone(),
            profile_name.to_owned(),
        );
        let signed = tokio::task::spawn_blocking(move || {
            store.sign_user_request(
                &cn_,
                &csr_,
                &sans_,
                not_after,
                Some(&bound),
                Some(&profile_),
            )
        })
        .await
        .map_err(|e| Refusal::Internal(format!("signing: {e}")))?;
        let (chain, entry) = signed.map_err(|e| match e {
            crate::pki::PkiError::Rcgen(e) => Refusal::Csr(e.to_string()),
            e @ crate::pki::PkiError::DeviceRevoked { .. } => Refusal::DeviceRevoked(e.to_string()),
            crate::pki::PkiError::Locked { .. } => {
                self.count(|c| c.store_lock_timeouts += 1);
                Refusal::Busy(e.to_string())
            }
            other => Refusal::Internal(other.to_string()),
        })?;
        self.count(|c| {
            let p = c.by_profile.entry(profile_name.to_owned()).or_default();
            p.issued += 1;
            c.issued += 1;
            if grant == Grant::Refresh {
                p.refreshed += 1;
                c.refreshed += 1;
            }
        });
        // A sign-in that issued may be continued by refreshed tokens from
        // this device, while `max_auth_age` allows (checked again on each,
        // against this sign-in's `auth_time`): held until then, no longer.
        let mut renewable = grant == Grant::Refresh;
        if profile.refresh
            && grant == Grant::SignIn
            && let (Some(nonce), Some(max), Some(auth_time)) = (
                claims.nonce.as_deref(),
                profile.max_auth_age,
                claims.auth_time,
            )
        {
            // Within the leeway but ahead of this clock: remembered as
            // now, so renewals end no later than `max_auth_age` from here.
            let auth_time = auth_time.min(jsonwebtoken::get_current_timestamp());
            let until = auth_time
                .saturating_add(max.as_secs())
                .saturating_add(config.oidc.leeway.as_secs());
            let left =
                Duration::from_secs(until.saturating_sub(jsonwebtoken::get_current_timestamp()));
            renewable = self.sign_ins.record(
                nonce,
                device,
                &claims.sub,
                profile_name,
                auth_time,
                left.min(max + config.oidc.leeway),
            );
        }
        // One JSON line per issuance (with `--log-format json`): who, from
        // which device, on which claims, which serial, for how long.
        tracing::info!(target: "gateway::issuer", event = "issued",
            user = %cn, device, profile = profile_name, grant = grant.name(), sub = %claims.sub, iss = %claims.iss,
            amr = ?claims.amr.clone().unwrap_or_default(), acr = claims.acr.as_deref().unwrap_or("-"),
            serial = %entry.serial, not_after = %entry.not_after, key,
            lifetime_secs = (not_after - now).whole_seconds(), sans = ?sans, "certificate issued");
        Ok(CertificateResponse {
            certificate: chain,
            ca: self.ca_pem.clone(),
            serial: entry.serial,
            not_after: entry.not_after,
            sans,
            profile: profile_name.to_owned(),
            renewable: Some(renewable && profile.refresh),
        })
    }
}

#[cfg(test)]
mod tests;

//! OpenID Connect ID tokens, checked with `jsonwebtoken` against the
//! provider's JWKS: signature (asymmetric algorithms only), a `typ` of
//! `JWT` or none, `iss`, `aud` (and `azp` when there are several audiences
//! or it is present at all), `exp` and `nbf` with a
//! small leeway, and an `iat` not older than the token is meant to live
//! before it is exchanged. Nonce, MFA and the mapping to an identity are
//! the issuer's rules on the claims this returns (see `issuer::decide`).
//!
//! Keys rotate: a token whose `kid` the cached JWKS lacks refetches it, at
//! most once per `refetch_interval`, so a flood of made-up `kid`s costs
//! the provider one request per interval, not one per token.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("ID token is not a signed JWT: {0}")]
    Malformed(String),
    #[error("ID token algorithm {0:?} is not accepted (asymmetric signatures only)")]
    Algorithm(Algorithm),
    #[error("ID token header has no kid")]
    NoKeyId,
    #[error("ID token signed with key {0:?}, which the provider's JWKS does not hold")]
    UnknownKey(String),
    #[error("ID token key {kid:?} is for {key}, not {alg:?}")]
    KeyMismatch {
        kid: String,
        key: String,
        alg: Algorithm,
    },
    #[error("fetching the provider's keys: {0}")]
    Fetch(String),
    #[error("ID token signature does not verify")]
    Signature,
    #[error("ID token expired")]
    Expired,
    #[error("ID token not valid yet (nbf)")]
    NotYetValid,
    #[error("ID token issued at {iat}, more than {max:?} ago")]
    TooOld { iat: u64, max: Duration },
    #[error("ID token issued in the future (iat {0})")]
    IssuedInFuture(u64),
    #[error("ID token issuer is not the configured provider")]
    Issuer,
    #[error("ID token audience does not contain the client id")]
    Audience,
    #[error("ID token azp {0:?} is not the client id (a token issued to another client)")]
    AuthorizedParty(Option<String>),
    #[error("JWT type {0:?} is not an ID token")]
    Type(String),
    #[error("ID token lacks the claim {0}")]
    MissingClaim(String),
    #[error("ID token claims unreadable: {0}")]
    Claims(String),
}

impl OidcError {
    /// The `reason` label of `gateway_issuer_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            OidcError::Malformed(_) | OidcError::Claims(_) | OidcError::MissingClaim(_) => {
                "token_malformed"
            }
            OidcError::Algorithm(_) | OidcError::KeyMismatch { .. } => "token_algorithm",
            OidcError::NoKeyId | OidcError::UnknownKey(_) => "token_unknown_key",
            OidcError::Fetch(_) => "provider_unreachable",
            OidcError::Signature => "token_signature",
            OidcError::Expired | OidcError::TooOld { .. } => "token_expired",
            OidcError::NotYetValid | OidcError::IssuedInFuture(_) => "token_not_yet_valid",
            OidcError::Issuer => "token_issuer",
            OidcError::Audience | OidcError::AuthorizedParty(_) => "token_audience",
            OidcError::Type(_) => "token_type",
        }
    }
}

/// Asymmetric algorithms only: an HMAC "key" from a JWKS would be public,
/// and `none` is no signature.
const ACCEPTED: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// The claims the issuer reads. `aud` may be one string or several.
#[derive(Debug, Clone, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub exp: u64,
    pub iat: u64,
    #[serde(default)]
    pub azp: Option<String>,
    #[serde(default)]
    pub aud: Audience,
    #[serde(default)]
    pub nonce: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub email_verified: Option<bool>,
    #[serde(default)]
    pub amr: Option<Vec<String>>,
    #[serde(default)]
    pub acr: Option<String>,
    /// When the user authenticated at the provider (seconds since the
    /// epoch).
    #[serde(default)]
    pub auth_time: Option<u64>,
    /// Read leniently: a provider that sends something else here gets no
    /// group SANs, not a refusal.
    #[serde(default, deserialize_with = "lenient_strings")]
    pub groups: Vec<String>,
}

fn lenient_strings<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    Ok(match v {
        serde_json::Value::Array(items) => items
            .into_iter()
            .filter_map(|i| i.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    })
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn len(&self) -> usize {
        match self {
            Audience::None => 0,
            Audience::One(_) => 1,
            Audience::Many(v) => v.len(),
        }
    }
}

/// Where the JWKS comes from: the provider over HTTPS, or a test's hand.
pub trait KeySource: Send + Sync {
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + '_>>;
}

struct Cache {
    keys: Vec<Jwk>,
    fetched: Option<Instant>,
}

pub struct TokenVerifier {
    issuer: String,
    client_id: String,
    leeway: Duration,
    max_age: Duration,
    refetch_interval: Duration,
    source: Box<dyn KeySource>,
    /// Held only to read or replace the keys, never across a fetch: a
    /// token whose kid is cached never waits for the provider.
    cache: std::sync::Mutex<Cache>,
    /// One refetch at a time (single flight): tokens with unknown kids
    /// wait for the one in progress instead of starting more.
    fetching: tokio::sync::Mutex<()>,
}

/// The JWKS's signing keys that `jsonwebtoken` can use; one unreadable or
/// encryption key does not hide the others.
fn parse_jwks(text: &str) -> Result<Vec<Jwk>, String> {
    #[derive(Deserialize)]
    struct Set {
        keys: Vec<serde_json::Value>,
    }
    let set: Set = serde_json::from_str(text).map_err(|e| format!("JWKS: {e}"))?;
    Ok(set
        .keys
        .into_iter()
        .filter_map(|k| serde_json::from_value::<Jwk>(k).ok())
        .filter(|k| !matches!(k.common.public_key_use, Some(PublicKeyUse::Encryption)))
        .filter(|k| !matches!(k.algorithm, AlgorithmParameters::OctetKey(_)))
        .collect())
}

impl TokenVerifier {
    pub fn new(config: &super::config::Oidc, source: Box<dyn KeySource>) -> TokenVerifier {
        TokenVerifier {
            issuer: config.issuer.clone(),
            client_id: config.client_id.clone(),
            leeway: config.leeway,
            max_age: config.max_token_age,
            refetch_interval: config.jwks_refetch_interval,
            source,
            cache: std::sync::Mutex::new(Cache {
                keys: Vec::new(),
                fetched: None,
            }),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cached(&self, kid: &str) -> Option<Jwk> {
        self.cache()
            .keys
            .iter()
            .find(|k| k.common.key_id.as_deref() == Some(kid))
            .cloned()
    }

    /// The key named `kid`, refetching the JWKS when it is unknown and the
    /// last fetch is older than the refetch interval.
    async fn key(&self, kid: &str) -> Result<Jwk, OidcError> {
        if let Some(k) = self.cached(kid) {
            return Ok(k);
        }
        let _flight = self.fetching.lock().await;
        // The fetch this one waited for may have brought the key.
        if let Some(k) = self.cached(kid) {
            return Ok(k);
        }
        {
            let mut cache = self.cache();
            let due = cache
                .fetched
                .is_none_or(|at| at.elapsed() >= self.refetch_interval);
            if !due {
                return Err(OidcError::UnknownKey(kid.to_owned()));
            }
            // Counted as a fetch even when it fails: a provider that is
            // down is not asked once per token either.
            cache.fetched = Some(Instant::now());
        }
        let text = self.source.fetch().await.map_err(OidcError::Fetch)?;
        let keys = parse_jwks(&text).map_err(OidcError::Fetch)?;
        tracing::info!(keys = keys.len(), "fetched the provider's JWKS");
        self.cache().keys = keys;
        self.cached(kid)
            .ok_or_else(|| OidcError::UnknownKey(kid.to_owned()))
    }

    /// Verifies `token` as an ID token for this client and returns its
    /// claims.
    pub async fn verify(&self, token: &str) -> Result<Claims, OidcError> {
        let now = jsonwebtoken::get_current_timestamp();
        let header = decode_header(token).map_err(|e| OidcError::Malformed(e.to_string()))?;
        if !ACCEPTED.contains(&header.alg) {
            return Err(OidcError::Algorithm(header.alg));
        }
        // An access token or logout token the provider signed for this
        // client (RFC 9068 `at+jwt`, `logout+jwt`) is not an ID token; ID
        // tokens carry `JWT` or no type.
        if let Some(typ) = &header.typ
            && !typ.eq_ignore_ascii_case("JWT")
        {
            return Err(OidcError::Type(typ.clone()));
        }
        let kid = header.kid.ok_or(OidcError::NoKeyId)?;
        let jwk = self.key(&kid).await?;
        // A key that says which algorithm it is for is used for no other.
        if let Some(alg) = jwk.common.key_algorithm
            && alg.to_string() != format!("{:?}", header.alg)
        {
            return Err(OidcError::KeyMismatch {
                kid,
                key: alg.to_string(),
                alg: header.alg,
            });
        }
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| OidcError::Fetch(e.to_string()))?;
        if key.family() != header.alg.family() {
            return Err(OidcError::KeyMismatch {
                kid,
                key: format!("{:?}", key.family()),
                alg: header.alg,
            });
        }
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&[&self.client_id]);
        v.leeway = self.leeway.as_secs();
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        let data = decode::<Claims>(token, &key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.into_kind() {
                K::InvalidSignature => OidcError::Signature,
                K::ExpiredSignature => OidcError::Expired,
                K::ImmatureSignature => OidcError::NotYetValid,
                K::InvalidIssuer => OidcError::Issuer,
                K::InvalidAudience => OidcError::Audience,
                K::MissingRequiredClaim(c) => OidcError::MissingClaim(c),
                K::InvalidAlgorithm => OidcError::Algorithm(header.alg),
                other => OidcError::Claims(format!("{other:?}")),
            }
        })?;
        let claims = data.claims;
        let leeway = self.leeway.as_secs();
        if claims.iat > now.saturating_add(leeway) {
            return Err(OidcError::IssuedInFuture(claims.iat));
        }
        if now.saturating_sub(claims.iat) > self.max_age.as_secs().saturating_add(leeway) {
            return Err(OidcError::TooOld {
                iat: claims.iat,
                max: self.max_age,
            });
        }
        // OIDC Core §3.1.3.7: with several audiences, azp names the
        // client; and an azp that is present names it too, whatever the
        // audience (a token issued to another client, or exchanged for it,
        // was not this login's).
        let azp_needed = claims.aud.len() > 1 || claims.azp.is_some();
        if azp_needed && claims.azp.as_deref() != Some(&self.client_id) {
            return Err(OidcError::AuthorizedParty(claims.azp.clone()));
        }
        Ok(claims)
    }
}

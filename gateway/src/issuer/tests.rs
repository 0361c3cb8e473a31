//! The issuer's decisions, with a real CA directory, real signatures and
//! a JWKS the test controls (the end-to-end test uses a real provider).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use serde_json::json;

use super::config::IssuerConfig;
use super::oidc::KeySource;
use super::*;
use crate::pki::KeyType;
use crate::pki::store::{InitSpec, Store};

const ISS: &str = "https://login.example.com";
const LAPTOP: &str = "spiffe://example.internal/device/laptop-7";
const OTHER_LAPTOP: &str = "spiffe://example.internal/device/laptop-8";

/// A provider signing key and its JWK.
struct SigningKey {
    kid: String,
    key: EncodingKey,
    jwk: Jwk,
}

fn signing_key(kid: &str) -> SigningKey {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let key = EncodingKey::from_ec_der(&pair.serialize_der());
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some(kid.into());
    SigningKey {
        kid: kid.into(),
        key,
        jwk,
    }
}

/// A JWKS the test can rotate, counting fetches.
#[derive(Clone, Default)]
struct TestKeys {
    jwks: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
}

impl TestKeys {
    fn set(&self, keys: &[&SigningKey]) {
        let keys: Vec<&Jwk> = keys.iter().map(|k| &k.jwk).collect();
        *self.jwks.lock().unwrap() = json!({ "keys": keys }).to_string();
    }
}

impl KeySource for TestKeys {
    fn fetch(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send + '_>>
    {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        let text = self.jwks.lock().unwrap().clone();
        Box::pin(async move { Ok(text) })
    }
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn claims(nonce: &str) -> serde_json::Value {
    json!({
        "iss": ISS, "sub": "u-1", "aud": "gateway", "iat": now(), "exp": now() + 300,
        "nonce": nonce, "email": "alice@example.internal", "email_verified": true,
        "amr": ["pwd", "otp"],
    })
}

/// A new store in `dir` (made), its CA named `name`, on P-256.
fn new_store(dir: &Path, name: &str) -> Store {
    let store = Store::open(dir);
    store
        .init(&InitSpec {
            name,
            key_type: KeyType::P256,
            permitted_dns: None,
        })
        .unwrap();
    store
}

/// A server certificate for `localhost` from `tls`: its PEM and key files.
fn localhost_cert(tls: &Store) -> (std::path::PathBuf, std::path::PathBuf) {
    tls.issue(
        crate::pki::store::Kind::Server,
        "localhost",
        &["dns:localhost".into()],
        None,
        KeyType::P256,
    )
    .unwrap()
}

/// A device-grant sign-in's claims: no nonce (RFC 8628 has none), and
/// the user authenticated for it half a minute before it was issued.
fn device_grant_claims() -> serde_json::Value {
    let mut c = claims("-");
    c.as_object_mut().unwrap().remove("nonce");
    c["auth_time"] = json!(now() - 30);
    c
}

fn token(key: &SigningKey, claims: &serde_json::Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, claims, &key.key).unwrap()
}

/// Signs a fresh CSR for alice on the laptop, valid an hour, straight
/// through the store (no issuer); its serial.
fn sign_for_alice(store: &Store) -> String {
    let sans = vec!["email:alice@example.internal".to_owned(), LAPTOP.to_owned()];
    store
        .sign_request(
            "alice",
            &csr(),
            &sans,
            time::OffsetDateTime::now_utc() + time::Duration::hours(1),
            None,
        )
        .unwrap()
        .1
        .serial
}

fn csr() -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    // Names the CSR asks for are ignored: the issuer decides.
    let params = rcgen::CertificateParams::new(vec!["ceo.example.internal".into()]).unwrap();
    params.serialize_request(&key).unwrap().pem().unwrap()
}

/// An enrolled device's verified certificate, valid 90 more days.
fn device(uri: &str) -> Identity {
    Identity {
        uris: vec![uri.into()],
        serial: "0a:0b".into(),
        not_after: now() as i64 + 90 * 86_400,
        ..Identity::default()
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    ca_dir: std::path::PathBuf,
    issuer: Issuer,
    keys: TestKeys,
    key: SigningKey,
}

fn setup(extra_profile: &str) -> Setup {
    setup_profiles(&format!(
        r#"
[profile]
require_amr = ["mfa", "otp"]
user_uri = "spiffe://example.internal/user/{{local}}"
email_domains = ["example.internal"]
{extra_profile}
"#
    ))
}

/// The issuer with `profiles` (the `[profile…]` tables and what follows).
fn setup_profiles(profiles: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("sso");
    new_store(&ca_dir, "SSO");
    let text = format!(
        r#"
listen = "127.0.0.1:0"
cert = "issuer.pem"
key = "issuer.key"
ca_dir = "sso"
device_trust = {{ ca = "devices/ca.pem" }}
device_san_prefix = "spiffe://example.internal/device/"
[oidc]
issuer = "{ISS}"
client_id = "gateway"
jwks_refetch_interval = "1s"
{profiles}
"#
    );
    let config = IssuerConfig::parse(&text, Path::new("issuer.toml"), dir.path()).unwrap();
    let keys = TestKeys::default();
    let key = signing_key("k1");
    keys.set(&[&key]);
    let issuer = Issuer::new(config, Box::new(keys.clone())).unwrap();
    Setup {
        _dir: dir,
        ca_dir,
        issuer,
        keys,
        key,
    }
}

fn request(id_token: String) -> CertificateRequest {
    CertificateRequest {
        id_token,
        csr: csr(),
        lifetime: None,
    }
}

impl Setup {
    /// A fresh nonce for the laptop and a token carrying it, with `tweak`
    /// applied to the claims.
    fn token(&self, tweak: impl FnOnce(&mut serde_json::Value)) -> String {
        let nonce = self.issuer.nonce(Some(&device(LAPTOP))).unwrap();
        let mut c = claims(&nonce);
        tweak(&mut c);
        token(&self.key, &c)
    }

    async fn refused(&self, id_token: String) -> Refusal {
        self.issuer
            .issue(Some(&device(LAPTOP)), request(id_token))
            .await
            .unwrap_err()
    }
}

#[tokio::test]
async fn a_user_on_an_enrolled_device_gets_a_short_lived_certificate_naming_both() {
    let s = setup("");
    let answer = s
        .issuer
        .issue(Some(&device(LAPTOP)), request(s.token(|_| {})))
        .await
        .unwrap();
    let leaf = CertificateDer::pem_slice_iter(answer.certificate.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let id = Identity::from_leaf(&leaf).unwrap();
    assert_eq!(id.emails, vec!["alice@example.internal"]);
    assert_eq!(
        id.uris,
        vec!["spiffe://example.internal/user/alice", LAPTOP],
        "the user's URI and the device's, nothing the CSR asked for"
    );
    assert!(id.dns.is_empty(), "the CSR's DNS name is not signed");
    assert_eq!(id.device("spiffe://example.internal/device/"), Some(LAPTOP));
    let lifetime = id.not_after - now() as i64;
    assert!(
        (8 * 3600 - 60..=8 * 3600).contains(&lifetime),
        "the default 8h, got {lifetime}s"
    );
    // Recorded, so `gateway pki revoke` finds the serial.
    let store = Store::open(&s.ca_dir);
    assert!(
        store
            .index()
            .unwrap()
            .issued
            .iter()
            .any(|e| e.serial == answer.serial)
    );
    store.revoke(&answer.serial).unwrap();
    assert_eq!(s.issuer.counters().issued, 1);
}

#[tokio::test]
async fn bad_tokens_are_refused_each_with_its_reason() {
    let s = setup("");
    type Tweak = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Tweak, &str)> = vec![
        (
            "expired",
            Box::new(|c| {
                c["iat"] = json!(now() - 400);
                c["exp"] = json!(now() - 100);
            }),
            "token_expired",
        ),
        (
            "wrong audience",
            Box::new(|c| c["aud"] = json!("someone-else")),
            "token_audience",
        ),
        (
            "several audiences without azp",
            Box::new(|c| c["aud"] = json!(["gateway", "other"])),
            "token_audience",
        ),
        (
            "wrong issuer",
            Box::new(|c| c["iss"] = json!("https://evil.example.com")),
            "token_issuer",
        ),
        (
            "not yet valid",
            Box::new(|c| c["nbf"] = json!(now() + 300)),
            "token_not_yet_valid",
        ),
        (
            "too old",
            Box::new(|c| c["iat"] = json!(now() - 3600)),
            "token_expired",
        ),
        ("no MFA", Box::new(|c| c["amr"] = json!(["pwd"])), "no_mfa"),
        (
            "no amr at all",
            Box::new(|c| {
                c.as_object_mut().unwrap().remove("amr");
            }),
            "no_mfa",
        ),
        (
            "email not verified",
            Box::new(|c| c["email_verified"] = json!(false)),
            "user_not_mapped",
        ),
        (
            "another domain",
            Box::new(|c| c["email"] = json!("mallory@example.com")),
            "user_not_mapped",
        ),
        (
            "a local part no rule can name",
            Box::new(|c| c["email"] = json!("a/b@example.internal")),
            "user_not_mapped",
        ),
        (
            "no nonce",
            Box::new(|c| {
                c.as_object_mut().unwrap().remove("nonce");
            }),
            "nonce",
        ),
        (
            "a nonce never issued",
            Box::new(|c| c["nonce"] = json!("made-up")),
            "nonce",
        ),
    ];
    for (i, (what, tweak, reason)) in cases.into_iter().enumerate() {
        // A device each: refusals before the nonce is checked leave it
        // outstanding, and a device holds only a few.
        let laptop = device(&format!("spiffe://example.internal/device/case-{i}"));
        let nonce = s.issuer.nonce(Some(&laptop)).unwrap();
        let mut c = claims(&nonce);
        tweak(&mut c);
        let e = s
            .issuer
            .issue(Some(&laptop), request(token(&s.key, &c)))
            .await
            .unwrap_err();
        assert_eq!(e.reason(), reason, "{what}: {e}");
    }
    assert_eq!(s.issuer.counters().issued, 0, "nothing issued");
}

#[tokio::test]
async fn a_tampered_signature_and_unsigned_or_hmac_tokens_are_refused() {
    let s = setup("");
    let good = s.token(|_| {});
    // Another payload under the original signature.
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    let forged = token(&s.key, &{
        let mut c = claims("x");
        c["email"] = json!("ceo@example.internal");
        c
    });
    parts[1] = forged.split('.').nth(1).unwrap().to_owned();
    let e = s.refused(parts.join(".")).await;
    assert_eq!(e.reason(), "token_signature", "{e}");
    // HS256 "signed" with the public JWK's bytes, and alg none.
    let hmac = jsonwebtoken::encode(
        &Header {
            kid: Some("k1".into()),
            ..Header::new(Algorithm::HS256)
        },
        &claims("x"),
        &EncodingKey::from_secret(b"public").unwrap(),
    )
    .unwrap();
    let e = s.refused(hmac).await;
    assert_eq!(e.reason(), "token_algorithm", "{e}");
    let none = format!(
        "{}.{}.",
        "eyJhbGciOiJub25lIiwia2lkIjoiazEifQ", // {"alg":"none","kid":"k1"}
        good.split('.').nth(1).unwrap()
    );
    let e = s.refused(none).await;
    assert!(
        matches!(e.reason(), "token_malformed" | "token_algorithm"),
        "{e}"
    );
    // The good one still works: the refusals consumed nothing of it.
    s.issuer
        .issue(Some(&device(LAPTOP)), request(good))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_token_is_used_once_and_only_from_the_device_that_asked() {
    let s = setup("");
    let t = s.token(|_| {});
    let e = s
        .issuer
        .issue(Some(&device(OTHER_LAPTOP)), request(t.clone()))
        .await
        .unwrap_err();
    assert!(matches!(e, Refusal::Nonce(NonceError::OtherDevice)), "{e}");
    s.issuer
        .issue(Some(&device(LAPTOP)), request(t.clone()))
        .await
        .unwrap();
    let e = s.refused(t).await;
    assert!(
        matches!(e, Refusal::Nonce(NonceError::Unknown)),
        "replay: {e}"
    );
    let e = s
        .issuer
        .issue(None, request(s.token(|_| {})))
        .await
        .unwrap_err();
    assert!(matches!(e, Refusal::NoDevice), "{e}");
    assert_eq!(e.status(), 401);
    assert!(e.to_string().contains("device certificate is required"));
    let not_a_device = device("spiffe://example.internal/user/alice");
    assert!(matches!(
        s.issuer.nonce(Some(&not_a_device)),
        Err(Refusal::NoDevice)
    ));
}

#[tokio::test]
async fn lifetimes_are_capped_and_an_acr_can_stand_for_mfa() {
    let s = setup("max_lifetime = \"10h\"\nrequire_acr = [\"urn:mfa\"]");
    let mut r = request(s.token(|_| {}));
    r.lifetime = Some("11h".into());
    let e = s.issuer.issue(Some(&device(LAPTOP)), r).await.unwrap_err();
    assert_eq!(e.reason(), "lifetime", "{e}");
    let mut r = request(s.token(|c| {
        c["amr"] = json!(["pwd"]);
        c["acr"] = json!("urn:mfa");
    }));
    r.lifetime = Some("2h".into());
    let answer = s.issuer.issue(Some(&device(LAPTOP)), r).await.unwrap();
    let leaf = CertificateDer::pem_slice_iter(answer.certificate.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let left = Identity::from_leaf(&leaf).unwrap().not_after - now() as i64;
    assert!((7200 - 60..=7200).contains(&left), "{left}");
}

#[tokio::test]
async fn the_issuer_follows_key_rotation_without_hammering_the_provider() {
    let s = setup("");
    s.issuer
        .issue(Some(&device(LAPTOP)), request(s.token(|_| {})))
        .await
        .unwrap();
    assert_eq!(s.keys.fetches.load(Ordering::SeqCst), 1);
    // Past the refetch interval (1s here), the provider rotates: a new key signs, the old one is gone.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let k2 = signing_key("k2");
    s.keys.set(&[&k2]);
    let nonce = s.issuer.nonce(Some(&device(LAPTOP))).unwrap();
    s.issuer
        .issue(Some(&device(LAPTOP)), request(token(&k2, &claims(&nonce))))
        .await
        .expect("an unknown kid refetches the JWKS");
    assert_eq!(s.keys.fetches.load(Ordering::SeqCst), 2);
    // Made-up kids within the refetch interval cost no fetch.
    for kid in ["k3", "k4", "k5"] {
        let e = s
            .issuer
            .issue(
                Some(&device(OTHER_LAPTOP)),
                request(token(&signing_key(kid), &claims("x"))),
            )
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "token_unknown_key", "{e}");
    }
    assert_eq!(s.keys.fetches.load(Ordering::SeqCst), 2);
    // And the old key no longer verifies anything.
    let e = s.refused(s.token(|_| {})).await;
    assert_eq!(e.reason(), "token_unknown_key", "{e}");
}

#[tokio::test]
async fn users_and_devices_are_rate_limited() {
    let s = setup("");
    for _ in 0..5 {
        s.issuer
            .issue(Some(&device(LAPTOP)), request(s.token(|_| {})))
            .await
            .unwrap();
    }
    let e = s.refused(s.token(|_| {})).await;
    assert_eq!(e.reason(), "rate_limited", "{e}");
    assert_eq!(e.status(), 429);
    // The same user from another device is still limited as a user.
    let nonce = s.issuer.nonce(Some(&device(OTHER_LAPTOP))).unwrap();
    let e = s
        .issuer
        .issue(
            Some(&device(OTHER_LAPTOP)),
            request(token(&s.key, &claims(&nonce))),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Refusal::RateLimited {
                who: "this user",
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn a_request_whose_signature_does_not_verify_is_refused() {
    let s = setup("");
    let mut r = request(s.token(|_| {}));
    // Change a character inside the last full base64 line: the
    // signature's bytes.
    let lines: Vec<&str> = r.csr.lines().collect();
    let n = lines.len();
    let mut tampered = lines.clone();
    let last_full = lines[n - 3].to_owned();
    let flipped: String = last_full
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if i == 10 {
                if c == 'A' { 'B' } else { 'A' }
            } else {
                c
            }
        })
        .collect();
    tampered[n - 3] = &flipped;
    r.csr = tampered.join("\n");
    let e = s.issuer.issue(Some(&device(LAPTOP)), r).await.unwrap_err();
    assert_eq!(e.reason(), "csr", "{e}");
}

#[tokio::test]
async fn with_the_device_grant_a_token_without_nonce_is_taken_once() {
    let s = setup("device_grant = true");
    let t = token(&s.key, &device_grant_claims());
    s.issuer
        .issue(Some(&device(LAPTOP)), request(t.clone()))
        .await
        .unwrap();
    let e = s.refused(t).await;
    assert!(matches!(e, Refusal::Nonce(NonceError::Replayed)), "{e}");
    // A token that has a nonce is still held to it.
    let e = s.refused(token(&s.key, &claims("made-up"))).await;
    assert!(matches!(e, Refusal::Nonce(NonceError::Unknown)), "{e}");
}

#[tokio::test]
async fn listed_groups_become_uri_sans_and_others_do_not() {
    let s = setup(
        "group_uri = \"spiffe://example.internal/group/{group}\"\ngroups = [\"sre\", \"admins\"]",
    );
    let answer = s
        .issuer
        .issue(
            Some(&device(LAPTOP)),
            request(s.token(|c| {
                c["groups"] = json!(["everyone", "admins", "../sre", "sre", 7]);
            })),
        )
        .await
        .unwrap();
    let leaf = CertificateDer::pem_slice_iter(answer.certificate.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let id = Identity::from_leaf(&leaf).unwrap();
    assert_eq!(
        id.uris,
        vec![
            "spiffe://example.internal/user/alice",
            "spiffe://example.internal/group/sre",
            "spiffe://example.internal/group/admins",
            LAPTOP,
        ]
    );
    // A token whose groups claim is not a list gets no group, not a refusal.
    let answer = s
        .issuer
        .issue(
            Some(&device(LAPTOP)),
            request(s.token(|c| c["groups"] = json!("sre"))),
        )
        .await
        .unwrap();
    assert!(
        !answer.sans.iter().any(|s| s.contains("/group/")),
        "{:?}",
        answer.sans
    );
}

#[test]
fn a_signing_key_others_can_read_stops_the_issuer() {
    use std::os::unix::fs::PermissionsExt as _;
    let s = setup("");
    let key = s.ca_dir.join("intermediate.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = s.issuer.config().clone();
    let e = Issuer::new(config.clone(), Box::new(s.keys.clone()))
        .err()
        .expect("refused");
    assert!(e.to_string().contains("intermediate.key"), "{e}");
    let mut shared = config;
    shared.allow_shared_keys = true;
    assert!(Issuer::new(shared, Box::new(s.keys.clone())).is_ok());
}

/// `gateway issuer` signs into the SSO CA's index while an operator runs
/// `gateway pki revoke` on it: neither may write back an index without the
/// other's change.
#[test]
fn issuing_and_revoking_at_once_lose_neither_change() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), "SSO");
    let sign = sign_for_alice;
    let first: Vec<String> = (0..12).map(|_| sign(&store)).collect();
    let (issued, ()) = std::thread::scope(|s| {
        let issuing = s.spawn(|| {
            let store = Store::open(dir.path());
            (0..24).map(|_| sign(&store)).collect::<Vec<_>>()
        });
        let revoking = s.spawn(|| {
            let store = Store::open(dir.path());
            for serial in &first {
                store.revoke(serial).unwrap();
            }
        });
        (issuing.join().unwrap(), revoking.join().unwrap())
    });
    let index = store.index().unwrap();
    for serial in first.iter().chain(&issued) {
        let entry = index.issued.iter().find(|e| &e.serial == serial);
        assert!(
            entry.is_some(),
            "issued serial {serial} lost from the index"
        );
    }
    for serial in &first {
        let entry = index.issued.iter().find(|e| &e.serial == serial).unwrap();
        assert!(entry.revoked_at.is_some(), "revocation of {serial} lost");
    }
    assert_eq!(index.issued.len(), 36);
}

/// A CSR for a fresh key of `alg`, as rcgen makes it.
fn csr_for(alg: &'static rcgen::SignatureAlgorithm) -> String {
    let key = rcgen::KeyPair::generate_for(alg).unwrap();
    let params = rcgen::CertificateParams::new(vec![]).unwrap();
    params.serialize_request(&key).unwrap().pem().unwrap()
}

/// A CSR for a fresh key that `openssl req` makes (`-newkey …`): rcgen
/// (aws-lc-rs) makes no RSA key under 2048 bits and no secp256k1 key.
fn openssl_csr(newkey: &[&str]) -> String {
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-new",
            "-nodes",
            "-keyout",
            "/dev/null",
            "-subj",
            "/CN=x",
        ])
        .args(newkey)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// The CSR gives only its key, and the key is the requester's choice: a
/// weak one or one routes cannot verify is refused (400 `csr_key`, with
/// what was wrong), logged and counted; the kinds the gateway uses are
/// signed.
#[tokio::test]
async fn csrs_with_weak_or_unusable_keys_are_refused_and_usable_ones_signed() {
    let s = setup("[limits]\nper_user = { burst = 20, per_hour = 20 }");
    let ask = |i: usize, csr: String| {
        let laptop = device(&format!("spiffe://example.internal/device/key-{i}"));
        let nonce = s.issuer.nonce(Some(&laptop)).unwrap();
        let req = CertificateRequest {
            id_token: token(&s.key, &claims(&nonce)),
            csr,
            lifetime: None,
        };
        let issuer = &s.issuer;
        async move { issuer.issue(Some(&laptop), req).await }
    };
    let refused = [
        (
            csr_for(&rcgen::PKCS_ECDSA_P521_SHA512),
            "ECDSA on the curve 1.3.132.0.35",
        ),
        (openssl_csr(&["-newkey", "rsa:1024"]), "RSA of 1024 bits"),
        (
            openssl_csr(&["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp256k1"]),
            "ECDSA on the curve 1.3.132.0.10",
        ),
    ];
    for (i, (csr, says)) in refused.into_iter().enumerate() {
        let e = ask(i, csr).await.unwrap_err();
        assert_eq!((e.reason(), e.status()), ("csr_key", 400), "{says}: {e}");
        assert!(e.to_string().contains(says), "{says}: {e}");
    }
    let counters = s.issuer.counters();
    assert_eq!(counters.refused.get("csr_key"), Some(&3));
    assert_eq!(counters.issued, 0);
    let usable = [
        csr_for(&rcgen::PKCS_ECDSA_P256_SHA256),
        csr_for(&rcgen::PKCS_ECDSA_P384_SHA384),
        csr_for(&rcgen::PKCS_ED25519),
        csr_for(&rcgen::PKCS_RSA_SHA256),
    ];
    for (i, csr) in usable.into_iter().enumerate() {
        ask(10 + i, csr).await.unwrap();
    }
    assert_eq!(s.issuer.counters().issued, 4);
}

/// A client without a certificate reaches the issuer's listener (it must,
/// for `GET /v1/config`), but not its counters: `/metrics` is not served
/// there, only on `metrics_listen`, a loopback address.
#[tokio::test]
async fn a_client_without_a_certificate_cannot_read_the_metrics() {
    let s = setup("");
    s.issuer.nonce(Some(&device(LAPTOP))).unwrap();
    // The issuer's TLS certificate, from a CA the client trusts.
    let tls_dir = s._dir.path().join("tls");
    let tls = new_store(&tls_dir, "TLS");
    let (cert, key) = localhost_cert(&tls);
    let server_tls = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            crate::tls::certs::load_certs(&cert).unwrap(),
            crate::tls::certs::load_key(&key).unwrap(),
        )
        .unwrap();
    let acceptor: server::Acceptor = Arc::new(arc_swap::ArcSwap::from_pointee(
        tokio_rustls::TlsAcceptor::from(Arc::new(server_tls)),
    ));
    let issuer = Arc::new(s.issuer);
    let stop = tokio_util::sync::CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(server::serve(
        listener,
        acceptor,
        issuer.clone(),
        stop.clone(),
    ));
    let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_addr = metrics_listener.local_addr().unwrap();
    tokio::spawn(server::serve_metrics(
        metrics_listener,
        issuer.clone(),
        stop.clone(),
    ));

    let certless = http::client_config(Some(&tls_dir.join("ca.pem")), None).unwrap();
    let (status, body) = http::request(
        &certless,
        hyper::Method::GET,
        &format!("https://localhost:{port}/metrics"),
        None,
        Vec::new(),
    )
    .await
    .unwrap();
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 404, "{body}");
    assert!(!body.contains("gateway_issuer_"), "{body}");
    // `/v1/config` stays open: `gateway login` reads it before it has
    // anything to present.
    let (status, _) = http::request(
        &certless,
        hyper::Method::GET,
        &format!("https://localhost:{port}/v1/config"),
        None,
        Vec::new(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);

    // On the loopback metrics address, a scrape gets them.
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(metrics_addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("gateway_issuer_nonces_total 1\n"),
        "{answer}"
    );
    stop.cancel();
}

/// The issuer adds an index entry per sign-in and the index is rewritten
/// whole on each: when it re-signs the CRL it drops, under the lock, the
/// entries of certificates expired more than `index_retention` (30 days)
/// ago, revoked or not (a revoked one leaves the CRL too, as RFC 5280
/// allows); recent and live ones stay, and so do their revocations.
#[tokio::test]
async fn re_signing_the_crl_drops_entries_expired_longer_than_the_retention() {
    let s = setup("");
    let store = Store::open(&s.ca_dir);
    let sign = || sign_for_alice(&store);
    let (old_revoked, old, recent_revoked, live) = (sign(), sign(), sign(), sign());
    store.revoke(&old_revoked).unwrap();
    store.revoke(&recent_revoked).unwrap();
    // Age them as if signed long ago: two expired 40 days ago, one 10.
    let ago = |days| {
        (time::OffsetDateTime::now_utc() - time::Duration::days(days))
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let mut index = store.index().unwrap();
    for e in &mut index.issued {
        if e.serial == old_revoked || e.serial == old {
            e.not_after = ago(40);
        } else if e.serial == recent_revoked {
            e.not_after = ago(10);
        }
    }
    std::fs::write(
        s.ca_dir.join("index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
    store.publish_crl(time::Duration::days(5)).unwrap();
    assert!(sso_crl(&s.ca_dir, &old_revoked).3);

    let published = s.issuer.maintain_crl().unwrap();
    assert!(
        matches!(
            published,
            CrlRefresh::Published {
                pruned: 2,
                revoked: 1,
                ..
            }
        ),
        "{published:?}"
    );
    let kept: Vec<String> = store
        .index()
        .unwrap()
        .issued
        .into_iter()
        .map(|e| e.serial)
        .collect();
    assert_eq!(kept, vec![recent_revoked.clone(), live]);
    assert!(
        !sso_crl(&s.ca_dir, &old_revoked).3,
        "expired 40 days ago: off the CRL"
    );
    assert!(
        sso_crl(&s.ca_dir, &recent_revoked).3,
        "expired 10 days ago: still listed"
    );
    assert_eq!(s.issuer.counters().index_pruned, 2);
    assert!(server::metrics(&s.issuer).contains("gateway_issuer_index_pruned_total 2\n"));
}

/// The other user's half of
/// `a_lock_root_left_behind_neither_stops_the_issuers_user_nor_lets_it_in_while_held`,
/// which runs this test binary again as that user: a revocation in the
/// store it names.
#[test]
#[ignore = "run by another test, as another user"]
fn as_another_user_revoke_in_the_store() {
    let (Ok(dir), Ok(serial)) = (
        std::env::var("GATEWAY_TEST_STORE"),
        std::env::var("GATEWAY_TEST_SERIAL"),
    ) else {
        return;
    };
    Store::open(Path::new(&dir)).revoke(&serial).unwrap();
}

/// An operator's `gateway pki revoke` as root left a lock file root's and
/// 0600 in the SSO CA's directory; the issuer runs as its own user, owner
/// of the directory. That user must still take the lock, and still wait
/// while root holds it. Real users: the test (root) runs this binary again
/// as `nobody` (65534).
#[test]
fn a_lock_root_left_behind_neither_stops_the_issuers_user_nor_lets_it_in_while_held() {
    use std::os::unix::fs::OpenOptionsExt as _;
    use std::os::unix::process::CommandExt as _;
    const NOBODY: u32 = 65534;
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to act as two users");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("sso");
    let store = new_store(&ca, "SSO");
    let serial = sign_for_alice(&store);
    // The store is the issuer's user's, as /var/lib/gateway-issuer/sso…
    let own = |p: &Path| std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    own(dir.path());
    own(&ca);
    for f in std::fs::read_dir(&ca).unwrap() {
        own(&f.unwrap().path());
    }
    // …but root left the lock file, with the mode it was made with (made
    // afresh here: the store's own may have been chowned above).
    let _ = std::fs::remove_file(ca.join(".lock"));
    drop(
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(ca.join(".lock"))
            .unwrap(),
    );
    let held = store.lock().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "issuer::tests::as_another_user_revoke_in_the_store",
            "--ignored",
            "--nocapture",
        ])
        .env("GATEWAY_TEST_STORE", &ca)
        .env("GATEWAY_TEST_SERIAL", &serial)
        .uid(NOBODY)
        .gid(NOBODY)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let early = child.try_wait().unwrap();
    drop(held);
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        early.is_none(),
        "the other user's revoke did not wait for root's lock: {said}"
    );
    assert!(
        out.status.success(),
        "the issuer's user could not write: {said}"
    );
    assert!(said.contains("1 passed"), "{said}");
    let entry = store
        .index()
        .unwrap()
        .issued
        .into_iter()
        .find(|e| e.serial == serial)
        .unwrap();
    assert!(entry.revoked_at.is_some(), "revoked by the other user");
}

/// During an upgrade an older binary (its issuer not yet restarted, or an
/// older `gateway pki revoke`) locks `.lock`, not the directory: a newer
/// one holds that too, so neither writes the index over the other's change.
/// A `.lock` that is a symlink is refused, never followed.
#[test]
fn an_older_binarys_lock_file_keeps_a_newer_one_out() {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("sso");
    let store = new_store(&ca, "SSO");
    let serial = sign_for_alice(&store);
    let old_lock = ca.join(".lock");
    let open_old = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&old_lock)
            .unwrap()
    };
    // Control: no older binary holds it; the change is immediate.
    let t = Instant::now();
    drop(store.lock().unwrap());
    assert!(t.elapsed() < Duration::from_millis(500));

    // An older binary holds `.lock` (its own open file: flock excludes
    // across descriptions, in one process too) for 600 ms.
    let held = open_old();
    held.lock().unwrap();
    let started = Instant::now();
    std::thread::scope(|scope| {
        let revoke = scope.spawn(|| store.revoke(&serial));
        std::thread::sleep(Duration::from_millis(600));
        assert!(
            !revoke.is_finished(),
            "revoked while an older binary held .lock"
        );
        held.unlock().unwrap();
        revoke.join().unwrap().unwrap();
    });
    assert!(started.elapsed() >= Duration::from_millis(600));
    let entry = store
        .index()
        .unwrap()
        .issued
        .into_iter()
        .find(|e| e.serial == serial)
        .unwrap();
    assert!(entry.revoked_at.is_some());

    // One that others may open would let them hold the store: refused at
    // the issuer's start, as a directory others may read.
    std::fs::set_permissions(&old_lock, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = store.check_lock_private().unwrap_err().to_string();
    assert!(e.contains("rm ") && e.contains(".lock"), "{e}");
    std::fs::set_permissions(&old_lock, std::fs::Permissions::from_mode(0o600)).unwrap();
    store.check_lock_private().unwrap();

    // Whoever planted a symlink there, it is not followed.
    std::fs::remove_file(&old_lock).unwrap();
    std::os::unix::fs::symlink(ca.join("index.json"), &old_lock).unwrap();
    let e = store.lock().err().expect("a symlinked .lock is refused");
    assert!(e.to_string().contains(".lock"), "{e}");
}

/// The intermediate's CRL in `ca_dir/crl.pem` (written first): its bytes,
/// number, nextUpdate and whether it lists `serial`.
fn sso_crl(ca_dir: &Path, serial: &str) -> (Vec<u8>, String, i64, bool) {
    let path = ca_dir.join("crl.pem");
    let crls = crate::tls::crl::load_all(std::slice::from_ref(&path)).unwrap();
    let crl = &crls[0];
    assert!(crl.issuer.contains("SSO issuing CA"), "{}", crl.issuer);
    let raw: Vec<u8> = (0..serial.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&serial[i..i + 2], 16).unwrap())
        .collect();
    let listed = crl.crl.find_serial(&raw).unwrap().is_some();
    (
        std::fs::read(&path).unwrap(),
        format!("{:?}", crl.number),
        crl.next_update.unwrap(),
        listed,
    )
}

/// Nothing but the issuer re-publishes the SSO CA's CRL, and routes with
/// `crl_expired = "refuse"` refuse every user once it is past its
/// nextUpdate: the issuer re-signs it while it still has
/// `crl_republish_before` (6 days of 7) left, from the index as it is then
/// (a revocation an operator made meanwhile stays in it), and counts it; a
/// failure leaves the old CRL, is counted, and the next check retries.
#[tokio::test]
async fn the_issuer_re_signs_the_crl_before_it_goes_stale_keeping_every_revocation() {
    let s = setup("");
    let answer = s
        .issuer
        .issue(Some(&device(LAPTOP)), request(s.token(|_| {})))
        .await
        .unwrap();
    // The operator revokes it with `gateway pki revoke` (a 7-day CRL).
    let operator = Store::open(&s.ca_dir);
    operator.revoke(&answer.serial).unwrap();
    assert_eq!(
        s.issuer.maintain_crl().unwrap(),
        CrlRefresh::Fresh {
            next_update: time::OffsetDateTime::from_unix_timestamp(
                sso_crl(&s.ca_dir, &answer.serial).2
            )
            .unwrap()
        },
        "a CRL with 7 days left is left alone"
    );
    // Two days on, as its nextUpdate says: 5 days left, due.
    operator.publish_crl(time::Duration::days(5)).unwrap();
    let (aged, aged_number, aged_next, listed) = sso_crl(&s.ca_dir, &answer.serial);
    assert!(listed);

    // The signing key cannot be read: nothing published, counted, retried.
    let key = s.ca_dir.join("intermediate.key");
    let away = s.ca_dir.join("intermediate.key.away");
    std::fs::rename(&key, &away).unwrap();
    assert!(s.issuer.maintain_crl().is_err());
    assert_eq!(s.issuer.counters().crl_publish_failures, 1);
    assert_eq!(s.issuer.counters().crl_published, 0);
    assert_eq!(
        sso_crl(&s.ca_dir, &answer.serial).0,
        aged,
        "the old CRL stays"
    );
    std::fs::rename(&away, &key).unwrap();

    let published = s.issuer.maintain_crl().unwrap();
    assert!(
        matches!(published, CrlRefresh::Published { revoked: 1, .. }),
        "{published:?}"
    );
    let (_, number, next, listed) = sso_crl(&s.ca_dir, &answer.serial);
    assert!(listed, "the operator's revocation is in the re-signed CRL");
    assert_ne!(number, aged_number);
    let week = now() as i64 + 7 * 86_400;
    assert!(
        (week - 60..=week + 1).contains(&next) && next > aged_next,
        "valid 7 days again: {next}"
    );
    assert_eq!(s.issuer.counters().crl_published, 1);
    let metrics = server::metrics(&s.issuer);
    assert!(
        metrics.contains("gateway_issuer_crl_published_total 1\n")
            && metrics.contains("gateway_issuer_crl_publish_failures_total 1\n"),
        "{metrics}"
    );
    // Fresh again: the next minute's check leaves it.
    assert!(matches!(
        s.issuer.maintain_crl().unwrap(),
        CrlRefresh::Fresh { .. }
    ));
}

/// Log lines written while `f` runs (this thread's subscriber).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An enrolled device repeating a request refused cheaply (a lifetime
/// over the profile's maximum, before its token is even read) wrote a
/// log line each time, and was never rate limited: the lifetime was
/// checked before the device's bucket. Now the bucket comes first (past
/// it: 429), and refusal lines are limited per device and reason (5, then
/// one a minute), each counted in the metrics whether logged or not; the
/// next line says how many were left out.
#[tokio::test]
async fn a_flood_of_cheap_refusals_is_rate_limited_and_not_logged_each_time() {
    let s = setup("max_lifetime = \"12h\"\n[limits]\nper_device = { burst = 3, per_hour = 20 }");
    let logs = Captured::default();
    let writer = logs.clone();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .finish(),
    );
    let mut answered = std::collections::BTreeMap::<(&str, u16), u32>::new();
    for _ in 0..200 {
        let req = CertificateRequest {
            id_token: "not even read".into(),
            csr: String::new(),
            lifetime: Some("30d".into()),
        };
        let e = s
            .issuer
            .issue(Some(&device(LAPTOP)), req)
            .await
            .unwrap_err();
        *answered.entry((e.reason(), e.status())).or_default() += 1;
    }
    assert_eq!(
        answered,
        [(("lifetime", 400), 3), (("rate_limited", 429), 197)].into(),
        "the device's bucket holds 3"
    );
    let c = s.issuer.counters();
    assert_eq!(c.refused.get("lifetime"), Some(&3));
    assert_eq!(c.refused.get("rate_limited"), Some(&197), "each counted");
    let logged = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let lines = logged.matches("certificate refused").count();
    assert_eq!(
        lines,
        3 + limit::LOG_BURST as usize,
        "3 lifetime lines and the first rate_limited ones, not 200: {logged}"
    );
    assert_eq!(c.refusals_unlogged, 200 - lines as u64);
    let metrics = server::metrics(&s.issuer);
    assert!(
        metrics.contains(&format!(
            "gateway_issuer_refusals_unlogged_total {}\n",
            200 - lines
        )),
        "{metrics}"
    );
}

/// An `auth_time` in the future counted as age 0 and passed
/// `max_auth_age`: a provider clock (or a token) an hour ahead bought an
/// hour more of renewals. Later than now and the leeway (30 s) it is
/// refused, counted as `auth_time_in_future`, on a sign-in and on a
/// refreshed token (whose own `auth_time` the sign-in's earlier one used
/// to hide); within the leeway it is taken, and the sign-in is remembered
/// for renewal as authenticated now, not later.
#[tokio::test]
async fn an_auth_time_in_the_future_is_refused_and_never_remembered_ahead() {
    let s = setup(
        "refresh = true\nmax_auth_age = \"1h\"\n[limits]\nper_device = { burst = 50, per_hour = 50 }\nper_user = { burst = 50, per_hour = 50 }",
    );
    let laptop = device(LAPTOP);
    let e = s
        .refused(s.token(|c| c["auth_time"] = json!(now() + 3600)))
        .await;
    assert_eq!(
        (e.reason(), e.status()),
        ("auth_time_in_future", 403),
        "{e}"
    );
    assert!(e.to_string().contains("cannot be in the future"), "{e}");
    assert_eq!(
        s.issuer.counters().refused.get("auth_time_in_future"),
        Some(&1)
    );

    let nonce = s.issuer.nonce(Some(&laptop)).unwrap();
    let mut c = claims(&nonce);
    c["auth_time"] = json!(now() + 20);
    s.issuer
        .issue(Some(&laptop), request(token(&s.key, &c)))
        .await
        .expect("within the leeway");
    let remembered = s
        .issuer
        .sign_ins
        .check(Some(&nonce), LAPTOP, "u-1", "default")
        .unwrap();
    assert!(remembered <= now(), "remembered ahead: {remembered}");

    let mut r = claims(&nonce);
    r["auth_time"] = json!(now() + 3600);
    r["iat"] = json!(now() - 1);
    let e = s
        .issuer
        .issue_as(
            Some(&laptop),
            request(token(&s.key, &r)),
            Grant::Refresh,
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "auth_time_in_future", "{e}");
}

/// Findings of the attacker's review (reviews1): each test asserts the
/// refusal the fix brought (or, `residual_*`, a documented limit).
mod attack;

/// Attacker review 10 (s7/review10): the S9 fixes; tests asserting the
/// harm the reviewed code allows.
mod attack10;
/// Attacker review 11 (s7/review11): the S7 fixes (pki store) and the
/// access log's links; tests asserting the harm the reviewed code allows.
mod attack11;
/// Attacker review 12 (s8/review12): the S11 fixes (root CRL outside the
/// store, trust anchor copy, store opened once); each test turned to the
/// fix.
mod attack12;
/// Attacker review 13 (s8/review13): the S10-1 and S10-2 fixes; tests
/// asserting the harm the reviewed code allows.
mod attack13;
/// Attacker review 14 (s8/review14): the S12 fixes (bounded PEM reads,
/// the root's CRL signed from what root holds); tests asserting the harm
/// the reviewed code allows.
mod attack14;
/// Attacker review 15 (s8/review15): the S14 fixes and the S13 merge;
/// tests asserting the harm the reviewed code allows.
mod attack15;
/// Attacker review 16 (s8/review16): the S15 fixes; tests asserting the
/// harm the reviewed code allows.
mod attack16;
/// Attacker review 17 (s8/review17): the S16 fixes; tests asserting the
/// harm the reviewed code allows.
mod attack17;
/// Findings of the second attacker review (reviews2): tests asserting the
/// harm the reviewed code allows.
mod attack2;
mod attack3;
/// Attacker review 4 (review4): tests asserting the harm the reviewed code allows.
mod attack4;
/// Attacker review 5 (review5): tests asserting the harm the reviewed code allows.
mod attack5;
/// Attacker review 6 (review6): tests asserting the harm the reviewed code allows.
mod attack6;
/// Attacker review 7 (s7/review7): the S4-2, S4-3, S4-7 fixes; tests
/// asserting the harm the reviewed code allows.
mod attack7;
/// Attacker review 8 (s7/review8): the S5 fixes; tests asserting the harm
/// the reviewed code allows.
mod attack8;
/// Attacker review 9 (s7/review9): the S6 and S8-1 fixes; tests asserting
/// the harm the reviewed code allows.
mod attack9;

/// Renewal without the user (`profile.refresh`): a refreshed ID token
/// (the provider's answer to a refresh token) carries the nonce of the
/// sign-in it continues. It renews only on the device and for the user of
/// that sign-in, each token once, with the whole check of a first token
/// (MFA, `max_auth_age` against the original `auth_time`).
#[tokio::test]
async fn a_refreshed_token_renews_only_its_sign_ins_device_and_user_once_within_max_auth_age() {
    let s = setup(
        "refresh = true\nmax_auth_age = \"1h\"\n[limits]\nper_device = { burst = 50, per_hour = 50 }\nper_user = { burst = 50, per_hour = 50 }",
    );
    let laptop = device(LAPTOP);
    let nonce = s.issuer.nonce(Some(&laptop)).unwrap();
    let signed_in = now() - 600;
    let mut first = claims(&nonce);
    first["auth_time"] = json!(signed_in);
    let first = token(&s.key, &first);
    s.issuer
        .issue(Some(&laptop), request(first.clone()))
        .await
        .unwrap();
    // What the provider's refresh grant returns: the same sign-in (nonce,
    // auth_time, amr), issued again later.
    let refreshed = |tweak: &dyn Fn(&mut serde_json::Value)| {
        let mut c = claims(&nonce);
        c["auth_time"] = json!(signed_in);
        c["iat"] = json!(now() - 1);
        tweak(&mut c);
        token(&s.key, &c)
    };
    let renew = |device: &Identity, t: String| {
        let device = device.clone();
        let issuer = &s.issuer;
        async move {
            issuer
                .issue_as(Some(&device), request(t), Grant::Refresh, None)
                .await
        }
    };
    let t = refreshed(&|_| {});
    let answer = renew(&laptop, t.clone()).await.unwrap();
    assert!(
        answer.sans.contains(&LAPTOP.to_owned()),
        "{:?}",
        answer.sans
    );
    assert_eq!(s.issuer.counters().refreshed, 1);
    assert_eq!(s.issuer.counters().issued, 2);

    let e = renew(&laptop, t).await.unwrap_err();
    assert!(matches!(e, Refusal::Nonce(NonceError::Replayed)), "{e}");
    // The sign-in's own token is not taken again as a renewal.
    let e = renew(&laptop, first).await.unwrap_err();
    assert!(matches!(e, Refusal::Nonce(NonceError::Replayed)), "{e}");
    // A refresh token copied to another device, another user's token
    // under this sign-in's nonce, a nonce no sign-in used.
    let e = renew(
        &device(OTHER_LAPTOP),
        refreshed(&|c| c["iat"] = json!(now() - 2)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e, Refusal::Nonce(NonceError::SignInUnknown)),
        "{e}"
    );
    assert!(e.to_string().contains("sign in again"), "{e}");
    let e = renew(&laptop, refreshed(&|c| c["sub"] = json!("u-2")))
        .await
        .unwrap_err();
    assert!(
        matches!(e, Refusal::Nonce(NonceError::SignInUnknown)),
        "{e}"
    );
    let e = renew(&laptop, refreshed(&|c| c["nonce"] = json!("made-up")))
        .await
        .unwrap_err();
    assert!(
        matches!(e, Refusal::Nonce(NonceError::SignInUnknown)),
        "{e}"
    );
    // Refreshing does not extend the MFA past max_auth_age.
    let e = renew(
        &laptop,
        refreshed(&|c| c["auth_time"] = json!(now() - 2 * 3600)),
    )
    .await
    .unwrap_err();
    assert_eq!(e.reason(), "auth_too_old", "{e}");
    // Checked as a first token is: MFA, expiry, audience.
    let e = renew(&laptop, refreshed(&|c| c["amr"] = json!(["pwd"])))
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "no_mfa", "{e}");
    let e = renew(&laptop, refreshed(&|c| c["exp"] = json!(now() - 120)))
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "token_expired", "{e}");
    let e = renew(&laptop, refreshed(&|c| c["aud"] = json!("other")))
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "token_audience", "{e}");
    assert_eq!(s.issuer.counters().refreshed, 1);
    let m = server::metrics(&s.issuer);
    assert!(
        m.contains("gateway_issuer_refreshed_total{profile=\"default\"} 1\n"),
        "{m}"
    );
}

/// Without `profile.refresh` nothing is renewed from a refreshed token,
/// whatever it carries, and `/v1/config` does not ask for refresh tokens.
#[tokio::test]
async fn a_profile_without_refresh_renews_nothing() {
    let s = setup("max_auth_age = \"1h\"");
    let laptop = device(LAPTOP);
    let t = s.token(|c| c["auth_time"] = json!(now()));
    s.issuer
        .issue(Some(&laptop), request(t.clone()))
        .await
        .unwrap();
    let e = s
        .issuer
        .issue_as(Some(&laptop), request(t), Grant::Refresh, None)
        .await
        .unwrap_err();
    assert!(matches!(e, Refusal::RefreshNotAllowed), "{e}");
    assert_eq!(e.reason(), "refresh_not_allowed");
    assert_eq!(e.status(), 403);
    assert!(!s.issuer.config().profile.get(None).unwrap().1.refresh);
}

/// Several profiles (`[profile.NAME]`), each with its own rules: a token
/// without MFA is refused by the profile requiring it and taken by one
/// that does not, under that one's lifetime; the certificate (subject OU),
/// the index, the log and the metrics name the profile. An unknown
/// profile is refused with the names there are, before the token is
/// looked at, and counted apart from the configured ones.
#[tokio::test]
async fn each_profile_applies_its_own_rules_and_an_unknown_one_is_refused() {
    let s = setup_profiles(
        r#"
[profile.default]
require_amr = ["mfa", "otp"]
user_uri = "spiffe://example.internal/user/{local}"
email_domains = ["example.internal"]
[profile.kiosk]
email_domains = ["example.internal"]
email_san = false
user_uri = "spiffe://example.internal/kiosk/user/{local}"
default_lifetime = "1h"
max_lifetime = "2h"
"#,
    );
    let laptop = device(LAPTOP);
    let ask = |profile: Option<&'static str>| {
        let t = s.token(|c| c["amr"] = json!(["pwd"]));
        let (issuer, laptop) = (&s.issuer, laptop.clone());
        async move {
            issuer
                .issue_as(Some(&laptop), request(t), Grant::SignIn, profile)
                .await
        }
    };
    let e = ask(None).await.unwrap_err();
    assert_eq!(
        e.reason(),
        "no_mfa",
        "the default profile requires MFA: {e}"
    );
    let e = ask(Some("default")).await.unwrap_err();
    assert_eq!(e.reason(), "no_mfa", "{e}");
    let answer = ask(Some("kiosk")).await.unwrap();
    let leaf = CertificateDer::pem_slice_iter(answer.certificate.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let id = Identity::from_leaf(&leaf).unwrap();
    let lifetime = id.not_after - now() as i64;
    assert!(
        (3600 - 60..=3600).contains(&lifetime),
        "kiosk's 1h, got {lifetime}s"
    );
    assert_eq!(
        id.uris,
        vec!["spiffe://example.internal/kiosk/user/alice", LAPTOP],
        "kiosk's own user URI, and no email: {:?}",
        id.uris
    );
    assert!(id.emails.is_empty(), "{:?}", id.emails);
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let ou: Vec<&str> = cert
        .subject()
        .iter_organizational_unit()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(ou, vec!["kiosk"], "{}", cert.subject());
    let entry = Store::open(&s.ca_dir)
        .index()
        .unwrap()
        .issued
        .into_iter()
        .find(|e| e.serial == answer.serial)
        .unwrap();
    assert_eq!(entry.profile.as_deref(), Some("kiosk"));

    let e = ask(Some("admins")).await.unwrap_err();
    assert!(matches!(e, Refusal::UnknownProfile { .. }), "{e}");
    assert_eq!((e.reason(), e.status()), ("unknown_profile", 400));
    assert!(
        e.to_string().contains("no profile \"admins\"")
            && e.to_string().contains("(it has: default, kiosk)"),
        "{e}"
    );
    let m = server::metrics(&s.issuer);
    for line in [
        "gateway_issuer_issued_total{profile=\"default\"} 0\n",
        "gateway_issuer_issued_total{profile=\"kiosk\"} 1\n",
        "gateway_issuer_refused_total{profile=\"default\",reason=\"no_mfa\"} 2\n",
        "gateway_issuer_refused_total{profile=\"-\",reason=\"unknown_profile\"} 1\n",
    ] {
        assert!(m.contains(line), "{line} in\n{m}");
    }
    assert!(
        !m.contains("admins"),
        "a name a client made up is no label: {m}"
    );
}

/// Named profiles without a `default`: a request that names none is
/// refused, saying which there are.
#[tokio::test]
async fn without_a_default_profile_a_request_must_name_one() {
    let s = setup_profiles(
        r#"
[profile.sre]
require_amr = ["mfa", "otp"]
email_domains = ["example.internal"]
"#,
    );
    let e = s.refused(s.token(|_| {})).await;
    assert_eq!(e.reason(), "unknown_profile");
    assert!(
        e.to_string().contains("no default profile") && e.to_string().contains("sre"),
        "{e}"
    );
    s.issuer
        .issue_as(
            Some(&device(LAPTOP)),
            request(s.token(|_| {})),
            Grant::SignIn,
            Some("sre"),
        )
        .await
        .unwrap();
}

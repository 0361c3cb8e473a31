//! Attacks on the issuer that succeed on the reviewed code (reviews1,
//! see /work/helpers/s5/reviews1/findings.md). Each test asserts what the
//! attacker gets; a fix turns it red, and the test should then be turned
//! around to assert the refusal.

use base64::Engine as _;

use super::*;

fn leaf_identity(answer: &CertificateResponse) -> Identity {
    let leaf = CertificateDer::pem_slice_iter(answer.certificate.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    Identity::from_leaf(&leaf).unwrap()
}

/// F1: the user certificate is "device-bound", but its notAfter is not
/// capped at the device certificate's: a device whose enrolment ends in
/// two minutes (or that is revoked a minute later) leaves behind a
/// certificate carrying its device SAN for the profile's whole lifetime.
#[tokio::test]
async fn attack_user_certificate_outlives_its_device_certificate() {
    let s = setup("");
    let mut dying = device(LAPTOP);
    dying.not_after = now() as i64 + 120;
    let nonce = s.issuer.nonce(Some(&dying)).unwrap();
    let answer = s
        .issuer
        .issue(Some(&dying), request(token(&s.key, &claims(&nonce))))
        .await
        .unwrap();
    let id = leaf_identity(&answer);
    assert_eq!(id.device("spiffe://example.internal/device/"), Some(LAPTOP));
    assert!(
        id.not_after > dying.not_after + 7 * 3600,
        "HARM: the user certificate (notAfter {}) outlives the device's ({}) by hours",
        id.not_after,
        dying.not_after
    );
}

/// The order n of the P-256 group, big-endian.
const P256_N: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];

/// The same ES256 token with its signature (r, s) turned into (r, n - s):
/// another string, as valid as the first (ECDSA signatures are malleable).
fn malleate_es256(token: &str) -> String {
    let (message, sig) = token.rsplit_once('.').unwrap();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let sig = b64.decode(sig).unwrap();
    assert_eq!(sig.len(), 64);
    let mut out = sig[..32].to_vec();
    let s = &sig[32..];
    let mut neg = [0u8; 32];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let mut d = i16::from(P256_N[i]) - i16::from(s[i]) - borrow;
        borrow = 0;
        if d < 0 {
            d += 256;
            borrow = 1;
        }
        neg[i] = d as u8;
    }
    out.extend_from_slice(&neg);
    format!("{message}.{}", b64.encode(out))
}

/// F3: with `device_grant = true`, a nonce-less token is "taken once" by
/// the digest of its text; the same token with its ECDSA signature
/// malleated is another text, so one ID token yields a certificate on a
/// second device (anyone who saw the token after its legitimate use).
#[tokio::test]
async fn attack_a_nonceless_es256_token_is_taken_twice_by_malleating_its_signature() {
    let s = setup("device_grant = true");
    let mut c = claims("x");
    c.as_object_mut().unwrap().remove("nonce");
    let t = token(&s.key, &c);
    s.issuer
        .issue(Some(&device(LAPTOP)), request(t.clone()))
        .await
        .unwrap();
    let replayed = malleate_es256(&t);
    assert_ne!(replayed, t);
    let answer = s
        .issuer
        .issue(Some(&device(OTHER_LAPTOP)), request(replayed))
        .await
        .expect("HARM: the replayed token is taken again");
    let id = leaf_identity(&answer);
    assert_eq!(id.emails, vec!["alice@example.internal"]);
    assert_eq!(
        id.device("spiffe://example.internal/device/"),
        Some(OTHER_LAPTOP),
        "HARM: alice's one login now also names another device"
    );
}

/// F4: a token whose single audience is this client but whose azp names
/// another client (issued to that client: cross-client tokens, token
/// exchange) is accepted; OIDC Core 3.1.3.7 item 5 says a present azp
/// should be the client id.
#[tokio::test]
async fn attack_a_token_authorized_for_another_client_is_accepted() {
    let s = setup("");
    let answer = s
        .issuer
        .issue(
            Some(&device(LAPTOP)),
            request(s.token(|c| c["azp"] = json!("some-other-app"))),
        )
        .await
        .expect("HARM: azp of another client accepted");
    assert_eq!(
        leaf_identity(&answer).emails,
        vec!["alice@example.internal"]
    );
}

/// F5: the local part is taken with its case, so one mailbox is several
/// users: `Alice@` gets `spiffe://…/user/Alice`, which a route's
/// `deny = ["spiffe://example.internal/user/alice"]` (or the email rule)
/// does not match, and a per-user rate limit of one is passed once per
/// spelling.
#[tokio::test]
async fn attack_the_case_of_the_local_part_makes_another_user() {
    let s = setup("\n[limits]\nper_user = { burst = 1, per_hour = 1 }");
    s.issuer
        .issue(Some(&device(LAPTOP)), request(s.token(|_| {})))
        .await
        .unwrap();
    let e = s.refused(s.token(|_| {})).await;
    assert_eq!(e.reason(), "rate_limited", "{e}");
    let answer = s
        .issuer
        .issue(
            Some(&device(LAPTOP)),
            request(s.token(|c| c["email"] = json!("Alice@example.internal"))),
        )
        .await
        .expect("HARM: the same mailbox in other case is another user");
    let id = leaf_identity(&answer);
    assert_eq!(id.emails, vec!["Alice@example.internal"]);
    assert!(
        id.uris
            .contains(&"spiffe://example.internal/user/Alice".to_owned()),
        "HARM: {:?} is not the user URI a rule for alice names",
        id.uris
    );
}

/// F6: the serial is rcgen's default, the SHA-256 of the requester's
/// public key: a requester chooses it, and two certificates for one key
/// (two users, two devices, two lifetimes) share a serial (RFC 5280
/// 4.1.2.2: unique per CA; CA/B BR: 64 random bits), so the index holds
/// one serial twice and `gateway pki revoke SERIAL` marks only the first.
#[tokio::test]
async fn attack_the_serial_is_the_requesters_choice() {
    let s = setup("");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let mut serials = Vec::new();
    for d in [LAPTOP, OTHER_LAPTOP] {
        let nonce = s.issuer.nonce(Some(&device(d))).unwrap();
        let answer = s
            .issuer
            .issue(
                Some(&device(d)),
                CertificateRequest {
                    id_token: token(&s.key, &claims(&nonce)),
                    csr: csr.clone(),
                    lifetime: None,
                },
            )
            .await
            .unwrap();
        serials.push(answer.serial);
    }
    assert_eq!(serials[0], serials[1], "HARM: two certificates, one serial");
    let store = Store::open(&s.ca_dir);
    store.revoke(&serials[0]).unwrap();
    let index = store.index().unwrap();
    let entries: Vec<_> = index
        .issued
        .iter()
        .filter(|e| e.serial == serials[0])
        .collect();
    assert_eq!(entries.len(), 2);
    assert!(
        entries.iter().any(|e| e.revoked_at.is_none()),
        "HARM: the index says one of the two is still good (the CRL revokes both)"
    );
}

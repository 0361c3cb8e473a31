//! Attacker review 3 of SSO issuance (reviews3, see
//! /work/helpers/s6/reviews3/findings.md): renewal with refresh tokens,
//! several profiles, reloading issuer.toml. Each test asserts the HARM
//! (it passes on the code as reviewed) beside a control, and is meant to
//! be turned round into the refusal once fixed.

use super::*;
use crate::policy::{IdentityRule, Policy, Verdict};

const PREFIX: &str = "spiffe://example.internal/device/";

fn leaf_identity(answer: &CertificateResponse) -> Identity {
    let leaf = CertificateDer::pem_slice_iter(answer.certificate.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    Identity::from_leaf(&leaf).unwrap()
}

/// The route of docs/sso.md, "The route": alice, on an enrolled device.
fn alices_route() -> Policy {
    Policy {
        allow: vec![IdentityRule::try_from("email:alice@example.internal".to_owned()).unwrap()],
        device_san_prefix: Some(PREFIX.into()),
        ..Policy::default()
    }
}

fn admitted(policy: &Policy, id: &Identity) -> bool {
    matches!(
        policy.decide_at_any_time(id, "192.0.2.10".parse().unwrap()),
        Verdict::Allow { .. }
    )
}

/// `profiles` read as issuer.toml's (as `setup_profiles` does).
fn config(profiles: &str) -> Result<IssuerConfig, String> {
    let text = format!(
        r#"
listen = "127.0.0.1:0"
cert = "issuer.pem"
key = "issuer.key"
ca_dir = "sso"
device_trust = {{ ca = "devices/ca.pem" }}
device_san_prefix = "{PREFIX}"
[oidc]
issuer = "{ISS}"
client_id = "gateway"
{profiles}
"#
    );
    IssuerConfig::parse(&text, Path::new("issuer.toml"), Path::new("/tmp"))
        .map_err(|e| e.to_string())
}

/// `profiles` read as issuer.toml's: the error if it does not load.
fn config_error(profiles: &str) -> Option<String> {
    config(profiles).err()
}

/// S3-1: a profile's rules protected nothing that a looser profile also
/// issued. Every profile is open to every device and user (docs/sso.md,
/// "Several profiles"), the client picks one with `?profile=`, and the
/// certificates differed only in the subject's OU, which routes ignore
/// (and cannot match: no rule kind reads it). With the e2e test's own
/// pair, `default` (MFA, no device grant) and `kiosk` (no MFA; here also
/// `device_grant = true` for headless machines), a password alone (no
/// second factor) or a phished device code got alice a certificate that
/// alice's route admitted exactly as her MFA one (measured before the
/// fix: both kiosk certificates admitted, with the same email and device
/// as the MFA one).
///
/// Fixed: no two profiles issue the same name. That pair is refused when
/// the config loads, naming both profiles and the name; with `kiosk`
/// naming its users under a path of its own (`email_san = false`, its
/// own `user_uri`), its certificates pass no route written for
/// `default`'s names (the email, the user URI, a `spiffe-prefix:` of
/// them), which still admit alice's MFA certificate. Control: `default`
/// refuses both tokens.
#[tokio::test]
async fn s3_1_a_looser_profile_issues_no_name_that_routes_take_for_the_stricter_ones() {
    let default = r#"
[profile.default]
require_amr = ["mfa", "otp"]
max_auth_age = "1h"
user_uri = "spiffe://example.internal/user/{local}"
email_domains = ["example.internal"]
[profile.kiosk]
email_domains = ["example.internal"]
device_grant = true
default_lifetime = "1h"
"#;
    let e = config_error(default).expect("two profiles issuing email:… are refused");
    assert!(
        e.contains("profile.kiosk.email_san")
            && e.contains("profiles \"default\" and \"kiosk\"")
            && e.contains("email:LOCAL@DOMAIN"),
        "{e}"
    );
    let same_uri = format!(
        "{default}email_san = false\nuser_uri = \"spiffe://example.internal/user/{{local}}\"\n"
    );
    let e = config_error(&same_uri).expect("two profiles issuing one URI are refused");
    assert!(
        e.contains("profile.kiosk.user_uri") && e.contains("can issue the same URI"),
        "{e}"
    );

    let s = setup_profiles(&format!(
        "{default}email_san = false\nuser_uri = \"spiffe://example.internal/kiosk/user/{{local}}\"\n"
    ));
    let laptop = device(LAPTOP);
    let ask = |t: String, profile: &'static str| {
        let (issuer, laptop) = (&s.issuer, laptop.clone());
        async move {
            issuer
                .issue_as(Some(&laptop), request(t), Grant::SignIn, Some(profile))
                .await
        }
    };
    let routes = [
        alices_route(),
        Policy {
            allow: vec![
                IdentityRule::try_from("spiffe://example.internal/user/alice".to_owned()).unwrap(),
            ],
            device_san_prefix: Some(PREFIX.into()),
            ..Policy::default()
        },
        Policy {
            allow: vec![
                IdentityRule::try_from("spiffe-prefix:spiffe://example.internal/user/".to_owned())
                    .unwrap(),
            ],
            device_san_prefix: Some(PREFIX.into()),
            ..Policy::default()
        },
    ];
    // alice's own sign-in, with MFA, under the default profile.
    let with_mfa = ask(s.token(|c| c["auth_time"] = json!(now())), "default")
        .await
        .unwrap();
    let with_mfa = leaf_identity(&with_mfa);
    for route in &routes {
        assert!(admitted(route, &with_mfa), "control: {with_mfa:?}");
    }

    // A password without its second factor (amr pwd, no auth_time), and
    // a nonce-less token (the device grant: a phished code).
    let no_mfa = |s: &Setup| s.token(|c| c["amr"] = json!(["pwd"]));
    let e = ask(no_mfa(&s), "default").await.unwrap_err();
    assert_eq!(e.reason(), "no_mfa", "control: {e}");
    let nonceless = |s: &Setup| {
        let mut c = device_grant_claims();
        c["amr"] = json!(["pwd"]);
        token(&s.key, &c)
    };
    let e = ask(nonceless(&s), "default").await.unwrap_err();
    assert_eq!(e.reason(), "nonce", "control: {e}");

    for (what, t) in [
        ("a password alone", no_mfa(&s)),
        ("a phished device code", nonceless(&s)),
    ] {
        let answer = ask(t, "kiosk").await.expect(what);
        let id = leaf_identity(&answer);
        assert_eq!(answer.profile, "kiosk");
        for route in &routes {
            assert!(
                !admitted(route, &id),
                "{what}: a route for default's names admits the kiosk certificate {id:?}"
            );
        }
        assert!(id.emails.is_empty(), "{what}: {:?}", id.emails);
        assert_eq!(
            id.uris,
            vec!["spiffe://example.internal/kiosk/user/alice", LAPTOP],
            "{what}"
        );
        assert_eq!(
            id.common_name.one(),
            Some("kiosk:alice@example.internal"),
            "{what}"
        );
    }
}

/// A refresh-capable profile; `extra` is added to it.
fn refresh_setup(extra: &str) -> Setup {
    setup_profiles(&refresh_profiles(extra))
}

fn refresh_profiles(extra: &str) -> String {
    format!(
        r#"
[profile.default]
require_amr = ["mfa", "otp"]
email_domains = ["example.internal"]
refresh = true
max_auth_age = "1h"
{extra}
[limits]
per_device = {{ burst = 50, per_hour = 50 }}
per_user = {{ burst = 50, per_hour = 50 }}
"#
    )
}

/// alice signs in on the laptop under `profile`, with MFA `signed_in`
/// seconds since the epoch; the sign-in's nonce.
async fn sign_in(s: &Setup, profile: &str, signed_in: u64) -> String {
    let laptop = device(LAPTOP);
    let nonce = s.issuer.nonce(Some(&laptop)).unwrap();
    let mut c = claims(&nonce);
    c["auth_time"] = json!(signed_in);
    s.issuer
        .issue_as(
            Some(&laptop),
            request(token(&s.key, &c)),
            Grant::SignIn,
            Some(profile),
        )
        .await
        .unwrap();
    nonce
}

/// What the provider's refresh grant returns for alice's sign-in: the
/// same `sub`, `amr` and (if `nonce`) nonce, issued now, `iat` made
/// distinct by `n`.
fn refreshed(s: &Setup, nonce: Option<&str>, auth_time: u64, n: u64) -> String {
    let mut c = claims(nonce.unwrap_or("-"));
    if nonce.is_none() {
        c.as_object_mut().unwrap().remove("nonce");
    }
    c["auth_time"] = json!(auth_time);
    c["iat"] = json!(now() - n);
    token(&s.key, &c)
}

async fn renew(s: &Setup, from: &str, t: String, profile: &str) -> Result<Identity, Refusal> {
    s.issuer
        .issue_as(
            Some(&device(from)),
            request(t),
            Grant::Refresh,
            Some(profile),
        )
        .await
        .map(|a| leaf_identity(&a))
}

/// S3-2: on a profile with `device_grant = true` and `refresh = true`
/// (what headless machines, the ones that need renewal without a user,
/// are given), a refreshed ID token without a nonce skipped the sign-in
/// record (`nonce::SignIns`) entirely: it was taken once, and that was
/// all. So a stolen refresh token renewed on the thief's own enrolled
/// device, under another profile than its sign-in's, and after an issuer
/// restart, whenever the refreshed token carried no nonce: always for a
/// device-grant sign-in (oidc-provider puts none in), and for a browser
/// (code-flow) sign-in at any provider that leaves the nonce out of
/// refreshed ID tokens (measured before the fix: issued in all three
/// cases, with the thief's device SAN and alice's names). docs/sso.md
/// says a copied refresh token "is useless on another device", that it
/// continues its sign-in "under the same profile only", and that after a
/// restart "each device's next renewal is refused".
///
/// Fixed: a refreshed token without a nonce is refused (`nonce`,
/// `RefreshWithoutNonce`) whatever the profile's `device_grant`, on any
/// device, alice's own included: renewal needs the nonce naming a
/// remembered sign-in of this device, user and profile. Control: the same
/// refreshed token carrying its sign-in's nonce is refused on the other
/// device, under the other profile and after the restart, and renews on
/// alice's laptop under her sign-in's profile.
#[tokio::test]
async fn s3_2_a_nonceless_refreshed_token_renews_nothing() {
    let extra = "device_grant = true\ndevice_grant_refresh = true\n[profile.headless]\nrequire_amr = [\"mfa\", \"otp\"]\nemail_domains = [\"example.internal\"]\nemail_san = false\nuser_uri = \"spiffe://example.internal/headless/user/{local}\"\nrefresh = true\nmax_auth_age = \"1h\"\ndevice_grant = true\ndevice_grant_refresh = true";
    let s = refresh_setup(extra);
    let signed_in = now() - 60;
    // alice signs in in her browser, on her laptop, under `default`.
    let nonce = sign_in(&s, "default", signed_in).await;

    // Control: the provider's refreshed token with the sign-in's nonce.
    let e = renew(
        &s,
        OTHER_LAPTOP,
        refreshed(&s, Some(&nonce), signed_in, 1),
        "default",
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e, Refusal::Nonce(NonceError::SignInUnknown)),
        "{e}"
    );
    let e = renew(
        &s,
        LAPTOP,
        refreshed(&s, Some(&nonce), signed_in, 2),
        "headless",
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e, Refusal::Nonce(NonceError::SignInUnknown)),
        "{e}"
    );

    // The thief's device, with alice's refresh token: the provider's
    // refreshed tokens carry no nonce. Refused everywhere, also where
    // alice herself would renew.
    let without_nonce = |e: &Refusal| {
        matches!(e, Refusal::Nonce(NonceError::RefreshWithoutNonce))
            && e.reason() == "nonce"
            && e.to_string().contains("sign in again")
    };
    for (n, (from, profile)) in [
        (OTHER_LAPTOP, "default"),
        (OTHER_LAPTOP, "headless"),
        (LAPTOP, "default"),
    ]
    .into_iter()
    .enumerate()
    {
        let e = renew(
            &s,
            from,
            refreshed(&s, None, signed_in, 3 + n as u64),
            profile,
        )
        .await
        .unwrap_err();
        assert!(without_nonce(&e), "{from} {profile}: {e}");
    }
    // Control: with the nonce, alice's laptop renews under `default`.
    let id = renew(
        &s,
        LAPTOP,
        refreshed(&s, Some(&nonce), signed_in, 7),
        "default",
    )
    .await
    .expect("alice's own renewal");
    assert_eq!(id.device(PREFIX), Some(LAPTOP));

    // The issuer restarts: every sign-in it held is gone.
    let restarted = refresh_setup(extra);
    let e = renew(
        &restarted,
        LAPTOP,
        {
            let mut c = claims(&nonce);
            c["auth_time"] = json!(signed_in);
            token(&restarted.key, &c)
        },
        "default",
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e, Refusal::Nonce(NonceError::SignInUnknown)),
        "control: {e}"
    );
    let e = renew(
        &restarted,
        OTHER_LAPTOP,
        {
            let mut c = claims("-");
            c.as_object_mut().unwrap().remove("nonce");
            c["auth_time"] = json!(signed_in);
            token(&restarted.key, &c)
        },
        "default",
    )
    .await
    .unwrap_err();
    assert!(without_nonce(&e), "after the restart: {e}");
}

/// S3-3: `max_auth_age` bounded renewal by the `auth_time` the refreshed
/// token carried, not by the sign-in's, which the issuer had (it checked
/// it at the sign-in) but did not keep. A provider that stamps a
/// refreshed ID token with the time of the refresh (OIDC Core §12.2 says
/// it must not) renewed past the MFA's `max_auth_age`, for as long as the
/// sign-in was held: `max_auth_age` after the sign-in, itself up to
/// `max_auth_age` after the MFA, so up to twice it (measured before the
/// fix: with max_auth_age 3 s and no leeway, issued one second after a
/// sign-in whose MFA was 3 s old).
///
/// Fixed: the sign-in's `auth_time` is kept with it and renewals are
/// judged against it (or the token's, if earlier), and the sign-in is
/// held only until that `auth_time` + `max_auth_age` + leeway. Both are
/// shown: the measured case is refused, and so is a re-stamped token
/// while the sign-in is still held (max_auth_age cut from 1h to 5 s by a
/// reload, the MFA 10 s old). Controls: before the reload the renewal is
/// issued, and the original auth_time is refused after it.
#[tokio::test]
async fn s3_3_max_auth_age_is_judged_on_the_sign_ins_auth_time_whatever_a_refreshed_token_claims() {
    let limits = "[limits]\nper_device = { burst = 50, per_hour = 50 }\nper_user = { burst = 50, per_hour = 50 }";
    let profile = |max: &str| {
        format!(
            "leeway = \"0s\"\n[profile]\nrequire_amr = [\"mfa\", \"otp\"]\nemail_domains = [\"example.internal\"]\nrefresh = true\nmax_auth_age = \"{max}\"\n{limits}\n"
        )
    };
    let s = setup_profiles(&profile("3s"));
    // At the start of a second, so the sign-in sees its MFA 3 s old.
    let start = now();
    while now() == start {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let t0 = now();
    let mfa = t0 - 3;
    let nonce = sign_in(&s, "default", mfa).await;
    while now() < t0 + 1 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The MFA is now 4 s old, more than max_auth_age.
    let e = renew(&s, LAPTOP, refreshed(&s, Some(&nonce), mfa, 0), "default")
        .await
        .unwrap_err();
    assert!(
        matches!(e.reason(), "auth_too_old" | "nonce"),
        "control: {e}"
    );
    let e = renew(&s, LAPTOP, refreshed(&s, Some(&nonce), now(), 1), "default")
        .await
        .expect_err("renewed although the sign-in's MFA is older than max_auth_age");
    assert!(matches!(e.reason(), "auth_too_old" | "nonce"), "{e}");

    // Held for an hour; the MFA 10 s old.
    let s = setup_profiles(&profile("1h"));
    let mfa = now() - 10;
    let nonce = sign_in(&s, "default", mfa).await;
    renew(&s, LAPTOP, refreshed(&s, Some(&nonce), mfa, 1), "default")
        .await
        .expect("control: within max_auth_age");
    s.issuer.replace_config(config(&profile("5s")).unwrap());
    let e = renew(&s, LAPTOP, refreshed(&s, Some(&nonce), mfa, 2), "default")
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "auth_too_old", "control: {e}");
    let e = renew(&s, LAPTOP, refreshed(&s, Some(&nonce), now(), 3), "default")
        .await
        .expect_err("a re-stamped auth_time renews past the sign-in's max_auth_age");
    assert_eq!(e.reason(), "auth_too_old", "{e}");
    assert!(
        matches!(e, Refusal::AuthTooOld { age: Some(age), .. } if age.as_secs() >= 10),
        "judged on the sign-in's auth_time: {e}"
    );
}

/// S3-4: device-code phishing (docs/sso.md, "Headless machines": "the
/// attacker's device gets a certificate naming the victim") is no longer
/// one certificate once the profile renews: the sign-in the victim
/// completed on the attacker's device asks for `offline_access`
/// (`gateway login --device-flow` adds it when the profile renews), so
/// the attacker's login stores the victim's refresh token and its timer
/// renews the victim's certificate on the attacker's device with no
/// further act of the victim, until `max_auth_age` (or the provider's
/// refresh-token lifetime). Measured before the fix with
/// `device_grant = true` and nonce-less tokens (oidc-provider): three
/// renewals for bob on the attacker's device.
///
/// Fixed: S3-2 ends the nonce-less case (a refreshed token without a
/// nonce renews nothing), and a profile with both `device_grant` and
/// `refresh` no longer loads unless the operator accepts the residual
/// with `device_grant_refresh = true`: a provider that echoes the
/// attacker's nonce in the device grant still renews the victim, as it
/// does with `device_grant = false` (documented; the issuer cannot tell
/// a device-grant token from a browser one). Control: without `refresh`
/// the renewal is refused.
#[tokio::test]
async fn s3_4_device_grant_with_refresh_loads_only_when_accepted_and_a_nonceless_phish_renews_nothing()
 {
    let e = config_error(&refresh_profiles("device_grant = true"))
        .expect("device_grant with refresh, not accepted, is refused");
    assert!(
        e.contains("profile.default.refresh")
            && e.contains("phished device code")
            && e.contains("device_grant_refresh = true"),
        "{e}"
    );
    let attacker = device(OTHER_LAPTOP);
    let phished = |s: &Setup, nonce: Option<&str>, iat_back: u64| {
        let mut c = claims(nonce.unwrap_or("-"));
        if nonce.is_none() {
            c.as_object_mut().unwrap().remove("nonce");
        }
        c["email"] = json!("bob@example.internal");
        c["sub"] = json!("bob");
        c["auth_time"] = json!(now() - 30);
        c["iat"] = json!(now() - iat_back);
        token(&s.key, &c)
    };
    let accepted = "device_grant = true\ndevice_grant_refresh = true";
    // A nonce-less device grant (oidc-provider): one certificate (the
    // documented residual), no renewal.
    let s = refresh_setup(accepted);
    s.issuer
        .issue_as(
            Some(&attacker),
            request(phished(&s, None, 0)),
            Grant::SignIn,
            None,
        )
        .await
        .expect("residual (documented): bob's certificate on the attacker's device");
    for n in 1..=3 {
        let e = renew(&s, OTHER_LAPTOP, phished(&s, None, n), "default")
            .await
            .unwrap_err();
        assert!(
            matches!(e, Refusal::Nonce(NonceError::RefreshWithoutNonce)),
            "{e}"
        );
    }
    // The residual accepted (and the same with device_grant = false): a
    // provider that echoes the attacker's nonce in the device grant.
    for extra in [accepted, ""] {
        let s = refresh_setup(extra);
        let nonce = s.issuer.nonce(Some(&attacker)).unwrap();
        s.issuer
            .issue_as(
                Some(&attacker),
                request(phished(&s, Some(&nonce), 0)),
                Grant::SignIn,
                None,
            )
            .await
            .unwrap();
        let id = renew(&s, OTHER_LAPTOP, phished(&s, Some(&nonce), 1), "default")
            .await
            .expect("residual (documented): renewed without bob");
        assert_eq!(id.emails, vec!["bob@example.internal"]);
    }
    let s = setup("device_grant = true\nmax_auth_age = \"1h\"");
    s.issuer
        .issue_as(
            Some(&attacker),
            request(phished(&s, None, 0)),
            Grant::SignIn,
            None,
        )
        .await
        .unwrap();
    let e = renew(&s, OTHER_LAPTOP, phished(&s, None, 1), "default")
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "refresh_not_allowed", "control: {e}");
}

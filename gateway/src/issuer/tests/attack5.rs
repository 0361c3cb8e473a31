//! Attacker review 5 (review5, see /work/helpers/s7/review5/findings.md):
//! the fixes 4273f73, 55bd7d2, 70fabb0, 4f3b4de, e86712a and ead02e7.
//! Each test asserts the HARM (it passes on the code as reviewed) beside a
//! control, and is meant to be turned round into the refusal once fixed.
//! S5-1 (the data path's 100 ms grace) is in forward.rs's tests.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::process::CommandExt as _;

use super::*;
use crate::issuer::slots::{KNOWN_NETWORKS, KNOWN_RESERVE, MAX_CONNECTIONS, PER_SOURCE, Slots};
use crate::policy::{IdentityRule, Policy, Verdict};

const PREFIX: &str = "spiffe://example.internal/device/";

fn leaf_identity(answer: &CertificateResponse) -> Identity {
    let leaf = CertificateDer::pem_slice_iter(answer.certificate.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    Identity::from_leaf(&leaf).unwrap()
}

fn route(allow: &str) -> Policy {
    Policy {
        allow: vec![IdentityRule::try_from(allow.to_owned()).unwrap()],
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

/// The head of an issuer.toml (as tests.rs's `setup_profiles` writes it).
const ISS_HEAD: &str = r#"
listen = "127.0.0.1:0"
cert = "issuer.pem"
key = "issuer.key"
ca_dir = "sso"
device_trust = { ca = "devices/ca.pem" }
device_san_prefix = "spiffe://example.internal/device/"
[oidc]
issuer = "https://login.example.com"
client_id = "gateway"
"#;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

/// S5-2: 4f3b4de requires `{domain}` in `user_uri` when a profile lists
/// several `email_domains`, so that `alice@` of each domain gets a name of
/// her own; but it does not require anything between `{local}` and
/// `{domain}` that neither may contain. A local part may hold `.` and `-`,
/// a domain `.` and `-`, so `{local}.{domain}` (or `-`, or nothing) is not
/// one-to-one: with a domain and a subdomain of it listed,
/// `alice.eu@example.internal` (a mailbox or alias a user of the parent
/// domain may be given or choose) and `alice@eu.example.internal` get one
/// user URI, and routes written for the one admit the other.
/// Measured: the alias passed alice's route. Control: with `/` between
/// them (docs/sso.md's example) it does not; bob does not either way.
/// Fixed: with `{domain}`, `{local}` and `{domain}` must each be a whole
/// path segment, or the config does not load.
#[tokio::test]
async fn s5_2_local_and_domain_joined_by_a_dot_make_two_users_one_uri() {
    let config = |sep: &str| {
        format!(
            r#"
[profile.default]
require_amr = ["mfa", "otp"]
email_domains = ["example.internal", "eu.example.internal"]
user_uri = "spiffe://example.internal/user/{{local}}{sep}{{domain}}"
[limits]
per_device = {{ burst = 50, per_hour = 50 }}
per_user = {{ burst = 50, per_hour = 50 }}
"#
        )
    };
    for joined in [".", "-", "", "_x_"] {
        let text = format!("{ISS_HEAD}{}", config(joined));
        let e = IssuerConfig::parse(&text, Path::new("issuer.toml"), Path::new("/tmp"))
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("whole path segment"), "{joined:?}: {e}");
    }
    for (sep, collide) in [("/", false)] {
        let s = setup_profiles(&config(sep));
        let sign_in = async |email: &str, sub: &str| {
            let t = s.token(|c| {
                c["email"] = json!(email);
                c["sub"] = json!(sub);
            });
            leaf_identity(
                &s.issuer
                    .issue(Some(&device(LAPTOP)), request(t))
                    .await
                    .unwrap(),
            )
        };
        let alice = sign_in("alice@eu.example.internal", "u-alice").await;
        let alices_uri = alice
            .uris
            .iter()
            .find(|u| u.contains("/user/"))
            .unwrap()
            .clone();
        let alices_route = route(&alices_uri);
        assert!(admitted(&alices_route, &alice), "control: {sep}");
        let bob = sign_in("bob@example.internal", "u-bob").await;
        assert!(!admitted(&alices_route, &bob), "control: {sep}");
        let alias = sign_in("alice.eu@example.internal", "u-mallory").await;
        assert_eq!(
            admitted(&alices_route, &alias),
            collide,
            "{sep}: {alices_uri} vs {:?}",
            alias.uris
        );
    }
}

/// A refreshed ID token as the provider's refresh grant returns it for
/// alice: no nonce, the sign-in's `auth_time`, issued `ago` seconds ago.
fn refreshed(s: &Setup, auth_time: u64, ago: u64) -> String {
    let mut c = claims("-");
    c.as_object_mut().unwrap().remove("nonce");
    c["auth_time"] = json!(auth_time);
    c["iat"] = json!(now() - ago);
    token(&s.key, &c)
}

/// S5-3: e86712a takes a nonce-less ID token as a sign-in only with an
/// `auth_time` at most `max_token_age` (10 min) before its `iat`, and not
/// one of a sign-in the issuer remembers; docs/sso.md says what is left
/// open is "a refresh within those 10 minutes of a sign-in the issuer no
/// longer remembers (it restarted in between)". But the issuer remembers
/// only nonce sign-ins under profiles with `refresh`: a device-grant
/// sign-in (nonce-less, the case this fix is about) and any sign-in under
/// a profile without `refresh` are never remembered, so for every one of
/// them, with no restart, the thief of its refresh token (or of the
/// provider's session's tokens for the gateway's client) who refreshes
/// within 10 minutes signs in as the user on their own enrolled device,
/// once per refreshed token, each certificate for the profile's lifetime.
/// Measured: three certificates naming alice on laptop-8 from refreshes
/// of her device-flow sign-in on laptop-7, no restart in between. Controls:
/// a refresh of a sign-in the issuer remembers (a browser sign-in under
/// `default`, which renews) is refused, and one of an 11-minute-old sign-in.
/// Fixed: every sign-in taken (nonce or not, any profile) is held by its
/// `sub` and `auth_time` as the provider wrote them for `max_token_age`
/// and twice the leeway (`nonce::Authentications`); a nonce-less token
/// naming one is a refresh, refused. A device-grant sign-in with
/// `max_age=0` has an `auth_time` of its own.
#[tokio::test]
async fn s5_3_a_device_grant_sign_ins_refresh_signs_its_thief_in_without_a_restart() {
    let s = setup_profiles(
        r#"
[profile.default]
require_amr = ["mfa", "otp"]
email_domains = ["example.internal"]
refresh = true
max_auth_age = "1h"
[profile.headless]
require_amr = ["mfa", "otp"]
email_domains = ["example.internal"]
email_san = false
user_uri = "spiffe://example.internal/headless/user/{local}"
device_grant = true
[limits]
per_device = { burst = 50, per_hour = 50 }
per_user = { burst = 50, per_hour = 50 }
"#,
    );
    let thief = async |t: String| {
        s.issuer
            .issue_as(
                Some(&device(OTHER_LAPTOP)),
                request(t),
                Grant::SignIn,
                Some("headless"),
            )
            .await
    };
    // Control: her browser sign-in under `default` (nonce, renews) two
    // minutes ago is remembered; its refresh is refused on the thief's.
    let browser = now() - 120;
    s.issuer
        .issue(
            Some(&device(LAPTOP)),
            request(s.token(|c| c["auth_time"] = json!(browser))),
        )
        .await
        .unwrap();
    let e = thief(refreshed(&s, browser, 1)).await.unwrap_err();
    assert_eq!(e.reason(), "not_fresh_sign_in", "control: {e}");
    // Control: an 11-minute-old sign-in's refresh is refused.
    let e = thief(refreshed(&s, now() - 660, 1)).await.unwrap_err();
    assert_eq!(e.reason(), "not_fresh_sign_in", "control: {e}");

    // alice signs in with the device flow on laptop-7 (authenticated for
    // it 2.5 minutes ago, token issued 2 minutes ago).
    let device_flow = now() - 150;
    let mut c = claims("-");
    c.as_object_mut().unwrap().remove("nonce");
    c["auth_time"] = json!(device_flow);
    c["iat"] = json!(now() - 120);
    let hers = s
        .issuer
        .issue_as(
            Some(&device(LAPTOP)),
            request(token(&s.key, &c)),
            Grant::SignIn,
            Some("headless"),
        )
        .await
        .unwrap();
    assert_eq!(hers.renewable, Some(false));
    // The thief refreshes her sign-in's refresh token three times: each
    // refreshed token is refused.
    for ago in 1..4 {
        let e = thief(refreshed(&s, device_flow, ago)).await.unwrap_err();
        assert_eq!(e.reason(), "not_fresh_sign_in", "{e}");
    }
    // Control: a sign-in of hers authenticated afresh (max_age=0) is hers.
    let mut c = claims("-");
    c.as_object_mut().unwrap().remove("nonce");
    c["auth_time"] = json!(now() - 20);
    s.issuer
        .issue_as(
            Some(&device(LAPTOP)),
            request(token(&s.key, &c)),
            Grant::SignIn,
            Some("headless"),
        )
        .await
        .unwrap();
    assert_eq!(s.issuer.counters().issued, 3, "hers, none of the thief's");
}

/// S5-4: 70fabb0 kept 64 of 256 slots for networks where a device
/// certificate verified within 7 days, and docs/sso.md said "devices at
/// networks the issuer knows keep signing in through the 64". Any
/// enrolled user made a network known with one handshake of their own
/// device from it, so with 16 networks (12 for the open 192, 4 made known
/// for the reserve's 64) they held every slot again; with 4096 /64s their
/// device's handshakes pushed every other network out of the table.
/// Measured: the office (known from a device yesterday) refused `busy` in
/// both.
///
/// Fixed: a known network holds at most `RESERVE_PER_NETWORK` (4) of the
/// reserve, and one device keeps at most `KNOWN_PER_DEVICE` (4) networks
/// known (a fifth replaces its oldest): one insider device holds 16 of the
/// 64 and flushes no one. docs/sso.md states what is left (several
/// enrolled devices, an egress shared with a device, a restart empties
/// the table). Control: before the insider, the office gets a reserved
/// slot.
#[test]
fn s5_4_an_enrolled_user_makes_networks_known_and_holds_the_reserve_too() {
    use super::super::slots::{KNOWN_PER_DEVICE, RESERVE_PER_NETWORK};
    let t0 = std::time::Instant::now();
    let now = t0 + Duration::from_secs(86_400);
    let office = v4(192, 0, 2, 7);
    let fill_open = |slots: &Slots, held: &mut Vec<_>| {
        for n in 0..(MAX_CONNECTIONS - KNOWN_RESERVE) / PER_SOURCE {
            for _ in 0..PER_SOURCE {
                held.push(slots.take(v4(10, 0, n as u8, 1), now).unwrap());
            }
        }
    };

    // 1. The insider's own networks take their part of the reserve only.
    let slots = Slots::default();
    slots.device_verified(v4(192, 0, 2, 200), "laptop-1", t0); // a colleague, yesterday
    let mut held = Vec::new();
    fill_open(&slots, &mut held);
    // Control: the office gets in from the reserve.
    let control = slots.take(office, now).unwrap();
    assert!(control.reserved, "control");
    drop(control);
    // The insider's device signs in from 16 more networks...
    for n in 0..16u8 {
        slots.device_verified(v4(172, 16, n, 9), "insider", now);
    }
    // ...whose connections (any client there) take what they may.
    let mut taken = 0;
    for n in 0..16u8 {
        for _ in 0..PER_SOURCE {
            if let Ok(s) = slots.take(v4(172, 16, n, 1), now) {
                assert!(s.reserved);
                held.push(s);
                taken += 1;
            }
        }
    }
    assert_eq!(taken, KNOWN_PER_DEVICE * RESERVE_PER_NETWORK, "16 of 64");
    let office_gets = slots.take(office, now).unwrap();
    assert!(office_gets.reserved, "the office still gets in");
    drop(office_gets);
    drop(held);

    // 2. One device's handshakes from one IPv6 /52's /64s flush no one.
    let slots = Slots::default();
    slots.device_verified(v4(192, 0, 2, 200), "laptop-1", t0);
    for i in 0..KNOWN_NETWORKS as u128 {
        let net = IpAddr::V6(Ipv6Addr::from((0x2001_0db8_0000_0000u128 + i) << 64 | 1));
        slots.device_verified(net, "insider", now);
    }
    let mut held = Vec::new();
    fill_open(&slots, &mut held);
    assert!(
        slots.take(office, now).unwrap().reserved,
        "the office is still known"
    );
}

/// S5-5: ead02e7 ran the issuer as `gateway-issuer` with its store in
/// `/var/lib/gateway-issuer/sso` (`StateDirectory=`, mode 0700) and hid
/// that directory from gateway.service (`InaccessiblePaths=`). But routes
/// read the SSO CA and its CRL from the store (docs/sso.md, "The route":
/// `ca = "sso/ca.pem"`, `crls = ["sso/crl.pem"]`; the issuer re-signs
/// `crl.pem` daily and on every revocation): on one host with both
/// packaged units the gateway could no longer read them (every SSO user
/// refused, or a copied CRL no later revocation reaches). Measured (as
/// root): the store's `crl.pem` under a 0700 state directory of one user
/// was unreadable to another user (the gateway's).
///
/// Fixed: the state directory is 0711 and gateway.service hides nothing;
/// the gateway's user reads `crl.pem` and `ca.pem` by name, and still not
/// `intermediate.key` or `index.json` (0600, the issuer's user's).
#[test]
fn s5_5_the_packaged_gateway_cannot_read_the_sso_crl_its_routes_need() {
    let unit = |text: &str, key: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
            .collect()
    };
    let gateway = include_str!("../../../../examples/gateway.service");
    let issuer = include_str!("../../../../examples/gateway-issuer.service");
    let docs = include_str!("../../../../docs/sso.md");
    assert_eq!(unit(issuer, "User"), vec!["gateway-issuer"]);
    assert_eq!(unit(gateway, "User"), vec!["gateway"]);
    assert_eq!(unit(issuer, "StateDirectoryMode"), vec!["0711"]);
    assert!(unit(gateway, "InaccessiblePaths").is_empty());
    assert!(docs.contains("`/var/lib/gateway-issuer/sso`"));
    // And the root's CRL from outside the store (S11-2), root's, 0644.
    assert!(docs.contains("crls = [\"sso/crl.pem\", \"/etc/gateway/sso-root.crl.pem\"]"));
    // The trust anchor too: sso/ca.pem is the issuer's user's to replace.
    assert!(docs.contains("ca = \"/etc/gateway/sso-ca.pem\""));
    assert!(!docs.contains("ca = \"sso/ca.pem\""));

    if !is_root() {
        eprintln!("skipped the file system part: needs root (two users)");
        return;
    }
    const ISSUER_UID: u32 = 65534;
    const GATEWAY_UID: u32 = 65533;
    let dir = tempfile::tempdir().unwrap();
    let chmod = |p: &Path, mode: u32| {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    chmod(dir.path(), 0o755);
    let reads = |uid: u32, file: &Path| {
        std::process::Command::new("cat")
            .arg(file)
            .uid(uid)
            .gid(uid)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    let layout = |state_mode: u32| {
        let state = dir.path().join(format!("state-{state_mode:o}"));
        std::fs::create_dir(&state).unwrap();
        let sso = state.join("sso");
        Store::open(&sso)
            .init(&InitSpec {
                name: "SSO",
                key_type: KeyType::P256,
                permitted_dns: None,
            })
            .unwrap();
        let chown = std::process::Command::new("chown")
            .args(["-R", &format!("{ISSUER_UID}:{ISSUER_UID}")])
            .arg(&state)
            .status()
            .unwrap();
        assert!(chown.success());
        chmod(&state, state_mode);
        sso.join("crl.pem")
    };
    // Control: under 0700 the gateway could not read it (before the fix).
    let closed = layout(0o700);
    assert!(reads(ISSUER_UID, &closed), "control: the owner reads it");
    assert!(!reads(GATEWAY_UID, &closed), "control: 0700 shuts it out");
    // The packaged layout: StateDirectoryMode=0711.
    let packaged = layout(0o711);
    assert!(reads(ISSUER_UID, &packaged), "the owner reads it");
    assert!(
        reads(GATEWAY_UID, &packaged),
        "the gateway reads the SSO CRL"
    );
    let sso = packaged.parent().unwrap();
    assert!(reads(GATEWAY_UID, &sso.join("ca.pem")), "and the SSO CA");
    for private in ["intermediate.key", "index.json"] {
        assert!(!reads(GATEWAY_UID, &sso.join(private)), "but not {private}");
    }
}

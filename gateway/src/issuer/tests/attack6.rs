//! Attacker review 6 of SSO issuance (review6, see
//! /work/helpers/s7/review6/findings.md): the six commits merged in
//! 3ec4659 (login's renewal, the refusal log limit, auth_time in the
//! future, `user = "NAME"`, the signal handlers). Each test asserts the
//! HARM (it passes on the code as reviewed) beside a control, and is meant
//! to be turned round into the refusal once fixed.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;

use super::*;
use crate::privilege::Target;

const NOBODY: u32 = 65534;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A temporary directory whose every ancestor is root's and writable by
/// root alone (beside the test binary, not in /tmp, which is
/// world-writable): where a root start with `user` takes its config from.
fn root_only_tempdir() -> tempfile::TempDir {
    let exe = std::env::current_exe().unwrap();
    tempfile::Builder::new()
        .tempdir_in(exe.parent().unwrap())
        .unwrap()
}

/// A valid issuer.toml naming `user`, nothing read but itself.
fn issuer_toml(user: Option<&str>, extra: &str) -> String {
    let user = user
        .map(|u| format!("user = \"{u}\"\n"))
        .unwrap_or_default();
    format!(
        r#"{user}listen = "127.0.0.1:0"
cert = "issuer.pem"
key = "issuer.key"
ca_dir = "sso"
device_trust = {{ ca = "devices/ca.pem" }}
device_san_prefix = "spiffe://example.internal/device/"
[oidc]
issuer = "{ISS}"
client_id = "gateway"
[profile]
user_uri = "spiffe://example.internal/user/{{local}}"
email_domains = ["example.internal"]
{extra}
"#
    )
}

/// S6-1: 5b48b44 remembers a sign-in whose `auth_time` is ahead of the
/// issuer's clock (within the leeway) as authenticated *now*, but e86712a's
/// check that a nonce-less token is not a refresh of a remembered sign-in
/// (`SignIns::remembers`) compares `auth_time` for equality with what was
/// remembered. A refreshed token carries its sign-in's `auth_time` as the
/// provider wrote it, so with the provider's clock a few seconds ahead
/// (any skew above the sign-in's own latency and within the 30 s leeway)
/// the sign-in is no longer recognised: the thief of alice's refresh
/// token trades it within `max_token_age` (at a provider that leaves the
/// nonce out of refreshed tokens) and signs in as alice on their own
/// enrolled device under a `device_grant` profile. This is S4-1, fixed
/// in e86712a, reopened by 5b48b44. Control: the same refresh of a
/// sign-in whose `auth_time` was behind the issuer's clock is refused
/// `not_fresh_sign_in`. Measured before the fix: with the provider 10 s
/// ahead, the thief's refresh was issued naming alice on laptop-8.
/// Fixed: every sign-in's `sub` and `auth_time` are held as the provider
/// wrote them (`nonce::Authentications`), not as renewal clamps them.
#[tokio::test]
async fn s6_1_a_sign_in_seconds_ahead_is_not_recognised_and_its_refresh_signs_in_on_the_thiefs_device()
 {
    let config = "[profile.default]\nrequire_amr = [\"mfa\", \"otp\"]\nemail_domains = [\"example.internal\"]\nrefresh = true\nmax_auth_age = \"1h\"\ndevice_grant = true\ndevice_grant_refresh = true\n[limits]\nper_device = { burst = 50, per_hour = 50 }\nper_user = { burst = 50, per_hour = 50 }\n";
    // What the provider's refresh grant returns: alice's claims, no
    // nonce, the sign-in's `auth_time`, issued just now.
    let refreshed = |s: &Setup, auth_time: u64| {
        let mut c = claims("-");
        c.as_object_mut().unwrap().remove("nonce");
        c["auth_time"] = json!(auth_time);
        c["iat"] = json!(now() - 1);
        token(&s.key, &c)
    };
    async fn thief(s: &Setup, t: String) -> Result<CertificateResponse, Refusal> {
        s.issuer
            .issue_as(
                Some(&device(OTHER_LAPTOP)),
                request(t),
                Grant::SignIn,
                Some("default"),
            )
            .await
    }

    // Control: her sign-in 60 s ago (the issuer's clock) is recognised.
    let s = setup_profiles(config);
    let behind = now() - 60;
    let hers = s
        .issuer
        .issue(
            Some(&device(LAPTOP)),
            request(s.token(|c| c["auth_time"] = json!(behind))),
        )
        .await
        .unwrap();
    assert_eq!(hers.renewable, Some(true));
    let e = thief(&s, refreshed(&s, behind)).await.unwrap_err();
    assert_eq!(e.reason(), "not_fresh_sign_in", "control: {e}");

    // The provider's clock 10 s ahead: her sign-in is taken (within the
    // leeway), and its refresh is recognised all the same.
    let s = setup_profiles(config);
    let ahead = now() + 10;
    let hers = s
        .issuer
        .issue(
            Some(&device(LAPTOP)),
            request(s.token(|c| c["auth_time"] = json!(ahead))),
        )
        .await
        .unwrap();
    assert_eq!(hers.renewable, Some(true), "her sign-in renews");
    let e = thief(&s, refreshed(&s, ahead)).await.unwrap_err();
    assert_eq!(e.reason(), "not_fresh_sign_in", "{e}");
}

/// S6-2: S4-4 moved the issuer to its own user (`gateway-issuer`) so that
/// code running in the network-facing gateway (`gateway`) cannot read the
/// SSO CA's key. 67df6d1, merged beside it, told the operator the
/// opposite: a root start without `user` warned "set user = \"gateway\"
/// (the store chowned to it)", docs/sso.md's issuer.toml showed `# user =
/// "gateway"`, "Running as its user" said the shipped unit runs it as
/// `gateway` (`User=gateway`, false since S4-4) and its own error message
/// said `chown -R gateway: …/sso`. An operator who followed the product's
/// own words gave the CA's key to the gateway's user, and nothing at start
/// refused `user` = the gateway's user. Now every text names
/// `gateway-issuer`, and `user` is refused when it is the gateway's: the
/// name `gateway`, the owner of the gateway's config, or the `user` that
/// config names. Control: the units as S4-4 left them; another user.
#[test]
fn s6_2_the_issuer_refuses_the_gateways_user_and_its_texts_name_its_own() {
    let unit = |text: &str, key: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
            .collect()
    };
    let gateway = include_str!("../../../../examples/gateway.service");
    let issuer = include_str!("../../../../examples/gateway-issuer.service");
    assert_eq!(unit(gateway, "User"), vec!["gateway"], "control");
    assert_eq!(unit(issuer, "User"), vec!["gateway-issuer"], "control");

    let main = include_str!("../../main.rs");
    assert!(
        !main.contains(r#"set user = \"gateway\""#),
        "root-start warning"
    );
    assert!(
        main.contains(
            r#"set user = \"gateway-issuer\" (the store chowned to it; never the gateway's"#
        ),
        "root-start warning"
    );
    let docs = include_str!("../../../../docs/sso.md");
    for old in [
        r#"# user = "gateway" "#,
        "The shipped unit starts the issuer as `gateway` (`User=gateway`)",
        "chown -R gateway: …/sso",
        r#"not to user "gateway" "#,
    ] {
        assert!(!docs.contains(old), "docs still say {old:?}");
    }
    for new in [
        r#"# user = "gateway-issuer" "#,
        "The shipped unit starts the issuer as `gateway-issuer`\n(`User=gateway-issuer`)",
        "chown -R gateway-issuer: …/sso",
    ] {
        assert!(docs.contains(new), "docs do not say {new:?}");
    }

    // The refusal: by name, whoever owns or is named by the gateway's
    // config (here a file of the test's; the issuer reads
    // /etc/gateway/gateway.toml).
    let as_target = |user: &str, uid: u32| Target {
        user: user.into(),
        uid,
        gid: uid,
        groups: Vec::new(),
        kept: Vec::new(),
    };
    let dir = tempfile::tempdir().unwrap();
    let none = dir.path().join("none.toml");
    let e = as_target("gateway", 4243)
        .not_the_gateways(&none)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains(r#"user "gateway" (uid 4243) is the gateway's"#)
            && e.to_string().contains(r#"set user = "gateway-issuer""#),
        "{e}"
    );
    let nobody = Target::alone("nobody").unwrap();
    nobody
        .not_the_gateways(&none)
        .expect("control: no gateway here");
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, "user = \"nobody\"\n").unwrap();
    let e = nobody.not_the_gateways(&config).unwrap_err();
    assert!(e.to_string().contains(r#"drops to user = "nobody""#), "{e}");
    std::fs::write(&config, "user = \"gateway\"\n").unwrap();
    nobody
        .not_the_gateways(&config)
        .expect("control: the gateway drops to another user");
    if is_root() {
        std::os::unix::fs::chown(&config, Some(NOBODY), None).unwrap();
        let e = nobody.not_the_gateways(&config).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("it owns {}", config.display())),
            "{e}"
        );
    }
}

/// S6-3: `check_config` (the start refused if the dropped-to user could
/// rewrite issuer.toml) looked at the file, its directory and a symlink's
/// target, never at the directories above. With issuer.toml in a
/// root-owned directory under one the issuer's user owns (here
/// `state/conf/issuer.toml`, `state` the user's, as a store's parent or a
/// home directory would be), the start passed the check, and the dropped
/// process (measured: a shell as nobody) renamed `conf` away and put its
/// own issuer.toml there, without `user`: root's next start read it and,
/// `user` gone, only warned and stayed root. Now every directory above
/// the file, on the path as given and through its symlinks, up to `/`, is
/// checked: owned by the user, writable by its group or by anyone (a
/// sticky /tmp too) is refused, naming the directory. Control: the same
/// file with every directory above root's passes.
#[test]
fn s6_3_an_issuer_toml_under_a_directory_the_user_owns_is_refused() {
    if !is_root() {
        return;
    }
    let dir = root_only_tempdir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let conf = state.join("conf");
    std::fs::create_dir(&conf).unwrap(); // root's, 0755
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = conf.join("issuer.toml");
    std::fs::write(&path, issuer_toml(Some("nobody"), "")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let target = Target::alone("nobody").unwrap();
    let refused = |p: &Path| match target.check_config(p) {
        Ok(()) => panic!("{} passes", p.display()),
        Err(e) => e.to_string(),
    };

    // Control: root's all the way up.
    target
        .check_config(&path)
        .expect("control: root's all the way");

    // The user's directory two levels up.
    std::os::unix::fs::chown(&state, Some(NOBODY), Some(NOBODY)).unwrap();
    let why = refused(&path);
    assert!(
        why.contains(&format!("{} belongs to uid {NOBODY}", state.display())),
        "{why}"
    );
    // Through a root symlink in a root directory, to the same file.
    let link = dir.path().join("issuer.toml");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    let why = refused(&link);
    assert!(
        why.contains(&format!("{} belongs to uid {NOBODY}", state.display())),
        "{why}"
    );
    std::os::unix::fs::chown(&state, Some(0), Some(0)).unwrap();
    target
        .check_config(&link)
        .expect("control: through the link");

    // Writable by the user's group, or by anyone, sticky or not.
    std::os::unix::fs::chown(&state, Some(0), Some(NOBODY)).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o775)).unwrap();
    let why = refused(&path);
    assert!(why.contains("is writable by its group 65534"), "{why}");
    std::os::unix::fs::chown(&state, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let why = refused(&path);
    assert!(
        why.contains(&format!(
            "{} is writable by others (mode 1777; sticky",
            state.display()
        )),
        "{why}"
    );
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    target.check_config(&path).expect("control: root's again");
}

/// The issuer's user's half of
/// `s6_4_a_root_only_issuer_toml_stops_the_start`: what the issuer does
/// right after its drop (`server::check_reloadable`), as every SIGHUP
/// after reads issuer.toml by the path it was started with.
#[test]
#[ignore = "run by another test, as another user"]
fn as_the_issuers_user_read_issuer_toml_again() {
    let Ok(path) = std::env::var("GATEWAY_TEST_ISSUER_TOML") else {
        return;
    };
    if let Err(e) = super::super::server::check_reloadable(Path::new(&path), "nobody") {
        panic!("REFUSED: {e}");
    }
}

/// S6-4: with `user`, root reads issuer.toml at start and the dropped
/// user reads it on every SIGHUP (`server::reload_config` loads it by
/// path). The start checked only that the user could not write it, not
/// that it could read it: the most natural root-only file (root's, 0600)
/// started fine, and every reload then failed (logged, counted), so a
/// tightened config (a profile or email domain removed, `require_amr`
/// added) was never put in service while the old one kept issuing.
/// Measured before the fix: check_config passed a 0600 root file, and the
/// issuer's user (the test binary again, as nobody) failed to load it
/// with "Permission denied". Now the start reads it again right after the
/// drop (`check_reloadable`, called by main.rs after `drop_alone`) and
/// stops, saying why. Control: the same file 0644 passes as nobody.
#[test]
fn s6_4_a_root_only_issuer_toml_stops_the_start() {
    let main = include_str!("../../main.rs");
    assert!(
        main.contains(
            "privilege::drop_alone(target)?;\n        // Every SIGHUP reads issuer.toml as this user: one it cannot read\n        // stops the start, not each reload.\n        server::check_reloadable(path, &target.user)?;"
        ),
        "the start reads issuer.toml again right after the drop"
    );
    if !is_root() {
        return;
    }
    let dir = root_only_tempdir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("issuer.toml");
    std::fs::write(&path, issuer_toml(Some("nobody"), "")).unwrap();
    let start_as_nobody = || {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "issuer::tests::attack6::as_the_issuers_user_read_issuer_toml_again",
                "--ignored",
                "--nocapture",
            ])
            .env("GATEWAY_TEST_ISSUER_TOML", &path)
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .unwrap()
    };
    let target = Target::alone("nobody").unwrap();

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    target.check_config(&path).unwrap();
    let out = start_as_nobody();
    assert!(out.status.success(), "control: {out:?}");

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    target
        .check_config(&path)
        .expect("root's, writable by root alone");
    let out = start_as_nobody();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("REFUSED: issuer.toml read again as user \"nobody\"")
            && said.contains("Permission denied")
            && said.contains("every SIGHUP reads it as that user"),
        "{said}"
    );
}

/// S6-6: refusal log lines are limited per device and reason, and
/// `/v1/nonce`'s refusal (a device holding 8 nonces) was reason `nonce`
/// like a stolen token's at `/v1/certificate` and `/v1/renewal` (a nonce
/// of another device, used up, unknown), and `/v1/nonce` took nothing
/// from the device's rate. A thief with an enrolled device of their own
/// first asked for nonces until refused (free, unlimited), which spent
/// the device's 5 `nonce` lines (and, repeated, each minute's one), then
/// tried the victim's ID token: refused and counted, but no line named
/// the victim (measured: 12 free refusals, `refused{nonce}` 13,
/// `refusals_unlogged` 8, alice in no line). Now `/v1/nonce`'s refusal is
/// `nonce_quota` and takes from the device's rate (then `rate_limited`),
/// and once a token is verified its refusal's lines are the user's too:
/// the thief's own tokens refused `nonce` do not silence the victim's.
/// Control: without the flood the theft's line names alice.
#[tokio::test]
async fn s6_6_a_thiefs_nonce_flood_is_rate_limited_and_the_victim_is_logged() {
    let evil = device("spiffe://example.internal/device/evil-1");
    let theft = |s: &Setup| {
        // Alice's sign-in on her laptop: its nonce, her token.
        let nonce = s.issuer.nonce(Some(&device(LAPTOP))).unwrap();
        token(&s.key, &claims(&nonce))
    };
    let capture = || {
        let logs = Captured::default();
        let writer = logs.clone();
        let guard = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .finish(),
        );
        (logs, guard)
    };
    let text = |logs: &Captured| String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();

    // Control.
    let s = setup("");
    let (logs, guard) = capture();
    let e = s
        .issuer
        .issue(Some(&evil), request(theft(&s)))
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "nonce", "{e}");
    drop(guard);
    let logged = text(&logs);
    assert!(
        logged.contains("alice@example.internal") && logged.contains("evil-1"),
        "control: the theft is logged with the victim: {logged}"
    );

    // The flood, at the default rate (5 at once): its refusals are its
    // own reason, then the device's rate stops it.
    let s = setup("");
    let reasons: Vec<&str> = (0..20)
        .filter_map(|_| s.issuer.nonce(Some(&evil)).err())
        .map(|e| e.reason())
        .collect();
    assert_eq!(reasons.len(), 12, "8 held, then refused");
    assert_eq!(reasons[..5], ["nonce_quota"; 5], "{reasons:?}");
    assert!(
        reasons[5..].iter().all(|r| *r == "rate_limited"),
        "behind the device's rate: {reasons:?}"
    );
    let c = s.issuer.counters();
    assert_eq!(c.refused.get("nonce"), None, "no `nonce` spent");

    // With room in the device's rate: the flood, then the thief's own
    // token refused `nonce` over and over, then alice's.
    let s = setup(
        "[limits]\nper_device = { burst = 50, per_hour = 50 }\nper_user = { burst = 50, per_hour = 50 }\n",
    );
    let (logs, guard) = capture();
    let refused = (0..20)
        .filter(|_| s.issuer.nonce(Some(&evil)).is_err())
        .count();
    assert_eq!(refused, 12);
    for _ in 0..10 {
        let mut c = claims("made-up");
        c["email"] = json!("mallory@example.internal");
        let e = s
            .issuer
            .issue(Some(&evil), request(token(&s.key, &c)))
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "nonce", "{e}");
    }
    let e = s
        .issuer
        .issue(Some(&evil), request(theft(&s)))
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "nonce", "{e}");
    drop(guard);
    let logged = text(&logs);
    assert!(
        logged
            .lines()
            .any(|l| l.contains("alice@example.internal") && l.contains("evil-1")),
        "the victim is logged: {logged}"
    );
    let c = s.issuer.counters();
    assert_eq!(c.refused.get("nonce"), Some(&11), "counted");
    assert_eq!(c.refused.get("nonce_quota"), Some(&12), "counted");
}

/// The other half of `s6_7_a_user_whose_group_is_root_is_refused`: run
/// in a mount namespace whose /etc/passwd has that user; what the
/// issuer's `Target::alone` and the gateway's `Target::resolve` make of it.
#[test]
#[ignore = "run by another test, in a mount namespace"]
fn in_a_namespace_resolve_the_issuers_user() {
    let Ok(user) = std::env::var("GATEWAY_TEST_ISSUER_USER") else {
        return;
    };
    match Target::alone(&user) {
        Ok(t) => println!("TARGET uid={} gid={} groups={:?}", t.uid, t.gid, t.groups),
        Err(e) => println!("ISSUER REFUSED: {e}"),
    }
    let text = format!(
        "user = \"{user}\"\n[admission]\nkernel_block_list = false\n[[listeners]]\nname = \"e\"\n\
         bind = \"127.0.0.1:8443\"\ncert = \"c.pem\"\nkey = \"k.key\"\nclient_ca = \"ca.pem\"\n\
         [[listeners.routes]]\nname = \"r\"\nbackends = [\"127.0.0.1:1\"]\n"
    );
    let config = crate::config::Config::parse(&text, Path::new("g.toml"), Path::new("/")).unwrap();
    match Target::resolve(&config) {
        Ok(Some(t)) => println!("GATEWAY uid={} gid={} groups={:?}", t.uid, t.gid, t.groups),
        Ok(None) => println!("GATEWAY none"),
        Err(e) => println!("GATEWAY REFUSED: {e}"),
    }
}

/// S6-7: `Target::alone` refused uid 0 but took the user's primary group
/// whatever it was, 0 included (RHEL's `operator`, `sync`, `halt`,
/// `shutdown` have group root): the issuer "dropped" to group root, and
/// its verify (`verify_alone`) compared with that target, so nothing
/// noticed. The gateway's own `Target::resolve` had the same gap.
/// Measured (before the fix) in a mount namespace whose /etc/passwd adds
/// `op:x:11:0`: the target was uid 11, gid 0. Now both refuse it, naming
/// root's group, and the post-drop check (`mismatch`) refuses a gid or
/// group 0 even in a target that has it. Control: nobody resolves to gid
/// 65534 in both.
#[test]
fn s6_7_a_user_whose_group_is_root_is_refused() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    let mut text = std::fs::read_to_string("/etc/passwd").unwrap();
    text.push_str("op:x:11:0:operator:/:/usr/sbin/nologin\n");
    std::fs::write(&passwd, text).unwrap();
    let resolve = |user: &str| {
        std::process::Command::new("unshare")
            .arg("-m")
            .arg("sh")
            .arg("-c")
            .arg(format!(
                "mount --bind {} /etc/passwd && exec {} --exact issuer::tests::attack6::in_a_namespace_resolve_the_issuers_user --ignored --nocapture",
                passwd.display(),
                std::env::current_exe().unwrap().display()
            ))
            .env("GATEWAY_TEST_ISSUER_USER", user)
            .output()
            .unwrap()
    };
    let out = resolve("nobody");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() && said.is_empty() {
        return; // no mount namespaces here
    }
    assert!(
        said.contains("TARGET uid=65534 gid=65534 groups=[]")
            && said.contains("GATEWAY uid=65534 gid=65534 groups=[65534]"),
        "control: {out:?}"
    );
    let out = resolve("op");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!said.contains("gid=0"), "group root taken: {out:?}");
    assert!(
        said.contains("ISSUER REFUSED: user \"op\": its primary group is root's (gid 0)")
            && said.contains("GATEWAY REFUSED: user \"op\": its primary group is root's (gid 0)"),
        "{out:?}"
    );

    // After the drop: a thread in group 0 is refused even when the target
    // says gid 0 (a target made some other way).
    let target = Target {
        user: "op".into(),
        uid: 11,
        gid: 0,
        groups: Vec::new(),
        kept: Vec::new(),
    };
    let status = "Uid:\t11\t11\t11\t11\nGid:\t0\t0\t0\t0\nGroups:\t\n\
                  CapInh:\t0000000000000000\nCapPrm:\t0000000000000000\n\
                  CapEff:\t0000000000000000\nCapBnd:\t0000000000000000\n\
                  CapAmb:\t0000000000000000\nNoNewPrivs:\t1\n";
    let why = crate::privilege::mismatch(status, &target, 0).expect("gid 0 refused");
    assert!(why.contains("includes root's group 0"), "{why}");
    let fine = status.replace("Gid:\t0\t0\t0\t0", "Gid:\t11\t11\t11\t11");
    let target = Target { gid: 11, ..target };
    assert_eq!(
        crate::privilege::mismatch(&fine, &target, 0),
        None,
        "control"
    );
}

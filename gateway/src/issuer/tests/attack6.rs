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
/// SSO CA's key. 67df6d1, merged beside it, tells the operator the
/// opposite: a root start without `user` warns "set user = \"gateway\"
/// (the store chowned to it)", docs/sso.md's issuer.toml shows `# user =
/// "gateway"`, "Running as its user" says the shipped unit runs it as
/// `gateway` (`User=gateway`, false since S4-4) and its own error message
/// says `chown -R gateway: …/sso`. An operator who follows the product's
/// own words gives the CA's key to the gateway's user, and nothing at
/// start refuses `user` = the gateway's user. Control: the units as S4-4
/// left them.
#[test]
fn s6_2_the_issuers_warning_and_docs_tell_the_operator_to_run_it_as_the_gateways_user() {
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
        main.contains(r#"set user = \"gateway\" (the store chowned to it)"#),
        "the root-start warning names the gateway's user"
    );
    let docs = include_str!("../../../../docs/sso.md");
    assert!(
        docs.contains(r#"# user = "gateway""#),
        "issuer.toml example"
    );
    assert!(
        docs.contains("The shipped unit starts the issuer as `gateway` (`User=gateway`)"),
        "docs say the shipped unit runs the issuer as the gateway's user"
    );
    assert!(
        docs.contains("chown -R gateway: …/sso"),
        "docs' example error tells to chown the SSO CA to the gateway's user"
    );
}

/// S6-3: `check_config` (the start refused if the dropped-to user could
/// rewrite issuer.toml) looks at the file, its directory and a symlink's
/// target, never at the directories above. With issuer.toml in a
/// root-owned directory under one the issuer's user owns (here
/// `state/conf/issuer.toml`, `state` the user's, as a store's parent or a
/// home directory would be), the start passes the check, and the dropped
/// process (as that user: here a shell as nobody) renames `conf` away and
/// puts its own issuer.toml there, without `user`: root's next start reads
/// it and, `user` gone, only warns and stays root. Control: the same file
/// with its own directory the user's is refused.
#[test]
fn s6_3_an_issuer_toml_under_a_directory_the_user_owns_passes_and_is_rewritten() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(NOBODY), Some(NOBODY)).unwrap();
    let conf = state.join("conf");
    std::fs::create_dir(&conf).unwrap(); // root's, 0755
    let path = conf.join("issuer.toml");
    std::fs::write(&path, issuer_toml(Some("nobody"), "")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let target = Target::alone("nobody").unwrap();

    // Control: a directory of the user's own is refused.
    let own = state.join("own");
    std::fs::create_dir(&own).unwrap();
    std::os::unix::fs::chown(&own, Some(NOBODY), Some(NOBODY)).unwrap();
    std::fs::write(own.join("issuer.toml"), issuer_toml(Some("nobody"), "")).unwrap();
    assert!(
        target.check_config(&own.join("issuer.toml")).is_err(),
        "control"
    );

    // The harm: passes, then the user rewrites it.
    target
        .check_config(&path)
        .expect("passes: only the file and its directory are looked at");
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "mv {conf} {state}/old && mkdir {conf} && cat > {conf}/issuer.toml",
            conf = conf.display(),
            state = state.display()
        ))
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write as _;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(issuer_toml(None, "").as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let config = IssuerConfig::load(&path).unwrap();
    assert_eq!(config.user, None, "root's next start: no user, stays root");
}

/// The issuer's user's half of
/// `s6_4_a_root_only_issuer_toml_passes_the_start_and_every_sighup_fails`:
/// what the dropped issuer does on SIGHUP, `IssuerConfig::load` of the
/// path it was started with.
#[test]
#[ignore = "run by another test, as another user"]
fn as_the_issuers_user_read_issuer_toml_again() {
    let Ok(path) = std::env::var("GATEWAY_TEST_ISSUER_TOML") else {
        return;
    };
    IssuerConfig::load(Path::new(&path)).unwrap();
}

/// S6-4: with `user`, root reads issuer.toml at start and the dropped
/// user reads it on every SIGHUP (`server::reload_config` loads it by
/// path). The start checks only that the user cannot write it, not that
/// it can read it: the most natural root-only file (root's, 0600) starts
/// fine, and every reload then fails (logged, counted), so a tightened
/// config (a profile or email domain removed, `require_amr` added) is
/// never put in service while the old one keeps issuing. docs/sso.md
/// says the files the user must read stop "the start rather than the
/// first reload". Measured: check_config passes a 0600 root file, and the
/// issuer's user (the test binary again, as nobody) fails to load it.
/// Control: the same file 0644 loads as nobody.
#[test]
fn s6_4_a_root_only_issuer_toml_passes_the_start_and_every_sighup_fails() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("issuer.toml");
    std::fs::write(&path, issuer_toml(Some("nobody"), "")).unwrap();
    let reload_as_nobody = || {
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
    let out = reload_as_nobody();
    assert!(out.status.success(), "control: {out:?}");

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    target
        .check_config(&path)
        .expect("the start's check passes a file the user cannot read");
    IssuerConfig::load(&path).expect("root reads it at start");
    let out = reload_as_nobody();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("Permission denied"), "{said}");
}

/// S6-6: refusal log lines are limited per device and reason, and
/// `/v1/nonce`'s refusal (a device holding 8 nonces) is reason `nonce`
/// like a stolen token's at `/v1/certificate` and `/v1/renewal` (a nonce
/// of another device, used up, unknown), and `/v1/nonce` takes nothing
/// from the device's rate. A thief with an enrolled device of their own
/// first asks for nonces until refused (free, unlimited), which spends
/// the device's 5 `nonce` lines (and, repeated, each minute's one), then
/// tries the victim's ID token: refused and counted, but no line names
/// the victim. Control: without the burnt lines the theft's line names
/// alice.
#[tokio::test]
async fn s6_6_a_thief_spends_the_nonce_log_lines_first_and_the_victim_is_never_logged() {
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

    // The thief spends the lines first.
    let s = setup("");
    let (logs, guard) = capture();
    let mut refused = 0;
    for _ in 0..20 {
        if s.issuer.nonce(Some(&evil)).is_err() {
            refused += 1;
        }
    }
    assert_eq!(refused, 12, "8 held, then refused, never rate limited");
    let e = s
        .issuer
        .issue(Some(&evil), request(theft(&s)))
        .await
        .unwrap_err();
    assert_eq!(e.reason(), "nonce", "{e}");
    drop(guard);
    let logged = text(&logs);
    assert!(
        !logged.contains("alice@example.internal"),
        "the victim is in no line: {logged}"
    );
    let c = s.issuer.counters();
    assert_eq!(c.refused.get("nonce"), Some(&13), "counted");
    assert_eq!(c.refusals_unlogged, 8, "7 of the burn and the theft");
}

/// The other half of `s6_7_a_user_whose_group_is_root_keeps_gid_0`: run
/// in a mount namespace whose /etc/passwd has that user.
#[test]
#[ignore = "run by another test, in a mount namespace"]
fn in_a_namespace_resolve_the_issuers_user() {
    let Ok(user) = std::env::var("GATEWAY_TEST_ISSUER_USER") else {
        return;
    };
    let t = Target::alone(&user).unwrap();
    println!("TARGET uid={} gid={} groups={:?}", t.uid, t.gid, t.groups);
}

/// S6-7: `Target::alone` refuses uid 0 but takes the user's primary group
/// whatever it is, 0 included (RHEL's `operator`, `sync`, `halt`,
/// `shutdown` have group root): the issuer "drops" to group root, and its
/// verify (`verify_alone`) compares with that target, so nothing notices.
/// The gateway's own `Target::resolve` has the same gap. Measured in a
/// mount namespace whose /etc/passwd adds `op:x:11:0`: the target is uid
/// 11, gid 0. Control: nobody resolves to gid 65534.
#[test]
fn s6_7_a_user_whose_group_is_root_keeps_gid_0() {
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
        said.contains("TARGET uid=65534 gid=65534 groups=[]"),
        "control: {out:?}"
    );
    let out = resolve("op");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        said.contains("TARGET uid=11 gid=0 groups=[]"),
        "group root taken: {out:?}"
    );
}

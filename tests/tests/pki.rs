//! `gateway pki` as an operator runs it: what it writes verifies with the
//! gateway and with openssl, is refused for the wrong purpose, and revocation
//! reaches the gateway through the CRL.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use gateway_tests::*;
use rustls::AlertDescription;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Runs `gateway pki ARGS`; returns stdout, panics with stderr on failure.
fn pki(args: &[&str]) -> String {
    let out = Command::new(gateway_binary())
        .arg("pki")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gateway pki {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn pki_fails(args: &[&str]) -> String {
    let out = Command::new(gateway_binary())
        .arg("pki")
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "gateway pki {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl installed (cargo xtask setup)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Client credentials from a `gateway pki issue` pair.
fn creds(dir: &Path, name: &str) -> ClientCreds {
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}.key"));
    ClientCreds {
        chain: CertificateDer::pem_file_iter(&cert_path)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap(),
        key_pem: std::fs::read_to_string(&key_path).unwrap(),
        cert_path,
        key_path,
    }
}

/// A gateway serving with the store's server certificate, trusting its CA.
async fn gateway_on(
    pki_dir: &Path,
    harness: &Pki,
    backend: &EchoBackend,
    crl: bool,
) -> RunningGateway {
    let crls = if crl {
        format!("crls = [\"{}\"]", s(&pki_dir.join("crl.pem")))
    } else {
        String::new()
    };
    let toml = format!(
        "[[listeners]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n{crls}\n",
        s(&pki_dir.join("gw.pem")),
        s(&pki_dir.join("gw.key")),
        s(&pki_dir.join("ca.pem")),
    ) + &route_toml(
        "orders",
        &[],
        &[backend.addr],
        &["spiffe://example.internal/ns/shop/sa/frontend"],
    );
    RunningGateway::start(harness, &toml).await
}

/// A client config trusting the store's CA.
fn client_config(dir: &Path, creds: Option<&ClientCreds>) -> std::sync::Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(gateway::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    std::sync::Arc::new(match creds {
        Some(c) => b
            .with_client_auth_cert(
                c.chain.clone(),
                PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    })
}

/// `gateway pki issue client` with one SAN.
fn issue_client(dir: &Path, name: &str, san: &str) {
    pki(&[
        "issue",
        "client",
        "--dir",
        s(dir),
        "--name",
        name,
        "--san",
        san,
    ]);
}

/// `pki init`, and a server certificate; what `init` printed.
fn init(dir: &Path) -> String {
    let out = pki(&["init", "--dir", s(dir), "--name", "Example"]);
    pki(&[
        "issue",
        "server",
        "--dir",
        s(dir),
        "--name",
        "gw",
        "--san",
        "dns:orders.example.internal",
    ]);
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn issued_certificates_work_with_the_gateway_and_only_for_their_purpose() {
    let harness = Pki::new();
    let dir: PathBuf = harness.path("pki");
    init(&dir);
    for key in ["root.key", "intermediate.key", "gw.key"] {
        let mode = std::fs::metadata(dir.join(key))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    issue_client(
        &dir,
        "frontend",
        "spiffe://example.internal/ns/shop/sa/frontend",
    );
    pki(&[
        "issue",
        "client",
        "--dir",
        s(&dir),
        "--name",
        "frontend-ed",
        "--key-type",
        "ed25519",
        "--san",
        "spiffe://example.internal/ns/shop/sa/frontend",
    ]);
    let backend = EchoBackend::start().await;
    let gw = gateway_on(&dir, &harness, &backend, false).await;
    let sni = "orders.example.internal";
    for name in ["frontend", "frontend-ed"] {
        let c = creds(&dir, name);
        let tls = connect(gw.app_addr, sni, client_config(&dir, Some(&c)))
            .await
            .unwrap();
        assert_eq!(
            echo_roundtrip(tls, name.as_bytes().to_vec()).await.unwrap(),
            name.as_bytes()
        );
    }
    // A server certificate presented as a client.
    let server_as_client = creds(&dir, "gw");
    assert_eq!(
        refusal(
            gw.app_addr,
            sni,
            client_config(&dir, Some(&server_as_client))
        )
        .await,
        AlertDescription::UnsupportedCertificate
    );
    // A client certificate as the gateway's own: refused at start.
    let toml = format!(
        "[[listeners]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
        s(&dir.join("frontend.pem")),
        s(&dir.join("frontend.key")),
        s(&dir.join("ca.pem"))
    ) + &route_toml("r", &[], &[backend.addr], &["dns:x"]);
    let config =
        gateway::Config::parse(&toml, &harness.path("g.toml"), harness.dir.path()).unwrap();
    let err = gateway::build(&config)
        .await
        .err()
        .expect("client cert refused as server cert");
    assert!(err.to_string().contains("no serverAuth"), "{err}");

    // openssl agrees with what was written.
    let (ok, out) = openssl(&[
        "verify",
        "-CAfile",
        s(&dir.join("ca.pem")),
        "-untrusted",
        s(&dir.join("intermediate.pem")),
        "-purpose",
        "sslclient",
        s(&dir.join("frontend.pem")),
    ]);
    assert!(ok, "{out}");
    let (ok, out) = openssl(&[
        "verify",
        "-CAfile",
        s(&dir.join("ca.pem")),
        "-untrusted",
        s(&dir.join("intermediate.pem")),
        "-purpose",
        "sslserver",
        s(&dir.join("frontend.pem")),
    ]);
    assert!(
        !ok,
        "a client certificate must not verify for server use: {out}"
    );
    let (ok, out) = openssl(&[
        "crl",
        "-in",
        s(&dir.join("crl.pem")),
        "-CAfile",
        s(&dir.join("intermediate.pem")),
        "-noout",
    ]);
    assert!(ok && out.contains("verify OK"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn revoke_publishes_a_crl_that_the_gateway_enforces() {
    let harness = Pki::new();
    let dir = harness.path("pki");
    init(&dir);
    issue_client(
        &dir,
        "lost-laptop",
        "spiffe://example.internal/ns/shop/sa/frontend",
    );
    issue_client(
        &dir,
        "frontend",
        "spiffe://example.internal/ns/shop/sa/frontend",
    );
    let out = pki(&["revoke", "--dir", s(&dir), s(&dir.join("lost-laptop.pem"))]);
    assert!(out.contains("revoked lost-laptop"), "{out}");
    let (ok, out) = openssl(&["crl", "-in", s(&dir.join("crl.pem")), "-noout", "-text"]);
    assert!(ok && out.contains("Revoked Certificates"), "{out}");

    let backend = EchoBackend::start().await;
    let gw = gateway_on(&dir, &harness, &backend, true).await;
    let sni = "orders.example.internal";
    let lost = creds(&dir, "lost-laptop");
    assert_eq!(
        refusal(gw.app_addr, sni, client_config(&dir, Some(&lost))).await,
        AlertDescription::CertificateRevoked
    );
    let ok = creds(&dir, "frontend");
    let tls = connect(gw.app_addr, sni, client_config(&dir, Some(&ok)))
        .await
        .unwrap();
    assert_eq!(echo_roundtrip(tls, b"ok".to_vec()).await.unwrap(), b"ok");
}

#[test]
fn wildcards_and_invalid_spiffe_ids_are_refused_at_issue_time_and_inspect_explains_refusals() {
    let harness = Pki::new();
    let dir = harness.path("pki");
    init(&dir);
    let err = pki_fails(&[
        "issue",
        "server",
        "--dir",
        s(&dir),
        "--name",
        "star",
        "--san",
        "dns:*.example.internal",
    ]);
    assert!(err.contains("wildcard"), "{err}");
    assert!(!dir.join("star.pem").exists());
    let err = pki_fails(&[
        "issue",
        "client",
        "--dir",
        s(&dir),
        "--name",
        "slash",
        "--san",
        "spiffe://example.internal/ns/shop/sa/bad/",
    ]);
    assert!(err.contains("not a valid SPIFFE ID"), "{err}");
    assert!(!dir.join("slash.pem").exists());
    assert!(pki_fails(&["init", "--dir", s(&dir)]).contains("already exists"));

    pki(&[
        "issue",
        "client",
        "--dir",
        s(&dir),
        "--name",
        "alice",
        "--san",
        "email:alice@example.internal",
        "--lifetime",
        "8h",
    ]);
    let out = pki(&[
        "inspect",
        s(&dir.join("alice.pem")),
        "--client-ca",
        s(&dir.join("ca.pem")),
    ]);
    assert!(
        out.contains(r#"identity: ["email:alice@example.internal"]"#),
        "{out}"
    );
    assert!(out.contains("EKU:      clientAuth"), "{out}");
    assert!(out.contains("verifies to"), "{out}");
    // The server certificate, inspected as a client would be: refused, with why.
    let out = Command::new(gateway_binary())
        .args([
            "pki",
            "inspect",
            s(&dir.join("gw.pem")),
            "--client-ca",
            s(&dir.join("ca.pem")),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("refused:  certificate lacks the clientAuth extended key usage"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn expiry_within_the_horizon_is_warned_about_failed_on_and_exported() {
    let harness = Pki::new();
    let dir = harness.path("pki");
    pki(&["init", "--dir", s(&dir)]);
    pki(&[
        "issue",
        "server",
        "--dir",
        s(&dir),
        "--name",
        "gw",
        "--san",
        "dns:orders.example.internal",
        "--lifetime",
        "10d",
    ]);
    let backend = EchoBackend::start().await;
    let toml = format!(
        "admin = \"127.0.0.1:0\"\nexpiry_warning = \"30d\"\n[[listeners]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\ncrls = [\"{}\"]\n",
        s(&dir.join("gw.pem")),
        s(&dir.join("gw.key")),
        s(&dir.join("ca.pem")),
        s(&dir.join("crl.pem")),
    ) + &route_toml("orders", &[], &[backend.addr], &["dns:x.example.internal"]);
    let config = harness.write("gateway.toml", &toml);

    let check = |extra: &[&str]| {
        let out = Command::new(gateway_binary())
            .args(["check", "--config", s(&config)])
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, out) = check(&[]);
    assert!(ok, "{out}");
    assert!(
        out.contains("warning: listener edge cert certificate CN=gw"),
        "{out}"
    );
    // Whole seconds in the certificate: "10 days" just after issue, then "9 days".
    assert!(
        out.contains("expires in 9 days") || out.contains("expires in 10 days"),
        "{out}"
    );
    assert!(
        !out.contains("CN=gateway root CA"),
        "the root is far from expiry: {out}"
    );
    let (ok, out) = check(&["--fail-within", "14d"]);
    assert!(!ok, "{out}");
    assert!(out.contains("critical: listener edge cert"), "{out}");

    // The running gateway exports seconds to expiry for certificates and the CRL.
    let gw = RunningGateway::start(&harness, &std::fs::read_to_string(&config).unwrap()).await;
    let metrics = gw.scrape().await;
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("gateway_certificate_expiry_seconds{role=\"listener edge cert\"")
                && l.contains("CN=gw")
        })
        .unwrap_or_else(|| panic!("{metrics}"));
    let secs: i64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((9 * 86_400..=10 * 86_400).contains(&secs), "{line}");
    assert!(
        metrics.contains("gateway_crl_next_update_seconds{role=\"listener edge crl\""),
        "{metrics}"
    );
}

/// `crl.pem` carries the intermediate's CRL and the root's, so a bundle
/// naming it checks revocation along the chain. The daily re-publish needs
/// no root key; revoking the intermediate does, and then every leaf under
/// it is refused, by the gateway and by openssl alike.
#[tokio::test(flavor = "multi_thread")]
async fn the_root_revokes_the_intermediate_and_only_that_needs_the_root_key() {
    let harness = Pki::new();
    let dir = harness.path("pki");
    let printed = init(&dir);
    issue_client(
        &dir,
        "frontend",
        "spiffe://example.internal/ns/shop/sa/frontend",
    );
    let crls_in = |path: &Path| {
        std::fs::read_to_string(path)
            .unwrap()
            .matches("-----BEGIN X509 CRL-----")
            .count()
    };
    assert_eq!(crls_in(&dir.join("crl.pem")), 2);
    let verify = || {
        openssl(&[
            "verify",
            "-crl_check_all",
            "-CRLfile",
            s(&dir.join("crl.pem")),
            "-CAfile",
            s(&dir.join("ca.pem")),
            "-untrusted",
            s(&dir.join("intermediate.pem")),
            s(&dir.join("frontend.pem")),
        ])
    };
    let (ok, out) = verify();
    assert!(ok, "{out}");
    let backend = EchoBackend::start().await;
    let sni = "orders.example.internal";
    let frontend = creds(&dir, "frontend");
    {
        let gw = gateway_on(&dir, &harness, &backend, true).await;
        let tls = connect(gw.app_addr, sni, client_config(&dir, Some(&frontend)))
            .await
            .unwrap();
        assert_eq!(echo_roundtrip(tls, b"ok".to_vec()).await.unwrap(), b"ok");
    }

    // The root key offline: the daily CRL still goes out with the root's.
    let offline = harness.path("root.key.offline");
    std::fs::rename(dir.join("root.key"), &offline).unwrap();
    pki(&["crl", "--dir", s(&dir)]);
    assert_eq!(crls_in(&dir.join("crl.pem")), 2);
    let int = dir.join("intermediate.pem");
    let err = pki_fails(&["revoke", "--dir", s(&dir), "--intermediate", s(&int)]);
    assert!(
        err.contains("needs the root key") && err.contains("--root-key"),
        "{err}"
    );

    // Never without saying so: it takes every certificate with it.
    let err = pki_fails(&["revoke", "--dir", s(&dir), s(&int)]);
    assert!(err.contains("--intermediate"), "{err}");
    // The root key from where it is kept (S7-1); the fingerprint printed
    // is openssl's, and init's.
    let (ok, fingerprint) = openssl(&["x509", "-in", s(&int), "-noout", "-fingerprint", "-sha256"]);
    assert!(ok, "{fingerprint}");
    let fingerprint = fingerprint.trim().rsplit('=').next().unwrap().to_owned();
    assert!(printed.contains(&fingerprint), "{printed}");
    // The root's CRL also goes where the store's owner cannot write
    // (S11-2): without saying where, nothing is signed.
    let revoke = [
        "revoke",
        "--dir",
        s(&dir),
        "--intermediate",
        s(&int),
        "--root-key",
        s(&offline),
    ];
    let err = pki_fails(&revoke);
    assert!(err.contains("--root-crl-out"), "{err}");
    let root_crl = harness.path("root.crl.out.pem");
    // A file not there yet is no history without saying it is the first
    // (S12-3): this store was made without --root-crl-out.
    let err = pki_fails(&[&revoke[..], &["--root-crl-out", s(&root_crl)]].concat());
    assert!(
        err.contains("no file here") && err.contains("--root-crl-new"),
        "{err}"
    );
    let out = pki(&[
        &revoke[..],
        &["--root-crl-out", s(&root_crl), "--root-crl-new"],
    ]
    .concat());
    assert!(out.contains("revoked intermediate"), "{out}");
    assert!(out.contains(s(&root_crl)), "{out}");
    assert!(out.contains("proves nothing"), "{out}");
    assert!(out.contains(&fingerprint), "{out}");
    assert!(!out.contains("WARNING"), "{out}");
    let (ok, out) = verify();
    assert!(!ok && out.contains("certificate revoked"), "{out}");
    let gw = gateway_on(&dir, &harness, &backend, true).await;
    assert_eq!(
        refusal(gw.app_addr, sni, client_config(&dir, Some(&frontend))).await,
        AlertDescription::CertificateRevoked
    );
    assert_eq!(backend.accepted(), 1);
}

/// `--lifetime` and `--next-update` take the config's duration syntax:
/// one way to write a duration everywhere.
#[test]
fn lifetimes_take_the_config_duration_syntax() {
    let harness = Pki::new();
    let dir = harness.path("pki");
    init(&dir);
    pki(&[
        "issue",
        "client",
        "--dir",
        s(&dir),
        "--name",
        "brief",
        "--san",
        "spiffe://example.internal/brief",
        "--lifetime",
        "90s",
    ]);
    let text = pki(&["inspect", s(&dir.join("brief.pem"))]);
    assert!(text.contains("brief"), "{text}");
    pki(&["crl", "--dir", s(&dir), "--next-update", "36h"]);
    let err = pki_fails(&[
        "issue",
        "client",
        "--dir",
        s(&dir),
        "--name",
        "never",
        "--san",
        "spiffe://example.internal/never",
        "--lifetime",
        "90 fortnights",
    ]);
    assert!(err.contains("unknown unit"), "{err}");
}

/// `--permitted-dns` is kept at issue time too: a DNS name outside it is
/// refused rather than signed into a certificate every verifier rejects;
/// one inside verifies with openssl.
#[test]
fn issue_refuses_dns_names_outside_the_permitted_domain() {
    let harness = Pki::new();
    let dir = harness.path("pki");
    pki(&[
        "init",
        "--dir",
        s(&dir),
        "--name",
        "Constrained",
        "--permitted-dns",
        "example.internal",
    ]);
    for outside in [
        "dns:orders.example.org",
        "dns:example.internal.evil",
        "dns:xexample.internal",
    ] {
        let err = pki_fails(&[
            "issue",
            "server",
            "--dir",
            s(&dir),
            "--name",
            "outside",
            "--san",
            outside,
        ]);
        assert!(
            err.contains("outside the intermediate's name constraints"),
            "{err}"
        );
        assert!(!dir.join("outside.pem").exists(), "{outside} was written");
    }
    pki(&[
        "issue",
        "server",
        "--dir",
        s(&dir),
        "--name",
        "inside",
        "--san",
        "dns:orders.example.internal",
        "--san",
        "spiffe://example.internal/orders",
    ]);
    let (ok, text) = openssl(&[
        "verify",
        "-CAfile",
        s(&dir.join("ca.pem")),
        "-untrusted",
        s(&dir.join("inside.pem")),
        s(&dir.join("inside.pem")),
    ]);
    assert!(ok, "{text}");
}

/// `inspect` reads the PKI directory's CRL unless told otherwise: a
/// revoked certificate is not called usable.
#[test]
fn inspect_checks_the_crl_beside_the_certificate() {
    let harness = Pki::new();
    let dir = harness.path("pki");
    init(&dir);
    issue_client(&dir, "lost", "spiffe://example.internal/lost");
    let cert = dir.join("lost.pem");
    let text = pki(&["inspect", s(&cert)]);
    assert!(text.contains("usable as a client certificate"), "{text}");
    pki(&["revoke", "--dir", s(&dir), s(&cert)]);

    let out = Command::new(gateway_binary())
        .args(["pki", "inspect", s(&cert)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("is revoked by the CRL"), "{text}");
    assert!(!text.contains("usable as a client"), "{text}");

    // Explicitly, by path; and --no-crl to look at the rest only.
    let err = pki_fails(&["inspect", s(&cert), "--crl", s(&dir.join("crl.pem"))]);
    assert!(err.contains("would refuse"), "{err}");
    let text = pki(&["inspect", s(&cert), "--no-crl"]);
    assert!(text.contains("usable as a client certificate"), "{text}");
}

/// An Ed25519 key is written as PKCS#8 v1, which OpenSSL 3.0 loads (it
/// refuses v2), and still works with the gateway.
#[tokio::test(flavor = "multi_thread")]
async fn ed25519_keys_load_in_openssl_and_the_gateway() {
    let harness = Pki::new();
    let dir = harness.path("pki");
    init(&dir);
    pki(&[
        "issue",
        "client",
        "--dir",
        s(&dir),
        "--name",
        "ed",
        "--san",
        "spiffe://example.internal/ns/shop/sa/frontend",
        "--key-type",
        "ed25519",
    ]);
    let key = dir.join("ed.key");
    let (ok, text) = openssl(&["pkey", "-in", s(&key), "-noout", "-text"]);
    assert!(ok && text.contains("ED25519"), "{text}");
    let (_, asn1) = openssl(&["asn1parse", "-in", s(&key)]);
    assert!(
        asn1.lines()
            .nth(1)
            .is_some_and(|l| l.contains("INTEGER") && l.contains(":00")),
        "v1: {asn1}"
    );
    // The pair still matches for rustls (the gateway's own loader).
    let ed = creds(&dir, "ed");
    let backend = EchoBackend::start().await;
    let gw = gateway_on(&dir, &harness, &backend, true).await;
    let tls = connect(
        gw.app_addr,
        "orders.example.internal",
        client_config(&dir, Some(&ed)),
    )
    .await
    .unwrap();
    assert_eq!(echo_roundtrip(tls, b"ed".to_vec()).await.unwrap(), b"ed");

    // CA keys too: an Ed25519 intermediate, written as v1, signs again.
    let ed_dir = harness.path("ed-pki");
    pki(&["init", "--dir", s(&ed_dir), "--key-type", "ed25519"]);
    let (ok, text) = openssl(&["pkey", "-in", s(&ed_dir.join("intermediate.key")), "-noout"]);
    assert!(ok, "{text}");
    pki(&[
        "issue",
        "server",
        "--dir",
        s(&ed_dir),
        "--name",
        "srv",
        "--san",
        "dns:orders.example.internal",
        "--key-type",
        "ed25519",
    ]);
}

/// `init --root-key-out --ca-out --root-crl-out` (docs/sso.md "Setting it
/// up"): the root key goes only to its file (0600), never into the
/// directory; the routes' trust anchor is the root's certificate, the
/// fingerprint init prints (openssl's); the root's CRL is beside. A file
/// already at one of them is refused, nothing made (review 16, S16-1).
#[test]
fn init_writes_the_root_key_and_the_anchor_outside_the_directory() {
    use std::os::unix::fs::MetadataExt as _;
    let harness = Pki::new();
    let dir = harness.path("sso");
    let key = harness.path("sso-root.key");
    let anchor = harness.path("sso-ca.pem");
    let crl = harness.path("sso-root.crl.pem");
    let out = pki(&[
        "init",
        "--dir",
        s(&dir),
        "--name",
        "SSO",
        "--root-key-out",
        s(&key),
        "--ca-out",
        s(&anchor),
        "--root-crl-out",
        s(&crl),
    ]);
    assert!(!dir.join("root.key").exists(), "{out}");
    assert_eq!(std::fs::metadata(&key).unwrap().mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::read(&anchor).unwrap(),
        std::fs::read(dir.join("root.pem")).unwrap()
    );
    assert!(crl.exists());
    let (ok, fingerprint) = openssl(&[
        "x509",
        "-in",
        s(&anchor),
        "-noout",
        "-fingerprint",
        "-sha256",
    ]);
    assert!(ok, "{fingerprint}");
    let fingerprint = fingerprint.trim().rsplit('=').next().unwrap().to_owned();
    assert!(
        out.contains(&format!("root: SHA-256 fingerprint {fingerprint}")),
        "{out}"
    );
    // Again, with the anchor already there: refused, no second store.
    let again = harness.path("sso2");
    let err = pki_fails(&["init", "--dir", s(&again), "--ca-out", s(&anchor)]);
    assert!(err.contains("a file is already there"), "{err}");
    assert!(!again.exists());
}

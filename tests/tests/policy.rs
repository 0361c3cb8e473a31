//! The policy model end to end: modes (enforce, audit, off), narrowing trust
//! to one CA bundle, revocation by CRL, device-bound certificates, deny over
//! allow and source networks, each through the real handshake.

use gateway::access_log::Verdict;
use gateway::pki::{Authority, LeafSpec};
use gateway_tests::*;
use rustls::AlertDescription;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SNI: &str = "orders.example.internal";

fn route(backend: &EchoBackend, extra: &str) -> String {
    route_toml("orders", &[SNI], &[backend.addr], &[SPIFFE_FRONTEND]) + extra
}

#[tokio::test]
async fn audit_mode_lets_would_be_denials_through_logs_and_counts_them() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let toml = listener_toml(&pki, "edge", "") + &route(&backend, "mode = \"audit\"\n");
    let mut gw = RunningGateway::start(&pki, &toml).await;

    // Another identity, no certificate at all, and an untrusted issuer all pass.
    let other = pki.client("intruder", &LeafSpec::client("intruder", &[SPIFFE_OTHER]));
    let foreign_root = Authority::root("foreign").unwrap();
    let foreign = foreign_root
        .issue(&LeafSpec::client("f", &[SPIFFE_FRONTEND]))
        .unwrap();
    let foreign = pki.creds("foreign", &foreign, &foreign_root);
    let cases = [
        (
            Some(&other),
            "would deny: identity [\"spiffe://example.internal/ns/shop/sa/intruder\"] is not in the route's allow list",
        ),
        (None, "would deny: client presented no certificate"),
        (
            Some(&foreign),
            "would deny: client certificate refused: invalid peer certificate: UnknownIssuer",
        ),
    ];
    for (creds, reason) in cases {
        let tls = connect(gw.app_addr, SNI, pki.client_config(creds))
            .await
            .unwrap();
        assert_eq!(
            echo_roundtrip(tls, b"audited".to_vec()).await.unwrap(),
            b"audited"
        );
        let rec = gw.next_record().await;
        assert_eq!(rec.verdict, Verdict::Audit, "{rec:?}");
        assert_eq!(rec.mode.as_deref(), Some("audit"));
        assert_eq!(rec.reason, reason);
    }
    // The allowed client is simply allowed.
    let tls = connect(gw.app_addr, SNI, pki.frontend_config())
        .await
        .unwrap();
    echo_roundtrip(tls, b"ok".to_vec()).await.unwrap();
    assert_eq!(gw.next_record().await.verdict, Verdict::Allow);
    assert_eq!(gw.stats("orders"), (1, 0, 3));
    assert_eq!(backend.accepted(), 4);
}

#[tokio::test]
async fn mode_off_terminates_tls_without_asking_for_a_certificate() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let toml = listener_toml(&pki, "edge", "")
        + &route_toml("orders", &[SNI], &[backend.addr], &[])
        + "mode = \"off\"\n";
    let mut gw = RunningGateway::start(&pki, &toml).await;
    let tls = connect(gw.app_addr, SNI, pki.client_config(None))
        .await
        .unwrap();
    assert_eq!(
        echo_roundtrip(tls, b"plain tls".to_vec()).await.unwrap(),
        b"plain tls"
    );
    let rec = gw.next_record().await;
    assert_eq!(
        (rec.verdict, rec.mode.as_deref()),
        (Verdict::Allow, Some("off"))
    );
    assert_eq!(rec.identity, None);
}

#[tokio::test]
async fn a_service_certificate_cannot_open_a_user_route() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let users_root = Authority::root("users root").unwrap();
    let users = users_root.intermediate("users int").unwrap();
    let services_root = Authority::root("services root").unwrap();
    let services = services_root.intermediate("services int").unwrap();
    pki.write("users-ca.pem", &users_root.cert_pem);
    pki.write("services-ca.pem", &services_root.cert_pem);
    // The listener trusts both; the user route narrows to the users' CA.
    pki.write(
        "client-roots.pem",
        &format!("{}{}", users_root.cert_pem, services_root.cert_pem),
    );
    let toml = format!(
        "[trust.users]\nca = \"{}\"\n",
        pki.path("users-ca.pem").display()
    ) + &listener_toml(&pki, "edge", "")
        + &route_toml(
            "portal",
            &[SNI],
            &[backend.addr],
            &["email:alice@example.internal", SPIFFE_FRONTEND],
        )
        + "trust = \"users\"\n";
    let mut gw = RunningGateway::start(&pki, &toml).await;

    let alice = users
        .issue(&LeafSpec::client(
            "alice",
            &["email:alice@example.internal"],
        ))
        .unwrap();
    let alice = pki.creds("alice", &alice, &users);
    let tls = connect(gw.app_addr, SNI, pki.client_config(Some(&alice)))
        .await
        .unwrap();
    assert_eq!(
        echo_roundtrip(tls, b"alice".to_vec()).await.unwrap(),
        b"alice"
    );
    assert_eq!(gw.next_record().await.verdict, Verdict::Allow);

    // A service certificate, with an identity the route even lists.
    let svc = services
        .issue(&LeafSpec::client("frontend", &[SPIFFE_FRONTEND]))
        .unwrap();
    let svc = pki.creds("svc", &svc, &services);
    assert_eq!(
        refusal(gw.app_addr, SNI, pki.client_config(Some(&svc))).await,
        AlertDescription::UnknownCA
    );
    let rec = gw.next_record().await;
    assert_eq!(rec.verdict, Verdict::Deny);
    assert!(rec.reason.contains("UnknownIssuer"), "{}", rec.reason);
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test]
async fn a_revoked_client_is_refused_at_the_handshake() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let revoked = pki
        .intermediate
        .issue(&LeafSpec::client("frontend", &[SPIFFE_FRONTEND]))
        .unwrap();
    let crl = pki.intermediate.crl(1, &[&revoked.serial]).unwrap();
    pki.write("clients.crl.pem", &crl);
    let revoked = pki.creds("revoked", &revoked, &pki.intermediate);
    let toml =
        listener_toml(&pki, "edge", &pki.crls_line(&["clients.crl.pem"])) + &route(&backend, "");
    let mut gw = RunningGateway::start(&pki, &toml).await;
    assert_eq!(
        refusal(gw.app_addr, SNI, pki.client_config(Some(&revoked))).await,
        AlertDescription::CertificateRevoked
    );
    let rec = gw.next_record().await;
    assert!(rec.reason.contains("Revoked"), "{}", rec.reason);
    // The same identity with a certificate that is not revoked passes.
    let tls = connect(gw.app_addr, SNI, pki.frontend_config())
        .await
        .unwrap();
    assert_eq!(
        echo_roundtrip(tls, b"fresh".to_vec()).await.unwrap(),
        b"fresh"
    );
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test]
async fn device_routes_need_a_certificate_from_the_device_ca_naming_a_device() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let devices_root = Authority::root("devices root").unwrap();
    let devices = devices_root.intermediate("devices int").unwrap();
    pki.write("devices-ca.pem", &devices_root.cert_pem);
    pki.write(
        "client-roots.pem",
        &format!("{}{}", pki.root.cert_pem, devices_root.cert_pem),
    );
    let toml = format!(
        "[trust.devices]\nca = \"{}\"\n",
        pki.path("devices-ca.pem").display()
    ) + &listener_toml(&pki, "edge", "")
        + &route_toml(
            "admin",
            &[SNI],
            &[backend.addr],
            &["email:alice@example.internal"],
        )
        + "device = { trust = \"devices\", san_prefix = \"spiffe://example.internal/device/\" }\n";
    let mut gw = RunningGateway::start(&pki, &toml).await;

    let on_laptop = devices
        .issue(&LeafSpec::client(
            "alice",
            &[
                "email:alice@example.internal",
                "spiffe://example.internal/device/laptop-7",
            ],
        ))
        .unwrap();
    let on_laptop = pki.creds("alice-laptop", &on_laptop, &devices);
    let tls = connect(gw.app_addr, SNI, pki.client_config(Some(&on_laptop)))
        .await
        .unwrap();
    assert_eq!(
        echo_roundtrip(tls, b"managed".to_vec()).await.unwrap(),
        b"managed"
    );
    assert_eq!(gw.next_record().await.verdict, Verdict::Allow);

    // Right user, device CA, but no device SAN.
    let no_device = devices
        .issue(&LeafSpec::client(
            "alice",
            &["email:alice@example.internal"],
        ))
        .unwrap();
    let no_device = pki.creds("alice-nodevice", &no_device, &devices);
    assert_eq!(
        refusal(gw.app_addr, SNI, pki.client_config(Some(&no_device))).await,
        AlertDescription::AccessDenied
    );
    assert!(gw.next_record().await.reason.contains("no device identity"));

    // Right user and a device SAN, but from the ordinary users' CA.
    let unmanaged = pki.client(
        "alice-unmanaged",
        &LeafSpec::client(
            "alice",
            &[
                "email:alice@example.internal",
                "spiffe://example.internal/device/home-pc",
            ],
        ),
    );
    assert_eq!(
        refusal(gw.app_addr, SNI, pki.client_config(Some(&unmanaged))).await,
        AlertDescription::UnknownCA
    );
    assert!(
        gw.next_record()
            .await
            .reason
            .contains("not issued by the device CA")
    );
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test]
async fn deny_rules_and_source_networks_refuse_with_access_denied() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let toml = listener_toml(&pki, "edge", "")
        + &route_toml(
            "orders",
            &[SNI],
            &[backend.addr],
            &["spiffe-prefix:spiffe://example.internal/ns/shop/"],
        )
        + &format!("deny = [\"{SPIFFE_OTHER}\"]\n");
    let mut gw = RunningGateway::start(&pki, &toml).await;
    let tls = connect(gw.app_addr, SNI, pki.frontend_config())
        .await
        .unwrap();
    echo_roundtrip(tls, b"prefix".to_vec()).await.unwrap();
    assert_eq!(
        gw.next_record().await.reason,
        "allowed by spiffe-prefix:spiffe://example.internal/ns/shop/"
    );
    let other = pki.client("intruder", &LeafSpec::client("intruder", &[SPIFFE_OTHER]));
    assert_eq!(
        refusal(gw.app_addr, SNI, pki.client_config(Some(&other))).await,
        AlertDescription::AccessDenied
    );
    assert!(gw.next_record().await.reason.contains("is denied by"));

    // Our clients come from 127.0.0.1.
    let toml =
        listener_toml(&pki, "edge", "") + &route(&backend, "deny_sources = [\"127.0.0.0/8\"]\n");
    let mut gw = RunningGateway::start(&pki, &toml).await;
    assert_eq!(
        refusal(gw.app_addr, SNI, pki.frontend_config()).await,
        AlertDescription::AccessDenied
    );
    assert_eq!(
        gw.next_record().await.reason,
        "source 127.0.0.1 is denied by 127.0.0.0/8"
    );
    let toml =
        listener_toml(&pki, "edge", "") + &route(&backend, "allow_sources = [\"10.0.0.0/8\"]\n");
    let gw = RunningGateway::start(&pki, &toml).await;
    assert_eq!(
        refusal(gw.app_addr, SNI, pki.frontend_config()).await,
        AlertDescription::AccessDenied
    );
    assert_eq!(backend.accepted(), 1);
}

/// A deny rule names one identity; no other spelling of it may pass. SPIFFE
/// IDs the specification forbids make the certificate unusable; DNS names
/// and email domains are compared in one spelling.
#[tokio::test]
async fn a_deny_cannot_be_dodged_by_spelling_the_identity_differently() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let toml = listener_toml(&pki, "edge", "")
        + &route_toml(
            "orders",
            &[SNI],
            &[backend.addr],
            &["spiffe-prefix:spiffe://example.internal/ns/shop/"],
        )
        + "deny = [\"spiffe://example.internal/ns/shop/sa/bad\", \"dns:bad.example.internal\", \
           \"email:mallory@example.internal\"]\n";
    let mut gw = RunningGateway::start(&pki, &toml).await;

    for (i, dodge) in [
        "spiffe://example.internal/ns/shop/sa/bad/",
        "spiffe://example.internal/ns/shop/./sa/bad",
        "spiffe://example.internal/ns/shop/sa/../sa/bad",
        "spiffe://example.internal/ns/shop//sa/bad",
        "spiffe://example.internal/ns/shop/sa/%62ad",
        "SPIFFE://example.internal/ns/shop/sa/bad",
        "spiffe://EXAMPLE.internal/ns/shop/sa/bad",
        "spiffe://example.internal:443/ns/shop/sa/bad",
        "spiffe://example.internal/ns/shop/sa/bad?x=1",
        "spiffe://example.internal./ns/shop/sa/bad",
    ]
    .into_iter()
    .enumerate()
    {
        let creds = pki.client(&format!("dodge{i}"), &LeafSpec::client("bad", &[dodge]));
        assert_eq!(
            refusal(gw.app_addr, SNI, pki.client_config(Some(&creds))).await,
            AlertDescription::BadCertificate,
            "{dodge}"
        );
        let rec = gw.next_record().await;
        assert_eq!(rec.verdict, Verdict::Deny, "{dodge}");
        assert!(
            rec.reason.contains("not a valid SPIFFE ID") && rec.reason.contains(dodge),
            "{dodge}: {}",
            rec.reason
        );
    }
    // Allowed by its SPIFFE ID, denied by another spelling of a denied name;
    // names that are no names are refused, rather than read as two.
    let denied = |rule: &str| {
        (
            AlertDescription::AccessDenied,
            format!("is denied by {rule}"),
        )
    };
    let no_name = |what: &str| {
        (
            AlertDescription::BadCertificate,
            format!("that is not {what}"),
        )
    };
    for (i, (other, (alert, reason))) in [
        (
            "dns:bad.example.internal.",
            denied("dns:bad.example.internal"),
        ),
        (
            "dns:BAD.Example.Internal",
            denied("dns:bad.example.internal"),
        ),
        (
            "email:mallory@EXAMPLE.internal",
            denied("email:mallory@example.internal"),
        ),
        (
            "email:mallory@example.internal.",
            denied("email:mallory@example.internal"),
        ),
        (
            "dns:batch.example.internal,email:mallory@example.internal",
            no_name("a host name"),
        ),
        (
            "email:ops@example.internal,dns:bad.example.internal",
            no_name("a plain address"),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let creds = pki.client(
            &format!("alias{i}"),
            &LeafSpec::client("alias", &[SPIFFE_FRONTEND, other]),
        );
        assert_eq!(
            refusal(gw.app_addr, SNI, pki.client_config(Some(&creds))).await,
            alert,
            "{other}"
        );
        let rec = gw.next_record().await;
        assert!(rec.reason.contains(&reason), "{other}: {}", rec.reason);
    }
    // A URI may hold a comma: the access log keeps it one name.
    let comma = "https://example.internal/a,dns:bad.example.internal";
    let creds = pki.client("comma", &LeafSpec::client("c", &[SPIFFE_FRONTEND, comma]));
    passes(gw.app_addr, SNI, pki.client_config(Some(&creds)), b"c").await;
    let rec = gw.next_record().await;
    assert_eq!(rec.verdict, Verdict::Allow);
    assert_eq!(
        rec.identity,
        Some(vec![SPIFFE_FRONTEND.to_owned(), comma.to_owned()])
    );
    // The local part of an address is the mailbox's own: another one passes.
    let other_mailbox = pki.client(
        "mailbox",
        &LeafSpec::client("m", &[SPIFFE_FRONTEND, "email:Mallory@example.internal"]),
    );
    passes(
        gw.app_addr,
        SNI,
        pki.client_config(Some(&other_mailbox)),
        b"m",
    )
    .await;
    assert_eq!(gw.next_record().await.verdict, Verdict::Allow);
    assert_eq!(backend.accepted(), 2);
}

/// A time window that does not contain the present hour (UTC).
fn closed_window() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let hour = (now / 3600 + 2) % 24;
    format!(
        "\n[[listeners.routes.time_windows]]\nstart = \"{hour:02}:00\"\nend = \"{:02}:00\"\n",
        (hour + 1) % 24
    )
}

#[tokio::test]
async fn mode_off_enforces_sources_and_time_windows_and_refuses_identity_rules() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let off = |extra: &str| {
        listener_toml(&pki, "edge", "")
            + &route_toml("orders", &[SNI], &[backend.addr], &[])
            + "mode = \"off\"\n"
            + extra
    };
    // What needs a certificate is a config error naming the field.
    for (field, line) in [
        ("allow", format!("allow = [\"{SPIFFE_FRONTEND}\"]\n")),
        ("deny", format!("deny = [\"{SPIFFE_OTHER}\"]\n")),
        ("match_common_name", "match_common_name = true\n".to_owned()),
        ("device", "device = { trust = \"devices\", san_prefix = \"spiffe://example.internal/device/\" }\n".to_owned()),
        ("trust", "trust = \"devices\"\n".to_owned()),
    ] {
        let toml = format!(
            "[trust.devices]\nca = \"{}\"\n{}",
            pki.path("client-roots.pem").display(),
            off(&line).replace("allow = []\n", "")
        );
        let err = gateway::Config::parse(&toml, &pki.path("gateway.toml"), pki.dir.path())
            .expect_err(field)
            .to_string();
        assert!(
            err.contains(&format!("routes[0] (\"orders\").{field}: mode = \"off\"")),
            "{field}: {err}"
        );
    }

    // Sources and time windows are judged before the handshake: access_denied.
    for (extra, reason) in [
        (
            "deny_sources = [\"127.0.0.0/8\"]\n".to_owned(),
            "source 127.0.0.1 is denied by 127.0.0.0/8",
        ),
        (
            "allow_sources = [\"10.0.0.0/8\"]\n".to_owned(),
            "source 127.0.0.1 is not in the route's allowed sources",
        ),
        (closed_window(), "outside the route's time windows"),
    ] {
        let mut gw = RunningGateway::start(&pki, &off(&extra)).await;
        assert_eq!(
            refusal(gw.app_addr, SNI, pki.client_config(None)).await,
            AlertDescription::AccessDenied,
            "{extra}"
        );
        let rec = gw.next_record().await;
        assert_eq!(rec.verdict, Verdict::Deny, "{extra}");
        assert!(rec.reason.starts_with(reason), "{extra}: {}", rec.reason);
        assert_eq!(gw.stats("orders"), (0, 1, 0));
    }
    assert_eq!(backend.accepted(), 0);

    // A live connection on an off route is judged again on reload.
    let open = off("allow_sources = [\"127.0.0.0/8\"]\n");
    let mut gw = RunningGateway::start(&pki, &open).await;
    let mut tls = connect(gw.app_addr, SNI, pki.client_config(None))
        .await
        .unwrap();
    tls.write_all(b"live").await.unwrap();
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.unwrap();
    let report = gw.reload_toml(&pki, &off(&closed_window())).await.unwrap();
    assert_eq!(report.connections_closed, 1);
    let rec = gw.next_record().await;
    assert!(
        rec.reason
            .contains("no longer allowed after reload: outside the route's time windows"),
        "{}",
        rec.reason
    );
}

/// A CRL past its nextUpdate may be missing revocations: by default the
/// clients it covers are refused (and counted); `crl_expired = "warn"` uses
/// it anyway, revocations included. Of several CRLs from one issuer, the
/// highest CRL number is the one that counts, whatever the order of files.
#[tokio::test]
async fn a_stale_crl_refuses_by_default_and_the_newest_crl_of_an_issuer_wins() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let (revoked, serial) = pki.revocable_frontend("revoked");
    let past = time::OffsetDateTime::now_utc() - time::Duration::seconds(30);
    pki.write(
        "stale.crl.pem",
        &pki.intermediate.crl_until(4, &[&serial], past).unwrap(),
    );
    let gateway = |crls: &[&str], extra: &str| {
        "admin = \"127.0.0.1:0\"\n".to_owned()
            + &listener_toml(&pki, "edge", &format!("{}\n{extra}", pki.crls_line(crls)))
            + &route(&backend, "")
    };
    let mut gw = RunningGateway::start(&pki, &gateway(&["stale.crl.pem"], "")).await;
    assert_eq!(
        refusal(gw.app_addr, SNI, pki.frontend_config()).await,
        AlertDescription::UnknownCA
    );
    let rec = gw.next_record().await;
    assert!(
        rec.reason.contains("certificate revocation list expired"),
        "{}",
        rec.reason
    );
    let metrics = gw.scrape().await;
    assert!(
        metrics.contains(
            "gateway_crl_expired_total{bundle=\"listener edge client_ca\",crl_expired=\"refuse\"} 1"
        ),
        "{metrics}"
    );

    // "warn": the stale CRL is used, its revocation included, and counted.
    gw.reload_toml(&pki, &gateway(&["stale.crl.pem"], "crl_expired = \"warn\""))
        .await
        .unwrap();
    let tls = connect(gw.app_addr, SNI, pki.frontend_config())
        .await
        .unwrap();
    assert_eq!(
        echo_roundtrip(tls, b"warn".to_vec()).await.unwrap(),
        b"warn"
    );
    assert_eq!(
        refusal(gw.app_addr, SNI, pki.client_config(Some(&revoked))).await,
        AlertDescription::CertificateRevoked
    );
    let metrics = gw.scrape().await;
    assert!(
        metrics.contains(
            "gateway_crl_expired_total{bundle=\"listener edge client_ca\",crl_expired=\"warn\"} 1"
        ),
        "{metrics}"
    );

    // An older CRL listed first does not hide the newer one's revocation.
    pki.write("old.crl.pem", &pki.intermediate.crl(3, &[]).unwrap());
    pki.write("new.crl.pem", &pki.intermediate.crl(5, &[&serial]).unwrap());
    gw.reload_toml(&pki, &gateway(&["old.crl.pem", "new.crl.pem"], ""))
        .await
        .unwrap();
    assert_eq!(
        refusal(gw.app_addr, SNI, pki.client_config(Some(&revoked))).await,
        AlertDescription::CertificateRevoked
    );
    passes(gw.app_addr, SNI, pki.frontend_config(), b"new").await;
    assert_eq!(backend.accepted(), 2);
}

/// Revocation runs along the chain: an issuing intermediate listed on its
/// root's CRL is revoked with every leaf under it. The leaf's own issuer
/// must still have a CRL in the bundle (fail closed); an intermediate whose
/// root publishes none passes.
#[tokio::test]
async fn an_intermediate_on_its_roots_crl_is_refused_with_every_leaf_under_it() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let second = pki.root.intermediate("second issuing CA").unwrap();
    let other = second
        .issue(&LeafSpec::client("other", &[SPIFFE_FRONTEND]))
        .unwrap();
    let other = pki.creds("other", &other, &second);
    let serial = pki.intermediate.serial().unwrap();
    pki.write("int.crl.pem", &pki.intermediate.crl(1, &[]).unwrap());
    pki.write("second.crl.pem", &second.crl(1, &[]).unwrap());
    pki.write("root.crl.pem", &pki.root.crl(1, &[&serial]).unwrap());
    let gateway =
        |crls: &[&str]| listener_toml(&pki, "edge", &pki.crls_line(crls)) + &route(&backend, "");
    let mut gw = RunningGateway::start(
        &pki,
        &gateway(&["int.crl.pem", "second.crl.pem", "root.crl.pem"]),
    )
    .await;
    assert_eq!(
        refusal(gw.app_addr, SNI, pki.frontend_config()).await,
        AlertDescription::CertificateRevoked
    );
    let rec = gw.next_record().await;
    assert!(rec.reason.contains("Revoked"), "{}", rec.reason);
    let tls = connect(gw.app_addr, SNI, pki.client_config(Some(&other)))
        .await
        .unwrap();
    assert_eq!(
        echo_roundtrip(tls, b"other".to_vec()).await.unwrap(),
        b"other"
    );
    gw.next_record().await;

    // The root's CRL alone: the leaves' issuers have none, so no leaf passes.
    gw.reload_toml(&pki, &gateway(&["root.crl.pem"]))
        .await
        .unwrap();
    assert_eq!(
        refusal(gw.app_addr, SNI, pki.client_config(Some(&other))).await,
        AlertDescription::UnknownCA
    );
    let rec = gw.next_record().await;
    assert!(
        rec.reason.contains("UnknownRevocationStatus"),
        "{}",
        rec.reason
    );

    // The intermediates' CRLs alone: the root publishes none, they pass.
    gw.reload_toml(&pki, &gateway(&["int.crl.pem", "second.crl.pem"]))
        .await
        .unwrap();
    passes(gw.app_addr, SNI, pki.frontend_config(), b"fe").await;
    assert_eq!(backend.accepted(), 2);
}

/// A CA's name constraints cover DNS names only, so nothing in the
/// certificates stops an intermediate from issuing spiffe://other.internal/…
/// A bundle's spiffe_trust_domains does: a URI identity outside them makes
/// the certificate unusable, on a named bundle and on the listener's own.
#[tokio::test]
async fn a_ca_can_only_vouch_for_identities_in_its_spiffe_trust_domains() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    pki.write("services-ca.pem", &pki.root.cert_pem);
    let allow = &[
        "spiffe-prefix:spiffe://example.internal/ns/shop/",
        "spiffe://other.internal/ns/shop/sa/frontend",
        "https://example.internal/ns/shop/sa/frontend",
    ];
    let toml = format!(
        "[trust.services]\nca = \"{}\"\nspiffe_trust_domains = [\"example.internal\"]\n",
        pki.path("services-ca.pem").display()
    ) + &listener_toml(
        &pki,
        "edge",
        "spiffe_trust_domains = [\"example.internal\"]",
    ) + &route_toml("named", &[SNI], &[backend.addr], allow)
        + "trust = \"services\"\n"
        + &route_toml("default", &[], &[backend.addr], allow);
    let mut gw = RunningGateway::start(&pki, &toml).await;
    let outside = [
        "spiffe://other.internal/ns/shop/sa/frontend",
        "https://example.internal/ns/shop/sa/frontend",
    ];
    for sni in [SNI, "billing.example.internal"] {
        for (i, uri) in outside.iter().enumerate() {
            let creds = pki.client(
                &format!("outside{i}"),
                &LeafSpec::client("outside", &[SPIFFE_FRONTEND, uri]),
            );
            assert_eq!(
                refusal(gw.app_addr, sni, pki.client_config(Some(&creds))).await,
                AlertDescription::BadCertificate,
                "{sni} {uri}"
            );
            let rec = gw.next_record().await;
            assert!(
                rec.reason.contains("outside the SPIFFE trust domains") && rec.reason.contains(uri),
                "{}",
                rec.reason
            );
        }
        let tls = connect(gw.app_addr, sni, pki.frontend_config())
            .await
            .unwrap();
        assert_eq!(echo_roundtrip(tls, b"in".to_vec()).await.unwrap(), b"in");
        gw.next_record().await;
    }
    assert_eq!(backend.accepted(), 2);

    // A device identity the device bundle could never vouch for is a config error.
    let toml = format!(
        "[trust.devices]\nca = \"{}\"\nspiffe_trust_domains = [\"devices.internal\"]\n",
        pki.path("services-ca.pem").display()
    ) + &listener_toml(&pki, "edge", "")
        + &route(&backend, "")
        + "device = { trust = \"devices\", san_prefix = \"spiffe://example.internal/device/\" }\n";
    let err = gateway::Config::parse(&toml, &pki.path("gateway.toml"), pki.dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("device.san_prefix") && err.contains("spiffe_trust_domains"),
        "{err}"
    );
}

/// examples/gateway.toml, as shipped but in enforce mode, open now and from
/// loopback, on a generated PKI: the device-bound user certificate opens the
/// device route; a user certificate without the device CA, a device
/// certificate without a device identity, a denied user, and the device CA
/// on routes that do not name it are refused.
#[tokio::test]
async fn the_example_config_enforces_devices_as_documented() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/gateway.toml"),
    )
    .unwrap();
    let mut toml = example.clone();
    let backends = format!("[\"{}\"]", backend.addr);
    for (from, to) in [
        ("access_log = \"stdout\"", "access_log = \"off\"".to_owned()),
        (
            "admin = \"127.0.0.1:9901\"",
            "admin = \"127.0.0.1:0\"".to_owned(),
        ),
        (
            "bind = \"127.0.0.1:8443\"",
            "bind = \"127.0.0.1:0\"".to_owned(),
        ),
        ("[\"127.0.0.1:9000\", \"127.0.0.1:9001\"]", backends.clone()),
        ("[\"127.0.0.1:9100\"]", backends.clone()),
        ("[\"127.0.0.1:9200\"]", backends.clone()),
        ("[\"127.0.0.1:9300\"]", backends.clone()),
        ("mode = \"audit\"", "mode = \"enforce\"".to_owned()),
    ] {
        assert!(toml.contains(from), "the example changed: no {from}");
        toml = toml.replace(from, &to);
    }
    // As written (in enforce mode), for its source rule below.
    let as_written = toml.clone();
    // Opened to this host, at any time, for the rest.
    for (from, to) in [
        (
            "allow_sources = [\"10.0.0.0/8\"]",
            "allow_sources = [\"10.0.0.0/8\", \"127.0.0.0/8\"]".to_owned(),
        ),
        (
            "days = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\"]",
            "days = []".to_owned(),
        ),
        ("start = \"07:00\"", "start = \"00:00\"".to_owned()),
        ("end = \"19:00\"", "end = \"24:00\"".to_owned()),
    ] {
        assert!(toml.contains(from), "the example changed: no {from}");
        toml = toml.replace(from, &to);
    }

    // The files the example names: services behind client_ca, users and devices apart.
    let server = pki
        .intermediate
        .issue(&LeafSpec::server(
            "gateway",
            &[
                "dns:orders.example.internal",
                "dns:admin.example.internal",
                "dns:wiki.example.internal",
            ],
        ))
        .unwrap();
    pki.write(
        "server-chain.pem",
        &format!("{}{}", server.cert_pem, pki.intermediate.cert_pem),
    );
    pki.write("server.key", &server.key_pem);
    let users_root = Authority::root("users root").unwrap();
    let users = users_root.intermediate("users issuing").unwrap();
    let devices_root = Authority::root("devices root").unwrap();
    let devices = devices_root.intermediate("devices issuing").unwrap();
    pki.write("users-ca.pem", &users_root.cert_pem);
    pki.write("users-int.crl.pem", &users.crl(1, &[]).unwrap());
    pki.write("devices-ca.pem", &devices_root.cert_pem);
    pki.write("devices-int.crl.pem", &devices.crl(1, &[]).unwrap());
    let mut gw = RunningGateway::start(&pki, &toml).await;

    let laptop = "spiffe://example.internal/device/laptop-7";
    let issue = |name: &str, ca: &Authority, sans: &[&str]| {
        let leaf = ca.issue(&LeafSpec::client(name, sans)).unwrap();
        pki.client_config(Some(&pki.creds(name, &leaf, ca)))
    };
    let bound = issue(
        "alice-laptop",
        &devices,
        &["email:alice@example.internal", laptop],
    );
    let (admin, wiki, orders) = (
        "admin.example.internal",
        "wiki.example.internal",
        "orders.example.internal",
    );

    let tls = connect(gw.app_addr, admin, bound.clone()).await.unwrap();
    assert_eq!(
        echo_roundtrip(tls, b"bound".to_vec()).await.unwrap(),
        b"bound"
    );
    let rec = gw.next_record().await;
    assert_eq!(
        (rec.verdict, rec.route.as_deref()),
        (Verdict::Allow, Some("admin")),
        "{rec:?}"
    );

    let refused = [
        (
            admin,
            issue(
                "alice-user",
                &users,
                &["email:alice@example.internal", laptop],
            ),
            AlertDescription::UnknownCA,
            "not issued by the device CA",
        ),
        (
            admin,
            issue(
                "alice-nodevice",
                &devices,
                &["email:alice@example.internal"],
            ),
            AlertDescription::AccessDenied,
            "no device identity",
        ),
        (
            admin,
            issue(
                "mallory",
                &devices,
                &["email:mallory@example.internal", laptop],
            ),
            AlertDescription::AccessDenied,
            "is denied by email:mallory@example.internal",
        ),
        // The device CA vouches only where a route names it.
        (
            wiki,
            bound.clone(),
            AlertDescription::UnknownCA,
            "UnknownIssuer",
        ),
        (
            orders,
            bound.clone(),
            AlertDescription::UnknownCA,
            "UnknownIssuer",
        ),
    ];
    for (sni, config, alert, reason) in refused {
        assert_eq!(
            refusal(gw.app_addr, sni, config).await,
            alert,
            "{sni} {reason}"
        );
        let rec = gw.next_record().await;
        assert_eq!(rec.verdict, Verdict::Deny, "{rec:?}");
        assert!(rec.reason.contains(reason), "{sni}: {}", rec.reason);
    }

    // The users' CA on the users' route, the services' on the default bundle.
    let user = issue("alice-anywhere", &users, &["email:alice@example.internal"]);
    for (sni, config) in [(wiki, user), (orders, pki.frontend_config())] {
        let tls = connect(gw.app_addr, sni, config).await.unwrap();
        assert_eq!(echo_roundtrip(tls, b"in".to_vec()).await.unwrap(), b"in");
        assert_eq!(gw.next_record().await.verdict, Verdict::Allow, "{sni}");
    }
    assert_eq!(backend.accepted(), 3);

    // The admin route as written admits only 10.0.0.0/8 (judged before its
    // time window): the bound laptop on this host is refused.
    let config =
        gateway::Config::parse(&as_written, &pki.path("gateway.toml"), pki.dir.path()).unwrap();
    gw.reload.reload(config).await.unwrap();
    assert_eq!(
        refusal(gw.app_addr, admin, bound).await,
        AlertDescription::AccessDenied
    );
    let rec = gw.next_record().await;
    assert_eq!(
        rec.reason, "source 127.0.0.1 is not in the route's allowed sources",
        "{rec:?}"
    );
    assert_eq!(backend.accepted(), 3);
}

/// A dual-stack listener (`[::]`) sees an IPv4 client as an IPv4-mapped
/// IPv6 address (`::ffff:127.0.0.1`). The gateway judges, tracks and logs
/// it as the IPv4 address it is, so IPv4 source rules hold on such a
/// listener: a denied network cannot walk in through the mapped form, and
/// an allowed one is not refused for it. A network written in the mapped
/// form means the IPv4 network; an IPv6 network holding the whole mapped
/// range (`::/0`) covers IPv4 clients too.
#[tokio::test]
async fn ipv4_clients_of_a_dual_stack_listener_are_judged_by_their_ipv4_address() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let dual = |extra: &str| {
        listener_toml(&pki, "edge", "").replace("127.0.0.1:0", "[::]:0") + &route(&backend, extra)
    };
    let v4 = |gw: &RunningGateway| std::net::SocketAddr::from(([127, 0, 0, 1], gw.app_addr.port()));

    for deny in ["127.0.0.0/8", "::ffff:127.0.0.0/104"] {
        let mut gw =
            RunningGateway::start(&pki, &dual(&format!("deny_sources = [\"{deny}\"]\n"))).await;
        assert_eq!(
            refusal(v4(&gw), SNI, pki.frontend_config()).await,
            AlertDescription::AccessDenied,
            "{deny}"
        );
        let rec = gw.next_record().await;
        assert_eq!(rec.verdict, Verdict::Deny, "{deny}: {rec:?}");
        assert_eq!(
            rec.reason, "source 127.0.0.1 is denied by 127.0.0.0/8",
            "{deny}: {rec:?}"
        );
        assert!(rec.client.starts_with("127.0.0.1:"), "{rec:?}");
    }
    // An IPv6 network holding the whole mapped range holds the IPv4 clients
    // that arrive through it: `::/0` denies them, named as written.
    let mut gw = RunningGateway::start(&pki, &dual("deny_sources = [\"::/0\"]\n")).await;
    assert_eq!(
        refusal(v4(&gw), SNI, pki.frontend_config()).await,
        AlertDescription::AccessDenied
    );
    let rec = gw.next_record().await;
    assert_eq!(rec.reason, "source 127.0.0.1 is denied by ::/0", "{rec:?}");
    // Before the handshake too, on an off route.
    let off = listener_toml(&pki, "edge", "").replace("127.0.0.1:0", "[::]:0")
        + &route_toml("orders", &[SNI], &[backend.addr], &[])
        + "mode = \"off\"\ndeny_sources = [\"127.0.0.0/8\"]\n";
    let gw = RunningGateway::start(&pki, &off).await;
    assert_eq!(
        refusal(v4(&gw), SNI, pki.client_config(None)).await,
        AlertDescription::AccessDenied
    );
    assert_eq!(backend.accepted(), 0);

    // Allowed IPv4 networks let IPv4 clients in, and the access log and
    // the live connection's re-checks see the same address.
    let allowed = dual("allow_sources = [\"127.0.0.0/8\"]\n");
    let mut gw = RunningGateway::start(&pki, &allowed).await;
    let mut tls = connect(v4(&gw), SNI, pki.frontend_config()).await.unwrap();
    tls.write_all(b"mapped").await.unwrap();
    let mut buf = [0u8; 6];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"mapped");
    let report = gw
        .reload_toml(&pki, &dual("deny_sources = [\"127.0.0.1/32\"]\n"))
        .await
        .unwrap();
    assert_eq!(report.connections_closed, 1, "the reload's deny reached it");
    let rec = gw.next_record().await;
    assert!(rec.client.starts_with("127.0.0.1:"), "{rec:?}");
    assert!(
        rec.reason
            .contains("no longer allowed after reload: source 127.0.0.1 is denied by 127.0.0.1/32"),
        "{rec:?}"
    );
}

/// A CRL limited by its issuing distribution point speaks only for the
/// certificates in its scope, through real handshakes: a leaves-only CRL
/// revokes a leaf; a CA-only CRL alone leaves a leaf's status unknown
/// (refused); and a CA-only CRL going stale beside a fresh leaves-only one
/// closes no connection: it speaks only for CA certificates the
/// intermediate issued, and the path has none.
#[tokio::test]
async fn scoped_crls_speak_only_for_the_certificates_in_their_scope() {
    use gateway::pki::CrlScope;
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let crls = pki.crls_line(&["scoped.crl.pem"]);
    let toml = listener_toml(&pki, "edge", &crls) + &route(&backend, "");
    let (doomed, serial) = pki.revocable_frontend("doomed");

    pki.write(
        "scoped.crl.pem",
        &pki.intermediate
            .crl_scoped(1, &[&serial], CrlScope::UserCertsOnly)
            .unwrap(),
    );
    let mut gw = RunningGateway::start(&pki, &toml).await;
    assert_eq!(
        refusal(gw.app_addr, SNI, pki.client_config(Some(&doomed))).await,
        AlertDescription::CertificateRevoked
    );
    assert_eq!(gw.next_record().await.verdict, Verdict::Deny);
    passes(
        gw.app_addr,
        SNI,
        pki.frontend_config(),
        b"in scope, not revoked",
    )
    .await;
    gw.next_record().await;

    // Only a CA-only CRL: dropping the leaves-only one is done in the
    // config (a file that stops holding a CRL it held is refused).
    pki.write(
        "ca-only.crl.pem",
        &pki.intermediate
            .crl_scoped(2, &[], CrlScope::CaCertsOnly)
            .unwrap(),
    );
    let ca_only =
        listener_toml(&pki, "edge", &pki.crls_line(&["ca-only.crl.pem"])) + &route(&backend, "");
    gw.reload_toml(&pki, &ca_only).await.unwrap();
    assert_eq!(
        refusal(gw.app_addr, SNI, pki.frontend_config()).await,
        AlertDescription::UnknownCA
    );
    assert!(
        gw.next_record()
            .await
            .reason
            .contains("UnknownRevocationStatus"),
        "a CA-only CRL says nothing of a leaf"
    );

    let soon = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
    let later = time::OffsetDateTime::now_utc() + time::Duration::days(1);
    pki.write(
        "scoped.crl.pem",
        &format!(
            "{}{}",
            pki.intermediate
                .crl_scoped_until(3, &[], CrlScope::UserCertsOnly, later)
                .unwrap(),
            pki.intermediate
                .crl_scoped_until(3, &[], CrlScope::CaCertsOnly, soon)
                .unwrap()
        ),
    );
    gw.reload_toml(&pki, &toml).await.unwrap();
    let mut tls = connect(gw.app_addr, SNI, pki.frontend_config())
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    tls.write_all(b"stale CA-only CRL").await.unwrap();
    let mut buf = [0u8; 17];
    tokio::time::timeout(STEP, tls.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .expect("the connection is still open");
    assert_eq!(&buf, b"stale CA-only CRL");
}

/// A certificate is public, its key is not. Without the key, the
/// certificate of an identity the route refuses and that of one it allows
/// are refused alike (the signature's alert, `decrypt_error`), in TLS 1.3
/// and 1.2: the alert tells a keyless peer nothing about the policy. Their
/// lines name no identity, only what was claimed. With its own key the
/// refused identity gets `access_denied`, its line a `deny` naming it
/// (#19, review 3 finding 1).
#[tokio::test]
async fn without_its_key_a_certificate_learns_nothing_of_the_policy() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let toml =
        listener_toml(&pki, "edge", "tls_versions = [\"1.2\", \"1.3\"]") + &route(&backend, "");
    let mut gw = RunningGateway::start(&pki, &toml).await;
    let intruder = pki.client("intruder", &LeafSpec::client("intruder", &[SPIFFE_OTHER]));
    let stranger = pki.client(
        "stranger",
        &LeafSpec::client("stranger", &["spiffe://example.internal/ns/x/sa/y"]),
    );
    let without_key = |chain: &ClientCreds| ClientCreds {
        chain: chain.chain.clone(),
        key_pem: stranger.key_pem.clone(),
        cert_path: pki.path("unused.pem"),
        key_path: pki.path("unused.key"),
    };
    let frontend = pki.frontend();
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        for (creds, name) in [(&frontend, SPIFFE_FRONTEND), (&intruder, SPIFFE_OTHER)] {
            let config = pki.client_config_unchecked_versions(&without_key(creds), &[version]);
            assert_eq!(
                refusal(gw.app_addr, SNI, config).await,
                AlertDescription::DecryptError,
                "{name} without its key, {version:?}"
            );
            let record = gw.next_record().await;
            assert_eq!(record.verdict, Verdict::Error, "{record:?}");
            assert_eq!(record.identity, None, "{record:?}");
            assert_eq!(record.claimed_identity, Some(vec![name.to_owned()]));
        }
        // The refused identity with its own key: refused by policy.
        let config = pki.client_config_versions(Some(&intruder), &[version]);
        assert_eq!(
            refusal(gw.app_addr, SNI, config).await,
            AlertDescription::AccessDenied,
            "{version:?}"
        );
        let record = gw.next_record().await;
        assert_eq!(record.verdict, Verdict::Deny, "{record:?}");
        assert_eq!(record.identity, Some(vec![SPIFFE_OTHER.to_owned()]));
        assert_eq!(record.claimed_identity, None);
    }
    assert_eq!(backend.accepted(), 0);
}

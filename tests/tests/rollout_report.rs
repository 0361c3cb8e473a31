//! The audit report end to end: traffic through audit routes, then what
//! `GET /rollout/report` and `gateway rollout report` say about it: exactly
//! the clients enforcement would refuse, with their counts and reasons; the
//! summary kept across a reload, bounded, saved to `audit_state` across a
//! restart of the binary, and a corrupt state file survived.

use std::net::SocketAddr;
use std::path::Path;

use gateway::pki::{Authority, LeafSpec};
use gateway::rollout::{Report, RouteReport};
use gateway_tests::process::rollout_report as cli;
use gateway_tests::process::{
    Reap, admin_addr, run_binary, scrape, series, signal, wait_for, wait_listening,
};
use gateway_tests::*;

const ORDERS: &str = "orders.example.internal";
const BILLING: &str = "billing.example.internal";
/// The names the test PKI's server certificate carries.
const CALM: &str = "gateway.example.internal";
const BANNED: &str = "spiffe://example.internal/ns/shop/sa/banned";
const LOOPBACK_24: &str = "127.0.0.0/24";

/// Four routes: `orders` (audit: frontend allowed, `banned` denied),
/// `billing` (audit, only from 10.0.0.0/8: loopback clients are the wrong
/// source), `calm` (audit, only allowed traffic will come), `strict`
/// (enforce, the default route).
fn routes(backend: SocketAddr) -> String {
    route_toml("orders", &[ORDERS], &[backend], &[SPIFFE_FRONTEND])
        + &format!("mode = \"audit\"\ndeny = [\"{BANNED}\"]\n")
        + &route_toml("billing", &[BILLING], &[backend], &[SPIFFE_FRONTEND])
        + "mode = \"audit\"\nallow_sources = [\"10.0.0.0/8\"]\n"
        + &route_toml("calm", &[CALM], &[backend], &[SPIFFE_FRONTEND])
        + "mode = \"audit\"\n"
        + &route_toml("strict", &[], &[backend], &[SPIFFE_FRONTEND])
}

struct Clients {
    intruder: ClientCreds,
    banned: ClientCreds,
}

impl Clients {
    fn new(pki: &Pki) -> Clients {
        Clients {
            intruder: pki.client("intruder", &LeafSpec::client("intruder", &[SPIFFE_OTHER])),
            banned: pki.client("banned", &LeafSpec::client("banned", &[BANNED])),
        }
    }
}

/// One connection that gets through (audit lets every one through).
async fn pass(addr: SocketAddr, sni: &str, pki: &Pki, creds: Option<&ClientCreds>) {
    let tls = connect(addr, sni, pki.client_config(creds))
        .await
        .unwrap_or_else(|e| panic!("{sni}: {e}"));
    assert_eq!(
        echo_roundtrip(tls, b"x".to_vec()).await.unwrap(),
        b"x",
        "{sni}"
    );
}

/// The mix: on orders 2 allowed, 3 not in the allow list, 1 denied by
/// `deny`, 2 without a certificate; on billing 1 allowed identity from the
/// wrong source; on calm 2 allowed.
async fn send_mix(addr: SocketAddr, pki: &Pki, c: &Clients) {
    let frontend = pki.frontend();
    for _ in 0..2 {
        pass(addr, ORDERS, pki, Some(&frontend)).await;
    }
    for _ in 0..3 {
        pass(addr, ORDERS, pki, Some(&c.intruder)).await;
    }
    pass(addr, ORDERS, pki, Some(&c.banned)).await;
    for _ in 0..2 {
        pass(addr, ORDERS, pki, None).await;
    }
    pass(addr, BILLING, pki, Some(&frontend)).await;
    for _ in 0..2 {
        pass(addr, CALM, pki, Some(&frontend)).await;
    }
}

fn route<'a>(report: &'a Report, name: &str) -> &'a RouteReport {
    report
        .routes
        .iter()
        .find(|r| r.route == name)
        .unwrap_or_else(|| panic!("{name} in {report:?}"))
}

/// (identity, source, reason, count) of each would-deny entry.
fn refusals(r: &RouteReport) -> Vec<(Option<String>, String, String, u64)> {
    r.would_deny
        .iter()
        .map(|d| {
            (
                d.identity.clone(),
                d.source.clone(),
                d.reason.clone(),
                d.count,
            )
        })
        .collect()
}

fn expected_orders() -> Vec<(Option<String>, String, String, u64)> {
    vec![
        (
            Some(SPIFFE_OTHER.into()),
            LOOPBACK_24.into(),
            "not_allowed".into(),
            3,
        ),
        (None, LOOPBACK_24.into(), "no_certificate".into(), 2),
        (Some(BANNED.into()), LOOPBACK_24.into(), "denied".into(), 1),
    ]
}

/// What the mix must produce, route by route.
fn assert_mix(report: &Report) {
    let orders = route(report, "orders");
    assert_eq!(refusals(orders), expected_orders(), "{orders:?}");
    assert_eq!(orders.clients_seen, 4);
    assert_eq!(orders.allowed_connections, 2);
    assert_eq!(orders.would_deny_connections, 6);
    assert!(!orders.ready);
    assert!(
        orders
            .verdict
            .starts_with("not ready: 3 identities would be refused"),
        "{}",
        orders.verdict
    );
    assert!(
        orders.verdict.contains("(no certificate)"),
        "{}",
        orders.verdict
    );
    let billing = route(report, "billing");
    assert_eq!(
        refusals(billing),
        vec![(
            Some(SPIFFE_FRONTEND.into()),
            LOOPBACK_24.into(),
            "source_not_allowed".into(),
            1
        )]
    );
    assert_eq!(billing.allowed_connections, 0);
    assert!(!billing.ready);
    let calm = route(report, "calm");
    assert!(calm.would_deny.is_empty());
    assert_eq!((calm.clients_seen, calm.allowed_connections), (1, 2));
    assert!(calm.ready, "{}", calm.verdict);
    let strict = route(report, "strict");
    assert_eq!(strict.mode, "enforce");
    assert!(strict.verdict.starts_with("enforce"), "{}", strict.verdict);
    // No raw address anywhere: prefixes only.
    let json = serde_json::to_string(report).unwrap();
    assert!(!json.contains("127.0.0.1"), "{json}");
}

/// `GET /rollout/report` on the TCP door.
async fn ask(
    admin: SocketAddr,
    route: Option<&str>,
    since: Option<&str>,
) -> Result<Report, gateway::admin::client::ClientError> {
    let at = gateway::admin::client::Endpoint::Tcp(admin);
    gateway::admin::client::rollout_report(&at, route, since).await
}

async fn report(admin: SocketAddr, route: Option<&str>, since: Option<&str>) -> Report {
    ask(admin, route, since)
        .await
        .unwrap_or_else(|e| panic!("report: {e}"))
}

fn admin_toml(extra: &str) -> String {
    format!("admin = \"127.0.0.1:0\"\n{extra}")
}

/// The gateway in this process with the four routes and an admin
/// endpoint, `extra` at the top level; and its config.
async fn start(pki: &Pki, backend: &EchoBackend, extra: &str) -> (RunningGateway, String) {
    let toml = admin_toml(extra) + &listener_toml(pki, "edge", "") + &routes(backend.addr);
    (RunningGateway::start(pki, &toml).await, toml)
}

#[tokio::test]
async fn the_report_lists_exactly_who_enforcement_would_refuse_and_survives_a_reload() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let (gw, toml) = start(&pki, &backend, "").await;
    let admin = gw.admin_addr.unwrap();
    send_mix(gw.app_addr, &pki, &Clients::new(&pki)).await;

    let all = report(admin, None, Some("7d")).await;
    assert_eq!(all.since_seconds, Some(7 * 86400));
    assert_eq!(all.routes.len(), 4);
    assert_mix(&all);
    let only = report(admin, Some("orders"), None).await;
    assert_eq!(only.routes.len(), 1);
    assert_eq!(refusals(&only.routes[0]), expected_orders());

    // A reload (here: billing to enforce) keeps every route's summary.
    let reloaded = toml.replacen(
        "mode = \"audit\"\nallow_sources",
        "mode = \"enforce\"\nallow_sources",
        1,
    );
    assert_ne!(reloaded, toml);
    gw.reload_toml(&pki, &reloaded).await.expect("reload");
    let after = report(admin, None, None).await;
    assert_eq!(refusals(route(&after, "orders")), expected_orders());
    let billing = route(&after, "billing");
    assert_eq!(billing.mode, "enforce");
    assert!(billing.verdict.starts_with("enforce"));
    // And counting goes on into the same entries.
    pass(gw.app_addr, ORDERS, &pki, None).await;
    let orders = report(admin, Some("orders"), None).await;
    assert_eq!(orders.routes[0].would_deny[1].count, 3);
}

#[tokio::test]
async fn the_summary_is_bounded_with_an_overflow_count() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let toml = admin_toml("audit_entries = 2\n")
        + &listener_toml(&pki, "edge", "")
        + &route_toml("orders", &[ORDERS], &[backend.addr], &[SPIFFE_FRONTEND])
        + "mode = \"audit\"\n";
    let gw = RunningGateway::start(&pki, &toml).await;
    for i in 0..5 {
        let id = format!("spiffe://example.internal/ns/shop/sa/stranger{i}");
        let creds = pki.client(&format!("s{i}"), &LeafSpec::client("s", &[&id]));
        pass(gw.app_addr, ORDERS, &pki, Some(&creds)).await;
    }
    let r = report(gw.admin_addr.unwrap(), Some("orders"), None).await;
    let r = &r.routes[0];
    assert_eq!(r.would_deny.len(), 2, "{r:?}");
    let overflow = r.would_deny_overflow.as_ref().expect("overflow");
    assert_eq!((overflow.entries, overflow.connections), (3, 3));
    assert_eq!(r.would_deny_connections, 5);
    assert!(!r.ready);
}

#[tokio::test]
async fn the_report_is_only_for_admin_clients_and_refuses_bad_questions() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let socket = pki.dir.path().join("admin.sock");
    let extra = format!(
        "admin_clients = [\"10.0.0.0/8\"]\nadmin_socket = \"{}\"\n",
        socket.display()
    );
    let (gw, _) = start(&pki, &backend, &extra).await;
    let e = ask(gw.admin_addr.unwrap(), None, None).await.unwrap_err();
    assert!(e.to_string().contains("403"), "{e}");
    // The socket's peers are trusted by its owner and mode instead.
    let at = gateway::admin::client::Endpoint::Socket(socket);
    let r = gateway::admin::client::rollout_report(&at, Some("orders"), None)
        .await
        .expect("the report through the admin socket");
    assert_eq!(r.routes.len(), 1);
    drop(gw);

    let (gw, _) = start(&pki, &backend, "").await;
    let admin = gw.admin_addr.unwrap();
    for (route, since, status) in [(Some("nope"), None, "404"), (None, Some("soon"), "400")] {
        let e = ask(admin, route, since).await.unwrap_err();
        assert!(e.to_string().contains(status), "{e}");
    }
}

struct Binary {
    proc: Reap,
    app: SocketAddr,
    admin: SocketAddr,
}

fn start_binary(config: &Path, stderr: &Path) -> Binary {
    let proc = run_binary(config, stderr, &[]);
    let app = wait_listening(stderr);
    let admin = admin_addr(stderr);
    Binary { proc, app, admin }
}

fn stop(mut b: Binary) {
    signal(&b.proc.0, "TERM");
    let status = process::exit_status(&mut b.proc.0, "SIGTERM");
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reports_and_the_summary_survives_a_restart_through_the_state_file() {
    use std::os::unix::fs::PermissionsExt as _;
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let state = pki.dir.path().join("state").join("audit.json");
    std::fs::create_dir(state.parent().unwrap()).unwrap();
    let toml = with_test_defaults(
        &(admin_toml(&format!(
            "watch_files = false\naudit_state = \"{}\"\n",
            state.display()
        )) + &listener_toml(&pki, "edge", "")
            + &routes(backend.addr)),
    );
    let config = pki.write("gateway.toml", &toml);
    let stderr = pki.dir.path().join("gateway.stderr");
    let b = start_binary(&config, &stderr);
    send_mix(b.app, &pki, &Clients::new(&pki)).await;

    // Text: the would-deny identities with counts and reasons, the verdict;
    // exit 1 since orders is not ready.
    let (code, out, err) = cli(b.admin, &["--route", "orders", "--since", "7d"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.starts_with("route orders (listener edge): audit\n"),
        "{out}"
    );
    assert!(
        out.contains("  clients seen: 4 (connections: 2 let in, 6 would be refused)\n"),
        "{out}"
    );
    for line in [
        format!("    {SPIFFE_OTHER}  from {LOOPBACK_24}  not_allowed  3 connections  first "),
        format!("    (no certificate)  from {LOOPBACK_24}  no_certificate  2 connections  first "),
        format!("    {BANNED}  from {LOOPBACK_24}  denied  1 connection  first "),
    ] {
        assert!(out.contains(&line), "{line} in\n{out}");
    }
    assert!(
        out.ends_with(&format!(
            "  verdict: not ready: 3 identities would be refused in the last 7d: {SPIFFE_OTHER}, (no certificate), {BANNED}\n"
        )),
        "{out}"
    );
    // A route with nothing to refuse: exit 0.
    let (code, out, _) = cli(b.admin, &["--route", "calm", "--since", "7d"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("  verdict: ready: no would-deny in the last 7d\n"),
        "{out}"
    );
    // JSON for scripts, the same report as the endpoint's.
    let (code, out, _) = cli(b.admin, &["--format", "json"]);
    assert_eq!(code, 1);
    let before: Report = serde_json::from_str(&out).expect("JSON report");
    assert_mix(&before);
    // Errors: exit 2.
    let (code, _, err) = cli(b.admin, &["--route", "nope"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no listener serves a route \"nope\""), "{err}");
    let (code, _, err) = cli(dead_port(), &[]);
    assert_eq!(code, 2, "{err}");

    // Saved within a few seconds while running, not only at shutdown.
    wait_for("the periodic save of the audit state", || state.exists());
    // Private to the gateway's user.
    stop(b);
    let mode = std::fs::metadata(&state)
        .expect("state file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // A restart reads it back: the same evidence.
    let b = start_binary(&config, &stderr);
    let (code, out, _) = cli(b.admin, &["--format", "json"]);
    assert_eq!(code, 1);
    let after: Report = serde_json::from_str(&out).expect("JSON report");
    assert_eq!(after, before);
    stop(b);

    // A corrupt file: the gateway starts anyway, with an empty summary,
    // says so, counts it and keeps the file aside.
    std::fs::write(&state, b"{\"version\": 1, \"routes\": [tru").unwrap();
    let b = start_binary(&config, &stderr);
    let log = std::fs::read_to_string(&stderr).unwrap();
    assert!(
        log.lines().any(
            |l| l.contains("audit report: starting with an empty summary")
                && l.contains("is not one this gateway wrote")
        ),
        "{log}"
    );
    let metrics = scrape(b.admin).await;
    assert_eq!(
        series(
            &metrics,
            "gateway_audit_state_errors_total{reason=\"corrupt\"}"
        ),
        1,
        "{metrics}"
    );
    let mut aside = state.clone().into_os_string();
    aside.push(".corrupt");
    assert!(Path::new(&aside).exists());
    let (_, out, _) = cli(b.admin, &["--format", "json"]);
    let empty: Report = serde_json::from_str(&out).unwrap();
    assert!(
        empty
            .routes
            .iter()
            .all(|r| r.would_deny.is_empty() && r.clients_seen == 0)
    );
    stop(b);
}

/// A foreign CA's client on an audit route is a would-deny for its
/// certificate, named as the handshake failures are, and not shown under
/// the names its unverified certificate claims.
#[tokio::test]
async fn certificate_problems_are_named_like_handshake_failures() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let (gw, _) = start(&pki, &backend, "").await;
    let foreign_root = Authority::root("foreign").unwrap();
    let foreign = foreign_root
        .issue(&LeafSpec::client("f", &[SPIFFE_FRONTEND]))
        .unwrap();
    let foreign = pki.creds("foreign", &foreign, &foreign_root);
    pass(gw.app_addr, ORDERS, &pki, Some(&foreign)).await;
    pass(gw.app_addr, ORDERS, &pki, None).await;
    let r = report(gw.admin_addr.unwrap(), Some("orders"), None).await;
    let orders = &r.routes[0];
    let mut got = refusals(orders);
    got.sort();
    assert_eq!(
        got,
        vec![
            (None, LOOPBACK_24.into(), "no_certificate".into(), 1),
            (None, LOOPBACK_24.into(), "unknown_ca".into(), 1),
        ]
    );
    // The names of a certificate that did not verify are not shown, and
    // it is not taken for a client without one.
    assert_eq!(orders.clients_seen, 2);
    assert!(
        orders.verdict.contains("2 identities would be refused")
            && orders.verdict.contains("(no certificate)")
            && orders.verdict.contains("(unverified certificate)"),
        "{}",
        orders.verdict
    );
}

/// `audit_state` in a directory that became writable by others: a local
/// user (uid 65534) replaces the saved summary while the gateway is down,
/// dropping the would-deny evidence. The restart reads nothing from there:
/// it says why, counts it (`reason="unsafe"`), and the report has no
/// evidence either way (not ready) instead of the planted "ready".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_state_another_user_could_have_written_is_never_evidence() {
    use std::os::unix::fs::PermissionsExt as _;
    if !is_root() || !process::user_exists("nobody") {
        eprintln!("skipped: needs root and uid 65534 to plant as");
        return;
    }
    let pki = Pki::new();
    // The test's tempdir is root's 0700: let uid 65534 reach the state dir.
    std::fs::set_permissions(pki.path(""), std::fs::Permissions::from_mode(0o711)).unwrap();
    let backend = EchoBackend::start().await;
    let dir = pki.path("state");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let state = dir.join("audit.json");
    let toml = with_test_defaults(
        &(admin_toml(&format!(
            "watch_files = false\naudit_state = \"{}\"\n",
            state.display()
        )) + &listener_toml(&pki, "edge", "")
            + &routes(backend.addr)),
    );
    let config = pki.write("gateway.toml", &toml);
    let stderr = pki.path("gateway.stderr");
    let b = start_binary(&config, &stderr);
    send_mix(b.app, &pki, &Clients::new(&pki)).await;
    let (code, out, _) = cli(b.admin, &["--route", "orders", "--since", "7d"]);
    assert_eq!(code, 1, "not ready before: {out}");
    stop(b);
    assert!(state.exists());

    // The directory made writable by others; the plant: the same shape,
    // no would-deny entries, written by uid 65534.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    for r in saved["routes"].as_array_mut().unwrap() {
        r["would_deny"]["entries"] = serde_json::json!([]);
    }
    let mut plant = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
        ])
        .arg(format!(
            "cat > {0}.new && mv -f {0}.new {0}",
            state.display()
        ))
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = plant.stdin.take().unwrap();
        stdin.write_all(saved.to_string().as_bytes()).unwrap();
    }
    assert!(plant.wait().unwrap().success(), "plant as uid 65534");

    std::fs::remove_file(&stderr).unwrap();
    let b = start_binary(&config, &stderr);
    let log = std::fs::read_to_string(&stderr).unwrap();
    assert!(
        log.lines().any(
            |l| l.contains("audit report: starting with an empty summary")
                && l.contains("is not trusted")
                && l.contains("writable by others")
        ),
        "{log}"
    );
    let metrics = scrape(b.admin).await;
    assert_eq!(
        series(
            &metrics,
            "gateway_audit_state_errors_total{reason=\"unsafe\"}"
        ),
        1,
        "{metrics}"
    );
    let (code, out, _) = cli(b.admin, &["--route", "orders", "--since", "7d"]);
    stop(b);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not ready: no clients seen"), "{out}");
}

//! Expiry nobody watched, end to end: the gateway's own certificate or CRL
//! inside its warning window (`expiry_warning`, or the last third of its
//! lifetime when shorter) leaves plain `/readyz` alone, fails
//! `/readyz?strict` naming it, and holds the routes it serves in the audit
//! report; client certificates seen in the last day inside their warning
//! window are listed by identity (exactly those), kept across a reload and
//! a restart through `audit_state`, and printed by `gateway rollout report`.

use std::net::SocketAddr;

use gateway::pki::LeafSpec;
use gateway::rollout::{Report, RouteReport};
use gateway_tests::process::{Reap, admin_addr, run_binary, signal, wait_listening};
use gateway_tests::*;
use time::{Duration, OffsetDateTime};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const ORDERS: &str = "orders.example.internal";
const SHORT: &str = "spiffe://example.internal/ns/shop/sa/short";
const HOURLY: &str = "spiffe://example.internal/ns/shop/sa/hourly";
const LONG: &str = "spiffe://example.internal/ns/shop/sa/long";

/// `GET path` on the admin endpoint: (status, body).
async fn get(admin: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        s.read_to_string(&mut out),
    )
    .await
    .expect("admin answered")
    .unwrap();
    let status = out
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {out:?}"));
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

async fn report(admin: SocketAddr) -> Report {
    let at = gateway::admin::client::Endpoint::Tcp(admin);
    gateway::admin::client::rollout_report(&at, None, None)
        .await
        .unwrap_or_else(|e| panic!("report: {e}"))
}

fn route<'a>(report: &'a Report, name: &str) -> &'a RouteReport {
    report
        .routes
        .iter()
        .find(|r| r.route == name)
        .unwrap_or_else(|| panic!("{name} in {report:?}"))
}

/// The admin endpoint, one listener `edge` (`listener_extra` in its
/// table) with the enforcing route `orders` for the frontend and the
/// three test identities.
fn config(pki: &Pki, backend: SocketAddr, top: &str, listener_extra: &str) -> String {
    format!("admin = \"127.0.0.1:0\"\n{top}")
        + &listener_toml(pki, "edge", listener_extra)
        + &route_toml(
            "orders",
            &[ORDERS],
            &[backend],
            &[SPIFFE_FRONTEND, SHORT, HOURLY, LONG],
        )
}

/// A server certificate for the test names, 90 days of life of which
/// under three are left.
fn server_expiring_soon(pki: &Pki) -> String {
    let mut spec = LeafSpec::server("gateway.example.internal", &["dns:orders.example.internal"]);
    // Half an hour short, so the report's words do not depend on the
    // seconds the test takes.
    spec.not_before = OffsetDateTime::now_utc() - Duration::days(87);
    spec.not_after = OffsetDateTime::now_utc() + Duration::days(3) - Duration::minutes(30);
    let leaf = pki.intermediate.issue(&spec).unwrap();
    pki.write(
        "soon-chain.pem",
        &format!("{}{}", leaf.cert_pem, pki.intermediate.cert_pem),
    );
    pki.write("soon.key", &leaf.key_pem);
    pki.path("soon-chain.pem").display().to_string()
}

#[tokio::test]
async fn a_server_certificate_inside_its_warning_window_fails_only_the_strict_readiness_check() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let soon = server_expiring_soon(&pki);
    let good = config(&pki, backend.addr, "", "");
    let toml = good
        .replace(&pki.path("server-chain.pem").display().to_string(), &soon)
        .replace(
            &pki.path("server.key").display().to_string(),
            &pki.path("soon.key").display().to_string(),
        );
    assert_ne!(toml, good);
    let gw = RunningGateway::start(&pki, &toml).await;
    let admin = gw.admin_addr.unwrap();

    // Load balancers' question is unchanged.
    assert_eq!(get(admin, "/readyz").await, (200, "ready\n".into()));
    let (status, body) = get(admin, "/readyz?strict").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with("not ready: 1 certificate or CRL inside the warning window\n"),
        "{body}"
    );
    assert!(
        body.contains(&format!(
            "listener edge cert certificate CN=gateway.example.internal in {soon}: expires in 2 days 23 hours"
        )),
        "{body}"
    );
    // Strict parsing: a misspelt or unknown parameter is refused, not
    // taken for the plain question.
    for bad in [
        "/readyz?stric",
        "/readyz?strict&verbose",
        "/readyz?strict=no",
    ] {
        let (status, body) = get(admin, bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }

    let r = report(admin).await;
    assert_eq!(r.expiry_warning_seconds, 30 * 86_400);
    assert_eq!(r.expiring.len(), 1, "{r:?}");
    assert_eq!(r.expiring[0].role, "listener edge cert");
    assert_eq!(r.expiring[0].file, soon);
    assert!(r.expiring[0].fails_closed);
    // The route it serves is not ready, enforcing or not: renew first.
    let orders = route(&r, "orders");
    assert_eq!(orders.expiring, r.expiring);
    assert!(!orders.ready);
    assert!(
        orders.verdict.starts_with(
            "not ready: renew first: listener edge cert (expires in 2 days 23 hours); then enforce"
        ),
        "{}",
        orders.verdict
    );

    // Renewed (the usual certificate, 90 days): strict is ready again.
    gw.reload_toml(&pki, &good).await.expect("reload");
    assert_eq!(get(admin, "/readyz?strict").await, (200, "ready\n".into()));
    let r = report(admin).await;
    assert!(r.expiring.is_empty(), "{r:?}");
    assert!(route(&r, "orders").ready);
}

#[tokio::test]
async fn a_crl_whose_next_update_is_inside_its_warning_window_is_named_likewise() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let now = OffsetDateTime::now_utc();
    // Seven days of life, published five days ago and not since: inside
    // its last third.
    let root_crl = pki
        .root
        .crl_published(
            1,
            &[],
            now - Duration::days(5),
            now + Duration::days(2) - Duration::minutes(30),
        )
        .unwrap();
    pki.write("root.crl.pem", &root_crl);
    // Seven days too, but published a minute ago (a daily refresh): its
    // 7 days are inside expiry_warning's 30, not inside its last third,
    // so it is not flagged.
    pki.write(
        "intermediate.crl.pem",
        &pki.intermediate
            .crl_until(1, &[], now + Duration::days(7))
            .unwrap(),
    );
    let crls = pki.crls_line(&["root.crl.pem", "intermediate.crl.pem"]);
    let gw = RunningGateway::start(&pki, &config(&pki, backend.addr, "", &crls)).await;
    let admin = gw.admin_addr.unwrap();
    // The CRLs work: the frontend is served.
    passes(gw.app_addr, ORDERS, pki.frontend_config(), b"x").await;

    assert_eq!(get(admin, "/readyz").await, (200, "ready\n".into()));
    let (status, body) = get(admin, "/readyz?strict").await;
    assert_eq!(status, 503, "{body}");
    let file = pki.path("root.crl.pem").display().to_string();
    assert!(
        body.contains(&format!(
            "listener edge crl CRL (next update) CN=gateway test root in {file}: expires in 1 day 23 hours"
        )),
        "{body}"
    );
    assert!(
        !body.contains("intermediate.crl.pem"),
        "a fresh CRL is outside its window: {body}"
    );
    let r = report(admin).await;
    let orders = route(&r, "orders");
    assert_eq!(orders.expiring.len(), 1, "{orders:?}");
    assert_eq!(
        (
            orders.expiring[0].kind.as_str(),
            orders.expiring[0].file.as_str()
        ),
        ("crl", file.as_str())
    );
    assert!(!orders.ready, "{}", orders.verdict);
    assert!(
        orders
            .verdict
            .starts_with("not ready: renew first: listener edge crl (expires in 1 day 23 hours)"),
        "{}",
        orders.verdict
    );
}

/// Client certificates of the three kinds: one hour of life with ten
/// minutes left (not renewed), one hour with 55 minutes left (fresh), and
/// a year (long-lived).
struct Clients {
    short: ClientCreds,
    hourly: ClientCreds,
    long: ClientCreds,
    /// The short one's notAfter, as the report writes it.
    short_not_after: String,
}

impl Clients {
    fn new(pki: &Pki) -> Clients {
        let now = OffsetDateTime::now_utc();
        let spec = |name: &str, id: &str, before: Duration, after: Duration| {
            let mut s = LeafSpec::client(name, &[id]);
            s.not_before = now - before;
            s.not_after = now + after;
            s
        };
        let short_until = now + Duration::minutes(10);
        Clients {
            short: pki.client(
                "short",
                &spec("short", SHORT, Duration::minutes(50), Duration::minutes(10)),
            ),
            hourly: pki.client(
                "hourly",
                &spec(
                    "hourly",
                    HOURLY,
                    Duration::minutes(5),
                    Duration::minutes(55),
                ),
            ),
            long: pki.client(
                "long",
                &spec("long", LONG, Duration::hours(1), Duration::days(365)),
            ),
            short_not_after: short_until
                .replace_nanosecond(0)
                .unwrap()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap(),
        }
    }

    /// Each of them twice, and the test's usual frontend.
    async fn connect_all(&self, addr: SocketAddr, pki: &Pki) {
        for creds in [&self.short, &self.hourly, &self.long, &pki.frontend()] {
            for _ in 0..2 {
                passes(addr, ORDERS, pki.client_config(Some(creds)), b"x").await;
            }
        }
    }
}

/// (identity, seconds left) of each listed client certificate.
fn listed(r: &RouteReport) -> Vec<(String, i64)> {
    r.expiring_clients
        .iter()
        .map(|c| (c.identity.clone(), c.seconds_left))
        .collect()
}

fn assert_only_short(r: &RouteReport, c: &Clients) {
    let got = listed(r);
    assert_eq!(got.len(), 1, "{r:?}");
    assert_eq!(got[0].0, SHORT);
    assert!((500..=600).contains(&got[0].1), "{got:?}");
    assert_eq!(r.expiring_clients[0].not_after, c.short_not_after);
    assert_eq!(r.expiring_clients_overflow, None);
}

#[tokio::test]
async fn exactly_the_client_certificate_not_renewed_is_listed_and_kept_across_a_reload() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let toml = config(&pki, backend.addr, "", "");
    let gw = RunningGateway::start(&pki, &toml).await;
    let admin = gw.admin_addr.unwrap();
    let clients = Clients::new(&pki);
    clients.connect_all(gw.app_addr, &pki).await;

    let r = report(admin).await;
    let orders = route(&r, "orders");
    assert_eq!(orders.mode, "enforce");
    assert_only_short(orders, &clients);
    // Clients' certificates are theirs to renew: the route stays ready.
    assert!(orders.ready, "{}", orders.verdict);

    // A reload (orders to audit) keeps the table, and the route goes on
    // recording into it.
    let audit = toml.replace(
        &format!("allow = [\"{SPIFFE_FRONTEND}\""),
        &format!("mode = \"audit\"\nallow = [\"{SPIFFE_FRONTEND}\""),
    );
    assert_ne!(audit, toml);
    gw.reload_toml(&pki, &audit).await.expect("reload");
    let r = report(admin).await;
    let orders = route(&r, "orders");
    assert_eq!(orders.mode, "audit");
    assert_only_short(orders, &clients);
    let last_seen = orders.expiring_clients[0].last_seen.clone();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    passes(
        gw.app_addr,
        ORDERS,
        pki.client_config(Some(&clients.short)),
        b"x",
    )
    .await;
    let r = report(admin).await;
    let again = &route(&r, "orders").expiring_clients[0];
    assert!(again.last_seen > last_seen, "{again:?} after {last_seen}");
}

/// `gateway rollout report --admin ADMIN ARGS`: (exit code, stdout and
/// stderr).
fn cli(admin: SocketAddr, args: &[&str]) -> (i32, String) {
    let (code, out, err) = process::rollout_report(admin, args);
    (code, out + &err)
}

fn stop(mut proc: Reap) {
    signal(&proc.0, "TERM");
    let status = process::exit_status(&mut proc.0, "SIGTERM");
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_prints_expiring_client_certificates_and_a_restart_keeps_them() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let state = pki.path("audit.json");
    let top = format!(
        "watch_files = false\naudit_state = \"{}\"\n",
        state.display()
    );
    let toml = with_test_defaults(&config(&pki, backend.addr, &top, ""));
    let config = pki.write("gateway.toml", &toml);
    let stderr = pki.path("gateway.stderr");
    let proc = run_binary(&config, &stderr, &[]);
    let app = wait_listening(&stderr);
    let admin = admin_addr(&stderr);
    let clients = Clients::new(&pki);
    clients.connect_all(app, &pki).await;

    let (code, out) = cli(admin, &["--route", "orders"]);
    // Enforcing, nothing of the gateway's runs out: ready.
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("  client certificates seen in the last day inside their warning window:\n"),
        "{out}"
    );
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("    {SHORT}  serial ")))
        .unwrap_or_else(|| panic!("{SHORT} in\n{out}"));
    assert!(
        line.contains(&format!(
            "  not after {}  last seen ",
            clients.short_not_after
        )),
        "{line}"
    );
    for other in [HOURLY, LONG, SPIFFE_FRONTEND] {
        assert!(!out.contains(other), "{other} in\n{out}");
    }
    let (_, json) = cli(admin, &["--format", "json"]);
    let before: Report = serde_json::from_str(&json).expect("JSON report");
    assert_only_short(route(&before, "orders"), &clients);
    stop(proc);

    // The state file (version 2) brings them back after a restart.
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(saved["version"], 2);
    let proc = run_binary(&config, &stderr, &[]);
    wait_listening(&stderr);
    let admin = admin_addr(&stderr);
    let (_, json) = cli(admin, &["--format", "json"]);
    let after: Report = serde_json::from_str(&json).expect("JSON report");
    assert_only_short(route(&after, "orders"), &clients);
    assert_eq!(
        route(&after, "orders").expiring_clients[0].last_seen,
        route(&before, "orders").expiring_clients[0].last_seen
    );
    stop(proc);
}

//! `GET /metrics` as Prometheus reads it: a scripted mix of allowed,
//! denied and failed connections, then one scrape parsed whole by
//! Prometheus' own Python client parser (`prometheus_client.parser`, which
//! `cargo xtask setup` installs) and its values checked exactly: route
//! decisions, handshake failures by reason, handshake and backend connect
//! histograms, bytes for known echo sizes, backend failures, build info.
//! And `examples/grafana/gateway.json` queries only metrics the gateway
//! serves.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use gateway::pki::{Authority, LeafSpec};
use gateway_tests::*;
use rustls::AlertDescription;
use tokio::io::AsyncReadExt as _;

const ORDERS: &str = "orders.example.internal";
const BILLING: &str = "billing.example.internal";

/// The sizes each allowed client echoes through route orders.
const SIZES: [usize; 3] = [1, 20_000, 300_001];

/// One sample as the parser read it.
#[derive(Debug)]
struct Sample {
    family: String,
    kind: String,
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

impl Sample {
    fn from_json(line: &str) -> Sample {
        let v: serde_json::Value = serde_json::from_str(line).expect("parser output");
        let text = |k: &str| v[k].as_str().expect("a string").to_owned();
        Sample {
            family: text("family"),
            kind: text("type"),
            name: text("name"),
            labels: v["labels"]
                .as_object()
                .expect("labels")
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().expect("label value").to_owned()))
                .collect(),
            value: v["value"].as_f64().expect("value"),
        }
    }
}

/// A scrape as Prometheus' parser reads it.
struct Scrape {
    samples: Vec<Sample>,
}

impl Scrape {
    /// Parses `text` with `prometheus_client.parser`; panics when it
    /// refuses the text.
    fn parse(text: &str) -> Scrape {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("scrape.txt");
        std::fs::write(&file, text).expect("write scrape");
        let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
for family in text_string_to_metric_families(open(sys.argv[1]).read()):
    for s in family.samples:
        print(json.dumps({"family": family.name, "type": family.type, "name": s.name,
                          "labels": s.labels, "value": s.value}))
"#;
        let out = std::process::Command::new(python())
            .arg("-c")
            .arg(script)
            .arg(&file)
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "Prometheus' text parser refused the scrape: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        let samples = String::from_utf8(out.stdout)
            .expect("utf-8")
            .lines()
            .map(Sample::from_json)
            .collect::<Vec<_>>();
        // What the parser lets pass but Prometheus would not take: a
        // sample no TYPE line covers, the same series twice.
        let mut seen = BTreeSet::new();
        for s in &samples {
            assert_ne!(s.kind, "unknown", "{} has no TYPE line of its own", s.name);
            assert!(
                seen.insert((s.name.clone(), s.labels.clone())),
                "{}{:?} twice",
                s.name,
                s.labels
            );
        }
        Scrape { samples }
    }

    /// The value of the one sample `name` with exactly `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.name == name && s.labels == want)
            .collect();
        assert_eq!(found.len(), 1, "one {name}{want:?} in the scrape");
        found[0].value
    }

    /// The sum of every sample `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// Every sample name served, and the type of its family.
    fn names(&self) -> BTreeMap<&str, &str> {
        self.samples
            .iter()
            .map(|s| (s.name.as_str(), s.kind.as_str()))
            .collect()
    }
}

/// The interpreter with `prometheus_client`: the one `cargo xtask setup`
/// installs it into, else `python3` (which may have it).
fn python() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    let ours = home.join(".cache/gateway-xtask/python/bin/python3");
    if ours.exists() {
        return ours;
    }
    let ok = std::process::Command::new("python3")
        .args(["-c", "import prometheus_client"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "Prometheus' Python client (prometheus_client) is not installed: run `cargo xtask setup`"
    );
    PathBuf::from("python3")
}

/// The scripted mix, on one listener "edge" with routes orders (an echo
/// backend) and billing (a port nobody listens on); returns the scrape.
async fn scripted_mix() -> (String, usize) {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let nobody = dead_port();
    let (revoked, serial) = pki.revocable_frontend("revoked");
    pki.write(
        "clients.crl.pem",
        &pki.intermediate.crl(1, &[&serial]).unwrap(),
    );
    let toml = "admin = \"127.0.0.1:0\"\n".to_owned()
        + &listener_toml(&pki, "edge", &pki.crls_line(&["clients.crl.pem"]))
        + &route_toml("orders", &[ORDERS], &[backend.addr], &[SPIFFE_FRONTEND])
        + &route_toml("billing", &[BILLING], &[nobody], &[SPIFFE_FRONTEND]);
    let mut gw = RunningGateway::start(&pki, &toml).await;
    let addr = gw.app_addr;
    let mut connections = 0;

    // Allowed, each echoing a known number of bytes.
    for size in SIZES {
        passes(addr, ORDERS, pki.frontend_config(), &payload(size)).await;
        connections += 1;
    }
    // Denied by policy: a known CA, an identity the route does not allow.
    let intruder = pki.client("intruder", &LeafSpec::client("intruder", &[SPIFFE_OTHER]));
    for _ in 0..2 {
        assert_eq!(
            refusal(addr, ORDERS, pki.client_config(Some(&intruder))).await,
            AlertDescription::AccessDenied
        );
        connections += 1;
    }
    // No certificate.
    assert_eq!(
        refusal(addr, ORDERS, pki.client_config(None)).await,
        AlertDescription::CertificateRequired
    );
    connections += 1;
    // A CA the gateway does not know.
    let foreign = Authority::root("foreign root").unwrap();
    let stranger = pki.creds(
        "stranger",
        &foreign
            .issue(&LeafSpec::client("frontend", &[SPIFFE_FRONTEND]))
            .unwrap(),
        &foreign,
    );
    assert_eq!(
        refusal(addr, ORDERS, pki.client_config(Some(&stranger))).await,
        AlertDescription::UnknownCA
    );
    connections += 1;
    // Expired an hour ago.
    let mut spec = LeafSpec::client("frontend", &[SPIFFE_FRONTEND]);
    spec.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(2);
    spec.not_after = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    let expired = pki.client("expired", &spec);
    assert_eq!(
        refusal(addr, ORDERS, pki.client_config(Some(&expired))).await,
        AlertDescription::CertificateExpired
    );
    connections += 1;
    // Revoked by the listener's CRL.
    assert_eq!(
        refusal(addr, ORDERS, pki.client_config(Some(&revoked))).await,
        AlertDescription::CertificateRevoked
    );
    connections += 1;
    // A server name no route has, and no default route.
    assert_eq!(
        refusal(addr, "nowhere.example.internal", pki.frontend_config()).await,
        AlertDescription::UnrecognisedName
    );
    connections += 1;
    // Allowed, but its backend refuses: the client sees the end, no bytes.
    let mut tls = connect(addr, BILLING, pki.frontend_config())
        .await
        .expect("billing handshake");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(STEP, tls.read_to_end(&mut rest))
        .await
        .expect("closed after the failed connect");
    assert!(rest.is_empty());
    connections += 1;

    // Every connection has ended (its access-log record is out) before
    // the scrape: the counts are final.
    for _ in 0..connections {
        gw.next_record().await;
    }
    (gw.scrape().await, connections)
}

#[tokio::test]
async fn a_scripted_mix_is_counted_exactly_and_parses_as_prometheus_text() {
    let (response, connections) = scripted_mix().await;
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    let m = Scrape::parse(body);
    let edge = [("listener", "edge")];
    let route = |r: &'static str| [("listener", "edge"), ("route", r)];

    let decisions = |r: &str, verdict: &str| {
        m.value(
            "gateway_route_decisions_total",
            &[("listener", "edge"), ("route", r), ("verdict", verdict)],
        )
    };
    assert_eq!(decisions("orders", "allow"), 3.0);
    // Policy twice, no certificate, unknown CA, expired, revoked.
    assert_eq!(decisions("orders", "deny"), 6.0);
    assert_eq!(decisions("orders", "audit"), 0.0);
    assert_eq!(decisions("billing", "allow"), 1.0);

    let failures = |reason: &str| {
        m.value(
            "gateway_handshake_failures_total",
            &[("listener", "edge"), ("reason", reason)],
        )
    };
    for (reason, n) in [
        ("policy", 2.0),
        ("no_certificate", 1.0),
        ("unknown_ca", 1.0),
        ("expired", 1.0),
        ("revoked", 1.0),
        ("no_route", 1.0),
        ("bad_certificate", 0.0),
        ("timeout", 0.0),
        ("protocol", 0.0),
    ] {
        assert_eq!(failures(reason), n, "handshake failures for {reason}");
    }
    // Every connection completed its handshake or failed it, once.
    let completed = m.value("gateway_handshake_duration_seconds_count", &edge);
    assert_eq!(completed, 4.0, "three allowed on orders, one on billing");
    assert_eq!(
        completed + m.sum("gateway_handshake_failures_total", &edge),
        connections as f64
    );
    assert_eq!(
        m.value(
            "gateway_handshake_duration_seconds_bucket",
            &[("listener", "edge"), ("le", "+Inf")]
        ),
        4.0
    );

    // Exactly the echoed bytes, each way.
    let echoed: usize = SIZES.iter().sum();
    let bytes = |r: &'static str, direction: &'static str| {
        m.value(
            "gateway_bytes_total",
            &[("listener", "edge"), ("route", r), ("direction", direction)],
        )
    };
    assert_eq!(bytes("orders", "client_to_backend"), echoed as f64);
    assert_eq!(bytes("orders", "backend_to_client"), echoed as f64);
    assert_eq!(bytes("billing", "client_to_backend"), 0.0);
    assert_eq!(bytes("billing", "backend_to_client"), 0.0);

    // Connects that reached a backend; the refused one is a failure.
    assert_eq!(
        m.value(
            "gateway_backend_connect_duration_seconds_count",
            &route("orders")
        ),
        3.0
    );
    assert_eq!(
        m.value(
            "gateway_backend_connect_duration_seconds_count",
            &route("billing")
        ),
        0.0
    );
    assert_eq!(m.value("gateway_no_backend_total", &route("billing")), 1.0);
    assert_eq!(
        m.sum(
            "gateway_backend_connect_failures_total",
            &[("route", "billing"), ("reason", "refused")]
        ),
        1.0
    );
    assert_eq!(m.sum("gateway_offload_total", &edge), 3.0);
    assert_eq!(m.value("gateway_live_connections", &[]), 0.0);

    // Refusals counted by admission's reasons too.
    assert_eq!(
        m.value(
            "gateway_connections_refused_total",
            &[("listener", "edge"), ("reason", "no_route")]
        ),
        1.0
    );

    let build: Vec<&Sample> = m
        .samples
        .iter()
        .filter(|s| s.name == "gateway_build_info")
        .collect();
    assert_eq!(build.len(), 1);
    assert_eq!(build[0].value, 1.0);
    assert_eq!(build[0].labels["version"], env!("CARGO_PKG_VERSION"));
    let commit = &build[0].labels["commit"];
    assert!(
        commit == "unknown"
            || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
        "commit {commit:?}"
    );

    // No label holds a client's address or identity (a backend's address
    // is the config's).
    for s in &m.samples {
        for (k, v) in &s.labels {
            if k == "backend" {
                continue;
            }
            assert!(
                !v.contains("127.0.0.1") && !v.contains("spiffe://"),
                "{} has a client's address or identity: {v}",
                s.name
            );
        }
    }
    assert!(
        m.samples
            .iter()
            .any(|s| s.family == "gateway_handshake_duration_seconds" && s.kind == "histogram"),
        "histograms are typed as such"
    );
}

/// Families served only where a feature runs, which an in-process gateway
/// on loopback does not: the eBPF guard (root, BPF) and the kernel block
/// list's counters (XDP on a listener's interface, never `lo`). The
/// dashboard may query these; each must be a name the gateway's source
/// registers, and `guard.rs` and `block_list.rs` check the dashboard's
/// names against a real scrape with the feature running.
const SERVED_WITH_A_FEATURE: &[(&str, &str)] = &[
    ("gateway_guard_connects_total", "gateway/src/guard.rs"),
    (
        "gateway_block_list_drops_total",
        "gateway/src/admission/mod.rs",
    ),
];

#[tokio::test]
async fn the_dashboard_queries_only_metrics_the_gateway_serves() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let queried = gateway_tests::dashboard::metric_names();
    let (response, _) = scripted_mix().await;
    let body = response.split_once("\r\n\r\n").expect("HTTP response").1;
    let scrape = Scrape::parse(body);
    let served = scrape.names();
    for name in &queried {
        if served.contains_key(name.as_str()) {
            continue;
        }
        let Some((_, file)) = SERVED_WITH_A_FEATURE.iter().find(|(n, _)| n == name) else {
            panic!("the dashboard queries {name}, which the gateway does not serve");
        };
        // Registered in the source under exactly that name.
        let source = std::fs::read_to_string(root.join(file)).expect("source");
        assert!(
            source.contains(&format!("\"{name}\"")),
            "{name} is not registered in {file}"
        );
    }
    // The families the issue names are on it.
    for name in [
        "gateway_route_decisions_total",
        "gateway_handshake_duration_seconds_bucket",
        "gateway_handshake_failures_total",
        "gateway_bytes_total",
        "gateway_live_connections",
        "gateway_offload_total",
        "gateway_guard_connects_total",
        "gateway_certificate_expiry_seconds",
        "gateway_crl_next_update_seconds",
        "gateway_connections_refused_total",
        "gateway_blocked_sources",
    ] {
        assert!(queried.contains(name), "the dashboard does not show {name}");
    }
}

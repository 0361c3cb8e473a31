//! `cargo run -p gateway-tests --bin fleet_fanout [WATCHERS] [PUSHES] [CRL_KIB]`:
//! how long a push takes to reach many fleet members through one etcd.
//!
//! Each simulated member does what `gateway::fleet::etcd::follow` does
//! before its reload: its own connection, a watch on the prefix, and on
//! each change the prefix read whole (`fleet::etcd::fetch`). The time from
//! a push's transaction returning to each member holding the pushed
//! revision is recorded; the reload itself (measured by `tests/fleet.rs`)
//! comes on top. One etcd on loopback, started and stopped here.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::WatchOptions;
use gateway::fleet::{Host, etcd};
use gateway_tests::etcd::Etcd;

const CA: &str = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n";

fn document(n: usize) -> String {
    format!(
        "[[listeners]]\nname = \"edge\"\nbind = \"0.0.0.0:8443\"\ncert = \"s.pem\"\nkey = \"s.key\"\nclient_ca = \"ca.pem\"\ncrls = [\"big.crl.pem\"]\n[[listeners.routes]]\nname = \"r{n}\"\nbackends = [\"127.0.0.1:1\"]\n"
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let watchers: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let pushes: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    // A CRL of this many KiB in the document (etcd's default request
    // limit is 1.5 MiB for the whole transaction).
    let crl_kib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let server = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let host_path = dir.path().join("host.toml");
    let host = Host::parse(
        &format!(
            "[fleet]\netcd = [\"{}\"]\nprefix = \"/fanout\"\nname = \"sim\"\ncache = \"fleet.json\"\n",
            server.url()
        ),
        &host_path,
    )
    .unwrap()
    .unwrap();
    let files = BTreeMap::from([
        ("ca.pem".to_owned(), CA.as_bytes().to_vec()),
        ("big.crl.pem".to_owned(), vec![b'A'; crl_kib << 10]),
    ]);
    etcd::push(&host, &document(0), &files).await.unwrap();

    // Every member sends (member, revision, when) as it holds a revision.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, i64, Instant)>();
    let host = Arc::new(host);
    let ready = Arc::new(tokio::sync::Barrier::new(watchers + 1));
    for m in 0..watchers {
        let (host, tx, ready) = (host.clone(), tx.clone(), ready.clone());
        tokio::spawn(async move {
            let mut client = etcd::connect(&host).await.unwrap();
            let first = etcd::fetch(&mut client, &host, None).await.unwrap();
            let (_watcher, mut stream) = client
                .watch(
                    format!("{}/", host.prefix()),
                    Some(
                        WatchOptions::new()
                            .with_range(format!("{}/members/", host.prefix()))
                            .with_start_revision(first.revision + 1),
                    ),
                )
                .await
                .unwrap();
            ready.wait().await;
            while let Ok(Some(resp)) = stream.message().await {
                if resp.events().is_empty() {
                    continue;
                }
                if let Ok(f) = etcd::fetch(&mut client, &host, None).await
                    && let Ok(doc) = f.document
                {
                    let _ = tx.send((m, doc.revision, Instant::now()));
                }
            }
        });
    }
    ready.wait().await;
    let mut latencies = Vec::new();
    for n in 1..=pushes {
        let revision = etcd::push(&host, &document(n), &files).await.unwrap();
        let pushed = Instant::now();
        let mut reached = vec![false; watchers];
        let mut left = watchers;
        let until = pushed + Duration::from_secs(30);
        while left > 0 {
            let Ok(Some((m, rev, at))) = tokio::time::timeout_at(until.into(), rx.recv()).await
            else {
                eprintln!("push {n}: {left} members never saw revision {revision}");
                break;
            };
            if rev >= revision && !reached[m] {
                reached[m] = true;
                left -= 1;
                latencies.push(at.saturating_duration_since(pushed));
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    latencies.sort();
    println!(
        "{watchers} members, {pushes} pushes, a {crl_kib} KiB CRL, one etcd on loopback: push to revision held: p50 {:?}, p99 {:?}, max {:?} ({} samples)",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default(),
        latencies.len()
    );
    drop(server);
}

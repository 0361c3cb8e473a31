//! Results as JSON (for machines), BENCHMARKS.md (for people) and PNG plots.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use plotters::prelude::*;
use serde::Serialize;

use crate::aead::AeadCost;
use crate::load::{BulkResult, Direction, HandshakeResult, LatencyResult, MemoryResult, RateBasis};

#[derive(Debug, Serialize)]
pub struct Report {
    pub date: String,
    pub mode: &'static str,
    pub machine: Machine,
    pub proxy_cpus: Vec<usize>,
    pub load_cpus: Vec<usize>,
    pub paced_gbps: f64,
    /// Rounds of latency at each common rate; the median p99's is shown.
    pub latency_rounds: usize,
    /// Raw AES-128-GCM on the proxy's CPU, for the kernel TLS floor.
    pub aead: Option<AeadCost>,
    /// The gateway's record layer against rustls' unbuffered API.
    pub record_layer: Option<crate::record_layer::RecordLayerCost>,
    /// Per CPU of the run, the share of its time the hypervisor took.
    pub steal: Vec<CpuSteal>,
    pub peers: Vec<PeerReport>,
    /// Allowed clients under attack, and what an attack costs (#19).
    pub abuse: Option<crate::abuse::AbuseReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CpuSteal {
    pub cpu: usize,
    pub percent: f64,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
    pub memory_gib: f64,
}

impl Machine {
    pub fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned();
        let memory_gib = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / (1u64 << 20) as f64);
        Machine {
            cpu,
            // Not available_parallelism: the load generator is pinned to one CPU.
            // SAFETY: sysconf reads a constant of the running system.
            cores: usize::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) })
                .unwrap_or(1),
            kernel,
            memory_gib,
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct PeerReport {
    pub name: String,
    pub version: String,
    pub bulk: Vec<BulkResult>,
    pub handshakes: Option<HandshakeResult>,
    pub peak_requests_per_second: Option<f64>,
    pub latency: Vec<LatencyResult>,
    pub memory: Option<MemoryResult>,
    /// The gateway on more cores (gateways only).
    pub scaling: Option<ScalingResult>,
    /// The paced bulk scenarios and the handshakes again, with the
    /// OpenSSL client (stunnel in client mode) instead of rustls.
    pub openssl_bulk: Vec<BulkResult>,
    pub openssl_handshakes: Option<HandshakeResult>,
    /// Its throughput knobs per its documentation, set or left at default.
    pub tuning: Vec<crate::peers::Tuning>,
    /// Its config file as the run used it.
    pub config: Option<String>,
    /// Scenarios that failed, with why.
    pub errors: Vec<String>,
}

/// The gateway on `cores` against `baseline_cores`, measured in pairs: each
/// round runs the baseline and then the many-core gateway back to back, so
/// the host's drift between rounds falls out of each round's ratio.
#[derive(Debug, Clone, Serialize)]
pub struct ScalingResult {
    pub baseline_cores: usize,
    pub cores: usize,
    /// The many-core gateway had cores of its own (the load ran on none of
    /// them): its rates are its own, and the speed-up is measured.
    pub dedicated: bool,
    /// Median over the rounds of the handshake rate on `cores` ÷ on
    /// `baseline_cores`: the speed-up as measured (the gateway's own only
    /// when `dedicated`).
    pub handshake_rate_speedup: Option<f64>,
    pub handshake_rate_rounds: Vec<f64>,
    /// Medians over the rounds, on `baseline_cores`.
    pub baseline_handshakes: HandshakeResult,
    pub baseline_bulk: BulkResult,
    /// Medians over the rounds, on `cores`.
    pub handshakes: HandshakeResult,
    pub bulk: BulkResult,
    /// Median over the rounds of cores/baseline × baseline CPU ms per
    /// handshake ÷ CPU ms per handshake on `cores`.
    pub handshake_speedup: Option<f64>,
    /// The same from CPU-s per GB in the bulk scenario.
    pub bulk_speedup: Option<f64>,
    /// Each round's projection, in the order measured: their spread says
    /// how far to trust the medians.
    pub handshake_rounds: Vec<f64>,
    pub bulk_rounds: Vec<f64>,
}

/// One round of the scaling scenario: the same work on both core counts.
#[derive(Debug, Clone)]
pub struct ScalingRound {
    pub baseline_handshakes: HandshakeResult,
    pub handshakes: HandshakeResult,
    pub baseline_bulk: BulkResult,
    pub bulk: BulkResult,
}

impl ScalingResult {
    /// None without rounds.
    pub fn from_rounds(
        baseline_cores: usize,
        cores: usize,
        dedicated: bool,
        rounds: Vec<ScalingRound>,
    ) -> Option<ScalingResult> {
        let factor = cores as f64 / baseline_cores as f64;
        let project = |base: f64, here: f64| (here > 0.0).then(|| factor * base / here);
        let handshake_rounds: Vec<f64> = rounds
            .iter()
            .filter_map(|r| {
                project(
                    r.baseline_handshakes.proxy_cpu_ms_each,
                    r.handshakes.proxy_cpu_ms_each,
                )
            })
            .collect();
        let bulk_rounds: Vec<f64> = rounds
            .iter()
            .filter_map(|r| {
                project(
                    r.baseline_bulk.proxy_cpu_s_per_gb,
                    r.bulk.proxy_cpu_s_per_gb,
                )
            })
            .collect();
        let handshake_rate_rounds: Vec<f64> = rounds
            .iter()
            .filter(|r| r.baseline_handshakes.per_second > 0.0)
            .map(|r| r.handshakes.per_second / r.baseline_handshakes.per_second)
            .collect();
        let handshake_speedup = median_by(handshake_rounds.clone(), |&v| v);
        let bulk_speedup = median_by(bulk_rounds.clone(), |&v| v);
        let middle = |key: fn(&ScalingRound) -> f64| median_by(rounds.iter().collect(), |r| key(r));
        Some(ScalingResult {
            baseline_cores,
            cores,
            dedicated,
            handshake_rate_speedup: median_by(handshake_rate_rounds.clone(), |&v| v),
            handshake_rate_rounds,
            baseline_handshakes: middle(|r| r.baseline_handshakes.proxy_cpu_ms_each)?
                .baseline_handshakes
                .clone(),
            baseline_bulk: middle(|r| r.baseline_bulk.proxy_cpu_s_per_gb)?
                .baseline_bulk
                .clone(),
            handshakes: middle(|r| r.handshakes.proxy_cpu_ms_each)?
                .handshakes
                .clone(),
            bulk: middle(|r| r.bulk.proxy_cpu_s_per_gb)?.bulk.clone(),
            handshake_speedup,
            bulk_speedup,
            handshake_rounds,
            bulk_rounds,
        })
    }

    /// On dedicated cores, the measured handshake rate ratio; else the
    /// lower projection: the target holds only if both scenarios scale.
    pub fn speedup(&self) -> Option<f64> {
        if self.dedicated {
            return self.handshake_rate_speedup;
        }
        match (self.handshake_speedup, self.bulk_speedup) {
            (Some(h), Some(b)) => Some(h.min(b)),
            (h, b) => h.or(b),
        }
    }
}

/// The middle element by `key` (the upper of the two middle ones for an
/// even count); None for none.
pub(crate) fn median_by<T>(mut v: Vec<T>, key: impl Fn(&T) -> f64) -> Option<T> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let mid = v.len() / 2;
    Some(v.swap_remove(mid))
}

impl PeerReport {
    fn bulk(&self, conns: usize, dir: Direction, paced: bool) -> Option<&BulkResult> {
        find_bulk(&self.bulk, conns, dir, paced)
    }

    fn openssl_bulk(&self, conns: usize, dir: Direction) -> Option<&BulkResult> {
        find_bulk(&self.openssl_bulk, conns, dir, true)
    }

    /// Each client's results in the paced bulk and handshake tables: the
    /// relay has no TLS, so no client of either kind.
    fn clients(&self) -> Vec<ClientRow<'_>> {
        let tls = self.name != "relay";
        let mut out = Vec::new();
        let rustls: Vec<Option<&BulkResult>> = SCENARIOS
            .iter()
            .map(|&(c, d, _)| self.bulk(c, d, true))
            .collect();
        if rustls.iter().any(Option::is_some) || self.handshakes.is_some() {
            out.push(ClientRow {
                client: if tls { "rustls" } else { "plain TCP" },
                bulk: rustls,
                handshakes: self.handshakes.as_ref(),
            });
        }
        if !self.openssl_bulk.is_empty() || self.openssl_handshakes.is_some() {
            out.push(ClientRow {
                client: "OpenSSL",
                bulk: SCENARIOS
                    .iter()
                    .map(|&(c, d, _)| self.openssl_bulk(c, d))
                    .collect(),
                handshakes: self.openssl_handshakes.as_ref(),
            });
        }
        out
    }
}

/// One peer's figures with one client: the paced scenarios in
/// `SCENARIOS` order, and the handshakes.
struct ClientRow<'a> {
    client: &'static str,
    bulk: Vec<Option<&'a BulkResult>>,
    handshakes: Option<&'a HandshakeResult>,
}

fn find_bulk(
    results: &[BulkResult],
    conns: usize,
    dir: Direction,
    paced: bool,
) -> Option<&BulkResult> {
    results
        .iter()
        .find(|b| b.connections == conns && b.direction == dir && b.offered_gbps.is_some() == paced)
}

pub fn write_all(report: &Report, dir: &Path, markdown: Option<&Path>) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(dir.join("results.json"), json)?;
    let plots = match plots(report, dir) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("bench: plots skipped: {e:#}");
            Vec::new()
        }
    };
    let md_path = markdown.map_or_else(|| dir.join("BENCHMARKS.md"), Path::to_path_buf);
    // Plot links are relative to where the markdown lives.
    let base = md_path.parent().unwrap_or(Path::new("."));
    let rel: Vec<String> = plots.iter().map(|p| relative(p, base)).collect();
    std::fs::write(&md_path, markdown_text(report, &rel))
        .with_context(|| format!("writing {}", md_path.display()))?;
    eprintln!(
        "bench: wrote {} and {}",
        dir.join("results.json").display(),
        md_path.display()
    );
    Ok(())
}

fn relative(p: &Path, base: &Path) -> String {
    let (Ok(p), Ok(base)) = (p.canonicalize(), base.canonicalize()) else {
        return p.display().to_string();
    };
    p.strip_prefix(&base)
        .map_or_else(|_| p.display().to_string(), |r| r.display().to_string())
}

const SCENARIOS: [(usize, Direction, &str); 4] = [
    (1, Direction::Upload, "1 conn upload"),
    (1, Direction::Download, "1 conn download"),
    (16, Direction::Upload, "16 conns upload"),
    (16, Direction::Download, "16 conns download"),
];

fn f(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".into(), |v| format!("{v:.digits$}"))
}

/// Values with two decimals, comma-separated.
fn list(values: &[f64]) -> String {
    values
        .iter()
        .map(|v| format!("{v:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether rustls' unbuffered API could carry the userspace path instead of
/// the gateway's own record layer: within 10% on CPU per GB and on KiB per
/// idle connection, it would (the gateway would own less TLS).
fn record_layer_section(
    s: &mut String,
    rl: &crate::record_layer::RecordLayerCost,
    gateway: Option<&PeerReport>,
) {
    let ours_cpu = rl.ours_seal_cpu_s_per_gb + rl.ours_open_cpu_s_per_gb;
    let theirs_cpu = rl.rustls_seal_cpu_s_per_gb + rl.rustls_open_cpu_s_per_gb;
    let _ = writeln!(
        s,
        "\n## The record layer: the gateway's own against rustls' unbuffered API\n\n\
         The userspace path runs the gateway's own TLS record layer. rustls' unbuffered API \
         (`UnbufferedServerConnection`: in-place decryption, encryption into the caller's \
         buffer) would replace it if it came within 10% on CPU per GB and KiB per idle \
         connection. Measured in this process: the state a connection keeps past an mTLS \
         handshake ({} connections, glibc's in-use bytes plus inline size), and 32 MiB sealed \
         (from record slots) and opened in place, TLS 1.3 AES-128-GCM, best of 3 trials on \
         CPU {} (rustls with its faster provider here, {}).\n\n\
         | | gateway's layer | rustls unbuffered | rustls / gateway |\n|---|---|---|---|\n\
         | state per connection (bytes) | {:.0} | {:.0} | {:.2} |\n\
         | seal CPU-s/GB | {:.3} | {:.3} | {:.2} |\n\
         | open CPU-s/GB | {:.3} | {:.3} | {:.2} |\n\
         | seal + open CPU-s/GB | {:.3} | {:.3} | {:.2} |",
        200,
        rl.cpu,
        rl.rustls_library,
        rl.ours_bytes,
        rl.rustls_bytes,
        rl.rustls_bytes / rl.ours_bytes,
        rl.ours_seal_cpu_s_per_gb,
        rl.rustls_seal_cpu_s_per_gb,
        rl.rustls_seal_cpu_s_per_gb / rl.ours_seal_cpu_s_per_gb,
        rl.ours_open_cpu_s_per_gb,
        rl.rustls_open_cpu_s_per_gb,
        rl.rustls_open_cpu_s_per_gb / rl.ours_open_cpu_s_per_gb,
        ours_cpu,
        theirs_cpu,
        theirs_cpu / ours_cpu,
    );
    let memory = gateway.and_then(|g| g.memory.as_ref());
    if let Some(m) = memory {
        let projected = rl.projected_kib(m.kib_per_connection);
        let ratio = projected / m.kib_per_connection;
        let _ = writeln!(
            s,
            "\nWith rustls' state in place of the layer's, the gateway's {:.1} KiB per idle \
             connection (measured above) would be **{projected:.1} KiB** ({ratio:.2}×). Within \
             10%: {}. {}",
            m.kib_per_connection,
            if ratio <= 1.10 && theirs_cpu <= ours_cpu * 1.10 {
                "yes"
            } else {
                "**no**"
            },
            if ratio <= 1.10 && theirs_cpu <= ours_cpu * 1.10 {
                "rustls' unbuffered API should carry the userspace path."
            } else {
                "The gateway keeps its layer, with rustls as its oracle (`fuzz/`: records_vs_rustls)."
            }
        );
    }
}

fn markdown_text(r: &Report, plots: &[String]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Written by `cargo xtask bench{}` on {}. Every number below comes from this one run; \
         the peers ran on the same machine, with the same PKI, backend and load.\n",
        if r.mode == "quick" { " --quick" } else { "" },
        r.date
    );
    let _ = writeln!(
        s,
        "- Machine: {}, {} cores, {:.0} GiB, Linux {}\n\
         - Proxy pinned to CPU {:?}; load generator and backend pinned to CPU {:?} (sched_setaffinity).\n\
         - TLS 1.3, TLS_AES_128_GCM_SHA256, P-256, full handshakes (no resumption); the client sends leaf + \
         intermediate and every proxy verifies it against the root. Access logs off everywhere.\n\
         - CPU is the proxy's own (all its processes and threads, from /proc), per 10^9 bytes forwarded.\n\
         - Bottleneck: `proxy` when the proxy used ≥ 90% of its CPU, else `load` (the load core or the pacing set the rate).",
        r.machine.cpu,
        r.machine.cores,
        r.machine.memory_gib,
        r.machine.kernel,
        r.proxy_cpus,
        r.load_cpus
    );
    if !r.steal.is_empty() {
        let shares: Vec<String> = r
            .steal
            .iter()
            .map(|c| format!("CPU {} {:.1}%", c.cpu, c.percent))
            .collect();
        let _ = writeln!(
            s,
            "- Hypervisor steal over the run (time the host ran something else while these CPUs had work): {}. \
             It slows whichever scenario it falls on, so a few percent make single numbers unreliable.",
            shares.join(", ")
        );
    }
    let _ = writeln!(s, "\n| peer | version |\n|---|---|");
    for p in &r.peers {
        let _ = writeln!(s, "| {} | {} |", p.name, p.version);
    }

    tuning_section(&mut s, r);
    let _ = writeln!(
        s,
        "\n## CPU-seconds per GB at a paced {} Gbit/s\n\n\
         Each peer with two TLS clients, one right after the other: rustls in the load generator, \
         and OpenSSL (stunnel in client mode, pinned to the load's CPU like the rustls client) \
         in front of it. Both offer only TLS 1.3, TLS_AES_128_GCM_SHA256 and P-256, send the \
         same client chain, and never resume.\n\n\
         | peer | client | {} |\n|---|---|{}",
        r.paced_gbps,
        SCENARIOS.map(|x| x.2).join(" | "),
        "---|".repeat(SCENARIOS.len())
    );
    for p in &r.peers {
        for ClientRow { client, bulk, .. } in p.clients() {
            let cells: Vec<String> = bulk
                .iter()
                .map(|b| match b {
                    Some(b) => format!("{:.2} ({:.2} Gbit/s)", b.proxy_cpu_s_per_gb, b.gbps),
                    None => "–".into(),
                })
                .collect();
            let _ = writeln!(s, "| {} | {client} | {} |", p.name, cells.join(" | "));
        }
    }
    let waited = r
        .peers
        .iter()
        .flat_map(|p| p.bulk.iter().chain(&p.openssl_bulk))
        .map(|b| b.proxy_waiting)
        .fold(0.0f64, f64::max);
    if waited > SHARED {
        let _ = writeln!(
            s,
            "\n**This machine was shared during the run:** a proxy's threads, added up, waited for \
             a CPU for up to {:.0}% of a measurement's length (table below). The proxies then woke less often to \
             bigger batches, and their CPU per GB reads lower than on a machine of their own.",
            waited * 100.0
        );
    }
    clients_section(&mut s, r);

    let saturated = r
        .peers
        .iter()
        .any(|p| p.bulk.iter().any(|b| b.offered_gbps.is_none()));
    if saturated {
        let _ = writeln!(
            s,
            "\n## Saturation (unpaced)\n\n| peer | scenario | Gbit/s | CPU-s/GB | proxy CPU load | bottleneck |\n|---|---|---|---|---|---|"
        );
        for p in &r.peers {
            for &(c, d, name) in &SCENARIOS {
                if let Some(b) = p.bulk(c, d, false) {
                    let _ = writeln!(
                        s,
                        "| {} | {name} | {:.2} | {:.2} | {:.2} | {:?} |",
                        p.name, b.gbps, b.proxy_cpu_s_per_gb, b.proxy_cpu_load, b.bottleneck
                    );
                }
            }
        }
    }

    let any_handshakes = r
        .peers
        .iter()
        .any(|p| p.handshakes.is_some() || p.openssl_handshakes.is_some());
    let any_latency = r.peers.iter().any(|p| !p.latency.is_empty());
    if any_handshakes {
        let _ = writeln!(
            s,
            "\n## Full mTLS handshakes\n\nEach: TCP connect, full handshake, one 16-byte request forwarded and echoed, close. \
         Only connections the backend saw count.\n\n\
         | peer | client | handshakes/s | proxy CPU ms each | proxy CPU load | bottleneck | failed |\n|---|---|---|---|---|---|---|"
        );
        for p in &r.peers {
            for ClientRow {
                client, handshakes, ..
            } in p.clients()
            {
                let Some(h) = handshakes else { continue };
                let _ = writeln!(
                    s,
                    "| {} | {client} | {:.0} | {:.2} | {:.2} | {:?} | {} |",
                    p.name,
                    h.per_second,
                    h.proxy_cpu_ms_each,
                    h.proxy_cpu_load,
                    h.bottleneck,
                    h.failed
                );
            }
        }
    }
    if any_latency {
        let _ = writeln!(
            s,
            "\n## Request/response latency\n\n1 KiB each way over persistent connections, open loop: a request delayed by \
         a late response counts from when it was due (no coordinated omission). Peak: the same connections in a closed loop.\n\n\
         Peers compare at the common rates (fixed, and half the slowest peer's peak), each measured in {} \
         round(s) that take the peers in turn; the round with the median p99 is shown. At half its own peak \
         (measured once) a faster proxy is offered more than the single load core generates without queueing of its own.\n\n\
         | peer | peak req/s | rate basis | offered req/s | achieved | p50 ms | p99 ms | p99.9 ms | max ms |\n|---|---|---|---|---|---|---|---|---|",
            r.latency_rounds
        );
        for p in &r.peers {
            for l in &p.latency {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {:.0} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} |",
                    p.name,
                    f(p.peak_requests_per_second, 0),
                    l.basis.describe(),
                    l.rate,
                    l.achieved,
                    l.p50_ms,
                    l.p99_ms,
                    l.p999_ms,
                    l.max_ms
                );
            }
        }
    }
    let _ = writeln!(
        s,
        "\n## Memory per idle connection\n\nRSS growth of the proxy (all its processes) with N established mTLS \
         connections, each having forwarded one request.\n\n\
         | peer | connections | RSS before MiB | RSS after MiB | KiB per connection |\n|---|---|---|---|---|"
    );
    for p in &r.peers {
        if let Some(m) = &p.memory {
            let _ = writeln!(
                s,
                "| {} | {} | {:.1} | {:.1} | {:.1} |",
                p.name, m.connections, m.rss_before_mib, m.rss_after_mib, m.kib_per_connection
            );
        }
    }

    for p in &r.peers {
        let Some(sc) = &p.scaling else { continue };
        let (name, n, base) = (&p.name, sc.cores, sc.baseline_cores);
        if sc.dedicated {
            let _ = writeln!(
                s,
                "\n## {name} on {n} cores\n\n\
                 The gateway with one worker per core on {n} cores of its own (the load on none of \
                 them) against the gateway with {base} worker(s) on {base} core(s), in the same run: \
                 the speed-up is **measured**, the median over the rounds of the handshake rate on \
                 {n} cores ÷ on {base}. A load generator that runs out of CPU first (`bottleneck`) \
                 makes it err low. The CPU projection is given beside it.\n\n\
                 | scenario | {base} core(s): rate | {n} cores: rate | measured speed-up | rounds | projected speed-up | bottleneck on {n} |\n|---|---|---|---|---|---|---|"
            );
            let _ = writeln!(
                s,
                "| full handshakes (handshakes/s) | {:.0} | {:.0} | {} | {} | {} | {:?} |",
                sc.baseline_handshakes.per_second,
                sc.handshakes.per_second,
                f(sc.handshake_rate_speedup, 2),
                list(&sc.handshake_rate_rounds),
                f(sc.handshake_speedup, 2),
                sc.handshakes.bottleneck,
            );
            continue;
        }
        let _ = writeln!(
            s,
            "\n## {name} on {n} cores\n\n\
             This host has no cores beyond the proxy's and the load's, so the two-core speed-up is \
             projected, not measured (a host with a spare core per proxy core measures it). The measured \
             handshake rate ratio, {} (rounds: {}), is capped by the load's share of the cores. \
             The gateway with one worker per core on the proxy's and the load's CPUs together. \
             The load generator needs one of those cores, so the rates below are not the gateway's \
             ceiling; its CPU cost per unit of work against the {base}-core gateway projects the \
             speed-up on dedicated cores ({n}/{base} × {base}-core cost ÷ {n}-core cost). Each round \
             measures the {base}-core and then the {n}-core gateway back to back, and the projection \
             is the median of the rounds' ratios, so the host's drift between rounds cancels; every \
             other round measures the {n}-core gateway first, so a drift within a round does too. Sharing \
             a core with the load, and being offered less than it could take, only raise the \
             {n}-core cost, so the projection errs low.\n\n\
             | scenario | {base} core(s): CPU per unit | {n} cores: CPU per unit | {n} cores: rate | projected speed-up | rounds' projections |\n|---|---|---|---|---|---|",
            f(sc.handshake_rate_speedup, 2),
            list(&sc.handshake_rate_rounds),
        );
        let _ = writeln!(
            s,
            "| full handshakes (CPU ms each; handshakes/s) | {:.2} | {:.2} | {:.0} | {} | {} |",
            sc.baseline_handshakes.proxy_cpu_ms_each,
            sc.handshakes.proxy_cpu_ms_each,
            sc.handshakes.per_second,
            f(sc.handshake_speedup, 2),
            list(&sc.handshake_rounds)
        );
        let _ = writeln!(
            s,
            "| {} conn {:?} at {} Gbit/s (CPU-s/GB; Gbit/s) | {:.2} | {:.2} | {:.2} | {} | {} |",
            sc.bulk.connections,
            sc.bulk.direction,
            f(sc.bulk.offered_gbps, 1),
            sc.baseline_bulk.proxy_cpu_s_per_gb,
            sc.bulk.proxy_cpu_s_per_gb,
            sc.bulk.gbps,
            f(sc.bulk_speedup, 2),
            list(&sc.bulk_rounds)
        );
    }

    if let (Some(user), Some(kernel)) = (
        r.peers.iter().find(|p| p.name == "gateway"),
        r.peers.iter().find(|p| p.name == "gateway-ktls"),
    ) {
        let _ = writeln!(
            s,
            "\n## Kernel TLS + splice against the userspace path\n\n\
             The same gateway, `offload = \"kernel\"` against `\"userspace\"` (target: kTLS ≤ 0.5 × \
             userspace CPU per GB, ≤ 6 KiB per idle connection).\n\n\
             | scenario | userspace CPU-s/GB | kTLS CPU-s/GB | kTLS / userspace |\n|---|---|---|---|"
        );
        for paced in [true, false] {
            for &(c, d, name) in &SCENARIOS {
                if let (Some(u), Some(k)) = (user.bulk(c, d, paced), kernel.bulk(c, d, paced)) {
                    let _ = writeln!(
                        s,
                        "| {name} {} | {:.2} | {:.2} | {:.2} |",
                        if paced { "(paced)" } else { "(unpaced)" },
                        u.proxy_cpu_s_per_gb,
                        k.proxy_cpu_s_per_gb,
                        k.proxy_cpu_s_per_gb / u.proxy_cpu_s_per_gb
                    );
                }
            }
        }
        if let (Some(u), Some(k)) = (&user.memory, &kernel.memory) {
            let _ = writeln!(
                s,
                "| KiB per idle connection | {:.1} | {:.1} | {:.2} |",
                u.kib_per_connection,
                k.kib_per_connection,
                k.kib_per_connection / u.kib_per_connection
            );
        }
    }

    // The targets are for the host run; under emulation they mean nothing.
    let emulated = r.peers.iter().any(|p| p.name == "gateway-ktls");
    let floors = if emulated { Vec::new() } else { ktls_floors(r) };
    if let (false, Some(aead)) = (floors.is_empty(), &r.aead) {
        let _ = writeln!(
            s,
            "\n## Kernel TLS on this host: the least it could cost\n\n\
             Kernel TLS + splice moves bytes the way the splice relay does, and adds one AES-GCM pass \
             per byte in the kernel: opening on upload, sealing on download. So the relay's cost plus \
             raw AES-128-GCM, both measured in this run, is the least the kTLS path can cost on this \
             host, whatever its kernel. Raw AES-GCM is the fastest library's here (sealing: {}, \
             opening: {}; 16 KiB records, best of 7 trials on CPU {}), the floor most favourable \
             to the target. The target (kTLS ≤ ½ × the userspace path's CPU per GB) is within reach \
             only where that floor is below it; the kTLS path itself runs in the VM section.\n\n\
             | scenario (paced) | relay | + AES-128-GCM | kTLS floor | ½ × gateway userspace | reachable |\n|---|---|---|---|---|---|",
            aead.seal_library, aead.open_library, aead.cpu
        );
        for fl in &floors {
            let _ = writeln!(
                s,
                "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
                fl.scenario,
                fl.relay,
                fl.aead,
                fl.floor(),
                fl.bar(),
                if fl.reachable() { "yes" } else { "**no**" }
            );
        }
    }
    if let Some(rl) = &r.record_layer {
        record_layer_section(&mut s, rl, r.peers.iter().find(|p| p.name == "gateway"));
    }
    if let Some(g) = r.peers.iter().find(|p| p.name == "gateway" && !emulated) {
        let _ = writeln!(
            s,
            "\n## The gateway against its targets\n\n| target | measured | met |\n|---|---|---|"
        );
        let worst_paced = SCENARIOS
            .iter()
            .filter_map(|&(c, d, _)| g.bulk(c, d, true).map(|b| b.proxy_cpu_s_per_gb))
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
        let row = |s: &mut String,
                   what: &str,
                   v: Option<f64>,
                   digits: usize,
                   ok: &dyn Fn(f64) -> bool| {
            let met = v.map_or("–", |v| if ok(v) { "yes" } else { "**no**" });
            let _ = writeln!(s, "| {what} | {} | {met} |", f(v, digits));
        };
        row(
            &mut s,
            "≤ 1.0 CPU-s/GB at the paced rate (worst scenario)",
            worst_paced,
            2,
            &|v| v <= 1.0,
        );
        let hs = g.handshakes.as_ref().map(|h| h.per_second);
        row(
            &mut s,
            "≥ 1,700 full handshakes/s on one core",
            hs,
            0,
            &|v| v >= 1700.0,
        );
        let mem = g.memory.as_ref().map(|m| m.kib_per_connection);
        row(&mut s, "≤ 14 KiB per idle connection", mem, 1, &|v| {
            v <= 14.0
        });
        if let Some(sc) = &g.scaling {
            row(
                &mut s,
                &format!(
                    "≥ 1.8× on {} cores what {} does ({})",
                    sc.cores,
                    sc.baseline_cores,
                    if sc.dedicated {
                        "measured: handshakes/s"
                    } else {
                        "projected, lower of handshakes and bulk"
                    }
                ),
                sc.speedup(),
                2,
                &|v| v >= 1.8,
            );
        }
        if !floors.is_empty() {
            let unreachable = floors.iter().filter(|f| !f.reachable()).count();
            let _ = writeln!(
                s,
                "| kTLS + splice ≤ ½ × userspace CPU per GB (no kTLS here: its floor against the bar, above) | \
                 floor above the bar in {unreachable} of {} scenarios | {} |",
                floors.len(),
                if unreachable == 0 {
                    "– (needs kTLS)"
                } else {
                    "**unreachable on this host**"
                }
            );
        }
        let p99 = |p: &PeerReport| {
            p.latency
                .iter()
                .find(|l| l.basis == RateBasis::HalfSlowestPeak)
                .map(|l| l.p99_ms)
        };
        let best_peer = r
            .peers
            .iter()
            .filter(|p| p.name != "gateway" && p.name != "relay")
            .filter_map(p99)
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.min(v))));
        let ours = p99(g);
        let met = match (ours, best_peer) {
            (Some(o), Some(b)) if o <= b => "yes",
            (Some(_), Some(_)) => "**no**",
            _ => "–",
        };
        let _ = writeln!(
            s,
            "| p99 at half the slowest peer's peak no worse than the best peer ({} ms) | {} ms | {met} |",
            f(best_peer, 3),
            f(ours, 3)
        );
    }

    if let Some(a) = &r.abuse {
        crate::abuse::section(&mut s, a);
    }

    let errors: Vec<String> = r
        .peers
        .iter()
        .flat_map(|p| p.errors.iter().map(move |e| format!("- {}: {e}", p.name)))
        .chain(
            r.abuse
                .iter()
                .flat_map(|a| a.errors.iter().map(|e| format!("- {e}"))),
        )
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(s, "\n## Failed scenarios\n\n{}", errors.join("\n"));
    }
    if !plots.is_empty() {
        let _ = writeln!(s, "\n## Plots\n");
        for p in plots {
            let _ = writeln!(s, "![{p}]({p})");
        }
    }
    s
}

/// Each peer's throughput knobs as its documentation describes them, and
/// its config as used, so a reader can judge whether the comparison is fair.
fn tuning_section(s: &mut String, r: &Report) {
    if r.peers
        .iter()
        .all(|p| p.tuning.is_empty() && p.config.is_none())
    {
        return;
    }
    let _ = writeln!(
        s,
        "\n## How each peer is set up\n\n\
         Every peer does the same job (above) and gets the throughput tuning its own documentation \
         recommends: HAProxy 2.6's configuration manual (Debian's haproxy-doc), nginx's module \
         reference (nginx.org; Debian's nginx-doc ships only examples), stunnel(8) from stunnel4. \
         Each knob they document for throughput is either set in the config (**set**) or left at \
         its default, and why. The configs as used follow the table.\n\n\
         | peer | setting | | why (its documentation) |\n|---|---|---|---|"
    );
    for p in &r.peers {
        for t in &p.tuning {
            let _ = writeln!(
                s,
                "| {} | `{}` | {} | {} |",
                p.name,
                t.line,
                if t.applied { "**set**" } else { "default" },
                t.why
            );
        }
    }
    for p in r.peers.iter().filter(|p| p.config.is_some()) {
        let _ = writeln!(
            s,
            "\n<details><summary>{}: config as used</summary>\n\n```\n{}\n```\n</details>",
            p.name,
            p.config.as_deref().unwrap_or_default().trim_end()
        );
    }
}

/// The two clients against each other, peer by peer, and why they differ.
fn clients_section(s: &mut String, r: &Report) {
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let rows: Vec<(&str, [f64; 6])> = r
        .peers
        .iter()
        .filter_map(|p| {
            // Scenarios both clients ran: (rustls, OpenSSL).
            let pairs: Vec<(&BulkResult, &BulkResult)> = SCENARIOS
                .iter()
                .filter_map(|&(c, d, _)| Some((p.bulk(c, d, true)?, p.openssl_bulk(c, d)?)))
                .collect();
            if pairs.is_empty() {
                return None;
            }
            let of = |pick: fn(&(&BulkResult, &BulkResult)) -> f64| {
                mean(&pairs.iter().map(pick).collect::<Vec<_>>())
            };
            Some((
                p.name.as_str(),
                [
                    of(|p| p.0.proxy_cpu_s_per_gb),
                    of(|p| p.1.proxy_cpu_s_per_gb),
                    of(|p| p.0.proxy_kib_per_wakeup),
                    of(|p| p.1.proxy_kib_per_wakeup),
                    of(|p| p.0.proxy_waiting),
                    of(|p| p.1.proxy_waiting),
                ],
            ))
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\n### The two clients\n\n\
         Means over the paced scenarios above. KiB per wakeup: bytes forwarded per time the \
         proxy slept and woke again (its threads' voluntary context switches), so how much each \
         pass through its event loop carried. Waiting: the share of the time the proxy's threads \
         were ready to run but another task held its CPU (schedstat's run delay); on a machine of \
         its own it stays near 0.\n\n\
         | peer | CPU-s/GB: rustls | CPU-s/GB: OpenSSL | OpenSSL / rustls | KiB per wakeup: rustls / OpenSSL | waiting: rustls / OpenSSL |\n|---|---|---|---|---|---|"
    );
    for (
        name,
        [
            rustls,
            openssl,
            rustls_kib,
            openssl_kib,
            rustls_wait,
            openssl_wait,
        ],
    ) in rows
    {
        let _ = writeln!(
            s,
            "| {name} | {rustls:.2} | {openssl:.2} | {:.2} | {rustls_kib:.0} / {openssl_kib:.0} | {:.0}% / {:.0}% |",
            openssl / rustls,
            rustls_wait * 100.0,
            openssl_wait * 100.0
        );
    }
    let _ = writeln!(s, "\n{CLIENTS_EXPLAINED}");
}

/// A proxy that waited, ready, for its CPU longer than this share of a
/// measurement shared it with other work.
const SHARED: f64 = 0.05;

/// What makes the clients' figures differ, and an independent harness's
/// from these (issue #19), as measured when the OpenSSL client came in.
const CLIENTS_EXPLAINED: &str = "Why figures differ between the clients, and from an \
independent harness's. That harness (on this machine; OpenSSL clients: stunnel as the load \
client, `openssl s_time`; peers with Debian's defaults) measured HAProxy, nginx and stunnel at \
1.03–1.22 CPU-s/GB at a paced 3 Gbit/s where this report's run of 2026-11-23 had 1.20–2.29, and \
the gateway about the same (0.83–0.88 against 0.69–0.84). Measured on 2026-11-30 on this \
2-core machine while other builds ran on both cores:\n\n\
- **Not the records.** Both clients write full TLS records: nginx's reads show 16,401-byte \
records (16 KiB of data, the type byte and the tag) from either, each read in the same two \
read() calls (OpenSSL's read-ahead: 16,709 then 16,103 bytes), about 63 reads per MB with \
either. The rustls client hands its socket 64 KiB (four records) per writev, stunnel one record \
per write: that woke nginx about four times as often per MB (epoll_wait) without changing its \
reads or writes per MB.\n\
- **Not the load's burst size.** With the load generator writing 16, 64 or 256 KiB at a time \
at the same rate, no peer's upload cost moved beyond run-to-run noise.\n\
- **Not the tuning.** What the peers' documentation recommends for throughput is their \
default (table above) but the thread or worker count, which already matched the CPU they get.\n\
- **Not the client.** Measured back to back, the OpenSSL client cost the peers between 2% less \
and 30% more CPU per GB than the rustls one, and their handshakes 4–16% more CPU each. (With \
it, the handshake rate is the client's: one stunnel on the load core makes 90–400 a second.)\n\
- **The machine's load.** What moved every peer was contention for the proxy's CPU. With \
other builds on both cores, nginx's worker waited, ready to run, 70% of the time, slept some \
25 times a second and carried megabytes per wakeup. The peers then read 0.85–1.37 CPU-s/GB \
with the rustls client (scenario by scenario, over six runs), about the harness's range, and \
the gateway 0.45–0.79: the peers' means fell by 30–45% against the idle run, the gateway's by \
20–35%, which narrows the gap as the harness saw it. Batching saves a peer more because it pays \
more per pass through its event loop (a poll, reads per record, a TLS write per 16 KiB buffer). \
That is the likeliest reading of the harness's figures; its machine's load was not recorded.\n\n\
So compare peers only in a run whose `waiting` column stays near 0%: its figures are this \
machine's, not a shared one's.";

/// The least kernel TLS + splice could cost in one paced scenario, against
/// the target's bar.
#[derive(Debug, Clone, PartialEq)]
struct KtlsFloor {
    scenario: &'static str,
    relay: f64,
    aead: f64,
    userspace: f64,
}

impl KtlsFloor {
    fn floor(&self) -> f64 {
        self.relay + self.aead
    }

    fn bar(&self) -> f64 {
        0.5 * self.userspace
    }

    fn reachable(&self) -> bool {
        self.floor() <= self.bar()
    }
}

/// One floor per paced scenario that the relay and the gateway both ran.
fn ktls_floors(r: &Report) -> Vec<KtlsFloor> {
    let (Some(aead), Some(relay), Some(gateway)) = (
        &r.aead,
        r.peers.iter().find(|p| p.name == "relay"),
        r.peers.iter().find(|p| p.name == "gateway"),
    ) else {
        return Vec::new();
    };
    SCENARIOS
        .iter()
        .filter_map(|&(c, d, scenario)| {
            Some(KtlsFloor {
                scenario,
                relay: relay.bulk(c, d, true)?.proxy_cpu_s_per_gb,
                aead: match d {
                    Direction::Upload => aead.open_cpu_s_per_gb,
                    Direction::Download => aead.seal_cpu_s_per_gb,
                },
                userspace: gateway.bulk(c, d, true)?.proxy_cpu_s_per_gb,
            })
        })
        .collect()
}

fn plots(r: &Report, dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    register_font()?;
    let mut out = Vec::new();
    let names: Vec<String> = r.peers.iter().map(|p| p.name.clone()).collect();

    let groups: Vec<String> = SCENARIOS.iter().map(|s| s.2.to_owned()).collect();
    let series: Vec<(String, Vec<Option<f64>>)> = r
        .peers
        .iter()
        .map(|p| {
            let v = SCENARIOS
                .iter()
                .map(|&(c, d, _)| p.bulk(c, d, true).map(|b| b.proxy_cpu_s_per_gb))
                .collect();
            (p.name.clone(), v)
        })
        .collect();
    let path = dir.join("cpu-per-gb.png");
    bars(
        &path,
        &format!(
            "Proxy CPU-seconds per GB at {} Gbit/s (lower is better)",
            r.paced_gbps
        ),
        &groups,
        &series,
    )?;
    out.push(path);

    let tls: Vec<&PeerReport> = r.peers.iter().filter(|p| p.handshakes.is_some()).collect();
    let path = dir.join("handshakes.png");
    bars(
        &path,
        "Full mTLS handshakes per second (higher is better)",
        &["handshakes/s".to_owned()],
        &tls.iter()
            .map(|p| {
                (
                    p.name.clone(),
                    vec![p.handshakes.as_ref().map(|h| h.per_second)],
                )
            })
            .collect::<Vec<_>>(),
    )?;
    out.push(path);

    let path = dir.join("latency.png");
    bars(
        &path,
        "Latency at half the slowest peer's peak (same rate for all), ms (lower is better)",
        &["p50".to_owned(), "p99".to_owned(), "p99.9".to_owned()],
        &r.peers
            .iter()
            .filter_map(|p| {
                let l = p
                    .latency
                    .iter()
                    .find(|l| l.basis == RateBasis::HalfSlowestPeak)?;
                Some((
                    p.name.clone(),
                    vec![Some(l.p50_ms), Some(l.p99_ms), Some(l.p999_ms)],
                ))
            })
            .collect::<Vec<_>>(),
    )?;
    out.push(path);

    let path = dir.join("memory.png");
    bars(
        &path,
        "KiB per idle mTLS connection (lower is better)",
        &["KiB per connection".to_owned()],
        &r.peers
            .iter()
            .filter(|p| p.memory.is_some())
            .map(|p| {
                (
                    p.name.clone(),
                    vec![p.memory.as_ref().map(|m| m.kib_per_connection)],
                )
            })
            .collect::<Vec<_>>(),
    )?;
    out.push(path);
    if let Some(a) = &r.abuse
        && !a.runs.is_empty()
    {
        let path = dir.join("abuse.png");
        bars(
            &path,
            "Allowed clients under attack: connect + handshake + echo, ms (target p99 ≤ 250)",
            &["p50".to_owned(), "p99".to_owned()],
            &a.runs
                .iter()
                .map(|run| {
                    (
                        format!(
                            "{}, {} ({:.1}% served)",
                            run.peer,
                            run.attack.name(),
                            run.success_percent
                        ),
                        vec![Some(run.p50_ms), Some(run.p99_ms)],
                    )
                })
                .collect::<Vec<_>>(),
        )?;
        out.push(path);
    }
    let _ = names;
    Ok(out)
}

/// plotters draws text with ab_glyph, which needs a font registered by hand.
fn register_font() -> anyhow::Result<()> {
    const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
    let bytes =
        std::fs::read(FONT).with_context(|| format!("reading {FONT} (fonts-dejavu-core)"))?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{FONT} is not a font ab_glyph can read"))?;
    Ok(())
}

/// Grouped bars: one group per x label, one coloured bar per series in each.
fn bars(
    path: &Path,
    title: &str,
    groups: &[String],
    series: &[(String, Vec<Option<f64>>)],
) -> anyhow::Result<()> {
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten().copied())
        .fold(0.0f64, f64::max);
    // Headroom for the legend above the tallest bar.
    let top = if max > 0.0 { max * 1.4 } else { 1.0 };
    let root = BitMapBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let n = groups.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5..(n - 0.5), 0.0..top)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len())
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                groups.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let width = 0.8 / series.len().max(1) as f64;
    for (si, (name, values)) in series.iter().enumerate() {
        let color = Palette99::pick(si).to_rgba();
        let rects: Vec<Rectangle<(f64, f64)>> = values
            .iter()
            .enumerate()
            .filter_map(|(gi, v)| {
                let x0 = gi as f64 - 0.4 + si as f64 * width;
                v.map(|v| Rectangle::new([(x0, 0.0), (x0 + width * 0.92, v)], color.filled()))
            })
            .collect();
        chart
            .draw_series(rects)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::Bottleneck;

    /// A quick run's report of `peers` on CPU 0 (proxy) and 1 (load).
    fn quick_report(peers: Vec<PeerReport>) -> Report {
        Report {
            date: String::new(),
            mode: "quick",
            machine: Machine::detect(),
            proxy_cpus: vec![0],
            load_cpus: vec![1],
            paced_gbps: 3.0,
            latency_rounds: 1,
            aead: None,
            record_layer: None,
            abuse: None,
            steal: Vec::new(),
            peers,
        }
    }

    fn handshakes(cpu_ms: f64) -> HandshakeResult {
        HandshakeResult {
            parallel: 128,
            per_second: 1000.0,
            proxy_cpu_ms_each: cpu_ms,
            proxy_cpu_load: 1.0,
            failed: 0,
            bottleneck: Bottleneck::Proxy,
        }
    }

    fn bulk(cpu_s_per_gb: f64) -> BulkResult {
        BulkResult {
            connections: 16,
            direction: Direction::Download,
            offered_gbps: Some(3.0),
            gbps: 3.0,
            proxy_cpu_s_per_gb: cpu_s_per_gb,
            proxy_cpu_load: 0.4,
            bottleneck: Bottleneck::Load,
            proxy_kib_per_wakeup: 64.0,
            proxy_waiting: 0.01,
        }
    }

    #[test]
    fn both_clients_show_side_by_side_with_each_peers_tuning_and_a_shared_machine_is_flagged() {
        let paced = |conns, direction, cost, waiting| BulkResult {
            connections: conns,
            direction,
            proxy_waiting: waiting,
            ..bulk(cost)
        };
        let runs = |base: f64, waiting| {
            SCENARIOS
                .iter()
                .map(|&(c, d, _)| paced(c, d, base, waiting))
                .collect::<Vec<_>>()
        };
        let haproxy = PeerReport {
            name: "haproxy".into(),
            bulk: runs(1.0, 0.0),
            openssl_bulk: runs(1.2, 0.0),
            handshakes: Some(handshakes(1.4)),
            openssl_handshakes: Some(handshakes(1.5)),
            tuning: crate::peers::tuning(crate::peers::Kind::Haproxy, 1),
            config: Some("global\n    nbthread 1".into()),
            ..PeerReport::default()
        };
        let relay = PeerReport {
            name: "relay".into(),
            bulk: runs(0.3, 0.0),
            ..PeerReport::default()
        };
        let mut report = quick_report(vec![haproxy, relay]);
        let md = markdown_text(&report, &[]);
        assert!(md.contains("## How each peer is set up"), "{md}");
        assert!(md.contains("| haproxy | `nbthread 1` | **set** |"), "{md}");
        assert!(
            md.contains("| haproxy | `tune.bufsize 16384` | default |"),
            "{md}"
        );
        assert!(md.contains("<details><summary>haproxy: config as used</summary>"));
        let row =
            "| 1.00 (3.00 Gbit/s) | 1.00 (3.00 Gbit/s) | 1.00 (3.00 Gbit/s) | 1.00 (3.00 Gbit/s) |";
        assert!(md.contains(&format!("| haproxy | rustls {row}")), "{md}");
        assert!(
            md.contains("| haproxy | OpenSSL | 1.20 (3.00 Gbit/s) |"),
            "{md}"
        );
        assert!(
            md.contains("| relay | plain TCP | 0.30 (3.00 Gbit/s) |"),
            "{md}"
        );
        assert!(!md.contains("| relay | OpenSSL"), "{md}");
        assert!(
            md.contains("| haproxy | 1.00 | 1.20 | 1.20 | 64 / 64 | 0% / 0% |"),
            "{md}"
        );
        assert!(md.contains("| haproxy | rustls | 1000 | 1.40 |"), "{md}");
        assert!(md.contains("| haproxy | OpenSSL | 1000 | 1.50 |"), "{md}");
        assert!(md.contains("**Not the records.**"), "{md}");
        assert!(!md.contains("This machine was shared"), "{md}");

        // A proxy that waited for its CPU: the run says the machine was shared.
        report.peers[0].openssl_bulk[2].proxy_waiting = 0.7;
        let md = markdown_text(&report, &[]);
        assert!(
            md.contains("**This machine was shared during the run:**"),
            "{md}"
        );
        assert!(md.contains("for up to 70% of a measurement"), "{md}");
    }

    #[test]
    fn scaling_projects_from_paired_rounds_and_reports_the_weaker_scenario() {
        let round = |one_hs, many_hs, one_gb, many_gb| ScalingRound {
            baseline_handshakes: handshakes(one_hs),
            handshakes: handshakes(many_hs),
            baseline_bulk: bulk(one_gb),
            bulk: bulk(many_gb),
        };
        // The host drifts from round to round; within a round, handshakes
        // cost 20% more on two cores and bulk costs the same.
        let rounds = vec![
            round(0.8, 0.96, 1.2, 1.2),
            round(0.5, 0.6, 0.9, 0.9),
            round(0.6, 0.72, 1.0, 1.0),
        ];
        let s = ScalingResult::from_rounds(1, 2, false, rounds).unwrap();
        assert!((s.handshake_speedup.unwrap() - 2.0 / 1.2).abs() < 1e-9);
        assert_eq!(s.handshake_rounds.len(), 3);
        assert!(s.bulk_rounds.iter().all(|r| (r - 2.0).abs() < 1e-9));
        assert!((s.bulk_speedup.unwrap() - 2.0).abs() < 1e-9);
        assert_eq!(s.speedup(), s.handshake_speedup);
        // Costs reported are each side's median round.
        assert!((s.baseline_handshakes.proxy_cpu_ms_each - 0.6).abs() < 1e-9);
        assert!((s.handshakes.proxy_cpu_ms_each - 0.72).abs() < 1e-9);
        assert!((s.baseline_bulk.proxy_cpu_s_per_gb - 1.0).abs() < 1e-9);

        // Each round's pair makes one ratio (1.67, 2.4, 1.56): the median is
        // 1.67. The ratio of the medians of unpaired runs would say 2.0.
        let paired = vec![
            round(0.5, 0.6, 1.0, 1.0),
            round(0.6, 0.5, 1.0, 1.0),
            round(0.7, 0.9, 1.0, 1.0),
        ];
        let s = ScalingResult::from_rounds(1, 2, false, paired).unwrap();
        assert!((s.handshake_speedup.unwrap() - 2.0 * 0.5 / 0.6).abs() < 1e-9);

        assert!(ScalingResult::from_rounds(1, 2, false, Vec::new()).is_none());
    }

    #[test]
    fn on_dedicated_cores_the_speed_up_is_the_measured_rate_ratio() {
        let at = |rate: f64| HandshakeResult {
            per_second: rate,
            ..handshakes(0.5)
        };
        let round = |one: f64, many: f64| ScalingRound {
            baseline_handshakes: at(one),
            handshakes: at(many),
            baseline_bulk: bulk(1.0),
            bulk: bulk(1.0),
        };
        // Rates 1.9×, 1.5×, 2.0×: the median is 1.9; the CPU per handshake
        // is the same on both, so the projection would say 2.0.
        let rounds = || {
            vec![
                round(1000.0, 1900.0),
                round(1000.0, 1500.0),
                round(800.0, 1600.0),
            ]
        };
        let s = ScalingResult::from_rounds(1, 2, true, rounds()).unwrap();
        assert!((s.handshake_rate_speedup.unwrap() - 1.9).abs() < 1e-9);
        assert_eq!(s.speedup(), s.handshake_rate_speedup);
        let md = markdown_text(
            &quick_report(vec![PeerReport {
                name: "gateway".into(),
                scaling: Some(s),
                ..PeerReport::default()
            }]),
            &[],
        );
        assert!(md.contains("measured"), "{md}");
        assert!(md.contains("1.90"), "{md}");
        // Sharing a core with the load: the projection stays the figure.
        let s = ScalingResult::from_rounds(1, 2, false, rounds()).unwrap();
        assert!((s.speedup().unwrap() - 2.0).abs() < 1e-9);
    }

    #[test]
    fn the_ktls_floor_is_the_relay_plus_one_aead_pass_against_half_the_userspace_cost() {
        let paced = |conns, direction, cost| BulkResult {
            connections: conns,
            direction,
            ..bulk(cost)
        };
        let peer = |name: &str, costs: [f64; 4]| PeerReport {
            name: name.into(),
            bulk: SCENARIOS
                .iter()
                .zip(costs)
                .map(|(&(c, d, _), cost)| paced(c, d, cost))
                .collect(),
            ..PeerReport::default()
        };
        let mut report = Report {
            date: String::new(),
            mode: "full",
            machine: Machine::detect(),
            proxy_cpus: vec![0],
            load_cpus: vec![1],
            paced_gbps: 3.0,
            latency_rounds: 3,
            aead: Some(AeadCost {
                seal_cpu_s_per_gb: 0.1,
                seal_library: "ring",
                open_cpu_s_per_gb: 0.2,
                open_library: "aws-lc",
                cpu: 0,
            }),
            record_layer: None,
            abuse: None,
            steal: vec![CpuSteal {
                cpu: 0,
                percent: 0.31,
            }],
            peers: vec![
                peer("gateway", [1.0, 1.0, 1.0, 2.0]),
                peer("relay", [0.2, 0.2, 0.5, 0.5]),
            ],
        };
        let floors = ktls_floors(&report);
        let got: Vec<(f64, f64, bool)> = floors
            .iter()
            .map(|f| (f.floor(), f.bar(), f.reachable()))
            .collect();
        let want = [
            // Upload opens (0.2), download seals (0.1).
            (0.4, 0.5, true),
            (0.3, 0.5, true),
            (0.7, 0.5, false),
            (0.6, 1.0, true),
        ];
        for ((floor, bar, ok), (w_floor, w_bar, w_ok)) in got.iter().zip(want) {
            assert!((floor - w_floor).abs() < 1e-9 && (bar - w_bar).abs() < 1e-9);
            assert_eq!(*ok, w_ok);
        }
        let md = markdown_text(&report, &[]);
        assert!(md.contains("## Kernel TLS on this host: the least it could cost"));
        assert!(md.contains("these CPUs had work): CPU 0 0.3%."), "{md}");
        assert!(
            md.contains("| 16 conns upload | 0.50 | 0.20 | 0.70 | 0.50 | **no** |"),
            "{md}"
        );
        assert!(
            md.contains("floor above the bar in 1 of 4 scenarios | **unreachable on this host** |")
        );

        // The record layer's verdict: rustls' state would make the idle
        // connection 2 KiB (more than 10%) larger.
        report.peers[0].memory = Some(MemoryResult {
            connections: 1000,
            rss_before_mib: 10.0,
            rss_after_mib: 17.0,
            kib_per_connection: 7.0,
        });
        report.record_layer = Some(crate::record_layer::RecordLayerCost {
            ours_bytes: 1024.0,
            rustls_bytes: 3072.0,
            ours_seal_cpu_s_per_gb: 0.20,
            ours_open_cpu_s_per_gb: 0.20,
            rustls_seal_cpu_s_per_gb: 0.22,
            rustls_open_cpu_s_per_gb: 0.20,
            rustls_library: "aws-lc",
            cpu: 0,
        });
        let md = markdown_text(&report, &[]);
        assert!(
            md.contains("| state per connection (bytes) | 1024 | 3072 | 3.00 |"),
            "{md}"
        );
        assert!(
            md.contains("would be **9.0 KiB** (1.29×). Within 10%: **no**."),
            "{md}"
        );

        // Without the relay, or in the VM's report, there is no floor to show.
        report.peers.retain(|p| p.name != "relay");
        assert!(ktls_floors(&report).is_empty());
        assert!(!markdown_text(&report, &[]).contains("least it could cost"));
    }
}

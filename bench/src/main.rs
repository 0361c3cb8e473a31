//! `gateway-bench run`: the gateway measured beside HAProxy, nginx stream,
//! stunnel and a plain splice relay, on one machine in one run.
//! `gateway-bench relay`: the plain relay itself (started by `run`).
//!
//! `cargo xtask bench` builds everything in release mode, installs the peers
//! and runs this; see BENCHMARKS.md for the last full run.

mod abuse;
mod aead;
mod backend;
mod load;
mod openssl_client;
mod peers;
mod pki;
mod procstat;
mod record_layer;
mod relay;
mod report;
mod soak;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use rustls::pki_types::ServerName;

use crate::load::{Direction, Rig, Target, Window};
use crate::peers::{Binaries, Kind, Peer};
use crate::report::{Machine, PeerReport, Report, median_by};

#[derive(Parser)]
#[command(
    name = "gateway-bench",
    about = "Measure the gateway beside the proxies users would pick instead"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every scenario against every peer and write the report.
    Run(Box<RunArgs>),
    /// The gateway under checked streams, reloads, backend restarts and attacks.
    Soak(soak::Args),
    /// Plain TCP forwarding with splice (the ceiling); `run` starts it.
    Relay {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        to: SocketAddr,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// A short smoke run (seconds per peer) that proves the harness works.
    #[arg(long)]
    quick: bool,
    /// Working directory: the PKI, each peer's config and log.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Where results.json and the plots go (default: --out).
    #[arg(long)]
    results: Option<PathBuf>,
    /// The markdown report (default: BENCHMARKS.md in --results); plots are linked relative to it.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// The gateway binary (a release build).
    #[arg(long)]
    gateway: PathBuf,
    /// Which peers, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Kind::HOST)]
    peers: Vec<Kind>,
    /// CPUs the proxy under test may use.
    #[arg(long, value_delimiter = ',', default_values_t = [0usize])]
    proxy_cpus: Vec<usize>,
    /// CPUs for the load generator and the backend.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize])]
    load_cpus: Vec<usize>,
    /// Only these scenarios (for profiling one hot path), comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Scenario::ALL)]
    only: Vec<Scenario>,
    /// Idle connections for the memory scenario (default: 300 with --quick, else 10,000).
    #[arg(long)]
    idle_connections: Option<usize>,
    /// The common request rate every peer's latency is measured at (default: 1,000 with --quick, else 5,000).
    #[arg(long)]
    fixed_rate: Option<f64>,
    /// Rounds of bulk and handshake measurements, median reported (default: 1 with --quick, else 3, and 5 for the 2-core projection).
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds each measurement runs (default: 1 with --quick, else 5).
    #[arg(long)]
    seconds: Option<f64>,
    /// The paced offered load for the CPU-per-GB comparison.
    #[arg(long, default_value_t = 3.0)]
    paced_gbps: f64,
    /// TLS clients for the paced bulk and handshake scenarios,
    /// comma-separated: rustls in this process, OpenSSL through stunnel in
    /// client mode (the other scenarios use rustls).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Client::Rustls, Client::Openssl])]
    clients: Vec<Client>,
}

/// The TLS client a measurement drives the proxy with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Client {
    /// rustls (aws-lc-rs) in the load generator itself.
    Rustls,
    /// OpenSSL: stunnel in client mode in front of the plain load generator.
    Openssl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    Bulk,
    Handshakes,
    Latency,
    Memory,
    /// The gateway on twice the proxy's cores against the proxy's: on cores of its own where the host has them (measured), else with the load's (projected) (gateways only).
    Scaling,
    /// Allowed clients while others attack, beside HAProxy and nginx.
    Abuse,
}

impl Scenario {
    const ALL: [Scenario; 6] = [
        Scenario::Bulk,
        Scenario::Handshakes,
        Scenario::Latency,
        Scenario::Memory,
        Scenario::Scaling,
        Scenario::Abuse,
    ];
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Relay { listen, to } => relay::run(listen, to).map_err(anyhow::Error::from),
        Command::Run(args) => run(*args),
        Command::Soak(args) => soak::run(args),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway-bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// What a run measures; `--quick` shrinks every knob.
struct Plan {
    window: Window,
    bulk: Vec<(usize, Direction, bool)>,
    handshake_clients: usize,
    latency_connections: usize,
    fixed_rate: f64,
    idle_connections: usize,
    handshakes: bool,
    latency: bool,
    memory: bool,
    scaling: bool,
    abuse: Option<abuse::Plan>,
    /// Bulk and handshakes are measured this often; the median counts.
    rounds: usize,
    /// Pairs of one-core and many-core measurements for the projection.
    scaling_rounds: usize,
    /// Measure the paced bulk and the handshakes with the rustls client.
    rustls: bool,
    /// ... and with the OpenSSL client too.
    openssl: bool,
}

impl Plan {
    fn new(args: &RunArgs) -> Plan {
        let mut plan = Plan::defaults(args.quick);
        if let Some(n) = args.idle_connections {
            plan.idle_connections = n;
        }
        if let Some(r) = args.fixed_rate {
            plan.fixed_rate = r;
        }
        if let Some(r) = args.rounds {
            plan.rounds = r.max(1);
            plan.scaling_rounds = r.max(1);
        }
        if let Some(s) = args.seconds {
            plan.window.measure = Duration::from_secs_f64(s);
        }
        let has = |s| args.only.contains(&s);
        if !has(Scenario::Bulk) {
            plan.bulk.clear();
        }
        plan.handshakes = has(Scenario::Handshakes);
        plan.latency = has(Scenario::Latency);
        plan.memory = has(Scenario::Memory);
        plan.scaling = has(Scenario::Scaling);
        if !has(Scenario::Abuse) {
            plan.abuse = None;
        }
        plan.rustls = args.clients.contains(&Client::Rustls);
        plan.openssl = args.clients.contains(&Client::Openssl);
        plan
    }

    fn defaults(quick: bool) -> Plan {
        let mut bulk = Vec::new();
        for paced in if quick { vec![true] } else { vec![true, false] } {
            for conns in [1, 16] {
                for dir in [Direction::Upload, Direction::Download] {
                    bulk.push((conns, dir, paced));
                }
            }
        }
        if quick {
            Plan {
                window: Window {
                    warmup: Duration::from_millis(300),
                    measure: Duration::from_secs(1),
                },
                bulk,
                handshake_clients: 32,
                latency_connections: 16,
                fixed_rate: 1000.0,
                idle_connections: 300,
                rounds: 1,
                scaling_rounds: 1,
                handshakes: true,
                latency: true,
                memory: true,
                scaling: true,
                abuse: Some(abuse::Plan::new(true)),
                rustls: true,
                openssl: true,
            }
        } else {
            Plan {
                window: Window {
                    warmup: Duration::from_secs(1),
                    measure: Duration::from_secs(4),
                },
                bulk,
                handshake_clients: 128,
                latency_connections: 16,
                fixed_rate: 5000.0,
                idle_connections: IDLE_CONNECTIONS,
                rounds: 3,
                // Each round's projection divides two noisy costs: at 3
                // rounds it moved by ±0.1 between runs of the same code.
                scaling_rounds: 5,
                handshakes: true,
                latency: true,
                memory: true,
                scaling: true,
                abuse: Some(abuse::Plan::new(false)),
                rustls: true,
                openssl: true,
            }
        }
    }

    fn steps(&self, kind: Kind) -> u64 {
        let rounds = self.rounds as u64;
        let tls = if kind.tls() {
            rounds * u64::from(self.handshakes)
                + (2 + rounds) * u64::from(self.latency)
                + u64::from(self.memory)
        } else {
            0
        };
        let scaling = if kind.gateway() && self.scaling {
            self.scaling_rounds as u64 * 2
        } else {
            0
        };
        let abuse = match (&self.abuse, kind) {
            (Some(_), Kind::Gateway) => 3,
            (Some(_), Kind::Haproxy | Kind::Nginx) => 2,
            _ => 0,
        };
        // The OpenSSL client repeats the paced bulk and the handshakes.
        let paced = self.bulk.iter().filter(|b| b.2).count() as u64;
        let openssl = if kind.tls() && self.openssl {
            rounds * (paced + u64::from(self.handshakes))
        } else {
            0
        };
        rounds * self.bulk.len() as u64 + tls + scaling + abuse + openssl
    }
}

/// Idle connections for the memory scenario (fewer where the open-file limit says so).
const IDLE_CONNECTIONS: usize = 10_000;

fn run(args: RunArgs) -> anyhow::Result<()> {
    let nofile = procstat::raise_nofile(200_000)?;
    // Before pinning: the scaling scenario looks here for cores neither
    // the proxy nor the load has.
    let allowed_cpus = procstat::allowed_cpus().context("reading the CPU affinity")?;
    procstat::pin_to(&args.load_cpus).context("pinning the load generator")?;
    let bench = std::env::current_exe()?;
    let bins = Binaries {
        gateway: args
            .gateway
            .canonicalize()
            .with_context(|| format!("gateway binary {}", args.gateway.display()))?,
        bench,
    };
    let mut plan = Plan::new(&args);
    // The proxy holds two sockets per connection, and so does this process
    // (client and backend side): the open-file limit caps the idle count.
    let fits = (nofile.saturating_sub(500) / 2) as usize;
    if plan.idle_connections > fits {
        eprintln!(
            "gateway-bench: open-file limit {nofile} (no CAP_SYS_RESOURCE to raise it): {fits} idle connections instead of {}",
            plan.idle_connections
        );
        plan.idle_connections = fits;
    }
    std::fs::create_dir_all(&args.out)?;
    let out = args.out.canonicalize()?;
    let pki = pki::create(&out.join("pki"))?;
    let client = load::client_config(pki.client_chain.clone(), pki.client_key.clone_key())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    // Before any peer runs, so nothing shares the proxy's CPU.
    let aead = args.proxy_cpus.first().and_then(|&cpu| aead::measure(cpu));
    // On the main thread: its memory part reads glibc's main arena.
    let record_layer = match args.proxy_cpus.first() {
        Some(&cpu) => match record_layer::measure(cpu, &pki) {
            Ok(cost) => Some(cost),
            Err(e) => {
                eprintln!("gateway-bench: record layer comparison failed: {e:#}");
                None
            }
        },
        None => None,
    };
    let cpus: Vec<usize> = args
        .proxy_cpus
        .iter()
        .chain(&args.load_cpus)
        .copied()
        .collect();
    let times_before: Vec<_> = cpus.iter().map(|&c| procstat::CpuTimes::read(c)).collect();
    let total: u64 = args.peers.iter().map(|&k| plan.steps(k)).sum::<u64>();
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {prefix:>8} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let (reports, abuse) = runtime.block_on(async {
        let backend = backend::Backend::start().await?;
        let ctx = Ctx {
            bins: &bins,
            pki: &pki,
            backend: &backend,
            workdir: out.join("peers"),
            args: &args,
            plan: &plan,
            client: &client,
            bar: &bar,
            allowed_cpus: &allowed_cpus,
        };
        let reports = ctx.measure_all().await;
        // Last, on fresh peers set up with the attack's limits.
        let abuse = match &plan.abuse {
            Some(p) => {
                let ctx = abuse::Ctx {
                    bins: &bins,
                    pki: &pki,
                    backend: backend.addr,
                    workdir: out.join("peers"),
                    proxy_cpus: &args.proxy_cpus,
                    client: client.clone(),
                    plan: p.clone(),
                };
                Some(ctx.measure(&abuse::peers(&args.peers), &bar).await)
            }
            None => None,
        };
        anyhow::Ok((reports, abuse))
    })?;
    bar.finish_with_message("done");
    let steal = cpus
        .iter()
        .zip(times_before)
        .filter_map(|(&cpu, before)| {
            let percent = before?.steal_percent(&procstat::CpuTimes::read(cpu)?)?;
            Some(report::CpuSteal { cpu, percent })
        })
        .collect();

    let report = Report {
        date: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        mode: if args.quick { "quick" } else { "full" },
        machine: Machine::detect(),
        proxy_cpus: args.proxy_cpus.clone(),
        load_cpus: args.load_cpus.clone(),
        paced_gbps: args.paced_gbps,
        latency_rounds: plan.rounds,
        aead,
        record_layer,
        steal,
        peers: reports,
        abuse,
    };
    let results = args.results.clone().unwrap_or_else(|| out.clone());
    report::write_all(&report, &results, args.markdown.as_deref())?;
    let failures: Vec<String> = report
        .peers
        .iter()
        .flat_map(|p| p.errors.iter().map(move |e| format!("{}: {e}", p.name)))
        .chain(report.abuse.iter().flat_map(|a| a.errors.iter().cloned()))
        .collect();
    if !failures.is_empty() {
        anyhow::bail!(
            "{} scenario(s) failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok(())
}

/// Everything one run shares.
struct Ctx<'a> {
    bins: &'a Binaries,
    pki: &'a pki::Files,
    backend: &'a backend::Backend,
    workdir: PathBuf,
    args: &'a RunArgs,
    plan: &'a Plan,
    client: &'a std::sync::Arc<rustls::ClientConfig>,
    bar: &'a ProgressBar,
    /// The CPUs the bench could run on before it pinned itself.
    allowed_cpus: &'a [usize],
}

/// One peer through the run: its process (None once it failed) and report.
struct Entry {
    kind: Kind,
    peer: Option<Peer>,
    /// The OpenSSL client in front of it (TLS peers, while bulk and
    /// handshakes run).
    openssl: Option<openssl_client::OpensslClient>,
    /// It failed to start or died: no fresh start for the memory scenario.
    dead: bool,
    report: PeerReport,
}

impl Ctx<'_> {
    fn start(&self, kind: Kind) -> anyhow::Result<Peer> {
        Peer::start(
            kind,
            self.bins,
            self.pki,
            self.backend.addr,
            &self.workdir,
            &self.args.proxy_cpus,
        )
    }

    fn rig(&self, peer: &Peer) -> Rig<'_> {
        Rig {
            target: Target {
                addr: peer.addr,
                tls: peer.kind.tls().then(|| {
                    (
                        self.client.clone(),
                        ServerName::try_from(pki::SERVER_NAME).expect("static name"),
                    )
                }),
            },
            backend_counters: &self.backend.counters,
            proxy: peer.proc,
            proxy_cores: self.args.proxy_cpus.len(),
            window: self.plan.window,
        }
    }

    /// The same peer through the OpenSSL client: plain TCP to stunnel,
    /// which speaks TLS to the peer.
    fn openssl_rig(&self, peer: &Peer, client: &openssl_client::OpensslClient) -> Rig<'_> {
        Rig {
            target: Target {
                addr: client.addr,
                tls: None,
            },
            ..self.rig(peer)
        }
    }

    fn start_openssl_client(&self, peer: &Peer) -> anyhow::Result<openssl_client::OpensslClient> {
        openssl_client::OpensslClient::start(
            self.pki,
            peer.addr,
            &self
                .workdir
                .join(format!("{}-openssl-client", peer.kind.name())),
            &self.args.load_cpus,
        )
    }

    /// Every peer runs at once (pinned to the same CPUs, idle while another
    /// is measured), and each scenario measures them one after the other:
    /// the machine's own drift over the run then falls on all peers alike
    /// instead of on whichever ran last. Bulk and handshake numbers are the
    /// median of the plan's rounds.
    async fn measure_all(&self) -> Vec<PeerReport> {
        let mut entries: Vec<Entry> = self
            .args
            .peers
            .iter()
            .map(|&kind| {
                let mut report = PeerReport {
                    name: kind.name().into(),
                    version: peers::version(kind, self.bins),
                    tuning: peers::tuning(kind, self.args.proxy_cpus.len()),
                    ..Default::default()
                };
                let peer = self
                    .start(kind)
                    .map_err(|e| report.errors.push(format!("{e:#}")))
                    .ok();
                report.config = peer.as_ref().and_then(Peer::config);
                let openssl = peer
                    .as_ref()
                    .filter(|p| p.kind.tls() && self.plan.openssl)
                    .and_then(|p| {
                        self.start_openssl_client(p)
                            .map_err(|e| report.errors.push(format!("OpenSSL client: {e:#}")))
                            .ok()
                    });
                Entry {
                    kind,
                    dead: peer.is_none(),
                    peer,
                    openssl,
                    report,
                }
            })
            .collect();

        let mut bulk: Vec<Vec<Vec<load::BulkResult>>> =
            vec![vec![Vec::new(); self.plan.bulk.len()]; entries.len()];
        let mut handshakes: Vec<Vec<load::HandshakeResult>> = vec![Vec::new(); entries.len()];
        let mut openssl_bulk = bulk.clone();
        let mut openssl_handshakes = handshakes.clone();
        for round in 0..self.plan.rounds {
            for (si, &(conns, dir, paced)) in self.plan.bulk.iter().enumerate() {
                let offered = paced.then_some(self.args.paced_gbps);
                for (pi, e) in entries.iter_mut().enumerate() {
                    self.bar.set_prefix(e.kind.name());
                    self.bar.set_message(format!(
                        "round {}/{}: {conns} conn {dir:?} {}",
                        round + 1,
                        self.plan.rounds,
                        offered.map_or("unpaced".into(), |g| format!("@{g} Gbit/s"))
                    ));
                    if let Some(peer) = e.peer.as_ref().filter(|_| self.plan.rustls) {
                        keep(
                            self.rig(peer).bulk(conns, dir, offered).await,
                            &mut bulk[pi][si],
                            &mut e.report.errors,
                            || format!("bulk {conns} {dir:?}"),
                        );
                    }
                    check_alive(e);
                    self.bar.inc(1);
                    // Right after the rustls client, so the host's drift
                    // falls on both alike.
                    if let (Some(peer), Some(client), true) = (&e.peer, &e.openssl, paced) {
                        keep(
                            self.openssl_rig(peer, client)
                                .bulk(conns, dir, offered)
                                .await,
                            &mut openssl_bulk[pi][si],
                            &mut e.report.errors,
                            || format!("OpenSSL client: bulk {conns} {dir:?}"),
                        );
                        check_alive(e);
                        self.bar.inc(1);
                    }
                }
            }
            if self.plan.handshakes {
                for (pi, e) in entries.iter_mut().enumerate() {
                    self.bar.set_prefix(e.kind.name());
                    self.bar.set_message(format!(
                        "round {}/{}: handshakes",
                        round + 1,
                        self.plan.rounds
                    ));
                    if let Some(peer) = e.peer.as_ref().filter(|p| p.kind.tls()) {
                        if self.plan.rustls {
                            keep(
                                self.rig(peer).handshakes(self.plan.handshake_clients).await,
                                &mut handshakes[pi],
                                &mut e.report.errors,
                                || "handshakes".to_owned(),
                            );
                        }
                        self.bar.inc(1);
                        if let Some(client) = &e.openssl {
                            keep(
                                self.openssl_rig(peer, client)
                                    .handshakes(self.plan.handshake_clients)
                                    .await,
                                &mut openssl_handshakes[pi],
                                &mut e.report.errors,
                                || "OpenSSL client: handshakes".to_owned(),
                            );
                            self.bar.inc(1);
                        }
                    }
                    check_alive(e);
                }
            }
        }
        for (pi, e) in entries.iter_mut().enumerate() {
            e.report.bulk = bulk[pi]
                .drain(..)
                .filter_map(|v| median_by(v, |b| b.proxy_cpu_s_per_gb))
                .collect();
            e.report.handshakes = median_by(std::mem::take(&mut handshakes[pi]), |h| h.per_second);
            e.report.openssl_bulk = openssl_bulk[pi]
                .drain(..)
                .filter_map(|v| median_by(v, |b| b.proxy_cpu_s_per_gb))
                .collect();
            e.report.openssl_handshakes =
                median_by(std::mem::take(&mut openssl_handshakes[pi]), |h| {
                    h.per_second
                });
            // Only the bulk and handshake scenarios use it.
            e.openssl = None;
        }

        if self.plan.latency {
            self.latency(&mut entries).await;
        }

        // Memory on a fresh process: what earlier scenarios left in a heap is
        // not what an idle connection costs.
        for e in &mut entries {
            e.peer = None;
        }
        if self.plan.memory {
            for e in &mut entries {
                if !e.kind.tls() || e.dead {
                    continue;
                }
                self.bar.set_prefix(e.kind.name());
                self.bar
                    .set_message(format!("{} idle connections", self.plan.idle_connections));
                match self.start(e.kind) {
                    Ok(peer) => {
                        match self
                            .rig(&peer)
                            .idle_memory(self.plan.idle_connections, 64, self.bar)
                            .await
                        {
                            Ok(m) => e.report.memory = Some(m),
                            Err(err) => e.report.errors.push(format!("idle memory: {err:#}")),
                        }
                        e.peer = Some(peer);
                        check_alive(e);
                        e.peer = None;
                    }
                    Err(err) => e.report.errors.push(format!("{err:#}")),
                }
                self.bar.inc(1);
            }
        }
        if self.plan.scaling {
            for e in entries.iter_mut().filter(|e| e.kind.gateway() && !e.dead) {
                self.bar.set_prefix(e.kind.name());
                match self.scaling(e.kind).await {
                    Ok(s) => e.report.scaling = s,
                    Err(err) => e.report.errors.push(format!("scaling: {err:#}")),
                }
            }
        }
        entries.into_iter().map(|e| e.report).collect()
    }

    /// The gateway on twice the proxy's cores, one worker per core, against
    /// the gateway on the proxy's cores, in the same run. Where the host
    /// has cores neither the proxy nor the load uses, the many-core gateway
    /// gets those (`dedicated`), and the speed-up is measured: the ratio of
    /// the handshake rates. Where it has not, it gets the proxy's and the
    /// load's cores together: the load generator needs one of those cores,
    /// so the rates it reaches there say little; what multi-core costs shows in the
    /// gateway's CPU per handshake and per GB against a one-core gateway on
    /// the same scenario, and that projects the speed-up on dedicated cores
    /// (cores × one-core cost ÷ many-core cost). Stealing, cross-core wakeups
    /// and shared locks all raise the many-core cost; so does sharing a core
    /// with the load, which makes the projection conservative.
    ///
    /// The one-core cost is measured again here, right before the many-core
    /// one in every round: this host's speed drifts by a fifth within an
    /// hour, and against the main run's figure from minutes earlier the
    /// projection moved with it (1.64 to 1.90 for the same code).
    async fn scaling(&self, kind: Kind) -> anyhow::Result<Option<report::ScalingResult>> {
        let (cores, dedicated) = scaling_cores(
            self.allowed_cpus,
            &self.args.proxy_cpus,
            &self.args.load_cpus,
        );
        if cores.len() <= self.args.proxy_cpus.len() {
            eprintln!("gateway-bench: scaling skipped: the load's CPUs add none to the proxy's");
            self.bar.inc(2 * self.plan.scaling_rounds as u64);
            return Ok(None);
        }
        // Both gateways stay up; the one not being measured idles.
        let baseline = Peer::start(
            kind,
            self.bins,
            self.pki,
            self.backend.addr,
            &self.workdir.join("scaling-baseline"),
            &self.args.proxy_cpus,
        )?;
        let peer = Peer::start(
            kind,
            self.bins,
            self.pki,
            self.backend.addr,
            &self.workdir.join("scaling"),
            &cores,
        )?;
        let one = self.rig(&baseline);
        let mut many = self.rig(&peer);
        many.proxy_cores = cores.len();
        let (conns, dir) = SCALING_BULK;
        let offered = Some(self.args.paced_gbps);
        let (base, n) = (self.args.proxy_cpus.len(), cores.len());
        let mut rounds = Vec::new();
        for round in 0..self.plan.scaling_rounds {
            let of = format!("round {}/{}", round + 1, self.plan.scaling_rounds);
            // Every other round measures the many-core gateway first, so a
            // drift within a round does not always favour one side.
            let many_first = round % 2 == 1;
            self.bar
                .set_message(format!("{of}: handshakes on {base} and {n} cores"));
            let clients = self.plan.handshake_clients;
            let (baseline_handshakes, handshakes) = in_turn(
                many_first,
                one.handshakes(clients),
                many.handshakes(clients),
            )
            .await?;
            self.bar.inc(1);
            self.bar.set_message(format!(
                "{of}: {conns} conn {dir:?} on {base} and {n} cores"
            ));
            let (baseline_bulk, bulk) = in_turn(
                many_first,
                one.bulk(conns, dir, offered),
                many.bulk(conns, dir, offered),
            )
            .await?;
            self.bar.inc(1);
            rounds.push(report::ScalingRound {
                baseline_handshakes,
                handshakes,
                baseline_bulk,
                bulk,
            });
        }
        Ok(report::ScalingResult::from_rounds(
            base, n, dedicated, rounds,
        ))
    }
}

/// The many-core gateway's CPUs, and whether they are its own: the
/// proxy's and as many again that neither the proxy nor the load uses,
/// where the host has them; else the proxy's and the load's together.
fn scaling_cores(allowed: &[usize], proxy: &[usize], load: &[usize]) -> (Vec<usize>, bool) {
    let spare: Vec<usize> = allowed
        .iter()
        .filter(|c| !proxy.contains(c) && !load.contains(c))
        .copied()
        .collect();
    let dedicated = !proxy.is_empty() && spare.len() >= proxy.len();
    let mut cores: Vec<usize> = if dedicated {
        proxy
            .iter()
            .chain(spare.iter().take(proxy.len()))
            .copied()
            .collect()
    } else {
        proxy.iter().chain(load).copied().collect()
    };
    cores.sort_unstable();
    cores.dedup();
    (cores, dedicated)
}

/// Runs the one-core and the many-core measurement one after the other,
/// the many-core one first if asked; the first failure ends the round.
async fn in_turn<T>(
    many_first: bool,
    one: impl std::future::Future<Output = anyhow::Result<T>>,
    many: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, T)> {
    if many_first {
        let m = many.await?;
        Ok((one.await?, m))
    } else {
        let o = one.await?;
        Ok((o, many.await?))
    }
}

/// The bulk scenario the scaling run repeats: the busiest one on one core.
const SCALING_BULK: (usize, Direction) = (16, Direction::Download);

impl Ctx<'_> {
    /// Each TLS peer's peak request rate, then its latency at three rates:
    /// the plan's fixed rate, half the slowest peer's peak (the same load
    /// for everyone, which all can carry), and half its own peak. Only the
    /// common rates compare peers: at half its own peak a fast proxy is
    /// offered more than the one load core can generate without queueing.
    async fn latency(&self, entries: &mut [Entry]) {
        let conns = self.plan.latency_connections;
        let mut peaks = vec![None; entries.len()];
        for (i, e) in entries.iter_mut().enumerate() {
            self.bar.set_prefix(e.kind.name());
            self.bar.set_message("peak requests");
            if let Some(peer) = e.peer.as_ref().filter(|p| p.kind.tls()) {
                match self.rig(peer).peak_requests(conns).await {
                    Ok(p) => peaks[i] = Some(p),
                    Err(err) => e.report.errors.push(format!("peak requests: {err:#}")),
                }
                e.report.peak_requests_per_second = peaks[i];
                self.bar.inc(1);
            }
            check_alive(e);
        }
        let common = peaks
            .iter()
            .flatten()
            .copied()
            .reduce(f64::min)
            .map(|p| p / 2.0);
        // The common rates compare peers, so each is measured in rounds that
        // interleave the peers: a disturbance of the host lands on one round
        // of each, not on all of one peer's.
        let common_rates: Vec<(f64, load::RateBasis)> = [
            Some((self.plan.fixed_rate, load::RateBasis::Fixed)),
            common.map(|r| (r, load::RateBasis::HalfSlowestPeak)),
        ]
        .into_iter()
        .flatten()
        .collect();
        let mut rounds: Vec<Vec<Vec<load::LatencyResult>>> =
            vec![vec![Vec::new(); common_rates.len()]; entries.len()];
        for round in 0..self.plan.rounds {
            for (i, e) in entries.iter_mut().enumerate() {
                self.bar.set_prefix(e.kind.name());
                let Some(peer) = e.peer.as_ref().filter(|p| p.kind.tls()) else {
                    continue;
                };
                for (k, &(rate, basis)) in common_rates.iter().enumerate() {
                    self.bar.set_message(format!(
                        "round {}/{}: latency at {rate:.0} req/s",
                        round + 1,
                        self.plan.rounds
                    ));
                    if let Some(l) = self
                        .latency_at(peer, &mut e.report.errors, rate, basis)
                        .await
                    {
                        rounds[i][k].push(l);
                    }
                }
                self.bar.inc(1);
                check_alive(e);
            }
        }
        for ((e, by_rate), peak) in entries.iter_mut().zip(rounds).zip(peaks) {
            self.bar.set_prefix(e.kind.name());
            // The round with the median p99 stands for the peer at that rate.
            e.report.latency.extend(
                by_rate
                    .into_iter()
                    .filter_map(|r| median_by(r, |l| l.p99_ms)),
            );
            let (Some(peer), Some(peak)) = (e.peer.as_ref().filter(|p| p.kind.tls()), peak) else {
                continue;
            };
            let rate = peak / 2.0;
            self.bar.set_message(format!("latency at {rate:.0} req/s"));
            let basis = load::RateBasis::HalfOwnPeak;
            if let Some(l) = self
                .latency_at(peer, &mut e.report.errors, rate, basis)
                .await
            {
                e.report.latency.push(l);
            }
            self.bar.inc(1);
            check_alive(e);
        }
    }

    /// One latency measurement; a failure goes into the peer's errors.
    async fn latency_at(
        &self,
        peer: &Peer,
        errors: &mut Vec<String>,
        rate: f64,
        basis: load::RateBasis,
    ) -> Option<load::LatencyResult> {
        self.rig(peer)
            .latency(self.plan.latency_connections, rate, basis)
            .await
            .map_err(|err| errors.push(format!("latency at {rate:.0}/s: {err:#}")))
            .ok()
    }
}

/// Keeps a measurement, or its failure (said as `what`) in `errors`.
fn keep<T>(
    result: anyhow::Result<T>,
    into: &mut Vec<T>,
    errors: &mut Vec<String>,
    what: impl FnOnce() -> String,
) {
    match result {
        Ok(r) => into.push(r),
        Err(err) => errors.push(format!("{}: {err:#}", what())),
    }
}

/// A peer that died stops being measured; its log tail goes into the report.
/// An OpenSSL client that died stops its measurements.
fn check_alive(e: &mut Entry) {
    if let Some(client) = &mut e.openssl
        && !client.alive()
    {
        e.report
            .errors
            .push("the OpenSSL client (stunnel) died".to_owned());
        e.openssl = None;
    }
    if let Some(peer) = &mut e.peer
        && !peer.alive()
    {
        e.report
            .errors
            .push(format!("{} died:\n{}", e.kind.name(), peer.log_tail()));
        e.peer = None;
        e.dead = true;
    }
}

#[cfg(test)]
mod tests {
    use super::scaling_cores;

    #[test]
    fn the_many_core_gateway_gets_cores_of_its_own_where_the_host_has_them() {
        // Four CPUs: the proxy's and a spare one, the load on neither.
        assert_eq!(scaling_cores(&[0, 1, 2, 3], &[0], &[1]), (vec![0, 2], true));
        assert_eq!(
            scaling_cores(&[0, 1, 2, 3, 4, 5], &[0, 1], &[2]),
            (vec![0, 1, 3, 4], true)
        );
        // Two CPUs: it shares the load's, and the speed-up is projected.
        assert_eq!(scaling_cores(&[0, 1], &[0], &[1]), (vec![0, 1], false));
        // Not enough spare for twice the proxy's: shared, as before.
        assert_eq!(
            scaling_cores(&[0, 1, 2, 3], &[0, 1], &[2]),
            (vec![0, 1, 2], false)
        );
    }
}

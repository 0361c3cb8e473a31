//! `abuse`: what allowed clients see while others attack (#19), the
//! gateway beside HAProxy and nginx under the same attack, each set up with
//! the same connection limit and the same handshake timeout.
//!
//! - Under attack: slowloris connections numbering twice the limit, from
//!   hundreds of loopback addresses (127.1.0.0/20: ten /24s), trickle a
//!   real ClientHello one byte every 2 s and reconnect the moment they are
//!   dropped; one address (127.2.0.1) floods garbage handshakes as fast as
//!   it can. Meanwhile allowed clients (127.0.0.1–64) arrive open loop at a
//!   fixed rate; each is TCP connect, full mTLS handshake, a 16-byte echo
//!   through the backend and close, within 5 s or it failed. Latency counts
//!   from when the attempt was due. The attackers run on threads of their
//!   own at a low priority, so their CPU does not delay the allowed
//!   clients' timing on the shared load core.
//! - Past the ClientHello: connections numbering half the limit (twice the
//!   gateway's default handshake share), from 127.3.0.0/20, each send a
//!   real ClientHello and then hold the handshake past it: half trickle a
//!   record that never ends just above the gateway's default minimum rate
//!   (30 bytes every 100 ms), half never read the server's flight with a
//!   1 KiB receive buffer (a closed window). They reconnect when dropped.
//!   The same allowed clients, measured the same way.
//! - Memory: the proxy's RSS while 10,000 slowloris connections try it.
//! - Drops (the gateway, root only): how fast a blocked source's packets
//!   die on each path: raw SYNs dropped by the XDP block list, the same
//!   SYNs handled by the kernel without it (a request socket, a SYN-ACK, a
//!   reset), and full connects refused by the gateway at accept.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

use crate::peers::{Binaries, Kind, Peer, Setup};
use crate::procstat::{ksoftirqd_ns, thread_cpu_ns};

/// What the scenario does; `--quick` shrinks it.
#[derive(Debug, Clone)]
pub struct Plan {
    pub max_connections: usize,
    /// Slowloris connections (twice the limit).
    pub slowloris: usize,
    /// Their source addresses.
    pub sources: usize,
    pub allowed_per_second: f64,
    pub warmup: Duration,
    pub measure: Duration,
    /// Parallel loops of the garbage flood (one source address).
    pub flood_loops: usize,
    pub memory_connections: usize,
    pub drop_window: Duration,
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                max_connections: 150,
                slowloris: 300,
                sources: 100,
                allowed_per_second: 50.0,
                warmup: Duration::from_secs(3),
                measure: Duration::from_secs(4),
                flood_loops: 4,
                memory_connections: 1000,
                drop_window: Duration::from_secs(1),
            }
        } else {
            Plan {
                max_connections: 1500,
                slowloris: 3000,
                sources: 500,
                allowed_per_second: 100.0,
                warmup: Duration::from_secs(5),
                measure: Duration::from_secs(20),
                flood_loops: 16,
                memory_connections: 10_000,
                drop_window: Duration::from_secs(5),
            }
        }
    }
}

/// The target: ≥ 99.5% of allowed clients served, p99 ≤ 250 ms.
pub const TARGET_SUCCESS_PERCENT: f64 = 99.5;
pub const TARGET_P99_MS: f64 = 250.0;

/// Which attack a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mix {
    /// Slowloris ClientHellos and a garbage flood.
    Slowloris,
    /// Real ClientHellos, then trickled junk or a closed window.
    PastHello,
}

impl Mix {
    pub fn name(self) -> &'static str {
        match self {
            Mix::Slowloris => "slowloris + flood",
            Mix::PastHello => "past the ClientHello",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AttackRun {
    pub peer: String,
    pub attack: Mix,
    pub max_connections: usize,
    /// Attacking connections held at once (slowloris, or past the
    /// ClientHello), and their source addresses.
    pub slowloris: usize,
    pub slowloris_sources: usize,
    /// Connections those attackers opened (reconnects included).
    pub slowloris_connects: u64,
    /// Garbage handshakes the flooder got a connection for, per second.
    pub flood_per_second: f64,
    pub allowed_attempts: u64,
    pub allowed_served: u64,
    pub success_percent: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The proxy's CPU-seconds per second during the measurement.
    pub proxy_cpu_load: f64,
    /// CPU-seconds per second that neither the proxy nor this benchmark
    /// spent on the machine's CPUs meanwhile: other work on a shared host,
    /// which slows both the proxy and the clients' timing.
    pub others_cpu_load: f64,
    /// The gateway's own count of what it refused, by reason.
    pub refusals: Vec<(String, u64)>,
}

impl AttackRun {
    pub fn meets_target(&self) -> bool {
        self.success_percent >= TARGET_SUCCESS_PERCENT && self.p99_ms <= TARGET_P99_MS
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AttackMemory {
    pub peer: String,
    pub connections: usize,
    pub rss_before_mib: f64,
    pub rss_peak_mib: f64,
    pub kib_per_connection: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DropPath {
    pub path: &'static str,
    pub per_second: f64,
    /// CPU per packet or attempt: the sending thread (and the receiving
    /// softirqs it runs), ksoftirqd, the gateway.
    pub cpu_ns_each: f64,
    /// Counted by the gateway (drops, or refusals), for the record.
    pub counted_by_gateway: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct AbuseReport {
    pub runs: Vec<AttackRun>,
    pub memory: Vec<AttackMemory>,
    pub drops: Vec<DropPath>,
    pub errors: Vec<String>,
}

/// What the scenario needs from the run.
pub struct Ctx<'a> {
    pub bins: &'a Binaries,
    pub pki: &'a crate::pki::Files,
    pub backend: SocketAddr,
    pub workdir: std::path::PathBuf,
    pub proxy_cpus: &'a [usize],
    pub client: Arc<ClientConfig>,
    pub plan: Plan,
}

/// The peers measured: the gateway, HAProxy and nginx, those of `peers`.
pub fn peers(peers: &[Kind]) -> Vec<Kind> {
    [Kind::Gateway, Kind::Haproxy, Kind::Nginx]
        .into_iter()
        .filter(|k| peers.contains(k))
        .collect()
}

impl Ctx<'_> {
    fn setup(&self, kind: Kind, admin: Option<SocketAddr>, kernel: bool) -> Setup {
        let mut setup = Setup {
            max_connections: Some(self.plan.max_connections as u64),
            handshake_timeout: Some(10),
            source_limits: true,
            ..Setup::default()
        };
        if kind == Kind::Gateway {
            if let Some(a) = admin {
                setup.gateway_top = format!(
                    "admin = \"{a}\"\nadmin_socket = \"{}\"",
                    self.admin_socket().display()
                );
            }
            // The shipped defaults, the block list in the kernel on `lo`
            // (where these attackers come from).
            setup.gateway_tail = if kernel {
                "\n[admission]\ninterfaces = [\"lo\"]\npin = false\n".into()
            } else {
                "\n[admission]\nkernel_block_list = false\n".into()
            };
        }
        setup
    }

    /// Where the gateway takes block list changes.
    fn admin_socket(&self) -> std::path::PathBuf {
        self.workdir.join("admin.sock")
    }

    /// `gateway block add SOURCE` through the admin socket.
    async fn block(&self, source: Ipv4Addr) -> anyhow::Result<()> {
        let at = gateway::admin::client::Endpoint::Socket(self.admin_socket());
        gateway::admin::client::add(&at, &source.to_string(), None, false).await?;
        Ok(())
    }

    fn start(&self, kind: Kind, setup: &Setup, dir: &str) -> anyhow::Result<Peer> {
        Peer::start_with(
            kind,
            self.bins,
            self.pki,
            self.backend,
            &self.workdir.join(dir),
            self.proxy_cpus,
            setup,
        )
    }

    /// Every part, for each of `kinds`; failures go into the report.
    pub async fn measure(&self, kinds: &[Kind], bar: &indicatif::ProgressBar) -> AbuseReport {
        let mut report = AbuseReport::default();
        for &kind in kinds {
            bar.set_prefix(kind.name());
            for mix in [Mix::Slowloris, Mix::PastHello] {
                bar.set_message(format!("under attack: {}", mix.name()));
                match self.attack(kind, mix).await {
                    Ok(r) => report.runs.push(r),
                    Err(e) => report.errors.push(format!(
                        "{}: under attack ({}): {e:#}",
                        kind.name(),
                        mix.name()
                    )),
                }
            }
            bar.inc(1);
        }
        for &kind in kinds {
            bar.set_prefix(kind.name());
            bar.set_message(format!(
                "{} attacking connections",
                self.plan.memory_connections
            ));
            match self.memory(kind).await {
                Ok(m) => report.memory.push(m),
                Err(e) => report
                    .errors
                    .push(format!("{}: memory under attack: {e:#}", kind.name())),
            }
            bar.inc(1);
        }
        if kinds.contains(&Kind::Gateway) {
            bar.set_prefix("gateway");
            bar.set_message("blocked sources' packets");
            match self.drops().await {
                Ok(d) => report.drops = d,
                Err(e) => report.errors.push(format!("gateway: drop rates: {e:#}")),
            }
            bar.inc(1);
        }
        report
    }

    async fn attack(&self, kind: Kind, mix: Mix) -> anyhow::Result<AttackRun> {
        let admin = (kind == Kind::Gateway).then(free_port).transpose()?;
        let setup = self.setup(kind, admin, true);
        let mut peer = self.start(kind, &setup, "abuse")?;
        let hello = client_hello(&self.client)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (attackers, sources) = match mix {
            Mix::Slowloris => (self.plan.slowloris, self.plan.sources),
            Mix::PastHello => (self.plan.max_connections / 2, self.plan.sources),
        };
        let (slowloris, flood) = match mix {
            Mix::Slowloris => (
                Attack::slowloris(peer.addr, hello, attackers, sources, stop.clone()),
                Some(Attack::flood(
                    peer.addr,
                    self.plan.flood_loops,
                    stop.clone(),
                )),
            ),
            Mix::PastHello => (
                Attack::past_hello(peer.addr, hello, attackers, sources, stop.clone()),
                None,
            ),
        };
        let flood_count = || flood.as_ref().map_or(0, Attack::count);
        tokio::time::sleep(self.plan.warmup).await;
        let cpu_before = peer.proc.sample().cpu_seconds;
        let machine_before = machine_cpus();
        let own_before = own_cpu_seconds();
        let flood_before = flood_count();
        let started = Instant::now();
        let allowed = allowed_clients(
            peer.addr,
            self.client.clone(),
            self.plan.allowed_per_second,
            self.plan.measure,
        )
        .await;
        let secs = started.elapsed().as_secs_f64();
        let cpu = peer.proc.sample().cpu_seconds - cpu_before;
        let others = machine_busy_since(&machine_before) - cpu - (own_cpu_seconds() - own_before);
        let flood_per_second = (flood_count() - flood_before) as f64 / secs;
        let refusals = match admin {
            Some(a) => refusals(a).await.unwrap_or_default(),
            None => Vec::new(),
        };
        stop.store(true, Ordering::Relaxed);
        let slowloris_connects = slowloris.count();
        slowloris.join();
        if let Some(f) = flood {
            f.join();
        }
        if !peer.alive() {
            anyhow::bail!("{} died under attack:\n{}", kind.name(), peer.log_tail());
        }
        let (served, attempts, h) = allowed?;
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
        Ok(AttackRun {
            peer: kind.name().into(),
            attack: mix,
            max_connections: self.plan.max_connections,
            slowloris: attackers,
            slowloris_sources: sources,
            slowloris_connects,
            flood_per_second,
            allowed_attempts: attempts,
            allowed_served: served,
            success_percent: 100.0 * served as f64 / attempts.max(1) as f64,
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            max_ms: h.max() as f64 / 1e3,
            proxy_cpu_load: cpu / secs,
            others_cpu_load: (others / secs).max(0.0),
            refusals,
        })
    }

    async fn memory(&self, kind: Kind) -> anyhow::Result<AttackMemory> {
        let setup = self.setup(kind, None, false);
        let mut peer = self.start(kind, &setup, "abuse-memory")?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = peer.proc.sample().rss_bytes;
        let hello = client_hello(&self.client)?;
        let stop = Arc::new(AtomicBool::new(false));
        let n = self.plan.memory_connections;
        // 25 connections per source, so the per-source caps are not what
        // holds them off.
        let attack = Attack::slowloris(peer.addr, hello, n, n.div_ceil(25), stop.clone());
        let mut peak = before;
        let until = Instant::now() + self.plan.warmup + Duration::from_secs(5);
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(250)).await;
            peak = peak.max(peer.proc.sample().rss_bytes);
        }
        stop.store(true, Ordering::Relaxed);
        attack.join();
        if !peer.alive() {
            anyhow::bail!("{} died:\n{}", kind.name(), peer.log_tail());
        }
        Ok(AttackMemory {
            peer: kind.name().into(),
            connections: n,
            rss_before_mib: before as f64 / (1 << 20) as f64,
            rss_peak_mib: peak as f64 / (1 << 20) as f64,
            kib_per_connection: peak.saturating_sub(before) as f64 / 1024.0 / n as f64,
        })
    }

    /// How fast a blocked source's packets die: XDP, the kernel without it,
    /// the gateway at accept. CPU is counted per thread and process (this
    /// thread, which sends and, on `lo`, runs the receiving softirqs; every
    /// ksoftirqd; the gateway), so other work on a shared host stays out.
    async fn drops(&self) -> anyhow::Result<Vec<DropPath>> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            anyhow::bail!("needs root (raw packets on lo, XDP)");
        }
        let blocked: Ipv4Addr = Ipv4Addr::new(127, 3, 0, 1);
        let secs = self.plan.drop_window.as_secs_f64();
        let mut out = Vec::new();
        // The gateway with the block list in XDP on lo.
        let admin = free_port()?;
        let peer = self.start(
            Kind::Gateway,
            &self.setup(Kind::Gateway, Some(admin), true),
            "abuse-drops",
        )?;
        self.block(blocked).await?;
        let series = "gateway_block_list_drops_total{reason=\"manual\"}";
        let counted = metric(admin, series).await;
        let cpu = Cpu::start(&peer);
        let sent = raw_syns(blocked, peer.addr, self.plan.drop_window)?;
        out.push(DropPath {
            path: "XDP block list (generic, lo): SYN dropped",
            per_second: sent as f64 / secs,
            cpu_ns_each: cpu.ns_since(&peer) / sent.max(1) as f64,
            counted_by_gateway: metric(admin, series).await - counted,
        });
        drop(peer);
        // The same gateway without it: the source blocked at accept only.
        let admin = free_port()?;
        let peer = self.start(
            Kind::Gateway,
            &self.setup(Kind::Gateway, Some(admin), false),
            "abuse-drops",
        )?;
        self.block(blocked).await?;
        let cpu = Cpu::start(&peer);
        let sent = raw_syns(blocked, peer.addr, self.plan.drop_window)?;
        out.push(DropPath {
            path: "kernel, no XDP: SYN answered (SYN-ACK or cookie, then a reset)",
            per_second: sent as f64 / secs,
            cpu_ns_each: cpu.ns_since(&peer) / sent.max(1) as f64,
            counted_by_gateway: 0,
        });
        let series = "gateway_connections_refused_total{listener=\"bench\",reason=\"blocked\"}";
        let counted = metric(admin, series).await;
        let cpu = Cpu::start(&peer);
        let attempts = full_connects(blocked, peer.addr, self.plan.drop_window).await;
        out.push(DropPath {
            path: "gateway at accept: full connect, then reset",
            per_second: attempts as f64 / secs,
            cpu_ns_each: cpu.ns_since(&peer) / attempts.max(1) as f64,
            counted_by_gateway: metric(admin, series).await - counted,
        });
        drop(peer);
        Ok(out)
    }
}

/// CPU counted for a drop path: this thread, every ksoftirqd, the proxy.
struct Cpu {
    thread: u64,
    softirq: u64,
    proxy: f64,
}

impl Cpu {
    fn start(peer: &Peer) -> Cpu {
        Cpu {
            thread: thread_cpu_ns(),
            softirq: ksoftirqd_ns(),
            proxy: peer.proc.sample().cpu_seconds,
        }
    }

    fn ns_since(&self, peer: &Peer) -> f64 {
        (thread_cpu_ns() - self.thread) as f64
            + (ksoftirqd_ns() - self.softirq) as f64
            + (peer.proc.sample().cpu_seconds - self.proxy) * 1e9
    }
}

/// Every CPU's times now.
fn machine_cpus() -> Vec<crate::procstat::CpuTimes> {
    // SAFETY: sysconf reads a constant of the running system.
    let cpus = usize::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }).unwrap_or(1);
    (0..cpus)
        .filter_map(crate::procstat::CpuTimes::read)
        .collect()
}

/// Busy seconds of every CPU since `before`.
fn machine_busy_since(before: &[crate::procstat::CpuTimes]) -> f64 {
    before
        .iter()
        .zip(machine_cpus())
        .map(|(a, b)| a.busy_seconds(&b))
        .sum()
}

/// This process's CPU time (all its threads), seconds.
fn own_cpu_seconds() -> f64 {
    // SAFETY: rusage is plain data; getrusage fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid rusage to fill.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut usage) };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    s(usage.ru_utime) + s(usage.ru_stime)
}

/// The report's section.
pub fn section(s: &mut String, a: &AbuseReport) {
    use std::fmt::Write as _;
    let Some(first) = a.runs.first() else {
        return;
    };
    let _ = writeln!(
        s,
        "\n## Under attack\n\n\
         Each proxy set up with the same limit ({} client connections; HAProxy `maxconn`, nginx \
         `worker_connections` twice that, the gateway `max_connections`) and the same 10 s for a client \
         (HAProxy `timeout client`, nginx `ssl_handshake_timeout`, the gateway `handshake_timeout`; \
         the gateway otherwise with its shipped defaults and the block list in XDP on `lo`). \
         HAProxy and nginx also limit connections per source as their documentation recommends \
         against floods, at the gateway's default admission limits: HAProxy with stick tables (per \
         address 128 at once and 100 a second, per /24 1024 and 1000), nginx with `limit_conn` \
         (128 per address; its stream module has no rate limit). \
         {} slowloris connections from {} addresses (127.1.0.0/20) trickle a real ClientHello one \
         byte every 2 s and reconnect as soon as they are dropped; one address (127.2.0.1) floods \
         garbage handshakes as fast as it can. Allowed clients arrive meanwhile at a fixed rate from \
         127.0.0.1–64: connect, full mTLS handshake, 16-byte echo, close, within 5 s. Target: ≥ {}% \
         served, p99 ≤ {} ms.\n\n\
         \"Others' CPU\" is what neither the proxy nor the benchmark used of the machine's CPUs \
         meanwhile (a shared host's other work, which slows proxy and clients alike): a run with much \
         of it says more about the host than the proxy.\n\n\
         Past the ClientHello: {} connections (twice the gateway's default handshake share) \
         from {} addresses (127.3.0.0/20) each send a real ClientHello at once, then half trickle \
         a record that never ends (30 bytes every 100 ms, just above the gateway's default \
         `handshake_min_rate`) and half never read the server's flight with a 1 KiB receive \
         buffer (a closed window); they reconnect when dropped. The same allowed clients.\n\n\
         | peer | attack | served | p50 ms | p99 ms | max ms | target | attacker connects | flood connects/s | proxy CPU load | others' CPU load | the gateway's count |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|",
        first.max_connections,
        first.slowloris,
        first.slowloris_sources,
        TARGET_SUCCESS_PERCENT,
        TARGET_P99_MS,
        first.max_connections / 2,
        first.slowloris_sources,
    );
    for r in &a.runs {
        let counted: Vec<String> = r.refusals.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(
            s,
            "| {} | {} | {}/{} ({:.2}%) | {:.1} | {:.1} | {:.1} | {} | {} | {:.0} | {:.2} | {:.2} | {} |",
            r.peer,
            r.attack.name(),
            r.allowed_served,
            r.allowed_attempts,
            r.success_percent,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            if r.meets_target() {
                "met"
            } else {
                "**missed**"
            },
            r.slowloris_connects,
            r.flood_per_second,
            r.proxy_cpu_load,
            r.others_cpu_load,
            if counted.is_empty() {
                "–".to_owned()
            } else {
                counted.join(", ")
            },
        );
    }
    if !a.memory.is_empty() {
        let _ = writeln!(
            s,
            "\nMemory while slowloris connections try each proxy (same setup, 25 connections per \
             source address, for the warm-up and 5 s more): RSS of all its processes.\n\n\
             | peer | attacking connections | RSS before MiB | RSS peak MiB | KiB per attacking connection |\n|---|---|---|---|---|"
        );
        for m in &a.memory {
            let _ = writeln!(
                s,
                "| {} | {} | {:.1} | {:.1} | {:.2} |",
                m.peer, m.connections, m.rss_before_mib, m.rss_peak_mib, m.kib_per_connection
            );
        }
    }
    if !a.drops.is_empty() {
        let _ = writeln!(
            s,
            "\nA blocked source's packets (the gateway; one sending thread on the load core for the \
             raw SYNs through a packet socket on `lo`, 8 connecting loops for the full connects). CPU \
             per packet or attempt: the sending thread's (on `lo` the receiving softirqs run in its \
             context), every ksoftirqd's and the gateway's, so other work on the host stays out. On \
             `lo` XDP runs generic, after the socket buffer exists; on a NIC (or veth) with native XDP \
             the drop comes before it (ARCHITECTURE.md, \"Admission\", measures that).\n\n\
             | path | per second | CPU ns each | counted by the gateway |\n|---|---|---|---|"
        );
        for d in &a.drops {
            let _ = writeln!(
                s,
                "| {} | {:.0} | {:.0} | {} |",
                d.path, d.per_second, d.cpu_ns_each, d.counted_by_gateway
            );
        }
    }
}

/// Attack threads: a runtime of their own, at a low priority.
pub(crate) struct Attack {
    count: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl Attack {
    fn spawn<F, Fut>(stop: Arc<AtomicBool>, body: F) -> Attack
    where
        F: FnOnce(Arc<AtomicU64>, Arc<AtomicBool>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        let count = Arc::new(AtomicU64::new(0));
        let c = count.clone();
        let thread = std::thread::spawn(move || {
            // SAFETY: setpriority on this thread (tid), no memory passed.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 15);
            }
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(body(c, stop));
        });
        Attack { count, thread }
    }

    /// `n` connections from `sources` addresses in 127.1.0.0/20, each
    /// trickling `hello` a byte every 2 s, reconnecting when dropped.
    pub(crate) fn slowloris(
        to: SocketAddr,
        hello: Vec<u8>,
        n: usize,
        sources: usize,
        stop: Arc<AtomicBool>,
    ) -> Attack {
        let hello = Arc::new(hello);
        Attack::many(
            Ipv4Addr::new(127, 1, 0, 0),
            n,
            sources,
            stop,
            move |_, from, stop| {
                let hello = hello.clone();
                async move {
                    let mut s = connect_from(from, to, Duration::from_secs(3)).await?;
                    trickle(&mut s, &hello, &stop).await;
                    Ok(())
                }
            },
        )
    }

    /// `n` connections from `sources` addresses in 127.3.0.0/20, each
    /// sending `hello` at once and then holding the handshake past it: the
    /// even ones trickle a record that never ends (a header for 16 KiB,
    /// then 30 bytes every 100 ms: just above the gateway's default
    /// minimum rate), the odd ones never read the flight with a 1 KiB
    /// receive buffer. Reconnecting when dropped.
    fn past_hello(
        to: SocketAddr,
        hello: Vec<u8>,
        n: usize,
        sources: usize,
        stop: Arc<AtomicBool>,
    ) -> Attack {
        let hello = Arc::new(hello);
        Attack::many(
            Ipv4Addr::new(127, 3, 0, 0),
            n,
            sources,
            stop,
            move |i, from, stop| {
                let hello = hello.clone();
                async move {
                    let closed_window = i % 2 == 1;
                    let s = connect_closed(from, to, closed_window).await?;
                    hold_past_hello(s, &hello, closed_window, &stop).await;
                    Ok(())
                }
            },
        )
    }

    /// `n` attackers from `sources` addresses in a run of /24s from `base`,
    /// their first connects spread over a second, each running `one`
    /// (connection `i` from `from`) again until `stop`; a connect that
    /// failed is tried again 20 ms later. Counts the connections made.
    fn many<F, Fut>(
        base: Ipv4Addr,
        n: usize,
        sources: usize,
        stop: Arc<AtomicBool>,
        one: F,
    ) -> Attack
    where
        F: Fn(usize, IpAddr, Arc<AtomicBool>) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
    {
        Attack::spawn(stop, move |count, stop| async move {
            let mut tasks = Vec::new();
            for i in 0..n {
                let from = source_in(base, i % sources.max(1));
                let (one, count, stop) = (one.clone(), count.clone(), stop.clone());
                tasks.push(tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_micros((i as u64 * 1_000_000) / n as u64))
                        .await;
                    while !stop.load(Ordering::Relaxed) {
                        // Counted once connected, whatever comes next.
                        let connected = count.clone();
                        match one(i, from, stop.clone()).await {
                            Ok(()) => {
                                connected.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                        }
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        })
    }

    /// `loops` loops from 127.2.0.1, each connecting and sending a garbage
    /// handshake as fast as it goes.
    pub(crate) fn flood(to: SocketAddr, loops: usize, stop: Arc<AtomicBool>) -> Attack {
        Attack::spawn(stop, move |count, stop| async move {
            let from = IpAddr::V4(Ipv4Addr::new(127, 2, 0, 1));
            let mut tasks = Vec::new();
            for _ in 0..loops {
                let (count, stop) = (count.clone(), stop.clone());
                tasks.push(tokio::spawn(async move {
                    let mut garbage = vec![0x16, 0x03, 0x01, 0x01, 0xf4, 0x01, 0x00, 0x01, 0xf0];
                    garbage.resize(505, 0x5a);
                    while !stop.load(Ordering::Relaxed) {
                        // Blocked in the kernel, a connect hangs: it gives up
                        // after a second and tries again.
                        let Ok(mut s) = connect_from(from, to, Duration::from_secs(1)).await else {
                            continue;
                        };
                        count.fetch_add(1, Ordering::Relaxed);
                        let _ = s.write_all(&garbage).await;
                        let mut buf = [0u8; 512];
                        let _ = tokio::time::timeout(Duration::from_secs(2), async {
                            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                        })
                        .await;
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        })
    }

    /// Connections it made so far.
    pub(crate) fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub(crate) fn join(self) {
        let _ = self.thread.join();
    }
}

/// The `i`th address of a run of /24s from `base`, avoiding .0 and .255.
fn source_in(base: Ipv4Addr, i: usize) -> IpAddr {
    let [a, b, _, _] = base.octets();
    let per = 50;
    let third = (i / per) as u8;
    let fourth = (i % per) as u8 + 1;
    IpAddr::V4(Ipv4Addr::new(a, b, third, fourth))
}

/// Sends `hello` a byte every 2 s until the peer drops the connection (or
/// `stop`); returns at once when it does.
async fn trickle(s: &mut TcpStream, hello: &[u8], stop: &AtomicBool) {
    let (mut r, mut w) = s.split();
    let mut buf = [0u8; 1024];
    for b in hello {
        if stop.load(Ordering::Relaxed) || w.write_all(std::slice::from_ref(b)).await.is_err() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
            r = r.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) { return },
        }
    }
}

/// A connection from `from`, its receive buffer 1 KiB when `closed_window`
/// (set before connecting, so the window it offers stays that small).
async fn connect_closed(
    from: IpAddr,
    to: SocketAddr,
    closed_window: bool,
) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    if closed_window {
        s.set_recv_buffer_size(1024)?;
    }
    s.bind(SocketAddr::new(from, 0))?;
    let s = tokio::time::timeout(Duration::from_secs(3), s.connect(to))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Sends `hello`, then holds the handshake past it (see
/// `Attack::past_hello`) until the peer drops it (or `stop`, or 12 s: past
/// any handshake timeout here).
async fn hold_past_hello(mut s: TcpStream, hello: &[u8], closed_window: bool, stop: &AtomicBool) {
    if s.write_all(hello).await.is_err() {
        return;
    }
    let until = Instant::now() + Duration::from_secs(12);
    if closed_window {
        // Never read: a reset shows as the socket's error.
        while !stop.load(Ordering::Relaxed) && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if !matches!(s.take_error(), Ok(None)) {
                return;
            }
        }
        return;
    }
    let (mut r, mut w) = s.split();
    if w.write_all(&[0x16, 0x03, 0x03, 0x40, 0x00]).await.is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100)) => {
                if w.write_all(&[0x42; 30]).await.is_err() {
                    return;
                }
            }
            r = r.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) { return },
        }
    }
}

pub(crate) async fn connect_from(
    from: IpAddr,
    to: SocketAddr,
    limit: Duration,
) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(from, 0))?;
    let s = tokio::time::timeout(limit, s.connect(to))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    // Connected, whatever comes next: a proxy that resets at once can make
    // this fail, and the connect still counts.
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// A ClientHello as the bench's clients send it.
pub(crate) fn client_hello(config: &Arc<ClientConfig>) -> anyhow::Result<Vec<u8>> {
    let name = ServerName::try_from(crate::pki::SERVER_NAME)?;
    let mut c = rustls::ClientConnection::new(config.clone(), name)?;
    let mut out = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut out)?;
    }
    Ok(out)
}

/// Allowed clients from 127.0.0.1–64, open loop at `rate` for `window`:
/// (served, attempts, latency of the served in µs).
async fn allowed_clients(
    to: SocketAddr,
    client: Arc<ClientConfig>,
    rate: f64,
    window: Duration,
) -> anyhow::Result<(u64, u64, Histogram<u64>)> {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now() + Duration::from_millis(20);
    let end = start + window;
    let mut due = start;
    let mut tasks = Vec::new();
    let mut i = 0usize;
    while due < end {
        tokio::time::sleep_until(due).await;
        let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % 64) as u8));
        let client = client.clone();
        let at = due;
        tasks.push(tokio::spawn(async move {
            let ok = tokio::time::timeout(Duration::from_secs(5), one_allowed(from, to, client))
                .await
                .is_ok_and(|r| r.is_ok());
            ok.then(|| (Instant::now() - at).as_micros() as u64)
        }));
        due += interval;
        i += 1;
    }
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut served, mut attempts) = (0u64, 0u64);
    for t in tasks {
        attempts += 1;
        if let Ok(Some(us)) = t.await {
            served += 1;
            h.saturating_record(us.max(1));
        }
    }
    Ok((served, attempts, h))
}

async fn one_allowed(
    from: IpAddr,
    to: SocketAddr,
    client: Arc<ClientConfig>,
) -> std::io::Result<()> {
    let tcp = connect_from(from, to, Duration::from_secs(5)).await?;
    let name = ServerName::try_from(crate::pki::SERVER_NAME).map_err(std::io::Error::other)?;
    let mut s = tokio_rustls::TlsConnector::from(client)
        .connect(name, tcp)
        .await?;
    let mut b = [b'E'; 17];
    s.write_all(&b).await?;
    s.read_exact(&mut b[..16]).await?;
    s.shutdown().await?;
    Ok(())
}

fn free_port() -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

/// One series of the gateway's metrics (0 when absent).
pub(crate) async fn metric(admin: SocketAddr, series: &str) -> u64 {
    scrape(admin)
        .await
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

async fn scrape(admin: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect(admin).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
        .await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    Ok(out)
}

/// The gateway's refusals by reason, with its blocks and kernel drops.
async fn refusals(admin: SocketAddr) -> std::io::Result<Vec<(String, u64)>> {
    let text = scrape(admin).await?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            let keep = name.starts_with("gateway_connections_refused_total")
                || name.starts_with("gateway_blocks_total")
                || name.starts_with("gateway_block_list_drops_total");
            let label = name
                .split("reason=\"")
                .nth(1)?
                .trim_end_matches(['"', '}'])
                .split('"')
                .next()?
                .to_owned();
            let kind = if name.starts_with("gateway_blocks_total") {
                format!("blocked sources ({label})")
            } else if name.starts_with("gateway_block_list_drops_total") {
                format!("SYNs dropped in XDP ({label})")
            } else {
                label
            };
            (keep && value != "0")
                .then(|| Some((kind, value.parse().ok()?)))
                .flatten()
        })
        .collect())
}

/// Raw TCP SYNs from `from` (a new source port each) to `to`, injected on
/// `lo` through a packet socket for `window`: how many went out.
fn raw_syns(from: Ipv4Addr, to: SocketAddr, window: Duration) -> anyhow::Result<u64> {
    let SocketAddr::V4(to) = to else {
        anyhow::bail!("IPv4 only");
    };
    let frames: Vec<Vec<u8>> = (0..4096u16)
        .map(|i| syn_frame(from, *to.ip(), 20_000 + i, to.port()))
        .collect();
    // SAFETY: plain socket(2), checked; the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        anyhow::bail!("packet socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: if_nametoindex reads a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    // SAFETY: sockaddr_ll is plain data; zero is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_protocol = (libc::ETH_P_IP as u16).to_be();
    // SAFETY: a valid sockaddr_ll of its size.
    let rc = unsafe {
        libc::bind(
            fd,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        // SAFETY: our descriptor, closed once.
        unsafe { libc::close(fd) };
        anyhow::bail!("binding the packet socket to lo: {e}");
    }
    let end = std::time::Instant::now() + window;
    let mut sent = 0u64;
    'out: loop {
        for f in &frames {
            // SAFETY: a valid buffer of its length, on our bound socket.
            let n = unsafe { libc::send(fd, f.as_ptr().cast(), f.len(), 0) };
            if n > 0 {
                sent += 1;
            }
            if sent.is_multiple_of(256) && std::time::Instant::now() >= end {
                break 'out;
            }
        }
    }
    // SAFETY: our descriptor, closed once.
    unsafe { libc::close(fd) };
    Ok(sent)
}

/// An Ethernet frame (lo's zero addresses) with an IPv4 TCP SYN.
fn syn_frame(from: Ipv4Addr, to: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20 + 20];
    f[12] = 0x08;
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&from.octets());
    ip[16..20].copy_from_slice(&to.octets());
    let sum = checksum(&ip[..20], 0);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let tcp = &mut f[34..54];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&(u32::from(sport) * 7919).to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&from.octets());
    pseudo.extend_from_slice(&to.octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    let partial = pseudo
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    let sum = checksum(&f[34..54], partial);
    f[50..52].copy_from_slice(&sum.to_be_bytes());
    f
}

/// The Internet checksum of `data` over a running sum.
fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Full connects from `from` to `to` for `window` from 8 loops, each
/// waiting for the reset: how many were made. A connect the gateway reset
/// before this side saw it complete counts too (it was accepted).
async fn full_connects(from: Ipv4Addr, to: SocketAddr, window: Duration) -> u64 {
    let count = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + window;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let count = count.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                match connect_from(IpAddr::V4(from), to, Duration::from_secs(1)).await {
                    Ok(mut s) => {
                        count.fetch_add(1, Ordering::Relaxed);
                        let mut b = [0u8; 1];
                        let _ = tokio::time::timeout(Duration::from_secs(1), s.read(&mut b)).await;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {}
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    count.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_syn_frame_has_valid_checksums() {
        let f = syn_frame(
            Ipv4Addr::new(127, 3, 0, 1),
            Ipv4Addr::new(127, 0, 0, 1),
            20000,
            8443,
        );
        assert_eq!(checksum(&f[14..34], 0), 0, "IPv4 header");
        let mut pseudo = 0u32;
        for c in [[127u8, 3], [0, 1], [127, 0], [0, 1], [0, 6], [0, 20]] {
            pseudo += u32::from(u16::from_be_bytes(c));
        }
        assert_eq!(checksum(&f[34..54], pseudo), 0, "TCP");
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(f[47], 0x02, "SYN only");
    }

    #[test]
    fn sources_spread_over_24s_without_network_or_broadcast_addresses() {
        let all: Vec<IpAddr> = (0..500)
            .map(|i| source_in(Ipv4Addr::new(127, 1, 0, 0), i))
            .collect();
        assert_eq!(all[0], IpAddr::V4(Ipv4Addr::new(127, 1, 0, 1)));
        assert_eq!(all[499], IpAddr::V4(Ipv4Addr::new(127, 1, 9, 50)));
        let distinct: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), 500);
    }
}

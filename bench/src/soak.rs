//! `gateway-bench soak`: the gateway under mixed, changing load for a while.
//!
//! Hundreds of concurrent streams of random sizes go through the gateway and
//! come back from an echo backend, each checked byte for byte against the
//! stream it sent. Meanwhile the config is reloaded, one of the route's two
//! backends is killed (with resets) and restarted, and attackers trickle
//! ClientHellos, flood garbage and try without a certificate. The run fails
//! when a byte is lost or corrupted, when a stream fails that no backend
//! restart explains, when a reload is not applied, or when the gateway does
//! not give back its descriptors once the load stops. RSS is sampled every
//! second and its slope reported.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::abuse::{Attack, connect_from};
use crate::peers::{Binaries, Kind, Peer, Setup};

#[derive(clap::Args)]
pub struct Args {
    /// The gateway binary (a release build).
    #[arg(long)]
    gateway: PathBuf,
    /// How long the load runs.
    #[arg(long, default_value_t = 600)]
    seconds: u64,
    /// Concurrent checked streams.
    #[arg(long, default_value_t = 200)]
    streams: usize,
    /// Working directory: the PKI, the gateway's config and log, soak.json.
    #[arg(long, default_value = "target/soak")]
    out: PathBuf,
}

/// Sizes are log-uniform between 1 byte and twice this.
const MAX_STREAM: u64 = 4 << 20;
/// A reload this often, alternating between two configs.
const RELOAD_EVERY: Duration = Duration::from_secs(5);
/// Backend B is killed this often and comes back after `BACKEND_DOWN`.
const RESTART_EVERY: Duration = Duration::from_secs(20);
const BACKEND_DOWN: Duration = Duration::from_secs(1);
/// After the load stops, the gateway must be back to its idle descriptors
/// (plus this many) within `SETTLE`: the attackers' connections end at its
/// handshake timeout.
const SPARE_FDS: usize = 8;
const SETTLE: Duration = Duration::from_secs(20);
/// From this long on, RSS must be flat after warm-up: its slope under
/// `MAX_SLOPE_KIB_PER_MINUTE`. Shorter runs only report it (a minute is
/// mostly the allocator warming up).
const JUDGE_SLOPE_AFTER: f64 = 300.0;
const MAX_SLOPE_KIB_PER_MINUTE: f64 = 1024.0;
/// One stream may take this long before it counts as hung.
const STREAM_LIMIT: Duration = Duration::from_secs(30);

#[derive(Debug, Default, Serialize)]
pub struct Outcome {
    pub seconds: f64,
    pub streams: u64,
    pub bytes_checked: u64,
    /// Came back short (a clean end before every byte) or different.
    pub corrupted: u64,
    /// Failed with an error while a backend was being killed.
    pub cut_by_restart: u64,
    /// Failed with an error no restart explains.
    pub unexplained_failures: u64,
    pub backend_connections_killed: u64,
    pub reloads_sent: u64,
    pub reloads_applied: u64,
    pub backend_restarts: u64,
    pub unauthenticated_attempts: u64,
    pub unauthenticated_served: u64,
    pub slowloris_connects: u64,
    pub flood_connects: u64,
    pub rss_start_mib: f64,
    pub rss_end_mib: f64,
    /// Least-squares slope of RSS after the first quarter of the run.
    pub rss_slope_kib_per_minute: f64,
    /// (seconds since start, MiB), one a second.
    pub rss_samples: Vec<(f64, f64)>,
    pub fds_idle: usize,
    pub fds_after: usize,
    /// What the first streams cut by a restart saw.
    pub cut_examples: Vec<String>,
    pub failures: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    crate::procstat::raise_nofile(65_536)?;
    std::fs::create_dir_all(&args.out)?;
    let out = args.out.canonicalize()?;
    let pki = crate::pki::create(&out.join("pki"))?;
    let client = crate::load::client_config(pki.client_chain.clone(), pki.client_key.clone_key())?;
    let anonymous = crate::load::client_config_without_certificate()?;
    let bins = Binaries {
        gateway: args
            .gateway
            .canonicalize()
            .with_context(|| format!("gateway binary {}", args.gateway.display()))?,
        bench: std::env::current_exe()?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(soak(&args, &out, &bins, &pki, client, anonymous))?;
    let json = serde_json::to_string_pretty(&outcome)?;
    std::fs::write(out.join("soak.json"), &json)?;
    print(&outcome);
    if !outcome.failures.is_empty() {
        bail!(
            "soak failed:\n  {}\n(details in {})",
            outcome.failures.join("\n  "),
            out.join("soak.json").display()
        );
    }
    Ok(())
}

async fn soak(
    args: &Args,
    out: &Path,
    bins: &Binaries,
    pki: &crate::pki::Files,
    client: Arc<ClientConfig>,
    anonymous: Arc<ClientConfig>,
) -> anyhow::Result<Outcome> {
    let a = Echo::start(None).await?;
    let b = Echo::start(None).await?;
    let admin = free_port()?;
    let setup = Setup {
        max_connections: Some(4096),
        handshake_timeout: Some(5),
        gateway_top: format!("admin = \"{admin}\""),
        // The checked streams come from 127.0.0.0/24 and are exempt; the
        // attackers (127.1/16, 127.2/16) meet the shipped admission limits.
        gateway_tail: "\n[admission]\nkernel_block_list = false\nexempt = [\"127.0.0.0/24\"]\n"
            .into(),
        more_backends: vec![b.addr],
        source_limits: false,
    };
    let workdir = out.join("peers");
    // Every CPU: the gateway shares the machine with the load, as in use.
    let cpus: Vec<usize> =
        (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
    let mut gateway = Peer::start_with(Kind::Gateway, bins, pki, a.addr, &workdir, &cpus, &setup)?;
    let config = workdir.join(Kind::Gateway.name()).join("gateway.toml");
    let pid = gateway.proc.root;
    let to = gateway.addr;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds_idle = fds(pid);
    let start = Instant::now();
    let end = start + Duration::from_secs(args.seconds);
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    // Odd while backend B is down or just back: a stream that saw it odd,
    // or saw it change, overlapped a restart.
    let restarts = Arc::new(AtomicU64::new(0));

    // The checked streams.
    let mut streams = JoinSet::new();
    for i in 0..args.streams {
        let (client, tally, stop, restarts) = (
            client.clone(),
            tally.clone(),
            stop.clone(),
            restarts.clone(),
        );
        let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % 200) as u8));
        streams.spawn(async move {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1).wrapping_mul(0xff51_afd7));
            while !stop.load(Ordering::Relaxed) {
                let size = rng.size();
                let seed = rng.next();
                let before = restarts.load(Ordering::Acquire);
                let r =
                    tokio::time::timeout(STREAM_LIMIT, one_stream(from, to, &client, size, seed))
                        .await
                        .unwrap_or(Err(StreamError::Hung));
                let after = restarts.load(Ordering::Acquire);
                tally.record(r, size, !before.is_multiple_of(2) || before != after);
            }
        });
    }

    // The attack mix: slowloris, a garbage flood, clients without a
    // certificate (which must never be served).
    let hello = crate::abuse::client_hello(&client)?;
    let slowloris = Attack::slowloris(to, hello, 64, 32, stop.clone());
    let flood = Attack::flood(to, 1, stop.clone());
    let anon = {
        let (tally, stop) = (tally.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                tally
                    .unauthenticated_attempts
                    .fetch_add(1, Ordering::Relaxed);
                let from = IpAddr::V4(Ipv4Addr::new(127, 3, 0, 1));
                if matches!(
                    tokio::time::timeout(
                        Duration::from_secs(5),
                        one_stream(from, to, &anonymous, 64, 7)
                    )
                    .await,
                    Ok(Ok(()))
                ) {
                    tally.unauthenticated_served.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    // Reloads, backend restarts and samples until the end.
    let mut outcome = Outcome {
        fds_idle,
        ..Outcome::default()
    };
    let mut rss: Vec<(f64, f64)> = Vec::new();
    let mut next_reload = start + RELOAD_EVERY;
    let mut next_restart = start + RESTART_EVERY;
    let mut b = Some(b);
    let b_addr = b.as_ref().map(|e| e.addr).context("backend b")?;
    let mut killed = 0u64;
    let mut ticks = tokio::time::interval(Duration::from_millis(250));
    while Instant::now() < end {
        ticks.tick().await;
        let now = Instant::now();
        let t = now.duration_since(start).as_secs_f64();
        if let Some(r) = rss_mib(pid)
            && rss.last().is_none_or(|&(last, _)| t - last >= 1.0)
        {
            rss.push((t, r));
        }
        if !gateway.alive() {
            outcome
                .failures
                .push(format!("the gateway exited:\n{}", gateway.log_tail()));
            break;
        }
        if now >= next_reload {
            next_reload += RELOAD_EVERY;
            reload(&config, pid, outcome.reloads_sent)?;
            outcome.reloads_sent += 1;
        }
        if now >= next_restart && now + BACKEND_DOWN + Duration::from_secs(2) < end {
            next_restart += RESTART_EVERY;
            restarts.fetch_add(1, Ordering::AcqRel);
            if let Some(e) = b.take() {
                killed += e.kill().await;
            }
            tokio::time::sleep(BACKEND_DOWN).await;
            b = Some(Echo::start(Some(b_addr)).await?);
            outcome.backend_restarts += 1;
            // Streams that began while it was down have had time to fail
            // over; later failures are not the restart's.
            tokio::time::sleep(Duration::from_millis(500)).await;
            restarts.fetch_add(1, Ordering::AcqRel);
        }
    }
    stop.store(true, Ordering::Relaxed);
    while let Some(r) = streams.join_next().await {
        if let Err(e) = r {
            outcome
                .failures
                .push(format!("a stream task panicked: {e}"));
        }
    }
    let _ = anon.await;
    outcome.slowloris_connects = slowloris.count();
    outcome.flood_connects = flood.count();
    tokio::task::spawn_blocking(move || {
        slowloris.join();
        flood.join();
    })
    .await?;
    outcome.seconds = start.elapsed().as_secs_f64();

    // Everything ends: the descriptors come back.
    let settle = Instant::now() + SETTLE;
    loop {
        outcome.fds_after = fds(pid);
        if outcome.fds_after <= fds_idle + SPARE_FDS || Instant::now() > settle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    outcome.reloads_applied = metric(admin, "gateway_reloads_total{result=\"ok\"}").await;
    outcome.backend_connections_killed = killed;
    tally.fill(&mut outcome);
    outcome.rss_start_mib = rss.first().map_or(0.0, |r| r.1);
    outcome.rss_end_mib = rss_mib(pid).unwrap_or(0.0);
    let warm = outcome.seconds / 4.0;
    let settled: Vec<(f64, f64)> = rss.iter().copied().filter(|&(t, _)| t >= warm).collect();
    outcome.rss_samples = rss;
    outcome.rss_slope_kib_per_minute = slope(&settled) * 1024.0 * 60.0;
    judge(&mut outcome);
    drop(gateway);
    Ok(outcome)
}

fn judge(o: &mut Outcome) {
    let mut fail = |s: String| o.failures.push(s);
    if o.streams == 0 {
        fail("no stream completed".into());
    }
    if o.corrupted > 0 {
        fail(format!(
            "{} streams came back short or different",
            o.corrupted
        ));
    }
    if o.unexplained_failures > 0 {
        fail(format!(
            "{} streams failed outside a backend restart",
            o.unexplained_failures
        ));
    }
    if o.cut_by_restart > o.backend_connections_killed {
        fail(format!(
            "{} streams failed during restarts that killed only {} backend connections",
            o.cut_by_restart, o.backend_connections_killed
        ));
    }
    if o.reloads_applied != o.reloads_sent {
        fail(format!(
            "{} reloads sent, {} applied",
            o.reloads_sent, o.reloads_applied
        ));
    }
    if o.unauthenticated_served > 0 {
        fail(format!(
            "{} clients without a certificate were served",
            o.unauthenticated_served
        ));
    }
    if o.seconds >= JUDGE_SLOPE_AFTER && o.rss_slope_kib_per_minute > MAX_SLOPE_KIB_PER_MINUTE {
        fail(format!(
            "RSS grows by {:.0} KiB/min after warm-up",
            o.rss_slope_kib_per_minute
        ));
    }
    if o.fds_after > o.fds_idle + SPARE_FDS {
        fail(format!(
            "the gateway holds {} descriptors {}s after the load, {} when idle",
            o.fds_after,
            SETTLE.as_secs(),
            o.fds_idle
        ));
    }
}

fn print(o: &Outcome) {
    eprintln!(
        "soak: {:.0} s: {} streams checked ({:.1} MiB), {} corrupted, {} cut by {} backend restarts \
         ({} backend connections killed), {} unexplained failures; {}/{} reloads applied; \
         {} of {} clients without a certificate served; {} slowloris and {} flood connects; \
         RSS {:.1} → {:.1} MiB, slope {:+.0} KiB/min after warm-up; descriptors {} idle, {} after",
        o.seconds,
        o.streams,
        o.bytes_checked as f64 / (1 << 20) as f64,
        o.corrupted,
        o.cut_by_restart,
        o.backend_restarts,
        o.backend_connections_killed,
        o.unexplained_failures,
        o.reloads_applied,
        o.reloads_sent,
        o.unauthenticated_served,
        o.unauthenticated_attempts,
        o.slowloris_connects,
        o.flood_connects,
        o.rss_start_mib,
        o.rss_end_mib,
        o.rss_slope_kib_per_minute,
        o.fds_idle,
        o.fds_after,
    );
}

#[derive(Default)]
struct Tally {
    streams: AtomicU64,
    bytes: AtomicU64,
    corrupted: AtomicU64,
    cut: AtomicU64,
    unexplained: AtomicU64,
    unauthenticated_attempts: AtomicU64,
    unauthenticated_served: AtomicU64,
    first_errors: std::sync::Mutex<Vec<String>>,
    cut_examples: std::sync::Mutex<Vec<String>>,
}

impl Tally {
    fn record(&self, r: Result<(), StreamError>, size: u64, during_restart: bool) {
        let counter = match &r {
            Ok(()) => {
                self.streams.fetch_add(1, Ordering::Relaxed);
                self.bytes.fetch_add(size, Ordering::Relaxed);
                return;
            }
            Err(StreamError::Short { .. } | StreamError::Different { .. }) => &self.corrupted,
            Err(_) if during_restart => &self.cut,
            Err(_) => &self.unexplained,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let Err(e) = r else { return };
        let list = if during_restart && e.is_io() {
            &self.cut_examples
        } else {
            &self.first_errors
        };
        if let Ok(mut list) = list.lock()
            && list.len() < 10
        {
            list.push(e.to_string());
        }
    }

    fn fill(&self, o: &mut Outcome) {
        o.streams = self.streams.load(Ordering::Relaxed);
        o.bytes_checked = self.bytes.load(Ordering::Relaxed);
        o.corrupted = self.corrupted.load(Ordering::Relaxed);
        o.cut_by_restart = self.cut.load(Ordering::Relaxed);
        o.unexplained_failures = self.unexplained.load(Ordering::Relaxed);
        o.unauthenticated_attempts = self.unauthenticated_attempts.load(Ordering::Relaxed);
        o.unauthenticated_served = self.unauthenticated_served.load(Ordering::Relaxed);
        if let Ok(cut) = self.cut_examples.lock() {
            o.cut_examples = cut.clone();
        }
        if let Ok(first) = self.first_errors.lock() {
            o.failures
                .extend(first.iter().map(|e| format!("stream: {e}")));
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("a clean end after {got} of {want} bytes")]
    Short { got: u64, want: u64 },
    #[error("byte {at} of {want} differs")]
    Different { at: u64, want: u64 },
    #[error("more than {want} bytes came back")]
    Long { want: u64 },
    #[error("hung for {}s", STREAM_LIMIT.as_secs())]
    Hung,
}

impl StreamError {
    fn is_io(&self) -> bool {
        matches!(self, StreamError::Io(_) | StreamError::Hung)
    }
}

/// One connection: `size` bytes of the stream `seed` names go out after the
/// echo byte, and must come back exactly, then a clean end.
async fn one_stream(
    from: IpAddr,
    to: SocketAddr,
    client: &Arc<ClientConfig>,
    size: u64,
    seed: u64,
) -> Result<(), StreamError> {
    let tcp = connect_from(from, to, Duration::from_secs(5)).await?;
    let name = ServerName::try_from(crate::pki::SERVER_NAME).map_err(std::io::Error::other)?;
    let tls = tokio_rustls::TlsConnector::from(client.clone())
        .connect(name, tcp)
        .await?;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let writer = async move {
        wr.write_all(&[crate::backend::ECHO]).await?;
        let mut rng = Bytes::new(seed);
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            rng.fill(&mut buf[..n]);
            wr.write_all(&buf[..n]).await?;
            left -= n as u64;
        }
        wr.shutdown().await?;
        Ok::<_, std::io::Error>(())
    };
    let reader = async move {
        let mut rng = Bytes::new(seed);
        let mut want = vec![0u8; 64 * 1024];
        let mut got = vec![0u8; 64 * 1024];
        let mut seen = 0u64;
        while seen < size {
            let n = (size - seen).min(got.len() as u64) as usize;
            let r = rd.read(&mut got[..n]).await?;
            if r == 0 {
                return Err(StreamError::Short {
                    got: seen,
                    want: size,
                });
            }
            rng.fill(&mut want[..r]);
            if let Some(at) = want[..r].iter().zip(&got[..r]).position(|(a, b)| a != b) {
                return Err(StreamError::Different {
                    at: seen + at as u64,
                    want: size,
                });
            }
            seen += r as u64;
        }
        if rd.read(&mut got[..1]).await? != 0 {
            return Err(StreamError::Long { want: size });
        }
        Ok(())
    };
    let (w, r) = tokio::join!(writer, reader);
    // A corruption says more than the write error it may cause.
    r?;
    w?;
    Ok(())
}

/// An echo backend that can be killed with resets and started again on
/// the same address.
struct Echo {
    addr: SocketAddr,
    kill: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<u64>,
}

impl Echo {
    async fn start(at: Option<SocketAddr>) -> anyhow::Result<Echo> {
        let listener = match at {
            Some(a) => bind_again(a).await?,
            None => TcpListener::bind("127.0.0.1:0").await?,
        };
        let addr = listener.local_addr()?;
        let (kill, killed) = watch::channel(false);
        let accept = tokio::spawn(serve_echo(listener, killed));
        Ok(Echo { addr, kill, accept })
    }

    /// Stops listening and resets every connection it holds or that waits
    /// in its accept queue: how many it cut.
    async fn kill(self) -> u64 {
        let _ = self.kill.send(true);
        self.accept.await.unwrap_or(0)
    }
}

/// Echoes every connection until killed; then resets them all, and those
/// still queued, and returns how many were cut.
async fn serve_echo(listener: TcpListener, killed: watch::Receiver<bool>) -> u64 {
    let mut stop = killed.clone();
    let live = Arc::new(AtomicU64::new(0));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => {
                let Ok((s, _)) = r else { continue };
                live.fetch_add(1, Ordering::Relaxed);
                conns.spawn(echo_one(s, killed.clone(), live.clone()));
            }
            _ = stop.wait_for(|k| *k) => break,
        }
    }
    // Connected in the kernel but not accepted yet: closing the listener
    // resets them too. Count what is queued now (non-blocking: the gateway
    // keeps connecting and must meet a closed port, not a drain).
    let mut cut = 0;
    if let Ok(l) = listener.into_std() {
        let _ = l.set_nonblocking(true);
        while let Ok((s, _)) = l.accept() {
            if let Ok(s) = TcpStream::from_std(s) {
                reset(&s);
            }
            cut += 1;
        }
    }
    cut += live.load(Ordering::Relaxed);
    while conns.join_next().await.is_some() {}
    cut
}

async fn echo_one(mut s: TcpStream, mut killed: watch::Receiver<bool>, live: Arc<AtomicU64>) {
    let (mut rd, mut wr) = s.split();
    let echo = async {
        let mut mode = [0u8; 1];
        rd.read_exact(&mut mode).await?;
        tokio::io::copy(&mut rd, &mut wr).await?;
        wr.shutdown().await
    };
    let done = tokio::select! {
        _ = echo => true,
        _ = killed.wait_for(|k| *k) => false,
    };
    if done {
        live.fetch_sub(1, Ordering::Relaxed);
    } else {
        reset(&s);
    }
}

/// The killed backend's port, taken again (TIME_WAIT never blocks a listener
/// with SO_REUSEADDR, which tokio sets).
async fn bind_again(a: SocketAddr) -> anyhow::Result<TcpListener> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = tokio::net::TcpSocket::new_v4()?;
        s.set_reuseaddr(true)?;
        match s.bind(a).and_then(|()| s.listen(1024)) {
            Ok(l) => return Ok(l),
            Err(e) if Instant::now() > deadline => {
                return Err(e).context(format!("binding {a} again"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Closes with a reset, as a crashed backend's kernel would.
fn reset(s: &TcpStream) {
    let _ = s.set_zero_linger();
}

fn reload(config: &Path, pid: u32, n: u64) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(config)?;
    let (from, to) = if n.is_multiple_of(2) {
        ("idle_timeout = \"10m\"", "idle_timeout = \"11m\"")
    } else {
        ("idle_timeout = \"11m\"", "idle_timeout = \"10m\"")
    };
    if !text.contains(from) {
        bail!("{} has no `{from}` to change", config.display());
    }
    std::fs::write(config, text.replace(from, to))?;
    // SAFETY: kill with the pid of the gateway we started and still own.
    if unsafe { libc::kill(pid as i32, libc::SIGHUP) } != 0 {
        bail!("SIGHUP to {pid}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn rss_mib(pid: u32) -> Option<f64> {
    crate::procstat::rss_bytes(pid).map(|b| b as f64 / (1 << 20) as f64)
}

/// Least-squares slope of (t, y), in y per t (0 with fewer than 2 points).
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let (mt, my) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), &(t, y)| (a + t / n, b + y / n));
    let (num, den) = points.iter().fold((0.0, 0.0), |(num, den), &(t, y)| {
        (num + (t - mt) * (y - my), den + (t - mt) * (t - mt))
    });
    if den == 0.0 { 0.0 } else { num / den }
}

fn free_port() -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

async fn metric(admin: SocketAddr, series: &str) -> u64 {
    crate::abuse::metric(admin, series).await
}

/// splitmix64: sizes and seeds.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Log-uniform up to MAX_STREAM: many small streams, some large.
    fn size(&mut self) -> u64 {
        let bits = u64::from(MAX_STREAM.trailing_zeros());
        let b = self.next() % bits;
        (1u64 << b) + self.next() % (1u64 << b)
    }
}

/// The bytes of a stream, the same however they are cut: the writer and
/// the reader regenerate them from the seed in pieces of any size.
struct Bytes {
    rng: Rng,
    word: [u8; 8],
    used: usize,
}

impl Bytes {
    fn new(seed: u64) -> Bytes {
        Bytes {
            rng: Rng(seed),
            word: [0; 8],
            used: 8,
        }
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            if self.used == 8 {
                self.word = self.rng.next().to_le_bytes();
                self.used = 0;
            }
            *b = self.word[self.used];
            self.used += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ends_regenerate_the_same_stream_whatever_the_read_sizes() {
        let mut whole = vec![0u8; 1000];
        Bytes::new(42).fill(&mut whole);
        let mut pieces = vec![0u8; 1000];
        let mut b = Bytes::new(42);
        let mut at = 0;
        for n in [1, 7, 3, 13, 64, 5].iter().cycle() {
            let end = (at + n).min(pieces.len());
            b.fill(&mut pieces[at..end]);
            at = end;
            if at == pieces.len() {
                break;
            }
        }
        assert_eq!(whole, pieces);
        let mut other = vec![0u8; 1000];
        Bytes::new(43).fill(&mut other);
        assert_ne!(whole, other);
    }

    #[test]
    fn sizes_stay_within_the_largest_stream() {
        let mut r = Rng(1);
        let sizes: Vec<u64> = (0..10_000).map(|_| r.size()).collect();
        assert!(sizes.iter().all(|&s| (1..2 * MAX_STREAM).contains(&s)));
        assert!(sizes.iter().any(|&s| s < 64));
        assert!(sizes.iter().any(|&s| s > MAX_STREAM / 2));
    }

    #[test]
    fn a_steady_rise_has_its_slope() {
        let pts: Vec<(f64, f64)> = (0..10).map(|t| (t as f64, 3.0 + 2.0 * t as f64)).collect();
        assert!((slope(&pts) - 2.0).abs() < 1e-9);
        assert_eq!(slope(&pts[..1]), 0.0);
    }
}

//! The load generator: mTLS clients (or plain TCP for the relay) driving bulk
//! transfers, full handshakes, request/response latency and idle connections
//! through a proxy, while the proxy's CPU and memory are sampled.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use rustls::ClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::backend::{self, Counters};
use crate::procstat::ProcTree;

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
pub type Stream = Box<dyn Io>;

/// How to reach the proxy under test.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// None: plain TCP (the relay).
    pub tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
}

impl Target {
    pub async fn connect(&self) -> std::io::Result<Stream> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        match &self.tls {
            None => Ok(Box::new(tcp)),
            Some((config, name)) => {
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name.clone(), tcp)
                    .await?;
                Ok(Box::new(tls))
            }
        }
    }
}

/// TLS 1.3, AES-128-GCM, P-256 only, no resumption: every connection is a
/// full mTLS handshake on the suite all peers are measured with.
pub fn client_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> anyhow::Result<Arc<ClientConfig>> {
    let (builder, provider) = client_builder()?;
    let mut config = builder
        .with_custom_certificate_verifier(Arc::new(SignatureOnly(provider)))
        .with_client_auth_cert(chain, key)?;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The same client without a certificate: one the gateway must refuse.
pub fn client_config_without_certificate() -> anyhow::Result<Arc<ClientConfig>> {
    let (builder, provider) = client_builder()?;
    let mut config = builder
        .with_custom_certificate_verifier(Arc::new(SignatureOnly(provider)))
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

fn client_builder() -> anyhow::Result<(
    rustls::client::danger::DangerousClientConfigBuilder,
    Arc<rustls::crypto::CryptoProvider>,
)> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites =
        vec![rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256];
    provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::SECP256R1];
    let provider = Arc::new(provider);
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous();
    Ok((builder, provider))
}

/// The load generator checks the server's handshake signature but not its
/// chain: verifying the chain on the load core would cost it two ECDSA
/// verifications per handshake and cap the rate before the proxy does. The
/// chain and its verification are the tests' business, not the benchmark's.
#[derive(Debug)]
struct SignatureOnly(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for SignatureOnly {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// How long each measurement runs, after a warm-up that is not counted.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Window {
    pub warmup: Duration,
    pub measure: Duration,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Client → backend.
    Upload,
    /// Backend → client.
    Download,
}

#[derive(Debug, Clone, Serialize)]
pub struct BulkResult {
    pub connections: usize,
    pub direction: Direction,
    /// None: unpaced (saturation).
    pub offered_gbps: Option<f64>,
    pub gbps: f64,
    pub proxy_cpu_s_per_gb: f64,
    /// Proxy CPU-seconds per wall second (1.0 = one core busy).
    pub proxy_cpu_load: f64,
    pub bottleneck: Bottleneck,
    /// Bytes forwarded per time the proxy slept and woke (KiB): the larger,
    /// the fewer passes through its event loop per GB.
    pub proxy_kib_per_wakeup: f64,
    /// Share of the window the proxy's threads waited, ready, for its CPU:
    /// above a few percent, something else ran there, the proxy woke less
    /// often to bigger batches, and its CPU per GB reads low.
    pub proxy_waiting: f64,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Bottleneck {
    /// The proxy used (nearly) all the CPU it was given.
    Proxy,
    /// The proxy had CPU to spare: the load side, or the pacing, set the rate.
    Load,
}

impl Bottleneck {
    fn of(load: f64, proxy_cores: usize) -> Bottleneck {
        if load >= 0.9 * proxy_cores as f64 {
            Bottleneck::Proxy
        } else {
            Bottleneck::Load
        }
    }
}

/// Snapshot of a measurement's counters at one instant.
struct Mark {
    at: Instant,
    cpu: f64,
    sleeps: u64,
    waited: f64,
    count: u64,
}

fn mark(proxy: ProcTree, count: u64) -> Mark {
    let sample = proxy.sample();
    Mark {
        at: Instant::now(),
        cpu: sample.cpu_seconds,
        sleeps: sample.sleeps,
        waited: sample.waited_seconds,
        count,
    }
}

pub struct Rig<'a> {
    pub target: Target,
    pub backend_counters: &'a Counters,
    pub proxy: ProcTree,
    pub proxy_cores: usize,
    pub window: Window,
}

impl Rig<'_> {
    /// `connections` long transfers in one direction, at `offered_gbps` in
    /// total (paced) or as fast as they go.
    pub async fn bulk(
        &self,
        connections: usize,
        direction: Direction,
        offered_gbps: Option<f64>,
    ) -> anyhow::Result<BulkResult> {
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let rate = offered_gbps.map_or(0, |g| (g * 1e9 / 8.0 / connections as f64) as u64);
        let mut tasks = Vec::new();
        for _ in 0..connections {
            let mut s = self.target.connect().await?;
            let (stop, received) = (stop.clone(), received.clone());
            tasks.push(tokio::spawn(async move {
                let buf = vec![0u8; backend::CHUNK];
                match direction {
                    Direction::Upload => {
                        s.write_all(&[backend::SINK]).await?;
                        let start = Instant::now();
                        let mut sent = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            s.write_all(&buf).await?;
                            sent += buf.len() as u64;
                            backend::pace(start, sent, rate).await;
                        }
                    }
                    Direction::Download => {
                        s.write_all(&[backend::SOURCE]).await?;
                        s.write_all(&rate.to_be_bytes()).await?;
                        s.flush().await?;
                        let mut buf = buf;
                        while !stop.load(Ordering::Relaxed) {
                            let n = s.read(&mut buf).await?;
                            if n == 0 {
                                break;
                            }
                            received.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                }
                Ok::<_, std::io::Error>(())
            }));
        }
        let count = || match direction {
            Direction::Upload => self.backend_counters.sunk.load(Ordering::Relaxed),
            Direction::Download => received.load(Ordering::Relaxed),
        };
        tokio::time::sleep(self.window.warmup).await;
        let a = mark(self.proxy, count());
        tokio::time::sleep(self.window.measure).await;
        let b = mark(self.proxy, count());
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            // A task blocked on a write to a proxy that stopped reading ends
            // when its stream drops with the task.
            match tokio::time::timeout(Duration::from_secs(2), t).await {
                Ok(Ok(Err(e))) if b.count == a.count => {
                    anyhow::bail!("bulk transfer failed: {e}")
                }
                Ok(_) => {}
                Err(_) => {}
            }
        }
        let secs = (b.at - a.at).as_secs_f64();
        let bytes = (b.count - a.count) as f64;
        if bytes == 0.0 {
            anyhow::bail!("no bytes moved in {secs:.1}s");
        }
        let cpu = b.cpu - a.cpu;
        let load = cpu / secs;
        Ok(BulkResult {
            connections,
            direction,
            offered_gbps,
            gbps: bytes * 8.0 / secs / 1e9,
            proxy_cpu_s_per_gb: cpu / (bytes / 1e9),
            proxy_cpu_load: load,
            bottleneck: Bottleneck::of(load, self.proxy_cores),
            proxy_kib_per_wakeup: bytes
                / 1024.0
                / (b.sleeps.saturating_sub(a.sleeps)).max(1) as f64,
            proxy_waiting: (b.waited - a.waited) / secs,
        })
    }

    /// Full mTLS handshakes, each followed by one forwarded 16-byte request,
    /// from `parallel` clients; only handshakes the backend saw count.
    pub async fn handshakes(&self, parallel: usize) -> anyhow::Result<HandshakeResult> {
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicU64::new(0));
        let last_error = Arc::new(std::sync::Mutex::new(None::<String>));
        let mut tasks = Vec::new();
        for _ in 0..parallel {
            let (target, stop, failed, last_error) = (
                self.target.clone(),
                stop.clone(),
                failed.clone(),
                last_error.clone(),
            );
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Err(e) = one_request(&target).await {
                        failed.fetch_add(1, Ordering::Relaxed);
                        *last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                    }
                }
            }));
        }
        let count = || {
            self.backend_counters
                .echo_connections
                .load(Ordering::Relaxed)
        };
        tokio::time::sleep(self.window.warmup).await;
        let a = mark(self.proxy, count());
        let failed_before = failed.load(Ordering::Relaxed);
        tokio::time::sleep(self.window.measure).await;
        let b = mark(self.proxy, count());
        let failed = failed.load(Ordering::Relaxed) - failed_before;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        let secs = (b.at - a.at).as_secs_f64();
        let n = b.count - a.count;
        if n == 0 {
            let why = last_error.lock().unwrap_or_else(|p| p.into_inner()).clone();
            anyhow::bail!(
                "no handshake reached the backend ({})",
                why.unwrap_or_default()
            );
        }
        let cpu = b.cpu - a.cpu;
        let load = cpu / secs;
        Ok(HandshakeResult {
            parallel,
            per_second: n as f64 / secs,
            proxy_cpu_ms_each: cpu * 1e3 / n as f64,
            proxy_cpu_load: load,
            failed,
            bottleneck: Bottleneck::of(load, self.proxy_cores),
        })
    }

    /// The highest request rate `connections` persistent connections reach
    /// with one 1 KiB request in flight each (closed loop).
    pub async fn peak_requests(&self, connections: usize) -> anyhow::Result<f64> {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..connections {
            let mut s = self.echo_stream().await?;
            let (stop, done) = (stop.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                let mut req = [7u8; REQUEST];
                while !stop.load(Ordering::Relaxed) {
                    s.write_all(&req).await?;
                    s.read_exact(&mut req).await?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<_, std::io::Error>(())
            }));
        }
        tokio::time::sleep(self.window.warmup).await;
        let a = done.load(Ordering::Relaxed);
        let t = Instant::now();
        tokio::time::sleep(self.window.measure).await;
        let n = done.load(Ordering::Relaxed) - a;
        let secs = t.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        Ok(n as f64 / secs)
    }

    /// 1 KiB requests at `rate` per second in total over `connections`
    /// persistent connections (open loop). Latency counts from when a request
    /// was due, so a stalled proxy cannot hide its queue (no coordinated omission).
    pub async fn latency(
        &self,
        connections: usize,
        rate: f64,
        basis: RateBasis,
    ) -> anyhow::Result<LatencyResult> {
        let interval = Duration::from_secs_f64(connections as f64 / rate);
        let start = Instant::now() + Duration::from_millis(50);
        let record_from = start + self.window.warmup;
        let end = record_from + self.window.measure;
        let mut tasks = Vec::new();
        for i in 0..connections {
            let mut s = self.echo_stream().await?;
            // Spread the connections' schedules over one interval.
            let offset = interval.mul_f64(i as f64 / connections as f64);
            tasks.push(tokio::spawn(async move {
                let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                let mut req = [7u8; REQUEST];
                let mut due = start + offset;
                let mut last_response = start;
                while due < end {
                    tokio::time::sleep_until(due).await;
                    // A request sent late because the previous response was
                    // late counts from when it was due (the proxy's queue);
                    // one sent late only because the timer fires on a
                    // millisecond tick counts from when it went out.
                    let from = if last_response > due {
                        due
                    } else {
                        Instant::now()
                    };
                    s.write_all(&req).await?;
                    s.read_exact(&mut req).await?;
                    last_response = Instant::now();
                    if due >= record_from {
                        let us = (last_response - from).as_micros() as u64;
                        h.saturating_record(us.max(1));
                    }
                    due += interval;
                }
                Ok::<_, std::io::Error>(h)
            }));
        }
        let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        for t in tasks {
            let h = t.await??;
            all.add(&h)?;
        }
        let ms = |q: f64| all.value_at_quantile(q) as f64 / 1e3;
        Ok(LatencyResult {
            connections,
            basis,
            rate,
            achieved: all.len() as f64 / self.window.measure.as_secs_f64(),
            p50_ms: ms(0.50),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: all.max() as f64 / 1e3,
        })
    }

    /// Opens `n` mTLS connections that each forward one request and then idle,
    /// and charges the proxy's RSS growth to them.
    pub async fn idle_memory(
        &self,
        n: usize,
        parallel: usize,
        progress: &indicatif::ProgressBar,
    ) -> anyhow::Result<MemoryResult> {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = self.proxy.sample().rss_bytes;
        let mut tasks = Vec::new();
        let opened = Arc::new(AtomicU64::new(0));
        for w in 0..parallel {
            let share = n / parallel + usize::from(w < n % parallel);
            let (target, opened) = (self.target.clone(), opened.clone());
            tasks.push(tokio::spawn(async move {
                let mut held = Vec::with_capacity(share);
                for _ in 0..share {
                    let mut s = target.connect().await?;
                    s.write_all(&[backend::ECHO]).await?;
                    let mut b = [1u8; 16];
                    s.write_all(&b).await?;
                    s.read_exact(&mut b).await?;
                    held.push(s);
                    opened.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<_, std::io::Error>(held)
            }));
        }
        let ticker = {
            let (opened, progress) = (opened.clone(), progress.clone());
            tokio::spawn(async move {
                loop {
                    progress.set_message(format!("{} connections", opened.load(Ordering::Relaxed)));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        };
        let mut held = Vec::with_capacity(n);
        let mut error = None;
        for t in tasks {
            match t.await? {
                Ok(mut h) => held.append(&mut h),
                Err(e) => error = Some(e),
            }
        }
        ticker.abort();
        if let Some(e) = error {
            anyhow::bail!("opened {} of {n} idle connections: {e}", held.len());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = self.proxy.sample().rss_bytes;
        drop(held);
        Ok(MemoryResult {
            connections: n,
            rss_before_mib: before as f64 / (1 << 20) as f64,
            rss_after_mib: after as f64 / (1 << 20) as f64,
            kib_per_connection: after.saturating_sub(before) as f64 / 1024.0 / n as f64,
        })
    }

    async fn echo_stream(&self) -> anyhow::Result<Stream> {
        let mut s = self.target.connect().await?;
        s.write_all(&[backend::ECHO]).await?;
        Ok(s)
    }
}

const REQUEST: usize = 1024;

async fn one_request(target: &Target) -> std::io::Result<()> {
    let mut s = target.connect().await?;
    let mut b = [b'E'; 17];
    s.write_all(&b).await?;
    s.read_exact(&mut b[..16]).await?;
    s.shutdown().await?;
    Ok(())
}

#[derive(Debug, Clone, Serialize)]
pub struct HandshakeResult {
    pub parallel: usize,
    pub per_second: f64,
    pub proxy_cpu_ms_each: f64,
    pub proxy_cpu_load: f64,
    pub failed: u64,
    pub bottleneck: Bottleneck,
}

/// Where a latency measurement's request rate came from.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RateBasis {
    /// The plan's fixed rate, the same for every peer.
    Fixed,
    /// Half the slowest peer's peak, the same for every peer.
    HalfSlowestPeak,
    /// Half this peer's own peak.
    HalfOwnPeak,
}

impl RateBasis {
    pub fn describe(self) -> &'static str {
        match self {
            RateBasis::Fixed => "fixed",
            RateBasis::HalfSlowestPeak => "½ slowest peak",
            RateBasis::HalfOwnPeak => "½ own peak",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyResult {
    pub connections: usize,
    pub basis: RateBasis,
    /// Offered requests per second.
    pub rate: f64,
    pub achieved: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemoryResult {
    pub connections: usize,
    pub rss_before_mib: f64,
    pub rss_after_mib: f64,
    pub kib_per_connection: f64,
}

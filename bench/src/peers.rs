//! The proxies under test: this gateway and the ones users would pick
//! instead, each configured by us for the same job (TLS 1.3, client
//! certificates required and verified against the same root, forward to the
//! same backend), started pinned to the proxy's cores and stopped after.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;

use crate::pki::Files;
use crate::procstat::ProcTree;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// This gateway (userspace path).
    Gateway,
    /// This gateway with kernel TLS and splice (`offload = "kernel"`): only
    /// where the kernel has kTLS (the VM run).
    #[value(name = "gateway-ktls")]
    GatewayKtls,
    Haproxy,
    Nginx,
    Stunnel,
    /// Plain TCP splice relay, no TLS: the ceiling.
    Relay,
}

impl Kind {
    /// The peers of a run on a host (kTLS is measured in the VM).
    pub const HOST: [Kind; 5] = [
        Kind::Gateway,
        Kind::Haproxy,
        Kind::Nginx,
        Kind::Stunnel,
        Kind::Relay,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Gateway => "gateway",
            Kind::GatewayKtls => "gateway-ktls",
            Kind::Haproxy => "haproxy",
            Kind::Nginx => "nginx",
            Kind::Stunnel => "stunnel",
            Kind::Relay => "relay",
        }
    }

    pub fn tls(self) -> bool {
        self != Kind::Relay
    }

    pub fn gateway(self) -> bool {
        matches!(self, Kind::Gateway | Kind::GatewayKtls)
    }
}

/// Where the binaries are.
pub struct Binaries {
    pub gateway: PathBuf,
    /// This benchmark's own binary (it is also the relay).
    pub bench: PathBuf,
}

/// How a peer is set up beyond the common job: the defaults, or limits
/// for the abuse scenario.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Client connections the proxy may hold (None: as many as the
    /// open-file limit lets it).
    pub max_connections: Option<u64>,
    /// How long a client may take (HAProxy's `timeout client`, nginx's
    /// `ssl_handshake_timeout`, the gateway's `handshake_timeout`); None:
    /// the defaults of the other scenarios.
    pub handshake_timeout: Option<u64>,
    /// Top-level lines of the gateway's config.
    pub gateway_top: String,
    /// Lines after the gateway's listener and route (an `[admission]` table).
    pub gateway_tail: String,
    /// The gateway's route forwards to these too, round robin.
    pub more_backends: Vec<SocketAddr>,
    /// HAProxy and nginx limit connections per source address (and HAProxy
    /// per /24 too) as their documentation recommends against floods, at
    /// the gateway's default admission limits: 128 at once and 100 a
    /// second per address, 1024 and 1000 per /24. nginx's stream module
    /// can limit only the count (`limit_conn`), not the rate.
    pub source_limits: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            max_connections: None,
            handshake_timeout: None,
            gateway_top: String::new(),
            // The load comes from one address, 127.0.0.1: per-source limits
            // would cap every scenario but the abuse one at theirs.
            gateway_tail:
                "\n[admission]\nsource_handshakes_per_second = 0\nsource_handshakes_in_flight = 0\n\
                           prefix_handshakes_per_second = 0\nprefix_handshakes_in_flight = 0\n\
                           network_handshakes_per_second = 0\nnetwork_handshakes_in_flight = 0\n"
                    .into(),
            more_backends: Vec::new(),
            source_limits: false,
        }
    }
}

pub struct Peer {
    pub kind: Kind,
    pub addr: SocketAddr,
    pub proc: ProcTree,
    child: Child,
    dir: PathBuf,
}

impl Peer {
    pub fn start(
        kind: Kind,
        bins: &Binaries,
        pki: &Files,
        backend: SocketAddr,
        workdir: &Path,
        cpus: &[usize],
    ) -> anyhow::Result<Peer> {
        Peer::start_with(kind, bins, pki, backend, workdir, cpus, &Setup::default())
    }

    pub fn start_with(
        kind: Kind,
        bins: &Binaries,
        pki: &Files,
        backend: SocketAddr,
        workdir: &Path,
        cpus: &[usize],
        setup: &Setup,
    ) -> anyhow::Result<Peer> {
        let dir = workdir.join(kind.name());
        std::fs::create_dir_all(&dir)?;
        let addr = free_port()?;
        let cmd = match kind {
            Kind::Gateway => gateway(
                bins,
                pki,
                addr,
                backend,
                &dir,
                "userspace",
                cpus.len(),
                setup,
            )?,
            Kind::GatewayKtls => {
                gateway(bins, pki, addr, backend, &dir, "kernel", cpus.len(), setup)?
            }
            Kind::Haproxy => haproxy(pki, addr, backend, &dir, cpus.len(), setup)?,
            Kind::Nginx => nginx(pki, addr, backend, &dir, cpus.len(), setup)?,
            Kind::Stunnel => stunnel(pki, addr, backend, &dir)?,
            Kind::Relay => {
                let mut c = Command::new(&bins.bench);
                c.args([
                    "relay",
                    "--listen",
                    &addr.to_string(),
                    "--to",
                    &backend.to_string(),
                ]);
                c
            }
        };
        let child = spawn_listening(cmd, kind.name(), addr, &dir, cpus)?;
        Ok(Peer {
            kind,
            addr,
            proc: ProcTree { root: child.id() },
            child,
            dir,
        })
    }

    pub fn log_tail(&self) -> String {
        log_tail(&self.dir)
    }

    /// The config file it was started with, as written.
    pub fn config(&self) -> Option<String> {
        let name = match self.kind {
            Kind::Gateway | Kind::GatewayKtls => "gateway.toml",
            Kind::Haproxy => "haproxy.cfg",
            Kind::Nginx => "nginx.conf",
            Kind::Stunnel => "stunnel.conf",
            Kind::Relay => return None,
        };
        std::fs::read_to_string(self.dir.join(name)).ok()
    }

    /// Whether it is still running (a crash mid-run voids its numbers).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// Starts `cmd` pinned to `cpus`, its output in `dir`/stderr.log, and
/// waits until it accepts connections on `addr`.
pub(crate) fn spawn_listening(
    mut cmd: Command,
    name: &str,
    addr: SocketAddr,
    dir: &Path,
    cpus: &[usize],
) -> anyhow::Result<Child> {
    let log = std::fs::File::create(dir.join("stderr.log"))?;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let cpus = cpus.to_vec();
    // SAFETY: between fork and exec only sched_setaffinity runs, which is
    // async-signal-safe and allocates nothing (the set is built on the stack).
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || crate::procstat::pin_to(&cpus));
    }
    let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("{name} exited at start ({status}):\n{}", log_tail(dir));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            // Let multi-process proxies finish starting their workers.
            std::thread::sleep(Duration::from_millis(300));
            return Ok(child);
        }
        if Instant::now() > deadline {
            stop(&mut child);
            bail!(
                "{name} did not listen on {addr} within 15s:\n{}",
                log_tail(dir)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM first so nginx's master takes its workers down with it; SIGKILL
/// after 5 s.
pub(crate) fn stop(child: &mut Child) {
    // SAFETY: kill with a pid we spawned and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

pub(crate) fn log_tail(dir: &Path) -> String {
    let s = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Client connections a proxy may hold: each costs it two file descriptors,
/// and the limit (inherited from this process) is all it gets.
fn max_connections() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    (lim.rlim_cur.saturating_sub(200) / 2).max(100)
}

pub(crate) fn free_port() -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

pub(crate) fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
    Ok(p)
}

#[allow(clippy::too_many_arguments)]
fn gateway(
    bins: &Binaries,
    pki: &Files,
    addr: SocketAddr,
    backend: SocketAddr,
    dir: &Path,
    offload: &str,
    workers: usize,
    setup: &Setup,
) -> anyhow::Result<Command> {
    let config = write(
        dir,
        "gateway.toml",
        &format!(
            r#"access_log = "off"
watch_files = false
workers = {workers}
{top}

[[listeners]]
name = "bench"
bind = "{addr}"
cert = "{chain}"
key = "{key}"
client_ca = "{root}"
tls_versions = ["1.3"]
idle_timeout = "10m"
max_connections = {max}
handshake_timeout = "{handshake}s"
offload = "{offload}"

[[listeners.routes]]
name = "backend"
backends = [{backends}]
allow = ["{identity}"]
{tail}
"#,
            chain = pki.server_chain.display(),
            key = pki.server_key.display(),
            root = pki.root.display(),
            identity = crate::pki::CLIENT_IDENTITY,
            backends = std::iter::once(&backend)
                .chain(&setup.more_backends)
                .map(|b| format!("\"{b}\""))
                .collect::<Vec<_>>()
                .join(", "),
            max = setup.max_connections.unwrap_or_else(max_connections),
            handshake = setup.handshake_timeout.unwrap_or(10),
            top = setup.gateway_top,
            tail = setup.gateway_tail,
        ),
    )?;
    let mut c = Command::new(&bins.gateway);
    c.arg("run")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn");
    Ok(c)
}

fn haproxy(
    pki: &Files,
    addr: SocketAddr,
    backend: SocketAddr,
    dir: &Path,
    threads: usize,
    setup: &Setup,
) -> anyhow::Result<Command> {
    let config = write(
        dir,
        "haproxy.cfg",
        &format!(
            "global
    maxconn {maxconn}
    ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256
{tuning}defaults
    mode tcp
    timeout connect 5s
    timeout client {client}
    timeout server 10m
frontend bench
    maxconn {maxconn}
    bind {addr} ssl crt {pem} ca-file {root} verify required ssl-min-ver TLSv1.3 curves P-256
{limits}    default_backend backend
backend backend
    server backend {backend}
{tables}",
            limits = if setup.source_limits {
                "    stick-table type ip size 100k expire 30s store conn_cur,conn_rate(1s)
    tcp-request connection track-sc0 src
    tcp-request connection track-sc1 src,ipmask(24) table prefixes
    tcp-request connection reject if { sc_conn_cur(0) gt 128 } || { sc_conn_rate(0) gt 100 }
    tcp-request connection reject if { sc_conn_cur(1) gt 1024 } || { sc_conn_rate(1) gt 1000 }
"
            } else {
                ""
            },
            tables = if setup.source_limits {
                "backend prefixes
    stick-table type ip size 100k expire 30s store conn_cur,conn_rate(1s)
"
            } else {
                ""
            },
            tuning = config_lines(&tuning(Kind::Haproxy, threads), "    "),
            pem = pki.server_pem_bundle.display(),
            maxconn = setup.max_connections.unwrap_or_else(max_connections),
            client = setup
                .handshake_timeout
                .map_or_else(|| "10m".to_owned(), |s| format!("{s}s")),
            root = pki.root.display(),
        ),
    )?;
    let mut c = Command::new("haproxy");
    c.arg("-db").arg("-f").arg(config);
    Ok(c)
}

fn nginx(
    pki: &Files,
    addr: SocketAddr,
    backend: SocketAddr,
    dir: &Path,
    workers: usize,
    setup: &Setup,
) -> anyhow::Result<Command> {
    // worker_processes goes in the main context, the rest in the server.
    let (main_tuning, server_tuning): (Vec<Tuning>, Vec<Tuning>) = tuning(Kind::Nginx, workers)
        .into_iter()
        .partition(|t| t.line.starts_with("worker_processes"));
    let config = write(
        dir,
        "nginx.conf",
        &format!(
            "load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon off;
{tuning}pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections {worker_connections}; }}
stream {{
{zone}    server {{
{limit}
        listen {addr} ssl;
        ssl_certificate {chain};
        ssl_certificate_key {key};
        ssl_client_certificate {root};
        ssl_verify_client on;
        ssl_verify_depth 3;
        ssl_protocols TLSv1.3;
        ssl_ecdh_curve prime256v1;
        ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256;
        ssl_session_tickets off;
        ssl_handshake_timeout {handshake}s;
        proxy_pass {backend};
        proxy_timeout 10m;
{server_tuning}    }}
}}
",
            dir = dir.display(),
            tuning = config_lines(&main_tuning, ""),
            server_tuning = config_lines(&server_tuning, "        "),
            zone = if setup.source_limits {
                "    limit_conn_zone $binary_remote_addr zone=per_source:10m;\n"
            } else {
                ""
            },
            limit = if setup.source_limits {
                "        limit_conn per_source 128;\n"
            } else {
                ""
            },
            // Each client connection is two of nginx's: client and backend.
            worker_connections = 2 * setup.max_connections.unwrap_or_else(max_connections),
            handshake = setup.handshake_timeout.unwrap_or(60),
            chain = pki.server_chain.display(),
            key = pki.server_key.display(),
            root = pki.root.display(),
        ),
    )?;
    let mut c = Command::new("nginx");
    c.arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(config);
    Ok(c)
}

fn stunnel(
    pki: &Files,
    addr: SocketAddr,
    backend: SocketAddr,
    dir: &Path,
) -> anyhow::Result<Command> {
    let config = write(
        dir,
        "stunnel.conf",
        &format!(
            "foreground = yes
pid =
debug = 3
[bench]
accept = {addr}
connect = {backend}
cert = {chain}
key = {key}
CAfile = {root}
verifyChain = yes
requireCert = yes
sslVersionMin = TLSv1.3
ciphersuites = TLS_AES_128_GCM_SHA256
curves = prime256v1
TIMEOUTidle = 600
{tuning}",
            tuning = config_lines(&tuning(Kind::Stunnel, 1), ""),
            chain = pki.server_chain.display(),
            key = pki.server_key.display(),
            root = pki.root.display(),
        ),
    )?;
    let mut c = Command::new("stunnel4");
    c.arg(config);
    Ok(c)
}

/// Each peer's version line, as it reports it.
pub fn version(kind: Kind, bins: &Binaries) -> String {
    let (cmd, args): (&Path, &[&str]) = match kind {
        Kind::Gateway | Kind::GatewayKtls => (&bins.gateway, &["--version"]),
        Kind::Haproxy => (Path::new("haproxy"), &["-v"]),
        Kind::Nginx => (Path::new("nginx"), &["-v"]),
        Kind::Stunnel => (Path::new("stunnel4"), &["-version"]),
        Kind::Relay => return "splice relay (gateway-bench)".into(),
    };
    let Ok(out) = Command::new(cmd).args(args).stdin(Stdio::null()).output() else {
        return "not installed".into();
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let first = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with("Initializing"))
        .unwrap_or("unknown");
    first.to_owned()
}

/// One throughput knob of a peer, as its own documentation describes it:
/// set in the config (`applied`), or left at its default for the reason
/// given. The report prints them all, so a reader can judge the fairness.
#[derive(Debug, Clone, Serialize)]
pub struct Tuning {
    /// The config line as written (or the default it keeps).
    pub line: String,
    pub applied: bool,
    /// Why, and where the peer's documentation says so.
    pub why: &'static str,
}

fn set(line: String, why: &'static str) -> Tuning {
    Tuning {
        line,
        applied: true,
        why,
    }
}

fn kept(line: &str, why: &'static str) -> Tuning {
    Tuning {
        line: line.to_owned(),
        applied: false,
        why,
    }
}

/// The throughput tuning each peer's documentation recommends, for a peer
/// given `cores` CPUs (documents: HAProxy 2.6's configuration manual from
/// Debian's haproxy-doc; nginx's module reference at nginx.org, which
/// Debian's nginx-doc does not ship; stunnel(8) from stunnel4).
pub fn tuning(kind: Kind, cores: usize) -> Vec<Tuning> {
    match kind {
        Kind::Haproxy => vec![
            set(
                format!("nbthread {cores}"),
                "HAProxy manual §3.1 nbthread: by default one thread per CPU the process is \
                 bound to; written out so the report shows it",
            ),
            kept(
                "tune.bufsize 16384",
                "§3.2 tune.bufsize: \"strongly recommended not to change this from the default \
                 value\"; 16 KiB holds one full TLS record",
            ),
            kept(
                "tune.ssl.maxrecord 0",
                "§3.2 tune.ssl.maxrecord: 0 (no limit) sends full 16 KiB records; a limit is \
                 for page-load latency on slow links, not throughput",
            ),
            kept(
                "tune.rcvbuf.* / tune.sndbuf.* unset",
                "§3.2: \"should normally never be set\"; the kernel auto-tunes them",
            ),
            kept(
                "tune.maxpollevents (200)",
                "§3.2: above 200 trades latency for slightly more bandwidth; the bulk scenarios \
                 have at most 32 busy sockets, so no poll returns more",
            ),
            kept(
                "no option splice-auto",
                "§4.2 option splice-auto: kernel splicing moves bytes socket to socket without \
                 user space; every byte here passes through HAProxy's TLS, so it cannot apply",
            ),
        ],
        Kind::Nginx => vec![
            set(
                format!("worker_processes {cores};"),
                "ngx_core_module worker_processes: \"setting it to the number of available CPU \
                 cores would be a good start\"; nginx 1.22's `auto` counts the online CPUs, not \
                 the ones it is pinned to, so the count is given",
            ),
            kept(
                "proxy_buffer_size 16k;",
                "ngx_stream_proxy_module proxy_buffer_size: the read buffer on each side; its \
                 default holds one full TLS record, and the docs give no throughput advice",
            ),
            kept(
                "no ssl_buffer_size",
                "ngx_http_ssl_module only: the stream module writes TLS records as large as \
                 what it read (up to proxy_buffer_size)",
            ),
            kept(
                "no sendfile",
                "ngx_http_core_module: serves files from disk; a stream proxy relays sockets",
            ),
            kept(
                "ssl_session_tickets off; no ssl_session_cache",
                "ngx_stream_ssl_module: resumption only; every connection here is a full \
                 handshake and the clients never resume",
            ),
        ],
        Kind::Stunnel => vec![
            kept(
                "socket = l:TCP_NODELAY=1, r:TCP_NODELAY=1",
                "stunnel(8) socket: already stunnel's defaults (`stunnel4 -sockets`)",
            ),
            kept(
                "(no throughput options)",
                "stunnel(8) documents no throughput tuning; Debian's build runs a thread per \
                 connection (`Threading:PTHREAD`), nothing to size",
            ),
        ],
        Kind::Gateway | Kind::GatewayKtls | Kind::Relay => Vec::new(),
    }
}

/// The applied lines, indented, one per line.
fn config_lines(tuning: &[Tuning], indent: &str) -> String {
    tuning
        .iter()
        .filter(|t| t.applied)
        .map(|t| format!("{indent}{}\n", t.line))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tuning the report prints is the tuning the peers ran with.
    #[test]
    fn every_tuning_line_the_report_shows_as_set_is_in_the_config_written() {
        let dir = std::env::temp_dir().join(format!("peers-tuning-{}", std::process::id()));
        let pki = crate::pki::create(&dir.join("pki")).expect("pki");
        let (addr, backend) = (
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        let setup = Setup::default();
        haproxy(&pki, addr, backend, &dir, 2, &setup).expect("haproxy config");
        nginx(&pki, addr, backend, &dir, 2, &setup).expect("nginx config");
        stunnel(&pki, addr, backend, &dir).expect("stunnel config");
        for (kind, file) in [
            (Kind::Haproxy, "haproxy.cfg"),
            (Kind::Nginx, "nginx.conf"),
            (Kind::Stunnel, "stunnel.conf"),
        ] {
            let config = std::fs::read_to_string(dir.join(file)).expect("config");
            let tuning = tuning(kind, 2);
            assert!(!tuning.is_empty(), "{kind:?} shows no tuning");
            for t in tuning.iter().filter(|t| t.applied) {
                assert!(
                    config.lines().any(|l| l.trim() == t.line),
                    "{kind:?}: `{}` not in\n{config}",
                    t.line
                );
            }
        }
        assert!(
            tuning(Kind::Haproxy, 2)
                .iter()
                .any(|t| t.line == "nbthread 2")
        );
        assert!(
            tuning(Kind::Nginx, 2)
                .iter()
                .any(|t| t.line == "worker_processes 2;")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

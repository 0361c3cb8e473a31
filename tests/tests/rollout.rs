//! docs/rollout.md, walked as written: every ```sh command runs (through
//! `sh -c`, with the built `gateway` first on PATH), every ```toml block is
//! saved as the config, in the guide's order, and each `<!-- walk: NAME -->`
//! marker asserts what the user would see at that point (traffic allowed
//! or refused, access-log lines, stderr lines, metrics). A command that
//! fails, a marker this test does not know, or a marker the guide lost
//! fails the test: the guide cannot drift from the product.
//!
//! What is mapped, and nothing else: the guide's directories
//! (`/etc/gateway`, `/var/log/gateway`, `/run/gateway`, `/var/lib/gateway`)
//! into a temporary one; its addresses to loopback (the listener's `:8443`
//! and the admin endpoint's `:9901` to free ports, the backends' `10.0.x.x` addresses
//! to backends this test runs). `gateway run …` is started in the
//! background, as the user would in another terminal, and killed at the
//! end, failure or not.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use gateway_tests::*;
use rustls::AlertDescription;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The guide promises that a revoked laptop's connections close within a
/// second of `gateway pki revoke`.
const REVOCATION_BOUND: Duration = Duration::from_secs(1);

/// A shell command may take this long (s_client waits for the backend).
const COMMAND_LIMIT: Duration = Duration::from_secs(20);

#[derive(Debug)]
enum Step {
    Sh(Vec<String>),
    Toml(String),
    Check(String),
}

/// The guide's steps in order: shell commands (continuation lines joined,
/// comments dropped), config files, and markers. Other fences (ini, text)
/// are for reading only.
fn steps(guide: &str) -> Vec<Step> {
    let mut out = Vec::new();
    let mut lines = guide.lines();
    while let Some(line) = lines.next() {
        if let Some(name) = line
            .trim()
            .strip_prefix("<!-- walk:")
            .and_then(|l| l.strip_suffix("-->"))
        {
            out.push(Step::Check(name.trim().to_owned()));
            continue;
        }
        let Some(lang) = line.strip_prefix("```") else {
            continue;
        };
        let body: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
        match lang.trim() {
            "sh" => {
                let mut commands = Vec::new();
                let mut current = String::new();
                for l in body {
                    let l = l.trim();
                    if current.is_empty() && (l.is_empty() || l.starts_with('#')) {
                        continue;
                    }
                    match l.strip_suffix('\\') {
                        Some(part) => current.push_str(part),
                        None => {
                            current.push_str(l);
                            commands.push(std::mem::take(&mut current));
                        }
                    }
                }
                out.push(Step::Sh(commands));
            }
            "toml" => out.push(Step::Toml(body.join("\n") + "\n")),
            _ => {}
        }
    }
    out
}

/// A command the guide ran, with what it printed and when it ended.
struct Ran {
    command: String,
    stdout: String,
    ended: Instant,
}

/// A client held open through the gateway, reporting when the gateway
/// closed it.
struct Held {
    port: u16,
    closed: tokio::sync::oneshot::Receiver<Instant>,
}

struct Walk {
    root: tempfile::TempDir,
    /// (in the guide, on this machine)
    map: Vec<(String, String)>,
    gateway_port: u16,
    orders: Vec<TcpListener>,
    orders_handshakes: Arc<AtomicUsize>,
    admin_backend: Option<TcpListener>,
    gateway: Option<std::process::Child>,
    ran: Vec<Ran>,
    held_anonymous: Option<Held>,
    held_alice: Option<Held>,
}

impl Drop for Walk {
    fn drop(&mut self) {
        if let Some(mut g) = self.gateway.take() {
            let _ = g.kill();
            let _ = g.wait();
        }
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

impl Walk {
    async fn new() -> Walk {
        let root = tempfile::tempdir().expect("tempdir");
        let gateway_port = free_port();
        let admin_port = free_port();
        let mut orders = Vec::new();
        for _ in 0..2 {
            orders.push(TcpListener::bind("127.0.0.1:0").await.expect("bind"));
        }
        let admin_backend = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let dir = |d: &str| root.path().join(d).display().to_string();
        let addr = |l: &TcpListener| l.local_addr().expect("addr").to_string();
        let map = vec![
            ("/etc/gateway".into(), dir("etc/gateway")),
            ("/var/log/gateway".into(), dir("var/log/gateway")),
            ("/run/gateway".into(), dir("run/gateway")),
            ("/var/lib/gateway".into(), dir("var/lib/gateway")),
            ("0.0.0.0:8443".into(), format!("127.0.0.1:{gateway_port}")),
            ("127.0.0.1:8443".into(), format!("127.0.0.1:{gateway_port}")),
            ("127.0.0.1:9901".into(), format!("127.0.0.1:{admin_port}")),
            ("10.0.1.10:9443".into(), addr(&orders[0])),
            ("10.0.1.11:9443".into(), addr(&orders[1])),
            ("10.0.2.10:8080".into(), addr(&admin_backend)),
        ];
        Walk {
            root,
            map,
            gateway_port,
            orders,
            orders_handshakes: Arc::default(),
            admin_backend: Some(admin_backend),
            gateway: None,
            ran: Vec::new(),
            held_anonymous: None,
            held_alice: None,
        }
    }

    fn local(&self, text: &str) -> String {
        self.map
            .iter()
            .fold(text.to_owned(), |t, (from, to)| t.replace(from, to))
    }

    fn etc(&self, rel: &str) -> PathBuf {
        self.root.path().join("etc/gateway").join(rel)
    }

    fn stderr_path(&self) -> PathBuf {
        self.root.path().join("gateway.stderr")
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr_path()).unwrap_or_default()
    }

    fn access_log(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.root.path().join("var/log/gateway/access.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("access log lines are JSON"))
            .collect()
    }

    fn reloads(&self) -> usize {
        self.stderr().matches("gateway::app: reloaded").count()
    }

    /// What the last command containing `needle` printed.
    fn output_of(&self, needle: &str) -> &Ran {
        self.ran
            .iter()
            .rev()
            .find(|r| r.command.contains(needle))
            .unwrap_or_else(|| panic!("the guide ran no command with {needle:?}"))
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.gateway_port))
    }

    async fn step(&mut self, step: Step) {
        match step {
            Step::Toml(text) => {
                let text = self.local(&text);
                assert!(
                    !text.contains("10.0.") && !text.contains("0.0.0.0"),
                    "a config address the walk does not map to loopback:\n{text}"
                );
                std::fs::write(self.etc("gateway.toml"), text).expect("write the config");
            }
            Step::Sh(commands) => {
                for c in commands {
                    self.sh(&c).await;
                }
            }
            Step::Check(name) => self.check(&name).await,
        }
    }

    async fn sh(&mut self, guide_command: &str) {
        let command = self.local(guide_command);
        if command.starts_with("gateway run ") {
            return self.start_gateway(&command).await;
        }
        let reloads = self.reloads();
        let bin_dir = gateway_binary().parent().expect("bin dir").to_owned();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut child = Command::new("sh")
            .args(["-c", &command])
            .env("PATH", path)
            .current_dir(self.root.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sh");
        let until = Instant::now() + COMMAND_LIMIT;
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            if Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                panic!("`{guide_command}` hung");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let ended = Instant::now();
        let read = |r: Option<&mut dyn std::io::Read>| {
            let mut s = String::new();
            if let Some(r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        };
        let stdout = read(child.stdout.as_mut().map(|s| s as _));
        let stderr = read(child.stderr.as_mut().map(|s| s as _));
        assert!(
            status.success(),
            "the guide's `{guide_command}` failed ({status}):\n{stdout}\n{stderr}\ngateway:\n{}",
            self.stderr()
        );
        if guide_command.contains("kill -HUP") {
            self.wait_for("the reload", |w| w.reloads() > reloads);
        }
        self.ran.push(Ran {
            command: guide_command.to_owned(),
            stdout,
            ended,
        });
    }

    async fn start_gateway(&mut self, command: &str) {
        let args: Vec<&str> = command.split_whitespace().skip(1).collect();
        let child = Command::new(gateway_binary())
            .args(&args)
            .stderr(std::fs::File::create(self.stderr_path()).expect("stderr file"))
            .spawn()
            .expect("gateway run");
        self.gateway = Some(child);
        let addr = self.addr();
        let until = Instant::now() + STEP;
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if let Some(g) = self.gateway.as_mut()
                && let Some(status) = g.try_wait().expect("wait")
            {
                panic!("gateway run exited {status}:\n{}", self.stderr());
            }
            assert!(Instant::now() < until, "not listening:\n{}", self.stderr());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn wait_for(&self, what: &str, done: impl Fn(&Walk) -> bool) {
        let until = Instant::now() + STEP;
        while !done(self) {
            assert!(
                Instant::now() < until,
                "timed out waiting for {what}; gateway:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A client trusting the services CA (the gateway's server certificate),
    /// presenting `creds` (PKI-relative `dir/name`) when given.
    fn client(&self, creds: Option<&str>) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(self.etc("pki/services/ca.pem")).expect("ca") {
            roots.add(c.expect("ca")).expect("ca");
        }
        let b = rustls::ClientConfig::builder_with_provider(gateway::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots);
        Arc::new(match creds {
            Some(name) => {
                let chain = CertificateDer::pem_file_iter(self.etc(&format!("pki/{name}.pem")))
                    .expect("chain")
                    .collect::<Result<Vec<_>, _>>()
                    .expect("chain");
                let key = PrivateKeyDer::from_pem_file(self.etc(&format!("pki/{name}.key")))
                    .expect("key");
                b.with_client_auth_cert(chain, key).expect("client auth")
            }
            None => b.with_no_client_auth(),
        })
    }

    /// A connection that sends half a line and waits: live until the
    /// gateway closes it.
    async fn hold(&self, sni: &str, creds: Option<&str>) -> Held {
        let mut tls = connect(self.addr(), sni, self.client(creds))
            .await
            .expect("connect");
        let port = tls.get_ref().0.local_addr().expect("addr").port();
        tls.write_all(b"held").await.expect("write");
        tls.flush().await.expect("flush");
        let (tx, closed) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut rest = Vec::new();
            let _ = tls.read_to_end(&mut rest).await;
            let _ = tx.send(Instant::now());
        });
        Held { port, closed }
    }

    async fn check(&mut self, name: &str) {
        let addr = self.addr();
        match name {
            "pki-ready" => {
                for f in [
                    "pki/services/ca.pem",
                    "pki/services/crl.pem",
                    "pki/services/gateway.pem",
                    "pki/devices/ca.pem",
                ] {
                    assert!(self.etc(f).is_file(), "{f} missing");
                }
            }
            "backends-require-client-certificates" => {
                let config = backend_tls(
                    &self.etc("pki/services/orders-backend.pem"),
                    &self.etc("pki/services/orders-backend.key"),
                    &self.etc("pki/services/ca.pem"),
                );
                for l in std::mem::take(&mut self.orders) {
                    serve_one_line_tls(l, config.clone(), self.orders_handshakes.clone());
                }
                serve_one_line(self.admin_backend.take().expect("admin backend"));
            }
            "stage-1-flows" => {
                assert_eq!(self.output_of("s_client").stdout, "ping\n");
                assert_eq!(
                    self.orders_handshakes.load(Ordering::SeqCst),
                    1,
                    "the backend took the gateway's client certificate"
                );
            }
            "stage-2-audit" => {
                assert_eq!(self.output_of("frontend.key").stdout, "ping\n");
                // A caller not migrated yet: passes, and is audited.
                passes(
                    addr,
                    "orders.example.internal",
                    self.client(None),
                    b"legacy\n",
                )
                .await;
                self.wait_for("the audit line", |w| {
                    w.access_log().iter().any(|r| {
                        r["verdict"] == "audit"
                            && r["reason"] == "would deny: client presented no certificate"
                    })
                });
                self.held_anonymous = Some(self.hold("orders.example.internal", None).await);
            }
            "stage-2-watched" => {
                let jq = &self.output_of("jq -c").stdout;
                assert!(
                    jq.contains("\"reason\":\"would deny: client presented no certificate\""),
                    "{jq}"
                );
                let curl = &self.output_of("verdict=\"audit\"").stdout;
                let count: u64 = curl
                    .lines()
                    .find(|l| l.contains("route=\"orders\""))
                    .and_then(|l| l.rsplit(' ').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("no audit count for orders:\n{curl}"));
                assert!(count >= 1, "{curl}");
                let report = &self.output_of("rollout report").stdout;
                assert!(
                    report.starts_with("route orders (listener edge): audit\n")
                        && report.contains(
                            "  clients seen: 2 (connections: 1 let in, 2 would be refused)\n"
                        )
                        && report.contains(
                            "    (no certificate)  from 127.0.0.0/24  no_certificate  "
                        )
                        && report.ends_with(
                            "  verdict: not ready: 1 identity would be refused in the last 7d: (no certificate)\n"
                        ),
                    "{report}"
                );
            }
            "stage-2-previewed" => {
                // The certificate-less connection held since stage 2's
                // audit is the one the switch would close, and is still
                // open: the preview changed nothing.
                let held = self.held_anonymous.as_ref().expect("held");
                let preview = &self.output_of("--against").stdout;
                let close = format!(
                    "  edge/orders no certificate from 127.0.0.1:{} (age ",
                    held.port
                );
                assert!(
                    preview.contains("live connections it would close: 1\n")
                        && preview.contains(&close)
                        && preview.contains(
                            "s): route now enforces and the client presented no certificate\n"
                        )
                        && preview.contains("  edge/orders: mode audit -> enforce\n")
                        && preview.contains("clients seen in the last 7d it would refuse: 1\n")
                        && preview.contains("reload guard: off (no max_reload_closes)\n"),
                    "{preview}"
                );
                assert!(held.closed.is_empty(), "the preview closed nothing");
            }
            "stage-2-enforced" => {
                let held = self.held_anonymous.take().expect("held");
                tokio::time::timeout(STEP, held.closed)
                    .await
                    .expect("the reload closes the certificate-less connection")
                    .expect("closed");
                let prefix = "no longer allowed after reload: ";
                let why = "route now enforces and the client presented no certificate";
                self.wait_for("its access-log line", |w| {
                    w.access_log().iter().any(|r| {
                        r["client"] == format!("127.0.0.1:{}", held.port)
                            && r["reason"]
                                .as_str()
                                .is_some_and(|s| s.contains(&format!("{prefix}{why}")))
                    })
                });
                let stderr = self.stderr();
                assert!(
                    stderr.lines().any(|l| l.contains("closing live connection")
                        && l.contains(&format!("client=127.0.0.1:{}", held.port))
                        && l.contains(prefix)),
                    "{stderr}"
                );
                assert_eq!(
                    refusal(addr, "orders.example.internal", self.client(None)).await,
                    AlertDescription::CertificateRequired
                );
                passes(
                    addr,
                    "orders.example.internal",
                    self.client(Some("services/frontend")),
                    b"still\n",
                )
                .await;
            }
            "stage-2-reverted" => {
                let history = &self.output_of("rollout history").stdout;
                let lines: Vec<&str> = history.lines().collect();
                assert_eq!(lines.len(), 3, "{history}");
                for (line, (number, how)) in lines.iter().zip([
                    ("*    3", "reload"),
                    ("     2", "reload"),
                    ("     1", "start"),
                ]) {
                    assert!(
                        line.starts_with(&format!("{number}  "))
                            && line.contains(&format!("  {how}  "))
                            && line.contains("  config sha256:")
                            && line.ends_with("  files unchanged"),
                        "{history}"
                    );
                }
                let revert = &self.output_of("rollout revert").stdout;
                assert!(
                    revert.starts_with("reverted to revision 2 (now revision 4): "),
                    "{revert}"
                );
                // Audit again: the caller without a certificate passes,
                // and the file says so for the next reload.
                passes(
                    addr,
                    "orders.example.internal",
                    self.client(None),
                    b"again\n",
                )
                .await;
                let config = std::fs::read_to_string(self.etc("gateway.toml")).expect("config");
                assert!(config.contains("mode = \"audit\""), "{config}");
            }
            "stage-3-audit" => {
                assert_eq!(self.output_of("alice-laptop.key").stdout, "ping\n");
                // A service certificate on the people's route: would be denied.
                passes(
                    addr,
                    "admin.example.internal",
                    self.client(Some("services/frontend")),
                    b"service\n",
                )
                .await;
            }
            "stage-3-enforced" => {
                let jq = &self.output_of("jq -c 'select(.route == \"admin\"").stdout;
                assert!(
                    jq.contains(
                        "would deny: client certificate refused: not issued by the device CA"
                    ),
                    "{jq}"
                );
                assert_eq!(
                    refusal(
                        addr,
                        "admin.example.internal",
                        self.client(Some("services/frontend"))
                    )
                    .await,
                    AlertDescription::UnknownCA
                );
                passes(
                    addr,
                    "admin.example.internal",
                    self.client(Some("devices/alice-laptop")),
                    b"alice\n",
                )
                .await;
                // Device certificates stay off the services' route.
                assert_eq!(
                    refusal(
                        addr,
                        "orders.example.internal",
                        self.client(Some("devices/alice-laptop"))
                    )
                    .await,
                    AlertDescription::UnknownCA
                );
                self.held_alice = Some(
                    self.hold("admin.example.internal", Some("devices/alice-laptop"))
                        .await,
                );
            }
            "revoked" => {
                let revoked_at = self.output_of("pki revoke").ended;
                let held = self.held_alice.take().expect("held");
                let closed_at = tokio::time::timeout(STEP, held.closed)
                    .await
                    .expect("revocation closes the laptop's connection")
                    .expect("closed");
                let took = closed_at.saturating_duration_since(revoked_at);
                eprintln!("rollout walk: revocation closed the connection {took:?} after revoke");
                assert!(
                    took <= REVOCATION_BOUND,
                    "the guide promises within {REVOCATION_BOUND:?}, took {took:?}; gateway:\n{}",
                    self.stderr()
                );
                self.wait_for("its access-log line", |w| {
                    w.access_log().iter().any(|r| {
                        r["client"] == format!("127.0.0.1:{}", held.port)
                            && r["reason"].as_str().is_some_and(|s| {
                                s.contains("no longer allowed after reload: ")
                                    && s.contains("Revoked")
                            })
                    })
                });
                assert_eq!(
                    refusal(
                        addr,
                        "admin.example.internal",
                        self.client(Some("devices/alice-laptop"))
                    )
                    .await,
                    AlertDescription::CertificateRevoked
                );
            }
            "expiry" => {
                let check = &self.output_of("--fail-within").stdout;
                assert!(
                    check.contains("warning: route orders upstream_tls cert")
                        && check.ends_with(": OK\n"),
                    "{check}"
                );
                // A CRL published just now for 7 days does not read "6 days".
                let crl_lines: Vec<&str> =
                    check.lines().filter(|l| l.contains(" crl CRL")).collect();
                assert_eq!(crl_lines.len(), 2, "{check}");
                assert!(
                    crl_lines
                        .iter()
                        .all(|l| l.contains("expires in 6 days 23 hours")
                            || l.contains("expires in 7 days;")),
                    "{check}"
                );
                let curl = &self.output_of("gateway_(certificate_expiry").stdout;
                assert!(
                    curl.contains(
                        "gateway_certificate_expiry_seconds{role=\"route orders upstream_tls cert\""
                    ) && curl.contains("gateway_crl_next_update_seconds{"),
                    "{curl}"
                );
                // Fresh CRLs and a 30-day certificate are within 30 days but
                // not inside their warning window.
                assert_eq!(self.output_of("readyz?strict").stdout, "ready\n");
            }
            other => panic!("docs/rollout.md has a walk marker this test does not know: {other}"),
        }
    }
}

/// The orders backends' TLS: their certificate from the guide's PKI, and a
/// client certificate required, chaining to the services CA.
fn backend_tls(cert: &Path, key: &Path, ca: &Path) -> Arc<rustls::ServerConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("ca") {
        roots.add(c.expect("ca")).expect("ca");
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        gateway::tls::provider(),
    )
    .build()
    .expect("verifier");
    let chain = CertificateDer::pem_file_iter(cert)
        .expect("chain")
        .collect::<Result<Vec<_>, _>>()
        .expect("chain");
    Arc::new(
        rustls::ServerConfig::builder_with_provider(gateway::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, PrivateKeyDer::from_pem_file(key).expect("key"))
            .expect("server config"),
    )
}

/// Answers one line with the same line and closes, as a service would
/// answer one request: `openssl s_client` exits when it closes.
async fn one_line<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: S) {
    let mut s = tokio::io::BufReader::new(s);
    let mut line = String::new();
    if s.read_line(&mut line).await.is_ok() {
        let _ = s.get_mut().write_all(line.as_bytes()).await;
    }
    let _ = s.get_mut().shutdown().await;
}

fn serve_one_line_tls(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    handshakes: Arc<AtomicUsize>,
) {
    tokio::spawn(async move {
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, handshakes) = (acceptor.clone(), handshakes.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    handshakes.fetch_add(1, Ordering::SeqCst);
                    one_line(tls).await;
                }
            });
        }
    });
}

fn serve_one_line(listener: TcpListener) {
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(one_line(tcp));
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_rollout_guide_runs_as_written() {
    let guide =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/rollout.md"))
            .expect("docs/rollout.md");
    let steps = steps(&guide);
    let markers: Vec<String> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Check(n) => Some(n.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        markers,
        [
            "pki-ready",
            "backends-require-client-certificates",
            "stage-1-flows",
            "stage-2-audit",
            "stage-2-watched",
            "stage-2-previewed",
            "stage-2-enforced",
            "stage-2-reverted",
            "stage-3-audit",
            "stage-3-enforced",
            "revoked",
            "expiry",
        ],
        "the guide's checkpoints"
    );
    let started = Instant::now();
    let mut walk = Walk::new().await;
    for step in steps {
        walk.step(step).await;
    }
    // The gateway ends in enforce mode on both routes.
    let config = std::fs::read_to_string(walk.etc("gateway.toml")).expect("config");
    assert_eq!(config.matches("mode = \"enforce\"").count(), 2, "{config}");
    assert!(!config.contains("mode = \"audit\""), "{config}");
    eprintln!("rollout walk: {:?}", started.elapsed());
}

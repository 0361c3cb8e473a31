//! Harness for the end-to-end tests: a PKI on disk, echo backends that count
//! who reached them, the whole gateway in-process, and mTLS clients.
//!
//! Everything binds to 127.0.0.1 on ephemeral ports and is torn down when its
//! value drops, so tests run in parallel without stepping on each other.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

pub mod attack;
pub mod bpf;
pub mod cost;
pub mod dashboard;
pub mod etcd;
pub mod netns;
pub mod packet;
pub mod process;
pub mod wire;

use gateway::access_log::AccessRecord;
use gateway::pki::{Authority, Issued, LeafSpec};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

pub mod raw;

/// How long any single step of a test may take before it counts as hung.
pub const STEP: Duration = Duration::from_secs(20);

/// A temporary directory beside the test binary (target/…/deps), not in
/// /tmp: a start as root with `user` refuses a config below a directory
/// that user, or anyone, may write, /tmp (sticky) included. The target
/// directory's are whoever built it's: root's when root runs the tests
/// that start the gateway as root.
pub fn root_only_tempdir() -> tempfile::TempDir {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe.parent().expect("the test binary's directory");
    tempfile::Builder::new()
        .tempdir_in(dir)
        .expect("a temporary directory beside the test binary")
}

/// Root → intermediate → leaves, written to a temporary directory.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub root: Authority,
    pub intermediate: Authority,
}

/// A client's credentials: leaf + intermediate chain and key.
#[derive(Clone)]
pub struct ClientCreds {
    pub chain: Vec<CertificateDer<'static>>,
    pub key_pem: String,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

pub const SPIFFE_FRONTEND: &str = "spiffe://example.internal/ns/shop/sa/frontend";
pub const SPIFFE_OTHER: &str = "spiffe://example.internal/ns/shop/sa/intruder";

impl Pki {
    /// A PKI with the server's chain, key and client CA bundle on disk:
    /// `server-chain.pem`, `server.key`, `client-roots.pem`.
    pub fn new() -> Pki {
        Pki::in_dir(tempfile::tempdir().expect("tempdir"))
    }

    /// `Pki::new` in `root_only_tempdir`: for a gateway started as root
    /// with `user` and its config in the PKI's directory.
    pub fn new_root_only() -> Pki {
        Pki::in_dir(root_only_tempdir())
    }

    fn in_dir(dir: tempfile::TempDir) -> Pki {
        let root = Authority::root("gateway test root").expect("root");
        let intermediate = root
            .intermediate("gateway test intermediate")
            .expect("intermediate");
        let pki = Pki {
            dir,
            root,
            intermediate,
        };
        let server = pki
            .intermediate
            .issue(&LeafSpec::server(
                "gateway.example.internal",
                &[
                    "dns:orders.example.internal",
                    "dns:billing.example.internal",
                    "dns:gateway.example.internal",
                ],
            ))
            .expect("server leaf");
        pki.write(
            "server-chain.pem",
            &format!("{}{}", server.cert_pem, pki.intermediate.cert_pem),
        );
        pki.write("server.key", &server.key_pem);
        pki.write("client-roots.pem", &pki.root.cert_pem);
        pki.write("server-roots.pem", &pki.root.cert_pem);
        pki
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a file of the PKI; a key (NAME.key) readable by its owner
    /// only, as the gateway demands and `gateway pki` writes them.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let p = self.path(name);
        std::fs::write(&p, contents).expect("write pki file");
        if name.ends_with(".key") {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                .expect("key mode 0600");
        }
        p
    }

    /// The allowed client's identity in a certificate of its own, and the
    /// serial a CRL would revoke it by.
    pub fn revocable_frontend(&self, name: &str) -> (ClientCreds, Vec<u8>) {
        let issued = self
            .intermediate
            .issue(&LeafSpec::client("frontend", &[SPIFFE_FRONTEND]))
            .expect("client leaf");
        let serial = issued.serial.clone();
        (self.creds(name, &issued, &self.intermediate), serial)
    }

    /// A listener's `crls = [...]` line naming these files of the PKI.
    pub fn crls_line(&self, files: &[&str]) -> String {
        let paths: Vec<String> = files
            .iter()
            .map(|f| format!("{:?}", self.path(f).display().to_string()))
            .collect();
        format!("crls = [{}]", paths.join(", "))
    }

    /// A client certificate issued by the intermediate, sent with it.
    pub fn client(&self, name: &str, spec: &LeafSpec) -> ClientCreds {
        let issued = self.intermediate.issue(spec).expect("client leaf");
        self.creds(name, &issued, &self.intermediate)
    }

    pub fn creds(&self, name: &str, issued: &Issued, issuer: &Authority) -> ClientCreds {
        let chain_pem = format!("{}{}", issued.cert_pem, issuer.cert_pem);
        let cert_path = self.write(&format!("{name}.pem"), &chain_pem);
        let key_path = self.write(&format!("{name}.key"), &issued.key_pem);
        ClientCreds {
            chain: CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .expect("client chain"),
            key_pem: issued.key_pem.clone(),
            cert_path,
            key_path,
        }
    }

    /// A client offering exactly one cipher suite at one version, presenting
    /// the allowed client's certificate.
    pub fn client_with_suite(
        &self,
        version: &'static rustls::SupportedProtocolVersion,
        suite: rustls::CipherSuite,
    ) -> Arc<ClientConfig> {
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        provider.cipher_suites.retain(|s| s.suite() == suite);
        assert_eq!(provider.cipher_suites.len(), 1, "{suite:?} exists");
        let creds = self.frontend();
        let mut roots = RootCertStore::empty();
        roots.add(self.root_der()).expect("root");
        let config = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[version])
            .expect("version")
            .with_root_certificates(roots)
            .with_client_auth_cert(creds.chain.clone(), creds.key())
            .expect("client auth");
        Arc::new(config)
    }

    /// A client config presenting the allowed client's certificate.
    pub fn frontend_config(&self) -> Arc<ClientConfig> {
        self.client_config(Some(&self.frontend()))
    }

    /// The allowed client of the standard config.
    pub fn frontend(&self) -> ClientCreds {
        self.client(
            "frontend",
            &LeafSpec::client("frontend", &[SPIFFE_FRONTEND]),
        )
    }

    /// A client config trusting our root, presenting `creds` (None: no certificate).
    pub fn client_config(&self, creds: Option<&ClientCreds>) -> Arc<ClientConfig> {
        self.client_config_versions(creds, rustls::DEFAULT_VERSIONS)
    }

    /// A client config presenting `creds` as they are: rustls' own check
    /// of the certificate against the key (which refuses, say, a leaf with
    /// an unknown critical extension) is skipped, so the gateway sees it.
    pub fn client_config_unchecked(&self, creds: &ClientCreds) -> Arc<ClientConfig> {
        self.client_config_unchecked_versions(creds, rustls::DEFAULT_VERSIONS)
    }

    /// `client_config_unchecked`, offering only `versions`.
    pub fn client_config_unchecked_versions(
        &self,
        creds: &ClientCreds,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.root_der()).expect("root");
        let provider = gateway::tls::provider();
        let key = provider
            .key_provider
            .load_private_key(creds.key())
            .expect("client key");
        let certified = rustls::sign::CertifiedKey::new(creds.chain.clone(), key);
        let config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots)
            .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
        Arc::new(config)
    }

    pub fn client_config_versions(
        &self,
        creds: Option<&ClientCreds>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.root.cert_pem.as_bytes()).expect("root pem"))
            .expect("root");
        let builder = ClientConfig::builder_with_provider(gateway::tls::provider())
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots);
        let config = match creds {
            Some(c) => builder
                .with_client_auth_cert(
                    c.chain.clone(),
                    PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).expect("key"),
                )
                .expect("client auth"),
            None => builder.with_no_client_auth(),
        };
        Arc::new(config)
    }
}

impl Pki {
    /// The test root as a trust anchor.
    pub fn root_der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(self.root.cert_pem.as_bytes()).expect("root pem")
    }
}

impl ClientCreds {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).expect("key pem")
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

/// A backend that echoes what it reads and half-closes when the client does,
/// counting the connections that reached it.
pub struct EchoBackend {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl EchoBackend {
    pub async fn start() -> EchoBackend {
        Self::start_on("127.0.0.1:0".parse().expect("address")).await
    }

    /// An echo backend on `addr` (a backend coming back on its old port).
    pub async fn start_on(addr: SocketAddr) -> EchoBackend {
        let listener = TcpListener::bind(addr).await.expect("bind backend");
        let addr = listener.local_addr().expect("backend addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        EchoBackend {
            addr,
            accepted,
            task,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A backend that speaks TLS itself (with a certificate for `names` from the
/// test PKI), optionally requires a client certificate chaining to the test
/// root, and echoes.
pub async fn tls_echo_backend(
    pki: &Pki,
    names: &[&str],
    require_client: bool,
) -> (SocketAddr, Arc<AtomicUsize>) {
    tls_echo_backend_with(pki, names, require_client, rustls::DEFAULT_VERSIONS, |_| {
        true
    })
    .await
}

/// `tls_echo_backend` speaking only `versions` and the suites `suites` keeps.
pub async fn tls_echo_backend_with(
    pki: &Pki,
    names: &[&str],
    require_client: bool,
    versions: &[&'static rustls::SupportedProtocolVersion],
    suites: fn(&rustls::SupportedCipherSuite) -> bool,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let config = backend_server_config(pki, names, require_client, versions, suites);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let (mut r, mut w) = tokio::io::split(tls);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, accepted)
}

/// A backend's TLS server config: a certificate for `names` from the test
/// PKI, client certificates chaining to the test root required or not.
pub fn backend_server_config(
    pki: &Pki,
    names: &[&str],
    require_client: bool,
    versions: &[&'static rustls::SupportedProtocolVersion],
    suites: fn(&rustls::SupportedCipherSuite) -> bool,
) -> Arc<rustls::ServerConfig> {
    let sans: Vec<String> = names.iter().map(|n| format!("dns:{n}")).collect();
    let sans: Vec<&str> = sans.iter().map(String::as_str).collect();
    let leaf = pki
        .intermediate
        .issue(&LeafSpec::server("backend", &sans))
        .expect("backend leaf");
    let chain = vec![
        CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).expect("leaf"),
        CertificateDer::from_pem_slice(pki.intermediate.cert_pem.as_bytes()).expect("int"),
    ];
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key");
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites.retain(suites);
    let builder = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .expect("versions");
    let builder = if require_client {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(pki.root.cert_pem.as_bytes()).expect("root"))
            .expect("root");
        builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                gateway::tls::provider(),
            )
            .build()
            .expect("verifier"),
        )
    } else {
        builder.with_no_client_auth()
    };
    Arc::new(builder.with_single_cert(chain, key).expect("server config"))
}

/// A backend that reads the PROXY v2 header off each connection (exactly
/// its bytes, by the length it announces), reports it, then echoes the
/// rest, in TLS when given a config.
pub async fn proxy_header_backend(
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
) -> (SocketAddr, tokio::sync::mpsc::Receiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let tx = tx.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let mut fixed = [0u8; 16];
                if tcp.read_exact(&mut fixed).await.is_err() {
                    return;
                }
                let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
                let mut header = fixed.to_vec();
                header.resize(16 + len, 0);
                if tcp.read_exact(&mut header[16..]).await.is_err() {
                    return;
                }
                let _ = tx.send(header).await;
                match tls {
                    None => {
                        let (mut r, mut w) = tcp.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                        let _ = w.shutdown().await;
                    }
                    Some(config) => {
                        let Ok(tls) = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await
                        else {
                            return;
                        };
                        let (mut r, mut w) = tokio::io::split(tls);
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                        let _ = w.shutdown().await;
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// A port on 127.0.0.1 where nothing listens.
pub fn dead_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// The standard listener config block for `pki`, bound to an ephemeral port.
pub fn listener_toml(pki: &Pki, name: &str, extra: &str) -> String {
    format!(
        r#"
[[listeners]]
name = "{name}"
bind = "127.0.0.1:0"
cert = "{cert}"
key = "{key}"
client_ca = "{ca}"
{extra}
"#,
        cert = pki.path("server-chain.pem").display(),
        key = pki.path("server.key").display(),
        ca = pki.path("client-roots.pem").display(),
    )
}

/// A route block: `server_names` empty makes it the default route.
pub fn route_toml(
    name: &str,
    server_names: &[&str],
    backends: &[SocketAddr],
    allow: &[&str],
) -> String {
    let q = |v: Vec<String>| {
        v.iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "\n[[listeners.routes]]\nname = \"{name}\"\nserver_names = [{}]\nbackends = [{}]\nallow = [{}]\n",
        q(server_names.iter().map(|s| s.to_string()).collect()),
        q(backends.iter().map(|a| a.to_string()).collect()),
        q(allow.iter().map(|s| s.to_string()).collect()),
    )
}

/// The gateway, built from TOML through the library and running in this process.
pub struct RunningGateway {
    pub app_addr: SocketAddr,
    /// The admin endpoint, when the config has `admin`.
    pub admin_addr: Option<SocketAddr>,
    /// `admin_socket`, when the config has one.
    pub admin_socket: Option<PathBuf>,
    pub reload: gateway::app::ReloadHandle,
    pub registry: Arc<gateway::registry::Registry>,
    /// The eBPF guard, when the config enables it.
    pub guard: Option<Arc<gateway::guard::Guard>>,
    /// The first listener's routes, for their counters.
    pub routes: Vec<Arc<gateway::state::Route>>,
    pub shutdown: gateway::ShutdownHandle,
    pub log: broadcast::Receiver<AccessRecord>,
    pub task: Option<JoinHandle<()>>,
    /// With `start_on_own_thread`: the thread the whole gateway runs on.
    pub thread_id: Option<i32>,
    /// With `start_on_own_thread`: set once `run` returned.
    pub thread_stopped: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl RunningGateway {
    /// `toml` may leave out `access_log`; it defaults to "off" here.
    pub async fn start(pki: &Pki, toml: &str) -> RunningGateway {
        let config = Self::config(pki, toml);
        let app = gateway::build(&config)
            .await
            .unwrap_or_else(|e| panic!("gateway failed to start: {e}"));
        let mut gw = Self::handles(&config, &app);
        gw.task = Some(tokio::spawn(app.run()));
        gw
    }

    /// Like `start`, but the gateway runs alone on a thread of its own (a
    /// single-threaded runtime), so what that thread reads and writes
    /// (`thread_io`) is the gateway's I/O and nobody else's.
    pub fn start_on_own_thread(pki: &Pki, toml: &str) -> RunningGateway {
        let config = Self::config(pki, toml);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let app = gateway::build(&config)
                    .await
                    .unwrap_or_else(|e| panic!("gateway failed to start: {e}"));
                let mut gw = Self::handles(&config, &app);
                // SAFETY: gettid has no preconditions.
                gw.thread_id = Some(unsafe { libc::gettid() });
                let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
                gw.thread_stopped = Some(stopped.clone());
                let _ = tx.send(gw);
                app.run().await;
                stopped.store(true, Ordering::SeqCst);
            });
        });
        rx.recv_timeout(STEP).expect("gateway thread started")
    }

    /// Asks the gateway to shut down and says whether it finished (drained,
    /// closed what was left, returned from `run`) within `limit`.
    pub async fn shuts_down_within(&mut self, limit: Duration) -> bool {
        self.shutdown.shutdown();
        if let Some(task) = self.task.take() {
            return tokio::time::timeout(limit, task).await.is_ok();
        }
        let stopped = self.thread_stopped.clone().expect("a task or a thread");
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if stopped.load(Ordering::SeqCst) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Bytes the gateway's own thread has read and written through
    /// read/write-family system calls (splice does not count), from
    /// /proc/self/task/<tid>/io.
    pub fn thread_io(&self) -> (u64, u64) {
        let tid = self.thread_id.expect("started with start_on_own_thread");
        let io = std::fs::read_to_string(format!("/proc/self/task/{tid}/io")).expect("task io");
        let field = |name: &str| {
            io.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{name} in {io}"))
        };
        (field("rchar:"), field("wchar:"))
    }

    fn config(pki: &Pki, toml: &str) -> gateway::Config {
        let toml = with_test_defaults(toml);
        gateway::Config::parse(&toml, &pki.path("gateway.toml"), pki.dir.path())
            .unwrap_or_else(|e| panic!("test config refused: {e}\n{toml}"))
    }

    fn handles(config: &gateway::Config, app: &gateway::App) -> RunningGateway {
        let name = &config.listeners[0].name;
        let app_addr = app.local_addr(name).expect("listener bound");
        let routes = app.routes(name);
        let reload = app.reload_handle();
        let admin_addr = app.admin_addr();
        let admin_socket = app.admin_socket();
        let registry = app.registry();
        let guard = app.guard();
        let shutdown = app.shutdown_handle();
        let log = app.access_log();
        RunningGateway {
            app_addr,
            admin_addr,
            admin_socket,
            reload,
            registry,
            guard,
            routes,
            shutdown,
            log,
            task: None,
            thread_id: None,
            thread_stopped: None,
        }
    }

    /// Reloads from TOML text, as `start` reads it.
    pub async fn reload_toml(
        &self,
        pki: &Pki,
        toml: &str,
    ) -> Result<gateway::app::ReloadReport, gateway::app::ReloadError> {
        let toml = with_test_defaults(toml);
        let config = gateway::Config::parse(&toml, &pki.path("gateway.toml"), pki.dir.path())
            .unwrap_or_else(|e| panic!("test config refused: {e}"));
        self.reload.reload(config).await
    }

    /// `GET /metrics` from the admin endpoint.
    pub async fn scrape(&self) -> String {
        let addr = self.admin_addr.expect("config has admin");
        let mut s = TcpStream::connect(addr).await.expect("admin connect");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n")
            .await
            .expect("request");
        let mut response = String::new();
        tokio::time::timeout(STEP, s.read_to_string(&mut response))
            .await
            .expect("admin answered")
            .expect("admin response");
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        response
    }

    /// A route's counters: (allowed, denied, audited).
    pub fn stats(&self, route: &str) -> (u64, u64, u64) {
        let r = self
            .routes
            .iter()
            .find(|r| r.name == route)
            .expect("route exists");
        (
            r.stats.allowed.get(),
            r.stats.denied.get(),
            r.stats.audited.get(),
        )
    }

    /// The next access-log record (waits for the connection to end).
    pub async fn next_record(&mut self) -> AccessRecord {
        tokio::time::timeout(STEP, self.log.recv())
            .await
            .expect("access log record within the step timeout")
            .expect("access log channel open")
    }
}

/// What a test's config leaves out: no access log, and (without an
/// `[admission]` table of its own) the test client's address exempt from
/// per-source limits, which tests opening hundreds of connections from
/// 127.0.0.1 would meet. Tests of admission write their own table.
pub fn with_test_defaults(toml: &str) -> String {
    let mut toml = if toml.contains("access_log") {
        toml.to_owned()
    } else {
        format!("access_log = \"off\"\n{toml}")
    };
    if !toml.contains("[admission]") {
        toml.push_str("\n[admission]\nexempt = [\"127.0.0.1/32\"]\n");
    }
    toml
}

impl Drop for RunningGateway {
    fn drop(&mut self) {
        self.shutdown.shutdown();
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Connects with TLS through `addr`, sending `sni`.
pub async fn connect(
    addr: SocketAddr,
    sni: &str,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_owned()).expect("server name");
    tokio::time::timeout(STEP, TlsConnector::from(config).connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("TLS connect hung"))?
}

/// The TLS alert inside an I/O error from a rustls stream, if that is what it is.
pub fn alert_of(e: &std::io::Error) -> Option<AlertDescription> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}

/// Tries to talk through the gateway and returns the alert it was refused
/// with. In TLS 1.3 the client finishes its side of the handshake before the
/// server has judged the certificate, so the alert can arrive on first read.
pub async fn refusal(addr: SocketAddr, sni: &str, config: Arc<ClientConfig>) -> AlertDescription {
    let mut tls = match connect(addr, sni, config).await {
        Ok(tls) => tls,
        Err(e) => return alert_of(&e).unwrap_or_else(|| panic!("refused without an alert: {e}")),
    };
    let _ = tls.write_all(b"ping").await;
    let _ = tls.flush().await;
    let mut buf = [0u8; 16];
    match tokio::time::timeout(STEP, tls.read(&mut buf)).await {
        Ok(Err(e)) => alert_of(&e).unwrap_or_else(|| panic!("refused without an alert: {e}")),
        Ok(Ok(n)) => panic!("expected a refusal, but read {n} bytes through the gateway"),
        Err(_) => panic!("expected a refusal, but the connection hung"),
    }
}

/// Connects through the gateway and round-trips `msg` through the echo
/// backend; panics, naming `sni`, when the gateway does not let it through.
pub async fn passes(addr: SocketAddr, sni: &str, config: Arc<ClientConfig>, msg: &[u8]) {
    let tls = connect(addr, sni, config)
        .await
        .unwrap_or_else(|e| panic!("{sni}: refused: {e}"));
    let back = echo_roundtrip(tls, msg.to_vec())
        .await
        .unwrap_or_else(|e| panic!("{sni}: {e}"));
    assert_eq!(back, msg, "{sni}: echo");
}

/// Deterministic, non-repeating test payload.
pub fn payload(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Sends `msg` and reads its echo back.
pub async fn ping(tls: &mut TlsStream<TcpStream>, msg: &[u8]) -> std::io::Result<()> {
    tls.write_all(msg).await?;
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(STEP, tls.read_exact(&mut buf))
        .await
        .map_err(std::io::Error::other)??;
    assert_eq!(buf, msg);
    Ok(())
}

/// Waits until the gateway closes `tls`; returns how long that took.
pub async fn tls_closed_within(tls: &mut TlsStream<TcpStream>, limit: Duration) -> Duration {
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(limit, tls.read(&mut buf)).await {
            Err(_) => panic!("connection still open after {limit:?}"),
            Ok(Ok(0) | Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

/// Writes `data` and closes (close_notify + FIN) while reading everything back.
pub async fn echo_roundtrip(tls: TlsStream<TcpStream>, data: Vec<u8>) -> std::io::Result<Vec<u8>> {
    let (mut r, mut w) = tokio::io::split(tls);
    let writer = tokio::spawn(async move {
        w.write_all(&data).await?;
        w.shutdown().await?;
        Ok::<_, std::io::Error>(w)
    });
    let mut got = Vec::new();
    tokio::time::timeout(STEP * 3, r.read_to_end(&mut got))
        .await
        .map_err(|_| std::io::Error::other("echo read hung"))??;
    writer.await.map_err(std::io::Error::other)??;
    Ok(got)
}

/// Waits for the gateway binary's JSON "listening" log line in `stderr` (a
/// file it writes) and returns the address from it: with port 0 in the config
/// this is the only way to learn the port without probing it.
pub fn listening_addr(stderr: &Path) -> Result<SocketAddr, String> {
    let until = std::time::Instant::now() + STEP;
    loop {
        let log = std::fs::read_to_string(stderr).unwrap_or_default();
        for line in log.lines() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line)
                && v["fields"]["message"] == "listening"
                && let Some(addr) = v["fields"]["addr"].as_str()
            {
                return addr.parse().map_err(|e| format!("bad address {addr}: {e}"));
            }
        }
        if std::time::Instant::now() > until {
            return Err(format!("gateway did not start listening:\n{log}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The built `gateway` binary, next to this test's own executable, or where
/// `GATEWAY_BIN` says (the VM ships it apart from the target directory).
pub fn gateway_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("GATEWAY_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir of the test binary");
    let bin = dir.join("gateway");
    assert!(
        bin.is_file(),
        "{} not built: run `cargo build -p gateway` first (cargo xtask test does)",
        bin.display()
    );
    bin
}

/// `gateway guard --uninstall --pin-dir <dir>` with the built binary.
pub fn uninstall_with_binary(pin_dir: &Path) -> std::process::Output {
    std::process::Command::new(gateway_binary())
        .args(["guard", "--uninstall", "--pin-dir"])
        .arg(pin_dir)
        .output()
        .expect("run gateway guard --uninstall")
}

/// Set where a kernel feature is known to be there (the VM runs): a test
/// that would skip for lack of it fails instead, so a broken setup cannot
/// pass as "skipped".
const REQUIRE_FEATURES: &str = "GATEWAY_TEST_REQUIRE_KERNEL_FEATURES";

fn skip(test: &str, why: &str) {
    assert!(
        std::env::var_os(REQUIRE_FEATURES).is_none(),
        "{test}: {why}, but {REQUIRE_FEATURES} says this kernel has it"
    );
    eprintln!("skipped {test}: {why}");
}

/// The cgroup v2 mount when BPF tests can run here; otherwise says why the
/// test is skipped and returns None.
pub fn bpf_cgroup_or_skip() -> Option<PathBuf> {
    if !is_root() {
        skip("BPF test", "loading BPF programs needs root");
        return None;
    }
    let mount = gateway::ebpf::cgroup2_mount();
    if mount.is_none() {
        skip(
            "BPF test",
            "no cgroup v2 hierarchy mounted (see /proc/mounts)",
        );
    }
    mount
}

/// True when this kernel can offload TLS; otherwise says why `test` is skipped.
pub fn kernel_tls_or_skip(test: &str) -> bool {
    let support = gateway::offload::KernelSupport::get();
    if !support.available() {
        skip(
            test,
            &format!(
                "{} (cargo xtask vm-test runs it on kernels with kTLS)",
                support.describe()
            ),
        );
    }
    support.available()
}

/// Whether the tests run as root (BPF and cgroup tests need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { geteuid() == 0 }
}

unsafe extern "C" {
    fn geteuid() -> u32;
}

/// The process name (comm) of `connect_from`'s child, as BPF events report it.
pub const PROBE_COMM: &str = "bypass-probe";

/// Connects to `addr` from a child process that first moves itself into
/// `cgroup`; Err says why not (e.g. "Operation not permitted (os error 1)").
/// A forked child rather than a shell, so it also runs in the VM's initramfs.
pub fn connect_from(cgroup: &Path, addr: SocketAddr) -> Result<(), String> {
    reach_from(cgroup, addr, Probe::TcpConnect)
}

/// Sends one UDP datagram ("probe") to `addr` with sendto, from a child in
/// `cgroup`, as [`connect_from`] connects.
pub fn send_udp_from(cgroup: &Path, addr: SocketAddr) -> Result<(), String> {
    reach_from(cgroup, addr, Probe::UdpSendTo)
}

/// How a probe child tries to reach a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// TCP connect().
    TcpConnect,
    /// One UDP datagram with sendto().
    UdpSendTo,
    /// connect() on a UDP socket, then send().
    UdpConnect,
    /// A TCP connect submitted through io_uring (IORING_OP_CONNECT).
    UringConnect,
    /// A raw IPv4 socket (CAP_NET_RAW) that writes its own UDP header.
    RawUdp,
    /// This many TCP connects in a row, each on a new socket, whatever
    /// they return: a flood.
    TcpConnects(u32),
    /// This many TCP connects in a row, each to another loopback address
    /// (127.0.0.2, 127.0.0.3, … at the probe's port): a flood of distinct
    /// destinations.
    TcpConnectsSpread(u32),
    /// One UDP datagram with sendto() on a socket with SO_BROADCAST (a
    /// subnet broadcast address).
    UdpBroadcast,
}

/// How long a probe's TCP connect may take: a SYN dropped on the way out
/// (rather than refused at connect()) shows as a timeout, not a hang.
pub const PROBE_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Tries to reach `addr` the way `probe` says, from a child process that
/// first moves itself into `cgroup`, in the calling thread's network
/// namespace; Err says why not.
pub fn reach_from(cgroup: &Path, addr: SocketAddr, probe: Probe) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt as _;
    // Everything the child needs is prepared before fork: after it, in a
    // threaded process, the child may only make raw system calls.
    let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())
        .expect("cgroup path without NUL");
    let name = std::ffi::CString::new(PROBE_COMM).expect("comm");
    let (storage, len) = netns::sockaddr(addr);
    let family = i32::from(storage.ss_family);
    let timeout = libc::timeval {
        tv_sec: PROBE_CONNECT_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: PROBE_CONNECT_TIMEOUT.subsec_micros() as libc::suseconds_t,
    };
    // The spread flood's destinations: 127.0.0.2 onwards, same port.
    let spread = |i: u32| {
        let ip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(127, 0, 0, 2)) + i);
        netns::sockaddr(SocketAddr::new(ip.into(), addr.port()))
    };
    // The raw probe's UDP header and payload ("probe"), checksum left out.
    let mut raw = [0u8; 13];
    raw[0..2].copy_from_slice(&40000u16.to_be_bytes());
    raw[2..4].copy_from_slice(&addr.port().to_be_bytes());
    raw[4..6].copy_from_slice(&13u16.to_be_bytes());
    raw[8..13].copy_from_slice(b"probe");
    // SAFETY: the child below only makes async-signal-safe system calls on
    // data prepared above, then _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: raw system calls on valid pointers; _exit never returns.
        unsafe {
            libc::prctl(libc::PR_SET_NAME, name.as_ptr());
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            // Writing "0" to cgroup.procs moves the writing process.
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                libc::_exit(200);
            }
            let (kind, protocol) = match probe {
                Probe::TcpConnect
                | Probe::UringConnect
                | Probe::TcpConnects(_)
                | Probe::TcpConnectsSpread(_) => (libc::SOCK_STREAM, 0),
                Probe::UdpSendTo | Probe::UdpConnect | Probe::UdpBroadcast => (libc::SOCK_DGRAM, 0),
                Probe::RawUdp => (libc::SOCK_RAW, libc::IPPROTO_UDP),
            };
            let s = libc::socket(family, kind, protocol);
            if s < 0 {
                libc::_exit(201);
            }
            let to = std::ptr::from_ref(&storage).cast();
            let sent = |n: isize, want: usize| if n == want as isize { 0 } else { -1 };
            libc::setsockopt(
                s,
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                std::ptr::from_ref(&timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            );
            let rc = match probe {
                Probe::TcpConnect => libc::connect(s, to, len),
                Probe::TcpConnectsSpread(n) => {
                    libc::close(s);
                    for i in 0..n {
                        let (at, at_len) = spread(i);
                        let s = libc::socket(family, kind, protocol);
                        libc::connect(s, std::ptr::from_ref(&at).cast(), at_len);
                        libc::close(s);
                    }
                    0
                }
                Probe::UdpBroadcast => {
                    let one: libc::c_int = 1;
                    libc::setsockopt(
                        s,
                        libc::SOL_SOCKET,
                        libc::SO_BROADCAST,
                        std::ptr::from_ref(&one).cast(),
                        size_of::<libc::c_int>() as libc::socklen_t,
                    );
                    sent(libc::sendto(s, b"probe".as_ptr().cast(), 5, 0, to, len), 5)
                }
                Probe::TcpConnects(n) => {
                    libc::close(s);
                    for _ in 0..n {
                        let s = libc::socket(family, kind, protocol);
                        libc::connect(s, to, len);
                        libc::close(s);
                    }
                    0
                }
                Probe::UdpSendTo => {
                    sent(libc::sendto(s, b"probe".as_ptr().cast(), 5, 0, to, len), 5)
                }
                Probe::UdpConnect => {
                    if libc::connect(s, to, len) != 0 {
                        -1
                    } else {
                        sent(libc::send(s, b"probe".as_ptr().cast(), 5, 0), 5)
                    }
                }
                Probe::RawUdp => sent(
                    libc::sendto(s, raw.as_ptr().cast(), raw.len(), 0, to, len),
                    raw.len(),
                ),
                Probe::UringConnect => match uring::connect(s, to, len) {
                    Ok(()) => 0,
                    Err(errno) => {
                        *libc::__errno_location() = errno;
                        -1
                    }
                },
            };
            libc::_exit(if rc == 0 {
                0
            } else {
                *libc::__errno_location() & 0x7f
            });
        }
    }
    assert!(pid > 0, "fork failed: {}", std::io::Error::last_os_error());
    let mut status = 0;
    // SAFETY: waiting for the child we just forked.
    unsafe { libc::waitpid(pid, &raw mut status, 0) };
    match libc::WEXITSTATUS(status) {
        0 => Ok(()),
        200 => Err(format!("could not join {}", cgroup.display())),
        201 => Err("socket() failed".into()),
        errno => Err(std::io::Error::from_raw_os_error(errno).to_string()),
    }
}

/// How a backend saw a client's stream end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEnd {
    /// FIN: an orderly end, as after a complete request.
    Fin,
    /// RST: the stream was cut.
    Reset,
    Other(String),
}

/// A backend that echoes and reports, per connection, the bytes it got
/// and how the stream from the gateway ended (FIN or reset).
pub struct ObservingBackend {
    pub addr: SocketAddr,
    pub ends: tokio::sync::mpsc::UnboundedReceiver<(Vec<u8>, StreamEnd)>,
    task: JoinHandle<()>,
}

impl ObservingBackend {
    pub async fn start() -> ObservingBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, ends) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 16384];
                    let end = loop {
                        match s.read(&mut buf).await {
                            Ok(0) => break StreamEnd::Fin,
                            Ok(n) => {
                                got.extend_from_slice(&buf[..n]);
                                // A failed echo shows in the next read.
                                let _ = s.write_all(&buf[..n]).await;
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                                break StreamEnd::Reset;
                            }
                            Err(e) => break StreamEnd::Other(e.to_string()),
                        }
                    };
                    let _ = tx.send((got, end));
                });
            }
        });
        ObservingBackend { addr, ends, task }
    }

    /// The next connection's end, as the backend saw it.
    pub async fn next_end(&mut self) -> (Vec<u8>, StreamEnd) {
        tokio::time::timeout(STEP, self.ends.recv())
            .await
            .expect("the backend saw the stream end within the step timeout")
            .expect("backend running")
    }
}

impl Drop for ObservingBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP relay that records what passes each way, for reading the records
/// a peer sent off the wire.
pub struct Tap {
    pub addr: SocketAddr,
    /// Per relayed connection, once it ends: (towards the target, back).
    pub done: tokio::sync::mpsc::UnboundedReceiver<(Vec<u8>, Vec<u8>)>,
    task: JoinHandle<()>,
}

impl Tap {
    pub async fn start(target: SocketAddr) -> Tap {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind tap");
        let addr = listener.local_addr().expect("tap addr");
        let (tx, done) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (ir, iw) = inbound.into_split();
                    let (or, ow) = outbound.into_split();
                    let copy =
                        |mut r: tokio::net::tcp::OwnedReadHalf,
                         mut w: tokio::net::tcp::OwnedWriteHalf| async move {
                            let mut seen = Vec::new();
                            let mut buf = [0u8; 16384];
                            while let Ok(n) = r.read(&mut buf).await {
                                if n == 0 || w.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                                seen.extend_from_slice(&buf[..n]);
                            }
                            let _ = w.shutdown().await;
                            seen
                        };
                    let (to, back) = tokio::join!(copy(ir, ow), copy(or, iw));
                    let _ = tx.send((to, back));
                });
            }
        });
        Tap { addr, done, task }
    }

    /// What the next relayed connection carried, once it ended.
    pub async fn next(&mut self) -> (Vec<u8>, Vec<u8>) {
        tokio::time::timeout(STEP, self.done.recv())
            .await
            .expect("the tapped connection ended within the step timeout")
            .expect("tap running")
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The explicit nonces (the first 8 bytes of each record body) of every
/// TLS 1.2 AES-GCM record one side sent after its ChangeCipherSpec: its
/// Finished (sealed by rustls) and every record after it (by the kernel
/// or the record layer). Each must be unique under the key.
pub fn tls12_explicit_nonces(stream: &[u8]) -> Vec<[u8; 8]> {
    let mut nonces = Vec::new();
    let mut encrypted = false;
    let mut at = 0;
    while stream.len() - at >= 5 {
        let typ = stream[at];
        let len = usize::from(u16::from_be_bytes([stream[at + 3], stream[at + 4]]));
        let Some(body) = stream.get(at + 5..at + 5 + len) else {
            break;
        };
        if encrypted && body.len() >= 8 {
            nonces.push(body[..8].try_into().expect("8 bytes"));
        }
        if typ == 20 {
            encrypted = true;
        }
        at += 5 + len;
    }
    nonces
}

/// TLS 1.2 with `suite` (AES-GCM) on both legs through a gateway whose
/// legs use `offload`, both tapped: a 1 MiB echo, then the explicit nonce
/// of every record the gateway sealed on each leg, from rustls' Finished
/// to the last byte of data. Asserts none repeats on either leg (a GCM
/// nonce used twice under one key gives away the authentication key) and
/// returns the access-log record and how many nonces each leg carried.
pub async fn tls12_gcm_nonces_through(
    offload: &str,
    suite: rustls::CipherSuite,
) -> (AccessRecord, usize, usize) {
    let pki = Pki::new();
    let (backend, _) = tls_echo_backend_with(
        &pki,
        &["orders.backend.internal"],
        false,
        &[&rustls::version::TLS12],
        match suite {
            rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 => {
                |s| s.suite() == rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            }
            _ => |s| s.suite() == rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        },
    )
    .await;
    let mut backend_tap = Tap::start(backend).await;
    let toml = listener_toml(
        &pki,
        "edge",
        &format!("tls_versions = [\"1.2\", \"1.3\"]\noffload = \"{offload}\""),
    ) + &route_toml(
        "orders",
        &["orders.example.internal"],
        &[backend_tap.addr],
        &[SPIFFE_FRONTEND],
    ) + &format!(
        "upstream_tls = {{ ca = \"{}\", server_name = \"orders.backend.internal\", offload = \"{offload}\" }}\n",
        pki.path("server-roots.pem").display()
    );
    let mut gw = RunningGateway::start(&pki, &toml).await;
    let mut client_tap = Tap::start(gw.app_addr).await;
    let tls = connect(
        client_tap.addr,
        "orders.example.internal",
        pki.client_with_suite(&rustls::version::TLS12, suite),
    )
    .await
    .expect("TLS 1.2 handshake through the tap");
    let data = payload(1 << 20);
    let got = echo_roundtrip(tls, data.clone()).await.expect("echo");
    assert!(got == data, "byte-exact");
    let record = gw.next_record().await;
    let unique = |nonces: &[[u8; 8]], leg: &str| {
        let mut seen = std::collections::HashSet::new();
        for n in nonces {
            assert!(
                seen.insert(*n),
                "{offload} path, {leg} leg: explicit nonce {n:02x?} used twice under one key"
            );
        }
        nonces.len()
    };
    let (_, from_gateway) = client_tap.next().await;
    let (to_backend, _) = backend_tap.next().await;
    let client_leg = unique(&tls12_explicit_nonces(&from_gateway), "client");
    let backend_leg = unique(&tls12_explicit_nonces(&to_backend), "backend");
    // 1 MiB is 64 full records each way, and the Finished before them.
    assert!(
        client_leg > 64 && backend_leg > 64,
        "{client_leg} / {backend_leg} records seen"
    );
    (record, client_leg, backend_leg)
}

/// io_uring with raw system calls and no allocation, so a forked child of
/// a threaded process may use it: one connect, submitted and waited for.
mod uring {
    const SETUP: libc::c_long = 425;
    const ENTER: libc::c_long = 426;
    const OP_CONNECT: u8 = 16;
    const ENTER_GETEVENTS: u32 = 1;
    const FEAT_SINGLE_MMAP: u32 = 1;
    const OFF_SQ_RING: i64 = 0;
    const OFF_CQ_RING: i64 = 0x800_0000;
    const OFF_SQES: i64 = 0x1000_0000;

    #[repr(C)]
    #[derive(Default)]
    struct SqOffsets {
        head: u32,
        tail: u32,
        ring_mask: u32,
        ring_entries: u32,
        flags: u32,
        dropped: u32,
        array: u32,
        resv1: u32,
        user_addr: u64,
    }

    #[repr(C)]
    #[derive(Default)]
    struct CqOffsets {
        head: u32,
        tail: u32,
        ring_mask: u32,
        ring_entries: u32,
        overflow: u32,
        cqes: u32,
        flags: u32,
        resv1: u32,
        user_addr: u64,
    }

    #[repr(C)]
    #[derive(Default)]
    struct Params {
        sq_entries: u32,
        cq_entries: u32,
        flags: u32,
        sq_thread_cpu: u32,
        sq_thread_idle: u32,
        features: u32,
        wq_fd: u32,
        resv: [u32; 3],
        sq_off: SqOffsets,
        cq_off: CqOffsets,
    }

    /// connect(socket, to, len) through a fresh ring; Err is the errno.
    ///
    /// # Safety
    /// `to` points at a sockaddr of `len` bytes valid for the call.
    pub unsafe fn connect(
        socket: i32,
        to: *const libc::sockaddr,
        len: libc::socklen_t,
    ) -> Result<(), i32> {
        let mut p = Params::default();
        // SAFETY (whole body): raw io_uring system calls on memory the
        // kernel maps for this ring, at the offsets it reports.
        unsafe {
            let ring = libc::syscall(SETUP, 2u32, &raw mut p) as i32;
            if ring < 0 {
                return Err(*libc::__errno_location());
            }
            let sq_len = p.sq_off.array as usize + p.sq_entries as usize * 4;
            let cq_len = p.cq_off.cqes as usize + p.cq_entries as usize * 16;
            let single = p.features & FEAT_SINGLE_MMAP != 0;
            let map = |len: usize, offset: i64| {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_POPULATE,
                    ring,
                    offset,
                )
            };
            let sq = map(
                if single { sq_len.max(cq_len) } else { sq_len },
                OFF_SQ_RING,
            );
            let cq = if single { sq } else { map(cq_len, OFF_CQ_RING) };
            let sqes = map(p.sq_entries as usize * 64, OFF_SQES);
            if sq == libc::MAP_FAILED || cq == libc::MAP_FAILED || sqes == libc::MAP_FAILED {
                return Err(*libc::__errno_location());
            }
            let at = |base: *mut libc::c_void, off: u32| base.cast::<u8>().add(off as usize);
            let sqe = sqes.cast::<u8>();
            std::ptr::write_bytes(sqe, 0, 64);
            *sqe = OP_CONNECT;
            sqe.add(4).cast::<i32>().write(socket);
            sqe.add(8).cast::<u64>().write(u64::from(len));
            sqe.add(16).cast::<u64>().write(to as u64);
            sqe.add(32).cast::<u64>().write(1);
            let tail = at(sq, p.sq_off.tail).cast::<u32>();
            let mask = *at(sq, p.sq_off.ring_mask).cast::<u32>();
            let index = *tail & mask;
            at(sq, p.sq_off.array)
                .cast::<u32>()
                .add(index as usize)
                .write(0);
            std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
            tail.write_volatile(*tail + 1);
            let rc = libc::syscall(ENTER, ring, 1u32, 1u32, ENTER_GETEVENTS, 0usize, 0usize);
            if rc < 0 {
                return Err(*libc::__errno_location());
            }
            std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
            let head = *at(cq, p.cq_off.head).cast::<u32>();
            let cq_mask = *at(cq, p.cq_off.ring_mask).cast::<u32>();
            let cqe = at(cq, p.cq_off.cqes).add((head & cq_mask) as usize * 16);
            let res = cqe.add(8).cast::<i32>().read();
            if res < 0 { Err(-res) } else { Ok(()) }
        }
    }
}

/// What a racer that tries a new address the moment it appears got through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaceResult {
    /// TCP connects that completed.
    pub connected: u32,
    /// UDP datagrams sendto() accepted.
    pub sent: u32,
    /// Attempts in all (of each).
    pub tries: u32,
}

/// A racer: a child in `cgroup`, in the calling thread's network namespace,
/// that listens to rtnetlink for a new IPv4 address (as any unprivileged
/// process may) and the moment one appears tries `tcp` and `udp` `tries`
/// times each, as fast as it can. Start it, add the address, then
/// [`Racer::result`].
pub struct Racer {
    child: netns::ForkedChild,
    results: std::os::fd::OwnedFd,
    tries: u32,
}

impl Racer {
    pub fn start(cgroup: &Path, tcp: SocketAddr, udp: SocketAddr, tries: u32) -> Racer {
        use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
        let (tcp_at, tcp_len) = netns::sockaddr(tcp);
        let (udp_at, udp_len) = netns::sockaddr(udp);
        let mut ready = [0i32; 2];
        let mut results = [0i32; 2];
        // SAFETY: pipe fills two descriptors, checked.
        assert_eq!(unsafe { libc::pipe(ready.as_mut_ptr()) }, 0);
        // SAFETY: as above.
        assert_eq!(unsafe { libc::pipe(results.as_mut_ptr()) }, 0);
        let child = netns::fork_into(Some(cgroup), || {
            // SAFETY: raw system calls on data prepared before the fork.
            unsafe {
                let nl = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE);
                let mut sa: libc::sockaddr_nl = std::mem::zeroed();
                sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
                sa.nl_groups = libc::RTMGRP_IPV4_IFADDR as u32;
                if libc::bind(
                    nl,
                    std::ptr::from_ref(&sa).cast(),
                    size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                ) != 0
                {
                    return 101;
                }
                let bound = libc::timeval {
                    tv_sec: 20,
                    tv_usec: 0,
                };
                libc::setsockopt(
                    nl,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    std::ptr::from_ref(&bound).cast(),
                    size_of::<libc::timeval>() as libc::socklen_t,
                );
                libc::write(ready[1], b"r".as_ptr().cast(), 1);
                let mut buf = [0u8; 4096];
                if libc::recv(nl, buf.as_mut_ptr().cast(), buf.len(), 0) <= 0 {
                    return 102;
                }
                let (mut connected, mut sent) = (0u32, 0u32);
                let u = libc::socket(udp_at.ss_family.into(), libc::SOCK_DGRAM, 0);
                for _ in 0..tries {
                    connected += u32::from(connects(&tcp_at, tcp_len));
                    let n = libc::sendto(
                        u,
                        b"race".as_ptr().cast(),
                        4,
                        0,
                        std::ptr::from_ref(&udp_at).cast(),
                        udp_len,
                    );
                    sent += u32::from(n == 4);
                }
                let mut out = [0u8; 8];
                out[..4].copy_from_slice(&connected.to_ne_bytes());
                out[4..].copy_from_slice(&sent.to_ne_bytes());
                libc::write(results[1], out.as_ptr().cast(), 8);
                0
            }
        });
        // SAFETY: descriptors from pipe(), ours alone from here.
        let (ready_r, results_r) = unsafe {
            libc::close(ready[1]);
            libc::close(results[1]);
            (
                OwnedFd::from_raw_fd(ready[0]),
                OwnedFd::from_raw_fd(results[0]),
            )
        };
        let mut byte = [0u8; 1];
        // SAFETY: a valid one-byte buffer.
        let n = unsafe { libc::read(ready_r.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
        assert_eq!(n, 1, "the racer is listening");
        Racer {
            child,
            results: results_r,
            tries,
        }
    }

    /// Waits for the racer to finish and says what got through.
    pub fn result(self) -> RaceResult {
        use std::os::fd::AsRawFd as _;
        let mut out = [0u8; 8];
        // SAFETY: a valid buffer of the size passed.
        let n = unsafe { libc::read(self.results.as_raw_fd(), out.as_mut_ptr().cast(), 8) };
        assert_eq!(
            (n, self.child.wait()),
            (8, 0),
            "the racer saw the address appear and reported"
        );
        RaceResult {
            connected: u32::from_ne_bytes([out[0], out[1], out[2], out[3]]),
            sent: u32::from_ne_bytes([out[4], out[5], out[6], out[7]]),
            tries: self.tries,
        }
    }
}

/// Whether a non-blocking TCP connect to `at` completes within 20 ms (raw
/// system calls only: it runs in forked children).
fn connects(at: &libc::sockaddr_storage, len: libc::socklen_t) -> bool {
    // SAFETY: raw system calls on valid pointers.
    unsafe {
        let s = libc::socket(
            i32::from(at.ss_family),
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK,
            0,
        );
        let rc = libc::connect(s, std::ptr::from_ref(at).cast(), len);
        let mut ok = rc == 0;
        if rc != 0 && *libc::__errno_location() == libc::EINPROGRESS {
            let mut p = libc::pollfd {
                fd: s,
                events: libc::POLLOUT,
                revents: 0,
            };
            if libc::poll(&raw mut p, 1, 20) == 1 {
                let mut err: libc::c_int = 0;
                let mut len = size_of::<libc::c_int>() as libc::socklen_t;
                libc::getsockopt(
                    s,
                    libc::SOL_SOCKET,
                    libc::SO_ERROR,
                    std::ptr::from_mut(&mut err).cast(),
                    &raw mut len,
                );
                ok = err == 0;
            }
        }
        libc::close(s);
        ok
    }
}

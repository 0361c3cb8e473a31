//! The gateway with its eBPF guard: clients reach the backend through the
//! gateway, a local process that bypasses it gets EPERM, a reload protects a
//! new backend at once, audit lets bypasses through but counts them, and
//! enforcement that cannot be installed stops the gateway from starting.
//! A reload the guard cannot apply whole is refused and changes nothing;
//! addresses the host gains are guarded as they appear.
//! Root only; the test process becomes "the gateway" by joining its cgroup,
//! so the tests here take turns.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use gateway_tests::*;

const SNI: &str = "orders.example.internal";

/// The tests take turns: the gateway moves this whole process into its
/// cgroup, and a process is in one cgroup at a time.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What most tests start with: their turn, cgroups, a PKI and an echo
/// backend. None (with a message) where BPF tests cannot run.
async fn begin() -> Option<(
    tokio::sync::MutexGuard<'static, ()>,
    Cgroups,
    Pki,
    EchoBackend,
)> {
    let turn = TURN.lock().await;
    let mount = bpf_cgroup_or_skip()?;
    Some((
        turn,
        Cgroups::create(&mount),
        Pki::new(),
        EchoBackend::start().await,
    ))
}

/// The test's cgroup subtree: `gw` (the gateway) and `other`. On drop the
/// test process goes back where it was and the subtree is removed.
struct Cgroups {
    mount: PathBuf,
    rel: PathBuf,
    home: PathBuf,
    /// The guard's bpffs pins for this test.
    pins: PathBuf,
}

impl Cgroups {
    fn create(mount: &Path) -> Cgroups {
        let rel = PathBuf::from(gateway_tests::netns::unique("gateway-e2e-guard-"));
        for d in [rel.clone(), rel.join("other")] {
            std::fs::create_dir(mount.join(&d)).unwrap();
        }
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let home = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(|p| mount.join(p.trim_start_matches('/')))
            .unwrap_or_else(|| mount.to_owned());
        Cgroups {
            mount: mount.to_owned(),
            rel,
            home,
            pins: PathBuf::from("/sys/fs/bpf").join(gateway_tests::netns::unique("gateway-e2e-")),
        }
    }

    fn path(&self, leaf: &str) -> PathBuf {
        self.mount.join(&self.rel).join(leaf)
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        gateway_tests::netns::uninstall_when_free(&self.pins);
        let _ = std::fs::write(self.home.join("cgroup.procs"), "0");
        // Every leaf a test made (gw, other, and any of its own), then the root.
        let leaves = std::fs::read_dir(self.path(""))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.path());
        for dir in leaves.chain(std::iter::once(self.path(""))) {
            for _ in 0..50 {
                if !dir.exists() || std::fs::remove_dir(&dir).is_ok() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn backends_are_reachable_only_through_the_gateway() {
    let Some((_turn, cg, pki, backend)) = begin().await else {
        return;
    };
    let second = EchoBackend::start().await;
    let guard = |mode: &str| {
        format!(
            "admin = \"127.0.0.1:0\"\n[guard]\nenforcement = \"{mode}\"\ncgroup = \"{}\"\nattach_to = \"{}\"\npin_dir = \"{}\"\n",
            cg.rel.join("gw").display(),
            cg.rel.display(),
            cg.pins.display()
        )
    };
    let one = guard("enforce")
        + &listener_toml(&pki, "edge", "")
        + &route_toml("orders", &[SNI], &[backend.addr], &[SPIFFE_FRONTEND]);
    let gw = RunningGateway::start(&pki, &one).await;
    let mut attempts = gw.guard.as_ref().expect("guard installed").attempts();

    // Through the gateway: fine. Around it: EPERM.
    let tls = connect(gw.app_addr, SNI, pki.frontend_config())
        .await
        .unwrap();
    assert_eq!(
        echo_roundtrip(tls, payload(100_000)).await.unwrap(),
        payload(100_000)
    );
    let err = connect_from(&cg.path("other"), backend.addr).expect_err("bypass refused");
    assert!(err.contains("Operation not permitted"), "{err}");
    // Who tried, as the kernel saw it.
    let seen = tokio::time::timeout(STEP, attempts.recv())
        .await
        .expect("an event")
        .unwrap();
    assert_eq!(
        (seen.comm.as_str(), seen.destination, seen.audited),
        (gateway_tests::PROBE_COMM, backend.addr, false),
        "{seen:?}"
    );
    assert!(seen.pid > 0);
    assert_eq!(
        seen.cgroup,
        gateway::ebpf::cgroup_id(&cg.path("other")).unwrap()
    );
    connect_from(&cg.path("other"), second.addr).expect("not a backend yet");

    // A reload adding a backend protects it before it serves.
    let two = guard("enforce")
        + &listener_toml(&pki, "edge", "")
        + &route_toml(
            "orders",
            &[SNI],
            &[backend.addr, second.addr],
            &[SPIFFE_FRONTEND],
        );
    gw.reload_toml(&pki, &two).await.unwrap();
    let err = connect_from(&cg.path("other"), second.addr).expect_err("new backend protected");
    assert!(err.contains("Operation not permitted"), "{err}");

    // Audit: the bypass goes through, and is counted.
    gw.reload_toml(&pki, &(guard("audit") + &two[guard("enforce").len()..]))
        .await
        .unwrap();
    connect_from(&cg.path("other"), backend.addr).expect("audit lets it through");
    let mut audited = None;
    while let Ok(Ok(a)) = tokio::time::timeout(STEP, attempts.recv()).await {
        if a.audited {
            audited = Some(a);
            break;
        }
    }
    assert_eq!(audited.map(|a| a.destination), Some(backend.addr));
    let metrics = gw.scrape().await;
    assert!(
        metrics.contains("gateway_guard_connects_total{verdict=\"deny\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gateway_guard_connects_total{verdict=\"audit\"} 1"),
        "{metrics}"
    );
    // The dashboard's guard panels query what a gateway with a guard serves.
    for name in gateway_tests::dashboard::metric_names() {
        if name.starts_with("gateway_guard_") {
            assert!(
                metrics
                    .lines()
                    .any(|l| l.starts_with(&format!("{name}{{"))
                        || l.starts_with(&format!("{name} "))),
                "the dashboard queries {name}, not served: {metrics}"
            );
        }
    }
    drop(gw);

    // Fail closed: enforcement that cannot be installed means no gateway.
    let broken = one.replace(
        &format!("attach_to = \"{}\"", cg.rel.display()),
        "attach_to = \"no-such-cgroup\"",
    );
    let refused_start = async |toml: &str| {
        let config = gateway::Config::parse(
            &format!("access_log = \"off\"\n{toml}"),
            &pki.path("g.toml"),
            pki.dir.path(),
        )
        .unwrap();
        gateway::build(&config)
            .await
            .err()
            .expect("the gateway must not start")
    };
    let err = refused_start(&broken).await;
    assert!(err.to_string().contains("no-such-cgroup"), "{err}");

    // A uid the gateway does not run as would refuse its own connects: no start.
    let err = refused_start(&one.replace("[guard]\n", "[guard]\nuid = 4242\n")).await;
    assert!(
        err.to_string()
            .contains("uid = 4242, but the gateway runs as uid 0"),
        "{err}"
    );
}

/// A gateway with an admin endpoint, an enforcing guard (`guard_extra`
/// lines added) and one route to `backend`.
fn gateway_toml(cg: &Cgroups, pki: &Pki, backend: &EchoBackend, guard_extra: &str) -> String {
    "admin = \"127.0.0.1:0\"\n".to_owned()
        + &guard_section(cg, "enforce", guard_extra)
        + &listener_toml(pki, "edge", "")
        + &route_toml("orders", &[SNI], &[backend.addr], &[SPIFFE_FRONTEND])
}

/// `[guard]` for the test's cgroups, with `enforcement` and extra lines.
fn guard_section(cg: &Cgroups, enforcement: &str, extra: &str) -> String {
    format!(
        "[guard]\nenforcement = \"{enforcement}\"\ncgroup = \"{}\"\nattach_to = \"{}\"\npin_dir = \"{}\"\n{extra}",
        cg.rel.join("gw").display(),
        cg.rel.display(),
        cg.pins.display()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_the_guard_cannot_apply_whole_is_refused_and_changes_nothing() {
    let Some((_turn, cg, pki, backend)) = begin().await else {
        return;
    };
    let routes = listener_toml(&pki, "edge", "")
        + &route_toml("orders", &[SNI], &[backend.addr], &[SPIFFE_FRONTEND]);
    let config = |guard: String| format!("admin = \"127.0.0.1:0\"\n{guard}{routes}");
    let gw = RunningGateway::start(&pki, &config(guard_section(&cg, "enforce", ""))).await;
    let bypass = || connect_from(&cg.path("other"), backend.addr);
    let err = bypass().expect_err("protected");
    assert!(err.contains("Operation not permitted"), "{err}");

    let too_many: Vec<String> = (1..=4097u16)
        .map(|p| format!("\"10.99.0.1:{p}\""))
        .collect();
    let refusals = [
        ("no [guard]", String::new(), "[guard]"),
        (
            "enforcement = off",
            guard_section(&cg, "off", ""),
            "enforcement changes from enforce to off",
        ),
        (
            "another cgroup",
            guard_section(&cg, "enforce", "").replace("/gw\"", "/other\""),
            "cgroup changes",
        ),
        (
            "another pin_dir",
            guard_section(&cg, "enforce", "").replace(
                &format!("pin_dir = \"{}\"", cg.pins.display()),
                &format!("pin_dir = \"{}-elsewhere\"", cg.pins.display()),
            ),
            "pin_dir changes",
        ),
        (
            "audit with more rules than the maps hold",
            guard_section(
                &cg,
                "audit",
                &format!("protect = [{}]\n", too_many.join(", ")),
            ),
            "more than 4096",
        ),
    ];
    for (what, guard, says) in &refusals {
        let err = gw
            .reload_toml(&pki, &config(guard.clone()))
            .await
            .expect_err(what);
        assert!(err.to_string().contains(says), "{what}: {err}");
        let err = bypass().expect_err(what);
        assert!(
            err.contains("Operation not permitted"),
            "after a refused reload ({what}) the guard enforces as before: {err}"
        );
    }
    let metrics = gw.scrape().await;
    assert!(
        metrics.contains(&format!(
            "gateway_reloads_total{{result=\"failed\"}} {}",
            refusals.len()
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("gateway_guard_connects_total{verdict=\"audit\"} 0"),
        "{metrics}"
    );
    drop(gw);

    // A gateway started without a guard does not pretend to add one.
    let gw = RunningGateway::start(&pki, &config(String::new())).await;
    let err = gw
        .reload_toml(&pki, &config(guard_section(&cg, "enforce", "")))
        .await
        .expect_err("adding [guard] needs a restart");
    assert!(err.to_string().contains("[guard]"), "{err}");
    gw.reload_toml(&pki, &config(guard_section(&cg, "off", "")))
        .await
        .expect("off is what it runs with");
}

/// A gateway on a thread of its own inside a namespace (the addresses it
/// follows are the namespace's), serving until dropped.
struct GatewayInNamespace {
    scrape: Option<tokio::sync::mpsc::UnboundedSender<()>>,
    metrics: std::sync::mpsc::Receiver<String>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GatewayInNamespace {
    fn start(ns: &gateway_tests::netns::Netns, pki: Pki, toml: String) -> GatewayInNamespace {
        let (scrape, mut scrape_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let (metrics_tx, metrics) = std::sync::mpsc::channel::<String>();
        let name = ns.name().to_owned();
        let thread = std::thread::spawn(move || {
            gateway_tests::netns::in_netns(&name, move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let gw = RunningGateway::start(&pki, &toml).await;
                    let _ = ready_tx.send(());
                    while scrape_rx.recv().await.is_some() {
                        let _ = metrics_tx.send(gw.scrape().await);
                    }
                });
            })
        });
        ready_rx.recv_timeout(STEP).expect("gateway started");
        GatewayInNamespace {
            scrape: Some(scrape),
            metrics,
            thread: Some(thread),
        }
    }

    fn scrape(&self) -> String {
        self.scrape
            .as_ref()
            .expect("running")
            .send(())
            .expect("gateway running");
        self.metrics.recv_timeout(STEP).expect("metrics")
    }
}

impl Drop for GatewayInNamespace {
    fn drop(&mut self) {
        drop(self.scrape.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// For a gateway run in a namespace of its own: the test's turn, the
/// namespace (with a veth `v0` up) and cgroups. None where it cannot run.
fn in_a_namespace(
    tag: &str,
) -> Option<(
    tokio::sync::MutexGuard<'static, ()>,
    gateway_tests::netns::Netns,
    Cgroups,
)> {
    let turn = TURN.blocking_lock();
    let mount = bpf_cgroup_or_skip()?;
    if !gateway_tests::netns::netns_or_skip() {
        return None;
    }
    let ns = gateway_tests::netns::Netns::new(tag);
    ns.ip("link add v0 type veth peer name v1");
    ns.ip("link set v0 up");
    Some((turn, ns, Cgroups::create(&mount)))
}

#[test]
fn addresses_the_host_gains_are_guarded_as_they_appear() {
    let Some((_turn, ns, cg)) = in_a_namespace("gga") else {
        return;
    };
    ns.ip("link set v1 up");
    // The gateway runs on a thread inside the namespace: the addresses it
    // follows are the namespace's.
    let backend = ns
        .run(|| std::net::TcpListener::bind("[::]:0"))
        .expect("bind");
    let port = backend.local_addr().unwrap().port();
    // Accepts (and closes) what gets through, so the backlog never fills.
    gateway_tests::netns::tcp_echo(backend);
    let udp = ns
        .run(|| std::net::UdpSocket::bind("0.0.0.0:0"))
        .expect("bind");
    udp.set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .unwrap();
    let udp_port = udp.local_addr().unwrap().port();
    let pki = Pki::new();
    let toml = guard_section(
        &cg,
        "enforce",
        &format!("protect = [\"udp:127.0.0.1:{udp_port}\"]\n"),
    ) + &listener_toml(&pki, "edge", "")
        + &route_toml(
            "orders",
            &[SNI],
            &[SocketAddr::from(([127, 0, 0, 1], port))],
            &[SPIFFE_FRONTEND],
        );
    let _gw = GatewayInNamespace::start(&ns, pki, toml);
    let other = cg.path("other");
    let probe = |ip: &str| {
        let to = SocketAddr::new(ip.parse().unwrap(), port);
        let other = other.clone();
        ns.run(move || connect_from(&other, to))
    };
    // A process that hears of the address the moment it appears (rtnetlink
    // needs no privilege) and tries it at once, before the gateway's maps
    // can know it.
    let gained: std::net::IpAddr = "10.205.0.1".parse().unwrap();
    let racer = {
        let other = other.clone();
        ns.run(move || {
            Racer::start(
                &other,
                SocketAddr::new(gained, port),
                SocketAddr::new(gained, udp_port),
                200,
            )
        })
    };
    ns.ip("addr add 10.205.0.1/24 dev v0");
    let raced = racer.result();
    assert_eq!(
        (raced.connected, raced.sent),
        (0, 0),
        "nothing got through while the maps caught up: {raced:?}"
    );
    let mut buf = [0u8; 16];
    assert!(udp.recv_from(&mut buf).is_err(), "no datagram arrived");
    let until = std::time::Instant::now() + STEP;
    loop {
        match probe("10.205.0.1") {
            Err(e) if e.contains("Operation not permitted") => break,
            Ok(()) => panic!("a connect to the new address got through"),
            other => assert!(
                std::time::Instant::now() < until,
                "an address the host gained after start is refused at connect() within {STEP:?}: {other:?}"
            ),
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // A route that makes a whole prefix this host, followed as well.
    ns.ip("route add local 10.207.0.0/24 dev lo");
    let until = std::time::Instant::now() + STEP;
    loop {
        match probe("10.207.0.33") {
            Err(e) if e.contains("Operation not permitted") => break,
            Ok(()) => panic!("a connect to the AnyIP prefix got through"),
            other => assert!(
                std::time::Instant::now() < until,
                "a local route added after start is refused at connect() within {STEP:?}: {other:?}"
            ),
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let err = probe("127.0.0.2").expect_err("another loopback address");
    assert!(err.contains("Operation not permitted"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_older_than_the_guard_are_closed_when_it_enforces() {
    use gateway_tests::netns::{Kind, socket_in_cgroup};
    use std::io::{Read as _, Write as _};
    let Some((_turn, cg, pki, backend)) = begin().await else {
        return;
    };
    let udp_backend = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_addr = udp_backend.local_addr().unwrap();
    // Opened by a process outside the gateway's cgroup before the guard.
    let mut tcp = std::net::TcpStream::from(
        socket_in_cgroup(&cg.path("other"), Kind::TcpConnected, backend.addr).expect("connect"),
    );
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0u8; 6];
    tcp.write_all(b"before").unwrap();
    tcp.read_exact(&mut buf)
        .expect("the old connection works before the guard");
    let udp = std::net::UdpSocket::from(
        socket_in_cgroup(&cg.path("other"), Kind::UdpConnected, udp_addr).expect("connect"),
    );
    udp.send(b"before")
        .expect("the old UDP socket sends before the guard");

    let toml = gateway_toml(
        &cg,
        &pki,
        &backend,
        &format!("protect = [\"udp:{udp_addr}\"]\n"),
    );
    let gw = RunningGateway::start(&pki, &toml).await;
    let after = tcp
        .write_all(b"after!")
        .and_then(|()| tcp.read_exact(&mut buf));
    assert!(
        after.is_err(),
        "the connection opened before the guard is closed when it starts enforcing"
    );
    assert!(
        udp.send(b"after").is_err() || udp.send(b"after").is_err(),
        "and so is the connected UDP socket"
    );
    let metrics = gw.scrape().await;
    assert!(
        metrics.contains("gateway_guard_older_connections_total{action=\"closed\"} 2"),
        "{metrics}"
    );
}

/// A process killed and reaped when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `sleep` moved into cgroup `dir`, as a service started there would be.
fn sleeper_in(dir: &Path) -> Killed {
    let child = Killed(
        std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("sleep"),
    );
    // spawn returns once the exec is under way, but the kernel renames the
    // process a moment later: wait for the name the gateway will report.
    let comm = format!("/proc/{}/comm", child.0.id());
    let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::fs::read_to_string(&comm).is_ok_and(|c| c.trim() != "sleep") {
        assert!(
            std::time::Instant::now() < until,
            "sleep never became sleep"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    std::fs::write(dir.join("cgroup.procs"), child.0.id().to_string()).expect("move it");
    child
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_keeps_its_cgroup_to_itself() {
    let Some((_turn, cg, pki, backend)) = begin().await else {
        return;
    };
    let toml = gateway_toml(&cg, &pki, &backend, "");
    std::fs::create_dir(cg.path("gw")).expect("the gateway's cgroup");
    let squatter = sleeper_in(&cg.path("gw"));
    let config = gateway::Config::parse(
        &format!("access_log = \"off\"\n{toml}"),
        &pki.path("g.toml"),
        pki.dir.path(),
    )
    .unwrap();
    let err = gateway::build(&config)
        .await
        .err()
        .expect("a gateway refuses a cgroup it would share");
    assert!(
        err.to_string().contains("already holds other processes")
            && err
                .to_string()
                .contains(&format!("{} (sleep)", squatter.0.id())),
        "{err}"
    );
    drop(squatter);

    let gw = RunningGateway::start(&pki, &toml).await;
    let _joiner = sleeper_in(&cg.path("gw"));
    let until = std::time::Instant::now() + STEP;
    loop {
        let metrics = gw.scrape().await;
        if metrics.contains("gateway_guard_cgroup_intruders_total 1") {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "a process that joins the gateway's cgroup is reported within {STEP:?}:\n{metrics}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Runs `f` on a thread with a mount namespace of its own in which
/// /etc/hosts is `hosts` (threads it starts share the view), so a test
/// decides what names resolve to without touching the host's file.
fn with_hosts_file<T: Send + 'static>(hosts: PathBuf, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        gateway_tests::netns::private_mounts();
        // SAFETY: mount on valid NUL-terminated strings, in this thread's
        // own mount namespace.
        unsafe {
            let source = std::ffi::CString::new(hosts.to_str().unwrap()).unwrap();
            assert_eq!(
                libc::mount(
                    source.as_ptr(),
                    c"/etc/hosts".as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null()
                ),
                0,
                "bind the test's hosts file: {}",
                std::io::Error::last_os_error()
            );
        }
        f()
    })
    .join()
    .expect("thread")
}

#[test]
fn a_hostname_backend_is_guarded_at_what_it_resolves_to_before_use() {
    let _turn = TURN.blocking_lock();
    let Some(mount) = bpf_cgroup_or_skip() else {
        return;
    };
    use std::net::ToSocketAddrs as _;
    if "localhost:1".to_socket_addrs().is_err() {
        // Statically linked, as in the VM: no NSS to resolve names with.
        eprintln!("skipped: this build cannot resolve host names");
        return;
    }
    let cg = Cgroups::create(&mount);
    let backend = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
    let port = backend.local_addr().unwrap().port();
    gateway_tests::netns::tcp_echo(backend);
    let hosts_dir = tempfile::tempdir().unwrap();
    let hosts = hosts_dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 guarded.test\n").unwrap();
    let pki = Pki::new();
    // Named addresses only: 127.0.0.3 is not covered as "another local
    // address" of the first one.
    let toml = "admin = \"127.0.0.1:0\"\n".to_owned()
        + &guard_section(&cg, "enforce", "every_local_address = false\n")
        + &listener_toml(&pki, "edge", "")
        + &format!(
            "[[listeners.routes]]\nname = \"orders\"\nserver_names = [\"{SNI}\"]\nbackends = [\"guarded.test:{port}\"]\nallow = [\"{SPIFFE_FRONTEND}\"]\n"
        );
    let other = cg.path("other");
    let moved = hosts.clone();
    let resolved = with_hosts_file(hosts, move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            use std::io::{Read as _, Write as _};
            let gw = RunningGateway::start(&pki, &toml).await;
            let bypass = |ip: [u8; 4]| connect_from(&other, SocketAddr::from((ip, port)));
            bypass([127, 0, 0, 1]).expect_err("resolved at start: protected");
            bypass([127, 0, 0, 3]).expect("not a backend yet");
            // A connection to the address the name is about to move to,
            // made while it is no backend.
            let mut early = std::net::TcpStream::from(
                gateway_tests::netns::socket_in_cgroup(
                    &other,
                    gateway_tests::netns::Kind::TcpConnected,
                    SocketAddr::from(([127, 0, 0, 3], port)),
                )
                .expect("connect before the move"),
            );
            early
                .set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .unwrap();
            // The name moves; the gateway resolves it at its next connect.
            std::fs::write(&moved, "127.0.0.3 guarded.test\n").unwrap();
            let tls = connect(gw.app_addr, SNI, pki.frontend_config())
                .await
                .expect("mTLS to the gateway");
            let data = payload(10_000);
            assert_eq!(echo_roundtrip(tls, data.clone()).await.unwrap(), data);
            let err = bypass([127, 0, 0, 3]).expect_err("protected before the gateway used it");
            assert!(err.contains("Operation not permitted"), "{err}");
            let mut buf = [0u8; 4];
            assert!(
                early
                    .write_all(b"late")
                    .and_then(|()| early.read_exact(&mut buf))
                    .is_err(),
                "the connection made before the gateway resolved the name there is closed"
            );
            // The name moves back and a reload resolves it afresh: what the
            // gateway resolved it to before stays protected (DNS answers
            // with part of a pool at a time).
            std::fs::write(&moved, "127.0.0.1 guarded.test\n").unwrap();
            gw.reload_toml(&pki, &toml).await.expect("reload");
            let err = bypass([127, 0, 0, 3]).expect_err("still protected after a reload");
            assert!(err.contains("Operation not permitted"), "{err}");
            gw.scrape().await
        })
    });
    assert!(
        resolved.contains("gateway_guard_resolved_addresses_total 1"),
        "{resolved}"
    );
    assert!(
        resolved.contains("gateway_guard_older_connections_total{action=\"closed\"} 1"),
        "{resolved}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_connects_does_not_hide_another_process() {
    let Some((_turn, cg, pki, backend)) = begin().await else {
        return;
    };
    let quiet = cg.path("quiet");
    std::fs::create_dir(&quiet).expect("a second cgroup");
    // One summary period for the whole test: the last summary, when the
    // gateway stops, holds every attempt.
    let every_local = backend.addr.port();
    let toml = gateway_toml(&cg, &pki, &backend, "summary_every = \"1h\"\n");
    let gw = RunningGateway::start(&pki, &toml).await;
    let guard = gw.guard.clone().expect("guard");
    let mut summaries = guard.summaries();
    // The quiet process tries once; then one process per CPU floods
    // connects, each to 20000 other loopback addresses at the backend's
    // port: far past the kernel's 64 events per CPU per second, and past
    // the 16384 sources the tallies hold if every destination counted as
    // a source of its own.
    let err = connect_from(&quiet, backend.addr).expect_err("refused");
    assert!(err.contains("Operation not permitted"), "{err}");
    let flooders: Vec<_> = (0..2)
        .map(|_| {
            let other = cg.path("other");
            let to = std::net::SocketAddr::from(([127, 0, 0, 1], every_local));
            std::thread::spawn(move || reach_from(&other, to, Probe::TcpConnectsSpread(20_000)))
        })
        .collect();
    for f in flooders {
        f.join().expect("flooder").expect("flooded");
    }
    let metrics = gw.scrape().await;
    assert!(
        metrics.contains("gateway_guard_connects_total{verdict=\"deny\"} 40001"),
        "every attempt refused and counted:\n{metrics}"
    );
    drop(guard);
    drop(gw);
    let quiet_id = gateway::ebpf::cgroup_id(&quiet).unwrap();
    let summary = tokio::time::timeout(STEP, summaries.recv())
        .await
        .expect("the last summary, when the gateway stops")
        .expect("summaries");
    let named = summary
        .iter()
        .find(|t| t.cgroup == quiet_id)
        .unwrap_or_else(|| panic!("the quiet process is named among {} sources", summary.len()));
    assert_eq!((named.attempts, named.destination), (1, backend.addr));
    assert_eq!(summary.len(), 2, "two sources: {summary:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_detached_program_or_a_removed_pin_is_put_back() {
    let Some((_turn, cg, pki, backend)) = begin().await else {
        return;
    };
    let toml = gateway_toml(&cg, &pki, &backend, "");
    let gw = RunningGateway::start(&pki, &toml).await;
    let bypass = || connect_from(&cg.path("other"), backend.addr);
    bypass().expect_err("protected");
    let pin = |program: &str| {
        std::fs::read_dir(&cg.pins)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(&format!("link-{program}-"))
            })
            .unwrap_or_else(|| panic!("a pinned {program} link"))
    };
    // Whoever can (root, CAP_NET_ADMIN): both programs that judge a TCP
    // connect are taken off their hook, and another link loses its pin.
    for program in ["connect4", "local_egress"] {
        gateway_tests::bpf::detach_pinned_link(&pin(program)).expect("detach");
    }
    let unpinned = pin("sendmsg4");
    std::fs::remove_file(&unpinned).unwrap();
    let until = std::time::Instant::now() + STEP;
    loop {
        let metrics = gw.scrape().await;
        if metrics.contains("gateway_guard_repairs_total 3") {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "the guard puts back what was undone within {STEP:?}:\n{metrics}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let err = bypass().expect_err("attached again");
    assert!(err.contains("Operation not permitted"), "{err}");
    assert!(unpinned.exists(), "pinned again");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_changes_the_summary_period() {
    let Some((_turn, cg, pki, backend)) = begin().await else {
        return;
    };
    let routes = listener_toml(&pki, "edge", "")
        + &route_toml("orders", &[SNI], &[backend.addr], &[SPIFFE_FRONTEND]);
    let config = |every: &str| {
        format!(
            "admin = \"127.0.0.1:0\"\n{}{routes}",
            guard_section(&cg, "enforce", &format!("summary_every = \"{every}\"\n"))
        )
    };
    let gw = RunningGateway::start(&pki, &config("1h")).await;
    let mut summaries = gw.guard.as_ref().expect("guard").summaries();
    gw.reload_toml(&pki, &config("1s")).await.expect("reload");
    connect_from(&cg.path("other"), backend.addr).expect_err("refused");
    let summary = tokio::time::timeout(STEP, summaries.recv())
        .await
        .expect("a summary within the new period, not the old hour")
        .expect("summaries");
    assert_eq!(summary.len(), 1, "{summary:?}");
}

#[test]
fn addresses_the_maps_cannot_take_are_counted() {
    let Some((_turn, ns, cg)) = in_a_namespace("ggo") else {
        return;
    };
    let pki = Pki::new();
    let toml = "admin = \"127.0.0.1:0\"\n".to_owned()
        + &guard_section(&cg, "enforce", "")
        + &listener_toml(&pki, "edge", "")
        + &route_toml(
            "orders",
            &[SNI],
            &[SocketAddr::from(([127, 0, 0, 1], 7101))],
            &[SPIFFE_FRONTEND],
        );
    let gw = GatewayInNamespace::start(&ns, pki, toml);
    // More addresses than the maps hold (4096).
    ns.add_addresses("v0", 4200);
    let until = std::time::Instant::now() + STEP * 2;
    loop {
        let metrics = gw.scrape();
        let failed = metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix("gateway_guard_address_watch_failures_total{stage=\"apply\"} ")
            })
            .and_then(|n| n.parse::<u64>().ok());
        if failed.is_some_and(|n| n >= 1) {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "the maps could not take the addresses, and that is counted: {metrics}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `user = "nobody"` with the guard: every thread of the binary keeps
/// exactly the capabilities README's table gives the guard (CAP_BPF,
/// CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_DAC_OVERRIDE), and they are enough:
/// a reload as nobody protects a new backend at once.
#[tokio::test(flavor = "multi_thread")]
async fn as_nobody_the_guard_keeps_its_documented_capabilities_and_still_works() {
    use gateway_tests::process::*;
    if !user_exists("nobody") {
        // The VM's busybox system has no user database.
        eprintln!("skipped: no user nobody to drop to");
        return;
    }
    let Some((_turn, cg, pki, backend)) = begin().await else {
        return;
    };
    let second = EchoBackend::start().await;
    let config = |backends: &[SocketAddr]| {
        "user = \"nobody\"\naccess_log = \"off\"\n".to_owned()
            + &guard_section(&cg, "enforce", "")
            + &listener_toml(&pki, "edge", "")
            + &route_toml("orders", &[SNI], backends, &[SPIFFE_FRONTEND])
    };
    // Root's, in directories root's alone (not /tmp): a start as root
    // with `user` refuses any other; readable by nobody, who reloads it.
    let etc = gateway_tests::root_only_tempdir();
    std::fs::set_permissions(
        etc.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = etc.path().join("gateway.toml");
    std::fs::write(&path, config(&[backend.addr])).unwrap();
    give_to_nobody(&pki);
    let stderr = pki.path("gateway.stderr");
    let gw = run_binary(&path, &stderr, &[]);
    let addr = wait_listening(&stderr);
    process::wait_for("the drop", || {
        process::log_count(&stderr, "dropped privileges") == 1
    });

    /// CAP_DAC_OVERRIDE (1), CAP_NET_ADMIN (12), CAP_SYS_ADMIN (21), CAP_BPF (39).
    const GUARD_CAPS: u64 = (1 << 1) | (1 << 12) | (1 << 21) | (1 << 39);
    let threads = credentials_of(gw.0.id());
    assert!(threads.len() > 1, "{threads:?}");
    for (uid, _, prm, eff) in &threads {
        assert_eq!(
            (uid.as_str(), *prm, *eff),
            ("65534 65534 65534 65534", GUARD_CAPS, GUARD_CAPS),
            "{threads:?}"
        );
    }
    let tls = connect(addr, SNI, pki.frontend_config()).await.unwrap();
    assert_eq!(
        echo_roundtrip(tls, payload(1000)).await.unwrap(),
        payload(1000)
    );
    let err = connect_from(&cg.path("other"), backend.addr).expect_err("bypass refused");
    assert!(err.contains("Operation not permitted"), "{err}");

    // A reload as nobody: the new backend is protected at once.
    connect_from(&cg.path("other"), second.addr).expect("not a backend yet");
    std::fs::write(&path, config(&[backend.addr, second.addr])).unwrap();
    signal(&gw.0, "HUP");
    process::wait_for("a reload", || process::log_count(&stderr, "reloaded") >= 1);
    let err = connect_from(&cg.path("other"), second.addr).expect_err("new backend protected");
    assert!(err.contains("Operation not permitted"), "{err}");
    assert_eq!(credentials_of(gw.0.id())[0].0, "65534 65534 65534 65534");
}

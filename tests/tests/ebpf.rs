//! The local guard on this kernel: in a cgroup subtree made for the test, a
//! process outside the gateway's cgroup gets EPERM connecting to a protected
//! backend, the gateway's cgroup connects, audit counts and lets through, and
//! updates apply in place. Root only; skips with a message otherwise.

use std::net::TcpListener;
use std::path::{Path, PathBuf};

use gateway::ebpf::{Enforcement, GuardSpec, LocalGuard, Protected, Protocol, Target};
use gateway_tests::{bpf_cgroup_or_skip, connect_from, send_udp_from};

/// A cgroup v2 subtree (with `gw` and `other` leaves) removed when the test
/// ends, pass or fail.
struct TestCgroups {
    root: PathBuf,
}

impl TestCgroups {
    fn create(mount: &Path) -> TestCgroups {
        // Unique per test in this binary (tests run in parallel threads).
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let root = mount.join(format!("gateway-guard-test-{}-{n}", std::process::id()));
        for dir in [root.clone(), root.join("gw"), root.join("other")] {
            std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        }
        TestCgroups { root }
    }

    fn leaf(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

impl Drop for TestCgroups {
    fn drop(&mut self) {
        // Processes leave a cgroup when they exit; then it can go.
        for dir in [self.leaf("gw"), self.leaf("other"), self.root.clone()] {
            let mut removed = false;
            for _ in 0..50 {
                if std::fs::remove_dir(&dir).is_ok() {
                    removed = true;
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            if !removed {
                eprintln!("warning: could not remove {}", dir.display());
            }
        }
    }
}

#[test]
fn only_the_gateway_cgroup_reaches_protected_backends() {
    let Some(mount) = bpf_cgroup_or_skip() else {
        return;
    };
    let cg = TestCgroups::create(&mount);
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let protected = backend.local_addr().unwrap();
    let other_service = TcpListener::bind("127.0.0.1:0").unwrap();
    let unprotected = other_service.local_addr().unwrap();
    let v6 = TcpListener::bind("[::1]:0").ok();

    let mut spec = GuardSpec {
        protected: vec![protected.into()],
        gateway_cgroup: cg.leaf("gw"),
        gateway_uid: None,
        enforcement: Enforcement::Enforce,
        pin_dir: None,
        local_addresses: Vec::new(),
        every_local_address: true,
    };
    if let Some(v6) = &v6 {
        spec.protected.push(v6.local_addr().unwrap().into());
    }
    let mut guard = LocalGuard::install(&cg.root, &spec).expect("install the guard");

    let err = connect_from(&cg.leaf("other"), protected).expect_err("bypass must be refused");
    assert!(
        err.contains("Operation not permitted"),
        "EPERM expected: {err}"
    );
    connect_from(&cg.leaf("other"), unprotected).expect("unprotected services stay reachable");
    connect_from(&cg.leaf("gw"), protected).expect("the gateway reaches its backend");
    if let Some(v6) = &v6 {
        let err = connect_from(&cg.leaf("other"), v6.local_addr().unwrap())
            .expect_err("IPv6 bypass refused");
        assert!(err.contains("Operation not permitted"), "{err}");
    }
    let c = guard.counters().unwrap();
    assert_eq!(
        (c.allowed, c.refused),
        (1, 1 + u64::from(v6.is_some())),
        "{c:?}"
    );
    assert_eq!(guard.attempts(protected).unwrap(), 1);

    // A new backend is protected at once, programs still attached.
    spec.protected.push(unprotected.into());
    guard.update(&spec).unwrap();
    let err = connect_from(&cg.leaf("other"), unprotected).expect_err("newly protected");
    assert!(err.contains("Operation not permitted"), "{err}");
    connect_from(&cg.leaf("other"), protected).expect_err("still protected during the update");

    // Audit: counted, let through.
    spec.enforcement = Enforcement::Audit;
    guard.update(&spec).unwrap();
    connect_from(&cg.leaf("other"), protected).expect("audit lets it through");
    assert_eq!(guard.counters().unwrap().audited, 1);
    assert_eq!(guard.attempts(protected).unwrap(), 3);

    // With the gateway's uid set, its cgroup alone is not enough: the probe
    // runs as root (uid 0), so uid 0 passes and any other is refused.
    spec.enforcement = Enforcement::Enforce;
    spec.gateway_uid = Some(0);
    guard.update(&spec).unwrap();
    connect_from(&cg.leaf("gw"), protected).expect("the gateway's cgroup and uid");
    spec.gateway_uid = Some(4242);
    guard.update(&spec).unwrap();
    let err = connect_from(&cg.leaf("gw"), protected).expect_err("the right cgroup, another uid");
    assert!(err.contains("Operation not permitted"), "{err}");
    spec.gateway_uid = None;

    // Removing a backend from the set unprotects it.
    spec.enforcement = Enforcement::Enforce;
    spec.protected.retain(|p| *p != unprotected.into());
    guard.update(&spec).unwrap();
    connect_from(&cg.leaf("other"), unprotected).expect("no longer protected");

    drop(guard);
    connect_from(&cg.leaf("other"), protected).expect("detached with the guard");
}

/// Removes the test's pins even when the test fails.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = gateway::ebpf::uninstall(&self.0);
    }
}

#[test]
fn pinned_protection_outlives_the_gateway_and_a_restart_takes_over() {
    let Some(mount) = bpf_cgroup_or_skip() else {
        return;
    };
    let cg = TestCgroups::create(&mount);
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/gateway-test-{}",
        std::process::id()
    )));
    let first = TcpListener::bind("127.0.0.1:0").unwrap();
    let second = TcpListener::bind("127.0.0.1:0").unwrap();
    let (a, b) = (first.local_addr().unwrap(), second.local_addr().unwrap());
    let mut spec = GuardSpec {
        protected: vec![a.into()],
        gateway_cgroup: cg.leaf("gw"),
        gateway_uid: None,
        enforcement: Enforcement::Enforce,
        pin_dir: Some(pins.0.clone()),
        local_addresses: Vec::new(),
        every_local_address: true,
    };

    // The gateway exits: its guard object goes, the protection stays.
    drop(LocalGuard::install(&cg.root, &spec).expect("install pinned"));
    let err = connect_from(&cg.leaf("other"), a).expect_err("still protected after exit");
    assert!(err.contains("Operation not permitted"), "{err}");

    // A restart with another backend set takes over the same maps.
    spec.protected = vec![b.into()];
    let restarted = LocalGuard::install(&cg.root, &spec).expect("reinstall");
    connect_from(&cg.leaf("other"), a).expect("no longer a backend: unprotected");
    connect_from(&cg.leaf("other"), b).expect_err("new backend protected");
    assert_eq!(
        restarted.counters().unwrap().refused,
        2,
        "counters carried over in the pinned maps"
    );
    for program in ["connect4", "connect6", "sendmsg4", "sendmsg6"] {
        let links = std::fs::read_dir(&pins.0)
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("link-{program}-"))
            })
            .count();
        assert_eq!(links, 1, "one {program} link after the takeover");
    }
    drop(restarted);

    // Uninstall removes everything it installed.
    let out = gateway_tests::uninstall_with_binary(&pins.0);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!pins.0.exists());
    connect_from(&cg.leaf("other"), b).expect("guard off after uninstall");
}

/// Two TCP listeners on consecutive ports, for a range rule.
fn consecutive_listeners() -> (TcpListener, TcpListener) {
    for _ in 0..50 {
        let first = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = first.local_addr().unwrap().port();
        if port < u16::MAX
            && let Ok(second) = TcpListener::bind(("127.0.0.1", port + 1))
        {
            return (first, second);
        }
    }
    panic!("no two consecutive free ports on 127.0.0.1");
}

#[test]
fn udp_datagrams_and_port_ranges_are_guarded_too() {
    let Some(mount) = bpf_cgroup_or_skip() else {
        return;
    };
    let cg = TestCgroups::create(&mount);
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    let udp_addr = udp.local_addr().unwrap();
    // The same port number over TCP is another service: not protected.
    let tcp_same_port = TcpListener::bind(udp_addr).ok();
    let (low, high) = consecutive_listeners();
    let (low, high) = (low.local_addr().unwrap(), high.local_addr().unwrap());
    let outside = TcpListener::bind("127.0.0.1:0").unwrap();
    let outside = outside.local_addr().unwrap();

    let range: Protected = format!("tcp:127.0.0.1:{}-{}", low.port(), high.port())
        .parse()
        .unwrap();
    let spec = GuardSpec {
        protected: vec![format!("udp:{udp_addr}").parse().unwrap(), range],
        gateway_cgroup: cg.leaf("gw"),
        gateway_uid: None,
        enforcement: Enforcement::Enforce,
        pin_dir: None,
        local_addresses: Vec::new(),
        every_local_address: true,
    };
    let guard = LocalGuard::install(&cg.root, &spec).expect("install the guard");

    let err = send_udp_from(&cg.leaf("other"), udp_addr).expect_err("datagram bypass refused");
    assert!(err.contains("Operation not permitted"), "EPERM: {err}");
    send_udp_from(&cg.leaf("gw"), udp_addr).expect("the gateway sends");
    let mut buf = [0u8; 16];
    let (n, _) = udp
        .recv_from(&mut buf)
        .expect("the gateway's datagram arrives");
    assert_eq!(&buf[..n], b"probe");
    if tcp_same_port.is_some() {
        connect_from(&cg.leaf("other"), udp_addr)
            .expect("TCP on the UDP rule's port is not protected");
    }

    for port in [low, high] {
        let err = connect_from(&cg.leaf("other"), port).expect_err("every port of the range");
        assert!(err.contains("Operation not permitted"), "{port}: {err}");
    }
    connect_from(&cg.leaf("gw"), high).expect("the gateway reaches the range");
    connect_from(&cg.leaf("other"), outside).expect("outside the range is open");

    let udp_target = Target {
        protocol: Protocol::Udp,
        addr: udp_addr,
    };
    assert_eq!(guard.attempts_on(udp_target).unwrap(), 1);
    assert_eq!(
        guard.attempts(low).unwrap(),
        2,
        "one counter for the whole range"
    );
    assert_eq!(guard.attempts(high).unwrap(), 2);
}

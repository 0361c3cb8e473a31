//! The remote guard on three hosts made of network namespaces: a client, the
//! gateway and a backend, joined by veth pairs, with the gateway's namespace
//! routing between the other two. On the backend, `gateway guard --config`
//! lets only the gateway's addresses reach the protected ports.
//!
//! Needs root and iproute2 (`ip netns`); skips with a message otherwise.
//! Everything it creates (namespaces, veths, processes) goes when it ends,
//! failed or not.

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use gateway_tests::netns::*;
use gateway_tests::*;

/// Namespaces named after this process, so parallel runs never collide.
struct Topology {
    prefix: String,
}

const CLIENT_V4: &str = "10.200.1.2";
const GATEWAY_CLIENT_SIDE_V4: &str = "10.200.1.1";
const GATEWAY_BACKEND_SIDE_V4: &str = "10.200.2.1";
const BACKEND_V4: &str = "10.200.2.2";
const GATEWAY_BACKEND_SIDE_V6: &str = "fd00:2::1";
const BACKEND_V6: &str = "fd00:2::2";

impl Topology {
    fn new() -> Topology {
        let t = Topology {
            prefix: format!("grg{}", std::process::id()),
        };
        for ns in ["c", "g", "b"] {
            ip(&["netns", "add", &t.ns(ns)]);
        }
        let (c, g, b) = (t.ns("c"), t.ns("g"), t.ns("b"));
        ip(&[
            "link", "add", "c0", "netns", &c, "type", "veth", "peer", "name", "g0", "netns", &g,
        ]);
        ip(&[
            "link", "add", "g1", "netns", &g, "type", "veth", "peer", "name", "b0", "netns", &b,
        ]);
        let x = |ns: &str, cmd: &str| {
            let mut args = vec!["-n", ns];
            args.extend(cmd.split_whitespace());
            ip(&args);
        };
        for (ns, dev) in [
            (&c, "lo"),
            (&c, "c0"),
            (&g, "lo"),
            (&g, "g0"),
            (&g, "g1"),
            (&b, "lo"),
            (&b, "b0"),
        ] {
            x(ns, &format!("link set {dev} up"));
        }
        x(&c, &format!("addr add {CLIENT_V4}/24 dev c0"));
        x(
            &c,
            &format!("route add default via {GATEWAY_CLIENT_SIDE_V4}"),
        );
        x(&c, "addr add fd00:1::2/64 dev c0 nodad");
        x(&c, "-6 route add default via fd00:1::1");
        x(&g, &format!("addr add {GATEWAY_CLIENT_SIDE_V4}/24 dev g0"));
        x(&g, &format!("addr add {GATEWAY_BACKEND_SIDE_V4}/24 dev g1"));
        x(&g, "addr add fd00:1::1/64 dev g0 nodad");
        x(
            &g,
            &format!("addr add {GATEWAY_BACKEND_SIDE_V6}/64 dev g1 nodad"),
        );
        x(&b, &format!("addr add {BACKEND_V4}/24 dev b0"));
        x(
            &b,
            &format!("route add default via {GATEWAY_BACKEND_SIDE_V4}"),
        );
        x(&b, &format!("addr add {BACKEND_V6}/64 dev b0 nodad"));
        x(
            &b,
            &format!("-6 route add default via {GATEWAY_BACKEND_SIDE_V6}"),
        );
        // The gateway's namespace routes, so a client can try the backend directly.
        for key in ["net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"] {
            in_netns(&g, move || std::fs::write(format!("/proc/sys/{key}"), "1")).expect(key);
        }
        t
    }

    fn ns(&self, which: &str) -> String {
        format!("{}{which}", self.prefix)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth ends (and so their peers).
        for ns in ["c", "g", "b"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(ns)])
                .status();
        }
    }
}

/// A TCP connect from the client's namespace: Ok, or why not (a dropped SYN
/// shows as a timeout).
fn connect_from_client(t: &Topology, addr: SocketAddr) -> Result<TcpStream, String> {
    in_netns(&t.ns("c"), move || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(700)).map_err(|e| e.to_string())
    })
}

/// `gateway guard --config` in the backend's namespace, once it protects.
fn start_guard(t: &Topology, config: &Path, log: PathBuf) -> Proc {
    start_remote_guard(&t.ns("b"), config, log)
}

/// The guard's metrics endpoint, inside the backend's namespace.
const GUARD_ADMIN: &str = "127.0.0.1:9902";

/// One metric's value from the guard's `GET /metrics`, read in the
/// backend's namespace.
fn guard_metric(t: &Topology, series: &str) -> u64 {
    metric_in(&t.ns("b"), GUARD_ADMIN.parse().unwrap(), series)
        .unwrap_or_else(|| panic!("no {series} on the guard's metrics endpoint"))
}

/// guard.toml for the backend: TC on its interface, the socket layer on
/// the test's cgroup (where the backends' sockets live; never the host's
/// root cgroup, which would judge every socket on the machine).
fn write_guard_toml(path: &Path, pins: &Path, cgroup: &Path, protect: &str, enforcement: &str) {
    std::fs::write(
        path,
        format!(
            "interfaces = [\"b0\"]\ncgroup = \"{}\"\nallow = [\"{GATEWAY_BACKEND_SIDE_V4}\", \"{GATEWAY_BACKEND_SIDE_V6}/128\"]\n\
             protect = [{protect}]\nenforcement = \"{enforcement}\"\npin_dir = \"{}\"\n\
             admin = \"{GUARD_ADMIN}\"\n",
            cgroup.display(),
            pins.display()
        ),
    )
    .expect("guard.toml");
}

#[test]
fn only_the_gateway_reaches_protected_backend_ports() {
    let Some(mount) = bpf_cgroup_or_skip() else {
        return;
    };
    if !netns_or_skip() {
        return;
    }
    let t = Topology::new();
    let cg = TestCgroup::create(&mount, "grg");
    let dir = tempfile::tempdir().expect("tempdir");
    let backend: SocketAddr = format!("{BACKEND_V4}:9000").parse().unwrap();
    let backend_v6: SocketAddr = format!("[{BACKEND_V6}]:9000").parse().unwrap();
    let unprotected: SocketAddr = format!("{BACKEND_V4}:9100").parse().unwrap();
    for addr in [backend, backend_v6, unprotected] {
        echo_in_cgroup(&t.ns("b"), &cg.path(), addr);
    }
    let udp = udp_in_cgroup(
        &t.ns("b"),
        &cg.path(),
        format!("{BACKEND_V4}:9002").parse().unwrap(),
    );

    // Before the guard: the client reaches the backend around the gateway.
    connect_from_client(&t, backend).expect("no guard yet: direct connect works");

    let guard_toml = dir.path().join("guard.toml");
    let pins = Pins::new("gateway-test-remote-");
    write_guard_toml(
        &guard_toml,
        &pins.0,
        cg.rel(),
        "\"tcp:9000-9001\", \"udp:9002\"",
        "enforce",
    );
    let bin = gateway_binary();
    let bin = bin.to_str().expect("utf-8 path");
    let mut guard = start_guard(&t, &guard_toml, dir.path().join("guard.log"));

    // The gateway in its namespace, routing to the backend.
    let pki = Pki::new();
    let mut toml = listener_toml(&pki, "edge", "");
    toml = toml.replace("127.0.0.1:0", &format!("{GATEWAY_CLIENT_SIDE_V4}:0"));
    toml.push_str(&route_toml(
        "orders",
        &["orders.example.internal"],
        &[backend],
        &[SPIFFE_FRONTEND],
    ));
    let config = pki.write("gateway.toml", &format!("access_log = \"off\"\n{toml}"));
    let gw_log = dir.path().join("gateway.log");
    let _gateway = Proc::spawn(
        in_netns_command(
            &t.ns("g"),
            &[
                bin,
                "--log-format",
                "json",
                "run",
                "--config",
                config.to_str().unwrap(),
            ],
        ),
        gw_log.clone(),
    );
    let gw_addr = listening_addr(&gw_log).expect("gateway listening");

    // Direct: dropped at the backend, IPv4 and IPv6.
    let direct = connect_from_client(&t, backend);
    assert!(
        direct.is_err(),
        "a direct connect to a protected port is refused"
    );
    let direct6 = connect_from_client(&t, backend_v6);
    assert!(direct6.is_err(), "and over IPv6");
    // An unprotected port on the same host still answers.
    connect_from_client(&t, unprotected).expect("unprotected port open");
    // UDP to a protected port: dropped from the client, passed from the gateway.
    in_netns(&t.ns("c"), || {
        UdpSocket::bind("0.0.0.0:0")
            .and_then(|s| s.send_to(b"stranger", format!("{BACKEND_V4}:9002")))
            .expect("send")
    });
    let mut buf = [0u8; 64];
    assert!(
        udp.recv_from(&mut buf).is_err(),
        "the client's datagram was dropped"
    );
    in_netns(&t.ns("g"), || {
        UdpSocket::bind(format!("{GATEWAY_BACKEND_SIDE_V4}:0"))
            .and_then(|s| s.send_to(b"gateway", format!("{BACKEND_V4}:9002")))
            .expect("send")
    });
    let (n, _) = udp
        .recv_from(&mut buf)
        .expect("the gateway's datagram arrives");
    assert_eq!(&buf[..n], b"gateway");

    // Through the gateway: mTLS, then the gateway's own connect passes.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stream = connect_from_client(&t, gw_addr).expect("client reaches the gateway");
    rt.block_on(async {
        stream.set_nonblocking(true).unwrap();
        let tcp = tokio::net::TcpStream::from_std(stream).unwrap();
        let name = rustls::pki_types::ServerName::try_from("orders.example.internal").unwrap();
        let tls = tokio_rustls::TlsConnector::from(pki.frontend_config())
            .connect(name, tcp)
            .await
            .expect("mTLS handshake with the gateway");
        let data = payload(1 << 20);
        let got = echo_roundtrip(tls, data.clone())
            .await
            .expect("echo through the gateway");
        assert!(got == data, "byte-exact through the gateway");
    });

    // Every refusal was logged with who tried what.
    guard.wait_for("bypass attempt", 1);
    let log = guard.log();
    assert!(
        log.contains(CLIENT_V4) && log.contains(&format!("{BACKEND_V4}:9000")),
        "the event names source and destination:\n{log}"
    );

    // And counted, in total and per rule, on the guard's metrics endpoint.
    assert!(
        guard_metric(
            &t,
            "gateway_guard_ingress_packets_total{layer=\"tc\",verdict=\"drop\"}"
        ) >= 2
    );
    assert!(guard_metric(&t, "gateway_guard_rule_drops_total{rule=\"tcp:9000-9001\"}") >= 2);
    assert_eq!(
        guard_metric(&t, "gateway_guard_rule_drops_total{rule=\"udp:9002\"}"),
        1,
        "the one stranger's datagram"
    );
    assert!(
        guard_metric(
            &t,
            "gateway_guard_ingress_packets_total{layer=\"tc\",verdict=\"allow\"}"
        ) >= 1
    );

    // Every reload below protects the same ports; only the mode changes.
    let reload = |guard: &mut Proc, mode: &str, nth: usize| {
        write_guard_toml(
            &guard_toml,
            &pins.0,
            cg.rel(),
            "\"tcp:9000-9001\", \"udp:9002\", \"tcp:9100\"",
            mode,
        );
        guard.signal(libc::SIGHUP);
        guard.wait_for("guard: reloaded", nth);
    };
    // Reload adds a port without a gap: 9100 is refused from now on.
    reload(&mut guard, "enforce", 1);
    assert!(
        connect_from_client(&t, unprotected).is_err(),
        "9100 is protected after the reload"
    );
    assert!(
        connect_from_client(&t, backend).is_err(),
        "9000 stayed protected"
    );

    // Audit: bypasses pass and are counted and logged as such.
    reload(&mut guard, "audit", 2);
    connect_from_client(&t, backend).expect("audit lets the bypass through");
    guard.wait_for("\"verdict\":\"audit\"", 1);

    // Stopping says what it counted, and protection stays pinned.
    reload(&mut guard, "enforce", 3);
    guard.signal(libc::SIGTERM);
    guard.wait_for("guard: stopping", 1);
    let status = guard.child.wait().expect("guard exits");
    assert!(status.success(), "{status}");
    let log = guard.log();
    assert!(log.contains("\"dropped\":"), "{log}");
    let audit_events = |layer: &str| {
        log.lines()
            .filter(|l| {
                l.contains("\"guard: bypass attempt\"")
                    && l.contains("\"verdict\":\"audit\"")
                    && l.contains(&format!("\"layer\":\"{layer}\""))
            })
            .count()
    };
    assert_eq!(
        (audit_events("tc"), audit_events("socket")),
        (1, 1),
        "an audited connection is one event per layer (its SYN), not one per packet:\n{log}"
    );
    assert!(
        connect_from_client(&t, backend).is_err(),
        "no guard process, still protected"
    );
    let from_gateway = |addr: SocketAddr| {
        in_netns(&t.ns("g"), move || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(700)).map(drop)
        })
    };
    from_gateway(backend).expect("the gateway still passes");

    // A restart takes over the pinned program and maps: protected throughout,
    // a rule dropped from the file is dropped from the kernel, and the
    // bypass counters carry on.
    write_guard_toml(
        &guard_toml,
        &pins.0,
        cg.rel(),
        "\"tcp:9000-9001\"",
        "enforce",
    );
    let mut guard = start_guard(&t, &guard_toml, dir.path().join("guard-restarted.log"));
    assert!(
        connect_from_client(&t, backend).is_err(),
        "still protected after the restart"
    );
    connect_from_client(&t, unprotected).expect("9100 left the file, so it is open again");
    from_gateway(backend).expect("the gateway passes after the restart");
    guard.signal(libc::SIGTERM);
    guard.wait_for("guard: stopping", 1);
    let log = guard.log();
    let dropped = |log: &str| -> u64 {
        let at = log.rfind("\"dropped\":").expect("dropped count") + "\"dropped\":".len();
        log[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .expect("a number")
    };
    assert!(
        dropped(&log) > dropped(&std::fs::read_to_string(dir.path().join("guard.log")).unwrap()),
        "the restarted guard counts on from the pinned counters:\n{log}"
    );
    drop(guard);

    // Uninstall removes everything: the bypass works again, no pins are left.
    let out = in_netns_command(
        &t.ns("b"),
        &[
            bin,
            "guard",
            "--uninstall",
            "--config",
            guard_toml.to_str().unwrap(),
        ],
    )
    .output()
    .expect("uninstall");
    assert!(
        out.status.success(),
        "uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!pins.0.exists(), "the pin directory is gone");
    // The kernel releases an unpinned link from a work queue, a moment after
    // the unlink returns (long enough under TCG to drop one SYN).
    let until = Instant::now() + STEP;
    while let Err(e) = connect_from_client(&t, backend) {
        assert!(
            Instant::now() < until,
            "uninstalled: the direct connect works again within {STEP:?}: {e}"
        );
    }
}

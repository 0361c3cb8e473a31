//! `cargo run -p gateway-tests --bin local_guard_cost [PACKETS]` (root):
//! what the local guard's packet programs cost per run, measured in a
//! network namespace and cgroup subtree this tool makes (and removes).
//!
//! `local_egress` runs for every packet a socket in the subtree sends (it
//! reads the headers of UDP datagrams and TCP SYNs, and only the socket's
//! state for other TCP packets); `local_ingress` for every packet a socket
//! there receives (one map lookup by the socket's port unless it is a
//! local backend's). Measured: PACKETS UDP datagrams to a port no rule
//! covers and to a protected backend from the gateway's cgroup, and a TCP
//! stream of PACKETS 1 KiB writes between two processes of the subtree.
//! Time inside each program per run comes from the kernel's BPF run-time
//! statistics, switched on for the measurement only.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use gateway::ebpf::{Enforcement, GuardSpec, LocalGuard, Protected};
use gateway_tests::bpf::enable_run_time_stats;
use gateway_tests::netns::*;

/// Sends `packets` UDP datagrams of 64 bytes to `to` from a child in
/// `cgroup` (so the egress program judges each as the guarded subtree's).
fn udp_from(cgroup: &Path, to: SocketAddr, packets: u64) {
    let (at, len) = sockaddr(to);
    let sender = fork_into(Some(cgroup), || {
        let data = [0u8; 64];
        // SAFETY: raw system calls on data prepared before the fork.
        unsafe {
            let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            for _ in 0..packets {
                libc::sendto(
                    s,
                    data.as_ptr().cast(),
                    data.len(),
                    0,
                    std::ptr::from_ref(&at).cast(),
                    len,
                );
            }
        }
        0
    });
    assert_eq!(sender.wait(), 0, "the sender joined its cgroup");
}

fn stats(guard: &LocalGuard) -> Vec<(&'static str, u64, u128)> {
    guard
        .program_stats()
        .into_iter()
        .filter(|(name, _, _)| name.starts_with("local_"))
        .map(|(name, runs, time)| (name, runs, time.as_nanos()))
        .collect()
}

fn report(what: &str, before: &[(&str, u64, u128)], after: &[(&str, u64, u128)]) {
    for ((name, r0, t0), (_, r1, t1)) in before.iter().zip(after) {
        let runs = r1 - r0;
        let ns = if runs == 0 {
            0.0
        } else {
            (t1 - t0) as f64 / runs as f64
        };
        println!("| {what} | {name} | {runs} | {ns:.1} |");
    }
}

fn main() {
    let packets: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let Some(mount) = gateway::ebpf::cgroup2_mount() else {
        eprintln!("local_guard_cost needs cgroup v2");
        std::process::exit(2);
    };
    let ns = Netns::new("glcost");
    ns.ip("link add v0 type veth peer name v1");
    ns.ip("link set v0 up");
    ns.ip("addr add 10.214.0.1/24 dev v0");
    let mut cg = TestCgroup::create(&mount, "glcost");
    let (gw, other, backend_cg) = (cg.leaf("gw"), cg.leaf("other"), cg.leaf("backend"));
    // Receivers live in the subtree, so the ingress program runs for them.
    let open_udp = udp_in_cgroup(ns.name(), &backend_cg, "127.0.0.1:0".parse().unwrap());
    let protected_udp = udp_in_cgroup(ns.name(), &backend_cg, "127.0.0.1:0".parse().unwrap());
    let drain = |s: std::net::UdpSocket| {
        s.set_read_timeout(None).expect("blocking");
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while s.recv_from(&mut buf).is_ok() {}
        })
    };
    let (open_at, protected_at) = (
        open_udp.local_addr().unwrap(),
        protected_udp.local_addr().unwrap(),
    );
    let listener = std::net::TcpListener::from(
        ns.run({
            let cg = backend_cg.clone();
            move || socket_in_cgroup(&cg, Kind::TcpListener, "127.0.0.1:0".parse().unwrap())
        })
        .expect("listener"),
    );
    let stream_at = listener.local_addr().unwrap();
    let local_addresses = ns
        .run(gateway::netlink::local_addresses)
        .expect("addresses");
    let guard = LocalGuard::install(
        &cg.path(),
        &GuardSpec {
            protected: vec![
                format!("udp:{protected_at}").parse::<Protected>().unwrap(),
                Protected::from(SocketAddr::from((Ipv4Addr::new(127, 0, 0, 1), 1))),
            ],
            gateway_cgroup: gw.clone(),
            gateway_uid: None,
            enforcement: Enforcement::Enforce,
            pin_dir: None,
            local_addresses,
            every_local_address: true,
        },
    )
    .expect("install the guard");
    let _stats = enable_run_time_stats().expect("BPF run-time statistics");
    let (_a, _b) = (drain(open_udp), drain(protected_udp));
    println!("| traffic | program | runs | ns/run |");
    println!("|---|---|---|---|");
    for (what, cgroup, to) in [
        ("UDP to a port no rule covers", &other, open_at),
        (
            "UDP from the gateway to a protected backend",
            &gw,
            protected_at,
        ),
    ] {
        let warm = cgroup.clone();
        ns.run(move || udp_from(&warm, to, packets / 10));
        let before = stats(&guard);
        let cgroup = cgroup.clone();
        ns.run(move || udp_from(&cgroup, to, packets));
        report(what, &before, &stats(&guard));
    }
    // A TCP stream between two processes of the subtree (the sender's
    // socket made in `other`): established packets both ways.
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = [0u8; 65536];
        while s.read(&mut buf).is_ok_and(|n| n > 0) {}
    });
    let mut stream = std::net::TcpStream::from(
        ns.run(move || socket_in_cgroup(&other, Kind::TcpConnected, stream_at))
            .expect("connect"),
    );
    let before = stats(&guard);
    let chunk = [0u8; 1024];
    for _ in 0..packets {
        stream.write_all(&chunk).expect("write");
    }
    drop(stream);
    reader.join().expect("reader");
    report("TCP stream (1 KiB writes)", &before, &stats(&guard));
}

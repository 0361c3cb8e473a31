//! `cargo run -p gateway-tests --bin guard_cost [PACKETS] [ROUNDS]` (root):
//! what each layer of the remote guard costs per packet, measured on a veth
//! between two network namespaces this tool makes (and removes).
//!
//! For each setup (no guard, the TC layer alone, the socket layer alone,
//! both) it sends PACKETS UDP datagrams to a protected port, once from the
//! gateway's address (every program runs its whole check and passes) and
//! once from a stranger's (dropped: by TC before the stack, or by the socket
//! layer after IP and UDP did their work). It reports the medians over
//! ROUNDS rounds, each in another order: CPU time per packet, packets per
//! second, and the time inside each program per run (kernel BPF run-time
//! statistics, switched on for the measurement only).
//!
//! On a veth the receiving side runs in the sender's context (the softirq
//! at the end of its send) or, when that runs long, in ksoftirqd: the CPU
//! time counted is the sending thread's plus every ksoftirqd's, so what
//! other processes on a shared host do stays out of it.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd as _;
use std::time::{Duration, Instant};

use gateway_tests::bpf::enable_run_time_stats;
use gateway_tests::cost::{ksoftirqd_ns, thread_cpu_ns};
use gateway_tests::netns::*;
use gateway_tests::wire::*;

/// The guard's layers in one setup: TC on these interfaces, and whether the
/// socket layer runs; None: no guard.
type Layers = Option<(&'static [&'static str], bool)>;

/// Each setup measured, by name.
const SETUPS: [(&str, Layers); 4] = [
    ("none", None),
    ("tc", Some((&["b0"], false))),
    ("socket", Some((&[], true))),
    ("both", Some((&["b0"], true))),
];

struct Sample {
    setup: &'static str,
    source: &'static str,
    cpu_ns_per_packet: f64,
    packets_per_second: f64,
    tc_ns_per_run: Option<f64>,
    socket_ns_per_run: Option<f64>,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let packets: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(300_000);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    if std::env::var_os("GATEWAY_BIN").is_none() {
        let exe = std::env::current_exe().expect("current exe");
        // SAFETY: set before any thread of ours starts.
        unsafe { std::env::set_var("GATEWAY_BIN", exe.with_file_name("gateway")) };
    }
    let Some(wire) = Wire::new() else {
        eprintln!("guard-cost needs root, cgroup v2 and iproute2");
        std::process::exit(2);
    };
    let _stats = enable_run_time_stats().expect("BPF run-time statistics");
    let _udp = wire.udp_backend(SocketAddr::from((BACKEND, UDP_PORT)));
    let mut samples = Vec::new();
    for round in 0..rounds {
        let mut order: Vec<_> = SETUPS.iter().collect();
        order.rotate_left(round % SETUPS.len());
        for (setup, layers) in order {
            for (source, from) in [("gateway", GATEWAY), ("stranger", STRANGER)] {
                let guard = layers.map(|(interfaces, sockets)| {
                    wire.start_guard(interfaces, sockets, &format!("{setup}-{round}.log"))
                });
                // Warm caches and the neighbour table first.
                send(&wire, from, packets / 20);
                let before = program_stats(&wire, guard.is_some());
                let softirq = ksoftirqd_ns();
                let started = Instant::now();
                let sender = send(&wire, from, packets);
                let wall = started.elapsed();
                let busy = sender + (ksoftirqd_ns() - softirq);
                let after = program_stats(&wire, guard.is_some());
                let per_run = |i: usize| {
                    let runs = after[i].0.saturating_sub(before[i].0);
                    (runs > 0).then(|| (after[i].1 - before[i].1) as f64 / runs as f64)
                };
                samples.push(Sample {
                    setup,
                    source,
                    cpu_ns_per_packet: busy as f64 / packets as f64,
                    packets_per_second: packets as f64 / wall.as_secs_f64(),
                    tc_ns_per_run: per_run(0),
                    socket_ns_per_run: per_run(1),
                });
                drop(guard);
            }
        }
    }
    println!(
        "{packets} UDP datagrams per run, {rounds} rounds, medians; veth between two namespaces\n"
    );
    println!(
        "| setup | source | host CPU ns/packet | packets/s | TC program ns/run | socket program ns/run |"
    );
    println!("|---|---|---|---|---|---|");
    for (setup, _) in SETUPS {
        for source in ["gateway", "stranger"] {
            let of = |f: &dyn Fn(&Sample) -> Option<f64>| {
                let mut v: Vec<f64> = samples
                    .iter()
                    .filter(|s| s.setup == setup && s.source == source)
                    .filter_map(f)
                    .collect();
                v.sort_by(f64::total_cmp);
                v.get(v.len() / 2).copied()
            };
            let show = |v: Option<f64>, digits: usize| {
                v.map_or("–".to_owned(), |v| format!("{v:.digits$}"))
            };
            println!(
                "| {setup} | {source} | {} | {} | {} | {} |",
                show(of(&|s| Some(s.cpu_ns_per_packet)), 0),
                show(of(&|s| Some(s.packets_per_second)), 0),
                show(of(&|s| s.tc_ns_per_run), 1),
                show(of(&|s| s.socket_ns_per_run), 1),
            );
        }
    }
}

/// Sends `count` 64-byte datagrams from `from` in `x` to the backend's
/// protected UDP port, 64 per sendmmsg; returns the sending thread's CPU
/// time in nanoseconds.
fn send(wire: &Wire, from: Ipv4Addr, count: u64) -> u64 {
    wire.x.run(move || {
        let start = thread_cpu_ns();
        let socket = std::net::UdpSocket::bind((from, 0)).expect("bind");
        socket
            .connect((BACKEND, UDP_PORT))
            .expect("connect the sender");
        let payload = [0x42u8; 64];
        let mut iov = libc::iovec {
            iov_base: payload.as_ptr() as *mut _,
            iov_len: payload.len(),
        };
        // SAFETY: mmsghdr is plain data; zero is valid.
        let mut batch: Vec<libc::mmsghdr> =
            (0..64).map(|_| unsafe { std::mem::zeroed() }).collect();
        for m in &mut batch {
            m.msg_hdr.msg_iov = &raw mut iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        let mut sent = 0u64;
        while sent < count {
            let n = (count - sent).min(64) as u32;
            // SAFETY: batch holds n valid headers pointing at payload.
            let rc = unsafe { libc::sendmmsg(socket.as_raw_fd(), batch.as_mut_ptr(), n, 0) };
            if rc > 0 {
                sent += rc as u64;
            } else {
                let e = std::io::Error::last_os_error();
                assert!(e.raw_os_error() == Some(libc::ENOBUFS), "sendmmsg: {e}");
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        thread_cpu_ns() - start
    })
}

/// (runs, ns) of the TC and the socket program, from the guard's metrics.
fn program_stats(wire: &Wire, running: bool) -> [(u64, u64); 2] {
    let read = |program: &str| {
        if !running {
            return (0, 0);
        }
        let series = |name: &str| {
            metric_in(
                wire.b.name(),
                ADMIN.parse().unwrap(),
                &format!("{name}{{program=\"{program}\"}}"),
            )
            .unwrap_or(0)
        };
        (
            series("gateway_guard_program_runs_total"),
            series("gateway_guard_program_run_nanoseconds_total"),
        )
    };
    [read("ingress"), read("sock_ingress")]
}

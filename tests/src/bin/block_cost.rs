//! `cargo run -p gateway-tests --bin block_cost [PACKETS] [ROUNDS]` (root):
//! what a blocked source's new connections cost the gateway's host on each
//! path, measured on a veth between two namespaces this tool makes (and
//! removes), with the gateway binary in one of them.
//!
//! - `xdp`: the kernel block list attached to the gateway's side of the
//!   veth (natively: veth runs XDP in its driver); TCP SYNs from the
//!   blocked source die there.
//! - `kernel`: no kernel block list; the same SYNs reach the listening
//!   socket, which answers each with a SYN-ACK (a SYN cookie once the queue
//!   is full), and the sender's kernel resets it.
//! - `accept`: full TCP connects from the blocked source (no kernel block
//!   list): the kernel completes each, the gateway accepts, looks the source
//!   up and resets it.
//!
//! SYNs go out through a raw socket, 64 per sendmmsg. CPU counted: the
//! sending thread (and the softirqs served in its context: a veth delivers
//! in the sender's context), every ksoftirqd, and the gateway process.
//! Medians over ROUNDS rounds, each in another order.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use gateway_tests::cost::{ksoftirqd_ns, process_cpu_ns, thread_cpu_ns};
use gateway_tests::netns::*;
use gateway_tests::*;

const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 1);
const SOURCE: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 2);
const PORT: u16 = 8443;
const ADMIN: &str = "127.0.0.1:9901";

struct Sample {
    path: &'static str,
    cpu_ns: f64,
    per_second: f64,
    counted: u64,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let packets: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(500_000);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    if std::env::var_os("GATEWAY_BIN").is_none() {
        let exe = std::env::current_exe().expect("current exe");
        // SAFETY: set before any thread of ours starts.
        unsafe { std::env::set_var("GATEWAY_BIN", exe.with_file_name("gateway")) };
    }
    if !is_root() || !netns_or_skip() {
        eprintln!("block_cost needs root and iproute2");
        std::process::exit(2);
    }
    let c = Netns::new("gbk");
    let g = Netns::new("gbk");
    veth(&c, "c0", &g, "g0");
    c.ip(&format!("addr add {SOURCE}/24 dev c0"));
    g.ip(&format!("addr add {GATEWAY}/24 dev g0"));
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let paths: [(&str, &str); 3] = [
        ("xdp", "pin = false\n"),
        ("kernel", "kernel_block_list = false\n"),
        ("accept", "kernel_block_list = false\n"),
    ];
    let mut samples = Vec::new();
    for round in 0..rounds {
        let mut order: Vec<_> = paths.iter().collect();
        order.rotate_left(round % paths.len());
        for (path, admission) in order {
            let gw = start(&g, &pki, dir.path(), admission, path);
            gateway_block_in(
                g.name(),
                &["add", &SOURCE.to_string()],
                &dir.path().join("admin.sock"),
            );
            let pid = gw.child.id();
            let counter = match *path {
                "xdp" => "gateway_block_list_drops_total{reason=\"manual\"}",
                _ => "gateway_connections_refused_total{listener=\"edge\",reason=\"blocked\"}",
            };
            let counted_before = metric_in(g.name(), ADMIN.parse().unwrap(), counter).unwrap_or(0);
            let softirq = ksoftirqd_ns();
            let gateway_before = process_cpu_ns(pid);
            let started = Instant::now();
            let (sent, sender) = if *path == "accept" {
                connects(&c, packets / 50)
            } else {
                syns(&c, packets)
            };
            let wall = started.elapsed();
            std::thread::sleep(Duration::from_millis(200));
            let (soft, gwcpu) = (
                ksoftirqd_ns() - softirq,
                process_cpu_ns(pid) - gateway_before,
            );
            let busy = sender + soft + gwcpu;
            if std::env::var_os("BLOCK_COST_DETAIL").is_some() {
                eprintln!(
                    "{path}: sent {sent} in {wall:?}: sender {sender} ns, ksoftirqd {soft} ns, gateway {gwcpu} ns"
                );
            }
            let counted =
                metric_in(g.name(), ADMIN.parse().unwrap(), counter).unwrap_or(0) - counted_before;
            samples.push(Sample {
                path,
                cpu_ns: busy as f64 / sent.max(1) as f64,
                per_second: sent as f64 / wall.as_secs_f64(),
                counted,
            });
            drop(gw);
        }
    }
    println!(
        "{packets} SYNs (and {} full connects) per run, {rounds} rounds, medians; veth between two namespaces\n",
        packets / 50
    );
    println!("| path | per second | host CPU ns each | counted by the gateway (last round) |");
    println!("|---|---|---|---|");
    for (path, _) in paths {
        let of = |f: &dyn Fn(&Sample) -> f64| {
            let mut v: Vec<f64> = samples.iter().filter(|s| s.path == path).map(f).collect();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        };
        let counted = samples
            .iter()
            .rev()
            .find(|s| s.path == path)
            .map_or(0, |s| s.counted);
        println!(
            "| {path} | {:.0} | {:.0} | {counted} |",
            of(&|s| s.per_second),
            of(&|s| s.cpu_ns)
        );
    }
}

/// The gateway binary in `g`, listening on the veth's address, once its
/// admin endpoint answers.
fn start(g: &Netns, pki: &Pki, dir: &std::path::Path, admission: &str, tag: &str) -> Proc {
    let toml = format!(
        "access_log = \"off\"\nwatch_files = false\nworkers = 1\nadmin = \"{ADMIN}\"\nadmin_socket = \"{}\"\n{}",
        dir.join("admin.sock").display(),
        listener_toml(pki, "edge", "").replace("127.0.0.1:0", &format!("{GATEWAY}:{PORT}"))
    ) + &route_toml(
        "orders",
        &["orders.example.internal"],
        &["127.0.0.1:9".parse().unwrap()],
        &[SPIFFE_FRONTEND],
    ) + "\n[admission]\n"
        + admission;
    let config = pki.write(&format!("gateway-{tag}.toml"), &toml);
    start_gateway_in(
        g.name(),
        &config,
        dir.join(format!("gateway-{}.log", unique(tag))),
        "listening",
    )
}

/// Sends `count` SYNs (each from a new port) from `SOURCE` in `c` to the
/// gateway; returns (sent, the sending thread's CPU ns).
fn syns(c: &Netns, count: u64) -> (u64, u64) {
    c.run(move || {
        let start = thread_cpu_ns();
        // SAFETY: plain socket(2), checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let frames: Vec<Vec<u8>> = (0..4096u16)
            .map(|i| syn(SOURCE, GATEWAY, 20_000 + i, PORT))
            .collect();
        let (to, len) = sockaddr(SocketAddr::from((GATEWAY, PORT)));
        let mut iovs: Vec<libc::iovec> = frames
            .iter()
            .map(|f| libc::iovec {
                iov_base: f.as_ptr() as *mut _,
                iov_len: f.len(),
            })
            .collect();
        // SAFETY: mmsghdr is plain data; zero is valid.
        let mut batch: Vec<libc::mmsghdr> =
            (0..64).map(|_| unsafe { std::mem::zeroed() }).collect();
        let mut sent = 0u64;
        let mut next = 0usize;
        let frames_n = iovs.len();
        while sent < count {
            let n = (count - sent).min(64) as usize;
            for m in batch.iter_mut().take(n) {
                m.msg_hdr.msg_iov = &raw mut iovs[next % frames_n];
                m.msg_hdr.msg_iovlen = 1;
                m.msg_hdr.msg_name = (&raw const to).cast_mut().cast();
                m.msg_hdr.msg_namelen = len;
                next += 1;
            }
            // SAFETY: batch holds n valid headers pointing at our frames.
            let rc = unsafe { libc::sendmmsg(fd, batch.as_mut_ptr(), n as u32, 0) };
            if rc > 0 {
                sent += rc as u64;
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        // SAFETY: our descriptor, closed once.
        unsafe { libc::close(fd) };
        (sent, thread_cpu_ns() - start)
    })
}

/// `count` full connects from `SOURCE` in `c`, one after another, each
/// waiting for the gateway's reset; returns (made, the thread's CPU ns).
fn connects(c: &Netns, count: u64) -> (u64, u64) {
    c.run(move || {
        let start = thread_cpu_ns();
        let mut made = 0u64;
        for _ in 0..count {
            // The gateway's reset often arrives before connect() returns:
            // that connect was made (and accepted) all the same.
            match std::net::TcpStream::connect_timeout(
                &SocketAddr::from((GATEWAY, PORT)),
                Duration::from_secs(1),
            ) {
                Ok(mut s) => {
                    made += 1;
                    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                    let mut b = [0u8; 1];
                    let _ = std::io::Read::read(&mut s, &mut b);
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => made += 1,
                Err(_) => {}
            }
        }
        (made, thread_cpu_ns() - start)
    })
}

/// An IPv4 TCP SYN (the kernel fills the IP checksum and length).
fn syn(from: Ipv4Addr, to: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&from.octets());
    p[16..20].copy_from_slice(&to.octets());
    let tcp = &mut p[20..40];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&(u32::from(sport) * 7919).to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut sum: u32 = 0;
    for pair in [from.octets(), to.octets()] {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
        sum += u32::from(u16::from_be_bytes([pair[2], pair[3]]));
    }
    sum += 6 + 20;
    for w in p[20..40].chunks(2) {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[36..38].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p
}

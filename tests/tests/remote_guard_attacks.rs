//! The remote guard against someone trying to walk around it, on a wire
//! made for the purpose: namespace `x` (a stranger, and the gateway's
//! allowed address) and namespace `b` (the backend host, where `gateway
//! guard --config` runs), joined by one veth. The backends' sockets live in
//! a cgroup made for the test, which is all the socket layer judges.
//!
//! Each test first shows the attack works without the layer that stops it,
//! then that the guard stops it, counts it, and still lets the gateway in.
//! Needs root and iproute2; skips with a message otherwise. Everything it
//! creates goes when it ends, failed or not.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd as _;
use std::time::{Duration, Instant};

use gateway_tests::STEP;
use gateway_tests::bpf::{Place, TC_ACT_OK, TC_ACT_SHOT, attach_tcx, classifier, has_tcx};
use gateway_tests::netns::*;
use gateway_tests::packet::*;
use gateway_tests::wire::*;

/// What arrived on `socket` within its read timeout.
fn received(socket: &std::net::UdpSocket) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok((n, _)) = socket.recv_from(&mut buf) {
        got.push(buf[..n].to_vec());
    }
    got
}

/// A TCP round trip to `to` from `ns`, whose packets carry 40 bytes of IP
/// options over a route locked to the minimum MTU (68): every segment, the
/// SYN included, leaves as a first fragment of 8 transport bytes (the ports
/// and the sequence number, not the flags) and the rest.
fn fragmented_roundtrip(ns: &str, from: Ipv4Addr, to: SocketAddr) -> Result<(), String> {
    use std::io::{Read as _, Write as _};
    in_netns(ns, move || {
        // SAFETY: plain socket(2), checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor we own.
        let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // 39 no-operation options and an end of list: the longest header.
        let mut options = [1u8; 40];
        options[39] = 0;
        // SAFETY: a valid buffer of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_OPTIONS,
                options.as_ptr().cast(),
                options.len() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "IP_OPTIONS: {}", std::io::Error::last_os_error());
        let (at, len) = sockaddr(SocketAddr::new(from.into(), 0));
        // SAFETY: a valid sockaddr of len bytes.
        let rc = unsafe { libc::bind(socket.as_raw_fd(), std::ptr::from_ref(&at).cast(), len) };
        assert_eq!(rc, 0, "bind {from}");
        connect_with_timeout(&socket, to, Duration::from_millis(1500))
            .map_err(|e| e.to_string())?;
        let mut s = std::net::TcpStream::from(socket);
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        s.write_all(b"fragmented").map_err(|e| e.to_string())?;
        let mut buf = [0u8; 10];
        s.read_exact(&mut buf).map_err(|e| e.to_string())?;
        Ok(())
    })
}

#[test]
fn a_session_in_tiny_first_fragments_does_not_pass_the_tc_layer() {
    let Some(w) = Wire::new() else { return };
    w.tcp_backend(SocketAddr::from((BACKEND, TCP_PORT)));
    w.x.ip(&format!("route add {BACKEND}/32 dev x0 mtu lock 68"));
    let to = SocketAddr::from((BACKEND, TCP_PORT));
    fragmented_roundtrip(w.x.name(), STRANGER, to)
        .expect("without the guard, the fragmented session works (the attack's premise)");

    // TC alone, so the test shows what this layer does.
    let mut guard = w.start_guard(&["b0"], false, "guard.log");
    let attack = fragmented_roundtrip(w.x.name(), STRANGER, to);
    assert!(
        attack.is_err(),
        "a stranger's session in 8-byte first fragments reached the protected port"
    );
    assert!(
        w.metric("gateway_guard_unparsable_packets_total{layer=\"tc\"}") >= 1,
        "the first fragment was judged unparsable, not let through"
    );
    w.tcp_from(STRANGER)
        .expect_err("an ordinary connect from the stranger is dropped too");
    fragmented_roundtrip(w.x.name(), GATEWAY, to)
        .expect("the gateway's own fragmented session still passes");
    guard.wait_for("\"unparsable\":true", 1);
}

/// A UDP datagram from `src` to the backend's protected UDP port, in a frame
/// with `tags`, sent from `x`.
fn tagged_datagram(w: &Wire, src: Ipv4Addr, tags: &[(u16, u16)], data: &'static [u8]) {
    let packet = udp_packet(src.into(), BACKEND.into(), 40000, UDP_PORT, data);
    let frame = ethernet(B_MAC, X_MAC, tags, 0x0800, &packet);
    w.x.run(move || send_frame("x0", &frame));
}

#[test]
fn vlan_tags_left_in_the_frame_are_walked_or_the_frame_dropped() {
    let Some(w) = Wire::new() else { return };
    let udp = w.udp_backend(SocketAddr::from((BACKEND, UDP_PORT)));
    let q0 = (0x8100, 0);
    let ad0 = (0x88a8, 0);
    tagged_datagram(&w, STRANGER, &[q0, q0], b"premise");
    assert_eq!(
        received(&udp),
        [b"premise".to_vec()],
        "the kernel strips two priority tags and delivers what is inside (the attack's premise)"
    );

    let _guard = w.start_guard(&["b0"], false, "guard.log");
    tagged_datagram(&w, STRANGER, &[q0, q0], b"8100/0+8100/0");
    tagged_datagram(&w, STRANGER, &[ad0, q0], b"88a8/0+8100/0");
    tagged_datagram(&w, STRANGER, &[q0; 6], b"six tags");
    tagged_datagram(&w, STRANGER, &[q0], b"one tag");
    tagged_datagram(&w, GATEWAY, &[ad0, q0], b"gateway");
    assert_eq!(
        received(&udp),
        [b"gateway".to_vec()],
        "only the gateway's datagram reaches the protected port, however it is tagged"
    );
    assert!(w.metric("gateway_guard_ingress_packets_total{layer=\"tc\",verdict=\"drop\"}") >= 4);
    assert!(
        w.metric("gateway_guard_unparsable_packets_total{layer=\"tc\"}") >= 1,
        "more tags than the guard walks: judged unparsable"
    );
}

#[test]
fn on_an_l3_tunnel_the_tc_layer_reads_from_the_network_header() {
    let Some(w) = Wire::new() else { return };
    let tun = w.b.run(|| Tun::create("tun0"));
    w.b.ip("addr add 10.202.0.1/24 dev tun0");
    w.b.ip("addr add fd00:202::1/64 dev tun0 nodad");
    w.b.ip("link set tun0 up");
    let udp = w.udp_backend(SocketAddr::from((Ipv6Addr::UNSPECIFIED, UDP_PORT)));
    let stranger = IpAddr::from(Ipv4Addr::new(10, 202, 0, 2));
    let stranger6 = IpAddr::from(Ipv6Addr::new(0xfd00, 0x202, 0, 0, 0, 0, 0, 2));
    let to = IpAddr::from(Ipv4Addr::new(10, 202, 0, 1));
    let to6 = IpAddr::from(Ipv6Addr::new(0xfd00, 0x202, 0, 0, 0, 0, 0, 1));
    tun.inject(&udp_packet(stranger, to, 40000, UDP_PORT, b"premise"));
    assert_eq!(
        received(&udp),
        [b"premise".to_vec()],
        "a datagram through the tunnel reaches the port (the attack's premise)"
    );

    let _guard = w.start_guard(&["b0", "tun0"], false, "guard.log");
    tun.inject(&udp_packet(stranger, to, 40000, UDP_PORT, b"stranger"));
    tun.inject(&udp_packet(stranger6, to6, 40000, UDP_PORT, b"stranger6"));
    tun.inject(&udp_packet(GATEWAY.into(), to, 40000, UDP_PORT, b"gateway"));
    tun.inject(&udp_packet(
        GATEWAY6.into(),
        to6,
        40000,
        UDP_PORT,
        b"gateway6",
    ));
    let mut got = received(&udp);
    got.sort();
    assert_eq!(
        got,
        [b"gateway".to_vec(), b"gateway6".to_vec()],
        "on a tunnel without a link header only the gateway's datagrams pass"
    );
    assert!(w.metric("gateway_guard_ingress_packets_total{layer=\"tc\",verdict=\"drop\"}") >= 2);
}

#[test]
fn other_tcx_programs_neither_switch_the_guard_off_nor_lose_their_turn() {
    if !has_tcx() {
        eprintln!("skipped: TCX needs Linux 6.6+ (netlink filters sit at priority 1 there)");
        return;
    }
    let Some(w) = Wire::new() else { return };
    w.tcp_backend(SocketAddr::from((BACKEND, TCP_PORT)));
    let ifindex = |w: &Wire| crate_ifindex(w.b.name(), "b0");
    let index = ifindex(&w);
    // A tool that lets everything through, attached before the guard starts.
    let pass_all = w.b.run(move || {
        let program = classifier(TC_ACT_OK).expect("load a TC_ACT_OK classifier");
        let link = attach_tcx(&program, index, Place::First).expect("attach it first");
        (program, link)
    });
    let mut guard = w.start_guard(&["b0"], false, "guard.log");
    w.tcp_from(STRANGER)
        .expect_err("a program that ran first with TC_ACT_OK let the stranger past the guard");
    assert!(w.metric("gateway_guard_ingress_packets_total{layer=\"tc\",verdict=\"drop\"}") >= 1);
    w.tcp_from(GATEWAY).expect("the gateway passes");

    // A program after the guard still gets its turn: one that drops all
    // (with the one that passes all gone, which would end the run first)
    // now drops even what the guard passed.
    drop(pass_all);
    let drop_all = w.b.run(move || {
        let program = classifier(TC_ACT_SHOT).expect("load a TC_ACT_SHOT classifier");
        let link = attach_tcx(&program, index, Place::Last).expect("attach it last");
        (program, link)
    });
    w.tcp_from(GATEWAY)
        .expect_err("the guard passed with TC_ACT_OK, so the program after it never ran");
    drop(drop_all);
    w.tcp_from(GATEWAY).expect("the gateway passes again");

    // A program put before the guard later is reported.
    let _pushed_ahead = w.b.run(move || {
        let program = classifier(TC_ACT_OK).expect("load");
        let link = attach_tcx(&program, index, Place::First).expect("attach first");
        (program, link)
    });
    guard.wait_for("another TCX program now runs before the guard", 1);
}

/// The index of `iface` in namespace `ns`.
fn crate_ifindex(ns: &str, iface: &str) -> u32 {
    let name = std::ffi::CString::new(iface).unwrap();
    let index = in_netns(ns, move || {
        // SAFETY: a NUL-terminated name.
        unsafe { libc::if_nametoindex(name.as_ptr()) }
    });
    assert!(index > 0, "no {iface} in {ns}");
    index
}

#[test]
fn a_recreated_interface_gets_the_guard_again() {
    let Some(w) = Wire::new() else { return };
    w.tcp_backend(SocketAddr::from((BACKEND, TCP_PORT)));
    let mut guard = w.start_guard(&["b0"], false, "guard.log");
    w.tcp_from(STRANGER).expect_err("protected");

    // Delete and create the link again, as happens to veths and bonds.
    w.recreate_link();
    guard.wait_for("interface created anew; attached again", 1);
    w.tcp_from(STRANGER)
        .expect_err("the new b0 is protected like the old one");
    w.tcp_from(GATEWAY)
        .expect("the gateway passes on the new b0");
    assert_eq!(w.metric("gateway_guard_interfaces_reattached_total"), 1);
}

#[test]
fn the_socket_layer_judges_paths_tc_never_sees() {
    let Some(w) = Wire::new() else { return };
    // A backend listening on every address, as most do.
    w.tcp_backend(SocketAddr::from((Ipv6Addr::UNSPECIFIED, TCP_PORT)));
    // A container on the backend host: its own namespace behind a veth.
    let c = container_of(&w.b, "gra-c", "bc0", "10.203.0.1", "10.203.0.2");
    let local = |to: Ipv4Addr| tcp_roundtrip(w.b.name(), None, SocketAddr::from((to, TCP_PORT)));
    let container = |to: Ipv4Addr| tcp_roundtrip(c.name(), None, SocketAddr::from((to, TCP_PORT)));
    // Port 8080 on the backend host forwards to the protected port: TC
    // sees 8080, the socket gets 9000.
    let nat = w.b.nft(
        "table ip gra {\n chain pre {\n  type nat hook prerouting priority -100\n  tcp dport 8080 dnat to 10.201.0.1:9000\n }\n}\n",
    );
    let via_nat = |from: Ipv4Addr| {
        tcp_roundtrip(
            w.x.name(),
            Some(from.into()),
            SocketAddr::from((BACKEND, 8080)),
        )
    };

    // TC alone: every one of these paths reaches the protected port.
    let guard = w.start_guard(&["b0"], false, "tc-only.log");
    w.tcp_from(STRANGER)
        .expect_err("TC drops the stranger on b0");
    local(Ipv4Addr::LOCALHOST).expect("TC never sees lo (the attack's premise)");
    local(BACKEND).expect("nor a local connect to the host's own address");
    container(Ipv4Addr::new(10, 203, 0, 1)).expect("nor a container's veth");
    if nat {
        via_nat(STRANGER).expect("nor a port that NAT rewrites after TC judged it");
    }
    drop(guard);

    // With the socket layer: judged at the socket, whatever the path.
    let _guard = w.start_guard(&["b0"], true, "both.log");
    local(Ipv4Addr::LOCALHOST).expect_err("a local process on lo is dropped at the socket");
    local(BACKEND).expect_err("and on the host's own address");
    container(Ipv4Addr::new(10, 203, 0, 1)).expect_err("a container is dropped at the socket");
    container(BACKEND).expect_err("whichever host address it uses");
    if nat {
        via_nat(STRANGER).expect_err("NAT to the protected port is dropped at the socket");
        via_nat(GATEWAY).expect("the gateway passes through NAT");
    } else {
        eprintln!("note: nft is not installed; the NAT case was not tried");
    }
    w.tcp_from(GATEWAY).expect("the gateway passes");
    assert!(
        w.metric("gateway_guard_ingress_packets_total{layer=\"socket\",verdict=\"drop\"}") >= 4,
        "the socket layer counted its drops"
    );
}

#[test]
fn a_flood_of_spoofed_sources_does_not_hide_the_real_one() {
    let Some(w) = Wire::new() else { return };
    let udp = w.udp_backend(SocketAddr::from((BACKEND, UDP_PORT)));
    // One summary period for the whole flood: the summary at stop holds it.
    let config = w.config_every(&["b0"], false, "1h");
    let mut guard = start_remote_guard(w.b.name(), &config, w.dir.path().join("guard.log"));
    // Far more spoofed sources than the per-CPU event budget (64 a second)
    // and than the tallies hold (16384), the real one among the first.
    w.x.run(|| {
        let raw = raw_ipv4_socket();
        let spoof = |i: u32| {
            let spoofed = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 201, 8, 0)) + i);
            let packet = udp_packet(spoofed.into(), BACKEND.into(), 40000, UDP_PORT, b"noise");
            send_raw_ipv4(&raw, &packet).expect("send a spoofed datagram");
        };
        (0..1024).for_each(spoof);
        let real = udp_packet(STRANGER.into(), BACKEND.into(), 40001, UDP_PORT, b"real");
        send_raw_ipv4(&raw, &real).expect("send the real one");
        (1024..41_024).for_each(spoof);
    });
    let until = Instant::now() + STEP;
    while w.metric("gateway_guard_ingress_packets_total{layer=\"tc\",verdict=\"drop\"}") < 41_025 {
        assert!(
            Instant::now() < until,
            "every datagram judged within {STEP:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(received(&udp).is_empty(), "every datagram was dropped");
    let untallied = w.metric("gateway_guard_untallied_attempts_total");
    assert!(untallied > 0, "what did not fit is counted");
    guard.signal(libc::SIGTERM);
    guard.wait_for("guard: stopping", 1);
    let log = guard.log();
    let named = |who: &str| {
        log.lines().any(|l| {
            l.contains("guard: bypass attempts by source") && l.contains(&format!("{who}×"))
        })
    };
    assert!(
        named(&STRANGER.to_string()),
        "the summary names the real source among the spoofed ones:\n{}",
        log.lines().rev().take(5).collect::<Vec<_>>().join("\n")
    );
    assert!(named("10.201.8.0"), "and the first spoofed ones");
    assert!(
        log.contains("more distinct sources than the tallies hold")
            && log.contains(&format!("\"attempts\":{untallied}")),
        "and says how many attempts it could not name"
    );
    // Every attempt is in the summary or in the untallied count.
    let named_attempts: u64 = log
        .lines()
        .find(|l| l.contains("guard: bypass attempts by source"))
        .and_then(|l| l.split("\"attempts\":").nth(1))
        .and_then(|n| n.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .expect("the summary's attempts");
    assert_eq!(named_attempts + untallied, 41_025);
}

#[test]
fn a_reload_that_fails_halfway_leaves_no_allowed_source_behind() {
    let Some(w) = Wire::new() else { return };
    w.tcp_backend(SocketAddr::from((BACKEND, TCP_PORT)));
    let config = w.config(&["b0"], true);
    let original = std::fs::read_to_string(&config).expect("guard.toml");
    let allow_line = original
        .lines()
        .find(|l| l.starts_with("allow = "))
        .expect("allow line")
        .to_owned();
    // The gateway and 999 more: 1000 of the 1024 IPv4 prefixes the guard holds.
    let mut allow: Vec<String> = (0..999u32)
        .map(|k| format!("\"{}\"", Ipv4Addr::new(10, 210, (k / 256) as u8, k as u8)))
        .collect();
    allow.push(format!("\"{GATEWAY}\""));
    let with_allow =
        |list: &[String]| original.replace(&allow_line, &format!("allow = [{}]", list.join(", ")));
    std::fs::write(&config, with_allow(&allow)).expect("write");
    let mut guard = start_remote_guard(w.b.name(), &config, w.dir.path().join("guard.log"));
    w.tcp_from(STRANGER).expect_err("the stranger is dropped");

    // Another tool writes 10 prefixes into the pinned map behind the
    // guard's back: 1010 of 1024 are taken, though the guard counts 1000.
    let trie = w.pins.0.join("INGRESS_ALLOW_V4");
    for k in 0..10u8 {
        gateway_tests::bpf::lpm_v4_insert(&trie, 32, [10, 212, 0, k]).expect("insert");
    }
    // A reload that keeps them all and adds 20 prefixes, each covering the
    // stranger: 1020 fit by the guard's count, so it starts writing, and
    // the map is full after 14 of them.
    let mut next = allow.clone();
    next.extend((13..=32u8).map(|len| {
        let net = ipnet::Ipv4Net::new(STRANGER, len).expect("prefix").trunc();
        format!("\"{net}\"")
    }));
    std::fs::write(&config, with_allow(&next)).expect("write");
    guard.signal(libc::SIGHUP);
    guard.wait_for("guard: reload failed", 1);
    assert!(
        guard
            .log()
            .contains("writing eBPF map \\\"INGRESS_ALLOW_V4\\\""),
        "the failed write is named:\n{}",
        guard.log()
    );
    w.tcp_from(STRANGER)
        .expect_err("nothing the refused reload wrote stayed behind");
    w.tcp_from(GATEWAY).expect("the gateway passes");
    assert_eq!(
        w.metric("gateway_guard_reloads_total{result=\"failed\"}"),
        1
    );
}

#[test]
fn a_second_guard_on_the_same_pin_dir_is_refused() {
    let Some(w) = Wire::new() else { return };
    w.tcp_backend(SocketAddr::from((BACKEND, TCP_PORT)));
    let first = w.start_guard(&["b0"], true, "first.log");
    w.tcp_from(STRANGER).expect_err("protected");
    // Another guard, same pin directory, protecting only the UDP port.
    let config = w.config(&["b0"], true);
    let text = std::fs::read_to_string(&config).expect("guard.toml");
    let other = w.dir.path().join("other.toml");
    std::fs::write(
        &other,
        text.replace(
            &format!("protect = [\"tcp:{TCP_PORT}\", \"udp:{UDP_PORT}\"]"),
            &format!("protect = [\"udp:{UDP_PORT}\"]"),
        )
        .replace(&format!("admin = \"{ADMIN}\"\n"), ""),
    )
    .expect("other.toml");
    let bin = gateway_tests::gateway_binary();
    let mut second = Proc::spawn(
        w.b.command(&[
            bin.to_str().unwrap(),
            "guard",
            "--config",
            other.to_str().unwrap(),
        ]),
        w.dir.path().join("second.log"),
    );
    let until = Instant::now() + STEP;
    let status = loop {
        if let Some(status) = second.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            !second.log().contains("guard: protecting") && Instant::now() < until,
            "a second guard took over the first one's pin directory:\n{}",
            second.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let said = second.log();
    assert!(!status.success(), "a second guard refuses: {said}");
    assert!(
        said.contains(&format!(
            "in use by another guard (pid {})",
            first.child.id()
        )),
        "{said}"
    );
    w.tcp_from(STRANGER)
        .expect_err("the first guard's rules are untouched");
}

#[test]
fn a_detached_layer_or_a_removed_pin_is_put_back() {
    let Some(w) = Wire::new() else { return };
    w.tcp_backend(SocketAddr::from((Ipv6Addr::UNSPECIFIED, TCP_PORT)));
    let mut guard = w.start_guard(&["b0"], true, "guard.log");
    let local = || tcp_roundtrip(w.b.name(), None, SocketAddr::from((BACKEND, TCP_PORT)));
    local().expect_err("the socket layer drops a local stranger");
    let pins: Vec<std::path::PathBuf> = std::fs::read_dir(&w.pins.0)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    let socket_pin = pins
        .iter()
        .find(|p| p.to_string_lossy().contains("link-sock_ingress-"))
        .expect("the socket layer's link is pinned")
        .clone();
    // Whoever can: the socket layer is taken off its cgroup, and on TCX
    // kernels the interface's link loses its pin.
    gateway_tests::bpf::detach_pinned_link(&socket_pin).expect("detach");
    let tcx_pin = w.pins.0.join("link-ingress-b0");
    let expected = if has_tcx() {
        std::fs::remove_file(&tcx_pin).expect("remove the TCX pin");
        2
    } else {
        1
    };
    guard.wait_for("guard: the socket layer had been detached", 1);
    let until = Instant::now() + STEP;
    while w.metric("gateway_guard_repairs_total") < expected {
        assert!(
            Instant::now() < until,
            "repaired within {STEP:?}:\n{}",
            guard.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    local().expect_err("judged at the socket again");
    if has_tcx() {
        assert!(tcx_pin.exists(), "pinned again");
        w.tcp_from(STRANGER)
            .expect_err("TC still drops the stranger");
    }
    w.tcp_from(GATEWAY).expect("the gateway passes");
}

#[test]
fn a_reload_changes_the_summary_period() {
    let Some(w) = Wire::new() else { return };
    w.tcp_backend(SocketAddr::from((BACKEND, TCP_PORT)));
    let config = w.config_every(&["b0"], false, "1h");
    let mut guard = start_remote_guard(w.b.name(), &config, w.dir.path().join("guard.log"));
    // The same file, with the summary period of a second.
    w.config(&["b0"], false);
    guard.signal(libc::SIGHUP);
    guard.wait_for("guard: reloaded", 1);
    w.tcp_from(STRANGER).expect_err("dropped");
    guard.wait_for("guard: bypass attempts by source", 1);
}

/// A UDP datagram from the backend host itself (a local process) to
/// `to`, as the socket layer sees it arrive over `lo`.
fn local_datagram(w: &Wire, to: SocketAddr, data: &'static [u8]) {
    w.b.run(move || {
        std::net::UdpSocket::bind("0.0.0.0:0")
            .and_then(|s| s.send_to(data, to))
            .expect("send a datagram")
    });
}

#[test]
fn a_narrowed_socket_layer_judges_sockets_by_the_cgroup_that_made_them() {
    let Some(w) = Wire::new() else { return };
    let mount = gateway_tests::bpf_cgroup_or_skip().expect("cgroup v2");
    // A socket the guarded service uses but something else created (as
    // systemd creates socket-activated ones, in its own cgroup).
    let mut elsewhere = TestCgroup::create(&mount, "gra-else");
    let creator = elsewhere.leaf("creator");
    let handed = udp_in_cgroup(w.b.name(), &creator, SocketAddr::from((BACKEND, UDP_PORT)));
    // And one the service created itself.
    w.tcp_backend(SocketAddr::from((BACKEND, TCP_PORT)));
    let _guard = w.start_guard(&["b0"], true, "guard.log");
    tcp_roundtrip(w.b.name(), None, SocketAddr::from((BACKEND, TCP_PORT)))
        .expect_err("a socket created in `cgroup` is judged");
    local_datagram(&w, SocketAddr::from((BACKEND, UDP_PORT)), b"handed");
    assert_eq!(
        received(&handed),
        [b"handed".to_vec()],
        "a socket created outside `cgroup` is not judged, whoever uses it (README says so)"
    );
}

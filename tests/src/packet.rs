//! Hand-made packets for the attack tests: IPv4/IPv6 with UDP, Ethernet
//! frames with VLAN tags, sent through packet sockets, raw IP sockets or a
//! tun device, from inside a test's own network namespace.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

/// The Internet checksum (RFC 1071) of `parts`, concatenated.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for part in parts {
        for &b in *part {
            match odd.take() {
                Some(hi) => sum += u32::from(u16::from_be_bytes([hi, b])),
                None => odd = Some(b),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 header (no options, DF clear, TTL 64) in front of `payload`.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut h = vec![0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    h[4..6].copy_from_slice(&0x4242u16.to_be_bytes());
    h[8] = 64;
    h[9] = protocol;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&[&h]);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// An IPv6 header (hop limit 64) in front of `payload`.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    h[6] = next;
    h[7] = 64;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
    h.extend_from_slice(payload);
    h
}

/// A whole IP packet carrying one UDP datagram, checksummed (IPv6 needs it).
pub fn udp_packet(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let len = (8 + data.len()) as u16;
    let mut udp = Vec::with_capacity(usize::from(len));
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(data);
    let pseudo = |s: &[u8], d: &[u8]| {
        let mut p = Vec::new();
        p.extend_from_slice(s);
        p.extend_from_slice(d);
        p.extend_from_slice(&[0, 17]);
        p.extend_from_slice(&len.to_be_bytes());
        p
    };
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let sum = checksum(&[&pseudo(&s.octets(), &d.octets()), &udp]);
            udp[6..8].copy_from_slice(&sum.to_be_bytes());
            ipv4(s, d, 17, &udp)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut p = Vec::new();
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&u32::from(len).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, 17]);
            let sum = checksum(&[&p, &udp]);
            udp[6..8].copy_from_slice(&sum.to_be_bytes());
            ipv6(s, d, 17, &udp)
        }
        _ => panic!("udp_packet: {src} and {dst} are of different families"),
    }
}

/// An Ethernet frame: `tags` are (TPID, TCI) pairs in front of `ethertype`.
pub fn ethernet(
    dst: [u8; 6],
    src: [u8; 6],
    tags: &[(u16, u16)],
    ethertype: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + 4 * tags.len() + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    for (tpid, tci) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&tci.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn fd_or_error(fd: i32, what: &str) -> OwnedFd {
    assert!(fd >= 0, "{what}: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor we own.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Sends `frame` as is out of `interface` with a packet socket (AF_PACKET),
/// in the calling thread's network namespace.
pub fn send_frame(interface: &str, frame: &[u8]) {
    let name = std::ffi::CString::new(interface).expect("interface name");
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(index > 0, "no interface {interface}");
    // SAFETY: plain socket(2); the result is checked.
    let fd = fd_or_error(
        unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) },
        "packet socket",
    );
    // SAFETY: sockaddr_ll is plain data; zero is valid.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_ifindex = index as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: valid buffers of the sizes passed.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            std::ptr::from_ref(&to).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    assert_eq!(
        sent,
        frame.len() as isize,
        "send frame on {interface}: {}",
        std::io::Error::last_os_error()
    );
}

/// A raw IPv4 socket whose packets carry their own IP header (IP_HDRINCL),
/// in the calling thread's network namespace.
pub fn raw_ipv4_socket() -> OwnedFd {
    // SAFETY: plain socket(2); the result is checked.
    fd_or_error(
        unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_RAW,
            )
        },
        "raw socket",
    )
}

/// Sends a whole IPv4 packet through a raw socket from [`raw_ipv4_socket`].
pub fn send_raw_ipv4(socket: &OwnedFd, packet: &[u8]) -> std::io::Result<()> {
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    let (to, len) = crate::netns::sockaddr(std::net::SocketAddr::new(dst.into(), 0));
    // SAFETY: valid buffers of the sizes passed.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            std::ptr::from_ref(&to).cast(),
            len,
        )
    };
    if sent == packet.len() as isize {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A tun device (no packet information header): what is written to it
/// arrives at the kernel as if received on the interface.
pub struct Tun {
    fd: OwnedFd,
}

impl Tun {
    /// Creates `name` in the calling thread's network namespace; it goes
    /// when this value drops.
    pub fn create(name: &str) -> Tun {
        // SAFETY: a NUL-terminated path; the result is checked.
        let fd = fd_or_error(
            unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) },
            "open /dev/net/tun",
        );
        // struct ifreq: 16 bytes of name, then the flags (short).
        let mut ifr = [0u8; 40];
        ifr[..name.len()].copy_from_slice(name.as_bytes());
        let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as u16;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF takes a struct ifreq, which ifr is laid out as.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, ifr.as_mut_ptr()) };
        assert_eq!(
            rc,
            0,
            "TUNSETIFF {name}: {}",
            std::io::Error::last_os_error()
        );
        Tun { fd }
    }

    /// Hands `packet` (starting at its IP header) to the kernel.
    pub fn inject(&self, packet: &[u8]) {
        // SAFETY: a valid buffer of the size passed.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
        assert_eq!(
            n,
            packet.len() as isize,
            "write to tun: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_match_rfc_1071s_example() {
        // RFC 1071's example words 0001 f203 f4f5 f6f7 sum to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&[&data]), !0xddf2);
        let h = ipv4(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, 17, &[]);
        assert_eq!(
            checksum(&[&h]),
            0,
            "a header with its checksum sums to zero"
        );
    }
}

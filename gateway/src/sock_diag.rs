//! The kernel's socket diagnostics (NETLINK_SOCK_DIAG), the little the
//! guard needs from them: the connected TCP and UDP sockets of this network
//! namespace with their peer, owner and cgroup, and closing one
//! (SOCK_DESTROY, which needs CONFIG_INET_DIAG_DESTROY). The connect hooks
//! judge only connects made after they were attached; this finds the ones
//! made before.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use crate::ebpf::Protocol;

/// One connected socket, as the kernel describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InetSocket {
    pub protocol: Protocol,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub uid: u32,
    pub inode: u32,
    /// The cgroup v2 id of the process that made it; None on kernels that
    /// do not report it (before 5.9).
    pub cgroup: Option<u64>,
    /// What SOCK_DESTROY needs to find it again.
    id: [u8; SOCKID],
    family: u8,
}

const NLMSG_HDR: usize = 16;
const SOCKID: usize = 48;
const REQ: usize = 8 + SOCKID;
const MSG: usize = 4 + SOCKID + 20;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_DONE: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const INET_DIAG_CGROUP_ID: u16 = 21;
/// TCP states of connections that carry data (not LISTEN, TIME_WAIT,
/// CLOSE or request sockets): ESTABLISHED, SYN_SENT, FIN_WAIT1/2,
/// CLOSE_WAIT, LAST_ACK, CLOSING.
const TCP_STATES: u32 = (1 << 1) | (1 << 2) | (1 << 4) | (1 << 5) | (1 << 8) | (1 << 9) | (1 << 11);
/// A connected UDP socket is "established".
const UDP_STATES: u32 = 1 << 1;

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: a valid timeval for SO_RCVTIMEO: a kernel that never answers
    // cannot hang the gateway.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::from_ref(&timeout).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    Ok(fd)
}

/// An inet_diag_req_v2 message of type `kind`.
fn request(
    kind: u16,
    flags: u16,
    family: u8,
    protocol: u8,
    states: u32,
    id: &[u8; SOCKID],
) -> Vec<u8> {
    let len = NLMSG_HDR + REQ;
    let mut m = vec![0u8; len];
    m[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
    m[4..6].copy_from_slice(&kind.to_ne_bytes());
    m[6..8].copy_from_slice(&flags.to_ne_bytes());
    m[8..12].copy_from_slice(&1u32.to_ne_bytes());
    let r = NLMSG_HDR;
    m[r] = family;
    m[r + 1] = protocol;
    m[r + 4..r + 8].copy_from_slice(&states.to_ne_bytes());
    m[r + 8..r + 8 + SOCKID].copy_from_slice(id);
    m
}

fn send(fd: &OwnedFd, message: &[u8]) -> io::Result<()> {
    // SAFETY: a valid buffer of the size passed.
    let n = unsafe { libc::send(fd.as_raw_fd(), message.as_ptr().cast(), message.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for buf.len() bytes.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// (type, body) of each netlink message in `buf`.
fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let header = buf.get(at..at + NLMSG_HDR)?;
        let len = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let kind = u16::from_ne_bytes([header[4], header[5]]);
        if len < NLMSG_HDR || at + len > buf.len() {
            return None;
        }
        let body = &buf[at + NLMSG_HDR..at + len];
        at += (len + 3) & !3;
        Some((kind, body))
    })
}

fn errno_of(body: &[u8]) -> i32 {
    body.get(..4)
        .map(|b| -i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0)
}

/// Every connected TCP and UDP socket (IPv4 and IPv6) of this thread's
/// network namespace.
pub fn connected_sockets() -> io::Result<Vec<InetSocket>> {
    let fd = socket()?;
    let mut found = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        for (protocol, states) in [
            (libc::IPPROTO_TCP as u8, TCP_STATES),
            (libc::IPPROTO_UDP as u8, UDP_STATES),
        ] {
            let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
            send(
                &fd,
                &request(
                    SOCK_DIAG_BY_FAMILY,
                    flags,
                    family,
                    protocol,
                    states,
                    &[0; SOCKID],
                ),
            )?;
            'dump: loop {
                let n = recv(&fd, &mut buf)?;
                if n == 0 {
                    break;
                }
                for (kind, body) in messages(&buf[..n]) {
                    match kind {
                        NLMSG_DONE => break 'dump,
                        NLMSG_ERROR => {
                            let errno = errno_of(body);
                            // No diag module for this protocol: nothing to list.
                            if errno == libc::ENOENT {
                                break 'dump;
                            }
                            return Err(io::Error::from_raw_os_error(errno));
                        }
                        _ => found.extend(parse(body, protocol)),
                    }
                }
            }
        }
    }
    Ok(found)
}

fn parse(body: &[u8], protocol: u8) -> Option<InetSocket> {
    let msg = body.get(..MSG)?;
    let family = msg[0];
    let id: [u8; SOCKID] = msg[4..4 + SOCKID].try_into().ok()?;
    let sport = u16::from_be_bytes([id[0], id[1]]);
    let dport = u16::from_be_bytes([id[2], id[3]]);
    let address = |at: usize| -> Option<IpAddr> {
        let b: [u8; 16] = id[at..at + 16].try_into().ok()?;
        Some(if i32::from(family) == libc::AF_INET {
            Ipv4Addr::new(b[0], b[1], b[2], b[3]).into()
        } else {
            Ipv6Addr::from(b).into()
        })
    };
    let tail = &msg[4 + SOCKID..];
    let word = |i: usize| u32::from_ne_bytes([tail[i], tail[i + 1], tail[i + 2], tail[i + 3]]);
    let mut cgroup = None;
    let mut attrs = &body[MSG..];
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            break;
        }
        if kind == INET_DIAG_CGROUP_ID && len >= 12 {
            cgroup = attrs[4..12].try_into().ok().map(u64::from_ne_bytes);
        }
        attrs = attrs.get((len + 3) & !3..).unwrap_or(&[]);
    }
    Some(InetSocket {
        protocol: if protocol == libc::IPPROTO_TCP as u8 {
            Protocol::Tcp
        } else {
            Protocol::Udp
        },
        local: SocketAddr::new(address(4)?, sport),
        peer: SocketAddr::new(address(20)?, dport),
        uid: word(12),
        inode: word(16),
        cgroup,
        id,
        family,
    })
}

/// Closes `socket` (its owner sees ECONNABORTED). Fails with EOPNOTSUPP on
/// kernels built without CONFIG_INET_DIAG_DESTROY.
pub fn destroy(target: &InetSocket) -> io::Result<()> {
    let fd = socket()?;
    let protocol = match target.protocol {
        Protocol::Tcp => libc::IPPROTO_TCP as u8,
        Protocol::Udp => libc::IPPROTO_UDP as u8,
    };
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    send(
        &fd,
        &request(
            SOCK_DESTROY,
            flags,
            target.family,
            protocol,
            u32::MAX,
            &target.id,
        ),
    )?;
    let mut buf = [0u8; 1024];
    let n = recv(&fd, &mut buf)?;
    for (kind, body) in messages(&buf[..n]) {
        if kind == NLMSG_ERROR {
            return match errno_of(body) {
                0 => Ok(()),
                errno => Err(io::Error::from_raw_os_error(errno)),
            };
        }
    }
    Err(io::Error::other("no answer to SOCK_DESTROY"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_on_loopback_is_listed_with_its_peer_and_owner() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let to = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(to).unwrap();
        let from = client.local_addr().unwrap();
        let sockets = connected_sockets().expect("sock_diag");
        let ours = sockets
            .iter()
            .find(|s| s.local == from && s.peer == to)
            .expect("the client's socket is listed");
        // SAFETY: geteuid has no preconditions.
        assert_eq!(ours.uid, unsafe { libc::geteuid() });
        assert_eq!(ours.protocol, Protocol::Tcp);
        assert!(ours.inode > 0);
    }
}

//! The kernel's socket diagnostics (NETLINK_SOCK_DIAG), the little the
//! guard needs from them: the connected TCP and UDP sockets of this network
//! namespace with their peer, owner and cgroup, and closing one
//! (SOCK_DESTROY, which needs CONFIG_INET_DIAG_DESTROY). The connect hooks
//! judge only connects made after they were attached; this finds the ones
//! made before.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::ebpf::Protocol;
use crate::netlink::{
    NLMSG_DONE, NLMSG_ERROR, NLMSG_HDR, attributes, errno_of, messages, recv, send,
};

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

const SOCKID: usize = 48;
const REQ: usize = 8 + SOCKID;
const MSG: usize = 4 + SOCKID + 20;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const INET_DIAG_CGROUP_ID: u16 = 21;
/// TCP states of connections that carry data (not LISTEN, TIME_WAIT,
/// CLOSE or request sockets): ESTABLISHED, SYN_SENT, FIN_WAIT1/2,
/// CLOSE_WAIT, LAST_ACK, CLOSING.
const TCP_STATES: u32 = (1 << 1) | (1 << 2) | (1 << 4) | (1 << 5) | (1 << 8) | (1 << 9) | (1 << 11);
/// A connected UDP socket is "established".
const UDP_STATES: u32 = 1 << 1;

/// An inet_diag_req_v2 message of type `kind`.
// Writes fixed offsets of a buffer of the fixed size made here.
#[allow(clippy::indexing_slicing)]
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

/// Every connected TCP and UDP socket (IPv4 and IPv6) of this thread's
/// network namespace.
pub fn connected_sockets() -> io::Result<Vec<InetSocket>> {
    let fd = crate::netlink::open(libc::NETLINK_SOCK_DIAG, 0)?;
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
                let n = recv(&fd, &mut buf, true)?;
                if n == 0 {
                    break;
                }
                for (kind, body) in messages(buf.get(..n).unwrap_or_default()) {
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
    let (msg, attrs) = body.split_at_checked(MSG)?;
    let &family = msg.first()?;
    let id: [u8; SOCKID] = msg.get(4..4 + SOCKID)?.try_into().ok()?;
    let &[s0, s1, d0, d1, ..] = &id;
    let sport = u16::from_be_bytes([s0, s1]);
    let dport = u16::from_be_bytes([d0, d1]);
    let address = |at: usize| -> Option<IpAddr> {
        let b: [u8; 16] = id.get(at..at + 16)?.try_into().ok()?;
        Some(if i32::from(family) == libc::AF_INET {
            let [a, b, c, d, ..] = b;
            Ipv4Addr::new(a, b, c, d).into()
        } else {
            Ipv6Addr::from(b).into()
        })
    };
    let tail = msg.get(4 + SOCKID..)?;
    let word = |i: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(tail.get(i..i + 4)?.try_into().ok()?))
    };
    let cgroup = attributes(attrs)
        .find(|(kind, _)| *kind == INET_DIAG_CGROUP_ID)
        .and_then(|(_, value)| value.get(..8)?.try_into().ok())
        .map(u64::from_ne_bytes);
    Some(InetSocket {
        protocol: if protocol == libc::IPPROTO_TCP as u8 {
            Protocol::Tcp
        } else {
            Protocol::Udp
        },
        local: SocketAddr::new(address(4)?, sport),
        peer: SocketAddr::new(address(20)?, dport),
        uid: word(12)?,
        inode: word(16)?,
        cgroup,
        id,
        family,
    })
}

/// Closes `socket` (its owner sees ECONNABORTED). Fails with EOPNOTSUPP on
/// kernels built without CONFIG_INET_DIAG_DESTROY.
pub fn destroy(target: &InetSocket) -> io::Result<()> {
    let fd = crate::netlink::open(libc::NETLINK_SOCK_DIAG, 0)?;
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
    let n = recv(&fd, &mut buf, true)?;
    for (kind, body) in messages(buf.get(..n).unwrap_or_default()) {
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

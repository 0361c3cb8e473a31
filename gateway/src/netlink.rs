//! rtnetlink, the little the guards need from it: the interfaces with their
//! index and link type, and a wake-up when interfaces or addresses change
//! (the remote guard re-attaches to a recreated interface; the local guard
//! keeps "this host's addresses" current).
//!
//! The sockets belong to the network namespace of the thread that opens
//! them, like every other socket.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use ipnet::IpNet;

use tokio::io::unix::AsyncFd;

/// One network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// The ARPHRD_* link type: 1 Ethernet, 772 loopback, 65534 none (tun,
    /// WireGuard), 768 ipip, 778 GRE, …
    pub kind: u16,
}

/// ARPHRD types whose frames start with a 14-byte Ethernet header.
const ETHERNET_LIKE: [u16; 2] = [1, ARPHRD_LOOPBACK];
/// `lo`'s link type.
pub const ARPHRD_LOOPBACK: u16 = 772;
/// ARPHRD types without a link header: the packet starts at its IP header.
const NO_LINK_HEADER: [u16; 7] = [65534, 768, 769, 776, 778, 823, 519];

impl Link {
    /// Bytes before the network header on this interface, when the guard
    /// knows its link type.
    pub fn link_header_len(&self) -> Option<u32> {
        if ETHERNET_LIKE.contains(&self.kind) {
            Some(14)
        } else if NO_LINK_HEADER.contains(&self.kind) {
            Some(0)
        } else {
            None
        }
    }
}

pub(crate) const NLMSG_HDR: usize = 16;
const IFINFOMSG: usize = 16;
const IFLA_IFNAME: u16 = 3;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
pub(crate) const NLMSG_DONE: u16 = 3;
pub(crate) const NLMSG_ERROR: u16 = 2;

/// A non-blocking netlink socket of `protocol` (NETLINK_ROUTE,
/// NETLINK_SOCK_DIAG), subscribed to `groups`.
pub(crate) fn open(protocol: i32, groups: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            protocol,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_nl is plain data; zero is valid.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr.nl_groups = groups;
    // SAFETY: addr is a valid sockaddr_nl of the size passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::from_ref(&addr).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Every interface of this thread's network namespace.
pub fn links() -> io::Result<Vec<Link>> {
    let fd = open(libc::NETLINK_ROUTE, 0)?;
    let mut request = [0u8; NLMSG_HDR + IFINFOMSG];
    let len = request.len() as u32;
    request[0..4].copy_from_slice(&len.to_ne_bytes());
    request[4..6].copy_from_slice(&RTM_GETLINK.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    request[6..8].copy_from_slice(&flags.to_ne_bytes());
    request[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // ifinfomsg: family AF_UNSPEC, everything else 0.
    dump(&fd, &request, RTM_NEWLINK, parse_link)
}

/// Sends dump `request` and collects what `parse` makes of each answer of
/// type `kind`, until NLMSG_DONE; bounded so a confused kernel cannot
/// hang us.
fn dump<T>(
    fd: &OwnedFd,
    request: &[u8],
    kind: u16,
    parse: impl Fn(&[u8]) -> Option<T>,
) -> io::Result<Vec<T>> {
    send(fd, request)?;
    let mut found = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..100_000 {
        let n = recv(fd, &mut buf, true)?;
        for (k, body) in messages(buf.get(..n).unwrap_or_default()) {
            match k {
                NLMSG_DONE => return Ok(found),
                NLMSG_ERROR => return Err(io::Error::from_raw_os_error(errno_of(body))),
                k if k == kind => found.extend(parse(body)),
                _ => {}
            }
        }
    }
    Err(io::Error::other("rtnetlink dump did not end"))
}

/// The interface named `name`, if there is one.
pub fn link(name: &str) -> io::Result<Option<Link>> {
    Ok(links()?.into_iter().find(|l| l.name == name))
}

/// Sends one netlink message.
pub(crate) fn send(fd: &OwnedFd, message: &[u8]) -> io::Result<()> {
    // SAFETY: a valid buffer of the size passed.
    let n = unsafe { libc::send(fd.as_raw_fd(), message.as_ptr().cast(), message.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives what is queued; with `wait`, waits up to 5 s for it (a kernel
/// that never answers cannot hang the caller).
pub(crate) fn recv(fd: &OwnedFd, buf: &mut [u8], wait: bool) -> io::Result<usize> {
    loop {
        let flags = if wait { 0 } else { libc::MSG_DONTWAIT };
        if wait {
            // The socket is non-blocking (for the subscriptions); a dump
            // answer arrives at once, so wait for it briefly.
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&raw mut pfd, 1, 5000) };
            if rc == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "netlink did not answer",
                ));
            }
        }
        // SAFETY: buf is valid for buf.len() bytes.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The errno an NLMSG_ERROR body carries (0: an acknowledgement).
pub(crate) fn errno_of(body: &[u8]) -> i32 {
    body.first_chunk::<4>()
        .map(|b| -i32::from_ne_bytes(*b))
        .unwrap_or(0)
}

/// (type, value) of each attribute (rtattr) in `buf`; stops at the first
/// malformed one.
pub(crate) fn attributes(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        let len = usize::from(u16::from_ne_bytes([*rest.first()?, *rest.get(1)?]));
        let kind = u16::from_ne_bytes([*rest.get(2)?, *rest.get(3)?]);
        let value = rest.get(4..len)?;
        rest = rest.get((len + 3) & !3..).unwrap_or(&[]);
        Some((kind, value))
    })
}

/// (type, body) of each netlink message in `buf`; stops at the first
/// malformed header.
pub(crate) fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let &[l0, l1, l2, l3, k0, k1, ..] = buf.get(at..at + NLMSG_HDR)? else {
            return None;
        };
        let len = u32::from_ne_bytes([l0, l1, l2, l3]) as usize;
        let kind = u16::from_ne_bytes([k0, k1]);
        if len < NLMSG_HDR {
            return None;
        }
        let body = buf.get(at + NLMSG_HDR..at + len)?;
        at += (len + 3) & !3;
        Some((kind, body))
    })
}

fn parse_link(body: &[u8]) -> Option<Link> {
    let (info, attrs) = body.split_at_checked(IFINFOMSG)?;
    let &[_, _, k0, k1, i0, i1, i2, i3, ..] = info else {
        return None;
    };
    let kind = u16::from_ne_bytes([k0, k1]);
    let index = i32::from_ne_bytes([i0, i1, i2, i3]);
    let (_, value) = attributes(attrs).find(|(k, _)| *k == IFLA_IFNAME)?;
    let name = value.split(|b| *b == 0).next().unwrap_or_default();
    Some(Link {
        index: u32::try_from(index).ok()?,
        name: String::from_utf8_lossy(name).into_owned(),
        kind,
    })
}

/// What reaches a socket on this host, in this thread's network namespace:
/// every destination the kernel's local routing table delivers locally,
/// IPv4 and IPv6, with its prefix length. That is each address of each
/// interface, and what no interface lists: subnet broadcast addresses
/// (also of addresses added without `brd`), IPv6 anycast addresses (the
/// subnet-router anycast address when forwarding is on), and AnyIP routes
/// (`ip route add local 10.0.0.0/24 dev lo`: the whole prefix is this host).
pub fn local_addresses() -> io::Result<Vec<IpNet>> {
    let mut out = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        out.extend(local_routes(family)?);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Every (interface name, address) of this thread's network namespace,
/// IPv4 subnet broadcast addresses included.
pub fn interface_addresses() -> io::Result<Vec<(String, std::net::IpAddr)>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills list; it is freed below.
    if unsafe { libc::getifaddrs(&raw mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut at = list;
    while !at.is_null() {
        // SAFETY: a node of the list getifaddrs returned, valid until freed.
        let entry = unsafe { &*at };
        let name = if entry.ifa_name.is_null() {
            String::new()
        } else {
            // SAFETY: a NUL-terminated name from getifaddrs, valid until freed.
            unsafe { std::ffi::CStr::from_ptr(entry.ifa_name) }
                .to_string_lossy()
                .into_owned()
        };
        let mut push = |a| out.push((name.clone(), a));
        if let Some(a) = address_of(entry.ifa_addr) {
            push(a);
        }
        if entry.ifa_flags & libc::IFF_BROADCAST as u32 != 0
            && let Some(a) = address_of(entry.ifa_ifu)
        {
            push(a);
        }
        at = entry.ifa_next;
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(out)
}

/// The address in a sockaddr from getifaddrs, when it is IPv4 or IPv6.
fn address_of(sa: *const libc::sockaddr) -> Option<std::net::IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: a non-null sockaddr from getifaddrs; its family says which
    // larger struct it is.
    unsafe {
        match i32::from((*sa).sa_family) {
            libc::AF_INET => {
                let sin = &*sa.cast::<libc::sockaddr_in>();
                Some(std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into())
            }
            libc::AF_INET6 => {
                let sin6 = &*sa.cast::<libc::sockaddr_in6>();
                Some(std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr).into())
            }
            _ => None,
        }
    }
}

const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTMSG: usize = 12;
const RTA_DST: u16 = 1;
const RT_TABLE_LOCAL: u8 = 255;
/// rtm_type values that deliver to this host.
const RTN_LOCAL: u8 = 2;
const RTN_BROADCAST: u8 = 3;
const RTN_ANYCAST: u8 = 4;
const NETLINK_GET_STRICT_CHK: libc::c_int = 12;

/// The local, broadcast and anycast routes of `family`'s local table.
fn local_routes(family: u8) -> io::Result<Vec<IpNet>> {
    let fd = open(libc::NETLINK_ROUTE, 0)?;
    // With strict checking the kernel dumps only the table asked for, so a
    // router's full table is never walked; older kernels dump every table
    // and the type filter below keeps what is local.
    let one: libc::c_int = 1;
    // SAFETY: a valid int option of the size passed.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_NETLINK,
            NETLINK_GET_STRICT_CHK,
            std::ptr::from_ref(&one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    let mut request = [0u8; NLMSG_HDR + RTMSG];
    let len = request.len() as u32;
    request[0..4].copy_from_slice(&len.to_ne_bytes());
    request[4..6].copy_from_slice(&RTM_GETROUTE.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    request[6..8].copy_from_slice(&flags.to_ne_bytes());
    request[8..12].copy_from_slice(&1u32.to_ne_bytes());
    request[NLMSG_HDR] = family;
    request[NLMSG_HDR + 4] = RT_TABLE_LOCAL;
    dump(&fd, &request, RTM_NEWROUTE, parse_local_route)
}

/// A route that delivers to this host, as the prefix it covers.
fn parse_local_route(body: &[u8]) -> Option<IpNet> {
    let (rtm, attrs) = body.split_at_checked(RTMSG)?;
    let &[family, dst_len, _, _, _, _, _, kind, ..] = rtm else {
        return None;
    };
    if !matches!(kind, RTN_LOCAL | RTN_BROADCAST | RTN_ANYCAST) {
        return None;
    }
    let dst = attributes(attrs).find(|(k, _)| *k == RTA_DST);
    let addr: IpAddr = match (i32::from(family), dst) {
        (libc::AF_INET, Some((_, v))) => <[u8; 4]>::try_from(v).ok()?.into(),
        (libc::AF_INET6, Some((_, v))) => <[u8; 16]>::try_from(v).ok()?.into(),
        // No destination: the default route, all of the family.
        (libc::AF_INET, None) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        (libc::AF_INET6, None) => std::net::Ipv6Addr::UNSPECIFIED.into(),
        _ => return None,
    };
    IpNet::new(addr, dst_len).ok().map(|n| n.trunc())
}

/// What a [`Changes`] subscription wakes up for.
#[derive(Debug, Clone, Copy)]
pub enum Watch {
    /// Interfaces appearing, going, changing.
    Links,
    /// IPv4 and IPv6 addresses and routes added or removed (what
    /// [`local_addresses`] reads).
    Addresses,
}

/// Wakes up when the kernel announces a change of what it watches. It says
/// only that something changed: the caller reads the current state again,
/// so a lost notification (a full socket buffer) costs nothing but a wake-up.
pub struct Changes {
    fd: AsyncFd<OwnedFd>,
}

impl Changes {
    /// Subscribes in this thread's network namespace. Needs a tokio runtime.
    pub fn subscribe(watch: Watch) -> io::Result<Changes> {
        let groups = match watch {
            Watch::Links => libc::RTMGRP_LINK as u32,
            Watch::Addresses => {
                (libc::RTMGRP_IPV4_IFADDR
                    | libc::RTMGRP_IPV6_IFADDR
                    | libc::RTMGRP_IPV4_ROUTE
                    | libc::RTMGRP_IPV6_ROUTE) as u32
            }
        };
        Changes::from_fd(open(libc::NETLINK_ROUTE, groups)?)
    }

    /// Watches an already subscribed socket (non-blocking).
    fn from_fd(fd: OwnedFd) -> io::Result<Changes> {
        // SAFETY: as in subscribe: the AsyncFd owns the descriptor.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(Changes { fd })
    }

    /// Waits for the next change, then takes every notification queued.
    pub async fn changed(&mut self) -> io::Result<()> {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let mut ready = self.fd.readable().await?;
            let mut got = false;
            loop {
                match recv(ready.get_inner(), &mut buf, false) {
                    Ok(_) => got = true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // ENOBUFS: notifications were lost; a change it is.
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => got = true,
                    Err(e) => return Err(e),
                }
            }
            ready.clear_ready();
            if got {
                return Ok(());
            }
        }
    }
}

/// [`Changes`], and a look every `poll` besides (a lost notification costs
/// at most that long); once the notifications fail, the looks alone. A
/// follower that stops hearing of changes keeps following them.
pub struct Follow {
    changes: Option<Changes>,
    poll: tokio::time::Interval,
}

impl Follow {
    pub fn new(changes: Changes, poll: std::time::Duration) -> Follow {
        let mut poll = tokio::time::interval_at(tokio::time::Instant::now() + poll, poll);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Follow {
            changes: Some(changes),
            poll,
        }
    }

    /// Waits until it is time to read the state again. Err (once): the
    /// notifications just failed; from then on only the looks wake it.
    pub async fn next(&mut self) -> io::Result<()> {
        let Some(changes) = &mut self.changes else {
            self.poll.tick().await;
            return Ok(());
        };
        tokio::select! {
            changed = changes.changed() => changed.inspect_err(|_| self.changes = None),
            _ = self.poll.tick() => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loopback_interface_is_listed_with_its_link_type() {
        let lo = link("lo").expect("rtnetlink").expect("lo exists");
        assert_eq!((lo.kind, lo.link_header_len()), (772, Some(14)));
        assert!(lo.index > 0);
    }

    #[test]
    fn loopback_is_among_the_local_addresses() {
        let addresses = local_addresses().expect("route dump");
        assert!(
            addresses.contains(&"127.0.0.0/8".parse().unwrap()),
            "{addresses:?}"
        );
        assert!(
            addresses.contains(&"::1/128".parse().unwrap()),
            "{addresses:?}"
        );
    }

    #[tokio::test]
    async fn notifications_that_fail_turn_into_looks() {
        // A socket that turns readable but whose receive fails: a TCP
        // listener with a connection waiting (recv: ENOTCONN).
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let _waiting = std::net::TcpStream::connect(socket.local_addr().unwrap()).unwrap();
        let changes = Changes::from_fd(OwnedFd::from(socket)).unwrap();
        let mut follow = Follow::new(changes, std::time::Duration::from_millis(200));
        let bound = std::time::Duration::from_secs(5);
        let first = tokio::time::timeout(bound, follow.next()).await.unwrap();
        assert_eq!(
            first.map_err(|e| e.raw_os_error()),
            Err(Some(libc::ENOTCONN)),
            "the failure is reported"
        );
        for _ in 0..3 {
            tokio::time::timeout(bound, follow.next())
                .await
                .expect("and the looks go on")
                .expect("without failing again");
        }
    }

    #[test]
    fn messages_stop_at_a_malformed_header() {
        let mut buf = vec![0u8; 20];
        buf[0..4].copy_from_slice(&200u32.to_ne_bytes());
        assert_eq!(messages(&buf).count(), 0);
        let mut good = vec![0u8; 16];
        good[0..4].copy_from_slice(&16u32.to_ne_bytes());
        good[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        assert_eq!(
            messages(&good).map(|(k, _)| k).collect::<Vec<_>>(),
            [NLMSG_DONE]
        );
    }
}

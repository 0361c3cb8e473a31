//! Types shared by the gateway (userspace) and its eBPF programs.
//!
//! Everything here is `#[repr(C)]` with explicit padding so both sides agree on
//! the layout byte for byte, and `no_std` so the eBPF crate can use it.
#![no_std]

/// Counters the connect guard keeps, indexed by [`GuardCounter`].
///
/// Stored in a `PerCpuArray<u64>`; the userspace side sums the CPUs.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardCounter {
    /// A connect() the program looked at.
    Seen = 0,
    /// A connect() to a protected backend from the gateway: let through.
    Allowed = 1,
    /// A connect() to a protected backend from anyone else: refused (EPERM).
    Refused = 2,
    /// Would have been refused; let through because enforcement is "audit".
    Audited = 3,
}

impl GuardCounter {
    /// Number of counters: the size of the counter map.
    pub const COUNT: u32 = 4;
}

/// How many protected-backend rules (an address with a port or a port range)
/// the guard counts separately, per address family.
pub const MAX_RULES: u32 = 4096;

/// How many protected (protocol, address, port) entries the maps hold per
/// address family: a rule's range is one entry per port.
pub const MAX_PROTECTED_PORTS: u32 = 65536;

/// Transport protocols the local guard tells apart (IANA numbers, as the
/// kernel's `bpf_sock_addr.protocol` reports them).
pub mod protocol {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

/// What the guard does to a connect() that bypasses the gateway.
pub mod enforcement {
    /// Refuse it with EPERM.
    pub const ENFORCE: u32 = 0;
    /// Count it and let it through (staged rollout).
    pub const AUDIT: u32 = 1;
}

/// The guard's settings, in a one-entry array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardConfig {
    /// cgroup v2 id of the gateway's own cgroup: its connects pass.
    pub gateway_cgroup: u64,
    /// [`enforcement::ENFORCE`] or [`enforcement::AUDIT`].
    pub enforcement: u32,
    /// The gateway's uid: connects from its cgroup pass only with this uid
    /// too. [`ANY_UID`] when only the cgroup counts.
    pub gateway_uid: u32,
}

/// [`GuardConfig::gateway_uid`] when any uid in the gateway's cgroup passes
/// ((uid_t)-1 is never a real uid).
pub const ANY_UID: u32 = u32::MAX;

/// A protected backend as the IPv4 map keys it: address and port in network
/// byte order, as the kernel hands them to `cgroup/connect4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendV4 {
    pub addr: u32,
    pub port: u16,
    /// [`protocol::TCP`] or [`protocol::UDP`].
    pub protocol: u8,
    /// Explicit padding: the hash map compares whole keys, so no byte may be
    /// left uninitialised.
    pub _pad: u8,
}

/// A protected backend as the IPv6 map keys it (network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendV6 {
    pub addr: [u32; 4],
    pub port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// A bypass attempt, as the guard reports it through its ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BypassEvent {
    /// Thread-group id (what userspace calls the pid).
    pub pid: u32,
    pub uid: u32,
    pub cgroup: u64,
    /// Destination address, network byte order; IPv4 uses the first word.
    pub addr: [u32; 4],
    /// 4 or 6.
    pub family: u16,
    /// Destination port, network byte order.
    pub port: u16,
    /// 1 when let through because enforcement is "audit", 0 when refused.
    pub audited: u8,
    /// [`protocol::TCP`] (a connect) or [`protocol::UDP`] (a connect or a
    /// datagram sent).
    pub protocol: u8,
    pub _pad: u16,
    /// The task's command name, NUL-padded.
    pub comm: [u8; 16],
}

/// At most this many bypass events per CPU per second reach userspace; the
/// counters still count every attempt.
pub const EVENTS_PER_SECOND: u64 = 64;

/// Counters the remote guard (TC ingress) keeps, indexed by [`IngressCounter`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IngressCounter {
    /// A packet to a protected port.
    Protected = 0,
    /// From an allowed (gateway) source: passed.
    Allowed = 1,
    /// From anyone else: dropped.
    Dropped = 2,
    /// Would have been dropped; passed because enforcement is "audit".
    Audited = 3,
}

impl IngressCounter {
    pub const COUNT: u32 = 4;
}

/// Protected port rules (one per configured port or range) the remote guard holds.
pub const MAX_PORT_RULES: u32 = 256;
/// Allowed source prefixes per address family.
pub const MAX_ALLOWED_SOURCES: u32 = 1024;

/// The remote guard's settings, in a one-entry array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngressConfig {
    /// [`enforcement::ENFORCE`] or [`enforcement::AUDIT`].
    pub enforcement: u32,
    /// Explicit padding.
    pub _pad: u32,
}

/// A packet from a source that is not the gateway to a protected port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IngressEvent {
    /// Source and destination addresses, network byte order; IPv4 uses word 0.
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// The interface it arrived on.
    pub ifindex: u32,
    /// Ports in host byte order.
    pub src_port: u16,
    pub dst_port: u16,
    /// 4 or 6.
    pub family: u8,
    /// 6 (TCP) or 17 (UDP).
    pub protocol: u8,
    /// 1 when passed because enforcement is "audit", 0 when dropped.
    pub audited: u8,
    /// Explicit padding.
    pub _pad: u8,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all are #[repr(C)], Copy, have no implicit padding (it is
    // spelled out as fields) and every bit pattern is a valid value.
    unsafe impl aya::Pod for super::BackendV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BackendV6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::GuardConfig {}
    // SAFETY: as above (56 bytes, no implicit padding).
    unsafe impl aya::Pod for super::BypassEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::IngressConfig {}
    // SAFETY: as above (44 bytes, no implicit padding).
    unsafe impl aya::Pod for super::IngressEvent {}
}

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

/// A port of a protected backend on this host, as the local-port map keys
/// it: a connect to any local address (loopback, the host's own addresses,
/// the wildcard the kernel turns into loopback) with this port and protocol
/// reaches that backend when it listens on all addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LocalPort {
    /// Network byte order, as the kernel hands it to `cgroup/connect4`.
    pub port: u16,
    /// [`protocol::TCP`] or [`protocol::UDP`].
    pub protocol: u8,
    pub _pad: u8,
}

/// In a local-port value: the backend is protected on every local address
/// (without it, only the wildcard address, which always lands on this host,
/// is judged by port).
pub const EVERY_LOCAL_ADDRESS: u32 = 1 << 31;

/// Host addresses (besides 127.0.0.0/8 and ::1) per family the local guard
/// treats as "this host".
pub const MAX_LOCAL_ADDRESSES: u32 = 4096;

/// Where the local guard judged an attempt.
pub mod local_layer {
    /// At connect() or sendmsg() (a process naming a destination).
    pub const CALL: u8 = 0;
    /// A TCP SYN or UDP datagram on its way out, by its final (after NAT)
    /// header.
    pub const EGRESS: u8 = 1;
    /// A raw socket's own packet on its way out.
    pub const RAW: u8 = 2;
    /// A packet arriving at a local backend's socket from outside this
    /// host's own sockets (another host, a tunnel, a tun device, a VM, a
    /// container's namespace).
    pub const INGRESS: u8 = 3;
}

/// A bypass attempt, as the guard reports it through its ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BypassEvent {
    /// Thread-group id (what userspace calls the pid); 0 where no task
    /// could be asked (packets).
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
    /// One of [`local_layer`].
    pub layer: u8,
    pub _pad: u8,
    /// The task's command name, NUL-padded.
    pub comm: [u8; 16],
    /// Where an arriving packet came from ([`local_layer::INGRESS`] only),
    /// network byte order; IPv4 uses the first word.
    pub source: [u32; 4],
    /// Its source port, network byte order.
    pub source_port: u16,
    pub _pad2: [u8; 6],
}

/// At most this many bypass events per CPU per second reach userspace; the
/// counters still count every attempt.
pub const EVENTS_PER_SECOND: u64 = 64;

/// The remote guard's two layers: the TC classifier on the interfaces (drops
/// early, before the stack spends anything on a packet) and the
/// `cgroup_skb/ingress` program at the sockets (judges what the stack
/// delivers: after reassembly and NAT, on every interface, `lo` included).
pub mod layer {
    pub const TC: u8 = 0;
    pub const SOCKET: u8 = 1;
    /// How many layers there are: the counter map holds one set per layer.
    pub const COUNT: u32 = 2;
}

/// Counters the remote guard keeps per layer, indexed by
/// `layer * IngressCounter::COUNT + counter`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IngressCounter {
    /// A packet to a protected port (or one that could not be parsed).
    Protected = 0,
    /// From an allowed (gateway) source: passed.
    Allowed = 1,
    /// From anyone else: dropped.
    Dropped = 2,
    /// Would have been dropped; passed because enforcement is "audit".
    Audited = 3,
    /// Of the above, packets whose ports could not be read (a tiny first
    /// fragment, too many VLAN tags or IPv6 extension headers, a truncated
    /// header): judged as if they went to a protected port.
    Unparsable = 4,
}

impl IngressCounter {
    pub const COUNT: u32 = 5;

    /// Index of this counter of `layer` in the counter map.
    pub const fn index(self, layer: u8) -> u32 {
        layer as u32 * Self::COUNT + self as u32
    }
}

/// Protected port rules (one per configured port or range) the remote guard holds.
pub const MAX_PORT_RULES: u32 = 256;
/// Allowed source prefixes per address family.
pub const MAX_ALLOWED_SOURCES: u32 = 1024;
/// Interfaces the remote guard's TC layer can be attached to at once.
pub const MAX_INTERFACES: u32 = 256;
/// VLAN tags the TC layer walks (802.1Q, 802.1ad); a frame with more still
/// inside is judged as unparsable.
pub const MAX_VLAN_TAGS: usize = 4;

/// The remote guard's settings, in a one-entry array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngressConfig {
    /// [`enforcement::ENFORCE`] or [`enforcement::AUDIT`].
    pub enforcement: u32,
    /// Explicit padding.
    pub _pad: u32,
}

/// How the TC layer finds the network header on one interface (by ifindex).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkKind {
    /// Bytes before the network header: 14 on Ethernet (and `lo`), 0 on L3
    /// devices (tun, WireGuard, ipip, GRE), which have no link header.
    pub l2_len: u32,
}

/// Why a packet was judged.
pub mod reason {
    /// It went to a protected port.
    pub const PROTECTED_PORT: u8 = 0;
    /// Its ports could not be read.
    pub const UNPARSABLE: u8 = 1;
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
    /// Ports in host byte order (0 when they could not be read).
    pub src_port: u16,
    pub dst_port: u16,
    /// 4 or 6.
    pub family: u8,
    /// 6 (TCP), 17 (UDP), or what the parser stopped at.
    pub protocol: u8,
    /// 1 when passed because enforcement is "audit", 0 when dropped.
    pub audited: u8,
    /// [`layer::TC`] or [`layer::SOCKET`].
    pub layer: u8,
    /// [`reason::PROTECTED_PORT`] or [`reason::UNPARSABLE`].
    pub reason: u8,
    /// Explicit padding.
    pub _pad: [u8; 3],
}

/// Who tried a protected port, as the per-source tally keys it: every
/// bypass attempt counts here, so a source that the per-CPU event budget
/// never reports (a flood of spoofed ones used it up) is still seen.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceKey {
    /// Source address, network byte order; IPv4 uses word 0.
    pub addr: [u32; 4],
    /// Destination port, host byte order (0 for an unparsable packet).
    pub port: u16,
    /// 4 or 6.
    pub family: u8,
    /// 6 (TCP), 17 (UDP), or what the parser stopped at.
    pub protocol: u8,
}

/// The tally of one [`SourceKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceTally {
    /// Attempts since userspace last took the tally.
    pub attempts: u64,
    /// Monotonic clock (ns) of the first and the latest attempt.
    pub first_ns: u64,
    pub last_ns: u64,
}

/// Who tried a protected backend around the gateway on its host, as the
/// local guard's per-source tally keys it: the process's cgroup and uid
/// (not where it went, so a flood of destinations is one source). Packets
/// that arrived from outside this host's sockets are tallied under cgroup
/// 0 and [`ANY_UID`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LocalSourceKey {
    pub cgroup: u64,
    pub uid: u32,
    pub _pad: u32,
}

/// The tally of one [`LocalSourceKey`]: how often, and where it went last.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalTally {
    pub attempts: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    /// The latest destination, network byte order; IPv4 uses word 0.
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    /// [`protocol::TCP`] or [`protocol::UDP`].
    pub protocol: u8,
    /// 4 or 6.
    pub family: u8,
    pub _pad: u32,
}

/// Sources the tallies hold per summary period. The first ones seen stay
/// (a flood of new sources cannot push out one already tallied); attempts
/// of sources that find the tally full are counted, not named.
pub const MAX_TALLIED_SOURCES: u32 = 16384;

/// Entries the admission block list holds per address family.
pub const MAX_BLOCKED: u32 = 65536;

/// Why a source is on the admission block list; also the index of its
/// drop counter in `BLOCK_COUNTERS`.
pub mod block_reason {
    /// Too many failed handshakes (or refusals for exceeding a limit).
    pub const STRIKES: u32 = 0;
    /// Put there by an operator (`gateway block add`).
    pub const MANUAL: u32 = 1;
    /// How many reasons there are.
    pub const COUNT: u32 = 2;
}

/// Counters of the block list's XDP program past the drops per reason, at
/// these indexes of `BLOCK_COUNTERS`.
pub mod block_counter {
    /// New connections (TCP SYNs) to a listener's port that were judged.
    pub const JUDGED: u32 = super::block_reason::COUNT;
    /// Of those, let through from a blocked source whose entry had expired.
    pub const EXPIRED: u32 = super::block_reason::COUNT + 1;
    /// Packets passed because they could not be parsed (fail open: the
    /// gateway's own check at accept still applies).
    pub const UNPARSED: u32 = super::block_reason::COUNT + 2;
    pub const COUNT: u32 = super::block_reason::COUNT + 3;
}

/// A block list entry: the map key is the blocked prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockEntry {
    /// CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns) after which the entry
    /// no longer drops anything: a list the gateway stopped tending cannot
    /// block a source for longer than it was told. `u64::MAX`: no expiry.
    pub expires_ns: u64,
    /// One of [`block_reason`].
    pub reason: u32,
    /// The length of the prefix this entry blocks (its key's), so that
    /// the program, finding it expired, can look for a wider entry still
    /// in force under it. 0 (a /0, or an entry a gateway before this field
    /// wrote in a pinned map): nothing wider to look for.
    pub prefix_len: u32,
}

/// Levels of the block list the program consults for one source, longest
/// prefix first, past entries that expired: the address, its /24 or /64,
/// its /16 or /48 (the levels the gateway blocks at), and one wider an
/// operator may have added. Bounded for the verifier; past them it fails
/// open (the gateway still refuses at accept).
pub const BLOCK_LEVELS: u32 = 4;

/// Listeners the kernel block list judges connections to.
pub const MAX_BLOCK_LISTENERS: u32 = 1024;

/// A listener the block list judges new connections to: its address and
/// port. An all-zero `addr` is a wildcard listener (any local address of
/// the family).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BlockListener {
    /// IPv4 in the first 4 bytes (the rest zero), or IPv6.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    /// 4 or 6.
    pub family: u8,
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
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LocalPort {}
    // SAFETY: as above (80 bytes, no implicit padding).
    unsafe impl aya::Pod for super::BypassEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::IngressConfig {}
    // SAFETY: as above (48 bytes, no implicit padding).
    unsafe impl aya::Pod for super::IngressEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LinkKind {}
    // SAFETY: as above (20 bytes, no implicit padding).
    unsafe impl aya::Pod for super::SourceKey {}
    // SAFETY: as above (24 bytes).
    unsafe impl aya::Pod for super::SourceTally {}
    // SAFETY: as above (16 bytes, no implicit padding).
    unsafe impl aya::Pod for super::LocalSourceKey {}
    // SAFETY: as above (48 bytes, no implicit padding).
    unsafe impl aya::Pod for super::LocalTally {}
    // SAFETY: as above (16 bytes, no implicit padding).
    unsafe impl aya::Pod for super::BlockEntry {}
    // SAFETY: as above (20 bytes, no implicit padding).
    unsafe impl aya::Pod for super::BlockListener {}
}

//! Types shared by the gateway (userspace) and its eBPF programs.
//!
//! Everything here is `#[repr(C)]` with explicit padding so both sides agree on
//! the layout byte for byte, and `no_std` so the eBPF crate can use it.
#![no_std]

/// Counters the connect guard keeps per verdict, indexed by [`GuardCounter`].
///
/// Stored in a `PerCpuArray<u64>`; the userspace side sums the CPUs.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardCounter {
    /// A connect() the program looked at.
    Seen = 0,
    /// A connect() the program let through.
    Allowed = 1,
    /// A connect() the program refused with EPERM.
    Refused = 2,
}

impl GuardCounter {
    /// Number of counters: the size of the counter map.
    pub const COUNT: u32 = 3;
}

/// A protected backend as the eBPF maps key it: IPv4 address and port, both in
/// network byte order as the kernel hands them to `cgroup/connect4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendV4 {
    pub addr: u32,
    pub port: u16,
    /// Explicit padding: the eBPF verifier and the hash map compare whole keys,
    /// so no byte may be left uninitialised.
    pub _pad: u16,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: both types are #[repr(C)], Copy, have no padding bytes left
    // implicit and every bit pattern is a valid value.
    unsafe impl aya::Pod for super::BackendV4 {}
}

//! The block list's copy in the kernel (`ebpf::block_list`), kept in step
//! with the gateway's own: every entry added or removed here is written to
//! the XDP program's maps too, with its expiry.
//!
//! Fail open: the gateway's own check at accept is the one that holds. A
//! program that cannot be loaded, an interface it cannot attach to, a map
//! write that fails: each is logged and counted, and the gateway serves on.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

use ipnet::IpNet;

use crate::config::AdmissionSettings;
use crate::ebpf::block_list::{self, BlockFilter, Counters, Reason};

use super::KernelInterfaces;
use super::block::{BlockReason, Blocked};

/// Where the kernel copy should be.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wanted {
    pin_dir: Option<PathBuf>,
    interfaces: BTreeSet<String>,
    listening: BTreeSet<SocketAddr>,
}

#[derive(Default)]
pub(super) struct Kernel {
    filter: Option<BlockFilter>,
    /// The pin directory the loaded program uses (None: not pinned).
    pin_dir: Option<PathBuf>,
    /// Interfaces it should be on that it could not attach to, with why.
    failed: BTreeMap<String, String>,
    /// Attachments and loads that failed, since start.
    pub attach_failures: u64,
    /// Map writes that failed, since start.
    pub write_failures: u64,
    /// A configuration was applied: from then on the gateway's own list is
    /// the truth, and a program loaded again (the list re-enabled, another
    /// pin directory) drops what its pinned maps hold beyond it (an entry
    /// unblocked meanwhile must not come back).
    configured: bool,
}

impl Kernel {
    /// Brings the kernel copy to what `settings` and the listeners'
    /// addresses ask for. Returns the entries a previous gateway left in
    /// pinned maps (when the program was loaded just now), for the caller
    /// to take over; everything in `list` is written to fresh maps.
    pub fn configure(
        &mut self,
        settings: &AdmissionSettings,
        listening: &[SocketAddr],
        list: &[Blocked],
        now: Instant,
    ) -> Vec<(IpNet, BlockReason, Option<Instant>)> {
        let first = !std::mem::replace(&mut self.configured, true);
        if !settings.kernel_block_list {
            if self.filter.take().is_some() {
                tracing::info!("admission: kernel block list detached (kernel_block_list = false)");
            }
            self.failed.clear();
            return Vec::new();
        }
        let wanted = Wanted {
            pin_dir: settings.pin.then(|| settings.pin_dir.clone()),
            interfaces: match &settings.interfaces {
                Some(names) => names.iter().cloned().collect(),
                None => listening_interfaces(listening),
            },
            listening: listening.iter().copied().collect(),
        };
        if wanted.interfaces.is_empty() {
            // Nothing to attach to (a listener on loopback only): nothing
            // loaded, nothing pinned.
            if self.filter.take().is_some() {
                tracing::info!("admission: kernel block list detached (no interface to attach to)");
            }
            self.failed.clear();
            return Vec::new();
        }
        let mut adopted = Vec::new();
        if self.filter.is_none() || self.pin_dir != wanted.pin_dir {
            self.filter = None;
            match BlockFilter::load(wanted.pin_dir.as_deref()) {
                Ok(mut filter) => {
                    self.pin_dir = wanted.pin_dir.clone();
                    adopted = take_over(&mut filter, now);
                    if !first {
                        for (net, _, _) in adopted.drain(..) {
                            if !list.iter().any(|b| b.net == net) {
                                remove_from(&mut filter, net);
                            }
                        }
                    }
                    self.filter = Some(filter);
                    for b in list {
                        self.insert(b, now);
                    }
                }
                Err(e) => {
                    self.attach_failures += 1;
                    tracing::warn!(error = %e, "admission: the kernel block list could not be loaded; blocked sources are refused at accept instead");
                    return Vec::new();
                }
            }
        }
        let Some(filter) = self.filter.as_mut() else {
            return adopted;
        };
        let listening: Vec<SocketAddr> = wanted.listening.iter().copied().collect();
        if let Err(e) = filter.set_listeners(&listening) {
            self.write_failures += 1;
            tracing::warn!(error = %e, "admission: the kernel block list's listeners could not be written");
        }
        for (name, _) in filter.attached() {
            if !wanted.interfaces.contains(&name) {
                filter.detach(&name);
                tracing::info!(interface = %name, "admission: kernel block list detached");
            }
        }
        self.failed.clear();
        for name in &wanted.interfaces {
            let was = filter.attached().iter().any(|(n, _)| n == name);
            match filter.attach(name) {
                Ok(mode) if !was => {
                    tracing::info!(interface = %name, mode = mode.name(), "admission: kernel block list attached: blocked sources' new connections are dropped there");
                }
                Ok(_) => {}
                Err(e) => {
                    self.attach_failures += 1;
                    tracing::warn!(interface = %name, error = %e, "admission: kernel block list not attached; blocked sources arriving there are refused at accept instead");
                    self.failed.insert(name.clone(), e.to_string());
                }
            }
        }
        adopted
    }

    /// Writes one entry (its expiry converted to the kernel's clock).
    pub fn insert(&mut self, b: &Blocked, now: Instant) {
        let Some(filter) = self.filter.as_mut() else {
            return;
        };
        let expires_ns = match b.expires {
            None => u64::MAX,
            Some(e) => {
                let left = e.saturating_duration_since(now).as_nanos();
                block_list::monotonic_ns().saturating_add(u64::try_from(left).unwrap_or(u64::MAX))
            }
        };
        let reason = match b.reason {
            BlockReason::Strikes => Reason::Strikes,
            BlockReason::Manual => Reason::Manual,
        };
        if let Err(e) = filter.insert(b.net, reason, expires_ns) {
            self.write_failures += 1;
            tracing::warn!(net = %b.net, error = %e, "admission: a block could not be written to the kernel; it is refused at accept instead");
        }
    }

    pub fn remove(&mut self, net: IpNet) {
        let Some(filter) = self.filter.as_mut() else {
            return;
        };
        if let Err(e) = filter.remove(net) {
            self.write_failures += 1;
            tracing::warn!(%net, error = %e, "admission: an entry could not be removed from the kernel block list");
        }
    }

    /// Interfaces attached to, with how; and those that failed, with why.
    pub fn interfaces(&self) -> KernelInterfaces {
        KernelInterfaces {
            attached: self
                .filter
                .as_ref()
                .map(BlockFilter::attached)
                .unwrap_or_default()
                .into_iter()
                .map(|(name, mode)| (name, mode.name()))
                .collect(),
            failed: self
                .failed
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    pub fn counters(&self) -> Option<Counters> {
        let filter = self.filter.as_ref()?;
        match filter.counters() {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::debug!(error = %e, "admission: reading the kernel block list's counters");
                None
            }
        }
    }
}

fn remove_from(filter: &mut BlockFilter, net: IpNet) {
    if let Err(e) = filter.remove(net) {
        tracing::warn!(%net, error = %e, "admission: an entry the gateway no longer blocks could not be removed from the kernel block list");
    }
}

/// The entries a previous gateway left, with their expiry on this clock.
/// Expired ones are removed from the maps: the gateway would never know
/// them, so nothing would ever take them out (nor could `gateway block
/// remove`, which asks the gateway's list), and the program would find
/// them first (the longest prefix) and pass a source a wider entry blocks.
fn take_over(filter: &mut BlockFilter, now: Instant) -> Vec<(IpNet, BlockReason, Option<Instant>)> {
    let kernel_now = block_list::monotonic_ns();
    match filter.entries() {
        Ok(entries) => entries
            .into_iter()
            .filter(|(net, reason, expires)| {
                if *expires > kernel_now {
                    // Written again: a gateway before `prefix_len` left it
                    // 0, which stops the program's look past an expired
                    // entry for a wider one.
                    if let Err(e) = filter.insert(*net, *reason, *expires) {
                        tracing::warn!(%net, error = %e, "admission: an entry a previous gateway left could not be written again to the kernel block list");
                    }
                    return true;
                }
                if let Err(e) = filter.remove(*net) {
                    tracing::warn!(%net, error = %e, "admission: an expired entry a previous gateway left could not be removed from the kernel block list");
                }
                false
            })
            .map(|(net, reason, expires)| {
                let reason = match reason {
                    Reason::Strikes => BlockReason::Strikes,
                    Reason::Manual => BlockReason::Manual,
                };
                let expires = (expires != u64::MAX)
                    .then(|| now + std::time::Duration::from_nanos(expires - kernel_now));
                (net, reason, expires)
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "admission: reading the pinned block list");
            Vec::new()
        }
    }
}

/// The interfaces holding the listeners' addresses (all of them for a
/// wildcard bind), loopback excepted: its clients are local processes,
/// and generic XDP copies every loopback packet it sees (TCP's are clones),
/// which the gateway's own traffic to local backends would pay for. Name
/// `lo` in `interfaces` to have it anyway.
fn listening_interfaces(listening: &[SocketAddr]) -> BTreeSet<String> {
    let (addresses, links) = match (
        crate::netlink::interface_addresses(),
        crate::netlink::links(),
    ) {
        (Ok(a), Ok(l)) => (a, l),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, "admission: listing interfaces for the kernel block list");
            return BTreeSet::new();
        }
    };
    let loopback = |name: &str| {
        links
            .iter()
            .any(|l| l.name == name && l.kind == crate::netlink::ARPHRD_LOOPBACK)
    };
    let wildcard = listening.iter().any(|a| a.ip().is_unspecified());
    addresses
        .into_iter()
        .filter(|(name, ip)| {
            // Canonical: a listener on `::ffff:a.b.c.d` takes the IPv4
            // packets of an interface holding a.b.c.d.
            !loopback(name)
                && (wildcard
                    || listening
                        .iter()
                        .any(|l| l.ip().to_canonical() == ip.to_canonical()))
        })
        .map(|(name, _)| name)
        .collect()
}

//! gateway: an eBPF-accelerated L4 mTLS gateway.
//!
//! The binary is a thin shell around [`app::build`] and [`app::App::run`];
//! tests drive the same functions in-process. See ARCHITECTURE.md for the map.

#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

pub mod access_log;
pub mod admin;
pub mod admission;
pub mod app;
pub mod config;
pub mod descriptors;
pub mod ebpf;
pub mod expiry;
pub mod fleet;
pub mod forward;
pub mod guard;
pub mod hello;
pub mod identity;
pub mod issuer;
pub mod listener;
pub mod login;
pub mod metrics;
pub mod netlink;
pub mod offload;
pub mod pki;
pub mod policy;
pub mod preview;
pub mod privilege;
pub mod proxy_protocol;
pub mod registry;
pub mod remote_guard;
pub mod revisions;
pub mod rollout;
pub mod safe_dir;
pub mod sock_diag;
pub mod spiffe;
pub mod state;
pub mod systemd;
#[cfg(test)]
mod testing;
pub mod tls;
pub mod upstream;
pub mod watch;
pub mod workers;

pub use app::{App, AppError, ShutdownHandle, build};
pub use config::Config;

//! Telling systemd what the gateway is doing (`sd_notify`), so a unit with
//! `Type=notify-reload` knows when it serves, when a reload is done, and
//! when it drains: `READY=1` once every listener is bound, `RELOADING=1`
//! with `MONOTONIC_USEC` then `READY=1` around each reload, `STOPPING=1` on
//! SIGTERM, and `STATUS=` lines an operator reads in `systemctl status`.
//!
//! Without `NOTIFY_SOCKET` (not under systemd, or `Type=simple`) each call
//! does nothing. A message that cannot be sent is logged once and never
//! stops the gateway: systemd's own timeouts report a unit that never
//! became ready.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use sd_notify::NotifyState;

/// What the last reload did, for the periodic status line.
static LAST_RELOAD: Mutex<Option<String>> = Mutex::new(None);
static WARNED: AtomicBool = AtomicBool::new(false);

/// Every listener is bound: systemd may start what depends on us.
pub fn ready(listeners: usize) {
    send(&[
        NotifyState::Ready,
        NotifyState::Status(&format!("serving {listeners} listener(s)")),
    ]);
}

/// A reload starts. `MONOTONIC_USEC` lets systemd tell this reload's
/// `READY=1` from one it saw before (required by `Type=notify-reload`).
pub fn reloading() {
    let now = match NotifyState::monotonic_usec_now() {
        Ok(now) => now,
        Err(e) => {
            // Without the timestamp systemd would ignore the message.
            warn(&e);
            return;
        }
    };
    send(&[
        NotifyState::Reloading,
        now,
        NotifyState::Status("reloading"),
    ]);
}

/// The reload ended (applied or refused: either way the gateway serves).
pub fn reloaded<T, E: std::fmt::Display>(outcome: &Result<T, E>) {
    let when = crate::access_log::now_rfc3339();
    let status = match outcome {
        Ok(_) => format!("last reload {when}: applied"),
        Err(e) => format!("last reload {when}: refused, running state kept: {e}"),
    };
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
    *LAST_RELOAD.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
}

/// SIGTERM: draining. systemd shows the unit as deactivating from here.
pub fn stopping(live: usize) {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status(&format!("draining {live} live connection(s)")),
    ]);
}

/// The periodic status: live connections and the last reload.
pub fn status(live: usize) {
    let last = LAST_RELOAD
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_else(|| "no reload yet".into());
    send(&[NotifyState::Status(&format!(
        "{live} live connection(s); {last}"
    ))]);
}

/// Whether systemd listens (`NOTIFY_SOCKET` is set).
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        warn(&e);
    }
}

fn warn(e: &std::io::Error) {
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET); serving regardless");
    }
}

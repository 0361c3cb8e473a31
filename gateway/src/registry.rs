//! Live connections and what policy needs to judge them again.
//!
//! Continuous verification: after every reload each live connection is
//! re-checked against the new state with the same verifier the handshake
//! used (trust, CRLs, device, policy, mode), and a once-a-second tick closes
//! those whose certificate expired, whose lifetime is up or whose route's
//! time window closed. A closed connection's access-log line says why.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls_pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;

use crate::config::Mode;
use crate::identity::Identity;
use crate::policy::{Subject, Verdict};
use crate::state::ListenerState;

/// One live connection, as the registry holds it.
struct Entry {
    listener: String,
    route: String,
    source: IpAddr,
    identity: Option<Identity>,
    /// The client's chain as sent (leaf first), to verify again on reload.
    chain: Vec<CertificateDer<'static>>,
    opened: Instant,
    close: CancellationToken,
    why: Arc<Mutex<Option<String>>>,
}

impl Entry {
    fn close(&self, why: String) {
        let mut slot = self.why.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            tracing::info!(listener = %self.listener, route = %self.route, client = %self.source,
                reason = %why, "closing live connection");
            *slot = Some(why);
        }
        self.close.cancel();
    }
}

#[derive(Default)]
pub struct Registry {
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Arc<Entry>>>,
}

/// What a connection needs to hear that it must close, and why.
pub struct Registration {
    id: u64,
    registry: Arc<Registry>,
    pub close: CancellationToken,
    why: Arc<Mutex<Option<String>>>,
}

impl Registration {
    /// Why the gateway closed this connection, if it did.
    pub fn reason(&self) -> Option<String> {
        self.why.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

/// What `register` needs to know about a connection.
pub struct Live {
    pub listener: String,
    pub route: String,
    pub source: IpAddr,
    pub identity: Option<Identity>,
    pub chain: Vec<CertificateDer<'static>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Entry>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live entries, so judging them (signature checks on reload) does
    /// not hold up connections registering meanwhile.
    fn snapshot(&self) -> Vec<Arc<Entry>> {
        self.lock().values().cloned().collect()
    }

    /// Tracks a connection until the returned registration drops. `close` is
    /// a child of the shutdown token, so draining closes it too.
    pub fn register(self: &Arc<Self>, live: Live, parent: &CancellationToken) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let close = parent.child_token();
        let why = Arc::new(Mutex::new(None));
        self.lock().insert(
            id,
            Arc::new(Entry {
                listener: live.listener,
                route: live.route,
                source: live.source,
                identity: live.identity,
                chain: live.chain,
                opened: Instant::now(),
                close: close.clone(),
                why: why.clone(),
            }),
        );
        Registration {
            id,
            registry: self.clone(),
            close,
            why,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// After a reload: judge every live connection against the new listeners.
    /// Returns how many were closed.
    pub fn reverify(&self, listeners: &HashMap<String, Arc<ListenerState>>) -> usize {
        let mut closed = 0;
        for entry in self.snapshot() {
            if let Some(why) = reverify_one(&entry, listeners) {
                entry.close(why);
                closed += 1;
            }
        }
        closed
    }

    /// The periodic check: expiry, lifetime, time windows (policy without the
    /// signature work, which only a reload can change).
    pub fn tick(&self, listeners: &HashMap<String, Arc<ListenerState>>) -> usize {
        let now = jiff::Timestamp::now();
        let mut closed = 0;
        for entry in self.snapshot() {
            if let Some(why) = tick_one(&entry, listeners, now) {
                entry.close(why);
                closed += 1;
            }
        }
        closed
    }
}

fn reverify_one(entry: &Entry, listeners: &HashMap<String, Arc<ListenerState>>) -> Option<String> {
    let Some(listener) = listeners.get(&entry.listener) else {
        // A removed listener drains: its connections may finish.
        return None;
    };
    let Some(route) = listener.routes.iter().find(|r| r.name == entry.route) else {
        return Some("route removed by reload".into());
    };
    match route.mode() {
        Mode::Off | Mode::Audit => return None,
        Mode::Enforce => {}
    }
    if entry.chain.is_empty() {
        return Some("route now enforces and the client presented no certificate".into());
    }
    listener
        .tls
        .recheck(&route.auth, entry.source, &entry.chain)
        .err()
        .map(|why| format!("no longer allowed after reload: {why}"))
}

fn tick_one(
    entry: &Entry,
    listeners: &HashMap<String, Arc<ListenerState>>,
    now: jiff::Timestamp,
) -> Option<String> {
    let listener = listeners.get(&entry.listener)?;
    if let Some(limit) = listener.max_connection_lifetime
        && entry.opened.elapsed() >= limit
    {
        return Some(format!("max_connection_lifetime ({limit:?}) reached"));
    }
    let identity = entry.identity.as_ref()?;
    if identity.not_after <= now.as_second() {
        return Some("client certificate expired".into());
    }
    let route = listener.routes.iter().find(|r| r.name == entry.route)?;
    if route.mode() != Mode::Enforce {
        return None;
    }
    match route.auth.policy.decide(Subject {
        identity,
        source: entry.source,
        now,
    }) {
        Verdict::Allow { .. } => None,
        Verdict::Deny(reason) => Some(format!("no longer allowed: {reason}")),
    }
}

/// How often `tick` runs.
pub const TICK: Duration = Duration::from_secs(1);

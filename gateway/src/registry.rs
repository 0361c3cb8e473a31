//! Live connections and what policy needs to judge them again.
//!
//! Continuous verification: after every reload each live connection is
//! re-checked against the new state with the same verifier the handshake
//! used (trust, CRLs, device, policy, mode), and a once-a-second tick closes
//! those whose certificate expired, whose lifetime is up or whose route's
//! time window closed. A closed connection's access-log line says why.
//!
//! A handshake reads its listener's state when the connection is accepted,
//! and may take as long as `handshake_timeout`; a reload can come and go
//! meanwhile. So the registry keeps the state every reload published under
//! a generation, and a connection goes live (`register`) only against the
//! current one: if the generation moved since its accept read the state,
//! it is judged again first, and refused if the new state refuses it. The
//! reload publishes after swapping the listeners and before taking its
//! snapshot to re-verify, so every connection is judged by the state that
//! is current when it goes live, either here or by that re-verification.
//!
//! A connection belongs to the route its server name maps to, so every
//! judgement looks the route up by that name again (`route_for`): a reload
//! that sends the server name to another route, removes it, or takes the
//! backend the connection went to off its route refuses the connection,
//! even when a route with the old name remains. A connection whose
//! handshake straddled a reload connects with the route `register` hands
//! back, the current one.
//!
//! Each connection keeps the listener state it was last judged by. When a
//! reload removes (or renames) its listener, that kept state goes on
//! judging it: the tick applies its routes' time windows, its lifetime and
//! the chain's expiry, and every reload re-checks the chain with its kept
//! trust bundles plus every CRL of the new state, so a revocation published
//! anywhere the gateway now reads still reaches it. A removed listener
//! drains like a shutdown: after `drain_timeout` its connections close.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rustls_pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;

use crate::config::Mode;
use crate::forward::Moved;
use crate::identity::Identity;
use crate::policy::{Subject, Verdict};
use crate::state::{ListenerState, Route};
use crate::tls::bundle::Verified;
use crate::tls::{ListenerTls, Rejected};

/// One live connection, as the registry holds it.
struct Entry {
    listener: String,
    /// The server name the client asked for: each judgement finds the
    /// connection's route by it.
    sni: Option<String>,
    /// The route the connection connects with (what `register` handed
    /// back): where it may have gone is among these backends.
    via: Arc<Route>,
    /// The backend it reached, once it did.
    backend: Arc<OnceLock<String>>,
    /// The client's address and port, as the access log names it.
    client: SocketAddr,
    identity: Option<Identity>,
    /// The client's chain as sent, to verify again on reload: its own leaf,
    /// and the intermediates it sent, shared with every live connection
    /// that sent the same ones (see `Inner::intermediates`).
    leaf: Option<CertificateDer<'static>>,
    intermediates: Intermediates,
    judgement: Mutex<Judgement>,
    opened: Instant,
    close: CancellationToken,
    why: Arc<Mutex<Option<String>>>,
    /// What its transfer moved so far, for `GET /connections`.
    moved: Moved,
    /// Its backend was told in a PROXY header that the client was
    /// verified and admitted: from then on it is judged as on an
    /// enforcing route, whatever its route's mode becomes (a backend told
    /// "verified" must never hold a client the gateway would refuse).
    told_admitted: AtomicBool,
}

/// One live connection as `GET /connections` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConnectionView {
    pub listener: String,
    pub route: String,
    /// The client's names (URI, DNS, email SANs), as the access log has
    /// them; None: no certificate.
    pub identity: Option<Vec<String>>,
    /// The client's address and port.
    pub source: String,
    pub backend: Option<String>,
    pub age_seconds: u64,
    pub client_to_backend_bytes: u64,
    pub backend_to_client_bytes: u64,
    /// "kernel" or "userspace"; None while it is still connecting.
    pub offload: Option<String>,
}

/// What a connection's last judgement rests on.
#[derive(Clone)]
struct Judgement {
    /// The listener state it was judged by, kept after a reload removes the
    /// listener (see the module's comment).
    state: Arc<ListenerState>,
    /// The route of `state` its server name mapped to.
    route: Arc<Route>,
    /// When the verified chain stops being good on its own (a CA
    /// certificate's notAfter, a CRL's nextUpdate), as the last check
    /// found it.
    verified: Verified,
    /// When a reload removed the connection's listener; None while it serves.
    orphaned: Option<Instant>,
}

impl Entry {
    fn judgement(&self) -> Judgement {
        self.judgement
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The connection as a judgement sees it.
    fn judged(&self) -> Judged<'_> {
        Judged {
            sni: self.sni.as_deref(),
            route: &self.via.name,
            via: Some(&self.via),
            backend: self.backend.get().map(String::as_str),
            source: self.client.ip(),
            leaf: self.leaf.as_ref(),
            intermediates: &self.intermediates,
            told_admitted: self.told_admitted.load(Ordering::Acquire),
        }
    }

    fn close(&self, why: String) {
        let mut slot = self.why.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            tracing::info!(listener = %self.listener, route = %self.via.name, client = %self.client,
                reason = %why, "closing live connection");
            *slot = Some(why);
        }
        self.close.cancel();
    }
}

type Intermediates = Arc<[CertificateDer<'static>]>;

/// Every serving listener's current state, by name.
pub type Listeners = HashMap<String, Arc<ListenerState>>;

/// Every route of `listeners`: (listener, route, mode).
pub fn routes_of(listeners: &Listeners) -> Vec<(String, String, Mode)> {
    listeners
        .values()
        .flat_map(|l| {
            l.routes
                .iter()
                .map(|r| (l.name.clone(), r.name.clone(), r.mode()))
        })
        .collect()
}

#[derive(Default)]
pub struct Registry {
    next_id: AtomicU64,
    inner: Mutex<Inner>,
}

/// Which publication of the listeners' states a connection's handshake
/// read: compare with `Registry::generation` to know whether it is current.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Generation(u64);

impl Generation {
    /// Its number: later publications have larger ones.
    pub fn get(self) -> u64 {
        self.0
    }
}

#[derive(Default)]
struct Inner {
    /// Bumped by every `publish`.
    generation: Generation,
    /// The listeners' states as of `generation`, by name.
    listeners: Listeners,
    /// How long a removed listener's connections may go on.
    drain_timeout: Duration,
    live: HashMap<u64, Arc<Entry>>,
    /// The intermediates live connections sent, each set kept once: a
    /// fleet's clients present a handful of issuing CAs, and an idle
    /// connection should not carry its own copy (about half its chain).
    /// The leaf stays per connection.
    intermediates: HashSet<Intermediates>,
}

impl Inner {
    fn intern(&mut self, certs: &[CertificateDer<'static>]) -> Intermediates {
        if let Some(shared) = self.intermediates.get(certs) {
            return shared.clone();
        }
        let owned: Intermediates = certs.iter().cloned().collect();
        self.intermediates.insert(owned.clone());
        owned
    }

    fn remove(&mut self, id: u64) {
        let Some(entry) = self.live.remove(&id) else {
            return;
        };
        // The set's reference and this entry's: no other connection holds
        // these. (A snapshot keeping the entry alive a while is fine; the
        // entry has its own reference.)
        if Arc::strong_count(&entry.intermediates) <= 2 {
            self.intermediates.remove(&entry.intermediates[..]);
        }
    }
}

/// What a connection needs to hear that it must close, and why.
pub struct Registration {
    id: u64,
    registry: Arc<Registry>,
    entry: Arc<Entry>,
    pub close: CancellationToken,
    why: Arc<Mutex<Option<String>>>,
    backend: Arc<OnceLock<String>>,
    /// Why the current state would deny the client, when a reload during
    /// its handshake moved its route to audit and it would now be refused
    /// there: audit lets it through, but not as admitted.
    pub would_deny: Option<String>,
    /// The listener state it was registered under (its PROXY header, if
    /// any, is built from it).
    registered_under: Arc<ListenerState>,
}

impl Registration {
    /// Records that its backend will be told, in a PROXY header, that the
    /// client was verified and admitted: from now on a reload or the tick
    /// judges it as on an enforcing route (and closes it when that would
    /// refuse it), also when its route moves to audit or off. Then judged
    /// once more by the current state, as the header was built from the
    /// state at `register`: Err when that state would not admit it.
    pub fn told_admitted(&self) -> Result<(), String> {
        self.entry.told_admitted.store(true, Ordering::Release);
        let Some(current) = self.registry.current(&self.entry.listener) else {
            return Err(format!("listener {:?} was removed", self.entry.listener));
        };
        // A reload since register judged it before this flag was set.
        if !Arc::ptr_eq(&current, &self.registered_under) {
            let (route, verified) = self
                .entry
                .judged()
                .against(&current, &current.tls)
                .map_err(|r| r.why)?;
            // What the chain check learned (the CRLs' next update, the
            // CAs' expiry) is the tick's to watch; a reload that judged it
            // by this same state before the flag checked no chain. (A newer
            // state's reload judges it again itself.)
            let mut j = self
                .entry
                .judgement
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if Arc::ptr_eq(&j.state, &current) {
                if let Some(v) = verified {
                    j.verified = v;
                }
                j.route = route;
            }
        }
        Ok(())
    }

    /// Records the backend the connection reached (as the route names it):
    /// from now on it is judged by whether its route still has that one.
    pub fn connected(&self, backend: &str) {
        let _ = self.backend.set(backend.to_owned());
    }

    /// Where its forwarder counts the bytes it moves.
    pub fn moved(&self) -> &Moved {
        &self.entry.moved
    }

    /// Why the gateway closed this connection, if it did.
    pub fn reason(&self) -> Option<String> {
        self.why.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(self.id);
    }
}

/// What `register` needs to know about a connection.
pub struct Live<'a> {
    /// The listener state its handshake was judged by.
    pub state: Arc<ListenerState>,
    /// The route of `state` its handshake was judged by.
    pub route: Arc<Route>,
    /// The server name it asked for (None: it sent none).
    pub sni: Option<String>,
    /// The client's address and port.
    pub client: SocketAddr,
    pub identity: Option<Identity>,
    /// The client's chain as sent, leaf first (empty: no certificate).
    pub chain: &'a [CertificateDer<'static>],
    /// What the handshake's chain check learned.
    pub verified: Verified,
    /// The generation current when the connection's listener state was read.
    pub judged_at: Generation,
}

/// How every close or refusal by re-verification at a reload begins, in
/// the access log and on stderr: one prefix to search for.
pub const AFTER_RELOAD: &str = "no longer allowed after reload";

/// Why a connection may not go live: the state published since its
/// handshake began refuses it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{AFTER_RELOAD}: {0} (refused as it went live: the reload came during its handshake)")]
pub struct Refused(pub String);

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live entries, so judging them (signature checks on reload) does
    /// not hold up connections registering meanwhile.
    fn snapshot(&self) -> Vec<Arc<Entry>> {
        self.lock().live.values().cloned().collect()
    }

    /// Makes `listeners` the current state and moves the generation on.
    /// A reload calls this after swapping the listeners' states and before
    /// `reverify`.
    pub fn publish(&self, listeners: Listeners, drain_timeout: Duration) {
        let mut inner = self.lock();
        inner.generation.0 += 1;
        inner.listeners = listeners;
        inner.drain_timeout = drain_timeout;
    }

    /// Every route the current state serves: (listener, route, mode).
    pub fn routes(&self) -> Vec<(String, String, crate::config::Mode)> {
        routes_of(&self.lock().listeners)
    }

    /// The current listeners' states, by name.
    pub fn listeners(&self) -> Listeners {
        self.lock().listeners.clone()
    }

    /// The current generation; read it before the listener's state.
    pub fn generation(&self) -> Generation {
        self.lock().generation
    }

    /// Tracks a connection until the returned registration drops. `close` is
    /// a child of the shutdown token, so draining closes it too.
    ///
    /// If a reload published since `live.judged_at`, the connection is
    /// first judged again by the current state, outside the lock (signature
    /// checks), and that repeats until no reload came in between; Err when
    /// the current state refuses it. Gives back the route to connect with:
    /// the one its server name maps to in the current state.
    pub fn register(
        self: &Arc<Self>,
        live: Live<'_>,
        parent: &CancellationToken,
    ) -> Result<(Registration, Arc<Route>), Refused> {
        let (leaf, rest) = match live.chain.split_first() {
            Some((leaf, rest)) => (Some(leaf), rest),
            None => (None, &[][..]),
        };
        let mut judged_at = live.judged_at;
        let mut verified = live.verified;
        let mut state = live.state;
        let mut route = live.route;
        let mut would_deny = None;
        let mut inner = loop {
            let inner = self.lock();
            if inner.generation == judged_at {
                break inner;
            }
            judged_at = inner.generation;
            let current = inner.listeners.get(&state.name).cloned();
            drop(inner);
            let Some(current) = current else {
                return Err(Refused(format!("listener {:?} was removed", state.name)));
            };
            // Not connecting yet: it will connect with the route judged
            // here, so where it goes is no question yet.
            let judged = Judged {
                sni: live.sni.as_deref(),
                route: &route.name,
                via: None,
                backend: None,
                source: live.client.ip(),
                leaf,
                intermediates: rest,
                told_admitted: false,
            };
            let now = match judged.against(&current, &current.tls) {
                Ok((now, Some(v))) => {
                    verified = v;
                    now
                }
                Ok((now, None)) => now,
                Err(r) => return Err(Refused(r.why)),
            };
            // Audit refuses nothing, so `against` checks no chain; but the
            // backend is about to be told whether the client was admitted,
            // and that is the current state's to say.
            would_deny = match (now.mode(), leaf) {
                (Mode::Audit, Some(leaf)) => {
                    match current.tls.recheck(&now.auth, live.client.ip(), leaf, rest) {
                        Ok(v) => {
                            verified = v;
                            None
                        }
                        Err(r) => Some(r.why),
                    }
                }
                (Mode::Audit, None) => Some("client presented no certificate".into()),
                _ => None,
            };
            route = now;
            state = current;
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let close = parent.child_token();
        let why = Arc::new(Mutex::new(None));
        let leaf = leaf.cloned();
        let intermediates = inner.intern(rest);
        let backend = Arc::new(OnceLock::new());
        let registered_under = state.clone();
        let entry = Arc::new(Entry {
            listener: state.name.clone(),
            sni: live.sni,
            via: route.clone(),
            backend: backend.clone(),
            client: live.client,
            identity: live.identity,
            leaf,
            intermediates,
            judgement: Mutex::new(Judgement {
                state,
                route: route.clone(),
                verified,
                orphaned: None,
            }),
            opened: Instant::now(),
            close: close.clone(),
            why: why.clone(),
            moved: Moved::default(),
            told_admitted: AtomicBool::new(false),
        });
        inner.live.insert(id, entry.clone());
        drop(inner);
        let registration = Registration {
            id,
            registry: self.clone(),
            entry,
            close,
            why,
            backend,
            would_deny,
            registered_under,
        };
        Ok((registration, route))
    }

    pub fn len(&self) -> usize {
        self.lock().live.len()
    }

    /// The current state of the listener named `name`, if it serves.
    fn current(&self, name: &str) -> Option<Arc<ListenerState>> {
        self.lock().listeners.get(name).cloned()
    }

    /// Up to `limit` live connections, oldest first, and how many there
    /// are in all. Only the entries are copied under the lock; the views
    /// are made outside it, so a large listing holds up no registration.
    pub fn connections(&self, limit: usize) -> (Vec<ConnectionView>, usize) {
        let mut live = self.snapshot();
        let total = live.len();
        live.sort_by_key(|e| e.opened);
        let views = live
            .iter()
            .take(limit)
            .map(|e| ConnectionView {
                listener: e.listener.clone(),
                route: e.via.name.clone(),
                identity: e.identity.as_ref().map(Identity::names),
                source: e.client.to_string(),
                backend: e.backend.get().cloned(),
                age_seconds: e.opened.elapsed().as_secs(),
                client_to_backend_bytes: e.moved.client_to_backend.load(Ordering::Relaxed),
                backend_to_client_bytes: e.moved.backend_to_client.load(Ordering::Relaxed),
                offload: e.moved.path().map(str::to_owned),
            })
            .collect();
        (views, total)
    }

    /// Distinct sets of intermediates the live connections hold.
    pub fn shared_intermediates(&self) -> usize {
        self.lock().intermediates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// After a reload (and its `publish`): judge every live connection
    /// against the current listeners; one whose listener is gone against
    /// the state it was last judged by, with every CRL of the current state
    /// besides its own. Returns how many were closed.
    pub fn reverify(&self) -> usize {
        let listeners = self.lock().listeners.clone();
        let dry = self.dry_run(&listeners);
        self.apply(dry)
    }

    /// Judges every live connection against `listeners` as `reverify`
    /// would once they are published, and changes nothing: a reload's dry
    /// run. The preview reports it, the reload's guard counts it, and the
    /// reload applies it (`apply`), so all three rest on one judgement.
    pub fn dry_run(&self, listeners: &Listeners) -> DryRun {
        DryRun {
            listeners: listeners.clone(),
            outcomes: judge_all(listeners, self.snapshot_with_ids()),
        }
    }

    /// Applies a dry run made against the states published since:
    /// closes what it refused, records what it kept. A connection that went
    /// live after it, or whose own facts changed since (its backend reached,
    /// its backend told it was admitted), or a dry run against other states
    /// than the current ones, is judged anew. Returns how many were closed.
    pub fn apply(&self, dry: DryRun) -> usize {
        let listeners = self.lock().listeners.clone();
        let same_states = listeners.len() == dry.listeners.len()
            && listeners.iter().all(|(name, l)| {
                dry.listeners
                    .get(name)
                    .is_some_and(|judged| Arc::ptr_eq(l, judged))
            });
        let mut judged: HashMap<u64, Outcome> = if same_states {
            dry.outcomes.into_iter().map(|o| (o.id, o)).collect()
        } else {
            HashMap::new()
        };
        let mut outcomes = Vec::new();
        let mut again = Vec::new();
        for (id, entry) in self.snapshot_with_ids() {
            match judged.remove(&id) {
                Some(o) if o.still_fits(&entry) => outcomes.push(o),
                _ => again.push((id, entry)),
            }
        }
        outcomes.extend(judge_all(&listeners, again));
        let mut closed = 0;
        for o in outcomes {
            match o.verdict {
                Ok(kept) => {
                    let mut j = o.entry.judgement.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(v) = kept.verified {
                        j.verified = v;
                    }
                    j.state = kept.state;
                    j.route = kept.route;
                    j.orphaned = if kept.serving {
                        None
                    } else {
                        Some(j.orphaned.unwrap_or_else(Instant::now))
                    };
                }
                Err(r) => {
                    o.entry.close(format!("{AFTER_RELOAD}: {}", r.why));
                    closed += 1;
                }
            }
        }
        closed
    }

    fn snapshot_with_ids(&self) -> Vec<(u64, Arc<Entry>)> {
        self.lock()
            .live
            .iter()
            .map(|(id, e)| (*id, e.clone()))
            .collect()
    }

    /// The periodic check: expiry, lifetime, time windows (policy without the
    /// signature work, which only a reload can change), and the drain of
    /// removed listeners' connections.
    pub fn tick(&self) -> usize {
        let drain_timeout = {
            let mut inner = self.lock();
            // A set whose last connection ended while a snapshot still held
            // it was kept at that moment; only the set holds it now.
            inner.intermediates.retain(|i| Arc::strong_count(i) > 1);
            inner.drain_timeout
        };
        let now = jiff::Timestamp::now();
        let mut closed = 0;
        for entry in self.snapshot() {
            let judgement = entry.judgement();
            let why = match judgement.orphaned {
                Some(since) if since.elapsed() >= drain_timeout => Some(format!(
                    "its listener was removed by a reload and drain_timeout ({drain_timeout:?}) passed"
                )),
                _ => tick_one(&entry, &judgement, now),
            };
            if let Some(why) = why {
                entry.close(why);
                closed += 1;
            }
        }
        closed
    }
}

/// Judges `entries` against `listeners`; one whose listener is not among
/// them against the state it was last judged by, with every CRL of
/// `listeners` besides its own.
fn judge_all(listeners: &Listeners, entries: Vec<(u64, Arc<Entry>)>) -> Vec<Outcome> {
    let mut current_crls = None;
    // A removed listener's kept TLS with the current CRLs, built once
    // per kept state (many connections share one). The state is held
    // too, so no other can take its address meanwhile.
    type Merged = (Arc<ListenerState>, Result<Arc<ListenerTls>, String>);
    let mut merged: HashMap<*const ListenerState, Merged> = HashMap::new();
    let mut outcomes = Vec::with_capacity(entries.len());
    for (id, entry) in entries {
        // Read before judging: if either moves meanwhile, `apply` judges
        // the connection again.
        let told_admitted = entry.told_admitted.load(Ordering::Acquire);
        let connected = entry.backend.get().is_some();
        let (state, tls) = match listeners.get(&entry.listener) {
            Some(l) => (l.clone(), None),
            None => {
                let kept = entry.judgement().state;
                let (_, tls) = merged.entry(Arc::as_ptr(&kept)).or_insert_with(|| {
                    let crls = current_crls.get_or_insert_with(|| {
                        listeners
                            .values()
                            .flat_map(|l| l.tls.crls().cloned())
                            .collect::<Vec<_>>()
                    });
                    let tls = kept
                        .tls
                        .with_more_crls(crls)
                        .map(Arc::new)
                        .map_err(|e| e.to_string());
                    (kept.clone(), tls)
                });
                let tls = tls.clone();
                (kept, Some(tls))
            }
        };
        let judged = match &tls {
            None => entry.judged().against(&state, &state.tls),
            Some(Ok(tls)) => entry.judged().against(&state, tls),
            Some(Err(why)) => Err(Rejected::other(why.clone())),
        };
        let serving = listeners.contains_key(&entry.listener);
        outcomes.push(Outcome {
            id,
            entry,
            told_admitted,
            connected,
            verdict: judged.map(|(route, verified)| Kept {
                state,
                route,
                verified,
                serving,
            }),
        });
    }
    outcomes
}

/// Every live connection judged against a set of listener states, nothing
/// applied yet (see `Registry::dry_run`).
pub struct DryRun {
    listeners: Listeners,
    outcomes: Vec<Outcome>,
}

/// One connection's judgement in a dry run.
struct Outcome {
    id: u64,
    entry: Arc<Entry>,
    /// What the judgement saw of the connection's own facts.
    told_admitted: bool,
    connected: bool,
    verdict: Result<Kept, Rejected>,
}

/// What a kept connection's judgement rests on from now on.
struct Kept {
    state: Arc<ListenerState>,
    route: Arc<Route>,
    verified: Option<Verified>,
    /// Its listener is among the judged states (else it drains).
    serving: bool,
}

impl Outcome {
    /// The connection is as it was judged.
    fn still_fits(&self, entry: &Entry) -> bool {
        self.told_admitted == entry.told_admitted.load(Ordering::Acquire)
            && self.connected == entry.backend.get().is_some()
    }

    fn view(&self, reason: String, revoked: bool) -> Affected {
        let e = &self.entry;
        Affected {
            listener: e.listener.clone(),
            route: e.via.name.clone(),
            identity: e.identity.as_ref().map(Identity::names),
            source: e.client.to_string(),
            age_seconds: e.opened.elapsed().as_secs(),
            reason,
            revoked,
        }
    }
}

/// A live connection a reload would close or orphan, as a preview shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Affected {
    pub listener: String,
    pub route: String,
    /// The client's names; None: no certificate.
    pub identity: Option<Vec<String>>,
    /// The client's address and port.
    pub source: String,
    pub age_seconds: u64,
    /// Why it would close (as the access log would say after
    /// `AFTER_RELOAD`), or why it drains.
    pub reason: String,
    /// Closed by the revocation check (the reload guard never counts it).
    pub revoked: bool,
}

impl DryRun {
    /// The connections it would close, by listener, route, then oldest first.
    pub fn closes(&self) -> Vec<Affected> {
        let mut v: Vec<Affected> = self
            .outcomes
            .iter()
            .filter_map(|o| {
                let r = o.verdict.as_ref().err()?;
                Some(o.view(r.why.clone(), r.revoked))
            })
            .collect();
        sort_affected(&mut v);
        v
    }

    /// The connections it would keep whose listener is not among the
    /// judged states and was serving until now: they drain.
    pub fn orphans(&self) -> Vec<Affected> {
        let mut v: Vec<Affected> = self
            .outcomes
            .iter()
            .filter(|o| {
                o.verdict.as_ref().is_ok_and(|k| !k.serving)
                    && o.entry.judgement().orphaned.is_none()
            })
            .map(|o| {
                o.view(
                    "its listener is removed: it drains, closed after drain_timeout".into(),
                    false,
                )
            })
            .collect();
        sort_affected(&mut v);
        v
    }
}

fn sort_affected(v: &mut [Affected]) {
    v.sort_by(|a, b| {
        (&a.listener, &a.route, b.age_seconds, &a.source).cmp(&(
            &b.listener,
            &b.route,
            a.age_seconds,
            &b.source,
        ))
    });
}

/// A connection as a reload judges it: what it presented, from where, for
/// which server name, admitted on which route, and where it went.
struct Judged<'a> {
    sni: Option<&'a str>,
    /// The name of the route it was admitted on.
    route: &'a str,
    /// The route it connects with; None before it connects with any
    /// (then it connects with the route this judgement finds).
    via: Option<&'a Route>,
    /// The backend it reached; None while it is still connecting (then it
    /// may reach any of `via`'s).
    backend: Option<&'a str>,
    source: IpAddr,
    leaf: Option<&'a CertificateDer<'static>>,
    intermediates: &'a [CertificateDer<'static>],
    /// Its backend was told the client is verified and admitted.
    told_admitted: bool,
}

impl Judged<'_> {
    /// Err says why `listener`'s current state, checking chains with `tls`
    /// (its own, or a removed listener's with the current CRLs), would
    /// refuse this connection. Ok gives the route its server name maps to
    /// and, with Some, what a new chain check learned (None: the route's
    /// mode checks no chain).
    fn against(
        &self,
        listener: &ListenerState,
        tls: &ListenerTls,
    ) -> Result<(Arc<Route>, Option<Verified>), Rejected> {
        let Some(route) = listener.route_for(self.sni) else {
            return Err(Rejected::other(match self.sni {
                Some(sni) => format!("no route for server name {sni:?}"),
                None => "no default route (the client sent no server name)".into(),
            }));
        };
        if route.name != self.route {
            // Another route's policy and backends; a route that kept the
            // old name elsewhere is not this connection's.
            return Err(Rejected::other(match self.sni {
                Some(sni) => format!(
                    "server name {sni:?} now goes to route {:?}, not {:?}",
                    route.name, self.route
                ),
                None => format!(
                    "the default route is now {:?}, not {:?}",
                    route.name, self.route
                ),
            }));
        }
        if let Some(via) = self.via {
            self.still_goes_to(via, route).map_err(Rejected::other)?;
        }
        let verified = match route.mode() {
            // Its backend was told "verified, admitted": only what enforce
            // would admit may keep it.
            Mode::Off if self.told_admitted => {
                return Err(Rejected::other(
                    "its backend was told the client is verified, and the route no longer verifies clients (off)"
                        .into(),
                ));
            }
            Mode::Audit if self.told_admitted => {
                let Some(leaf) = self.leaf else {
                    return Err(Rejected::other("its backend was told the client is verified, and it presented no certificate".into()));
                };
                Some(
                    tls.recheck(&route.auth, self.source, leaf, self.intermediates)
                        .map_err(|r| Rejected {
                            why: format!("its backend was told the client is verified, and it no longer is: {}", r.why),
                            revoked: r.revoked,
                        })?,
                )
            }
            Mode::Audit => None,
            Mode::Off => {
                route
                    .auth
                    .policy
                    .admits_source_at(self.source, jiff::Timestamp::now())
                    .map_err(|why| Rejected::other(why.to_string()))?;
                None
            }
            Mode::Enforce => {
                let Some(leaf) = self.leaf else {
                    return Err(Rejected::other(
                        "route now enforces and the client presented no certificate".into(),
                    ));
                };
                Some(tls.recheck(&route.auth, self.source, leaf, self.intermediates)?)
            }
        };
        Ok((route.clone(), verified))
    }

    /// Err when `route` no longer has the backend the connection went to
    /// (or, still connecting with `via`, every backend it may go to), or
    /// now originates TLS to its backends on other terms than this
    /// connection's backend leg was made with, or (still connecting) sends
    /// another PROXY header than the one its backend gets.
    fn still_goes_to(&self, via: &Route, route: &Route) -> Result<(), String> {
        let went: Vec<&str> = match self.backend {
            Some(b) => vec![b],
            None => via.backends.addrs().map(String::as_str).collect(),
        };
        if let Some(gone) = went.iter().find(|b| !route.backends.contains(b)) {
            return Err(format!(
                "backend {gone} is no longer one of route {:?}'s backends",
                route.name
            ));
        }
        // Still connecting: its backend gets the header `via` says (or
        // none), which the backend, set up for the new one, would misread.
        if self.backend.is_none()
            && (via.proxy_protocol, via.proxy_protocol_client_cert)
                != (route.proxy_protocol, route.proxy_protocol_client_cert)
        {
            return Err(format!(
                "route {:?} changed its PROXY protocol setting while this connection was connecting",
                route.name
            ));
        }
        if let Some(now) = &route.upstream_tls {
            let leg = match &via.upstream_tls {
                Some(then) if then.verifies_like(now) => return Ok(()),
                Some(_) => "was verified for another server name or CA",
                None => "is plain TCP",
            };
            return Err(format!(
                "route {:?} now originates TLS to its backends, and this connection's backend leg {leg}",
                route.name
            ));
        }
        Ok(())
    }
}

fn tick_one(entry: &Entry, judgement: &Judgement, now: jiff::Timestamp) -> Option<String> {
    let listener = &judgement.state;
    if let Some(limit) = listener.max_connection_lifetime
        && entry.opened.elapsed() >= limit
    {
        return Some(format!("max_connection_lifetime ({limit:?}) reached"));
    }
    if let Some(identity) = &entry.identity
        && identity.not_after <= now.as_second()
    {
        return Some("client certificate expired".into());
    }
    // webpki checks every CA certificate's validity at the handshake, so
    // the connection ends when the first of them expires, as with the leaf.
    if let Some(ca) = judgement.verified.ca_not_after
        && ca <= now.as_second()
    {
        return Some("a CA certificate in the client's chain expired".into());
    }
    let route = &judgement.route;
    let told_admitted = entry.told_admitted.load(Ordering::Acquire);
    // A handshake now would be refused (crl_expired = "refuse"): the
    // issuer may have revoked the client since, and no newer CRL came.
    if (route.mode() == Mode::Enforce || told_admitted)
        && let Some(next) = judgement.verified.crl_next_update
        && next <= now.as_second()
    {
        return Some(
            "a CRL covering the client's chain is past its next update (crl_expired = \"refuse\")"
                .into(),
        );
    }
    let mode = if told_admitted {
        Mode::Enforce
    } else {
        route.mode()
    };
    still_allowed(route, mode, entry.identity.as_ref(), entry.client.ip(), now)
        .err()
        .map(|why| format!("no longer allowed: {why}"))
}

/// The rules that change with time alone, as the route's mode applies them:
/// all of the policy on `enforce`, sources and time windows on `off`
/// (there is no certificate), nothing on `audit`.
fn still_allowed(
    route: &Route,
    mode: Mode,
    identity: Option<&Identity>,
    source: IpAddr,
    now: jiff::Timestamp,
) -> Result<(), String> {
    let policy = &route.auth.policy;
    match (mode, identity) {
        (Mode::Audit, _) => Ok(()),
        (Mode::Off, _) => policy
            .admits_source_at(source, now)
            .map_err(|r| r.to_string()),
        // Only a reload makes an enforcing route of one that took a client
        // without a certificate, and its re-check closes it; never guess.
        (Mode::Enforce, None) => {
            Err("the route enforces and the client presented no certificate".into())
        }
        (Mode::Enforce, Some(identity)) => match policy.decide(Subject {
            identity,
            source,
            now,
        }) {
            Verdict::Allow { .. } => Ok(()),
            Verdict::Deny(reason) => Err(reason.to_string()),
        },
    }
}

/// How often `tick` runs.
pub const TICK: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    fn der(bytes: &[u8]) -> CertificateDer<'static> {
        CertificateDer::from(bytes.to_vec())
    }

    fn live<'a>(chain: &'a [CertificateDer<'static>]) -> Live<'a> {
        let state = crate::testing::listener_state();
        Live {
            route: state.routes[0].clone(),
            sni: None,
            state,
            client: SocketAddr::from(([127, 0, 0, 1], 40_000)),
            identity: None,
            chain,
            verified: Verified::default(),
            judged_at: Generation::default(),
        }
    }

    #[test]
    fn off_routes_keep_their_sources_and_time_windows_audit_routes_nothing() {
        let policy = Policy {
            allow_sources: vec!["10.0.0.0/8".parse().unwrap()],
            time_windows: vec![
                crate::policy::TimeWindow::compile(&crate::policy::TimeWindowConfig {
                    days: vec![],
                    start: "08:00".into(),
                    end: "18:00".into(),
                    time_zone: "UTC".into(),
                })
                .unwrap(),
            ],
            ..Policy::default()
        };
        let inside: IpAddr = "10.1.2.3".parse().unwrap();
        let outside: IpAddr = "192.0.2.1".parse().unwrap();
        let noon = "2026-11-18T12:00:00Z".parse().unwrap();
        let night = "2026-11-18T22:00:00Z".parse().unwrap();
        let off = crate::testing::route(Mode::Off, policy.clone());
        assert_eq!(still_allowed(&off, Mode::Off, None, inside, noon), Ok(()));
        let closed = still_allowed(&off, Mode::Off, None, inside, night).unwrap_err();
        assert!(
            closed.contains("outside the route's time windows"),
            "{closed}"
        );
        let elsewhere = still_allowed(&off, Mode::Off, None, outside, noon).unwrap_err();
        assert!(
            elsewhere.contains("not in the route's allowed sources"),
            "{elsewhere}"
        );
        let audit = crate::testing::route(Mode::Audit, policy.clone());
        assert_eq!(
            still_allowed(&audit, Mode::Audit, None, outside, night),
            Ok(())
        );
        let enforce = crate::testing::route(Mode::Enforce, policy);
        assert!(still_allowed(&enforce, Mode::Enforce, None, inside, noon).is_err());
    }

    /// A route as the current state has it, with these backends and TLS
    /// towards them.
    fn route_to(backends: &[&str], tls: Option<crate::tls::UpstreamTls>) -> Route {
        let mut r = crate::testing::route(Mode::Enforce, Policy::default());
        r.backends =
            crate::upstream::Backends::new(backends.iter().map(|b| b.to_string()).collect());
        r.upstream_tls = tls;
        r
    }

    fn judged<'a>(via: &'a Route, backend: Option<&'a str>) -> Judged<'a> {
        Judged {
            sni: None,
            route: "api",
            via: Some(via),
            backend,
            source: IpAddr::from([127, 0, 0, 1]),
            leaf: None,
            intermediates: &[],
            told_admitted: false,
        }
    }

    /// A connection may keep only a backend its route still has; one still
    /// connecting may reach any backend of the route it connects with, so
    /// the route must still have them all.
    #[test]
    fn a_connection_keeps_only_a_backend_its_route_still_has() {
        let via = route_to(&["10.0.0.1:80", "10.0.0.2:80"], None);
        let now = route_to(&["10.0.0.1:80"], None);
        assert_eq!(
            judged(&via, Some("10.0.0.1:80")).still_goes_to(&via, &now),
            Ok(())
        );
        let gone = judged(&via, Some("10.0.0.2:80"))
            .still_goes_to(&via, &now)
            .unwrap_err();
        assert!(
            gone.contains("backend 10.0.0.2:80 is no longer one of"),
            "{gone}"
        );
        let connecting = judged(&via, None).still_goes_to(&via, &now).unwrap_err();
        assert!(connecting.contains("10.0.0.2:80"), "{connecting}");
    }

    /// A backend leg verified by other terms than the route's TLS now asks
    /// for (another name or CA, or none at all) does not stay.
    #[test]
    fn a_connection_keeps_its_backend_only_under_the_same_upstream_tls() {
        let dir = tempfile::tempdir().unwrap();
        let tls = |name: &str, ca: &str| {
            let path = dir.path().join(format!("{ca}.pem"));
            if !path.exists() {
                let root = crate::pki::Authority::root(ca).unwrap();
                std::fs::write(&path, &root.cert_pem).unwrap();
            }
            crate::tls::UpstreamTls::load(&path, None, name, crate::offload::Offload::Userspace)
                .unwrap()
        };
        let b = ["10.0.0.1:443"];
        let via = route_to(&b, Some(tls("orders.backend", "ca-1")));
        let judge = |now: &Route| judged(&via, Some(b[0])).still_goes_to(&via, now);
        assert_eq!(
            judge(&route_to(&b, Some(tls("orders.backend", "ca-1")))),
            Ok(())
        );
        assert_eq!(judge(&route_to(&b, None)), Ok(()), "asks for less");
        for other in [tls("vault.backend", "ca-1"), tls("orders.backend", "ca-2")] {
            let why = judge(&route_to(&b, Some(other))).unwrap_err();
            assert!(
                why.contains("was verified for another server name or CA"),
                "{why}"
            );
        }
        let plain = route_to(&b, None);
        let why = judged(&plain, Some(b[0]))
            .still_goes_to(&plain, &route_to(&b, Some(tls("orders.backend", "ca-1"))))
            .unwrap_err();
        assert!(why.contains("is plain TCP"), "{why}");
    }

    #[test]
    fn live_connections_share_the_intermediates_they_sent() {
        let registry = Arc::new(Registry::default());
        let shutdown = CancellationToken::new();
        let a1 = [der(b"leaf 1"), der(b"issuing CA a")];
        let a2 = [der(b"leaf 2"), der(b"issuing CA a")];
        let b = [
            der(b"leaf 3"),
            der(b"issuing CA b"),
            der(b"root-signed CA b"),
        ];

        let one = registry.register(live(&a1), &shutdown).unwrap().0;
        let two = registry.register(live(&a2), &shutdown).unwrap().0;
        let three = registry.register(live(&b), &shutdown).unwrap().0;
        assert_eq!(registry.shared_intermediates(), 2);
        {
            let inner = registry.lock();
            let (e1, e2, e3) = (
                &inner.live[&one.id],
                &inner.live[&two.id],
                &inner.live[&three.id],
            );
            assert!(Arc::ptr_eq(&e1.intermediates, &e2.intermediates));
            assert_eq!(e1.leaf.as_ref(), Some(&a1[0]), "each keeps its own leaf");
            assert_eq!(e2.leaf.as_ref(), Some(&a2[0]));
            assert_eq!(&e3.intermediates[..], &b[1..]);
        }

        drop(one);
        assert_eq!(
            registry.shared_intermediates(),
            2,
            "connection two still holds CA a"
        );
        drop(two);
        assert_eq!(registry.shared_intermediates(), 1);

        // An entry a reload is judging outlives its registration.
        let judging = registry.snapshot();
        drop(three);
        assert_eq!(registry.shared_intermediates(), 0);
        assert_eq!(&judging[0].intermediates[..], &b[1..]);
        assert!(registry.is_empty());
    }

    #[test]
    fn a_set_released_while_judged_is_dropped_by_the_tick() {
        let registry = Arc::new(Registry::default());
        let shutdown = CancellationToken::new();
        let a1 = [der(b"leaf 1"), der(b"issuing CA a")];
        let a2 = [der(b"leaf 2"), der(b"issuing CA a")];
        let one = registry.register(live(&a1), &shutdown).unwrap().0;
        let two = registry.register(live(&a2), &shutdown).unwrap().0;
        let judging = registry.snapshot();
        drop(one);
        drop(two);
        // Both entries were still referenced by the snapshot when their
        // registrations dropped: the set stayed.
        assert_eq!(registry.shared_intermediates(), 1);
        drop(judging);
        registry.tick();
        assert_eq!(registry.shared_intermediates(), 0);
    }
}

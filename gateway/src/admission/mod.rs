//! Admission: who may hold what before they have authenticated.
//!
//! A gateway on the edge is attacked by people who hold no certificate, so
//! the principle is that only an authenticated client can hold what an
//! authenticated client needs. The listener asks one question at accept
//! ([`Admission::admit`]): admit, evict someone, or refuse. Before any byte
//! is read, and in this order:
//!
//! - the block list (`block`): a blocked source is refused;
//! - per source address, per prefix and per network (`sources`): a token
//!   bucket of handshakes and a cap on handshakes in flight;
//! - the listener's slots (`pool`): `max_connections`, of which
//!   `max_handshakes_in_flight` unauthenticated; when full, the handshake
//!   that made the least progress is evicted, never a connection past it.
//!
//! Admitted, a connection carries a [`Ticket`]: the listener tells it when
//! the ClientHello is in and when the handshake is done, and races the
//! handshake against [`Ticket::watch`] (`progress`: eviction, and a minimum
//! byte rate while it is the client's turn). A handshake that ends without
//! authenticating is a strike against its source (and its prefix and
//! network), and so is a refusal for exceeding a limit; enough strikes
//! within a window block the source (or the prefix, or the network) for a
//! while. Eviction by a newcomer is no strike (the listener was full, not
//! the source at fault), unless the handshake was already below the
//! minimum rate (its cut for slowness was due) or was silent past its
//! ClientHello through a turn it overran; a handshake that authenticated with a verified
//! certificate pays one strike of its address back, and once its
//! connection is live the source is *known* on that listener: admitted
//! past a full networks table (each reload judges the known sources
//! again: [`Admission::revalidate`]). A prefix's and network's
//! failures also add up over a longer horizon (a decaying *spread* score,
//! one point per failing address a window, one off per succeeding one), so
//! an attacker spread thin is blocked in the end. The block list also
//! lives in the kernel (`kernel`), where an
//! XDP program drops a blocked source's new connections before a socket
//! exists.
//!
//! Every refusal is counted (`gateway_connections_refused_total{reason}`)
//! and logged at a bounded rate (`refusals`). Everything an attacker can
//! make grow is bounded: the source tables, the block list, the summaries.

pub mod block;
mod kernel;
mod pool;
pub mod progress;
mod refusals;
mod sources;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd as _, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use ipnet::IpNet;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::config::AdmissionSettings;
use crate::metrics::{Exposition, Metrics, counter};
use crate::state::ListenerState;

pub use block::{Added, BlockReason, Blocked};
pub use pool::Pool;
pub use progress::{Cut, Watch};
pub use sources::{Level, Proof};

use block::BlockList;
use pool::Place;
pub(crate) use refusals::RefusalLog;
use sources::{Groups, Sources};

#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    #[error(
        "the block list is full of entries that do not expire ({0}); remove some or raise admission.max_blocked"
    )]
    BlockListFull(usize),
    #[error("{0} is exempt (admission.exempt): it cannot be blocked")]
    Exempt(IpNet),
}

/// Why a connection was refused, or cut, before any route decision: the
/// `reason` of `gateway_connections_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refusal {
    /// Every slot of the listener is held, none by a handshake to evict.
    MaxConnections,
    /// The handshake share is full of handshakes past their ClientHello.
    MaxHandshakesInFlight,
    /// The source (or its prefix) is on the block list.
    Blocked,
    /// The source started handshakes faster than its limit.
    SourceRate,
    /// The source has as many handshakes in flight as it may.
    SourceHandshakes,
    /// The same for the source's prefix.
    PrefixRate,
    PrefixHandshakes,
    /// The same for the source's network (a coarser prefix).
    NetworkRate,
    NetworkHandshakes,
    /// The source's network is new and the table of networks is full of
    /// ones that may not be forgotten yet (handshakes in flight, strikes,
    /// spent buckets): refused rather than forget what an attacker did.
    /// (A full table of addresses or prefixes leaves a new source to its
    /// coarser groups' limits instead.)
    MaxTracked,
    /// The same, and the source's IPv6 allocation (`ipv6_allocation`)
    /// already holds `networks_per_allocation` entries of the networks'
    /// table.
    NetworksPerAllocation,
    /// Admitted, then evicted by a newer connection before its ClientHello
    /// was complete.
    EvictedBeforeHello,
    /// Admitted, then evicted by a newer connection past its ClientHello
    /// (trickling, or not reading, on its turn).
    EvictedAfterHello,
    /// Admitted, then cut for sending below the minimum rate.
    HandshakeTooSlow,
    /// Past its handshake and admitted by its route without being
    /// authenticated (audit would-deny, `mode = "off"`), but its source
    /// (/24, /64) already holds a quarter of `max_connections` so.
    SourceUnauthenticated,
    /// Past its handshake and authenticated, but its identity already
    /// holds `identity_share` of the listener's `max_connections`.
    IdentityConnections,
    /// Past its handshake, unauthenticated (audit would-deny, `mode =
    /// "off"`), and evicted by a newcomer: the listener was full and no
    /// handshake could be evicted.
    EvictedUnauthenticated,
    /// Admitted; the handshake took longer than `handshake_timeout`.
    HandshakeTimeout,
    /// Admitted; the client closed (or reset) its connection during the
    /// handshake.
    ClientClosed,
    /// Admitted; it sent bytes that are not TLS records (plain HTTP, an
    /// SSLv2 hello, random bytes, an oversized or empty record).
    BadRecord,
    /// Admitted; its records held no acceptable ClientHello (another
    /// message first, a malformed or oversized hello).
    BadClientHello,
    /// Admitted; it sent more than `MAX_CLIENT_HELLO` bytes without
    /// completing a ClientHello.
    ClientHelloTooLarge,
    /// Admitted; no route for the server name it asked for.
    NoRoute,
    /// Admitted; nothing in common to speak (TLS versions, cipher suites,
    /// key exchange groups, signature schemes).
    Incompatible,
    /// Admitted; the handshake failed otherwise, before any policy verdict
    /// (a malformed or unexpected message, a broken connection).
    HandshakeFailed,
    /// Accepted with the listener's reserve descriptor and reset at once:
    /// the process had no descriptor left (`descriptors`).
    OutOfDescriptors,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::MaxHandshakesInFlight => "max_handshakes_in_flight",
            Refusal::Blocked => "blocked",
            Refusal::SourceRate => "source_rate",
            Refusal::SourceHandshakes => "source_handshakes",
            Refusal::PrefixRate => "prefix_rate",
            Refusal::PrefixHandshakes => "prefix_handshakes",
            Refusal::NetworkRate => "network_rate",
            Refusal::NetworkHandshakes => "network_handshakes",
            Refusal::MaxTracked => "max_tracked",
            Refusal::NetworksPerAllocation => "networks_per_allocation",
            Refusal::EvictedBeforeHello => "evicted_before_hello",
            Refusal::EvictedAfterHello => "evicted_after_hello",
            Refusal::HandshakeTooSlow => "handshake_too_slow",
            Refusal::SourceUnauthenticated => "source_unauthenticated",
            Refusal::IdentityConnections => "identity_connections",
            Refusal::EvictedUnauthenticated => "evicted_unauthenticated",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::ClientClosed => "client_closed",
            Refusal::BadRecord => "bad_record",
            Refusal::BadClientHello => "bad_client_hello",
            Refusal::ClientHelloTooLarge => "client_hello_too_large",
            Refusal::NoRoute => "no_route",
            Refusal::Incompatible => "incompatible",
            Refusal::HandshakeFailed => "handshake_failed",
            Refusal::OutOfDescriptors => "out_of_descriptors",
        }
    }

    /// Whether it counts towards a block, and from which level up: a
    /// source that exceeded a limit of its own is struck (and so are its
    /// prefix and network); a refusal for a prefix's or a network's shared
    /// limit strikes only that group, never the address refused (an
    /// attacker who drains its /24's bucket would otherwise get an
    /// innocent neighbour blocked). A full listener strikes no one.
    fn strikes(self) -> Option<Level> {
        match self {
            Refusal::SourceRate | Refusal::SourceHandshakes => Some(Level::Address),
            Refusal::PrefixRate | Refusal::PrefixHandshakes => Some(Level::Prefix),
            Refusal::NetworkRate | Refusal::NetworkHandshakes => Some(Level::Network),
            _ => None,
        }
    }
}

/// Whether `source` is in an `exempt` range: not tracked, limited or
/// blocked by admission.
fn exempt(settings: &AdmissionSettings, source: IpAddr) -> bool {
    settings.exempt.iter().any(|n| n.contains(&source))
}

/// Whether `listener`'s state (after a reload) would admit again a known
/// source of it, from what verified it (`proof`): a route of the listener
/// whose bundle still holds the anchor its verified path ended at
/// (subject and key), whose bundle's `spiffe_trust_domains` admit its
/// URIs, and whose policy allows its identity from `source` at some time;
/// and none of the path's certificates on a CRL of the listener
/// (certificates the client sent besides the path are not kept). What it
/// does not check (signatures, validity, the route's time windows):
/// nothing a reload changes; a judgement at the reload's instant would
/// forget every client of an office-hours route at each nightly CRL
/// reload (attacker review 11, R11-1). Its handshakes still judge the
/// windows. Per route: a client one route's bundle verified is not kept
/// known by another route's allowing its name (R11-5, R11-7).
pub fn still_admits(listener: &ListenerState, source: IpAddr, proof: &Proof) -> bool {
    let (subject, key) = (proof.anchor.0.as_slice(), proof.anchor.1.as_slice());
    let revoked = listener.tls.crls().any(|c| {
        proof.certs.iter().any(|(issuer, serial)| {
            c.crl.issuer() == issuer.as_slice()
                // A CRL it cannot read counts as listing it.
                && c.crl.find_serial(serial).map_or(true, |r| r.is_some())
        })
    });
    !revoked
        && listener.routes.iter().any(|r| {
            listener.tls.route_bundle(&r.auth).is_some_and(|b| {
                // The very anchor, by name and key: a CA re-keyed under
                // the same name keeps no one known (R11-5).
                b.anchors().iter().any(|a| {
                    a.subject.as_ref() == subject && a.subject_public_key_info.as_ref() == key
                }) && b.admits_uris(&proof.identity.uris).is_ok()
            }) && matches!(
                r.auth.policy.decide_at_any_time(&proof.identity, source),
                crate::policy::Verdict::Allow { .. }
            )
        })
}

/// Known slots a reload forgets per hold of the tables' lock.
const FORGET_CHUNK: usize = 2048;

/// Every (reason, level) a block is counted by, in the order the metrics
/// list them.
const BLOCK_KINDS: [(BlockReason, Level); 6] = [
    (BlockReason::Strikes, Level::Address),
    (BlockReason::Strikes, Level::Prefix),
    (BlockReason::Strikes, Level::Network),
    (BlockReason::Manual, Level::Address),
    (BlockReason::Manual, Level::Prefix),
    (BlockReason::Manual, Level::Network),
];

/// How far a connection is: its handshake's stages, then past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Stage {
    /// Accepted; its ClientHello is not complete yet.
    Hello = 0,
    /// The ClientHello is in; the handshake goes on.
    Answered = 1,
    /// Past the handshake, admitted by its route (authenticated, unless
    /// the route is `mode = "off"`): it holds a slot but is no longer in
    /// the handshake share, and is never evicted.
    Established = 2,
    /// Evicted by a newer connection.
    Evicted = 3,
}

impl Stage {
    fn from_u8(v: u8) -> Stage {
        match v {
            0 => Stage::Hello,
            1 => Stage::Answered,
            2 => Stage::Established,
            _ => Stage::Evicted,
        }
    }
}

/// The answer to "may this connection start a handshake?".
pub enum Answer {
    Admit(Ticket),
    /// Admitted, in the place of a handshake that had made the least
    /// progress (its connection is being closed).
    Evict {
        ticket: Ticket,
        victim: SocketAddr,
    },
    Refuse(Refusal),
}

/// Where the kernel block list is attached (interface, "native" or
/// "generic"), and where it should be but is not (interface, why).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelInterfaces {
    pub attached: Vec<(String, &'static str)>,
    pub failed: Vec<(String, String)>,
}

/// The gateway's admission: one for all listeners (a source's limits and
/// block hold on every listener), with a pool of slots per listener.
pub struct Admission {
    settings: ArcSwap<AdmissionSettings>,
    state: Mutex<Tables>,
    kernel: Mutex<kernel::Kernel>,
    pools: Mutex<HashMap<String, Arc<Pool>>>,
    refusals: RefusalLog,
    metrics: Arc<Metrics>,
    /// Blocks since start, by [`BlockReason`] and [`Level`].
    blocks: HashMap<(BlockReason, Level), AtomicU64>,
}

struct Tables {
    sources: Sources,
    blocked: BlockList,
}

impl Admission {
    pub fn new(settings: &AdmissionSettings, metrics: Arc<Metrics>) -> Arc<Admission> {
        Arc::new(Admission {
            state: Mutex::new(Tables {
                sources: Sources::new(settings),
                blocked: BlockList::new(settings.max_blocked as usize),
            }),
            settings: ArcSwap::from_pointee(settings.clone()),
            kernel: Mutex::default(),
            pools: Mutex::default(),
            refusals: RefusalLog::default(),
            metrics,
            blocks: BLOCK_KINDS
                .iter()
                .map(|k| (*k, AtomicU64::new(0)))
                .collect(),
        })
    }

    /// Takes new settings (a reload): limits apply to the next accept;
    /// smaller tables forget at once; the kernel copy follows `listening`
    /// (every listener's bound address).
    pub fn configure(&self, settings: &AdmissionSettings, listening: &[SocketAddr]) {
        self.settings.store(Arc::new(settings.clone()));
        let now = Instant::now();
        let mut t = self.tables();
        t.sources.configure(settings, now);
        let mut kernel = self.kernel();
        for net in t.blocked.set_capacity(settings.max_blocked as usize) {
            kernel.remove(net);
        }
        // What the kernel's copy holds when the program is (re)loaded: the
        // list without the blocks that spare known sources. Written whole,
        // they dropped the known sources' SYNs after any reload that loaded
        // the program again (review 7 F9).
        let list = kernel_list(&t);
        let adopted = kernel.configure(settings, listening, &list, now);
        for (net, reason, expires) in adopted {
            if t.blocked
                .lookup(net.addr(), now)
                .is_some_and(|b| b.net == net)
            {
                continue;
            }
            let ttl = expires.map(|e| e.saturating_duration_since(now));
            match t
                .blocked
                .add(net, reason, Level::of(net, settings), ttl, now)
            {
                Added::Yes { displaced } => {
                    tracing::info!(%net, reason = reason.as_str(), ?ttl, "admission: blocked, as the previous gateway left it");
                    if let Some(old) = displaced {
                        kernel.remove(old);
                    }
                }
                // Not on the gateway's list: not in the kernel's either.
                Added::Full => kernel.remove(net),
            }
        }
        // After adoption, so that what a previous gateway left is cleaned
        // too.
        let mut gone = Vec::new();
        // A range made exempt is unblocked at once, in the kernel too: an
        // entry inside it, or one that covers part of it.
        for e in &settings.exempt {
            for net in t
                .blocked
                .select(|b| e.contains(&b.net) || b.net.contains(e))
            {
                t.blocked.remove(&net);
                tracing::info!(%net, exempt = %e, "admission: unblocked: exempt now");
                gone.push(net);
            }
        }
        for net in gone {
            kernel.remove(net);
        }
    }

    /// The pool of `listener`'s slots (the same across reloads).
    pub fn pool(&self, listener: &str) -> Arc<Pool> {
        self.pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(listener.to_owned())
            .or_insert_with(|| Arc::new(Pool::new(listener)))
            .clone()
    }

    /// May `client` start a handshake on the listener whose slots are
    /// `pool` (with its `max_connections` and `max_handshakes_in_flight`)?
    /// A refusal is counted and logged (at a bounded rate) here.
    ///
    /// `socket` is the connection's, when there is one: a duplicate of it
    /// is kept while the handshake lasts, for the kernel's counts of its
    /// progress (eviction, the minimum rate).
    /// Whether `source` is vouched for on `listener`: exempt (the
    /// operator's own ranges, which admission does not track) or served
    /// there a verified certificate from exactly this address within
    /// `known_for` (not merely in a known IPv6 /64), known still or until
    /// a reload judged it no longer admitted. What `auto_revert` listens
    /// to: anyone else can fail a certificate check at will, and a reload
    /// that broke the trust bundle makes the clients served before it
    /// known no more, but they are the ones whose failures tell.
    pub fn vouched(&self, listener: &str, source: IpAddr) -> bool {
        let settings = self.settings.load();
        let source = source.to_canonical();
        exempt(&settings, source)
            || self
                .tables()
                .sources
                .vouched(listener, source, &settings, Instant::now())
    }

    /// A reload published the listeners' states of `generation`: each
    /// known address stays known only where `still` (its listener, the
    /// address, what verified it) says that state would admit it again:
    /// its listener still serves, still trusts an issuer of its chain,
    /// none of its certificates is on a CRL there, a route still allows
    /// its identity (review 7 F8, review 10 R10-1, R10-11). Everyone else
    /// stays known: a daily CRL refresh that revokes no one forgets no
    /// one. From now on a handshake judged by an older state makes no one
    /// known (R10-3). Judged outside the tables' lock (every accept takes
    /// it); gives back how many verifications were refused (an address
    /// whose other identities' are still admitted stays known, R11-2).
    pub fn revalidate(
        &self,
        generation: u64,
        still: impl Fn(&str, IpAddr, &Proof) -> bool,
    ) -> usize {
        let slots = self.tables().sources.judging(generation);
        let gone: Vec<_> = slots
            .into_iter()
            .filter(|(listener, slot, proof)| !still(listener, slot.addr(), proof))
            .map(|(_, slot, proof)| (slot, proof))
            .collect();
        let settings = self.settings.load();
        // In chunks, the lock released between them: at `max_known` a
        // reload withdrawing a CA forgets ~131 072 slots, and every
        // accept waits for the lock (R11-8). A slot's proofs stay in one
        // chunk: its refused co-users' go before it falls back on one.
        let mut rest = gone.as_slice();
        while !rest.is_empty() {
            let mut end = rest.len().min(FORGET_CHUNK);
            while let (Some(a), Some(b)) = (rest.get(end.wrapping_sub(1)), rest.get(end))
                && a.0 == b.0
            {
                end += 1;
            }
            let (chunk, more) = rest.split_at(end);
            self.tables()
                .sources
                .forget(chunk, &settings, Instant::now());
            rest = more;
            // The mutex is not fair: taken again at once, it went back to
            // this thread chunk after chunk while accepts woke to find it
            // held (the whole reload's wait, measured). A pause lets them in.
            if !rest.is_empty() {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        self.tables().sources.prune_listeners();
        gone.len()
    }

    pub fn admit(
        self: &Arc<Self>,
        pool: &Arc<Pool>,
        max_connections: usize,
        max_handshakes: usize,
        client: SocketAddr,
        socket: Option<&TcpStream>,
    ) -> Answer {
        let listener = pool.listener();
        let settings = self.settings.load();
        let now = Instant::now();
        let source = client.ip().to_canonical();
        let exempt = exempt(&settings, source);
        let mut groups = None;
        // A known source's identities, from its known slot (the pool
        // spares its handshakes as theirs): looked up with `known`, under
        // the same lock, so a known handshake always has them.
        // Exempt sources too: exempt means never limited nor blocked, not
        // never known, so an exempted NAT's clients served before keep
        // their places (review 18, R18-2: never known, they were
        // strangers' in the pool, 20 of 80 served and 57 refused in a
        // flood). Known by its exact address: a host in a known client's
        // IPv6 /64 that never verified is only admitted past a full
        // networks table (`Sources::start`), nothing more.
        let mut t = self.tables();
        let identities = t.sources.identities_here(listener, source, &settings, now);
        if exempt {
            drop(t);
        } else {
            let known = identities.is_some();
            // A prefix or network blocked for strikes (its failures, not
            // this source's) still admits a known source: four failing
            // neighbours must not lock out the clients already served. An
            // address's own block, and one made by hand, refuse it.
            if t.blocked.lookup(source, now).is_some_and(|b| {
                let spares = known && b.reason == BlockReason::Strikes && b.level != Level::Address;
                // The lookup takes the longest match: a block by hand wider
                // than the strikes block that spares the source refuses it
                // all the same (review 7 F4).
                !spares
                    || t.blocked.covers_where(IpNet::from(source), now, |w| {
                        w.reason == BlockReason::Manual
                    })
            }) {
                drop(t);
                return self.refuse(listener, Refusal::Blocked, source, now);
            }
            match t.sources.start(listener, source, &settings, now) {
                Ok(g) => groups = Some(g),
                Err(refusal) => {
                    if let Some(from) = refusal.strikes() {
                        for (level, net) in t.sources.strike(listener, source, from, &settings, now)
                        {
                            self.block_locked(&mut t, level, net, &settings, now);
                        }
                    }
                    drop(t);
                    return self.refuse(listener, refusal, source, now);
                }
            }
            // The pool's lock is never taken under the tables'.
            drop(t);
        }
        let socket = socket.and_then(|s| match s.as_fd().try_clone_to_owned() {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::debug!(error = %e, "admission: no descriptor to watch a handshake's progress; only its timeout applies");
                None
            }
        });
        match pool.take(client, socket, max_connections, max_handshakes, identities) {
            Ok(taken) => {
                let ticket = Ticket {
                    admission: self.clone(),
                    pool: pool.clone(),
                    id: taken.id,
                    place: taken.place,
                    source,
                    groups,
                    paid_back: AtomicBool::new(false),
                    silent: AtomicBool::new(false),
                };
                match taken.evicted {
                    Some(victim) => Answer::Evict { ticket, victim },
                    None => Answer::Admit(ticket),
                }
            }
            Err(refusal) => {
                if let Some(groups) = &groups {
                    self.tables().sources.ended(groups);
                }
                self.refuse(listener, refusal, source, now)
            }
        }
    }

    /// Counts and logs (bounded) a connection the listener refused before
    /// asking (`Refusal::OutOfDescriptors`).
    pub fn refused_at_accept(&self, listener: &str, refusal: Refusal, client: SocketAddr) {
        self.note(
            listener,
            refusal,
            client.ip().to_canonical(),
            Instant::now(),
        );
    }

    fn refuse(&self, listener: &str, refusal: Refusal, source: IpAddr, now: Instant) -> Answer {
        self.note(listener, refusal, source, now);
        Answer::Refuse(refusal)
    }

    /// Counts a refusal or cut and logs it within the bounds.
    fn note(&self, listener: &str, refusal: Refusal, source: IpAddr, now: Instant) {
        self.metrics.refused(listener, refusal.label());
        let every = self.settings.load().log_every;
        self.refusals
            .note(listener, refusal.label(), source, every, now, || {
                tracing::warn!(listener, client = %source, reason = refusal.label(),
                    "connection refused before a route decision (more of the same are summarized every {every:?})");
            });
    }

    /// A handshake of `source` ended without authenticating: a strike,
    /// unless `spared`: a newcomer evicted it (the listener was full: not
    /// the source's doing, and a busy NAT's clients would block it) while
    /// it was still above the minimum rate, or the client closed before
    /// sending a byte.
    fn failed(&self, listener: &str, source: IpAddr, groups: &Groups, spared: bool) {
        let settings = self.settings.load();
        let now = Instant::now();
        let mut t = self.tables();
        t.sources.ended(groups);
        // Admitted before a reload made it exempt: an exempt source is
        // never struck.
        if spared || exempt(&settings, source) {
            return;
        }
        for (level, net) in t
            .sources
            .strike(listener, source, Level::Address, &settings, now)
        {
            self.block_locked(&mut t, level, net, &settings, now);
        }
    }

    /// Blocks `net` (a source, or its prefix or network) for strikes.
    /// Nothing when something as wide already blocks it, or when it would
    /// cover an exempt range; the narrower strikes entries it covers go
    /// (they expire no later, and the list's room is bounded). Except a
    /// known source's own address block: a prefix or network blocked for
    /// strikes admits known sources (`admit`), so such a block stays
    /// under one, and is added under one, or a known source's own
    /// strikes would never hold it (review 7 F3).
    fn block_locked(
        &self,
        t: &mut Tables,
        level: Level,
        net: IpNet,
        settings: &AdmissionSettings,
        now: Instant,
    ) {
        let covered =
            if level == Level::Address && t.sources.verified_anywhere(net.addr(), settings, now) {
                // Only by a block that refuses it, known as it is.
                t.blocked.covers_where(net, now, |b| {
                    !(b.reason == BlockReason::Strikes && b.level != Level::Address)
                })
            } else {
                t.blocked.covers(net, now)
            };
        if covered {
            return;
        }
        if let Some(e) = settings
            .exempt
            .iter()
            .find(|e| e.contains(&net) || net.contains(*e))
        {
            tracing::debug!(%net, exempt = %e, "admission: not blocked: it is in, or covers, an exempt range");
            return;
        }
        let expires = now + settings.block_for;
        // (A scan of the list: only for a prefix or a network, whose blocks
        // come at most once per `prefix_block_after` strikes; an address
        // covers nothing but itself.)
        let mut covered = match level {
            Level::Address => Vec::new(),
            Level::Prefix | Level::Network => t.blocked.select(|b| {
                net.contains(&b.net)
                    && b.reason == BlockReason::Strikes
                    && b.expires.is_some_and(|e| e <= expires)
            }),
        };
        covered.retain(|old| {
            !(old.prefix_len() == old.max_prefix_len()
                && t.sources.verified_anywhere(old.addr(), settings, now))
        });
        let mut kernel = self.kernel();
        for old in covered {
            t.blocked.remove(&old);
            kernel.remove(old);
        }
        match t.blocked.add(
            net,
            BlockReason::Strikes,
            level,
            Some(settings.block_for),
            now,
        ) {
            Added::Yes { displaced } => {
                self.count_block(BlockReason::Strikes, level);
                if let Some(old) = displaced {
                    kernel.remove(old);
                }
                let entry = Blocked {
                    net,
                    reason: BlockReason::Strikes,
                    level,
                    expires: Some(expires),
                    spares_known: false,
                };
                if spares_known(&entry, &t.sources) {
                    t.blocked.spare_known(&net);
                } else {
                    kernel.insert(&entry, now);
                }
                let strikes = match level {
                    Level::Address => settings.block_after,
                    Level::Prefix => settings.prefix_block_after,
                    Level::Network => settings.network_block_after,
                };
                self.refusals.note("", "blocked", net.addr(), settings.log_every, now, || {
                    tracing::warn!(%net, level = level.as_str(), block_for = ?settings.block_for, strikes,
                        window = ?settings.block_window,
                        "admission: blocked: too many failed handshakes or refusals within the window, or failures spread over many addresses (more blocks are summarized)");
                });
            }
            Added::Full => {
                tracing::debug!(%net, "admission: block list full of permanent entries; not blocked");
            }
        }
    }

    /// Blocks `net` by hand for `ttl` (None: until removed).
    pub fn block(&self, net: IpNet, ttl: Option<Duration>) -> Result<Blocked, AdmissionError> {
        let settings = self.settings.load();
        let net = net.trunc();
        if settings
            .exempt
            .iter()
            .any(|e| e.contains(&net) || net.contains(e))
        {
            return Err(AdmissionError::Exempt(net));
        }
        let now = Instant::now();
        let mut t = self.tables();
        let level = Level::of(net, &settings);
        match t.blocked.add(net, BlockReason::Manual, level, ttl, now) {
            Added::Full => Err(AdmissionError::BlockListFull(t.blocked.len())),
            Added::Yes { displaced } => {
                self.count_block(BlockReason::Manual, level);
                let mut kernel = self.kernel();
                if let Some(old) = displaced {
                    kernel.remove(old);
                }
                // The one entry, not a copy of the list: every accept
                // waits for this lock.
                let entry = t.blocked.get(&net).cloned().unwrap_or(Blocked {
                    net,
                    reason: BlockReason::Manual,
                    level,
                    expires: ttl.map(|t| now + t),
                    spares_known: false,
                });
                kernel.insert(&entry, now);
                tracing::info!(%net, ?ttl, "admission: blocked by hand");
                Ok(entry)
            }
        }
    }

    fn count_block(&self, reason: BlockReason, level: Level) {
        if let Some(n) = self.blocks.get(&(reason, level)) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Removes the entry for exactly `net`; false when there was none.
    pub fn unblock(&self, net: IpNet) -> bool {
        let net = net.trunc();
        let mut t = self.tables();
        let removed = t.blocked.remove(&net);
        // The kernel's copy too, even when the gateway had no such entry:
        // one left behind there would still drop the source.
        self.kernel().remove(net);
        if removed {
            tracing::info!(%net, "admission: unblocked by hand");
        }
        removed
    }

    /// The block list now.
    /// The entries a (re)loaded kernel program is given: `blocked` without
    /// the ones that spare known sources.
    #[cfg(test)]
    fn kernel_copy(&self) -> Vec<Blocked> {
        let mut list = kernel_list(&self.tables());
        list.sort_by_key(|b| b.net);
        list
    }

    pub fn blocked(&self) -> Vec<Blocked> {
        // Copied under the lock, sorted after: every accept takes it.
        let mut list = self.tables().blocked.snapshot();
        let now = Instant::now();
        list.retain(|b| b.expires.is_none_or(|e| e > now));
        list.sort_by_key(|b| b.net);
        list
    }

    /// Once a second: expired blocks leave (the kernel's copy too), due
    /// summaries are logged.
    pub fn tick(&self) {
        let now = Instant::now();
        let every = self.settings.load().log_every;
        // The kernel's copy follows under the tables' lock (taken first, as
        // everywhere): released in between, a strike could block the same
        // net again and have its new kernel entry removed here, leaving a
        // block the kernel no longer dropped (attacker review 2).
        let mut t = self.tables();
        let expired = t.blocked.expire(now);
        if !expired.is_empty() {
            let mut kernel = self.kernel();
            for net in expired {
                kernel.remove(net);
            }
        }
        drop(t);
        self.refusals.flush(every, now);
    }

    /// Where the kernel block list is attached, and where it is not.
    pub fn kernel_interfaces(&self) -> KernelInterfaces {
        self.kernel().interfaces()
    }

    /// The admission series for `GET /metrics`.
    pub fn render_metrics(&self, out: &mut Exposition<'_>) -> std::fmt::Result {
        let pools: Vec<Arc<Pool>> = self
            .pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        out.gauge(
            "gateway_handshakes_in_flight",
            "Connections in their handshake (unauthenticated) right now, per listener.",
            pools
                .iter()
                .map(|p| ([("listener", p.listener())], p.handshakes())),
        )?;
        out.gauge(
            "gateway_known_handshakes_in_flight",
            "Of those, handshakes from known sources (a verified certificate within admission.known_for), per listener: spared displacement (spared=\"true\"), or waiting for a spare (spared=\"false\"; the known bounds are held).",
            pools.iter().flat_map(|p| {
                let (spared, waiting) = p.known_handshakes();
                [
                    ([("listener", p.listener()), ("spared", "true")], spared),
                    ([("listener", p.listener()), ("spared", "false")], waiting),
                ]
            }),
        )?;
        // A copy under the lock (every accept takes it), counted after.
        let (list, tracked, forgotten, displaced, known_admitted, known_full) = {
            let t = self.tables();
            (
                t.blocked.snapshot(),
                t.sources.lens(),
                t.sources.forgotten(),
                t.blocked.displaced,
                t.sources.known_admitted,
                t.sources.known_full,
            )
        };
        let mut blocked: HashMap<(BlockReason, Level), u64> = HashMap::new();
        for b in &list {
            *blocked.entry((b.reason, b.level)).or_default() += 1;
        }
        let kinds = |n: &dyn Fn(&(BlockReason, Level)) -> u64| {
            BLOCK_KINDS
                .iter()
                .map(|k| ([("reason", k.0.as_str()), ("level", k.1.as_str())], n(k)))
                .collect::<Vec<_>>()
        };
        out.gauge(
            "gateway_blocked_sources",
            "Entries on the block list right now, by why and how wide (address, prefix, network).",
            kinds(&|k| blocked.get(k).copied().unwrap_or(0)),
        )?;
        counter(
            out,
            "gateway_blocks_total",
            "Sources put on the block list, by why (strikes: failed handshakes and refusals for exceeding a limit; manual: gateway block add) and how wide (address; prefix: admission.ipv4_prefix, ipv6_prefix; network: wider).",
            kinds(&|k| self.blocks.get(k).map_or(0, |n| n.load(Ordering::Relaxed))),
        )?;
        let tables = ["sources", "prefixes", "networks", "known"];
        out.gauge(
            "gateway_admission_tracked",
            "Sources, prefixes and networks whose handshakes admission tracks right now (at most admission.max_tracked each), and known sources (a verified certificate within admission.known_for; at most admission.max_known).",
            tables.iter().zip(tracked).map(|(t, n)| ([("table", *t)], n)),
        )?;
        counter(
            out,
            "gateway_admission_forgotten_total",
            "Entries forgotten to stay within their bounds: the least recently seen idle sources, prefixes and networks, the block entries expiring first.",
            tables
                .iter()
                .zip(forgotten)
                .map(|(t, n)| ([("table", *t)], n))
                .chain([([("table", "blocked")], displaced)]),
        )?;
        counter(
            out,
            "gateway_admission_known_admitted_total",
            "Handshakes of known sources (a verified certificate within admission.known_for) admitted while the networks' table was full: refused (max_tracked) otherwise.",
            [([("", ""); 0], known_admitted)],
        )?;
        counter(
            out,
            "gateway_admission_known_full_total",
            "Verified handshakes whose source was not remembered as known: admission.max_known entries, every one verified within admission.known_for (several certificates verifying from many addresses, or a table too small).",
            [([("", ""); 0], known_full)],
        )?;
        let kernel = self.kernel();
        let KernelInterfaces { attached, failed } = kernel.interfaces();
        out.gauge(
            "gateway_block_list_interfaces",
            "Interfaces the kernel block list (XDP) is attached to (1), or failed to attach to (0), and how.",
            attached
                .iter()
                .map(|(name, mode)| ([("interface", name.as_str()), ("mode", *mode)], 1))
                .chain(
                    failed
                        .iter()
                        .map(|(name, _)| ([("interface", name.as_str()), ("mode", "none")], 0)),
                ),
        )?;
        counter(
            out,
            "gateway_block_list_errors_total",
            "Kernel block list failures (it fails open: the check at accept still applies): loading or attaching, and map writes.",
            [
                ([("op", "attach")], kernel.attach_failures),
                ([("op", "write")], kernel.write_failures),
            ],
        )?;
        if let Some(c) = kernel.counters() {
            counter(
                out,
                "gateway_block_list_drops_total",
                "New connections (TCP SYNs) from blocked sources dropped by the kernel block list (XDP), by why the source is blocked.",
                [
                    ([("reason", "strikes")], c.dropped_strikes),
                    ([("reason", "manual")], c.dropped_manual),
                ],
            )?;
            counter(
                out,
                "gateway_block_list_packets_total",
                "Packets the kernel block list looked at past the drops: new connections to a listener judged, passed from expired entries only, passed unparsed (fail open).",
                [
                    ([("result", "judged")], c.judged),
                    ([("result", "expired")], c.expired),
                    ([("result", "unparsed")], c.unparsed),
                ],
            )?;
        }
        Ok(())
    }

    fn tables(&self) -> MutexGuard<'_, Tables> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn kernel(&self) -> MutexGuard<'_, kernel::Kernel> {
        self.kernel.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An admitted connection's place: held for its whole life, given back
/// when dropped. A ticket dropped before [`Ticket::established`] is a
/// failed handshake, a strike against its source.
pub struct Ticket {
    admission: Arc<Admission>,
    pool: Arc<Pool>,
    id: u64,
    place: Arc<Place>,
    source: IpAddr,
    /// Where its handshake is counted (None: the source is exempt).
    groups: Option<Groups>,
    /// [`Ticket::authenticated`] paid back its strike.
    paid_back: AtomicBool,
    /// The client closed before sending a byte (a TCP health check, a
    /// port scan's connect): no strike, it cost the gateway an accept.
    silent: AtomicBool,
}

impl Ticket {
    /// The ClientHello is complete: the gateway's turn, until it writes.
    pub fn hello_read(&self) {
        self.pool.advance(self.id, &self.place, Stage::Answered);
    }

    /// The handshake is done and the route admitted the client: out of the
    /// handshake share, never evicted. False when it was evicted first (in
    /// the same instant, say): it holds no slot and must not be served.
    pub fn established(&self) -> bool {
        if self.stage() < Stage::Established {
            self.pool.advance(self.id, &self.place, Stage::Established);
            if self.stage() == Stage::Established
                && let Some(groups) = &self.groups
            {
                self.admission.tables().sources.ended(groups);
            }
        }
        self.stage() == Stage::Established
    }

    /// The handshake authenticated the client with a certificate that
    /// passed verification (and the route allowed it): one strike of the
    /// source's address is paid back, so that a busy NAT's successes
    /// outweigh its few failures. One per handshake, and only for a
    /// verified certificate: laundering a strike costs a full handshake
    /// with a certificate the PKI issued (who holds it is known, and it
    /// can be revoked). Its prefix and network keep their strikes.
    /// False when `identity` (its certificate's names, typed) already
    /// holds its share of the listener's slots (`identity_share`): it
    /// must not be served.
    pub fn authenticated(&self, identity: &str) -> bool {
        let settings = self.admission.settings.load();
        if self.groups.is_some()
            && self.stage() == Stage::Established
            && !self.paid_back.swap(true, Ordering::Relaxed)
        {
            self.admission
                .tables()
                .sources
                .paid_back(self.source, &settings, Instant::now());
        }
        // An exempt source is not limited by admission.
        self.groups.is_none()
            || self
                .pool
                .identified(&self.place, identity, settings.identity_share)
    }

    /// The authenticated connection went live: the state of generation
    /// `judged` (or a newer one) admitted it, as `identity` with what
    /// `proof` holds. Its source is known on this listener from now on
    /// (`known_for`): admitted past a full networks table, as one of
    /// `identity`'s. Called after the registry took the connection, not
    /// at the handshake's end, and ignored if a reload judged the known
    /// sources since `judged` (review 10 R10-3: a handshake begun before
    /// a revoking reload must not make its client known again).
    pub fn known(&self, identity: &str, proof: Proof, judged: u64) {
        // Exempt sources too (no groups): see `admit`.
        if self.stage() != Stage::Established {
            return;
        }
        let settings = self.admission.settings.load();
        self.admission.tables().sources.remember(
            self.pool.listener(),
            self.source,
            identity,
            Arc::new(proof),
            judged,
            &settings,
            Instant::now(),
        );
    }

    /// As the listener does for a verified client its route allowed:
    /// [`Ticket::authenticated`], and when it may be served, known under
    /// the current state.
    #[cfg(test)]
    pub fn served(&self, identity: &str) -> bool {
        let ok = self.authenticated(identity);
        if ok {
            let judged = self.admission.tables().sources.judged();
            self.known(identity, Proof::default(), judged);
        }
        ok
    }

    /// Established but not authenticated (audit would-deny, `mode =
    /// "off"`): counted against its source's cap of such connections;
    /// false when the cap is reached (it must not be served).
    pub fn unauthenticated(&self) -> bool {
        self.pool.unauthenticated(self.id, &self.place)
    }

    /// The token that closes the connection once it is registered: an
    /// unauthenticated connection evicted by a newcomer is closed with it.
    pub fn closes_with(&self, close: &CancellationToken) {
        self.pool.closes_with(&self.place, close);
    }

    pub fn stage(&self) -> Stage {
        self.place.stage()
    }

    /// Watches the handshake for eviction and progress (with the
    /// listener's `handshake_min_rate` and `handshake_grace`); race
    /// [`Watch::cut`] against the handshake.
    pub fn watch(&self, listener: &ListenerState) -> Watch<'_> {
        Watch::new(self, listener.handshake_min_rate, listener.handshake_grace)
    }

    fn accepted(&self) -> Instant {
        self.place.accepted()
    }

    fn place(&self) -> &Place {
        &self.place
    }

    fn socket(&self) -> Option<Arc<OwnedFd>> {
        self.place.socket()
    }

    /// Counts and logs (bounded) a cut as the refusal it is.
    pub fn cut(&self, cut: &Cut) {
        self.refused(cut.refusal());
    }

    /// Counts and logs (bounded) a handshake that ended without a route
    /// decision, for `refusal`. (Its strike comes when the ticket goes.)
    pub fn refused(&self, refusal: Refusal) {
        if refusal == Refusal::ClientClosed && self.sent_nothing() {
            self.silent.store(true, Ordering::Relaxed);
        }
        self.admission
            .note(self.pool.listener(), refusal, self.source, Instant::now());
    }

    /// Whether the kernel counted no data from the client, which closed
    /// within a twentieth of the grace of the gateway's first look (a
    /// check connects and closes at once; a peer holding its place
    /// silently for longer is struck). From the first look, not from
    /// admission: a check whose close a busy runtime read late was struck
    /// (review 12, R12-4).
    /// Review 7 F10: within a quarter, a peer inflating the round trip
    /// (a new hello is spared the ranking for one, up to 500 ms) held its
    /// place that long for nothing; within a twentieth it holds it no
    /// longer than any new hello is spared. And no data segment at all:
    /// "one byte, a FIN's" also passed a byte of data and a reset.
    /// False when it cannot tell (no descriptor): then the close is struck.
    fn sent_nothing(&self) -> bool {
        self.stage() == Stage::Hello
            && self.place.looked_since().elapsed() < self.place.pace().grace / 20
            && self
                .socket()
                .and_then(|fd| progress::counted(&fd).ok())
                .is_some_and(|c| match c.data_in {
                    Some(segments) => segments == 0,
                    // The kernel counts a FIN as one byte received.
                    None => c.received <= 1,
                })
    }

    fn evicted_token(&self) -> CancellationToken {
        self.place.evicted().clone()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // Evicted below the minimum rate, it is struck as the cut for
        // slowness it had earned would have struck it.
        let evicted = self.stage() == Stage::Evicted && !self.place.evicted_slow();
        let spared = evicted || self.silent.load(Ordering::Relaxed);
        let in_handshake = self.pool.release(self.id, &self.place);
        if in_handshake && let Some(groups) = &self.groups {
            self.admission
                .failed(self.pool.listener(), self.source, groups, spared);
        }
    }
}

/// The block list as a (re)loaded kernel program is given it: without the
/// blocks that spared known sources when they were made.
fn kernel_list(t: &Tables) -> Vec<Blocked> {
    let mut list = t.blocked.list();
    list.retain(|b| !b.spares_known);
    list
}

/// Whether a block stays out of the kernel's copy: a strikes block of a
/// prefix or network holding known sources, which `admit` still lets in;
/// XDP would drop their SYNs before anyone could tell them apart. Blocks by
/// hand and address blocks always go to the kernel.
fn spares_known(b: &Blocked, sources: &Sources) -> bool {
    b.reason == BlockReason::Strikes && b.level != Level::Address && sources.knows_in(b.net)
}

#[cfg(test)]
mod review10;
#[cfg(test)]
mod review10_pool;
#[cfg(test)]
mod review11;
#[cfg(test)]
mod review12;
#[cfg(test)]
mod review13;
#[cfg(test)]
mod review14;
#[cfg(test)]
mod review15;
#[cfg(test)]
mod review16;
#[cfg(test)]
mod review17;
#[cfg(test)]
mod review18;
#[cfg(test)]
mod review19;
#[cfg(test)]
mod review20;
#[cfg(test)]
mod review21;
#[cfg(test)]
mod review22;
#[cfg(test)]
mod review7;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;

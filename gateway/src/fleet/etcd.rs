//! etcd as the fleet's source: `push` (the document and its files in one
//! transaction), the start (etcd, else the cache) and `follow` (watch the
//! prefix, apply each new document through the app's reload).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, Txn, TxnOp, WatchOptions};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{Document, FleetError, Host, MemberRecord};
use crate::app::{ReloadError, ReloadHandle, ReloadReport};
use crate::config::Config;
use crate::metrics::FleetStatus;

/// How long connecting and one read may take before etcd counts as
/// unreachable (the start then falls back to the cache).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the member renews its lease and asks the watch for a
/// progress notice. A session in which no keep-alive answer (nor watch
/// event) has come for `SILENT`, or whose watch has answered nothing for
/// `SILENT`, is taken for lost and made again (see `Liveness`).
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
const SILENT: Duration = Duration::from_secs(2);
/// Every this many progress ticks (10 s) the prefix is read whole anyway.
const RECONCILE_TICKS: u32 = 20;
/// Between attempts to reach etcd again.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(2);

fn etcd_error<E: std::error::Error + 'static>(e: E) -> FleetError {
    FleetError::Etcd(describe(&e))
}

/// An error and its causes. tonic keeps the cause out of a status's
/// message (etcd refusing a member without a client certificate reads
/// "transport error" alone; the TLS alert saying why is its source), and
/// `etcd_client::Error` does not give its status as a source.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = match e.downcast_ref::<etcd_client::Error>() {
        Some(etcd_client::Error::GRpcStatus(status)) => std::error::Error::source(status),
        Some(etcd_client::Error::TransportError(t)) => std::error::Error::source(t),
        _ => e.source(),
    };
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

/// A client for the first of the member's endpoints that answers a
/// linearizable read (so never a member cut off from the majority), with
/// TLS when `[fleet]` names a CA or a client certificate. One endpoint at a
/// time rather than the client's balancing: that sent requests to a dead
/// member and failed them while two others were up.
pub async fn connect(host: &Host) -> Result<Client, FleetError> {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let endpoints = &host.settings.etcd;
    // Members start at different endpoints (by name), so a fleet's
    // watches spread over etcd's members rather than all on the first.
    let spread = host.settings.name.bytes().fold(0usize, |h, b| {
        h.wrapping_mul(31).wrapping_add(usize::from(b))
    });
    let first = NEXT.fetch_add(1, Ordering::Relaxed).wrapping_add(spread);
    let mut errors = Vec::new();
    for i in 0..endpoints.len() {
        let Some(endpoint) = endpoints.get((first + i) % endpoints.len()) else {
            continue;
        };
        match connect_one(host, endpoint).await {
            Ok(client) => return Ok(client),
            Err(e) => errors.push(format!("{endpoint}: {e}")),
        }
    }
    Err(FleetError::Etcd(format!(
        "no endpoint answered: {}",
        errors.join("; ")
    )))
}

async fn connect_one(host: &Host, endpoint: &str) -> Result<Client, FleetError> {
    let s = &host.settings;
    // `require_leader`: a member that has lost its leader (cut off from
    // the majority, or the majority gone) fails every request at once and
    // cancels the watch and keep-alive streams, rather than answering
    // from its own, possibly stale, state (review 4, finding 4).
    let mut options = ConnectOptions::new()
        .with_connect_timeout(REQUEST_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT)
        .with_keep_alive(Duration::from_secs(1), REQUEST_TIMEOUT)
        .with_require_leader(true);
    if s.ca.is_some() || s.cert.is_some() {
        let read = |p: &std::path::Path| {
            let p = host.resolve(p);
            std::fs::read(&p).map_err(|e| FleetError::Etcd(format!("{}: {e}", p.display())))
        };
        let mut tls = etcd_client::TlsOptions::new();
        if let Some(ca) = &s.ca {
            tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&s.cert, &s.key) {
            // As a listener's key: `allow_shared_keys` in the host file
            // lets a group-readable key be (the error says so).
            let shared_ok = host
                .table
                .get("allow_shared_keys")
                .and_then(toml::Value::as_bool)
                .unwrap_or(false);
            if !shared_ok {
                crate::tls::certs::check_key_private(&host.resolve(key))
                    .map_err(|e| FleetError::Etcd(e.to_string()))?;
            }
            tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
        }
        options = options.with_tls(tls);
    }
    let probe = async {
        let mut client = Client::connect([endpoint], Some(options))
            .await
            .map_err(etcd_error)?;
        client
            .get(
                format!("{}/config", host.prefix()),
                Some(GetOptions::new().with_count_only()),
            )
            .await
            .map_err(etcd_error)?;
        Ok(client)
    };
    tokio::time::timeout(REQUEST_TIMEOUT, probe)
        .await
        .map_err(|_| FleetError::Etcd("no answer in time".into()))?
}

/// What one read of the prefix found: the etcd revision read at, and the
/// document (or why it cannot be served).
pub struct Fetched {
    pub revision: i64,
    pub document: Result<Document, FleetError>,
}

/// An etcd error of a read: an answer over the client's size limit is
/// `TooLarge` (the document is refused, etcd is not lost).
fn read_error(e: etcd_client::Error) -> FleetError {
    let text = describe(&e);
    if text.contains("message length too large") {
        FleetError::TooLarge(text)
    } else {
        FleetError::Etcd(text)
    }
}

/// Reads the document and its files at one revision (`at`, or the
/// latest): `<prefix>/config`, then only the files it names, each at the
/// revision the config was read at. Nothing else under the prefix is
/// read (files no document names, a nested prefix's keys, the members).
pub async fn fetch(
    client: &mut Client,
    host: &Host,
    at: Option<i64>,
) -> Result<Fetched, FleetError> {
    let prefix = host.prefix();
    let config_key = format!("{prefix}/config");
    let mut options = GetOptions::new();
    if let Some(rev) = at {
        options = options.with_revision(rev);
    }
    let resp = match tokio::time::timeout(
        REQUEST_TIMEOUT,
        client.get(config_key.clone(), Some(options)),
    )
    .await
    .map_err(|_| FleetError::Etcd("reading the document timed out".into()))?
    .map_err(read_error)
    {
        Ok(resp) => resp,
        Err(e @ FleetError::TooLarge(_)) => {
            return Ok(Fetched {
                revision: at.unwrap_or(0),
                document: Err(e),
            });
        }
        Err(e) => return Err(e),
    };
    let revision = resp.header().map_or(0, |h| h.revision());
    let refused = |e| {
        Ok(Fetched {
            revision,
            document: Err(e),
        })
    };
    let Some(kv) = resp.kvs().first() else {
        return refused(FleetError::NoDocument(config_key));
    };
    let config_rev = kv.mod_revision();
    if kv.value().len() > super::MAX_VALUE {
        return refused(FleetError::TooLarge(format!(
            "its text is {} bytes",
            kv.value().len()
        )));
    }
    let Ok(text) = String::from_utf8(kv.value().to_vec()) else {
        return refused(FleetError::DocumentSyntax("not UTF-8".into()));
    };
    let names = match super::named_files(&text) {
        Ok(names) => names,
        Err(e) => return refused(e),
    };
    let mut files = BTreeMap::new();
    let mut newest = config_rev;
    for name in names {
        let got = tokio::time::timeout(
            REQUEST_TIMEOUT,
            client.get(
                format!("{prefix}/files/{name}"),
                Some(GetOptions::new().with_revision(revision)),
            ),
        )
        .await
        .map_err(|_| FleetError::Etcd("reading a file timed out".into()))?
        .map_err(read_error);
        let got = match got {
            Ok(got) => got,
            Err(FleetError::TooLarge(e)) => {
                return refused(FleetError::TooLarge(format!("the file {name:?}: {e}")));
            }
            Err(e) => return Err(e),
        };
        if let Some(kv) = got.kvs().first() {
            // The document's revision: the newest of its keys, the same
            // on every member whatever else changed under the prefix.
            newest = newest.max(kv.mod_revision());
            files.insert(name, kv.value().to_vec());
        }
    }
    let document = Document::new(config_rev, text, &files).map(|mut doc| {
        doc.revision = newest;
        doc
    });
    Ok(Fetched { revision, document })
}

/// Writes `config` (a document) and every file it names, read from
/// `files`, in one transaction: a member never sees the document without
/// its files. Returns the revision written.
pub async fn push(
    host: &Host,
    config: &str,
    files: &BTreeMap<String, Vec<u8>>,
) -> Result<i64, FleetError> {
    // The same rules a member applies: a plain name for each, all there, text.
    let doc = Document::new(0, config.to_owned(), files)?;
    let prefix = host.prefix();
    let mut ops = vec![TxnOp::put(format!("{prefix}/config"), config, None)];
    for (name, text) in &doc.files {
        ops.push(TxnOp::put(
            format!("{prefix}/files/{name}"),
            text.as_bytes(),
            None,
        ));
    }
    let files_prefix = format!("{prefix}/files/");
    // Once per endpoint, then once more: a member dying or a leader
    // election fails a transaction in flight, and writing the same keys
    // again is harmless (a member applies a document by content).
    let mut last = None;
    for _ in 0..=host.settings.etcd.len() {
        let attempt = async {
            let mut client = connect(host).await?;
            // Files no longer named are deleted in the same transaction:
            // nothing accumulates under the prefix push after push.
            let keys = tokio::time::timeout(
                REQUEST_TIMEOUT,
                client.get(
                    files_prefix.clone(),
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                ),
            )
            .await
            .map_err(|_| FleetError::Etcd("listing the files timed out".into()))?
            .map_err(etcd_error)?;
            let mut ops = ops.clone();
            for kv in keys.kvs() {
                let named = std::str::from_utf8(kv.key())
                    .ok()
                    .and_then(|k| k.strip_prefix(&files_prefix))
                    .is_some_and(|n| doc.files.contains_key(n));
                if !named {
                    ops.push(TxnOp::delete(kv.key().to_vec(), None));
                }
            }
            let resp = tokio::time::timeout(REQUEST_TIMEOUT, client.txn(Txn::new().and_then(ops)))
                .await
                .map_err(|_| FleetError::Etcd("the transaction timed out".into()))?
                .map_err(etcd_error)?;
            Ok::<_, FleetError>(resp.header().map_or(0, |h| h.revision()))
        };
        match attempt.await {
            Ok(revision) => return Ok(revision),
            Err(e) => {
                tracing::warn!(error = %e, "fleet push: trying again");
                last = Some(e);
                tokio::time::sleep(RETRY_MIN).await;
            }
        }
    }
    Err(last.unwrap_or_else(|| FleetError::Etcd("no endpoint".into())))
}

/// The config to start with: etcd's document when etcd answers and the
/// document is valid, else the last good one from the cache. Its files are
/// written into the files directory, so `app::build` can read them.
pub async fn start(host: &Host) -> Result<(Config, Document), FleetError> {
    let from_etcd = async {
        let mut client = connect(host).await?;
        fetch(&mut client, host, None).await
    };
    match from_etcd.await {
        Ok(Fetched {
            document: Ok(doc), ..
        }) => match prepare_over_cache(host, &doc) {
            Ok(config) => {
                if let Err(e) = super::save_cache(host, &doc) {
                    tracing::error!(error = %e, "fleet: the last good document could not be cached");
                }
                tracing::info!(
                    revision = doc.revision,
                    "fleet: starting from etcd's document"
                );
                return Ok((config, doc));
            }
            Err(e) => {
                tracing::error!(revision = doc.revision, error = %e, "fleet: etcd's document is refused: starting from the cache")
            }
        },
        Ok(Fetched {
            document: Err(e),
            revision,
        }) => {
            tracing::error!(revision, error = %e, "fleet: etcd's document is refused: starting from the cache")
        }
        Err(e) => {
            tracing::warn!(error = %e, "fleet: etcd unreachable: starting from the cache")
        }
    }
    let doc = super::load_cache(host)?;
    let config = prepare(host, &doc)?;
    tracing::info!(revision = doc.revision, cache = %host.cache().display(), "fleet: starting from the cached document");
    Ok((config, doc))
}

/// `prepare` of etcd's `doc`, taken through the same CRL rollback check
/// a reload does against the cached document's CRLs (review 4, finding
/// 2): a CRL older than one the cache held (etcd restored from a backup,
/// an older document pushed again) is refused at a start as it is while
/// running, and the start falls back to the cache. (The running member
/// then refuses etcd's document again, counted and in its record.)
fn prepare_over_cache(host: &Host, doc: &Document) -> Result<Config, FleetError> {
    let cached = match super::load_cache(host) {
        Ok(cached) if !cached.same_as(doc) => cached,
        _ => return prepare(host, doc),
    };
    let enforced = crate::tls::crl::Enforced::default();
    match host.compose(&cached).and_then(|config| {
        super::materialize(&host.files_dir(), &cached)?;
        crate::state::State::from_config(&config)
            .map_err(|e| FleetError::DocumentSyntax(e.to_string()))
    }) {
        Ok(state) => enforced.record(&crate::app::served_crls(&state)),
        // A cache that does not build holds nothing to compare with.
        Err(e) => {
            tracing::warn!(error = %e, "fleet: the cached document does not build: etcd's is not compared with it")
        }
    }
    let config = host.compose(doc)?;
    super::materialize(&host.files_dir(), doc)?;
    let state = crate::state::State::from_config(&config)
        .map_err(|e| FleetError::DocumentSyntax(e.to_string()))?;
    enforced
        .check(&crate::app::served_crls(&state))
        .map_err(|e| FleetError::CrlRollback(e.to_string()))?;
    Ok(config)
}

/// `doc`'s files written, and the member's config composed and built
/// (what `gateway check` checks).
fn prepare(host: &Host, doc: &Document) -> Result<Config, FleetError> {
    let config = host.compose(doc)?;
    super::materialize(&host.files_dir(), doc)?;
    crate::state::State::from_config(&config)
        .map_err(|e| FleetError::DocumentSyntax(e.to_string()))?;
    Ok(config)
}

/// Whether a session still hears a leader of etcd. Only answers that
/// need one count: a lease keep-alive answer with a TTL (LeaseKeepAlive is
/// served by the leader; a follower forwards it) and a watch event (a
/// change committed). A watch progress notice does not: an etcd member
/// answers it from its own state, leader or not, so a gateway whose etcd
/// member was cut off from the majority (or had lost it) stayed
/// "connected" while it missed every revision, a CRL's too, until the
/// next reconcile read timed out (review 4, finding 4).
#[derive(Debug)]
pub(super) struct Liveness {
    heard: tokio::time::Instant,
}

impl Liveness {
    pub(super) fn new(now: tokio::time::Instant) -> Liveness {
        Liveness { heard: now }
    }

    /// A keep-alive answer. A TTL of 0 or less is etcd saying the lease
    /// is gone (it expired while the member was paused, or was revoked)
    /// and the member's record with it: the session ends, and the next
    /// one takes a new lease and registers again (review 4, finding 5).
    pub(super) fn kept(&mut self, ttl: i64, now: tokio::time::Instant) -> Result<(), FleetError> {
        if ttl <= 0 {
            return Err(FleetError::Etcd(
                "the member's lease is gone (expired or revoked): registering again".into(),
            ));
        }
        self.heard = now;
        Ok(())
    }

    /// A watch event: committed, so a leader was there.
    pub(super) fn event(&mut self, now: tokio::time::Instant) {
        self.heard = now;
    }

    /// Err once nothing that needs a leader has come for `SILENT`.
    pub(super) fn check(&self, now: tokio::time::Instant) -> Result<(), FleetError> {
        let silent = now.saturating_duration_since(self.heard);
        if silent > SILENT {
            return Err(FleetError::Etcd(format!(
                "no keep-alive answer from etcd's leader for {silent:?}"
            )));
        }
        Ok(())
    }
}

type Reapplying = (bool, oneshot::Sender<Result<ReloadReport, ReloadError>>);

/// A member following its prefix: every new document through `reload`,
/// `serving` the one it started with. Returns when `stop` fires.
pub async fn follow(
    host: Host,
    serving: Document,
    reload: ReloadHandle,
    status: Arc<FleetStatus>,
    stop: CancellationToken,
) {
    status
        .started_ms
        .store(jiff::Timestamp::now().as_millisecond(), Ordering::Relaxed);
    status.revision.store(serving.revision, Ordering::Relaxed);
    status.enabled.store(true, Ordering::Relaxed);
    let (tx, mut requests) = mpsc::channel::<Reapplying>(4);
    reload.set_reapply(Arc::new(move |force| {
        let tx = tx.clone();
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            tx.send((force, reply))
                .await
                .map_err(|_| ReloadError::ShuttingDown)?;
            rx.await.map_err(|_| ReloadError::ShuttingDown)?
        })
    }));
    let record = MemberRecord {
        name: host.settings.name.clone(),
        address: hostname(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        revision: serving.revision,
        applied_at: 0,
        refused: None,
    };
    let mut member = Member {
        host,
        serving,
        reload,
        status,
        record,
    };
    let mut retry = RETRY_MIN;
    loop {
        let result = tokio::select! {
            () = stop.cancelled() => return,
            result = member.watch(&mut requests) => result,
        };
        member.status.connected.store(false, Ordering::Relaxed);
        match result {
            Ok(()) => retry = RETRY_MIN,
            Err(e) => {
                tracing::warn!(error = %e, revision = member.serving.revision, "fleet: etcd lost: serving the last good document")
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            Some((force, reply)) = requests.recv() => {
                let _ = reply.send(member.reapply(force).await);
            }
            () = tokio::time::sleep(retry) => {}
        }
        retry = (retry * 2).min(RETRY_MAX);
    }
}

struct Member {
    host: Host,
    serving: Document,
    reload: ReloadHandle,
    status: Arc<FleetStatus>,
    /// What `gateway fleet status` reads of this member.
    record: MemberRecord,
}

/// How long a member's record outlives its last keep-alive.
const MEMBER_TTL: i64 = 5;

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// Every member's record under `<prefix>/members/`, and the document's
/// revision now (or why there is none to serve).
pub async fn status(host: &Host) -> Result<(Fetched, Vec<MemberRecord>), FleetError> {
    let mut client = connect(host).await?;
    let fetched = fetch(&mut client, host, None).await?;
    let resp = tokio::time::timeout(
        REQUEST_TIMEOUT,
        client.get(
            format!("{}/members/", host.prefix()),
            Some(GetOptions::new().with_prefix()),
        ),
    )
    .await
    .map_err(|_| FleetError::Etcd("reading the members timed out".into()))?
    .map_err(etcd_error)?;
    let members = resp
        .kvs()
        .iter()
        .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
        .collect();
    Ok((fetched, members))
}

impl Member {
    /// Puts this member's record under its lease; returns what it put.
    async fn register(&self, client: &mut Client, lease: i64) -> Result<MemberRecord, FleetError> {
        let key = format!("{}/members/{}", self.host.prefix(), self.record.name);
        let value = serde_json::to_vec(&self.record).map_err(etcd_error)?;
        tokio::time::timeout(
            REQUEST_TIMEOUT,
            client.put(
                key,
                value,
                Some(etcd_client::PutOptions::new().with_lease(lease)),
            ),
        )
        .await
        .map_err(|_| FleetError::Etcd("registering timed out".into()))?
        .map_err(etcd_error)?;
        Ok(self.record.clone())
    }

    /// etcd's leader answered (see `Liveness`): the watch age restarts.
    fn heard(&self) {
        self.status
            .last_heard_ms
            .store(jiff::Timestamp::now().as_millisecond(), Ordering::Relaxed);
    }

    /// One session with etcd: read the prefix, then watch it from the
    /// revision read, each change read whole at its revision and applied.
    /// Returns when the watch ends or goes silent.
    async fn watch(&mut self, requests: &mut mpsc::Receiver<Reapplying>) -> Result<(), FleetError> {
        let mut client = connect(&self.host).await?;
        let fetched = fetch(&mut client, &self.host, None).await?;
        self.heard();
        self.status.connected.store(true, Ordering::Relaxed);
        let seen = fetched.revision;
        tracing::info!(revision = seen, "fleet: watching etcd");
        self.consider(fetched).await;
        let mut alive = Liveness::new(tokio::time::Instant::now());
        let lease = client
            .lease_grant(MEMBER_TTL, None)
            .await
            .map_err(etcd_error)?
            .id();
        // Its first answer is awaited: bounded, as a member that loses its
        // leader meanwhile answers none.
        let (mut keeper, mut kept) =
            tokio::time::timeout(REQUEST_TIMEOUT, client.lease_keep_alive(lease))
                .await
                .map_err(|_| FleetError::Etcd("the lease keep-alive did not start in time".into()))?
                .map_err(etcd_error)?;
        let mut registered = self.register(&mut client, lease).await?;
        // Only the document's keys: `<prefix>/config` and
        // `<prefix>/files/` (not the members' records, not a nested
        // prefix's keys), two watches on one stream. A watch answer carries
        // the values, and etcd batches events: a few large files put at
        // once made one answer bigger than the client's 4 MiB limit, and
        // the member dropped its connection and served the last good
        // document until it reconnected. Fragmented answers stay within
        // etcd's request size; only the fact of a change is read here.
        let (mut watcher, mut stream) = client
            .watch(
                format!("{}/config", self.host.prefix()),
                Some(
                    WatchOptions::new()
                        .with_start_revision(seen + 1)
                        .with_fragment(),
                ),
            )
            .await
            .map_err(etcd_error)?;
        watcher
            .watch(
                format!("{}/files/", self.host.prefix()),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(seen + 1)
                        .with_fragment(),
                ),
            )
            .await
            .map_err(etcd_error)?;
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // When the watch last answered anything, a progress notice too:
        // that says the watch stream lives, not that etcd has a leader.
        let mut watch_answered = tokio::time::Instant::now();
        let mut ticks: u32 = 0;
        loop {
            tokio::select! {
                Some((force, reply)) = requests.recv() => {
                    let _ = reply.send(self.reapply(force).await);
                }
                msg = stream.message() => {
                    let resp = msg.map_err(etcd_error)?.ok_or_else(|| FleetError::Etcd("the watch ended".into()))?;
                    watch_answered = tokio::time::Instant::now();
                    if resp.canceled() {
                        // Compacted past `seen`, or refused: read whole again.
                        return Err(FleetError::Etcd(format!("the watch was cancelled: {} (compacted at {})", resp.cancel_reason(), resp.compact_revision())));
                    }
                    // Any change: read the document whole, now (linearizable,
                    // so at least as new as the change). Not judged by the
                    // header's revision: etcd before 3.4.25 can send a
                    // progress notice ahead of events still to come (etcd
                    // #15220), and a change skipped as already seen would
                    // never be applied.
                    if !resp.events().is_empty() {
                        alive.event(tokio::time::Instant::now());
                        self.heard();
                        let fetched = fetch(&mut client, &self.host, None).await?;
                        self.consider(fetched).await;
                    }
                    if registered != self.record {
                        registered = self.register(&mut client, lease).await?;
                    }
                }
                answer = kept.message() => {
                    let answer = answer.map_err(etcd_error)?.ok_or_else(|| FleetError::Etcd("the lease keep-alive ended".into()))?;
                    alive.kept(answer.ttl(), tokio::time::Instant::now())?;
                    self.heard();
                }
                _ = progress.tick() => {
                    let now = tokio::time::Instant::now();
                    alive.check(now)?;
                    let quiet = now.saturating_duration_since(watch_answered);
                    if quiet > SILENT {
                        return Err(FleetError::Etcd(format!("the watch answered nothing for {quiet:?}")));
                    }
                    watcher.request_progress().await.map_err(etcd_error)?;
                    keeper.keep_alive().await.map_err(etcd_error)?;
                    // Now and then the prefix read whole whatever the watch
                    // said: a change a watch lost is applied late, not never.
                    ticks += 1;
                    if ticks.is_multiple_of(RECONCILE_TICKS) {
                        let fetched = fetch(&mut client, &self.host, None).await?;
                        self.consider(fetched).await;
                        if registered != self.record {
                            registered = self.register(&mut client, lease).await?;
                        }
                    }
                }
            }
        }
    }

    /// A document read from etcd: applied when new, refused when it cannot
    /// be served (the last good one keeps serving either way).
    async fn consider(&mut self, fetched: Fetched) {
        let doc = match fetched.document {
            Ok(doc) => doc,
            Err(e) => {
                if matches!(e, FleetError::TooLarge(_)) {
                    self.status.too_large.fetch_add(1, Ordering::Relaxed);
                }
                self.refused(fetched.revision, &e.to_string());
                return;
            }
        };
        match super::step(&self.serving, &doc) {
            super::Step::Nothing => return,
            super::Step::Relabel(revision) => {
                // The same document at another revision (pushed again):
                // served already, so no reload; the revision it is served
                // at is recorded, or `fleet status` showed the member
                // behind until the next change (review 4, finding 6).
                tracing::info!(revision, "fleet: the document serving, pushed again");
                self.status.revision.store(revision, Ordering::Relaxed);
                self.record.revision = revision;
                self.serving.revision = revision;
                if let Err(e) = super::save_cache(&self.host, &self.serving) {
                    tracing::error!(error = %e, "fleet: the last good document could not be cached");
                }
                return;
            }
            super::Step::Apply => {}
        }
        match self.apply(&doc, false).await {
            Ok(report) => {
                tracing::info!(revision = doc.revision, changes = %report, "fleet: applied");
                self.status.revision.store(doc.revision, Ordering::Relaxed);
                self.record.revision = doc.revision;
                self.record.applied_at = jiff::Timestamp::now().as_second();
                if let Err(e) = super::save_cache(&self.host, &doc) {
                    tracing::error!(error = %e, "fleet: the last good document could not be cached");
                }
                self.serving = doc;
            }
            Err(e) => self.refused(doc.revision, &e),
        }
    }

    fn refused(&mut self, revision: i64, why: &str) {
        self.record.refused = Some((revision, why.to_owned()));
        self.status.refused.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            revision,
            serving = self.serving.revision,
            reason = %why,
            "fleet: revision refused: the last good document keeps serving"
        );
    }

    /// `doc` through the app's reload; on refusal the files of the
    /// document serving are written back.
    async fn apply(&self, doc: &Document, force: bool) -> Result<ReloadReport, String> {
        let result = async {
            let config = self.host.compose(doc).map_err(|e| e.to_string())?;
            super::materialize(&self.host.files_dir(), doc).map_err(|e| e.to_string())?;
            self.reload
                .reload_forced(config, force)
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        if result.is_err()
            && let Err(e) = super::materialize(&self.host.files_dir(), &self.serving)
        {
            tracing::error!(error = %e, "fleet: the serving document's files could not be written back");
        }
        result
    }

    /// SIGHUP or `POST /reload`: the host file read again, with the
    /// document serving.
    async fn reapply(&mut self, force: bool) -> Result<ReloadReport, ReloadError> {
        match Host::load(&self.host.path) {
            Ok(Some(host)) if host.prefix() == self.host.prefix() => self.host = host,
            Ok(_) => {
                return Err(ReloadError::Invalid(format!(
                    "{}: [fleet] removed or its prefix changed: restart the gateway for that",
                    self.host.path.display()
                )));
            }
            Err(e) => return Err(ReloadError::Invalid(e.to_string())),
        }
        let serving = self.serving.clone();
        let config = self
            .host
            .compose(&serving)
            .map_err(|e| ReloadError::Invalid(e.to_string()))?;
        super::materialize(&self.host.files_dir(), &serving)
            .map_err(|e| ReloadError::Invalid(e.to_string()))?;
        self.reload.reload_forced(config, force).await
    }
}

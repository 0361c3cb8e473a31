//! One JSON line per connection, written when the connection ends.
//!
//! The same records go to in-process subscribers (tests, later the admin
//! side), so what is asserted is exactly what the operator reads.
//!
//! A peer without a private key must not be able to drive the log (#19):
//! lines of connections that failed their handshake (refusals, evictions,
//! timeouts, bad input, a certificate sent without proof of its key), and
//! of connections served without an identity proven by the handshake
//! (`audit` and `off` routes), are bounded per reason by a token bucket;
//! what is held back is summarized and counted
//! (`gateway_access_log_suppressed_total{reason}`). Past the bucket, each
//! source (an IPv6 source by its /64) still gets its first line of a
//! period, for up to `NEWCOMERS` sources, so one source's junk cannot hide
//! another's refusal. Only lines of connections whose handshake completed
//! with a proven identity are never held back. Lines are
//! written by a thread of their own through a bounded queue: a slow or
//! full disk (or a pipe nobody reads) loses counted lines, and never
//! stalls a connection's task.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::privilege::Target;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Policy let the client through.
    Allow,
    /// Policy or certificate checks refused the client.
    Deny,
    /// Would have been denied; passed because the route is in audit mode.
    Audit,
    /// Refused before or without a policy decision (no route, timeouts, limits, I/O).
    Error,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessRecord {
    /// RFC 3339, UTC, when the connection ended.
    pub time: String,
    pub listener: String,
    pub route: Option<String>,
    /// The route's mode: "enforce", "audit" or "off".
    pub mode: Option<String>,
    pub client: String,
    pub sni: Option<String>,
    /// The client's names in the allow-entry syntax (`spiffe://…`,
    /// `dns:…`, `email:…`, `cn:…`), one array element each.
    pub identity: Option<Vec<String>>,
    /// The names of a certificate the client sent but never proved it
    /// holds the key of (its handshake failed before or at the
    /// CertificateVerify signature): anyone can send a certificate, so
    /// these name nobody, and are written apart from `identity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_identity: Option<Vec<String>>,
    pub verdict: Verdict,
    /// Why: the allow entry that matched, or what refused or ended the connection.
    pub reason: String,
    pub backend: Option<String>,
    pub client_to_backend_bytes: u64,
    pub backend_to_client_bytes: u64,
    pub duration_ms: u64,
    pub tls_version: Option<String>,
    pub cipher_suite: Option<String>,
    /// Where the bytes moved after the handshake: "kernel" (kTLS + splice) or "userspace".
    #[serde(default)]
    pub offload: Option<String>,
    /// Why a connection that could have been offloaded stayed in userspace.
    #[serde(default)]
    pub offload_reason: Option<String>,
    /// How its handshake failed, as `gateway_handshake_failures_total`
    /// names it (`timeout`, `protocol`…), when it failed. Not written: it
    /// is what bounds the line.
    #[serde(skip)]
    pub failure: Option<&'static str>,
}

impl AccessRecord {
    /// The reason this line is bounded under: how its handshake failed, or
    /// `unauthenticated` for a connection served without an identity. Only
    /// a completed handshake with a proven identity is never bounded: a
    /// holder of a certificate's key alone can cause that line.
    fn bounded_by(&self) -> Option<&'static str> {
        match (self.failure, &self.identity) {
            (Some(failure), _) => Some(failure),
            (None, None) => Some(UNAUTHENTICATED),
            (None, Some(_)) => None,
        }
    }
}

/// The reason lines of connections served without a proven identity are
/// bounded under (`audit` routes' certless clients, `off` routes).
pub const UNAUTHENTICATED: &str = "unauthenticated";

/// Lines held back per failure reason: a burst, then this many a second.
const LINE_BURST: f64 = 32.0;
const LINES_PER_SECOND: f64 = 4.0;
/// Lines waiting for the writer; beyond them a line is lost (counted).
const QUEUED_LINES: usize = 4096;
/// Distinct sources a summary counts; beyond, it says "at least".
const SOURCES_COUNTED: usize = 1024;
/// Sources per reason whose first line of a period is written although
/// the reason's bucket is empty: one source's junk must not hide another
/// source's line, yet many sources must not lift the bound.
const NEWCOMERS: usize = 64;
/// How often the writer looks for summaries that are due, and whether it
/// is asked to close.
const WRITER_TICK: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    #[error("cannot open access log {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the access log's writer: {0}")]
    Writer(tokio::runtime::TryCurrentError),
}

enum Sink {
    Stdout,
    Stderr,
    File(std::fs::File),
}

/// Lines held back, by failure reason, since start
/// (`gateway_access_log_suppressed_total`).
#[derive(Debug, Default)]
pub struct Suppressed(Mutex<BTreeMap<&'static str, u64>>);

impl Suppressed {
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        let counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        counts.iter().map(|(r, n)| (*r, *n)).collect()
    }

    fn add(&self, reason: &'static str) {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *counts.entry(reason).or_default() += 1;
    }
}

pub struct AccessLog {
    /// None when the log is off.
    writer: Option<Writer>,
    subscribers: broadcast::Sender<AccessRecord>,
    /// Lines lost since start (`gateway_access_log_lost_total`): not
    /// written, or not queued because the writer was behind.
    lost: Arc<AtomicU64>,
    bound: Arc<Mutex<Bound>>,
}

/// The connection tasks' end of the writer thread.
struct Writer {
    lines: SyncSender<String>,
    /// Lines not queued since the last one that was: the first is said
    /// at once, the rest when a line is queued again.
    behind: AtomicU64,
    closing: Arc<AtomicBool>,
    thread: tokio::task::JoinHandle<()>,
}

impl AccessLog {
    /// `target` is the config's `access_log`: "stdout", "stderr", "off" or a
    /// path. `drops_to`: the user a start as root drops to (the config's
    /// `user`), who must not be able to move the log's directory. Lines
    /// that cannot be written are counted in `lost`, lines held back in
    /// `suppressed`, summarized every `summary_every`.
    pub fn open(
        target: &str,
        base: &std::path::Path,
        drops_to: Option<&Target>,
        lost: Arc<AtomicU64>,
        suppressed: Arc<Suppressed>,
        summary_every: Duration,
    ) -> Result<Self, AccessLogError> {
        let sink = match target {
            // /dev/stdout is a link into /proc/self/fd: the same stream.
            "stdout" | "/dev/stdout" => Some(Sink::Stdout),
            "stderr" | "/dev/stderr" => Some(Sink::Stderr),
            "off" => None,
            path => {
                let path = base.join(path);
                let file = open_append(&path, drops_to)
                    .map_err(|source| AccessLogError::Open { path, source })?;
                Some(Sink::File(file))
            }
        };
        let bound = Arc::new(Mutex::new(Bound::new(summary_every, suppressed)));
        let writer = match sink {
            None => None,
            Some(sink) => Some(Writer::start(sink, lost.clone(), bound.clone())?),
        };
        Ok(Self {
            writer,
            subscribers: broadcast::channel(4096).0,
            lost,
            bound,
        })
    }

    /// Whether `open` would succeed, without leaving a file behind:
    /// `gateway check` must refuse what `gateway run` will.
    pub fn check(
        target: &str,
        base: &std::path::Path,
        drops_to: Option<&Target>,
    ) -> Result<(), AccessLogError> {
        if matches!(
            target,
            "stdout" | "stderr" | "off" | "/dev/stdout" | "/dev/stderr"
        ) {
            return Ok(());
        }
        let path = base.join(target);
        let open = |source| AccessLogError::Open {
            path: path.clone(),
            source,
        };
        let (dir, name) = log_dir(&path, drops_to).map_err(open)?;
        if dir.exists(&name).map_err(open)? {
            append_in(&dir, &name).map_err(open)?;
            return Ok(());
        }
        // The probe makes the file only if nothing is there (O_EXCL: not
        // through a symlink planted meanwhile), in the directory judged,
        // and removes what it made; run creates its own.
        drop(dir.open_new(&name, 0o640).map_err(open)?);
        let _ = dir.remove(&name);
        Ok(())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<AccessRecord> {
        self.subscribers.subscribe()
    }

    /// Hands the record's line to the writer, unless it is bounded and
    /// over its reason's rate. Never blocks.
    pub fn emit(&self, record: AccessRecord) {
        if let Some(writer) = &self.writer
            && self.within_bound(&record)
        {
            match serde_json::to_string(&record) {
                Ok(mut line) => {
                    line.push('\n');
                    writer.queue(line, &self.lost);
                }
                Err(e) => tracing::warn!(error = %e, "access log record not serialisable"),
            }
        }
        // No subscriber is the normal case outside tests.
        let _ = self.subscribers.send(record);
    }

    /// Writes what is queued and the summaries still open, for at most
    /// `within`: at shutdown, so the last lines are not lost with the
    /// process.
    pub async fn close(&self, within: Duration) {
        let Some(writer) = &self.writer else { return };
        writer.closing.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + within;
        loop {
            if writer.thread.is_finished() {
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    "access log: the writer did not finish at shutdown; queued lines may be lost"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn within_bound(&self, record: &AccessRecord) -> bool {
        let Some(reason) = record.bounded_by() else {
            return true;
        };
        let source = record.client.parse::<SocketAddr>().map(|a| a.ip()).ok();
        let mut bound = self.bound.lock().unwrap_or_else(|p| p.into_inner());
        bound.take(reason, source, Instant::now())
    }
}

impl Writer {
    fn start(
        sink: Sink,
        lost: Arc<AtomicU64>,
        bound: Arc<Mutex<Bound>>,
    ) -> Result<Self, AccessLogError> {
        let (lines, queued) = std::sync::mpsc::sync_channel(QUEUED_LINES);
        let closing = Arc::new(AtomicBool::new(false));
        // A thread of the runtime's blocking pool, not a thread of our
        // own: the runtime's start hook narrows it to the privileges the
        // gateway keeps (`privilege`), as every other thread.
        let runtime = tokio::runtime::Handle::try_current().map_err(AccessLogError::Writer)?;
        let thread = runtime.spawn_blocking({
            let closing = closing.clone();
            move || {
                WriterThread {
                    sink,
                    lost,
                    losing: 0,
                }
                .run(&queued, &bound, &closing)
            }
        });
        Ok(Self {
            lines,
            behind: AtomicU64::new(0),
            closing,
            thread,
        })
    }

    fn queue(&self, line: String, lost: &AtomicU64) {
        match self.lines.try_send(line) {
            Ok(()) => {
                let behind = self.behind.swap(0, Ordering::Relaxed);
                if behind > 0 {
                    tracing::warn!(
                        lost = behind,
                        "access log writer caught up after losing lines"
                    );
                }
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                lost.fetch_add(1, Ordering::Relaxed);
                if self.behind.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(
                        "access log writer is behind (a slow or blocked disk): lines are lost (counted in gateway_access_log_lost_total) until it catches up"
                    );
                }
            }
        }
    }
}

/// The thread that owns the sink: the only one that ever waits on it.
struct WriterThread {
    sink: Sink,
    lost: Arc<AtomicU64>,
    /// Lines lost since the last one written: the first loss is logged at
    /// once, then nothing until a line is written again, which logs how
    /// many were lost meanwhile (a full disk must not flood the log too).
    losing: u64,
}

impl WriterThread {
    fn run(mut self, queued: &Receiver<String>, bound: &Mutex<Bound>, closing: &AtomicBool) {
        let mut looked = Instant::now();
        loop {
            let closed = match queued.recv_timeout(WRITER_TICK) {
                Ok(line) => {
                    self.write(&line);
                    false
                }
                Err(RecvTimeoutError::Timeout) => closing.load(Ordering::Relaxed),
                Err(RecvTimeoutError::Disconnected) => true,
            };
            if closed {
                while let Ok(line) = queued.try_recv() {
                    self.write(&line);
                }
            }
            let now = Instant::now();
            if closed || now.saturating_duration_since(looked) >= WRITER_TICK {
                looked = now;
                let due = bound
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .summaries(now, closed);
                for line in due {
                    self.write(&line);
                }
            }
            if closed {
                return;
            }
        }
    }

    fn write(&mut self, line: &str) {
        let written = match &mut self.sink {
            Sink::Stdout => std::io::stdout().lock().write_all(line.as_bytes()),
            Sink::Stderr => std::io::stderr().lock().write_all(line.as_bytes()),
            Sink::File(f) => whole_line(f, line),
        };
        self.count(written);
    }

    /// Counts a line lost, and says so in the log when losing starts and
    /// when it ends.
    fn count(&mut self, written: std::io::Result<()>) {
        match written {
            Ok(()) => {
                let lost = std::mem::take(&mut self.losing);
                if lost > 0 {
                    tracing::warn!(lost, "access log written again after losing lines");
                }
            }
            Err(e) => {
                self.lost.fetch_add(1, Ordering::Relaxed);
                self.losing += 1;
                if self.losing == 1 {
                    tracing::warn!(error = %e,
                        "access log write failed: lines are lost (counted in gateway_access_log_lost_total) until a write succeeds");
                }
            }
        }
    }
}

/// Per failure reason, a token bucket for lines and what it held back
/// since its last summary. The reasons are a handful of static names, so
/// the map stays small whatever peers do.
struct Bound {
    summary_every: Duration,
    suppressed: Arc<Suppressed>,
    reasons: HashMap<&'static str, Bucket>,
}

struct Bucket {
    tokens: f64,
    refilled: Instant,
    /// Sources with a line written since `period` began (up to
    /// `SOURCES_COUNTED`), and how many were written past an empty bucket
    /// as a newcomer's first.
    written: HashSet<IpAddr>,
    newcomers: usize,
    period: Instant,
    /// Held back since `since`, from how many distinct sources (counted
    /// up to `SOURCES_COUNTED`).
    held: u64,
    sources: HashSet<IpAddr>,
    since: Instant,
}

impl Bound {
    fn new(summary_every: Duration, suppressed: Arc<Suppressed>) -> Self {
        Self {
            summary_every,
            suppressed,
            reasons: HashMap::new(),
        }
    }

    /// Whether a line of `reason` may be written now; if not, it is
    /// counted for the summary.
    fn take(&mut self, reason: &'static str, source: Option<IpAddr>, now: Instant) -> bool {
        let bucket = self.reasons.entry(reason).or_insert_with(|| Bucket {
            tokens: LINE_BURST,
            refilled: now,
            written: HashSet::new(),
            newcomers: 0,
            period: now,
            held: 0,
            sources: HashSet::new(),
            since: now,
        });
        let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * LINES_PER_SECOND).min(LINE_BURST);
        bucket.refilled = now;
        if now.saturating_duration_since(bucket.period) >= self.summary_every {
            bucket.period = now;
            bucket.written.clear();
            bucket.newcomers = 0;
        }
        let source = source.map(source_key);
        let newcomer = source.is_some_and(|s| !bucket.written.contains(&s));
        let write = if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else if newcomer && bucket.newcomers < NEWCOMERS {
            bucket.newcomers += 1;
            true
        } else {
            false
        };
        if write {
            if let Some(source) = source
                && bucket.written.len() < SOURCES_COUNTED
            {
                bucket.written.insert(source);
            }
            return true;
        }
        if bucket.held == 0 {
            bucket.since = now;
        }
        bucket.held += 1;
        if let Some(source) = source
            && bucket.sources.len() < SOURCES_COUNTED
        {
            bucket.sources.insert(source);
        }
        self.suppressed.add(reason);
        false
    }

    /// The summary lines due at `now` (all that hold anything when `all`).
    fn summaries(&mut self, now: Instant, all: bool) -> Vec<String> {
        let mut due = Vec::new();
        for (reason, bucket) in &mut self.reasons {
            let period = now.saturating_duration_since(bucket.since);
            if bucket.held == 0 || (!all && period < self.summary_every) {
                continue;
            }
            due.push(summary_line(reason, bucket, period));
            bucket.held = 0;
            bucket.sources.clear();
        }
        due
    }
}

/// A source as the bound tells sources apart: an IPv4 address (mapped
/// ones too), an IPv6 /64 (one host commonly holds a whole /64).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from_bits(
            v6.to_bits() & !((1u128 << 64) - 1),
        )),
        v4 => v4,
    }
}

/// "N more <reason> from M sources suppressed in the last Ts", as a JSON
/// line of its own (no `listener`: it tells the log's reader apart from a
/// connection's line).
fn summary_line(reason: &str, bucket: &Bucket, period: Duration) -> String {
    let sources = bucket.sources.len();
    let at_least = if sources >= SOURCES_COUNTED {
        "at least "
    } else {
        ""
    };
    let seconds = period.as_secs().max(1);
    let text = format!(
        "{} more {reason} from {at_least}{sources} sources suppressed in the last {seconds}s",
        bucket.held
    );
    let mut line = serde_json::json!({
        "time": now_rfc3339(),
        "summary": text,
        "reason": reason,
        "suppressed": bucket.held,
        "sources": sources,
        "seconds": seconds,
    })
    .to_string();
    line.push('\n');
    line
}

/// Opens the log for appending, made if missing. Root opens it at start,
/// in a directory the gateway's user may write (logs): never through a
/// symlink (one planted there would have root create or append to any
/// file), never a device, never a file with other names (a hard link to
/// another file), so root writes only the log itself (review 9, S9-5),
/// and never in a directory reached through one that user may write
/// (`log_dir`). A FIFO is taken: a log reader's pipe (see README, a disk
/// that blocks).
fn open_append(
    path: &std::path::Path,
    drops_to: Option<&Target>,
) -> std::io::Result<std::fs::File> {
    let (dir, name) = log_dir(path, drops_to)?;
    append_in(&dir, &name)
}

/// The log `name` in `dir` (from `log_dir`) opened to append.
fn append_in(dir: &crate::safe_dir::Dir, name: &str) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::MetadataExt as _;
    // O_NONBLOCK: a FIFO nobody reads (one the dropped user planted)
    // fails the open at once instead of hanging the start; a log reader's
    // FIFO is then written blocking, as a file is (review 10, S10-3).
    let file = dir.open_append(name, 0o640).map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) {
            std::io::Error::other(format!(
                "{e}: a symlink in a directory others may write, which is never followed"
            ))
        } else if e.raw_os_error() == Some(libc::ENXIO) {
            std::io::Error::other(format!("{e}: a FIFO no one reads yet"))
        } else {
            e
        }
    })?;
    let meta = file.metadata()?;
    use std::os::unix::fs::FileTypeExt as _;
    if !meta.file_type().is_file() && !meta.file_type().is_fifo() {
        return Err(std::io::Error::other("neither a regular file nor a FIFO"));
    }
    if meta.file_type().is_fifo() {
        clear_nonblock(&file)?;
    }
    if meta.file_type().is_file() && meta.nlink() > 1 {
        return Err(std::io::Error::other(format!(
            "it has {} names (a hard link): the log must be a file of its own",
            meta.nlink()
        )));
    }
    Ok(file)
}

/// The log's directory, held open, and the log's name in it
/// (`safe_dir::reach_parent`): with `drops_to`, every directory a name is
/// looked up in on the way, the log's own aside (it may be the user's:
/// systemd's LogsDirectory=), must be out of that user's reach, and the
/// log is then opened in the very directory judged. O_NOFOLLOW guards the
/// log's name only: a user who may write a directory above could put a
/// symlink in place of the log's directory, and root, at the next start,
/// would create or append to a file of the log's name wherever it points
/// (review 10, S10-1). Checked by path and opened by path, a link `log ->
/// .` in the user's own directory passed the check and raced the open
/// (review 13, S13-1); a symlink met in a directory the user may write is
/// now refused wherever it is, and the log's name is the only name looked
/// up in such a directory. A link at the log's name is followed only in a
/// directory root's alone (an operator's), elsewhere left for the
/// O_NOFOLLOW open to refuse (review 10, S10-4).
fn log_dir(
    path: &std::path::Path,
    drops_to: Option<&Target>,
) -> std::io::Result<(crate::safe_dir::Dir, String)> {
    let mut groups = drops_to.map(|u| u.groups.clone()).unwrap_or_default();
    if let Some(user) = drops_to {
        groups.push(user.gid);
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let refuse = |why: String| {
        std::io::Error::other(format!(
            "its directory {} is reached through a directory user {:?} (whom the gateway drops to) may write: {why}; that user could put a symlink in place of the log's directory and have root create or append to a file of this name anywhere. Keep every directory above the log's root's and writable by root alone (chown root: DIR; chmod go-w DIR), as /var/log is; the log's own directory may be the user's (systemd's LogsDirectory=, /var/log/gateway)",
            dir.display(),
            drops_to.map(|u| u.user.as_str()).unwrap_or_default()
        ))
    };
    crate::safe_dir::reach_parent(
        path,
        drops_to.map(|u| (u.uid, groups.as_slice())),
        true,
        &refuse,
    )
}

/// Back to blocking writes on a FIFO opened O_NONBLOCK.
fn clear_nonblock(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor this File owns, with integer args.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Appends `line` to `file` whole or not at all: a write cut short by a
/// full disk is taken back, so the log never holds half a line that the
/// next one would run into.
fn whole_line(file: &mut std::fs::File, line: &str) -> std::io::Result<()> {
    let mut rest = line.as_bytes();
    let mut written = 0u64;
    while !rest.is_empty() {
        match file.write(rest) {
            Ok(0) => {
                return Err(take_back(
                    file,
                    written,
                    std::io::ErrorKind::WriteZero.into(),
                ));
            }
            Ok(n) => {
                written += n as u64;
                rest = rest.get(n..).unwrap_or_default();
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(take_back(file, written, e)),
        }
    }
    Ok(())
}

/// Cuts the `written` bytes of a partial line off the end of `file`
/// (appended by this process alone, from the writer thread) and gives back `e`.
fn take_back(file: &std::fs::File, written: u64, e: std::io::Error) -> std::io::Error {
    if written > 0 {
        let cut = file
            .metadata()
            .and_then(|m| file.set_len(m.len().saturating_sub(written)));
        if let Err(cut) = cut {
            tracing::warn!(error = %cut, "access log: a partial line could not be taken back");
        }
    }
    e
}

/// Now, as the access log writes times.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(i: u32) -> Option<IpAddr> {
        Some(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)))
    }

    #[test]
    fn a_reason_writes_its_burst_then_its_rate_and_summarizes_the_rest() {
        let suppressed = Arc::new(Suppressed::default());
        let mut bound = Bound::new(Duration::from_secs(10), suppressed.clone());
        let t0 = Instant::now();
        // One source: the burst, then nothing.
        let written = (0..100)
            .filter(|_| bound.take("timeout", source(0), t0))
            .count();
        assert_eq!(written, 32);
        // Another reason has a bucket of its own.
        assert!(bound.take("protocol", source(0), t0));
        // A second later, four more.
        let t1 = t0 + Duration::from_secs(1);
        let written = (0..10)
            .filter(|_| bound.take("timeout", source(0), t1))
            .count();
        assert_eq!(written, 4);
        assert_eq!(suppressed.counts(), vec![("timeout", 68 + 6)]);
        // Not due before a period has passed since the first held back.
        assert!(
            bound
                .summaries(t0 + Duration::from_secs(9), false)
                .is_empty()
        );
        let due = bound.summaries(t0 + Duration::from_secs(10), false);
        assert_eq!(due.len(), 1);
        let v: serde_json::Value = serde_json::from_str(due[0].trim_end()).unwrap();
        assert_eq!(
            v["summary"],
            "74 more timeout from 1 sources suppressed in the last 10s"
        );
        assert_eq!(v["suppressed"], 74);
        // Said once: nothing held since.
        assert!(
            bound
                .summaries(t0 + Duration::from_secs(30), true)
                .is_empty()
        );
    }

    /// One source's junk spends the bucket; another source's first line
    /// is still written, and each new source's, up to `NEWCOMERS` a period.
    #[test]
    fn a_new_sources_first_line_passes_an_empty_bucket_up_to_a_cap() {
        let mut bound = Bound::new(Duration::from_secs(10), Arc::default());
        let t0 = Instant::now();
        for _ in 0..100 {
            bound.take("protocol", source(0), t0);
        }
        assert!(
            bound.take("protocol", source(1), t0),
            "a newcomer's first line"
        );
        assert!(!bound.take("protocol", source(1), t0), "its second");
        let newcomers = (2..1000)
            .filter(|i| bound.take("protocol", source(*i), t0))
            .count();
        assert_eq!(newcomers, NEWCOMERS - 1);
        // A new period: newcomers again, even one seen in the last.
        let t1 = t0 + Duration::from_secs(10);
        assert!(bound.take("protocol", source(1), t1));
    }

    /// An IPv6 host commonly holds a /64: its addresses are one source,
    /// both for the newcomer's line and in a summary's count.
    #[test]
    fn an_ipv6_source_is_its_64() {
        let mut bound = Bound::new(Duration::from_secs(10), Arc::default());
        let t0 = Instant::now();
        let host = |i: u128| {
            Some(IpAddr::V6(std::net::Ipv6Addr::from_bits(
                0x2001_0db8_0000_0001_0000_0000_0000_0000 + i,
            )))
        };
        let written = (0..100)
            .filter(|i| bound.take("timeout", host(*i), t0))
            .count();
        assert_eq!(written, 32);
        let due = bound.summaries(t0, true);
        assert!(
            due[0].contains("68 more timeout from 1 sources"),
            "{}",
            due[0]
        );
        assert_eq!(
            source_key("::ffff:192.0.2.1".parse().unwrap()),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn a_summary_counts_sources_in_bounded_memory() {
        let mut bound = Bound::new(Duration::from_secs(1), Arc::default());
        let t0 = Instant::now();
        for i in 0..(SOURCES_COUNTED as u32 + 5000) {
            bound.take("protocol", source(i), t0);
        }
        assert_eq!(bound.reasons["protocol"].sources.len(), SOURCES_COUNTED);
        let due = bound.summaries(t0, true);
        assert!(
            due[0].contains(&format!("from at least {SOURCES_COUNTED} sources")),
            "{}",
            due[0]
        );
    }

    /// A writer blocked on a pipe nobody reads: `emit` never waits; the
    /// queue takes 4096 lines, the writer one, and the rest are lost,
    /// counted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_full_queue_loses_counted_lines_and_never_blocks() {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("log");
        let path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path; mkfifo only reads it.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        let mut filler = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        while filler.write(&[b'\n'; 4096]).is_ok() {}
        let lost = Arc::new(AtomicU64::new(0));
        let log = AccessLog::open(
            "log",
            dir.path(),
            None,
            lost.clone(),
            Arc::default(),
            Duration::from_secs(1),
        )
        .unwrap();
        let started = Instant::now();
        // Lines the bound never holds back: a proven identity's.
        let who = vec!["spiffe://example.internal/a".to_owned()];
        for _ in 0..QUEUED_LINES + 200 {
            log.emit(record(None, Some(who.clone())));
        }
        assert!(started.elapsed() < Duration::from_secs(2), "emit waited");
        // The writer may not have taken its line off the queue yet.
        let lost = lost.load(Ordering::Relaxed);
        assert!((199..=200).contains(&lost), "{lost} lost");
        drop(reader);
        drop(filler);
    }

    fn record(failure: Option<&'static str>, identity: Option<Vec<String>>) -> AccessRecord {
        AccessRecord {
            time: String::new(),
            listener: "edge".into(),
            route: None,
            mode: None,
            client: "192.0.2.1:5000".into(),
            sni: None,
            identity,
            claimed_identity: None,
            verdict: Verdict::Deny,
            reason: String::new(),
            backend: None,
            client_to_backend_bytes: 0,
            backend_to_client_bytes: 0,
            duration_ms: 0,
            tls_version: None,
            cipher_suite: None,
            offload: None,
            offload_reason: None,
            failure,
        }
    }

    #[test]
    fn only_a_completed_handshake_with_a_proven_identity_is_unbounded() {
        assert_eq!(record(Some("timeout"), None).bounded_by(), Some("timeout"));
        // A failed handshake is bounded whoever it names.
        let who = Some(vec!["spiffe://example.internal/a".to_owned()]);
        assert_eq!(
            record(Some("policy"), who.clone()).bounded_by(),
            Some("policy")
        );
        // Served without an identity (an audit or off route).
        assert_eq!(record(None, None).bounded_by(), Some(UNAUTHENTICATED));
        // Only a key holder causes this one.
        assert_eq!(record(None, who).bounded_by(), None);
    }

    #[test]
    fn a_claimed_identity_is_written_apart_and_only_when_there_is_one() {
        let mut r = record(Some("protocol"), None);
        let line = serde_json::to_string(&r).unwrap();
        assert!(!line.contains("claimed_identity"), "{line}");
        r.claimed_identity = Some(vec!["spiffe://example.internal/a".to_owned()]);
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["identity"], serde_json::Value::Null);
        assert_eq!(v["claimed_identity"][0], "spiffe://example.internal/a");
    }
}

//! Config revisions: every applied config, numbered, in a bounded history
//! on disk (`revisions_dir`, `revisions_keep`), so an operator can list what
//! ran (`gateway rollout history`) and go back (`gateway rollout revert N`),
//! and a reload that breaks clients can go back by itself (`auto_revert`).
//!
//! A revision is the config's text and the SHA-256 of every file it names
//! (`Config::named_files`: certificates, keys, CA bundles, CRLs): hashes
//! only, never the files, so no key material is copied. A revert restores
//! the text; the files must still be what the revision saw, or the revert
//! would apply something that never ran (refused unless forced).
//!
//! One JSON file per revision, `rev-<number>.json`, written like the audit
//! state: a fresh temp file beside it (mode 0600), fsync, rename, and only
//! into a directory `safe_dir` accepts (the running user's or root's,
//! writable by no one else). A history that cannot be written is logged and
//! counted (`gateway_revisions_errors_total`) and serving goes on. An entry
//! that cannot be read or whose text does not match its own hash is skipped
//! and reported, never used for a revert.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Config;

/// Revisions kept unless `revisions_keep` says otherwise.
pub const DEFAULT_KEEP: usize = 20;
/// A revision file larger than this is not read (no config is this large).
const MAX_REVISION_BYTES: u64 = 8 << 20;
const FORMAT_VERSION: u32 = 1;
const PREFIX: &str = "rev-";
const SUFFIX: &str = ".json";

#[derive(Debug, thiserror::Error)]
pub enum RevisionError {
    #[error("the revisions directory {dir}: {reason}")]
    Directory { dir: PathBuf, reason: String },
    #[error("writing revision {number} to {path}: {source}")]
    Write {
        number: u64,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading revision {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("revision {path} is not one this gateway wrote: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("no revision {0} in the history")]
    Unknown(u64),
    /// The directory or the file is not one only this user (or root)
    /// could have written: nothing in it is read.
    #[error("revision history {path} is not trusted, nothing read from it: {reason}")]
    Untrusted { path: PathBuf, reason: String },
    #[error("revision {0} could not be written: not in the history")]
    Unwritten(u64),
}

impl RevisionError {
    /// The `reason` label of `gateway_revisions_errors_total`.
    pub fn as_str(&self) -> &'static str {
        match self {
            RevisionError::Directory { .. } | RevisionError::Write { .. } => "write",
            RevisionError::Unreadable { .. } => "unreadable",
            RevisionError::Corrupt { .. } => "corrupt",
            RevisionError::Unknown(_) | RevisionError::Unwritten(_) => "unknown",
            RevisionError::Untrusted { .. } => "unsafe",
        }
    }
}

/// How a revision came to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum How {
    /// The config the gateway started with.
    Start,
    /// A reload: SIGHUP, a watched file, or any other reload request.
    Reload,
    /// `gateway rollout revert N`.
    Revert,
    /// `auto_revert` undid a reload that made handshake failures jump.
    AutoRevert,
}

impl How {
    pub fn as_str(self) -> &'static str {
        match self {
            How::Start => "start",
            How::Reload => "reload",
            How::Revert => "revert",
            How::AutoRevert => "auto-revert",
        }
    }
}

/// A file the config named, and its SHA-256 when it was applied (none: it
/// could not be read then).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedFile {
    pub path: PathBuf,
    pub sha256: Option<String>,
}

/// One applied config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revision {
    pub version: u32,
    pub number: u64,
    /// Unix seconds.
    pub time: i64,
    pub how: How,
    /// For a revert: the revision it restored.
    #[serde(default)]
    pub reverted_to: Option<u64>,
    /// The config file it was read from (or is written back to).
    pub config_path: PathBuf,
    pub config_sha256: String,
    pub config_text: String,
    pub files: Vec<NamedFile>,
}

impl Revision {
    /// `config` as applied now, its named files hashed as they are.
    pub fn of(config: &Config, how: How, reverted_to: Option<u64>) -> Revision {
        let files = config
            .named_files()
            .into_iter()
            .filter(|f| *f != config.source)
            .map(|path| NamedFile {
                sha256: hash_file(&path),
                path,
            })
            .collect();
        Revision {
            version: FORMAT_VERSION,
            number: 0,
            time: jiff::Timestamp::now().as_second(),
            how,
            reverted_to,
            config_path: config.source.clone(),
            config_sha256: sha256_hex(config.text.as_bytes()),
            config_text: config.text.clone(),
            files,
        }
    }

    /// The same config and files as `other` (a reload that changed
    /// nothing is not a new revision).
    fn same_as(&self, other: &Revision) -> bool {
        self.config_sha256 == other.config_sha256
            && self.config_path == other.config_path
            && self.files == other.files
    }

    /// The named files whose content is no longer what this revision saw
    /// (changed, gone, or unreadable now or then).
    pub fn changed_files(&self) -> Vec<PathBuf> {
        self.files
            .iter()
            .filter(|f| f.sha256.is_none() || hash_file(&f.path) != f.sha256)
            .map(|f| f.path.clone())
            .collect()
    }

    /// The config as this revision ran it, read as if from its file.
    pub fn config(&self) -> Result<Config, crate::config::ConfigError> {
        let base_dir = self
            .config_path
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from("."));
        Config::parse(&self.config_text, &self.config_path, &base_dir)
    }
}

/// What `GET /rollout/history` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// Newest first.
    pub revisions: Vec<Listed>,
    /// The revision serving now, if the history knows it.
    pub current: Option<u64>,
    /// Entries that could not be read or were not intact: never used.
    pub skipped: Vec<String>,
}

/// One line of the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listed {
    pub number: u64,
    pub time: i64,
    pub how: How,
    pub reverted_to: Option<u64>,
    pub config_sha256: String,
    /// Whether every file it named still hashes the same.
    pub files_unchanged: bool,
    /// The files that do not.
    pub changed_files: Vec<PathBuf>,
}

impl History {
    /// For `gateway rollout history`.
    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        if self.revisions.is_empty() {
            out.push_str("no revisions recorded\n");
        }
        for r in &self.revisions {
            let time = jiff::Timestamp::from_second(r.time)
                .map(|t| t.to_string())
                .unwrap_or_else(|_| r.time.to_string());
            let how = match r.reverted_to {
                Some(n) => format!("{} to {n}", r.how.as_str()),
                None => r.how.as_str().to_owned(),
            };
            let files = if r.files_unchanged {
                "files unchanged".to_owned()
            } else {
                let names: Vec<String> = r
                    .changed_files
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect();
                format!("files changed: {}", names.join(", "))
            };
            let mark = if self.current == Some(r.number) {
                "*"
            } else {
                " "
            };
            let _ = writeln!(
                out,
                "{mark}{:>5}  {time}  {how:<16}  config sha256:{}  {files}",
                r.number,
                r.config_sha256.get(..16).unwrap_or(&r.config_sha256),
            );
        }
        for s in &self.skipped {
            let _ = writeln!(out, "skipped: {s}");
        }
        out
    }
}

/// `gateway_revisions_errors_total` by reason, and
/// `gateway_auto_reverts_total` by result.
#[derive(Debug, Default)]
pub struct Counters {
    pub write: AtomicU64,
    pub unreadable: AtomicU64,
    pub corrupt: AtomicU64,
    /// A directory or revision file others could have written, met on a
    /// read (counted by the store, each time).
    pub untrusted: AtomicU64,
    pub auto_applied: AtomicU64,
    pub auto_failed: AtomicU64,
}

impl Counters {
    pub fn error(&self, e: &RevisionError) {
        match e.as_str() {
            "write" => &self.write,
            "unreadable" => &self.unreadable,
            "corrupt" => &self.corrupt,
            "unsafe" => &self.untrusted,
            _ => return,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    pub fn errors(&self) -> [(&'static str, u64); 4] {
        [
            ("write", self.write.load(Ordering::Relaxed)),
            ("unreadable", self.unreadable.load(Ordering::Relaxed)),
            ("corrupt", self.corrupt.load(Ordering::Relaxed)),
            ("unsafe", self.untrusted.load(Ordering::Relaxed)),
        ]
    }

    pub fn auto_reverts(&self) -> [(&'static str, u64); 2] {
        [
            ("applied", self.auto_applied.load(Ordering::Relaxed)),
            ("failed", self.auto_failed.load(Ordering::Relaxed)),
        ]
    }
}

/// The history on disk.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    keep: usize,
    /// The newest number written or found, and the revision serving now.
    state: Mutex<(u64, Option<Revision>)>,
    /// Numbers given to revisions whose write failed: whatever appears
    /// under them later was not written by this process, and is never
    /// listed or reverted to.
    unwritten: Mutex<std::collections::BTreeSet<u64>>,
    counters: std::sync::Arc<Counters>,
}

/// Revision numbers are written as 10 digits; a file name claiming more
/// is none of ours (and `rev-18446744073709551615.json` must not make the
/// next number wrap).
const MAX_NUMBER: u64 = 9_999_999_999;

impl Store {
    pub fn new(dir: PathBuf, keep: usize) -> Store {
        Store {
            dir,
            keep: keep.max(1),
            state: Mutex::new((0, None)),
            unwritten: Mutex::new(std::collections::BTreeSet::new()),
            counters: std::sync::Arc::default(),
        }
    }

    /// Counts what reads meet that others could have written (`unsafe`)
    /// into the gateway's `gateway_revisions_errors_total`.
    pub fn counting(mut self, counters: std::sync::Arc<Counters>) -> Store {
        self.counters = counters;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The revision serving now (the last one recorded by this process);
    /// its number is 0 when it could not be written.
    pub fn current(&self) -> Option<Revision> {
        self.lock().1.clone()
    }

    /// Whether `dir` may be read from; an unsafe one is counted.
    fn check_dir(&self) -> Result<(), RevisionError> {
        crate::safe_dir::check_dir(&self.dir).map_err(|reason| {
            self.counters.untrusted.fetch_add(1, Ordering::Relaxed);
            RevisionError::Untrusted {
                path: self.dir.clone(),
                reason,
            }
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, Option<Revision>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `revision` as the one serving now: a new number past every
    /// one on disk, unless it is the same config and files as the one
    /// serving. Errors leave it serving unrecorded (the caller logs and
    /// counts them); its number is then none.
    pub fn record(&self, mut revision: Revision) -> Result<Option<u64>, RevisionError> {
        let mut state = self.lock();
        if let Some(current) = &state.1
            && current.same_as(&revision)
            && revision.how == How::Reload
        {
            return Ok(Some(current.number));
        }
        let newest = state.0.max(self.newest_on_disk());
        let number = newest
            .checked_add(1)
            .filter(|n| *n <= MAX_NUMBER)
            .ok_or_else(|| RevisionError::Directory {
                dir: self.dir.clone(),
                reason: format!("revision numbers are used up ({newest})"),
            })?;
        revision.number = number;
        state.0 = number;
        let written = self.write(&revision);
        if written.is_err() {
            // Never "current" nor a revert target: a file that appears
            // under this number was not written by this process.
            self.unwritten
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(number);
            revision.number = 0;
        }
        // Serving whether or not it was written: a later no-change reload
        // compares against it.
        state.1 = Some(revision);
        written?;
        self.prune(number);
        Ok(Some(number))
    }

    fn path_of(&self, number: u64) -> PathBuf {
        self.dir.join(format!("{PREFIX}{number:010}{SUFFIX}"))
    }

    fn numbers_on_disk(&self) -> Vec<u64> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut numbers: Vec<u64> = entries
            .filter_map(|e| {
                let name = e.ok()?.file_name();
                let name = name.to_str()?;
                let digits = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
                // Only the names `path_of` makes: ten digits, no sign, no
                // aliases (rev-1.json and rev-0000000001.json).
                if digits.len() != 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                digits.parse::<u64>().ok().filter(|n| *n <= MAX_NUMBER)
            })
            .collect();
        numbers.sort_unstable();
        numbers
    }

    fn newest_on_disk(&self) -> u64 {
        self.numbers_on_disk().last().copied().unwrap_or(0)
    }

    fn write(&self, revision: &Revision) -> Result<(), RevisionError> {
        let number = revision.number;
        let path = self.path_of(number);
        self.ensure_dir()?;
        let body = serde_json::to_vec_pretty(revision).unwrap_or_default();
        write_private(&path, &body).map_err(|source| RevisionError::Write {
            number,
            path,
            source,
        })
    }

    /// The directory, made (0700) when missing; never one others can write.
    fn ensure_dir(&self) -> Result<(), RevisionError> {
        let fail = |reason: String| RevisionError::Directory {
            dir: self.dir.clone(),
            reason,
        };
        if std::fs::symlink_metadata(&self.dir).is_err() {
            crate::safe_dir::check_parent_of(&self.dir).map_err(fail)?;
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&self.dir)
                .map_err(|e| fail(e.to_string()))?;
        }
        crate::safe_dir::check_parent_of(&self.dir.join("x")).map_err(fail)
    }

    /// Keeps the newest `keep`; older ones are removed.
    fn prune(&self, newest: u64) {
        let keep = self.keep as u64;
        for n in self.numbers_on_disk() {
            if n.saturating_add(keep) <= newest {
                let _ = std::fs::remove_file(self.path_of(n));
            }
        }
    }

    /// Revision `number`, read back and checked.
    pub fn get(&self, number: u64) -> Result<Revision, RevisionError> {
        if number == 0 || number > MAX_NUMBER {
            return Err(RevisionError::Unknown(number));
        }
        self.check_dir()?;
        if self.was_unwritten(number) {
            return Err(RevisionError::Unwritten(number));
        }
        let path = self.path_of(number);
        match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(RevisionError::Unknown(number));
            }
            _ => {}
        }
        self.read(&path, number)
    }

    fn was_unwritten(&self, number: u64) -> bool {
        self.unwritten
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&number)
    }

    fn read(&self, path: &Path, number: u64) -> Result<Revision, RevisionError> {
        let r = read_revision(path, number);
        if let Err(RevisionError::Untrusted { .. }) = &r {
            self.counters.untrusted.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Every revision on disk, newest first, and what could not be used.
    pub fn list(&self) -> (Vec<Revision>, Vec<RevisionError>) {
        let mut good = Vec::new();
        let mut bad = Vec::new();
        if let Err(e) = self.check_dir() {
            return (good, vec![e]);
        }
        for n in self.numbers_on_disk().into_iter().rev() {
            if self.was_unwritten(n) {
                bad.push(RevisionError::Unwritten(n));
                continue;
            }
            match self.read(&self.path_of(n), n) {
                Ok(r) => good.push(r),
                Err(e) => bad.push(e),
            }
        }
        (good, bad)
    }

    /// The history as served, unusable entries listed as skipped (the
    /// gateway counts them once, when it starts: `App::run`).
    pub fn history(&self) -> History {
        let (revisions, bad) = self.list();
        History {
            revisions: revisions
                .iter()
                .map(|r| {
                    let changed_files = r.changed_files();
                    Listed {
                        number: r.number,
                        time: r.time,
                        how: r.how,
                        reverted_to: r.reverted_to,
                        config_sha256: r.config_sha256.clone(),
                        files_unchanged: changed_files.is_empty(),
                        changed_files,
                    }
                })
                .collect(),
            current: self.current().map(|r| r.number).filter(|n| *n > 0),
            skipped: bad.iter().map(ToString::to_string).collect(),
        }
    }
}

fn read_revision(path: &Path, number: u64) -> Result<Revision, RevisionError> {
    let corrupt = |reason: String| RevisionError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    use crate::safe_dir::PrivateFileError;
    let bytes = crate::safe_dir::read_private(path, MAX_REVISION_BYTES).map_err(|e| match e {
        PrivateFileError::Io(source) => RevisionError::Unreadable {
            path: path.to_owned(),
            source,
        },
        PrivateFileError::Untrusted(reason) => RevisionError::Untrusted {
            path: path.to_owned(),
            reason,
        },
    })?;
    let r: Revision = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    if r.version != FORMAT_VERSION {
        return Err(corrupt(format!("version {}", r.version)));
    }
    if r.number != number {
        return Err(corrupt(format!("it says it is revision {}", r.number)));
    }
    if sha256_hex(r.config_text.as_bytes()) != r.config_sha256 {
        return Err(corrupt("its config text does not match its hash".into()));
    }
    Ok(r)
}

/// `body` into `path` whole or not at all, mode 0600.
pub fn write_private(path: &Path, body: &[u8]) -> std::io::Result<()> {
    write_atomic(path, body, 0o600, None)
}

/// The config file's text replaced whole (a revert written back), keeping
/// its mode and, where this process may, its owner; only in a directory
/// no one else can write (`safe_dir`), and never a symlink: the rename
/// would turn the link into a plain file, and every later edit of the
/// file it named (where config management or a release directory writes)
/// would be silently ignored. Writing through the link instead would mean
/// checking a second directory the link's owner chose; refusing is
/// simpler and says what to do.
pub fn replace_file(path: &Path, body: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    crate::safe_dir::check_parent_of(path)
        .map_err(|why| std::io::Error::new(std::io::ErrorKind::PermissionDenied, why))?;
    let meta = std::fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is a symbolic link: writing the revision back would replace the link with a plain file and later edits where it points would be ignored; restore the revision's text where the link points (gateway rollout history shows it) and reload",
                path.display()
            ),
        ));
    }
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    write_atomic(
        path,
        body,
        meta.mode() & 0o777,
        Some((meta.uid(), meta.gid())),
    )
}

/// A fresh temp file beside `path` (one left behind, planted, or a symlink
/// is removed first), `mode`, fsync, rename, fsync of the directory.
fn write_atomic(
    path: &Path,
    body: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        // A fresh file: one left behind (or planted, or a symlink) would
        // keep its own mode and owner.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        if let Some((uid, gid)) = owner {
            // Only root may give a file away; anyone else keeps it theirs.
            let _ = std::os::unix::fs::fchown(&f, Some(uid), Some(gid));
        }
        // After the chown, which may clear set-id bits; the umask does
        // not apply to an explicit chmod.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself made durable; the file is in place either way.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && let Ok(d) = std::fs::File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn hex(digest: &[u8]) -> String {
    use std::fmt::Write as _;
    digest.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

// A named file larger than this is not hashed (reported as unreadable):
// no certificate, key or CRL is this large.
use crate::safe_dir::MAX_NAMED_FILE_BYTES;

/// The SHA-256 of a named file, streamed and bounded, opened without
/// blocking (a FIFO named as a CA must not stall whoever asks).
fn hash_file(path: &Path) -> Option<String> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    let meta = f.metadata().ok()?;
    if !meta.is_file() || meta.len() > MAX_NAMED_FILE_BYTES {
        return None;
    }
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut f = f.take(MAX_NAMED_FILE_BYTES + 1);
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        total += n as u64;
        ctx.update(buf.get(..n)?);
    }
    if total > MAX_NAMED_FILE_BYTES {
        return None;
    }
    Some(hex(ctx.finish().as_ref()))
}

/// `auto_revert`'s settings, as the config gives them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoRevert {
    pub window: Duration,
    pub factor: f64,
    /// The floor: fewer failures than this in the window never revert.
    pub min_failures: u64,
}

/// How long the baseline looks back before a reload.
pub const BASELINE: Duration = Duration::from_secs(3600);

/// Trust failures counted over time (one sample a tick), for the rate of
/// the hour before a reload.
#[derive(Debug, Default)]
pub struct Samples {
    /// (seconds since the gateway started, failures counted so far).
    samples: std::collections::VecDeque<(f64, u64)>,
}

impl Samples {
    pub fn push(&mut self, at: f64, count: u64) {
        self.samples.push_back((at, count));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| at - t > BASELINE.as_secs_f64())
        {
            self.samples.pop_front();
        }
    }

    /// Failures per second over what the samples cover before `at` (at
    /// most the last hour), with `count` the total at `at`. A span shorter
    /// than `at_least` is taken as `at_least`: a gateway up for seconds
    /// has no baseline worth the name, and a short span would make one
    /// failure look like a rate.
    pub fn rate_before(&self, at: f64, count: u64, at_least: Duration) -> f64 {
        let Some(&(t0, c0)) = self.samples.front() else {
            return 0.0;
        };
        let span = (at - t0).max(at_least.as_secs_f64()).max(1.0);
        count.saturating_sub(c0) as f64 / span
    }
}

/// A reload being watched: failures since it, against the rate before it.
#[derive(Debug, Clone, PartialEq)]
pub struct Armed {
    /// When the reload was applied (seconds since start).
    pub at: f64,
    /// Failures counted up to then.
    pub count_at: u64,
    /// Failures per second in the hour before it.
    pub baseline: f64,
    /// The revision the reload applied, and the one it replaced.
    pub revision: u64,
    pub previous: u64,
}

/// What a tick decides about an armed reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judgement {
    /// Still inside the window, below the threshold.
    Watching,
    /// The window ended below the threshold: disarm.
    Passed,
    /// Failures jumped: revert.
    Revert,
}

impl Armed {
    /// Failures since the reload, `count` now, at `now`: revert as soon as
    /// the window's rate (failures over the whole window) is certain to be
    /// more than `factor` times the baseline and the count is at least the
    /// floor; the count can only grow, so waiting for the window's end
    /// would only leave clients refused longer.
    pub fn judge(&self, settings: &AutoRevert, now: f64, count: u64) -> Judgement {
        let failures = count.saturating_sub(self.count_at);
        let window = settings.window.as_secs_f64();
        let rate = failures as f64 / window;
        if failures >= settings.min_failures && rate > settings.factor * self.baseline {
            return Judgement::Revert;
        }
        if now - self.at >= window {
            Judgement::Passed
        } else {
            Judgement::Watching
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AutoRevert {
        AutoRevert {
            window: Duration::from_secs(60),
            factor: 10.0,
            min_failures: 10,
        }
    }

    fn armed(baseline: f64) -> Armed {
        Armed {
            at: 3600.0,
            count_at: 1000,
            baseline,
            revision: 2,
            previous: 1,
        }
    }

    #[test]
    fn a_jump_reverts_and_the_floor_keeps_one_failure_after_a_quiet_hour_from_reverting() {
        let s = settings();
        // A quiet hour: one failure after it is below the floor.
        let quiet = armed(0.0);
        assert_eq!(quiet.judge(&s, 3601.0, 1001), Judgement::Watching);
        assert_eq!(quiet.judge(&s, 3601.0, 1009), Judgement::Watching);
        assert_eq!(quiet.judge(&s, 3601.0, 1010), Judgement::Revert);
        // One failure a second before: more than 10 a second over the
        // 60 s window is more than 600.
        let busy = armed(1.0);
        assert_eq!(busy.judge(&s, 3630.0, 1000 + 60), Judgement::Watching);
        assert_eq!(busy.judge(&s, 3630.0, 1000 + 600), Judgement::Watching);
        assert_eq!(busy.judge(&s, 3630.0, 1000 + 601), Judgement::Revert);
        // The window ends below the threshold: watched no more.
        assert_eq!(busy.judge(&s, 3660.0, 1100), Judgement::Passed);
        assert_eq!(quiet.judge(&s, 3700.0, 1005), Judgement::Passed);
    }

    #[test]
    fn the_baseline_is_the_rate_over_the_last_hour_and_never_a_short_span() {
        let mut samples = Samples::default();
        assert_eq!(samples.rate_before(10.0, 5, Duration::from_secs(60)), 0.0);
        for t in 0..=7200u32 {
            // One failure every 2 s in the first hour, none after.
            let count = u64::from(t.min(3600) / 2);
            samples.push(f64::from(t), count);
        }
        // The last hour (3600..7200) saw none.
        assert_eq!(
            samples.rate_before(7200.0, 1800, Duration::from_secs(60)),
            0.0
        );
        let mut young = Samples::default();
        young.push(0.0, 0);
        young.push(5.0, 3);
        // 3 failures in 5 s are taken over the 60 s window, not 5 s.
        assert_eq!(young.rate_before(5.0, 3, Duration::from_secs(60)), 0.05);
    }

    fn config(dir: &Path, text: &str) -> Config {
        let path = dir.join("gateway.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path).unwrap()
    }

    const MINIMAL: &str = crate::testing::MINIMAL_CONFIG;

    #[test]
    fn the_history_defaults_beside_audit_state_and_auto_revert_needs_one() {
        let parse = |top: &str| {
            Config::parse(
                &format!("{top}\n{MINIMAL}"),
                Path::new("/etc/gateway/gateway.toml"),
                Path::new("/etc/gateway"),
            )
        };
        assert_eq!(parse("").unwrap().revisions_dir(), None);
        assert_eq!(
            parse("audit_state = \"/var/lib/gateway/audit.json\"")
                .unwrap()
                .revisions_dir(),
            Some(PathBuf::from("/var/lib/gateway/revisions"))
        );
        assert_eq!(
            parse("revisions_dir = \"history\"")
                .unwrap()
                .revisions_dir(),
            Some(PathBuf::from("/etc/gateway/history"))
        );
        let e = parse("auto_revert = true").unwrap_err().to_string();
        assert!(e.contains("auto_revert needs a revision history"), "{e}");
        let with = "revisions_dir = \"/var/lib/gateway/revisions\"\nauto_revert = true";
        let c = parse(with).unwrap();
        assert_eq!(
            c.auto_revert(),
            Some(AutoRevert {
                window: Duration::from_secs(60),
                factor: 10.0,
                min_failures: 10
            })
        );
        for bad in [
            "auto_revert_min_failures = 0",
            "auto_revert_factor = 0.5",
            "auto_revert_window = \"0s\"",
        ] {
            assert!(parse(&format!("{with}\n{bad}")).is_err(), "{bad}");
        }
        assert!(parse("revisions_keep = 1").is_err());
    }

    #[test]
    fn revisions_are_numbered_bounded_private_and_corrupt_ones_are_skipped() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let store_dir = dir.path().join("revisions");
        let store = Store::new(store_dir.clone(), 3);
        let c = config(dir.path(), MINIMAL);
        assert_eq!(
            store.record(Revision::of(&c, How::Start, None)).unwrap(),
            Some(1)
        );
        // The same config again is no new revision.
        assert_eq!(
            store.record(Revision::of(&c, How::Reload, None)).unwrap(),
            Some(1)
        );
        for i in 0..4 {
            let c = config(dir.path(), &format!("{MINIMAL}# {i}\n"));
            store.record(Revision::of(&c, How::Reload, None)).unwrap();
        }
        let (good, bad) = store.list();
        assert!(bad.is_empty());
        assert_eq!(good.iter().map(|r| r.number).collect::<Vec<_>>(), [5, 4, 3]);
        let mode = std::fs::metadata(store.path_of(5))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(&store_dir).unwrap().permissions().mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        // A tampered entry: skipped, reported, never handed out.
        let text = std::fs::read_to_string(store.path_of(4)).unwrap();
        std::fs::write(store.path_of(4), text.replace("# 2", "# X")).unwrap();
        std::fs::write(store.path_of(3), b"{not json").unwrap();
        let h = store.history();
        assert_eq!(
            h.revisions.iter().map(|r| r.number).collect::<Vec<_>>(),
            [5]
        );
        assert_eq!(h.skipped.len(), 2, "{:?}", h.skipped);
        let (_, bad) = store.list();
        assert!(bad.iter().all(|e| e.as_str() == "corrupt"), "{bad:?}");
        assert!(matches!(store.get(4), Err(RevisionError::Corrupt { .. })));
        assert!(matches!(store.get(99), Err(RevisionError::Unknown(99))));
        // A new store (a restart) numbers on from the newest on disk.
        let again = Store::new(store_dir, 3);
        let c = config(dir.path(), &format!("{MINIMAL}# again\n"));
        assert_eq!(
            again.record(Revision::of(&c, How::Start, None)).unwrap(),
            Some(6)
        );
    }

    #[test]
    fn a_directory_others_can_write_is_never_written() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let store_dir = dir.path().join("revisions");
        std::fs::create_dir(&store_dir).unwrap();
        std::fs::set_permissions(&store_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let store = Store::new(store_dir.clone(), 3);
        let c = config(dir.path(), MINIMAL);
        let e = store
            .record(Revision::of(&c, How::Start, None))
            .unwrap_err();
        assert_eq!(e.as_str(), "write");
        assert!(e.to_string().contains("writable by others"), "{e}");
        assert_eq!(std::fs::read_dir(&store_dir).unwrap().count(), 0);
    }

    #[test]
    fn an_unsafe_directory_is_never_read_and_untrusted_files_are_skipped() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let store_dir = dir.path().join("revisions");
        let counters = std::sync::Arc::new(Counters::default());
        let store = Store::new(store_dir.clone(), 5).counting(counters.clone());
        let c = config(dir.path(), MINIMAL);
        store.record(Revision::of(&c, How::Start, None)).unwrap();
        let c2 = config(dir.path(), &format!("{MINIMAL}# 2\n"));
        store.record(Revision::of(&c2, How::Reload, None)).unwrap();
        assert_eq!(store.list().0.len(), 2);
        // A revision file group-writable, or another user's: skipped.
        std::fs::set_permissions(store.path_of(1), std::fs::Permissions::from_mode(0o620)).unwrap();
        assert!(matches!(store.get(1), Err(RevisionError::Untrusted { .. })));
        let (good, bad) = store.list();
        assert_eq!(good.iter().map(|r| r.number).collect::<Vec<_>>(), [2]);
        assert_eq!(bad[0].as_str(), "unsafe");
        if crate::safe_dir::euid() == 0 {
            std::fs::set_permissions(store.path_of(1), std::fs::Permissions::from_mode(0o600))
                .unwrap();
            std::os::unix::fs::chown(store.path_of(1), Some(65534), None).unwrap();
            let e = store.get(1).unwrap_err();
            assert!(e.to_string().contains("belongs to uid 65534"), "{e}");
        }
        // A file name claiming the largest number: skipped, no wrap.
        std::fs::write(store_dir.join("rev-18446744073709551615.json"), b"{}").unwrap();
        std::fs::write(store_dir.join("rev-1.json"), b"{}").unwrap();
        assert_eq!(store.numbers_on_disk(), [1, 2]);
        let c3 = config(dir.path(), &format!("{MINIMAL}# 3\n"));
        assert_eq!(
            store.record(Revision::of(&c3, How::Reload, None)).unwrap(),
            Some(3)
        );
        // The directory writable by others: nothing is read, the history
        // says why, and each read is counted.
        let before = counters.untrusted.load(Ordering::Relaxed);
        std::fs::set_permissions(&store_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let h = store.history();
        assert!(h.revisions.is_empty());
        assert!(
            h.skipped[0].contains("not trusted") && h.skipped[0].contains("writable by others"),
            "{:?}",
            h.skipped
        );
        assert!(matches!(store.get(3), Err(RevisionError::Untrusted { .. })));
        assert_eq!(counters.untrusted.load(Ordering::Relaxed), before + 2);
        // A revision whose write failed is not current nor a target, even
        // when a file appears under its number.
        let c4 = config(dir.path(), &format!("{MINIMAL}# 4\n"));
        assert!(store.record(Revision::of(&c4, How::Reload, None)).is_err());
        assert_eq!(store.current().map(|r| r.number), Some(0));
        std::fs::set_permissions(&store_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let mut planted = Revision::of(&c4, How::Reload, None);
        planted.number = 4;
        std::fs::write(store.path_of(4), serde_json::to_vec(&planted).unwrap()).unwrap();
        std::fs::set_permissions(store.path_of(4), std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(store.get(4), Err(RevisionError::Unwritten(4))));
        assert_eq!(store.history().current, None);
        assert!(!store.list().0.iter().any(|r| r.number == 4));
    }

    #[test]
    fn a_symlinked_config_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("release.toml");
        std::fs::write(&target, "one").unwrap();
        let link = dir.path().join("gateway.toml");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = replace_file(&link, b"two").unwrap_err();
        assert!(e.to_string().contains("is a symbolic link"), "{e}");
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "one");
        replace_file(&target, b"two").unwrap();
        assert_eq!(std::fs::read_to_string(&link).unwrap(), "two");
    }

    #[test]
    fn a_named_file_that_changed_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "one").unwrap();
        let r = Revision {
            version: FORMAT_VERSION,
            number: 1,
            time: 0,
            how: How::Start,
            reverted_to: None,
            config_path: dir.path().join("gateway.toml"),
            config_sha256: sha256_hex(b""),
            config_text: String::new(),
            files: vec![NamedFile {
                path: ca.clone(),
                sha256: hash_file(&ca),
            }],
        };
        assert!(r.changed_files().is_empty());
        std::fs::write(&ca, "two").unwrap();
        assert_eq!(r.changed_files(), vec![ca]);
    }
}

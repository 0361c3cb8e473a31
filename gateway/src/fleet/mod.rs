//! A fleet member's config: the host-local file (`[fleet]`, admin, access
//! log, workers, the listeners' certificate and key paths) and the shared
//! document in etcd (`<prefix>/config`: listeners, routes, trust bundles,
//! CRLs, the guard) with every CA bundle and CRL it names
//! (`<prefix>/files/<name>`).
//!
//! Both halves make one `Config` (`compose`), which goes through the same
//! validate-then-swap reload as a file config: etcd is only where the text
//! comes from. The shared files are written into a private directory
//! beside the cache (`<cache>.files/`, stable names, so the CRL rules that
//! follow a file across reloads hold), and the last good document is kept
//! in the cache, so a restart while etcd is down serves what was served.
//!
//! Fail closed: a document naming a file etcd does not hold, a file name
//! that is a path, a host-local setting in the document (or a shared one
//! in the host file) is refused whole.

pub mod etcd;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{Config, FleetSettings};

/// What the shared document holds; everything else is host-local.
pub const SHARED_KEYS: &[&str] = &["listeners", "trust", "guard"];

/// Largest cache file read back (a document and its CRLs).
const MAX_CACHE: u64 = 64 << 20;

/// Largest value of one key a member reads (`<prefix>/config` or one
/// named file): above etcd's default request limit (1.5 MiB), under the
/// etcd client's 4 MiB answer limit, so one read never fails for size.
pub const MAX_VALUE: usize = 3 << 20;
/// Largest document, its text and every file it names together: well
/// under `MAX_CACHE` (the cache holds it as JSON).
pub const MAX_DOCUMENT: usize = 32 << 20;

/// `[guard]` settings that name this host's paths or ids: host-local,
/// set in each host's file (`[guard]` there holds only these), never in
/// the document, so whoever writes etcd has a (root) member create no
/// directory and write no file it chooses.
pub const GUARD_HOST_KEYS: &[&str] = &["cgroup", "attach_to", "pin_dir", "pin", "uid"];

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("cannot read host file {path}: {source}")]
    ReadHost {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Host { path: PathBuf, message: String },
    #[error("the fleet document does not parse: {0}")]
    DocumentSyntax(String),
    #[error(
        "the fleet document sets `{0}`, which is host-local: set it in each host's file (the document holds only {shared})",
        shared = SHARED_KEYS.join(", ")
    )]
    HostLocalInDocument(String),
    #[error(
        "the fleet document names {0:?} where a shared file is expected: a plain name (letters, digits, `.`, `_`, `-`; no path), stored at <prefix>/files/<name>"
    )]
    BadFileName(String),
    #[error(
        "the fleet document names the host file {0:?} for a certificate or key: a plain name (no directory), read from the host file's directory, so etcd can point a gateway at no other file of the host"
    )]
    HostPath(String),
    #[error(
        "the fleet document names the file {0:?}, which etcd does not hold at <prefix>/files/{0}"
    )]
    MissingFile(String),
    #[error(
        "the fleet document is too large: {0} (limits: {max_value} bytes per key, {max_document} bytes for the document and its files together)",
        max_value = MAX_VALUE,
        max_document = MAX_DOCUMENT
    )]
    TooLarge(String),
    #[error("etcd's document would roll back a CRL the cached one enforced: {0}")]
    CrlRollback(String),
    #[error("the shared file {0:?} is not PEM text")]
    NotText(String),
    #[error("etcd holds no fleet document at {0}")]
    NoDocument(String),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("fleet files directory {path}: {message}")]
    Files { path: PathBuf, message: String },
    #[error("fleet cache {path}: {message}")]
    Cache { path: PathBuf, message: String },
    #[error("etcd: {0}")]
    Etcd(String),
}

/// The host-local file of a fleet member, as written.
#[derive(Debug, Clone)]
pub struct Host {
    pub path: PathBuf,
    pub settings: FleetSettings,
    table: toml::Table,
}

impl Host {
    /// Reads `path`; `None` when it has no `[fleet]` (a plain config file).
    pub fn load(path: &Path) -> Result<Option<Host>, FleetError> {
        let text = std::fs::read_to_string(path).map_err(|source| FleetError::ReadHost {
            path: path.to_owned(),
            source,
        })?;
        Host::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Option<Host>, FleetError> {
        let host = |message: String| FleetError::Host {
            path: path.to_owned(),
            message,
        };
        let table: toml::Table = text.parse().map_err(|e| host(format!("{e}")))?;
        let Some(fleet) = table.get("fleet") else {
            return Ok(None);
        };
        let settings: FleetSettings = fleet
            .clone()
            .try_into()
            .map_err(|e| host(format!("at `fleet`: {e}")))?;
        if let Some(guard) = table.get("guard") {
            let toml::Value::Table(guard) = guard else {
                return Err(host("`guard` is not a table".into()));
            };
            if let Some(key) = guard
                .keys()
                .find(|k| !GUARD_HOST_KEYS.contains(&k.as_str()))
            {
                return Err(host(format!(
                    "has [fleet] and sets `guard.{key}`: with [fleet], [guard] in the host file holds only {} (the rest of [guard] comes from etcd)",
                    GUARD_HOST_KEYS.join(", ")
                )));
            }
        }
        if let Some(key) = SHARED_KEYS
            .iter()
            .filter(|k| **k != "guard")
            .find(|k| table.contains_key(**k))
        {
            return Err(host(format!(
                "has [fleet] and sets `{key}`: with [fleet], {} come from etcd only",
                SHARED_KEYS.join(", ")
            )));
        }
        if table.contains_key("user") {
            // Root writes the document's files at start and the dropped
            // user at every revision after, in one directory: no owner of
            // it is safe for both (see `safe_dir`). Refused until the
            // files have a directory of the user's made before the drop.
            return Err(host(
                "has [fleet] and `user`: a fleet member does not drop privileges yet; start it as the user instead (systemd User=, with the capabilities it needs)".into(),
            ));
        }
        if settings.etcd.is_empty() {
            return Err(host("fleet.etcd names no endpoint".into()));
        }
        if !settings.prefix.starts_with('/') || settings.prefix.trim_end_matches('/').is_empty() {
            return Err(host(format!(
                "fleet.prefix {:?} must start with `/` and name something (e.g. /gateway/prod)",
                settings.prefix
            )));
        }
        if settings.name.is_empty() {
            return Err(host("fleet.name is empty".into()));
        }
        if settings.cert.is_some() != settings.key.is_some() {
            return Err(host("fleet.cert and fleet.key go together".into()));
        }
        Ok(Some(Host {
            path: path.to_owned(),
            settings,
            table,
        }))
    }

    fn base_dir(&self) -> PathBuf {
        self.path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from("."))
    }

    /// A path from the host file, resolved against its directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base_dir().join(p)
        }
    }

    /// The admin endpoint this host file configures: `admin_socket`
    /// (resolved) and `admin`, for the commands that ask a running member.
    pub fn admin(&self) -> Result<(Option<PathBuf>, Option<std::net::SocketAddr>), FleetError> {
        let bad = |field: &str| FleetError::Host {
            path: self.path.clone(),
            message: format!("`{field}` is not valid"),
        };
        let socket = match self.table.get("admin_socket") {
            None => None,
            Some(toml::Value::String(p)) => Some(self.resolve(Path::new(p))),
            Some(_) => return Err(bad("admin_socket")),
        };
        let admin = match self.table.get("admin") {
            None => None,
            Some(toml::Value::String(a)) => Some(a.parse().map_err(|_| bad("admin"))?),
            Some(_) => return Err(bad("admin")),
        };
        Ok((socket, admin))
    }

    pub fn cache(&self) -> PathBuf {
        self.resolve(&self.settings.cache)
    }

    /// Where the document's shared files are written: `<cache>.files/`.
    pub fn files_dir(&self) -> PathBuf {
        let mut dir = self.cache().into_os_string();
        dir.push(".files");
        PathBuf::from(dir)
    }

    /// `<prefix>` without a trailing `/`.
    pub fn prefix(&self) -> &str {
        self.settings.prefix.trim_end_matches('/')
    }

    /// The member's config: this file's host-local settings and `doc`'s
    /// shared ones, the shared files read from `files_dir` (see
    /// `materialize`). Parsed and checked as any config file is.
    pub fn compose(&self, doc: &Document) -> Result<Config, FleetError> {
        let mut shared = document_table(&doc.config)?;
        let files_dir = self.files_dir();
        rewrite_shared_files(&mut shared, &mut |name| {
            if !doc.files.contains_key(name) {
                return Err(FleetError::MissingFile(name.to_owned()));
            }
            Ok(files_dir.join(name).display().to_string())
        })?;
        let mut merged = self.table.clone();
        for (k, v) in shared {
            // `[guard]`: the document's shared settings and the host
            // file's host-local ones (no key is in both: each side refuses
            // the other's).
            if let (toml::Value::Table(doc_guard), Some(toml::Value::Table(host_guard))) =
                (&v, merged.get_mut(&k))
            {
                for (gk, gv) in doc_guard {
                    host_guard.insert(gk.clone(), gv.clone());
                }
                continue;
            }
            merged.insert(k, v);
        }
        let text =
            toml::to_string(&merged).map_err(|e| FleetError::DocumentSyntax(e.to_string()))?;
        Ok(Config::parse(&text, &self.path, &self.base_dir())?)
    }
}

/// The shared document at one etcd revision: its text and the files it
/// names (only those).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Document {
    /// The etcd revision it was read at (0: not from etcd).
    pub revision: i64,
    pub config: String,
    pub files: BTreeMap<String, String>,
}

impl Document {
    /// The document `config` with the files it names taken from
    /// `available`: every one must be there.
    pub fn new(
        revision: i64,
        config: String,
        available: &BTreeMap<String, Vec<u8>>,
    ) -> Result<Document, FleetError> {
        if config.len() > MAX_VALUE {
            return Err(FleetError::TooLarge(format!(
                "its text is {} bytes",
                config.len()
            )));
        }
        let names = named_files(&config)?;
        let mut files = BTreeMap::new();
        let mut total = config.len();
        for name in names {
            let bytes = available
                .get(&name)
                .ok_or_else(|| FleetError::MissingFile(name.clone()))?;
            if bytes.len() > MAX_VALUE {
                return Err(FleetError::TooLarge(format!(
                    "the file {name:?} is {} bytes",
                    bytes.len()
                )));
            }
            total += bytes.len();
            if total > MAX_DOCUMENT {
                return Err(FleetError::TooLarge(format!(
                    "with the file {name:?}, {total} bytes"
                )));
            }
            let text =
                String::from_utf8(bytes.clone()).map_err(|_| FleetError::NotText(name.clone()))?;
            files.insert(name, text);
        }
        Ok(Document {
            revision,
            config,
            files,
        })
    }

    /// The same document, whatever revision it was read at.
    pub fn same_as(&self, other: &Document) -> bool {
        self.config == other.config && self.files == other.files
    }
}

/// What a member serving `serving` does with `read`, a document read
/// from etcd.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The same document at the same revision.
    Nothing,
    /// The same document at another revision (the same text and files
    /// pushed again): no reload; the member records that revision, the one
    /// `fleet status` compares with (review 4, finding 6). Any other,
    /// not only a newer one: etcd restored from a backup numbers anew, and
    /// the member serves exactly what etcd holds at it.
    Relabel(i64),
    /// Another document: through the reload.
    Apply,
}

pub fn step(serving: &Document, read: &Document) -> Step {
    if !read.same_as(serving) {
        Step::Apply
    } else if read.revision != serving.revision {
        Step::Relabel(read.revision)
    } else {
        Step::Nothing
    }
}

/// The names of the shared files `config` (a document) names, each
/// checked to be a plain name; a host-local setting in it is refused.
pub fn named_files(config: &str) -> Result<BTreeSet<String>, FleetError> {
    let mut table = document_table(config)?;
    let mut names = BTreeSet::new();
    rewrite_shared_files(&mut table, &mut |name| {
        names.insert(name.to_owned());
        Ok(name.to_owned())
    })?;
    Ok(names)
}

fn document_table(config: &str) -> Result<toml::Table, FleetError> {
    let table: toml::Table = config
        .parse()
        .map_err(|e: toml::de::Error| FleetError::DocumentSyntax(e.to_string()))?;
    if let Some(key) = table.keys().find(|k| !SHARED_KEYS.contains(&k.as_str())) {
        return Err(FleetError::HostLocalInDocument(key.clone()));
    }
    if let Some(guard) = table.get("guard").and_then(toml::Value::as_table)
        && let Some(key) = guard.keys().find(|k| GUARD_HOST_KEYS.contains(&k.as_str()))
    {
        return Err(FleetError::HostLocalInDocument(format!("guard.{key}")));
    }
    Ok(table)
}

/// A shared file's name: one path component of letters, digits, `.`,
/// `_`, `-`, not starting with `.` (no `..`, no hidden temp names).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Calls `f` on every shared file a document names (a listener's
/// `client_ca` and `crls`, a trust bundle's `ca` and `crls`, a route's
/// `upstream_tls.ca`) and puts what it returns in its place. A listener's
/// `cert` and `key`, and `upstream_tls`'s, are host files, left as they
/// are: private keys never go into etcd. They must be plain names too,
/// read from the host file's directory: whoever can write to etcd must
/// not be able to have a gateway serve with any key its host holds.
fn rewrite_shared_files(
    table: &mut toml::Table,
    f: &mut dyn FnMut(&str) -> Result<String, FleetError>,
) -> Result<(), FleetError> {
    let mut one = |v: &mut toml::Value| -> Result<(), FleetError> {
        let toml::Value::String(name) = v else {
            return Err(FleetError::BadFileName(v.to_string()));
        };
        if !valid_name(name) {
            return Err(FleetError::BadFileName(name.clone()));
        }
        *name = f(name)?;
        Ok(())
    };
    let many = |v: &mut toml::Value,
                one: &mut dyn FnMut(&mut toml::Value) -> Result<(), FleetError>| {
        match v {
            toml::Value::Array(items) => items.iter_mut().try_for_each(one),
            other => Err(FleetError::BadFileName(other.to_string())),
        }
    };
    let host_files = |t: &toml::Table| -> Result<(), FleetError> {
        for v in ["cert", "key"].iter().filter_map(|k| t.get(*k)) {
            match v {
                toml::Value::String(name) if valid_name(name) => {}
                other => return Err(FleetError::HostPath(other.to_string())),
            }
        }
        Ok(())
    };
    if let Some(toml::Value::Array(listeners)) = table.get_mut("listeners") {
        for l in listeners.iter_mut().filter_map(toml::Value::as_table_mut) {
            host_files(l)?;
            if let Some(v) = l.get_mut("client_ca") {
                one(v)?;
            }
            if let Some(v) = l.get_mut("crls") {
                many(v, &mut one)?;
            }
            if let Some(toml::Value::Array(routes)) = l.get_mut("routes") {
                for r in routes.iter_mut().filter_map(toml::Value::as_table_mut) {
                    if let Some(u) = r
                        .get_mut("upstream_tls")
                        .and_then(toml::Value::as_table_mut)
                    {
                        host_files(u)?;
                        if let Some(v) = u.get_mut("ca") {
                            one(v)?;
                        }
                    }
                }
            }
        }
    }
    if let Some(toml::Value::Table(trust)) = table.get_mut("trust") {
        for b in trust.iter_mut().filter_map(|(_, b)| b.as_table_mut()) {
            if let Some(v) = b.get_mut("ca") {
                one(v)?;
            }
            if let Some(v) = b.get_mut("crls") {
                many(v, &mut one)?;
            }
        }
    }
    Ok(())
}

/// Writes `doc`'s files into `dir` (made 0700 when missing; refused when
/// someone else could write there), each whole (temp, fsync, rename, 0600).
pub fn materialize(dir: &Path, doc: &Document) -> Result<(), FleetError> {
    let fail = |message: String| FleetError::Files {
        path: dir.to_owned(),
        message,
    };
    if !dir.exists() {
        use std::os::unix::fs::DirBuilderExt as _;
        crate::safe_dir::check_parent_of(dir).map_err(fail)?;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(|e| fail(e.to_string()))?;
    }
    crate::safe_dir::check_dir(dir).map_err(fail)?;
    for (name, text) in &doc.files {
        crate::revisions::write_private(&dir.join(name), text.as_bytes())
            .map_err(|e| fail(format!("{name}: {e}")))?;
    }
    Ok(())
}

/// What a member says of itself at `<prefix>/members/<name>`, under a
/// lease (gone a few seconds after the member is): for `gateway fleet status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub name: String,
    /// The host it runs on (its hostname).
    pub address: String,
    /// The gateway's version.
    pub version: String,
    /// The revision of the document it serves.
    pub revision: i64,
    /// When it applied that document (Unix seconds; 0: served from the
    /// cache since its start).
    pub applied_at: i64,
    /// The newest revision it refused, and why, if it refused one since.
    pub refused: Option<(i64, String)>,
}

/// The cache file's content.
#[derive(Serialize, Deserialize)]
struct Cached {
    version: u32,
    prefix: String,
    document: Document,
}

/// Keeps `doc` as the last good document (whole or not at all, 0600, in a
/// directory no one else can write).
pub fn save_cache(host: &Host, doc: &Document) -> Result<(), FleetError> {
    let path = host.cache();
    let fail = |message: String| FleetError::Cache {
        path: path.clone(),
        message,
    };
    crate::safe_dir::check_parent_of(&path).map_err(fail)?;
    let body = serde_json::to_vec(&Cached {
        version: 1,
        prefix: host.prefix().to_owned(),
        document: doc.clone(),
    })
    .map_err(|e| fail(e.to_string()))?;
    crate::revisions::write_private(&path, &body).map_err(|e| fail(e.to_string()))
}

/// The last good document, if the cache holds one for this prefix and no
/// one else could have written it (`safe_dir::read_private`).
pub fn load_cache(host: &Host) -> Result<Document, FleetError> {
    let path = host.cache();
    let fail = |message: String| FleetError::Cache {
        path: path.clone(),
        message,
    };
    let bytes = crate::safe_dir::read_private(&path, MAX_CACHE).map_err(|e| fail(e.to_string()))?;
    let cached: Cached = serde_json::from_slice(&bytes).map_err(|e| fail(e.to_string()))?;
    if cached.version != 1 {
        return Err(fail(format!("unknown version {}", cached.version)));
    }
    if cached.prefix != host.prefix() {
        return Err(fail(format!(
            "holds the document of {}, not of {}",
            cached.prefix,
            host.prefix()
        )));
    }
    Ok(cached.document)
}

#[cfg(test)]
mod tests;

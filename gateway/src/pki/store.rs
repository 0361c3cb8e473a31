//! `gateway pki`: an internal PKI in a directory the operator names.
//!
//! Layout: `root.pem`/`root.key` (long-lived; the key signs only the
//! intermediate and the root's CRL, and belongs offline after `init`,
//! given back with `--root-key`),
//! `intermediate.pem`/`intermediate.key` (issues leaves and their CRL),
//! `ca.pem` (the trust anchor to give the gateway and clients), `index.json`
//! (what was issued and revoked), `root.crl.pem` (the root's CRL: which
//! intermediates it revoked), `crl.pem` (the intermediate's current CRL
//! followed by the root's, so a bundle names one file and revocation
//! reaches along the whole chain), and one `NAME.pem` (leaf + intermediate)
//! and `NAME.key` per issued certificate. Keys and `index.json` are
//! written 0600.
//!
//! The root's CRL is signed at `init` and again only when the root revokes
//! an intermediate (or `gateway pki crl --root` asks): it is valid until the
//! intermediate expires (at least 30 days), so the daily `gateway pki crl`
//! re-publishes it unchanged beside a fresh intermediate CRL and never
//! needs the root key. Revoking the intermediate does.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use x509_parser::certificate::X509Certificate;

use super::{Authority, KeyType, LeafSpec, PkiError, Profile};
use crate::safe_dir::Dir;

/// What `issue` makes: each profile gets exactly the EKU its role needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Server,
    Client,
    Device,
    /// The issuing intermediate, revoked by the root.
    Intermediate,
}

impl Kind {
    /// Default lifetimes: clients and devices are short-lived on purpose.
    pub fn default_lifetime(self) -> Duration {
        match self {
            Kind::Server => Duration::days(90),
            Kind::Client => Duration::hours(24),
            Kind::Device => Duration::days(7),
            Kind::Intermediate => Duration::days(INTERMEDIATE_DAYS),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexEntry {
    /// Hex, as `openssl x509 -serial` prints it.
    pub serial: String,
    pub name: String,
    pub kind: Kind,
    pub sans: Vec<String>,
    /// RFC 3339.
    pub not_after: String,
    /// RFC 3339, when revoked.
    pub revoked_at: Option<String>,
    /// For a device-bound user certificate (`gateway issuer`): the device
    /// URI it is bound to, so `gateway pki revoke --device` finds every
    /// user certificate a lost device holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// That device certificate's serial (hex), as the issuer saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_serial: Option<String>,
    /// The issuer profile it was signed under (its subject's OU too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
}

/// The device a user certificate is bound to, as the issuer verified it.
#[derive(Debug, Clone)]
pub struct BoundDevice {
    /// Its device URI SAN.
    pub uri: String,
    /// Its certificate's serial, hex.
    pub serial: String,
    /// Its certificate's notBefore, seconds since the epoch: a device
    /// `revoke --device` recorded is signed for again only with a
    /// certificate issued after that (re-enrolled).
    pub not_before: i64,
}

/// What `Store::revoke_device_uri` did.
#[derive(Debug, Clone)]
pub struct DeviceRevoked {
    /// The URI recorded, normalised.
    pub uri: String,
    /// The live certificates bound to it that were revoked.
    pub revoked: Vec<IndexEntry>,
    /// Whether any certificate in the index was ever bound to it: if not,
    /// a misspelling is likely (the issuer matches exactly).
    pub ever_bound: bool,
}

/// A device `gateway pki revoke --device` revoked, and when.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevokedDevice {
    /// Its device URI.
    pub uri: String,
    /// RFC 3339.
    pub revoked_at: String,
    /// The serials (hex) of the device certificates the index had bound
    /// to it then: refused whatever their notBefore says (S7-3).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_serials: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Index {
    pub crl_number: u64,
    /// The number of the root's last CRL (0: none signed yet).
    #[serde(default)]
    pub root_crl_number: u64,
    pub issued: Vec<IndexEntry>,
    /// Intermediates the root revoked.
    #[serde(default)]
    pub revoked_intermediates: Vec<IndexEntry>,
    /// Devices revoked (`revoke --device`), read under the lock each time
    /// the issuer signs: it refuses one whose device certificate dates
    /// from before (S4-7). Kept, never pruned: only an operator adds one
    /// (a lost or retired device, a few a month at most, ~100 bytes each),
    /// and no lifetime bounds what a device CA may issue (an MDM's device
    /// certificates last a year or more), so pruning after any guessed
    /// lifetime could let the revoked device back in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_devices: Vec<RevokedDevice>,
}

/// What `Store::refresh_crl` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrlRefresh {
    /// The CRL had more than `republish_before` left: left as it was.
    Fresh { next_update: OffsetDateTime },
    /// Re-signed: its number, its nextUpdate, how many serials it lists,
    /// and how many expired entries left the index first.
    Published {
        crl_number: u64,
        next_update: OffsetDateTime,
        revoked: usize,
        pruned: usize,
    },
    /// `crl.pem` lacked the root's revocation of an intermediate the index
    /// records (a `revoke --intermediate` that failed half-way): the
    /// root's CRL was written beside the intermediate's CRL, which was
    /// kept as it was (fresh, and its key not needed). How many
    /// intermediates the root's CRL lists.
    RootPublished { revoked_intermediates: usize },
}

/// How long `init`'s intermediate lives.
const INTERMEDIATE_DAYS: i64 = 730;

/// How long a change waits for the store's lock before giving up: every
/// holder keeps it for one signature and a few small files.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The store held for one change (`Store::lock`); released when dropped.
pub(crate) struct StoreLock {
    _dir: std::fs::File,
    _legacy: Option<std::fs::File>,
}

/// Opens a `.lock` left by an older binary, if there is one this process
/// may open: never through a symlink, never a FIFO or device (no blocking
/// open, nothing but a regular file). None when there is none, or when it
/// is another user's that this one may not read.
fn open_legacy_lock(dir: &Dir) -> std::io::Result<Option<std::fs::File>> {
    let file = match dir.open_read(".lock") {
        Ok(file) => file,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    if !file.metadata()?.file_type().is_file() {
        return Err(std::io::Error::other(
            "a legacy lock that is not a regular file",
        ));
    }
    Ok(Some(file))
}

/// The most `read_regular` reads: a certificate or key is a few KiB.
const NAMED_FILE_MAX: u64 = 1 << 20;

/// A file named on the command line (`--root-key`, the certificate `pki
/// revoke` names), read only as a regular file: not through a symbolic
/// link, not blocking on a FIFO (O_NOFOLLOW, O_NONBLOCK; the type checked
/// on the open descriptor), and at most `NAMED_FILE_MAX` bytes.
fn read_regular(path: &Path) -> Result<String, PkiError> {
    let bytes = crate::safe_dir::read_bounded_nofollow(path, NAMED_FILE_MAX).map_err(|source| {
        if source.raw_os_error() == Some(libc::ELOOP) {
            PkiError::Store {
                path: path.to_owned(),
                message: "is a symbolic link: name the file itself".into(),
            }
        } else {
            PkiError::Io {
                path: path.to_owned(),
                source,
            }
        }
    })?;
    String::from_utf8(bytes).map_err(|_| PkiError::Store {
        path: path.to_owned(),
        message: "is not text (PEM)".into(),
    })
}

/// Writes the root's CRL `pem` to `out` (`--root-crl-out`), 0644, as the
/// store's files are written (a fresh temporary file renamed into place,
/// never through a link), owned by whoever runs this: root.
fn write_root_crl_out(out: &Path, pem: &str) -> Result<(), PkiError> {
    write_outside(out, pem, 0o644)
}

/// Writes `pem` to `out`, a file outside the store (`--root-crl-out`,
/// `--root-key-out`, `--ca-out`), with `mode`, as the store's files are
/// written (a fresh temporary file renamed into place, never through a
/// link), owned by whoever runs this: root.
fn write_outside(out: &Path, pem: &str, mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: out.to_owned(),
        source,
    };
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| PkiError::Store {
            path: out.to_owned(),
            message: "not a file name in UTF-8".into(),
        })?;
    crate::safe_dir::write_replacing(dir, name, pem.as_bytes(), mode).map_err(io)
}

/// What `init` writes outside the store (`Store::with_init_outs`).
#[derive(Clone, Debug, Default)]
struct InitOuts {
    root_key: Option<PathBuf>,
    ca: Option<PathBuf>,
}

/// The root's CRL is valid at least this long when signed.
const ROOT_CRL_MIN_DAYS: i64 = 30;

/// An SSO or internal CA's store: `dir`, opened once (`Store::opened`) at
/// its first use and then used through that descriptor alone.
#[derive(Clone)]
pub struct Store {
    /// As given: what messages name.
    dir: PathBuf,
    /// The root's key outside the store (`--root-key`), where the store's
    /// owner cannot read or replace it; None: `DIR/root.key`, as before.
    root_key: Option<PathBuf>,
    /// Where the root's CRL is also written, outside the store
    /// (`--root-crl-out`): see `with_root_crl_out`.
    root_crl_out: Option<PathBuf>,
    /// No file at `root_crl_out` yet is expected (`--root-crl-new`).
    root_crl_new: bool,
    /// The root's certificate outside the store (`--root-cert`); None:
    /// the store's `root.pem`, checked against the key.
    root_cert: Option<PathBuf>,
    /// Where `init` writes the root's key (`--root-key-out`) instead of
    /// the store, and the root's certificate for routes (`--ca-out`).
    init_outs: InitOuts,
    /// `dir` as opened (see `Store::opened`), shared by clones; None until
    /// an open succeeds.
    opened: Arc<Mutex<Option<Arc<Dir>>>>,
}

/// The root, loaded for a command only the root may sign: its key, and
/// its certificate checked against that key, so nothing the store's owner
/// wrote decides what the root signs (S7-1).
pub(crate) struct Root {
    authority: Authority,
    /// The certificate's raw subject: the issuer of what the root signed.
    subject: Vec<u8>,
    /// Its SubjectPublicKeyInfo, DER: what verifies what the root signed.
    spki: Vec<u8>,
    /// The key was the store's `root.key` (not `--root-key`).
    pub key_in_store: bool,
}

impl Root {
    /// The root's certificate and key, already checked to match (`Store::root`,
    /// or freshly made by `init`).
    fn new(authority: Authority, key_in_store: bool) -> Result<Root, PkiError> {
        let bad = |message: String| PkiError::Store {
            path: "root certificate".into(),
            message,
        };
        let (_, parsed) = x509_parser::pem::parse_x509_pem(authority.cert_pem.as_bytes())
            .map_err(|e| bad(e.to_string()))?;
        let cert = parsed.parse_x509().map_err(|e| bad(e.to_string()))?;
        Ok(Root {
            subject: cert.subject().as_raw().to_vec(),
            spki: cert.public_key().raw.to_vec(),
            authority,
            key_in_store,
        })
    }

    fn public_key(&self) -> Option<x509_parser::x509::SubjectPublicKeyInfo<'_>> {
        use x509_parser::prelude::FromDer as _;
        x509_parser::x509::SubjectPublicKeyInfo::from_der(&self.spki)
            .ok()
            .map(|(_, spki)| spki)
    }

    /// Whether `cert` was issued by the root: its issuer is the root's
    /// subject and its signature verifies under the root's key.
    fn issued(&self, cert: &X509Certificate<'_>) -> bool {
        cert.issuer().as_raw() == self.subject.as_slice()
            && self
                .public_key()
                .is_some_and(|key| cert.verify_signature(Some(&key)).is_ok())
    }

    /// Whether `cert` is the root's own certificate (or another in its
    /// name, or for its key): self-signed, it passes `issued`, and
    /// revoked "as the intermediate" it revoked nothing a verifier checks
    /// (a trust anchor is on no CRL) and left the intermediate trusted
    /// (S11-1).
    fn is_itself(&self, cert: &X509Certificate<'_>) -> bool {
        cert.subject().as_raw() == self.subject.as_slice() || cert.public_key().raw == self.spki
    }

    /// Whether the CRL `der` was signed by the root: issued in its name,
    /// and its signature verifies under its key. With its number.
    fn signed_crl(&self, der: &[u8]) -> Option<u64> {
        use x509_parser::prelude::FromDer as _;
        let (_, crl) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(der).ok()?;
        let key = self.public_key()?;
        if crl.issuer().as_raw() != self.subject.as_slice() || crl.verify_signature(&key).is_err() {
            return None;
        }
        // A number too large for u64 (the root signs small ones): as large
        // as can be, so the next is refused rather than wrapped.
        Some(
            crl.crl_number()
                .map_or(0, |n| match n.to_u64_digits().as_slice() {
                    [] => 0,
                    [n] => *n,
                    _ => u64::MAX,
                }),
        )
    }
}

/// What the root's CRL, as just signed, lists (`Store::publish_root_crl`).
#[derive(Debug, Clone, Default)]
pub struct RootCrlSigned {
    /// Its CRL number.
    pub crl_number: u64,
    /// Every intermediate serial it lists (hex).
    pub listed: Vec<String>,
    /// Serials an earlier root CRL (verified under the root's key) listed
    /// and `index.json` no longer did: kept, and written back to the
    /// index. Never empty after a legitimate change: a sign that the
    /// index was edited.
    pub restored: Vec<String>,
    /// Earlier root CRLs that could not be taken into account (unreadable,
    /// or not signed by the root's key), and why.
    pub unverified: Vec<String>,
}

/// What `Store::revoke_intermediate` did.
#[derive(Debug, Clone)]
pub struct IntermediateRevoked {
    /// The index entry (serial, name, revoked_at).
    pub entry: IndexEntry,
    /// The revoked certificate's SHA-256 fingerprint, as `openssl x509
    /// -fingerprint -sha256` and `pki init` print it.
    pub fingerprint: String,
    /// The root's new CRL.
    pub root_crl: RootCrlSigned,
    /// What `crl.pem` carries of the intermediate's own CRL.
    pub intermediate_crl: IntermediateCrl,
    /// The root key was the store's `root.key`.
    pub key_in_store: bool,
}

/// A certificate's SHA-256 fingerprint, colon-separated upper-case hex, as
/// `openssl x509 -fingerprint -sha256` prints it.
pub fn fingerprint(der: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What `init` needs.
pub struct InitSpec<'a> {
    pub name: &'a str,
    pub key_type: KeyType,
    /// Restrict the intermediate to DNS names under this domain.
    pub permitted_dns: Option<&'a str>,
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl Store {
    pub fn open(dir: &Path) -> Store {
        Store {
            dir: dir.to_owned(),
            root_key: None,
            root_crl_out: None,
            root_crl_new: false,
            root_cert: None,
            init_outs: InitOuts::default(),
            opened: Arc::default(),
        }
    }

    /// The store's directory, opened once, at the first call that
    /// succeeds, and kept: every read, write, stat, chmod and lock after
    /// goes through this descriptor (openat, renameat, fstat), never
    /// through the path again. The issuer's user owns the directory above
    /// its store (`/var/lib/gateway-issuer`, StateDirectory=) and may swap
    /// `sso` for a symlink at any moment: root resolving the path anew at
    /// each step decided a file's owner from the real store and then
    /// created it, that user's, wherever the link pointed, in a directory
    /// only root may write (S11-4). A symlink, a FIFO or a file at the
    /// store's name is refused, at once (S11-5). An open that fails is not
    /// kept (`init` opens after creating the directory).
    ///
    /// A `gateway issuer` keeps its Store from one config load to the
    /// next: a store directory moved away under it stays the one it uses
    /// until it reloads (SIGHUP) or restarts.
    fn opened(&self) -> Result<Arc<Dir>, PkiError> {
        let mut slot = self
            .opened
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(dir) = slot.as_ref() {
            return Ok(dir.clone());
        }
        let dir = Arc::new(Dir::open(&self.dir).map_err(self.io(&self.dir))?);
        *slot = Some(dir.clone());
        Ok(dir)
    }

    /// Whether the store holds anything (a symlink too) named `name`.
    fn exists(&self, name: &str) -> Result<bool, PkiError> {
        self.opened()?
            .exists(name)
            .map_err(self.io(&self.path(name)))
    }

    /// The same store, with the root's key read from `key` (`--root-key`)
    /// rather than `DIR/root.key`: the key belongs offline, root's, out of
    /// reach of the store's owner, the issuer's user, whose compromise is
    /// what revoking the intermediate answers (S7-1).
    pub fn with_root_key(mut self, key: Option<&Path>) -> Store {
        self.root_key = key.map(Path::to_owned);
        self
    }

    /// The same store, with the root's CRL also written to `path`
    /// (`--root-crl-out`) whenever the root signs one: a file outside the
    /// store, in a directory only root (or whoever runs this) may write,
    /// so not the store's owner. Routes list it beside `crl.pem`.
    ///
    /// Everything in the store is its owner's to write, and that owner
    /// (the issuer's user) is the likeliest way the intermediate's key was
    /// lost: it put back the `crl.pem` from before the root's revocation
    /// (a fresh CRL of the intermediate, signed with the stolen key, and
    /// `init`'s root CRL, valid for years), and every gateway started
    /// afterwards trusted the intermediate again (S11-2). It is also the
    /// history the root's next CRL never lists less than, or numbers
    /// below: the store's copies of it are the owner's to delete (S11-3).
    /// Required for what the root signs after `init` (`revoke
    /// --intermediate`, `crl --root`).
    pub fn with_root_crl_out(mut self, path: Option<&Path>) -> Store {
        self.root_crl_out = path.map(Path::to_owned);
        self
    }

    /// The same store, where no file at `--root-crl-out` is expected yet
    /// (`--root-crl-new`): its first use on a store made before it, whose
    /// root CRLs then seed it. Without it a missing file is refused (see
    /// `sign_root_crl`).
    pub fn with_root_crl_new(mut self, new: bool) -> Store {
        self.root_crl_new = new;
        self
    }

    /// The same store, whose `init` writes the root's key to `root_key`
    /// (never into the store) and the root's certificate to `ca`, each a
    /// new file in a directory only root may write, from memory: read back
    /// by name from a store whose parent the issuer's user owns, they were
    /// that user's to swap (its own store renamed into place after init:
    /// the routes' trust anchor its CA, review 16, S16-1).
    pub fn with_init_outs(mut self, root_key: Option<&Path>, ca: Option<&Path>) -> Store {
        self.init_outs = InitOuts {
            root_key: root_key.map(Path::to_owned),
            ca: ca.map(Path::to_owned),
        };
        self
    }

    /// The same store, with the root's certificate read from `cert`
    /// (`--root-cert`, a copy root owns, such as the routes' trust anchor)
    /// rather than the store's `root.pem`, which its owner may replace to
    /// keep the root from signing (S12-2).
    pub fn with_root_cert(mut self, cert: Option<&Path>) -> Store {
        self.root_cert = cert.map(Path::to_owned);
        self
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn io(&self, path: &Path) -> impl Fn(std::io::Error) -> PkiError + '_ {
        let path = path.to_owned();
        move |source| PkiError::Io {
            path: path.clone(),
            source,
        }
    }

    fn write(&self, name: &str, contents: &str, secret: bool) -> Result<PathBuf, PkiError> {
        let path = self.path(name);
        // Written to a fresh temporary file (random name, O_EXCL,
        // O_NOFOLLOW) and renamed, so a reader (the gateway's file watcher)
        // never sees half a file, and a file or symlink left under a
        // temporary name can neither make a key readable nor receive it.
        //
        // Exactly 0644 or 0600 whatever the umask, and when root writes
        // into a store another user owns (the issuer's, by `sudo gateway
        // pki revoke`), the file stays that user's: otherwise root's
        // 0640 or 0600 index.json and crl.pem lock the issuer out of
        // signing and a gateway out of the CRL.
        //
        // The owner and the file come from the one directory opened
        // (`opened`): the owner from its fstat, the file created and
        // renamed in it by descriptor (S11-4).
        let owner = self.owner_for_root()?;
        self.opened()?
            .write_replacing_owned(
                name,
                contents.as_bytes(),
                if secret { 0o600 } else { 0o644 },
                owner,
            )
            .map_err(self.io(&path))?;
        Ok(path)
    }

    /// When root writes into a directory another user owns: that owner,
    /// from fstat of the store as opened, the directory its files go
    /// into (S11-4).
    fn owner_for_root(&self) -> Result<Option<(u32, u32)>, PkiError> {
        use std::os::unix::fs::MetadataExt as _;
        if crate::safe_dir::euid() != 0 {
            return Ok(None);
        }
        let meta = self.opened()?.metadata().map_err(self.io(&self.dir))?;
        Ok((meta.uid() != 0).then(|| (meta.uid(), meta.gid())))
    }

    /// A store file's text, read only as what a store file is: opened
    /// without following a symlink and without blocking (O_NOFOLLOW,
    /// O_NONBLOCK: a FIFO planted there stalls no one), a regular file
    /// (checked on the open descriptor, so no swap between check and
    /// read), and, when root reads (`sudo gateway pki revoke` in the
    /// issuer's store), owned by the directory's owner or by root. The
    /// store's owner (or code running as that user) could otherwise link
    /// `root.crl.pem` to a file only root may read, and root's next command
    /// would copy it into `crl.pem`, 0644 (review 4, S4-2). The error
    /// names the file.
    fn read(&self, name: &str) -> Result<String, PkiError> {
        use std::io::Read as _;
        use std::os::unix::fs::MetadataExt as _;
        let path = self.path(name);
        let refused = |message: String| PkiError::Store {
            path: path.clone(),
            message,
        };
        let dir = self.opened()?;
        let file = dir.open_read(name).map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                refused(
                    "is a symbolic link: the store's files are read only as regular files, never through a link"
                        .into(),
                )
            } else {
                self.io(&path)(e)
            }
        })?;
        let meta = file.metadata().map_err(self.io(&path))?;
        if !meta.file_type().is_file() {
            return Err(refused("is not a regular file".into()));
        }
        if crate::safe_dir::euid() == 0 {
            let dir_owner = dir.metadata().map_err(self.io(&self.dir))?.uid();
            let owner = meta.uid();
            if owner != 0 && owner != dir_owner {
                return Err(refused(format!(
                    "belongs to uid {owner}, neither the store directory's owner (uid {dir_owner}) nor root: root does not read it"
                )));
            }
        }
        // Bounded: a sparse index.json of the owner's made root read
        // until memory ran out (review 12, S12-2).
        let max = crate::safe_dir::MAX_NAMED_FILE_BYTES;
        if meta.len() > max {
            return Err(refused(format!("is larger than {} MiB", max >> 20)));
        }
        let mut text = String::new();
        file.take(max + 1)
            .read_to_string(&mut text)
            .map_err(self.io(&path))?;
        if text.len() as u64 > max {
            return Err(refused(format!("is larger than {} MiB", max >> 20)));
        }
        Ok(text)
    }

    /// `read`, and None when there is no such file.
    fn read_if_present(&self, name: &str) -> Result<Option<String>, PkiError> {
        match self.read(name) {
            Ok(text) => Ok(Some(text)),
            Err(PkiError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The CRLs in the store file `name`, every one issued by the
    /// certificate in the store file `issuer`: see `parse_crls`. What is
    /// written out of them is their DER, never the file's bytes.
    fn read_crls(&self, name: &str, issuer: &str) -> Result<Vec<StoredCrl>, PkiError> {
        let text = self.read(name)?;
        let subject = self.subject_of(issuer)?;
        let bad = |message: String| PkiError::Store {
            path: self.path(name),
            message,
        };
        let crls = parse_crls(&text).map_err(bad)?;
        if crls.iter().any(|c| c.issuer != subject) {
            return Err(bad(format!("holds a CRL not issued by {issuer}")));
        }
        Ok(crls)
    }

    /// The raw subject of the certificate in the store file `name`.
    fn subject_of(&self, name: &str) -> Result<Vec<u8>, PkiError> {
        self.with_store_cert(name, |cert, _| Ok(cert.subject().as_raw().to_vec()))
    }

    /// Reads the first certificate of the store file `name` and gives it
    /// (parsed, and its DER) to `read`; an error either way names the
    /// file.
    fn with_store_cert<T>(
        &self,
        name: &str,
        read: impl FnOnce(&X509Certificate<'_>, &[u8]) -> Result<T, String>,
    ) -> Result<T, PkiError> {
        let pem = self.read(name)?;
        let bad = |message: String| PkiError::Store {
            path: self.path(name),
            message,
        };
        let (_, parsed) =
            x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
        let cert = parsed.parse_x509().map_err(|e| bad(e.to_string()))?;
        read(&cert, &parsed.contents).map_err(bad)
    }

    /// Holds the directory for one change: the index is read, changed and
    /// written whole, and `gateway issuer` signs into it while an operator
    /// may run `gateway pki revoke`; without the lock one would write back
    /// an index missing the other's change (an issued serial `revoke`
    /// cannot find, or a revocation the next CRL leaves out). An advisory
    /// lock (flock) on the directory itself, opened read-only, released
    /// when the guard drops; every public method that writes takes it, and
    /// only those.
    ///
    /// Not on a `.lock` file inside it, as before: one created by root (an
    /// operator's `gateway pki revoke` under sudo) was root's and 0600, so
    /// the issuer, running as its own user, could not open it and stopped
    /// signing. The directory is there whoever wrote last, and anyone who
    /// may read the store may open it; flock excludes across users and
    /// descriptors alike, whatever the open mode.
    ///
    /// Opening the directory needs read permission on it, so `init` leaves
    /// it readable by its owner only (0711: a gateway running as another
    /// user still reaches `crl.pem` and `ca.pem` by name) and the issuer
    /// refuses a `ca_dir` others may read (`check_lock_private`): a local
    /// user who could open it could hold the lock as long as they like
    /// (`flock sso sleep infinity`). And no one waits without bound: after
    /// `LOCK_WAIT` the caller gets `PkiError::Locked` (the issuer answers
    /// 503 and counts it; its CRL check logs and counts a failure).
    ///
    /// Binaries from before this lock took a flock on `.lock` instead: while
    /// an older one still runs beside a newer one (an issuer not yet
    /// restarted after an upgrade, and the new `gateway pki revoke`), each
    /// would hold its own lock and a revocation could be written over. So
    /// where a `.lock` is left and this process may open it, it is held too,
    /// after the directory (older binaries take only `.lock`: no order to
    /// deadlock on). One it may not open (root's 0600 file, the issuer's
    /// user) is passed over, as above.
    pub(crate) fn lock(&self) -> Result<StoreLock, PkiError> {
        let start = std::time::Instant::now();
        // A description of its own (flock excludes per description), of
        // the directory opened once (S11-4, S11-5).
        let store = self.opened()?;
        let dir = store.reopen().map_err(self.io(&self.dir))?;
        self.hold(&dir, &self.dir, start)?;
        let legacy_path = self.path(".lock");
        let legacy = match open_legacy_lock(&store) {
            Ok(Some(file)) => {
                self.hold(&file, &legacy_path, start)?;
                Some(file)
            }
            Ok(None) => None,
            Err(e) => return Err(self.io(&legacy_path)(e)),
        };
        Ok(StoreLock {
            _dir: dir,
            _legacy: legacy,
        })
    }

    /// Takes `file`'s flock, waiting until `LOCK_WAIT` after `start`.
    fn hold(
        &self,
        file: &std::fs::File,
        path: &Path,
        start: std::time::Instant,
    ) -> Result<(), PkiError> {
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(()),
                Err(std::fs::TryLockError::WouldBlock) if start.elapsed() < LOCK_WAIT => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    tracing::warn!(dir = %self.dir.display(), lock = %path.display(), waited = ?LOCK_WAIT,
                        "the store's lock is held by another process; gave up");
                    return Err(PkiError::Locked {
                        path: path.to_path_buf(),
                        waited: LOCK_WAIT,
                    });
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(self.io(path)(e)),
            }
        }
    }

    /// Refuses a store directory that anyone but its owner may read (so
    /// open, and lock): see `lock`. Root and the owner can always open it.
    pub fn check_lock_private(&self) -> Result<(), PkiError> {
        use std::os::unix::fs::MetadataExt as _;
        let dir = self.opened()?;
        let meta = dir.metadata().map_err(self.io(&self.dir))?;
        let mode = meta.mode() & 0o7777;
        if mode & 0o044 != 0 {
            return Err(PkiError::Store {
                path: self.dir.clone(),
                message: format!(
                    "mode {mode:o} lets other users open the directory and hold the store's lock, \
                     stopping every sign-in: chmod go-r {} (0711 keeps crl.pem and ca.pem readable by name)",
                    self.dir.display()
                ),
            });
        }
        // An older binary's `.lock`, held too (see `lock`): the same holds.
        let legacy = self.path(".lock");
        if let Ok(meta) = dir.symlink_metadata(".lock")
            && meta.mode() & 0o044 != 0
        {
            return Err(PkiError::Store {
                path: legacy.clone(),
                message: format!(
                    "mode {:o} lets other users open an older binary's lock file and hold the store's lock, \
                     stopping every sign-in: rm {} once no binary older than the directory lock runs",
                    meta.mode() & 0o7777,
                    legacy.display()
                ),
            });
        }
        Ok(())
    }

    /// Refuses a store the issuer's `user` (`uid`, named `user`) does not
    /// own: the directory, where it writes `index.json` and `crl.pem` by
    /// rename and takes the lock, and the two private files it reads and
    /// rewrites (`intermediate.key`, `index.json`). Checked as root before
    /// the drop, so the error names the owner rather than a later
    /// "permission denied".
    pub fn check_owner(&self, uid: u32, user: &str) -> Result<(), PkiError> {
        use std::os::unix::fs::MetadataExt as _;
        let dir = self.opened()?;
        for name in [None, Some("intermediate.key"), Some("index.json")] {
            let (path, meta) = match name {
                None => (self.dir.clone(), dir.metadata()),
                Some(name) => (self.path(name), dir.symlink_metadata(name)),
            };
            let meta = meta.map_err(self.io(&path))?;
            if meta.uid() != uid {
                return Err(PkiError::Store {
                    path,
                    message: format!(
                        "belongs to uid {}, not to user {user:?} (uid {uid}) whom the issuer runs as \
                         (`user` in issuer.toml): it signs and writes there as that user; \
                         chown -R {user}: {}",
                        meta.uid(),
                        self.dir.display()
                    ),
                });
            }
        }
        Ok(())
    }

    pub fn index(&self) -> Result<Index, PkiError> {
        let text = self.read("index.json")?;
        serde_json::from_str(&text).map_err(|e| PkiError::Store {
            path: self.path("index.json"),
            message: e.to_string(),
        })
    }

    fn save_index(&self, index: &Index) -> Result<(), PkiError> {
        let text = serde_json::to_string_pretty(index).map_err(|e| PkiError::Store {
            path: self.path("index.json"),
            message: e.to_string(),
        })?;
        // 0600: who was issued what, for which device, is the store
        // owner's (the issuer's) business; the directory is 0711, so
        // another local user who knew the name read it.
        self.write("index.json", &text, true).map(|_| ())
    }

    /// The intermediate, with its key. Its certificate as parsed and
    /// re-encoded, one and nothing else: `issue` and the issuer copy it
    /// into every chain they hand out (`NAME.pem`, 0644, the owner's), and
    /// the file's text went whole, so a root-only combined cert-and-key
    /// PEM that reached `intermediate.pem` (a hard link, a rename of a
    /// root file left in the store) gave root's `pki issue` the key to
    /// copy out (S7-9).
    fn intermediate(&self) -> Result<Authority, PkiError> {
        let bad = |message: String| PkiError::Store {
            path: self.path("intermediate.pem"),
            message,
        };
        let cert = certs_pem(&self.read("intermediate.pem")?).map_err(bad)?;
        if cert.matches("-----BEGIN ").count() != 1 {
            return Err(bad("holds more than one certificate".into()));
        }
        Authority::load(&cert, &self.read("intermediate.key")?)
    }

    /// The root, with its key: only for what only the root may sign. The
    /// key from `--root-key` if given, else `DIR/root.key` (older setups).
    /// `root.pem` must hold the certificate of that key, self-signed by
    /// it: the store's owner writes `root.pem`, and a swapped one would
    /// give the root's CRL another issuer name, which no route applies
    /// (S7-1).
    pub(crate) fn root(&self, why: &str) -> Result<Root, PkiError> {
        let (key_path, key) = match &self.root_key {
            Some(path) => (path.clone(), read_regular(path)),
            None => (self.path("root.key"), self.read("root.key")),
        };
        let key = key.map_err(|e| PkiError::Store {
            path: key_path.clone(),
            message: format!(
                "{why} needs the root key, which signs the root's CRL: give it with --root-key PATH \
                 (kept offline, root's; {e})"
            ),
        })?;
        let (cert_path, pem) = match &self.root_cert {
            Some(path) => (path.clone(), read_regular(path)?),
            None => (self.path("root.pem"), self.read("root.pem")?),
        };
        let bad = |message: String| PkiError::Store {
            path: cert_path.clone(),
            message,
        };
        let (_, parsed) =
            x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
        let cert = parsed.parse_x509().map_err(|e| bad(e.to_string()))?;
        let pair = rcgen::KeyPair::from_pem(&key).map_err(|e| PkiError::Store {
            path: key_path.clone(),
            message: format!("not a private key: {e}"),
        })?;
        if pair.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
            return Err(bad(format!(
                "is not the certificate of the root key {} (another public key): it was replaced, \
                 or the key is another CA's; nothing signed. Restore root.pem from the copy kept \
                 with the root key (the routes' ca.pem is the root's certificate too)",
                key_path.display()
            )));
        }
        let root = Root::new(Authority::load(&pem, &key)?, self.root_key.is_none())?;
        if !root.issued(&cert) {
            return Err(bad(
                "is not self-signed by the root key: it was altered; nothing signed. Restore it \
                 from the copy kept with the root key"
                    .into(),
            ));
        }
        Ok(root)
    }

    /// A root and an intermediate, an empty index and a first CRL.
    pub fn init(&self, spec: &InitSpec<'_>) -> Result<(), PkiError> {
        let present = match self.exists("index.json") {
            Ok(present) => present,
            // No directory yet: made below.
            Err(PkiError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                false
            }
            Err(e) => return Err(e),
        };
        if present {
            return Err(PkiError::Store {
                path: self.path("index.json"),
                message: "a PKI already exists here; refusing to overwrite it".into(),
            });
        }
        // One file each: two of them the same path wrote the root's CRL
        // over its only key, or the key as the routes' anchor (review 17,
        // S17-1). Compared by directory (device, inode) and name.
        {
            use std::os::unix::fs::MetadataExt as _;
            let outs: Vec<&PathBuf> = [
                &self.init_outs.root_key,
                &self.init_outs.ca,
                &self.root_crl_out,
            ]
            .into_iter()
            .flatten()
            .collect();
            let place = |p: &Path| {
                let dir = match p.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d,
                    _ => Path::new("."),
                };
                std::fs::metadata(dir)
                    .ok()
                    .map(|m| (m.dev(), m.ino(), p.file_name().map(|n| n.to_owned())))
            };
            for (i, a) in outs.iter().enumerate() {
                for b in outs.iter().skip(i + 1) {
                    if a == b || (place(a).is_some() && place(a) == place(b)) {
                        return Err(PkiError::Store {
                            path: (*a).clone(),
                            message: format!(
                                "named twice (also as {}): --root-key-out, --ca-out and --root-crl-out are three \
                                 files; nothing created",
                                b.display()
                            ),
                        });
                    }
                }
            }
        }
        for out in [&self.init_outs.root_key, &self.init_outs.ca]
            .into_iter()
            .flatten()
        {
            self.check_root_crl_out(out)?;
            if std::fs::symlink_metadata(out).is_ok() {
                return Err(PkiError::Store {
                    path: out.clone(),
                    message:
                        "a file is already there: remove it first, or name another; nothing created"
                            .into(),
                });
            }
        }
        if let Some(out) = &self.root_crl_out {
            self.check_root_crl_out(out)?;
            if std::fs::symlink_metadata(out).is_ok() {
                return Err(PkiError::Store {
                    path: out.clone(),
                    message: "--root-crl-out: a file is already there (another PKI's root CRL, that routes may \
                              list?): remove it first, or name another; nothing created"
                        .into(),
                });
            }
        }
        if let Some(parent) = self.dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(self.io(parent))?;
        }
        let made = match std::fs::create_dir(&self.dir) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(self.io(&self.dir)(e)),
        };
        // Readable (so lockable, see `lock`) by its owner only; whatever
        // the umask, others may still reach the public files by name.
        {
            use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
            let dir = self.opened()?;
            let meta = dir.metadata().map_err(self.io(&self.dir))?;
            // The store as opened must be whoever runs init's, and, if it
            // was there before, no one else's to write: root's init into a
            // directory the issuer's user made (or swapped in after the
            // mkdir) gave that user every file, root.key and ca.pem
            // included (review 15, S15-1).
            let euid = crate::safe_dir::euid();
            let refused = |why: String| PkiError::Store {
                path: self.dir.clone(),
                message: format!(
                    "{why}: init makes the store itself, as the user who runs it, and hands its files to no \
                     one (chown the store to the issuer's user only after root.key is moved offline and ca.pem \
                     copied); remove it or name a new path; nothing created"
                ),
            };
            if meta.uid() != euid {
                return Err(refused(format!(
                    "belongs to uid {}, not to uid {euid} who runs init",
                    meta.uid()
                )));
            }
            if !made && meta.mode() & 0o022 != 0 {
                return Err(refused(format!(
                    "was already there, writable by group or others (mode {:o})",
                    meta.mode() & 0o7777
                )));
            }
            let mode = meta.permissions().mode();
            dir.set_mode((mode & 0o7700) | 0o011 | 0o700)
                .map_err(self.io(&self.dir))?;
        }
        let _lock = self.lock()?;
        let root = Authority::new_root(&format!("{} root CA", spec.name), spec.key_type, 3650)?;
        let int = root.new_intermediate(
            &format!("{} issuing CA", spec.name),
            spec.key_type,
            INTERMEDIATE_DAYS,
            spec.permitted_dns,
        )?;
        // Outside the store first, from memory.
        if let Some(out) = &self.init_outs.ca {
            write_outside(out, &root.cert_pem, 0o644)?;
        }
        match &self.init_outs.root_key {
            Some(out) => write_outside(out, &root.key_pem, 0o600)?,
            None => {
                self.write("root.key", &root.key_pem, true)?;
            }
        }
        self.write("root.pem", &root.cert_pem, false)?;
        self.write("intermediate.pem", &int.cert_pem, false)?;
        self.write("intermediate.key", &int.key_pem, true)?;
        self.write("ca.pem", &root.cert_pem, false)?;
        self.save_index(&Index::default())?;
        let root = Root::new(root, self.init_outs.root_key.is_none())?;
        self.publish_root_crl_locked(&root, self.root_crl_out.as_deref())?;
        self.publish_crl_locked(Duration::days(7))?;
        Ok(())
    }

    /// Signs and writes `root.crl.pem` from the store alone: the root's
    /// first CRL, by `init` (which also writes it to `out`, its
    /// `--root-crl-out`), or for a store made before the root signed CRLs
    /// whose root key is still in it (`publish_crl`, never `out`).
    /// Everything the root signs after `init` goes through `sign_root_crl`,
    /// from what root holds, and only `init` and that write the root's
    /// file: this one takes its number and serials from files the store's
    /// owner writes, and reached from a root command (the owner deleted
    /// `root.crl.pem` while `crl --root` ran) it wrote a CRL numbered
    /// u64::MAX listing nothing over `--root-crl-out` (review 14, S14-1).
    fn publish_root_crl_locked(
        &self,
        root: &Root,
        out: Option<&Path>,
    ) -> Result<RootCrlSigned, PkiError> {
        let mut index = self.index()?;
        if let Some(out) = out {
            self.check_root_crl_out(out)?;
        }
        let earlier = self.store_history(root);
        let mut serials = earlier.listed.clone();
        serials.extend(earlier.indexed.iter().cloned());
        let signed_number = index
            .root_crl_number
            .max(earlier.crl_number)
            .checked_add(1)
            .ok_or_else(|| PkiError::Store {
                path: self.path("index.json"),
                message: "the root's CRL number cannot grow any more".into(),
            })?;
        index.root_crl_number = signed_number;
        let signed = RootCrlSigned {
            crl_number: signed_number,
            listed: serials.iter().map(|s| hex(s)).collect(),
            restored: Vec::new(),
            unverified: earlier.unverified,
        };
        let serials: Vec<&[u8]> = serials.iter().map(Vec::as_slice).collect();
        let floor = OffsetDateTime::now_utc() + Duration::days(ROOT_CRL_MIN_DAYS);
        let next_update = self.intermediate_not_after()?.max(floor);
        let crl = root
            .authority
            .crl_until(signed.crl_number, &serials, next_update)?;
        if let Some(out) = out {
            write_root_crl_out(out, &crl)?;
        }
        self.save_index(&index)?;
        self.write("root.crl.pem", &crl, false)?;
        Ok(signed)
    }

    /// Signs the root's next CRL from what root holds, and writes it to
    /// `--root-crl-out` before anything in the store is touched: the
    /// revocation is in force for every route listing that file from
    /// then on, whatever the store's owner does.
    ///
    /// Its inputs: the root (its key, and its certificate from
    /// `--root-cert` or the store's checked `root.pem`), the history at
    /// `--root-crl-out` (every serial it lists is listed again, its number
    /// is what this one follows), `adding` (the intermediate being
    /// revoked, from the certificate the operator named, in memory: a
    /// re-read of `index.json` after writing it gave the store's owner a
    /// moment to put the old one back, and the root signed a CRL listing
    /// nothing, S12-5), and `next_update`. The store adds only root CRLs
    /// that verify under the root's key (never un-revoking what they
    /// list, nor numbering below them); nothing the owner writes decides a
    /// number or takes a serial out. The owner's `index.json` (a
    /// `root_crl_number` of u64::MAX stopped every revocation, S12-2) is
    /// read only to say what it no longer records.
    ///
    /// No file at `--root-crl-out` is taken as no history only with
    /// `--root-crl-new` (its first use on a store): silently, the owner's
    /// copy of `init`'s public CRL became the whole history, and the root
    /// signed a CRL listing nothing above the revocation's (S12-3). Then
    /// the store's root CRLs and `index.json` seed it, and at least one
    /// root CRL there must verify.
    fn sign_root_crl(
        &self,
        root: &Root,
        adding: Option<&[u8]>,
        next_update: OffsetDateTime,
    ) -> Result<(String, RootCrlSigned), PkiError> {
        let out = self.root_crl_out_checked()?;
        let store = self.store_history(root);
        let history = match (self.out_history(root, out)?, self.root_crl_new) {
            (Some(history), _) => history,
            (None, true) if store.verified => EarlierRootCrls {
                listed: store.indexed.clone(),
                ..EarlierRootCrls::default()
            },
            (None, true) => {
                return Err(PkiError::Store {
                    path: out.to_owned(),
                    message: format!(
                        "--root-crl-new, but no CRL of the root in the store verifies under its key either (neither \
                         root.crl.pem nor crl.pem{}): init signed one, so the history was destroyed (whoever writes \
                         the store may be compromised); nothing signed. Put the root's last CRL here first: the copy \
                         kept with the root key, or a gateway's copy of crl.pem (only the root's CRL in it is read)",
                        if store.unverified.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", store.unverified.join("; "))
                        }
                    ),
                });
            }
            (None, false) => {
                return Err(PkiError::Store {
                    path: out.to_owned(),
                    message: "no file here: the root's CRL kept outside the store is the history its next \
                              CRL never lists less than, and a missing one could be a wrong path; nothing \
                              signed. Name the file the root's CRL went to before; or, the first time on this \
                              store, add --root-crl-new (the store's root CRLs seed it; check the serials listed)"
                        .into(),
                });
            }
        };
        let mut serials = history.listed.clone();
        serials.extend(store.listed.iter().cloned());
        serials.extend(adding.map(<[u8]>::to_vec));
        let crl_number = history
            .crl_number
            .max(store.crl_number)
            .checked_add(1)
            .ok_or_else(|| PkiError::Store {
                path: out.to_owned(),
                message: "the root's CRL number cannot grow any more; nothing signed".into(),
            })?;
        let listed: Vec<&[u8]> = serials.iter().map(Vec::as_slice).collect();
        let crl = root.authority.crl_until(crl_number, &listed, next_update)?;
        // What was signed is what was meant: read back before anyone
        // relies on it.
        let signed_lists = parse_crls(&crl)
            .ok()
            .and_then(|crls| crls.into_iter().next())
            .map(|c| c.listed)
            .unwrap_or_default();
        if signed_lists != serials {
            return Err(PkiError::Store {
                path: out.to_owned(),
                message: "the root's new CRL does not list what it was to list; nothing written"
                    .into(),
            });
        }
        write_root_crl_out(out, &crl)?;
        let restored = match &store.index_read {
            true => serials
                .iter()
                .filter(|s| !store.indexed.contains(*s) && Some(s.as_slice()) != adding)
                .map(|s| hex(s))
                .collect(),
            false => Vec::new(),
        };
        let mut unverified = store.unverified;
        if !store.index_read {
            unverified.push("index.json: unreadable (not compared)".into());
        }
        Ok((
            crl,
            RootCrlSigned {
                crl_number,
                listed: serials.iter().map(|s| hex(s)).collect(),
                restored,
                unverified,
            },
        ))
    }

    /// After `sign_root_crl`: the store's copies of the root's CRL
    /// (`root.crl.pem`, then `crl.pem`, as `then` says) and the index's
    /// record (`entry`, the serials `signed` restored, its number), under
    /// the store's lock. The revocation is already in force at
    /// `--root-crl-out`; an error here says so (the issuer's minute check
    /// publishes into `crl.pem` what the index records, once it can).
    fn record_root_crl(
        &self,
        crl: &str,
        signed: &RootCrlSigned,
        entry: Option<&IndexEntry>,
        then: AfterRootCrl<'_>,
    ) -> Result<(PathBuf, Option<IntermediateCrl>), PkiError> {
        let _lock = self.lock()?;
        let mut index = self.index()?;
        let now = rfc3339(OffsetDateTime::now_utc());
        for serial in &signed.listed {
            if index
                .revoked_intermediates
                .iter()
                .any(|e| &e.serial == serial)
            {
                continue;
            }
            index.revoked_intermediates.push(match entry {
                Some(e) if &e.serial == serial => e.clone(),
                _ => IndexEntry {
                    serial: serial.clone(),
                    name: "intermediate".into(),
                    kind: Kind::Intermediate,
                    sans: vec![],
                    // Unknown: only the root's CRL named it.
                    not_after: String::new(),
                    revoked_at: Some(now.clone()),
                    device: None,
                    device_serial: None,
                    profile: None,
                },
            });
        }
        if !signed.restored.is_empty() {
            tracing::warn!(
                dir = %self.dir.display(),
                restored = ?signed.restored,
                "index.json no longer records intermediates the root's earlier CRL revoked: kept revoked \
                 (the index was edited; the store's owner may be compromised)"
            );
        }
        index.root_crl_number = signed.crl_number;
        self.save_index(&index)?;
        self.write("root.crl.pem", crl, false)?;
        match then {
            AfterRootCrl::Beside(subject) => self
                .publish_root_beside_locked(subject)
                .map(|(path, beside)| (path, Some(beside))),
            AfterRootCrl::Republish(validity) => {
                // A revoked intermediate's key may be gone: its CRL is kept
                // as it is, and the root's revocation still reaches crl.pem.
                let (serial, _) = self.intermediate_cert()?;
                if signed.listed.contains(&serial) {
                    self.publish_root_beside_locked(None)
                        .map(|(path, beside)| (path, Some(beside)))
                } else {
                    self.publish_crl_locked(validity).map(|path| (path, None))
                }
            }
        }
    }

    /// `--root-crl-out`, required after `init` and checked
    /// (`check_root_crl_out`).
    fn root_crl_out_checked(&self) -> Result<&Path, PkiError> {
        let out = self.root_crl_out.as_deref().ok_or_else(|| PkiError::Store {
            path: self.dir.clone(),
            message: "the root's CRL also goes outside the store, where routes read it and the store's owner \
                      cannot write: give --root-crl-out PATH (a file in a directory only root may write, e.g. \
                      /etc/gateway/sso-root.crl.pem; the same file each time: it is also the history the root's \
                      next CRL never lists less than); nothing signed"
                .into(),
        })?;
        self.check_root_crl_out(out)?;
        Ok(out)
    }

    /// Refuses a `--root-crl-out` the store's owner could write, or that
    /// is in the store: its directory must be root's (or this user's) and
    /// writable by no one else, and when root writes into another user's
    /// store, no directory on the way to it may be that user's or its
    /// group's to write (`safe_dir::writable_by`).
    fn check_root_crl_out(&self, out: &Path) -> Result<(), PkiError> {
        use std::os::unix::fs::MetadataExt as _;
        let refused = |message: String| PkiError::Store {
            path: out.to_owned(),
            message: format!(
                "--root-crl-out (or init's --root-key-out, --ca-out): {message}; nothing signed"
            ),
        };
        let parent = match out.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if out.file_name().is_none() {
            return Err(refused("names no file".into()));
        }
        crate::safe_dir::check_parent_of(out).map_err(refused)?;
        match self.owner_for_root() {
            Ok(Some((uid, gid))) => {
                if let Some(why) = crate::safe_dir::writable_by(parent, uid, &[gid]) {
                    return Err(refused(format!(
                        "{why}: the store's owner (uid {uid}), whom this file must be safe from, could replace it"
                    )));
                }
            }
            // The store root's (or this user's): still no one else on the
            // way, as with no store yet (review 17, S17-2: a root-made
            // store let `…/gateway-issuer/root/sso-ca.pem` pass).
            Ok(None) => {
                if let Some(why) = crate::safe_dir::writable_by_another(parent) {
                    return Err(refused(format!(
                        "{why}: no one but root may write on the way to this file"
                    )));
                }
            }
            // No store yet (`init` makes it, as root: root's, review 12,
            // S12-4): no owner to ask, so no one but root (or this user)
            // may own or group-write anything on the way (the immediate
            // directory alone let `state/root/…` in the user's `state`
            // pass, review 16, S16-2).
            Err(PkiError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                if let Some(why) = crate::safe_dir::writable_by_another(parent) {
                    return Err(refused(format!(
                        "{why}: no store yet to learn its owner from, so no one but root may write on the way to this file"
                    )));
                }
            }
            // A store that cannot be opened (its owner put a FIFO or a link
            // at its name) must not keep the root from signing: the file
            // is then held to the stricter rule, no one but root (or this
            // user) anywhere on the way to it.
            Err(_) => {
                // Another owner or group anywhere on the way, and any
                // directory others may write, sticky or not (review 15,
                // S15-3: /tmp passed here, refused the normal way).
                if let Some(why) = crate::safe_dir::writable_by_another(parent)
                    .or_else(|| crate::safe_dir::writable_by(parent, u32::MAX, &[]))
                {
                    return Err(refused(format!(
                        "{why}: the store could not be opened to learn its owner, so no one but root may write on the way to this file"
                    )));
                }
            }
        }
        // The store as opened (S11-4); none yet (init): not the same.
        let store = self.opened().ok().and_then(|d| d.metadata().ok());
        let same = match (std::fs::metadata(parent), store) {
            (Ok(a), Some(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        if same {
            return Err(refused(
                "is in the store, which its owner writes: name a file outside it".into(),
            ));
        }
        Ok(())
    }

    /// The root's own history at `out` (`--root-crl-out`): None when no
    /// file is there. Readable, and every CRL in the root's name in it
    /// signed by the root's key, or an error: it is root's, so anything
    /// else there is refused rather than signed past. Others' CRLs (a
    /// gateway's `crl.pem` copied there) are passed over.
    fn out_history(&self, root: &Root, out: &Path) -> Result<Option<EarlierRootCrls>, PkiError> {
        let bad = |message: String| PkiError::Store {
            path: out.to_owned(),
            message: format!(
                "{message}: the root's own copy of its CRL cannot be taken into account; nothing signed"
            ),
        };
        let text = match read_regular(out) {
            Err(PkiError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(None);
            }
            Err(e) => return Err(bad(e.to_string())),
            Ok(text) => text,
        };
        let mut history = EarlierRootCrls::default();
        for crl in parse_crls(&text)
            .map_err(bad)?
            .iter()
            .filter(|c| c.issuer == root.subject)
        {
            let number = root.signed_crl(&crl.der).ok_or_else(|| {
                bad("holds a CRL in the root's name that the root's key did not sign".into())
            })?;
            history.listed.extend(crl.listed.iter().cloned());
            history.crl_number = history.crl_number.max(number);
            history.verified = true;
        }
        if !history.verified {
            return Err(bad("holds no CRL of this root".into()));
        }
        Ok(Some(history))
    }

    /// What the store holds of the root's history, best effort: the root
    /// CRLs in `root.crl.pem` and `crl.pem` that verify under the root's
    /// key (anyone who writes the store could put any file there, but
    /// only the root signs these), and the intermediates `index.json`
    /// records revoked. Whatever cannot be read or does not verify is
    /// said in `unverified`, never an error: the store is its owner's.
    fn store_history(&self, root: &Root) -> EarlierRootCrls {
        let mut earlier = EarlierRootCrls::default();
        for name in ["root.crl.pem", "crl.pem"] {
            let crls = match self.read_if_present(name) {
                Ok(None) => {
                    if name == "root.crl.pem" {
                        earlier.unverified.push(format!("{name}: missing"));
                    }
                    continue;
                }
                Ok(Some(text)) => parse_crls(&text),
                Err(e) => Err(e.to_string()),
            };
            let crls = match crls {
                Ok(crls) => crls,
                Err(e) => {
                    earlier.unverified.push(format!("{name}: {e}"));
                    continue;
                }
            };
            // root.crl.pem is the root's alone: another issuer's CRL there
            // was put by hand (crl.pem holds the intermediate's too).
            if name == "root.crl.pem" && crls.iter().any(|c| c.issuer != root.subject) {
                earlier
                    .unverified
                    .push(format!("{name}: a CRL in another issuer's name (ignored)"));
            }
            for crl in crls.iter().filter(|c| c.issuer == root.subject) {
                match root.signed_crl(&crl.der) {
                    Some(number) => {
                        earlier.listed.extend(crl.listed.iter().cloned());
                        earlier.crl_number = earlier.crl_number.max(number);
                        earlier.verified = true;
                    }
                    None => earlier.unverified.push(format!(
                        "{name}: a CRL in the root's name that the root's key did not sign (ignored)"
                    )),
                }
            }
        }
        if let Ok(index) = self.index() {
            earlier.index_read = true;
            earlier.indexed = index
                .revoked_intermediates
                .iter()
                .filter_map(|e| unhex(&e.serial))
                .collect();
        }
        earlier
    }

    /// Reads `intermediate.pem` and gives it to `read`; an error either
    /// way names the file.
    fn with_intermediate<T>(
        &self,
        read: impl FnOnce(&X509Certificate<'_>) -> Result<T, String>,
    ) -> Result<T, PkiError> {
        self.with_store_cert("intermediate.pem", |cert, _| read(cert))
    }

    fn intermediate_cert(&self) -> Result<(String, OffsetDateTime), PkiError> {
        self.with_intermediate(|cert| {
            let not_after =
                OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp())
                    .map_err(|e| e.to_string())?;
            Ok((hex(cert.tbs_certificate.raw_serial()), not_after))
        })
    }

    /// Refuses a DNS SAN outside the intermediate's name constraints
    /// (`init --permitted-dns`): every verifier would reject the
    /// certificate, so it is better not signed.
    fn within_name_constraints(&self, sans: &[String]) -> Result<(), PkiError> {
        use x509_parser::extensions::{GeneralName, GeneralSubtree};
        let dns = |subtrees: &Option<Vec<GeneralSubtree<'_>>>| {
            subtrees
                .iter()
                .flatten()
                .filter_map(|t| match t.base {
                    GeneralName::DNSName(d) => Some(d.to_owned()),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        let (permitted, excluded) = self.with_intermediate(|cert| {
            Ok(match cert.name_constraints().map_err(|e| e.to_string())? {
                Some(nc) => (
                    dns(&nc.value.permitted_subtrees),
                    dns(&nc.value.excluded_subtrees),
                ),
                None => (Vec::new(), Vec::new()),
            })
        })?;
        for name in sans.iter().filter_map(|s| s.strip_prefix("dns:")) {
            let outside = !permitted.is_empty() && !permitted.iter().any(|c| dns_within(name, c));
            if outside || excluded.iter().any(|c| dns_within(name, c)) {
                return Err(PkiError::Store {
                    path: self.path("intermediate.pem"),
                    message: format!(
                        "--san dns:{name} is outside the intermediate's name constraints \
                         (permitted: {}; excluded: {}): every verifier would reject it",
                        list_or_none(&permitted),
                        list_or_none(&excluded)
                    ),
                });
            }
        }
        Ok(())
    }

    fn intermediate_not_after(&self) -> Result<OffsetDateTime, PkiError> {
        self.intermediate_cert().map(|(_, not_after)| not_after)
    }

    /// Issues a leaf; SANs exactly as given, wildcards refused.
    pub fn issue(
        &self,
        kind: Kind,
        name: &str,
        sans: &[String],
        lifetime: Option<Duration>,
        key_type: KeyType,
    ) -> Result<(PathBuf, PathBuf), PkiError> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(PkiError::Store {
                path: self.dir.clone(),
                message: format!("{name:?} is not usable as a file name"),
            });
        }
        if sans.is_empty() {
            return Err(PkiError::Store {
                path: self.dir.clone(),
                message: "give at least one --san: the gateway reads identities from SANs only"
                    .into(),
            });
        }
        if let Some(w) = sans.iter().find(|s| s.contains('*')) {
            return Err(PkiError::Wildcard(w.clone()));
        }
        // The gateway refuses a certificate with an invalid SPIFFE ID;
        // better not to sign one.
        for san in sans.iter().filter(|s| crate::spiffe::claims_spiffe(s)) {
            crate::spiffe::SpiffeId::parse(san).map_err(|why| PkiError::Store {
                path: self.dir.clone(),
                message: format!("--san {san:?} is not a valid SPIFFE ID: {why}"),
            })?;
        }
        self.within_name_constraints(sans)?;
        let _lock = self.lock()?;
        let mut index = self.index()?;
        let int = self.intermediate()?;
        self.refuse_revoked_intermediate(&index, &int)?;
        let sans_ref: Vec<&str> = sans.iter().map(String::as_str).collect();
        let profile = match kind {
            Kind::Server => Profile::Server,
            Kind::Client | Kind::Device => Profile::Client,
            Kind::Intermediate => {
                return Err(PkiError::Store {
                    path: self.dir.clone(),
                    message: "issue makes leaves; the intermediate comes from init".into(),
                });
            }
        };
        let mut spec = LeafSpec::new(profile, name, &sans_ref);
        let now = OffsetDateTime::now_utc();
        spec.not_before = now - Duration::minutes(5);
        spec.not_after = now + lifetime.unwrap_or_else(|| kind.default_lifetime());
        spec.key_type = key_type;
        let issued = int.issue(&spec)?;
        let cert = self.write(
            &format!("{name}.pem"),
            &format!("{}{}", issued.cert_pem, int.cert_pem),
            false,
        )?;
        let key = self.write(&format!("{name}.key"), &issued.key_pem, true)?;
        index.issued.push(IndexEntry {
            serial: hex(&issued.serial),
            name: name.to_owned(),
            kind,
            sans: sans.to_vec(),
            not_after: rfc3339(spec.not_after),
            revoked_at: None,
            device: None,
            device_serial: None,
            profile: None,
        });
        self.save_index(&index)?;
        Ok((cert, key))
    }

    /// Refuses to sign with an intermediate the root revoked: whatever it
    /// signs is refused where the root's CRL is read, and taken where a
    /// copy of `crl.pem` from before is (another host, between copies).
    /// The issuer went on answering 200 and counting `issued` (S7-8);
    /// users sign in again once a new SSO CA is set up.
    /// The serial of `intermediate.pem` when the index records the root's
    /// revocation of it: from then on the store signs nothing with it
    /// (`refuse_revoked_intermediate`).
    pub fn intermediate_revoked(&self) -> Result<Option<String>, PkiError> {
        let index = self.index()?;
        let (serial, _) = self.intermediate_cert()?;
        Ok(index
            .revoked_intermediates
            .iter()
            .any(|e| e.serial == serial)
            .then_some(serial))
    }

    fn refuse_revoked_intermediate(&self, index: &Index, int: &Authority) -> Result<(), PkiError> {
        let serial = hex(&int.serial()?);
        if index
            .revoked_intermediates
            .iter()
            .any(|e| e.serial == serial)
        {
            return Err(PkiError::Store {
                path: self.path("intermediate.pem"),
                message: format!(
                    "the root revoked this intermediate (serial {serial}): it signs nothing more; \
                     set up a new SSO CA (docs/sso.md, \"The SSO CA's CRL\")"
                ),
            });
        }
        Ok(())
    }

    /// Signs a device-bound user certificate for the key in `csr_pem`
    /// (`gateway issuer`): SANs exactly as given, clientAuth, valid from
    /// five minutes ago (clock skew) until `not_after` (whole seconds).
    /// Recorded in the index like any leaf, with the device it is bound
    /// to, so `gateway pki revoke SERIAL` (or `--device URI`) revokes it;
    /// no file is written (the certificate goes back to the requester).
    /// Returns the leaf followed by the intermediate, and the index entry.
    pub fn sign_request(
        &self,
        name: &str,
        csr_pem: &str,
        sans: &[String],
        not_after: OffsetDateTime,
        device: Option<&BoundDevice>,
    ) -> Result<(String, IndexEntry), PkiError> {
        self.sign_user_request(name, csr_pem, sans, not_after, device, None)
    }

    /// `sign_request`, naming the issuer `profile` it was signed under in
    /// the subject's OU and the index entry.
    pub fn sign_user_request(
        &self,
        name: &str,
        csr_pem: &str,
        sans: &[String],
        not_after: OffsetDateTime,
        device: Option<&BoundDevice>,
        profile: Option<&str>,
    ) -> Result<(String, IndexEntry), PkiError> {
        if let Some(w) = sans.iter().find(|s| s.contains('*')) {
            return Err(PkiError::Wildcard(w.clone()));
        }
        for san in sans.iter().filter(|s| crate::spiffe::claims_spiffe(s)) {
            crate::spiffe::SpiffeId::parse(san).map_err(|why| PkiError::Store {
                path: self.dir.clone(),
                message: format!("SAN {san:?} is not a valid SPIFFE ID: {why}"),
            })?;
        }
        self.within_name_constraints(sans)?;
        let _lock = self.lock()?;
        let mut index = self.index()?;
        if let Some(device) = device {
            refuse_revoked_device(&index, device)?;
        }
        let int = self.intermediate()?;
        self.refuse_revoked_intermediate(&index, &int)?;
        let sans_ref: Vec<&str> = sans.iter().map(String::as_str).collect();
        let mut spec = LeafSpec::new(Profile::Client, name, &sans_ref);
        // Whole seconds, as the certificate holds them, so the index and
        // the answer say exactly what the certificate does.
        let now = OffsetDateTime::now_utc();
        let now = now.replace_nanosecond(0).unwrap_or(now);
        spec.not_before = now - Duration::minutes(5);
        spec.not_after = not_after.replace_nanosecond(0).unwrap_or(not_after);
        spec.organizational_unit = profile.map(str::to_owned);
        let signed = int.sign_request(csr_pem, &spec)?;
        let entry = IndexEntry {
            serial: hex(&signed.serial),
            name: name.to_owned(),
            kind: Kind::Device,
            sans: sans.to_vec(),
            not_after: rfc3339(spec.not_after),
            revoked_at: None,
            device: device.map(|d| d.uri.clone()),
            device_serial: device.map(|d| d.serial.clone()),
            profile: profile.map(str::to_owned),
        };
        index.issued.push(entry.clone());
        self.save_index(&index)?;
        Ok((format!("{}{}", signed.cert_pem, int.cert_pem), entry))
    }

    /// Marks a leaf revoked (by hex serial, or by its PEM file) and
    /// publishes a fresh CRL; refuses the intermediate's serial (see
    /// `revoke_as`).
    pub fn revoke(&self, what: &str) -> Result<IndexEntry, PkiError> {
        self.revoke_as(what, false)
    }

    /// `what` is a hex serial, or a certificate file only when it has a
    /// `/` in it (`./NAME.pem`, `pki/NAME.pem`), which no serial has: a
    /// bare word is never looked up as a file, or a file named as the
    /// serial, planted in the operator's working directory (/tmp), would
    /// get another certificate revoked and leave the one meant valid.
    /// The intermediate (which takes every certificate it issued with it)
    /// only with `intermediate` (`--intermediate`), and only it then.
    pub fn revoke_as(&self, what: &str, intermediate: bool) -> Result<IndexEntry, PkiError> {
        if intermediate {
            return self.revoke_intermediate(what).map(|r| r.entry);
        }
        let serial = if what.contains('/') {
            let pem = self.read_named(what)?;
            let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).map_err(|e| PkiError::Store {
                path: what.into(),
                message: format!("not a PEM certificate: {e}"),
            })?;
            let cert = pem.parse_x509().map_err(|e| PkiError::Store {
                path: what.into(),
                message: format!("not a certificate: {e}"),
            })?;
            hex(cert.tbs_certificate.raw_serial())
        } else {
            self.hex_serial(what)?
        };
        let _lock = self.lock()?;
        let mut index = self.index()?;
        let (intermediate_serial, _) = self.intermediate_cert()?;
        if serial == intermediate_serial {
            return Err(PkiError::Store {
                path: self.path("intermediate.pem"),
                message: format!(
                    "serial {serial} is the intermediate's: revoking it refuses every certificate it issued; \
                     pass --intermediate if that is what you mean"
                ),
            });
        }
        let entry = index
            .issued
            .iter_mut()
            .find(|e| e.serial == serial)
            .ok_or_else(|| PkiError::Store {
                path: self.path("index.json"),
                message: format!("no certificate with serial {serial} was issued here"),
            })?;
        if entry.revoked_at.is_none() {
            entry.revoked_at = Some(rfc3339(OffsetDateTime::now_utc()));
        }
        let entry = entry.clone();
        self.save_index(&index)?;
        self.publish_crl_locked(Duration::days(7))
            .map_err(|e| self.not_published(&entry.serial, e))?;
        Ok(entry)
    }

    /// Revokes every certificate bound to the device `uri` (a lost or
    /// retired device): the user certificates the issuer signed for it,
    /// found by the device recorded in the index or, for entries written
    /// before that, by the device URI among their SANs. Already revoked
    /// and expired ones are left as they are. Publishes a fresh CRL when
    /// anything was revoked; returns what was.
    ///
    /// And records the device revoked, now (even when it holds nothing
    /// yet): the issuer reads that under the lock when it signs and
    /// refuses the device unless its certificate was issued after. Before,
    /// it refused the device only at its next minute's read of the device
    /// CRLs, and a stolen laptop that renewed meanwhile got a certificate
    /// on no CRL (S4-7).
    pub fn revoke_device(&self, uri: &str) -> Result<Vec<IndexEntry>, PkiError> {
        self.revoke_device_uri(uri).map(|r| r.revoked)
    }

    /// `revoke_device`, saying which URI was recorded (normalised: see
    /// `device_uri`) and whether the index ever bound a certificate to it.
    pub fn revoke_device_uri(&self, uri: &str) -> Result<DeviceRevoked, PkiError> {
        let uri = device_uri(uri).map_err(|why| PkiError::Store {
            path: self.dir.clone(),
            message: format!(
                "--device {uri:?}: {why}; nothing recorded. Give the device URI as its device certificate \
                 carries it (e.g. spiffe://example.internal/device/laptop-7): the issuer matches it exactly"
            ),
        })?;
        let uri = uri.as_str();
        let _lock = self.lock()?;
        let mut index = self.index()?;
        let ever_bound = index
            .issued
            .iter()
            .any(|e| e.device.as_deref() == Some(uri) || e.sans.iter().any(|s| s == uri));
        let now = OffsetDateTime::now_utc();
        let now = now.replace_nanosecond(0).unwrap_or(now);
        let stamp = rfc3339(now);
        // The device certificates it signed in with, recorded as well as
        // the time: a certificate dated after the revocation (a device
        // CA's clock ahead, or one that dates notBefore forward) is no
        // re-enrolment when it is the very one the index bound to the
        // device (S7-3). A record made before is merged, not lost.
        let mut device_serials: BTreeSet<String> = index
            .revoked_devices
            .iter()
            .filter(|d| d.uri == uri)
            .flat_map(|d| d.device_serials.iter().cloned())
            .collect();
        device_serials.extend(
            index
                .issued
                .iter()
                .filter(|e| e.device.as_deref() == Some(uri))
                .filter_map(|e| e.device_serial.clone()),
        );
        index.revoked_devices.retain(|d| d.uri != uri);
        index.revoked_devices.push(RevokedDevice {
            uri: uri.to_owned(),
            revoked_at: stamp.clone(),
            device_serials: device_serials.into_iter().collect(),
        });
        let live = |e: &IndexEntry| {
            OffsetDateTime::parse(&e.not_after, &time::format_description::well_known::Rfc3339)
                // Unreadable: revoke rather than guess it ended.
                .map_or(true, |t| t > now)
        };
        let mut revoked = Vec::new();
        for e in index.issued.iter_mut() {
            let bound = e.device.as_deref() == Some(uri) || e.sans.iter().any(|s| s == uri);
            if bound && e.revoked_at.is_none() && live(e) {
                e.revoked_at = Some(stamp.clone());
                revoked.push(e.clone());
            }
        }
        self.save_index(&index)?;
        if !revoked.is_empty() {
            self.publish_crl_locked(Duration::days(7)).map_err(|e| {
                let serials: Vec<&str> = revoked.iter().map(|e| e.serial.as_str()).collect();
                self.not_published(&serials.join(", "), e)
            })?;
        }
        Ok(DeviceRevoked {
            uri: uri.to_owned(),
            revoked,
            ever_bound,
        })
    }

    /// A revocation written to the index whose CRL failed: said plainly,
    /// with how to publish it (`gateway issuer` also does at its next
    /// minute's check, seeing a revoked serial the CRL lacks).
    fn not_published(&self, serials: &str, e: PkiError) -> PkiError {
        PkiError::Store {
            path: self.path("crl.pem"),
            message: format!(
                "revocation of {serials} recorded in index.json but NOT published: signing the CRL failed ({e}); \
                 gateways still accept it until `gateway pki crl --dir {}` succeeds",
                self.dir.display()
            ),
        }
    }

    /// A serial as the operator typed it (hex, `0x`, colons), lower-case.
    fn hex_serial(&self, what: &str) -> Result<String, PkiError> {
        let serial = what
            .trim_start_matches("0x")
            .to_ascii_lowercase()
            .replace(':', "");
        if serial.is_empty() || !serial.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(PkiError::Store {
                path: self.dir.clone(),
                message: format!(
                    "{what:?} is not a hex serial; to name a certificate file, give a path with a '/' (./{what})"
                ),
            });
        }
        Ok(serial)
    }

    /// The certificate file an operator named (`pki revoke ./NAME.pem`),
    /// read as the store reads its own files: often one in the store
    /// (`sso/intermediate.pem`, `devices/laptop-7.pem`, as the docs show),
    /// which its owner may replace. A FIFO there stalled root's revoke
    /// until someone wrote to it, and a link was followed to any file
    /// (S7-4).
    fn read_named(&self, what: &str) -> Result<Vec<u8>, PkiError> {
        read_regular(Path::new(what)).map(String::into_bytes)
    }

    /// The root revokes the intermediate (`revoke --intermediate`): the
    /// root's CRL lists it, and with it every certificate the intermediate
    /// issued is refused by a gateway whose bundle has `crl.pem`. Needs the
    /// root key (`--root-key`), not the intermediate's.
    ///
    /// What is revoked is a certificate the root's key signed: the first
    /// such certificate in the file `what` names (a path with a '/': the
    /// store's `intermediate.pem`, or a copy kept offline, or any chain
    /// the intermediate issued, whose second certificate it is), or, for a
    /// serial, `intermediate.pem` if its serial is that. The store's owner
    /// (the issuer's user, the likeliest way the intermediate's key was
    /// lost) writes `intermediate.pem`: a forged certificate there, in the
    /// intermediate's name and with another serial, got that serial
    /// revoked and the real intermediate left trusted, and the command
    /// said it succeeded (S7-1). Now it is refused, and the serial and
    /// fingerprint of what is revoked are returned, to compare with what
    /// `pki init` printed.
    pub fn revoke_intermediate(&self, what: &str) -> Result<IntermediateRevoked, PkiError> {
        use x509_parser::prelude::FromDer as _;
        let root = self.root("revoking the intermediate")?;
        // Before anything is recorded: a revocation only the store's
        // owner's files would carry is no revocation (S11-2).
        self.root_crl_out_checked()?;
        let forged = |path: PathBuf| {
            PkiError::Store {
            path,
            message: "holds no certificate the root's key signed but the root's own: it is not this root's \
                 intermediate (forged, or replaced by whoever writes the store?); nothing revoked. Name a copy of the \
                 intermediate's certificate you trust, as ./FILE: the one kept with the root key, or \
                 any user's or route's chain from this CA (its second certificate)"
                .into(),
        }
        };
        let der = if what.contains('/') {
            let text = self.read_named(what)?;
            let mut found = None;
            for pem in x509_parser::pem::Pem::iter_from_buffer(&text) {
                let pem = pem.map_err(|e| PkiError::Store {
                    path: what.into(),
                    message: format!("not PEM: {e}"),
                })?;
                if pem.label == "CERTIFICATE"
                    && pem
                        .parse_x509()
                        .is_ok_and(|cert| root.issued(&cert) && !root.is_itself(&cert))
                {
                    found = Some(pem.contents);
                    break;
                }
            }
            found.ok_or_else(|| forged(what.into()))?
        } else {
            let serial = self.hex_serial(what)?;
            let text = self.read("intermediate.pem")?;
            let (_, pem) = x509_parser::pem::parse_x509_pem(text.as_bytes())
                .map_err(|_| forged(self.path("intermediate.pem")))?;
            let cert = pem
                .parse_x509()
                .map_err(|_| forged(self.path("intermediate.pem")))?;
            if !root.issued(&cert) {
                return Err(forged(self.path("intermediate.pem")));
            }
            if root.is_itself(&cert) {
                return Err(PkiError::Store {
                    path: self.path("intermediate.pem"),
                    message: "is the root's own certificate, not the intermediate: it was replaced \
                              (whoever writes the store may be compromised); nothing revoked. Name the copy \
                              of the intermediate's certificate kept with the root key, as ./FILE"
                        .into(),
                });
            }
            let theirs = hex(cert.tbs_certificate.raw_serial());
            if serial != theirs {
                return Err(PkiError::Store {
                    path: self.path("intermediate.pem"),
                    message: format!(
                        "--intermediate, but serial {serial} is not the intermediate's ({theirs})"
                    ),
                });
            }
            pem.contents
        };
        let bad = |message: String| PkiError::Store {
            path: what.into(),
            message,
        };
        let (_, cert) =
            X509Certificate::from_der(&der).map_err(|e| bad(format!("not a certificate: {e}")))?;
        if !cert.is_ca() {
            return Err(bad(
                "the certificate the root signed there is not a CA: not the intermediate".into(),
            ));
        }
        let serial = hex(cert.tbs_certificate.raw_serial());
        // The intermediate's CRL in crl.pem is the one in this
        // certificate's name, not in intermediate.pem's, which the store's
        // owner may have swapped (S11-1).
        let subject = cert.subject().as_raw().to_vec();
        let not_after = OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp())
            .map_err(|e| bad(e.to_string()))?;
        let entry = IndexEntry {
            serial: serial.clone(),
            name: "intermediate".into(),
            kind: Kind::Intermediate,
            sans: vec![],
            not_after: rfc3339(not_after),
            revoked_at: Some(rfc3339(OffsetDateTime::now_utc())),
            device: None,
            device_serial: None,
            profile: None,
        };
        let floor = OffsetDateTime::now_utc() + Duration::days(ROOT_CRL_MIN_DAYS);
        let _out_lock = self.lock_root_crl_out()?;
        let (crl, root_crl) = self.sign_root_crl(
            &root,
            Some(cert.tbs_certificate.raw_serial()),
            not_after.max(floor),
        )?;
        // In force from here for every route that lists --root-crl-out.
        // Then the store: crl.pem without the intermediate's key (after a
        // compromise it is moved away or destroyed, S4-3), best effort (its
        // owner may stand in the way, S12-2).
        let (_, intermediate_crl) = self
            .record_root_crl(
                &crl,
                &root_crl,
                Some(&entry),
                AfterRootCrl::Beside(Some(&subject)),
            )
            .map_err(|e| self.store_not_updated(&entry.serial, e))?;
        Ok(IntermediateRevoked {
            entry,
            fingerprint: fingerprint(&der),
            root_crl,
            intermediate_crl: intermediate_crl.unwrap_or(IntermediateCrl::None),
            key_in_store: root.key_in_store,
        })
    }

    /// The error when the root's CRL is signed and written at
    /// `--root-crl-out` but the store could not take it: what is in force
    /// and what is not.
    fn store_not_updated(&self, serials: &str, e: PkiError) -> PkiError {
        PkiError::Store {
            path: self.path("crl.pem"),
            message: format!(
                "the root's CRL revoking {serials} is signed and written to {} (in force for every route that lists \
                 it), but the store was not updated, and crl.pem NOT published: {e}. Routes that read the root's CRL \
                 only from crl.pem still accept every certificate the intermediate issued: list the file above in \
                 them (docs/sso.md, \"The SSO CA's CRL\"); a running `gateway issuer` publishes it into crl.pem at \
                 its next minute's check once index.json and root.crl.pem record it",
                self.root_crl_out
                    .as_deref()
                    .map_or_else(|| "--root-crl-out".into(), |p| p.display().to_string())
            ),
        }
    }

    /// Holds root's commands that sign the root's CRL one at a time, for
    /// one `--root-crl-out`: two at once would sign two different CRLs
    /// with one number, which every gateway refuses to load. A lock file
    /// beside it (`NAME.lock`), root's and 0600, in the directory only
    /// root may write (`check_root_crl_out`): no one else can open it, so
    /// no one else can hold it.
    fn lock_root_crl_out(&self) -> Result<std::fs::File, PkiError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let out = self.root_crl_out_checked()?;
        let mut name = out.as_os_str().to_owned();
        name.push(".lock");
        let path = PathBuf::from(name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|source| PkiError::Io {
                path: path.clone(),
                source,
            })?;
        if !file
            .metadata()
            .map_err(|source| PkiError::Io {
                path: path.clone(),
                source,
            })?
            .is_file()
        {
            return Err(PkiError::Store {
                path,
                message: "is not a regular file".into(),
            });
        }
        self.hold(&file, &path, std::time::Instant::now())?;
        Ok(file)
    }

    /// Writes `crl.pem` as the intermediate's CRL already in it, kept as
    /// it was (parsed, issued by the intermediate; none if there is
    /// none), followed by the root's CRL from `root.crl.pem` (parsed,
    /// issued by the root), which must list every intermediate the index
    /// records revoked. Needs neither key, but when `crl.pem` cannot be
    /// read, the intermediate's CRL is signed afresh, or nothing written.
    /// `intermediate`: the raw subject of the intermediate whose CRL is
    /// kept; None: `intermediate.pem`'s.
    fn publish_root_beside_locked(
        &self,
        intermediate: Option<&[u8]>,
    ) -> Result<(PathBuf, IntermediateCrl), PkiError> {
        let index = self.index()?;
        let root_crls = self.read_crls("root.crl.pem", "root.pem")?;
        let listed: BTreeSet<Vec<u8>> = root_crls.iter().flat_map(|c| c.listed.clone()).collect();
        if let Some(missing) = index
            .revoked_intermediates
            .iter()
            .find(|e| unhex(&e.serial).is_none_or(|s| !listed.contains(&s)))
        {
            return Err(PkiError::Store {
                path: self.path("root.crl.pem"),
                message: format!(
                    "does not list the intermediate {} that index.json records revoked: re-sign it with \
                     `gateway pki crl --root --dir {}` (needs root.key)",
                    missing.serial,
                    self.dir.display()
                ),
            });
        }
        let state = self.crl_state(intermediate)?;
        if let Some(why) = &state.unreadable {
            // Written without it, crl.pem would withdraw the intermediate's
            // CRL that gateways enforce from it: they refuse that reload
            // and keep trusting the intermediate until restarted (S7-6).
            // Signed afresh if its key is here; else nothing is written.
            return match self.intermediate() {
                Ok(_) => self
                    .publish_crl_locked(Duration::days(7))
                    .map(|path| (path, IntermediateCrl::Signed)),
                Err(e) => Err(PkiError::Store {
                    path: self.path("crl.pem"),
                    message: format!(
                        "holds no CRL of the intermediate that could be kept ({why}), and its key cannot sign one ({e}): \
                         crl.pem is left as it is, since gateways that enforce the intermediate's CRL from it refuse a \
                         file without it and go on trusting the intermediate. Restore crl.pem (a gateway's copy) or \
                         intermediate.key and run `gateway pki crl --root --dir {dir}`; or copy {dir}/root.crl.pem to \
                         crl.pem and restart every gateway that reads it",
                        dir = self.dir.display()
                    ),
                }),
            };
        }
        let kept = state.intermediate;
        let what = if kept.is_some() {
            IntermediateCrl::Kept
        } else {
            tracing::warn!(
                "{}: crl.pem holds no CRL of the intermediate to keep: it now carries the root's CRL only",
                self.dir.display()
            );
            IntermediateCrl::None
        };
        let text = format!(
            "{}{}",
            kept.map(|k| crls_pem(std::slice::from_ref(&k)))
                .unwrap_or_default(),
            crls_pem(&root_crls)
        );
        Ok((self.write("crl.pem", &text, false)?, what))
    }

    /// Re-signs the root's CRL (needs the root key), e.g. before it runs
    /// out, at `--root-crl-out` first (`sign_root_crl`), then in the store
    /// and `crl.pem`. Returns what the root's CRL lists (never less than
    /// it did).
    pub fn republish_root_crl(
        &self,
        validity: Duration,
    ) -> Result<(PathBuf, RootCrlSigned), PkiError> {
        let root = self.root("re-signing the root's CRL")?;
        self.root_crl_out_checked()?;
        // Valid until the intermediate expires, read from the store: what
        // its owner writes there moves only how long this CRL is valid,
        // never below 30 days (a newer CRL supersedes it whatever it says).
        let floor = OffsetDateTime::now_utc() + Duration::days(ROOT_CRL_MIN_DAYS);
        let next_update = self
            .intermediate_not_after()
            .map_or(floor, |t| t.max(floor));
        let _out_lock = self.lock_root_crl_out()?;
        let (crl, signed) = self.sign_root_crl(&root, None, next_update)?;
        let (path, _) = self
            .record_root_crl(&crl, &signed, None, AfterRootCrl::Republish(validity))
            .map_err(|e| {
                self.store_not_updated(
                    &if signed.listed.is_empty() {
                        "no intermediate".to_owned()
                    } else {
                        signed.listed.join(", ")
                    },
                    e,
                )
            })?;
        Ok((path, signed))
    }

    /// `ca.pem`, the trust anchor the issuer hands every user: read as a
    /// store file (never through a link, never a FIFO, for root only the
    /// owner's or root's), and only its certificates, re-encoded. The
    /// issuer read it with a plain read that followed links and served
    /// the text whole: a link the store's owner made to a file only root
    /// may read went to every user an issuer started as root signed in
    /// (S7-5).
    pub fn ca_pem(&self) -> Result<String, PkiError> {
        certs_pem(&self.read("ca.pem")?).map_err(|message| PkiError::Store {
            path: self.path("ca.pem"),
            message,
        })
    }

    /// The serial and SHA-256 fingerprint of `intermediate.pem`, as `pki
    /// init` prints them: kept with the root key, they tell the
    /// intermediate from anything put in its place later.
    /// The SHA-256 fingerprint of `root.pem` (as `pki init` prints it):
    /// the routes' trust anchor must have this one.
    pub fn root_fingerprint(&self) -> Result<String, PkiError> {
        self.with_store_cert("root.pem", |_, der| Ok(fingerprint(der)))
    }

    pub fn intermediate_fingerprint(&self) -> Result<(String, String), PkiError> {
        self.with_store_cert("intermediate.pem", |cert, der| {
            Ok((hex(cert.tbs_certificate.raw_serial()), fingerprint(der)))
        })
    }

    /// Re-signs `crl.pem` when the intermediate's CRL in it has less than
    /// `republish_before` left before its nextUpdate (or is missing or
    /// unreadable), valid for `validity`; otherwise leaves it. Under the
    /// lock, from the index as it is then, so a revocation `gateway pki
    /// revoke` made meanwhile is in the new CRL. `gateway issuer` calls
    /// this every minute: nothing else re-publishes the SSO CA's CRL, and
    /// routes with `crl_expired = "refuse"` refuse every user once it is
    /// past its nextUpdate.
    ///
    /// Before re-signing, drops from the index every leaf that expired
    /// more than `retention` ago, revoked or not: the issuer adds one per
    /// sign-in, and the index is read and rewritten whole on each. A
    /// revoked one leaves the CRL with it, as RFC 5280 §3.3 allows once a
    /// certificate has expired (no verifier accepts it anyway). An entry
    /// whose notAfter cannot be read is kept.
    pub fn refresh_crl(
        &self,
        validity: Duration,
        republish_before: Duration,
        retention: Duration,
    ) -> Result<CrlRefresh, PkiError> {
        let _lock = self.lock()?;
        let now = OffsetDateTime::now_utc();
        let mut index = self.index()?;
        let state = self.crl_state(None)?;
        // The root's revocation of an intermediate first, and without the
        // intermediate's key (S4-3): a `revoke --intermediate` that wrote
        // the index but not crl.pem. A failure here (root.crl.pem does not
        // list it) is returned, after the intermediate's CRL is seen to.
        let root_missing = index
            .revoked_intermediates
            .iter()
            .any(|e| unhex(&e.serial).is_none_or(|s| !state.root_listed.contains(&s)));
        let root_published = root_missing.then(|| self.publish_root_beside_locked(None));
        // Fresh only if it also lists every serial the index calls
        // revoked: a `revoke` whose CRL failed after the index was written
        // (a full disk, a crash, a key briefly unreadable) is published
        // at the next check, not when the CRL happens to be due.
        if let Some(crl) = &state.intermediate
            && let Some(next_update) = crl.next_update
            && next_update - now > republish_before
            && revoked_serials(&index).is_subset(&crl.listed)
        {
            return match root_published {
                None => Ok(CrlRefresh::Fresh { next_update }),
                Some(Ok(_)) => Ok(CrlRefresh::RootPublished {
                    revoked_intermediates: index.revoked_intermediates.len(),
                }),
                Some(Err(e)) => Err(e),
            };
        }
        let before = index.issued.len();
        let cutoff = now - retention;
        index.issued.retain(|e| {
            OffsetDateTime::parse(&e.not_after, &time::format_description::well_known::Rfc3339)
                .map_or(true, |t| t >= cutoff)
        });
        let pruned = before - index.issued.len();
        if pruned > 0 {
            self.save_index(&index)?;
        }
        self.publish_crl_locked(validity)?;
        if let Some(Err(e)) = root_published {
            return Err(e);
        }
        let index = self.index()?;
        Ok(CrlRefresh::Published {
            crl_number: index.crl_number,
            next_update: now + validity,
            revoked: index
                .issued
                .iter()
                .filter(|e| e.revoked_at.is_some())
                .count(),
            pruned,
        })
    }

    /// What `crl.pem` holds: the intermediate's CRL, and the serials the
    /// root's lists. Nothing when the file is missing, and nothing but why
    /// when it cannot be read or does not parse whole as CRLs (then it is
    /// due anyway).
    /// `intermediate`: the raw subject of the intermediate's CRL; None:
    /// `intermediate.pem`'s.
    fn crl_state(&self, intermediate: Option<&[u8]>) -> Result<CrlState, PkiError> {
        let unreadable = |why: String| CrlState {
            unreadable: Some(why),
            ..CrlState::default()
        };
        let text = match self.read_if_present("crl.pem") {
            Ok(Some(text)) => text,
            Ok(None) => return Ok(CrlState::default()),
            Err(e) => return Ok(unreadable(e.to_string())),
        };
        let crls = match parse_crls(&text) {
            Ok(crls) => crls,
            Err(why) => return Ok(unreadable(format!("crl.pem {why}"))),
        };
        let intermediate = match intermediate {
            Some(subject) => subject.to_vec(),
            None => self.subject_of("intermediate.pem")?,
        };
        let root = self.subject_of("root.pem")?;
        let mut state = CrlState::default();
        for crl in crls {
            if crl.issuer == root {
                state.root_listed.extend(crl.listed.iter().cloned());
            } else if crl.issuer == intermediate && state.intermediate.is_none() {
                state.intermediate = Some(crl);
            }
        }
        Ok(state)
    }

    /// Signs and writes the intermediate's CRL listing every revoked serial,
    /// valid for `validity`, as `crl.pem` followed by the root's CRL (as
    /// last signed; the root key is not needed). A store made before the
    /// root signed CRLs gets the root's CRL here if its key is present.
    pub fn publish_crl(&self, validity: Duration) -> Result<PathBuf, PkiError> {
        let _lock = self.lock()?;
        self.publish_crl_locked(validity)
    }

    fn publish_crl_locked(&self, validity: Duration) -> Result<PathBuf, PkiError> {
        let mut index = self.index()?;
        index.crl_number += 1;
        let serials = revoked_serials(&index);
        let serials: Vec<&[u8]> = serials.iter().map(Vec::as_slice).collect();
        let crl = self.intermediate()?.crl_until(
            index.crl_number,
            &serials,
            OffsetDateTime::now_utc() + validity,
        )?;
        self.save_index(&index)?;
        // A store from before the root signed CRLs, its root key still in
        // it: its first root CRL. Never in a command the root runs with its
        // key from elsewhere (`--root-key`) or its own file
        // (`--root-crl-out`): there the root's CRL is `sign_root_crl`'s
        // alone, and a `root.crl.pem` the owner deleted is no reason to
        // sign another from the owner's files (S14-1).
        if self.root_key.is_none()
            && self.root_crl_out.is_none()
            && !self.exists("root.crl.pem")?
            && let Ok(root) = self.root("the root's first CRL")
        {
            self.publish_root_crl_locked(&root, None)?;
        }
        // Intermediate first: `openssl crl -in crl.pem` shows the one that
        // changes daily. The root's as parsed (each CRL re-encoded from
        // its DER, issued by the root): never the file's bytes, which
        // could be anything its owner put there (S4-2).
        let root_crls = match self.read_if_present("root.crl.pem")? {
            Some(_) => Some(self.read_crls("root.crl.pem", "root.pem")?),
            None => None,
        };
        let both = match root_crls {
            Some(root_crls) => format!("{crl}{}", crls_pem(&root_crls)),
            None => {
                tracing::warn!(
                    "{}: no root.crl.pem and no root key: crl.pem carries the intermediate's CRL only",
                    self.dir.display()
                );
                crl
            }
        };
        self.write("crl.pem", &both, false)
    }
}

/// What the root CRLs in the store list (`Store::earlier_root_crls`).
#[derive(Default)]
struct EarlierRootCrls {
    listed: BTreeSet<Vec<u8>>,
    crl_number: u64,
    unverified: Vec<String>,
    /// At least one earlier root CRL verified under the root's key.
    verified: bool,
    /// The intermediates `index.json` records revoked (`store_history`).
    indexed: BTreeSet<Vec<u8>>,
    /// `index.json` could be read.
    index_read: bool,
}

/// What `record_root_crl` publishes into `crl.pem` after the store's
/// copy of the root's CRL.
enum AfterRootCrl<'a> {
    /// Beside the intermediate's CRL kept as it is, the intermediate's
    /// CRL found by this subject (None: `intermediate.pem`'s).
    Beside(Option<&'a [u8]>),
    /// `crl.pem` afresh (the intermediate's CRL valid this long), or
    /// beside it when the root revoked the intermediate.
    Republish(Duration),
}

/// What `crl.pem` holds (`Store::crl_state`).
#[derive(Default)]
struct CrlState {
    /// The intermediate's CRL.
    intermediate: Option<StoredCrl>,
    /// The serials the root's CRL lists (revoked intermediates).
    root_listed: BTreeSet<Vec<u8>>,
    /// Why `crl.pem` could not be read, when it is there.
    unreadable: Option<String>,
}

/// What became of the intermediate's CRL when the root's was written
/// into `crl.pem` (`revoke --intermediate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntermediateCrl {
    /// The one in `crl.pem`, kept as it was (its key not needed).
    Kept,
    /// `crl.pem` could not be read: signed afresh with its key.
    Signed,
    /// `crl.pem` held none: the root's CRL alone.
    None,
}

/// One CRL as read from a store file: its DER alone, and what was parsed
/// from it.
struct StoredCrl {
    der: Vec<u8>,
    issuer: Vec<u8>,
    next_update: Option<OffsetDateTime>,
    listed: BTreeSet<Vec<u8>>,
}

/// The CRLs in `text`: every PEM block must be an `X509 CRL` that parses
/// whole as one, and there must be one at least. Text around the blocks
/// is dropped, and only the blocks' DER is ever written again, so nothing
/// but a CRL goes from a store file into the public `crl.pem`.
fn parse_crls(text: &str) -> Result<Vec<StoredCrl>, String> {
    use x509_parser::prelude::FromDer as _;
    use x509_parser::revocation_list::CertificateRevocationList;
    let mut crls = Vec::new();
    for pem in x509_parser::pem::Pem::iter_from_buffer(text.as_bytes()) {
        let pem = pem.map_err(|e| format!("not PEM: {e}"))?;
        if pem.label != "X509 CRL" {
            return Err(format!(
                "holds a {:?} block where only CRLs belong",
                pem.label
            ));
        }
        let (issuer, next_update, listed) = match CertificateRevocationList::from_der(&pem.contents)
        {
            Ok(([], crl)) => (
                crl.issuer().as_raw().to_vec(),
                crl.next_update()
                    .and_then(|t| OffsetDateTime::from_unix_timestamp(t.timestamp()).ok()),
                crl.iter_revoked_certificates()
                    .map(|r| r.raw_serial().to_vec())
                    .collect(),
            ),
            Ok(_) => return Err("a CRL block with bytes after the CRL".into()),
            Err(e) => return Err(format!("a block that is not a CRL: {e}")),
        };
        crls.push(StoredCrl {
            der: pem.contents,
            issuer,
            next_update,
            listed,
        });
    }
    if crls.is_empty() {
        return Err("holds no CRL".into());
    }
    Ok(crls)
}

/// One PEM block of `label` around `der`, 64 columns.
fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    let mut rest = b64.as_str();
    while !rest.is_empty() {
        let (line, tail) = rest.split_at(rest.len().min(64));
        out.push_str(line);
        out.push('\n');
        rest = tail;
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The certificates in `text`: every PEM block must be a `CERTIFICATE`
/// that parses whole as one, and there must be one at least. Returned
/// as PEM re-encoded from their DER, so nothing else in a store file
/// (text around the blocks, a key block) is ever handed on.
fn certs_pem(text: &str) -> Result<String, String> {
    use x509_parser::prelude::FromDer as _;
    let mut out = String::new();
    for pem in x509_parser::pem::Pem::iter_from_buffer(text.as_bytes()) {
        let pem = pem.map_err(|e| format!("not PEM: {e}"))?;
        if pem.label != "CERTIFICATE" {
            return Err(format!(
                "holds a {:?} block where only certificates belong",
                pem.label
            ));
        }
        match X509Certificate::from_der(&pem.contents) {
            Ok(([], _)) => out.push_str(&pem_block("CERTIFICATE", &pem.contents)),
            Ok(_) => return Err("a certificate block with bytes after the certificate".into()),
            Err(e) => return Err(format!("a block that is not a certificate: {e}")),
        }
    }
    if out.is_empty() {
        return Err("holds no certificate".into());
    }
    Ok(out)
}

/// `crls` as PEM, from their DER.
fn crls_pem(crls: &[StoredCrl]) -> String {
    use base64::Engine as _;
    let mut out = String::new();
    for crl in crls {
        let b64 = base64::engine::general_purpose::STANDARD.encode(&crl.der);
        out.push_str("-----BEGIN X509 CRL-----\n");
        let mut rest = b64.as_str();
        while !rest.is_empty() {
            let (line, tail) = rest.split_at(rest.len().min(64));
            out.push_str(line);
            out.push('\n');
            rest = tail;
        }
        out.push_str("-----END X509 CRL-----\n");
    }
    out
}

/// A device URI as an operator typed it, in the one spelling the issuer
/// can match: the issuer compares the record byte for byte with the device
/// certificate's URI SAN, which a SPIFFE ID only has in its canonical form.
/// Surrounding blanks are dropped, and the scheme and trust domain of a
/// SPIFFE ID lower-cased (case-insensitive in a URI, lower case only in a
/// SPIFFE ID); then it must be URI text with a scheme, and a SPIFFE ID
/// must be valid. Before, any text was recorded (the device's name alone,
/// a trailing '/', '%2D') and "recorded as revoked" said, while the
/// laptop went on signing in (S7-2).
fn device_uri(typed: &str) -> Result<String, String> {
    let uri = typed.trim();
    let Some((scheme, rest)) = uri.split_once(':') else {
        return Err("not a URI (no scheme)".into());
    };
    if scheme.is_empty() || !crate::identity::is_uri_text(uri) {
        return Err("not a URI".into());
    }
    if !crate::spiffe::claims_spiffe(uri) {
        return Ok(uri.to_owned());
    }
    let rest = rest
        .strip_prefix("//")
        .ok_or("not a SPIFFE ID (spiffe://…)")?;
    let (domain, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let uri = format!("spiffe://{}{path}", domain.to_ascii_lowercase());
    crate::spiffe::SpiffeId::parse(&uri).map_err(|why| {
        format!("not a valid SPIFFE ID, so no device certificate carries it: {why}")
    })?;
    Ok(uri)
}

/// Refuses `device` when `revoke --device` recorded its URI and its
/// certificate's notBefore is not after that: the revoked certificate (or
/// one from before), not a re-enrolment. A time that does not parse
/// refuses too. And, whatever its notBefore, a certificate whose serial
/// the index had bound to the device when it was revoked.
fn refuse_revoked_device(index: &Index, device: &BoundDevice) -> Result<(), PkiError> {
    let Some(revoked) = index.revoked_devices.iter().find(|d| d.uri == device.uri) else {
        return Ok(());
    };
    if revoked.device_serials.contains(&device.serial) {
        return Err(PkiError::DeviceRevoked {
            uri: device.uri.clone(),
            revoked_at: revoked.revoked_at.clone(),
        });
    }
    let at = OffsetDateTime::parse(
        &revoked.revoked_at,
        &time::format_description::well_known::Rfc3339,
    )
    .map_or(i64::MAX, OffsetDateTime::unix_timestamp);
    if device.not_before > at {
        return Ok(());
    }
    Err(PkiError::DeviceRevoked {
        uri: device.uri.clone(),
        revoked_at: revoked.revoked_at.clone(),
    })
}

/// The serials of the leaves the index records as revoked.
fn revoked_serials(index: &Index) -> BTreeSet<Vec<u8>> {
    index
        .issued
        .iter()
        .filter(|e| e.revoked_at.is_some())
        .filter_map(|e| unhex(&e.serial))
        .collect()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// RFC 5280 §4.2.1.10 for DNS names: the constraint itself or any name
/// below it ("example.internal" covers "a.example.internal"); a constraint
/// with a leading dot only names below it.
fn dns_within(name: &str, constraint: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let constraint = constraint.trim_end_matches('.').to_ascii_lowercase();
    match constraint.strip_prefix('.') {
        Some(below) => name.ends_with(&format!(".{below}")),
        None => name == constraint || name.ends_with(&format!(".{constraint}")),
    }
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

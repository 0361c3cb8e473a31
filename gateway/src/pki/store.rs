//! `gateway pki`: an internal PKI in a directory the operator names.
//!
//! Layout: `root.pem`/`root.key` (long-lived; the key signs only the
//! intermediate and belongs offline after `init`), `intermediate.pem`/
//! `intermediate.key` (issues leaves and CRLs), `ca.pem` (the trust anchor to
//! give the gateway and clients), `index.json` (what was issued and revoked),
//! `crl.pem` (the intermediate's current CRL), and one `NAME.pem` (leaf +
//! intermediate) and `NAME.key` per issued certificate. Keys are written 0600.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use super::{Authority, KeyType, LeafSpec, PkiError, Profile};

/// What `issue` makes: each profile gets exactly the EKU its role needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Server,
    Client,
    Device,
}

impl Kind {
    /// Default lifetimes: clients and devices are short-lived on purpose.
    pub fn default_lifetime(self) -> Duration {
        match self {
            Kind::Server => Duration::days(90),
            Kind::Client => Duration::hours(24),
            Kind::Device => Duration::days(7),
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
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Index {
    pub crl_number: u64,
    pub issued: Vec<IndexEntry>,
}

pub struct Store {
    dir: PathBuf,
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
        }
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
        // Written to a temporary name and renamed, so a reader (the gateway's
        // file watcher) never sees half a file.
        let tmp = self.path(&format!(".{name}.tmp"));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(if secret { 0o600 } else { 0o644 })
            .open(&tmp)
            .map_err(self.io(&tmp))?;
        file.write_all(contents.as_bytes()).map_err(self.io(&tmp))?;
        file.sync_all().map_err(self.io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(self.io(&path))?;
        Ok(path)
    }

    fn read(&self, name: &str) -> Result<String, PkiError> {
        let path = self.path(name);
        std::fs::read_to_string(&path).map_err(self.io(&path))
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
        self.write("index.json", &text, false).map(|_| ())
    }

    fn intermediate(&self) -> Result<Authority, PkiError> {
        Authority::load(
            &self.read("intermediate.pem")?,
            &self.read("intermediate.key")?,
        )
    }

    /// A root and an intermediate, an empty index and a first CRL.
    pub fn init(&self, spec: &InitSpec<'_>) -> Result<(), PkiError> {
        if self.path("index.json").exists() {
            return Err(PkiError::Store {
                path: self.path("index.json"),
                message: "a PKI already exists here; refusing to overwrite it".into(),
            });
        }
        std::fs::create_dir_all(&self.dir).map_err(self.io(&self.dir))?;
        let root = Authority::new_root(&format!("{} root CA", spec.name), spec.key_type, 3650)?;
        let int = root.new_intermediate(
            &format!("{} issuing CA", spec.name),
            spec.key_type,
            730,
            spec.permitted_dns,
        )?;
        self.write("root.pem", &root.cert_pem, false)?;
        self.write("root.key", &root.key_pem, true)?;
        self.write("intermediate.pem", &int.cert_pem, false)?;
        self.write("intermediate.key", &int.key_pem, true)?;
        self.write("ca.pem", &root.cert_pem, false)?;
        self.save_index(&Index::default())?;
        self.publish_crl(Duration::days(7))?;
        Ok(())
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
        let mut index = self.index()?;
        let int = self.intermediate()?;
        let sans_ref: Vec<&str> = sans.iter().map(String::as_str).collect();
        let profile = match kind {
            Kind::Server => Profile::Server,
            Kind::Client | Kind::Device => Profile::Client,
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
        });
        self.save_index(&index)?;
        Ok((cert, key))
    }

    /// Marks a certificate revoked (by hex serial, or by its PEM file) and
    /// publishes a fresh CRL.
    pub fn revoke(&self, what: &str) -> Result<IndexEntry, PkiError> {
        let serial = if Path::new(what).is_file() {
            let pem = std::fs::read(what).map_err(self.io(Path::new(what)))?;
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
            what.trim_start_matches("0x")
                .to_ascii_lowercase()
                .replace(':', "")
        };
        let mut index = self.index()?;
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
        self.publish_crl(Duration::days(7))?;
        Ok(entry)
    }

    /// Signs and writes `crl.pem` listing every revoked serial, valid for `validity`.
    pub fn publish_crl(&self, validity: Duration) -> Result<PathBuf, PkiError> {
        let mut index = self.index()?;
        index.crl_number += 1;
        let serials: BTreeSet<Vec<u8>> = index
            .issued
            .iter()
            .filter(|e| e.revoked_at.is_some())
            .filter_map(|e| unhex(&e.serial))
            .collect();
        let serials: Vec<&[u8]> = serials.iter().map(Vec::as_slice).collect();
        let crl = self.intermediate()?.crl_until(
            index.crl_number,
            &serials,
            OffsetDateTime::now_utc() + validity,
        )?;
        self.save_index(&index)?;
        self.write("crl.pem", &crl, false)
    }
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

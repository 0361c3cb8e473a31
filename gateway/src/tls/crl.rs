//! CRLs as a trust bundle uses them: read once from the files the config
//! names, and for each issuer only the newest.
//!
//! webpki checks a certificate against the first CRL it finds for the
//! certificate's issuer, so with two CRLs from one issuer in a bundle (last
//! week's file left beside today's, or one file in two bundles' lists) the
//! order of the config decided which revocations counted. RFC 5280 numbers
//! an issuer's CRLs in the order it issues them; the highest number is the
//! issuer's current word, so that one is kept and the others are dropped
//! with a log line. CRLs are grouped by issuer and issuing distribution
//! point, since one issuer may partition its revocations across scopes.
//! `expiry` reads the same selection, so monitoring watches exactly the
//! CRLs that are enforced.
//!
//! Two different CRLs that claim the same place (one issuer and scope, the
//! same CRL number, or without numbers the same thisUpdate) leave no way to
//! tell the current one: the load is refused, naming both files
//! (`CrlError::Ambiguous`). CRLs without a number (version 1) are ordered
//! by thisUpdate.
//!
//! CRLs are public, signed objects: anyone on the path a CRL file is
//! fetched over can hand an old one back. So the process remembers
//! (`Enforced`) the newest CRL it has put into service for each issuer,
//! scope and issuer key (authority key identifier), and a reload that
//! brings an older one is refused whole (`CrlError::Rollback`): the running
//! state, with the newer CRL, keeps serving, and the log names both files
//! and numbers. Numbers are compared within one key only, since an issuer
//! that re-keys under the same name may number its new key's CRLs from 1
//! again; across keys of one issuer and scope, thisUpdate orders them, so
//! the old key's last CRL cannot be handed back once the new key's later
//! one was enforced. The memory lasts until the process ends. It holds
//! what the files said before any client check verified the CRL's
//! signature, so a forged CRL with a huge number or a far thisUpdate
//! (which fails every client it covers, as its signature does not verify)
//! blocks older CRLs of that issuer and scope until a restart. Whoever
//! still holds an old key can sign a CRL later than the new key's, and it
//! is taken; that is the old key's compromise, which a CRL cannot mend.
//!
//! A file can also be handed back holding another issuer's valid CRL
//! instead of its own: nothing older comes back, but the place the file
//! filled is empty, and an intermediate its root's CRL revoked would pass
//! (its issuer then has no CRL, which the chain check allows). So the
//! memory also keeps which places (issuer and scope) each configured file
//! filled, and a reload in which a bundle still names the file but has no
//! CRL for one of its places is refused (`CrlError::Withdrawn`). The key is
//! not part of that place: after a re-key the new key's CRL fills it. To
//! stop enforcing a CRL on purpose, the operator removes its file from the
//! config (or restarts): a file no longer named is forgotten.

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls_pki_types::CertificateRevocationListDer;
use webpki::{CertRevocationList, OwnedCertRevocationList};
use x509_parser::extensions::ParsedExtension;
use x509_parser::num_bigint::BigUint;
use x509_parser::prelude::{CertificateRevocationList, FromDer};

use super::certs::{self, CertError};

#[derive(Debug, thiserror::Error)]
pub enum CrlError {
    #[error(transparent)]
    File(#[from] CertError),
    #[error(
        "{first} and {second} hold two different CRLs {number} of issuer {issuer} for one scope: \
         which one is current cannot be told, so neither is used"
    )]
    Ambiguous {
        issuer: String,
        number: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error(
        "{file} holds CRL {number} of issuer {issuer}, but this gateway already enforced CRL {enforced} \
         (from {enforced_file}) for that issuer and scope: an older CRL would un-revoke what \
         the newer one revoked. Put the current CRL in place (the gateway remembers the newest until it restarts)"
    )]
    Rollback {
        issuer: String,
        number: String,
        file: PathBuf,
        enforced: String,
        enforced_file: PathBuf,
    },
    #[error(
        "{file} no longer holds a CRL of issuer {issuer} ({scope}), which this gateway enforced from it, \
         and no other CRL file of its bundle does: its revocations would be lifted while the file is \
         still configured. Put a current CRL of that issuer and scope (signed with any of its keys) in \
         the file, or remove the file from the config to stop enforcing it on purpose"
    )]
    Withdrawn {
        issuer: String,
        scope: String,
        file: PathBuf,
    },
}

impl CrlError {
    /// The metric label (`gateway_crl_refused_total{reason}`), None for a
    /// file that could not be read at all.
    pub fn label(&self) -> Option<&'static str> {
        match self {
            CrlError::File(_) => None,
            CrlError::Ambiguous { .. } => Some("ambiguous"),
            CrlError::Rollback { .. } => Some("rollback"),
            CrlError::Withdrawn { .. } => Some("withdrawn"),
        }
    }
}

/// One CRL, parsed for webpki and described for people.
pub struct Crl {
    pub file: PathBuf,
    pub crl: CertRevocationList<'static>,
    /// The issuer's name, for logs.
    pub issuer: String,
    /// The cRLNumber extension; None for a CRL without one (v1).
    pub number: Option<BigUint>,
    /// thisUpdate, seconds since the epoch.
    pub this_update: i64,
    /// nextUpdate, seconds since the epoch; None when the CRL has none.
    pub next_update: Option<i64>,
    /// Which certificates it speaks for (its issuing distribution point).
    pub scope: Scope,
    /// The authority key identifier: which of the issuer's keys signed it.
    pub authority_key_id: Option<Vec<u8>>,
    /// SHA-256 of the DER: two CRLs are the same only if this is.
    pub digest: [u8; 32],
}

/// The certificates a CRL covers, as its issuing distribution point limits
/// them (RFC 5280 5.2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scope {
    #[default]
    All,
    /// onlyContainsUserCerts: leaves only.
    Leaves,
    /// onlyContainsCACerts: CA certificates only.
    Cas,
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Scope::All => "all certificates",
            Scope::Leaves => "leaf certificates only",
            Scope::Cas => "CA certificates only",
        })
    }
}

impl Scope {
    /// Whether the CRL speaks for a certificate that is a CA (`true`) or a
    /// leaf (`false`).
    pub fn covers(self, ca: bool) -> bool {
        match self {
            Scope::All => true,
            Scope::Leaves => !ca,
            Scope::Cas => ca,
        }
    }
}

impl AsRef<Crl> for Crl {
    fn as_ref(&self) -> &Crl {
        self
    }
}

impl Crl {
    /// Whether, at `now` (seconds since the epoch), the CRL is past its
    /// nextUpdate: its issuer may have revoked more since.
    pub fn is_stale(&self, now: i64) -> bool {
        self.next_update.is_some_and(|next| next <= now)
    }

    fn number_text(&self) -> String {
        number_text(self.number.as_ref(), self.this_update)
    }

    /// Which is newer than a CRL of the same place signed with `key`: with
    /// one key, by CRL number when both have one, else by thisUpdate. An
    /// issuer that re-keys may number the new key's CRLs from 1 again, so
    /// across keys thisUpdate (when it was signed) decides, and the number
    /// only breaks a tie.
    fn age_against(&self, key: &Key, number: Option<&BigUint>, this_update: i64) -> Ordering {
        let by_number = match (&self.number, number) {
            (Some(a), Some(b)) => Some(a.cmp(b)),
            _ => None,
        };
        let by_time = self.this_update.cmp(&this_update);
        if self.authority_key_id == *key {
            by_number.unwrap_or(by_time)
        } else {
            by_time.then(by_number.unwrap_or(Ordering::Equal))
        }
    }

    /// One issuer's place for CRLs: the issuer and the scope (issuing
    /// distribution point), as webpki picks among them.
    fn same_scope(&self, other: &Crl) -> bool {
        self.crl.issuer() == other.crl.issuer()
            && self.crl.issuing_distribution_point() == other.crl.issuing_distribution_point()
    }
}

fn number_text(number: Option<&BigUint>, this_update: i64) -> String {
    match number {
        Some(n) => format!("#{n}"),
        None => format!("without a CRL number (thisUpdate {this_update})"),
    }
}

fn parse(path: &Path, der: &CertificateRevocationListDer<'_>) -> Result<Crl, CertError> {
    let bad = |reason: String| CertError::BadCrl {
        path: path.to_owned(),
        reason,
    };
    let owned = OwnedCertRevocationList::from_der(der).map_err(|e| bad(format!("{e:?}")))?;
    let (_, meta) = CertificateRevocationList::from_der(der).map_err(|e| bad(e.to_string()))?;
    let mut scope = Scope::All;
    let mut authority_key_id = None;
    for ext in meta.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::IssuingDistributionPoint(idp) => {
                scope = match (idp.only_contains_user_certs, idp.only_contains_ca_certs) {
                    (true, _) => Scope::Leaves,
                    (_, true) => Scope::Cas,
                    _ => Scope::All,
                };
            }
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                authority_key_id = aki.key_identifier.as_ref().map(|k| k.0.to_vec());
            }
            _ => {}
        }
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, der.as_ref());
    Ok(Crl {
        file: path.to_owned(),
        crl: CertRevocationList::Owned(owned),
        issuer: meta.issuer().to_string(),
        number: meta.crl_number().cloned(),
        this_update: meta.last_update().timestamp(),
        next_update: meta.next_update().map(|t| t.timestamp()),
        scope,
        authority_key_id,
        digest: digest.as_ref().try_into().unwrap_or([0; 32]),
    })
}

/// Every CRL in `paths`, in order.
pub fn load_all(paths: &[PathBuf]) -> Result<Vec<Crl>, CertError> {
    let mut out = Vec::new();
    for path in paths {
        for der in certs::load_crls(path)? {
            out.push(parse(path, &der)?);
        }
    }
    Ok(out)
}

/// The CRLs in `paths`, one per issuer and scope: the highest CRL number
/// (without numbers, the latest thisUpdate) wins; the others are logged and
/// dropped. Two different CRLs in one place refuse the load.
pub fn load(paths: &[PathBuf]) -> Result<Vec<Crl>, CrlError> {
    newest(load_all(paths)?, |loser, winner| {
        tracing::info!(issuer = %loser.issuer, ignored = %loser.file.display(),
            used = %winner.file.display(),
            "ignoring CRL {} of this issuer: CRL {} supersedes it",
            loser.number_text(), winner.number_text());
    })
}

/// Keeps the newest CRL of each issuer and scope, in first-seen order
/// (owned CRLs, or shared ones); `superseded(loser, winner)` hears of each
/// one dropped. Err when two different CRLs claim one place.
pub fn newest<C: AsRef<Crl>>(
    crls: Vec<C>,
    mut superseded: impl FnMut(&Crl, &Crl),
) -> Result<Vec<C>, CrlError> {
    let mut kept: Vec<C> = Vec::new();
    for crl in crls {
        let c = crl.as_ref();
        let Some(kept_one) = kept.iter_mut().find(|k| k.as_ref().same_scope(c)) else {
            kept.push(crl);
            continue;
        };
        let old = kept_one.as_ref();
        match c.age_against(&old.authority_key_id, old.number.as_ref(), old.this_update) {
            // The same CRL twice (one file in two lists): nothing to say.
            Ordering::Equal if c.digest == old.digest => {}
            Ordering::Equal => {
                return Err(CrlError::Ambiguous {
                    issuer: c.issuer.clone(),
                    number: c.number_text(),
                    first: old.file.clone(),
                    second: c.file.clone(),
                });
            }
            Ordering::Less => superseded(c, old),
            Ordering::Greater => {
                superseded(old, c);
                *kept_one = crl;
            }
        }
    }
    Ok(kept)
}

/// One issuer's place for CRLs, as `same_scope` groups them: the issuer
/// and the scope, whichever of the issuer's keys signed the CRL.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Place {
    issuer: Vec<u8>,
    scope: Option<Vec<u8>>,
}

impl Place {
    fn of(c: &Crl) -> Place {
        Place {
            issuer: c.crl.issuer().to_vec(),
            scope: c.crl.issuing_distribution_point().map(<[u8]>::to_vec),
        }
    }
}

/// The newest CRL put into service, per place and issuer key.
#[derive(Debug, Clone)]
struct Mark {
    number: Option<BigUint>,
    this_update: i64,
    digest: [u8; 32],
    file: PathBuf,
}

/// An issuer key (authority key identifier; None when the CRL names none).
type Key = Option<Vec<u8>>;

impl Crl {
    /// Err when this CRL is older than (or, as old, different from) the one
    /// enforced for its place with `key`.
    fn check_against(&self, key: &Key, m: &Mark) -> Result<(), CrlError> {
        let mut enforced = number_text(m.number.as_ref(), m.this_update);
        if *key != self.authority_key_id {
            let key = key.as_deref().map_or_else(|| "unnamed".to_owned(), hex);
            enforced = format!(
                "{enforced} of issuer key {key}, thisUpdate {}",
                m.this_update
            );
        }
        match self.age_against(key, m.number.as_ref(), m.this_update) {
            Ordering::Greater => Ok(()),
            Ordering::Equal if self.digest == m.digest => Ok(()),
            Ordering::Equal => Err(CrlError::Ambiguous {
                issuer: self.issuer.clone(),
                number: enforced,
                first: m.file.clone(),
                second: self.file.clone(),
            }),
            Ordering::Less => Err(CrlError::Rollback {
                issuer: self.issuer.clone(),
                number: self.number_text(),
                file: self.file.clone(),
                enforced,
                enforced_file: m.file.clone(),
            }),
        }
    }
}

/// One bundle's CRLs as a state would put them into service: the files
/// its config names, and the CRLs kept from them (one per place).
#[derive(Clone, Copy)]
pub struct Served<'a> {
    pub files: &'a [PathBuf],
    pub crls: &'a [Arc<Crl>],
}

/// What a configured file filled: a place, named for a log.
#[derive(Debug, Clone)]
struct Filled {
    issuer: String,
    scope: Scope,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The places (issuer and scope) a CRL of `now` fills that no CRL of
/// `target` does, each named for a log: what going to `target` would stop
/// enforcing (the `Withdrawn` rule, applied to a whole state).
pub fn lifted<'a>(
    now: impl IntoIterator<Item = &'a Arc<Crl>>,
    target: impl IntoIterator<Item = &'a Arc<Crl>>,
) -> Vec<String> {
    let kept: HashSet<Place> = target.into_iter().map(|c| Place::of(c)).collect();
    let mut seen = HashSet::new();
    now.into_iter()
        .filter(|c| {
            let place = Place::of(c);
            !kept.contains(&place) && seen.insert(place)
        })
        .map(|c| format!("{} ({})", c.issuer, c.scope))
        .collect()
}

/// The newest CRL this process has put into service for each issuer,
/// scope and issuer key, and the places each configured file filled (see
/// the module's comment). The app checks every state against it before
/// serving with it, and records it once it does.
#[derive(Debug, Default)]
pub struct Enforced {
    marks: Mutex<HashMap<Place, HashMap<Key, Mark>>>,
    filled: Mutex<HashMap<PathBuf, HashMap<Place, Filled>>>,
}

impl Enforced {
    /// Err names the first CRL of `served` that is older than (or, with the
    /// same number, different from) the CRL already enforced in its place,
    /// or the first file a bundle still names that no longer fills a place
    /// it filled.
    pub fn check(&self, served: &[Served<'_>]) -> Result<(), CrlError> {
        self.check_marks(served.iter().flat_map(|b| b.crls.iter().map(|c| &**c)))?;
        let filled = self.filled.lock().unwrap_or_else(|p| p.into_inner());
        for bundle in served {
            let present: HashSet<Place> = bundle.crls.iter().map(|c| Place::of(c)).collect();
            for file in bundle.files {
                let Some(places) = filled.get(file) else {
                    continue;
                };
                if let Some((_, gone)) = places.iter().find(|(p, _)| !present.contains(*p)) {
                    return Err(CrlError::Withdrawn {
                        issuer: gone.issuer.clone(),
                        scope: gone.scope.to_string(),
                        file: file.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    fn check_marks<'a>(&self, crls: impl Iterator<Item = &'a Crl>) -> Result<(), CrlError> {
        let marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        for c in crls {
            let Some(keys) = marks.get(&Place::of(c)) else {
                continue;
            };
            // Every key's mark: the old key's last CRL is older than the
            // new key's first one, whatever their numbers.
            for (key, m) in keys {
                c.check_against(key, m)?;
            }
        }
        Ok(())
    }

    /// Remembers `served` as in service: each CRL where it is newer than
    /// what was, and the places each file fills. A file no bundle names any
    /// more is forgotten; one still named keeps the places it filled before
    /// (`check` saw them all still present).
    pub fn record(&self, served: &[Served<'_>]) {
        let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        for c in served.iter().flat_map(|b| b.crls.iter()) {
            let keys = marks.entry(Place::of(c)).or_default();
            let newer = keys.get(&c.authority_key_id).is_none_or(|m| {
                c.age_against(&c.authority_key_id, m.number.as_ref(), m.this_update)
                    == Ordering::Greater
            });
            if newer {
                keys.insert(
                    c.authority_key_id.clone(),
                    Mark {
                        number: c.number.clone(),
                        this_update: c.this_update,
                        digest: c.digest,
                        file: c.file.clone(),
                    },
                );
            }
        }
        drop(marks);
        let mut filled = self.filled.lock().unwrap_or_else(|p| p.into_inner());
        let named: HashSet<&PathBuf> = served.iter().flat_map(|b| b.files).collect();
        filled.retain(|file, _| named.contains(file));
        for c in served.iter().flat_map(|b| b.crls.iter()) {
            filled.entry(c.file.clone()).or_default().insert(
                Place::of(c),
                Filled {
                    issuer: c.issuer.clone(),
                    scope: c.scope,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Authority;

    fn write(dir: &Path, name: &str, pem: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    }

    /// Two different CRLs of one issuer with one number (or, without
    /// numbers, one thisUpdate): neither can be told to be current, so the
    /// load is refused, naming both files. The same CRL twice is fine.
    #[test]
    fn two_different_crls_in_one_place_refuse_the_load() {
        let dir = tempfile::tempdir().unwrap();
        let a = Authority::root("crl issuer a").unwrap();
        let first = write(dir.path(), "first.pem", &a.crl(5, &[]).unwrap());
        let second = write(dir.path(), "second.pem", &a.crl(5, &[b"\x2a"]).unwrap());
        let again = write(
            dir.path(),
            "again.pem",
            &std::fs::read_to_string(&first).unwrap(),
        );
        assert_eq!(load(&[first.clone(), again]).unwrap().len(), 1);
        for order in [
            [first.clone(), second.clone()],
            [second.clone(), first.clone()],
        ] {
            match load(&order) {
                Err(CrlError::Ambiguous {
                    first: f,
                    second: s,
                    number,
                    ..
                }) => {
                    assert_eq!([f, s], order);
                    assert_eq!(number, "#5");
                }
                other => panic!("{order:?}: {:?}", other.map(|k| k.len())),
            }
        }
    }

    /// The CRLs of one file, as a bundle naming only that file serves them.
    struct One {
        files: Vec<PathBuf>,
        crls: Vec<std::sync::Arc<Crl>>,
    }

    impl One {
        fn load(files: &[PathBuf]) -> One {
            One {
                files: files.to_vec(),
                crls: load(files)
                    .unwrap()
                    .into_iter()
                    .map(std::sync::Arc::new)
                    .collect(),
            }
        }

        fn served(&self) -> [Served<'_>; 1] {
            [Served {
                files: &self.files,
                crls: &self.crls,
            }]
        }
    }

    impl Enforced {
        fn check_one(&self, one: &One) -> Result<(), CrlError> {
            self.check(&one.served())
        }

        fn record_one(&self, one: &One) {
            self.record(&one.served())
        }
    }

    /// A file that filled a place (issuer, scope, key) and, still named,
    /// now holds another issuer's CRL is refused, naming the file and the
    /// issuer; the same file no longer named is forgotten, so naming it
    /// again with other contents is taken. A newer CRL in the place, even
    /// from another file of the bundle, keeps it filled.
    #[test]
    fn a_named_file_that_no_longer_fills_its_place_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = Authority::root("withdrawn root").unwrap();
        let int = root.intermediate("withdrawn intermediate").unwrap();
        let int_crl = write(dir.path(), "int.pem", &int.crl(1, &[]).unwrap());
        let root_crl = write(dir.path(), "root.pem", &root.crl(1, &[]).unwrap());
        let both = [int_crl.clone(), root_crl.clone()];
        let enforced = Enforced::default();
        enforced.record_one(&One::load(&both));

        let int_pem = std::fs::read_to_string(&int_crl).unwrap();
        write(dir.path(), "root.pem", &int_pem);
        match enforced.check_one(&One::load(&both)) {
            Err(e @ CrlError::Withdrawn { .. }) => {
                let CrlError::Withdrawn { issuer, file, .. } = &e else {
                    unreachable!()
                };
                assert_eq!(file, &root_crl);
                assert!(issuer.contains("withdrawn root"), "{issuer}");
                assert_eq!(e.label(), Some("withdrawn"));
            }
            other => panic!("{other:?}"),
        }

        // The root's newer CRL from another file of the bundle: filled.
        let newer = write(dir.path(), "newer.pem", &root.crl(2, &[]).unwrap());
        let moved = [int_crl.clone(), root_crl.clone(), newer];
        enforced.check_one(&One::load(&moved)).unwrap();

        // Dropped from the config on purpose, then named again.
        let int_only = One::load(std::slice::from_ref(&int_crl));
        enforced.check_one(&int_only).unwrap();
        enforced.record_one(&int_only);
        let again = One::load(&both);
        enforced.check_one(&again).unwrap();
    }

    /// The CRLs of one file, after a tweak of the parsed CRLs.
    fn one_with(files: &[PathBuf], tweak: impl Fn(&mut Crl)) -> One {
        let crls = load(files)
            .unwrap()
            .into_iter()
            .map(|mut c| {
                tweak(&mut c);
                std::sync::Arc::new(c)
            })
            .collect();
        One {
            files: files.to_vec(),
            crls,
        }
    }

    /// An issuer that re-keys under the same name keeps its place: the
    /// file holding the new key's CRL, alone or beside the old key's, is
    /// taken (the place is the issuer and scope, not the key). The old
    /// key's CRL handed back after the new key's was enforced is refused,
    /// whatever its number, as is another issuer's CRL in the file.
    #[test]
    fn an_issuer_that_re_keys_keeps_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let old_key = Authority::root("re-keyed root").unwrap();
        let new_key = Authority::root("re-keyed root").unwrap();
        let other = Authority::root("another root").unwrap();
        let file = dir.path().join("root.pem");
        let files = [file.clone()];
        let hold = |pem: String| {
            std::fs::write(&file, pem).unwrap();
            One::load(&files)
        };
        let enforced = Enforced::default();
        let old1 = old_key.crl(1, &[]).unwrap();
        enforced.record_one(&hold(old1.clone()));

        let new2 = hold(new_key.crl(2, &[]).unwrap());
        enforced.check_one(&new2).unwrap();
        enforced.record_one(&new2);

        let both = hold(format!("{old1}{}", new_key.crl(3, &[b"\x07"]).unwrap()));
        assert_eq!(both.crls.len(), 1);
        assert_eq!(both.crls[0].number, Some(3u8.into()));
        enforced.check_one(&both).unwrap();
        enforced.record_one(&both);

        // The old key's last CRL again: signed before the new key's.
        match enforced.check_one(&hold(old1.clone())) {
            Err(CrlError::Rollback {
                number, enforced, ..
            }) => {
                assert_eq!(number, "#1");
                assert!(enforced.starts_with("#3 of issuer key "), "{enforced}");
            }
            other => panic!("{other:?}"),
        }
        // Signed earlier with a higher number: still older.
        std::fs::write(&file, old_key.crl(9, &[]).unwrap()).unwrap();
        let old9 = one_with(&files, |c| c.this_update -= 3600);
        assert!(matches!(
            enforced.check_one(&old9),
            Err(CrlError::Rollback { .. })
        ));
        // Another issuer's CRL in the file: withdrawn, whatever its key.
        assert!(matches!(
            enforced.check_one(&hold(other.crl(50, &[]).unwrap())),
            Err(CrlError::Withdrawn { .. })
        ));
    }

    /// A new key may number its CRLs from 1 again: across keys, the CRL
    /// signed later is the newer, both when picking one of a file's CRLs
    /// and against the memory.
    #[test]
    fn a_new_key_may_number_its_crls_from_one_again() {
        let dir = tempfile::tempdir().unwrap();
        let old_key = Authority::root("renumbered root").unwrap();
        let new_key = Authority::root("renumbered root").unwrap();
        let file = dir.path().join("root.pem");
        let files = [file.clone()];
        let enforced = Enforced::default();
        std::fs::write(&file, old_key.crl(5, &[]).unwrap()).unwrap();
        let old5 = one_with(&files, |c| c.this_update -= 3600);
        enforced.record_one(&old5);

        std::fs::write(&file, new_key.crl(1, &[]).unwrap()).unwrap();
        let new1 = One::load(&files);
        enforced.check_one(&new1).unwrap();
        enforced.record_one(&new1);

        // Both in one file: the new key's #1 is kept, signed later than #5.
        let old_pem = old_key.crl(5, &[]).unwrap();
        let new_pem = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, format!("{old_pem}{new_pem}")).unwrap();
        let mut parsed = load_all(&files).unwrap();
        parsed[0].this_update -= 3600;
        let kept = newest(parsed, |_, _| {}).unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].number, Some(1u8.into()));
        // And the new key's own numbers still order its CRLs.
        std::fs::write(&file, new_key.crl(2, &[]).unwrap()).unwrap();
        enforced.check_one(&One::load(&files)).unwrap();
    }

    /// A CRL older than one already in service in this process is refused;
    /// one of another issuer, or a newer one, passes; a CRL with the
    /// enforced number but other contents is ambiguous.
    #[test]
    fn an_older_crl_than_one_enforced_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = Authority::root("crl issuer a").unwrap();
        let b = Authority::root("crl issuer b").unwrap();
        let load1 = |name: &str, pem: String| One::load(&[write(dir.path(), name, &pem)]);
        let enforced = Enforced::default();
        let a7 = load1("a7.pem", a.crl(7, &[b"\x01"]).unwrap());
        enforced.check_one(&a7).unwrap();
        enforced.record_one(&a7);
        let a3 = load1("a3.pem", a.crl(3, &[]).unwrap());
        match enforced.check_one(&a3) {
            Err(CrlError::Rollback {
                number,
                enforced,
                file,
                enforced_file,
                ..
            }) => {
                assert_eq!((number.as_str(), enforced.as_str()), ("#3", "#7"));
                assert!(file.ends_with("a3.pem") && enforced_file.ends_with("a7.pem"));
            }
            other => panic!("{other:?}"),
        }
        let other_a7 = load1("other-a7.pem", a.crl(7, &[]).unwrap());
        assert!(matches!(
            enforced.check_one(&other_a7),
            Err(CrlError::Ambiguous { .. })
        ));
        enforced.check_one(&a7).unwrap();
        enforced
            .check_one(&load1("b1.pem", b.crl(1, &[]).unwrap()))
            .unwrap();
        let a8 = load1("a8.pem", a.crl(8, &[]).unwrap());
        enforced.check_one(&a8).unwrap();
        enforced.record_one(&a8);
        assert!(enforced.check_one(&a7).is_err(), "#8 is the mark now");
        // Recording an older one changes nothing.
        enforced.record_one(&a3);
        assert!(enforced.check_one(&a7).is_err());
    }

    #[test]
    fn the_highest_crl_number_of_each_issuer_wins_whatever_the_order() {
        let dir = tempfile::tempdir().unwrap();
        let a = Authority::root("crl issuer a").unwrap();
        let b = Authority::root("crl issuer b").unwrap();
        let a7 = write(dir.path(), "a7.pem", &a.crl(7, &[b"\x01"]).unwrap());
        let a3 = write(dir.path(), "a3.pem", &a.crl(3, &[]).unwrap());
        let b1 = write(dir.path(), "b1.pem", &b.crl(1, &[]).unwrap());
        let a12 = write(dir.path(), "a12.pem", &a.crl(12, &[]).unwrap());
        for order in [
            vec![a7.clone(), a3.clone(), b1.clone(), a12.clone()],
            vec![a12.clone(), b1.clone(), a3.clone(), a7.clone()],
        ] {
            let kept = load(&order).unwrap();
            let mut files: Vec<_> = kept.iter().map(|c| c.file.clone()).collect();
            files.sort();
            let mut want = vec![a12.clone(), b1.clone()];
            want.sort();
            assert_eq!(files, want, "{order:?}");
        }
        // Numbers compare as numbers, not as text or bytes: 300 > 12.
        let a300 = write(dir.path(), "a300.pem", &a.crl(300, &[]).unwrap());
        let kept = load(&[a300.clone(), a12]).unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].file, a300);
    }
}

//! A reload's preview, and the reload guard that reads the same dry run.
//!
//! A preview is the real reload path stopped before the swap: the app
//! builds the candidate state, checks its CRLs against those in service,
//! and has the registry judge every live connection against it
//! (`Registry::dry_run`), closing nothing. A real reload makes that same
//! dry run before it binds or swaps anything, and the guard
//! (`max_reload_closes`) decides on it; the reload then applies it.
//!
//! The guard counts, per listener, the connections the dry run would
//! close for anything but revocation. Revocation is never held back: a
//! reload that brings a CRL not in service now is not guarded at all, and
//! a close whose cause is the chain's revocation check (revoked, or no
//! usable CRL) is not counted.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::config::Mode;
use crate::registry::{Affected, DryRun};

/// What `POST /reload/preview` answers and `gateway check --against`
/// prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preview {
    /// The candidate config file, as the gateway read it.
    pub config: String,
    /// Why the reload would be refused whole before the guard (a CRL
    /// older than the one in service); None: it would not.
    pub refused: Option<String>,
    /// Live connections the reload would close.
    pub would_close: Vec<Affected>,
    /// Live connections whose listener the reload removes: kept, they
    /// drain and close after drain_timeout.
    pub orphaned: Vec<Affected>,
    /// Routes that appear, disappear or change mode.
    pub routes: Vec<RouteChange>,
    /// Clients of the audit report (within `since`) the candidate's
    /// enforcing routes would refuse.
    pub seen_refused: Vec<SeenRefused>,
    pub since_seconds: Option<u64>,
    /// What the reload guard would say.
    pub guard: GuardCheck,
}

/// One route's change between the running state and the candidate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteChange {
    pub listener: String,
    pub route: String,
    /// "added", "removed" or "mode".
    pub change: String,
    /// Its mode now (None: it does not exist now).
    pub from: Option<String>,
    /// Its mode in the candidate (None: it does not exist there).
    pub to: Option<String>,
}

/// A client the audit report saw that the candidate would refuse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenRefused {
    pub listener: String,
    pub route: String,
    /// The identity as the report has it; None: no certificate.
    pub identity: Option<String>,
    /// The /24 or /64 it came from.
    pub source: String,
    pub connections: u64,
    pub last_seen: String,
    pub reason: String,
}

/// The reload guard's judgement of one dry run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardCheck {
    /// `max_reload_closes` of the serving config; None: no guard.
    pub limit: Option<usize>,
    /// Why the guard does not apply (revocation); None: it does.
    pub exempt: Option<String>,
    /// Per listener, the closes it counts (not revocation).
    pub counted: BTreeMap<String, usize>,
    /// The listeners over the limit: the reload would be refused unless
    /// forced.
    pub over: Vec<String>,
    /// Per listener over the limit, whose connections it counted (most
    /// first): an identity the reload removes can hold it back by keeping
    /// connections open, and the operator who sees that forces it.
    #[serde(default)]
    pub holders: BTreeMap<String, Vec<Holder>>,
}

/// An identity (or "no certificate") and how many of the counted closes
/// are its connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub identity: String,
    pub connections: usize,
}

/// How many identities a refusal names per listener.
const HOLDERS_NAMED: usize = 10;

impl GuardCheck {
    /// The guard's rule: see the module's comment.
    pub fn judge(limit: Option<usize>, closes: &[Affected], brings_crl: bool) -> GuardCheck {
        let mut counted = BTreeMap::new();
        for c in closes.iter().filter(|c| !c.revoked) {
            *counted.entry(c.listener.clone()).or_insert(0) += 1;
        }
        let exempt = brings_crl.then(|| {
            "the reload brings a CRL not in service now: revocation is never held back".to_owned()
        });
        let over = match (limit, &exempt) {
            (Some(n), None) => counted
                .iter()
                .filter(|&(_, &c)| c > n)
                .map(|(l, _)| l.clone())
                .collect(),
            _ => Vec::new(),
        };
        let holders = over
            .iter()
            .map(|l| {
                let mut by: BTreeMap<String, usize> = BTreeMap::new();
                for c in closes.iter().filter(|c| !c.revoked && &c.listener == l) {
                    let who = c.identity.as_ref().map_or_else(
                        || "no certificate".to_owned(),
                        |n| crate::identity::joined(n),
                    );
                    *by.entry(who).or_insert(0) += 1;
                }
                let mut v: Vec<Holder> = by
                    .into_iter()
                    .map(|(identity, connections)| Holder {
                        identity,
                        connections,
                    })
                    .collect();
                v.sort_by_key(|h| std::cmp::Reverse(h.connections));
                (l.clone(), v)
            })
            .collect();
        GuardCheck {
            limit,
            exempt,
            counted,
            over,
            holders,
        }
    }

    /// The reload would be refused unless forced.
    pub fn holds(&self) -> bool {
        !self.over.is_empty()
    }

    /// Why it holds the reload, for the log and the refusal.
    pub fn refusal(&self) -> String {
        let per: Vec<String> = self
            .over
            .iter()
            .map(|l| {
                let holders = self.holders.get(l).map(Vec::as_slice).unwrap_or_default();
                let mut named: Vec<String> = holders
                    .iter()
                    .take(HOLDERS_NAMED)
                    .map(|h| format!("{} x{}", h.identity, h.connections))
                    .collect();
                if holders.len() > HOLDERS_NAMED {
                    named.push(format!("{} more identities", holders.len() - HOLDERS_NAMED));
                }
                format!(
                    "{l}: {} [{}]",
                    self.counted.get(l).copied().unwrap_or(0),
                    named.join("; ")
                )
            })
            .collect();
        format!(
            "the reload would close more than max_reload_closes ({}) live connections on a listener ({}); preview it with `gateway check --against`, or force it",
            self.limit.unwrap_or(0),
            per.join(", ")
        )
    }
}

/// The marker that forces the next SIGHUP reload over the guard, in the
/// admin socket's directory (root's or the gateway's user's, writable by
/// no one else: `safe_dir`): `touch /run/gateway/reload.force; kill -HUP`.
pub const FORCE_MARKER: &str = "reload.force";

/// How fresh the force marker must be: one left behind by an earlier
/// attempt (a SIGHUP that never came, a reload refused for another
/// reason) must not force an unrelated later one.
pub const FORCE_MARKER_FRESH: std::time::Duration = std::time::Duration::from_secs(60);

/// Consumes the force marker at `marker`: Ok(true) when it was there and
/// is taken (removed, so it forces one reload only), Ok(false) when there
/// is none. Err (the reload then goes unforced, the marker left alone)
/// when it cannot be trusted: its directory others may write, a symbolic
/// link or anything but a plain file, another user's than root's or the
/// gateway's, or it cannot be removed. A stale marker (written more than
/// `FORCE_MARKER_FRESH` ago, or in the future) is removed and is Err too.
pub fn take_force_marker(marker: &std::path::Path) -> Result<bool, String> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = match std::fs::symlink_metadata(marker) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(format!("{}: {e}", marker.display())),
    };
    let at = marker.display();
    crate::safe_dir::check_parent_of(marker).map_err(|why| format!("{at}: {why}"))?;
    if !meta.file_type().is_file() {
        return Err(format!("{at}: not a plain file"));
    }
    if meta.uid() != 0 && meta.uid() != crate::safe_dir::euid() {
        return Err(format!("{at}: belongs to uid {}", meta.uid()));
    }
    std::fs::remove_file(marker).map_err(|e| format!("{at}: cannot remove it: {e}"))?;
    // A file's time may read a hair ahead of the clock (coarse
    // timestamps): that is fresh, not the future.
    let age =
        meta.modified()
            .ok()
            .and_then(|m| match std::time::SystemTime::now().duration_since(m) {
                Ok(age) => Some(age),
                Err(e) if e.duration() < std::time::Duration::from_secs(2) => {
                    Some(Default::default())
                }
                Err(_) => None,
            });
    match age {
        Some(age) if age <= FORCE_MARKER_FRESH => Ok(true),
        Some(age) => Err(format!(
            "{at}: stale (written {}s ago, more than {}s): removed, not honoured",
            age.as_secs(),
            FORCE_MARKER_FRESH.as_secs()
        )),
        None => Err(format!(
            "{at}: its time is unknown or in the future: removed, not honoured"
        )),
    }
}

/// Routes (listener, route, mode) that appear, disappear or change mode
/// from `now` to `candidate`.
pub fn route_changes(
    now: &[(String, String, Mode)],
    candidate: &[(String, String, Mode)],
) -> Vec<RouteChange> {
    let index = |v: &[(String, String, Mode)]| -> BTreeMap<(String, String), Mode> {
        v.iter()
            .map(|(l, r, m)| ((l.clone(), r.clone()), *m))
            .collect()
    };
    let (now, candidate) = (index(now), index(candidate));
    let keys: BTreeSet<&(String, String)> = now.keys().chain(candidate.keys()).collect();
    keys.into_iter()
        .filter_map(|k| {
            let (from, to) = (now.get(k), candidate.get(k));
            let change = match (from, to) {
                (None, Some(_)) => "added",
                (Some(_), None) => "removed",
                (Some(a), Some(b)) if a != b => "mode",
                _ => return None,
            };
            Some(RouteChange {
                listener: k.0.clone(),
                route: k.1.clone(),
                change: change.to_owned(),
                from: from.map(|m| m.as_str().to_owned()),
                to: to.map(|m| m.as_str().to_owned()),
            })
        })
        .collect()
}

impl Preview {
    /// The preview of a dry run against the candidate read from `config`.
    pub fn new(config: String, dry: Option<&DryRun>) -> Preview {
        Preview {
            config,
            refused: None,
            would_close: dry.map(DryRun::closes).unwrap_or_default(),
            orphaned: dry.map(DryRun::orphans).unwrap_or_default(),
            routes: Vec::new(),
            seen_refused: Vec::new(),
            since_seconds: None,
            guard: GuardCheck::judge(None, &[], false),
        }
    }

    /// The answer in words, for a terminal.
    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(out, "preview of a reload to {}", self.config);
        if let Some(why) = &self.refused {
            let _ = writeln!(out, "the reload would be REFUSED: {why}");
        }
        let _ = writeln!(
            out,
            "live connections it would close: {}",
            self.would_close.len()
        );
        for c in &self.would_close {
            let _ = writeln!(out, "  {}", affected(c));
        }
        if !self.orphaned.is_empty() {
            let _ = writeln!(
                out,
                "live connections whose listener it removes (they drain): {}",
                self.orphaned.len()
            );
            for c in &self.orphaned {
                let _ = writeln!(out, "  {}", affected(c));
            }
        }
        if self.routes.is_empty() {
            let _ = writeln!(out, "routes: no route appears, disappears or changes mode");
        } else {
            let _ = writeln!(out, "routes:");
            for r in &self.routes {
                let what = match (r.from.as_deref(), r.to.as_deref()) {
                    (None, Some(to)) => format!("added ({to})"),
                    (Some(from), None) => format!("removed (was {from})"),
                    (Some(from), Some(to)) => format!("mode {from} -> {to}"),
                    (None, None) => String::new(),
                };
                let _ = writeln!(out, "  {}/{}: {what}", r.listener, r.route);
            }
        }
        let window = match self.since_seconds {
            Some(s) => format!(
                "in the last {}",
                crate::rollout::humantime(std::time::Duration::from_secs(s))
            ),
            None => "in the audit report".to_owned(),
        };
        let _ = writeln!(
            out,
            "clients seen {window} it would refuse: {}",
            self.seen_refused.len()
        );
        for s in &self.seen_refused {
            let _ = writeln!(
                out,
                "  {}/{}: {} from {} ({} connections, last {}): {}",
                s.listener,
                s.route,
                s.identity.as_deref().unwrap_or("no certificate"),
                s.source,
                s.connections,
                s.last_seen,
                s.reason
            );
        }
        let guard = match (&self.guard.limit, &self.guard.exempt) {
            (None, _) => "reload guard: off (no max_reload_closes)".to_owned(),
            (Some(_), Some(why)) => format!("reload guard: does not apply: {why}"),
            (Some(_), None) if self.guard.holds() => {
                format!("reload guard: would REFUSE: {}", self.guard.refusal())
            }
            (Some(n), None) => format!("reload guard: within max_reload_closes ({n})"),
        };
        let _ = writeln!(out, "{guard}");
        out
    }
}

/// The certificate problems the audit report records by name: a client
/// refused for one is refused by an enforcing route whatever its policy.
const CERTIFICATE_PROBLEMS: [&str; 4] = ["unknown_ca", "expired", "revoked", "bad_certificate"];

/// The audit report's clients (within `since`) of the routes `candidate`
/// enforces, that those routes would refuse. The report keeps names, not
/// certificates: a client is judged by the candidate route's policy on
/// its names (its common name only when it had no other name) from the
/// first address of its /24 or /64, now; one the report saw refused for
/// its certificate stays refused, as the chain is not checked again here.
pub fn seen_refused(
    audit: &crate::rollout::Audit,
    candidate: &crate::registry::Listeners,
    since: Option<std::time::Duration>,
) -> Vec<SeenRefused> {
    let mut out = Vec::new();
    let now = jiff::Timestamp::now();
    for l in candidate.values() {
        for r in l.routes.iter().filter(|r| r.mode() == Mode::Enforce) {
            for c in audit.clients(&l.name, &r.name, since) {
                let reason = match (&c.identity, &c.reason) {
                    (None, _) => Some("no certificate, and the route enforces".to_owned()),
                    (Some(_), Some(why)) if CERTIFICATE_PROBLEMS.contains(&why.as_str()) => {
                        Some(format!("its certificate was refused ({why})"))
                    }
                    (Some(names), _) => match r.auth.policy.decide(crate::policy::Subject {
                        identity: &identity_of(names),
                        source: c.source.network(),
                        now,
                    }) {
                        crate::policy::Verdict::Deny(why) => Some(why.to_string()),
                        crate::policy::Verdict::Allow { .. } => None,
                    },
                };
                if let Some(reason) = reason {
                    out.push(SeenRefused {
                        listener: l.name.clone(),
                        route: r.name.clone(),
                        identity: c.identity,
                        source: c.source.to_string(),
                        connections: c.count,
                        last_seen: c.last_seen,
                        reason,
                    });
                }
            }
        }
    }
    out.sort_by(|a, b| {
        (&a.listener, &a.route, b.connections, &a.identity).cmp(&(
            &b.listener,
            &b.route,
            a.connections,
            &b.identity,
        ))
    });
    out
}

/// An identity from the names the report spells it with (`Identity::names`
/// joined by commas): URIs as they are, `dns:`, `email:`, and `cn:`
/// (written only when there was no other name). A piece with no scheme
/// is the rest of a URI that held a comma.
fn identity_of(names: &str) -> crate::identity::Identity {
    use crate::identity::{CommonName, Identity};
    let mut pieces: Vec<String> = Vec::new();
    for piece in names.split(',') {
        match pieces.last_mut() {
            Some(last) if !piece.contains(':') => {
                last.push(',');
                last.push_str(piece);
            }
            _ => pieces.push(piece.to_owned()),
        }
    }
    let mut id = Identity::default();
    for n in pieces {
        if let Some(d) = n.strip_prefix("dns:") {
            id.dns.push(d.to_owned());
        } else if let Some(e) = n.strip_prefix("email:") {
            id.emails.push(e.to_owned());
        } else if let Some(cn) = n.strip_prefix("cn:") {
            id.common_name = CommonName::One(cn.to_owned());
        } else {
            id.uris.push(n);
        }
    }
    id
}

fn affected(c: &Affected) -> String {
    let who = match &c.identity {
        Some(names) => crate::identity::joined(names),
        None => "no certificate".to_owned(),
    };
    format!(
        "{}/{} {who} from {} (age {}s): {}",
        c.listener, c.route, c.source, c.age_seconds, c.reason
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(listener: &str, revoked: bool) -> Affected {
        Affected {
            listener: listener.into(),
            route: "r".into(),
            identity: None,
            source: "127.0.0.1:1".into(),
            age_seconds: 0,
            reason: "x".into(),
            revoked,
        }
    }

    #[test]
    fn the_guard_counts_per_listener_and_never_holds_revocation() {
        let closes = [
            close("a", false),
            close("a", false),
            close("a", true),
            close("b", false),
        ];
        // Off: nothing holds.
        assert!(!GuardCheck::judge(None, &closes, false).holds());
        // Per listener: a has 2 counted (its revoked one is not), b 1.
        let g = GuardCheck::judge(Some(1), &closes, false);
        assert_eq!(g.over, vec!["a".to_owned()]);
        assert_eq!(g.counted.get("a"), Some(&2));
        assert!(g.refusal().contains("a: 2"), "{}", g.refusal());
        assert!(!GuardCheck::judge(Some(2), &closes, false).holds());
        // Only revocation closes: within any limit.
        assert!(!GuardCheck::judge(Some(0), &[close("a", true)], false).holds());
        // A new CRL: never held, whatever else it closes.
        let g = GuardCheck::judge(Some(0), &closes, true);
        assert!(!g.holds());
        assert!(g.exempt.is_some());
    }

    #[test]
    fn a_refusal_names_whose_connections_hold_the_reload() {
        let who = |id: &str| Affected {
            identity: Some(vec![id.to_owned()]),
            ..close("edge", false)
        };
        let closes = [
            who("spiffe://x/b"),
            who("spiffe://x/a"),
            who("spiffe://x/a"),
            close("edge", false),
        ];
        let g = GuardCheck::judge(Some(2), &closes, false);
        assert!(g.holds());
        let names: Vec<(&str, usize)> = g.holders["edge"]
            .iter()
            .map(|h| (h.identity.as_str(), h.connections))
            .collect();
        assert_eq!(
            names,
            vec![
                ("spiffe://x/a", 2),
                ("no certificate", 1),
                ("spiffe://x/b", 1)
            ]
        );
        let why = g.refusal();
        assert!(
            why.contains("edge: 4 [spiffe://x/a x2; no certificate x1; spiffe://x/b x1]"),
            "{why}"
        );
    }

    #[test]
    fn the_force_marker_forces_once_and_only_as_a_plain_file() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        let marker = dir.path().join(FORCE_MARKER);
        assert_eq!(take_force_marker(&marker), Ok(false));
        std::fs::write(&marker, "").expect("touch");
        assert_eq!(take_force_marker(&marker), Ok(true));
        // Consumed: the next reload is not forced.
        assert!(!marker.exists());
        assert_eq!(take_force_marker(&marker), Ok(false));
        // A symlink is never taken (nor followed), and stays.
        std::os::unix::fs::symlink("/etc/passwd", &marker).expect("symlink");
        assert!(take_force_marker(&marker).is_err());
        assert!(marker.symlink_metadata().is_ok());
        std::fs::remove_file(&marker).expect("rm");
        // A directory others may write: not trusted.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        std::fs::write(&marker, "").expect("touch");
        let err = take_force_marker(&marker).expect_err("world-writable dir");
        assert!(err.contains("writable"), "{err}");
        assert!(marker.exists());
    }

    #[test]
    fn a_stale_force_marker_is_removed_and_not_honoured() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        let marker = dir.path().join(FORCE_MARKER);
        let old = std::time::SystemTime::now() - FORCE_MARKER_FRESH * 2;
        std::fs::File::create(&marker)
            .and_then(|f| f.set_modified(old))
            .expect("an old marker");
        let err = take_force_marker(&marker).expect_err("stale");
        assert!(err.contains("stale"), "{err}");
        assert!(!marker.exists(), "a stale marker is removed");
        // One from the future is not fresh either.
        let later = std::time::SystemTime::now() + FORCE_MARKER_FRESH;
        std::fs::File::create(&marker)
            .and_then(|f| f.set_modified(later))
            .expect("a future marker");
        assert!(take_force_marker(&marker).is_err());
        assert!(!marker.exists());
    }

    #[test]
    fn an_identity_reads_back_from_its_names() {
        let id = identity_of("spiffe://example.org/a,b,dns:b.example,email:c@d.example");
        assert_eq!(id.uris, vec!["spiffe://example.org/a,b".to_owned()]);
        assert_eq!(id.dns, vec!["b.example".to_owned()]);
        assert_eq!(id.emails, vec!["c@d.example".to_owned()]);
        assert_eq!(
            identity_of("cn:x").common_name,
            crate::identity::CommonName::One("x".into())
        );
    }

    #[test]
    fn route_changes_name_what_appears_disappears_and_changes_mode() {
        let now = [
            ("l".into(), "a".into(), Mode::Audit),
            ("l".into(), "b".into(), Mode::Enforce),
            ("l".into(), "c".into(), Mode::Enforce),
        ];
        let candidate = [
            ("l".into(), "a".into(), Mode::Enforce),
            ("l".into(), "c".into(), Mode::Enforce),
            ("m".into(), "d".into(), Mode::Off),
        ];
        let changes: Vec<(String, String, Option<String>, Option<String>)> =
            route_changes(&now, &candidate)
                .into_iter()
                .map(|c| (c.route, c.change, c.from, c.to))
                .collect();
        let s = |v: &str| Some(v.to_owned());
        assert_eq!(
            changes,
            vec![
                ("a".into(), "mode".into(), s("audit"), s("enforce")),
                ("b".into(), "removed".into(), s("enforce"), None),
                ("d".into(), "added".into(), None, s("off")),
            ]
        );
    }
}

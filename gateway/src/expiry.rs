//! When things run out: every certificate and CRL the config names, with the
//! moment it stops being good. `gateway check` warns and fails on horizons,
//! the running gateway logs warnings and exports seconds-to-expiry, and
//! [`Watched`] holds the serving state's for `GET /readyz?strict` and the
//! audit report, with the routes each one stops when it runs out.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::{Config, CrlExpired};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A certificate's notAfter.
    Certificate,
    /// A CRL's nextUpdate: after it, the CRL is stale, and the bundle's
    /// `crl_expired` says what that does.
    Crl(CrlExpired),
}

#[derive(Debug, Clone)]
pub struct Expiry {
    pub kind: Kind,
    /// What the file is for, e.g. "listener edge cert".
    pub role: String,
    pub file: PathBuf,
    pub subject: String,
    /// Seconds since the epoch.
    pub at: i64,
    /// Since when it is good (notBefore, thisUpdate): with `at`, its
    /// lifetime, which narrows its warning window (see [`warns_at`]).
    pub valid_from: i64,
    /// The routes (listener, route) that stop serving, or refuse every
    /// client, when it runs out: a listener's certificate all of the
    /// listener's, a client CA or CRL the routes that verify with it.
    pub routes: Vec<(String, String)>,
}

impl Expiry {
    pub fn seconds_left(&self, now: i64) -> i64 {
        self.at - now
    }

    /// Whether running out stops clients: every certificate does, a CRL
    /// unless its bundle says `crl_expired = "warn"`.
    pub fn fails_closed(&self) -> bool {
        self.kind != Kind::Crl(CrlExpired::Warn)
    }
}

/// Every certificate the config names, and every CRL a bundle enforces
/// (for each issuer the newest, as the bundles pick them: see
/// `tls::crl`); files that do not parse are skipped (loading the state
/// reports those).
pub fn collect(config: &Config) -> Vec<Expiry> {
    let mut out = Vec::new();
    let route = |l: &str, r: &str| (l.to_owned(), r.to_owned());
    for l in &config.listeners {
        let all: Vec<_> = l.routes.iter().map(|r| route(&l.name, &r.name)).collect();
        // The listener's client CA verifies the routes without a bundle of
        // their own.
        let own_ca: Vec<_> = l
            .routes
            .iter()
            .filter(|r| r.trust.is_none() && r.device.is_none())
            .map(|r| route(&l.name, &r.name))
            .collect();
        let from = out.len();
        certs(
            &mut out,
            &format!("listener {} cert", l.name),
            &config.resolve(&l.cert),
        );
        scope(&mut out, from, &all);
        let from = out.len();
        certs(
            &mut out,
            &format!("listener {} client_ca", l.name),
            &config.resolve(&l.client_ca),
        );
        crls(
            &mut out,
            &format!("listener {} crl", l.name),
            &l.crls.iter().map(|c| config.resolve(c)).collect::<Vec<_>>(),
            l.crl_expired,
        );
        scope(&mut out, from, &own_ca);
        // When one of these lapses, every backend of the route fails.
        for r in &l.routes {
            let Some(u) = &r.upstream_tls else { continue };
            let from = out.len();
            certs(
                &mut out,
                &format!("route {} upstream_tls ca", r.name),
                &config.resolve(&u.ca),
            );
            if let Some(cert) = &u.cert {
                certs(
                    &mut out,
                    &format!("route {} upstream_tls cert", r.name),
                    &config.resolve(cert),
                );
            }
            scope(&mut out, from, &[route(&l.name, &r.name)]);
        }
    }
    for (name, b) in &config.trust {
        let from = out.len();
        certs(
            &mut out,
            &format!("trust {name} ca"),
            &config.resolve(&b.ca),
        );
        crls(
            &mut out,
            &format!("trust {name} crl"),
            &b.crls.iter().map(|c| config.resolve(c)).collect::<Vec<_>>(),
            b.crl_expired,
        );
        let users: Vec<_> = config
            .listeners
            .iter()
            .flat_map(|l| l.routes.iter().map(move |r| (l, r)))
            .filter(|(_, r)| {
                r.trust.as_ref() == Some(name)
                    || r.device.as_ref().is_some_and(|d| &d.trust == name)
            })
            .map(|(l, r)| route(&l.name, &r.name))
            .collect();
        scope(&mut out, from, &users);
    }
    out
}

/// Ties what was found since `from` to `routes`.
/// When something good from `valid_from` to `at` enters its warning
/// window: `warning` (`expiry_warning`) before `at`, or the last third of
/// its lifetime when that is shorter. What is meant to be short-lived is
/// renewed by then (cert-manager at two thirds, SPIRE at half), so a
/// seven-day CRL published daily or a one-hour client certificate is not
/// flagged all its life; one that stopped being renewed is, with a third
/// of its life left to act.
pub fn warns_at(valid_from: i64, at: i64, warning: i64) -> i64 {
    let third = (at.saturating_sub(valid_from) / 3).max(0);
    at.saturating_sub(warning.min(third))
}

fn scope(out: &mut [Expiry], from: usize, routes: &[(String, String)]) {
    for e in out.iter_mut().skip(from) {
        e.routes = routes.to_vec();
    }
}

/// The serving state's certificates and CRLs and its `expiry_warning`, as
/// the last start or reload left them.
#[derive(Debug, Default)]
pub struct Watched {
    now: Mutex<(Vec<Expiry>, Duration)>,
}

impl Watched {
    pub fn set(&self, expiries: Vec<Expiry>, warning: Duration) {
        *self.lock() = (expiries, warning);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<Expiry>, Duration)> {
        self.now.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn all(&self) -> Vec<Expiry> {
        self.lock().0.clone()
    }

    /// `expiry_warning`.
    pub fn warning(&self) -> Duration {
        self.lock().1
    }

    /// What is inside its warning window at `now` (or has run out),
    /// soonest first.
    pub fn within_warning(&self, now: i64) -> Vec<Expiry> {
        let (all, warning) = &*self.lock();
        let warning = i64::try_from(warning.as_secs()).unwrap_or(i64::MAX);
        let mut soon: Vec<Expiry> = all
            .iter()
            .filter(|e| now >= warns_at(e.valid_from, e.at, warning))
            .cloned()
            .collect();
        soon.sort_by(|a, b| (a.at, &a.role).cmp(&(b.at, &b.role)));
        soon
    }
}

fn pem_blocks(path: &Path) -> Vec<Vec<u8>> {
    let Ok(data) = crate::safe_dir::read_bounded(path, crate::safe_dir::MAX_NAMED_FILE_BYTES)
    else {
        return Vec::new();
    };
    x509_parser::pem::Pem::iter_from_buffer(&data)
        .filter_map(Result::ok)
        .map(|p| p.contents)
        .collect()
}

fn certs(out: &mut Vec<Expiry>, role: &str, path: &Path) {
    for der in pem_blocks(path) {
        if let Ok((_, c)) = X509Certificate::from_der(&der) {
            out.push(Expiry {
                kind: Kind::Certificate,
                role: role.to_owned(),
                file: path.to_owned(),
                subject: c.subject().to_string(),
                at: c.validity().not_after.timestamp(),
                valid_from: c.validity().not_before.timestamp(),
                routes: Vec::new(),
            });
        }
    }
}

fn crls(out: &mut Vec<Expiry>, role: &str, paths: &[PathBuf], policy: CrlExpired) {
    // Each file on its own, so one that does not parse hides no other.
    let all: Vec<crate::tls::crl::Crl> = paths
        .iter()
        .filter_map(|p| crate::tls::crl::load_all(std::slice::from_ref(p)).ok())
        .flatten()
        .collect();
    // Two different CRLs in one place refuse the state's load; until that
    // is mended, watch both.
    let enforced = crate::tls::crl::newest(all.iter().collect(), |_, _| {})
        .unwrap_or_else(|_| all.iter().collect());
    for crl in enforced {
        if let Some(at) = crl.next_update {
            out.push(Expiry {
                kind: Kind::Crl(policy),
                role: role.to_owned(),
                file: crl.file.clone(),
                subject: crl.issuer.clone(),
                at,
                valid_from: crl.this_update,
                routes: Vec::new(),
            });
        }
    }
}

/// "expires in 2 days 3 hours", "expired 5 minutes ago".
pub fn when(at: i64, now: i64) -> String {
    let left = at - now;
    if left <= 0 {
        format!("expired {} ago", human(-left))
    } else {
        format!("expires in {}", human(left))
    }
}

/// A line for an operator: what, which file, and when.
pub fn describe(e: &Expiry, now: i64) -> String {
    let what = match e.kind {
        Kind::Certificate => "certificate",
        Kind::Crl(_) => "CRL (next update)",
    };
    let when = when(e.at, now);
    let effect = match e.kind {
        Kind::Crl(CrlExpired::Refuse) => {
            "; once stale, the clients it covers are refused (crl_expired = \"refuse\")"
        }
        Kind::Crl(CrlExpired::Warn) => "; once stale, used anyway (crl_expired = \"warn\")",
        Kind::Certificate => "",
    };
    format!(
        "{} {what} {} in {}: {when}{effect}",
        e.role,
        e.subject,
        e.file.display()
    )
}

/// Two units, largest first, so a CRL published a minute ago for 7 days
/// reads "6 days 23 hours", not "6 days" (which looks a day old).
fn human(secs: i64) -> String {
    let unit = |n: i64, one: &str| match n {
        1 => format!("1 {one}"),
        n => format!("{n} {one}s"),
    };
    let two = |big: i64, big_unit: &str, small: i64, small_unit: &str| match small {
        0 => unit(big, big_unit),
        s => format!("{} {}", unit(big, big_unit), unit(s, small_unit)),
    };
    match secs {
        s if s >= 86_400 => two(s / 86_400, "day", s % 86_400 / 3_600, "hour"),
        s if s >= 3_600 => two(s / 3_600, "hour", s % 3_600 / 60, "minute"),
        s if s >= 60 => two(s / 60, "minute", s % 60, "second"),
        s => unit(s, "second"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Authority, LeafSpec};

    /// Durations read as what they are: a week less a minute is not "6 days".
    #[test]
    fn durations_are_said_in_two_units() {
        assert_eq!(human(7 * 86_400 - 60), "6 days 23 hours");
        assert_eq!(human(86_400), "1 day");
        assert_eq!(human(2 * 3_600 + 60), "2 hours 1 minute");
        assert_eq!(human(90), "1 minute 30 seconds");
        assert_eq!(human(5), "5 seconds");
    }

    /// The window is `expiry_warning`, or the last third of the lifetime
    /// when that is shorter.
    #[test]
    fn the_warning_window_is_narrowed_by_a_short_lifetime() {
        let day = 86_400;
        let warning = 30 * day;
        // A year: expiry_warning.
        assert_eq!(warns_at(0, 365 * day, warning), 335 * day);
        // Seven days (a CRL published daily): its last third.
        assert_eq!(warns_at(0, 7 * day, warning), 7 * day - 7 * day / 3);
        // One hour: the last 20 minutes.
        assert_eq!(warns_at(0, 3600, warning), 2400);
        // Backwards validity: the window is empty, not negative.
        assert_eq!(warns_at(100, 50, warning), 50);
    }

    /// upstream_tls's CA and client certificate are watched like the rest:
    /// when either lapses, every backend of the route fails.
    #[test]
    fn upstream_tls_certificates_are_watched() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::root("upstream root").unwrap();
        let mut spec = LeafSpec::client("gateway-upstream", &["spiffe://example.internal/gw"]);
        spec.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3);
        let leaf = ca.issue(&spec).unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("ca.pem", &ca.cert_pem);
        write("up.pem", &leaf.cert_pem);
        let text = r#"
[[listeners]]
name = "edge"
bind = "127.0.0.1:0"
cert = "ca.pem"
key = "ca.key"
client_ca = "ca.pem"

[[listeners.routes]]
name = "orders"
backends = ["127.0.0.1:1"]
upstream_tls = { ca = "ca.pem", server_name = "b.internal", cert = "up.pem", key = "up.key" }
"#;
        let config = Config::parse(text, &dir.path().join("g.toml"), dir.path()).unwrap();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let found: Vec<_> = collect(&config)
            .into_iter()
            .filter(|e| e.role.starts_with("route orders upstream_tls"))
            .map(|e| (e.role.clone(), e.seconds_left(now) / 86_400))
            .collect();
        let roles: Vec<&str> = found.iter().map(|(r, _)| r.as_str()).collect();
        assert_eq!(
            roles,
            [
                "route orders upstream_tls ca",
                "route orders upstream_tls cert"
            ]
        );
        assert!(found[0].1 > 300, "the root lives long: {found:?}");
        assert!(
            (2..=3).contains(&found[1].1),
            "the client certificate: {found:?}"
        );
    }

    /// Each file is tied to the routes it stops: the listener's certificate
    /// to all of them, its client CA to those without a bundle of their
    /// own, a bundle to the routes that name it.
    #[test]
    fn each_file_names_the_routes_it_serves() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::root("routes root").unwrap();
        std::fs::write(dir.path().join("ca.pem"), &ca.cert_pem).unwrap();
        let text = r#"
[trust.partners]
ca = "ca.pem"

[[listeners]]
name = "edge"
bind = "127.0.0.1:0"
cert = "ca.pem"
key = "ca.key"
client_ca = "ca.pem"

[[listeners.routes]]
name = "own"
backends = ["127.0.0.1:1"]

[[listeners.routes]]
name = "partner"
server_names = ["p.example"]
backends = ["127.0.0.1:1"]
trust = "partners"
"#;
        let config = Config::parse(text, &dir.path().join("g.toml"), dir.path()).unwrap();
        let routes = |role: &str| {
            collect(&config)
                .into_iter()
                .find(|e| e.role == role)
                .map(|e| e.routes.into_iter().map(|(_, r)| r).collect::<Vec<_>>())
                .unwrap()
        };
        assert_eq!(routes("listener edge cert"), ["own", "partner"]);
        assert_eq!(routes("listener edge client_ca"), ["own"]);
        assert_eq!(routes("trust partners ca"), ["partner"]);
    }

    /// Monitoring watches the CRLs the bundles enforce: the newest of each
    /// issuer, with what running out does.
    #[test]
    fn crls_are_reported_as_the_bundles_use_them() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::root("expiry root").unwrap();
        let soon = time::OffsetDateTime::now_utc() + time::Duration::hours(2);
        let later = time::OffsetDateTime::now_utc() + time::Duration::days(20);
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("ca.pem", &ca.cert_pem);
        write("old.crl.pem", &ca.crl_until(1, &[], soon).unwrap());
        write("new.crl.pem", &ca.crl_until(2, &[], later).unwrap());
        let text = r#"
[trust.strict]
ca = "ca.pem"
crls = ["old.crl.pem", "new.crl.pem"]

[trust.lenient]
ca = "ca.pem"
crls = ["old.crl.pem"]
crl_expired = "warn"

[[listeners]]
name = "edge"
bind = "127.0.0.1:0"
cert = "ca.pem"
key = "ca.key"
client_ca = "ca.pem"

[[listeners.routes]]
name = "r"
backends = ["127.0.0.1:1"]
"#;
        let config = Config::parse(text, &dir.path().join("g.toml"), dir.path()).unwrap();
        let crls: Vec<_> = collect(&config)
            .into_iter()
            .filter(|e| matches!(e.kind, Kind::Crl(_)))
            .map(|e| {
                (
                    e.role.clone(),
                    e.file.file_name().unwrap().to_owned(),
                    e.fails_closed(),
                )
            })
            .collect();
        assert_eq!(
            crls,
            [
                ("trust lenient crl".into(), "old.crl.pem".into(), false),
                ("trust strict crl".into(), "new.crl.pem".into(), true),
            ]
        );
    }
}

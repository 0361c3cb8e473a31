//! Who may pass a route, from where and when: identity rules, source CIDRs,
//! time windows, a device requirement, and the decision over one client.
//!
//! Entries are parsed once, at config load, into the same one spelling the
//! certificate's names are read in (see `identity`): SPIFFE IDs valid by
//! the specification, DNS names lower-case without a trailing dot, email
//! domains lower-case. Matching is then exact, or an explicit SPIFFE prefix
//! over whole path segments. There are no
//! patterns: a wildcard in an entry is a config error, not a rule. Deny wins
//! over allow.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

use crate::identity::{CommonName, Identity};

/// One identity a rule names (in `allow` or `deny`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum IdentityRule {
    /// A URI SAN, SPIFFE IDs included: `spiffe://example.internal/ns/shop/sa/frontend`.
    Uri(String),
    /// `spiffe-prefix:spiffe://example.internal/ns/shop/`: every SPIFFE ID under
    /// that path. Must end with `/`, so `ns/shop/` never matches `ns/shopping`.
    SpiffePrefix(String),
    /// `dns:NAME`: a DNS SAN.
    Dns(String),
    /// `email:ADDR`: an rfc822Name SAN.
    Email(String),
    /// `cn:NAME`: the subject common name; only on routes with `match_common_name`.
    CommonName(String),
}

impl TryFrom<String> for IdentityRule {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        if s.contains('*') {
            return Err(format!(
                "{s:?}: wildcards are never allowed: name each identity exactly or use spiffe-prefix:"
            ));
        }
        let nonempty = |kind: &str, v: &str| {
            if v.is_empty() {
                Err(format!("{s:?}: empty {kind}"))
            } else {
                Ok(v.to_owned())
            }
        };
        if let Some(v) = s.strip_prefix("dns:") {
            let v = nonempty("DNS name", v)?;
            return crate::identity::normalise_dns(&v)
                .map(IdentityRule::Dns)
                .ok_or_else(|| {
                    format!("{s:?}: not a DNS name (labels of 1 to 63 letters, digits, '-' or '_')")
                });
        }
        if let Some(v) = s.strip_prefix("email:") {
            let v = nonempty("email address", v)?;
            if !v.contains('@') {
                return Err(format!("{s:?}: an email address needs an @"));
            }
            return crate::identity::normalise_email(&v)
                .map(IdentityRule::Email)
                .ok_or_else(|| {
                    format!(
                        "{s:?}: not a plain email address (a dot-atom local part, @, a DNS name)"
                    )
                });
        }
        if let Some(v) = s.strip_prefix("cn:") {
            return Ok(IdentityRule::CommonName(nonempty("common name", v)?));
        }
        if let Some(v) = s.strip_prefix("spiffe-prefix:") {
            return crate::spiffe::check_prefix(v)
                .map(|()| IdentityRule::SpiffePrefix(v.to_owned()))
                .map_err(|why| format!("{s:?}: {why}"));
        }
        if crate::spiffe::claims_spiffe(&s) {
            return match crate::spiffe::SpiffeId::parse(&s) {
                Ok(_) => Ok(IdentityRule::Uri(s)),
                Err(why) => Err(format!("{s:?} is not a valid SPIFFE ID: {why}")),
            };
        }
        match s.split_once("://") {
            Some((scheme, rest))
                if !scheme.is_empty()
                    && !rest.is_empty()
                    && crate::identity::is_uri_text(&s)
                    && scheme
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) =>
            {
                Ok(IdentityRule::Uri(s))
            }
            _ => Err(format!(
                "{s:?}: expected a URI (spiffe://…), spiffe-prefix:spiffe://…/, dns:NAME, email:ADDR or cn:NAME"
            )),
        }
    }
}

impl fmt::Display for IdentityRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentityRule::Uri(u) => f.write_str(u),
            IdentityRule::SpiffePrefix(p) => write!(f, "spiffe-prefix:{p}"),
            IdentityRule::Dns(d) => write!(f, "dns:{d}"),
            IdentityRule::Email(e) => write!(f, "email:{e}"),
            IdentityRule::CommonName(c) => write!(f, "cn:{c}"),
        }
    }
}

impl IdentityRule {
    fn matches(&self, id: &Identity, match_common_name: bool) -> bool {
        match self {
            IdentityRule::Uri(u) => id.uris.iter().any(|x| x == u),
            IdentityRule::SpiffePrefix(p) => id
                .uris
                .iter()
                .any(|x| x.starts_with(p.as_str()) && x.len() > p.len()),
            // Both sides are in their one spelling (see `identity`).
            IdentityRule::Dns(d) => id.dns.iter().any(|x| x == d),
            IdentityRule::Email(e) => id.emails.iter().any(|x| x == e),
            IdentityRule::CommonName(c) => {
                match_common_name && id.common_name.one() == Some(c.as_str())
            }
        }
    }
}

/// Days and hours in one time zone when a route is open.
#[derive(Debug, Clone)]
pub struct TimeWindow {
    /// Indexed by ISO weekday - 1 (Monday = 0).
    days: [bool; 7],
    /// Minutes since local midnight; `end` is exclusive. `end <= start` spans midnight
    /// (the days then name the day the window opens).
    start: u16,
    end: u16,
    tz: jiff::tz::TimeZone,
    /// As written, for messages.
    label: String,
}

/// A time window as written in the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeWindowConfig {
    /// "mon" … "sun"; empty means every day.
    #[serde(default)]
    pub days: Vec<String>,
    /// "HH:MM", local to `time_zone`.
    pub start: String,
    /// "HH:MM", exclusive; "24:00" is the end of the day.
    pub end: String,
    /// An IANA zone ("Europe/Berlin") or "UTC".
    #[serde(default = "utc")]
    pub time_zone: String,
}

fn utc() -> String {
    "UTC".into()
}

impl TimeWindow {
    pub fn compile(c: &TimeWindowConfig) -> Result<TimeWindow, String> {
        let mut days = [c.days.is_empty(); 7];
        for d in &c.days {
            let i = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
                .iter()
                .position(|x| x.eq_ignore_ascii_case(d))
                .ok_or_else(|| {
                    format!("day {d:?}: expected mon, tue, wed, thu, fri, sat or sun")
                })?;
            if let Some(day) = days.get_mut(i) {
                *day = true;
            }
        }
        let minutes = |s: &str| -> Result<u16, String> {
            let (h, m) = s
                .split_once(':')
                .ok_or_else(|| format!("time {s:?}: expected HH:MM"))?;
            let (h, m): (u16, u16) = (
                h.parse().map_err(|_| format!("time {s:?}: bad hour"))?,
                m.parse().map_err(|_| format!("time {s:?}: bad minute"))?,
            );
            if m > 59 || h > 24 || (h == 24 && m > 0) {
                return Err(format!("time {s:?} is out of range"));
            }
            Ok(h * 60 + m)
        };
        let (start, end) = (minutes(&c.start)?, minutes(&c.end)?);
        if start == end {
            return Err(format!("window {}-{} is empty", c.start, c.end));
        }
        let tz = if c.time_zone.eq_ignore_ascii_case("UTC") {
            jiff::tz::TimeZone::UTC
        } else {
            jiff::tz::TimeZone::get(&c.time_zone)
                .map_err(|e| format!("time zone {:?}: {e}", c.time_zone))?
        };
        let label = format!(
            "{} {}-{} {}",
            if c.days.is_empty() {
                "daily".to_owned()
            } else {
                c.days.join(",")
            },
            c.start,
            c.end,
            c.time_zone
        );
        Ok(TimeWindow {
            days,
            start,
            end,
            tz,
            label,
        })
    }

    pub fn contains(&self, now: jiff::Timestamp) -> bool {
        let local = now.to_zoned(self.tz.clone());
        let minute =
            u16::from(local.hour().unsigned_abs()) * 60 + u16::from(local.minute().unsigned_abs());
        let today = usize::from(local.weekday().to_monday_zero_offset().unsigned_abs());
        let yesterday = (today + 6) % 7;
        let on = |day: usize| self.days.get(day).copied().unwrap_or(false);
        if self.start < self.end {
            on(today) && (self.start..self.end).contains(&minute)
        } else {
            (on(today) && minute >= self.start) || (on(yesterday) && minute < self.end)
        }
    }
}

impl fmt::Display for TimeWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label)
    }
}

/// A route's compiled rules.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub allow: Vec<IdentityRule>,
    pub deny: Vec<IdentityRule>,
    /// Empty: any source.
    pub allow_sources: Vec<IpNet>,
    pub deny_sources: Vec<IpNet>,
    /// Empty: always open.
    pub time_windows: Vec<TimeWindow>,
    pub match_common_name: bool,
    /// The URI prefix a device identity SAN must carry (the chain to the
    /// device CA is checked by the TLS verifier).
    pub device_san_prefix: Option<String>,
}

/// Who is asking, from where, and when.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub identity: &'a Identity,
    pub source: IpAddr,
    pub now: jiff::Timestamp,
}

/// What the policy says about one client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Let through; `matched` is the allow entry that matched.
    Allow {
        matched: String,
    },
    Deny(DenyReason),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DenyReason {
    #[error("route allows no identity (empty allow list)")]
    NoAllowRules,
    #[error("certificate carries no identity (no URI, DNS or email SAN)")]
    NoIdentity,
    #[error("identity {identity} is not in the route's allow list")]
    NotAllowed { identity: String },
    #[error("identity {identity} is denied by {rule}")]
    Denied { identity: String, rule: String },
    #[error("source {client} is denied by {cidr}")]
    SourceDenied { client: IpAddr, cidr: IpNet },
    #[error("source {client} is not in the route's allowed sources")]
    SourceNotAllowed { client: IpAddr },
    #[error("outside the route's time windows ({windows})")]
    OutsideTimeWindow { windows: String },
    #[error("certificate carries no device identity (URI SAN under {prefix})")]
    NoDeviceIdentity { prefix: String },
    #[error("the route matches common names and {why}")]
    AmbiguousCommonName { why: &'static str },
}

impl DenyReason {
    /// The reason's name where a name is wanted (the audit report).
    pub fn kind(&self) -> &'static str {
        match self {
            DenyReason::NoAllowRules => "no_allow_rules",
            DenyReason::NoIdentity => "no_identity",
            DenyReason::NotAllowed { .. } => "not_allowed",
            DenyReason::Denied { .. } => "denied",
            DenyReason::SourceDenied { .. } => "source_denied",
            DenyReason::SourceNotAllowed { .. } => "source_not_allowed",
            DenyReason::OutsideTimeWindow { .. } => "outside_time_window",
            DenyReason::NoDeviceIdentity { .. } => "no_device_identity",
            DenyReason::AmbiguousCommonName { .. } => "ambiguous_common_name",
        }
    }
}

/// A source network in the spelling clients are judged in: one written in
/// the IPv4-mapped form (`::ffff:10.0.0.0/104`) is the IPv4 network it
/// maps (`10.0.0.0/8`), since an IPv4 client is always judged by its IPv4
/// address, also when it reached a dual-stack listener. Other IPv6
/// networks stay as written; one that holds the whole mapped range
/// (`::/0`) covers every IPv4 client too (`covers`).
pub fn canonical_net(net: IpNet) -> IpNet {
    const MAPPED_BITS: u8 = 96;
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= MAPPED_BITS => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - MAPPED_BITS)
                .map(|n| IpNet::V4(n.trunc()))
                .unwrap_or(net),
            None => net,
        },
        _ => net,
    }
}

/// Whether `net` (as `canonical_net` leaves it) covers the canonical
/// address `source`. An IPv4 client of a dual-stack listener really comes
/// from `::ffff:a.b.c.d`, so an IPv6 network that holds the whole mapped
/// range (`::/0`, `::/1`, `::ffff:0:0/95`) covers every IPv4 address: a
/// `deny_sources = ["::/0"]` must not let IPv4 clients through. A network
/// holding only part of the range was made IPv4 by `canonical_net`.
fn covers(net: &IpNet, source: IpAddr) -> bool {
    match (net, source) {
        (IpNet::V6(v6), IpAddr::V4(v4)) => v6.contains(&v4.to_ipv6_mapped()),
        _ => net.contains(&source),
    }
}

impl Policy {
    /// The rules that need no certificate: `deny_sources`, `allow_sources`,
    /// `time_windows`, in that order. All a `mode = "off"` route enforces.
    /// `source` is judged as its canonical address (an IPv4-mapped IPv6
    /// address as the IPv4 address), as the networks are (`canonical_net`).
    pub fn admits_source_at(&self, source: IpAddr, now: jiff::Timestamp) -> Result<(), DenyReason> {
        self.admits_source(source, Some(now))
    }

    /// As [`Policy::admits_source_at`]; `now` None: at some time (a
    /// route's time windows are taken as open).
    fn admits_source(
        &self,
        source: IpAddr,
        now: Option<jiff::Timestamp>,
    ) -> Result<(), DenyReason> {
        let source = source.to_canonical();
        if let Some(cidr) = self.deny_sources.iter().find(|n| covers(n, source)) {
            return Err(DenyReason::SourceDenied {
                client: source,
                cidr: *cidr,
            });
        }
        if !self.allow_sources.is_empty() && !self.allow_sources.iter().any(|n| covers(n, source)) {
            return Err(DenyReason::SourceNotAllowed { client: source });
        }
        if let Some(now) = now
            && !self.time_windows.is_empty()
            && !self.time_windows.iter().any(|w| w.contains(now))
        {
            return Err(DenyReason::OutsideTimeWindow {
                windows: self
                    .time_windows
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            });
        }
        Ok(())
    }

    pub fn decide(&self, s: Subject<'_>) -> Verdict {
        self.judge(s.identity, s.source, Some(s.now))
    }

    /// What [`Policy::decide`] says of `identity` from `source` at some
    /// time: its time windows taken as open. What a reload judges a known
    /// source by: the reload's instant (a nightly CRL job outside office
    /// hours) must not forget the clients of a time-windowed route
    /// (attacker review 11, R11-1); a handshake still judges the windows.
    pub fn decide_at_any_time(&self, identity: &Identity, source: IpAddr) -> Verdict {
        self.judge(identity, source, None)
    }

    fn judge(&self, id: &Identity, source: IpAddr, now: Option<jiff::Timestamp>) -> Verdict {
        // Which CN would a `cn:` rule, allow or deny, be judged against?
        if self.match_common_name
            && let CommonName::Ambiguous(why) = id.common_name
        {
            return Verdict::Deny(DenyReason::AmbiguousCommonName { why });
        }
        if let Some(rule) = self
            .deny
            .iter()
            .find(|r| r.matches(id, self.match_common_name))
        {
            return Verdict::Deny(DenyReason::Denied {
                identity: id.to_string(),
                rule: rule.to_string(),
            });
        }
        if let Err(reason) = self.admits_source(source, now) {
            return Verdict::Deny(reason);
        }
        if let Some(prefix) = &self.device_san_prefix
            && id.device(prefix).is_none()
        {
            return Verdict::Deny(DenyReason::NoDeviceIdentity {
                prefix: prefix.clone(),
            });
        }
        if self.allow.is_empty() {
            return Verdict::Deny(DenyReason::NoAllowRules);
        }
        let has_cn = self.match_common_name && id.common_name.one().is_some();
        if id.is_empty() && !has_cn {
            return Verdict::Deny(DenyReason::NoIdentity);
        }
        match self
            .allow
            .iter()
            .find(|r| r.matches(id, self.match_common_name))
        {
            Some(rule) => Verdict::Allow {
                matched: rule.to_string(),
            },
            None => Verdict::Deny(DenyReason::NotAllowed {
                identity: id.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> Result<IdentityRule, String> {
        IdentityRule::try_from(s.to_owned())
    }

    fn identity() -> Identity {
        Identity {
            uris: vec!["spiffe://example.internal/ns/shop/sa/frontend".into()],
            dns: vec!["batch.example.internal".into()],
            emails: vec!["ops@example.internal".into()],
            common_name: CommonName::One("legacy".into()),
            ..Identity::default()
        }
    }

    fn rules(entries: &[&str]) -> Vec<IdentityRule> {
        entries.iter().map(|e| rule(e).unwrap()).collect()
    }

    fn allow(entries: &[&str]) -> Policy {
        Policy {
            allow: rules(entries),
            ..Policy::default()
        }
    }

    const NOON_WED_UTC: &str = "2026-11-18T12:00:00Z";

    fn at(policy: &Policy, id: &Identity, source: &str, now: &str) -> Verdict {
        policy.decide(Subject {
            identity: id,
            source: source.parse().unwrap(),
            now: now.parse().unwrap(),
        })
    }

    fn decide(policy: &Policy, id: &Identity) -> Verdict {
        at(policy, id, "192.0.2.10", NOON_WED_UTC)
    }

    fn allowed(v: &Verdict) -> bool {
        matches!(v, Verdict::Allow { .. })
    }

    #[test]
    fn parses_each_kind_and_refuses_the_rest() {
        assert_eq!(
            rule("spiffe://td/x").unwrap(),
            IdentityRule::Uri("spiffe://td/x".into())
        );
        assert_eq!(rule("dns:A.b").unwrap(), IdentityRule::Dns("a.b".into()));
        assert_eq!(
            rule("email:a@b").unwrap(),
            IdentityRule::Email("a@b".into())
        );
        assert_eq!(
            rule("spiffe-prefix:spiffe://td/ns/").unwrap(),
            IdentityRule::SpiffePrefix("spiffe://td/ns/".into())
        );
        assert!(rule("dns:*.b").unwrap_err().contains("wildcard"));
        assert!(rule("spiffe://td/*").is_err());
        assert!(
            rule("spiffe-prefix:spiffe://td/ns")
                .unwrap_err()
                .contains("ends with /")
        );
        assert!(rule("spiffe-prefix:https://td/ns/").is_err());
        assert!(rule("spiffe-prefix:spiffe:///").is_err());
        assert!(rule("frontend").is_err());
        assert!(rule("dns:").is_err());
        assert!(rule("email:nobody").is_err());
    }

    #[test]
    fn entries_are_read_in_the_spelling_certificates_are() {
        assert_eq!(
            rule("dns:Batch.Example.Internal.").unwrap(),
            IdentityRule::Dns("batch.example.internal".into())
        );
        assert!(rule("dns:a..b").is_err());
        for bad in [
            "dns:a.example,email:ceo@example.internal",
            "dns:a example",
            "email:a,b@example.internal",
            "email:ceo@example.internal,dns:x",
            "email:\"ceo\"@example.internal",
            "https://example.internal/a b",
        ] {
            assert!(rule(bad).is_err(), "{bad}");
        }
        // An email domain in the spelling a certificate's is read in.
        assert_eq!(
            rule("email:mallory@Example.Internal.").unwrap(),
            IdentityRule::Email("mallory@example.internal".into())
        );
        assert_eq!(
            rule("email:Ops@Example.INTERNAL").unwrap(),
            IdentityRule::Email("Ops@example.internal".into())
        );
        for bad in [
            "spiffe://example.internal/ns/shop/sa/bad/",
            "spiffe://example.internal/ns/shop/./sa/bad",
            "spiffe://example.internal/ns/shop/sa/%62ad",
            "spiffe://Example.internal/ns/shop/sa/bad",
            "SPIFFE://example.internal/ns/shop/sa/bad",
            "spiffe-prefix:spiffe://example.internal/ns//",
            "spiffe-prefix:spiffe://example.internal/ns/../",
        ] {
            let err = rule(bad).unwrap_err();
            assert!(err.contains("not a valid SPIFFE ID"), "{bad}: {err}");
        }
        // Other URI schemes are compared as written.
        assert_eq!(
            rule("https://example.internal/x/").unwrap(),
            IdentityRule::Uri("https://example.internal/x/".into())
        );
    }

    #[test]
    fn each_identity_kind_matches_exactly() {
        let id = identity();
        for e in [
            "spiffe://example.internal/ns/shop/sa/frontend",
            "dns:batch.example.internal",
            "email:ops@example.internal",
            "spiffe-prefix:spiffe://example.internal/ns/shop/",
            "spiffe-prefix:spiffe://example.internal/",
        ] {
            assert!(allowed(&decide(&allow(&[e]), &id)), "{e}");
        }
        for e in [
            "spiffe://example.internal/ns/shop/sa/frontend2",
            "spiffe://example.internal/ns/shop",
            "spiffe-prefix:spiffe://example.internal/ns/sho/",
            "spiffe-prefix:spiffe://example.internal/ns/shop/sa/frontend/",
            "dns:example.internal",
            "email:OPS@example.internal",
        ] {
            assert!(
                matches!(
                    decide(&allow(&[e]), &id),
                    Verdict::Deny(DenyReason::NotAllowed { .. })
                ),
                "{e}"
            );
        }
    }

    #[test]
    fn deny_wins_over_allow() {
        let mut p = allow(&["spiffe-prefix:spiffe://example.internal/ns/shop/"]);
        p.deny = rules(&["spiffe://example.internal/ns/shop/sa/frontend"]);
        assert_eq!(
            decide(&p, &identity()),
            Verdict::Deny(DenyReason::Denied {
                identity: identity().to_string(),
                rule: "spiffe://example.internal/ns/shop/sa/frontend".into()
            })
        );
        let mut other = identity();
        other.uris = vec!["spiffe://example.internal/ns/shop/sa/checkout".into()];
        assert!(allowed(&decide(&p, &other)));
    }

    #[test]
    fn source_cidrs_allow_and_deny() {
        let mut p = allow(&["dns:batch.example.internal"]);
        p.allow_sources = vec![
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ];
        p.deny_sources = vec!["10.66.0.0/16".parse().unwrap()];
        let id = identity();
        assert!(allowed(&at(&p, &id, "10.1.2.3", NOON_WED_UTC)));
        assert!(allowed(&at(&p, &id, "2001:db8::7", NOON_WED_UTC)));
        assert!(matches!(
            at(&p, &id, "192.0.2.1", NOON_WED_UTC),
            Verdict::Deny(DenyReason::SourceNotAllowed { .. })
        ));
        assert!(matches!(
            at(&p, &id, "10.66.1.1", NOON_WED_UTC),
            Verdict::Deny(DenyReason::SourceDenied { .. })
        ));
    }

    /// One spelling per source: an IPv4-mapped client and a network in the
    /// mapped form are their IPv4 selves (a dual-stack listener sees IPv4
    /// clients as `::ffff:a.b.c.d`).
    #[test]
    fn ipv4_mapped_sources_and_networks_are_judged_as_ipv4() {
        let net = |s: &str| canonical_net(s.parse().unwrap());
        assert_eq!(net("::ffff:10.0.0.0/104"), net("10.0.0.0/8"));
        assert_eq!(net("::ffff:10.1.2.3/128"), net("10.1.2.3/32"));
        assert_eq!(net("::ffff:0:0/96"), net("0.0.0.0/0"));
        assert_eq!(net("::/0").to_string(), "::/0");
        assert_eq!(net("2001:db8::/32").to_string(), "2001:db8::/32");

        let id = identity();
        let mut deny = allow(&["dns:batch.example.internal"]);
        deny.deny_sources = vec![net("127.0.0.0/8")];
        assert_eq!(
            at(&deny, &id, "::ffff:127.0.0.1", NOON_WED_UTC),
            Verdict::Deny(DenyReason::SourceDenied {
                client: "127.0.0.1".parse().unwrap(),
                cidr: net("127.0.0.0/8"),
            })
        );
        let mut only = allow(&["dns:batch.example.internal"]);
        only.allow_sources = vec![net("::ffff:10.0.0.0/104")];
        assert!(allowed(&at(&only, &id, "::ffff:10.1.2.3", NOON_WED_UTC)));
        assert!(allowed(&at(&only, &id, "10.1.2.3", NOON_WED_UTC)));
        assert!(!allowed(&at(&only, &id, "::ffff:192.0.2.1", NOON_WED_UTC)));
    }

    /// An IPv6 network that holds the whole IPv4-mapped range covers every
    /// IPv4 client, mapped or not, in `deny_sources` and `allow_sources`
    /// alike (and is named as written); one that holds none of it covers
    /// none.
    #[test]
    fn an_ipv6_network_holding_the_mapped_range_covers_ipv4_clients() {
        let net = |s: &str| canonical_net(s.parse().unwrap());
        let id = identity();
        for whole in ["::/0", "::/1", "::ffff:0:0/95", "::/64"] {
            let mut deny = allow(&["dns:batch.example.internal"]);
            deny.deny_sources = vec![net(whole)];
            for client in ["10.1.2.3", "::ffff:10.1.2.3", "255.255.255.255"] {
                assert_eq!(
                    at(&deny, &id, client, NOON_WED_UTC),
                    Verdict::Deny(DenyReason::SourceDenied {
                        client: client.parse::<IpAddr>().unwrap().to_canonical(),
                        cidr: whole.parse().unwrap(),
                    }),
                    "{whole} denies {client}"
                );
            }
            let mut only = allow(&["dns:batch.example.internal"]);
            only.allow_sources = vec![net(whole)];
            assert!(
                allowed(&at(&only, &id, "10.1.2.3", NOON_WED_UTC)),
                "{whole}"
            );
            assert!(allowed(&at(&only, &id, "::ffff:10.1.2.3", NOON_WED_UTC)));
        }
        for apart in ["8000::/1", "2001:db8::/32", "::/96", "::ffff:0:0:0/96"] {
            let mut deny = allow(&["dns:batch.example.internal"]);
            deny.deny_sources = vec![net(apart)];
            assert!(
                allowed(&at(&deny, &id, "10.1.2.3", NOON_WED_UTC)),
                "{apart}"
            );
            let mut only = allow(&["dns:batch.example.internal"]);
            only.allow_sources = vec![net(apart)];
            assert!(
                !allowed(&at(&only, &id, "10.1.2.3", NOON_WED_UTC)),
                "{apart}"
            );
        }
    }

    fn window(days: &[&str], start: &str, end: &str, tz: &str) -> TimeWindow {
        TimeWindow::compile(&TimeWindowConfig {
            days: days.iter().map(|d| d.to_string()).collect(),
            start: start.into(),
            end: end.into(),
            time_zone: tz.into(),
        })
        .unwrap()
    }

    #[test]
    fn time_windows_with_an_injected_clock_and_zones() {
        let mut p = allow(&["dns:batch.example.internal"]);
        p.time_windows = vec![window(
            &["mon", "tue", "wed", "thu", "fri"],
            "08:00",
            "18:00",
            "Europe/Berlin",
        )];
        let id = identity();
        // Wednesday 12:00 UTC is 13:00 in Berlin (CET): open.
        assert!(allowed(&at(&p, &id, "10.0.0.1", "2026-11-18T12:00:00Z")));
        // 17:30 UTC is 18:30 in Berlin: closed, though it is before 18:00 UTC.
        assert!(matches!(
            at(&p, &id, "10.0.0.1", "2026-11-18T17:30:00Z"),
            Verdict::Deny(DenyReason::OutsideTimeWindow { .. })
        ));
        // Saturday noon: closed.
        assert!(!allowed(&at(&p, &id, "10.0.0.1", "2026-11-21T12:00:00Z")));
        // Summer time moves the edge: 16:30 UTC in July is 18:30 CEST, closed.
        assert!(!allowed(&at(&p, &id, "10.0.0.1", "2026-07-15T16:30:00Z")));
        assert!(allowed(&at(&p, &id, "10.0.0.1", "2026-07-15T15:30:00Z")));
    }

    #[test]
    fn overnight_windows_belong_to_the_day_they_open() {
        let w = window(&["fri"], "22:00", "06:00", "UTC");
        assert!(w.contains("2026-11-20T23:00:00Z".parse().unwrap())); // Fri 23:00
        assert!(w.contains("2026-11-21T05:59:00Z".parse().unwrap())); // Sat 05:59
        assert!(!w.contains("2026-11-21T06:00:00Z".parse().unwrap()));
        assert!(!w.contains("2026-11-19T23:00:00Z".parse().unwrap())); // Thu 23:00
        assert!(
            TimeWindow::compile(&TimeWindowConfig {
                days: vec!["funday".into()],
                start: "01:00".into(),
                end: "02:00".into(),
                time_zone: "UTC".into()
            })
            .is_err()
        );
        assert!(
            TimeWindow::compile(&TimeWindowConfig {
                days: vec![],
                start: "01:00".into(),
                end: "02:00".into(),
                time_zone: "Mars/Olympus".into()
            })
            .is_err()
        );
    }

    #[test]
    fn device_identity_is_required_when_configured() {
        let mut p = allow(&["email:ops@example.internal"]);
        p.device_san_prefix = Some("spiffe://example.internal/device/".into());
        let mut id = identity();
        assert!(matches!(
            decide(&p, &id),
            Verdict::Deny(DenyReason::NoDeviceIdentity { .. })
        ));
        id.uris
            .push("spiffe://example.internal/device/laptop-7".into());
        assert!(allowed(&decide(&p, &id)));
    }

    #[test]
    fn empty_allow_list_refuses_everyone() {
        assert_eq!(
            decide(&allow(&[]), &identity()),
            Verdict::Deny(DenyReason::NoAllowRules)
        );
    }

    /// With `match_common_name`, a certificate with more than one CN (or
    /// one that is not plain text) is refused: a `deny = ["cn:mallory"]`
    /// could otherwise be dodged by a second CN.
    #[test]
    fn an_ambiguous_common_name_is_refused_where_common_names_match() {
        let mut p = allow(&["cn:legacy"]);
        p.deny = rules(&["cn:mallory"]);
        p.match_common_name = true;
        let mut id = identity();
        id.common_name = CommonName::Ambiguous("the subject has more than one common name");
        assert_eq!(
            decide(&p, &id),
            Verdict::Deny(DenyReason::AmbiguousCommonName {
                why: "the subject has more than one common name"
            })
        );
        // Routes that never read the CN do not care.
        assert!(allowed(&decide(
            &allow(&["dns:batch.example.internal"]),
            &id
        )));
    }

    #[test]
    fn common_name_only_counts_with_the_opt_in() {
        let id = identity();
        let mut p = allow(&["cn:legacy"]);
        assert!(!allowed(&decide(&p, &id)));
        p.match_common_name = true;
        assert!(allowed(&decide(&p, &id)));
        let cn_only = Identity {
            common_name: CommonName::One("legacy".into()),
            ..Identity::default()
        };
        assert_eq!(
            decide(&allow(&["dns:x"]), &cn_only),
            Verdict::Deny(DenyReason::NoIdentity)
        );
    }
}

//! Who may pass a route: allow entries and the decision over an identity.
//!
//! Entries are parsed once, at config load, into [`AllowEntry`]; matching is
//! exact (DNS names case-insensitively, as DNS is). There are no patterns:
//! a wildcard in an entry is a config error, not a rule.

use std::fmt;

use serde::Deserialize;

use crate::identity::Identity;

/// One identity a route lets through.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum AllowEntry {
    /// A URI SAN, SPIFFE IDs included: `spiffe://example.internal/ns/shop/sa/frontend`.
    Uri(String),
    /// `dns:NAME`: a DNS SAN.
    Dns(String),
    /// `email:ADDR`: an rfc822Name SAN.
    Email(String),
    /// `cn:NAME`: the subject common name; only on routes with `match_common_name`.
    CommonName(String),
}

impl TryFrom<String> for AllowEntry {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        if s.contains('*') {
            return Err(format!(
                "{s:?}: wildcards are never allowed: name each identity exactly"
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
            return Ok(AllowEntry::Dns(
                nonempty("DNS name", v)?.to_ascii_lowercase(),
            ));
        }
        if let Some(v) = s.strip_prefix("email:") {
            let v = nonempty("email address", v)?;
            if !v.contains('@') {
                return Err(format!("{s:?}: an email address needs an @"));
            }
            return Ok(AllowEntry::Email(v));
        }
        if let Some(v) = s.strip_prefix("cn:") {
            return Ok(AllowEntry::CommonName(nonempty("common name", v)?));
        }
        match s.split_once("://") {
            Some((scheme, rest))
                if !scheme.is_empty()
                    && !rest.is_empty()
                    && scheme
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) =>
            {
                Ok(AllowEntry::Uri(s))
            }
            _ => Err(format!(
                "{s:?}: expected a URI (spiffe://…), dns:NAME, email:ADDR or cn:NAME"
            )),
        }
    }
}

impl fmt::Display for AllowEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowEntry::Uri(u) => f.write_str(u),
            AllowEntry::Dns(d) => write!(f, "dns:{d}"),
            AllowEntry::Email(e) => write!(f, "email:{e}"),
            AllowEntry::CommonName(c) => write!(f, "cn:{c}"),
        }
    }
}

/// A route's compiled authorization rules.
#[derive(Debug, Clone)]
pub struct Policy {
    pub allow: Vec<AllowEntry>,
    pub match_common_name: bool,
}

/// What the policy says about one identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Let through; `matched` is the entry that matched.
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
}

impl Policy {
    pub fn decide(&self, identity: &Identity) -> Verdict {
        if self.allow.is_empty() {
            return Verdict::Deny(DenyReason::NoAllowRules);
        }
        let has_cn = self.match_common_name && identity.common_name.is_some();
        if identity.is_empty() && !has_cn {
            return Verdict::Deny(DenyReason::NoIdentity);
        }
        for entry in &self.allow {
            let hit = match entry {
                AllowEntry::Uri(u) => identity.uris.iter().any(|x| x == u),
                AllowEntry::Dns(d) => identity.dns.iter().any(|x| x.eq_ignore_ascii_case(d)),
                AllowEntry::Email(e) => identity.emails.iter().any(|x| x == e),
                AllowEntry::CommonName(c) => {
                    self.match_common_name && identity.common_name.as_deref() == Some(c.as_str())
                }
            };
            if hit {
                return Verdict::Allow {
                    matched: entry.to_string(),
                };
            }
        }
        Verdict::Deny(DenyReason::NotAllowed {
            identity: identity.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(s: &str) -> Result<AllowEntry, String> {
        AllowEntry::try_from(s.to_owned())
    }

    fn identity() -> Identity {
        Identity {
            uris: vec!["spiffe://example.internal/ns/shop/sa/frontend".into()],
            dns: vec!["Batch.Example.Internal".into()],
            emails: vec!["ops@example.internal".into()],
            common_name: Some("legacy".into()),
            ..Identity::default()
        }
    }

    fn policy(entries: &[&str], cn: bool) -> Policy {
        Policy {
            allow: entries.iter().map(|e| entry(e).unwrap()).collect(),
            match_common_name: cn,
        }
    }

    #[test]
    fn parses_each_kind_and_refuses_the_rest() {
        assert_eq!(
            entry("spiffe://td/x").unwrap(),
            AllowEntry::Uri("spiffe://td/x".into())
        );
        assert_eq!(entry("dns:A.b").unwrap(), AllowEntry::Dns("a.b".into()));
        assert_eq!(entry("email:a@b").unwrap(), AllowEntry::Email("a@b".into()));
        assert!(entry("dns:*.b").unwrap_err().contains("wildcard"));
        assert!(entry("spiffe://td/*").is_err());
        assert!(entry("frontend").is_err());
        assert!(entry("dns:").is_err());
        assert!(entry("email:nobody").is_err());
    }

    #[test]
    fn each_kind_matches_exactly() {
        let id = identity();
        for e in [
            "spiffe://example.internal/ns/shop/sa/frontend",
            "dns:batch.example.internal",
            "email:ops@example.internal",
        ] {
            assert!(
                matches!(policy(&[e], false).decide(&id), Verdict::Allow { .. }),
                "{e}"
            );
        }
        for e in [
            "spiffe://example.internal/ns/shop/sa/frontend2",
            "spiffe://example.internal/ns/shop",
            "dns:example.internal",
            "email:OPS@example.internal",
        ] {
            assert!(
                matches!(
                    policy(&[e], false).decide(&id),
                    Verdict::Deny(DenyReason::NotAllowed { .. })
                ),
                "{e}"
            );
        }
    }

    #[test]
    fn empty_allow_list_refuses_everyone() {
        assert_eq!(
            policy(&[], false).decide(&identity()),
            Verdict::Deny(DenyReason::NoAllowRules)
        );
    }

    #[test]
    fn common_name_only_counts_with_the_opt_in() {
        let id = identity();
        assert!(matches!(
            policy(&["cn:legacy"], true).decide(&id),
            Verdict::Allow { .. }
        ));
        assert!(matches!(
            policy(&["cn:legacy"], false).decide(&id),
            Verdict::Deny(_)
        ));
        let cn_only = Identity {
            common_name: Some("legacy".into()),
            ..Identity::default()
        };
        assert_eq!(
            policy(&["dns:x"], false).decide(&cn_only),
            Verdict::Deny(DenyReason::NoIdentity)
        );
    }
}

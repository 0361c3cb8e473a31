//! SPIFFE IDs as the SPIFFE ID specification defines them
//! (standards/SPIFFE-ID.md, sections 2.1 to 2.4).
//!
//! Identity rules compare SPIFFE IDs as strings, so every ID that reaches a
//! comparison must have exactly one spelling: `…/sa/bad/`, `…/./sa/bad`,
//! `…/sa/%62ad` or an upper-case trust domain would otherwise be different
//! strings for what a reader takes to be the same workload, and a `deny`
//! would not match them. The specification forbids all of those, so a
//! certificate that carries one is refused rather than normalised: an
//! issuer that signs it is broken or hostile.
//!
//! The specification calls scheme and trust domain case-insensitive but
//! requires the trust domain to be written in lower case; go-spiffe and
//! the other reference implementations refuse upper case in both, and so do
//! we. Any URI whose scheme reads `spiffe` in any case is taken as a claim
//! to be a SPIFFE ID and must be a valid one. For the same reason a trust
//! domain with a leading, trailing or doubled dot (`example.internal.`),
//! which the specification's character set lets through, is refused.

use std::fmt;

/// The longest SPIFFE ID (the whole URI) in bytes (section 2.3).
pub const MAX_ID_LEN: usize = 2048;
/// The longest trust domain name in bytes (section 2.3, RFC 3986's host).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME: &str = "spiffe://";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error("the scheme must be written \"spiffe\" in lower case")]
    SchemeCase,
    #[error("longer than {MAX_ID_LEN} bytes")]
    TooLong,
    #[error("the trust domain is empty")]
    EmptyTrustDomain,
    #[error("the trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error(
        "the trust domain may only hold lower-case letters, digits, '.', '-' and '_' (no port, user info or percent-encoding): {0:?}"
    )]
    TrustDomainChar(char),
    #[error(
        "the trust domain may not start or end with a dot or hold two dots in a row (\"example.internal.\" would be another trust domain than \"example.internal\")"
    )]
    TrustDomainDots,
    #[error("a query or fragment is not allowed")]
    QueryOrFragment,
    #[error("the path has an empty segment (\"//\" or a trailing \"/\")")]
    EmptySegment,
    #[error("the path has a \".\" or \"..\" segment")]
    DotSegment,
    #[error(
        "path segments may only hold letters, digits, '.', '-' and '_' (no percent-encoding): {0:?}"
    )]
    PathChar(char),
}

/// Whether `uri` claims to be a SPIFFE ID: its scheme is `spiffe`, in any case.
pub fn claims_spiffe(uri: &str) -> bool {
    uri.split_once(':')
        .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("spiffe"))
}

/// A valid SPIFFE ID, borrowed from the string it was checked in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpiffeId<'a> {
    id: &'a str,
    /// Where the path starts in `id` (== len when there is no path).
    path_at: usize,
}

impl<'a> SpiffeId<'a> {
    pub fn parse(id: &'a str) -> Result<SpiffeId<'a>, SpiffeError> {
        if id.len() > MAX_ID_LEN {
            return Err(SpiffeError::TooLong);
        }
        let rest = match id.get(..SCHEME.len()) {
            Some(s) if s == SCHEME => &id[SCHEME.len()..],
            Some(s) if s.eq_ignore_ascii_case(SCHEME) => return Err(SpiffeError::SchemeCase),
            _ => return Err(SpiffeError::SchemeCase),
        };
        if rest.contains(['?', '#']) {
            return Err(SpiffeError::QueryOrFragment);
        }
        let (trust_domain, path) = match rest.find('/') {
            Some(at) => rest.split_at(at),
            None => (rest, ""),
        };
        check_trust_domain(trust_domain)?;
        check_path(path)?;
        Ok(SpiffeId {
            id,
            path_at: SCHEME.len() + trust_domain.len(),
        })
    }

    pub fn trust_domain(&self) -> &'a str {
        &self.id[SCHEME.len()..self.path_at]
    }

    /// The path, `""` or starting with `/`.
    pub fn path(&self) -> &'a str {
        &self.id[self.path_at..]
    }

    pub fn as_str(&self) -> &'a str {
        self.id
    }
}

impl fmt::Display for SpiffeId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id)
    }
}

/// A trust domain name as written in a config (`example.internal`).
pub fn check_trust_domain(td: &str) -> Result<(), SpiffeError> {
    if td.is_empty() {
        return Err(SpiffeError::EmptyTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeError::TrustDomainTooLong);
    }
    if let Some(c) = td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        return Err(SpiffeError::TrustDomainChar(c));
    }
    // A host name's dots separate labels, none of them empty. The
    // specification's character set allows "example.internal." (the DNS
    // root spelled out), which is another string for what reads as the
    // same domain: a rule or a bundle's `spiffe_trust_domains` written
    // without the dot would not match it.
    if td.split('.').any(str::is_empty) {
        return Err(SpiffeError::TrustDomainDots);
    }
    Ok(())
}

/// A path: empty, or `/segment` repeated; no empty, `.` or `..` segment.
fn check_path(path: &str) -> Result<(), SpiffeError> {
    if path.is_empty() {
        return Ok(());
    }
    for segment in path[1..].split('/') {
        match segment {
            "" => return Err(SpiffeError::EmptySegment),
            "." | ".." => return Err(SpiffeError::DotSegment),
            _ => {}
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            return Err(SpiffeError::PathChar(c));
        }
    }
    Ok(())
}

/// A `spiffe-prefix:` rule's prefix: a valid SPIFFE ID followed by `/`, so
/// it matches whole segments only (`ns/shop/` never matches `ns/shopping`).
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    let Some(id) = prefix.strip_suffix('/') else {
        return Err("a SPIFFE prefix ends with / (so ns/shop/ never matches ns/shopping)".into());
    };
    SpiffeId::parse(id)
        .map(|_| ())
        .map_err(|e| format!("{:?} is not a valid SPIFFE ID: {e}", id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_split_into_trust_domain_and_path() {
        for (id, td, path) in [
            ("spiffe://example.internal", "example.internal", ""),
            (
                "spiffe://example.internal/ns/shop/sa/frontend",
                "example.internal",
                "/ns/shop/sa/frontend",
            ),
            ("spiffe://a_b-c.1/X.y-Z_9", "a_b-c.1", "/X.y-Z_9"),
            ("spiffe://10.0.0.1/...x/a..b", "10.0.0.1", "/...x/a..b"),
        ] {
            let parsed = SpiffeId::parse(id).unwrap_or_else(|e| panic!("{id}: {e}"));
            assert_eq!((parsed.trust_domain(), parsed.path()), (td, path), "{id}");
        }
    }

    #[test]
    fn every_spelling_the_specification_forbids_is_refused() {
        use SpiffeError::*;
        let long_path = format!("spiffe://td/{}", "a".repeat(MAX_ID_LEN));
        let long_td = format!("spiffe://{}", "a".repeat(MAX_TRUST_DOMAIN_LEN + 1));
        for (id, why) in [
            ("spiffe://example.internal/ns/shop/sa/bad/", EmptySegment),
            ("spiffe://example.internal/ns//sa/bad", EmptySegment),
            ("spiffe://example.internal/", EmptySegment),
            ("spiffe://example.internal/ns/shop/./sa/bad", DotSegment),
            (
                "spiffe://example.internal/ns/shop/../shop/sa/bad",
                DotSegment,
            ),
            ("spiffe://example.internal/ns/shop/sa/%62ad", PathChar('%')),
            ("spiffe://example%2einternal/x", TrustDomainChar('%')),
            (
                "spiffe://EXAMPLE.internal/ns/shop/sa/bad",
                TrustDomainChar('E'),
            ),
            ("SPIFFE://example.internal/ns/shop/sa/bad", SchemeCase),
            ("Spiffe://example.internal/x", SchemeCase),
            ("spiffe:/example.internal/x", SchemeCase),
            ("spiffe://example.internal:8443/x", TrustDomainChar(':')),
            ("spiffe://user@example.internal/x", TrustDomainChar('@')),
            ("spiffe://example.internal/x?y=1", QueryOrFragment),
            ("spiffe://example.internal/x#y", QueryOrFragment),
            ("spiffe:///x", EmptyTrustDomain),
            ("spiffe://[::1]/x", TrustDomainChar('[')),
            ("spiffe://example.internal./x", TrustDomainDots),
            ("spiffe://.example.internal/x", TrustDomainDots),
            ("spiffe://example..internal/x", TrustDomainDots),
            ("spiffe://./x", TrustDomainDots),
            ("spiffe://example.internal/sa/caf\u{e9}", PathChar('\u{e9}')),
            (&long_path, TooLong),
            (&long_td, TrustDomainTooLong),
        ] {
            assert_eq!(SpiffeId::parse(id), Err(why), "{id}");
        }
    }

    #[test]
    fn any_case_of_the_scheme_claims_spiffe() {
        assert!(claims_spiffe("spiffe://td/x"));
        assert!(claims_spiffe("SpIfFe://td/x"));
        assert!(claims_spiffe("spiffe:td"));
        assert!(!claims_spiffe("https://td/x"));
        assert!(!claims_spiffe("urn:spiffe:x"));
    }

    #[test]
    fn prefixes_are_ids_with_a_trailing_slash() {
        assert!(check_prefix("spiffe://td/").is_ok());
        assert!(check_prefix("spiffe://td/ns/shop/").is_ok());
        assert!(check_prefix("spiffe://td/ns/shop").is_err());
        assert!(check_prefix("spiffe://td/ns//").is_err());
        assert!(check_prefix("spiffe://td/./").is_err());
        assert!(check_prefix("spiffe:///").is_err());
        assert!(check_prefix("https://td/ns/").is_err());
    }
}

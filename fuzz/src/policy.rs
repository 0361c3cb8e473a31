//! The policy matcher against a plain reference: a certificate with
//! fuzzer-chosen names (built with rcgen, read by the gateway's own
//! `Identity::from_leaf`) meets a route with fuzzer-chosen rules and source
//! networks; the gateway's verdict must equal one computed directly from
//! the raw strings with the simplest rules there are (exact text, DNS
//! compared case-blind without the root's dot, SPIFFE prefixes by whole
//! path segments, every address and network in one 128-bit space). Every
//! rule that parses must also print back to itself.
//!
//! The pieces names are built from are few on purpose, so the fuzzer makes
//! names that nearly match: other case, a trailing dot, `shop` against
//! `shopping`, mapped IPv4 addresses against IPv4 networks.

use std::net::IpAddr;
use std::sync::OnceLock;

use gateway::identity::Identity;
use gateway::policy::{IdentityRule, Policy, Subject, Verdict};
use ipnet::IpNet;

pub fn policy(data: &[u8]) {
    let mut input = Input(data);
    let Some(case) = Case::read(&mut input) else {
        return;
    };
    // A rule the config would refuse never reaches a route.
    let (Some(allow), Some(deny)) = (rules(&case.allow), rules(&case.deny)) else {
        return;
    };
    let Some(der) = leaf(&case) else {
        return;
    };
    // The gateway refuses the certificate itself: no decision to compare.
    let Ok(identity) = Identity::from_leaf(&der) else {
        return;
    };
    let policy = Policy {
        allow,
        deny,
        allow_sources: case
            .allow_sources
            .iter()
            .map(|n| gateway::policy::canonical_net(*n))
            .collect(),
        deny_sources: case
            .deny_sources
            .iter()
            .map(|n| gateway::policy::canonical_net(*n))
            .collect(),
        time_windows: Vec::new(),
        match_common_name: case.match_common_name,
        device_san_prefix: case.device.then(|| DEVICE_PREFIX.to_owned()),
    };
    let verdict = policy.decide(Subject {
        identity: &identity,
        source: case.source,
        now: jiff::Timestamp::UNIX_EPOCH,
    });
    let expected = reference(&case);
    let got = matches!(verdict, Verdict::Allow { .. });
    assert_eq!(
        got, expected,
        "the gateway says {verdict:?}, the reference says allow={expected}\n{case:#?}\nidentity {identity:?}"
    );
}

const DEVICE_PREFIX: &str = "spiffe://example.internal/device/";

#[derive(Debug)]
struct Case {
    match_common_name: bool,
    device: bool,
    allow: Vec<String>,
    deny: Vec<String>,
    uris: Vec<String>,
    dns: Vec<String>,
    emails: Vec<String>,
    common_name: Option<String>,
    source: IpAddr,
    allow_sources: Vec<IpNet>,
    deny_sources: Vec<IpNet>,
}

impl Case {
    fn read(i: &mut Input<'_>) -> Option<Case> {
        let flags = i.byte()?;
        let list = |i: &mut Input<'_>, max: u8, f: fn(&mut Input<'_>) -> Option<String>| {
            let n = i.byte()? % (max + 1);
            (0..n).map(|_| f(i)).collect::<Option<Vec<_>>>()
        };
        let allow = list(i, 4, rule_text)?;
        let deny = list(i, 2, rule_text)?;
        let uris = list(i, 3, uri_text)?;
        let dns = list(i, 2, dns_text)?;
        let emails = list(i, 2, email_text)?;
        let common_name = if flags & 4 != 0 { Some(cn_text(i)?) } else { None };
        let source = source(i)?;
        let allow_sources = (0..i.byte()? % 3).map(|_| net(i)).collect::<Option<_>>()?;
        let deny_sources = (0..i.byte()? % 3).map(|_| net(i)).collect::<Option<_>>()?;
        Some(Case {
            match_common_name: flags & 1 != 0,
            device: flags & 2 != 0,
            allow,
            deny,
            uris,
            dns,
            emails,
            common_name,
            source,
            allow_sources,
            deny_sources,
        })
    }
}

/// Parsed rules, each printing back to itself; None if one is refused.
fn rules(texts: &[String]) -> Option<Vec<IdentityRule>> {
    let mut out = Vec::new();
    for t in texts {
        let rule = IdentityRule::try_from(t.clone()).ok()?;
        let again = IdentityRule::try_from(rule.to_string());
        assert_eq!(
            again.as_ref(),
            Ok(&rule),
            "{t:?} parsed as {rule:?}, which prints as {:?}",
            rule.to_string()
        );
        out.push(rule);
    }
    Some(out)
}

/// The client leaf: the case's names, clientAuth, self-signed with one key
/// (its chain is not what is tested here).
fn leaf(case: &Case) -> Option<Vec<u8>> {
    use rcgen::{
        CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, SanType, string::Ia5String,
    };
    static KEY: OnceLock<Option<KeyPair>> = OnceLock::new();
    let key = KEY.get_or_init(|| KeyPair::generate().ok()).as_ref()?;
    let mut params = CertificateParams::default();
    let ia5 = |s: &String| Ia5String::try_from(s.as_str()).ok();
    for u in &case.uris {
        params.subject_alt_names.push(SanType::URI(ia5(u)?));
    }
    for d in &case.dns {
        params.subject_alt_names.push(SanType::DnsName(ia5(d)?));
    }
    for e in &case.emails {
        params.subject_alt_names.push(SanType::Rfc822Name(ia5(e)?));
    }
    params.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(cn) = &case.common_name {
        params.distinguished_name.push(DnType::CommonName, cn.as_str());
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    Some(params.self_signed(key).ok()?.der().to_vec())
}

/// The verdict from the raw strings, written as plainly as it can be.
fn reference(c: &Case) -> bool {
    let cn_state = match &c.common_name {
        None => Cn::None,
        Some(t) if !t.is_empty() && !t.chars().any(char::is_control) => Cn::One(t),
        Some(_) => Cn::Unclear,
    };
    if c.match_common_name && cn_state == Cn::Unclear {
        return false;
    }
    let matches = |rule: &str| -> bool {
        if let Some(v) = rule.strip_prefix("dns:") {
            return c.dns.iter().any(|d| dns_eq(d, v));
        }
        if let Some(v) = rule.strip_prefix("email:") {
            return c.emails.iter().any(|e| email_eq(e, v));
        }
        if let Some(v) = rule.strip_prefix("cn:") {
            return c.match_common_name && cn_state == Cn::One(v);
        }
        if let Some(p) = rule.strip_prefix("spiffe-prefix:") {
            return c.uris.iter().any(|u| under(u, p));
        }
        c.uris.iter().any(|u| u == rule)
    };
    if c.deny.iter().any(|r| matches(r)) {
        return false;
    }
    let src = v6_space(c.source);
    if c.deny_sources.iter().any(|n| contains(n, src)) {
        return false;
    }
    if !c.allow_sources.is_empty() && !c.allow_sources.iter().any(|n| contains(n, src)) {
        return false;
    }
    if c.device
        && !c
            .uris
            .iter()
            .any(|u| u.starts_with(DEVICE_PREFIX) && u.len() > DEVICE_PREFIX.len())
    {
        return false;
    }
    if c.allow.is_empty() {
        return false;
    }
    let has_san = !(c.uris.is_empty() && c.dns.is_empty() && c.emails.is_empty());
    let has_cn = c.match_common_name && matches!(cn_state, Cn::One(_));
    if !has_san && !has_cn {
        return false;
    }
    c.allow.iter().any(|r| matches(r))
}

#[derive(Debug, PartialEq, Eq)]
enum Cn<'a> {
    None,
    One(&'a str),
    Unclear,
}

fn dns_eq(a: &str, b: &str) -> bool {
    let plain = |s: &str| s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    plain(a) == plain(b)
}

fn email_eq(a: &str, b: &str) -> bool {
    match (a.rsplit_once('@'), b.rsplit_once('@')) {
        (Some((la, da)), Some((lb, db))) => la == lb && dns_eq(da, db),
        _ => false,
    }
}

/// `uri` lies under the prefix by whole path segments, and below it.
fn under(uri: &str, prefix: &str) -> bool {
    let p: Vec<&str> = prefix.trim_end_matches('/').split('/').collect();
    let u: Vec<&str> = uri.split('/').collect();
    u.len() > p.len() && u[..p.len()] == p[..]
}

/// An address in IPv6's space: IPv4 as its mapped form.
fn v6_space(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// A network as written, in the same space: an IPv4 /n is the mapped /n+96.
fn contains(net: &IpNet, a: u128) -> bool {
    let (base, len) = match net {
        IpNet::V4(n) => (v6_space(IpAddr::V4(n.network())), u32::from(n.prefix_len()) + 96),
        IpNet::V6(n) => (u128::from(n.network()), u32::from(n.prefix_len())),
    };
    len == 0 || (a ^ base) >> (128 - len) == 0
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn pick<'s>(&mut self, from: &[&'s str]) -> Option<&'s str> {
        from.get(usize::from(self.byte()?) % from.len()).copied()
    }

    /// Sometimes flips the case of one letter, sometimes adds a dot.
    fn spell(&mut self, s: &str) -> Option<String> {
        let b = self.byte()?;
        let mut s = s.to_owned();
        if b & 1 != 0 {
            s = s.to_ascii_uppercase();
        }
        if b & 2 != 0 {
            s.push('.');
        }
        Some(s)
    }
}

const TRUST_DOMAINS: &[&str] = &["example.internal", "Example.internal", "example.internal.", "other.internal"];
const SEGMENTS: &[&str] = &["ns", "shop", "shopping", "sa", "frontend", "device", "", ".", "a%2Fb"];
const HOSTS: &[&str] = &["api.example.internal", "API.example.internal", "example.internal", "x"];
const LOCALS: &[&str] = &["ops", "Ops", "a.b", "x"];

fn spiffe(i: &mut Input<'_>) -> Option<String> {
    let mut s = format!("spiffe://{}", i.pick(TRUST_DOMAINS)?);
    for _ in 0..i.byte()? % 4 {
        s.push('/');
        s.push_str(i.pick(SEGMENTS)?);
    }
    Some(s)
}

fn uri_text(i: &mut Input<'_>) -> Option<String> {
    match i.byte()? % 4 {
        0 | 1 => spiffe(i),
        2 => Some(format!("https://{}/x", i.pick(HOSTS)?)),
        _ => Some(format!("{DEVICE_PREFIX}{}", i.pick(SEGMENTS)?)),
    }
}

fn dns_text(i: &mut Input<'_>) -> Option<String> {
    let h = i.pick(HOSTS)?;
    i.spell(h)
}

fn email_text(i: &mut Input<'_>) -> Option<String> {
    let l = i.pick(LOCALS)?;
    let h = i.pick(HOSTS)?;
    let h = i.spell(h)?;
    Some(format!("{l}@{h}"))
}

fn cn_text(i: &mut Input<'_>) -> Option<String> {
    Some(i.pick(&["legacy", "Legacy", "", "bad\u{7}name", "ops"])?.to_owned())
}

fn rule_text(i: &mut Input<'_>) -> Option<String> {
    Some(match i.byte()? % 6 {
        0 => uri_text(i)?,
        1 => {
            let mut p = spiffe(i)?;
            if i.byte()? & 1 == 0 {
                p.push('/');
            }
            format!("spiffe-prefix:{p}")
        }
        2 => format!("dns:{}", dns_text(i)?),
        3 => format!("email:{}", email_text(i)?),
        4 => format!("cn:{}", cn_text(i)?),
        _ => format!("{DEVICE_PREFIX}{}", i.pick(SEGMENTS)?),
    })
}

fn source(i: &mut Input<'_>) -> Option<IpAddr> {
    i.pick(&[
        "10.0.0.1",
        "10.1.2.3",
        "192.0.2.10",
        "::ffff:10.0.0.1",
        "::ffff:192.0.2.10",
        "2001:db8::1",
        "::1",
    ])?
    .parse()
    .ok()
}

fn net(i: &mut Input<'_>) -> Option<IpNet> {
    i.pick(&[
        "10.0.0.0/8",
        "10.1.0.0/16",
        "192.0.2.0/24",
        "0.0.0.0/0",
        "::ffff:10.0.0.0/104",
        "::ffff:0:0/96",
        "::ffff:0:0/95",
        "::/0",
        "::/1",
        "2001:db8::/32",
        "::1/128",
    ])?
    .parse()
    .ok()
}

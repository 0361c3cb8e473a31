//! `issuer.toml`: where the issuer listens, which CA signs, which devices
//! may ask, which provider vouches for users, and what a user gets.
//!
//! Relative paths are read from the config file's directory, as the
//! gateway's own config does.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::{CrlExpired, duration};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error(
        "{path}: {field} changed: that takes a restart of the issuer (the previous config stays in service)"
    )]
    NeedsRestart { path: PathBuf, field: &'static str },
}

/// The longest lifetime a profile may allow: the point of issuing from
/// single sign-on is that access ends soon after the provider stops
/// vouching for the user (no renewal), so a week is already generous.
pub const LONGEST_LIFETIME: Duration = Duration::from_secs(7 * 86_400);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    pub listen: SocketAddr,
    /// The user the issuer runs as, started as root: once `listen` and
    /// `metrics_listen` are bound and before anything is read from the
    /// network or `ca_dir`, it takes this user's uid and group, no
    /// supplementary groups and no capabilities (see
    /// `privilege::drop_alone`). `ca_dir` must be this user's. None: the
    /// issuer stays who it was started as (warned about when root).
    #[serde(default)]
    pub user: Option<String>,
    /// Where `GET /metrics` is served, in plain HTTP, to whoever reaches
    /// it: a loopback address only (scrape it from the host, or through a
    /// local agent), as the gateway's own `admin`. None: not served. Never
    /// on `listen`, where any client may connect without a certificate.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// The issuer's own certificate chain and key (serverAuth).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Read a key others may read anyway (as the gateway's option).
    #[serde(default)]
    pub allow_shared_keys: bool,
    /// The `gateway pki` directory whose intermediate signs user certificates.
    pub ca_dir: PathBuf,
    /// How long each CRL the issuer signs for `ca_dir` is valid (its
    /// nextUpdate), as `gateway pki crl --next-update`.
    #[serde(
        default = "default_crl_next_update",
        deserialize_with = "duration::deserialize"
    )]
    pub crl_next_update: Duration,
    /// The issuer re-signs that CRL once its nextUpdate is closer than
    /// this: with the defaults (7d, 6d) daily, so a CRL that cannot be
    /// re-signed leaves six days to notice (the failures are logged and
    /// counted) before routes with `crl_expired = "refuse"` refuse users.
    #[serde(
        default = "default_crl_republish_before",
        deserialize_with = "duration::deserialize"
    )]
    pub crl_republish_before: Duration,
    /// Entries of `ca_dir`'s index.json whose certificate expired more
    /// than this long ago are dropped when the CRL is re-signed (a revoked
    /// one leaves the CRL with it): the issuer adds one per sign-in.
    #[serde(
        default = "default_index_retention",
        deserialize_with = "duration::deserialize"
    )]
    pub index_retention: Duration,
    /// The CA that enrolled devices: the issuance endpoint wants a
    /// certificate from it.
    pub device_trust: DeviceTrust,
    /// The device's URI SAN starts with this, e.g.
    /// "spiffe://example.internal/device/"; it is copied into the user's
    /// certificate for the routes' `device.san_prefix`.
    pub device_san_prefix: String,
    pub oidc: Oidc,
    /// `[profile]`: the one profile, named `default`; or `[profile.NAME]`
    /// tables, one per profile (`gateway login --profile NAME`).
    pub profile: Profiles,
    #[serde(default)]
    pub limits: Limits,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceTrust {
    pub ca: PathBuf,
    #[serde(default)]
    pub crls: Vec<PathBuf>,
    #[serde(default)]
    pub crl_expired: CrlExpired,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Oidc {
    /// The provider's issuer identifier: `iss` must equal it, and
    /// discovery is read from `{issuer}/.well-known/openid-configuration`.
    pub issuer: String,
    /// The client registered for `gateway login`: `aud` must contain it.
    pub client_id: String,
    /// Trust anchors for the provider's TLS (default: the system's).
    pub ca: Option<PathBuf>,
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// Clock skew allowed on exp, nbf and iat.
    #[serde(default = "default_leeway", deserialize_with = "duration::deserialize")]
    pub leeway: Duration,
    /// An ID token older than this (by `iat`) is refused: it was meant to
    /// be exchanged at once.
    #[serde(
        default = "default_max_token_age",
        deserialize_with = "duration::deserialize"
    )]
    pub max_token_age: Duration,
    /// An unknown `kid` refetches the JWKS at most this often.
    #[serde(
        default = "default_jwks_refetch",
        deserialize_with = "duration::deserialize"
    )]
    pub jwks_refetch_interval: Duration,
}

fn default_crl_next_update() -> Duration {
    Duration::from_secs(7 * 86_400)
}
fn default_crl_republish_before() -> Duration {
    Duration::from_secs(6 * 86_400)
}
fn default_index_retention() -> Duration {
    Duration::from_secs(30 * 86_400)
}
fn default_scopes() -> Vec<String> {
    vec!["openid".into(), "email".into()]
}
fn default_leeway() -> Duration {
    Duration::from_secs(30)
}
fn default_max_token_age() -> Duration {
    Duration::from_secs(600)
}
fn default_jwks_refetch() -> Duration {
    Duration::from_secs(10)
}

/// The profile a request that names none gets.
pub const DEFAULT_PROFILE: &str = "default";

/// The issuer's profiles by name. `[profile]` with its fields is the one
/// profile, named `default` (as before several profiles existed); with
/// `[profile.NAME]` tables each is a profile, and fields directly under
/// `[profile]` beside them are refused rather than guessed at (defaults
/// for the others? a profile of their own?). Names go into certificates,
/// logs and metric labels: 1 to 32 of `a-z`, `0-9`, `-`, `_`.
#[derive(Debug, Clone)]
pub struct Profiles {
    by_name: std::collections::BTreeMap<String, Profile>,
    /// `[profile]` alone: its fields are named `profile.FIELD` in errors.
    unnamed: bool,
}

impl Profiles {
    /// The profile `name` names, or `default` for none.
    pub fn get(&self, name: Option<&str>) -> Option<(&str, &Profile)> {
        self.by_name
            .get_key_value(name.unwrap_or(DEFAULT_PROFILE))
            .map(|(n, p)| (n.as_str(), p))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Profile)> {
        self.by_name.iter().map(|(n, p)| (n.as_str(), p))
    }

    pub fn names(&self) -> Vec<&str> {
        self.by_name.keys().map(String::as_str).collect()
    }

    /// How a profile's field is named in errors.
    fn field(&self, name: &str, field: &str) -> String {
        if self.unnamed {
            format!("profile.{field}")
        } else {
            format!("profile.{name}.{field}")
        }
    }
}

/// A profile name: what a certificate, a log line and a metric label carry.
pub fn valid_profile_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_'))
}

impl<'de> Deserialize<'de> for Profiles {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let table = toml::Table::deserialize(d)?;
        let (named, fields): (Vec<_>, Vec<_>) = table.iter().partition(|(_, v)| v.is_table());
        if named.is_empty() {
            let p: Profile = toml::Value::Table(table)
                .try_into()
                .map_err(D::Error::custom)?;
            return Ok(Profiles {
                by_name: [(DEFAULT_PROFILE.to_owned(), p)].into(),
                unnamed: true,
            });
        }
        if !fields.is_empty() {
            let loose: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
            return Err(D::Error::custom(format!(
                "fields directly under [profile] ({}) beside [profile.NAME] tables: put each in a named profile ([profile.{DEFAULT_PROFILE}] is the one `gateway login` gets without --profile)",
                loose.join(", ")
            )));
        }
        let mut by_name = std::collections::BTreeMap::new();
        for (name, v) in table {
            if !valid_profile_name(&name) {
                return Err(D::Error::custom(format!(
                    "[profile.{name}]: a profile name is 1 to 32 of a-z, 0-9, '-', '_' (it goes into certificates, logs and metric labels)"
                )));
            }
            let p: Profile = v
                .try_into()
                .map_err(|e| D::Error::custom(format!("[profile.{name}]: {e}")))?;
            by_name.insert(name, p);
        }
        Ok(Profiles {
            by_name,
            unnamed: false,
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    #[serde(
        default = "default_lifetime",
        deserialize_with = "duration::deserialize"
    )]
    pub default_lifetime: Duration,
    /// The hard maximum: a request for more is refused, not shortened.
    #[serde(
        default = "default_max_lifetime",
        deserialize_with = "duration::deserialize"
    )]
    pub max_lifetime: Duration,
    /// MFA: the token's `amr` must contain one of these…
    #[serde(default)]
    pub require_amr: Vec<String>,
    /// …or its `acr` be one of these (either list satisfies; both empty:
    /// no MFA required).
    #[serde(default)]
    pub require_acr: Vec<String>,
    /// How long ago the user may have authenticated at the provider: the
    /// token's `auth_time` must be within it (and present), and `gateway
    /// login` asks the provider for it (`max_age`), so a provider session
    /// whose MFA was days ago does not keep minting certificates. None:
    /// not checked.
    #[serde(default, deserialize_with = "duration::option::deserialize")]
    pub max_auth_age: Option<Duration>,
    /// A SPIFFE-style URI SAN for the user; `{local}` is the email's local part.
    pub user_uri: Option<String>,
    /// Only users whose verified email is in one of these domains.
    pub email_domains: Vec<String>,
    /// Whether the certificate carries the user's `email:` SAN (and the
    /// email as its CN). With several profiles at most one may: routes
    /// match names, not profiles, so a name two profiles issue lets the
    /// looser one pass every route written for the stricter. The others
    /// say `false` and name the user by a `user_uri` of their own (their
    /// CN is `PROFILE:EMAIL`, which no `cn:` rule for the email matches).
    #[serde(default = "yes")]
    pub email_san: bool,
    /// A URI SAN per group of the token's `groups` claim that is listed in
    /// `groups`; `{group}` is the group's name. Routes then allow a group:
    /// `allow = ["spiffe://example.internal/group/sre"]`.
    pub group_uri: Option<String>,
    /// The groups that become SANs (others in the token are left out, so a
    /// user in hundreds of groups does not get a certificate naming them).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Accept ID tokens without a nonce, as the device authorization grant
    /// (RFC 8628, `gateway login --device-flow`) yields them with common
    /// providers. Each such token is taken once, but it is not bound to
    /// the device that asked for it, so this is off unless headless
    /// machines need it.
    #[serde(default)]
    pub device_grant: bool,
    /// Renewal without the user: `gateway login` asks the provider for a
    /// refresh token (`offline_access`), and `gateway login --renew`
    /// trades it for a fresh ID token, which `POST /v1/renewal` takes
    /// only from the device whose sign-in it continues, once, and only
    /// while that sign-in's `auth_time` is within `max_auth_age` (so
    /// this needs `max_auth_age`). Off: every certificate needs the user
    /// at the provider (docs/sso.md, "Renewal without the user").
    #[serde(default)]
    pub refresh: bool,
    /// `device_grant` and `refresh` together, accepted as they are: a
    /// device code phished under this profile (docs/sso.md, "Headless
    /// machines") then also renews the victim's certificate on the
    /// attacker's device until `max_auth_age`, wherever the provider puts
    /// the attacker's nonce in device-grant tokens. Without it that pair
    /// is a config error (fail closed).
    #[serde(default)]
    pub device_grant_refresh: bool,
}

fn default_lifetime() -> Duration {
    Duration::from_secs(8 * 3600)
}
fn yes() -> bool {
    true
}
fn default_max_lifetime() -> Duration {
    Duration::from_secs(12 * 3600)
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default)]
    pub per_user: Rate,
    #[serde(default)]
    pub per_device: Rate,
}

/// A token bucket: `burst` at once, refilled at `per_hour`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub burst: u32,
    pub per_hour: u32,
}

impl Default for Rate {
    fn default() -> Self {
        Rate {
            burst: 5,
            per_hour: 20,
        }
    }
}

impl IssuerConfig {
    /// Whether `new` (read from `path` on SIGHUP) may replace this config
    /// in a running issuer. The profiles, the device trust and prefix,
    /// the issuer's certificate and the CRL timings take effect at once;
    /// what the issuer bound or built from at start does not, so a change
    /// there is refused as a whole rather than half applied: the
    /// listeners' addresses, the CA directory it signs with, the provider
    /// (keys cached, tokens checked against it) and the rate limits (their
    /// buckets).
    pub fn check_reload(&self, new: &IssuerConfig, path: &Path) -> Result<(), ConfigError> {
        let changed = [
            ("listen", self.listen != new.listen),
            ("user", self.user != new.user),
            ("metrics_listen", self.metrics_listen != new.metrics_listen),
            ("ca_dir", self.ca_dir != new.ca_dir),
            ("oidc", self.oidc != new.oidc),
            ("limits", self.limits != new.limits),
        ];
        match changed.iter().find(|(_, c)| *c) {
            Some((field, _)) => Err(ConfigError::NeedsRestart {
                path: path.to_owned(),
                field,
            }),
            None => Ok(()),
        }
    }

    pub fn load(path: &Path) -> Result<IssuerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, path, base)
    }

    pub fn parse(text: &str, path: &Path, base: &Path) -> Result<IssuerConfig, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let mut c: IssuerConfig =
            serde_path_to_error::deserialize(de).map_err(|e| ConfigError::Parse {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        let invalid = |field: String, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            message,
        };
        for (name, p) in c.profile.iter() {
            let field = |f: &str| c.profile.field(name, f);
            check_profile(p, field).map_err(|(field, message)| invalid(field, message))?;
        }
        check_profiles_apart(&c.profile).map_err(|(field, message)| invalid(field, message))?;
        if !crate::spiffe::claims_spiffe(&c.device_san_prefix)
            || !c.device_san_prefix.ends_with('/')
        {
            return Err(invalid(
                "device_san_prefix".into(),
                format!(
                    "{:?}: expected a spiffe:// prefix ending in '/', as routes' device.san_prefix",
                    c.device_san_prefix
                ),
            ));
        }
        // A user's or group's URI under the device prefix would be read by
        // routes as the device (the first URI under it), so a mailbox named
        // like a laptop would sign in as that laptop.
        for (name, p) in c.profile.iter() {
            for (f, t) in uri_templates(p) {
                let x = before_placeholder(t);
                if x.starts_with(&c.device_san_prefix) || c.device_san_prefix.starts_with(x) {
                    return Err(invalid(
                        c.profile.field(name, f),
                        format!(
                            "{t:?} can issue a URI under device_san_prefix {:?}: routes would read it as the device",
                            c.device_san_prefix
                        ),
                    ));
                }
            }
        }
        if let Some(m) = c.metrics_listen
            && !m.ip().is_loopback()
        {
            return Err(invalid(
                "metrics_listen".into(),
                format!(
                    "{m}: a loopback address only (metrics are served in plain HTTP to whoever reaches them)"
                ),
            ));
        }
        // Checked every minute: at least an hour between re-signings, and
        // at least an hour for retries before the CRL goes stale.
        let hour = Duration::from_secs(3600);
        if c.crl_republish_before < hour
            || c.crl_next_update.saturating_sub(c.crl_republish_before) < hour
        {
            return Err(invalid(
                "crl_republish_before".into(),
                format!(
                    "{:?}: at least 1h, and at least 1h below crl_next_update ({:?})",
                    c.crl_republish_before, c.crl_next_update
                ),
            ));
        }
        if !c.oidc.issuer.starts_with("https://") {
            return Err(invalid(
                "oidc.issuer".into(),
                "must be https://: the ID token's keys are fetched from it".into(),
            ));
        }
        for r in [c.limits.per_user, c.limits.per_device] {
            if r.burst == 0 || r.per_hour == 0 {
                return Err(invalid(
                    "limits".into(),
                    "burst and per_hour must be above zero".into(),
                ));
            }
        }
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut c.cert);
        resolve(&mut c.key);
        resolve(&mut c.ca_dir);
        resolve(&mut c.device_trust.ca);
        c.device_trust.crls.iter_mut().for_each(resolve);
        if let Some(ca) = &mut c.oidc.ca {
            resolve(ca);
        }
        Ok(c)
    }
}

/// One profile's own rules; `field` names a field of it for the error
/// (`profile.max_lifetime`, or `profile.sre.max_lifetime`).
fn check_profile(p: &Profile, field: impl Fn(&str) -> String) -> Result<(), (String, String)> {
    if p.max_lifetime > LONGEST_LIFETIME {
        return Err((
            field("max_lifetime"),
            "at most 7d: a user certificate should end soon after the provider stops vouching"
                .into(),
        ));
    }
    if p.default_lifetime > p.max_lifetime || p.default_lifetime.is_zero() {
        return Err((
            field("default_lifetime"),
            "must be above zero and at most max_lifetime".into(),
        ));
    }
    if p.refresh && p.max_auth_age.is_none() {
        return Err((
            field("refresh"),
            "needs max_auth_age: without it a refresh token would renew certificates on one MFA forever"
                .into(),
        ));
    }
    match (p.device_grant && p.refresh, p.device_grant_refresh) {
        (true, false) => {
            return Err((
                field("refresh"),
                "with device_grant a phished device code would also renew the victim's certificate on the attacker's device until max_auth_age: give headless machines a profile of their own without refresh, or accept that with device_grant_refresh = true (docs/sso.md, \"Headless machines\")".into(),
            ));
        }
        (false, true) => {
            return Err((
                field("device_grant_refresh"),
                "accepts device_grant and refresh together, but this profile does not have both"
                    .into(),
            ));
        }
        _ => {}
    }
    if p.email_domains.is_empty() {
        return Err((
            field("email_domains"),
            "name at least one domain: the provider may vouch for users the gateway must not admit"
                .into(),
        ));
    }
    if !p.email_san && p.user_uri.is_none() {
        return Err((
            field("email_san"),
            "false needs a user_uri: the certificate must name its user".into(),
        ));
    }
    if let Some(t) = &p.user_uri {
        // Every user a name of their own: without `{local}` all users get
        // one URI; with several domains, `alice@` of each would too.
        if !t.contains("{local}") {
            return Err((
                field("user_uri"),
                format!("{t:?} has no {{local}}: every user would get the same name"),
            ));
        }
        if p.email_domains.len() > 1 && !t.contains("{domain}") {
            return Err((
                field("user_uri"),
                format!(
                    "{t:?} has no {{domain}}, but email_domains lists {}: alice@ of each domain would get the same name (\"spiffe://example.internal/user/{{domain}}/{{local}}\")",
                    p.email_domains.len()
                ),
            ));
        }
        if t.contains("{domain}") {
            // Local parts and domains both hold `.` and `-`: joined within
            // one segment (`{local}.{domain}`), `alice.eu@example.internal`
            // and `alice@eu.example.internal` would be one name. Each a
            // whole path segment, `/` (which neither holds) parts them.
            let path = t.split_once("://").map_or(t.as_str(), |(_, rest)| rest);
            let whole = |ph: &str| {
                path.split('/')
                    .filter(|seg| seg.contains(ph))
                    .all(|seg| seg == ph)
            };
            if !whole("{local}") || !whole("{domain}") {
                return Err((
                    field("user_uri"),
                    format!(
                        "{t:?}: with {{domain}}, {{local}} and {{domain}} must each be a whole path segment (\"spiffe://example.internal/user/{{domain}}/{{local}}\"): joined in one, two users could get one name"
                    ),
                ));
            }
            for d in &p.email_domains {
                let d = d.trim_end_matches('.');
                let segment = !d.is_empty()
                    && !d.starts_with('.')
                    && d.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'));
                if !segment {
                    return Err((
                        field("email_domains"),
                        format!(
                            "{d:?}: a domain user_uri names ({{domain}}) must be one DNS name ([A-Za-z0-9.-])"
                        ),
                    ));
                }
            }
        }
        let sample = t
            .replace("{local}", "user")
            .replace("{domain}", "example.com");
        crate::spiffe::SpiffeId::parse(&sample)
            .map_err(|e| (field("user_uri"), format!("{t:?}: {e}")))?;
        if let Some(g) = &p.group_uri {
            let (xu, xg) = (before_placeholder(t), before_placeholder(g));
            if xu.starts_with(xg) || xg.starts_with(xu) {
                return Err((
                    field("group_uri"),
                    format!(
                        "{g:?} and user_uri {t:?} can issue the same URI, or one under the other: a user named like a group would pass the group's routes; give groups a path of their own"
                    ),
                ));
            }
        }
    }
    match (&p.group_uri, p.groups.is_empty()) {
        (Some(t), false) => {
            for g in &p.groups {
                // One path segment: "sre/admins" would name a group
                // below another's.
                let segment = !g.is_empty()
                    && g != "."
                    && g != ".."
                    && g.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
                if !segment {
                    return Err((
                        field("groups"),
                        format!("{g:?}: a group must be one SPIFFE path segment ([A-Za-z0-9._-])"),
                    ));
                }
                let uri = t.replace("{group}", g);
                crate::spiffe::SpiffeId::parse(&uri)
                    .map_err(|e| (field("groups"), format!("{g:?} makes {uri:?}: {e}")))?;
            }
        }
        (Some(_), true) => {
            return Err((
                field("groups"),
                "group_uri needs the list of groups that become SANs".into(),
            ));
        }
        (None, false) => {
            return Err((
                field("group_uri"),
                "groups are listed but no group_uri says how to name them".into(),
            ));
        }
        (None, true) => {}
    }
    if let Some(t) = &p.group_uri
        && !t.contains("{group}")
    {
        return Err((
            field("group_uri"),
            format!("{t:?} has no {{group}}: every group would get the same name"),
        ));
    }
    Ok(())
}

/// No two profiles issue the same name, so a route that names a
/// profile's users (`email:`, its `user_uri`, its `group_uri`) admits only
/// that profile's certificates: the request picks the profile
/// (`?profile=`), and routes cannot read it (the subject's OU is no rule),
/// so one loose profile would otherwise pass every route written for a
/// strict one, whose MFA, `max_auth_age`, `device_grant` and `refresh`
/// it was meant to hold to.
///
/// The `email:` SAN: at most one profile. URIs: a URI template's text
/// before its placeholder (`{local}`, `{group}`; the whole text without
/// one) is never a prefix of another profile's, so their URIs can neither
/// be equal (two equal URIs share the text before either placeholder, so
/// one of those texts begins the other) nor nest under each other's
/// `spiffe-prefix:`. Cautious: a pair that could not collide
/// (`…/u{local}` and `…/u/{local}`) is refused too; a path per profile
/// (`spiffe://example.internal/kiosk/user/{local}`) always passes.
fn check_profiles_apart(profiles: &Profiles) -> Result<(), (String, String)> {
    let all: Vec<(&str, &Profile)> = profiles.iter().collect();
    for (i, (a, pa)) in all.iter().enumerate() {
        for (b, pb) in all.iter().skip(i + 1) {
            if pa.email_san && pb.email_san {
                return Err((
                    profiles.field(b, "email_san"),
                    format!(
                        "profiles {a:?} and {b:?} both issue the name email:LOCAL@DOMAIN, so a route allowing email:alice@… cannot tell their certificates apart and admits the looser profile's as the stricter's: set email_san = false in all profiles but one (each of them then names its users by a user_uri of its own)"
                    ),
                ));
            }
            for (fa, ta) in uri_templates(pa) {
                for (fb, tb) in uri_templates(pb) {
                    let (xa, xb) = (before_placeholder(ta), before_placeholder(tb));
                    if xa.starts_with(xb) || xb.starts_with(xa) {
                        return Err((
                            profiles.field(b, fb),
                            format!(
                                "{tb:?} of profile {b:?} and {fa} {ta:?} of profile {a:?} can issue the same URI, or one under the other, so routes cannot tell the profiles' certificates apart: give each profile a path of its own (\"spiffe://example.internal/{b}/user/{{local}}\")"
                            ),
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

/// A profile's URI SAN templates, by field.
fn uri_templates(p: &Profile) -> impl Iterator<Item = (&'static str, &str)> {
    [("user_uri", &p.user_uri), ("group_uri", &p.group_uri)]
        .into_iter()
        .filter_map(|(f, t)| t.as_deref().map(|t| (f, t)))
}

/// A template's fixed text before its first placeholder (all of it without
/// one): `{` is no SPIFFE ID character, so the first is a placeholder's.
fn before_placeholder(t: &str) -> &str {
    t.split('{').next().unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen = "127.0.0.1:8443"
cert = "issuer.pem"
key = "issuer.key"
ca_dir = "sso"
device_trust = { ca = "devices/ca.pem", crls = ["devices/crl.pem"] }
device_san_prefix = "spiffe://example.internal/device/"
[oidc]
issuer = "https://login.example.com"
client_id = "gateway"
[profile]
require_amr = ["mfa"]
user_uri = "spiffe://example.internal/user/{local}"
email_domains = ["example.internal"]
"#;

    fn parse(text: &str) -> Result<IssuerConfig, ConfigError> {
        IssuerConfig::parse(text, Path::new("issuer.toml"), Path::new("/etc/gw"))
    }

    #[test]
    fn defaults_and_relative_paths() {
        let c = parse(GOOD).unwrap();
        let (name, p) = c.profile.get(None).unwrap();
        assert_eq!(name, "default", "[profile] alone is the default profile");
        assert_eq!(p.default_lifetime, Duration::from_secs(8 * 3600));
        assert_eq!(p.max_lifetime, Duration::from_secs(12 * 3600));
        assert_eq!(c.oidc.leeway, Duration::from_secs(30));
        assert_eq!(c.ca_dir, PathBuf::from("/etc/gw/sso"));
        assert_eq!(
            c.device_trust.crls,
            vec![PathBuf::from("/etc/gw/devices/crl.pem")]
        );
    }

    #[test]
    fn lifetimes_beyond_the_hard_maximum_are_refused() {
        let long = GOOD.replace("[profile]\n", "[profile]\nmax_lifetime = \"8d\"\n");
        let e = parse(&long).unwrap_err().to_string();
        assert!(e.contains("profile.max_lifetime"), "{e}");
        let above = GOOD.replace("[profile]\n", "[profile]\ndefault_lifetime = \"13h\"\n");
        let e = parse(&above).unwrap_err().to_string();
        assert!(e.contains("profile.default_lifetime"), "{e}");
    }

    #[test]
    fn an_http_provider_a_bad_prefix_and_no_domains_are_refused() {
        let http = GOOD.replace("https://login", "http://login");
        assert!(
            parse(&http)
                .unwrap_err()
                .to_string()
                .contains("oidc.issuer")
        );
        let prefix = GOOD.replace("device/\"", "device\"");
        assert!(
            parse(&prefix)
                .unwrap_err()
                .to_string()
                .contains("device_san_prefix")
        );
        let domains = GOOD.replace(
            "email_domains = [\"example.internal\"]",
            "email_domains = []",
        );
        assert!(
            parse(&domains)
                .unwrap_err()
                .to_string()
                .contains("email_domains")
        );
        let uri = GOOD.replace("/user/{local}", "/user/{local}/");
        assert!(parse(&uri).unwrap_err().to_string().contains("user_uri"));
        let groups = GOOD.replace(
            "email_domains",
            "group_uri = \"spiffe://example.internal/group/{group}\"\ngroups = [\"sre\", \"a/b\"]\nemail_domains",
        );
        assert!(parse(&groups).unwrap_err().to_string().contains("\"a/b\""));
        let no_list = GOOD.replace(
            "email_domains",
            "group_uri = \"spiffe://example.internal/group/{group}\"\nemail_domains",
        );
        assert!(
            parse(&no_list)
                .unwrap_err()
                .to_string()
                .contains("profile.groups")
        );
        let open = GOOD.replace(
            "listen = \"127.0.0.1:8443\"",
            "listen = \"127.0.0.1:8443\"\nmetrics_listen = \"0.0.0.0:9464\"",
        );
        assert!(
            parse(&open)
                .unwrap_err()
                .to_string()
                .contains("metrics_listen")
        );
        let refresh = GOOD.replace("[profile]\n", "[profile]\nrefresh = true\n");
        let e = parse(&refresh).unwrap_err().to_string();
        assert!(
            e.contains("profile.refresh") && e.contains("max_auth_age"),
            "{e}"
        );
        let bounded = GOOD.replace(
            "[profile]\n",
            "[profile]\nrefresh = true\nmax_auth_age = \"12h\"\n",
        );
        assert!(
            parse(&bounded)
                .unwrap()
                .profile
                .get(None)
                .unwrap()
                .1
                .refresh
        );
        // S3-4: device_grant with refresh only when accepted as such.
        let both = GOOD.replace(
            "[profile]\n",
            "[profile]\nrefresh = true\nmax_auth_age = \"12h\"\ndevice_grant = true\n",
        );
        let e = parse(&both).unwrap_err().to_string();
        assert!(
            e.contains("profile.refresh") && e.contains("phished device code"),
            "{e}"
        );
        let accepted = both.replace("[profile]\n", "[profile]\ndevice_grant_refresh = true\n");
        assert!(
            parse(&accepted)
                .unwrap()
                .profile
                .get(None)
                .unwrap()
                .1
                .device_grant_refresh
        );
        let alone = GOOD.replace("[profile]\n", "[profile]\ndevice_grant_refresh = true\n");
        let e = parse(&alone).unwrap_err().to_string();
        assert!(e.contains("profile.device_grant_refresh"), "{e}");
        let unknown = format!("{GOOD}\nsurprise = 1\n");
        assert!(
            parse(&unknown)
                .unwrap_err()
                .to_string()
                .contains("surprise")
        );
    }

    #[test]
    fn named_profiles_each_checked_and_not_mixed_with_loose_fields() {
        let named = GOOD.replace("[profile]\n", "[profile.default]\n")
            + "[profile.sre]\nemail_domains = [\"example.internal\"]\nmax_lifetime = \"2h\"\ndefault_lifetime = \"1h\"\nemail_san = false\nuser_uri = \"spiffe://example.internal/sre/user/{local}\"\n";
        let c = parse(&named).unwrap();
        assert_eq!(c.profile.names(), vec!["default", "sre"]);
        assert_eq!(
            c.profile.get(Some("sre")).unwrap().1.max_lifetime,
            Duration::from_secs(7200)
        );
        assert_eq!(c.profile.get(None).unwrap().0, "default");
        assert!(c.profile.get(Some("nope")).is_none());
        // Each profile is checked, and its errors name it.
        let bad = named.replace("max_lifetime = \"2h\"", "max_lifetime = \"9d\"");
        let e = parse(&bad).unwrap_err().to_string();
        assert!(e.contains("profile.sre.max_lifetime"), "{e}");
        let unknown = named.replace("max_lifetime = \"2h\"", "max_lifetime = \"2h\"\nmfa = true");
        let e = parse(&unknown).unwrap_err().to_string();
        assert!(e.contains("[profile.sre]") && e.contains("mfa"), "{e}");
        // Fields directly under [profile] beside named ones: refused.
        let mixed = format!("{GOOD}[profile.sre]\nemail_domains = [\"example.internal\"]\n");
        let e = parse(&mixed).unwrap_err().to_string();
        assert!(
            e.contains("fields directly under [profile]") && e.contains("require_amr"),
            "{e}"
        );
        let name = named.replace("[profile.sre]", "[profile.\"SRE team\"]");
        let e = parse(&name).unwrap_err().to_string();
        assert!(e.contains("a profile name is"), "{e}");
    }

    /// S3-1: two profiles never issue the same name (routes match names,
    /// not profiles), refused at load with both profiles and the name.
    #[test]
    fn two_profiles_never_issue_the_same_name() {
        let named = GOOD.replace("[profile]\n", "[profile.default]\n");
        let kiosk = |extra: &str| {
            format!("{named}[profile.kiosk]\nemail_domains = [\"example.internal\"]\n{extra}\n")
        };
        // Both put email:alice@… in: refused, naming both and the name.
        let e = parse(&kiosk("")).unwrap_err().to_string();
        assert!(
            e.contains("profile.kiosk.email_san")
                && e.contains("profiles \"default\" and \"kiosk\"")
                && e.contains("email:LOCAL@DOMAIN"),
            "{e}"
        );
        // Without the email, a user URI is needed, and one of its own.
        let e = parse(&kiosk("email_san = false")).unwrap_err().to_string();
        assert!(
            e.contains("profile.kiosk.email_san") && e.contains("user_uri"),
            "{e}"
        );
        for (uri, why) in [
            ("spiffe://example.internal/user/{local}", "the same URIs"),
            (
                "spiffe://example.internal/user/k-{local}",
                "k-alice is kiosk's alice",
            ),
            (
                "spiffe://example.internal/user/kiosk/{local}",
                "under default's prefix",
            ),
        ] {
            let text = kiosk(&format!("email_san = false\nuser_uri = \"{uri}\""));
            let e = parse(&text).unwrap_err().to_string();
            assert!(
                e.contains("profile.kiosk.user_uri")
                    && e.contains(
                        "\"spiffe://example.internal/user/{local}\" of profile \"default\""
                    )
                    && e.contains("can issue the same URI"),
                "{why}: {e}"
            );
        }
        // A user URI without `{local}` names every user alike (S4-5).
        let e = parse(&kiosk(
            "email_san = false\nuser_uri = \"spiffe://example.internal/kiosk/user\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("profile.kiosk.user_uri") && e.contains("has no {local}"),
            "{e}"
        );
        // Groups are names too, against users' and groups' of others.
        let group = |t: &str| {
            kiosk(&format!(
                "email_san = false\nuser_uri = \"spiffe://example.internal/kiosk/user/{{local}}\"\ngroup_uri = \"{t}\"\ngroups = [\"sre\"]"
            ))
        };
        let e = parse(&group("spiffe://example.internal/user/{group}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("profile.kiosk.group_uri"), "{e}");
        // A path per profile: taken, and so is one profile alone.
        let c = parse(&group("spiffe://example.internal/kiosk/group/{group}")).unwrap();
        assert!(!c.profile.get(Some("kiosk")).unwrap().1.email_san);
        assert!(c.profile.get(None).unwrap().1.email_san);
        assert!(parse(GOOD).unwrap().profile.get(None).unwrap().1.email_san);
    }

    #[test]
    fn a_reload_takes_profiles_but_not_what_needs_a_restart() {
        let old = parse(GOOD).unwrap();
        // A profile's rule and a CRL timing: taken.
        let profiles = GOOD
            .replace("require_amr = [\"mfa\"]", "require_amr = [\"otp\"]")
            .replace(
                "ca_dir = \"sso\"\n",
                "ca_dir = \"sso\"\ncrl_next_update = \"9d\"\n",
            );
        let new = parse(&profiles).unwrap_or_else(|e| panic!("{e}\n{profiles}"));
        old.check_reload(&new, Path::new("issuer.toml")).unwrap();
        for (field, text) in [
            ("listen", GOOD.replace("127.0.0.1:8443", "127.0.0.1:8444")),
            (
                "oidc",
                GOOD.replace("client_id = \"gateway\"", "client_id = \"other\""),
            ),
            (
                "ca_dir",
                GOOD.replace("ca_dir = \"sso\"", "ca_dir = \"sso2\""),
            ),
            (
                "limits",
                format!("{GOOD}[limits]\nper_user = {{ burst = 1, per_hour = 1 }}\n"),
            ),
            ("user", format!("user = \"nobody\"\n{GOOD}")),
        ] {
            let new = parse(&text).unwrap();
            let e = old
                .check_reload(&new, Path::new("issuer.toml"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("{field} changed: that takes a restart")),
                "{field}: {e}"
            );
        }
    }
}

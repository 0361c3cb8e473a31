//! The configuration file: TOML parsed straight into typed structs.
//!
//! Unknown fields are errors (`deny_unknown_fields`) and every error names the
//! file and the field's path, so an operator's typo never silently turns into a
//! default. Parsing checks shape; `state` checks meaning (files, certificates).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::policy::{IdentityRule, TimeWindow, TimeWindowConfig};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: at `{field}`: {message}")]
    Parse {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The whole configuration, as written by the operator.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where access-log lines go: "stdout" (default), "stderr", "off" or a file path.
    #[serde(default = "default_access_log")]
    pub access_log: String,
    /// How long live connections may finish after SIGTERM/SIGINT before they are closed.
    #[serde(default = "default_drain_timeout", with = "duration")]
    pub drain_timeout: Duration,
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    /// Log a warning for certificates and CRLs running out within this;
    /// with the last third of a lifetime when shorter, the warning window
    /// of `/readyz?strict` and the audit report (`expiry::warns_at`).
    #[serde(default = "default_expiry_warning", with = "duration")]
    pub expiry_warning: Duration,
    /// The eBPF guard: only the gateway may connect to the routes' backends.
    pub guard: Option<GuardSettings>,
    /// Where to serve the admin endpoint's reads over TCP (`GET /metrics`,
    /// `/healthz`, `/readyz`, `/block`, `/connections`); none: not served.
    /// Bound at start; a reload does not move it.
    pub admin: Option<SocketAddr>,
    /// Who may read `/block` and `/connections` at `admin` (CIDR); `GET
    /// /metrics`, `/healthz` and `/readyz` answer anyone who can reach it.
    /// An IPv4-mapped IPv6 range is read as the IPv4 range it maps.
    #[serde(default = "default_admin_clients", deserialize_with = "canonical_nets")]
    pub admin_clients: Vec<ipnet::IpNet>,
    /// A Unix socket (mode 0600, owned by the user the gateway runs as)
    /// serving every admin route, including the changes (`gateway block
    /// add|remove`) that `admin` does not take. Bound at start.
    pub admin_socket: Option<PathBuf>,
    /// TLS with a client certificate from `client_ca` at `admin` (the TCP
    /// door), for an admin endpoint bound beyond loopback. Read at start.
    pub admin_tls: Option<AdminTls>,
    /// Who may start a handshake, how often, and who is blocked (before
    /// the handshake: see `admission`).
    #[serde(default)]
    pub admission: AdmissionSettings,
    /// Reload when the config or any file it names changes (checked every 0.5 s).
    /// SIGHUP reloads either way.
    #[serde(default = "default_watch_files")]
    pub watch_files: bool,
    /// Accept workers, each a thread with a current-thread runtime waiting
    /// on every listener's one socket (see `workers`); none: one
    /// per CPU the process may run on (its affinity mask, a cgroup's CPU
    /// quota). Read at start; a reload does not change it.
    pub workers: Option<std::num::NonZeroUsize>,
    /// Named client CA bundles (with their CRLs) that routes can narrow to.
    #[serde(default)]
    pub trust: std::collections::BTreeMap<String, TrustBundleConfig>,
    /// Once every listener and the admin endpoint are bound and the eBPF
    /// programs installed, run as this user, keeping only the capabilities
    /// the configured features still need (see `privilege`). Read at
    /// start; a reload does not change it. None: stay as started.
    pub user: Option<String>,
    /// The group to run as with `user`; none: the user's own group.
    pub group: Option<String>,
    /// Accept private key files that group or others may read (mode & 0o077
    /// not 0). Off: such a key is refused at start and reload, naming the
    /// file and its mode.
    #[serde(default)]
    pub allow_shared_keys: bool,
    /// Where the audit report's summary is kept across restarts (JSON,
    /// mode 0600, written every few seconds when it changed and at
    /// shutdown); none: in memory only. Read at start.
    pub audit_state: Option<PathBuf>,
    /// Entries the audit report keeps per route (clients let in, and
    /// would-deny), the rest counted as overflow.
    #[serde(default = "default_audit_entries")]
    pub audit_entries: usize,
    /// Where every applied config is kept as a numbered revision (its text
    /// and the SHA-256 of each file it names; see `revisions`), for
    /// `gateway rollout history|revert` and `auto_revert`. Default: the
    /// directory `revisions` beside `audit_state`; neither set: no history.
    /// Read at start.
    pub revisions_dir: Option<PathBuf>,
    /// Revisions kept in `revisions_dir`, the oldest removed first.
    #[serde(default = "default_revisions_keep")]
    pub revisions_keep: usize,
    /// Revert a reload by itself when, within `auto_revert_window` after
    /// it, the handshakes failing their certificate check (unknown_ca,
    /// bad_certificate, expired) come at more than `auto_revert_factor`
    /// times the rate of the hour before it, and number at least
    /// `auto_revert_min_failures`. Needs a revision history.
    #[serde(default)]
    pub auto_revert: bool,
    #[serde(default = "default_auto_revert_window", with = "duration")]
    pub auto_revert_window: Duration,
    #[serde(default = "default_auto_revert_factor")]
    pub auto_revert_factor: f64,
    #[serde(default = "default_auto_revert_min_failures")]
    pub auto_revert_min_failures: u64,
    /// The text this was parsed from (a revision keeps it).
    #[serde(skip)]
    pub text: String,
    /// The reload guard: a reload that would close more than this many
    /// live connections on any one listener (for anything but revocation)
    /// is refused unless forced (`gateway reload --force`, or SIGHUP after
    /// the force marker). None: no guard.
    pub max_reload_closes: Option<usize>,
    /// A fleet member: listeners, routes, trust bundles, CRLs and the guard
    /// come from etcd (`fleet`), the rest of this file stays host-local.
    pub fleet: Option<FleetSettings>,
    /// The directory relative paths are resolved against (the config file's).
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The file this was read from, for messages.
    #[serde(skip)]
    pub source: PathBuf,
}

/// The admin endpoint's own TLS: its certificate and key, and the CA
/// bundle its clients' certificates must chain to (none of the listeners'
/// trust: who may scrape or read the gateway is not who may pass it).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    /// Server certificate chain (leaf first, then intermediates), PEM.
    pub cert: PathBuf,
    /// Private key for `cert`: PKCS#8, SEC1 or PKCS#1, PEM.
    pub key: PathBuf,
    /// Trust anchors for client certificates, PEM (the listener's default bundle).
    pub client_ca: PathBuf,
    /// CRLs (PEM) for `client_ca`; a revoked client is refused at the handshake.
    #[serde(default)]
    pub crls: Vec<PathBuf>,
    /// What a CRL of `crls` past its nextUpdate does: `refuse` (the
    /// default) the clients it covers, or `warn` and use it anyway.
    #[serde(default)]
    pub crl_expired: CrlExpired,
    /// The SPIFFE trust domains `client_ca` may vouch for (as a trust
    /// bundle's `spiffe_trust_domains`); none: any.
    pub spiffe_trust_domains: Option<Vec<String>>,
    /// TLS versions offered: "1.3" (default) and, opt-in, "1.2".
    #[serde(default = "default_tls_versions")]
    pub tls_versions: Vec<TlsVersion>,
    #[serde(default = "default_handshake_timeout", with = "duration")]
    pub handshake_timeout: Duration,
    #[serde(default = "default_connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    #[serde(default = "default_idle_timeout", with = "duration")]
    pub idle_timeout: Duration,
    /// Connections served at once; more are closed at accept (or evict
    /// the handshake that made the least progress).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Of `max_connections`, how many may still be in their handshake
    /// (unauthenticated); none: a quarter of `max_connections`.
    #[serde(default)]
    pub max_handshakes_in_flight: Option<usize>,
    /// Bytes per second a client must keep sending while the gateway waits
    /// on it during the handshake (after `handshake_grace`); 0: no minimum.
    #[serde(default = "default_handshake_min_rate")]
    pub handshake_min_rate: u32,
    /// How long a client may send nothing at all when it is its turn in the
    /// handshake, before `handshake_min_rate` applies.
    #[serde(default = "default_handshake_grace", with = "duration")]
    pub handshake_grace: Duration,
    /// Close connections older than this (re-authentication); none: no limit.
    #[serde(default, with = "duration::option")]
    pub max_connection_lifetime: Option<Duration>,
    /// Backends tried per connection before giving up (at most the route's backend count).
    #[serde(default = "default_connect_attempts")]
    pub connect_attempts: usize,
    /// Where client connections' TLS runs after the handshake: "auto"
    /// (kernel TLS where the kernel takes it, else userspace), "kernel", "userspace".
    #[serde(default)]
    pub offload: crate::offload::Offload,
    /// TLS 1.3 on the kernel path: tell the kernel this leg's peers do not
    /// pad records (TLS_RX_EXPECT_NO_PAD, Linux 6.0+), so it decrypts straight
    /// into the destination. For trusted peers: one that pads still works, but
    /// each padded record is decrypted twice (TlsRxNoPadViolation in
    /// /proc/net/tls_stat). Ignored, with a warning, where the kernel lacks it.
    #[serde(default)]
    pub rx_expect_no_pad: bool,
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    /// SNI names (exact, case-insensitive); none makes this the listener's default route.
    #[serde(default)]
    pub server_names: Vec<String>,
    /// `host:port` of each backend, tried round robin.
    pub backends: Vec<String>,
    /// Identities let through; empty refuses everyone.
    #[serde(default)]
    pub allow: Vec<IdentityRule>,
    /// Identities refused even when `allow` matches: deny wins.
    #[serde(default)]
    pub deny: Vec<IdentityRule>,
    /// Client source networks let through (CIDR); empty: any.
    #[serde(default)]
    pub allow_sources: Vec<ipnet::IpNet>,
    /// Client source networks refused (CIDR); wins over `allow_sources`.
    #[serde(default)]
    pub deny_sources: Vec<ipnet::IpNet>,
    /// When the route is open; empty: always.
    #[serde(default)]
    pub time_windows: Vec<TimeWindowConfig>,
    /// Let `cn:NAME` entries match the subject common name (off: the CN is never used).
    #[serde(default)]
    pub match_common_name: bool,
    /// `enforce` (refuse with a TLS alert), `audit` (log would-deny, let pass)
    /// or `off` (TLS without client authentication).
    #[serde(default)]
    pub mode: Mode,
    /// Accept only clients chaining to this named `[trust.NAME]` bundle
    /// instead of the listener's `client_ca`.
    pub trust: Option<String>,
    /// Require a device-bound certificate.
    pub device: Option<DeviceConfig>,
    /// Originate TLS to the backends (gateway → backend mTLS).
    pub upstream_tls: Option<UpstreamTlsConfig>,
    /// Send a PROXY protocol header to the backend before any other byte
    /// (`"v2"`): the client's address, the SNI, TLS facts and the verified
    /// identity, as HAProxy's `send-proxy-v2-ssl-cn` lays them out.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// With `proxy_protocol`: also send the client's leaf certificate (DER)
    /// in `PP2_SUBTYPE_SSL_CLIENT_CERT`. Off by default: it can be large.
    #[serde(default)]
    pub proxy_protocol_client_cert: bool,
}

/// The PROXY protocol versions the gateway sends: only the binary one,
/// which carries TLVs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ProxyProtocol {
    #[serde(rename = "v2")]
    V2,
}

/// How the gateway speaks TLS to a route's backends.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// Trust anchors that the backends' certificates must chain to, PEM.
    pub ca: PathBuf,
    /// The gateway's client certificate chain for backends that require one, PEM.
    pub cert: Option<PathBuf>,
    /// Its private key, PEM.
    pub key: Option<PathBuf>,
    /// The name the backend's certificate must carry (SNI too).
    pub server_name: String,
    /// Where this upstream leg's TLS runs after the handshake (as the listener's `offload`).
    #[serde(default)]
    pub offload: crate::offload::Offload,
    /// As the listener's `rx_expect_no_pad`, for the backend's records.
    #[serde(default)]
    pub rx_expect_no_pad: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
    Off,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
            Mode::Off => "off",
        }
    }
}

/// Admission: per-source limits on starting handshakes, and the block list
/// (in userspace and, where it can be attached, in an XDP program).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionSettings {
    /// Handshakes one source address may start per second (a token bucket
    /// of `source_handshake_burst`); 0: no limit.
    pub source_handshakes_per_second: u32,
    pub source_handshake_burst: u32,
    /// Handshakes one source address may have in flight at once; 0: no limit.
    pub source_handshakes_in_flight: u32,
    /// The same for every source in one prefix (`ipv4_prefix`, `ipv6_prefix`).
    pub prefix_handshakes_per_second: u32,
    pub prefix_handshake_burst: u32,
    pub prefix_handshakes_in_flight: u32,
    /// The prefix lengths sources are grouped by.
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// The same for every source in one network, a coarser prefix
    /// (`ipv4_network`, `ipv6_network`): what an attacker holding many
    /// prefixes (a /48 of IPv6 is 65536 /64s) shares.
    pub network_handshakes_per_second: u32,
    pub network_handshake_burst: u32,
    pub network_handshakes_in_flight: u32,
    pub ipv4_network: u8,
    pub ipv6_network: u8,
    /// A source with this many strikes (failed handshakes, and connections
    /// refused for exceeding a limit) within `block_window` is blocked for
    /// `block_for`; 0: a source is never blocked on its own strikes (its
    /// prefix and network still are, by their own thresholds below).
    pub block_after: u32,
    /// A prefix (network) whose sources together have this many strikes
    /// within `block_window` is blocked as a whole for `block_for`; 0:
    /// never. Must be above `block_after` (`prefix_block_after`), since a
    /// source lends its groups at most `block_after` strikes a window: one
    /// source alone never blocks its neighbours.
    pub prefix_block_after: u32,
    pub network_block_after: u32,
    #[serde(with = "duration")]
    pub block_window: Duration,
    #[serde(with = "duration")]
    pub block_for: Duration,
    /// Sources that are never limited or blocked (CIDR): health checkers, a
    /// known NAT. They still count towards the listeners' slots. An
    /// IPv4-mapped IPv6 range (`::ffff:10.0.0.0/104`) is read as the IPv4
    /// range it maps (`10.0.0.0/8`): clients are compared in IPv4.
    #[serde(deserialize_with = "canonical_nets")]
    pub exempt: Vec<ipnet::IpNet>,
    /// Source addresses tracked at once, and prefixes and networks
    /// likewise; beyond it the least recently seen idle entry is forgotten
    /// (one with handshakes in flight, strikes or a partly spent bucket
    /// never is: a new source is tracked by its coarser groups alone
    /// instead, and refused, `max_tracked`, only when the networks' table
    /// is full too).
    pub max_tracked: u32,
    /// Entries of the networks' table one IPv6 allocation (an
    /// `ipv6_allocation`, a /32: what an ISP gets, 65536 /48s) may hold;
    /// a new network beyond it is refused (`networks_per_allocation`), so
    /// an attacker in one allocation cannot fill the table for everyone.
    /// 0: no quota.
    pub ipv6_allocation: u8,
    pub networks_per_allocation: u32,
    /// Addresses remembered as known (a handshake authenticated with a
    /// verified certificate within `known_for`); a known source is
    /// admitted past a full networks table, held to its own limits. The
    /// least recently verified is forgotten first; 0: none remembered.
    pub max_known: u32,
    /// Of those, the entries one identity (a certificate's names) may
    /// hold per listener (at most a quarter of `max_known`, over all
    /// listeners too; a quarter of the quota per /16 or /48): at the
    /// quota a new address is remembered only in the place of its
    /// largest network's least recently verified entry, from a network
    /// holding fewer (its known ones are refreshed as they verify again,
    /// one past `known_for` gives way). One certificate holder cannot
    /// flush the clients already served, of its identity or another's.
    /// 0: no quota.
    pub known_per_identity: u32,
    /// The share of a listener's `max_connections` one identity (a
    /// certificate's names) may hold past the handshake: a connection
    /// past it is refused (`identity_connections`), so one certificate
    /// holder cannot keep every other client out. 1.0 (the default): no
    /// cap, since one identity is often every client of a listener (a
    /// fleet of frontends under one SPIFFE ID), and capping it by default
    /// would refuse the very clients the listener is for.
    pub identity_share: f64,
    #[serde(with = "duration")]
    pub known_for: Duration,
    /// A prefix's (network's) spread score: each of its addresses adds a
    /// point for its failures at most once per `block_window`, each that
    /// authenticated with a verified certificate takes one off likewise
    /// (never below 0), and the score halves every `spread_half_life`. At
    /// this score the prefix (network) is blocked; 0: never. Must be
    /// above what one address alone adds up to (a point a window).
    pub prefix_spread_block_after: u32,
    pub network_spread_block_after: u32,
    #[serde(with = "duration")]
    pub spread_half_life: Duration,
    /// Entries on the block list at once (at most 65536, the kernel map's
    /// size); beyond it the entry expiring first gives way.
    pub max_blocked: u32,
    /// Refusals are logged at most once per reason and listener per this
    /// (the first at once, then a summary).
    #[serde(with = "duration")]
    pub log_every: Duration,
    /// The block list in the kernel: an XDP program on `interfaces` drops
    /// new connections (TCP SYNs) from blocked sources to the listeners'
    /// ports. A failure to attach is logged and counted, never fatal.
    pub kernel_block_list: bool,
    /// Where the XDP program attaches; none: every interface holding a
    /// listener's address (all of them for a wildcard bind).
    pub interfaces: Option<Vec<String>>,
    /// Pin the block list's maps in bpffs, so a restart keeps the list.
    pub pin: bool,
    pub pin_dir: PathBuf,
}

impl Default for AdmissionSettings {
    fn default() -> Self {
        AdmissionSettings {
            source_handshakes_per_second: 100,
            source_handshake_burst: 200,
            source_handshakes_in_flight: 128,
            prefix_handshakes_per_second: 1000,
            prefix_handshake_burst: 2000,
            prefix_handshakes_in_flight: 1024,
            ipv4_prefix: 24,
            ipv6_prefix: 64,
            network_handshakes_per_second: 4000,
            network_handshake_burst: 8000,
            network_handshakes_in_flight: 4096,
            ipv4_network: 16,
            ipv6_network: 48,
            block_after: 100,
            prefix_block_after: 400,
            network_block_after: 1600,
            block_window: Duration::from_secs(10),
            block_for: Duration::from_secs(600),
            exempt: Vec::new(),
            max_tracked: 65_536,
            ipv6_allocation: 32,
            networks_per_allocation: 4096,
            max_known: 16_384,
            known_per_identity: 1024,
            identity_share: 1.0,
            known_for: Duration::from_secs(24 * 3600),
            prefix_spread_block_after: 128,
            network_spread_block_after: 512,
            spread_half_life: Duration::from_secs(600),
            max_blocked: 65_536,
            log_every: Duration::from_secs(10),
            kernel_block_list: true,
            interfaces: None,
            pin: true,
            pin_dir: PathBuf::from("/sys/fs/bpf/gateway-admission"),
        }
    }
}

/// The local eBPF guard's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardSettings {
    /// `enforce` (bypasses get EPERM), `audit` (counted, let through) or `off`.
    pub enforcement: GuardEnforcement,
    /// The gateway's own cgroup, relative to the cgroup v2 mount; created if
    /// missing, and the gateway moves itself into it.
    #[serde(default = "default_guard_cgroup")]
    pub cgroup: PathBuf,
    /// The gateway's uid, when its cgroup alone should not be enough (a
    /// process started into that cgroup under another uid is refused).
    #[serde(default)]
    pub uid: Option<u32>,
    /// The cgroup subtree whose processes are guarded, relative to the cgroup
    /// v2 mount (default: all of it).
    #[serde(default)]
    pub attach_to: PathBuf,
    /// Backends to protect besides the routes' own: `ip:port`,
    /// `tcp:ip:first-last`, `udp:[v6]:port` (TCP when no protocol is named).
    #[serde(default)]
    pub protect: Vec<crate::ebpf::Protected>,
    /// A backend on this host is protected on every local address (other
    /// loopback addresses, the host's own, the wildcard), not only the one
    /// named: a server listening on all addresses answers on each.
    #[serde(default = "default_true")]
    pub every_local_address: bool,
    /// Connections to protected backends opened before the guard (or the
    /// rule) existed, from outside the gateway's cgroup, are closed when
    /// enforcement starts (SOCK_DESTROY); false: only logged and counted.
    #[serde(default = "default_true")]
    pub close_older_connections: bool,
    /// How often the tallies of who tried (per cgroup, uid and destination)
    /// are logged.
    #[serde(
        default = "default_summary_every",
        deserialize_with = "duration::deserialize"
    )]
    pub summary_every: Duration,
    /// Pin programs and maps in bpffs so protection survives the gateway's
    /// exit and a restart takes over (`gateway guard --uninstall` removes it).
    #[serde(default = "default_true")]
    pub pin: bool,
    /// Where the pins live (bpffs is mounted at /sys/fs/bpf if needed).
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
}

fn default_true() -> bool {
    true
}

fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/gateway")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuardEnforcement {
    Enforce,
    Audit,
    Off,
}

fn default_summary_every() -> Duration {
    Duration::from_secs(10)
}

fn default_guard_cgroup() -> PathBuf {
    PathBuf::from("gateway")
}

/// `[fleet]`: where this member finds the shared config document.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSettings {
    /// etcd endpoints (`http://` or `https://` URLs).
    pub etcd: Vec<String>,
    /// The document is `<prefix>/config`, each file it names `<prefix>/files/<name>`.
    pub prefix: String,
    /// This member's name, for `gateway fleet status` and the logs.
    pub name: String,
    /// The last good document (JSON, 0600, in a directory no one else can
    /// write), so a restart while etcd is unreachable serves; the files it
    /// names are written beside it, in `<cache>.files/`.
    pub cache: PathBuf,
    /// With `https://` endpoints: the CA etcd's certificate chains to (PEM).
    pub ca: Option<PathBuf>,
    /// A client certificate and key for etcd's client authentication (PEM).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// A client CA bundle and its revocation lists.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustBundleConfig {
    /// Trust anchors, PEM.
    pub ca: PathBuf,
    /// CRLs, PEM.
    #[serde(default)]
    pub crls: Vec<PathBuf>,
    /// What a CRL past its nextUpdate does (as the listener's `crl_expired`).
    #[serde(default)]
    pub crl_expired: CrlExpired,
    /// The SPIFFE trust domains this bundle's CAs may vouch for: a client
    /// certificate with a URI SAN that is not a SPIFFE ID in one of them is
    /// unusable. None: any. Name constraints in the CA certificates cover
    /// DNS names only; this is what keeps a CA inside its trust domains.
    pub spiffe_trust_domains: Option<Vec<String>>,
}

/// What a CRL past its nextUpdate does. Its issuer promised a newer one by
/// then, so a revocation since may be missing from it: by default the
/// clients it covers are refused until a fresh CRL is loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CrlExpired {
    /// Refuse every client whose chain the stale CRL covers (fail closed).
    #[default]
    Refuse,
    /// Use the stale CRL anyway; log it and count the connections.
    Warn,
}

impl CrlExpired {
    pub fn as_str(self) -> &'static str {
        match self {
            CrlExpired::Refuse => "refuse",
            CrlExpired::Warn => "warn",
        }
    }
}

/// The device half of "which user on which device".
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// The `[trust.NAME]` bundle of the device CA the client certificate must also chain to.
    pub trust: String,
    /// The URI SAN prefix of the device identity, e.g. "spiffe://example.internal/device/".
    pub san_prefix: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

fn default_access_log() -> String {
    "stdout".into()
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_expiry_warning() -> Duration {
    Duration::from_secs(30 * 86_400)
}
fn default_watch_files() -> bool {
    true
}
fn default_tls_versions() -> Vec<TlsVersion> {
    vec![TlsVersion::Tls13]
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(300)
}
/// `workers` beyond this is a typo, not a machine: each worker is a thread
/// with a runtime and a listening socket per listener.
pub const MAX_WORKERS: usize = 1024;

fn default_max_connections() -> usize {
    10_000
}
fn default_connect_attempts() -> usize {
    3
}
fn default_handshake_min_rate() -> u32 {
    256
}
/// The shortest `handshake_grace` accepted.
const MIN_HANDSHAKE_GRACE: Duration = Duration::from_millis(100);

fn default_handshake_grace() -> Duration {
    Duration::from_secs(2)
}
/// CIDR ranges, each IPv4-mapped IPv6 range (within `::ffff:0:0/96`) read
/// as the IPv4 range it maps: clients are compared in their canonical form
/// (`IpAddr::to_canonical`), so `::ffff:10.0.0.0/104` as written would
/// never match anyone. A range that covers part of the mapped space and
/// more (`::/80`) cannot be said in IPv4: refused.
fn canonical_nets<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<ipnet::IpNet>, D::Error> {
    let nets = Vec::<ipnet::IpNet>::deserialize(d)?;
    nets.into_iter()
        .map(|n| canonical_net(n).map_err(serde::de::Error::custom))
        .collect()
}

pub(crate) fn canonical_net(net: ipnet::IpNet) -> Result<ipnet::IpNet, String> {
    let ipnet::IpNet::V6(v6) = net else {
        return Ok(net);
    };
    let mapped = ipnet::Ipv6Net::new(std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96)
        .map_err(|e| e.to_string())?;
    if mapped.contains(&v6) {
        let v4 = v6.addr().to_ipv4_mapped().ok_or("not IPv4-mapped")?;
        return ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
            .map(|n| ipnet::IpNet::V4(n.trunc()))
            .map_err(|e| e.to_string());
    }
    if v6.contains(&mapped) && v6.prefix_len() > 0 {
        return Err(format!(
            "{net} covers IPv4-mapped addresses (::ffff:0:0/96) and more: clients are compared as IPv4, so write the IPv4 range apart"
        ));
    }
    Ok(net)
}

fn default_audit_entries() -> usize {
    crate::rollout::DEFAULT_ENTRIES
}
fn default_revisions_keep() -> usize {
    crate::revisions::DEFAULT_KEEP
}
fn default_auto_revert_window() -> Duration {
    Duration::from_secs(60)
}
fn default_auto_revert_factor() -> f64 {
    10.0
}
fn default_auto_revert_min_failures() -> u64 {
    10
}
fn default_admin_clients() -> Vec<ipnet::IpNet> {
    ["127.0.0.0/8", "::1/128"]
        .iter()
        .filter_map(|n| n.parse().ok())
        .collect()
}

impl Config {
    /// Reads, parses and checks the shape of a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base_dir = path
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from("."));
        Config::parse(&text, path, &base_dir)
    }

    /// Parses `text` as if read from `source`; relative paths resolve against `base_dir`.
    pub fn parse(text: &str, source: &Path, base_dir: &Path) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Parse {
            path: source.to_owned(),
            field: String::new(),
            message: e.to_string(),
        })?;
        let mut config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            ConfigError::Parse {
                path: source.to_owned(),
                field,
                message: e.into_inner().message().to_owned(),
            }
        })?;
        config.base_dir = base_dir.to_owned();
        config.source = source.to_owned();
        config.text = text.to_owned();
        config.validate()?;
        Ok(config)
    }

    /// Where the revision history is kept: `revisions_dir`, else
    /// `revisions` beside `audit_state` (the state directory the operator
    /// already chose), else nowhere.
    pub fn revisions_dir(&self) -> Option<PathBuf> {
        match (&self.revisions_dir, &self.audit_state) {
            (Some(dir), _) => Some(self.resolve(dir)),
            (None, Some(state)) => self.resolve(state).parent().map(|d| d.join("revisions")),
            (None, None) => None,
        }
    }

    /// `auto_revert`'s settings, when it is on.
    pub fn auto_revert(&self) -> Option<crate::revisions::AutoRevert> {
        self.auto_revert.then_some(crate::revisions::AutoRevert {
            window: self.auto_revert_window,
            factor: self.auto_revert_factor,
            min_failures: self.auto_revert_min_failures,
        })
    }

    /// Every file the config depends on, itself among them, sorted: what
    /// `watch` watches and a revision hashes.
    pub fn named_files(&self) -> Vec<PathBuf> {
        let config = self;
        let mut files = vec![config.source.clone()];
        for l in &config.listeners {
            files.extend([&l.cert, &l.key, &l.client_ca].map(|p| config.resolve(p)));
            files.extend(l.crls.iter().map(|p| config.resolve(p)));
            for u in l.routes.iter().filter_map(|r| r.upstream_tls.as_ref()) {
                files.push(config.resolve(&u.ca));
                files.extend(u.cert.iter().chain(&u.key).map(|p| config.resolve(p)));
            }
        }
        for b in config.trust.values() {
            files.push(config.resolve(&b.ca));
            files.extend(b.crls.iter().map(|p| config.resolve(p)));
        }
        files.sort();
        files.dedup();
        files
    }

    /// A warning for each trust anchor file (a trust bundle's `ca`, a
    /// listener's `client_ca`) that someone besides root and the gateway's
    /// own user could replace (`safe_dir::writable_by_another`): whoever
    /// that is decides whom the routes on it let in, and no revocation
    /// reaches a CA they put there. Docs once had SSO routes read
    /// `ca_dir/ca.pem`, which the issuer's user writes.
    pub fn trust_anchor_warnings(&self) -> Vec<String> {
        let anchors = self
            .trust
            .iter()
            .map(|(name, b)| (format!("trust bundle {name:?}"), &b.ca))
            .chain(
                self.listeners
                    .iter()
                    .map(|l| (format!("listener {:?} client_ca", l.name), &l.client_ca)),
            );
        anchors
            .filter_map(|(what, ca)| {
                let path = self.resolve(ca);
                crate::safe_dir::writable_by_another(&path).map(|why| {
                    format!(
                        "{what}: {}: {why}: whoever may write there decides whom its routes let in; \
                         keep trust anchors root's (a copy root owns, e.g. /etc/gateway/sso-ca.pem)",
                        path.display()
                    )
                })
            })
            .collect()
    }

    /// Resolves a path from the file against the config file's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.base_dir.join(path)
        }
    }

    fn invalid(&self, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.source.clone(),
            message,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(w) = self.workers
            && w.get() > MAX_WORKERS
        {
            return Err(self.invalid(format!(
                "workers = {w}: at most {MAX_WORKERS} (each is a thread and, per listener, a listening socket)"
            )));
        }
        if self.listeners.is_empty() {
            if self.fleet.is_some() {
                return Err(self.invalid("a [fleet] member's host file: the listeners come from etcd (`gateway fleet push`); check the shared document with `gateway check --config` on it".into()));
            }
            return Err(self.invalid("no [[listeners]]: nothing to serve".into()));
        }
        let mut names = std::collections::HashSet::new();
        let mut binds = std::collections::HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let at = format!("listeners[{i}] ({:?})", l.name);
            if l.name.is_empty() {
                return Err(self.invalid(format!("listeners[{i}].name is empty")));
            }
            if !names.insert(&l.name) {
                return Err(self.invalid(format!("{at}: listener name used twice")));
            }
            if l.bind.port() != 0 && !binds.insert(l.bind) {
                return Err(self.invalid(format!("{at}: bind {} used twice", l.bind)));
            }
            if l.tls_versions.is_empty() {
                return Err(self.invalid(format!("{at}.tls_versions is empty")));
            }
            if l.max_connections == 0 {
                return Err(self.invalid(format!("{at}.max_connections must be at least 1")));
            }
            if l.connect_attempts == 0 {
                return Err(self.invalid(format!("{at}.connect_attempts must be at least 1")));
            }
            if let Some(h) = l.max_handshakes_in_flight
                && (h == 0 || h > l.max_connections)
            {
                return Err(self.invalid(format!(
                    "{at}.max_handshakes_in_flight must be between 1 and max_connections ({})",
                    l.max_connections
                )));
            }
            for (what, d) in [
                ("handshake_grace", l.handshake_grace),
                ("handshake_timeout", l.handshake_timeout),
                ("connect_timeout", l.connect_timeout),
                ("idle_timeout", l.idle_timeout),
            ] {
                if d.is_zero() {
                    return Err(self.invalid(format!("{at}.{what} must be more than 0")));
                }
            }
            // A client's turn starts when the gateway's flight leaves: a
            // grace shorter than a round trip and a signature cuts every
            // client that is not on the same host (attacker review 2).
            if l.handshake_grace < MIN_HANDSHAKE_GRACE {
                return Err(self.invalid(format!(
                    "{at}.handshake_grace must be at least {}ms: shorter cuts clients a round trip away",
                    MIN_HANDSHAKE_GRACE.as_millis()
                )));
            }
            if let Some(domains) = &l.spiffe_trust_domains {
                self.validate_trust_domains(&format!("{at}.spiffe_trust_domains"), domains)?;
            }
            self.validate_routes(&at, l)?;
        }
        self.validate_admission()?;
        self.validate_revisions()?;
        if self.group.is_some() && self.user.is_none() {
            return Err(self.invalid("group is set without user: set user too".into()));
        }
        for (name, b) in &self.trust {
            if let Some(domains) = &b.spiffe_trust_domains {
                self.validate_trust_domains(
                    &format!("trust.{name}.spiffe_trust_domains"),
                    domains,
                )?;
            }
        }
        Ok(())
    }

    fn validate_revisions(&self) -> Result<(), ConfigError> {
        if self.revisions_keep < 2 {
            return Err(self.invalid(
                "revisions_keep must be at least 2 (the config serving and one to go back to)"
                    .into(),
            ));
        }
        if !self.auto_revert {
            return Ok(());
        }
        if self.revisions_dir().is_none() {
            return Err(self.invalid(
                "auto_revert needs a revision history: set revisions_dir (or audit_state)".into(),
            ));
        }
        if self.auto_revert_window.is_zero() {
            return Err(self.invalid("auto_revert_window must be more than 0".into()));
        }
        if !(self.auto_revert_factor.is_finite() && self.auto_revert_factor >= 1.0) {
            return Err(self.invalid("auto_revert_factor must be a number, at least 1".into()));
        }
        if self.auto_revert_min_failures == 0 {
            return Err(self.invalid(
                "auto_revert_min_failures must be at least 1 (one failure after a quiet hour is no jump)"
                    .into(),
            ));
        }
        Ok(())
    }

    fn validate_admission(&self) -> Result<(), ConfigError> {
        let a = &self.admission;
        let at = |field: &str, message: &str| self.invalid(format!("admission.{field} {message}"));
        if a.ipv4_prefix > 32 {
            return Err(at("ipv4_prefix", "must be at most 32"));
        }
        if a.ipv6_prefix > 128 {
            return Err(at("ipv6_prefix", "must be at most 128"));
        }
        if a.ipv4_network > a.ipv4_prefix {
            return Err(at("ipv4_network", "must be at most ipv4_prefix"));
        }
        if a.ipv6_network > a.ipv6_prefix {
            return Err(at("ipv6_network", "must be at most ipv6_prefix"));
        }
        if a.ipv6_allocation > a.ipv6_network {
            return Err(at("ipv6_allocation", "must be at most ipv6_network"));
        }
        for (field, rate, burst) in [
            (
                "source_handshake_burst",
                a.source_handshakes_per_second,
                a.source_handshake_burst,
            ),
            (
                "prefix_handshake_burst",
                a.prefix_handshakes_per_second,
                a.prefix_handshake_burst,
            ),
            (
                "network_handshake_burst",
                a.network_handshakes_per_second,
                a.network_handshake_burst,
            ),
        ] {
            if rate > 0 && burst == 0 {
                return Err(at(field, "must be at least 1 when its rate is set"));
            }
        }
        // One address alone must never get its neighbours blocked: it
        // lends its prefix and network at most `block_after` strikes a
        // window, so their thresholds must be above that.
        // What one address lends its groups is capped by `block_after`:
        // without it, one address alone could get its /24 blocked.
        if a.block_after == 0 && (a.prefix_block_after > 0 || a.network_block_after > 0) {
            return Err(at(
                "block_after",
                "0 leaves no cap on the strikes one address lends its prefix and network: set it, or set prefix_block_after and network_block_after to 0 too",
            ));
        }
        if a.block_after > 0 && a.prefix_block_after > 0 && a.prefix_block_after <= a.block_after {
            return Err(at("prefix_block_after", "must be above block_after (or 0)"));
        }
        if a.network_block_after > 0
            && a.network_block_after <= a.block_after.max(a.prefix_block_after)
        {
            return Err(at(
                "network_block_after",
                "must be above block_after and prefix_block_after (or 0)",
            ));
        }
        if !(a.identity_share > 0.0 && a.identity_share <= 1.0) {
            return Err(at(
                "identity_share",
                "must be more than 0 and at most 1 (1: no cap)",
            ));
        }
        if a.max_tracked == 0 {
            return Err(at("max_tracked", "must be at least 1"));
        }
        // One address alone must never get its neighbours blocked on the
        // long horizon either: a point a window, halving every half-life,
        // adds up to at most 1 / (1 - 2^(-window/half-life)).
        let one_address =
            1.0 / (1.0 - (-a.block_window.as_secs_f64() / a.spread_half_life.as_secs_f64()).exp2());
        for (field, after) in [
            ("prefix_spread_block_after", a.prefix_spread_block_after),
            ("network_spread_block_after", a.network_spread_block_after),
        ] {
            if after > 0 && f64::from(after) <= one_address {
                return Err(at(
                    field,
                    &format!(
                        "must be above {:.0}, what one address failing once every block_window adds up to with spread_half_life (or 0)",
                        one_address.ceil()
                    ),
                ));
            }
        }
        let kernel_max = gateway_common::MAX_BLOCKED;
        if a.max_blocked == 0 || a.max_blocked > kernel_max {
            return Err(at(
                "max_blocked",
                &format!("must be between 1 and {kernel_max} (the kernel map's size)"),
            ));
        }
        for (field, d) in [
            ("block_window", a.block_window),
            ("block_for", a.block_for),
            ("known_for", a.known_for),
            ("spread_half_life", a.spread_half_life),
            ("log_every", a.log_every),
        ] {
            if d.is_zero() {
                return Err(at(field, "must be more than 0"));
            }
        }
        // Each pin directory is locked by the one that uses it: shared, the
        // second to start would find it taken (and `gateway guard
        // --uninstall` would remove the other's pins).
        if let Some(g) = &self.guard
            && g.pin
            && a.pin
            && a.kernel_block_list
            && (g.pin_dir.starts_with(&a.pin_dir) || a.pin_dir.starts_with(&g.pin_dir))
        {
            return Err(at(
                "pin_dir",
                &format!(
                    "must be apart from guard.pin_dir ({}): each is locked by its user",
                    g.pin_dir.display()
                ),
            ));
        }
        Ok(())
    }

    fn validate_trust_domains(&self, at: &str, domains: &[String]) -> Result<(), ConfigError> {
        for d in domains {
            crate::spiffe::check_trust_domain(d).map_err(|e| {
                self.invalid(format!("{at}: {d:?} is not a SPIFFE trust domain: {e}"))
            })?;
        }
        Ok(())
    }

    fn validate_routes(&self, at: &str, l: &ListenerConfig) -> Result<(), ConfigError> {
        if l.routes.is_empty() {
            return Err(self.invalid(format!("{at}: no [[listeners.routes]]")));
        }
        let mut route_names = std::collections::HashSet::new();
        let mut snis = std::collections::HashMap::new();
        let mut default_route: Option<&str> = None;
        for (j, r) in l.routes.iter().enumerate() {
            let rat = format!("{at}.routes[{j}] ({:?})", r.name);
            if r.name.is_empty() {
                return Err(self.invalid(format!("{at}.routes[{j}].name is empty")));
            }
            if !route_names.insert(&r.name) {
                return Err(self.invalid(format!("{rat}: route name used twice")));
            }
            if r.backends.is_empty() {
                return Err(self.invalid(format!("{rat}.backends is empty")));
            }
            for b in &r.backends {
                if crate::upstream::split_host_port(b).is_none() {
                    return Err(self.invalid(format!("{rat}.backends: {b:?} is not host:port")));
                }
            }
            if r.server_names.is_empty() {
                if let Some(other) = default_route {
                    return Err(self.invalid(format!(
                        "{rat}: two default routes (no server_names): {other:?} and {:?}",
                        r.name
                    )));
                }
                default_route = Some(&r.name);
            }
            for sni in &r.server_names {
                if sni.contains('*') {
                    return Err(self.invalid(format!(
                        "{rat}.server_names: {sni:?}: wildcards are not supported, list names exactly"
                    )));
                }
                if let Some(other) = snis.insert(sni.to_ascii_lowercase(), &r.name) {
                    return Err(self.invalid(format!(
                        "{rat}.server_names: {sni:?} is also claimed by route {other:?}"
                    )));
                }
            }
            for entry in r.allow.iter().chain(&r.deny) {
                if matches!(entry, IdentityRule::CommonName(_)) && !r.match_common_name {
                    return Err(self.invalid(format!(
                        "{rat}: {entry} needs match_common_name = true on the route"
                    )));
                }
            }
            for (k, w) in r.time_windows.iter().enumerate() {
                TimeWindow::compile(w)
                    .map_err(|e| self.invalid(format!("{rat}.time_windows[{k}]: {e}")))?;
            }
            let known = |name: &str| self.trust.contains_key(name);
            if let Some(t) = &r.trust
                && !known(t)
            {
                return Err(self.invalid(format!("{rat}.trust: no [trust.{t}] bundle")));
            }
            if let Some(d) = &r.device {
                // A client presents one chain. The device CA issues the
                // device-bound user certificates, so it is this route's
                // trust; another bundle in `trust` could never be met by
                // the same certificate.
                if let Some(t) = &r.trust
                    && *t != d.trust
                {
                    return Err(self.invalid(format!(
                        "{rat}.trust: {t:?} and device.trust {:?} would need one client certificate to chain to two CAs; \
                         on a device route device.trust names the CA that issues device-bound user certificates and is \
                         the route's trust: drop trust (or set it to {:?})",
                        d.trust, d.trust
                    )));
                }
                if !known(&d.trust) {
                    return Err(
                        self.invalid(format!("{rat}.device.trust: no [trust.{}] bundle", d.trust))
                    );
                }
                crate::spiffe::check_prefix(&d.san_prefix)
                    .map_err(|e| self.invalid(format!("{rat}.device.san_prefix: {e}")))?;
                // A device identity outside the bundle's trust domains
                // would make every certificate unusable: the route could
                // never let anyone in.
                let Some(device_bundle) = self.trust.get(&d.trust) else {
                    return Err(
                        self.invalid(format!("{rat}.device.trust: no [trust.{}] bundle", d.trust))
                    );
                };
                if let (Some(domains), Ok(id)) = (
                    &device_bundle.spiffe_trust_domains,
                    crate::spiffe::SpiffeId::parse(d.san_prefix.trim_end_matches('/')),
                ) && !domains.iter().any(|t| t == id.trust_domain())
                {
                    return Err(self.invalid(format!(
                        "{rat}.device.san_prefix: trust domain {:?} is not in [trust.{}] spiffe_trust_domains, so no certificate could carry the device identity",
                        id.trust_domain(),
                        d.trust
                    )));
                }
            }
            if let Some(u) = &r.upstream_tls {
                if u.cert.is_some() != u.key.is_some() {
                    return Err(
                        self.invalid(format!("{rat}.upstream_tls: cert and key go together"))
                    );
                }
                if rustls_pki_types::ServerName::try_from(u.server_name.as_str()).is_err() {
                    return Err(self.invalid(format!(
                        "{rat}.upstream_tls.server_name: {:?} is not a DNS name or IP address",
                        u.server_name
                    )));
                }
            }
            if r.proxy_protocol_client_cert && r.proxy_protocol.is_none() {
                return Err(self.invalid(format!(
                    "{rat}.proxy_protocol_client_cert: needs proxy_protocol = \"v2\" to have a header to go in"
                )));
            }
            if r.mode == Mode::Off {
                // Off asks for no certificate: what needs one would be
                // silently ignored. Sources and time windows still apply.
                let needs_a_certificate = [
                    ("allow", !r.allow.is_empty()),
                    ("deny", !r.deny.is_empty()),
                    ("match_common_name", r.match_common_name),
                    ("trust", r.trust.is_some()),
                    ("device", r.device.is_some()),
                ];
                if let Some((field, _)) = needs_a_certificate.iter().find(|(_, set)| *set) {
                    return Err(self.invalid(format!(
                        "{rat}.{field}: mode = \"off\" authenticates no client, so {field} cannot apply \
                         (allow_sources, deny_sources and time_windows do)"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Durations written as "250ms", "10s", "5m", "1h".
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(serde::de::Error::custom)
    }

    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer};

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            let s = String::deserialize(d)?;
            super::parse(&s).map(Some).map_err(serde::de::Error::custom)
        }
    }

    /// The longest duration taken (10 years): far beyond any timeout or
    /// block worth setting, and far below what `Instant + Duration`
    /// overflows at, which would panic whoever adds it to the clock.
    pub const LONGEST: Duration = Duration::from_secs(10 * 365 * 86_400);

    pub fn parse(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        let d = parse_unbounded(s)?;
        if d > LONGEST {
            return Err(format!("{s:?} is too long: at most 10 years (\"3650d\")"));
        }
        Ok(d)
    }

    fn parse_unbounded(s: &str) -> Result<Duration, String> {
        let split = s
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("{s:?} has no unit: write e.g. \"10s\", \"250ms\", \"5m\""))?;
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} does not start with a whole number"))?;
        let per_unit = match unit {
            "ms" => return Ok(Duration::from_millis(n)),
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h, d)")),
        };
        n.checked_mul(per_unit)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{s:?} is too long"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duration_beyond_ten_years_is_refused_not_added_to_the_clock() {
        assert_eq!(
            duration::parse("3650d"),
            Ok(std::time::Duration::from_secs(3650 * 86_400))
        );
        for long in ["3651d", "213503982334601d", "18446744073709551615ms"] {
            let why = duration::parse(long).unwrap_err();
            assert!(why.contains("at most 10 years"), "{long}: {why}");
        }
        // Every duration setting goes through it: `block_for` too.
        let c = Config::parse(
            &format!("{MINIMAL}\n[admission]\nblock_for = \"213503982334601d\"\n"),
            Path::new("t.toml"),
            Path::new("/"),
        );
        assert!(c.unwrap_err().to_string().contains("at most 10 years"));
    }

    const MINIMAL: &str = crate::testing::MINIMAL_CONFIG;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(
            text,
            Path::new("/etc/gateway/gateway.toml"),
            Path::new("/etc/gateway"),
        )
    }

    #[test]
    fn a_handshake_grace_shorter_than_a_round_trip_is_refused() {
        let with = |grace: &str| {
            parse(&MINIMAL.replace(
                "client_ca = \"client-roots.pem\"",
                &format!("client_ca = \"client-roots.pem\"\nhandshake_grace = \"{grace}\""),
            ))
        };
        for short in ["1ms", "99ms"] {
            let why = with(short).unwrap_err().to_string();
            assert!(
                why.contains("(\"edge\").handshake_grace must be at least 100ms"),
                "{short}: {why}"
            );
        }
        assert!(with("100ms").is_ok());
    }

    #[test]
    fn accepts_the_documented_minimal_config() {
        let c = parse(MINIMAL).unwrap();
        let l = &c.listeners[0];
        assert_eq!(l.tls_versions, vec![TlsVersion::Tls13]);
        assert_eq!(l.routes[0].allow.len(), 2);
        assert_eq!(
            c.resolve(&l.cert),
            PathBuf::from("/etc/gateway/server-chain.pem")
        );
    }

    #[test]
    fn the_shipped_example_parses() {
        let text = include_str!("../../examples/gateway.toml");
        let c = parse(text).unwrap();
        assert_eq!(c.listeners[0].routes.len(), 4);
        assert_eq!(c.trust.len(), 2);
        assert_eq!(c.listeners[0].idle_timeout, Duration::from_secs(300));
    }

    #[test]
    fn max_reload_closes_is_off_by_default_and_a_count_or_refused() {
        assert_eq!(parse(MINIMAL).unwrap().max_reload_closes, None);
        // 0: no reload may close a live connection unless forced.
        let c = parse(&format!("max_reload_closes = 0\n{MINIMAL}")).unwrap();
        assert_eq!(c.max_reload_closes, Some(0));
        for bad in ["-1", "1.5", "\"ten\"", "true"] {
            let err = parse(&format!("max_reload_closes = {bad}\n{MINIMAL}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("max_reload_closes"), "{bad}: {err}");
        }
    }

    #[test]
    fn admission_settings_default_safely_and_nonsense_is_refused() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.listeners[0].max_handshakes_in_flight, None);
        assert_eq!(c.listeners[0].handshake_min_rate, 256);
        assert!(c.admission.kernel_block_list && c.admission.block_after > 0);
        assert_eq!(c.admin_clients.len(), 2);
        for (bad, field) in [
            ("[admission]\nipv4_prefix = 33\n", "ipv4_prefix"),
            ("[admission]\nipv6_prefix = 129\n", "ipv6_prefix"),
            ("[admission]\nipv4_network = 25\n", "ipv4_network"),
            (
                "[admission]\nnetwork_handshake_burst = 0\n",
                "network_handshake_burst",
            ),
            ("[admission]\nmax_blocked = 70000\n", "max_blocked"),
            ("[admission]\nmax_tracked = 0\n", "max_tracked"),
            (
                "[admission]\nprefix_spread_block_after = 80\n",
                "prefix_spread_block_after",
            ),
            (
                "[admission]\nblock_window = \"2s\"\nprefix_spread_block_after = 0\nnetwork_spread_block_after = 400\n",
                "network_spread_block_after",
            ),
            (
                "[admission]\nspread_half_life = \"0s\"\n",
                "spread_half_life",
            ),
            ("[admission]\nknown_for = \"0s\"\n", "known_for"),
            ("[admission]\nidentity_share = 0.0\n", "identity_share"),
            ("[admission]\nidentity_share = 1.5\n", "identity_share"),
            ("[admission]\nipv6_allocation = 56\n", "ipv6_allocation"),
            (
                "[admission]\nblock_after = 100\nprefix_block_after = 100\n",
                "prefix_block_after",
            ),
            (
                "[admission]\nprefix_block_after = 400\nnetwork_block_after = 300\n",
                "network_block_after",
            ),
            ("[admission]\nblock_after = 0\n", "block_after"),
            (
                "[admission]\nblock_after = 100\nprefix_block_after = 0\nnetwork_block_after = 50\n",
                "network_block_after",
            ),
            ("[admission]\nblock_for = \"0s\"\n", "block_for"),
            (
                "[admission]\nsource_handshake_burst = 0\n",
                "source_handshake_burst",
            ),
            ("[admission]\nblok_after = 3\n", "blok_after"),
            (
                "[guard]\nenforcement = \"audit\"\npin_dir = \"/sys/fs/bpf/g\"\n\
                 [admission]\npin_dir = \"/sys/fs/bpf/g\"\n",
                "admission.pin_dir",
            ),
            (
                "[guard]\nenforcement = \"audit\"\n[admission]\npin_dir = \"/sys/fs/bpf/gateway/a\"\n",
                "admission.pin_dir",
            ),
        ] {
            let err = parse(&format!("{MINIMAL}\n{bad}")).unwrap_err().to_string();
            assert!(err.contains(field), "{bad}: {err}");
        }
        let over = MINIMAL.replace(
            "client_ca = \"client-roots.pem\"",
            "client_ca = \"client-roots.pem\"\nmax_connections = 10\nmax_handshakes_in_flight = 11",
        );
        let err = parse(&over).unwrap_err().to_string();
        assert!(err.contains("max_handshakes_in_flight"), "{err}");
    }

    #[test]
    fn ipv4_mapped_ranges_are_read_as_ipv4_and_ambiguous_ones_refused() {
        let text = format!(
            "admin_clients = [\"::ffff:127.0.0.0/104\", \"::1/128\"]\n{MINIMAL}\n[admission]\nexempt = [\"::ffff:192.0.2.0/120\", \"2001:db8::/32\", \"10.0.0.0/8\"]\n"
        );
        let c = parse(&text).unwrap();
        let nets = |v: &[ipnet::IpNet]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(nets(&c.admin_clients), ["127.0.0.0/8", "::1/128"]);
        assert_eq!(
            nets(&c.admission.exempt),
            ["192.0.2.0/24", "2001:db8::/32", "10.0.0.0/8"]
        );
        // An IPv4 client (compared in IPv4) matches what was written.
        let client: std::net::IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert!(c.admission.exempt[0].contains(&client.to_canonical()));
        let err = parse(&format!("{MINIMAL}\n[admission]\nexempt = [\"::/80\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("IPv4-mapped"), "{err}");
    }

    #[test]
    fn workers_default_to_the_affinity_mask_and_zero_is_refused() {
        assert_eq!(parse(MINIMAL).unwrap().workers, None);
        let two = format!("workers = 2\n{MINIMAL}");
        assert_eq!(parse(&two).unwrap().workers.map(|n| n.get()), Some(2));
        let zero = format!("workers = 0\n{MINIMAL}");
        let err = parse(&zero).unwrap_err().to_string();
        assert!(err.contains("workers"), "{err}");
        let most = format!("workers = {MAX_WORKERS}\n{MINIMAL}");
        assert!(parse(&most).is_ok());
        let beyond = format!("workers = {}\n{MINIMAL}", MAX_WORKERS + 1);
        let err = parse(&beyond).unwrap_err().to_string();
        assert!(err.contains("at most 1024"), "{err}");
    }

    #[test]
    fn unknown_field_names_its_path_and_the_file() {
        let text = MINIMAL.replace("allow =", "alow =");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("/etc/gateway/gateway.toml"), "{err}");
        assert!(err.contains("listeners[0].routes[0]"), "{err}");
        assert!(err.contains("alow"), "{err}");
    }

    #[test]
    fn bad_allow_entry_is_refused_with_its_path() {
        let text = MINIMAL.replace("dns:batch.example.internal", "dns:*.example.internal");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("listeners[0].routes[0].allow[1]"), "{err}");
        assert!(err.contains("wildcard"), "{err}");
    }

    /// A trust domain with a leading, trailing or doubled dot would be
    /// another string for what reads as the same domain: a config error,
    /// in `spiffe_trust_domains` and in identity rules alike.
    #[test]
    fn trust_domains_with_stray_dots_are_refused() {
        for td in [
            "example.internal.",
            ".example.internal",
            "example..internal",
        ] {
            let listener = MINIMAL.replace(
                "[[listeners.routes]]",
                &format!("spiffe_trust_domains = [\"{td}\"]\n\n[[listeners.routes]]"),
            );
            let err = parse(&listener).unwrap_err().to_string();
            assert!(
                err.contains("(\"edge\").spiffe_trust_domains") && err.contains("dot"),
                "{td}: {err}"
            );
            let rule = MINIMAL.replace(
                "spiffe://example.internal/ns/shop/sa/frontend",
                &format!("spiffe://{td}/ns/shop/sa/frontend"),
            );
            let err = parse(&rule).unwrap_err().to_string();
            assert!(
                err.contains("allow[0]") && err.contains("dot"),
                "{td}: {err}"
            );
        }
    }

    #[test]
    fn two_default_routes_are_refused() {
        let text = MINIMAL.replace("server_names = [\"orders.example.internal\"]", "")
            + "\n[[listeners.routes]]\nname = \"b\"\nbackends = [\"127.0.0.1:1\"]\n";
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("two default routes"), "{err}");
    }

    #[test]
    fn cn_entries_need_the_opt_in() {
        let text = MINIMAL.replace("dns:batch.example.internal", "cn:legacy-client");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("match_common_name"), "{err}");
        let ok = text.replace("allow =", "match_common_name = true\nallow =");
        parse(&ok).unwrap();
    }

    #[test]
    fn a_device_route_trusts_its_device_ca_and_no_other() {
        let bundles = "[trust.users]\nca = \"u.pem\"\n[trust.devices]\nca = \"d.pem\"\n";
        let device = "device = { trust = \"devices\", san_prefix = \"spiffe://example.internal/device/\" }\n";
        let with = |trust: &str| format!("{bundles}{MINIMAL}{trust}{device}");
        let err = parse(&with("trust = \"users\"\n")).unwrap_err().to_string();
        assert!(
            err.contains("routes[0] (\"orders\").trust") && err.contains("two CAs"),
            "{err}"
        );
        parse(&with("trust = \"devices\"\n")).unwrap();
        parse(&with("")).unwrap();
    }

    #[test]
    fn durations_and_backends_are_checked() {
        assert_eq!(
            duration::parse("250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(duration::parse("5m").unwrap(), Duration::from_secs(300));
        assert!(duration::parse("10").is_err());
        assert_eq!(duration::parse("2d").unwrap(), Duration::from_secs(172_800));
        assert!(duration::parse("10w").is_err());
        let text = MINIMAL.replace("127.0.0.1:9001", "127.0.0.1");
        assert!(
            parse(&text)
                .unwrap_err()
                .to_string()
                .contains("not host:port")
        );
    }
}

#[cfg(test)]
mod trust_anchor_tests {
    use super::*;

    /// A trust anchor another user may replace is warned about (it decides
    /// whom the routes let in, and no revocation reaches a CA put there:
    /// the SSO store's `ca.pem` is the issuer's user's); root's is not.
    /// The owner part needs root (a file of another user); skipped
    /// otherwise.
    #[test]
    fn a_trust_anchor_another_user_may_replace_is_warned_about() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let store = dir.path().join("sso");
        std::fs::create_dir(&store).unwrap();
        std::fs::write(store.join("ca.pem"), "x").unwrap();
        std::fs::write(dir.path().join("client-roots.pem"), "x").unwrap();
        let config = |ca: &str| {
            Config::parse(
                &format!(
                    "{}\n[trust.sso]\nca = \"{ca}\"\n",
                    crate::testing::MINIMAL_CONFIG
                ),
                &dir.path().join("gateway.toml"),
                dir.path(),
            )
            .unwrap()
        };
        assert_eq!(
            config("sso/ca.pem").trust_anchor_warnings(),
            Vec::<String>::new()
        );
        // Group-writable for a group other than root's.
        std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o775)).unwrap();
        std::os::unix::fs::chown(&store, None, Some(65534)).ok();
        let w = config("sso/ca.pem").trust_anchor_warnings();
        if crate::safe_dir::euid() == 0 {
            assert_eq!(w.len(), 1, "{w:?}");
            assert!(
                w[0].contains("trust bundle \"sso\"") && w[0].contains("writable by its group"),
                "{w:?}"
            );
            std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o711)).unwrap();
            std::os::unix::fs::chown(&store, Some(65534), Some(65534)).unwrap();
            let w = config("sso/ca.pem").trust_anchor_warnings();
            assert_eq!(w.len(), 1, "{w:?}");
            assert!(
                w[0].contains("belongs to uid 65534") && w[0].contains("decides whom"),
                "{w:?}"
            );
            // A copy root owns, outside the store: no warning.
            std::fs::copy(store.join("ca.pem"), dir.path().join("sso-ca.pem")).unwrap();
            assert_eq!(
                config("sso-ca.pem").trust_anchor_warnings(),
                Vec::<String>::new()
            );
        } else {
            eprintln!("skipped the owner part: needs root");
        }
    }
}

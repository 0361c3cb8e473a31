//! `gateway run|check --config FILE`: parse the command line, set up logging,
//! hand over to the library.

#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "gateway", version, about = "eBPF-accelerated L4 mTLS gateway")]
struct Cli {
    /// Log format for the human-facing log on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve: terminate mTLS on every listener and forward to the routes' backends.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Write the process id here once serving (removed at exit), for
        /// `kill -HUP "$(cat FILE)"` on a host with more than one gateway.
        #[arg(long)]
        pid_file: Option<PathBuf>,
    },
    /// Validate the config, certificates and keys without serving; warn about
    /// what expires soon.
    Check {
        #[arg(long, short)]
        config: PathBuf,
        /// Warn about certificates and CRLs running out within this (default: the config's expiry_warning).
        #[arg(long)]
        warn_within: Option<String>,
        /// Fail when anything runs out within this.
        #[arg(long, default_value = "1d")]
        fail_within: String,
        /// Preview a reload to --config on a running gateway instead: its
        /// admin socket, or its config file (whose admin_socket is used).
        /// The gateway builds the candidate without applying it and says
        /// which live connections the reload would close or orphan, which
        /// routes change, which audited clients would be refused, and what
        /// the reload guard would say. Exit status: 0 it would apply and
        /// close nothing, 1 it would close or orphan connections or be
        /// refused, 2 the question could not be answered.
        #[arg(long, value_name = "SOCKET_OR_CONFIG")]
        against: Option<String>,
        /// With --against: the audit report's window for the clients it
        /// would refuse (e.g. 7d); default: all the gateway remembers.
        #[arg(long, requires = "against")]
        since: Option<String>,
        /// With --against: text or json.
        #[arg(long, value_enum, default_value = "text", requires = "against")]
        format: ReportFormat,
    },
    /// Reload a running gateway from the config file it was started with,
    /// through its admin socket, and print what changed or why it was
    /// refused (exit status 1). `--force` applies a reload the reload
    /// guard (max_reload_closes) would refuse.
    Reload {
        #[arg(long)]
        force: bool,
        /// The admin socket (default: `admin_socket` of --config).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// The gateway's config, to read `admin_socket` from.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// The eBPF guard outside a running gateway: on a backend host, let only
    /// the gateways reach the protected ports (`--config guard.toml`); or
    /// remove what a guard left pinned (`--uninstall`: the gateway's local
    /// guard, or with `--config` the remote guard that file describes).
    Guard {
        /// guard.toml: interfaces, allow (the gateways), protect (ports), enforcement.
        #[arg(long, short, required_unless_present = "uninstall")]
        config: Option<PathBuf>,
        /// Detach and remove the pinned programs, links and maps.
        #[arg(long)]
        uninstall: bool,
        /// The pin directory to uninstall when no --config names one.
        #[arg(long, default_value = "/sys/fs/bpf/gateway", conflicts_with = "config")]
        pin_dir: PathBuf,
    },
    /// Single sign-on to short-lived, device-bound client certificates: an
    /// HTTPS service that checks a user's OIDC ID token (with MFA) from an
    /// enrolled device (mTLS) and signs the user's CSR (docs/sso.md).
    Issuer {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// On the user's machine: sign in with the company's identity provider
    /// through the issuer and write a short-lived certificate (user.pem,
    /// user.key, ca.pem) to --out.
    Login {
        /// The issuer, https://host:port.
        #[arg(long)]
        issuer: String,
        /// This device's certificate (from the device CA) and key.
        #[arg(long)]
        device_cert: PathBuf,
        #[arg(long)]
        device_key: PathBuf,
        /// Where to write user.pem, user.key (0600) and ca.pem.
        #[arg(long)]
        out: PathBuf,
        /// Trust anchors for the issuer's TLS (default: the system's).
        #[arg(long)]
        issuer_ca: Option<PathBuf>,
        /// Trust anchors for the provider's TLS (default: the system's).
        #[arg(long)]
        provider_ca: Option<PathBuf>,
        /// Ask for this lifetime (at most the profile's maximum).
        #[arg(long)]
        lifetime: Option<String>,
        /// The issuer's profile to sign in under (its rules: MFA,
        /// lifetimes, names, renewal); none: its `default` profile.
        #[arg(long, value_name = "NAME")]
        profile: Option<String>,
        /// Only sign in when the current certificate runs out within this
        /// (e.g. 2h), for a timer; with a refresh token from the last
        /// sign-in (the issuer's profile allows it), renew with it instead,
        /// without a browser.
        #[arg(long, value_name = "WITHIN", num_args = 0..=1, default_missing_value = "2h")]
        renew: Option<String>,
        /// Sign in with the device authorization grant (a code to enter on
        /// another screen) instead of a browser on this machine.
        #[arg(long)]
        device_flow: bool,
        /// Also open the sign-in URL in the browser ($BROWSER, else xdg-open).
        #[arg(long)]
        browser: bool,
    },
    /// An internal PKI in a directory: root, intermediate, leaves, revocation.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// Print a shell completion script (e.g. `gateway completions bash >
    /// /usr/share/bash-completion/completions/gateway`).
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Print the manual page (roff) to stdout: `gateway man | man -l -`.
    Man,
    /// A fleet of gateways sharing one policy in etcd (`[fleet]` in each
    /// host's file).
    Fleet {
        #[command(subcommand)]
        command: FleetCommand,
    },
    /// Rolling out enforcement: `rollout report` asks a running gateway
    /// (through its admin endpoint) whether its audit routes are ready to
    /// enforce, and what runs out soon (the gateway's certificates and
    /// CRLs, which hold the routes they serve; clients' certificates seen
    /// in the last day). Exit status: 0 every route asked about is ready, 1
    /// one is not, 2 the question could not be answered. `rollout history`
    /// lists the config revisions, `rollout revert N` restores one (exit 0
    /// done, 2 refused or not asked).
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
        /// The admin socket (default: `admin_socket` of --config).
        #[arg(long, global = true, conflicts_with = "admin")]
        socket: Option<PathBuf>,
        /// The admin endpoint, ip:port (default: `admin` of --config when
        /// it has no `admin_socket`).
        #[arg(long, global = true)]
        admin: Option<std::net::SocketAddr>,
        /// The gateway's config, to read `admin_socket` or `admin` from.
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
    },
    /// The block list of a running gateway (through its admin endpoint):
    /// sources whose new connections are refused, and dropped in the
    /// kernel where the XDP program is attached.
    Block {
        #[command(subcommand)]
        command: BlockCommand,
        /// The admin socket (default: `admin_socket` of --config); `add`
        /// and `remove` need it.
        #[arg(long, global = true, conflicts_with = "admin")]
        socket: Option<PathBuf>,
        /// The admin endpoint, ip:port, for `list` only (default: `admin`
        /// of --config when it has no `admin_socket`).
        #[arg(long, global = true)]
        admin: Option<std::net::SocketAddr>,
        /// The gateway's config, to read `admin_socket` or `admin` from.
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum FleetCommand {
    /// Validate a config exactly as `gateway check` does (refusing to
    /// write anything invalid), then write it as the fleet's document with
    /// every CA bundle and CRL it names, in one etcd transaction.
    Push {
        /// A host file with `[fleet]`: which etcd, which prefix.
        #[arg(long, short)]
        config: PathBuf,
        /// The shared document: listeners, routes, trust bundles (their
        /// files as plain names beside it), guard.
        #[arg(long)]
        from: PathBuf,
        /// As `gateway check`: refuse when anything runs out within this.
        #[arg(long, default_value = "1d")]
        fail_within: String,
    },
    /// Every member registered in etcd (name, host, version, the revision
    /// it serves, when it applied it, what it refused) and whether it is
    /// on the latest document. Exit status: 0 every member is, 1 one is
    /// not (or none is registered), 2 etcd could not be asked.
    Status {
        #[arg(long, short)]
        config: PathBuf,
        /// text or json.
        #[arg(long, value_enum, default_value = "text")]
        format: ReportFormat,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Subcommand)]
enum BlockCommand {
    /// Every entry: source, why, and how long it stays.
    List,
    /// Block an address or a prefix (192.0.2.7, 192.0.2.0/24, 2001:db8::/64).
    Add {
        source: String,
        /// For how long (e.g. 1h, 7d); default: until removed.
        #[arg(long = "for")]
        ttl: Option<String>,
        /// Block a prefix wider than a /16 (IPv4) or /32 (IPv6); a /0 is
        /// refused even so.
        #[arg(long)]
        force: bool,
    },
    /// Remove the entry for exactly this address or prefix.
    Remove { source: String },
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// Per route: clients seen, who enforcement would refuse (identity,
    /// source prefix, reason, count, first and last seen), and a verdict.
    Report {
        /// Only this route (on every listener that has one).
        #[arg(long)]
        route: Option<String>,
        /// Only what was last seen within this (e.g. 7d); default:
        /// everything the gateway remembers.
        #[arg(long)]
        since: Option<String>,
        #[arg(long, value_enum, default_value = "text")]
        format: ReportFormat,
    },
    /// The config revisions the gateway applied, newest first: number,
    /// time, how (start, reload, revert, auto-revert), the config's
    /// SHA-256, and whether the files it named still hash the same.
    History {
        #[arg(long, value_enum, default_value = "text")]
        format: ReportFormat,
    },
    /// Restore revision N through the reload path (admin socket only); its
    /// config text is written back to the config file. Refused when a
    /// file it named changed since, unless --force.
    Revert {
        revision: u64,
        /// Apply its config even though files it named changed since.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ReportFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Create a root CA (its key belongs offline afterwards) and an issuing intermediate.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Organisation name in the CA subjects.
        #[arg(long, default_value = "gateway")]
        name: String,
        #[arg(long, value_enum, default_value_t = KeyArg::P256)]
        key_type: KeyArg,
        /// Name-constrain the intermediate to DNS names under this domain.
        #[arg(long)]
        permitted_dns: Option<String>,
        /// Also write the root's CRL here, outside DIR, in a directory only
        /// root may write (e.g. /etc/gateway/sso-root.crl.pem): routes list
        /// it beside DIR/crl.pem, so what DIR's owner writes cannot take
        /// back a revocation of the intermediate.
        #[arg(long)]
        root_crl_out: Option<PathBuf>,
        /// Write the root's key here (0600, root's; then to offline media)
        /// and never into DIR, whose owner could read it.
        #[arg(long)]
        root_key_out: Option<PathBuf>,
        /// Write the root's certificate here (0644, root's): the routes'
        /// trust anchor (e.g. /etc/gateway/sso-ca.pem), never read back
        /// from DIR.
        #[arg(long)]
        ca_out: Option<PathBuf>,
    },
    /// Issue a certificate: server (serverAuth only), client or device (clientAuth only).
    Issue {
        #[arg(value_enum)]
        kind: KindArg,
        #[arg(long)]
        dir: PathBuf,
        /// File name (NAME.pem, NAME.key) and subject CN.
        #[arg(long)]
        name: String,
        /// spiffe://… (any URI), dns:NAME or email:ADDR; repeat for more. No wildcards.
        #[arg(long = "san", required = true)]
        sans: Vec<String>,
        /// Lifetime, e.g. 90s, 8h, 7d (default: client 24h, device 7d, server 90d).
        #[arg(long)]
        lifetime: Option<String>,
        #[arg(long, value_enum, default_value_t = KeyArg::P256)]
        key_type: KeyArg,
    },
    /// Revoke by hex serial or certificate file (a path with a '/':
    /// ./NAME.pem), and publish a fresh CRL. Revoking the intermediate
    /// needs --intermediate and root.key.
    /// `--device URI` revokes every live certificate bound to that device
    /// (in the SSO CA: the user certificates a lost device holds).
    Revoke {
        #[arg(long)]
        dir: PathBuf,
        #[arg(required_unless_present = "device", conflicts_with = "device")]
        serial_or_cert: Option<String>,
        /// A device URI (spiffe://…/device/NAME).
        #[arg(long)]
        device: Option<String>,
        /// The serial or certificate named is the intermediate's: the root
        /// revokes it, and with it everything it issued.
        #[arg(long, conflicts_with = "device")]
        intermediate: bool,
        /// The root's key, kept offline (root's, 0600), for --intermediate;
        /// default: DIR/root.key (which the store's owner can read).
        #[arg(long, requires = "intermediate")]
        root_key: Option<PathBuf>,
        /// Where the root's new CRL also goes, outside DIR, in a directory
        /// only root may write (e.g. /etc/gateway/sso-root.crl.pem; the
        /// same file each time): routes list it beside DIR/crl.pem. Needed
        /// with --intermediate.
        #[arg(long, requires = "intermediate")]
        root_crl_out: Option<PathBuf>,
        /// No file at --root-crl-out yet: its first use on this store (the
        /// store's root CRLs seed it; check the serials listed).
        #[arg(long, requires = "root_crl_out")]
        root_crl_new: bool,
        /// The root's certificate from a copy root owns (e.g. the routes'
        /// /etc/gateway/sso-ca.pem) rather than DIR/root.pem, which DIR's
        /// owner may replace.
        #[arg(long, requires = "intermediate")]
        root_cert: Option<PathBuf>,
    },
    /// Publish a fresh CRL (crl.pem: the intermediate's, signed now, and
    /// the root's, as last signed).
    Crl {
        #[arg(long)]
        dir: PathBuf,
        /// How long until its next update, e.g. 36h, 7d.
        #[arg(long, default_value = "7d")]
        next_update: String,
        /// Also re-sign the root's CRL (needs the root key), e.g. before it runs out.
        #[arg(long)]
        root: bool,
        /// The root's key, kept offline (root's, 0600), for --root;
        /// default: DIR/root.key (which the store's owner can read).
        #[arg(long, requires = "root")]
        root_key: Option<PathBuf>,
        /// Where the root's new CRL also goes (see `revoke
        /// --root-crl-out`). Needed with --root.
        #[arg(long, requires = "root")]
        root_crl_out: Option<PathBuf>,
        /// No file at --root-crl-out yet (see `revoke --root-crl-new`).
        #[arg(long, requires = "root_crl_out")]
        root_crl_new: bool,
        /// The root's certificate from a copy root owns (see `revoke
        /// --root-cert`).
        #[arg(long, requires = "root")]
        root_cert: Option<PathBuf>,
    },
    /// Show what the gateway would see in a certificate and why it would refuse it.
    Inspect {
        file: PathBuf,
        /// Also check the chain against these trust anchors.
        #[arg(long)]
        client_ca: Option<PathBuf>,
        /// Check revocation against this CRL file (default: crl.pem beside
        /// FILE, as `gateway pki` writes it, when there is one).
        #[arg(long)]
        crl: Option<PathBuf>,
        /// Do not check revocation.
        #[arg(long, conflicts_with = "crl")]
        no_crl: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum KeyArg {
    P256,
    Ed25519,
    Rsa,
}

#[derive(Clone, Copy, ValueEnum)]
enum KindArg {
    Server,
    Client,
    Device,
}

fn key_type(k: KeyArg) -> gateway::pki::KeyType {
    match k {
        KeyArg::P256 => gateway::pki::KeyType::P256,
        KeyArg::Ed25519 => gateway::pki::KeyType::Ed25519,
        KeyArg::Rsa => gateway::pki::KeyType::Rsa2048,
    }
}

/// Lifetimes for certificates and CRLs, in the config's duration syntax
/// ("90s", "30m", "8h", "7d"): one way to write a duration everywhere.
fn lifetime(s: &str) -> anyhow::Result<time::Duration> {
    let d = gateway::config::duration::parse(s).map_err(anyhow::Error::msg)?;
    Ok(time::Duration::try_from(d)?)
}

fn issuer(path: &std::path::Path) -> anyhow::Result<()> {
    use gateway::issuer::{Issuer, config::IssuerConfig, http, server};
    use gateway::privilege;
    let config = IssuerConfig::load(path)?;
    // Who it runs as: with `user`, started as root, that user once the
    // listeners are bound, before the runtime (its threads) exists and
    // before a byte is read from the network, the CA's key or the files
    // the config names. Root parsing TLS, HTTP and JSON from anyone who
    // connects, with the SSO CA's key in memory, is one bug from the host.
    let euid = privilege::effective_uid();
    let target = match &config.user {
        Some(user) => {
            let target = privilege::Target::alone(user)?;
            // Never the gateway's user, whoever starts it (S4-4), nor one
            // in a group of its: with the groups a unit running it as
            // `user` gives it, though the drop from root keeps none
            // (S10-2).
            target
                .in_its_groups()?
                .not_the_gateways(std::path::Path::new(privilege::GATEWAY_CONFIG))?;
            if euid == 0 {
                // Root reads this config at the next start: the user must
                // not be able to rewrite it (to drop `user`, say).
                target.check_config(path)?;
                gateway::pki::store::Store::open(&config.ca_dir)
                    .check_owner(target.uid, user)
                    .map_err(|e| anyhow::anyhow!("ca_dir: {e}"))?;
                Some(target)
            } else if euid == target.uid {
                None
            } else {
                return Err(privilege::PrivilegeError::NotRoot {
                    user: user.clone(),
                    euid,
                }
                .into());
            }
        }
        None => {
            // Started as some user without `user`: that user may not be
            // the gateway's either (a unit with User=gateway, as older
            // docs had it), nor share its group.
            if euid != 0 {
                privilege::Target::current()?
                    .not_the_gateways(std::path::Path::new(privilege::GATEWAY_CONFIG))?;
            }
            if euid == 0 {
                tracing::warn!(
                    "issuer: running as root without `user` in issuer.toml: it parses TLS, HTTP and JSON \
                     from the network and holds the SSO CA's key as root, so a bug there is root on this \
                     host; set user = \"gateway-issuer\" (the store chowned to it; never the gateway's \
                     user), or start it as that user \
                     (examples/gateway-issuer.service)"
                );
            }
            None
        }
    };
    let listener = server::bind_std(config.listen)?;
    let metrics_listener = config.metrics_listen.map(server::bind_std).transpose()?;
    if let Some(target) = &target {
        privilege::drop_alone(target)?;
        // Every SIGHUP reads issuer.toml as this user: one it cannot read
        // stops the start, not each reload.
        server::check_reloadable(path, &target.user)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        if let Some(target) = &target {
            // The runtime's threads, made after the drop, checked too.
            privilege::verify_alone(target)?;
            tracing::info!(user = %target.user, uid = target.uid, gid = target.gid,
                "issuer: running as its user (no supplementary groups, no capabilities)");
        }
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let metrics_listener = metrics_listener
            .map(tokio::net::TcpListener::from_std)
            .transpose()?;
        let acceptor: server::Acceptor = std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(
            server::acceptor(&config)?,
        ));
        let keys = http::ProviderKeys {
            tls: http::client_config(config.oidc.ca.as_deref(), None)?,
            issuer: config.oidc.issuer.clone(),
        };
        let issuer = std::sync::Arc::new(
            Issuer::new(config, Box::new(keys)).map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        let addr = listener.local_addr()?;
        // Before it says it is listening: until then SIGHUP's default
        // action ends the process, and a reload sent as soon as the log
        // says so (a test, `systemctl reload` right after start) killed
        // it while the first CRL check ran.
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        tracing::info!(%addr, "issuer listening");
        let stop = tokio_util::sync::CancellationToken::new();
        // The SSO CA's CRL: nothing else re-publishes it, and routes with
        // `crl_expired = "refuse"` refuse every user once it is stale.
        // Checked now, on SIGHUP and every minute (a failure is retried
        // then).
        let maintain_crl = |issuer: std::sync::Arc<Issuer>| async move {
            // Signing and file I/O under the store's lock: off the runtime.
            let _ = tokio::task::spawn_blocking(move || issuer.maintain_crl()).await;
        };
        maintain_crl(issuer.clone()).await;
        if let Some(m) = metrics_listener {
            tracing::info!(addr = %m.local_addr()?, "issuer metrics listening");
            tokio::spawn(server::serve_metrics(m, issuer.clone(), stop.clone()));
        }
        let serving = tokio::spawn(server::serve(
            listener,
            acceptor.clone(),
            issuer.clone(),
            stop.clone(),
        ));
        // The device CRLs change as devices are revoked: read them again
        // on SIGHUP and every minute, so a revoked device stops getting
        // certificates without a restart. SIGHUP reads issuer.toml again
        // too (which rebuilds the acceptor from the files it names); a
        // config that is refused leaves the one in service, whose device
        // CA and CRLs are then read again as on the timer.
        let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
        every.tick().await;
        // The CRL check runs beside the loop, one at a time: a wait for
        // the store's lock (up to its deadline) must not hold back the
        // device CRLs' reload or SIGTERM.
        let mut crl_check: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            let why = tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = hup.recv() => "SIGHUP",
                _ = every.tick() => "timer",
            };
            let reloaded = why == "SIGHUP"
                && server::reload_config(path, &issuer, &acceptor).is_ok();
            if crl_check.as_ref().is_none_or(|t| t.is_finished()) {
                crl_check = Some(tokio::spawn(maintain_crl(issuer.clone())));
            } else {
                tracing::warn!(why, "issuer: the previous CRL check is still running; not started again");
            }
            if reloaded {
                tracing::info!(why, "issuer: issuer.toml, device CA and CRLs read again");
                continue;
            }
            match server::reload(&issuer.current_config(), &acceptor) {
                Ok(()) if why == "timer" => {
                    tracing::debug!(why, "issuer: device CA and CRLs read again")
                }
                Ok(()) => tracing::info!(why, "issuer: device CA and CRLs read again"),
                Err(e) => tracing::error!(why, error = %e,
                    "issuer: reading the device CA and CRLs again failed; the previous ones stay in service"),
            }
        }
        stop.cancel();
        let _ = serving.await;
        Ok(())
    })
}

fn login(args: gateway::login::LoginArgs) -> anyhow::Result<()> {
    use gateway::login::Outcome;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(gateway::login::login(&args, |msg| {
        println!("{msg}");
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
    }))?;
    let when = |t: i64| {
        jiff::Timestamp::from_second(t)
            .map(|t| t.to_string())
            .unwrap_or_else(|_| t.to_string())
    };
    match outcome {
        Outcome::StillValid(end) => println!(
            "{}: valid until {}; not renewed",
            args.out.join("user.pem").display(),
            when(end)
        ),
        Outcome::Issued(answer) => {
            println!(
                "signed in as {} (profile {})",
                answer.sans.join(", "),
                answer.profile
            );
            println!(
                "certificate {} (serial {})",
                args.out.join("user.pem").display(),
                answer.serial
            );
            println!(
                "key         {} (0600, made here)",
                args.out.join("user.key").display()
            );
            println!("valid until {}", answer.not_after);
            if args.out.join(gateway::login::REFRESH_TOKEN).exists() {
                println!(
                    "refresh     {} (0600: --renew renews with it, no browser)",
                    args.out.join(gateway::login::REFRESH_TOKEN).display()
                );
            }
        }
        Outcome::Renewed(answer) => {
            println!(
                "renewed without signing in (refresh token) as {} (profile {})",
                answer.sans.join(", "),
                answer.profile
            );
            println!(
                "certificate {} (serial {})",
                args.out.join("user.pem").display(),
                answer.serial
            );
            println!("valid until {}", answer.not_after);
        }
    }
    Ok(())
}

/// What the root's new CRL lists, and anything an operator must look at:
/// serials kept although `index.json` dropped them, earlier CRLs that did
/// not verify, a root key read from the store (S7-1).
fn print_root_crl(signed: &gateway::pki::store::RootCrlSigned, key_in_store: bool) {
    println!(
        "the root's CRL (number {}) lists {}",
        signed.crl_number,
        if signed.listed.is_empty() {
            "no intermediate".to_owned()
        } else {
            format!("the intermediate serials {}", signed.listed.join(", "))
        }
    );
    if !signed.restored.is_empty() {
        println!(
            "WARNING: index.json no longer recorded {} as revoked, but the root's earlier CRL (signed by its key) did: \
             kept revoked, and written back to index.json. Someone edited the index: whoever writes the store \
             (the issuer's user) may be compromised",
            signed.restored.join(", ")
        );
    }
    for why in &signed.unverified {
        println!("WARNING: an earlier root CRL was not taken into account: {why}");
    }
    if key_in_store {
        println!(
            "WARNING: the root key was read from the store, where its owner (the issuer's user) can read and replace it: \
             keep it offline, root's (0600), give it with --root-key PATH, and run this command as root"
        );
    }
}

/// Where the root's CRL went outside the store, and what routes do with
/// it (S11-2).
fn print_root_crl_out(out: Option<&Path>) {
    if let Some(out) = out {
        println!(
            "the root's CRL, outside the store: {} (list it in the crls of every route that trusts this CA, \
             beside crl.pem, and copy it to gateways on other hosts)",
            out.display()
        );
    }
}

fn pki(command: PkiCommand) -> anyhow::Result<()> {
    use gateway::pki::store::{InitSpec, Kind, Store};
    match command {
        PkiCommand::Init {
            dir,
            name,
            key_type: k,
            permitted_dns,
            root_crl_out,
            root_key_out,
            ca_out,
        } => {
            let store = Store::open(&dir)
                .with_root_crl_out(root_crl_out.as_deref())
                .with_init_outs(root_key_out.as_deref(), ca_out.as_deref());
            store.init(&InitSpec {
                name: &name,
                key_type: key_type(k),
                permitted_dns: permitted_dns.as_deref(),
            })?;
            println!("created root and intermediate CA in {}", dir.display());
            println!(
                "trust anchor for the gateway and clients: {}",
                store.path("ca.pem").display()
            );
            println!(
                "CRLs for the gateway's bundle: {} (the intermediate's and the root's)",
                store.path("crl.pem").display()
            );
            print_root_crl_out(root_crl_out.as_deref());
            if let Some(ca) = &ca_out {
                println!(
                    "the routes' trust anchor, outside the store: {}",
                    ca.display()
                );
            }
            println!(
                "{} signs only the intermediate and the root's CRL: move it offline now \
                 (root's, 0600; later commands take it with --root-key PATH)",
                root_key_out
                    .unwrap_or_else(|| store.path("root.key"))
                    .display()
            );
            println!(
                "root: SHA-256 fingerprint {} (the routes' trust anchor must show this one)",
                store.root_fingerprint()?
            );
            // Kept with the root key, these tell the intermediate from
            // anything put in its place in the store later (S7-1).
            let (serial, fingerprint) = store.intermediate_fingerprint()?;
            println!(
                "intermediate: serial {serial}, SHA-256 fingerprint {fingerprint} (keep both, or a copy of {}, with the root key)",
                store.path("intermediate.pem").display()
            );
        }
        PkiCommand::Issue {
            kind,
            dir,
            name,
            sans,
            lifetime: l,
            key_type: k,
        } => {
            let kind = match kind {
                KindArg::Server => Kind::Server,
                KindArg::Client => Kind::Client,
                KindArg::Device => Kind::Device,
            };
            let l = l.as_deref().map(lifetime).transpose()?;
            let (cert, key) = Store::open(&dir).issue(kind, &name, &sans, l, key_type(k))?;
            println!(
                "issued {} (chain) and {} (key, 0600)",
                cert.display(),
                key.display()
            );
        }
        PkiCommand::Revoke {
            dir,
            serial_or_cert,
            device,
            intermediate,
            root_key,
            root_crl_out,
            root_crl_new,
            root_cert,
        } => {
            let store = Store::open(&dir);
            if let Some(uri) = device {
                let done = store.revoke_device_uri(&uri)?;
                let (uri, revoked) = (&done.uri, &done.revoked);
                for e in revoked {
                    println!(
                        "revoked {} (serial {}, until {})",
                        e.name, e.serial, e.not_after
                    );
                }
                // Recorded whether or not it held anything: the issuer
                // signs for it again only after a re-enrolment.
                println!(
                    "{uri} recorded as revoked: the issuer signs nothing more for it unless its device certificate is issued after now"
                );
                if !done.ever_bound {
                    println!(
                        "WARNING: no certificate in the index was ever bound to {uri}: check the spelling against the \
                         device certificate's URI SAN (the issuer matches it exactly)"
                    );
                }
                if revoked.is_empty() {
                    println!("no live certificate bound to {uri}: nothing revoked");
                } else {
                    println!(
                        "{} revoked; published {}",
                        revoked.len(),
                        store.path("crl.pem").display()
                    );
                }
            } else if let Some(what) = serial_or_cert {
                if intermediate {
                    let store = store
                        .with_root_key(root_key.as_deref())
                        .with_root_crl_out(root_crl_out.as_deref())
                        .with_root_crl_new(root_crl_new)
                        .with_root_cert(root_cert.as_deref());
                    let done = store.revoke_intermediate(&what)?;
                    println!(
                        "revoked intermediate: serial {}, SHA-256 fingerprint {}",
                        done.entry.serial, done.fingerprint
                    );
                    println!(
                        "compare both with what `gateway pki init` printed: the root's key signed this certificate, \
                         but only they tell it is the intermediate you mean"
                    );
                    print_root_crl(&done.root_crl, done.key_in_store);
                    // Its key is not needed (it may be gone after a
                    // compromise): the root's new CRL went in beside its
                    // CRL as it was. Said as it happened (S7-6).
                    use gateway::pki::store::IntermediateCrl;
                    let beside = match done.intermediate_crl {
                        IntermediateCrl::Kept => {
                            "beside the intermediate's own CRL, kept as it was (not re-signed)"
                        }
                        IntermediateCrl::Signed => {
                            "beside the intermediate's own CRL, signed afresh with its key (crl.pem could not be read)"
                        }
                        IntermediateCrl::None => "alone: crl.pem held no CRL of the intermediate",
                    };
                    println!(
                        "published {}: the root's new CRL, {beside}",
                        store.path("crl.pem").display()
                    );
                    print_root_crl_out(root_crl_out.as_deref());
                    println!(
                        "while the store's owner may be compromised, {} proves nothing (it can put back the file \
                         from before): make every route's crls for this CA the root's CRL alone and reload \
                         (docs/sso.md, \"The SSO CA's CRL\")",
                        store.path("crl.pem").display()
                    );
                } else {
                    let entry = store.revoke_as(&what, false)?;
                    println!(
                        "revoked {} (serial {}); published {}",
                        entry.name,
                        entry.serial,
                        store.path("crl.pem").display()
                    );
                }
            }
        }
        PkiCommand::Crl {
            dir,
            next_update,
            root,
            root_key,
            root_crl_out,
            root_crl_new,
            root_cert,
        } => {
            let store = Store::open(&dir)
                .with_root_key(root_key.as_deref())
                .with_root_crl_out(root_crl_out.as_deref())
                .with_root_crl_new(root_crl_new)
                .with_root_cert(root_cert.as_deref());
            let validity = lifetime(&next_update)?;
            let path = if root {
                let (path, signed) = store.republish_root_crl(validity)?;
                print_root_crl(&signed, root_key.is_none());
                print_root_crl_out(root_crl_out.as_deref());
                path
            } else {
                store.publish_crl(validity)?
            };
            println!("published {}", path.display());
        }
        PkiCommand::Inspect {
            file,
            client_ca,
            crl,
            no_crl,
        } => {
            // The PKI directory's CRL unless told otherwise: a revoked
            // certificate must not read as usable.
            let crl = match (crl, no_crl) {
                (_, true) => None,
                (Some(crl), false) => Some(crl),
                (None, false) => Some(file.with_file_name("crl.pem")).filter(|p| p.is_file()),
            };
            let report =
                gateway::pki::inspect::inspect(&file, client_ca.as_deref(), crl.as_deref())?;
            print!("{}", report.text);
            if !report.refusals.is_empty() {
                anyhow::bail!("the gateway would refuse this certificate");
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // A daemon's stderr is its log: its fatal error is a log line there
    // (JSON when asked). A one-shot command answers in plain words. Either
    // way the error is said once.
    let daemon = matches!(
        cli.command,
        Command::Run { .. }
            | Command::Guard {
                config: Some(_),
                uninstall: false,
                ..
            }
    );
    let result = match cli.command {
        Command::Run { config, pid_file } => run(&config, pid_file.as_deref()),
        Command::Check {
            config,
            against: Some(against),
            since,
            format,
            ..
        } => return check_against(&config, &against, since.as_deref(), format),
        Command::Check {
            config,
            warn_within,
            fail_within,
            against: None,
            ..
        } => check(&config, warn_within.as_deref(), &fail_within),
        Command::Reload {
            force,
            socket,
            config,
        } => reload(force, socket, config.as_deref()),
        Command::Issuer { config } => issuer(&config),
        Command::Login {
            issuer,
            device_cert,
            device_key,
            out,
            issuer_ca,
            provider_ca,
            lifetime,
            renew,
            device_flow,
            browser,
            profile,
        } => login(gateway::login::LoginArgs {
            profile,
            device_flow,
            open_browser: browser,
            issuer,
            issuer_ca,
            provider_ca,
            device_cert,
            device_key,
            out,
            lifetime,
            renew_within: match renew.as_deref().map(gateway::config::duration::parse) {
                None => None,
                Some(Ok(d)) => Some(d),
                Some(Err(e)) => {
                    eprintln!("gateway: --renew: {e}");
                    return ExitCode::from(2);
                }
            },
        }),
        Command::Pki { command } => pki(command),
        Command::Block {
            command,
            socket,
            admin,
            config,
        } => block(command, socket, admin, config.as_deref()),
        Command::Rollout {
            command,
            socket,
            admin,
            config,
        } => return rollout(command, socket, admin, config.as_deref()),
        Command::Completions { shell } => {
            let shell = match shell {
                Shell::Bash => clap_complete::Shell::Bash,
                Shell::Zsh => clap_complete::Shell::Zsh,
                Shell::Fish => clap_complete::Shell::Fish,
            };
            // Into memory first: the generators panic on a failed write,
            // and a closed pipe is an error to report, not a panic.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "gateway", &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script).map_err(Into::into)
        }
        Command::Fleet {
            command:
                FleetCommand::Push {
                    config,
                    from,
                    fail_within,
                },
        } => fleet_push(&config, &from, &fail_within),
        Command::Fleet {
            command: FleetCommand::Status { config, format },
        } => return yes_no_or_error(fleet_status(&config, format)),
        Command::Man => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .map_err(Into::into),
        Command::Guard {
            config: Some(path),
            uninstall: true,
            ..
        } => gateway::remote_guard::pin_dir(&path)
            .map_err(anyhow::Error::from)
            .and_then(|dir| match dir {
                Some(dir) => uninstall_guard(&dir),
                None => anyhow::bail!(
                    "{}: pin = false, so the guard detached when it stopped; nothing to remove",
                    path.display()
                ),
            }),
        Command::Guard {
            config: Some(path), ..
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| {
                rt.block_on(gateway::remote_guard::run(&path))
                    .map_err(Into::into)
            }),
        Command::Guard {
            config: None,
            pin_dir,
            ..
        } => uninstall_guard(&pin_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = error_chain(&e);
            if daemon {
                tracing::error!("{message}");
            } else {
                eprintln!("gateway: {message}");
            }
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once: most of the gateway's errors
/// already carry their source's words, which `{:#}` would repeat.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain().map(ToString::to_string) {
        if !out.contains(&cause) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&cause);
        }
    }
    out
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GATEWAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn check(
    path: &std::path::Path,
    warn_within: Option<&str>,
    fail_within: &str,
) -> anyhow::Result<()> {
    let config = gateway::Config::load(path)?;
    let state = gateway::state::State::from_config(&config)?;
    // An unknown user stops `run` before it binds anything; say so here.
    let target = gateway::privilege::Target::resolve(&config)?;
    gateway::access_log::AccessLog::check(&config.access_log, &config.base_dir, target.as_ref())?;
    if let Some(target) = &target {
        gateway::safe_dir::set_drops_to(target.uid);
    }
    for warning in config.trust_anchor_warnings() {
        println!("warning: {warning}");
    }
    if let Some(target) = target {
        let kept: Vec<String> = target
            .kept
            .iter()
            .map(|k| format!("{:?}", k.capability))
            .collect();
        println!(
            "runs as {} (uid {}, gid {}) after start, keeping: {}",
            target.user,
            target.uid,
            target.gid,
            if kept.is_empty() {
                "no capabilities".to_owned()
            } else {
                kept.join(", ")
            }
        );
    }
    let horizon = |s: &str| -> anyhow::Result<i64> {
        let d = gateway::config::duration::parse(s).map_err(|e| anyhow::anyhow!(e))?;
        Ok(i64::try_from(d.as_secs())?)
    };
    let warn = match warn_within {
        Some(w) => horizon(w)?,
        None => i64::try_from(config.expiry_warning.as_secs())?,
    };
    let fail = horizon(fail_within)?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut critical = 0;
    for e in gateway::expiry::collect(&config) {
        let left = e.seconds_left(now);
        // A CRL the bundle uses stale anyway (crl_expired = "warn") stops
        // no client: a warning, never a failure.
        if left <= fail && e.fails_closed() {
            critical += 1;
            println!("critical: {}", gateway::expiry::describe(&e, now));
        } else if left <= warn {
            println!("warning: {}", gateway::expiry::describe(&e, now));
        }
    }
    for l in &state.listeners {
        println!(
            "listener {:?} on {}: {} route(s): {}",
            l.name,
            l.bind,
            l.routes.len(),
            l.routes
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if critical > 0 {
        anyhow::bail!("{critical} certificate(s) or CRL(s) run out within {fail_within}");
    }
    println!("{}: OK", path.display());
    Ok(())
}

/// The pid file of a serving gateway; removed when it stops, if it is
/// still the file written.
struct PidFile {
    /// Its directory, held from the write: the removal happens there,
    /// whatever its name has become.
    dir: gateway::safe_dir::Dir,
    name: String,
    dev: u64,
    ino: u64,
}

impl PidFile {
    /// Written while the gateway may still be root, perhaps in a directory
    /// its `user` (`drops_to`) can write: never through a symlink or into a
    /// file already there (a stale one is unlinked first; one planted after
    /// that makes the start fail rather than have root write where it
    /// points). Its directory is reached as the access log's is
    /// (`safe_dir::reach_parent`): every directory a name is looked up in
    /// on the way, the pid file's own aside (root's /run, or the user's
    /// RuntimeDirectory= /run/gateway), must be out of that user's reach,
    /// and the unlink and the create happen in the directory judged. By
    /// path, with no check above its own directory, a user who could
    /// write the directory above (`--pid-file /var/lib/gateway/run/x.pid`)
    /// swapped `run` for a link and had root unlink and replace a file of
    /// that name anywhere (review 13, S13-3).
    fn write(
        path: &std::path::Path,
        drops_to: Option<&gateway::privilege::Target>,
    ) -> anyhow::Result<PidFile> {
        use std::io::Write as _;
        use std::os::unix::fs::MetadataExt as _;
        let fail =
            |e: std::io::Error| anyhow::anyhow!("cannot write pid file {}: {e}", path.display());
        let mut groups = drops_to.map(|u| u.groups.clone()).unwrap_or_default();
        if let Some(user) = drops_to {
            groups.push(user.gid);
        }
        let refuse = |why: String| {
            std::io::Error::other(format!(
                "it is reached through a directory user {:?} (whom the gateway drops to) may write: {why}; that user could put a symlink in place of the pid file's directory and have root unlink and create a file of this name anywhere. Keep every directory above the pid file's root's and writable by root alone, as /run is; its own directory may be the user's (systemd's RuntimeDirectory=, /run/gateway)",
                drops_to.map(|u| u.user.as_str()).unwrap_or_default()
            ))
        };
        let (dir, name) = gateway::safe_dir::reach_parent(
            path,
            drops_to.map(|u| (u.uid, groups.as_slice())),
            false,
            &refuse,
        )
        .map_err(fail)?;
        match dir.remove(&name) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(fail(e)),
            _ => {}
        }
        let mut file = dir.open_new(&name, 0o644).map_err(fail)?;
        file.write_all(format!("{}\n", std::process::id()).as_bytes())
            .map_err(fail)?;
        let meta = file.metadata().map_err(fail)?;
        Ok(PidFile {
            dir,
            name,
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt as _;
        let ours = self
            .dir
            .symlink_metadata(&self.name)
            .is_ok_and(|m| (m.dev(), m.ino()) == (self.dev, self.ino));
        if ours {
            let _ = self.dir.remove(&self.name);
        }
    }
}

/// `gateway fleet push`: what `gateway check` accepts, and nothing else,
/// goes into etcd.
fn fleet_push(
    host: &std::path::Path,
    from: &std::path::Path,
    fail_within: &str,
) -> anyhow::Result<()> {
    let host = gateway::fleet::Host::load(host)?
        .ok_or_else(|| anyhow::anyhow!("{}: no [fleet] section", host.display()))?;
    check(from, None, fail_within)?;
    let text = std::fs::read_to_string(from)?;
    let dir = from
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let mut files = std::collections::BTreeMap::new();
    for name in gateway::fleet::named_files(&text)? {
        let path = dir.join(&name);
        let bytes = std::fs::read(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        files.insert(name, bytes);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let revision = runtime.block_on(gateway::fleet::etcd::push(&host, &text, &files))?;
    println!(
        "pushed {} and {} file(s) to {} at revision {revision}",
        from.display(),
        files.len(),
        host.prefix()
    );
    Ok(())
}

/// `gateway fleet status`: Ok(true) when every registered member serves
/// the latest document.
fn fleet_status(host: &std::path::Path, format: ReportFormat) -> anyhow::Result<bool> {
    let host = gateway::fleet::Host::load(host)?
        .ok_or_else(|| anyhow::anyhow!("{}: no [fleet] section", host.display()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (fetched, members) = runtime.block_on(gateway::fleet::etcd::status(&host))?;
    let latest = fetched.document.as_ref().map(|d| d.revision).ok();
    let on_latest = |m: &gateway::fleet::MemberRecord| Some(m.revision) == latest;
    let all = !members.is_empty() && members.iter().all(on_latest);
    match format {
        ReportFormat::Json => {
            let members: Vec<serde_json::Value> = members
                .iter()
                .map(|m| {
                    let mut v = serde_json::to_value(m).unwrap_or_default();
                    if let Some(o) = v.as_object_mut() {
                        o.insert("on_latest".into(), on_latest(m).into());
                    }
                    v
                })
                .collect();
            let body = serde_json::json!({
                "prefix": host.prefix(),
                "latest": latest,
                "latest_refused": fetched.document.as_ref().err().map(|e| e.to_string()),
                "members": members,
            });
            println!("{}", serde_json::to_string_pretty(&body)?);
        }
        ReportFormat::Text => {
            match &fetched.document {
                Ok(d) => println!("{}: document at revision {}", host.prefix(), d.revision),
                Err(e) => println!("{}: no document a member would serve: {e}", host.prefix()),
            }
            for m in &members {
                let applied = match m.applied_at {
                    0 => "since its start".to_owned(),
                    t => jiff::Timestamp::from_second(t)
                        .map(|t| t.to_string())
                        .unwrap_or_default(),
                };
                println!(
                    "{} ({}, {}): revision {} applied {}{}{}",
                    m.name,
                    m.address,
                    m.version,
                    m.revision,
                    applied,
                    if on_latest(m) {
                        ", latest"
                    } else {
                        ", NOT the latest"
                    },
                    m.refused
                        .as_ref()
                        .map(|(r, why)| format!("; refused revision {r}: {why}"))
                        .unwrap_or_default()
                );
            }
            if members.is_empty() {
                println!("no member registered");
            }
        }
    }
    Ok(all)
}

fn run(path: &std::path::Path, pid_file: Option<&std::path::Path>) -> anyhow::Result<()> {
    // Before any key is read or socket bound: another process of the same
    // user must not read them out of this one.
    gateway::privilege::not_dumpable()?;
    // A fleet member's config is its host file and etcd's document (or,
    // etcd unreachable, the cached one); a plain one is its file.
    let fleet = gateway::fleet::Host::load(path)?;
    let (config, document) = match &fleet {
        Some(host) => {
            let (config, document) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(gateway::fleet::etcd::start(host))?;
            (config, Some(document))
        }
        None => (gateway::Config::load(path)?, None),
    };
    // Looked up before anything is bound: an unknown user stops nothing
    // half-started.
    let target = gateway::privilege::Target::resolve(&config)?;
    // Root reads this config at every start: the user it drops to must not
    // be able to rewrite it.
    if let Some(target) = &target
        && gateway::safe_dir::euid() == 0
    {
        target.check_config(path)?;
        // What the gateway writes as that user, root reads back at start.
        gateway::safe_dir::set_drops_to(target.uid);
        if target
            .kept
            .iter()
            .any(|k| k.capability == caps::Capability::CAP_DAC_OVERRIDE)
        {
            tracing::warn!(
                config = %path.display(),
                "with [guard] the gateway keeps CAP_DAC_OVERRIDE as its user, which writes past file modes: \
                 the check that its user cannot rewrite this config does not hold (README, Running unprivileged)"
            );
        }
    }
    for warning in config.trust_anchor_warnings() {
        tracing::warn!("{warning}");
    }
    // Each connection is a descriptor: the soft limit's 1024 would be the
    // first thing a flood exhausts.
    match gateway::descriptors::raise_limit() {
        Ok(r) if r.before != r.now => {
            tracing::info!(
                from = r.before,
                to = r.now,
                "raised the open-files soft limit to the hard limit"
            );
        }
        Ok(r) => tracing::info!(limit = r.now, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, "open-files limit left as it is"),
    }
    // Before the runtime's threads exist (see `privilege`): they wait for
    // the drop in their start hook.
    let gate = target
        .as_ref()
        .map(gateway::privilege::Gate::prepare)
        .transpose()?;
    // The control plane: the main thread's runtime serves the admin
    // endpoint, signals and reloads; `App::serve` starts the accept
    // workers (see `workers`), each a thread, after the drop. The hook holds the blocking pool's
    // threads, the only ones this runtime starts itself.
    let mut runtime = tokio::runtime::Builder::new_current_thread();
    if let Some(gate) = &gate {
        runtime.on_thread_start(gate.hook());
    }
    let runtime = runtime.enable_all().build()?;
    // Before anything says the gateway is up (its log lines, the pid file):
    // a SIGHUP sent on seeing them must reload, not kill it by the signal's
    // default action.
    let signals = runtime.block_on(async { Signals::install() })?;
    tracing::info!(
        workers = gateway::workers::count(config.workers).get(),
        "runtime started"
    );
    let served = runtime.block_on(async {
        let app = gateway::build(&config).await?;
        // Once everything is bound: a pid file names a gateway that serves.
        let _pid_file = pid_file
            .map(|p| PidFile::write(p, target.as_ref()))
            .transpose()?;
        if let (Some(gate), Some(target)) = (&gate, &target) {
            // While still root: the socket becomes the dropped-to user's,
            // so it (and root) can use it, and nobody else.
            if let Some(socket) = app.admin_socket() {
                gateway::admin::give_socket(&socket, target.uid, target.gid)?;
            }
            drop_privileges(gate, target, &config)?;
        }
        // Every listener is bound (and the guard, if any, installed).
        gateway::systemd::ready(config.listeners.len());
        let shutdown = app.shutdown_handle();
        let reload = app.reload_handle();
        let registry = app.registry();
        if gateway::systemd::enabled() {
            let registry = registry.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(STATUS_INTERVAL);
                every.tick().await;
                loop {
                    every.tick().await;
                    gateway::systemd::status(registry.len());
                }
            });
        }
        let force_marker = config.admin_socket.as_ref().map(|s| {
            config
                .resolve(s)
                .with_file_name(gateway::preview::FORCE_MARKER)
        });
        let stop_watching = tokio_util::sync::CancellationToken::new();
        if let (Some(host), Some(document)) = (fleet, document) {
            // The document's files are written by the fleet source itself:
            // watching them would reload halfway through its own write.
            let status = app.metrics().fleet.clone();
            let (reload, stop) = (reload.clone(), stop_watching.clone());
            tokio::spawn(gateway::fleet::etcd::follow(
                host, document, reload, status, stop,
            ));
        } else if config.watch_files {
            let (path, reload, stop) = (path.to_owned(), reload.clone(), stop_watching.clone());
            tokio::spawn(async move {
                gateway::watch::watch(&path, &config, reload, WATCH_INTERVAL, stop).await;
            });
        }
        let path = path.to_owned();
        tokio::spawn(async move {
            signals.serve(&path, force_marker.as_deref(), reload).await;
            gateway::systemd::stopping(registry.len());
            shutdown.shutdown();
        });
        let served = app.serve().await;
        stop_watching.cancel();
        Ok(served?)
    });
    // A start that fails before the drop leaves the runtime's threads
    // waiting at the gate: release them before the runtime waits for them,
    // or the error is never printed and the process never exits.
    drop(gate);
    // Not a plain drop, which waits for every blocking thread: the access
    // log's writer may be stuck on a disk or a pipe nobody reads, and it
    // had its time to finish in the app's shutdown already.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    served
}

/// How long the runtime's threads get once the app has stopped.
const RUNTIME_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(1);

/// Everything privileged is done: become `target`, then read every file
/// the config names as it, as the next reload will; a file only root could
/// read would otherwise fail that reload, long after anyone is watching.
fn drop_privileges(
    gate: &gateway::privilege::Gate,
    target: &gateway::privilege::Target,
    config: &gateway::Config,
) -> anyhow::Result<()> {
    gate.drop_to(target)?;
    let kept: Vec<String> = target
        .kept
        .iter()
        .map(|k| format!("{:?} ({})", k.capability, k.why))
        .collect();
    tracing::info!(
        user = %target.user,
        uid = target.uid,
        gid = target.gid,
        kept = %if kept.is_empty() { "none".to_owned() } else { kept.join(", ") },
        "dropped privileges"
    );
    let unreadable = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "running as {:?}, the config's files are not all readable, so a reload would fail: {e}",
            target.user
        )
    };
    // The file read again (a fleet member's composed config is read from
    // its files directory, so the same reads happen).
    let config = match config.fleet {
        Some(_) => config.clone(),
        None => gateway::Config::load(&config.source).map_err(|e| unreadable(&e))?,
    };
    gateway::state::State::from_config(&config).map_err(|e| unreadable(&e))?;
    Ok(())
}

/// How often the watched files' stamps are read: a few stat calls, cheap
/// enough to keep "a revoked client is closed within a second of the CRL's
/// publication" true with the reload's own time on top.
const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);
/// How often `systemctl status` learns the live connections.
const STATUS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// The signals the gateway answers, installed before it says it is up.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let install = |kind: SignalKind| {
            signal(kind).map_err(|e| {
                anyhow::anyhow!("cannot install signal handlers (SIGTERM would not drain): {e}")
            })
        };
        Ok(Self {
            term: install(SignalKind::terminate())?,
            int: install(SignalKind::interrupt())?,
            hup: install(SignalKind::hangup())?,
        })
    }

    /// SIGHUP reloads (forced when `force_marker` is there, which it
    /// consumes); SIGTERM/SIGINT return (to shut down).
    async fn serve(
        mut self,
        path: &std::path::Path,
        force_marker: Option<&std::path::Path>,
        reload: gateway::app::ReloadHandle,
    ) {
        loop {
            let name = tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "SIGINT",
                _ = self.hup.recv() => {
                    let force = match force_marker.map(gateway::preview::take_force_marker) {
                        None | Some(Ok(false)) => false,
                        Some(Ok(true)) => true,
                        Some(Err(why)) => {
                            tracing::error!(reason = %why, "reload force marker not trusted: reloading unforced");
                            false
                        }
                    };
                    tracing::info!(signal = "SIGHUP", force, "reload requested");
                    // Errors are logged and counted by the reload itself.
                    let _ = reload.reload_file_forced(path, force).await;
                    continue;
                }
            };
            tracing::info!(signal = name, "shutdown requested");
            return;
        }
    }
}

/// `gateway check --against`: 0 the reload would apply and close nothing,
/// 1 it would close or orphan connections or be refused, 2 could not tell.
fn check_against(
    candidate: &std::path::Path,
    against: &str,
    since: Option<&str>,
    format: ReportFormat,
) -> ExitCode {
    let result = socket_of(against).and_then(|at| {
        // The gateway's working directory is not ours.
        let candidate = std::path::absolute(candidate)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let preview = runtime.block_on(gateway::admin::client::preview(&at, &candidate, since))?;
        match format {
            ReportFormat::Text => print!("{}", preview.text()),
            ReportFormat::Json => println!("{}", serde_json::to_string_pretty(&preview)?),
        }
        Ok(preview.refused.is_none()
            && !preview.guard.holds()
            && preview.would_close.is_empty()
            && preview.orphaned.is_empty())
    });
    yes_no_or_error(result)
}

/// A question's exit status: 0 yes, 1 no, 2 no answer (said on stderr).
fn yes_no_or_error(result: anyhow::Result<bool>) -> ExitCode {
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("gateway: {}", error_chain(&e));
            ExitCode::from(2)
        }
    }
}

/// `--against`: the admin socket itself, or a config file naming it. The
/// preview makes the gateway read files, so it is asked on the socket
/// only, never over TCP.
fn socket_of(against: &str) -> anyhow::Result<gateway::admin::client::Endpoint> {
    use gateway::admin::client::Endpoint;
    use std::os::unix::fs::FileTypeExt as _;
    if against.contains("://") || against.parse::<std::net::SocketAddr>().is_ok() {
        anyhow::bail!(
            "--against {against}: a reload preview makes the gateway read files, so it is served on the admin socket only, never over TCP; name the socket (--against /run/gateway/admin.sock) or the gateway's config (--against /etc/gateway/gateway.toml)"
        );
    }
    let path = std::path::Path::new(against);
    let meta = std::fs::metadata(path).map_err(|e| anyhow::anyhow!("--against {against}: {e}"))?;
    if meta.file_type().is_socket() {
        return Ok(Endpoint::Socket(path.to_owned()));
    }
    match admin_of(path)?.0 {
        Some(p) => Ok(Endpoint::Socket(p)),
        None => anyhow::bail!(
            "{against}: no admin_socket (set admin_socket = \"/run/gateway/admin.sock\"): a reload preview is served there only"
        ),
    }
}

/// `gateway reload`: the report, or why it was refused.
fn reload(
    force: bool,
    socket: Option<PathBuf>,
    config: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let at = match endpoint(socket, None, config)? {
        at @ gateway::admin::client::Endpoint::Socket(_) => at,
        gateway::admin::client::Endpoint::Tcp(a) => anyhow::bail!(
            "the gateway's config has only the TCP admin endpoint {a}: a reload is asked on admin_socket only"
        ),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let reloaded = runtime.block_on(gateway::admin::client::reload(&at, force))?;
    println!("reloaded: {}", reloaded.changes);
    Ok(())
}

/// `gateway rollout`: 0 ready, 1 not ready, 2 could not tell.
fn rollout(
    command: RolloutCommand,
    socket: Option<PathBuf>,
    admin: Option<std::net::SocketAddr>,
    config: Option<&std::path::Path>,
) -> ExitCode {
    let result = endpoint(socket, admin, config).and_then(|at| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (route, since, format) = match command {
            RolloutCommand::Report {
                route,
                since,
                format,
            } => (route, since, format),
            RolloutCommand::History { format } => {
                let history = runtime.block_on(gateway::admin::client::rollout_history(&at))?;
                match format {
                    ReportFormat::Text => print!("{}", history.text()),
                    ReportFormat::Json => {
                        println!("{}", serde_json::to_string_pretty(&history)?)
                    }
                }
                return Ok(true);
            }
            RolloutCommand::Revert { revision, force } => {
                let done = runtime.block_on(gateway::admin::client::rollout_revert(
                    &at, revision, force,
                ))?;
                match done.revision {
                    Some(n) => println!(
                        "reverted to revision {revision} (now revision {n}): {}",
                        done.changes
                    ),
                    None => println!(
                        "reverted to revision {revision} (not recorded in the history: see the gateway's log): {}",
                        done.changes
                    ),
                }
                return Ok(true);
            }
        };
        let report = runtime.block_on(gateway::admin::client::rollout_report(
            &at,
            route.as_deref(),
            since.as_deref(),
        ))?;
        match format {
            ReportFormat::Text => print!("{}", report.text()),
            ReportFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        }
        Ok(report.routes.iter().all(|r| r.ready))
    });
    yes_no_or_error(result)
}

/// The admin endpoint: `--socket`, `--admin`, or `admin_socket` (else
/// `admin`) of `--config`.
/// The admin socket (resolved) and TCP endpoint a config file, or a
/// fleet member's host file, configures.
fn admin_of(
    path: &std::path::Path,
) -> anyhow::Result<(Option<PathBuf>, Option<std::net::SocketAddr>)> {
    if let Some(host) = gateway::fleet::Host::load(path)? {
        return Ok(host.admin()?);
    }
    let config = gateway::Config::load(path)?;
    Ok((
        config.admin_socket.as_ref().map(|p| config.resolve(p)),
        config.admin,
    ))
}

fn endpoint(
    socket: Option<PathBuf>,
    admin: Option<std::net::SocketAddr>,
    config: Option<&std::path::Path>,
) -> anyhow::Result<gateway::admin::client::Endpoint> {
    use gateway::admin::client::Endpoint;
    Ok(match (socket, admin, config) {
        (Some(p), _, _) => Endpoint::Socket(p),
        (None, Some(a), _) => Endpoint::Tcp(a),
        (None, None, Some(path)) => match admin_of(path)? {
            (Some(p), _) => Endpoint::Socket(p),
            (None, Some(a)) => Endpoint::Tcp(a),
            (None, None) => anyhow::bail!(
                "{}: no admin endpoint (set admin_socket = \"/run/gateway/admin.sock\")",
                path.display()
            ),
        },
        (None, None, None) => anyhow::bail!(
            "say where the admin endpoint is: --socket PATH, --admin ip:port (reads only) or --config gateway.toml"
        ),
    })
}

fn block(
    command: BlockCommand,
    socket: Option<PathBuf>,
    admin: Option<std::net::SocketAddr>,
    config: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use gateway::admin::client;
    let at = &endpoint(socket, admin, config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match command {
            BlockCommand::List => {
                let entries = client::list(at).await?;
                if entries.is_empty() {
                    println!("the block list is empty");
                }
                for e in entries {
                    let until = match e.expires_in_seconds {
                        Some(s) => format!("for {s}s more"),
                        None => "until removed".to_owned(),
                    };
                    println!("{:<43} {:<8} {:<8} {until}", e.source, e.reason, e.level);
                }
            }
            BlockCommand::Add { source, ttl, force } => {
                let e = client::add(at, &source, ttl.as_deref(), force).await?;
                match e.expires_in_seconds {
                    Some(s) => println!("blocked {} for {s}s", e.source),
                    None => println!("blocked {} until removed", e.source),
                }
            }
            BlockCommand::Remove { source } => {
                client::remove(at, &source).await?;
                println!("removed {source} from the block list");
            }
        }
        Ok(())
    })
}

fn uninstall_guard(pin_dir: &std::path::Path) -> anyhow::Result<()> {
    let n = gateway::ebpf::uninstall(pin_dir)?;
    println!(
        "removed {n} pins from {}: the guard is off",
        pin_dir.display()
    );
    Ok(())
}

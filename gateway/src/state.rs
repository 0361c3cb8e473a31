//! The running state, built whole from a `Config`: listeners with their TLS
//! material loaded and checked, routes with compiled policy and backends.
//!
//! Building it is also what `gateway check` does, so check and run can never
//! disagree about what is valid.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, ListenerConfig, Mode, RouteConfig};
use crate::metrics::{ListenerStats, Metrics, RouteStats};
use crate::policy::{Policy, TimeWindow};
use crate::tls::{BundleFiles, ListenerTls, RouteAuth, TlsError};
use crate::upstream::Backends;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("listener {listener:?}: {source}")]
    Listener {
        listener: String,
        #[source]
        source: TlsError,
    },
    #[error("listener {listener:?}, route {route:?}: {message}")]
    Route {
        listener: String,
        route: String,
        message: String,
    },
}

#[derive(Debug)]
pub struct State {
    pub listeners: Vec<Arc<ListenerState>>,
    pub drain_timeout: Duration,
}

#[derive(Debug)]
pub struct ListenerState {
    pub name: String,
    pub bind: SocketAddr,
    pub tls: ListenerTls,
    pub routes: Vec<Arc<Route>>,
    by_sni: HashMap<String, usize>,
    default_route: Option<usize>,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// Of `max_connections`, how many may be in their handshake.
    pub max_handshakes_in_flight: usize,
    /// Bytes per second a client must send on its turn in the handshake,
    /// after `handshake_grace` (0: no minimum).
    pub handshake_min_rate: u32,
    pub handshake_grace: Duration,
    pub connect_attempts: usize,
    pub max_connection_lifetime: Option<Duration>,
    pub offload: crate::offload::Offload,
    pub rx_expect_no_pad: bool,
    /// The listener certificate's signature and key algorithms, as a PROXY
    /// v2 header reports them (HAProxy's `cert-sig`, `cert-key`).
    pub cert_algorithms: (Option<String>, Option<String>),
    /// Shared with the metrics, so counts survive reloads.
    pub stats: Arc<ListenerStats>,
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub auth: RouteAuth,
    pub backends: Backends,
    /// TLS towards the backends, when the route originates it.
    pub upstream_tls: Option<crate::tls::UpstreamTls>,
    /// Shared with the metrics, so counts survive reloads.
    pub stats: Arc<RouteStats>,
    /// Send a PROXY v2 header to the backend first.
    pub proxy_protocol: Option<crate::config::ProxyProtocol>,
    /// Put the client's leaf certificate in that header.
    pub proxy_protocol_client_cert: bool,
}

impl Route {
    fn build(
        config: &Config,
        listener: &str,
        r: &RouteConfig,
        metrics: &Metrics,
    ) -> Result<Route, StateError> {
        let upstream_tls = r
            .upstream_tls
            .as_ref()
            .map(|u| {
                let cert = u.cert.as_ref().map(|c| config.resolve(c));
                let key = u.key.as_ref().map(|k| config.resolve(k));
                crate::tls::UpstreamTls::load(
                    &config.resolve(&u.ca),
                    cert.as_deref().zip(key.as_deref()),
                    &u.server_name,
                    u.offload,
                )
                .map(|mut t| {
                    t.rx_expect_no_pad = u.rx_expect_no_pad;
                    t
                })
            })
            .transpose()
            .map_err(|e| StateError::Route {
                listener: listener.to_owned(),
                route: r.name.clone(),
                message: format!("upstream_tls: {e}"),
            })?;
        let time_windows = r
            .time_windows
            .iter()
            .map(TimeWindow::compile)
            .collect::<Result<_, _>>()
            .map_err(|message| StateError::Route {
                listener: listener.to_owned(),
                route: r.name.clone(),
                message,
            })?;
        let policy = Policy {
            allow: r.allow.clone(),
            deny: r.deny.clone(),
            allow_sources: canonical_nets(&r.allow_sources),
            deny_sources: canonical_nets(&r.deny_sources),
            time_windows,
            match_common_name: r.match_common_name,
            device_san_prefix: r.device.as_ref().map(|d| d.san_prefix.clone()),
        };
        Ok(Route {
            name: r.name.clone(),
            auth: RouteAuth {
                mode: r.mode,
                // The device CA issues device-bound user certificates: on a
                // device route it is the route's trust (config checks make
                // `trust`, if given, the same bundle).
                trust: r
                    .device
                    .as_ref()
                    .map(|d| d.trust.clone())
                    .or_else(|| r.trust.clone()),
                device: r.device.is_some(),
                policy: Arc::new(policy),
            },
            backends: Backends::new(r.backends.clone()),
            upstream_tls,
            stats: metrics.route(listener, &r.name),
            proxy_protocol: r.proxy_protocol,
            proxy_protocol_client_cert: r.proxy_protocol_client_cert,
        })
    }

    pub fn mode(&self) -> Mode {
        self.auth.mode
    }
}

fn canonical_nets(nets: &[ipnet::IpNet]) -> Vec<ipnet::IpNet> {
    nets.iter()
        .copied()
        .map(crate::policy::canonical_net)
        .collect()
}

impl State {
    /// Builds the state with fresh counters (for `gateway check`).
    pub fn from_config(config: &Config) -> Result<State, StateError> {
        State::build(config, &Metrics::default())
    }

    /// Builds the state; routes count into `metrics`.
    pub fn build(config: &Config, metrics: &Metrics) -> Result<State, StateError> {
        if !config.allow_shared_keys {
            check_keys_private(config)?;
        }
        let listeners = config
            .listeners
            .iter()
            .map(|l| ListenerState::build(config, l, metrics).map(Arc::new))
            .collect::<Result<_, _>>()?;
        Ok(State {
            listeners,
            drain_timeout: config.drain_timeout,
        })
    }
}

/// Every private key the config names, each readable by its owner only
/// (see `certs::check_key_private`): at start, at every reload and in
/// `gateway check`, before any key is loaded.
fn check_keys_private(config: &Config) -> Result<(), StateError> {
    use crate::tls::certs::check_key_private;
    for l in &config.listeners {
        check_key_private(&config.resolve(&l.key)).map_err(|e| StateError::Listener {
            listener: l.name.clone(),
            source: e.into(),
        })?;
        for r in &l.routes {
            if let Some(key) = r.upstream_tls.as_ref().and_then(|u| u.key.as_ref()) {
                check_key_private(&config.resolve(key)).map_err(|e| StateError::Route {
                    listener: l.name.clone(),
                    route: r.name.clone(),
                    message: format!("upstream_tls: {e}"),
                })?;
            }
        }
    }
    Ok(())
}

impl ListenerState {
    fn build(config: &Config, l: &ListenerConfig, metrics: &Metrics) -> Result<Self, StateError> {
        let files = |ca: &std::path::Path,
                     crls: &[std::path::PathBuf],
                     crl_expired,
                     spiffe_trust_domains: &Option<Vec<String>>| BundleFiles {
            ca: config.resolve(ca),
            crls: crls.iter().map(|c| config.resolve(c)).collect(),
            crl_expired,
            spiffe_trust_domains: spiffe_trust_domains.clone(),
        };
        // Only the bundles this listener's routes name are loaded for it.
        let bundles = l
            .routes
            .iter()
            .flat_map(|r| r.trust.iter().chain(r.device.iter().map(|d| &d.trust)))
            .filter_map(|name| {
                let b = config.trust.get(name)?;
                Some((
                    name.clone(),
                    files(&b.ca, &b.crls, b.crl_expired, &b.spiffe_trust_domains),
                ))
            })
            .collect();
        let tls = ListenerTls::load(
            &l.name,
            &config.resolve(&l.cert),
            &config.resolve(&l.key),
            &files(
                &l.client_ca,
                &l.crls,
                l.crl_expired,
                &l.spiffe_trust_domains,
            ),
            &bundles,
            &l.tls_versions,
            l.offload,
            &|bundle, policy| metrics.stale_crl_uses(bundle, policy),
        )
        .map_err(|source| StateError::Listener {
            listener: l.name.clone(),
            source,
        })?;
        // The certificate was just loaded and checked by `ListenerTls::load`.
        let cert_algorithms = crate::tls::certs::load_certs(&config.resolve(&l.cert))
            .ok()
            .and_then(|chain| chain.into_iter().next())
            .map(|leaf| crate::proxy_protocol::certificate_algorithms(&leaf))
            .unwrap_or_default();
        let mut by_sni = HashMap::new();
        let mut default_route = None;
        let mut routes = Vec::new();
        for (i, r) in l.routes.iter().enumerate() {
            if r.server_names.is_empty() {
                default_route = Some(i);
            }
            for sni in &r.server_names {
                by_sni.insert(sni.to_ascii_lowercase(), i);
            }
            routes.push(Arc::new(Route::build(config, &l.name, r, metrics)?));
        }
        Ok(ListenerState {
            name: l.name.clone(),
            bind: l.bind,
            tls,
            routes,
            by_sni,
            default_route,
            handshake_timeout: l.handshake_timeout,
            connect_timeout: l.connect_timeout,
            idle_timeout: l.idle_timeout,
            max_connections: l.max_connections,
            max_handshakes_in_flight: l
                .max_handshakes_in_flight
                .unwrap_or((l.max_connections / 4).max(1)),
            handshake_min_rate: l.handshake_min_rate,
            handshake_grace: l.handshake_grace,
            connect_attempts: l.connect_attempts,
            max_connection_lifetime: l.max_connection_lifetime,
            offload: l.offload,
            rx_expect_no_pad: l.rx_expect_no_pad,
            cert_algorithms,
            stats: metrics.listener(&l.name),
        })
    }

    /// The route for a ClientHello's SNI: an exact name, else the default route.
    pub fn route_for(&self, sni: Option<&str>) -> Option<&Arc<Route>> {
        sni.and_then(|s| self.by_sni.get(&s.to_ascii_lowercase()))
            .or(self.default_route.as_ref())
            .and_then(|&i| self.routes.get(i))
    }
}

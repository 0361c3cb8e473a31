//! The running state, built whole from a `Config`: listeners with their TLS
//! material loaded and checked, routes with compiled policy and backends.
//!
//! Building it is also what `gateway check` does, so check and run can never
//! disagree about what is valid.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, ListenerConfig};
use crate::policy::Policy;
use crate::tls::{ListenerTls, TlsError};
use crate::upstream::Backends;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("listener {listener:?}: {source}")]
    Listener {
        listener: String,
        #[source]
        source: TlsError,
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
    pub connect_attempts: usize,
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub policy: Arc<Policy>,
    pub backends: Backends,
}

impl State {
    pub fn from_config(config: &Config) -> Result<State, StateError> {
        let listeners = config
            .listeners
            .iter()
            .map(|l| ListenerState::build(config, l).map(Arc::new))
            .collect::<Result<_, _>>()?;
        Ok(State {
            listeners,
            drain_timeout: config.drain_timeout,
        })
    }
}

impl ListenerState {
    fn build(config: &Config, l: &ListenerConfig) -> Result<Self, StateError> {
        let tls = ListenerTls::load(
            &config.resolve(&l.cert),
            &config.resolve(&l.key),
            &config.resolve(&l.client_ca),
            &l.tls_versions,
        )
        .map_err(|source| StateError::Listener {
            listener: l.name.clone(),
            source,
        })?;
        let mut by_sni = HashMap::new();
        let mut default_route = None;
        let routes = l
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                if r.server_names.is_empty() {
                    default_route = Some(i);
                }
                for sni in &r.server_names {
                    by_sni.insert(sni.to_ascii_lowercase(), i);
                }
                Arc::new(Route {
                    name: r.name.clone(),
                    policy: Arc::new(Policy {
                        allow: r.allow.clone(),
                        match_common_name: r.match_common_name,
                    }),
                    backends: Backends::new(r.backends.clone()),
                })
            })
            .collect();
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
            connect_attempts: l.connect_attempts,
        })
    }

    /// The route for a ClientHello's SNI: an exact name, else the default route.
    pub fn route_for(&self, sni: Option<&str>) -> Option<&Arc<Route>> {
        sni.and_then(|s| self.by_sni.get(&s.to_ascii_lowercase()))
            .or(self.default_route.as_ref())
            .map(|&i| &self.routes[i])
    }
}

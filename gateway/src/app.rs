//! The whole gateway as a value: `build(config)` loads and binds everything,
//! `run()` serves until shut down. Tests run exactly this, in-process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::{AccessLog, AccessLogError, AccessRecord};
use crate::config::Config;
use crate::listener;
use crate::state::{ListenerState, State, StateError};

/// After the drain timeout, how long closed connections get to write their
/// last access-log line before run() returns anyway.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    AccessLog(#[from] AccessLogError),
    #[error("listener {listener:?}: cannot bind {bind}: {source}")]
    Bind {
        listener: String,
        bind: SocketAddr,
        source: std::io::Error,
    },
}

pub struct App {
    listeners: Vec<(Arc<ListenerState>, TcpListener)>,
    drain_timeout: Duration,
    access_log: Arc<AccessLog>,
    shutdown: CancellationToken,
}

/// Starts the shutdown sequence: stop accepting, drain, close.
#[derive(Clone, Debug)]
pub struct ShutdownHandle(CancellationToken);

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.0.cancel();
    }
}

/// Loads and checks all state, then binds every listener. Errors here are the
/// operator's to fix; nothing has been served yet.
pub async fn build(config: &Config) -> Result<App, AppError> {
    let state = State::from_config(config)?;
    let access_log = Arc::new(AccessLog::open(&config.access_log, &config.base_dir)?);
    let mut listeners = Vec::new();
    for l in state.listeners {
        let socket = TcpListener::bind(l.bind)
            .await
            .map_err(|source| AppError::Bind {
                listener: l.name.clone(),
                bind: l.bind,
                source,
            })?;
        listeners.push((l, socket));
    }
    Ok(App {
        listeners,
        drain_timeout: state.drain_timeout,
        access_log,
        shutdown: CancellationToken::new(),
    })
}

impl App {
    /// The address a listener is bound to (its port when the config said 0).
    pub fn local_addr(&self, listener: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(l, _)| l.name == listener)
            .and_then(|(_, s)| s.local_addr().ok())
    }

    /// A listener's routes (with their counters).
    pub fn routes(&self, listener: &str) -> Vec<Arc<crate::state::Route>> {
        self.listeners
            .iter()
            .filter(|(l, _)| l.name == listener)
            .flat_map(|(l, _)| l.routes.iter().cloned())
            .collect()
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown.clone())
    }

    /// Every access-log record from now on.
    pub fn access_log(&self) -> broadcast::Receiver<AccessRecord> {
        self.access_log.subscribe()
    }

    /// Serves until the shutdown handle fires, then stops accepting, lets live
    /// connections finish for up to the drain timeout, and closes the rest.
    pub async fn run(self) {
        let tracker = TaskTracker::new();
        let close = CancellationToken::new();
        let mut accept_loops = Vec::new();
        for (l, socket) in self.listeners {
            match socket.local_addr() {
                Ok(addr) => {
                    tracing::info!(listener = %l.name, %addr, routes = l.routes.len(), "listening")
                }
                Err(e) => {
                    tracing::warn!(listener = %l.name, error = %e, "listening (address unknown)")
                }
            }
            accept_loops.push(tokio::spawn(listener::accept_loop(
                l,
                socket,
                self.access_log.clone(),
                tracker.clone(),
                self.shutdown.clone(),
                close.clone(),
            )));
        }
        self.shutdown.cancelled().await;
        for handle in accept_loops {
            // The loop exits on the token; its socket closes with it.
            let _ = handle.await;
        }
        tracker.close();
        tracing::info!(
            connections = tracker.len(),
            drain_timeout = ?self.drain_timeout,
            "shutting down: draining live connections"
        );
        if tokio::time::timeout(self.drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                connections = tracker.len(),
                "drain timeout reached: closing the remaining connections"
            );
            close.cancel();
            let _ = tokio::time::timeout(CLOSE_GRACE, tracker.wait()).await;
        }
        tracing::info!("shutdown complete");
    }
}

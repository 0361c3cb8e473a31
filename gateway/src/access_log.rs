//! One JSON line per connection, written when the connection ends.
//!
//! The same records go to in-process subscribers (tests, later the admin
//! side), so what is asserted is exactly what the operator reads.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Policy let the client through.
    Allow,
    /// Policy or certificate checks refused the client.
    Deny,
    /// Would have been denied; passed because the route is in audit mode.
    Audit,
    /// Refused before or without a policy decision (no route, timeouts, limits, I/O).
    Error,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessRecord {
    /// RFC 3339, UTC, when the connection ended.
    pub time: String,
    pub listener: String,
    pub route: Option<String>,
    /// The route's mode: "enforce", "audit" or "off".
    pub mode: Option<String>,
    pub client: String,
    pub sni: Option<String>,
    /// The client's names in the allow-entry syntax (`spiffe://…`,
    /// `dns:…`, `email:…`, `cn:…`), one array element each.
    pub identity: Option<Vec<String>>,
    pub verdict: Verdict,
    /// Why: the allow entry that matched, or what refused or ended the connection.
    pub reason: String,
    pub backend: Option<String>,
    pub client_to_backend_bytes: u64,
    pub backend_to_client_bytes: u64,
    pub duration_ms: u64,
    pub tls_version: Option<String>,
    pub cipher_suite: Option<String>,
    /// Where the bytes moved after the handshake: "kernel" (kTLS + splice) or "userspace".
    #[serde(default)]
    pub offload: Option<String>,
    /// Why a connection that could have been offloaded stayed in userspace.
    #[serde(default)]
    pub offload_reason: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    #[error("cannot open access log {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
}

enum Sink {
    Stdout,
    Stderr,
    File(Mutex<std::fs::File>),
    Off,
}

pub struct AccessLog {
    sink: Sink,
    subscribers: broadcast::Sender<AccessRecord>,
    /// Lines lost since start (`gateway_access_log_lost_total`).
    lost: Arc<AtomicU64>,
    /// Lines lost since the last one written: the first loss is logged at
    /// once, then nothing until a line is written again, which logs how
    /// many were lost meanwhile (a full disk must not flood the log too).
    losing: AtomicU64,
}

impl AccessLog {
    /// `target` is the config's `access_log`: "stdout", "stderr", "off" or a
    /// path. Lines that cannot be written are counted in `lost`.
    pub fn open(
        target: &str,
        base: &std::path::Path,
        lost: Arc<AtomicU64>,
    ) -> Result<Self, AccessLogError> {
        let sink = match target {
            "stdout" => Sink::Stdout,
            "stderr" => Sink::Stderr,
            "off" => Sink::Off,
            path => {
                let path = base.join(path);
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|source| AccessLogError::Open { path, source })?;
                Sink::File(Mutex::new(file))
            }
        };
        Ok(Self {
            sink,
            subscribers: broadcast::channel(4096).0,
            lost,
            losing: AtomicU64::new(0),
        })
    }

    /// Whether `open` would succeed, without leaving a file behind:
    /// `gateway check` must refuse what `gateway run` will.
    pub fn check(target: &str, base: &std::path::Path) -> Result<(), AccessLogError> {
        if matches!(target, "stdout" | "stderr" | "off") {
            return Ok(());
        }
        let path = base.join(target);
        let existed = path.exists();
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| AccessLogError::Open {
                path: path.clone(),
                source,
            })?;
        if !existed {
            // Only the probe made it; run creates its own.
            let _ = std::fs::remove_file(&path);
        }
        Ok(())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<AccessRecord> {
        self.subscribers.subscribe()
    }

    pub fn emit(&self, record: AccessRecord) {
        if !matches!(self.sink, Sink::Off) {
            match serde_json::to_string(&record) {
                Ok(mut line) => {
                    line.push('\n');
                    let written = match &self.sink {
                        Sink::Stdout => std::io::stdout().lock().write_all(line.as_bytes()),
                        Sink::Stderr => std::io::stderr().lock().write_all(line.as_bytes()),
                        Sink::File(f) => {
                            whole_line(&mut f.lock().unwrap_or_else(|p| p.into_inner()), &line)
                        }
                        Sink::Off => Ok(()),
                    };
                    self.count(written);
                }
                Err(e) => tracing::warn!(error = %e, "access log record not serialisable"),
            }
        }
        // No subscriber is the normal case outside tests.
        let _ = self.subscribers.send(record);
    }
}

impl AccessLog {
    /// Counts a line lost, and says so in the log when losing starts and
    /// when it ends.
    fn count(&self, written: std::io::Result<()>) {
        match written {
            Ok(()) => {
                let lost = self.losing.swap(0, Ordering::Relaxed);
                if lost > 0 {
                    tracing::warn!(lost, "access log written again after losing lines");
                }
            }
            Err(e) => {
                self.lost.fetch_add(1, Ordering::Relaxed);
                if self.losing.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(error = %e,
                        "access log write failed: lines are lost (counted in gateway_access_log_lost_total) until a write succeeds");
                }
            }
        }
    }
}

/// Appends `line` to `file` whole or not at all: a write cut short by a
/// full disk is taken back, so the log never holds half a line that the
/// next one would run into.
fn whole_line(file: &mut std::fs::File, line: &str) -> std::io::Result<()> {
    let mut rest = line.as_bytes();
    let mut written = 0u64;
    while !rest.is_empty() {
        match file.write(rest) {
            Ok(0) => {
                return Err(take_back(
                    file,
                    written,
                    std::io::ErrorKind::WriteZero.into(),
                ));
            }
            Ok(n) => {
                written += n as u64;
                rest = rest.get(n..).unwrap_or_default();
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(take_back(file, written, e)),
        }
    }
    Ok(())
}

/// Cuts the `written` bytes of a partial line off the end of `file`
/// (appended by this process alone, under the sink's lock) and gives back `e`.
fn take_back(file: &std::fs::File, written: u64, e: std::io::Error) -> std::io::Error {
    if written > 0 {
        let cut = file
            .metadata()
            .and_then(|m| file.set_len(m.len().saturating_sub(written)));
        if let Err(cut) = cut {
            tracing::warn!(error = %cut, "access log: a partial line could not be taken back");
        }
    }
    e
}

/// Now, as the access log writes times.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

//! Reload when the config file or any file it names changes on disk.
//!
//! Polls modification times: certificate rotation tools replace files in
//! place or by rename, and a poll sees both without a platform watcher. A
//! change is reloaded once; a failed reload is retried only when the files
//! change again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::app::ReloadHandle;
use crate::config::Config;

/// Every file a config depends on, the config itself first.
pub fn watched_files(config: &Config) -> Vec<PathBuf> {
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

fn stamps(files: &[PathBuf]) -> BTreeMap<PathBuf, Option<SystemTime>> {
    files
        .iter()
        .map(|f| {
            (
                f.clone(),
                std::fs::metadata(f).and_then(|m| m.modified()).ok(),
            )
        })
        .collect()
}

/// Watches `config`'s files every `interval` until `stop` fires.
pub async fn watch(
    path: &Path,
    config: &Config,
    reload: ReloadHandle,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut files = watched_files(config);
    let mut last = stamps(&files);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let now = stamps(&files);
        if now == last {
            continue;
        }
        let changed: Vec<String> = now
            .iter()
            .filter(|(f, t)| last.get(*f) != Some(t))
            .map(|(f, _)| f.display().to_string())
            .collect();
        tracing::info!(files = %changed.join(", "), "files changed: reloading");
        if reload.reload_file(path).await.is_ok()
            && let Ok(config) = Config::load(path)
        {
            files = watched_files(&config);
        }
        last = stamps(&files);
    }
}

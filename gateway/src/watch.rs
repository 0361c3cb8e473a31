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

/// Every file a config depends on, the config itself among them.
pub fn watched_files(config: &Config) -> Vec<PathBuf> {
    config.named_files()
}

/// What says a file changed: its modification time, and its inode and
/// size, so a file renamed into place with an old time (`cp -p`, rsync)
/// is seen too.
type Stamp = Option<(Option<SystemTime>, u64, u64)>;

fn stamps(files: &[PathBuf]) -> BTreeMap<PathBuf, Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    files
        .iter()
        .map(|f| {
            let stamp = std::fs::metadata(f)
                .ok()
                .map(|m| (m.modified().ok(), m.ino(), m.size()));
            (f.clone(), stamp)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A file renamed into place with the old one's modification time (as
    /// `cp -p` or rsync leave it) is a change too.
    #[test]
    fn a_rename_with_an_old_time_is_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let crl = dir.path().join("crl.pem");
        std::fs::write(&crl, "old").unwrap();
        let files = vec![crl.clone()];
        let before = stamps(&files);
        let old_time = std::fs::metadata(&crl).unwrap().modified().unwrap();
        let next = dir.path().join(".crl.pem.tmp");
        std::fs::write(&next, "new").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&next)
            .unwrap()
            .set_modified(old_time)
            .unwrap();
        std::fs::rename(&next, &crl).unwrap();
        assert_eq!(
            std::fs::metadata(&crl).unwrap().modified().unwrap(),
            old_time
        );
        assert_ne!(stamps(&files), before);
    }
}

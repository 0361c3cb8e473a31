//! Logging refusals at a bounded rate. Under a flood a line per refused
//! connection would be a second flood (and a full disk): the first refusal
//! of a kind on a listener is logged at once, later ones are counted and
//! summarized, at most one line per kind and listener per `log_every`,
//! naming the sources that were refused most.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Distinct sources remembered per summary; the rest are counted together.
const SOURCES_PER_SUMMARY: usize = 16;
/// Sources named in a summary line.
const SOURCES_NAMED: usize = 8;

#[derive(Default)]
pub(super) struct RefusalLog {
    pending: Mutex<HashMap<(String, &'static str), Pending>>,
}

struct Pending {
    logged: Instant,
    count: u64,
    sources: HashMap<IpAddr, u64>,
    others: u64,
}

impl RefusalLog {
    /// One refusal (or block) of kind `what` on `scope` (a listener, or
    /// "" for the gateway as a whole); `line` logs it when it is the first
    /// for a while.
    pub fn note(
        &self,
        scope: &str,
        what: &'static str,
        source: IpAddr,
        every: Duration,
        now: Instant,
        line: impl FnOnce(),
    ) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let key = (scope.to_owned(), what);
        match pending.get_mut(&key) {
            Some(p) => {
                p.count += 1;
                let n = p.sources.len();
                match p.sources.get_mut(&source) {
                    Some(c) => *c += 1,
                    None if n < SOURCES_PER_SUMMARY => {
                        p.sources.insert(source, 1);
                    }
                    None => p.others += 1,
                }
                if now.saturating_duration_since(p.logged) >= every {
                    summarize(&key, p, now);
                }
            }
            None => {
                line();
                pending.insert(
                    key,
                    Pending {
                        logged: now,
                        count: 0,
                        sources: HashMap::new(),
                        others: 0,
                    },
                );
            }
        }
    }

    /// Writes the summaries that are due, and forgets kinds that were
    /// quiet for a whole period (their next refusal is logged at once).
    pub fn flush(&self, every: Duration, now: Instant) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.retain(|key, p| {
            if now.saturating_duration_since(p.logged) < every {
                return true;
            }
            if p.count == 0 {
                return false;
            }
            summarize(key, p, now);
            true
        });
    }
}

fn summarize(key: &(String, &'static str), p: &mut Pending, now: Instant) {
    let mut top: Vec<(IpAddr, u64)> = p.sources.drain().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let named: Vec<String> = top
        .iter()
        .take(SOURCES_NAMED)
        .map(|(a, n)| format!("{a}×{n}"))
        .collect();
    let unnamed = top.iter().skip(SOURCES_NAMED).map(|(_, n)| n).sum::<u64>() + p.others;
    let period = now.saturating_duration_since(p.logged);
    let (scope, what) = (key.0.as_str(), key.1);
    tracing::warn!(
        listener = scope,
        reason = what,
        count = p.count,
        period = ?period,
        sources = %named.join(", "),
        other_sources = unnamed,
        "admission: more connections refused than logged one by one"
    );
    p.count = 0;
    p.others = 0;
    p.logged = now;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_of_a_flood_is_logged_on_its_own() {
        let log = RefusalLog::default();
        let now = Instant::now();
        let every = Duration::from_secs(10);
        let mut lines = 0;
        for i in 0..10_000u32 {
            let source = IpAddr::from(i.to_be_bytes());
            log.note("edge", "blocked", source, every, now, || lines += 1);
        }
        assert_eq!(lines, 1);
        let p = log.pending.lock().unwrap();
        let p = &p[&("edge".to_owned(), "blocked")];
        assert_eq!(p.count, 9_999);
        assert_eq!(p.sources.len(), SOURCES_PER_SUMMARY);
        assert_eq!(p.others, 9_999 - SOURCES_PER_SUMMARY as u64);
    }

    #[test]
    fn a_quiet_kind_is_forgotten_and_logged_at_once_when_it_comes_back() {
        let log = RefusalLog::default();
        let now = Instant::now();
        let every = Duration::from_secs(10);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let mut lines = 0;
        log.note("edge", "evicted", a, every, now, || lines += 1);
        log.note("edge", "evicted", a, every, now, || lines += 1);
        log.flush(every, now + every);
        // The summary took the count; a whole quiet period forgets it.
        log.flush(every, now + 2 * every);
        log.note("edge", "evicted", a, every, now + 2 * every, || lines += 1);
        assert_eq!(lines, 2);
    }
}

//! Logging refusals at a bounded rate. Under a flood a line per refused
//! connection would be a second flood (and a full disk): the first refusal
//! of a kind on a listener is logged at once, later ones are counted and
//! summarized, at most one line per kind and listener per `log_every`,
//! naming the sources that were refused most.
//!
//! Which sources those are is counted in bounded memory by "space saving"
//! (Metwally et al.): at most `SOURCES_PER_SUMMARY` counters; a source
//! without one takes over the smallest, plus one. A source refused more
//! than a `1/SOURCES_PER_SUMMARY` share of a period is always among them,
//! however many others came first; a named count is at most that much
//! above the truth.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Distinct sources counted per summary.
const SOURCES_PER_SUMMARY: usize = 64;
/// Sources named in a summary line: those counted most.
const SOURCES_NAMED: usize = 16;

#[derive(Default)]
pub(crate) struct RefusalLog {
    pending: Mutex<HashMap<(String, &'static str), Pending>>,
}

struct Pending {
    logged: Instant,
    count: u64,
    sources: HashMap<IpAddr, u64>,
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
                count_source(&mut p.sources, source);
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

/// One more refusal of `source`, in at most `SOURCES_PER_SUMMARY` counters.
fn count_source(sources: &mut HashMap<IpAddr, u64>, source: IpAddr) {
    if let Some(c) = sources.get_mut(&source) {
        *c += 1;
        return;
    }
    let mut floor = 0;
    if sources.len() >= SOURCES_PER_SUMMARY
        && let Some((&least, &n)) = sources.iter().min_by_key(|(a, n)| (**n, **a))
    {
        sources.remove(&least);
        floor = n;
    }
    sources.insert(source, floor + 1);
}

/// The sources a summary names: those counted most, most first.
fn named(sources: &HashMap<IpAddr, u64>) -> Vec<(IpAddr, u64)> {
    let mut top: Vec<(IpAddr, u64)> = sources.iter().map(|(a, n)| (*a, *n)).collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    top.truncate(SOURCES_NAMED);
    top
}

fn summarize(key: &(String, &'static str), p: &mut Pending, now: Instant) {
    let top = named(&p.sources);
    p.sources.clear();
    let named_count: u64 = top.iter().map(|(_, n)| n).sum();
    let named: Vec<String> = top.iter().map(|(a, n)| format!("{a}×{n}")).collect();
    let unnamed = p.count.saturating_sub(named_count);
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
    }

    #[test]
    fn the_summary_names_the_sources_refused_most_not_the_first() {
        let log = RefusalLog::default();
        let now = Instant::now();
        let every = Duration::from_secs(10);
        let loud: IpAddr = "198.51.100.1".parse().unwrap();
        // The first line, then a hundred sources once each, then the loud
        // one, interleaved with ever new sources.
        log.note("edge", "source_rate", loud, every, now, || ());
        for i in 0..100u32 {
            let quiet = IpAddr::from((0x0a00_0000 + i).to_be_bytes());
            log.note("edge", "source_rate", quiet, every, now, || ());
        }
        for i in 0..500u32 {
            log.note("edge", "source_rate", loud, every, now, || ());
            let quiet = IpAddr::from((0x0b00_0000 + i).to_be_bytes());
            log.note("edge", "source_rate", quiet, every, now, || ());
        }
        let p = log.pending.lock().unwrap();
        let p = &p[&("edge".to_owned(), "source_rate")];
        let top = named(&p.sources);
        assert_eq!(top[0].0, loud, "{top:?}");
        assert!(top[0].1 >= 500, "{top:?}");
        assert!(p.sources.len() <= SOURCES_PER_SUMMARY);
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

//! Per-key token buckets: how often one user, or one device, may be issued
//! a certificate. A stolen device, or a user's token, cannot mint a pile
//! of certificates.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::config::Rate;

/// Keys tracked at most; beyond it, full buckets (which say nothing) are
/// dropped first, and if none is full the request is refused (fail closed).
const MAX_KEYS: usize = 100_000;

pub struct Limiter {
    rate: Rate,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl Limiter {
    pub fn new(rate: Rate) -> Limiter {
        Limiter {
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn per_sec(&self) -> f64 {
        f64::from(self.rate.per_hour) / 3600.0
    }

    /// Takes one token for `key` at `now`, or says how long until one is there.
    pub fn take(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let burst = f64::from(self.rate.burst);
        let per_sec = self.per_sec();
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if !b.contains_key(key) && b.len() >= MAX_KEYS {
            b.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f64() * per_sec < burst
            });
            if b.len() >= MAX_KEYS {
                return Err(Duration::from_secs(60));
            }
        }
        let (tokens, at) = b.entry(key.to_owned()).or_insert((burst, now));
        let refilled =
            (*tokens + now.saturating_duration_since(*at).as_secs_f64() * per_sec).min(burst);
        if refilled < 1.0 {
            *tokens = refilled;
            *at = now;
            return Err(Duration::from_secs_f64((1.0 - refilled) / per_sec));
        }
        *tokens = refilled - 1.0;
        *at = now;
        Ok(())
    }
}

/// The issuer's refusal log lines, per key (a device and a reason, and
/// the user once a token names one): a
/// burst, then one a minute. Every refusal is counted in the metrics, but
/// a line each let one enrolled device, repeating a request that is
/// refused cheaply (a lifetime over the maximum, past its rate limit),
/// write as fast as it could send: a full disk, or the lines that matter
/// lost among them. A line left out is counted (`unlogged`) and the next
/// line for its key says how many were.
pub struct LogLimiter {
    lines: Limiter,
    /// Left out since the key's last line (keys at most `MAX_KEYS`; past
    /// that, counted only in the metrics).
    unlogged: Mutex<HashMap<String, u64>>,
}

/// Lines per key at once, and per hour after.
pub const LOG_BURST: u32 = 5;
pub const LOG_PER_HOUR: u32 = 60;

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter {
            lines: Limiter::new(Rate {
                burst: LOG_BURST,
                per_hour: LOG_PER_HOUR,
            }),
            unlogged: Mutex::new(HashMap::new()),
        }
    }
}

impl LogLimiter {
    /// Whether a line for `key` may be written at `now`: `Some(n)`, with
    /// `n` lines left out for it since its last one; `None`: leave it out.
    pub fn admit(&self, key: &str, now: Instant) -> Option<u64> {
        let mut unlogged = self.unlogged.lock().unwrap_or_else(|p| p.into_inner());
        match self.lines.take(key, now) {
            Ok(()) => Some(unlogged.remove(key).unwrap_or(0)),
            Err(_) => {
                if let Some(n) = unlogged.get_mut(key) {
                    *n += 1;
                } else if unlogged.len() < MAX_KEYS {
                    unlogged.insert(key.to_owned(), 1);
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_hourly_rate() {
        let l = Limiter::new(Rate {
            burst: 3,
            per_hour: 60,
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            l.take("alice", t0).unwrap();
        }
        let wait = l.take("alice", t0).unwrap_err();
        assert!(
            wait <= Duration::from_secs(60) && wait > Duration::from_secs(59),
            "{wait:?}"
        );
        l.take("bob", t0).expect("another key has its own bucket");
        l.take("alice", t0 + Duration::from_secs(61))
            .expect("one token a minute at 60 an hour");
        l.take("alice", t0 + Duration::from_secs(62)).unwrap_err();
    }

    #[test]
    fn log_lines_a_burst_then_one_a_minute_saying_how_many_were_left_out() {
        let l = LogLimiter::default();
        let t0 = Instant::now();
        for _ in 0..LOG_BURST {
            assert_eq!(l.admit("laptop|lifetime", t0), Some(0));
        }
        for _ in 0..100 {
            assert_eq!(l.admit("laptop|lifetime", t0), None);
        }
        assert_eq!(l.admit("laptop|nonce", t0), Some(0), "its own key");
        assert_eq!(
            l.admit("laptop|lifetime", t0 + Duration::from_secs(61)),
            Some(100)
        );
        assert_eq!(
            l.admit("laptop|lifetime", t0 + Duration::from_secs(62)),
            None
        );
    }
}

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
}

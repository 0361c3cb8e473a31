//! One-time nonces bound to the device that asked for them.
//!
//! `gateway login` asks the issuer for a nonce (over the device's mTLS)
//! and sends it in its authorization request; the provider puts it in the
//! ID token. At issuance the nonce must be one this issuer handed to this
//! same device, not yet used and not expired: a token replayed, or one a
//! sign-in started on another device obtained, is refused.
//!
//! What a nonce cannot do: tell who completed the sign-in. In device-code
//! phishing the attacker's device starts the flow (with its own nonce) and
//! the victim enters the code; the token then names the victim and carries
//! the attacker device's nonce, and is taken. That is the device grant's
//! nature (RFC 8628 §5.4); docs/sso.md, "Headless machines", says what
//! limits it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NonceError {
    #[error("ID token has no nonce: start with `gateway login`, which asks the issuer for one")]
    Missing,
    #[error("ID token nonce was not issued by this issuer, or was already used (a replay)")]
    Unknown,
    #[error("ID token nonce was issued to another device")]
    OtherDevice,
    #[error("ID token nonce expired: log in again")]
    Expired,
    #[error("too many outstanding nonces for this device")]
    TooMany,
    #[error("ID token was already used (a replay)")]
    Replayed,
    #[error(
        "the refreshed ID token continues no sign-in this issuer took from this device (another device's, one older than max_auth_age, or one before the issuer restarted): sign in again with `gateway login`"
    )]
    SignInUnknown,
    #[error(
        "the refreshed ID token carries no nonce, so it names no sign-in of this device: renewal needs a provider that keeps the sign-in's nonce in refreshed ID tokens (OIDC Core 12.2); sign in again with `gateway login`"
    )]
    RefreshWithoutNonce,
}

/// How many nonces one device may hold at once, and all devices together:
/// enough for retries, bounded so a device cannot fill memory.
const PER_DEVICE: usize = 8;
const TOTAL: usize = 100_000;

struct Entry {
    device: String,
    expires: Instant,
}

pub struct Nonces {
    ttl: Duration,
    map: Mutex<HashMap<String, Entry>>,
}

impl Nonces {
    pub fn new(ttl: Duration) -> Nonces {
        Nonces {
            ttl,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// A fresh nonce for `device`: 32 random bytes, hex.
    pub fn issue(&self, device: &str) -> Result<String, NonceError> {
        let mut bytes = [0u8; 32];
        aws_lc_rs::rand::fill(&mut bytes).map_err(|_| NonceError::TooMany)?;
        let nonce: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, e| e.expires > now);
        let held = map.values().filter(|e| e.device == device).count();
        if held >= PER_DEVICE || map.len() >= TOTAL {
            return Err(NonceError::TooMany);
        }
        map.insert(
            nonce.clone(),
            Entry {
                device: device.to_owned(),
                expires: now + self.ttl,
            },
        );
        Ok(nonce)
    }

    /// Uses up `nonce` if `device` holds it. Only a nonce of this device is
    /// consumed: another device's attempt leaves it to its owner.
    pub fn consume(&self, nonce: Option<&str>, device: &str) -> Result<(), NonceError> {
        let nonce = nonce.ok_or(NonceError::Missing)?;
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map.get(nonce).ok_or(NonceError::Unknown)?;
        if entry.device != device {
            return Err(NonceError::OtherDevice);
        }
        let expired = entry.expires <= Instant::now();
        map.remove(nonce);
        if expired {
            return Err(NonceError::Expired);
        }
        Ok(())
    }
}

/// ID tokens without a nonce (`profile.device_grant`), each taken once: a
/// digest of what the provider signed (the JWS signing input, header and
/// payload) is kept until the issuer would refuse it as too old anyway.
/// Not of the whole token: an ECDSA signature is malleable ((r, s) and
/// (r, n - s) both verify), so the same token can be sent again as another
/// string with another signature.
pub struct UsedTokens {
    keep: Duration,
    map: Mutex<HashMap<[u8; 32], Instant>>,
}

impl UsedTokens {
    pub fn new(keep: Duration) -> UsedTokens {
        UsedTokens {
            keep,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Records `token` (a verified JWS) as used; refused if it was before
    /// (or when the record is full: fail closed).
    pub fn first_use(&self, token: &str) -> Result<(), NonceError> {
        // The signing input: everything before the last dot.
        let signed = token.rsplit_once('.').map_or(token, |(input, _)| input);
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, signed.as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(digest.as_ref());
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, until| *until > now);
        if map.contains_key(&key) {
            return Err(NonceError::Replayed);
        }
        if map.len() >= TOTAL {
            return Err(NonceError::TooMany);
        }
        map.insert(key, now + self.keep);
        Ok(())
    }
}

/// The authentications of recent sign-ins: each sign-in token's `sub`
/// and `auth_time`, exactly as the provider wrote them, kept while a
/// refresh of it could still pass as a fresh sign-in (minted within
/// `max_token_age` of it, then presented within `max_token_age` of that). A refreshed ID token keeps its sign-in's `auth_time`
/// (OIDC Core §12.2), so a nonce-less token naming one held here is a
/// refresh of that sign-in, never a sign-in of its own, whatever device
/// or profile presents it. In memory: a restart forgets them.
pub struct Authentications {
    keep: Duration,
    map: Mutex<HashMap<(String, u64), Instant>>,
}

impl Authentications {
    pub fn new(keep: Duration) -> Authentications {
        Authentications {
            keep,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `sub`'s authentication at `auth_time` was a sign-in's this
    /// issuer took lately; also when the record is full and cannot tell
    /// (fail closed).
    pub fn taken(&self, sub: &str, auth_time: u64) -> bool {
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, until| *until > now);
        map.len() >= TOTAL || map.contains_key(&(sub.to_owned(), auth_time))
    }

    /// Holds `sub`'s authentication at `auth_time` as a sign-in's.
    pub fn record(&self, sub: &str, auth_time: u64) {
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, until| *until > now);
        if map.len() >= TOTAL {
            tracing::warn!(
                target: "gateway::issuer",
                "{TOTAL} recent sign-ins held; nonce-less sign-ins are refused until some age out"
            );
            return;
        }
        map.insert((sub.to_owned(), auth_time), now + self.keep);
    }
}

/// Sign-ins a device completed (with `profile.refresh`): the nonce of the
/// ID token that was taken, with the device and user it was taken for.
/// A refreshed ID token carries the nonce of the sign-in it continues
/// (OIDC Core §12.2), already used, so it is not a nonce to consume
/// again; what it proves, through this record, is that the sign-in was
/// this device's and this user's. A refresh token copied to another
/// device yields ID tokens that this record refuses there. Kept in memory
/// only, until the sign-in's `auth_time` is `max_auth_age` old (renewals
/// are judged against that `auth_time`): after a restart every device signs in again
/// once (fail closed).
pub struct SignIns {
    map: Mutex<HashMap<String, SignIn>>,
}

struct SignIn {
    device: String,
    sub: String,
    /// The issuer profile it was taken under: a refresh continues it under
    /// that profile only.
    profile: String,
    /// The sign-in's `auth_time`, as the issuer checked it: renewals are
    /// judged against it (`max_auth_age`), not against what a refreshed
    /// token claims (a provider that stamps refreshes anew would extend
    /// one MFA).
    auth_time: u64,
    expires: Instant,
}

impl Default for SignIns {
    fn default() -> Self {
        SignIns {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl SignIns {
    /// Remembers that `device` signed `sub` in with `nonce` under
    /// `profile`, authenticated at `auth_time`, for `keep`. False when it
    /// could not be (full): this sign-in cannot be renewed.
    pub fn record(
        &self,
        nonce: &str,
        device: &str,
        sub: &str,
        profile: &str,
        auth_time: u64,
        keep: Duration,
    ) -> bool {
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, e| e.expires > now);
        if map.len() >= TOTAL {
            // Full: this sign-in cannot be refreshed (its renewal is
            // refused and the user signs in again), nothing else is lost.
            tracing::warn!(
                target: "gateway::issuer",
                "{TOTAL} sign-ins held for renewal; this one cannot be refreshed"
            );
            return false;
        }
        map.insert(
            nonce.to_owned(),
            SignIn {
                device: device.to_owned(),
                sub: sub.to_owned(),
                profile: profile.to_owned(),
                auth_time,
                expires: now + keep,
            },
        );
        true
    }

    /// A refreshed token's `nonce` names a sign-in of `device` and `sub`
    /// under `profile` that is still held: its `auth_time`.
    pub fn check(
        &self,
        nonce: Option<&str>,
        device: &str,
        sub: &str,
        profile: &str,
    ) -> Result<u64, NonceError> {
        let nonce = nonce.ok_or(NonceError::RefreshWithoutNonce)?;
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(nonce) {
            Some(e)
                if e.device == device
                    && e.sub == sub
                    && e.profile == profile
                    && e.expires > Instant::now() =>
            {
                Ok(e.auth_time)
            }
            _ => Err(NonceError::SignInUnknown),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_token_without_nonce_is_taken_once() {
        let used = UsedTokens::new(Duration::from_secs(600));
        assert_eq!(used.first_use("a.b.c"), Ok(()));
        assert_eq!(used.first_use("a.x.c"), Ok(()));
        assert_eq!(used.first_use("a.b.c"), Err(NonceError::Replayed));
        // Another signature over the same header and payload is the same
        // token.
        assert_eq!(used.first_use("a.b.d"), Err(NonceError::Replayed));
    }

    use super::*;

    const LAPTOP: &str = "spiffe://example.internal/device/laptop-7";
    const OTHER: &str = "spiffe://example.internal/device/laptop-8";

    #[test]
    fn a_nonce_is_used_once_and_only_by_its_device() {
        let n = Nonces::new(Duration::from_secs(300));
        let nonce = n.issue(LAPTOP).unwrap();
        assert_eq!(nonce.len(), 64);
        assert_eq!(n.consume(Some(&nonce), OTHER), Err(NonceError::OtherDevice));
        assert_eq!(n.consume(Some(&nonce), LAPTOP), Ok(()));
        assert_eq!(n.consume(Some(&nonce), LAPTOP), Err(NonceError::Unknown));
        assert_eq!(n.consume(Some("made-up"), LAPTOP), Err(NonceError::Unknown));
        assert_eq!(n.consume(None, LAPTOP), Err(NonceError::Missing));
    }

    #[test]
    fn a_sign_in_is_continued_only_by_its_device_and_user_while_held() {
        let s = SignIns::default();
        s.record(
            "n1",
            LAPTOP,
            "alice",
            "default",
            1000,
            Duration::from_secs(300),
        );
        s.record("n0", LAPTOP, "alice", "default", 1000, Duration::ZERO);
        assert_eq!(s.check(Some("n1"), LAPTOP, "alice", "default"), Ok(1000));
        assert_eq!(
            s.check(Some("n1"), LAPTOP, "alice", "default"),
            Ok(1000),
            "kept"
        );
        for (nonce, device, sub, profile) in [
            (Some("n1"), OTHER, "alice", "default"),
            (Some("n1"), LAPTOP, "bob", "default"),
            (Some("n1"), LAPTOP, "alice", "admins"),
            (Some("n2"), LAPTOP, "alice", "default"),
            (Some("n0"), LAPTOP, "alice", "default"),
        ] {
            assert_eq!(
                s.check(nonce, device, sub, profile),
                Err(NonceError::SignInUnknown),
                "{nonce:?} {device} {sub} {profile}"
            );
        }
        assert_eq!(
            s.check(None, LAPTOP, "alice", "default"),
            Err(NonceError::RefreshWithoutNonce)
        );
    }

    #[test]
    fn an_expired_nonce_is_refused_and_devices_hold_few() {
        let n = Nonces::new(Duration::ZERO);
        let nonce = n.issue(LAPTOP).unwrap();
        assert_eq!(n.consume(Some(&nonce), LAPTOP), Err(NonceError::Expired));
        let n = Nonces::new(Duration::from_secs(300));
        for _ in 0..PER_DEVICE {
            n.issue(LAPTOP).unwrap();
        }
        assert_eq!(n.issue(LAPTOP), Err(NonceError::TooMany));
        assert!(n.issue(OTHER).is_ok(), "another device is not held back");
    }
}

//! The AEAD under the userspace record layer, from whichever library is
//! faster on this CPU.
//!
//! Why two: ring 0.17 seals and opens AES-GCM with VAES and VPCLMULQDQ on
//! 256-bit AVX2 registers; AWS-LC 1.x has that only for AVX-512. On an
//! AVX2-only CPU (this project's Zen 3 hosts) ring moves 16 KiB records in
//! half the time (0.15 against 0.28 CPU-s/GB), and the record layer's AEAD
//! is a third of the gateway's CPU per forwarded byte. Where AVX-512 is
//! there, or on other architectures, AWS-LC may win instead, so the gateway
//! measures both once at start rather than guessing from CPU flags.
//!
//! Both implement the same RFC 5116 algorithms, so a record sealed by one
//! opens with the other (tested below); the choice changes speed, never the
//! bytes on the wire.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// An AEAD algorithm the record layer can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Algorithm {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

/// The library behind the record layer's AEAD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Library {
    Ring,
    AwsLc,
}

impl std::fmt::Display for Library {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Library::Ring => "ring",
            Library::AwsLc => "aws-lc",
        })
    }
}

pub(crate) const TAG: usize = 16;

/// One direction's key, bound to the library chosen for this process.
/// ring keeps its key schedule inline (544 bytes); AWS-LC's handle points
/// to one it allocated. Boxed, both cost the same in a connection.
pub(crate) enum Key {
    Ring(RingKey),
    AwsLc(aws_lc_rs::aead::LessSafeKey),
}

/// ring's key, wiped when dropped: ring keeps the expanded AES round keys
/// (from which the key falls out at once) in plain memory and never
/// clears them. (AWS-LC clears its own context when it frees it.)
pub(crate) struct RingKey(std::mem::ManuallyDrop<Box<ring::aead::LessSafeKey>>);

impl RingKey {
    fn new(key: ring::aead::LessSafeKey) -> RingKey {
        RingKey(std::mem::ManuallyDrop::new(Box::new(key)))
    }
}

impl std::ops::Deref for RingKey {
    type Target = ring::aead::LessSafeKey;

    fn deref(&self) -> &ring::aead::LessSafeKey {
        &self.0
    }
}

impl Drop for RingKey {
    fn drop(&mut self) {
        // SAFETY: taken once, here, and the field is never touched again.
        let key = unsafe { std::mem::ManuallyDrop::take(&mut self.0) };
        drop(wipe(key));
    }
}

/// Overwrites a boxed value with zeroes (volatile writes the optimizer
/// keeps) and hands back its memory, to be freed without dropping a value:
/// only for types without drop glue.
fn wipe<T>(b: Box<T>) -> Box<std::mem::MaybeUninit<T>> {
    use zeroize::Zeroize as _;
    const { assert!(!std::mem::needs_drop::<T>()) };
    let raw = Box::into_raw(b).cast::<std::mem::MaybeUninit<T>>();
    // SAFETY: `raw` comes from Box::into_raw and MaybeUninit<T> has T's
    // layout, so it is freed as it was allocated; T has no drop glue
    // (checked at compile time), so overwriting it and never dropping it
    // leaks nothing and reads no invalid value.
    let mut wiped = unsafe { Box::from_raw(raw) };
    wiped.zeroize();
    wiped
}

/// The key had the wrong length for its algorithm.
#[derive(Debug)]
pub(crate) struct BadKey;

/// Sealing or opening failed; for opening, the record was not authentic.
#[derive(Debug)]
pub(crate) struct Failed;

impl Key {
    pub(crate) fn new(alg: Algorithm, key: &[u8]) -> Result<Key, BadKey> {
        Key::with(Choice::get().library, alg, key)
    }

    pub(crate) fn with(library: Library, alg: Algorithm, key: &[u8]) -> Result<Key, BadKey> {
        Ok(match library {
            Library::Ring => {
                let alg = match alg {
                    Algorithm::Aes128Gcm => &ring::aead::AES_128_GCM,
                    Algorithm::Aes256Gcm => &ring::aead::AES_256_GCM,
                    Algorithm::Chacha20Poly1305 => &ring::aead::CHACHA20_POLY1305,
                };
                let k = ring::aead::UnboundKey::new(alg, key).map_err(|_| BadKey)?;
                Key::Ring(RingKey::new(ring::aead::LessSafeKey::new(k)))
            }
            Library::AwsLc => {
                let alg = match alg {
                    Algorithm::Aes128Gcm => &aws_lc_rs::aead::AES_128_GCM,
                    Algorithm::Aes256Gcm => &aws_lc_rs::aead::AES_256_GCM,
                    Algorithm::Chacha20Poly1305 => &aws_lc_rs::aead::CHACHA20_POLY1305,
                };
                let k = aws_lc_rs::aead::UnboundKey::new(alg, key).map_err(|_| BadKey)?;
                Key::AwsLc(aws_lc_rs::aead::LessSafeKey::new(k))
            }
        })
    }

    /// Encrypts `in_out` in place and returns the tag.
    pub(crate) fn seal(
        &self,
        nonce: [u8; 12],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<[u8; TAG], Failed> {
        let mut tag = [0u8; TAG];
        match self {
            Key::Ring(k) => {
                let t = k
                    .seal_in_place_separate_tag(
                        ring::aead::Nonce::assume_unique_for_key(nonce),
                        ring::aead::Aad::from(aad),
                        in_out,
                    )
                    .map_err(|_| Failed)?;
                tag.copy_from_slice(t.as_ref());
            }
            Key::AwsLc(k) => {
                let t = k
                    .seal_in_place_separate_tag(
                        aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
                        aws_lc_rs::aead::Aad::from(aad),
                        in_out,
                    )
                    .map_err(|_| Failed)?;
                tag.copy_from_slice(t.as_ref());
            }
        }
        Ok(tag)
    }

    /// Decrypts `in_out` (ciphertext then tag) in place; returns the
    /// plaintext's length.
    pub(crate) fn open(
        &self,
        nonce: [u8; 12],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<usize, Failed> {
        let plain = match self {
            Key::Ring(k) => k
                .open_in_place(
                    ring::aead::Nonce::assume_unique_for_key(nonce),
                    ring::aead::Aad::from(aad),
                    in_out,
                )
                .map_err(|_| Failed)?,
            Key::AwsLc(k) => k
                .open_in_place(
                    aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
                    aws_lc_rs::aead::Aad::from(aad),
                    in_out,
                )
                .map_err(|_| Failed)?,
        };
        Ok(plain.len())
    }
}

/// Which library this process uses, and what measuring found.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Choice {
    pub library: Library,
    /// Nanoseconds per byte sealing 16 KiB records with AES-128-GCM.
    pub ring_ns_per_byte: f64,
    pub aws_lc_ns_per_byte: f64,
}

impl Choice {
    /// Measured on first use (about a millisecond), then fixed for the
    /// process: every key uses the same library.
    pub(crate) fn get() -> Choice {
        static CHOICE: OnceLock<Choice> = OnceLock::new();
        *CHOICE.get_or_init(Choice::measure)
    }

    fn measure() -> Choice {
        let ring = fastest_seal(Library::Ring);
        let aws_lc = fastest_seal(Library::AwsLc);
        Choice {
            library: pick(ring, aws_lc),
            ring_ns_per_byte: per_byte(ring),
            aws_lc_ns_per_byte: per_byte(aws_lc),
        }
    }

    pub(crate) fn describe(&self) -> String {
        format!(
            "userspace record layer: AEAD from {} (sealing 16 KiB records: ring {:.3} ns/byte, aws-lc {:.3} ns/byte)",
            self.library, self.ring_ns_per_byte, self.aws_lc_ns_per_byte
        )
    }
}

/// A tie goes to AWS-LC, the library the handshake already uses.
fn pick(ring: Duration, aws_lc: Duration) -> Library {
    if ring < aws_lc {
        Library::Ring
    } else {
        Library::AwsLc
    }
}

const PROBE_RECORD: usize = 16 * 1024;
const PROBE_SEALS: u32 = 16;
const PROBE_TRIALS: u32 = 5;

/// The best of a few short trials: the least disturbed one says most about
/// the code, and a disturbed trial can only make a library look slower.
fn fastest_seal(library: Library) -> Duration {
    let Ok(key) = Key::with(library, Algorithm::Aes128Gcm, &[0x5a; 16]) else {
        return Duration::MAX;
    };
    let mut record = vec![0u8; PROBE_RECORD];
    let mut best = Duration::MAX;
    for trial in 0..PROBE_TRIALS {
        let start = Instant::now();
        for i in 0..PROBE_SEALS {
            // A throwaway key: nonce reuse across trials protects nothing.
            let mut nonce = [0u8; 12];
            nonce[..4].copy_from_slice(&trial.to_be_bytes());
            nonce[8..].copy_from_slice(&i.to_be_bytes());
            if key.seal(nonce, &[23, 3, 3, 64, 17], &mut record).is_err() {
                return Duration::MAX;
            }
        }
        best = best.min(start.elapsed());
    }
    best
}

fn per_byte(d: Duration) -> f64 {
    d.as_nanos() as f64 / (f64::from(PROBE_SEALS) * PROBE_RECORD as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALGORITHMS: [(Algorithm, usize); 3] = [
        (Algorithm::Aes128Gcm, 16),
        (Algorithm::Aes256Gcm, 32),
        (Algorithm::Chacha20Poly1305, 32),
    ];

    #[test]
    fn a_record_sealed_by_either_library_opens_with_the_other() {
        for (alg, key_len) in ALGORITHMS {
            let key = vec![0x42; key_len];
            let ring = Key::with(Library::Ring, alg, &key).unwrap();
            let aws = Key::with(Library::AwsLc, alg, &key).unwrap();
            let nonce = [3u8; 12];
            let aad = [23, 3, 3, 0, 0];
            let plain: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
            for (seal, open) in [(&ring, &aws), (&aws, &ring)] {
                let mut wire = plain.clone();
                let tag = seal.seal(nonce, &aad, &mut wire).unwrap();
                assert_ne!(wire, plain, "{alg:?}: sealing left the plaintext");
                wire.extend_from_slice(&tag);
                let mut flipped = wire.clone();
                flipped[7] ^= 1;
                assert!(open.open(nonce, &aad, &mut flipped).is_err(), "{alg:?}");
                let n = open.open(nonce, &aad, &mut wire).unwrap();
                assert_eq!(&wire[..n], &plain[..], "{alg:?}");
            }
        }
    }

    #[test]
    fn a_key_of_the_wrong_length_is_refused_by_both() {
        for library in [Library::Ring, Library::AwsLc] {
            assert!(Key::with(library, Algorithm::Aes128Gcm, &[0; 32]).is_err());
            assert!(Key::with(library, Algorithm::Chacha20Poly1305, &[0; 16]).is_err());
        }
    }

    #[test]
    fn both_libraries_are_measured_and_the_faster_one_chosen() {
        let c = Choice::get();
        assert!(c.ring_ns_per_byte.is_finite() && c.ring_ns_per_byte > 0.0);
        assert!(c.aws_lc_ns_per_byte.is_finite() && c.aws_lc_ns_per_byte > 0.0);
        assert_eq!(
            pick(Duration::from_micros(9), Duration::from_micros(10)),
            Library::Ring
        );
        assert_eq!(
            pick(Duration::from_micros(10), Duration::from_micros(9)),
            Library::AwsLc
        );
        assert_eq!(
            pick(Duration::from_micros(9), Duration::from_micros(9)),
            Library::AwsLc
        );
    }

    /// ring's key schedule is gone when its key is: every byte of it is
    /// zero before the memory is freed.
    #[test]
    fn a_ring_key_is_wiped() {
        let key = ring::aead::LessSafeKey::new(
            ring::aead::UnboundKey::new(&ring::aead::AES_128_GCM, &[0x5a; 16]).unwrap(),
        );
        let wiped = wipe(Box::new(key));
        let size = std::mem::size_of::<ring::aead::LessSafeKey>();
        // SAFETY: every byte was just written (zeroed), so all are initialised.
        let bytes = unsafe { std::slice::from_raw_parts(wiped.as_ptr().cast::<u8>(), size) };
        assert!(size > 500, "the whole key schedule: {size} bytes");
        assert!(bytes.iter().all(|&b| b == 0));
    }
}

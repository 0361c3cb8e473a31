//! The raw cost of the record layer's cipher on this CPU: AES-128-GCM over
//! 16 KiB records, with no I/O around it.
//!
//! It is the part of a TLS proxy's CPU per GB that no forwarding path can
//! avoid, kernel TLS included. Added to what the plain splice relay costs in
//! the same run, it gives the least kernel TLS + splice can cost on this
//! host, which is how a host without kTLS still says whether a kTLS target
//! is reachable on it.

use serde::Serialize;

const RECORD: usize = 16 * 1024;
/// 4 MiB per trial: a few milliseconds, long against the clock's resolution.
const RECORDS_PER_TRIAL: u32 = 256;
const TRIALS: u32 = 7;

/// CPU-seconds per GB (10^9 bytes) through AES-128-GCM, the fastest of the
/// libraries measured, each the best of a few trials on one CPU.
#[derive(Debug, Clone, Serialize)]
pub struct AeadCost {
    pub seal_cpu_s_per_gb: f64,
    pub seal_library: &'static str,
    pub open_cpu_s_per_gb: f64,
    pub open_library: &'static str,
    pub cpu: usize,
}

/// Measures on a thread pinned to `cpu`; None if it cannot be pinned there.
pub fn measure(cpu: usize) -> Option<AeadCost> {
    std::thread::spawn(move || {
        crate::procstat::pin_to(&[cpu]).ok()?;
        let mut seal = Vec::new();
        let mut open = Vec::new();
        for library in [Library::Ring, Library::AwsLc] {
            let (s, o) = library.best()?;
            seal.push((s, library.name()));
            open.push((o, library.name()));
        }
        let fastest =
            |v: Vec<(f64, &'static str)>| v.into_iter().min_by(|a, b| a.0.total_cmp(&b.0));
        let (seal_cpu_s_per_gb, seal_library) = fastest(seal)?;
        let (open_cpu_s_per_gb, open_library) = fastest(open)?;
        Some(AeadCost {
            seal_cpu_s_per_gb,
            seal_library,
            open_cpu_s_per_gb,
            open_library,
            cpu,
        })
    })
    .join()
    .ok()
    .flatten()
}

#[derive(Clone, Copy)]
enum Library {
    Ring,
    AwsLc,
}

/// One per measurement, so the size difference between the two costs nothing.
#[allow(clippy::large_enum_variant)]
enum Key {
    Ring(ring::aead::LessSafeKey),
    AwsLc(aws_lc_rs::aead::LessSafeKey),
}

impl Library {
    fn name(self) -> &'static str {
        match self {
            Library::Ring => "ring",
            Library::AwsLc => "aws-lc",
        }
    }

    fn key(self) -> Option<Key> {
        Some(match self {
            Library::Ring => Key::Ring(ring::aead::LessSafeKey::new(
                ring::aead::UnboundKey::new(&ring::aead::AES_128_GCM, &KEY).ok()?,
            )),
            Library::AwsLc => Key::AwsLc(aws_lc_rs::aead::LessSafeKey::new(
                aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_128_GCM, &KEY).ok()?,
            )),
        })
    }

    /// The least CPU per GB over the trials, sealing and then opening the
    /// same records in place (which leaves the plaintext for the next
    /// trial); the least disturbed trial says most about the code.
    fn best(self) -> Option<(f64, f64)> {
        let key = self.key()?;
        let mut records = vec![0x42u8; SLOT * RECORDS_PER_TRIAL as usize];
        let mut best_seal = f64::MAX;
        let mut best_open = f64::MAX;
        for trial in 0..TRIALS {
            let start = thread_cpu_seconds()?;
            for (i, slot) in (0..RECORDS_PER_TRIAL).zip(records.chunks_exact_mut(SLOT)) {
                let (plain, tag) = slot.split_at_mut(RECORD);
                tag.copy_from_slice(&key.seal(nonce(trial, i), plain)?);
            }
            best_seal = best_seal.min(per_gb(thread_cpu_seconds()? - start));
            let start = thread_cpu_seconds()?;
            for (i, slot) in (0..RECORDS_PER_TRIAL).zip(records.chunks_exact_mut(SLOT)) {
                key.open(nonce(trial, i), slot)?;
            }
            best_open = best_open.min(per_gb(thread_cpu_seconds()? - start));
        }
        Some((best_seal, best_open))
    }
}

impl Key {
    fn seal(&self, nonce: [u8; 12], in_out: &mut [u8]) -> Option<[u8; TAG]> {
        let mut tag = [0u8; TAG];
        match self {
            Key::Ring(k) => tag.copy_from_slice(
                k.seal_in_place_separate_tag(
                    ring::aead::Nonce::assume_unique_for_key(nonce),
                    ring::aead::Aad::from(AAD),
                    in_out,
                )
                .ok()?
                .as_ref(),
            ),
            Key::AwsLc(k) => tag.copy_from_slice(
                k.seal_in_place_separate_tag(
                    aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
                    aws_lc_rs::aead::Aad::from(AAD),
                    in_out,
                )
                .ok()?
                .as_ref(),
            ),
        }
        Some(tag)
    }

    /// None if the record was not authentic: the measurement is void then.
    fn open(&self, nonce: [u8; 12], in_out: &mut [u8]) -> Option<()> {
        match self {
            Key::Ring(k) => {
                k.open_in_place(
                    ring::aead::Nonce::assume_unique_for_key(nonce),
                    ring::aead::Aad::from(AAD),
                    in_out,
                )
                .ok()?;
            }
            Key::AwsLc(k) => {
                k.open_in_place(
                    aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
                    aws_lc_rs::aead::Aad::from(AAD),
                    in_out,
                )
                .ok()?;
            }
        }
        Some(())
    }
}

const TAG: usize = 16;
const SLOT: usize = RECORD + TAG;
/// A throwaway key: reusing nonces across trials protects nothing.
const KEY: [u8; 16] = [0x5a; 16];
/// A TLS 1.3 header for a full record, as the record layer authenticates.
const AAD: &[u8] = &[23, 3, 3, 0x40, 0x11];

fn nonce(trial: u32, i: u32) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&trial.to_be_bytes());
    n[8..].copy_from_slice(&i.to_be_bytes());
    n
}

fn per_gb(seconds: f64) -> f64 {
    seconds * 1e9 / (f64::from(RECORDS_PER_TRIAL) * RECORD as f64)
}

/// This thread's CPU time: immune to the time it spent descheduled.
pub fn thread_cpu_seconds() -> Option<f64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which lives across the call.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (r == 0).then_some(ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_libraries_seal_and_open_at_a_plausible_cost() {
        for library in [Library::Ring, Library::AwsLc] {
            let (seal, open) = library.best().expect("sealed records open");
            // Software AES-GCM on any CPU of this century: above 0.01 and
            // well below 100 CPU-seconds per GB (it is about 0.2 on AES-NI).
            for v in [seal, open] {
                assert!(v > 0.01 && v < 100.0, "{}: {v} CPU-s/GB", library.name());
            }
        }
        let cost = measure(0).expect("measured on CPU 0");
        assert!(cost.seal_cpu_s_per_gb <= 100.0 && cost.open_cpu_s_per_gb <= 100.0);
    }
}

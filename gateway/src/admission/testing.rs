//! What the attacker reviews' pool tests share: addresses, a handshake
//! held past its ClientHello, the identities they play, and the flood a
//! known client is measured under.

use super::pool::{Pool, Taken};
use super::*;

pub(super) fn v4(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// A place taken and past its ClientHello: the client's turn, early.
pub(super) fn answered(pool: &Pool, c: SocketAddr, max: usize, share: usize, known: bool) -> Taken {
    let t = pool.take_served(c, None, max, share, known).unwrap();
    pool.advance(t.id, &t.place, Stage::Answered);
    t
}

/// Still in its handshake: neither evicted nor past it.
pub(super) fn live(t: &Taken) -> bool {
    t.place.stage() == Stage::Answered
}

pub(super) const ATTACKER: &str = "spiffe://example.internal/attacker";
pub(super) const ATTACKER_TOO: &str = "spiffe://example.internal/attacker-too";
pub(super) const VICTIM: &str = "spiffe://example.internal/victim";
pub(super) const VICTIM_TOO: &str = "spiffe://example.internal/victim-colleague";

/// 20 rounds of a flood: `at` opens 4 handshakes at once (a busy NAT's
/// users', a client's parallel ones; the first the oldest), strangers
/// from other networks fill the share, 8 certless newcomers from other
/// networks come, then `at`'s 4 try to complete. Says how many of `at`'s
/// 80 completed, and of the 20 firsts.
pub(super) fn flood(pool: &Pool, at: [u8; 4], max: usize, share: usize) -> (usize, usize) {
    let mut strangers: Vec<Taken> = Vec::new();
    let mut next_stranger = 0u32;
    let (mut done, mut first_done) = (0, 0);
    for round in 0..20u16 {
        // 4 handshakes at once (a busy NAT's users', a client's parallel
        // ones), the first the oldest.
        let now: Vec<Taken> = (0..4u16)
            .map(|n| answered(pool, v4(at, 20_000 + 4 * round + n), max, share, true))
            .collect();
        // Strangers filling the share, one per /16 (not crowded).
        while pool.handshakes() < share {
            let n = next_stranger;
            next_stranger += 1;
            strangers.push(answered(
                pool,
                v4([100 + (n / 200) as u8, (n % 200) as u8, 0, 1], 1),
                max,
                share,
                false,
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
        // Certless newcomers of the flood, each from another network.
        for k in 0..8u8 {
            if let Ok(newcomer) = pool.take_served(
                v4([150 + round as u8, 18 + k, 0, 1], 1),
                None,
                max,
                share,
                false,
            ) {
                pool.advance(newcomer.id, &newcomer.place, Stage::Answered);
                strangers.push(newcomer);
            }
        }
        for (n, t) in now.iter().enumerate() {
            pool.advance(t.id, &t.place, Stage::Established);
            if t.place.stage() == Stage::Established {
                done += 1;
                if n == 0 {
                    first_done += 1;
                }
            }
        }
    }
    (done, first_done)
}

/// Admission with no per-source, prefix or network limit (the pool's
/// rules alone decide), no kernel block list, `exempt` ranges.
pub(super) fn unlimited(exempt: Vec<ipnet::IpNet>) -> AdmissionSettings {
    AdmissionSettings {
        source_handshakes_per_second: 0,
        source_handshakes_in_flight: 0,
        prefix_handshakes_per_second: 0,
        prefix_handshakes_in_flight: 0,
        network_handshakes_per_second: 0,
        network_handshakes_in_flight: 0,
        kernel_block_list: false,
        pin: false,
        exempt,
        ..AdmissionSettings::default()
    }
}

/// `admit` from `c`: its ticket, or None when refused.
pub(super) fn admit_at(
    admission: &Arc<Admission>,
    pool: &Arc<Pool>,
    max: usize,
    share: usize,
    c: SocketAddr,
) -> Option<Ticket> {
    match admission.admit(pool, max, share, c, None) {
        Answer::Admit(t) | Answer::Evict { ticket: t, .. } => Some(t),
        Answer::Refuse(_) => None,
    }
}

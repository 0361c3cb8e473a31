//! Attacker review 13 of admission after 82e5512 ("Merge adm12"). Each
//! test asserts the HARM, so it passes on the reviewed code; a fix should
//! make it fail.
//!
//! Run: `cargo test -p gateway --lib admission::review13 -- --nocapture`

use super::pool::Taken;
use super::*;

fn v4(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// A place taken and past its ClientHello: the client's turn, early.
fn answered(pool: &Pool, c: SocketAddr, max: usize, share: usize, known: bool) -> Taken {
    let t = pool.take(c, None, max, share, known).unwrap();
    pool.advance(t.id, &t.place, Stage::Answered);
    t
}

const ATTACKER: &str = "[\"uri:spiffe://example.internal/attacker\"]";
const VICTIM: &str = "[\"uri:spiffe://example.internal/victim\"]";

/// What the listener does for each connection that authenticated
/// (`Ticket::authenticated` -> `Pool::identified`), from 16 400 fresh
/// addresses of ONE IPv6 /64 with one certificate: each connection is
/// taken, completes, is identified (the pool notes the address as the
/// identity's, before any `identity_share` check), and closes. The known
/// table keeps that /64 as one entry (4 exact slots of the identity);
/// the pool's memory of served addresses (16 384, no bound per /64 or
/// per identity) is flushed of every other address.
fn flush(pool: &Pool, max: usize, share: usize, identity_share: f64) -> usize {
    let mut refused_by_share = 0;
    for n in 0..16_400u128 {
        let ip = std::net::Ipv6Addr::from(0x2001_0db8_0000_0001_0000_0000_0000_0000u128 + n + 1);
        let t = pool
            .take(SocketAddr::from((ip, 40_000)), None, max, share, true)
            .unwrap();
        pool.advance(t.id, &t.place, Stage::Established);
        if !pool.identified(&t.place, ATTACKER, identity_share) {
            refused_by_share += 1;
        }
        // The first stays connected: the identity holds its share.
        if n > 0 {
            pool.release(t.id, &t.place);
        }
    }
    refused_by_share
}

/// R13-1 (MEDIUM-HIGH). One certificate and one IPv6 /64 make the pool
/// forget every client it served: 16 400 authentications from fresh
/// addresses of the /64 (each refused after its handshake by a small
/// `identity_share`, even) push every other address out of `served`.
/// Every known client then counts as its /16's one identity, which the
/// attacker (known from 4 addresses of the client's /16, forgotten too)
/// holds: the client's handshakes are never spared, and certless
/// newcomers from elsewhere crowd them out. Control (no flush): the
/// client is its own identity, spared, and completes 20 of 20.
#[test]
fn r13_1_one_64_flushes_the_pools_identities_and_a_known_client_never_completes() {
    assert_eq!(r13_1(false), 20, "control: the known client completes");
    assert_eq!(r13_1(true), 0, "after the flush: never completes");
}

fn r13_1(flushed: bool) -> usize {
    let pool = Pool::new("edge");
    let (max, share) = (256, 40);
    let attacker_at = |n: u16| v4([10, 1, 1, 1 + n as u8], 1000 + n);
    let victim_at = |round: u16| v4([10, 1, 9, 5], 20_000 + round);
    // Both verified on this listener: the attacker from 4 addresses of
    // 10.1.1.0/24, the client from 10.1.9.5.
    for n in 0..4u16 {
        pool.served_as(attacker_at(n).ip(), ATTACKER);
    }
    pool.served_as(victim_at(0).ip(), VICTIM);
    if flushed {
        // The attacker's identity is capped at one connection: each
        // flushing connection is refused after its handshake, and
        // still noted.
        let refused = flush(&pool, max, share, 1.0 / max as f64);
        assert!(refused > 16_000, "refused by identity_share: {refused}");
    }
    // The attacker holds 4 known handshakes in 10.1.1.0/24 (it rotates
    // them as they near the handshake timeout).
    let attacker: Vec<Taken> = (0..4u16)
        .map(|n| answered(&pool, attacker_at(n), max, share, true))
        .collect();
    let mut strangers: Vec<Taken> = Vec::new();
    let mut next = 0u8;
    let mut completed = 0;
    for round in 0..20u16 {
        let victim = answered(&pool, victim_at(round), max, share, true);
        // Strangers fill the share, one per /16 (not crowded).
        while pool.handshakes() < share {
            strangers.push(answered(
                &pool,
                v4([100 + next / 4, next % 4, 0, 1], 1),
                max,
                share,
                false,
            ));
            next += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
        // A certless newcomer from elsewhere: 10.1.0.0/16 holds 5 (crowded).
        // (Refused when nothing may give way: the client's handshake is
        // spared, the attacker's too.)
        if let Ok(newcomer) = pool.take(
            v4([150 + round as u8, 18, 0, 1], 1),
            None,
            max,
            share,
            false,
        ) {
            pool.advance(newcomer.id, &newcomer.place, Stage::Answered);
            strangers.push(newcomer);
        }
        pool.advance(victim.id, &victim.place, Stage::Established);
        if victim.place.stage() == Stage::Established {
            completed += 1;
            pool.release(victim.id, &victim.place);
        }
    }
    assert!(
        attacker.iter().all(|t| t.place.stage() == Stage::Answered),
        "the attacker's 4 are all still there"
    );
    completed
}

/// R13-2 (MEDIUM). The same flush reopens R12-3: the client and a
/// certificate holder in its /24 (a NAT's other address, a hosting /24)
/// both count as their /16's identity, so they are "own" to each other:
/// the attacker's known newcomers evict every unspared handshake of the
/// client outside any budget. Control: 32 at most (the burst).
#[test]
fn r13_2_after_the_flush_a_known_co_tenant_evicts_the_clients_handshakes_for_free() {
    let control = r13_2(false);
    let flushed = r13_2(true);
    eprintln!("evictions of the client: control {control}, flushed {flushed}");
    // The budget refills at 16/s while the loop runs.
    assert!(control <= 40, "control: within the budget: {control}");
    assert_eq!(flushed, 128, "after the flush: every one of 128");
}

fn r13_2(flushed: bool) -> usize {
    let pool = Pool::new("edge");
    let (max, share) = (256, 8);
    let attacker_ip = v4([10, 1, 9, 7], 1);
    let victim_at = |n: u16| v4([10, 1, 9, 5], 20_000 + n);
    pool.served_as(attacker_ip.ip(), ATTACKER);
    pool.served_as(victim_at(0).ip(), VICTIM);
    if flushed {
        flush(&pool, max, share, 1.0);
    }
    // The attacker holds the /24's 4 spared places (after the flush, as
    // the /16's identity: the client's handshakes are spared none).
    let _held: Vec<Taken> = (0..4u16)
        .map(|n| answered(&pool, v4([10, 1, 9, 7], 2 + n), max, share, true))
        .collect();
    let mut victim: Vec<Taken> = (0..4u16)
        .map(|n| answered(&pool, victim_at(n), max, share, true))
        .collect();
    let mut evicted = 0;
    for n in 0..128u16 {
        std::thread::sleep(Duration::from_millis(1));
        let Ok(t) = pool.take(v4([10, 1, 9, 7], 100 + n), None, max, share, true) else {
            continue;
        };
        if t.evicted.is_some_and(|e| e.ip() == victim_at(0).ip()) {
            evicted += 1;
        }
        // The attacker's newcomer closes at once; the client reconnects.
        pool.release(t.id, &t.place);
        victim.retain(|v| v.place.stage() != Stage::Evicted);
        victim.push(answered(&pool, victim_at(1000 + n), max, share, true));
    }
    evicted
}

/// R13-1, the known table's side: the flush costs the attacker nothing
/// there. Its 16 400 verifications from one /64 make one known entry (4
/// exact slots of its identity, rotating), well within its quota, and
/// its 4 addresses in the client's /16 stay verified here (known: the
/// privileges the pool spares), while the pool forgot them and the client.
#[test]
fn r13_1_the_flush_leaves_the_attacker_known_in_the_clients_16() {
    let settings = AdmissionSettings::default();
    let mut sources = sources::Sources::new(&settings);
    let now = Instant::now();
    let attacker_at = |n: u8| IpAddr::from([10, 1, 1, 1 + n]);
    let proof = Arc::new(sources::Proof::default());
    for n in 0..4 {
        sources.remember(
            "edge",
            attacker_at(n),
            ATTACKER,
            proof.clone(),
            0,
            &settings,
            now,
        );
    }
    let before = sources.lens();
    for n in 0..16_400u128 {
        let ip = std::net::Ipv6Addr::from(0x2001_0db8_0000_0001_0000_0000_0000_0000u128 + n + 1);
        sources.remember(
            "edge",
            IpAddr::V6(ip),
            ATTACKER,
            proof.clone(),
            0,
            &settings,
            now,
        );
    }
    let after = sources.lens();
    eprintln!("tables' lengths before {before:?}, after {after:?}");
    assert!((0..4).all(|n| sources.verified_here("edge", attacker_at(n), &settings, now)));
    assert_eq!(after[3], before[3] + 1, "one known entry more: the /64");
}

fn admitted(a: Answer) -> Ticket {
    match a {
        Answer::Admit(t) | Answer::Evict { ticket: t, .. } => t,
        Answer::Refuse(r) => panic!("refused: {r:?}"),
    }
}

fn v6(ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), 1)
}

/// R13-3 (LOW-MEDIUM). A /64 blocked for strikes by a few failing
/// co-tenants (a hosting /64, an office LAN) admits a known client only
/// from the exact address that verified: the same client, its privacy
/// address rotated (daily on common OSes), is refused `Blocked` for
/// `block_for`, and cannot verify from the new address to be spared.
#[test]
fn r13_3_a_64_blocked_by_its_neighbours_refuses_a_known_clients_rotated_address() {
    let settings = AdmissionSettings {
        kernel_block_list: false,
        pin: false,
        ..AdmissionSettings::default()
    };
    let admission = Admission::new(&settings, Arc::new(crate::metrics::Metrics::default()));
    let pool = admission.pool("edge");
    let client = v6("2001:db8:0:1::a");
    let t = admitted(admission.admit(&pool, 100_000, 100_000, client, None));
    assert!(t.established());
    assert!(t.served(VICTIM));
    drop(t);
    // Five co-tenants fail 100 handshakes each within the window.
    for n in 0..5u32 {
        let a = v6(&format!("2001:db8:0:1::b{n}"));
        for _ in 0..100 {
            if let Answer::Admit(t) | Answer::Evict { ticket: t, .. } =
                admission.admit(&pool, 100_000, 100_000, a, None)
            {
                drop(t);
            }
        }
    }
    let list = admission.blocked();
    assert!(
        list.iter()
            .any(|b| b.net == "2001:db8:0:1::/64".parse::<IpNet>().unwrap()),
        "{list:?}"
    );
    // The exact address that verified still gets in; its rotated one not.
    admitted(admission.admit(&pool, 100_000, 100_000, client, None));
    assert!(matches!(
        admission.admit(&pool, 100_000, 100_000, v6("2001:db8:0:1::c"), None),
        Answer::Refuse(Refusal::Blocked)
    ));
}

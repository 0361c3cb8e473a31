//! Attacker review 7 of admission (after 79ebc88 "adm-fix" and f7abc1a):
//! each test shows, at the level of `Admission` (no sockets: a handshake
//! without a descriptor is judged by time alone, its turn starting at
//! `hello_read`, as the real one starts at the gateway's flight), one
//! harm the code reviewed allowed. F1, F2, F3, F5, F6 and F7 are fixed
//! and their tests assert the fix; F1b and F4 are not, and theirs still
//! assert the harm (they fail once it is fixed: turn them round). F8's
//! first fix (forget known sources at every trust change) was taken
//! back: review 10 (R10-1) showed it lock every client out of a flood
//! after each CRL refresh; a reload now forgets only the known sources
//! it no longer trusts or allows (review10.rs, r10_1).
//!
//! Run: `cargo test -p gateway --lib admission::review7 -- --nocapture`

use super::*;

fn client(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

fn admitted(a: Answer) -> Ticket {
    match a {
        Answer::Admit(t) | Answer::Evict { ticket: t, .. } => t,
        Answer::Refuse(r) => panic!("refused: {r:?}"),
    }
}

fn refused(a: Answer) -> Refusal {
    match a {
        Answer::Refuse(r) => r,
        _ => panic!("admitted"),
    }
}

/// Defaults, but no kernel copy (nothing pinned from a unit test).
fn defaults() -> AdmissionSettings {
    AdmissionSettings {
        kernel_block_list: false,
        pin: false,
        ..AdmissionSettings::default()
    }
}

/// A full handshake that authenticated as `identity`: the source is known.
fn verify(admission: &Arc<Admission>, pool: &Arc<Pool>, from: SocketAddr, identity: &str) {
    let t = admitted(admission.admit(pool, 100_000, 100_000, from, None));
    assert!(t.established());
    t.served(identity);
}

fn fail_once(admission: &Arc<Admission>, pool: &Arc<Pool>, source: SocketAddr) {
    drop(admitted(
        admission.admit(pool, 100_000, 100_000, source, None),
    ));
}

const FRONTEND: &str = "spiffe://example.internal/ns/shop/sa/frontend";
const BATCH: &str = "spiffe://example.internal/ns/batch/sa/job";

/// F1 (fixed). One certificate holder (the batch job's, a compromised
/// device's), known from a few addresses, filled the handshake share with
/// handshakes early in their client's turn, none ever displaced: every
/// other client, the clients already served included, was refused. Now a
/// known source's handshakes are spared displacement only while its /24
/// holds at most four of the share (its /16 sixteen): the attacker's
/// sixteen give way to the client served before and to a first-time
/// client from another network, as an unknown source's would.
#[test]
fn f1_one_certificate_cannot_hold_the_handshake_share() {
    let s = AdmissionSettings {
        identity_share: 0.5,
        ..defaults()
    };
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let (max, share) = (64, 16);
    // A client served before: known.
    let served = client("192.0.2.10", 1);
    verify(&admission, &pool, served, FRONTEND);
    // The attacker verifies once from each of two addresses with its one
    // certificate (its route allows it: a real client of the listener).
    let attackers = [client("198.51.100.1", 1), client("198.51.100.2", 1)];
    for a in attackers {
        verify(&admission, &pool, a, BATCH);
    }
    // It opens the share's 16 handshakes and sends each a real
    // ClientHello: the gateway answers, and it is the client's turn.
    let held: Vec<Ticket> = (0..share)
        .map(|i| {
            let t = admitted(admission.admit(&pool, max, share, attackers[i % 2], None));
            t.hello_read();
            t
        })
        .collect();
    // The client served before gets in, and so does a first-time one,
    // each displacing one of the attacker's.
    let mut theirs = Vec::new();
    for newcomer in [served, client("203.0.113.5", 1)] {
        match admission.admit(&pool, max, share, newcomer, None) {
            Answer::Evict { ticket, victim } => {
                assert!(attackers.contains(&victim), "{victim}");
                ticket.hello_read();
                theirs.push(ticket);
            }
            Answer::Admit(_) => panic!("{newcomer} admitted without eviction"),
            Answer::Refuse(r) => panic!("{newcomer} refused: {r:?}"),
        }
    }
    assert_eq!(held.iter().filter(|t| !t.established()).count(), 2);
}

/// F1b (MEDIUM, f7abc1a). With the default `identity_share` (1.0: no
/// cap), one certificate holder from one address holds every slot of the
/// listener with established connections, never evicted: every other
/// client, known ones included, is refused `max_connections`.
#[test]
fn f1b_by_default_one_identity_holds_every_slot() {
    let s = defaults();
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let served = client("192.0.2.10", 1);
    verify(&admission, &pool, served, FRONTEND);
    let max = 100;
    let mut live = Vec::new();
    for i in 0..max {
        let t = admitted(admission.admit(
            &pool,
            max,
            max / 4,
            client("198.51.100.1", 2 + i as u16),
            None,
        ));
        t.hello_read();
        assert!(t.established());
        assert!(t.served(BATCH));
        live.push(t);
    }
    assert_eq!(
        refused(admission.admit(&pool, max, max / 4, served, None)),
        Refusal::MaxConnections
    );
}

/// F2 (fixed). Known by /64 made a host that never held a certificate,
/// in the /64 of one that did (an office LAN, a hosting /64 shared by
/// tenants), known. Now only the exact addresses that verified get the
/// strong privileges: the neighbour is not vouched for, a strike block of
/// its /64 refuses it (not the laptop), it evicts within the budget any
/// unknown /64 has, and its handshakes give way to a known client's.
#[test]
fn f2_a_neighbour_in_a_known_64_gets_none_of_the_strong_privileges() {
    let s = AdmissionSettings {
        block_after: 3,
        prefix_block_after: 4,
        network_block_after: 5,
        ..defaults()
    };
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    // An employee's laptop verifies once.
    let laptop = client("2001:db8:1:2::10", 1);
    verify(&admission, &pool, laptop, FRONTEND);
    // The attacker on the same LAN never verifies.
    let me = |i: u32| client(&format!("2001:db8:1:2::{:x}", 0x1000 + i), 1);
    assert!(admission.vouched("edge", laptop.ip()));
    assert!(!admission.vouched("edge", me(0).ip()));
    // Its failures get the /64 blocked for strikes...
    for i in 0..12 {
        if let Answer::Admit(t) | Answer::Evict { ticket: t, .. } =
            admission.admit(&pool, 100_000, 100_000, me(i), None)
        {
            drop(t);
        }
    }
    let list: Vec<IpNet> = admission.blocked().iter().map(|b| b.net).collect();
    assert!(
        list.iter().any(|n| n.prefix_len() <= 64),
        "no prefix or network block: {list:?}"
    );
    // ...which refuse an unknown neighbour and the attacker, not the
    // laptop.
    assert_eq!(
        refused(admission.admit(&pool, 100, 100, client("2001:db8:1:2::beef", 1), None)),
        Refusal::Blocked
    );
    assert_eq!(
        refused(admission.admit(&pool, 100, 100, me(999), None)),
        Refusal::Blocked
    );
    admitted(admission.admit(&pool, 100, 100, laptop, None)).established();

    // Eviction budget (no blocks in the way): the attacker's /64 evicts
    // as many as any unknown /64 (32 at once), not without bound.
    let admission = Admission::new(&defaults(), Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    verify(&admission, &pool, laptop, FRONTEND);
    let evictions = |from: &dyn Fn(u32) -> SocketAddr, first_octet: u8| {
        let mut n = 0;
        for i in 0..100u32 {
            // Each victim in a /16 of its own: never crowded, no blocks;
            // overdue, so that the ranking lets anyone evict it.
            let victim = SocketAddr::from(([first_octet, i as u8, 0, 1], 1));
            let v = admitted(admission.admit(&pool, 2, 1, victim, None));
            v.place().set_pace(super::progress::Pace {
                min_rate: 0,
                grace: Duration::ZERO,
            });
            match admission.admit(&pool, 2, 1, from(i), None) {
                Answer::Evict { ticket, .. } => {
                    n += 1;
                    assert!(ticket.established());
                }
                Answer::Admit(_) => panic!("admitted without eviction"),
                Answer::Refuse(_) => {}
            }
            drop(v);
        }
        n
    };
    let stranger = |i: u32| client(&format!("2001:db8:9:9::{:x}", 0x1000 + i), 1);
    let by_stranger = evictions(&stranger, 11);
    assert!((32..=34).contains(&by_stranger), "{by_stranger}");
    let by_neighbour = evictions(&|i| me(2000 + i), 12);
    assert!((32..=34).contains(&by_neighbour), "{by_neighbour}");

    // And its handshakes, early in their turns, give way to a client
    // served before, elsewhere (the known lane).
    let admission = Admission::new(&defaults(), Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    verify(&admission, &pool, laptop, FRONTEND);
    let served = client("192.0.2.50", 1);
    verify(&admission, &pool, served, FRONTEND);
    let _share: Vec<Ticket> = (0..16u32)
        .map(|i| {
            let t = admitted(admission.admit(&pool, 64, 16, me(3000 + i), None));
            t.hello_read();
            t
        })
        .collect();
    admitted(admission.admit(&pool, 64, 16, served, None)).established();
}

/// F3 (fixed). A wider strike block took the place of the narrower ones
/// inside it, a known source's own address block included, and a strike
/// block of a prefix admits known sources: the address was let in again,
/// and could not be blocked again under the /24. Now an address's own
/// block stays under a wider strike block, and is added under one.
#[test]
fn f3_a_prefix_block_keeps_a_known_sources_own_address_block() {
    let s = AdmissionSettings {
        block_after: 3,
        prefix_block_after: 4,
        network_block_after: 50,
        prefix_spread_block_after: 0,
        network_spread_block_after: 0,
        ..defaults()
    };
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let a = client("192.0.2.10", 1);
    verify(&admission, &pool, a, BATCH);
    for _ in 0..3 {
        fail_once(&admission, &pool, a);
    }
    // Its own strikes block its address: refused, known or not.
    assert_eq!(
        refused(admission.admit(&pool, 100, 100, a, None)),
        Refusal::Blocked
    );
    // One failure of a second address of the /24 blocks the /24 (the
    // first lent 3)...
    fail_once(&admission, &pool, client("192.0.2.11", 1));
    let list: Vec<IpNet> = admission.blocked().iter().map(|b| b.net).collect();
    assert_eq!(
        list,
        vec![
            "192.0.2.0/24".parse::<IpNet>().unwrap(),
            "192.0.2.10/32".parse::<IpNet>().unwrap()
        ]
    );
    // ...and the blocked address stays refused.
    assert_eq!(
        refused(admission.admit(&pool, 100, 100, a, None)),
        Refusal::Blocked
    );

    // A known address whose own strikes come after the /24's block is
    // blocked under it.
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let b = client("192.0.2.20", 1);
    verify(&admission, &pool, b, BATCH);
    for i in 0..2 {
        fail_once(&admission, &pool, client("192.0.2.30", 1 + i));
        fail_once(&admission, &pool, client("192.0.2.31", 1 + i));
    }
    let list: Vec<IpNet> = admission.blocked().iter().map(|b| b.net).collect();
    assert_eq!(list, vec!["192.0.2.0/24".parse::<IpNet>().unwrap()]);
    for _ in 0..3 {
        fail_once(&admission, &pool, b);
    }
    assert_eq!(
        refused(admission.admit(&pool, 100, 100, b, None)),
        Refusal::Blocked
    );
}

/// F9 (fixed). A strikes block of a prefix holding a known source stays
/// out of the kernel's copy when it is made, but a reload that loaded the
/// XDP program again wrote the whole list into it: the known source's SYNs
/// were dropped from then on. The copy a (re)loaded program is given now
/// leaves such a block out, and keeps blocks by hand and address blocks.
#[test]
fn f9_a_reloaded_kernel_program_is_not_given_a_block_that_spares_known_sources() {
    let s = AdmissionSettings {
        block_after: 3,
        prefix_block_after: 4,
        network_block_after: 50,
        prefix_spread_block_after: 0,
        network_spread_block_after: 0,
        ..defaults()
    };
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    verify(&admission, &pool, client("192.0.2.20", 1), BATCH);
    for i in 0..2 {
        fail_once(&admission, &pool, client("192.0.2.30", 1 + i));
        fail_once(&admission, &pool, client("192.0.2.31", 1 + i));
    }
    for _ in 0..3 {
        fail_once(&admission, &pool, client("198.51.100.7", 1));
    }
    admission
        .block("203.0.113.0/24".parse().unwrap(), None)
        .unwrap();
    let net = |s: &str| s.parse::<IpNet>().unwrap();
    let all: Vec<IpNet> = admission.blocked().iter().map(|b| b.net).collect();
    assert_eq!(
        all,
        [
            net("192.0.2.0/24"),
            net("198.51.100.7/32"),
            net("203.0.113.0/24")
        ]
    );
    let kernel: Vec<IpNet> = admission.kernel_copy().iter().map(|b| b.net).collect();
    assert_eq!(kernel, [net("198.51.100.7/32"), net("203.0.113.0/24")]);
    // The known source is still let in by `admit` under its /24's block.
    admitted(admission.admit(&pool, 100, 100, client("192.0.2.20", 2), None));
}

/// F4 (fixed). A block made by hand refuses a known source (README), but
/// the lookup takes the longest match: a strikes block of a /24 inside a
/// /16 blocked by hand hid the hand-made block from the /24's known
/// sources (until the /24 block expired; with the kernel copy off or not
/// attached, or for the spared /24 that never went to XDP). Now a wider
/// block by hand refuses them under it.
#[test]
fn f4_a_strikes_24_inside_a_manual_16_refuses_its_known_sources() {
    let s = AdmissionSettings {
        block_after: 3,
        prefix_block_after: 4,
        network_block_after: 50,
        prefix_spread_block_after: 0,
        network_spread_block_after: 0,
        ..defaults()
    };
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let a = client("192.0.2.10", 1);
    verify(&admission, &pool, a, BATCH);
    // Two other addresses of its /24 fail: the /24 is blocked for strikes.
    for _ in 0..2 {
        fail_once(&admission, &pool, client("192.0.2.11", 1));
        fail_once(&admission, &pool, client("192.0.2.12", 1));
    }
    assert!(admission.blocked().iter().any(|b| b.net.prefix_len() == 24));
    // The operator blocks the whole /16 by hand.
    admission
        .block("192.0.0.0/16".parse().unwrap(), None)
        .unwrap();
    assert_eq!(
        refused(admission.admit(&pool, 100, 100, client("192.0.9.9", 1), None)),
        Refusal::Blocked
    );
    // The known source in the /24 is refused like the rest of the /16...
    assert_eq!(
        refused(admission.admit(&pool, 100, 100, a, None)),
        Refusal::Blocked
    );
    // ...and let in under the /24's strikes block once the /16 is lifted.
    assert!(admission.unblock("192.0.0.0/16".parse().unwrap()));
    admitted(admission.admit(&pool, 100, 100, a, None)).established();
}

/// F5 (fixed). At its quota an identity replaced its own oldest known
/// entries, so one holder of the frontends' shared certificate verifying
/// from 1024 /64s forgot every frontend. Now, at its quota, a new address
/// of the identity is not remembered: the frontends stay known (vouched,
/// admitted past a full networks table).
#[test]
fn f5_one_holder_of_a_shared_identity_cannot_flush_its_clients() {
    let s = AdmissionSettings {
        max_tracked: 64,
        source_handshakes_in_flight: 2,
        ..defaults()
    };
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let frontends: Vec<SocketAddr> = (1..=20u8)
        .map(|i| SocketAddr::from(([192, 0, 2, i], 1)))
        .collect();
    for f in &frontends {
        verify(&admission, &pool, *f, FRONTEND);
    }
    assert!(frontends.iter().all(|f| admission.vouched("edge", f.ip())));
    // The attacker, with one frontend's certificate, from 1024 /64s of
    // one /48 (a /48 passes the networks_per_allocation quota easily).
    for i in 0..1024u32 {
        let from = client(&format!("2001:db8:77:{:x}::1", i), 1);
        verify(&admission, &pool, from, FRONTEND);
    }
    assert!(frontends.iter().all(|f| admission.vouched("edge", f.ip())));
    assert!(!admission.vouched("edge", client("2001:db8:77:3ff::1", 1).ip()));
    // The networks' table full of busy attacker entries (another /32),
    // each holding its handshake open: busy for as long as it lasts, not
    // for as long as a bucket takes to refill (under the other tests'
    // load the squat above outlasted that, and a new source got in).
    let mut held = Vec::new();
    for i in 0..200u32 {
        let attacker = client(&format!("2001:db9:{:x}::1", 0x100 + i), 1);
        if let Answer::Admit(t) | Answer::Evict { ticket: t, .. } =
            admission.admit(&pool, 1000, 1000, attacker, None)
        {
            held.push(t);
        }
    }
    assert_eq!(
        refused(admission.admit(&pool, 1000, 1000, client("198.51.100.1", 1), None)),
        Refusal::MaxTracked
    );
    admitted(admission.admit(&pool, 1000, 1000, frontends[0], None)).established();
}

/// F6 (fixed, with review 10 R10-10). With the addresses' table full
/// (busy), an untracked address of a known IPv6 /64 struck the /64's
/// known entry: its neighbours' strikes added up there, and the strike
/// that reached `block_after` blocked the address that made it: a
/// neighbour failing twice and a known client failing once (a timeout)
/// got the known client's address blocked. Now the exact address that
/// verified keeps its own count, the /64's other addresses share another.
#[test]
fn f6_neighbours_strikes_in_a_shared_known_64_do_not_block_an_innocent_address() {
    let s = AdmissionSettings {
        max_tracked: 8,
        block_after: 3,
        prefix_block_after: 0,
        network_block_after: 0,
        prefix_spread_block_after: 0,
        network_spread_block_after: 0,
        ..defaults()
    };
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let innocent = client("2001:db8:5:5::10", 1);
    verify(&admission, &pool, innocent, FRONTEND);
    // (Its entries idle again: buckets refilled.)
    std::thread::sleep(Duration::from_millis(30));
    // The addresses' table full of busy entries (a strike each) from
    // elsewhere: the innocent's idle entry is forgotten.
    for i in 0..8u8 {
        fail_once(&admission, &pool, SocketAddr::from(([10, 0, i, 1], 1)));
    }
    // A neighbour fails twice, from two addresses of the /64.
    fail_once(&admission, &pool, client("2001:db8:5:5::a1", 1));
    fail_once(&admission, &pool, client("2001:db8:5:5::a2", 1));
    assert!(admission.blocked().is_empty(), "{:?}", admission.blocked());
    // The innocent client's one failed handshake.
    fail_once(&admission, &pool, innocent);
    assert!(admission.blocked().is_empty(), "{:?}", admission.blocked());
    admitted(admission.admit(&pool, 100, 100, innocent, None)).established();
    // The neighbour's third failure from one address is that address's
    // block, not the client's (review 11 R11-3: each stranger address of
    // the /64 has its own strikes; a third address alone blocks no one).
    fail_once(&admission, &pool, client("2001:db8:5:5::a3", 1));
    assert!(admission.blocked().is_empty(), "{:?}", admission.blocked());
    fail_once(&admission, &pool, client("2001:db8:5:5::a1", 1));
    fail_once(&admission, &pool, client("2001:db8:5:5::a1", 1));
    let list: Vec<IpNet> = admission.blocked().iter().map(|b| b.net).collect();
    assert_eq!(list, vec!["2001:db8:5:5::a1/128".parse::<IpNet>().unwrap()]);
    admitted(admission.admit(&pool, 100, 100, innocent, None)).established();
}

/// F7 (fixed). With the listener full, an unknown newcomer's eviction
/// search walked every handshake in the share (the known lane's filter
/// rejected each one, so `take(CANDIDATES)` never stopped it), under the
/// pool's lock. Now only a known newcomer looks past the oldest few: the
/// cost does not grow with `max_handshakes_in_flight`.
#[test]
fn f7_an_unknown_newcomer_does_not_scan_the_whole_share() {
    let per_refusal = |n: usize, tries: usize| {
        let pool = Pool::new("edge");
        let mut held = Vec::with_capacity(n);
        for i in 0..n {
            // One handshake per /16: nothing crowded.
            let c = SocketAddr::from(([1 + (i / 256) as u8, (i % 256) as u8, 0, 1], 1));
            let t = pool.take(c, None, 4 * n, n, None).unwrap();
            pool.advance(t.id, &t.place, Stage::Answered);
            // Early in its turn for a minute: not to be evicted.
            t.place.set_pace(super::progress::Pace {
                min_rate: 0,
                grace: Duration::from_secs(120),
            });
            held.push(t);
        }
        let start = Instant::now();
        for i in 0..tries {
            let c = client(&format!("2001:db8:{:x}::1", i), 1);
            assert!(pool.take(c, None, 4 * n, n, None).is_err());
        }
        start.elapsed() / tries as u32
    };
    let small = per_refusal(200, 2000);
    let large = per_refusal(20_000, 200);
    eprintln!(
        "per refused unknown newcomer: {small:?} with 200 handshakes in the share, {large:?} with 20000"
    );
    assert!(large < small * 10, "{small:?} {large:?}");
}

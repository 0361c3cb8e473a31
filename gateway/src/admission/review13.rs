//! Attacker review 13 of admission after 82e5512 ("Merge adm12"). Each
//! test asserts the HARM, so it passes on the reviewed code; a fix should
//! make it fail.
//!
//! Run: `cargo test -p gateway --lib admission::review13 -- --nocapture`

use super::testing::unlimited;
use super::*;

fn v4(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

const ATTACKER: &str = "[\"uri:spiffe://example.internal/attacker\"]";
const VICTIM: &str = "[\"uri:spiffe://example.internal/victim\"]";

/// A connection admitted (evicting or not) as a listener would.
fn admit_at(
    admission: &Arc<Admission>,
    pool: &Arc<Pool>,
    max: usize,
    share: usize,
    c: SocketAddr,
) -> (Ticket, Option<SocketAddr>) {
    match admission.admit(pool, max, share, c, None) {
        Answer::Admit(t) => (t, None),
        Answer::Evict { ticket, victim } => (ticket, Some(victim)),
        Answer::Refuse(r) => panic!("{c}: refused {r:?}"),
    }
}

/// Served with `identity`: its handshake done, its connection live, then
/// closed.
fn served(admission: &Arc<Admission>, pool: &Arc<Pool>, c: SocketAddr, identity: &str) {
    let (t, _) = admit_at(admission, pool, 100_000, 100_000, c);
    assert!(t.established());
    assert!(t.served(identity));
}

/// 16 400 authentications with one certificate from fresh addresses of
/// ONE IPv6 /64, each closed after: what flushed the pool's own record of
/// served addresses (16 384, no bound per /64 or identity) before the
/// pool took identities from the known table.
fn flush(admission: &Arc<Admission>, pool: &Arc<Pool>) {
    for n in 0..16_400u128 {
        let ip = std::net::Ipv6Addr::from(0x2001_0db8_0000_0001_0000_0000_0000_0000u128 + n + 1);
        let (t, _) = admit_at(
            admission,
            pool,
            100_000,
            100_000,
            SocketAddr::from((ip, 40_000)),
        );
        assert!(t.established());
        // Remembered or not (the identity's quota): either way, closed.
        let _ = t.served(ATTACKER);
    }
}

/// R13-1 (MEDIUM-HIGH, fixed with the pool taking identities from the
/// known table, adm13). One certificate and one IPv6 /64 made the pool
/// forget every client it had served: 16 400 authentications from fresh
/// addresses of the /64 pushed every other address out of the pool's own
/// record, every known client then counted as its /16's one identity,
/// which the attacker (known from 4 addresses of the client's /16) held,
/// so the client's handshakes were never spared and certless newcomers
/// crowded them out: 0 of 20 completed. Now the client's handshake
/// carries its known slot's identity, which the flush (one known entry)
/// does not touch: spared, it completes 20 of 20.
#[test]
fn r13_1_one_64_cannot_make_the_pool_forget_who_a_known_client_is() {
    let s = unlimited(Vec::new());
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let (max, share) = (256, 40);
    let attacker_at = |n: u16| v4([10, 1, 1, 1 + n as u8], 1000 + n);
    let victim_at = |round: u16| v4([10, 1, 9, 5], 20_000 + round);
    for n in 0..4u16 {
        served(&admission, &pool, attacker_at(n), ATTACKER);
    }
    served(&admission, &pool, victim_at(0), VICTIM);
    flush(&admission, &pool);
    // The attacker holds 4 known handshakes in 10.1.1.0/24, early in
    // their turns.
    let attacker: Vec<Ticket> = (0..4u16)
        .map(|n| {
            let (t, _) = admit_at(&admission, &pool, max, share, attacker_at(n));
            t.hello_read();
            t
        })
        .collect();
    let mut strangers: Vec<Ticket> = Vec::new();
    let mut next = 0u8;
    let mut completed = 0;
    for round in 0..20u16 {
        let (victim, _) = admit_at(&admission, &pool, max, share, victim_at(round));
        victim.hello_read();
        // Strangers fill the share, one per /16 (not crowded).
        while pool.handshakes() < share {
            let (t, _) = admit_at(
                &admission,
                &pool,
                max,
                share,
                v4([100 + next / 4, next % 4, 0, 1], 1),
            );
            t.hello_read();
            strangers.push(t);
            next += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
        // A certless newcomer from elsewhere: 10.1.0.0/16 holds 5.
        if let Answer::Admit(t) | Answer::Evict { ticket: t, .. } = admission.admit(
            &pool,
            max,
            share,
            v4([150 + round as u8, 18, 0, 1], 1),
            None,
        ) {
            t.hello_read();
            strangers.push(t);
        }
        if victim.established() {
            completed += 1;
        }
    }
    assert_eq!(completed, 20, "the known client completes every handshake");
    assert!(attacker.iter().all(|t| t.stage() == Stage::Answered));
}

/// R13-2 (MEDIUM, fixed with R13-1). After the same flush the client and
/// a certificate holder in its /24 both counted as their /16's identity,
/// "own" to each other: the holder's known newcomers evicted every one of
/// the client's 128 handshakes outside any budget. Now the client is its
/// own identity: the holder pays its budget (a burst of 32, 16/s).
#[test]
fn r13_2_after_the_flush_a_known_co_tenant_still_pays_to_evict_the_client() {
    let s = unlimited(Vec::new());
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let (max, share) = (256, 8);
    let attacker_at = |n: u16| v4([10, 1, 9, 7], n);
    let victim_at = |n: u16| v4([10, 1, 9, 5], 20_000 + n);
    served(&admission, &pool, attacker_at(1), ATTACKER);
    served(&admission, &pool, victim_at(0), VICTIM);
    flush(&admission, &pool);
    let held: Vec<Ticket> = (0..4u16)
        .map(|n| {
            let (t, _) = admit_at(&admission, &pool, max, share, attacker_at(2 + n));
            t.hello_read();
            t
        })
        .collect();
    let mut victim: Vec<Ticket> = (0..4u16)
        .map(|n| {
            let (t, _) = admit_at(&admission, &pool, max, share, victim_at(n));
            t.hello_read();
            t
        })
        .collect();
    let mut evicted = 0;
    for n in 0..128u16 {
        std::thread::sleep(Duration::from_millis(1));
        let t = match admission.admit(&pool, max, share, attacker_at(100 + n), None) {
            Answer::Admit(t) => t,
            Answer::Evict { ticket, victim } => {
                if victim.ip() == victim_at(0).ip() {
                    evicted += 1;
                }
                ticket
            }
            Answer::Refuse(_) => continue,
        };
        // The attacker's newcomer closes at once; the client reconnects.
        drop(t);
        victim.retain(|v| v.stage() != Stage::Evicted);
        if let Answer::Admit(t) | Answer::Evict { ticket: t, .. } =
            admission.admit(&pool, max, share, victim_at(1000 + n), None)
        {
            t.hello_read();
            victim.push(t);
        }
    }
    eprintln!("evictions of the client: {evicted}");
    // The budget refills at 16/s while the loop runs.
    assert!(evicted <= 40, "within the budget: {evicted}");
    assert!(held.iter().all(|t| t.stage() == Stage::Answered));
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

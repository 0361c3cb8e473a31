//! Attacker review 19 of admission after d844bff (the pool's spared
//! rules with no per-network part at shared addresses, exempt sources
//! known, and an identity at its known quota giving up a NAT address's
//! slot to its newest co-user: `Sources::give_up`). Each test asserted
//! the HARM on the reviewed code, next to a control without the attack.
//! Fixed since (shared places 8 per network and a quarter of the share
//! in all; `give_up` tries every co-user), R19-1 and R19-3 assert the
//! fix; R19-2 still asserts its harm (a bound on the work a spare's
//! departure does, stated in README).
//!
//! Run: `cargo test -p gateway --lib admission::review19 -- --nocapture`

use super::pool::Taken;
use super::testing::{
    ATTACKER, ATTACKER_TOO, VICTIM, VICTIM_TOO, admit_at, answered, flood, live, unlimited, v4,
};
use super::*;

/// Who is the NAT address's newest co-user when the attacker (the last
/// to verify there) gives the address up at its quota, in R19-1.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Next {
    /// The attacker's second certificate, verified from the NAT address
    /// just before the first, then from 2 more addresses of the NAT's
    /// /16: its part of its quota there (per network: quota/4).
    SecondCertificateFull,
    /// Control: the same second certificate, with room.
    SecondCertificateWithRoom,
    /// No second certificate: the newest real co-user's identity holds
    /// its part in the /16 (a fleet identity, 2 more addresses there),
    /// while the older co-user's has room.
    CoUserFull,
}

/// R19-1 (LOW; one certificate at its known quota, with a second
/// certificate at its part of the quota in the NAT's /16, or any newest
/// co-user whose identity is: a fleet identity). d844bff's `give_up`
/// (R18-4's fix) hands a NAT address's slot to `others.first()` only, and
/// only if that identity has room "as it is" (`room_as_it_is`: below its
/// part in the network, its quota, its quarter of the table). When the
/// newest co-user has no room, the whole slot is `unslot`ted: every
/// other co-user's proof goes with it (an IPv4 entry with no other slot
/// is forgotten), even one whose identity has room. The attacker picks
/// the newest co-user: its second certificate verifies from the NAT
/// address right before the first, then fills its part of the quota in
/// the /16 (2 here; 256 with the defaults, or its quota of 1024
/// anywhere). Measured with `known_per_identity = 8` (2 per network), as
/// r18_4: the two users' NAT address is known no more (identities None),
/// its next handshake is a stranger's (not spared), and with the share
/// held by strangers early in their turns it is refused at accept (no
/// known lane). Control: the second certificate with room: the address
/// keeps 4 identities, spared, admitted. Variant without a second
/// certificate: a real co-user's fleet identity at its part, the older
/// co-user (with room) is never tried.
#[test]
fn r19_1_a_quota_give_up_drops_every_co_user_when_the_newest_has_no_room() {
    // Fixed: every co-user is tried, newest first. Before: (None, false,
    // false) in both.
    assert_eq!(
        r19_1(Next::SecondCertificateFull),
        (Some(4), true, true),
        "an older co-user with room takes the slot"
    );
    assert_eq!(
        r19_1(Next::CoUserFull),
        (Some(3), true, true),
        "the older co-user, with room, takes the slot"
    );
    assert_eq!(
        r19_1(Next::SecondCertificateWithRoom),
        (Some(4), true, true),
        "control: the slot falls back on the second certificate, the users kept"
    );
}

/// (identities at the NAT address, its next handshake spared, a
/// handshake of it admitted with the share full of strangers).
fn r19_1(next: Next) -> (Option<usize>, bool, bool) {
    let mut s = unlimited(Vec::new());
    s.known_per_identity = 8;
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let (max, share) = (256, 40);
    let serve = |c: SocketAddr, who: &str| {
        let t = admit_at(&admission, &pool, max, share, c).unwrap();
        assert!(t.established());
        assert!(t.served(who));
    };
    let nat = [10, 1, 9, 5];
    serve(v4(nat, 10), VICTIM);
    serve(v4(nat, 11), VICTIM_TOO);
    if next != Next::CoUserFull {
        serve(v4(nat, 12), ATTACKER_TOO);
    }
    // The attacker, last to verify from the NAT address.
    serve(v4(nat, 13), ATTACKER);
    match next {
        Next::SecondCertificateFull => {
            for n in 0..2u8 {
                serve(v4([10, 1, 40, 1 + n], 1), ATTACKER_TOO);
            }
        }
        Next::CoUserFull => {
            for n in 0..2u8 {
                serve(v4([10, 1, 50, 1 + n], 1), VICTIM_TOO);
            }
        }
        Next::SecondCertificateWithRoom => {}
    }
    // The attacker's quota: the NAT address and one more of the /16 (its
    // part there, 2), one in each of 6 other networks; then one in a 7th,
    // and its largest network (the NAT's) gives up its least recently
    // verified entry, the NAT address.
    serve(v4([10, 1, 30, 5], 1), ATTACKER);
    for n in 0..7u8 {
        serve(v4([20 + n, 0, 0, 1], 1), ATTACKER);
    }
    let ids = admission
        .tables()
        .sources
        .identities_here("edge", IpAddr::from(nat), &s, Instant::now())
        .map(|ids| ids.len());
    let t = admit_at(&admission, &pool, max, share, v4(nat, 20)).unwrap();
    let spared = t.place.spared();
    t.hello_read();
    // The share held by strangers early in their turns, one per /16 (not
    // crowded): only the known lane lets a newcomer in.
    let mut strangers = Vec::new();
    let mut n = 0u32;
    while pool.handshakes() < share {
        let c = v4([100 + (n / 200) as u8, (n % 200) as u8, 0, 1], 1);
        n += 1;
        if let Some(t) = admit_at(&admission, &pool, max, share, c) {
            t.hello_read();
            strangers.push(t);
        }
    }
    let admitted = admit_at(&admission, &pool, max, share, v4(nat, 21)).is_some();
    println!(
        "{next:?}: NAT identities {ids:?}, spared {spared}, admitted under a full share {admitted}"
    );
    (ids, spared, admitted)
}

/// R19-2 (LOW, one certificate; README claim). README: "when a spared
/// one ends, the oldest waiting known handshake that fits, of the first
/// few waiting of its source, of its network and of the share, is spared
/// instead (a busy NAT keeps its oldest 4; an attacker handing its spare
/// to its own next handshake loses it to a client that waited longer)".
/// `Slots::left` tries only the first `CANDIDATES` (8) waiting of the
/// source, of the network and of the share, and stops there: 8 older
/// waiting handshakes that cannot fit (the attacker's own, at an address
/// of its own in the NAT's /24, past its identity's 4 in the /24) fill
/// all three windows, the client that waited longer is never tried, the
/// freed place stays free, and the attacker's next handshake at the NAT
/// address takes it as it joins (`joined` spares whoever comes first).
/// Measured at a NAT address of the client and the attacker (both
/// verified there): the attacker holds the address's 4, the client's
/// handshake waits, the attacker ends one of its 4 and opens another.
/// With 8 shields: the client's handshake is still not spared, the
/// attacker's new one is (the attacker keeps the NAT's 4 for as long as
/// it turns them over). Control, no shields: the client's handshake is
/// spared, the attacker's new one is not. (Within the stated 4 per NAT
/// address the certificate may hold; what breaks is the stated hand-over
/// to the client that waited longer, for a NAT's users and, through the
/// share's first 8, for every client waiting for the spared half.)
#[test]
fn r19_2_eight_unfitting_waiting_handshakes_keep_a_freed_spare_from_the_client() {
    assert_eq!(r19_2(true), (false, true), "the attacker keeps the spare");
    assert_eq!(
        r19_2(false),
        (true, false),
        "control: the client that waited longer gets it"
    );
}

/// (the client's waiting handshake spared after the attacker ends one,
/// the attacker's next one spared).
fn r19_2(shields: bool) -> (bool, bool) {
    let pool = Pool::new("edge");
    let (max, share) = (10_000, 2500);
    let nat = [10, 1, 9, 5];
    let own = [10, 1, 9, 77];
    pool.served_as(IpAddr::from(nat), VICTIM);
    pool.served_as(IpAddr::from(nat), ATTACKER);
    pool.served_as(IpAddr::from(own), ATTACKER);
    let at_nat: Vec<_> = (0..4u16)
        .map(|p| answered(&pool, v4(nat, 1000 + p), max, share, true))
        .collect();
    assert!(at_nat.iter().all(|t| t.place.spared()));
    // Its identity's 4 in the /24 at its own address, then (the attack)
    // 8 more that cannot be spared: they wait, oldest first.
    let n = if shields { 12 } else { 4 };
    let mine: Vec<_> = (0..n)
        .map(|p| answered(&pool, v4(own, 2000 + p), max, share, true))
        .collect();
    assert_eq!(mine.iter().filter(|t| t.place.spared()).count(), 4);
    // The client, behind the NAT: the address's 4 are held, it waits.
    let client = answered(&pool, v4(nat, 3000), max, share, true);
    assert!(!client.place.spared());
    // The attacker hands one of its 4 over: ends it, opens the next.
    let first = &at_nat[0];
    pool.release(first.id, &first.place);
    let client_spared = client.place.spared();
    let next = answered(&pool, v4(nat, 1004), max, share, true);
    let next_spared = next.place.spared();
    println!(
        "shields {shields}: client spared {client_spared}, attacker's next spared {next_spared}"
    );
    (client_spared, next_spared)
}

/// R19-3 (MEDIUM, certless: hosts behind NAT addresses where two or more
/// of the gateway's clients verified within `known_for`: a carrier's
/// CGNAT pool, share/8 such addresses, 313 with the defaults, 8 for a
/// share of 64; a botnet on that carrier, or the attacker's own devices
/// reconnecting through the pool). A handshake from an exact address
/// is known as the identities that verified from it
/// (`identities_here`), whoever sends it: a host behind a NAT address
/// that never held a certificate is one of the NAT's users. Since
/// d844bff a shared address's spared handshakes have no per-network (or
/// per-/24) part: only the address's 4 and each identity present's
/// share/8, charged to the NAT's users, never to the attacker (it has
/// no identity). So certless hosts at share/8 shared addresses, all in
/// one /16, hold the share's whole spared half, and every known client
/// anywhere else, at its own address, is spared nothing: of a busy
/// client's 4 at once under a certless flood (the reviews' `flood`),
/// 20 of 80 complete (the newest of each round), not 80. Before d844bff
/// shared places were 8 per /16 (`KNOWN_SPARED_SHARED_PER_NETWORK`):
/// the same needed share/16 networks of NAT addresses. README promises
/// the spared half to "several certificates" ("Several certificates ...
/// still hold what four identities may: a /16's 16, or the spared half")
/// and "attackers holding one place each from many /24s or /64s keep
/// out new sources at worst, never the clients already served"; it
/// states no such bound for certless hosts at NAT addresses. Control:
/// the same certless hosts at as many single-user NAT addresses of the
/// /16 (one identity verified at each): the /24's 8 and the /16's 16,
/// and the client keeps its 4, 80 of 80.
#[test]
fn r19_3_certless_hosts_at_shared_nat_addresses_of_one_16_hold_the_spared_half() {
    // Fixed: shared places hold 8 per network and a quarter of the share
    // in all; single-identity addresses keep the rest. Before: the
    // spared half, the client 20 of 80 (1250 at the defaults).
    let (held, client) = r19_3(true, 256, 64);
    assert_eq!(held, 8, "the /16's 8 shared places");
    assert_eq!(client, (80, 20), "a client elsewhere keeps its 4");
    let (held, client) = r19_3(false, 256, 64);
    assert_eq!(held, 8, "control: the /24's 8 (all 8 addresses in one /24)");
    assert_eq!(client, (80, 20), "control: the client keeps its 4");
    // The defaults (10000 connections, a share of 2500): 313 addresses.
    let (held, client) = r19_3(true, 10_000, 2500);
    assert_eq!(held, 8, "the /16's 8 shared places");
    assert_eq!(client, (80, 20), "a client elsewhere keeps its 4");
    let (held, client) = r19_3(false, 10_000, 2500);
    assert_eq!(held, 16, "control: the /16's 16");
    assert_eq!(client, (80, 20), "control: the client keeps its 4");
}

fn r19_3(shared: bool, max: usize, share: usize) -> (usize, (usize, usize)) {
    let pool = Pool::new("edge");
    // 4 per address fill the spared half.
    let addresses = (share / 2).div_ceil(4);
    let cgnat = |k: usize| [100, 64, (k / 250) as u8, 1 + (k % 250) as u8];
    for k in 0..addresses {
        let ip = IpAddr::from(cgnat(k));
        // The carrier's customers who use the gateway, verified from the
        // address within `known_for`; the attacker never verified.
        pool.served_as(ip, &format!("spiffe://example.internal/user-{k}"));
        if shared {
            pool.served_as(ip, &format!("spiffe://example.internal/user-{k}-too"));
        }
    }
    let attacker: Vec<Taken> = (0..addresses)
        .flat_map(|k| (0..4u16).map(move |p| v4(cgnat(k), 1000 + p)))
        .map(|c| answered(&pool, c, max, share, true))
        .collect();
    let held = attacker.iter().filter(|t| t.place.spared()).count();
    let home = [10, 1, 9, 7];
    pool.served_as(IpAddr::from(home), VICTIM);
    let started = Instant::now();
    let result = flood(&pool, home, max, share);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "within the turn"
    );
    assert!(
        attacker.iter().filter(|t| t.place.spared()).all(live),
        "the attacker's spared places all held"
    );
    println!(
        "shared {shared}, share {share}: certless spared {held} of {}; client {result:?} (of 80, of 20)",
        attacker.len()
    );
    (held, result)
}

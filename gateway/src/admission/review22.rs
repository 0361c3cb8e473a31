//! Attacker review 22 of admission after 0f8913b (the known table's room
//! judged before an identity at its quota gives an entry up; exempt
//! sources known; a full table gives way only to a stale entry). Each
//! test asserts the HARM on the reviewed code, next to a control without
//! the attack: both are LOW bounds README states.
//!
//! Run: `cargo test -p gateway --lib admission::review22 -- --nocapture`

use super::*;

fn settings(max_known: u32, known_per_identity: u32) -> AdmissionSettings {
    AdmissionSettings {
        kernel_block_list: false,
        pin: false,
        max_known,
        known_per_identity,
        known_for: Duration::from_secs(100),
        ..AdmissionSettings::default()
    }
}

fn v6(net: u16, lan: u16, host: u16) -> IpAddr {
    IpAddr::from([0x2001, 0xdb8, net, lan, 0, 0, 0, host])
}

/// R22-1 (LOW, one holder of an identity at its known quota, a shared
/// one such as a fleet's SPIFFE ID, verifying from an IPv6 /64 whose
/// known entry already holds `SLOTS` (8) addresses of 8 other
/// identities, each its last and recent: an office LAN, a hosting /64).
/// R21-2's fix judges the *table's* room before the quota gives anything
/// up, but not the *entry's*: `Sources::remember` skips the table check
/// for an existing entry, `has_room` gives up the identity's least
/// recently verified entry of its largest network (`displace`), then
/// `Known::place` finds every slot another identity's last and recent
/// and returns None: a client already served loses its exact address's
/// privileges and no one is remembered in its place. Attack: the fleet
/// holds its quota (8, 2 in each of 4 /48s), verifies from the full /64:
/// 7 of its 8 clients still verified at their address, the newcomer not.
/// Control: the same /64 with 7 identities (room for the newcomer): 7 of
/// 8 and the newcomer, the stated max-min trade; what a fix gives when
/// the newcomer cannot be placed: 8 of 8.
#[test]
fn r22_1_at_a_full_entry_the_quota_gives_up_a_client_and_remembers_no_one() {
    assert_eq!(r22_1(8), (7, false), "a client given up for no one");
    assert_eq!(r22_1(7), (7, true), "control: the newcomer takes it");
}

/// (the fleet's 8 clients still verified at their address, the
/// fleet's newcomer known) with `others` identities in the office /64.
fn r22_1(others: u16) -> (usize, bool) {
    let s = settings(64, 8);
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let mut t = admission.tables();
    let now = Instant::now();
    let fleet = "spiffe://example.internal/fleet";
    let clients: Vec<IpAddr> = (0..8u16).map(|i| v6(i / 2, i, 1)).collect();
    for c in &clients {
        t.sources.verified("edge", *c, fleet, &s, now);
    }
    // The office /64, in a /48 new to the fleet.
    for h in 0..others {
        t.sources.verified(
            "edge",
            v6(9, 0, 100 + h),
            &format!("spiffe://example.internal/office-{h}"),
            &s,
            now,
        );
    }
    let newcomer = v6(9, 0, 1);
    t.sources.verified("edge", newcomer, fleet, &s, now);
    let still = clients
        .iter()
        .filter(|c| t.sources.verified_here("edge", **c, &s, now))
        .count();
    let known = t.sources.verified_here("edge", newcomer, &s, now);
    println!(
        "{others} identities in the /64: {still} of 8 clients still verified, newcomer known {known}, entries {}",
        t.sources.lens()[3]
    );
    (still, known)
}

/// R22-2 (LOW, docs and small listeners; one certificate some route
/// allows, at one address of its own). README: "one certificate verified
/// from many addresses or networks holds at most ... a quarter of the
/// spared half in all: the clients already served keep theirs. Several
/// certificates ... still hold what four identities may". The floors
/// (`KNOWN_SPARED_PER_SOURCE`: an identity's quarter at least 4, the
/// spared half at least 4) make one identity's quarter the whole spared
/// half at a share of 8 or less (the default share of a listener of
/// `max_connections` 32 or less), and half of it below 16: one
/// certificate at one address holds every spared place, and every
/// client served before is spared nothing. Attack: share 8 (max 256), the
/// attacker's 4 handshakes at one address, then a known client's 4 at
/// its own address elsewhere: 4 and 0 spared, and under the reviews'
/// flood the client completes 20 of its 80 (0 of its 20 firsts).
/// Controls: the same share without the attacker, the client's 4 spared
/// and 80 of 80; share 64 (max 256) with it: 4 and 4 spared, 80 of 80.
#[test]
fn r22_2_at_a_small_share_one_certificate_holds_the_whole_spared_half() {
    let (attacker, client, flood) = r22_2(256, 8, true);
    assert_eq!(
        (attacker, client),
        (4, 0),
        "one certificate: every spared place"
    );
    assert!(flood.0 <= 30, "the client under the flood: {flood:?}");
    let (_, client, flood) = r22_2(256, 8, false);
    assert_eq!(client, 4, "control: without the attacker, the client's 4");
    assert_eq!(
        flood,
        (80, 20),
        "control: the same share without the attacker"
    );
    let (attacker, client, flood) = r22_2(256, 64, true);
    assert_eq!(
        (attacker, client),
        (4, 4),
        "control: the client keeps its 4"
    );
    assert_eq!(flood, (80, 20), "control: the client under the flood");
}

/// (the attacker's handshakes spared, the client's spared, the client's
/// (of 80, of 20 firsts) under the flood) at `max`, `share`, with the
/// attacker's handshakes or without.
fn r22_2(max: usize, share: usize, attack: bool) -> (usize, usize, (usize, usize)) {
    use super::pool::Pool;
    use super::testing::{ATTACKER, VICTIM, answered, flood, v4};
    let pool = Pool::new("edge");
    let (mine, theirs) = ([198, 51, 100, 7], [192, 0, 2, 7]);
    pool.served_as(IpAddr::from(mine), ATTACKER);
    pool.served_as(IpAddr::from(theirs), VICTIM);
    let held: Vec<_> = (0..if attack { 4u16 } else { 0 })
        .map(|p| answered(&pool, v4(mine, 3000 + p), max, share, true))
        .collect();
    let client: Vec<_> = (0..4u16)
        .map(|p| answered(&pool, v4(theirs, 4000 + p), max, share, true))
        .collect();
    let spared = |v: &Vec<super::pool::Taken>| v.iter().filter(|t| t.place.spared()).count();
    let (a, c) = (spared(&held), spared(&client));
    for t in &client {
        pool.advance(t.id, &t.place, Stage::Established);
        pool.release(t.id, &t.place);
    }
    let f = flood(&pool, theirs, max, share);
    println!("share {share}, attack {attack}: attacker {a} spared, client {c} spared; flood {f:?}");
    (a, c, f)
}

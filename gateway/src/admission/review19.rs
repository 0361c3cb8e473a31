//! Attacker review 19 of admission after d844bff (the pool's spared
//! rules with no per-network part at shared addresses, exempt sources
//! known, and an identity at its known quota giving up a NAT address's
//! slot to its newest co-user: `Sources::give_up`). Each test asserts
//! the HARM on the reviewed code, next to a control without the attack.
//!
//! Run: `cargo test -p gateway --lib admission::review19 -- --nocapture`

use super::testing::{ATTACKER, ATTACKER_TOO, VICTIM, VICTIM_TOO, v4};
use super::*;

/// No rate or in-flight limits per source, prefix or network: these tests
/// are about the known table and the pool, not about the limits.
fn unlimited() -> AdmissionSettings {
    AdmissionSettings {
        source_handshakes_per_second: 0,
        source_handshakes_in_flight: 0,
        prefix_handshakes_per_second: 0,
        prefix_handshakes_in_flight: 0,
        network_handshakes_per_second: 0,
        network_handshakes_in_flight: 0,
        kernel_block_list: false,
        pin: false,
        ..AdmissionSettings::default()
    }
}

/// A connection admitted (evicting or not) as a listener would; None
/// when refused.
fn admit_at(
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
    assert_eq!(
        r19_1(Next::SecondCertificateFull),
        (None, false, false),
        "the NAT's users forgotten, not spared, refused"
    );
    assert_eq!(
        r19_1(Next::CoUserFull),
        (None, false, false),
        "the older co-user, with room, is never tried"
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
    let mut s = unlimited();
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

//! Admission as a whole: limits, strikes and blocks across the tables and
//! the pool, without sockets (the end-to-end tests drive real ones).

use super::*;

fn settings() -> AdmissionSettings {
    AdmissionSettings {
        source_handshakes_per_second: 1000,
        source_handshake_burst: 1000,
        source_handshakes_in_flight: 2,
        block_after: 3,
        kernel_block_list: false,
        // The long horizon is tested on its own (`sources`).
        prefix_spread_block_after: 0,
        network_spread_block_after: 0,
        ..AdmissionSettings::default()
    }
}

fn client(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// Admission's own series, as `GET /metrics` serves them.
fn admission_metrics(admission: &Arc<Admission>) -> String {
    let admission = admission.clone();
    crate::metrics::render_with(move |out| admission.render_metrics(out))
}

/// The gateway's series without listeners, routes or admission's own.
fn all_metrics(metrics: Arc<Metrics>) -> String {
    crate::metrics::render_alone(metrics)
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

#[test]
fn failed_handshakes_block_their_source_and_only_it() {
    let metrics = Arc::new(Metrics::default());
    let admission = Admission::new(&settings(), metrics.clone());
    let pool = admission.pool("edge");
    let bad = client("192.0.2.66", 1);
    for _ in 0..3 {
        // Admitted, and dropped before authenticating: a failed handshake.
        drop(admitted(admission.admit(&pool, 100, 100, bad, None)));
    }
    assert_eq!(
        refused(admission.admit(&pool, 100, 100, bad, None)),
        Refusal::Blocked
    );
    // The same address as an IPv4-mapped IPv6 client is the same source.
    let mapped = client("::ffff:192.0.2.66", 2);
    assert_eq!(
        refused(admission.admit(&pool, 100, 100, mapped, None)),
        Refusal::Blocked
    );
    // Its neighbour is not blocked; an authenticated client is no strike.
    let good = admitted(admission.admit(&pool, 100, 100, client("192.0.2.67", 1), None));
    good.established();
    drop(good);
    let list = admission.blocked();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].net, "192.0.2.66/32".parse::<IpNet>().unwrap());
    assert_eq!(list[0].reason, BlockReason::Strikes);
    let text = admission_metrics(&admission);
    assert!(
        text.contains("gateway_blocks_total{reason=\"strikes\",level=\"address\"} 1"),
        "{text}"
    );
    // Unblocked by hand, it is admitted again.
    assert!(admission.unblock("192.0.2.66/32".parse().unwrap()));
    admitted(admission.admit(&pool, 100, 100, bad, None)).established();
}

#[test]
fn exceeding_a_limit_is_refused_counted_and_in_the_end_blocked() {
    let metrics = Arc::new(Metrics::default());
    let admission = Admission::new(&settings(), metrics.clone());
    let pool = admission.pool("edge");
    let source = client("198.51.100.7", 1);
    let held: Vec<Ticket> = (0..2)
        .map(|_| admitted(admission.admit(&pool, 100, 100, source, None)))
        .collect();
    for _ in 0..2 {
        assert_eq!(
            refused(admission.admit(&pool, 100, 100, source, None)),
            Refusal::SourceHandshakes
        );
    }
    // The third refusal is the third strike.
    assert_eq!(
        refused(admission.admit(&pool, 100, 100, source, None)),
        Refusal::SourceHandshakes
    );
    assert_eq!(
        refused(admission.admit(&pool, 100, 100, source, None)),
        Refusal::Blocked
    );
    drop(held);
    let text = all_metrics(metrics);
    assert!(
        text.contains(
            "gateway_connections_refused_total{listener=\"edge\",reason=\"source_handshakes\"} 3"
        ),
        "{text}"
    );
    assert!(
        text.contains("gateway_connections_refused_total{listener=\"edge\",reason=\"blocked\"} 1"),
        "{text}"
    );
}

#[test]
fn exempt_sources_are_never_limited_or_blocked() {
    let s = AdmissionSettings {
        exempt: vec!["10.9.0.0/16".parse().unwrap()],
        ..settings()
    };
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let checker = client("10.9.1.1", 1);
    let held: Vec<Ticket> = (0..20)
        .map(|_| admitted(admission.admit(&pool, 100, 100, checker, None)))
        .collect();
    drop(held);
    admitted(admission.admit(&pool, 100, 100, checker, None));
    assert!(admission.blocked().is_empty());
    assert!(matches!(
        admission.block("10.9.1.0/24".parse().unwrap(), None),
        Err(AdmissionError::Exempt(_))
    ));
}

#[test]
fn a_newcomer_evicts_a_stalled_handshake() {
    let admission = Admission::new(&settings(), Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let slow = admitted(admission.admit(&pool, 2, 2, client("203.0.113.1", 1), None));
    let live = admitted(admission.admit(&pool, 2, 2, client("203.0.113.2", 1), None));
    live.hello_read();
    live.established();
    // Past the time a real ClientHello takes to come in (100 ms by default).
    std::thread::sleep(Duration::from_millis(110));
    match admission.admit(&pool, 2, 2, client("203.0.113.3", 1), None) {
        Answer::Evict { victim, .. } => assert_eq!(victim, client("203.0.113.1", 1)),
        _ => panic!("expected an eviction"),
    }
    assert!(slow.evicted_token().is_cancelled());
    assert_eq!(slow.stage(), Stage::Evicted);
    drop(slow);
    // The newcomer's ticket was dropped above: it failed, and left. A
    // handshake past its ClientHello that has gone silent on its turn
    // (past half its grace, here 20 ms) is evicted in turn; the live
    // connection never is.
    let waiting = admitted(admission.admit(&pool, 2, 2, client("203.0.113.4", 1), None));
    waiting.place().set_pace(super::progress::Pace {
        min_rate: 256,
        grace: Duration::from_millis(40),
    });
    waiting.hello_read();
    std::thread::sleep(Duration::from_millis(40));
    match admission.admit(&pool, 2, 2, client("203.0.113.5", 1), None) {
        Answer::Evict { victim, ticket } => {
            assert_eq!(victim, client("203.0.113.4", 1));
            // Nothing left to evict: the next is refused.
            ticket.established();
            assert_eq!(
                refused(admission.admit(&pool, 2, 2, client("203.0.113.6", 1), None)),
                Refusal::MaxConnections
            );
        }
        _ => panic!("expected an eviction"),
    }
    assert_eq!(live.stage(), Stage::Established);
}

#[test]
fn the_block_list_expires() {
    let admission = Admission::new(&settings(), Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    admission
        .block(
            "192.0.2.0/24".parse().unwrap(),
            Some(Duration::from_millis(50)),
        )
        .unwrap();
    assert_eq!(
        refused(admission.admit(&pool, 10, 10, client("192.0.2.200", 9), None)),
        Refusal::Blocked
    );
    std::thread::sleep(Duration::from_millis(80));
    admission.tick();
    assert!(admission.blocked().is_empty());
    admitted(admission.admit(&pool, 10, 10, client("192.0.2.200", 9), None)).established();
}

#[test]
fn an_evicted_handshake_is_no_strike() {
    // One strike would block: the evicted source is admitted again.
    let s = AdmissionSettings {
        block_after: 1,
        ..settings()
    };
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let nat = client("203.0.113.9", 1);
    for port in 2..6 {
        let victim = admitted(admission.admit(&pool, 1, 1, nat, None));
        // Overdue at once (no grace), but held to no minimum rate: to be
        // evicted, and not for slowness.
        victim.place().set_pace(super::progress::Pace {
            min_rate: 0,
            grace: Duration::ZERO,
        });
        let newcomer = admitted(admission.admit(&pool, 1, 1, client("198.51.100.9", port), None));
        assert_eq!(victim.stage(), Stage::Evicted);
        drop(victim);
        newcomer.established();
    }
    assert!(admission.blocked().is_empty(), "{:?}", admission.blocked());
    admitted(admission.admit(&pool, 10, 10, nat, None)).established();
}

#[test]
fn an_authenticated_handshake_pays_back_a_strike_of_its_address() {
    let admission = Admission::new(&settings(), Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let nat = client("192.0.2.80", 1);
    let fail = || drop(admitted(admission.admit(&pool, 100, 100, nat, None)));
    let succeed = |times: usize| {
        let ok = admitted(admission.admit(&pool, 100, 100, nat, None));
        ok.established();
        for _ in 0..times {
            ok.served("spiffe://example.internal/client");
        }
    };
    // block_after = 3: failures, each followed by a success with a
    // verified certificate, never add up.
    for _ in 0..10 {
        fail();
        succeed(1);
    }
    assert!(admission.blocked().is_empty(), "{:?}", admission.blocked());
    // One handshake pays back one strike, however often it is told.
    fail();
    fail();
    succeed(3);
    fail();
    assert!(admission.blocked().is_empty());
    fail();
    assert_eq!(
        refused(admission.admit(&pool, 100, 100, nat, None)),
        Refusal::Blocked
    );
    // Established without a verified certificate (mode = "off") pays back
    // nothing: two failures and such a success, then a failure, block.
    let other = client("192.0.2.81", 1);
    for _ in 0..2 {
        drop(admitted(admission.admit(&pool, 100, 100, other, None)));
    }
    admitted(admission.admit(&pool, 100, 100, other, None)).established();
    drop(admitted(admission.admit(&pool, 100, 100, other, None)));
    assert_eq!(
        refused(admission.admit(&pool, 100, 100, other, None)),
        Refusal::Blocked
    );
}

/// One failed handshake from `source`.
fn fail_once(admission: &Arc<Admission>, pool: &Arc<Pool>, source: SocketAddr) {
    drop(admitted(
        admission.admit(pool, 100_000, 100_000, source, None),
    ));
}

#[test]
fn an_attacker_spread_over_a_48_gets_the_48_blocked() {
    let metrics = Arc::new(Metrics::default());
    let admission = Admission::new(&settings(), metrics.clone());
    let pool = admission.pool("edge");
    // One failed handshake from each of 1600 /64s of one /48: no address
    // and no /64 comes near its own limit.
    for i in 0..1600u32 {
        let source = client(&format!("2001:db8:77:{i:x}::1"), 1);
        fail_once(&admission, &pool, source);
    }
    let list = admission.blocked();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].net, "2001:db8:77::/48".parse::<IpNet>().unwrap());
    assert_eq!(
        refused(admission.admit(&pool, 10, 10, client("2001:db8:77:ffff::9", 1), None)),
        Refusal::Blocked
    );
    // The next /48 is someone else.
    admitted(admission.admit(&pool, 10, 10, client("2001:db8:78::1", 1), None)).established();
    let text = admission_metrics(&admission);
    for series in [
        "gateway_blocks_total{reason=\"strikes\",level=\"network\"} 1",
        "gateway_blocks_total{reason=\"strikes\",level=\"address\"} 0",
        "gateway_blocked_sources{reason=\"strikes\",level=\"network\"} 1",
    ] {
        assert!(text.contains(series), "{series}\n{text}");
    }
}

#[test]
fn addresses_of_a_24_that_strike_together_get_the_24_blocked_and_their_own_blocks_fold_in() {
    let admission = Admission::new(&settings(), Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    // Three strikes block an address; 400 strikes among the /24's
    // addresses block the /24, which takes their entries' place.
    for _ in 0..3 {
        fail_once(&admission, &pool, client("198.51.100.1", 1));
    }
    assert_eq!(admission.blocked().len(), 1);
    for i in 0..198u32 {
        let source = client(&format!("198.51.100.{}", 2 + i), 1);
        fail_once(&admission, &pool, source);
        fail_once(&admission, &pool, source);
    }
    assert_eq!(admission.blocked().len(), 1);
    fail_once(&admission, &pool, client("198.51.100.240", 1));
    let list = admission.blocked();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].net, "198.51.100.0/24".parse::<IpNet>().unwrap());
    assert_eq!(
        refused(admission.admit(&pool, 10, 10, client("198.51.100.250", 1), None)),
        Refusal::Blocked
    );
    admitted(admission.admit(&pool, 10, 10, client("198.51.101.1", 1), None)).established();
}

#[test]
fn a_flood_of_new_sources_does_not_wipe_a_striking_one() {
    let s = AdmissionSettings {
        max_tracked: 100,
        ..settings()
    };
    let metrics = Arc::new(Metrics::default());
    let admission = Admission::new(&s, metrics.clone());
    let pool = admission.pool("edge");
    let striker = client("2001:db8:bad::1", 1);
    fail_once(&admission, &pool, striker);
    fail_once(&admission, &pool, striker);
    // One connect from each of 10,000 /64s in as many /48s, each a
    // failed handshake: the tables are full of entries with strikes.
    let mut refusals: HashMap<&'static str, u32> = HashMap::new();
    for i in 0..10_000u32 {
        let source = client(&format!("2001:{:x}:{:x}::1", 0x1000 + i / 1000, i), 1);
        match admission.admit(&pool, 100_000, 100_000, source, None) {
            Answer::Refuse(r) => *refusals.entry(r.label()).or_default() += 1,
            other => drop(admitted(other)),
        }
    }
    assert!(refusals["max_tracked"] >= 9_800, "{refusals:?}");
    // Its third strike still blocks it.
    fail_once(&admission, &pool, striker);
    assert_eq!(
        refused(admission.admit(&pool, 10, 10, striker, None)),
        Refusal::Blocked
    );
    let text = all_metrics(metrics);
    assert!(
        text.contains(
            "gateway_connections_refused_total{listener=\"edge\",reason=\"max_tracked\"}"
        ),
        "{text}"
    );
}

#[test]
fn a_range_made_exempt_by_a_reload_is_unblocked() {
    let admission = Admission::new(&settings(), Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    for _ in 0..3 {
        fail_once(&admission, &pool, client("10.9.1.1", 1));
    }
    admission
        .block("10.9.0.0/16".parse().unwrap(), None)
        .unwrap();
    admission
        .block("10.10.0.1/32".parse().unwrap(), None)
        .unwrap();
    assert_eq!(admission.blocked().len(), 3);
    let s = AdmissionSettings {
        exempt: vec!["10.9.1.0/24".parse().unwrap()],
        ..settings()
    };
    admission.configure(&s, &[]);
    // Inside it, and covering it: gone; elsewhere: kept.
    let list: Vec<IpNet> = admission.blocked().iter().map(|b| b.net).collect();
    assert_eq!(list, vec!["10.10.0.1/32".parse::<IpNet>().unwrap()]);
    admitted(admission.admit(&pool, 10, 10, client("10.9.1.1", 1), None)).established();
}

/// An attacker holds its /24's shared in-flight places; its neighbour,
/// refused for the prefix's limit again and again, is not struck for it
/// (it exceeded nothing of its own), so it is never blocked. The prefix
/// is struck instead, each address lending at most `block_after` strikes
/// a window: enough addresses block the /24, attacker included.
#[test]
fn a_neighbour_refused_for_its_prefix_limit_is_not_struck() {
    let s = AdmissionSettings {
        source_handshakes_in_flight: 2,
        prefix_handshakes_in_flight: 2,
        block_after: 3,
        prefix_block_after: 6,
        network_block_after: 0,
        ..settings()
    };
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let attacker = client("10.9.0.66", 1);
    let neighbour = client("10.9.0.7", 1);
    let held: Vec<Ticket> = (0..2)
        .map(|_| admitted(admission.admit(&pool, 100, 100, attacker, None)))
        .collect();
    for _ in 0..5 {
        assert_eq!(
            refused(admission.admit(&pool, 100, 100, neighbour, None)),
            Refusal::PrefixHandshakes
        );
    }
    assert_eq!(admission.tables().sources.strikes(neighbour.ip()), 0);
    for t in held {
        t.established();
    }
    admitted(admission.admit(&pool, 100, 100, neighbour, None)).established();
    assert!(admission.blocked().is_empty(), "{:?}", admission.blocked());
    // The neighbour lends the prefix at most block_after (3) strikes a
    // window: alone it never gets its /24 blocked, however often refused.
    let held: Vec<Ticket> = (0..2)
        .map(|_| admitted(admission.admit(&pool, 100, 100, attacker, None)))
        .collect();
    for _ in 0..5 {
        assert_eq!(
            refused(admission.admit(&pool, 100, 100, neighbour, None)),
            Refusal::PrefixHandshakes
        );
    }
    assert!(admission.blocked().is_empty(), "{:?}", admission.blocked());
    // A second address refused for the same cap lends its own: the
    // prefix's sixth strike blocks the /24, attacker included.
    let other = client("10.9.0.8", 1);
    for _ in 0..3 {
        assert_eq!(
            refused(admission.admit(&pool, 100, 100, other, None)),
            Refusal::PrefixHandshakes
        );
    }
    let list: Vec<IpNet> = admission.blocked().iter().map(|b| b.net).collect();
    assert_eq!(list, vec!["10.9.0.0/24".parse::<IpNet>().unwrap()]);
    drop(held);
}

/// A reload changes the prefix length while handshakes are in flight: they
/// end in the groups they were counted in, so the old /24 is not left
/// holding places no one holds (which would refuse it for good).
#[test]
fn a_reload_of_the_prefix_length_leaves_no_handshake_counted_in_flight() {
    let s = AdmissionSettings {
        prefix_handshakes_in_flight: 2,
        prefix_block_after: 0,
        network_block_after: 0,
        block_after: 1000,
        ..settings()
    };
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let t1 = admitted(admission.admit(&pool, 100, 100, client("10.3.0.1", 1), None));
    let t2 = admitted(admission.admit(&pool, 100, 100, client("10.3.0.2", 1), None));
    let s25 = AdmissionSettings {
        ipv4_prefix: 25,
        ..s.clone()
    };
    admission.configure(&s25, &[]);
    t1.established();
    drop(t2);
    admission.configure(&s, &[]);
    for i in 0..2 {
        admitted(admission.admit(&pool, 100, 100, client("10.3.0.99", i), None)).established();
    }
    // And the /25 (counted nothing) did not go below zero for anyone.
    admission.configure(&s25, &[]);
    let held: Vec<Ticket> = (0..2)
        .map(|i| admitted(admission.admit(&pool, 100, 100, client("10.3.0.5", i), None)))
        .collect();
    assert_eq!(
        refused(admission.admit(&pool, 100, 100, client("10.3.0.6", 1), None)),
        Refusal::PrefixHandshakes
    );
    drop(held);
}

/// A handshake admitted before a reload made its source exempt fails
/// after it: no strike, no block (in or covering an exempt range).
#[test]
fn a_source_made_exempt_while_in_its_handshake_is_not_blocked() {
    let s = AdmissionSettings {
        block_after: 1,
        ..settings()
    };
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let t = admitted(admission.admit(&pool, 100, 100, client("10.7.7.7", 1), None));
    let exempt = AdmissionSettings {
        exempt: vec!["10.7.0.0/16".parse().unwrap()],
        ..s.clone()
    };
    admission.configure(&exempt, &[]);
    drop(t);
    assert!(admission.blocked().is_empty(), "{:?}", admission.blocked());
    admitted(admission.admit(&pool, 100, 100, client("10.7.7.7", 1), None)).established();
}

/// A block due for an address inside an exempt range is not made, even
/// when its strikes were counted before the range became exempt.
#[test]
fn no_block_lands_inside_an_exempt_range() {
    let s = AdmissionSettings {
        block_after: 2,
        ..settings()
    };
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let mut t = admission.tables();
    let exempt = AdmissionSettings {
        exempt: vec!["10.8.0.0/16".parse().unwrap()],
        ..s.clone()
    };
    admission.block_locked(
        &mut t,
        Level::Address,
        "10.8.1.1/32".parse().unwrap(),
        &exempt,
        Instant::now(),
    );
    assert!(t.blocked.list().is_empty());
}

/// An attacker holds the tables of addresses and prefixes busy (a strike
/// per entry, renewed within each window): a new source from elsewhere is
/// still admitted, tracked by its network alone and held to its limits;
/// it is not refused for `max_tracked`.
#[test]
fn a_table_held_busy_by_an_attacker_does_not_refuse_new_sources() {
    let s = AdmissionSettings {
        max_tracked: 200,
        network_handshakes_in_flight: 2,
        ..settings()
    };
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    for i in 0..200u32 {
        let attacker = format!("10.{}.{}.1", 4 + i / 50, i % 50);
        drop(admitted(admission.admit(
            &pool,
            1000,
            1000,
            client(&attacker, 1),
            None,
        )));
    }
    assert_eq!(admission.tables().sources.lens(), [200, 200, 4, 0]);
    for round in 0..3 {
        let new = client(&format!("192.0.2.{}", round + 1), 1);
        let t = admitted(admission.admit(&pool, 1000, 1000, new, None));
        t.established();
        t.served("spiffe://example.internal/client");
    }
    // Tracked by its network: its cap holds, and a place is given back
    // when a handshake ends.
    let held: Vec<Ticket> = (0..2)
        .map(|i| admitted(admission.admit(&pool, 1000, 1000, client("192.0.7.1", i), None)))
        .collect();
    assert_eq!(
        refused(admission.admit(&pool, 1000, 1000, client("192.0.8.1", 1), None)),
        Refusal::NetworkHandshakes
    );
    held[0].established();
    admitted(admission.admit(&pool, 1000, 1000, client("192.0.8.1", 1), None)).established();
    drop(held);
}

/// One address with one certificate alternates a failed and an
/// authenticated handshake: its own strikes are paid back, and it lends
/// its /24 at most `block_after` of them a window (below the prefix's
/// threshold), so its neighbours are never blocked for what it alone did.
#[test]
fn one_address_paying_back_its_strikes_never_gets_its_24_blocked() {
    let s = AdmissionSettings {
        block_after: 3,
        prefix_block_after: 4,
        network_block_after: 5,
        ..settings()
    };
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let x = client("10.50.1.1", 1);
    for _ in 0..50 {
        fail_once(&admission, &pool, x);
        let t = admitted(admission.admit(&pool, 100, 100, x, None));
        t.established();
        t.served("spiffe://example.internal/client");
    }
    assert!(admission.blocked().is_empty(), "{:?}", admission.blocked());
    // Two addresses of it failing together still get it blocked.
    fail_once(&admission, &pool, client("10.50.1.2", 1));
    let list: Vec<IpNet> = admission.blocked().iter().map(|b| b.net).collect();
    assert_eq!(list, vec!["10.50.1.0/24".parse::<IpNet>().unwrap()]);
}

/// An attacker spread over many networks (cheap in IPv6: a /32 holds
/// 65536 /48s) holds every table full of busy entries: a new source is
/// refused (`max_tracked`, fail closed), but a source whose handshake
/// authenticated with a verified certificate lately still gets in, held to
/// its own limits, until `known_for` has passed.
#[test]
fn a_known_client_is_admitted_past_a_networks_table_full_of_attackers() {
    let s = AdmissionSettings {
        max_tracked: 64,
        source_handshakes_in_flight: 2,
        ..settings()
    };
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    // The client authenticated once, before the attack.
    let known = client("2001:db8:aaaa::7", 1);
    let t = admitted(admission.admit(&pool, 1000, 1000, known, None));
    t.established();
    t.served("spiffe://example.internal/client");
    drop(t);
    // One failed handshake from each of many /48s of one /32: each entry
    // holds a strike, so none may be forgotten.
    let mut refused_attackers = 0;
    for i in 0..200u32 {
        let attacker = client(&format!("2001:db8:{:x}::1", 0x100 + i), 1);
        match admission.admit(&pool, 1000, 1000, attacker, None) {
            Answer::Refuse(Refusal::MaxTracked) => refused_attackers += 1,
            a => drop(admitted(a)),
        }
    }
    assert!(refused_attackers > 100, "{refused_attackers}");
    // A new source is refused: the table cannot tell it from the attack.
    assert_eq!(
        refused(admission.admit(&pool, 1000, 1000, client("2001:db8:bbbb::1", 1), None)),
        Refusal::MaxTracked
    );
    // The known one gets in, and its own cap holds.
    let held: Vec<Ticket> = (0..2)
        .map(|i| {
            let from = SocketAddr::new(known.ip(), 2 + i);
            admitted(admission.admit(&pool, 1000, 1000, from, None))
        })
        .collect();
    assert_eq!(
        refused(admission.admit(&pool, 1000, 1000, known, None)),
        Refusal::SourceHandshakes
    );
    for t in &held {
        t.established();
        t.served("spiffe://example.internal/client");
    }
    drop(held);
    let text = admission_metrics(&admission);
    assert!(
        text.contains("gateway_admission_tracked{table=\"known\"} 1"),
        "{text}"
    );
}

/// Known handshakes show on `/metrics`, spared or waiting: what an
/// operator under a flood reads to see whether clients served before
/// still have their places.
#[test]
fn known_handshakes_are_counted_spared_and_waiting() {
    let s = AdmissionSettings {
        source_handshakes_in_flight: 16,
        ..settings()
    };
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let known = client("192.0.2.7", 1);
    let t = admitted(admission.admit(&pool, 1000, 1000, known, None));
    t.established();
    t.served("spiffe://example.internal/client");
    drop(t);
    // Six at once from the known address: its 4 spared, 2 waiting.
    let held: Vec<Ticket> = (0..6)
        .map(|i| admitted(admission.admit(&pool, 1000, 1000, client("192.0.2.7", 10 + i), None)))
        .collect();
    let text = admission_metrics(&admission);
    assert!(
        text.contains("gateway_known_handshakes_in_flight{listener=\"edge\",spared=\"true\"} 4"),
        "{text}"
    );
    assert!(
        text.contains("gateway_known_handshakes_in_flight{listener=\"edge\",spared=\"false\"} 2"),
        "{text}"
    );
    drop(held);
    let text = admission_metrics(&admission);
    assert!(
        text.contains("gateway_known_handshakes_in_flight{listener=\"edge\",spared=\"true\"} 0"),
        "{text}"
    );
}

/// A handshake evicted when already below the minimum rate (its cut for
/// slowness was due, its watch late: under load the very ones eviction
/// picks) is struck as that cut would have struck it; one evicted while
/// still within its pace is not, so a newcomer cannot get its victim's
/// source struck.
#[test]
fn an_eviction_strikes_only_a_handshake_already_below_the_minimum_rate() {
    let admission = Admission::new(&settings(), Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let slow = client("10.70.0.1", 1);
    let young = client("10.71.0.1", 1);
    // Unmeasured (no socket): judged as sending nothing. The default pace
    // (256 bytes/s after a 2-s grace) puts it below the rate past 2 s.
    let late = admitted(admission.admit(&pool, 2, 2, slow, None));
    std::thread::sleep(Duration::from_millis(2300));
    let fresh = admitted(admission.admit(&pool, 2, 2, young, None));
    let evicted = |newcomer: &str| match admission.admit(&pool, 2, 2, client(newcomer, 1), None) {
        Answer::Evict { victim, ticket } => {
            ticket.established();
            (victim, ticket)
        }
        Answer::Admit(_) => panic!("admitted without eviction"),
        Answer::Refuse(r) => panic!("refused: {r:?}"),
    };
    let (victim, _first) = evicted("10.72.0.1");
    assert_eq!(victim, slow);
    drop(late);
    assert_eq!(admission.tables().sources.strikes(slow.ip()), 1);
    // The young one is evicted too (once past the time a real ClientHello
    // takes to come in), within its pace: no strike.
    std::thread::sleep(Duration::from_millis(150));
    let (victim, _second) = evicted("10.73.0.1");
    assert_eq!(victim, young);
    drop(fresh);
    assert_eq!(admission.tables().sources.strikes(young.ip()), 0);
}

/// Past `networks_per_allocation`, a new network of the same IPv6 /32 is
/// refused, counted by its own reason; another /32 is admitted.
#[test]
fn networks_past_their_allocations_quota_are_refused_and_counted() {
    let metrics = Arc::new(Metrics::default());
    let s = AdmissionSettings {
        networks_per_allocation: 2,
        ..settings()
    };
    let admission = Admission::new(&s, metrics.clone());
    let pool = admission.pool("edge");
    for net in ["2001:db8:1::1", "2001:db8:2::1"] {
        // A failed handshake: a strike keeps the entry.
        drop(admitted(admission.admit(
            &pool,
            100,
            100,
            client(net, 1),
            None,
        )));
    }
    assert_eq!(
        refused(admission.admit(&pool, 100, 100, client("2001:db8:3::1", 1), None)),
        Refusal::NetworksPerAllocation
    );
    admitted(admission.admit(&pool, 100, 100, client("2001:db9:3::1", 1), None)).established();
    let text = all_metrics(metrics);
    assert!(
        text.contains(
            "gateway_connections_refused_total{listener=\"edge\",reason=\"networks_per_allocation\"} 1"
        ),
        "{text}"
    );
}

/// A source evicted once is not barred from evicting in turn (the budget
/// is the evicting source's, `pool`), known or not: an allowed client
/// evicted in a stall of its own must not have the next clients of its
/// address refused while the listener is full.
#[test]
fn a_known_source_evicted_once_still_evicts_for_its_next_clients() {
    let admission = Admission::new(&settings(), Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let allowed = "10.80.0.1";
    let t = admitted(admission.admit(&pool, 100, 100, client(allowed, 1), None));
    t.established();
    t.served("spiffe://example.internal/client");
    drop(t);
    let unknown = "10.81.0.1";
    // The listener (2 places) full: the allowed client's handshake is
    // evicted by an attacker's, and so is one of the unknown source's.
    let overdue = |t: &Ticket| {
        t.place().set_pace(super::progress::Pace {
            min_rate: 0,
            grace: Duration::ZERO,
        });
    };
    let a = admitted(admission.admit(&pool, 2, 2, client(allowed, 2), None));
    let b = admitted(admission.admit(&pool, 2, 2, client(unknown, 2), None));
    overdue(&a);
    overdue(&b);
    let mut attackers = Vec::new();
    for i in 0..2u16 {
        match admission.admit(&pool, 2, 2, client(&format!("10.82.0.{}", 1 + i), 1), None) {
            Answer::Evict { ticket, .. } => attackers.push(ticket),
            _ => panic!("no eviction"),
        }
    }
    assert_eq!(a.stage(), Stage::Evicted);
    assert_eq!(b.stage(), Stage::Evicted);
    for t in &attackers {
        overdue(t);
    }
    // Both sources evict in turn at once.
    let mut kept = Vec::new();
    for source in [unknown, allowed] {
        match admission.admit(&pool, 2, 2, client(source, 3), None) {
            Answer::Evict { ticket, .. } => {
                ticket.established();
                kept.push(ticket);
            }
            Answer::Admit(_) => panic!("admitted without eviction"),
            Answer::Refuse(r) => panic!("{source} was refused: {r:?}"),
        };
    }
    for t in &attackers {
        t.established();
    }
}

/// A handshake evicted in the instant it completed (the handshake won the
/// race in the connection's task) is not established: it holds no slot,
/// and the listener must not serve it.
#[test]
fn an_evicted_handshake_cannot_be_established() {
    let admission = Admission::new(&settings(), Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let victim = admitted(admission.admit(&pool, 1, 1, client("203.0.113.1", 1), None));
    victim.place().set_pace(super::progress::Pace {
        min_rate: 0,
        grace: Duration::ZERO,
    });
    let newcomer = admitted(admission.admit(&pool, 1, 1, client("198.51.100.1", 1), None));
    assert_eq!(victim.stage(), Stage::Evicted);
    assert!(!victim.established());
    assert_eq!(victim.stage(), Stage::Evicted);
    assert!(newcomer.established());
    assert_eq!((pool.connections(), pool.handshakes()), (1, 0));
}

/// MEDIUM 5 of the second review: a prefix blocked for its addresses'
/// strikes still admits a source known before (a verified certificate
/// within `known_for`); its unknown neighbours are refused, and so is the
/// known source when the block is its own address's or made by hand.
#[test]
fn a_prefix_blocked_for_strikes_still_admits_its_known_clients() {
    let admission = Admission::new(&settings(), Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let known = client("198.51.100.9", 1);
    let t = admitted(admission.admit(&pool, 10, 10, known, None));
    assert!(t.established());
    t.served("spiffe://example.internal/client");
    drop(t);
    for i in 0..200u32 {
        let source = client(&format!("198.51.100.{}", 20 + i), 1);
        fail_once(&admission, &pool, source);
        fail_once(&admission, &pool, source);
    }
    let list = admission.blocked();
    assert!(
        list.iter()
            .any(|b| b.net == "198.51.100.0/24".parse::<IpNet>().unwrap()),
        "{list:?}"
    );
    assert_eq!(
        refused(admission.admit(&pool, 10, 10, client("198.51.100.8", 1), None)),
        Refusal::Blocked
    );
    admitted(admission.admit(&pool, 10, 10, known, None)).established();
    // Blocked by hand, the prefix refuses everyone.
    admission
        .block("198.51.100.0/24".parse().unwrap(), None)
        .unwrap();
    assert_eq!(
        refused(admission.admit(&pool, 10, 10, known, None)),
        Refusal::Blocked
    );
}

/// MEDIUM 7 of the second review: a client that connects and closes
/// before sending a byte (a load balancer's TCP health check) is counted
/// `client_closed` but is no strike; one that sent a byte first is.
#[tokio::test]
async fn a_connect_closed_before_its_first_byte_is_no_strike() {
    use tokio::io::AsyncReadExt as _;
    let admission = Admission::new(&settings(), Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let source = client("192.0.2.30", 1);
    let closes = async |first: &[u8]| {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        let (mut s, _) = listener.accept().await.unwrap();
        let t = admitted(admission.admit(&pool, 10, 10, source, Some(&s)));
        std::io::Write::write_all(&mut c, first).unwrap();
        drop(c);
        let mut buf = [0u8; 8];
        while s.read(&mut buf).await.unwrap_or(0) > 0 {}
        t.refused(Refusal::ClientClosed);
    };
    for _ in 0..10 {
        closes(b"").await;
    }
    assert!(admission.blocked().is_empty());
    for _ in 0..3 {
        closes(b"\x16").await;
    }
    assert_eq!(
        refused(admission.admit(&pool, 10, 10, source, None)),
        Refusal::Blocked
    );
}

/// Review 7 F10: the pass for a health check is narrow. One byte then a
/// reset (no FIN: the kernel counted one byte received, as for a FIN) is
/// a strike, and so is a silent hold past a twentieth of the grace (100
/// ms, no longer than any new connection is spared eviction; a quarter
/// let a peer that inflates its round trip hold a place 500 ms for
/// nothing).
#[tokio::test]
async fn a_byte_then_a_reset_or_a_silent_hold_is_a_strike() {
    use tokio::io::AsyncReadExt as _;
    let admission = Admission::new(&settings(), Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let closes = async |source: SocketAddr, first: &[u8], hold: Duration, reset: bool| {
        let c = socket2::Socket::from(std::net::TcpStream::connect(addr).unwrap());
        let (mut s, _) = listener.accept().await.unwrap();
        let t = admitted(admission.admit(&pool, 10, 10, source, Some(&s)));
        assert_eq!(c.send(first).unwrap(), first.len());
        tokio::time::sleep(hold).await;
        if reset {
            c.set_linger(Some(Duration::ZERO)).unwrap();
        }
        drop(c);
        let mut buf = [0u8; 8];
        while s.read(&mut buf).await.unwrap_or(0) > 0 {}
        t.refused(Refusal::ClientClosed);
    };
    let reset = client("192.0.2.31", 1);
    for _ in 0..3 {
        closes(reset, b"\x16", Duration::from_millis(5), true).await;
    }
    assert_eq!(
        refused(admission.admit(&pool, 10, 10, reset, None)),
        Refusal::Blocked
    );
    let silent = client("192.0.2.32", 1);
    for _ in 0..3 {
        closes(silent, b"", Duration::from_millis(150), false).await;
    }
    assert_eq!(
        refused(admission.admit(&pool, 10, 10, silent, None)),
        Refusal::Blocked
    );
    // A check that connects and closes at once still is no strike.
    let check = client("192.0.2.33", 1);
    for _ in 0..10 {
        closes(check, b"", Duration::ZERO, false).await;
    }
    admitted(admission.admit(&pool, 10, 10, check, None));
}

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
        ..AdmissionSettings::default()
    }
}

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
    let text = {
        let admission = admission.clone();
        crate::metrics::render_with(move |out| admission.render_metrics(out))
    };
    assert!(
        text.contains("gateway_blocks_total{reason=\"strikes\"} 1"),
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
    let text = crate::metrics::Sources {
        metrics,
        registry: Arc::default(),
        reloads: Arc::default(),
        guard: None,
        admission: None,
    }
    .render();
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
fn a_newcomer_evicts_a_stalled_handshake_and_the_evicted_one_is_a_strike() {
    let admission = Admission::new(&settings(), Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let slow = admitted(admission.admit(&pool, 2, 2, client("203.0.113.1", 1), None));
    let live = admitted(admission.admit(&pool, 2, 2, client("203.0.113.2", 1), None));
    live.hello_read();
    live.established();
    match admission.admit(&pool, 2, 2, client("203.0.113.3", 1), None) {
        Answer::Evict { victim, .. } => assert_eq!(victim, client("203.0.113.1", 1)),
        _ => panic!("expected an eviction"),
    }
    assert!(slow.evicted_token().is_cancelled());
    assert_eq!(slow.stage(), Stage::Evicted);
    drop(slow);
    // Nothing left to evict: the live connection stays, the next is refused.
    // (The newcomer's ticket was dropped above: it failed, and left.)
    let waiting = admitted(admission.admit(&pool, 2, 2, client("203.0.113.4", 1), None));
    waiting.hello_read();
    assert_eq!(
        refused(admission.admit(&pool, 2, 2, client("203.0.113.5", 1), None)),
        Refusal::MaxConnections
    );
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

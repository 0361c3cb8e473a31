//! Attacker review 10 of admission (after 933e361, "Merge adm7"): the
//! findings in the source tables (R10-1 with review 7 F8, R10-2, R10-3,
//! R10-7, R10-9 to R10-12). Each test was written to show the harm and
//! now asserts the fix: what a client or an attacker sees (admitted,
//! refused and why, known or not). The pool's findings (R10-4 to R10-6,
//! R10-8) are tested with the pool.
//!
//! Run: `cargo test -p gateway --lib admission::review10 -- --nocapture`

use super::*;

fn client(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

fn v4(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
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

fn defaults() -> AdmissionSettings {
    AdmissionSettings {
        kernel_block_list: false,
        pin: false,
        ..AdmissionSettings::default()
    }
}

/// What verified a test client: its certificate's serial (one issuer).
fn proof(serial: u8) -> Proof {
    Proof {
        identity: crate::identity::Identity::default(),
        certs: vec![(b"test issuer".to_vec(), vec![serial])],
        ..Proof::default()
    }
}

/// A reload whose new CRL lists `serials` (and changes nothing else).
fn crl_reload(admission: &Admission, generation: u64, serials: &[u8]) -> usize {
    admission.revalidate(generation, |_, _, p| {
        !p.certs
            .iter()
            .any(|(_, s)| s.first().is_some_and(|s| serials.contains(s)))
    })
}

/// A full handshake as the listener makes it: authenticated, then known
/// once the registry took it, judged by the state of `judged`.
fn verify_as(
    admission: &Arc<Admission>,
    pool: &Arc<Pool>,
    from: SocketAddr,
    identity: &str,
    serial: u8,
    judged: u64,
) {
    let t = admitted(admission.admit(pool, 100_000, 100_000, from, None));
    assert!(t.established());
    assert!(t.authenticated(identity));
    t.known(identity, proof(serial), judged);
}

fn verify(admission: &Arc<Admission>, pool: &Arc<Pool>, from: SocketAddr, identity: &str) {
    verify_as(admission, pool, from, identity, 1, 0);
}

fn fail_once(admission: &Arc<Admission>, pool: &Arc<Pool>, source: SocketAddr) {
    if let Answer::Admit(t) | Answer::Evict { ticket: t, .. } =
        admission.admit(pool, 100_000, 100_000, source, None)
    {
        drop(t);
    }
}

fn here(admission: &Admission, s: &AdmissionSettings, a: SocketAddr) -> bool {
    admission
        .tables()
        .sources
        .verified_here("edge", a.ip(), s, Instant::now())
}

fn known(admission: &Admission, s: &AdmissionSettings, a: SocketAddr) -> bool {
    admission
        .tables()
        .sources
        .is_known("edge", a.ip(), s, Instant::now())
}

/// A networks table of `max_tracked` (64) full of busy attacker entries
/// (a strike each, one /48 each, no certificate).
fn flood(admission: &Arc<Admission>, pool: &Arc<Pool>) {
    for i in 0..200u32 {
        fail_once(
            admission,
            pool,
            client(&format!("2001:db9:{:x}::1", 0x100 + i), 1),
        );
    }
}

const FRONTEND: &str = "[\"uri:spiffe://example.internal/ns/shop/sa/frontend\"]";
const BATCH: &str = "[\"uri:spiffe://example.internal/ns/batch/sa/job\"]";

/// R10-1 (HIGH) and review 7 F8. A reload (the daily `gateway pki crl`
/// picked up by `watch_files`) forgets only the known sources its new
/// CRL revokes: under a networks-table flood the 20 clients served before
/// are still admitted after it; the one it revokes is refused
/// `max_tracked` (no longer known).
#[test]
fn r10_1_a_crl_refresh_during_a_flood_forgets_only_the_revoked() {
    let s = AdmissionSettings {
        max_tracked: 64,
        source_handshakes_in_flight: 2,
        ..defaults()
    };
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let frontends: Vec<SocketAddr> = (1..=20u8).map(|i| v4([192, 0, 2, i], 1)).collect();
    for (i, f) in frontends.iter().enumerate() {
        verify_as(&admission, &pool, *f, FRONTEND, i as u8 + 1, 0);
    }
    let revoked = v4([192, 0, 2, 99], 1);
    verify_as(&admission, &pool, revoked, FRONTEND, 99, 0);
    // (Their entries idle again, buckets refilled: the flood pushes them out.)
    std::thread::sleep(Duration::from_millis(50));
    flood(&admission, &pool);
    assert_eq!(
        refused(admission.admit(&pool, 1000, 1000, client("198.51.100.1", 1), None)),
        Refusal::MaxTracked
    );
    for f in frontends.iter().chain([&revoked]) {
        admitted(admission.admit(&pool, 1000, 1000, *f, None)).established();
    }
    // The daily CRL, which revokes serial 99 only, is reloaded.
    assert_eq!(crl_reload(&admission, 1, &[99]), 1);
    flood(&admission, &pool); // (the flood goes on: its entries stay busy)
    let served = frontends
        .iter()
        .filter(|f| {
            matches!(
                admission.admit(&pool, 1000, 1000, **f, None),
                Answer::Admit(_) | Answer::Evict { .. }
            )
        })
        .count();
    eprintln!("after the CRL refresh: {served} of 20 clients served before still admitted");
    assert_eq!(served, 20);
    assert!(!here(&admission, &s, revoked));
    // (auto_revert still counts it among the clients served before the
    // reload: a reload that broke the trust bundle is told by their
    // failures.)
    assert!(admission.vouched("edge", revoked.ip()));
    assert_eq!(
        refused(admission.admit(&pool, 1000, 1000, revoked, None)),
        Refusal::MaxTracked
    );
}

/// R10-2 (MEDIUM). One holder of the frontends' shared identity verifies
/// first (after a restart) from 1024 /64s of one /48: it gets a quarter
/// of the identity's quota (its network's part), and the real frontends
/// that verify after it, from another network, are remembered and
/// admitted past a flood. Review 7 F5 holds too (see review7.rs): it
/// cannot flush them either.
#[test]
fn r10_2_one_holder_of_a_shared_identity_cannot_squat_its_quota() {
    let s = AdmissionSettings {
        max_tracked: 64,
        source_handshakes_in_flight: 2,
        ..defaults()
    };
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    for i in 0..1024u32 {
        verify(
            &admission,
            &pool,
            client(&format!("2001:db8:77:{i:x}::1"), 1),
            FRONTEND,
        );
    }
    let squatted = (0..1024u32)
        .filter(|i| known(&admission, &s, client(&format!("2001:db8:77:{i:x}::1"), 1)))
        .count();
    assert_eq!(squatted, 256, "a quarter of known_per_identity (1024)");
    let frontends: Vec<SocketAddr> = (1..=20u8).map(|i| v4([192, 0, 2, i], 1)).collect();
    for f in &frontends {
        verify(&admission, &pool, *f, FRONTEND);
    }
    let remembered = frontends
        .iter()
        .filter(|f| known(&admission, &s, **f))
        .count();
    eprintln!("{remembered} of 20 frontends verified after the squat are known");
    assert_eq!(remembered, 20);
    std::thread::sleep(Duration::from_millis(50));
    flood(&admission, &pool);
    admitted(admission.admit(&pool, 1000, 1000, frontends[0], None)).established();
    // The holder's 257th /64 was not remembered.
    assert!(!known(&admission, &s, client("2001:db8:77:100::1", 1)));
}

/// R10-3 (MEDIUM). A handshake begun before a revoking reload (parked in
/// the client's turn) is verified by the old state's verifier; going live
/// after the reload, it makes its client known no more: it was judged by
/// a state older than the known sources' last judgement. One begun after
/// the reload by a client it does not revoke is remembered.
#[test]
fn r10_3_a_handshake_begun_before_a_revoking_reload_makes_no_one_known() {
    let s = defaults();
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let a = client("198.51.100.7", 1);
    verify_as(&admission, &pool, a, BATCH, 7, 0);
    // Parked: ClientHello read, the gateway's flight sent, the client's turn.
    let parked = admitted(admission.admit(&pool, 100, 100, a, None));
    parked.hello_read();
    // The reload that revokes its certificate (a new CRL), generation 1.
    crl_reload(&admission, 1, &[7]);
    assert!(!here(&admission, &s, a));
    // The client answers: the old verifier accepted it (judged at 0).
    assert!(parked.established());
    assert!(parked.authenticated(BATCH));
    parked.known(BATCH, proof(7), 0);
    assert!(
        !here(&admission, &s, a),
        "known again through a stale handshake"
    );
    assert!(!known(&admission, &s, a));
    // Another client, its handshake judged by the new state: known.
    let b = client("198.51.100.8", 1);
    verify_as(&admission, &pool, b, BATCH, 8, 1);
    assert!(here(&admission, &s, b));
}

/// R10-7 (MEDIUM where a /64 is shared). A co-tenant of the victim's /64
/// with another certificate verifies from many addresses: it takes slots
/// of its own, never the victim's, which stays verified here (vouched);
/// when the co-tenant then fails from rotating addresses until the /64
/// is blocked for strikes, the victim is still admitted.
#[test]
fn r10_7_a_co_tenant_cannot_push_the_victim_out_of_the_exact_addresses() {
    let s = AdmissionSettings {
        block_after: 3,
        prefix_block_after: 4,
        network_block_after: 5,
        ..defaults()
    };
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let laptop = client("2001:db8:1:2::10", 1);
    verify(&admission, &pool, laptop, FRONTEND);
    let mine: Vec<SocketAddr> = (1..=12)
        .map(|i| client(&format!("2001:db8:1:2::a{i:x}"), 1))
        .collect();
    for a in &mine {
        verify(&admission, &pool, *a, BATCH);
    }
    // Seven other identities take one slot each at most: the entry is
    // full, and the laptop keeps its slot.
    for i in 0..7u32 {
        verify(
            &admission,
            &pool,
            client(&format!("2001:db8:1:2::c{i:x}"), 1),
            &format!("[\"uri:spiffe://example.internal/ns/x/sa/{i}\"]"),
        );
    }
    assert!(here(&admission, &s, laptop));
    assert!(admission.vouched("edge", laptop.ip()));
    for i in 0..12u32 {
        fail_once(
            &admission,
            &pool,
            client(&format!("2001:db8:1:2::{:x}", 0x1000 + i), 1),
        );
    }
    assert!(admission.blocked().iter().any(|b| b.net.prefix_len() <= 64));
    admitted(admission.admit(&pool, 100, 100, laptop, None)).established();
}

/// R10-9 (LOW). A verification from a new address of an identity at its
/// quota costs about what a refresh does: running counts, no rebuild of
/// the identity's keys, no sum over every identity (15 000 here), under
/// the tables' lock every accept takes.
#[test]
fn r10_9_verifying_at_the_quota_costs_no_scan_under_the_tables_lock() {
    let s = defaults();
    let mut t = super::sources::Sources::new(&s);
    let now = Instant::now();
    for i in 0..15_000u32 {
        let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        t.verified("edge", ip, &format!("[\"id{i}\"]"), &s, now);
    }
    // 1024 addresses over 256 /16s: the whole quota.
    for i in 0..1024u32 {
        let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0b00_0000 + (i << 14)));
        t.verified("edge", ip, BATCH, &s, now);
    }
    assert!(t.is_known("edge", IpAddr::from([11, 255, 192, 0]), &s, now));
    // The least of five rounds each: other tests run alongside.
    let (mut at_quota, mut refresh) = (Duration::MAX, Duration::MAX);
    for round in 0..5u32 {
        let start = Instant::now();
        for i in 0..200u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(
                0x0c00_0000 + (round << 20) + (i << 12),
            ));
            t.verified("edge", ip, BATCH, &s, now);
        }
        at_quota = at_quota.min(start.elapsed() / 200);
        let start = Instant::now();
        for i in 0..200u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0b00_0000 + (i << 14)));
            t.verified("edge", ip, BATCH, &s, now);
        }
        refresh = refresh.min(start.elapsed() / 200);
    }
    // At the quota a new network's address takes the place of the least
    // recently verified of the largest network's (review 11 R11-4).
    assert!(t.is_known("edge", IpAddr::from([12, 0, 0, 0]), &s, now));
    eprintln!(
        "verified() under the tables lock: {at_quota:?} from a new address at the quota, {refresh:?} refreshing a known one"
    );
    assert!(at_quota < refresh * 4, "{at_quota:?} {refresh:?}");
}

/// R10-10 (LOW-MEDIUM) and review 7 F6. Past a flood, a certless host of
/// a known client's /64 is still admitted, but by a count of its own (the
/// /64's strangers'): holding that count's handshakes, and refused for
/// more again and again, it neither takes the known client's limits nor
/// gets the client's address blocked; its own address is blocked.
#[test]
fn r10_10_a_certless_neighbour_has_its_own_limits_past_a_flood() {
    let s = AdmissionSettings {
        max_tracked: 8,
        source_handshakes_in_flight: 2,
        ..defaults()
    };
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let laptop = client("2001:db8:5:5::10", 1);
    verify(&admission, &pool, laptop, FRONTEND);
    std::thread::sleep(Duration::from_millis(50));
    flood(&admission, &pool);
    assert_eq!(
        refused(admission.admit(&pool, 1000, 1000, client("198.51.100.1", 1), None)),
        Refusal::MaxTracked
    );
    let neighbour = client("2001:db8:5:5::bad0", 1);
    let held: Vec<Ticket> = (0..2)
        .map(|i| {
            admitted(admission.admit(
                &pool,
                1000,
                1000,
                client(&format!("2001:db8:5:5::bad{i}"), 1),
                None,
            ))
        })
        .collect();
    let mut last = Refusal::SourceHandshakes;
    for _ in 0..200 {
        last = refused(admission.admit(&pool, 1000, 1000, neighbour, None));
        if last != Refusal::SourceHandshakes {
            break;
        }
    }
    eprintln!("the certless neighbour, refused again and again: {last:?}");
    assert_eq!(last, Refusal::Blocked);
    let mine: Vec<Ticket> = (0..2)
        .map(|_| admitted(admission.admit(&pool, 1000, 1000, laptop, None)))
        .collect();
    assert!(
        !admission
            .blocked()
            .iter()
            .any(|b| b.net.contains(&laptop.ip())),
        "{:?}",
        admission.blocked()
    );
    drop((held, mine));
}

/// R10-11 (LOW-MEDIUM). Known status is per listener: a certificate
/// allowed on one listener (a partner CA on a low-value one) earns its
/// addresses nothing on another. And a reload that takes an identity out
/// of every route's `allow` of a listener ends its known status there.
#[test]
fn r10_11_known_status_is_per_listener_and_ends_with_the_allow_entry() {
    let s = AdmissionSettings {
        max_tracked: 64,
        source_handshakes_in_flight: 2,
        ..defaults()
    };
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let partners = admission.pool("partners");
    let edge = admission.pool("edge");
    let partner = v4([203, 0, 113, 5], 1);
    verify(&admission, &partners, partner, BATCH);
    let laptop = v4([192, 0, 2, 10], 1);
    verify(&admission, &edge, laptop, FRONTEND);
    assert!(!admission.vouched("edge", partner.ip()));
    assert!(admission.vouched("partners", partner.ip()));
    std::thread::sleep(Duration::from_millis(50));
    flood(&admission, &edge);
    assert_eq!(
        refused(admission.admit(&edge, 1000, 1000, partner, None)),
        Refusal::MaxTracked
    );
    admitted(admission.admit(&partners, 1000, 1000, partner, None)).established();
    admitted(admission.admit(&edge, 1000, 1000, laptop, None)).established();
    // The reload takes FRONTEND out of edge's routes (the closure stands
    // for `still_admits`, tested with real policies below).
    admission.revalidate(1, |listener, source, _| {
        !(listener == "edge" && source == laptop.ip())
    });
    flood(&admission, &edge);
    assert_eq!(
        refused(admission.admit(&edge, 1000, 1000, laptop, None)),
        Refusal::MaxTracked
    );
    admitted(admission.admit(&partners, 1000, 1000, partner, None)).established();
}

/// R10-1, R10-11: `still_admits` judges a known source against a
/// listener's new state as a handshake would: a certificate its CRL lists
/// or whose CA it no longer trusts, or an identity no route allows any
/// more, is no longer admitted; anyone else is.
#[test]
fn r10_11_still_admits_follows_crls_anchors_and_allow_entries() {
    use crate::pki::{Authority, LeafSpec};
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    let dir = tempfile::tempdir().unwrap();
    let root = Authority::root("review 10 root").unwrap();
    let other = Authority::root("review 10 other root").unwrap();
    let server = root
        .issue(&LeafSpec::server("gw", &["dns:gw.example.internal"]))
        .unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    write("server.pem", &server.cert_pem);
    write("server.key", &server.key_pem);
    std::fs::set_permissions(
        dir.path().join("server.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    write("ca.pem", &root.cert_pem);
    write("other.pem", &other.cert_pem);
    let frontend = root
        .issue(&LeafSpec::client(
            "f",
            &["spiffe://example.internal/ns/shop/sa/frontend"],
        ))
        .unwrap();
    let batch = root
        .issue(&LeafSpec::client("b", &["dns:batch.example.internal"]))
        .unwrap();
    let state = |ca: &str, crl: &[&[u8]], allow: &str| {
        write("crl.pem", &root.crl(2, crl).unwrap());
        let text = format!(
            "[[listeners]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\ncert = \"server.pem\"\n\
             key = \"server.key\"\nclient_ca = \"{ca}\"\ncrls = [\"crl.pem\"]\ncrl_expired = \"warn\"\noffload = \"userspace\"\n\
             [[listeners.routes]]\nname = \"api\"\nbackends = [\"127.0.0.1:1\"]\nallow = [{allow}]\n"
        );
        let config = crate::Config::parse(&text, &dir.path().join("g.toml"), dir.path()).unwrap();
        crate::state::State::from_config(&config).unwrap().listeners[0].clone()
    };
    let issued = state("ca.pem", &[], "\"dns:any\"");
    let proof_of = |pem: &str| {
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let identity = crate::identity::Identity::from_leaf(&der).unwrap();
        let path = issued
            .tls
            .verified_path(&issued.routes[0].auth, &der, &[])
            .unwrap();
        crate::listener::proof(&identity, &path)
    };
    let (f, b) = (proof_of(&frontend.cert_pem), proof_of(&batch.cert_pem));
    let from: IpAddr = "192.0.2.10".parse().unwrap();
    let both = "\"spiffe://example.internal/ns/shop/sa/frontend\", \"dns:batch.example.internal\"";
    // The daily CRL, revoking no one of them.
    let daily = state("ca.pem", &[b"\x01\x02"], both);
    assert!(still_admits(&daily, from, &f));
    assert!(still_admits(&daily, from, &b));
    // A CRL that revokes batch's certificate.
    let revoking = state("ca.pem", &[&batch.serial], both);
    assert!(still_admits(&revoking, from, &f));
    assert!(!still_admits(&revoking, from, &b));
    // Batch taken out of `allow`.
    let narrowed = state(
        "ca.pem",
        &[],
        "\"spiffe://example.internal/ns/shop/sa/frontend\"",
    );
    assert!(still_admits(&narrowed, from, &f));
    assert!(!still_admits(&narrowed, from, &b));
    // The CA that issued them no longer trusted.
    let other_ca = state("other.pem", &[], both);
    assert!(!still_admits(&other_ca, from, &f));
}

/// R10-12 (LOW). Admission keys an identity by its typed names: a URI SAN
/// `dns:api.internal` (a valid URI) and a DNS SAN `api.internal` are two
/// identities, each with its own share and known quota.
#[test]
fn r10_12_a_uri_san_and_a_dns_san_of_the_same_text_are_two_identities() {
    let uri = crate::identity::Identity {
        uris: vec!["dns:api.internal".into()],
        ..Default::default()
    };
    let dns = crate::identity::Identity {
        dns: vec!["api.internal".into()],
        ..Default::default()
    };
    // Logs and allow entries read them alike ...
    assert_eq!(uri.names(), dns.names());
    // ... admission does not.
    assert_ne!(uri.typed_names(), dns.typed_names());
    // So the URI holder's verifications do not use the DNS identity's
    // quota: with a quota of 2 (max_known 8), each keeps its own two.
    let s = AdmissionSettings {
        max_known: 8,
        ..defaults()
    };
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let key = |i: &crate::identity::Identity| serde_json::to_string(&i.typed_names()).unwrap();
    for n in 1..=4u8 {
        verify(&admission, &pool, v4([10, n, 0, 1], 1), &key(&uri));
    }
    verify(&admission, &pool, v4([10, 20, 0, 1], 1), &key(&dns));
    assert!(known(&admission, &s, v4([10, 20, 0, 1], 1)));
}

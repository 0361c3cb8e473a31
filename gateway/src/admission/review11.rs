//! Attacker review 11 of admission (after ad0308f, "Merge admsrc"): known
//! status per listener, judged again at each reload. Each test asserts
//! the HARM as the reviewed code has it (it passes there); a fix should
//! make it fail.
//!
//! Run: `cargo test -p gateway --lib admission::review11 -- --nocapture`

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
/// once the registry took it.
fn verify_with(
    admission: &Arc<Admission>,
    pool: &Arc<Pool>,
    from: SocketAddr,
    identity: &str,
    proof: Proof,
) {
    let t = admitted(admission.admit(pool, 100_000, 100_000, from, None));
    assert!(t.established());
    assert!(t.authenticated(identity));
    let judged = admission.tables().sources.judged();
    t.known(identity, proof, judged);
}

fn verify(admission: &Arc<Admission>, pool: &Arc<Pool>, from: SocketAddr, identity: &str) {
    verify_with(admission, pool, from, identity, proof(1));
}

fn fail_once(admission: &Arc<Admission>, pool: &Arc<Pool>, source: SocketAddr) {
    if let Answer::Admit(t) | Answer::Evict { ticket: t, .. } =
        admission.admit(pool, 100_000, 100_000, source, None)
    {
        drop(t);
    }
}

fn known(admission: &Admission, s: &AdmissionSettings, a: SocketAddr) -> bool {
    admission
        .tables()
        .sources
        .is_known("edge", a.ip(), s, Instant::now())
}

/// A networks table of `max_tracked` full of busy attacker entries (a
/// strike each, one /48 each, no certificate).
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

/// A listener "edge" built from config text, as a reload would publish it.
struct Pki {
    dir: tempfile::TempDir,
    root: crate::pki::Authority,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let root = crate::pki::Authority::root("review 11 root").unwrap();
        let server = root
            .issue(&crate::pki::LeafSpec::server(
                "gw",
                &["dns:gw.example.internal"],
            ))
            .unwrap();
        let pki = Pki { dir, root };
        pki.write("server.pem", &server.cert_pem);
        pki.write("server.key", &server.key_pem);
        std::fs::set_permissions(
            pki.dir.path().join("server.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        pki.write("ca.pem", &pki.root.cert_pem);
        pki.write("crl.pem", &pki.root.crl(2, &[b"\x01\x02"]).unwrap());
        pki
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.dir.path().join(name), text).unwrap();
    }

    /// `listener` goes in the listener's table (after client_ca), `route`
    /// after the route's `allow`.
    fn state(&self, ca: &str, allow: &str, listener: &str, route: &str) -> Arc<ListenerState> {
        let text = format!(
            "[[listeners]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\ncert = \"server.pem\"\n\
             key = \"server.key\"\nclient_ca = \"{ca}\"\ncrls = [\"crl.pem\"]\ncrl_expired = \"warn\"\noffload = \"userspace\"\n{listener}\n\
             [[listeners.routes]]\nname = \"api\"\nbackends = [\"127.0.0.1:1\"]\nallow = [{allow}]\n{route}\n"
        );
        let config =
            crate::Config::parse(&text, &self.dir.path().join("g.toml"), self.dir.path()).unwrap();
        crate::state::State::from_config(&config).unwrap().listeners[0].clone()
    }
}

fn der(pem: &str) -> rustls_pki_types::CertificateDer<'static> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// What a handshake on `state`'s route verified for this chain, as the
/// listener keeps it.
fn proof_of(state: &ListenerState, chain: &[rustls_pki_types::CertificateDer<'static>]) -> Proof {
    let identity = crate::identity::Identity::from_leaf(&chain[0]).unwrap();
    let path = state
        .tls
        .verified_path(&state.routes[0].auth, &chain[0], &chain[1..])
        .unwrap();
    crate::listener::proof(&identity, &path)
}

/// Whether a handshake on `state`'s route would take this chain now.
fn handshake_takes(
    state: &ListenerState,
    from: IpAddr,
    chain: &[rustls_pki_types::CertificateDer<'static>],
) -> bool {
    state
        .tls
        .recheck(&state.routes[0].auth, from, &chain[0], &chain[1..])
        .is_ok()
}

/// R11-1 (MEDIUM, fixed). `still_admits` judged the route's
/// `time_windows` at the reload's time: the nightly CRL job (`gateway pki
/// crl`, picked up by `watch_files` at 02:00), which revokes no one,
/// forgot every client only an office-hours route allows, and at 08:00,
/// under a networks-table flood, they were refused `max_tracked`. Now a
/// reload judges whether the route admits the identity from its source
/// at some time: the nightly reload forgets no one, and at opening every
/// client passes the flood. Its handshakes still judge the windows.
#[test]
fn r11_1_a_nightly_crl_reload_keeps_every_client_of_a_time_windowed_route() {
    let pki = Pki::new();
    let frontend = pki
        .root
        .issue(&crate::pki::LeafSpec::client(
            "f",
            &["spiffe://example.internal/ns/shop/sa/frontend"],
        ))
        .unwrap();
    let window = "[[listeners.routes.time_windows]]\nstart = \"08:00\"\nend = \"18:00\"\n";
    let allow = "\"spiffe://example.internal/ns/shop/sa/frontend\"";
    let state = pki.state("ca.pem", allow, "", window);
    let chain = [der(&frontend.cert_pem)];
    let from: IpAddr = "192.0.2.10".parse().unwrap();
    // The same state, nothing revoked: admitted again, whatever the hour.
    assert!(still_admits(&state, from, &proof_of(&state, &chain)));
    // Taking the identity out of `allow` still forgets it.
    let narrowed = pki.state("ca.pem", "\"dns:other.example.internal\"", "", window);
    assert!(!still_admits(&narrowed, from, &proof_of(&state, &chain)));

    let s = AdmissionSettings {
        max_tracked: 64,
        source_handshakes_in_flight: 2,
        ..defaults()
    };
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let frontends: Vec<SocketAddr> = (1..=20u8).map(|i| v4([192, 0, 2, i], 1)).collect();
    for f in &frontends {
        verify_with(&admission, &pool, *f, FRONTEND, proof_of(&state, &chain));
    }
    // 02:00: the daily CRL, which revokes no one (same state otherwise).
    let forgotten = admission.revalidate(1, |_, source, p| still_admits(&state, source, p));
    eprintln!("the nightly CRL reload forgot {forgotten} of 20 clients");
    assert_eq!(forgotten, 0);
    // 08:00, under a flood: every one of them admitted past it.
    std::thread::sleep(Duration::from_millis(50));
    flood(&admission, &pool);
    assert_eq!(
        refused(admission.admit(&pool, 1000, 1000, client("198.51.100.1", 1), None)),
        Refusal::MaxTracked
    );
    for f in &frontends {
        admitted(admission.admit(&pool, 1000, 1000, *f, None)).established();
    }
}

/// R11-2 (MEDIUM, fixed). An exact address kept one slot and the proof
/// of whoever verified from it last: behind a NAT, the co-user whose
/// certificate a reload revoked made the address known no more for every
/// client behind it, refused `max_tracked` under a flood. Now the slot
/// keeps the newest proofs of its other identities too: the reload
/// forgets the revoked one and the address stays known by the office's;
/// it is forgotten once every identity verified from it is refused.
#[test]
fn r11_2_revoking_one_co_user_of_a_nat_keeps_the_nat_known_for_the_others() {
    let s = AdmissionSettings {
        max_tracked: 64,
        source_handshakes_in_flight: 2,
        ..defaults()
    };
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    let nat = v4([198, 51, 100, 20], 1);
    // The office's clients verify through the NAT all day ...
    for serial in 1..=5u8 {
        verify_with(&admission, &pool, nat, FRONTEND, proof(serial));
    }
    // ... and the co-user to be revoked verifies once, last.
    verify_with(&admission, &pool, nat, BATCH, proof(66));
    std::thread::sleep(Duration::from_millis(50));
    flood(&admission, &pool);
    admitted(admission.admit(&pool, 1000, 1000, nat, None)).established();
    // The reload revoking serial 66 only.
    assert_eq!(crl_reload(&admission, 1, &[66]), 1);
    flood(&admission, &pool);
    assert!(known(&admission, &s, nat));
    admitted(admission.admit(&pool, 1000, 1000, nat, None)).established();
    // The office's last proof revoked too: no one left to vouch for it.
    assert_eq!(crl_reload(&admission, 2, &[5, 66]), 1);
    assert!(!known(&admission, &s, nat));
    flood(&admission, &pool);
    assert_eq!(
        refused(admission.admit(&pool, 1000, 1000, nat, None)),
        Refusal::MaxTracked
    );
}

/// R11-3 (MEDIUM where a /64 is shared, fixed). Past a flood, a known
/// client's rotated privacy address is one of its /64's strangers. Their
/// strikes were one tally: a certless neighbour brought it to
/// `block_after` - 1 from other addresses and the client's first refusal
/// blocked the client's own address. Now each stranger address has its
/// own strikes: the client is not blocked, the neighbour's address that
/// failed `block_after` times is. (The strangers still share one count
/// of handshakes in flight: the neighbour holding it delays the client,
/// README says so.)
#[test]
fn r11_3_a_certless_neighbour_cannot_get_a_known_clients_rotated_address_blocked() {
    let s = AdmissionSettings {
        max_tracked: 8,
        source_handshakes_in_flight: 2,
        block_after: 5,
        prefix_block_after: 50,
        network_block_after: 100,
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
    // The neighbour holds the strangers' two handshakes ...
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
    // ... and is refused four times, from four more addresses.
    for i in 2..6 {
        assert_eq!(
            refused(admission.admit(
                &pool,
                1000,
                1000,
                client(&format!("2001:db8:5:5::bad{i}"), 1),
                None
            )),
            Refusal::SourceHandshakes
        );
    }
    // The laptop's privacy address rotated: refused while the neighbour
    // holds the count, twice, and blocked never.
    let rotated = client("2001:db8:5:5::11", 1);
    assert!(known(&admission, &s, rotated));
    for _ in 0..2 {
        assert_eq!(
            refused(admission.admit(&pool, 1000, 1000, rotated, None)),
            Refusal::SourceHandshakes
        );
    }
    assert!(admission.blocked().is_empty(), "{:?}", admission.blocked());
    // One neighbour address failing `block_after` times is blocked.
    for _ in 0..5 {
        refused(admission.admit(&pool, 1000, 1000, client("2001:db8:5:5::bad9", 1), None));
    }
    let blocked: Vec<IpNet> = admission.blocked().iter().map(|b| b.net).collect();
    eprintln!("blocked: {blocked:?}");
    assert_eq!(
        blocked,
        vec!["2001:db8:5:5::bad9/128".parse::<IpNet>().unwrap()]
    );
    drop(held);
    admitted(admission.admit(&pool, 1000, 1000, rotated, None)).established();
}

/// R11-4 (MEDIUM, R10-2 residue, fixed). The network's quarter bound one
/// network only: one holder of the frontends' shared identity in four
/// /48s took the identity's whole quota, and the real frontends verifying
/// after it were never remembered. Now, at the quota, a new network's
/// address takes the place of the least recently verified entry of the
/// identity's largest network: the frontends are known, and the holder's
/// fifth network takes its own networks' entries, never theirs.
#[test]
fn r11_4_one_holder_in_four_networks_cannot_squat_a_shared_identitys_quota() {
    let s = AdmissionSettings {
        max_tracked: 64,
        source_handshakes_in_flight: 2,
        ..defaults()
    };
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = admission.pool("edge");
    for net in 0..4u32 {
        for i in 0..256u32 {
            verify(
                &admission,
                &pool,
                client(&format!("2001:db8:{:x}:{i:x}::1", 0x70 + net), 1),
                FRONTEND,
            );
        }
    }
    let frontends: Vec<SocketAddr> = (1..=20u8).map(|i| v4([192, 0, 2, i], 1)).collect();
    for f in &frontends {
        verify(&admission, &pool, *f, FRONTEND);
    }
    let remembered = |admission: &Admission| {
        frontends
            .iter()
            .filter(|f| known(admission, &s, **f))
            .count()
    };
    eprintln!(
        "{} of 20 frontends verified after the squat are known",
        remembered(&admission)
    );
    assert_eq!(remembered(&admission), 20);
    // The holder comes back from a fifth /48, all its 256 /64s.
    for i in 0..256u32 {
        verify(
            &admission,
            &pool,
            client(&format!("2001:db8:74:{i:x}::1"), 1),
            FRONTEND,
        );
    }
    assert_eq!(remembered(&admission), 20);
    // Its fifth network got an equal share of what its four held.
    let fifth = (0..256u32)
        .filter(|i| known(&admission, &s, client(&format!("2001:db8:74:{i:x}::1"), 1)))
        .count();
    eprintln!("its fifth /48 holds {fifth} entries");
    assert!((190..=210).contains(&fifth), "{fifth}");
    std::thread::sleep(Duration::from_millis(50));
    flood(&admission, &pool);
    admitted(admission.admit(&pool, 1000, 1000, frontends[0], None)).established();
    admitted(admission.admit(&pool, 1000, 1000, client("2001:db8:74:0::1", 1), None)).established();
}

/// R11-5 (LOW-MEDIUM, fixed). The anchor check compared names, over any
/// certificate the client presented: (a) a CA re-keyed under the same
/// name (a compromise answered with a new key) left every holder of the
/// old key's certificates known; (b) a client of a CA the listener no
/// longer trusts stayed known if it padded its chain with any certificate
/// a still-trusted CA issued (the gateway's own server certificate). Now
/// the proof keeps the verified path's anchor, subject and key, and only
/// the path's certificates: a reload forgets both, as handshakes refuse
/// both.
#[test]
fn r11_5_a_withdrawn_cas_clients_are_known_no_more() {
    let pki = Pki::new();
    let from: IpAddr = "192.0.2.10".parse().unwrap();
    let allow = "\"spiffe://example.internal/ns/shop/sa/frontend\"";
    let spec =
        crate::pki::LeafSpec::client("f", &["spiffe://example.internal/ns/shop/sa/frontend"]);
    // (a) The compromised root, and its replacement with the same name.
    let old = pki.root.issue(&spec).unwrap();
    let chain = [der(&old.cert_pem)];
    let before = pki.state("ca.pem", allow, "", "");
    let verified = proof_of(&before, &chain);
    assert!(still_admits(&before, from, &verified));
    let rekeyed = crate::pki::Authority::root("review 11 root").unwrap();
    pki.write("new.pem", &rekeyed.cert_pem);
    pki.write("crl.pem", &rekeyed.crl(1, &[]).unwrap());
    let after = pki.state("new.pem", allow, "", "");
    assert!(!handshake_takes(&after, from, &chain));
    assert!(
        !still_admits(&after, from, &verified),
        "a certificate of the withdrawn key is known no more"
    );
    // (b) A partner CA taken off; its client had sent, after its leaf,
    // the gateway's server certificate (issued by the root still trusted).
    let pki = Pki::new();
    let partner = crate::pki::Authority::root("review 11 partner").unwrap();
    let leaf = partner.issue(&spec).unwrap();
    let server = std::fs::read_to_string(pki.dir.path().join("server.pem")).unwrap();
    let padded = [der(&leaf.cert_pem), der(&server)];
    pki.write("partner.pem", &partner.cert_pem);
    pki.write("crl.pem", &partner.crl(1, &[]).unwrap());
    let trusting = pki.state("partner.pem", allow, "", "");
    let verified = proof_of(&trusting, &padded);
    assert_eq!(verified.certs.len(), 1, "the path is the leaf alone");
    pki.write("crl.pem", &pki.root.crl(3, &[]).unwrap());
    let after = pki.state("ca.pem", allow, "", "");
    assert!(!handshake_takes(&after, from, &padded));
    assert!(
        !still_admits(&after, from, &verified),
        "a padded chain keeps no one known after its CA is withdrawn"
    );
}

/// R11-6 (LOW-MEDIUM, fixed). A proof kept the issuer and serial of up to
/// 17 presented certificates, whatever they were: a client with one
/// allowed certificate sent after its leaf 16 self-signed junk
/// certificates with large names (set aside by the path search, a ~64 KiB
/// Certificate message), and each known slot kept ~28 KB for `known_for`.
/// Now it keeps the verified path only: the junk adds nothing.
#[test]
fn r11_6_a_padded_chain_adds_nothing_to_a_known_slot() {
    let pki = Pki::new();
    let leaf = pki
        .root
        .issue(&crate::pki::LeafSpec::client(
            "f",
            &["spiffe://example.internal/ns/shop/sa/frontend"],
        ))
        .unwrap();
    let mut chain = vec![der(&leaf.cert_pem)];
    for i in 0..16u8 {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(
            rcgen::DnType::OrganizationName,
            format!("{i:02}{}", "x".repeat(1720)),
        );
        params.distinguished_name = dn;
        let key = rcgen::KeyPair::generate().unwrap();
        chain.push(params.self_signed(&key).unwrap().der().clone());
    }
    let message: usize = chain.iter().map(|c| c.len() + 3).sum();
    assert!(message < 65_535, "{message}");
    let state = pki.state(
        "ca.pem",
        "\"spiffe://example.internal/ns/shop/sa/frontend\"",
        "",
        "",
    );
    let from: IpAddr = "192.0.2.10".parse().unwrap();
    assert!(
        handshake_takes(&state, from, &chain),
        "the junk is set aside"
    );
    let size = |p: &Proof| -> usize {
        p.anchor.0.len()
            + p.anchor.1.len()
            + p.certs
                .iter()
                .map(|(i, s)| i.len() + s.len())
                .sum::<usize>()
    };
    let padded = size(&proof_of(&state, &chain));
    let plain = size(&proof_of(&state, &chain[..1]));
    eprintln!("proof: {padded} B padded vs {plain} B plain");
    assert_eq!(padded, plain);
    assert!(padded < 1_000, "{padded}");
}

/// R11-7 (LOW, fixed). `still_admits` did not judge a bundle's
/// `spiffe_trust_domains`: a reload narrowing them (a partner domain
/// withdrawn) kept known every client whose identity a handshake now
/// refuses. Now each route is judged with its own bundle: its anchors,
/// its trust domains, its policy.
#[test]
fn r11_7_a_withdrawn_spiffe_trust_domain_forgets_its_clients() {
    let pki = Pki::new();
    let leaf = pki
        .root
        .issue(&crate::pki::LeafSpec::client(
            "p",
            &["spiffe://partner.example/ns/x/sa/y"],
        ))
        .unwrap();
    let chain = [der(&leaf.cert_pem)];
    let allow = "\"spiffe://partner.example/ns/x/sa/y\"";
    let before = pki.state("ca.pem", allow, "", "");
    let verified = proof_of(&before, &chain);
    let from: IpAddr = "192.0.2.10".parse().unwrap();
    assert!(still_admits(&before, from, &verified));
    let after = pki.state(
        "ca.pem",
        allow,
        "spiffe_trust_domains = [\"example.internal\"]",
        "",
    );
    assert!(!handshake_takes(&after, from, &chain));
    assert!(!still_admits(&after, from, &verified));
}

/// R11-8 (LOW, fixed in part). A reload's judgement held the tables'
/// lock (every accept takes it) to forget every refused slot at once: at
/// `max_known` (16384 /64 entries, eight identities' slots each) and a
/// reload that withdraws their CA, ~0.5 s in a debug build. Now
/// `revalidate` forgets in chunks of `FORGET_CHUNK`, releasing the lock
/// between them; copying the slots out is still one hold (printed).
#[test]
fn r11_8_revalidate_forgets_in_chunks() {
    let s = defaults();
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    {
        let mut t = admission.tables();
        let now = Instant::now();
        for e in 0..16_384u32 {
            for id in 0..8u32 {
                let ip: IpAddr = format!("2001:db8:{:x}:{:x}::{:x}", e >> 8, e & 0xff, id + 1)
                    .parse()
                    .unwrap();
                t.sources.verified(
                    "edge",
                    ip,
                    &format!("[\"id{}\"]", (e * 8 + id) % 512),
                    &s,
                    now,
                );
            }
        }
    }
    let start = Instant::now();
    let copied = admission.tables().sources.judging(1);
    let copy = start.elapsed();
    let slots = copied.len();
    assert!(slots > 100_000);
    drop(copied);
    // Another thread takes the lock as accepts do, while a reload forgets
    // every slot: its longest wait is a chunk's, not the whole.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let waiter = {
        let (admission, done) = (admission.clone(), done.clone());
        std::thread::spawn(move || {
            let mut longest = Duration::ZERO;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let start = Instant::now();
                drop(admission.tables());
                longest = longest.max(start.elapsed());
                std::thread::yield_now();
            }
            longest
        })
    };
    let start = Instant::now();
    let forgotten = admission.revalidate(2, |_, _, _| false);
    let whole = start.elapsed();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let longest = waiter.join().unwrap();
    eprintln!(
        "{slots} slots: copied under the lock in {copy:?}; forgotten in {whole:?}, the longest wait for the lock {longest:?} (debug build)"
    );
    assert_eq!(forgotten, slots);
    assert_eq!(admission.tables().sources.lens()[3], 0);
    assert!(longest < whole / 4, "{longest:?} of {whole:?}");
}

/// R11-9 (LOW with the defaults, fixed). The identity's quota was per
/// listener (`known_per_identity`, at most a quarter of `max_known`), the
/// table is not: one certificate allowed on four listeners filled the
/// whole known table and flushed every client already served. Now an
/// identity holds at most a quarter of the table over all listeners: the
/// clients served before stay known and pass a flood.
#[test]
fn r11_9_one_certificate_on_four_listeners_cannot_flush_the_known_table() {
    let s = AdmissionSettings {
        max_tracked: 64,
        max_known: 64,
        known_per_identity: 16,
        source_handshakes_in_flight: 2,
        ..defaults()
    };
    let admission = Admission::new(&s, Arc::new(Metrics::default()));
    let edge = admission.pool("edge");
    let clients: Vec<SocketAddr> = (1..=20u8).map(|i| v4([192, 0, 2, i], 1)).collect();
    for (i, c) in clients.iter().enumerate() {
        verify(
            &admission,
            &edge,
            *c,
            &format!("[\"uri:spiffe://example.internal/c/{i}\"]"),
        );
    }
    // The attacker's 16 addresses (four /16s: the network's part is 4),
    // verified on each listener that allows its certificate.
    let listeners = ["edge", "api", "admin-web", "metrics-tls"];
    for listener in listeners {
        let pool = admission.pool(listener);
        for n in 0..4u8 {
            for h in 1..=4u8 {
                verify(&admission, &pool, v4([10, n, 0, h], 1), BATCH);
            }
        }
    }
    let still = clients
        .iter()
        .filter(|c| known(&admission, &s, **c))
        .count();
    eprintln!("{still} of 20 clients served before still known");
    assert_eq!(still, 20);
    let held: usize = listeners
        .iter()
        .map(|l| {
            (0..4u8)
                .flat_map(|n| (1..=4u8).map(move |h| v4([10, n, 0, h], 1)))
                .filter(|a| {
                    admission
                        .tables()
                        .sources
                        .is_known(l, a.ip(), &s, Instant::now())
                })
                .count()
        })
        .sum();
    assert_eq!(held, 16, "a quarter of the table over all listeners");
    std::thread::sleep(Duration::from_millis(50));
    flood(&admission, &edge);
    admitted(admission.admit(&edge, 1000, 1000, clients[0], None)).established();
}

/// R11-10 (LOW, README silent). The known table lives in memory only: a
/// restart (an upgrade, a crash) during a flood forgets every client
/// served before, and none can verify again while the networks' table
/// stays full (the block list, pinned, survives; the known table does
/// not).
#[test]
fn r11_10_a_restart_during_a_flood_locks_out_every_client() {
    let s = AdmissionSettings {
        max_tracked: 64,
        source_handshakes_in_flight: 2,
        ..defaults()
    };
    let before = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = before.pool("edge");
    let clients: Vec<SocketAddr> = (1..=20u8).map(|i| v4([192, 0, 2, i], 1)).collect();
    for c in &clients {
        verify(&before, &pool, *c, FRONTEND);
    }
    std::thread::sleep(Duration::from_millis(50));
    flood(&before, &pool);
    admitted(before.admit(&pool, 1000, 1000, clients[0], None)).established();
    // The restarted gateway, the flood going on.
    let after = Admission::new(&s, Arc::new(Metrics::default()));
    let pool = after.pool("edge");
    flood(&after, &pool);
    let locked = clients
        .iter()
        .filter(|c| {
            matches!(
                after.admit(&pool, 1000, 1000, **c, None),
                Answer::Refuse(Refusal::MaxTracked)
            )
        })
        .count();
    assert_eq!(locked, 20);
}

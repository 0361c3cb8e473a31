//! `records_vs_rustls`: see the target's header. The input is read as a
//! script: a cipher suite, then operations that append records (sealed
//! with the peer's real keys) or bytes to the stream, or mutate it, then
//! where the stream is cut into reads; and plaintext for the sealing check.

use std::sync::{Arc, OnceLock};

use gateway::offload::record_layer::exposed::{Aead, Keys, Layer};
use rustls::crypto::cipher::{
    AeadKey, InboundOpaqueMessage, Iv, MessageDecrypter, MessageEncrypter, OutboundChunks,
    OutboundPlainMessage,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{CipherSuite, ConnectionTrafficSecrets, ContentType, ProtocolVersion};

/// The suites the record layer supports, each as the peer offers it.
const SUITES: [CipherSuite; 6] = [
    CipherSuite::TLS13_AES_128_GCM_SHA256,
    CipherSuite::TLS13_AES_256_GCM_SHA384,
    CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
    CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
];

/// Refusals where the gateway is knowingly stricter than rustls (see
/// `record_layer`'s module docs): only with one of these may it refuse a
/// stream rustls takes.
const STRICTER: [&str; 8] = [
    // A client's post-handshake message is refused on its first byte (none
    // can be taken); rustls waits for the whole message.
    "client sent",
    // Likewise a server's, but for a ticket.
    "server sent",
    // A TLS 1.3 body over 2^14 + 256 (RFC 8446 §5.2) is refused from its
    // header; rustls refuses it once whole (its plaintext cannot fit), so
    // they differ only when it never arrives.
    "oversized TLS record",
    // It cannot derive new keys; rustls can.
    "KeyUpdate",
    // RFC 8446 §5.2, as the kernel checks it; rustls ignores the outer type.
    "outer type",
    // RFC 8446 §5.1 and the kernel: 3.3 in TLS 1.3, 3.x in TLS 1.2.
    // rustls takes any version it has a name for (SSL 2, DTLS too).
    "with version",
    // rustls answers a TLS 1.2 renegotiation with a warning and goes on.
    "renegotiate",
    // RFC 8446 §5.1: handshake records are never empty.
    "empty handshake record",
];

struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes([self.byte()?, self.byte()?]))
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (taken, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        taken
    }
}

struct Pki {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: rustls::RootCertStore,
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let root = gateway::pki::Authority::root("fuzz root").expect("root");
        let leaf = root
            .issue(&gateway::pki::LeafSpec::server(
                "server",
                &["dns:server.test"],
            ))
            .expect("leaf");
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(root.cert_pem.as_bytes()).expect("root pem"))
            .expect("root");
        Pki {
            chain: vec![
                CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).expect("leaf pem"),
            ],
            key: PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key pem"),
            roots,
        }
    })
}

/// A rustls server and client past their handshake, the client having
/// offered only `suite`.
fn handshake(suite: CipherSuite) -> (rustls::ServerConnection, rustls::ClientConnection) {
    let pki = pki();
    let mut server_config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(rustls::ALL_VERSIONS)
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(pki.chain.clone(), pki.key.clone_key())
    .expect("server config");
    server_config.send_tls13_tickets = 0;
    server_config.enable_secret_extraction = true;
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites.retain(|s| s.suite() == suite);
    let mut client_config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .expect("versions")
        .with_root_certificates(pki.roots.clone())
        .with_no_client_auth();
    client_config.enable_secret_extraction = true;
    let mut server = rustls::ServerConnection::new(Arc::new(server_config)).expect("server");
    let mut client = rustls::ClientConnection::new(
        Arc::new(client_config),
        ServerName::try_from("server.test").expect("name"),
    )
    .expect("client");
    while client.is_handshaking() || server.is_handshaking() {
        let mut bytes = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut bytes).expect("client writes");
        }
        feed_all(&mut server, &bytes);
        server.process_new_packets().expect("server handshake");
        let mut bytes = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut bytes).expect("server writes");
        }
        let mut input = &bytes[..];
        while !input.is_empty() {
            client.read_tls(&mut input).expect("client reads");
        }
        client.process_new_packets().expect("client handshake");
    }
    (server, client)
}

fn feed_all(server: &mut rustls::ServerConnection, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        if server.read_tls(&mut bytes).expect("read_tls") == 0 {
            break;
        }
    }
}

/// A direction's keys as the gateway's layer takes them (copies of the
/// bytes), and rustls' own for the same direction.
struct Direction {
    aead: Aead,
    key: Vec<u8>,
    iv: Vec<u8>,
    seq: u64,
    secrets: ConnectionTrafficSecrets,
}

impl Direction {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> Direction {
        let (aead, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Aead::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Aead::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (Aead::Chacha20Poly1305, key, iv)
            }
            _ => unreachable!("only the suites above are offered"),
        };
        Direction {
            aead,
            key: key.as_ref().to_vec(),
            iv: iv.as_ref().to_vec(),
            seq,
            secrets,
        }
    }

    fn keys(&self) -> Keys<'_> {
        Keys {
            aead: self.aead,
            key: &self.key,
            iv: &self.iv,
            seq: self.seq,
        }
    }

    fn key_iv(self) -> (AeadKey, Iv) {
        match self.secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
            | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
            | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key, iv),
            _ => unreachable!("only the suites above are offered"),
        }
    }
}

/// rustls' (ring's) record protection for `suite`: ring's keys seal from
/// any sequence number.
fn ring_suite(suite: CipherSuite) -> rustls::SupportedCipherSuite {
    rustls::crypto::ring::ALL_CIPHER_SUITES
        .iter()
        .copied()
        .find(|s| s.suite() == suite)
        .expect("ring has every suite above")
}

fn encrypter(suite: CipherSuite, d: Direction) -> Box<dyn MessageEncrypter> {
    let (key, iv) = d.key_iv();
    match ring_suite(suite) {
        rustls::SupportedCipherSuite::Tls13(s) => s.aead_alg.encrypter(key, iv),
        rustls::SupportedCipherSuite::Tls12(s) => match s.aead_alg.key_block_shape().fixed_iv_len {
            4 => s
                .aead_alg
                .encrypter(key, &iv.as_ref()[..4], &iv.as_ref()[4..]),
            _ => s.aead_alg.encrypter(key, iv.as_ref(), &[]),
        },
    }
}

fn decrypter(suite: CipherSuite, d: Direction) -> Box<dyn MessageDecrypter> {
    let (key, iv) = d.key_iv();
    match ring_suite(suite) {
        rustls::SupportedCipherSuite::Tls13(s) => s.aead_alg.decrypter(key, iv),
        rustls::SupportedCipherSuite::Tls12(s) => match s.aead_alg.key_block_shape().fixed_iv_len {
            4 => s.aead_alg.decrypter(key, &iv.as_ref()[..4]),
            _ => s.aead_alg.decrypter(key, iv.as_ref()),
        },
    }
}

/// How one side took the stream.
#[derive(Default)]
struct Outcome {
    plain: Vec<u8>,
    closed: bool,
    /// Refused for what the peer sent.
    refused: Option<String>,
    /// The stream ended (FIN) without close_notify.
    truncated: bool,
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} plaintext bytes, closed {}, truncated {}, refused {:?}",
            self.plain.len(),
            self.closed,
            self.truncated,
            self.refused
        )
    }
}

/// The script's stream, sealed as the client (the peer of the layer).
fn stream(
    input: &mut Input<'_>,
    tls13: bool,
    peer_is_client: bool,
    seal: &mut dyn FnMut(ContentType, &[u8]) -> Vec<u8>,
) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::new();
    let mut last_record = 0;
    for _ in 0..64 {
        let Some(op) = input.byte() else { break };
        match op % 12 {
            0 => {
                let n = usize::from(input.byte().unwrap_or(0));
                let payload = input.bytes(n);
                last_record = out.len();
                out.extend(seal(ContentType::ApplicationData, payload));
            }
            1 => {
                last_record = out.len();
                out.extend(seal(ContentType::ApplicationData, &[]));
            }
            2 => {
                let alert = input.bytes(2);
                last_record = out.len();
                out.extend(seal(ContentType::Alert, alert));
            }
            3 => {
                let n = usize::from(input.byte().unwrap_or(0));
                let payload = input.bytes(n);
                last_record = out.len();
                out.extend(seal(ContentType::Handshake, payload));
            }
            4 => {
                let typ = ContentType::from(input.byte().unwrap_or(0));
                let n = usize::from(input.byte().unwrap_or(0));
                let payload = input.bytes(n);
                last_record = out.len();
                out.extend(seal(typ, payload));
            }
            5 => {
                let n = usize::from(input.byte().unwrap_or(0) % 32);
                out.extend_from_slice(input.bytes(n));
            }
            6 => {
                if !out.is_empty() {
                    let at = usize::from(input.u16().unwrap_or(0)) % out.len();
                    out[at] ^= 1 << (input.byte().unwrap_or(0) % 8);
                }
            }
            7 => {
                let cut = usize::from(input.byte().unwrap_or(0));
                out.truncate(out.len().saturating_sub(cut));
            }
            8 => {
                last_record = out.len();
                out.extend(seal(ContentType::Alert, &[1, 0]));
            }
            9 => {
                // Near and past the 2^14 plaintext limit.
                let n = 16_370 + usize::from(input.byte().unwrap_or(0) % 32);
                last_record = out.len();
                out.extend(seal(ContentType::ApplicationData, &vec![0x5a; n]));
            }
            10 => {
                // Rewrite the last record's header byte by byte.
                let at = last_record + usize::from(input.byte().unwrap_or(0) % 5);
                if let Some(b) = out.get_mut(at) {
                    *b = input.byte().unwrap_or(0);
                }
            }
            _ => {
                // A post-handshake message, maybe split across records. A
                // TLS 1.3 server's ticket is built field by field, since the
                // layer parses it as rustls does and random bytes seldom
                // reach past its first length.
                let types: &[u8] = if peer_is_client || !tls13 {
                    &[4, 24, 1, 0]
                } else {
                    &[4, 4, 24, 1, 0]
                };
                let typ = types[usize::from(input.byte().unwrap_or(0)) % types.len()];
                let body = if typ == 4 && !peer_is_client && tls13 {
                    ticket(input)
                } else {
                    let n = usize::from(input.byte().unwrap_or(0) % 8);
                    input.bytes(n).to_vec()
                };
                let len = (body.len() as u32).to_be_bytes();
                let mut msg = vec![typ, len[1], len[2], len[3]];
                msg.extend_from_slice(&body);
                let split = usize::from(input.byte().unwrap_or(0)) % (msg.len() + 1);
                for part in [&msg[..split], &msg[split..]] {
                    if !part.is_empty() || !tls13 {
                        last_record = out.len();
                        out.extend(seal(ContentType::Handshake, part));
                    }
                }
            }
        }
    }
    out
}

/// A TLS 1.3 NewSessionTicket body (RFC 8446 §4.6.1) from the script:
/// the fields rustls reads in turn, each length right unless a bit of the
/// first byte puts it off by one, extensions early_data (42) or others,
/// repeated or not, and maybe trailing bytes.
fn ticket(input: &mut Input<'_>) -> Vec<u8> {
    let flags = input.byte().unwrap_or(0);
    let off = |bit: u8, len: usize| if flags & bit != 0 { len + 1 } else { len };
    // ticket_lifetime and ticket_age_add.
    let mut body = input.bytes(8).to_vec();
    let n = usize::from(input.byte().unwrap_or(0) % 8);
    let nonce = input.bytes(n);
    body.push(off(1, nonce.len()) as u8);
    body.extend_from_slice(nonce);
    let n = usize::from(input.byte().unwrap_or(0) % 16);
    let ticket = input.bytes(n);
    body.extend_from_slice(&(off(2, ticket.len()) as u16).to_be_bytes());
    body.extend_from_slice(ticket);
    let mut extensions = Vec::new();
    for _ in 0..input.byte().unwrap_or(0) % 4 {
        let typ: u16 = match input.byte().unwrap_or(0) % 4 {
            0 | 1 => 42,
            2 => 0x0a0a,
            _ => u16::from(input.byte().unwrap_or(0)),
        };
        let n = usize::from(input.byte().unwrap_or(0) % 8);
        let data = input.bytes(n);
        extensions.extend_from_slice(&typ.to_be_bytes());
        extensions.extend_from_slice(&(off(4, data.len()) as u16).to_be_bytes());
        extensions.extend_from_slice(data);
    }
    body.extend_from_slice(&(off(8, extensions.len()) as u16).to_be_bytes());
    body.extend_from_slice(&extensions);
    if flags & 16 != 0 {
        body.extend_from_slice(input.bytes(2));
    }
    body
}

/// The stream through rustls, read by read.
fn through_rustls(server: &mut rustls::Connection, reads: &[&[u8]]) -> Outcome {
    use std::io::Read as _;
    let mut outcome = Outcome::default();
    'reads: for read in reads {
        let mut input = *read;
        while !input.is_empty() {
            match server.read_tls(&mut input) {
                Ok(0) => break 'reads,
                Ok(_) => {}
                Err(e) => {
                    outcome.refused = Some(e.to_string());
                    break 'reads;
                }
            }
            let processed = server.process_new_packets();
            let mut chunk = [0u8; 4096];
            loop {
                match server.reader().read(&mut chunk) {
                    Ok(0) => {
                        outcome.closed = true;
                        break;
                    }
                    Ok(n) => outcome.plain.extend_from_slice(&chunk[..n]),
                    Err(_) => break,
                }
            }
            if let Err(e) = processed {
                outcome.refused = Some(e.to_string());
                break 'reads;
            }
            if outcome.closed {
                break 'reads;
            }
        }
    }
    if outcome.refused.is_none() && !outcome.closed {
        // The peer's FIN: the end of a stream without close_notify.
        let eof: &[u8] = &[];
        let _ = server.read_tls(&mut &eof[..]);
        let processed = server.process_new_packets();
        let mut chunk = [0u8; 4096];
        let end = loop {
            match server.reader().read(&mut chunk) {
                Ok(0) => break Ok(()),
                Ok(n) => outcome.plain.extend_from_slice(&chunk[..n]),
                Err(e) => break Err(e),
            }
        };
        match (processed, end) {
            (Err(e), _) => outcome.refused = Some(e.to_string()),
            (Ok(_), Err(_)) => outcome.truncated = true,
            (Ok(_), Ok(())) => outcome.closed = true,
        }
    }
    outcome
}

/// The stream through the gateway's layer, read by read, as its pump keeps
/// the start of an unfinished record for the next read.
fn through_gateway(layer: &Layer, reads: &[&[u8]]) -> Outcome {
    let mut outcome = Outcome::default();
    let mut buf: Vec<u8> = Vec::new();
    for read in reads {
        buf.extend_from_slice(read);
        match layer.open(&mut buf, &mut outcome.plain) {
            Ok((taken, closed)) => {
                buf.drain(..taken);
                if closed {
                    outcome.closed = true;
                    break;
                }
            }
            Err(why) => {
                outcome.refused = Some(why);
                break;
            }
        }
    }
    // The peer's FIN: the pump calls an end without close_notify truncation.
    outcome.truncated = outcome.refused.is_none() && !outcome.closed;
    outcome
}

pub fn check(data: &[u8]) {
    let mut input = Input(data);
    let Some(choice) = input.byte() else { return };
    let suite = SUITES[usize::from(choice) % SUITES.len()];
    let tls13 = suite.as_str().is_some_and(|s| s.starts_with("TLS13"));
    // The layer plays the server (peer: a client, as on the client leg) or
    // the client (peer: a server, as towards a TLS backend). The peer's
    // keys seal the stream; its rustls counterpart is the oracle.
    let layer_is_server = choice & 0x80 == 0;
    let (server, client) = handshake(suite);
    let (mut oracle, secrets) = if layer_is_server {
        (
            rustls::Connection::Server(server),
            client.dangerous_extract_secrets().expect("extractable"),
        )
    } else {
        (
            rustls::Connection::Client(client),
            server.dangerous_extract_secrets().expect("extractable"),
        )
    };
    let from_peer = Direction::new(secrets.tx);
    let to_peer = Direction::new(secrets.rx);
    let layer =
        Layer::new(tls13, layer_is_server, from_peer.keys(), to_peer.keys()).expect("layer");
    let mut seq = from_peer.seq;
    let mut sealer = encrypter(suite, from_peer);
    let mut seal = |typ: ContentType, payload: &[u8]| {
        let msg = OutboundPlainMessage {
            typ,
            version: ProtocolVersion::TLSv1_2,
            payload: OutboundChunks::Single(payload),
        };
        let sealed = sealer.encrypt(msg, seq).expect("ring seals").encode();
        seq += 1;
        sealed
    };
    let wire = stream(&mut input, tls13, layer_is_server, &mut seal);
    // Cut into reads where the script says: record boundaries fall anywhere.
    let mut reads = Vec::new();
    let mut rest = &wire[..];
    while !rest.is_empty() {
        let n = match input.u16() {
            Some(n) => usize::from(n) % (rest.len() + 1),
            None => rest.len(),
        };
        let (read, after) = rest.split_at(n.max(1));
        reads.push(read);
        rest = after;
    }
    let oracle = through_rustls(&mut oracle, &reads);
    let ours = through_gateway(&layer, &reads);
    // Never a byte rustls would not deliver.
    assert!(
        oracle.plain.starts_with(&ours.plain),
        "the layer delivered plaintext rustls does not: ours {:?} / rustls {:?}",
        ours,
        oracle
    );
    match (&ours.refused, &oracle.refused) {
        (None, None) => {
            assert!(
                ours.plain == oracle.plain,
                "plaintext: ours {ours:?} / rustls {oracle:?}"
            );
            assert_eq!(ours.closed, oracle.closed, "close_notify");
            assert_eq!(ours.truncated, oracle.truncated, "truncation");
        }
        (Some(why), Some(_)) => {
            if !STRICTER.iter().any(|s| why.contains(s)) {
                assert!(
                    ours.plain == oracle.plain,
                    "plaintext before the refusal: ours {ours:?} / rustls {oracle:?}"
                );
            }
        }
        (None, Some(theirs)) => panic!(
            "rustls refused ({theirs}) what the layer took: ours {ours:?} / rustls {oracle:?}"
        ),
        (Some(why), None) => assert!(
            STRICTER.iter().any(|s| why.contains(s)),
            "the layer refused ({why}) what rustls took: ours {ours:?} / rustls {oracle:?}"
        ),
    }

    // And the other way: what the layer seals, rustls opens to exactly that.
    let n = usize::from(input.u16().unwrap_or(0));
    let plain_a = input.bytes(n);
    let n = usize::from(input.u16().unwrap_or(0)) % 40_000;
    let plain_b = input.bytes(n);
    let mut sealed = Vec::new();
    layer
        .seal_in_slots(plain_a, &mut sealed)
        .expect("seal in slots");
    sealed.extend(layer.seal(plain_b).expect("seal"));
    sealed.extend(layer.seal_alert(0).expect("close_notify"));
    let mut rx_seq = to_peer.seq;
    let mut opener = decrypter(suite, to_peer);
    let mut opened = Vec::new();
    let mut last = None;
    let mut at = 0;
    while at < sealed.len() {
        let header = &sealed[at..at + 5];
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        assert_eq!(header[1..3], [3, 3], "record version");
        if tls13 {
            assert_eq!(header[0], 23, "TLS 1.3 outer type");
        }
        let mut body = sealed[at + 5..at + 5 + len].to_vec();
        let msg = InboundOpaqueMessage::new(
            ContentType::from(header[0]),
            ProtocolVersion::TLSv1_2,
            &mut body,
        );
        let plain = opener
            .decrypt(msg, rx_seq)
            .expect("rustls opens every record the layer seals");
        assert!(plain.payload.len() <= 16_384, "record size");
        rx_seq += 1;
        if plain.typ == ContentType::ApplicationData {
            opened.extend_from_slice(plain.payload);
        }
        last = Some((plain.typ, plain.payload.to_vec()));
        at += 5 + len;
    }
    assert_eq!(opened.len(), plain_a.len() + plain_b.len(), "sealed length");
    assert!(
        opened[..plain_a.len()] == *plain_a && opened[plain_a.len()..] == *plain_b,
        "sealed bytes"
    );
    assert_eq!(
        last,
        Some((ContentType::Alert, vec![1, 0])),
        "ends with close_notify"
    );
}

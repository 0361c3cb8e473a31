//! The gateway's PROXY v2 header against a maintained parser (the
//! `proxy-header` crate): whatever the input describes (addresses of
//! either family or none, any text in the TLVs, any identity, a certificate
//! of any bytes, any verdict, mode and re-judgement), the header is either
//! refused for a reason the input explains (exactly at `MAX_HEADER_LEN`
//! bytes it is sent, one more is refused) or the parser reads back exactly
//! those facts, consumes exactly the announced length, finds no TLV the
//! gateway did not mean to send, and finds `verify` = 0, the identity and
//! the certificate only for a client the gateway admitted.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use gateway::access_log::Verdict;
use gateway::config::Mode;
use gateway::proxy_protocol::{
    Header, MAX_HEADER_LEN, ProxyProtocolError, Session, Standing, header,
};
use proxy_header::{ParseConfig, ProxyHeader, Tlv};

/// Reads the input front to back; exhausted input reads as zeros/empty.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head.to_vec()
    }
    /// A length-prefixed string (lengths up to 255; any bytes, as text).
    fn text(&mut self) -> String {
        let n = usize::from(self.byte());
        String::from_utf8_lossy(&self.bytes(n)).into_owned()
    }
    fn addr(&mut self) -> SocketAddr {
        let ip = if self.byte() & 1 == 0 {
            let o = self.bytes(4);
            IpAddr::V4(Ipv4Addr::new(
                *o.first().unwrap_or(&0),
                *o.get(1).unwrap_or(&0),
                *o.get(2).unwrap_or(&0),
                *o.get(3).unwrap_or(&0),
            ))
        } else {
            let mut o = [0u8; 16];
            for (d, s) in o.iter_mut().zip(self.bytes(16)) {
                *d = s;
            }
            IpAddr::V6(Ipv6Addr::from(o))
        };
        let port = u16::from_be_bytes([self.byte(), self.byte()]);
        SocketAddr::new(ip, port)
    }
}

/// A connection's facts and the gateway's judgement of it; the leaf is
/// owned here, borrowed by the `Session`.
#[derive(Clone)]
struct Case {
    client: SocketAddr,
    local: Option<SocketAddr>,
    sni: Option<String>,
    version: String,
    cipher: Option<String>,
    sig_alg: Option<String>,
    key_alg: Option<String>,
    leaf: Option<Vec<u8>>,
    common_name: Option<String>,
    identity: Option<Vec<String>>,
    route: String,
    send_client_cert: bool,
    standing: Standing,
}

impl Case {
    fn read(data: &[u8]) -> Case {
        let mut input = Input(data);
        let flags = input.byte();
        let on = |bit: u8| flags & (1 << bit) != 0;
        let client = input.addr();
        let local = on(0).then(|| input.addr());
        let opt = |input: &mut Input<'_>, present: bool| present.then(|| input.text());
        let sni = opt(&mut input, on(1));
        let bits = input.byte();
        let version = input.text();
        let common_name = opt(&mut input, bits & 4 != 0);
        let cipher = opt(&mut input, bits & 8 != 0);
        let sig_alg = opt(&mut input, bits & 16 != 0);
        let key_alg = opt(&mut input, bits & 32 != 0);
        // Up to 64 KiB of certificate: over the format's TLV length and
        // far over MAX_HEADER_LEN, so both refusals are reached; the bytes
        // past the input are zeros.
        let leaf = (bits & 64 != 0).then(|| {
            let n = usize::from(u16::from_be_bytes([input.byte(), input.byte()])) + 64;
            let mut der = input.bytes(n);
            der.resize(n, 0);
            der
        });
        let identity = on(3).then(|| (0..input.byte() % 8).map(|_| input.text()).collect());
        let route = input.text();
        let judged = input.byte();
        let verdict = match judged & 3 {
            0 => Verdict::Allow,
            1 => Verdict::Audit,
            2 => Verdict::Deny,
            _ => Verdict::Error,
        };
        let mode = match (judged >> 2) % 3 {
            0 => Mode::Enforce,
            1 => Mode::Audit,
            _ => Mode::Off,
        };
        Case {
            client,
            local,
            sni,
            version,
            cipher,
            sig_alg,
            key_alg,
            leaf,
            common_name,
            identity,
            route,
            send_client_cert: on(2),
            standing: Standing {
                verdict,
                mode,
                would_deny: judged & 16 != 0,
            },
        }
    }

    fn header(&self) -> Header {
        header(
            Session {
                client: self.client,
                local: self.local,
                sni: self.sni.clone(),
                version: self.version.clone(),
                cipher: self.cipher.clone(),
                sig_alg: self.sig_alg.clone(),
                key_alg: self.key_alg.clone(),
                leaf: self.leaf.as_deref(),
                common_name: self.common_name.clone(),
                identity: self.identity.clone(),
                route: self.route.clone(),
                send_client_cert: self.send_client_cert,
            },
            self.standing,
        )
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

pub fn check(data: &[u8]) {
    let case = Case::read(data);
    let want = case.header();
    let bytes = match want.encode() {
        Ok(bytes) => bytes,
        Err(e) => return refused_for_cause(&case, e),
    };
    assert!(bytes.len() <= MAX_HEADER_LEN, "sent {} bytes", bytes.len());
    let (got, used) =
        ProxyHeader::parse(&bytes, ParseConfig::default()).expect("the parser accepts it");
    assert_eq!(used, bytes.len(), "the announced length is the header");

    let (s, d) = (want.source.unwrap(), want.destination.unwrap());
    let a = got.proxied_address().expect("addresses");
    assert_eq!(canonical(a.source), canonical(s));
    assert_eq!(canonical(a.destination), canonical(d));
    let both_v4 = s.ip().to_canonical().is_ipv4() && d.ip().to_canonical().is_ipv4();
    assert_eq!(a.source.is_ipv4(), both_v4, "one family for both");

    let mut authority = None;
    let mut ssl = None;
    let mut identity = None;
    let mut route = None;
    for tlv in got.tlvs() {
        match tlv.expect("every TLV is well-formed") {
            Tlv::Authority(a) => assert!(authority.replace(a.into_owned()).is_none()),
            Tlv::Ssl(s) => assert!(ssl.replace(s.into_owned()).is_none()),
            Tlv::Custom(0xE0, v) => assert!(identity.replace(v.into_owned()).is_none()),
            Tlv::Custom(0xE1, v) => assert!(route.replace(v.into_owned()).is_none()),
            other => panic!("a TLV the gateway never sends: {other:?}"),
        }
    }
    assert_eq!(authority, want.authority);
    assert_eq!(route, want.route.map(String::into_bytes));
    let identity: Option<Vec<String>> = identity
        .map(|json| serde_json::from_slice(&json).expect("the identity is a JSON array of names"));
    assert_eq!(identity, want.identity);
    let identity = want.identity;

    match (ssl, want.tls) {
        (None, None) => {}
        (Some(ssl), Some(tls)) => {
            assert!(ssl.client_ssl());
            assert_eq!(ssl.client_cert_conn(), case.leaf.is_some());
            assert_eq!(ssl.client_cert_sess(), case.leaf.is_some());
            // Verified only with a certificate, allowed by a route that
            // checks one, and not denied by a reload.
            let st = case.standing;
            let verified = ssl.verify() == 0;
            assert_eq!(
                verified,
                case.leaf.is_some()
                    && st.verdict == Verdict::Allow
                    && st.mode != Mode::Off
                    && !st.would_deny
            );
            assert_eq!(ssl.version(), Some(tls.version.as_str()));
            let mut cert = None;
            for sub in ssl.tlvs() {
                match sub.expect("every sub-TLV is well-formed") {
                    Tlv::SslVersion(_)
                    | Tlv::SslCn(_)
                    | Tlv::SslCipher(_)
                    | Tlv::SslSigAlg(_)
                    | Tlv::SslKeyAlg(_) => {}
                    Tlv::Custom(0x28, der) => assert!(cert.replace(der.into_owned()).is_none()),
                    other => panic!("a sub-TLV the gateway never sends: {other:?}"),
                }
            }
            assert_eq!(ssl.cn(), tls.common_name.as_deref());
            // A would-deny's certificate may name anyone.
            assert!(ssl.cn().is_none() || verified, "a CN for a client not admitted");
            assert_eq!(ssl.cipher(), tls.cipher.as_deref());
            assert_eq!(ssl.sig_alg(), tls.sig_alg.as_deref());
            assert_eq!(ssl.key_alg(), tls.key_alg.as_deref());
            assert_eq!(cert, tls.client_cert_der);
            assert!(cert.is_none() || (verified && case.send_client_cert));
            assert_eq!(
                cert.as_deref(),
                case.leaf
                    .as_deref()
                    .filter(|_| verified && case.send_client_cert)
            );
            assert_eq!(identity.is_some(), verified && case.identity.is_some());
        }
        (got, want) => panic!("SSL TLV: sent {want:?}, read {:?}", got.is_some()),
    }
}

/// A refused header: the input explains why, and the length limit is
/// exact (a certificate shortened to fit is sent at `MAX_HEADER_LEN`
/// bytes, one byte longer is refused).
fn refused_for_cause(case: &Case, e: ProxyProtocolError) {
    match e {
        ProxyProtocolError::UnknownAddress(_) => assert!(case.local.is_none(), "{e}"),
        // Only the certificate is long enough to pass a TLV's 16 bits.
        ProxyProtocolError::TooLong { .. } => {
            let sent = case.header().tls.and_then(|t| t.client_cert_der);
            assert!(sent.is_some_and(|l| l.len() > MAX_HEADER_LEN), "{e}");
        }
        ProxyProtocolError::TooLarge { len, max } => {
            assert_eq!(max, MAX_HEADER_LEN);
            assert!(len > max, "{e}");
            let sent = case.header().tls.and_then(|t| t.client_cert_der);
            let Some(der) = sent else {
                // Texts of at most 255 bytes each never add up to 16 KiB.
                panic!("refused without a certificate: {e}");
            };
            let over = len - max;
            if der.len() >= over {
                let fit = |n: usize| Case {
                    leaf: Some(der[..n].to_vec()),
                    ..case.clone()
                };
                let exact = fit(der.len() - over).header().encode();
                assert_eq!(exact.map(|b| b.len()), Ok(MAX_HEADER_LEN));
                let one_more = fit(der.len() - over + 1).header().encode();
                assert_eq!(
                    one_more,
                    Err(ProxyProtocolError::TooLarge {
                        len: MAX_HEADER_LEN + 1,
                        max: MAX_HEADER_LEN
                    })
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The input for an admitted client (Allow, enforce: the judgement
    /// byte is past the input, so 0) with both addresses, a route that
    /// sends the certificate, and a certificate of `cert_len` bytes.
    fn admitted_with_cert(cert_len: u16) -> Vec<u8> {
        let mut v = vec![0b101];
        v.extend_from_slice(&[0, 192, 0, 2, 7, 0xC7, 0x38]);
        v.extend_from_slice(&[0, 198, 51, 100, 1, 0x20, 0xFB]);
        v.push(64);
        v.push(7);
        v.extend_from_slice(b"TLSv1.3");
        v.extend_from_slice(&cert_len.to_be_bytes());
        v
    }

    #[test]
    fn the_corpus_and_both_sides_of_the_limits() {
        for len in [0, 1000, 16_000, 16_300, 20_000, 65_400, 65_535] {
            check(&admitted_with_cert(len));
        }
        let encode = |input: &[u8]| Case::read(input).header().encode();
        assert!(encode(&admitted_with_cert(16_000)).is_ok());
        assert!(matches!(
            encode(&admitted_with_cert(20_000)),
            Err(ProxyProtocolError::TooLarge { .. })
        ));
        assert!(matches!(
            encode(&admitted_with_cert(65_535)),
            Err(ProxyProtocolError::TooLong { .. })
        ));
        // A reload's would-deny (route name empty, then the judgement
        // byte): the same certificate is not sent, so the header fits.
        let mut not_admitted = admitted_with_cert(20_000);
        not_admitted.extend(std::iter::repeat_n(0, 20_064));
        not_admitted.extend_from_slice(&[0, 16]);
        assert!(Case::read(&not_admitted).standing.would_deny);
        assert!(encode(&not_admitted).is_ok());
        check(&not_admitted);
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/proxy_header_vs_parser");
        for entry in std::fs::read_dir(dir).unwrap() {
            check(&std::fs::read(entry.unwrap().path()).unwrap());
        }
    }
}

//! The gateway's PROXY v2 encoder against a maintained parser (the
//! `proxy-header` crate): whatever the input describes (addresses of
//! either family, any text in the TLVs, any identity, a certificate of any
//! bytes), the parser must read back exactly those facts, consume exactly
//! the announced length, and find no TLV the gateway did not mean to send.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use gateway::proxy_protocol::{Header, TlsFacts};
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

fn header(data: &[u8]) -> Header {
    let mut input = Input(data);
    let flags = input.byte();
    let on = |bit: u8| flags & (1 << bit) != 0;
    let addresses = on(0);
    let (source, destination) = if addresses {
        (Some(input.addr()), Some(input.addr()))
    } else {
        (None, None)
    };
    let opt = |input: &mut Input<'_>, present: bool| present.then(|| input.text());
    let authority = opt(&mut input, on(1));
    let tls = on(2).then(|| {
        let bits = input.byte();
        TlsFacts {
            client_cert: bits & 1 != 0,
            verified: bits & 2 != 0,
            version: input.text(),
            common_name: opt(&mut input, bits & 4 != 0),
            cipher: opt(&mut input, bits & 8 != 0),
            sig_alg: opt(&mut input, bits & 16 != 0),
            key_alg: opt(&mut input, bits & 32 != 0),
            client_cert_der: (bits & 64 != 0).then(|| {
                let n = usize::from(u16::from_be_bytes([input.byte(), input.byte()]));
                input.bytes(n)
            }),
        }
    });
    let identity = on(3).then(|| (0..input.byte() % 8).map(|_| input.text()).collect());
    let route = opt(&mut input, on(4));
    Header {
        source,
        destination,
        authority,
        tls,
        identity,
        route,
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

pub fn check(data: &[u8]) {
    let want = header(data);
    // Fuzz inputs stay far below the format's 64 KiB: never refused.
    let bytes = want.encode().expect("a header of this size encodes");
    let (got, used) =
        ProxyHeader::parse(&bytes, ParseConfig::default()).expect("the parser accepts it");
    assert_eq!(used, bytes.len(), "the announced length is the header");

    match (want.source, want.destination) {
        (Some(s), Some(d)) => {
            let a = got.proxied_address().expect("addresses");
            assert_eq!(canonical(a.source), canonical(s));
            assert_eq!(canonical(a.destination), canonical(d));
            let both_v4 = s.ip().to_canonical().is_ipv4() && d.ip().to_canonical().is_ipv4();
            assert_eq!(a.source.is_ipv4(), both_v4, "one family for both");
        }
        _ => assert!(got.proxied_address().is_none()),
    }

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

    match (ssl, want.tls) {
        (None, None) => {}
        (Some(ssl), Some(tls)) => {
            assert!(ssl.client_ssl());
            assert_eq!(ssl.client_cert_conn(), tls.client_cert);
            assert_eq!(ssl.client_cert_sess(), tls.client_cert);
            assert_eq!(ssl.verify() == 0, !tls.client_cert || tls.verified);
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
            assert_eq!(ssl.cipher(), tls.cipher.as_deref());
            assert_eq!(ssl.sig_alg(), tls.sig_alg.as_deref());
            assert_eq!(ssl.key_alg(), tls.key_alg.as_deref());
            assert_eq!(cert, tls.client_cert_der);
        }
        (got, want) => panic!("SSL TLV: sent {want:?}, read {:?}", got.is_some()),
    }
}

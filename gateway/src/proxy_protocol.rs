//! The PROXY protocol v2 header a route sends its backends before any other
//! byte, so a backend learns who the client was.
//!
//! Laid out as HAProxy's `send-proxy-v2` with `proxy-v2-options
//! ssl,ssl-cn,ssl-cipher,cert-sig,cert-key,authority` lays it out, so
//! existing backends read it: addresses, then `PP2_TYPE_AUTHORITY` (the
//! SNI), then `PP2_TYPE_SSL` (client bits, verify, and the sub-TLVs
//! version, CN, key algorithm, signature algorithm, cipher, and optionally
//! the client's leaf certificate), then the gateway's own TLVs from the
//! custom range:
//!
//! | type | value |
//! |---|---|
//! | `0xE0` (`PP2_TYPE_GATEWAY_IDENTITY`) | the verified identity: every URI, DNS and email SAN the policy judged, as the JSON array the access log writes (`["spiffe://…","dns:…","email:…"]`); only when the route let the client in on it (not for audit's would-deny or `off`) |
//! | `0xE1` (`PP2_TYPE_GATEWAY_ROUTE`) | the route's name |
//!
//! As in HAProxy, `SIG_ALG` and `KEY_ALG` describe the certificate the
//! gateway presented (the listener's), spelled as OpenSSL names them
//! (`ecdsa-with-SHA256`, `EC256`); `CN` is the client's. `verify` is 0 only
//! when the client presented a certificate and the route admitted it (the
//! spec: "zero if the client presented a certificate and it was
//! successfully verified"); without a certificate it is 1, as go-proxyproto
//! and others read 0 as verified. The identity and the certificate (0x28) go
//! only with `verify` = 0.
//!
//! What "admitted" means is [`Standing::admits`]: the one place that maps
//! the gateway's verdict to what a backend is told.
//!
//! A header is refused, never sent partly true: without both addresses
//! (the spec's `AF_UNSPEC` would let the backend take the gateway's own),
//! or longer than [`MAX_HEADER_LEN`].

use std::net::{IpAddr, SocketAddr};

use crate::access_log::Verdict;
use crate::config::Mode;

/// The v2 signature.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY.
const VERSION_PROXY: u8 = 0x21;
const TCP_OVER_IPV4: u8 = 0x11;
const TCP_OVER_IPV6: u8 = 0x21;

pub const PP2_TYPE_AUTHORITY: u8 = 0x02;
pub const PP2_TYPE_SSL: u8 = 0x20;
pub const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
pub const PP2_SUBTYPE_SSL_CN: u8 = 0x22;
pub const PP2_SUBTYPE_SSL_CIPHER: u8 = 0x23;
pub const PP2_SUBTYPE_SSL_SIG_ALG: u8 = 0x24;
pub const PP2_SUBTYPE_SSL_KEY_ALG: u8 = 0x25;
pub const PP2_SUBTYPE_SSL_CLIENT_CERT: u8 = 0x28;
/// The gateway's TLVs, in the range the spec leaves to applications.
pub const PP2_TYPE_GATEWAY_IDENTITY: u8 = 0xE0;
pub const PP2_TYPE_GATEWAY_ROUTE: u8 = 0xE1;

pub const PP2_CLIENT_SSL: u8 = 0x01;
pub const PP2_CLIENT_CERT_CONN: u8 = 0x02;
pub const PP2_CLIENT_CERT_SESS: u8 = 0x04;

/// The longest header the gateway sends, all of it (16 bytes of preamble
/// included). HAProxy's `accept-proxy` reads the header within one buffer
/// (`tune.bufsize`, 16384 bytes by default): HAProxy 2.6 takes a header
/// of exactly 16384 bytes and resets the connection for 16385 (measured),
/// so the client would reach a backend that refuses it after the gateway
/// admitted it. Refused here instead, where it is logged and counted. Only
/// a large client certificate (`proxy_protocol_client_cert`) or identity
/// comes near it.
pub const MAX_HEADER_LEN: usize = 16 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyProtocolError {
    /// A TLV's value is beyond the 16-bit length the format has: the
    /// connection is refused rather than sent a header the backend would
    /// misread.
    #[error("PROXY v2 header: {what} is {len} bytes, more than the format's 65535")]
    TooLong { what: &'static str, len: usize },
    /// The whole header is longer than [`MAX_HEADER_LEN`]: refused rather
    /// than sent to a backend that cannot read it.
    #[error("PROXY v2 header: {len} bytes, more than the {max} a backend is sure to read")]
    TooLarge { len: usize, max: usize },
    /// The client's address or the one it reached is unknown (the socket
    /// could not say): refused rather than sent as `AF_UNSPEC`, which tells
    /// the backend to take the gateway's address for the client's.
    #[error("PROXY v2 header: the {0} address is unknown")]
    UnknownAddress(&'static str),
}

impl ProxyProtocolError {
    /// The `reason` of `gateway_connections_refused_total` for a connection
    /// refused because its header could not be written.
    pub fn label(&self) -> &'static str {
        match self {
            ProxyProtocolError::TooLong { .. } | ProxyProtocolError::TooLarge { .. } => {
                "proxy_header_too_large"
            }
            ProxyProtocolError::UnknownAddress(_) => "proxy_header_no_address",
        }
    }
}

/// What the gateway decided about a connection, as far as its header
/// tells the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    /// The handshake's verdict.
    pub verdict: Verdict,
    /// The route's mode as the current state has it (a reload during the
    /// handshake may have changed it).
    pub mode: Mode,
    /// A reload during the handshake re-judged the client and found the
    /// current state would deny it (audit lets it through).
    pub would_deny: bool,
}

impl Standing {
    /// Whether the backend may be told that a client that presented a
    /// certificate (`presented`) is verified, and be given its identity
    /// and certificate: the route checked the certificate and let it in on
    /// its merits, by the state the connection goes on with. Audit's
    /// would-deny, `off` (which checks nothing), and a client a reload
    /// would now deny are not admitted.
    pub fn admits(self, presented: bool) -> bool {
        self.verdict == Verdict::Allow && presented && self.mode != Mode::Off && !self.would_deny
    }
}

/// What the header says about one connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Header {
    /// The client's address and port, and the address and port it
    /// connected to (the listener's).
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    /// The SNI the client sent.
    pub authority: Option<String>,
    pub tls: Option<TlsFacts>,
    /// The identity the route admitted, in the access log's spelling.
    pub identity: Option<Vec<String>>,
    pub route: Option<String>,
}

/// The client's TLS session, as `PP2_TYPE_SSL` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFacts {
    /// The client presented a certificate on this connection (the gateway
    /// resumes no sessions, so on this connection is in this session).
    pub client_cert: bool,
    /// The certificate was verified and the route admitted it
    /// ([`Standing::admits`]).
    pub verified: bool,
    /// `TLSv1.3` or `TLSv1.2`.
    pub version: String,
    /// The client certificate's common name, when it has exactly one.
    pub common_name: Option<String>,
    /// The cipher as OpenSSL names it.
    pub cipher: Option<String>,
    /// The listener certificate's signature and key algorithms.
    pub sig_alg: Option<String>,
    pub key_alg: Option<String>,
    /// The client's leaf, DER, when the route sends it.
    pub client_cert_der: Option<Vec<u8>>,
}

/// What the gateway knows of a connection when it writes the header,
/// before its judgement decides what the backend may be told.
#[derive(Debug, Clone)]
pub struct Session<'a> {
    pub client: SocketAddr,
    /// The address the client reached; None if the socket could not say.
    pub local: Option<SocketAddr>,
    pub sni: Option<String>,
    pub version: String,
    pub cipher: Option<String>,
    /// The listener certificate's signature and key algorithms.
    pub sig_alg: Option<String>,
    pub key_alg: Option<String>,
    /// The client's leaf, if it presented one, and its common name.
    pub leaf: Option<&'a [u8]>,
    pub common_name: Option<String>,
    /// The identity the verifier read, in the access log's spelling.
    pub identity: Option<Vec<String>>,
    pub route: String,
    /// The route sends the client's leaf (`proxy_protocol_client_cert`).
    pub send_client_cert: bool,
}

/// The header a route sends for `session`: verified, the identity and the
/// client's certificate only when `standing` says the client was admitted.
pub fn header(session: Session<'_>, standing: Standing) -> Header {
    let presented = session.leaf.is_some();
    let admitted = standing.admits(presented);
    Header {
        source: Some(session.client),
        destination: session.local,
        authority: session.sni,
        tls: Some(TlsFacts {
            client_cert: presented,
            verified: admitted,
            version: session.version,
            // Like the identity: a would-deny's CN may be anyone's.
            common_name: session.common_name.filter(|_| admitted),
            cipher: session.cipher,
            sig_alg: session.sig_alg,
            key_alg: session.key_alg,
            client_cert_der: session
                .leaf
                .filter(|_| admitted && session.send_client_cert)
                .map(<[u8]>::to_vec),
        }),
        identity: session.identity.filter(|_| admitted),
        route: Some(session.route),
    }
}

impl Header {
    /// The header's bytes.
    pub fn encode(&self) -> Result<Vec<u8>, ProxyProtocolError> {
        let mut body = Vec::with_capacity(256);
        let family = match self.addresses()? {
            (IpAddr::V4(s), sp, IpAddr::V4(d), dp) => {
                body.extend_from_slice(&s.octets());
                body.extend_from_slice(&d.octets());
                body.extend_from_slice(&sp.to_be_bytes());
                body.extend_from_slice(&dp.to_be_bytes());
                TCP_OVER_IPV4
            }
            (s, sp, d, dp) => {
                body.extend_from_slice(&v6(s).octets());
                body.extend_from_slice(&v6(d).octets());
                body.extend_from_slice(&sp.to_be_bytes());
                body.extend_from_slice(&dp.to_be_bytes());
                TCP_OVER_IPV6
            }
        };
        if let Some(sni) = &self.authority {
            tlv(&mut body, PP2_TYPE_AUTHORITY, sni.as_bytes(), "authority")?;
        }
        if let Some(tls) = &self.tls {
            tlv(&mut body, PP2_TYPE_SSL, &tls.encode()?, "SSL TLV")?;
        }
        if let Some(identity) = &self.identity {
            // Names are text the identity module already judged; JSON keeps
            // a name with a comma or quote from reading as two.
            let json = serde_json::to_vec(identity).unwrap_or_default();
            tlv(&mut body, PP2_TYPE_GATEWAY_IDENTITY, &json, "identity")?;
        }
        if let Some(route) = &self.route {
            tlv(&mut body, PP2_TYPE_GATEWAY_ROUTE, route.as_bytes(), "route")?;
        }
        if 16 + body.len() > MAX_HEADER_LEN {
            return Err(ProxyProtocolError::TooLarge {
                len: 16 + body.len(),
                max: MAX_HEADER_LEN,
            });
        }
        let len = u16::try_from(body.len()).map_err(|_| ProxyProtocolError::TooLong {
            what: "the header",
            len: body.len(),
        })?;
        let mut out = Vec::with_capacity(16 + body.len());
        out.extend_from_slice(&SIGNATURE);
        out.push(VERSION_PROXY);
        out.push(family);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Both addresses in one family: IPv4 when both are, else both as IPv6
    /// (an IPv4 one mapped).
    fn addresses(&self) -> Result<(IpAddr, u16, IpAddr, u16), ProxyProtocolError> {
        let s = self
            .source
            .ok_or(ProxyProtocolError::UnknownAddress("client's"))?;
        let d = self
            .destination
            .ok_or(ProxyProtocolError::UnknownAddress("listener's"))?;
        Ok((
            s.ip().to_canonical(),
            s.port(),
            d.ip().to_canonical(),
            d.port(),
        ))
    }
}

impl TlsFacts {
    /// `PP2_TYPE_SSL`'s value: client bits, verify, sub-TLVs in HAProxy's order.
    fn encode(&self) -> Result<Vec<u8>, ProxyProtocolError> {
        let mut client = PP2_CLIENT_SSL;
        if self.client_cert {
            client |= PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS;
        }
        // 0 only for a certificate presented and admitted: HAProxy sends 0
        // without one too, but the spec and readers such as go-proxyproto
        // take 0 as "verified".
        let verify: u32 = u32::from(!(self.client_cert && self.verified));
        let mut v = vec![client];
        v.extend_from_slice(&verify.to_be_bytes());
        tlv(
            &mut v,
            PP2_SUBTYPE_SSL_VERSION,
            self.version.as_bytes(),
            "version",
        )?;
        let subs = [
            (PP2_SUBTYPE_SSL_CN, &self.common_name, "CN"),
            (PP2_SUBTYPE_SSL_KEY_ALG, &self.key_alg, "key algorithm"),
            (
                PP2_SUBTYPE_SSL_SIG_ALG,
                &self.sig_alg,
                "signature algorithm",
            ),
            (PP2_SUBTYPE_SSL_CIPHER, &self.cipher, "cipher"),
        ];
        for (kind, value, what) in subs {
            if let Some(value) = value {
                tlv(&mut v, kind, value.as_bytes(), what)?;
            }
        }
        if let Some(der) = &self.client_cert_der {
            tlv(
                &mut v,
                PP2_SUBTYPE_SSL_CLIENT_CERT,
                der,
                "client certificate",
            )?;
        }
        Ok(v)
    }
}

fn v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn tlv(
    out: &mut Vec<u8>,
    kind: u8,
    value: &[u8],
    what: &'static str,
) -> Result<(), ProxyProtocolError> {
    let len = u16::try_from(value.len()).map_err(|_| ProxyProtocolError::TooLong {
        what,
        len: value.len(),
    })?;
    out.push(kind);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(value);
    Ok(())
}

/// OpenSSL's name for a suite, as HAProxy's `ssl_fc_cipher` reports it;
/// the IANA name for any other.
pub fn openssl_cipher_name(suite: rustls::CipherSuite) -> String {
    use rustls::CipherSuite as S;
    let name = match suite {
        S::TLS13_AES_128_GCM_SHA256 => "TLS_AES_128_GCM_SHA256",
        S::TLS13_AES_256_GCM_SHA384 => "TLS_AES_256_GCM_SHA384",
        S::TLS13_CHACHA20_POLY1305_SHA256 => "TLS_CHACHA20_POLY1305_SHA256",
        S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => "ECDHE-ECDSA-AES128-GCM-SHA256",
        S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 => "ECDHE-ECDSA-AES256-GCM-SHA384",
        S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 => "ECDHE-ECDSA-CHACHA20-POLY1305",
        S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => "ECDHE-RSA-AES128-GCM-SHA256",
        S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => "ECDHE-RSA-AES256-GCM-SHA384",
        S::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => "ECDHE-RSA-CHACHA20-POLY1305",
        other => {
            return other
                .as_str()
                .map_or_else(|| format!("{other:?}"), str::to_owned);
        }
    };
    name.to_owned()
}

/// The signature and key algorithms of a certificate, as OpenSSL (and so
/// HAProxy's `ssl_fc_*`/PP2 sub-TLVs) spell them: `ecdsa-with-SHA256`,
/// `RSA-SHA256`, `ED25519`; `EC256`, `RSA2048`, `ED25519`. `None` for a
/// certificate that does not parse or an algorithm without a known name.
pub fn certificate_algorithms(der: &[u8]) -> (Option<String>, Option<String>) {
    use x509_parser::prelude::*;
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return (None, None);
    };
    let sig = cert.signature_algorithm.algorithm.to_id_string();
    let sig_alg = match sig.as_str() {
        "1.2.840.10045.4.3.2" => Some("ecdsa-with-SHA256"),
        "1.2.840.10045.4.3.3" => Some("ecdsa-with-SHA384"),
        "1.2.840.10045.4.3.4" => Some("ecdsa-with-SHA512"),
        "1.2.840.113549.1.1.11" => Some("RSA-SHA256"),
        "1.2.840.113549.1.1.12" => Some("RSA-SHA384"),
        "1.2.840.113549.1.1.13" => Some("RSA-SHA512"),
        "1.2.840.113549.1.1.10" => Some("RSASSA-PSS"),
        "1.3.101.112" => Some("ED25519"),
        _ => None,
    };
    let key_alg = match cert.public_key().parsed() {
        Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => Some(format!("RSA{}", rsa.key_size())),
        Ok(x509_parser::public_key::PublicKey::EC(ec)) => Some(format!("EC{}", ec.key_size())),
        _ if cert.public_key().algorithm.algorithm.to_id_string() == "1.3.101.112" => {
            Some("ED25519".to_owned())
        }
        _ => None,
    };
    (sig_alg.map(str::to_owned), key_alg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Header {
        Header {
            source: Some("192.0.2.7:51000".parse().unwrap()),
            destination: Some("198.51.100.1:8443".parse().unwrap()),
            authority: Some("orders.example.internal".into()),
            tls: Some(TlsFacts {
                client_cert: true,
                verified: true,
                version: "TLSv1.3".into(),
                common_name: Some("frontend".into()),
                cipher: Some("TLS_AES_256_GCM_SHA384".into()),
                sig_alg: Some("ecdsa-with-SHA256".into()),
                key_alg: Some("EC256".into()),
                client_cert_der: None,
            }),
            identity: Some(vec!["spiffe://example.internal/frontend".into()]),
            route: Some("orders".into()),
        }
    }

    /// The exact bytes HAProxy would put on the wire for these facts,
    /// spelled out by hand from the spec.
    #[test]
    fn ipv4_bytes_as_the_spec_lays_them_out() {
        let h = Header {
            tls: None,
            identity: None,
            authority: Some("a".into()),
            route: Some("r".into()),
            ..full()
        };
        let got = h.encode().unwrap();
        let mut want = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0x00, 12 + 4 + 4]);
        want.extend_from_slice(&[192, 0, 2, 7, 198, 51, 100, 1]);
        want.extend_from_slice(&51000u16.to_be_bytes());
        want.extend_from_slice(&8443u16.to_be_bytes());
        want.extend_from_slice(&[0x02, 0, 1, b'a', 0xE1, 0, 1, b'r']);
        assert_eq!(got, want);
    }

    #[test]
    fn ssl_tlv_bits_and_sub_tlvs_in_haproxy_order() {
        let got = full().tls.unwrap().encode().unwrap();
        assert_eq!(got[0], 0x07, "SSL | CERT_CONN | CERT_SESS");
        assert_eq!(&got[1..5], &[0, 0, 0, 0], "verified: verify = 0");
        let mut kinds = Vec::new();
        let mut rest = &got[5..];
        while let [kind, hi, lo, tail @ ..] = rest {
            let len = usize::from(u16::from_be_bytes([*hi, *lo]));
            kinds.push(*kind);
            rest = &tail[len..];
        }
        assert_eq!(kinds, [0x21, 0x22, 0x25, 0x24, 0x23]);
        let unverified = TlsFacts {
            verified: false,
            ..full().tls.unwrap()
        }
        .encode()
        .unwrap();
        assert_eq!(&unverified[1..5], &[0, 0, 0, 1], "not admitted: verify ≠ 0");
        let no_cert = TlsFacts {
            client_cert: false,
            common_name: None,
            ..full().tls.unwrap()
        }
        .encode()
        .unwrap();
        assert_eq!(
            &no_cert[..5],
            &[0x01, 0, 0, 0, 1],
            "no certificate: not verified"
        );
        let no_cert_but_verified = TlsFacts {
            client_cert: false,
            verified: true,
            ..full().tls.unwrap()
        }
        .encode()
        .unwrap();
        assert_eq!(&no_cert_but_verified[1..5], &[0, 0, 0, 1]);
    }

    #[test]
    fn mixed_families_go_as_ipv6_and_mapped_ipv4_as_ipv4() {
        let h = Header {
            source: Some("[::ffff:192.0.2.7]:1".parse().unwrap()),
            destination: Some("[2001:db8::1]:2".parse().unwrap()),
            ..bare()
        };
        let got = h.encode().unwrap();
        assert_eq!(&got[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(
            &got[16..32],
            &"::ffff:192.0.2.7"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        let both_mapped = Header {
            source: Some("[::ffff:192.0.2.7]:1".parse().unwrap()),
            destination: Some("[::ffff:192.0.2.8]:2".parse().unwrap()),
            ..bare()
        };
        assert_eq!(both_mapped.encode().unwrap()[13], 0x11);
    }

    /// Addresses only, no TLV.
    fn bare() -> Header {
        Header {
            source: full().source,
            destination: full().destination,
            ..Header::default()
        }
    }

    #[test]
    fn a_value_beyond_the_length_field_is_refused() {
        let h = Header {
            route: Some("x".repeat(70_000)),
            ..bare()
        };
        assert_eq!(
            h.encode(),
            Err(ProxyProtocolError::TooLong {
                what: "route",
                len: 70_000
            })
        );
    }

    /// HAProxy reads a header within one 16 KiB buffer: exactly that much
    /// goes, one byte more is refused.
    #[test]
    fn a_header_beyond_max_header_len_is_refused() {
        // 16 preamble + 12 IPv4 addresses + 3 TLV header.
        let fits = MAX_HEADER_LEN - 16 - 12 - 3;
        let h = Header {
            route: Some("x".repeat(fits)),
            ..bare()
        };
        assert_eq!(h.encode().map(|b| b.len()), Ok(MAX_HEADER_LEN));
        let h = Header {
            route: Some("x".repeat(fits + 1)),
            ..bare()
        };
        assert_eq!(
            h.encode(),
            Err(ProxyProtocolError::TooLarge {
                len: MAX_HEADER_LEN + 1,
                max: MAX_HEADER_LEN
            })
        );
    }

    #[test]
    fn unknown_addresses_are_refused_not_sent_as_unspec() {
        for h in [
            Header {
                source: None,
                ..full()
            },
            Header {
                destination: None,
                ..full()
            },
        ] {
            assert!(matches!(
                h.encode(),
                Err(ProxyProtocolError::UnknownAddress(_))
            ));
        }
    }

    /// Every combination: only an allowed client with a certificate, on a
    /// route that checks one, not denied by a reload, is admitted.
    #[test]
    fn only_a_verified_allowed_client_is_admitted() {
        for verdict in [
            Verdict::Allow,
            Verdict::Audit,
            Verdict::Deny,
            Verdict::Error,
        ] {
            for mode in [Mode::Enforce, Mode::Audit, Mode::Off] {
                for would_deny in [false, true] {
                    for presented in [false, true] {
                        let s = Standing {
                            verdict,
                            mode,
                            would_deny,
                        };
                        let want = verdict == Verdict::Allow
                            && mode != Mode::Off
                            && !would_deny
                            && presented;
                        assert_eq!(s.admits(presented), want, "{s:?} {presented}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_client_not_admitted_gets_no_identity_and_no_certificate() {
        let leaf = b"leaf DER".to_vec();
        let session = Session {
            client: "192.0.2.7:51000".parse().unwrap(),
            local: Some("198.51.100.1:8443".parse().unwrap()),
            sni: Some("orders.example.internal".into()),
            version: "TLSv1.3".into(),
            cipher: None,
            sig_alg: None,
            key_alg: None,
            leaf: Some(&leaf),
            common_name: Some("frontend".into()),
            identity: Some(vec!["spiffe://example.internal/frontend".into()]),
            route: "orders".into(),
            send_client_cert: true,
        };
        let admitted = Standing {
            verdict: Verdict::Allow,
            mode: Mode::Audit,
            would_deny: false,
        };
        let h = header(session.clone(), admitted);
        let tls = h.tls.as_ref().unwrap();
        assert!(tls.client_cert && tls.verified);
        assert_eq!(tls.client_cert_der.as_deref(), Some(&leaf[..]));
        assert!(h.identity.is_some());
        let would_deny = header(
            session.clone(),
            Standing {
                would_deny: true,
                ..admitted
            },
        );
        let tls = would_deny.tls.as_ref().unwrap();
        assert!(tls.client_cert && !tls.verified);
        assert_eq!(tls.client_cert_der, None, "no unverified certificate");
        assert_eq!(would_deny.identity, None);
        assert_eq!(tls.common_name, None, "no unverified common name");
        let not_asked = header(
            Session {
                send_client_cert: false,
                ..session
            },
            admitted,
        );
        assert_eq!(not_asked.tls.unwrap().client_cert_der, None);
    }
}

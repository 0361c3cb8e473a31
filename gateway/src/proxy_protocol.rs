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
//! when the client's certificate was verified and admitted.

use std::net::{IpAddr, SocketAddr};

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

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyProtocolError {
    /// A TLV's value, or the whole address block, is beyond the 16-bit
    /// length the format has: the connection is refused rather than sent a
    /// header the backend would misread.
    #[error("PROXY v2 header: {what} is {len} bytes, more than the format's 65535")]
    TooLong { what: &'static str, len: usize },
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
    /// The certificate was verified and the route admitted it.
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

impl Header {
    /// The header's bytes.
    pub fn encode(&self) -> Result<Vec<u8>, ProxyProtocolError> {
        let mut body = Vec::with_capacity(256);
        let family = match self.addresses() {
            Some((IpAddr::V4(s), sp, IpAddr::V4(d), dp)) => {
                body.extend_from_slice(&s.octets());
                body.extend_from_slice(&d.octets());
                body.extend_from_slice(&sp.to_be_bytes());
                body.extend_from_slice(&dp.to_be_bytes());
                TCP_OVER_IPV4
            }
            Some((s, sp, d, dp)) => {
                body.extend_from_slice(&v6(s).octets());
                body.extend_from_slice(&v6(d).octets());
                body.extend_from_slice(&sp.to_be_bytes());
                body.extend_from_slice(&dp.to_be_bytes());
                TCP_OVER_IPV6
            }
            // Unknown addresses: AF_UNSPEC, which a receiver takes as "use
            // the connection's own" (HAProxy does the same).
            None => 0x00,
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
    fn addresses(&self) -> Option<(IpAddr, u16, IpAddr, u16)> {
        let (s, d) = (self.source?, self.destination?);
        Some((
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
        // HAProxy: 0 with no certificate, the verify result with one.
        let verify: u32 = u32::from(self.client_cert && !self.verified);
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
        assert_eq!(&no_cert[..5], &[0x01, 0, 0, 0, 0]);
    }

    #[test]
    fn mixed_families_go_as_ipv6_and_mapped_ipv4_as_ipv4() {
        let h = Header {
            source: Some("[::ffff:192.0.2.7]:1".parse().unwrap()),
            destination: Some("[2001:db8::1]:2".parse().unwrap()),
            ..Header::default()
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
            ..Header::default()
        };
        assert_eq!(both_mapped.encode().unwrap()[13], 0x11);
    }

    #[test]
    fn a_value_beyond_the_length_field_is_refused() {
        let h = Header {
            route: Some("x".repeat(70_000)),
            ..Header::default()
        };
        assert_eq!(
            h.encode(),
            Err(ProxyProtocolError::TooLong {
                what: "route",
                len: 70_000
            })
        );
        // Each TLV fits, their sum does not.
        let h = Header {
            route: Some("x".repeat(40_000)),
            authority: Some("y".repeat(40_000)),
            ..Header::default()
        };
        assert!(matches!(
            h.encode(),
            Err(ProxyProtocolError::TooLong {
                what: "the header",
                ..
            })
        ));
    }
}

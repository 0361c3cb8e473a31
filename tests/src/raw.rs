//! Hand-crafted TLS: a client whose every byte the test decides, for
//! playing the attacker against the gateway.
//!
//! The handshake is rustls' own, driven by hand over a socket so the test
//! chooses when (and with what) the client's last flight goes out. After it,
//! records are sealed and opened with rustls' own record protection
//! (`MessageEncrypter`/`MessageDecrypter` built from the client's traffic
//! keys), so what the gateway is fed is exactly what a TLS peer could send,
//! down to records no well-behaved peer would.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use rustls::crypto::cipher::{
    AeadKey, InboundOpaqueMessage, Iv, MessageDecrypter, MessageEncrypter, OutboundChunks,
    OutboundPlainMessage,
};
use rustls::pki_types::ServerName;
use rustls::{
    ClientConfig, ClientConnection, ConnectionTrafficSecrets, ContentType, ProtocolVersion,
    SupportedCipherSuite,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::STEP;

/// A client mid-handshake or past it, driven by hand.
pub struct RawClient {
    pub tcp: TcpStream,
    pub conn: ClientConnection,
}

impl RawClient {
    /// Connects; nothing is sent yet (`pending()` holds the ClientHello).
    pub async fn start(
        addr: SocketAddr,
        sni: &str,
        config: Arc<ClientConfig>,
    ) -> io::Result<RawClient> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(sni.to_owned()).map_err(io::Error::other)?;
        let conn = ClientConnection::new(config, name).map_err(io::Error::other)?;
        Ok(RawClient { tcp, conn })
    }

    /// Connects and runs the handshake until rustls considers it done on
    /// the client's side; the client's last flight (TLS 1.3: Certificate,
    /// CertificateVerify, Finished) is returned unsent, for the test to send
    /// when and how it likes.
    pub async fn until_last_flight(
        addr: SocketAddr,
        sni: &str,
        config: Arc<ClientConfig>,
    ) -> io::Result<(RawClient, Vec<u8>)> {
        let mut raw = RawClient::start(addr, sni, config).await?;
        let last = raw.handshake().await?;
        Ok((raw, last))
    }

    /// Sends what is queued and reads the server's flights until rustls
    /// considers the handshake done; returns the last flight unsent.
    pub async fn handshake(&mut self) -> io::Result<Vec<u8>> {
        self.drive_handshake(true).await
    }

    /// Like `handshake`, but sends nothing: everything the client would
    /// write until the handshake is done (in TLS 1.3, its
    /// middlebox-compatibility ChangeCipherSpec, queued as soon as the
    /// ServerHello is read, then its last flight) is returned, so a test
    /// that splits the client's records itself decides where every byte
    /// goes. `handshake` would send the ChangeCipherSpec mid-way whenever
    /// the server's flight arrives in more than one read.
    pub async fn handshake_unsent(&mut self) -> io::Result<Vec<u8>> {
        self.drive_handshake(false).await
    }

    /// Reads the server's flights until the handshake is done; what the
    /// client queues meanwhile is sent at once (`send`) or kept, and what
    /// is left is returned.
    async fn drive_handshake(&mut self, send: bool) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; 1 << 16];
        let mut unsent = Vec::new();
        while self.conn.is_handshaking() {
            let out = self.pending();
            if send && !out.is_empty() {
                self.tcp.write_all(&out).await?;
            } else {
                unsent.extend(out);
            }
            let n = tokio::time::timeout(STEP, self.tcp.read(&mut buf))
                .await
                .map_err(|_| io::Error::other("handshake read timed out"))??;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let mut input = &buf[..n];
            while !input.is_empty() {
                self.conn.read_tls(&mut input)?;
            }
            self.conn.process_new_packets().map_err(io::Error::other)?;
        }
        unsent.extend(self.pending());
        Ok(unsent)
    }

    /// What rustls has queued to send, taken out of it.
    pub fn pending(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        while self.conn.wants_write() {
            if self.conn.write_tls(&mut out).is_err() {
                break;
            }
        }
        out
    }

    /// Takes the traffic keys out of rustls: from here on the test seals
    /// and opens records itself. Call after taking the last flight.
    pub fn into_records(self) -> RawRecords {
        let version = self.conn.protocol_version().expect("version negotiated");
        let suite = self
            .conn
            .negotiated_cipher_suite()
            .expect("suite negotiated");
        let secrets = self
            .conn
            .dangerous_extract_secrets()
            .expect("the client config enables secret extraction");
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        RawRecords {
            tcp: self.tcp,
            version,
            tx: encrypter(suite, tx),
            tx_seq,
            rx: decrypter(suite, rx),
            rx_seq,
            inbuf: Vec::new(),
        }
    }
}

/// Record protection for one direction, as rustls builds it for a suite.
fn keys(secrets: ConnectionTrafficSecrets) -> (AeadKey, Iv) {
    match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key, iv),
        _ => panic!("no test support for this AEAD"),
    }
}

fn encrypter(
    suite: SupportedCipherSuite,
    secrets: ConnectionTrafficSecrets,
) -> Box<dyn MessageEncrypter> {
    let (key, iv) = keys(secrets);
    match suite {
        SupportedCipherSuite::Tls13(s) => s.aead_alg.encrypter(key, iv),
        // GCM's 12-byte IV is the 4-byte salt and the 8-byte explicit nonce
        // base; ChaCha20's is whole.
        SupportedCipherSuite::Tls12(s) => match s.aead_alg.key_block_shape().fixed_iv_len {
            4 => s
                .aead_alg
                .encrypter(key, &iv.as_ref()[..4], &iv.as_ref()[4..]),
            _ => s.aead_alg.encrypter(key, iv.as_ref(), &[]),
        },
    }
}

fn decrypter(
    suite: SupportedCipherSuite,
    secrets: ConnectionTrafficSecrets,
) -> Box<dyn MessageDecrypter> {
    let (key, iv) = keys(secrets);
    match suite {
        SupportedCipherSuite::Tls13(s) => s.aead_alg.decrypter(key, iv),
        SupportedCipherSuite::Tls12(s) => match s.aead_alg.key_block_shape().fixed_iv_len {
            4 => s.aead_alg.decrypter(key, &iv.as_ref()[..4]),
            _ => s.aead_alg.decrypter(key, iv.as_ref()),
        },
    }
}

/// A connection past its handshake whose records the test seals and opens.
pub struct RawRecords {
    pub tcp: TcpStream,
    pub version: ProtocolVersion,
    tx: Box<dyn MessageEncrypter>,
    pub tx_seq: u64,
    rx: Box<dyn MessageDecrypter>,
    pub rx_seq: u64,
    inbuf: Vec<u8>,
}

impl RawRecords {
    /// One record of `typ` carrying `payload`, sealed as a TLS peer would
    /// (TLS 1.3: the inner type inside, application data outside).
    pub fn seal(&mut self, typ: ContentType, payload: &[u8]) -> Vec<u8> {
        let msg = OutboundPlainMessage {
            typ,
            version: ProtocolVersion::TLSv1_2,
            payload: OutboundChunks::Single(payload),
        };
        let sealed = self
            .tx
            .encrypt(msg, self.tx_seq)
            .expect("rustls seals the record");
        self.tx_seq += 1;
        sealed.encode()
    }

    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.tcp.write_all(bytes).await
    }

    /// The next record from the gateway, opened: its type and payload.
    /// `Ok(None)`: the gateway closed the connection (FIN or reset).
    pub async fn recv(&mut self) -> io::Result<Option<(ContentType, Vec<u8>)>> {
        loop {
            if self.inbuf.len() >= 5 {
                let len = usize::from(u16::from_be_bytes([self.inbuf[3], self.inbuf[4]]));
                if self.inbuf.len() >= 5 + len {
                    let mut record: Vec<u8> = self.inbuf.drain(..5 + len).collect();
                    let typ = ContentType::from(record[0]);
                    let msg =
                        InboundOpaqueMessage::new(typ, ProtocolVersion::TLSv1_2, &mut record[5..]);
                    let plain = self
                        .rx
                        .decrypt(msg, self.rx_seq)
                        .map_err(io::Error::other)?;
                    self.rx_seq += 1;
                    return Ok(Some((plain.typ, plain.payload.to_vec())));
                }
            }
            let mut chunk = [0u8; 1 << 14];
            let n = match tokio::time::timeout(STEP, self.tcp.read(&mut chunk)).await {
                Err(_) => return Err(io::Error::other("no record from the gateway in time")),
                Ok(Ok(n)) => n,
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
                Ok(Err(e)) => return Err(e),
            };
            if n == 0 {
                return Ok(None);
            }
            self.inbuf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The alert description the gateway ended with, if it sent one before
    /// closing; application data before it is skipped.
    pub async fn closing_alert(&mut self) -> io::Result<Option<rustls::AlertDescription>> {
        while let Some((typ, payload)) = self.recv().await? {
            if typ == ContentType::Alert && payload.len() == 2 {
                return Ok(Some(rustls::AlertDescription::from(payload[1])));
            }
        }
        Ok(None)
    }
}

/// A client config like `Pki::client_config`, with its traffic keys
/// extractable for `RawClient::into_records`.
pub fn extractable(config: &ClientConfig) -> Arc<ClientConfig> {
    let mut config = config.clone();
    config.enable_secret_extraction = true;
    Arc::new(config)
}

/// A connection through the gateway at `addr` past its handshake, with the
/// gateway's side (kernel or record layer) in charge of the records: one
/// byte has been there and back. The client's keys are the test's.
pub async fn established(
    addr: SocketAddr,
    sni: &str,
    config: Arc<ClientConfig>,
) -> io::Result<RawRecords> {
    let (raw, last) = RawClient::until_last_flight(addr, sni, extractable(&config)).await?;
    let mut r = raw.into_records();
    let mut bytes = last;
    bytes.extend(r.seal(ContentType::ApplicationData, b"x"));
    r.send(&bytes).await?;
    match r.recv().await? {
        Some((ContentType::ApplicationData, echo)) if echo == b"x" => Ok(r),
        other => Err(io::Error::other(format!(
            "expected the echo of one byte, got {other:?}"
        ))),
    }
}

/// A post-handshake message: type, 24-bit length, body.
pub fn handshake_message(typ: u8, body: &[u8]) -> Vec<u8> {
    let len = (body.len() as u32).to_be_bytes();
    let mut m = vec![typ, len[1], len[2], len[3]];
    m.extend_from_slice(body);
    m
}

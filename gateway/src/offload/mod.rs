//! Kernel TLS offload: after rustls finishes a handshake, the session keys go
//! to the kernel (kTLS) and the bytes move socket → pipe → socket with
//! `splice`, never copied through userspace.
//!
//! Whether a connection is offloaded is decided per connection, before rustls
//! gives up its state, so a connection that cannot be offloaded stays on the
//! userspace path and never breaks. `offload = "kernel"` instead makes the
//! listener refuse to start without kernel support and offer only the suites
//! the kernel can take.
//!
//! We drive the kernel interface ourselves (see `sys`) rather than through
//! the `ktls` crate, which panics on unexpected control messages: here no
//! peer's record may panic the gateway.

pub(crate) mod cipher;
pub mod framing;
mod post_handshake;
pub mod record_layer;
pub mod records;
pub mod splice;
mod sys;

use std::fmt;
use std::io::{self, Read as _};
use std::sync::OnceLock;

use rustls::{CipherSuite, ConnectionTrafficSecrets, ProtocolVersion, SupportedCipherSuite};
use serde::Deserialize;
use tokio::net::TcpStream;
use zeroize::Zeroizing;

pub use framing::Framed;

/// The role of the peer on a leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PeerRole {
    /// We are the server (the client leg).
    Client,
    /// We are the client (the TLS leg towards a backend).
    Server,
}

impl PeerRole {
    pub(crate) fn of(conn: &rustls::Connection) -> PeerRole {
        match conn {
            rustls::Connection::Server(_) => PeerRole::Client,
            rustls::Connection::Client(_) => PeerRole::Server,
        }
    }

    /// The peer by name, for the access log: whose stream was cut.
    fn name(self) -> &'static str {
        match self {
            PeerRole::Client => "the client",
            PeerRole::Server => "the backend",
        }
    }
}

/// Where a connection's TLS records are encrypted and decrypted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Offload {
    /// The kernel where it can take the connection, else userspace.
    #[default]
    Auto,
    /// Always the kernel: refuse to start without it.
    Kernel,
    /// Always userspace: the gateway's own record layer with the keys rustls
    /// negotiated.
    Userspace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Tls12,
    Tls13,
}

impl Version {
    fn from_rustls(v: ProtocolVersion) -> Option<Self> {
        match v {
            ProtocolVersion::TLSv1_2 => Some(Version::Tls12),
            ProtocolVersion::TLSv1_3 => Some(Version::Tls13),
            _ => None,
        }
    }

    fn wire(self) -> u16 {
        match self {
            Version::Tls12 => sys::TLS_1_2_VERSION,
            Version::Tls13 => sys::TLS_1_3_VERSION,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Version::Tls12 => "TLSv1.2",
            Version::Tls13 => "TLSv1.3",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cipher {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Cipher {
    const ALL: [Cipher; 3] = [
        Cipher::Aes128Gcm,
        Cipher::Aes256Gcm,
        Cipher::Chacha20Poly1305,
    ];

    fn of_suite(suite: CipherSuite) -> Option<Self> {
        use CipherSuite as S;
        match suite {
            S::TLS13_AES_128_GCM_SHA256
            | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => Some(Cipher::Aes128Gcm),
            S::TLS13_AES_256_GCM_SHA384
            | S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            | S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => Some(Cipher::Aes256Gcm),
            S::TLS13_CHACHA20_POLY1305_SHA256
            | S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
            | S::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => Some(Cipher::Chacha20Poly1305),
            _ => None,
        }
    }
}

impl fmt::Display for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cipher::Aes128Gcm => "AES-128-GCM",
            Cipher::Aes256Gcm => "AES-256-GCM",
            Cipher::Chacha20Poly1305 => "ChaCha20-Poly1305",
        })
    }
}

/// Why a connection moves its bytes in userspace. The label is the metric's
/// `reason` and the access log's `offload_reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fallback {
    /// `offload = "userspace"` on the listener or the route's upstream.
    Configured,
    /// The kernel has no `tls` upper-layer protocol.
    NoTlsUlp(String),
    /// The kernel cannot take the negotiated cipher suite.
    UnsupportedCipherSuite(String),
    /// The kernel cannot take the negotiated TLS version.
    TlsVersion(String),
    /// The hand-off was refused before the connection changed hands.
    Error(String),
}

impl Fallback {
    pub fn label(&self) -> &'static str {
        match self {
            Fallback::Configured => "configured",
            Fallback::NoTlsUlp(_) => "no_tls_ulp",
            Fallback::UnsupportedCipherSuite(_) => "unsupported_cipher_suite",
            Fallback::TlsVersion(_) => "tls_version",
            Fallback::Error(_) => "error",
        }
    }
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fallback::Configured => f.write_str("offload = \"userspace\" in the config"),
            Fallback::NoTlsUlp(e) => write!(f, "kernel has no tls ULP: {e}"),
            Fallback::UnsupportedCipherSuite(s) => {
                write!(f, "kernel cannot offload cipher suite {s}")
            }
            Fallback::TlsVersion(v) => write!(f, "kernel cannot offload {v}"),
            Fallback::Error(e) => write!(f, "kernel TLS hand-off refused: {e}"),
        }
    }
}

/// What this kernel can offload, probed once per process on a loopback
/// connection: attaching the ULP and handing it keys is the only reliable
/// test (the module may load on demand; a cipher's crypto module may be missing).
#[derive(Debug, Clone)]
pub struct KernelSupport {
    /// Why the `tls` ULP is unavailable, if it is.
    no_ulp: Option<String>,
    /// Version and cipher pairs the kernel accepted both ways.
    supported: Vec<(Version, Cipher)>,
}

impl KernelSupport {
    /// The probe's result, run on first use.
    pub fn get() -> &'static KernelSupport {
        static SUPPORT: OnceLock<KernelSupport> = OnceLock::new();
        SUPPORT.get_or_init(Self::probe)
    }

    fn probe() -> KernelSupport {
        let mut supported = Vec::new();
        for version in [Version::Tls13, Version::Tls12] {
            for cipher in Cipher::ALL {
                match probe_one(version, cipher) {
                    Ok(()) => supported.push((version, cipher)),
                    Err(ProbeError::Ulp(e)) => {
                        return KernelSupport {
                            no_ulp: Some(e),
                            supported: Vec::new(),
                        };
                    }
                    Err(ProbeError::Cipher(e)) => {
                        tracing::debug!(%version, %cipher, error = %e, "kernel cannot offload");
                    }
                }
            }
        }
        KernelSupport {
            no_ulp: None,
            supported,
        }
    }

    /// True when the kernel can offload at least one suite.
    pub fn available(&self) -> bool {
        self.no_ulp.is_none() && !self.supported.is_empty()
    }

    /// One line for the start-up log and for errors.
    pub fn describe(&self) -> String {
        match &self.no_ulp {
            Some(e) => format!("no kernel TLS: the tls ULP is unavailable ({e})"),
            None if self.supported.is_empty() => {
                "no kernel TLS: the tls ULP loads but takes no cipher (crypto modules missing?)"
                    .into()
            }
            None => {
                let list: Vec<String> = self
                    .supported
                    .iter()
                    .map(|(v, c)| format!("{v} {c}"))
                    .collect();
                format!("kernel TLS available for {}", list.join(", "))
            }
        }
    }

    /// Whether a connection with this version and suite can go to the kernel.
    pub fn admits(&self, version: ProtocolVersion, suite: CipherSuite) -> Result<(), Fallback> {
        if let Some(e) = &self.no_ulp {
            return Err(Fallback::NoTlsUlp(e.clone()));
        }
        let Some(v) = Version::from_rustls(version) else {
            return Err(Fallback::TlsVersion(format!("{version:?}")));
        };
        let Some(c) = Cipher::of_suite(suite) else {
            return Err(Fallback::UnsupportedCipherSuite(format!("{suite:?}")));
        };
        if self.supported.contains(&(v, c)) {
            return Ok(());
        }
        if self.supported.iter().any(|(sv, _)| *sv == v) {
            Err(Fallback::UnsupportedCipherSuite(format!("{suite:?}")))
        } else {
            Err(Fallback::TlsVersion(v.to_string()))
        }
    }

    /// Whether a suite the gateway could offer is one the kernel takes (for
    /// `offload = "kernel"`, which offers nothing else).
    pub fn takes_suite(&self, suite: &SupportedCipherSuite) -> bool {
        let version = suite.version().version;
        self.admits(version, suite.suite()).is_ok()
    }
}

enum ProbeError {
    Ulp(String),
    Cipher(String),
}

fn probe_one(version: Version, cipher: Cipher) -> Result<(), ProbeError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| ProbeError::Ulp(format!("loopback socket for the probe: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| ProbeError::Ulp(e.to_string()))?;
    let client = std::net::TcpStream::connect(addr)
        .map_err(|e| ProbeError::Ulp(format!("loopback connect for the probe: {e}")))?;
    let _server = listener
        .accept()
        .map_err(|e| ProbeError::Ulp(e.to_string()))?;
    sys::set_tls_ulp(&client).map_err(|e| ProbeError::Ulp(e.to_string()))?;
    // All-zero keys: the probe only asks whether the kernel takes the cipher.
    let info = crypto_info(version, cipher, &[0; 32], &[0; 12], 0);
    sys::set_crypto(&client, sys::TLS_TX, &info).map_err(|e| ProbeError::Cipher(e.to_string()))?;
    sys::set_crypto(&client, sys::TLS_RX, &info).map_err(|e| ProbeError::Cipher(e.to_string()))?;
    Ok(())
}

/// Lays out one direction's key, IV and sequence number the kernel's way.
/// GCM splits rustls' 12-byte IV into a 4-byte salt and an 8-byte IV.
///
/// TLS 1.2 AES-GCM sends its 8-byte explicit nonce with every record, and
/// the two owners of a connection build it differently: rustls XORs the
/// sequence number into the IV (record n: IV ^ n), the kernel takes the IV
/// it is given for its first record and adds 1 per record. Handing the
/// kernel rustls' IV as is repeats the nonce of rustls' Finished (IV ^ 0)
/// on the kernel's first record: GCM's authentication key falls out, and
/// records can be forged. The kernel starts at IV + seq instead: rustls
/// used IV ^ i for i < seq, and IV ^ i <= IV + i < IV + seq, so the
/// kernel's IV + seq + j cannot meet any of them before 2^64 - 2·seq
/// records (the cipher's record limit closes the connection at 2^24.5).
// The key and IV are rustls' secrets for the negotiated cipher, whose
// lengths it fixes (16 or 32, 12): no peer input.
#[allow(clippy::indexing_slicing)]
fn crypto_info(
    version: Version,
    cipher: Cipher,
    key: &[u8],
    iv: &[u8],
    seq: u64,
) -> sys::CryptoInfo {
    let version = version.wire();
    let rec_seq = seq.to_be_bytes();
    // The copies below end up in the returned value (zeroed on drop); these
    // locals are zeroed on the way out.
    let mut iv12 = Zeroizing::new([0u8; 12]);
    let n = iv.len().min(12);
    iv12[..n].copy_from_slice(&iv[..n]);
    let mut salt = Zeroizing::new([0u8; 4]);
    salt.copy_from_slice(&iv12[..4]);
    let mut iv8 = Zeroizing::new([0u8; 8]);
    iv8.copy_from_slice(&iv12[4..]);
    if version == sys::TLS_1_2_VERSION {
        *iv8 = kernel_tls12_gcm_iv(*iv8, seq);
    }
    match cipher {
        Cipher::Aes128Gcm => {
            let mut k = Zeroizing::new([0u8; 16]);
            k.copy_from_slice(&key[..16]);
            sys::CryptoInfo::Aes128Gcm(sys::Aes128Gcm {
                version,
                cipher_type: sys::TLS_CIPHER_AES_GCM_128,
                iv: *iv8,
                key: *k,
                salt: *salt,
                rec_seq,
            })
        }
        Cipher::Aes256Gcm => {
            let mut k = Zeroizing::new([0u8; 32]);
            k.copy_from_slice(&key[..32]);
            sys::CryptoInfo::Aes256Gcm(sys::Aes256Gcm {
                version,
                cipher_type: sys::TLS_CIPHER_AES_GCM_256,
                iv: *iv8,
                key: *k,
                salt: *salt,
                rec_seq,
            })
        }
        Cipher::Chacha20Poly1305 => {
            let mut k = Zeroizing::new([0u8; 32]);
            k.copy_from_slice(&key[..32]);
            sys::CryptoInfo::Chacha20Poly1305(sys::Chacha20Poly1305 {
                version,
                cipher_type: sys::TLS_CIPHER_CHACHA20_POLY1305,
                iv: *iv12,
                key: *k,
                rec_seq,
            })
        }
    }
}

/// The explicit nonce the kernel should start a TLS 1.2 GCM direction at:
/// rustls' IV plus the records rustls already sealed (see `crypto_info`).
fn kernel_tls12_gcm_iv(iv: [u8; 8], seq: u64) -> [u8; 8] {
    u64::from_be_bytes(iv).wrapping_add(seq).to_be_bytes()
}

fn secrets_info(
    version: Version,
    (seq, secrets): (u64, ConnectionTrafficSecrets),
) -> Result<sys::CryptoInfo, String> {
    let (cipher, key, iv) = match &secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Cipher::Aes128Gcm, key, iv),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Cipher::Aes256Gcm, key, iv),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            (Cipher::Chacha20Poly1305, key, iv)
        }
        _ => {
            return Err("rustls extracted secrets for an AEAD the kernel has no layout for".into());
        }
    };
    let want = match cipher {
        Cipher::Aes128Gcm => 16,
        Cipher::Aes256Gcm | Cipher::Chacha20Poly1305 => 32,
    };
    if key.as_ref().len() != want || iv.as_ref().len() != 12 {
        return Err(format!("unexpected {cipher} key/IV length"));
    }
    Ok(crypto_info(version, cipher, key.as_ref(), iv.as_ref(), seq))
}

/// A TLS leg that the kernel now encrypts and decrypts.
#[derive(Debug)]
pub struct KernelLeg {
    pub stream: TcpStream,
    pub version: Version,
    pub cipher: Cipher,
    /// Records one direction may carry under one key (the cipher's
    /// confidentiality limit); the kernel does not count for us.
    pub record_limit: u64,
    /// Size of the kernel's crypto_info for this cipher (for reading it back).
    pub(crate) layout_len: usize,
    /// Plaintext rustls had already decrypted: it goes out before any splice.
    pub early: Vec<u8>,
    /// The peer's close_notify arrived before the hand-off.
    pub peer_closed: bool,
    /// Who is at the other end: a client sends no session tickets.
    pub(crate) peer: PeerRole,
}

/// Checks, before anything changes hands, that this leg can go to the kernel.
pub fn precheck(support: &KernelSupport, conn: &rustls::CommonState) -> Result<(), Fallback> {
    let (Some(version), Some(suite)) = (conn.protocol_version(), conn.negotiated_cipher_suite())
    else {
        return Err(Fallback::Error("handshake not complete".into()));
    };
    support.admits(version, suite.suite())?;
    Ok(())
}

/// Attaches the kernel's TLS layer without keys yet. Until `hand_off` the
/// socket still carries the bytes as they are, so a failure here, or a later
/// decision to stay in userspace, costs the connection nothing.
pub fn attach(io: &Framed<TcpStream>) -> Result<(), Fallback> {
    sys::set_tls_ulp(io.get_ref()).map_err(|e| match e.raw_os_error() {
        // The kernel attaches TLS to established sockets only; a peer that
        // already sent its FIN has left that state.
        Some(libc::ENOTCONN) => Fallback::Error("peer half-closed before the hand-off".into()),
        _ => Fallback::NoTlsUlp(e.to_string()),
    })
}

/// While a leg changes hands, closing it resets the connection: a peer must
/// not take a hand-off that failed or timed out for an orderly end. Once
/// the hand-off is done (`false`), the leg closes in order again and the
/// forwarding path decides how it ends.
pub fn reset_if_dropped(s: &impl std::os::fd::AsRawFd, on: bool) {
    if let Err(e) = sys::reset_on_close(s, on) {
        tracing::debug!(error = %e, "setting SO_LINGER for the hand-off");
    }
}

/// Why a hand-off failed after it was too late to fall back.
#[derive(Debug, thiserror::Error)]
#[error("hand-off from rustls failed: {0}")]
pub struct HandOffError(String);

impl HandOffError {
    pub fn new(why: String) -> Self {
        Self(why)
    }
}

/// A finished handshake, read up to a record boundary, with what rustls
/// already decrypted taken out: ready for its keys to leave rustls.
pub(crate) struct Finished {
    pub stream: TcpStream,
    pub conn: rustls::Connection,
    pub version: Version,
    pub suite: SupportedCipherSuite,
    pub record_limit: u64,
    pub early: Vec<u8>,
    pub peer_closed: bool,
}

/// How the peer's side of the stream stands when rustls hands it over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerEnd {
    /// Still sending.
    Open,
    /// Sent close_notify: its direction is over, and anything after it is
    /// ignored (RFC 8446 §6.1).
    Closed,
}

/// Brings a rustls connection to a record boundary: whatever comes
/// after it on the socket is ciphertext under the traffic keys, for the
/// kernel or the userspace record layer to open. Flush what rustls holds to
/// send first.
///
/// A peer that closes without close_notify here has truncated the stream:
/// that is an error, never an orderly end (the other side would otherwise
/// see a clean close of a stream that was cut).
pub(crate) async fn finish(
    mut io: Framed<TcpStream>,
    mut conn: rustls::Connection,
) -> Result<Finished, HandOffError> {
    // Plaintext rustls already decrypted is taken out and sent first. Out
    // before the rest of a record goes in: rustls takes no more input while
    // it holds 16 KiB of plaintext.
    let mut early = Vec::new();
    let mut end = take_plaintext(&mut conn, &mut early)?;
    // rustls stops reading at a record boundary only by luck: finish the
    // record it is inside of and let it decrypt that too.
    let who = PeerRole::of(&conn).name();
    let rest = io.complete_record().await.map_err(|e| {
        HandOffError(if e.kind() == io::ErrorKind::UnexpectedEof {
            format!("truncation: {who} closed the connection inside a TLS record")
        } else {
            format!("completing a record from {who}: {e}")
        })
    })?;
    if !rest.is_empty() {
        if end == PeerEnd::Closed {
            // rustls reads nothing after close_notify, and neither do we:
            // the peer's direction is over.
            tracing::debug!(
                bytes = rest.len(),
                "ignoring bytes the peer sent after close_notify"
            );
        } else {
            feed(&mut conn, &rest)?;
            conn.process_new_packets()
                .map_err(|e| HandOffError(format!("completing a record: {e}")))?;
            end = take_plaintext(&mut conn, &mut early)?;
        }
    }
    if conn.wants_write() {
        return Err(HandOffError("rustls still holds records to send".into()));
    }
    let version = conn
        .protocol_version()
        .and_then(Version::from_rustls)
        .ok_or_else(|| HandOffError("no TLS version negotiated".into()))?;
    let suite = conn
        .negotiated_cipher_suite()
        .ok_or_else(|| HandOffError("no cipher suite negotiated".into()))?;
    let record_limit = match suite {
        SupportedCipherSuite::Tls12(s) => s.common.confidentiality_limit,
        SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
    };
    Ok(Finished {
        stream: io.into_inner(),
        conn,
        version,
        suite,
        record_limit: record_limit_override().unwrap_or(record_limit),
        early,
        peer_closed: end == PeerEnd::Closed,
    })
}

/// Gives rustls every byte of `input`. rustls answers `Ok(0)` once it takes
/// no more (after close_notify): never loop on that.
fn feed(conn: &mut rustls::Connection, mut input: &[u8]) -> Result<(), HandOffError> {
    while !input.is_empty() {
        match conn.read_tls(&mut input) {
            Ok(0) => {
                return Err(HandOffError(format!(
                    "rustls took no more input with {} bytes left",
                    input.len()
                )));
            }
            Ok(_) => {}
            Err(e) => return Err(HandOffError(format!("completing a record: {e}"))),
        }
    }
    Ok(())
}

/// Moves the plaintext rustls holds into `early` and says whether the peer
/// has closed its side. An end without close_notify is a truncation.
fn take_plaintext(
    conn: &mut rustls::Connection,
    early: &mut Vec<u8>,
) -> Result<PeerEnd, HandOffError> {
    let mut chunk = [0u8; 4096];
    loop {
        match conn.reader().read(&mut chunk) {
            Ok(0) => return Ok(PeerEnd::Closed),
            Ok(n) => early.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(PeerEnd::Open),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                // Said by name: the operator reading the access log has to
                // know whose stream was cut.
                return Err(HandOffError(format!(
                    "truncation: {} closed the connection without close_notify",
                    PeerRole::of(conn).name()
                )));
            }
            Err(e) => return Err(HandOffError(format!("reading rustls plaintext: {e}"))),
        }
    }
}

/// Moves a finished rustls connection into the kernel: call `precheck` and
/// `attach` first, and flush what rustls holds to send. Once the keys leave
/// rustls there is no way back, so this only fails on a kernel error.
pub async fn hand_off(
    io: Framed<TcpStream>,
    conn: rustls::Connection,
    rx_expect_no_pad: bool,
) -> Result<KernelLeg, HandOffError> {
    let f = finish(io, conn).await?;
    let peer = PeerRole::of(&f.conn);
    let cipher = Cipher::of_suite(f.suite.suite())
        .ok_or_else(|| HandOffError(format!("{:?} has no kernel cipher", f.suite.suite())))?;
    let secrets = f
        .conn
        .dangerous_extract_secrets()
        .map_err(|e| HandOffError(format!("extracting secrets: {e}")))?;
    let tx = secrets_info(f.version, secrets.tx).map_err(HandOffError)?;
    let rx = secrets_info(f.version, secrets.rx).map_err(HandOffError)?;
    let layout_len = tx.layout_len();
    let stream = f.stream;
    sys::set_crypto(&stream, sys::TLS_TX, &tx).map_err(|e| HandOffError(format!("TLS_TX: {e}")))?;
    sys::set_crypto(&stream, sys::TLS_RX, &rx).map_err(|e| HandOffError(format!("TLS_RX: {e}")))?;
    if rx_expect_no_pad && f.version == Version::Tls13 {
        // Only an optimisation: a kernel without it decrypts as before.
        if let Err(e) = sys::set_tls_flag(&stream, sys::TLS_RX_EXPECT_NO_PAD, true) {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(error = %e,
                    "rx_expect_no_pad: the kernel does not take TLS_RX_EXPECT_NO_PAD (Linux 6.0+); ignored");
            });
        }
    }
    reset_if_dropped(&stream, false);
    Ok(KernelLeg {
        stream,
        version: f.version,
        cipher,
        record_limit: f.record_limit,
        layout_len,
        early: f.early,
        peer_closed: f.peer_closed,
        peer,
    })
}

static RECORD_LIMIT_OVERRIDE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Lowers the per-key record limit for this process, so tests can reach it
/// without moving terabytes.
#[doc(hidden)]
pub fn set_record_limit_for_tests(limit: u64) {
    RECORD_LIMIT_OVERRIDE.store(limit, std::sync::atomic::Ordering::Relaxed);
}

fn record_limit_override() -> Option<u64> {
    match RECORD_LIMIT_OVERRIDE.load(std::sync::atomic::Ordering::Relaxed) {
        0 => None,
        n => Some(n),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    use super::*;
    use crate::pki::{Authority, LeafSpec};

    /// A server connection past its handshake with a rustls client, in
    /// memory, and that client.
    fn handshaken() -> (rustls::ServerConnection, rustls::ClientConnection) {
        let root = Authority::root("hand-off test root").unwrap();
        let leaf = root
            .issue(&LeafSpec::server("server", &["dns:server.test"]))
            .unwrap();
        let provider = crate::tls::provider();
        let mut server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
        server_config.send_tls13_tickets = 0;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(root.cert_pem.as_bytes()).unwrap())
            .unwrap();
        let client_config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut server = rustls::ServerConnection::new(Arc::new(server_config)).unwrap();
        let mut client = rustls::ClientConnection::new(
            Arc::new(client_config),
            ServerName::try_from("server.test").unwrap(),
        )
        .unwrap();
        while server.is_handshaking() || client.is_handshaking() {
            pass(&mut client, &mut server);
            pass_back(&mut server, &mut client);
        }
        (server, client)
    }

    fn pass(client: &mut rustls::ClientConnection, server: &mut rustls::ServerConnection) {
        let mut bytes = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut bytes).unwrap();
        }
        let mut input = &bytes[..];
        while !input.is_empty() {
            server.read_tls(&mut input).unwrap();
        }
        server.process_new_packets().unwrap();
    }

    fn pass_back(server: &mut rustls::ServerConnection, client: &mut rustls::ClientConnection) {
        let mut bytes = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut bytes).unwrap();
        }
        let mut input = &bytes[..];
        while !input.is_empty() {
            client.read_tls(&mut input).unwrap();
        }
        client.process_new_packets().unwrap();
    }

    /// The kernel's explicit nonces (start, +1 per record) never meet the
    /// ones rustls used before the hand-off (IV ^ i for i < seq), whatever
    /// the IV: IVs near the top of the range (where + wraps), with every
    /// low-bit pattern, and several sequence numbers.
    #[test]
    fn kernel_tls12_gcm_nonces_never_repeat_rustls_ones() {
        let ivs = [
            0,
            1,
            0x7fff_ffff_ffff_ffff,
            u64::MAX,
            u64::MAX - 1,
            u64::MAX - 5,
            0x0123_4567_89ab_cdef,
            0xffff_ffff_ffff_fff0,
        ];
        for iv in ivs {
            for seq in [1u64, 2, 3, 5, 8, 17] {
                let used: std::collections::HashSet<u64> = (0..seq).map(|i| iv ^ i).collect();
                let start = u64::from_be_bytes(kernel_tls12_gcm_iv(iv.to_be_bytes(), seq));
                for j in 0..10_000u64 {
                    let kernel = start.wrapping_add(j);
                    assert!(
                        !used.contains(&kernel),
                        "iv {iv:#x}, seq {seq}: the kernel's record {j} repeats a rustls nonce"
                    );
                }
            }
        }
        // What went wrong before: the kernel's first record reused IV ^ 0.
        assert_ne!(
            kernel_tls12_gcm_iv(7u64.to_be_bytes(), 1),
            7u64.to_be_bytes()
        );
    }

    /// What rustls read before the hand-off decides how the peer's side
    /// stands: data is kept for the new owner, close_notify ends that
    /// direction, and an end without close_notify is a truncation, never
    /// an orderly close.
    #[test]
    fn the_peer_end_before_the_hand_off() {
        use std::io::Write as _;

        let (mut server, mut client) = handshaken();
        client.writer().write_all(b"early").unwrap();
        pass(&mut client, &mut server);
        let mut conn = rustls::Connection::Server(server);
        let mut early = Vec::new();
        assert_eq!(
            take_plaintext(&mut conn, &mut early).unwrap(),
            PeerEnd::Open
        );
        assert_eq!(early, b"early");

        let (mut server, mut client) = handshaken();
        client.send_close_notify();
        pass(&mut client, &mut server);
        let mut conn = rustls::Connection::Server(server);
        assert_eq!(
            take_plaintext(&mut conn, &mut Vec::new()).unwrap(),
            PeerEnd::Closed
        );
        // rustls takes nothing after close_notify: feeding it must not spin.
        let err = feed(&mut conn, &[0x17, 0x03, 0x03, 0, 0]).unwrap_err();
        assert!(err.to_string().contains("took no more input"), "{err}");

        let (mut server, _client) = handshaken();
        let eof: &[u8] = &[];
        assert_eq!(server.read_tls(&mut &eof[..]).unwrap(), 0);
        let mut conn = rustls::Connection::Server(server);
        let err = take_plaintext(&mut conn, &mut Vec::new()).unwrap_err();
        assert!(
            err.to_string()
                .contains("truncation: the client closed the connection without close_notify"),
            "{err}"
        );

        // The backend's leg: the gateway is the TLS client there.
        let (_server, mut client) = handshaken();
        assert_eq!(client.read_tls(&mut &eof[..]).unwrap(), 0);
        let mut conn = rustls::Connection::Client(client);
        let err = take_plaintext(&mut conn, &mut Vec::new()).unwrap_err();
        assert!(
            err.to_string()
                .contains("truncation: the backend closed the connection without close_notify"),
            "{err}"
        );
    }
}

//! The TLS record layer the userspace path runs after the handshake: the
//! traffic keys rustls negotiated, TLS's record protection (RFC 8446 §5,
//! RFC 5288, RFC 7905), and what a peer may send once the handshake is
//! over. No sockets here: `records` moves the bytes.
//!
//! What it refuses, and how, follows rustls, which the fuzz target
//! `records_vs_rustls` holds it to (fuzz/): stricter only where the kernel
//! is too (a TLS 1.3 record's outer type must be application data and its
//! version 3.3, its body at most 2^14 + 256 bytes; a version is never SSL 2
//! or DTLS) and where it cannot follow (a KeyUpdate needs
//! secrets rustls does not hand over; TLS 1.2 renegotiation is refused
//! rather than answered with a warning).

use std::ops::Range;
use std::sync::Mutex;

use rustls::{AlertDescription, ConnectionTrafficSecrets, ContentType};

use super::cipher::{self, Algorithm, TAG};
pub(crate) use super::post_handshake::Control;
use super::post_handshake::PeerRules;
use super::{PeerRole, Version};
use crate::forward::Broken;

pub(crate) const HEADER: usize = 5;
/// Largest plaintext in one record.
pub(crate) const MAX_FRAGMENT: usize = 16 * 1024;
/// Largest record body TLS 1.2 allows: 2048 bytes of expansion (RFC 5246
/// §6.2.3); rustls refuses this length itself, so do we.
const MAX_CIPHERTEXT_TLS12: usize = MAX_FRAGMENT + 2048;
/// Largest record body TLS 1.3 allows (RFC 8446 §5.2).
const MAX_CIPHERTEXT_TLS13: usize = MAX_FRAGMENT + 256;

/// One leg's record protocol state: its keys each way, and what it has
/// seen of the peer.
pub(crate) struct RecordLayer {
    version: Version,
    rx: Mutex<Opener>,
    tx: Mutex<Sealer>,
}

struct Opener {
    key: RecordKey,
    seq: u64,
    limit: u64,
    rules: PeerRules,
}

struct Sealer {
    key: RecordKey,
    seq: u64,
    limit: u64,
}

/// One direction's AEAD key and the nonce it builds on. The record
/// protection is TLS's own (RFC 8446 §5.2, RFC 5288, RFC 7905), done with
/// the AEAD directly (`cipher`): rustls' record encrypters assume their
/// sequence starts at zero, which a TLS 1.2 connection's is not once its
/// Finished is sent.
struct RecordKey {
    aead: cipher::Key,
    kind: Protection,
    /// TLS 1.3 and ChaCha20: the 12-byte IV; TLS 1.2 GCM: 4-byte salt then
    /// the 8 bytes the explicit nonces are derived from.
    iv: [u8; 12],
}

impl Drop for RecordKey {
    fn drop(&mut self) {
        // The AEAD key itself lives in ring or aws-lc, which own its memory.
        zeroize::Zeroize::zeroize(&mut self.iv);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Protection {
    Tls13,
    Tls12Gcm,
    Tls12Chacha,
}

const EXPLICIT_NONCE: usize = 8;

impl RecordKey {
    fn new(version: Version, s: ConnectionTrafficSecrets) -> Result<RecordKey, String> {
        let (alg, key, iv) = match &s {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Algorithm::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Algorithm::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (Algorithm::Chacha20Poly1305, key, iv)
            }
            _ => return Err("rustls negotiated an AEAD the record layer does not know".into()),
        };
        RecordKey::from_parts(version, alg, key.as_ref(), iv.as_ref())
    }

    fn from_parts(
        version: Version,
        alg: Algorithm,
        key: &[u8],
        iv: &[u8],
    ) -> Result<RecordKey, String> {
        let gcm = alg != Algorithm::Chacha20Poly1305;
        let aead = cipher::Key::new(alg, key)
            .map_err(|_| "rustls handed over a key of the wrong length".to_owned())?;
        let iv: [u8; 12] = iv
            .try_into()
            .map_err(|_| "rustls handed over an IV of the wrong length".to_owned())?;
        let kind = match (version, gcm) {
            (Version::Tls13, _) => Protection::Tls13,
            (Version::Tls12, true) => Protection::Tls12Gcm,
            (Version::Tls12, false) => Protection::Tls12Chacha,
        };
        Ok(RecordKey { aead, kind, iv })
    }

    /// `iv` with the sequence number XORed into its last 8 bytes.
    fn xor_nonce(&self, seq: u64) -> [u8; 12] {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(seq.to_be_bytes()) {
            *b ^= s;
        }
        n
    }

    /// Opens one record's body in place; returns the content type and the
    /// range of the plaintext within `body`. The refusals are rustls' own,
    /// with the alert it sends for each.
    fn open(
        &self,
        header: [u8; HEADER],
        body: &mut [u8],
        seq: u64,
    ) -> Result<(ContentType, Range<usize>), Broken> {
        let bad = || {
            Broken::protocol(
                AlertDescription::BadRecordMac,
                "a TLS record failed to decrypt (bad record MAC)",
            )
        };
        match self.kind {
            Protection::Tls13 => {
                let n = self
                    .aead
                    .open(self.xor_nonce(seq), &header, body)
                    .map_err(|_| bad())?;
                if n > MAX_FRAGMENT + 1 {
                    return Err(overflow(n));
                }
                let plain = body.get(..n).ok_or_else(bad)?;
                // The real content type is the last non-zero byte (RFC 8446 §5.4).
                let no_type = || {
                    Broken::protocol(
                        AlertDescription::UnexpectedMessage,
                        "peer sent a TLS record with no content type",
                    )
                };
                let end = plain.iter().rposition(|&b| b != 0).ok_or_else(no_type)?;
                if end > MAX_FRAGMENT {
                    return Err(overflow(end));
                }
                let typ = plain.get(end).copied().ok_or_else(no_type)?;
                Ok((ContentType::from(typ), 0..end))
            }
            Protection::Tls12Gcm | Protection::Tls12Chacha => {
                let explicit = if self.kind == Protection::Tls12Gcm {
                    EXPLICIT_NONCE
                } else {
                    0
                };
                if body.len() < explicit + TAG {
                    return Err(bad());
                }
                let (explicit_nonce, sealed) =
                    body.split_at_mut_checked(explicit).ok_or_else(bad)?;
                let nonce = if explicit > 0 {
                    let mut n = [0u8; 12];
                    let (salt, rest) = n.split_at_mut(4);
                    salt.copy_from_slice(self.iv.get(..4).ok_or_else(bad)?);
                    rest.copy_from_slice(explicit_nonce);
                    n
                } else {
                    self.xor_nonce(seq)
                };
                let len = u16::try_from(sealed.len() - TAG).map_err(|_| bad())?;
                let [typ, major, minor, _, _] = header;
                let aad = tls12_aad(seq, typ, [major, minor], len);
                let n = self.aead.open(nonce, &aad, sealed).map_err(|_| bad())?;
                if n > MAX_FRAGMENT {
                    return Err(overflow(n));
                }
                Ok((ContentType::from(typ), explicit..explicit + n))
            }
        }
    }

    /// Bytes a record carries before its payload: the header, and TLS 1.2
    /// GCM's explicit nonce.
    fn prefix(&self) -> usize {
        match self.kind {
            Protection::Tls12Gcm => HEADER + EXPLICIT_NONCE,
            Protection::Tls13 | Protection::Tls12Chacha => HEADER,
        }
    }

    /// Bytes a record carries after its payload: TLS 1.3's inner content
    /// type, and the tag.
    fn suffix(&self) -> usize {
        match self.kind {
            Protection::Tls13 => 1 + TAG,
            Protection::Tls12Gcm | Protection::Tls12Chacha => TAG,
        }
    }

    /// Appends one sealed record carrying `payload` (at most 16 KiB) to `out`.
    // Sealing writes our own plaintext into room sized here: no peer input.
    #[allow(clippy::indexing_slicing)]
    fn seal(
        &self,
        out: &mut Vec<u8>,
        typ: ContentType,
        payload: &[u8],
        seq: u64,
    ) -> Result<(), String> {
        let at = out.len();
        let (prefix, suffix) = (self.prefix(), self.suffix());
        out.resize(at + prefix, 0);
        out.extend_from_slice(payload);
        out.resize(out.len() + suffix, 0);
        self.seal_in_slot(&mut out[at..], typ, payload.len(), seq)
            .map(|_| ())
    }

    /// Seals the record whose slot `slot` is: `prefix()` bytes of room,
    /// `len` bytes of payload, `suffix()` bytes of room. Returns the
    /// record's length, the slot's first bytes.
    // The slot's length is checked against the record first; the offsets
    // are the record's own layout, not peer input.
    #[allow(clippy::indexing_slicing)]
    fn seal_in_slot(
        &self,
        slot: &mut [u8],
        typ: ContentType,
        len: usize,
        seq: u64,
    ) -> Result<usize, String> {
        let fail = |_| "sealing a record failed".to_owned();
        let typ = u8::from(typ);
        let (prefix, suffix) = (self.prefix(), self.suffix());
        let record = prefix + len + suffix;
        if slot.len() < record {
            return Err("a record slot too small for its payload".into());
        }
        // At most 16 KiB + 29 bytes of overhead: fits a u16.
        let wire_len = |n: usize| u16::try_from(n).map_err(|_| "record too large".to_owned());
        let body = wire_len(record - HEADER)?;
        let (head, rest) = slot.split_at_mut(prefix);
        match self.kind {
            Protection::Tls13 => {
                let header = record_header(u8::from(ContentType::ApplicationData), body);
                head.copy_from_slice(&header);
                rest[len] = typ;
                let tag = self
                    .aead
                    .seal(self.xor_nonce(seq), &header, &mut rest[..len + 1])
                    .map_err(fail)?;
                rest[len + 1..len + 1 + TAG].copy_from_slice(&tag);
            }
            Protection::Tls12Gcm | Protection::Tls12Chacha => {
                head[..HEADER].copy_from_slice(&record_header(typ, body));
                // GCM: the nonce's last 8 bytes go out with the record; they
                // continue rustls' sequence (IV XOR seq), so they stay unique.
                let nonce = self.xor_nonce(seq);
                if self.kind == Protection::Tls12Gcm {
                    head[HEADER..].copy_from_slice(&nonce[4..]);
                }
                let aad = tls12_aad(seq, typ, [3, 3], wire_len(len)?);
                let tag = self
                    .aead
                    .seal(nonce, &aad, &mut rest[..len])
                    .map_err(fail)?;
                rest[len..len + TAG].copy_from_slice(&tag);
            }
        }
        Ok(record)
    }
}

impl Sealer {
    fn slots(&self) -> Slots {
        let prefix = self.key.prefix();
        Slots {
            prefix,
            stride: prefix + MAX_FRAGMENT + self.key.suffix(),
        }
    }

    /// Seals the `n` bytes read into `buf`'s slots where they lie. The
    /// records end up back to back, since a read fills each slot before the
    /// next and only the last may be short; returns their length.
    fn seal_slots(&mut self, buf: &mut [u8], n: usize) -> Result<usize, String> {
        let mut wire = 0;
        let mut left = n;
        for slot in buf.chunks_exact_mut(self.slots().stride) {
            if left == 0 {
                break;
            }
            let len = left.min(MAX_FRAGMENT);
            RecordLayer::check_limit(self)?;
            wire += self
                .key
                .seal_in_slot(slot, ContentType::ApplicationData, len, self.seq)?;
            self.seq += 1;
            left -= len;
        }
        if left > 0 {
            return Err("read more than the record slots hold".into());
        }
        Ok(wire)
    }
}

fn overflow(len: usize) -> Broken {
    Broken::protocol(
        AlertDescription::RecordOverflow,
        format!("peer sent a TLS record with {len} bytes of plaintext (more than 2^14)"),
    )
}

fn record_header(typ: u8, len: u16) -> [u8; HEADER] {
    let [hi, lo] = len.to_be_bytes();
    [typ, 3, 3, hi, lo]
}

/// TLS 1.2's additional data: sequence number, type, version, plaintext length.
fn tls12_aad(seq: u64, typ: u8, version: [u8; 2], len: u16) -> [u8; 13] {
    let mut a = [0u8; 13];
    a[..8].copy_from_slice(&seq.to_be_bytes());
    a[8] = typ;
    a[9..11].copy_from_slice(&version);
    a[11..].copy_from_slice(&len.to_be_bytes());
    a
}

impl RecordLayer {
    /// A layer from one direction's keys each way, at their sequence numbers.
    pub(crate) fn from_secrets(
        version: Version,
        peer: PeerRole,
        (rx_seq, rx): (u64, ConnectionTrafficSecrets),
        (tx_seq, tx): (u64, ConnectionTrafficSecrets),
        record_limit: u64,
    ) -> Result<RecordLayer, String> {
        Ok(RecordLayer {
            version,
            rx: Mutex::new(Opener {
                key: RecordKey::new(version, rx)?,
                seq: rx_seq,
                limit: record_limit,
                rules: PeerRules::new(version, peer),
            }),
            tx: Mutex::new(Sealer {
                key: RecordKey::new(version, tx)?,
                seq: tx_seq,
                limit: record_limit,
            }),
        })
    }
}

/// The record layer without a socket, for the fuzz target that holds it to
/// rustls and for the benchmark. Not part of the gateway's interface.
#[doc(hidden)]
// Test and bench scaffolding over buffers it sizes itself.
#[allow(clippy::indexing_slicing)]
pub mod exposed {
    use super::*;

    /// The AEAD of one direction's keys.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Aead {
        Aes128Gcm,
        Aes256Gcm,
        Chacha20Poly1305,
    }

    /// One direction's keys as bytes: rustls' key, its 12-byte IV, and the
    /// sequence number the direction is at.
    pub struct Keys<'a> {
        pub aead: Aead,
        pub key: &'a [u8],
        pub iv: &'a [u8],
        pub seq: u64,
    }

    /// A leg's record layer, the gateway's own.
    pub struct Layer(RecordLayer);

    impl Layer {
        /// `tls13`: the version negotiated (else TLS 1.2); `peer_is_client`:
        /// the layer plays the server.
        pub fn new(
            tls13: bool,
            peer_is_client: bool,
            rx: Keys<'_>,
            tx: Keys<'_>,
        ) -> Result<Layer, String> {
            let version = if tls13 {
                Version::Tls13
            } else {
                Version::Tls12
            };
            let key = |k: &Keys<'_>| {
                let alg = match k.aead {
                    Aead::Aes128Gcm => Algorithm::Aes128Gcm,
                    Aead::Aes256Gcm => Algorithm::Aes256Gcm,
                    Aead::Chacha20Poly1305 => Algorithm::Chacha20Poly1305,
                };
                RecordKey::from_parts(version, alg, k.key, k.iv)
            };
            Ok(Layer(RecordLayer {
                version,
                rx: Mutex::new(Opener {
                    key: key(&rx)?,
                    seq: rx.seq,
                    limit: u64::MAX,
                    rules: PeerRules::new(
                        version,
                        if peer_is_client {
                            PeerRole::Client
                        } else {
                            PeerRole::Server
                        },
                    ),
                }),
                tx: Mutex::new(Sealer {
                    key: key(&tx)?,
                    seq: tx.seq,
                    limit: u64::MAX,
                }),
            }))
        }

        /// Opens the whole records at the start of `buf` in place, as the
        /// forwarding path does, and appends their application data to
        /// `plain` (on a refusal too: what came before it is delivered).
        /// Ok: the bytes taken and whether close_notify ended the stream;
        /// Err: why the layer refused (the connection would end).
        pub fn open(&self, buf: &mut [u8], plain: &mut Vec<u8>) -> Result<(usize, bool), String> {
            let mut ranges = Vec::new();
            let opened = self.0.open(buf, &mut ranges);
            for r in ranges {
                plain.extend_from_slice(&buf[r]);
            }
            match opened.refused {
                Some(broken) => Err(broken.why),
                None => Ok((opened.taken, opened.control == Control::Closed)),
            }
        }

        /// Opens as `open` does, without copying the plaintext out (the
        /// forwarding path writes it to the other side from where it lies);
        /// returns the bytes taken and how many of them were plaintext.
        pub fn open_in_place(&self, buf: &mut [u8]) -> Result<(usize, usize), String> {
            let mut ranges = Vec::new();
            let opened = self.0.open(buf, &mut ranges);
            match opened.refused {
                Some(broken) => Err(broken.why),
                None => Ok((opened.taken, ranges.iter().map(|r| r.len()).sum())),
            }
        }

        /// Seals `plain` as the forwarding path does when it reads from a
        /// plain peer: read into record slots, sealed where it lies.
        pub fn seal_in_slots(&self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
            let slots = self.0.slots();
            for chunk in plain.chunks(4 * MAX_FRAGMENT) {
                let mut buf = vec![0u8; 4 * slots.stride];
                for (slot, part) in buf
                    .chunks_exact_mut(slots.stride)
                    .zip(chunk.chunks(MAX_FRAGMENT))
                {
                    slot[slots.prefix..slots.prefix + part.len()].copy_from_slice(part);
                }
                let wire = self.0.seal_slots(&mut buf, chunk.len())?;
                out.extend_from_slice(&buf[..wire]);
            }
            Ok(())
        }

        /// Seals `plain` as the forwarding path does when it forwards what
        /// it opened from another TLS leg.
        pub fn seal(&self, plain: &[u8]) -> Result<Vec<u8>, String> {
            self.0.seal(std::iter::once(plain))
        }

        /// The alert the layer sends (close_notify at the end of a stream,
        /// a fatal one when it refuses).
        pub fn seal_alert(&self, description: u8) -> Result<Vec<u8>, String> {
            self.0.seal_alert(AlertDescription::from(description))
        }
    }
}

/// What opening a batch of records came to.
pub(crate) struct Opened {
    /// Bytes of whole records taken (and delivered) from the start.
    pub(crate) taken: usize,
    pub(crate) control: Control,
    /// The record after them was refused: the connection ends, after what
    /// came before it is delivered.
    pub(crate) refused: Option<Broken>,
}

/// Where a buffer's record slots are: each is `stride` bytes, its payload
/// `prefix` bytes in, up to `MAX_FRAGMENT` long.
#[derive(Clone, Copy)]
pub(crate) struct Slots {
    pub(crate) prefix: usize,
    pub(crate) stride: usize,
}

impl RecordLayer {
    /// Opens every whole record at the start of `buf` in place and pushes the
    /// ranges of their application data. Says how many bytes were whole
    /// records, whether a close_notify ended the stream, and, if a record
    /// was refused, why: the records before it are delivered, as rustls
    /// delivers them.
    ///
    /// What it refuses, and how, follows rustls (the fuzz target
    /// `records_vs_rustls` holds it to that), stricter only where the
    /// kernel is too: a TLS 1.3 record's outer type must be application
    /// data, and its body at most 2^14 + 256 bytes.
    pub(crate) fn open(&self, buf: &mut [u8], ranges: &mut Vec<Range<usize>>) -> Opened {
        let mut rx = self.rx.lock().unwrap_or_else(|p| p.into_inner());
        let mut at = 0;
        let result = self.open_records(&mut rx, buf, ranges, &mut at);
        match result {
            Ok(control) => Opened {
                taken: at,
                control,
                refused: None,
            },
            Err(broken) => Opened {
                taken: at,
                control: Control::None,
                refused: Some(broken),
            },
        }
    }

    fn open_records(
        &self,
        rx: &mut Opener,
        buf: &mut [u8],
        ranges: &mut Vec<Range<usize>>,
        at: &mut usize,
    ) -> Result<Control, Broken> {
        while *at < buf.len() {
            // A header is judged field by field as its bytes arrive, as
            // rustls does: a peer that cannot send a record is refused
            // without waiting for the rest of one.
            let rest = buf.get(*at..).unwrap_or_default();
            let Some(len) = self.check_header(rest.get(..HEADER).unwrap_or(rest))? else {
                break;
            };
            let Some(&header) = rest.first_chunk::<HEADER>() else {
                break;
            };
            let end = *at + HEADER + len;
            let body_at = *at + HEADER;
            let Some(body) = buf.get_mut(body_at..end) else {
                break;
            };
            if rx.seq >= rx.limit {
                return Err("peer reached the cipher's record limit without a key update".into());
            }
            let seq = rx.seq;
            let (typ, plain) = rx.key.open(header, body, seq)?;
            rx.seq += 1;
            let payload = body_at + plain.start..body_at + plain.end;
            let opened = buf.get(payload.clone()).unwrap_or_default();
            if rx.rules.record(typ, opened)? == Control::Closed {
                *at = end;
                return Ok(Control::Closed);
            }
            if typ == ContentType::ApplicationData && !payload.is_empty() {
                ranges.push(payload);
            }
            *at = end;
        }
        // A record cannot end past what a read holds: a peer announcing a
        // longer one is refused by `check_header` first.
        Ok(Control::None)
    }

    /// Judges what there is of a record header (one to five bytes); the
    /// body length once it is whole.
    fn check_header(&self, header: &[u8]) -> Result<Option<usize>, Broken> {
        let (max, outer_ok): (usize, fn(u8) -> bool) = match self.version {
            // RFC 8446 §5.2: the outer type of a protected record is always 23.
            Version::Tls13 => (MAX_CIPHERTEXT_TLS13, |t| t == 23),
            Version::Tls12 => (MAX_CIPHERTEXT_TLS12 - 1, |t| matches!(t, 21..=23)),
        };
        if let Some(&typ) = header.first()
            && !outer_ok(typ)
        {
            return Err(Broken::protocol(
                AlertDescription::UnexpectedMessage,
                format!("peer sent a record of outer type {typ} after the handshake"),
            ));
        }
        // The version, once both its bytes are in. TLS 1.3 records say 3.3
        // (RFC 8446 §5.1), TLS 1.2 ones 3.x. rustls is looser: it takes any
        // version it has a name for (SSL 2 and DTLS included) and, in TLS
        // 1.3, authenticates 3.3 in place of what was sent. The kernel, like
        // this layer, refuses them.
        if let Some(&[major, minor]) = header.get(1..3) {
            let ok = match self.version {
                Version::Tls13 => (major, minor) == (3, 3),
                Version::Tls12 => major == 3,
            };
            if !ok {
                return Err(Broken::protocol(
                    AlertDescription::DecodeError,
                    format!("peer sent a record with version {major}.{minor}"),
                ));
            }
        }
        let &[_, _, _, hi, lo] = header else {
            return Ok(None);
        };
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        if len > max {
            return Err(Broken::protocol(
                AlertDescription::RecordOverflow,
                format!("peer sent an oversized TLS record ({len} bytes)"),
            ));
        }
        Ok(Some(len))
    }

    /// The record slots plaintext for this leg is read into.
    pub(crate) fn slots(&self) -> Slots {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).slots()
    }

    /// Seals the `n` bytes `read_into_slots` put in `buf` where they lie;
    /// returns the records' length from the start of `buf`.
    pub(crate) fn seal_slots(&self, buf: &mut [u8], n: usize) -> Result<usize, String> {
        let mut tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        tx.seal_slots(buf, n)
    }

    /// Seals `chunks` into application-data records of at most 16 KiB, all
    /// into one buffer (one allocation, one slice to write).
    pub(crate) fn seal<'a>(
        &self,
        chunks: impl Iterator<Item = &'a [u8]> + Clone,
    ) -> Result<Vec<u8>, String> {
        let mut tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = chunks.clone().map(<[u8]>::len).sum();
        let records = total.div_ceil(MAX_FRAGMENT) + chunks.clone().count();
        let mut out = Vec::with_capacity(total + records * (HEADER + EXPLICIT_NONCE + 1 + TAG));
        for chunk in chunks {
            for fragment in chunk.chunks(MAX_FRAGMENT) {
                Self::check_limit(&tx)?;
                let seq = tx.seq;
                tx.key
                    .seal(&mut out, ContentType::ApplicationData, fragment, seq)?;
                tx.seq += 1;
            }
        }
        Ok(out)
    }

    pub(crate) fn seal_alert(&self, alert: AlertDescription) -> Result<Vec<u8>, String> {
        let mut tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        Self::check_limit(&tx)?;
        // close_notify is a warning; anything else we send is fatal.
        let level = if alert == AlertDescription::CloseNotify {
            1
        } else {
            2
        };
        let mut out = Vec::with_capacity(64);
        let seq = tx.seq;
        tx.key
            .seal(&mut out, ContentType::Alert, &[level, u8::from(alert)], seq)?;
        tx.seq += 1;
        Ok(out)
    }

    /// Ends the connection before this key reaches the cipher's record limit.
    fn check_limit(tx: &Sealer) -> Result<(), String> {
        if tx.seq >= tx.limit {
            return Err("the cipher's record limit was reached; closing before keys would be reused past it".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::records::{CAPACITY, READ};

    fn key(version: Version, which: u8) -> RecordKey {
        // rustls builds 16-byte keys only internally; AES-128 is covered
        // end to end (tests/tests/records.rs).
        let key = rustls::crypto::cipher::AeadKey::from([7u8; 32]);
        let iv = rustls::crypto::cipher::Iv::new([9; 12]);
        let s = match which {
            0 => ConnectionTrafficSecrets::Aes256Gcm { key, iv },
            _ => ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv },
        };
        RecordKey::new(version, s).expect("key")
    }

    fn roundtrip(version: Version, which: u8, seq: u64) {
        let (sealer, opener) = (key(version, which), key(version, which));
        let payload = b"through the record layer".repeat(100);
        let mut wire = Vec::new();
        sealer
            .seal(&mut wire, ContentType::ApplicationData, &payload, seq)
            .expect("seal");
        let header: [u8; HEADER] = wire[..HEADER].try_into().unwrap();
        let (typ, range) = opener.open(header, &mut wire[HEADER..], seq).expect("open");
        assert_eq!(typ, ContentType::ApplicationData);
        assert_eq!(&wire[HEADER..][range], &payload[..]);

        // The same record under the wrong sequence number, or with one bit
        // flipped, does not open.
        let mut again = Vec::new();
        sealer
            .seal(&mut again, ContentType::ApplicationData, &payload, seq)
            .unwrap();
        let mut flipped = again.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(opener.open(header, &mut flipped[HEADER..], seq).is_err());
        if version == Version::Tls13 || which == 1 {
            assert!(opener.open(header, &mut again[HEADER..], seq + 1).is_err());
        }
    }

    #[test]
    fn seal_and_open_every_protection_from_any_sequence_number() {
        for version in [Version::Tls12, Version::Tls13] {
            for which in 0..2 {
                for seq in [0, 1, 1 << 40] {
                    roundtrip(version, which, seq);
                }
            }
        }
    }

    /// Plaintext read into record slots and sealed where it lies comes out
    /// as back-to-back records that open to the same bytes, for every
    /// protection and for reads that end inside, at and past a slot.
    #[test]
    fn slots_seal_in_place_into_back_to_back_records() {
        for version in [Version::Tls12, Version::Tls13] {
            for which in 0..2 {
                for n in [1, MAX_FRAGMENT - 1, MAX_FRAGMENT, MAX_FRAGMENT + 1, READ] {
                    let mut tx = Sealer {
                        key: key(version, which),
                        seq: 41,
                        limit: u64::MAX,
                    };
                    let rx = key(version, which);
                    let plain: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
                    let slots = tx.slots();
                    let mut buf = vec![0xee; CAPACITY];
                    // As readv fills them: each slot's payload in turn.
                    for (slot, part) in buf
                        .chunks_exact_mut(slots.stride)
                        .zip(plain.chunks(MAX_FRAGMENT))
                    {
                        slot[slots.prefix..slots.prefix + part.len()].copy_from_slice(part);
                    }
                    let wire = tx.seal_slots(&mut buf, n).expect("seal");
                    let records = n.div_ceil(MAX_FRAGMENT);
                    assert_eq!(tx.seq, 41 + records as u64);
                    let mut opened = Vec::new();
                    let (mut at, mut seq) = (0, 41);
                    while at < wire {
                        let len = usize::from(u16::from_be_bytes([buf[at + 3], buf[at + 4]]));
                        let header: [u8; HEADER] = buf[at..at + HEADER].try_into().unwrap();
                        let body = &mut buf[at + HEADER..at + HEADER + len];
                        let (typ, range) = rx.open(header, body, seq).expect("open");
                        assert_eq!(typ, ContentType::ApplicationData);
                        opened.extend_from_slice(&body[range]);
                        at += HEADER + len;
                        seq += 1;
                    }
                    assert_eq!(at, wire, "records end where the sealed bytes end");
                    assert_eq!(seq, tx.seq);
                    assert!(opened == plain, "{version:?}/{which}/{n}: byte-exact");
                }
            }
        }
    }

    #[test]
    fn tls13_padding_is_stripped_and_the_inner_type_read() {
        let k = key(Version::Tls13, 0);
        // Inner plaintext: "hi", type alert (21), three bytes of padding.
        let inner = [b'h', b'i', 21, 0, 0, 0];
        let header = record_header(23, (inner.len() + TAG) as u16);
        let mut body = inner.to_vec();
        let tag = k.aead.seal(k.xor_nonce(5), &header, &mut body).unwrap();
        body.extend_from_slice(&tag);
        let (typ, range) = k.open(header, &mut body, 5).unwrap();
        assert_eq!((typ, &body[range]), (ContentType::Alert, &b"hi"[..]));
    }
}

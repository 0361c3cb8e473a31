//! What a peer may send once the handshake is over, the same on both
//! paths: the userspace record layer judges every record with it, the
//! kernel path the records splice does not move (alerts, handshake
//! messages) and the empty ones.
//!
//! The rules are rustls', which the fuzz target `records_vs_rustls` holds
//! the record layer to; where they differ they are stricter, and say so:
//! a KeyUpdate ends the connection (neither path can take new keys), a TLS
//! 1.2 renegotiation is refused rather than answered with a warning, and
//! a client's handshake message is refused on its first byte, as no
//! message a client may send here is one the gateway can take.
//!
//! A TLS 1.3 server's session ticket (the one message taken) is never
//! used, but it is read as rustls reads it (RFC 8446 §4.6.1): its fields
//! as they arrive, record by record, refused with the alert rustls sends
//! (decode_error; illegal_parameter for a repeated extension) once the
//! message is whole, so that a ticket cut short by the stream's end is
//! not refused where rustls would merely wait. Nothing of it is buffered:
//! what is kept is the field being read, the bytes left to skip, where
//! the extension list ends, and, only while a ticket with extensions is
//! on its way, the set of extension types seen (8 KiB, one bit per
//! type: rustls refuses any type twice), dropped at the message's end.

use rustls::{AlertDescription, ContentType};

use super::{PeerRole, Version};
use crate::forward::Broken;

/// Empty records in a row before the peer is refused, as rustls counts
/// them: an endless stream of them would cost work and move nothing.
pub(crate) const MAX_EMPTY_IN_A_ROW: u8 = 32;
/// Warning alerts a TLS 1.2 peer may send before it is refused (rustls'
/// own allowance).
const WARNING_ALERTS: u8 = 4;
/// Largest post-handshake message announced: rustls' own limit.
const MAX_HANDSHAKE_MESSAGE: usize = 0xffff;
const HANDSHAKE_HELLO_REQUEST: u8 = 0;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const HANDSHAKE_NEW_SESSION_TICKET: u8 = 4;
const HANDSHAKE_KEY_UPDATE: u8 = 24;

/// What a record came to besides application data.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Control {
    None,
    /// close_notify: the peer will send nothing more.
    Closed,
}

/// One direction's judge of what the peer sends after the handshake.
pub(crate) struct PeerRules {
    version: Version,
    peer: PeerRole,
    empty_in_a_row: u8,
    warnings_left: u8,
    message: Message,
}

/// A handshake message on its way, across records: its header as it
/// arrives, then how much of its body is still to come and, the only
/// message taken being a ticket, that body read as one.
#[derive(Default)]
struct Message {
    header: [u8; 4],
    have: usize,
    left: usize,
    ticket: Ticket,
}

impl Message {
    fn in_progress(&self) -> bool {
        self.have > 0
    }
}

impl PeerRules {
    pub(crate) fn new(version: Version, peer: PeerRole) -> PeerRules {
        PeerRules {
            version,
            peer,
            empty_in_a_row: 0,
            warnings_left: WARNING_ALERTS,
            message: Message::default(),
        }
    }

    /// One opened record: its content type and payload. Application data
    /// is the caller's to move; Ok(Closed) is close_notify.
    pub(crate) fn record(&mut self, typ: ContentType, payload: &[u8]) -> Result<Control, Broken> {
        if payload.is_empty() {
            self.empty()?;
        } else {
            self.empty_in_a_row = 0;
        }
        if typ != ContentType::Handshake && self.message.in_progress() {
            return Err(Broken::protocol(
                AlertDescription::UnexpectedMessage,
                "peer interleaved a record with a split handshake message",
            ));
        }
        match typ {
            ContentType::ApplicationData => Ok(Control::None),
            ContentType::Alert => self.alert(payload),
            ContentType::Handshake => self.handshake(payload).map(|()| Control::None),
            other => Err(Broken::protocol(
                AlertDescription::UnexpectedMessage,
                format!("peer sent an unexpected {other:?} record"),
            )),
        }
    }

    /// An empty application-data record the kernel consumed (splice moved
    /// nothing for it).
    pub(crate) fn empty(&mut self) -> Result<(), Broken> {
        self.empty_in_a_row += 1;
        if self.empty_in_a_row > MAX_EMPTY_IN_A_ROW {
            return Err(Broken::protocol(
                AlertDescription::UnexpectedMessage,
                format!("peer sent more than {MAX_EMPTY_IN_A_ROW} empty records in a row"),
            ));
        }
        Ok(())
    }

    /// Payload the kernel spliced: it ends a run of empty records.
    pub(crate) fn data(&mut self) {
        self.empty_in_a_row = 0;
    }

    /// An alert: close_notify ends the peer's direction; a TLS 1.2 warning
    /// (or TLS 1.3's user_canceled) is let pass a few times, as rustls
    /// does; anything else ends the connection.
    fn alert(&mut self, body: &[u8]) -> Result<Control, Broken> {
        let &[level, description] = body else {
            return Err(Broken::protocol(
                AlertDescription::DecodeError,
                format!("peer sent a malformed TLS alert ({} bytes)", body.len()),
            ));
        };
        let desc = AlertDescription::from(description);
        if !matches!(level, 1 | 2) {
            return Err(Broken::protocol(
                AlertDescription::IllegalParameter,
                format!("peer sent TLS alert {desc:?} with unknown level {level}"),
            ));
        }
        if desc == AlertDescription::CloseNotify {
            return Ok(Control::Closed);
        }
        if level == 2 {
            return Err(format!("peer sent fatal TLS alert {desc:?}").into());
        }
        if self.warnings_left == 0 {
            return Err(format!("peer sent too many warning alerts (last {desc:?})").into());
        }
        self.warnings_left -= 1;
        if self.version == Version::Tls13 && desc != AlertDescription::UserCanceled {
            return Err(Broken::protocol(
                AlertDescription::DecodeError,
                format!("peer sent warning alert {desc:?}, which TLS 1.3 does not allow"),
            ));
        }
        tracing::debug!(alert = ?desc, "ignoring a warning alert from the peer");
        Ok(Control::None)
    }

    /// A handshake record's fragment. Messages may span records; each is
    /// judged as soon as its type is known, and the one taken (a TLS 1.3
    /// server's session ticket) is skipped by its announced length.
    fn handshake(&mut self, mut fragment: &[u8]) -> Result<(), Broken> {
        if fragment.is_empty() {
            // RFC 8446 §5.1: zero-length fragments of handshake types are not sent.
            return Err(Broken::protocol(
                AlertDescription::UnexpectedMessage,
                "peer sent an empty handshake record",
            ));
        }
        while !fragment.is_empty() {
            let m = &mut self.message;
            if m.have < 4 {
                let n = (4 - m.have).min(fragment.len());
                let (part, rest) = fragment.split_at_checked(n).unwrap_or((fragment, &[]));
                if let Some(room) = m.header.get_mut(m.have..m.have + part.len()) {
                    room.copy_from_slice(part);
                }
                m.have += part.len();
                fragment = rest;
                let [typ, ..] = m.header;
                if m.have == n {
                    // The type just arrived.
                    self.judge(typ)?;
                }
                let m = &mut self.message;
                if m.have == 4 {
                    let [_, a, b, c] = m.header;
                    let len = u32::from_be_bytes([0, a, b, c]) as usize;
                    if len > MAX_HANDSHAKE_MESSAGE {
                        return Err(Broken::protocol(
                            AlertDescription::DecodeError,
                            format!("peer announced a {len}-byte handshake message"),
                        ));
                    }
                    if typ != HANDSHAKE_NEW_SESSION_TICKET {
                        // `judge` lets no other message through.
                        return Err(Broken::protocol(
                            AlertDescription::UnexpectedMessage,
                            format!("peer's handshake message {typ} was not refused by its type"),
                        ));
                    }
                    m.left = len;
                    if len == 0 {
                        self.ticket_ends()?;
                    }
                }
                continue;
            }
            let n = m.left.min(fragment.len());
            let (body, rest) = fragment.split_at_checked(n).unwrap_or((fragment, &[]));
            m.ticket.take(body, m.left);
            m.left -= n;
            fragment = rest;
            if m.left == 0 {
                self.ticket_ends()?;
            }
        }
        Ok(())
    }

    /// The ticket's last byte arrived: it is judged whole, as rustls
    /// judges it, and forgotten.
    fn ticket_ends(&mut self) -> Result<(), Broken> {
        let message = std::mem::take(&mut self.message);
        message.ticket.end().map_err(|fault| {
            let alert = match fault {
                Malformed::RepeatedExtension(_) => AlertDescription::IllegalParameter,
                _ => AlertDescription::DecodeError,
            };
            Broken::protocol(
                alert,
                format!("peer's session ticket is malformed: {fault}"),
            )
        })
    }

    /// Whether a post-handshake message of this type may be taken.
    fn judge(&self, typ: u8) -> Result<(), Broken> {
        let unexpected = |what: String| Broken::protocol(AlertDescription::UnexpectedMessage, what);
        match (self.version, self.peer, typ) {
            (Version::Tls13, PeerRole::Server, HANDSHAKE_NEW_SESSION_TICKET) => Ok(()),
            (Version::Tls13, _, HANDSHAKE_KEY_UPDATE) => {
                Err("peer sent a TLS KeyUpdate; this path cannot take new keys, closing".into())
            }
            (Version::Tls12, PeerRole::Server, HANDSHAKE_HELLO_REQUEST)
            | (Version::Tls12, PeerRole::Client, HANDSHAKE_CLIENT_HELLO) => Err(Broken::protocol(
                AlertDescription::NoRenegotiation,
                "peer tried to renegotiate (refused)",
            )),
            (_, PeerRole::Client, HANDSHAKE_NEW_SESSION_TICKET) => Err(unexpected(
                "client sent a session ticket, which only servers send".into(),
            )),
            (_, PeerRole::Client, t) => Err(unexpected(format!(
                "client sent handshake message {t} after the handshake"
            ))),
            (_, PeerRole::Server, t) => Err(unexpected(format!(
                "server sent handshake message {t} after the handshake"
            ))),
        }
    }
}

/// ExtensionType::EarlyData: its body is exactly a u32.
const EXTENSION_EARLY_DATA: u16 = 42;

/// What is wrong with a session ticket, in rustls' reading order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Malformed {
    #[error("it ends inside its {0}")]
    Short(&'static str),
    #[error("the length of its {0} overruns what holds it")]
    Overrun(&'static str),
    #[error("its ticket is empty")]
    EmptyTicket,
    #[error("its early_data extension is {0} bytes, not 4")]
    EarlyDataLength(u32),
    #[error("it repeats extension {0}")]
    RepeatedExtension(u16),
    #[error("bytes follow its extensions")]
    Trailing,
}

/// The numbers of a NewSessionTicket, in order; between them, opaque
/// fields skipped by their length.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Field {
    #[default]
    Lifetime,
    AgeAdd,
    NonceLength,
    TicketLength,
    ExtensionsLength,
    ExtensionType,
    ExtensionLength,
    /// The extension list is over: nothing may follow.
    Done,
}

impl Field {
    fn width(self) -> u8 {
        match self {
            Field::Lifetime | Field::AgeAdd => 4,
            Field::NonceLength => 1,
            Field::Done => 0,
            _ => 2,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Field::Lifetime => "ticket_lifetime",
            Field::AgeAdd => "ticket_age_add",
            Field::NonceLength => "ticket_nonce",
            Field::TicketLength => "ticket",
            Field::ExtensionsLength => "extensions",
            Field::ExtensionType | Field::ExtensionLength => "extension",
            Field::Done => "end",
        }
    }
}

/// A TLS 1.3 NewSessionTicket's body, read as it arrives. The first fault
/// is kept and reported at the message's end (rustls reads a message only
/// once it is whole); the bytes after it are only counted.
#[derive(Default)]
struct Ticket {
    field: Field,
    /// The current number, as its bytes arrive.
    number: u32,
    have: u8,
    /// Bytes of an opaque field (nonce, ticket, extension body) to skip.
    skip: u32,
    /// Message bytes still to come where the extension list ends.
    list_ends_at: u32,
    extension: u16,
    /// Extension types seen, one bit each; only once there are extensions.
    seen: Option<Box<[u64; 1024]>>,
    fault: Option<Malformed>,
}

impl Ticket {
    /// The next bytes of the body; `left` of it were still to come before
    /// them (the message's length bounds every field).
    fn take(&mut self, mut bytes: &[u8], left: usize) {
        let mut left = u32::try_from(left).unwrap_or(u32::MAX);
        while !bytes.is_empty() && self.fault.is_none() {
            if self.skip > 0 {
                let n = self
                    .skip
                    .min(u32::try_from(bytes.len()).unwrap_or(u32::MAX));
                self.skip -= n;
                left -= n;
                bytes = bytes.get(n as usize..).unwrap_or_default();
                continue;
            }
            let in_list = matches!(self.field, Field::ExtensionType | Field::ExtensionLength);
            if self.field == Field::Done || (in_list && left <= self.list_ends_at) {
                self.fault = Some(if self.field == Field::Done {
                    Malformed::Trailing
                } else {
                    Malformed::Short(self.field.name())
                });
                break;
            }
            let [byte, rest @ ..] = bytes else { break };
            bytes = rest;
            left -= 1;
            self.number = self.number << 8 | u32::from(*byte);
            self.have += 1;
            if self.have == self.field.width() {
                let number = std::mem::take(&mut self.number);
                self.have = 0;
                self.field_read(number, left);
            }
        }
    }

    /// A number is whole; `left` message bytes follow it.
    fn field_read(&mut self, number: u32, left: u32) {
        let overrun = |f: Field| Some(Malformed::Overrun(f.name()));
        self.field = match self.field {
            Field::Lifetime => Field::AgeAdd,
            Field::AgeAdd => Field::NonceLength,
            Field::NonceLength if number > left => return self.fault = overrun(self.field),
            Field::NonceLength => {
                self.skip = number;
                Field::TicketLength
            }
            Field::TicketLength if number > left => return self.fault = overrun(self.field),
            // RFC 8446: opaque ticket<1..2^16-1>.
            Field::TicketLength if number == 0 => return self.fault = Some(Malformed::EmptyTicket),
            Field::TicketLength => {
                self.skip = number;
                Field::ExtensionsLength
            }
            Field::ExtensionsLength if number > left => return self.fault = overrun(self.field),
            Field::ExtensionsLength => {
                self.list_ends_at = left - number;
                self.next_in_list(left)
            }
            Field::ExtensionType => {
                self.extension = u16::try_from(number).unwrap_or(u16::MAX);
                Field::ExtensionLength
            }
            Field::ExtensionLength if number > left - self.list_ends_at => {
                return self.fault = overrun(self.field);
            }
            Field::ExtensionLength => {
                let seen = self.seen.get_or_insert_with(|| Box::new([0; 1024]));
                let (word, bit) = (usize::from(self.extension >> 6), self.extension & 63);
                if let Some(w) = seen.get_mut(word) {
                    if *w & 1 << bit != 0 {
                        return self.fault = Some(Malformed::RepeatedExtension(self.extension));
                    }
                    *w |= 1 << bit;
                }
                if self.extension == EXTENSION_EARLY_DATA && number != 4 {
                    return self.fault = Some(if number < 4 {
                        Malformed::Short("early_data extension")
                    } else {
                        Malformed::EarlyDataLength(number)
                    });
                }
                self.skip = number;
                self.next_in_list(left - number)
            }
            Field::Done => Field::Done,
        };
    }

    /// After an extension (or the list's length), with `left` message
    /// bytes to follow it.
    fn next_in_list(&self, left: u32) -> Field {
        if left == self.list_ends_at {
            Field::Done
        } else {
            Field::ExtensionType
        }
    }

    /// The message is whole.
    fn end(self) -> Result<(), Malformed> {
        if let Some(fault) = self.fault {
            return Err(fault);
        }
        if self.field != Field::Done || self.skip > 0 {
            return Err(Malformed::Short(self.field.name()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(typ: u8, body: &[u8]) -> Vec<u8> {
        let len = (body.len() as u32).to_be_bytes();
        let mut m = vec![typ, len[1], len[2], len[3]];
        m.extend_from_slice(body);
        m
    }

    /// A NewSessionTicket body: lifetime, age_add, nonce, ticket, then
    /// the extensions as given (type, body).
    fn ticket_body(nonce: &[u8], ticket: &[u8], extensions: &[(u16, &[u8])]) -> Vec<u8> {
        let mut b = vec![0, 0, 0x1c, 0x20, 1, 2, 3, 4];
        b.push(nonce.len() as u8);
        b.extend_from_slice(nonce);
        b.extend_from_slice(&(ticket.len() as u16).to_be_bytes());
        b.extend_from_slice(ticket);
        let mut list = Vec::new();
        for (typ, body) in extensions {
            list.extend_from_slice(&typ.to_be_bytes());
            list.extend_from_slice(&(body.len() as u16).to_be_bytes());
            list.extend_from_slice(body);
        }
        b.extend_from_slice(&(list.len() as u16).to_be_bytes());
        b.extend_from_slice(&list);
        b
    }

    /// A well-formed ticket, as OpenSSL sends it (nonce, early_data) and
    /// with an unknown extension beside.
    fn good_ticket() -> Vec<u8> {
        ticket_body(
            &[0, 1],
            &[7; 200],
            &[
                (EXTENSION_EARLY_DATA, &[0, 0, 0x40, 0]),
                (0xfe0d, &[9, 9, 9]),
            ],
        )
    }

    fn take_ticket(body: &[u8]) -> Result<(), Broken> {
        let mut rules = PeerRules::new(Version::Tls13, PeerRole::Server);
        rules.record(
            ContentType::Handshake,
            &msg(HANDSHAKE_NEW_SESSION_TICKET, body),
        )?;
        assert!(!rules.message.in_progress());
        rules
            .record(ContentType::ApplicationData, b"data")
            .map(drop)
    }

    /// A server's well-formed tickets pass however they are split across
    /// records, at every byte, and nothing of them is kept after.
    #[test]
    fn a_servers_ticket_passes_split_at_every_byte() {
        for body in [good_ticket(), ticket_body(&[], &[1], &[])] {
            let ticket = msg(HANDSHAKE_NEW_SESSION_TICKET, &body);
            for split in 1..ticket.len() {
                let mut rules = PeerRules::new(Version::Tls13, PeerRole::Server);
                let (a, b) = ticket.split_at(split);
                rules.record(ContentType::Handshake, a).unwrap();
                assert!(rules.message.in_progress(), "split {split}");
                rules.record(ContentType::Handshake, b).unwrap();
                assert!(!rules.message.in_progress(), "split {split}");
                assert!(rules.message.ticket.seen.is_none(), "split {split}");
                rules.record(ContentType::ApplicationData, b"data").unwrap();
            }
            // Byte by byte, in one record each.
            let mut rules = PeerRules::new(Version::Tls13, PeerRole::Server);
            for b in &ticket {
                rules.record(ContentType::Handshake, &[*b]).unwrap();
            }
            assert!(!rules.message.in_progress());
        }
        // Two in one record, as real servers send them.
        let ticket = msg(HANDSHAKE_NEW_SESSION_TICKET, &good_ticket());
        let mut rules = PeerRules::new(Version::Tls13, PeerRole::Server);
        rules
            .record(ContentType::Handshake, &[ticket.clone(), ticket].concat())
            .unwrap();
        assert!(!rules.message.in_progress());
        assert!(std::mem::size_of::<PeerRules>() <= 96, "no buffer kept");
    }

    /// Every ticket rustls refuses is refused, with rustls' alert, only
    /// once whole: each malformation at its own place.
    #[test]
    fn a_malformed_ticket_is_refused_as_rustls_refuses_it() {
        let good = good_ticket();
        let decode = AlertDescription::DecodeError;
        let mut overrun_nonce = good.clone();
        overrun_nonce[8] = 250;
        let mut underrun_list = good.clone();
        let at = good.len() - 15 - 2;
        underrun_list[at + 1] -= 1; // list one byte short: the last extension overruns it
        let mut overrun_list = good.clone();
        overrun_list[at + 1] += 1;
        let mut overrun_ticket = ticket_body(&[1], &[7; 4], &[]);
        overrun_ticket[11] = 7;
        let mut cut_header = ticket_body(&[], &[1], &[]);
        cut_header.truncate(cut_header.len() - 2);
        cut_header.extend_from_slice(&[0, 3, 0, 7, 0]);
        let cases: Vec<(&str, Vec<u8>, AlertDescription, &str)> = vec![
            (
                "list ends in an extension",
                cut_header,
                decode,
                "ends inside its extension",
            ),
            ("empty body", vec![], decode, "ticket_lifetime"),
            ("short lifetime", vec![0, 0, 1], decode, "ticket_lifetime"),
            ("short age_add", vec![0; 7], decode, "ticket_age_add"),
            ("no nonce length", vec![0; 8], decode, "ticket_nonce"),
            ("nonce overruns", overrun_nonce, decode, "overruns"),
            ("no ticket", vec![0; 9], decode, "ends inside its ticket"),
            (
                "empty ticket",
                ticket_body(&[], &[], &[]),
                decode,
                "ticket is empty",
            ),
            ("ticket overruns", overrun_ticket, decode, "overruns"),
            (
                "no extensions",
                good[..good.len() - 17].to_vec(),
                decode,
                "extensions",
            ),
            ("list overruns", overrun_list, decode, "overruns"),
            ("list underruns", underrun_list, decode, "overruns"),
            (
                "cut in the list",
                good[..good.len() - 1].to_vec(),
                decode,
                "overruns",
            ),
            (
                "trailing bytes",
                [&good[..], &[0]].concat(),
                decode,
                "bytes follow",
            ),
            (
                "short early_data",
                ticket_body(&[], &[1], &[(EXTENSION_EARLY_DATA, &[0, 0, 1])]),
                decode,
                "ends inside its early_data",
            ),
            (
                "long early_data",
                ticket_body(&[], &[1], &[(EXTENSION_EARLY_DATA, &[0, 0, 0, 1, 0])]),
                decode,
                "5 bytes, not 4",
            ),
            (
                "repeated early_data",
                ticket_body(
                    &[],
                    &[1],
                    &[
                        (EXTENSION_EARLY_DATA, &[0; 4]),
                        (EXTENSION_EARLY_DATA, &[0; 4]),
                    ],
                ),
                AlertDescription::IllegalParameter,
                "repeats extension 42",
            ),
            (
                "repeated unknown",
                ticket_body(&[], &[1], &[(7, &[]), (42, &[0; 4]), (7, &[1])]),
                AlertDescription::IllegalParameter,
                "repeats extension 7",
            ),
        ];
        for (what, body, alert, why) in cases {
            let err = take_ticket(&body).expect_err(what);
            assert_eq!(err.alert, Some(alert), "{what}: {}", err.why);
            assert!(err.why.contains(why), "{what}: {}", err.why);
            assert!(err.why.contains("session ticket is malformed"), "{what}");
        }
        take_ticket(&good).unwrap();
    }

    /// A fault is judged only at the message's end, as rustls reads a
    /// message only whole: a stream cut inside a bad ticket is not refused.
    #[test]
    fn a_bad_tickets_fault_waits_for_its_end() {
        let mut rules = PeerRules::new(Version::Tls13, PeerRole::Server);
        let mut ticket = msg(HANDSHAKE_NEW_SESSION_TICKET, &ticket_body(&[], &[], &[]));
        ticket.extend_from_slice(&[0; 3]);
        ticket[3] += 3;
        let (a, b) = ticket.split_at(ticket.len() - 1);
        rules.record(ContentType::Handshake, a).unwrap();
        assert!(rules.record(ContentType::Handshake, b).is_err());
    }

    /// A client has nothing to send here the gateway could take: each of
    /// its messages is refused on its first byte, before any more of it is
    /// read or kept.
    #[test]
    fn a_clients_message_is_refused_on_its_type() {
        for (typ, why) in [
            (HANDSHAKE_NEW_SESSION_TICKET, "client sent a session ticket"),
            (HANDSHAKE_KEY_UPDATE, "KeyUpdate"),
            (20, "client sent handshake message 20"),
        ] {
            let mut rules = PeerRules::new(Version::Tls13, PeerRole::Client);
            let err = rules.record(ContentType::Handshake, &[typ]).unwrap_err();
            assert!(err.why.contains(why), "{typ}: {}", err.why);
        }
        let mut rules = PeerRules::new(Version::Tls12, PeerRole::Client);
        let err = rules.record(ContentType::Handshake, &[1, 0]).unwrap_err();
        assert_eq!(err.alert, Some(AlertDescription::NoRenegotiation));
    }

    #[test]
    fn interleaving_empty_records_and_alerts() {
        let mut rules = PeerRules::new(Version::Tls13, PeerRole::Server);
        rules.record(ContentType::Handshake, &[4, 0]).unwrap();
        let err = rules
            .record(ContentType::ApplicationData, b"x")
            .unwrap_err();
        assert!(err.why.contains("interleaved"), "{}", err.why);

        let mut rules = PeerRules::new(Version::Tls13, PeerRole::Client);
        for _ in 0..MAX_EMPTY_IN_A_ROW {
            rules.record(ContentType::ApplicationData, &[]).unwrap();
        }
        rules.data();
        for _ in 0..MAX_EMPTY_IN_A_ROW {
            rules.empty().unwrap();
        }
        assert!(rules.empty().is_err());

        let mut rules = PeerRules::new(Version::Tls12, PeerRole::Client);
        for _ in 0..WARNING_ALERTS {
            assert_eq!(
                rules.record(ContentType::Alert, &[1, 100]).unwrap(),
                Control::None
            );
        }
        assert!(rules.record(ContentType::Alert, &[1, 100]).is_err());
        assert_eq!(
            rules.record(ContentType::Alert, &[1, 0]).unwrap(),
            Control::Closed
        );
    }
}

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
//! Nothing is buffered: a TLS 1.3 server's session ticket (the one message
//! taken) is skipped by its length, unparsed, since tickets are never used.

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
/// arrives, then how much of its body is still to be skipped.
#[derive(Default)]
struct Message {
    header: [u8; 4],
    have: usize,
    left: usize,
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
                    m.left = len;
                    if len == 0 {
                        *m = Message::default();
                    }
                }
                continue;
            }
            let n = m.left.min(fragment.len());
            m.left -= n;
            fragment = fragment.get(n..).unwrap_or_default();
            if m.left == 0 {
                *m = Message::default();
            }
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(typ: u8, body: &[u8]) -> Vec<u8> {
        let len = (body.len() as u32).to_be_bytes();
        let mut m = vec![typ, len[1], len[2], len[3]];
        m.extend_from_slice(body);
        m
    }

    /// A server's tickets pass however they are split, and are skipped
    /// without being kept.
    #[test]
    fn a_servers_ticket_is_skipped_across_records() {
        let ticket = msg(HANDSHAKE_NEW_SESSION_TICKET, &[7; 300]);
        for split in [1, 2, 3, 4, 5, 150, 303] {
            let mut rules = PeerRules::new(Version::Tls13, PeerRole::Server);
            let (a, b) = ticket.split_at(split);
            rules.record(ContentType::Handshake, a).unwrap();
            assert!(rules.message.in_progress(), "split {split}");
            rules.record(ContentType::Handshake, b).unwrap();
            assert!(!rules.message.in_progress(), "split {split}");
            rules.record(ContentType::ApplicationData, b"data").unwrap();
        }
        let mut rules = PeerRules::new(Version::Tls13, PeerRole::Server);
        let two = [ticket.clone(), ticket].concat();
        rules.record(ContentType::Handshake, &two).unwrap();
        assert!(std::mem::size_of::<PeerRules>() <= 32, "no buffer, ever");
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

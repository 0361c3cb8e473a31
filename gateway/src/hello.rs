//! Reading a ClientHello: rustls' Acceptor over a stream whose record
//! framing is followed from the first byte (`offload::Framed`), bounded in
//! size, every way it can fail named as the refusal it is counted as.
//! Generic over the stream, so the fuzz target drives this very code with
//! arbitrary bytes.

use rustls::AlertDescription;
use rustls::server::{Accepted, Acceptor};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::admission::Refusal;
use crate::offload::Framed;

/// The most wire bytes read before a ClientHello is complete: a hello fills
/// at most one record of 16 KiB (with post-quantum key shares a real one is
/// about 2 KiB); some slack for one split across records.
pub const MAX_CLIENT_HELLO: usize = 16_384 + 2048;

/// Why no ClientHello came: the refusal it is counted as, and the access
/// log's words.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct Refused {
    pub refusal: Refusal,
    pub reason: String,
}

/// Reads until the Acceptor holds a whole ClientHello. A refused one gets
/// the alert rustls chose (or decode_error when it is too large) on the
/// way out.
pub async fn read<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut Framed<S>,
) -> Result<Accepted, Refused> {
    let refused = |refusal, reason: String| Refused { refusal, reason };
    let mut acceptor = Acceptor::default();
    let mut buf = vec![0u8; 4096];
    let mut read = 0usize;
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) => {
                return Err(refused(
                    Refusal::ClientClosed,
                    "client closed before sending a ClientHello".into(),
                ));
            }
            Ok(n) => n,
            // Framed refuses a header no TLS peer sends as InvalidData;
            // anything else is the connection breaking.
            Err(e) => {
                let refusal = if e.kind() == std::io::ErrorKind::InvalidData {
                    Refusal::BadRecord
                } else {
                    Refusal::ClientClosed
                };
                return Err(refused(refusal, format!("reading ClientHello: {e}")));
            }
        };
        read += n;
        let mut input = buf.get(..n).unwrap_or_default();
        while !input.is_empty() {
            match acceptor.read_tls(&mut input) {
                // rustls takes no more input (it saw close_notify): never
                // loop on that.
                Ok(0) => {
                    return Err(refused(
                        Refusal::ClientClosed,
                        "client closed its side before sending a ClientHello".into(),
                    ));
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(refused(
                        Refusal::BadClientHello,
                        format!("reading ClientHello: {e}"),
                    ));
                }
            }
        }
        match acceptor.accept() {
            Ok(None) if read > MAX_CLIENT_HELLO => {
                // rustls would buffer a hello of up to 64 KiB and any number
                // of records before it; no client needs that.
                let _ = stream
                    .write_all(&crate::tls::plaintext_alert(AlertDescription::DecodeError))
                    .await;
                return Err(refused(
                    Refusal::ClientHelloTooLarge,
                    format!(
                        "no complete ClientHello in the first {read} bytes (at most {MAX_CLIENT_HELLO})"
                    ),
                ));
            }
            Ok(None) => {}
            Ok(Some(accepted)) => return Ok(accepted),
            Err((e, mut alert)) => {
                let mut out = Vec::new();
                let _ = alert.write_all(&mut out);
                let _ = stream.write_all(&out).await;
                return Err(refused(refusal_of(&e), format!("bad ClientHello: {e}")));
            }
        }
    }
}

/// What a ClientHello (or a handshake after it) rustls refused is counted
/// as: asking for what the listener does not speak (only TLS 1.0, no
/// signature algorithms, no shared suite) is incompatible.
pub fn refusal_of(e: &rustls::Error) -> Refusal {
    match e {
        rustls::Error::PeerIncompatible(_) => Refusal::Incompatible,
        _ => Refusal::BadClientHello,
    }
}

/// For the fuzz target: the server name of the ClientHello `stream`
/// carries, or the label of the refusal.
#[doc(hidden)]
pub mod exposed {
    use super::*;

    pub async fn server_name<S: AsyncRead + AsyncWrite + Unpin>(
        stream: S,
    ) -> Result<Option<String>, &'static str> {
        let mut framed = Framed::new(stream);
        match read(&mut framed).await {
            Ok(accepted) => Ok(accepted.client_hello().server_name().map(str::to_owned)),
            Err(r) => Err(r.refusal.label()),
        }
    }
}

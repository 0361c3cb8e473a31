//! Following the TLS record framing through the handshake.
//!
//! After the handshake, the kernel or the userspace record layer takes over
//! the byte stream, and it must take over at a record boundary: bytes of a
//! record that rustls already read are bytes the new owner never sees. So
//! the handshake's reads are watched for record headers, and the hand-off
//! finishes the record the last read stopped inside of, for rustls to
//! decrypt along with the rest (`offload::finish`).
//!
//! Reads are not cut at record boundaries: a flight of four records comes in
//! one read rather than a header read and a body read for each. Whole
//! records read past the handshake are decrypted by rustls and forwarded
//! first, so only a partial record needs care, and rustls reads at most a
//! few KiB at a time, which bounds what it holds.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const HEADER: usize = 5;

pub struct Framed<S> {
    inner: S,
    header: [u8; HEADER],
    header_len: usize,
    /// Bytes of the current record's body still to come.
    body_left: usize,
}

impl<S> Framed<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            header: [0; HEADER],
            header_len: 0,
            body_left: 0,
        }
    }

    /// True when the bytes read so far end exactly at a record boundary, so
    /// the kernel can take over the byte stream from here.
    pub fn at_record_boundary(&self) -> bool {
        self.header_len == 0 && self.body_left == 0
    }

    /// Reads the rest of the record the last read stopped inside of, and
    /// returns those bytes: for rustls to finish that record, and for the
    /// kernel or the record layer to start at the next one.
    pub async fn complete_record(&mut self) -> io::Result<Vec<u8>>
    where
        S: AsyncRead + Unpin,
    {
        use tokio::io::AsyncReadExt as _;
        let mut rest = Vec::new();
        while !self.at_record_boundary() {
            let mut chunk = vec![0u8; self.allowance()];
            self.inner.read_exact(&mut chunk).await?;
            self.observe(&chunk)?;
            rest.extend_from_slice(&chunk);
        }
        Ok(rest)
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn into_inner(self) -> S {
        self.inner
    }

    /// How many bytes are left of the header or body being read.
    fn allowance(&self) -> usize {
        if self.body_left > 0 {
            self.body_left
        } else {
            HEADER - self.header_len
        }
    }

    /// Follows the record framing over bytes that were just read. A header
    /// no TLS peer sends is an error: past it, nothing can say where the
    /// next record starts.
    fn observe(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(bytes.len());
                self.body_left -= n;
                bytes = bytes.get(n..).unwrap_or_default();
                continue;
            }
            let n = (HEADER - self.header_len).min(bytes.len());
            let (part, rest) = bytes.split_at_checked(n).unwrap_or((bytes, &[]));
            if let Some(room) = self
                .header
                .get_mut(self.header_len..self.header_len + part.len())
            {
                room.copy_from_slice(part);
            }
            self.header_len += part.len();
            bytes = rest;
            if self.header_len == HEADER {
                self.body_left = record_length(self.header)?;
                self.header_len = 0;
            }
        }
        Ok(())
    }
}

/// The body length a record header announces, if it is one a TLS peer may
/// send: a known content type, a 3.x version, no more than rustls reads
/// (2^14 + 2048 bytes), and empty only for application data. These are
/// rustls' own deframing rules, so nothing rustls would refuse is followed.
fn record_length(header: [u8; HEADER]) -> io::Result<usize> {
    let [typ, major, minor, hi, lo] = header;
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    let known_type = matches!(
        typ,
        CHANGE_CIPHER_SPEC | ALERT | HANDSHAKE | APPLICATION_DATA
    );
    if !known_type || major != 3 || len >= MAX_RECORD_BODY || (len == 0 && typ != APPLICATION_DATA)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "malformed TLS record header: type {typ}, version {major}.{minor}, length {len}"
            ),
        ));
    }
    Ok(len)
}

const CHANGE_CIPHER_SPEC: u8 = 20;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;
/// rustls refuses a record body of this length or more.
const MAX_RECORD_BODY: usize = 16_384 + 2048;

impl<S: AsyncRead + Unpin> AsyncRead for Framed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let start = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let end = buf.filled().len();
            let observed = self.observe(buf.filled().get(start..end).unwrap_or_default());
            if let Err(e) = observed {
                // What was read is not delivered: it is not TLS.
                buf.set_filled(start);
                return Poll::Ready(Err(e));
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Framed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn record(len: u16) -> Vec<u8> {
        // Application data: the one type that may be empty.
        let mut r = vec![23, 3, 3];
        r.extend_from_slice(&len.to_be_bytes());
        r.extend(std::iter::repeat_n(0xAB, usize::from(len)));
        r
    }

    #[tokio::test]
    async fn the_framing_is_followed_and_a_record_cut_off_is_completed() {
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut records = record(300);
        records.extend(record(7));
        records.extend(record(7));
        // Two whole records, and the third cut inside its header.
        let cut = 5 + 300 + 5 + 7 + 3;
        tx.write_all(&records[..cut]).await.unwrap();
        let mut framed = Framed::new(rx);
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while got.len() < cut {
            let n = framed.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, records[..cut]);
        assert!(!framed.at_record_boundary());
        // The rest of that record, and bytes after it that must stay on the
        // socket for whoever takes over the stream.
        tx.write_all(&records[cut..]).await.unwrap();
        tx.write_all(b"after the handshake").await.unwrap();
        let rest = framed.complete_record().await.unwrap();
        assert_eq!(rest, records[cut..]);
        assert!(framed.at_record_boundary());
        let mut socket = framed.into_inner();
        let n = socket.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"after the handshake");
    }

    #[tokio::test]
    async fn a_read_that_ends_on_a_boundary_needs_no_completing() {
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut records = record(40);
        records.extend(record(0));
        records.extend(record(16));
        tx.write_all(&records).await.unwrap();
        let mut framed = Framed::new(rx);
        let mut buf = [0u8; 4096];
        let mut n = 0;
        while n < records.len() {
            n += framed.read(&mut buf[n..]).await.unwrap();
        }
        assert!(framed.at_record_boundary());
        assert!(framed.complete_record().await.unwrap().is_empty());
    }

    /// Headers no TLS peer sends end the stream at once: nothing is
    /// delivered past them, so the hand-off can never misalign.
    #[tokio::test]
    async fn malformed_headers_are_refused() {
        for (header, what) in [
            ([24, 3, 3, 0, 5], "heartbeat, not a record type here"),
            ([0x80, 0x2e, 1, 0, 2], "an SSLv2-style hello"),
            ([22, 2, 0, 0, 5], "version 2.0"),
            ([23, 3, 3, 0x48, 0], "a body of 2^14 + 2048 bytes"),
            ([23, 3, 3, 0xff, 0xff], "a body of 65535 bytes"),
            ([22, 3, 3, 0, 0], "an empty handshake record"),
            ([21, 3, 3, 0, 0], "an empty alert"),
        ] {
            let (mut tx, rx) = tokio::io::duplex(1 << 16);
            tx.write_all(&header).await.unwrap();
            tx.write_all(b"more").await.unwrap();
            let mut framed = Framed::new(rx);
            let mut buf = [0u8; 64];
            let err = framed.read(&mut buf).await.expect_err(what);
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{what}");
        }
        // The largest body rustls takes, and an empty application data record.
        for header in [[23, 3, 3, 0x47, 0xff], [23, 3, 3, 0, 0], [22, 3, 1, 0, 1]] {
            assert!(record_length(header).is_ok(), "{header:?}");
        }
    }

    /// A header cut across reads is judged once whole.
    #[tokio::test]
    async fn a_header_split_across_reads_is_judged_whole() {
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut framed = Framed::new(rx);
        let mut buf = [0u8; 64];
        tx.write_all(&[22, 3]).await.unwrap();
        assert_eq!(framed.read(&mut buf).await.unwrap(), 2);
        tx.write_all(&[3, 0xff, 0xff]).await.unwrap();
        assert!(framed.read(&mut buf).await.is_err());
    }
}

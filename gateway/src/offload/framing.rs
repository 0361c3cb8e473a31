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
            self.observe(&chunk);
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

    /// Follows the record framing over bytes that were just read.
    fn observe(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(bytes.len());
                self.body_left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (HEADER - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
            self.header_len += n;
            bytes = &bytes[n..];
            if self.header_len == HEADER {
                self.body_left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                self.header_len = 0;
            }
        }
    }
}

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
            self.observe(&buf.filled()[start..end]);
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
        let mut r = vec![22, 3, 3];
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
}

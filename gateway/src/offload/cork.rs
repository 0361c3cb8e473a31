//! Reading the handshake one TLS record at a time.
//!
//! When a connection may move to kernel TLS, rustls must not read past the
//! last handshake record: whatever it buffered beyond that would be
//! ciphertext the kernel never sees, and the stream would be corrupt. So
//! while corked, each read is cut at the next record boundary. After the
//! hand-off (or once the connection stays in userspace) reads are whole again.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const HEADER: usize = 5;

pub struct Corked<S> {
    inner: S,
    corked: bool,
    header: [u8; HEADER],
    header_len: usize,
    /// Bytes of the current record's body still to come.
    body_left: usize,
}

impl<S> Corked<S> {
    pub fn new(inner: S, corked: bool) -> Self {
        Self {
            inner,
            corked,
            header: [0; HEADER],
            header_len: 0,
            body_left: 0,
        }
    }

    /// Reads are no longer cut at record boundaries.
    pub fn uncork(&mut self) {
        self.corked = false;
    }

    /// True when the last read ended exactly at a record boundary, so the
    /// kernel can take over the byte stream from here.
    pub fn at_record_boundary(&self) -> bool {
        self.corked && self.header_len == 0 && self.body_left == 0
    }

    /// Reads the rest of a record that a read stopped inside of, and returns
    /// those bytes. rustls keeps reading after its handshake is done, so it
    /// may hold the first part of the peer's next record: completing it
    /// lets rustls finish that record and the kernel start at the next one.
    pub async fn complete_record(&mut self) -> io::Result<Vec<u8>>
    where
        S: AsyncRead + Unpin,
    {
        use tokio::io::AsyncReadExt as _;
        if !self.corked {
            return Err(io::Error::other("reads were not cut at record boundaries"));
        }
        let mut rest = Vec::new();
        while !self.at_record_boundary() {
            let mut chunk = vec![0u8; self.allowance()];
            self.inner.read_exact(&mut chunk).await?;
            self.observe(&chunk);
            rest.extend_from_slice(&chunk);
        }
        Ok(rest)
    }

    pub fn is_corked(&self) -> bool {
        self.corked
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn into_inner(self) -> S {
        self.inner
    }

    /// How many bytes the next read may take without crossing a boundary.
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

impl<S: AsyncRead + Unpin> AsyncRead for Corked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.corked {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let limit = self.allowance().min(buf.remaining());
        let mut limited = buf.take(limit);
        let r = Pin::new(&mut self.inner).poll_read(cx, &mut limited);
        let n = limited.filled().len();
        if let Poll::Ready(Ok(())) = r {
            let start = buf.filled().len();
            // SAFETY: `take` lends out `buf`'s own unfilled memory, and the
            // inner read initialised its first `n` bytes.
            unsafe { buf.assume_init(n) };
            buf.advance(n);
            let this = &mut *self;
            this.observe(&buf.filled()[start..start + n]);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Corked<S> {
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
    async fn corked_reads_stop_at_each_record_boundary() {
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut wire = record(300);
        wire.extend(record(7));
        wire.extend(record(7));
        wire.extend(b"after the handshake");
        tx.write_all(&wire).await.unwrap();
        let mut corked = Corked::new(rx, true);
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        // Two records' worth of reads, and not a byte more.
        while got.len() < 5 + 300 + 5 + 7 {
            let n = corked.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, wire[..317]);
        assert!(corked.at_record_boundary());
        // A read that stops inside a record is completed on request.
        let n = corked.read(&mut buf[..3]).await.unwrap();
        assert!(!corked.at_record_boundary());
        let rest = corked.complete_record().await.unwrap();
        assert_eq!(n + rest.len(), 5 + 7);
        assert!(corked.at_record_boundary());
        corked.uncork();
        let n = corked.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"after the handshake");
    }
}

//! The listener's ClientHello path (`gateway::hello`: the record framing
//! followed from the first byte, rustls' Acceptor, the size bound) with
//! arbitrary bytes, arriving in the reads the input describes. It ends in
//! a ClientHello or a counted refusal, never a panic or a hang, and a
//! hello is never taken from more than the bound allows.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The input as a client's stream: the first byte of each read says how
/// long the read is (1 to 256 bytes); at the end, the client closes.
struct Client<'a> {
    data: &'a [u8],
    delivered: usize,
}

impl AsyncRead for Client<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let Some((&len, rest)) = self.data.split_first() else {
            return Poll::Ready(Ok(()));
        };
        let n = (usize::from(len) + 1).min(rest.len()).min(buf.remaining());
        let (read, rest) = rest.split_at(n);
        buf.put_slice(read);
        self.data = rest;
        self.delivered += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Client<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

const LABELS: [&str; 5] = [
    "client_closed",
    "bad_record",
    "bad_client_hello",
    "client_hello_too_large",
    "incompatible",
];

pub fn check(data: &[u8]) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    // The stream never waits, so neither can the reader: a hang is a bug.
    let outcome = runtime.block_on(gateway::hello::exposed::server_name(Client {
        data,
        delivered: 0,
    }));
    match outcome {
        Ok(_) => {}
        Err(label) => assert!(LABELS.contains(&label), "unexpected refusal {label}"),
    }
}

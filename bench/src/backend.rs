//! The backend every proxy forwards to. The client's first bytes choose what
//! it does, so one listener serves every scenario:
//! `U` sink (count and discard), `D` + u64 rate source (send zeros, paced when
//! the rate is non-zero), `E` echo.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

pub const SINK: u8 = b'U';
pub const SOURCE: u8 = b'D';
pub const ECHO: u8 = b'E';
pub const CHUNK: usize = 64 * 1024;

#[derive(Default)]
pub struct Counters {
    /// Bytes the sinks received.
    pub sunk: AtomicU64,
    /// Echo connections that reached the backend: a handshake the proxy completed and forwarded.
    pub echo_connections: AtomicU64,
}

pub struct Backend {
    pub addr: SocketAddr,
    pub counters: Arc<Counters>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start() -> std::io::Result<Backend> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let c = c.clone();
                tokio::spawn(async move {
                    let _ = serve(s, &c).await;
                });
            }
        });
        Ok(Backend {
            addr,
            counters,
            task,
        })
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut s: TcpStream, c: &Counters) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mode = s.read_u8().await?;
    match mode {
        SINK => {
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    return Ok(());
                }
                c.sunk.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        SOURCE => {
            let rate = s.read_u64().await?;
            let (mut rd, mut wr) = s.into_split();
            // The client ends a download by closing; notice it while writing.
            let closed = tokio::spawn(async move {
                let mut b = [0u8; 64];
                while matches!(rd.read(&mut b).await, Ok(n) if n > 0) {}
            });
            let buf = vec![0u8; CHUNK];
            let start = Instant::now();
            let mut sent = 0u64;
            let r = loop {
                if closed.is_finished() {
                    break Ok(());
                }
                if let Err(e) = wr.write_all(&buf).await {
                    break Err(e);
                }
                sent += buf.len() as u64;
                pace(start, sent, rate).await;
            };
            closed.abort();
            r
        }
        ECHO => {
            c.echo_connections.fetch_add(1, Ordering::Relaxed);
            let (mut rd, mut wr) = s.split();
            tokio::io::copy(&mut rd, &mut wr).await?;
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Sleeps until `sent` bytes are due at `rate` bytes/s (0: never sleeps).
pub async fn pace(start: Instant, sent: u64, rate: u64) {
    if rate == 0 {
        return;
    }
    let due = start + Duration::from_secs_f64(sent as f64 / rate as f64);
    if due > Instant::now() {
        tokio::time::sleep_until(due).await;
    }
}

//! The ceiling: plain TCP forwarding with splice (socket → pipe → socket), no
//! TLS, a thread per direction. Whatever a TLS proxy costs above this is the
//! price of TLS plus its own overhead.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const PIPE_SIZE: i32 = 1 << 20;
const CHUNK: usize = 1 << 20;

pub fn run(listen: SocketAddr, to: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    eprintln!("relay: {listen} -> {to}");
    for client in listener.incoming() {
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                eprintln!("relay: accept: {e}");
                continue;
            }
        };
        std::thread::spawn(move || {
            if let Err(e) = connection(client, to) {
                eprintln!("relay: {e}");
            }
        });
    }
    Ok(())
}

fn connection(client: TcpStream, to: SocketAddr) -> io::Result<()> {
    let backend = TcpStream::connect(to)?;
    client.set_nodelay(true)?;
    backend.set_nodelay(true)?;
    let (c2, b2) = (client.try_clone()?, backend.try_clone()?);
    let up = std::thread::spawn(move || pump(&c2, &b2));
    let down = pump(&backend, &client);
    let up = up
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("pump panicked")));
    down.and(up)
}

/// Moves bytes from `from` to `to` until EOF, then half-closes `to`.
fn pump(from: &TcpStream, to: &TcpStream) -> io::Result<()> {
    let (r, w) = pipe()?;
    loop {
        let n = splice(from.as_raw_fd(), w.as_raw_fd(), CHUNK)?;
        if n == 0 {
            let _ = to.shutdown(Shutdown::Write);
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            let m = splice(r.as_raw_fd(), to.as_raw_fd(), left)?;
            if m == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "peer closed"));
            }
            left -= m;
        }
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // A bigger pipe means fewer splice calls per MiB; the default 64 KiB is fine too.
    // SAFETY: fcntl on a pipe fd we own.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
    Ok((r, w))
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: both fds are open for the duration of the call; null offsets
        // mean "current position" (sockets and pipes have none).
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

//! The kernel TLS and splice system calls, each behind a safe function.
//!
//! Constants and layouts are from `include/uapi/linux/tls.h`; they are part
//! of the kernel ABI and do not change.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use zeroize::Zeroize;

pub const SOL_TLS: libc::c_int = 282;
pub const TLS_TX: libc::c_int = 1;
pub const TLS_RX: libc::c_int = 2;
/// Linux 6.0+: the peer promises TLS 1.3 records without padding.
pub const TLS_RX_EXPECT_NO_PAD: libc::c_int = 4;
/// cmsg type that sets the record type of a `sendmsg` on a kTLS socket.
const TLS_SET_RECORD_TYPE: libc::c_int = 1;
/// cmsg type that `recvmsg` uses to report a record's type.
const TLS_GET_RECORD_TYPE: libc::c_int = 2;

pub const TLS_1_2_VERSION: u16 = 0x0303;
pub const TLS_1_3_VERSION: u16 = 0x0304;
pub const TLS_CIPHER_AES_GCM_128: u16 = 51;
pub const TLS_CIPHER_AES_GCM_256: u16 = 52;
pub const TLS_CIPHER_CHACHA20_POLY1305: u16 = 54;

/// `struct tls12_crypto_info_aes_gcm_128`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Aes128Gcm {
    pub version: u16,
    pub cipher_type: u16,
    pub iv: [u8; 8],
    pub key: [u8; 16],
    pub salt: [u8; 4],
    pub rec_seq: [u8; 8],
}

/// `struct tls12_crypto_info_aes_gcm_256`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Aes256Gcm {
    pub version: u16,
    pub cipher_type: u16,
    pub iv: [u8; 8],
    pub key: [u8; 32],
    pub salt: [u8; 4],
    pub rec_seq: [u8; 8],
}

/// `struct tls12_crypto_info_chacha20_poly1305` (no salt: the whole nonce is the IV).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Chacha20Poly1305 {
    pub version: u16,
    pub cipher_type: u16,
    pub iv: [u8; 12],
    pub key: [u8; 32],
    pub rec_seq: [u8; 8],
}

/// One direction's keys in the kernel's layout. Zeroed on drop: it holds
/// traffic secrets.
pub enum CryptoInfo {
    Aes128Gcm(Aes128Gcm),
    Aes256Gcm(Aes256Gcm),
    Chacha20Poly1305(Chacha20Poly1305),
}

impl CryptoInfo {
    /// The size of this layout, which getsockopt must ask for exactly.
    pub fn layout_len(&self) -> usize {
        self.as_bytes().1
    }

    fn as_bytes(&self) -> (*const libc::c_void, usize) {
        match self {
            CryptoInfo::Aes128Gcm(c) => (std::ptr::from_ref(c).cast(), size_of::<Aes128Gcm>()),
            CryptoInfo::Aes256Gcm(c) => (std::ptr::from_ref(c).cast(), size_of::<Aes256Gcm>()),
            CryptoInfo::Chacha20Poly1305(c) => {
                (std::ptr::from_ref(c).cast(), size_of::<Chacha20Poly1305>())
            }
        }
    }
}

impl Zeroize for CryptoInfo {
    /// Volatile writes the optimizer keeps, unlike a plain assignment to a
    /// value about to be dropped.
    fn zeroize(&mut self) {
        match self {
            CryptoInfo::Aes128Gcm(c) => {
                c.key.zeroize();
                c.iv.zeroize();
                c.salt.zeroize();
                c.rec_seq.zeroize();
            }
            CryptoInfo::Aes256Gcm(c) => {
                c.key.zeroize();
                c.iv.zeroize();
                c.salt.zeroize();
                c.rec_seq.zeroize();
            }
            CryptoInfo::Chacha20Poly1305(c) => {
                c.key.zeroize();
                c.iv.zeroize();
                c.rec_seq.zeroize();
            }
        }
    }
}

impl Drop for CryptoInfo {
    fn drop(&mut self) {
        self.zeroize();
    }
}

/// Room for one control message carrying one byte (`CMSG_SPACE(1)`),
/// aligned for the `cmsghdr` the CMSG_* macros read and write through: a
/// `Vec<u8>` promises alignment 1 only.
#[repr(C, align(8))]
struct OneByteCmsg([u8; 32]);

impl OneByteCmsg {
    fn new() -> io::Result<Self> {
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(1) } as usize;
        if space > 32 {
            return Err(io::Error::other("CMSG_SPACE(1) exceeds its buffer"));
        }
        Ok(OneByteCmsg([0; 32]))
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Attaches the `tls` upper-layer protocol to an established TCP socket.
/// Until keys are set the socket still carries plain bytes.
pub fn set_tls_ulp(fd: &impl AsRawFd) -> io::Result<()> {
    let name = b"tls";
    // SAFETY: `name` outlives the call and its length is passed with it.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    })
}

/// Hands one direction's keys (`TLS_TX` or `TLS_RX`) to the kernel.
pub fn set_crypto(fd: &impl AsRawFd, direction: libc::c_int, info: &CryptoInfo) -> io::Result<()> {
    let (ptr, len) = info.as_bytes();
    // SAFETY: `ptr` points at a live `#[repr(C)]` struct of `len` bytes.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            SOL_TLS,
            direction,
            ptr,
            len as libc::socklen_t,
        )
    })
}

/// Sets an integer option at SOL_TLS (after the keys are in).
pub fn set_tls_flag(fd: &impl AsRawFd, option: libc::c_int, value: bool) -> io::Result<()> {
    let v = libc::c_int::from(value);
    // SAFETY: the option value is a live c_int of the size we pass.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            SOL_TLS,
            option,
            (&raw const v).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
}

/// The next record sequence number of one direction, as the kernel holds it.
/// The kernel does not stop at a cipher's record limit, so we read it to.
/// `layout_len` is the size of the direction's crypto_info: the kernel
/// answers only a buffer of exactly that size.
pub fn record_sequence(
    fd: &impl AsRawFd,
    direction: libc::c_int,
    layout_len: usize,
) -> io::Result<u64> {
    let mut buf = [0u8; 64];
    let buf = buf
        .get_mut(..layout_len)
        .ok_or_else(|| io::Error::other("crypto_info layout larger than 64 bytes"))?;
    let mut len = layout_len as libc::socklen_t;
    // SAFETY: `buf` is writable for `len` bytes and the kernel writes at most that.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            SOL_TLS,
            direction,
            buf.as_mut_ptr().cast(),
            &raw mut len,
        )
    })?;
    let len = len as usize;
    // rec_seq is the last field of every layout.
    let seq = buf
        .get(len.saturating_sub(8)..len)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .ok_or_else(|| io::Error::other(format!("short TLS crypto info ({len} bytes)")));
    // The kernel returns the key too; do not leave it on the stack.
    buf.zeroize();
    Ok(u64::from_be_bytes(seq?))
}

/// Reads one record that `splice` would not move (an alert or a handshake
/// message) with its content type, which the kernel reports for every
/// record it hands out; no type means it handed out none. `Ok(None)`:
/// nothing to read right now.
pub fn recv_record(fd: &impl AsRawFd, buf: &mut [u8]) -> io::Result<Option<(Option<u8>, usize)>> {
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(1) } as usize;
    let mut control = OneByteCmsg::new()?;
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; zero is a valid "no name, no flags".
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: every pointer in `msg` refers to a live buffer of the stated
    // size, the control buffer aligned for cmsghdr.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &raw mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::WouldBlock {
            Ok(None)
        } else {
            Err(e)
        };
    }
    let mut record_type = None;
    // SAFETY: the CMSG_* macros walk the control buffer the kernel just filled,
    // bounded by msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == SOL_TLS && (*cmsg).cmsg_type == TLS_GET_RECORD_TYPE {
                record_type = Some(*libc::CMSG_DATA(cmsg));
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    Ok(Some((record_type, n as usize)))
}

/// Sends one record of the given content type (e.g. an alert) through kTLS TX.
pub fn send_record(fd: &impl AsRawFd, record_type: u8, data: &[u8]) -> io::Result<()> {
    // SAFETY: CMSG_SPACE/CMSG_LEN are pure size computations.
    let (space, len) = unsafe { (libc::CMSG_SPACE(1) as usize, libc::CMSG_LEN(1) as usize) };
    let mut control = OneByteCmsg::new()?;
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; zero is a valid "no name, no flags".
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: the control buffer has room for one cmsg with one byte of data
    // and is aligned for cmsghdr; the kernel only reads from `iov`.
    let n = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        (*cmsg).cmsg_level = SOL_TLS;
        (*cmsg).cmsg_type = TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = len;
        *libc::CMSG_DATA(cmsg) = record_type;
        libc::sendmsg(fd.as_raw_fd(), &raw const msg, libc::MSG_DONTWAIT)
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != data.len() {
        return Err(io::Error::other("short write of a TLS control record"));
    }
    Ok(())
}

/// A non-blocking pipe: the kernel buffer `splice` moves pages through.
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
}

impl Pipe {
    pub fn new() -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) })?;
        // SAFETY: pipe2 succeeded, so both descriptors are open and ours alone.
        Ok(unsafe {
            Pipe {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        })
    }

    /// The pipe's capacity; a splice into an empty pipe never exceeds it.
    pub fn capacity(&self) -> usize {
        // SAFETY: F_GETPIPE_SZ takes no argument and only reads the fd.
        let n = unsafe { libc::fcntl(self.write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        usize::try_from(n).unwrap_or(65536)
    }
}

/// Moves up to `len` bytes from `from` to `to` inside the kernel without
/// blocking. One side must be a pipe.
pub fn splice(from: &impl AsRawFd, to: &impl AsRawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain descriptors; null offsets mean "current position".
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// SO_LINGER with a zero timeout (`on`), so that closing the socket resets
/// the connection, or back to the default orderly close.
pub fn reset_on_close(fd: &impl AsRawFd, on: bool) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: libc::c_int::from(on),
        l_linger: 0,
    };
    // SAFETY: the option value is a live `linger` of the size we pass.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    })
}

/// Whether the peer has sent its FIN (or the connection is gone), without
/// waiting: POLLRDHUP says so whatever is still queued.
pub fn peer_finished(fd: &impl AsRawFd) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, a timeout of 0: poll only reads and writes it.
    let n = unsafe { libc::poll(&raw mut p, 1, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(p.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0)
}

/// Half-closes a socket: FIN to the peer, reading goes on.
pub fn shutdown_write(fd: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: shutdown(2) on a descriptor we own a reference to.
    check(unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fin_is_seen_without_reading() {
        use std::io::Write as _;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        a.write_all(b"queued").unwrap();
        assert!(!peer_finished(&b).unwrap(), "data is no FIN");
        a.shutdown(std::net::Shutdown::Write).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !peer_finished(&b).unwrap() {
            assert!(std::time::Instant::now() < deadline, "FIN seen");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn the_control_buffer_fits_a_cmsghdr() {
        assert!(std::mem::align_of::<OneByteCmsg>() >= std::mem::align_of::<libc::cmsghdr>());
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(1) } as usize;
        assert!(std::mem::size_of::<OneByteCmsg>() >= space);
        assert!(OneByteCmsg::new().is_ok());
    }

    /// Dropping a crypto_info wipes its key material: read back through
    /// its memory after the drop ran, before the memory is freed.
    #[test]
    fn key_material_is_zeroized_on_drop() {
        let info = Box::new(CryptoInfo::Aes256Gcm(Aes256Gcm {
            version: TLS_1_3_VERSION,
            cipher_type: TLS_CIPHER_AES_GCM_256,
            iv: [1; 8],
            key: [2; 32],
            salt: [3; 4],
            rec_seq: [4; 8],
        }));
        let raw = Box::into_raw(info);
        // SAFETY: `raw` is a live, initialised CryptoInfo from Box::into_raw.
        let (key, iv) = match unsafe { &*raw } {
            CryptoInfo::Aes256Gcm(c) => (c.key.as_ptr(), c.iv.as_ptr()),
            _ => unreachable!(),
        };
        // SAFETY: dropped once, in place; its memory stays allocated (and
        // its bytes initialised) until freed below as MaybeUninit, which
        // drops nothing again.
        let (key, iv) = unsafe {
            std::ptr::drop_in_place(raw);
            let bytes = (
                std::slice::from_raw_parts(key, 32).to_vec(),
                std::slice::from_raw_parts(iv, 8).to_vec(),
            );
            drop(Box::from_raw(
                raw.cast::<std::mem::MaybeUninit<CryptoInfo>>(),
            ));
            bytes
        };
        assert!(key.iter().chain(&iv).all(|&b| b == 0), "{key:?} {iv:?}");
    }
}

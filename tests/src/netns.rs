//! What the BPF tests make for themselves: network namespaces, cgroup
//! subtrees, sockets created inside a cgroup, processes, bpffs pins. Each
//! goes when its value drops, failed test or not, and every name carries
//! this process's id so parallel runs never collide.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::STEP;

/// A name unique to this process and call: `<tag><pid>n<counter>`.
pub fn unique(tag: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{tag}{}n{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `ip` with `args`; a failure fails the test with ip's message.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether iproute2's `ip netns` is there; says why the test skips if not.
pub fn netns_or_skip() -> bool {
    let ok = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipped: iproute2's `ip netns` is not available");
    }
    ok
}

/// A named network namespace, deleted (with its interfaces) on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = unique(tag);
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip("link set lo up");
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds `count` /32 addresses (10.230.x.y) to `device` in one `ip
    /// -batch`; the last one added.
    pub fn add_addresses(&self, device: &str, count: u32) -> std::net::Ipv4Addr {
        let batch: String = (0..count)
            .map(|i| format!("addr add {} dev {device}\n", nth_address(i)))
            .collect();
        let mut add = self.command(&["ip", "-batch", "-"]);
        add.stdin(Stdio::piped());
        let mut add = add.spawn().expect("ip -batch");
        add.stdin
            .take()
            .expect("stdin")
            .write_all(batch.as_bytes())
            .expect("write the batch");
        assert!(
            add.wait().expect("ip -batch").success(),
            "{count} addresses added"
        );
        nth_address(count - 1)
    }

    /// `ip -n <ns> <cmd>` (cmd split on spaces).
    pub fn ip(&self, cmd: &str) {
        let mut args = vec!["-n", &self.name];
        args.extend(cmd.split_whitespace());
        ip(&args);
    }

    /// Runs `f` on a thread inside this namespace: sockets it creates live
    /// there and can be used from anywhere afterwards.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(&self.name, f)
    }

    /// `args` as a command in this namespace (see [`in_netns_command`]).
    pub fn command(&self, args: &[&str]) -> Command {
        in_netns_command(&self.name, args)
    }

    /// Loads nftables `rules` (`nft -f -`) in this namespace; false when
    /// nft is not installed (the caller says what it could not try).
    pub fn nft(&self, rules: &str) -> bool {
        use std::io::Write as _;
        let Ok(mut child) = self
            .command(&["nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        else {
            return false;
        };
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(rules.as_bytes())
            .expect("write the rules to nft");
        let out = child.wait_with_output().expect("nft");
        assert!(
            out.status.success(),
            "nft -f: {}\n{rules}",
            String::from_utf8_lossy(&out.stderr)
        );
        true
    }

    /// Writes a sysctl of this namespace (`net/ipv4/ip_forward`).
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{key}");
        let (at, value) = (path.clone(), value.to_owned());
        self.run(move || std::fs::write(at, value))
            .unwrap_or_else(|e| panic!("sysctl {path}: {e}"));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace deletes its interfaces (and veth peers).
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn nth_address(i: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(10, 230, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// A container next to `host`: a namespace of its own behind a veth
/// (`c0` inside, `host_if` on the host's side), `container_ip` inside and
/// `host_ip` on the host's side (both /24), routed through the host.
pub fn container_of(
    host: &Netns,
    tag: &str,
    host_if: &str,
    host_ip: &str,
    container_ip: &str,
) -> Netns {
    let c = Netns::new(tag);
    ip(&[
        "link",
        "add",
        "c0",
        "netns",
        c.name(),
        "type",
        "veth",
        "peer",
        "name",
        host_if,
        "netns",
        host.name(),
    ]);
    c.ip("link set c0 up");
    host.ip(&format!("link set {host_if} up"));
    host.ip(&format!("addr add {host_ip}/24 dev {host_if}"));
    c.ip(&format!("addr add {container_ip}/24 dev c0"));
    c.ip(&format!("route add default via {host_ip}"));
    c
}

/// Gives the calling thread a mount namespace of its own, private (threads
/// it starts share it): what it mounts or unmounts the rest never sees.
pub fn private_mounts() {
    // SAFETY: unshare and mount on valid NUL-terminated strings; they
    // change only this thread's view.
    unsafe {
        assert_eq!(
            libc::unshare(libc::CLONE_NEWNS),
            0,
            "unshare mount namespace"
        );
        assert_eq!(
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null()
            ),
            0,
            "make mounts private"
        );
    }
}

/// A child process forked for a test (see [`fork_into`]).
pub struct ForkedChild(i32);

/// The exit code of a forked child that could not join its cgroup.
pub const COULD_NOT_JOIN: i32 = 200;

/// Forks a child in the calling thread's network namespace that first
/// joins `cgroup` (when given) and then exits with what `f` returns. In a
/// threaded process the child may only make raw system calls: `f` must
/// not allocate or lock (prepare everything before).
pub fn fork_into(cgroup: Option<&Path>, f: impl FnOnce() -> i32) -> ForkedChild {
    use std::os::unix::ffi::OsStrExt as _;
    let procs = cgroup.map(|c| {
        std::ffi::CString::new(c.join("cgroup.procs").as_os_str().as_bytes())
            .expect("cgroup path without NUL")
    });
    // SAFETY: the child only makes raw system calls (f's contract), then
    // _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: as above.
        unsafe {
            if let Some(procs) = &procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                // Writing "0" to cgroup.procs moves the writing process.
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    libc::_exit(COULD_NOT_JOIN);
                }
            }
            libc::_exit(f());
        }
    }
    assert!(pid > 0, "fork: {}", std::io::Error::last_os_error());
    ForkedChild(pid)
}

impl ForkedChild {
    /// Waits for it; its exit code.
    pub fn wait(self) -> i32 {
        let mut status = 0;
        // SAFETY: waiting for the child this value forked.
        unsafe { libc::waitpid(self.0, &raw mut status, 0) };
        libc::WEXITSTATUS(status)
    }
}

/// Runs `f` on a thread inside namespace `ns`: sockets it creates live there
/// and can be used from anywhere afterwards.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = PathBuf::from("/run/netns").join(ns);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("netns handle");
        // SAFETY: setns on an open namespace fd affects only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "setns {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        f()
    })
    .join()
    .expect("netns thread")
}

/// `args` as a command that runs in network namespace `ns` and nothing else
/// of its own: unlike `ip netns exec`, it keeps the host's mounts, so the
/// guard's bpffs pins outlive it as they would on a real host.
pub fn in_netns_command(ns: &str, args: &[&str]) -> Command {
    use std::os::unix::process::CommandExt as _;
    let netns = std::fs::File::open(PathBuf::from("/run/netns").join(ns)).expect("netns handle");
    let mut cmd = Command::new(args[0]);
    cmd.args(&args[1..]);
    // SAFETY: setns is async-signal-safe; the closure only makes that one
    // syscall on an fd the parent keeps open until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    cmd
}

/// A cgroup v2 subtree made for the test, removed (leaves first) on drop.
pub struct TestCgroup {
    mount: PathBuf,
    /// Relative to the mount, as configs name cgroups.
    rel: PathBuf,
    leaves: Vec<PathBuf>,
}

impl TestCgroup {
    pub fn create(mount: &Path, tag: &str) -> TestCgroup {
        let rel = PathBuf::from(unique(tag));
        std::fs::create_dir(mount.join(&rel))
            .unwrap_or_else(|e| panic!("mkdir {}: {e}", mount.join(&rel).display()));
        TestCgroup {
            mount: mount.to_owned(),
            rel,
            leaves: Vec::new(),
        }
    }

    /// The subtree's root, absolute.
    pub fn path(&self) -> PathBuf {
        self.mount.join(&self.rel)
    }

    /// The subtree's root relative to the cgroup v2 mount.
    pub fn rel(&self) -> &Path {
        &self.rel
    }

    /// A child cgroup `name`, created on first use.
    pub fn leaf(&mut self, name: &str) -> PathBuf {
        let dir = self.path().join(name);
        if !dir.is_dir() {
            std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
            self.leaves.push(dir.clone());
        }
        dir
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Processes leave a cgroup when they exit; then it can go.
        let root = self.path();
        for dir in self.leaves.iter().rev().chain(std::iter::once(&root)) {
            for _ in 0..100 {
                if !dir.exists() || std::fs::remove_dir(dir).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Removes a guard's pins even when the test fails.
pub struct Pins(pub PathBuf);

impl Pins {
    pub fn new(tag: &str) -> Pins {
        Pins(PathBuf::from("/sys/fs/bpf").join(unique(tag)))
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        uninstall_when_free(&self.0);
    }
}

/// Removes a guard's pins once no guard holds them: a gateway stopped by
/// the test lets go of its pin directory a moment later, on its runtime.
pub fn uninstall_when_free(dir: &Path) {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        match gateway::ebpf::uninstall(dir) {
            Err(gateway::ebpf::EbpfError::PinDirInUse { .. }) if Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                eprintln!("warning: removing pins {}: {e}", dir.display());
                return;
            }
            Ok(_) => return,
        }
    }
}

/// A process started for the test, its output in a log file; killed and
/// reaped when dropped.
pub struct Proc {
    pub child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with its stdout and stderr in `log`.
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        let file = std::fs::File::create(&log).expect("log");
        let child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("spawn");
        Proc { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log has `count` lines containing `needle`.
    pub fn wait_for(&mut self, needle: &str, count: usize) {
        let until = Instant::now() + STEP;
        while self.log().matches(needle).count() < count {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("exited ({status}) before {needle:?}:\n{}", self.log());
            }
            assert!(
                Instant::now() < until,
                "no {needle:?} within {STEP:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill with a child pid we have not reaped.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `gateway guard --config` in namespace `ns`, once it says it protects.
pub fn start_remote_guard(ns: &str, config: &Path, log: PathBuf) -> Proc {
    let mut guard = gateway_in(ns, "guard", config, log);
    guard.wait_for("guard: protecting", 1);
    guard
}

/// `gateway run --config` in namespace `ns`, once its log says `ready`.
pub fn start_gateway_in(ns: &str, config: &Path, log: PathBuf, ready: &str) -> Proc {
    let mut gateway = gateway_in(ns, "run", config, log);
    gateway.wait_for(ready, 1);
    gateway
}

/// `gateway --log-format json COMMAND --config CONFIG` in `ns`.
fn gateway_in(ns: &str, command: &str, config: &Path, log: PathBuf) -> Proc {
    let bin = crate::gateway_binary();
    let cmd = in_netns_command(
        ns,
        &[
            bin.to_str().expect("utf-8 path"),
            "--log-format",
            "json",
            command,
            "--config",
            config.to_str().expect("utf-8 path"),
        ],
    );
    Proc::spawn(cmd, log)
}

/// `gateway block ARGS --socket SOCKET` in `ns`, which must succeed; its
/// output.
pub fn gateway_block_in(ns: &str, args: &[&str], socket: &std::path::Path) -> String {
    let bin = crate::gateway_binary();
    let mut all = vec![bin.to_str().expect("utf-8 path"), "block"];
    all.extend(args);
    all.extend(["--socket", socket.to_str().expect("utf-8 path")]);
    let out = in_netns_command(ns, &all)
        .output()
        .expect("run gateway block");
    assert!(
        out.status.success(),
        "gateway block {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A veth pair, `a_if` in `a` and `b_if` in `b`, both up.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    ip(&[
        "link",
        "add",
        a_if,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]);
    a.ip(&format!("link set {a_if} up"));
    b.ip(&format!("link set {b_if} up"));
}

/// One metric's value from a `GET /metrics` endpoint at `admin`, read from
/// a thread in namespace `ns`. None when the series is not there.
pub fn metric_in(ns: &str, admin: SocketAddr, series: &str) -> Option<u64> {
    let body = in_netns(ns, move || {
        let mut s = std::net::TcpStream::connect(admin).expect("admin endpoint");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: guard\r\n\r\n")
            .expect("request");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("response");
        body
    });
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// Socket kinds [`socket_in_cgroup`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A listening TCP socket.
    TcpListener,
    /// A bound UDP socket.
    Udp,
    /// A TCP socket connected to the address (not bound).
    TcpConnected,
    /// A UDP socket connected to the address (not bound).
    UdpConnected,
}

/// A socket made by a child process that first moved itself into
/// `cgroup`: the kernel files a socket under the cgroup of the process that
/// created it, for good, so this is how a test gets a backend (or a
/// stranger's connection) that a cgroup program sees as living there. IPv6
/// listeners are dual-stack. Made in the calling thread's network namespace.
pub fn socket_in_cgroup(cgroup: &Path, kind: Kind, addr: SocketAddr) -> std::io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    // Everything the child needs is prepared before fork: after it, in a
    // threaded process, the child may only make raw system calls.
    let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())
        .expect("cgroup path without NUL");
    let (storage, len) = sockaddr(addr);
    let mut pair = [0i32; 2];
    // SAFETY: socketpair fills two descriptors, checked below.
    let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM, 0, pair.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors we own.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
    let family = i32::from(storage.ss_family);
    let (ty, listen, connect) = match kind {
        Kind::TcpListener => (libc::SOCK_STREAM, true, false),
        Kind::Udp => (libc::SOCK_DGRAM, false, false),
        Kind::TcpConnected => (libc::SOCK_STREAM, false, true),
        Kind::UdpConnected => (libc::SOCK_DGRAM, false, true),
    };
    let mut cmsg = [0u64; 4];
    // SAFETY: the child below only makes async-signal-safe system calls on
    // data prepared above, then _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: raw system calls on valid pointers; _exit never returns.
        unsafe {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                libc::_exit(200);
            }
            let s = libc::socket(family, ty, 0);
            if s < 0 {
                libc::_exit(201);
            }
            let one: libc::c_int = 1;
            let zero: libc::c_int = 0;
            libc::setsockopt(
                s,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                std::ptr::from_ref(&one).cast(),
                4,
            );
            if family == libc::AF_INET6 {
                libc::setsockopt(
                    s,
                    libc::IPPROTO_IPV6,
                    libc::IPV6_V6ONLY,
                    std::ptr::from_ref(&zero).cast(),
                    4,
                );
            }
            let to = std::ptr::from_ref(&storage).cast();
            let rc = if connect {
                libc::connect(s, to, len)
            } else {
                libc::bind(s, to, len)
            };
            if rc != 0 || (listen && libc::listen(s, 128) != 0) {
                libc::_exit(*libc::__errno_location() & 0x7f);
            }
            let mut iov = libc::iovec {
                iov_base: b"s".as_ptr() as *mut _,
                iov_len: 1,
            };
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &raw mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cmsg.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), s);
            if libc::sendmsg(theirs.as_raw_fd(), &msg, 0) != 1 {
                libc::_exit(202);
            }
            libc::_exit(0);
        }
    }
    assert!(pid > 0, "fork failed: {}", std::io::Error::last_os_error());
    drop(theirs);
    let mut status = 0;
    // SAFETY: waiting for the child we just forked.
    unsafe { libc::waitpid(pid, &raw mut status, 0) };
    match libc::WEXITSTATUS(status) {
        0 => {}
        200 => {
            return Err(std::io::Error::other(format!(
                "could not join {}",
                cgroup.display()
            )));
        }
        201 => return Err(std::io::Error::other("socket() failed")),
        202 => return Err(std::io::Error::other("could not pass the socket back")),
        errno => return Err(std::io::Error::from_raw_os_error(errno)),
    }
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut space = [0u64; 4];
    // SAFETY: msghdr is plain data; zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = space.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as usize;
    // SAFETY: msg points at valid buffers for the call.
    let n = unsafe { libc::recvmsg(ours.as_raw_fd(), &raw mut msg, 0) };
    if n != 1 {
        return Err(std::io::Error::other("no socket came back"));
    }
    // SAFETY: the kernel filled one SCM_RIGHTS message with one descriptor.
    let fd = unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        assert!(
            !c.is_null() && (*c).cmsg_type == libc::SCM_RIGHTS,
            "no descriptor"
        );
        std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<i32>())
    };
    // SAFETY: a descriptor the kernel just gave this process.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `addr` as a sockaddr_storage and its length.
pub fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; zero is a valid starting value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            let sin = unsafe { &mut *std::ptr::from_mut(&mut storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            let sin6 =
                unsafe { &mut *std::ptr::from_mut(&mut storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// A TCP echo server on `listener`, on its own threads, for the test's life.
pub fn tcp_echo(listener: std::net::TcpListener) {
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 16384];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// A TCP echo backend at `addr` whose socket lives in `cgroup`, made in
/// namespace `ns`.
pub fn echo_in_cgroup(ns: &str, cgroup: &Path, addr: SocketAddr) {
    let cgroup = cgroup.to_owned();
    let fd = in_netns(ns, move || {
        socket_in_cgroup(&cgroup, Kind::TcpListener, addr)
    })
    .unwrap_or_else(|e| panic!("backend on {addr}: {e}"));
    tcp_echo(std::net::TcpListener::from(fd));
}

/// A UDP socket at `addr` whose socket lives in `cgroup`, made in `ns`,
/// with a short read timeout.
pub fn udp_in_cgroup(ns: &str, cgroup: &Path, addr: SocketAddr) -> std::net::UdpSocket {
    let cgroup = cgroup.to_owned();
    let fd = in_netns(ns, move || socket_in_cgroup(&cgroup, Kind::Udp, addr))
        .unwrap_or_else(|e| panic!("udp on {addr}: {e}"));
    let s = std::net::UdpSocket::from(fd);
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    s
}

/// A TCP connect from namespace `ns`, optionally from a given source
/// address, with an echo round trip: Ok, or why not (a dropped SYN shows
/// as a timeout).
pub fn tcp_roundtrip(
    ns: &str,
    from: Option<std::net::IpAddr>,
    to: SocketAddr,
) -> Result<(), String> {
    in_netns(ns, move || {
        let socket = match (from, to) {
            (Some(from), _) => tcp_socket_from(from)?,
            (None, SocketAddr::V4(_)) => socket2_like(libc::AF_INET)?,
            (None, SocketAddr::V6(_)) => socket2_like(libc::AF_INET6)?,
        };
        connect_with_timeout(&socket, to, Duration::from_millis(700)).map_err(|e| e.to_string())?;
        let mut stream = std::net::TcpStream::from(socket);
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        stream.write_all(b"ping").map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).map_err(|e| e.to_string())?;
        if &buf != b"ping" {
            return Err(format!("echo said {buf:?}"));
        }
        Ok(())
    })
}

/// A TCP socket bound to `from` (any port), in this thread's namespace.
pub fn tcp_socket_from(from: std::net::IpAddr) -> Result<OwnedFd, String> {
    let socket = socket2_like(if from.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    })?;
    let (storage, len) = sockaddr(SocketAddr::new(from, 0));
    // SAFETY: a valid sockaddr of len bytes.
    if unsafe { libc::bind(socket.as_raw_fd(), std::ptr::from_ref(&storage).cast(), len) } != 0 {
        return Err(format!("bind {from}: {}", std::io::Error::last_os_error()));
    }
    Ok(socket)
}

fn socket2_like(family: i32) -> Result<OwnedFd, String> {
    // SAFETY: plain socket(2), checked.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// connect(2) on a blocking socket, bounded by `timeout` (SO_SNDTIMEO).
/// The error is the kernel's own: a timeout (`EINPROGRESS`) means no
/// SYN-ACK came, while `ECONNRESET` means the connection was made and reset
/// before this thread ran again (a slow VM), which callers must not read as
/// a drop.
pub fn connect_with_timeout(
    socket: &OwnedFd,
    to: SocketAddr,
    timeout: Duration,
) -> std::io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a valid timeval for SO_SNDTIMEO, which bounds connect().
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            std::ptr::from_ref(&tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    let (storage, len) = sockaddr(to);
    // SAFETY: a valid sockaddr of len bytes.
    let rc = unsafe { libc::connect(socket.as_raw_fd(), std::ptr::from_ref(&storage).cast(), len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

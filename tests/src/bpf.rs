//! Another program on the guard's hook, as other tools on a host would put
//! there: a two-instruction TC classifier loaded and attached with raw
//! bpf(2) calls, so the tests do not share the guard's own loader.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

/// TC verdicts a program returns.
pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;

const BPF_PROG_LOAD: i64 = 5;
const BPF_LINK_CREATE: i64 = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_F_BEFORE: u32 = 1 << 3;
const BPF_F_AFTER: u32 = 1 << 4;

fn bpf(cmd: i64, attr: &mut [u8; 128]) -> std::io::Result<OwnedFd> {
    // SAFETY: attr is a zero-padded union bpf_attr of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor the kernel gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A TC classifier that returns `verdict` for every packet.
pub fn classifier(verdict: i32) -> std::io::Result<OwnedFd> {
    // r0 = verdict; exit
    let mut insns = [0u8; 16];
    insns[0] = 0xb7;
    insns[4..8].copy_from_slice(&verdict.to_ne_bytes());
    insns[8] = 0x95;
    let license = c"GPL";
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_SCHED_CLS.to_ne_bytes());
    attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    bpf(BPF_PROG_LOAD, &mut attr)
}

/// Where a program goes among the others on the hook.
#[derive(Debug, Clone, Copy)]
pub enum Place {
    First,
    Last,
}

/// Attaches `program` to `ifindex`'s TCX ingress (in the calling thread's
/// network namespace); it stays there while the returned link lives.
pub fn attach_tcx(program: &OwnedFd, ifindex: u32, place: Place) -> std::io::Result<OwnedFd> {
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(program.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    attr[8..12].copy_from_slice(&BPF_TCX_INGRESS.to_ne_bytes());
    let flags = match place {
        Place::First => BPF_F_BEFORE,
        Place::Last => BPF_F_AFTER,
    };
    attr[12..16].copy_from_slice(&flags.to_ne_bytes());
    bpf(BPF_LINK_CREATE, &mut attr)
}

/// Whether this kernel has TCX (6.6+).
pub fn has_tcx() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(['.', '-']);
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor) >= (6, 6)
}

/// Turns the kernel's per-program run-time statistics on (run count and
/// time in `bpf_prog_info`) for as long as the returned descriptor lives:
/// unlike `sysctl kernel.bpf_stats_enabled`, they go off again by
/// themselves when the measurement ends, however it ends.
pub fn enable_run_time_stats() -> std::io::Result<OwnedFd> {
    const BPF_ENABLE_STATS: i64 = 32;
    // attr.enable_stats.type = BPF_STATS_RUN_TIME (0)
    let mut attr = [0u8; 128];
    bpf(BPF_ENABLE_STATS, &mut attr)
}

/// Detaches the BPF link pinned at `pin` (BPF_LINK_DETACH, as root or
/// CAP_NET_ADMIN could): the program leaves its hook though the link and
/// its pin stay.
pub fn detach_pinned_link(pin: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_OBJ_GET: i64 = 7;
    const BPF_LINK_DETACH: i64 = 34;
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    let link = bpf(BPF_OBJ_GET, &mut attr)?;
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
    // SAFETY: attr is a zero-padded bpf_attr of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            attr.as_mut_ptr(),
            attr.len(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Inserts `addr/prefix_len` into the IPv4 LPM trie pinned at `pin` (value
/// 1), as another tool writing into the guard's maps behind its back would.
pub fn lpm_v4_insert(pin: &std::path::Path, prefix_len: u32, addr: [u8; 4]) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_MAP_UPDATE_ELEM: i64 = 2;
    const BPF_OBJ_GET: i64 = 7;
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    let map = bpf(BPF_OBJ_GET, &mut attr)?;
    let mut key = [0u8; 8];
    key[0..4].copy_from_slice(&prefix_len.to_ne_bytes());
    key[4..8].copy_from_slice(&addr);
    let value = [1u8];
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(map.as_raw_fd() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(key.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(value.as_ptr() as u64).to_ne_bytes());
    // SAFETY: attr is a zero-padded bpf_attr; key and value outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_ELEM,
            attr.as_mut_ptr(),
            attr.len(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The `bpf_attach_type` of cgroup egress (`cgroup_skb/egress`) programs.
pub const BPF_CGROUP_INET_EGRESS: u32 = 1;

/// The programs attached to cgroup `cgroup` for `attach_type`, each as a
/// descriptor of its own (BPF_PROG_QUERY, BPF_PROG_GET_FD_BY_ID).
pub fn programs_on(cgroup: &std::path::Path, attach_type: u32) -> std::io::Result<Vec<OwnedFd>> {
    const BPF_PROG_GET_FD_BY_ID: i64 = 13;
    const BPF_PROG_QUERY: i64 = 16;
    let target = std::fs::File::open(cgroup)?;
    let mut ids = [0u32; 16];
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(target.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&attach_type.to_ne_bytes());
    attr[16..24].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
    attr[24..28].copy_from_slice(&(ids.len() as u32).to_ne_bytes());
    // SAFETY: attr is a zero-padded bpf_attr; the kernel writes at most
    // prog_cnt ids into `ids`, which has room for them.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_QUERY, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let count = u32::from_ne_bytes([attr[24], attr[25], attr[26], attr[27]]) as usize;
    ids[..count.min(ids.len())]
        .iter()
        .map(|id| {
            let mut attr = [0u8; 128];
            attr[0..4].copy_from_slice(&id.to_ne_bytes());
            bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)
        })
        .collect()
}

/// Runs a `cgroup_skb` program once on `frame` (an Ethernet frame) with
/// BPF_PROG_TEST_RUN, and returns its verdict (1: pass, 0: drop). The
/// kernel gives the packet a socket of its own making, of no type and no
/// protocol (neither TCP nor UDP), owned by the calling thread's cgroup,
/// and has it leave through `lo`. `out` takes the packet as the program
/// left it (at least `frame`'s length). Makes raw system calls only, so a
/// forked child may call it.
pub fn test_run(program: &OwnedFd, frame: &[u8], out: &mut [u8]) -> std::io::Result<u32> {
    const BPF_PROG_TEST_RUN: i64 = 10;
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(program.as_raw_fd() as u32).to_ne_bytes());
    attr[8..12].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    attr[12..16].copy_from_slice(&(out.len() as u32).to_ne_bytes());
    attr[16..24].copy_from_slice(&(frame.as_ptr() as u64).to_ne_bytes());
    attr[24..32].copy_from_slice(&(out.as_mut_ptr() as u64).to_ne_bytes());
    attr[32..36].copy_from_slice(&1u32.to_ne_bytes());
    // SAFETY: attr is a zero-padded bpf_attr; the kernel reads
    // data_size_in bytes of `frame` and writes at most data_size_out
    // bytes into `out`, both of which outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            attr.as_mut_ptr(),
            attr.len(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(u32::from_ne_bytes([attr[4], attr[5], attr[6], attr[7]]))
}

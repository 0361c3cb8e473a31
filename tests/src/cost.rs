//! CPU accounting for the cost measurements (`guard_cost`, `block_cost`):
//! per thread and per process, so a shared host's other work stays out.

/// This thread's CPU time (user and system, softirqs served in its context
/// included), in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    // SAFETY: rusage is plain data; getrusage fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid rusage to fill.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &raw mut usage) };
    let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    ns(usage.ru_utime) + ns(usage.ru_stime)
}

/// A process's CPU time (all its threads), in nanoseconds.
pub fn process_cpu_ns(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat_cpu_ns(&stat)
}

/// CPU time of every ksoftirqd thread so far, in nanoseconds.
pub fn ksoftirqd_ns() -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if stat.contains("(ksoftirqd/") {
            total += stat_cpu_ns(&stat);
        }
    }
    total
}

/// utime + stime of a /proc stat line ("pid (comm) state ppid … utime
/// stime …"), in nanoseconds.
fn stat_cpu_ns(stat: &str) -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) * 1_000_000_000 / hz
}

//! What a proxy costs, read from /proc: CPU time and resident memory of the
//! process and every process it forked (nginx's workers), so each peer is
//! charged for all of its work whatever its process model.

use std::collections::HashMap;

/// A proxy's process tree, rooted at the pid we started.
#[derive(Debug, Clone, Copy)]
pub struct ProcTree {
    pub root: u32,
}

#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
    /// Times any of its threads went to sleep waiting (voluntary context
    /// switches): each is a wakeup that found work, so bytes per wakeup
    /// says how much each pass through its event loop carried.
    pub sleeps: u64,
    /// Seconds its threads were ready to run but waited for a CPU
    /// (schedstat's run_delay): others' work on the proxy's CPU.
    pub waited_seconds: f64,
}

impl ProcTree {
    pub fn sample(&self) -> Sample {
        let pids = self.pids();
        let ticks = clock_ticks();
        let mut cpu = 0u64;
        let mut rss = 0u64;
        let mut sleeps = 0u64;
        let mut waited_ns = 0u64;
        for pid in pids {
            if let Some((utime, stime)) = cpu_ticks(pid) {
                cpu += utime + stime;
            }
            rss += rss_bytes(pid).unwrap_or(0);
            let (s, w) = thread_waits(pid);
            sleeps += s;
            waited_ns += w;
        }
        Sample {
            cpu_seconds: cpu as f64 / ticks,
            rss_bytes: rss,
            sleeps,
            waited_seconds: waited_ns as f64 / 1e9,
        }
    }

    /// The root and its descendants (by parent pid).
    fn pids(&self) -> Vec<u32> {
        let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for e in entries.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if let Some(ppid) = stat_fields(pid).and_then(|f| f.get(1)?.parse::<u32>().ok()) {
                    children.entry(ppid).or_default().push(pid);
                }
            }
        }
        let mut out = vec![self.root];
        let mut i = 0;
        while i < out.len() {
            if let Some(c) = children.get(&out[i]) {
                out.extend(c);
            }
            i += 1;
        }
        out
    }
}

/// Fields of /proc/PID/stat after the command name (which may hold spaces):
/// index 0 is the state, 1 the parent pid, 11/12 utime/stime.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    Some(after.split_whitespace().map(str::to_owned).collect())
}

fn cpu_ticks(pid: u32) -> Option<(u64, u64)> {
    let f = stat_fields(pid)?;
    Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
}

/// Over every thread of `pid`: voluntary context switches, and
/// nanoseconds spent runnable on a run queue (schedstat's second field).
fn thread_waits(pid: u32) -> (u64, u64) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0, 0);
    };
    let mut sleeps = 0;
    let mut waited = 0;
    for task in tasks.flatten() {
        let path = task.path();
        if let Ok(status) = std::fs::read_to_string(path.join("status")) {
            sleeps += status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
        if let Ok(schedstat) = std::fs::read_to_string(path.join("schedstat")) {
            waited += schedstat
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    (sleeps, waited)
}

pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// One CPU's times from /proc/stat, in clock ticks.
#[derive(Debug, Clone, Copy)]
pub struct CpuTimes {
    /// Time the hypervisor ran something else while this CPU had work.
    pub steal: u64,
    /// All of it: user, nice, system, idle, iowait, irq, softirq, steal.
    pub total: u64,
    /// Idle and iowait: the rest was busy.
    pub idle: u64,
}

impl CpuTimes {
    pub fn read(cpu: usize) -> Option<CpuTimes> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let name = format!("cpu{cpu}");
        let line = stat
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name.as_str()))?;
        // guest and guest_nice, after steal, are already counted in user.
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        Some(CpuTimes {
            steal: *v.get(7)?,
            total: v.iter().sum(),
            idle: v.get(3)? + v.get(4)?,
        })
    }

    /// Busy seconds (all but idle and iowait) between `self` and `later`.
    pub fn busy_seconds(&self, later: &CpuTimes) -> f64 {
        let total = later.total.saturating_sub(self.total);
        let idle = later.idle.saturating_sub(self.idle);
        total.saturating_sub(idle) as f64 / clock_ticks()
    }

    /// Percent of the time between `self` and `later` that was stolen.
    pub fn steal_percent(&self, later: &CpuTimes) -> Option<f64> {
        let total = later.total.checked_sub(self.total)?;
        let steal = later.steal.checked_sub(self.steal)?;
        (total > 0).then(|| 100.0 * steal as f64 / total as f64)
    }
}

/// This thread's CPU time (softirqs served in its context included), ns.
pub fn thread_cpu_ns() -> u64 {
    // SAFETY: rusage is plain data; getrusage fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid rusage to fill.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &raw mut usage) };
    let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    ns(usage.ru_utime) + ns(usage.ru_stime)
}

/// CPU time of every ksoftirqd thread so far, ns.
pub fn ksoftirqd_ns() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let mut total = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((comm, rest)) = stat.split_once(") ") else {
            continue;
        };
        if !comm.contains("(ksoftirqd/") {
            continue;
        }
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        total += (ticks(11) + ticks(12)) * 1_000_000_000 / hz;
    }
    total
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf reads a constant of the running system; no memory is passed.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Pins the calling thread (and what it later forks) to `cpus`.
/// The CPUs this process may run on (its affinity mask).
pub fn allowed_cpus() -> std::io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; zeroed is its empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; the kernel writes inside `set`.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: c is below CPU_SETSIZE; CPU_ISSET only reads `set`.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

pub fn pin_to(cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is its empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: CPU_SET writes inside `set`, and c is below CPU_SETSIZE (checked).
        if c >= libc::CPU_SETSIZE as usize {
            return Err(std::io::Error::other(format!("cpu {c} out of range")));
        }
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: pid 0 is the calling thread; the set lives across the call.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Raises this process's open-file limit to `want` (root may raise the hard
/// limit too); children inherit it, so every proxy can hold 10,000 connections.
pub fn raise_nofile(want: u64) -> std::io::Result<u64> {
    let lim = libc::rlimit {
        rlim_cur: want,
        rlim_max: want,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        return Ok(want);
    }
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) };
    cur.rlim_cur = cur.rlim_max;
    // SAFETY: as above.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &cur) };
    Ok(cur.rlim_cur)
}

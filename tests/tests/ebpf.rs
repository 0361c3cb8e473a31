//! The eBPF side really loads and runs on this kernel: `connect4` attached to
//! a cgroup made for the test sees a process's connect() in that cgroup.
//! Root only (BPF and cgroup writes); skips with a message otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;

use gateway::ebpf::{ConnectGuard, cgroup2_mount};

/// A cgroup v2 directory removed when the test ends, pass or fail.
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn create(root: &Path) -> TestCgroup {
        let dir = root.join(format!("gateway-test-{}", std::process::id()));
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        TestCgroup(dir)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Processes leave the cgroup when they exit; then it can go.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        eprintln!("warning: could not remove {}", self.0.display());
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

#[test]
fn connect4_loads_attaches_and_sees_connects_in_its_cgroup() {
    if !is_root() {
        eprintln!("skipped: loading BPF programs needs root");
        return;
    }
    let Some(root) = cgroup2_mount() else {
        eprintln!("skipped: no cgroup v2 hierarchy mounted (see /proc/mounts)");
        return;
    };
    let cgroup = TestCgroup::create(&root);
    let guard = ConnectGuard::attach(&cgroup.0).expect("load and attach connect4");
    assert_eq!(guard.counters().unwrap().seen, 0);

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // A shell that moves itself into the cgroup, then connects with bash's /dev/tcp.
    let script = format!(
        "echo $$ > {procs} && exec 3<>/dev/tcp/127.0.0.1/{port}",
        procs = cgroup.0.join("cgroup.procs").display()
    );
    let status = Command::new("bash").args(["-c", &script]).status().unwrap();
    assert!(
        status.success(),
        "connect from inside the cgroup failed: {status}"
    );
    let (_conn, _) = listener.accept().unwrap();

    let c = guard.counters().unwrap();
    assert!(
        c.seen >= 1 && c.allowed >= 1,
        "connect4 did not see the connect: {c:?}"
    );
    assert_eq!(c.refused, 0);

    // A connect from outside the cgroup is not seen.
    let before = guard.counters().unwrap();
    let _outside = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert_eq!(guard.counters().unwrap(), before);
    drop(guard);
}

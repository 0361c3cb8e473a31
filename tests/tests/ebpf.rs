//! The local guard on this kernel: in a cgroup subtree made for the test, a
//! process outside the gateway's cgroup gets EPERM connecting to a protected
//! backend, the gateway's cgroup connects, audit counts and lets through, and
//! updates apply in place. Root only; skips with a message otherwise.

use std::net::TcpListener;
use std::path::{Path, PathBuf};

use gateway::ebpf::{Enforcement, GuardSpec, LocalGuard, cgroup2_mount};
use gateway_tests::{connect_from, is_root};

/// A cgroup v2 subtree (with `gw` and `other` leaves) removed when the test
/// ends, pass or fail.
struct TestCgroups {
    root: PathBuf,
}

impl TestCgroups {
    fn create(mount: &Path) -> TestCgroups {
        let root = mount.join(format!("gateway-guard-test-{}", std::process::id()));
        for dir in [root.clone(), root.join("gw"), root.join("other")] {
            std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        }
        TestCgroups { root }
    }

    fn leaf(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

impl Drop for TestCgroups {
    fn drop(&mut self) {
        // Processes leave a cgroup when they exit; then it can go.
        for dir in [self.leaf("gw"), self.leaf("other"), self.root.clone()] {
            let mut removed = false;
            for _ in 0..50 {
                if std::fs::remove_dir(&dir).is_ok() {
                    removed = true;
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            if !removed {
                eprintln!("warning: could not remove {}", dir.display());
            }
        }
    }
}

#[test]
fn only_the_gateway_cgroup_reaches_protected_backends() {
    if !is_root() {
        eprintln!("skipped: loading BPF programs needs root");
        return;
    }
    let Some(mount) = cgroup2_mount() else {
        eprintln!("skipped: no cgroup v2 hierarchy mounted (see /proc/mounts)");
        return;
    };
    let cg = TestCgroups::create(&mount);
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let protected = backend.local_addr().unwrap();
    let other_service = TcpListener::bind("127.0.0.1:0").unwrap();
    let unprotected = other_service.local_addr().unwrap();
    let v6 = TcpListener::bind("[::1]:0").ok();

    let mut spec = GuardSpec {
        protected: vec![protected],
        gateway_cgroup: cg.leaf("gw"),
        enforcement: Enforcement::Enforce,
    };
    if let Some(v6) = &v6 {
        spec.protected.push(v6.local_addr().unwrap());
    }
    let mut guard = LocalGuard::install(&cg.root, &spec).expect("install the guard");

    let err = connect_from(&cg.leaf("other"), protected).expect_err("bypass must be refused");
    assert!(
        err.contains("Operation not permitted"),
        "EPERM expected: {err}"
    );
    connect_from(&cg.leaf("other"), unprotected).expect("unprotected services stay reachable");
    connect_from(&cg.leaf("gw"), protected).expect("the gateway reaches its backend");
    if let Some(v6) = &v6 {
        let err = connect_from(&cg.leaf("other"), v6.local_addr().unwrap())
            .expect_err("IPv6 bypass refused");
        assert!(err.contains("Operation not permitted"), "{err}");
    }
    let c = guard.counters().unwrap();
    assert_eq!(
        (c.allowed, c.refused),
        (1, 1 + u64::from(v6.is_some())),
        "{c:?}"
    );
    assert_eq!(guard.attempts(protected).unwrap(), 1);

    // A new backend is protected at once, programs still attached.
    spec.protected.push(unprotected);
    guard.update(&spec).unwrap();
    let err = connect_from(&cg.leaf("other"), unprotected).expect_err("newly protected");
    assert!(err.contains("Operation not permitted"), "{err}");
    connect_from(&cg.leaf("other"), protected).expect_err("still protected during the update");

    // Audit: counted, let through.
    spec.enforcement = Enforcement::Audit;
    guard.update(&spec).unwrap();
    connect_from(&cg.leaf("other"), protected).expect("audit lets it through");
    assert_eq!(guard.counters().unwrap().audited, 1);
    assert_eq!(guard.attempts(protected).unwrap(), 3);

    // Removing a backend from the set unprotects it.
    spec.enforcement = Enforcement::Enforce;
    spec.protected.retain(|a| *a != unprotected);
    guard.update(&spec).unwrap();
    connect_from(&cg.leaf("other"), unprotected).expect("no longer protected");

    drop(guard);
    connect_from(&cg.leaf("other"), protected).expect("detached with the guard");
}

//! The gateway with its eBPF guard: clients reach the backend through the
//! gateway, a local process that bypasses it gets EPERM, a reload protects a
//! new backend at once, audit lets bypasses through but counts them, and
//! enforcement that cannot be installed stops the gateway from starting.
//! Root only; the test process becomes "the gateway" by joining its cgroup.

use std::path::{Path, PathBuf};

use gateway_tests::*;

const SNI: &str = "orders.example.internal";

/// The test's cgroup subtree: `gw` (the gateway) and `other`. On drop the
/// test process goes back where it was and the subtree is removed.
struct Cgroups {
    mount: PathBuf,
    rel: PathBuf,
    home: PathBuf,
    /// The guard's bpffs pins for this test.
    pins: PathBuf,
}

impl Cgroups {
    fn create(mount: &Path) -> Cgroups {
        let rel = PathBuf::from(format!("gateway-e2e-guard-{}", std::process::id()));
        for d in [rel.clone(), rel.join("other")] {
            std::fs::create_dir(mount.join(&d)).unwrap();
        }
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let home = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(|p| mount.join(p.trim_start_matches('/')))
            .unwrap_or_else(|| mount.to_owned());
        Cgroups {
            mount: mount.to_owned(),
            rel,
            home,
            pins: PathBuf::from(format!("/sys/fs/bpf/gateway-e2e-{}", std::process::id())),
        }
    }

    fn path(&self, leaf: &str) -> PathBuf {
        self.mount.join(&self.rel).join(leaf)
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        let _ = gateway::ebpf::uninstall(&self.pins);
        let _ = std::fs::write(self.home.join("cgroup.procs"), "0");
        for leaf in ["gw", "other", ""] {
            let dir = self.path(leaf);
            for _ in 0..50 {
                if !dir.exists() || std::fs::remove_dir(&dir).is_ok() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn backends_are_reachable_only_through_the_gateway() {
    let Some(mount) = bpf_cgroup_or_skip() else {
        return;
    };
    let cg = Cgroups::create(&mount);
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let second = EchoBackend::start().await;
    let guard = |mode: &str| {
        format!(
            "admin = \"127.0.0.1:0\"\n[guard]\nenforcement = \"{mode}\"\ncgroup = \"{}\"\nattach_to = \"{}\"\npin_dir = \"{}\"\n",
            cg.rel.join("gw").display(),
            cg.rel.display(),
            cg.pins.display()
        )
    };
    let one = guard("enforce")
        + &listener_toml(&pki, "edge", "")
        + &route_toml("orders", &[SNI], &[backend.addr], &[SPIFFE_FRONTEND]);
    let gw = RunningGateway::start(&pki, &one).await;
    let mut attempts = gw.guard.as_ref().expect("guard installed").attempts();

    // Through the gateway: fine. Around it: EPERM.
    let tls = connect(gw.app_addr, SNI, pki.frontend_config())
        .await
        .unwrap();
    assert_eq!(
        echo_roundtrip(tls, payload(100_000)).await.unwrap(),
        payload(100_000)
    );
    let err = connect_from(&cg.path("other"), backend.addr).expect_err("bypass refused");
    assert!(err.contains("Operation not permitted"), "{err}");
    // Who tried, as the kernel saw it.
    let seen = tokio::time::timeout(STEP, attempts.recv())
        .await
        .expect("an event")
        .unwrap();
    assert_eq!(
        (seen.comm.as_str(), seen.destination, seen.audited),
        (gateway_tests::PROBE_COMM, backend.addr, false),
        "{seen:?}"
    );
    assert!(seen.pid > 0);
    assert_eq!(
        seen.cgroup,
        gateway::ebpf::cgroup_id(&cg.path("other")).unwrap()
    );
    connect_from(&cg.path("other"), second.addr).expect("not a backend yet");

    // A reload adding a backend protects it before it serves.
    let two = guard("enforce")
        + &listener_toml(&pki, "edge", "")
        + &route_toml(
            "orders",
            &[SNI],
            &[backend.addr, second.addr],
            &[SPIFFE_FRONTEND],
        );
    gw.reload_toml(&pki, &two).await.unwrap();
    let err = connect_from(&cg.path("other"), second.addr).expect_err("new backend protected");
    assert!(err.contains("Operation not permitted"), "{err}");

    // Audit: the bypass goes through, and is counted.
    gw.reload_toml(&pki, &(guard("audit") + &two[guard("enforce").len()..]))
        .await
        .unwrap();
    connect_from(&cg.path("other"), backend.addr).expect("audit lets it through");
    let mut audited = None;
    while let Ok(Ok(a)) = tokio::time::timeout(STEP, attempts.recv()).await {
        if a.audited {
            audited = Some(a);
            break;
        }
    }
    assert_eq!(audited.map(|a| a.destination), Some(backend.addr));
    let metrics = gw.scrape().await;
    assert!(
        metrics.contains("gateway_guard_connects_total{verdict=\"deny\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gateway_guard_connects_total{verdict=\"audit\"} 1"),
        "{metrics}"
    );
    drop(gw);

    // Fail closed: enforcement that cannot be installed means no gateway.
    let broken = one.replace(
        &format!("attach_to = \"{}\"", cg.rel.display()),
        "attach_to = \"no-such-cgroup\"",
    );
    let refused_start = async |toml: &str| {
        let config = gateway::Config::parse(
            &format!("access_log = \"off\"\n{toml}"),
            &pki.path("g.toml"),
            pki.dir.path(),
        )
        .unwrap();
        gateway::build(&config)
            .await
            .err()
            .expect("the gateway must not start")
    };
    let err = refused_start(&broken).await;
    assert!(err.to_string().contains("no-such-cgroup"), "{err}");

    // A uid the gateway does not run as would refuse its own connects: no start.
    let err = refused_start(&one.replace("[guard]\n", "[guard]\nuid = 4242\n")).await;
    assert!(
        err.to_string()
            .contains("uid = 4242, but the gateway runs as uid 0"),
        "{err}"
    );
}

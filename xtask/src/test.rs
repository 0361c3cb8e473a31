//! `cargo xtask test`: lints, then every test, as CI runs them.

use crate::cmd;

/// Seconds per fuzz target in a test run: enough to replay the corpus and
/// explore a little (four targets: a minute in all); `cargo xtask fuzz`
/// runs longer.
const FUZZ_SECONDS: u64 = 15;

/// The soak's length in a test run (`cargo xtask soak` runs longer).
const SOAK_SECONDS: u64 = 60;

/// Test binaries run at once. Most of a binary's time is waiting (timers,
/// sockets, child processes), so more than the machine's 2 cores are busy
/// only in bursts; each binary still runs its own tests on every core.
const TEST_JOBS: usize = 3;

pub fn run(lint: bool, vm: bool) -> anyhow::Result<()> {
    if lint {
        cmd::run(cmd::cargo().args(["fmt", "--all", "--", "--check"]))?;
        cmd::run(cmd::cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    }
    // The black-box tests drive the real binary; build it first. Among
    // them tests/tests/rollout.rs walks docs/rollout.md as written.
    cmd::run(&mut cmd::build_gateway())?;
    let mut env = Vec::new();
    // The shipped unit uses Type=notify-reload, which Debian 12's
    // systemd-analyze (252) cannot verify; without a newer one that part
    // of tests/tests/systemd.rs skips with a message.
    match crate::vm::fetch_systemd_analyze() {
        Ok(bin) => env.push(("SYSTEMD_ANALYZE".to_owned(), bin.display().to_string())),
        Err(e) => eprintln!("xtask: no systemd-analyze from bookworm-backports: {e:#}"),
    }
    // tests/tests/kubernetes.rs skips without kubernetes-validate when run
    // by hand; here it must find the one `cargo xtask setup` installs.
    env.push((
        "KUBERNETES_VALIDATE".to_owned(),
        crate::setup::kubernetes_validate_bin()
            .display()
            .to_string(),
    ));
    let binaries = crate::binaries::build()?;
    crate::binaries::run_all(&binaries, TEST_JOBS, &env)?;
    // The gateway's own protocol code against maintained implementations:
    // a short run of every fuzz target from its committed corpus.
    crate::fuzz::run(FUZZ_SECONDS, crate::fuzz::Corpus::Keep)?;
    if vm {
        // kTLS exists only there: this machine's kernel has no CONFIG_TLS.
        crate::vm::run(None, &crate::vm::Selection::default())?;
    }
    // The benchmark harness must keep working; its full run is on demand.
    crate::bench::run(true, false, &[])?;
    // A minute of the soak: bytes checked end to end through reloads,
    // a backend restart and attacks, and the descriptors given back.
    crate::soak::run(SOAK_SECONDS)?;
    // The README's first command must keep working: run it as a test too.
    crate::demo::run(false)?;
    crate::demo::run(true)?;
    eprintln!("xtask: all tests passed");
    Ok(())
}

//! `cargo xtask test`: lints, then every test, as CI runs them.

use crate::cmd;

/// Seconds per fuzz target in a test run: enough to replay the corpus and
/// explore a little (four targets: a minute in all); `cargo xtask fuzz`
/// runs longer.
const FUZZ_SECONDS: u64 = 15;

/// The soak's length in a test run (`cargo xtask soak` runs longer).
const SOAK_SECONDS: u64 = 60;

pub fn run(lint: bool, vm: bool) -> anyhow::Result<()> {
    if lint {
        cmd::run(cmd::cargo().args(["fmt", "--all", "--", "--check"]))?;
        cmd::run(cmd::cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    }
    // The black-box tests drive the real binary; build it first. Among
    // them tests/tests/rollout.rs walks docs/rollout.md as written.
    cmd::run(&mut cmd::build_gateway())?;
    let mut test = cmd::cargo();
    test.args(["test", "--no-fail-fast"]);
    // The shipped unit uses Type=notify-reload, which Debian 12's
    // systemd-analyze (252) cannot verify; without a newer one that part
    // of tests/tests/systemd.rs skips with a message.
    match crate::vm::fetch_systemd_analyze() {
        Ok(bin) => {
            test.env("SYSTEMD_ANALYZE", bin);
        }
        Err(e) => eprintln!("xtask: no systemd-analyze from bookworm-backports: {e:#}"),
    }
    // tests/tests/kubernetes.rs skips without kubernetes-validate when run
    // by hand; here it must find the one `cargo xtask setup` installs.
    test.env(
        "KUBERNETES_VALIDATE",
        crate::setup::kubernetes_validate_bin(),
    );
    cmd::run(&mut test)?;
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

//! Running child commands with their command line echoed, failing loudly.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, bail};

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Runs `cmd`, echoing it first; an unsuccessful exit is an error naming it.
/// `cargo build` of the gateway binary in the dev profile, as the
/// black-box tests, the VM tests and the demo use it.
///
/// Never with `--package`: cargo unifies features over the packages a
/// command selects, so `-p gateway` resolved aya, the gateway library and
/// what depends on them differently from the workspace's `cargo test`, and
/// a clean `cargo xtask test` compiled them twice. `--bin` alone keeps the
/// default members' selection, the same as `cargo test`'s.
pub fn build_gateway() -> Command {
    let mut c = cargo();
    c.args(["build", "--bin", "gateway"]);
    c
}

/// The release binaries of the bench and the soak, in one command for the
/// same reason as `build_gateway`: built per package they were two
/// resolutions and two release builds of the gateway library.
pub fn build_release() -> Command {
    let mut c = cargo();
    c.args([
        "build",
        "--release",
        "--bin",
        "gateway",
        "--bin",
        "gateway-bench",
    ]);
    c
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: $ {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("could not start {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed: {status}", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd` quietly and says whether it succeeded (for probes).
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `cmd` and returns its stdout, or None when it fails to start or exits non-zero.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(std::process::Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// `cargo` as the running toolchain knows it.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

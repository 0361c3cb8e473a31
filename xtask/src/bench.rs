//! `cargo xtask bench`: the gateway beside HAProxy, nginx stream, stunnel and
//! a plain splice relay, on this machine, in one run (see bench/ and
//! BENCHMARKS.md). `--quick` is the smoke run `cargo xtask test` uses so the
//! harness never rots; a full run rewrites BENCHMARKS.md and bench/results/.

use std::path::PathBuf;
use std::process::Command;

use crate::{cmd, setup};

/// The peers come from Debian, as users would install them; the font is for
/// the plots' text.
const PEER_PACKAGES: &[&str] = &[
    "haproxy",
    "nginx",
    "libnginx-mod-stream",
    "stunnel4",
    "fonts-dejavu-core",
];

pub fn run(quick: bool, extra: &[String]) -> anyhow::Result<()> {
    setup::debian_packages_without_starting_services(PEER_PACKAGES)?;
    // Release builds: the numbers are about optimised code.
    cmd::run(cmd::cargo().args([
        "build",
        "--release",
        "--package",
        "gateway",
        "--bin",
        "gateway",
    ]))?;
    cmd::run(cmd::cargo().args(["build", "--release", "--package", "gateway-bench"]))?;
    let root = cmd::workspace_root();
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let release = target.join("release");
    let mut c = Command::new(release.join("gateway-bench"));
    c.current_dir(&root)
        .arg("run")
        .arg("--gateway")
        .arg(release.join("gateway"));
    if quick {
        c.arg("--quick")
            .arg("--out")
            .arg(target.join("bench/quick"));
    } else {
        c.arg("--out")
            .arg(target.join("bench/full"))
            .arg("--results")
            .arg(root.join("bench/results"))
            .arg("--markdown")
            .arg(root.join("BENCHMARKS.md"));
    }
    c.args(extra);
    cmd::run(&mut c)
}

//! `cargo xtask demo [--fleet]`: build the gateway and run the demo driver
//! (or the fleet's) against it.

use crate::cmd;

pub fn run(fleet: bool) -> anyhow::Result<()> {
    cmd::run(cmd::build_gateway().arg("--quiet"))?;
    let binary = cmd::workspace_root().join("target/debug/gateway");
    cmd::run(
        cmd::cargo()
            .args([
                "run",
                "--quiet",
                // No `--package`: see `cmd::build_gateway`.
                "--bin",
                if fleet { "fleet_demo" } else { "demo" },
                "--",
            ])
            .arg(binary),
    )
}

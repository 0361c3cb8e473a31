//! `cargo xtask demo`: build the gateway and run the demo driver against it.

use crate::cmd;

pub fn run() -> anyhow::Result<()> {
    cmd::run(cmd::cargo().args([
        "build",
        "--quiet",
        "--package",
        "gateway",
        "--bin",
        "gateway",
    ]))?;
    let binary = cmd::workspace_root().join("target/debug/gateway");
    cmd::run(
        cmd::cargo()
            .args([
                "run",
                "--quiet",
                "--package",
                "gateway-tests",
                "--bin",
                "demo",
                "--",
            ])
            .arg(binary),
    )
}

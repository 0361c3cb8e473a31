//! `cargo xtask soak`: release builds of the gateway and the load, then
//! `gateway-bench soak` (bench/src/soak.rs) for the given time.

use std::path::PathBuf;
use std::process::Command;

use crate::cmd;

pub fn run(seconds: u64) -> anyhow::Result<()> {
    cmd::run(&mut cmd::build_release())?;
    let root = cmd::workspace_root();
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let release = target.join("release");
    cmd::run(
        Command::new(release.join("gateway-bench"))
            .current_dir(&root)
            .arg("soak")
            .arg("--gateway")
            .arg(release.join("gateway"))
            .arg("--seconds")
            .arg(seconds.to_string())
            .arg("--out")
            .arg(target.join("soak")),
    )
}

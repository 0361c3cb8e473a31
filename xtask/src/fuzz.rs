//! `cargo xtask fuzz --seconds N`: every cargo-fuzz target in fuzz/, each for
//! N seconds, from its committed corpus (which grows as it runs, to be
//! committed). The short run in `cargo xtask test` keeps what it finds in
//! target/ instead, so a test run leaves the work tree as it found it.
//!
//! The targets build with nightly, on their own (fuzz/ is not a workspace
//! member); the eBPF programs are skipped, as no target loads them. Without
//! the address sanitizer: the code under test is safe Rust (its one
//! `unsafe`, wiping a key, runs on every drop in the unit tests too), and
//! the C below it (ring, AWS-LC) is not instrumented either way, while the
//! sanitizer costs CI minutes to build and half the executions.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::cmd;

/// Where new inputs go: into the committed corpus, or beside it.
#[derive(Clone, Copy)]
pub enum Corpus {
    Grow,
    Keep,
}

pub fn run(seconds: u64, corpus_mode: Corpus) -> anyhow::Result<()> {
    let root = cmd::workspace_root().join("fuzz");
    let list = cmd::output(cargo_fuzz(&root).arg("list"))
        .context("cargo fuzz list (cargo xtask setup installs cargo-fuzz)")?;
    let targets: Vec<&str> = list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if targets.is_empty() {
        bail!("cargo fuzz list found no targets in {}", root.display());
    }
    for target in &targets {
        let corpus = root.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        // libFuzzer writes new inputs into the first directory it is given
        // and only reads the others.
        let mut dirs = vec![corpus.clone()];
        if let Corpus::Keep = corpus_mode {
            let scratch = cmd::workspace_root()
                .join("target")
                .join("fuzz-corpus")
                .join(target);
            std::fs::create_dir_all(&scratch)
                .with_context(|| format!("creating {}", scratch.display()))?;
            dirs.insert(0, scratch);
        }
        cmd::run(
            cargo_fuzz(&root)
                .args(["run", "--sanitizer", "none", target])
                .args(&dirs)
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                // A finding is a failed run, not a log line.
                .arg("-error_exitcode=77"),
        )?;
    }
    eprintln!(
        "xtask: fuzz: {} target(s), {seconds} s each, no finding: {}",
        targets.len(),
        targets.join(", ")
    );
    Ok(())
}

fn cargo_fuzz(root: &std::path::Path) -> Command {
    let mut c = Command::new("cargo");
    c.args(["+nightly", "fuzz"])
        .current_dir(root)
        .env("AYA_BUILD_SKIP", "1");
    c
}

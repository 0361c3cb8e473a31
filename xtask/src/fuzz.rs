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
    // Built once up front; then the targets run side by side, as each
    // libFuzzer process keeps one core busy.
    cmd::run(cargo_fuzz(&root).args(["build", "--sanitizer", "none"]))?;
    let mut runs = Vec::new();
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
        let mut c = cargo_fuzz(&root);
        c.args(["run", "--sanitizer", "none", target])
            .args(&dirs)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            // A finding is a failed run, not a log line.
            .arg("-error_exitcode=77");
        runs.push((target.to_string(), c));
    }
    let logs = cmd::workspace_root().join("target/xtask/fuzz-logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let queue = std::sync::Mutex::new(runs);
    let failed = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| {
                while let Some((target, mut c)) = queue.lock().ok().and_then(|mut q| q.pop()) {
                    let log = logs.join(format!("{target}.log"));
                    let result = run_logged(&mut c, &log);
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    eprint!("xtask: $ {}\n{text}", cmd::describe(&c));
                    if let Err(e) = result {
                        eprintln!("xtask: fuzz {target}: {e:#}");
                        if let Ok(mut f) = failed.lock() {
                            f.push(target);
                        }
                    }
                }
            });
        }
    });
    let failed = failed.into_inner().unwrap_or_else(|e| e.into_inner());
    if !failed.is_empty() {
        bail!(
            "fuzz targets failed (a finding exits 77; inputs are in fuzz/artifacts): {}",
            failed.join(", ")
        );
    }
    eprintln!(
        "xtask: fuzz: {} target(s), {seconds} s each, no finding: {}",
        targets.len(),
        targets.join(", ")
    );
    Ok(())
}

/// Runs `c` with its stdout and stderr into `log`.
fn run_logged(c: &mut Command, log: &std::path::Path) -> anyhow::Result<()> {
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let status = c
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .with_context(|| format!("could not start {}", cmd::describe(c)))?;
    if !status.success() {
        bail!("{} failed: {status}", cmd::describe(c));
    }
    Ok(())
}

fn cargo_fuzz(root: &std::path::Path) -> Command {
    let mut c = Command::new("cargo");
    c.args(["+nightly", "fuzz"])
        .current_dir(root)
        .env("AYA_BUILD_SKIP", "1");
    c
}

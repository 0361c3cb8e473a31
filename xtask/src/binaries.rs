//! The workspace's test binaries: built once by `cargo test --no-run`, then
//! run side by side on the host, or packed into the VM.
//!
//! `cargo test` runs its binaries one after another, and most of their time
//! is spent waiting on sockets, timers and child processes (the SSO tests
//! wait on a Node.js provider, the admission tests on handshake timeouts),
//! so a run left the machine's cores idle for minutes. Here a few binaries
//! run at once; each one's output is kept apart and printed whole when it
//! ends, with cargo's own `Running` header and summary lines.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{BufReader, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::cmd;

/// One test executable as cargo built it.
#[derive(Debug, Clone)]
pub struct TestBinary {
    /// The target's name: `sso` for tests/tests/sso.rs, `gateway` for the
    /// library's unit tests.
    pub name: String,
    /// `lib`, `bin` or `test`.
    pub kind: String,
    /// The source file, for the `Running` line.
    pub src: PathBuf,
    /// The package's directory: cargo runs a test binary there.
    pub package_dir: PathBuf,
    pub exe: PathBuf,
}

/// Builds every test binary of the default members with the host test
/// stage's own command (no package filter: another selection would unify
/// features differently and rebuild part of the tree), and lists them.
pub fn build() -> anyhow::Result<Vec<TestBinary>> {
    let mut c = cmd::cargo();
    c.args([
        "test",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    c.stdout(Stdio::piped());
    eprintln!("xtask: $ {}", cmd::describe(&c));
    let mut child = c.spawn().context("running cargo test --no-run")?;
    let stdout = child.stdout.take().context("cargo's stdout")?;
    let mut found = Vec::new();
    for message in cargo_metadata::Message::parse_stream(BufReader::new(stdout)) {
        let message = message.context("reading cargo's messages")?;
        let cargo_metadata::Message::CompilerArtifact(artifact) = message else {
            continue;
        };
        let Some(exe) = artifact.executable else {
            continue;
        };
        if !artifact.profile.test {
            continue;
        }
        let package_dir = artifact
            .manifest_path
            .parent()
            .map(|p| p.as_std_path().to_path_buf())
            .unwrap_or_default();
        found.push(TestBinary {
            name: artifact.target.name.clone(),
            kind: artifact
                .target
                .kind
                .first()
                .map(ToString::to_string)
                .unwrap_or_default(),
            src: artifact.target.src_path.into_std_path_buf(),
            package_dir,
            exe: exe.into_std_path_buf(),
        });
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("building the test binaries failed: {status}");
    }
    Ok(found)
}

/// How long one test binary may run before it is killed and reported: a
/// hung test must fail the run with its output, not hold CI for its limit.
const BINARY_TIMEOUT: Duration = Duration::from_secs(600);

/// Binaries that took about a minute each when this was written. A clean
/// run (CI's) has no measured times yet and starts these first, so the
/// last minute is not one long binary running alone; later runs order by
/// the times they recorded.
const SLOW_FIRST: &[&str] = &["sso", "review2_admission", "admission_eviction"];

/// Runs `binaries` (and the doc tests) at most `jobs` at a time with
/// `env` set; every failure is reported, none stops the others.
pub fn run_all(
    binaries: &[TestBinary],
    jobs: usize,
    env: &[(String, String)],
) -> anyhow::Result<()> {
    let times_file = cmd::workspace_root().join("target/xtask/test-times");
    let logs = cmd::workspace_root().join("target/xtask/test-logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let past = read_times(&times_file);
    let mut queue: Vec<Job> = binaries.iter().cloned().map(Job::Binary).collect();
    queue.push(Job::DocTests);
    // Longest first; those never timed (new binaries, a clean tree) before
    // all of them, the known slow ones first among those.
    queue.sort_by(|a, b| {
        let key = |j: &Job| match past.get(&j.key()) {
            Some(t) => (1, -(*t as i64)),
            None if SLOW_FIRST.contains(&j.key().as_str()) => (0, 0),
            None => (0, 1),
        };
        key(a).cmp(&key(b))
    });
    let total = queue.len();
    let queue = Mutex::new(queue.into_iter().collect::<VecDeque<_>>());
    let outcome = Mutex::new(Outcome::default());
    let jobs = jobs.clamp(1, total.max(1));
    eprintln!("xtask: running {total} test binaries, {jobs} at a time");
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| {
                while let Some(job) = queue.lock().ok().and_then(|mut q| q.pop_front()) {
                    let log = logs.join(format!("{}.log", job.key()));
                    let result = job.run(&log, env);
                    let mut out = outcome.lock().unwrap_or_else(|e| e.into_inner());
                    out.report(&job, &log, result);
                }
            });
        }
    });
    let outcome = outcome.into_inner().unwrap_or_else(|e| e.into_inner());
    write_times(&times_file, &past, &outcome.times);
    eprintln!(
        "xtask: {total} test binaries in {:.0} s, {} failed",
        started.elapsed().as_secs_f64(),
        outcome.failed.len()
    );
    if !outcome.failed.is_empty() {
        bail!("test binaries failed: {}", outcome.failed.join(", "));
    }
    Ok(())
}

enum Job {
    Binary(TestBinary),
    /// `cargo test --doc`: rustdoc builds and runs them, so cargo runs them.
    DocTests,
}

impl Job {
    /// The name its time is recorded under: unique per binary.
    fn key(&self) -> String {
        match self {
            Job::Binary(b) if b.kind == "test" => b.name.clone(),
            Job::Binary(b) => format!("{}-{}", b.name, b.kind),
            Job::DocTests => "doc-tests".to_owned(),
        }
    }

    fn header(&self) -> String {
        match self {
            Job::Binary(b) => {
                let src = b
                    .src
                    .strip_prefix(&b.package_dir)
                    .unwrap_or(&b.src)
                    .display()
                    .to_string();
                let what = if b.kind == "test" {
                    src
                } else {
                    format!("unittests {src}")
                };
                format!("     Running {what} ({})", b.exe.display())
            }
            Job::DocTests => format!("     Running {}", cmd::describe(&doc_tests())),
        }
    }

    fn command(&self, env: &[(String, String)]) -> Command {
        let mut c = match self {
            Job::Binary(b) => {
                let mut c = Command::new(&b.exe);
                // As cargo runs it: from its package, knowing its cargo.
                c.current_dir(&b.package_dir);
                c.env("CARGO_MANIFEST_DIR", &b.package_dir);
                c.env(
                    "CARGO",
                    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()),
                );
                c
            }
            Job::DocTests => doc_tests(),
        };
        c.envs(env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// Runs it with stdout and stderr into `log`; how it ended and in how long.
    fn run(&self, log: &Path, env: &[(String, String)]) -> (Result<(), String>, Duration) {
        let started = Instant::now();
        let result = (|| -> Result<(), String> {
            let file = File::create(log).map_err(|e| format!("creating {}: {e}", log.display()))?;
            let err = file.try_clone().map_err(|e| e.to_string())?;
            let mut c = self.command(env);
            c.stdin(Stdio::null()).stdout(file).stderr(err);
            let mut child = c.spawn().map_err(|e| format!("could not start: {e}"))?;
            loop {
                if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                    return if status.success() {
                        Ok(())
                    } else {
                        Err(status.to_string())
                    };
                }
                if started.elapsed() > BINARY_TIMEOUT {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("killed after {} s", BINARY_TIMEOUT.as_secs()));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })();
        (result, started.elapsed())
    }
}

fn doc_tests() -> Command {
    let mut c = cmd::cargo();
    c.args(["test", "--doc", "--no-fail-fast"]);
    c
}

#[derive(Default)]
struct Outcome {
    failed: Vec<String>,
    times: HashMap<String, f64>,
}

impl Outcome {
    /// Prints a finished job's whole output under its header, at once, so
    /// binaries running side by side never interleave their lines.
    fn report(&mut self, job: &Job, log: &Path, (result, took): (Result<(), String>, Duration)) {
        let mut text = String::new();
        if let Ok(mut f) = File::open(log) {
            let _ = f.read_to_string(&mut text);
        }
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{}", job.header());
        let _ = stdout.write_all(text.as_bytes());
        let _ = stdout.flush();
        drop(stdout);
        self.times.insert(job.key(), took.as_secs_f64());
        if let Err(why) = result {
            eprintln!(
                "xtask: {} failed ({why}) after {:.1} s",
                job.key(),
                took.as_secs_f64()
            );
            self.failed.push(job.key());
        }
    }
}

fn read_times(path: &Path) -> HashMap<String, f64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (name, secs) = l.split_once(' ')?;
            Some((name.to_owned(), secs.parse().ok()?))
        })
        .collect()
}

fn write_times(path: &Path, past: &HashMap<String, f64>, now: &HashMap<String, f64>) {
    let mut all = past.clone();
    all.extend(now.iter().map(|(k, v)| (k.clone(), *v)));
    let mut lines: Vec<String> = all.iter().map(|(k, v)| format!("{k} {v:.1}")).collect();
    lines.sort();
    let _ = std::fs::write(path, lines.join("\n") + "\n");
}

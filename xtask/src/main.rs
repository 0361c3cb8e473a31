//! `cargo xtask …`: everything an operator or CI runs, from a fresh machine.
//!
//! Every command that needs tools runs `setup` first, so a clean clone needs
//! nothing but `cargo xtask demo` or `cargo xtask test`.

mod bench;
mod binaries;
mod cmd;
mod demo;
mod fuzz;
mod package;
mod setup;
mod soak;
mod test;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, set up, demo and test the gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what builds and tests need (rust-src, bpf-linker, Debian packages); idempotent.
    Setup,
    /// Run the gateway on a throwaway PKI and show who gets through and who is refused.
    Demo {
        /// A fleet instead: one etcd, two gateways following it, a route
        /// and a revocation pushed, etcd stopped.
        #[arg(long)]
        fleet: bool,
    },
    /// setup + fmt --check + clippy -D warnings + every test, on this kernel and in the VMs.
    Test {
        /// Skip fmt and clippy (quicker local loop).
        #[arg(long)]
        no_lint: bool,
        /// Skip the VM kernels (quicker local loop).
        #[arg(long)]
        no_vm: bool,
    },
    /// Run every cargo-fuzz target (fuzz/) for a while, from its committed corpus.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Measure the gateway beside HAProxy, nginx, stunnel and a splice relay; writes BENCHMARKS.md.
    Bench {
        /// A smoke run of a few seconds per peer (results under target/bench/quick).
        #[arg(long)]
        quick: bool,
        /// Only the kTLS-against-userspace run in the VM.
        #[arg(long, conflicts_with = "quick")]
        vm_only: bool,
        /// Passed on to `gateway-bench run` (e.g. --peers gateway,nginx --only bulk).
        #[arg(last = true)]
        extra: Vec<String>,
    },
    /// Checked streams through the gateway for a while, with reloads, backend restarts and attacks.
    Soak {
        /// How long the load runs.
        #[arg(long, default_value_t = 10)]
        minutes: u64,
    },
    /// Build the Debian package: target/debian/gateway_<version>_<arch>.deb.
    Package {
        /// Package this gateway binary instead of building a release one.
        #[arg(long)]
        binary: Option<std::path::PathBuf>,
        /// Where the .deb goes (default: target/debian).
        #[arg(long)]
        out_dir: Option<std::path::PathBuf>,
        /// Compress with gzip -1 instead of xz (tests packaging a debug binary).
        #[arg(long)]
        quick: bool,
    },
    /// Run the kTLS and eBPF tests on Debian's 6.1 and 6.12 cloud kernels in QEMU.
    VmTest {
        /// Only this kernel: debian-6.1 or debian-6.12-backports.
        #[arg(long)]
        kernel: Option<String>,
        /// Only this test binary (repeatable): ktls, ktls_record_limit, ebpf, guard, remote_guard.
        #[arg(long = "test")]
        tests: Vec<String>,
        /// Only the tests whose name contains this (passed to each test binary).
        #[arg(long)]
        filter: Option<String>,
    },
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line that says what failed; the child's own output is above it.
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Setup => setup::run(),
        Command::Demo { fleet } => {
            setup::run()?;
            demo::run(fleet)
        }
        Command::Test { no_lint, no_vm } => {
            setup::run()?;
            test::run(!no_lint, !no_vm)
        }
        Command::Bench {
            quick,
            vm_only,
            extra,
        } => {
            setup::run()?;
            bench::run(quick, vm_only, &extra)
        }
        Command::Fuzz { seconds } => {
            setup::run()?;
            fuzz::run(seconds, fuzz::Corpus::Grow)
        }
        Command::Soak { minutes } => {
            setup::run()?;
            soak::run(minutes * 60)
        }
        Command::Package {
            binary,
            out_dir,
            quick,
        } => {
            // A release build needs the eBPF toolchain; packaging a given
            // binary needs only dpkg-deb and gzip.
            if binary.is_none() {
                setup::run()?;
            }
            package::run(&package::Options {
                binary,
                out_dir,
                quick,
            })
            .map(drop)
        }
        Command::VmTest {
            kernel,
            tests,
            filter,
        } => {
            setup::run()?;
            vm::run(kernel.as_deref(), &vm::Selection { tests, filter })
        }
    }
}

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

/// What the VM part runs: both gateway paths, bulk and idle memory. Paced
/// low, because under emulation the load side tops out far below 3 Gbit/s.
const VM_ARGS: &[&str] = &[
    "--quick",
    "--peers",
    "gateway,gateway-ktls",
    "--only",
    "bulk,memory",
    "--seconds",
    "3",
    "--paced-gbps",
    "0.2",
    "--idle-connections",
    "2000",
];

pub fn run(quick: bool, vm_only: bool, extra: &[String]) -> anyhow::Result<()> {
    if !vm_only {
        host(quick, extra)?;
    }
    if quick {
        return Ok(());
    }
    // kTLS exists only in the VM: this machine's kernel has no CONFIG_TLS.
    let root = cmd::workspace_root();
    let report = crate::vm::bench(VM_ARGS)?;
    let results = root.join("bench/results");
    std::fs::create_dir_all(&results)?;
    std::fs::write(results.join("vm.md"), &report)?;
    // Into BENCHMARKS.md as one section, its headings a level down.
    let section: String = report
        .lines()
        .filter(|l| !l.starts_with("# "))
        .map(|l| {
            if l.starts_with('#') {
                format!("#{l}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let md = root.join("BENCHMARKS.md");
    let mut text = std::fs::read_to_string(&md).unwrap_or_default();
    if let Some(at) = text.find(VM_HEADING) {
        text.truncate(at);
    }
    text.push_str(&format!(
        "{VM_HEADING}\n\nThe gateway's kernel TLS + splice path against its userspace path, run by \
         `cargo xtask bench` inside QEMU (TCG, 2 vCPUs) on the kernel below, with release builds. \
         This machine has no KVM: under TCG every AES-NI and carry-less multiply instruction is \
         emulated in software, so AES-GCM dominates both paths' CPU and the ratio below says little \
         about the copies and syscalls splice saves. It shows both paths at size and the memory per \
         idle connection; the CPU ratio needs a host with kTLS or KVM.\n\n{section}"
    ));
    std::fs::write(&md, text)?;
    eprintln!(
        "xtask: VM results in {} and {}",
        results.join("vm.md").display(),
        md.display()
    );
    Ok(())
}

const VM_HEADING: &str = "\n## Kernel TLS in a VM";

fn host(quick: bool, extra: &[String]) -> anyhow::Result<()> {
    setup::debian_packages_without_starting_services(PEER_PACKAGES)?;
    // Release builds: the numbers are about optimised code.
    cmd::run(&mut cmd::build_release())?;
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

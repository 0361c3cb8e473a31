//! `cargo xtask setup`: install what is missing, say what it does, and do
//! nothing the second time.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::cmd;

/// Debian packages the tests and the demo drive: openssl (`s_client` as a new
/// user would try the gateway), iproute2 (network namespaces), nftables (a
/// DNAT rule in front of a port the remote guard protects), QEMU, a static
/// busybox, xz and binutils' `strip` for the VM kernels (kTLS tests), and protoc, which the
/// etcd client's build script needs to compile etcd's API (the gateway's
/// `[fleet]`): without it nothing builds.
const DEBIAN_PACKAGES: &[&str] = &[
    "protobuf-compiler",
    "openssl",
    "iproute2",
    "nftables",
    "qemu-system-x86",
    "busybox-static",
    "xz-utils",
    "binutils",
    // docs/rollout.md's commands, which tests/tests/rollout.rs runs.
    "jq",
    "curl",
    // Prometheus' Python client parses the gateway's /metrics in
    // tests/tests/metrics.rs; it is installed from PyPI into a venv.
    "python3",
    "python3-venv",
];

/// The LLVM major version of the nightly toolchain; bpf-linker must be built
/// against the same one that rustc emits bitcode for.
const LLVM_MAJOR: &str = "22";

pub fn run() -> anyhow::Result<()> {
    nightly_rust_src()?;
    bpf_linker()?;
    cargo_fuzz()?;
    debian_packages(DEBIAN_PACKAGES)?;
    // The fleet tests start their own etcd members on loopback; Debian's
    // package would also start one as a service on 2379, so not that.
    debian_packages_without_starting_services(&["etcd-server"])?;
    prometheus_parser()?;
    kubernetes_validate()?;
    node_and_npm()?;
    eprintln!("xtask: setup complete");
    Ok(())
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let installed = cmd::output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]));
    match installed {
        Some(list) if list.lines().any(|l| l.starts_with("rust-src")) => {
            eprintln!("xtask: nightly rust-src: present");
            Ok(())
        }
        Some(_) => cmd::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ])),
        None => cmd::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ])),
    }
}

fn bpf_linker() -> anyhow::Result<()> {
    if cmd::succeeds(Command::new("bpf-linker").arg("--version")) {
        eprintln!("xtask: bpf-linker: present");
        return Ok(());
    }
    // bpf-linker links LLVM dynamically; build it against the nightly
    // toolchain's own libLLVM so both speak the same bitcode.
    let sysroot = cmd::output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("nightly rustc not found (rustup toolchain install nightly)")?;
    let lib_dir = PathBuf::from(sysroot.trim()).join("lib");
    let libllvm = find_libllvm(&lib_dir)?;
    let prefix = tool_home().join(format!("llvm-{LLVM_MAJOR}"));
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    let link = prefix_lib.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)
        .with_context(|| format!("linking {} to {}", link.display(), libllvm.display()))?;
    eprintln!(
        "xtask: building bpf-linker against {} (about 2 minutes)",
        libllvm.display()
    );
    cmd::run(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--no-default-features",
                "--features",
                &format!("llvm-{LLVM_MAJOR}"),
            ])
            .arg("--force")
            .env("LLVM_PREFIX", &prefix)
            // The toolchain's libLLVM is not on the loader's path: point the
            // binary at it, or it fails to start outside `rustup run`.
            .env(
                "RUSTFLAGS",
                format!("-C link-arg=-Wl,-rpath,{}", lib_dir.display()),
            ),
    )?;
    if !cmd::succeeds(Command::new("bpf-linker").arg("--version")) {
        bail!("bpf-linker was installed but does not run: is ~/.cargo/bin on PATH?");
    }
    Ok(())
}

/// cargo-fuzz drives the fuzz targets (`cargo xtask fuzz`, and a short run
/// in `cargo xtask test`).
fn cargo_fuzz() -> anyhow::Result<()> {
    if cmd::succeeds(Command::new("cargo").args(["fuzz", "--version"])) {
        eprintln!("xtask: cargo-fuzz: present");
        return Ok(());
    }
    cmd::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}

/// Prometheus' own Python client (`prometheus_client.parser`), the oracle
/// tests/tests/metrics.rs parses a scrape with: in a venv of its own under
/// the tool home, since Debian's Python refuses `pip install` outside one.
fn prometheus_parser() -> anyhow::Result<()> {
    let venv = venv();
    let python = venv.join("bin/python3");
    let present =
        || cmd::succeeds(Command::new(&python).args(["-c", "import prometheus_client.parser"]));
    if present() {
        eprintln!("xtask: Prometheus' Python client: present");
        return Ok(());
    }
    make_venv(&venv)?;
    cmd::run(Command::new(&python).args(["-m", "pip", "install", "--quiet", "prometheus-client"]))?;
    if !present() {
        bail!(
            "prometheus-client was installed into {} but does not import",
            venv.display()
        );
    }
    Ok(())
}

/// The release of `kubernetes-validate` (PyPI) the tests pin: it carries
/// the Kubernetes JSON schemas (1.25 to 1.37) in the package, so it runs
/// offline once installed.
const KUBERNETES_VALIDATE: &str = "1.37.0";

/// `kubernetes-validate`, the schema check tests/tests/kubernetes.rs runs
/// on examples/kubernetes/, in the same venv as Prometheus' parser.
fn kubernetes_validate() -> anyhow::Result<()> {
    let venv = venv();
    let bin = kubernetes_validate_bin();
    // `--version` prints the bare number.
    let version = || cmd::output(Command::new(&bin).arg("--version"));
    if version().is_some_and(|v| v.trim() == KUBERNETES_VALIDATE) {
        eprintln!("xtask: kubernetes-validate {KUBERNETES_VALIDATE}: present");
        return Ok(());
    }
    make_venv(&venv)?;
    cmd::run(Command::new(venv.join("bin/python3")).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        &format!("kubernetes-validate=={KUBERNETES_VALIDATE}"),
    ]))?;
    match version() {
        Some(v) if v.trim() == KUBERNETES_VALIDATE => Ok(()),
        other => bail!(
            "kubernetes-validate {KUBERNETES_VALIDATE} was installed into {} but says {other:?}",
            venv.display()
        ),
    }
}

/// Where `cargo xtask setup` installs `kubernetes-validate`; `cargo xtask
/// test` hands it to the tests, which then must run it.
pub fn kubernetes_validate_bin() -> PathBuf {
    venv().join("bin/kubernetes-validate")
}

/// The venv of the Python tools the tests use as oracles (Debian's Python
/// refuses `pip install` outside one).
fn venv() -> PathBuf {
    tool_home().join("python")
}

fn make_venv(venv: &Path) -> anyhow::Result<()> {
    if venv.join("bin/python3").exists() {
        return Ok(());
    }
    cmd::run(Command::new("python3").args(["-m", "venv"]).arg(venv))
}

fn find_libllvm(lib_dir: &Path) -> anyhow::Result<PathBuf> {
    let prefix = format!("libLLVM.so.{LLVM_MAJOR}");
    let entries =
        std::fs::read_dir(lib_dir).with_context(|| format!("reading {}", lib_dir.display()))?;
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            return Ok(entry.path());
        }
    }
    bail!(
        "no {prefix}* in {}: the nightly toolchain's LLVM is not version {LLVM_MAJOR}",
        lib_dir.display()
    )
}

/// Where setup keeps what must outlive `cargo clean` (the LLVM prefix that the
/// installed bpf-linker was built against).
fn tool_home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
        .join(".cache/gateway-xtask")
}

/// node and npm for tests/tests/sso.rs, which installs `oidc-provider`
/// from npm and runs it as the test's OpenID Connect provider. Some
/// nodejs builds (NodeSource's) carry npm inside and conflict with
/// Debian's npm package, so npm is installed only when no `npm` runs.
fn node_and_npm() -> anyhow::Result<()> {
    debian_packages(&["nodejs"])?;
    if cmd::output(Command::new("npm").arg("--version")).is_none() {
        debian_packages(&["npm"])?;
    }
    Ok(())
}

/// Installs the Debian packages of `wanted` that are not installed yet.
pub fn debian_packages(wanted: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|p| {
            !cmd::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        eprintln!("xtask: Debian packages: present ({})", wanted.join(", "));
        return Ok(());
    }
    cmd::run(Command::new("apt-get").args(["update", "-qq"]))?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Like `debian_packages`, for packages that ship a service (nginx, HAProxy,
/// stunnel): the benchmark starts them itself, so their init scripts must not
/// start them on install. Debian's policy-rc.d hook says so for the length of
/// the install; one that was already there is left as it was.
pub fn debian_packages_without_starting_services(wanted: &[&str]) -> anyhow::Result<()> {
    const POLICY: &str = "/usr/sbin/policy-rc.d";
    let ours = !Path::new(POLICY).exists();
    if ours {
        std::fs::write(
            POLICY,
            "#!/bin/sh\n# written by cargo xtask for one apt-get install\nexit 101\n",
        )
        .with_context(|| format!("writing {POLICY}"))?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(POLICY, std::fs::Permissions::from_mode(0o755))?;
    }
    let r = debian_packages(wanted);
    if ours {
        let _ = std::fs::remove_file(POLICY);
    }
    r
}

//! `cargo xtask package`: the Debian package an operator installs,
//! `target/debian/gateway_<version>_<arch>.deb`, built with `dpkg-deb`:
//!
//! | path | what |
//! |---|---|
//! | `/usr/bin/gateway` | the binary (release build unless `--binary` names one) |
//! | `/usr/lib/systemd/system/gateway.service` | `examples/gateway.service` |
//! | `/usr/lib/systemd/system/gateway-issuer.service` | `examples/gateway-issuer.service` (not enabled: it needs `/etc/gateway/issuer.toml` and an SSO CA, docs/sso.md) |
//! | `/etc/gateway/gateway.toml` | `packaging/deb/gateway.toml`, a conffile |
//! | `/usr/share/man/man1/gateway.1.gz` | `gateway man` |
//! | `/usr/share/bash-completion/completions/gateway`, `/usr/share/zsh/vendor-completions/_gateway`, `/usr/share/fish/vendor_completions.d/gateway.fish` | `gateway completions …` |
//! | `/usr/share/doc/gateway/` | README.md, copyright |
//!
//! `postinst` creates the `gateway` and `gateway-issuer` system users
//! (`useradd --prefix $DPKG_ROOT`, so an install into another root leaves
//! this host alone).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::cmd;

pub struct Options {
    /// Package this binary instead of building a release one.
    pub binary: Option<PathBuf>,
    /// Where the .deb goes (default: target/debian).
    pub out_dir: Option<PathBuf>,
    /// gzip -1 instead of xz: for tests packaging a debug binary.
    pub quick: bool,
}

/// Builds the package and returns its path.
pub fn run(options: &Options) -> anyhow::Result<PathBuf> {
    let root = cmd::workspace_root();
    let binary = match &options.binary {
        Some(b) => b.clone(),
        None => {
            // No `-p`: the workspace's one feature resolution, as
            // `cmd::build_release` (another would rebuild half the tree).
            cmd::run(cmd::cargo().args(["build", "--release", "--bin", "gateway"]))?;
            root.join("target/release/gateway")
        }
    };
    let version = version(&binary)?;
    let arch = cmd::output(Command::new("dpkg").arg("--print-architecture"))
        .context("dpkg --print-architecture: is this Debian?")?
        .trim()
        .to_owned();
    let out_dir = options
        .out_dir
        .clone()
        .unwrap_or_else(|| root.join("target/debian"));
    let name = format!("gateway_{version}_{arch}");
    let stage = out_dir.join(&name);
    if stage.exists() {
        std::fs::remove_dir_all(&stage).with_context(|| format!("clearing {}", stage.display()))?;
    }

    let put = |rel: &str, bytes: &[u8], mode: u32| -> anyhow::Result<()> {
        let path = stage.join(rel);
        std::fs::create_dir_all(path.parent().expect("a path under the stage"))?;
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        set_mode(&path, mode)
    };
    let read = |rel: &str| -> anyhow::Result<Vec<u8>> {
        std::fs::read(root.join(rel)).with_context(|| format!("reading {rel}"))
    };
    let generated = |args: &[&str]| -> anyhow::Result<Vec<u8>> {
        let out = Command::new(&binary).args(args).output()?;
        if !out.status.success() {
            bail!(
                "{} {}: {}",
                binary.display(),
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out.stdout)
    };

    put("usr/bin/gateway", &std::fs::read(&binary)?, 0o755)?;
    put(
        "usr/lib/systemd/system/gateway.service",
        &read("examples/gateway.service")?,
        0o644,
    )?;
    put(
        "usr/lib/systemd/system/gateway-issuer.service",
        &read("examples/gateway-issuer.service")?,
        0o644,
    )?;
    put(
        "etc/gateway/gateway.toml",
        &read("packaging/deb/gateway.toml")?,
        0o644,
    )?;
    put(
        "usr/share/man/man1/gateway.1.gz",
        &gzip(&generated(&["man"])?)?,
        0o644,
    )?;
    put(
        "usr/share/bash-completion/completions/gateway",
        &generated(&["completions", "bash"])?,
        0o644,
    )?;
    put(
        "usr/share/zsh/vendor-completions/_gateway",
        &generated(&["completions", "zsh"])?,
        0o644,
    )?;
    put(
        "usr/share/fish/vendor_completions.d/gateway.fish",
        &generated(&["completions", "fish"])?,
        0o644,
    )?;
    put(
        "usr/share/doc/gateway/README.md",
        &read("README.md")?,
        0o644,
    )?;
    put(
        "usr/share/doc/gateway/copyright",
        COPYRIGHT.as_bytes(),
        0o644,
    )?;
    for script in ["postinst", "prerm", "postrm"] {
        put(
            &format!("DEBIAN/{script}"),
            &read(&format!("packaging/deb/{script}"))?,
            0o755,
        )?;
    }
    put("DEBIAN/conffiles", b"/etc/gateway/gateway.toml\n", 0o644)?;
    let installed_kib = du_kib(&stage)?;
    put(
        "DEBIAN/control",
        control(&version, &arch, installed_kib).as_bytes(),
        0o644,
    )?;

    let deb = out_dir.join(format!("{name}.deb"));
    let compression: &[&str] = if options.quick {
        &["-Zgzip", "-z1"]
    } else {
        &["-Zxz"]
    };
    cmd::run(
        Command::new("dpkg-deb")
            .arg("--root-owner-group")
            .args(compression)
            .arg("--build")
            .arg(&stage)
            .arg(&deb),
    )?;
    std::fs::remove_dir_all(&stage)?;
    eprintln!("xtask: built {}", deb.display());
    Ok(deb)
}

const COPYRIGHT: &str = "\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: gateway
License: MIT or Apache-2.0

Files: *
License: MIT or Apache-2.0
";

fn control(version: &str, arch: &str, installed_kib: u64) -> String {
    format!(
        "Package: gateway
Version: {version}
Architecture: {arch}
Maintainer: gateway developers <gateway@example.internal>
Installed-Size: {installed_kib}
Depends: libc6, passwd
Section: net
Priority: optional
Description: eBPF-accelerated L4 mTLS gateway
 The Zero Trust policy enforcement point in front of TCP services: clients
 prove who they are with a certificate from a private PKI, routes say which
 identities may pass, and only then do bytes reach the backend.
"
    )
}

/// The version the binary reports (`gateway --version`), which is the
/// workspace's: the package can never claim another.
fn version(binary: &Path) -> anyhow::Result<String> {
    let out = cmd::output(Command::new(binary).arg("--version"))
        .with_context(|| format!("{} --version", binary.display()))?;
    out.split_whitespace()
        .nth(1)
        .map(str::to_owned)
        .with_context(|| format!("unexpected --version output {out:?}"))
}

/// gzip -9n: no name or time in the header, so the package is reproducible.
fn gzip(bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut child = Command::new("gzip")
        .args(["-9n", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("gzip")?;
    child.stdin.take().expect("piped").write_all(bytes)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("gzip failed: {}", out.status);
    }
    Ok(out.stdout)
}

fn du_kib(dir: &Path) -> anyhow::Result<u64> {
    let out = cmd::output(
        Command::new("du")
            .args(["-sk", "--exclude=DEBIAN"])
            .arg(dir),
    )
    .context("du")?;
    out.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("du printed {out:?}"))
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

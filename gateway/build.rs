//! Builds the eBPF programs (gateway-ebpf) for the bpf target with aya-build and
//! puts the object in OUT_DIR, where `ebpf/` embeds it.

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    commit();
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    println!("cargo:rerun-if-env-changed=PATH");
    let skip =
        std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if !skip && which_bpf_linker().is_none() {
        // One clear `error:` line (cargo fails the build on it) instead of
        // aya-build's wall of linker errors or a backtrace.
        println!(
            "cargo::error=bpf-linker is not installed: run `cargo xtask setup` (or set AYA_BUILD_SKIP=1 to build without the eBPF programs)"
        );
        return Ok(());
    }
    if skip {
        // ebpf/ embeds the object with include_bytes!; give it an empty one and
        // let the loader say the programs were not built.
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("gateway");
        if !out.exists() {
            std::fs::write(&out, b"")?;
        }
        println!("cargo:rustc-cfg=gateway_ebpf_skipped");
    }
    println!("cargo::rustc-check-cfg=cfg(gateway_ebpf_skipped)");

    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "gateway-ebpf")
        .ok_or_else(|| anyhow!("gateway-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    let package = aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}

fn which_bpf_linker() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("bpf-linker"))
        .find(|p| p.is_file())
}

/// `GATEWAY_COMMIT` for `gateway_build_info`: the commit being built, or
/// "unknown" outside a git checkout (a source package, a tarball). Built
/// again when HEAD moves.
fn commit() {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]);
    // What moves HEAD: HEAD itself, the branch it names, packed refs. A
    // path that does not exist would make cargo run this every build.
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    for name in ["HEAD", "packed-refs"]
        .into_iter()
        .map(str::to_owned)
        .chain(branch)
    {
        if let Some(path) = git(&["rev-parse", "--path-format=absolute", "--git-path", &name])
            && std::path::Path::new(&path).exists()
        {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    println!(
        "cargo:rustc-env=GATEWAY_COMMIT={}",
        commit.as_deref().unwrap_or("unknown")
    );
}

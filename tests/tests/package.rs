//! The Debian package as an operator meets it: `cargo xtask package`, then
//! `dpkg -i` into a throwaway root (dpkg's own database in it; maintainer
//! scripts run against it, never this host's users), a PKI made with the
//! installed binary, `gateway check` on the installed config, completions
//! and the man page, and removal keeping the conffile.

use std::path::Path;
use std::process::{Command, Output};

use gateway_tests::*;

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A root with an empty dpkg database and just root in its user files.
fn throwaway_root(root: &Path) {
    for dir in ["etc", "var/lib/dpkg/info", "var/lib/dpkg/updates"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    for (file, line) in [
        ("etc/passwd", "root:x:0:0:root:/root:/bin/bash\n"),
        ("etc/group", "root:x:0:\n"),
        ("etc/shadow", "root:*:19000:0:99999:7:::\n"),
        ("etc/gshadow", "root:*::\n"),
    ] {
        std::fs::write(root.join(file), line).unwrap();
    }
}

fn dpkg(root: &Path, args: &[&str]) -> Output {
    Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        // Scripts run here against $DPKG_ROOT: a throwaway root has no
        // shell to chroot into. Dependencies (libc6, passwd) are this
        // host's, not in the root's empty database.
        .args([
            "--force-script-chrootless",
            "--force-depends",
            "--log=/dev/null",
        ])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn the_package_installs_and_its_config_checks() {
    if !is_root() || !have("dpkg-deb") || !have("useradd") {
        eprintln!("SKIP: needs root, dpkg-deb and useradd (a Debian host)");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let out_dir = work.path().join("out");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    ok(
        Command::new(cargo)
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .args(["run", "-q", "-p", "xtask", "--", "package", "--binary"])
            .arg(gateway_binary())
            .arg("--out-dir")
            .arg(&out_dir)
            .arg("--quick")
            .output()
            .unwrap(),
        "cargo xtask package",
    );
    let version = env!("CARGO_PKG_VERSION");
    let deb = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb");
    let name = deb.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with(&format!("gateway_{version}_")) && name.ends_with(".deb"),
        "{name}"
    );
    let conffiles = ok(
        Command::new("dpkg-deb")
            .args(["--info"])
            .arg(&deb)
            .arg("conffiles")
            .output()
            .unwrap(),
        "dpkg-deb --info",
    );
    assert_eq!(conffiles, "/etc/gateway/gateway.toml\n");

    let root = work.path().join("root");
    throwaway_root(&root);
    ok(dpkg(&root, &["-i", deb.to_str().unwrap()]), "dpkg -i");
    let status = ok(dpkg(&root, &["-s", "gateway"]), "dpkg -s");
    assert!(status.contains("Status: install ok installed"), "{status}");
    for file in [
        "usr/bin/gateway",
        "usr/lib/systemd/system/gateway.service",
        "usr/lib/systemd/system/gateway-issuer.service",
        "etc/gateway/gateway.toml",
        "usr/share/man/man1/gateway.1.gz",
        "usr/share/bash-completion/completions/gateway",
        "usr/share/zsh/vendor-completions/_gateway",
        "usr/share/fish/vendor_completions.d/gateway.fish",
    ] {
        assert!(root.join(file).is_file(), "{file} installed");
    }
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    let user = passwd
        .lines()
        .find(|l| l.starts_with("gateway:"))
        .unwrap_or_else(|| panic!("postinst made no gateway user:\n{passwd}"));
    assert!(user.ends_with(":/nonexistent:/usr/sbin/nologin"), "{user}");
    let uid: u32 = user.split(':').nth(2).unwrap().parse().unwrap();
    assert!(uid < 1000, "a system user: {user}");
    // The issuer's own user, apart from the gateway's (the SSO CA's key).
    let issuer_user = passwd
        .lines()
        .find(|l| l.starts_with("gateway-issuer:"))
        .unwrap_or_else(|| panic!("postinst made no gateway-issuer user:\n{passwd}"));
    assert!(
        issuer_user.ends_with(":/nonexistent:/usr/sbin/nologin"),
        "{issuer_user}"
    );
    assert_ne!(issuer_user.split(':').nth(2), user.split(':').nth(2));
    let host = std::fs::read_to_string("/etc/passwd").unwrap();
    assert!(
        !host.lines().any(|l| l == user),
        "the host's users are untouched"
    );

    // What the shipped config's header tells the operator to do first.
    let gateway = root.join("usr/bin/gateway");
    let pki = root.join("etc/gateway/pki");
    ok(
        Command::new(&gateway)
            .args(["pki", "init", "--dir"])
            .arg(&pki)
            .output()
            .unwrap(),
        "gateway pki init",
    );
    ok(
        Command::new(&gateway)
            .args(["pki", "issue", "server", "--dir"])
            .arg(&pki)
            .args(["--name", "gateway", "--san", "dns:gateway.example.internal"])
            .output()
            .unwrap(),
        "gateway pki issue",
    );
    let check = ok(
        Command::new(&gateway)
            .args(["check", "--config"])
            .arg(root.join("etc/gateway/gateway.toml"))
            .output()
            .unwrap(),
        "gateway check on the installed config",
    );
    assert!(
        check.contains("listener \"edge\" on 0.0.0.0:443: 1 route(s): default")
            && check.trim_end().ends_with("gateway.toml: OK"),
        "{check}"
    );

    // Completion as bash runs it, and the man page as man shows it.
    let completion = root.join("usr/share/bash-completion/completions/gateway");
    let words = ok(
        Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source {}; COMP_WORDS=(gateway ch); COMP_CWORD=1; _gateway gateway ch gateway; \
                 echo \"${{COMPREPLY[*]}}\"",
                completion.display()
            ))
            .output()
            .unwrap(),
        "bash completion",
    );
    assert_eq!(words.trim(), "check");
    if have("man") {
        let page = ok(
            Command::new("man")
                .arg("-l")
                .arg(root.join("usr/share/man/man1/gateway.1.gz"))
                .env("MANPAGER", "cat")
                .env("MANWIDTH", "80")
                .output()
                .unwrap(),
            "man -l",
        );
        assert!(
            page.contains("gateway - eBPF-accelerated L4 mTLS gateway"),
            "{page}"
        );
    }

    // An operator's edit survives removal; purge takes it.
    let config = root.join("etc/gateway/gateway.toml");
    let edited = std::fs::read_to_string(&config).unwrap() + "# edited\n";
    std::fs::write(&config, &edited).unwrap();
    ok(dpkg(&root, &["-r", "gateway"]), "dpkg -r");
    assert!(!gateway.exists(), "the binary goes");
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        edited,
        "the conffile stays"
    );
    ok(dpkg(&root, &["--purge", "gateway"]), "dpkg --purge");
    assert!(!config.exists(), "purge removes the conffile");
}

//! `cargo xtask vm-test`: the tests that need kernel features this machine
//! lacks (kTLS) run on the kernels users run — Debian's cloud kernels — in
//! QEMU (TCG: no KVM here), with results coming back over a serial port.
//!
//! Everything is fetched through apt with private lists (the host's apt
//! configuration is left alone) and cached under `target/vm/`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::cmd;

const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// A kernel to boot: where apt finds it.
struct KernelSource {
    label: &'static str,
    /// QEMU's accelerator setting for this kernel.
    accel: &'static str,
    /// Booted by `cargo xtask test` and a bare `vm-test`.
    by_default: bool,
    suites: &'static [(&'static str, &'static str)],
}

const KERNELS: &[KernelSource] = &[
    KernelSource {
        label: "debian-6.1",
        accel: "tcg,thread=multi",
        by_default: true,
        suites: &[
            ("http://deb.debian.org/debian", "bookworm"),
            ("http://deb.debian.org/debian-security", "bookworm-security"),
        ],
    },
    KernelSource {
        label: "debian-6.12-backports",
        accel: "tcg,thread=multi",
        by_default: true,
        suites: &[("http://deb.debian.org/debian", "bookworm-backports")],
    },
];

/// Integration test binaries (tests/tests/*.rs) that run inside the VM.
const VM_TESTS: &[&str] = &[
    "ktls",
    "ktls_record_limit",
    "handoff",
    "ebpf",
    "guard",
    "local_guard_attacks",
    "remote_guard",
    "remote_guard_attacks",
    "block_list",
];

/// Modules to load, in this order, with whatever they depend on first. The
/// crypto API looks algorithms up by name at TLS_TX/TLS_RX time and cannot
/// load modules itself here (no modprobe in the initramfs), so every AEAD
/// piece is loaded up front. Built-in ones simply have no file.
const MODULES: &[&str] = &[
    "crypto_null",
    "gf128mul",
    "cryptd",
    "crypto_simd",
    "aesni_intel",
    "ghash_generic",
    "ghash_clmulni_intel",
    "ctr",
    "gcm",
    "chacha_generic",
    "chacha_x86_64",
    "poly1305_generic",
    "poly1305_x86_64",
    "libchacha20poly1305",
    "chacha20poly1305",
    "tls",
    "veth",
    "sch_ingress",
    "cls_bpf",
    // The guard's attack tests: a tun device, sock_diag (connections older
    // than the guard), and nftables DNAT in front of a protected port.
    "tun",
    "inet_diag",
    "tcp_diag",
    "udp_diag",
    "nft_chain_nat",
    "nft_nat",
];

/// `max` offers AES-NI and PCLMUL for the kernel's AES-GCM; LA57 is off
/// because 6.12 turns 5-level paging on when offered, which TCG emulates
/// slowly and QEMU 7.2 got wrong (a fault at boot). AVX is off because
/// QEMU 10.0's TCG reads 32 bytes for VINSERTx128's 16-byte memory operand
/// (fixed upstream in feea87cd6b, not in Debian's 10.0.2): 6.1's
/// poly1305_blocks_avx2 then faults on the page after a record that ends
/// near a page boundary and the guest kernel panics. Without AVX the kernel
/// and the test binaries take the SSE/AES-NI paths, still the kernel's TLS.
const QEMU_CPU: &str = "max,la57=off,avx=off,avx2=off";

/// Booting, running every test and powering off must fit in this.
const VM_TIMEOUT: Duration = Duration::from_secs(900);

/// Which of the VM tests to run: for a quick loop on one change.
#[derive(Debug, Default)]
pub struct Selection {
    /// Test binaries (all of `VM_TESTS` when empty).
    pub tests: Vec<String>,
    /// Passed to each test binary as its name filter.
    pub filter: Option<String>,
}

impl Selection {
    fn binaries(&self) -> anyhow::Result<Vec<&'static str>> {
        if self.tests.is_empty() {
            return Ok(VM_TESTS.to_vec());
        }
        self.tests
            .iter()
            .map(|t| {
                VM_TESTS
                    .iter()
                    .copied()
                    .find(|v| v == t)
                    .ok_or_else(|| anyhow::anyhow!("no VM test {t:?}; choose from {VM_TESTS:?}"))
            })
            .collect()
    }
}

/// `only`: boot just the kernel with this label (all when None).
pub fn run(only: Option<&str>, selection: &Selection) -> anyhow::Result<()> {
    let busybox = PathBuf::from("/bin/busybox");
    if !busybox.is_file() {
        bail!(
            "{} missing: cargo xtask setup installs busybox-static",
            busybox.display()
        );
    }
    let binaries = selection.binaries()?;
    let (tests, gateway) = build_vm_tests(&binaries)?;
    let chosen: Vec<&KernelSource> = KERNELS
        .iter()
        .filter(|k| only.map_or(k.by_default, |o| o == k.label))
        .collect();
    if chosen.is_empty() {
        let labels: Vec<&str> = KERNELS.iter().map(|k| k.label).collect();
        bail!("no kernel {only:?}; choose one of {labels:?}");
    }
    let labels: Vec<&str> = chosen.iter().map(|k| k.label).collect();
    let qemu = fetch_qemu()?;
    // One kernel after the other: booted side by side (2 vCPUs each on 2
    // cores) they took 408 s and 427 s against 232 s and 228 s alone, and
    // timing-bound guard tests failed under the emulation's slowdown.
    let mut failures = Vec::new();
    for source in chosen {
        let kernel = fetch_kernel(source)?;
        let initrd = build_initramfs(
            &kernel,
            &busybox,
            &gateway,
            Payload::Tests(&tests, selection.filter.as_deref()),
        )?;
        if let Err(e) =
            boot(&qemu, &kernel, &initrd).and_then(|out| check_tests(&kernel, &out, tests.len()))
        {
            eprintln!("xtask: vm {}: {e:#}", kernel.label);
            failures.push(format!("{}: {e:#}", kernel.label));
        }
    }
    if !failures.is_empty() {
        bail!("VM tests failed on {}", failures.join("; "));
    }
    eprintln!("xtask: VM tests passed on {}", labels.join(", "));
    Ok(())
}

fn vm_dir() -> PathBuf {
    cmd::workspace_root().join("target/vm")
}

/// The VM's test binaries by name, and the gateway binary: the very
/// artifacts the host's `cargo test` and the black-box tests use, so a
/// test run compiles the workspace once. They are dynamically linked; the
/// initramfs carries the host's loader and libraries for them
/// (`pack_stripped`), as it does for `ip`.
fn build_vm_tests(binaries: &[&str]) -> anyhow::Result<(Vec<(String, PathBuf)>, PathBuf)> {
    let found: Vec<(String, PathBuf)> = crate::binaries::build()?
        .into_iter()
        .filter(|b| b.kind == "test" && binaries.contains(&b.name.as_str()))
        .map(|b| (b.name, b.exe))
        .collect();
    if found.len() != binaries.len() {
        bail!("expected test binaries {binaries:?}, cargo built {found:?}");
    }
    // Tests that drive the real binary find it through GATEWAY_BIN: the
    // one `cargo xtask test` builds first for the host's black-box tests.
    cmd::run(&mut cmd::build_gateway())?;
    let gateway = cmd::workspace_root().join("target/debug/gateway");
    Ok((found, gateway))
}

/// Statically linked release binaries for the VM benchmark (no libraries
/// to ship, and the same binaries the host bench measured before).
const STATIC_RUSTFLAGS: &str = "-C target-feature=+crt-static -C debuginfo=0";

struct Kernel {
    label: &'static str,
    accel: &'static str,
    /// Package name, e.g. linux-image-6.1.0-56-cloud-amd64.
    package: String,
    vmlinuz: PathBuf,
    /// `lib/modules/<version>/kernel` of the unpacked package.
    modules: PathBuf,
}

/// apt with private state under `dir/apt`: its own sources, lists and
/// cache, so the host's apt configuration is never touched.
struct Apt {
    opts: Vec<String>,
}

impl Apt {
    fn new(dir: &Path, suites: &[(&str, &str)]) -> anyhow::Result<Apt> {
        let apt = dir.join("apt");
        for sub in ["lists/partial", "cache/archives/partial"] {
            std::fs::create_dir_all(apt.join(sub))?;
        }
        let mut list = String::new();
        for (uri, suite) in suites {
            let _ = writeln!(list, "deb [signed-by={KEYRING}] {uri} {suite} main");
        }
        std::fs::write(apt.join("sources.list"), list)?;
        let opts = [
            format!(
                "Dir::Etc::SourceList={}",
                apt.join("sources.list").display()
            ),
            "Dir::Etc::SourceParts=/dev/null".into(),
            format!("Dir::State::Lists={}", apt.join("lists").display()),
            format!("Dir::Cache={}", apt.join("cache").display()),
            "Dir::State::Status=/dev/null".into(),
            "APT::Sandbox::User=root".into(),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_owned(), o])
        .collect();
        Ok(Apt { opts })
    }

    fn update(&self) -> anyhow::Result<()> {
        cmd::run(
            Command::new("apt-get")
                .args(&self.opts)
                .args(["update", "-qq"]),
        )
    }

    /// What `apt-cache` prints about `args`.
    fn cache(&self, args: &[&str]) -> anyhow::Result<String> {
        cmd::output(Command::new("apt-cache").args(&self.opts).args(args))
            .with_context(|| format!("apt-cache {}", args.join(" ")))
    }

    /// Downloads `packages` into a fresh `debs` and unpacks them all into a
    /// fresh `root`.
    fn download_and_unpack(
        &self,
        packages: &[&str],
        debs: &Path,
        root: &Path,
    ) -> anyhow::Result<()> {
        let _ = std::fs::remove_dir_all(debs);
        std::fs::create_dir_all(debs)?;
        cmd::run(
            Command::new("apt-get")
                .args(&self.opts)
                .args(["download", "-q"])
                .args(packages)
                .current_dir(debs),
        )?;
        let _ = std::fs::remove_dir_all(root);
        let mut unpacked = 0;
        for deb in std::fs::read_dir(debs)?.flatten().map(|e| e.path()) {
            if deb.extension().is_some_and(|e| e == "deb") {
                cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(root))?;
                unpacked += 1;
            }
        }
        if unpacked != packages.len() {
            bail!(
                "apt-get download left {unpacked} .deb files for {} packages",
                packages.len()
            );
        }
        Ok(())
    }
}

/// What to use when apt cannot answer: the cached copy, if any, said aloud.
fn resolved_or_cached(
    what: &str,
    resolved: anyhow::Result<String>,
    cached: Option<&str>,
) -> anyhow::Result<String> {
    match (resolved, cached) {
        (Ok(v), _) => Ok(v),
        (Err(e), Some(c)) => {
            eprintln!("xtask: vm {what}: apt failed ({e:#}); using cached {c}");
            Ok(c.to_owned())
        }
        (Err(e), None) => Err(e),
    }
}

/// Resolves the newest cloud kernel of a suite, downloads and unpacks it
/// (once per version), with apt pointed at private lists under target/vm.
fn fetch_kernel(source: &KernelSource) -> anyhow::Result<Kernel> {
    let dir = vm_dir().join(source.label);
    let apt = Apt::new(&dir, source.suites)?;
    let cached = std::fs::read_to_string(dir.join("package")).ok();
    let package = resolved_or_cached(
        source.label,
        apt.update().and_then(|()| cloud_kernel_package(&apt)),
        cached.as_deref(),
    )?;
    let root = dir.join("root");
    if cached.as_deref() != Some(package.as_str()) || !root.join("boot").is_dir() {
        apt.download_and_unpack(&[&package], &dir.join("debs"), &root)?;
        std::fs::write(dir.join("package"), &package)?;
    }
    let vmlinuz = std::fs::read_dir(root.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("no vmlinuz in the kernel package")?;
    let version = vmlinuz
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_owned();
    Ok(Kernel {
        label: source.label,
        accel: source.accel,
        package,
        vmlinuz,
        modules: root.join("lib/modules").join(version).join("kernel"),
    })
}

fn cloud_kernel_package(apt: &Apt) -> anyhow::Result<String> {
    apt.cache(&["depends", "linux-image-cloud-amd64"])?
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .filter(|p| p.starts_with("linux-image-"))
        .map(str::to_owned)
        .context("linux-image-cloud-amd64 depends on no linux-image package")
}

/// The QEMU the VMs boot in: Debian 12's own (7.2) runs 6.12 kernels into
/// random crashes under TCG (double faults with EFLAGS holding garbage
/// right after a gs-prefixed cmpxchg16b in SLUB, list corruption), so the
/// emulator comes from bookworm-backports (10.0), which boots both kernels
/// cleanly. Only the emulator and its firmware are unpacked under
/// target/vm/qemu; the shared libraries it links are those Debian's
/// qemu-system-x86 (installed by setup) already brought in.
struct Qemu {
    binary: PathBuf,
    /// Firmware directories (`-L`): SeaBIOS and QEMU's option ROMs.
    firmware: Vec<PathBuf>,
}

const QEMU_SUITE: (&str, &str) = ("http://deb.debian.org/debian", "bookworm-backports");
const QEMU_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-system-common",
    "qemu-system-data",
    "seabios",
];

fn fetch_qemu() -> anyhow::Result<Qemu> {
    let root = fetch_backports(
        "qemu",
        QEMU_PACKAGES,
        Path::new("usr/bin/qemu-system-x86_64"),
    )?;
    let binary = root.join("usr/bin/qemu-system-x86_64");
    let qemu = Qemu {
        binary,
        firmware: vec![root.join("usr/share/qemu"), root.join("usr/share/seabios")],
    };
    let reported = cmd::output(Command::new(&qemu.binary).arg("--version")).with_context(|| {
        format!(
            "{} does not run (its libraries come with Debian's qemu-system-x86: cargo xtask setup)",
            qemu.binary.display()
        )
    })?;
    eprintln!(
        "xtask: vm: {}",
        reported.lines().next().unwrap_or_default().trim()
    );
    Ok(qemu)
}

/// `packages` from bookworm-backports, unpacked under target/vm/NAME/root
/// (again only when apt has a newer version of the first, or `binary` is
/// missing); the root. Offline, the cached copy serves.
fn fetch_backports(name: &str, packages: &[&str], binary: &Path) -> anyhow::Result<PathBuf> {
    let dir = vm_dir().join(name);
    let apt = Apt::new(&dir, &[QEMU_SUITE])?;
    let cached = std::fs::read_to_string(dir.join("version")).ok();
    let first = packages.first().context("no package to fetch")?;
    let version = resolved_or_cached(
        name,
        apt.update().and_then(|()| {
            apt.cache(&["show", "--no-all-versions", first])?
                .lines()
                .find_map(|l| l.strip_prefix("Version: "))
                .map(str::to_owned)
                .with_context(|| format!("apt knows no {first} in bookworm-backports"))
        }),
        cached.as_deref(),
    )?;
    let root = dir.join("root");
    if cached.as_deref() != Some(version.as_str()) || !root.join(binary).is_file() {
        apt.download_and_unpack(packages, &dir.join("debs"), &root)?;
        std::fs::write(dir.join("version"), &version)?;
    }
    Ok(root)
}

/// `systemd-analyze` from bookworm-backports' systemd (254): Debian 12's
/// own (252) does not know `Type=notify-reload`, so it cannot verify the
/// shipped unit. Unpacked under target/vm/systemd with its own libraries
/// (libsystemd-shared, libsystemd0); the rest come from the host. Returns a wrapper
/// script that runs it, for tests/tests/systemd.rs (`SYSTEMD_ANALYZE`).
pub fn fetch_systemd_analyze() -> anyhow::Result<PathBuf> {
    let root = fetch_backports(
        "systemd",
        &["systemd", "libsystemd-shared", "libsystemd0"],
        Path::new("usr/bin/systemd-analyze"),
    )?;
    let binary = root.join("usr/bin/systemd-analyze");
    let wrapper = vm_dir().join("systemd").join("systemd-analyze");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nLD_LIBRARY_PATH={private}:{lib} exec {binary} \"$@\"\n",
            private = root.join("usr/lib/x86_64-linux-gnu/systemd").display(),
            lib = root.join("usr/lib/x86_64-linux-gnu").display(),
            binary = binary.display()
        ),
    )?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    }
    let reported = cmd::output(Command::new(&wrapper).arg("--version"))
        .with_context(|| format!("{} does not run", wrapper.display()))?;
    eprintln!(
        "xtask: {}",
        reported.lines().next().unwrap_or_default().trim()
    );
    Ok(wrapper)
}

/// Module files by module name (dashes and underscores are the same to the kernel).
fn module_index(root: &Path) -> std::collections::HashMap<String, PathBuf> {
    let mut index = std::collections::HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name
                .strip_suffix(".ko")
                .or_else(|| name.strip_suffix(".ko.xz"))
                .or_else(|| name.strip_suffix(".ko.zst"))
            {
                index.insert(stem.replace('-', "_"), path);
            }
        }
    }
    index
}

/// A module's bytes, decompressed (busybox insmod takes plain ELF).
fn module_bytes(path: &Path) -> anyhow::Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else {
        None
    };
    match tool {
        None => Ok(std::fs::read(path)?),
        Some(tool) => {
            let out = Command::new(tool)
                .args(["-dc"])
                .arg(path)
                .output()
                .with_context(|| format!("{tool} -dc {name}"))?;
            if !out.status.success() {
                bail!("{tool} -dc {name} failed");
            }
            Ok(out.stdout)
        }
    }
}

/// The `depends=` entry of a module's .modinfo section.
fn module_depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    ko.windows(key.len() + 1)
        .position(|w| w[0] == 0 && &w[1..] == key)
        .map(|i| {
            let start = i + 1 + key.len();
            let end = ko[start..]
                .iter()
                .position(|&b| b == 0)
                .map_or(ko.len(), |n| start + n);
            String::from_utf8_lossy(&ko[start..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.replace('-', "_"))
                .collect()
        })
        .unwrap_or_default()
}

/// `MODULES` and their dependencies, dependencies first, as (name, bytes).
fn modules_in_load_order(kernel: &Kernel) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let index = module_index(&kernel.modules);
    let mut ordered: Vec<(String, Vec<u8>)> = Vec::new();
    fn visit(
        name: &str,
        index: &std::collections::HashMap<String, PathBuf>,
        ordered: &mut Vec<(String, Vec<u8>)>,
        depth: usize,
    ) -> anyhow::Result<()> {
        if depth > 16 || ordered.iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        let Some(path) = index.get(name) else {
            return Ok(()); // built in
        };
        let bytes = module_bytes(path)?;
        for dep in module_depends(&bytes) {
            visit(&dep, index, ordered, depth + 1)?;
        }
        ordered.push((name.to_owned(), bytes));
        Ok(())
    }
    for m in MODULES {
        visit(m, &index, &mut ordered, 0)?;
    }
    if !ordered.iter().any(|(n, _)| n == "tls") && index.contains_key("tls") {
        bail!("tls module found but not packed");
    }
    Ok(ordered)
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /root
/bin/busybox mount -t devtmpfs dev /dev
exec >/dev/ttyS1 2>&1
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/bin HOME=/root TMPDIR=/tmp RUST_BACKTRACE=1
export GATEWAY_TEST_REQUIRE_KERNEL_FEATURES=1 GATEWAY_BIN=/bin/gateway
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs tmp /tmp
mkdir -p /run /var && mount -t tmpfs run /run && ln -s /run /var/run
mkdir -p /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup
ip link set lo up
echo "GATEWAY-VM: kernel $(uname -r)"
for m in $(cat /modules/order); do
  insmod /modules/$m.ko || echo "GATEWAY-VM: insmod $m failed"
done
echo "GATEWAY-VM: tcp_available_ulp: $(cat /proc/sys/net/ipv4/tcp_available_ulp)"
if [ -x /bench/run ]; then
  /bench/run
  echo "GATEWAY-VM: exit bench $?"
else
  for t in $(cat /tests/order); do
    echo "GATEWAY-VM: run $t"
    /tests/$t --test-threads=1 $(cat /tests/filter 2>/dev/null)
    echo "GATEWAY-VM: exit $t $?"
  done
fi
echo "GATEWAY-VM: end"
sync
poweroff -f
"#;

/// iproute2's `ip`: busybox's has no `netns`, which the three-host guard
/// tests need. It is dynamically linked, so its libraries come along.
const IPROUTE2: &str = "/usr/sbin/ip";

/// nftables' `nft`, for the remote guard's DNAT test (packed when the host
/// has it; the test says so when it is missing).
const NFT: &str = "/usr/sbin/nft";

/// Packs the host's `binary` at `at`, with the dynamic loader and every
/// library `ldd` names, at the paths the loader looks for them.
fn pack_with_libraries(cpio: &mut Cpio, binary: &Path, at: &str) -> anyhow::Result<()> {
    let ldd = cmd::output(Command::new("ldd").arg(binary)).with_context(|| {
        format!(
            "ldd {} (cargo xtask setup installs iproute2)",
            binary.display()
        )
    })?;
    let libraries: Vec<&str> = ldd
        .lines()
        .filter_map(|l| {
            // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then_some(path)
        })
        .collect();
    for library in libraries {
        let relative = library.trim_start_matches('/');
        let mut dir = String::new();
        for part in Path::new(relative)
            .parent()
            .into_iter()
            .flat_map(Path::components)
        {
            if !dir.is_empty() {
                dir.push('/');
            }
            dir.push_str(&part.as_os_str().to_string_lossy());
            cpio.dir_once(&dir);
        }
        // Binaries packed one after another share libraries: once is enough.
        if cpio.files.insert(relative.to_owned()) {
            cpio.file(
                relative,
                &std::fs::read(library).with_context(|| library.to_owned())?,
                0o755,
            );
        }
    }
    cpio.dir_once("usr");
    cpio.dir_once("usr/sbin");
    cpio.file(
        at,
        &std::fs::read(binary).with_context(|| binary.display().to_string())?,
        0o755,
    );
    Ok(())
}

/// Packs a host-built binary like `pack_with_libraries`, without its debug
/// sections: the test binaries carry line tables that would make the
/// initramfs, unpacked into the VM's memory, a third larger. Symbols stay,
/// so a panic's backtrace still names functions.
fn pack_stripped(cpio: &mut Cpio, binary: &Path, at: &str) -> anyhow::Result<()> {
    let dir = vm_dir().join("stripped");
    std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
    let stripped = dir.join(at.replace('/', "-"));
    cmd::run(
        Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&stripped)
            .arg(binary),
    )
    .context("strip (binutils)")?;
    pack_with_libraries(cpio, &stripped, at)
}

/// What the VM runs: the test binaries, or the benchmark.
enum Payload<'a> {
    /// Test binaries, and a name filter for each.
    Tests(&'a [(String, PathBuf)], Option<&'a str>),
    /// The benchmark binary and the arguments of its `run`.
    Bench(&'a Path, &'a [&'a str]),
}

fn build_initramfs(
    kernel: &Kernel,
    busybox: &Path,
    gateway: &Path,
    payload: Payload<'_>,
) -> anyhow::Result<PathBuf> {
    let mut cpio = Cpio::default();
    for dir in [
        "bin", "dev", "proc", "sys", "tmp", "root", "modules", "tests", "bench",
    ] {
        cpio.dir(dir);
    }
    cpio.file("bin/busybox", &std::fs::read(busybox)?, 0o755);
    pack_with_libraries(&mut cpio, Path::new(IPROUTE2), "usr/sbin/ip")?;
    if Path::new(NFT).is_file() {
        pack_with_libraries(&mut cpio, Path::new(NFT), "usr/sbin/nft")?;
    }
    cpio.file("init", INIT.as_bytes(), 0o755);
    let modules = modules_in_load_order(kernel)?;
    let mut order = String::new();
    for (name, bytes) in &modules {
        cpio.file(&format!("modules/{name}.ko"), bytes, 0o644);
        let _ = writeln!(order, "{name}");
    }
    cpio.file("modules/order", order.as_bytes(), 0o644);
    let tests = match payload {
        Payload::Tests(tests, filter) => {
            pack_stripped(&mut cpio, gateway, "bin/gateway")?;
            if let Some(f) = filter {
                if f.chars()
                    .any(|c| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                {
                    bail!("--filter takes a test name or part of one, not {f:?}");
                }
                cpio.file("tests/filter", f.as_bytes(), 0o644);
            }
            tests
        }
        Payload::Bench(bench, args) => {
            // Static release binaries: nothing to ship beside them.
            cpio.file(
                "bin/gateway",
                &std::fs::read(gateway).with_context(|| gateway.display().to_string())?,
                0o755,
            );
            cpio.file(
                "bin/gateway-bench",
                &std::fs::read(bench).with_context(|| bench.display().to_string())?,
                0o755,
            );
            let script = format!(
                "#!/bin/sh\n/bin/gateway-bench run --gateway /bin/gateway --out /tmp/bench {}\nrc=$?\n\
                 echo {BENCH_BEGIN}\ncat /tmp/bench/BENCHMARKS.md\necho {BENCH_END}\nexit $rc\n",
                args.join(" ")
            );
            cpio.file("bench/run", script.as_bytes(), 0o755);
            &[][..]
        }
    };
    let mut order = String::new();
    for (name, path) in tests {
        pack_stripped(&mut cpio, path, &format!("tests/{name}"))?;
        let _ = writeln!(order, "{name}");
    }
    cpio.file("tests/order", order.as_bytes(), 0o644);
    let path = vm_dir().join(kernel.label).join("initramfs.cpio");
    std::fs::write(&path, cpio.finish())?;
    eprintln!(
        "xtask: vm {}: {} with {} modules and {} test binaries",
        kernel.label,
        kernel.package,
        modules.len(),
        tests.len()
    );
    Ok(path)
}

/// The "newc" cpio format the kernel unpacks as its initramfs.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
    dirs: std::collections::HashSet<String>,
    /// Shared libraries packed so far.
    files: std::collections::HashSet<String>,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let name_len = name.len() + 1;
        let _ = write!(
            HexSink(&mut self.out),
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name_len,
            0
        );
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    /// A directory, unless it is already in the archive.
    fn dir_once(&mut self, name: &str) {
        if !self.dirs.contains(name) {
            self.dir(name);
        }
    }

    fn dir(&mut self, name: &str) {
        self.dirs.insert(name.to_owned());
        self.entry(name, 0o040_755, &[]);
    }

    fn file(&mut self, name: &str, data: &[u8], perm: u32) {
        self.entry(name, 0o100_000 | perm, data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

struct HexSink<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for HexSink<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Boots the kernel with the initramfs and returns what the VM printed on
/// its result port.
fn boot(qemu: &Qemu, kernel: &Kernel, initrd: &Path) -> anyhow::Result<String> {
    let dir = vm_dir().join(kernel.label);
    let console = dir.join("console.log");
    let results = dir.join("results.log");
    let _ = std::fs::remove_file(&results);
    let mut command = Command::new(&qemu.binary);
    for dir in &qemu.firmware {
        command.arg("-L").arg(dir);
    }
    command
        .args([
            "-accel",
            kernel.accel,
            "-cpu",
            QEMU_CPU,
            "-smp",
            "2",
            "-m",
            "2048",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 oops=panic rdinit=/init"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", results.display()));
    eprintln!(
        "xtask: vm {}: booting {} (QEMU TCG, 2 vCPUs)",
        kernel.label, kernel.package
    );
    let started = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", qemu.binary.display()))?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > VM_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let output = std::fs::read_to_string(&results)
        .unwrap_or_default()
        .replace("\r\n", "\n");
    let block: String = output
        .lines()
        .map(|line| format!("[vm {}] {line}\n", kernel.label))
        .collect();
    eprint!("{block}");
    let elapsed = started.elapsed().as_secs();
    let Some(status) = status else {
        bail!(
            "timed out after {}s (console: {})",
            VM_TIMEOUT.as_secs(),
            console.display()
        );
    };
    if !output.contains("GATEWAY-VM: end") {
        let tail: Vec<String> = std::fs::read_to_string(&console)
            .unwrap_or_default()
            .lines()
            .rev()
            .take(20)
            .map(str::to_owned)
            .collect();
        bail!(
            "the VM stopped before the tests finished ({status}); console tail:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    eprintln!("xtask: vm {}: finished in {elapsed}s", kernel.label);
    Ok(output)
}

/// Every test binary ran and passed.
fn check_tests(kernel: &Kernel, output: &str, expected: usize) -> anyhow::Result<()> {
    let mut failed = Vec::new();
    for line in output.lines() {
        if let Some(rest) = line.strip_prefix("GATEWAY-VM: exit ") {
            let mut it = rest.split_whitespace();
            let (name, code) = (it.next().unwrap_or("?"), it.next().unwrap_or("?"));
            if code != "0" {
                failed.push(format!("{name} (exit {code})"));
            }
        }
        if line.starts_with("GATEWAY-VM: insmod") {
            eprintln!("xtask: vm {}: {line}", kernel.label);
        }
    }
    let ran = output.matches("GATEWAY-VM: exit ").count();
    if ran != expected {
        bail!("{ran} of {expected} test binaries ran");
    }
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    eprintln!("xtask: vm {}: all {ran} test binaries passed", kernel.label);
    Ok(())
}

const BENCH_BEGIN: &str = "GATEWAY-BENCH-BEGIN";
const BENCH_END: &str = "GATEWAY-BENCH-END";

/// The benchmark's kTLS part: the gateway with `offload = "kernel"` against
/// `"userspace"` on Debian's 6.1 cloud kernel, release builds, statically
/// linked. Returns the markdown report the VM printed.
pub fn bench(args: &[&str]) -> anyhow::Result<String> {
    let busybox = PathBuf::from("/bin/busybox");
    let target = "x86_64-unknown-linux-gnu";
    cmd::run(
        cmd::cargo()
            .args([
                "build",
                "--release",
                "--package",
                "gateway",
                "--package",
                "gateway-bench",
            ])
            .args(["--bins", "--target", target])
            .env(
                "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
                STATIC_RUSTFLAGS,
            ),
    )?;
    let release = cmd::workspace_root()
        .join("target")
        .join(target)
        .join("release");
    let source = KERNELS
        .iter()
        .find(|k| k.by_default)
        .context("no default VM kernel")?;
    let kernel = fetch_kernel(source)?;
    let initrd = build_initramfs(
        &kernel,
        &busybox,
        &release.join("gateway"),
        Payload::Bench(&release.join("gateway-bench"), args),
    )?;
    let output = boot(&fetch_qemu()?, &kernel, &initrd)?;
    let report = output
        .split_once(BENCH_BEGIN)
        .and_then(|(_, rest)| rest.split_once(BENCH_END))
        .map(|(md, _)| md.trim().to_owned())
        .context("the VM printed no benchmark report")?;
    if !output.contains("GATEWAY-VM: exit bench 0") {
        bail!("the benchmark failed in the VM (its report and errors are above)");
    }
    Ok(format!(
        "Kernel: {} ({})\n\n{report}\n",
        kernel.package, kernel.label
    ))
}

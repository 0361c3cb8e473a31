//! The only module that talks to the kernel's BPF side (through aya).
//!
//! For now it loads the `connect4` program and attaches it to a cgroup v2
//! directory, and reads its counters; the guard (backend-only reachability)
//! builds its maps and refusal logic on this.

use std::path::{Path, PathBuf};

use aya::Ebpf;
use aya::maps::PerCpuArray;
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use gateway_common::GuardCounter;

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("the eBPF programs were not built (AYA_BUILD_SKIP was set at build time)")]
    NotBuilt,
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name:?}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF program {0:?} missing from the object")]
    MissingProgram(&'static str),
    #[error("eBPF map {0:?} missing or of the wrong type")]
    MissingMap(&'static str),
    #[error("reading eBPF map {name:?}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The eBPF object built by build.rs; aya needs it 8-byte aligned.
fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway"))
}

/// Where cgroup v2 is mounted (not always /sys/fs/cgroup: hybrid hosts mount
/// it at /sys/fs/cgroup/unified).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (_dev, dir, kind) = (f.next()?, f.next()?, f.next()?);
        (kind == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// Counters the connect program keeps, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectCounters {
    pub seen: u64,
    pub allowed: u64,
    pub refused: u64,
}

/// The connect program attached to one cgroup; detached when dropped.
pub struct ConnectGuard {
    ebpf: Ebpf,
}

impl ConnectGuard {
    pub fn attach(cgroup: &Path) -> Result<Self, EbpfError> {
        if object().is_empty() {
            return Err(EbpfError::NotBuilt);
        }
        let mut ebpf = Ebpf::load(object())?;
        let program: &mut CgroupSockAddr = ebpf
            .program_mut("connect4")
            .ok_or(EbpfError::MissingProgram("connect4"))?
            .try_into()
            .map_err(|source| EbpfError::Program {
                name: "connect4",
                source,
            })?;
        program.load().map_err(|source| EbpfError::Program {
            name: "connect4",
            source,
        })?;
        let dir = std::fs::File::open(cgroup).map_err(|source| EbpfError::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        // Single: on kernels with BPF links (5.7+) aya attaches by link, which
        // never displaces other programs and refuses the ALLOW_MULTI flag.
        program
            .attach(dir, CgroupAttachMode::Single)
            .map_err(|source| EbpfError::Program {
                name: "connect4",
                source,
            })?;
        Ok(Self { ebpf })
    }

    pub fn counters(&self) -> Result<ConnectCounters, EbpfError> {
        const NAME: &str = "GUARD_COUNTERS";
        let map = self.ebpf.map(NAME).ok_or(EbpfError::MissingMap(NAME))?;
        let array: PerCpuArray<_, u64> =
            PerCpuArray::try_from(map).map_err(|_| EbpfError::MissingMap(NAME))?;
        let sum = |c: GuardCounter| -> Result<u64, EbpfError> {
            let values = array
                .get(&(c as u32), 0)
                .map_err(|source| EbpfError::Map { name: NAME, source })?;
            Ok(values.iter().sum())
        };
        Ok(ConnectCounters {
            seen: sum(GuardCounter::Seen)?,
            allowed: sum(GuardCounter::Allowed)?,
            refused: sum(GuardCounter::Refused)?,
        })
    }
}

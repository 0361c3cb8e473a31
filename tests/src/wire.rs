//! A wire for the remote guard's tests and measurements: namespace `x` (a
//! stranger, and the gateway's allowed address) and namespace `b` (the
//! backend host, where `gateway guard --config` runs), joined by one veth.
//! The backends' sockets live in a cgroup made for the purpose, which is
//! all the socket layer judges (never the host's root cgroup).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use crate::bpf_cgroup_or_skip;
use crate::netns::*;

pub const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
pub const STRANGER: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 10);
pub const BACKEND6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 1);
pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 0x10);
pub const X_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x20, 0x01];
pub const B_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x20, 0x02];
pub const TCP_PORT: u16 = 9000;
pub const UDP_PORT: u16 = 9002;
pub const ADMIN: &str = "127.0.0.1:9902";

/// The wire, the backends' cgroup and the guard's pins and files.
pub struct Wire {
    pub x: Netns,
    pub b: Netns,
    pub cg: TestCgroup,
    pub pins: Pins,
    pub dir: tempfile::TempDir,
}

pub fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The veth between `x` (x0) and `b` (b0), with its fixed MACs and
/// addresses, up.
fn link(x: &Netns, b: &Netns) {
    ip(&[
        "link",
        "add",
        "x0",
        "netns",
        x.name(),
        "address",
        &mac(X_MAC),
        "type",
        "veth",
        "peer",
        "name",
        "b0",
        "netns",
        b.name(),
        "address",
        &mac(B_MAC),
    ]);
    for (ns, dev) in [(x, "x0"), (b, "b0")] {
        ns.ip(&format!("link set {dev} up"));
    }
    x.ip(&format!("addr add {STRANGER}/24 dev x0"));
    x.ip(&format!("addr add {GATEWAY}/24 dev x0"));
    x.ip("addr add fd00:201::2/64 dev x0 nodad");
    x.ip(&format!("addr add {GATEWAY6}/64 dev x0 nodad"));
    b.ip(&format!("addr add {BACKEND}/24 dev b0"));
    b.ip(&format!("addr add {BACKEND6}/64 dev b0 nodad"));
}

impl Wire {
    /// Deletes the veth and makes it again, same names, MACs and
    /// addresses, as happens to veths and bonds: new interface indexes.
    pub fn recreate_link(&self) {
        self.x.ip("link del x0");
        link(&self.x, &self.b);
    }

    /// None (with a message) where the test cannot run.
    pub fn new() -> Option<Wire> {
        let mount = bpf_cgroup_or_skip()?;
        if !netns_or_skip() {
            return None;
        }
        let (x, b) = (Netns::new("gra-x"), Netns::new("gra-b"));
        link(&x, &b);
        // Crafted packets come from addresses without a route back.
        for key in [
            "net/ipv4/conf/all/rp_filter",
            "net/ipv4/conf/default/rp_filter",
        ] {
            b.sysctl(key, "0");
        }
        Some(Wire {
            cg: TestCgroup::create(&mount, "gra"),
            pins: Pins::new("gra"),
            dir: tempfile::tempdir().expect("tempdir"),
            x,
            b,
        })
    }

    /// guard.toml: TC on `interfaces`, the socket layer on the test's
    /// cgroup (or off), the gateway's addresses allowed, summaries every
    /// second.
    pub fn config(&self, interfaces: &[&str], socket_layer: bool) -> PathBuf {
        self.config_every(interfaces, socket_layer, "1s")
    }

    /// [`Wire::config`] with summaries every `every` ("1h").
    pub fn config_every(&self, interfaces: &[&str], socket_layer: bool, every: &str) -> PathBuf {
        let path = self.dir.path().join("guard.toml");
        let interfaces: Vec<String> = interfaces.iter().map(|i| format!("{i:?}")).collect();
        std::fs::write(
            &path,
            format!(
                "interfaces = [{}]\nsocket_layer = {socket_layer}\ncgroup = \"{}\"\n\
                 allow = [\"{GATEWAY}\", \"{GATEWAY6}\"]\n\
                 protect = [\"tcp:{TCP_PORT}\", \"udp:{UDP_PORT}\"]\n\
                 pin_dir = \"{}\"\nadmin = \"{ADMIN}\"\nsummary_every = \"{every}\"\n",
                interfaces.join(", "),
                self.cg.rel().display(),
                self.pins.0.display()
            ),
        )
        .expect("guard.toml");
        path
    }

    pub fn start_guard(&self, interfaces: &[&str], socket_layer: bool, log: &str) -> Proc {
        let config = self.config(interfaces, socket_layer);
        start_remote_guard(self.b.name(), &config, self.dir.path().join(log))
    }

    /// A TCP echo backend on `addr` (in `b`, in the test's cgroup).
    pub fn tcp_backend(&self, addr: SocketAddr) {
        echo_in_cgroup(self.b.name(), &self.cg.path(), addr);
    }

    pub fn udp_backend(&self, addr: SocketAddr) -> std::net::UdpSocket {
        udp_in_cgroup(self.b.name(), &self.cg.path(), addr)
    }

    pub fn metric(&self, series: &str) -> u64 {
        metric_in(self.b.name(), ADMIN.parse().unwrap(), series)
            .unwrap_or_else(|| panic!("no {series} on the guard's metrics endpoint"))
    }

    /// A TCP round trip to the backend's protected port from `from` in `x`.
    pub fn tcp_from(&self, from: Ipv4Addr) -> Result<(), String> {
        tcp_roundtrip(
            self.x.name(),
            Some(from.into()),
            SocketAddr::from((BACKEND, TCP_PORT)),
        )
    }
}

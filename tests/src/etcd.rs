//! A real etcd member for the fleet tests: loopback, ports picked free,
//! a data directory of its own, killed when dropped (a failing test too).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One etcd member (a cluster of one unless `cluster` says more).
pub struct Etcd {
    pub name: String,
    pub client: SocketAddr,
    pub peer: SocketAddr,
    data: tempfile::TempDir,
    cluster: String,
    /// The network namespace it runs in (none: this process's).
    netns: Option<String>,
    child: Option<Child>,
}

impl Etcd {
    /// A single-member cluster, started and answering.
    pub async fn start() -> Etcd {
        let peer = crate::dead_port();
        let mut e = Etcd::new("m0", peer, &format!("m0=http://{peer}"));
        e.run();
        e.wait_ready().await;
        e
    }

    /// A cluster of `n` members on loopback (`m0`, `m1`, …), started and
    /// answering.
    pub async fn cluster(n: usize) -> Vec<Etcd> {
        let peers: Vec<SocketAddr> = (0..n).map(|_| crate::dead_port()).collect();
        let cluster: Vec<String> = peers
            .iter()
            .enumerate()
            .map(|(i, p)| format!("m{i}=http://{p}"))
            .collect();
        let cluster = cluster.join(",");
        let mut members: Vec<Etcd> = peers
            .iter()
            .enumerate()
            .map(|(i, p)| Etcd::new(&format!("m{i}"), *p, &cluster))
            .collect();
        for m in &mut members {
            m.run();
        }
        for m in &members {
            m.wait_ready().await;
        }
        members
    }

    /// A member of a cluster named in `cluster` (`name=http://peer,…`); not started.
    pub fn new(name: &str, peer: SocketAddr, cluster: &str) -> Etcd {
        Etcd {
            name: name.to_owned(),
            client: crate::dead_port(),
            peer,
            data: tempfile::tempdir().expect("etcd data dir"),
            cluster: cluster.to_owned(),
            netns: None,
            child: None,
        }
    }

    /// A member of `cluster` in namespace `ns`, on `client` and `peer`
    /// there; not started.
    pub fn in_netns(
        name: &str,
        ns: &str,
        client: SocketAddr,
        peer: SocketAddr,
        cluster: &str,
    ) -> Etcd {
        let mut e = Etcd::new(name, peer, cluster);
        e.client = client;
        e.netns = Some(ns.to_owned());
        e
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.client)
    }

    /// Starts (or starts again, on the same data and ports) the member.
    pub fn run(&mut self) {
        assert!(self.child.is_none(), "etcd {} already runs", self.name);
        let data: PathBuf = self.data.path().join("data");
        let log = std::fs::File::create(self.data.path().join("etcd.log")).expect("etcd log");
        let mut cmd = match &self.netns {
            Some(ns) => crate::netns::in_netns_command(ns, &["etcd"]),
            None => Command::new("etcd"),
        };
        let child = cmd
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &self.url()])
            .args(["--advertise-client-urls", &self.url()])
            .args(["--listen-peer-urls", &format!("http://{}", self.peer)])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://{}", self.peer),
            ])
            .args(["--initial-cluster", &self.cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd runs (cargo xtask setup installs etcd-server)");
        self.child = Some(child);
    }

    /// Kills the member (its data stays for `run`).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits until a read through this member answers.
    pub async fn wait_ready(&self) {
        let until = Instant::now() + crate::STEP;
        loop {
            if self.netns.is_some() {
                if self.put_blocking("ready", "1").is_ok() {
                    return;
                }
            } else if let Ok(mut c) = self.client().await
                && c.get("ready", None).await.is_ok()
            {
                return;
            }
            let log =
                std::fs::read_to_string(self.data.path().join("etcd.log")).unwrap_or_default();
            assert!(
                Instant::now() < until,
                "etcd {} not ready:\n{log}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn client(&self) -> Result<etcd_client::Client, etcd_client::Error> {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(Duration::from_secs(2));
        etcd_client::Client::connect([self.url()], Some(options)).await
    }
}

impl Etcd {
    /// Puts `key` through this member, from its namespace (a thread of
    /// its own there, with a runtime of its own, so the client's sockets
    /// are made there).
    pub fn put_blocking(&self, key: &str, value: &str) -> Result<(), String> {
        let (url, key, value) = (self.url(), key.to_owned(), value.to_owned());
        let put = move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let options = etcd_client::ConnectOptions::new()
                    .with_connect_timeout(Duration::from_secs(1))
                    .with_timeout(Duration::from_secs(2));
                let mut c = etcd_client::Client::connect([url], Some(options))
                    .await
                    .map_err(|e| e.to_string())?;
                c.put(key, value, None).await.map_err(|e| e.to_string())?;
                Ok(())
            })
        };
        match &self.netns {
            Some(ns) => crate::netns::in_netns(ns, put),
            None => put(),
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

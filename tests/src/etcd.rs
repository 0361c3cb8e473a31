//! A real etcd member for the fleet tests: loopback, ports picked free,
//! a data directory of its own, killed when dropped (a failing test too);
//! over plain http, or https with client certificates required
//! (`EtcdPki`, `Etcd::start_tls`).

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
    /// https on the client URLs, client certificates required.
    tls: Option<Tls>,
    child: Option<Child>,
}

/// What an https member and the harness's own client use.
#[derive(Clone)]
struct Tls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

/// etcd's client PKI, made with rcgen (the gateway's `pki` issues no IP
/// SANs): `ca.pem`, etcd's `server.pem`/`server.key` (for 127.0.0.1 and
/// localhost; client auth too, as etcd's own gateway dials itself with
/// it), a client's `client.pem`/`client.key` (0600), and `other-ca.pem`,
/// a CA that signed nothing here.
pub struct EtcdPki {
    pub dir: tempfile::TempDir,
}

impl EtcdPki {
    pub fn new() -> EtcdPki {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let pki = EtcdPki {
            dir: tempfile::tempdir().expect("etcd pki dir"),
        };
        let ca = |name: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("ca key")).expect("ca")
        };
        let leaf = |issuer: &CertifiedIssuer<'_, KeyPair>,
                    name: &str,
                    sans: &[&str],
                    usages: Vec<ExtendedKeyUsagePurpose>| {
            let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
            let mut params = CertificateParams::new(sans).expect("leaf params");
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            params.extended_key_usages = usages;
            let key = KeyPair::generate().expect("leaf key");
            let cert = params.signed_by(&key, &**issuer).expect("leaf");
            (cert.pem(), key.serialize_pem())
        };
        let root = ca("etcd test CA");
        pki.write("ca.pem", &root.pem());
        let (cert, key) = leaf(
            &root,
            "etcd",
            &["127.0.0.1", "localhost"],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        );
        pki.write("server.pem", &cert);
        pki.write("server.key", &key);
        let (cert, key) = leaf(
            &root,
            "gateway",
            &[],
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        );
        pki.write("client.pem", &cert);
        pki.write("client.key", &key);
        pki.write("other-ca.pem", &ca("another CA").pem());
        pki
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A file of the PKI; a key readable by its owner only.
    fn write(&self, name: &str, contents: &str) {
        use std::os::unix::fs::PermissionsExt as _;
        let p = self.path(name);
        std::fs::write(&p, contents).expect("write etcd pki file");
        if name.ends_with(".key") {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                .expect("key mode 0600");
        }
    }
}

impl Default for EtcdPki {
    fn default() -> Self {
        Self::new()
    }
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
            tls: None,
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

    /// A single-member cluster serving its clients over https with
    /// `pki`'s server certificate, refusing any client without a
    /// certificate of `pki`'s CA (`--client-cert-auth`); started and
    /// answering (to the harness's client, with `client.pem`).
    pub async fn start_tls(pki: &EtcdPki) -> Etcd {
        let peer = crate::dead_port();
        let mut e = Etcd::new("m0", peer, &format!("m0=http://{peer}"));
        e.tls = Some(Tls {
            ca: pki.path("ca.pem"),
            cert: pki.path("server.pem"),
            key: pki.path("server.key"),
            client_cert: pki.path("client.pem"),
            client_key: pki.path("client.key"),
        });
        e.run();
        e.wait_ready().await;
        e
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.client)
    }

    /// The etcd log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("etcd.log")).unwrap_or_default()
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
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
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
            let log = self.log();
            assert!(
                Instant::now() < until,
                "etcd {} not ready:\n{log}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn client(&self) -> Result<etcd_client::Client, etcd_client::Error> {
        etcd_client::Client::connect([self.url()], Some(self.options())).await
    }

    /// The harness's client options: with https, `EtcdPki`'s CA and client
    /// certificate.
    fn options(&self) -> etcd_client::ConnectOptions {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(Duration::from_secs(2));
        let Some(tls) = &self.tls else {
            return options;
        };
        let read = |p: &PathBuf| std::fs::read(p).expect("etcd pki file");
        let tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)))
            .identity(etcd_client::Identity::from_pem(
                read(&tls.client_cert),
                read(&tls.client_key),
            ));
        options.with_tls(tls)
    }
}

impl Etcd {
    /// Puts `key` through this member, from its namespace (a thread of
    /// its own there, with a runtime of its own, so the client's sockets
    /// are made there).
    pub fn put_blocking(&self, key: &str, value: &str) -> Result<(), String> {
        let (url, key, value) = (self.url(), key.to_owned(), value.to_owned());
        let options = self.options();
        let put = move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async move {
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

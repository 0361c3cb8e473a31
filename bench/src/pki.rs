//! One PKI for every peer: root → intermediate → server leaf and client leaf,
//! all P-256. The client sends leaf + intermediate; servers trust the root.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use gateway::pki::{Authority, LeafSpec};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub const SERVER_NAME: &str = "bench.internal";
pub const CLIENT_IDENTITY: &str = "spiffe://bench.internal/load";

pub struct Files {
    pub root: PathBuf,
    /// Server leaf + intermediate.
    pub server_chain: PathBuf,
    pub server_key: PathBuf,
    /// Chain and key in one file, as HAProxy's `crt` wants them.
    pub server_pem_bundle: PathBuf,
    pub client_chain: Vec<CertificateDer<'static>>,
    pub client_key: PrivateKeyDer<'static>,
    /// The client's chain and key as files, for the OpenSSL-based client
    /// (stunnel in client mode).
    pub client_chain_pem: PathBuf,
    pub client_key_pem: PathBuf,
}

pub fn create(dir: &Path) -> anyhow::Result<Files> {
    std::fs::create_dir_all(dir)?;
    let root = Authority::root("gateway bench root")?;
    let intermediate = root.intermediate("gateway bench intermediate")?;
    let server = intermediate.issue(&LeafSpec::server(
        SERVER_NAME,
        &[&format!("dns:{SERVER_NAME}")],
    ))?;
    let client = intermediate.issue(&LeafSpec::client("bench load", &[CLIENT_IDENTITY]))?;
    // Readable by their owner only, as the gateway requires of key files
    // (and the peers, run as root, read them all the same).
    let write = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let p = dir.join(name);
        let _ = std::fs::remove_file(&p);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .with_context(|| format!("writing {}", p.display()))?;
        Ok(p)
    };
    let server_chain_pem = format!("{}{}", server.cert_pem, intermediate.cert_pem);
    let client_chain_pem = format!("{}{}", client.cert_pem, intermediate.cert_pem);
    Ok(Files {
        root: write("root.pem", &root.cert_pem)?,
        server_chain: write("server-chain.pem", &server_chain_pem)?,
        server_key: write("server.key", &server.key_pem)?,
        server_pem_bundle: write(
            "server-bundle.pem",
            &format!("{server_chain_pem}{}", server.key_pem),
        )?,
        client_chain: CertificateDer::pem_slice_iter(client_chain_pem.as_bytes())
            .collect::<Result<_, _>>()?,
        client_key: PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes())?,
        client_chain_pem: write("client-chain.pem", &client_chain_pem)?,
        client_key_pem: write("client.key", &client.key_pem)?,
    })
}

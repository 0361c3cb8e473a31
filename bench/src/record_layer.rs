//! The gateway's own TLS record layer against rustls' unbuffered API, the
//! maintained code it could use instead on the userspace path.
//!
//! The gateway should own as little TLS as its performance allows, so the
//! question is measured, not argued: what each costs per idle connection
//! (the state a connection keeps past its handshake) and per GB sealed and
//! opened (in place, no I/O, on one CPU). rustls is measured with both its
//! AEAD providers, and the faster one counts, as the gateway picks the
//! faster library for its own layer.
//!
//! The rest of a connection (its task, sockets, the registry's entry) is the
//! same on either path, so the projection for the rustls path is the
//! gateway's measured KiB per idle connection with its layer's state
//! swapped for rustls'.

use std::sync::Arc;

use gateway::offload::record_layer::exposed::{Aead, Keys, Layer};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{UnbufferedServerConnection, WebPkiClientVerifier};
use rustls::unbuffered::{ConnectionState, EncryptError};
use rustls::{ClientConfig, ClientConnection, ConnectionTrafficSecrets, ServerConfig};
use serde::Serialize;

use crate::pki::Files;

const CONNECTIONS: usize = 200;
const CHUNK: usize = 16 * 1024;
/// Per trial and direction: long against the clock, short for the run.
const BYTES: usize = 32 << 20;
const TRIALS: usize = 3;

#[derive(Debug, Clone, Serialize)]
pub struct RecordLayerCost {
    /// Bytes a connection keeps for its TLS state past the handshake
    /// (heap + inline), the gateway's layer.
    pub ours_bytes: f64,
    /// The same for a rustls `UnbufferedServerConnection` (client chain and
    /// key schedule included: it keeps them).
    pub rustls_bytes: f64,
    pub ours_seal_cpu_s_per_gb: f64,
    pub ours_open_cpu_s_per_gb: f64,
    pub rustls_seal_cpu_s_per_gb: f64,
    pub rustls_open_cpu_s_per_gb: f64,
    /// The AEAD provider of rustls' better figures.
    pub rustls_library: &'static str,
    pub cpu: usize,
}

impl RecordLayerCost {
    /// The gateway's KiB per idle connection had it kept rustls' state
    /// instead of its own layer's.
    pub fn projected_kib(&self, measured_kib: f64) -> f64 {
        measured_kib + (self.rustls_bytes - self.ours_bytes) / 1024.0
    }
}

/// Memory on this thread (glibc's main arena, which mallinfo2 reports:
/// run it on the main thread), CPU on a thread pinned to `cpu`.
pub fn measure(cpu: usize, pki: &Files) -> anyhow::Result<RecordLayerCost> {
    let setup = Setup::new(pki)?;
    let ours_bytes = per_connection(|| setup.ours().map(|(layer, _)| Box::new(layer)))?;
    let rustls_bytes = per_connection(|| {
        setup
            .rustls_unbuffered(rustls_provider(Provider::AwsLc))
            .map(|(server, _)| Box::new(server))
    })?;
    let cpu_part = std::thread::scope(|s| {
        s.spawn(|| {
            crate::procstat::pin_to(&[cpu])?;
            let (ours_seal, ours_open) = best(|| setup.ours_cpu())?;
            let mut rustls = Vec::new();
            for provider in [Provider::Ring, Provider::AwsLc] {
                let (seal, open) = best(|| setup.rustls_cpu(rustls_provider(provider)))?;
                rustls.push((seal + open, seal, open, provider.name()));
            }
            let (_, seal, open, library) = rustls
                .into_iter()
                .min_by(|a, b| a.0.total_cmp(&b.0))
                .ok_or_else(|| anyhow::anyhow!("no rustls provider measured"))?;
            anyhow::Ok((ours_seal, ours_open, seal, open, library))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the record layer measurement panicked"))?
    })?;
    let (ours_seal, ours_open, rustls_seal, rustls_open, rustls_library) = cpu_part;
    Ok(RecordLayerCost {
        ours_bytes,
        rustls_bytes,
        ours_seal_cpu_s_per_gb: ours_seal,
        ours_open_cpu_s_per_gb: ours_open,
        rustls_seal_cpu_s_per_gb: rustls_seal,
        rustls_open_cpu_s_per_gb: rustls_open,
        rustls_library,
        cpu,
    })
}

#[derive(Clone, Copy)]
enum Provider {
    Ring,
    AwsLc,
}

impl Provider {
    fn name(self) -> &'static str {
        match self {
            Provider::Ring => "ring",
            Provider::AwsLc => "aws-lc",
        }
    }
}

/// rustls with `provider`'s AES-128-GCM (the suite the bench's clients
/// offer) and AWS-LC for everything else.
fn rustls_provider(provider: Provider) -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites = vec![match provider {
        Provider::Ring => rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        Provider::AwsLc => rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
    }];
    Arc::new(p)
}

/// Heap (glibc's in-use bytes) plus inline size per value `make` returns,
/// over many values kept alive together.
fn per_connection<T>(mut make: impl FnMut() -> anyhow::Result<Box<T>>) -> anyhow::Result<f64> {
    let mut kept = Vec::with_capacity(CONNECTIONS);
    // The first one warms up whatever is allocated once per process.
    drop(make()?);
    let before = heap_in_use();
    for _ in 0..CONNECTIONS {
        kept.push(make()?);
    }
    let after = heap_in_use();
    let heap = after.saturating_sub(before) as f64 / CONNECTIONS as f64;
    Ok(heap + std::mem::size_of::<T>() as f64)
}

fn heap_in_use() -> usize {
    // SAFETY: mallinfo2 takes nothing and returns a plain struct.
    unsafe { libc::mallinfo2() }.uordblks
}

/// The least CPU per GB of `trial`'s (seal, open) over a few trials.
fn best(mut trial: impl FnMut() -> anyhow::Result<(f64, f64)>) -> anyhow::Result<(f64, f64)> {
    let (mut seal, mut open) = (f64::MAX, f64::MAX);
    for _ in 0..TRIALS {
        let (s, o) = trial()?;
        seal = seal.min(s);
        open = open.min(o);
    }
    Ok((seal, open))
}

/// The PKI and configs every measured handshake uses: the bench's own, with
/// the client's certificate verified as the gateway verifies it.
struct Setup {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    client: Arc<ClientConfig>,
}

impl Setup {
    fn new(pki: &Files) -> anyhow::Result<Setup> {
        let chain = CertificateDer::pem_file_iter(&pki.server_chain)?.collect::<Result<_, _>>()?;
        let key = PrivateKeyDer::from_pem_file(&pki.server_key)?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&pki.root)? {
            roots.add(c?)?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .build()?;
        let client =
            crate::load::client_config(pki.client_chain.clone(), pki.client_key.clone_key())?;
        Ok(Setup {
            chain,
            key,
            verifier,
            client,
        })
    }

    fn server_config(
        &self,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> anyhow::Result<Arc<ServerConfig>> {
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(self.verifier.clone())
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.enable_secret_extraction = true;
        Ok(Arc::new(config))
    }

    fn client(&self) -> anyhow::Result<ClientConnection> {
        Ok(ClientConnection::new(
            self.client.clone(),
            ServerName::try_from(crate::pki::SERVER_NAME)?,
        )?)
    }

    /// An unbuffered rustls server past an mTLS handshake, and its client.
    fn rustls_unbuffered(
        &self,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> anyhow::Result<(UnbufferedServerConnection, ClientConnection)> {
        let mut server = UnbufferedServerConnection::new(self.server_config(provider)?)?;
        let mut client = self.client()?;
        let mut incoming: Vec<u8> = Vec::new();
        let mut out = vec![0u8; 1 << 16];
        loop {
            while client.wants_write() {
                client.write_tls(&mut incoming)?;
            }
            let status = server.process_tls_records(&mut incoming);
            let discard = status.discard;
            match status.state? {
                ConnectionState::EncodeTlsData(mut e) => {
                    let n = e.encode(&mut out)?;
                    let mut sent = &out[..n];
                    while !sent.is_empty() {
                        client.read_tls(&mut sent)?;
                    }
                    client.process_new_packets()?;
                }
                ConnectionState::TransmitTlsData(t) => t.done(),
                ConnectionState::BlockedHandshake if !client.wants_write() => {
                    anyhow::bail!("the unbuffered handshake stalled")
                }
                ConnectionState::BlockedHandshake => {}
                ConnectionState::WriteTraffic(_) => {
                    incoming.drain(..discard);
                    return Ok((server, client));
                }
                other => anyhow::bail!("unexpected state in the handshake: {other:?}"),
            }
            incoming.drain(..discard);
        }
    }

    /// The gateway's layer (as the server) from a rustls handshake's keys,
    /// and its client.
    fn ours(&self) -> anyhow::Result<(Layer, ClientConnection)> {
        let mut server = rustls::ServerConnection::new(
            self.server_config(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))?,
        )?;
        let mut client = self.client()?;
        while server.is_handshaking() || client.is_handshaking() {
            let mut bytes = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut bytes)?;
            }
            let mut input = &bytes[..];
            while !input.is_empty() {
                server.read_tls(&mut input)?;
            }
            server.process_new_packets()?;
            let mut bytes = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut bytes)?;
            }
            let mut input = &bytes[..];
            while !input.is_empty() {
                client.read_tls(&mut input)?;
            }
            client.process_new_packets()?;
        }
        let secrets = server.dangerous_extract_secrets()?;
        let (rx_seq, rx) = secrets.rx;
        let (tx_seq, tx) = secrets.tx;
        let (rx, tx) = (key_bytes(rx)?, key_bytes(tx)?);
        let layer = Layer::new(true, true, keys(&rx, rx_seq), keys(&tx, tx_seq))
            .map_err(anyhow::Error::msg)?;
        Ok((layer, client))
    }

    /// rustls' unbuffered server: seal BYTES into records (WriteTraffic),
    /// open BYTES of the client's records in place (ReadTraffic). CPU-s/GB.
    fn rustls_cpu(
        &self,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> anyhow::Result<(f64, f64)> {
        let (mut server, mut client) = self.rustls_unbuffered(provider)?;
        let plain = vec![0x42u8; CHUNK];
        let mut out = vec![0u8; CHUNK + 64];
        let start = thread_cpu_seconds();
        let mut sealed = 0;
        while sealed < BYTES {
            let status = server.process_tls_records(&mut []);
            match status.state? {
                ConnectionState::WriteTraffic(mut w) => {
                    w.encrypt(&plain, &mut out)
                        .map_err(|e: EncryptError| anyhow::anyhow!("{e}"))?;
                }
                other => anyhow::bail!("expected WriteTraffic, got {other:?}"),
            }
            sealed += CHUNK;
        }
        let seal = per_gb(thread_cpu_seconds() - start, sealed);
        let mut records = client_records(&mut client)?;
        let start = thread_cpu_seconds();
        let (mut at, mut opened) = (0, 0);
        while at < records.len() {
            let status = server.process_tls_records(&mut records[at..]);
            let discard = status.discard;
            match status.state? {
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(record) = r.next_record() {
                        opened += record?.payload.len();
                    }
                }
                other => anyhow::bail!("expected ReadTraffic, got {other:?}"),
            }
            at += discard;
        }
        let open = per_gb(thread_cpu_seconds() - start, opened);
        anyhow::ensure!(opened == BYTES, "rustls opened {opened} of {BYTES} bytes");
        Ok((seal, open))
    }

    /// The gateway's layer: seal BYTES as read into record slots, open BYTES
    /// of the client's records in place. CPU-s/GB.
    fn ours_cpu(&self) -> anyhow::Result<(f64, f64)> {
        let (layer, mut client) = self.ours()?;
        let plain = vec![0x42u8; 4 * CHUNK];
        let mut out = Vec::with_capacity(4 * (CHUNK + 64));
        let start = thread_cpu_seconds();
        let mut sealed = 0;
        while sealed < BYTES {
            out.clear();
            layer
                .seal_in_slots(&plain, &mut out)
                .map_err(anyhow::Error::msg)?;
            sealed += plain.len();
        }
        let seal = per_gb(thread_cpu_seconds() - start, sealed);
        let mut records = client_records(&mut client)?;
        let start = thread_cpu_seconds();
        let (taken, opened) = layer
            .open_in_place(&mut records)
            .map_err(anyhow::Error::msg)?;
        let open = per_gb(thread_cpu_seconds() - start, opened);
        anyhow::ensure!(
            taken == records.len() && opened == BYTES,
            "opened {opened} of {BYTES}"
        );
        Ok((seal, open))
    }
}

/// BYTES of application data sealed by the client (not timed).
fn client_records(client: &mut ClientConnection) -> anyhow::Result<Vec<u8>> {
    use std::io::Write as _;
    let chunk = vec![0x17u8; CHUNK];
    let mut records = Vec::with_capacity(BYTES + BYTES / 512);
    let mut written = 0;
    while written < BYTES {
        client.writer().write_all(&chunk)?;
        written += CHUNK;
        while client.wants_write() {
            client.write_tls(&mut records)?;
        }
    }
    Ok(records)
}

fn keys((aead, key, iv): &(Aead, Vec<u8>, Vec<u8>), seq: u64) -> Keys<'_> {
    Keys {
        aead: *aead,
        key,
        iv,
        seq,
    }
}

fn key_bytes(s: ConnectionTrafficSecrets) -> anyhow::Result<(Aead, Vec<u8>, Vec<u8>)> {
    Ok(match s {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
            (Aead::Aes128Gcm, key.as_ref().to_vec(), iv.as_ref().to_vec())
        }
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
            (Aead::Aes256Gcm, key.as_ref().to_vec(), iv.as_ref().to_vec())
        }
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (
            Aead::Chacha20Poly1305,
            key.as_ref().to_vec(),
            iv.as_ref().to_vec(),
        ),
        _ => anyhow::bail!("an AEAD the gateway's layer does not have"),
    })
}

fn per_gb(seconds: f64, bytes: usize) -> f64 {
    seconds * 1e9 / bytes as f64
}

fn thread_cpu_seconds() -> f64 {
    crate::aead::thread_cpu_seconds().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both layers carry the bytes whole and cost something plausible; the
    /// projection swaps one state for the other.
    #[test]
    fn both_layers_are_measured() {
        let dir = tempfile_dir();
        let pki = crate::pki::create(&dir).expect("pki");
        let setup = Setup::new(&pki).expect("setup");
        let (seal, open) = setup.ours_cpu().expect("ours");
        assert!(
            seal > 0.01 && open > 0.01 && seal < 50.0 && open < 50.0,
            "{seal} {open}"
        );
        let (seal, open) = setup
            .rustls_cpu(rustls_provider(Provider::AwsLc))
            .expect("rustls");
        assert!(
            seal > 0.01 && open > 0.01 && seal < 50.0 && open < 50.0,
            "{seal} {open}"
        );
        let cost = RecordLayerCost {
            ours_bytes: 1024.0,
            rustls_bytes: 3072.0,
            ours_seal_cpu_s_per_gb: 0.0,
            ours_open_cpu_s_per_gb: 0.0,
            rustls_seal_cpu_s_per_gb: 0.0,
            rustls_open_cpu_s_per_gb: 0.0,
            rustls_library: "aws-lc",
            cpu: 0,
        };
        assert_eq!(cost.projected_kib(7.0), 9.0);
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("record-layer-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }
}

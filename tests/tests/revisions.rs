//! Config revisions and rollback end to end, with the built binary:
//! `gateway rollout history` lists what was applied, `gateway rollout
//! revert N` restores it (clients refused by a narrowing reload are served
//! again, connections re-verified, the config file written back so the
//! next SIGHUP keeps it), a revision whose CA file changed is refused
//! without `--force`, the TCP door takes no revert, and `auto_revert`
//! undoes a reload to a broken trust bundle but not a harmless one under
//! normal traffic.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gateway::pki::{Authority, LeafSpec};
use gateway::revisions::{History, How};
use gateway_tests::process::{
    Reap, admin_addr, exit_status, log_count, run_binary, scrape, series, signal, wait_for,
    wait_listening,
};
use gateway_tests::*;

const ORDERS: &str = "orders.example.internal";

/// A running binary: its process, listener, admin endpoint and socket.
struct Binary {
    proc: Reap,
    app: SocketAddr,
    admin: SocketAddr,
    socket: PathBuf,
    config: PathBuf,
    stderr: PathBuf,
}

impl Binary {
    fn start(pki: &Pki, toml: &str) -> Binary {
        let config = pki.write("gateway.toml", toml);
        let stderr = pki.path("gateway.stderr");
        let proc = run_binary(&config, &stderr, &[]);
        let app = wait_listening(&stderr);
        let admin = admin_addr(&stderr);
        Binary {
            proc,
            app,
            admin,
            socket: pki.path("admin.sock"),
            config,
            stderr,
        }
    }

    /// Writes `toml` to the config file and sends SIGHUP; waits for the
    /// reload (applied or refused) to be logged.
    fn reload(&self, toml: &str) {
        std::fs::write(&self.config, toml).unwrap();
        self.hup();
    }

    fn hup(&self) {
        let done = || {
            log_count(&self.stderr, "reloaded")
                + log_count(&self.stderr, "reload refused, running state kept")
        };
        let before = done();
        signal(&self.proc.0, "HUP");
        wait_for("the reload", || done() > before);
    }

    /// `gateway rollout ARGS --socket S`: (exit code, stdout, stderr).
    fn rollout(&self, args: &[&str]) -> (i32, String, String) {
        let mut all: Vec<&str> = args.to_vec();
        let socket = self.socket.display().to_string();
        all.extend(["--socket", &socket]);
        cli(&all)
    }

    fn history(&self) -> History {
        let (code, out, err) = self.rollout(&["history", "--format", "json"]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    fn stop(mut self) {
        signal(&self.proc.0, "TERM");
        let status = exit_status(&mut self.proc.0, "SIGTERM");
        assert!(status.success(), "{status}");
    }
}

/// `gateway rollout ARGS`.
fn cli(args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["rollout"];
    all.extend(args);
    gateway_tests::process::cli(&all)
}

/// (number, how, reverted_to) of each revision, newest first.
fn listed(h: &History) -> Vec<(u64, How, Option<u64>)> {
    h.revisions
        .iter()
        .map(|r| (r.number, r.how, r.reverted_to))
        .collect()
}

/// The top of the config: admin endpoint and socket, the history in
/// `revisions/` of the PKI directory, no file watching (SIGHUP only).
fn head(pki: &Pki, extra: &str) -> String {
    format!(
        "admin = \"127.0.0.1:0\"\nadmin_socket = \"{}\"\nrevisions_dir = \"{}\"\nwatch_files = false\n{extra}",
        pki.path("admin.sock").display(),
        pki.path("revisions").display(),
    )
}

fn config(pki: &Pki, extra: &str, backend: SocketAddr, allow: &[&str]) -> String {
    with_test_defaults(
        &(head(pki, extra)
            + &listener_toml(pki, "edge", "")
            + &route_toml("orders", &[ORDERS], &[backend], allow)),
    )
}

/// A client with the allowed identity from a CA the gateway never
/// trusted, and that CA's bundle written to `name`.
fn foreign(pki: &Pki, name: &str) -> (ClientCreds, PathBuf) {
    let root = Authority::root("foreign root").unwrap();
    let leaf = root
        .issue(&LeafSpec::client("frontend", &[SPIFFE_FRONTEND]))
        .unwrap();
    let creds = pki.creds("foreign", &leaf, &root);
    (creds, pki.write(name, &root.cert_pem))
}

/// `v` with the listener's CA bundle trusting one more, unrelated CA: a
/// harmless reload that changes the trust anchors (the only kind
/// `auto_revert` watches).
fn with_extra_ca(pki: &Pki, v: &str) -> String {
    let extra = Authority::root("unrelated extra root").unwrap();
    let roots = pki.path("client-roots.pem");
    let both = std::fs::read_to_string(&roots).unwrap() + &extra.cert_pem;
    let path = pki.write("roots-and-extra.pem", &both);
    v.replace(&roots.display().to_string(), &path.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revert_restores_the_previous_behaviour_and_the_next_sighup_keeps_it() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let intruder = pki.client("intruder", &LeafSpec::client("i", &[SPIFFE_OTHER]));
    let v1 = config(&pki, "", backend.addr, &[SPIFFE_FRONTEND]);
    let b = Binary::start(&pki, &v1);
    passes(b.app, ORDERS, pki.frontend_config(), b"v1").await;

    // A narrowing reload: the frontend is refused, the intruder let in.
    let v2 = config(&pki, "", backend.addr, &[SPIFFE_OTHER]);
    b.reload(&v2);
    assert_eq!(
        refusal(b.app, ORDERS, pki.frontend_config()).await,
        rustls::AlertDescription::AccessDenied
    );
    let mut live = connect(b.app, ORDERS, pki.client_config(Some(&intruder)))
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    live.write_all(b"hi").await.unwrap();
    let mut two = [0u8; 2];
    live.read_exact(&mut two).await.unwrap();

    let h = b.history();
    assert_eq!(
        listed(&h),
        [(2, How::Reload, None), (1, How::Start, None)],
        "{h:?}"
    );
    assert_eq!(h.current, Some(2));
    assert!(h.revisions.iter().all(|r| r.files_unchanged));
    assert!(h.skipped.is_empty());
    // The text form: number, time, how, the config's hash, the files.
    let (code, text, _) = b.rollout(&["history"]);
    assert_eq!(code, 0);
    let first: Vec<&str> = text.lines().collect();
    assert!(first[0].starts_with("*    2  "), "{text}");
    assert!(first[0].contains("  reload  "), "{text}");
    assert!(first[0].ends_with("files unchanged"), "{text}");
    assert!(
        first[1].starts_with("     1  ") && first[1].contains(" start "),
        "{text}"
    );
    assert!(
        first[0].contains(&format!(
            "config sha256:{}",
            &h.revisions[0].config_sha256[..16]
        )),
        "{text}"
    );

    // The history is a read: admin_clients have it over TCP too.
    let (code, out, err) = cli(&["history", "--admin", &b.admin.to_string()]);
    assert_eq!((code, out), (0, text.clone()), "{err}");

    // Not through the TCP door, whoever asks.
    let (code, _, err) = cli(&["revert", "1", "--admin", &b.admin.to_string()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("403") && err.contains("admin_socket only"),
        "{err}"
    );
    assert_eq!(b.history().revisions.len(), 2);

    // Through the socket: revision 1 again, as revision 3.
    let (code, out, err) = b.rollout(&["revert", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(
            "reverted to revision 1 (now revision 3): 1 connection closed by re-verification"
        ),
        "{out}"
    );
    passes(b.app, ORDERS, pki.frontend_config(), b"back").await;
    // The intruder's connection, let in by revision 2, was re-verified
    // and closed.
    let mut buf = [0u8; 8];
    let ended = tokio::time::timeout(STEP, live.read(&mut buf)).await;
    assert!(
        matches!(ended, Ok(Ok(0)) | Ok(Err(_))),
        "still open: {ended:?}"
    );
    assert_eq!(
        refusal(b.app, ORDERS, pki.client_config(Some(&intruder))).await,
        rustls::AlertDescription::AccessDenied
    );
    let h = b.history();
    assert_eq!(
        listed(&h),
        [
            (3, How::Revert, Some(1)),
            (2, How::Reload, None),
            (1, How::Start, None)
        ]
    );
    assert_eq!(h.revisions[0].config_sha256, h.revisions[2].config_sha256);

    // The config file holds revision 1's text: the next SIGHUP keeps the
    // revert (and, changing nothing, is no new revision).
    assert_eq!(std::fs::read_to_string(&b.config).unwrap(), v1);
    b.hup();
    passes(b.app, ORDERS, pki.frontend_config(), b"kept").await;
    assert_eq!(b.history().revisions.len(), 3);

    // Each revision is a private file in the history directory.
    {
        use std::os::unix::fs::PermissionsExt as _;
        let files: Vec<_> = std::fs::read_dir(pki.path("revisions"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 3, "{files:?}");
        for f in files {
            let mode = std::fs::metadata(&f).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", f.display());
            // Hashes of the key file, never its content.
            let text = std::fs::read_to_string(&f).unwrap();
            assert!(!text.contains("PRIVATE KEY"), "{}", f.display());
        }
    }
    // An unknown revision: said so, nothing changed.
    let (code, _, err) = b.rollout(&["revert", "42"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("404") && err.contains("no revision 42"),
        "{err}"
    );
    b.stop();

    // A tampered entry (revision 2 made to allow everyone): at the next
    // start it is logged, counted, listed as skipped, and never restored.
    let two = pki.path("revisions/rev-0000000002.json");
    let tampered = std::fs::read_to_string(&two)
        .unwrap()
        .replace(SPIFFE_OTHER, "spiffe://example.internal/ns/shop/sa/anyone");
    std::fs::write(&two, tampered).unwrap();
    let b = Binary::start(&pki, &v1);
    let metrics = scrape(b.admin).await;
    assert_eq!(
        series(
            &metrics,
            "gateway_revisions_errors_total{reason=\"corrupt\"}"
        ),
        1,
        "{metrics}"
    );
    assert_eq!(
        log_count(&b.stderr, "revision history: an entry is skipped"),
        1
    );
    let h = b.history();
    assert_eq!(
        listed(&h),
        [
            (4, How::Start, None),
            (3, How::Revert, Some(1)),
            (1, How::Start, None)
        ]
    );
    assert_eq!(h.skipped.len(), 1);
    assert!(
        h.skipped[0].contains("its config text does not match its hash"),
        "{h:?}"
    );
    let (code, _, err) = b.rollout(&["revert", "2"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("409") && err.contains("is not one this gateway wrote"),
        "{err}"
    );
    passes(b.app, ORDERS, pki.frontend_config(), b"v1 still").await;
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_whose_ca_file_changed_is_refused_without_force() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    // The listener's CA bundle in a file of its own, to change under it.
    let ca = pki.write("bundle.pem", &pki.root.cert_pem);
    let with_ca = |allow: &[&str]| {
        config(&pki, "", backend.addr, allow).replace(
            &pki.path("client-roots.pem").display().to_string(),
            &ca.display().to_string(),
        )
    };
    let b = Binary::start(&pki, &with_ca(&[SPIFFE_FRONTEND]));
    b.reload(&with_ca(&[SPIFFE_OTHER]));
    // The bundle file is replaced: revision 1 would not run as it ran.
    let (_, other) = foreign(&pki, "other.pem");
    std::fs::copy(&other, &ca).unwrap();
    let h = b.history();
    let one = h.revisions.iter().find(|r| r.number == 1).unwrap();
    assert!(!one.files_unchanged);
    assert_eq!(one.changed_files, vec![ca.clone()]);
    let (_, text, _) = b.rollout(&["history"]);
    assert!(
        text.contains(&format!("files changed: {}", ca.display())),
        "{text}"
    );

    let (code, _, err) = b.rollout(&["revert", "1"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("409")
            && err.contains("revision 1 named files that changed since it ran")
            && err.contains(&ca.display().to_string()),
        "{err}"
    );
    assert_eq!(b.history().revisions.len(), 2);
    // The config file is untouched by a refused revert.
    assert_eq!(
        std::fs::read_to_string(&b.config).unwrap(),
        with_ca(&[SPIFFE_OTHER])
    );

    // --force applies its config with the bundle as it is now.
    let (code, out, err) = b.rollout(&["revert", "1", "--force"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("reverted to revision 1 (now revision 3)"),
        "{out}"
    );
    assert_eq!(listed(&b.history())[0], (3, How::Revert, Some(1)));
    b.stop();
}

/// Connections from the allowed client; each must get through.
async fn serve_allowed(addr: SocketAddr, pki: &Pki, n: usize) {
    for _ in 0..n {
        passes(addr, ORDERS, pki.frontend_config(), b"ok").await;
    }
}

/// Connections from a client no bundle trusts; each must be refused.
async fn refuse(addr: SocketAddr, pki: &Pki, creds: &ClientCreds, n: usize) {
    for _ in 0..n {
        let _ = refusal(addr, ORDERS, pki.client_config(Some(creds))).await;
    }
}

fn auto_reverts(metrics: &str, result: &str) -> u64 {
    series(
        metrics,
        &format!("gateway_auto_reverts_total{{result=\"{result}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_revert_fires_on_a_broken_trust_bundle_and_not_on_normal_traffic() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let settings = "auto_revert = true\nauto_revert_window = \"3s\"\nauto_revert_factor = 10\nauto_revert_min_failures = 5\n";
    let v1 = config(&pki, settings, backend.addr, &[SPIFFE_FRONTEND]);
    let b = Binary::start(&pki, &v1);
    let (stranger, other_bundle) = foreign(&pki, "other-roots.pem");
    serve_allowed(b.app, &pki, 5).await;

    // A harmless reload under normal traffic (one more CA trusted), the
    // odd stranger refused: below the floor, watched for its window and
    // kept.
    let v2 = with_extra_ca(&pki, &v1);
    b.reload(&v2);
    serve_allowed(b.app, &pki, 10).await;
    refuse(b.app, &pki, &stranger, 2).await;
    wait_for("the harmless reload's window to pass", || {
        log_count(&b.stderr, "auto_revert: the reload passed its window") == 1
    });
    let metrics = scrape(b.admin).await;
    assert_eq!(auto_reverts(&metrics, "applied"), 0, "{metrics}");
    assert_eq!(
        listed(&b.history()),
        [(2, How::Reload, None), (1, How::Start, None)]
    );

    // A reload to a bundle that does not trust the clients' CA: every
    // allowed client now fails its handshake, and the gateway goes back.
    let broken = v2.replace(
        &pki.path("roots-and-extra.pem").display().to_string(),
        &other_bundle.display().to_string(),
    );
    b.reload(&broken);
    let broke = std::time::Instant::now();
    let failed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(tls) = connect(b.app, ORDERS, pki.frontend_config()).await
                && echo_roundtrip(tls, b"x".to_vec()).await.is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(failed.is_ok(), "not reverted within 5 s");
    eprintln!(
        "auto_revert: the allowed client served again {:?} after the broken reload",
        broke.elapsed()
    );
    serve_allowed(b.app, &pki, 3).await;
    let metrics = scrape(b.admin).await;
    assert_eq!(auto_reverts(&metrics, "applied"), 1, "{metrics}");
    assert_eq!(auto_reverts(&metrics, "failed"), 0, "{metrics}");
    assert!(
        series(
            &metrics,
            "gateway_handshake_failures_total{listener=\"edge\",reason=\"unknown_ca\"}"
        ) >= 5
    );
    assert_eq!(
        listed(&b.history()),
        [
            (4, How::AutoRevert, Some(2)),
            (3, How::Reload, None),
            (2, How::Reload, None),
            (1, How::Start, None)
        ]
    );
    // Loudly: an error line saying so; and the file holds revision 2 again.
    let log = std::fs::read_to_string(&b.stderr).unwrap();
    assert!(
        log.lines().any(|l| l.contains("\"level\":\"ERROR\"")
            && l.contains("auto_revert: reverted to the previous revision")),
        "{log}"
    );
    assert_eq!(std::fs::read_to_string(&b.config).unwrap(), v2);

    // A revert is never watched: more failures now revert nothing.
    refuse(b.app, &pki, &stranger, 12).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let metrics = scrape(b.admin).await;
    assert_eq!(auto_reverts(&metrics, "applied"), 1, "{metrics}");
    assert_eq!(b.history().revisions.len(), 4);
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auto_revert_that_cannot_be_applied_is_logged_and_counted() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let ca = pki.write("bundle.pem", &pki.root.cert_pem);
    let settings =
        "auto_revert = true\nauto_revert_window = \"5s\"\nauto_revert_min_failures = 3\n";
    let v1 = config(&pki, settings, backend.addr, &[SPIFFE_FRONTEND]).replace(
        &pki.path("client-roots.pem").display().to_string(),
        &ca.display().to_string(),
    );
    let b = Binary::start(&pki, &v1);
    // Served before: the client's address is one auto_revert listens to.
    serve_allowed(b.app, &pki, 1).await;
    // The bundle is replaced in place and reloaded: the revision before
    // named the same file, now changed, so going back would apply the
    // broken bundle again; the revert is refused, loudly.
    let (_, other) = foreign(&pki, "other.pem");
    std::fs::copy(&other, &ca).unwrap();
    b.reload(&v1.replace("watch_files = false", "watch_files = false\n# new bundle"));
    refuse(b.app, &pki, &pki.frontend(), 5).await;
    wait_for("the refused auto-revert", || {
        log_count(
            &b.stderr,
            "auto_revert: the revert was refused: the reload that broke handshakes still serves",
        ) == 1
    });
    let metrics = scrape(b.admin).await;
    assert_eq!(auto_reverts(&metrics, "failed"), 1, "{metrics}");
    assert_eq!(auto_reverts(&metrics, "applied"), 0, "{metrics}");
    assert_eq!(b.history().revisions.len(), 2);
    b.stop();
}

/// A history directory others can write is never written; the gateway
/// serves on, says why and counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_that_cannot_be_written_never_stops_serving() {
    use std::os::unix::fs::PermissionsExt as _;
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let dir = pki.path("revisions");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let b = Binary::start(&pki, &config(&pki, "", backend.addr, &[SPIFFE_FRONTEND]));
    passes(b.app, ORDERS, pki.frontend_config(), b"served").await;
    wait_for("the history error", || {
        log_count(&b.stderr, "revision history: this config was not recorded") == 1
    });
    let metrics = scrape(b.admin).await;
    assert_eq!(
        series(&metrics, "gateway_revisions_errors_total{reason=\"write\"}"),
        1,
        "{metrics}"
    );
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    assert!(Path::new(&dir).is_dir());
    b.stop();
}

/// Handshakes from `source` (a loopback address of its own) with a
/// certificate no bundle trusts; each must be refused.
async fn refuse_from(
    addr: SocketAddr,
    source: std::net::IpAddr,
    pki: &Pki,
    creds: &ClientCreds,
    n: usize,
) {
    for _ in 0..n {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source, 0)).unwrap();
        let tcp = socket.connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(ORDERS.to_owned()).unwrap();
        let connector = tokio_rustls::TlsConnector::from(pki.client_config(Some(creds)));
        let refused =
            match tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
                .await
                .expect("the handshake ends")
            {
                Err(_) => true,
                Ok(mut tls) => {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let _ = tls.write_all(b"ping").await;
                    let mut buf = [0u8; 8];
                    !matches!(
                        tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await,
                        Ok(Ok(n)) if n > 0
                    )
                }
            };
        assert!(refused, "a certificate from an unknown CA was served");
    }
}

/// Anyone can present a self-signed certificate: failures from sources
/// the gateway never served a verified certificate must not revert a
/// reload (else any scanner undoes any change, a CA removal included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_revert_ignores_failures_from_sources_never_served() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let settings = "auto_revert = true\nauto_revert_window = \"3s\"\nauto_revert_factor = 10\nauto_revert_min_failures = 5\n";
    let v1 = config(&pki, settings, backend.addr, &[SPIFFE_FRONTEND]);
    let b = Binary::start(&pki, &v1);
    let (stranger, _) = foreign(&pki, "other-roots.pem");
    serve_allowed(b.app, &pki, 3).await;
    let v2 = with_extra_ca(&pki, &v1);
    b.reload(&v2);
    // Forty unknown-CA handshakes from an address never served: far past
    // the floor and the factor, were they counted.
    let attacker: std::net::IpAddr = "127.11.0.9".parse().unwrap();
    refuse_from(b.app, attacker, &pki, &stranger, 40).await;
    wait_for("the reload's window to pass", || {
        log_count(&b.stderr, "auto_revert: the reload passed its window") == 1
    });
    let metrics = scrape(b.admin).await;
    assert_eq!(auto_reverts(&metrics, "applied"), 0, "{metrics}");
    assert!(
        series(
            &metrics,
            "gateway_handshake_failures_total{listener=\"edge\",reason=\"unknown_ca\"}"
        ) >= 40,
        "{metrics}"
    );
    assert_eq!(
        listed(&b.history()),
        [(2, How::Reload, None), (1, How::Start, None)]
    );
    serve_allowed(b.app, &pki, 1).await;
    b.stop();
}

/// A client whose handshake and echo both succeed.
async fn served(addr: SocketAddr, pki: &Pki, creds: &ClientCreds) -> bool {
    match connect(addr, ORDERS, pki.client_config(Some(creds))).await {
        Ok(tls) => echo_roundtrip(tls, b"x".to_vec()).await.is_ok(),
        Err(_) => false,
    }
}

/// Long enough for a watched reload's window ("3s") to end and a tick
/// to judge it.
const PAST_THE_WINDOW: Duration = Duration::from_millis(4500);

const WATCH_3S: &str = "auto_revert = true\nauto_revert_window = \"3s\"\nauto_revert_factor = 10\nauto_revert_min_failures = 5\n";

/// A reload adds a CRL revoking a client; failures from a source
/// auto_revert counts then ask to go back to the revision without it.
/// That revert would lift the revocation: refused, logged, counted. By
/// hand it needs `--force`, and the refusal says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revert_never_silently_lifts_a_revocation() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let (victim, serial) = pki.revocable_frontend("victim");
    let v1 = config(&pki, WATCH_3S, backend.addr, &[SPIFFE_FRONTEND]);
    let b = Binary::start(&pki, &v1);
    assert!(served(b.app, &pki, &victim).await);
    pki.write("crl.pem", &pki.intermediate.crl(1, &[&serial]).unwrap());
    // The CRL comes with one more trusted CA: a reload auto_revert watches
    // (a CRL alone changes no trust anchor and is never watched).
    let v2 = with_extra_ca(
        &pki,
        &with_test_defaults(
            &(head(&pki, WATCH_3S)
                + &listener_toml(&pki, "edge", &pki.crls_line(&["crl.pem"]))
                + &route_toml("orders", &[ORDERS], &[backend.addr], &[SPIFFE_FRONTEND])),
        ),
    );
    assert!(v2.contains("roots-and-extra.pem"), "{v2}");
    b.reload(&v2);
    assert!(!served(b.app, &pki, &victim).await, "revoked");
    // From an address auto_revert listens to (the victim was served
    // from it): enough failures to ask for the revert.
    let (stranger, _) = foreign(&pki, "other-roots.pem");
    refuse(b.app, &pki, &stranger, 12).await;
    wait_for("the refused auto-revert", || {
        log_count(
            &b.stderr,
            "auto_revert: the revert was refused: the reload that broke handshakes still serves",
        ) == 1
    });
    assert!(!served(b.app, &pki, &victim).await, "still revoked");
    let metrics = scrape(b.admin).await;
    assert_eq!(auto_reverts(&metrics, "failed"), 1, "{metrics}");
    assert_eq!(auto_reverts(&metrics, "applied"), 0, "{metrics}");
    let log = std::fs::read_to_string(&b.stderr).unwrap();
    assert!(
        log.contains("reverting to it would lift those revocations"),
        "{log}"
    );
    assert_eq!(std::fs::read_to_string(&b.config).unwrap(), v2);
    assert_eq!(b.history().revisions.len(), 2);

    // By hand: refused without --force, saying why; forced, it applies.
    let (code, out, err) = b.rollout(&["revert", "1"]);
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("would lift those revocations") && err.contains("--force"),
        "{err}"
    );
    assert!(!served(b.app, &pki, &victim).await, "still revoked");
    let (code, out, err) = b.rollout(&["revert", "1", "--force"]);
    assert_eq!(code, 0, "{out} {err}");
    assert!(served(b.app, &pki, &victim).await, "lifted on purpose");
    b.stop();
}

/// While auto_revert is on, failures from a source it counts must not
/// veto a reload the operator meant beyond doubt: a forced one, or one
/// whose own config switches auto_revert off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_reload_or_one_switching_auto_revert_off_is_never_auto_reverted() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let v1 = config(
        &pki,
        WATCH_3S,
        backend.addr,
        &[SPIFFE_FRONTEND, SPIFFE_OTHER],
    );
    let b = Binary::start(&pki, &v1);
    let intruder = pki.client("intruder", &LeafSpec::client("intruder", &[SPIFFE_OTHER]));
    let (stranger, _) = foreign(&pki, "other-roots.pem");
    assert!(served(b.app, &pki, &intruder).await);

    // Forced, auto_revert still on in its config.
    let v2 = config(&pki, WATCH_3S, backend.addr, &[SPIFFE_FRONTEND]);
    std::fs::write(&b.config, &v2).unwrap();
    let socket = b.socket.display().to_string();
    let (code, out, err) = gateway_tests::process::cli(&["reload", "--force", "--socket", &socket]);
    assert_eq!(code, 0, "{out} {err}");
    assert!(!served(b.app, &pki, &intruder).await, "narrowed");
    refuse(b.app, &pki, &stranger, 12).await;
    tokio::time::sleep(PAST_THE_WINDOW).await;
    assert!(!served(b.app, &pki, &intruder).await, "still narrowed");
    assert_eq!(
        log_count(&b.stderr, "auto_revert: not watched: the reload was forced"),
        1
    );

    // Unforced, switching auto_revert off (judged by the settings of v2,
    // which had it on): not watched either.
    let v3 = config(
        &pki,
        "auto_revert = false\n",
        backend.addr,
        &[SPIFFE_FRONTEND],
    );
    b.reload(&v3);
    refuse(b.app, &pki, &stranger, 12).await;
    tokio::time::sleep(PAST_THE_WINDOW).await;
    assert!(!served(b.app, &pki, &intruder).await, "still narrowed");
    assert_eq!(
        log_count(
            &b.stderr,
            "auto_revert: not watched: the reload's own config turns auto_revert off"
        ),
        1
    );
    let metrics = scrape(b.admin).await;
    assert_eq!(auto_reverts(&metrics, "applied"), 0, "{metrics}");
    assert_eq!(std::fs::read_to_string(&b.config).unwrap(), v3);
    assert_eq!(b.history().revisions.len(), 3);
    serve_allowed(b.app, &pki, 1).await;
    b.stop();
}

/// Removing a compromised CA: its holders' handshakes now fail, exactly
/// the failures a broken bundle makes, and they would undo the removal
/// by connecting. A reload that only removes trust anchors is not
/// watched (a bundle replaced by another still is: see
/// `auto_revert_fires_on_a_broken_trust_bundle_and_not_on_normal_traffic`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_only_removes_a_ca_is_not_auto_reverted() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let (compromised, compromised_root) = foreign(&pki, "compromised-root.pem");
    let good = std::fs::read_to_string(pki.path("client-roots.pem")).unwrap();
    let both = pki.write(
        "both.pem",
        &(good + &std::fs::read_to_string(&compromised_root).unwrap()),
    );
    let v2 = config(&pki, WATCH_3S, backend.addr, &[SPIFFE_FRONTEND]);
    let v1 = v2.replace(
        &pki.path("client-roots.pem").display().to_string(),
        &both.display().to_string(),
    );
    let b = Binary::start(&pki, &v1);
    assert!(served(b.app, &pki, &compromised).await, "v1 trusts it");
    b.reload(&v2);
    assert!(!served(b.app, &pki, &compromised).await, "removed");
    refuse(b.app, &pki, &compromised, 12).await;
    tokio::time::sleep(PAST_THE_WINDOW).await;
    assert!(!served(b.app, &pki, &compromised).await, "still removed");
    let log = std::fs::read_to_string(&b.stderr).unwrap();
    assert!(
        log.lines().any(|l| l.contains("\"level\":\"WARN\"")
            && l.contains("auto_revert: not watched: the reload only removes trust anchors")),
        "{log}"
    );
    let metrics = scrape(b.admin).await;
    assert_eq!(auto_reverts(&metrics, "applied"), 0, "{metrics}");
    assert_eq!(b.history().revisions.len(), 2);
    serve_allowed(b.app, &pki, 1).await;
    b.stop();
}

/// A narrowing (or a switch to enforce) changes no trust anchor: it cannot
/// break a certificate check, so certificate-check failures after it,
/// even from an address served before (a NAT a client shares with an
/// attacker), are not its doing and never revert it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_narrowing_is_not_reverted_by_failures_from_an_address_served_before() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let settings = "auto_revert = true\nauto_revert_window = \"3s\"\nauto_revert_factor = 10\nauto_revert_min_failures = 5\n";
    let intruder = pki.client("intruder", &LeafSpec::client("i", &[SPIFFE_OTHER]));
    let v1 = config(
        &pki,
        settings,
        backend.addr,
        &[SPIFFE_FRONTEND, SPIFFE_OTHER],
    );
    let b = Binary::start(&pki, &v1);
    let (stranger, _) = foreign(&pki, "other-roots.pem");
    // Served from 127.0.0.1 (exempt in tests, so vouched for), as the
    // attacker below.
    serve_allowed(b.app, &pki, 2).await;
    passes(b.app, ORDERS, pki.client_config(Some(&intruder)), b"in").await;
    let v2 = config(&pki, settings, backend.addr, &[SPIFFE_FRONTEND]);
    b.reload(&v2);
    wait_for("the narrowing said to be not watched", || {
        log_count(
            &b.stderr,
            "auto_revert: not watched: the reload does not change which CAs are trusted",
        ) > 0
    });
    refuse(b.app, &pki, &stranger, 30).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let metrics = scrape(b.admin).await;
    assert_eq!(auto_reverts(&metrics, "applied"), 0, "{metrics}");
    assert_eq!(
        listed(&b.history()),
        [(2, How::Reload, None), (1, How::Start, None)]
    );
    let _ = refusal(b.app, ORDERS, pki.client_config(Some(&intruder))).await;
    serve_allowed(b.app, &pki, 1).await;
    b.stop();
}

/// A `revisions_dir` others can write is never written, and never read
/// either: a local user plants a well-formed revision 1 (the number the
/// unwritten start revision held) with a config of their own; the revert
/// is refused, saying why, nothing is applied or written back, the history
/// lists nothing but the reason, and the refusals are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_planted_in_a_directory_others_can_write_is_never_applied() {
    use std::os::unix::fs::PermissionsExt as _;
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let dir = pki.path("revisions");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let v1 = config(&pki, "", backend.addr, &[SPIFFE_FRONTEND]);
    let b = Binary::start(&pki, &v1);
    let intruder = pki.client("intruder", &LeafSpec::client("intruder", &[SPIFFE_OTHER]));
    denied(b.app, &pki, &intruder).await;
    // The plant: revision 1 naming the real config file, its own text.
    let evil = config(&pki, "# planted", backend.addr, &[SPIFFE_OTHER]);
    let parsed = gateway::config::Config::parse(&evil, &b.config, &pki.path("")).unwrap();
    let mut rev = gateway::revisions::Revision::of(&parsed, How::Start, None);
    rev.number = 1;
    let planted = dir.join("rev-0000000001.json");
    std::fs::write(&planted, serde_json::to_vec(&rev).unwrap()).unwrap();
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o600)).unwrap();

    let (code, _, err) = b.rollout(&["revert", "1"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("not trusted") && err.contains("writable by others"),
        "{err}"
    );
    denied(b.app, &pki, &intruder).await;
    assert_eq!(std::fs::read_to_string(&b.config).unwrap(), v1);
    let h = b.history();
    assert!(h.revisions.is_empty(), "{h:?}");
    assert_eq!(h.current, None, "an unwritten revision is never current");
    assert!(
        h.skipped.iter().any(|s| s.contains("writable by others")),
        "{h:?}"
    );
    let metrics = scrape(b.admin).await;
    assert!(
        series(
            &metrics,
            "gateway_revisions_errors_total{reason=\"unsafe\"}"
        ) >= 2,
        "{metrics}"
    );
    b.stop();
}

/// A revert when the config file is a symlink (config management, a
/// release directory) is refused, saying why: writing it back would turn
/// the link into a plain file, and every later edit where the link points
/// would be silently ignored. The link stays, and the operator's next
/// change through it takes effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revert_never_replaces_a_symlinked_config() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let v1 = config(&pki, "", backend.addr, &[SPIFFE_FRONTEND, SPIFFE_OTHER]);
    let target = pki.write("release.toml", &v1);
    let link = pki.path("gateway.toml");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let stderr = pki.path("gateway.stderr");
    let proc = run_binary(&link, &stderr, &[]);
    let app = wait_listening(&stderr);
    let b = Binary {
        proc,
        app,
        admin: admin_addr(&stderr),
        socket: pki.path("admin.sock"),
        config: target.clone(),
        stderr,
    };
    b.reload(&v1.replace("watch_files = false", "watch_files = false\n# v2"));
    assert_eq!(listed(&b.history()).len(), 2);
    let (code, _, err) = b.rollout(&["revert", "1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is a symbolic link"), "{err}");
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // The operator removes the intruder where the link points: applied.
    let intruder = pki.client("intruder", &LeafSpec::client("intruder", &[SPIFFE_OTHER]));
    b.reload(&config(&pki, "", backend.addr, &[SPIFFE_FRONTEND]));
    denied(b.app, &pki, &intruder).await;
    b.stop();
}

/// A connection from `creds`, trusted but not allowed: refused by policy.
async fn denied(addr: SocketAddr, pki: &Pki, creds: &ClientCreds) {
    assert_eq!(
        refusal(addr, ORDERS, pki.client_config(Some(creds))).await,
        rustls::AlertDescription::AccessDenied
    );
}

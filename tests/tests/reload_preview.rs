//! A reload's preview and the reload guard, end to end: the preview of a
//! narrowing config lists exactly the live connections the real reload then
//! closes, and changes nothing; `max_reload_closes` refuses a reload over
//! it unless forced (admin socket, CLI, SIGHUP after the force marker),
//! never one that brings a new CRL; the preview is never served over TCP.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use gateway::admin::client::{self, ClientError, Endpoint};
use gateway::registry::AFTER_RELOAD;
use gateway_tests::process::{Reap, cli, run_binary, signal, wait_for, wait_listening};
use gateway_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const SNI: &str = "orders.example.internal";

/// The gateway's config: `orders` allowing `allow`, an admin endpoint
/// (TCP and socket), `top` at the top level, `listener` in the listener.
fn config(pki: &Pki, backend: &EchoBackend, top: &str, listener: &str, allow: &[&str]) -> String {
    with_test_defaults(
        &(format!("admin = \"127.0.0.1:0\"\nadmin_socket = \"admin.sock\"\n{top}\n")
            + &listener_toml(pki, "edge", listener)
            + &route_toml("orders", &[SNI], &[backend.addr], allow)),
    )
}

/// Writes `toml` as the gateway's config file (what `POST /reload` reads).
fn write_config(pki: &Pki, toml: &str) {
    pki.write("gateway.toml", toml);
}

/// Starts the gateway from `toml`, also written as its config file.
async fn start(pki: &Pki, toml: &str) -> RunningGateway {
    write_config(pki, toml);
    RunningGateway::start(pki, toml).await
}

async fn ping(tls: &mut TlsStream<TcpStream>) -> std::io::Result<()> {
    tls.write_all(b"ping").await?;
    let mut buf = [0u8; 4];
    tokio::time::timeout(STEP, tls.read_exact(&mut buf))
        .await
        .map_err(std::io::Error::other)??;
    Ok(())
}

async fn closed(tls: &mut TlsStream<TcpStream>) {
    let mut buf = [0u8; 16];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
            Err(_) => panic!("still open"),
            Ok(Ok(0) | Err(_)) => return,
            Ok(Ok(_)) => {}
        }
    }
}

/// A live connection and its client address as the gateway names it.
struct Held {
    tls: TlsStream<TcpStream>,
    source: String,
}

async fn hold(gw: &RunningGateway, pki: &Pki, creds: &ClientCreds) -> Held {
    let mut tls = connect(gw.app_addr, SNI, pki.client_config(Some(creds)))
        .await
        .expect("connects");
    ping(&mut tls).await.expect("echo");
    let source = tls.get_ref().0.local_addr().expect("addr").to_string();
    Held { tls, source }
}

fn socket(gw: &RunningGateway) -> Endpoint {
    Endpoint::Socket(gw.admin_socket.clone().expect("admin_socket"))
}

fn sources(v: &[gateway::registry::Affected]) -> BTreeSet<String> {
    v.iter().map(|a| a.source.clone()).collect()
}

/// Two frontends and two others, held; the candidate allows only the
/// frontends.
struct Scene {
    pki: Pki,
    _backend: EchoBackend,
    gw: RunningGateway,
    friends: Vec<Held>,
    others: Vec<Held>,
    narrow: String,
}

async fn scene(top: &str, listener: &str) -> Scene {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    let wide = config(
        &pki,
        &backend,
        top,
        listener,
        &[SPIFFE_FRONTEND, SPIFFE_OTHER],
    );
    let narrow = config(&pki, &backend, top, listener, &[SPIFFE_FRONTEND]);
    let gw = start(&pki, &wide).await;
    let other = pki.client(
        "other",
        &gateway::pki::LeafSpec::client("other", &[SPIFFE_OTHER]),
    );
    let mut friends = Vec::new();
    let mut others = Vec::new();
    for _ in 0..2 {
        friends.push(hold(&gw, &pki, &pki.frontend()).await);
        others.push(hold(&gw, &pki, &other).await);
    }
    Scene {
        pki,
        _backend: backend,
        gw,
        friends,
        others,
        narrow,
    }
}

#[tokio::test]
async fn a_preview_lists_exactly_what_the_reload_then_closes_and_changes_nothing() {
    let mut s = scene("", "").await;
    let candidate = s.pki.write("candidate.toml", &s.narrow);
    let before = s.gw.scrape().await;

    let preview = client::preview(&socket(&s.gw), &candidate, Some("7d"))
        .await
        .expect("preview");
    let expected: BTreeSet<String> = s.others.iter().map(|h| h.source.clone()).collect();
    assert_eq!(sources(&preview.would_close), expected, "{preview:#?}");
    for c in &preview.would_close {
        assert_eq!((c.listener.as_str(), c.route.as_str()), ("edge", "orders"));
        assert_eq!(c.identity, Some(vec![SPIFFE_OTHER.to_owned()]));
        assert!(!c.revoked);
    }
    assert!(preview.orphaned.is_empty());
    assert!(preview.routes.is_empty(), "{:?}", preview.routes);
    assert_eq!(preview.refused, None);
    assert!(
        preview
            .text()
            .contains("live connections it would close: 2")
    );

    // Nothing changed: every connection still flows, no reload counted,
    // the running state still admits the others.
    for h in s.friends.iter_mut().chain(s.others.iter_mut()) {
        ping(&mut h.tls)
            .await
            .expect("still open after the preview");
    }
    assert_eq!(s.gw.registry.len(), 4);
    let after = s.gw.scrape().await;
    for series in [
        "gateway_reloads_total{result=\"ok\"}",
        "gateway_reloads_total{result=\"failed\"}",
    ] {
        assert_eq!(
            gateway_tests::process::series(&before, series),
            gateway_tests::process::series(&after, series),
            "{series}"
        );
    }
    let other = s.pki.client(
        "other2",
        &gateway::pki::LeafSpec::client("other", &[SPIFFE_OTHER]),
    );
    drop(hold(&s.gw, &s.pki, &other).await);
    let gone = async {
        while s.gw.registry.len() != 4 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(STEP, gone)
        .await
        .expect("the extra connection gone");

    // The real reload (POST /reload of the config file) closes exactly
    // those: compare the access log's closes with the preview.
    while s.gw.log.try_recv().is_ok() {}
    write_config(&s.pki, &s.narrow);
    let reloaded = client::reload(&socket(&s.gw), false).await.expect("reload");
    assert_eq!(reloaded.connections_closed, 2, "{reloaded:?}");
    let mut closed_sources = BTreeSet::new();
    for h in &mut s.others {
        closed(&mut h.tls).await;
    }
    while closed_sources.len() < 2 {
        let r = s.gw.next_record().await;
        if r.reason.contains(AFTER_RELOAD) {
            closed_sources.insert(r.client.to_string());
        }
    }
    assert_eq!(closed_sources, expected);
    for h in &mut s.friends {
        ping(&mut h.tls).await.expect("an allowed client stays");
    }
}

/// An unforced reload on the socket, refused by the guard (409): its
/// message.
async fn guard_refusal(gw: &RunningGateway) -> String {
    let refused = client::reload(&socket(gw), false).await.unwrap_err();
    let ClientError::Refused {
        status, message, ..
    } = &refused
    else {
        panic!("{refused}");
    };
    assert_eq!(*status, 409, "{message}");
    message.clone()
}

#[tokio::test]
async fn the_reload_guard_refuses_over_its_limit_and_force_applies() {
    let mut s = scene("max_reload_closes = 1", "").await;
    write_config(&s.pki, &s.narrow);
    let candidate = s.pki.path("gateway.toml");
    let preview = client::preview(&socket(&s.gw), &candidate, None)
        .await
        .expect("preview");
    assert!(preview.guard.holds(), "{:?}", preview.guard);
    assert_eq!(preview.guard.counted.get("edge"), Some(&2));

    let message = guard_refusal(&s.gw).await;
    assert!(
        message.contains("max_reload_closes (1)") && message.contains("edge: 2"),
        "{message}"
    );
    for h in s.friends.iter_mut().chain(s.others.iter_mut()) {
        ping(&mut h.tls)
            .await
            .expect("a refused reload closes nothing");
    }
    let metrics = s.gw.scrape().await;
    let series = |name: &str| gateway_tests::process::series(&metrics, name);
    assert_eq!(series("gateway_reload_guard_total{result=\"refused\"}"), 1);
    assert_eq!(series("gateway_reloads_total{result=\"failed\"}"), 1);

    let reloaded = client::reload(&socket(&s.gw), true).await.expect("forced");
    assert_eq!(reloaded.connections_closed, 2);
    for h in &mut s.others {
        closed(&mut h.tls).await;
    }
    let metrics = s.gw.scrape().await;
    let series = |name: &str| gateway_tests::process::series(&metrics, name);
    assert_eq!(series("gateway_reload_guard_total{result=\"forced\"}"), 1);
    assert_eq!(series("gateway_reloads_total{result=\"ok\"}"), 1);
}

/// The guard is the serving config's: a candidate that drops the
/// `max_reload_closes` line (or a revision that never had it) cannot
/// unguard itself. Its refusal names whose connections it counted, so an
/// identity the reload removes that holds it back is plain to see.
#[tokio::test]
async fn a_candidate_without_the_limit_is_judged_by_the_serving_one() {
    let mut s = scene("max_reload_closes = 1", "").await;
    let unguarded = config(&s.pki, &s._backend, "", "", &[SPIFFE_FRONTEND]);
    write_config(&s.pki, &unguarded);
    let candidate = s.pki.path("gateway.toml");
    let preview = client::preview(&socket(&s.gw), &candidate, None)
        .await
        .expect("preview");
    assert_eq!(preview.guard.limit, Some(1), "{:?}", preview.guard);
    assert!(preview.guard.holds(), "{:?}", preview.guard);

    let message = guard_refusal(&s.gw).await;
    assert!(
        message.contains("max_reload_closes (1)")
            && message.contains("edge: 2 [")
            && message.contains(SPIFFE_OTHER)
            && message.contains(" x2]"),
        "the refusal names the identity and its connections: {message}"
    );
    for h in s.friends.iter_mut().chain(s.others.iter_mut()) {
        ping(&mut h.tls)
            .await
            .expect("a refused reload closes nothing");
    }
    // Forced, it applies; from then on its own (absent) limit serves.
    let reloaded = client::reload(&socket(&s.gw), true).await.expect("forced");
    assert_eq!(reloaded.connections_closed, 2);
    for h in &mut s.others {
        closed(&mut h.tls).await;
    }
}

#[tokio::test]
async fn the_reload_guard_never_holds_back_a_new_crl() {
    let pki_crl = |s: &Scene, n: u64, revoked: &[&[u8]]| {
        s.pki.write(
            "clients.crl.pem",
            &s.pki.intermediate.crl(n, revoked).unwrap(),
        );
    };
    let mut s = {
        // The scene with a CRL in place before the gateway starts.
        let pki = Pki::new();
        pki.write("clients.crl.pem", &pki.intermediate.crl(1, &[]).unwrap());
        let crls = pki.crls_line(&["clients.crl.pem"]);
        let backend = EchoBackend::start().await;
        let top = "max_reload_closes = 1";
        let wide = config(&pki, &backend, top, &crls, &[SPIFFE_FRONTEND, SPIFFE_OTHER]);
        let narrow = config(&pki, &backend, top, &crls, &[SPIFFE_FRONTEND]);
        let gw = start(&pki, &wide).await;
        let other = pki.client(
            "other",
            &gateway::pki::LeafSpec::client("other", &[SPIFFE_OTHER]),
        );
        let mut others = Vec::new();
        for _ in 0..2 {
            others.push(hold(&gw, &pki, &other).await);
        }
        Scene {
            pki,
            _backend: backend,
            gw,
            friends: Vec::new(),
            others,
            narrow,
        }
    };
    let (doomed, serial) = s.pki.revocable_frontend("doomed");
    s.friends.push(hold(&s.gw, &s.pki, &doomed).await);
    s.friends.push(hold(&s.gw, &s.pki, &s.pki.frontend()).await);

    // Narrowing alone: 2 closes on edge, over 1: refused.
    write_config(&s.pki, &s.narrow);
    let e = client::reload(&socket(&s.gw), false).await.unwrap_err();
    assert!(e.to_string().contains("409"), "{e}");

    // The same narrowing with a new CRL revoking `doomed`: applied, all
    // three closed, and the preview said so beforehand.
    pki_crl(&s, 2, &[&serial]);
    let preview = client::preview(&socket(&s.gw), &s.pki.path("gateway.toml"), None)
        .await
        .expect("preview");
    assert_eq!(preview.would_close.len(), 3, "{preview:#?}");
    assert_eq!(
        preview.would_close.iter().filter(|c| c.revoked).count(),
        1,
        "{preview:#?}"
    );
    assert!(preview.guard.exempt.is_some() && !preview.guard.holds());
    let reloaded = client::reload(&socket(&s.gw), false)
        .await
        .expect("a reload bringing a CRL is never held");
    assert_eq!(reloaded.connections_closed, 3);
    for h in s.others.iter_mut() {
        closed(&mut h.tls).await;
    }
    closed(&mut s.friends[0].tls).await;
    ping(&mut s.friends[1].tls)
        .await
        .expect("the frontend stays");
}

#[tokio::test]
async fn the_preview_and_reload_are_refused_over_tcp() {
    let s = scene("", "").await;
    let candidate = s.pki.write("candidate.toml", &s.narrow);
    let tcp = Endpoint::Tcp(s.gw.admin_addr.expect("admin"));
    let e = client::preview(&tcp, &candidate, None).await.unwrap_err();
    assert!(
        e.to_string().contains("403") && e.to_string().contains("admin_socket only"),
        "{e}"
    );
    let e = client::reload(&tcp, true).await.unwrap_err();
    assert!(e.to_string().contains("403"), "{e}");
    assert_eq!(s.gw.registry.len(), 4);
    // A relative candidate path is refused: the gateway's directory is
    // not the caller's.
    let e = client::preview(&socket(&s.gw), Path::new("candidate.toml"), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("absolute"), "{e}");
    // A candidate that does not parse is a refused reload, not a failed
    // question.
    let broken = s.pki.write("broken.toml", "listeners = 7\n");
    let p = client::preview(&socket(&s.gw), &broken, None)
        .await
        .expect("answered");
    assert!(
        p.refused
            .as_deref()
            .is_some_and(|r| r.contains("listeners")),
        "{:?}",
        p.refused
    );
    assert!(p.would_close.is_empty());

    // The CLI refuses an address before asking, pointing at the socket.
    let admin = s.gw.admin_addr.unwrap();
    for against in [format!("http://{admin}"), admin.to_string()] {
        let (code, _, stderr) = cli(&[
            os("check"),
            os("--config"),
            candidate.as_os_str(),
            os("--against"),
            os(&against),
        ]);
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains("admin socket only"), "{stderr}");
    }
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_previews_guards_and_is_forced_by_cli_and_by_the_sighup_marker() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    // Relative paths in the candidate resolve against its own directory,
    // as `Config::load` does: the candidate lives in a directory of its
    // own and names the PKI's files from there.
    let toml = |allow: &[&str]| {
        format!(
            "watch_files = false\nmax_reload_closes = 0\n{}",
            config(&pki, &backend, "", "", allow)
        )
    };
    let path = pki.write("gateway.toml", &toml(&[SPIFFE_FRONTEND, SPIFFE_OTHER]));
    let stderr = pki.path("stderr.log");
    let proc: Reap = run_binary(&path, &stderr, &[]);
    let app = wait_listening(&stderr);
    let sock = pki.path("admin.sock");
    wait_for("the admin socket", || sock.exists());
    let other = pki.client(
        "other",
        &gateway::pki::LeafSpec::client("other", &[SPIFFE_OTHER]),
    );
    let held = |creds: ClientCreds| {
        let pki = &pki;
        async move {
            let mut tls = connect(app, SNI, pki.client_config(Some(&creds)))
                .await
                .expect("connects");
            ping(&mut tls).await.expect("echo");
            tls
        }
    };
    let mut a = held(other.clone()).await;
    let mut b = held(other.clone()).await;

    let sub = pki.dir.path().join("candidates");
    std::fs::create_dir(&sub).unwrap();
    let narrow = toml(&[SPIFFE_FRONTEND]).replace(&format!("{}/", pki.dir.path().display()), "../");
    assert!(narrow.contains("\"../server.key\""), "{narrow}");
    let candidate = sub.join("narrow.toml");
    std::fs::write(&candidate, &narrow).unwrap();

    // `gateway check --against SOCKET`: both listed, exit 1; the JSON too.
    let (code, out, err) = cli(&[
        os("check"),
        os("--config"),
        candidate.as_os_str(),
        os("--against"),
        sock.as_os_str(),
    ]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("live connections it would close: 2"), "{out}");
    assert!(out.contains("reload guard: would REFUSE"), "{out}");
    let (code, out, err) = cli(&[
        os("check"),
        os("--config"),
        candidate.as_os_str(),
        os("--against"),
        path.as_os_str(),
        os("--format"),
        os("json"),
    ]);
    assert_eq!(code, 1, "{err}");
    let p: gateway::preview::Preview = serde_json::from_str(&out).expect("json");
    assert_eq!(p.would_close.len(), 2);
    ping(&mut a).await.expect("the preview closed nothing");

    // The narrowing config in place: `gateway reload` is refused (0 allowed).
    std::fs::write(&path, toml(&[SPIFFE_FRONTEND])).unwrap();
    let (code, _, err) = cli(&[os("reload"), os("--config"), path.as_os_str()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("max_reload_closes (0)"), "{err}");
    // SIGHUP alone: refused too, logged with the counts.
    signal(&proc.0, "HUP");
    wait_for("the guard's log line after SIGHUP", || {
        process::log_count(
            &stderr,
            "reload refused by the reload guard, running state kept",
        ) >= 2
    });
    ping(&mut a).await.expect("still open");
    // SIGHUP after the marker: forced, the marker consumed.
    let marker = pki.path(gateway::preview::FORCE_MARKER);
    std::fs::write(&marker, "").unwrap();
    signal(&proc.0, "HUP");
    closed(&mut a).await;
    closed(&mut b).await;
    assert!(!marker.exists(), "the marker forces one reload only");
    assert!(
        process::log_count(&stderr, "reload guard overridden: forced") >= 1,
        "{}",
        std::fs::read_to_string(&stderr).unwrap_or_default()
    );

    // And `gateway reload --force` applies over the guard.
    let mut c = held(pki.frontend()).await;
    std::fs::write(&path, toml(&[SPIFFE_OTHER])).unwrap();
    let (code, _, err) = cli(&[os("reload"), os("--config"), path.as_os_str()]);
    assert_eq!(code, 1, "{err}");
    let (code, out, err) = cli(&[
        os("reload"),
        os("--force"),
        os("--socket"),
        sock.as_os_str(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 connection closed"), "{out}");
    closed(&mut c).await;
    signal(&proc.0, "TERM");
}

#[tokio::test]
async fn a_preview_records_no_crl_it_read() {
    let pki = Pki::new();
    let backend = EchoBackend::start().await;
    pki.write("clients.crl.pem", &pki.intermediate.crl(1, &[]).unwrap());
    let crls = pki.crls_line(&["clients.crl.pem"]);
    let toml = config(&pki, &backend, "", &crls, &[SPIFFE_FRONTEND]);
    let gw = start(&pki, &toml).await;
    // A newer CRL only previewed: a real reload would put it into service,
    // and an older one after it would be refused as a rollback.
    pki.write("clients.crl.pem", &pki.intermediate.crl(5, &[]).unwrap());
    let preview = client::preview(&socket(&gw), &pki.path("gateway.toml"), None)
        .await
        .expect("preview");
    assert_eq!(preview.refused, None);
    assert!(preview.guard.exempt.is_some(), "{:?}", preview.guard);
    pki.write("clients.crl.pem", &pki.intermediate.crl(2, &[]).unwrap());
    client::reload(&socket(&gw), false)
        .await
        .expect("CRL 2 after a preview of CRL 5 is no rollback: the preview recorded nothing");
    // Whereas after a real reload to 5, 2 is refused.
    pki.write("clients.crl.pem", &pki.intermediate.crl(5, &[]).unwrap());
    client::reload(&socket(&gw), false)
        .await
        .expect("reload to 5");
    pki.write("clients.crl.pem", &pki.intermediate.crl(3, &[]).unwrap());
    let e = client::reload(&socket(&gw), false).await.unwrap_err();
    assert!(e.to_string().contains("422"), "{e}");
    let preview = client::preview(&socket(&gw), &pki.path("gateway.toml"), None)
        .await
        .expect("preview");
    assert!(
        preview
            .refused
            .as_deref()
            .is_some_and(|r| r.contains("older")),
        "{:?}",
        preview.refused
    );
}

//! Problems with our own certificate and key are caught at start (and by
//! `gateway check`), naming the file and the reason.

use gateway::pki::{Authority, LeafSpec, Profile};
use gateway_tests::*;

async fn start_error(pki: &Pki) -> String {
    let toml = listener_toml(pki, "edge", "")
        + &route_toml(
            "orders",
            &["orders.example.internal"],
            &[dead_port()],
            &[SPIFFE_FRONTEND],
        );
    let config = gateway::Config::parse(&toml, &pki.path("gateway.toml"), pki.dir.path()).unwrap();
    match gateway::build(&config).await {
        Ok(_) => panic!("gateway started with a broken server identity"),
        Err(e) => e.to_string(),
    }
}

fn write_server(pki: &Pki, spec: &LeafSpec, issuer: &Authority, chain_extra: &str) {
    let leaf = issuer.issue(spec).unwrap();
    pki.write(
        "server-chain.pem",
        &format!("{}{chain_extra}", leaf.cert_pem),
    );
    pki.write("server.key", &leaf.key_pem);
}

#[tokio::test]
async fn expired_server_certificate_is_named() {
    let pki = Pki::new();
    let mut spec = LeafSpec::server("gw", &["dns:orders.example.internal"]);
    let now = time::OffsetDateTime::now_utc();
    spec.not_before = now - time::Duration::days(30);
    spec.not_after = now - time::Duration::days(1);
    write_server(&pki, &spec, &pki.intermediate, &pki.intermediate.cert_pem);
    let err = start_error(&pki).await;
    assert!(
        err.contains("server-chain.pem") && err.contains("expired at"),
        "{err}"
    );
    assert!(err.contains("listener \"edge\""), "{err}");
}

#[tokio::test]
async fn key_that_does_not_match_is_named() {
    let pki = Pki::new();
    let other = pki
        .intermediate
        .issue(&LeafSpec::server("other", &["dns:x"]))
        .unwrap();
    pki.write("server.key", &other.key_pem);
    let err = start_error(&pki).await;
    assert!(
        err.contains("server.key") && err.contains("does not match"),
        "{err}"
    );
}

#[tokio::test]
async fn chain_with_the_wrong_intermediate_does_not_verify() {
    let pki = Pki::new();
    let stranger = Authority::root("stranger")
        .unwrap()
        .intermediate("stranger int")
        .unwrap();
    let spec = LeafSpec::server("gw", &["dns:orders.example.internal"]);
    // Leaf from our intermediate, but the file carries someone else's.
    write_server(&pki, &spec, &pki.intermediate, &stranger.cert_pem);
    let err = start_error(&pki).await;
    assert!(err.contains("chain does not verify"), "{err}");
}

#[tokio::test]
async fn certificate_without_server_auth_is_refused() {
    let pki = Pki::new();
    let spec = LeafSpec::new(Profile::Client, "gw", &["dns:orders.example.internal"]);
    write_server(&pki, &spec, &pki.intermediate, &pki.intermediate.cert_pem);
    let err = start_error(&pki).await;
    assert!(err.contains("no serverAuth"), "{err}");
}

#[tokio::test]
async fn missing_files_and_garbage_are_named() {
    let pki = Pki::new();
    std::fs::remove_file(pki.path("client-roots.pem")).unwrap();
    let err = start_error(&pki).await;
    assert!(
        err.contains("client-roots.pem") && err.contains("cannot read"),
        "{err}"
    );
    pki.write("client-roots.pem", "not a certificate\n");
    let err = start_error(&pki).await;
    assert!(
        err.contains("client-roots.pem") && err.contains("no PEM certificate"),
        "{err}"
    );
}

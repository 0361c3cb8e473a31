//! What unit tests of several modules build alike: a listener's state from
//! a config, and a route without TLS material.

use std::sync::{Arc, OnceLock};

use crate::config::Mode;
use crate::pki::{Authority, LeafSpec};
use crate::policy::Policy;
use crate::state::{ListenerState, Route, State};

/// A config that parses (one listener, one route), its files not read.
pub const MINIMAL_CONFIG: &str = r#"
[[listeners]]
name = "edge"
bind = "127.0.0.1:8443"
cert = "server-chain.pem"
key = "server.key"
client_ca = "client-roots.pem"

[[listeners.routes]]
name = "orders"
server_names = ["orders.example.internal"]
backends = ["127.0.0.1:9000", "127.0.0.1:9001"]
allow = ["spiffe://example.internal/ns/shop/sa/frontend", "dns:batch.example.internal"]
"#;

/// A listener ("edge", one route "api") as the gateway builds it from a
/// config, built once per test binary.
pub fn listener_state() -> Arc<ListenerState> {
    static STATE: OnceLock<(tempfile::TempDir, Arc<ListenerState>)> = OnceLock::new();
    STATE
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let root = Authority::root("unit test root").unwrap();
            let server = root
                .issue(&LeafSpec::server("gw", &["dns:gw.example.internal"]))
                .unwrap();
            let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
            write("server.pem", &server.cert_pem);
            write("server.key", &server.key_pem);
            // Readable by its owner only, or the state refuses it.
            std::fs::set_permissions(
                dir.path().join("server.key"),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )
            .unwrap();
            write("ca.pem", &root.cert_pem);
            let text = "[[listeners]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\ncert = \"server.pem\"\n\
                        key = \"server.key\"\nclient_ca = \"ca.pem\"\noffload = \"userspace\"\n\
                        [[listeners.routes]]\nname = \"api\"\nbackends = [\"127.0.0.1:1\"]\n";
            let config = crate::Config::parse(text, &dir.path().join("g.toml"), dir.path()).unwrap();
            let state = State::from_config(&config).unwrap();
            (dir, state.listeners[0].clone())
        })
        .1
        .clone()
}

/// A route "api" in `mode` with `policy`, its client CA the listener's.
pub fn route(mode: Mode, policy: Policy) -> Route {
    Route {
        name: "api".into(),
        auth: crate::tls::RouteAuth {
            mode,
            trust: None,
            device: false,
            policy: Arc::new(policy),
        },
        backends: crate::upstream::Backends::new(vec!["127.0.0.1:1".into()]),
        upstream_tls: None,
        stats: Arc::default(),
        proxy_protocol: None,
        proxy_protocol_client_cert: false,
    }
}

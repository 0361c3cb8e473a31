//! `gateway.toml` and `guard.toml` as anyone who can write them might:
//! parsing and checking arbitrary text ends in a config or an error that
//! names the file, never a panic.

use std::path::Path;

pub fn gateway(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let source = Path::new("/fuzz/gateway.toml");
    if let Err(e) = gateway::Config::parse(text, source, Path::new("/fuzz")) {
        // Every error says where it came from.
        assert!(
            e.to_string().contains("/fuzz/gateway.toml"),
            "an error without its file: {e}"
        );
    }
}

pub fn guard(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let source = Path::new("/fuzz/guard.toml");
    if let Err(e) = gateway::remote_guard::parse(text, source) {
        assert!(
            e.to_string().contains("/fuzz/guard.toml"),
            "an error without its file: {e}"
        );
    }
}

//! The Grafana dashboard (`examples/grafana/gateway.json`): the metric
//! names its PromQL queries, for the tests that check the gateway serves
//! them (`metrics.rs`, and `guard.rs` and `block_list.rs` for the families
//! only a running guard or kernel block list serves).

use std::collections::BTreeSet;

/// Every metric name the dashboard queries.
pub fn metric_names() -> BTreeSet<String> {
    // Built in: the VM's test binaries run without the source tree.
    let text = include_str!("../../examples/grafana/gateway.json");
    let dashboard: serde_json::Value = serde_json::from_str(text).expect("dashboard is JSON");
    let mut queries = Vec::new();
    collect_queries(&dashboard, &mut queries);
    assert!(
        queries.len() >= 10,
        "the dashboard has its panels: {queries:?}"
    );
    queries.iter().flat_map(|q| names_in(q)).collect()
}

/// Every PromQL expression of the dashboard: panel targets' `expr` and
/// template variables' `query` / `definition`.
fn collect_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    ("query", serde_json::Value::String(s)) => out.push(s.clone()),
                    ("query", serde_json::Value::Object(q)) => {
                        if let Some(serde_json::Value::String(s)) = q.get("query") {
                            out.push(s.clone());
                        }
                    }
                    _ => collect_queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| collect_queries(i, out)),
        _ => {}
    }
}

/// The metric names in a PromQL expression: every identifier that starts
/// with `gateway_` (label names and functions never do).
pub fn names_in(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts_word && expr[i..].starts_with("gateway_") {
            let end = expr[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .map_or(expr.len(), |n| i + n);
            names.push(expr[i..end].to_owned());
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

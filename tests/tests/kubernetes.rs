//! examples/kubernetes/ as a cluster and the gateway would take it: every
//! manifest against the Kubernetes schemas (`kubernetes-validate`, PyPI),
//! the ConfigMap's config through the init container's own script and then
//! `gateway check`, the probes against the built binary's admin endpoint,
//! and the capabilities against the packaged systemd unit and the gateway's
//! own `privilege::kept`.
//!
//! Without `kubernetes-validate` (`cargo xtask setup` installs it) every
//! test here says SKIP; `cargo xtask test` sets `KUBERNETES_VALIDATE`, and
//! then a missing or broken validator fails them instead.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use gateway_tests::process::*;
use gateway_tests::*;
use serde_json::Value;

/// The oldest Kubernetes the manifests are for (the container
/// `appArmorProfile` field is 1.30's), and the validator's newest.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

const REQUIRED: &str = "KUBERNETES_VALIDATE";

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kubernetes")
}

fn manifest_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(examples())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no manifests in {}",
        examples().display()
    );
    files
}

/// The validator and the Python beside it (which has PyYAML, a dependency
/// of the validator): from `KUBERNETES_VALIDATE` (must work), else the venv
/// `cargo xtask setup` fills, else PATH; None (SKIP) when there is none.
struct Tools {
    validate: PathBuf,
    python: PathBuf,
}

fn tools(test: &str) -> Option<Tools> {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    let (validate, required) = match std::env::var_os(REQUIRED) {
        Some(p) => (PathBuf::from(p), true),
        None => {
            let ours = home.join(".cache/gateway-xtask/python/bin/kubernetes-validate");
            (
                if ours.exists() {
                    ours
                } else {
                    "kubernetes-validate".into()
                },
                false,
            )
        }
    };
    let runs = Command::new(&validate)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !runs {
        assert!(
            !required,
            "{test}: {REQUIRED}={} does not run: run `cargo xtask setup`",
            validate.display()
        );
        eprintln!(
            "SKIP {test}: no kubernetes-validate (run `cargo xtask setup`, or pip install kubernetes-validate)"
        );
        return None;
    }
    let beside = validate.with_file_name("python3");
    let python = if beside.exists() {
        beside
    } else {
        "python3".into()
    };
    Some(Tools { validate, python })
}

/// Every document of every manifest: (file name, document).
type Docs = Vec<(String, Value)>;

/// Every document of every manifest, as PyYAML (the validator's reader)
/// reads it: (file name, document).
fn documents(tools: &Tools) -> Docs {
    let script = r#"
import json, sys, yaml
for name in sys.argv[1:]:
    with open(name) as f:
        for doc in yaml.safe_load_all(f):
            if doc is not None:
                print(json.dumps({"file": name, "doc": doc}))
"#;
    let out = Command::new(&tools.python)
        .arg("-c")
        .arg(script)
        .args(manifest_files())
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{} could not read the manifests with PyYAML: {}",
        tools.python.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let file = Path::new(v["file"].as_str().unwrap())
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (file, v["doc"].clone())
        })
        .collect()
}

fn resource<'a>(docs: &'a Docs, kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .map(|(_, d)| d)
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "one {kind} {name} in examples/kubernetes");
    found[0]
}

/// The entry called `name` in a list of named objects (containers,
/// volumes, env).
fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {list}"))
}

fn container<'a>(pod: &'a Value, list: &str, name: &str) -> &'a Value {
    named(&pod[list], name)
}

fn validate(tools: &Tools, files: &[PathBuf], version: &str) -> std::process::Output {
    Command::new(&tools.validate)
        .args(["--strict", "--kubernetes-version", version])
        .args(files)
        .output()
        .expect("kubernetes-validate runs")
}

#[test]
fn every_manifest_passes_the_kubernetes_schemas() {
    let Some(tools) = tools("every_manifest_passes_the_kubernetes_schemas") else {
        return;
    };
    let files = manifest_files();
    let resources = documents(&tools).len();
    for version in KUBERNETES_VERSIONS {
        let out = validate(&tools, &files, version);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "Kubernetes {version} refuses a manifest:\n{stdout}{stderr}"
        );
        // One "passed" line per resource: none was left unchecked (an
        // unknown kind is only a warning).
        let passed = stdout.lines().filter(|l| l.contains(" passed ")).count();
        assert_eq!(passed, resources, "{stdout}{stderr}");
    }

    // The validator is strict enough to matter: a misspelt security
    // setting, which the API server would drop silently, is refused.
    let dir = tempfile::tempdir().unwrap();
    let daemonset = std::fs::read_to_string(examples().join("daemonset.yaml")).unwrap();
    let misspelt = daemonset.replace("allowPrivilegeEscalation:", "allowPrivilegeEscalaton:");
    assert_ne!(misspelt, daemonset);
    let bad = dir.path().join("daemonset.yaml");
    std::fs::write(&bad, misspelt).unwrap();
    let out = validate(&tools, &[bad], KUBERNETES_VERSIONS[0]);
    assert!(!out.status.success(), "a misspelt field passed");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("allowPrivilegeEscalaton"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A pod's view of the files, in a temporary directory: the ConfigMap,
/// the TLS Secret (as the kubelet writes a secret volume: a timestamped
/// directory, `..data` pointing at it, each key a symlink through it, files
/// of `defaultMode`), the trust ConfigMap, and the emptyDir and hostPath
/// the init container and the gateway write.
struct Pod {
    pki: Pki,
    root: tempfile::TempDir,
}

impl Pod {
    fn new(docs: &Docs) -> Pod {
        use std::os::unix::fs::PermissionsExt as _;
        let pki = Pki::new();
        let root = tempfile::tempdir().unwrap();
        let pod = Pod { pki, root };
        let spec = &resource(docs, "DaemonSet", "gateway")["spec"]["template"]["spec"];
        let volume = |name: &str| named(&spec["volumes"], name);

        let config = pod.mounted("/etc/gateway/config");
        std::fs::create_dir_all(&config).unwrap();
        let map = &resource(
            docs,
            "ConfigMap",
            volume("config")["configMap"]["name"].as_str().unwrap(),
        )["data"];
        for (key, text) in map.as_object().unwrap() {
            std::fs::write(config.join(key), text.as_str().unwrap()).unwrap();
        }

        let tls = volume("tls");
        let mode = tls["secret"]["defaultMode"]
            .as_u64()
            .expect("the TLS secret's defaultMode") as u32;
        let secret = pod.mounted("/etc/gateway/tls");
        let data = secret.join("..2026_12_01_00_00_00.000000000");
        std::fs::create_dir_all(&data).unwrap();
        for (key, file) in [("tls.crt", "server-chain.pem"), ("tls.key", "server.key")] {
            std::fs::copy(pod.pki.path(file), data.join(key)).unwrap();
            std::fs::set_permissions(data.join(key), std::fs::Permissions::from_mode(mode))
                .unwrap();
            std::os::unix::fs::symlink(format!("..data/{key}"), secret.join(key)).unwrap();
        }
        std::os::unix::fs::symlink(data.file_name().unwrap(), secret.join("..data")).unwrap();

        let trust = pod.mounted("/etc/gateway/trust");
        std::fs::create_dir_all(&trust).unwrap();
        std::fs::copy(
            pod.pki.path("client-roots.pem"),
            trust.join("client-roots.pem"),
        )
        .unwrap();
        // Beyond `gateway check`'s warning window, as a CRL in service is.
        let next_update = time::OffsetDateTime::now_utc() + time::Duration::days(30);
        std::fs::write(
            trust.join("crl.pem"),
            pod.pki.intermediate.crl_until(1, &[], next_update).unwrap(),
        )
        .unwrap();

        // emptyDir: 0777, as the kubelet makes it.
        let run = pod.mounted("/run/gateway");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::create_dir_all(pod.mounted("/var/lib/gateway")).unwrap();
        pod
    }

    /// Where `path` of the pod lies here.
    fn mounted(&self, path: &str) -> PathBuf {
        self.root.path().join(path.trim_start_matches('/'))
    }

    /// The pod's absolute paths in `text` moved under this directory.
    fn relocate(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for dir in ["/etc/gateway/", "/run/gateway", "/var/lib/gateway"] {
            out = out.replace(dir, &self.mounted(dir).display().to_string());
        }
        out
    }

    /// The init container's script, run here with `sh` as the pod runs it
    /// (its paths relocated): the rendered /run/gateway/gateway.toml.
    fn render(&self, docs: &Docs, variant: &str, node: &str) -> PathBuf {
        let spec = &resource(docs, "DaemonSet", "gateway")["spec"]["template"]["spec"];
        let init = container(spec, "initContainers", "render-config");
        let command: Vec<&str> = init["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(command[..2], ["/bin/sh", "-ec"], "{command:?}");
        // The node's name from the downward API, and which variant.
        let env = |name: &str| named(&init["env"], name);
        assert_eq!(
            env("NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
            "spec.nodeName"
        );
        assert!(env("GATEWAY_CONFIG")["value"].is_string());
        let out = Command::new("sh")
            .args(["-ec", &self.relocate(command[2])])
            .env("NODE_NAME", node)
            .env("GATEWAY_CONFIG", variant)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "the init container's script: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rendered = self.mounted("/run/gateway/gateway.toml");
        // The gateway reads the pod's paths: here, this directory's.
        let text = std::fs::read_to_string(&rendered).unwrap();
        std::fs::write(&rendered, self.relocate(&text)).unwrap();
        rendered
    }
}

/// The manifests as read, and a pod's files laid out from them; None
/// (SKIP) without the validator.
fn example(test: &str) -> Option<(Docs, Pod)> {
    let docs = documents(&tools(test)?);
    let pod = Pod::new(&docs);
    Some((docs, pod))
}

/// `gateway check --config CONFIG`: (passed, what it said).
fn check(config: &Path) -> (bool, String) {
    let (code, stdout, stderr) = cli(&["check".as_ref(), "--config".as_ref(), config.as_os_str()]);
    (code == 0, format!("{stdout}{stderr}"))
}

#[test]
fn the_standalone_config_as_the_pod_renders_it_passes_gateway_check() {
    let Some((docs, pod)) =
        example("the_standalone_config_as_the_pod_renders_it_passes_gateway_check")
    else {
        return;
    };
    let config = pod.render(&docs, "standalone.toml", "node-a");
    let (ok, out) = check(&config);
    assert!(
        ok,
        "gateway check refuses the ConfigMap's standalone.toml:\n{out}"
    );

    // The admin socket's directory is made root's alone, as the gateway
    // demands of it (an emptyDir is 0777).
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(pod.mounted("/run/gateway"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);

    // The secret's defaultMode is what lets the key through: readable by
    // its group too (an fsGroup would make it so), it is refused.
    let key = std::fs::canonicalize(pod.mounted("/etc/gateway/tls/tls.key")).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o440)).unwrap();
    let (ok, out) = check(&config);
    assert!(!ok, "a key readable by its group passed:\n{out}");
    assert!(out.contains("tls.key"), "{out}");
}

#[test]
fn the_fleet_config_keeps_the_standalone_host_local_settings() {
    let Some((docs, pod)) = example("the_fleet_config_keeps_the_standalone_host_local_settings")
    else {
        return;
    };
    let fleet: toml::Table = std::fs::read_to_string(pod.render(&docs, "gateway.toml", "node-a"))
        .unwrap()
        .parse()
        .unwrap();
    // A fleet document's listener names its cert and key in the host
    // file's directory: the Secret's, linked there.
    for file in ["tls.crt", "tls.key"] {
        let link = pod.mounted(&format!("/run/gateway/{file}"));
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            pod.mounted(&format!("/etc/gateway/tls/{file}")),
            "{file}"
        );
        std::fs::read(&link).expect("the link reaches the Secret's file");
    }
    let standalone: toml::Table =
        std::fs::read_to_string(pod.render(&docs, "standalone.toml", "node-a"))
            .unwrap()
            .parse()
            .unwrap();
    // What the pod runs with [fleet] is what `gateway check` accepts in the
    // standalone variant, setting for setting.
    for (key, value) in &fleet {
        if key == "fleet" {
            continue;
        }
        assert_eq!(Some(value), standalone.get(key), "{key}");
    }
    for (key, value) in &standalone {
        if !value.is_table() && !value.is_array() {
            assert!(fleet.contains_key(key), "{key} only in standalone.toml");
        }
    }
    // Listeners, routes, bundles and CRLs come from etcd: not in this file.
    for shared in ["listeners", "trust", "guard"] {
        assert!(
            !fleet.contains_key(shared),
            "{shared} in the fleet's host file"
        );
    }
    let section = fleet["fleet"].as_table().expect("[fleet]");
    let keys: BTreeSet<&str> = section.keys().map(String::as_str).collect();
    assert_eq!(keys, BTreeSet::from(["cache", "etcd", "name", "prefix"]));
    // Each member's name is its node's, from the downward API.
    assert_eq!(section["name"].as_str(), Some("node-a"));
    // The cache outlives the pod: it lies on the node's hostPath volume.
    let state = pod.mounted("/var/lib/gateway");
    assert!(
        Path::new(section["cache"].as_str().unwrap()).starts_with(&state),
        "{section:?}"
    );
}

/// `GET path` on `admin`: the status code.
fn status(admin: SocketAddr, path: &str) -> u16 {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(STEP)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {out:?}"))
}

#[test]
fn the_probes_and_ports_are_the_gateways() {
    let Some((docs, pod)) = example("the_probes_and_ports_are_the_gateways") else {
        return;
    };
    let config = pod.render(&docs, "standalone.toml", "node-a");
    let text = std::fs::read_to_string(&config).unwrap();
    let parsed = gateway::Config::load(&config).unwrap();
    let admin = parsed.admin.expect("the config has an admin endpoint");
    let spec = &resource(&docs, "DaemonSet", "gateway")["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], true);
    let gw = container(spec, "containers", "gateway");

    // The probes go where the config puts the admin endpoint.
    let mut probed = BTreeMap::new();
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let get = &gw[probe]["httpGet"];
        assert_eq!(
            get["host"].as_str(),
            Some(admin.ip().to_string().as_str()),
            "{probe}"
        );
        assert_eq!(
            get["port"].as_u64(),
            Some(u64::from(admin.port())),
            "{probe}"
        );
        probed.insert(probe, get["path"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        probed["readinessProbe"], "/readyz",
        "readiness turns 503 on drain"
    );
    // The container's declared port is the listener's.
    let ports: BTreeSet<u64> = gw["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_u64().unwrap())
        .collect();
    let binds: BTreeSet<u64> = parsed
        .listeners
        .iter()
        .map(|l| u64::from(l.bind.port()))
        .collect();
    assert_eq!(ports, binds);

    // The built gateway, with this config on free loopback ports, answers
    // each probe's path with 200; a path it does not serve is 404 (so a
    // 200 means the path exists).
    // The block list's pins stay out of this host's bpffs (others' tests
    // use it); the block list is not what is probed.
    let ours = text
        .replace(&admin.to_string(), "127.0.0.1:0")
        .replace("0.0.0.0:443", "127.0.0.1:0")
        .replace("kernel_block_list = true", "kernel_block_list = false");
    assert!(!ours.contains(":443\"") && ours.contains("kernel_block_list = false"));
    let text = ours;
    std::fs::write(&config, text).unwrap();
    let log = pod.mounted("/run/gateway/stderr");
    let gw = run_binary(&config, &log, &[]);
    wait_listening(&log);
    let admin = admin_addr(&log);
    for (probe, path) in &probed {
        let mut code = 0;
        wait_for(&format!("{probe} {path} answered 200"), || {
            code = status(admin, path);
            code == 200
        });
    }
    assert_eq!(status(admin, "/livez"), 404);

    // On SIGTERM, while a connection keeps the drain going, readiness
    // says 503 and liveness stays 200: the node leaves service, and the
    // kubelet does not kill the drain for a failed liveness probe.
    let listener = wait_listening(&log);
    let held = std::net::TcpStream::connect(listener).unwrap();
    signal(&gw.0, "TERM");
    wait_for("readyz 503 on SIGTERM", || status(admin, "/readyz") == 503);
    assert_eq!(status(admin, "/healthz"), 200);
    drop(held);
    drop(gw);
}

/// The capabilities the packaged unit's header names for a feature (the
/// entry whose first line starts with `feature`), or its
/// CapabilityBoundingSet= for "".
fn unit_capabilities(unit: &str, feature: &str) -> BTreeSet<String> {
    let caps = |line: &str| -> Vec<String> {
        line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("CAP_"))
            .map(str::to_owned)
            .collect()
    };
    if feature.is_empty() {
        return unit
            .lines()
            .filter_map(|l| l.strip_prefix("CapabilityBoundingSet="))
            .flat_map(caps)
            .collect();
    }
    // An entry: a line "#   <feature>  <what it needs>", continued by
    // lines indented further.
    let mut lines = unit.lines().skip_while(|l| {
        !l.strip_prefix("#   ")
            .is_some_and(|rest| rest.starts_with(feature))
    });
    let first = lines
        .next()
        .unwrap_or_else(|| panic!("no entry {feature:?} in the unit's header"));
    let mut out: BTreeSet<String> = caps(first).into_iter().collect();
    for line in lines.take_while(|l| l.starts_with("#    ")) {
        out.extend(caps(line));
    }
    out
}

#[test]
fn the_capabilities_are_the_units_and_the_gateways() {
    let Some((docs, pod)) = example("the_capabilities_are_the_units_and_the_gateways") else {
        return;
    };
    let config = gateway::Config::load(&pod.render(&docs, "standalone.toml", "node-a")).unwrap();
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/gateway.service"),
    )
    .unwrap();

    // What the configured features need, as the unit says (granted, or
    // named in its header for a drop-in).
    let mut wanted = BTreeSet::new();
    if config.listeners.iter().any(|l| l.bind.port() < 1024) {
        let low = unit_capabilities(&unit, "listeners on ports below 1024");
        assert_eq!(
            low,
            unit_capabilities(&unit, ""),
            "the unit grants exactly that"
        );
        wanted.extend(low);
    }
    if config.admission.kernel_block_list {
        wanted.extend(unit_capabilities(&unit, "the XDP block list"));
    }
    if config.guard.is_some() {
        wanted.extend(unit_capabilities(&unit, "the local eBPF guard"));
    }
    assert!(!wanted.is_empty());

    let spec = &resource(&docs, "DaemonSet", "gateway")["spec"]["template"]["spec"];
    let context = &container(spec, "containers", "gateway")["securityContext"];
    assert_ne!(context["privileged"], true);
    assert_eq!(context["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let added: BTreeSet<String> = context["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| format!("CAP_{}", c.as_str().unwrap()))
        .collect();
    assert_eq!(
        added, wanted,
        "the DaemonSet's capabilities against the unit's"
    );

    // What the gateway itself keeps after start for these features, it
    // is given.
    for kept in gateway::privilege::kept(&config) {
        let name = kept.capability.to_string();
        assert!(added.contains(&name), "{name} ({}) not granted", kept.why);
    }

    // Each is explained.
    let readme = std::fs::read_to_string(examples().join("README.md")).unwrap();
    for cap in &added {
        assert!(
            readme.contains(cap.as_str()),
            "README.md does not say why {cap}"
        );
    }
    // The init container needs none.
    let init = &container(spec, "initContainers", "render-config")["securityContext"];
    assert_eq!(init["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(init["capabilities"]["add"].is_null());
}

#[test]
fn a_rollout_drains_before_the_kubelet_kills() {
    let Some((docs, pod)) = example("a_rollout_drains_before_the_kubelet_kills") else {
        return;
    };
    let config = gateway::Config::load(&pod.render(&docs, "standalone.toml", "node-a")).unwrap();
    let daemonset = &resource(&docs, "DaemonSet", "gateway")["spec"];
    let grace = daemonset["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    // The drain, and then some for the access log and the audit state.
    assert!(
        grace >= config.drain_timeout.as_secs() + 10,
        "grace {grace}s against drain_timeout {:?}",
        config.drain_timeout
    );
    // One node at a time, and no second pod beside the old one: both would
    // bind the node's port.
    let rolling = &daemonset["updateStrategy"]["rollingUpdate"];
    assert_eq!(daemonset["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(rolling["maxUnavailable"], 1);
    assert_eq!(rolling["maxSurge"], 0);
}

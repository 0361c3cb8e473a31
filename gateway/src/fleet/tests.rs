use super::*;

const HOST: &str = r#"
admin = "127.0.0.1:9000"
[fleet]
etcd = ["http://127.0.0.1:2379"]
prefix = "/gateway/prod/"
name = "gw-1"
cache = "state/fleet.json"
"#;

const DOC: &str = r#"
[[listeners]]
name = "edge"
bind = "127.0.0.1:0"
cert = "server.pem"
key = "server.key"
client_ca = "clients.pem"
crls = ["clients.crl"]
[[listeners.routes]]
name = "r"
backends = ["127.0.0.1:1"]
[trust.partners]
ca = "partners.pem"
"#;

fn host(dir: &Path) -> Host {
    Host::parse(HOST, &dir.join("host.toml")).unwrap().unwrap()
}

fn available(names: &[&str]) -> BTreeMap<String, Vec<u8>> {
    names
        .iter()
        .map(|n| ((*n).to_owned(), b"-----BEGIN X-----\n".to_vec()))
        .collect()
}

#[test]
fn a_plain_config_file_is_no_host_file() {
    let none = Host::parse("[[listeners]]\n", Path::new("/x/gateway.toml")).unwrap();
    assert!(none.is_none());
}

#[test]
fn the_document_names_shared_files_and_the_host_keeps_key_paths() {
    assert_eq!(
        named_files(DOC).unwrap().into_iter().collect::<Vec<_>>(),
        ["clients.crl", "clients.pem", "partners.pem"]
    );
    let dir = Path::new("/srv/gw");
    let h = host(dir);
    assert_eq!(h.prefix(), "/gateway/prod");
    let doc = Document::new(
        7,
        DOC.into(),
        &available(&["clients.pem", "clients.crl", "partners.pem"]),
    )
    .unwrap();
    let config = h.compose(&doc).unwrap();
    let l = &config.listeners[0];
    // Shared files from the files directory, host paths from the host.
    assert_eq!(
        config.resolve(&l.client_ca),
        Path::new("/srv/gw/state/fleet.json.files/clients.pem")
    );
    assert_eq!(
        config.resolve(&l.crls[0]),
        Path::new("/srv/gw/state/fleet.json.files/clients.crl")
    );
    assert_eq!(
        config.resolve(&config.trust["partners"].ca),
        Path::new("/srv/gw/state/fleet.json.files/partners.pem")
    );
    assert_eq!(config.resolve(&l.key), Path::new("/srv/gw/server.key"));
    assert_eq!(config.resolve(&l.cert), Path::new("/srv/gw/server.pem"));
    assert_eq!(config.admin, Some("127.0.0.1:9000".parse().unwrap()));
    assert!(config.fleet.is_some());
}

#[test]
fn a_file_the_document_names_and_etcd_lacks_refuses_the_document() {
    let e = Document::new(1, DOC.into(), &available(&["clients.pem", "partners.pem"])).unwrap_err();
    assert!(
        matches!(&e, FleetError::MissingFile(n) if n == "clients.crl"),
        "{e}"
    );
}

#[test]
fn a_path_where_a_shared_file_name_goes_is_refused() {
    for bad in [
        "../clients.pem",
        "/etc/passwd",
        "sub/clients.pem",
        ".hidden",
        "",
    ] {
        let doc = DOC.replace("\"clients.pem\"", &format!("{bad:?}"));
        let e = named_files(&doc).unwrap_err();
        assert!(matches!(e, FleetError::BadFileName(_)), "{bad}: {e}");
    }
}

#[test]
fn host_local_settings_stay_out_of_the_document_and_shared_ones_out_of_the_host() {
    let e = named_files(&format!("admin = \"0.0.0.0:9\"\n{DOC}")).unwrap_err();
    assert!(
        matches!(&e, FleetError::HostLocalInDocument(k) if k == "admin"),
        "{e}"
    );
    let e = Host::parse(&format!("user = \"nobody\"\n{HOST}"), Path::new("/h.toml")).unwrap_err();
    assert!(e.to_string().contains("`user`"), "{e}");
    let e = Host::parse(
        &format!("{HOST}\n[trust.x]\nca = \"a.pem\"\n"),
        Path::new("/h.toml"),
    )
    .unwrap_err();
    assert!(e.to_string().contains("`trust`"), "{e}");
}

#[test]
fn the_cache_round_trips_and_is_not_read_when_others_could_have_written_it() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::create_dir(dir.path().join("state")).unwrap();
    std::fs::set_permissions(
        dir.path().join("state"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    let h = host(dir.path());
    let doc = Document::new(
        9,
        DOC.into(),
        &available(&["clients.pem", "clients.crl", "partners.pem"]),
    )
    .unwrap();
    save_cache(&h, &doc).unwrap();
    let mode = std::fs::metadata(h.cache()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(load_cache(&h).unwrap(), doc);
    materialize(&h.files_dir(), &doc).unwrap();
    assert_eq!(
        std::fs::metadata(h.files_dir())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    // Another prefix's cache is not this member's last good state.
    let other = Host::parse(
        &HOST.replace("/gateway/prod/", "/gateway/test"),
        &dir.path().join("host.toml"),
    )
    .unwrap()
    .unwrap();
    assert!(load_cache(&other).is_err());
    // A cache someone else could have written is never read.
    std::fs::set_permissions(h.cache(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let e = load_cache(&h).unwrap_err();
    assert!(e.to_string().contains("writable by others"), "{e}");
}

/// Whoever writes to etcd cannot point a gateway at another key or
/// certificate of its host: those are plain names in the host file's
/// directory.
#[test]
fn a_certificate_or_key_path_in_the_document_is_refused() {
    for (from, to) in [
        ("cert = \"server.pem\"", "cert = \"/etc/ssl/other.pem\""),
        ("key = \"server.key\"", "key = \"../other/server.key\""),
        (
            "key = \"server.key\"",
            "key = \"/etc/ssl/private/other.key\"",
        ),
    ] {
        let doc = DOC.replace(from, to);
        assert_ne!(doc, DOC);
        let e = named_files(&doc).unwrap_err();
        assert!(matches!(e, FleetError::HostPath(_)), "{to}: {e}");
    }
    let upstream = format!(
        "{DOC}[listeners.routes.upstream_tls]\nca = \"clients.pem\"\nserver_name = \"b\"\ncert = \"/root/c.pem\"\nkey = \"k.key\"\n"
    );
    let e = named_files(&upstream).unwrap_err();
    assert!(matches!(e, FleetError::HostPath(_)), "{e}");
}

#[test]
fn the_guard_s_host_paths_are_host_local_and_the_rest_of_it_shared() {
    for key in GUARD_HOST_KEYS {
        let value = match *key {
            "pin" => "false",
            "uid" => "0",
            _ => "\"/etc/anywhere\"",
        };
        let doc = format!("{DOC}\n[guard]\nenforcement = \"audit\"\n{key} = {value}\n");
        let e = named_files(&doc).unwrap_err();
        assert!(
            matches!(&e, FleetError::HostLocalInDocument(k) if *k == format!("guard.{key}")),
            "{key}: {e}"
        );
    }
    let e = Host::parse(
        &format!("{HOST}\n[guard]\nenforcement = \"off\"\n"),
        Path::new("/h.toml"),
    )
    .unwrap_err();
    assert!(e.to_string().contains("`guard.enforcement`"), "{e}");
    // The host file's paths and the document's shared settings: one [guard].
    let h = Host::parse(
        &format!("{HOST}\n[guard]\ncgroup = \"gw.slice/gw\"\npin = false\n"),
        Path::new("/srv/gw/host.toml"),
    )
    .unwrap()
    .unwrap();
    let doc = Document::new(
        7,
        format!("{DOC}\n[guard]\nenforcement = \"audit\"\n"),
        &available(&["clients.pem", "clients.crl", "partners.pem"]),
    )
    .unwrap();
    let guard = h.compose(&doc).unwrap().guard.unwrap();
    assert_eq!(guard.cgroup, Path::new("gw.slice/gw"));
    assert!(!guard.pin);
    assert_eq!(
        format!("{:?}", guard.enforcement),
        format!("{:?}", crate::config::GuardEnforcement::Audit)
    );
}

#[test]
fn a_document_over_the_size_limits_is_refused_with_its_own_error() {
    let names = ["clients.pem", "clients.crl", "partners.pem"];
    let mut files = available(&names);
    files.insert("clients.crl".into(), vec![b'A'; MAX_VALUE + 1]);
    let e = Document::new(1, DOC.into(), &files).unwrap_err();
    assert!(matches!(e, FleetError::TooLarge(_)), "{e}");
    assert!(e.to_string().contains("clients.crl"), "{e}");
    let e = Document::new(
        1,
        format!("{DOC}#{}", "x".repeat(MAX_VALUE)),
        &available(&names),
    )
    .unwrap_err();
    assert!(matches!(e, FleetError::TooLarge(_)), "{e}");
    // Each under the per-key limit, over the document's together.
    let mut doc = DOC.to_owned();
    let mut files = available(&names);
    for i in 0..(MAX_DOCUMENT / MAX_VALUE + 1) {
        doc.push_str(&format!("[trust.t{i}]\nca = \"t{i}.pem\"\n"));
        files.insert(format!("t{i}.pem"), vec![b'A'; MAX_VALUE]);
    }
    let e = Document::new(1, doc, &files).unwrap_err();
    assert!(
        matches!(&e, FleetError::TooLarge(m) if m.contains("bytes")),
        "{e}"
    );
}

/// Review 4, findings 4 and 5: only what needs etcd's leader keeps a
/// session alive (a keep-alive answer with a TTL, a watch event), and a
/// keep-alive answer saying the lease is gone ends it.
#[test]
fn a_session_lives_on_the_leader_s_answers_and_ends_with_its_lease() {
    use etcd::Liveness;
    use std::time::Duration;
    let start = tokio::time::Instant::now();
    let at = |ms: u64| start + Duration::from_millis(ms);
    let mut alive = Liveness::new(start);
    assert!(alive.check(at(1_900)).is_ok());
    // Keep-alive answers, then none (a progress notice, answered by a
    // member without a leader, touches nothing): lost after 2 s.
    alive.kept(5, at(1_500)).unwrap();
    assert!(alive.check(at(3_400)).is_ok());
    let lost = alive.check(at(3_600)).unwrap_err().to_string();
    assert!(lost.contains("no keep-alive answer"), "{lost}");
    // A watch event is a commit: a leader was there.
    alive.event(at(3_700));
    assert!(alive.check(at(5_600)).is_ok());
    // TTL 0 (or less): the lease expired or was revoked.
    for ttl in [0, -1] {
        let gone = alive.kept(ttl, at(5_700)).unwrap_err().to_string();
        assert!(gone.contains("lease is gone"), "{gone}");
    }
    // ... and it did not count as heard.
    assert!(alive.check(at(5_800)).is_err());
}

/// Review 4, finding 6: the same document pushed again (a new revision)
/// is recorded at that revision without a reload; another is applied.
#[test]
fn the_same_document_at_a_new_revision_is_relabelled_not_reloaded() {
    let files = available(&["clients.pem", "clients.crl", "partners.pem"]);
    let serving = Document::new(7, DOC.into(), &files).unwrap();
    let again = Document::new(9, DOC.into(), &files).unwrap();
    assert_eq!(step(&serving, &serving), Step::Nothing);
    assert_eq!(step(&serving, &again), Step::Relabel(9));
    // etcd restored from a backup numbers anew: what it holds is recorded.
    assert_eq!(step(&again, &serving), Step::Relabel(7));
    let changed = Document::new(9, DOC.replace("name = \"r\"", "name = \"s\""), &files).unwrap();
    assert_eq!(step(&serving, &changed), Step::Apply);
    let mut other_files = files.clone();
    other_files.insert("clients.crl".into(), b"-----BEGIN X509 CRL-----\n".to_vec());
    let new_crl = Document::new(7, DOC.into(), &other_files).unwrap();
    assert_eq!(step(&serving, &new_crl), Step::Apply);
}

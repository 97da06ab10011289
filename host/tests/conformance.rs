//! `trellis plugin test` (the conformance kit) on the sample bundle and the examples,
//! through the real binary: the logging pairs (file, the Rust, Python and JavaScript
//! examples with the file browser, Elasticsearch against the mock), both transports (TCP; Kafka on
//! Apache Kafka), the Redfish fence agent against sushy. And the kit fails what breaks the
//! contract, naming why: a fence agent whose status ignores a confirmed off, a logging
//! method given no browser. (glusterfs-fence is run through the kit in
//! `glusterfs_fence.rs`, which has a glusterd.)

mod common;

use common::*;
use std::path::Path;

/// `trellis plugin test ARGS` with the kit config `config` (written into `dir`).
fn kit(dir: &Path, config: &str, args: &[&str]) -> (i32, String) {
    let cfg = dir.join("kit.toml");
    std::fs::write(&cfg, config).unwrap();
    let out = trellis()
        .args(["plugin", "test"])
        .args(args)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("{text}");
    (out.status.code().unwrap_or(-1), text)
}

fn plugin(name: &str) -> String {
    bundle().join(name).display().to_string()
}

fn all_passed(code: i32, text: &str) {
    assert_eq!(code, 0, "{text}");
    assert!(!text.contains("FAIL"), "{text}");
    assert!(text.contains(" passed, 0 failed"), "{text}");
}

#[test]
fn the_file_logging_pair_and_the_example_loggers_in_three_languages_pass() {
    for writer in ["file-logging", "jsonl-logger", "python-logger", "js-logger"] {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("logs")).unwrap();
        let config = format!(
            "[plugins.{writer}]\ndirs = [{{ host = \"logs\", guest = \"/logs\", mode = \"read-write\" }}]\n\
             [plugins.file-browser]\ndirs = [{{ host = \"logs\", guest = \"/logs\" }}]\n"
        );
        let (code, text) = kit(
            d.path(),
            &config,
            &[&plugin(writer), "--with", &plugin("file-browser")],
        );
        all_passed(code, &text);
        assert!(text.contains("14 passed, 0 failed"), "{writer}: {text}");
    }
}

#[test]
fn the_elasticsearch_pair_passes_against_the_mock() {
    let d = tempfile::tempdir().unwrap();
    let es = EsMock::start(&[]);
    let url = es.url();
    let config = format!(
        "[plugins.elasticsearch-logging]\nhttp = [\"{url}\"]\nconfig = {{ url = \"{url}\" }}\n\
         [plugins.elasticsearch-browser]\nhttp = [\"{url}\"]\nconfig = {{ url = \"{url}\" }}\n"
    );
    let (code, text) = kit(
        d.path(),
        &config,
        &[
            &plugin("elasticsearch-logging"),
            "--with",
            &plugin("elasticsearch-browser"),
        ],
    );
    all_passed(code, &text);
    // Elasticsearch counts a step too (`_count` with the step's filter).
    assert!(
        text.contains("count what the request matches: the whole log: 250; step `test`: 130"),
        "{text}"
    );
}

/// The text of a kit run with its timings (`(12 ms)`) taken out, for comparing runs.
fn without_timings(text: &str) -> String {
    text.lines()
        .filter(|l| l.starts_with("  PASS") || l.starts_with("  FAIL") || l.contains(" passed, "))
        .map(|l| match l.rfind(" (") {
            Some(at) if l.ends_with(')') => &l[..at],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn every_point_built_for_0_1_0_runs_through_the_hosts_0_1_0_bindings() {
    // The same sources as the bundle's (and the fence stub's), built for 0.1.0: the kit
    // drives each through the host's 0.1.0 bindings and conversions (frames, lanes,
    // fence actions and states, agent info), with the results of the 0.2.0 builds.
    let d = tempfile::tempdir().unwrap();
    let f = |name: &str| fixtures().join(name).display().to_string();
    let port = free_port();
    let (code, text) = kit(
        d.path(),
        &format!(
            "[plugins.tcp-transport-v0-1]\nsockets = {{ bind = [\"127.0.0.1:{port}\"], connect = [\"127.0.0.1:{port}\"] }}\n\
             config = {{ address = \"127.0.0.1:{port}\" }}\n"
        ),
        &[&f("tcp-transport-v0-1")],
    );
    all_passed(code, &text);
    assert!(
        text.contains("(trellis:plugin@0.1.0; command-transport)"),
        "{text}"
    );
    assert!(
        text.contains("PASS  a control frame is not stuck behind bulk frames"),
        "{text}"
    );

    std::fs::create_dir(d.path().join("logs")).unwrap();
    let (code, text) = kit(
        d.path(),
        "[plugins.file-logging-v0-1]\ndirs = [{ host = \"logs\", guest = \"/logs\", mode = \"read-write\" }]\n\
         [plugins.file-browser-v0-1]\ndirs = [{ host = \"logs\", guest = \"/logs\" }]\n",
        &[&f("file-logging-v0-1"), "--with", &f("file-browser-v0-1")],
    );
    all_passed(code, &text);
    assert!(text.contains("14 passed, 0 failed"), "{text}");

    // The fence stub fails the kit on purpose; both builds must fail it the same way.
    let (code_old, old) = kit(
        d.path(),
        "",
        &[&f("fence-stub-v0-1"), "--param", "behaviour=ok"],
    );
    let (code_new, new) = kit(d.path(), "", &[&f("fence-stub"), "--param", "behaviour=ok"]);
    assert_eq!((code_old, code_new), (1, 1), "{old}\n{new}");
    assert_eq!(without_timings(&old), without_timings(&new));
    assert!(old.contains("PASS  "), "{old}");
}

#[test]
fn a_browser_built_for_0_1_0_passes_with_a_0_2_0_logging_method() {
    // file-browser's 0.1.0 release (tests/fixtures/file-browser-v0-1): the kit runs it
    // through the host's 0.1.0 bindings; its pages have no totals, which is allowed.
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("logs")).unwrap();
    let config = "[plugins.file-logging]\ndirs = [{ host = \"logs\", guest = \"/logs\", mode = \"read-write\" }]\n\
                  [plugins.file-browser-v0-1]\ndirs = [{ host = \"logs\", guest = \"/logs\" }]\n";
    let old = fixtures().join("file-browser-v0-1").display().to_string();
    let (code, text) = kit(d.path(), config, &[&plugin("file-logging"), "--with", &old]);
    all_passed(code, &text);
    assert!(text.contains("14 passed, 0 failed"), "{text}");
    assert!(
        text.contains("the whole log: not counted; step `test`: not counted"),
        "{text}"
    );
}

#[test]
fn both_transports_pass() {
    let d = tempfile::tempdir().unwrap();
    let port = free_port();
    let (code, text) = kit(
        d.path(),
        &format!(
            "[plugins.tcp-transport]\nsockets = {{ bind = [\"127.0.0.1:{port}\"], connect = [\"127.0.0.1:{port}\"] }}\n\
             config = {{ address = \"127.0.0.1:{port}\" }}\n"
        ),
        &[&plugin("tcp-transport")],
    );
    all_passed(code, &text);
    assert!(text.contains("PASS  a control frame is not stuck behind bulk frames"));

    let broker = Kafka::start();
    let (code, text) = kit(
        d.path(),
        &format!(
            "[kafka]\nbrokers = \"{}\"\n[plugins.kafka-transport]\nkafka = {{ topics = [\"kit.\"] }}\nconfig = {{ prefix = \"kit\" }}\n",
            broker.brokers()
        ),
        &[&plugin("kafka-transport")],
    );
    all_passed(code, &text);
    // kafka-transport is 0.3.0: its links wake the host through the consumer's pollable.
    assert!(
        text.contains("PASS  readiness (0.3.0)"),
        "the readiness check did not run for kafka-transport:\n{text}"
    );
}

#[test]
fn redfish_fence_passes_against_the_emulator() {
    let d = tempfile::tempdir().unwrap();
    let sushy = Sushy::start(d.path());
    let secrets = d.path().join("secrets.toml");
    std::fs::write(&secrets, "bmc = \"any-password\"\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = format!(
        "[secrets]\nfile = \"secrets.toml\"\n[plugins.redfish-fence]\nhttp = [\"{}\"]\ntls-ca = [\"{}\"]\nsecrets = [\"bmc\"]\nlimits = {{ call-timeout = \"60s\" }}\n",
        sushy.url(),
        sushy.ca
    );
    let port = sushy.port.to_string();
    let (code, text) = kit(
        d.path(),
        &config,
        &[
            &plugin("redfish-fence"),
            "--param",
            "ip=127.0.0.1",
            "--param",
            &format!("ipport={port}"),
            "--param",
            "username=admin",
            "--param",
            "password=bmc",
        ],
    );
    all_passed(code, &text);
    assert!(text.contains("PASS  off, then status says off"), "{text}");
}

#[test]
fn the_kit_names_what_breaks_the_contract() {
    let d = tempfile::tempdir().unwrap();
    // The fence stub confirms off, but its status still says on, and it does not
    // offer monitor.
    let stub = fixtures().join("fence-stub").display().to_string();
    let (code, text) = kit(d.path(), "", &[&stub, "--param", "behaviour=ok"]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("FAIL  metadata names the agent, its parameters and actions: the actions do not include `monitor`"),
        "{text}"
    );
    assert!(
        text.contains("FAIL  off, then status says off: status `on` after a confirmed off"),
        "{text}"
    );
    // A logging method alone: the round trip needs its browser, and the kit says how.
    std::fs::create_dir(d.path().join("logs")).unwrap();
    let (code, text) = kit(
        d.path(),
        "[plugins.file-logging]\ndirs = [{ host = \"logs\", guest = \"/logs\", mode = \"read-write\" }]\n",
        &[&plugin("file-logging")],
    );
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("pass the other one with --with"), "{text}");
}

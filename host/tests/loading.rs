//! Loading plugins: what is refused at load time, and why, in words that name the fix.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Copy a fixture's component next to a new manifest text, in a temp dir.
fn with_manifest(fixture: &Path, wasm: &str, manifest: &str) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("p");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(fixture.join(wasm), dir.join(wasm)).unwrap();
    std::fs::write(dir.join("plugin.toml"), manifest).unwrap();
    (d, dir)
}

fn problems(rt: &trellis::runtime::Runtime, path: &Path) -> String {
    match rt.prepare(path) {
        Ok(_) => panic!("expected {} to be refused", path.display()),
        Err(p) => p.to_string(),
    }
}

#[test]
fn a_component_for_another_wit_version_is_refused_naming_both_versions() {
    let d = tempfile::tempdir().unwrap();
    let rt = runtime("", d.path(), &[]);
    let p = problems(&rt, &fixtures().join("future-wit"));
    assert!(p.contains("built for trellis:plugin@0.9.0"), "{p}");
    assert!(
        p.contains("this host serves trellis:plugin@0.1.0, 0.2.0, 0.3.0"),
        "{p}"
    );
    assert!(
        p.contains("fix: rebuild the plugin against trellis:plugin@0.3.0"),
        "{p}"
    );
}

#[test]
fn a_manifest_naming_another_served_version_than_its_component_is_refused() {
    // Both versions are served, so a wrong `wit` would pick the wrong bindings: the
    // component says which it is, and the manifest must agree.
    let manifest = r#"
        [plugin]
        name = "file-browser"
        version = "0.1.0"
        component = "file_browser.wasm"
        wit = "0.1.0"
        worlds = ["log-browser-plugin"]
        capabilities = ["log", "filesystem"]
    "#;
    let (_d, dir) = with_manifest(
        &bundle().join("file-browser"),
        "file_browser.wasm",
        manifest,
    );
    let rt = runtime("", _d.path(), &[]);
    let p = problems(&rt, &dir);
    assert!(
        p.contains(
            "the manifest says wit = \"0.1.0\" but the component exports trellis:plugin@0.3.0"
        ),
        "{p}"
    );
    assert!(p.contains("set wit = \"0.3.0\""), "{p}");
}

#[test]
fn importing_an_undeclared_host_capability_is_refused() {
    let manifest = r#"
        [plugin]
        name = "hostile"
        version = "0.1.0"
        component = "hostile_plugin.wasm"
        wit = "0.3.0"
        worlds = ["logging-pair-plugin"]
        capabilities = ["log", "filesystem", "http", "sockets"]
    "#;
    let (_d, dir) = with_manifest(&fixtures().join("hostile"), "hostile_plugin.wasm", manifest);
    let rt = runtime("", _d.path(), &[]);
    let p = problems(&rt, &dir);
    assert!(
        p.contains(
            "imports trellis:host/secrets but the manifest does not declare capability `secrets`"
        ),
        "{p}"
    );
    assert!(p.contains("add \"secrets\" to `capabilities`"), "{p}");
}

#[test]
fn worlds_must_match_the_exports() {
    let manifest = r#"
        [plugin]
        name = "hostile"
        version = "0.1.0"
        component = "hostile_plugin.wasm"
        wit = "0.3.0"
        worlds = ["logging-method-plugin", "fence-agent-plugin"]
        capabilities = ["log", "secrets", "filesystem", "http", "sockets"]
    "#;
    let (_d, dir) = with_manifest(&fixtures().join("hostile"), "hostile_plugin.wasm", manifest);
    let rt = runtime("", _d.path(), &[]);
    let p = problems(&rt, &dir);
    assert!(
        p.contains("exports trellis:plugin/log-browser, but no world in the manifest includes it"),
        "{p}"
    );
    assert!(
        p.contains(
            "include fence-agent, but the component does not export trellis:plugin/fence-agent"
        ),
        "{p}"
    );
}

#[test]
fn grants_and_config_are_checked_against_the_manifest() {
    let d = tempfile::tempdir().unwrap();
    let rt = runtime(
        r#"
        [plugins.jsonl-logger]
        http = ["https://es.internal:9200"]
        secrets = ["nope"]
        config = { directory = 7, colour = "red" }
        "#,
        d.path(),
        &[],
    );
    let p = problems(&rt, &bundle().join("jsonl-logger"));
    assert!(
        p.contains("plugins.jsonl-logger.http") && p.contains("does not request capability `http`"),
        "{p}"
    );
    assert!(
        p.contains("plugins.jsonl-logger.secrets[0]") && p.contains("not in the secret store"),
        "{p}"
    );
    assert!(
        p.contains("plugins.jsonl-logger.config.directory") && p.contains("expected a string"),
        "{p}"
    );
    assert!(
        p.contains("plugins.jsonl-logger.config.colour") && p.contains("no config key"),
        "{p}"
    );

    // A CA file that cannot be read is named, with the fix.
    std::fs::write(d.path().join("empty.pem"), "not a certificate\n").unwrap();
    let rt = runtime(
        r#"
        [plugins.elasticsearch-logging]
        http = ["https://es.internal:9200"]
        tls-ca = ["missing.pem", "empty.pem"]
        config = { url = "https://es.internal:9200" }
        "#,
        d.path(),
        &[],
    );
    let p = problems(&rt, &bundle().join("elasticsearch-logging"));
    assert!(
        p.contains("plugins.elasticsearch-logging.tls-ca[0]")
            && p.contains("missing.pem")
            && p.contains("readable PEM file"),
        "{p}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_whose_init_refuses_its_config_is_not_loaded() {
    let d = tempfile::tempdir().unwrap();
    // No directory granted: the example's init answers `denied`, on a trial instance.
    let rt = runtime("", d.path(), &[]);
    let err = rt
        .load(&bundle().join("jsonl-logger"))
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("failed to start on a trial instance"), "{err}");
    assert!(
        err.contains("denied: directory `/logs` is not available"),
        "{err}"
    );
    assert!(rt.get("jsonl-logger").is_none());
}

#[test]
fn not_a_component_at_all() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("p");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("x.wasm"), b"\0asm garbage").unwrap();
    std::fs::write(dir.join("plugin.toml"), "[plugin]\nname = \"x\"\nversion = \"0.1.0\"\ncomponent = \"x.wasm\"\nwit = \"0.1.0\"\nworlds = [\"logging-method-plugin\"]\n").unwrap();
    let rt = runtime("", d.path(), &[]);
    let p = problems(&rt, &dir);
    assert!(p.contains("is not a valid component"), "{p}");
}

#[test]
fn precompiled_artifacts_are_cached_and_reused() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    let rt = runtime(
        &format!(
            "[runtime]\ncache-dir = \"{}\"\n[plugins.jsonl-logger]\ndirs = [{{ host = \".\", guest = \"/logs\", mode = \"read-write\" }}]\n",
            cache.display()
        ),
        d.path(),
        &[],
    );
    let first = rt.prepare(&bundle().join("jsonl-logger")).unwrap();
    assert!(!first.compiled.from_cache);
    assert_eq!(
        std::fs::read_dir(&cache).unwrap().count(),
        1,
        "one artifact written"
    );
    let second = rt.prepare(&bundle().join("jsonl-logger")).unwrap();
    assert!(second.compiled.from_cache);
    assert_eq!(first.compiled.sha256, second.compiled.sha256);
    // A corrupt artifact is ignored and replaced, not trusted.
    let file = std::fs::read_dir(&cache)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(&file, b"corrupt").unwrap();
    let third = rt.prepare(&bundle().join("jsonl-logger")).unwrap();
    assert!(!third.compiled.from_cache);
    // A different build of the same component replaces the old artifact, not adds to it.
    let other = d.path().join("p");
    std::fs::create_dir(&other).unwrap();
    std::fs::copy(
        bundle().join("jsonl-logger/plugin.toml"),
        other.join("plugin.toml"),
    )
    .unwrap();
    let mut wasm = std::fs::read(bundle().join("jsonl-logger/jsonl_logger.wasm")).unwrap();
    // append a custom section: a different file, the same plugin
    wasm.extend_from_slice(&[0, 6, 5, b'x', b'-', b'y', b'z', b'!']);
    std::fs::write(other.join("jsonl_logger.wasm"), &wasm).unwrap();
    rt.prepare(&other).unwrap();
    assert_eq!(
        std::fs::read_dir(&cache).unwrap().count(),
        1,
        "the stale artifact was pruned"
    );
}

fn trellis(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(args)
        .env("TRELLIS_LOG", "off")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn cli_plugin_check_and_list() {
    let b = bundle();
    let (code, out) = trellis(&["plugin", "check", b.join("jsonl-logger").to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("contract       trellis:plugin@0.3.0"), "{out}");
    assert!(
        out.contains("policy         logging-method: keep events in the host and retry"),
        "{out}"
    );
    assert!(out.contains("OK   "), "{out}");

    let f = fixtures();
    let (code, out) = trellis(&["plugin", "check", f.join("future-wit").to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("trellis:plugin@0.9.0")
            && out.contains("serves trellis:plugin@0.1.0, 0.2.0, 0.3.0"),
        "{out}"
    );

    let (code, out) = trellis(&["plugin", "list", f.to_str().unwrap()]);
    assert_eq!(code, 1, "one fixture is invalid: {out}");
    assert!(
        out.contains("hostile") && out.contains("log-browser,logging-method")
            || out.contains("logging-method,log-browser"),
        "{out}"
    );
    assert!(
        out.contains("fence-stub") && out.contains("fence-agent"),
        "{out}"
    );
    assert!(out.contains("invalid:"), "{out}");
    // The 0.1.0 browser is listed with its own contract version, and valid.
    let old = out
        .lines()
        .find(|l| l.starts_with("file-browser-v0-1 "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(old.contains(" 0.1.0  ") && old.contains("valid"), "{old}");
    assert!(out.contains("16 plugin(s)"), "{out}");
    let (code, out) = trellis(&[
        "plugin",
        "check",
        f.join("file-browser-v0-1").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("contract       trellis:plugin@0.1.0 (this host serves 0.1.0, 0.2.0, 0.3.0)")
            && out.contains("the current contract is 0.3.0"),
        "{out}"
    );

    let (code, out) = trellis(&["plugin", "check", "/nonexistent/plugin"]);
    assert_eq!(code, 1);
    assert!(out.contains("no plugin manifest here"), "{out}");
}

#[test]
fn cli_config_check_names_every_mistake() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("trellis.toml");
    std::fs::write(
        &f,
        "[plugins.x]\nhttp = [\"nope\"]\nlimits = { call-timeout = \"0s\" }\n",
    )
    .unwrap();
    let (code, out) = trellis(&["config", "check", f.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.contains("2 problems"), "{out}");
    assert!(
        out.contains("plugins.x.http[0]") && out.contains("plugins.x.limits.call-timeout"),
        "{out}"
    );
}

#[test]
fn cli_up_runs_a_job_and_exits_with_its_status() {
    let d = tempfile::tempdir().unwrap();
    let bundle = bundle();
    let job = d.path().join("ok.toml");
    std::fs::write(&job, "name = \"ok\"\nagent = \"local\"\n[[step]]\nname = \"hi\"\nrun = \"echo hi from the step; echo to-stderr >&2\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args([
            "up",
            job.to_str().unwrap(),
            "--bundle",
            bundle.to_str().unwrap(),
            "--state",
            d.path().join("s").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("hi from the step") && stdout.contains("to-stderr"),
        "{stdout}"
    );
    assert!(stderr.contains("run r-000001 succeeded"), "{stderr}");
    assert!(d.path().join("s/logs/ok/r-000001.jsonl").is_file());
    // it served the API with a token of its own, recorded as the submitter, and
    // revoked the token when done
    assert!(
        stderr.contains("web page and API on http://127.0.0.1:")
            && stderr.contains("token trellis_"),
        "{stderr}"
    );
    let record = std::fs::read_to_string(d.path().join("s/runs/r-000001/run.json")).unwrap();
    assert!(
        record.contains("\"submitted_by\": \"trellis-up\""),
        "{record}"
    );
    let tokens = std::fs::read_to_string(d.path().join("s/api-tokens.json")).unwrap();
    assert!(!tokens.contains("trellis-up"), "{tokens}");

    let bad = d.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"bad\"\nagent = \"local\"\n[[step]]\nname = \"boom\"\nrun = \"exit 7\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args([
            "up",
            bad.to_str().unwrap(),
            "--bundle",
            bundle.to_str().unwrap(),
            "--state",
            d.path().join("s").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("run r-000002 failed") && stderr.contains("\"code\":7"),
        "{stderr}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args([
            "up",
            "/no/such/job.toml",
            "--bundle",
            bundle.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read it"));
}

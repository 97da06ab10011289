//! The API's access control with the real daemons and CLI: tokens made and revoked
//! with `trellis token`, roles, `submitted_by`; HTTPS with a private CA (`--ca`); the
//! plaintext bind refused; and a log browser plugin whose cursor tries to smuggle
//! requests through `trellis logs`.

mod common;

use common::*;
use std::path::Path;
use std::time::Duration;

fn job(dir: &Path, name: &str, run: &str) -> String {
    let f = dir.join(format!("{name}.toml"));
    std::fs::write(
        &f,
        format!("name = \"{name}\"\nagent = \"linux\"\n[[step]]\nname = \"s\"\nrun = \"{run}\"\n"),
    )
    .unwrap();
    f.display().to_string()
}

/// `cli` with this token instead of the test's admin one (`None`: no token at all).
fn cli_as(server: &str, token: Option<&str>, args: &[&str]) -> (i32, String, String) {
    let mut c = trellis();
    c.args(args)
        .env("TRELLIS_SERVER", server)
        .env_remove("TRELLIS_TOKEN");
    if let Some(t) = token {
        c.env("TRELLIS_TOKEN", t);
    }
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn tokens_roles_and_who_submitted() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (controller, agent, http) = write_configs(dir, &Transport::Tcp { port: free_port() });
    let viewer = create_token(&controller, "ci-viewer", "viewer");
    let operator = create_token(&controller, "ci-operator", "operator");
    // kept hashed: the file never holds a token
    let file = std::fs::read_to_string(dir.join("state/api-tokens.json")).unwrap();
    assert!(!file.contains(&viewer) && !file.contains(&operator) && file.contains("ci-operator"));
    let d2 = start_daemons(dir, &controller, &agent, http);
    let http = d2.http; // moved if the controller lost its port
    let server = &d2.server;
    let job = job(dir, "who", "echo hi");

    // nobody: 401, saying how to get a token
    let (code, _, err) = cli_as(server, None, &["runs"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("trellis token create") && err.contains("401"),
        "{err}"
    );
    // a viewer reads, but may not submit: 403 naming the role
    let (code, _, err) = cli_as(server, Some(&viewer), &["runs"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = cli_as(server, Some(&viewer), &["run", &job]);
    assert_eq!(code, 1);
    assert!(
        err.contains("needs the `operator` role") && err.contains("403"),
        "{err}"
    );
    // an operator submits; the record says who
    let (code, out, err) = cli_as(server, Some(&operator), &["run", &job, "--follow"]);
    assert_eq!(code, 0, "{out}{err}");
    let record: serde_json::Value =
        serde_json::from_str(&http_get(http, "/api/runs/r-000001")).unwrap();
    assert_eq!(record["submitted_by"], "ci-operator", "{record}");
    // ... but may not reload plugins
    let (code, _, err) = cli_as(
        server,
        Some(&operator),
        &["plugin", "reload", "file-logging"],
    );
    assert_eq!(code, 1);
    assert!(err.contains("needs the `admin` role"), "{err}");

    // list, revoke: the running controller sees it at the next request
    let out = run_ok(
        trellis()
            .args(["token", "list", "--config"])
            .arg(&controller),
    );
    assert!(
        out.contains("ci-viewer") && out.contains("operator") && !out.contains(&viewer),
        "{out}"
    );
    run_ok(
        trellis()
            .args(["token", "revoke", "ci-operator", "--config"])
            .arg(&controller),
    );
    let (code, _, err) = cli_as(server, Some(&operator), &["runs"]);
    assert_eq!(code, 1);
    assert!(err.contains("401"), "{err}");
    // a second token of the same name is refused; a bad role names the choices
    let out = trellis()
        .args([
            "token",
            "create",
            "ci-viewer",
            "--role",
            "viewer",
            "--config",
        ])
        .arg(&controller)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists already"));
    let out = trellis()
        .args(["token", "create", "x", "--role", "root", "--config"])
        .arg(&controller)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("operator"));
    // metrics need a viewer unless opened
    assert_eq!(http_get_status_as(http, "/metrics", None).0, 401);
    assert_eq!(http_get_status_as(http, "/metrics", Some(&viewer)).0, 200);
}

/// GET `path` with `token` (or none).
fn http_get_status_as(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{auth}\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    (
        out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0),
        out,
    )
}

#[test]
fn https_with_a_private_ca() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (ca, cert, key) = tls_files(dir);
    let (controller, agent, http) = write_configs(dir, &Transport::Tcp { port: free_port() });
    extend_controller(
        &controller,
        &format!("tls = {{ cert = \"{cert}\", key = \"{key}\" }}"),
        "",
    );
    let d2 = start_daemons_at(
        dir,
        &controller,
        &agent,
        &format!("https://127.0.0.1:{http}"),
        &ca,
    );
    let server = &d2.server;
    let token = token_for(http).unwrap();
    let job = job(dir, "tls", "echo over tls");
    // with the CA: works, following the log over TLS too
    let (code, out, err) = run_cli(server, &token, Some(&ca), &["run", &job, "--follow"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out, "over tls\n");
    // without it: the certificate is not trusted, and the error says what to do
    let (code, _, err) = run_cli(server, &token, None, &["runs"]);
    assert_eq!(code, 1);
    assert!(err.contains("--ca"), "{err}");
    // plain HTTP to the HTTPS port gets nothing
    let (code, _, _) = run_cli(&format!("http://127.0.0.1:{http}"), &token, None, &["runs"]);
    assert_eq!(code, 1);
}

fn run_cli(server: &str, token: &str, ca: Option<&str>, args: &[&str]) -> (i32, String, String) {
    let mut c = trellis();
    c.args(args)
        .env("TRELLIS_SERVER", server)
        .env("TRELLIS_TOKEN", token)
        .env_remove("TRELLIS_CA");
    if let Some(ca) = ca {
        c.env("TRELLIS_CA", ca);
    }
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `start_daemons` for an HTTPS controller: waits for the agent with `--ca`.
fn start_daemons_at(
    dir: &Path,
    controller: &Path,
    agent: &Path,
    server: &str,
    ca: &str,
) -> Daemons {
    let log = dir.join("daemons.log");
    let c = start("controller", controller, &log);
    let a = start("agent", agent, &log);
    let port: u16 = server.rsplit(':').next().unwrap().parse().unwrap();
    let token = token_for(port).unwrap();
    wait_until(
        "the agent connects (over HTTPS)",
        Duration::from_secs(30),
        || {
            run_cli(server, &token, Some(ca), &["agents"])
                .1
                .contains("build-1")
        },
    );
    Daemons {
        controller: c,
        agent: a,
        log,
        server: server.to_string(),
        http: port,
    }
}

#[test]
fn a_plaintext_api_off_loopback_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (controller, _, http) = write_configs(dir, &Transport::Tcp { port: free_port() });
    let text = std::fs::read_to_string(&controller).unwrap().replace(
        &format!("http = \"127.0.0.1:{http}\""),
        &format!("http = \"0.0.0.0:{http}\""),
    );
    std::fs::write(&controller, &text).unwrap();
    for args in [
        vec!["config", "check", controller.to_str().unwrap()],
        vec!["controller", "--config", controller.to_str().unwrap()],
    ] {
        let out = trellis().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must refuse");
        assert!(
            err.contains("controller.http")
                && err.contains("allow-plaintext-http")
                && err.contains("tls"),
            "{args:?}: {err}"
        );
    }
    // the operator's explicit choice (a TLS proxy in front) is accepted
    std::fs::write(
        &controller,
        text.replace(
            &format!("http = \"0.0.0.0:{http}\""),
            &format!("http = \"0.0.0.0:{http}\"\nallow-plaintext-http = true"),
        ),
    )
    .unwrap();
    run_ok(trellis().args(["config", "check"]).arg(&controller));
}

/// A log browser with no grants returns a cursor that would end the CLI's request line
/// and smuggle a job submit and a cancel of the run being read (the latter completed by
/// the client's own headers, token included). `trellis logs` must send it as data: no
/// run is made, the run read is not cancelled, and the CLI ends cleanly.
#[test]
fn a_plugin_cursor_cannot_smuggle_requests() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (controller, agent, http) = write_configs(dir, &Transport::Tcp { port: free_port() });
    extend_controller(
        &controller,
        "log-browsers = [\"cursor-smuggler\"]",
        &format!(
            "[plugins.cursor-smuggler]\npath = \"{}\"\n",
            fixtures().join("cursor-smuggler").display()
        ),
    );
    let operator = create_token(&controller, "reader", "operator");
    let d2 = start_daemons(dir, &controller, &agent, http);
    let http = d2.http; // moved if the controller lost its port
    let server = &d2.server;
    let gate = dir.join("gate");
    let f = dir.join("victim.toml");
    std::fs::write(
        &f,
        format!(
            "name = \"victim\"\nagent = \"linux\"\nbrowser = \"cursor-smuggler\"\n[[step]]\nname = \"s\"\nrun = \"n=0; while [ ! -e {} ] && [ $n -lt 600 ]; do sleep 0.05; n=$((n+1)); done\"\n",
            gate.display()
        ),
    )
    .unwrap();
    let (code, out, err) = cli_as(server, Some(&operator), &["run", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let run = out.trim().to_string();

    let (code, out, err) = cli_as(server, Some(&operator), &["logs", &run]);
    assert!(code == 0 || code == 1, "{out}{err}");
    assert!(out.contains("a line from the smuggler"), "{out}{err}");
    std::thread::sleep(Duration::from_millis(500));
    let runs: serde_json::Value = serde_json::from_str(&http_get(http, "/api/runs")).unwrap();
    let runs = runs["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "a smuggled submit made a run: {runs:?}");
    assert_eq!(
        runs[0]["status"], "running",
        "a smuggled cancel ended the run: {runs:?}"
    );
    std::fs::write(&gate, "").unwrap();
    wait_for_success(server, &run, Duration::from_secs(30), &d2.log);
}

//! The controller and agent as real processes, driven by the CLI: run --follow exits
//! with the run's status, runs/logs/agents/cancel work, a restarted controller still
//! shows its history, and an agent with a wrong secret is refused on both sides.

mod common;

use common::*;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn write_configs(
    dir: &std::path::Path,
    agent_secret: &str,
) -> (std::path::PathBuf, std::path::PathBuf, u16) {
    let (tp, http) = (free_port(), free_port());
    let bundle = bundle();
    std::fs::create_dir_all(dir.join("state/logs")).unwrap();
    let secrets = dir.join("secrets.toml");
    std::fs::write(
        &secrets,
        "agent-build-1 = \"the-agent-secret\"\ndeploy-token = \"s3cr3t-value\"\n",
    )
    .unwrap();
    let agent_secrets = dir.join("agent-secrets.toml");
    std::fs::write(
        &agent_secrets,
        format!("agent-build-1 = \"{agent_secret}\"\n"),
    )
    .unwrap();
    for f in [&secrets, &agent_secrets] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let controller = dir.join("controller.toml");
    std::fs::write(
        &controller,
        format!(
            r#"
[runtime]
plugin-dir = "{b}"
[secrets]
file = "secrets.toml"
[controller]
state-dir = "state"
http = "127.0.0.1:{http}"
agents = {{ "build-1" = "agent-build-1" }}
[job-secrets.deploy-token]
jobs = ["cli-*"]
[plugins.tcp-transport]
sockets = {{ bind = ["127.0.0.1:{tp}"] }}
config = {{ address = "127.0.0.1:{tp}" }}
[plugins.file-logging]
dirs = [{{ host = "state/logs", guest = "/logs", mode = "read-write" }}]
[plugins.file-browser]
dirs = [{{ host = "state/logs", guest = "/logs" }}]
"#,
            b = bundle.display()
        ),
    )
    .unwrap();
    let agent = dir.join("agent.toml");
    std::fs::write(
        &agent,
        format!(
            r#"
[runtime]
plugin-dir = "{b}"
[secrets]
file = "agent-secrets.toml"
[agent]
name = "build-1"
labels = ["linux"]
secret = "agent-build-1"
workspace = "work"
[plugins.tcp-transport]
sockets = {{ connect = ["127.0.0.1:{tp}"] }}
config = {{ address = "127.0.0.1:{tp}" }}
"#,
            b = bundle.display()
        ),
    )
    .unwrap();
    use_token(http, &create_token(&controller, "test-admin", "admin"));
    (controller, agent, http)
}

fn start(role: &str, config: &std::path::Path) -> Daemon {
    daemon(role, config, Stdio::piped())
}

fn wait_for_agent(server: &str) {
    let t = Instant::now();
    loop {
        let (code, out, _) = cli(server, &["agents"]);
        if code == 0 && out.contains("build-1") {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the agent did not connect: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn daemons_and_cli() {
    let d = tempfile::tempdir().unwrap();
    let (controller_cfg, agent_cfg, http) = write_configs(d.path(), "the-agent-secret");
    let server = format!("http://127.0.0.1:{http}");
    let o = trellis()
        .args([
            "controller",
            "--config",
            controller_cfg.to_str().unwrap(),
            "--check-config",
        ])
        .output()
        .unwrap();
    let (code, out, err) = (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok (controller"), "{out}");

    let controller = start("controller", &controller_cfg);
    let _agent = start("agent", &agent_cfg);
    wait_for_agent(&server);

    let job = d.path().join("job.toml");
    std::fs::write(&job, "name = \"cli-job\"\nagent = \"linux\"\nsecrets = { T = \"deploy-token\" }\n[[step]]\nname = \"a\"\nrun = \"echo one; echo secret=$T\"\n[[step]]\nname = \"b\"\nrun = \"echo two; mkdir -p out; head -c 700000 /dev/urandom > 'out/a blob.bin'\"\nartifacts = [\"out/*\"]\n").unwrap();
    let (code, out, err) = cli(&server, &["run", job.to_str().unwrap(), "--follow"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out, "one\nsecret=****\ntwo\n", "{err}");
    assert!(err.contains("run r-000001 succeeded"), "{err}");

    let bad = d.path().join("bad.toml");
    std::fs::write(&bad, "name = \"bad\"\nagent = \"linux\"\n[[step]]\nname = \"x\"\nrun = \"echo failing; exit 4\"\n").unwrap();
    let (code, _, err) = cli(&server, &["run", bad.to_str().unwrap(), "--follow"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("run r-000002 failed"), "{err}");

    let (_, out, _) = cli(&server, &["logs", "r-000001", "--tail", "1"]);
    assert_eq!(out, "two\n");
    let (_, out, _) = cli(&server, &["logs", "r-000001", "--step", "a"]);
    assert_eq!(out, "one\nsecret=****\n");
    // Artifacts: listed, downloaded and checked, byte-exact.
    let (code, out, err) = cli(&server, &["artifacts", "r-000001"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("700000") && out.contains("out/a blob.bin"),
        "{out}"
    );
    let got = d.path().join("got.bin");
    let (code, _, err) = cli(
        &server,
        &[
            "artifacts",
            "r-000001",
            "--get",
            "out/a blob.bin",
            "-o",
            got.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("checked"), "{err}");
    let original = std::fs::read(d.path().join("work/r-000001/out/a blob.bin")).unwrap();
    assert!(std::fs::read(&got).unwrap() == original);
    let (code, _, err) = cli(&server, &["artifacts", "r-000001", "--get", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("no artifact `nope`"), "{err}");
    let (code, _, err) = cli(&server, &["cancel", "r-000001"]);
    assert_eq!(code, 1);
    assert!(err.contains("already ended"), "{err}");

    // The controller restarts: history intact, the agent reconnects, new runs work.
    drop(controller);
    let _controller = restart_controller(&controller_cfg, &d.path().join("restart.log"));
    let t = Instant::now();
    let out = loop {
        let (code, out, _) = cli(&server, &["runs"]);
        if code == 0 {
            break out;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the controller did not come back"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        out.contains("r-000001")
            && out.contains("succeeded")
            && out.contains("r-000002")
            && out.contains("failed"),
        "{out}"
    );
    let (code, out, _) = cli(&server, &["artifacts", "r-000001"]);
    assert!(code == 0 && out.contains("out/a blob.bin"), "{out}");
    wait_for_agent(&server);
    let (code, out, _) = cli(&server, &["run", job.to_str().unwrap(), "--follow"]);
    assert_eq!(code, 0);
    assert!(out.contains("two"));
}

#[test]
fn a_wrong_agent_secret_is_refused_on_both_sides() {
    let d = tempfile::tempdir().unwrap();
    let (controller_cfg, agent_cfg, http) = write_configs(d.path(), "not-the-secret");
    let server = format!("http://127.0.0.1:{http}");
    let _controller = start("controller", &controller_cfg);
    let mut agent = start("agent", &agent_cfg);
    let t = Instant::now();
    let status = loop {
        if let Some(s) = agent.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the refused agent kept running"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(agent.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("wrong secret"), "{err}");
    let (_, out, _) = cli(&server, &["agents"]);
    assert!(!out.contains("build-1"), "{out}");
}

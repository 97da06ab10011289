//! Hot reload in running daemons (controller and agent processes over TCP), with a run
//! in flight the whole time: `trellis plugin reload` puts a new version of the logging
//! method in place; a broken one (a component for another extension point) is refused
//! by its canary with the reason while the old one keeps serving; the daemon picks up
//! a changed plugin directory by itself. The run in flight completes with every line
//! once, and a run started after the reload is served by the new generation. And a
//! changed `[plugins.<name>]` table in the daemon's configuration goes the same way: a
//! bad config is refused by its canary, a good one reloads; moved directory grants and a
//! new call timeout are reloaded, and a revoked grant the plugin needs is refused.

mod common;

use common::*;
use std::path::Path;
use std::time::Duration;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

fn set_version(manifest: &Path, version: &str) {
    let text = std::fs::read_to_string(manifest).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("version = "))
        .unwrap()
        .to_string();
    std::fs::write(
        manifest,
        text.replace(&line, &format!("version = \"{version}\"")),
    )
    .unwrap();
}

fn plugin_state(http: u16, name: &str) -> serde_json::Value {
    let list: serde_json::Value = serde_json::from_str(&http_get(http, "/api/plugins")).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .cloned()
        .unwrap()
}

#[test]
fn a_logging_method_is_reloaded_under_a_running_job_and_a_broken_one_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    // The daemons' own plugin directory, so that the test can change it.
    let plugins = dir.join("plugins");
    for p in ["file-logging", "file-browser", "tcp-transport"] {
        copy_dir(&bundle().join(p), &plugins.join(p));
    }
    let transport = Transport::Tcp { port: free_port() };
    let (controller, agent, http) = write_configs(dir, &transport);
    for cfg in [&controller, &agent] {
        let text = std::fs::read_to_string(cfg).unwrap().replace(
            &format!("plugin-dir = \"{}\"", bundle().display()),
            &format!("plugin-dir = \"{}\"", plugins.display()),
        );
        std::fs::write(cfg, text).unwrap();
    }
    let daemons = start_daemons(dir, &controller, &agent, http);
    let http = daemons.http; // moved if the controller lost its port
    let (log, server) = (daemons.log.clone(), daemons.server.clone());
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(plugin_state(http, "file-logging")["generation"], 1);

    let job = |name: &str, lines: u32| {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "name = \"{name}\"\nagent = \"linux\"\n[[step]]\nname = \"count\"\nrun = \"for i in $(seq 1 {lines}); do echo {name} $i; sleep 0.02; done\"\n"
            ),
        )
        .unwrap();
        let (code, out, err) = cli(&server, &["run", path.to_str().unwrap()]);
        assert_eq!(code, 0, "{out}{err}");
    };
    job("long", 400);
    wait_until(
        "no output before the reload",
        Duration::from_secs(30),
        || cli(&server, &["logs", "r-000001"]).1.lines().count() >= 50,
    );

    // A new version, by command.
    let manifest = plugins.join("file-logging/plugin.toml");
    set_version(&manifest, "0.1.1");
    let (code, out, err) = cli(&server, &["plugin", "reload", "file-logging"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("version 0.1.1 (generation 2"), "{out}");
    let state = plugin_state(http, "file-logging");
    assert_eq!(state["version"], "0.1.1");
    assert_eq!(state["generation"], 2);

    // A broken one: the transport's component where the logging method's was. Its
    // canary refuses it, the reason is named, and the old code keeps serving.
    let wasm = plugins.join("file-logging/file_logging.wasm");
    let good = std::fs::read(&wasm).unwrap();
    std::fs::copy(plugins.join("tcp-transport/tcp_transport.wasm"), &wasm).unwrap();
    let (code, out, err) = cli(&server, &["plugin", "reload", "file-logging"]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("refused; the old one keeps serving"), "{err}");
    assert!(
        err.contains("logging-method"),
        "the reason names what is missing: {err}"
    );
    assert_eq!(plugin_state(http, "file-logging")["generation"], 2);

    // The daemon notices a changed directory by itself (the good component back, a new
    // version number): within a few of its 2 s looks.
    std::fs::write(&wasm, &good).unwrap();
    set_version(&manifest, "0.1.2");
    let t = std::time::Instant::now();
    while plugin_state(http, "file-logging")["version"] != "0.1.2" {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the changed plugin was not reloaded within 30 s: {}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(plugin_state(http, "file-logging")["generation"], 3);

    // The run in flight through all of it: complete, every line once, in order.
    wait_for_success(&server, "r-000001", Duration::from_secs(90), &log);
    let (code, out, _) = cli(&server, &["logs", "r-000001"]);
    assert_eq!(code, 0);
    let want: Vec<String> = (1..=400).map(|i| format!("long {i}")).collect();
    assert_eq!(out.lines().collect::<Vec<_>>(), want);
    // New work is served by the new generation.
    job("after", 20);
    wait_for_success(&server, "r-000002", Duration::from_secs(60), &log);
    let (_, out, _) = cli(&server, &["logs", "r-000002"]);
    assert_eq!(out.lines().count(), 20, "{out}");
}

#[test]
fn changed_plugin_config_grants_and_limits_are_tried_on_a_canary_and_reloaded() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let transport = Transport::Tcp { port: free_port() };
    let (controller, agent, http) = write_configs(dir, &transport);
    let daemons = start_daemons(dir, &controller, &agent, http);
    let http = daemons.http; // moved if the controller lost its port
    let (log, server) = (daemons.log.clone(), daemons.server.clone());
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    let original = std::fs::read_to_string(&controller).unwrap();
    let grant = "[plugins.file-logging]\ndirs = [{ host = \"state/logs\", guest = \"/logs\", mode = \"read-write\" }]\n";
    assert!(original.contains(grant));
    let with_config =
        |config: &str| original.replace(grant, &format!("{grant}config = {config}\n"));
    // A directory the plugin was not granted: its init refuses it on the canary.
    std::fs::write(&controller, with_config("{ directory = \"/nope\" }")).unwrap();
    wait_for_line(
        &log,
        "its configuration changed, but it is refused",
        Duration::from_secs(30),
    );
    assert!(
        logs().contains("directory `/nope` is not available"),
        "{}",
        logs()
    );
    assert_eq!(plugin_state(http, "file-logging")["generation"], 1);

    // A good one (the granted directory, said explicitly): reloaded.
    std::fs::write(&controller, with_config("{ directory = \"/logs\" }")).unwrap();
    wait_for_line(
        &log,
        "its configuration changed: reloaded",
        Duration::from_secs(30),
    );
    assert_eq!(plugin_state(http, "file-logging")["generation"], 2);

    // Changed grants and limits: the logging method and the browser move to another
    // directory, and the method gets a shorter call timeout. Both are reloaded (canary
    // first) with their new tables.
    std::fs::create_dir_all(dir.join("state/logs2")).unwrap();
    let moved = with_config("{ directory = \"/logs\" }")
        .replace("host = \"state/logs\"", "host = \"state/logs2\"")
        .replace(
            "config = { directory = \"/logs\" }\n",
            "config = { directory = \"/logs\" }\nlimits = { call-timeout = \"3s\" }\n",
        );
    assert_eq!(moved.matches("state/logs2").count(), 2, "{moved}");
    std::fs::write(&controller, &moved).unwrap();
    wait_until("both plugins reloaded", Duration::from_secs(30), || {
        plugin_state(http, "file-logging")["generation"] == 3
            && plugin_state(http, "file-browser")["generation"] == 2
    });
    let state = plugin_state(http, "file-logging");
    assert_eq!(state["limits"]["call_timeout_ms"], 3000, "{state}");

    // A revoked grant its init needs: the canary refuses it; the old one keeps serving.
    let revoked = moved.replace(
        "[plugins.file-logging]\ndirs = [{ host = \"state/logs2\", guest = \"/logs\", mode = \"read-write\" }]\n",
        "[plugins.file-logging]\n",
    );
    assert_ne!(revoked, moved);
    std::fs::write(&controller, &revoked).unwrap();
    let (code, _, err) = cli(&server, &["plugin", "reload", "file-logging"]);
    assert_ne!(code, 0);
    assert!(err.contains("directory `/logs` is not available"), "{err}");
    assert_eq!(plugin_state(http, "file-logging")["generation"], 3);
    std::fs::write(&controller, &moved).unwrap();

    // Runs are logged by the reloaded generation.
    let job = dir.join("job.toml");
    std::fs::write(
        &job,
        "name = \"after\"\nagent = \"linux\"\n[[step]]\nname = \"s\"\nrun = \"seq 1 50\"\n",
    )
    .unwrap();
    let (code, out, err) = cli(&server, &["run", job.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    wait_for_success(&server, "r-000001", Duration::from_secs(60), &log);
    let (_, out, _) = cli(&server, &["logs", "r-000001"]);
    assert_eq!(out.lines().count(), 50, "{out}");
    // Written and read where the reloaded grants say.
    assert!(dir.join("state/logs2/after/r-000001.jsonl").is_file());
    assert!(!dir.join("state/logs/after").exists());
}

//! The versioned contract: one daemon serves a plugin built for `trellis:plugin@0.1.0`
//! (tests/fixtures/file-browser-v0-1: file-browser's 0.1.0 source, unchanged, built with
//! the SDK's `wit-0-1` feature against the frozen wit/v0.1.0) next to the bundle's 0.2.0
//! plugins. Two runs are logged by file-logging (0.2.0); one is read back through
//! file-browser (0.2.0), the other through the 0.1.0 browser. Both read back whole; only
//! the 0.2.0 browser's pages carry 0.2.0's `total`. Then the 0.1.0 browser is upgraded in
//! place to a 0.2.0 build by a hot reload, and its run now has a total.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

fn copy_plugin(from: &Path, to: &Path, name: &str) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let file = e.file_name();
        if file == "plugin.toml" {
            // The same plugin name across the upgrade (a reload keeps the name).
            let text = std::fs::read_to_string(e.path()).unwrap();
            let mut lines: Vec<String> = text.lines().map(String::from).collect();
            let at = lines.iter().position(|l| l.starts_with("name = ")).unwrap();
            lines[at] = format!("name = \"{name}\"");
            std::fs::write(to.join("plugin.toml"), lines.join("\n") + "\n").unwrap();
        } else if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(&file)).unwrap();
        }
    }
}

/// The first page of `run`'s log (limit 100) from the API.
fn first_page(http: u16, run: &str) -> Value {
    let (status, body) = http_get_status(http, &format!("/api/runs/{run}/log?limit=100"));
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn a_0_1_0_plugin_and_0_2_0_plugins_serve_in_one_daemon() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let old = dir.join("plugins/old-browser");
    copy_plugin(&fixtures().join("file-browser-v0-1"), &old, "old-browser");
    let transport = Transport::Tcp { port: free_port() };
    let (controller, agent, http) = write_configs(dir, &transport);
    extend_controller(
        &controller,
        "log-browsers = [\"old-browser\"]",
        &format!(
            "[plugins.old-browser]\npath = \"{}\"\ndirs = [{{ host = \"state/logs\", guest = \"/logs\" }}]\n",
            old.display()
        ),
    );
    let daemons = start_daemons(dir, &controller, &agent, http);
    let http = daemons.http; // moved if the controller lost its port
    let (log, server) = (daemons.log.clone(), daemons.server.clone());

    // Which contract each plugin serves, as the daemon reports it.
    let plugins: Value = serde_json::from_str(&http_get(http, "/api/plugins")).unwrap();
    let wit = |name: &str| {
        plugins
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{name} not loaded: {plugins}"))["wit"]
            .clone()
    };
    assert_eq!(wit("old-browser"), "0.1.0", "{plugins}");
    assert_eq!(wit("file-browser"), "0.3.0", "{plugins}");
    assert_eq!(wit("file-logging"), "0.3.0", "{plugins}");

    let lines = 250;
    for (i, browser) in ["file-browser", "old-browser"].iter().enumerate() {
        let job = dir.join(format!("job-{browser}.toml"));
        std::fs::write(
            &job,
            format!(
                "name = \"read-by-{browser}\"\nagent = \"linux\"\nbrowser = \"{browser}\"\n\
                 [[step]]\nname = \"count\"\nrun = \"for i in $(seq 1 {lines}); do echo line $i; done\"\n"
            ),
        )
        .unwrap();
        let (code, out, err) = cli(&server, &["run", job.to_str().unwrap()]);
        assert_eq!(code, 0, "{out}{err}");
        wait_for_success(
            &server,
            &format!("r-{:06}", i + 1),
            Duration::from_secs(60),
            &log,
        );
    }
    let (new_run, old_run) = ("r-000001", "r-000002");

    // Both read back whole through their own browser (the CLI pages through the API).
    let want: Vec<String> = (1..=lines).map(|n| format!("line {n}")).collect();
    for run in [new_run, old_run] {
        let (code, out, err) = cli(&server, &["logs", run]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(out.lines().collect::<Vec<_>>(), want, "{run}");
        let record: Value =
            serde_json::from_str(&http_get(http, &format!("/api/runs/{run}"))).unwrap();
        assert_eq!(record["status"], "succeeded", "{record}");
    }

    // The 0.2.0 browser counts; the 0.1.0 one's pages have no total, and no error.
    let new_page = first_page(http, new_run);
    let old_page = first_page(http, old_run);
    let events = new_page["events"].as_array().unwrap().len();
    assert_eq!(events, 100, "{new_page}");
    assert_eq!(
        old_page["events"].as_array().unwrap().len(),
        100,
        "{old_page}"
    );
    let total = new_page["total"]
        .as_u64()
        .expect("a 0.2.0 page has a total");
    assert!(
        total >= lines as u64,
        "total {total} for {lines} lines: {new_page}"
    );
    assert!(old_page["total"].is_null(), "{old_page}");
    assert_eq!(old_page["completeness"], new_page["completeness"]);

    // Upgrade the 0.1.0 plugin in place to a 0.2.0 build; the same run now has a total.
    copy_plugin(&bundle().join("file-browser"), &old, "old-browser");
    let (code, out, err) = cli(&server, &["plugin", "reload", "old-browser"]);
    assert_eq!(code, 0, "{out}{err}");
    let plugins: Value = serde_json::from_str(&http_get(http, "/api/plugins")).unwrap();
    let upgraded = plugins
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "old-browser")
        .unwrap();
    assert_eq!(upgraded["wit"], "0.3.0", "{plugins}");
    let after = first_page(http, old_run);
    assert_eq!(after["total"].as_u64(), Some(total), "{after}");
    assert_eq!(after["events"], old_page["events"]);
}

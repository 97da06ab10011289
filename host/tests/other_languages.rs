//! The Python and JavaScript example plugins in the daemon, next to the Rust ones: one
//! controller process loads file-logging (Rust, the default), python-logger and
//! js-logger as logging methods; jobs pick one each (`logging = "..."`), run on an
//! agent process, and the default file browser (Rust) reads every run's log back whole
//! through the CLI.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn jobs_log_through_python_and_javascript_plugins_in_the_daemon() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let transport = Transport::Tcp { port: free_port() };
    let (controller, agent, http) = write_configs(dir, &transport);
    extend_controller(
        &controller,
        "logging-methods = [\"python-logger\", \"js-logger\"]",
        "[plugins.python-logger]\ndirs = [{ host = \"state/logs\", guest = \"/logs\", mode = \"read-write\" }]\n\
         [plugins.js-logger]\ndirs = [{ host = \"state/logs\", guest = \"/logs\", mode = \"read-write\" }]\n",
    );
    let daemons = start_daemons(dir, &controller, &agent, http);
    let http = daemons.http; // moved if the controller lost its port
    let (log, server) = (daemons.log.clone(), daemons.server.clone());

    let methods = ["file-logging", "python-logger", "js-logger"];
    for (i, method) in methods.iter().enumerate() {
        let job = dir.join(format!("job-{method}.toml"));
        std::fs::write(
            &job,
            format!(
                "name = \"{method}-job\"\nagent = \"linux\"\nlogging = \"{method}\"\n\
                 [[step]]\nname = \"count\"\nrun = \"for i in $(seq 1 300); do echo {method} line $i; done; echo 'ünïcødé ✓'\"\n"
            ),
        )
        .unwrap();
        let (code, out, err) = cli(&server, &["run", job.to_str().unwrap()]);
        assert_eq!(code, 0, "{out}{err}");
        let run = format!("r-{:06}", i + 1);
        wait_for_success(&server, &run, Duration::from_secs(60), &log);
        let (code, out, err) = cli(&server, &["logs", &run]);
        assert_eq!(code, 0, "{err}");
        let mut want: Vec<String> = (1..=300).map(|n| format!("{method} line {n}")).collect();
        want.push("ünïcødé ✓".into());
        assert_eq!(out.lines().collect::<Vec<_>>(), want, "{method}");
        // The run was logged by that method (its locator says so) and written where it
        // writes: the job's own file in the shared layout.
        let record: serde_json::Value =
            serde_json::from_str(&http_get(http, &format!("/api/runs/{run}"))).unwrap();
        assert_eq!(record["log"]["method"], *method, "{record}");
        let file = dir.join(format!("state/logs/{method}-job/{run}.jsonl"));
        assert!(file.exists(), "{method}: {}", file.display());
    }
}

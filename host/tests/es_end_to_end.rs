//! Elasticsearch logging and browsing end to end, with the daemons as real processes and
//! OpenSearch 2.19.6 as the store (one node shared by the tests that do not stop it, each
//! with its own job names; a node of their own for the two that stop and start it):
//!
//! * JEP-212's locator: a job names the ES method and browser, another uses the
//!   defaults (files); each reads back whole, per step and by tail; after the defaults
//!   change, older runs stay readable with the browser they were written for.
//! * JEP-212's agent side: elasticsearch-logging writes from the agent. The controller
//!   is not even granted the store (it could not write if it tried), and no output
//!   passes through it.
//! * The store down for the middle of a run: the run succeeds, the output waits in the
//!   agent's buffer, and once the store is back the log is complete, no duplicate.
//! * The agent killed while its buffer holds output the store has not taken: restarted,
//!   it delivers that output and closes the log.
//! * Near-real-time: a finished run read before a refresh is reported incomplete (and a
//!   follower waits), then complete once the documents are visible.
//! * On tests/es-mock, because OpenSearch does not produce them on demand: a 429 storm on
//!   whole `_bulk` requests and items refused with 429 (the last test).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Controller and agent configs (TCP); `keys` go into `[controller]`. The agent writes
/// with elasticsearch-logging, granted `es`; the controller reads with
/// elasticsearch-browser, granted `es`, and loads elasticsearch-logging (to learn that it
/// runs on the agent) without any grant.
fn es_configs(dir: &Path, es: &str, keys: &str) -> (PathBuf, PathBuf, u16) {
    let (controller, agent, http) = write_configs(dir, &Transport::Tcp { port: free_port() });
    set_controller_keys(&controller, keys);
    let mut cfg = std::fs::read_to_string(&controller).unwrap();
    cfg += &format!("[plugins.elasticsearch-logging]\nconfig = {{ url = \"{es}\" }}\n");
    cfg += &format!(
        "[plugins.elasticsearch-browser]\nhttp = [\"{es}\"]\nconfig = {{ url = \"{es}\" }}\n"
    );
    std::fs::write(&controller, cfg).unwrap();
    let cfg = std::fs::read_to_string(&agent).unwrap().replace(
        "heartbeat = \"500ms\"\n",
        "heartbeat = \"500ms\"\nlogging-methods = [\"elasticsearch-logging\"]\n",
    );
    let cfg = cfg
        + &format!(
            "[plugins.elasticsearch-logging]\nhttp = [\"{es}\"]\nconfig = {{ url = \"{es}\" }}\n"
        );
    std::fs::write(&agent, cfg).unwrap();
    (controller, agent, http)
}

/// `[controller]` keys making Elasticsearch the default method and browser.
const ES_DEFAULTS: &str =
    "logging = \"elasticsearch-logging\"\nbrowser = \"elasticsearch-browser\"";

/// The agent's write-ahead file for `run`'s log.
fn agent_wal(dir: &Path, run: &str) -> PathBuf {
    dir.join(format!(
        "work/.trellis/log-buffer/elasticsearch-logging/{run}.wal"
    ))
}

/// Whether that file holds events (beyond the header and the log's description).
fn agent_buffer_holds(dir: &Path, run: &str) -> bool {
    std::fs::metadata(agent_wal(dir, run)).is_ok_and(|m| m.len() > 200)
}

/// Replace what `es_configs` (or an earlier call) put into `[controller]`.
fn set_controller_keys(controller: &Path, keys: &str) {
    let cfg = std::fs::read_to_string(controller).unwrap();
    let (head, tail) = cfg.split_once("transport = \"tcp-transport\"\n").unwrap();
    let tail = tail.split_once("# end of keys\n").map_or(tail, |(_, t)| t);
    std::fs::write(
        controller,
        format!("{head}transport = \"tcp-transport\"\n{keys}\n# end of keys\n{tail}"),
    )
    .unwrap();
}

/// A job file `NAME.toml` with steps `build` (`build_lines` lines) and `test` (`test_lines`),
/// and extra top-level keys.
fn job(dir: &Path, name: &str, keys: &str, build_lines: u32, test_lines: u32) -> PathBuf {
    let f = dir.join(format!("{name}.toml"));
    std::fs::write(
        &f,
        format!(
            "name = \"{name}\"\nagent = \"linux\"\n{keys}\n[[step]]\nname = \"build\"\nrun = \"for i in $(seq 1 {build_lines}); do echo build $i; done\"\n[[step]]\nname = \"test\"\nrun = \"for i in $(seq 1 {test_lines}); do echo test $i; done\"\n"
        ),
    )
    .unwrap();
    f
}

/// Both daemons started on the configs; (controller, agent, server URL, daemons' log).
fn start_daemons(
    dir: &Path,
    controller: &Path,
    agent: &Path,
    http: u16,
) -> (Daemon, Daemon, String, PathBuf) {
    let server = format!("http://127.0.0.1:{http}");
    let daemon_log = dir.join("daemons.log");
    let c = start("controller", controller, &daemon_log);
    let a = start("agent", agent, &daemon_log);
    wait_for_agent(&server, &daemon_log);
    (c, a, server, daemon_log)
}

fn lines(prefix: &str, n: u32) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix} {i}")).collect()
}

/// `trellis logs ARGS`, once the browser reports the log complete (closed, and every
/// event searchable: ES shows documents only after a refresh); its lines.
fn complete_log(server: &str, args: &[&str]) -> Vec<String> {
    let t = std::time::Instant::now();
    loop {
        let (code, out, err) = cli(server, &[&["logs"], args].concat());
        if code == 0 && !err.contains("so far") && !err.contains("still open") {
            return out.lines().map(String::from).collect();
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the log was not reported complete: {code} {out}{err}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn submit(server: &str, job: &Path) -> String {
    let (code, out, err) = cli(server, &["run", job.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    out.split_whitespace()
        .find(|w| w.starts_with("r-"))
        .unwrap_or_else(|| panic!("no run id in {out:?}"))
        .trim_end_matches([':', ','])
        .to_string()
}

#[test]
fn jobs_choose_their_logging_method_and_browser() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let es = OpenSearch::shared();
    let (controller_cfg, agent_cfg, http) = es_configs(
        dir,
        &es.url(),
        "logging-methods = [\"elasticsearch-logging\"]\nlog-browsers = [\"elasticsearch-browser\"]",
    );
    let (mut controller, _agent, server, daemon_log) =
        start_daemons(dir, &controller_cfg, &agent_cfg, http);

    // Logged to Elasticsearch, read back from it.
    let es_job = job(dir, "es-job", ES_DEFAULTS, 120, 80);
    let es_run = submit(&server, &es_job);
    wait_for_success(&server, &es_run, Duration::from_secs(60), &daemon_log);
    let whole = complete_log(&server, &[&es_run]);
    assert_eq!(whole, [lines("build", 120), lines("test", 80)].concat());
    assert_eq!(
        complete_log(&server, &[&es_run, "--step", "test"]),
        lines("test", 80)
    );
    assert_eq!(
        complete_log(&server, &[&es_run, "--step", "build", "--tail", "2"]),
        ["build 119", "build 120"]
    );
    assert_eq!(
        es.count("trellis-logs-es-job"),
        Some(201),
        "200 events and the close document"
    );
    assert!(!dir.join("state/logs/es-job").exists(), "not in the files");

    // The defaults: files.
    let file_job = job(dir, "file-job", "", 3, 2);
    let file_run = submit(&server, &file_job);
    wait_for_success(&server, &file_run, Duration::from_secs(60), &daemon_log);
    assert_eq!(
        complete_log(&server, &[&file_run]),
        [lines("build", 3), lines("test", 2)].concat()
    );
    assert_eq!(es.count("trellis-logs-file-job"), None, "not in ES");

    // A method the controller does not load is refused with the fix.
    let bad = job(dir, "bad-job", "logging = \"no-such-method\"", 1, 1);
    let (code, out, err) = cli(&server, &["run", bad.to_str().unwrap()]);
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("`no-such-method`")
            && err.contains("add it to [controller] logging-methods")
            && err.contains("elasticsearch-logging"),
        "{err}"
    );

    // New defaults: Elasticsearch. The file-logged run is still read with its browser.
    controller.0.kill().unwrap();
    controller.0.wait().unwrap();
    set_controller_keys(
        &controller_cfg,
        "logging = \"elasticsearch-logging\"\nbrowser = \"elasticsearch-browser\"\nlogging-methods = [\"file-logging\"]\nlog-browsers = [\"file-browser\"]",
    );
    let _controller = restart_controller(&controller_cfg, &daemon_log);
    wait_for_agent(&server, &daemon_log);
    assert_eq!(
        complete_log(&server, &[&file_run]),
        [lines("build", 3), lines("test", 2)].concat(),
        "a run logged before the change reads back with the browser it was written for"
    );
    let next = submit(&server, &file_job);
    wait_for_success(&server, &next, Duration::from_secs(60), &daemon_log);
    assert_eq!(
        complete_log(&server, &[&next]),
        [lines("build", 3), lines("test", 2)].concat()
    );
    assert_eq!(
        es.count("trellis-logs-file-job"),
        Some(6),
        "the default is ES now"
    );
}

#[test]
fn the_store_down_mid_run_loses_nothing_and_fails_nothing() {
    const N: u32 = 400;
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let mut es = OpenSearch::start(dir);
    let (controller_cfg, agent_cfg, http) = es_configs(dir, &es.url(), ES_DEFAULTS);
    let (_controller, _agent, server, daemon_log) =
        start_daemons(dir, &controller_cfg, &agent_cfg, http);

    // The build step prints a line every 10 ms; the store goes away once some of it is in.
    let f = dir.join("slow.toml");
    std::fs::write(
        &f,
        format!("name = \"slow\"\nagent = \"linux\"\n[[step]]\nname = \"build\"\nrun = \"for i in $(seq 1 {N}); do echo line $i; sleep 0.01; done\"\n"),
    )
    .unwrap();
    let run = submit(&server, &f);
    wait_until("nothing reached the store", Duration::from_secs(30), || {
        es.count("trellis-logs-slow").is_some_and(|n| n >= 20)
    });
    es.stop(); // the store is down (its data directory keeps what it confirmed)

    wait_for_success(&server, &run, Duration::from_secs(60), &daemon_log);
    assert!(
        agent_buffer_holds(dir, &run),
        "the output waits in the agent's buffer"
    );
    assert_eq!(
        log_buffer_bytes(http, "elasticsearch-logging"),
        0,
        "nothing passes through the controller"
    );
    let (code, _, err) = cli(&server, &["logs", &run]);
    assert_ne!(code, 0, "the browser cannot reach the store either");
    assert!(err.contains("log store unavailable"), "{err}");

    es.start_again(); // back, with what it had
    let got = complete_log(&server, &[&run]);
    assert_eq!(got, lines("line", N), "every line once, in order");
    assert_eq!(es.count("trellis-logs-slow"), Some(u64::from(N) + 1));
    wait_until("the buffer did not drain", Duration::from_secs(10), || {
        !agent_wal(dir, &run).exists()
    });
}

#[test]
fn an_agent_killed_with_undelivered_output_delivers_it_when_restarted() {
    const N: u64 = 300;
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let mut es = OpenSearch::start(dir);
    let (controller_cfg, agent_cfg, http) = es_configs(dir, &es.url(), ES_DEFAULTS);
    let (_controller, mut agent, server, daemon_log) =
        start_daemons(dir, &controller_cfg, &agent_cfg, http);

    // 100 lines, a pause while the store goes away, 200 more, then a long sleep.
    let gate = dir.join("gate");
    let f = dir.join("killed.toml");
    std::fs::write(
        &f,
        format!(
            "name = \"killed\"\nagent = \"linux\"\n[[step]]\nname = \"build\"\nrun = \"seq 1 100 | sed 's/^/line /'; while [ ! -e {g} ]; do sleep 0.05; done; seq 101 {N} | sed 's/^/line /'; sleep 600\"\n",
            g = gate.display()
        ),
    )
    .unwrap();
    let run = submit(&server, &f);
    wait_until(
        "the first lines did not reach the store",
        Duration::from_secs(30),
        || es.count("trellis-logs-killed") == Some(100),
    );
    es.stop(); // the store is down
    std::fs::write(&gate, "").unwrap();
    // The controller counts what the agent logged (the agent sends counts, not lines).
    wait_until(
        "the agent did not log every line",
        Duration::from_secs(30),
        || {
            let record = http_get(http, &format!("/api/runs/{run}"));
            serde_json::from_str::<serde_json::Value>(&record)
                .ok()
                .and_then(|v| v["events"].as_u64())
                == Some(N)
        },
    );
    assert!(
        agent_buffer_holds(dir, &run),
        "the store is down: the lines wait"
    );
    agent.0.kill().unwrap(); // SIGKILL, with the lines on the agent's disk only
    agent.0.wait().unwrap();

    es.start_again(); // back
    let _agent = start("agent", &agent_cfg, &daemon_log);
    let got = complete_log(&server, &[&run]);
    assert_eq!(
        got,
        (1..=N).map(|i| format!("line {i}")).collect::<Vec<_>>(),
        "every line once, in order, the log closed with what the run had"
    );
    assert_eq!(es.count("trellis-logs-killed"), Some(N + 1));
}

#[test]
fn a_finished_log_is_incomplete_until_the_store_shows_all_of_it() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    // No periodic refresh: documents become visible only on `_refresh`.
    // The index made before the plugin's first write, so under its template (the
    // browser's term queries need its keyword fields).
    let es = OpenSearch::shared();
    let template = elasticsearch_store::documents::index_template("trellis-logs-*");
    let (status, out) = es.call(
        "PUT",
        "/_index_template/trellis-logs",
        &template.to_string(),
    );
    assert_eq!(status, 200, "{out}");
    es.create_unrefreshed_index("trellis-logs-nrt");
    let (controller_cfg, agent_cfg, http) = es_configs(dir, &es.url(), ES_DEFAULTS);
    let (_controller, _agent, server, daemon_log) =
        start_daemons(dir, &controller_cfg, &agent_cfg, http);

    let run = submit(&server, &job(dir, "nrt", "", 30, 20));
    wait_for_success(&server, &run, Duration::from_secs(60), &daemon_log);
    // Closed (the close document is read in real time), nothing searchable yet.
    wait_until("the log was not closed", Duration::from_secs(20), || {
        es.call(
            "GET",
            &format!("/trellis-logs-nrt/_doc/trellis:run:{run}:close"),
            "",
        )
        .0 == 200
    });
    let (code, out, err) = cli(&server, &["logs", &run]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "", "nothing is visible before a refresh");
    assert!(
        err.contains("the log store has 0 of 50 events so far"),
        "{err}"
    );
    let (_, page, _) = cli(&server, &["logs", &run, "--tail", "1"]);
    assert_eq!(page, "");

    // A follower waits for the rest instead of ending short.
    let follower = trellis()
        .args(["logs", &run, "--follow"])
        .env("TRELLIS_SERVER", &server)
        .env("TRELLIS_TOKEN", token_for(http).unwrap())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut follower = Daemon(follower);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        follower.0.try_wait().unwrap().is_none(),
        "the follower ended before the log was complete"
    );
    es.refresh("trellis-logs-nrt");
    let t = std::time::Instant::now();
    while follower.0.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(15) {
            let (code, out, err) = cli(&server, &["logs", &run]);
            let (_, search) = es.call("GET", "/trellis-logs-nrt/_search?size=100", "");
            panic!(
                "the follower did not end; `trellis logs` now: {code} {out}{err}\nthe index: {search}"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut followed = String::new();
    std::io::Read::read_to_string(follower.0.stdout.as_mut().unwrap(), &mut followed).unwrap();
    let want = [lines("build", 30), lines("test", 20)].concat();
    assert_eq!(followed.lines().collect::<Vec<_>>(), want);
    assert_eq!(complete_log(&server, &[&run]), want);
}

#[test]
fn an_agent_side_method_needs_an_agent_that_loads_it() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let es = OpenSearch::shared();
    let (controller_cfg, agent_cfg, http) = es_configs(
        dir,
        &es.url(),
        "logging-methods = [\"elasticsearch-logging\"]",
    );
    // A controller-side method listed for the agent is refused when the agent starts.
    let wrong = dir.join("wrong-agent.toml");
    let cfg = std::fs::read_to_string(&agent_cfg).unwrap();
    std::fs::create_dir_all(dir.join("agent-logs")).unwrap();
    std::fs::write(
        &wrong,
        cfg.replace("[\"elasticsearch-logging\"]", "[\"file-logging\"]")
            + "[plugins.file-logging]\ndirs = [{ host = \"agent-logs\", guest = \"/logs\", mode = \"read-write\" }]\n",
    )
    .unwrap();
    let o = trellis()
        .args([
            "agent",
            "--config",
            wrong.to_str().unwrap(),
            "--check-config",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("`file-logging` writes from the controller")
            && err.contains("[controller] logging-methods"),
        "{err}"
    );

    // An agent without the method: a job logged with it is refused, naming the fix.
    std::fs::write(
        &agent_cfg,
        cfg.replace("logging-methods = [\"elasticsearch-logging\"]\n", ""),
    )
    .unwrap();
    let (_controller, _agent, server, _) = start_daemons(dir, &controller_cfg, &agent_cfg, http);
    let j = job(dir, "es-job", "logging = \"elasticsearch-logging\"", 1, 1);
    let (code, out, err) = cli(&server, &["run", j.to_str().unwrap()]);
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("no agent with label `linux` has logging method `elasticsearch-logging`")
            && err.contains("[agent] logging-methods"),
        "{err}"
    );
}

/// Through the daemons, on tests/es-mock (faults OpenSearch does not make on demand): a
/// storm of 429s on whole `_bulk` requests, and every seventh item refused once with
/// 429, while a run logs 3,000 lines. The log is
/// complete, each event stored once (the store's own counts say so).
#[test]
fn storms_and_partial_bulk_failures_lose_and_duplicate_nothing() {
    const N: u64 = 3000;
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let es = EsMock::start(&["--refresh-interval-ms", "200"]);
    let (controller_cfg, agent_cfg, http) = es_configs(dir, &es.url(), ES_DEFAULTS);
    let (_controller, _agent, server, daemon_log) =
        start_daemons(dir, &controller_cfg, &agent_cfg, http);
    let fault = |body: &str| {
        let (status, out) = es.call("POST", "/_mock/faults", body);
        assert_eq!(status, 200, "{out}");
    };
    fault(r#"{"fail_items": {"every_nth": 7, "status": 429, "times": 1}}"#);
    fault(r#"{"status_storm": {"status": 429, "count": 6, "match": "_bulk", "retry_after": 1}}"#);

    let f = dir.join("storm.toml");
    std::fs::write(
        &f,
        format!("name = \"storm\"\nagent = \"linux\"\n[[step]]\nname = \"build\"\nrun = \"seq 1 {N} | sed 's/^/line /'\"\n"),
    )
    .unwrap();
    let run = submit(&server, &f);
    wait_for_success(&server, &run, Duration::from_secs(60), &daemon_log);
    let got = complete_log(&server, &[&run]);
    assert_eq!(
        got,
        (1..=N).map(|i| format!("line {i}")).collect::<Vec<_>>(),
        "every line once, in order"
    );

    let (_, stats) = es.call("GET", "/_mock/stats", "");
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert!(
        stats["storm_responses"].as_u64().unwrap() >= 6,
        "the storm happened: {stats}"
    );
    assert!(
        stats["bulk"]["items_failed_injected"].as_u64().unwrap() > 0,
        "items were refused: {stats}"
    );
    let index = &stats["indices"]["trellis-logs-storm"];
    assert_eq!(index["docs_total"], N + 1, "{stats}");
    assert_eq!(index["overwrites"], 0, "nothing written twice: {stats}");
}

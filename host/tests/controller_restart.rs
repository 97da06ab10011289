//! The headline of the Kafka transport issue: a build survives losing its controller.
//! The controller and agent run as real processes; mid-step the controller is killed
//! with SIGKILL and started again on the same state directory while the agent keeps
//! working. The run must complete, with every line of its log exactly once, in order —
//! over the default TCP transport and over Kafka (a real Apache Kafka broker on loopback).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Lines the job prints, one every 10 ms: long enough to kill the controller mid-step.
const LINES: usize = 600;

fn controller_restarted_mid_step(t: Transport) {
    let d = tempfile::tempdir().unwrap();
    let (controller_cfg, agent_cfg, http) = write_configs(d.path(), &t);
    let server = format!("http://127.0.0.1:{http}");
    let daemon_log = d.path().join("daemons.log");
    let mut controller = start("controller", &controller_cfg, &daemon_log);
    let _agent = start("agent", &agent_cfg, &daemon_log);
    let logs = || std::fs::read_to_string(&daemon_log).unwrap_or_default();
    wait_for_agent(&server, &daemon_log);

    let job = d.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            "name = \"survivor\"\nagent = \"linux\"\n[[step]]\nname = \"count\"\nrun = \"for i in $(seq 1 {LINES}); do echo line $i; sleep 0.01; done\"\n[[step]]\nname = \"after\"\nrun = \"echo done\"\n"
        ),
    )
    .unwrap();
    let (code, out, err) = cli(&server, &["run", job.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let run = "r-000001";
    // Kill the controller once some output has been logged, with the step still going.
    wait_until(
        "no output logged before the kill",
        Duration::from_secs(30),
        || cli(&server, &["logs", run]).1.lines().count() >= 50,
    );
    let before = cli(&server, &["logs", run]).1.lines().count();
    controller.0.kill().unwrap(); // SIGKILL: no chance to save or say goodbye
    controller.0.wait().unwrap();
    assert!(
        before < LINES,
        "the step ended before the kill ({before} lines)"
    );
    std::thread::sleep(Duration::from_secs(1)); // the agent keeps working meanwhile

    let _controller = restart_controller(&controller_cfg, &daemon_log);
    let mut status = String::new();
    wait_until(
        &format!(
            "the run did not end after the restart: {status}\n{}",
            logs()
        ),
        Duration::from_secs(90),
        || {
            let (code, out, _) = cli(&server, &["runs"]);
            status = out.clone();
            code == 0
                && out
                    .lines()
                    .any(|l| l.contains(run) && !l.contains("running") && !l.contains("queued"))
        },
    );
    assert!(
        status
            .lines()
            .any(|l| l.contains(run) && l.contains("succeeded")),
        "{status}\n{}",
        logs()
    );
    let (code, log, err) = cli(&server, &["logs", run]);
    assert_eq!(code, 0, "{err}");
    let expected: Vec<String> = (1..=LINES)
        .map(|i| format!("line {i}"))
        .chain(["done".to_string()])
        .collect();
    let got: Vec<&str> = log.lines().collect();
    assert_eq!(
        got.len(),
        expected.len(),
        "every line exactly once (killed at {before} lines)"
    );
    assert!(
        got.iter().zip(&expected).all(|(g, e)| g == e),
        "in order, none missing, none repeated"
    );
    // The log is reported complete (its final count was recorded at close).
    let (code, out, err) = cli(&server, &["logs", run, "--tail", "1"]);
    assert_eq!((code, out.as_str()), (0, "done\n"), "{err}");
}

#[test]
fn a_run_survives_a_controller_restart_over_tcp() {
    controller_restarted_mid_step(Transport::Tcp { port: free_port() });
}

#[test]
fn a_run_survives_a_controller_restart_over_kafka() {
    let broker = Kafka::start();
    controller_restarted_mid_step(Transport::Kafka {
        brokers: broker.brokers(),
    });
}

/// Queued runs survive a controller restart. With the agent's one executor held by a
/// run waiting on a gate file, two runs wait in the queue (one for a label no agent
/// has, at a higher priority); the controller is SIGKILLed and started again on the same
/// state directory. `trellis queue` shows both still waiting, in their order; the first
/// runs once the executor frees, and the other waits on until `trellis cancel` ends it.
#[test]
fn queued_runs_survive_a_controller_restart() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (controller_cfg, agent_cfg, http) =
        write_configs(dir, &Transport::Tcp { port: free_port() });
    let server = format!("http://127.0.0.1:{http}");
    let daemon_log = dir.join("daemons.log");
    let logs = || std::fs::read_to_string(&daemon_log).unwrap_or_default();
    let mut controller = start("controller", &controller_cfg, &daemon_log);
    let _agent = start("agent", &agent_cfg, &daemon_log);
    wait_for_agent(&server, &daemon_log);
    let gate = dir.join("gate");
    let submit = |name: &str, text: String| {
        let job = dir.join(format!("{name}.toml"));
        std::fs::write(&job, text).unwrap();
        let (code, out, err) = cli(&server, &["run", job.to_str().unwrap()]);
        assert_eq!(code, 0, "{out}{err}");
        (out.trim().to_string(), err)
    };
    let (blocker, _) = submit(
        "blocker",
        format!(
            "name = \"blocker\"\nagent = \"linux\"\n[[step]]\nname = \"wait\"\nrun = \"n=0; while [ ! -e {} ] && [ $n -lt 1200 ]; do sleep 0.05; n=$((n+1)); done\"\n",
            gate.display()
        ),
    );
    wait_until("the blocker did not start", Duration::from_secs(30), || {
        cli(&server, &["runs"])
            .1
            .lines()
            .any(|l| l.contains(&blocker) && l.contains("running"))
    });
    let (next, said) = submit(
        "next",
        "name = \"next\"\nagent = \"linux\"\n[[step]]\nname = \"s\"\nrun = \"echo next\"\n".into(),
    );
    assert!(
        said.contains("queued for an agent with label `linux`"),
        "{said}"
    );
    let (gpu, _) = submit(
        "gpu",
        "name = \"on-gpu\"\nagent = \"gpu\"\npriority = 1\n[[step]]\nname = \"s\"\nrun = \"true\"\n".into(),
    );
    let queue = || {
        let (code, out, err) = cli(&server, &["queue"]);
        assert_eq!(code, 0, "{err}");
        out
    };
    let before = queue();
    let waiting = |out: &str| -> Vec<String> {
        out.lines()
            .skip(1)
            .take_while(|l| !l.is_empty())
            .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
            .collect()
    };
    assert_eq!(
        waiting(&before),
        [format!("1 {gpu}"), format!("2 {next}")],
        "{before}"
    );
    assert!(
        before.contains("the 1 executor of label `linux` is busy"),
        "{before}"
    );

    controller.0.kill().unwrap(); // SIGKILL: no chance to save or say goodbye
    controller.0.wait().unwrap();
    let _controller = restart_controller(&controller_cfg, &daemon_log);
    // Back in the queue, in their order; once the agent is back, waiting for its
    // executor again.
    let mut after = String::new();
    wait_until(
        "the queue after the restart",
        Duration::from_secs(30),
        || {
            after = cli(&server, &["queue"]).1;
            after.contains("the 1 executor of label `linux` is busy")
        },
    );
    assert_eq!(
        waiting(&after),
        [format!("1 {gpu}"), format!("2 {next}")],
        "{after}\n{}",
        logs()
    );
    assert!(
        after.contains("no agent with label `gpu` is connected"),
        "{after}"
    );

    std::fs::write(&gate, "").unwrap();
    wait_for_success(&server, &blocker, Duration::from_secs(60), &daemon_log);
    wait_for_success(&server, &next, Duration::from_secs(60), &daemon_log);
    let (code, out, _) = cli(&server, &["logs", &next]);
    assert_eq!((code, out.as_str()), (0, "next\n"));
    assert!(waiting(&queue()) == [format!("1 {gpu}")], "{}", queue());
    let (code, _, err) = cli(&server, &["cancel", &gpu]);
    assert_eq!(code, 0, "{err}");
    let runs = cli(&server, &["runs"]).1;
    assert!(
        runs.lines()
            .any(|l| l.contains(&gpu) && l.contains("cancelled")),
        "{runs}"
    );
    assert!(queue().starts_with("No runs waiting."), "{}", queue());
}

/// A run placed on an agent whose order never reached it: the controller is SIGKILLed
/// while a man in the middle (tests/link-attackers/relay.py) holds everything the
/// controller sends. The agent's hello to the new controller process lists no such run,
/// so the run goes back in the queue, is placed again and runs once.
#[test]
fn a_run_whose_order_died_with_the_controller_is_queued_again() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let controller_port = free_port();
    let (controller_cfg, agent_cfg, http) = write_configs(
        dir,
        &Transport::Tcp {
            port: controller_port,
        },
    );
    let events = dir.join("relay.events");
    let mut relay = Attacker::start(
        "relay.py",
        &[
            &controller_port.to_string(),
            dir.join("relay.bin").to_str().unwrap(),
            events.to_str().unwrap(),
        ],
    );
    agent_via(&agent_cfg, controller_port, relay.port);
    let daemons = start_daemons(dir, &controller_cfg, &agent_cfg, http);
    let Daemons {
        mut controller,
        agent: _agent,
        log: daemon_log,
        server,
        http,
    } = daemons;
    let logs = || std::fs::read_to_string(&daemon_log).unwrap_or_default();
    let marks = dir.join("marks");
    let job = dir.join("job.toml");
    std::fs::write(
        &job,
        format!(
            "name = \"once\"\nagent = \"linux\"\n[[step]]\nname = \"s\"\nrun = \"echo ran >> {}; echo done\"\n",
            marks.display()
        ),
    )
    .unwrap();

    relay.command("hold c2a");
    wait_for_line(&events, "holding c2a on 1", Duration::from_secs(10));
    let (code, out, err) = cli(&server, &["run", job.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let run = out
        .split_whitespace()
        .find(|w| w.starts_with("r-"))
        .unwrap()
        .to_string();
    wait_until("the run was not placed", Duration::from_secs(5), || {
        http_get(http, &format!("/api/runs/{run}")).contains("\"agent\":\"build-1\"")
    });
    // Before the agent gives the silent link up (5 heartbeats of 500 ms) and gets the
    // order again from this controller.
    controller.0.kill().unwrap();
    controller.0.wait().unwrap();
    assert!(!marks.exists(), "the order went through the relay");
    assert!(
        std::fs::read_to_string(&events)
            .unwrap()
            .contains("held c2a"),
        "the relay held nothing"
    );

    let _controller = restart_controller(&controller_cfg, &daemon_log);
    wait_for_success(&server, &run, Duration::from_secs(60), &daemon_log);
    assert_eq!(
        std::fs::read_to_string(&marks).unwrap(),
        "ran\n",
        "{}",
        logs()
    );
    let record = http_get(http, &format!("/api/runs/{run}"));
    assert!(
        record.contains("never received it") && record.contains("back in the queue"),
        "{record}"
    );
    let (code, out, _) = cli(&server, &["logs", &run]);
    assert_eq!((code, out.as_str()), (0, "done\n"));
    // Its kept job is gone once it started.
    let kept: Vec<_> = std::fs::read_dir(dir.join("state/queue"))
        .unwrap()
        .collect();
    assert!(kept.is_empty(), "{kept:?}");
}

/// The durable log buffer: the logging plugin fails every write (a store that is down)
/// for a whole run, and the controller is SIGKILLed while the run's output and close are
/// still owed to it. The run still succeeds (logging does not fail builds); once the
/// store is back and a new controller process starts on the same state directory, every
/// event reaches the plugin exactly once, in order, and the buffer is emptied.
#[test]
fn log_output_waits_on_disk_through_a_store_outage_and_a_controller_kill() {
    const N: u64 = 300;
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (controller_cfg, agent_cfg, http) = flaky_logging_configs(dir, "");
    let seen = dir.join("ctl/seen");

    let server = format!("http://127.0.0.1:{http}");
    let daemon_log = dir.join("daemons.log");
    let logs = || std::fs::read_to_string(&daemon_log).unwrap_or_default();
    let mut controller = start("controller", &controller_cfg, &daemon_log);
    let _agent = start("agent", &agent_cfg, &daemon_log);
    wait_for_agent(&server, &daemon_log);
    let run = submit_seq(&server, dir, N);
    wait_for_success(&server, run, Duration::from_secs(60), &daemon_log);
    // Nothing reached the store; all of it waits in the buffer, and /metrics says so.
    assert!(!seen.exists(), "the plugin was failing every write");
    assert!(
        log_buffer_bytes(http, "hostile") > 0,
        "/metrics shows nothing buffered"
    );
    let wal_files = || {
        std::fs::read_dir(dir.join("state/log-buffer/hostile"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "wal"))
                    .count()
            })
            .unwrap_or(0)
    };
    assert_eq!(wal_files(), 1);

    controller.0.kill().unwrap(); // SIGKILL with the output and the close still owed
    controller.0.wait().unwrap();
    std::fs::remove_file(dir.join("ctl/fail")).unwrap(); // the store is back
    let _controller = restart_controller(&controller_cfg, &daemon_log);
    let t = std::time::Instant::now();
    while wal_files() != 0 {
        // The log as it is when the wait fails, not as it was when it began.
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the buffer was not delivered and emptied: {}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let got: Vec<u64> = std::fs::read_to_string(&seen)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(
        got,
        (1..=N).collect::<Vec<_>>(),
        "every event exactly once, in order"
    );
}

/// A full log buffer holds the step's output back instead of dropping it: with a 16 KiB
/// bound and the store down, a step printing far more than that cannot finish; when the
/// store comes back it does, and every event arrives exactly once, in order.
#[test]
fn a_full_log_buffer_holds_the_output_back_and_drops_nothing() {
    const N: u64 = 5000;
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (controller_cfg, agent_cfg, http) =
        flaky_logging_configs(dir, "log-buffer-limit = \"16KiB\"\n");
    let server = format!("http://127.0.0.1:{http}");
    let daemon_log = dir.join("daemons.log");
    let logs = || std::fs::read_to_string(&daemon_log).unwrap_or_default();
    let _controller = start("controller", &controller_cfg, &daemon_log);
    let _agent = start("agent", &agent_cfg, &daemon_log);
    wait_for_agent(&server, &daemon_log);
    let run = submit_seq(&server, dir, N);
    // Held back: the buffer stops growing once past its bound (by at most what the
    // controller had already taken from the link), and the step waits.
    std::thread::sleep(Duration::from_secs(3));
    let first = log_buffer_bytes(http, "hostile");
    std::thread::sleep(Duration::from_secs(2));
    let second = log_buffer_bytes(http, "hostile");
    assert!(first >= 16 << 10, "the buffer should be full: {first}");
    assert_eq!(
        first, second,
        "the buffer kept growing: output was not held back"
    );
    let runs = cli(&server, &["runs"]).1;
    assert!(
        runs.lines()
            .any(|l| l.contains(run) && l.contains("running")),
        "the step should be held back while the buffer is full: {runs}\n{}",
        logs()
    );
    std::fs::remove_file(dir.join("ctl/fail")).unwrap(); // the store is back
    wait_for_success(&server, run, Duration::from_secs(90), &daemon_log);
    wait_until("the log was not closed", Duration::from_secs(30), || {
        std::fs::read_dir(dir.join("state/log-buffer/hostile"))
            .map(|d| d.count() == 0)
            .unwrap_or(false)
    });
    let got: Vec<u64> = std::fs::read_to_string(dir.join("ctl/seen"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(
        got,
        (1..=N).collect::<Vec<_>>(),
        "every event exactly once, in order"
    );
}

/// Daemon configs (TCP) whose controller logs through the `hostile` fixture's "flaky"
/// writer: it traps on every write while `ctl/fail` exists and appends each delivered
/// event's seq to `ctl/seen`. `controller_extra` goes into `[controller]`. On return
/// `ctl/fail` exists: the store is down.
fn flaky_logging_configs(dir: &Path, controller_extra: &str) -> (PathBuf, PathBuf, u16) {
    let (controller_cfg, agent_cfg, http) =
        write_configs(dir, &Transport::Tcp { port: free_port() });
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    for p in ["tcp-transport", "file-browser", "file-logging"] {
        std::os::unix::fs::symlink(bundle().join(p), plugins.join(p)).unwrap();
    }
    std::os::unix::fs::symlink(fixtures().join("hostile"), plugins.join("hostile")).unwrap();
    std::fs::create_dir_all(dir.join("ctl")).unwrap();
    let cfg = std::fs::read_to_string(&controller_cfg)
        .unwrap()
        .replace(
            &format!("plugin-dir = \"{}\"", bundle().display()),
            &format!("plugin-dir = \"{}\"", plugins.display()),
        )
        .replace(
            "transport = \"tcp-transport\"\n",
            &format!("transport = \"tcp-transport\"\nlogging = \"hostile\"\n{controller_extra}"),
        )
        + "[runtime.quarantine]\nafter = 100000\n[plugins.hostile]\ndirs = [{ host = \"ctl\", guest = \"/ctl\", mode = \"read-write\" }]\n";
    std::fs::write(&controller_cfg, cfg).unwrap();
    std::fs::write(dir.join("ctl/fail"), "").unwrap();
    (controller_cfg, agent_cfg, http)
}

/// Submit job "flaky" (its step prints 1..=n) through the CLI; the run's id.
fn submit_seq(server: &str, dir: &Path, n: u64) -> &'static str {
    let job = dir.join("job.toml");
    std::fs::write(
        &job,
        format!(
            "name = \"flaky\"\nagent = \"linux\"\n[[step]]\nname = \"s\"\nrun = \"seq 1 {n}\"\n"
        ),
    )
    .unwrap();
    let (code, out, err) = cli(server, &["run", job.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    "r-000001"
}

/// The runs list through the CLI pages newest first (`--limit`, the `--cursor` it
/// prints, `--all`, filters); retention (`keep-runs = 3`) removes the oldest finished
/// runs with their folders as runs finish; a controller killed and started again keeps
/// the runs and the index, and ids go on.
#[test]
fn the_runs_list_pages_and_retention_keeps_the_newest_across_a_restart() {
    let d = tempfile::tempdir().unwrap();
    let (controller_cfg, agent_cfg, http) =
        write_configs(d.path(), &Transport::Tcp { port: free_port() });
    extend_controller(&controller_cfg, "keep-runs = 3", "");
    let server = format!("http://127.0.0.1:{http}");
    let daemon_log = d.path().join("daemons.log");
    let mut controller = start("controller", &controller_cfg, &daemon_log);
    let _agent = start("agent", &agent_cfg, &daemon_log);
    let logs = || std::fs::read_to_string(&daemon_log).unwrap_or_default();
    wait_for_agent(&server, &daemon_log);
    let job = d.path().join("job.toml");
    let run_job = |name: &str, run: &str| {
        std::fs::write(
            &job,
            format!(
                "name = \"{name}\"\nagent = \"linux\"\n[[step]]\nname = \"s\"\nrun = \"{run}\"\n"
            ),
        )
        .unwrap();
        let (code, out, err) = cli(&server, &["run", job.to_str().unwrap(), "--follow"]);
        (code, format!("{out}{err}"))
    };
    let listed = |args: &[&str]| -> Vec<String> {
        let (code, out, err) = cli(&server, &[&["runs"], args].concat());
        assert_eq!(code, 0, "{out}{err}");
        out.lines()
            .skip(1)
            .map(|l| l.split_whitespace().next().unwrap().to_string())
            .collect()
    };
    for i in 0..5 {
        let (name, run) = if i == 3 {
            ("odd", "echo odd; exit 3")
        } else {
            ("even", "echo even")
        };
        let (code, out) = run_job(name, run);
        assert_eq!(code, if i == 3 { 1 } else { 0 }, "{out}");
    }
    let runs_dir = d.path().join("state/runs");
    wait_until(
        &format!("retention kept more than 3 finished runs:\n{}", logs()),
        Duration::from_secs(30),
        || listed(&["--all"]) == ["r-000005", "r-000004", "r-000003"],
    );
    assert!(!runs_dir.join("r-000001").exists() && !runs_dir.join("r-000002").exists());
    // a page at a time
    let (code, out, err) = cli(&server, &["runs", "--limit", "2"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("r-000005") && out.contains("r-000004") && !out.contains("r-000003"));
    assert!(err.contains("trellis runs --cursor r-000004"), "{err}");
    assert_eq!(listed(&["--cursor", "r-000004"]), ["r-000003"]);
    assert_eq!(listed(&["--status", "failed"]), ["r-000004"]);
    assert_eq!(
        listed(&["--job", "even", "--label", "linux", "--agent", "build-1"]),
        ["r-000005", "r-000003"]
    );
    let (code, _, err) = cli(&server, &["runs", "--status", "green"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("`status` must be one of") && err.contains("400"),
        "{err}"
    );

    // killed and started again: the same runs, ids go on, retention goes on
    controller.0.kill().unwrap();
    controller.0.wait().unwrap();
    let _controller = restart_controller(&controller_cfg, &daemon_log);
    wait_for_agent(&server, &daemon_log);
    assert_eq!(listed(&["--all"]), ["r-000005", "r-000004", "r-000003"]);
    let (code, out) = run_job("even", "echo even");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("r-000006"), "{out}");
    wait_until(
        &format!("retention after the restart:\n{}", logs()),
        Duration::from_secs(30),
        || listed(&["--all"]) == ["r-000006", "r-000005", "r-000004"],
    );
}

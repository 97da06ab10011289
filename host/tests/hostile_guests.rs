//! Hostile guests against real daemons (issue 18, items 1 and 2): every entry into guest
//! code is guarded, including resource destructors; a guest never holds a runtime
//! worker thread past one epoch tick; logging methods open independently; a close that
//! is never confirmed ends, bounded, with the log closed incomplete. The attacker is the
//! `guard-hostile` fixture (tests/fixtures/guard-hostile), a logging method and log
//! browser whose misbehaviour is chosen by the job's name. After each attack, a healthy
//! run (default file logging) and a healthy run through the same hostile plugin still
//! behave normally in the same daemons.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Controller and agent processes with `guard-hostile` loaded as an extra logging
/// method and log browser.
struct Hostile {
    dir: tempfile::TempDir,
    http: u16,
    daemons: Daemons,
    _second_agent: Option<Daemon>,
}

/// Start the daemons. `runtime` goes into the controller's `[runtime]`, `plugin` into
/// `[plugins.guard-hostile]`; `second_agent` adds agent `build-2` (label `other`).
fn start_hostile(runtime: &str, plugin: &str, second_agent: bool) -> Hostile {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (controller, agent, http) = write_configs(d, &Transport::Tcp { port: free_port() });
    let plugins = d.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    for p in ["tcp-transport", "file-browser", "file-logging"] {
        std::os::unix::fs::symlink(bundle().join(p), plugins.join(p)).unwrap();
    }
    std::os::unix::fs::symlink(
        fixtures().join("guard-hostile"),
        plugins.join("guard-hostile"),
    )
    .unwrap();
    let mut cfg = std::fs::read_to_string(&controller).unwrap().replace(
        &format!("plugin-dir = \"{}\"", bundle().display()),
        &format!("plugin-dir = \"{}\"\n{runtime}", plugins.display()),
    );
    if second_agent {
        cfg = cfg.replace(
            "agents = { \"build-1\" = \"agent-build-1\" }",
            "agents = { \"build-1\" = \"agent-build-1\", \"build-2\" = \"agent-build-2\" }",
        );
        for f in ["secrets.toml", "agent-secrets.toml"] {
            let text = std::fs::read_to_string(d.join(f)).unwrap();
            std::fs::write(
                d.join(f),
                text + "agent-build-2 = \"the-second-agent-secret\"\n",
            )
            .unwrap();
        }
    }
    std::fs::write(&controller, cfg).unwrap();
    extend_controller(
        &controller,
        "logging-methods = [\"guard-hostile\"]\nlog-browsers = [\"guard-hostile\"]",
        &format!("[plugins.guard-hostile]\n{plugin}\n"),
    );
    let daemons = start_daemons(d, &controller, &agent, http);
    let http = daemons.http; // moved if the controller lost its port
    let second = second_agent.then(|| {
        let text = std::fs::read_to_string(&agent)
            .unwrap()
            .replace("name = \"build-1\"", "name = \"build-2\"")
            .replace("labels = [\"linux\"]", "labels = [\"other\"]")
            .replace("agent-build-1", "agent-build-2")
            .replace("workspace = \"work\"", "workspace = \"work2\"");
        let cfg = d.join("agent2.toml");
        std::fs::write(&cfg, text).unwrap();
        let a = start("agent", &cfg, &daemons.log);
        wait_until(
            "agent build-2 did not connect",
            Duration::from_secs(30),
            || cli(&daemons.server, &["agents"]).1.contains("build-2"),
        );
        a
    });
    Hostile {
        dir,
        http,
        daemons,
        _second_agent: second,
    }
}

impl Hostile {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.daemons.log).unwrap_or_default()
    }

    /// Submit a job named `name` (its name picks the fixture's behaviour) with `extra`
    /// lines (e.g. `logging = "guard-hostile"`) and step command `run`; the run id.
    fn submit(&self, name: &str, agent: &str, extra: &str, run: &str) -> String {
        let job = self
            .dir
            .path()
            .join(format!("{name}-{}.toml", rand_suffix()));
        std::fs::write(
            &job,
            format!(
                "name = \"{name}\"\nagent = \"{agent}\"\n{extra}\n[[step]]\nname = \"s\"\nrun = \"{run}\"\n"
            ),
        )
        .unwrap();
        let (code, out, err) = cli(&self.daemons.server, &["run", job.to_str().unwrap()]);
        assert_eq!(code, 0, "{out}{err}");
        out.trim().to_string()
    }

    /// The run's record as the API gives it.
    fn record(&self, run: &str) -> serde_json::Value {
        let body = http_get(self.http, &format!("/api/runs/{run}"));
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
    }

    /// Wait for `run` to end (any final status); its record.
    fn wait_final(&self, run: &str, within: Duration) -> serde_json::Value {
        let t = Instant::now();
        loop {
            let r = self.record(run);
            let status = r["status"].as_str().unwrap_or_default().to_string();
            if status != "queued" && status != "running" {
                return r;
            }
            assert!(
                t.elapsed() < within,
                "run {run} still {status} after {within:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A `/metrics` value (0 if absent).
    fn metric(&self, line_prefix: &str) -> u64 {
        http_get(self.http, "/metrics")
            .lines()
            .find_map(|l| l.strip_prefix(line_prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Healthy work still goes through: a run with the default file logging (its log
    /// readable), and a well-behaved log through the hostile plugin, closed complete.
    fn assert_healthy_work_still_runs(&self) {
        let run = self.submit("healthy", "linux", "", "echo healthy output");
        let r = self.wait_final(&run, Duration::from_secs(20));
        assert_eq!(r["status"], "succeeded", "{r}\n{}", self.log());
        let (code, out, err) = cli(&self.daemons.server, &["logs", &run]);
        assert_eq!((code, out.as_str()), (0, "healthy output\n"), "{err}");
        let before = self.metric("trellis_logs_closed_incomplete_total ");
        let run = self.submit(
            "well-behaved",
            "linux",
            "logging = \"guard-hostile\"",
            "echo fine",
        );
        let r = self.wait_final(&run, Duration::from_secs(20));
        assert_eq!(r["status"], "succeeded", "{r}\n{}", self.log());
        assert!(r["note"].is_null(), "a healthy log has no note: {r}");
        assert_eq!(
            self.metric("trellis_logs_closed_incomplete_total "),
            before,
            "a healthy log closes complete"
        );
        assert!(
            !self.log().contains("link lost"),
            "an agent link dropped:\n{}",
            self.log()
        );
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A run logged through a writer whose destructor misbehaves (`job`): the run ends, its
/// log is closed incomplete with a note in the run's record, the destructor's deadline
/// is counted, and healthy work goes on.
fn destructor_is_guarded(job: &str) {
    // Longer than the link's silence limit (5 heartbeats of 500 ms): the link must
    // survive a destructor held up to its deadline.
    let h = start_hostile("", "limits = { call-timeout = \"4s\" }", false);
    let run = h.submit(
        job,
        "linux",
        "logging = \"guard-hostile\"",
        "echo one; echo two",
    );
    let r = h.wait_final(&run, Duration::from_secs(20));
    assert_eq!(r["status"], "succeeded", "{r}\n{}", h.log());
    let note = r["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("log closed incomplete") && note.contains("could not be dropped"),
        "the run's record says nothing of the writer that would not drop: {r}\n{}",
        h.log()
    );
    assert!(
        h.metric("trellis_plugin_deadlines_total{plugin=\"guard-hostile\"} ") >= 1,
        "the destructor's deadline was not counted:\n{}",
        http_get(h.http, "/metrics")
    );
    assert_eq!(h.metric("trellis_logs_closed_incomplete_total "), 1);
    assert!(
        h.log().contains("log closed incomplete"),
        "no warning in the daemon's log"
    );
    h.assert_healthy_work_still_runs();
}

#[test]
fn a_writer_destructor_asleep_in_a_host_call_is_cut_off_at_its_deadline() {
    destructor_is_guarded("sleeper");
}

#[test]
fn a_spinning_writer_destructor_is_cut_off_counted_and_its_instance_discarded() {
    destructor_is_guarded("spinner");
}

/// A log browser that spins 1.5 s per call (its deadline is 2 s), called from three
/// clients at once in a loop: the API's other requests keep their latency, and no agent
/// link drops.
#[test]
fn a_browser_spinning_under_its_deadline_slows_only_itself() {
    let h = start_hostile(
        "[runtime.quarantine]\nafter = 1000\n",
        "limits = { call-timeout = \"2s\" }",
        false,
    );
    let run = h.submit(
        "browse-spin",
        "linux",
        "browser = \"guard-hostile\"",
        "echo browsed",
    );
    let r = h.wait_final(&run, Duration::from_secs(20));
    assert_eq!(r["status"], "succeeded", "{r}");
    let quiet = api_runs_latencies(h.http, 100);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (stop, http, run) = (stop.clone(), h.http, run.clone());
            std::thread::spawn(move || {
                let mut calls = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    timed_get(http, &format!("/api/runs/{run}/log"));
                    calls += 1;
                }
                calls
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500)); // the spinning calls are under way
    let took = api_runs_latencies(h.http, 200);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let calls: u32 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    let p99 = took[took.len() * 99 / 100 - 1];
    eprintln!(
        "GET /api/runs, quiet: p50 {:?}, p99 {:?}; while the browser spins: p50 {:?}, p99 {p99:?}, max {:?}; {calls} browser requests",
        quiet[quiet.len() / 2],
        quiet[quiet.len() * 99 / 100 - 1],
        took[took.len() / 2],
        took[took.len() - 1]
    );
    assert!(
        calls >= 3,
        "the spinning browser was hardly called ({calls})"
    );
    assert!(
        h.metric("trellis_plugin_calls_total{plugin=\"guard-hostile\"} ") >= 6,
        "the browser's calls did not happen"
    );
    assert!(
        p99 <= Duration::from_millis(50),
        "GET /api/runs p99 {p99:?} > 50 ms while a plugin spins (all: {took:?})"
    );
    h.assert_healthy_work_still_runs();
}

/// A time bomb: the plugin loads (its canary passes), then every open blocks until its
/// deadline. A healthy run with the default file logging, on another agent, opens its
/// log without waiting behind the bomb's opens.
#[test]
fn a_logging_method_whose_opens_block_does_not_hold_up_another_method() {
    let h = start_hostile(
        "[runtime.quarantine]\nafter = 1000\n",
        "limits = { call-timeout = \"3s\" }",
        true,
    );
    let bomb = h.submit(
        "bomb",
        "linux",
        "logging = \"guard-hostile\"",
        "for i in $(seq 1 100); do echo $i; sleep 0.1; done",
    );
    // The bomb's first open is under way once its run has output.
    wait_until(
        "the bomb run never started",
        Duration::from_secs(20),
        || h.record(&bomb)["status"] == "running",
    );
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let healthy = h.submit("healthy", "other", "", "echo quick");
    let r = h.wait_final(&healthy, Duration::from_secs(30));
    let took = t.elapsed();
    assert_eq!(r["status"], "succeeded", "{r}");
    eprintln!("a healthy run beside the time bomb took {took:?}");
    assert!(
        took < Duration::from_millis(1500),
        "the healthy run took {took:?} beside the time bomb:\n{}",
        h.log()
    );
    let (code, out, err) = cli(&h.daemons.server, &["logs", &healthy]);
    assert_eq!((code, out.as_str()), (0, "quick\n"), "{err}");
    wait_until(
        "the bomb's opens never hit their deadline (was it a bomb?)",
        Duration::from_secs(15),
        || h.metric("trellis_plugin_deadlines_total{plugin=\"guard-hostile\"} ") >= 1,
    );
}

/// A logging method whose close always answers `retryable`: after the (shortened)
/// bound the log is closed incomplete, with a note in the run's record, its instance is
/// released, and what it owes stays in the durable buffer.
#[test]
fn a_close_never_confirmed_ends_incomplete_after_the_bound() {
    let h = start_hostile("log-close-retry-for = \"3s\"\n", "", false);
    let run = h.submit(
        "never-closes",
        "linux",
        "logging = \"guard-hostile\"",
        "echo kept",
    );
    let r = h.wait_final(&run, Duration::from_secs(20));
    assert_eq!(r["status"], "succeeded", "{r}");
    let t = Instant::now();
    let mut r = h.record(&run);
    while !r["note"]
        .as_str()
        .is_some_and(|n| n.contains("log closed incomplete"))
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the close was retried past its bound: {r}\n{}",
            h.log()
        );
        std::thread::sleep(Duration::from_millis(200));
        r = h.record(&run);
    }
    let note = r["note"].as_str().unwrap();
    assert!(
        note.contains("did not confirm the close") && note.contains("durable log buffer"),
        "{note}"
    );
    assert_eq!(h.metric("trellis_logs_closed_incomplete_total "), 1);
    // Nothing lost: the close is still on disk for a later process.
    let buffered = buffer_files(&h.dir.path().join("state/log-buffer/guard-hostile"));
    assert!(
        !buffered.is_empty(),
        "the durable buffer of the log closed incomplete is gone"
    );
    h.assert_healthy_work_still_runs();
}

/// `n` timed `GET /api/runs`, 20 ms apart, sorted; fails on an answer slower than 5 s.
fn api_runs_latencies(http: u16, n: usize) -> Vec<Duration> {
    let mut took: Vec<Duration> = (0..n)
        .map(|_| {
            let took = timed_get(http, "/api/runs")
                .unwrap_or_else(|| panic!("GET /api/runs got no answer within 5 s"));
            std::thread::sleep(Duration::from_millis(20));
            took
        })
        .collect();
    took.sort();
    took
}

/// A GET on loopback with the port's token: how long a `200` took (None: no `200`
/// within 5 s).
fn timed_get(port: u16, path: &str) -> Option<Duration> {
    use std::io::{Read, Write};
    let t = Instant::now();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let auth = token_for(port)
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{auth}\r\n").ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    (out.get(9..12) == Some(b"200".as_slice())).then(|| t.elapsed())
}

fn buffer_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default()
}

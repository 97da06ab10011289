//! Issue 18, items 4 and 5, through real `trellis controller` + `trellis agent` daemons:
//! a plugin's output is held to its budget, and what a plugin returns is data the host
//! checks before using. Each attack is a fixture plugin (`tests/fixtures/output-*`);
//! after each, a healthy run in the same daemons still succeeds and its log reads back.

mod common;

use common::*;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The tests here start daemons and flood them: one at a time, so their timings hold on
/// a small machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A controller (logging plugin output at `info`, so admitted lines reach its log) and
/// an agent, with `line` added to `[controller]` and `tables` to its configuration.
struct Stack {
    controller: Daemon,
    _agent: Daemon,
    log: PathBuf,
    server: String,
    http: u16,
    dir: PathBuf,
}

impl Stack {
    fn start(dir: &Path, line: &str, tables: &str) -> Stack {
        let (controller, agent, http) = write_configs(dir, &Transport::Tcp { port: free_port() });
        extend_controller(&controller, line, tables);
        let log = dir.join("daemons.log");
        let file = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .unwrap()
        };
        let c = Daemon(
            trellis()
                .env("TRELLIS_LOG", "warn,plugin=info")
                .args(["controller", "--config", controller.to_str().unwrap()])
                .stdout(Stdio::null())
                .stderr(file())
                .spawn()
                .unwrap(),
        );
        let a = start("agent", &agent, &log);
        let server = format!("http://127.0.0.1:{http}");
        wait_for_agent(&server, &log);
        Stack {
            controller: c,
            _agent: a,
            log,
            server,
            http,
            dir: dir.to_path_buf(),
        }
    }

    /// Submit job `name` (one step, `run`), with a logging method and a browser if
    /// given; its run id.
    fn submit(
        &self,
        name: &str,
        logging: Option<&str>,
        browser: Option<&str>,
        run: &str,
    ) -> String {
        let mut job = format!("name = \"{name}\"\nagent = \"linux\"\n");
        if let Some(l) = logging {
            job += &format!("logging = \"{l}\"\n");
        }
        if let Some(b) = browser {
            job += &format!("browser = \"{b}\"\n");
        }
        job += &format!("[[step]]\nname = \"s\"\nrun = \"{run}\"\n");
        let f = self.dir.join(format!("{name}.toml"));
        std::fs::write(&f, job).unwrap();
        let (code, out, err) = cli(&self.server, &["run", f.to_str().unwrap()]);
        assert_eq!(code, 0, "{out}{err}");
        out.trim().to_string()
    }

    /// The controller's peak resident memory (VmHWM), in bytes.
    fn controller_peak_rss(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.controller.0.id())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmHWM in {status}"));
        kib << 10
    }

    fn log_size(&self) -> u64 {
        std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A series' value from `/metrics`.
    fn metric(&self, series: &str) -> u64 {
        let metrics = http_get(self.http, "/metrics");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {series} in /metrics:\n{metrics}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// A healthy job with the default logging method and browser: it succeeds, and
    /// `trellis logs` prints its lines.
    fn healthy_run_works(&self) {
        let run = self.submit(
            "healthy",
            None,
            None,
            "echo healthy-line-1; echo healthy-line-2",
        );
        wait_for_success(&self.server, &run, Duration::from_secs(60), &self.log);
        let (code, out, err) = cli(&self.server, &["logs", &run]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(
            out.contains("healthy-line-1") && out.contains("healthy-line-2"),
            "{out}{err}"
        );
    }

    /// Wait for `run` to succeed, asking `GET /api/runs` all the while; the slowest
    /// answer.
    fn wait_measuring_api(&self, run: &str, within: Duration) -> Duration {
        let t = Instant::now();
        let mut worst = Duration::ZERO;
        loop {
            let asked = Instant::now();
            let runs = http_get(self.http, "/api/runs");
            worst = worst.max(asked.elapsed());
            let v: serde_json::Value = serde_json::from_str(&runs).unwrap_or_default();
            let status = v["runs"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|r| r["id"] == run)
                .map(|r| r["status"].as_str().unwrap_or_default().to_string());
            match status.as_deref() {
                Some("succeeded") => return worst,
                Some("failed" | "cancelled" | "lost") => {
                    panic!("run {run} ended {status:?}:\n{}", self.log_text())
                }
                _ => {}
            }
            assert!(
                t.elapsed() < within,
                "run {run} did not succeed within {within:?} ({status:?}):\n{}",
                tail(&self.log_text())
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A CLI command, killed if it has not ended `within`: None then.
    fn cli_within(&self, args: &[&str], within: Duration) -> Option<(i32, String, String)> {
        let (out_f, err_f) = (self.dir.join("cli.out"), self.dir.join("cli.err"));
        let mut c = trellis();
        c.args(args)
            .env("TRELLIS_SERVER", &self.server)
            .stdout(std::fs::File::create(&out_f).unwrap())
            .stderr(std::fs::File::create(&err_f).unwrap());
        if let Some(t) = token_for(self.http) {
            c.env("TRELLIS_TOKEN", t);
        }
        let mut child = c.spawn().unwrap();
        let t = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if t.elapsed() > within {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let read = |f: &Path| {
            let mut s = String::new();
            let _ = std::fs::File::open(f).and_then(|mut f| f.read_to_string(&mut s));
            s
        };
        status.map(|s| (s.code().unwrap_or(-1), read(&out_f), read(&err_f)))
    }

    /// Follow `run`'s log over SSE for at most `within`: the bytes received, whether the
    /// stream ended by itself, and the first 64 KiB of it.
    fn sse(&self, run: &str, within: Duration) -> (u64, bool, String) {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.http)).unwrap();
        let auth = token_for(self.http)
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(
            s,
            "GET /api/runs/{run}/log/follow HTTP/1.0\r\nHost: 127.0.0.1\r\n{auth}\r\n"
        )
        .unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let t = Instant::now();
        let (mut total, mut head) = (0u64, Vec::new());
        let mut buf = vec![0u8; 64 << 10];
        while t.elapsed() < within {
            match s.read(&mut buf) {
                Ok(0) => return (total, true, String::from_utf8_lossy(&head).into_owned()),
                Ok(n) => {
                    total += n as u64;
                    if head.len() < 64 << 10 {
                        head.extend_from_slice(&buf[..n.min((64 << 10) - head.len())]);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("reading the follow: {e}"),
            }
        }
        (total, false, String::from_utf8_lossy(&head).into_owned())
    }
}

fn tail(text: &str) -> &str {
    &text[text.len().saturating_sub(8000)..]
}

fn flood_stack(dir: &Path) -> Stack {
    Stack::start(
        dir,
        "logging-methods = [\"output-flood\"]",
        &format!(
            // a long deadline: the flood itself is not cut short by it
            "[plugins.output-flood]\npath = \"{}\"\nlimits = {{ call-timeout = \"120s\" }}\n",
            fixtures().join("output-flood").display()
        ),
    )
}

/// The flood of `stream` (`stdout-flood` or `log-flood`): 256 MiB in one call reaches
/// the daemon's log as a few hundred KiB; the rest is counted as dropped and summarised
/// in one line; the API keeps answering meanwhile.
fn flood_is_contained(job: &str, stream: &str, summary: &str) {
    let d = tempfile::tempdir().unwrap();
    let s = flood_stack(d.path());
    let before = s.log_size();
    // (A log is opened at the run's first output.)
    let run = s.submit(job, Some("output-flood"), None, "echo go");
    let mut worst = s.wait_measuring_api(&run, Duration::from_secs(240));
    // The flood runs in the logging method's `open`, which may outlast the run: wait
    // for the drops to add up, still asking the API.
    let series = |what: &str| {
        format!(
            "trellis_plugin_output_dropped_{what}_total{{plugin=\"output-flood\",stream=\"{stream}\"}}"
        )
    };
    let t = Instant::now();
    let dropped = loop {
        let asked = Instant::now();
        let dropped = s.metric(&series("bytes"));
        worst = worst.max(asked.elapsed());
        if dropped >= 250 << 20 || t.elapsed() > Duration::from_secs(180) {
            break dropped;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let lines = s.metric(&series("lines"));
    let grown = s.log_size() - before;
    let peak = s.controller_peak_rss();
    eprintln!(
        "{job}: dropped {dropped} bytes in {lines} lines; the daemons' log grew {grown} bytes; slowest GET /api/runs {worst:?}; controller peak RSS {} MiB",
        peak >> 20
    );
    // the host did not hold the flood: its peak is nowhere near 256 MiB more than idle
    assert!(
        peak < 200 << 20,
        "the controller's peak RSS was {peak} bytes"
    );
    assert!(dropped >= 250 << 20, "{dropped} bytes dropped");
    assert!(lines >= 60_000, "{lines} lines dropped");
    assert!(grown < 2 << 20, "the daemons' log grew {grown} bytes");
    assert!(
        worst < Duration::from_secs(2),
        "GET /api/runs took {worst:?} during the flood"
    );
    // one summary line, naming the plugin, the amounts and the stream
    wait_for_line(
        &s.log,
        "plugin output-flood: dropped",
        Duration::from_secs(20),
    );
    let text = s.log_text();
    let summaries: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("plugin output-flood: dropped"))
        .collect();
    eprintln!("{job}: the summary: {}", summaries[0]);
    assert!(
        summaries.len() <= 3 && summaries[0].contains(summary),
        "{summaries:#?}"
    );
    s.healthy_run_works();
}

#[test]
fn a_plugin_writing_256_mib_to_stdout_in_one_call_is_held_to_its_budget() {
    let _one = serial();
    flood_is_contained("stdout-flood", "stdout", "of stdout in the last 10 s");
}

#[test]
fn a_plugin_sending_256_mib_through_the_log_capability_is_held_to_its_budget() {
    let _one = serial();
    flood_is_contained("log-flood", "log", "of log messages in the last 10 s");
}

fn browser_stack(dir: &Path) -> Stack {
    Stack::start(
        dir,
        "log-browsers = [\"output-browser\"]",
        &format!(
            // max-return above the page cap: the cap holds on its own
            "[plugins.output-browser]\npath = \"{}\"\nlimits = {{ max-return = \"64MiB\" }}\n",
            fixtures().join("output-browser").display()
        ),
    )
}

/// A browser whose every page holds event 1 again under a new cursor: `trellis logs`,
/// with and without `--follow`, ends with an error naming the plugin, and the SSE follow
/// ends after a few bytes with an `abort` event naming it.
#[test]
fn a_cursor_that_never_advances_ends_logs_and_follows_with_an_error_naming_the_plugin() {
    let _one = serial();
    let d = tempfile::tempdir().unwrap();
    let s = browser_stack(d.path());
    let run = s.submit("stuck", None, Some("output-browser"), "true");
    wait_for_success(&s.server, &run, Duration::from_secs(60), &s.log);

    for args in [vec!["logs", &run], vec!["logs", "--follow", &run]] {
        let (code, out, err) = s
            .cli_within(&args, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("`trellis {args:?}` still ran after 30 s"));
        assert_ne!(code, 0, "{args:?}: {out}{err}");
        assert!(
            err.contains("output-browser") && err.contains("does not advance"),
            "{args:?}: {err}"
        );
        assert!(out.lines().count() <= 2, "{args:?} printed: {out}");
    }

    let (bytes, ended, text) = s.sse(&run, Duration::from_secs(10));
    assert!(ended, "the follow still ran after 10 s ({bytes} bytes)");
    assert!(bytes < 16 << 10, "the follow sent {bytes} bytes");
    assert!(
        text.contains("event: abort")
            && text.contains("output-browser")
            && text.contains("does not advance"),
        "{text}"
    );
    assert!(
        s.metric("trellis_plugin_invalid_answers_total{plugin=\"output-browser\"}") >= 2,
        "refusals are counted"
    );
    s.healthy_run_works();
}

/// A browser serving full pages of 4 KiB events as fast as it is asked, on a log that
/// stays open: one follow gets at most its rate (1 MiB/s after a 1 MiB burst).
#[test]
fn a_follow_is_rate_capped() {
    let _one = serial();
    let d = tempfile::tempdir().unwrap();
    let s = browser_stack(d.path());
    let run = s.submit("firehose", None, Some("output-browser"), "true");
    wait_for_success(&s.server, &run, Duration::from_secs(60), &s.log);
    let secs = 5;
    let (bytes, ended, text) = s.sse(&run, Duration::from_secs(secs));
    eprintln!("a follow of the firehose sent {bytes} bytes in {secs} s");
    assert!(!ended, "the follow of an open log ended: {text}");
    assert!(bytes > 1 << 20, "the follow sent only {bytes} bytes");
    let cap = (secs + 1) * (1 << 20) + (1 << 20) / 2;
    assert!(
        bytes < cap,
        "the follow sent {bytes} bytes in {secs} s (cap {cap})"
    );
    s.healthy_run_works();
}

/// Pages over their caps, bad names and bad counts are refused with an error naming
/// the plugin (503 from the API, a failing `trellis logs`), and counted.
#[test]
fn oversized_pages_and_bad_names_and_counts_are_refused() {
    let _one = serial();
    let d = tempfile::tempdir().unwrap();
    let s = browser_stack(d.path());
    let cases = [
        (
            "over-count",
            "?limit=10",
            "11 events where at most 10 were asked for",
        ),
        ("over-bytes", "", "above the host's cap"),
        ("long-cursor", "", "a cursor of 1048576 bytes"),
        ("bad-step", "", "not a valid step name"),
        ("bad-seq", "", "seqs must increase"),
        ("bad-total", "", "a total of 0 events for a page holding 1"),
        (
            "bad-completeness",
            "",
            "with all present the log is `complete`",
        ),
        (
            "tail-over",
            "?tail=3",
            "8 events where at most 3 were asked for",
        ),
    ];
    for (job, query, problem) in cases {
        let run = s.submit(job, None, Some("output-browser"), "true");
        wait_for_success(&s.server, &run, Duration::from_secs(60), &s.log);
        let (status, body) = http_get_status(s.http, &format!("/api/runs/{run}/log{query}"));
        assert_eq!(status, 503, "{job}: {body}");
        assert!(
            body.contains("plugin `output-browser`") && body.contains(problem),
            "{job}: {body}"
        );
        if job == "bad-step" {
            let (code, out, err) = cli(&s.server, &["logs", &run]);
            assert_ne!(code, 0, "{out}{err}");
            assert!(
                err.contains("output-browser") && err.contains(problem),
                "{err}"
            );
        }
    }
    assert!(
        s.metric("trellis_plugin_invalid_answers_total{plugin=\"output-browser\"}") >= 8,
        "refusals are counted"
    );
    s.healthy_run_works();
}

/// `trellis fence` with `output-fence` configured as `mode`, and `args`: (exit code,
/// stdout, stderr).
fn fence_as(dir: &Path, mode: &str, args: &[&str]) -> (i32, String, String) {
    let cfg = dir.join(format!("fence-{mode}.toml"));
    std::fs::write(
        &cfg,
        format!("[plugins.output-fence]\nconfig = {{ mode = \"{mode}\" }}\n"),
    )
    .unwrap();
    let out = trellis()
        .args(["fence", "--plugin"])
        .arg(fixtures().join("output-fence"))
        .arg("--config")
        .arg(&cfg)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A fence agent's names and counts become options, the cluster manager's XML and
/// `id,alias` lines it parses: a bad parameter name, too many parameters, a target id
/// forging a second line and too many targets are refused, naming the plugin; a sound
/// agent still answers.
#[test]
fn a_fence_agents_bad_names_and_counts_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let cases = [
        ("bad-param", "metadata", "parameter name `ip --action=on`"),
        ("many-params", "metadata", "100000 parameters"),
        ("forged-target", "list", "no comma or control character"),
        ("many-targets", "list", "100000 targets"),
    ];
    for (mode, action, problem) in cases {
        let (code, out, err) = fence_as(d.path(), mode, &["-o", action]);
        assert_ne!(code, 0, "{mode}: {out}{err}");
        assert!(
            err.contains("plugin `output-fence`") && err.contains(problem),
            "{mode}: {err}"
        );
        assert!(!out.contains("node-9"), "{mode}: a forged line: {out}");
    }
    let (code, out, err) = fence_as(d.path(), "sound", &["-o", "list"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.trim(), "node-1,", "{err}");
}

//! A full disk is survived (issue 18). The attacker is `tests/fixtures/disk-filler`, a
//! logging method that fills the filesystem its granted directory is on, or writes past
//! its grant's `quota`.
//!
//! * Through real daemons, the controller's state directory and the plugin's grant on
//!   one small tmpfs the test mounts: while the disk is full a submission is answered
//!   507 naming the state directory and the fix (never 500), runs in flight go on in
//!   memory; once space is freed every run finishes and its record reaches the disk,
//!   none stays `queued`, and a new run succeeds. Output that reaches the controller
//!   while the log buffer's disk is full (a run's numbered lines, and a run whose log
//!   cannot even be created then) is held, not lost: afterwards each run's log has every
//!   line exactly once, in order.
//! * In process: writes past a grant's quota fail inside the plugin as on a full disk
//!   (`set_len` with no-space; a stream write as a really full tmpfs fails it) and are
//!   counted; its other grant is unaffected; space freed under the quota can be used
//!   again; a healthy log right after works.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use trellis::points::logging::LogWriter;
use trellis::runtime::PluginError;

/// Run `disk-filler`'s quota probe (a log of a job named `quota...`); its report.
async fn quota_report(p: &std::sync::Arc<trellis::runtime::Plugin>, run: &str) -> String {
    match LogWriter::open(p.clone(), meta("quota-probe", run)).await {
        Err(PluginError::Plugin { message, .. }) => message,
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("the probe always answers with its report"),
    }
}

/// `name=value` from a `quota-report: ...` line.
fn field<'a>(report: &'a str, name: &str) -> &'a str {
    let at = report
        .find(&format!("{name}="))
        .unwrap_or_else(|| panic!("no {name} in {report}"));
    let rest = &report[at + name.len() + 1..];
    match rest.strip_prefix('[') {
        Some(r) => &r[..r.find(']').unwrap()],
        None => rest.split_whitespace().next().unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_past_a_quota_fail_in_the_plugin_and_are_counted() {
    let d = tempfile::tempdir().unwrap();
    for sub in ["q", "free", "logs"] {
        std::fs::create_dir(d.path().join(sub)).unwrap();
    }
    let rt = runtime(
        "[plugins.disk-filler]\ndirs = [\
         { host = \"q\", guest = \"/quota\", mode = \"read-write\", quota = \"1MiB\" },\
         { host = \"free\", guest = \"/free\", mode = \"read-write\" },\
         { host = \"logs\", guest = \"/logs\", mode = \"read-write\" }]\n",
        d.path(),
        &[],
    );
    let p = rt.load(&fixtures().join("disk-filler")).await.unwrap();
    let report = quota_report(&p, "r-1").await;
    eprintln!("{report}");
    assert_eq!(
        field(&report, "quota_bytes"),
        "1048576",
        "exactly 16 chunks of 64 KiB fit: {report}"
    );
    // A stream write past the quota fails as on a full disk (wasi-libc says EIO for
    // both: see the next test); growing the file with set_len says no-space itself.
    assert_ne!(field(&report, "quota_error"), "none", "{report}");
    let grow = field(&report, "grow_error");
    assert!(
        grow.starts_with("StorageFull") && grow.contains("No space left on device"),
        "{report}"
    );
    assert_eq!(
        std::fs::metadata(d.path().join("q/q-r-1")).unwrap().len(),
        1 << 20,
        "nothing past the quota reached the disk"
    );
    // The grant without a quota takes more than the quota allowed the other.
    assert_eq!(field(&report, "free_bytes"), (2u64 << 20).to_string());
    assert_eq!(field(&report, "free_error"), "none", "{report}");
    // Nor can a file written elsewhere be moved in past the quota.
    assert!(
        field(&report, "move_error").starts_with("CrossesDevices"),
        "{report}"
    );
    assert!(d.path().join("free/f-r-1").exists() && !d.path().join("q/moved-r-1").exists());
    let refused = p.metrics.quota_refusals.load(Relaxed);
    assert!(
        refused >= 3,
        "the stream write, the set_len and the move are counted: {refused}"
    );
    let mut text = String::new();
    p.metrics.render("disk-filler", &mut text);
    assert!(
        text.contains(&format!(
            "trellis_plugin_quota_refusals_total{{plugin=\"disk-filler\"}} {refused}"
        )),
        "{text}"
    );

    // Space freed under the quota is usable again (once the directory is measured).
    std::fs::remove_file(d.path().join("q/q-r-1")).unwrap();
    tokio::time::sleep(trellis::capabilities::quota::REMEASURE_EVERY).await;
    let again = quota_report(&p, "r-2").await;
    assert_eq!(field(&again, "quota_bytes"), "1048576", "{again}");

    // A healthy log right after, in the same process and plugin.
    let mut w = LogWriter::open(p.clone(), meta("plain", "r-3"))
        .await
        .unwrap();
    w.write(batch(1, 10)).await.unwrap();
    w.close(10).await.unwrap();
    let log = std::fs::read(d.path().join("logs/r-3.log")).unwrap();
    assert!(log.ends_with(b"closed 10\n"), "{}", log.len());
}

/// What a plugin sees when a quota refuses a write is what it sees when the disk is
/// really full: here `/free` (no quota) is a 1 MiB tmpfs, and `/quota` has 512 KiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_refusal_looks_to_the_plugin_like_a_full_disk() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("q")).unwrap();
    let _disk = SmallDisk::mount(&d.path().join("free"), "1m");
    let rt = runtime(
        "[plugins.disk-filler]\ndirs = [\
         { host = \"q\", guest = \"/quota\", mode = \"read-write\", quota = \"512KiB\" },\
         { host = \"free\", guest = \"/free\", mode = \"read-write\" }]\n",
        d.path(),
        &[],
    );
    let p = rt.load(&fixtures().join("disk-filler")).await.unwrap();
    let report = quota_report(&p, "r-1").await;
    eprintln!("{report}");
    assert_eq!(field(&report, "quota_bytes"), "524288", "{report}");
    assert_eq!(field(&report, "free_bytes"), "1048576", "{report}");
    assert_eq!(
        field(&report, "quota_error"),
        field(&report, "free_error"),
        "{report}"
    );
}

#[test]
fn a_quota_on_a_read_only_grant_is_refused_at_load() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("q")).unwrap();
    let rt = runtime(
        "[plugins.disk-filler]\ndirs = [{ host = \"q\", guest = \"/quota\", quota = \"1MiB\" }]\n",
        d.path(),
        &[],
    );
    let p = match rt.prepare(&fixtures().join("disk-filler")) {
        Err(p) => p.to_string(),
        Ok(_) => panic!("a quota on a read-only grant was accepted"),
    };
    assert!(
        p.contains("plugins.disk-filler.dirs[0].quota") && p.contains("read-write"),
        "{p}"
    );
}

/// A tmpfs of `size` mounted at `at` for the test's life (unmounted when dropped).
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(at).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cannot mount a tmpfs (the test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk(at.to_path_buf())
    }

    /// Bytes still free.
    fn available(&self) -> u64 {
        let out = std::process::Command::new("df")
            .args(["-B1", "--output=avail"])
            .arg(&self.0)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .unwrap()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// POST a job; the status and the body.
fn submit(port: u16, job: &str) -> (u16, String) {
    http_status(port, "POST", "/api/runs", Some(("application/toml", job)))
}

fn job(name: &str, logging: Option<&str>, lines: u32) -> String {
    let logging = logging
        .map(|l| format!("logging = \"{l}\"\n"))
        .unwrap_or_default();
    format!(
        "name = \"{name}\"\nagent = \"linux\"\n{logging}[[step]]\nname = \"s\"\nrun = \"for i in $(seq 1 {lines}); do echo line $i; sleep 0.05; done\"\n"
    )
}

/// Lines of the run whose output comes while the disk is full.
const NUMBERED: u32 = 400;

fn run_id(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["id"].as_str().unwrap().to_string()
}

fn metric(port: u16, name: &str) -> u64 {
    let m = http_get(port, "/metrics");
    m.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{m}"))
        .parse()
        .unwrap()
}

#[test]
fn a_full_disk_is_answered_507_and_every_run_finishes_once_space_returns() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let disk = SmallDisk::mount(&dir.join("small"), "8m");
    for sub in ["state/logs", "fill", "filler-logs"] {
        std::fs::create_dir_all(dir.join("small").join(sub)).unwrap();
    }
    let (controller, agent, http) = write_configs(dir, &Transport::Tcp { port: free_port() });
    // The six runs below are in flight together on the one agent: it has the executors.
    let text = std::fs::read_to_string(&agent).unwrap();
    std::fs::write(
        &agent,
        text.replace("[agent]\n", "[agent]\nexecutors = 8\n"),
    )
    .unwrap();
    // The state directory, the default logging method's grant and the filler's grants,
    // all on the small disk.
    let text = std::fs::read_to_string(&controller)
        .unwrap()
        .replace("state-dir = \"state\"", "state-dir = \"small/state\"")
        .replace("host = \"state/logs\"", "host = \"small/state/logs\"")
        .replace(
            "[controller]\n",
            "[controller]\nlogging-methods = [\"disk-filler\"]\n",
        )
        + &format!(
            "[plugins.disk-filler]\npath = \"{}\"\ndirs = [{{ host = \"small/fill\", guest = \"/fill\", mode = \"read-write\" }}, {{ host = \"small/filler-logs\", guest = \"/logs\", mode = \"read-write\" }}]\n",
            fixtures().join("disk-filler").display()
        );
    std::fs::write(&controller, text).unwrap();
    use_token(http, &create_token(&controller, "test-admin", "admin"));
    let daemon_log = dir.join("daemons.log");
    let logs = || std::fs::read_to_string(&daemon_log).unwrap_or_default();
    let _c = start("controller", &controller, &daemon_log);
    let _a = start("agent", &agent, &daemon_log);
    let server = format!("http://127.0.0.1:{http}");
    wait_for_agent(&server, &daemon_log);

    // One whose log is open (its first line is in) when the disk fills, and whose other
    // lines come all at once while it is full (when `go` appears).
    let go = dir.join("go");
    let numbered = format!(
        "name = \"numbered\"\nagent = \"linux\"\n[[step]]\nname = \"s\"\nrun = \"echo line 1; while [ ! -e {} ]; do sleep 0.1; done; for i in $(seq 2 {NUMBERED}); do echo line $i; done\"\n",
        go.display()
    );
    let (code, body) = submit(http, &numbered);
    assert_eq!(code, 201, "{body}");
    let numbered = run_id(&body);
    let mut accepted = vec![numbered.clone()];
    wait_until(
        "the numbered run's first line",
        Duration::from_secs(30),
        || cli(&server, &["logs", &numbered]).1.contains("line 1"),
    );
    // Runs in flight when the disk fills (3 s each: they finish while it is full).
    for i in 0..3 {
        let (code, body) = submit(http, &job(&format!("healthy-{i}"), None, 60));
        assert_eq!(code, 201, "{body}");
        accepted.push(run_id(&body));
    }
    // One whose output only begins once the disk is full: its log cannot be opened then.
    let late = job("late", None, 20).replace("run = \"for", "run = \"sleep 2; for");
    let (code, body) = submit(http, &late);
    assert_eq!(code, 201, "{body}");
    let late = run_id(&body);
    accepted.push(late.clone());
    // The filler's log opens with its first output and fills the disk.
    let (code, body) = submit(http, &job("fill", Some("disk-filler"), 20));
    assert_eq!(code, 201, "{body}");
    accepted.push(run_id(&body));
    wait_until("the disk is full", Duration::from_secs(60), || {
        disk.available() < 64 << 10
    });
    std::fs::write(&go, "").unwrap();
    // The runs go on, and end, while the disk is full: their records cannot be written,
    // their output is held in memory.
    std::thread::sleep(Duration::from_secs(4));

    // Submissions while full: a clear 507, never a 500; the API still answers.
    let state_dir = dir.join("small/state");
    for i in 0..3 {
        let (code, body) = submit(http, &job(&format!("while-full-{i}"), None, 1));
        assert_eq!(code, 507, "{body}");
        assert!(
            body.contains(&state_dir.display().to_string())
                && body.contains("is full")
                && body.contains("Free space on its filesystem"),
            "{body}"
        );
    }
    let (code, runs) = http_get_status(http, "/api/runs");
    assert_eq!(code, 200, "{runs}");
    // The daemon's other state: a token cannot be written either; the CLI retries a
    // few times, then names the file and the fix.
    let out = trellis()
        .args([
            "token",
            "create",
            "while-full",
            "--role",
            "viewer",
            "--config",
        ])
        .arg(&controller)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&state_dir.display().to_string())
            && err.contains("tried 4 times")
            && err.contains("free space on its filesystem"),
        "{err}"
    );
    assert!(
        metric(http, "trellis_state_write_failures_total") > 0,
        "the failed record writes are counted"
    );

    // Space returns.
    for e in std::fs::read_dir(dir.join("small/fill")).unwrap().flatten() {
        std::fs::remove_file(e.path()).unwrap();
    }
    let t = Instant::now();
    let states = || -> Vec<(String, String)> {
        let runs: serde_json::Value =
            serde_json::from_str(&http_get(http, "/api/runs?limit=500")).unwrap();
        runs["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["id"].as_str().unwrap().to_string(),
                    r["status"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    loop {
        let s = states();
        if s.len() == accepted.len() && s.iter().all(|(_, st)| st == "succeeded") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "not every accepted run finished 90 s after space returned: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("every run finished {:?} after space returned", t.elapsed());
    // And their records reached the disk: what a restarted controller would read.
    wait_until(
        "no record waits to be written",
        Duration::from_secs(30),
        || metric(http, "trellis_state_unsaved_runs") == 0,
    );
    for id in &accepted {
        let rec: serde_json::Value = serde_json::from_slice(
            &std::fs::read(state_dir.join("runs").join(id).join("run.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(rec["status"], "succeeded", "{id} on disk: {rec}");
    }

    // Nothing that reached the controller while the disk was full was lost: every line
    // of the numbered run, and of the run whose log could not be created then, is in
    // its log exactly once, in order.
    for (run, lines) in [(&numbered, NUMBERED), (&late, 20)] {
        // Delivered by the log retry (every second) once the disk takes it.
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20)
            && cli(&server, &["logs", run]).1.lines().count() < lines as usize
        {
            std::thread::sleep(Duration::from_millis(250));
        }
        let (code, out, err) = cli(&server, &["logs", run]);
        assert_eq!(code, 0, "{err}");
        let want: Vec<String> = (1..=lines).map(|i| format!("line {i}")).collect();
        let got: Vec<&str> = out.lines().collect();
        assert!(
            got == want,
            "{run}: every line once, in order; {} of {lines} lines, missing: {:?}\n{}",
            got.len(),
            want.iter()
                .filter(|w| !got.contains(&w.as_str()))
                .take(20)
                .collect::<Vec<_>>(),
            logs()
        );
    }
    assert!(
        logs().contains("held in memory until the state directory's disk takes it"),
        "the holding is logged"
    );
    // Every log of the healthy method, closed while the disk was full, is delivered and
    // closed: no buffer left. (The filler's own writer stays broken after its failed
    // write and answers `retryable` for ever: its close is retried until given up.)
    let wal_files = || -> Vec<PathBuf> {
        let mut found = Vec::new();
        for m in std::fs::read_dir(state_dir.join("log-buffer"))
            .unwrap()
            .flatten()
        {
            if m.file_name() == "disk-filler" {
                continue;
            }
            for f in std::fs::read_dir(m.path()).unwrap().flatten() {
                if f.path().extension().is_some_and(|e| e == "wal") {
                    found.push(f.path());
                }
            }
        }
        found
    };
    let t = Instant::now();
    while !wal_files().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "log buffers left 20 s after space returned: {:?}\n{}",
            wal_files(),
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A healthy run right after.
    let (code, body) = submit(http, &job("after", None, 3));
    assert_eq!(code, 201, "{body}\n{}", logs());
    wait_for_success(
        &server,
        &run_id(&body),
        Duration::from_secs(30),
        &daemon_log,
    );
}

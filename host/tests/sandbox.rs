//! The hostile-plugin suite: each misbehaviour is contained with the right typed error,
//! and afterwards the same process still serves a healthy plugin — the hostile plugin
//! itself included, on a fresh instance.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;
use trellis::points::logging::LogWriter;
use trellis::runtime::{ErrorKind, Plugin, PluginError};

const LIMITS: &str = r#"
[runtime.limits]
call-timeout = "500ms"
memory = "32MiB"
max-return = "1MiB"
max-resources = 64
[runtime.quarantine]
after = 100
"#;

struct Env {
    hostile: Arc<Plugin>,
    healthy: Arc<Plugin>,
    dir: tempfile::TempDir,
    rt: Arc<trellis::runtime::Runtime>,
}

/// The hostile plugin with `grants` (a TOML fragment of [plugins.hostile]) next to the
/// healthy example plugin, in one runtime.
async fn env(grants: &str, secrets: &[(&str, &str)]) -> Env {
    let dir = tempfile::tempdir().unwrap();
    for d in ["logs", "data", "ro", "rw", "ctl"] {
        std::fs::create_dir(dir.path().join(d)).unwrap();
    }
    let config = format!(
        "{LIMITS}\n[plugins.jsonl-logger]\ndirs = [{{ host = \"logs\", guest = \"/logs\", mode = \"read-write\" }}]\n[plugins.hostile]\n{grants}\n"
    );
    let rt = runtime(&config, dir.path(), secrets);
    let hostile = rt
        .load(&fixtures().join("hostile"))
        .await
        .unwrap_or_else(|p| panic!("{p}"));
    let healthy = rt
        .load(&bundle().join("jsonl-logger"))
        .await
        .unwrap_or_else(|p| panic!("{p}"));
    Env {
        hostile,
        healthy,
        dir,
        rt,
    }
}

impl Env {
    async fn open(&self, job: &str, arg: &str) -> Result<LogWriter, PluginError> {
        LogWriter::open(self.hostile.clone(), meta(job, arg)).await
    }

    /// The host still serves: the healthy plugin stores events, and the hostile one
    /// answers normally on a fresh instance.
    async fn still_serving(&self) {
        let mut w = LogWriter::open(self.healthy.clone(), meta("job", "r-ok"))
            .await
            .expect("healthy plugin opens");
        w.write(batch(1, 10)).await.expect("healthy plugin writes");
        w.close(10).await.expect("healthy plugin closes");
        let text = std::fs::read_to_string(self.dir.path().join("logs/job/r-ok.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 10);
        let mut h = self
            .open("healthy", "r-1")
            .await
            .expect("hostile plugin recovers on a fresh instance");
        h.write(batch(1, 3)).await.unwrap();
        h.close(3).await.unwrap();
    }
}

fn denied(r: Result<LogWriter, PluginError>) -> String {
    match r {
        Err(PluginError::Plugin {
            kind: ErrorKind::Denied,
            message,
            ..
        }) => message,
        Err(e) => panic!("expected a denied error, got {e}"),
        Ok(_) => panic!("expected a denied error, got success"),
    }
}

fn escaped(r: Result<LogWriter, PluginError>) -> String {
    match r {
        Err(PluginError::Plugin {
            kind: ErrorKind::Permanent,
            message,
            ..
        }) if message.starts_with("ESCAPED") => message,
        Err(e) => panic!("control case: expected the granted action to succeed, got {e}"),
        Ok(_) => panic!("control case: unexpected success"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infinite_loop_hits_the_deadline() {
    let e = env("", &[]).await;
    let t = std::time::Instant::now();
    match e.open("spin", "x").await {
        Err(PluginError::Deadline { limit, call, .. }) => {
            assert_eq!(limit, Duration::from_millis(500));
            assert_eq!(call, "open");
        }
        other => panic!("expected a deadline, got {:?}", other.err()),
    }
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "stopped late: {:?}",
        t.elapsed()
    );
    assert_eq!(
        e.hostile
            .metrics
            .deadlines
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    e.still_serving().await;
}

/// The epoch ticker ticks only while guest code may run (an idle daemon's ticker
/// sleeps), and a call that starts while it sleeps wakes it.
#[test]
fn the_epoch_ticker_ticks_only_while_guest_code_may_run() {
    use trellis::runtime::engine::{EPOCH_TICK, EpochTicker, build_engine_with};
    let wait_until = |what: &str, cond: &dyn Fn() -> bool| {
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(
                std::time::Instant::now() < end,
                "timed out waiting until {what}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let engine = build_engine_with(false).unwrap();
    let ticker = EpochTicker::start(&engine);
    wait_until("the ticker waits for a call", &|| ticker.is_parked());
    std::thread::sleep(EPOCH_TICK * 20);
    assert_eq!(ticker.ticks(), 0, "it ticked with no guest code running");
    let running = ticker.enter();
    assert!(!ticker.is_parked());
    wait_until("three ticks", &|| ticker.ticks() >= 3);
    drop(running);
    // Back to waiting (within a tick or so), and no tick while it waits.
    wait_until("the ticker waits again", &|| ticker.is_parked());
    let settled = ticker.ticks();
    std::thread::sleep(EPOCH_TICK * 20);
    assert_eq!(ticker.ticks(), settled, "it ticked after the call");
    assert!(ticker.is_parked());
    // Woken many times over: never a lost wake-up.
    for _ in 0..200 {
        let before = ticker.ticks();
        let running = ticker.enter();
        wait_until("a tick after waking", &|| ticker.ticks() > before);
        drop(running);
    }
}

/// A spinning call that starts while the ticker sleeps (nothing ran for a while) is
/// still cut off at its deadline: its call wakes the ticker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spin_that_starts_while_the_ticker_sleeps_hits_the_deadline() {
    use trellis::runtime::engine::EPOCH_TICK;
    let e = env("", &[]).await;
    let ticker = e.rt.epoch_ticker();
    let asleep = std::time::Instant::now();
    while !ticker.is_parked() {
        assert!(
            asleep.elapsed() < Duration::from_secs(10),
            "the ticker never slept"
        );
        tokio::time::sleep(EPOCH_TICK).await;
    }
    let t = std::time::Instant::now();
    match e.open("spin", "x").await {
        Err(PluginError::Deadline { call, .. }) => assert_eq!(call, "open"),
        other => panic!("expected a deadline, got {:?}", other.err()),
    }
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "stopped late: {:?}",
        t.elapsed()
    );
    assert_eq!(ticker.in_flight(), 0, "a call's guard outlived it");
    e.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocating_past_the_cap_hits_the_memory_limit() {
    let e = env("", &[]).await;
    match e.open("alloc", "x").await {
        Err(PluginError::MemoryLimit { limit, .. }) => assert_eq!(limit, 32 << 20),
        other => panic!("expected a memory limit, got {:?}", other.err()),
    }
    e.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_is_a_trap() {
    let e = env("", &[]).await;
    match e.open("panic", "x").await {
        Err(PluginError::Trap { detail, .. }) => {
            assert!(detail.contains("unreachable"), "{detail}")
        }
        other => panic!("expected a trap, got {:?}", other.err()),
    }
    e.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_outside_the_grant_is_denied() {
    let e = env(r#"dirs = [{ host = "data", guest = "/data" }]"#, &[]).await;
    std::fs::write(e.dir.path().join("data/inside.txt"), "fine").unwrap();
    std::fs::write(e.dir.path().join("secret.txt"), "top secret").unwrap();
    // Control: inside the grant, reading works (so the test can tell).
    assert!(escaped(e.open("read", "/data/inside.txt").await).contains("read 4 bytes"));
    denied(e.open("read", "/etc/passwd").await);
    denied(e.open("read", "/data/../secret.txt").await);
    let outside = e.dir.path().join("secret.txt");
    denied(e.open("read", outside.to_str().unwrap()).await);
    e.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writing_into_a_read_only_grant_is_denied() {
    let e = env(r#"dirs = [{ host = "ro", guest = "/ro" }, { host = "rw", guest = "/rw", mode = "read-write" }]"#, &[]).await;
    assert!(escaped(e.open("write", "/rw/x.txt").await).contains("wrote"));
    assert!(e.dir.path().join("rw/x.txt").exists());
    denied(e.open("write", "/ro/x.txt").await);
    assert!(
        !e.dir.path().join("ro/x.txt").exists(),
        "the read-only directory was written"
    );
    e.still_serving().await;
}

/// A listener that records whether anyone connected, and answers HTTP 200.
fn http_listener() -> (String, std::sync::mpsc::Receiver<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { break };
            let _ = tx.send(());
            let mut buf = [0u8; 1024];
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.read(&mut buf);
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_to_a_host_not_granted_is_denied_before_any_connection() {
    let (granted, granted_rx) = http_listener();
    let (other, other_rx) = http_listener();
    let e = env(&format!("http = [\"http://{granted}\"]"), &[]).await;
    assert!(escaped(e.open("http", &format!("http://{granted}/")).await).contains("HTTP 200"));
    assert!(
        granted_rx.recv_timeout(Duration::from_secs(2)).is_ok(),
        "control: the granted host saw no connection"
    );
    let msg = denied(e.open("http", &format!("http://{other}/")).await);
    assert!(msg.contains("HttpRequestDenied"), "{msg}");
    assert!(
        other_rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "the non-granted host was contacted"
    );
    // Same host, other scheme: also denied.
    denied(e.open("http", &format!("https://{granted}/")).await);
    assert!(
        e.hostile
            .metrics
            .denials
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
    e.still_serving().await;
}

/// The SDK's HTTP client (`trellis_sdk::http`) sends a body larger than one stream
/// write and reads the whole response, against the Elasticsearch stand-in
/// (tests/es-mock): a document POSTed is created (201) and can be fetched back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_http_client_posts_a_body_and_reads_the_response() {
    let es = EsMock::start(&[]);
    let addr = es.addr.clone();
    let e = env(&format!("http = [\"http://{addr}\"]"), &[]).await;
    let got = escaped(
        e.open("http-post", &format!("http://{addr}/logs/_doc/one"))
            .await,
    );
    drop(es);
    assert!(got.starts_with("ESCAPED: HTTP 201 "), "{got}");
    assert!(
        got.contains("\"_id\":\"one\"") && got.contains("\"result\":\"created\""),
        "{got}"
    );
    e.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_reach_only_granted_addresses() {
    let (granted, granted_rx) = http_listener();
    let (other, other_rx) = http_listener();
    let e = env(&format!("sockets = {{ connect = [\"{granted}\"] }}"), &[]).await;
    assert!(escaped(e.open("socket", &granted).await).contains("connected"));
    assert!(granted_rx.recv_timeout(Duration::from_secs(2)).is_ok());
    denied(e.open("socket", &other).await);
    assert!(
        other_rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "the non-granted address was contacted"
    );
    e.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_not_granted_is_denied() {
    let e = env(
        r#"secrets = ["granted-token"]"#,
        &[("granted-token", "s3cret"), ("db-password", "hunter2")],
    )
    .await;
    assert!(escaped(e.open("secret", "granted-token").await).contains("6 bytes"));
    let msg = denied(e.open("secret", "db-password").await);
    assert!(msg.contains("not granted"), "{msg}");
    assert!(!msg.contains("hunter2"));
    e.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_return_is_refused() {
    let e = env("", &[]).await;
    let reader = trellis::points::browser::LogReader::new(e.hostile.clone()).unwrap();
    // Control: under the cap, the value passes the size check (and is then refused
    // for what it is, zeros rather than an event batch).
    match reader.tail(&meta("j", "r"), None, 512).await {
        Err(PluginError::Invalid { problem, .. }) => {
            assert!(problem.contains("does not decode"), "{problem}")
        }
        other => panic!("expected an invalid answer, got {other:?}"),
    }
    match reader.tail(&meta("j", "r"), None, 2048).await {
        Err(PluginError::Oversized { size, limit, .. }) => {
            assert_eq!(size, 2048 * 1024);
            assert_eq!(limit, 1 << 20);
        }
        other => panic!("expected oversized, got {other:?}"),
    }
    e.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holding_too_many_handles_hits_the_resource_limit() {
    let e = env("", &[]).await;
    match e.open("handles", "x").await {
        Err(PluginError::ResourceLimit { limit, .. }) => assert_eq!(limit, 64),
        other => panic!("expected a resource limit, got {:?}", other.err()),
    }
    e.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_and_log_floods_are_absorbed() {
    let e = env("", &[]).await;
    e.open("stdout", "x")
        .await
        .expect("printing is allowed, into the host's log");
    e.open("log-flood", "x")
        .await
        .expect("a log flood is rate-limited, not fatal");
    e.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_crashes_quarantine_then_recover() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(
        "[runtime.limits]\ncall-timeout = \"200ms\"\n[runtime.quarantine]\nafter = 2\nbackoff = \"400ms\"\n",
        dir.path(),
        &[],
    );
    let p = rt.load(&fixtures().join("hostile")).await.unwrap();
    for _ in 0..2 {
        assert!(matches!(
            LogWriter::open(p.clone(), meta("panic", "x")).await,
            Err(PluginError::Trap { .. })
        ));
    }
    match LogWriter::open(p.clone(), meta("healthy", "x")).await {
        Err(PluginError::Quarantined { failures, last, .. }) => {
            assert_eq!(failures, 2);
            assert!(last.contains("trapped"), "{last}");
        }
        other => panic!("expected quarantine, got {:?}", other.err()),
    }
    assert!(
        rt.render_metrics()
            .contains("trellis_plugin_quarantines_total{plugin=\"hostile\"} 1")
    );
    tokio::time::sleep(Duration::from_millis(450)).await;
    LogWriter::open(p.clone(), meta("healthy", "x"))
        .await
        .expect("a probe after the backoff succeeds");
    assert_eq!(p.health(), trellis::runtime::health::HealthState::Healthy);
}

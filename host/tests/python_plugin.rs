//! A plugin written in Python (examples/python-logger, built by componentize-py in
//! `cargo xtask bundle`) loads in the host's runtime like the Rust ones and writes a
//! run's events: every field intact (any text), a resent batch stored once, the close
//! recorded in the default file store's layout; and without its directory grant, it is
//! refused at load with the fix. (`conformance.rs` runs the kit on it with file-browser.)

mod common;

use common::*;
use trellis::points::logging::{LogWriter, RunsOn, runs_on};
use trellis_sdk::events::BatchBuilder;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_logging_method_writes_each_event_once() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("logs")).unwrap();
    let rt = runtime(
        "[plugins.python-logger]\ndirs = [{ host = \"logs\", guest = \"/logs\", mode = \"read-write\" }]\n",
        d.path(),
        &[],
    );
    let p = rt.load(&bundle().join("python-logger")).await.unwrap();
    assert!(matches!(runs_on(&p).await.unwrap(), RunsOn::Controller));

    let messages = [
        "plain".to_string(),
        "stack trace:\n  at a()\n\tdone".into(),
        "ünïcødé ✓ 𝄞 \"quoted\" \\".into(),
        String::new(),
        "x".repeat(10_000),
    ];
    let batch = |from: usize, to: usize| {
        let mut b = BatchBuilder::new();
        for (i, m) in messages.iter().enumerate().take(to).skip(from) {
            b.push(
                i as u64 + 1,
                1_700_000_000_000 + i as i64,
                "build",
                m,
                &[("stream", "stdout")],
            );
        }
        b.finish()
    };
    let mut w = LogWriter::open(p.clone(), meta("py job", "r-3"))
        .await
        .unwrap();
    w.write(batch(0, 3)).await.unwrap();
    w.write(batch(1, 5)).await.unwrap(); // 2 and 3 again: stored once
    w.close(5).await.unwrap();

    // The default file store's layout: <dir>/<job>/<run>.jsonl and .count.
    let log = d.path().join("logs/py job/r-3.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5, "5 events, each once: {text}");
    for (i, v) in lines[..5].iter().enumerate() {
        assert_eq!(v["seq"], i as u64 + 1);
        assert_eq!(v["id"], format!("r-3:{}", i + 1));
        assert_eq!(v["message"], messages[i].as_str());
        assert_eq!(v["timestamp"], 1_700_000_000_000u64 + i as u64);
        assert_eq!(v["data"]["stream"], "stdout");
        assert_eq!(v["job_id"], "py job");
        assert_eq!(v["step_id"], "build");
    }
    let count = std::fs::read_to_string(d.path().join("logs/py job/r-3.count")).unwrap();
    assert_eq!(count, "5", "the final count, where the browser looks");

    // A reopened log (a fresh instance, as after a failure) resumes after seq 5.
    let mut again = LogWriter::open(p.clone(), meta("py job", "r-3"))
        .await
        .unwrap();
    again.write(batch(0, 5)).await.unwrap();
    let after = std::fs::read_to_string(&log).unwrap();
    assert_eq!(after, text, "nothing written twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_its_directory_the_python_plugin_is_refused_with_the_fix() {
    let d = tempfile::tempdir().unwrap();
    let rt = runtime("", d.path(), &[]);
    let e = rt
        .load(&bundle().join("python-logger"))
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("directory `/logs` is not available")
            && e.contains("[[plugins.python-logger.dirs]]"),
        "{e}"
    );
}

//! The example logging method, end to end through the runtime: what it writes is valid
//! JEP-212 JSON with every field intact, whatever the text (exercises the plugin's
//! SIMD escaping inside the sandbox, not only natively).

mod common;

use common::*;
use trellis::points::logging::{LogWriter, RunsOn, runs_on};
use trellis_sdk::events::BatchBuilder;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_round_trip_any_text() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("logs")).unwrap();
    let rt = runtime(
        "[plugins.jsonl-logger]\ndirs = [{ host = \"logs\", guest = \"/logs\", mode = \"read-write\" }]\n",
        d.path(),
        &[],
    );
    let p = rt.load(&bundle().join("jsonl-logger")).await.unwrap();
    assert!(matches!(runs_on(&p).await.unwrap(), RunsOn::Controller));

    // Messages with every ASCII control/quote/backslash at many offsets, long and short,
    // multi-line, and non-ASCII text.
    let mut messages = Vec::new();
    for b in (0u8..0x20).chain([b'"', b'\\', b'/', 0x7f]) {
        for at in [0, 1, 7, 8, 15, 16, 17, 31, 32, 33, 39] {
            let mut v = vec![b'm'; 40];
            v[at] = b;
            messages.push(String::from_utf8(v).unwrap());
        }
    }
    messages.push("stack trace:\n  at a()\n  at b()\r\n\tdone".into());
    messages.push("ünïcødé ✓ 𝄞 \u{1}".into());
    messages.push(String::new());
    messages.push("x".repeat(5000) + "\"" + &"y".repeat(3000));

    let mut w = LogWriter::open(p.clone(), meta("job \"quoted\"", "r-7"))
        .await
        .unwrap();
    let mut b = BatchBuilder::new();
    for (i, m) in messages.iter().enumerate() {
        b.push(
            i as u64 + 1,
            1_700_000_000_000 + i as i64,
            "step\t1",
            m,
            &[("stream", "std\"out"), ("k\\", "v\n")],
        );
    }
    w.write(b.finish()).await.unwrap();
    w.close(messages.len() as u64).await.unwrap();

    let text = std::fs::read_to_string(d.path().join("logs/job \"quoted\"/r-7.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), messages.len());
    for (i, line) in lines.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("line {i} is not JSON ({e}): {line}"));
        assert_eq!(v["message"], messages[i].as_str(), "line {i}");
        assert_eq!(v["seq"], i as u64 + 1);
        assert_eq!(v["id"], format!("r-7:{}", i + 1));
        assert_eq!(v["timestamp"], 1_700_000_000_000u64 + i as u64);
        assert_eq!(v["step_id"], "step\t1");
        assert_eq!(v["job_id"], "job \"quoted\"");
        assert_eq!(v["loggable_id"], "r-7");
        assert_eq!(v["loggable_type"], "run");
        assert_eq!(v["instance_id"], "test");
        assert_eq!(v["data"]["stream"], "std\"out");
        assert_eq!(v["data"]["k\\"], "v\n");
    }
    let count = std::fs::read_to_string(d.path().join("logs/job \"quoted\"/r-7.count")).unwrap();
    assert_eq!(count, messages.len().to_string());
}

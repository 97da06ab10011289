//! The default logging pair, end to end: file-logging writes a run's log, file-browser
//! reads it back (pages, steps, tail, completeness); the example jsonl-logger writes
//! the same store format, so the browser reads its logs too.

mod common;

use common::*;
use trellis::points::browser::LogReader;
use trellis::points::logging::LogWriter;
use trellis::wit::log_browser::{LogCompleteness, PageRequest};
use trellis_sdk::events::{BatchBuilder, decode};

fn batch(from: u64, to: u64) -> Vec<u8> {
    let mut b = BatchBuilder::new();
    for s in from..=to {
        let step = if s <= 60 { "build" } else { "test" };
        b.push(
            s,
            s as i64,
            step,
            &format!("{step} line {s}"),
            &[("stream", "stdout")],
        );
    }
    b.finish()
}

fn seqs(buf: &[u8]) -> Vec<u64> {
    decode(buf).unwrap().iter().map(|e| e.seq).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_with_file_logging_read_with_file_browser() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("logs")).unwrap();
    let rt = runtime(
        r#"
        [plugins.file-logging]
        dirs = [{ host = "logs", guest = "/logs", mode = "read-write" }]
        [plugins.file-browser]
        dirs = [{ host = "logs", guest = "/logs" }]
        [plugins.jsonl-logger]
        dirs = [{ host = "logs", guest = "/logs", mode = "read-write" }]
        "#,
        d.path(),
        &[],
    );
    let logging = rt.load(&bundle().join("file-logging")).await.unwrap();
    let browser = LogReader::new(rt.load(&bundle().join("file-browser")).await.unwrap()).unwrap();
    let run = meta("build-and-test", "r-000001");

    let mut w = LogWriter::open(logging.clone(), run.clone()).await.unwrap();
    w.write(batch(1, 40)).await.unwrap();
    assert!(matches!(
        browser.completeness(&run).await.unwrap(),
        LogCompleteness::Open
    ));
    // live: what is stored so far, and a cursor to continue from
    let first = browser
        .read(
            &run,
            PageRequest {
                step: None,
                cursor: None,
                limit: 1000,
            },
        )
        .await
        .unwrap();
    assert_eq!(seqs(&first.events), (1..=40).collect::<Vec<_>>());
    let caught_up = browser
        .read(
            &run,
            PageRequest {
                step: None,
                cursor: Some(first.next.clone()),
                limit: 1000,
            },
        )
        .await
        .unwrap();
    assert!(seqs(&caught_up.events).is_empty());
    w.write(batch(41, 100)).await.unwrap();
    let more = browser
        .read(
            &run,
            PageRequest {
                step: None,
                cursor: Some(caught_up.next),
                limit: 1000,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        seqs(&more.events),
        (41..=100).collect::<Vec<_>>(),
        "following picks up exactly the new events"
    );
    w.close(100).await.unwrap();
    assert!(matches!(
        browser.completeness(&run).await.unwrap(),
        LogCompleteness::Complete(100)
    ));

    // paging with a small limit, one step, the tail
    let (mut cursor, mut all) = (None, Vec::new());
    loop {
        let p = browser
            .read(
                &run,
                PageRequest {
                    step: Some("test".into()),
                    cursor: cursor.clone(),
                    limit: 7,
                },
            )
            .await
            .unwrap();
        let s = seqs(&p.events);
        if s.is_empty() {
            break;
        }
        all.extend(s);
        cursor = Some(p.next);
    }
    assert_eq!(all, (61..=100).collect::<Vec<_>>());
    assert_eq!(
        seqs(&browser.tail(&run, None, 3).await.unwrap()),
        vec![98, 99, 100]
    );
    assert_eq!(
        seqs(&browser.tail(&run, Some("build".into()), 2).await.unwrap()),
        vec![59, 60]
    );
    let e = decode(&browser.tail(&run, None, 1).await.unwrap()).unwrap()[0]
        .message
        .to_string();
    assert_eq!(e, "test line 100");

    // a log written by the example plugin, read by the same browser
    let jsonl = rt.load(&bundle().join("jsonl-logger")).await.unwrap();
    let other = meta("build-and-test", "r-000002");
    let mut w = LogWriter::open(jsonl, other.clone()).await.unwrap();
    w.write(batch(1, 10)).await.unwrap();
    w.close(10).await.unwrap();
    assert!(matches!(
        browser.completeness(&other).await.unwrap(),
        LogCompleteness::Complete(10)
    ));
    assert_eq!(
        seqs(&browser.tail(&other, None, 100).await.unwrap()),
        (1..=10).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_cursor_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("logs")).unwrap();
    let rt = runtime(
        "[plugins.file-browser]\ndirs = [{ host = \"logs\", guest = \"/logs\" }]\n",
        d.path(),
        &[],
    );
    let browser = LogReader::new(rt.load(&bundle().join("file-browser")).await.unwrap()).unwrap();
    let err = browser
        .read(
            &meta("j", "r"),
            PageRequest {
                step: None,
                cursor: Some("page-two".into()),
                limit: 10,
            },
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("`page-two` is not a cursor"),
        "{err}"
    );
}

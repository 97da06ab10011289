//! The logging-method + log-browser suite: what one writes, the other reads back, as
//! the contract says (wit/logging-method.wit, wit/log-browser.wit).

use super::Suite;
use crate::points::browser::LogReader;
use crate::points::logging::LogWriter;
use crate::runtime::Plugin;
use crate::wit::log_browser::{LogCompleteness, PageRequest};
use crate::wit::types::LogMetadata;
use std::sync::Arc;
use std::time::Duration;
use trellis_sdk::events::{BatchBuilder, decode};

/// Events of the main log: steps `build` (1..=120) and `test` (121..=250); some with
/// non-ASCII text, one of 64 KiB, stdout and stderr.
const EVENTS: u64 = 250;
const BUILD_LAST: u64 = 120;
const BIG_SEQ: u64 = 200;

/// One expected event, owned.
#[derive(Debug, Clone, PartialEq)]
struct Event {
    seq: u64,
    timestamp_ms: i64,
    step: String,
    message: String,
    data: Vec<(String, String)>,
}

fn expected(seq: u64) -> Event {
    let step = if seq <= BUILD_LAST { "build" } else { "test" };
    let message = match seq {
        BIG_SEQ => "x".repeat(64 * 1024),
        s if s.is_multiple_of(50) => format!("ünïcødé ✓ 日本語 line {s}"),
        s => format!("{step} line {s}"),
    };
    let stream = if seq.is_multiple_of(7) {
        "stderr"
    } else {
        "stdout"
    };
    Event {
        seq,
        timestamp_ms: 1_700_000_000_000 + seq as i64 * 10,
        step: step.into(),
        message,
        data: vec![("stream".into(), stream.into())],
    }
}

fn pack(seqs: impl Iterator<Item = u64>) -> Vec<u8> {
    let mut b = BatchBuilder::new();
    for s in seqs {
        let e = expected(s);
        let data: Vec<(&str, &str)> = e
            .data
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        b.push(e.seq, e.timestamp_ms, &e.step, &e.message, &data);
    }
    b.finish()
}

fn unpack(buf: &[u8]) -> Result<Vec<Event>, String> {
    Ok(decode(buf)
        .map_err(|e| format!("the browser returned a malformed event batch: {e}"))?
        .iter()
        .map(|e| Event {
            seq: e.seq,
            timestamp_ms: e.timestamp_ms,
            step: e.step.into(),
            message: e.message.into(),
            data: e.data().map(|(k, v)| (k.into(), v.into())).collect(),
        })
        .collect())
}

/// Compare what came back with what should have, naming the first difference.
fn same(got: &[Event], want: impl Iterator<Item = u64>) -> Result<(), String> {
    let want: Vec<Event> = want.map(expected).collect();
    if got.len() != want.len() {
        let seqs: Vec<u64> = got.iter().map(|e| e.seq).take(12).collect();
        return Err(format!(
            "{} events, expected {} (seqs from: {seqs:?}…)",
            got.len(),
            want.len()
        ));
    }
    for (g, w) in got.iter().zip(&want) {
        if g != w {
            let field = if g.seq != w.seq {
                format!(
                    "seq {} where {} belongs (order or duplicates)",
                    g.seq, w.seq
                )
            } else if g.message != w.message {
                format!(
                    "the message differs ({} bytes, expected {})",
                    g.message.len(),
                    w.message.len()
                )
            } else if g.step != w.step {
                format!("step `{}`, expected `{}`", g.step, w.step)
            } else if g.timestamp_ms != w.timestamp_ms {
                format!("timestamp {}, expected {}", g.timestamp_ms, w.timestamp_ms)
            } else {
                format!("data {:?}, expected {:?}", g.data, w.data)
            };
            return Err(format!("event {}: {field}", w.seq));
        }
    }
    Ok(())
}

/// Every event of the log (or a step), page by page; the page sizes and the last cursor.
async fn read_all(
    reader: &LogReader,
    log: &LogMetadata,
    step: Option<&str>,
    limit: u32,
) -> Result<(Vec<Event>, Vec<usize>, String), String> {
    let mut events = Vec::new();
    let mut sizes = Vec::new();
    let mut cursor = None;
    for _ in 0..1000 {
        let page = reader
            .read(
                log,
                PageRequest {
                    step: step.map(String::from),
                    cursor: cursor.clone(),
                    limit,
                },
            )
            .await
            .map_err(|e| format!("read: {e}"))?;
        let got = unpack(&page.events)?;
        if got.is_empty() {
            return Ok((events, sizes, page.next));
        }
        sizes.push(got.len());
        events.extend(got);
        cursor = Some(page.next);
    }
    Err("more than 1000 pages: the cursor does not advance".into())
}

/// Wait (an eventually consistent store may need a moment) for `complete(count)`.
async fn wait_complete(
    reader: &LogReader,
    log: &LogMetadata,
    count: u64,
) -> Result<String, String> {
    let mut last = None;
    for _ in 0..100 {
        match reader.completeness(log).await {
            Ok(LogCompleteness::Complete(n)) if n == count => {
                return Ok(format!("complete({count})"));
            }
            Ok(LogCompleteness::Complete(n)) => {
                return Err(format!(
                    "complete({n}), but the log was closed with {count}"
                ));
            }
            Ok(other) => last = Some(completeness(&other)),
            Err(e) => return Err(format!("completeness: {e}")),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "still {} 10 s after close({count})",
        last.unwrap_or_default()
    ))
}

fn completeness(c: &LogCompleteness) -> String {
    match c {
        LogCompleteness::Open => "open".into(),
        LogCompleteness::Complete(n) => format!("complete({n})"),
        LogCompleteness::Incomplete(m) => {
            format!("incomplete({} of {} readable)", m.present, m.expected)
        }
    }
}

fn meta(id: &str) -> LogMetadata {
    LogMetadata {
        instance_id: "trellis-conformance".into(),
        loggable_type: "run".into(),
        loggable_id: id.into(),
        job_id: "conformance-kit".into(),
    }
}

pub async fn suite(method: Option<Arc<Plugin>>, browser: Option<Arc<Plugin>>) -> Suite {
    let title = match (&method, &browser) {
        (Some(m), Some(b)) if Arc::ptr_eq(m, b) => {
            format!("logging-method + log-browser: {}", m.name)
        }
        (Some(m), Some(b)) => format!("logging-method {} + log-browser {}", m.name, b.name),
        (Some(m), None) => format!("logging-method {}", m.name),
        (None, Some(b)) => format!("log-browser {}", b.name),
        (None, None) => "logging".into(),
    };
    let mut s = Suite::new(title);
    let (Some(method), Some(browser)) = (method, browser) else {
        s.blocked(
            "round trip through the store",
            "a logging method is tested with the log browser that reads its store (and a browser with its method): pass the other one with --with",
        );
        return s;
    };
    let reader = match LogReader::new(browser) {
        Ok(r) => r,
        Err(e) => {
            s.blocked("round trip through the store", &e.to_string());
            return s;
        }
    };
    // A fresh loggable id per kit run, so that a store kept from an earlier run (files
    // in a granted directory, an index) does not answer for this one.
    let id = format!("kit-{:x}", crate::protocol::now_ms());
    let log = meta(&id);

    s.check("runs-on answers", async {
        crate::points::logging::runs_on(&method)
            .await
            .map(|side| {
                format!("{side:?}")
                    .rsplit("::")
                    .next()
                    .unwrap_or_default()
                    .to_lowercase()
            })
            .map_err(|e| e.to_string())
    })
    .await;

    let mut writer = None;
    let opened = s
        .check("open a log and write 180 events in 2 batches", async {
            let mut w = LogWriter::open(method.clone(), log.clone())
                .await
                .map_err(|e| format!("open: {e}"))?;
            for range in [1..=100, 101..=180] {
                w.write(pack(range.clone()))
                    .await
                    .map_err(|e| format!("write of seqs {range:?}: {e}"))?;
            }
            writer = Some(w);
            Ok(String::new())
        })
        .await;
    if !opened {
        s.blocked("the rest of the suite", "the log could not be written");
        return s;
    }
    s.check("before close the log is not complete", async {
        match reader.completeness(&log).await {
            Ok(LogCompleteness::Complete(n)) => Err(format!(
                "complete({n}) before close: a browser must report `open` until the final count is recorded"
            )),
            Ok(c) => Ok(completeness(&c)),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    // After a failure it could not tell from success, the host opens the log again and
    // resends what it has not seen confirmed: each seq must be stored at most once.
    drop(writer.take());
    let resumed = s
        .check(
            "opened again after a failure, the resent batch is stored once",
            async {
                let mut w = LogWriter::open(method.clone(), log.clone())
                    .await
                    .map_err(|e| format!("open again: {e}"))?;
                w.write(pack(101..=180))
                    .await
                    .map_err(|e| format!("write of seqs 101..=180 again: {e}"))?;
                w.write(pack(181..=EVENTS))
                    .await
                    .map_err(|e| format!("write of seqs 181..=250: {e}"))?;
                writer = Some(w);
                Ok("seqs 101..=180 written twice".into())
            },
        )
        .await;
    if !resumed {
        s.blocked(
            "the rest of the suite",
            "the log could not be written again",
        );
        return s;
    }
    s.check("close with the final count", async {
        let w = writer.as_mut().expect("opened");
        w.close(EVENTS).await.map_err(|e| e.to_string())?;
        Ok(String::new())
    })
    .await;
    s.check(
        "completeness after close",
        wait_complete(&reader, &log, EVENTS),
    )
    .await;
    let mut last_cursor = None;
    s.check(
        "the whole log reads back: every event once, in order, equal",
        async {
            let (events, sizes, next) = read_all(&reader, &log, None, 100).await?;
            same(&events, 1..=EVENTS)?;
            last_cursor = Some(next);
            Ok(format!("{} events in pages of {sizes:?}", events.len()))
        },
    )
    .await;
    s.check("a page holds at most `limit` events", async {
        let (events, sizes, _) = read_all(&reader, &log, None, 7).await?;
        if let Some(big) = sizes.iter().find(|n| **n > 7) {
            return Err(format!("a page of {big} events for limit 7"));
        }
        same(&events, 1..=EVENTS)?;
        Ok(format!("{} pages of at most 7", sizes.len()))
    })
    .await;
    s.check(
        "reading on from the last cursor returns nothing new",
        async {
            let Some(cursor) = last_cursor.clone() else {
                return Err("not run: the whole-log read failed".into());
            };
            let page = reader
                .read(
                    &log,
                    PageRequest {
                        step: None,
                        cursor: Some(cursor),
                        limit: 100,
                    },
                )
                .await
                .map_err(|e| e.to_string())?;
            let got = unpack(&page.events)?;
            if got.is_empty() {
                Ok(String::new())
            } else {
                Err(format!(
                    "{} events again from seq {}",
                    got.len(),
                    got[0].seq
                ))
            }
        },
    )
    .await;
    s.check("one step alone: only its events", async {
        let (test, _, _) = read_all(&reader, &log, Some("test"), 100).await?;
        same(&test, BUILD_LAST + 1..=EVENTS).map_err(|e| format!("step `test`: {e}"))?;
        let (build, _, _) = read_all(&reader, &log, Some("build"), 50).await?;
        same(&build, 1..=BUILD_LAST).map_err(|e| format!("step `build`: {e}"))?;
        Ok(String::new())
    })
    .await;
    s.check(
        "page totals, where given, count what the request matches",
        async {
            let mut said = Vec::new();
            for (step, want) in [(None, EVENTS), (Some("test"), EVENTS - BUILD_LAST)] {
                let page = reader
                    .read(
                        &log,
                        PageRequest {
                            step: step.map(String::from),
                            cursor: None,
                            limit: 10,
                        },
                    )
                    .await
                    .map_err(|e| format!("read: {e}"))?;
                let what = step.map_or("the whole log".to_string(), |s| format!("step `{s}`"));
                match page.total {
                    Some(n) if n != want => {
                        return Err(format!("{what}: total {n}, but it holds {want} events"));
                    }
                    Some(n) => said.push(format!("{what}: {n}")),
                    None => said.push(format!("{what}: not counted")),
                }
            }
            Ok(said.join("; "))
        },
    )
    .await;
    s.check("tail: the last N events, oldest first", async {
        let all = unpack(
            &reader
                .tail(&log, None, 10)
                .await
                .map_err(|e| e.to_string())?,
        )?;
        same(&all, EVENTS - 9..=EVENTS).map_err(|e| format!("last 10: {e}"))?;
        let step = unpack(
            &reader
                .tail(&log, Some("build".into()), 5)
                .await
                .map_err(|e| e.to_string())?,
        )?;
        same(&step, BUILD_LAST - 4..=BUILD_LAST).map_err(|e| format!("last 5 of `build`: {e}"))?;
        let more = unpack(
            &reader
                .tail(&log, None, 10_000)
                .await
                .map_err(|e| e.to_string())?,
        )?;
        same(&more, 1..=EVENTS).map_err(|e| format!("last 10000 of 250: {e}"))?;
        Ok(String::new())
    })
    .await;
    s.check("logs are separate", async {
        let other = meta(&format!("{id}-other"));
        let mut w = LogWriter::open(method.clone(), other.clone())
            .await
            .map_err(|e| format!("open: {e}"))?;
        w.write(pack(1..=3)).await.map_err(|e| e.to_string())?;
        w.close(3).await.map_err(|e| e.to_string())?;
        wait_complete(&reader, &other, 3).await?;
        let (events, _, _) = read_all(&reader, &other, None, 100).await?;
        same(&events, 1..=3).map_err(|e| format!("the second log: {e}"))?;
        let (first, _, _) = read_all(&reader, &log, None, 1000).await?;
        same(&first, 1..=EVENTS).map_err(|e| format!("the first log afterwards: {e}"))?;
        Ok(String::new())
    })
    .await;
    s.check("an unknown log reads empty, not an error", async {
        let missing = meta(&format!("{id}-never-written"));
        let page = reader
            .read(
                &missing,
                PageRequest {
                    step: None,
                    cursor: None,
                    limit: 10,
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        let got = unpack(&page.events)?;
        if !got.is_empty() {
            return Err(format!("{} events", got.len()));
        }
        match reader.completeness(&missing).await {
            Ok(LogCompleteness::Complete(n)) => Err(format!("complete({n})")),
            Ok(c) => Ok(completeness(&c)),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    s
}

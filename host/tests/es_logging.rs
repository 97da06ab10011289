//! The `elasticsearch-logging` plugin against the Elasticsearch stand-in
//! (tests/es-mock, a mock because no Elasticsearch can be installed here): documents
//! with stable ids and ECS fields, per-item 429s retried inside a write, a 429 storm on
//! the whole request kept by the host and delivered later, with no duplicate; a cluster
//! not granted is refused with the line that would grant it.

mod common;

use common::*;
use trellis::points::logging::LogWriter;

fn es_runtime(
    dir: &std::path::Path,
    es: &EsMock,
    grant: &str,
) -> std::sync::Arc<trellis::runtime::Runtime> {
    runtime(
        &format!(
            "[plugins.elasticsearch-logging]\nhttp = [\"{grant}\"]\nconfig = {{ url = \"{}\" }}\n",
            es.url()
        ),
        dir,
        &[],
    )
}

fn count(es: &EsMock, index: &str) -> u64 {
    es.call("POST", "/_refresh", "");
    let (status, body) = es.call("GET", &format!("/{index}/_count"), "");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["count"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_become_ecs_documents_once_through_item_and_request_failures() {
    let d = tempfile::tempdir().unwrap();
    let es = EsMock::start(&[]);
    let rt = es_runtime(d.path(), &es, &es.url());
    let p = rt
        .load(&bundle().join("elasticsearch-logging"))
        .await
        .unwrap();
    let mut w = LogWriter::open(p.clone(), meta("Build Job", "r-1"))
        .await
        .unwrap();
    w.write(batch(1, 100)).await.unwrap();

    // Every third item refused once with 429: retried inside the same write.
    let (s, b) = es.call(
        "POST",
        "/_mock/faults",
        r#"{"fail_items": {"every_nth": 3, "status": 429, "times": 1}}"#,
    );
    assert_eq!(s, 200, "{b}");
    w.write(batch(101, 100)).await.unwrap();
    es.call("POST", "/_mock/faults", r#"{"clear_faults": true}"#);

    // The whole request refused (a 429 storm): the host keeps the batch, and a later
    // delivery writes it; items created before are not created twice.
    es.call(
        "POST",
        "/_mock/faults",
        r#"{"status_storm": {"status": 429, "count": 2, "match": "_bulk"}}"#,
    );
    let mut failures = 0;
    if w.write(batch(201, 50)).await.is_err() {
        failures += 1;
        while w.deliver().await.is_err() {
            failures += 1;
            assert!(failures < 10, "the storm did not end");
        }
    }
    assert!(
        failures >= 1,
        "the storm should have refused at least one request"
    );
    w.close(250).await.unwrap();

    let index = "trellis-logs-build-job";
    assert_eq!(
        count(&es, index),
        251,
        "250 events and the close document, once each"
    );
    let (status, body) = es.call("GET", &format!("/{index}/_doc/test:run:r-1:7"), "");
    assert_eq!(status, 200, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    let src = &doc["_source"];
    assert_eq!(src["message"], "line 7");
    assert_eq!(src["event"]["sequence"], 7);
    assert_eq!(src["@timestamp"], "2023-11-14T22:13:20.007Z");
    assert_eq!(src["labels"]["stream"], "stdout");
    assert_eq!(src["trellis"]["loggable_id"], "r-1");
    assert_eq!(src["trellis"]["job_id"], "Build Job");
    assert_eq!(src["trellis"]["step_id"], "build");
    let (_, close) = es.call("GET", &format!("/{index}/_doc/test:run:r-1:close"), "");
    assert!(close.contains("\"final_count\":250"), "{close}");
    // The index template was installed on first use.
    let (status, _) = es.call("GET", "/_index_template/trellis-logs", "");
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_not_granted_is_refused_with_the_fix() {
    let d = tempfile::tempdir().unwrap();
    let es = EsMock::start(&[]);
    let rt = es_runtime(d.path(), &es, "http://127.0.0.1:1");
    let p = rt
        .load(&bundle().join("elasticsearch-logging"))
        .await
        .unwrap();
    let e = LogWriter::open(p, meta("j", "r-1"))
        .await
        .err()
        .expect("denied")
        .to_string();
    assert!(
        e.contains("denied") && e.contains("grant it in [plugins.elasticsearch-logging] http"),
        "{e}"
    );
}

/// Basic auth from the secrets store: the right password writes, a wrong one is refused
/// as `denied` (HTTP 401), and the password never appears in the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_comes_from_the_secrets_store() {
    let d = tempfile::tempdir().unwrap();
    let es = EsMock::start(&["--basic-auth", "elastic:right-pw"]);
    let rt = |secret: &str| {
        runtime(
            &format!(
                "[plugins.elasticsearch-logging]\nhttp = [\"{url}\"]\nsecrets = [\"es-password\"]\nconfig = {{ url = \"{url}\", username = \"elastic\", password-secret = \"es-password\" }}\n",
                url = es.url()
            ),
            d.path(),
            &[("es-password", secret)],
        )
    };
    let good = rt("right-pw");
    let p = good
        .load(&bundle().join("elasticsearch-logging"))
        .await
        .unwrap();
    let mut w = LogWriter::open(p, meta("auth", "r-1")).await.unwrap();
    w.write(batch(1, 10)).await.unwrap();
    w.close(10).await.unwrap();

    let bad = rt("wrong-pw");
    let p = bad
        .load(&bundle().join("elasticsearch-logging"))
        .await
        .unwrap();
    let e = LogWriter::open(p, meta("auth", "r-2"))
        .await
        .err()
        .expect("a wrong password is refused")
        .to_string();
    assert!(e.contains("denied") && e.contains("HTTP 401"), "{e}");
    assert!(
        !e.contains("wrong-pw"),
        "the password leaked into the error: {e}"
    );
}

/// The browser gets nothing it was not granted: a cluster outside its `http` grant is
/// refused with the line that grants it, and a password secret it was not granted
/// stops it at load, naming the secret (never its value).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_gets_only_what_it_was_granted() {
    use trellis::points::bindings::log_browser::PageRequest;
    let d = tempfile::tempdir().unwrap();
    let es = EsMock::start(&[]);
    let rt = runtime(
        &format!(
            "[plugins.elasticsearch-browser]\nhttp = [\"http://127.0.0.1:1\"]\nconfig = {{ url = \"{}\" }}\n",
            es.url()
        ),
        d.path(),
        &[],
    );
    let p = rt
        .load(&bundle().join("elasticsearch-browser"))
        .await
        .unwrap();
    let reader = trellis::points::browser::LogReader::new(p).unwrap();
    let request = PageRequest {
        step: None,
        cursor: None,
        limit: 10,
    };
    let e = reader
        .read(&meta("j", "r-1"), request)
        .await
        .expect_err("denied")
        .to_string();
    assert!(
        e.contains("denied") && e.contains("grant it in [plugins.elasticsearch-browser] http"),
        "{e}"
    );

    let rt = runtime(
        &format!(
            "[plugins.elasticsearch-browser]\nhttp = [\"{url}\"]\nconfig = {{ url = \"{url}\", username = \"reader\", password-secret = \"es-password\" }}\n",
            url = es.url()
        ),
        d.path(),
        &[("es-password", "the-password")],
    );
    let e = rt
        .load(&bundle().join("elasticsearch-browser"))
        .await
        .err()
        .expect("the secret is not granted")
        .to_string();
    assert!(
        e.contains("es-password") && e.contains("secrets") && !e.contains("the-password"),
        "{e}"
    );
}

/// Near-real-time reading: with seq 6 not searchable yet and 7 already, a page ends at 5
/// (a reader that skipped 6 would never see it); once 6 is visible the next page, from
/// the same cursor, has 6 and 7. Per step the same walk applies. Completeness counts
/// what is searchable against the close document's final count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_serves_only_what_is_visible_without_gaps() {
    use trellis::points::bindings::log_browser::{LogCompleteness, MissingEvents, PageRequest};
    let d = tempfile::tempdir().unwrap();
    let es = EsMock::start(&["--refresh-interval-ms", "-1"]);
    let rt = runtime(
        &format!(
            "[plugins.elasticsearch-browser]\nhttp = [\"{url}\"]\nconfig = {{ url = \"{url}\" }}\n",
            url = es.url()
        ),
        d.path(),
        &[],
    );
    let reader = trellis::points::browser::LogReader::new(
        rt.load(&bundle().join("elasticsearch-browser"))
            .await
            .unwrap(),
    )
    .unwrap();
    // Documents as elasticsearch-logging writes them, under its index template (the
    // browser's term queries need its keyword fields); odd seqs in step a, even in b.
    let template = elasticsearch_store::documents::index_template("trellis-logs-*");
    let (status, out) = es.call(
        "PUT",
        "/_index_template/trellis-logs",
        &template.to_string(),
    );
    assert_eq!(status, 200, "{out}");
    let index = |seqs: &[u64]| {
        let mut body = String::new();
        for s in seqs {
            let step = if s % 2 == 1 { "a" } else { "b" };
            body += &format!(
                "{{\"index\":{{\"_index\":\"trellis-logs-j\",\"_id\":\"test:run:r-1:{s}\"}}}}\n{{\"@timestamp\":\"2023-11-14T22:13:20.00{s}Z\",\"message\":\"m{s}\",\"event\":{{\"sequence\":{s}}},\"trellis\":{{\"instance_id\":\"test\",\"loggable_type\":\"run\",\"loggable_id\":\"r-1\",\"job_id\":\"j\",\"step_id\":\"{step}\"}}}}\n"
            );
        }
        let (status, out) = es.call("POST", "/_bulk?refresh=true", &body);
        assert!(status == 200 && out.contains("\"errors\":false"), "{out}");
    };
    let log = meta("j", "r-1");
    let page = |step: Option<&str>, cursor: Option<&str>| PageRequest {
        step: step.map(String::from),
        cursor: cursor.map(String::from),
        limit: 100,
    };
    let seqs = |batch: &[u8]| -> Vec<u64> {
        trellis_sdk::events::decode(batch)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect()
    };

    let c = reader.completeness(&log).await.unwrap();
    assert!(matches!(c, LogCompleteness::Open), "{c:?}");
    let empty = reader.read(&log, page(None, None)).await.unwrap();
    assert_eq!((seqs(&empty.events), empty.next.as_str()), (vec![], "0"));

    index(&[1, 2, 3, 4, 5, 7]);
    let p = reader.read(&log, page(None, None)).await.unwrap();
    assert_eq!(
        (seqs(&p.events), p.next.as_str()),
        (vec![1, 2, 3, 4, 5], "5")
    );
    let b = reader.read(&log, page(Some("b"), None)).await.unwrap();
    assert_eq!((seqs(&b.events), b.next.as_str()), (vec![2, 4], "5"));
    let first = trellis_sdk::events::decode(&p.events).unwrap()[0].timestamp_ms;
    assert_eq!(first, 1_700_000_000_001);

    index(&[6]);
    let p = reader.read(&log, page(None, Some("5"))).await.unwrap();
    assert_eq!((seqs(&p.events), p.next.as_str()), (vec![6, 7], "7"));
    let b = reader.read(&log, page(Some("b"), Some("5"))).await.unwrap();
    assert_eq!(seqs(&b.events), [6]);
    let tail = reader.tail(&log, Some("a".into()), 2).await.unwrap();
    assert_eq!(seqs(&tail), [5, 7]);

    // Closed with 8 events; 7 are searchable.
    let (status, out) = es.call(
        "PUT",
        "/trellis-logs-j/_doc/test:run:r-1:close",
        r#"{"trellis":{"instance_id":"test","loggable_type":"run","loggable_id":"r-1","job_id":"j","final_count":8}}"#,
    );
    assert!(status == 200 || status == 201, "{out}");
    let c = reader.completeness(&log).await.unwrap();
    assert!(
        matches!(
            c,
            LogCompleteness::Incomplete(MissingEvents {
                expected: 8,
                present: 7
            })
        ),
        "{c:?}"
    );
    index(&[8]);
    let c = reader.completeness(&log).await.unwrap();
    assert!(matches!(c, LogCompleteness::Complete(8)), "{c:?}");
}

/// HTTPS to a store with a private CA, which the operator trusts for these plugins
/// (`tls-ca`), and an API key from the secrets store: both plugins write and read over
/// TLS. Without the CA grant the store's certificate is refused; a wrong key is
/// `denied` without being echoed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_private_ca_and_an_api_key() {
    use trellis::points::bindings::log_browser::{LogCompleteness, PageRequest};
    let d = tempfile::tempdir().unwrap();
    let (ca, cert, key) = tls_files(d.path());
    let api_key = "dHJlbGxpczpzM2NyM3Q="; // base64("trellis:s3cr3t")
    let es = EsMock::start(&[
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--api-key",
        api_key,
        "--refresh-interval-ms",
        "100",
    ]);
    let url = es.url();
    assert!(url.starts_with("https://"));
    let rt = |trust: bool, secret: &str| {
        let ca_line = if trust {
            format!("tls-ca = [\"{ca}\"]\n")
        } else {
            String::new()
        };
        let mut cfg = String::new();
        for p in ["elasticsearch-logging", "elasticsearch-browser"] {
            cfg += &format!(
                "[plugins.{p}]\nhttp = [\"{url}\"]\n{ca_line}secrets = [\"es-key\"]\nconfig = {{ url = \"{url}\", api-key-secret = \"es-key\" }}\n"
            );
        }
        runtime(&cfg, d.path(), &[("es-key", secret)])
    };

    let trusted = rt(true, api_key);
    let p = trusted
        .load(&bundle().join("elasticsearch-logging"))
        .await
        .unwrap();
    let mut w = LogWriter::open(p, meta("tls job", "r-1")).await.unwrap();
    w.write(batch(1, 20)).await.unwrap();
    w.close(20).await.unwrap();
    // The store's own count (the mock's admin stats: `_count` would need the key).
    let (_, stats) = es.call("GET", "/_mock/stats", "");
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(
        stats["indices"]["trellis-logs-tls-job"]["docs_total"], 21,
        "20 events and the close"
    );
    assert_eq!(stats["auth_failures"], 0);

    let reader = trellis::points::browser::LogReader::new(
        trusted
            .load(&bundle().join("elasticsearch-browser"))
            .await
            .unwrap(),
    )
    .unwrap();
    let log = meta("tls job", "r-1");
    // Searchable after the next refresh (100 ms).
    let t = std::time::Instant::now();
    loop {
        let c = reader.completeness(&log).await.unwrap();
        if matches!(c, LogCompleteness::Complete(20)) {
            break;
        }
        assert!(t.elapsed().as_secs() < 10, "{c:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let page = PageRequest {
        step: None,
        cursor: None,
        limit: 100,
    };
    let got = reader.read(&log, page).await.unwrap();
    assert_eq!(trellis_sdk::events::decode(&got.events).unwrap().len(), 20);

    // The same store without the operator's CA: its certificate is not trusted.
    let p = rt(false, api_key)
        .load(&bundle().join("elasticsearch-logging"))
        .await
        .unwrap();
    let e = LogWriter::open(p, meta("tls job", "r-2"))
        .await
        .err()
        .expect("an untrusted certificate")
        .to_string();
    assert!(e.contains("TlsProtocolError"), "{e}");

    // A wrong key: denied, and not in the error.
    let p = rt(true, "d3Jvbmc6a2V5")
        .load(&bundle().join("elasticsearch-logging"))
        .await
        .unwrap();
    let e = LogWriter::open(p, meta("tls job", "r-3"))
        .await
        .err()
        .expect("a wrong key")
        .to_string();
    assert!(e.contains("denied") && !e.contains("d3Jvbmc6a2V5"), "{e}");
}

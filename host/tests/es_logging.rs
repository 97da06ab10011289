//! The Elasticsearch plugins against OpenSearch 2.19.6 (one node shared by this test
//! binary, `OpenSearch::shared`; each test its own job names, so its own indices):
//! documents with stable ids and ECS fields under the plugin's index template, a resent
//! batch answered 409 per item and stored once, the browser's near-real-time reading
//! (`search_after` pages, step filters, `_count`, completeness), grants.
//!
//! On tests/es-mock, only what this OpenSearch will not do on demand: per-item 429s and
//! 429 storms on whole requests (faults), and basic auth, API keys and HTTPS (the node
//! runs without the security plugin, which MockNode cannot load).

mod common;

use common::*;
use trellis::points::logging::LogWriter;

fn es_runtime(
    dir: &std::path::Path,
    url: &str,
    grant: &str,
) -> std::sync::Arc<trellis::runtime::Runtime> {
    runtime(
        &format!(
            "[plugins.elasticsearch-logging]\nhttp = [\"{grant}\"]\nconfig = {{ url = \"{url}\" }}\n"
        ),
        dir,
        &[],
    )
}

fn count(es: &EsMock, index: &str) -> u64 {
    es.call("POST", &format!("/{index}/_refresh"), "");
    let (status, body) = es.call("GET", &format!("/{index}/_count"), "");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["count"].as_u64().unwrap()
}

/// On OpenSearch: the template installed on first use, documents with stable ids and ECS
/// fields, a batch sent twice stored once (the store answers 409 per item to the resent
/// `create`s, which the plugin counts as done).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_become_ecs_documents_once() {
    let d = tempfile::tempdir().unwrap();
    let os = OpenSearch::shared();
    let rt = es_runtime(d.path(), &os.url(), &os.url());
    let p = rt
        .load(&bundle().join("elasticsearch-logging"))
        .await
        .unwrap();
    let mut w = LogWriter::open(p.clone(), meta("Build Job", "r-1"))
        .await
        .unwrap();
    w.write(batch(1, 100)).await.unwrap();
    // The same events again (a delivery whose answer was lost): 409s, not copies.
    w.write(batch(51, 100)).await.unwrap();
    w.write(batch(151, 99)).await.unwrap();
    w.close(249).await.unwrap();

    let index = "trellis-logs-build-job";
    assert_eq!(
        os.count(index),
        Some(250),
        "249 events and the close document, once each"
    );
    // What the plugin relies on: a `create` of an id already there is refused with 409.
    let resend = format!(
        "{{\"create\":{{\"_index\":\"{index}\",\"_id\":\"test:run:r-1:7\"}}}}\n{{\"message\":\"again\"}}\n"
    );
    let (status, body) = os.call("POST", "/_bulk", &resend);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["errors"], true, "{body}");
    assert_eq!(v["items"][0]["create"]["status"], 409, "{body}");

    let (status, body) = os.call("GET", &format!("/{index}/_doc/test:run:r-1:7"), "");
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
    let (_, close) = os.call("GET", &format!("/{index}/_doc/test:run:r-1:close"), "");
    assert!(close.contains("\"final_count\":249"), "{close}");
    // The index template was installed on first use, and the index follows it.
    let (status, body) = os.call("GET", "/_index_template/trellis-logs", "");
    assert_eq!(status, 200, "{body}");
    let (status, body) = os.call("GET", &format!("/{index}/_mapping"), "");
    assert_eq!(status, 200, "{body}");
    let mapping: serde_json::Value = serde_json::from_str(&body).unwrap();
    let fields = &mapping[index]["mappings"]["properties"];
    assert_eq!(fields["trellis"]["properties"]["job_id"]["type"], "keyword");
    assert_eq!(fields["event"]["properties"]["sequence"]["type"], "long");
}

/// Faults OpenSearch does not produce on demand (tests/es-mock): every third item
/// refused once with 429, retried inside the write; a 429 storm on whole requests, the
/// batch kept by the host and delivered later; nothing stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_stored_once_through_item_and_request_failures() {
    let d = tempfile::tempdir().unwrap();
    let es = EsMock::start(&[]);
    let rt = es_runtime(d.path(), &es.url(), &es.url());
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
    let os = OpenSearch::shared();
    let rt = es_runtime(d.path(), &os.url(), "http://127.0.0.1:1");
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
/// as `denied` (HTTP 401), and the password never appears in the error. On es-mock: the
/// OpenSearch node here has no security plugin.
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
    use trellis::wit::log_browser::PageRequest;
    let d = tempfile::tempdir().unwrap();
    let es = OpenSearch::shared();
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
    use trellis::wit::log_browser::{LogCompleteness, MissingEvents, PageRequest};
    let d = tempfile::tempdir().unwrap();
    let es = OpenSearch::shared();
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
    // No periodic refresh: documents become searchable only when `_bulk` asks for it.
    es.create_unrefreshed_index("trellis-logs-gaps");
    let index = |seqs: &[u64]| {
        let mut body = String::new();
        for s in seqs {
            let step = if s % 2 == 1 { "a" } else { "b" };
            body += &format!(
                "{{\"index\":{{\"_index\":\"trellis-logs-gaps\",\"_id\":\"test:run:r-1:{s}\"}}}}\n{{\"@timestamp\":\"2023-11-14T22:13:20.00{s}Z\",\"message\":\"m{s}\",\"event\":{{\"sequence\":{s}}},\"trellis\":{{\"instance_id\":\"test\",\"loggable_type\":\"run\",\"loggable_id\":\"r-1\",\"job_id\":\"gaps\",\"step_id\":\"{step}\"}}}}\n"
            );
        }
        let (status, out) = es.call("POST", "/_bulk?refresh=true", &body);
        assert!(status == 200 && out.contains("\"errors\":false"), "{out}");
    };
    let log = meta("gaps", "r-1");
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
        "/trellis-logs-gaps/_doc/test:run:r-1:close",
        r#"{"trellis":{"instance_id":"test","loggable_type":"run","loggable_id":"r-1","job_id":"gaps","final_count":8}}"#,
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
    use trellis::wit::log_browser::{LogCompleteness, PageRequest};
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

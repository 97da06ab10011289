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

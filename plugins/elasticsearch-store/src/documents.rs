//! What the logging method writes: the index template, one document per event, the close
//! document, and `_bulk` requests and responses.

use crate::{Meta, rfc3339_ms};
use serde_json::{Value, json};
use trellis_sdk::events::EventView;

/// The name the index template for `pattern` is installed under: `trellis-logs` for the
/// default pattern (`trellis-logs-*`), else one of its own per pattern, so that two
/// configurations writing different indices do not replace each other's template.
pub fn template_name(pattern: &str) -> String {
    if pattern == "trellis-logs-*" {
        return "trellis-logs".into();
    }
    let safe: String = pattern
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '-' | '_' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '_',
        })
        .collect();
    format!("trellis-logs-for-{}", safe.trim_matches('_'))
}

/// The index template installed on first use (`PUT /_index_template/NAME`, see
/// [`template_name`]).
pub fn index_template(pattern: &str) -> Value {
    json!({
        "index_patterns": [pattern],
        "priority": 100,
        "template": {
            "mappings": {
                "properties": {
                    "@timestamp": { "type": "date" },
                    "message": { "type": "text" },
                    "event": { "properties": {
                        "sequence": { "type": "long" },
                        "dataset": { "type": "keyword" }
                    }},
                    "service": { "properties": { "name": { "type": "keyword" } } },
                    "trellis": { "properties": {
                        "instance_id": { "type": "keyword" },
                        "loggable_type": { "type": "keyword" },
                        "loggable_id": { "type": "keyword" },
                        "job_id": { "type": "keyword" },
                        "step_id": { "type": "keyword" },
                        "final_count": { "type": "long" }
                    }}
                }
            }
        }
    })
}

/// The engines the plugins work with: what they use (`PUT /_index_template`, `_bulk`
/// `create` with ids, `search_after`, `_count`, `exists`/`term` filters, plain
/// `application/json` and `application/x-ndjson` bodies) is the same in all of them.
pub const SUPPORTED_ENGINES: &str =
    "Elasticsearch 7.8 or later (8 and 9 included) or OpenSearch 1.0 or later (2.19 is tested)";

/// Why installing the index template was refused, when the store is too old to have
/// composable templates (Elasticsearch before 7.8 reads `_index_template` as an index
/// name, or has no route for it); None for any other refusal.
pub fn template_refusal_hint(status: u16, body: &[u8]) -> Option<String> {
    let body = String::from_utf8_lossy(body);
    let no_such_api = (status == 400 || status == 404 || status == 405)
        && (body.contains("invalid_index_name_exception") || body.contains("no handler found"));
    no_such_api.then(|| {
        format!(
            "the store has no composable index templates (PUT /_index_template): it needs {SUPPORTED_ENGINES}"
        )
    })
}

/// An event as an ECS document.
pub fn document(meta: &Meta, e: &EventView<'_>) -> Value {
    let mut labels = serde_json::Map::new();
    for (k, v) in e.data() {
        labels.insert(k.to_string(), Value::String(v.to_string()));
    }
    json!({
        "@timestamp": rfc3339_ms(e.timestamp_ms),
        "message": e.message,
        "event": { "sequence": e.seq, "dataset": "trellis.log" },
        "service": { "name": "trellis" },
        "labels": labels,
        "trellis": {
            "instance_id": meta.instance_id,
            "loggable_type": meta.loggable_type,
            "loggable_id": meta.loggable_id,
            "job_id": meta.job_id,
            "step_id": e.step,
        }
    })
}

/// The close document: the final count, for completeness checks.
pub fn close_document(meta: &Meta, final_count: u64, now_ms: i64) -> Value {
    json!({
        "@timestamp": rfc3339_ms(now_ms),
        "event": { "dataset": "trellis.log.close" },
        "service": { "name": "trellis" },
        "trellis": {
            "instance_id": meta.instance_id,
            "loggable_type": meta.loggable_type,
            "loggable_id": meta.loggable_id,
            "job_id": meta.job_id,
            "final_count": final_count,
        }
    })
}

/// A `_bulk` body: one `op` (create or index) line and one document line per item.
pub fn bulk_body(index: &str, op: &str, items: &[(String, Value)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (id, doc) in items {
        let action = json!({ op: { "_index": index, "_id": id } });
        serde_json::to_writer(&mut out, &action).expect("json");
        out.push(b'\n');
        serde_json::to_writer(&mut out, doc).expect("json");
        out.push(b'\n');
    }
    out
}

/// What a `_bulk` response says about the items sent, by position.
#[derive(Debug, Default, PartialEq)]
pub struct BulkOutcome {
    /// Positions to send again (429, 503, other 5xx).
    pub retry: Vec<usize>,
    /// Positions refused for good, with the reason.
    pub failed: Vec<(usize, String)>,
}

/// Read a `_bulk` response body (HTTP 200) for `sent` items.
pub fn bulk_outcome(body: &[u8], sent: usize) -> Result<BulkOutcome, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("the _bulk response is not JSON: {e}"))?;
    let items = v["items"]
        .as_array()
        .ok_or("the _bulk response has no `items`")?;
    if items.len() != sent {
        return Err(format!(
            "the _bulk response has {} items for {sent} sent",
            items.len()
        ));
    }
    let mut out = BulkOutcome::default();
    for (i, item) in items.iter().enumerate() {
        let r = item
            .as_object()
            .and_then(|o| o.values().next())
            .ok_or("a _bulk item without a result")?;
        let status = r["status"].as_u64().unwrap_or(0);
        match status {
            200..=299 | 409 => {} // created, or already there (a resend)
            429 | 500..=599 => out.retry.push(i),
            _ => {
                let reason = r["error"]["reason"]
                    .as_str()
                    .or(r["error"]["type"].as_str())
                    .unwrap_or("no reason given");
                out.failed.push((i, format!("{status}: {reason}")));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_index_pattern_has_a_template_of_its_own() {
        assert_eq!(template_name("trellis-logs-*"), "trellis-logs");
        assert_eq!(template_name("ci-*-logs"), "trellis-logs-for-ci-_-logs");
        assert_ne!(template_name("ci-*"), template_name("build-*"));
        assert_ne!(template_name("ci-*"), template_name("trellis-logs-*"));
    }

    #[test]
    fn bulk_items_are_sorted_into_done_retry_and_failed() {
        let body = br#"{"errors":true,"items":[
            {"create":{"_id":"a","status":201}},
            {"create":{"_id":"b","status":409,"error":{"type":"version_conflict_engine_exception"}}},
            {"create":{"_id":"c","status":429,"error":{"type":"es_rejected_execution_exception"}}},
            {"create":{"_id":"d","status":400,"error":{"type":"mapper_parsing_exception","reason":"bad field"}}},
            {"create":{"_id":"e","status":503}}]}"#;
        let o = bulk_outcome(body, 5).unwrap();
        assert_eq!(o.retry, [2, 4]);
        assert_eq!(o.failed, [(3, "400: bad field".to_string())]);
        assert!(bulk_outcome(body, 4).unwrap_err().contains("5 items for 4"));
        assert!(bulk_outcome(b"nope", 1).is_err());
    }

    #[test]
    fn a_store_without_composable_templates_is_named() {
        // What an engine without the API answers (an index named `_index_template`).
        let old = br#"{"error":{"root_cause":[{"type":"invalid_index_name_exception","reason":"Invalid index name [_index_template], must not start with '_'."}],"type":"invalid_index_name_exception"},"status":400}"#;
        let hint = template_refusal_hint(400, old).unwrap();
        assert!(hint.contains("Elasticsearch 7.8") && hint.contains("OpenSearch 1.0"));
        let no_route = br#"{"error":"no handler found for uri [/_index_template/trellis-logs] and method [PUT]","status":400}"#;
        assert!(template_refusal_hint(400, no_route).is_some());
        // Other refusals keep their own message.
        let bad = br#"{"error":{"type":"mapper_parsing_exception","reason":"x"},"status":400}"#;
        assert_eq!(template_refusal_hint(400, bad), None);
        assert_eq!(template_refusal_hint(401, old), None);
    }

    #[test]
    fn a_bulk_body_is_ndjson_with_stable_ids() {
        let meta = Meta {
            instance_id: "ci".into(),
            loggable_type: "run".into(),
            loggable_id: "r-1".into(),
            job_id: "build".into(),
        };
        let body = bulk_body(
            "idx",
            "create",
            &[(meta.doc_id(Some(7)), json!({"message": "hi"}))],
        );
        let text = String::from_utf8(body).unwrap();
        assert_eq!(
            text,
            "{\"create\":{\"_id\":\"ci:run:r-1:7\",\"_index\":\"idx\"}}\n{\"message\":\"hi\"}\n"
        );
        assert_eq!(meta.doc_id(None), "ci:run:r-1:close");
    }
}

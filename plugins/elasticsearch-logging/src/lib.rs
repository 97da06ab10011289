//! A logging method that writes each event as an Elasticsearch document.
//!
//! * One `_bulk` request per batch (NDJSON), each event a `create` with the stable id
//!   `<instance>:<loggable-type>:<loggable-id>:<seq>`: a batch sent again (the host
//!   retries until it is confirmed) creates nothing twice; `409` on an item means "already
//!   there" and counts as done.
//! * Per-item results are read: items refused with 429/503 (or another 5xx) are sent
//!   again, up to `ITEM_ATTEMPTS` times with a growing pause; what still fails makes the
//!   batch `retryable` (the host keeps it); items refused for good (a mapping error, 400)
//!   make it `permanent`, naming the first reasons.
//! * Documents follow the Elastic Common Schema where a field exists (`@timestamp`,
//!   `message`, `event.sequence`, `event.dataset`, `service.name`, `labels.*`) plus
//!   JEP-212's metadata under `trellis.*` (instance id, loggable type and id, job id,
//!   step id).
//! * The index comes from a template (`trellis-logs-{job}`); an index template for
//!   `trellis-logs-*` (keyword ids, long sequence, date timestamp) is installed on the
//!   first open.
//! * `close` writes one more document, `<...>:close`, with the final count
//!   (`trellis.final_count`): a browser compares it with what the store holds.
//!
//! The request building and response reading are plain Rust (unit-tested natively);
//! `component` does the HTTP.

use serde_json::{Value, json};
use trellis_sdk::events::EventView;

/// How often a refused item is sent again within one `write`.
pub const ITEM_ATTEMPTS: u32 = 4;

/// The index template installed on first use (`PUT /_index_template/trellis-logs`).
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

/// The log's identity, as JEP-212 names it.
#[derive(Debug, Clone)]
pub struct Meta {
    pub instance_id: String,
    pub loggable_type: String,
    pub loggable_id: String,
    pub job_id: String,
}

impl Meta {
    /// The id of event `seq` (or of the close document, `seq` = None).
    pub fn doc_id(&self, seq: Option<u64>) -> String {
        let tail = seq.map_or_else(|| "close".to_string(), |s| s.to_string());
        format!(
            "{}:{}:{}:{tail}",
            self.instance_id, self.loggable_type, self.loggable_id
        )
    }
}

/// `template` with `{job}` replaced; Elasticsearch index names are lower case and
/// refuse `\ / * ? " < > | , # :` and spaces, so anything else becomes `-`.
pub fn index_name(template: &str, job: &str) -> String {
    let safe: String = job
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let safe = safe.trim_start_matches(['-', '_', '.']);
    template.replace("{job}", if safe.is_empty() { "unnamed" } else { safe })
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

/// Milliseconds since the epoch as RFC 3339 UTC (`2026-12-02T21:23:17.123Z`).
pub fn rfc3339_ms(ms: i64) -> String {
    let (secs, milli) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(target_arch = "wasm32")]
pub mod client;
#[cfg(target_arch = "wasm32")]
mod component;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_764_710_597_123), "2025-12-02T21:23:17.123Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn index_names_are_safe() {
        assert_eq!(
            index_name("trellis-logs-{job}", "Build and Test"),
            "trellis-logs-build-and-test"
        );
        assert_eq!(index_name("logs-{job}", "_x/y"), "logs-x-y");
        assert_eq!(index_name("logs-{job}", "___"), "logs-unnamed");
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

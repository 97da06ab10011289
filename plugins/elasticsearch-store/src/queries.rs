//! What the browser asks: searches over one log's event documents, and their hits read
//! back as events.
//!
//! Elasticsearch is near-real-time: a document becomes searchable only after a refresh,
//! so seq 8 may be visible while seq 7 is not yet. A reader that skipped 7 would never
//! see it, so pages are read over the whole log in seq order and end at the first gap
//! ([`Hit`]s are checked by [`contiguous`]); the cursor (the last seq served) then
//! points at the gap, and a later read continues there.

use crate::{Meta, parse_rfc3339_ms};
use serde_json::{Value, json};

/// The filter selecting one log's event documents (not its close document).
fn log_filter(meta: &Meta, step: Option<&str>) -> Value {
    let mut filter = vec![
        json!({ "term": { "trellis.instance_id": meta.instance_id } }),
        json!({ "term": { "trellis.loggable_type": meta.loggable_type } }),
        json!({ "term": { "trellis.loggable_id": meta.loggable_id } }),
        json!({ "exists": { "field": "event.sequence" } }),
    ];
    if let Some(step) = step {
        filter.push(json!({ "term": { "trellis.step_id": step } }));
    }
    json!({ "bool": { "filter": filter } })
}

/// The fields a hit needs (not the metadata, which the caller knows).
const SOURCE: [&str; 5] = [
    "@timestamp",
    "message",
    "event.sequence",
    "trellis.step_id",
    "labels",
];

/// Events after seq `after`, oldest first, `size` of them (`search_after` on the
/// sequence: unique within a log, so the order is total and pages are stable).
pub fn page(meta: &Meta, after: u64, size: u32) -> Value {
    json!({
        "query": log_filter(meta, None),
        "sort": [{ "event.sequence": "asc" }],
        "search_after": [after],
        "size": size,
        "_source": SOURCE,
        "track_total_hits": false,
    })
}

/// The last `count` events (of one step, or all), newest first.
pub fn tail(meta: &Meta, step: Option<&str>, count: u32) -> Value {
    json!({
        "query": log_filter(meta, step),
        "sort": [{ "event.sequence": "desc" }],
        "size": count,
        "_source": SOURCE,
        "track_total_hits": false,
    })
}

/// How many of the log's events (of one step, or all) are visible (`_count` body).
pub fn count(meta: &Meta, step: Option<&str>) -> Value {
    json!({ "query": log_filter(meta, step) })
}

/// One event read back.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub seq: u64,
    pub timestamp_ms: i64,
    pub step: String,
    pub message: String,
    pub labels: Vec<(String, String)>,
}

/// The hits of a `_search` response, in the order given.
pub fn hits(body: &[u8]) -> Result<Vec<Hit>, String> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| format!("the _search response is not JSON: {e}"))?;
    let hits = v["hits"]["hits"]
        .as_array()
        .ok_or("the _search response has no hits.hits")?;
    hits.iter()
        .map(|h| {
            let s = &h["_source"];
            let seq = s["event"]["sequence"]
                .as_u64()
                .ok_or_else(|| format!("document {} has no event.sequence", h["_id"]))?;
            let ts = s["@timestamp"].as_str().unwrap_or_default();
            let timestamp_ms = parse_rfc3339_ms(ts)
                .ok_or_else(|| format!("document {} has a bad @timestamp {ts:?}", h["_id"]))?;
            let labels = s["labels"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect()
                })
                .unwrap_or_default();
            Ok(Hit {
                seq,
                timestamp_ms,
                step: s["trellis"]["step_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                message: s["message"].as_str().unwrap_or_default().to_string(),
                labels,
            })
        })
        .collect()
}

/// How many of `hits` (sorted by seq) continue `after` without a gap.
pub fn contiguous(after: u64, hits: &[Hit]) -> usize {
    hits.iter()
        .zip(after + 1..)
        .take_while(|(h, want)| h.seq == *want)
        .count()
}

/// The `count` of a `_count` response.
pub fn count_of(body: &[u8]) -> Result<u64, String> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| format!("the _count response is not JSON: {e}"))?;
    v["count"]
        .as_u64()
        .ok_or_else(|| "the _count response has no count".to_string())
}

/// The final count in a close document fetched with `GET _doc` (real-time, unlike
/// search): None when the log is not closed (`found: false`).
pub fn final_count(body: &[u8]) -> Result<Option<u64>, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("the _doc response is not JSON: {e}"))?;
    if v["found"] == json!(false) {
        return Ok(None);
    }
    v["_source"]["trellis"]["final_count"]
        .as_u64()
        .map(Some)
        .ok_or_else(|| "the close document has no trellis.final_count".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta {
            instance_id: "ci".into(),
            loggable_type: "run".into(),
            loggable_id: "r-1".into(),
            job_id: "build".into(),
        }
    }

    #[test]
    fn pages_sort_on_the_sequence_after_the_cursor() {
        let q = page(&meta(), 41, 100);
        assert_eq!(q["search_after"], json!([41]));
        assert_eq!(q["sort"], json!([{ "event.sequence": "asc" }]));
        let filter = q["query"]["bool"]["filter"].as_array().unwrap();
        assert!(filter.contains(&json!({ "term": { "trellis.loggable_id": "r-1" } })));
        assert!(filter.contains(&json!({ "exists": { "field": "event.sequence" } })));
        let t = tail(&meta(), Some("test"), 5);
        assert!(
            t["query"]["bool"]["filter"]
                .as_array()
                .unwrap()
                .contains(&json!({ "term": { "trellis.step_id": "test" } }))
        );
        assert_eq!(t["sort"], json!([{ "event.sequence": "desc" }]));
    }

    #[test]
    fn hits_read_back_as_events_and_stop_at_a_gap() {
        let body = br#"{"hits":{"hits":[
            {"_id":"a","_source":{"@timestamp":"2023-11-14T22:13:20.007Z","message":"one",
              "event":{"sequence":5},"trellis":{"step_id":"build"},"labels":{"stream":"stdout"}}},
            {"_id":"b","_source":{"@timestamp":"2023-11-14T22:13:20.008Z","message":"two",
              "event":{"sequence":6},"trellis":{"step_id":"build"}}},
            {"_id":"c","_source":{"@timestamp":"2023-11-14T22:13:20.009Z","message":"four",
              "event":{"sequence":8},"trellis":{"step_id":"test"}}}]}}"#;
        let h = hits(body).unwrap();
        assert_eq!(h[0].timestamp_ms, 1_700_000_000_007);
        assert_eq!(h[0].labels, [("stream".to_string(), "stdout".to_string())]);
        assert_eq!(h[2].step, "test");
        assert_eq!(contiguous(4, &h), 2, "seq 7 is not visible yet");
        assert_eq!(contiguous(3, &h), 0);
        assert!(hits(br#"{"hits":{"hits":[{"_id":"x","_source":{}}]}}"#).is_err());
    }

    #[test]
    fn the_close_document_gives_the_final_count() {
        assert_eq!(final_count(br#"{"found":false}"#).unwrap(), None);
        assert_eq!(
            final_count(br#"{"found":true,"_source":{"trellis":{"final_count":250}}}"#).unwrap(),
            Some(250)
        );
        assert_eq!(count_of(br#"{"count":12}"#).unwrap(), 12);
    }
}

//! A log browser for what `elasticsearch-logging` wrote (the layout and queries are
//! `elasticsearch-store`'s).
//!
//! * Pages: the log's event documents sorted by `event.sequence` with `search_after`;
//!   the cursor is the last sequence served, as decimal text. Only the contiguous,
//!   visible prefix is served (Elasticsearch shows a document after its next refresh):
//!   a page ends before the first sequence not visible yet, and the next read picks up
//!   there, so a live follow never skips an event.
//! * One step: the same walk over the whole log, keeping that step's events (a step
//!   filter in the query could not see the gaps). It reads up to `STEP_SCAN` events a
//!   request and `MAX_PAGES` requests a call; the cursor says where it got to.
//! * Tail: the newest `count` events (of a step), by sequence, descending.
//! * Completeness: the close document (read with `GET _doc`, which is real-time) holds
//!   the final count; `_count` says how many events are searchable. A closed log is
//!   complete only when every one of them is.

/// Events read per request when serving one step's events.
pub const STEP_SCAN: u32 = 1000;
/// Requests per `read` call at most (the cursor says where a call stopped).
pub const MAX_PAGES: usize = 20;

#[cfg(target_arch = "wasm32")]
mod component {
    use super::{MAX_PAGES, STEP_SCAN};
    use elasticsearch_store::client::{self, call, refused, settings};
    use elasticsearch_store::queries::{self, Hit, contiguous, count_of, final_count, hits};
    use elasticsearch_store::{Meta, index_name};
    use serde_json::Value;
    use trellis_sdk::events::BatchBuilder;
    use trellis_sdk::log_browser::{
        Guest, Lifecycle, LogCompleteness, MissingEvents, Page, PageRequest,
    };
    use trellis_sdk::{Error, EventBatch, LogMetadata};

    struct EsBrowser;

    impl Lifecycle for EsBrowser {
        fn init(config: String) -> Result<(), Error> {
            client::init(&config, "elasticsearch-browser")
        }
    }

    /// The log's identity and its index.
    fn target(log: &LogMetadata) -> Result<(Meta, String), Error> {
        let index = index_name(&settings()?.index, &log.job_id);
        Ok((client::meta(log), index))
    }

    /// `_search` on `index`; an index that does not exist yet holds nothing.
    fn search(index: &str, query: &Value) -> Result<Vec<Hit>, Error> {
        let body = serde_json::to_vec(query).expect("json");
        let r = call(
            "POST",
            &format!("/{index}/_search"),
            "application/json",
            &body,
        )?;
        match r.status {
            200 => hits(&r.body).map_err(Error::retryable),
            404 => Ok(vec![]),
            _ => Err(refused("_search", &r)),
        }
    }

    /// How many of the log's events (of `step`, or all) are searchable now (`_count`).
    fn visible(meta: &Meta, index: &str, step: Option<&str>) -> Result<u64, Error> {
        let body = serde_json::to_vec(&queries::count(meta, step)).expect("json");
        let r = call(
            "POST",
            &format!("/{index}/_count"),
            "application/json",
            &body,
        )?;
        match r.status {
            200 => count_of(&r.body).map_err(Error::retryable),
            404 => Ok(0),
            _ => Err(refused("_count", &r)),
        }
    }

    fn push(out: &mut BatchBuilder, h: &Hit) {
        let labels: Vec<(&str, &str)> = h
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        out.push(h.seq, h.timestamp_ms, &h.step, &h.message, &labels);
    }

    impl Guest for EsBrowser {
        fn read(log: LogMetadata, request: PageRequest) -> Result<Page, Error> {
            let mut pos: u64 = match request.cursor.as_deref() {
                None | Some("") => 0,
                Some(c) => c.parse().map_err(|_| {
                    Error::permanent(format!("`{c}` is not a cursor of this browser"))
                })?,
            };
            let (meta, index) = target(&log)?;
            let limit = request.limit.max(1);
            let step = request.step.as_deref();
            let fetch = if step.is_some() {
                limit.max(STEP_SCAN)
            } else {
                limit
            };
            let mut out = BatchBuilder::new();
            'pages: for _ in 0..MAX_PAGES {
                let hits = search(&index, &queries::page(&meta, pos, fetch))?;
                let visible = contiguous(pos, &hits);
                for h in &hits[..visible] {
                    pos = h.seq;
                    if step.is_none_or(|s| s == h.step) {
                        push(&mut out, h);
                        if out.len() == limit as usize {
                            break 'pages;
                        }
                    }
                }
                if visible < hits.len() || hits.len() < fetch as usize {
                    break; // a gap (not visible yet), or the end of what is stored
                }
            }
            Ok(Page {
                events: out.finish(),
                next: pos.to_string(),
                // One `_count` more per page: what "N of M" needs, for a step too.
                total: Some(visible(&meta, &index, step)?),
            })
        }

        fn tail(log: LogMetadata, step: Option<String>, count: u32) -> Result<EventBatch, Error> {
            let (meta, index) = target(&log)?;
            let mut out = BatchBuilder::new();
            if count > 0 {
                let newest = search(&index, &queries::tail(&meta, step.as_deref(), count))?;
                for h in newest.iter().rev() {
                    push(&mut out, h);
                }
            }
            Ok(out.finish())
        }

        fn completeness(log: LogMetadata) -> Result<LogCompleteness, Error> {
            let (meta, index) = target(&log)?;
            let r = call(
                "GET",
                &format!("/{index}/_doc/{}", meta.doc_id(None)),
                "application/json",
                b"",
            )?;
            let expected = match r.status {
                200 => final_count(&r.body).map_err(Error::permanent)?,
                404 => None, // not closed (or nothing written yet)
                _ => return Err(refused("reading the close document", &r)),
            };
            let Some(expected) = expected else {
                return Ok(LogCompleteness::Open);
            };
            let present = visible(&meta, &index, None)?;
            Ok(if present >= expected {
                LogCompleteness::Complete(expected)
            } else {
                LogCompleteness::Incomplete(MissingEvents { expected, present })
            })
        }
    }

    trellis_sdk::export_log_browser!(EsBrowser);
}

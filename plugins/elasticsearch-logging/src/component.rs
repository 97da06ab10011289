//! The component: writers, the bulk loop with its retries of refused items.

use crate::ITEM_ATTEMPTS;
use elasticsearch_store::client::{self, call, refused};
use elasticsearch_store::documents::{
    bulk_body, bulk_outcome, close_document, document, index_template, template_name,
    template_refusal_hint,
};
use elasticsearch_store::index_name;
use std::cell::Cell;
use trellis_sdk::events::decode;
use trellis_sdk::logging_method::{Guest, GuestWriter, Lifecycle, Side, Writer};
use trellis_sdk::{Error, EventBatch, LogMetadata};

thread_local! {
    /// The index template is installed once per instance.
    static TEMPLATE_DONE: Cell<bool> = const { Cell::new(false) };
}

struct EsLogging;

impl Lifecycle for EsLogging {
    fn init(config: String) -> Result<(), Error> {
        client::init(&config, "elasticsearch-logging")
    }
}

struct EsWriter {
    meta: elasticsearch_store::Meta,
    index: String,
}

impl Guest for EsLogging {
    type Writer = EsWriter;

    /// JEP-212's choice for Elasticsearch: output goes from the agent straight to the
    /// store, never through the controller.
    fn runs_on() -> Side {
        Side::Agent
    }

    fn open(meta: LogMetadata) -> Result<Writer, Error> {
        let s = client::settings()?;
        if !TEMPLATE_DONE.get() {
            let pattern = s.index.replace("{job}", "*");
            let body = serde_json::to_vec(&index_template(&pattern)).expect("json");
            let path = format!("/_index_template/{}", template_name(&pattern));
            let r = call("PUT", &path, "application/json", &body)?;
            if !(200..300).contains(&r.status) {
                if let Some(hint) = template_refusal_hint(r.status, &r.body) {
                    return Err(Error::permanent(format!(
                        "installing the index template: HTTP {}: {hint}",
                        r.status
                    )));
                }
                return Err(refused("installing the index template", &r));
            }
            TEMPLATE_DONE.set(true);
        }
        Ok(Writer::new(EsWriter {
            index: index_name(&s.index, &meta.job_id),
            meta: client::meta(&meta),
        }))
    }
}

impl EsWriter {
    /// Send `items` with `op`, again for the items refused for now, until all are done.
    fn bulk(&self, op: &str, mut items: Vec<(String, serde_json::Value)>) -> Result<(), Error> {
        for attempt in 1..=ITEM_ATTEMPTS {
            let body = bulk_body(&self.index, op, &items);
            let r = call("POST", "/_bulk", "application/x-ndjson", &body)?;
            if r.status != 200 {
                return Err(refused("_bulk", &r));
            }
            let outcome = bulk_outcome(&r.body, items.len()).map_err(Error::retryable)?;
            if !outcome.failed.is_empty() {
                let reasons: Vec<String> = outcome
                    .failed
                    .iter()
                    .take(3)
                    .map(|(i, why)| format!("{}: {why}", items[*i].0))
                    .collect();
                return Err(Error::permanent(format!(
                    "{} of {} documents refused: {}",
                    outcome.failed.len(),
                    items.len(),
                    reasons.join("; ")
                )));
            }
            if outcome.retry.is_empty() {
                return Ok(());
            }
            if attempt == ITEM_ATTEMPTS {
                return Err(Error::retryable(format!(
                    "{} of {} documents still refused (429/5xx) after {ITEM_ATTEMPTS} tries",
                    outcome.retry.len(),
                    items.len()
                )));
            }
            let mut keep = outcome.retry.into_iter().peekable();
            items = items
                .into_iter()
                .enumerate()
                .filter(|(i, _)| keep.next_if_eq(i).is_some())
                .map(|(_, it)| it)
                .collect();
            std::thread::sleep(std::time::Duration::from_millis(50 << attempt));
        }
        Ok(())
    }
}

impl GuestWriter for EsWriter {
    fn write(&self, batch: EventBatch) -> Result<(), Error> {
        let events = decode(&batch).map_err(|e| Error::permanent(e.to_string()))?;
        let items = events
            .iter()
            .map(|e| (self.meta.doc_id(Some(e.seq)), document(&self.meta, e)))
            .collect();
        self.bulk("create", items)
    }

    fn flush(&self) -> Result<(), Error> {
        Ok(())
    }

    fn close(&self, final_count: u64) -> Result<(), Error> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let doc = close_document(&self.meta, final_count, now);
        self.bulk("index", vec![(self.meta.doc_id(None), doc)])
    }
}

trellis_sdk::export_logging_method!(EsLogging);

//! The component: config, HTTP (through the SDK's wasi:http client), retries of items.

use crate::{
    ITEM_ATTEMPTS, Meta, bulk_body, bulk_outcome, close_document, document, index_name,
    index_template,
};
use std::cell::Cell;
use std::sync::OnceLock;
use trellis_sdk::config::Config;
use trellis_sdk::events::decode;
use trellis_sdk::logging_method::{Guest, GuestWriter, Lifecycle, Side, Writer};
use trellis_sdk::{Error, EventBatch, LogMetadata, http, secrets};

struct Settings {
    url: String,
    index: String,
    /// The Authorization header value, if any (read from the secrets store at init).
    auth: Option<String>,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

thread_local! {
    /// The index template is installed once per instance.
    static TEMPLATE_DONE: Cell<bool> = const { Cell::new(false) };
}

fn settings() -> Result<&'static Settings, Error> {
    SETTINGS
        .get()
        .ok_or_else(|| Error::permanent("used before init"))
}

struct EsLogging;

impl Lifecycle for EsLogging {
    fn init(config: String) -> Result<(), Error> {
        let c = Config::parse(&config).map_err(Error::bad_config)?;
        let url = c
            .require_string("url")
            .map_err(Error::bad_config)?
            .trim_end_matches('/')
            .to_string();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(Error::bad_config(format!(
                "config key `url`: `{url}` is not an http:// or https:// URL"
            )));
        }
        let index = c
            .string("index")
            .map_err(Error::bad_config)?
            .unwrap_or("trellis-logs-{job}")
            .to_string();
        let user = c.string("username").map_err(Error::bad_config)?;
        let password = c.string("password-secret").map_err(Error::bad_config)?;
        let api_key = c.string("api-key-secret").map_err(Error::bad_config)?;
        let auth = match (user, password, api_key) {
            (_, _, Some(k)) => Some(format!("ApiKey {}", secrets::get(k)?)),
            (Some(u), Some(p), None) => {
                let pw = secrets::get(p)?;
                Some(format!("Basic {}", base64(format!("{u}:{pw}").as_bytes())))
            }
            (None, None, None) => None,
            _ => {
                return Err(Error::bad_config(
                    "basic auth needs both `username` and `password-secret`",
                ));
            }
        };
        let _ = SETTINGS.set(Settings { url, index, auth });
        Ok(())
    }
}

/// One request; the status and body. Transport failures are `retryable`.
fn call(method: &str, path: &str, ctype: &str, body: &[u8]) -> Result<http::Response, Error> {
    let s = settings()?;
    let mut headers: Vec<(&str, &[u8])> = vec![("content-type", ctype.as_bytes())];
    if let Some(a) = &s.auth {
        headers.push(("authorization", a.as_bytes()));
    }
    http::request(method, &format!("{}{path}", s.url), &headers, body).map_err(|e| {
        if e.contains("HttpRequestDenied") {
            Error::denied(format!(
                "{e}: grant it in [plugins.elasticsearch-logging] http = [\"{}\"]",
                s.url
            ))
        } else {
            Error::retryable(e)
        }
    })
}

/// An HTTP status other than success, as an error of the right kind.
fn refused(what: &str, r: &http::Response) -> Error {
    let body = String::from_utf8_lossy(&r.body);
    let text = format!(
        "{what}: HTTP {}: {}",
        r.status,
        body.chars().take(300).collect::<String>()
    );
    match r.status {
        401 | 403 => Error::denied(text),
        408 | 429 | 500..=599 => Error::retryable(text),
        _ => Error::permanent(text),
    }
}

struct EsWriter {
    meta: Meta,
    index: String,
}

impl Guest for EsLogging {
    type Writer = EsWriter;

    fn runs_on() -> Side {
        Side::Controller
    }

    fn open(meta: LogMetadata) -> Result<Writer, Error> {
        let s = settings()?;
        if !TEMPLATE_DONE.get() {
            let pattern = s.index.replace("{job}", "*");
            let body = serde_json::to_vec(&index_template(&pattern)).expect("json");
            let r = call(
                "PUT",
                "/_index_template/trellis-logs",
                "application/json",
                &body,
            )?;
            if !(200..300).contains(&r.status) {
                return Err(refused("installing the index template", &r));
            }
            TEMPLATE_DONE.set(true);
        }
        Ok(Writer::new(EsWriter {
            index: index_name(&s.index, &meta.job_id),
            meta: Meta {
                instance_id: meta.instance_id,
                loggable_type: meta.loggable_type,
                loggable_id: meta.loggable_id,
                job_id: meta.job_id,
            },
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

fn base64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

trellis_sdk::export_logging_method!(EsLogging);

//! A logging method that writes each event as an Elasticsearch document (the layout is
//! `elasticsearch-store`'s, shared with `elasticsearch-browser`).
//!
//! * One `_bulk` request per batch (NDJSON), each event a `create` with the stable id
//!   `<instance>:<loggable-type>:<loggable-id>:<seq>`: a batch sent again (the host
//!   retries until it is confirmed) creates nothing twice; `409` on an item means "already
//!   there" and counts as done.
//! * Per-item results are read: items refused with 429/503 (or another 5xx) are sent
//!   again, up to `ITEM_ATTEMPTS` times with a growing pause; what still fails makes the
//!   batch `retryable` (the host keeps it); items refused for good (a mapping error, 400)
//!   make it `permanent`, naming the first reasons.
//! * An index template for the index pattern is installed on the first open.
//! * `close` writes one more document, `<...>:close`, with the final count
//!   (`trellis.final_count`): a browser compares it with what the store holds.

/// How often a refused item is sent again within one `write`.
pub const ITEM_ATTEMPTS: u32 = 4;

#[cfg(target_arch = "wasm32")]
mod component;

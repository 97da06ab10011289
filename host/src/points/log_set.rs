//! The logs one daemon writes through its logging methods: the controller for
//! controller-side methods (files), the agent for agent-side ones (JEP-212's choice for
//! Elasticsearch: output goes from the agent straight to the store). Both roles get the
//! same guarantees from here: one durable buffer directory per method
//! (`<state>/log-buffer/<plugin>/`, see `log_buffer.rs`) with its own bound, logs kept
//! open by loggable id, logs an earlier process left owing taken over at start, and a
//! retry every second for logs that owe their plugin something.
//!
//! Each open log has its own lock, and the map of logs is locked only to find one, so a
//! log whose store is down (retrying, or timing out) never holds up another open log's
//! output. Opening a log (a plugin call) is serialized with other openings only.

use crate::points::bindings::logging_method::Side;
use crate::points::bindings::types::LogMetadata;
use crate::points::log_buffer::{self, Budget};
use crate::points::logging::{LogBuffers, LogError, LogWriter, runs_on};
use crate::protocol::OutLine;
use crate::runtime::{Plugin, PluginError};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use trellis_sdk::events::BatchBuilder;

/// Add an output line to a batch as event `seq` (JEP-212's `data`: which stream).
pub fn push_line(b: &mut BatchBuilder, seq: u64, step: &str, l: &OutLine) {
    let stream = if l.stream == "err" {
        "stderr"
    } else {
        "stdout"
    };
    b.push(seq, l.ts_ms, step, &l.text, &[("stream", stream)]);
}

/// How often logs that owe their plugin something are tried again.
pub const RETRY_EVERY: Duration = Duration::from_secs(1);

/// One log being written, and how many events it has so far (its last seq).
pub struct OpenLog {
    pub writer: LogWriter,
    pub events: u64,
}

/// A logging method: the plugin, where it must run, and its durable buffers.
struct Method {
    plugin: Arc<Plugin>,
    side: Side,
    buffers: LogBuffers,
}

pub struct LogSet {
    methods: BTreeMap<String, Method>,
    logs: Mutex<HashMap<String, Arc<Mutex<OpenLog>>>>,
    /// Held while a log is being opened (which calls the plugin, and may wait on its
    /// store), so that two opens of one log cannot race for its buffer file while the
    /// map stays free for every other log.
    opening: Mutex<()>,
}

/// What the caller knows of a log an earlier process left behind.
pub enum LeftBehind {
    /// It is still being written (a run in flight): keep it open with this many events.
    StillWritten(u64),
    /// Nobody writes to it again: close it with the events on file.
    Orphaned,
}

impl std::fmt::Debug for LogSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogSet")
            .field("methods", &self.methods.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl LogSet {
    /// The methods `plugins`, each asked where it runs, with buffers under `dir` bounded
    /// by `limit` bytes each.
    pub async fn new(
        plugins: Vec<Arc<Plugin>>,
        dir: &Path,
        limit: u64,
    ) -> Result<LogSet, PluginError> {
        let mut methods = BTreeMap::new();
        for plugin in plugins {
            let side = runs_on(&plugin).await?;
            let buffers = LogBuffers {
                dir: dir.join(&*plugin.name),
                budget: Budget::new(limit),
            };
            methods.insert(
                plugin.name.to_string(),
                Method {
                    plugin,
                    side,
                    buffers,
                },
            );
        }
        Ok(LogSet {
            methods,
            logs: Mutex::default(),
            opening: Mutex::default(),
        })
    }

    /// Where method `name` runs (None: not one of these methods).
    pub fn side(&self, name: &str) -> Option<Side> {
        self.methods.get(name).map(|m| m.side)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.methods.keys().map(String::as_str)
    }

    /// Whether every method's buffer has room (output may be taken).
    pub fn has_room(&self) -> bool {
        self.methods.values().all(|m| m.buffers.budget.has_room())
    }

    /// Prometheus lines for the buffers: depth and bound per plugin.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        out.push_str("# HELP trellis_log_buffer_bytes Log output on disk waiting for the logging plugin to confirm it.\n# TYPE trellis_log_buffer_bytes gauge\n");
        for (plugin, m) in &self.methods {
            let used = m.buffers.budget.used();
            let _ = writeln!(
                out,
                "trellis_log_buffer_bytes{{plugin=\"{plugin}\"}} {used}"
            );
        }
        out.push_str("# HELP trellis_log_buffer_limit_bytes When a plugin's buffer holds this much, output is held back.\n# TYPE trellis_log_buffer_limit_bytes gauge\n");
        for (plugin, m) in &self.methods {
            let limit = m.buffers.budget.limit;
            let _ = writeln!(
                out,
                "trellis_log_buffer_limit_bytes{{plugin=\"{plugin}\"}} {limit}"
            );
        }
    }

    /// Reopen the logs an earlier process left owing (batches or a close not
    /// confirmed), so the retry delivers them. `left_behind(key)` says whether the log
    /// is still being written; `fallback(key)` describes a buffer written before
    /// buffers described themselves.
    pub async fn take_over(
        &self,
        left_behind: impl Fn(&str) -> LeftBehind,
        fallback: impl Fn(&str) -> Option<LogMetadata>,
    ) -> anyhow::Result<()> {
        for m in self.methods.values() {
            let keys = log_buffer::leftovers(&m.buffers.dir).map_err(|e| {
                anyhow::anyhow!(
                    "cannot read the log buffers in {}: {e}",
                    m.buffers.dir.display()
                )
            })?;
            for key in keys {
                let taken =
                    LogWriter::take_over(m.plugin.clone(), &key, &m.buffers, || fallback(&key))
                        .await;
                let (writer, last_seq) = match taken {
                    Ok(Some(t)) => t,
                    Ok(None) => {
                        tracing::error!(log = key, dir = %m.buffers.dir.display(), "a log buffer that says nothing of its log, left as it is");
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(log = key, "cannot take over the log's buffer: {e}");
                        continue;
                    }
                };
                let state = left_behind(&key);
                if !writer.owes() && last_seq == 0 && matches!(state, LeftBehind::Orphaned) {
                    // Opened by a late message after its close: nothing to deliver, ever.
                    if let Err(e) = writer.discard_idle() {
                        tracing::warn!(log = key, "cannot remove an empty log buffer: {e}");
                    }
                    continue;
                }
                tracing::info!(
                    log = key,
                    batches = writer.pending_batches(),
                    "log events an earlier process had not delivered: delivering them"
                );
                let closing = writer.is_closing();
                let events = match state {
                    LeftBehind::StillWritten(n) => n.max(last_seq),
                    LeftBehind::Orphaned => last_seq,
                };
                let log = Arc::new(Mutex::new(OpenLog { writer, events }));
                self.logs.lock().await.insert(key.clone(), log.clone());
                if matches!(state, LeftBehind::Orphaned) && !closing {
                    // Its writer died with the earlier process: close it with what it had.
                    tracing::warn!(log = key, events, "closing a log whose writer is gone");
                    self.close(&key, events).await;
                }
            }
        }
        Ok(())
    }

    /// `key`'s open log, if it is open.
    pub async fn get(&self, key: &str) -> Option<Arc<Mutex<OpenLog>>> {
        self.logs.lock().await.get(key).cloned()
    }

    /// `key`'s open log, opened now if it is not, through method `method`, described by
    /// `meta`, with `events` so far.
    pub async fn open(
        &self,
        key: &str,
        method: &str,
        meta: impl FnOnce() -> (LogMetadata, u64),
    ) -> Result<Arc<Mutex<OpenLog>>, LogError> {
        if let Some(log) = self.get(key).await {
            return Ok(log);
        }
        let _opening = self.opening.lock().await;
        if let Some(log) = self.get(key).await {
            return Ok(log); // opened meanwhile
        }
        let Some(m) = self.methods.get(method) else {
            return Err(LogError::Unknown(method.to_string()));
        };
        let (meta, events) = meta();
        let writer = LogWriter::open_buffered(m.plugin.clone(), meta, &m.buffers).await?;
        let log = Arc::new(Mutex::new(OpenLog { writer, events }));
        self.logs.lock().await.insert(key.to_string(), log.clone());
        Ok(log)
    }

    /// Close `key`'s open log with `count` events. On success it is forgotten; if the
    /// plugin fails, the close is on disk and the retry finishes it.
    pub async fn close(&self, key: &str, count: u64) {
        let Some(log) = self.get(key).await else {
            return;
        };
        let closed = log.lock().await.writer.close(count).await;
        match closed {
            Ok(()) => self.forget(key, &log).await,
            Err(e) => tracing::warn!(log = key, "closing the log failed, kept for retry: {e}"),
        }
    }

    async fn forget(&self, key: &str, log: &Arc<Mutex<OpenLog>>) {
        let mut logs = self.logs.lock().await;
        if logs.get(key).is_some_and(|l| Arc::ptr_eq(l, log)) {
            logs.remove(key);
        }
    }

    /// Try once more every log that owes its plugin something; a log whose close went
    /// through is done.
    pub async fn retry_owing(&self) {
        let all: Vec<(String, Arc<Mutex<OpenLog>>)> = self
            .logs
            .lock()
            .await
            .iter()
            .map(|(k, l)| (k.clone(), l.clone()))
            .collect();
        for (key, log) in all {
            let mut l = log.lock().await;
            if !l.writer.owes() {
                continue;
            }
            let closing = l.writer.is_closing();
            match l.writer.retry().await {
                Ok(()) if closing => {
                    drop(l);
                    tracing::info!(log = key, "the log is delivered and closed");
                    self.forget(&key, &log).await;
                }
                Ok(()) => {}
                Err(e) => tracing::debug!(log = key, "log delivery still failing: {e}"),
            }
        }
    }

    /// Retry every [`RETRY_EVERY`], for as long as the set lives.
    pub async fn retry_forever(self: Arc<Self>) {
        loop {
            tokio::time::sleep(RETRY_EVERY).await;
            self.retry_owing().await;
        }
    }
}

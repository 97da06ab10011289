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
//! output. Opening a log (a plugin call) is serialized only with other openings of the
//! same log, so a logging method that is slow to open never holds up another method,
//! nor another log of its own.
//!
//! A close the plugin does not confirm is retried for `close_retry_for` (default
//! [`DEFAULT_CLOSE_RETRY_FOR`], `[runtime] log-close-retry-for`); then the log is closed
//! incomplete: its instance is released, what it still owes stays in the durable
//! buffer, and the note goes to the daemon's log and to `on_incomplete` (the
//! controller writes it into the run record).

use crate::points::log_buffer::{self, Budget};
use crate::points::logging::{Closed, LogBuffers, LogError, LogWriter, runs_on};
use crate::protocol::OutLine;
use crate::runtime::{Plugin, PluginError};
use crate::wit::logging_method::Side;
use crate::wit::types::LogMetadata;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
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

/// How long a close the plugin does not confirm is retried before the log is closed
/// incomplete (`[runtime] log-close-retry-for`).
pub const DEFAULT_CLOSE_RETRY_FOR: Duration = Duration::from_secs(600);

/// Told of each log closed incomplete: its key (the run id) and the note.
pub type IncompleteNotice = Box<dyn Fn(&str, &str) + Send + Sync>;

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
    /// One lock per log being opened (which calls the plugin, and may wait on its
    /// store), so that two opens of one log cannot race for its buffer file while
    /// every other log, of this method or another, opens freely.
    opening: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Milliseconds a close is retried before the log is closed incomplete.
    close_retry_ms: AtomicU64,
    on_incomplete: std::sync::OnceLock<IncompleteNotice>,
    /// Logs closed incomplete by this process (for `/metrics`).
    closed_incomplete: AtomicU64,
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
            opening: Default::default(),
            close_retry_ms: AtomicU64::new(DEFAULT_CLOSE_RETRY_FOR.as_millis() as u64),
            on_incomplete: Default::default(),
            closed_incomplete: AtomicU64::new(0),
        })
    }

    /// Retry a close the plugin does not confirm for `d` before closing the log
    /// incomplete (default [`DEFAULT_CLOSE_RETRY_FOR`]).
    pub fn set_close_retry_for(&self, d: Duration) {
        self.close_retry_ms.store(d.as_millis() as u64, Relaxed);
    }

    fn close_retry_for(&self) -> Duration {
        Duration::from_millis(self.close_retry_ms.load(Relaxed))
    }

    /// Who is told of a log closed incomplete (once; later calls are ignored).
    pub fn on_incomplete(&self, notice: IncompleteNotice) {
        let _ = self.on_incomplete.set(notice);
    }

    /// A log `key` was closed incomplete: say so where the operator looks.
    fn closed_incomplete(&self, key: &str, note: &str) {
        self.closed_incomplete.fetch_add(1, Relaxed);
        tracing::warn!(log = key, "{note}");
        if let Some(notice) = self.on_incomplete.get() {
            notice(key, note);
        }
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
        out.push_str("# HELP trellis_log_held_bytes Log output the disk refused (full), held in memory until it takes it (counted against the buffer's limit, and at most 8 MiB).\n# TYPE trellis_log_held_bytes gauge\n");
        for (plugin, m) in &self.methods {
            let held = m.buffers.budget.held();
            let _ = writeln!(out, "trellis_log_held_bytes{{plugin=\"{plugin}\"}} {held}");
        }
        let _ = writeln!(
            out,
            "# HELP trellis_logs_closed_incomplete_total Logs closed without the plugin's confirmation or with a writer that could not be dropped (see the run's note).\n# TYPE trellis_logs_closed_incomplete_total counter\ntrellis_logs_closed_incomplete_total {}",
            self.closed_incomplete.load(Relaxed)
        );
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
        let lock = self
            .opening
            .lock()
            .unwrap()
            .entry(key.to_string())
            .or_default()
            .clone();
        let opened = {
            let _opening = lock.lock().await;
            self.open_now(key, method, meta).await
        };
        // The last one out removes the log's lock (clones are made under this lock).
        let mut opening = self.opening.lock().unwrap();
        if Arc::strong_count(&lock) == 2 {
            opening.remove(key);
        }
        opened
    }

    async fn open_now(
        &self,
        key: &str,
        method: &str,
        meta: impl FnOnce() -> (LogMetadata, u64),
    ) -> Result<Arc<Mutex<OpenLog>>, LogError> {
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
            Ok(how) => {
                self.forget(key, &log).await;
                if let Closed::Incomplete(note) = how {
                    self.closed_incomplete(key, &note);
                }
            }
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
            // Not while the disk refuses what the log holds in memory: giving up would
            // lose it (the full disk is the host's to fix, not the plugin's).
            if let Some(tried) = l.writer.closing_for()
                && tried >= self.close_retry_for()
                && !l.writer.holds_in_memory()
            {
                // Bounded: the log is closed incomplete and its instance released.
                let note = l.writer.give_up(tried);
                drop(l);
                self.forget(&key, &log).await;
                self.closed_incomplete(&key, &note);
                continue;
            }
            match l.writer.retry().await {
                Ok(Some(how)) => {
                    drop(l);
                    tracing::info!(log = key, "the log is delivered and closed");
                    self.forget(&key, &log).await;
                    if let Closed::Incomplete(note) = how {
                        self.closed_incomplete(&key, &note);
                    }
                }
                Ok(None) => {}
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

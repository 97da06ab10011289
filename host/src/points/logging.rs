//! `logging-method` on the host side. Failure policy: keep and retry — a batch stays
//! with the host until the plugin confirms it; after a failure (an error, a trap, a
//! timeout) the log is reopened on a fresh instance and the unconfirmed batches are sent
//! again, in order. Opened with [`LogWriter::open_buffered`] (as the controller does),
//! every batch and the close are first written to the durable log buffer
//! (`log_buffer.rs`), so they also survive a daemon restart, and a full buffer holds the
//! output back instead of dropping it. [`LogWriter::open`] keeps them in memory only.
//!
//! A full disk: a batch (or the close) the buffer cannot take is held in memory behind
//! the buffered ones, charged to the plugin's [`Budget`] as held (against the same
//! bound, and at most `log_buffer::HELD_MAX`: past it the controller takes no more
//! output), and appended, oldest first, when the
//! disk takes it again (the retry, or the next write); only then is it delivered, so the
//! buffer's records and `pending` stay paired in order. Even the buffer's file may be
//! opened late this way. What is held only in memory is lost if the process dies first.

use crate::points::log_buffer::{Budget, LogBuffer};
use crate::runtime::{Instance, Plugin, PluginError};
use crate::wit::logging_method::Side;
use crate::wit::types::LogMetadata;
use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::component::ResourceAny;

pub use crate::wit::logging_method::Side as RunsOn;

/// Where a logging method runs (asked of the plugin once, on a fresh instance).
pub async fn runs_on(plugin: &Plugin) -> Result<Side, PluginError> {
    let mut inst = plugin.checkout().await?;
    let guest = inst
        .exports
        .logging
        .clone()
        .ok_or_else(|| plugin.not_implemented("logging-method"))?;
    let side = crate::guarded!(*plugin, &mut inst, "runs-on", |store| guest.runs_on(store))?;
    plugin.checkin(inst);
    Ok(side)
}

/// One log being written through a logging-method plugin.
pub struct LogWriter {
    plugin: Arc<Plugin>,
    meta: LogMetadata,
    open: Option<(Instance, ResourceAny)>,
    /// Batches accepted but not confirmed; shared (not copied) with the call in flight.
    pending: VecDeque<Arc<Vec<u8>>>,
    /// The durable copy of `pending` (and of the close), when opened buffered.
    buffer: Option<LogBuffer>,
    /// The log was closed with this count, and the plugin has not confirmed the close.
    closing: Option<u64>,
    /// Buffered, batches the buffer refused (a full disk), oldest first, all newer than
    /// `pending`: held in memory until the buffer takes them (see the module doc).
    held: VecDeque<Arc<Vec<u8>>>,
    /// The close is owed but not yet in the buffer (the disk refused it).
    close_held: bool,
    /// The buffer's file could not even be created (a full disk): it is opened here
    /// before anything held is appended.
    buffer_to_open: Option<LogBuffers>,
    /// The plugin's budget, charged with what is held (buffered only).
    budget: Option<Arc<Budget>>,
    /// Holding was logged (once per log).
    warned_held: bool,
    /// When this process first tried to close the log (bounds the retries).
    closing_since: Option<Instant>,
}

/// How a log ended once its close went through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// The plugin confirmed the close and its writer was dropped.
    Complete,
    /// The log was closed without the plugin's whole cooperation; the note says what
    /// happened and what may be missing (it goes to the run record and the daemon log).
    Incomplete(String),
}

/// Where the durable log buffers of one logging plugin live, and their shared bound.
#[derive(Debug, Clone)]
pub struct LogBuffers {
    pub dir: std::path::PathBuf,
    pub budget: Arc<Budget>,
}

/// A write that did not reach the plugin (the events are kept) or, buffered, could not
/// be made durable (the events were not accepted: the caller must not acknowledge them).
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error(
        "the durable log buffer cannot be written ({0}): the output is held back until it can; check the state directory's disk"
    )]
    Buffer(#[from] std::io::Error),
    #[error("a log buffer left without a description of its log")]
    Undescribed,
    #[error("logging method `{0}` is not loaded here: add it to this daemon's logging-methods")]
    Unknown(String),
}

/// A log's description as the buffer keeps it (JSON, field names as in the WIT).
fn encode_meta(m: &LogMetadata) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "instance-id": m.instance_id,
        "loggable-type": m.loggable_type,
        "loggable-id": m.loggable_id,
        "job-id": m.job_id,
    }))
    .expect("strings serialize")
}

fn decode_meta(bytes: &[u8]) -> Option<LogMetadata> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let field = |k: &str| v.get(k)?.as_str().map(str::to_string);
    Some(LogMetadata {
        instance_id: field("instance-id")?,
        loggable_type: field("loggable-type")?,
        loggable_id: field("loggable-id")?,
        job_id: field("job-id")?,
    })
}

impl LogWriter {
    /// Open the log; fails only if the plugin refuses it outright (not retryable).
    /// Unconfirmed batches are kept in memory only: see [`open_buffered`](Self::open_buffered).
    pub async fn open(plugin: Arc<Plugin>, meta: LogMetadata) -> Result<LogWriter, PluginError> {
        let mut w = Self::unopened(plugin, meta)?;
        w.ensure_open().await?;
        Ok(w)
    }

    /// Open the log with its durable buffer in `buffers` (keyed by the loggable id),
    /// taking over whatever an earlier process left there unconfirmed: those batches,
    /// and the close if it had come, are delivered before anything new. A store that is
    /// down is not an error here: the batches wait in the buffer.
    /// A disk too full to create the buffer's file is not an error either: the log's
    /// output is held in memory until the file can be made (see the module doc).
    pub async fn open_buffered(
        plugin: Arc<Plugin>,
        meta: LogMetadata,
        buffers: &LogBuffers,
    ) -> Result<LogWriter, LogError> {
        let key = meta.loggable_id.clone();
        let described = meta.clone();
        match Self::buffered(plugin.clone(), &key, buffers, |_| Some(described)).await {
            Ok((w, _)) => Ok(w),
            Err(LogError::Buffer(e)) if is_disk_full(&e) => {
                let mut w = Self::unopened(plugin, meta)?;
                w.budget = Some(buffers.budget.clone());
                w.buffer_to_open = Some(buffers.clone());
                w.warn_held(&e);
                w.open_or_wait().await?;
                Ok(w)
            }
            Err(e) => Err(e),
        }
    }

    /// Reopen log `key` as an earlier process left it in `buffers`, described by what
    /// it wrote there (or, for a buffer from before descriptions, by `fallback`).
    /// Also returns the highest seq on file. `None` if there is no description at all.
    pub async fn take_over(
        plugin: Arc<Plugin>,
        key: &str,
        buffers: &LogBuffers,
        fallback: impl FnOnce() -> Option<LogMetadata>,
    ) -> Result<Option<(LogWriter, u64)>, LogError> {
        let found = Self::buffered(plugin, key, buffers, |described| {
            described.or_else(fallback)
        })
        .await;
        match found {
            Err(LogError::Undescribed) => Ok(None),
            other => other.map(Some),
        }
    }

    async fn buffered(
        plugin: Arc<Plugin>,
        key: &str,
        buffers: &LogBuffers,
        meta: impl FnOnce(Option<LogMetadata>) -> Option<LogMetadata>,
    ) -> Result<(LogWriter, u64), LogError> {
        let (mut buffer, owed) = LogBuffer::open(&buffers.dir, key, buffers.budget.clone())?;
        let described = owed.meta.as_deref().and_then(decode_meta);
        let had_description = described.is_some();
        let meta = meta(described).ok_or(LogError::Undescribed)?;
        if !had_description {
            buffer.describe(&encode_meta(&meta))?;
        }
        let mut w = Self::unopened(plugin, meta)?;
        w.pending = owed.batches.into();
        w.closing = owed.closed;
        w.closing_since = owed.closed.map(|_| Instant::now());
        w.buffer = Some(buffer);
        w.budget = Some(buffers.budget.clone());
        w.open_or_wait().await?;
        Ok((w, owed.last_seq))
    }

    /// Open the log in the plugin; a retryable failure only waits (the events are kept).
    async fn open_or_wait(&mut self) -> Result<(), LogError> {
        if let Err(e) = self.ensure_open().await {
            if !e.is_retryable() {
                return Err(e.into());
            }
            tracing::warn!(log = %self.meta.loggable_id, "the logging plugin cannot open the log yet; its events wait in the buffer: {e}");
        }
        Ok(())
    }

    fn unopened(plugin: Arc<Plugin>, meta: LogMetadata) -> Result<LogWriter, PluginError> {
        if !plugin
            .info
            .points()
            .contains(&crate::points::Point::LoggingMethod)
        {
            return Err(plugin.not_implemented("logging-method"));
        }
        Ok(LogWriter {
            plugin,
            meta,
            open: None,
            pending: VecDeque::new(),
            buffer: None,
            closing: None,
            closing_since: None,
            held: VecDeque::new(),
            close_held: false,
            buffer_to_open: None,
            budget: None,
            warned_held: false,
        })
    }

    async fn ensure_open(&mut self) -> Result<(), PluginError> {
        if self.open.as_ref().is_some_and(|(i, _)| !i.is_poisoned()) {
            return Ok(());
        }
        self.open = None;
        let p = &self.plugin;
        let mut inst = p.instantiate().await?;
        let guest = inst
            .exports
            .logging
            .clone()
            .ok_or_else(|| p.not_implemented("logging-method"))?;
        let meta = self.meta.clone();
        let r = crate::guarded!(p, &mut inst, "open", |store| guest.open(store, &meta))?;
        let writer = p.answer("open", r)?;
        self.open = Some((inst, writer));
        Ok(())
    }

    /// Queue a batch and try to deliver everything queued. On a plugin error the
    /// batches stay queued (`LogError::Plugin`: they are safe; call `retry` later).
    /// Buffered, the batch is on disk before this returns, or, if the disk refuses it,
    /// held in memory (logged once per log) until `retry` gets it there. This never
    /// waits for room: the caller stops taking output while `Budget::has_room` is false
    /// (the controller's link loop does), so the bound is passed by at most what it
    /// already took.
    pub async fn write(&mut self, batch: Vec<u8>) -> Result<(), LogError> {
        let batch = Arc::new(batch);
        if !self.is_buffered() {
            self.pending.push_back(batch);
            return self.deliver().await;
        }
        self.hold(batch);
        if let Err(e) = self.flush_held() {
            self.warn_held(&e);
        }
        self.deliver().await
    }

    /// Try again what is owed: what is held onto the disk, the pending batches, then
    /// the close if it came (and then how the log ended).
    pub async fn retry(&mut self) -> Result<Option<Closed>, LogError> {
        match self.closing {
            Some(count) => self.close(count).await.map(Some),
            None => {
                let flushed = self.flush_held();
                self.deliver().await?;
                Ok(flushed.map(|()| None)?)
            }
        }
    }

    fn is_buffered(&self) -> bool {
        self.buffer.is_some() || self.buffer_to_open.is_some()
    }

    /// Hold `batch` in memory behind everything else, charged to the budget.
    fn hold(&mut self, batch: Arc<Vec<u8>>) {
        if let Some(b) = &self.budget {
            b.hold(batch.len() as u64);
        }
        self.held.push_back(batch);
    }

    /// Append what is held to the buffer, oldest first (creating the buffer's file
    /// first if that failed before), then the close if it is held; each batch joins
    /// `pending` once it is on disk. Stops at the first refusal: the rest stays held.
    fn flush_held(&mut self) -> io::Result<()> {
        if let Some(buffers) = &self.buffer_to_open {
            let (mut buffer, owed) =
                LogBuffer::open(&buffers.dir, &self.meta.loggable_id, buffers.budget.clone())?;
            if owed.meta.is_none() {
                buffer.describe(&encode_meta(&self.meta))?;
            }
            // Nothing was pending (there was no buffer): what an earlier process left
            // in the file, if anything, is older than what is held.
            self.pending = owed.batches.into();
            if self.closing.is_none() {
                self.closing = owed.closed;
            }
            self.buffer = Some(buffer);
            self.buffer_to_open = None;
        }
        let Some(buffer) = self.buffer.as_mut() else {
            return Ok(());
        };
        while let Some(batch) = self.held.front() {
            buffer.append(batch)?;
            let batch = self.held.pop_front().expect("front exists");
            if let Some(b) = &self.budget {
                b.release(batch.len() as u64);
            }
            self.pending.push_back(batch);
        }
        if self.close_held
            && let Some(count) = self.closing
        {
            buffer.append_close(count)?;
            self.close_held = false;
        }
        Ok(())
    }

    /// The disk refused what the log must keep: say so once per log.
    fn warn_held(&mut self, e: &io::Error) {
        if !self.warned_held {
            self.warned_held = true;
            tracing::warn!(log = %self.meta.loggable_id, "the durable log buffer cannot be written ({e}): the log's output is held in memory until the state directory's disk takes it (lost if this process dies first); output is held back once the log buffer's bound is reached");
        }
    }

    /// Whether something of the log is only in memory (the disk refused it).
    pub fn holds_in_memory(&self) -> bool {
        !self.held.is_empty() || self.close_held || self.buffer_to_open.is_some()
    }

    /// Forget what is held in memory (giving up): its charge goes back. How many
    /// batches were held.
    fn drop_held(&mut self) -> usize {
        let n = self.held.len();
        if let Some(b) = &self.budget {
            b.release(self.held.iter().map(|h| h.len() as u64).sum());
        }
        self.held.clear();
        self.close_held = false;
        n
    }

    /// How long this process has been trying to close the log (None: not closing).
    pub fn closing_for(&self) -> Option<Duration> {
        self.closing_since.map(|t| t.elapsed())
    }

    /// Stop trying to close the log: its instance is released (dropped without calling
    /// into the guest again), and whatever is still owed stays in the durable buffer on
    /// disk (a later process delivers it). Returns the note saying so.
    /// The writer owes nothing afterwards (it is done with).
    pub fn give_up(&mut self, tried_for: Duration) -> String {
        self.open = None;
        let lost = match self.drop_held() {
            0 => String::new(),
            n => format!("; {n} batch(es) held in memory (the disk refused them) were lost"),
        };
        self.buffer_to_open = None;
        let owed = self.pending.len();
        let kept = if self.buffer.is_some() {
            format!("; {owed} undelivered batch(es) and the close stay in the durable log buffer")
        } else if owed > 0 {
            format!("; {owed} undelivered batch(es) were lost (no durable buffer)")
        } else {
            String::new()
        };
        // Dropping the buffer keeps its files (see `LogBuffer`'s drop).
        self.buffer = None;
        self.pending.clear();
        self.closing = None;
        self.closing_since = None;
        format!(
            "log closed incomplete: logging method `{}` did not confirm the close after {}s of retries{kept}{lost}",
            self.plugin.name,
            tried_for.as_secs()
        )
    }

    /// A log that owes nothing is no longer needed: its (empty) buffer files go.
    pub fn discard_idle(mut self) -> std::io::Result<()> {
        debug_assert!(!self.owes());
        match self.buffer.take() {
            Some(b) => b.finish(),
            None => Ok(()),
        }
    }

    /// Whether the log was closed and the plugin has not confirmed it yet.
    pub fn is_closing(&self) -> bool {
        self.closing.is_some()
    }

    /// Whether anything is owed to the plugin (batches, buffered or held, or a close).
    pub fn owes(&self) -> bool {
        !self.pending.is_empty() || !self.held.is_empty() || self.closing.is_some()
    }

    /// Send every queued batch, oldest first, stopping at the first failure.
    pub async fn deliver(&mut self) -> Result<(), LogError> {
        Ok(self.deliver_pending().await?)
    }

    async fn deliver_pending(&mut self) -> Result<(), PluginError> {
        while let Some(batch) = self.pending.front().cloned() {
            self.ensure_open().await?;
            let (inst, writer) = self.open.as_mut().expect("opened above");
            let guest = inst.exports.logging.clone().expect("checked at open");
            let writer = *writer;
            let r = crate::guarded!(*self.plugin, inst, "write", |store| guest.write(
                store,
                writer,
                batch.as_ref()
            ));
            match r.and_then(|r| self.plugin.answer("write", r)) {
                Ok(()) => {
                    self.pending.pop_front();
                    if let Some(b) = &mut self.buffer
                        && let Err(e) = b.confirm_oldest()
                    {
                        // Only the record of the confirmation is lost: the batch would
                        // be delivered once more after a restart (ids make that harmless).
                        tracing::warn!(log = %self.meta.loggable_id, "cannot record a confirmed log batch: {e}");
                    }
                }
                Err(e) => {
                    if e.kind().is_some() && !e.is_retryable() {
                        // A permanent refusal of this batch: drop the writer, keep the batch
                        // (the host does not lose events; an operator sees the error).
                        self.open = None;
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Deliver what is queued, then record the final count. Buffered, the close is on
    /// disk first, after everything held; if the disk refuses it, or the plugin fails,
    /// it stays owed (`retry`).
    pub async fn close(&mut self, final_count: u64) -> Result<Closed, LogError> {
        if self.closing.is_none() {
            self.closing = Some(final_count);
            self.close_held = self.is_buffered();
        }
        self.closing_since.get_or_insert_with(Instant::now);
        let flushed = self.flush_held();
        self.deliver_pending().await?;
        if let Err(e) = flushed {
            self.warn_held(&e);
            return Err(e.into());
        }
        self.ensure_open().await?;
        let (mut inst, writer) = self.open.take().expect("opened above");
        let guest = inst.exports.logging.clone().expect("checked at open");
        let r = crate::guarded!(*self.plugin, &mut inst, "close", |store| guest.close(
            store,
            writer,
            final_count
        ));
        match r.and_then(|r| self.plugin.answer("close", r)) {
            Ok(()) => {
                // The writer's destructor is guest code too: guarded, and an instance
                // whose destructor failed is discarded, never pooled.
                let dropped = self
                    .plugin
                    .drop_resource(&mut inst, "drop-writer", writer)
                    .await;
                self.closing = None;
                self.closing_since = None;
                // The plugin confirmed every batch and the close: nothing is owed.
                if let Some(b) = self.buffer.take() {
                    b.finish()?;
                }
                match dropped {
                    Ok(()) => {
                        self.plugin.checkin(inst);
                        Ok(Closed::Complete)
                    }
                    Err(e) => Ok(Closed::Incomplete(format!(
                        "log closed incomplete: logging method `{}` confirmed the close, but its writer could not be dropped ({e}); what the writer still held at the drop may be missing from the store",
                        self.plugin.name
                    ))),
                }
            }
            Err(e) => {
                if !inst.is_poisoned() {
                    self.open = Some((inst, writer));
                }
                Err(e.into())
            }
        }
    }

    /// Batches accepted by the host but not yet confirmed by the plugin.
    pub fn pending_batches(&self) -> usize {
        self.pending.len() + self.held.len()
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        // What is held is this process's accounting: the budget must not keep counting it.
        self.drop_held();
    }
}

/// Whether an error means the disk is full (or over quota): then a log's buffer file is
/// created later rather than the log refused.
fn is_disk_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

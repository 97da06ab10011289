//! `logging-method` on the host side. Failure policy: keep and retry — a batch stays
//! with the host until the plugin confirms it; after a failure (an error, a trap, a
//! timeout) the log is reopened on a fresh instance and the unconfirmed batches are sent
//! again, in order. Batches are kept in memory here; the durable write-ahead buffer in
//! front of this (issue 6) makes them survive a daemon restart too.

use crate::points::bindings::logging_method::Side;
use crate::points::bindings::types::LogMetadata;
use crate::runtime::{Instance, Plugin, PluginError};
use std::collections::VecDeque;
use std::sync::Arc;
use wasmtime::component::ResourceAny;

pub use crate::points::bindings::logging_method::Side as RunsOn;

/// Where a logging method runs (asked of the plugin once, on a fresh instance).
pub async fn runs_on(plugin: &Plugin) -> Result<Side, PluginError> {
    let mut inst = plugin.checkout().await?;
    let guest = inst
        .exports
        .logging
        .clone()
        .ok_or_else(|| plugin.not_implemented("logging-method"))?;
    let side = crate::guarded!(*plugin, &mut inst, "runs-on", |store| guest
        .call_runs_on(store))?;
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
}

impl LogWriter {
    /// Open the log; fails only if the plugin refuses it outright (not retryable).
    pub async fn open(plugin: Arc<Plugin>, meta: LogMetadata) -> Result<LogWriter, PluginError> {
        if !plugin
            .info
            .points()
            .contains(&crate::points::Point::LoggingMethod)
        {
            return Err(plugin.not_implemented("logging-method"));
        }
        let mut w = LogWriter {
            plugin,
            meta,
            open: None,
            pending: VecDeque::new(),
        };
        w.ensure_open().await?;
        Ok(w)
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
        let r = crate::guarded!(p, &mut inst, "open", |store| guest.call_open(store, &meta))?;
        let writer = p.answer("open", r)?;
        self.open = Some((inst, writer));
        Ok(())
    }

    /// Queue a batch and try to deliver everything queued. On error the batches stay
    /// queued; call `deliver` (or `write`, or `close`) again later.
    pub async fn write(&mut self, batch: Vec<u8>) -> Result<(), PluginError> {
        self.pending.push_back(Arc::new(batch));
        self.deliver().await
    }

    /// Send every queued batch, oldest first, stopping at the first failure.
    pub async fn deliver(&mut self) -> Result<(), PluginError> {
        while let Some(batch) = self.pending.front().cloned() {
            self.ensure_open().await?;
            let (inst, writer) = self.open.as_mut().expect("opened above");
            let guest = inst.exports.logging.clone().expect("checked at open");
            let writer = *writer;
            let r = crate::guarded!(*self.plugin, inst, "write", |store| guest
                .writer()
                .call_write(store, writer, batch.as_ref()));
            match r.and_then(|r| self.plugin.answer("write", r)) {
                Ok(()) => {
                    self.pending.pop_front();
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

    /// Deliver what is queued, then record the final count.
    pub async fn close(&mut self, final_count: u64) -> Result<(), PluginError> {
        self.deliver().await?;
        self.ensure_open().await?;
        let (mut inst, writer) = self.open.take().expect("opened above");
        let guest = inst.exports.logging.clone().expect("checked at open");
        let r = crate::guarded!(*self.plugin, &mut inst, "close", |store| guest
            .writer()
            .call_close(store, writer, final_count));
        match r.and_then(|r| self.plugin.answer("close", r)) {
            Ok(()) => {
                let _ = writer.resource_drop_async(&mut inst.store).await;
                self.plugin.checkin(inst);
                Ok(())
            }
            Err(e) => {
                if !inst.is_poisoned() {
                    self.open = Some((inst, writer));
                }
                Err(e)
            }
        }
    }

    /// Batches accepted by the host but not yet confirmed by the plugin.
    pub fn pending_batches(&self) -> usize {
        self.pending.len()
    }
}

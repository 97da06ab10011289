//! `trellis:host/log`: a plugin's diagnostics into the host's tracing, tagged with the
//! plugin. Messages are truncated, their control characters escaped, and they count
//! against the plugin's output budget (`runtime/output.rs`, shared with its stdout and
//! stderr and across its instances), so a chatty plugin cannot flood the daemon's log.

use crate::runtime::output::{OutputBudget, OutputRate, Stream, escape_controls};
use crate::runtime::state::InstanceState;
use crate::wit::host_log::{Host, Level};
use std::sync::Arc;

const MAX_MESSAGE: usize = 4096;

/// An instance's way into its plugin's output budget.
#[derive(Debug)]
pub struct LogGate {
    pub budget: Arc<OutputBudget>,
    pub rate: OutputRate,
}

impl Host for InstanceState {
    async fn emit(&mut self, level: Level, message: String) {
        let mut msg = message;
        if msg.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !msg.is_char_boundary(cut) {
                cut -= 1;
            }
            msg.truncate(cut);
            msg.push_str("… [truncated]");
        }
        if !self
            .log
            .budget
            .admit(&self.plugin, Stream::Log, msg.len() + 1, self.log.rate)
        {
            return;
        }
        let msg = escape_controls(&msg);
        let plugin = &*self.plugin;
        match level {
            Level::Trace => tracing::trace!(target: "plugin", plugin = %plugin, "{msg}"),
            Level::Debug => tracing::debug!(target: "plugin", plugin = %plugin, "{msg}"),
            Level::Info => tracing::info!(target: "plugin", plugin = %plugin, "{msg}"),
            Level::Warn => tracing::warn!(target: "plugin", plugin = %plugin, "{msg}"),
            Level::Error => tracing::error!(target: "plugin", plugin = %plugin, "{msg}"),
        }
    }
}

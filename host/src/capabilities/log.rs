//! `trellis:host/log`: a plugin's diagnostics into the host's tracing, tagged with the
//! plugin. Messages are truncated and rate-limited so a chatty plugin cannot flood the
//! daemon's log.

use crate::points::bindings::host_log::{Host, Level};
use crate::runtime::state::InstanceState;
use std::time::Instant;

const MAX_MESSAGE: usize = 4096;
/// Burst size and refill rate (messages per second) of each instance's token bucket.
const BURST: f64 = 200.0;
const PER_SECOND: f64 = 100.0;

#[derive(Debug)]
pub struct LogGate {
    tokens: f64,
    refilled: Instant,
    suppressed: u64,
}

impl Default for LogGate {
    fn default() -> Self {
        LogGate {
            tokens: BURST,
            refilled: Instant::now(),
            suppressed: 0,
        }
    }
}

impl LogGate {
    fn admit(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.refilled).as_secs_f64() * PER_SECOND).min(BURST);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

impl Host for InstanceState {
    async fn emit(&mut self, level: Level, message: String) {
        if !self.log.admit() {
            return;
        }
        if self.log.suppressed > 0 {
            let n = std::mem::take(&mut self.log.suppressed);
            tracing::warn!(plugin = %self.plugin, "suppressed {n} log messages from the plugin (rate limit)");
        }
        let mut msg = message;
        if msg.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !msg.is_char_boundary(cut) {
                cut -= 1;
            }
            msg.truncate(cut);
            msg.push_str("… [truncated]");
        }
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

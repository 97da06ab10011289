//! Per-plugin counters and a latency histogram, kept with atomics (no locks on the call
//! path) and rendered in Prometheus' text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the latency buckets, in microseconds.
const BUCKETS_US: [u64; 12] = [
    10, 50, 100, 500, 1_000, 5_000, 10_000, 50_000, 100_000, 500_000, 1_000_000, 5_000_000,
];

#[derive(Debug, Default)]
pub struct PluginMetrics {
    /// Calls the plugin answered with its own error.
    pub errors: AtomicU64,
    pub traps: AtomicU64,
    pub deadlines: AtomicU64,
    pub memory_limits: AtomicU64,
    pub resource_limits: AtomicU64,
    pub oversized: AtomicU64,
    /// Calls refused because the plugin was quarantined.
    pub quarantine_refusals: AtomicU64,
    pub quarantines: AtomicU64,
    pub instantiations: AtomicU64,
    /// Capability uses refused for lack of a grant (files excepted: WASI refuses those
    /// before the host sees them).
    pub denials: AtomicU64,
    /// Answers refused as invalid (a cursor that does not advance, a page over its
    /// caps, a bad name or count): `PluginError::Invalid`.
    pub invalid_answers: AtomicU64,
    /// The plugin's output budget, with its drop counters.
    pub output: std::sync::Arc<super::output::OutputBudget>,
    /// Fence agents' `ok` that their own `status` did not confirm (points/fence.rs).
    pub unconfirmed_fences: AtomicU64,
    /// Writes refused for passing a directory grant's `quota` (capabilities/quota.rs).
    pub quota_refusals: AtomicU64,
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    latency_sum_us: AtomicU64,
}

impl PluginMetrics {
    pub fn observe(&self, d: Duration) {
        let us = d.as_micros() as u64;
        self.latency_sum_us.fetch_add(us, Relaxed);
        let i = BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Relaxed);
    }

    /// Calls made (the histogram's count: one atomic less on the call path).
    pub fn calls(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }

    pub fn count(&self, e: &super::PluginError) {
        use super::PluginError::*;
        let c = match e {
            Plugin { .. } => &self.errors,
            Trap { .. } | Instantiate { .. } => &self.traps,
            Deadline { .. } => &self.deadlines,
            MemoryLimit { .. } => &self.memory_limits,
            ResourceLimit { .. } => &self.resource_limits,
            Oversized { .. } => &self.oversized,
            Quarantined { .. } => &self.quarantine_refusals,
            Invalid { .. } => &self.invalid_answers,
            // Counted by the plugin's budget, per limit.
            AtBudget { .. } | NotImplemented { .. } => return,
        };
        c.fetch_add(1, Relaxed);
    }

    /// Append this plugin's series to a Prometheus text exposition.
    pub fn render(&self, plugin: &str, out: &mut String) {
        let _ = writeln!(
            out,
            "trellis_plugin_calls_total{{plugin=\"{plugin}\"}} {}",
            self.calls()
        );
        let counters: [(&str, &AtomicU64); 10] = [
            ("errors", &self.errors),
            ("traps", &self.traps),
            ("deadlines", &self.deadlines),
            ("memory_limits", &self.memory_limits),
            ("resource_limits", &self.resource_limits),
            ("oversized", &self.oversized),
            ("quarantine_refusals", &self.quarantine_refusals),
            ("quarantines", &self.quarantines),
            ("instantiations", &self.instantiations),
            ("denials", &self.denials),
        ];
        for (name, v) in counters {
            let _ = writeln!(
                out,
                "trellis_plugin_{name}_total{{plugin=\"{plugin}\"}} {}",
                v.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "trellis_plugin_invalid_answers_total{{plugin=\"{plugin}\"}} {}",
            self.invalid_answers.load(Relaxed)
        );
        for s in super::output::Stream::ALL {
            let stream = s.label();
            let _ = writeln!(
                out,
                "trellis_plugin_output_dropped_lines_total{{plugin=\"{plugin}\",stream=\"{stream}\"}} {}",
                self.output.dropped_lines(s)
            );
            let _ = writeln!(
                out,
                "trellis_plugin_output_dropped_bytes_total{{plugin=\"{plugin}\",stream=\"{stream}\"}} {}",
                self.output.dropped_bytes(s)
            );
        }
        let _ = writeln!(
            out,
            "trellis_plugin_unconfirmed_fences_total{{plugin=\"{plugin}\"}} {}",
            self.unconfirmed_fences.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "trellis_plugin_quota_refusals_total{{plugin=\"{plugin}\"}} {}",
            self.quota_refusals.load(Relaxed)
        );
        let mut cumulative = 0;
        for (i, b) in BUCKETS_US.iter().enumerate() {
            cumulative += self.buckets[i].load(Relaxed);
            let _ = writeln!(
                out,
                "trellis_plugin_call_seconds_bucket{{plugin=\"{plugin}\",le=\"{}\"}} {cumulative}",
                *b as f64 / 1e6
            );
        }
        cumulative += self.buckets[BUCKETS_US.len()].load(Relaxed);
        let _ = writeln!(
            out,
            "trellis_plugin_call_seconds_bucket{{plugin=\"{plugin}\",le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(
            out,
            "trellis_plugin_call_seconds_sum{{plugin=\"{plugin}\"}} {}",
            self.latency_sum_us.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "trellis_plugin_call_seconds_count{{plugin=\"{plugin}\"}} {cumulative}"
        );
    }
}

/// The `# HELP`/`# TYPE` header for the plugin series; write once per exposition.
pub fn render_header(out: &mut String) {
    out.push_str("# HELP trellis_plugin_calls_total Calls into the plugin.\n# TYPE trellis_plugin_calls_total counter\n");
    out.push_str("# HELP trellis_plugin_call_seconds Wall-clock time of calls into the plugin.\n# TYPE trellis_plugin_call_seconds histogram\n");
}

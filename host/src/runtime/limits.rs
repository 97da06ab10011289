//! Per-instance limits and per-plugin budgets, resolved from the operator's defaults and
//! per-plugin overrides.

use crate::config::LimitsConfig;
use crate::runtime::output::OutputRate;
use std::time::Duration;

/// The largest memory cap an operator may set: the size of one pooling-allocator slot.
pub const MAX_MEMORY: u64 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Linear memory cap per instance, in bytes.
    pub memory: u64,
    /// Wall-clock deadline of one call, whether the guest spins (epoch interruption)
    /// or waits in a host call (the call's future is dropped).
    pub call_timeout: Duration,
    /// Largest value one call may return, in bytes.
    pub max_return: u64,
    /// Most entries in the instance's resource table.
    pub max_resources: u32,
    /// Per outgoing HTTP request: connect, first byte, and between bytes.
    pub http_timeout: Duration,
    /// Largest HTTP response body a plugin may read.
    pub http_max_response: u64,
    /// Output budget (stdout, stderr and `log` together, across the plugin's
    /// instances): bytes and lines per second; more is dropped and counted.
    pub output_bytes_per_second: u64,
    pub output_lines_per_second: u64,
    /// Most instances of the plugin alive at once (busy or idle; see `budget.rs`).
    pub max_instances: u32,
    /// Instances of the shared pool kept for this plugin alone.
    pub reserved_instances: u32,
    /// Linear memory of all the plugin's instances together, in bytes.
    pub total_memory: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory: 128 << 20,
            call_timeout: Duration::from_secs(10),
            max_return: 16 << 20,
            max_resources: 1024,
            http_timeout: Duration::from_secs(30),
            http_max_response: 64 << 20,
            output_bytes_per_second: 64 << 10,
            output_lines_per_second: 100,
            max_instances: 64,
            reserved_instances: 4,
            total_memory: 1 << 30,
        }
    }
}

impl Limits {
    /// Defaults, overlaid with the daemon-wide `[runtime.limits]`, then the plugin's own.
    pub fn resolve(global: &LimitsConfig, plugin: &LimitsConfig) -> Limits {
        let mut l = Limits::default();
        for c in [global, plugin] {
            if let Some(v) = c.memory {
                l.memory = v.0;
            }
            if let Some(v) = c.call_timeout {
                l.call_timeout = v.0;
            }
            if let Some(v) = c.max_return {
                l.max_return = v.0;
            }
            if let Some(v) = c.max_resources {
                l.max_resources = v;
            }
            if let Some(v) = c.http_timeout {
                l.http_timeout = v.0;
            }
            if let Some(v) = c.http_max_response {
                l.http_max_response = v.0;
            }
            if let Some(v) = c.output_bytes_per_second {
                l.output_bytes_per_second = v.0;
            }
            if let Some(v) = c.output_lines_per_second {
                l.output_lines_per_second = v;
            }
            if let Some(v) = c.max_instances {
                l.max_instances = v;
            }
            if let Some(v) = c.reserved_instances {
                l.reserved_instances = v;
            }
            if let Some(v) = c.total_memory {
                l.total_memory = v.0;
            }
        }
        l.memory = l.memory.min(MAX_MEMORY);
        l
    }

    /// The output budget's rate.
    pub fn output_rate(&self) -> OutputRate {
        OutputRate {
            bytes_per_second: self.output_bytes_per_second,
            lines_per_second: self.output_lines_per_second,
        }
    }

    /// What is wrong with the limits taken together (each value alone was checked with
    /// the configuration), as (key, problem, fix).
    pub fn problems(&self) -> Vec<(&'static str, String, String)> {
        let mut out = Vec::new();
        if self.reserved_instances > self.max_instances {
            out.push((
                "reserved-instances",
                format!(
                    "{} reserved instances are more than max-instances ({})",
                    self.reserved_instances, self.max_instances
                ),
                "reserve at most max-instances, or raise max-instances".to_string(),
            ));
        }
        if self.total_memory < self.memory {
            out.push((
                "total-memory",
                format!(
                    "{} bytes for all instances together is less than one instance's memory limit ({} bytes)",
                    self.total_memory, self.memory
                ),
                "raise total-memory, or lower memory with it".to_string(),
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ByteSize;

    #[test]
    fn output_budgets_default_and_are_overridden_per_plugin() {
        let global = LimitsConfig {
            output_bytes_per_second: Some(ByteSize(1 << 20)),
            ..Default::default()
        };
        let plugin = LimitsConfig {
            output_lines_per_second: Some(5),
            ..Default::default()
        };
        let d = Limits::resolve(&LimitsConfig::default(), &LimitsConfig::default());
        assert_eq!(
            (d.output_bytes_per_second, d.output_lines_per_second),
            (64 << 10, 100)
        );
        let l = Limits::resolve(&global, &plugin);
        assert_eq!(
            l.output_rate(),
            OutputRate {
                bytes_per_second: 1 << 20,
                lines_per_second: 5
            }
        );
    }
}

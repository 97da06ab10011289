//! Per-instance limits and per-plugin budgets, resolved from the operator's defaults and
//! per-plugin overrides.

use crate::config::LimitsConfig;
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

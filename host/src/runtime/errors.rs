//! What can go wrong when the host uses a plugin, as types the callers act on.

use std::fmt;
use std::time::Duration;

/// The kind of error a plugin itself reported (`trellis:plugin/types.error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Retryable,
    Permanent,
    BadConfig,
    Denied,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Retryable => "retryable",
            ErrorKind::Permanent => "permanent",
            ErrorKind::BadConfig => "bad-config",
            ErrorKind::Denied => "denied",
        })
    }
}

/// A failed use of a plugin. Every variant names the plugin and the call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    /// The plugin answered with an error of its own.
    #[error("plugin `{plugin}` {call}: {kind}: {message}")]
    Plugin {
        plugin: String,
        call: &'static str,
        kind: ErrorKind,
        message: String,
    },

    /// The plugin trapped (panic, unreachable, bad memory access, ...). The instance is
    /// discarded; the next use gets a fresh one.
    #[error("plugin `{plugin}` trapped in {call}: {detail}")]
    Trap {
        plugin: String,
        call: &'static str,
        detail: String,
    },

    /// The call ran past its wall-clock deadline.
    #[error("plugin `{plugin}` {call}: exceeded its {limit:?} call deadline (limits.call-timeout)")]
    Deadline {
        plugin: String,
        call: &'static str,
        limit: Duration,
    },

    /// The instance tried to grow its memory past its cap.
    #[error("plugin `{plugin}` {call}: exceeded its memory limit of {limit} bytes (limits.memory)")]
    MemoryLimit {
        plugin: String,
        call: &'static str,
        limit: u64,
    },

    /// The instance tried to hold more handles than allowed.
    #[error(
        "plugin `{plugin}` {call}: exceeded its resource limit of {limit} handles (limits.max-resources)"
    )]
    ResourceLimit {
        plugin: String,
        call: &'static str,
        limit: u32,
    },

    /// The plugin returned more data than allowed; the value was discarded.
    #[error(
        "plugin `{plugin}` {call}: returned {size} bytes, above its limit of {limit} (limits.max-return)"
    )]
    Oversized {
        plugin: String,
        call: &'static str,
        size: u64,
        limit: u64,
    },

    /// The plugin failed too often in a row; calls are refused until the backoff ends.
    #[error(
        "plugin `{plugin}` is quarantined after {failures} consecutive failures (last: {last}); next try in {retry_in:?}"
    )]
    Quarantined {
        plugin: String,
        failures: u32,
        retry_in: Duration,
        last: String,
    },

    /// The plugin is at one of its budgets, which all its instances share
    /// (`limits.max-instances`, `limits.reserved-instances`, `limits.total-memory`).
    /// Not a crash: the work waits (a log's events in its durable buffer) and is tried
    /// again once an instance of the plugin is dropped.
    #[error(
        "plugin `{plugin}` {call}: at its budget ({key}): {detail}; the work waits and is retried"
    )]
    AtBudget {
        plugin: String,
        call: &'static str,
        key: &'static str,
        detail: String,
    },

    /// The plugin could not be instantiated (missing grant target, bad component, ...).
    #[error("plugin `{plugin}` could not start: {detail}")]
    Instantiate { plugin: String, detail: String },

    /// The plugin answered, but the answer breaks the contract in a way the host must
    /// not act on (a cursor that does not advance, a page over its caps, a name or a
    /// count out of bounds). The answer was discarded.
    #[error("plugin `{plugin}` {call}: invalid answer: {problem}")]
    Invalid {
        plugin: String,
        call: &'static str,
        problem: String,
    },

    /// The plugin does not implement the extension point asked of it.
    #[error("plugin `{plugin}` does not implement {point}")]
    NotImplemented { plugin: String, point: &'static str },
}

impl PluginError {
    /// True for failures of the instance itself (not answers from the plugin): these
    /// count towards quarantine.
    pub fn is_crash(&self) -> bool {
        matches!(
            self,
            PluginError::Trap { .. }
                | PluginError::Deadline { .. }
                | PluginError::MemoryLimit { .. }
                | PluginError::ResourceLimit { .. }
                | PluginError::Oversized { .. }
                | PluginError::Instantiate { .. }
        )
    }

    /// Whether trying the same work again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            PluginError::Plugin { kind, .. } => *kind == ErrorKind::Retryable,
            PluginError::NotImplemented { .. } => false,
            PluginError::Invalid { .. } => false,
            PluginError::Instantiate { .. } => false,
            _ => true,
        }
    }

    /// The plugin-reported kind, if this is a plugin answer.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            PluginError::Plugin { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    /// Short label for metrics and status output.
    pub fn label(&self) -> &'static str {
        match self {
            PluginError::Plugin { .. } => "plugin-error",
            PluginError::Trap { .. } => "trap",
            PluginError::Deadline { .. } => "deadline",
            PluginError::MemoryLimit { .. } => "memory-limit",
            PluginError::ResourceLimit { .. } => "resource-limit",
            PluginError::Oversized { .. } => "oversized",
            PluginError::Quarantined { .. } => "quarantined",
            PluginError::AtBudget { .. } => "budget",
            PluginError::Instantiate { .. } => "instantiate",
            PluginError::NotImplemented { .. } => "not-implemented",
            PluginError::Invalid { .. } => "invalid-answer",
        }
    }
}

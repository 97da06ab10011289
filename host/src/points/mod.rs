//! The four extension points, as the host sees them: what each is, what the host does
//! when a plugin fails there (the failure policy), and a typed adapter per point that
//! callers use instead of raw bindings.

/// A short call on a pooled instance: check one out, take the point's exports (`field`
/// of `Exports`, interface `name`), and make the call under the plugin's guard.
/// Evaluates to `(instance, answer)`; the caller turns the plugin's answer into a result
/// (`Plugin::answer`) and gives the instance back (`Plugin::checkin`) if all went well.
/// Use inside a function returning `Result<_, PluginError>`.
macro_rules! pooled_call {
    ($plugin:expr, $field:ident, $name:literal, $call:literal, |$guest:ident, $store:ident| $fut:expr) => {{
        let p: &$crate::runtime::Plugin = &$plugin;
        let mut inst = p.checkout().await?;
        let $guest = inst
            .exports
            .$field
            .clone()
            .ok_or_else(|| p.not_implemented($name))?;
        let answer = $crate::guarded!(p, &mut inst, $call, |$store| $fut)?;
        (inst, answer)
    }};
}

pub mod browser;
pub mod fence;
pub mod log_buffer;
pub mod log_set;
pub mod logging;
pub mod transport;

use std::fmt;

pub use crate::wit::Point;

impl Point {
    /// What the host does when a plugin at this point fails. Declared here, in one
    /// place, and followed by the point's adapter.
    pub fn failure_policy(self) -> FailurePolicy {
        match self {
            Point::FenceAgent => FailurePolicy::FailClosed,
            Point::LoggingMethod => FailurePolicy::KeepAndRetry,
            Point::LogBrowser => FailurePolicy::ReportUnavailable,
            Point::CommandTransport => FailurePolicy::Reconnect,
        }
    }
}

/// How the host reacts to a failing plugin, per extension point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    /// An error, trap or timeout is never success: "not fenced", so no takeover.
    FailClosed,
    /// Events stay with the host and are delivered again later; the run is not failed
    /// because its log store is down.
    KeepAndRetry,
    /// The reader gets a clear "log store unavailable" error; nothing is invented.
    ReportUnavailable,
    /// The link is re-established on a fresh instance and unacknowledged frames resent.
    Reconnect,
}

impl fmt::Display for FailurePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailurePolicy::FailClosed => "fail closed (an error is never \"fenced\")",
            FailurePolicy::KeepAndRetry => "keep events in the host and retry",
            FailurePolicy::ReportUnavailable => "report the store unavailable",
            FailurePolicy::Reconnect => "reconnect and resend unacknowledged frames",
        })
    }
}

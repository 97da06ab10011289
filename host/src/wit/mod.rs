//! Host-side bindings for the `trellis:plugin` versions the host serves, side by side.
//!
//! The current version (0.3.0, generated from `wit/`) is the host's own vocabulary: every
//! adapter in `points/` speaks its types. Each older version (`v0_1`, `v0_2`, from the
//! frozen `wit/v0.1.0/` and `wit/v0.2.0/`) has its own bindings for its exports, converted into the current types
//! at the boundary; `versioned` picks the right ones per component. The `trellis:host`
//! capabilities and the shared `types` interface did not change, so all versions use one
//! set of those (one implementation of each capability serves every version).
//!
//! One world (`host`) covers every capability and every extension point; a component
//! fills only some points, so exports are looked up per interface (`GuestIndices`),
//! never through the world as a whole.

pub mod v0_1;
pub mod v0_2;
pub mod versioned;

/// The extension points of `trellis:plugin`, one per interface a plugin may export.
/// (What the host does when one fails is the adapters' business: `points::FailurePolicy`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Point {
    CommandTransport,
    LoggingMethod,
    LogBrowser,
    FenceAgent,
}

impl Point {
    pub const ALL: [Point; 4] = [
        Point::CommandTransport,
        Point::LoggingMethod,
        Point::LogBrowser,
        Point::FenceAgent,
    ];

    /// The interface name in `trellis:plugin`.
    pub fn interface(self) -> &'static str {
        match self {
            Point::CommandTransport => "command-transport",
            Point::LoggingMethod => "logging-method",
            Point::LogBrowser => "log-browser",
            Point::FenceAgent => "fence-agent",
        }
    }
}

impl std::fmt::Display for Point {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.interface())
    }
}

wasmtime::component::bindgen!({
    path: "../wit",
    world: "trellis:plugin/host",
    imports: {
        // Its only failure is a full resource table: a trap, like WASI's own subscribes.
        "trellis:host/kafka.[method]consumer.subscribe": async | trappable,
        "trellis:host/kafka.[constructor]producer": async | trappable,
        default: async,
    },
    exports: { default: async },
    with: {
        "trellis:host/kafka.consumer": crate::capabilities::kafka::Consumer,
        "trellis:host/kafka.producer": crate::capabilities::kafka::Producer,
        // A transport's readiness (0.3.0) is a WASI pollable, waited on by the host.
        "wasi:io/poll": wasmtime_wasi::p2::bindings::io::poll,
    },
});

pub use exports::trellis::plugin::{
    command_transport, fence_agent, lifecycle, log_browser, logging_method,
};
pub use trellis::host::{
    exec as host_exec, kafka as host_kafka, log as host_log, secrets as host_secrets,
};
pub use trellis::plugin::types;

//! Host-side bindings for `trellis:plugin@0.1.0`, generated from `wit/`.
//!
//! One world (`host`) covers every capability and every extension point; a component
//! fills only some points, so exports are looked up per interface (`GuestIndices`),
//! never through the world as a whole.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "trellis:plugin/host",
    imports: { default: async },
    exports: { default: async },
    with: {
        "trellis:host/kafka.consumer": crate::capabilities::kafka::Consumer,
    },
});

pub use exports::trellis::plugin::{
    command_transport, fence_agent, lifecycle, log_browser, logging_method,
};
pub use trellis::host::{
    exec as host_exec, kafka as host_kafka, log as host_log, secrets as host_secrets,
};
pub use trellis::plugin::types;

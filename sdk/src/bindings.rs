//! Generated bindings: the shared interfaces once, then one module per world.
//!
//! A component must implement exactly the world it is built for, so enable exactly one
//! world feature per plugin crate, for wasm32 only: cargo unifies features within one
//! build command, so a native workspace build must not see two (the workspace's
//! `cargo xtask bundle` builds each plugin on its own).

#[cfg(any(
    all(
        feature = "command-transport",
        any(
            feature = "logging-method",
            feature = "log-browser",
            feature = "fence-agent",
            feature = "logging-pair"
        )
    ),
    all(
        feature = "logging-method",
        any(
            feature = "log-browser",
            feature = "fence-agent",
            feature = "logging-pair"
        )
    ),
    all(
        feature = "log-browser",
        any(feature = "fence-agent", feature = "logging-pair")
    ),
    all(feature = "fence-agent", feature = "logging-pair"),
))]
compile_error!(
    "trellis-sdk: more than one world feature is enabled. A component implements one world: enable one of \
     command-transport, logging-method, log-browser, fence-agent, logging-pair per plugin, only for \
     wasm32 (`[target.'cfg(target_arch = \"wasm32\")'.dependencies]`), and build plugins one cargo \
     invocation each (cargo xtask bundle does)."
);

/// Types and host capabilities shared by every world (of the current contract, or of
/// 0.2.0 with feature `wit-0-2`, 0.1.0 with `wit-0-1`).
pub mod base {
    #[cfg(not(any(feature = "wit-0-1", feature = "wit-0-2")))]
    wit_bindgen::generate!({
        path: "../wit",
        inline: "
            package trellis:sdk;
            world base {
                import trellis:plugin/types@0.3.0;
                import trellis:host/log@0.1.1;
                import trellis:host/secrets@0.1.1;
                import trellis:host/kafka@0.1.1;
                import trellis:host/exec@0.1.1;
            }
        ",
        world: "trellis:sdk/base",
        // A consumer's readiness (trellis:host 0.1.1) is the `wasi` crate's pollable, the
        // one a 0.3.0 transport's `subscribe` returns.
        with: {
            "wasi:io/poll@0.2.12": wasi::io::poll,
        },
        generate_all,
    });
    #[cfg(feature = "wit-0-2")]
    wit_bindgen::generate!({
        path: "../wit/v0.2.0",
        inline: "
            package trellis:sdk;
            world base {
                import trellis:plugin/types@0.2.0;
                import trellis:host/log@0.1.0;
                import trellis:host/secrets@0.1.0;
                import trellis:host/kafka@0.1.0;
                import trellis:host/exec@0.1.0;
            }
        ",
        world: "trellis:sdk/base",
        generate_all,
    });
    #[cfg(feature = "wit-0-1")]
    wit_bindgen::generate!({
        path: "../wit/v0.1.0",
        inline: "
            package trellis:sdk;
            world base {
                import trellis:plugin/types@0.1.0;
                import trellis:host/log@0.1.0;
                import trellis:host/secrets@0.1.0;
                import trellis:host/kafka@0.1.0;
                import trellis:host/exec@0.1.0;
            }
        ",
        world: "trellis:sdk/base",
        generate_all,
    });
}

pub use base::trellis::plugin::types::{Error, EventBatch, LogMetadata};

impl Error {
    /// Temporary failure: the host retries later.
    pub fn retryable(msg: impl Into<String>) -> Self {
        Error::Retryable(msg.into())
    }
    /// Will fail again the same way: not retried.
    pub fn permanent(msg: impl Into<String>) -> Self {
        Error::Permanent(msg.into())
    }
    /// The configuration is wrong; name the key.
    pub fn bad_config(msg: impl Into<String>) -> Self {
        Error::BadConfig(msg.into())
    }
    /// Something needed was not granted by the operator.
    pub fn denied(msg: impl Into<String>) -> Self {
        Error::Denied(msg.into())
    }

    /// A file-system error, classified for the host: permission problems are `denied`,
    /// bad data or input `permanent`, anything else (disk full, I/O) `retryable`.
    /// `what` says what was being done, e.g. "write".
    pub fn from_io(what: &str, e: &std::io::Error) -> Self {
        let msg = format!("{what}: {e}");
        match e.kind() {
            std::io::ErrorKind::PermissionDenied => Error::Denied(msg),
            std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput => {
                Error::Permanent(msg)
            }
            _ => Error::Retryable(msg),
        }
    }
}

impl LogMetadata {
    /// Borrowed view for the [`crate::events`] helpers.
    pub fn as_meta(&self) -> crate::events::LogMeta<'_> {
        crate::events::LogMeta {
            instance_id: &self.instance_id,
            loggable_type: &self.loggable_type,
            loggable_id: &self.loggable_id,
            job_id: &self.job_id,
        }
    }
}

/// Diagnostics into the host's log, tagged with this plugin's name
/// (capability `log` in plugin.toml).
pub mod log {
    pub use super::base::trellis::host::log::Level;
    use super::base::trellis::host::log::emit;

    pub fn trace(msg: &str) {
        emit(Level::Trace, msg)
    }
    pub fn debug(msg: &str) {
        emit(Level::Debug, msg)
    }
    pub fn info(msg: &str) {
        emit(Level::Info, msg)
    }
    pub fn warn(msg: &str) {
        emit(Level::Warn, msg)
    }
    pub fn error(msg: &str) {
        emit(Level::Error, msg)
    }
}

/// Secrets granted to this plugin (capability `secrets` in plugin.toml).
pub mod secrets {
    pub use super::base::trellis::host::secrets::SecretError;

    /// The secret's value, or a `denied` error naming it when it is not granted or not
    /// in the store. Never log the value.
    pub fn get(name: &str) -> Result<String, super::Error> {
        super::base::trellis::host::secrets::get(name).map_err(|e| match e {
            SecretError::Denied(m) => super::Error::Denied(m),
            SecretError::Missing(m) => super::Error::Denied(m),
        })
    }
}

/// Kafka through the host's client (capability `kafka` in plugin.toml; topics under the
/// prefixes the operator granted). The cluster and its credentials are the host's.
pub mod kafka {
    pub use super::base::trellis::host::kafka::*;

    impl From<KafkaError> for super::Error {
        fn from(e: KafkaError) -> Self {
            match e {
                KafkaError::Denied(m) => super::Error::Denied(m),
                KafkaError::Retryable(m) => super::Error::Retryable(m),
                KafkaError::Permanent(m) => super::Error::Permanent(m),
            }
        }
    }
}

/// Programs the operator allow-listed for this plugin (capability `exec`; fence agents
/// only): `run("volume-status", &[("volume", "gv0")])` fills the template's
/// placeholders; the host runs it without a shell, with a time limit and capped output.
pub mod exec {
    pub use super::base::trellis::host::exec::{ExecError, Output};

    /// Run template `name` with `values` for its `{placeholders}`.
    pub fn run(name: &str, values: &[(&str, &str)]) -> Result<Output, super::Error> {
        let values: Vec<(String, String)> = values
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        super::base::trellis::host::exec::run(name, &values).map_err(|e| match e {
            ExecError::Denied(m) => super::Error::Denied(m),
            ExecError::Failed(m) => super::Error::Retryable(m),
        })
    }
}

macro_rules! world {
    ($feature:literal, $module:ident, $world:literal, $macro_name:literal, $macro:ident, $bindings:literal $(; now $now:literal => $now_path:path)* $(; old $old:literal => $old_path:path)*) => {
        #[cfg(feature = $feature)]
        #[doc(hidden)]
        pub mod $module {
            #[cfg(not(any(feature = "wit-0-1", feature = "wit-0-2")))]
            wit_bindgen::generate!({
                path: "../wit",
                world: $world,
                with: {
                    "trellis:plugin/types@0.3.0": crate::bindings::base::trellis::plugin::types,
                    "trellis:host/log@0.1.1": crate::bindings::base::trellis::host::log,
                    "trellis:host/secrets@0.1.1": crate::bindings::base::trellis::host::secrets,
                    "trellis:host/kafka@0.1.1": crate::bindings::base::trellis::host::kafka,
                    // Readiness (a transport's `subscribe`, a Kafka consumer's): the
                    // `wasi` crate's pollable.
                    "wasi:io/poll@0.2.12": wasi::io::poll,
                    $($now: $now_path,)*
                },
                pub_export_macro: true,
                export_macro_name: $macro_name,
                default_bindings_module: $bindings,
            });
            #[cfg(feature = "wit-0-2")]
            wit_bindgen::generate!({
                path: "../wit/v0.2.0",
                world: $world,
                with: {
                    "trellis:plugin/types@0.2.0": crate::bindings::base::trellis::plugin::types,
                    "trellis:host/log@0.1.0": crate::bindings::base::trellis::host::log,
                    "trellis:host/secrets@0.1.0": crate::bindings::base::trellis::host::secrets,
                    "trellis:host/kafka@0.1.0": crate::bindings::base::trellis::host::kafka,
                    $($old: $old_path,)*
                },
                pub_export_macro: true,
                export_macro_name: $macro_name,
                default_bindings_module: $bindings,
            });
            #[cfg(feature = "wit-0-1")]
            wit_bindgen::generate!({
                path: "../wit/v0.1.0",
                world: $world,
                with: {
                    "trellis:plugin/types@0.1.0": crate::bindings::base::trellis::plugin::types,
                    "trellis:host/log@0.1.0": crate::bindings::base::trellis::host::log,
                    "trellis:host/secrets@0.1.0": crate::bindings::base::trellis::host::secrets,
                    "trellis:host/kafka@0.1.0": crate::bindings::base::trellis::host::kafka,
                    $($old: $old_path,)*
                },
                pub_export_macro: true,
                export_macro_name: $macro_name,
                default_bindings_module: $bindings,
            });
        }
        #[cfg(feature = $feature)]
        pub use $module::$macro;
    };
}

world!(
    "command-transport",
    command_transport_world,
    "trellis:plugin/command-transport-plugin",
    "export_command_transport",
    export_command_transport,
    "trellis_sdk::command_transport_world"
);
world!(
    "logging-method",
    logging_method_world,
    "trellis:plugin/logging-method-plugin",
    "export_logging_method",
    export_logging_method,
    "trellis_sdk::logging_method_world"
);
world!(
    "log-browser",
    log_browser_world,
    "trellis:plugin/log-browser-plugin",
    "export_log_browser",
    export_log_browser,
    "trellis_sdk::log_browser_world"
);
world!(
    "fence-agent",
    fence_agent_world,
    "trellis:plugin/fence-agent-plugin",
    "export_fence_agent",
    export_fence_agent,
    "trellis_sdk::fence_agent_world";
    now "trellis:host/exec@0.1.1" => crate::bindings::base::trellis::host::exec;
    old "trellis:host/exec@0.1.0" => crate::bindings::base::trellis::host::exec
);
world!(
    "logging-pair",
    logging_pair_world,
    "trellis:plugin/logging-pair-plugin",
    "export_logging_pair",
    export_logging_pair,
    "trellis_sdk::logging_pair_world"
);

/// The `command-transport` point: implement [`Guest`](command_transport::Guest) and
/// [`Lifecycle`](command_transport::Lifecycle), then `export_command_transport!(T)`.
#[cfg(feature = "command-transport")]
pub mod command_transport {
    pub use crate::command_transport_world::exports::trellis::plugin::command_transport::*;
    pub use crate::command_transport_world::exports::trellis::plugin::lifecycle::Guest as Lifecycle;
    /// What `subscribe` returns (0.3.0): a `wasi:io/poll` pollable, e.g. a socket
    /// stream's `subscribe()`; `wasi` is re-exported for the rest of WASI.
    #[cfg(not(any(feature = "wit-0-1", feature = "wit-0-2")))]
    pub use wasi::{self, io::poll::Pollable};
}

/// The `logging-method` point: implement [`Guest`](logging_method::Guest) and
/// [`Lifecycle`](logging_method::Lifecycle), then `export_logging_method!(T)`.
#[cfg(feature = "logging-method")]
pub mod logging_method {
    pub use crate::logging_method_world::exports::trellis::plugin::lifecycle::Guest as Lifecycle;
    pub use crate::logging_method_world::exports::trellis::plugin::logging_method::*;
}

/// The `log-browser` point: implement [`Guest`](log_browser::Guest) and
/// [`Lifecycle`](log_browser::Lifecycle), then `export_log_browser!(T)`.
#[cfg(feature = "log-browser")]
pub mod log_browser {
    pub use crate::log_browser_world::exports::trellis::plugin::lifecycle::Guest as Lifecycle;
    pub use crate::log_browser_world::exports::trellis::plugin::log_browser::*;
}

/// The `fence-agent` point: implement [`Guest`](fence_agent::Guest) and
/// [`Lifecycle`](fence_agent::Lifecycle), then `export_fence_agent!(T)`.
#[cfg(feature = "fence-agent")]
pub mod fence_agent {
    pub use crate::fence_agent_world::exports::trellis::plugin::fence_agent::*;
    pub use crate::fence_agent_world::exports::trellis::plugin::lifecycle::Guest as Lifecycle;
}

/// A logging method and its browser in one component: implement both points' traits
/// and `Lifecycle`, then `export_logging_pair!(T)`.
#[cfg(feature = "logging-pair")]
pub mod logging_pair {
    pub use crate::logging_pair_world::exports::trellis::plugin::lifecycle::Guest as Lifecycle;
    pub mod logging_method {
        pub use crate::logging_pair_world::exports::trellis::plugin::logging_method::*;
    }
    pub mod log_browser {
        pub use crate::logging_pair_world::exports::trellis::plugin::log_browser::*;
    }
}

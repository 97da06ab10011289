//! Host capabilities, one module each. Each follows the same three steps (after Spin's
//! factors): *link* its bindings into a plugin's linker only if the manifest declared it
//! (`runtime::linker`), *check* the operator's grants when the plugin is configured
//! (`config` and `runtime::Runtime::load_plugin`), *prepare* per-instance state from the
//! grants when an instance is created (`runtime::state`).

pub mod exec;
pub mod files;
pub mod http;
pub mod kafka;
pub mod log;
pub mod quota;
pub mod secrets;
pub mod sockets;

//! # trellis-sdk
//!
//! What a Trellis plugin author depends on. Pick your extension point with a feature
//! (exactly one world per component):
//!
//! ```toml
//! [dependencies]
//! trellis-sdk = { path = "../../sdk", features = ["logging-method"] }
//! ```
//!
//! then implement the point's `Guest` trait plus [`Lifecycle`] on one type and export it:
//!
//! ```ignore
//! use trellis_sdk::logging_method::{self, Guest, GuestWriter, Side, Writer};
//! use trellis_sdk::{Error, Lifecycle, LogMetadata};
//!
//! struct MyPlugin;
//! impl Lifecycle for MyPlugin { fn init(config: String) -> Result<(), Error> { Ok(()) } }
//! impl Guest for MyPlugin { /* runs_on, open */ }
//! trellis_sdk::export_logging_method!(MyPlugin);
//! ```
//!
//! Build with `cargo build --target wasm32-wasip2 --release`; the `.wasm` is the
//! component. Features: `command-transport`, `logging-method`, `log-browser`,
//! `fence-agent`, `logging-pair` (a logging method and its browser in one component).
//!
//! The bindings are for the current contract, `trellis:plugin@0.3.0` (`wit/`). Add
//! feature `wit-0-2` or `wit-0-1` to build for 0.2.0 or 0.1.0 instead (`wit/v0.2.0/`,
//! `wit/v0.1.0/`): hosts serve all three, so only a plugin that must also load in
//! older hosts needs it (docs/PLUGINS.md, "Versioning"). A 0.3.0 transport returns a
//! `wasi:io/poll` pollable per channel and listener (`subscribe`), the `wasi` crate's.
//!
//! Without features the crate is plain Rust: [`events`] (the packed event batch, JSON
//! lines) and [`config`] helpers work natively too, which is how plugin logic is unit
//! tested and benchmarked against the same code compiled to WebAssembly.

pub mod config;
pub mod events;
pub mod fence_params;
pub mod fs;
#[cfg(all(feature = "http", target_os = "wasi"))]
pub mod http;
pub mod records;

#[cfg(feature = "bindings")]
mod bindings;
#[cfg(feature = "bindings")]
pub use bindings::*;

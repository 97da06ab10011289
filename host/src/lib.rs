//! Trellis: a CI job host whose transport, logging, log browsing and fencing are
//! sandboxed WebAssembly plugins. See docs/ARCHITECTURE.md for the map of this crate.

pub mod agent;
pub mod api;
pub mod capabilities;
pub mod cli;
pub mod config;
pub mod conformance;
pub mod controller;
pub mod ha;
pub mod ids;
pub mod jobs;
pub mod points;
pub mod protocol;
pub mod runtime;
pub mod session;
pub mod wit;

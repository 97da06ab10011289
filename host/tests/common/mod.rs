//! Shared helpers for the integration tests. The wasm components are built by
//! `cargo xtask test`, which passes their directories in the environment.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use trellis::capabilities::secrets::SecretStore;
use trellis::config::DaemonConfig;
use trellis::points::bindings::types::LogMetadata;
use trellis::runtime::Runtime;

fn dir_from_env(var: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(d) => PathBuf::from(d),
        None => panic!(
            "{var} is not set: run the suite with `cargo xtask test`, which builds the WebAssembly components first"
        ),
    }
}

pub fn fixtures() -> PathBuf {
    dir_from_env("TRELLIS_FIXTURES_DIR")
}

pub fn bundle() -> PathBuf {
    dir_from_env("TRELLIS_BUNDLE_DIR")
}

/// A runtime with `config` (TOML, paths relative to `base`) and these secrets.
pub fn runtime(config: &str, base: &Path, secrets: &[(&str, &str)]) -> Arc<Runtime> {
    let cfg = DaemonConfig::parse(config, "test.toml", base)
        .unwrap_or_else(|p| panic!("bad test config: {p}"));
    let store =
        SecretStore::from_pairs(secrets.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Runtime::with_secrets(cfg, store).expect("runtime")
}

pub fn meta(job: &str, loggable: &str) -> LogMetadata {
    LogMetadata {
        instance_id: "test".into(),
        loggable_type: "run".into(),
        loggable_id: loggable.into(),
        job_id: job.into(),
    }
}

/// A packed batch of `n` events starting at seq `from`.
pub fn batch(from: u64, n: u64) -> Vec<u8> {
    let mut b = trellis_sdk::events::BatchBuilder::new();
    for s in from..from + n {
        b.push(
            s,
            1_700_000_000_000 + s as i64,
            "build",
            &format!("line {s}"),
            &[("stream", "stdout")],
        );
    }
    b.finish()
}

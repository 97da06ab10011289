//! `wasi:filesystem`: only granted directories, preopened with their mode. Paths cannot
//! escape a preopen (`..`, absolute paths, symlinks out are refused by wasmtime-wasi's
//! cap-std based implementation); a plugin with no grant sees no filesystem at all.

use crate::capabilities::quota::DirQuota;
use crate::config::DirMode;
use std::path::PathBuf;
use std::sync::Arc;
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

#[derive(Debug, Clone)]
pub struct DirGrant {
    pub host: PathBuf,
    pub guest: String,
    pub mode: DirMode,
    /// The grant's `quota` (capabilities/quota.rs), shared by the plugin's instances.
    pub quota: Option<Arc<DirQuota>>,
}

/// Prepare step: preopen each granted directory.
pub fn prepare(builder: &mut WasiCtxBuilder, grants: &[DirGrant]) -> anyhow::Result<()> {
    for g in grants {
        let perms = match g.mode {
            DirMode::ReadOnly => FsPerms::ReadOnly,
            DirMode::ReadWrite => FsPerms::ReadWrite,
        };
        builder
            .preopened_dir(&g.host, &g.guest, perms)
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot open granted directory {} (as {}): {e}",
                    g.host.display(),
                    g.guest
                )
            })?;
    }
    Ok(())
}

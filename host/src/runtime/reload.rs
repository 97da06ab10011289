//! Hot reload: a plugin's code is replaced in a running daemon. The new code (and the
//! daemon's configuration for it) is prepared and tried on a throwaway canary instance
//! first; only if that starts is it put in place (`Plugin::replace_with`), so a broken
//! build is refused with its problems while the old one keeps serving. Work in flight
//! on the old code (a log being written, a transport link) finishes on it; new work
//! uses the new code.
//!
//! Triggered by `trellis plugin reload NAME` (`POST /api/plugins/{name}/reload`) or by
//! the daemon noticing that a plugin's files changed ([`watch`]).

use super::{Runtime, canary};
use crate::config::{Problem, Problems};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// A reload that took.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Reloaded {
    pub name: String,
    pub version: String,
    pub sha256: String,
    /// 1 for the code loaded at start, then one more per reload.
    pub generation: u64,
}

impl Runtime {
    /// Reload plugin `name` from where it was loaded.
    pub async fn reload(&self, name: &str) -> Result<Reloaded, Problems> {
        let Some(old) = self.get(name) else {
            return Err(Problems {
                file: String::new(),
                items: vec![Problem {
                    field: name.into(),
                    problem: format!("no plugin named `{name}` is loaded"),
                    fix: "name one `GET /api/plugins` lists".into(),
                }],
            });
        };
        let new = self.prepare(&old.manifest.path)?;
        canary(&new).await?;
        let (version, sha256) = (new.manifest.version.clone(), new.compiled.sha256.clone());
        let generation = old.replace_with(new).map_err(|why| Problems {
            file: old.manifest.path.display().to_string(),
            items: vec![Problem {
                field: format!("plugins.{name}"),
                problem: why,
                fix: "keep the plugin's name and extension points, or restart the daemon".into(),
            }],
        })?;
        tracing::info!(plugin = name, %version, generation, "plugin reloaded: new work uses the new code");
        Ok(Reloaded {
            name: name.into(),
            version,
            sha256,
            generation,
        })
    }
}

/// What a plugin's files look like: (path, length, modification time) of its manifest
/// and component.
type Stamp = Vec<(PathBuf, u64, Option<SystemTime>)>;

fn stamp(files: &[PathBuf]) -> Stamp {
    files
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f).ok();
            (
                f.clone(),
                m.as_ref().map_or(0, |m| m.len()),
                m.and_then(|m| m.modified().ok()),
            )
        })
        .collect()
}

/// Reload a plugin when its manifest or component changes: looked at every `every`,
/// and reloaded once the files have stayed the same for one more look (so a copy in
/// progress is not taken). A refused version is not tried again until it changes.
///
/// The looking is a thread of its own with its own small async runtime for the
/// reload's compile and canary, so that it goes on whatever the daemon's workers are
/// busy with (file metadata calls block anyway).
pub fn watch(runtime: Arc<Runtime>, every: Duration) {
    let spawned = std::thread::Builder::new()
        .name("plugin-watch".into())
        .spawn(move || {
            let reloads = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("cannot watch the plugin files (no hot reload on change): {e}");
                    return;
                }
            };
            let mut seen: HashMap<String, Stamp> = HashMap::new();
            let mut changed: HashMap<String, Stamp> = HashMap::new();
            // The first look is at once: it is what a change is measured against.
            loop {
                for p in runtime.plugins() {
                    let now = stamp(&[p.manifest.path.clone(), p.manifest.component.clone()]);
                    let name = p.name.to_string();
                    let Some(before) = seen.get(&name) else {
                        seen.insert(name, now);
                        continue;
                    };
                    if *before == now {
                        changed.remove(&name);
                        continue;
                    }
                    // Changed: wait one more look for it to settle.
                    if changed.get(&name) != Some(&now) {
                        changed.insert(name, now);
                        continue;
                    }
                    changed.remove(&name);
                    seen.insert(name.clone(), now);
                    match reloads.block_on(runtime.reload(&name)) {
                        Ok(r) => tracing::warn!(
                            plugin = %name,
                            version = %r.version,
                            generation = r.generation,
                            "plugin files changed: reloaded"
                        ),
                        Err(problems) => tracing::error!(
                            plugin = %name,
                            "plugin files changed, but the new version is refused (the old one keeps serving):\n{problems}"
                        ),
                    }
                }
                std::thread::sleep(every);
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot watch the plugin files (no hot reload on change): {e}");
    }
}

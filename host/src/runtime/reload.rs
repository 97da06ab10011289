//! Hot reload: a plugin's code is replaced in a running daemon. The new code (and the
//! daemon's configuration for it) is prepared and tried on a throwaway canary instance
//! first; only if that starts is it put in place (`Plugin::replace_with`), so a broken
//! build is refused with its problems while the old one keeps serving. Work in flight
//! on the old code (a log being written, a transport link) finishes on it; new work
//! uses the new code.
//!
//! A changed `[plugins.<name>]` table in the daemon's configuration file goes the same
//! way (canary first): its `config`, its grants and its limits. New instances get the
//! new ones; instances at work (a log writer, a transport link) finish with what they
//! were made with, so a revoked grant reaches work in flight only when it ends (restart
//! the daemon to cut it off at once). Not reloaded: the plugin's `path` and `[runtime]`
//! (the default limits among them): those need a restart, and a reload says so.
//!
//! Triggered by `trellis plugin reload NAME` (`POST /api/plugins/{name}/reload`) or by
//! the daemon noticing that a plugin's files or its configuration changed ([`watch`]).

use super::{Runtime, canary};
use crate::config::{DaemonConfig, PluginGrants, Problem, Problems};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
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

/// A daemon configuration file's `[plugins]` tables.
fn plugin_tables(file: &Path) -> Result<toml::Table, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let all: toml::Table = toml::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    Ok(match all.get("plugins") {
        Some(toml::Value::Table(t)) => t.clone(),
        _ => toml::Table::new(),
    })
}

/// One plugin's table (grants, limits, config), empty when it has none.
fn table_of(tables: &toml::Table, name: &str) -> toml::Table {
    match tables.get(name) {
        Some(toml::Value::Table(t)) => t.clone(),
        _ => toml::Table::new(),
    }
}

impl Runtime {
    /// Remember the daemon's configuration file, so that reloads apply a changed
    /// `[plugins.<name>]` table (grants, limits, config).
    pub fn set_config_file(&self, file: &Path) -> Result<(), String> {
        let tables = plugin_tables(file)?;
        *self.config_file.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((file.to_path_buf(), tables));
        Ok(())
    }

    /// The operator's table to reload `name` with, as the configuration file says now:
    /// None when there is no file to read it from; an error when the file no longer
    /// checks (every problem named) or the plugin's `path` changed.
    fn reloaded_operator(&self, name: &str) -> Result<Option<PluginGrants>, Problems> {
        let Some((file, _)) = self
            .config_file
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return Ok(None);
        };
        let now = DaemonConfig::load(&file)?;
        let operator = now.plugins.get(name).cloned().unwrap_or_default();
        let at_start = self.config.plugins.get(name).and_then(|g| g.path.clone());
        if operator.path != at_start {
            return Err(Problems {
                file: file.display().to_string(),
                items: vec![Problem {
                    field: format!("plugins.{name}.path"),
                    problem: "the plugin's path changed; a reload replaces a plugin where it was loaded from".into(),
                    fix: "restart the daemon to load it from the new path".into(),
                }],
            });
        }
        if now.runtime.limits != self.config.runtime.limits {
            tracing::warn!(
                "[runtime.limits] changed in {}: the defaults apply after a restart",
                file.display()
            );
        }
        Ok(Some(operator))
    }

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
        let operator = self.reloaded_operator(name)?;
        let new = self.prepare_with(&old.manifest.path, operator.as_ref())?;
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
            // The daemon's configuration: a changed `config` table reloads its plugin.
            let config_file = runtime
                .config_file
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|(f, t)| (f.clone(), t.clone()));
            let mut config_seen = config_file.as_ref().map(|(f, _)| stamp(std::slice::from_ref(f)));
            let mut config_changed: Option<Stamp> = None;
            let mut configs = config_file.map(|(_, t)| t).unwrap_or_default();
            // The first look is at once: it is what a change is measured against.
            loop {
                // (Taken in a statement of its own: a guard living through the block
                // below would deadlock the reload, which reads it too.)
                let current = runtime
                    .config_file
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                if let (Some(before), Some((file, _))) = (config_seen.clone(), current) {
                    let now = stamp(std::slice::from_ref(&file));
                    if now != before && config_changed.as_ref() != Some(&now) {
                        config_changed = Some(now);
                    } else if now != before {
                        config_changed = None;
                        config_seen = Some(now);
                        match plugin_tables(&file) {
                            Err(e) => tracing::error!("the configuration file changed but cannot be read: {e}"),
                            Ok(tables) => {
                                for p in runtime.plugins() {
                                    let name = p.name.to_string();
                                    if table_of(&tables, &name) == table_of(&configs, &name) {
                                        continue;
                                    }
                                    match reloads.block_on(runtime.reload(&name)) {
                                        Ok(r) => tracing::warn!(plugin = %name, generation = r.generation, "its configuration changed: reloaded"),
                                        Err(problems) => tracing::error!(plugin = %name, "its configuration changed, but it is refused (the old one keeps serving):\n{problems}"),
                                    }
                                }
                                configs = tables;
                            }
                        }
                    }
                }
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

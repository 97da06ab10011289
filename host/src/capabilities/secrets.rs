//! `trellis:host/secrets`: the operator's secret store, seen by each plugin only through
//! its grant list. Values never reach logs, `Debug` output, env or argv.

use crate::runtime::state::InstanceState;
use crate::wit::host_secrets::{Host, SecretError};
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

/// The daemon's secrets, loaded from a `name = "value"` TOML file.
#[derive(Default, Clone)]
pub struct SecretStore {
    values: HashMap<String, String>,
}

impl fmt::Debug for SecretStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<_> = self.values.keys().collect();
        names.sort();
        f.debug_struct("SecretStore")
            .field("names", &names)
            .finish_non_exhaustive()
    }
}

impl SecretStore {
    pub fn from_pairs<I: IntoIterator<Item = (String, String)>>(pairs: I) -> SecretStore {
        SecretStore {
            values: pairs.into_iter().collect(),
        }
    }

    /// Load the file, refusing one that other users can read.
    pub fn load(path: &Path) -> anyhow::Result<SecretStore> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)?.permissions().mode();
            if mode & 0o077 != 0 {
                anyhow::bail!(
                    "secrets file {} is readable by other users (mode {:o}); run `chmod 600 {}`",
                    path.display(),
                    mode & 0o777,
                    path.display()
                );
            }
        }
        let text = std::fs::read_to_string(path)?;
        let table: toml::Table = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("secrets file {}: {}", path.display(), e.message()))?;
        let mut values = HashMap::new();
        for (k, v) in table {
            match v {
                toml::Value::String(s) => {
                    values.insert(k, s);
                }
                _ => anyhow::bail!("secrets file {}: `{k}` must be a string", path.display()),
            }
        }
        Ok(SecretStore { values })
    }

    /// Add (or replace) a secret held only by this process (`trellis fence` puts the
    /// password Pacemaker passed on stdin here).
    pub fn insert(&mut self, name: String, value: String) {
        self.values.insert(name, value);
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(|s| s.as_str())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.values.contains_key(name)
    }

    /// The secrets' names (never their values), in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }
}

/// One instance's view: the store and the names granted to its plugin.
#[derive(Debug, Clone, Default)]
pub struct SecretsGate {
    pub store: Arc<SecretStore>,
    pub granted: Arc<BTreeSet<String>>,
}

impl Host for InstanceState {
    async fn get(&mut self, name: String) -> Result<String, SecretError> {
        if !self.secrets.granted.contains(&name) {
            self.metrics.denials.fetch_add(1, Relaxed);
            tracing::warn!(
                plugin = %self.plugin,
                secret = %name,
                "denied: secret not granted; to allow it add \"{name}\" to `secrets` in [plugins.{}]",
                self.plugin
            );
            return Err(SecretError::Denied(format!(
                "secret `{name}` is not granted to plugin `{0}`: add \"{name}\" to `secrets` in [plugins.{0}]",
                self.plugin
            )));
        }
        match self.secrets.store.get(&name) {
            Some(v) => Ok(v.to_string()),
            None => {
                tracing::warn!(plugin = %self.plugin, secret = %name, "granted secret is missing from the secret store");
                Err(SecretError::Missing(format!(
                    "secret `{name}` is granted but the secret store has no value for it: add it to the secrets file"
                )))
            }
        }
    }
}

//! The plugin runtime: one engine per process, plugins loaded from manifests, linked
//! once, instantiated per use under limits, and denied everything not granted.

pub mod budget;
pub mod engine;
pub mod errors;
pub mod health;
pub mod inspect;
pub mod limits;
pub mod manifest;
pub mod metrics;
pub mod output;
pub mod plugin;
pub mod reload;
pub mod state;
pub mod stdio;

use crate::capabilities::files::DirGrant;
use crate::capabilities::http::Authority;
use crate::capabilities::secrets::SecretStore;
use crate::capabilities::sockets::SocketGrant;
use crate::config::{DaemonConfig, PluginGrants, Problem, Problems};
use crate::wit::versioned::Version;
use crate::wit::{host_exec, host_kafka, host_log, host_secrets};
use budget::{InstancePool, PluginBudget};
pub use errors::{ErrorKind, PluginError};
use inspect::ComponentInfo;
use limits::Limits;
use manifest::{Capability, MANIFEST_FILE, Manifest};
use plugin::{CompileStats, ExportIndices};
pub use plugin::{Instance, Plugin};
use state::{Grants, InstanceState};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use wasmtime::Engine;
use wasmtime::component::{HasSelf, Linker};

/// The `trellis:plugin` versions this host serves, oldest first.
pub use crate::wit::versioned::SERVED as SERVED_WIT;
/// The `trellis:host` versions this host serves.
/// 0.1.1 only adds to 0.1.0 (`kafka` `consumer.subscribe`), so the linker's one set of
/// 0.1.1 capabilities serves 0.1.0 imports too (wasmtime matches semver-compatible names).
pub const SERVED_HOST_WIT: &[&str] = &["0.1.0", "0.1.1"];

pub struct Runtime {
    pub engine: Engine,
    pub config: DaemonConfig,
    secrets: Arc<SecretStore>,
    plugins: RwLock<BTreeMap<String, Arc<Plugin>>>,
    /// The daemon's configuration file and its `[plugins]` tables as they were at start
    /// (a reload applies a changed `config` table from it; see `reload`).
    config_file: std::sync::Mutex<Option<(PathBuf, toml::Table)>>,
    /// The `[kafka]` cluster's client, made on first use by a plugin granted Kafka.
    kafka: std::sync::Mutex<Option<Arc<crate::capabilities::kafka::KafkaClient>>>,
    /// The engine's instance pool, shared out among the plugins (`budget.rs`).
    pool: Arc<InstancePool>,
    /// One budget per plugin name, kept across reloads.
    budgets: std::sync::Mutex<BTreeMap<String, Arc<PluginBudget>>>,
    /// Ticks the engine's epoch while guest code runs (every plugin holds it too).
    ticker: Arc<engine::EpochTicker>,
}

impl Runtime {
    pub fn new(config: DaemonConfig) -> anyhow::Result<Arc<Runtime>> {
        let secrets = match &config.secrets.file {
            Some(f) => SecretStore::load(f)?,
            None => SecretStore::default(),
        };
        Self::with_secrets(config, secrets)
    }

    pub fn with_secrets(
        config: DaemonConfig,
        secrets: SecretStore,
    ) -> anyhow::Result<Arc<Runtime>> {
        let pool = config.runtime.instance_pool();
        Self::with_engine(config, secrets, engine::build_engine_sized(true, pool)?)
    }

    /// The shared Kafka client (None: no `[kafka]` section).
    fn kafka_client(
        &self,
    ) -> Result<Option<Arc<crate::capabilities::kafka::KafkaClient>>, Problem> {
        let Some(k) = &self.config.kafka else {
            return Ok(None);
        };
        let mut slot = self.kafka.lock().unwrap();
        if let Some(c) = slot.as_ref() {
            return Ok(Some(c.clone()));
        }
        let sasl_password =
            match &k.sasl_password_secret {
                None => None,
                Some(name) => Some(self.secrets.get(name).map(str::to_string).ok_or_else(
                    || Problem {
                        field: "kafka.sasl-password-secret".into(),
                        problem: format!("secret `{name}` is not in the secret store"),
                        fix: "add it to the file named by [secrets] file".into(),
                    },
                )?),
            };
        let client = crate::capabilities::kafka::KafkaClient::new(
            crate::capabilities::kafka::ClusterSettings {
                brokers: k.brokers.clone(),
                properties: k.properties.clone(),
                sasl_username: k.sasl_username.clone(),
                sasl_password,
            },
        )
        .map_err(|e| Problem {
            field: "kafka".into(),
            problem: e.to_string(),
            fix: "check the [kafka] settings".into(),
        })?;
        let client = Arc::new(client);
        *slot = Some(client.clone());
        Ok(Some(client))
    }

    /// With a given engine (e.g. one without the pooling allocator, for comparisons).
    pub fn with_engine(
        config: DaemonConfig,
        secrets: SecretStore,
        engine: Engine,
    ) -> anyhow::Result<Arc<Runtime>> {
        let ticker = engine::EpochTicker::start(&engine);
        let pool = InstancePool::new(config.runtime.instance_pool());
        Ok(Arc::new(Runtime {
            engine,
            config,
            secrets: Arc::new(secrets),
            plugins: RwLock::default(),
            config_file: Default::default(),
            kafka: Default::default(),
            pool,
            budgets: Default::default(),
            ticker,
        }))
    }

    /// The engine's epoch ticker (it ticks while guest code runs).
    pub fn epoch_ticker(&self) -> &engine::EpochTicker {
        &self.ticker
    }

    /// Everything short of running the plugin: read and check its manifest, the
    /// operator's grants and configuration, compile (or load the cached artifact),
    /// check the component's imports and exports, link. Errors list every problem.
    pub fn prepare(&self, path: &Path) -> Result<Plugin, Problems> {
        self.prepare_with(path, None)
    }

    /// `prepare`, with the operator's table for the plugin (grants, limits, config)
    /// replaced: a configuration reload.
    pub(crate) fn prepare_with(
        &self,
        path: &Path,
        reloaded: Option<&PluginGrants>,
    ) -> Result<Plugin, Problems> {
        let manifest = Manifest::locate(path)?;
        let file = manifest.path.display().to_string();
        let fail = |items: Vec<Problem>| Problems {
            file: file.clone(),
            items,
        };
        let at = format!("plugins.{}", manifest.name);
        let operator = match reloaded {
            Some(o) => o.clone(),
            None => self
                .config
                .plugins
                .get(&manifest.name)
                .cloned()
                .unwrap_or_default(),
        };

        let mut problems = Vec::new();
        let kafka = if manifest.capabilities.contains(&Capability::Kafka) {
            self.kafka_client().unwrap_or_else(|p| {
                problems.push(p);
                None
            })
        } else {
            None
        };
        let grants = resolve_grants(&manifest, &operator, &self.secrets, kafka, &at)
            .unwrap_or_else(|p| {
                problems.extend(p);
                Grants::default()
            });
        let config_json = manifest
            .resolve_config(&operator.config, &format!("{at}.config"))
            .unwrap_or_else(|p| {
                problems.extend(p);
                String::new()
            });
        let limits = Limits::resolve(&self.config.runtime.limits, &operator.limits);
        for (key, problem, fix) in limits.problems() {
            problems.push(Problem {
                field: format!("{at}.limits.{key}"),
                problem: format!("{problem} (with [runtime.limits] applied)"),
                fix,
            });
        }
        let compiled = engine::load_component(
            &self.engine,
            &manifest.component,
            self.config.runtime.cache_dir.as_deref(),
        )
        .map_err(|e| {
            fail(vec![Problem {
                field: "plugin.component".into(),
                problem: format!("{e:#}"),
                fix: "rebuild the component".into(),
            }])
        })?;
        let info = ComponentInfo::read(&self.engine, &compiled.component);
        problems.extend(info.check(&manifest));
        if !problems.is_empty() {
            return Err(fail(problems));
        }
        let quota = grants.dirs.iter().any(|d| d.quota.is_some());
        let linker = linker_for(&self.engine, &manifest.capabilities, quota)
            .map_err(|e| fail(vec![internal(e)]))?;
        let pre = linker.instantiate_pre(&compiled.component).map_err(|e| {
            fail(vec![Problem {
                field: "plugin.component".into(),
                problem: format!("cannot be linked: {e:#}"),
                fix: "the component imports something this host does not provide".into(),
            }])
        })?;
        // `check` above made sure the component is of one served version, the manifest's.
        let version = Version::of(manifest.wit).ok_or_else(|| {
            fail(vec![internal(anyhow::anyhow!(
                "no bindings for trellis:plugin@{}",
                manifest.wit
            ))])
        })?;
        let indices = ExportIndices::new(version, &pre, &info.points()).map_err(|e| {
            fail(vec![Problem {
                field: "plugin.component".into(),
                problem: format!(
                    "its exports do not match trellis:plugin@{}: {e:#}",
                    manifest.wit
                ),
                fix: "rebuild the plugin against the WIT this host serves".into(),
            }])
        })?;
        let budget = self
            .budgets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(manifest.name.clone())
            .or_insert_with(|| PluginBudget::new(self.pool.clone(), &limits))
            .clone();
        let stats = CompileStats {
            bytes: compiled.bytes,
            sha256: compiled.sha256,
            took: compiled.took,
            from_cache: compiled.from_cache,
        };
        Ok(Plugin::new(
            manifest,
            info,
            limits,
            grants,
            stats,
            config_json,
            pre,
            indices,
            self.secrets.clone(),
            self.config.runtime.quarantine.clone(),
            budget,
            self.ticker.clone(),
        ))
    }

    /// Prepare, then try the plugin on a throwaway instance (its `init` with the real
    /// configuration) before accepting it. A plugin that fails here is not registered.
    pub async fn load(&self, path: &Path) -> Result<Arc<Plugin>, Problems> {
        let plugin = self.prepare(path)?;
        canary(&plugin).await?;
        plugin
            .budget
            .reserve(&plugin.limits())
            .map_err(|problem| Problems {
                file: plugin.manifest.path.display().to_string(),
                items: vec![Problem {
                    field: format!("plugins.{}.limits.reserved-instances", plugin.name),
                    problem,
                    fix: "lower reserved-instances for some plugins ([runtime.limits] or [plugins.NAME.limits])".into(),
                }],
            })?;
        let plugin = Arc::new(plugin);
        let old = self
            .plugins
            .write()
            .unwrap()
            .insert(plugin.name.to_string(), plugin.clone());
        if let Some(old) = old {
            old.drain_idle();
        }
        tracing::info!(plugin = %plugin.name, version = %plugin.manifest.version, points = ?plugin.info.points(), "plugin loaded");
        Ok(plugin)
    }

    /// Load every plugin in a directory (each sub-directory holding a plugin.toml).
    pub async fn load_dir(
        &self,
        dir: &Path,
    ) -> anyhow::Result<Vec<(PathBuf, Result<Arc<Plugin>, Problems>)>> {
        let mut out = Vec::new();
        for path in plugin_dirs(dir)? {
            let r = self.load(&path).await;
            if let Err(p) = &r {
                tracing::error!("refused plugin at {}:\n{p}", path.display());
            }
            out.push((path, r));
        }
        Ok(out)
    }

    pub fn get(&self, name: &str) -> Option<Arc<Plugin>> {
        self.plugins.read().unwrap().get(name).cloned()
    }

    pub fn plugins(&self) -> Vec<Arc<Plugin>> {
        self.plugins.read().unwrap().values().cloned().collect()
    }

    /// Prometheus text for every loaded plugin.
    pub fn render_metrics(&self) -> String {
        let mut out = String::new();
        metrics::render_header(&mut out);
        for p in self.plugins() {
            p.metrics.render(&p.name, &mut out);
            p.budget.render(&p.name, &mut out);
        }
        self.pool.render(&mut out);
        out
    }
}

/// Try a plugin on a throwaway instance; its failure is the plugin's refusal.
pub async fn canary(plugin: &Plugin) -> Result<(), Problems> {
    let inst = plugin.instantiate().await.map_err(|e| Problems {
        file: plugin.manifest.path.display().to_string(),
        items: vec![Problem {
            field: format!("plugins.{}.config", plugin.name),
            problem: format!("the plugin failed to start on a trial instance: {e}"),
            fix: match e.kind() {
                Some(ErrorKind::BadConfig) => "correct the configuration the plugin names".into(),
                Some(ErrorKind::Denied) => {
                    "grant what the plugin names, or change its configuration".into()
                }
                _ => "see the error; the plugin is not loaded".into(),
            },
        }],
    })?;
    drop(inst);
    Ok(())
}

/// Sub-directories of `dir` that hold a plugin manifest, sorted.
pub fn plugin_dirs(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("cannot read plugin directory {}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.join(MANIFEST_FILE).is_file() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

fn internal(e: impl std::fmt::Display) -> Problem {
    Problem {
        field: "(host)".into(),
        problem: e.to_string(),
        fix: String::new(),
    }
}

/// A linker with WASI (empty contexts; grants decide) and only the `trellis:host`
/// capabilities the plugin declared.
fn linker_for(
    engine: &Engine,
    caps: &BTreeSet<Capability>,
    quota: bool,
) -> anyhow::Result<Linker<InstanceState>> {
    let mut l = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut l)?;
    if quota {
        // A directory grant has a quota: wasmtime-wasi's filesystem, shadowed by one that
        // checks writes against it (capabilities/quota.rs).
        use crate::capabilities::quota::QuotaFsData;
        use wasmtime_wasi::p2::bindings::filesystem::{preopens, types};
        l.allow_shadowing(true);
        preopens::add_to_linker::<InstanceState, QuotaFsData>(&mut l, InstanceState::quota_fs)?;
        types::add_to_linker::<InstanceState, QuotaFsData>(&mut l, InstanceState::quota_fs)?;
        l.allow_shadowing(false);
    }
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut l)?;
    if caps.contains(&Capability::Log) {
        host_log::add_to_linker::<InstanceState, HasSelf<InstanceState>>(&mut l, |s| s)?;
    }
    if caps.contains(&Capability::Secrets) {
        host_secrets::add_to_linker::<InstanceState, HasSelf<InstanceState>>(&mut l, |s| s)?;
    }
    if caps.contains(&Capability::Kafka) {
        host_kafka::add_to_linker::<InstanceState, HasSelf<InstanceState>>(&mut l, |s| s)?;
    }
    if caps.contains(&Capability::Exec) {
        host_exec::add_to_linker::<InstanceState, HasSelf<InstanceState>>(&mut l, |s| s)?;
    }
    Ok(l)
}

/// Check the operator's grants against what the manifest requests (both must agree:
/// a grant for a capability the plugin did not ask for is a mistake worth naming).
fn resolve_grants(
    m: &Manifest,
    g: &PluginGrants,
    store: &SecretStore,
    kafka: Option<Arc<crate::capabilities::kafka::KafkaClient>>,
    at: &str,
) -> Result<Grants, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut needs = |granted: bool, cap: Capability, field: &str| {
        if granted && !m.capabilities.contains(&cap) {
            problems.push(Problem {
                field: format!("{at}.{field}"),
                problem: format!("plugin `{}` does not request capability `{cap}`, so this grant would be unused", m.name),
                fix: format!("remove the grant (the plugin's manifest would have to list \"{cap}\" in `capabilities`)"),
            });
        }
    };
    needs(!g.dirs.is_empty(), Capability::Filesystem, "dirs");
    needs(!g.http.is_empty(), Capability::Http, "http");
    needs(!g.tls_ca.is_empty(), Capability::Http, "tls-ca");
    needs(
        !g.sockets.connect.is_empty() || !g.sockets.bind.is_empty(),
        Capability::Sockets,
        "sockets",
    );
    needs(!g.secrets.is_empty(), Capability::Secrets, "secrets");
    needs(!g.kafka.topics.is_empty(), Capability::Kafka, "kafka");
    needs(!g.exec.is_empty(), Capability::Exec, "exec");
    for (field, problem) in crate::capabilities::exec::check(&g.exec) {
        problems.push(Problem {
            field: format!("{at}.{field}"),
            problem,
            fix: "write exec = [{ name = \"...\", argv = [\"program\", \"{placeholder}\", ...] }]"
                .into(),
        });
    }
    // No `[kafka]` cluster is not a load error (like a missing directory grant): the
    // plugin's Kafka calls are denied, saying what to add.
    for (i, t) in g.kafka.topics.iter().enumerate() {
        if t.is_empty() {
            problems.push(Problem {
                field: format!("{at}.kafka.topics[{i}]"),
                problem: "an empty prefix would grant every topic".into(),
                fix: "name a prefix, e.g. \"trellis.\"".into(),
            });
        }
    }
    let mut http = Vec::new();
    for (i, h) in g.http.iter().enumerate() {
        match Authority::parse(h) {
            Ok(a) => http.push(a),
            Err(e) => problems.push(Problem {
                field: format!("{at}.http[{i}]"),
                problem: e,
                fix: "write scheme://host:port".into(),
            }),
        }
    }
    let tls = match crate::capabilities::http::trusting(&g.tls_ca) {
        Ok(tls) => tls,
        Err((i, problem)) => {
            problems.push(Problem {
                field: format!("{at}.tls-ca[{i}]"),
                problem,
                fix: "name a readable PEM file holding the CA's certificate".into(),
            });
            None
        }
    };
    let mut sockets = SocketGrant::default();
    for (kind, list, set) in [
        ("connect", &g.sockets.connect, &mut sockets.connect),
        ("bind", &g.sockets.bind, &mut sockets.bind),
    ] {
        for (i, a) in list.iter().enumerate() {
            match a.parse() {
                Ok(addr) => {
                    set.insert(addr);
                }
                Err(_) => problems.push(Problem {
                    field: format!("{at}.sockets.{kind}[{i}]"),
                    problem: format!("`{a}` is not an ip:port address"),
                    fix: "write e.g. 127.0.0.1:7000".into(),
                }),
            }
        }
    }
    for (i, s) in g.secrets.iter().enumerate() {
        if !store.contains(s) {
            problems.push(Problem {
                field: format!("{at}.secrets[{i}]"),
                problem: format!("secret `{s}` is not in the secret store"),
                fix: "add it to the file named by [secrets] file, or remove the grant".into(),
            });
        }
    }
    let mut dirs = Vec::new();
    let mut guests = BTreeSet::new();
    for (i, d) in g.dirs.iter().enumerate() {
        if !guests.insert(d.guest.clone()) {
            problems.push(Problem {
                field: format!("{at}.dirs[{i}].guest"),
                problem: format!("`{}` is granted twice", d.guest),
                fix: "give each directory its own guest path".into(),
            });
        }
        if d.quota.is_some() && d.mode != crate::config::DirMode::ReadWrite {
            problems.push(Problem {
                field: format!("{at}.dirs[{i}].quota"),
                problem: "a quota on a read-only grant bounds nothing".into(),
                fix: "remove `quota`, or make the grant `mode = \"read-write\"`".into(),
            });
        }
        dirs.push(DirGrant {
            host: d.host.clone(),
            guest: d.guest.clone(),
            mode: d.mode,
            quota: d.quota.map(|q| {
                Arc::new(crate::capabilities::quota::DirQuota::new(
                    d.host.clone(),
                    d.guest.clone(),
                    q.0,
                ))
            }),
        });
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Grants {
        dirs,
        http: Arc::new(http),
        tls,
        sockets: Arc::new(sockets),
        secrets: Arc::new(g.secrets.iter().cloned().collect()),
        kafka: crate::capabilities::kafka::KafkaGate {
            prefixes: Arc::new(g.kafka.topics.clone()),
            client: kafka,
        },
        exec: Arc::new(g.exec.clone()),
    })
}

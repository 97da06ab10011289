//! `trellis controller` and `trellis agent`: the two roles as long-running daemons.

use crate::agent::worker::{AgentConfig, run_agent};
use crate::api::access::{Access, AccessConfig};
use crate::api::{Api, Browsers, listen};
use crate::capabilities::secrets::SecretStore;
use crate::config::DaemonConfig;
use crate::controller::{Controller, ControllerConfig, LogPlugins};
use crate::ha::fencing::{Device, RaceDelay, Topology};
use crate::ha::leader::Etcd;
use crate::ha::role::Ha;
use crate::ha::status::ClusterStatus;
use crate::jobs::secrets::{JobSecrets, problems_error};
use crate::points::browser::LogReader;
use crate::points::fence::{Confirm, FenceDevice};
use crate::points::log_set::LogSet;
use crate::runtime::{Plugin, Runtime};
use crate::wit::logging_method::Side;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

fn load(file: &Path) -> anyhow::Result<DaemonConfig> {
    DaemonConfig::load(file).map_err(|p| anyhow::anyhow!("{p}"))
}

fn plugin_dir(cfg: &DaemonConfig) -> anyhow::Result<PathBuf> {
    cfg.runtime
        .plugin_dir
        .clone()
        .or_else(|| std::env::var_os("TRELLIS_BUNDLE_DIR").map(PathBuf::from))
        .ok_or_else(|| {
            anyhow::anyhow!("no plugin directory: set [runtime] plugin-dir (or TRELLIS_BUNDLE_DIR)")
        })
}

/// Plugin `name`, loaded once: a plugin filling two roles (a logging method that is
/// also a log browser) is one plugin, with one health, one quarantine and one set of
/// counters, not two copies of which `/metrics` shows only the last.
async fn load_plugin(rt: &Runtime, dir: &Path, name: &str) -> anyhow::Result<Arc<Plugin>> {
    if let Some(loaded) = rt.get(name) {
        return Ok(loaded);
    }
    let path = rt
        .config
        .plugins
        .get(name)
        .and_then(|g| g.path.clone())
        .unwrap_or_else(|| dir.join(name));
    rt.load(&path).await.map_err(|p| anyhow::anyhow!("{p}"))
}

fn secret(store: &SecretStore, name: &str, whose: &str) -> anyhow::Result<String> {
    store
        .get(name)
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("{whose}: secret `{name}` is not in the secrets file"))
}

/// How often a daemon looks at its plugins' files for a new version.
const PLUGIN_WATCH: std::time::Duration = std::time::Duration::from_secs(2);

pub async fn controller(file: &Path, check_only: bool) -> anyhow::Result<ExitCode> {
    let cfg = load(file)?;
    let Some(c) = cfg.controller.clone() else {
        anyhow::bail!("{}: no [controller] section", file.display())
    };
    let secrets = match &cfg.secrets.file {
        Some(f) => SecretStore::load(f)?,
        None => SecretStore::default(),
    };
    let mut agents = HashMap::new();
    for (agent, secret_name) in &c.agents {
        agents.insert(
            agent.clone(),
            secret(&secrets, secret_name, &format!("controller.agents.{agent}"))?,
        );
    }
    // Before the runtime takes the config: which secrets jobs may use, and that none of
    // them is a daemon credential or too short to mask.
    let job_secrets = JobSecrets::from_config(&cfg, &secrets)
        .map_err(|p| problems_error(&file.display().to_string(), p))?;
    let dir = plugin_dir(&cfg)?;
    let ha_cfg = cfg.ha.clone();
    let rt = Runtime::with_secrets(cfg, secrets)?;
    let transport = load_plugin(&rt, &dir, &c.transport).await?;
    // The defaults first, then what jobs may name besides (a name listed twice loads once).
    let mut methods: Vec<Arc<Plugin>> = Vec::new();
    for name in std::iter::once(&c.logging).chain(&c.logging_methods) {
        if !methods.iter().any(|p| *p.name == **name) {
            methods.push(load_plugin(&rt, &dir, name).await?);
        }
    }
    let mut browsers = Browsers::default();
    for name in std::iter::once(&c.browser).chain(&c.log_browsers) {
        if browsers.get(name).is_none() {
            browsers.add(LogReader::new(load_plugin(&rt, &dir, name).await?)?);
        }
    }
    let tls = match &c.tls {
        Some(t) => Some(Arc::new(crate::api::tls_config(&t.cert, &t.key)?)),
        None => None,
    };
    if check_only {
        let names = |v: Vec<&str>| v.join(", ");
        println!(
            "{}: ok (controller; transport {}, logging {}, browsers {} load; {} agent(s))",
            file.display(),
            c.transport,
            names(methods.iter().map(|p| &*p.name).collect()),
            names(browsers.names()),
            agents.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    std::fs::create_dir_all(&c.state_dir)?;
    // A plugin whose files (or `config` table here) change is reloaded, canary first.
    if let Err(e) = rt.set_config_file(file) {
        tracing::warn!("configuration reloads are off: {e}");
    }
    crate::runtime::reload::watch(rt.clone(), PLUGIN_WATCH);
    let ha = match &ha_cfg {
        Some(h) => Some(ha_role(&rt, &dir, h, &c.state_dir).await?),
        None => None,
    };
    // Bound now: a standby answers `/api/cluster` and `/metrics` while it waits.
    let bind: std::net::SocketAddr = c.http.parse()?;
    let access = Arc::new(Access::new(AccessConfig {
        state_dir: &c.state_dir,
        bind,
        hosts: &c.hosts,
        open_metrics: c.open_metrics,
        tls: tls.is_some(),
    }));
    if access.tokens.tokens().is_empty() {
        eprintln!(
            "trellis controller: no API tokens yet: make one with `trellis token create NAME --role admin --config {}`",
            file.display()
        );
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    let listener = listen(bind, ha.as_ref().map(|h| h.status.clone()), access, tls).await?;
    let addr = listener.addr;
    eprintln!("trellis controller: listening on {scheme}://{addr}");
    let start = |fencing_token: u64| async move {
        let controller = Controller::start(
            ControllerConfig {
                instance_id: c.instance_id.clone(),
                state_dir: c.state_dir.clone(),
                agents,
                secrets: job_secrets,
                heartbeat: c.heartbeat.0,
                agent_lost_after: c.agent_lost_after.0,
                log_buffer_limit: c.log_buffer_limit.0,
                multiline_start: c.multiline_start.clone(),
                fencing_token,
                retention: crate::controller::state::Retention {
                    keep_runs: c.keep_runs.map(|n| n as u64),
                    keep_days: c.keep_days.map(|n| n as u64),
                },
            },
            transport,
            LogPlugins {
                methods,
                browsers: browsers.names().into_iter().map(String::from).collect(),
            },
        )
        .await?;
        controller.set_log_close_retry_for(rt.config.runtime.log_close_retry_for());
        let api = Arc::new(Api {
            controller,
            runtime: rt.clone(),
            browsers,
            instance_id: c.instance_id.clone(),
        });
        listener.activate(api);
        tracing::info!("controller `{}` serving {scheme}://{addr}", c.instance_id);
        eprintln!(
            "trellis controller: {scheme}://{addr} (state in {})",
            c.state_dir.display()
        );
        anyhow::Ok(())
    };
    match ha {
        Some(ha) => {
            eprintln!("trellis controller: HA as `{}`, campaigning", ha.name);
            tokio::select! {
                r = ha.run(start) => r.map(|()| ExitCode::SUCCESS),
                _ = tokio::signal::ctrl_c() => Ok(ExitCode::SUCCESS),
            }
        }
        None => {
            start(0).await?;
            tokio::signal::ctrl_c().await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The `[ha]` role: etcd, and the fencing levels for each peer (their plugins loaded
/// now, so that a mistake shows at start, not at the first failover).
async fn ha_role(
    rt: &Runtime,
    dir: &Path,
    h: &crate::config::HaSection,
    state_dir: &Path,
) -> anyhow::Result<Ha> {
    let mut fencing = HashMap::new();
    for (peer, f) in &h.fencing {
        let mut levels = Vec::new();
        for (i, level) in f.levels.iter().enumerate() {
            let mut devices = Vec::new();
            for (j, d) in level.iter().enumerate() {
                let plugin = load_plugin(rt, dir, &d.plugin).await?;
                let params = d
                    .params
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let device = FenceDevice::new(plugin, params)
                    .map_err(|e| anyhow::anyhow!("ha.fencing.{peer}.levels[{i}][{j}]: {e}"))?
                    .with_confirm(Confirm {
                        timeout: d.power_timeout.0,
                        ..Confirm::default()
                    });
                devices.push(Device {
                    name: format!("{}#{}", d.plugin, j + 1),
                    fencer: Box::new(device),
                });
            }
            levels.push(devices);
        }
        fencing.insert(peer.clone(), Topology { levels });
    }
    let etcd = Etcd::new(h.etcd.clone());
    Ok(Ha {
        status: Arc::new(ClusterStatus::new(&h.name, etcd.clone(), &h.key)),
        state_dir: state_dir.to_path_buf(),
        name: h.name.clone(),
        etcd,
        key: h.key.clone(),
        lease_ttl: h.lease_ttl.0,
        watch_every: h.watch_every.0,
        race: RaceDelay {
            base: h.delay_base.0,
            max: h.delay_max.0,
        },
        fencing,
    })
}

/// The agent-side logging methods an agent writes with (`[agent] logging-methods`),
/// their buffers under `[agent] state-dir`. A controller-side method is refused here:
/// it would never be asked to write.
async fn agent_logs(
    rt: &Runtime,
    dir: &Path,
    a: &crate::config::AgentSection,
) -> anyhow::Result<Option<Arc<LogSet>>> {
    if a.logging_methods.is_empty() {
        return Ok(None);
    }
    let mut plugins = Vec::new();
    for name in &a.logging_methods {
        plugins.push(load_plugin(rt, dir, name).await?);
    }
    let state = a.state_dir();
    let logs = LogSet::new(plugins, &state.join("log-buffer"), a.log_buffer_limit.0)
        .await
        .map_err(|e| anyhow::anyhow!("[agent] logging-methods: {e}"))?;
    logs.set_close_retry_for(rt.config.runtime.log_close_retry_for());
    for name in &a.logging_methods {
        if logs.side(name) != Some(Side::Agent) {
            anyhow::bail!(
                "[agent] logging-methods: `{name}` writes from the controller, not the agent; list it in the controller's [controller] logging-methods instead"
            );
        }
    }
    Ok(Some(Arc::new(logs)))
}

pub async fn agent(file: &Path, check_only: bool) -> anyhow::Result<ExitCode> {
    let cfg = load(file)?;
    let Some(a) = cfg.agent.clone() else {
        anyhow::bail!("{}: no [agent] section", file.display())
    };
    let secrets = match &cfg.secrets.file {
        Some(f) => SecretStore::load(f)?,
        None => SecretStore::default(),
    };
    let agent_secret = secret(&secrets, &a.secret, "agent.secret")?;
    let dir = plugin_dir(&cfg)?;
    let rt = Runtime::with_secrets(cfg, secrets)?;
    let transport = load_plugin(&rt, &dir, &a.transport).await?;
    let logs = agent_logs(&rt, &dir, &a).await?;
    if check_only {
        println!(
            "{}: ok (agent `{}`; transport {}, logging methods {:?} load)",
            file.display(),
            a.name,
            a.transport,
            a.logging_methods
        );
        return Ok(ExitCode::SUCCESS);
    }
    std::fs::create_dir_all(&a.workspace)?;
    if let Err(e) = rt.set_config_file(file) {
        tracing::warn!("configuration reloads are off: {e}");
    }
    crate::runtime::reload::watch(rt.clone(), PLUGIN_WATCH);
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    eprintln!(
        "trellis agent `{}` (labels {:?}) starting",
        a.name, a.labels
    );
    let agent = run_agent(
        transport,
        AgentConfig {
            name: a.name.clone(),
            labels: a.labels.clone(),
            secret: agent_secret,
            workspace: a.workspace.clone(),
            heartbeat: a.heartbeat.0,
            logs,
            state_dir: Some(a.state_dir()),
            executors: a.executors,
        },
        stop,
    );
    tokio::select! {
        r = agent => match r {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(e) => {
                eprintln!("error: {e}");
                Ok(ExitCode::FAILURE)
            }
        },
        _ = tokio::signal::ctrl_c() => Ok(ExitCode::SUCCESS),
    }
}

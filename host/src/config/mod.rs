//! The operator's daemon configuration (TOML): runtime limits and, per plugin, what it is
//! granted. What a plugin *asks for* lives in its plugin.toml (see `runtime::manifest`);
//! this file is what the operator *provides*. Unknown keys are errors everywhere.

pub mod defaults;
pub mod units;

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
pub use units::{ByteSize, HumanDuration};

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DaemonConfig {
    #[serde(default)]
    pub runtime: RuntimeSection,
    #[serde(default)]
    pub secrets: SecretsSection,
    /// `[job-secrets.<name>]`: the secrets of the secrets file jobs may use, and which
    /// jobs may use each (see `jobs::secrets`). No other secret is ever given to a job.
    #[serde(default)]
    pub job_secrets: BTreeMap<String, JobSecretRule>,
    /// `[plugins.<name>]`: the grants of each plugin, by the name in its manifest.
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginGrants>,
    /// `[kafka]`: the cluster for plugins granted the `kafka` capability.
    pub kafka: Option<KafkaSection>,
    /// `[controller]`: for `trellis controller`.
    pub controller: Option<ControllerSection>,
    /// `[agent]`: for `trellis agent`.
    pub agent: Option<AgentSection>,
    /// `[ha]`: active/passive controllers (with `[controller]`).
    pub ha: Option<HaSection>,
}

/// `[ha]`: this controller is one of several; the one holding the leader key in etcd is
/// active, the others wait, and before one takes over it fences the old active.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct HaSection {
    /// This controller's name among its peers (what the leader key says).
    pub name: String,
    /// The etcd members' client addresses, `host:port`.
    pub etcd: Vec<String>,
    #[serde(default = "default_leader_key")]
    pub key: String,
    /// The leader lease: a dead active is noticed about this long after it died.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl: HumanDuration,
    /// How often a standby looks at the leader key.
    #[serde(default = "default_watch_every")]
    pub watch_every: HumanDuration,
    /// Before fencing the node that held the active role, wait this long plus up to
    /// `delay-max` at random (Pacemaker's pcmk_delay_base/max): in a partition the
    /// active side fences first and survives.
    #[serde(default = "zero_duration")]
    pub delay_base: HumanDuration,
    #[serde(default = "zero_duration")]
    pub delay_max: HumanDuration,
    /// Per peer (by its `name`): the fencing levels that fence it, tried in order.
    #[serde(default)]
    pub fencing: BTreeMap<String, PeerFencing>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PeerFencing {
    /// Each level a list of devices; a level fences only if all its devices confirm.
    pub levels: Vec<Vec<FenceDeviceConfig>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FenceDeviceConfig {
    /// A fence-agent plugin in the plugin directory (granted in `[plugins.<name>]`).
    pub plugin: String,
    /// Its device parameters (ClusterLabs names; a secret parameter names a secret).
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// How long the device's `status` may take to confirm an `ok` from `fence`
    /// (fence-agents' `power-timeout`); unconfirmed means not fenced.
    #[serde(default = "default_power_timeout")]
    pub power_timeout: HumanDuration,
}

fn default_power_timeout() -> HumanDuration {
    HumanDuration(crate::points::fence::Confirm::default().timeout)
}

fn default_leader_key() -> String {
    "trellis/leader".into()
}
fn default_lease_ttl() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(2))
}
fn default_watch_every() -> HumanDuration {
    HumanDuration(std::time::Duration::from_millis(100))
}
fn zero_duration() -> HumanDuration {
    HumanDuration(std::time::Duration::ZERO)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ControllerSection {
    /// Runs and their records live here (on shared storage in HA setups).
    pub state_dir: PathBuf,
    /// Names this controller in every log's metadata.
    #[serde(default = "default_instance_id")]
    pub instance_id: String,
    /// Where the HTTP API and web page listen.
    #[serde(default = "default_http")]
    pub http: String,
    #[serde(default = "default_transport")]
    pub transport: String,
    #[serde(default = "default_logging")]
    pub logging: String,
    #[serde(default = "default_browser")]
    pub browser: String,
    /// More logging methods jobs may name (`logging = "..."` in a job file), besides
    /// `logging`, the default.
    #[serde(default)]
    pub logging_methods: Vec<String>,
    /// More log browsers jobs may name (`browser = "..."`), besides `browser`.
    #[serde(default)]
    pub log_browsers: Vec<String>,
    /// Agent name -> the name of the secret (in the secrets file) that agent must prove.
    #[serde(default)]
    pub agents: BTreeMap<String, String>,
    /// How often an idle agent link says it is alive; 5 silent intervals end the link.
    #[serde(default = "default_heartbeat")]
    pub heartbeat: HumanDuration,
    /// An agent out of contact this long has its in-flight runs marked `lost`.
    #[serde(default = "default_agent_lost_after")]
    pub agent_lost_after: HumanDuration,
    /// How much log output may wait on disk for the logging plugin (a store that is
    /// down); when full, steps' output is held back, never dropped.
    #[serde(default = "default_log_buffer_limit")]
    pub log_buffer_limit: ByteSize,
    /// Start-of-event pattern for jobs that set no `multiline-start` of their own.
    pub multiline_start: Option<String>,
    /// HTTPS for the API and web page: `tls = { cert = "...", key = "..." }` (PEM).
    pub tls: Option<TlsFiles>,
    /// Serve plain HTTP on an address other than loopback (say, behind a proxy that
    /// terminates TLS). Without it, such a bind needs `tls`.
    #[serde(default)]
    pub allow_plaintext_http: bool,
    /// The names clients reach the API by: requests naming another `Host` are refused
    /// (DNS rebinding). localhost and the bind address are always allowed.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Serve `/metrics` without a token (for scrapers); otherwise it needs a viewer.
    #[serde(default)]
    pub open_metrics: bool,
    /// Keep at most this many finished runs (the newest); older ones are removed with
    /// their artifacts. Default: all kept.
    pub keep_runs: Option<i64>,
    /// Remove finished runs (and their artifacts) that finished more than this many
    /// days ago. Default: kept forever.
    pub keep_days: Option<i64>,
}

/// `[controller] tls`: the API's certificate chain and private key, PEM files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AgentSection {
    pub name: String,
    #[serde(default)]
    pub labels: Vec<String>,
    /// The name of this agent's secret in the secrets file (never the value itself).
    pub secret: String,
    /// Runs get `<workspace>/<run-id>/`.
    pub workspace: PathBuf,
    #[serde(default = "default_transport")]
    pub transport: String,
    /// How often an idle link to the controller says it is alive.
    #[serde(default = "default_heartbeat")]
    pub heartbeat: HumanDuration,
    /// Logging methods that write from the agent (JEP-212's agent side, e.g.
    /// elasticsearch-logging), with their grants in `[plugins.<name>]` here: runs whose
    /// method is one of them are placed only on agents that list it.
    #[serde(default)]
    pub logging_methods: Vec<String>,
    /// The agent's own state: the durable buffers of agent-side logs. Default:
    /// `<workspace>/.trellis`.
    pub state_dir: Option<PathBuf>,
    /// How much log output may wait on disk per agent-side method; when full, steps'
    /// output is held back, never dropped.
    #[serde(default = "default_log_buffer_limit")]
    pub log_buffer_limit: ByteSize,
    /// How many runs this agent runs at once; the controller places no more on it.
    #[serde(default = "default_executors")]
    pub executors: u32,
}

/// Most executors one agent may declare (`[agent] executors`).
pub const MAX_EXECUTORS: u32 = 1024;

fn default_executors() -> u32 {
    1
}

impl AgentSection {
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| self.workspace.join(".trellis"))
    }
}

fn default_heartbeat() -> HumanDuration {
    HumanDuration(defaults::DEFAULT_HEARTBEAT)
}
fn default_agent_lost_after() -> HumanDuration {
    HumanDuration(defaults::DEFAULT_AGENT_LOST_AFTER)
}
fn default_log_buffer_limit() -> ByteSize {
    ByteSize(defaults::DEFAULT_LOG_BUFFER_LIMIT)
}
fn default_instance_id() -> String {
    "trellis".into()
}
fn default_http() -> String {
    "127.0.0.1:8080".into()
}
fn default_transport() -> String {
    "tcp-transport".into()
}
fn default_logging() -> String {
    "file-logging".into()
}
fn default_browser() -> String {
    "file-browser".into()
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RuntimeSection {
    /// Where plugins live: one sub-directory (or `<name>.toml` + component) each.
    pub plugin_dir: Option<PathBuf>,
    /// Where precompiled components are cached. Default: `.cache/` beside each component.
    pub cache_dir: Option<PathBuf>,
    /// Default limits for every plugin; `[plugins.<name>.limits]` overrides per plugin.
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub quarantine: QuarantineConfig,
    /// How long a log's close that its logging method does not confirm is retried
    /// (every second) before the log is closed incomplete, with a note in the run's
    /// record, and the plugin instance holding it is released (default 10m).
    pub log_close_retry_for: Option<HumanDuration>,
    /// Instances the pooling allocator holds, for all plugins together (default 256,
    /// `engine::POOL_INSTANCES`). Raise it for a process that keeps many instances
    /// alive at once (the load generator's hundreds of agent links); each slot costs
    /// address space, not memory, until used.
    pub instance_pool: Option<u32>,
}

impl RuntimeSection {
    /// `instance-pool`, or its default.
    pub fn instance_pool(&self) -> u32 {
        self.instance_pool
            .unwrap_or(crate::runtime::engine::POOL_INSTANCES)
    }

    /// `log-close-retry-for`, or its default.
    pub fn log_close_retry_for(&self) -> std::time::Duration {
        self.log_close_retry_for
            .as_ref()
            .map(|d| d.0)
            .unwrap_or(crate::points::log_set::DEFAULT_CLOSE_RETRY_FOR)
    }
}

/// Limits per plugin instance. Every field is optional; unset means the default.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LimitsConfig {
    /// Linear memory cap per instance (default 128MiB).
    pub memory: Option<ByteSize>,
    /// Wall-clock deadline of one call into the plugin (default 10s).
    pub call_timeout: Option<HumanDuration>,
    /// Largest value a plugin may return from one call (default 16MiB).
    pub max_return: Option<ByteSize>,
    /// Most handles (resources, streams, sockets) one instance may hold (default 1024).
    pub max_resources: Option<u32>,
    /// Timeout of each outgoing HTTP request made for the plugin (default 30s).
    pub http_timeout: Option<HumanDuration>,
    /// Largest HTTP response body the plugin may receive (default 64MiB).
    pub http_max_response: Option<ByteSize>,
    /// Output budget: bytes per second the plugin's stdout, stderr and `log` messages
    /// together may put into the daemon's log, across its instances (default 64KiB).
    pub output_bytes_per_second: Option<ByteSize>,
    /// Output budget: lines per second, likewise (default 100).
    pub output_lines_per_second: Option<u64>,
    /// Most instances of the plugin alive at once, busy or idle (default 64). Work
    /// needing another waits (a log's events in its durable buffer) and is retried.
    pub max_instances: Option<u32>,
    /// Instances of the shared pool kept for this plugin alone, so that no other plugin
    /// can starve it (default 4). The reserves of all plugins must fit the pool.
    pub reserved_instances: Option<u32>,
    /// Linear memory of all the plugin's instances together (default 1GiB).
    pub total_memory: Option<ByteSize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct QuarantineConfig {
    /// Consecutive failures (traps, deadlines, limits) before a plugin is quarantined.
    #[serde(default = "default_quarantine_after")]
    pub after: u32,
    /// First quarantine period; doubles on each further failure.
    #[serde(default = "default_backoff")]
    pub backoff: HumanDuration,
    #[serde(default = "default_max_backoff")]
    pub max_backoff: HumanDuration,
}

fn default_quarantine_after() -> u32 {
    3
}
fn default_backoff() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(1))
}
fn default_max_backoff() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(300))
}

impl Default for QuarantineConfig {
    fn default() -> Self {
        Self {
            after: default_quarantine_after(),
            backoff: default_backoff(),
            max_backoff: default_max_backoff(),
        }
    }
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SecretsSection {
    /// A TOML file of `name = "value"` pairs, readable by the daemon's user only (0600).
    pub file: Option<PathBuf>,
}

/// `[job-secrets.<name>]`: which jobs may name the secret `<name>` in their `secrets`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct JobSecretRule {
    /// Globs on the job's name, e.g. `["deploy-*"]`.
    pub jobs: Vec<String>,
}

/// What the operator grants one plugin. Nothing is granted by default.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PluginGrants {
    /// Where the plugin is, if not in the plugin directory under its name.
    pub path: Option<PathBuf>,
    /// Directories the plugin may use (needs capability `filesystem`).
    #[serde(default)]
    pub dirs: Vec<DirGrant>,
    /// HTTP authorities the plugin may call, as `scheme://host:port` (needs `http`).
    #[serde(default)]
    pub http: Vec<String>,
    /// PEM files of certificate authorities the plugin's HTTPS requests trust besides
    /// the public ones (a store or BMC with a private CA; needs `http`).
    #[serde(default)]
    pub tls_ca: Vec<PathBuf>,
    /// Socket addresses the plugin may connect to or listen on (needs `sockets`).
    #[serde(default)]
    pub sockets: SocketGrants,
    /// Names of secrets the plugin may read (needs `secrets`).
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Kafka topic prefixes the plugin may use (needs `kafka`; the cluster is `[kafka]`).
    #[serde(default)]
    pub kafka: KafkaGrant,
    /// Programs the plugin may run, as argv templates (needs `exec`).
    #[serde(default)]
    pub exec: Vec<ExecTemplate>,
    /// The plugin's configuration, checked against its manifest's `[config]` schema.
    #[serde(default)]
    pub config: toml::Table,
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// One program a plugin may run: `argv` with `{placeholder}` elements the plugin fills.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ExecTemplate {
    /// What the plugin calls it.
    pub name: String,
    /// The program and its arguments; `{word}` anywhere in an element is a placeholder.
    pub argv: Vec<String>,
    /// Killed past this (default 10 s).
    #[serde(default = "default_exec_timeout")]
    pub timeout: HumanDuration,
    /// Stdout and stderr kept, each (default 1 MiB); the rest is dropped and said so.
    #[serde(default = "default_exec_output")]
    pub max_output: ByteSize,
}

fn default_exec_timeout() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(10))
}
fn default_exec_output() -> ByteSize {
    ByteSize(1 << 20)
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct KafkaGrant {
    /// Topic (and consumer group) name prefixes, e.g. "trellis.".
    #[serde(default)]
    pub topics: Vec<String>,
}

/// `[kafka]`: the cluster plugins with the `kafka` capability reach, through the host.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct KafkaSection {
    /// Bootstrap brokers, `host:port[,host:port...]`.
    pub brokers: String,
    /// librdkafka settings: security.protocol, ssl.ca.location, sasl.mechanism, ...
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    pub sasl_username: Option<String>,
    /// The name of the SASL password in the secrets file (never the value).
    pub sasl_password_secret: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DirGrant {
    /// The directory on the host. Must exist.
    pub host: PathBuf,
    /// Where the plugin sees it, e.g. "/logs".
    pub guest: String,
    #[serde(default)]
    pub mode: DirMode,
    /// Most bytes the directory may hold through this plugin's writes (read-write
    /// grants only); writes past it fail in the plugin with no-space.
    #[serde(default)]
    pub quota: Option<ByteSize>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirMode {
    #[default]
    ReadOnly,
    ReadWrite,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SocketGrants {
    /// `ip:port` the plugin may connect to (TCP).
    #[serde(default)]
    pub connect: Vec<String>,
    /// `ip:port` the plugin may listen on (TCP).
    #[serde(default)]
    pub bind: Vec<String>,
}

/// One mistake in a configuration file: where, what, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The dotted path of the field, e.g. `plugins.file-logging.dirs[0].host`.
    pub field: String,
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.field, self.problem)?;
        if !self.fix.is_empty() {
            write!(f, " (fix: {})", self.fix)?;
        }
        Ok(())
    }
}

/// Every problem found in one file.
#[derive(Debug, Clone)]
pub struct Problems {
    pub file: String,
    pub items: Vec<Problem>,
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {} problem{}",
            self.file,
            self.items.len(),
            if self.items.len() == 1 { "" } else { "s" }
        )?;
        for p in &self.items {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

impl DaemonConfig {
    /// Read and check a daemon configuration file. Relative paths in it are taken
    /// relative to the file's directory.
    pub fn load(path: &Path) -> Result<DaemonConfig, Problems> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Problems {
            file: file.clone(),
            items: vec![Problem {
                field: "(file)".into(),
                problem: format!("cannot read it: {e}"),
                fix: "check the path and its permissions".into(),
            }],
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, &file, base)
    }

    pub fn parse(text: &str, file: &str, base: &Path) -> Result<DaemonConfig, Problems> {
        let mut cfg: DaemonConfig = toml::from_str(text).map_err(|e| Problems {
            file: file.to_string(),
            items: vec![toml_problem(&e)],
        })?;
        cfg.resolve_paths(base);
        let items = cfg.check();
        if items.is_empty() {
            Ok(cfg)
        } else {
            Err(Problems {
                file: file.to_string(),
                items,
            })
        }
    }

    fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(p) = self.runtime.plugin_dir.as_mut() {
            abs(p)
        }
        if let Some(p) = self.runtime.cache_dir.as_mut() {
            abs(p)
        }
        if let Some(p) = self.secrets.file.as_mut() {
            abs(p)
        }
        if let Some(c) = self.controller.as_mut() {
            abs(&mut c.state_dir);
            if let Some(t) = c.tls.as_mut() {
                abs(&mut t.cert);
                abs(&mut t.key);
            }
        }
        if let Some(a) = self.agent.as_mut() {
            abs(&mut a.workspace)
        }
        for g in self.plugins.values_mut() {
            if let Some(p) = g.path.as_mut() {
                abs(p)
            }
            for d in &mut g.dirs {
                abs(&mut d.host)
            }
            for f in &mut g.tls_ca {
                abs(f)
            }
        }
    }

    /// Checks that need no plugin: values that parse but make no sense.
    fn check(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let q = &self.runtime.quarantine;
        if q.after == 0 {
            out.push(Problem {
                field: "runtime.quarantine.after".into(),
                problem: "0 would quarantine a plugin before its first failure".into(),
                fix: "use 1 or more (default 3)".into(),
            });
        }
        let pool = self.runtime.instance_pool();
        if !(1..=MAX_INSTANCE_POOL).contains(&pool) {
            out.push(Problem {
                field: "runtime.instance-pool".into(),
                problem: format!("{pool} is outside 1..={MAX_INSTANCE_POOL}"),
                fix: format!(
                    "pick a value in that range (default {})",
                    crate::runtime::engine::POOL_INSTANCES
                ),
            });
        }
        check_limits(&self.runtime.limits, "runtime.limits", pool, &mut out);
        if let Some(f) = &self.secrets.file
            && !f.is_file()
        {
            out.push(Problem {
                field: "secrets.file".into(),
                problem: format!("{} does not exist", f.display()),
                fix: "create it (name = \"value\" lines, mode 0600) or remove the key".into(),
            });
        }
        if let Some(c) = &self.controller {
            match c.http.parse::<std::net::SocketAddr>() {
                Err(_) => out.push(Problem {
                    field: "controller.http".into(),
                    problem: format!("`{}` is not an ip:port address", c.http),
                    fix: "write e.g. 127.0.0.1:8080".into(),
                }),
                Ok(a) if !a.ip().is_loopback() && c.tls.is_none() && !c.allow_plaintext_http => {
                    out.push(Problem {
                        field: "controller.http".into(),
                        problem: format!(
                            "`{}` is reachable from other machines, but the API would speak plain HTTP: tokens and job files would cross the network in clear",
                            c.http
                        ),
                        fix: "set tls = { cert = \"/etc/trellis/api.pem\", key = \"/etc/trellis/api.key\" }, bind 127.0.0.1, or (behind a TLS proxy) allow-plaintext-http = true".into(),
                    })
                }
                Ok(_) => {}
            }
            if let Some(t) = &c.tls {
                for (k, f) in [("cert", &t.cert), ("key", &t.key)] {
                    if !f.is_file() {
                        out.push(Problem {
                            field: format!("controller.tls.{k}"),
                            problem: format!("{} does not exist", f.display()),
                            fix: format!(
                                "point it at the API's PEM {}",
                                if k == "cert" {
                                    "certificate chain"
                                } else {
                                    "private key"
                                }
                            ),
                        });
                    }
                }
            }
            for (i, h) in c.hosts.iter().enumerate() {
                // a bare name or IP: `Host`'s port is not compared
                let ok = h.parse::<std::net::Ipv6Addr>().is_ok()
                    || (!h.is_empty()
                        && h.chars()
                            .all(|ch| ch.is_ascii_alphanumeric() || ".-".contains(ch)));
                if !ok {
                    out.push(Problem {
                        field: format!("controller.hosts[{i}]"),
                        problem: format!("`{h}` is not a host name"),
                        fix: "write the bare name clients use, e.g. \"ci.example.com\" (no scheme, port or path)".into(),
                    });
                }
            }
            for (key, value, unit) in [
                ("keep-runs", c.keep_runs, "finished runs"),
                ("keep-days", c.keep_days, "days"),
            ] {
                if let Some(v) = value
                    && v < 1
                {
                    out.push(Problem {
                        field: format!("controller.{key}"),
                        problem: format!(
                            "{v} would remove every finished run (it keeps at most this many {unit})"
                        ),
                        fix: format!(
                            "use 1 or more (e.g. {key} = {}), or remove the key to keep every finished run",
                            if key == "keep-runs" { 10000 } else { 90 }
                        ),
                    });
                }
            }
            if c.agents.is_empty() {
                out.push(Problem {
                    field: "controller.agents".into(),
                    problem: "no agents: nothing could run".into(),
                    fix: "add agents = { \"build-1\" = \"agent-build-1\" } (agent name = the name of its secret in the secrets file)".into(),
                });
            }
            if !c.agents.is_empty() && self.secrets.file.is_none() {
                out.push(Problem {
                    field: "secrets.file".into(),
                    problem: "agents need secrets, but no secrets file is set".into(),
                    fix: "set [secrets] file = \"/etc/trellis/secrets.toml\" (mode 0600)".into(),
                });
            }
        }
        if let Some(a) = &self.agent {
            if !(1..=MAX_EXECUTORS).contains(&a.executors) {
                out.push(Problem {
                    field: "agent.executors".into(),
                    problem: format!(
                        "{} executors: an agent runs from 1 to {MAX_EXECUTORS} runs at once",
                        a.executors
                    ),
                    fix: "set executors = 1 (one run at a time, the default) or more, e.g. the number of cores".into(),
                });
            }
            if a.name.is_empty() {
                out.push(Problem {
                    field: "agent.name".into(),
                    problem: "empty".into(),
                    fix: "name this agent, as the controller's [controller.agents] knows it".into(),
                });
            }
            if self.secrets.file.is_none() {
                out.push(Problem {
                    field: "secrets.file".into(),
                    problem: "the agent's secret must come from a secrets file".into(),
                    fix: "set [secrets] file = \"/etc/trellis/secrets.toml\" (mode 0600)".into(),
                });
            }
        }
        let daemon = self.daemon_credentials();
        for (name, rule) in &self.job_secrets {
            let at = format!("job-secrets.{name}");
            if let Some(used_for) = daemon.get(name) {
                out.push(Problem {
                    field: at.clone(),
                    problem: format!(
                        "`{name}` is {used_for}: a daemon credential is never given to a job"
                    ),
                    fix: format!(
                        "store a separate secret for jobs in the secrets file and scope that one: [job-secrets.<its name>] jobs = {:?}",
                        rule.jobs
                    ),
                });
            }
            if rule.jobs.is_empty() {
                out.push(Problem {
                    field: format!("{at}.jobs"),
                    problem: "no job may use it".into(),
                    fix: "list the jobs that may, by name or glob: jobs = [\"deploy-*\"]".into(),
                });
            }
            for (i, g) in rule.jobs.iter().enumerate() {
                if let Err(e) = glob::Pattern::new(g) {
                    out.push(Problem {
                        field: format!("{at}.jobs[{i}]"),
                        problem: format!("`{g}` is not a glob: {e}"),
                        fix: "write a job name or a glob on it, e.g. \"deploy-*\"".into(),
                    });
                }
            }
        }
        for (name, g) in &self.plugins {
            let at = format!("plugins.{name}");
            check_limits(&g.limits, &format!("{at}.limits"), pool, &mut out);
            for (i, d) in g.dirs.iter().enumerate() {
                if !d.host.is_dir() {
                    out.push(Problem {
                        field: format!("{at}.dirs[{i}].host"),
                        problem: format!("{} is not an existing directory", d.host.display()),
                        fix: "create the directory or correct the path".into(),
                    });
                }
                if !d.guest.starts_with('/') {
                    out.push(Problem {
                        field: format!("{at}.dirs[{i}].guest"),
                        problem: format!("`{}` is not an absolute path", d.guest),
                        fix: format!("write it as `/{}`", d.guest.trim_start_matches("./")),
                    });
                }
            }
            for (i, h) in g.http.iter().enumerate() {
                if let Err(e) = crate::capabilities::http::Authority::parse(h) {
                    out.push(Problem {
                        field: format!("{at}.http[{i}]"),
                        problem: e,
                        fix: "write scheme://host:port, e.g. https://es.internal:9200".into(),
                    });
                }
            }
            for (kind, list) in [("connect", &g.sockets.connect), ("bind", &g.sockets.bind)] {
                for (i, a) in list.iter().enumerate() {
                    if a.parse::<std::net::SocketAddr>().is_err() {
                        out.push(Problem {
                            field: format!("{at}.sockets.{kind}[{i}]"),
                            problem: format!("`{a}` is not an ip:port address"),
                            fix: "write e.g. 127.0.0.1:7000 or [::1]:7000 (names are not resolved)"
                                .into(),
                        });
                    }
                }
            }
        }
        out
    }
}

impl DaemonConfig {
    /// The secrets the daemon itself uses, by name, each with what uses it: agents'
    /// secrets, plugins' granted secrets (stores' keys, fence devices' passwords), the
    /// Kafka SASL password and fence device parameters. None of them is ever given to a
    /// job (see `jobs::secrets`).
    pub fn daemon_credentials(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        if let Some(c) = &self.controller {
            for (agent, secret) in &c.agents {
                out.entry(secret.clone()).or_insert_with(|| {
                    format!("the secret of agent `{agent}` ([controller] agents)")
                });
            }
        }
        if let Some(a) = &self.agent {
            out.entry(a.secret.clone())
                .or_insert_with(|| "this agent's own secret ([agent] secret)".into());
        }
        for (plugin, g) in &self.plugins {
            for secret in &g.secrets {
                out.entry(secret.clone()).or_insert_with(|| {
                    format!("granted to plugin `{plugin}` ([plugins.{plugin}] secrets)")
                });
            }
        }
        if let Some(name) = self
            .kafka
            .as_ref()
            .and_then(|k| k.sasl_password_secret.as_ref())
        {
            out.entry(name.clone())
                .or_insert_with(|| "the Kafka SASL password ([kafka] sasl-password-secret)".into());
        }
        if let Some(ha) = &self.ha {
            for (peer, f) in &ha.fencing {
                for d in f.levels.iter().flatten() {
                    for value in d.params.values() {
                        out.entry(value.clone()).or_insert_with(|| {
                            format!(
                                "a parameter of fence device `{}` for `{peer}` ([ha.fencing])",
                                d.plugin
                            )
                        });
                    }
                }
            }
        }
        out
    }
}

/// The largest `[runtime] instance-pool`: each slot reserves address space for its
/// memories, tables and stack (several GiB of it, none of it memory until used).
pub const MAX_INSTANCE_POOL: u32 = 4096;

fn check_limits(l: &LimitsConfig, at: &str, pool: u32, out: &mut Vec<Problem>) {
    if let Some(m) = l.memory
        && (m.0 < (1 << 20) || m.0 > crate::runtime::limits::MAX_MEMORY)
    {
        out.push(Problem {
            field: format!("{at}.memory"),
            problem: format!(
                "{m} is outside 1MiB..={}",
                ByteSize(crate::runtime::limits::MAX_MEMORY)
            ),
            fix: "pick a value in that range (default 128MiB)".into(),
        });
    }
    if let Some(t) = l.call_timeout
        && t.0.is_zero()
    {
        out.push(Problem {
            field: format!("{at}.call-timeout"),
            problem: "a zero deadline fails every call".into(),
            fix: "use e.g. 10s".into(),
        });
    }
    if let Some(ByteSize(0)) = l.output_bytes_per_second {
        out.push(Problem {
            field: format!("{at}.output-bytes-per-second"),
            problem: "0 drops every line the plugin writes".into(),
            fix: "use e.g. 64KiB (the default)".into(),
        });
    }
    if let Some(0) = l.output_lines_per_second {
        out.push(Problem {
            field: format!("{at}.output-lines-per-second"),
            problem: "0 drops every line the plugin writes".into(),
            fix: "use e.g. 100 (the default)".into(),
        });
    }
    if let Some(n) = l.max_instances
        && (n == 0 || n > pool)
    {
        out.push(Problem {
            field: format!("{at}.max-instances"),
            problem: format!("{n} is outside 1..={pool} (the instance pool all plugins share)"),
            fix: "pick a value in that range (default 64)".into(),
        });
    }
    if let Some(n) = l.reserved_instances
        && n > pool
    {
        out.push(Problem {
            field: format!("{at}.reserved-instances"),
            problem: format!("{n} is more than the instance pool all plugins share ({pool})"),
            fix: "pick a value in 0..=max-instances (default 4)".into(),
        });
    }
    if let (Some(reserved), Some(max)) = (l.reserved_instances, l.max_instances)
        && reserved > max
    {
        out.push(Problem {
            field: format!("{at}.reserved-instances"),
            problem: format!("{reserved} reserved instances are more than max-instances ({max})"),
            fix: "reserve at most max-instances".into(),
        });
    }
    if let (Some(total), Some(one)) = (l.total_memory, l.memory)
        && total.0 < one.0
    {
        out.push(Problem {
            field: format!("{at}.total-memory"),
            problem: format!(
                "{total} for all instances together is less than one instance's memory ({one})"
            ),
            fix: "raise total-memory, or lower memory with it".into(),
        });
    }
    if let Some(m) = l.total_memory
        && m.0 < (1 << 20)
    {
        out.push(Problem {
            field: format!("{at}.total-memory"),
            problem: format!("{m} leaves no room for any instance"),
            fix: "use at least the per-instance memory limit (default 1GiB)".into(),
        });
    }
    if let Some(0) = l.max_resources {
        out.push(Problem {
            field: format!("{at}.max-resources"),
            problem: "0 leaves no room for any handle".into(),
            fix: "use e.g. 1024".into(),
        });
    }
}

/// Turn a TOML/serde error into a problem naming the field.
pub fn toml_problem(e: &toml::de::Error) -> Problem {
    let msg = e.message().to_string();
    let fix = if let Some(rest) = msg.strip_prefix("unknown field ") {
        format!(
            "remove or rename it; {}",
            rest.split_once(", ")
                .map(|x| x.1)
                .unwrap_or("see the documentation")
        )
    } else if msg.starts_with("missing field") {
        "add it".to_string()
    } else {
        String::new()
    };
    let location = e
        .span()
        .map(|s| format!(" (at byte {})", s.start))
        .unwrap_or_default();
    Problem {
        field: field_from_toml_error(e),
        problem: format!("{msg}{location}"),
        fix,
    }
}

fn field_from_toml_error(e: &toml::de::Error) -> String {
    // toml does not expose the key path; its rendered message names the line instead.
    let rendered = e.to_string();
    rendered
        .lines()
        .find(|l| l.contains('|') && l.contains('='))
        .and_then(|l| l.split('|').nth(1))
        .and_then(|l| l.split('=').next())
        .map(|k| k.trim().to_string())
        .filter(|k| !k.is_empty())
        .unwrap_or_else(|| {
            rendered
                .lines()
                .next()
                .unwrap_or("(file)")
                .trim()
                .to_string()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        match DaemonConfig::parse(text, "trellis.toml", Path::new("/")) {
            Ok(_) => vec![],
            Err(p) => p.items.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn the_api_is_not_served_in_clear_off_loopback() {
        let controller = |extra: &str| {
            problems(&format!(
                "[secrets]\nfile = \"/etc/passwd\"\n[controller]\nstate-dir = \"/tmp\"\nagents = {{ a = \"s\" }}\n{extra}"
            ))
        };
        assert!(controller("http = \"127.0.0.1:8080\"").is_empty());
        assert!(controller("http = \"[::1]:8080\"").is_empty());
        let p = controller("http = \"0.0.0.0:8080\"");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("controller.http")
                && p[0].contains("tls = {")
                && p[0].contains("allow-plaintext-http = true"),
            "{p:?}"
        );
        assert!(controller("http = \"0.0.0.0:8080\"\nallow-plaintext-http = true").is_empty());
        let p = controller(
            "http = \"10.0.0.1:8080\"\ntls = { cert = \"/nonexistent/c.pem\", key = \"/nonexistent/k.pem\" }",
        );
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("controller.tls.cert") && p[1].contains("controller.tls.key"));
        let p = controller(
            "hosts = [\"https://ci.example.com/\", \"ci:8080\", \"::1\", \"ci.example.com\"]",
        );
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[0].contains("controller.hosts[0]") && p[1].contains("controller.hosts[1]"),
            "{p:?}"
        );
        let p = controller("tls = { cert = \"/c\" }");
        assert!(p[0].contains("key"), "{p:?}");
    }

    #[test]
    fn an_agent_runs_at_least_one_run_at_a_time() {
        let agent = |extra: &str| {
            problems(&format!(
                "[secrets]\nfile = \"/etc/passwd\"\n[agent]\nname = \"a\"\nsecret = \"s\"\nworkspace = \"/tmp\"\n{extra}"
            ))
        };
        assert!(agent("").is_empty(), "{:?}", agent(""));
        assert!(agent("executors = 4").is_empty());
        for bad in ["executors = 0", "executors = 5000"] {
            let p = agent(bad);
            assert_eq!(p.len(), 1, "{p:?}");
            assert!(
                p[0].contains("agent.executors") && p[0].contains("fix:"),
                "{p:?}"
            );
        }
    }

    #[test]
    fn retention_keys_are_checked() {
        let controller = |extra: &str| {
            problems(&format!(
                "[secrets]\nfile = \"/etc/passwd\"\n[controller]\nstate-dir = \"/tmp\"\nagents = {{ a = \"s\" }}\n{extra}"
            ))
        };
        assert!(controller("keep-runs = 1000\nkeep-days = 30").is_empty());
        let p = controller("keep-runs = 0\nkeep-days = -3");
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[0].contains("controller.keep-runs") && p[0].contains("1 or more"),
            "{p:?}"
        );
        assert!(
            p[1].contains("controller.keep-days") && p[1].contains("remove the key"),
            "{p:?}"
        );
        let p = controller("keep-days = \"30d\"");
        assert!(
            p[0].contains("keep-days") && p[0].contains("expected i64"),
            "{p:?}"
        );
    }

    #[test]
    fn empty_config_is_valid() {
        assert!(problems("").is_empty());
    }

    #[test]
    fn unknown_keys_are_named_with_alternatives() {
        let p = problems("[plugins.x]\ndir = []\n");
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("unknown field `dir`"), "{p:?}");
        assert!(p[0].contains("`dirs`"), "{p:?}");
    }

    #[test]
    fn bad_values_name_the_field_and_the_fix() {
        let p = problems(
            r#"
            [runtime.limits]
            memory = "64 parsecs"
            "#,
        );
        assert!(p[0].contains("not a size unit"), "{p:?}");
        let p = problems(
            r#"
            [plugins.es]
            http = ["es.local:9200"]
            sockets = { connect = ["localhost:80"] }
            dirs = [{ host = "/definitely/not/here", guest = "logs" }]
            limits = { memory = "100GiB", max-resources = 0, output-lines-per-second = 0 }
            "#,
        );
        let all = p.join("\n");
        assert!(all.contains("plugins.es.http[0]"), "{all}");
        assert!(all.contains("plugins.es.sockets.connect[0]"), "{all}");
        assert!(all.contains("plugins.es.dirs[0].host"), "{all}");
        assert!(
            all.contains("plugins.es.dirs[0].guest") && all.contains("/logs"),
            "{all}"
        );
        assert!(all.contains("plugins.es.limits.memory"), "{all}");
        assert!(all.contains("plugins.es.limits.max-resources"), "{all}");
        assert!(
            all.contains("plugins.es.limits.output-lines-per-second"),
            "{all}"
        );
        assert!(all.contains("fix:"), "{all}");
    }

    #[test]
    fn the_instance_pool_bounds_the_instance_budgets() {
        let over = "[plugins.t]\nlimits = { max-instances = 600, reserved-instances = 600 }\n";
        let p = problems(over).join("\n");
        assert!(p.contains("plugins.t.limits.max-instances"), "{p}");
        assert!(p.contains("plugins.t.limits.reserved-instances"), "{p}");
        let raised = format!("[runtime]\ninstance-pool = 1024\n{over}");
        assert!(problems(&raised).is_empty(), "{:?}", problems(&raised));
        let p = problems("[runtime]\ninstance-pool = 0\n").join("\n");
        assert!(
            p.contains("runtime.instance-pool") && p.contains("fix:"),
            "{p}"
        );
    }

    #[test]
    fn relative_paths_are_taken_from_the_file() {
        let cfg = DaemonConfig::parse(
            "[runtime]\nplugin-dir = \"bundle\"\n",
            "x",
            Path::new("/etc/trellis"),
        )
        .unwrap();
        assert_eq!(
            cfg.runtime.plugin_dir.unwrap(),
            Path::new("/etc/trellis/bundle")
        );
    }
}

//! The `trellis` command line.

mod client;
mod daemon;
mod fence;
mod plugin;
mod scaffold;
mod token;
mod up;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "trellis",
    version,
    about = "Trellis: CI jobs on agents, with transport, logging, log browsing and fencing as sandboxed WebAssembly plugins",
    after_help = "Serves trellis:plugin@0.1.0, @0.2.0 and @0.3.0 (see `trellis plugin check --help`). Docs: docs/ARCHITECTURE.md, docs/PLUGINS.md."
)]
pub struct Cli {
    /// Log format of the daemon's own diagnostics.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Inspect and validate plugins.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Validate a daemon configuration file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run the controller: accept agents, place runs, serve the HTTP API.
    Controller {
        /// The daemon configuration (TOML) with a [controller] section.
        #[arg(long)]
        config: PathBuf,
        /// Check the configuration (and that its plugins load), then exit.
        #[arg(long)]
        check_config: bool,
    },
    /// Run an agent: connect to the controller and run the steps it orders.
    Agent {
        /// The daemon configuration (TOML) with an [agent] section.
        #[arg(long)]
        config: PathBuf,
        /// Check the configuration (and that its transport loads), then exit.
        #[arg(long)]
        check_config: bool,
    },
    /// Submit a job to the controller; with --follow, stream its log and exit with its status.
    Run {
        job: PathBuf,
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// List runs, newest first, a page at a time (--all: every page).
    #[command(
        after_help = "Examples:\n  trellis runs                          the newest 50 runs\n  trellis runs --status failed --label gpu --limit 20\n  trellis runs --cursor r-000951        the page after the one that ended at r-000951\n  trellis runs --all --job nightly      every run of job `nightly`"
    )]
    Runs {
        /// Runs per page (1 to 500).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Start after this run: the cursor a previous page printed.
        #[arg(long)]
        cursor: Option<String>,
        /// Every page, not just the first.
        #[arg(long, conflicts_with = "cursor")]
        all: bool,
        /// Only runs with this status: queued, running, succeeded, failed, timed-out, cancelled, lost.
        #[arg(long)]
        status: Option<String>,
        /// Only runs of this job.
        #[arg(long)]
        job: Option<String>,
        /// Only runs placed on this agent.
        #[arg(long)]
        agent: Option<String>,
        /// Only runs whose job asks for this agent label.
        #[arg(long)]
        label: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Print a run's log (all of it, one step, or the last N lines), or follow it.
    Logs {
        run: String,
        #[arg(long)]
        step: Option<String>,
        #[arg(long)]
        tail: Option<u32>,
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show the runs waiting for an agent, in the order they will be placed, and why each
    /// waits (no agent with its label connected, or all of the label's executors busy);
    /// then each label's executors. A waiting run can be cancelled (`trellis cancel RUN`).
    #[command(
        after_help = "A submitted run waits `queued` until an agent with the job's label has a free executor ([agent] executors, default 1). Higher job `priority` goes first, then first submitted first; a job's `queue-timeout` ends a run that waited longer."
    )]
    Queue {
        /// Print the JSON of GET /api/queue instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Cancel a run (a queued one ends at once).
    Cancel {
        run: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// List a run's artifacts, or download one (checked against its SHA-256).
    Artifacts {
        run: String,
        /// Download this artifact (its name as listed).
        #[arg(long, value_name = "NAME")]
        get: Option<String>,
        /// Where to write it (default: its file name, in the current directory; `-`: stdout).
        #[arg(long, short, value_name = "FILE", requires = "get")]
        output: Option<PathBuf>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Run a fence-agent plugin as a ClusterLabs fence agent (for Pacemaker's fencer):
    /// options as key=value lines on stdin (or fence-agent options), the same actions,
    /// metadata XML and exit codes (0 ok / status ON, 2 status OFF, 1 failed). Install
    /// it as a `fence_*` program with a wrapper naming the plugin.
    #[command(
        after_help = "Example wrapper (/usr/sbin/fence_trellis_redfish):\n  #!/bin/sh\n  exec trellis fence --name fence_trellis_redfish --plugin /usr/lib/trellis/redfish-fence --config /etc/trellis/fence.toml \"$@\""
    )]
    Fence {
        /// The fence-agent plugin (its directory, plugin.toml or .wasm).
        #[arg(long)]
        plugin: PathBuf,
        /// A daemon configuration with the plugin's grants in [plugins.<name>].
        #[arg(long)]
        config: Option<PathBuf>,
        /// The agent's name in its metadata (default: the plugin's own).
        #[arg(long)]
        name: Option<String>,
        /// fence-agent options (-o off --ip=...); none: key=value lines on stdin.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        options: Vec<String>,
    },
    /// Active/passive controllers (`[ha]`).
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// List connected agents.
    Agents {
        #[command(flatten)]
        conn: Conn,
    },
    /// Manage API tokens (on the controller's host: they are kept, hashed, in its
    /// state directory; a running controller sees changes at once).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Run a job on this machine: a controller and local agents in one process, over
    /// the default bundle (TCP transport on loopback, file logging). Streams the log and
    /// exits with the run's status.
    Up {
        /// The job file (TOML).
        job: PathBuf,
        /// The plugin bundle (default: $TRELLIS_BUNDLE_DIR).
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Where runs and logs are kept.
        #[arg(long, default_value = "trellis-state")]
        state: PathBuf,
        /// How many local agents to start.
        #[arg(long, default_value_t = 1)]
        agents: u32,
        /// A secrets file (name = "value", mode 0600) for the job's `secrets`.
        #[arg(long)]
        secrets: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Each controller's role, fencing token, last fencing and its result, and the
    /// leader lease as etcd has it. Exits 1 when no controller is active.
    Status {
        /// A controller to ask; repeat for each (default: $TRELLIS_SERVER or
        /// http://127.0.0.1:8080).
        #[arg(long)]
        server: Vec<String>,
        /// Print JSON (each controller's `GET /api/cluster`).
        #[arg(long)]
        json: bool,
        /// The API token (default: $TRELLIS_TOKEN); a viewer's is enough.
        #[arg(long, value_name = "TOKEN")]
        token: Option<String>,
        /// A CA certificate (PEM) to trust for https:// servers, beside the public
        /// roots (default: $TRELLIS_CA).
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
    },
}

/// How a CLI command reaches the controller's API.
#[derive(clap::Args)]
pub struct Conn {
    /// The controller, http:// or https:// (default: $TRELLIS_SERVER or
    /// http://127.0.0.1:8080).
    #[arg(long)]
    server: Option<String>,
    /// The API token (default: $TRELLIS_TOKEN). An admin makes one with
    /// `trellis token create NAME --role viewer|operator|admin --config CONTROLLER.toml`.
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// A CA certificate (PEM) to trust for an https:// controller, beside the public
    /// roots (default: $TRELLIS_CA).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
}

impl Conn {
    fn server(self) -> anyhow::Result<client::Server> {
        client::Server::new(self.server, self.token, self.ca)
    }
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Make a token and print it (once: only its SHA-256 is kept).
    Create {
        /// Its name: run records' `submitted_by`, and what `revoke` takes.
        name: String,
        /// viewer reads; operator also submits and cancels; admin also reloads plugins
        /// and manages tokens.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(["viewer", "operator", "admin"]))]
        role: String,
        /// The controller's configuration (its [controller] state-dir holds the tokens).
        #[arg(long)]
        config: PathBuf,
    },
    /// List the tokens: name, role, when made.
    List {
        #[arg(long)]
        config: PathBuf,
    },
    /// Revoke a token: it (and browser sessions signed in with it) stop working at once.
    Revoke {
        name: String,
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum PluginCommand {
    /// Validate plugins without the daemon: manifest, component, exports against their
    /// world, WIT version served, capabilities and (with --config) grants and a trial
    /// start with the operator's configuration.
    Check {
        /// plugin.toml files, directories holding one, or .wasm files with one beside them.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// The daemon configuration whose grants and plugin config to check against.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Create a buildable plugin project for one extension point: manifest, source,
    /// build command and a README (build, check, test).
    New {
        /// The plugin's name (lowercase letters, digits, `-`).
        name: String,
        /// The extension point it fills.
        #[arg(long, value_enum)]
        point: PointArg,
        /// The language: rust (on trellis-sdk), python (componentize-py) or js
        /// (componentize-js); every point in each.
        #[arg(long, default_value = "rust", value_parser = ["rust", "python", "js"])]
        lang: String,
        /// Where to create it (default: ./NAME).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The trellis-sdk a Rust project depends on (the `sdk` folder of a Trellis
        /// checkout; default: the one this trellis was built from, if it is still there).
        /// Python and JavaScript projects get their own copy of the WIT instead.
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Run the conformance kit for the plugin's extension points against the real
    /// host runtime, and print a pass/fail list with the reason for each failure.
    #[command(after_help = "Examples:\n  \
        trellis plugin test bundle/file-logging --with bundle/file-browser --config kit.toml\n  \
        trellis plugin test bundle/tcp-transport --config kit.toml\n  \
        trellis plugin test bundle/redfish-fence --config kit.toml --param ip=127.0.0.1 --param ipport=8000 \\\n      \
        --param username=admin --param password=bmc\n\n\
        The configuration grants the plugin what it needs for the test (a scratch directory, a loopback\n\
        address, a test BMC). Fencing is real: point the kit at a test device, never at a production node.")]
    Test {
        /// The plugin (plugin.toml, its directory, or the .wasm with one beside it).
        plugin: PathBuf,
        /// The partner a logging method is tested with (its log browser), or a browser with.
        #[arg(long)]
        with: Option<PathBuf>,
        /// A daemon configuration with the plugins' grants in [plugins.<name>].
        #[arg(long)]
        config: Option<PathBuf>,
        /// A fence device parameter, `key=value` (repeat); a secret parameter names a
        /// secret of --config's [secrets].
        #[arg(long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
    },
    /// Reload a plugin in a running daemon: its new code (from where it was loaded) is
    /// tried on a canary instance first; a broken one is refused and the old one keeps
    /// serving. Work in flight finishes on the old code. (The daemon also reloads a
    /// plugin whose files change.)
    Reload {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Describe every plugin in a plugin directory.
    List {
        /// The plugin directory (default: [runtime] plugin-dir of --config).
        dir: Option<PathBuf>,
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum PointArg {
    CommandTransport,
    LoggingMethod,
    LogBrowser,
    FenceAgent,
}

impl From<PointArg> for crate::points::Point {
    fn from(p: PointArg) -> Self {
        use crate::points::Point;
        match p {
            PointArg::CommandTransport => Point::CommandTransport,
            PointArg::LoggingMethod => Point::LoggingMethod,
            PointArg::LogBrowser => Point::LogBrowser,
            PointArg::FenceAgent => Point::FenceAgent,
        }
    }
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Check a daemon configuration file and name every mistake in it.
    Check { file: PathBuf },
}

pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TRELLIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

pub fn run(cli: Cli) -> ExitCode {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Plugin(PluginCommand::Check { paths, config }) => {
                plugin::check(&paths, config.as_deref()).await
            }
            Command::Plugin(PluginCommand::New {
                name,
                point,
                lang,
                dir,
                sdk,
            }) => scaffold::new_plugin(scaffold::NewPlugin {
                name: &name,
                point: point.into(),
                lang: &lang,
                dir: dir.as_deref(),
                sdk: sdk.as_deref(),
            }),
            Command::Plugin(PluginCommand::Reload { name, conn }) => {
                client::reload_plugin(&conn.server()?, &name).await
            }
            Command::Plugin(PluginCommand::Test {
                plugin,
                with,
                config,
                params,
            }) => plugin::test(&plugin, with.as_deref(), config.as_deref(), &params).await,
            Command::Plugin(PluginCommand::List { dir, config, json }) => {
                plugin::list(dir.as_deref(), config.as_deref(), json).await
            }
            Command::Config(ConfigCommand::Check { file }) => plugin::check_config(&file),
            Command::Controller {
                config,
                check_config,
            } => daemon::controller(&config, check_config).await,
            Command::Agent {
                config,
                check_config,
            } => daemon::agent(&config, check_config).await,
            Command::Run { job, follow, conn } => client::run(&conn.server()?, &job, follow).await,
            Command::Runs {
                limit,
                cursor,
                all,
                status,
                job,
                agent,
                label,
                conn,
            } => {
                let filters = client::RunFilters {
                    status,
                    job,
                    agent,
                    label,
                };
                client::runs(&conn.server()?, limit, cursor, all, &filters).await
            }
            Command::Queue { json, conn } => client::queue(&conn.server()?, json).await,
            Command::Logs {
                run,
                step,
                tail,
                follow,
                conn,
            } => client::logs(&conn.server()?, &run, step, tail, follow).await,
            Command::Cancel { run, conn } => client::cancel(&conn.server()?, &run).await,
            Command::Agents { conn } => client::agents(&conn.server()?).await,
            Command::Token(t) => token::run(t),
            Command::Cluster(ClusterCommand::Status {
                server,
                json,
                token,
                ca,
            }) => {
                let servers = if server.is_empty() {
                    vec![client::Server::new(None, token, ca)?]
                } else {
                    server
                        .into_iter()
                        .map(|s| client::Server::new(Some(s), token.clone(), ca.clone()))
                        .collect::<anyhow::Result<_>>()?
                };
                client::cluster_status(&servers, json).await
            }
            Command::Fence {
                plugin,
                config,
                name,
                options,
            } => {
                fence::fence(fence::FenceCall {
                    plugin: &plugin,
                    config: config.as_deref(),
                    name: name.as_deref(),
                    args: &options,
                })
                .await
            }
            Command::Artifacts {
                run,
                get,
                output,
                conn,
            } => {
                let server = conn.server()?;
                match get {
                    Some(name) => client::get_artifact(&server, &run, &name, output).await,
                    None => client::artifacts(&server, &run).await,
                }
            }
            Command::Up {
                job,
                bundle,
                state,
                agents,
                secrets,
            } => {
                up::up(up::UpOptions {
                    job,
                    bundle,
                    state,
                    agents,
                    secrets,
                })
                .await
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

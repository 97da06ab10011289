//! The controller role: accepts agents, places runs on them, records run state in its
//! state directory and sends run output to the logging method.

pub mod artifacts;
pub mod queue;
pub mod state;

use crate::ha::token::StateGate;
use crate::jobs::Job;
use crate::jobs::secrets::{JobSecrets, SecretRefusal};
use crate::points::log_set::{self, LeftBehind, LogSet, OpenLog};
use crate::points::transport::{self, Link, Listener};
use crate::protocol::{self, RunOutcome, ToAgent, ToController};
use crate::runtime::Plugin;
use crate::session::Session;
use crate::session::link::{
    HANDSHAKE_TIMEOUT, Hello, LinkDown, Liveness, challenge, commit_handled, exchange, welcome,
};
use crate::wit::command_transport::Lane;
use crate::wit::logging_method::Side;
use crate::wit::types::LogMetadata;
use state::{LogLocator, RunRecord, RunStatus, RunStore, StepStatus};
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc};
use trellis_sdk::events::BatchBuilder;

/// How often a link re-checks a condition nothing signals: a full log buffer regaining
/// room (back-pressure), a superseded link letting go (a reconnect). Never while idle:
/// an idle link sleeps until a frame arrives, one is due out, or a heartbeat is due.
const RECHECK: Duration = Duration::from_millis(5);

pub struct ControllerConfig {
    /// Names this controller in every log's metadata (JEP-212's instance id).
    pub instance_id: String,
    pub state_dir: PathBuf,
    /// Agent name -> its secret.
    pub agents: HashMap<String, String>,
    /// The secrets jobs may use, each scoped to some jobs (`[job-secrets]`); nothing
    /// else (no daemon credential) is ever given to a job.
    pub secrets: JobSecrets,
    /// How often an idle link says it is alive (see `session::link::Liveness`).
    pub heartbeat: Duration,
    /// An agent out of contact this long has its in-flight runs marked `lost`. Long
    /// enough to ride out a reconnect: a cut link resumes without losing the run.
    pub agent_lost_after: Duration,
    /// Bytes of log output that may wait on disk for the logging plugin (see
    /// `points::log_buffer`); when full, output is held back.
    pub log_buffer_limit: u64,
    /// The start-of-event pattern for jobs that set none (None: one line, one event).
    pub multiline_start: Option<String>,
    /// This controller's fencing token while it is the active one (0: no HA). Its
    /// writes to the state directory and its commands to agents carry it, and are
    /// refused once a newer token was seen (see `ha::token`).
    pub fencing_token: u64,
    /// Which finished runs are removed, with their artifacts (`[controller] keep-runs`,
    /// `keep-days`; default: all kept).
    pub retention: state::Retention,
}

/// How often retention looks for finished runs past `keep-days` (and after each run
/// that finishes past `keep-runs`).
const RETENTION_EVERY: Duration = Duration::from_secs(600);

/// Defaults for `ControllerConfig::agent_lost_after` and `log_buffer_limit`.
pub use crate::config::defaults::{DEFAULT_AGENT_LOST_AFTER, DEFAULT_LOG_BUFFER_LIMIT};

/// Something that changed, for followers (CLI, API).
#[derive(Debug, Clone)]
pub enum Update {
    Line {
        run: String,
        step: String,
        seq: u64,
        text: String,
    },
    /// Boxed: a run record is much larger than a line.
    Run(Box<RunRecord>),
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Secret(#[from] SecretRefusal),
    #[error(
        "job `{job}` names {what} `{name}`, which this controller does not load; add it to [controller] {key} (loaded: {loaded})"
    )]
    UnknownLogPlugin {
        job: String,
        what: &'static str,
        name: String,
        key: &'static str,
        loaded: String,
    },
    #[error(
        "no agent with label `{label}` has logging method `{method}`, which writes from the agent; add it to those agents' [agent] logging-methods (with its grants), or choose another method"
    )]
    NoAgentWithLogMethod { label: String, method: String },
    #[error("cannot record the run: {0}")]
    State(#[from] std::io::Error),
    /// The state directory's filesystem is full: nothing is accepted that is not on disk.
    #[error(
        "the controller's state directory {} is full ({error}): the run was not accepted. Free space on its filesystem (or move [controller] state-dir to a larger one), then submit again; runs already accepted go on and are written once space returns",
        dir.display()
    )]
    StateFull { dir: PathBuf, error: std::io::Error },
}

struct AgentSlot {
    labels: Vec<String>,
    /// How many runs it runs at once (`Hello::executors`).
    executors: u32,
    /// The agent-side logging methods the agent has loaded (see `Hello::log_methods`).
    log_methods: Vec<String>,
    connected: bool,
    /// Since when the agent is out of contact (None while connected).
    away_since: Option<Instant>,
    /// Numbers the agent's links; only the newest one serves it.
    link: u64,
    /// The agent process the session belongs to (see `Hello::session`).
    agent_session: String,
    orders: mpsc::Sender<ToAgent>,
    /// The session and its order queue wait here while the agent is not connected.
    parked: Option<(Session, mpsc::Receiver<ToAgent>)>,
    /// Wakes the link serving the agent when a newer link supersedes it.
    superseded: Arc<tokio::sync::Notify>,
}

impl AgentSlot {
    /// An agent this controller process has not heard from yet.
    fn unknown() -> AgentSlot {
        let (tx, rx) = mpsc::channel(1024);
        AgentSlot {
            labels: vec![],
            executors: 1,
            log_methods: vec![],
            connected: false,
            away_since: Some(Instant::now()),
            agent_session: String::new(),
            link: 0,
            orders: tx,
            parked: Some((Session::default(), rx)),
            superseded: Arc::default(),
        }
    }
}

/// The plugins a controller logs with (JEP-212's locator): the logging methods, the
/// default first, and the names of the browsers jobs may name, the default first (the
/// HTTP API holds the browsers themselves; see `api::Browsers`).
pub struct LogPlugins {
    pub methods: Vec<Arc<Plugin>>,
    pub browsers: Vec<String>,
}

impl From<Arc<Plugin>> for LogPlugins {
    /// One logging method; runs record no browser (the API's default reads them).
    fn from(method: Arc<Plugin>) -> LogPlugins {
        LogPlugins {
            methods: vec![method],
            browsers: vec![],
        }
    }
}

pub struct Controller {
    cfg: ControllerConfig,
    /// The logging methods and the logs written through the controller-side ones
    /// (`<state>/log-buffer/<plugin>/`); `default_method` for jobs that name none.
    logs: Arc<LogSet>,
    default_method: String,
    /// Browser names jobs may name, the default first.
    browsers: Vec<String>,
    store: RunStore,
    /// Runs waiting for an agent, and the executors each agent has busy.
    queue: queue::Queue,
    agents: Mutex<HashMap<String, AgentSlot>>,
    /// Identifies this controller process to agents (a new one: sessions start afresh).
    epoch: String,
    updates: broadcast::Sender<Update>,
    /// Set by `stop`: links end quietly (the process is going away).
    stopping: std::sync::atomic::AtomicBool,
    /// Agents' messages refused (see `Controller::admit`).
    refusals: Refusals,
    /// Frames from agents' links that did not open (see `session::seal`).
    frames_refused: AtomicU64,
    /// Handshakes refused (wrong secret, unknown agent, bad or oversized hello).
    handshakes_refused: AtomicU64,
    /// A run finished past `keep-runs`: retention has work.
    retention_due: tokio::sync::Notify,
}

/// Why an agent's message was refused: it named something that is not an identifier,
/// or a run that was not placed on that agent's session (another agent's, an unknown
/// one, or one given to an earlier process of the agent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    BadName,
    NotPlacedHere,
}

/// The refused agent messages, counted for `/metrics`; each (agent, run) pair is logged
/// once, so a rogue agent cannot flood the log.
#[derive(Default)]
struct Refusals {
    bad_name: std::sync::atomic::AtomicU64,
    not_placed_here: std::sync::atomic::AtomicU64,
    logged: Mutex<std::collections::HashSet<(String, String)>>,
}

/// How many distinct (agent, run) refusals are logged; later ones are only counted.
const REFUSALS_LOGGED: usize = 4096;

impl Controller {
    /// Load past runs from the state directory and start accepting agents.
    pub async fn start(
        cfg: ControllerConfig,
        transport_plugin: Arc<Plugin>,
        logging: impl Into<LogPlugins>,
    ) -> anyhow::Result<Arc<Controller>> {
        let logging: LogPlugins = logging.into();
        let default_method = logging
            .methods
            .first()
            .map(|p| p.name.to_string())
            .ok_or_else(|| anyhow::anyhow!("no logging method"))?;
        if let Some(p) = &cfg.multiline_start {
            crate::agent::multiline::compile(p)
                .map_err(|e| anyhow::anyhow!("[controller] multiline-start: {e}"))?;
        }
        // Taking over: the state records this token before the runs are read, so the
        // controller it replaces is refused from its next write on and cannot change
        // what this one reads (an index line appended after it was read, say).
        let gate = if cfg.fencing_token > 0 {
            let gate = StateGate::open(&cfg.state_dir, cfg.fencing_token)?;
            gate.write(|| Ok(()))?;
            Some(gate)
        } else {
            None
        };
        let store = RunStore::open(&cfg.state_dir)?;
        if let Some(gate) = gate {
            store.guard_with(gate);
        }
        // What opening found to write (the index of a state directory of the earlier
        // format, a torn append to cut off), now that writes go through the gate.
        if let Err(e) = store.flush_unsaved() {
            tracing::warn!("cannot write the run index yet (retried): {e}");
        }
        // Runs in flight when the last controller process stopped: their agents may still
        // be working on them. Each agent gets `agent_lost_after` from now to come back.
        // (Runs still waiting for an agent go back in the queue: `restore_queue`.)
        let mut agents = HashMap::new();
        for r in store
            .unfinished()
            .into_iter()
            .filter(|r| !r.agent.is_empty())
        {
            tracing::info!(run = %r.id, agent = %r.agent, "in flight before the restart: waiting for its agent");
            agents.entry(r.agent).or_insert_with(AgentSlot::unknown);
        }
        let queue = queue::Queue::open(&cfg.state_dir)?;
        let listener = transport::listen(transport_plugin.clone())
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen for agents: {e}"))?;
        let (updates, _) = broadcast::channel(65536);
        let logs = LogSet::new(
            logging.methods,
            &cfg.state_dir.join("log-buffer"),
            cfg.log_buffer_limit,
        )
        .await
        .map_err(|e| anyhow::anyhow!("cannot ask a logging method where it runs: {e}"))?;
        let c = Arc::new(Controller {
            cfg,
            logs: Arc::new(logs),
            default_method,
            browsers: logging.browsers,
            store,
            queue,
            agents: Mutex::new(agents),
            epoch: hex::encode(&crate::session::auth::nonce()[..8]),
            updates,
            stopping: Default::default(),
            refusals: Refusals::default(),
            frames_refused: AtomicU64::new(0),
            handshakes_refused: AtomicU64::new(0),
            retention_due: tokio::sync::Notify::new(),
        });
        // A log closed incomplete says so in its run's record.
        let weak = Arc::downgrade(&c);
        c.logs.on_incomplete(Box::new(move |run, note| {
            if let Some(c) = weak.upgrade() {
                c.update(run, |r| {
                    let n = r.note.get_or_insert_with(String::new);
                    if !n.is_empty() {
                        n.push('\n');
                    }
                    n.push_str(note);
                });
            }
        }));
        c.take_over_log_buffers().await?;
        c.restore_queue();
        tokio::spawn(c.clone().place_forever());
        tokio::spawn(c.clone().accept_loop(listener, transport_plugin));
        tokio::spawn(c.clone().watch_agents());
        tokio::spawn(c.logs.clone().retry_forever());
        tokio::spawn(c.clone().retry_state_writes());
        if c.cfg.retention.is_set() {
            tokio::spawn(c.clone().keep_runs());
        }
        Ok(c)
    }

    /// Retention: at start, every `RETENTION_EVERY`, and when a run finished past
    /// `keep-runs`, remove the finished runs it no longer keeps.
    async fn keep_runs(self: Arc<Self>) {
        loop {
            let c = self.clone();
            let swept = tokio::task::spawn_blocking(move || {
                c.store.sweep(&c.cfg.retention, crate::protocol::now_ms())
            })
            .await
            .expect("retention does not panic");
            let keep = self.cfg.retention;
            match swept {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    removed = n,
                    keep_runs = ?keep.keep_runs,
                    keep_days = ?keep.keep_days,
                    "retention removed {n} finished run(s) with their artifacts"
                ),
                Err(e) => tracing::error!("retention could not remove finished runs: {e}"),
            }
            tokio::select! {
                _ = tokio::time::sleep(RETENTION_EVERY) => {}
                _ = self.retention_due.notified() => {}
            }
        }
    }

    /// One page of run summaries, newest first (`GET /api/runs`).
    pub fn runs_page(&self, q: &state::RunQuery) -> state::RunPage {
        self.store.page(q)
    }

    /// Retry a log's close for `d` before closing it incomplete (`[runtime]
    /// log-close-retry-for`).
    pub fn set_log_close_retry_for(&self, d: Duration) {
        self.logs.set_close_retry_for(d);
    }

    /// Write again, with backoff, the run records a full disk kept from being written
    /// (they changed in memory meanwhile: see `state`). A run's record reaches the disk
    /// once space returns, whatever the run did in between.
    async fn retry_state_writes(self: Arc<Self>) {
        const FIRST: Duration = Duration::from_millis(250);
        const MOST: Duration = Duration::from_secs(5);
        let mut wait = FIRST;
        loop {
            tokio::time::sleep(wait).await;
            match self.store.flush_unsaved() {
                Ok(()) => wait = FIRST,
                Err(e) => {
                    tracing::debug!("run records still cannot be written: {e}");
                    wait = (wait * 2).min(MOST);
                }
            }
        }
    }

    /// Logs an earlier process left owing their plugin (batches not confirmed, a close
    /// not confirmed): reopen them so the retry delivers what they owe. A run still in
    /// flight keeps its log open; others are closed with what they have.
    async fn take_over_log_buffers(&self) -> anyhow::Result<()> {
        let left_behind = |run: &str| match self.store.get(run) {
            Some(r) if !r.status.is_final() => LeftBehind::StillWritten(r.events),
            _ => LeftBehind::Orphaned,
        };
        self.logs
            .take_over(left_behind, |run| Some(self.meta_of(run)))
            .await
    }

    /// The description of a run's log.
    fn meta_of(&self, run: &str) -> LogMetadata {
        LogMetadata {
            instance_id: self.cfg.instance_id.clone(),
            loggable_type: "run".into(),
            loggable_id: run.to_string(),
            job_id: self.store.get(run).map(|r| r.job).unwrap_or_default(),
        }
    }

    /// Prometheus lines for the log buffers (appended to the runtime's `/metrics`).
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        self.logs.render_metrics(out);
        out.push_str("# HELP trellis_state_writes_refused_total Writes to the state directory refused because a newer active controller's fencing token was seen.\n# TYPE trellis_state_writes_refused_total counter\n");
        let _ = writeln!(
            out,
            "trellis_state_writes_refused_total {}",
            self.store.refused_writes()
        );
        out.push_str("# HELP trellis_state_write_failures_total Run record writes to the state directory that failed (a full disk); each is retried.\n# TYPE trellis_state_write_failures_total counter\n");
        let _ = writeln!(
            out,
            "trellis_state_write_failures_total {}",
            self.store.write_failures()
        );
        out.push_str("# HELP trellis_state_unsaved_runs Runs whose newest record is only in memory, waiting for the state directory to take it.\n# TYPE trellis_state_unsaved_runs gauge\n");
        let _ = writeln!(
            out,
            "trellis_state_unsaved_runs {}",
            self.store.unsaved_runs()
        );
        out.push_str("# HELP trellis_agent_messages_refused_total Agent messages refused: about a run not placed on that agent's session, or naming something that is not a valid identifier.\n# TYPE trellis_agent_messages_refused_total counter\n");
        for (reason, n) in [
            ("not-placed-here", &self.refusals.not_placed_here),
            ("bad-name", &self.refusals.bad_name),
        ] {
            let _ = writeln!(
                out,
                "trellis_agent_messages_refused_total{{reason=\"{reason}\"}} {}",
                n.load(std::sync::atomic::Ordering::Relaxed)
            );
        }
        out.push_str("# HELP trellis_link_frames_refused_total Frames from agent links that did not open (altered, forged, replayed or reordered); each dropped its link.\n# TYPE trellis_link_frames_refused_total counter\n");
        let _ = writeln!(
            out,
            "trellis_link_frames_refused_total {}",
            self.frames_refused.load(Relaxed)
        );
        out.push_str("# HELP trellis_link_handshakes_refused_total Agent connections refused in the handshake (wrong secret, unknown agent, malformed or oversized).\n# TYPE trellis_link_handshakes_refused_total counter\n");
        let _ = writeln!(
            out,
            "trellis_link_handshakes_refused_total {}",
            self.handshakes_refused.load(Relaxed)
        );
    }

    /// Frames from agent links that did not open so far (`/metrics`).
    pub fn frames_refused(&self) -> u64 {
        self.frames_refused.load(Relaxed)
    }

    /// The process is about to exit: agents' links end without being reported lost.
    pub fn stop(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Update> {
        self.updates.subscribe()
    }

    pub fn run(&self, id: &str) -> Option<RunRecord> {
        self.store.get(id)
    }

    /// Where a finished artifact of `run` is stored (None: not a valid name).
    pub fn artifact_path(&self, run: &str, name: &str) -> Option<PathBuf> {
        artifacts::path(&self.store.run_dir(run), name)
    }

    /// Every run's full record. Reads every finished record from disk: for tools and
    /// tests; the API pages with `runs_page`.
    pub fn runs(&self) -> Vec<RunRecord> {
        self.store.all()
    }

    /// Every run not finished (queued or running), oldest first.
    pub fn unfinished_runs(&self) -> Vec<RunRecord> {
        self.store.unfinished()
    }

    /// Connected agents: (name, labels).
    pub fn connected_agents(&self) -> Vec<(String, Vec<String>)> {
        let a = self.agents.lock().unwrap();
        let mut v: Vec<_> = a
            .iter()
            .filter(|(_, s)| s.connected)
            .map(|(n, s)| (n.clone(), s.labels.clone()))
            .collect();
        v.sort();
        v
    }

    /// A connected agent's executors: (declared, busy). None: not connected.
    pub fn executors_of(&self, agent: &str) -> Option<(u32, usize)> {
        let declared = self
            .agents
            .lock()
            .unwrap()
            .get(agent)
            .filter(|s| s.connected)
            .map(|s| s.executors)?;
        Some((declared, self.busy_executors(agent)))
    }

    /// Submit a run of `job`: it is recorded `queued` and placed on a connected agent
    /// with its label as soon as one has a free executor (see `queue`).
    pub fn submit(&self, job: &Job) -> Result<RunRecord, SubmitError> {
        self.submit_as(job, "")
    }

    /// Submit on behalf of `submitted_by` (an API token's name), kept in the record.
    pub fn submit_as(&self, job: &Job, submitted_by: &str) -> Result<RunRecord, SubmitError> {
        let log = self.locate(job)?;
        // Checked now (a job naming a secret it may not use is refused at once); the
        // values are resolved again when the run is placed, and never kept on disk.
        self.cfg.secrets.resolve(job)?;
        if log.on_agent {
            // Agents known with the label, none of which has the agent-side logging
            // method: the run could only wait for good.
            let a = self.agents.lock().unwrap();
            let mut labelled = a.values().filter(|s| s.labels.contains(&job.agent));
            let any = labelled.clone().next().is_some();
            if any && !labelled.any(|s| s.log_methods.contains(&log.method)) {
                return Err(SubmitError::NoAgentWithLogMethod {
                    label: job.agent.clone(),
                    method: log.method.clone(),
                });
            }
        }
        let state_error = |error: std::io::Error| {
            if state::is_no_space(&error) {
                SubmitError::StateFull {
                    dir: self.store.state_dir().to_path_buf(),
                    error,
                }
            } else {
                SubmitError::State(error)
            }
        };
        let record = self
            .store
            .create(job, "", "", log, submitted_by)
            .map_err(state_error)?;
        let _ = self.updates.send(Update::Run(Box::new(record.clone())));
        if let Err(e) = self.enqueue(&record, job) {
            // Not kept, so not accepted: the record says why.
            self.update(&record.id, |r| {
                r.finish(RunOutcome::Cancelled);
                add_note(r, &format!("the queued run's job could not be kept: {e}"));
            });
            return Err(state_error(e));
        }
        self.place_waiting();
        self.queue.wake(); // its queue-timeout, if any, may be the next one due
        Ok(self.store.get(&record.id).unwrap_or(record))
    }

    /// Cancel `run`: one still waiting ends at once; one placed is stopped by its agent.
    /// False if it is unknown or already ended.
    pub fn cancel(&self, run: &str) -> bool {
        let Some(r) = self.store.get(run) else {
            return false;
        };
        if r.status.is_final() {
            return false;
        }
        if self.cancel_waiting(run) {
            return true;
        }
        // Placed (perhaps just now: read again).
        let Some(r) = self.store.get(run).filter(|r| !r.agent.is_empty()) else {
            return false;
        };
        let tx = self
            .agents
            .lock()
            .unwrap()
            .get(&r.agent)
            .map(|s| s.orders.clone());
        if let Some(tx) = tx {
            let _ = tx.try_send(ToAgent::Cancel {
                run: run.to_string(),
                token: self.cfg.fencing_token,
            });
        }
        true
    }

    /// Accepted channels live in the listener's instance (a resource belongs to the
    /// store that made it), so nothing here waits *inside* the plugin: accept and
    /// receive are called with a zero timeout when the transport's pollable says
    /// something is there (`points::transport`: the instance's waiter waits for all its
    /// links at once, outside the plugin), so one agent's link never stalls another's
    /// and an idle link costs no calls. Each accepted
    /// link is served (handshake included) in a task of its own, so a slow or hostile
    /// handshake holds up nothing else. A listener whose instance died (a trap, e.g. a
    /// peer made it exhaust its memory) is replaced by a fresh one, never retried.
    async fn accept_loop(self: Arc<Self>, listener: Listener, plugin: Arc<Plugin>) {
        let mut backoff = Duration::from_millis(500);
        // None: the listener's instance died and was let go; listen again on a fresh
        // one. The dead one is dropped first: it still holds the bound socket, so a new
        // instance could not bind the same address while it lives.
        let mut listener = Some(listener);
        loop {
            let Some(l) = &listener else {
                match transport::listen(plugin.clone()).await {
                    Ok(l) => {
                        tracing::info!("listening for agents again, on a fresh instance");
                        listener = Some(l);
                        backoff = Duration::from_millis(500);
                    }
                    Err(e) => {
                        tracing::error!("cannot listen for agents again: {e}; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
                continue;
            };
            match l.next().await {
                Ok(Some(link)) => {
                    backoff = Duration::from_millis(500);
                    tokio::spawn(self.clone().serve(link));
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!("accepting agents failed: {e}");
                    if l.is_broken().await {
                        tracing::warn!(
                            "the transport's listener instance died: letting it go and listening again on a fresh one"
                        );
                        listener = None;
                    }
                    // Links accepted on a dead instance end on their next call and let
                    // it go too; give them a moment before binding again.
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }

    async fn serve(self: Arc<Self>, link: Link) {
        let agents = self.cfg.agents.clone();
        let accepted = match challenge(&link, &self.epoch, |name| agents.get(name).cloned()).await {
            Ok(h) => h,
            Err(e) => {
                self.handshakes_refused.fetch_add(1, Relaxed);
                tracing::warn!("refused a connection: {e}");
                return;
            }
        };
        let hello = &accepted.hello;
        let name = hello.agent.clone();
        // An agent keeps one link at a time: a new one supersedes the old (which is
        // dead or dying, e.g. half-open), whose loop hands the session back.
        let (my_link, kick) = {
            let mut a = self.agents.lock().unwrap();
            let slot = a.entry(name.clone()).or_insert_with(AgentSlot::unknown);
            slot.link += 1;
            slot.superseded.notify_one();
            (slot.link, slot.superseded.clone())
        };
        let taken_over = Instant::now();
        let ((mut session, mut orders), first_contact) = loop {
            let parked = {
                let mut a = self.agents.lock().unwrap();
                let slot = a.get_mut(&name).expect("created above");
                if slot.link != my_link {
                    return; // superseded in turn while waiting
                }
                slot.parked.take().map(|mut parked| {
                    // The first time this controller process hears from the agent.
                    let first_contact = slot.agent_session.is_empty();
                    if slot.agent_session != hello.session {
                        // A restarted agent process: its session starts afresh (orders it
                        // had not acknowledged are gone with it; `reconcile` ends its runs).
                        if !first_contact {
                            tracing::info!(agent = %name, "the agent restarted: starting a new session");
                        }
                        parked.0 = Session::default();
                        slot.agent_session = hello.session.clone();
                    }
                    slot.labels = hello.labels.clone();
                    slot.executors = hello.executors.clamp(1, crate::config::MAX_EXECUTORS);
                    slot.log_methods = hello.log_methods.clone();
                    slot.connected = true;
                    slot.away_since = None;
                    (parked, first_contact)
                })
            };
            match parked {
                Some(p) => break p,
                None if taken_over.elapsed() > HANDSHAKE_TIMEOUT => {
                    // The agent has given this link up by now and will come again. Until
                    // it does, nobody serves it: say so, or the old link, when it lets
                    // go, would leave it `connected` with nobody serving (a wedge).
                    tracing::error!(agent = %name, "the agent's previous link did not let go in time");
                    let mut a = self.agents.lock().unwrap();
                    if let Some(slot) = a.get_mut(&name).filter(|s| s.link == my_link) {
                        slot.connected = false;
                        slot.away_since.get_or_insert_with(Instant::now);
                    }
                    return;
                }
                None => tokio::time::sleep(RECHECK).await,
            }
        };
        self.reconcile(hello, first_contact).await;
        // Its free executors may take waiting runs (their orders go out below).
        self.queue.wake();
        // After a controller restart the agent's messages resume where the last process
        // acknowledged them (see `Session::adopt_peer_acked`).
        session.ack_when_handled();
        session.adopt_peer_acked(hello.acked);
        session.resync(hello.received);
        if let Ok(mut seal) = welcome(
            &link,
            &accepted,
            session.ack_point(),
            self.cfg.fencing_token,
        )
        .await
        {
            tracing::info!(agent = %name, labels = ?hello.labels, "agent connected");
            let mut live = Liveness::new(self.cfg.heartbeat);
            let mut committed = [0u64; 2];
            // The agent's messages are handled, in order, by a task of their own, so
            // that a plugin call they make (a log's open, write or close, up to its
            // call deadline) never stops this loop's heartbeats: the link stays up, and
            // while a batch is being handled no more frames are taken (the agent's
            // bound on unacknowledged messages pauses its steps meanwhile).
            let (work, mut batches) = tokio::sync::mpsc::unbounded_channel::<Vec<Vec<u8>>>();
            let (done_tx, mut done) = tokio::sync::watch::channel(0u64);
            let handler = tokio::spawn({
                let (me, name, session_id) = (self.clone(), name.clone(), hello.session.clone());
                async move {
                    while let Some(batch) = batches.recv().await {
                        for payload in batch {
                            match protocol::decode_to_controller(&payload) {
                                Ok((msg, data)) => me.handle(&name, &session_id, msg, data).await,
                                Err(e) => {
                                    tracing::error!(agent = %name, "unreadable message: {e}")
                                }
                            }
                        }
                        done_tx.send_modify(|d| *d += 1);
                    }
                }
            });
            let mut sent = 0u64;
            // Per batch given to the handler, how far the session had received with it:
            // acks cover a batch only once it is handled (`Session::ack_when_handled`).
            let mut handling: VecDeque<(u64, [u64; 2])> = VecDeque::new();
            let mut uncommitted = false;
            let mut link_lost = false;
            loop {
                let finished = *done.borrow();
                while let Some(&(batch, upto)) = handling.front()
                    && batch <= finished
                {
                    session.handled(upto);
                    handling.pop_front();
                }
                let idle = finished == sent;
                if idle && uncommitted {
                    commit_handled(&session, &link, &mut committed).await;
                    uncommitted = false;
                }
                let superseded = self
                    .agents
                    .lock()
                    .unwrap()
                    .get(&name)
                    .is_some_and(|s| s.link != my_link);
                if superseded {
                    tracing::info!(agent = %name, "the agent reconnected: leaving the old link");
                    break;
                }
                while let Ok(order) = orders.try_recv() {
                    session.queue(
                        Lane::Control,
                        serde_json::to_vec(&order).expect("serialisable"),
                    );
                }
                let mut delivered = Vec::new();
                // A log buffer is full (its store is down), or the last messages are
                // still being handled: take no more output from this agent until then;
                // the agent's steps wait.
                let take = self.logs.has_room() && idle;
                let round = exchange(
                    &mut session,
                    &link,
                    &mut seal,
                    &mut live,
                    0,
                    take,
                    &mut delivered,
                )
                .await;
                // On a lost link, what arrived before the failure is still handled
                // (the session counted it received): then the loop ends.
                let lost = round.err();
                if let Some(e) = &lost {
                    if let LinkDown::Unsealed(_) = e {
                        self.frames_refused.fetch_add(1, Relaxed);
                    }
                    if !self.stopping.load(Relaxed) {
                        tracing::warn!(agent = %name, "link lost: {e}");
                    }
                }
                // Idle unless something arrived or more waits to go out: messages sent
                // and waiting for their ack are no reason to spin (a peer that never
                // acknowledges must not make this loop busy). Idle, the loop sleeps
                // until the transport has something, an order comes, the handler is
                // done, a heartbeat is due or the link is superseded; only a full log
                // buffer (nothing signals its room) is re-checked on a timer.
                if lost.is_none() && delivered.is_empty() && (!session.has_unsent() || !take) {
                    let backpressured = !self.logs.has_room();
                    tokio::select! {
                        _ = link.readable(), if take => {}
                        Some(order) = orders.recv() => {
                            session.queue(
                                Lane::Control,
                                serde_json::to_vec(&order).expect("serialisable"),
                            );
                        }
                        Ok(()) = done.changed() => {}
                        _ = tokio::time::sleep_until(live.next_due().into()) => {}
                        _ = kick.notified() => {}
                        _ = tokio::time::sleep(RECHECK), if backpressured => {}
                    }
                }
                if !delivered.is_empty() {
                    let _ = work.send(delivered.into_iter().map(|(_, p)| p).collect());
                    sent += 1;
                    handling.push_back((sent, session.received()));
                    uncommitted = true;
                }
                if lost.is_some() {
                    link_lost = true;
                    break;
                }
            }
            // What arrived is handled before the session is parked (and, on a link
            // still up, committed).
            drop(work);
            if handler.await.is_ok() {
                session.handled(session.received());
            }
            if uncommitted && !link_lost {
                commit_handled(&session, &link, &mut committed).await;
            }
        }
        let mut a = self.agents.lock().unwrap();
        if let Some(slot) = a.get_mut(&name) {
            if slot.link == my_link {
                slot.connected = false;
                slot.away_since = Some(Instant::now());
            }
            slot.parked = Some((session, orders));
        }
    }

    /// Agents out of contact longer than `agent_lost_after` lose their in-flight runs:
    /// they are marked `lost` (a run must end, not hang on an agent that is gone).
    async fn watch_agents(self: Arc<Self>) {
        let every = self.cfg.heartbeat.min(Duration::from_secs(1));
        loop {
            tokio::time::sleep(every).await;
            let gone: Vec<String> = {
                let a = self.agents.lock().unwrap();
                a.iter()
                    .filter(|(_, s)| {
                        s.away_since
                            .is_some_and(|t| t.elapsed() >= self.cfg.agent_lost_after)
                    })
                    .map(|(n, _)| n.clone())
                    .collect()
            };
            for name in gone {
                let note = format!(
                    "agent `{name}` lost: out of contact for more than {:?}",
                    self.cfg.agent_lost_after
                );
                self.mark_lost(&name, &note).await;
            }
        }
    }

    /// An agent (re)connected: end its in-flight runs that nothing will ever finish —
    /// those given to another process of the agent (it restarted), and, when this
    /// controller process has not heard from it before, those still queued whose order
    /// the agent never received (it died with the previous controller process).
    async fn reconcile(&self, hello: &Hello, first_contact: bool) {
        let (mut restarted, mut never_given) = (Vec::new(), Vec::new());
        // Runs placed on this agent; runs still waiting in the queue (no agent) are
        // not its business.
        for r in self.store.unfinished() {
            if r.agent.is_empty() || r.agent != hello.agent {
                continue;
            }
            if r.agent_session != hello.session {
                restarted.push(r.id);
            } else if first_contact && r.status == RunStatus::Queued && !hello.runs.contains(&r.id)
            {
                never_given.push(r.id);
            }
        }
        let agent = &hello.agent;
        self.mark_runs_lost(
            agent,
            restarted,
            "the agent restarted while this run was in flight",
        )
        .await;
        // Never received: nothing ran, so it can wait for an executor again.
        let note = format!(
            "placed on agent `{agent}`, which never received it (the controller stopped first): back in the queue"
        );
        let lost: Vec<String> = never_given
            .into_iter()
            .filter(|run| !self.requeue(agent, run, &note))
            .collect();
        self.mark_runs_lost(
            agent,
            lost,
            "the controller restarted before the agent received this run; submit it again",
        )
        .await;
    }

    /// Mark `agent`'s in-flight runs `lost` (see `mark_runs_lost`).
    async fn mark_lost(&self, agent: &str, note: &str) {
        let runs: Vec<String> = self
            .store
            .unfinished()
            .into_iter()
            .filter(|r| r.agent == agent)
            .map(|r| r.id)
            .collect();
        self.mark_runs_lost(agent, runs, note).await;
    }

    /// Mark runs of `agent` `lost`, close their logs with what arrived, and queue a
    /// cancel so the agent stops them should it come back.
    async fn mark_runs_lost(&self, agent: &str, runs: Vec<String>, note: &str) {
        for run in runs {
            tracing::warn!(agent, run, "{note}");
            if let Some(log) = self.logs.get(&run).await {
                let events = log.lock().await.events;
                self.logs.close(&run, events).await;
            }
            self.update(&run, |r| {
                r.status = RunStatus::Lost;
                r.note = Some(note.to_string());
                r.finished_ms = Some(crate::protocol::now_ms());
                for s in &mut r.steps {
                    if matches!(s.status, StepStatus::Pending | StepStatus::Running) {
                        s.status = StepStatus::Skipped;
                    }
                }
            });
            let tx = self
                .agents
                .lock()
                .unwrap()
                .get(agent)
                .map(|s| s.orders.clone());
            if let Some(tx) = tx {
                let _ = tx.try_send(ToAgent::Cancel {
                    run,
                    token: self.cfg.fencing_token,
                });
            }
        }
    }

    /// Whether `agent`, connected as process `session`, may say `msg`: every name in it
    /// is an identifier (before any path is built from it), and its run was placed on
    /// this agent's session. An agent speaks only for its own runs.
    fn admit(&self, agent: &str, session: &str, msg: &ToController) -> Result<(), Refusal> {
        let step = match msg {
            ToController::StepStarted { step, .. }
            | ToController::Output { step, .. }
            | ToController::StepFinished { step, .. } => Some(step.as_str()),
            ToController::ArtifactChunk { step, name, .. } => {
                if !crate::ids::is_artifact_name(name) {
                    return Err(Refusal::BadName);
                }
                step.as_deref()
            }
            ToController::Logged { .. } | ToController::RunFinished { .. } => None,
        };
        if !crate::ids::is_id(msg.run()) || step.is_some_and(|s| !crate::ids::is_id(s)) {
            return Err(Refusal::BadName);
        }
        if self.store.placed_on(msg.run(), agent, session) {
            Ok(())
        } else {
            Err(Refusal::NotPlacedHere)
        }
    }

    /// Count a refused message, and log it the first time for its agent and run.
    fn refuse(&self, agent: &str, msg: &ToController, why: Refusal) {
        use std::sync::atomic::Ordering::Relaxed;
        let run = msg.run();
        match why {
            Refusal::BadName => self.refusals.bad_name.fetch_add(1, Relaxed),
            Refusal::NotPlacedHere => self.refusals.not_placed_here.fetch_add(1, Relaxed),
        };
        let first = {
            let mut logged = self.refusals.logged.lock().unwrap();
            logged.len() < REFUSALS_LOGGED && logged.insert((agent.to_string(), run.to_string()))
        };
        if first {
            let run = crate::ids::Shown(run);
            match why {
                Refusal::BadName => tracing::error!(
                    agent,
                    %run,
                    "refused a message naming an invalid run, step or artifact name (an agent sends only names the controller gave it); further ones from this agent for this run are only counted"
                ),
                Refusal::NotPlacedHere => tracing::error!(
                    agent,
                    %run,
                    "refused a message about a run not placed on this agent's session: an agent speaks only for its own runs; further ones are only counted"
                ),
            }
        }
    }

    async fn handle(&self, agent: &str, session: &str, msg: ToController, data: &[u8]) {
        if let Err(why) = self.admit(agent, session, &msg) {
            self.refuse(agent, &msg, why);
            return;
        }
        let run = msg.run();
        if self.store.status(run) == Some(RunStatus::Lost) {
            // Marked lost while the agent was away: the record stays as it was decided.
            tracing::warn!(
                agent,
                run,
                "a message for a run already marked lost, ignored"
            );
            return;
        }
        match msg {
            ToController::StepStarted { run, step } => self.update(&run, |r| {
                r.status = RunStatus::Running;
                if let Some(s) = r.steps.iter_mut().find(|s| s.name == step) {
                    s.status = StepStatus::Running;
                }
            }),
            ToController::Output {
                run,
                step,
                lines,
                first,
            } => {
                let Some(log) = self.log_of(agent, &run).await else {
                    return;
                };
                let mut log = log.lock().await;
                let mut b = BatchBuilder::new();
                let following = self.updates.receiver_count() > 0;
                // Numbered by the agent; unnumbered lines are counted here.
                let first = if first == 0 { log.events + 1 } else { first };
                for (seq, l) in (first..).zip(&lines) {
                    if seq <= log.events {
                        continue; // sent again after a controller restart: already logged
                    }
                    log.events = seq;
                    log_set::push_line(&mut b, seq, &step, l);
                    // Copies for followers only when someone follows.
                    if following {
                        let _ = self.updates.send(Update::Line {
                            run: run.clone(),
                            step: step.clone(),
                            seq: log.events,
                            text: l.text.clone(),
                        });
                    }
                }
                // Keep-and-retry: a failed write stays queued in the writer, and a batch
                // the disk refuses is held in memory until it takes it (the writer says
                // so; the held bytes count against the log buffer's bound).
                if !b.is_empty()
                    && let Err(e) = log.writer.write(b.finish()).await
                {
                    tracing::warn!(run, "log write failed, kept for retry: {e}");
                }
                let events = log.events;
                drop(log);
                self.publish(&run, self.store.progress(&run, events));
            }
            ToController::Logged { run, events } => {
                self.publish(&run, self.store.progress(&run, events));
            }
            ToController::StepFinished { run, step, outcome } => self.update(&run, |r| {
                if let Some(s) = r.steps.iter_mut().find(|s| s.name == step) {
                    s.status = if outcome.succeeded() {
                        StepStatus::Succeeded
                    } else {
                        StepStatus::Failed
                    };
                    s.outcome = Some(outcome.clone());
                }
            }),
            ToController::ArtifactChunk {
                run,
                step,
                name,
                offset,
                end,
            } => {
                let dir = self.store.run_dir(&run);
                let gate = self.store.gate();
                let data = data.to_vec();
                let got = tokio::task::spawn_blocking({
                    let (step, name) = (step.clone(), name.clone());
                    move || {
                        artifacts::receive(
                            gate.as_deref(),
                            &dir,
                            step.as_deref(),
                            &name,
                            offset,
                            &data,
                            end.as_ref(),
                        )
                    }
                })
                .await
                .expect("artifact receipt does not panic");
                match got {
                    Ok(Some(record)) => self.update(&run, |r| {
                        r.artifacts.retain(|a| a.name != record.name);
                        r.artifacts.push(record);
                    }),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(agent, run, "{e}");
                        self.update(&run, |r| add_note(r, &e.to_string()));
                    }
                }
            }
            ToController::RunFinished {
                run,
                outcome,
                lines,
            } => {
                let on_agent = self.store.get(&run).is_some_and(|r| r.log.on_agent);
                // A log to close here: the run had output (after a controller restart its
                // log may not be open in this process yet). An agent-side log is the
                // agent's to close.
                let events = if on_agent {
                    lines
                } else if lines > 0 || self.logs.get(&run).await.is_some() {
                    match self.log_of(agent, &run).await {
                        Some(log) => {
                            let count = log.lock().await.events.max(lines);
                            self.logs.close(&run, count).await;
                            count
                        }
                        None => {
                            // The log cannot be opened (its buffer's disk is full): the
                            // run still ends, or it would stay in flight for good.
                            self.update(&run, |r| {
                                add_note(r, "the run's log could not be opened when it ended (see the controller's log: a full disk?); it may be incomplete");
                            });
                            lines
                        }
                    }
                } else {
                    0
                };
                self.update(&run, |r| {
                    r.finish(outcome.clone());
                    r.events = r.events.max(events);
                });
            }
        }
    }

    /// The run's open log, opened now if it is not (first output, or first since a
    /// controller restart: then the count so far comes from the run's record).
    async fn log_of(&self, agent: &str, run: &str) -> Option<Arc<tokio::sync::Mutex<OpenLog>>> {
        let record = self.store.get(run);
        let method = record
            .as_ref()
            .map(|r| r.log.method.as_str())
            .filter(|m| !m.is_empty())
            .unwrap_or(self.default_method.as_str());
        let opened = self
            .logs
            .open(run, method, || {
                (self.meta_of(run), record.as_ref().map_or(0, |r| r.events))
            })
            .await;
        match opened {
            Ok(log) => Some(log),
            Err(e) => {
                tracing::error!(agent, run, "cannot open the run's log: {e}");
                None
            }
        }
    }

    /// The logging method and browser for a run of `job`: the job's own choice (which
    /// must be loaded) or the defaults.
    fn locate(&self, job: &Job) -> Result<LogLocator, SubmitError> {
        let unknown = |what, name: &str, key, loaded: Vec<&str>| SubmitError::UnknownLogPlugin {
            job: job.name.clone(),
            what,
            name: name.to_string(),
            key,
            loaded: if loaded.is_empty() {
                "none".into()
            } else {
                loaded.join(", ")
            },
        };
        let method = match &job.logging {
            None => self.default_method.clone(),
            Some(m) if self.logs.side(m).is_some() => m.clone(),
            Some(m) => {
                let loaded = self.logs.names().collect();
                return Err(unknown("logging method", m, "logging-methods", loaded));
            }
        };
        let on_agent = self.logs.side(&method) == Some(Side::Agent);
        let browser = match &job.browser {
            None => self.browsers.first().cloned().unwrap_or_default(),
            Some(b) if self.browsers.contains(b) => b.clone(),
            Some(b) => {
                let loaded = self.browsers.iter().map(String::as_str).collect();
                return Err(unknown("log browser", b, "log-browsers", loaded));
            }
        };
        Ok(LogLocator {
            method,
            browser,
            on_agent,
        })
    }

    /// Change a run's record and announce it. (Only here does a run's status change;
    /// `publish` alone also carries the output progress, which never does.)
    fn update(&self, run: &str, f: impl FnOnce(&mut RunRecord)) {
        let updated = self.store.update(run, f);
        // Started (or ended) on its agent: its kept job is no longer needed.
        if let Ok(Some(r)) = &updated
            && r.status != RunStatus::Queued
            && self.queue.take_unstarted(&r.id)
        {
            self.forget_job(&r.id);
        }
        self.publish(run, updated);
    }

    fn publish(&self, run: &str, updated: std::io::Result<Option<RunRecord>>) {
        match updated {
            Ok(Some(r)) => {
                // Its executor is freed after the end is announced, so followers never
                // see the next run placed on it before this one ended.
                let freed = (r.status.is_final() && !r.agent.is_empty())
                    .then(|| (r.agent.clone(), r.id.clone()));
                if r.status.is_final()
                    && self
                        .cfg
                        .retention
                        .keep_runs
                        .is_some_and(|k| self.store.finished_count() as u64 > k)
                {
                    self.retention_due.notify_one();
                }
                let _ = self.updates.send(Update::Run(Box::new(r)));
                if let Some((agent, run)) = freed {
                    self.queue.release(&agent, &run);
                }
            }
            Ok(None) => tracing::warn!(run, "update for an unknown run"),
            Err(e) => tracing::error!(run, "cannot record the run's state: {e}"),
        }
    }
}

/// Add a line to a run's note.
fn add_note(r: &mut RunRecord, line: &str) {
    let note = r.note.get_or_insert_with(String::new);
    if !note.is_empty() {
        note.push('\n');
    }
    note.push_str(line);
}

impl RunOutcome {
    pub fn status(&self) -> RunStatus {
        match self {
            RunOutcome::Succeeded => RunStatus::Succeeded,
            RunOutcome::Failed { .. } => RunStatus::Failed,
            RunOutcome::TimedOut { .. } => RunStatus::TimedOut,
            RunOutcome::Cancelled => RunStatus::Cancelled,
        }
    }
}

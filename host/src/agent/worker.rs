//! The agent's main loop: connect through the transport plugin, prove the secret, then
//! run what the controller orders, streaming output back. The session outlives links:
//! a dropped connection is re-established and nothing is lost or repeated.

use crate::agent::artifacts;
use crate::agent::budget::{FULL_LOG, LogBudget};
use crate::agent::exec::{self, Output, StepCommand, Stream};
use crate::agent::mask::Masker;
use crate::agent::multiline::{self, MultiLine};
use crate::ha::token::CommandGate;
use crate::points::log_set::{self, LeftBehind, LogSet, OpenLog};
use crate::points::transport;
use crate::protocol::{
    self, OutLine, RunOrder, RunOutcome, StepOutcome, ToAgent, ToController, now_ms,
};
use crate::runtime::Plugin;
use crate::session::link::{
    AgentSession, HandshakeError, Introduced, LinkDown, Liveness, commit_handled, exchange,
    introduce, take_frames,
};
use crate::wit::command_transport::Lane;
use crate::wit::types::LogMetadata;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{Mutex, mpsc, watch};
use trellis_sdk::events::BatchBuilder;

/// Lines per output message: bounds message size and latency.
const LINES_PER_MESSAGE: usize = 512;

/// Messages the session holds unacknowledged before the agent stops taking more from
/// its runs: beyond it, steps wait (their output is back-pressured, never dropped).
const MAX_UNACKED: usize = 256;

/// Where a run's messages go: to the controller, encoded, on the bulk lane
/// (control-lane messages go from the agent only as link signals) — except, when the
/// run's log is written here (an agent-side logging method), its output, which goes to
/// the log, the controller getting only the count.
#[derive(Clone)]
struct Out {
    tx: mpsc::Sender<Vec<u8>>,
    log: Option<RunLog>,
}

/// A run's agent-side log.
#[derive(Clone)]
struct RunLog {
    logs: Arc<LogSet>,
    log: Arc<Mutex<OpenLog>>,
}

impl RunLog {
    /// Write output lines numbered from `first` into the log (durably: into the buffer
    /// first; a store that is down gets them later), then wait while the buffers are
    /// full, so the step's output is held back rather than piling up. The log's count.
    async fn write(&self, step: &str, lines: &[OutLine], first: u64) -> u64 {
        let mut log = self.log.lock().await;
        let mut b = BatchBuilder::new();
        for (seq, l) in (first..).zip(lines) {
            log_set::push_line(&mut b, seq, step, l);
            log.events = seq;
        }
        if !b.is_empty()
            && let Err(e) = log.writer.write(b.finish()).await
        {
            tracing::warn!("log write failed, kept for retry: {e}");
        }
        let events = log.events;
        drop(log);
        while !self.logs.has_room() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        events
    }
}

/// Refusals in a row (no welcome between) after which the agent stops: the controller
/// means it (a wrong secret, an unknown name). Fewer may be a handshake altered on the
/// way.
const REFUSALS_TO_STOP: u32 = 3;

/// Run ids this agent process remembers having been given, for the handshake (see
/// `Hello::runs`).
const RUNS_REMEMBERED: usize = 1024;

/// An output message, its lines numbered on from `numbered` (a run's line count so far;
/// see `ToController::Output`).
fn output(run: &str, step: &str, lines: Vec<OutLine>, numbered: &AtomicU64) -> ToController {
    let first = numbered.fetch_add(lines.len() as u64, Ordering::Relaxed) + 1;
    ToController::Output {
        run: run.to_string(),
        step: step.to_string(),
        lines,
        first,
    }
}

async fn send(out: &Out, msg: &ToController) -> bool {
    if let (
        Some(log),
        ToController::Output {
            run,
            step,
            lines,
            first,
        },
    ) = (&out.log, msg)
    {
        let events = log.write(step, lines, *first).await;
        let counted = ToController::Logged {
            run: run.clone(),
            events,
        };
        return out.tx.send(protocol::encode(&counted, &[])).await.is_ok();
    }
    out.tx.send(protocol::encode(msg, &[])).await.is_ok()
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub name: String,
    pub labels: Vec<String>,
    pub secret: String,
    /// Each run gets `<workspace>/<run-id>/`.
    pub workspace: PathBuf,
    /// How often an idle link says it is alive (see `session::link::Liveness`).
    pub heartbeat: Duration,
    /// The agent-side logging methods this agent writes logs with (None: all output
    /// goes to the controller).
    pub logs: Option<Arc<LogSet>>,
    /// The agent's own state: the newest fencing token seen, agent-side log buffers.
    /// None: `<workspace>/.trellis`.
    pub state_dir: Option<PathBuf>,
    /// How many runs this agent runs at once (`[agent] executors`, at least 1),
    /// declared in its hello: the controller places no more on it, and the agent
    /// itself starts no more (an order beyond it waits for a run to end).
    pub executors: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Refused(HandshakeError),
}

/// Run the agent until `stop` turns true. Returns an error only when the controller
/// refuses the agent (wrong secret, unknown name): then nothing may run.
pub async fn run_agent(
    transport_plugin: Arc<Plugin>,
    cfg: AgentConfig,
    mut stop: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    let mut agent_session = AgentSession::new();
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(1024);
    let mut cancels: HashMap<String, watch::Sender<bool>> = HashMap::new();
    let mut given: VecDeque<String> = VecDeque::new();
    let executors = Arc::new(tokio::sync::Semaphore::new(cfg.executors.max(1) as usize));
    let mut backoff = Duration::from_millis(100);
    let mut refusals = 0;
    let state_dir = cfg
        .state_dir
        .clone()
        .unwrap_or_else(|| cfg.workspace.join(".trellis"));
    // Orders from a controller older than the newest one seen are refused: it was
    // replaced (and fenced) and must not drive this agent (see `ha::token`).
    let fencing = CommandGate::open(Some(&state_dir)).unwrap_or_else(|e| {
        tracing::error!(agent = %cfg.name, "cannot keep the fencing token in {}: {e}; keeping it in memory", state_dir.display());
        CommandGate::open(None).expect("in memory")
    });
    let log_methods: Vec<String> = match &cfg.logs {
        Some(logs) => {
            // Whatever an earlier agent process left undelivered: its runs are gone, so
            // their logs are delivered and closed with what they have.
            if let Err(e) = logs.take_over(|_| LeftBehind::Orphaned, |_| None).await {
                tracing::error!(agent = %cfg.name, "{e}");
            }
            tokio::spawn(logs.clone().retry_forever());
            logs.names().map(str::to_string).collect()
        }
        None => vec![],
    };
    while !*stop.borrow() {
        let link = match transport::connect(transport_plugin.clone(), &cfg.name).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(agent = %cfg.name, "cannot reach the controller: {e}; retrying in {backoff:?}");
                tokio::select! { _ = tokio::time::sleep(backoff) => {}, _ = stop.changed() => {} }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let introduce_result = introduce(
            &link,
            &cfg.name,
            &cfg.labels,
            &log_methods,
            cfg.executors,
            &cfg.secret,
            given.iter().cloned().collect(),
            &mut agent_session,
        )
        .await;
        let Introduced {
            mut seal,
            mut early,
        } = match introduce_result {
            Ok(introduced) => introduced,
            Err(e @ HandshakeError::Refused { .. }) => {
                // A refusal cannot be authenticated (a controller cannot prove anything to
                // an agent whose secret it does not share), and one flipped byte of the
                // challenge on the way makes a right secret look wrong: only refusals in
                // a row, with no welcome between, mean it (see `REFUSALS_TO_STOP`).
                refusals += 1;
                if refusals >= REFUSALS_TO_STOP {
                    tracing::error!(agent = %cfg.name, "{e}");
                    return Err(AgentError::Refused(e));
                }
                tracing::warn!(agent = %cfg.name, "{e}; trying again in {backoff:?} before giving up");
                tokio::select! { _ = tokio::time::sleep(backoff) => {}, _ = stop.changed() => {} }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            Err(e @ HandshakeError::ControllerNotAuthentic { .. }) => {
                // Not fatal: whoever answered may be in the way of the real controller.
                tracing::error!(agent = %cfg.name, "{e}; retrying in {backoff:?}");
                tokio::select! { _ = tokio::time::sleep(backoff) => {}, _ = stop.changed() => {} }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            Err(e) => {
                tracing::warn!(agent = %cfg.name, "handshake failed: {e}; reconnecting");
                continue;
            }
        };
        if !fencing.admit(agent_session.controller_token) {
            tracing::error!(
                agent = %cfg.name,
                "refusing a controller whose fencing token {} is older than {} (a newer active controller took over): reconnecting",
                agent_session.controller_token,
                fencing.newest()
            );
            tokio::select! { _ = tokio::time::sleep(backoff) => {}, _ = stop.changed() => {} }
            backoff = (backoff * 2).min(Duration::from_secs(5));
            continue;
        }
        let session = &mut agent_session.session;
        backoff = Duration::from_millis(100);
        refusals = 0;
        tracing::info!(agent = %cfg.name, "connected to the controller");
        let mut live = Liveness::answering(cfg.heartbeat);
        let mut committed = [0u64; 2];
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            while session.unacked() < MAX_UNACKED
                && let Ok(msg) = out_rx.try_recv()
            {
                session.queue(Lane::Bulk, msg);
            }
            let mut delivered = Vec::new();
            // Frames that came in with the welcome, first: sealed like any others.
            let early_frames = std::mem::take(&mut early);
            let round = match take_frames(session, &mut seal, early_frames, &mut delivered) {
                Ok(()) => {
                    exchange(
                        session,
                        &link,
                        &mut seal,
                        &mut live,
                        // The loop below waits for an event-driven link.
                        if link.is_event_driven() {
                            0
                        } else {
                            transport::POLL_OWN_MS
                        },
                        true,
                        &mut delivered,
                    )
                    .await
                }
                Err(e) => Err(LinkDown::Unsealed(e)),
            };
            if let Err(e) = round {
                if let LinkDown::Unsealed(_) = e {
                    tracing::error!(agent = %cfg.name, "{e}");
                } else {
                    tracing::warn!(agent = %cfg.name, "link lost: {e}; reconnecting");
                }
                // What opened before a bad frame is genuine: handle it below, then
                // reconnect.
                handle_orders(
                    &cfg,
                    &fencing,
                    delivered,
                    &mut cancels,
                    &mut given,
                    &out_tx,
                    &executors,
                );
                break;
            }
            let handled = !delivered.is_empty();
            handle_orders(
                &cfg,
                &fencing,
                delivered,
                &mut cancels,
                &mut given,
                &out_tx,
                &executors,
            );
            if handled {
                commit_handled(session, &link, &mut committed).await;
                continue;
            }
            if session.has_unsent() {
                continue;
            }
            // Idle: sleep until the transport has something, a run has output (while
            // the session may hold more), a heartbeat is due, or the agent stops. (A
            // transport without readiness waited in `receive` already.)
            let room = session.unacked() < MAX_UNACKED;
            tokio::select! {
                _ = link.readable() => {}
                Some(msg) = out_rx.recv(), if room => {
                    session.queue(Lane::Bulk, msg);
                }
                _ = tokio::time::sleep_until(live.next_due().into()) => {}
                Ok(()) = stop.changed() => {}
            }
        }
    }
    Ok(())
}

/// Check an order's names before any path is built from them (see `ids`): the run id
/// (its workspace folder), the step names, each step's workdir and artifact patterns.
/// The controller sends only names it checked; a bad one is a bug or a forgery.
fn check_order(order: &RunOrder) -> Result<(), String> {
    use crate::ids::{ID_RULE, Shown, is_id};
    if !is_id(&order.run) {
        return Err(format!(
            "run id `{}` is not an identifier ({ID_RULE})",
            Shown(&order.run)
        ));
    }
    for step in &order.steps {
        if !is_id(&step.name) {
            return Err(format!(
                "step name `{}` is not an identifier ({ID_RULE})",
                Shown(&step.name)
            ));
        }
        if let Some(w) = &step.workdir
            && crate::jobs::contained(w).is_none()
        {
            return Err(format!(
                "step `{}`: workdir `{}` leaves the run's workspace",
                step.name,
                Shown(w)
            ));
        }
        if let Some(a) = step
            .artifacts
            .iter()
            .find(|a| crate::jobs::contained(a).is_none())
        {
            return Err(format!(
                "step `{}`: artifact pattern `{}` leaves the step's directory",
                step.name,
                Shown(a)
            ));
        }
    }
    Ok(())
}

/// Obey the controller's orders (all from sealed frames), unless stamped with a fencing
/// token older than the newest seen.
fn handle_orders(
    cfg: &AgentConfig,
    fencing: &CommandGate,
    delivered: Vec<(Lane, Vec<u8>)>,
    cancels: &mut HashMap<String, watch::Sender<bool>>,
    given: &mut VecDeque<String>,
    out_tx: &mpsc::Sender<Vec<u8>>,
    executors: &Arc<tokio::sync::Semaphore>,
) {
    for (_, payload) in delivered {
        match serde_json::from_slice::<ToAgent>(&payload) {
            Ok(ToAgent::StartRun(order)) if !fencing.admit(order.token) => {
                tracing::error!(agent = %cfg.name, run = order.run, "refusing an order with fencing token {} (newest seen {})", order.token, fencing.newest());
            }
            Ok(ToAgent::Cancel { run, token }) if !fencing.admit(token) => {
                tracing::error!(agent = %cfg.name, run, "refusing a cancel with fencing token {token} (newest seen {})", fencing.newest());
            }
            Ok(ToAgent::StartRun(order)) => {
                if let Err(e) = check_order(&order) {
                    tracing::error!(agent = %cfg.name, run = %crate::ids::Shown(&order.run), "refusing an order: {e}");
                    if crate::ids::is_id(&order.run) {
                        let refused = ToController::RunFinished {
                            run: order.run.clone(),
                            outcome: RunOutcome::Failed {
                                step: String::new(),
                                outcome: StepOutcome::CouldNotStart { reason: e },
                            },
                            lines: 0,
                        };
                        let _ = out_tx.try_send(protocol::encode(&refused, &[]));
                    }
                    continue;
                }
                let (tx, rx) = watch::channel(false);
                // Runs that ended have dropped their receiver.
                cancels.retain(|_, c| !c.is_closed());
                cancels.insert(order.run.clone(), tx);
                if given.len() == RUNS_REMEMBERED {
                    given.pop_front();
                }
                given.push_back(order.run.clone());
                let out = out_tx.clone();
                let (workspace, logs) = (cfg.workspace.clone(), cfg.logs.clone());
                let executor = executors.clone();
                tokio::spawn(async move {
                    // One executor per run: an order beyond them waits for a run to end
                    // (the controller places no more than that; this holds it here too).
                    let mut cancelled = rx.clone();
                    let held = tokio::select! {
                        held = executor.acquire_owned() => held.ok(),
                        Ok(_) = cancelled.wait_for(|c| *c) => None,
                    };
                    match held {
                        Some(_executor) => run(order, workspace, out, logs, rx).await,
                        None => {
                            let ended = ToController::RunFinished {
                                run: order.run,
                                outcome: RunOutcome::Cancelled,
                                lines: 0,
                            };
                            let _ = out.send(protocol::encode(&ended, &[])).await;
                        }
                    }
                });
            }
            Ok(ToAgent::Cancel { run, .. }) => {
                if let Some(c) = cancels.get(&run) {
                    let _ = c.send(true);
                }
            }
            Err(e) => {
                tracing::error!(agent = %cfg.name, "unreadable order from the controller: {e}")
            }
        }
    }
}

/// Run one order's steps in sequence, stopping at the first that does not succeed.
/// Everything goes on the bulk lane in the order it happened: step results and the run
/// result must not overtake the output and artifacts before them (a run is complete only
/// once all of it arrived).
async fn run(
    order: RunOrder,
    workspace: PathBuf,
    tx: mpsc::Sender<Vec<u8>>,
    logs: Option<Arc<LogSet>>,
    cancel: watch::Receiver<bool>,
) {
    let dir = workspace.join(&order.run);
    let masker = Masker::new(&order.mask);
    let numbered = Arc::new(AtomicU64::new(0));
    let mut outcome = RunOutcome::Succeeded;
    let mut budget = None;
    let could_not_start = |reason: String| RunOutcome::Failed {
        step: order
            .steps
            .first()
            .map(|s| s.name.clone())
            .unwrap_or_default(),
        outcome: StepOutcome::CouldNotStart { reason },
    };
    let log = match open_log(&order, logs).await {
        Ok(log) => log,
        Err(reason) => {
            outcome = could_not_start(reason);
            None
        }
    };
    let tracking = crate::agent::tracking::Tracking::from_env().unwrap_or_else(|reason| {
        outcome = could_not_start(reason);
        Default::default()
    });
    let out = Out { tx, log };
    if outcome != RunOutcome::Succeeded {
        // The log could not be opened: nothing runs.
    } else if let Err(e) = std::fs::create_dir_all(&dir) {
        outcome = could_not_start(format!("cannot create workspace {}: {e}", dir.display()));
    } else if let Some(limit) = order.log_limit {
        match LogBudget::new(limit, &dir) {
            Ok(b) => budget = Some(b),
            Err(e) => {
                let step = order.steps.first().map(|s| s.name.as_str()).unwrap_or("");
                let text = format!("[trellis] cannot apply the log limit (kept whole): {e}");
                notes(&out, &order.run, step, vec![text], &numbered).await;
            }
        }
    }
    for step in &order.steps {
        if outcome != RunOutcome::Succeeded {
            break;
        }
        send(
            &out,
            &ToController::StepStarted {
                run: order.run.clone(),
                step: step.name.clone(),
            },
        )
        .await;
        let step_dir = step.workdir.as_ref().map_or(dir.clone(), |w| dir.join(w));
        let _ = std::fs::create_dir_all(&step_dir);
        let (lines_tx, lines_rx) = mpsc::channel::<Output>(4096);
        let forward = tokio::spawn(forward(
            lines_rx,
            out.clone(),
            order.run.clone(),
            step.name.clone(),
            budget.take(),
            multiline(&order),
            numbered.clone(),
        ));
        let cmd = StepCommand {
            run: &step.run,
            dir: &step_dir,
            env: &order.env,
            timeout: Duration::from_millis(step.timeout_ms),
            kill_grace: exec::KILL_GRACE,
            tracking,
        };
        let end: StepOutcome = exec::run_step(cmd, &masker, lines_tx, cancel.clone())
            .await
            .into();
        budget = forward.await.ok().flatten();
        send(
            &out,
            &ToController::StepFinished {
                run: order.run.clone(),
                step: step.name.clone(),
                outcome: end.clone(),
            },
        )
        .await;
        if !step.artifacts.is_empty() {
            let (found, mut problems) = artifacts::find(&dir, &step_dir, &step.artifacts);
            for f in &found {
                if let Err(e) = artifacts::send(&order.run, Some(&step.name), f, &out.tx).await {
                    problems.push(format!("artifact `{}` not sent: {e}", f.name));
                }
            }
            let problems = problems.into_iter().map(|p| format!("[trellis] {p}"));
            notes(&out, &order.run, &step.name, problems.collect(), &numbered).await;
        }
        outcome = match end {
            e if e.succeeded() => RunOutcome::Succeeded,
            StepOutcome::TimedOut => RunOutcome::TimedOut {
                step: step.name.clone(),
            },
            StepOutcome::Cancelled => RunOutcome::Cancelled,
            e => RunOutcome::Failed {
                step: step.name.clone(),
                outcome: e,
            },
        };
    }
    if let Some(b) = budget {
        finish_budget(b, &order.run, &out, &numbered).await;
    }
    let lines = numbered.load(Ordering::Relaxed);
    send(
        &out,
        &ToController::RunFinished {
            run: order.run.clone(),
            outcome,
            lines,
        },
    )
    .await;
    if let Some(log) = &out.log {
        // After the run's result, so a slow store does not hold it up; a close that
        // fails is on disk and retried.
        log.logs.close(&order.run, lines).await;
    }
}

/// Open the run's log here when its method runs on the agent; why not, if it cannot be.
async fn open_log(order: &RunOrder, logs: Option<Arc<LogSet>>) -> Result<Option<RunLog>, String> {
    let Some(wanted) = &order.agent_log else {
        return Ok(None);
    };
    let Some(logs) = logs.filter(|l| l.side(&wanted.method).is_some()) else {
        return Err(format!(
            "this agent does not load logging method `{}`: add it to [agent] logging-methods",
            wanted.method
        ));
    };
    let meta = LogMetadata {
        instance_id: wanted.instance_id.clone(),
        loggable_type: "run".into(),
        loggable_id: order.run.clone(),
        job_id: order.job.clone(),
    };
    match logs.open(&order.run, &wanted.method, || (meta, 0)).await {
        Ok(log) => Ok(Some(RunLog { logs, log })),
        Err(e) => Err(format!("cannot open the run's log: {e}")),
    }
}

/// The order's multi-line rule (validated by the controller; a bad one is ignored here
/// with an error rather than failing the run).
fn multiline(order: &RunOrder) -> Option<MultiLine> {
    let p = order.multiline_start.as_ref()?;
    match crate::agent::multiline::compile(p) {
        Ok(r) => Some(MultiLine::new(r)),
        Err(e) => {
            tracing::error!(run = order.run, "multi-line rule ignored: {e}");
            None
        }
    }
}

/// Carry a step's output to the controller in messages of up to `LINES_PER_MESSAGE`
/// events, grouped into multi-line events when the job has a rule, then through the
/// run's log budget when it has one (handed back at the end).
async fn forward(
    mut lines: mpsc::Receiver<Output>,
    out: Out,
    run: String,
    step: String,
    mut budget: Option<LogBudget>,
    mut grouping: Option<MultiLine>,
    numbered: Arc<AtomicU64>,
) -> Option<LogBudget> {
    let mut batch = Vec::new();
    let mut events = Vec::new();
    let mut open = true;
    while open {
        // A held multi-line event goes out when its stream goes quiet.
        let first = match grouping.as_ref().is_some_and(MultiLine::holding) {
            true => match tokio::time::timeout(multiline::QUIET, lines.recv()).await {
                Ok(o) => o,
                Err(_) => {
                    grouping.as_mut().expect("holding").flush(&mut events);
                    None
                }
            },
            false => lines.recv().await,
        };
        let mut next = first;
        if next.is_none() && events.is_empty() {
            // The step's output ended: what is held goes, then we are done.
            open = false;
            if let Some(g) = grouping.as_mut() {
                g.flush(&mut events);
            }
        }
        loop {
            if let Some(o) = next.take() {
                match grouping.as_mut() {
                    Some(g) => g.push(line(o), &mut events),
                    None => events.push(line(o)),
                }
            }
            for e in events.drain(..) {
                match budget.as_mut() {
                    Some(b) => match b.admit(&step, e) {
                        Ok(admitted) => batch.extend(admitted),
                        Err(err) => {
                            // The full log cannot be kept: stop limiting rather than lose lines.
                            tracing::error!(
                                run,
                                "the full log cannot be written, limit lifted: {err}"
                            );
                            budget = None;
                        }
                    },
                    None => batch.push(e),
                }
            }
            if batch.len() >= LINES_PER_MESSAGE {
                break;
            }
            match lines.try_recv() {
                Ok(o) => next = Some(o),
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let msg = output(&run, &step, std::mem::take(&mut batch), &numbered);
        if !send(&out, &msg).await {
            break;
        }
    }
    budget
}

/// The run ended with a log budget: send the kept tail, then the full log artifact.
async fn finish_budget(b: LogBudget, run: &str, out: &Out, numbered: &AtomicU64) {
    let (tail, full) = match b.finish() {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(run, "cannot finish the full log: {e}");
            return;
        }
    };
    let mut tail = tail.into_iter().peekable();
    while let Some((step, first)) = tail.next() {
        let mut lines = vec![first];
        while lines.len() < LINES_PER_MESSAGE
            && let Some((_, l)) = tail.next_if(|(s, _)| *s == step)
        {
            lines.push(l);
        }
        send(out, &output(run, &step, lines, numbered)).await;
    }
    if let Some(path) = full {
        let f = artifacts::Found {
            name: FULL_LOG.into(),
            path,
        };
        if let Err(e) = artifacts::send(run, None, &f, &out.tx).await {
            tracing::error!(run, "the full log artifact was not sent: {e}");
        }
    }
}

/// Lines from the agent itself into a step's log (on stderr).
async fn notes(out: &Out, run: &str, step: &str, texts: Vec<String>, numbered: &AtomicU64) {
    if texts.is_empty() {
        return;
    }
    let lines = texts
        .into_iter()
        .map(|text| OutLine {
            stream: "err".into(),
            text,
            ts_ms: now_ms(),
        })
        .collect();
    send(out, &output(run, step, lines, numbered)).await;
}

fn line(o: Output) -> OutLine {
    OutLine {
        stream: if o.stream == Stream::Stdout {
            "out".into()
        } else {
            "err".into()
        },
        text: o.text,
        ts_ms: now_ms(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::StepOrder;

    fn order(run: &str, step: &str, workdir: Option<&str>, artifact: &str) -> RunOrder {
        RunOrder {
            run: run.into(),
            job: "j".into(),
            steps: vec![StepOrder {
                name: step.into(),
                run: "true".into(),
                timeout_ms: 1000,
                workdir: workdir.map(String::from),
                artifacts: vec![artifact.into()],
            }],
            env: vec![],
            mask: vec![],
            log_limit: None,
            multiline_start: None,
            agent_log: None,
            token: 0,
        }
    }

    #[test]
    fn an_order_with_a_name_that_would_leave_the_workspace_is_refused() {
        assert!(check_order(&order("r-000001", "build", Some("src"), "out/*.tgz")).is_ok());
        for (bad, what) in [
            (order("../../etc", "build", None, "x"), "run id"),
            (order("r-1/..", "build", None, "x"), "run id"),
            (order("r-1", "../b", None, "x"), "step name"),
            (order("r-1", "b", Some("../../x"), "x"), "workdir"),
            (order("r-1", "b", Some("/etc"), "x"), "workdir"),
            (order("r-1", "b", None, "../*.key"), "artifact pattern"),
        ] {
            let e = check_order(&bad).unwrap_err();
            assert!(e.contains(what), "{e}");
        }
    }
}

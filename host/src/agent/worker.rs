//! The agent's main loop: connect through the transport plugin, prove the secret, then
//! run what the controller orders, streaming output back. The session outlives links:
//! a dropped connection is re-established and nothing is lost or repeated.

use crate::agent::exec::{self, Output, StepCommand, Stream};
use crate::agent::mask::Masker;
use crate::points::bindings::command_transport::Lane;
use crate::points::transport;
use crate::protocol::{OutLine, RunOrder, RunOutcome, StepOutcome, ToAgent, ToController, now_ms};
use crate::runtime::Plugin;
use crate::session::link::{AgentSession, HandshakeError, exchange, introduce};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Lines per output message: bounds message size and latency.
const LINES_PER_MESSAGE: usize = 512;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub name: String,
    pub labels: Vec<String>,
    pub secret: String,
    /// Each run gets `<workspace>/<run-id>/`.
    pub workspace: PathBuf,
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
    let (out_tx, mut out_rx) = mpsc::channel::<(Lane, ToController)>(1024);
    let mut cancels: HashMap<String, watch::Sender<bool>> = HashMap::new();
    let mut backoff = Duration::from_millis(100);
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
        match introduce(
            &link,
            &cfg.name,
            &cfg.labels,
            &cfg.secret,
            &mut agent_session,
        )
        .await
        {
            Ok(()) => {}
            Err(e @ HandshakeError::Refused { .. }) => {
                tracing::error!(agent = %cfg.name, "{e}");
                return Err(AgentError::Refused(e));
            }
            Err(e) => {
                tracing::warn!(agent = %cfg.name, "handshake failed: {e}; reconnecting");
                continue;
            }
        };
        let session = &mut agent_session.session;
        backoff = Duration::from_millis(100);
        tracing::info!(agent = %cfg.name, "connected to the controller");
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            while let Ok((lane, msg)) = out_rx.try_recv() {
                session.queue(lane, serde_json::to_vec(&msg).expect("serialisable"));
            }
            let mut delivered = Vec::new();
            if let Err(e) = exchange(session, &link, 20, &mut delivered).await {
                tracing::warn!(agent = %cfg.name, "link lost: {e}; reconnecting");
                break;
            }
            for (_, payload) in delivered {
                match serde_json::from_slice::<ToAgent>(&payload) {
                    Ok(ToAgent::StartRun(order)) => {
                        let (tx, rx) = watch::channel(false);
                        cancels.insert(order.run.clone(), tx);
                        tokio::spawn(run(order, cfg.workspace.clone(), out_tx.clone(), rx));
                    }
                    Ok(ToAgent::Cancel { run }) => {
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
    }
    Ok(())
}

/// Run one order's steps in sequence, stopping at the first that does not succeed.
/// Step and run results travel on the bulk lane, after the step's output: they must not
/// overtake it (a run is complete only once all its output arrived).
async fn run(
    order: RunOrder,
    workspace: PathBuf,
    out: mpsc::Sender<(Lane, ToController)>,
    cancel: watch::Receiver<bool>,
) {
    let dir = workspace.join(&order.run);
    let masker = Masker::new(&order.mask);
    let mut outcome = RunOutcome::Succeeded;
    if let Err(e) = std::fs::create_dir_all(&dir) {
        outcome = RunOutcome::Failed {
            step: order
                .steps
                .first()
                .map(|s| s.name.clone())
                .unwrap_or_default(),
            outcome: StepOutcome::CouldNotStart {
                reason: format!("cannot create workspace {}: {e}", dir.display()),
            },
        };
    }
    for step in &order.steps {
        if outcome != RunOutcome::Succeeded {
            break;
        }
        let _ = out
            .send((
                Lane::Bulk,
                ToController::StepStarted {
                    run: order.run.clone(),
                    step: step.name.clone(),
                },
            ))
            .await;
        let step_dir = step.workdir.as_ref().map_or(dir.clone(), |w| dir.join(w));
        let _ = std::fs::create_dir_all(&step_dir);
        let (lines_tx, mut lines_rx) = mpsc::channel::<Output>(4096);
        let forward = {
            let (out, run, name) = (out.clone(), order.run.clone(), step.name.clone());
            tokio::spawn(async move {
                let mut batch = Vec::new();
                while let Some(first) = lines_rx.recv().await {
                    batch.push(line(first));
                    while batch.len() < LINES_PER_MESSAGE {
                        match lines_rx.try_recv() {
                            Ok(o) => batch.push(line(o)),
                            Err(_) => break,
                        }
                    }
                    let lines = std::mem::take(&mut batch);
                    if out
                        .send((
                            Lane::Bulk,
                            ToController::Output {
                                run: run.clone(),
                                step: name.clone(),
                                lines,
                            },
                        ))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            })
        };
        let cmd = StepCommand {
            run: &step.run,
            dir: &step_dir,
            env: &order.env,
            timeout: Duration::from_millis(step.timeout_ms),
            kill_grace: exec::KILL_GRACE,
        };
        let end: StepOutcome = exec::run_step(cmd, &masker, lines_tx, cancel.clone())
            .await
            .into();
        let _ = forward.await;
        let _ = out
            .send((
                Lane::Bulk,
                ToController::StepFinished {
                    run: order.run.clone(),
                    step: step.name.clone(),
                    outcome: end.clone(),
                },
            ))
            .await;
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
    let _ = out
        .send((
            Lane::Bulk,
            ToController::RunFinished {
                run: order.run,
                outcome,
            },
        ))
        .await;
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

//! A simulated agent: a real session over the real transport plugin, the way
//! `agent::worker::run_agent` drives it (connect, the sealed handshake with the agent's
//! secret, exchange rounds with heartbeats, commits), but a run's step is answered at
//! once: no process is spawned, one line of output, then the step's and the run's
//! results.
//!
//! This is the one place the load generator touches the agent side of the session code
//! (`session::link`): when that code changes, only `serve_link` follows.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use trellis::points::transport::{self, Link};
use trellis::protocol::{self, OutLine, RunOutcome, StepOutcome, ToAgent, ToController};
use trellis::runtime::Plugin;
use trellis::session::Session;
use trellis::session::link::{
    AgentSession, Introduced, LinkDown, Liveness, commit_handled, exchange, introduce, take_frames,
};
use trellis::wit::command_transport::Lane;

/// One simulated agent's name, secret and label.
#[derive(Clone)]
pub struct Identity {
    pub name: String,
    pub secret: String,
    pub label: String,
}

/// What the simulated agents tell the generator.
#[derive(Default)]
pub struct Tally {
    /// Agents welcomed at least once.
    pub connected: AtomicUsize,
    /// Links lost after a welcome (each followed by a reconnect).
    pub links_lost: AtomicU64,
    /// Connects or handshakes that failed (each retried).
    pub handshakes_failed: AtomicU64,
    /// Run id -> when its order reached its agent (µs since the epoch, wall clock).
    pub orders: Mutex<HashMap<String, i64>>,
    /// Runs answered (their results queued to go out).
    pub answered: AtomicU64,
    /// The first few errors, for the report.
    pub errors: Mutex<Vec<String>>,
}

impl Tally {
    fn error(&self, e: String) {
        let mut errors = self.errors.lock().unwrap();
        if errors.len() < 5 {
            errors.push(e);
        }
    }
}

/// Microseconds since the Unix epoch: the clock the generator and the controller's run
/// records (`created_ms`, `finished_ms`) share on one machine.
pub fn wall_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// How one simulated agent behaves.
#[derive(Clone, Copy)]
pub struct Behaviour {
    pub heartbeat: Duration,
    /// How long one exchange round waits in the plugin's `receive` for frames. The real
    /// agent waits 20 ms; a frame ends the wait as it arrives either way, so a longer
    /// wait changes nothing the controller sees and costs the generator less.
    pub wait_ms: u32,
}

/// Run one simulated agent until `stop` turns true: connect, and reconnect whenever the
/// link is lost, like the real agent.
pub async fn run(
    plugin: Arc<Plugin>,
    me: Identity,
    how: Behaviour,
    tally: Arc<Tally>,
    mut stop: watch::Receiver<bool>,
) {
    let mut session = AgentSession::new();
    let mut welcomed_once = false;
    let mut backoff = Duration::from_millis(100);
    while !*stop.borrow() {
        let link = match transport::connect(plugin.clone(), &me.name).await {
            Ok(l) => l,
            Err(e) => {
                tally.handshakes_failed.fetch_add(1, Relaxed);
                tally.error(format!("{}: connect: {e}", me.name));
                tokio::select! { _ = tokio::time::sleep(backoff) => {}, _ = stop.changed() => {} }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let introduced = introduce(
            &link,
            &me.name,
            std::slice::from_ref(&me.label),
            &[],
            1,
            &me.secret,
            vec![],
            &mut session,
        )
        .await;
        let introduced = match introduced {
            Ok(i) => i,
            Err(e) => {
                tally.handshakes_failed.fetch_add(1, Relaxed);
                tally.error(format!("{}: handshake: {e}", me.name));
                tokio::select! { _ = tokio::time::sleep(backoff) => {}, _ = stop.changed() => {} }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        if !welcomed_once {
            welcomed_once = true;
            tally.connected.fetch_add(1, Relaxed);
        }
        let lost = serve_link(
            &link,
            introduced,
            &mut session.session,
            how,
            &tally,
            &mut stop,
        )
        .await;
        if let Some(e) = lost {
            tally.links_lost.fetch_add(1, Relaxed);
            tally.error(format!("{}: link lost: {e}", me.name));
        }
    }
}

/// Exchange rounds on a welcomed link until it is lost (the reason) or `stop` (None).
async fn serve_link(
    link: &Link,
    Introduced {
        mut seal,
        mut early,
    }: Introduced,
    session: &mut Session,
    how: Behaviour,
    tally: &Tally,
    stop: &mut watch::Receiver<bool>,
) -> Option<LinkDown> {
    let mut live = Liveness::answering(how.heartbeat);
    let mut committed = [0u64; 2];
    loop {
        if *stop.borrow() {
            return None;
        }
        let mut delivered = Vec::new();
        let round = match take_frames(
            session,
            &mut seal,
            std::mem::take(&mut early),
            &mut delivered,
        ) {
            Ok(()) => {
                exchange(
                    session,
                    link,
                    &mut seal,
                    &mut live,
                    how.wait_ms,
                    true,
                    &mut delivered,
                )
                .await
            }
            Err(e) => Err(LinkDown::Unsealed(e)),
        };
        let handled = !delivered.is_empty();
        for (_, payload) in delivered {
            answer(&payload, session, tally);
        }
        if let Err(e) = round {
            return Some(e);
        }
        if handled {
            commit_handled(session, link, &mut committed).await;
        }
    }
}

/// Obey one order: a run is answered at once with one step that printed one line and
/// succeeded. Everything goes on the bulk lane, in order, like the real agent's.
fn answer(payload: &[u8], session: &mut Session, tally: &Tally) {
    let order = match serde_json::from_slice::<ToAgent>(payload) {
        Ok(ToAgent::StartRun(order)) => order,
        Ok(ToAgent::Cancel { .. }) => return,
        Err(e) => {
            tally.error(format!("unreadable order: {e}"));
            return;
        }
    };
    tally
        .orders
        .lock()
        .unwrap()
        .insert(order.run.clone(), wall_us());
    let run = order.run;
    let step = order
        .steps
        .first()
        .map(|s| s.name.clone())
        .unwrap_or_else(|| "step".into());
    let messages = [
        ToController::StepStarted {
            run: run.clone(),
            step: step.clone(),
        },
        ToController::Output {
            run: run.clone(),
            step: step.clone(),
            lines: vec![OutLine {
                stream: "out".into(),
                text: "answered by the load generator".into(),
                ts_ms: protocol::now_ms(),
            }],
            first: 1,
        },
        ToController::StepFinished {
            run: run.clone(),
            step,
            outcome: StepOutcome::Exited { code: 0 },
        },
        ToController::RunFinished {
            run,
            outcome: RunOutcome::Succeeded,
            lines: 1,
        },
    ];
    for m in &messages {
        session.queue(Lane::Bulk, protocol::encode(m, &[]));
    }
    tally.answered.fetch_add(1, Relaxed);
}

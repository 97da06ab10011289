//! The build queue: a submitted run waits here, `queued` with no agent, until a connected
//! agent with its label has a free executor (`[agent] executors`, declared in its hello).
//!
//! - Order: higher job `priority` first, then first submitted first (FIFO per label).
//!   A run that cannot be placed does not hold back runs of other labels.
//! - Placement happens in one place ([`Controller::place_waiting`]), under the queue's
//!   lock, which also holds the count of runs placed on each agent: two submits at once
//!   never take the same executor. It runs when something changes — a submit, an agent
//!   connecting, a run ending (its executor freed), a cancel — and when the earliest
//!   `queue-timeout` falls due; nothing polls.
//! - Durable: each waiting run's job is kept in `<state>/queue/<run>.json` (through the
//!   HA fencing-token gate) until the run starts, so a controller that restarts, or a
//!   standby that takes over, puts the waiting runs back in their order. A run placed
//!   on an agent that never received its order (the controller died with the order
//!   unsent) goes back in the queue, in its old place, when the agent says so in its
//!   hello ([`Controller::requeue`]).
//! - A waiting run can be cancelled; one that waited longer than its job's
//!   `queue-timeout` is ended `cancelled`, with a note saying why it waited.
//! - [`Controller::queue_view`] says what waits and why (`GET /api/queue`,
//!   `trellis queue`, the web page).

use super::state::{self, LogLocator, RunRecord};
use super::{Controller, Update, add_note};
use crate::jobs::Job;
use crate::protocol::{AgentLog, RunOrder, RunOutcome, StepOrder, ToAgent, now_ms};
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};

/// Queue order: priority (higher first), then the order of submission.
type Key = (Reverse<i32>, u64);

/// What `<state>/queue/<run>.json` holds: the job to run once an agent takes it, and
/// its place in the order of submission.
#[derive(Serialize, Deserialize)]
struct Kept {
    seq: u64,
    job: Job,
}

/// A run waiting for an agent.
struct Entry {
    run: String,
    job: Arc<Job>,
    log: LogLocator,
    since_ms: i64,
}

impl Entry {
    /// When its `queue-timeout` ends it (wall clock: it holds across a restart).
    fn deadline_ms(&self) -> Option<i64> {
        self.job.queue_timeout.map(|t| {
            self.since_ms
                .saturating_add(i64::try_from(t.as_millis()).unwrap_or(i64::MAX))
        })
    }
}

#[derive(Default)]
struct Lines {
    waiting: BTreeMap<Key, Entry>,
    keys: HashMap<String, Key>,
    /// Agent -> the unfinished runs placed on it (each holds one executor).
    placed: HashMap<String, HashSet<String>>,
    /// Placed runs not started yet: their jobs are still kept, so that one whose order
    /// never reached its agent can be queued again.
    unstarted: HashSet<String>,
    next_seq: u64,
}

impl Lines {
    /// Put back run `r`, whose job was kept as `k`, in the place `k` records.
    fn add_kept(&mut self, k: Kept, r: &RunRecord) {
        self.add(
            (Reverse(k.job.priority), k.seq),
            Entry {
                run: r.id.clone(),
                job: Arc::new(k.job),
                log: r.log.clone(),
                since_ms: r.created_ms,
            },
        );
    }

    fn add(&mut self, key: Key, e: Entry) {
        self.next_seq = self.next_seq.max(key.1 + 1);
        self.keys.insert(e.run.clone(), key);
        self.waiting.insert(key, e);
    }

    fn take(&mut self, run: &str) -> Option<Entry> {
        let key = self.keys.remove(run)?;
        self.waiting.remove(&key)
    }

    fn busy(&self, agent: &str) -> usize {
        self.placed.get(agent).map_or(0, HashSet::len)
    }
}

pub(super) struct Queue {
    dir: PathBuf,
    lines: Mutex<Lines>,
    wake: Notify,
}

/// A connected agent as placement sees it.
struct Seat {
    name: String,
    labels: Vec<String>,
    log_methods: Vec<String>,
    executors: usize,
    session: String,
    orders: mpsc::Sender<ToAgent>,
}

impl Seat {
    fn fits(&self, e: &Entry) -> bool {
        self.labels.contains(&e.job.agent)
            && (!e.log.on_agent || self.log_methods.contains(&e.log.method))
    }
}

/// One waiting run, as `GET /api/queue` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueuedRun {
    /// 1 = placed next.
    pub position: usize,
    pub run: String,
    pub job: String,
    pub label: String,
    pub priority: i32,
    pub queued_at_ms: i64,
    pub waited_ms: i64,
    /// The job's `queue-timeout`, if any.
    pub queue_timeout_ms: Option<u64>,
    /// Why it waits, e.g. "all 3 executors of label `linux` are busy".
    pub reason: String,
}

/// The executors of one label (connected agents only).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabelSeats {
    pub label: String,
    pub agents: usize,
    pub executors: usize,
    pub busy: usize,
    pub waiting: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueueView {
    pub waiting: Vec<QueuedRun>,
    pub labels: Vec<LabelSeats>,
}

impl Queue {
    /// The queue kept in `<state>/queue/`, empty (see [`Controller::restore_queue`]).
    pub(super) fn open(state_dir: &std::path::Path) -> std::io::Result<Queue> {
        let dir = state_dir.join("queue");
        std::fs::create_dir_all(&dir)?;
        Ok(Queue {
            dir,
            lines: Mutex::default(),
            wake: Notify::new(),
        })
    }

    /// Something changed that may let a waiting run go: place again.
    pub(super) fn wake(&self) {
        self.wake.notify_one();
    }

    /// A placed run ended: its executor is free.
    pub(super) fn release(&self, agent: &str, run: &str) {
        let freed = self
            .lines
            .lock()
            .unwrap()
            .placed
            .get_mut(agent)
            .is_some_and(|runs| runs.remove(run));
        if freed {
            self.wake();
        }
    }

    /// Whether `run` was placed and not started, its job still kept; it no longer
    /// counts as such (true once: the caller removes or uses the job).
    pub(super) fn take_unstarted(&self, run: &str) -> bool {
        self.lines.lock().unwrap().unstarted.remove(run)
    }

    /// A run already on `agent` (found at start): it holds an executor.
    pub(super) fn hold(&self, agent: &str, run: &str) {
        let mut l = self.lines.lock().unwrap();
        l.placed
            .entry(agent.to_string())
            .or_default()
            .insert(run.to_string());
    }

    fn file(&self, run: &str) -> PathBuf {
        self.dir.join(format!("{run}.json"))
    }

    /// The job kept for `run`, read back.
    fn kept(&self, run: &str) -> Result<Kept, String> {
        let bytes = std::fs::read(self.file(run)).map_err(|e| e.to_string())?;
        serde_json::from_slice(&bytes).map_err(|e| e.to_string())
    }
}

impl Controller {
    /// Put a new run (just recorded `queued`, no agent) in the queue: its job is kept
    /// on disk first, so it survives a restart.
    pub(super) fn enqueue(&self, record: &RunRecord, job: &Job) -> std::io::Result<()> {
        let mut l = self.queue.lines.lock().unwrap();
        let seq = l.next_seq;
        let kept = Kept {
            seq,
            job: job.clone(),
        };
        let bytes = serde_json::to_vec(&kept).expect("serialisable");
        let path = self.queue.file(&record.id);
        let write = || state::write_atomic(&path, &bytes);
        match self.store.gate() {
            Some(g) => g.write(write)?,
            None => write()?,
        }
        l.add(
            (Reverse(job.priority), seq),
            Entry {
                run: record.id.clone(),
                job: Arc::new(job.clone()),
                log: record.log.clone(),
                since_ms: record.created_ms,
            },
        );
        Ok(())
    }

    /// At start (a restart, or a standby taking over): put the runs that were waiting
    /// back in the queue, in their order, and note which runs hold an agent's executor.
    /// A waiting run whose job was not kept (the process stopped between recording the
    /// run and keeping its job) is ended with a note.
    pub(super) fn restore_queue(&self) {
        let mut orphans = Vec::new();
        let mut restored = 0;
        let mut waiting = HashSet::new();
        for r in self.store.unfinished() {
            if !r.agent.is_empty() {
                self.queue.hold(&r.agent, &r.id);
                // Placed, not started: its job stays kept in case its agent never got it.
                if r.status == state::RunStatus::Queued && self.queue.file(&r.id).exists() {
                    self.queue
                        .lines
                        .lock()
                        .unwrap()
                        .unstarted
                        .insert(r.id.clone());
                    waiting.insert(format!("{}.json", r.id));
                }
                continue;
            }
            match self.queue.kept(&r.id) {
                Ok(k) => {
                    self.queue.lines.lock().unwrap().add_kept(k, &r);
                    waiting.insert(format!("{}.json", r.id));
                    restored += 1;
                }
                Err(e) => orphans.push((r.id, e)),
            }
        }
        if restored > 0 {
            tracing::info!(runs = restored, "queued runs back in the queue");
        }
        for (run, e) in orphans {
            tracing::error!(run, "a queued run's job cannot be read ({e}): ending it");
            self.update(&run, |r| {
                r.finish(RunOutcome::Cancelled);
                add_note(
                    r,
                    "the controller stopped before this queued run's job was kept (or it cannot be read); submit it again",
                );
            });
        }
        // Jobs of runs neither waiting nor placed unstarted (ended just before a stop).
        if let Ok(dir) = std::fs::read_dir(&self.queue.dir) {
            for f in dir.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if name.ends_with(".json") && !waiting.contains(&name) {
                    self.forget_job(name.trim_end_matches(".json"));
                }
            }
        }
    }

    /// Remove a run's kept job (it started, or it ended while waiting).
    pub(super) fn forget_job(&self, run: &str) {
        let path = self.queue.file(run);
        let remove = || match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
        let removed = match self.store.gate() {
            Some(g) => g.write(remove),
            None => remove(),
        };
        if let Err(e) = removed {
            // Harmless: at the next start a job whose run is not waiting is removed.
            tracing::warn!(run, "cannot remove the queued run's kept job: {e}");
        }
    }

    /// Put run `run`, placed on `agent` but never received by it (its hello says so),
    /// back in the queue in the place it had, its executor freed. False when its job is
    /// no longer kept (it started, or the file cannot be read): the caller ends it.
    pub(super) fn requeue(&self, agent: &str, run: &str, note: &str) -> bool {
        if !self.queue.take_unstarted(run) {
            return false;
        }
        let k = match self.queue.kept(run) {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(run, "cannot read the placed run's kept job ({e})");
                return false;
            }
        };
        let back = self.store.update(run, |r| {
            r.agent.clear();
            r.agent_session.clear();
            add_note(r, note);
        });
        let r = match back {
            Ok(Some(r)) => r,
            Ok(None) => return false,
            Err(e) => {
                tracing::error!(run, "cannot put the run back in the queue: {e}");
                return false;
            }
        };
        {
            let mut l = self.queue.lines.lock().unwrap();
            if let Some(runs) = l.placed.get_mut(agent) {
                runs.remove(run);
            }
            l.add_kept(k, &r);
        }
        tracing::info!(run, agent, "{note}");
        let _ = self.updates.send(Update::Run(Box::new(r)));
        self.queue.wake();
        true
    }

    /// Take a waiting run out of the queue and end it: cancelled, with `note`.
    fn end_waiting(&self, run: &str, note: &str) {
        self.forget_job(run);
        self.update(run, |r| {
            r.finish(RunOutcome::Cancelled);
            add_note(r, note);
        });
    }

    /// Cancel `run` if it is still waiting (true); false if it is not in the queue
    /// (placed meanwhile, or never queued).
    pub(super) fn cancel_waiting(&self, run: &str) -> bool {
        let taken = self.queue.lines.lock().unwrap().take(run);
        match taken {
            Some(_) => {
                self.end_waiting(run, "cancelled while queued, before any agent took it");
                self.queue.wake();
                true
            }
            None => false,
        }
    }

    /// The connected agents, for placement.
    fn seats(&self) -> Vec<Seat> {
        let a = self.agents.lock().unwrap();
        let mut seats: Vec<Seat> = a
            .iter()
            .filter(|(_, s)| s.connected)
            .map(|(name, s)| Seat {
                name: name.clone(),
                labels: s.labels.clone(),
                log_methods: s.log_methods.clone(),
                executors: s.executors as usize,
                session: s.agent_session.clone(),
                orders: s.orders.clone(),
            })
            .collect();
        seats.sort_by(|a, b| a.name.cmp(&b.name));
        seats
    }

    /// Place every waiting run that can go now, in queue order, and end those whose
    /// `queue-timeout` passed. Returns the earliest deadline of the runs still waiting.
    pub(super) fn place_waiting(&self) -> Option<i64> {
        if self.queue.lines.lock().unwrap().waiting.is_empty() {
            return None;
        }
        let seats = self.seats();
        let now = now_ms();
        let mut expired = Vec::new();
        let mut l = self.queue.lines.lock().unwrap();
        // Labels with no free executor for a run that needs nothing more than the
        // label: later runs of that label are not looked at (a pass stays cheap with a
        // long queue).
        let mut full: HashSet<String> = HashSet::new();
        let keys: Vec<Key> = l.waiting.keys().copied().collect();
        let mut next_deadline: Option<i64> = None;
        for key in keys {
            // Gone meanwhile (the lock is let go to end a run that cannot be placed).
            let Some(e) = l.waiting.get(&key) else {
                continue;
            };
            if e.deadline_ms().is_some_and(|d| d <= now) {
                let e = l.waiting.remove(&key).expect("listed");
                l.keys.remove(&e.run);
                expired.push(e);
                continue;
            }
            let label = &e.job.agent;
            if full.contains(label) && !e.log.on_agent {
                next_deadline = min_some(next_deadline, e.deadline_ms());
                continue;
            }
            // The least busy agent that fits (idle ones first), then by name.
            let chosen = seats
                .iter()
                .filter(|s| s.fits(e) && l.busy(&s.name) < s.executors)
                .min_by_key(|s| (l.busy(&s.name), Reverse(s.executors), s.name.clone()));
            let Some(seat) = chosen else {
                if !e.log.on_agent {
                    full.insert(label.clone());
                }
                next_deadline = min_some(next_deadline, e.deadline_ms());
                continue;
            };
            let e = l.waiting.remove(&key).expect("listed");
            l.keys.remove(&e.run);
            match self.give(&e, seat) {
                Ok(()) => {
                    l.placed
                        .entry(seat.name.clone())
                        .or_default()
                        .insert(e.run.clone());
                    l.unstarted.insert(e.run.clone());
                }
                Err(Unplaced::Again(why)) => {
                    // Not given (the state directory refused the write: a newer
                    // controller took over). It stays queued here and on disk.
                    tracing::error!(run = e.run, "cannot place the run: {why}");
                    next_deadline = min_some(next_deadline, e.deadline_ms());
                    l.add(key, e);
                }
                Err(Unplaced::Ended(why)) => {
                    drop(l);
                    self.end_waiting(&e.run, &why);
                    l = self.queue.lines.lock().unwrap();
                }
            }
        }
        drop(l);
        for e in expired {
            let waited = Duration::from_millis((now - e.since_ms).max(0) as u64);
            let limit = e.job.queue_timeout.unwrap_or_default();
            let why = self.why_waiting(&e, 0, &seats);
            tracing::info!(run = e.run, "waited longer than its queue-timeout: ended");
            self.end_waiting(
                &e.run,
                &format!(
                    "waited {} in the queue, longer than its queue-timeout ({}): {why}",
                    crate::config::HumanDuration(round_ms(waited)),
                    crate::config::HumanDuration(limit)
                ),
            );
        }
        next_deadline
    }

    /// Give waiting run `e` to `seat`: record where it goes, then send the order.
    fn give(&self, e: &Entry, seat: &Seat) -> Result<(), Unplaced> {
        let order = self.order_for(&e.run, &e.job, &e.log).map_err(|refusal| {
            Unplaced::Ended(format!(
                "its job can no longer be run as submitted: {refusal}"
            ))
        })?;
        let placed = self.store.update(&e.run, |r| {
            r.agent = seat.name.clone();
            r.agent_session = seat.session.clone();
        });
        match placed {
            Ok(Some(r)) => {
                let _ = seat.orders.try_send(ToAgent::StartRun(order));
                let _ = self.updates.send(Update::Run(Box::new(r)));
                tracing::debug!(run = e.run, agent = seat.name, "placed");
                Ok(())
            }
            Ok(None) => Err(Unplaced::Ended("its record is gone".into())),
            Err(err) => Err(Unplaced::Again(err.to_string())),
        }
    }

    /// The order that starts `run` of `job` on an agent (the job's secrets resolved
    /// now: their values are never kept on disk).
    fn order_for(
        &self,
        run: &str,
        job: &Job,
        log: &LogLocator,
    ) -> Result<RunOrder, crate::jobs::secrets::SecretRefusal> {
        let mut env: Vec<(String, String)> = job
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let secrets = self.cfg.secrets.resolve(job)?;
        let mask = secrets.iter().map(|(_, v)| v.clone()).collect();
        env.extend(secrets);
        Ok(RunOrder {
            run: run.to_string(),
            job: job.name.clone(),
            steps: job
                .steps
                .iter()
                .map(|s| StepOrder {
                    name: s.name.clone(),
                    run: s.run.clone(),
                    timeout_ms: s.timeout.as_millis() as u64,
                    workdir: s.workdir.as_ref().map(|p| p.display().to_string()),
                    artifacts: s.artifacts.clone(),
                })
                .collect(),
            env,
            mask,
            log_limit: job.log_limit,
            multiline_start: job
                .multiline_start
                .clone()
                .or_else(|| self.cfg.multiline_start.clone()),
            agent_log: log.on_agent.then(|| AgentLog {
                method: log.method.clone(),
                instance_id: self.cfg.instance_id.clone(),
            }),
            token: self.cfg.fencing_token,
        })
    }

    /// Place waiting runs whenever something changes (see [`Queue::wake`]) or the
    /// earliest `queue-timeout` falls due.
    pub(super) async fn place_forever(self: Arc<Self>) {
        loop {
            let next = self.place_waiting();
            let woken = self.queue.wake.notified();
            match next {
                None => woken.await,
                Some(at) => {
                    let wait = Duration::from_millis((at - now_ms()).max(0) as u64);
                    tokio::select! {
                        _ = woken => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// Why `e` waits, `ahead` runs of its label before it.
    fn why_waiting(&self, e: &Entry, ahead: usize, seats: &[Seat]) -> String {
        let label = &e.job.agent;
        let labelled: Vec<&Seat> = seats.iter().filter(|s| s.labels.contains(label)).collect();
        if labelled.is_empty() {
            let known: BTreeSet<String> = self
                .agents
                .lock()
                .unwrap()
                .values()
                .flat_map(|s| s.labels.iter().cloned())
                .collect();
            if known.contains(label) {
                return format!("no agent with label `{label}` is connected");
            }
            let known = if known.is_empty() {
                "none yet".to_string()
            } else {
                known.into_iter().collect::<Vec<_>>().join(", ")
            };
            return format!(
                "no agent with label `{label}` is connected, and none has declared it to this controller (labels declared: {known}); it waits until one connects, or check the job's `agent`"
            );
        }
        let fitting: Vec<&&Seat> = labelled.iter().filter(|s| s.fits(e)).collect();
        if fitting.is_empty() {
            return format!(
                "no connected agent with label `{label}` has logging method `{}`",
                e.log.method
            );
        }
        let l = self.queue.lines.lock().unwrap();
        let executors: usize = fitting.iter().map(|s| s.executors).sum();
        let busy: usize = fitting
            .iter()
            .map(|s| l.busy(&s.name).min(s.executors))
            .sum();
        drop(l);
        if busy < executors {
            return format!(
                "{} of {executors} executors of label `{label}` free: being placed",
                executors - busy
            );
        }
        let mut why = if executors == 1 {
            format!("the 1 executor of label `{label}` is busy")
        } else {
            format!("all {executors} executors of label `{label}` are busy")
        };
        if ahead > 0 {
            why.push_str(&format!(
                "; {ahead} run{} of this label ahead of it",
                if ahead == 1 { "" } else { "s" }
            ));
        }
        why
    }

    /// What waits, in the order it will be placed, and why; and each label's executors.
    pub fn queue_view(&self) -> QueueView {
        let seats = self.seats();
        let now = now_ms();
        // Copied out: `why_waiting` takes the lock again.
        let waiting: Vec<(String, Arc<Job>, LogLocator, i64)> = {
            let l = self.queue.lines.lock().unwrap();
            l.waiting
                .values()
                .map(|e| (e.run.clone(), e.job.clone(), e.log.clone(), e.since_ms))
                .collect()
        };
        let mut ahead: HashMap<String, usize> = HashMap::new();
        let mut out = Vec::with_capacity(waiting.len());
        for (i, (run, job, log, since_ms)) in waiting.into_iter().enumerate() {
            let n = ahead.entry(job.agent.clone()).or_default();
            let e = Entry {
                run,
                job,
                log,
                since_ms,
            };
            let reason = self.why_waiting(&e, *n, &seats);
            *n += 1;
            out.push(QueuedRun {
                position: i + 1,
                run: e.run,
                job: e.job.name.clone(),
                label: e.job.agent.clone(),
                priority: e.job.priority,
                queued_at_ms: since_ms,
                waited_ms: (now - since_ms).max(0),
                queue_timeout_ms: e.job.queue_timeout.map(|t| t.as_millis() as u64),
                reason,
            });
        }
        let l = self.queue.lines.lock().unwrap();
        let mut labels: BTreeMap<String, LabelSeats> = BTreeMap::new();
        for s in &seats {
            for label in &s.labels {
                let ls = labels.entry(label.clone()).or_insert_with(|| LabelSeats {
                    label: label.clone(),
                    agents: 0,
                    executors: 0,
                    busy: 0,
                    waiting: 0,
                });
                ls.agents += 1;
                ls.executors += s.executors;
                ls.busy += l.busy(&s.name).min(s.executors);
            }
        }
        drop(l);
        for (label, n) in ahead {
            labels
                .entry(label.clone())
                .or_insert_with(|| LabelSeats {
                    label,
                    agents: 0,
                    executors: 0,
                    busy: 0,
                    waiting: 0,
                })
                .waiting = n;
        }
        QueueView {
            waiting: out,
            labels: labels.into_values().collect(),
        }
    }

    /// Runs placed on `agent` and not finished (the executors it has busy).
    pub fn busy_executors(&self, agent: &str) -> usize {
        self.queue.lines.lock().unwrap().busy(agent)
    }
}

/// Why a waiting run was not given to the agent chosen for it.
enum Unplaced {
    /// It stays queued (try again later).
    Again(String),
    /// It cannot run: end it with this note.
    Ended(String),
}

fn min_some(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// To the millisecond (a duration shown in a note).
fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

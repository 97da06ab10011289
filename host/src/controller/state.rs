//! Run state in the controller's state directory: one folder per run, each record
//! written atomically (write a temp file, fsync, rename, fsync the folder), so a crash
//! leaves either the old record or the new one, never half of one.
//!
//! A full disk is survived: a record that cannot be written (no space, or any other
//! storage error) still changes in memory, so the run goes on and the API shows it as
//! it is; the run is kept in an "unsaved" set and written again with backoff
//! (`Controller::retry_state_writes`) until the disk takes it. Only a new run is refused
//! while the disk is full ([`is_no_space`]: the API answers 507 naming the directory),
//! since nothing may be promised that is not on disk. A write refused by the HA
//! fencing-token gate is not retried: the controller was replaced.

use crate::ha::token::StateGate;
use crate::jobs::Job;
use crate::protocol::{RunOutcome, StepOutcome, now_ms};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// How stale a run's event count may be on disk while output streams in (see
/// `RunStore::progress`).
pub const PROGRESS_SAVED_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunStatus {
    /// Waiting in the queue for an agent (`agent` empty), or given to an agent that has
    /// not started it yet.
    Queued,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
    /// The run cannot end normally: its agent was lost (restarted, or out of contact
    /// too long), or its order never reached the agent before the controller
    /// restarted. `note` says which.
    Lost,
}

impl RunStatus {
    pub fn is_final(self) -> bool {
        !matches!(self, RunStatus::Queued | RunStatus::Running)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
    Skipped,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub name: String,
    pub status: StepStatus,
    pub outcome: Option<StepOutcome>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: String,
    pub job: String,
    pub agent: String,
    /// The agent process the run was given to (`Hello::session`): another process of the
    /// same agent cannot finish it.
    #[serde(default)]
    pub agent_session: String,
    /// The job's agent label (empty: any agent; records from before the queue).
    #[serde(default)]
    pub label: String,
    pub status: RunStatus,
    pub steps: Vec<StepRecord>,
    pub outcome: Option<RunOutcome>,
    /// Log events recorded so far (the final count once finished).
    pub events: u64,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
    #[serde(default)]
    pub note: Option<String>,
    /// Artifacts received and checked, in the order they arrived.
    #[serde(default)]
    pub artifacts: Vec<super::artifacts::ArtifactRecord>,
    /// Which plugins write and read this run's log.
    #[serde(default)]
    pub log: LogLocator,
    /// The name of the API token that submitted it (`trellis up`: `local`).
    #[serde(default)]
    pub submitted_by: String,
}

/// JEP-212's locator: the logging method a run's log is written with and the browser it
/// is read with, fixed when the run is submitted, so a later change of the controller's
/// defaults leaves older runs readable with the browser they were written for. Empty
/// names (records from before this field) mean the controller's defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LogLocator {
    pub method: String,
    pub browser: String,
    /// The method writes from the agent (JEP-212's agent side): the controller gets
    /// only counts, and the agent closes the log.
    #[serde(default)]
    pub on_agent: bool,
}

impl RunRecord {
    pub fn finish(&mut self, outcome: RunOutcome) {
        self.status = outcome.status();
        self.outcome = Some(outcome);
        self.finished_ms = Some(now_ms());
        for s in &mut self.steps {
            if matches!(s.status, StepStatus::Pending | StepStatus::Running) {
                s.status = StepStatus::Skipped;
            }
        }
    }
}

pub struct RunStore {
    dir: PathBuf,
    runs: Mutex<BTreeMap<String, RunRecord>>,
    /// When each unfinished run's record was last written.
    saved: Mutex<HashMap<String, Instant>>,
    /// The fencing-token gate every write goes through, in HA setups.
    gate: std::sync::OnceLock<std::sync::Arc<StateGate>>,
    /// Runs whose newest record is only in memory: its write failed (a full disk),
    /// and is tried again (`flush_unsaved`).
    unsaved: Mutex<BTreeSet<String>>,
    /// Record writes that failed (the `/metrics` counter).
    write_failures: AtomicU64,
    /// Writes are failing now (logged once when it starts, once when it ends).
    failing: AtomicBool,
}

/// Whether an error means the filesystem is out of space (or out of quota).
pub fn is_no_space(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull
        || matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Whether the HA gate refused the write (a newer controller took over): never retried.
fn is_refused_by_gate(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.is::<crate::ha::token::Fenced>())
}

impl RunStore {
    /// Open (or create) the store and load every past run. Runs that were in flight
    /// when the controller stopped stay in flight: their agent may still be working on
    /// them (the controller decides when the agent comes back, or does not).
    pub fn open(state_dir: &Path) -> io::Result<RunStore> {
        let dir = state_dir.join("runs");
        std::fs::create_dir_all(&dir)?;
        let mut runs = BTreeMap::new();
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path().join("run.json");
            let Ok(text) = std::fs::read(&path) else {
                continue;
            };
            match serde_json::from_slice::<RunRecord>(&text) {
                Ok(r) => {
                    runs.insert(r.id.clone(), r);
                }
                Err(e) => {
                    tracing::error!(file = %path.display(), "unreadable run record, skipped: {e}")
                }
            }
        }
        Ok(RunStore {
            dir,
            runs: Mutex::new(runs),
            saved: Mutex::default(),
            gate: std::sync::OnceLock::new(),
            unsaved: Mutex::default(),
            write_failures: AtomicU64::new(0),
            failing: AtomicBool::new(false),
        })
    }

    /// The state directory (the parent of `runs/`), for messages.
    pub fn state_dir(&self) -> &Path {
        self.dir.parent().unwrap_or(&self.dir)
    }

    /// Record writes that failed so far (`/metrics`).
    pub fn write_failures(&self) -> u64 {
        self.write_failures.load(Relaxed)
    }

    /// Runs whose newest record waits to be written (`/metrics`).
    pub fn unsaved_runs(&self) -> usize {
        self.unsaved.lock().unwrap().len()
    }

    /// `persist` for a change already made in memory: a failure (other than the HA
    /// gate's refusal) leaves the run unsaved, to be written again later.
    fn persist_or_keep(&self, r: &RunRecord) -> io::Result<()> {
        match self.persist(r) {
            Ok(()) => {
                self.unsaved.lock().unwrap().remove(&r.id);
                Ok(())
            }
            Err(e) if is_refused_by_gate(&e) => Err(e),
            Err(e) => {
                self.note_failure(&e);
                self.unsaved.lock().unwrap().insert(r.id.clone());
                Ok(())
            }
        }
    }

    fn note_failure(&self, e: &io::Error) {
        self.write_failures.fetch_add(1, Relaxed);
        if !self.failing.swap(true, Relaxed) {
            tracing::error!(
                dir = %self.state_dir().display(),
                "cannot write run records to the state directory: {e}; runs go on in memory and their records are written again once the disk takes them (new runs are refused meanwhile){}",
                if is_no_space(e) { "; free space on its filesystem" } else { "" }
            );
        }
    }

    /// Write again every record that could not be written. Ok once none is left; the
    /// first error otherwise (the rest stay unsaved).
    pub fn flush_unsaved(&self) -> io::Result<()> {
        let ids: Vec<String> = self.unsaved.lock().unwrap().iter().cloned().collect();
        // Under the runs' lock, as `update`: an older copy never overwrites a newer one.
        let runs = self.runs.lock().unwrap();
        for id in ids {
            let Some(r) = runs.get(&id) else {
                self.unsaved.lock().unwrap().remove(&id);
                continue;
            };
            match self.persist(r) {
                Ok(()) => {
                    self.unsaved.lock().unwrap().remove(&id);
                }
                Err(e) if is_refused_by_gate(&e) => {
                    self.unsaved.lock().unwrap().clear();
                    return Err(e);
                }
                Err(e) => {
                    self.write_failures.fetch_add(1, Relaxed);
                    return Err(e);
                }
            }
        }
        if self.failing.swap(false, Relaxed) {
            tracing::info!(dir = %self.state_dir().display(), "run records are written to the state directory again");
        }
        Ok(())
    }

    /// From now on every record write carries this gate's fencing token, and is
    /// refused once the state has seen a newer one (`ha::token::StateGate`).
    pub fn guard_with(&self, gate: StateGate) {
        let _ = self.gate.set(std::sync::Arc::new(gate));
    }

    /// The fencing-token gate other writes to the state go through (artifacts), if HA.
    pub fn gate(&self) -> Option<std::sync::Arc<StateGate>> {
        self.gate.get().cloned()
    }

    /// Writes refused for an older fencing token.
    pub fn refused_writes(&self) -> u64 {
        self.gate.get().map_or(0, |g| g.refused())
    }

    fn persist(&self, r: &RunRecord) -> io::Result<()> {
        let folder = self.dir.join(&r.id);
        let bytes = serde_json::to_vec_pretty(r).expect("serialisable");
        let write = || {
            std::fs::create_dir_all(&folder)?;
            write_atomic(&folder.join("run.json"), &bytes)
        };
        match self.gate.get() {
            Some(g) => g.write(write)?,
            None => write()?,
        }
        let mut saved = self.saved.lock().unwrap();
        if r.status.is_final() {
            saved.remove(&r.id);
        } else {
            saved.insert(r.id.clone(), Instant::now());
        }
        Ok(())
    }

    pub fn create(
        &self,
        job: &Job,
        agent: &str,
        agent_session: &str,
        log: LogLocator,
        submitted_by: &str,
    ) -> io::Result<RunRecord> {
        let mut runs = self.runs.lock().unwrap();
        let next = runs
            .keys()
            .filter_map(|k| k.strip_prefix("r-")?.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let r = RunRecord {
            id: format!("r-{next:06}"),
            job: job.name.clone(),
            agent: agent.to_string(),
            agent_session: agent_session.to_string(),
            label: job.agent.clone(),
            status: RunStatus::Queued,
            steps: job
                .steps
                .iter()
                .map(|s| StepRecord {
                    name: s.name.clone(),
                    status: StepStatus::Pending,
                    outcome: None,
                })
                .collect(),
            outcome: None,
            events: 0,
            created_ms: now_ms(),
            finished_ms: None,
            note: None,
            artifacts: Vec::new(),
            log,
            submitted_by: submitted_by.to_string(),
        };
        self.persist(&r)?;
        runs.insert(r.id.clone(), r.clone());
        Ok(r)
    }

    pub fn update(
        &self,
        id: &str,
        f: impl FnOnce(&mut RunRecord),
    ) -> io::Result<Option<RunRecord>> {
        let mut runs = self.runs.lock().unwrap();
        let Some(r) = runs.get_mut(id) else {
            return Ok(None);
        };
        let mut next = r.clone();
        f(&mut next);
        if next != *r {
            self.persist_or_keep(&next)?;
            *r = next;
        }
        Ok(Some(r.clone()))
    }

    /// Record how many events a run has logged. In memory at once; on disk with the run's
    /// next state change, or when the record is `PROGRESS_SAVED_EVERY` old. (Rewriting
    /// the record — temp file, fsync, rename, fsync of the folder — for every output
    /// message cost the controller 15% of its time per line; the log itself holds the
    /// exact count.)
    pub fn progress(&self, id: &str, events: u64) -> io::Result<Option<RunRecord>> {
        let mut runs = self.runs.lock().unwrap();
        let Some(r) = runs.get_mut(id) else {
            return Ok(None);
        };
        r.events = events;
        let stale = self
            .saved
            .lock()
            .unwrap()
            .get(id)
            .is_none_or(|t| t.elapsed() >= PROGRESS_SAVED_EVERY);
        if stale {
            self.persist_or_keep(r)?;
        }
        Ok(Some(r.clone()))
    }

    /// The run's folder (its record, artifacts).
    pub fn run_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    pub fn get(&self, id: &str) -> Option<RunRecord> {
        self.runs.lock().unwrap().get(id).cloned()
    }

    /// Whether run `id` exists and was given to `agent`'s process `session` (without
    /// copying its record: asked for every message an agent sends).
    pub fn placed_on(&self, id: &str, agent: &str, session: &str) -> bool {
        self.runs
            .lock()
            .unwrap()
            .get(id)
            .is_some_and(|r| r.agent == agent && r.agent_session == session)
    }

    pub fn all(&self) -> Vec<RunRecord> {
        self.runs.lock().unwrap().values().cloned().collect()
    }

    /// Every run not finished: running, placed and not started yet, or waiting in the
    /// queue (`agent` empty).
    pub fn unfinished(&self) -> Vec<RunRecord> {
        self.runs
            .lock()
            .unwrap()
            .values()
            .filter(|r| !r.status.is_final())
            .cloned()
            .collect()
    }

    pub fn busy_agents(&self) -> BTreeSet<String> {
        self.runs
            .lock()
            .unwrap()
            .values()
            .filter(|r| !r.status.is_final())
            .map(|r| r.agent.clone())
            .collect()
    }
}

/// Write-temp + fsync + rename + fsync(dir).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state")
    ));
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    });
    if let Err(e) = written {
        // A full disk: the partial temp file would only take more of what is left.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_survive_a_restart_and_in_flight_ones_stay_in_flight() {
        let d = tempfile::tempdir().unwrap();
        let job = Job::parse(
            "name = \"j\"\nagent = \"a\"\n[[step]]\nname = \"s\"\nrun = \"true\"\n",
            "j.toml",
        )
        .unwrap();
        {
            let s = RunStore::open(d.path()).unwrap();
            let a = s
                .create(&job, "agent-1", "p1", LogLocator::default(), "test")
                .unwrap();
            let b = s
                .create(&job, "agent-1", "p1", LogLocator::default(), "test")
                .unwrap();
            assert_eq!((a.id.as_str(), b.id.as_str()), ("r-000001", "r-000002"));
            s.update(&a.id, |r| r.finish(RunOutcome::Succeeded))
                .unwrap();
            s.update(&b.id, |r| r.status = RunStatus::Running).unwrap();
        }
        let s = RunStore::open(d.path()).unwrap();
        assert_eq!(s.get("r-000001").unwrap().status, RunStatus::Succeeded);
        let running = s.get("r-000002").unwrap();
        assert_eq!(running.status, RunStatus::Running);
        assert_eq!(running.agent_session, "p1");
        assert_eq!(
            s.create(&job, "x", "p2", LogLocator::default(), "test")
                .unwrap()
                .id,
            "r-000003",
            "ids continue after a restart"
        );
        // no temp files left behind
        let leftovers: Vec<_> = walk(d.path())
            .into_iter()
            .filter(|p| p.to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn progress_is_saved_with_the_next_state_change_or_when_stale() {
        let d = tempfile::tempdir().unwrap();
        let job = Job::parse(
            "name = \"j\"\nagent = \"a\"\n[[step]]\nname = \"s\"\nrun = \"true\"\n",
            "j.toml",
        )
        .unwrap();
        let s = RunStore::open(d.path()).unwrap();
        let id = s
            .create(&job, "agent-1", "p1", LogLocator::default(), "test")
            .unwrap()
            .id;
        let on_disk = || RunStore::open(d.path()).unwrap().get(&id).unwrap().events;
        assert_eq!(s.progress(&id, 5).unwrap().unwrap().events, 5);
        assert_eq!(s.get(&id).unwrap().events, 5);
        assert_eq!(on_disk(), 0, "just saved: not written again yet");
        s.update(&id, |r| r.status = RunStatus::Running).unwrap();
        assert_eq!(on_disk(), 5, "written with the next state change");
        s.saved.lock().unwrap().insert(
            id.clone(),
            Instant::now() - PROGRESS_SAVED_EVERY - Duration::from_millis(1),
        );
        s.progress(&id, 9).unwrap();
        assert_eq!(on_disk(), 9, "written once the record is stale");
        s.progress(&id, 12).unwrap();
        s.update(&id, |r| r.finish(RunOutcome::Succeeded)).unwrap();
        assert_eq!(on_disk(), 12, "the final record has the final count");
        assert!(
            s.saved.lock().unwrap().is_empty(),
            "finished runs are forgotten"
        );
    }

    fn walk(p: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(p).unwrap().flatten() {
            let path = e.path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
        out
    }
}

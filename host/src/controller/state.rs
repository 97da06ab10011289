//! Run state in the controller's state directory (`<state>/runs/`), made to hold years
//! of runs: plain files only (it lives on GlusterFS in HA setups), every write through
//! the fencing-token gate, and nothing rewritten whole on every change.
//!
//! * `runs/index`: one JSON line per event of a run's life — `{"run":{summary}}` when it
//!   is created and when it finishes (or its finished record changes), `{"removed":id}`
//!   when retention removes it. Replayed at start into a compact in-memory index of
//!   every run (what the list and its filters need), rewritten whole (atomically) only
//!   when it holds twice as many lines as runs.
//! * `runs/<id>/run.json`: the run's full record as of its last compaction (at create,
//!   at finish, every `JOURNAL_COMPACT_AFTER` changes, after a failed write).
//! * `runs/<id>/journal`: the changes since, one JSON line each, appended and synced:
//!   the top-level fields that changed and the steps that changed, by index (absolute
//!   values, so replaying it again over a newer `run.json` changes nothing).
//!
//! Only unfinished runs are held whole in memory; a finished one is read from disk when
//! asked for. A torn append (a crash, a full disk) is a last line without its newline:
//! ignored when read, and cut off before the next append.
//!
//! A full disk is survived: a change that cannot be written still changes the run in
//! memory, so the run goes on and the API shows it as it is; the run is kept "unsaved"
//! and its whole record written again with backoff (`Controller::retry_state_writes`)
//! until the disk takes it. Only a new run is refused while the disk is full
//! ([`is_no_space`]: the API answers 507 naming the directory), since nothing may be
//! promised that is not on disk. A write refused by the HA fencing-token gate is not
//! retried: the controller was replaced.
//!
//! State directories of the earlier format (a `run.json` per run, no index) are read
//! whole once and get their index at the first write.

use crate::ha::token::StateGate;
use crate::jobs::Job;
use crate::protocol::{RunOutcome, StepOutcome, now_ms};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
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

/// How many changes a run's journal takes before it is compacted into `run.json`
/// (bounds what a start replays for a run in flight).
const JOURNAL_COMPACT_AFTER: usize = 256;
/// The index is rewritten whole once it has this many lines more than twice the runs.
const INDEX_SLACK: usize = 1000;
/// Most runs one page of [`RunStore::page`] holds.
pub const PAGE_MAX: usize = 500;
/// Runs retention removes per pass through the fencing gate (the lock is not held long).
const REMOVE_BATCH: usize = 256;

/// What lists and filters need of a run, without its steps: one line of the index, and
/// one item of `GET /api/runs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub id: String,
    pub job: String,
    pub agent: String,
    #[serde(default)]
    pub agent_session: String,
    #[serde(default)]
    pub label: String,
    pub status: RunStatus,
    pub events: u64,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
    #[serde(default)]
    pub submitted_by: String,
}

impl RunRecord {
    pub fn summary(&self) -> RunSummary {
        RunSummary {
            id: self.id.clone(),
            job: self.job.clone(),
            agent: self.agent.clone(),
            agent_session: self.agent_session.clone(),
            label: self.label.clone(),
            status: self.status,
            events: self.events,
            created_ms: self.created_ms,
            finished_ms: self.finished_ms,
            submitted_by: self.submitted_by.clone(),
        }
    }
}

/// One line of `runs/index`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum IndexLine {
    Run(RunSummary),
    Removed(String),
}

/// One line of a run's journal: what changed since the line before.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Change {
    /// Top-level fields of the record that changed (steps aside), with their new values.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    set: serde_json::Map<String, serde_json::Value>,
    /// Steps that changed: (index, new value).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    steps: Vec<(usize, StepRecord)>,
}

impl Change {
    /// From `old` to `new`, field by field (any field: one added to `RunRecord` later
    /// is journaled too), steps by index.
    fn between(old: &mut RunRecord, new: &mut RunRecord) -> Change {
        let mut change = Change::default();
        if old.steps.len() == new.steps.len() {
            for (i, (a, b)) in old.steps.iter().zip(&new.steps).enumerate() {
                if a != b {
                    change.steps.push((i, b.clone()));
                }
            }
        }
        // Compared without their steps (taken out and put back: not serialised twice).
        let (old_steps, new_steps) = (
            std::mem::take(&mut old.steps),
            std::mem::take(&mut new.steps),
        );
        let (a, b) = (to_object(old), to_object(new));
        old.steps = old_steps;
        new.steps = new_steps;
        for (k, v) in b {
            if k == "steps" {
                continue;
            }
            if a.get(&k) != Some(&v) {
                change.set.insert(k, v);
            }
        }
        if old.steps.len() != new.steps.len() {
            change.set.insert(
                "steps".into(),
                serde_json::to_value(&new.steps).expect("serialisable"),
            );
        }
        change
    }

    fn is_empty(&self) -> bool {
        self.set.is_empty() && self.steps.is_empty()
    }

    fn apply(self, record: &mut serde_json::Map<String, serde_json::Value>) -> Result<(), String> {
        for (i, step) in self.steps {
            let slot = record
                .get_mut("steps")
                .and_then(|s| s.as_array_mut())
                .and_then(|s| s.get_mut(i))
                .ok_or_else(|| format!("names step {i}, which the record does not have"))?;
            *slot = serde_json::to_value(step).expect("serialisable");
        }
        record.extend(self.set);
        Ok(())
    }
}

fn to_object(r: &RunRecord) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::to_value(r).expect("serialisable") {
        serde_json::Value::Object(m) => m,
        _ => unreachable!("a record is an object"),
    }
}

/// The number in a run id (`r-000042` is 42); None for anything else.
pub fn run_number(id: &str) -> Option<u64> {
    let digits = id.strip_prefix("r-")?;
    if digits.is_empty() || digits.len() > 18 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn run_id(n: u64) -> String {
    format!("r-{n:06}")
}

/// A run in the in-memory index: the summary, its strings shared with other runs'.
struct Entry {
    job: Arc<str>,
    agent: Arc<str>,
    agent_session: Arc<str>,
    label: Arc<str>,
    submitted_by: Arc<str>,
    status: RunStatus,
    events: u64,
    created_ms: i64,
    finished_ms: Option<i64>,
}

/// Job, agent, label and submitter names repeat across runs: each is kept once.
#[derive(Default)]
struct Names(HashSet<Arc<str>>);

impl Names {
    fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.0.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.0.insert(a.clone());
        a
    }
}

impl Entry {
    fn new(s: &RunSummary, names: &mut Names) -> Entry {
        Entry {
            job: names.get(&s.job),
            agent: names.get(&s.agent),
            agent_session: names.get(&s.agent_session),
            label: names.get(&s.label),
            submitted_by: names.get(&s.submitted_by),
            status: s.status,
            events: s.events,
            created_ms: s.created_ms,
            finished_ms: s.finished_ms,
        }
    }

    fn summary(&self, n: u64) -> RunSummary {
        RunSummary {
            id: run_id(n),
            job: self.job.to_string(),
            agent: self.agent.to_string(),
            agent_session: self.agent_session.to_string(),
            label: self.label.to_string(),
            status: self.status,
            events: self.events,
            created_ms: self.created_ms,
            finished_ms: self.finished_ms,
            submitted_by: self.submitted_by.to_string(),
        }
    }
}

/// A run held whole in memory: unfinished, or finished with its final record not on
/// disk yet (a failed write).
struct OpenRun {
    record: RunRecord,
    /// The record as `run.json` plus the journal have it (changes are journaled
    /// against this).
    on_disk: RunRecord,
    journal: AppendLog,
    /// When the record last reached the disk (see `RunStore::progress`).
    saved: Instant,
    /// Its newest state is only in memory: a write failed. Written whole next time.
    unsaved: bool,
}

/// An append-only file of JSON lines: how much of it is whole, and whether bytes past
/// that (a torn append) must be cut off before the next append.
#[derive(Debug, Default, Clone, Copy)]
struct AppendLog {
    good_len: u64,
    lines: usize,
    torn: bool,
}

impl AppendLog {
    /// Append `bytes` (whole lines) and sync them; a torn tail is cut off first, and
    /// cut off again if this append fails half way (it would merge with the next).
    fn append(&mut self, path: &Path, bytes: &[u8], lines: usize) -> io::Result<()> {
        let new_file = self.good_len == 0;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let written = (|| {
            if self.torn {
                f.set_len(self.good_len)?;
                self.torn = false;
            }
            f.write_all(bytes)?;
            f.sync_data()
        })();
        if let Err(e) = written {
            // Cut off what part of it was written; should that fail too, the next
            // append tries again first.
            let _ = f.set_len(self.good_len);
            self.torn = true;
            return Err(e);
        }
        if new_file {
            // the file's name must survive a power loss too
            sync_dir(path.parent().unwrap_or(Path::new(".")))?;
        }
        self.good_len += bytes.len() as u64;
        self.lines += lines;
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Read a file of JSON lines: each whole line parsed with `line` (a line that does not
/// parse is logged and skipped), a last line without its newline (a torn append)
/// ignored. None: no such file.
fn read_lines(
    path: &Path,
    mut line: impl FnMut(&[u8]) -> Result<(), String>,
) -> io::Result<Option<AppendLog>> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut r = io::BufReader::with_capacity(1 << 16, f);
    let mut log = AppendLog::default();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = r.read_until(b'\n', &mut buf)?;
        if n == 0 {
            break;
        }
        if buf.last() != Some(&b'\n') {
            tracing::warn!(file = %path.display(), bytes = n, "a torn last line (an append cut short by a crash or a full disk): ignored, and cut off before the next append");
            log.torn = true;
            break;
        }
        log.good_len += n as u64;
        log.lines += 1;
        if let Err(e) = line(&buf[..n - 1]) {
            tracing::error!(file = %path.display(), line = log.lines, "unreadable line, skipped: {e}");
        }
    }
    Ok(Some(log))
}

/// A run's full record as its folder has it: `run.json` with its journal replayed.
/// None: no record.
fn read_record(folder: &Path) -> io::Result<Option<(RunRecord, AppendLog)>> {
    let base = match std::fs::read(folder.join("run.json")) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let bad = |e: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", folder.join("run.json").display()),
        )
    };
    let mut record: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&base).map_err(|e| bad(e.to_string()))?;
    let journal = read_lines(&folder.join("journal"), |line| {
        let change: Change = serde_json::from_slice(line).map_err(|e| e.to_string())?;
        change.apply(&mut record)
    })?
    .unwrap_or_default();
    let record: RunRecord = serde_json::from_value(serde_json::Value::Object(record))
        .map_err(|e| bad(e.to_string()))?;
    Ok(Some((record, journal)))
}

/// A run's full record read straight from a state directory (`run.json` and its
/// journal), without opening the store: for tools and tests. None: no such run.
pub fn read_run(state_dir: &Path, id: &str) -> io::Result<Option<RunRecord>> {
    if run_number(id).is_none() {
        return Ok(None);
    }
    Ok(read_record(&state_dir.join("runs").join(id))?.map(|(r, _)| r))
}

/// `[controller] keep-runs` and `keep-days`: which finished runs retention removes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Keep at most this many finished runs (the newest).
    pub keep_runs: Option<u64>,
    /// Remove finished runs that finished more than this many days ago.
    pub keep_days: Option<u64>,
}

impl Retention {
    pub fn is_set(&self) -> bool {
        self.keep_runs.is_some() || self.keep_days.is_some()
    }
}

/// Which runs a page lists, and from where.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunQuery {
    /// Most runs on the page (1..=PAGE_MAX).
    pub limit: usize,
    /// Only runs older than the run of this number (a page's `next`).
    pub before: Option<u64>,
    pub status: Option<RunStatus>,
    pub job: Option<String>,
    pub agent: Option<String>,
    pub label: Option<String>,
}

/// One page of runs, newest first; `next` continues after its last run (None: no more).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunPage {
    pub runs: Vec<RunSummary>,
    pub next: Option<String>,
}

struct Inner {
    /// Every run, by number: what lists and filters need.
    index: BTreeMap<u64, Entry>,
    names: Names,
    /// Full records of runs not finished (and finished ones not yet written).
    open: HashMap<u64, OpenRun>,
    /// The number the next run gets.
    next: u64,
    /// Finished runs in `index` (for retention's count, without a scan).
    finished: usize,
    /// `runs/index`.
    log: AppendLog,
    /// Lines the index file still owes (a write failed), written before any new one.
    owed: Vec<IndexLine>,
    /// The index file is to be written whole from memory (a state directory of the
    /// earlier format, or too many lines).
    rewrite: bool,
}

impl Inner {
    fn set_entry(&mut self, n: u64, s: &RunSummary) {
        let entry = Entry::new(s, &mut self.names);
        let was_final = self.index.get(&n).map(|e| e.status.is_final());
        if was_final == Some(true) {
            self.finished -= 1;
        }
        if entry.status.is_final() {
            self.finished += 1;
        }
        self.index.insert(n, entry);
    }

    fn remove_entry(&mut self, n: u64) {
        if let Some(e) = self.index.remove(&n)
            && e.status.is_final()
        {
            self.finished -= 1;
        }
    }
}

pub struct RunStore {
    dir: PathBuf,
    inner: Mutex<Inner>,
    /// The fencing-token gate every write goes through, in HA setups.
    gate: OnceLock<Arc<StateGate>>,
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
    /// Open (or create) the store: the index of every run, and the full records of the
    /// runs in flight. Runs that were in flight when the controller stopped stay in
    /// flight: their agent may still be working on them (the controller decides when
    /// the agent comes back, or does not). Writes nothing (the fencing gate is not set
    /// yet): what needs writing is written at the first write or `flush_unsaved`.
    pub fn open(state_dir: &Path) -> io::Result<RunStore> {
        let dir = state_dir.join("runs");
        std::fs::create_dir_all(&dir)?;
        let mut inner = Inner {
            index: BTreeMap::new(),
            names: Names::default(),
            open: HashMap::new(),
            next: 1,
            finished: 0,
            log: AppendLog::default(),
            owed: Vec::new(),
            rewrite: false,
        };
        // Each line into the index as it is read: no second copy of 100,000 summaries.
        let mut highest = 0;
        let index = read_lines(&dir.join("index"), |line| {
            match serde_json::from_slice::<IndexLine>(line).map_err(|e| e.to_string())? {
                IndexLine::Run(s) => {
                    let n =
                        run_number(&s.id).ok_or_else(|| format!("`{}` is not a run id", s.id))?;
                    highest = highest.max(n);
                    inner.set_entry(n, &s);
                }
                IndexLine::Removed(id) => {
                    let n = run_number(&id).ok_or_else(|| format!("`{id}` is not a run id"))?;
                    highest = highest.max(n);
                    inner.remove_entry(n);
                }
            }
            Ok(())
        })?;
        // Runs in flight, held whole: (number, record, its journal).
        let mut in_flight: Vec<(u64, RunRecord, AppendLog)> = Vec::new();
        match index {
            Some(log) => {
                inner.log = log;
                let unfinished: Vec<u64> = inner
                    .index
                    .iter()
                    .filter(|(_, e)| !e.status.is_final())
                    .map(|(n, _)| *n)
                    .collect();
                for n in unfinished {
                    match read_record(&dir.join(run_id(n))) {
                        Ok(Some((r, journal))) => in_flight.push((n, r, journal)),
                        Ok(None) => {
                            // Indexed, but its record never reached the disk (a crash
                            // while it was created): it was never accepted.
                            tracing::warn!(run = %run_id(n), "indexed but without a record (a crash while it was created): dropped");
                            inner.remove_entry(n);
                            inner.owed.push(IndexLine::Removed(run_id(n)));
                        }
                        Err(e) => {
                            tracing::error!(run = %run_id(n), "unreadable run record, listed as indexed: {e}");
                        }
                    }
                }
            }
            None => {
                // The earlier format: a record per folder, no index. Read them all;
                // the index is written at the first write.
                for entry in std::fs::read_dir(&dir)? {
                    let entry = entry?;
                    let name = entry.file_name();
                    let Some(n) = name.to_str().and_then(run_number) else {
                        continue;
                    };
                    match read_record(&entry.path()) {
                        Ok(Some((r, journal))) if Some(r.id.as_str()) == name.to_str() => {
                            highest = highest.max(n);
                            inner.set_entry(n, &r.summary());
                            if !r.status.is_final() {
                                in_flight.push((n, r, journal));
                            }
                        }
                        Ok(Some((r, _))) => {
                            tracing::error!(folder = %entry.path().display(), "its record names run `{}`, skipped", r.id)
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::error!(folder = %entry.path().display(), "unreadable run record, skipped: {e}")
                        }
                    }
                }
                inner.rewrite = true;
                if !inner.index.is_empty() {
                    tracing::info!(runs = inner.index.len(), dir = %dir.display(), "run records of the earlier format (no index): indexed; the index is written at the first write");
                }
            }
        }
        inner.next = highest + 1;
        for (n, r, journal) in in_flight {
            let finished_meanwhile = r.status.is_final();
            inner.set_entry(n, &r.summary());
            inner.open.insert(
                n,
                OpenRun {
                    on_disk: r.clone(),
                    record: r,
                    journal,
                    saved: Instant::now(),
                    // Finished in its journal but not in the index (a crash while it
                    // finished): compacted and indexed at the next flush.
                    unsaved: finished_meanwhile,
                },
            );
        }
        Ok(RunStore {
            dir,
            inner: Mutex::new(inner),
            gate: OnceLock::new(),
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
        self.inner
            .lock()
            .unwrap()
            .open
            .values()
            .filter(|o| o.unsaved)
            .count()
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

    /// Through the fencing gate, if HA.
    fn gated<T>(&self, write: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        match self.gate.get() {
            Some(g) => g.write(write),
            None => write(),
        }
    }

    /// Write again every record that could not be written, and what the index owes.
    /// Ok once none is left; the first error otherwise (the rest stay unsaved).
    pub fn flush_unsaved(&self) -> io::Result<()> {
        let mut inner = self.inner.lock().unwrap();
        let unsaved: Vec<u64> = inner
            .open
            .iter()
            .filter(|(_, o)| o.unsaved)
            .map(|(n, _)| *n)
            .collect();
        for n in unsaved {
            if let Err(e) = self.compact(&mut inner, n) {
                return Err(self.flush_failed(&mut inner, e));
            }
        }
        if (inner.rewrite || !inner.owed.is_empty() || inner.log.torn)
            && let Err(e) = self.write_index(&mut inner, None)
        {
            return Err(self.flush_failed(&mut inner, e));
        }
        if self.failing.swap(false, Relaxed) {
            tracing::info!(dir = %self.state_dir().display(), "run records are written to the state directory again");
        }
        Ok(())
    }

    fn flush_failed(&self, inner: &mut Inner, e: io::Error) -> io::Error {
        if is_refused_by_gate(&e) {
            // Replaced: nothing here is ours to write any more.
            for o in inner.open.values_mut() {
                o.unsaved = false;
            }
            inner.owed.clear();
            inner.rewrite = false;
        } else {
            self.write_failures.fetch_add(1, Relaxed);
        }
        e
    }

    /// From now on every record write carries this gate's fencing token, and is
    /// refused once the state has seen a newer one (`ha::token::StateGate`).
    pub fn guard_with(&self, gate: StateGate) {
        let _ = self.gate.set(Arc::new(gate));
    }

    /// The fencing-token gate other writes to the state go through (artifacts), if HA.
    pub fn gate(&self) -> Option<Arc<StateGate>> {
        self.gate.get().cloned()
    }

    /// Writes refused for an older fencing token.
    pub fn refused_writes(&self) -> u64 {
        self.gate.get().map_or(0, |g| g.refused())
    }

    /// Append `line` to the index (after what it owes), or rewrite it whole when it
    /// must be or has grown to twice the runs. On failure the line is owed.
    fn write_index(&self, inner: &mut Inner, line: Option<IndexLine>) -> io::Result<()> {
        inner.owed.extend(line);
        let path = self.dir.join("index");
        if inner.rewrite || inner.log.lines + inner.owed.len() > 2 * inner.index.len() + INDEX_SLACK
        {
            let mut bytes = Vec::with_capacity(inner.index.len() * 200);
            for (n, e) in &inner.index {
                serde_json::to_writer(&mut bytes, &IndexLine::Run(e.summary(*n)))
                    .expect("serialisable");
                bytes.push(b'\n');
            }
            self.gated(|| write_atomic(&path, &bytes))?;
            inner.log = AppendLog {
                good_len: bytes.len() as u64,
                lines: inner.index.len(),
                torn: false,
            };
            inner.owed.clear();
            inner.rewrite = false;
            return Ok(());
        }
        if inner.owed.is_empty() && !inner.log.torn {
            return Ok(());
        }
        let mut bytes = Vec::new();
        for l in &inner.owed {
            serde_json::to_writer(&mut bytes, l).expect("serialisable");
            bytes.push(b'\n');
        }
        let lines = inner.owed.len();
        let mut log = inner.log;
        let written = self.gated(|| log.append(&path, &bytes, lines));
        inner.log = log;
        written?;
        inner.owed.clear();
        Ok(())
    }

    /// Write run `n`'s whole record to `run.json` and drop its journal; a finished one
    /// then leaves memory, indexed as finished.
    fn compact(&self, inner: &mut Inner, n: u64) -> io::Result<()> {
        let Some(o) = inner.open.get_mut(&n) else {
            return Ok(());
        };
        let folder = self.dir.join(&o.record.id);
        let bytes = serde_json::to_vec_pretty(&o.record).expect("serialisable");
        self.gated(|| {
            std::fs::create_dir_all(&folder)?;
            write_atomic(&folder.join("run.json"), &bytes)?;
            match std::fs::remove_file(folder.join("journal")) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        })?;
        o.on_disk = o.record.clone();
        o.journal = AppendLog::default();
        o.saved = Instant::now();
        o.unsaved = false;
        if o.record.status.is_final() {
            let summary = o.record.summary();
            inner.open.remove(&n);
            inner.set_entry(n, &summary);
            if let Err(e) = self.write_index(inner, Some(IndexLine::Run(summary))) {
                if is_refused_by_gate(&e) {
                    return Err(e);
                }
                // Owed: written at the next write or flush.
                self.note_failure(&e);
            }
        }
        Ok(())
    }

    /// Record run `n`'s new state: its change appended to the journal (the record
    /// compacted instead when it finished, when the journal is long, or when an
    /// earlier write failed). A failure other than the gate's keeps the change in
    /// memory, the run unsaved; the gate's refusal changes nothing.
    fn save(&self, inner: &mut Inner, n: u64, mut next: RunRecord) -> io::Result<()> {
        let Some(o) = inner.open.get_mut(&n) else {
            return Ok(());
        };
        let compact =
            o.unsaved || next.status.is_final() || o.journal.lines >= JOURNAL_COMPACT_AFTER;
        if compact {
            let before = std::mem::replace(&mut o.record, next);
            let was_unsaved = o.unsaved;
            match self.compact(inner, n) {
                Ok(()) => {}
                Err(e) if is_refused_by_gate(&e) => {
                    if let Some(o) = inner.open.get_mut(&n) {
                        o.record = before;
                        o.unsaved = was_unsaved;
                    }
                    return Err(e);
                }
                Err(e) => {
                    self.note_failure(&e);
                    if let Some(o) = inner.open.get_mut(&n) {
                        o.unsaved = true;
                        let s = o.record.summary();
                        inner.set_entry(n, &s);
                    }
                }
            }
            return Ok(());
        }
        let change = Change::between(&mut o.on_disk, &mut next);
        if change.is_empty() {
            o.record = next;
            return Ok(());
        }
        let mut line = serde_json::to_vec(&change).expect("serialisable");
        line.push(b'\n');
        let path = self.dir.join(&next.id).join("journal");
        let mut journal = o.journal;
        let written = self.gated(|| journal.append(&path, &line, 1));
        o.journal = journal;
        match written {
            Ok(()) => {
                o.on_disk = next.clone();
                o.saved = Instant::now();
            }
            Err(e) if is_refused_by_gate(&e) => return Err(e),
            Err(e) => {
                self.note_failure(&e);
                o.unsaved = true;
            }
        }
        o.record = next;
        let s = o.record.summary();
        inner.set_entry(n, &s);
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
        let mut inner = self.inner.lock().unwrap();
        let n = inner.next;
        let r = RunRecord {
            id: run_id(n),
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
        // The record, then its line in the index: a run is accepted once both are on
        // disk, and a crash between leaves a folder no index line names.
        let folder = self.dir.join(&r.id);
        let bytes = serde_json::to_vec_pretty(&r).expect("serialisable");
        self.gated(|| {
            std::fs::create_dir_all(&folder)?;
            // a folder left by a run whose index line never made it: not this run's
            let _ = std::fs::remove_file(folder.join("journal"));
            write_atomic(&folder.join("run.json"), &bytes)
        })?;
        inner.next = n + 1;
        inner.set_entry(n, &r.summary());
        if let Err(e) = self.write_index(&mut inner, Some(IndexLine::Run(r.summary()))) {
            inner.remove_entry(n);
            inner
                .owed
                .retain(|l| !matches!(l, IndexLine::Run(s) if s.id == r.id));
            let _ = self.gated(|| std::fs::remove_dir_all(&folder));
            return Err(e);
        }
        inner.open.insert(
            n,
            OpenRun {
                on_disk: r.clone(),
                record: r.clone(),
                journal: AppendLog::default(),
                saved: Instant::now(),
                unsaved: false,
            },
        );
        Ok(r)
    }

    pub fn update(
        &self,
        id: &str,
        f: impl FnOnce(&mut RunRecord),
    ) -> io::Result<Option<RunRecord>> {
        let Some(n) = run_number(id) else {
            return Ok(None);
        };
        let mut inner = self.inner.lock().unwrap();
        if let Some(o) = inner.open.get(&n) {
            let mut next = o.record.clone();
            f(&mut next);
            if next != o.record {
                self.save(&mut inner, n, next.clone())?;
                return Ok(inner.open.get(&n).map(|o| o.record.clone()).or(Some(next)));
            }
            return Ok(Some(next));
        }
        if !inner.index.contains_key(&n) {
            return Ok(None);
        }
        // A finished run (a note added after its end, say): read, changed, written
        // whole, under the lock so retention cannot remove it meanwhile.
        let Some((mut record, _)) = read_record(&self.dir.join(id))? else {
            return Ok(None);
        };
        let before = record.clone();
        f(&mut record);
        if record == before {
            return Ok(Some(record));
        }
        inner.open.insert(
            n,
            OpenRun {
                on_disk: before.clone(),
                record: before,
                journal: AppendLog::default(),
                saved: Instant::now(),
                unsaved: true,
            },
        );
        if let Err(e) = self.save(&mut inner, n, record.clone()) {
            // Refused by the gate: nothing of it is ours to write.
            inner.open.remove(&n);
            return Err(e);
        }
        Ok(Some(record))
    }

    /// Record how many events a run has logged. In memory at once; on disk with the run's
    /// next state change, or when the record is `PROGRESS_SAVED_EVERY` old. (Writing
    /// for every output message cost the controller 15% of its time per line; the log
    /// itself holds the exact count.)
    pub fn progress(&self, id: &str, events: u64) -> io::Result<Option<RunRecord>> {
        let Some(n) = run_number(id) else {
            return Ok(None);
        };
        let mut inner = self.inner.lock().unwrap();
        let Some(o) = inner.open.get_mut(&n) else {
            drop(inner);
            return self.update(id, |r| r.events = events);
        };
        if o.saved.elapsed() >= PROGRESS_SAVED_EVERY {
            let mut next = o.record.clone();
            next.events = events;
            self.save(&mut inner, n, next.clone())?;
            return Ok(inner.open.get(&n).map(|o| o.record.clone()).or(Some(next)));
        } else {
            o.record.events = events;
            if let Some(e) = inner.index.get_mut(&n) {
                e.events = events;
            }
        }
        Ok(inner.open.get(&n).map(|o| o.record.clone()))
    }

    /// The run's folder (its record, artifacts).
    pub fn run_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// A run's full record: from memory if in flight, else read from disk.
    pub fn get(&self, id: &str) -> Option<RunRecord> {
        let n = run_number(id)?;
        {
            let inner = self.inner.lock().unwrap();
            if let Some(o) = inner.open.get(&n) {
                return Some(o.record.clone());
            }
            if !inner.index.contains_key(&n) {
                return None;
            }
        }
        match read_record(&self.dir.join(id)) {
            Ok(r) => r.map(|(r, _)| r),
            Err(e) => {
                tracing::error!(run = id, "cannot read the run's record: {e}");
                None
            }
        }
    }

    /// A run's status, from the index (no record read).
    pub fn status(&self, id: &str) -> Option<RunStatus> {
        let n = run_number(id)?;
        self.inner.lock().unwrap().index.get(&n).map(|e| e.status)
    }

    /// Whether run `id` exists and was given to `agent`'s process `session` (from the
    /// index: asked for every message an agent sends).
    pub fn placed_on(&self, id: &str, agent: &str, session: &str) -> bool {
        let Some(n) = run_number(id) else {
            return false;
        };
        self.inner
            .lock()
            .unwrap()
            .index
            .get(&n)
            .is_some_and(|e| &*e.agent == agent && &*e.agent_session == session)
    }

    /// Every run not finished (queued or running), oldest first.
    pub fn unfinished(&self) -> Vec<RunRecord> {
        let inner = self.inner.lock().unwrap();
        let mut v: Vec<(u64, RunRecord)> = inner
            .open
            .iter()
            .filter(|(_, o)| !o.record.status.is_final())
            .map(|(n, o)| (*n, o.record.clone()))
            .collect();
        v.sort_by_key(|(n, _)| *n);
        v.into_iter().map(|(_, r)| r).collect()
    }

    /// Every run's full record, oldest first. Reads every finished record from disk:
    /// for tools and tests, never on a request path (`page` lists runs).
    pub fn all(&self) -> Vec<RunRecord> {
        let ids: Vec<String> = self
            .inner
            .lock()
            .unwrap()
            .index
            .keys()
            .map(|n| run_id(*n))
            .collect();
        ids.iter().filter_map(|id| self.get(id)).collect()
    }

    /// How many runs the index holds.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Finished runs (what `keep-runs` counts).
    pub fn finished_count(&self) -> usize {
        self.inner.lock().unwrap().finished
    }

    pub fn busy_agents(&self) -> BTreeSet<String> {
        self.inner
            .lock()
            .unwrap()
            .open
            .values()
            .filter(|o| !o.record.status.is_final())
            .map(|o| o.record.agent.clone())
            .collect()
    }

    /// One page of run summaries, newest first, from the index alone.
    pub fn page(&self, q: &RunQuery) -> RunPage {
        let limit = q.limit.clamp(1, PAGE_MAX);
        let inner = self.inner.lock().unwrap();
        let upper = q.before.unwrap_or(u64::MAX);
        let wanted = |e: &Entry| {
            q.status.is_none_or(|s| e.status == s)
                && q.job.as_deref().is_none_or(|j| &*e.job == j)
                && q.agent.as_deref().is_none_or(|a| &*e.agent == a)
                && q.label.as_deref().is_none_or(|l| &*e.label == l)
        };
        let mut runs = Vec::with_capacity(limit.min(64));
        let mut more = false;
        for (n, e) in inner.index.range(..upper).rev() {
            if !wanted(e) {
                continue;
            }
            if runs.len() == limit {
                more = true;
                break;
            }
            runs.push(e.summary(*n));
        }
        let next = if more {
            runs.last().map(|r| r.id.clone())
        } else {
            None
        };
        RunPage { runs, next }
    }

    /// Remove the finished runs `keep` no longer keeps — their records and artifacts
    /// (their whole folders) — never a run in flight. Through the fencing gate, a batch
    /// at a time. Returns how many were removed.
    pub fn sweep(&self, keep: &Retention, now_ms: i64) -> io::Result<usize> {
        let mut removed = 0;
        loop {
            let batch: Vec<u64> = {
                let inner = self.inner.lock().unwrap();
                let too_many = keep
                    .keep_runs
                    .map_or(0, |k| inner.finished.saturating_sub(k as usize));
                let cutoff = keep
                    .keep_days
                    .map(|d| now_ms.saturating_sub((d as i64).saturating_mul(86_400_000)));
                let mut over = too_many;
                let mut batch = Vec::new();
                // Oldest first: the first `too_many` finished are over the count.
                for (n, e) in &inner.index {
                    if batch.len() == REMOVE_BATCH {
                        break;
                    }
                    if !e.status.is_final() || inner.open.contains_key(n) {
                        continue;
                    }
                    let old = cutoff.is_some_and(|c| e.finished_ms.unwrap_or(e.created_ms) < c);
                    if over > 0 || old {
                        over = over.saturating_sub(1);
                        batch.push(*n);
                    }
                }
                batch
            };
            if batch.is_empty() {
                break;
            }
            self.remove(&batch)?;
            removed += batch.len();
        }
        Ok(removed)
    }

    /// Remove finished runs: their folders, then their index lines, all under the
    /// store's lock (an update of a finished run cannot write one back meanwhile).
    fn remove(&self, runs: &[u64]) -> io::Result<()> {
        let mut inner = self.inner.lock().unwrap();
        let folders: Vec<PathBuf> = runs.iter().map(|n| self.dir.join(run_id(*n))).collect();
        self.gated(|| {
            for f in &folders {
                match std::fs::remove_dir_all(f) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            Ok(())
        })?;
        for n in runs {
            inner.remove_entry(*n);
            inner.owed.push(IndexLine::Removed(run_id(*n)));
        }
        match self.write_index(&mut inner, None) {
            Err(e) if !is_refused_by_gate(&e) => {
                // Owed: a restart before it is written shows them again, without
                // records, until the next sweep.
                self.note_failure(&e);
                Ok(())
            }
            r => r,
        }
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

    fn job(label: &str, steps: usize) -> Job {
        let mut text = format!("name = \"j-{label}\"\nagent = \"{label}\"\n");
        for i in 0..steps {
            text.push_str(&format!("[[step]]\nname = \"s{i}\"\nrun = \"true\"\n"));
        }
        Job::parse(&text, "j.toml").unwrap()
    }

    fn new_run(s: &RunStore, label: &str) -> String {
        s.create(
            &job(label, 3),
            "agent-1",
            "p1",
            LogLocator::default(),
            "test",
        )
        .unwrap()
        .id
    }

    fn finish(s: &RunStore, id: &str) {
        s.update(id, |r| r.finish(RunOutcome::Succeeded)).unwrap();
    }

    fn ids(p: &RunPage) -> Vec<&str> {
        p.runs.iter().map(|r| r.id.as_str()).collect()
    }

    fn query(limit: usize) -> RunQuery {
        RunQuery {
            limit,
            ..RunQuery::default()
        }
    }

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
            assert_eq!(a.label, "a", "the job's agent label");
            s.update(&a.id, |r| r.finish(RunOutcome::Succeeded))
                .unwrap();
            s.update(&b.id, |r| r.status = RunStatus::Running).unwrap();
        }
        let s = RunStore::open(d.path()).unwrap();
        assert_eq!(s.get("r-000001").unwrap().status, RunStatus::Succeeded);
        let running = s.get("r-000002").unwrap();
        assert_eq!(running.status, RunStatus::Running);
        assert_eq!(running.agent_session, "p1");
        assert_eq!(running.label, "a");
        assert_eq!(
            s.unfinished()
                .iter()
                .map(|r| r.id.as_str())
                .collect::<Vec<_>>(),
            ["r-000002"]
        );
        assert!(s.placed_on("r-000001", "agent-1", "p1"), "from the index");
        assert!(!s.placed_on("r-000001", "agent-1", "p2"));
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
        let on_disk = || read_run(d.path(), &id).unwrap().unwrap().events;
        assert_eq!(s.progress(&id, 5).unwrap().unwrap().events, 5);
        assert_eq!(s.get(&id).unwrap().events, 5);
        assert_eq!(on_disk(), 0, "just saved: not written again yet");
        s.update(&id, |r| r.status = RunStatus::Running).unwrap();
        assert_eq!(on_disk(), 5, "written with the next state change");
        let n = run_number(&id).unwrap();
        s.inner.lock().unwrap().open.get_mut(&n).unwrap().saved =
            Instant::now() - PROGRESS_SAVED_EVERY - Duration::from_millis(1);
        s.progress(&id, 9).unwrap();
        assert_eq!(on_disk(), 9, "written once the record is stale");
        s.progress(&id, 12).unwrap();
        s.update(&id, |r| r.finish(RunOutcome::Succeeded)).unwrap();
        assert_eq!(on_disk(), 12, "the final record has the final count");
        assert!(
            s.inner.lock().unwrap().open.is_empty(),
            "finished runs are not held in memory"
        );
    }

    /// A step change appends to the run's journal; run.json is written at create and
    /// at finish only, and the journal is gone once the run finished.
    #[test]
    fn step_changes_append_and_the_record_is_written_whole_only_at_the_ends() {
        let d = tempfile::tempdir().unwrap();
        let s = RunStore::open(d.path()).unwrap();
        let id = new_run(&s, "linux");
        let folder = d.path().join("runs").join(&id);
        let created = std::fs::read(folder.join("run.json")).unwrap();
        for i in 0..3 {
            s.update(&id, |r| {
                r.status = RunStatus::Running;
                r.steps[i].status = StepStatus::Succeeded;
            })
            .unwrap();
        }
        assert_eq!(std::fs::read(folder.join("run.json")).unwrap(), created);
        let journal = std::fs::read_to_string(folder.join("journal")).unwrap();
        assert_eq!(journal.lines().count(), 3, "{journal}");
        assert!(
            journal.lines().all(|l| l.len() < 120),
            "each line holds what changed, not the record: {journal}"
        );
        let r = read_run(d.path(), &id).unwrap().unwrap();
        assert!(r.steps.iter().all(|s| s.status == StepStatus::Succeeded));
        finish(&s, &id);
        assert!(!folder.join("journal").exists());
        let whole: RunRecord =
            serde_json::from_slice(&std::fs::read(folder.join("run.json")).unwrap()).unwrap();
        assert_eq!(whole.status, RunStatus::Succeeded);
        assert_eq!(whole, s.get(&id).unwrap());
    }

    /// A crash in the middle of an append leaves a last line without its newline: it is
    /// ignored when read, and cut off before the next append (which would otherwise
    /// merge with it into one unreadable line).
    #[test]
    fn a_torn_append_at_the_end_is_ignored_and_cut_off() {
        let d = tempfile::tempdir().unwrap();
        let (a, b);
        {
            let s = RunStore::open(d.path()).unwrap();
            a = new_run(&s, "linux");
            b = new_run(&s, "linux");
            finish(&s, &b);
            s.update(&a, |r| r.status = RunStatus::Running).unwrap();
        }
        let runs = d.path().join("runs");
        let torn = |f: &Path, bytes: &str| {
            let mut file = std::fs::OpenOptions::new().append(true).open(f).unwrap();
            file.write_all(bytes.as_bytes()).unwrap();
        };
        torn(
            &runs.join(&a).join("journal"),
            "{\"set\":{\"status\":\"succ",
        );
        torn(&runs.join("index"), "{\"run\":{\"id\":\"r-0000");
        {
            let s = RunStore::open(d.path()).unwrap();
            assert_eq!(s.get(&a).unwrap().status, RunStatus::Running);
            assert_eq!(s.get(&b).unwrap().status, RunStatus::Succeeded);
            assert_eq!(s.len(), 2);
            // the next appends go after the last whole line
            s.update(&a, |r| r.steps[0].status = StepStatus::Running)
                .unwrap();
            let c = new_run(&s, "linux");
            assert_eq!(c, "r-000003");
        }
        let s = RunStore::open(d.path()).unwrap();
        assert_eq!(s.len(), 3, "every index line readable again");
        assert_eq!(
            s.get(&a).unwrap().steps[0].status,
            StepStatus::Running,
            "the journal's next line was not lost to the torn one"
        );
        for f in [runs.join("index"), runs.join(&a).join("journal")] {
            let text = std::fs::read_to_string(&f).unwrap();
            assert!(text.ends_with('\n'), "{}: {text}", f.display());
            for l in text.lines() {
                serde_json::from_str::<serde_json::Value>(l)
                    .unwrap_or_else(|e| panic!("{}: {l}: {e}", f.display()));
            }
        }
    }

    /// A state directory of the earlier format (a pretty `run.json` per run, no
    /// index, no labels) loads, and gets its index at the first write.
    #[test]
    fn the_earlier_format_is_migrated() {
        let d = tempfile::tempdir().unwrap();
        let runs = d.path().join("runs");
        for (n, status) in [(1, "succeeded"), (2, "failed"), (3, "running")] {
            let folder = runs.join(format!("r-{n:06}"));
            std::fs::create_dir_all(&folder).unwrap();
            // as the controller before this change wrote it (no `label`)
            let old = format!(
                r#"{{
  "id": "r-{n:06}",
  "job": "old",
  "agent": "agent-1",
  "agent_session": "p1",
  "status": "{status}",
  "steps": [{{ "name": "s", "status": "succeeded", "outcome": null }}],
  "outcome": null,
  "events": 7,
  "created_ms": {n},
  "finished_ms": null,
  "note": null,
  "artifacts": [],
  "log": {{ "method": "file-logging", "browser": "file-store" }},
  "submitted_by": "ops"
}}"#
            );
            std::fs::write(folder.join("run.json"), old).unwrap();
        }
        {
            let s = RunStore::open(d.path()).unwrap();
            assert!(!runs.join("index").exists(), "opening writes nothing");
            let page = s.page(&query(10));
            assert_eq!(ids(&page), ["r-000003", "r-000002", "r-000001"]);
            assert_eq!(page.runs[1].status, RunStatus::Failed);
            assert_eq!(page.runs[0].submitted_by, "ops");
            assert_eq!(s.unfinished().len(), 1);
            assert_eq!(s.get("r-000001").unwrap().events, 7);
            s.flush_unsaved().unwrap();
            assert!(runs.join("index").exists(), "written at the first flush");
            assert_eq!(new_run(&s, "linux"), "r-000004");
            s.update("r-000003", |r| r.status = RunStatus::Cancelled)
                .unwrap();
        }
        let s = RunStore::open(d.path()).unwrap();
        let page = s.page(&query(10));
        assert_eq!(ids(&page), ["r-000004", "r-000003", "r-000002", "r-000001"]);
        assert_eq!(page.runs[1].status, RunStatus::Cancelled);
        assert_eq!(page.runs[0].label, "linux");
    }

    /// Pages, newest first; a page's cursor goes on where it ended however many runs
    /// were created since; filters.
    #[test]
    fn pages_go_on_from_their_cursor_while_runs_arrive() {
        let d = tempfile::tempdir().unwrap();
        let s = RunStore::open(d.path()).unwrap();
        for i in 0..10 {
            let id = new_run(&s, if i % 2 == 0 { "linux" } else { "gpu" });
            if i < 7 {
                finish(&s, &id);
            }
        }
        let first = s.page(&query(4));
        assert_eq!(
            ids(&first),
            ["r-000010", "r-000009", "r-000008", "r-000007"]
        );
        assert_eq!(first.next.as_deref(), Some("r-000007"));
        for _ in 0..5 {
            new_run(&s, "linux");
        }
        let second = s.page(&RunQuery {
            before: run_number(first.next.as_deref().unwrap()),
            ..query(4)
        });
        assert_eq!(
            ids(&second),
            ["r-000006", "r-000005", "r-000004", "r-000003"]
        );
        let last = s.page(&RunQuery {
            before: run_number(second.next.as_deref().unwrap()),
            ..query(4)
        });
        assert_eq!(ids(&last), ["r-000002", "r-000001"]);
        assert_eq!(last.next, None, "no more");
        // filters
        let gpu = s.page(&RunQuery {
            label: Some("gpu".into()),
            ..query(100)
        });
        assert_eq!(
            ids(&gpu),
            ["r-000010", "r-000008", "r-000006", "r-000004", "r-000002"]
        );
        let queued_gpu = s.page(&RunQuery {
            label: Some("gpu".into()),
            status: Some(RunStatus::Queued),
            ..query(100)
        });
        assert_eq!(ids(&queued_gpu), ["r-000010", "r-000008"]);
        let by_job = s.page(&RunQuery {
            job: Some("j-linux".into()),
            status: Some(RunStatus::Succeeded),
            limit: 2,
            ..RunQuery::default()
        });
        assert_eq!(ids(&by_job), ["r-000007", "r-000005"]);
        assert_eq!(by_job.next.as_deref(), Some("r-000005"));
        assert!(
            s.page(&RunQuery {
                agent: Some("agent-2".into()),
                ..query(10)
            })
            .runs
            .is_empty()
        );
        assert!(
            s.page(&query(1000)).runs.len() == 15,
            "a limit over the most is the most"
        );
    }

    #[test]
    fn retention_removes_old_finished_runs_and_their_artifacts_never_one_in_flight() {
        let d = tempfile::tempdir().unwrap();
        let s = RunStore::open(d.path()).unwrap();
        let day = 86_400_000;
        let mut all = Vec::new();
        for i in 0..8 {
            let id = new_run(&s, "linux");
            let artifacts = s.run_dir(&id).join("artifacts");
            std::fs::create_dir_all(&artifacts).unwrap();
            std::fs::write(artifacts.join("out.txt"), "x").unwrap();
            if i != 1 {
                // finished 7.5, 6.5, ... 0.5 days ago
                s.update(&id, |r| {
                    r.finish(RunOutcome::Succeeded);
                    r.finished_ms = Some(now_ms() - (8 - i) * day + day / 2);
                })
                .unwrap();
            }
            all.push(id);
        }
        // r-000002 is in flight: never removed, however old
        let keep = Retention {
            keep_runs: None,
            keep_days: Some(3),
        };
        assert_eq!(
            s.sweep(&keep, now_ms()).unwrap(),
            4,
            "finished 7.5 to 3.5 days ago"
        );
        let left = ids(&s.page(&query(100)))
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        assert_eq!(left, ["r-000008", "r-000007", "r-000006", "r-000002"]);
        assert!(
            !s.run_dir("r-000001").exists(),
            "its folder, artifacts and all"
        );
        assert!(s.get("r-000001").is_none());
        let keep = Retention {
            keep_runs: Some(2),
            keep_days: None,
        };
        assert_eq!(s.sweep(&keep, now_ms()).unwrap(), 1, "the oldest finished");
        assert_eq!(s.sweep(&keep, now_ms()).unwrap(), 0, "nothing more");
        assert_eq!(
            ids(&s.page(&query(100))),
            ["r-000008", "r-000007", "r-000002"]
        );
        assert!(s.run_dir("r-000008").join("artifacts/out.txt").exists());
        drop(s);
        let s = RunStore::open(d.path()).unwrap();
        assert_eq!(
            ids(&s.page(&query(100))),
            ["r-000008", "r-000007", "r-000002"],
            "the removals are in the index"
        );
        assert_eq!(new_run(&s, "linux"), "r-000009", "ids are never reused");
    }

    /// Every write of the store goes through the fencing gate: once a newer token was
    /// seen, a journal append, a compaction, a create and a sweep are all refused, and
    /// the state on disk stays as the newer controller left it.
    #[test]
    fn a_replaced_store_cannot_write() {
        let d = tempfile::tempdir().unwrap();
        let old = RunStore::open(d.path()).unwrap();
        old.guard_with(StateGate::open(d.path(), 5).unwrap());
        let a = new_run(&old, "linux");
        let b = new_run(&old, "linux");
        finish(&old, &b);
        // a newer controller takes over
        let newer = StateGate::open(d.path(), 7).unwrap();
        newer.write(|| Ok(())).unwrap();
        let index_before = std::fs::read(d.path().join("runs/index")).unwrap();
        let e = old
            .update(&a, |r| r.status = RunStatus::Running)
            .unwrap_err();
        assert!(is_refused_by_gate(&e), "{e}");
        assert_eq!(
            old.get(&a).unwrap().status,
            RunStatus::Queued,
            "nor in memory"
        );
        assert!(is_refused_by_gate(
            &old.update(&a, |r| r.finish(RunOutcome::Succeeded))
                .unwrap_err()
        ));
        assert!(is_refused_by_gate(
            &old.create(
                &job("linux", 1),
                "agent-1",
                "p1",
                LogLocator::default(),
                "t"
            )
            .unwrap_err()
        ));
        let e = old
            .sweep(
                &Retention {
                    keep_runs: Some(0),
                    keep_days: None,
                },
                now_ms(),
            )
            .unwrap_err();
        assert!(is_refused_by_gate(&e), "{e}");
        assert!(old.run_dir(&b).exists());
        assert_eq!(
            read_run(d.path(), &a).unwrap().unwrap().status,
            RunStatus::Queued
        );
        assert!(!old.run_dir(&a).join("journal").exists());
        assert_eq!(
            std::fs::read(d.path().join("runs/index")).unwrap(),
            index_before
        );
        assert!(old.refused_writes() >= 4);
    }

    /// A write that fails (a full disk) keeps the change in memory; the whole record
    /// is written at the next flush, and the journal is not appended to meanwhile.
    #[test]
    fn a_failed_write_is_written_whole_at_the_next_flush() {
        let d = tempfile::tempdir().unwrap();
        let s = RunStore::open(d.path()).unwrap();
        let id = new_run(&s, "linux");
        let journal = s.run_dir(&id).join("journal");
        // the journal's place taken by a folder: appends fail
        std::fs::create_dir_all(&journal).unwrap();
        s.update(&id, |r| r.status = RunStatus::Running).unwrap();
        assert_eq!(s.get(&id).unwrap().status, RunStatus::Running);
        assert_eq!(s.unsaved_runs(), 1);
        assert!(s.write_failures() >= 1);
        s.update(&id, |r| r.steps[0].status = StepStatus::Running)
            .unwrap();
        std::fs::remove_dir(&journal).unwrap();
        s.flush_unsaved().unwrap();
        assert_eq!(s.unsaved_runs(), 0);
        let r = read_run(d.path(), &id).unwrap().unwrap();
        assert_eq!(r.status, RunStatus::Running);
        assert_eq!(r.steps[0].status, StepStatus::Running);
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

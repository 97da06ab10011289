//! Running one step: `sh -c <run>` in its own process group, output read line by line
//! and masked, a timeout and a cancel that take the whole process tree down, and
//! stragglers (background processes the step left) killed when it ends — also those
//! that left the group or the session (see `tracking`).

use crate::agent::mask::{LineAssembler, Masker, Piece};
use crate::agent::tracking::{StepTracker, Tracking};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch};

/// How long a step gets between SIGTERM and SIGKILL when it is stopped.
pub const KILL_GRACE: Duration = Duration::from_secs(5);
/// Longest line emitted in one piece; longer lines come in parts.
pub const MAX_LINE: usize = 64 << 10;
/// Variables passed through from the agent's own environment; nothing else is.
pub const PASSED_ENV: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR", "SHELL",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A piece of output, masked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub stream: Stream,
    pub text: String,
    /// Part of an overlong line; the next piece of the same stream continues it.
    pub partial: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepEnd {
    Exited(i32),
    /// Killed by a signal it did not get from us.
    Signalled(i32),
    TimedOut,
    Cancelled,
    CouldNotStart(String),
}

impl StepEnd {
    pub fn succeeded(&self) -> bool {
        *self == StepEnd::Exited(0)
    }
}

/// What the agent tells the controller of a step's end (the message vocabulary knows
/// no role's internals: the conversion lives with the agent).
impl From<StepEnd> for crate::protocol::StepOutcome {
    fn from(e: StepEnd) -> Self {
        use crate::protocol::StepOutcome;
        match e {
            StepEnd::Exited(code) => StepOutcome::Exited { code },
            StepEnd::Signalled(signal) => StepOutcome::Signalled { signal },
            StepEnd::TimedOut => StepOutcome::TimedOut,
            StepEnd::Cancelled => StepOutcome::Cancelled,
            StepEnd::CouldNotStart(reason) => StepOutcome::CouldNotStart { reason },
        }
    }
}

pub struct StepCommand<'a> {
    pub run: &'a str,
    pub dir: &'a Path,
    /// Job env and secrets (already resolved), on top of `PASSED_ENV`.
    pub env: &'a [(String, String)],
    pub timeout: Duration,
    pub kill_grace: Duration,
    /// How the step's processes are tracked so that none outlives it.
    pub tracking: Tracking,
}

/// Run the step to its end. Output goes to `out` as it comes (a full channel slows the
/// step down: back-pressure, never dropped lines). Setting `cancel` to true stops it.
pub async fn run_step(
    cmd: StepCommand<'_>,
    masker: &Masker,
    out: mpsc::Sender<Output>,
    mut cancel: watch::Receiver<bool>,
) -> StepEnd {
    let mut tracker = match StepTracker::new(cmd.tracking) {
        Ok(t) => t,
        Err(e) => return StepEnd::CouldNotStart(e),
    };
    let mut c = tokio::process::Command::new("/bin/sh");
    c.arg("-c").arg(cmd.run).current_dir(cmd.dir).env_clear();
    for k in PASSED_ENV {
        if let Some(v) = std::env::var_os(k) {
            c.env(k, v);
        }
    }
    for (k, v) in cmd.env {
        c.env(k, v);
    }
    // Last, so the job's env cannot replace it.
    let (var, cookie) = tracker.cookie();
    c.env(var, cookie);
    if let Some(fd) = tracker.join_fd() {
        // SAFETY: runs in the forked child before exec; write(2) is async-signal-safe
        // and touches only this static buffer. "0" moves the writing process (the
        // step's shell, before it runs anything) into the step's cgroup.
        unsafe {
            c.pre_exec(move || {
                // A refused write is noticed by `StepTracker::started`.
                let _ = libc::write(fd, b"0".as_ptr().cast(), 1);
                Ok(())
            });
        }
    }
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match c.spawn() {
        Ok(c) => c,
        Err(e) => {
            return StepEnd::CouldNotStart(format!(
                "cannot start /bin/sh in {}: {e}",
                cmd.dir.display()
            ));
        }
    };
    if let Err(e) = tracker.started(child.id().unwrap_or(0)) {
        let _ = child.kill().await;
        return StepEnd::CouldNotStart(e);
    }
    let pgid = child.id().map(|p| p as i32);
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let readers = tokio::spawn({
        let (m1, m2, o1, o2) = (masker.clone(), masker.clone(), out.clone(), out);
        async move {
            tokio::join!(
                pump(stdout, Stream::Stdout, m1, o1),
                pump(stderr, Stream::Stderr, m2, o2)
            );
        }
    });

    let deadline = tokio::time::sleep(cmd.timeout);
    tokio::pin!(deadline);
    let stopped = loop {
        tokio::select! {
            status = child.wait() => break match status {
                Ok(s) => match (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)) {
                    (Some(code), _) => StepEnd::Exited(code),
                    (None, Some(sig)) => StepEnd::Signalled(sig),
                    _ => StepEnd::Exited(-1),
                },
                Err(e) => StepEnd::CouldNotStart(format!("waiting for the step failed: {e}")),
            },
            _ = &mut deadline => break StepEnd::TimedOut,
            changed = cancel.changed() => {
                if changed.is_err() || *cancel.borrow() {
                    break StepEnd::Cancelled;
                }
            }
        }
    };
    if matches!(stopped, StepEnd::TimedOut | StepEnd::Cancelled) {
        if let Some(pg) = pgid {
            signal_group(pg, libc::SIGTERM);
        }
        if tokio::time::timeout(cmd.kill_grace, child.wait())
            .await
            .is_err()
        {
            if let Some(pg) = pgid {
                signal_group(pg, libc::SIGKILL);
            }
            let _ = child.wait().await;
        }
    }
    // Whatever the step left running in its group goes too, and whatever left the
    // group (a new session, a double fork) is found by its cgroup or cookie; then the
    // pipes close.
    if let Some(pg) = pgid {
        signal_group(pg, libc::SIGKILL);
    }
    let _ = tokio::task::spawn_blocking(move || tracker.kill_all()).await;
    let _ = readers.await;
    stopped
}

fn signal_group(pgid: i32, sig: i32) {
    // SAFETY: kill(2) with a negative pid signals that process group; no memory involved.
    unsafe {
        libc::kill(-pgid, sig);
    }
}

async fn pump<R: tokio::io::AsyncRead + Unpin>(
    mut r: R,
    stream: Stream,
    masker: Masker,
    out: mpsc::Sender<Output>,
) {
    let mut lines = LineAssembler::new(masker, MAX_LINE);
    let mut buf = vec![0u8; 64 << 10];
    let mut pieces: Vec<Piece> = Vec::new();
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        lines.push(&buf[..n], &mut pieces);
        for p in pieces.drain(..) {
            if out
                .send(Output {
                    stream,
                    text: p.text,
                    partial: p.partial,
                })
                .await
                .is_err()
            {
                return;
            }
        }
    }
    lines.finish(&mut pieces);
    for p in pieces.drain(..) {
        let _ = out
            .send(Output {
                stream,
                text: p.text,
                partial: p.partial,
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    async fn run(
        script: &str,
        env: &[(&str, &str)],
        secrets: &[&str],
        timeout: Duration,
    ) -> (StepEnd, Vec<Output>) {
        let dir = tempfile::tempdir().unwrap();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (tx, mut rx) = mpsc::channel(1024);
        let (_cancel_tx, cancel) = watch::channel(false);
        let collect = tokio::spawn(async move {
            let mut v = Vec::new();
            while let Some(o) = rx.recv().await {
                v.push(o);
            }
            v
        });
        let end = run_step(
            StepCommand {
                run: script,
                dir: dir.path(),
                env: &env,
                timeout,
                kill_grace: Duration::from_millis(300),
                tracking: Tracking::Auto,
            },
            &Masker::new(secrets),
            tx,
            cancel,
        )
        .await;
        (end, collect.await.unwrap())
    }

    fn stdout(v: &[Output]) -> Vec<String> {
        v.iter()
            .filter(|o| o.stream == Stream::Stdout)
            .map(|o| o.text.clone())
            .collect()
    }

    #[tokio::test]
    async fn exit_codes_env_and_streams() {
        let (end, out) = run(
            "echo \"$GREETING\"; echo oops >&2; exit 3",
            &[("GREETING", "hi there")],
            &[],
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(end, StepEnd::Exited(3));
        assert_eq!(stdout(&out), vec!["hi there"]);
        assert!(
            out.iter()
                .any(|o| o.stream == Stream::Stderr && o.text == "oops")
        );
        let (end, _) = run("true", &[], &[], Duration::from_secs(10)).await;
        assert!(end.succeeded());
    }

    #[tokio::test]
    async fn the_agents_environment_does_not_leak_into_steps() {
        // cargo sets CARGO_MANIFEST_DIR for test processes: the agent has it, steps must not.
        assert!(
            std::env::var_os("CARGO_MANIFEST_DIR").is_some(),
            "run under cargo test"
        );
        let (_, out) = run(
            "echo \"[$CARGO_MANIFEST_DIR]\"; echo \"$PATH\" | grep -c /",
            &[],
            &[],
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(stdout(&out), vec!["[]", "1"]);
    }

    #[tokio::test]
    async fn secrets_are_masked_even_when_written_in_pieces() {
        let (_, out) = run(
            "printf 'tok=s3cr'; sleep 0.2; printf 'et-value end\\n'; echo s3cret-value",
            &[],
            &["s3cret-value"],
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(stdout(&out), vec!["tok=**** end", "****"]);
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_process_tree() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survivor");
        let script = format!("(sleep 2; touch {}) & sleep 30", marker.display());
        let t = Instant::now();
        let (end, _) = run(&script, &[], &[], Duration::from_millis(300)).await;
        assert_eq!(end, StepEnd::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(
            !marker.exists(),
            "a background process of the step survived the timeout"
        );
    }

    #[tokio::test]
    async fn background_stragglers_do_not_hold_the_step_open() {
        let t = Instant::now();
        let (end, out) = run("sleep 30 & echo started", &[], &[], Duration::from_secs(10)).await;
        assert_eq!(end, StepEnd::Exited(0));
        assert_eq!(stdout(&out), vec!["started"]);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn cancel_stops_a_step_that_ignores_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let (cancel_tx, cancel) = watch::channel(false);
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let t = Instant::now();
        let step = tokio::spawn(async move {
            run_step(
                StepCommand {
                    run: "trap '' TERM; echo ready; sleep 30",
                    dir: dir.path(),
                    env: &[],
                    timeout: Duration::from_secs(60),
                    kill_grace: Duration::from_millis(300),
                    tracking: Tracking::Auto,
                },
                &Masker::default(),
                tx,
                cancel,
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel_tx.send(true).unwrap();
        assert_eq!(step.await.unwrap(), StepEnd::Cancelled);
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }

    /// Is `pid` alive (not gone, not a zombie)?
    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().to_string()))
            .is_some_and(|r| !r.starts_with('Z') && !r.starts_with('X'))
    }

    /// A step starts two escapees — `setsid`, and a double fork into a new session —
    /// which write their pids; the step then ends (or, with `cancel`, is cancelled).
    /// Afterwards both are gone.
    async fn escapees_are_gone(tracking: Tracking, cancel: bool) {
        let dir = tempfile::tempdir().unwrap();
        let script = "setsid sh -c 'echo $$ > p1; exec sleep 300' >/dev/null 2>&1 </dev/null &
            ( setsid sh -c 'echo $$ > p2; exec sleep 300' >/dev/null 2>&1 </dev/null & )
            while [ ! -s p1 ] || [ ! -s p2 ]; do sleep 0.02; done
            echo escaped"
            .to_string()
            + if cancel { "; sleep 300" } else { "" };
        let (tx, mut rx) = mpsc::channel::<Output>(16);
        let (cancel_tx, cancel_rx) = watch::channel(false);
        // Held here too: a dropped sender reads as a cancel.
        let cancel_tx = std::sync::Arc::new(cancel_tx);
        let _held = cancel_tx.clone();
        let lines = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(o) = rx.recv().await {
                if o.text == "escaped" && cancel {
                    let _ = cancel_tx.send(true);
                }
                got.push(o.text);
            }
            got
        });
        let end = run_step(
            StepCommand {
                run: &script,
                dir: dir.path(),
                env: &[],
                timeout: Duration::from_secs(30),
                kill_grace: Duration::from_millis(300),
                tracking,
            },
            &Masker::default(),
            tx,
            cancel_rx,
        )
        .await;
        let want = if cancel {
            StepEnd::Cancelled
        } else {
            StepEnd::Exited(0)
        };
        assert_eq!(end, want, "{:?}", lines.await);
        let pids: Vec<u32> = ["p1", "p2"]
            .iter()
            .map(|f| {
                std::fs::read_to_string(dir.path().join(f))
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap()
            })
            .collect();
        let t = Instant::now();
        while pids.iter().any(|p| alive(*p)) && t.elapsed() < Duration::from_secs(3) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left: Vec<_> = pids.iter().filter(|p| alive(**p)).collect();
        let seen: Vec<String> = left
            .iter()
            .map(|p| {
                let read =
                    |f: &str| std::fs::read_to_string(format!("/proc/{p}/{f}")).unwrap_or_default();
                format!("{p}: stat {} cgroup {}", read("stat"), read("cgroup"))
            })
            .collect();
        for p in &left {
            // SAFETY: kill(2) on this test's own escapees.
            unsafe { libc::kill(**p as i32, libc::SIGKILL) };
        }
        assert!(
            left.is_empty(),
            "{tracking:?}, cancel {cancel}: escapees outlived the step: {seen:#?}"
        );
        assert!(
            left.is_empty(),
            "{tracking:?}, cancel {cancel}: escapees {left:?} outlived the step"
        );
    }

    #[tokio::test]
    async fn escapees_are_killed_by_their_cookie() {
        escapees_are_gone(Tracking::Cookie, false).await;
        escapees_are_gone(Tracking::Cookie, true).await;
    }

    #[tokio::test]
    async fn escapees_are_killed_with_their_cgroup() {
        if let Err(why) = StepTracker::new(Tracking::Cgroup) {
            eprintln!("SKIPPED: no cgroup v2 for steps on this machine: {why}");
            return;
        }
        escapees_are_gone(Tracking::Cgroup, false).await;
        escapees_are_gone(Tracking::Cgroup, true).await;
    }

    #[tokio::test]
    async fn a_missing_directory_is_reported() {
        let (tx, _rx) = mpsc::channel(1);
        let (_c, cancel) = watch::channel(false);
        let end = run_step(
            StepCommand {
                run: "true",
                dir: Path::new("/nonexistent/dir"),
                env: &[],
                timeout: Duration::from_secs(1),
                kill_grace: KILL_GRACE,
                tracking: Tracking::Auto,
            },
            &Masker::default(),
            tx,
            cancel,
        )
        .await;
        assert!(
            matches!(end, StepEnd::CouldNotStart(ref m) if m.contains("/nonexistent/dir")),
            "{end:?}"
        );
    }

    #[tokio::test]
    async fn a_million_lines_arrive_complete_and_in_order() {
        let (tx, mut rx) = mpsc::channel::<Output>(4096);
        let (_c, cancel) = watch::channel(false);
        let dir = tempfile::tempdir().unwrap();
        let counter = tokio::spawn(async move {
            let (mut n, mut ok) = (0u64, true);
            while let Some(o) = rx.recv().await {
                n += 1;
                ok &= o.text == n.to_string();
            }
            (n, ok)
        });
        let end = run_step(
            StepCommand {
                run: "seq 1 1000000",
                dir: dir.path(),
                env: &[],
                timeout: Duration::from_secs(60),
                kill_grace: KILL_GRACE,
                tracking: Tracking::Auto,
            },
            &Masker::default(),
            tx,
            cancel,
        )
        .await;
        assert!(end.succeeded());
        assert_eq!(counter.await.unwrap(), (1_000_000, true));
    }
}

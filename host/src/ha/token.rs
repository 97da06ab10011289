//! Fencing tokens. The active controller holds a token: a number that grows with every
//! change of leader (the revision of its leader key in etcd). Two places refuse
//! anything stamped with a token older than the newest they have seen, so that a
//! controller that was paused, fenced and replaced, and then wakes up, can neither
//! change the shared state nor drive agents:
//!
//! * [`StateGate`]: the state directory remembers the newest token any writer used
//!   (`<state>/fencing-token`); a write with an older one is refused (and counted). The
//!   check and the write happen under an exclusive `flock` on `<state>/.fencing.lock`,
//!   so two processes cannot interleave them (on GlusterFS the locks translator serves
//!   POSIX locks across clients).
//! * [`CommandGate`]: an agent remembers the newest token it has seen (from the
//!   controller's welcome and from every command; kept in its state directory across
//!   restarts) and refuses commands stamped with an older one.
//!
//! Token 0 means "no HA": a single controller, which stamps nothing and is never
//! refused by a gate that has seen no token either.
//!
//! An agent takes tokens only from its controller's authenticated welcome and from
//! sealed orders (see `session::seal`), and still refuses, without keeping it, a token
//! more than [`MAX_TOKEN_AHEAD`] beyond the newest it has seen: a token is a revision in
//! etcd, which grows by one per write to the cluster, so such a jump is no leader
//! change but a bug or an attack, and keeping it would refuse every real controller for
//! good.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

const TOKEN_FILE: &str = "fencing-token";

/// How far beyond the newest seen a token may be and still be believed: 2^40 (a
/// thousand billion etcd writes between two leader changes).
pub const MAX_TOKEN_AHEAD: u64 = 1 << 40;
const LOCK_FILE: &str = ".fencing.lock";

/// A write refused: the writer's token is older than one the state has seen.
#[derive(Debug, thiserror::Error)]
#[error(
    "refused: this controller's fencing token {ours} is older than {newest}, which a newer active controller wrote; this controller was replaced and must stop acting as active"
)]
pub struct Fenced {
    pub ours: u64,
    pub newest: u64,
}

/// The state directory's side: every write through it carries this writer's token.
#[derive(Debug)]
pub struct StateGate {
    token: u64,
    file: PathBuf,
    lock: File,
    refused: AtomicU64,
}

impl StateGate {
    /// The gate of `state_dir` for a writer holding `token`.
    pub fn open(state_dir: &Path, token: u64) -> io::Result<StateGate> {
        std::fs::create_dir_all(state_dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(state_dir.join(LOCK_FILE))?;
        Ok(StateGate {
            token,
            file: state_dir.join(TOKEN_FILE),
            lock,
            refused: AtomicU64::new(0),
        })
    }

    pub fn token(&self) -> u64 {
        self.token
    }

    /// Writes refused so far (the `/metrics` counter).
    pub fn refused(&self) -> u64 {
        self.refused.load(Relaxed)
    }

    /// The newest token the state has seen (0: none).
    pub fn newest(&self) -> io::Result<u64> {
        read_token(&self.file)
    }

    /// Run `write` if this writer's token is not older than the newest the state has
    /// seen (recording ours as the newest when it is newer), all under the lock.
    pub fn write<T>(&self, write: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let _held = Flock::exclusive(&self.lock)?;
        let newest = read_token(&self.file)?;
        if self.token < newest {
            self.refused.fetch_add(1, Relaxed);
            let e = Fenced {
                ours: self.token,
                newest,
            };
            tracing::error!("{e}");
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, e));
        }
        if self.token > newest {
            crate::controller::state::write_atomic(&self.file, self.token.to_string().as_bytes())?;
        }
        write()
    }
}

/// The agent's side: the newest token seen, and whether a command may be obeyed.
#[derive(Debug)]
pub struct CommandGate {
    newest: Mutex<u64>,
    /// Where it is kept across restarts (None: memory only).
    file: Option<PathBuf>,
    refused: AtomicU64,
}

impl CommandGate {
    /// A gate remembering its newest token in `<dir>/fencing-token` (None: in memory).
    pub fn open(dir: Option<&Path>) -> io::Result<CommandGate> {
        // The directory is made on the first token worth keeping, not before: an agent
        // that never ran anything leaves nothing behind.
        let file = dir.map(|d| d.join(TOKEN_FILE));
        let newest = match &file {
            Some(f) => read_token(f)?,
            None => 0,
        };
        Ok(CommandGate {
            newest: Mutex::new(newest),
            file,
            refused: AtomicU64::new(0),
        })
    }

    /// Whether a command stamped `token` may be obeyed: not older than the newest seen,
    /// and not more than `MAX_TOKEN_AHEAD` beyond it. A newer one becomes the newest
    /// (kept on disk before this returns); one too far ahead is refused and not kept.
    pub fn admit(&self, token: u64) -> bool {
        let mut newest = self.newest.lock().unwrap();
        if token < *newest {
            self.refused.fetch_add(1, Relaxed);
            return false;
        }
        if token - *newest > MAX_TOKEN_AHEAD {
            self.refused.fetch_add(1, Relaxed);
            tracing::error!(
                "refusing fencing token {token}: more than {MAX_TOKEN_AHEAD} beyond the newest seen ({}), no leader change gets there; not keeping it",
                *newest
            );
            return false;
        }
        if token > *newest {
            let keep = |f: &Path| {
                std::fs::create_dir_all(f.parent().unwrap_or(Path::new(".")))?;
                crate::controller::state::write_atomic(f, token.to_string().as_bytes())
            };
            if let Some(f) = &self.file
                && let Err(e) = keep(f)
            {
                // Still newer in memory: only a restart of this agent would forget it.
                tracing::warn!("cannot keep the newest fencing token on disk: {e}");
            }
            *newest = token;
        }
        true
    }

    pub fn newest(&self) -> u64 {
        *self.newest.lock().unwrap()
    }

    /// Commands refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Relaxed)
    }
}

fn read_token(file: &Path) -> io::Result<u64> {
    match std::fs::read_to_string(file) {
        Ok(s) => s.trim().parse().map_err(|_| {
            io::Error::other(format!(
                "{} does not hold a fencing token ({s:?}): restore it or remove it with every controller stopped",
                file.display()
            ))
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// An exclusive `flock`, released when dropped.
struct Flock<'a>(&'a File);

impl<'a> Flock<'a> {
    fn exclusive(f: &'a File) -> io::Result<Flock<'a>> {
        use std::os::fd::AsRawFd;
        loop {
            // SAFETY: a valid open descriptor; flock has no memory effects.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(Flock(f));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Drop for Flock<'_> {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: as above.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_writer_is_refused_once_a_newer_one_wrote() {
        let d = tempfile::tempdir().unwrap();
        let old = StateGate::open(d.path(), 5).unwrap();
        let new = StateGate::open(d.path(), 7).unwrap();
        assert_eq!(old.write(|| Ok(1)).unwrap(), 1, "nothing newer seen yet");
        assert_eq!(old.newest().unwrap(), 5);
        assert_eq!(new.write(|| Ok(2)).unwrap(), 2);
        let mut ran = false;
        let e = old
            .write(|| {
                ran = true;
                Ok(())
            })
            .unwrap_err();
        assert!(!ran, "the write did not happen");
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("token 5 is older than 7"), "{e}");
        assert_eq!((old.refused(), new.refused()), (1, 0));
        // The state remembers across processes: a fresh gate with the old token too.
        assert!(
            StateGate::open(d.path(), 5)
                .unwrap()
                .write(|| Ok(()))
                .is_err()
        );
        assert!(
            StateGate::open(d.path(), 7)
                .unwrap()
                .write(|| Ok(()))
                .is_ok()
        );
    }

    #[test]
    fn writers_in_two_threads_never_interleave_check_and_write() {
        // Each write appends "<token>" to a log while holding the gate; once 9 wrote,
        // no 3 may follow it.
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("log");
        std::fs::write(&log, "").unwrap();
        std::thread::scope(|s| {
            for token in [3u64, 9] {
                let (dir, log) = (d.path(), &log);
                s.spawn(move || {
                    let g = StateGate::open(dir, token).unwrap();
                    for _ in 0..200 {
                        let _ = g.write(|| {
                            let mut text = std::fs::read_to_string(log)?;
                            text.push_str(&format!("{token}\n"));
                            std::fs::write(log, text)
                        });
                    }
                });
            }
        });
        let text = std::fs::read_to_string(&log).unwrap();
        let order: Vec<&str> = text.lines().collect();
        let first_nine = order.iter().position(|t| *t == "9").unwrap();
        assert!(
            order[first_nine..].iter().all(|t| *t == "9"),
            "a 3 was written after a 9"
        );
        assert_eq!(order.iter().filter(|t| **t == "9").count(), 200);
    }

    #[test]
    fn agents_refuse_commands_older_than_the_newest_seen_even_after_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        let g = CommandGate::open(Some(&state)).unwrap();
        assert!(g.admit(0));
        assert!(!state.exists(), "nothing kept until there is a token");
        assert!(g.admit(0), "no HA: nothing stamped, nothing refused");
        assert!(g.admit(5));
        assert!(g.admit(7));
        assert!(!g.admit(5));
        assert!(g.admit(7));
        assert_eq!((g.newest(), g.refused()), (7, 1));
        let g = CommandGate::open(Some(&state)).unwrap();
        assert!(!g.admit(5), "remembered across a restart");
        assert!(!g.admit(0));
    }

    #[test]
    fn a_token_far_ahead_is_refused_and_never_kept() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        let g = CommandGate::open(Some(&state)).unwrap();
        assert!(!g.admit(u64::MAX));
        assert!(!g.admit(MAX_TOKEN_AHEAD + 1));
        assert!(!state.exists(), "nothing kept");
        assert_eq!(g.newest(), 0);
        assert!(g.admit(7), "the real controller is still obeyed");
        assert!(g.admit(7 + MAX_TOKEN_AHEAD));
        assert_eq!(
            CommandGate::open(Some(&state)).unwrap().newest(),
            7 + MAX_TOKEN_AHEAD
        );
    }
}

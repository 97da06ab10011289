//! Steps cannot outlive their run. A step's shell runs in its own process group, but a
//! process can leave that (`setsid`, a double fork into a new session) and live on after
//! the step, its run and its workspace are gone. So every process of a step is tracked,
//! whatever it does to its group or session:
//!
//! - in a cgroup v2 the agent makes for the step, where it can (a cgroup2 mount, the
//!   agent's own cgroup writable, e.g. root or systemd's `Delegate=yes`): the shell is
//!   moved into it before it runs anything, every descendant is born in it, and at the
//!   end of the step `cgroup.kill` takes them all at once; the cgroup is then removed;
//! - and always by an environment cookie, `TRELLIS_RUN_COOKIE=<random>`, which every
//!   descendant inherits: at the end of the step, /proc/*/environ is scanned and every
//!   process carrying the cookie is killed, round after round until none is left (as
//!   Jenkins' ProcessTreeKiller does). Where no cgroup can be made this is the only
//!   tracking; a process that clears its environment escapes it (a cgroup it cannot).
//!
//! `TRELLIS_STEP_TRACKING` chooses: `auto` (the default: a cgroup where possible, else
//! the cookie), `cgroup` (a step that cannot get one does not start) or `cookie`.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The variable carrying a step's cookie; every process of the step inherits it.
pub const COOKIE_VAR: &str = "TRELLIS_RUN_COOKIE";

/// The variable choosing the tracking (see the module docs).
pub const TRACKING_VAR: &str = "TRELLIS_STEP_TRACKING";

/// How a step's processes are tracked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tracking {
    /// A cgroup where the agent can make one, else the cookie alone.
    #[default]
    Auto,
    /// A cgroup, or the step does not start.
    Cgroup,
    /// The cookie alone.
    Cookie,
}

impl Tracking {
    /// From `TRELLIS_STEP_TRACKING` (unset: `Auto`).
    pub fn from_env() -> Result<Tracking, String> {
        match std::env::var(TRACKING_VAR).as_deref() {
            Err(_) | Ok("") | Ok("auto") => Ok(Tracking::Auto),
            Ok("cgroup") => Ok(Tracking::Cgroup),
            Ok("cookie") => Ok(Tracking::Cookie),
            Ok(other) => Err(format!(
                "{TRACKING_VAR}=`{other}` is not a tracking mode: use auto, cgroup or cookie"
            )),
        }
    }
}

/// Set once a cgroup could not be used in `Auto` mode: the agent stops trying.
static CGROUPS_FAILED: AtomicBool = AtomicBool::new(false);

/// The agent's own cgroup v2 directory, if there is a cgroup2 mount whose part for this
/// process is writable (found once per process). Why not, otherwise.
pub fn own_cgroup() -> Result<&'static Path, &'static str> {
    static OWN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    OWN.get_or_init(find_own_cgroup)
        .as_ref()
        .map(PathBuf::as_path)
        .map_err(String::as_str)
}

fn find_own_cgroup() -> Result<PathBuf, String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    // `... mount-point ... - cgroup2 source options`: the fifth field is where it is.
    let mount = mountinfo
        .lines()
        .find(|l| {
            l.split(" - ")
                .nth(1)
                .is_some_and(|t| t.starts_with("cgroup2 "))
        })
        .and_then(|l| l.split(' ').nth(4))
        .ok_or("no cgroup2 file system is mounted")?;
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("this process has no cgroup v2 membership")?;
    let dir = Path::new(mount).join(path.trim_start_matches('/'));
    if !dir.join("cgroup.procs").is_file() {
        return Err(format!("{} is not a cgroup v2 directory", dir.display()));
    }
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| "a cgroup path with a NUL byte")?;
    // SAFETY: access(2) on a NUL-terminated path we own; no memory is written.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
        return Err(format!(
            "{} is not writable by the agent (run it as root, or with systemd's Delegate=yes)",
            dir.display()
        ));
    }
    Ok(dir)
}

/// The processes of one step, from before it starts until they are all gone.
pub struct StepTracker {
    cookie: String,
    /// The step's cgroup and its `cgroup.procs`, open for the shell to join.
    cgroup: Option<(PathBuf, File)>,
    mode: Tracking,
    finished: bool,
}

impl StepTracker {
    /// A fresh cookie, and in `Auto` or `Cgroup` mode a cgroup for the step where one
    /// can be made. Err only in `Cgroup` mode, saying why there is none.
    pub fn new(mode: Tracking) -> Result<StepTracker, String> {
        let cookie = hex::encode(crate::session::auth::nonce());
        let mut t = StepTracker {
            cookie,
            cgroup: None,
            mode,
            finished: false,
        };
        let want = match mode {
            Tracking::Cookie => false,
            Tracking::Auto => !CGROUPS_FAILED.load(Ordering::Relaxed),
            Tracking::Cgroup => true,
        };
        if want {
            match t.make_cgroup() {
                Ok(c) => t.cgroup = Some(c),
                Err(e) if mode == Tracking::Cgroup => {
                    return Err(format!(
                        "no cgroup for the step ({TRACKING_VAR}=cgroup): {e}"
                    ));
                }
                Err(e) => t.give_up_cgroups(&e),
            }
        }
        Ok(t)
    }

    fn make_cgroup(&self) -> Result<(PathBuf, File), String> {
        let dir = own_cgroup()?.join(format!("trellis-step-{}", &self.cookie[..16]));
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let opened = if dir.join("cgroup.kill").is_file() {
            std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))
                .map_err(|e| format!("cannot open {}/cgroup.procs: {e}", dir.display()))
        } else {
            Err("the kernel has no cgroup.kill (Linux 5.14 or later has)".to_string())
        };
        match opened {
            Ok(procs) => Ok((dir, procs)),
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                Err(e)
            }
        }
    }

    /// `Auto` mode found cgroups unusable: say so once, and use the cookie from now on.
    fn give_up_cgroups(&self, why: &str) {
        if !CGROUPS_FAILED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "steps are tracked by their environment cookie only, not in a cgroup: {why}"
            );
        }
    }

    /// The variable and value every process of the step carries.
    pub fn cookie(&self) -> (&'static str, &str) {
        (COOKIE_VAR, &self.cookie)
    }

    /// The step's cgroup, when it has one.
    pub fn cgroup(&self) -> Option<&Path> {
        self.cgroup.as_ref().map(|(d, _)| d.as_path())
    }

    /// The `cgroup.procs` the step's shell writes itself into before it runs anything
    /// (in the forked child, see `exec::run_step`). Writing "0" moves the writer.
    pub fn join_fd(&self) -> Option<RawFd> {
        self.cgroup.as_ref().map(|(_, f)| f.as_raw_fd())
    }

    /// After the shell started: check it is in the step's cgroup. If it is not (the
    /// write was refused, e.g. no delegation across cgroups), `Auto` falls back to the
    /// cookie (which the shell carries in any case); `Cgroup` says why, to stop it.
    pub fn started(&mut self, pid: u32) -> Result<(), String> {
        let Some((dir, _)) = &self.cgroup else {
            return Ok(());
        };
        let want = format!(
            "/{}",
            dir.file_name().and_then(|n| n.to_str()).unwrap_or("")
        );
        let is_in = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| {
            c.lines()
                .any(|l| l.starts_with("0::") && l.ends_with(&want))
        });
        if is_in {
            return Ok(());
        }
        let why = format!("the step's shell could not join {}", dir.display());
        if self.mode == Tracking::Cgroup {
            return Err(why);
        }
        self.give_up_cgroups(&why);
        if let Some((dir, _)) = self.cgroup.take() {
            let _ = std::fs::remove_dir(&dir);
        }
        Ok(())
    }

    /// Kill every process of the step that is still there, whatever session or group it
    /// moved to, and remove the step's cgroup. Blocking (a few file operations, and up to
    /// a few seconds while killed processes die).
    pub fn kill_all(&mut self) {
        self.finished = true;
        if let Some((dir, procs)) = self.cgroup.take() {
            drop(procs);
            kill_cgroup(&dir);
        }
        // Also where the cgroup did its work: a process that cleared its environment
        // cannot leave the cgroup, one that left the cgroup (root can) keeps the cookie.
        kill_by_cookie(&self.cookie);
    }
}

impl Drop for StepTracker {
    /// A step abandoned mid-way (its run dropped, the agent stopping) still takes its
    /// processes down.
    fn drop(&mut self) {
        if !self.finished {
            self.kill_all();
        }
    }
}

/// `cgroup.kill`, wait until it is empty, remove it.
fn kill_cgroup(dir: &Path) {
    if let Err(e) = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.kill"))
        .and_then(|mut f| f.write_all(b"1"))
    {
        tracing::error!(cgroup = %dir.display(), "cannot kill the step's processes: {e}");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let empty = std::fs::read_to_string(dir.join("cgroup.events"))
            .map(|e| e.lines().any(|l| l == "populated 0"))
            .unwrap_or(true);
        if empty && std::fs::remove_dir(dir).is_ok() {
            return;
        }
        if Instant::now() > deadline {
            tracing::error!(cgroup = %dir.display(), "the step's cgroup did not empty within 5 s; left in place");
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kill every process whose environment holds `COOKIE_VAR=cookie`, in rounds until a
/// scan finds none (a process may fork while the scan runs). Returns how many.
pub fn kill_by_cookie(cookie: &str) -> usize {
    let entry = format!("{COOKIE_VAR}={cookie}");
    let me = std::process::id();
    let mut killed = 0;
    for _round in 0..50 {
        let found = processes_with(entry.as_bytes(), me);
        if found.is_empty() {
            return killed;
        }
        for pid in &found {
            // SAFETY: kill(2) on a pid; no memory involved.
            unsafe {
                libc::kill(*pid as i32, libc::SIGKILL);
            }
        }
        killed += found.len();
        std::thread::sleep(Duration::from_millis(10));
    }
    tracing::error!("processes carrying a step's cookie kept appearing after 50 rounds of killing");
    killed
}

/// Pids (other than `me`) whose environment has `entry` as one of its variables.
fn processes_with(entry: &[u8], me: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            // Unreadable (another user's process, or gone): not ours to kill.
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == entry))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mode_comes_from_the_environment_and_a_bad_one_is_named() {
        // Not set in the test environment: auto.
        if std::env::var_os(TRACKING_VAR).is_none() {
            assert_eq!(Tracking::from_env(), Ok(Tracking::Auto));
        }
    }

    #[test]
    fn a_cookie_scan_finds_and_kills_only_the_processes_carrying_the_cookie() {
        let mut with = std::process::Command::new("sleep")
            .arg("30")
            .env(COOKIE_VAR, "abc123")
            .spawn()
            .unwrap();
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .env(COOKIE_VAR, "abc1234")
            .spawn()
            .unwrap();
        assert_eq!(kill_by_cookie("abc123"), 1);
        assert!(with.wait().unwrap().code().is_none(), "killed by a signal");
        assert!(
            other.try_wait().unwrap().is_none(),
            "another cookie is left alone"
        );
        other.kill().unwrap();
        other.wait().unwrap();
    }
}

//! A real GlusterFS for tests (Debian's glusterfs-server): `glusterd -p PIDFILE`
//! started by the test, a replica-2 volume on two local bricks, FUSE mounts (from a
//! test's network namespace, so the server sees the namespace's address). glusterd is
//! one per machine: the tests that use it hold [`GLUSTER_LOCK`]. Everything is stopped
//! and removed on drop. Needs root.

use super::Netns;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Held by each test that runs glusterd (one per machine; `blocking_lock` outside async).
pub static GLUSTER_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The glusterfs-fence plugin's exec grants, as an operator would write them.
pub const GLUSTER_TEMPLATES: &str = r#"exec = [
  { name = "volume-status", argv = ["gluster", "--mode=script", "volume", "status", "{volume}", "--xml"] },
  { name = "get-reject", argv = ["gluster", "--mode=script", "volume", "get", "{volume}", "auth.reject", "--xml"] },
  { name = "set-reject", argv = ["gluster", "--mode=script", "volume", "set", "{volume}", "auth.reject", "{addresses}"] },
  { name = "reset-reject", argv = ["gluster", "--mode=script", "volume", "reset", "{volume}", "auth.reject"] },
]
"#;

/// The gluster CLI: (succeeded, stdout + stderr).
pub fn gluster(args: &[&str]) -> (bool, String) {
    let o = Command::new("gluster")
        .arg("--mode=script")
        .args(args)
        .output()
        .expect("gluster (Debian's glusterfs-server; run ./scripts/setup.sh)");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    )
}

fn running(name: &str) -> bool {
    Command::new("pgrep")
        .args(["-x", name])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A node of the volume that `volume status` shows online.
struct OnlineNode {
    path: String,
    port: Option<u16>,
    pid: Option<u32>,
}

/// glusterd and the test's started volume.
pub struct Gluster {
    pidfile: PathBuf,
    pub volume: String,
    /// Where the bricks are served (what clients mount from).
    pub server: String,
    mounts: Mutex<Vec<PathBuf>>,
}

impl Gluster {
    /// glusterd, and a replica-2 volume with its bricks in `dir` served on `brick_host`
    /// (the host's name, or another address of its own; never 127.0.0.1, which
    /// GlusterFS refuses), with `options` set (`network.ping-timeout 5`, ...).
    pub fn start(dir: &Path, brick_host: &str, options: &[(&str, &str)]) -> Gluster {
        assert_eq!(unsafe { libc::geteuid() }, 0, "glusterd needs root");
        assert!(
            !running("glusterd"),
            "a glusterd is already running on this machine"
        );
        let pidfile = dir.join("glusterd.pid");
        let ok = Command::new("glusterd")
            .arg("-p")
            .arg(&pidfile)
            .arg(format!("--log-file={}", dir.join("glusterd.log").display()))
            .status()
            .expect("glusterd (run ./scripts/setup.sh)")
            .success();
        assert!(ok, "glusterd did not start");
        let volume = format!("trellis-{}", std::process::id());
        let g = Gluster {
            pidfile,
            volume: volume.clone(),
            server: brick_host.to_string(),
            mounts: Mutex::new(Vec::new()),
        };
        let t = Instant::now();
        while !gluster(&["volume", "list"]).0 {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "glusterd does not answer"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let bricks: Vec<String> = ["b1", "b2"]
            .iter()
            .map(|b| {
                std::fs::create_dir_all(dir.join(b)).unwrap();
                format!("{brick_host}:{}", dir.join(b).display())
            })
            .collect();
        let (ok, out) = gluster(&[
            "volume", "create", &volume, "replica", "2", &bricks[0], &bricks[1], "force",
        ]);
        assert!(ok, "{out}");
        for (k, v) in options {
            let (ok, out) = gluster(&["volume", "set", &volume, k, v]);
            assert!(ok, "{out}");
        }
        g.start_bricks(dir);
        g
    }

    /// Start the volume and see both bricks online. glusterd gives each brick a port of
    /// its own choosing (from 49152, inside the kernel's range for outgoing connections)
    /// and checks that it is free before the brick binds it; an outgoing connection
    /// taking it in between leaves the brick down ("address already in use" in its
    /// log). A brick that is not online is started again (`volume start force` starts
    /// the bricks that are down, each on a port chosen afresh), at most `PORT_TRIES`
    /// times (see `ports.rs`).
    pub fn start_bricks(&self, dir: &Path) {
        let mut said = String::new();
        for attempt in 1..=super::PORT_TRIES {
            let mut args = vec!["volume", "start", self.volume.as_str()];
            if attempt > 1 {
                args.push("force");
            }
            let (ok, out) = gluster(&args);
            // A first start that failed (a brick could not bind) is forced next time.
            said = out.clone();
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10) {
                let down = self.bricks_down(dir);
                if down.is_empty() {
                    return;
                }
                said = format!("{out}\nbricks not online: {down:?}");
                if !ok {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            eprintln!(
                "glusterfs: a brick of {} is not online (start {attempt} of {}), starting it again: {said}",
                self.volume,
                super::PORT_TRIES
            );
        }
        panic!(
            "glusterfs: the bricks of {} did not come online in {} starts: {said}; see /var/log/glusterfs/bricks/",
            self.volume,
            super::PORT_TRIES
        )
    }

    /// What `volume status --xml` shows online: one <node> per brick and daemon, each
    /// with its <path>, <port> and <pid> (<status> 1 = online). Empty when it cannot be
    /// read.
    fn online(&self) -> Vec<OnlineNode> {
        let (ok, xml) = gluster(&["volume", "status", &self.volume, "--xml"]);
        if !ok {
            return Vec::new();
        }
        let field = |node: &str, f: &str| -> Option<String> {
            let open = format!("<{f}>");
            let close = format!("</{f}>");
            Some(node.split(&open).nth(1)?.split(&close).next()?.to_string())
        };
        xml.split("<node>")
            .filter(|n| n.contains("<status>1</status>"))
            .filter_map(|n| {
                Some(OnlineNode {
                    path: field(n, "path")?,
                    port: field(n, "port").and_then(|p| p.parse().ok()),
                    pid: field(n, "pid").and_then(|p| p.parse().ok()),
                })
            })
            .collect()
    }

    /// The port and process of brick `name` (`b1`, `b2`) under `dir`, if it is online.
    pub fn brick(&self, dir: &Path, name: &str) -> Option<(u16, u32)> {
        let path = dir.join(name).display().to_string();
        let node = self.online().into_iter().find(|n| n.path == path)?;
        Some((node.port?, node.pid?))
    }

    /// The bricks under `dir` that `volume status` does not show online (all of them
    /// when it cannot be read).
    pub fn bricks_down(&self, dir: &Path) -> Vec<String> {
        let online = self.online();
        ["b1", "b2"]
            .iter()
            .map(|b| dir.join(b).display().to_string())
            .filter(|b| !online.iter().any(|n| n.path == *b))
            .collect()
    }

    /// The host's name (where bricks are served when no other address is needed).
    pub fn hostname() -> String {
        let host = String::from_utf8(Command::new("hostname").output().unwrap().stdout).unwrap();
        host.trim().to_string()
    }

    /// Mount the volume at `at` with FUSE, its client in `netns` (or the host's
    /// network). The mount point is made immutable first, so that a write after a lost
    /// mount fails instead of landing in the local directory; `mount.glusterfs` exits 0
    /// even when refused, so the mount is checked with `mountpoint`.
    pub fn mount(&self, netns: Option<&Netns>, at: &Path, log: &Path) -> Result<(), String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let _ = Command::new("chattr").arg("+i").arg(at).status();
        let mut c = match netns {
            Some(ns) => ns.nsenter("mount"),
            None => Command::new("mount"),
        };
        let out = c
            .args(["-t", "glusterfs", "-o"])
            .arg(format!("log-file={}", log.display()))
            .arg(format!("{}:/{}", self.server, self.volume))
            .arg(at)
            .output()
            .map_err(|e| e.to_string())?;
        self.mounts.lock().unwrap().push(at.to_path_buf());
        let mounted = Command::new("mountpoint")
            .arg("-q")
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        if mounted {
            Ok(())
        } else {
            Err(format!(
                "not mounted at {}: {}{}; see {}",
                at.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                log.display()
            ))
        }
    }
}

impl Drop for Gluster {
    fn drop(&mut self) {
        for m in self.mounts.lock().unwrap().drain(..) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&m)
                .stderr(std::process::Stdio::null())
                .status();
            let _ = Command::new("chattr").arg("-i").arg(&m).status();
        }
        let _ = gluster(&["volume", "stop", &self.volume, "force"]);
        let _ = gluster(&["volume", "delete", &self.volume]);
        if let Ok(pid) = std::fs::read_to_string(&self.pidfile) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
        let _ = Command::new("pkill").args(["-x", "glusterd"]).status();
        let t = Instant::now();
        while running("glusterd") && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(200));
        }
        // The brick, self-heal and client processes, by exact name (a test binary may
        // be called glusterfs_fence-...).
        for name in ["glusterfsd", "glusterfs"] {
            let _ = Command::new("pkill").args(["-x", name]).status();
        }
    }
}

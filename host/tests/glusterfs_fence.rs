//! The `glusterfs-fence` plugin against a real GlusterFS (Debian's glusterfs-server:
//! `glusterd -p PIDFILE` started by the test, a replica-2 volume on two local bricks
//! named by the host's name, created with `force`), its gluster calls going through the
//! host's `exec` capability as the templates an operator would grant: monitor sees the
//! bricks online and a killed brick, fence cuts an address off (`auth.reject`, read back
//! with the gluster CLI itself), unfence lets it back, and status follows. Needs root
//! (glusterd). Cutting a real client off is not tested here yet (it needs a mount from
//! a network namespace).

mod common;

use common::*;
use std::process::Command;
use std::time::{Duration, Instant};
use trellis::points::bindings::fence_agent::{FenceAction, PowerState};
use trellis::points::fence::{FenceDevice, FenceOutcome};

const TEMPLATES: &str = r#"exec = [
  { name = "volume-status", argv = ["gluster", "--mode=script", "volume", "status", "{volume}", "--xml"] },
  { name = "get-reject", argv = ["gluster", "--mode=script", "volume", "get", "{volume}", "auth.reject", "--xml"] },
  { name = "set-reject", argv = ["gluster", "--mode=script", "volume", "set", "{volume}", "auth.reject", "{addresses}"] },
  { name = "reset-reject", argv = ["gluster", "--mode=script", "volume", "reset", "{volume}", "auth.reject"] },
]
"#;

fn gluster(args: &[&str]) -> (bool, String) {
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

/// glusterd and the test's volume, stopped and removed when dropped.
struct Gluster {
    pidfile: std::path::PathBuf,
    volume: String,
}

impl Drop for Gluster {
    fn drop(&mut self) {
        let _ = gluster(&["volume", "stop", &self.volume, "force"]);
        let _ = gluster(&["volume", "delete", &self.volume]);
        if let Ok(pid) = std::fs::read_to_string(&self.pidfile) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
        let _ = Command::new("pkill").args(["-x", "glusterd"]).status();
        let t = Instant::now();
        while Command::new("pgrep")
            .args(["-x", "glusterd"])
            .status()
            .is_ok_and(|s| s.success())
            && t.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(200));
        }
        // The brick and self-heal processes, by exact name (this test's own binary is
        // called glusterfs_fence-...).
        for name in ["glusterfsd", "glusterfs"] {
            let _ = Command::new("pkill").args(["-x", name]).status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_fencing_cuts_an_address_off_the_volume_and_lets_it_back() {
    assert_eq!(unsafe { libc::geteuid() }, 0, "glusterd needs root");
    let (running, _) = (
        Command::new("pgrep")
            .args(["-x", "glusterd"])
            .status()
            .unwrap()
            .success(),
        (),
    );
    assert!(!running, "a glusterd is already running on this machine");
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
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
    };
    let t = Instant::now();
    while !gluster(&["volume", "list"]).0 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "glusterd does not answer"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let host = String::from_utf8(Command::new("hostname").output().unwrap().stdout).unwrap();
    let host = host.trim();
    let bricks: Vec<String> = ["b1", "b2"]
        .iter()
        .map(|b| {
            std::fs::create_dir_all(dir.join(b)).unwrap();
            format!("{host}:{}", dir.join(b).display())
        })
        .collect();
    let (ok, out) = gluster(&[
        "volume", "create", &volume, "replica", "2", &bricks[0], &bricks[1], "force",
    ]);
    assert!(ok, "{out}");
    let (ok, out) = gluster(&["volume", "start", &volume]);
    assert!(ok, "{out}");

    let rt = runtime(&format!("[plugins.glusterfs-fence]\n{TEMPLATES}"), dir, &[]);
    let p = rt.load(&bundle().join("glusterfs-fence")).await.unwrap();
    let dev = |target: &str| {
        FenceDevice::new(
            p.clone(),
            vec![
                ("volume".into(), volume.clone()),
                ("plug".into(), target.into()),
            ],
        )
        .unwrap()
    };
    let node = dev("10.99.0.5");
    node.monitor().await.unwrap();
    assert!(matches!(node.status().await.unwrap(), PowerState::On));

    assert_eq!(node.fence(FenceAction::Off).await, FenceOutcome::Fenced);
    let (_, reject) = gluster(&["volume", "get", &volume, "auth.reject"]);
    assert!(reject.contains("10.99.0.5"), "{reject}");
    assert!(matches!(node.status().await.unwrap(), PowerState::Off));
    // A second node too; then the first is let back and the second stays cut off.
    let other = dev("10.99.0.6");
    assert_eq!(other.fence(FenceAction::Off).await, FenceOutcome::Fenced);
    assert_eq!(node.fence(FenceAction::On).await, FenceOutcome::Fenced);
    let (_, reject) = gluster(&["volume", "get", &volume, "auth.reject"]);
    assert!(
        !reject.contains("10.99.0.5") && reject.contains("10.99.0.6"),
        "{reject}"
    );
    let listed: Vec<String> = node
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(listed, ["10.99.0.6"]);
    assert_eq!(other.fence(FenceAction::On).await, FenceOutcome::Fenced);
    assert!(
        gluster(&["volume", "get", &volume, "auth.reject"])
            .1
            .contains("(null)")
    );

    // A volume that does not exist: not fenced, with the CLI's words.
    let missing = FenceDevice::new(
        p.clone(),
        vec![
            ("volume".into(), "no-such-volume".into()),
            ("plug".into(), "10.99.0.5".into()),
        ],
    )
    .unwrap();
    match missing.fence(FenceAction::Off).await {
        FenceOutcome::NotFenced { reason } => {
            assert!(reason.contains("no-such-volume"), "{reason}")
        }
        o => panic!("{o:?}"),
    }
    drop(g);
}

//! The `glusterfs-fence` plugin against a real GlusterFS (Debian's glusterfs-server:
//! `glusterd -p PIDFILE` started by the test, a replica-2 volume on two local bricks
//! named by the host's name, created with `force`), its gluster calls going through the
//! host's `exec` capability as the templates an operator would grant: monitor sees the
//! bricks online and a killed brick, fence cuts an address off (`auth.reject`, read back
//! with the gluster CLI itself), unfence lets it back, and status follows. Needs root
//! (glusterd).
//!
//! And a real client cut off: two FUSE clients, each mounting from its own network
//! namespace (so the server sees each one's own address); fencing one makes its I/O
//! fail while the other's goes on, and unfencing lets it back.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use trellis::points::fence::{FenceDevice, FenceOutcome};
use trellis::wit::fence_agent::{FenceAction, PowerState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_fencing_cuts_an_address_off_the_volume_and_lets_it_back() {
    let _one = GLUSTER_LOCK.lock().await;
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let g = Gluster::start(dir, &Gluster::hostname(), &[]);
    let volume = g.volume.clone();
    let rt = runtime(
        &format!("[plugins.glusterfs-fence]\n{GLUSTER_TEMPLATES}"),
        dir,
        &[],
    );
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

    // The conformance kit passes it too, on this volume.
    let kit_cfg = dir.join("kit.toml");
    std::fs::write(
        &kit_cfg,
        format!("[plugins.glusterfs-fence]\n{GLUSTER_TEMPLATES}"),
    )
    .unwrap();
    let out = trellis()
        .args(["plugin", "test"])
        .arg(bundle().join("glusterfs-fence"))
        .arg("--config")
        .arg(&kit_cfg)
        .args([
            "--param",
            &format!("volume={volume}"),
            "--param",
            "plug=10.99.0.7",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(
        out.status.success() && text.contains(" passed, 0 failed"),
        "{text}"
    );
    drop(g);
}

/// Write `text` to `path` through a mount, giving up after `secs` (a cut-off FUSE client
/// blocks until its ping timeout): Ok, or the error the writer saw.
fn write_within(path: &Path, text: &str, secs: u32) -> Result<(), String> {
    let out = Command::new("timeout")
        .arg(secs.to_string())
        .args(["sh", "-c", "printf %s \"$1\" > \"$2\"", "sh", text])
        .arg(path)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "exit {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_client_loses_its_storage_while_the_other_keeps_it() {
    let _one = GLUSTER_LOCK.lock().await;
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let storage = HostAddress::create("10.213.9.1").expect("an address on lo (root)");
    let ns_a = Netns::create("ga", 4).expect("a network namespace (root)");
    let ns_b = Netns::create("gb", 5).expect("a network namespace (root)");
    let g = Gluster::start(dir, &storage.ip, &[("network.ping-timeout", "5")]);
    let (ma, mb) = (dir.join("mount-a"), dir.join("mount-b"));
    g.mount(Some(&ns_a), &ma, &dir.join("client-a.log"))
        .unwrap();
    g.mount(Some(&ns_b), &mb, &dir.join("client-b.log"))
        .unwrap();
    write_within(&ma.join("from-a"), "a1", 30).unwrap();
    write_within(&mb.join("from-b"), "b1", 30).unwrap();
    assert_eq!(std::fs::read_to_string(mb.join("from-a")).unwrap(), "a1");

    let rt = runtime(
        &format!("[plugins.glusterfs-fence]\n{GLUSTER_TEMPLATES}"),
        dir,
        &[],
    );
    let p = rt.load(&bundle().join("glusterfs-fence")).await.unwrap();
    let node_a = FenceDevice::new(
        p.clone(),
        vec![
            ("volume".into(), g.volume.clone()),
            ("plug".into(), ns_a.ns_ip.clone()),
        ],
    )
    .unwrap();
    let t = Instant::now();
    assert_eq!(node_a.fence(FenceAction::Off).await, FenceOutcome::Fenced);
    let fenced_in = t.elapsed();
    // A's I/O fails (after its ping timeout at most); B's goes on meanwhile.
    let ma2 = ma.clone();
    let cut = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        loop {
            match write_within(&ma2.join("late"), "late write from a", 40) {
                Err(e) => return (t.elapsed(), e),
                Ok(()) => {
                    assert!(t.elapsed() < Duration::from_secs(60), "A can still write");
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    })
    .await
    .unwrap();
    eprintln!(
        "storage fencing: auth.reject set in {fenced_in:?}; A's write failed {:?} later ({})",
        cut.0, cut.1
    );
    write_within(&mb.join("from-b"), "b2", 30).expect("B keeps its storage");
    assert_eq!(std::fs::read_to_string(mb.join("from-b")).unwrap(), "b2");
    assert!(
        std::fs::read_to_string(mb.join("late")).map_or(true, |t| t != "late write from a"),
        "A's write after the fence did not land"
    );

    // Unfenced, A's client reconnects on its own.
    assert_eq!(node_a.fence(FenceAction::On).await, FenceOutcome::Fenced);
    let t = Instant::now();
    while write_within(&ma.join("back"), "a is back", 20).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "A did not get its storage back"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    eprintln!("storage unfenced: A wrote again {:?} later", t.elapsed());
    assert_eq!(
        std::fs::read_to_string(mb.join("back")).unwrap(),
        "a is back"
    );
    drop(g);
}

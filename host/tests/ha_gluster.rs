//! Issue 7 with the controllers' shared state on GlusterFS, as the seed's Jenkins
//! cluster has it: one replica-2 volume, mounted with FUSE by each controller; the
//! active one (A) runs in a network namespace the test creates and mounts from there,
//! so the volume sees its own address. The standby (B) fences A through two levels:
//! Redfish first (its BMC is down here, so that level fails), then storage fencing
//! with glusterfs-fence (`auth.reject` for A's address). Real etcd ×3, Apache Kafka, glusterd.
//!
//! A is cut off from etcd (nftables inside its namespace) with a run in flight. What
//! must hold: A stops by itself; B falls through to level 2 and takes over only once
//! it confirmed; A's mount of the state is cut (a write through it fails); the run
//! completes under B from the same state, every line once; `cluster status` names the
//! level that fenced A and why level 1 failed.
//!
//! (B mounts from the host's own network rather than a second namespace: it is never
//! fenced here, and what storage fencing needs is that the fenced node has an address
//! of its own.) Needs root.

mod common;

use common::*;
use std::time::Duration;

const LINES: u64 = 300;

#[test]
fn the_standby_falls_through_to_storage_fencing_and_takes_over_on_glusterfs() {
    let _one = GLUSTER_LOCK.blocking_lock();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let storage = HostAddress::create("10.213.9.1").expect("an address on lo (root)");
    let ns = Netns::create("hg", 6).expect("a network namespace (root)");
    let gluster = Gluster::start(dir, &storage.ip, &[("network.ping-timeout", "5")]);
    let (state_a, state_b) = (dir.join("state-a"), dir.join("state-b"));
    gluster
        .mount(Some(&ns), &state_a, &dir.join("client-a.log"))
        .unwrap();
    gluster
        .mount(None, &state_b, &dir.join("client-b.log"))
        .unwrap();
    std::fs::create_dir_all(state_a.join("logs")).unwrap();
    assert!(state_b.join("logs").is_dir(), "one volume, seen by both");

    let etcd = EtcdCluster::start_also_on(dir, Some(&ns.host_ip));
    let broker = Kafka::start_at(&ns.host_ip);
    let transport = Transport::Kafka {
        brokers: broker.brokers(),
    };
    let dead_bmc = free_port();
    let (cfg_a, cfg_b, agent_cfg, http_a, http_b) =
        ha_configs(dir, &transport, &etcd, Bmc::Dead(dead_bmc));
    // Each controller's state on its own mount of the volume; A in its namespace.
    let edit = |path: &std::path::Path, state: &str, f: &dyn Fn(String) -> String| {
        let text = std::fs::read_to_string(path)
            .unwrap()
            .replace("state-dir = \"state\"", &format!("state-dir = \"{state}\""))
            .replace("\"state/logs\"", &format!("\"{state}/logs\""));
        std::fs::write(path, f(text)).unwrap();
    };
    edit(&cfg_a, "state-a", &|text| text);
    let server_a = config_in_netns(&cfg_a, http_a, &ns, &etcd);
    // B's fencing of A: Redfish (down), then storage.
    edit(&cfg_b, "state-b", &|text| {
        let (head, tail) = text.split_once("[ha.fencing.a]\n").unwrap();
        let redfish = tail.lines().next().unwrap();
        let redfish = redfish
            .strip_prefix("levels = [[")
            .and_then(|l| l.strip_suffix("]]"))
            .unwrap();
        format!(
            "[plugins.glusterfs-fence]\n{GLUSTER_TEMPLATES}\n{head}[ha.fencing.a]\nlevels = [[{redfish}], [{{ plugin = \"glusterfs-fence\", params = {{ volume = \"{}\", plug = \"{}\" }} }}]]\n",
            gluster.volume, ns.ns_ip
        )
    });
    // The API tokens live on the shared volume too.
    let token = create_token(&cfg_b, "gluster-admin", "admin");
    use_token(http_a, &token);
    use_token(http_b, &token);
    let server_b = format!("http://127.0.0.1:{http_b}");
    let daemon_log = dir.join("daemons.log");
    let logs = || std::fs::read_to_string(&daemon_log).unwrap_or_default();
    let mut a = start_in(&ns, "controller", &cfg_a, &daemon_log);
    wait_for_line(&daemon_log, "trellis ha: a active", Duration::from_secs(30));
    let _b = start("controller", &cfg_b, &daemon_log);
    let _agent = start("agent", &agent_cfg, &daemon_log);
    wait_for_agent(&server_a, &daemon_log);
    let run = start_counting_run(dir, &server_a, LINES);
    assert!(
        state_b.join("runs").is_dir(),
        "A's run state is on the volume B sees"
    );

    let probe = |name: &str| {
        std::process::Command::new("timeout")
            .args(["30", "sh", "-c", "echo probe > \"$1\"", "sh"])
            .arg(state_a.join(name))
            .status()
            .unwrap()
            .success()
    };
    assert!(probe("before"), "A's mount takes writes before the fencing");
    ns.cut(&etcd.ports()).unwrap();
    wait_for_line(&daemon_log, "trellis ha: b active", Duration::from_secs(90));
    wait_until("A did not exit", Duration::from_secs(10), || {
        a.0.try_wait().unwrap().is_some()
    });
    let log = logs();
    assert!(log.contains("trellis ha: fenced a at level 2"), "{log}");
    // A's mount of the state is cut off: a write through it fails.
    assert!(!probe("zombie-write"), "A's storage is fenced");
    assert!(!state_b.join("zombie-write").exists());
    assert!(state_b.join("before").exists());

    // The run completes under B, from the same state, every line once.
    assert_run_whole(&server_b, run, LINES, &daemon_log);
    let (code, out, err) = cli(&server_b, &["cluster", "status"]);
    eprintln!("{out}{err}");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("a: fenced at level 2"), "{out}");
    let status = http_get(http_b, "/api/cluster");
    assert!(
        status.contains("\"level\":1") && status.contains("redfish-fence#1"),
        "the failed level-1 try is reported: {status}"
    );
}

//! The headline of issue 7: active/passive controllers. Real parts throughout: a
//! three-member etcd (Debian's etcd-server) holds the leader lease, an Apache Kafka
//! broker carries controller/agent traffic, the sushy-tools emulator is the active
//! node's BMC (redfish-fence over HTTPS), and controllers and agent are processes.
//!
//! A job runs on the agent; the active controller is SIGKILLed mid-step. The standby
//! sees the lease expire, fences the old active through Redfish (the emulator shows
//! the system off), takes over with a newer fencing token, and the run completes with
//! a complete log. Failover is measured in three parts from the standby's own log
//! lines: detection (death → key seen vacant), fencing (→ device confirmed), takeover
//! (→ serving). Both controllers share one state directory (a local one here;
//! `ha_gluster.rs` runs them on a GlusterFS volume with storage fencing).

mod common;

use common::*;
use std::time::Duration;

const LINES: u64 = 400;

/// One HA test at a time: each starts three etcd members, a broker, an emulator and
/// controller processes; three at once on a 2-core machine kept etcd from forming a
/// cluster within a minute once.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn the_standby_fences_the_dead_active_takes_over_and_the_run_completes() {
    let _one = one_at_a_time();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let etcd = EtcdCluster::start(dir);
    let broker = Kafka::start();
    let sushy = Sushy::start(dir);
    let transport = Transport::Kafka {
        brokers: broker.brokers(),
    };
    let (cfg_a, cfg_b, agent_cfg, http_a, http_b) =
        ha_configs(dir, &transport, &etcd, Bmc::Emulator(&sushy));
    let server_a = format!("http://127.0.0.1:{http_a}");
    let server_b = format!("http://127.0.0.1:{http_b}");
    let daemon_log = dir.join("daemons.log");
    let logs = || std::fs::read_to_string(&daemon_log).unwrap_or_default();

    let mut a = start("controller", &cfg_a, &daemon_log);
    wait_for_line(&daemon_log, "trellis ha: a active", Duration::from_secs(30));
    let _b = start("controller", &cfg_b, &daemon_log);
    let _agent = start("agent", &agent_cfg, &daemon_log);
    wait_for_agent(&server_a, &daemon_log);
    // The active node's BMC: its system is on.
    let power = |action: &str| bmc_power(&sushy, action);
    assert_eq!(power("on"), Some(0));
    // Both controllers answer `trellis cluster status`: A active, B standing by.
    let servers = ["--server", &server_a, "--server", &server_b];
    let status = || {
        let (code, out, err) = cli(&server_a, &[&["cluster", "status"][..], &servers].concat());
        (code, format!("{out}{err}"))
    };
    wait_until("B did not report standby", Duration::from_secs(10), || {
        status()
            .1
            .lines()
            .any(|l| l.starts_with("b ") && l.contains("standby"))
    });
    let (code, text) = status();
    assert_eq!(code, 0, "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("a ") && l.contains("active")),
        "{text}"
    );
    assert!(
        text.contains("leader key trellis/leader: held by a"),
        "{text}"
    );
    assert_eq!(
        http_get_status(http_b, "/api/runs").0,
        503,
        "a standby does not serve the API"
    );

    let run = start_counting_run(dir, &server_a, LINES);
    // A second run waits for the agent's one executor: queued, it must survive the
    // failover too, and run under B once the first ends.
    let queued_job = dir.join("queued.toml");
    std::fs::write(
        &queued_job,
        "name = \"waits\"\nagent = \"linux\"\n[[step]]\nname = \"s\"\nrun = \"echo ran after the failover\"\n",
    )
    .unwrap();
    let (code, queued, err) = cli(&server_a, &["run", queued_job.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("queued"), "{err}");
    let queued = queued.trim().to_string();
    let killed_at = trellis::protocol::now_ms();
    a.0.kill().unwrap(); // SIGKILL mid-step
    a.0.wait().unwrap();

    wait_for_line(&daemon_log, "trellis ha: b active", Duration::from_secs(60));
    assert_eq!(
        power("status"),
        Some(2),
        "the old active's system is off (fenced)"
    );
    let log = logs();
    let vacant = stamp(&log, "b saw", "vacant_at_ms").expect("vacant stamp");
    let fenced = stamp(&log, "fenced a", "fenced_at_ms").expect("fenced stamp");
    let serving = stamp(&log, "b active", "serving_at_ms").expect("serving stamp");
    let (detection, fencing, takeover) = (vacant - killed_at, fenced - vacant, serving - fenced);
    eprintln!(
        "failover: detection {detection} ms, fencing {fencing} ms (the BMC's own time), takeover {takeover} ms, total {} ms",
        serving - killed_at
    );
    // The target (detection + takeover ≤ 2 s with a 1 s lease) is measured and recorded
    // in docs/PERFORMANCE.md; the test only bounds it loosely, as a loaded CI machine
    // may be slow.
    assert!(
        detection + takeover <= 5000,
        "detection + takeover {} ms",
        detection + takeover
    );

    // B says so, with the fencing that let it: `cluster status` and its metrics.
    let (code, text) = status();
    assert_eq!(code, 0, "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("b ")
            && l.contains("active")
            && l.contains("a: fenced at level 1")),
        "{text}"
    );
    assert!(text.contains("unreachable"), "A is gone: {text}");
    let metrics = http_get(http_b, "/metrics");
    assert!(
        metrics.contains("trellis_ha_role{name=\"b\",role=\"active\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("trellis_ha_fencings_total{result=\"fenced\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("trellis_ha_last_failover_seconds{part=\"takeover\"}"),
        "{metrics}"
    );

    // The run completes under B, its log whole; then the queued one runs.
    assert_run_whole(&server_b, run, LINES, &daemon_log);
    wait_for_success(&server_b, &queued, Duration::from_secs(60), &daemon_log);
    let (code, out, _) = cli(&server_b, &["logs", &queued]);
    assert_eq!((code, out.as_str()), (0, "ran after the failover\n"));
    // The state directory knows B's token is the newest.
    let token: u64 = std::fs::read_to_string(dir.join("state/fencing-token"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(token > 0);
}

/// No takeover without fencing: the standby's only fence device cannot reach the old
/// active's BMC, so when the active dies the standby says so and does not serve.
#[test]
fn a_standby_that_cannot_fence_does_not_take_over() {
    let _one = one_at_a_time();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let etcd = EtcdCluster::start(dir);
    let dead_bmc = free_port(); // nothing listens there
    let transport = Transport::Tcp { port: free_port() };
    let (cfg_a, cfg_b, _agent_cfg, _, http_b) =
        ha_configs(dir, &transport, &etcd, Bmc::Dead(dead_bmc));
    let daemon_log = dir.join("daemons.log");
    let logs = || std::fs::read_to_string(&daemon_log).unwrap_or_default();
    // and it keeps not taking over
    let _b = active_dies_standby_cannot_fence(&cfg_a, &cfg_b, &daemon_log, Duration::from_secs(3));
    assert!(!logs().contains("trellis ha: b active"), "{}", logs());
    // It serves no API, and says why where operators look: status, API, metrics.
    let (code, runs) = http_get_status(http_b, "/api/runs");
    assert_eq!(code, 503, "{runs}");
    assert!(runs.contains("not-taking-over"), "{runs}");
    let server_b = format!("http://127.0.0.1:{http_b}");
    let (code, out, err) = cli(&server_b, &["cluster", "status"]);
    eprintln!("trellis cluster status:\n{out}{err}");
    assert_eq!(code, 1, "no controller is active: {out}{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("b "))
        .unwrap_or_default();
    assert!(line.contains("not-taking-over"), "{out}");
    assert!(
        line.contains("a: not fenced: level 1 `redfish-fence#1`"),
        "the reason names the device: {out}"
    );
    assert!(out.contains("leader key trellis/leader: vacant"), "{out}");
    let metrics = http_get(http_b, "/metrics");
    assert!(
        metrics.contains("trellis_ha_role{name=\"b\",role=\"not-taking-over\"} 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("trellis_ha_fencings_total{result=\"failed\"} 0"),
        "{metrics}"
    );
}

/// A zombie: the active is paused (SIGSTOP: a VM freeze, a long GC), its lease expires,
/// the standby fences it (the emulator's power-off cannot stop a process on this
/// machine: this is the case of a fencing that did not take, which the token exists
/// for) and takes over. When the old active wakes, it learns at once that its lease is
/// gone, and its one late write to the shared state is refused by the token gate.
#[test]
fn a_paused_active_wakes_to_find_its_late_write_refused() {
    let _one = one_at_a_time();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let etcd = EtcdCluster::start(dir);
    let sushy = Sushy::start(dir);
    // Kafka: both controllers can serve it (with TCP, the paused one would still hold
    // the port the new active must bind).
    let broker = Kafka::start();
    let transport = Transport::Kafka {
        brokers: broker.brokers(),
    };
    let (cfg_a, cfg_b, _agent_cfg, _, _) =
        ha_configs(dir, &transport, &etcd, Bmc::Emulator(&sushy));
    let daemon_log = dir.join("daemons.log");
    let logs = || std::fs::read_to_string(&daemon_log).unwrap_or_default();
    let mut a = start("controller", &cfg_a, &daemon_log);
    wait_for_line(&daemon_log, "trellis ha: a active", Duration::from_secs(30));
    let _b = start("controller", &cfg_b, &daemon_log);
    assert_eq!(bmc_power(&sushy, "on"), Some(0));
    std::thread::sleep(Duration::from_secs(1));
    let pid = a.0.id() as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };

    wait_for_line(&daemon_log, "trellis ha: b active", Duration::from_secs(60));
    unsafe { libc::kill(pid, libc::SIGCONT) };
    wait_for_line(
        &daemon_log,
        "trellis ha: a stepped down",
        Duration::from_secs(20),
    );
    wait_until("A did not exit", Duration::from_secs(10), || {
        a.0.try_wait().unwrap().is_some()
    });
    let log = logs();
    assert!(
        log.contains(
            "trellis ha: a stepped down (lease lost); its late write was refused (1 refused)"
        ),
        "{log}"
    );
    assert!(
        log.contains("is older than"),
        "the refusal names the tokens: {log}"
    );
    // The shared state still holds A's record from when it was active, and B's.
    let rec = |n: &str| -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("state/cluster/{n}.json"))).unwrap(),
        )
        .unwrap()
    };
    let (ra, rb) = (rec("a"), rec("b"));
    assert_eq!(ra["role"], "active", "A's late write did not land: {ra}");
    assert_eq!(rb["role"], "active", "{rb}");
    assert!(ra["token"].as_u64() < rb["token"].as_u64());
}

//! Issue 7's partition: the active controller runs in a network namespace the test
//! creates, and an nftables rule inside it drops everything it sends to etcd, while it
//! still reaches Kafka, its agent and the shared state. Real etcd ×3, Apache Kafka, sushy and
//! controller processes, as in `ha_failover.rs`.
//!
//! What must hold: the active notices it cannot renew its lease and stops acting by
//! itself, no later than the lease's TTL after the cut (its last write, a step-down
//! record, lands before anyone else's); the standby takes over only after fencing it
//! (the emulator shows the power-off), with a newer token; the run in flight completes
//! under the new active with every line once; and the shared state shows no write of
//! the old token after the new one's first.
//!
//! Needs root (namespaces, nftables), as CI has.

mod common;

use common::*;
use std::time::Duration;

const LINES: u64 = 400;

fn record(dir: &std::path::Path, name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join(format!("state/cluster/{name}.json")))
        .unwrap_or_else(|e| panic!("state/cluster/{name}.json: {e}"));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn an_active_cut_off_from_etcd_stops_by_itself_and_the_standby_fences_before_taking_over() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let ns = Netns::create("pa", 1).expect("a network namespace (the test needs root)");
    let etcd = EtcdCluster::start_also_on(dir, Some(&ns.host_ip));
    let broker = Kafka::start_at(&ns.host_ip);
    let sushy = Sushy::start(dir);
    let transport = Transport::Kafka {
        brokers: broker.brokers(),
    };
    let (cfg_a, cfg_b, agent_cfg, http_a, http_b) =
        ha_configs(dir, &transport, &etcd, Bmc::Emulator(&sushy));
    // A lives in the namespace: etcd and its API through the veth.
    let server_a = config_in_netns(&cfg_a, http_a, &ns, &etcd);
    let server_b = format!("http://127.0.0.1:{http_b}");
    let daemon_log = dir.join("daemons.log");
    let logs = || std::fs::read_to_string(&daemon_log).unwrap_or_default();
    let mut a = start_in(&ns, "controller", &cfg_a, &daemon_log);
    wait_for_line(&daemon_log, "trellis ha: a active", Duration::from_secs(30));
    let _b = start("controller", &cfg_b, &daemon_log);
    let _agent = start("agent", &agent_cfg, &daemon_log);
    wait_for_agent(&server_a, &daemon_log);
    assert_eq!(bmc_power(&sushy, "on"), Some(0));
    let run = start_counting_run(dir, &server_a, LINES);

    let cut_at = trellis::protocol::now_ms();
    ns.cut(&etcd.ports()).unwrap();

    wait_for_line(
        &daemon_log,
        "trellis ha: a stepped down",
        Duration::from_secs(20),
    );
    wait_until("A did not exit", Duration::from_secs(10), || {
        a.0.try_wait().unwrap().is_some()
    });
    wait_for_line(&daemon_log, "trellis ha: b active", Duration::from_secs(60));
    let log = logs();
    let stepped_down = stamp(&log, "a stepped down", "stepped_down_at_ms").expect("A's stamp");
    let vacant = stamp(&log, "b saw", "vacant_at_ms").expect("vacant stamp");
    let fenced = stamp(&log, "fenced a", "fenced_at_ms").expect("fenced stamp");
    let serving = stamp(&log, "b active", "serving_at_ms").expect("serving stamp");
    eprintln!(
        "partition: A stopped {} ms after the cut; B saw the key vacant {} ms after the cut, fenced A {} ms later, served {} ms after that",
        stepped_down - cut_at,
        vacant - cut_at,
        fenced - vacant,
        serving - fenced
    );
    // A's own write went through: nobody newer had written yet.
    assert!(
        log.contains("trellis ha: a stepped down (lease lost), recorded with token"),
        "{log}"
    );
    // A stopped within its lease of the last renewal before the cut, plus one renewal
    // interval and scheduling slack: before etcd could have let B in.
    assert!(
        stepped_down - cut_at <= LEASE_TTL_MS + 1_000,
        "A stopped {} ms after the cut",
        stepped_down - cut_at
    );
    assert!(stepped_down < fenced, "A stopped before B fenced it");
    assert!(fenced < serving, "no takeover before fencing");
    assert_eq!(bmc_power(&sushy, "status"), Some(2), "A's node is off");

    // The shared state: A's last record (stepped down) comes before B's first, and the
    // newest token is B's.
    let (ra, rb) = (record(dir, "a"), record(dir, "b"));
    assert_eq!(ra["role"], "stepped-down", "{ra}");
    assert_eq!(rb["role"], "active", "{rb}");
    assert!(ra["token"].as_u64() < rb["token"].as_u64(), "{ra} {rb}");
    assert!(
        ra["at_ms"].as_i64() < rb["at_ms"].as_i64(),
        "no write of A's token after B's first: {ra} {rb}"
    );
    let newest: u64 = std::fs::read_to_string(dir.join("state/fencing-token"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(Some(newest), rb["token"].as_u64());

    // The run completes under B, every line once.
    assert_run_whole(&server_b, run, LINES, &daemon_log);

    // `cluster status` from the survivor's side.
    let (code, out, err) = cli(
        &server_b,
        &[
            "cluster", "status", "--server", &server_b, "--server", &server_a,
        ],
    );
    eprintln!("{out}{err}");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("a: fenced at level 1"), "{out}");
    assert!(out.contains("held by b"), "{out}");
}

//! The Kafka transport on a three-broker Apache Kafka 4.4 cluster (KRaft, replication
//! factor 3, `min.insync.replicas=2`; the host's producer uses `acks=all`): a controller
//! and an agent run a job whose output keeps flowing while brokers go away, and the run
//! ends with every line stored once, in order.
//!
//! - SIGKILL of the broker leading the agent's partitions, mid-run (it stays down);
//! - a rolling restart of all three brokers, one after the other, during a run.

mod common;

use common::*;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis::controller::state::RunStatus;
use trellis::controller::{Controller, ControllerConfig};
use trellis::jobs::Job;
use trellis::runtime::Plugin;

/// The topics of the agent's link; the bulk partition (1) of the first carries its log.
const AGENT_TOPICS: [&str; 2] = ["trellis.agent-1.to-controller", "trellis.agent-1.to-agent"];

/// One test at a time: each runs three broker JVMs, and a test machine may have 2 cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A controller and an agent over kafka-transport on `brokers`, in `dir`.
async fn controller_and_agent(
    dir: &Path,
    brokers: &str,
) -> (Arc<Controller>, tokio::sync::watch::Sender<bool>) {
    test_log();
    let rt = kafka_runtime(dir, brokers, "trellis.");
    let kafka: Arc<Plugin> = rt.load(&bundle().join("kafka-transport")).await.unwrap();
    let logging = rt.load(&bundle().join("file-logging")).await.unwrap();
    let c = Controller::start(
        ControllerConfig {
            instance_id: "kafka-cluster-test".into(),
            state_dir: dir.join("state"),
            agents: [("agent-1".to_string(), "agent-secret".to_string())].into(),
            secrets: Default::default(),
            heartbeat: Duration::from_millis(500),
            agent_lost_after: Duration::from_secs(60),
            log_buffer_limit: trellis::controller::DEFAULT_LOG_BUFFER_LIMIT,
            multiline_start: None,
            fencing_token: 0,
            retention: Default::default(),
        },
        kafka.clone(),
        logging,
    )
    .await
    .unwrap();
    let stop_tx = spawn_agent(kafka, dir, "agent-secret");
    // The first link creates the agent's topics on three brokers: longer than
    // `wait_connected` allows on a loaded machine.
    let t = Instant::now();
    while c.connected_agents().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the agent did not connect within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (c, stop_tx)
}

/// A job printing numbered lines, 100 at a time, until `stop` exists.
fn until_stopped(stop: &Path) -> Job {
    Job::parse(
        &format!(
            "name = \"flow\"\nagent = \"linux\"\n[[step]]\nname = \"lines\"\nrun = \"i=0; while [ ! -e {} ]; do seq $((i*100+1)) $((i*100+100)); i=$((i+1)); sleep 0.2; done\"\n",
            stop.display()
        ),
        "job.toml",
    )
    .unwrap()
}

/// Wait until run `id` has stored more than `events` events.
async fn wait_for_more(c: &Controller, id: &str, events: u64, what: &str) -> u64 {
    let t = Instant::now();
    loop {
        let r = c.run(id).unwrap();
        assert!(!r.status.is_final(), "the run ended early ({what}): {r:?}");
        if r.events > events {
            return r.events;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no more output within 120 s {what} (still {events} events)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stop the job, wait for the run's end and check its log: lines 1..=N, each once, in
/// order, N a whole number of the job's 100-line waves.
async fn finish_and_check(c: &Controller, dir: &Path, id: &str, stop: &Path) {
    std::fs::write(stop, "").unwrap();
    let r = wait_final(c, id, Duration::from_secs(180)).await;
    assert_eq!(r.status, RunStatus::Succeeded, "{r:?}");
    let text = std::fs::read_to_string(dir.join(format!("state/logs/flow/{id}.jsonl"))).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len() as u64,
        r.events,
        "the record's count and the log agree"
    );
    assert!(
        !lines.is_empty() && lines.len().is_multiple_of(100),
        "{} lines",
        lines.len()
    );
    for (i, l) in lines.iter().enumerate() {
        let n = i + 1;
        assert!(
            l.contains(&format!("\"seq\":{n},")) && l.contains(&format!("\"message\":\"{n}\"")),
            "line {n} of {}: {l}",
            lines.len()
        );
    }
    eprintln!("the run stored {} lines, each once, in order", lines.len());
}

/// Wait until every partition of the agent's topics has all three replicas in sync
/// (the metadata requests block: off the runtime's workers).
fn wait_in_sync(cluster: &Kafka) {
    tokio::task::block_in_place(|| {
        let t = Instant::now();
        while !AGENT_TOPICS.iter().all(|topic| cluster.in_sync(topic)) {
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "the agent's topics did not get back in sync within 120 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_partition_leader_mid_run_loses_and_repeats_no_line() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut cluster = Kafka::cluster();
    let d = tempfile::tempdir().unwrap();
    let (c, _agent) = controller_and_agent(d.path(), &cluster.brokers()).await;
    let stop = d.path().join("stop");
    let run = c.submit(&until_stopped(&stop)).unwrap();
    let events = wait_for_more(&c, &run.id, 0, "before the kill").await;

    // The agent's topics are replicated on all three (the host asks for the cluster's
    // default replication factor), and in sync before one goes.
    for topic in AGENT_TOPICS {
        let replicas = tokio::task::block_in_place(|| cluster.replicas(topic));
        assert_eq!(replicas, vec![3, 3], "{topic}'s replicas");
    }
    wait_in_sync(&cluster);
    let leader = tokio::task::block_in_place(|| cluster.leader_of(AGENT_TOPICS[0], 1))
        .expect("the log partition has a leader");
    eprintln!("SIGKILL of broker {leader}, the leader of the agent's log partition");
    tokio::task::block_in_place(|| cluster.kill(leader));

    // Another broker takes the partition over, and output keeps arriving through it.
    let t = Instant::now();
    while tokio::task::block_in_place(|| cluster.leader_of(AGENT_TOPICS[0], 1))
        .is_none_or(|l| l == leader)
    {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no new leader within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = c.run(&run.id).unwrap().events.max(events);
    let after = wait_for_more(&c, &run.id, after, "after the kill").await;
    wait_for_more(&c, &run.id, after + 500, "after the kill").await;
    finish_and_check(&c, d.path(), &run.id, &stop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_all_three_brokers_mid_run_loses_and_repeats_no_line() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut cluster = Kafka::cluster();
    let d = tempfile::tempdir().unwrap();
    let (c, _agent) = controller_and_agent(d.path(), &cluster.brokers()).await;
    let stop = d.path().join("stop");
    let run = c.submit(&until_stopped(&stop)).unwrap();
    let mut events = wait_for_more(&c, &run.id, 0, "before the restarts").await;
    for i in 0..cluster.len() {
        // One broker at a time, as an operator does: the next only once every replica
        // is back in sync.
        wait_in_sync(&cluster);
        eprintln!("restarting broker {i}");
        tokio::task::block_in_place(|| cluster.stop(i));
        events = wait_for_more(&c, &run.id, events, &format!("while broker {i} is down")).await;
        tokio::task::block_in_place(|| cluster.start_again(i));
        events = wait_for_more(&c, &run.id, events, &format!("after broker {i} is back")).await;
    }
    finish_and_check(&c, d.path(), &run.id, &stop).await;
}

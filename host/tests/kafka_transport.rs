//! The Kafka command transport end to end, on a real Apache Kafka 4.4 broker (started
//! here on loopback, see common/kafka.rs): the host's `kafka` capability, the `kafka-transport`
//! plugin, a controller and an agent running a job through the topics, and an
//! independent client (kafka-python) reading a step's output off them.

mod common;

use common::*;
use std::sync::Arc;
use std::time::Duration;
use trellis::controller::state::RunStatus;
use trellis::controller::{Controller, ControllerConfig};
use trellis::jobs::Job;
use trellis::runtime::{Plugin, Runtime};
use trellis::wit::log_browser::PageRequest;
use trellis_sdk::events::decode;

async fn controller(
    rt: &Arc<Runtime>,
    dir: &std::path::Path,
    kafka: Arc<Plugin>,
) -> Arc<Controller> {
    let agents = [("agent-1".to_string(), "agent-secret".to_string())].into();
    controller_for(rt, dir, kafka, agents).await
}

/// A controller over `kafka` accepting `agents` (name -> secret).
async fn controller_for(
    rt: &Arc<Runtime>,
    dir: &std::path::Path,
    kafka: Arc<Plugin>,
    agents: std::collections::HashMap<String, String>,
) -> Arc<Controller> {
    let logging = rt.load(&bundle().join("file-logging")).await.unwrap();
    Controller::start(
        ControllerConfig {
            instance_id: "kafka-test".into(),
            state_dir: dir.join("state"),
            agents,
            secrets: Default::default(),
            heartbeat: Duration::from_millis(500),
            agent_lost_after: Duration::from_secs(30),
            log_buffer_limit: trellis::controller::DEFAULT_LOG_BUFFER_LIMIT,
            multiline_start: None,
            fencing_token: 0,
            retention: Default::default(),
        },
        kafka,
        logging,
    )
    .await
    .unwrap()
}

/// A controller and an agent over `rt`'s kafka-transport run one job `name` whose one
/// step runs `script`; the run, finished and succeeded.
async fn run_one_job(
    rt: &Arc<Runtime>,
    dir: &std::path::Path,
    name: &str,
    script: &str,
    within: Duration,
) -> trellis::controller::state::RunRecord {
    let kafka = rt.load(&bundle().join("kafka-transport")).await.unwrap();
    let c = controller(rt, dir, kafka.clone()).await;
    let _stop = spawn_agent(kafka, dir, "agent-secret");
    wait_connected(&c).await;
    let job = Job::parse(
        &format!(
            "name = \"{name}\"\nagent = \"linux\"\n[[step]]\nname = \"s\"\nrun = \"{script}\"\n"
        ),
        "job.toml",
    )
    .unwrap();
    let run = c.submit(&job).unwrap();
    let r = wait_final(&c, &run.id, within).await;
    assert_eq!(r.status, RunStatus::Succeeded, "{r:?}");
    r
}

/// The first 10,000 events of run `run` of `job` (this file's controllers' instance id),
/// as a packed event batch.
async fn whole_log(reader: &trellis::points::browser::LogReader, job: &str, run: &str) -> Vec<u8> {
    let meta = trellis::wit::types::LogMetadata {
        instance_id: "kafka-test".into(),
        ..meta(job, run)
    };
    let request = PageRequest {
        step: None,
        cursor: None,
        limit: 10_000,
    };
    reader.read(&meta, request).await.unwrap().events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_over_kafka_and_its_output_is_readable_on_the_topics() {
    let broker = Kafka::start();
    let d = tempfile::tempdir().unwrap();
    let rt = kafka_runtime(d.path(), &broker.brokers(), "trellis.");
    let kafka = rt.load(&bundle().join("kafka-transport")).await.unwrap();
    let c = controller(&rt, d.path(), kafka.clone()).await;
    let _stop = spawn_agent(kafka, d.path(), "agent-secret");
    wait_connected(&c).await;

    let job = Job::parse(
        r#"
        name = "over-kafka"
        agent = "linux"
        [[step]]
        name = "hello"
        run = "echo hello-from-kafka; seq 1 3000"
        [[step]]
        name = "bye"
        run = "echo bye"
        "#,
        "job.toml",
    )
    .unwrap();
    let run = c.submit(&job).unwrap();
    let r = wait_final(&c, &run.id, Duration::from_secs(60)).await;
    assert_eq!(r.status, RunStatus::Succeeded, "{r:?}");
    assert_eq!(r.events, 3002);

    let reader = trellis::points::browser::LogReader::new(
        rt.load(&bundle().join("file-browser")).await.unwrap(),
    )
    .unwrap();
    let page = whole_log(&reader, "over-kafka", &run.id).await;
    let events = decode(&page).unwrap();
    let texts: Vec<&str> = events.iter().map(|e| e.message).collect();
    assert_eq!(texts[0], "hello-from-kafka");
    assert!((1..=3000).all(|i| texts[i] == i.to_string()));
    assert_eq!(texts[3001], "bye");

    // An independent client sees the agent's frames on its bulk partition, with the
    // frame headers the docs describe, and sealed: the step's output is not in clear.
    let script = format!(
        r#"
import sys
from kafka import KafkaConsumer, TopicPartition
c = KafkaConsumer(bootstrap_servers="{}", consumer_timeout_ms=5000)
tp = TopicPartition("trellis.agent-1.to-controller", 1)
c.assign([tp]); c.seek_to_beginning(tp)
found = None
for m in c:
    h = dict(m.headers)
    if b"hello-from-kafka" in m.value:
        print("in clear"); sys.exit(1)
    link, lane, seq, piece = h["trellis-frame"].decode().split(" ")
    if found is None and int(seq) > 0:
        found = ("found", lane, seq, piece, m.key.decode())
if found:
    print(*found); sys.exit(0)
print("not found"); sys.exit(1)
"#,
        broker.brokers()
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with("found bulk "),
        "kafka-python did not see the output (run ./scripts/setup.sh for kafka-python): {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.trim_end().ends_with(" agent-1"), "{stdout}");

    // Kafka's own console consumer (kafka-tools, Java) finds them too: records on the
    // agent's bulk partition under the agent's key, whose frame header names the bulk
    // lane and a sequence number past the handshake.
    let out = kafka_java("org.apache.kafka.tools.consumer.ConsoleConsumer", None)
        .args(["--bootstrap-server", &broker.brokers()])
        .args([
            "--topic",
            "trellis.agent-1.to-controller",
            "--partition",
            "1",
        ])
        .args(["--offset", "earliest", "--timeout-ms", "15000"])
        .args(["--formatter-property", "print.partition=true"])
        .args(["--formatter-property", "print.headers=true"])
        .args(["--formatter-property", "print.key=true"])
        .args(["--formatter-property", "print.value=false"])
        .output()
        .expect("java");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let bulk_frames = stdout
        .lines()
        .filter(|l| {
            let fields: Vec<&str> = l.split('\t').collect();
            let header = fields.iter().find_map(|f| f.strip_prefix("trellis-frame:"));
            let words: Vec<&str> = header.unwrap_or_default().split(' ').collect();
            fields.first() == Some(&"Partition:1")
                && fields.contains(&"agent-1")
                && words.len() == 4
                && words[1] == "bulk"
                && words[2].parse::<u64>().is_ok_and(|seq| seq > 0)
        })
        .count();
    assert!(
        bulk_frames > 0,
        "Kafka's console consumer found none of the run's frames:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_outside_the_granted_prefixes_are_denied() {
    let broker = Kafka::start();
    let d = tempfile::tempdir().unwrap();
    // granted `other.` only; the plugin's topics are `trellis.*`
    let rt = kafka_runtime(d.path(), &broker.brokers(), "other.");
    let kafka = rt.load(&bundle().join("kafka-transport")).await.unwrap();
    let err = trellis::points::transport::listen(kafka.clone())
        .await
        .err()
        .expect("listening on a topic not granted is denied");
    let text = err.to_string();
    assert!(
        text.contains("denied") && text.contains("trellis.connect"),
        "{text}"
    );
    assert!(
        kafka
            .metrics
            .denials
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
}

/// A 50 MiB frame crosses in pieces under the broker's message limit and comes out
/// whole; records that are not this link's frames (no headers, another link) are
/// skipped with a logged error instead of breaking the link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mib_frame_crosses_whole_and_foreign_records_are_skipped() {
    use trellis::points::transport;
    use trellis::wit::command_transport::{Frame, Lane};
    let broker = Kafka::start();
    let d = tempfile::tempdir().unwrap();
    let rt = runtime(
        &format!(
            r#"
            [kafka]
            brokers = "{}"
            [plugins.kafka-transport]
            kafka = {{ topics = ["trellis."] }}
            limits = {{ memory = "1GiB", call-timeout = "120s", max-return = "256MiB" }}
            "#,
            broker.brokers()
        ),
        d.path(),
        &[],
    );
    let kafka = rt.load(&bundle().join("kafka-transport")).await.unwrap();
    let listener = transport::listen(kafka.clone()).await.unwrap();
    let agent = transport::connect(kafka.clone(), "agent-1").await.unwrap();
    let mut controller = None;
    for _ in 0..20 {
        if let Some(l) = listener.accept(500).await.unwrap() {
            controller = Some(l);
            break;
        }
    }
    let controller = controller.expect("the agent's announcement arrived");

    // Junk on the agent's bulk partition, read before the real frames.
    let script = format!(
        r#"
from kafka import KafkaProducer
p = KafkaProducer(bootstrap_servers="{}")
t = "trellis.agent-1.to-controller"
p.send(t, partition=1, value=b"no headers at all")
p.send(t, partition=1, value=b"x", headers=[("trellis-frame", b"someone-else bulk 1 0/1")])
p.send(t, partition=1, value=b"y", headers=[("trellis-frame", b"not a frame header")])
p.flush()
"#,
        broker.brokers()
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The controller's side takes frames over 64 KiB only once its host has sent twice
    // on the link (the handshake's challenge and welcome): those first.
    for _ in 0..2 {
        controller
            .send(vec![Frame {
                lane: Lane::Control,
                seq: 0,
                payload: b"handshake".to_vec(),
            }])
            .await
            .unwrap();
    }
    let big: Vec<u8> = (0..50u32 << 20).map(|i| (i % 251) as u8).collect();
    agent
        .send(vec![
            Frame {
                lane: Lane::Bulk,
                seq: 1,
                payload: big.clone(),
            },
            Frame {
                lane: Lane::Control,
                seq: 1,
                payload: b"cancel".to_vec(),
            },
        ])
        .await
        .unwrap();
    let mut got = Vec::new();
    let t = std::time::Instant::now();
    while got.len() < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "got {} frames",
            got.len()
        );
        got.extend(controller.receive(500).await.unwrap());
    }
    assert_eq!(
        got.len(),
        2,
        "the junk records were not delivered as frames"
    );
    let bulk = got.iter().find(|f| f.lane == Lane::Bulk).unwrap();
    assert_eq!(bulk.seq, 1);
    assert!(bulk.payload == big, "the 50 MiB frame came back different");
    let control = got.iter().find(|f| f.lane == Lane::Control).unwrap();
    assert_eq!(control.payload, b"cancel");
}

/// The broker is killed (SIGKILL) mid-run and started again on its data: links break,
/// the agent reconnects, the session resends what was not acknowledged, and the run
/// ends with every line stored once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_run_loses_and_repeats_no_line() {
    let d = tempfile::tempdir().unwrap();
    let mut broker = Kafka::start();
    let rt = kafka_runtime(d.path(), &broker.brokers(), "trellis.");
    let kafka = rt.load(&bundle().join("kafka-transport")).await.unwrap();
    let c = controller(&rt, d.path(), kafka.clone()).await;
    let _stop = spawn_agent(kafka, d.path(), "agent-secret");
    wait_connected(&c).await;
    let job = Job::parse(
        r#"
        name = "restart"
        agent = "linux"
        [[step]]
        name = "waves"
        run = "for i in $(seq 1 12); do seq $((i*1000-999)) $((i*1000)); sleep 0.5; done"
        "#,
        "job.toml",
    )
    .unwrap();
    let run = c.submit(&job).unwrap();
    // Mid-run: output is flowing (a loaded machine may take a while to get there).
    let t = std::time::Instant::now();
    while c.run(&run.id).is_none_or(|r| r.events == 0) {
        assert!(t.elapsed() < Duration::from_secs(90), "no output yet");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!c.run(&run.id).unwrap().status.is_final());
    tokio::task::block_in_place(|| broker.restart(0));

    let r = wait_final(&c, &run.id, Duration::from_secs(120)).await;
    assert_eq!(r.status, RunStatus::Succeeded, "{r:?}");
    assert_eq!(r.events, 12_000);
    let text = std::fs::read_to_string(
        d.path()
            .join(format!("state/logs/restart/{}.jsonl", run.id)),
    )
    .unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 12_000);
    for (i, l) in lines.iter().enumerate() {
        let n = i + 1;
        assert!(
            l.contains(&format!("\"seq\":{n},")) && l.contains(&format!("\"message\":\"{n}\"")),
            "line {n}: {l}"
        );
    }
}

/// Whoever can write to the topics cannot command an agent, and whoever can read the
/// broker's files learns nothing: an attacker's producer (kafka-python) writes forged
/// orders, in clear and as if sealed, into the agent's control partition under the live
/// link's id, with the next sequence numbers. Nothing runs; the agent drops the link,
/// comes back, and a real run still succeeds. The broker's files (its log segments)
/// hold neither the job's secret value nor a line of its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_records_on_the_topics_run_nothing_and_the_broker_stores_only_ciphertext() {
    const SECRET_VALUE: &str = "kafka-sekrit-55e1d0";
    const LOG_LINE: &str = "KAFKA-LOGLINE-9931";
    let d = tempfile::tempdir().unwrap();
    let broker_dir = d.path().join("broker");
    std::fs::create_dir_all(&broker_dir).unwrap();
    let broker = Kafka::start_in(&broker_dir, KafkaOptions::default());
    let rt = kafka_runtime(d.path(), &broker.brokers(), "trellis.");
    let kafka = rt.load(&bundle().join("kafka-transport")).await.unwrap();
    let logging = rt.load(&bundle().join("file-logging")).await.unwrap();
    let c = Controller::start(
        ControllerConfig {
            instance_id: "kafka-test".into(),
            state_dir: d.path().join("state"),
            agents: [("agent-1".to_string(), "agent-secret".to_string())].into(),
            secrets: trellis::jobs::secrets::JobSecrets::new(
                &toml::from_str("[deploy-token]\njobs = [\"*\"]\n").unwrap(),
                &trellis::capabilities::secrets::SecretStore::from_pairs([(
                    "deploy-token".to_string(),
                    SECRET_VALUE.to_string(),
                )]),
                Default::default(),
            )
            .unwrap(),
            heartbeat: Duration::from_millis(500),
            agent_lost_after: Duration::from_secs(30),
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
    let _stop = spawn_agent(kafka, d.path(), "agent-secret");
    wait_connected(&c).await;
    let marks = d.path().join("marks");
    let job = Job::parse(
        &format!(
            "name = \"with-secret\"\nagent = \"linux\"\nsecrets = {{ T = \"deploy-token\" }}\n[[step]]\nname = \"s\"\nrun = \"echo run >> {}; echo {LOG_LINE}; echo token=$T\"\n",
            marks.display()
        ),
        "job.toml",
    )
    .unwrap();
    let run = c.submit(&job).unwrap();
    let r = wait_final(&c, &run.id, Duration::from_secs(60)).await;
    assert_eq!(r.status, RunStatus::Succeeded, "{r:?}");

    // The attacker: the live link's id from the controller's own records, then forged
    // orders with the next sequence numbers, in clear and with a made-up tag.
    let forged = d.path().join("forged-order-ran");
    let script = format!(
        r#"
import json, os, sys
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
brokers = "{brokers}"
c = KafkaConsumer(bootstrap_servers=brokers)
tp = TopicPartition("trellis.agent-1.to-agent", 0)
c.assign([tp])
end = c.end_offsets([tp])[tp]  # heartbeats keep coming: read up to here only
c.seek_to_beginning(tp)
link, top = None, 0
while c.position(tp) < end:
    for m in c.poll(timeout_ms=1000).get(tp, []):
        if m.offset >= end:
            break
        l, lane, seq, piece = dict(m.headers)["trellis-frame"].decode().split(" ")
        if l != link:
            link, top = l, 0
        top = max(top, int(seq))
if link is None:
    print("no link seen"); sys.exit(1)
order = lambda run: json.dumps({{"type": "start-run", "run": run, "job": "forged",
    "steps": [{{"name": "s", "run": "touch {forged}", "timeout_ms": 10000, "workdir": None}}],
    "env": [], "mask": [], "token": 2**62}}).encode()
p = KafkaProducer(bootstrap_servers=brokers)
for i, seq in enumerate(range(top + 1, top + 4)):
    for value in (order(f"r-forged-{{i}}"), order(f"r-forged-{{i}}") + os.urandom(16)):
        h = [("trellis-frame", f"{{link}} control {{seq}} 0/1".encode())]
        p.send("trellis.agent-1.to-agent", key=b"agent-1", value=value, partition=0, headers=h)
p.flush()
print("forged", link, top + 1)
"#,
        brokers = broker.brokers(),
        forged = forged.display()
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with("forged "),
        "the attacker's producer failed (run ./scripts/setup.sh for kafka-python): {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The agent drops the link on the first forged record and comes back; a real run
    // placed after that succeeds, and nothing forged ran.
    tokio::time::sleep(Duration::from_secs(3)).await;
    wait_connected(&c).await;
    let run = c.submit(&job).unwrap();
    let r = wait_final(&c, &run.id, Duration::from_secs(60)).await;
    assert_eq!(r.status, RunStatus::Succeeded, "{r:?}");
    assert!(!forged.exists(), "a forged order ran");
    assert!(
        !d.path().join("work/r-forged-0").exists(),
        "a forged order ran"
    );
    assert_eq!(
        std::fs::read_to_string(&marks).unwrap().lines().count(),
        2,
        "each real run ran once"
    );

    // The broker's own files: ciphertext only.
    let mut files = 0;
    let mut segments = 0;
    let mut dirs = vec![broker_dir.clone()];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            files += 1;
            let in_agent_topic = path.to_string_lossy().contains("trellis.agent-1.");
            if in_agent_topic && path.extension().is_some_and(|x| x == "log") && !bytes.is_empty() {
                segments += 1;
            }
            for needle in [SECRET_VALUE, LOG_LINE, "agent-secret"] {
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                    "{} holds `{needle}` in clear",
                    path.display()
                );
            }
        }
    }
    assert!(
        files > 0 && segments > 0,
        "the broker kept the agent's topics in {} ({files} files, {segments} segments)",
        broker_dir.display()
    );
}

/// KafkaSecretManager's rule over our handshake: an agent with a wrong secret is told
/// why, stops, and nothing runs on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_agent_secret_is_refused_over_kafka() {
    let broker = Kafka::start();
    let d = tempfile::tempdir().unwrap();
    let rt = kafka_runtime(d.path(), &broker.brokers(), "trellis.");
    let kafka = rt.load(&bundle().join("kafka-transport")).await.unwrap();
    let c = controller(&rt, d.path(), kafka.clone()).await;
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let agent = trellis::agent::worker::AgentConfig {
        name: "agent-1".into(),
        labels: vec!["linux".into()],
        secret: "not-the-secret".into(),
        workspace: d.path().join("work"),
        heartbeat: Duration::from_millis(500),
        logs: None,
        state_dir: None,
        executors: 1,
    };
    let refused = tokio::time::timeout(
        Duration::from_secs(60),
        trellis::agent::worker::run_agent(kafka, agent, stop),
    )
    .await
    .expect("the agent was answered")
    .expect_err("refused");
    assert!(
        refused
            .to_string()
            .contains("wrong secret for agent `agent-1`"),
        "{refused}"
    );
    assert!(c.connected_agents().is_empty());
    assert!(!d.path().join("work").exists(), "nothing ran");
}

/// An agent process killed mid-step and started again (a new session) over Kafka: its
/// run is reported `lost` at once (the state is clear, nothing is resumed twice), and
/// the new process takes new work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarted_mid_step_has_its_run_marked_lost_and_runs_new_work() {
    let broker = Kafka::start();
    let d = tempfile::tempdir().unwrap();
    let rt = kafka_runtime(d.path(), &broker.brokers(), "trellis.");
    let kafka = rt.load(&bundle().join("kafka-transport")).await.unwrap();
    let c = controller(&rt, d.path(), kafka.clone()).await;
    let agent = |stop| {
        let cfg = trellis::agent::worker::AgentConfig {
            name: "agent-1".into(),
            labels: vec!["linux".into()],
            secret: "agent-secret".into(),
            workspace: d.path().join("work"),
            heartbeat: Duration::from_millis(500),
            logs: None,
            state_dir: None,
            executors: 1,
        };
        tokio::spawn(trellis::agent::worker::run_agent(kafka.clone(), cfg, stop))
    };
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let first = agent(stop);
    wait_connected(&c).await;
    let long = Job::parse(
        "name = \"long\"\nagent = \"linux\"\n[[step]]\nname = \"wait\"\nrun = \"echo started; sleep 20\"\n",
        "job.toml",
    )
    .unwrap();
    let run = c.submit(&long).unwrap();
    let t = std::time::Instant::now();
    while c.run(&run.id).is_none_or(|r| r.events == 0) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the step never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_tx.send(true).unwrap(); // the process goes away mid-step...
    first.await.unwrap().unwrap();
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let _second = agent(stop); // ...and a new one starts
    let r = wait_final(&c, &run.id, Duration::from_secs(30)).await;
    assert_eq!(r.status, RunStatus::Lost, "{r:?}");
    assert!(
        r.note.as_deref().unwrap_or_default().contains("restarted"),
        "{r:?}"
    );
    wait_connected(&c).await;
    let ok = c
        .submit(
            &Job::parse(
                "name = \"after\"\nagent = \"linux\"\n[[step]]\nname = \"hi\"\nrun = \"echo hi\"\n",
                "job.toml",
            )
            .unwrap(),
        )
        .unwrap();
    let t = std::time::Instant::now();
    while !c.run(&ok.id).is_some_and(|r| r.status.is_final()) {
        assert!(t.elapsed() < Duration::from_secs(60), "{:?}", c.run(&ok.id));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.run(&ok.id).unwrap().status, RunStatus::Succeeded);
}

/// Many agents, one broker: 20 agents on one controller through one broker, each running
/// a job at the same time; every log complete and in order. Prints the throughput and
/// the command latency (submit -> the agent reports the step started), recorded in
/// docs/PERFORMANCE.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_agents_on_one_broker_run_jobs_at_once_with_complete_logs() {
    const AGENTS: usize = 20;
    const LINES: usize = 2000;
    let broker = Kafka::start();
    let d = tempfile::tempdir().unwrap();
    let rt = kafka_runtime(d.path(), &broker.brokers(), "trellis.");
    let kafka = rt.load(&bundle().join("kafka-transport")).await.unwrap();
    let names: Vec<String> = (1..=AGENTS).map(|i| format!("agent-{i:02}")).collect();
    let secrets = names
        .iter()
        .map(|n| (n.clone(), format!("secret-of-{n}")))
        .collect();
    let c = controller_for(&rt, d.path(), kafka.clone(), secrets).await;
    let mut stops = Vec::new();
    for n in &names {
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let cfg = trellis::agent::worker::AgentConfig {
            name: n.clone(),
            labels: vec![n.clone()], // each job goes to its own agent
            secret: format!("secret-of-{n}"),
            workspace: d.path().join("work").join(n),
            heartbeat: Duration::from_millis(500),
            logs: None,
            state_dir: None,
            executors: 1,
        };
        tokio::spawn(trellis::agent::worker::run_agent(kafka.clone(), cfg, stop));
        stops.push(stop_tx);
    }
    let t = std::time::Instant::now();
    while c.connected_agents().len() < AGENTS {
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "only {} of {AGENTS} agents connected",
            c.connected_agents().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut updates = c.subscribe();
    let start = std::time::Instant::now();
    let mut submitted = std::collections::HashMap::new();
    for n in &names {
        let job = Job::parse(
            &format!(
                "name = \"job-{n}\"\nagent = \"{n}\"\n[[step]]\nname = \"count\"\nrun = \"seq 1 {LINES} | sed 's/^/{n} line /'\"\n"
            ),
            "job.toml",
        )
        .unwrap();
        let r = c.submit(&job).unwrap();
        submitted.insert(r.id.clone(), (n.clone(), std::time::Instant::now()));
    }
    // Command latency: from submit to the step reported running by its agent.
    let mut latencies = Vec::new();
    let mut finished = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while finished.len() < AGENTS {
        match tokio::time::timeout_at(deadline, updates.recv()).await {
            Ok(Ok(trellis::controller::Update::Run(r))) if submitted.contains_key(&r.id) => {
                if r.status == RunStatus::Running && latencies.len() < AGENTS {
                    let (_, at) = submitted.get_mut(&r.id).unwrap();
                    if *at != start {
                        latencies.push(at.elapsed());
                        *at = start; // counted once
                    }
                }
                if r.status.is_final() {
                    finished.insert(r.id.clone());
                }
            }
            Ok(_) => {}
            Err(_) => panic!("only {} of {AGENTS} runs ended", finished.len()),
        }
    }
    let wall = start.elapsed();
    let reader = trellis::points::browser::LogReader::new(
        rt.load(&bundle().join("file-browser")).await.unwrap(),
    )
    .unwrap();
    for (id, (n, _)) in &submitted {
        let r = c.run(id).unwrap();
        assert_eq!(r.status, RunStatus::Succeeded, "{r:?}");
        let page = whole_log(&reader, &format!("job-{n}"), id).await;
        let events = decode(&page).unwrap();
        assert_eq!(events.len(), LINES, "{id} on {n}: every line");
        assert!(
            events
                .iter()
                .enumerate()
                .all(|(i, e)| e.message == format!("{n} line {}", i + 1)),
            "{id} on {n}: in order, its own lines only"
        );
    }
    latencies.sort();
    let p = |q: f64| {
        latencies[((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1]
    };
    eprintln!(
        "{AGENTS} agents over one broker: {} lines in {wall:.2?} = {:.0} lines/s; command latency p50 {:.1?}, p99 {:.1?} ({} samples)",
        AGENTS * LINES,
        (AGENTS * LINES) as f64 / wall.as_secs_f64(),
        p(0.5),
        p(0.99),
        latencies.len()
    );
    assert_eq!(latencies.len(), AGENTS, "every run was seen running");
}

/// Traffic prioritisation: a cancel reaches the agent while a 50 MiB artifact is still
/// streaming to the controller on the same pair (the control lane overtakes the bulk
/// lane). Prints the cancel latency under that load and on an idle pair (recorded in
/// docs/PERFORMANCE.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_overtakes_a_50_mib_artifact_in_flight() {
    let broker = Kafka::start();
    let d = tempfile::tempdir().unwrap();
    let rt = kafka_runtime(d.path(), &broker.brokers(), "trellis.");
    let kafka = rt.load(&bundle().join("kafka-transport")).await.unwrap();
    let c = controller(&rt, d.path(), kafka.clone()).await;
    let _stop = spawn_agent(kafka, d.path(), "agent-secret");
    wait_connected(&c).await;
    // The second step waits to be cancelled; its TERM trap records when that happened.
    let waiting = "trap 'date +%s%N > cancelled-at; exit 1' TERM; touch waiting; sleep 60 & wait";
    let idle = Job::parse(
        &format!(
            "name = \"idle\"\nagent = \"linux\"\n[[step]]\nname = \"wait\"\nrun = \"{waiting}\"\n"
        ),
        "job.toml",
    )
    .unwrap();
    let loaded = Job::parse(
        &format!(
            "name = \"loaded\"\nagent = \"linux\"\n[[step]]\nname = \"make\"\nrun = \"head -c 52428800 /dev/urandom > big.bin\"\nartifacts = [\"big.bin\"]\n[[step]]\nname = \"wait\"\nrun = \"{waiting}\"\n"
        ),
        "job.toml",
    )
    .unwrap();
    let mut results = Vec::new();
    for job in [&idle, &loaded] {
        let run = c.submit(job).unwrap();
        let work = d.path().join("work").join(&run.id);
        let t = std::time::Instant::now();
        while !work.join("waiting").exists() {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{} never waited",
                job.name
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let artifact_done = |c: &Controller| !c.run(&run.id).unwrap().artifacts.is_empty();
        let in_flight = !artifact_done(&c);
        let sent_at = std::time::SystemTime::now();
        assert!(c.cancel(&run.id));
        let t = std::time::Instant::now();
        let marker = work.join("cancelled-at");
        let at_ns = loop {
            if let Some(ns) = std::fs::read_to_string(&marker)
                .ok()
                .and_then(|s| s.trim().parse::<u128>().ok())
            {
                break ns;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{}: the cancel never arrived",
                job.name
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let arrived_with_artifact_pending = !artifact_done(&c);
        let sent_ns = sent_at
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let latency = Duration::from_nanos(at_ns.saturating_sub(sent_ns) as u64);
        let r = wait_final(&c, &run.id, Duration::from_secs(120)).await;
        assert_eq!(r.status, RunStatus::Cancelled, "{r:?}");
        if job.name == "loaded" {
            assert!(
                in_flight,
                "the artifact had fully arrived before the cancel: no load to overtake"
            );
            assert!(
                arrived_with_artifact_pending,
                "the cancel waited for the 50 MiB artifact (latency {latency:?})"
            );
            assert_eq!(
                r.artifacts.len(),
                1,
                "the artifact still arrives whole: {r:?}"
            );
            assert_eq!(r.artifacts[0].size, 52_428_800);
        }
        results.push((job.name.clone(), latency));
    }
    eprintln!(
        "cancel latency over kafka: idle pair {:.1?}; with a 50 MiB artifact in flight {:.1?}",
        results[0].1, results[1].1
    );
}

/// TLS to the broker: Kafka's own SSL listener, with a certificate signed by a CA made
/// here (an IP SAN for 127.0.0.1). The operator's `[kafka]` properties turn TLS on,
/// checking the broker's certificate against that CA, and a job runs over it with its
/// log complete. The bootstrap list names only the SSL listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_over_kafka_through_tls() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let sh = |script: &str| {
        let out = std::process::Command::new("sh")
            .args(["-ec", script])
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sh("openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=trellis-test-ca -addext basicConstraints=critical,CA:TRUE 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1 2>/dev/null
        printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' > server.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile server.ext 2>/dev/null");
    let broker = Kafka::start_with(KafkaOptions {
        tls: Some((dir.join("server.pem"), dir.join("server.key"))),
        ..Default::default()
    });
    let tls = broker.tls_brokers();
    std::fs::create_dir_all(dir.join("state/logs")).unwrap();
    let rt = runtime(
        &format!(
            r#"
            [kafka]
            brokers = "{tls}"
            properties = {{ "security.protocol" = "ssl", "ssl.ca.location" = "{ca}" }}
            [plugins.kafka-transport]
            kafka = {{ topics = ["trellis."] }}
            config = {{ prefix = "trellis" }}
            [plugins.file-logging]
            dirs = [{{ host = "state/logs", guest = "/logs", mode = "read-write" }}]
            "#,
            ca = dir.join("ca.pem").display()
        ),
        dir,
        &[],
    );
    let r = run_one_job(&rt, dir, "tls", "seq 1 500", Duration::from_secs(60)).await;
    assert_eq!(r.events, 500);
}

/// SASL/SCRAM-SHA-512 to a broker that requires authentication (Kafka's SASL_PLAINTEXT
/// listener; the user is made when its storage is formatted). The password comes from
/// the secrets store by name. The broker holds sessions to 20 s
/// (`connections.max.reauth.ms`) and the step runs 80 s: the link must ride out the
/// re-authentications (or the reconnects, where a client does not re-authenticate),
/// with every line once. A wrong password is refused by the broker and the error says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_over_kafka_with_sasl_scram_past_the_session_lifetime() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let broker = Kafka::start_with(KafkaOptions {
        scram: Some(("trellis".into(), "s3cret-pw".into())),
        properties: vec![("connections.max.reauth.ms".into(), "20000".into())],
        ..Default::default()
    });
    std::fs::create_dir_all(dir.join("state/logs")).unwrap();
    let config = |secret: &str| {
        format!(
            r#"
            [kafka]
            brokers = "{brokers}"
            sasl-username = "trellis"
            sasl-password-secret = "{secret}"
            properties = {{ "security.protocol" = "sasl_plaintext", "sasl.mechanisms" = "SCRAM-SHA-512" }}
            [plugins.kafka-transport]
            kafka = {{ topics = ["trellis."] }}
            config = {{ prefix = "trellis" }}
            [plugins.file-logging]
            dirs = [{{ host = "state/logs", guest = "/logs", mode = "read-write" }}]
            [plugins.file-browser]
            dirs = [{{ host = "state/logs", guest = "/logs" }}]
            "#,
            brokers = broker.sasl_brokers()
        )
    };
    let secrets = [("kafka-password", "s3cret-pw"), ("wrong-password", "guess")];

    // The wrong password first: the controller cannot open its link, and says why.
    let wrong = runtime(&config("wrong-password"), dir, &secrets);
    let kafka = wrong.load(&bundle().join("kafka-transport")).await.unwrap();
    let logging = wrong.load(&bundle().join("file-logging")).await.unwrap();
    let refused = tokio::time::timeout(
        Duration::from_secs(90),
        Controller::start(
            ControllerConfig {
                instance_id: "kafka-test".into(),
                state_dir: dir.join("state"),
                agents: Default::default(),
                secrets: Default::default(),
                heartbeat: Duration::from_millis(500),
                agent_lost_after: Duration::from_secs(30),
                log_buffer_limit: trellis::controller::DEFAULT_LOG_BUFFER_LIMIT,
                multiline_start: None,
                fencing_token: 0,
                retention: Default::default(),
            },
            kafka,
            logging,
        ),
    )
    .await
    .expect("the controller gave up on a refused login");
    let err = refused
        .err()
        .expect("a wrong SASL password must not open a link");
    eprintln!("refused as expected: {err}");
    assert!(
        err.to_string().to_lowercase().contains("authentication"),
        "the error must name the failed authentication: {err}"
    );
    drop(wrong);

    let rt = runtime(&config("kafka-password"), dir, &secrets);
    let run = run_one_job(
        &rt,
        dir,
        "sasl",
        "for i in $(seq 1 80); do echo line-$i; sleep 1; done",
        Duration::from_secs(180),
    )
    .await;
    let reader = trellis::points::browser::LogReader::new(
        rt.load(&bundle().join("file-browser")).await.unwrap(),
    )
    .unwrap();
    let log = whole_log(&reader, "sasl", &run.id).await;
    let lines: Vec<String> = decode(&log)
        .unwrap()
        .into_iter()
        .map(|e| e.message.to_string())
        .collect();
    let want: Vec<String> = (1..=80).map(|i| format!("line-{i}")).collect();
    assert_eq!(lines, want);
}

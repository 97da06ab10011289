//! Sealed agent links against real attackers (see `session::seal` for the threat
//! model). The controller and the agent run as real processes over the TCP transport;
//! the attackers are real processes too (tests/link-attackers/): a man in the middle
//! that records, flips and replays, and a fake controller that does not know the
//! agent's secret.

mod common;

use common::*;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// A job secret whose value must never cross the wire in clear.
const SECRET_VALUE: &str = "sekrit-7f3a9c21-value";

fn metric(http: u16, name: &str) -> u64 {
    let text = http_get(http, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
        .parse()
        .unwrap()
}

fn count_lines(p: &Path) -> usize {
    std::fs::read_to_string(p).map_or(0, |t| t.lines().count())
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// The run id `trellis run` printed.
fn run_id(out: &str) -> String {
    out.split_whitespace()
        .find(|w| w.starts_with("r-"))
        .unwrap_or_else(|| panic!("no run id in {out:?}"))
        .trim_end_matches(|c: char| !c.is_alphanumeric())
        .to_string()
}

#[test]
fn a_man_in_the_middle_reads_nothing_and_what_he_alters_or_replays_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let controller_port = free_port();
    let (controller_cfg, agent_cfg, http) = write_configs(
        d.path(),
        &Transport::Tcp {
            port: controller_port,
        },
    );
    let mut secrets = std::fs::OpenOptions::new()
        .append(true)
        .open(d.path().join("secrets.toml"))
        .unwrap();
    writeln!(secrets, "deploy-token = \"{SECRET_VALUE}\"").unwrap();
    // The job may use it (scoped job secrets): the rule goes at the end of the config.
    let mut cfg = std::fs::OpenOptions::new()
        .append(true)
        .open(&controller_cfg)
        .unwrap();
    writeln!(cfg, "\n[job-secrets.deploy-token]\njobs = [\"sealed\"]").unwrap();
    let recording = d.path().join("mitm.bin");
    let events = d.path().join("mitm.events");
    let mut mitm = Attacker::start(
        "relay.py",
        &[
            &controller_port.to_string(),
            recording.to_str().unwrap(),
            events.to_str().unwrap(),
        ],
    );
    agent_via(&agent_cfg, controller_port, mitm.port);
    let daemons = start_daemons(d.path(), &controller_cfg, &agent_cfg, http);
    let http = daemons.http; // moved if the controller lost its port
    let log = &daemons.log;

    // A run that carries a secret and prints a line only the run's log should hold.
    let marks = d.path().join("marks");
    let job = d.path().join("job.toml");
    let log_line = "LOGLINE-only-in-the-log-4821";
    std::fs::write(
        &job,
        format!(
            "name = \"sealed\"\nagent = \"linux\"\nsecrets = {{ T = \"deploy-token\" }}\n[[step]]\nname = \"a\"\nrun = \"echo run >> {m}; echo {log_line}; echo token=$T\"\n",
            m = marks.display()
        ),
    )
    .unwrap();
    let (code, out, err) = cli(&daemons.server, &["run", job.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let first = run_id(&out);
    wait_for_success(&daemons.server, &first, Duration::from_secs(30), log);
    assert_eq!(count_lines(&marks), 1);
    let logged = cli(&daemons.server, &["logs", &first]).1;
    assert!(logged.contains(log_line), "{logged}");

    // The recording: ciphertext only.
    let wire = std::fs::read(&recording).unwrap();
    assert!(wire.len() > 1000, "the relay recorded the link");
    let has = |needle: &str| wire.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(!has(SECRET_VALUE), "the secret crossed the wire in clear");
    assert!(!has(log_line), "a log line crossed the wire in clear");
    assert!(
        !has("echo run"),
        "the step's command crossed the wire in clear"
    );
    assert!(
        !has("the-agent-secret"),
        "the agent's secret crossed the wire"
    );

    // One flipped byte agent -> controller: the controller refuses the frame, counts it,
    // drops the link; the agent comes back.
    let refused = metric(http, "trellis_link_frames_refused_total");
    assert_eq!(refused, 0);
    mitm.command("flip a2c");
    wait_until(
        "the flipped frame was not counted",
        Duration::from_secs(20),
        || metric(http, "trellis_link_frames_refused_total") == 1,
    );
    assert!(read(&events).contains("flipped a2c"), "{}", read(&events));
    let connections = || read(&events).matches("connection").count();
    wait_until(
        "the agent did not come back",
        Duration::from_secs(20),
        || connections() >= 2,
    );

    // Controller -> agent: a flipped byte, then the recorded order replayed. The agent
    // drops the link each time and runs nothing again.
    // Each attack once the link it aims at is past its handshake (the agent discards
    // what arrives before its hello: no attack on a sealed link, no drop).
    let handshook = || read(&events).matches("handshook").count();
    for attack in ["flip c2a", "replay c2a"] {
        let before = connections();
        wait_until(
            "the link was not past its handshake",
            Duration::from_secs(20),
            || handshook() >= before,
        );
        mitm.command(attack);
        let t = std::time::Instant::now();
        while connections() == before {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the agent did not drop the link after `{attack}`:\n{}\n{}",
                read(&events),
                read(log)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert!(read(&events).contains("replayed c2a"), "{}", read(&events));
    assert!(
        read(log).contains("did not open"),
        "the agent said why it dropped the link:\n{}",
        read(log)
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(count_lines(&marks), 1, "nothing extra ran");

    // A longer run, attacked mid-way both ways: it completes, whole, exactly once.
    std::fs::write(
        &job,
        format!(
            "name = \"sealed-2\"\nagent = \"linux\"\n[[step]]\nname = \"a\"\nrun = \"echo run >> {m}; for i in $(seq 1 300); do echo line $i; sleep 0.01; done\"\n",
            m = marks.display()
        ),
    )
    .unwrap();
    let (code, out, err) = cli(&daemons.server, &["run", job.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let second = run_id(&out);
    wait_until(
        "the second run did not start",
        Duration::from_secs(20),
        || count_lines(&marks) == 2,
    );
    std::thread::sleep(Duration::from_millis(700));
    mitm.command("flip a2c");
    std::thread::sleep(Duration::from_millis(700));
    mitm.command("replay a2c");
    wait_for_success(&daemons.server, &second, Duration::from_secs(60), log);
    let lines: Vec<String> = cli(&daemons.server, &["logs", &second])
        .1
        .lines()
        .filter(|l| l.contains("line "))
        .map(|l| l.to_string())
        .collect();
    assert_eq!(lines.len(), 300, "every line exactly once: {lines:?}");
    assert!(metric(http, "trellis_link_frames_refused_total") >= 2);
    assert_eq!(count_lines(&marks), 2, "each run ran once");
}

#[test]
fn an_agent_refuses_a_controller_that_cannot_prove_its_secret() {
    let d = tempfile::tempdir().unwrap();
    let controller_port = free_port();
    let (_controller_cfg, agent_cfg, _http) = write_configs(
        d.path(),
        &Transport::Tcp {
            port: controller_port,
        },
    );
    let marker = d.path().join("fooled");
    let events = d.path().join("fake.events");
    let fake = Attacker::start(
        "fake_controller.py",
        &[marker.to_str().unwrap(), events.to_str().unwrap()],
    );
    agent_via(&agent_cfg, controller_port, fake.port);
    let log = d.path().join("daemons.log");
    let _agent = start("agent", &agent_cfg, &log);
    // The agent answers, is sent a forged welcome and orders, refuses, and tries again.
    wait_until(
        "the agent did not come back to the fake controller",
        Duration::from_secs(30),
        || read(&events).matches("sent welcome").count() >= 2,
    );
    wait_for_line(
        &log,
        "did not prove agent `build-1`'s secret",
        Duration::from_secs(5),
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(!marker.exists(), "the fake controller's order ran");
    assert!(
        !d.path().join("work/.trellis/fencing-token").exists(),
        "the fake controller's fencing token was kept"
    );
}

/// A transport plugin is third-party code: on the agent side it sees every frame and can
/// hand the host anything. The `forging-transport` fixture rewrites the controller's
/// welcome to carry a huge fencing token on its first link, and slips a forged order and
/// cancel in behind the real welcome on its second; then it carries frames honestly.
/// Nothing forged is obeyed or kept, and the agent works with its real controller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transport_plugin_cannot_forge_orders_or_plant_a_fencing_token() {
    if over_kafka() {
        return; // the forging fixture is tcp-transport turned attacker
    }
    let s = stack().await;
    let evidence = s.dir.path().join("evidence");
    std::fs::create_dir_all(&evidence).unwrap();
    let marker = s.dir.path().join("forged-order-ran");
    let port = s.port;
    let rt = runtime(
        &format!(
            "[plugins.forging-transport]\nsockets = {{ connect = [\"127.0.0.1:{port}\"] }}\ndirs = [{{ host = \"evidence\", guest = \"/evidence\", mode = \"read-write\" }}]\nconfig = {{ address = \"127.0.0.1:{port}\", marker = \"{}\" }}\n",
            marker.display()
        ),
        s.dir.path(),
        &[],
    );
    let forging = rt
        .load(&fixtures().join("forging-transport"))
        .await
        .unwrap_or_else(|p| panic!("{p}"));
    let state = s.dir.path().join("agent-state");
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let agent = tokio::spawn(trellis::agent::worker::run_agent(
        forging,
        trellis::agent::worker::AgentConfig {
            name: "agent-1".into(),
            labels: vec!["linux".into()],
            secret: "agent-secret".into(),
            workspace: s.dir.path().join("work"),
            heartbeat: Duration::from_millis(200),
            logs: None,
            state_dir: Some(state.clone()),
            executors: 1,
        },
        stop,
    ));
    // Both forgeries happen, then an honest link connects and a real run succeeds.
    let log = evidence.join("log");
    let t = std::time::Instant::now();
    while !read(&log).contains("forged an order") {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the fixture did not get to forge: {}",
            read(&log)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(read(&log).contains("forged a welcome"), "{}", read(&log));
    wait_connected(&s.controller).await;
    let job = trellis::jobs::Job::parse(
        "name = \"real\"\nagent = \"linux\"\n[[step]]\nname = \"a\"\nrun = \"echo real\"\n",
        "real.toml",
    )
    .unwrap();
    // The honest link may still be coming up: retry placing the run for a while.
    let run = loop {
        match s.controller.submit(&job) {
            Ok(r) => break r,
            Err(e) => {
                assert!(t.elapsed() < Duration::from_secs(30), "{e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let r = wait_final(&s.controller, &run.id, Duration::from_secs(30)).await;
    assert_eq!(
        r.status,
        trellis::controller::state::RunStatus::Succeeded,
        "{r:?}"
    );
    assert!(!marker.exists(), "the forged order ran");
    assert!(
        !state.join("fencing-token").exists(),
        "the forged fencing token was kept: {:?}",
        std::fs::read_to_string(state.join("fencing-token"))
    );
    let _ = stop_tx.send(true);
    let _ = agent.await;
}

/// CPU time this process used so far (user + system), from /proc.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// A second connection under an agent's name (here one that knows the secret, then
/// never acknowledges anything) takes the agent's session over only once it has
/// authenticated, and cleanly: the controller does not spin on the order it cannot
/// get acknowledged, and the real agent, coming back, supersedes it and runs work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_supersedes_cleanly_with_no_wedge_and_no_busy_loop() {
    use trellis::session::link::{AgentSession, introduce};
    use trellis::wit::command_transport::{Frame, Lane};
    if over_kafka() {
        // Over Kafka the superseded connection's sends still succeed (the broker takes
        // them), so its being dropped is only seen over TCP.
        return;
    }
    let s = stack().await;
    let job = trellis::jobs::Job::parse(
        "name = \"j\"\nagent = \"linux\"\n[[step]]\nname = \"a\"\nrun = \"echo hi\"\n",
        "j.toml",
    )
    .unwrap();
    let (task, stop) = start_agent(&s, "agent-1", "agent-secret");
    wait_connected(&s.controller).await;
    let _ = stop.send(true);
    let _ = task.await;

    // The second connection: authenticates, then only heartbeats.
    let link = trellis::points::transport::connect(s.transport.clone(), "agent-1")
        .await
        .unwrap();
    let mut rogue = AgentSession::new();
    let introduced = introduce(
        &link,
        "agent-1",
        &["linux".to_string()],
        &[],
        1,
        "agent-secret",
        vec![],
        &mut rogue,
    )
    .await
    .expect("welcomed: it knows the secret");
    let mut seal = introduced.seal;
    let rogue_task = tokio::spawn(async move {
        loop {
            let beat = seal.seal(Frame {
                lane: Lane::Control,
                seq: 0,
                payload: vec![trellis::session::signal::HEARTBEAT],
            });
            if link.send(vec![beat]).await.is_err() {
                return "dropped";
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    wait_connected(&s.controller).await;
    // An order the rogue never acknowledges: the controller must idle, not spin.
    s.controller.submit(&job).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (cpu, wall) = (cpu_time(), std::time::Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_time() - cpu;
    assert!(
        used < wall.elapsed() / 4,
        "the controller busy-looped: {used:?} of CPU in {:?}",
        wall.elapsed()
    );

    // The real agent comes back: it supersedes the rogue at once and runs work.
    let (_task, _stop) = start_agent(&s, "agent-1", "agent-secret");
    let t = std::time::Instant::now();
    let run = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if rogue_task.is_finished()
            && let Ok(r) = s.controller.submit(&job)
        {
            break r;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the real agent did not take over (rogue still served: {})",
            !rogue_task.is_finished()
        );
    };
    let r = wait_final(&s.controller, &run.id, Duration::from_secs(30)).await;
    assert_eq!(
        r.status,
        trellis::controller::state::RunStatus::Succeeded,
        "{r:?}"
    );
    assert_eq!(rogue_task.await.unwrap(), "dropped");
}

/// Before the handshake completes a peer is nobody: one socket announcing a 250 MiB
/// record (and another trickling a large one) must neither make the listener's shared
/// plugin instance hold it nor kill it; a real agent then connects and runs work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_peer_cannot_make_the_listener_hold_a_huge_record() {
    if over_kafka() {
        return; // raw TCP against the tcp-transport's listener
    }
    let s = stack().await;
    let mut huge = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    let mut record = ((250u32 << 20) + 9).to_le_bytes().to_vec();
    record.push(0);
    record.extend_from_slice(&0u64.to_le_bytes());
    record.extend_from_slice(&[7u8; 1 << 20]);
    // The write may fail once the listener drops the connection: that is the point.
    let _ = huge.write_all(&record);
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    let mut partial = ((200u32 << 10) + 9).to_le_bytes().to_vec();
    partial.extend_from_slice(&[0u8; 9 + (60 << 10)]);
    let _ = slow.write_all(&partial);
    tokio::time::sleep(Duration::from_secs(1)).await;

    a_real_agent_connects_and_runs_work(&s).await;
    // The huge one was dropped by the transport, not held.
    huge.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4096];
    let mut closed = false;
    for _ in 0..10 {
        match std::io::Read::read(&mut huge, &mut buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break; // still open, silent
            }
            Ok(0) | Err(_) => {
                closed = true;
                break;
            }
            Ok(_) => {} // its challenge
        }
    }
    assert!(closed, "the connection announcing 250 MiB was kept open");
}

/// A listener whose plugin instance dies is replaced by a fresh one, not retried for
/// ever: unauthenticated connections each make the tcp-transport's listener buffer a
/// partial record (up to the pre-authentication bound) until its instance runs out of
/// its memory limit and traps; a real agent must still connect and run work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_whose_instance_died_is_replaced_and_agents_connect_again() {
    if over_kafka() {
        return; // raw TCP against the tcp-transport's listener
    }
    let s = stack_with(r#"limits = { memory = "2MiB" }"#).await;
    // Each holds an almost whole 64 KiB record that never completes.
    let mut hogs = Vec::new();
    for _ in 0..48 {
        let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", s.port)) else {
            break;
        };
        let mut partial = ((64u32 << 10) + 9).to_le_bytes().to_vec();
        partial.extend_from_slice(&[0u8; 9 + (62 << 10)]);
        let _ = c.write_all(&partial);
        hogs.push(c);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(hogs);

    a_real_agent_connects_and_runs_work(&s).await;
}

/// The stack's agent connects and a job it is given succeeds.
async fn a_real_agent_connects_and_runs_work(s: &Stack) {
    let (_agent, _stop) = start_agent(s, "agent-1", "agent-secret");
    wait_connected(&s.controller).await;
    let job = trellis::jobs::Job::parse(
        "name = \"after\"\nagent = \"linux\"\n[[step]]\nname = \"a\"\nrun = \"echo fine\"\n",
        "after.toml",
    )
    .unwrap();
    let run = s.controller.submit(&job).unwrap();
    let r = wait_final(&s.controller, &run.id, Duration::from_secs(30)).await;
    assert_eq!(
        r.status,
        trellis::controller::state::RunStatus::Succeeded,
        "{r:?}"
    );
}

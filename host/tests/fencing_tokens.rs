//! Fencing tokens (issue 7): a controller replaced by one holding a newer token can
//! neither change the shared state directory nor drive agents. Two controllers share
//! one state directory (as on GlusterFS), each with its own TCP port; tokens are given
//! directly here (in an HA setup they are the leader key's revision in etcd).

mod common;

use common::*;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use trellis::controller::state::RunStatus;
use trellis::controller::{Controller, ControllerConfig};
use trellis::jobs::Job;
use trellis::runtime::Plugin;

struct Active {
    controller: Arc<Controller>,
    transport: Arc<Plugin>,
    _rt: Arc<trellis::runtime::Runtime>,
}

async fn controller(dir: &Path, port: u16, token: u64) -> Active {
    let rt = runtime(
        &format!(
            r#"
            [plugins.tcp-transport]
            sockets = {{ bind = ["127.0.0.1:{port}"], connect = ["127.0.0.1:{port}"] }}
            config = {{ address = "127.0.0.1:{port}" }}
            [plugins.file-logging]
            dirs = [{{ host = "state/logs", guest = "/logs", mode = "read-write" }}]
            "#
        ),
        dir,
        &[],
    );
    let transport = rt.load(&bundle().join("tcp-transport")).await.unwrap();
    let logging = rt.load(&bundle().join("file-logging")).await.unwrap();
    let cfg = ControllerConfig {
        instance_id: "ha".into(),
        state_dir: dir.join("state"),
        agents: [("agent-1".to_string(), "agent-secret".to_string())].into(),
        secrets: Default::default(),
        heartbeat: Duration::from_millis(200),
        agent_lost_after: Duration::from_secs(30),
        log_buffer_limit: trellis::controller::DEFAULT_LOG_BUFFER_LIMIT,
        multiline_start: None,
        fencing_token: token,
        retention: Default::default(),
    };
    let controller = Controller::start(cfg, transport.clone(), logging)
        .await
        .unwrap();
    Active {
        controller,
        transport,
        _rt: rt,
    }
}

/// Agent `agent-1` (its state in `<dir>/agent-state`) connecting to `to`.
fn agent(dir: &Path, to: &Active) -> tokio::sync::watch::Sender<bool> {
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let cfg = trellis::agent::worker::AgentConfig {
        name: "agent-1".into(),
        labels: vec!["linux".into()],
        secret: "agent-secret".into(),
        workspace: dir.join("work"),
        heartbeat: Duration::from_millis(200),
        logs: None,
        state_dir: Some(dir.join("agent-state")),
        executors: 1,
    };
    tokio::spawn(trellis::agent::worker::run_agent(
        to.transport.clone(),
        cfg,
        stop,
    ));
    stop_tx
}

fn job(run: &str) -> Job {
    Job::parse(
        &format!("name = \"j\"\nagent = \"linux\"\n[[step]]\nname = \"s\"\nrun = \"{run}\"\n"),
        "j.toml",
    )
    .unwrap()
}

fn refused_writes(c: &Controller) -> u64 {
    let mut m = String::new();
    c.render_metrics(&mut m);
    m.lines()
        .find_map(|l| l.strip_prefix("trellis_state_writes_refused_total "))
        .unwrap()
        .parse()
        .unwrap()
}

/// The run's status as the state directory has it (its record and journal).
fn on_disk(dir: &Path, run: &str) -> RunStatus {
    trellis::controller::state::read_run(&dir.join("state"), run)
        .unwrap()
        .unwrap()
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_controller_can_neither_write_state_nor_drive_agents() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    std::fs::create_dir_all(dir.join("state/logs")).unwrap();

    // A (token 5) is active, with an agent working on a run.
    let a = controller(dir, free_port(), 5).await;
    let stop = agent(dir, &a);
    wait_connected(&a.controller).await;
    let gate = dir.join("gate");
    let run = a
        .controller
        .submit(&job(&format!(
            "while [ ! -e {} ]; do sleep 0.05; done; echo done",
            gate.display()
        )))
        .unwrap();
    for _ in 0..100 {
        if on_disk(dir, &run.id) == RunStatus::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(on_disk(dir, &run.id), RunStatus::Running);

    // B (token 7) takes over the same state directory; A does not know yet.
    let b = controller(dir, free_port(), 7).await;
    assert_eq!(refused_writes(&a.controller), 0);
    std::fs::write(&gate, "").unwrap(); // the run ends; A hears of it and tries to record it
    for _ in 0..100 {
        if refused_writes(&a.controller) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        refused_writes(&a.controller) > 0,
        "A's write was refused and counted"
    );
    assert_eq!(
        on_disk(dir, &run.id),
        RunStatus::Running,
        "the state on disk is not A's to change any more"
    );
    // A cannot start anything either: the record of a new run is refused.
    let e = a.controller.submit(&job("true")).unwrap_err().to_string();
    assert!(e.contains("fencing token 5 is older than 7"), "{e}");

    // The agent moves to B and learns token 7; B runs work.
    stop.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stop = agent(dir, &b);
    wait_connected(&b.controller).await;
    let ok = b.controller.submit(&job("echo on b")).unwrap();
    let r = wait_final(&b.controller, &ok.id, Duration::from_secs(20)).await;
    assert_eq!(r.status, RunStatus::Succeeded);
    stop.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Pointed back at A (say A's address is what it reaches after a partition heals),
    // the agent refuses A's link: A never gets to give it an order.
    let _stop = agent(dir, &a);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        a.controller.connected_agents().is_empty(),
        "the agent refused the replaced controller"
    );
    // (A's own runs list shows the run as it last knew it; only B's view is on disk.)
    assert!(b.controller.run(&run.id).is_some());
}

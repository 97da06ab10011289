//! Controller and agent end to end, in one process, over the bundled plugins: the TCP
//! transport, file-logging and file-browser. Jobs run real shell steps.

mod common;

use common::*;
use std::time::Duration;
use trellis::controller::state::{RunRecord, RunStatus, StepStatus};
use trellis::controller::{Controller, Update};
use trellis::jobs::Job;
use trellis::points::bindings::log_browser::{LogCompleteness, PageRequest};
use trellis::protocol::{RunOutcome, StepOutcome};
use trellis_sdk::events::decode;

async fn wait_final(c: &Controller, id: &str) -> RunRecord {
    let mut updates = c.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(r) = c.run(id).filter(|r| r.status.is_final()) {
            return r;
        }
        match tokio::time::timeout_at(deadline, updates.recv()).await {
            Ok(Ok(Update::Run(r))) if r.id == id && r.status.is_final() => return r,
            Ok(_) => {}
            Err(_) => panic!("run {id} did not finish: {:?}", c.run(id)),
        }
    }
}

fn job(text: &str) -> Job {
    Job::parse(text, "job.toml").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_step_job_runs_and_its_log_is_complete_and_masked() {
    let s = stack().await;
    let (_agent, _stop) = start_agent(&s, "agent-1", "agent-secret");
    wait_connected(&s.controller).await;
    let run = s
        .controller
        .submit(&job(r#"
            name = "build"
            agent = "linux"
            env = { GREETING = "hello" }
            secrets = { TOKEN = "deploy-token" }
            [[step]]
            name = "greet"
            run = "echo $GREETING; echo token=$TOKEN >&2"
            [[step]]
            name = "count"
            run = "seq 1 5000"
            "#))
        .unwrap();
    let r = wait_final(&s.controller, &run.id).await;
    assert_eq!(r.status, RunStatus::Succeeded, "{r:?}");
    assert_eq!(r.events, 5002);
    assert!(r.steps.iter().all(|st| st.status == StepStatus::Succeeded));

    let meta = meta("build", &run.id);
    let meta = trellis::points::bindings::types::LogMetadata {
        instance_id: "test-controller".into(),
        ..meta
    };
    assert!(matches!(
        s.reader.completeness(&meta).await.unwrap(),
        LogCompleteness::Complete(5002)
    ));
    let greet = s
        .reader
        .read(
            &meta,
            PageRequest {
                step: Some("greet".into()),
                cursor: None,
                limit: 10,
            },
        )
        .await
        .unwrap();
    // stdout and stderr are separate pipes: each keeps its order, not their interleaving
    let mut texts: Vec<String> = decode(&greet.events)
        .unwrap()
        .iter()
        .map(|e| e.message.to_string())
        .collect();
    texts.sort();
    assert_eq!(
        texts,
        vec!["hello", "token=****"],
        "the secret is masked before it is logged"
    );
    let count = s
        .reader
        .read(
            &meta,
            PageRequest {
                step: Some("count".into()),
                cursor: None,
                limit: 10_000,
            },
        )
        .await
        .unwrap();
    let n: Vec<String> = decode(&count.events)
        .unwrap()
        .iter()
        .map(|e| e.message.to_string())
        .collect();
    assert_eq!(n, (1..=5000).map(|i| i.to_string()).collect::<Vec<_>>());
    // the run record is on disk
    let on_disk =
        std::fs::read_to_string(s.dir.path().join(format!("state/runs/{}/run.json", run.id)))
            .unwrap();
    assert!(on_disk.contains("\"succeeded\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_steps_timeouts_and_cancel() {
    let s = stack().await;
    let (_agent, _stop) = start_agent(&s, "agent-1", "agent-secret");
    wait_connected(&s.controller).await;

    let run = s.controller.submit(&job("name = \"f\"\nagent = \"linux\"\n[[step]]\nname = \"a\"\nrun = \"exit 3\"\n[[step]]\nname = \"b\"\nrun = \"true\"\n")).unwrap();
    let r = wait_final(&s.controller, &run.id).await;
    assert_eq!(r.status, RunStatus::Failed);
    assert_eq!(
        r.outcome,
        Some(RunOutcome::Failed {
            step: "a".into(),
            outcome: StepOutcome::Exited { code: 3 }
        })
    );
    assert_eq!(r.steps[1].status, StepStatus::Skipped);

    let run = s.controller.submit(&job("name = \"t\"\nagent = \"linux\"\n[[step]]\nname = \"slow\"\nrun = \"sleep 30\"\ntimeout = \"300ms\"\n")).unwrap();
    let r = wait_final(&s.controller, &run.id).await;
    assert_eq!(r.status, RunStatus::TimedOut, "{r:?}");

    let run = s
        .controller
        .submit(&job(
            "name = \"c\"\nagent = \"linux\"\n[[step]]\nname = \"long\"\nrun = \"sleep 30\"\n",
        ))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(s.controller.cancel(&run.id));
    let r = wait_final(&s.controller, &run.id).await;
    assert_eq!(r.status, RunStatus::Cancelled);

    let err = s
        .controller
        .submit(&job(
            "name = \"x\"\nagent = \"windows\"\n[[step]]\nname = \"s\"\nrun = \"true\"\n",
        ))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("no connected agent has label `windows`"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_agent_secret_is_refused_and_nothing_runs() {
    let s = stack().await;
    let (agent, _stop) = start_agent(&s, "agent-1", "not-the-secret");
    let err = tokio::time::timeout(Duration::from_secs(15), agent)
        .await
        .expect("the agent gives up")
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("wrong secret"), "{err}");
    assert!(s.controller.connected_agents().is_empty());
    let e = s
        .controller
        .submit(&job(
            "name = \"x\"\nagent = \"linux\"\n[[step]]\nname = \"s\"\nrun = \"true\"\n",
        ))
        .unwrap_err();
    assert!(e.to_string().contains("no connected agent"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_line_step_is_stored_exactly_once_in_order() {
    let s = stack().await;
    let (_agent, _stop) = start_agent(&s, "agent-1", "agent-secret");
    wait_connected(&s.controller).await;
    let t = std::time::Instant::now();
    let run = s.controller.submit(&job("name = \"big\"\nagent = \"linux\"\n[[step]]\nname = \"seq\"\nrun = \"seq 1 1000000\"\n")).unwrap();
    let mut updates = s.controller.subscribe();
    let r = loop {
        if let Some(r) = s.controller.run(&run.id).filter(|r| r.status.is_final()) {
            break r;
        }
        match tokio::time::timeout(Duration::from_secs(120), updates.recv()).await {
            Ok(Ok(Update::Run(r))) if r.id == run.id && r.status.is_final() => break r,
            Ok(_) => {}
            Err(_) => panic!("no progress for 120 s: {:?}", s.controller.run(&run.id)),
        }
    };
    let took = t.elapsed();
    assert_eq!(r.status, RunStatus::Succeeded);
    assert_eq!(r.events, 1_000_000);
    let text = std::fs::read_to_string(
        s.dir
            .path()
            .join(format!("state/logs/big/{}.jsonl", run.id)),
    )
    .unwrap();
    let mut n = 0u64;
    for line in text.lines() {
        n += 1;
        let want = format!("\"seq\":{n},");
        let msg = format!("\"message\":\"{n}\"");
        assert!(
            line.contains(&want) && line.contains(&msg),
            "line {n}: {line}"
        );
    }
    assert_eq!(n, 1_000_000);
    eprintln!(
        "1,000,000 lines stored in {took:?} ({:.0} lines/s, debug build)",
        1e6 / took.as_secs_f64()
    );
}

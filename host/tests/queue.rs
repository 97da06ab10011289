//! The build queue, in-process over the real TCP transport: a run waits `queued` until
//! an agent with its label has a free executor; priority order; `queue-timeout`; cancel
//! while queued; a label no agent has declared waits until one connects; and a burst of
//! concurrent submits over HTTP never puts more runs on an agent than its executors —
//! as the controller placed them, and as the steps really ran.

mod common;

use common::*;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis::api::access::{Access, AccessConfig, Role, TokenStore};
use trellis::api::{Api, serve};
use trellis::controller::state::RunStatus;
use trellis::controller::{Controller, Update};
use trellis::jobs::Job;
use trellis::points::browser::LogReader;

/// A controller (TCP transport on a free loopback port, file logging) that knows
/// `agents` (name = secret).
struct Queued {
    controller: Arc<Controller>,
    runtime: Arc<trellis::runtime::Runtime>,
    transport: Arc<trellis::runtime::Plugin>,
    dir: tempfile::TempDir,
    stops: Vec<tokio::sync::watch::Sender<bool>>,
}

async fn controller(agents: &[&str]) -> Queued {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("state/logs")).unwrap();
    let port = free_port();
    let rt = runtime(
        &format!(
            r#"
            [plugins.tcp-transport]
            sockets = {{ bind = ["127.0.0.1:{port}"], connect = ["127.0.0.1:{port}"] }}
            config = {{ address = "127.0.0.1:{port}" }}
            [plugins.file-logging]
            dirs = [{{ host = "state/logs", guest = "/logs", mode = "read-write" }}]
            [plugins.file-browser]
            dirs = [{{ host = "state/logs", guest = "/logs" }}]
            "#
        ),
        dir.path(),
        &[],
    );
    let transport = rt.load(&bundle().join("tcp-transport")).await.unwrap();
    let logging = rt.load(&bundle().join("file-logging")).await.unwrap();
    rt.load(&bundle().join("file-browser")).await.unwrap();
    let cfg = trellis::controller::ControllerConfig {
        instance_id: "queue-test".into(),
        state_dir: dir.path().join("state"),
        agents: agents
            .iter()
            .map(|a| (a.to_string(), format!("{a}-secret")))
            .collect(),
        secrets: job_secrets(),
        heartbeat: Duration::from_millis(200),
        agent_lost_after: Duration::from_secs(30),
        log_buffer_limit: trellis::controller::DEFAULT_LOG_BUFFER_LIMIT,
        multiline_start: None,
        fencing_token: 0,
        retention: Default::default(),
    };
    let controller = Controller::start(cfg, transport.clone(), logging)
        .await
        .unwrap();
    Queued {
        controller,
        runtime: rt,
        transport,
        dir,
        stops: Vec::new(),
    }
}

impl Queued {
    /// Start agent `name` with `labels` and `executors`; its workspace is
    /// `<dir>/work-<name>` (a run's steps run in `<workspace>/<run>/`).
    fn agent(&mut self, name: &str, labels: &[&str], executors: u32) {
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let cfg = trellis::agent::worker::AgentConfig {
            name: name.into(),
            labels: labels.iter().map(|l| l.to_string()).collect(),
            secret: format!("{name}-secret"),
            workspace: self.workspace(name),
            heartbeat: Duration::from_millis(200),
            logs: None,
            state_dir: None,
            executors,
        };
        tokio::spawn(trellis::agent::worker::run_agent(
            self.transport.clone(),
            cfg,
            stop,
        ));
        self.stops.push(stop_tx);
    }

    fn workspace(&self, agent: &str) -> PathBuf {
        self.dir.path().join(format!("work-{agent}"))
    }

    async fn wait_agents(&self, n: usize) {
        for _ in 0..400 {
            if self.controller.connected_agents().len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "{n} agents did not connect: {:?}",
            self.controller.connected_agents()
        );
    }

    fn submit(&self, text: &str) -> trellis::controller::state::RunRecord {
        let job = Job::parse(text, "job.toml").unwrap();
        self.controller.submit(&job).unwrap()
    }

    /// Open gate `name` (see `gated`).
    fn open(&self, name: &str) {
        std::fs::write(self.dir.path().join(name), "").unwrap();
    }

    /// A step that waits until gate `name` is opened (at most 60 s).
    fn gated(&self, job: &str, label: &str, gate: &str) -> String {
        let g = self.dir.path().join(gate);
        format!(
            "name = \"{job}\"\nagent = \"{label}\"\n[[step]]\nname = \"wait\"\nrun = \"n=0; while [ ! -e {} ] && [ $n -lt 1200 ]; do sleep 0.05; n=$((n+1)); done\"\n",
            g.display()
        )
    }
}

/// Wait until run `id` is running (its first step started).
async fn wait_running(c: &Controller, id: &str) {
    let mut updates = c.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if c.run(id).is_some_and(|r| r.status == RunStatus::Running) {
            return;
        }
        match tokio::time::timeout_at(deadline, updates.recv()).await {
            Ok(_) => {}
            Err(_) => panic!("run {id} did not start: {:?}", c.run(id)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_waits_for_a_free_executor_and_starts_when_one_frees() {
    let mut q = controller(&["queue-a1"]).await;
    q.agent("queue-a1", &["linux"], 1);
    q.wait_agents(1).await;
    let first = q.submit(&q.gated("first", "linux", "gate1"));
    wait_running(&q.controller, &first.id).await;
    let second = q.submit(
        "name = \"second\"\nagent = \"linux\"\n[[step]]\nname = \"s\"\nrun = \"echo second\"\n",
    );
    // The only executor is busy: the second run waits, on no agent, and says why.
    assert_eq!(second.status, RunStatus::Queued);
    assert_eq!(second.agent, "", "placed on a busy agent: {second:?}");
    assert_eq!(second.label, "linux");
    let view = q.controller.queue_view();
    assert_eq!(view.waiting.len(), 1, "{view:?}");
    assert_eq!(view.waiting[0].run, second.id);
    assert_eq!(view.waiting[0].position, 1);
    assert_eq!(
        view.waiting[0].reason, "the 1 executor of label `linux` is busy",
        "{view:?}"
    );
    assert_eq!(
        (
            view.labels[0].executors,
            view.labels[0].busy,
            view.labels[0].waiting
        ),
        (1, 1, 1),
        "{view:?}"
    );
    // It stays waiting while the first run goes on.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(q.controller.run(&second.id).unwrap().agent, "");
    q.open("gate1");
    let r = wait_final(&q.controller, &second.id, Duration::from_secs(30)).await;
    assert_eq!(r.status, RunStatus::Succeeded, "{r:?}");
    assert_eq!(r.agent, "queue-a1");
    let first = q.controller.run(&first.id).unwrap();
    assert_eq!(first.status, RunStatus::Succeeded);
    assert!(
        first.finished_ms.unwrap() <= r.finished_ms.unwrap(),
        "one at a time"
    );
    assert!(q.controller.queue_view().waiting.is_empty());
    // Its kept job is gone once it was placed.
    let kept: Vec<_> = std::fs::read_dir(q.dir.path().join("state/queue"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(kept.is_empty(), "{kept:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_goes_first_then_first_come_first_served() {
    let mut q = controller(&["queue-a1"]).await;
    q.agent("queue-a1", &["linux"], 1);
    q.wait_agents(1).await;
    let blocker = q.submit(&q.gated("blocker", "linux", "gate1"));
    wait_running(&q.controller, &blocker.id).await;
    // Each run appends its job's name to a file beside the runs' workspaces.
    let job = |name: &str, priority: i32| {
        format!(
            "name = \"{name}\"\nagent = \"linux\"\npriority = {priority}\n[[step]]\nname = \"s\"\nrun = \"echo {name} >> ../order\"\n"
        )
    };
    let ids: Vec<String> = [
        ("low-1", 0),
        ("high", 10),
        ("mid", 5),
        ("low-2", 0),
        ("below", -1),
    ]
    .iter()
    .map(|(n, p)| q.submit(&job(n, *p)).id)
    .collect();
    let view = q.controller.queue_view();
    let order: Vec<(&str, usize)> = view
        .waiting
        .iter()
        .map(|w| (w.job.as_str(), w.position))
        .collect();
    assert_eq!(
        order,
        [
            ("high", 1),
            ("mid", 2),
            ("low-1", 3),
            ("low-2", 4),
            ("below", 5)
        ],
        "{view:?}"
    );
    assert!(
        view.waiting[3]
            .reason
            .ends_with("; 3 runs of this label ahead of it"),
        "{view:?}"
    );
    q.open("gate1");
    for id in &ids {
        let r = wait_final(&q.controller, id, Duration::from_secs(30)).await;
        assert_eq!(r.status, RunStatus::Succeeded, "{r:?}");
    }
    let ran = std::fs::read_to_string(q.workspace("queue-a1").join("order")).unwrap();
    assert_eq!(
        ran.lines().collect::<Vec<_>>(),
        ["high", "mid", "low-1", "low-2", "below"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_waits_longer_than_its_queue_timeout_ends_with_a_note() {
    let mut q = controller(&["queue-a1"]).await;
    q.agent("queue-a1", &["linux"], 1);
    q.wait_agents(1).await;
    let started = std::time::Instant::now();
    let r = q.submit(
        "name = \"needs-gpu\"\nagent = \"gpu\"\nqueue-timeout = \"400ms\"\n[[step]]\nname = \"s\"\nrun = \"true\"\n",
    );
    assert_eq!(r.status, RunStatus::Queued);
    // A run without a timeout of the same label waits on.
    let patient =
        q.submit("name = \"patient\"\nagent = \"gpu\"\n[[step]]\nname = \"s\"\nrun = \"true\"\n");
    let r = wait_final(&q.controller, &r.id, Duration::from_secs(10)).await;
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(r.status, RunStatus::Cancelled, "{r:?}");
    assert_eq!(r.agent, "", "never placed");
    let note = r.note.unwrap_or_default();
    assert!(
        note.contains("longer than its queue-timeout (400ms)")
            && note.contains("no agent with label `gpu` is connected"),
        "{note}"
    );
    let view = q.controller.queue_view();
    assert_eq!(view.waiting.len(), 1, "{view:?}");
    assert_eq!(view.waiting[0].run, patient.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_run_can_be_cancelled_and_a_new_label_is_served_once_an_agent_declares_it() {
    let mut q = controller(&["queue-a1", "queue-arm"]).await;
    q.agent("queue-a1", &["linux"], 1);
    q.wait_agents(1).await;
    let doomed =
        q.submit("name = \"doomed\"\nagent = \"arm\"\n[[step]]\nname = \"s\"\nrun = \"true\"\n");
    let later = q.submit(
        "name = \"later\"\nagent = \"arm\"\n[[step]]\nname = \"s\"\nrun = \"echo on arm\"\n",
    );
    let view = q.controller.queue_view();
    assert!(
        view.waiting[0]
            .reason
            .contains("none has declared it to this controller (labels declared: linux)"),
        "{view:?}"
    );
    assert!(q.controller.cancel(&doomed.id));
    let r = q.controller.run(&doomed.id).unwrap();
    assert_eq!(r.status, RunStatus::Cancelled, "ends at once: {r:?}");
    assert!(
        r.note.unwrap().contains("cancelled while queued"),
        "the note says so"
    );
    assert!(!q.controller.cancel(&doomed.id), "already ended");
    assert!(
        !q.dir
            .path()
            .join(format!("state/queue/{}.json", doomed.id))
            .exists()
    );
    let view = q.controller.queue_view();
    assert_eq!(view.waiting.len(), 1, "{view:?}");
    assert_eq!(view.waiting[0].position, 1);
    // An agent with the label connects: the waiting run goes to it.
    q.agent("queue-arm", &["arm"], 1);
    let r = wait_final(&q.controller, &later.id, Duration::from_secs(30)).await;
    assert_eq!(r.status, RunStatus::Succeeded, "{r:?}");
    assert_eq!(r.agent, "queue-arm");
}

/// `Hello.executors` is the agent's own claim, so it is bounded before use
/// (docs/SECURITY.md): the controller clamps it to 1..=`MAX_EXECUTORS`. An agent that
/// claims 0 still takes its label's runs, one at a time; one that claims 1,000,000
/// counts as 1024. (The agents here skip `[agent]` config validation, which would
/// refuse both values: they stand for an agent process that lies.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_claiming_executors_out_of_range_is_clamped() {
    let max = trellis::config::MAX_EXECUTORS;
    let mut q = controller(&["claims-none", "claims-a-million"]).await;
    q.agent("claims-none", &["none"], 0);
    q.agent("claims-a-million", &["many"], 1_000_000);
    q.wait_agents(2).await;
    assert_eq!(q.controller.executors_of("claims-none"), Some((1, 0)));
    assert_eq!(
        q.controller.executors_of("claims-a-million"),
        Some((max, 0))
    );
    let seats = |label: &str| {
        let view = q.controller.queue_view();
        let l = view.labels.iter().find(|l| l.label == label).cloned();
        l.unwrap_or_else(|| panic!("no label `{label}` in the queue view: {view:?}"))
    };
    assert_eq!(seats("none").executors, 1);
    assert_eq!(seats("many").executors, max as usize);
    // Counted as one executor, not none: its runs are placed, one after the other.
    let gated = q.submit(&q.gated("first", "none", "gate-none"));
    wait_running(&q.controller, &gated.id).await;
    let second = q.submit(
        "name = \"second\"\nagent = \"none\"\n[[step]]\nname = \"s\"\nrun = \"echo ran\"\n",
    );
    assert_eq!(second.status, RunStatus::Queued, "{second:?}");
    assert_eq!(seats("none").busy, 1);
    q.open("gate-none");
    let second = wait_final(&q.controller, &second.id, Duration::from_secs(30)).await;
    assert_eq!(second.status, RunStatus::Succeeded, "{second:?}");
    assert_eq!(second.agent, "claims-none");
}

/// Twenty submits at once over HTTP to three agents with 1, 2 and 3 executors: no agent
/// ever has more runs placed on it than its executors (as the controller's updates say,
/// in order), nor runs more steps at once (as the steps' own start and end times say);
/// and the agent with 3 executors does run 3 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_concurrent_submits_never_double_books_an_executor() {
    const RUNS: usize = 20;
    let agents = [("queue-b1", 1u32), ("queue-b2", 2), ("queue-b3", 3)];
    let mut q = controller(&agents.map(|(n, _)| n)).await;
    for (name, executors) in agents {
        q.agent(name, &["linux"], executors);
    }
    q.wait_agents(agents.len()).await;
    let addr = serve_api(&q).await;
    let token = TokenStore::in_state_dir(&q.dir.path().join("state"))
        .create("burst", Role::Operator)
        .unwrap();

    // Follow every placement and end, in the order the controller announced them.
    let mut updates = q.controller.subscribe();
    let follower = tokio::spawn(async move {
        let mut placed: HashMap<String, HashSet<String>> = HashMap::new();
        let mut most: HashMap<String, usize> = HashMap::new();
        let mut ended = HashSet::new();
        while ended.len() < RUNS {
            let Ok(Update::Run(r)) = updates.recv().await else {
                continue;
            };
            if r.agent.is_empty() {
                continue;
            }
            let on = placed.entry(r.agent.clone()).or_default();
            if r.status.is_final() {
                on.remove(&r.id);
                ended.insert(r.id.clone());
            } else {
                on.insert(r.id.clone());
                let m = most.entry(r.agent.clone()).or_default();
                *m = (*m).max(on.len());
            }
        }
        most
    });

    // Each step notes its start and end (ns) beside its agent's runs, and holds 1 s.
    let job = "name = \"burst\"\nagent = \"linux\"\n[[step]]\nname = \"hold\"\nrun = \"echo start $(date +%s%N) >> ../spans; sleep 1; echo end $(date +%s%N) >> ../spans\"\n";
    let submits: Vec<_> = (0..RUNS)
        .map(|_| {
            let token = token.clone();
            tokio::spawn(async move { post(addr, &token, "/api/runs", job).await })
        })
        .collect();
    let mut ids = Vec::new();
    for s in submits {
        let (code, body) = s.await.unwrap();
        assert_eq!(code, 201, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        let r = wait_final(&q.controller, id, Duration::from_secs(120)).await;
        assert_eq!(r.status, RunStatus::Succeeded, "{r:?}");
    }
    let most = tokio::time::timeout(Duration::from_secs(10), follower)
        .await
        .expect("every end was announced")
        .unwrap();
    eprintln!("most runs placed at once per agent: {most:?}");
    let mut total = 0;
    for (name, executors) in agents {
        let spans = std::fs::read_to_string(q.workspace(name).join("spans")).unwrap_or_default();
        let (ran, at_once) = most_at_once(&spans);
        eprintln!("{name} ({executors} executors): {ran} runs, at most {at_once} at once");
        total += ran;
        let placed = most.get(name).copied().unwrap_or(0);
        assert!(
            placed <= executors as usize,
            "{name}: {placed} runs placed at once on {executors} executor(s)"
        );
        assert!(
            at_once <= executors as usize,
            "{name}: {at_once} steps ran at once on {executors} executor(s)"
        );
        assert!(ran > 0, "{name} ran nothing");
    }
    assert_eq!(total, RUNS);
    let (_, at_once) =
        most_at_once(&std::fs::read_to_string(q.workspace("queue-b3").join("spans")).unwrap());
    assert_eq!(at_once, 3, "3 executors run 3 steps at once");
}

/// (runs, most at once) from `start NS` / `end NS` lines.
fn most_at_once(spans: &str) -> (usize, usize) {
    let mut events: Vec<(u128, i32)> = spans
        .lines()
        .filter_map(|l| {
            let (what, ns) = l.split_once(' ')?;
            let ns: u128 = ns.trim().parse().ok()?;
            Some((ns, if what == "start" { 1 } else { -1 }))
        })
        .collect();
    // An end before a start at the same instant: touching is not overlapping.
    events.sort();
    let (mut now, mut most) = (0, 0);
    for (_, d) in &events {
        now += d;
        most = most.max(now);
    }
    let runs = events.iter().filter(|(_, d)| *d == 1).count();
    (runs, most as usize)
}

async fn serve_api(q: &Queued) -> SocketAddr {
    let api = Arc::new(Api {
        controller: q.controller.clone(),
        runtime: q.runtime.clone(),
        browsers: LogReader::new(q.runtime.get("file-browser").unwrap())
            .unwrap()
            .into(),
        instance_id: "queue-test".into(),
    });
    let access = Arc::new(Access::new(AccessConfig {
        state_dir: &q.dir.path().join("state"),
        bind: "127.0.0.1:0".parse().unwrap(),
        hosts: &[],
        open_metrics: false,
        tls: false,
    }));
    serve("127.0.0.1:0".parse().unwrap(), api, access, None)
        .await
        .unwrap()
}

/// POST `body` (a job, TOML) with `token`: (status, body).
async fn post(addr: SocketAddr, token: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\nconnection: close\r\ncontent-type: application/toml\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    let status = resp[9..12].parse().unwrap();
    let body = resp
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

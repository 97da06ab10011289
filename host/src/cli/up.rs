//! `trellis up JOB.toml`: a controller and local agents in one process, over the default
//! bundle (TCP transport on loopback, file logging and browsing under the state
//! directory), running one job and streaming its log — Trellis on one machine with no
//! external services, through the same extension points a cluster uses.

use crate::agent::worker::{AgentConfig, run_agent};
use crate::api::Api;
use crate::api::access::{Access, AccessConfig, Role};
use crate::capabilities::secrets::SecretStore;
use crate::config::{DaemonConfig, JobSecretRule};
use crate::controller::state::RunStatus;
use crate::controller::{Controller, ControllerConfig, Update};
use crate::jobs::Job;
use crate::jobs::secrets::{JobSecrets, problems_error};
use crate::points::browser::LogReader;
use crate::runtime::Runtime;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The name of the token `trellis up` makes for itself (and its runs' `submitted_by`).
const UP_TOKEN: &str = "trellis-up";

pub struct UpOptions {
    pub job: PathBuf,
    pub bundle: Option<PathBuf>,
    pub state: PathBuf,
    pub agents: u32,
    pub secrets: Option<PathBuf>,
}

fn bundle_dir(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let dir = match given {
        Some(d) => d.to_path_buf(),
        None => match std::env::var_os("TRELLIS_BUNDLE_DIR") {
            Some(d) => PathBuf::from(d),
            None => anyhow::bail!(
                "no plugin bundle: pass --bundle DIR or set TRELLIS_BUNDLE_DIR (cargo xtask bundle builds one)"
            ),
        },
    };
    for p in ["tcp-transport", "file-logging", "file-browser"] {
        if !dir.join(p).join("plugin.toml").is_file() {
            anyhow::bail!(
                "{} has no `{p}` plugin: build the default bundle with `cargo xtask bundle`",
                dir.display()
            );
        }
    }
    Ok(dir)
}

pub async fn up(o: UpOptions) -> anyhow::Result<ExitCode> {
    let job = Job::load(&o.job).map_err(|p| anyhow::anyhow!("{p}"))?;
    let bundle = bundle_dir(o.bundle.as_deref())?;
    let secrets = match &o.secrets {
        Some(f) => SecretStore::load(f)?,
        None => SecretStore::default(),
    };
    if let Some(name) = job.secrets.values().find(|n| !secrets.contains(n)) {
        anyhow::bail!(
            "job `{}` names secret `{name}`, which {}: pass a secrets file holding it (name = \"value\", mode 0600) with --secrets FILE",
            job.name,
            match &o.secrets {
                Some(f) => format!("{} does not hold", f.display()),
                None => "no secrets file was given for".to_string(),
            }
        );
    }
    // The secrets file given here is for this job: each of its secrets is a job secret
    // scoped to it (the local agents' secret is made below and is no job's).
    let rules = secrets
        .names()
        .map(|n| {
            (
                n.to_string(),
                JobSecretRule {
                    jobs: vec![job.name.clone()],
                },
            )
        })
        .collect();
    let job_secrets = JobSecrets::new(&rules, &secrets, Default::default()).map_err(|p| {
        let file = o.secrets.as_deref().unwrap_or(Path::new("--secrets"));
        problems_error(&file.display().to_string(), p)
    })?;
    let logs = o.state.join("logs");
    std::fs::create_dir_all(&logs)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = format!(
        r#"
        [plugins.tcp-transport]
        sockets = {{ bind = ["127.0.0.1:{port}"], connect = ["127.0.0.1:{port}"] }}
        config = {{ address = "127.0.0.1:{port}" }}
        [plugins.file-logging]
        dirs = [{{ host = "{logs}", guest = "/logs", mode = "read-write" }}]
        [plugins.file-browser]
        dirs = [{{ host = "{logs}", guest = "/logs" }}]
        "#,
        logs = logs.display()
    );
    let cfg = DaemonConfig::parse(&config, "(trellis up)", &o.state)
        .map_err(|p| anyhow::anyhow!("{p}"))?;
    let runtime = Runtime::with_secrets(cfg, secrets.clone())?;
    let load = |name: &str| {
        let runtime = runtime.clone();
        let path = bundle.join(name);
        async move {
            runtime
                .load(&path)
                .await
                .map_err(|p| anyhow::anyhow!("{p}"))
        }
    };
    let tcp = load("tcp-transport").await?;
    let logging = load("file-logging").await?;

    // Local agents get a fresh secret each time; it lives only in this process.
    let agent_secret = hex::encode(crate::session::auth::nonce());
    let names: Vec<String> = (1..=o.agents.max(1))
        .map(|i| format!("local-{i}"))
        .collect();
    let controller = Controller::start(
        ControllerConfig {
            instance_id: "local".into(),
            state_dir: o.state.clone(),
            agents: names
                .iter()
                .map(|n| (n.clone(), agent_secret.clone()))
                .collect::<HashMap<_, _>>(),
            secrets: job_secrets,
            heartbeat: crate::session::link::DEFAULT_HEARTBEAT,
            agent_lost_after: crate::controller::DEFAULT_AGENT_LOST_AFTER,
            log_buffer_limit: crate::controller::DEFAULT_LOG_BUFFER_LIMIT,
            multiline_start: None,
            fencing_token: 0,
            retention: Default::default(),
        },
        tcp.clone(),
        logging,
    )
    .await?;
    // Kept until the process ends: the agents stop with it (stopping them one by one
    // first would only make the controller log their departure).
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    for name in &names {
        let cfg = AgentConfig {
            name: name.clone(),
            labels: vec!["local".into(), job.agent.clone()],
            secret: agent_secret.clone(),
            workspace: o.state.join("workspace").join(name),
            heartbeat: crate::session::link::DEFAULT_HEARTBEAT,
            logs: None,
            state_dir: None,
            executors: 1,
        };
        tokio::spawn(run_agent(tcp.clone(), cfg, stop.clone()));
    }
    let started = Instant::now();
    while controller.connected_agents().len() < names.len() {
        if started.elapsed() > Duration::from_secs(15) {
            anyhow::bail!("the local agents did not connect within 15 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The web page and API while the job runs, on loopback, with an admin token made
    // for this process (printed: it is how the page and CLI get in) and revoked at the
    // end; the run records it as its submitter.
    let access = Arc::new(Access::new(AccessConfig {
        state_dir: &o.state,
        bind: ([127, 0, 0, 1], 0).into(),
        hosts: &[],
        open_metrics: false,
        tls: false,
    }));
    let _ = access.tokens.revoke(UP_TOKEN);
    let token = access
        .tokens
        .create(UP_TOKEN, Role::Admin)
        .map_err(|e| anyhow::anyhow!(e))?;
    let api = Arc::new(Api {
        controller: controller.clone(),
        runtime: runtime.clone(),
        browsers: LogReader::new(load("file-browser").await?)?.into(),
        instance_id: "local".into(),
    });
    let addr = crate::api::serve(([127, 0, 0, 1], 0).into(), api, access.clone(), None).await?;
    eprintln!("trellis: web page and API on http://{addr}/ while this runs (token {token})");

    let mut updates = controller.subscribe();
    let run = controller.submit_as(&job, UP_TOKEN)?;
    eprintln!(
        "trellis: run {} of job `{}` on {} ({} step(s))",
        run.id,
        job.name,
        run.agent,
        job.steps.len()
    );
    let t0 = Instant::now();
    let mut current_step = String::new();
    let finished = loop {
        match updates.recv().await {
            Ok(Update::Line {
                run: r, step, text, ..
            }) if r == run.id => {
                if step != current_step {
                    eprintln!("trellis: ── step {step}");
                    current_step = step;
                }
                println!("{text}");
            }
            Ok(Update::Run(r)) if r.id == run.id && r.status.is_final() => break *r,
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                eprintln!("trellis: ({n} lines not shown; the log has them all)")
            }
            Err(_) => anyhow::bail!("the controller stopped"),
        }
    };
    controller.stop();
    let _ = access.tokens.revoke(UP_TOKEN);
    let took = t0.elapsed().as_secs_f64();
    let how = match &finished.outcome {
        Some(o) => serde_json::to_string(o).unwrap_or_default(),
        None => String::new(),
    };
    eprintln!(
        "trellis: run {} {} in {took:.1}s, {} log line(s) in {} {how}",
        finished.id,
        serde_json::to_string(&finished.status)
            .unwrap_or_default()
            .trim_matches('"'),
        finished.events,
        logs.join(&job.name)
            .join(format!("{}.jsonl", finished.id))
            .display()
    );
    for a in &finished.artifacts {
        eprintln!(
            "trellis: artifact {} ({} bytes, sha256 {}) in {}",
            a.name,
            a.size,
            a.sha256,
            o.state
                .join("runs")
                .join(&finished.id)
                .join("artifacts")
                .join(&a.name)
                .display()
        );
    }
    Ok(if finished.status == RunStatus::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

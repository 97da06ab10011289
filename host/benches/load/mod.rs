//! The load generator (issue 19): N simulated agents in this process against a real
//! release `trellis controller` process, measured in one run.
//!
//! * The controller is the `trellis` binary, started with a config of its own in a
//!   temporary directory, on free loopback ports, every agent enrolled with a secret;
//!   submits go through its HTTP API with an operator token.
//! * Each simulated agent (`agent.rs`) is a real session over the real transport plugin,
//!   loaded through this process's `Runtime` like the agent daemon loads it: the sealed
//!   handshake with the agent's secret, heartbeats, orders received, a trivial step
//!   answered at once (no process spawned: one line of output, then success), results
//!   sent and acknowledged.
//!
//! What is measured and how is in docs/SCALE.md ("The load generator").

pub mod agent;
pub mod controller;
pub mod http;

use agent::{Behaviour, Identity, Tally, wall_us};
use anyhow::{Context, Result};
use controller::{ControllerProcess, Transport};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;
use trellis::config::DaemonConfig;
use trellis::runtime::{Plugin, Runtime};

/// The knobs, from the environment; the defaults are the targets.
#[derive(Debug, Clone)]
pub struct Params {
    /// TRELLIS_SCALE_AGENTS: simulated agents over tcp-transport.
    pub agents: usize,
    /// TRELLIS_SCALE_RATE: submits per second during the load phase.
    pub rate: f64,
    /// TRELLIS_SCALE_SECONDS: how long the load phase submits.
    pub seconds: f64,
    /// TRELLIS_SCALE_IDLE_SECONDS: how long the controller's idle CPU is measured.
    pub idle_seconds: f64,
    /// TRELLIS_SCALE_CONNECT_WITHIN: how long the agents get to connect before the run
    /// goes on with those that did.
    pub connect_within: Duration,
    /// TRELLIS_SCALE_WAIT_MS: how long a simulated agent's exchange round waits in the
    /// plugin's `receive` (see `agent::Behaviour::wait_ms`).
    pub wait_ms: u32,
    /// TRELLIS_SCALE_KAFKA_AGENTS: simulated agents over kafka-transport (0: skip).
    pub kafka_agents: usize,
    /// TRELLIS_SCALE_KAFKA_COMMANDS: commands timed per Kafka configuration (300: the
    /// p99 of 100 samples is about their second largest; on 8 December 2026 one run of
    /// 100 gave a ratio of 3.74x where two runs of 300 gave 2.21x and 2.46x).
    pub kafka_commands: usize,
    /// TRELLIS_SCALE_ONLY: `tcp` or `kafka` to run one part alone.
    pub only: String,
}

fn env_num(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

impl Params {
    pub fn from_env() -> Params {
        Params {
            agents: env_num("TRELLIS_SCALE_AGENTS", 500.0).max(1.0) as usize,
            rate: env_num("TRELLIS_SCALE_RATE", 50.0).max(0.1),
            seconds: env_num("TRELLIS_SCALE_SECONDS", 60.0).max(0.0),
            idle_seconds: env_num("TRELLIS_SCALE_IDLE_SECONDS", 30.0).max(1.0),
            connect_within: Duration::from_secs_f64(
                env_num("TRELLIS_SCALE_CONNECT_WITHIN", 120.0).max(1.0),
            ),
            wait_ms: env_num("TRELLIS_SCALE_WAIT_MS", 250.0).max(0.0) as u32,
            kafka_agents: env_num("TRELLIS_SCALE_KAFKA_AGENTS", 100.0) as usize,
            kafka_commands: env_num("TRELLIS_SCALE_KAFKA_COMMANDS", 300.0).max(1.0) as usize,
            only: std::env::var("TRELLIS_SCALE_ONLY").unwrap_or_default(),
        }
    }

    pub fn runs(&self, part: &str) -> bool {
        self.only.is_empty() || self.only == part
    }
}

/// Where the binary and the plugins are.
pub struct Setup {
    /// The `trellis` binary (release, from `cargo bench`).
    pub trellis: PathBuf,
    /// The plugin bundle (`cargo xtask bundle`).
    pub bundle: PathBuf,
}

/// The agents' heartbeat: the daemons' default.
const HEARTBEAT: Duration = trellis::session::link::DEFAULT_HEARTBEAT;

/// The job every submit runs: one step, answered by the simulated agent.
const JOB: &str = "name = \"load\"\nagent = \"load\"\n\n[[step]]\nname = \"answer\"\nrun = \"true\"\ntimeout = \"1m\"\n";

/// How long, after the last submit, the runs get to finish before the ones left are
/// counted unfinished.
const DRAIN: Duration = Duration::from_secs(60);

/// Everything one tcp-transport run measured.
#[derive(Debug, Default)]
pub struct TcpReport {
    pub agents: usize,
    pub connected: usize,
    /// Until every agent was welcomed (None: not all did within `connect_within`).
    pub connect_time: Option<Duration>,
    /// Until `connect_within` or all connected, whichever came first.
    pub connect_waited: Duration,
    /// Agents the controller's API listed as connected after the connect phase.
    pub api_connected: usize,
    /// The controller's `[plugins.tcp-transport] limits` the run set (empty: none).
    pub controller_limits: String,
    pub idle: Cpu,
    pub load: Cpu,
    pub submitted: usize,
    pub accepted: usize,
    /// Submits refused, by status (and why, the first of each).
    pub refused: Vec<(u16, usize, String)>,
    pub submit_errors: usize,
    pub finished: usize,
    pub succeeded: usize,
    /// Sorted, in µs.
    pub to_running: Vec<i64>,
    pub to_finished: Vec<i64>,
    /// The HTTP submit call alone (sorted, µs).
    pub submit_call: Vec<i64>,
    pub submits_per_second: f64,
    pub finished_per_second: f64,
    pub vm_hwm: u64,
    pub vm_rss: u64,
    pub links_lost: u64,
    pub handshakes_failed: u64,
    pub errors: Vec<String>,
}

/// CPU used over a window, in cores (1.0 = one core busy all the time).
#[derive(Debug, Default, Clone, Copy)]
pub struct Cpu {
    pub seconds: f64,
    pub controller: f64,
    pub generator: f64,
    /// The whole machine, in cores (of `nproc`).
    pub machine: f64,
}

/// Measure CPU use over `f`.
async fn cpu_over<T>(pid: u32, f: impl std::future::Future<Output = T>) -> (T, Cpu) {
    let (c0, g0, m0, t0) = (
        controller::cpu_of(pid),
        controller::own_cpu(),
        controller::machine_busy(),
        Instant::now(),
    );
    let out = f.await;
    let secs = t0.elapsed().as_secs_f64();
    let (c1, g1, m1) = (
        controller::cpu_of(pid),
        controller::own_cpu(),
        controller::machine_busy(),
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let machine = if m1.1 > m0.1 {
        (m1.0 - m0.0) as f64 / (m1.1 - m0.1) as f64 * cores
    } else {
        0.0
    };
    (
        out,
        Cpu {
            seconds: secs,
            controller: (c1 - c0).as_secs_f64() / secs,
            generator: (g1 - g0).as_secs_f64() / secs,
            machine,
        },
    )
}

/// This process's runtime, holding one transport instance per simulated agent: the
/// instance pool and the plugin's instance and memory budgets raised for `agents`.
async fn agents_runtime(
    setup: &Setup,
    dir: &Path,
    transport: &Transport,
    agents: usize,
) -> Result<(Arc<Runtime>, Arc<Plugin>)> {
    let instances = agents as u32 + 16;
    let limits = format!(
        "limits = {{ max-instances = {instances}, reserved-instances = {instances}, total-memory = \"{}MiB\" }}\n",
        (instances as u64 * 16).max(1024)
    );
    let config = format!(
        "[runtime]\nplugin-dir = \"{}\"\ninstance-pool = {}\n{}",
        setup.bundle.display(),
        instances + 16,
        transport.sections(false, &limits)
    );
    let cfg = DaemonConfig::parse(&config, "load-agents.toml", dir)
        .map_err(|p| anyhow::anyhow!("the simulated agents' config: {p}"))?;
    let rt = Runtime::new(cfg)?;
    let plugin = rt
        .load(&setup.bundle.join(transport.plugin()))
        .await
        .map_err(|p| anyhow::anyhow!("loading {}: {p}", transport.plugin()))?;
    Ok((rt, plugin))
}

/// Start one simulated agent per identity; they run until `stop`.
fn spawn_agents(
    plugin: &Arc<Plugin>,
    who: &[(String, String)],
    how: Behaviour,
    tally: &Arc<Tally>,
    stop: &watch::Receiver<bool>,
) -> JoinSet<()> {
    let mut set = JoinSet::new();
    for (name, secret) in who {
        let me = Identity {
            name: name.clone(),
            secret: secret.clone(),
            label: "load".into(),
        };
        set.spawn(agent::run(
            plugin.clone(),
            me,
            how,
            tally.clone(),
            stop.clone(),
        ));
    }
    set
}

/// Wait until `n` agents were welcomed, or `within`: how long it took (None: not all).
async fn wait_connected(tally: &Tally, n: usize, within: Duration) -> (Option<Duration>, Duration) {
    let t = Instant::now();
    loop {
        if tally.connected.load(Relaxed) >= n {
            return (Some(t.elapsed()), t.elapsed());
        }
        if t.elapsed() > within {
            return (None, t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How many agents the controller's API lists as connected.
async fn api_connected(c: &ControllerProcess) -> usize {
    match http::request(c.http, &c.token, "GET", "/api/agents", None).await {
        Ok((200, body)) => serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.as_array().map(|a| a.len()))
            .unwrap_or(0),
        _ => 0,
    }
}

/// One submit through the API: when it was made (µs, wall clock), how long the call
/// took, and the run's id or why not.
struct Submit {
    at_us: i64,
    call_us: i64,
    outcome: Result<String, (u16, String)>,
}

async fn submit(c: &ControllerProcess) -> Submit {
    let at_us = wall_us();
    let r = http::request(c.http, &c.token, "POST", "/api/runs", Some(JOB)).await;
    let call_us = wall_us() - at_us;
    let outcome = match r {
        Ok((201, body)) => serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["id"].as_str().map(str::to_string))
            .ok_or((201, format!("no run id in the answer: {body}"))),
        Ok((status, body)) => Err((status, body)),
        Err(e) => Err((0, e.to_string())),
    };
    Submit {
        at_us,
        call_us,
        outcome,
    }
}

/// Submit at `rate` per second for `seconds`, open loop: each submit starts on its
/// schedule whether or not earlier ones were answered.
async fn submit_at_rate(c: &Arc<ControllerProcess>, rate: f64, seconds: f64) -> Vec<Submit> {
    let total = (rate * seconds).round() as usize;
    let every = Duration::from_secs_f64(1.0 / rate);
    let start = tokio::time::Instant::now();
    let mut calls = JoinSet::new();
    for i in 0..total {
        tokio::time::sleep_until(start + every * i as u32).await;
        let c = c.clone();
        calls.spawn(async move { submit(&c).await });
    }
    let mut out = Vec::with_capacity(total);
    while let Some(s) = calls.join_next().await {
        out.push(s.expect("a submit task"));
    }
    out
}

/// A run's record as the API gives it: (status, finished_ms).
async fn run_status(c: &ControllerProcess, id: &str) -> Option<(String, Option<i64>)> {
    let (status, body) = http::request(c.http, &c.token, "GET", &format!("/api/runs/{id}"), None)
        .await
        .ok()?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    Some((v["status"].as_str()?.to_string(), v["finished_ms"].as_i64()))
}

const FINAL: [&str; 5] = ["succeeded", "failed", "timed-out", "cancelled", "lost"];

/// Read every run's final record, waiting up to `DRAIN` for the unfinished: id ->
/// (status, finished_ms). Runs still unfinished then are left out.
async fn final_records(
    c: &Arc<ControllerProcess>,
    ids: &[String],
) -> HashMap<String, (String, i64)> {
    let mut done = HashMap::new();
    let mut left: Vec<String> = ids.to_vec();
    let deadline = Instant::now() + DRAIN;
    while !left.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        // A few at a time: the reads come after the measured phase, but stay gentle.
        for chunk in left.chunks(8) {
            let mut reads = JoinSet::new();
            for id in chunk {
                let (c, id) = (c.clone(), id.clone());
                reads.spawn(async move {
                    let s = run_status(&c, &id).await;
                    (id, s)
                });
            }
            while let Some(r) = reads.join_next().await {
                let (id, s) = r.expect("a read task");
                match s {
                    Some((status, Some(fin))) if FINAL.contains(&status.as_str()) => {
                        done.insert(id, (status, fin));
                    }
                    _ => still.push(id),
                }
            }
        }
        left = still;
        if !left.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    done
}

/// The controller's transport limits for `agents` links over tcp-transport: every
/// accepted link lives in the listener's one instance and holds three handles there (its
/// socket and two streams) and a pollable while polled, against `max-resources`
/// (default 1024). Empty when the default holds them.
pub fn controller_tcp_limits(agents: usize) -> String {
    let needed = 4 * agents + 256;
    if needed <= 1024 {
        String::new()
    } else {
        format!("limits = {{ max-resources = {needed} }}\n")
    }
}

/// The tcp-transport part: N agents, connect, idle, load, RSS.
pub async fn run_tcp(p: &Params, setup: &Setup) -> Result<TcpReport> {
    let tmp = tempfile::Builder::new().prefix("load-scale-").tempdir()?;
    let dir = tmp.path();
    let port = controller::free_port();
    let transport = Transport::Tcp { port };
    let who = controller::agent_names(p.agents);
    let limits = controller_tcp_limits(p.agents);
    let c = Arc::new(controller::start(
        &setup.trellis,
        &setup.bundle,
        &dir.join("controller"),
        &transport,
        &who,
        &limits,
    )?);
    let pid = c.pid();
    let (_rt, plugin) = agents_runtime(setup, dir, &transport, p.agents).await?;
    let mut r = TcpReport {
        agents: p.agents,
        controller_limits: limits.trim().to_string(),
        ..Default::default()
    };
    let tally = Arc::new(Tally::default());
    let (stop_tx, stop) = watch::channel(false);
    let how = Behaviour {
        heartbeat: HEARTBEAT,
        wait_ms: p.wait_ms,
    };
    // Connect: every agent at once.
    let mut agents = spawn_agents(&plugin, &who, how, &tally, &stop);
    (r.connect_time, r.connect_waited) = wait_connected(&tally, p.agents, p.connect_within).await;
    r.connected = tally.connected.load(Relaxed);
    // Let the last handshakes' work settle before the idle window.
    tokio::time::sleep(Duration::from_secs(3)).await;
    r.api_connected = api_connected(&c).await;
    // Idle: nothing submitted, every link heartbeating.
    (_, r.idle) = cpu_over(
        pid,
        tokio::time::sleep(Duration::from_secs_f64(p.idle_seconds)),
    )
    .await;
    // Load: submits at the rate, answered at once by the agents.
    let load_start = Instant::now();
    let (submits, load_cpu) = cpu_over(pid, submit_at_rate(&c, p.rate, p.seconds)).await;
    r.load = load_cpu;
    let submit_span = load_start.elapsed().as_secs_f64();
    r.submitted = submits.len();
    let mut ids = Vec::new();
    let mut refused: HashMap<u16, (usize, String)> = HashMap::new();
    let first_submit = submits.iter().map(|s| s.at_us).min().unwrap_or(0);
    for s in &submits {
        match &s.outcome {
            Ok(id) => ids.push(id.clone()),
            Err((0, _)) => r.submit_errors += 1,
            Err((status, why)) => {
                refused
                    .entry(*status)
                    .or_insert_with(|| (0, why.chars().take(200).collect()))
                    .0 += 1
            }
        }
    }
    r.accepted = ids.len();
    r.refused = refused.into_iter().map(|(s, (n, w))| (s, n, w)).collect();
    r.submits_per_second = r.submitted as f64 / submit_span.max(1e-9);
    r.submit_call = submits.iter().map(|s| s.call_us).collect();
    r.submit_call.sort_unstable();
    // Drain: every accepted run's final record.
    let records = final_records(&c, &ids).await;
    (r.vm_hwm, r.vm_rss) = controller::rss_of(pid);
    let orders = tally.orders.lock().unwrap().clone();
    let mut last_finish_us = first_submit;
    for s in &submits {
        let Ok(id) = &s.outcome else { continue };
        if let Some(at) = orders.get(id) {
            r.to_running.push((at - s.at_us).max(0));
        }
        if let Some((status, fin_ms)) = records.get(id) {
            r.finished += 1;
            if status == "succeeded" {
                r.succeeded += 1;
            }
            // finished_ms is whole milliseconds: up to 1 ms early here.
            r.to_finished.push((fin_ms * 1000 - s.at_us).max(0));
            last_finish_us = last_finish_us.max(fin_ms * 1000);
        }
    }
    r.to_running.sort_unstable();
    r.to_finished.sort_unstable();
    let span = (last_finish_us - first_submit) as f64 / 1e6;
    r.finished_per_second = if span > 0.0 {
        r.finished as f64 / span
    } else {
        0.0
    };
    r.links_lost = tally.links_lost.load(Relaxed);
    r.handshakes_failed = tally.handshakes_failed.load(Relaxed);
    r.errors = tally.errors.lock().unwrap().clone();
    let _ = stop_tx.send(true);
    agents.abort_all();
    while agents.join_next().await.is_some() {}
    drop(c);
    Ok(r)
}

/// The Kafka part: command latency (submit until the order is at its agent) with one
/// agent, then with `kafka_agents` agents, against a broker at `brokers`.
#[derive(Debug, Default)]
pub struct KafkaReport {
    /// (agents, latencies sorted in µs).
    pub runs: Vec<(usize, Vec<i64>)>,
    pub errors: Vec<String>,
}

pub async fn run_kafka(p: &Params, setup: &Setup, brokers: &str) -> Result<KafkaReport> {
    let mut report = KafkaReport::default();
    for n in [1, p.kafka_agents.max(1)] {
        let tmp = tempfile::Builder::new().prefix("load-kafka-").tempdir()?;
        let dir = tmp.path();
        // Topics of its own: no run inherits another's partitions.
        let prefix = format!(
            "load{n}x{}",
            &hex::encode(trellis::session::auth::nonce())[..8]
        );
        let transport = Transport::Kafka {
            brokers: brokers.to_string(),
            prefix,
        };
        let who = controller::agent_names(n);
        let c = Arc::new(controller::start(
            &setup.trellis,
            &setup.bundle,
            &dir.join("controller"),
            &transport,
            &who,
            "",
        )?);
        let (_rt, plugin) = agents_runtime(setup, dir, &transport, n).await?;
        let tally = Arc::new(Tally::default());
        let (stop_tx, stop) = watch::channel(false);
        let how = Behaviour {
            heartbeat: HEARTBEAT,
            wait_ms: p.wait_ms,
        };
        let mut agents = spawn_agents(&plugin, &who, how, &tally, &stop);
        let (all, waited) = wait_connected(&tally, n, p.connect_within).await;
        if all.is_none() {
            report.errors.push(format!(
                "{n} agent(s) over Kafka: only {} connected within {waited:?}",
                tally.connected.load(Relaxed)
            ));
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        // One command at a time, so each measures the path, not a queue.
        let mut latencies = Vec::new();
        for _ in 0..p.kafka_commands {
            let s = submit(&c).await;
            let id = match s.outcome {
                Ok(id) => id,
                Err(e) => {
                    report
                        .errors
                        .push(format!("{n} agent(s): a submit failed: {e:?}"));
                    break;
                }
            };
            let t = Instant::now();
            let at = loop {
                if let Some(at) = tally.orders.lock().unwrap().get(&id) {
                    break Some(*at);
                }
                if t.elapsed() > Duration::from_secs(30) {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            match at {
                Some(at) => latencies.push(at - s.at_us),
                None => {
                    report
                        .errors
                        .push(format!("{n} agent(s): run {id}'s order never arrived"));
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        latencies.sort_unstable();
        report.runs.push((n, latencies));
        let _ = stop_tx.send(true);
        agents.abort_all();
        while agents.join_next().await.is_some() {}
        drop(c);
    }
    Ok(report)
}

/// The `q` quantile of sorted µs, as a Duration (None: empty).
pub fn quantile(sorted: &[i64], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(Duration::from_micros(sorted[i].max(0) as u64))
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT MET" }
}

/// The tcp-transport figures, each against its target.
pub fn print_tcp(p: &Params, r: &TcpReport) {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "\n== scale: {} simulated agents over tcp-transport, one controller process ==",
        r.agents
    );
    if !r.controller_limits.is_empty() {
        println!(
            "controller config raised for {} links: [plugins.tcp-transport] {}",
            r.agents, r.controller_limits
        );
    }
    let connect = match r.connect_time {
        Some(t) => format!(
            "all {} agents connected in {:.1} s",
            r.agents,
            t.as_secs_f64()
        ),
        None => format!(
            "{} of {} agents connected within {:.0} s",
            r.connected,
            r.agents,
            r.connect_waited.as_secs_f64()
        ),
    };
    let connect_met = r.connect_time.is_some_and(|t| t <= Duration::from_secs(30));
    println!(
        "{connect:<58} target all in <= 30 s     {}",
        verdict(connect_met)
    );
    println!(
        "  (the controller's API then listed {} connected; handshakes failed and retried: {}; links lost after a welcome: {})",
        r.api_connected, r.handshakes_failed, r.links_lost
    );
    println!(
        "{:<58} target <= 25 % of a core  {}",
        format!(
            "idle controller CPU {:.1} % of one core ({:.0} s)",
            r.idle.controller * 100.0,
            r.idle.seconds
        ),
        verdict(r.idle.controller <= 0.25)
    );
    println!(
        "  meanwhile: the generator {:.1} % of one core, the machine {:.0} % of one core ({} cores)",
        r.idle.generator * 100.0,
        r.idle.machine * 100.0,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "load: {} submits at {:.1}/s for {:.0} s ({:.1}/s achieved): {} accepted, {} finished ({} succeeded), {} transport errors",
        r.submitted,
        p.rate,
        p.seconds,
        r.submits_per_second,
        r.accepted,
        r.finished,
        r.succeeded,
        r.submit_errors
    );
    for (status, n, why) in &r.refused {
        println!("  refused with {status}: {n} (first: {why})");
    }
    let running_p99 = quantile(&r.to_running, 0.99);
    println!(
        "{:<58} target p99 <= 100 ms      {}",
        format!(
            "submit->running  p50 {}  p99 {}",
            ms(quantile(&r.to_running, 0.5)),
            ms(running_p99)
        ),
        verdict(
            running_p99.is_some_and(|d| d <= Duration::from_millis(100))
                && r.to_running.len() == r.submitted
        )
    );
    println!(
        "  (running: the run's order reached its agent; {} of {} submits got there)",
        r.to_running.len(),
        r.submitted
    );
    println!(
        "submit->finished p50 {}  p99 {}  (the run record's finished_ms)",
        ms(quantile(&r.to_finished, 0.5)),
        ms(quantile(&r.to_finished, 0.99))
    );
    println!(
        "the submit call alone: p50 {}  p99 {}",
        ms(quantile(&r.submit_call, 0.5)),
        ms(quantile(&r.submit_call, 0.99))
    );
    println!(
        "throughput {:.1} finished runs/s (first submit to last finish)",
        r.finished_per_second
    );
    println!(
        "  during the load: the controller {:.1} % of one core, the generator {:.1} %, the machine {:.0} %",
        r.load.controller * 100.0,
        r.load.generator * 100.0,
        r.load.machine * 100.0
    );
    println!(
        "{:<58} target <= 512 MiB         {}",
        format!(
            "controller RSS: VmHWM {:.0} MiB, VmRSS {:.0} MiB",
            mib(r.vm_hwm),
            mib(r.vm_rss)
        ),
        verdict(r.vm_hwm <= 512 << 20)
    );
    for e in &r.errors {
        println!("  agent error (first few): {e}");
    }
}

/// The Kafka figures: p99 with many agents against p99 with one.
pub fn print_kafka(r: &KafkaReport) {
    println!("\n== scale: command latency over kafka-transport ==");
    for (n, l) in &r.runs {
        println!(
            "{n:>4} agent(s): {} commands, submit->order at the agent p50 {}  p99 {}",
            l.len(),
            ms(quantile(l, 0.5)),
            ms(quantile(l, 0.99))
        );
    }
    if let [(1, one), (n, many)] = &r.runs[..]
        && let (Some(a), Some(b)) = (quantile(one, 0.99), quantile(many, 0.99))
    {
        let ratio = b.as_secs_f64() / a.as_secs_f64().max(1e-9);
        println!(
            "{:<58} target <= 3x              {}",
            format!("p99 with {n} agents / p99 with 1: {ratio:.2}x"),
            verdict(ratio <= 3.0)
        );
    }
    for e in &r.errors {
        println!("  error: {e}");
    }
}

/// Used by the bench's entry point and the smoke test alike.
pub fn setup_from_env(trellis: &str) -> Result<Setup> {
    let bundle = std::env::var_os("TRELLIS_BUNDLE_DIR")
        .map(PathBuf::from)
        .context("TRELLIS_BUNDLE_DIR is not set: run `cargo xtask bench scale`, which builds the plugin bundle first")?;
    Ok(Setup {
        trellis: PathBuf::from(trellis),
        bundle,
    })
}

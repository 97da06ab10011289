//! Runs at scale (issue 19): a controller whose state directory holds 100,000 finished
//! runs starts in ≤ 2 s, with ≤ 100 MB more memory than with an empty one, and serves a
//! page of `GET /api/runs` in ≤ 20 ms. All printed against the targets in one run.
//!
//!     cargo xtask bench runs      (builds the bundle, then runs this in release)
//!
//! The state directory is made by the real `RunStore` (create, step changes, output
//! counts, finish: what a controller writes), `TRELLIS_BENCH_RUNS` runs (default
//! 100,000) of 6 steps each, over 40 jobs, 20 agents, 3 labels, one run in 12 failed.
//! Writing them through the store syncs every change, so they are made on tmpfs
//! (`/dev/shm`, where a sync costs nothing) and then copied to the target directory on
//! disk, where they are measured; the copy is kept for the next run
//! (`$CARGO_TARGET_DIR/bench-runs/`).
//!
//! Each side is measured in a fresh child process of this binary, started as a real
//! controller (`Controller::start`: tcp-transport, file-logging, file-browser from the
//! bundle) on (a copy of) the state directory, its API served on loopback:
//!
//! * **start**: the time `Controller::start` takes (it opens the run store);
//! * **memory**: the process's RSS after the start, minus the same for an empty state
//!   directory (the other child); and the bytes the start left allocated (a counting
//!   allocator), which RSS cannot overstate;
//! * **page**: `GET /api/runs` over HTTP/1.1 on loopback (connect, request with a
//!   viewer token, whole answer read), `TRELLIS_BENCH_PAGES` times (default 200) each:
//!   the first page (the default 50 runs: what the web page polls), a page deep in the
//!   history by cursor, a filtered page (`status=failed&label=gpu`), and a filter that
//!   matches nothing (the whole index scanned: the worst case). p50 and p99.
//!
//! The page cache is warm (the copy was just read or written); a cold start reads the
//! index file (about 22 MB here) once more from disk.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis::api::access::{Access, AccessConfig, Role, TokenStore};
use trellis::api::{Api, serve};
use trellis::capabilities::secrets::SecretStore;
use trellis::config::DaemonConfig;
use trellis::controller::state::{LogLocator, RunStatus, RunStore, StepStatus};
use trellis::controller::{Controller, ControllerConfig};
use trellis::jobs::Job;
use trellis::protocol::{RunOutcome, StepOutcome};
use trellis::runtime::Runtime;

/// Bytes allocated and not yet freed, process-wide.
struct Counting;
static LIVE: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as i64, Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as i64, Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as i64 - l.size() as i64, Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const START_TARGET: Duration = Duration::from_secs(2);
const MEMORY_TARGET_MB: f64 = 100.0;
const PAGE_TARGET: Duration = Duration::from_millis(20);
/// Bumped when the generated layout changes (the kept copy is made again).
const LAYOUT: &str = "runs-bench-1";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb / 1024.0
}

fn bundle() -> PathBuf {
    std::env::var_os("TRELLIS_BUNDLE_DIR")
        .map(PathBuf::from)
        .expect("run with `cargo xtask bench runs` (TRELLIS_BUNDLE_DIR is not set)")
}

/// `runs` finished runs written through the store into `<root>/state`.
fn generate(root: &Path, runs: u64) {
    let state = root.join("state");
    std::fs::create_dir_all(state.join("logs")).unwrap();
    let store = RunStore::open(&state).unwrap();
    let steps = [
        "checkout",
        "deps",
        "build",
        "unit-tests",
        "integration",
        "publish",
    ];
    let labels = ["linux", "gpu", "arm"];
    let jobs: Vec<Job> = (0..40)
        .map(|j| {
            let mut text = format!(
                "name = \"project-{j:02}\"\nagent = \"{}\"\n",
                labels[j % labels.len()]
            );
            for s in steps {
                text.push_str(&format!("[[step]]\nname = \"{s}\"\nrun = \"make {s}\"\n"));
            }
            Job::parse(&text, "bench.toml").unwrap()
        })
        .collect();
    let t = Instant::now();
    for i in 0..runs {
        let job = &jobs[(i as usize * 7) % jobs.len()];
        let agent = format!("agent-{:02}", i % 20);
        let log = LogLocator {
            method: "file-logging".into(),
            browser: "file-browser".into(),
            on_agent: false,
        };
        let id = store
            .create(job, &agent, "session-1", log, "ci-bot")
            .unwrap()
            .id;
        let failed_at = (i % 12 == 5).then_some(3);
        let mut events = 0;
        for (k, _) in steps.iter().enumerate() {
            store
                .update(&id, |r| {
                    r.status = RunStatus::Running;
                    r.steps[k].status = StepStatus::Running;
                })
                .unwrap();
            events += 20 + (i * 31 + k as u64 * 17) % 400;
            store.progress(&id, events).unwrap();
            let fails = failed_at == Some(k);
            store
                .update(&id, |r| {
                    r.steps[k].status = if fails {
                        StepStatus::Failed
                    } else {
                        StepStatus::Succeeded
                    };
                    r.steps[k].outcome = Some(StepOutcome::Exited {
                        code: if fails { 2 } else { 0 },
                    });
                })
                .unwrap();
            if fails {
                break;
            }
        }
        let outcome = match failed_at {
            Some(k) => RunOutcome::Failed {
                step: steps[k].into(),
                outcome: StepOutcome::Exited { code: 2 },
            },
            None => RunOutcome::Succeeded,
        };
        store
            .update(&id, |r| {
                r.events = events;
                r.finish(outcome);
            })
            .unwrap();
        if (i + 1) % 10_000 == 0 {
            eprintln!(
                "  generated {} runs ({:.0} s)",
                i + 1,
                t.elapsed().as_secs_f64()
            );
        }
    }
}

/// The kept state directory with `runs` finished runs, made if missing.
fn state_with(runs: u64) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .unwrap()
                .join("target")
        });
    let kept = target.join(format!("bench-runs/{runs}"));
    let marker = kept.join(LAYOUT);
    if marker.exists() {
        eprintln!("using the kept state directory {}", kept.display());
        return kept;
    }
    let _ = std::fs::remove_dir_all(&kept);
    let shm = Path::new("/dev/shm");
    let scratch = if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    eprintln!(
        "generating {runs} finished runs through the run store in {} ...",
        scratch.path().display()
    );
    let t = Instant::now();
    generate(scratch.path(), runs);
    eprintln!(
        "  made in {:.0} s; copying to {}",
        t.elapsed().as_secs_f64(),
        kept.display()
    );
    std::fs::create_dir_all(kept.parent().unwrap()).unwrap();
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(scratch.path())
        .arg(&kept)
        .status()
        .unwrap()
        .success();
    assert!(ok, "copying the state directory failed");
    std::fs::write(&marker, "").unwrap();
    kept
}

/// What one child measured.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Measured {
    runs: usize,
    start_ms: f64,
    rss_before_mb: f64,
    rss_after_mb: f64,
    allocated_mb: f64,
    open_ms: f64,
    pages: Vec<(String, f64, f64)>,
}

async fn get(addr: std::net::SocketAddr, path: &str, token: &str) -> (u16, Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\nconnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let status = std::str::from_utf8(&out[9..12]).unwrap().parse().unwrap();
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP response");
    (status, out[split + 4..].to_vec())
}

fn percentile(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i].as_secs_f64() * 1000.0
}

/// The child: a controller on `root/state`; prints one JSON line of `Measured`.
async fn measure(root: &Path) {
    let state = root.join("state");
    std::fs::create_dir_all(state.join("logs")).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = DaemonConfig::parse(
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
        "bench.toml",
        root,
    )
    .unwrap();
    let rt = Runtime::with_secrets(cfg, SecretStore::from_pairs(std::iter::empty())).unwrap();
    let transport = rt.load(&bundle().join("tcp-transport")).await.unwrap();
    let logging = rt.load(&bundle().join("file-logging")).await.unwrap();
    let reader = trellis::points::browser::LogReader::new(
        rt.load(&bundle().join("file-browser")).await.unwrap(),
    )
    .unwrap();
    let token = TokenStore::in_state_dir(&state)
        .create("bench", Role::Viewer)
        .unwrap();
    // settle, then the baseline
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_before_mb = rss_mb();
    let live_before = LIVE.load(Relaxed);
    let t = Instant::now();
    let controller = Controller::start(
        ControllerConfig {
            instance_id: "bench".into(),
            state_dir: state.clone(),
            agents: [("agent-01".to_string(), "secret".to_string())].into(),
            secrets: Default::default(),
            heartbeat: Duration::from_secs(2),
            agent_lost_after: Duration::from_secs(60),
            log_buffer_limit: trellis::controller::DEFAULT_LOG_BUFFER_LIMIT,
            multiline_start: None,
            fencing_token: 0,
            retention: Default::default(),
        },
        transport,
        logging,
    )
    .await
    .unwrap();
    let start_ms = t.elapsed().as_secs_f64() * 1000.0;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_after_mb = rss_mb();
    let allocated_mb = (LIVE.load(Relaxed) - live_before) as f64 / (1 << 20) as f64;
    let runs = controller.runs_page(&Default::default()).runs.len();
    let api = Arc::new(Api {
        controller: controller.clone(),
        runtime: rt.clone(),
        browsers: reader.into(),
        instance_id: "bench".into(),
    });
    let access = Arc::new(Access::new(AccessConfig {
        state_dir: &state,
        bind: "127.0.0.1:0".parse().unwrap(),
        hosts: &[],
        open_metrics: false,
        tls: false,
    }));
    let addr = serve("127.0.0.1:0".parse().unwrap(), api, access, None)
        .await
        .unwrap();
    let n = env_u64("TRELLIS_BENCH_PAGES", 200) as usize;
    let (_, first) = get(addr, "/api/runs", &token).await;
    let first: serde_json::Value = serde_json::from_slice(&first).unwrap();
    let total = first["runs"].as_array().map_or(0, |r| r.len());
    // a cursor deep in the history: the run numbered a tenth of the way up
    let deep = format!(
        "/api/runs?cursor=r-{:06}",
        (controller_len(&first) / 10).max(2)
    );
    let mut pages = Vec::new();
    for (name, path) in [
        ("first page (50)", "/api/runs".to_string()),
        ("deep page by cursor (50)", deep),
        (
            "filtered: status=failed&label=gpu (50)",
            "/api/runs?status=failed&label=gpu".to_string(),
        ),
        (
            "filter matching nothing (whole index)",
            "/api/runs?job=no-such-job".to_string(),
        ),
    ] {
        let mut took = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let (code, body) = get(addr, &path, &token).await;
            took.push(t.elapsed());
            assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
        }
        pages.push((
            name.to_string(),
            percentile(&mut took, 0.5),
            percentile(&mut took, 0.99),
        ));
    }
    let t = Instant::now();
    let store = RunStore::open(&state).unwrap();
    let open_ms = t.elapsed().as_secs_f64() * 1000.0;
    let m = Measured {
        runs: store.len().max(runs).max(total),
        start_ms,
        rss_before_mb,
        rss_after_mb,
        allocated_mb,
        open_ms,
        pages,
    };
    println!("{}", serde_json::to_string(&m).unwrap());
}

/// The newest run's number, from a first page.
fn controller_len(first: &serde_json::Value) -> u64 {
    first["runs"][0]["id"]
        .as_str()
        .and_then(trellis::controller::state::run_number)
        .unwrap_or(0)
}

/// Run this binary as a child measuring `root`.
fn child(root: &Path) -> Measured {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .env("TRELLIS_BENCH_RUNS_CHILD", root)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "the measuring child failed");
    let text = String::from_utf8(out.stdout).unwrap();
    let line = text.lines().last().expect("the child printed nothing");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISSED" }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if let Some(root) = std::env::var_os("TRELLIS_BENCH_RUNS_CHILD") {
        return measure(Path::new(&root)).await;
    }
    let runs = env_u64("TRELLIS_BENCH_RUNS", 100_000);
    let kept = state_with(runs);
    // Each child works on a copy: the start writes its token and log buffers.
    let work = tempfile::tempdir_in(kept.parent().unwrap()).unwrap();
    let full = work.path().join("full");
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(&kept)
        .arg(&full)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let empty = work.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = child(&empty);
    let f = child(&full);
    let above = f.rss_after_mb - e.rss_after_mb;
    println!();
    println!(
        "runs at scale: a controller on {} finished runs (6 steps each) against one on none",
        f.runs
    );
    println!(
        "(release build; state on disk in {}; page cache warm)",
        kept.display()
    );
    println!(
        "  start (Controller::start)        {:>8.0} ms   (empty: {:.0} ms; RunStore::open alone: {:.0} ms)   target ≤ {} ms   {}",
        f.start_ms,
        e.start_ms,
        f.open_ms,
        START_TARGET.as_millis(),
        verdict(f.start_ms <= START_TARGET.as_secs_f64() * 1000.0)
    );
    println!(
        "  memory: RSS after the start      {:>8.1} MB   (empty: {:.1} MB) = {:.1} MB above an empty start   target ≤ {MEMORY_TARGET_MB} MB   {}",
        f.rss_after_mb,
        e.rss_after_mb,
        above,
        verdict(above <= MEMORY_TARGET_MB)
    );
    println!(
        "          left allocated by the start {:>6.1} MB   (empty: {:.1} MB)",
        f.allocated_mb, e.allocated_mb
    );
    for (name, p50, p99) in &f.pages {
        let first = name.starts_with("first");
        println!(
            "  GET /api/runs, {name:<40} p50 {p50:>6.2} ms  p99 {p99:>6.2} ms{}",
            if first {
                format!(
                    "   target ≤ {} ms   {}",
                    PAGE_TARGET.as_millis(),
                    verdict(*p99 <= PAGE_TARGET.as_secs_f64() * 1000.0)
                )
            } else {
                String::new()
            }
        );
    }
    for (name, p50, p99) in &e.pages {
        if name.starts_with("first") {
            println!("  (empty store, {name}: p50 {p50:.2} ms, p99 {p99:.2} ms)");
        }
    }
}

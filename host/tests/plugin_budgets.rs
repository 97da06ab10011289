//! Budgets per plugin (issue 18): a logging method that touches memory per open log and
//! never lets a log close holds at most its own `max-instances` instances and its
//! `total-memory`, the daemon stays bounded, `/api/plugins` and `/metrics` show it at
//! its cap, and a healthy run in the same controller completes with its events stored.

mod common;

use common::*;
use std::path::Path;
use std::time::{Duration, Instant};
use trellis::points::logging::LogWriter;
use trellis::runtime::PluginError;

/// MiB each open log of the hog touches.
const TOUCH_MIB: u64 = 16;

/// Resident memory of process `pid`, in bytes (VmRSS).
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"));
    kib << 10
}

/// One series' value from a Prometheus text exposition.
fn metric(text: &str, series: &str) -> u64 {
    let prefix = format!("{series} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
        .parse()
        .unwrap()
}

fn submit(server: &str, dir: &Path, name: &str, logging: Option<&str>) -> String {
    let f = dir.join(format!("{name}.toml"));
    let logging = logging
        .map(|l| format!("logging = \"{l}\"\n"))
        .unwrap_or_default();
    std::fs::write(
        &f,
        format!(
            "name = \"{name}\"\nagent = \"linux\"\n{logging}[[step]]\nname = \"s\"\nrun = \"echo from-{name}\"\n"
        ),
    )
    .unwrap();
    let (code, out, err) = cli(server, &["run", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    out.trim().to_string()
}

/// The case, scaled down: runs through a logging method whose logs never close,
/// each touching 16 MiB. Without budgets every run keeps an instance and its memory for
/// ever (the controller grows by 16 MiB a run, and enough runs take the whole pool);
/// with `max-instances = 3` the hog holds three, is refused the rest (counted, shown),
/// and the controller stays bounded. A healthy file-logging run right after completes
/// with its events stored.
#[test]
fn a_plugin_whose_logs_never_close_stays_within_its_budget() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (controller, agent, http) = write_configs(dir, &Transport::Tcp { port: free_port() });
    extend_controller(
        &controller,
        "logging-methods = [\"budget-hog\"]",
        &format!(
            "[plugins.budget-hog]\npath = \"{}\"\nconfig = {{ touch-mib = {TOUCH_MIB} }}\nlimits = {{ max-instances = 3, reserved-instances = 1, memory = \"32MiB\", total-memory = \"64MiB\" }}\n",
            fixtures().join("budget-hog").display()
        ),
    );
    let daemons = start_daemons(dir, &controller, &agent, http);
    let http = daemons.http; // moved if the controller lost its port
    let server = &daemons.server;
    let pid = daemons.controller.0.id();
    let before = rss(pid);

    const RUNS: usize = 12;
    let runs: Vec<String> = (0..RUNS)
        .map(|i| submit(server, dir, &format!("hog-{i}"), Some("budget-hog")))
        .collect();
    for run in &runs {
        wait_for_success(server, run, Duration::from_secs(60), &daemons.log);
    }
    // Every log is retried each second: give the refusals time to show.
    let t = Instant::now();
    let hog = loop {
        let plugins: serde_json::Value =
            serde_json::from_str(&http_get(http, "/api/plugins")).unwrap();
        let hog = plugins
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "budget-hog")
            .unwrap_or_else(|| panic!("no budget-hog in {plugins}"))
            .clone();
        if hog["budget"]["instances"] == 3 || t.elapsed() > Duration::from_secs(20) {
            break hog;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // Twelve runs of 16 MiB each would be 192 MiB held; the hog may hold three.
    let grew = rss(pid).saturating_sub(before);
    println!(
        "controller VmRSS: {} MiB before, grew {} MiB over {RUNS} hog runs",
        before >> 20,
        grew >> 20
    );
    assert!(
        grew < 110 << 20,
        "the controller grew by {} MiB over {RUNS} runs of a {TOUCH_MIB} MiB hog",
        grew >> 20
    );

    let budget = &hog["budget"];
    assert_eq!(budget["instances"], 3, "{hog}");
    assert_eq!(budget["max_instances"], 3, "{hog}");
    assert_eq!(budget["reserved_instances"], 1, "{hog}");
    assert_eq!(budget["total_memory"], 64 << 20, "{hog}");
    let memory = budget["memory"].as_u64().unwrap();
    assert!(
        (3 * (TOUCH_MIB << 20)..=64 << 20).contains(&memory),
        "the hog's three instances hold {memory} bytes: {hog}"
    );
    assert!(
        budget["refusals"]["max_instances"].as_u64().unwrap() >= (RUNS - 3) as u64,
        "{hog}"
    );

    // The refused runs' events were not dropped: they wait in the hog's durable buffer.
    assert!(log_buffer_bytes(http, "budget-hog") > 0);

    let metrics = http_get(http, "/metrics");
    assert_eq!(
        metric(&metrics, "trellis_plugin_instances{plugin=\"budget-hog\"}"),
        3
    );
    assert_eq!(
        metric(
            &metrics,
            "trellis_plugin_instances_max{plugin=\"budget-hog\"}"
        ),
        3
    );
    assert!(
        metric(
            &metrics,
            "trellis_plugin_budget_refusals_total{plugin=\"budget-hog\",limit=\"max-instances\"}"
        ) >= (RUNS - 3) as u64
    );
    assert!(
        metric(
            &metrics,
            "trellis_plugin_memory_bytes{plugin=\"budget-hog\"}"
        ) <= 64 << 20
    );
    assert_eq!(
        metric(
            &metrics,
            "trellis_plugin_budget_refusals_total{plugin=\"file-logging\",limit=\"max-instances\"}"
        ),
        0
    );

    // A healthy run through the default file logging, in the same controller, now.
    let t = Instant::now();
    let healthy = submit(server, dir, "healthy", None);
    wait_for_success(server, &healthy, Duration::from_secs(30), &daemons.log);
    let events = loop {
        let page: serde_json::Value =
            serde_json::from_str(&http_get(http, &format!("/api/runs/{healthy}/log"))).unwrap();
        let found = page["events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["message"] == "from-healthy"));
        if found || t.elapsed() > Duration::from_secs(30) {
            break page;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        events["events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["message"] == "from-healthy")),
        "the healthy run's events were not stored: {events}"
    );
    println!("healthy run with stored events in {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
}

/// `total-memory` bounds the linear memory of all the plugin's instances together: logs
/// are opened until the next would pass it, the refusal is typed and retryable (not a
/// crash), and dropping one log's instance gives its memory back.
#[tokio::test]
async fn total_memory_is_shared_by_a_plugins_instances_and_released_with_each() {
    let d = tempfile::tempdir().unwrap();
    let config = format!(
        "[plugins.budget-hog]\nconfig = {{ touch-mib = {TOUCH_MIB} }}\nlimits = {{ max-instances = 10, memory = \"32MiB\", total-memory = \"40MiB\" }}\n"
    );
    let rt = runtime(&config, d.path(), &[]);
    let hog = rt
        .load(&fixtures().join("budget-hog"))
        .await
        .unwrap_or_else(|p| panic!("{p}"));
    let mut open = Vec::new();
    let refused = loop {
        match LogWriter::open(hog.clone(), meta("j", &format!("log-{}", open.len()))).await {
            Ok(w) => open.push(w),
            Err(e) => break e,
        }
        assert!(open.len() < 10, "never refused");
    };
    assert_eq!(open.len(), 2, "{refused}");
    match &refused {
        PluginError::AtBudget { plugin, key, .. } => {
            assert_eq!(
                (plugin.as_str(), *key),
                ("budget-hog", "limits.total-memory")
            )
        }
        other => panic!("not a budget refusal: {other}"),
    }
    assert!(refused.is_retryable() && !refused.is_crash(), "{refused}");
    assert!(
        refused.to_string().contains("limits.total-memory"),
        "{refused}"
    );
    assert!(hog.budget.memory() <= 40 << 20);
    assert_eq!(
        hog.budget.instances(),
        2,
        "the refused instance was dropped"
    );
    assert!(
        hog.budget
            .memory_refusals
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    assert!(matches!(
        hog.health(),
        trellis::runtime::health::HealthState::Healthy
    ));

    let held = hog.budget.memory();
    drop(open.pop());
    assert!(hog.budget.memory() < held - (TOUCH_MIB << 20));
    assert_eq!(hog.budget.instances(), 1);
    open.push(
        LogWriter::open(hog.clone(), meta("j", "again"))
            .await
            .expect("room again once a log's instance is dropped"),
    );
    drop(open);
    assert_eq!((hog.budget.instances(), hog.budget.memory()), (0, 0));
}

/// The pool every plugin shares is never taken whole: a plugin allowed all 256
/// instances and holding every log it opens gets its cap less what the other loaded
/// plugins reserved, and a healthy logging method in the same process still opens and
/// writes logs. (Without reserves the hog took all 256 and the healthy method's
/// instantiation failed: "maximum concurrent instance limit of 256 reached".)
#[tokio::test]
async fn a_plugin_holding_the_whole_pool_never_starves_another() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("logs")).unwrap();
    let config = "[plugins.budget-hog]\nconfig = { touch-mib = 0 }\nlimits = { max-instances = 256 }\n[plugins.jsonl-logger]\ndirs = [{ host = \"logs\", guest = \"/logs\", mode = \"read-write\" }]\n";
    let rt = runtime(config, d.path(), &[]);
    let hog = rt
        .load(&fixtures().join("budget-hog"))
        .await
        .unwrap_or_else(|p| panic!("{p}"));
    let healthy = rt
        .load(&bundle().join("jsonl-logger"))
        .await
        .unwrap_or_else(|p| panic!("{p}"));
    let mut held = Vec::new();
    let refused = loop {
        match LogWriter::open(hog.clone(), meta("j", &format!("hog-{}", held.len()))).await {
            Ok(w) => held.push(w),
            Err(e) => break e,
        }
        assert!(held.len() <= 256);
    };
    // 256, less the healthy plugin's default reserve of 4.
    assert_eq!(held.len(), 252, "{refused}");
    match &refused {
        PluginError::AtBudget { key, .. } => assert_eq!(*key, "limits.reserved-instances"),
        other => panic!("not a budget refusal: {other}"),
    }
    let mut w = LogWriter::open(healthy.clone(), meta("healthy", "healthy-log"))
        .await
        .unwrap_or_else(|e| panic!("the healthy method was starved: {e}"));
    w.write(batch(1, 10)).await.unwrap();
    w.close(10).await.unwrap();
    assert_eq!(
        healthy.budget.instances(),
        1,
        "the closed log's instance is idle"
    );
    drop(held);
    assert_eq!(hog.budget.instances(), 0);
}

/// Bad budget values are refused at load with the key and the fix.
#[test]
fn bad_budget_values_are_named() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path();
    let bad = |toml: &str| match trellis::config::DaemonConfig::parse(toml, "t.toml", base) {
        Ok(_) => panic!("accepted: {toml}"),
        Err(p) => p.to_string(),
    };
    let e = bad("[runtime.limits]\nmax-instances = 0\n");
    assert!(
        e.contains("runtime.limits.max-instances") && e.contains("1..=256"),
        "{e}"
    );
    let e = bad("[runtime.limits]\nreserved-instances = 300\n");
    assert!(e.contains("runtime.limits.reserved-instances"), "{e}");
    let e = bad("[plugins.x.limits]\ntotal-memory = \"1KiB\"\n");
    assert!(e.contains("plugins.x.limits.total-memory"), "{e}");
    let e = bad("[plugins.x.limits]\nmax-instances = 2\nreserved-instances = 3\n");
    assert!(e.contains("plugins.x.limits.reserved-instances"), "{e}");
    let e = bad("[runtime.limits]\nmemory = \"64MiB\"\ntotal-memory = \"32MiB\"\n");
    assert!(e.contains("runtime.limits.total-memory"), "{e}");
}

/// Limits that contradict each other, and reserves that do not fit the pool, are
/// refused at load, naming the key.
#[tokio::test]
async fn contradicting_budgets_are_refused_at_load() {
    let d = tempfile::tempdir().unwrap();
    let rt = runtime(
        "[runtime.limits]\nreserved-instances = 3\n[plugins.budget-hog.limits]\nmax-instances = 2\n",
        d.path(),
        &[],
    );
    let e = refusal(&rt, &fixtures().join("budget-hog")).await;
    assert!(
        e.contains("plugins.budget-hog.limits.reserved-instances") && e.contains("max-instances"),
        "{e}"
    );
    let rt = runtime(
        "[runtime.limits]\ntotal-memory = \"32MiB\"\n[plugins.budget-hog.limits]\nmemory = \"64MiB\"\n",
        d.path(),
        &[],
    );
    let e = refusal(&rt, &fixtures().join("budget-hog")).await;
    assert!(e.contains("plugins.budget-hog.limits.total-memory"), "{e}");
    // Two plugins reserving 200 of the 256 instances each: the second is refused.
    let rt = runtime(
        "[runtime.limits]\nmax-instances = 256\nreserved-instances = 200\n[plugins.budget-hog]\n[plugins.hostile]\n",
        d.path(),
        &[],
    );
    rt.load(&fixtures().join("budget-hog"))
        .await
        .unwrap_or_else(|p| panic!("{p}"));
    let e = refusal(&rt, &fixtures().join("hostile")).await;
    assert!(
        e.contains("plugins.hostile.limits.reserved-instances")
            && e.contains("above the instance pool of 256"),
        "{e}"
    );
}

/// Why `rt` refuses to load the plugin at `path` (it must refuse).
async fn refusal(rt: &trellis::runtime::Runtime, path: &std::path::Path) -> String {
    rt.load(path).await.err().expect("loaded").to_string()
}

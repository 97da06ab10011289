//! Runtime benchmark: instantiation, an empty call through the host's guarded path
//! against a bare wasmtime call of the same export, and a 256-event JSON-lines batch
//! written by the jsonl-logger example as a plugin against the same code natively.
//! Every comparison is measured in the same run; ratios are printed.
//!
//!     cargo xtask bench          (builds the bundle, then runs this in release)

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis::capabilities::secrets::SecretStore;
use trellis::config::DaemonConfig;
use trellis::points::logging::LogWriter;
use trellis::runtime::{Plugin, Runtime, engine};
use trellis::wit::types::LogMetadata;
use trellis_sdk::events::BatchBuilder;

const BATCH: u64 = 256;

fn runtime(dir: &Path, pooling: bool) -> Arc<Runtime> {
    let config = format!(
        "[plugins.jsonl-logger]\ndirs = [{{ host = \"{}\", guest = \"/logs\", mode = \"read-write\" }}]\n",
        dir.display()
    );
    let cfg = DaemonConfig::parse(&config, "bench.toml", dir).unwrap();
    let engine = engine::build_engine_with(pooling).unwrap();
    Runtime::with_engine(cfg, SecretStore::default(), engine).unwrap()
}

fn batch(from: u64) -> Vec<u8> {
    let mut b = BatchBuilder::with_capacity(48 << 10);
    let msg = "x".repeat(100);
    for s in from..from + BATCH {
        b.push(
            s,
            1_700_000_000_000 + s as i64,
            "build",
            &msg,
            &[("stream", "stdout")],
        );
    }
    b.finish()
}

fn meta(loggable: &str) -> LogMetadata {
    LogMetadata {
        instance_id: "bench".into(),
        loggable_type: "run".into(),
        loggable_id: loggable.into(),
        job_id: "bench".into(),
    }
}

/// Median of `rounds` rounds of `iters` iterations each, in ns per iteration.
async fn measure<F: AsyncFnMut()>(rounds: usize, iters: usize, mut f: F) -> f64 {
    for _ in 0..iters.min(1000) {
        f().await;
    }
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..iters {
            f().await;
        }
        samples.push(t.elapsed().as_nanos() as f64 / iters as f64);
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    samples[rounds / 2]
}

async fn instantiation(p: &Arc<Plugin>, label: &str) -> f64 {
    // States are prepared outside the timed region: this measures instantiation itself.
    // "instantiate" keeps the instances until the round ends (their teardown is not
    // timed); "cycle" drops each before the next, so the pool's slot reset is timed too.
    let (mut only, mut cycle) = (Vec::new(), Vec::new());
    for _ in 0..15 {
        let states: Vec<_> = (0..100).map(|_| p.prepare_state().unwrap()).collect();
        let mut live = Vec::with_capacity(100);
        let t = Instant::now();
        for s in states {
            live.push(p.instantiate_bare(s).await.unwrap());
        }
        only.push(t.elapsed().as_nanos() as f64 / 100.0);
        drop(live);
        let states: Vec<_> = (0..100).map(|_| p.prepare_state().unwrap()).collect();
        let t = Instant::now();
        for s in states {
            drop(p.instantiate_bare(s).await.unwrap());
        }
        cycle.push(t.elapsed().as_nanos() as f64 / 100.0);
    }
    only.sort_by(|a, b| a.partial_cmp(b).unwrap());
    cycle.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (ns, c) = (only[only.len() / 2], cycle[cycle.len() / 2]);
    println!(
        "instantiate ({label:<7})            {:>9.2} µs   (with teardown: {:.2} µs)",
        ns / 1000.0,
        c / 1000.0
    );
    ns
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let bundle = std::env::var_os("TRELLIS_BUNDLE_DIR")
        .map(std::path::PathBuf::from)
        .expect("run with `cargo xtask bench`");
    let plugin_dir = bundle.join("jsonl-logger");
    // Log files go to tmpfs when there is one: disk writeback stalls would otherwise
    // dominate and swing the batch numbers, and without them the comparison is stricter
    // (only the sandbox's cost is left to differ).
    let dir = match std::path::Path::new("/dev/shm").is_dir() {
        true => tempfile::tempdir_in("/dev/shm").unwrap(),
        false => tempfile::tempdir().unwrap(),
    };
    println!("trellis runtime benchmark (median of rounds; same run, same machine)\n");

    // TRELLIS_BENCH_ONLY=batch runs only part 3 (for profiling it alone).
    let only_batch = std::env::var("TRELLIS_BENCH_ONLY").is_ok_and(|v| v == "batch");
    let only_call = std::env::var("TRELLIS_BENCH_ONLY").is_ok_and(|v| v == "call");
    let rt = runtime(dir.path(), true);
    let p = rt.load(&plugin_dir).await.unwrap();
    let (mut pooled, mut default, mut bare, mut guarded) = (f64::NAN, f64::NAN, f64::NAN, f64::NAN);
    if !only_batch {
        // 1. Instantiation via InstancePre, pooling against the default allocator.
        if !only_call {
            pooled = instantiation(&p, "pooling").await;
            let rt_default = runtime(dir.path(), false);
            let p_default = rt_default.load(&plugin_dir).await.unwrap();
            default = instantiation(&p_default, "default").await;
            let full = measure(15, 200, async || {
                let i = p.instantiate().await.unwrap();
                drop(i);
            })
            .await;
            println!(
                "fresh instance + WASI ctx + init    {:>9.2} µs",
                full / 1000.0
            );
        }

        // 2. An empty call: bare wasmtime against the host's guarded path (limits, deadline,
        //    metrics, health, tracing span), same export, same instance.
        let mut inst = p.instantiate().await.unwrap();
        let guest = inst.exports.logging.clone().unwrap();
        // Alternate bare and guarded rounds so machine noise hits both alike.
        let (mut b_samples, mut g_samples) = (Vec::new(), Vec::new());
        for _ in 0..31 {
            b_samples.push(
                measure(1, 10_000, async || {
                    inst.store.set_epoch_deadline(1000);
                    let _ = guest.runs_on(&mut inst.store).await.unwrap();
                })
                .await,
            );
            g_samples.push(
                measure(1, 10_000, async || {
                    let _ = trellis::guarded!(*p, &mut inst, "runs-on", |store| guest
                        .runs_on(store))
                    .unwrap();
                })
                .await,
            );
        }
        b_samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
        g_samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
        bare = b_samples[15];
        guarded = g_samples[15];
        println!(
            "empty call, bare wasmtime           {:>9.3} µs",
            bare / 1000.0
        );
        println!(
            "empty call, host guarded path       {:>9.3} µs",
            guarded / 1000.0
        );
    }

    if only_call {
        println!(
            "host overhead per call            {:>+8.1} %",
            (guarded / bare - 1.0) * 100.0
        );
        return;
    }
    // 3. A 256-event batch as JSON lines: plugin (through LogWriter) vs native.
    let mut native = jsonl_logger::JsonlLog::open(
        dir.path(),
        jsonl_logger::Meta {
            instance_id: "bench".into(),
            loggable_type: "run".into(),
            loggable_id: "native".into(),
            job_id: "bench".into(),
        },
    )
    .unwrap();
    let mut writer = LogWriter::open(p.clone(), meta("plugin")).await.unwrap();
    let (mut seq_n, mut seq_p) = (1u64, 1u64);
    let (mut t_native, mut t_plugin) = (Vec::new(), Vec::new());
    for round in 0..9 {
        // Alternate which side goes first, so neither always gets the warmer cache.
        for side in if round % 2 == 0 { [0, 1] } else { [1, 0] } {
            let mut total = Duration::ZERO;
            for _ in 0..200 {
                if side == 0 {
                    let b = batch(seq_n);
                    seq_n += BATCH;
                    let t = Instant::now();
                    native.write(&b).unwrap();
                    total += t.elapsed();
                } else {
                    let b = batch(seq_p);
                    seq_p += BATCH;
                    let t = Instant::now();
                    writer.write(b).await.unwrap();
                    total += t.elapsed();
                }
            }
            let per = total.as_nanos() as f64 / 200.0;
            if side == 0 {
                t_native.push(per)
            } else {
                t_plugin.push(per)
            }
        }
    }
    t_native.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t_plugin.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (n, pl) = (t_native[4], t_plugin[4]);
    let lines_native = std::fs::read_to_string(dir.path().join("bench/native.jsonl"))
        .unwrap()
        .lines()
        .count();
    let lines_plugin = std::fs::read_to_string(dir.path().join("bench/plugin.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(
        lines_native, lines_plugin,
        "both sides wrote the same number of events"
    );
    println!(
        "256-event batch, native             {:>9.2} µs  ({:.2} M events/s)",
        n / 1000.0,
        BATCH as f64 / n * 1000.0
    );
    println!(
        "256-event batch, plugin             {:>9.2} µs  ({:.2} M events/s)",
        pl / 1000.0,
        BATCH as f64 / pl * 1000.0
    );

    println!("\nratios");
    // A part skipped with TRELLIS_BENCH_ONLY measured nothing: say so, not `NaN … NOT MET`.
    ratio("instantiation, pooling", pooled, || {
        format!(
            "{:>9.2} µs   target <= 10 µs    {}",
            pooled / 1000.0,
            verdict(pooled <= 10_000.0)
        )
    });
    ratio("pooling vs default allocator", default / pooled, || {
        format!("{:>9.2}x", default / pooled)
    });
    ratio("host overhead per call", guarded / bare, || {
        format!(
            "{:>+8.1} %    target <= 10 %     {}",
            (guarded / bare - 1.0) * 100.0,
            verdict(guarded / bare <= 1.10)
        )
    });
    ratio("batch write, plugin / native", n / pl, || {
        format!(
            "{:>9.2}x   target >= 0.90x    {}",
            n / pl,
            verdict(n / pl >= 0.90)
        )
    });
}

/// One line of the ratios: `shown()` if `value` was measured, else "not run".
fn ratio(label: &str, value: f64, shown: impl FnOnce() -> String) {
    if value.is_nan() {
        println!("  {label:<33} not run (TRELLIS_BENCH_ONLY)");
    } else {
        println!("  {label:<33} {}", shown());
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT MET" }
}

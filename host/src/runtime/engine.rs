//! The process's one `Engine`: component model, pooling allocator, epoch interruption
//! driven by a ticker thread that ticks only while guest code runs; and the cache of
//! precompiled components.

use crate::runtime::limits::MAX_MEMORY;
use anyhow::Context as _;
use sha2::{Digest, Sha256};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use wasmtime::component::Component;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// One epoch tick. Call deadlines are counted in ticks, so they are this precise.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Instances the pool holds at once (all plugins together; shared out by `budget.rs`),
/// unless `[runtime] instance-pool` says otherwise.
pub const POOL_INSTANCES: u32 = 256;

/// Core instances one component instance may hold.
const MAX_CORE_INSTANCES_PER_COMPONENT: u32 = 64;

pub fn build_engine() -> anyhow::Result<Engine> {
    build_engine_with(true)
}

/// The engine, with or without the pooling allocator (without: for comparisons).
pub fn build_engine_with(pooling: bool) -> anyhow::Result<Engine> {
    build_engine_sized(pooling, POOL_INSTANCES)
}

/// The engine, its pool holding `pool_instances` instances (`[runtime] instance-pool`).
pub fn build_engine_sized(pooling: bool, pool_instances: u32) -> anyhow::Result<Engine> {
    let mut cfg = Config::new();
    cfg.wasm_component_model(true);
    // TRELLIS_PERFMAP=1: write /tmp/perf-<pid>.map so `perf` names plugin functions.
    if std::env::var_os("TRELLIS_PERFMAP").is_some_and(|v| v == "1") {
        cfg.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    cfg.epoch_interruption(true);
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(pool_instances)
        // Room for every component instance's most core instances: the per-plugin
        // budgets count component instances, so no plugin may run the pool out of core
        // instances first. Only a counter (metadata is allocated per instance in use).
        .total_core_instances(pool_instances * MAX_CORE_INSTANCES_PER_COMPONENT)
        .total_memories(pool_instances * 2)
        .total_tables(pool_instances * 4)
        .total_stacks(pool_instances)
        .max_memory_size(MAX_MEMORY as usize)
        .max_core_instances_per_component(MAX_CORE_INSTANCES_PER_COMPONENT)
        .max_memories_per_component(8)
        .max_tables_per_component(32)
        .table_elements(100_000)
        // Reset small memories, tables and stacks with memset instead of madvise when a
        // slot is freed: plugin instances are short-lived and reused constantly, and
        // page faults on the next use cost more than the memset.
        .linear_memory_keep_resident(1 << 20)
        .table_keep_resident(64 << 10)
        .async_stack_keep_resident(64 << 10)
        // Kernels >= 6.7 let wasmtime reset only the pages that were touched.
        .pagemap_scan(wasmtime::Enabled::Auto);
    if pooling {
        cfg.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    Engine::new(&cfg).map_err(|e| anyhow::anyhow!("creating the WebAssembly engine: {e:#}"))
}

/// The epoch ticker: advances the engine's epoch every tick while guest code may run,
/// and sleeps on a condition variable while none can, so an idle daemon does not wake
/// 200 times a second for nothing. Every entry into guest code (an export, `init`, a
/// resource destructor, instantiation's start functions) holds a [`GuestRunning`] from
/// before the guest starts until it is done; the first one wakes the ticker. A call
/// that starts while the ticker sleeps is therefore ticked like any other, and no guest
/// escapes its deadline. The thread ends when the last handle or the engine goes.
pub struct EpochTicker {
    shared: Arc<TickerShared>,
}

struct TickerShared {
    /// Entries into guest code in flight.
    in_flight: AtomicUsize,
    sleep: Mutex<Sleep>,
    wake: Condvar,
    /// Ticks given so far (for tests and diagnostics).
    ticks: AtomicU64,
}

#[derive(Default)]
struct Sleep {
    /// Set when the ticker's last handle is dropped: the thread ends.
    stopped: bool,
    /// The thread waits for a call (no tick comes until one starts).
    parked: bool,
}

/// Guest code may be running: the ticker ticks while any of these is alive.
pub struct GuestRunning(Arc<TickerShared>);

impl Drop for GuestRunning {
    fn drop(&mut self) {
        // The ticker notices the count at zero on its next tick and goes to sleep.
        self.0.in_flight.fetch_sub(1, SeqCst);
    }
}

impl EpochTicker {
    /// Start the ticker thread of `engine`.
    pub fn start(engine: &Engine) -> Arc<EpochTicker> {
        let shared = Arc::new(TickerShared {
            in_flight: AtomicUsize::new(0),
            sleep: Mutex::default(),
            wake: Condvar::new(),
            ticks: AtomicU64::new(0),
        });
        let weak = engine.weak();
        let t = shared.clone();
        std::thread::Builder::new()
            .name("trellis-epoch".into())
            .spawn(move || {
                loop {
                    {
                        let mut sleep = t.sleep.lock().unwrap_or_else(|p| p.into_inner());
                        // `enter` counts before it takes this lock to wake us, so a
                        // call is either seen here or its wake-up comes after the wait.
                        while t.in_flight.load(SeqCst) == 0 && !sleep.stopped {
                            sleep.parked = true;
                            sleep = t.wake.wait(sleep).unwrap_or_else(|p| p.into_inner());
                        }
                        sleep.parked = false;
                        if sleep.stopped {
                            return;
                        }
                    }
                    std::thread::sleep(EPOCH_TICK);
                    let Some(engine) = weak.upgrade() else { return };
                    engine.increment_epoch();
                    t.ticks.fetch_add(1, Relaxed);
                }
            })
            .expect("spawning the epoch ticker thread");
        Arc::new(EpochTicker { shared })
    }

    /// Guest code is about to run: tick (waking the ticker if it sleeps) until the
    /// returned guard is dropped.
    pub fn enter(&self) -> GuestRunning {
        if self.shared.in_flight.fetch_add(1, SeqCst) == 0 {
            // Under the lock, so the wake-up cannot fall between the ticker's check of
            // the count and its wait.
            let _l = self.shared.sleep.lock().unwrap_or_else(|p| p.into_inner());
            self.shared.wake.notify_one();
        }
        GuestRunning(self.shared.clone())
    }

    /// Entries into guest code in flight.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(SeqCst)
    }

    /// True while the thread waits for a call: no tick comes until one starts.
    pub fn is_parked(&self) -> bool {
        let sleep = self.shared.sleep.lock().unwrap_or_else(|p| p.into_inner());
        sleep.parked && self.shared.in_flight.load(SeqCst) == 0
    }

    /// Ticks given since the start.
    pub fn ticks(&self) -> u64 {
        self.shared.ticks.load(Relaxed)
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.shared
            .sleep
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stopped = true;
        self.shared.wake.notify_one();
    }
}

/// A component ready to link, and how it was obtained.
pub struct Compiled {
    pub component: Component,
    pub bytes: u64,
    pub sha256: String,
    pub took: Duration,
    pub from_cache: bool,
    pub cache_file: Option<PathBuf>,
}

/// Load a component, from the precompiled cache when it holds this exact file for this
/// exact engine, else compile it and store the artifact (write-temp + rename).
pub fn load_component(
    engine: &Engine,
    path: &Path,
    cache_dir: Option<&Path>,
) -> anyhow::Result<Compiled> {
    let start = Instant::now();
    let wasm = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let sha256 = hex::encode(Sha256::digest(&wasm));
    let mut h = std::hash::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    let engine_key = format!("{:016x}", h.finish());
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("component");
    let dir = match cache_dir {
        Some(d) => d.to_path_buf(),
        None => path.parent().unwrap_or(Path::new(".")).join(".cache"),
    };
    let cache_file = dir.join(format!("{stem}-{}-{engine_key}.cwasm", &sha256[..16]));
    if let Ok(artifact) = std::fs::read(&cache_file) {
        // Read into memory rather than mmap: a mapped artifact that anything truncates
        // while the daemon runs would crash it (SIGBUS); a copy cannot.
        // SAFETY: the artifact was written by this host (same engine key) into a
        // directory the operator controls, for a component with this exact hash;
        // wasmtime also checks engine compatibility before using it.
        match unsafe { Component::deserialize(engine, &artifact) } {
            Ok(component) => {
                return Ok(Compiled {
                    component,
                    bytes: wasm.len() as u64,
                    sha256,
                    took: start.elapsed(),
                    from_cache: true,
                    cache_file: Some(cache_file),
                });
            }
            Err(e) => {
                tracing::warn!(file = %cache_file.display(), "ignoring unusable precompiled artifact: {e}")
            }
        }
    }
    let component = Component::new(engine, &wasm)
        .map_err(|e| anyhow::anyhow!("{} is not a valid component: {e}", path.display()))?;
    let took = start.elapsed();
    let stored = store_artifact(&component, &dir, &cache_file);
    if let Err(e) = &stored {
        tracing::debug!(dir = %dir.display(), "not caching the precompiled component: {e}");
    }
    Ok(Compiled {
        component,
        bytes: wasm.len() as u64,
        sha256,
        took,
        from_cache: false,
        cache_file: stored.ok().map(|_| cache_file),
    })
}

/// Remove older artifacts of the same component (other hashes or engines): each rebuild
/// of a plugin would otherwise leave one behind.
fn prune_stale(dir: &Path, keep: &Path) {
    let Some(name) = keep.file_name().and_then(|n| n.to_str()) else {
        return;
    };
    // `<stem>-<sha16>-<engine16>.cwasm`: the stem is everything before the last two dashes.
    let Some(stem) = name.rsplitn(3, '-').nth(2) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let Some(other) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if path != keep && other.ends_with(".cwasm") && other.rsplitn(3, '-').nth(2) == Some(stem) {
            let _ = std::fs::remove_file(&path);
        }
    }
}

fn store_artifact(component: &Component, dir: &Path, file: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let bytes = component.serialize()?;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = file.with_extension(format!("tmp.{}.{n}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, file)?;
    prune_stale(dir, file);
    Ok(())
}

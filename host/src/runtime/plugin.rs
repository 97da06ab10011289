//! A loaded plugin: its current generation (`InstancePre` linked once, grants, limits,
//! configuration), a small pool of idle instances, and the one guarded path every call
//! into it takes.
//!
//! The guarded call sets the epoch deadline and a wall-clock timeout, keeps the epoch
//! ticker awake while it runs (it sleeps while no guest code can run), measures the call,
//! and turns whatever went wrong into a `PluginError`. Every entry into guest code takes
//! it: exports, `init`, and resource destructors ([`Plugin::drop_resource`]); wasmtime 48
//! runs an export's post-return inside the export's own call, so it is guarded too. An
//! instance that trapped, hit a limit or timed out is poisoned and dropped, never
//! returned to the pool; the next use gets a fresh instance from the cached
//! `InstancePre`. Crashes in a row lead to quarantine with backoff.
//!
//! Guest code never holds a runtime worker thread for more than one epoch tick: at each
//! tick a running guest yields to the async runtime (other tasks, heartbeats and the API
//! run in between), and traps once its call has used up its deadline in ticks.

use crate::capabilities::secrets::SecretStore;
use crate::config::QuarantineConfig;
use crate::runtime::budget::{InstanceCharge, PluginBudget, Refusal};
use crate::runtime::engine::{EPOCH_TICK, EpochTicker, GuestRunning};
use crate::runtime::errors::{ErrorKind, PluginError};
use crate::runtime::health::{Health, HealthState};
use crate::runtime::inspect::ComponentInfo;
use crate::runtime::limits::Limits;
use crate::runtime::manifest::Manifest;
use crate::runtime::metrics::PluginMetrics;
use crate::runtime::state::{Grants, InstanceState};
use crate::wit::types;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use wasmtime::component::{InstancePre, ResourceAny, ResourceTableError};
use wasmtime::{Store, Trap, UpdateDeadline};

/// Idle instances kept per plugin for reuse.
const MAX_IDLE: usize = 4;

/// The longest error message from a plugin the host keeps (logs, health, responses).
const MAX_ERROR_MESSAGE: usize = 4096;

pub type CallFuture<'a, T> = Pin<Box<dyn Future<Output = wasmtime::Result<T>> + Send + 'a>>;

/// How the component was obtained (for `plugin check` and metrics).
#[derive(Debug, Clone)]
pub struct CompileStats {
    pub bytes: u64,
    pub sha256: String,
    pub took: Duration,
    pub from_cache: bool,
}

pub(crate) use crate::wit::versioned::ExportIndices;
pub use crate::wit::versioned::Exports;

/// One live instance. Owned by whoever uses it; resources (a log writer, a channel)
/// live inside it, so stateful users keep their instance.
pub struct Instance {
    pub store: Store<InstanceState>,
    pub exports: Exports,
    poisoned: bool,
    /// Epoch ticks the current call may still run guest code for (see `guest_store`).
    ticks_left: Arc<AtomicU64>,
    /// The plugin generation it was made from (its code, grants and limits): after a
    /// reload, older instances finish what they do and are not reused.
    generation: Arc<Generation>,
}

/// When a call began, and how long it may take in wall-clock time (its instance's).
#[derive(Clone, Copy)]
pub struct CallStart {
    at: Instant,
    wall: Duration,
}

impl Instance {
    /// True once the instance trapped or timed out: it must not be used again.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }
}

pub struct Plugin {
    pub name: Arc<str>,
    pub manifest: Manifest,
    pub info: ComponentInfo,
    pub compiled: CompileStats,
    pub metrics: Arc<PluginMetrics>,
    /// Its instances and their memory against its caps (shared by its generations).
    pub budget: Arc<PluginBudget>,
    /// What a reload replaces (the component and its configuration), numbered.
    current: RwLock<(u64, Arc<Generation>)>,
    pub(crate) secrets: Arc<SecretStore>,
    pub(crate) quarantine: QuarantineConfig,
    health: Mutex<Health>,
    /// Lock-free mirrors of `health` for the call path: a healthy plugin's calls take
    /// no lock. `crashes` > 0 or `quarantined` send a call through the slow path.
    crashes: AtomicU32,
    quarantined: AtomicBool,
    idle: Mutex<Vec<Instance>>,
    /// The engine's epoch ticker: every entry into guest code holds it awake.
    ticker: Arc<EpochTicker>,
}

/// One version of a plugin: the compiled, linked component, and the configuration,
/// grants and limits its instances start with. A reload puts a new one in place;
/// instances made from the old one keep running (with its grants and limits) until
/// their work is done.
pub struct Generation {
    pub version: String,
    /// The operator's grants and the limits it runs under (a reload may change them:
    /// new instances get the new ones, instances at work keep theirs).
    pub grants: Grants,
    pub limits: Limits,
    /// The call deadline in epoch ticks, and the wall-clock timeout (computed once).
    deadline_ticks: u64,
    wall_timeout: Duration,
    /// The `trellis:plugin` version it was built for (a reload may move to another).
    pub wit: String,
    pub sha256: String,
    pre: InstancePre<InstanceState>,
    indices: ExportIndices,
    config_json: Arc<str>,
}

impl Plugin {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        manifest: Manifest,
        info: ComponentInfo,
        limits: Limits,
        grants: Grants,
        compiled: CompileStats,
        config_json: String,
        pre: InstancePre<InstanceState>,
        indices: ExportIndices,
        secrets: Arc<SecretStore>,
        quarantine: QuarantineConfig,
        budget: Arc<PluginBudget>,
        ticker: Arc<EpochTicker>,
    ) -> Plugin {
        let generation = Generation {
            version: manifest.version.clone(),
            grants,
            limits,
            deadline_ticks: (limits.call_timeout.as_micros() / EPOCH_TICK.as_micros()) as u64 + 1,
            // A few ticks longer than the epoch deadline, so the cleaner epoch trap wins
            // for a spinning guest; this one stops a guest blocked in a host call.
            wall_timeout: limits.call_timeout + EPOCH_TICK * 3,
            wit: manifest.wit.to_string(),
            sha256: compiled.sha256.clone(),
            pre,
            indices,
            config_json: config_json.into(),
        };
        Plugin {
            name: manifest.name.as_str().into(),
            manifest,
            info,
            compiled,
            metrics: Arc::default(),
            budget,
            current: RwLock::new((1, Arc::new(generation))),
            secrets,
            quarantine,
            health: Mutex::default(),
            crashes: AtomicU32::new(0),
            quarantined: AtomicBool::new(false),
            idle: Mutex::default(),
            ticker,
        }
    }

    /// The generation new instances are made from, and its number (1 until a reload).
    pub fn current(&self) -> (u64, Arc<Generation>) {
        let c = self.current.read().unwrap_or_else(|p| p.into_inner());
        (c.0, c.1.clone())
    }

    /// Put `new`'s code and configuration in place of this plugin's: new instances come
    /// from it, idle ones of the old generation are dropped, busy ones finish their work
    /// (a log being written, a link) and are not reused. `new` must be the same plugin
    /// filling the same extension points; it has passed its canary already.
    pub(crate) fn replace_with(&self, new: Plugin) -> Result<u64, String> {
        if new.name != self.name {
            return Err(format!(
                "the new manifest names `{}`, not `{}`",
                new.name, self.name
            ));
        }
        if new.info.points() != self.info.points() {
            return Err(format!(
                "a reload cannot change the extension points (it fills {:?}, the new one {:?}): restart the daemon for that",
                self.info.points(),
                new.info.points()
            ));
        }
        let (_, generation) = new.current();
        // The same budget (runtimes keep one per plugin name), with the new caps.
        self.budget.reserve(&generation.limits)?;
        let number = {
            let mut c = self.current.write().unwrap_or_else(|p| p.into_inner());
            c.0 += 1;
            c.1 = generation;
            c.0
        };
        self.drain_idle();
        Ok(number)
    }

    /// The linked, pre-instantiated component (for benchmarks and tools).
    pub fn instance_pre(&self) -> InstancePre<InstanceState> {
        self.current().1.pre.clone()
    }

    /// A fresh instance's state, prepared from the grants (for benchmarks and tools;
    /// outside the plugin's budget).
    pub fn prepare_state(&self) -> anyhow::Result<InstanceState> {
        let g = self.current().1;
        InstanceState::prepare(
            &self.name,
            &g.grants,
            &g.limits,
            &self.secrets,
            &self.metrics,
            None,
        )
    }

    /// The limits new instances run under.
    pub fn limits(&self) -> Limits {
        self.current().1.limits
    }

    /// Instantiate without `init` and without the guarded path: the bare cost.
    pub async fn instantiate_bare(&self, state: InstanceState) -> wasmtime::Result<Instance> {
        let g = self.current().1;
        let (mut store, ticks_left) = guest_store(&g, state);
        // Start functions are guest code.
        let running = self.ticker.enter();
        let instance = g.pre.instantiate_async(&mut store).await?;
        drop(running);
        let exports = g.indices.load(&mut store, &instance)?;
        Ok(Instance {
            store,
            exports,
            poisoned: false,
            ticks_left,
            generation: g,
        })
    }

    /// The configuration `init` receives (JSON).
    pub fn config_json(&self) -> Arc<str> {
        self.current().1.config_json.clone()
    }

    pub fn health(&self) -> HealthState {
        self.health.lock().unwrap().state(Instant::now())
    }

    pub fn last_error(&self) -> Option<String> {
        self.health.lock().unwrap().last_error.clone()
    }

    fn admit(&self) -> Result<(), PluginError> {
        if !self.quarantined.load(Relaxed) {
            return Ok(());
        }
        let h = self.health.lock().unwrap();
        h.admit(Instant::now()).map_err(|retry_in| {
            self.metrics.quarantine_refusals.fetch_add(1, Relaxed);
            PluginError::Quarantined {
                plugin: self.name.to_string(),
                failures: h.consecutive_failures(),
                retry_in,
                last: h.last_error.clone().unwrap_or_default(),
            }
        })
    }

    fn on_success(&self) {
        if self.crashes.load(Relaxed) != 0 || self.quarantined.load(Relaxed) {
            self.health.lock().unwrap().on_success();
            self.crashes.store(0, Relaxed);
            self.quarantined.store(false, Relaxed);
        }
    }

    /// Charge a new instance to the plugin's budget. Idle instances hold charges too:
    /// when refused, they are dropped and it is tried once more.
    fn charge_instance(&self) -> Result<InstanceCharge, PluginError> {
        let refused = match self.budget.try_charge_instance() {
            Ok(c) => return Ok(c),
            Err(r) => r,
        };
        let had_idle = !self.idle.lock().unwrap().is_empty();
        let refused = if had_idle {
            self.drain_idle();
            match self.budget.try_charge_instance() {
                Ok(c) => return Ok(c),
                Err(r) => r,
            }
        } else {
            refused
        };
        self.budget.count(&refused);
        Err(self.at_budget("instantiate", refused))
    }

    /// The typed refusal of a budget (not a crash: nothing is wrong with an instance).
    fn at_budget(&self, call: &'static str, r: Refusal) -> PluginError {
        let err = PluginError::AtBudget {
            plugin: self.name.to_string(),
            call,
            key: r.key(),
            detail: r.detail(),
        };
        tracing::debug!(plugin = %self.name, "{err}");
        err
    }

    /// A fresh instance, initialised with the plugin's configuration.
    pub async fn instantiate(&self) -> Result<Instance, PluginError> {
        self.admit()?;
        let charge = self.charge_instance()?;
        let g = self.current().1;
        let state = InstanceState::prepare(
            &self.name,
            &g.grants,
            &g.limits,
            &self.secrets,
            &self.metrics,
            Some(charge),
        )
        .map_err(|e| {
            self.crashed(PluginError::Instantiate {
                plugin: self.name.to_string(),
                detail: format!("{e:#}"),
            })
        })?;
        let (mut store, ticks_left) = guest_store(&g, state);
        self.metrics.instantiations.fetch_add(1, Relaxed);
        // Start functions are guest code: ticked like a call.
        let running = self.ticker.enter();
        let instantiated =
            tokio::time::timeout(g.limits.call_timeout, g.pre.instantiate_async(&mut store)).await;
        drop(running);
        let instance = match instantiated {
            Ok(Ok(i)) => i,
            Ok(Err(e)) => {
                if let Some(r) = store.data().limiter.hit_budget {
                    return Err(self.at_budget("instantiate", r));
                }
                let detail = if store.data().limiter.hit_memory {
                    format!(
                        "its initial memory exceeds the limit of {} bytes (limits.memory)",
                        g.limits.memory
                    )
                } else {
                    format!("{e:#}")
                };
                return Err(self.crashed(PluginError::Instantiate {
                    plugin: self.name.to_string(),
                    detail,
                }));
            }
            Err(_) => {
                return Err(self.crashed(PluginError::Deadline {
                    plugin: self.name.to_string(),
                    call: "instantiate",
                    limit: g.limits.call_timeout,
                }));
            }
        };
        let exports = g.indices.load(&mut store, &instance).map_err(|e| {
            self.crashed(PluginError::Instantiate {
                plugin: self.name.to_string(),
                detail: format!("{e:#}"),
            })
        })?;
        let config = g.config_json.clone();
        let mut inst = Instance {
            store,
            exports,
            poisoned: false,
            ticks_left,
            generation: g,
        };
        let r = self
            .call(&mut inst, "init", move |i| {
                Box::pin(async move { i.exports.lifecycle.init(&mut i.store, &config).await })
            })
            .await?;
        self.answer("init", r)?;
        Ok(inst)
    }

    /// An instance for a short, stateless use: an idle one, or a fresh one.
    pub async fn checkout(&self) -> Result<Instance, PluginError> {
        self.admit()?;
        let idle = self.idle.lock().unwrap().pop();
        match idle {
            Some(i) if Arc::ptr_eq(&i.generation, &self.current().1) => Ok(i),
            _ => self.instantiate().await,
        }
    }

    /// Give an instance back for reuse. Poisoned instances (a trap, a limit, a deadline,
    /// in an export or a destructor) are dropped, never pooled.
    pub fn checkin(&self, inst: Instance) {
        if inst.poisoned || !Arc::ptr_eq(&inst.generation, &self.current().1) {
            return;
        }
        let mut idle = self.idle.lock().unwrap();
        if idle.len() < MAX_IDLE {
            idle.push(inst);
        }
    }

    /// Drop idle instances (after a reload or to free memory).
    pub fn drain_idle(&self) {
        self.idle.lock().unwrap().clear();
    }

    /// Run one call into the plugin under its limits. `f` receives the instance and
    /// returns the raw wasmtime call; everything that can go wrong comes back typed.
    /// (Adapters on hot paths use the `guarded!` macro instead, which does the same
    /// without boxing the call's future.)
    pub async fn call<T, F>(
        &self,
        inst: &mut Instance,
        call: &'static str,
        f: F,
    ) -> Result<T, PluginError>
    where
        F: for<'a> FnOnce(&'a mut Instance) -> CallFuture<'a, T>,
    {
        let start = self.begin(inst, call)?;
        let out = {
            let mut fut = f(inst);
            self.with_deadline(call, start, fut.as_mut()).await
        };
        self.finish(inst, call, start, out)
    }

    /// Before a call: refuse a poisoned instance or a quarantined plugin, arm the epoch
    /// deadline. Returns the call's start time.
    pub fn begin(&self, inst: &mut Instance, call: &'static str) -> Result<CallStart, PluginError> {
        if inst.poisoned {
            return Err(PluginError::Trap {
                plugin: self.name.to_string(),
                call,
                detail: "instance was poisoned by an earlier failure".into(),
            });
        }
        self.admit()?;
        // (No need to reset the limiter's flag: an instance that hit it is poisoned.)
        let g = &inst.generation;
        let (ticks, wall) = (g.deadline_ticks, g.wall_timeout);
        inst.ticks_left.store(ticks, Relaxed);
        inst.store.set_epoch_deadline(1);
        Ok(CallStart {
            at: Instant::now(),
            wall,
        })
    }

    /// Drop resource `r` (a log writer, a channel) in the guest, on the guarded path:
    /// its destructor is guest code, under the same deadline, counters and health as
    /// an export. On failure the instance is poisoned and must not be pooled.
    pub async fn drop_resource(
        &self,
        inst: &mut Instance,
        call: &'static str,
        r: ResourceAny,
    ) -> Result<(), PluginError> {
        crate::guarded!(*self, inst, call, |store| r.resource_drop_async(store))
    }

    /// The call's future under the wall-clock deadline (the epoch deadline stops a
    /// spinning guest; this stops one blocked in a host call), in a tracing span. The
    /// epoch ticker ticks while it lives: every guarded entry into guest code comes here.
    pub fn with_deadline<'f, F: Future + ?Sized>(
        &self,
        call: &'static str,
        start: CallStart,
        fut: Pin<&'f mut F>,
    ) -> WithDeadline<'f, F> {
        let span = tracing::debug_span!("plugin_call", plugin = %self.name, call);
        WithDeadline {
            call: fut,
            span,
            start: start.at,
            limit: start.wall,
            timer: None,
            _running: self.ticker.enter(),
        }
    }

    /// After a call: metrics, health, and what went wrong, typed. A failed instance is
    /// poisoned.
    pub fn finish<T>(
        &self,
        inst: &mut Instance,
        call: &'static str,
        start: CallStart,
        out: Result<wasmtime::Result<T>, ()>,
    ) -> Result<T, PluginError> {
        self.metrics.observe(start.at.elapsed());
        let err = match out {
            Ok(Ok(v)) => {
                // `init` runs on every fresh instance: its success says nothing about
                // whether the plugin's real work has stopped crashing.
                if call != "init" {
                    self.on_success();
                }
                return Ok(v);
            }
            Ok(Err(e)) => self.classify(inst, call, e),
            Err(()) => PluginError::Deadline {
                plugin: self.name.to_string(),
                call,
                limit: inst.generation.limits.call_timeout,
            },
        };
        inst.poisoned = true;
        if let PluginError::AtBudget { .. } = err {
            // The instance is gone (it trapped mid-call), but it did nothing wrong on
            // its own: the plugin's instances together are at their memory budget.
            tracing::warn!(plugin = %self.name, "{err}; the instance was discarded");
            return Err(err);
        }
        Err(self.crashed(err))
    }

    fn classify(&self, inst: &Instance, call: &'static str, e: wasmtime::Error) -> PluginError {
        let plugin = self.name.to_string();
        if let Some(r) = inst.store.data().limiter.hit_budget {
            return PluginError::AtBudget {
                plugin,
                call,
                key: r.key(),
                detail: r.detail(),
            };
        }
        let limits = &inst.generation.limits;
        if inst.store.data().limiter.hit_memory {
            return PluginError::MemoryLimit {
                plugin,
                call,
                limit: limits.memory,
            };
        }
        if let Some(Trap::Interrupt) = e.downcast_ref::<Trap>() {
            return PluginError::Deadline {
                plugin,
                call,
                limit: limits.call_timeout,
            };
        }
        let text = format!("{e:#}");
        if e.downcast_ref::<ResourceTableError>().is_some()
            || text.contains("resource table has no free capacity")
        {
            return PluginError::ResourceLimit {
                plugin,
                call,
                limit: limits.max_resources,
            };
        }
        let detail = match e.downcast_ref::<Trap>() {
            Some(t) => format!("{t}"),
            None => text.lines().next().unwrap_or("unknown failure").to_string(),
        };
        PluginError::Trap {
            plugin,
            call,
            detail,
        }
    }

    /// Book-keeping for a crash: metrics, health (maybe quarantine), log. Returns it.
    fn crashed(&self, err: PluginError) -> PluginError {
        self.metrics.count(&err);
        let text = err.to_string();
        let q = {
            let mut h = self.health.lock().unwrap();
            let q = h.on_crash(&self.quarantine, Instant::now(), &text);
            self.crashes.store(h.consecutive_failures(), Relaxed);
            if q.is_some() {
                self.quarantined.store(true, Relaxed);
            }
            q
        };
        tracing::warn!(plugin = %self.name, kind = err.label(), "{text}; the instance was discarded");
        if let Some(period) = q {
            self.metrics.quarantines.fetch_add(1, Relaxed);
            tracing::error!(plugin = %self.name, "plugin quarantined for {period:?} after repeated failures");
        }
        err
    }

    /// Turn the plugin's own answer into a typed result (counted and logged).
    pub fn answer<T>(
        &self,
        call: &'static str,
        r: Result<T, types::Error>,
    ) -> Result<T, PluginError> {
        r.map_err(|e| {
            let (kind, message) = match e {
                types::Error::Retryable(m) => (ErrorKind::Retryable, m),
                types::Error::Permanent(m) => (ErrorKind::Permanent, m),
                types::Error::BadConfig(m) => (ErrorKind::BadConfig, m),
                types::Error::Denied(m) => (ErrorKind::Denied, m),
            };
            // Plugin text: bounded and escaped before it reaches logs and responses.
            let message = crate::runtime::output::plugin_text(message, MAX_ERROR_MESSAGE);
            let err = PluginError::Plugin {
                plugin: self.name.to_string(),
                call,
                kind,
                message,
            };
            self.metrics.count(&err);
            match kind {
                ErrorKind::Denied | ErrorKind::BadConfig => {
                    tracing::warn!(plugin = %self.name, call, "{err}")
                }
                _ => tracing::debug!(plugin = %self.name, call, "{err}"),
            }
            err
        })
    }

    /// Refuse a returned value above `limits.max-return`; the instance is discarded
    /// (it may keep producing such values) and the call counts as a crash.
    pub fn check_return(
        &self,
        inst: &mut Instance,
        call: &'static str,
        size: usize,
    ) -> Result<(), PluginError> {
        let max = inst.generation.limits.max_return;
        if size as u64 > max {
            inst.poisoned = true;
            return Err(self.crashed(PluginError::Oversized {
                plugin: self.name.to_string(),
                call,
                size: size as u64,
                limit: max,
            }));
        }
        Ok(())
    }

    /// Refuse an answer that breaks the contract (a cursor that does not advance, a
    /// name or a count out of bounds): counted, logged, typed. The caller does not
    /// check the instance back in.
    pub fn invalid(&self, call: &'static str, problem: String) -> PluginError {
        let err = PluginError::Invalid {
            plugin: self.name.to_string(),
            call,
            problem,
        };
        self.metrics.count(&err);
        tracing::warn!(plugin = %self.name, call, "{err}");
        err
    }

    pub fn not_implemented(&self, point: &'static str) -> PluginError {
        PluginError::NotImplemented {
            plugin: self.name.to_string(),
            point,
        }
    }
}

/// A store for one instance of generation `g`: its memory limiter, and the epoch
/// callback that makes guest code yield the worker thread at every tick and trap once
/// its call has run for its deadline in ticks (`Plugin::begin` sets them). Returns the
/// store and its tick budget.
fn guest_store(g: &Generation, state: InstanceState) -> (Store<InstanceState>, Arc<AtomicU64>) {
    let mut store = Store::new(g.pre.engine(), state);
    store.limiter(|s| &mut s.limiter);
    let ticks_left = Arc::new(AtomicU64::new(g.deadline_ticks));
    let left = ticks_left.clone();
    store.epoch_deadline_callback(move |_| {
        let before = left
            .fetch_update(Relaxed, Relaxed, |t| Some(t.saturating_sub(1)))
            .unwrap_or(0);
        if before <= 1 {
            return Ok(UpdateDeadline::Interrupt);
        }
        // Back to the end of the runtime's queue: a spinning guest slows only itself.
        Ok(UpdateDeadline::YieldCustom(
            1,
            Box::pin(tokio::task::yield_now()),
        ))
    });
    store.set_epoch_deadline(1);
    (store, ticks_left)
}

/// A call with a wall-clock deadline whose timer is armed only if the call goes pending
/// (waits in a host call): a call that completes at once never touches the timer wheel.
/// Holds the call's future by pinned reference, so the (large) future is never moved.
/// Resolves to `Err(())` when the deadline passed first.
pub struct WithDeadline<'f, F: ?Sized> {
    call: Pin<&'f mut F>,
    span: tracing::Span,
    start: Instant,
    limit: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Keeps the epoch ticker ticking while the call is in flight (dropped with it,
    /// whether it finished, timed out or was cancelled).
    _running: GuestRunning,
}

impl<F: Future + ?Sized> Future for WithDeadline<'_, F> {
    type Output = Result<F::Output, ()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let _entered = this.span.enter();
        if let Poll::Ready(v) = this.call.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        let deadline = this.start + this.limit;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(())),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Call a plugin export under the plugin's limits without boxing the call's future:
///
/// ```ignore
/// let r = guarded!(plugin, &mut inst, "write", |store| guest.writer().call_write(store, w, &batch));
/// ```
///
/// Evaluates to `Result<T, PluginError>`, exactly like `Plugin::call`.
#[macro_export]
macro_rules! guarded {
    ($plugin:expr, $inst:expr, $call:expr, |$store:ident| $fut:expr) => {{
        let plugin: &$crate::runtime::Plugin = &$plugin;
        let inst: &mut $crate::runtime::Instance = $inst;
        match plugin.begin(inst, $call) {
            Err(e) => Err(e),
            Ok(start) => {
                let out = {
                    let $store = &mut inst.store;
                    // Pinned in place, in argument position: the future is never moved,
                    // and temporaries in `$fut` live until the await completes.
                    plugin
                        .with_deadline($call, start, ::core::pin::pin!($fut))
                        .await
                };
                plugin.finish(inst, $call, start, out)
            }
        }
    }};
}

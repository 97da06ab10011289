//! Budgets per plugin: how many instances a plugin may hold at once, and how much linear
//! memory all its instances may hold together, out of the one pooling allocator every
//! plugin shares (`engine::POOL_INSTANCES`).
//!
//! Sharing: each loaded plugin has `reserved-instances` of the pool kept for it alone
//! (the reserves together must fit the pool: checked at load), and may take more, up to
//! its `max-instances`, while the unreserved rest of the pool has room. So a plugin that
//! holds instances for ever (a log that never closes) takes at most its cap, and never
//! what another plugin has reserved. A reserve rather than a fixed partition: most
//! plugins use a few instances, while a logging method holds one per open log (as many
//! as runs writing at once); a fixed partition would either waste the pool or force
//! every cap low.
//!
//! An instance is charged when it is made (an [`InstanceCharge`] held in its store's
//! limiter) and released when it is dropped, whatever ended it. Linear memory is charged
//! as it grows (`Limiter::memory_growing`) and released with the instance.

use crate::runtime::limits::Limits;
use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex};

/// The pool every plugin's instances come from, and what the plugins reserved of it.
#[derive(Debug)]
pub struct InstancePool {
    size: u32,
    /// Changed together, under this lock: a charge beyond a reserve needs both.
    shares: Mutex<Shares>,
}

#[derive(Debug, Default)]
struct Shares {
    /// The reserves of the loaded plugins, together.
    reserved: u32,
    /// Instances in use beyond their plugin's reserve, together.
    beyond: u32,
}

impl InstancePool {
    pub fn new(size: u32) -> Arc<InstancePool> {
        Arc::new(InstancePool {
            size,
            shares: Mutex::default(),
        })
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    /// (reserved by all plugins, in use beyond the reserves).
    pub fn usage(&self) -> (u32, u32) {
        let s = self.shares.lock().unwrap_or_else(|p| p.into_inner());
        (s.reserved, s.beyond)
    }

    /// The pool's series, and the `# HELP` lines of the per-plugin budget series.
    pub fn render(&self, out: &mut String) {
        out.push_str(
            "# HELP trellis_plugin_instances Instances of the plugin alive now (busy or idle), against trellis_plugin_instances_max (limits.max-instances).\n\
             # HELP trellis_plugin_memory_bytes Linear memory of all the plugin's instances, against trellis_plugin_memory_budget_bytes (limits.total-memory).\n\
             # HELP trellis_plugin_budget_refusals_total Instances or memory growth refused, per limit reached.\n",
        );
        let (reserved, beyond) = self.usage();
        let _ = writeln!(
            out,
            "# HELP trellis_instance_pool_size Instances the pooling allocator holds, for all plugins.\n# TYPE trellis_instance_pool_size gauge\ntrellis_instance_pool_size {}",
            self.size
        );
        let _ = writeln!(out, "trellis_instance_pool_reserved {reserved}");
        let _ = writeln!(out, "trellis_instance_pool_beyond_reserves {beyond}");
    }
}

/// Why a plugin may not have another instance, or more memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// At `max-instances`.
    MaxInstances { limit: u32 },
    /// At or above its reserve, and the pool's unreserved part is in use.
    Pool { reserved: u32, pool: u32 },
    /// Growing would take its instances together past `total-memory`.
    TotalMemory { used: u64, wanted: u64, limit: u64 },
}

impl Refusal {
    /// The configuration key that sets the limit reached.
    pub fn key(&self) -> &'static str {
        match self {
            Refusal::MaxInstances { .. } => "limits.max-instances",
            Refusal::Pool { .. } => "limits.reserved-instances",
            Refusal::TotalMemory { .. } => "limits.total-memory",
        }
    }

    pub fn detail(&self) -> String {
        match self {
            Refusal::MaxInstances { limit } => {
                format!("all {limit} of its instances are in use")
            }
            Refusal::Pool { reserved, pool } => format!(
                "it holds more than its {reserved} reserved instances and the rest of the pool of {pool} is in use or reserved by other plugins"
            ),
            Refusal::TotalMemory {
                used,
                wanted,
                limit,
            } => format!(
                "its instances hold {used} bytes of linear memory; {wanted} more would pass its budget of {limit}"
            ),
        }
    }
}

/// One plugin's budget: its caps (from the limits of the generation serving new work)
/// and what its instances use now. Shared by every generation of the plugin, so a
/// reload's instances and the old ones count together.
#[derive(Debug)]
pub struct PluginBudget {
    pool: Arc<InstancePool>,
    max_instances: AtomicU32,
    /// Reserved in the pool (0 until the plugin is loaded: its canary draws on the
    /// unreserved part).
    reserved: AtomicU32,
    total_memory: AtomicU64,
    /// Written under the pool's lock only.
    instances: AtomicU32,
    memory: AtomicU64,
    pub max_instance_refusals: AtomicU64,
    pub pool_refusals: AtomicU64,
    pub memory_refusals: AtomicU64,
}

impl PluginBudget {
    /// A budget with `limits`' caps and no reserve yet (see [`reserve`](Self::reserve)).
    pub fn new(pool: Arc<InstancePool>, limits: &Limits) -> Arc<PluginBudget> {
        Arc::new(PluginBudget {
            pool,
            max_instances: AtomicU32::new(limits.max_instances),
            reserved: AtomicU32::new(0),
            total_memory: AtomicU64::new(limits.total_memory),
            instances: AtomicU32::new(0),
            memory: AtomicU64::new(0),
            max_instance_refusals: AtomicU64::new(0),
            pool_refusals: AtomicU64::new(0),
            memory_refusals: AtomicU64::new(0),
        })
    }

    /// Take `limits`' caps, and reserve its `reserved-instances` in the pool in place of
    /// what was reserved before. Refused (nothing changed) if the reserves of all plugins
    /// would pass the pool's size.
    pub fn reserve(&self, limits: &Limits) -> Result<(), String> {
        let mut s = self.pool.shares.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.reserved.load(Relaxed);
        let new = limits.reserved_instances;
        let others = s.reserved - old;
        if others + new > self.pool.size {
            return Err(format!(
                "reserving {new} instances would bring the plugins' reserves to {}, above the instance pool of {} (other plugins reserve {others})",
                others + new,
                self.pool.size
            ));
        }
        let used = self.instances.load(Relaxed);
        s.beyond = s.beyond - used.saturating_sub(old) + used.saturating_sub(new);
        s.reserved = others + new;
        self.reserved.store(new, Relaxed);
        self.max_instances.store(limits.max_instances, Relaxed);
        self.total_memory.store(limits.total_memory, Relaxed);
        Ok(())
    }

    /// Charge one more instance, or say which limit refuses it (counted).
    pub fn charge_instance(self: &Arc<Self>) -> Result<InstanceCharge, Refusal> {
        self.try_charge_instance().inspect_err(|r| self.count(r))
    }

    /// Count a refusal against its limit.
    pub fn count(&self, r: &Refusal) {
        match r {
            Refusal::MaxInstances { .. } => &self.max_instance_refusals,
            Refusal::Pool { .. } => &self.pool_refusals,
            Refusal::TotalMemory { .. } => &self.memory_refusals,
        }
        .fetch_add(1, Relaxed);
    }

    /// [`charge_instance`](Self::charge_instance) without counting a refusal (the caller
    /// may free an idle instance and try again).
    pub fn try_charge_instance(self: &Arc<Self>) -> Result<InstanceCharge, Refusal> {
        let mut s = self.pool.shares.lock().unwrap_or_else(|p| p.into_inner());
        let used = self.instances.load(Relaxed);
        let limit = self.max_instances.load(Relaxed);
        if used >= limit {
            return Err(Refusal::MaxInstances { limit });
        }
        let reserved = self.reserved.load(Relaxed);
        if used >= reserved {
            if s.reserved + s.beyond >= self.pool.size {
                return Err(Refusal::Pool {
                    reserved,
                    pool: self.pool.size,
                });
            }
            s.beyond += 1;
        }
        self.instances.store(used + 1, Relaxed);
        Ok(InstanceCharge {
            budget: self.clone(),
            memory: 0,
        })
    }

    fn release_instance(&self) {
        let mut s = self.pool.shares.lock().unwrap_or_else(|p| p.into_inner());
        let used = self.instances.load(Relaxed);
        if used > self.reserved.load(Relaxed) {
            s.beyond -= 1;
        }
        self.instances.store(used.saturating_sub(1), Relaxed);
    }

    /// Instances held now (busy or idle, any generation).
    pub fn instances(&self) -> u32 {
        self.instances.load(Relaxed)
    }

    pub fn max_instances(&self) -> u32 {
        self.max_instances.load(Relaxed)
    }

    pub fn reserved_instances(&self) -> u32 {
        self.reserved.load(Relaxed)
    }

    /// Linear memory held by all the plugin's instances, in bytes.
    pub fn memory(&self) -> u64 {
        self.memory.load(Relaxed)
    }

    pub fn total_memory(&self) -> u64 {
        self.total_memory.load(Relaxed)
    }

    /// The budget as `/api/plugins` shows it.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "instances": self.instances(),
            "max_instances": self.max_instances(),
            "reserved_instances": self.reserved_instances(),
            "memory": self.memory(),
            "total_memory": self.total_memory(),
            "refusals": {
                "max_instances": self.max_instance_refusals.load(Relaxed),
                "pool": self.pool_refusals.load(Relaxed),
                "total_memory": self.memory_refusals.load(Relaxed),
            },
        })
    }

    /// Append this plugin's budget series to a Prometheus text exposition.
    pub fn render(&self, plugin: &str, out: &mut String) {
        let gauges = [
            ("instances", u64::from(self.instances())),
            ("instances_max", u64::from(self.max_instances())),
            ("instances_reserved", u64::from(self.reserved_instances())),
            ("memory_bytes", self.memory()),
            ("memory_budget_bytes", self.total_memory()),
        ];
        for (name, v) in gauges {
            let _ = writeln!(out, "trellis_plugin_{name}{{plugin=\"{plugin}\"}} {v}");
        }
        for (limit, v) in [
            ("max-instances", &self.max_instance_refusals),
            ("reserved-instances", &self.pool_refusals),
            ("total-memory", &self.memory_refusals),
        ] {
            let _ = writeln!(
                out,
                "trellis_plugin_budget_refusals_total{{plugin=\"{plugin}\",limit=\"{limit}\"}} {}",
                v.load(Relaxed)
            );
        }
    }
}

/// One instance's share of its plugin's budget: the instance itself and the linear
/// memory it grew to. Released when dropped (with the instance's store).
#[derive(Debug)]
pub struct InstanceCharge {
    budget: Arc<PluginBudget>,
    memory: u64,
}

impl InstanceCharge {
    /// Charge `delta` more bytes of linear memory, or refuse (counted) if the plugin's
    /// instances together would pass `total-memory`.
    pub fn grow(&mut self, delta: u64) -> Result<(), Refusal> {
        let b = &self.budget;
        let limit = b.total_memory.load(Relaxed);
        let before = b.memory.fetch_add(delta, Relaxed);
        if before + delta > limit {
            b.memory.fetch_sub(delta, Relaxed);
            b.count(&Refusal::TotalMemory {
                used: before,
                wanted: delta,
                limit,
            });
            return Err(Refusal::TotalMemory {
                used: before,
                wanted: delta,
                limit,
            });
        }
        self.memory += delta;
        Ok(())
    }
}

impl Drop for InstanceCharge {
    fn drop(&mut self) {
        self.budget.memory.fetch_sub(self.memory, Relaxed);
        self.budget.release_instance();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: u32, reserved: u32, memory: u64) -> Limits {
        Limits {
            max_instances: max,
            reserved_instances: reserved,
            total_memory: memory,
            ..Limits::default()
        }
    }

    fn loaded(pool: &Arc<InstancePool>, l: Limits) -> Arc<PluginBudget> {
        let b = PluginBudget::new(pool.clone(), &l);
        b.reserve(&l).unwrap();
        b
    }

    #[test]
    fn a_plugin_gets_at_most_its_cap_and_gets_it_again_once_an_instance_is_dropped() {
        let pool = InstancePool::new(16);
        let b = loaded(&pool, limits(3, 1, 1 << 30));
        let held: Vec<_> = (0..3).map(|_| b.charge_instance().unwrap()).collect();
        assert_eq!(b.instances(), 3);
        assert_eq!(
            b.charge_instance().unwrap_err(),
            Refusal::MaxInstances { limit: 3 }
        );
        assert_eq!(b.max_instance_refusals.load(Relaxed), 1);
        drop(held);
        assert_eq!(b.instances(), 0);
        assert_eq!(pool.usage(), (1, 0));
        let _again = b.charge_instance().unwrap();
    }

    #[test]
    fn a_plugin_holding_instances_for_ever_never_takes_another_plugins_reserve() {
        let pool = InstancePool::new(10);
        let healthy = loaded(&pool, limits(8, 3, 1 << 30));
        let hog = loaded(&pool, limits(10, 2, 1 << 30));
        // The hog takes its reserve and all of the pool nobody reserved (10 - 3 - 2).
        let held: Vec<_> = (0..10).map_while(|_| hog.charge_instance().ok()).collect();
        assert_eq!(held.len(), 7);
        assert_eq!(
            hog.charge_instance().unwrap_err(),
            Refusal::Pool {
                reserved: 2,
                pool: 10
            }
        );
        // The healthy plugin still gets all it reserved, and no more.
        let mine: Vec<_> = (0..3).map(|_| healthy.charge_instance().unwrap()).collect();
        assert!(matches!(
            healthy.charge_instance(),
            Err(Refusal::Pool { .. })
        ));
        drop(held);
        let more: Vec<_> = (0..5).map(|_| healthy.charge_instance().unwrap()).collect();
        assert_eq!(healthy.instances(), 8);
        drop((mine, more));
        assert_eq!(pool.usage(), (5, 0));
    }

    #[test]
    fn reserves_must_fit_the_pool_and_a_refused_reserve_changes_nothing() {
        let pool = InstancePool::new(10);
        let a = loaded(&pool, limits(8, 6, 1 << 30));
        let b = PluginBudget::new(pool.clone(), &limits(8, 5, 1 << 30));
        let e = b.reserve(&limits(8, 5, 1 << 30)).unwrap_err();
        assert!(e.contains("to 11, above the instance pool of 10"), "{e}");
        assert_eq!(pool.usage(), (6, 0));
        // A reload lowering a reserve while instances are held keeps the books right.
        let held: Vec<_> = (0..6).map(|_| a.charge_instance().unwrap()).collect();
        a.reserve(&limits(8, 2, 1 << 30)).unwrap();
        assert_eq!(pool.usage(), (2, 4));
        drop(held);
        assert_eq!(pool.usage(), (2, 0));
    }

    #[test]
    fn memory_is_charged_across_instances_and_released_with_each() {
        let pool = InstancePool::new(10);
        let b = loaded(&pool, limits(8, 1, 100));
        let mut one = b.charge_instance().unwrap();
        let mut two = b.charge_instance().unwrap();
        one.grow(60).unwrap();
        assert_eq!(
            two.grow(50).unwrap_err(),
            Refusal::TotalMemory {
                used: 60,
                wanted: 50,
                limit: 100
            }
        );
        assert_eq!(b.memory(), 60);
        assert_eq!(b.memory_refusals.load(Relaxed), 1);
        two.grow(40).unwrap();
        assert_eq!(b.memory(), 100);
        drop(one);
        assert_eq!(b.memory(), 40);
        two.grow(50).unwrap();
        drop(two);
        assert_eq!((b.memory(), b.instances()), (0, 0));
    }
}

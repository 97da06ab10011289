//! What each plugin instance carries in its `Store`: its WASI context (empty but for
//! grants), its capability gates and its limiter.

use crate::capabilities::files::DirGrant;
use crate::capabilities::http::{Authority, HttpGate};
use crate::capabilities::log::LogGate;
use crate::capabilities::quota::{QuotaFs, QuotaState};
use crate::capabilities::secrets::{SecretStore, SecretsGate};
use crate::capabilities::sockets::SocketGrant;
use crate::capabilities::{files, sockets};
use crate::runtime::budget::{InstanceCharge, Refusal};
use crate::runtime::limits::Limits;
use crate::runtime::metrics::PluginMetrics;
use crate::runtime::output::Stream;
use crate::runtime::stdio::TracingOutput;
use std::collections::BTreeSet;
use std::sync::Arc;
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// The operator's grants for one plugin, resolved and checked at load.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    pub dirs: Vec<DirGrant>,
    pub http: Arc<Vec<Authority>>,
    /// HTTPS trust with the operator's extra CAs (`tls-ca`); None: the public roots.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub sockets: Arc<SocketGrant>,
    pub secrets: Arc<BTreeSet<String>>,
    pub kafka: crate::capabilities::kafka::KafkaGate,
    pub exec: Arc<Vec<crate::config::ExecTemplate>>,
}

pub struct InstanceState {
    pub plugin: Arc<str>,
    pub table: ResourceTable,
    pub wasi: WasiCtx,
    pub http_ctx: WasiHttpCtx,
    pub http: HttpGate,
    pub secrets: SecretsGate,
    pub kafka: crate::capabilities::kafka::KafkaGate,
    pub exec: crate::capabilities::exec::ExecGate,
    pub log: LogGate,
    pub limiter: Limiter,
    pub metrics: Arc<PluginMetrics>,
    /// The directory grants' quotas and which descriptors lie in them.
    pub quota: QuotaState,
}

impl InstanceState {
    /// `wasi:filesystem` with the grants' quotas (linked only for a plugin with one).
    pub fn quota_fs(&mut self) -> QuotaFs<'_> {
        QuotaFs {
            fs: wasmtime_wasi::filesystem::WasiFilesystemCtxView {
                ctx: self.wasi.filesystem(),
                table: &mut self.table,
            },
            quota: &mut self.quota,
        }
    }

    /// Prepare a fresh instance's state: nothing but what was granted. `charge` is the
    /// instance's share of its plugin's budget (None: outside the budgets, for tools).
    pub fn prepare(
        plugin: &Arc<str>,
        grants: &Grants,
        limits: &Limits,
        store: &Arc<SecretStore>,
        metrics: &Arc<PluginMetrics>,
        charge: Option<InstanceCharge>,
    ) -> anyhow::Result<InstanceState> {
        // WasiCtxBuilder starts empty: no env, args, stdin, preopens, sockets or lookup.
        let mut b = WasiCtxBuilder::new();
        // Plugin file I/O is on granted local directories: do it on the calling thread
        // instead of a blocking-pool round trip per (<= 4 KiB) stream write.
        b.allow_blocking_current_thread(true);
        let output = |stream| TracingOutput {
            plugin: plugin.clone(),
            stream,
            budget: metrics.output.clone(),
            rate: limits.output_rate(),
        };
        b.stdout(output(Stream::Stdout));
        b.stderr(output(Stream::Stderr));
        files::prepare(&mut b, &grants.dirs)?;
        sockets::prepare(
            &mut b,
            plugin.clone(),
            grants.sockets.clone(),
            metrics.clone(),
        );
        let mut table = ResourceTable::new();
        table.set_max_capacity(limits.max_resources as usize);
        Ok(InstanceState {
            plugin: plugin.clone(),
            table,
            wasi: b.build(),
            http_ctx: WasiHttpCtx::new(),
            http: HttpGate {
                plugin: plugin.clone(),
                allowed: grants.http.clone(),
                tls: grants.tls.clone(),
                timeout: limits.http_timeout,
                max_response: limits.http_max_response,
                metrics: metrics.clone(),
            },
            secrets: SecretsGate {
                store: store.clone(),
                granted: grants.secrets.clone(),
            },
            kafka: grants.kafka.clone(),
            exec: crate::capabilities::exec::ExecGate {
                plugin: plugin.clone(),
                templates: grants.exec.clone(),
            },
            log: LogGate {
                budget: metrics.output.clone(),
                rate: limits.output_rate(),
            },
            limiter: Limiter {
                memory: limits.memory as usize,
                hit_memory: false,
                charge,
                hit_budget: None,
            },
            metrics: metrics.clone(),
            quota: QuotaState::new(
                grants.dirs.iter().filter_map(|d| d.quota.clone()).collect(),
                metrics.clone(),
            ),
        })
    }
}

impl WasiView for InstanceState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for InstanceState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http_ctx,
            table: &mut self.table,
            hooks: &mut self.http,
        }
    }
}

/// Caps linear memory, the instance's own and (through its charge) its plugin's across
/// all instances; remembers that it refused, so the trap that follows is reported as
/// the limit it is, not a generic crash.
pub struct Limiter {
    pub memory: usize,
    pub hit_memory: bool,
    /// The instance's share of its plugin's budget, released with the store.
    pub charge: Option<InstanceCharge>,
    /// Set when the plugin's budget refused growth.
    pub hit_budget: Option<Refusal>,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory {
            self.hit_memory = true;
            return Err(wasmtime::Error::msg(format!(
                "memory limit: growing to {desired} bytes exceeds the cap of {} bytes",
                self.memory
            )));
        }
        if let Some(charge) = &mut self.charge
            && let Err(refusal) = charge.grow(desired.saturating_sub(current) as u64)
        {
            self.hit_budget = Some(refusal);
            return Err(wasmtime::Error::msg(format!(
                "plugin budget: {} ({})",
                refusal.detail(),
                refusal.key()
            )));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

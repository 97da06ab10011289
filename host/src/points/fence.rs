//! `fence-agent` on the host side. Failure policy: fail closed — only the plugin's `ok`
//! from `fence` is "fenced"; its errors, traps, timeouts and quarantine are all
//! "not fenced", with the reason, so no standby ever takes over on a guess.

use crate::points::bindings::fence_agent::{AgentInfo, FenceAction, PowerState, Target};
use crate::runtime::{Plugin, PluginError};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceOutcome {
    /// The device confirmed the action.
    Fenced,
    /// Anything else. The node must be treated as possibly alive.
    NotFenced { reason: String },
}

/// One configured fence device: a plugin plus its parameters.
pub struct FenceDevice {
    plugin: Arc<Plugin>,
    params: Vec<(String, String)>,
}

impl FenceDevice {
    pub fn new(
        plugin: Arc<Plugin>,
        params: Vec<(String, String)>,
    ) -> Result<FenceDevice, PluginError> {
        if !plugin
            .info
            .points()
            .contains(&crate::points::Point::FenceAgent)
        {
            return Err(plugin.not_implemented("fence-agent"));
        }
        Ok(FenceDevice { plugin, params })
    }

    /// Fence (or unfence) the target. Never returns `Fenced` unless the plugin said ok.
    pub async fn fence(&self, action: FenceAction) -> FenceOutcome {
        let p = &self.plugin;
        let result: Result<(), PluginError> = async {
            let (inst, r) = pooled_call!(p, fence, "fence-agent", "fence", |g, store| g.fence(
                store,
                &self.params,
                action
            ));
            p.answer("fence", r)?;
            p.checkin(inst);
            Ok(())
        }
        .await;
        match result {
            Ok(()) => FenceOutcome::Fenced,
            Err(e) => {
                tracing::error!(plugin = %p.name, "fencing failed, treating the node as NOT fenced: {e}");
                FenceOutcome::NotFenced {
                    reason: e.to_string(),
                }
            }
        }
    }

    pub async fn status(&self) -> Result<PowerState, PluginError> {
        let p = &self.plugin;
        let (inst, r) = pooled_call!(p, fence, "fence-agent", "status", |g, store| g
            .status(store, &self.params));
        let s = p.answer("status", r)?;
        p.checkin(inst);
        Ok(s)
    }

    pub async fn monitor(&self) -> Result<(), PluginError> {
        let p = &self.plugin;
        let (inst, r) = pooled_call!(p, fence, "fence-agent", "monitor", |g, store| g
            .monitor(store, &self.params));
        p.answer("monitor", r)?;
        p.checkin(inst);
        Ok(())
    }

    pub async fn validate(&self) -> Result<(), PluginError> {
        let p = &self.plugin;
        let (inst, r) = pooled_call!(p, fence, "fence-agent", "validate", |g, store| g
            .validate(store, &self.params));
        p.answer("validate", r)?;
        p.checkin(inst);
        Ok(())
    }

    pub async fn list(&self) -> Result<Vec<Target>, PluginError> {
        let p = &self.plugin;
        let (inst, r) = pooled_call!(p, fence, "fence-agent", "list", |g, store| g
            .list(store, &self.params));
        let l = p.answer("list", r)?;
        p.checkin(inst);
        Ok(l)
    }

    /// (`metadata` cannot fail in the plugin: no answer to check.)
    pub async fn metadata(&self) -> Result<AgentInfo, PluginError> {
        let p = &self.plugin;
        let (inst, info) = pooled_call!(p, fence, "fence-agent", "metadata", |g, store| g
            .metadata(store));
        p.checkin(inst);
        Ok(info)
    }
}

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
        check_targets(&l).map_err(|problem| p.invalid("list", problem))?;
        p.checkin(inst);
        Ok(l)
    }

    /// (`metadata` cannot fail in the plugin: no answer to check.)
    pub async fn metadata(&self) -> Result<AgentInfo, PluginError> {
        let p = &self.plugin;
        let (inst, info) = pooled_call!(p, fence, "fence-agent", "metadata", |g, store| g
            .metadata(store));
        check_agent_info(&info).map_err(|problem| p.invalid("metadata", problem))?;
        p.checkin(inst);
        Ok(info)
    }
}

// What a fence agent returns becomes command-line options, XML for the cluster manager
// and `id,alias` lines it parses: names and counts are bounded and checked first.

/// Most parameters, and most targets, an agent may name.
const MAX_PARAMETERS: usize = 256;
const MAX_TARGETS: usize = 10_000;
/// Longest parameter name, target id or alias; longest description.
const MAX_NAME: usize = 256;
const MAX_DESCRIPTION: usize = 4096;

/// A parameter name: what fence-agents accept as `--name` (letters, digits, `-`, `_`).
fn is_parameter_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn check_agent_info(info: &AgentInfo) -> Result<(), String> {
    let shown = |s: &str| crate::ids::Shown(s).to_string();
    if !is_parameter_name(&info.name) {
        return Err(format!(
            "agent name `{}` (letters, digits, `-`, `_`)",
            shown(&info.name)
        ));
    }
    if info.parameters.len() > MAX_PARAMETERS {
        return Err(format!(
            "{} parameters, above the host's cap of {MAX_PARAMETERS}",
            info.parameters.len()
        ));
    }
    let texts = std::iter::once(&info.description)
        .chain(info.parameters.iter().map(|p| &p.description))
        .chain(
            info.parameters
                .iter()
                .filter_map(|p| p.default_value.as_ref()),
        );
    for t in texts {
        if t.len() > MAX_DESCRIPTION {
            return Err(format!(
                "a description or default of {} bytes, above the host's cap of {MAX_DESCRIPTION}",
                t.len()
            ));
        }
    }
    for p in &info.parameters {
        if !is_parameter_name(&p.name) {
            return Err(format!(
                "parameter name `{}` (letters, digits, `-`, `_`)",
                shown(&p.name)
            ));
        }
    }
    Ok(())
}

/// Targets are printed `id,alias` one a line: neither may hold a comma or a control
/// character (a forged line), and there are at most `MAX_TARGETS`.
fn check_targets(targets: &[Target]) -> Result<(), String> {
    if targets.len() > MAX_TARGETS {
        return Err(format!(
            "{} targets, above the host's cap of {MAX_TARGETS}",
            targets.len()
        ));
    }
    for t in targets {
        if t.id.is_empty() {
            return Err("a target with an empty id".into());
        }
        for s in std::iter::once(&t.id).chain(t.alias.as_ref()) {
            if s.len() > MAX_NAME || s.chars().any(|c| c == ',' || c.is_control()) {
                return Err(format!(
                    "target `{}`: at most {MAX_NAME} bytes, no comma or control character",
                    crate::ids::Shown(s)
                ));
            }
        }
    }
    Ok(())
}

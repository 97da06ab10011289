//! `fence-agent` on the host side. Failure policy: fail closed — "fenced" needs the
//! plugin's `ok` from `fence` *and* its `status` confirming the end state; its errors,
//! traps, timeouts and quarantine are all "not fenced", with the reason, so no standby
//! ever takes over on a guess.
//!
//! The plugin's `ok` alone is a claim, not proof: a plugin can answer `ok` at once
//! without touching the device. So, as ClusterLabs' fencing library does after
//! `set_power_status` (`fence_action`, then `get_power_status` once a second until the
//! state is reached or `--power-timeout` passes), the host asks `status` until it says
//! `off` for an off (`on` for an on or a reboot), within [`Confirm::timeout`].

use crate::runtime::{Plugin, PluginError};
use crate::wit::fence_agent::{AgentInfo, FenceAction, PowerState, Target};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// How a plugin's `ok` is confirmed by its own `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirm {
    /// How long `status` may take to report the end state (fence-agents' `--power-timeout`).
    pub timeout: Duration,
    /// The pause between two `status` calls (fence-agents waits one second).
    pub every: Duration,
}

impl Default for Confirm {
    /// fence-agents' defaults: 20 s, one `status` a second.
    fn default() -> Confirm {
        Confirm {
            timeout: Duration::from_secs(20),
            every: Duration::from_secs(1),
        }
    }
}

/// The power state a confirmed action ends in. A reboot ends `on`: its off phase cannot
/// be seen from outside, which is why a takeover fences with `off`.
fn end_state(action: FenceAction) -> PowerState {
    match action {
        FenceAction::Off => PowerState::Off,
        FenceAction::On | FenceAction::Reboot => PowerState::On,
    }
}

fn power_name(p: PowerState) -> &'static str {
    match p {
        PowerState::On => "on",
        PowerState::Off => "off",
        PowerState::Unknown => "unknown",
    }
}

fn action_name(a: FenceAction) -> &'static str {
    match a {
        FenceAction::Off => "off",
        FenceAction::On => "on",
        FenceAction::Reboot => "reboot",
    }
}

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
    confirm: Confirm,
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
        Ok(FenceDevice {
            plugin,
            params,
            confirm: Confirm::default(),
        })
    }

    /// The same device, its fences confirmed within `confirm` instead of the default.
    pub fn with_confirm(self, confirm: Confirm) -> FenceDevice {
        FenceDevice { confirm, ..self }
    }

    /// Fence (or unfence) the target. `Fenced` only if the plugin said ok and then its
    /// `status` reported the action's end state within the confirmation timeout.
    pub async fn fence(&self, action: FenceAction) -> FenceOutcome {
        if let FenceOutcome::NotFenced { reason } = self.fence_unconfirmed(action).await {
            return FenceOutcome::NotFenced { reason };
        }
        match self.confirmed(action).await {
            Ok(()) => FenceOutcome::Fenced,
            Err(reason) => {
                let p = &self.plugin;
                p.metrics.unconfirmed_fences.fetch_add(1, Relaxed);
                tracing::error!(plugin = %p.name, "fencing NOT confirmed, treating the node as NOT fenced: {reason}");
                FenceOutcome::NotFenced { reason }
            }
        }
    }

    /// Its `ok` answers that `status` did not confirm so far (the plugin's counter).
    pub fn unconfirmed(&self) -> u64 {
        self.plugin.metrics.unconfirmed_fences.load(Relaxed)
    }

    /// Ask `status` until it reports the end state of `action`, within the timeout;
    /// why not, if it does not (the last answer, or the last error).
    async fn confirmed(&self, action: FenceAction) -> Result<(), String> {
        let want = end_state(action);
        let start = Instant::now();
        loop {
            let last = match self.status().await {
                Ok(s) if s == want => return Ok(()),
                Ok(s) => format!("status says `{}`", power_name(s)),
                Err(e) => format!("status failed: {e}"),
            };
            if start.elapsed() + self.confirm.every > self.confirm.timeout {
                return Err(format!(
                    "plugin `{}` answered ok to `{}`, but its status did not confirm `{}` within {:?} ({last}): the device did not carry it out, or the plugin answers ok without doing it",
                    self.plugin.name,
                    action_name(action),
                    power_name(want),
                    self.confirm.timeout,
                ));
            }
            tokio::time::sleep(self.confirm.every).await;
        }
    }

    /// The plugin's own answer to `fence`, without the status confirmation (the
    /// conformance kit checks `status` itself, to name which half of the contract broke).
    pub async fn fence_unconfirmed(&self, action: FenceAction) -> FenceOutcome {
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

//! The fence-agent suite (wit/fence-agent.wit): metadata always; with a device
//! (`--param key=value`, e.g. the Redfish emulator's address), validate, a status →
//! off → on cycle confirmed by status, monitor and list. Fencing a device is real: point
//! the kit at a test device (an emulator, Debian's fence_dummy-like fixture), never at
//! a node in production. The kit calls the plugin's `fence` without the host's status
//! confirmation (points/fence.rs), and asks `status` itself, to name the half that broke.

use super::Suite;
use crate::points::fence::{FenceDevice, FenceOutcome};
use crate::runtime::Plugin;
use crate::wit::fence_agent::{Action, FenceAction, PowerState};
use std::sync::Arc;

pub async fn suite(plugin: Arc<Plugin>, params: &[(String, String)]) -> Suite {
    let mut s = Suite::new(format!("fence-agent: {}", plugin.name));
    let device = match FenceDevice::new(plugin.clone(), params.to_vec()) {
        Ok(d) => d,
        Err(e) => {
            s.blocked("metadata", &e.to_string());
            return s;
        }
    };
    let mut required = Vec::new();
    s.check("metadata names the agent, its parameters and actions", async {
        let info = device.metadata().await.map_err(|e| e.to_string())?;
        if info.name.is_empty() {
            return Err("an empty name".into());
        }
        for need in [Action::On, Action::Off, Action::Status, Action::Monitor] {
            if !info.actions.contains(&need) {
                return Err(format!(
                    "the actions do not include `{}` (Pacemaker's fencer needs on, off, status and monitor)",
                    action_name(need)
                ));
            }
        }
        if let Some(p) = info.parameters.iter().find(|p| p.name.is_empty()) {
            return Err(format!("a parameter without a name: {p:?}"));
        }
        required = info
            .parameters
            .iter()
            .filter(|p| p.required && p.default_value.is_none())
            .map(|p| p.name.clone())
            .collect();
        Ok(format!(
            "`{}`, {} parameters, {} actions",
            info.name,
            info.parameters.len(),
            info.actions.len()
        ))
    })
    .await;
    if params.is_empty() {
        s.check(
            "a device without its required parameters is refused",
            async {
                if required.is_empty() {
                    return Ok("no required parameters".into());
                }
                match device.validate().await {
                    Ok(()) => Err(format!(
                        "validate accepted no parameters, but metadata requires {required:?}"
                    )),
                    Err(e) => Ok(format!("refused: {e}")),
                }
            },
        )
        .await;
        s.blocked(
            "status, off, on, monitor, list against a device",
            "give a test device's parameters with --param key=value (e.g. the Redfish emulator's ip, ipport, username, password)",
        );
        return s;
    }
    let valid = s
        .check("validate accepts the device", async {
            device.validate().await.map_err(|e| e.to_string())?;
            Ok(String::new())
        })
        .await;
    if !valid {
        s.blocked(
            "the rest of the suite",
            "the device's parameters are refused",
        );
        return s;
    }
    s.check("status answers", async {
        device
            .status()
            .await
            .map(|p| power_name(p).to_string())
            .map_err(|e| e.to_string())
    })
    .await;
    s.check("off, then status says off", async {
        match device.fence_unconfirmed(FenceAction::Off).await {
            FenceOutcome::Fenced => {}
            FenceOutcome::NotFenced { reason } => return Err(format!("off: {reason}")),
        }
        match device.status().await.map_err(|e| e.to_string())? {
            PowerState::Off => Ok(String::new()),
            p => Err(format!(
                "status `{}` after a confirmed off: an agent answers off only once the device is off",
                power_name(p)
            )),
        }
    })
    .await;
    s.check("off again when off is confirmed too", async {
        match device.fence_unconfirmed(FenceAction::Off).await {
            FenceOutcome::Fenced => Ok(String::new()),
            FenceOutcome::NotFenced { reason } => Err(reason),
        }
    })
    .await;
    s.check("on, then status says on", async {
        match device.fence_unconfirmed(FenceAction::On).await {
            FenceOutcome::Fenced => {}
            FenceOutcome::NotFenced { reason } => return Err(format!("on: {reason}")),
        }
        match device.status().await.map_err(|e| e.to_string())? {
            PowerState::On => Ok(String::new()),
            p => Err(format!("status `{}` after a confirmed on", power_name(p))),
        }
    })
    .await;
    s.check("monitor", async {
        device.monitor().await.map_err(|e| e.to_string())?;
        Ok(String::new())
    })
    .await;
    s.check("list answers", async {
        let targets = device.list().await.map_err(|e| e.to_string())?;
        Ok(format!("{} target(s)", targets.len()))
    })
    .await;
    s
}

fn action_name(a: Action) -> &'static str {
    match a {
        Action::On => "on",
        Action::Off => "off",
        Action::Reboot => "reboot",
        Action::Status => "status",
        Action::Monitor => "monitor",
        Action::List => "list",
        Action::Metadata => "metadata",
        Action::ValidateAll => "validate-all",
    }
}

fn power_name(p: PowerState) -> &'static str {
    match p {
        PowerState::On => "on",
        PowerState::Off => "off",
        PowerState::Unknown => "unknown",
    }
}

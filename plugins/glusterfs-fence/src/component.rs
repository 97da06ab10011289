//! The calls: the gluster CLI through the host's `exec` capability (templates the
//! operator granted; see lib.rs).

use crate::{Device, PARAMETERS, bricks, op_ok, rejected};
use trellis_sdk::fence_agent::{
    Action, AgentInfo, FenceAction, Guest, Lifecycle, Parameter, Params, PowerState, Target,
};
use trellis_sdk::{Error, exec};

struct GlusterFence;

/// Run a granted template; its stdout, or an error with the CLI's words.
fn gluster(template: &str, values: &[(&str, &str)]) -> Result<String, Error> {
    let out = exec::run(template, values)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status != Some(0) {
        return Err(Error::retryable(format!(
            "{template} exited {:?}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            stdout.trim()
        )));
    }
    Ok(stdout)
}

fn device(params: &Params) -> Result<Device, Error> {
    Device::from_params(params).map_err(Error::bad_config)
}

fn rejected_now(d: &Device) -> Result<Vec<String>, Error> {
    let xml = gluster("get-reject", &[("volume", &d.volume)])?;
    op_ok(&xml).map_err(Error::retryable)?;
    Ok(rejected(&xml))
}

/// Set `auth.reject` to `list` (reset when empty), then read it back.
fn set_rejected(d: &Device, list: &[String]) -> Result<Vec<String>, Error> {
    if list.is_empty() {
        gluster("reset-reject", &[("volume", &d.volume)])?;
    } else {
        gluster(
            "set-reject",
            &[("volume", &d.volume), ("addresses", &list.join(","))],
        )?;
    }
    rejected_now(d)
}

impl Lifecycle for GlusterFence {
    fn init(_config: String) -> Result<(), Error> {
        Ok(())
    }
}

impl Guest for GlusterFence {
    fn metadata() -> AgentInfo {
        AgentInfo {
            name: "fence_trellis_glusterfs".into(),
            description: "Storage fencing on a GlusterFS volume (auth.reject), as a Trellis plugin"
                .into(),
            parameters: PARAMETERS
                .iter()
                .map(|(name, description, required)| Parameter {
                    name: name.to_string(),
                    description: description.to_string(),
                    required: *required,
                    secret: false,
                    default_value: None,
                })
                .collect(),
            actions: vec![
                Action::On,
                Action::Off,
                Action::Status,
                Action::Monitor,
                Action::List,
                Action::Metadata,
                Action::ValidateAll,
            ],
        }
    }

    fn validate(params: Params) -> Result<(), Error> {
        device(&params).map(|_| ())
    }

    /// Off: the node's address is rejected by the volume.
    fn status(params: Params) -> Result<PowerState, Error> {
        let d = device(&params)?;
        let target = d.target().map_err(Error::bad_config)?;
        Ok(if rejected_now(&d)?.iter().any(|a| a == target) {
            PowerState::Off
        } else {
            PowerState::On
        })
    }

    fn fence(params: Params, action: FenceAction) -> Result<(), Error> {
        let d = device(&params)?;
        let target = d.target().map_err(Error::bad_config)?.to_string();
        let mut list = rejected_now(&d)?;
        let cut = match action {
            FenceAction::Off => true,
            FenceAction::On => false,
            FenceAction::Reboot => {
                return Err(Error::permanent(
                    "storage fencing has no reboot: fence with off, let the node back with on",
                ));
            }
        };
        let has = list.contains(&target);
        if has == cut {
            return Ok(()); // already so
        }
        if cut {
            list.push(target.clone());
        } else {
            list.retain(|a| *a != target);
        }
        // Confirmed only when the volume reports it.
        let now = set_rejected(&d, &list)?;
        if now.contains(&target) == cut {
            Ok(())
        } else {
            Err(Error::retryable(format!(
                "auth.reject on {} reads {:?} after the change",
                d.volume, now
            )))
        }
    }

    /// The volume serves: the CLI answers, and at least half its bricks are online.
    fn monitor(params: Params) -> Result<(), Error> {
        let d = device(&params)?;
        let xml = gluster("volume-status", &[("volume", &d.volume)])?;
        op_ok(&xml).map_err(Error::retryable)?;
        let b = bricks(&xml);
        let online = b.iter().filter(|(_, up)| *up).count();
        let offline: Vec<&str> = b
            .iter()
            .filter(|(_, up)| !up)
            .map(|(n, _)| n.as_str())
            .collect();
        if b.is_empty() || online * 2 < b.len() {
            return Err(Error::retryable(format!(
                "volume {}: {online} of {} bricks online (offline: {})",
                d.volume,
                b.len(),
                offline.join(", ")
            )));
        }
        if !offline.is_empty() {
            trellis_sdk::log::warn(&format!(
                "volume {} degraded: offline bricks {}",
                d.volume,
                offline.join(", ")
            ));
        }
        Ok(())
    }

    /// The addresses currently cut off.
    fn list(params: Params) -> Result<Vec<Target>, Error> {
        let d = device(&params)?;
        Ok(rejected_now(&d)?
            .into_iter()
            .map(|id| Target { id, alias: None })
            .collect())
    }
}

trellis_sdk::export_fence_agent!(GlusterFence);

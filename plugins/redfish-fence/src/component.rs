//! The Redfish calls, inside the sandbox: HTTPS through the host's `wasi:http` (only
//! the BMCs the operator granted), the password from the host's secrets store.

use crate::{Device, PARAMETERS, is_off, members, reset_target, reset_type, systems_collection};
use serde_json::Value;
use std::time::{Duration, Instant};
use trellis_sdk::fence_agent::{
    Action, AgentInfo, FenceAction, Guest, Lifecycle, Parameter, Params, PowerState, Target,
};
use trellis_sdk::{Error, http, secrets};

struct RedfishFence;

/// One BMC session's worth of state: the device and its Authorization header.
struct Bmc {
    device: Device,
    auth: String,
}

impl Bmc {
    fn connect(params: &Params) -> Result<Bmc, Error> {
        let device = Device::from_params(params).map_err(Error::bad_config)?;
        let password = secrets::get(&device.password_secret)?;
        let auth = http::basic_auth(&device.username, &password);
        Ok(Bmc { device, auth })
    }

    /// A Redfish call; the JSON answer (`Null` when there is no body). Refusals are
    /// errors with the BMC's status and words.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, Error> {
        let url = self.device.url(path);
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let mut headers: Vec<(&str, &[u8])> = vec![
            ("authorization", self.auth.as_bytes()),
            ("accept", b"application/json"),
            ("odata-version", b"4.0"),
        ];
        if body.is_some() {
            headers.push(("content-type", b"application/json"));
        }
        let r = http::request(method, &url, &headers, payload.as_bytes())
            .map_err(|e| Error::retryable(format!("{method} {url}: {e}")))?;
        let words = || String::from_utf8_lossy(&r.body[..r.body.len().min(300)]).into_owned();
        match r.status {
            200..=299 if r.body.is_empty() => Ok(Value::Null),
            200..=299 => serde_json::from_slice(&r.body)
                .map_err(|e| Error::permanent(format!("{method} {url}: not JSON: {e}"))),
            401 | 403 => Err(Error::denied(format!(
                "{method} {url}: HTTP {} (check `username` and the password secret)",
                r.status
            ))),
            s if s >= 500 => Err(Error::retryable(format!(
                "{method} {url}: HTTP {s}: {}",
                words()
            ))),
            s => Err(Error::permanent(format!(
                "{method} {url}: HTTP {s}: {}",
                words()
            ))),
        }
    }

    /// The system to act on: `systems-uri`, or (as fence_redfish) the last member of
    /// the service root's Systems collection.
    fn system_uri(&self) -> Result<String, Error> {
        if let Some(u) = &self.device.systems_uri {
            return Ok(u.clone());
        }
        members(&self.systems()?)
            .pop()
            .ok_or_else(|| Error::permanent("the BMC lists no systems"))
    }

    fn systems(&self) -> Result<Value, Error> {
        let root = self.call("GET", &self.device.redfish_uri, None)?;
        let collection = systems_collection(&root)
            .ok_or_else(|| Error::permanent("the BMC's service root has no Systems"))?;
        self.call("GET", &collection, None)
    }

    fn power_is_off(&self, system: &str) -> Result<bool, Error> {
        let s = self.call("GET", system, None)?;
        is_off(&s).ok_or_else(|| Error::permanent(format!("{system} reports no PowerState")))
    }

    /// Turn the system on or off and wait until the BMC says so (fence_redfish's
    /// fence_action: nothing is sent when it already is).
    fn power(&self, system: &str, on: bool) -> Result<(), Error> {
        if self.power_is_off(system)? != on {
            return Ok(());
        }
        let s = self.call("GET", system, None)?;
        let target = reset_target(&s)
            .ok_or_else(|| Error::permanent(format!("{system} offers no ComputerSystem.Reset")))?;
        self.call(
            "POST",
            &target,
            Some(&serde_json::json!({ "ResetType": reset_type(on) })),
        )?;
        let deadline = Instant::now() + Duration::from_secs(self.device.power_timeout);
        loop {
            std::thread::sleep(Duration::from_secs(self.device.status_sleep));
            if self.power_is_off(system)? != on {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::retryable(format!(
                    "{system} did not turn {} within {} s",
                    if on { "on" } else { "off" },
                    self.device.power_timeout
                )));
            }
        }
    }
}

impl Lifecycle for RedfishFence {
    fn init(_config: String) -> Result<(), Error> {
        Ok(())
    }
}

impl Guest for RedfishFence {
    fn metadata() -> AgentInfo {
        AgentInfo {
            name: "fence_redfish".into(),
            description: "I/O fencing through a Redfish BMC (ClusterLabs fence_redfish's parameters and actions), as a Trellis plugin".into(),
            parameters: PARAMETERS
                .iter()
                .map(|(name, description, required, secret, default)| Parameter {
                    name: name.to_string(),
                    description: description.to_string(),
                    required: *required,
                    secret: *secret,
                    default_value: default.map(str::to_string),
                })
                .collect(),
            actions: vec![
                Action::On,
                Action::Off,
                Action::Reboot,
                Action::Status,
                Action::Monitor,
                Action::List,
                Action::Metadata,
                Action::ValidateAll,
            ],
        }
    }

    fn validate(device: Params) -> Result<(), Error> {
        Device::from_params(&device)
            .map(|_| ())
            .map_err(Error::bad_config)
    }

    fn status(device: Params) -> Result<PowerState, Error> {
        let bmc = Bmc::connect(&device)?;
        let system = bmc.system_uri()?;
        Ok(if bmc.power_is_off(&system)? {
            PowerState::Off
        } else {
            PowerState::On
        })
    }

    fn fence(device: Params, action: FenceAction) -> Result<(), Error> {
        let bmc = Bmc::connect(&device)?;
        let system = bmc.system_uri()?;
        match action {
            FenceAction::Off => bmc.power(&system, false),
            FenceAction::On => bmc.power(&system, true),
            // fence-agents' default reboot method: off, confirmed, then on, confirmed.
            FenceAction::Reboot => {
                bmc.power(&system, false)?;
                bmc.power(&system, true)
            }
        }
    }

    fn monitor(device: Params) -> Result<(), Error> {
        // As fence_redfish: the BMC answers for the system's power state.
        Self::status(device).map(|_| ())
    }

    fn list(device: Params) -> Result<Vec<Target>, Error> {
        let bmc = Bmc::connect(&device)?;
        let systems = bmc.systems()?;
        Ok(members(&systems)
            .into_iter()
            .map(|id| Target { id, alias: None })
            .collect())
    }
}

trellis_sdk::export_fence_agent!(RedfishFence);

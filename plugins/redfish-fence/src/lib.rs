//! `redfish-fence`: STONITH through a Redfish BMC, a Trellis fence agent that behaves
//! like ClusterLabs' `fence_redfish`: the same parameters (`ip`, `ipport`, `username`,
//! `password`, `redfish-uri`, `systems-uri`, `ssl-insecure`, `power-timeout`,
//! `stonith-status-sleep`), the same requests (Basic auth, `Accept: application/json`,
//! `OData-Version: 4.0`, `ComputerSystem.Reset` with `On`/`ForceOff`/`ForceRestart`), and
//! the same answers (a system is off only when its `PowerState` is `Off`; an action
//! returns only once the BMC reports the new state, polling until `power-timeout`).
//!
//! Differences, on purpose:
//! * `password` is the *name* of a secret granted to the plugin, never the password.
//! * Certificate checks are the host's: the operator trusts a BMC's private CA with
//!   `tls-ca` in `[plugins.redfish-fence]`; `ssl-insecure` cannot turn them off.
//! * `list` names the systems of the BMC (fence_redfish says it is not supported).
//! * A reset the BMC refuses (a 4xx/5xx answer) is an error at once, with the BMC's
//!   words; fence_redfish ignores the answer and times out polling.
//!
//! This file is the plain logic (parameters, URLs, reading the BMC's JSON), tested
//! natively; `component.rs` makes the HTTP calls inside the sandbox.

#[cfg(target_arch = "wasm32")]
mod component;

use serde_json::Value;

/// A device's parameters, as the host passes them (ClusterLabs names; `_` and `-` are
/// the same, as in fence-agents' stdin).
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    pub ip: String,
    pub ipport: u16,
    pub username: String,
    /// The name of the secret holding the password.
    pub password_secret: String,
    pub redfish_uri: String,
    pub systems_uri: Option<String>,
    /// Seconds to wait for the new power state after a reset.
    pub power_timeout: u64,
    /// Seconds between status checks while waiting.
    pub status_sleep: u64,
}

/// The parameters this agent understands: (name, description, required, secret, default).
pub const PARAMETERS: &[(&str, &str, bool, bool, Option<&str>)] = &[
    (
        "ip",
        "IP address or hostname of the BMC (ip:port also works)",
        true,
        false,
        None,
    ),
    ("ipport", "TCP port of the BMC", false, false, Some("443")),
    ("username", "Login name", true, false, None),
    (
        "password",
        "The name of the granted secret holding the login password",
        true,
        true,
        None,
    ),
    (
        "redfish-uri",
        "Base or starting Redfish URI",
        false,
        false,
        Some("/redfish/v1"),
    ),
    (
        "systems-uri",
        "Redfish Systems resource URI, e.g. /redfish/v1/Systems/1 (default: the BMC's last system)",
        false,
        false,
        None,
    ),
    (
        "ssl-insecure",
        "Accepted for compatibility; certificate checks stay on (trust a private CA with tls-ca)",
        false,
        false,
        None,
    ),
    (
        "power-timeout",
        "Seconds to wait for the new power state",
        false,
        false,
        Some("20"),
    ),
    (
        "stonith-status-sleep",
        "Seconds between status checks while waiting",
        false,
        false,
        Some("1"),
    ),
];

/// Parameters fence_redfish accepts that change nothing here (the connection is always
/// HTTPS, verified by the host).
const IGNORED: &[&str] = &[
    "ssl",
    "ssl-secure",
    "ssl-insecure",
    "action",
    "plug",
    "port",
    "nodename",
    "delay",
    "verbose",
    "quiet",
];

impl Device {
    /// Read and check the parameters; an error names the parameter.
    pub fn from_params(params: &[(String, String)]) -> Result<Device, String> {
        let device = trellis_sdk::fence_params::DeviceParams(params);
        let get = |name: &str| device.get(name);
        let takes: Vec<&str> = PARAMETERS.iter().map(|p| p.0).collect();
        if let Some(k) = device.unknown(&takes, IGNORED) {
            return Err(format!(
                "unknown parameter `{k}` (this agent takes: {})",
                names()
            ));
        }
        let required =
            |name: &str| get(name).ok_or_else(|| format!("parameter `{name}` is required"));
        let number = |name: &str, default: u64| -> Result<u64, String> {
            match get(name) {
                None => Ok(default),
                Some(v) => v
                    .parse()
                    .map_err(|_| format!("parameter `{name}`: `{v}` is not a whole number")),
            }
        };
        let mut ip = required("ip")?;
        let mut ipport = number("ipport", 443)?;
        // fence_redfish: an `ip` of the form host:port carries the port.
        if ip.matches(':').count() == 1 {
            let (h, p) = ip.split_once(':').expect("one colon");
            ipport = p
                .parse()
                .map_err(|_| format!("parameter `ip`: `{p}` is not a port"))?;
            ip = h.to_string();
        }
        let ipport = u16::try_from(ipport)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("parameter `ipport`: {ipport} is not a port"))?;
        let uri = |name: &str, v: String| {
            if v.starts_with('/') {
                Ok(v)
            } else {
                Err(format!("parameter `{name}`: `{v}` must start with /"))
            }
        };
        Ok(Device {
            ip,
            ipport,
            username: required("username")?,
            password_secret: required("password")?,
            redfish_uri: uri(
                "redfish-uri",
                get("redfish-uri").unwrap_or("/redfish/v1".into()),
            )?,
            systems_uri: get("systems-uri")
                .map(|v| uri("systems-uri", v))
                .transpose()?,
            power_timeout: number("power-timeout", 20)?,
            status_sleep: number("stonith-status-sleep", 1)?.max(1),
        })
    }

    /// `https://ip:port` + `path` (an IPv6 address in brackets).
    pub fn url(&self, path: &str) -> String {
        let host = if self.ip.contains(':') && !self.ip.starts_with('[') {
            format!("[{}]", self.ip)
        } else {
            self.ip.clone()
        };
        format!("https://{host}:{}{path}", self.ipport)
    }
}

fn names() -> String {
    PARAMETERS
        .iter()
        .map(|p| p.0)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The power state a system resource reports: like fence_redfish, anything but `Off`
/// is on. None when the resource has no `PowerState`.
pub fn is_off(system: &Value) -> Option<bool> {
    system["PowerState"].as_str().map(|s| s.trim() == "Off")
}

/// Where to POST a reset: the system's `#ComputerSystem.Reset` target.
pub fn reset_target(system: &Value) -> Option<String> {
    system["Actions"]["#ComputerSystem.Reset"]["target"]
        .as_str()
        .map(str::to_string)
}

/// The service root's Systems collection.
pub fn systems_collection(root: &Value) -> Option<String> {
    root["Systems"]["@odata.id"].as_str().map(str::to_string)
}

/// Every system in a Systems collection, in order.
pub fn members(collection: &Value) -> Vec<String> {
    collection["Members"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|s| s["@odata.id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Redfish `ResetType` for turning a system on or off (what fence_redfish sends).
pub fn reset_type(on: bool) -> &'static str {
    if on { "On" } else { "ForceOff" }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parameters_follow_fence_redfish() {
        let d = Device::from_params(&p(&[
            ("ip", "10.0.0.5:8443"),
            ("username", "admin"),
            ("password", "bmc-pw"),
            ("ssl_insecure", "1"),
        ]))
        .unwrap();
        assert_eq!((d.ip.as_str(), d.ipport), ("10.0.0.5", 8443));
        assert_eq!(d.redfish_uri, "/redfish/v1");
        assert_eq!((d.power_timeout, d.status_sleep), (20, 1));
        assert_eq!(d.url("/redfish/v1"), "https://10.0.0.5:8443/redfish/v1");
        let e = Device::from_params(&p(&[("ip", "x"), ("username", "u")])).unwrap_err();
        assert!(e.contains("`password` is required"), "{e}");
        let e = Device::from_params(&p(&[
            ("ip", "x"),
            ("username", "u"),
            ("password", "s"),
            ("pasword", "t"),
        ]))
        .unwrap_err();
        assert!(e.contains("unknown parameter `pasword`"), "{e}");
        let e = Device::from_params(&p(&[
            ("ip", "x"),
            ("ipport", "70000"),
            ("username", "u"),
            ("password", "s"),
        ]))
        .unwrap_err();
        assert!(e.contains("`ipport`"), "{e}");
        let d = Device::from_params(&p(&[("ip", "::1"), ("username", "u"), ("password", "s")]))
            .unwrap();
        assert_eq!(d.url("/x"), "https://[::1]:443/x");
    }

    #[test]
    fn reading_the_bmc() {
        let system: Value = serde_json::from_str(
            r##"{"PowerState": "Off", "Actions": {"#ComputerSystem.Reset": {"target": "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset"}}}"##,
        )
        .unwrap();
        assert_eq!(is_off(&system), Some(true));
        assert_eq!(
            is_off(&serde_json::json!({"PowerState": "PoweringOff"})),
            Some(false)
        );
        assert_eq!(is_off(&serde_json::json!({})), None);
        assert_eq!(
            reset_target(&system).as_deref(),
            Some("/redfish/v1/Systems/1/Actions/ComputerSystem.Reset")
        );
        let c = serde_json::json!({"Members": [{"@odata.id": "/a"}, {"@odata.id": "/b"}]});
        assert_eq!(members(&c), ["/a", "/b"]);
    }
}

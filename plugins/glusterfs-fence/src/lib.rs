//! `glusterfs-fence`: storage fencing on a GlusterFS volume. Fencing a node cuts its
//! address off the volume (`auth.reject`), unfencing lets it back; `monitor` reports the
//! volume's health from `gluster volume status --xml` (bricks online, and whether
//! enough are for the volume to serve). The plugin never runs anything by itself: it
//! calls the gluster CLI through the host's `exec` capability, as templates the
//! operator grants (see README.md):
//!
//! | template | argv |
//! |---|---|
//! | `volume-status` | `gluster --mode=script volume status {volume} --xml` |
//! | `get-reject` | `gluster --mode=script volume get {volume} auth.reject --xml` |
//! | `set-reject` | `gluster --mode=script volume set {volume} auth.reject {addresses}` |
//! | `reset-reject` | `gluster --mode=script volume reset {volume} auth.reject` |
//!
//! Parameters (ClusterLabs style): `volume`, and the address to fence as `plug` (or
//! `port`, as Pacemaker passes it). This file is the plain logic, tested natively;
//! `component.rs` makes the calls.

#[cfg(target_arch = "wasm32")]
mod component;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub volume: String,
    /// The address to cut off (None: only status of the volume, monitor, list).
    pub target: Option<String>,
}

/// (name, description, required)
pub const PARAMETERS: &[(&str, &str, bool)] = &[
    (
        "volume",
        "The GlusterFS volume holding the shared state",
        true,
    ),
    (
        "plug",
        "The address of the node to cut off (Pacemaker may pass it as `port`)",
        false,
    ),
];

const IGNORED: &[&str] = &["action", "nodename", "port", "delay", "verbose", "quiet"];

impl Device {
    pub fn from_params(params: &[(String, String)]) -> Result<Device, String> {
        let device = trellis_sdk::fence_params::DeviceParams(params);
        let get = |name: &str| device.get(name);
        let takes: Vec<&str> = PARAMETERS.iter().map(|p| p.0).collect();
        if let Some(k) = device.unknown(&takes, IGNORED) {
            return Err(format!(
                "unknown parameter `{k}` (this agent takes: volume, plug)"
            ));
        }
        let volume = get("volume").ok_or("parameter `volume` is required")?;
        Ok(Device {
            volume,
            target: get("plug").or_else(|| get("port")),
        })
    }

    pub fn target(&self) -> Result<&str, String> {
        self.target.as_deref().ok_or_else(|| {
            "parameter `plug` (the address to cut off) is required for this action".into()
        })
    }
}

/// The text of every `<tag>...</tag>` in `xml`, in order. gluster's `--xml` output is
/// flat and unescaped for these fields, so this is all the XML reading needed.
pub fn values<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(after[..j].trim());
        rest = &after[j + close.len()..];
    }
    out
}

/// The CLI's own verdict: `opRet` 0, else its `opErrstr`.
pub fn op_ok(xml: &str) -> Result<(), String> {
    match values(xml, "opRet").first() {
        Some(&"0") => Ok(()),
        Some(r) => Err(format!(
            "gluster failed ({r}): {}",
            values(xml, "opErrstr").first().copied().unwrap_or("")
        )),
        None => Err("gluster's answer has no opRet (not --xml output?)".into()),
    }
}

/// Bricks of `volume status --xml`: (host:path, online). Daemons (self-heal) left out.
pub fn bricks(xml: &str) -> Vec<(String, bool)> {
    values(xml, "node")
        .into_iter()
        .filter_map(|node| {
            let path = *values(node, "path").first()?;
            if !path.starts_with('/') {
                return None;
            }
            let host = values(node, "hostname").first().copied().unwrap_or("?");
            let online = values(node, "status").first() == Some(&"1");
            Some((format!("{host}:{path}"), online))
        })
        .collect()
}

/// The addresses `auth.reject` holds, from `volume get ... auth.reject --xml`.
pub fn rejected(xml: &str) -> Vec<String> {
    let v = values(xml, "Value").first().copied().unwrap_or("");
    if v.is_empty() || v.starts_with("(null)") {
        return vec![];
    }
    v.split(',')
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "<cliOutput><opRet>0</opRet><opErrno>0</opErrno><opErrstr/><volStatus><volumes><volume><volName>gv</volName><node><hostname>vm</hostname><path>/b1</path><status>1</status></node><node><hostname>vm</hostname><path>/b2</path><status>0</status></node><node><hostname>Self-heal Daemon</hostname><path>localhost</path><status>1</status></node></volume></volumes></volStatus></cliOutput>";

    #[test]
    fn reading_gluster() {
        assert_eq!(op_ok(STATUS), Ok(()));
        assert_eq!(
            bricks(STATUS),
            [("vm:/b1".to_string(), true), ("vm:/b2".to_string(), false)]
        );
        let get = "<cliOutput><opRet>0</opRet><volGetopts><Opt><Option>auth.reject</Option><Value>10.0.0.5,10.0.0.6</Value></Opt></volGetopts></cliOutput>";
        assert_eq!(rejected(get), ["10.0.0.5", "10.0.0.6"]);
        assert!(rejected("<Value>(null) (DEFAULT)</Value>").is_empty());
        assert!(
            op_ok("<opRet>-1</opRet><opErrstr>Volume gv does not exist</opErrstr>")
                .unwrap_err()
                .contains("does not exist")
        );
    }

    #[test]
    fn parameters() {
        let p = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>()
        };
        let d = Device::from_params(&p(&[("volume", "gv"), ("port", "10.0.0.5")])).unwrap();
        assert_eq!(d.target.as_deref(), Some("10.0.0.5"));
        assert!(
            Device::from_params(&p(&[("plug", "x")]))
                .unwrap_err()
                .contains("`volume`")
        );
        assert!(
            Device::from_params(&p(&[("volume", "gv"), ("volumes", "x")]))
                .unwrap_err()
                .contains("unknown")
        );
    }
}

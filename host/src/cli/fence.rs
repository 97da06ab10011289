//! `trellis fence`: a Wasm fence-agent plugin run as a ClusterLabs fence agent, so
//! Pacemaker's fencer (and anything else that drives `fence_*` programs) can use it.
//!
//! The protocol is fence-agents' (`/usr/share/fence/fencing.py`): options as
//! `key=value` lines on stdin when there are no arguments (what Pacemaker does), else
//! as long options (`--ip=10.0.0.5`, `-o off`); `action` defaults to `reboot`; the
//! actions `on off reboot status monitor list list-status metadata validate-all`;
//! metadata as `<resource-agent>` XML; exit 0 for success (and for status ON), 2 for
//! status OFF, 1 for a failure, 2 for bad arguments. `on`, `off` and `reboot` succeed
//! only once the plugin's own `status` reports the end state (`points::fence::Confirm`:
//! polled once a second for up to 20 s, fence-agents' `power-timeout`), as
//! `fence_action` does: a plugin's bare `ok` is not enough.
//!
//! Install it as a program named like a fence agent, with a wrapper naming the plugin:
//!
//! ```sh
//! #!/bin/sh
//! exec trellis fence --name fence_trellis_redfish --plugin /usr/lib/trellis/redfish-fence \
//!      --config /etc/trellis/fence.toml "$@"
//! ```
//!
//! The plugin runs sandboxed as in the daemon, with the grants of `[plugins.<name>]` in
//! `--config`. A parameter the plugin marks `secret` (a password) arrives as a value
//! from Pacemaker: it is put into this process's secret store under a name of its own,
//! granted to the plugin for this call only, and the plugin gets that name. A password
//! in argv is refused (every user can read argv): pass it on stdin.

use crate::capabilities::secrets::SecretStore;
use crate::config::DaemonConfig;
use crate::points::fence::{FenceDevice, FenceOutcome};
use crate::runtime::Runtime;
use crate::runtime::manifest::Manifest;
use crate::wit::fence_agent::{Action, AgentInfo, FenceAction, PowerState};
use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

/// fence-agents' exit codes (fencing.py).
const EC_OK: u8 = 0;
const EC_GENERIC_ERROR: u8 = 1;
const EC_BAD_ARGS: u8 = 2;
/// `status` answers OFF with 2.
const EC_STATUS_OFF: u8 = 2;

/// Short options fence-agents share, and the parameter each stands for.
const SHORT: &[(&str, &str)] = &[
    ("-o", "action"),
    ("-a", "ip"),
    ("-u", "ipport"),
    ("-l", "username"),
    ("-p", "password"),
    ("-n", "plug"),
    ("-z", "ssl"),
];

/// Options that take no value.
const FLAGS: &[&str] = &[
    "ssl",
    "ssl-secure",
    "ssl-insecure",
    "verbose",
    "quiet",
    "debug",
    "port-as-ip",
];

/// Older names fence-agents still accept, and the current one.
const ALIASES: &[(&str, &str)] = &[
    ("ipaddr", "ip"),
    ("login", "username"),
    ("passwd", "password"),
    ("option", "action"),
];

pub struct FenceCall<'a> {
    pub plugin: &'a Path,
    pub config: Option<&'a Path>,
    /// The agent's name in metadata (default: the plugin's own).
    pub name: Option<&'a str>,
    /// fence-agent options from argv; empty: read stdin.
    pub args: &'a [String],
}

pub async fn fence(call: FenceCall<'_>) -> anyhow::Result<ExitCode> {
    let input = if call.args.is_empty() {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        parse_stdin(&text)
    } else {
        match parse_args(call.args) {
            Ok(i) => i,
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(ExitCode::from(EC_BAD_ARGS));
            }
        }
    };
    let (action, mut params): (Vec<_>, Vec<_>) =
        input.into_iter().partition(|(k, _)| k == "action");
    let action = action
        .last()
        .map_or("reboot".to_string(), |(_, v)| v.to_lowercase());

    let manifest = Manifest::locate(call.plugin).map_err(|p| anyhow::anyhow!("{p}"))?;
    let mut cfg = match call.config {
        Some(f) => DaemonConfig::load(f).map_err(|p| anyhow::anyhow!("{p}"))?,
        None => DaemonConfig::default(),
    };
    let mut secrets = match &cfg.secrets.file {
        Some(f) => SecretStore::load(f)?,
        None => SecretStore::default(),
    };

    // First, what the plugin says it takes (which parameters are secrets).
    let rt = Runtime::with_secrets(cfg.clone(), secrets.clone())?;
    let first = rt
        .load(call.plugin)
        .await
        .map_err(|p| anyhow::anyhow!("{p}"))?;
    let info = FenceDevice::new(first.clone(), vec![])?.metadata().await?;
    if action == "metadata" {
        print!("{}", metadata_xml(&info, call.name));
        return Ok(ExitCode::from(EC_OK));
    }
    // Secret values become secrets of this process, granted for this call: the plugin
    // is loaded again with that grant (only then; without secrets the first load serves).
    let mut granted = false;
    for (key, value) in &mut params {
        if info.parameters.iter().any(|p| p.secret && p.name == *key) {
            let name = format!("fence-input-{key}");
            secrets.insert(name.clone(), std::mem::take(value));
            cfg.plugins
                .entry(manifest.name.clone())
                .or_default()
                .secrets
                .push(name.clone());
            *value = name;
            granted = true;
        }
    }
    // The runtime stays bound for as long as its plugin is used.
    let (_rt, p) = if granted {
        let rt = Runtime::with_secrets(cfg, secrets)?;
        let p = rt
            .load(call.plugin)
            .await
            .map_err(|p| anyhow::anyhow!("{p}"))?;
        (rt, p)
    } else {
        (rt, first)
    };
    let device = FenceDevice::new(p, params)?;

    let supported = |a: Action| info.actions.contains(&a);
    let code = match action.as_str() {
        "on" | "off" | "reboot" => {
            let (what, done) = match action.as_str() {
                "on" => (FenceAction::On, "Powered ON"),
                "off" => (FenceAction::Off, "Powered OFF"),
                _ => (FenceAction::Reboot, "Rebooted"),
            };
            match device.fence(what).await {
                FenceOutcome::Fenced => {
                    println!("Success: {done}");
                    EC_OK
                }
                FenceOutcome::NotFenced { reason } => {
                    eprintln!("Failed: {reason}");
                    EC_GENERIC_ERROR
                }
            }
        }
        "status" => match device.status().await {
            Ok(PowerState::On) => {
                println!("Status: ON");
                EC_OK
            }
            Ok(PowerState::Off) => {
                println!("Status: OFF");
                EC_STATUS_OFF
            }
            Ok(PowerState::Unknown) => {
                eprintln!("Failed: the device reports the state as unknown");
                EC_GENERIC_ERROR
            }
            Err(e) => failed(e),
        },
        "monitor" => match device.monitor().await {
            Ok(()) => EC_OK,
            Err(e) => failed(e),
        },
        "list" | "list-status" if supported(Action::List) => match device.list().await {
            Ok(targets) => {
                for t in targets {
                    println!("{},{}", t.id, t.alias.unwrap_or_default());
                }
                EC_OK
            }
            Err(e) => failed(e),
        },
        "list" | "list-status" => {
            println!("NOTICE: List option is not working on this device yet");
            EC_OK
        }
        "validate-all" => match device.validate().await {
            Ok(()) => EC_OK,
            Err(e) => failed(e),
        },
        other => {
            eprintln!(
                "error: unknown action `{other}` (on, off, reboot, status, monitor, list, list-status, metadata, validate-all)"
            );
            EC_BAD_ARGS
        }
    };
    Ok(ExitCode::from(code))
}

fn failed(e: impl std::fmt::Display) -> u8 {
    eprintln!("Failed: {e}");
    EC_GENERIC_ERROR
}

/// A parameter name as the plugin knows it: lower case, `-` for `_`, current names.
fn normal(key: &str) -> String {
    let k = key.trim().to_lowercase().replace('_', "-");
    ALIASES
        .iter()
        .find(|(old, _)| *old == k)
        .map_or(k, |(_, new)| new.to_string())
}

/// `key=value` lines (fence-agents' stdin); blank lines and `#` comments skipped.
fn parse_stdin(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (normal(k), v.trim().to_string()))
        .collect()
}

/// fence-agents' command line: `--key=value`, `--key value`, `--flag`, `-o value`.
fn parse_args(args: &[String]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut it = args.iter().peekable();
    while let Some(a) = it.next() {
        let (key, inline) = if let Some(long) = a.strip_prefix("--") {
            match long.split_once('=') {
                Some((k, v)) => (normal(k), Some(v.to_string())),
                None => (normal(long), None),
            }
        } else if let Some((_, key)) = SHORT.iter().find(|(s, _)| *s == a) {
            (key.to_string(), None)
        } else {
            return Err(format!("unexpected argument `{a}`"));
        };
        if key == "password" {
            return Err(
                "a password on the command line is visible to every user: pass `password=...` on stdin instead".into(),
            );
        }
        let value = match inline {
            Some(v) => v,
            None if FLAGS.contains(&key.as_str()) => "1".into(),
            None => it
                .next()
                .cloned()
                .ok_or_else(|| format!("option `{a}` needs a value"))?,
        };
        out.push((key, value));
    }
    Ok(out)
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The agent's metadata in fence-agents' XML (what Pacemaker reads to register it).
fn metadata_xml(info: &AgentInfo, name: Option<&str>) -> String {
    use std::fmt::Write;
    let name = name.unwrap_or(&info.name);
    let mut x = String::new();
    let _ = writeln!(x, "<?xml version=\"1.0\" ?>");
    let _ = writeln!(
        x,
        "<resource-agent name=\"{}\" shortdesc=\"{}\" >",
        xml(name),
        xml(&info.description)
    );
    let _ = writeln!(
        x,
        "<longdesc>{} (a Trellis fence-agent plugin, run by `trellis fence`)</longdesc>",
        xml(&info.description)
    );
    let _ = writeln!(x, "<vendor-url>https://github.com/trellis</vendor-url>");
    let _ = writeln!(x, "<parameters>");
    let _ = writeln!(
        x,
        "\t<parameter name=\"action\" unique=\"0\" required=\"1\">\n\t\t<getopt mixed=\"-o, --action=[action]\" />\n\t\t<content type=\"string\" default=\"reboot\"  />\n\t\t<shortdesc lang=\"en\">Fencing action</shortdesc>\n\t</parameter>"
    );
    for p in &info.parameters {
        let default = p
            .default_value
            .as_ref()
            .map(|d| format!("default=\"{}\" ", xml(d)))
            .unwrap_or_default();
        let _ = writeln!(
            x,
            "\t<parameter name=\"{}\" unique=\"0\" required=\"{}\">\n\t\t<getopt mixed=\"--{}=[value]\" />\n\t\t<content type=\"string\" {default} />\n\t\t<shortdesc lang=\"en\">{}</shortdesc>\n\t</parameter>",
            xml(&p.name.replace('-', "_")),
            u8::from(p.required),
            xml(&p.name),
            xml(&p.description)
        );
    }
    let _ = writeln!(x, "</parameters>");
    let _ = writeln!(x, "<actions>");
    for a in &info.actions {
        let _ = match a {
            Action::On => writeln!(x, "\t<action name=\"on\" automatic=\"0\"/>"),
            Action::Off => writeln!(x, "\t<action name=\"off\" />"),
            Action::Reboot => writeln!(x, "\t<action name=\"reboot\" />"),
            Action::Status => writeln!(x, "\t<action name=\"status\" />"),
            Action::Monitor => writeln!(x, "\t<action name=\"monitor\" />"),
            Action::List => writeln!(
                x,
                "\t<action name=\"list\" />\n\t<action name=\"list-status\" />"
            ),
            Action::Metadata => writeln!(x, "\t<action name=\"metadata\" />"),
            Action::ValidateAll => writeln!(x, "\t<action name=\"validate-all\" />"),
        };
    }
    let _ = writeln!(x, "</actions>");
    let _ = writeln!(x, "</resource-agent>");
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn stdin_as_pacemaker_writes_it() {
        let got = parse_stdin(
            "# from the fencer\naction=off\nipaddr=10.0.0.5\nlogin=admin\npasswd=s3cret=x\nssl_insecure=1\n\n",
        );
        assert_eq!(
            got,
            pairs(&[
                ("action", "off"),
                ("ip", "10.0.0.5"),
                ("username", "admin"),
                ("password", "s3cret=x"),
                ("ssl-insecure", "1"),
            ])
        );
    }

    #[test]
    fn the_command_line_as_fence_agents_take_it() {
        let args: Vec<String> = [
            "-o",
            "status",
            "--ip=10.0.0.5",
            "--ipport",
            "8443",
            "--ssl-insecure",
            "-l",
            "admin",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            parse_args(&args).unwrap(),
            pairs(&[
                ("action", "status"),
                ("ip", "10.0.0.5"),
                ("ipport", "8443"),
                ("ssl-insecure", "1"),
                ("username", "admin"),
            ])
        );
        let e = parse_args(&["-p".into(), "pw".into()]).unwrap_err();
        assert!(e.contains("stdin"), "{e}");
        let e = parse_args(&["--password=pw".into()]).unwrap_err();
        assert!(e.contains("stdin"), "{e}");
        assert!(
            parse_args(&["--ip".into()])
                .unwrap_err()
                .contains("needs a value")
        );
        assert!(
            parse_args(&["stray".into()])
                .unwrap_err()
                .contains("unexpected")
        );
    }
}

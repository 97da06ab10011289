//! The controller under load: a real `trellis controller` process, with its own config,
//! secrets and API token in a temporary directory, on free loopback ports; and what
//! /proc says about it (CPU time, RSS).

use anyhow::{Context, Result, bail};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Which transport the controller listens on.
pub enum Transport {
    Tcp { port: u16 },
    Kafka { brokers: String, prefix: String },
}

impl Transport {
    pub fn plugin(&self) -> &'static str {
        match self {
            Transport::Tcp { .. } => "tcp-transport",
            Transport::Kafka { .. } => "kafka-transport",
        }
    }

    /// The tables that grant and configure the transport, for either side.
    pub fn sections(&self, controller: bool, extra_limits: &str) -> String {
        match self {
            Transport::Tcp { port } => {
                let grant = if controller { "bind" } else { "connect" };
                format!(
                    "[plugins.tcp-transport]\nsockets = {{ {grant} = [\"127.0.0.1:{port}\"] }}\nconfig = {{ address = \"127.0.0.1:{port}\" }}\n{extra_limits}"
                )
            }
            Transport::Kafka { brokers, prefix } => format!(
                "[kafka]\nbrokers = \"{brokers}\"\n[plugins.kafka-transport]\nkafka = {{ topics = [\"{prefix}.\"] }}\nconfig = {{ prefix = \"{prefix}\" }}\n{extra_limits}"
            ),
        }
    }
}

/// The simulated agents' names and secrets: `load-0001`.. with a secret each.
pub fn agent_names(n: usize) -> Vec<(String, String)> {
    (1..=n)
        .map(|i| {
            let name = format!("load-{i:04}");
            let secret = hex::encode(trellis::session::auth::nonce());
            (name, secret)
        })
        .collect()
}

/// A running controller, killed when dropped.
pub struct ControllerProcess {
    child: Child,
    pub http: u16,
    pub token: String,
    pub log: PathBuf,
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ControllerProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of its log, for an error report.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

/// Write the controller's config in `dir` (every agent of `agents` enrolled with its
/// secret), make an operator API token with `trellis token create`, start
/// `trellis controller` and wait until its API answers.
pub fn start(
    trellis: &Path,
    bundle: &Path,
    dir: &Path,
    transport: &Transport,
    agents: &[(String, String)],
    transport_limits: &str,
) -> Result<ControllerProcess> {
    std::fs::create_dir_all(dir.join("state/logs"))?;
    let http = free_port();
    let mut secrets = String::new();
    let mut enrolled = String::new();
    for (name, secret) in agents {
        secrets.push_str(&format!("{name} = \"{secret}\"\n"));
        enrolled.push_str(&format!("\"{name}\" = \"{name}\", "));
    }
    let secrets_file = dir.join("secrets.toml");
    std::fs::write(&secrets_file, secrets)?;
    std::fs::set_permissions(&secrets_file, std::fs::Permissions::from_mode(0o600))?;
    let config = dir.join("controller.toml");
    std::fs::write(
        &config,
        format!(
            r#"[runtime]
plugin-dir = "{bundle}"
[secrets]
file = "secrets.toml"
[controller]
state-dir = "state"
http = "127.0.0.1:{http}"
transport = "{transport_name}"
agents = {{ {enrolled} }}
[plugins.file-logging]
dirs = [{{ host = "state/logs", guest = "/logs", mode = "read-write" }}]
[plugins.file-browser]
dirs = [{{ host = "state/logs", guest = "/logs" }}]
{sections}"#,
            bundle = bundle.display(),
            transport_name = transport.plugin(),
            enrolled = enrolled.trim_end_matches(", "),
            sections = transport.sections(true, transport_limits),
        ),
    )?;
    let out = Command::new(trellis)
        .args([
            "token",
            "create",
            "load-generator",
            "--role",
            "operator",
            "--config",
        ])
        .arg(&config)
        .env("TRELLIS_LOG", "error")
        .output()
        .context("running trellis token create")?;
    if !out.status.success() {
        bail!(
            "trellis token create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let token = String::from_utf8(out.stdout)?.trim().to_string();
    let log = dir.join("controller.log");
    let child = Command::new(trellis)
        .args(["controller", "--config"])
        .arg(&config)
        .current_dir(dir)
        .env("TRELLIS_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting trellis controller")?;
    let mut c = ControllerProcess {
        child,
        http,
        token,
        log,
    };
    // Its first start may compile the plugins for this build's engine.
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", http)).is_err() {
        if let Some(status) = c.child.try_wait()? {
            bail!("the controller exited ({status}):\n{}", c.log_tail());
        }
        if t.elapsed() > Duration::from_secs(180) {
            bail!(
                "the controller's API did not answer within 180 s:\n{}",
                c.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(c)
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// CPU time (user + system) a process has used so far.
pub fn cpu_of(pid: u32) -> Duration {
    // /proc/<pid>/stat: fields 14 and 15 (utime, stime) in clock ticks, after the
    // command name in parentheses.
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|st| {
            let rest = &st[st.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

/// CPU time (user + system) this process has used so far.
pub fn own_cpu() -> Duration {
    cpu_of(std::process::id())
}

/// (VmHWM, VmRSS) of a process, in bytes.
pub fn rss_of(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Overall CPU time of the machine (all cores, busy and idle), to tell how busy it was.
pub fn machine_busy() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let first = stat.lines().next().unwrap_or_default();
    let v: Vec<u64> = first
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

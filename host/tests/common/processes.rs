//! The `trellis` binary as real processes: daemons killed on drop, CLI calls.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{bundle, free_port};

/// The `trellis` binary this test build made, logging warnings only.
pub fn trellis() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_trellis"));
    c.env("TRELLIS_LOG", "warn");
    c
}

/// A daemon process, killed when dropped.
pub struct Daemon(pub Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `trellis ROLE --config CONFIG`, its stderr to `stderr`.
pub fn daemon(role: &str, config: &Path, stderr: Stdio) -> Daemon {
    Daemon(
        trellis()
            .args([role, "--config", config.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap(),
    )
}

// API tokens: `write_configs` makes an admin token for each controller it writes (with
// `trellis token create`, as an operator would) and keeps it here by the controller's
// HTTP port, so `cli` and `http_get` against that port carry it.
static TOKENS: std::sync::Mutex<Vec<(u16, String)>> = std::sync::Mutex::new(Vec::new());

/// Remember `token` for the controller serving on `port`.
pub fn use_token(port: u16, token: &str) {
    let mut t = TOKENS.lock().unwrap();
    t.retain(|(p, _)| *p != port);
    t.push((port, token.to_string()));
}

/// The token kept for the controller on `port` (see `use_token`).
pub fn token_for(port: u16) -> Option<String> {
    TOKENS
        .lock()
        .unwrap()
        .iter()
        .find(|(p, _)| *p == port)
        .map(|(_, t)| t.clone())
}

/// `trellis token create NAME --role ROLE --config CONFIG`: the token.
pub fn create_token(config: &Path, name: &str, role: &str) -> String {
    let out = trellis()
        .args(["token", "create", name, "--role", role, "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "trellis token create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(token.starts_with("trellis_"), "{token}");
    token
}

fn port_of(server: &str) -> Option<u16> {
    server
        .rsplit(':')
        .next()?
        .trim_end_matches('/')
        .parse()
        .ok()
}

/// A CLI command against `server`, with the token kept for it: (exit code, stdout,
/// stderr).
pub fn cli(server: &str, args: &[&str]) -> (i32, String, String) {
    let mut c = trellis();
    c.args(args).env("TRELLIS_SERVER", server);
    if let Some(t) = port_of(server).and_then(token_for) {
        c.env("TRELLIS_TOKEN", t);
    }
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// Two daemons on one machine: a controller and agent `build-1` (label `linux`), as
// processes, with their configs written into a test's directory.

fn append_to(log: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap()
}

/// `trellis ROLE --config CONFIG`, its stderr appended to `log`.
pub fn start(role: &str, config: &Path, log: &Path) -> Daemon {
    daemon(role, config, append_to(log).into())
}

/// A controller started again on the ports it had (its agents and the test know them).
/// If another process took one meanwhile (an outgoing connection given it as its local
/// port holds it only while it lasts), the start is tried again on the same ports, a
/// second later, at most `PORT_TRIES` times (see `ports.rs`). Returns once the
/// controller says it serves (`(state in`), or when it runs as an HA member (which may
/// wait as a standby).
pub fn restart_controller(config: &Path, log: &Path) -> Daemon {
    let mut said = String::new();
    for attempt in 1..=super::PORT_TRIES {
        let from = std::fs::metadata(log).map_or(0, |m| m.len() as usize);
        let mut c = start("controller", config, log);
        let t = Instant::now();
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let since = text.get(from..).unwrap_or_default();
            if since.contains("(state in ") || since.contains("campaigning") {
                return c;
            }
            if c.0.try_wait().ok().flatten().is_some() {
                assert!(
                    super::lost_its_port(since),
                    "the controller exited on its restart:\n{since}"
                );
                said = since.to_string();
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "the controller did not come up on its restart:\n{since}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "the restarted controller found a port of its taken (start {attempt} of {}): trying again in a second\n{said}",
            super::PORT_TRIES
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    panic!(
        "the controller could not get its ports back in {} starts:\n{said}",
        super::PORT_TRIES
    )
}

/// Add `line` to the `[controller]` section of a controller config `write_configs` made,
/// and `tables` at its end.
pub fn extend_controller(config: &Path, line: &str, tables: &str) {
    let heartbeat = "heartbeat = \"500ms\"\n";
    let text = std::fs::read_to_string(config).unwrap();
    assert!(text.contains(heartbeat), "{text}");
    let text = text.replacen(heartbeat, &format!("{heartbeat}{line}\n"), 1) + tables;
    std::fs::write(config, text).unwrap();
}

/// A controller and an agent (configs from `write_configs`) running, their output in
/// `DIR/daemons.log`, the agent connected. Both are killed when this is dropped.
pub struct Daemons {
    pub controller: Daemon,
    pub agent: Daemon,
    /// The daemons' shared log.
    pub log: PathBuf,
    /// `http://127.0.0.1:PORT` of the controller's API.
    pub server: String,
    /// The controller's API port: the one given, unless the controller lost it.
    pub http: u16,
}

/// Start the controller and the agent of `controller` and `agent` (from
/// `write_configs`), the controller's API on `http`, and wait until the agent is
/// connected. A controller that lost its API or transport port to another process
/// (see `ports.rs`) is started again on new ones: both configs are rewritten, and the
/// ports in use are in the result (`http`, `server`).
pub fn start_daemons(dir: &Path, controller: &Path, agent: &Path, http: u16) -> Daemons {
    let log = dir.join("daemons.log");
    let mut http = http;
    for attempt in 1..=super::PORT_TRIES {
        let from = std::fs::metadata(&log).map_or(0, |m| m.len() as usize);
        let mut c = start("controller", controller, &log);
        let a = start("agent", agent, &log);
        let server = format!("http://127.0.0.1:{http}");
        let t = Instant::now();
        let lost = loop {
            if cli(&server, &["agents"]).1.contains("build-1") {
                return Daemons {
                    controller: c,
                    agent: a,
                    log,
                    server,
                    http,
                };
            }
            if c.0.try_wait().ok().flatten().is_some() {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let said = text.get(from..).unwrap_or_default().to_string();
                assert!(
                    super::lost_its_port(&said),
                    "the controller exited:\n{text}"
                );
                break said;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the agent did not connect: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        eprintln!(
            "the controller lost a port (start {attempt} of {}): starting the daemons on new ones\n{lost}",
            super::PORT_TRIES
        );
        drop(a);
        http = move_ports(controller, agent, http);
    }
    panic!(
        "the controller lost its ports {} times in a row: {}",
        super::PORT_TRIES,
        log.display()
    )
}

/// Give the controller of `controller` a new API port (in place of `http`, its token
/// kept for it) and, over TCP, a new transport port, in both configs. The new API port.
fn move_ports(controller: &Path, agent: &Path, http: u16) -> u16 {
    let text = std::fs::read_to_string(controller).unwrap();
    let mut moves = vec![(http, free_port())];
    if let Some(tcp) = tcp_transport_port(&text) {
        moves.push((tcp, free_port()));
    }
    for config in [controller, agent] {
        let mut text = std::fs::read_to_string(config).unwrap();
        for (old, new) in &moves {
            text = text.replace(&format!("127.0.0.1:{old}\""), &format!("127.0.0.1:{new}\""));
        }
        std::fs::write(config, text).unwrap();
    }
    let new_http = moves[0].1;
    if let Some(t) = token_for(http) {
        use_token(new_http, &t);
    }
    new_http
}

/// The port tcp-transport listens on, in a controller config `write_configs` made.
pub fn tcp_transport_port(config: &str) -> Option<u16> {
    let section = config.split("[plugins.tcp-transport]").nth(1)?;
    let at = section.split("address = \"127.0.0.1:").nth(1)?;
    at.split('"').next()?.parse().ok()
}

/// Run `c` to success (the failure shows its command and output); stdout + stderr.
pub fn run_ok(c: &mut Command) -> String {
    let out = c.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{c:?}:\n{text}");
    text
}

/// Build the Rust plugin crate in `project` for wasm32-wasip2 (release) and put its
/// component `CRATE.wasm` beside its manifest. Uses the test's own target directory when
/// there is one: trellis-sdk's dependencies are built already.
pub fn build_rust_plugin(project: &Path, crate_name: &str) {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| project.join("target"));
    run_ok(
        Command::new(env!("CARGO"))
            .current_dir(project)
            .args(["build", "--target", "wasm32-wasip2", "--release"])
            .env("CARGO_TARGET_DIR", &target),
    );
    let wasm = format!("{}.wasm", crate_name.replace('-', "_"));
    std::fs::copy(
        target.join("wasm32-wasip2/release").join(&wasm),
        project.join(&wasm),
    )
    .unwrap();
}

/// `start`, inside the network namespace `ns`.
pub fn start_in(ns: &super::Netns, role: &str, config: &Path, log: &Path) -> Daemon {
    Daemon(
        ns.command(Path::new(env!("CARGO_BIN_EXE_trellis")))
            .args([role, "--config", config.to_str().unwrap()])
            .env("TRELLIS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(append_to(log))
            .spawn()
            .unwrap(),
    )
}

/// The transport section of both configs, and of the controller's and agent's
/// `[runtime]`-level settings.
pub enum Transport {
    Tcp { port: u16 },
    Kafka { brokers: String },
}

impl Transport {
    fn sections(&self, role: &str) -> String {
        match self {
            Transport::Tcp { port } => {
                let grant = if role == "controller" {
                    "bind"
                } else {
                    "connect"
                };
                format!(
                    "[plugins.tcp-transport]\nsockets = {{ {grant} = [\"127.0.0.1:{port}\"] }}\nconfig = {{ address = \"127.0.0.1:{port}\" }}\n"
                )
            }
            Transport::Kafka { brokers } => format!(
                "[kafka]\nbrokers = \"{brokers}\"\n[plugins.kafka-transport]\nkafka = {{ topics = [\"trellis.\"] }}\nconfig = {{ prefix = \"trellis\" }}\n"
            ),
        }
    }

    fn name(&self) -> &str {
        match self {
            Transport::Tcp { .. } => "tcp-transport",
            Transport::Kafka { .. } => "kafka-transport",
        }
    }
}

/// Controller and agent configs in `dir`; the controller's API port.
pub fn write_configs(dir: &Path, t: &Transport) -> (PathBuf, PathBuf, u16) {
    let http = free_port();
    let b = bundle();
    std::fs::create_dir_all(dir.join("state/logs")).unwrap();
    for (f, body) in [
        ("secrets.toml", "agent-build-1 = \"the-agent-secret\"\n"),
        (
            "agent-secrets.toml",
            "agent-build-1 = \"the-agent-secret\"\n",
        ),
    ] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(dir.join(f), body).unwrap();
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let controller = dir.join("controller.toml");
    std::fs::write(
        &controller,
        format!(
            r#"[runtime]
plugin-dir = "{b}"
[secrets]
file = "secrets.toml"
[controller]
state-dir = "state"
http = "127.0.0.1:{http}"
transport = "{name}"
heartbeat = "500ms"
agents = {{ "build-1" = "agent-build-1" }}
[plugins.file-logging]
dirs = [{{ host = "state/logs", guest = "/logs", mode = "read-write" }}]
[plugins.file-browser]
dirs = [{{ host = "state/logs", guest = "/logs" }}]
{sections}"#,
            b = b.display(),
            name = t.name(),
            sections = t.sections("controller"),
        ),
    )
    .unwrap();
    let agent = dir.join("agent.toml");
    std::fs::write(
        &agent,
        format!(
            r#"[runtime]
plugin-dir = "{b}"
[secrets]
file = "agent-secrets.toml"
[agent]
name = "build-1"
labels = ["linux"]
secret = "agent-build-1"
workspace = "work"
transport = "{name}"
heartbeat = "500ms"
{sections}"#,
            b = b.display(),
            name = t.name(),
            sections = t.sections("agent"),
        ),
    )
    .unwrap();
    use_token(http, &create_token(&controller, "test-admin", "admin"));
    (controller, agent, http)
}

/// Wait until the daemons' log `log` has a line containing `needle`; on failure, the
/// panic shows the log as it is then (not as it was when the wait began).
pub fn wait_for_line(log: &Path, needle: &str, within: Duration) {
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(
            t.elapsed() < within,
            "no `{needle}` in the daemons' log within {within:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < within, "{what} (waited {within:?})");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Wait for agent `build-1` to connect; on failure, the daemons' log says why.
pub fn wait_for_agent(server: &str, daemon_log: &Path) {
    let t = Instant::now();
    while !cli(server, &["agents"]).1.contains("build-1") {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the agent did not connect: {}",
            std::fs::read_to_string(daemon_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Wait for `run` to be listed `succeeded`; on failure, the last listing and the
/// daemons' log.
pub fn wait_for_success(server: &str, run: &str, within: Duration, daemon_log: &Path) {
    let t = Instant::now();
    loop {
        let runs = cli(server, &["runs"]).1;
        if runs
            .lines()
            .any(|l| l.contains(run) && l.contains("succeeded"))
        {
            return;
        }
        assert!(
            t.elapsed() < within,
            "the run did not succeed within {within:?}: {runs}\n{}",
            std::fs::read_to_string(daemon_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A plain HTTP/1.0 GET on loopback (with the port's token, if any); the body.
pub fn http_get(port: u16, path: &str) -> String {
    http_get_status(port, path).1
}

/// A plain HTTP/1.0 GET on loopback (with the port's token, if any); the status and
/// the body.
pub fn http_get_status(port: u16, path: &str) -> (u16, String) {
    http_status(port, "GET", path, None)
}

/// A plain HTTP/1.0 request on loopback (with the port's token, if any), with an
/// optional body and its content type; the status and the body.
pub fn http_status(
    port: u16,
    method: &str,
    path: &str,
    body: Option<(&str, &str)>,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let auth = token_for(port)
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let (content, body) = match body {
        Some((kind, b)) => (
            format!("Content-Type: {kind}\r\nContent-Length: {}\r\n", b.len()),
            b,
        ),
        None => (String::new(), ""),
    };
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{auth}{content}\r\n{body}"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or(out);
    (status, body)
}

/// The depth of `plugin`'s log buffer, from the controller's `/metrics` on port `http`.
pub fn log_buffer_bytes(http: u16, plugin: &str) -> u64 {
    let metrics = http_get(http, "/metrics");
    let prefix = format!("trellis_log_buffer_bytes{{plugin=\"{plugin}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no buffer depth for {plugin} in /metrics:\n{metrics}"))
        .parse()
        .unwrap()
}

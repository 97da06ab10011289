//! Shared helpers for the integration tests. The wasm components are built by
//! `cargo xtask test`, which passes their directories in the environment.

#![allow(dead_code)]

mod attackers;
mod es;
mod etcd;
mod gluster;
mod ha;
mod kafka;
mod netns;
mod opensearch;
mod ports;
mod processes;
mod redfish;
mod rogue;
#[allow(unused_imports)]
pub use attackers::*;
#[allow(unused_imports)]
pub use es::*;
#[allow(unused_imports)]
pub use etcd::*;
#[allow(unused_imports)]
pub use gluster::*;
#[allow(unused_imports)]
pub use ha::*;
#[allow(unused_imports)]
pub use kafka::*;
#[allow(unused_imports)]
pub use netns::*;
#[allow(unused_imports)]
pub use opensearch::*;
pub use ports::*;
#[allow(unused_imports)]
pub use processes::*;
#[allow(unused_imports)]
pub use redfish::*;
#[allow(unused_imports)]
pub use rogue::*;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use trellis::capabilities::secrets::SecretStore;
use trellis::config::DaemonConfig;
use trellis::runtime::Runtime;
use trellis::wit::types::LogMetadata;

fn dir_from_env(var: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(d) => PathBuf::from(d),
        None => panic!(
            "{var} is not set: run the suite with `cargo xtask test`, which builds the WebAssembly components first"
        ),
    }
}

pub fn fixtures() -> PathBuf {
    dir_from_env("TRELLIS_FIXTURES_DIR")
}

pub fn bundle() -> PathBuf {
    dir_from_env("TRELLIS_BUNDLE_DIR")
}

/// A runtime with `config` (TOML, paths relative to `base`) and these secrets.
pub fn runtime(config: &str, base: &Path, secrets: &[(&str, &str)]) -> Arc<Runtime> {
    let cfg = DaemonConfig::parse(config, "test.toml", base)
        .unwrap_or_else(|p| panic!("bad test config: {p}"));
    let store =
        SecretStore::from_pairs(secrets.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Runtime::with_secrets(cfg, store).expect("runtime")
}

pub fn meta(job: &str, loggable: &str) -> LogMetadata {
    LogMetadata {
        instance_id: "test".into(),
        loggable_type: "run".into(),
        loggable_id: loggable.into(),
        job_id: job.into(),
    }
}

/// A packed batch of `n` events starting at seq `from`.
pub fn batch(from: u64, n: u64) -> Vec<u8> {
    let mut b = trellis_sdk::events::BatchBuilder::new();
    for s in from..from + n {
        b.push(
            s,
            1_700_000_000_000 + s as i64,
            "build",
            &format!("line {s}"),
            &[("stream", "stdout")],
        );
    }
    b.finish()
}

/// A controller with the default bundle (TCP transport on a free loopback port,
/// file-logging and file-browser under `<dir>/state/logs`), one known agent
/// (`agent-1` / `agent-secret`; and `rogue-1` / `rogue-secret`, which tests of the
/// boundary between agents connect as) and job secrets: `deploy-token` for every job,
/// `signing-key` (a PEM key, see `SIGNING_KEY`) for jobs named `sign-*`.
///
/// With `TRELLIS_TEST_TRANSPORT=kafka` the stack uses the Kafka transport instead, on an
/// Apache Kafka broker of its own: `cargo xtask test` runs the controller/agent suite both ways.
pub struct Stack {
    pub controller: Arc<trellis::controller::Controller>,
    pub runtime: Arc<Runtime>,
    /// The command transport both sides use.
    pub transport: Arc<trellis::runtime::Plugin>,
    /// The Kafka broker, when the stack runs over Kafka.
    pub broker: Option<Kafka>,
    pub reader: trellis::points::browser::LogReader,
    pub dir: tempfile::TempDir,
    /// Where the controller listens for agents.
    pub port: u16,
}

/// True when `TRELLIS_TEST_TRANSPORT=kafka` (see `Stack`).
pub fn over_kafka() -> bool {
    std::env::var("TRELLIS_TEST_TRANSPORT").is_ok_and(|t| t == "kafka")
}

/// A multi-line job secret (a PEM private key, made up): each of its lines is masked.
pub const SIGNING_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj
MzEfYyjiWA4R4/M2bS1GB4t7NXp98C3SC6dVMvDuictGeurT8jNbvJZHtCSuYEvu
NMoSfm76oqFvAp8Gy0iz5sxjZmSnXyCdPEovGhLa0VzMaQ8s+CLOyS56YyCFGeJZ
Zg==
-----END PRIVATE KEY-----
";

/// TRELLIS_TEST_LOG=debug (an env filter) shows the host's logs while debugging a test.
pub fn test_log() {
    if let Ok(filter) = std::env::var("TRELLIS_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

pub async fn stack() -> Stack {
    stack_with("").await
}

/// `stack`, with `transport_extra` (TOML keys) added to the transport plugin's table,
/// e.g. `limits = { memory = "2MiB" }`.
pub async fn stack_with(transport_extra: &str) -> Stack {
    test_log();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("state/logs")).unwrap();
    let port = free_port();
    let broker = over_kafka().then(Kafka::start);
    let transport = match &broker {
        Some(b) => format!(
            r#"
            [kafka]
            brokers = "{}"
            [plugins.kafka-transport]
            kafka = {{ topics = ["trellis."] }}
            config = {{ prefix = "trellis" }}
            {transport_extra}
            "#,
            b.brokers()
        ),
        None => format!(
            r#"
            [plugins.tcp-transport]
            sockets = {{ bind = ["127.0.0.1:{port}"], connect = ["127.0.0.1:{port}"] }}
            config = {{ address = "127.0.0.1:{port}" }}
            {transport_extra}
            "#
        ),
    };
    let rt = runtime(
        &format!(
            r#"
            {transport}
            [plugins.file-logging]
            dirs = [{{ host = "state/logs", guest = "/logs", mode = "read-write" }}]
            [plugins.file-browser]
            dirs = [{{ host = "state/logs", guest = "/logs" }}]
            "#
        ),
        dir.path(),
        &[],
    );
    let name = if broker.is_some() {
        "kafka-transport"
    } else {
        "tcp-transport"
    };
    let transport = rt.load(&bundle().join(name)).await.unwrap();
    let logging = rt.load(&bundle().join("file-logging")).await.unwrap();
    let reader = trellis::points::browser::LogReader::new(
        rt.load(&bundle().join("file-browser")).await.unwrap(),
    )
    .unwrap();
    let cfg = trellis::controller::ControllerConfig {
        instance_id: "test-controller".into(),
        state_dir: dir.path().join("state"),
        agents: std::collections::HashMap::from([
            ("agent-1".to_string(), "agent-secret".to_string()),
            ("rogue-1".to_string(), "rogue-secret".to_string()),
        ]),
        secrets: job_secrets(),
        // Short, so the lost-agent test is quick; a cut link still reconnects well
        // within it.
        heartbeat: std::time::Duration::from_millis(200),
        agent_lost_after: std::time::Duration::from_secs(3),
        log_buffer_limit: trellis::controller::DEFAULT_LOG_BUFFER_LIMIT,
        multiline_start: None,
        fencing_token: 0,
        retention: Default::default(),
    };
    let controller = trellis::controller::Controller::start(cfg, transport.clone(), logging)
        .await
        .unwrap();
    Stack {
        controller,
        runtime: rt,
        transport,
        broker,
        reader,
        dir,
        port,
    }
}

/// The stack's job secrets (see `Stack`); the agents' secrets are daemon credentials
/// under the names `agent-1-secret` and `rogue-1-secret`.
pub fn job_secrets() -> trellis::jobs::secrets::JobSecrets {
    let rules =
        toml::from_str("[deploy-token]\njobs = [\"*\"]\n[signing-key]\njobs = [\"sign-*\"]\n")
            .unwrap();
    let store = SecretStore::from_pairs(
        [
            ("deploy-token", "hunter2-value"),
            ("signing-key", SIGNING_KEY),
            ("agent-1-secret", "agent-secret"),
            ("rogue-1-secret", "rogue-secret"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let daemon = [("agent-1", "agent-1-secret"), ("rogue-1", "rogue-1-secret")]
        .map(|(agent, name)| (name.to_string(), format!("the secret of agent `{agent}`")))
        .into();
    trellis::jobs::secrets::JobSecrets::new(&rules, &store, daemon).unwrap()
}

pub type AgentTask = tokio::task::JoinHandle<Result<(), trellis::agent::worker::AgentError>>;

/// Start an in-process agent with label `linux`.
pub fn start_agent(
    s: &Stack,
    name: &str,
    secret: &str,
) -> (AgentTask, tokio::sync::watch::Sender<bool>) {
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let cfg = trellis::agent::worker::AgentConfig {
        name: name.into(),
        labels: vec!["linux".into()],
        secret: secret.into(),
        workspace: s.dir.path().join(format!("work-{name}")),
        heartbeat: std::time::Duration::from_millis(200),
        logs: None,
        state_dir: None,
        executors: 1,
    };
    (
        tokio::spawn(trellis::agent::worker::run_agent(
            s.transport.clone(),
            cfg,
            stop,
        )),
        stop_tx,
    )
}

/// Wait for run `id` to end (at most `within`); its final record.
pub async fn wait_final(
    c: &trellis::controller::Controller,
    id: &str,
    within: std::time::Duration,
) -> trellis::controller::state::RunRecord {
    use trellis::controller::Update;
    let mut updates = c.subscribe();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(r) = c.run(id).filter(|r| r.status.is_final()) {
            return r;
        }
        match tokio::time::timeout_at(deadline, updates.recv()).await {
            Ok(Ok(Update::Run(r))) if r.id == id && r.status.is_final() => return *r,
            Ok(_) => {}
            Err(_) => panic!("run {id} did not end within {within:?}: {:?}", c.run(id)),
        }
    }
}

pub async fn wait_connected(c: &trellis::controller::Controller) {
    for _ in 0..200 {
        if !c.connected_agents().is_empty() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("the agent never connected");
}

/// A private CA and a certificate for 127.0.0.1 signed by it, made with Debian's
/// `openssl` in `dir`: (ca.pem, cert.pem, key.pem).
pub fn tls_files(dir: &std::path::Path) -> (String, String, String) {
    let p = |f: &str| dir.join(f).display().to_string();
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let (ca, ca_key, csr, cert, key) = (
        p("ca.pem"),
        p("ca.key"),
        p("leaf.csr"),
        p("leaf.pem"),
        p("leaf.key"),
    );
    for args in [
        [
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                &ca_key,
                "-out",
                &ca,
                "-days",
                "2",
                "-subj",
                "/CN=trellis test CA",
            ],
        ]
        .concat(),
        [
            &["req"][..],
            &ec,
            &["-keyout", &key, "-out", &csr, "-subj", "/CN=127.0.0.1"],
        ]
        .concat(),
        vec![
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "2",
            "-extfile",
            &p("leaf.ext"),
        ],
    ] {
        let o = std::process::Command::new("openssl")
            .args(&args)
            .output()
            .expect("openssl (Debian's openssl package)");
        assert!(
            o.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    (ca, cert, key)
}

/// PATH with componentize-js first, as `cargo xtask bundle` installed it for
/// examples/js-logger (the pins generated JavaScript projects carry too), so a test can
/// build a JavaScript project without an npm install of its own.
pub fn path_with_componentize_js() -> String {
    let tools = bundle()
        .join("../js-tools/js-logger/node_modules/.bin")
        .canonicalize()
        .expect("componentize-js under <target>/js-tools (run cargo xtask bundle)");
    format!(
        "{}:{}",
        tools.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

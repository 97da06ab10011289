//! Apache Kafka 4.4 brokers for the tests: one broker, or a cluster of three, in KRaft
//! combined mode (each node is broker and controller, a static voter set), on free ports
//! of a loopback address, run from the jars `./scripts/setup.sh` fetches from Maven
//! Central into `$TRELLIS_KAFKA_LIBS` (default `~/.cache/trellis/kafka-4.4.0`).
//!
//! A node's storage is formatted once (`kafka.tools.StorageTool format`), then it starts
//! with a generated `server.properties`; its log is `<dir>/node-N/server.log`. A node can
//! be killed (SIGKILL), stopped (SIGTERM, a controlled shutdown) and started again on the
//! same ports and data. Everything is killed on drop.
//!
//! Listeners: PLAINTEXT always; SSL (the broker's own TLS, PEM key and chain) and
//! SASL_PLAINTEXT with SCRAM-SHA-512 (the user is written at format time,
//! `--add-scram`) when asked for. A start that lost one of its ports to someone else
//! (the broker exits with "Address already in use") is retried on new ports.

use rdkafka::ClientConfig;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Heap of each broker JVM: the machine running the suite may have 2 cores and several
/// brokers at once.
const HEAP: &str = "-Xmx256m";
/// How long a node may take from spawn to answering metadata requests (a loaded 2-core
/// machine starts one in ~10 s).
const START_WITHIN: Duration = Duration::from_secs(90);
/// New ports tried when a start loses one of its ports.
const BIND_ATTEMPTS: usize = 5;

/// Where the Kafka jars are expected: `$TRELLIS_KAFKA_LIBS`, or setup.sh's default.
pub fn kafka_libs_dir() -> PathBuf {
    match std::env::var_os("TRELLIS_KAFKA_LIBS") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/trellis/kafka-4.4.0"),
    }
}

/// Whether the Kafka jars are there (kafka_2.13-4.4.0.jar among them).
pub fn kafka_available() -> bool {
    std::fs::read_dir(kafka_libs_dir()).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("kafka_2.13-4.4.0")
        })
    })
}

/// Where the Kafka jars are; panics, naming the fix, when they are not there.
pub fn kafka_libs() -> PathBuf {
    let dir = kafka_libs_dir();
    assert!(
        kafka_available(),
        "Apache Kafka's jars are not in {} (kafka_2.13-4.4.0.jar missing): run ./scripts/setup.sh, \
         which fetches them, or point TRELLIS_KAFKA_LIBS at them",
        dir.display()
    );
    dir
}

/// A `java` command running `main_class` with the Kafka jars on its class path, a small
/// heap and, with `log_config`, that log4j2 configuration (else log4j2's default: errors
/// to the console).
pub fn kafka_java(main_class: &str, log_config: Option<&Path>) -> Command {
    let mut c = Command::new("java");
    c.arg(HEAP)
        .arg("-XX:+UseSerialGC")
        .arg("-Djava.awt.headless=true");
    if let Some(config) = log_config {
        c.arg(format!("-Dlog4j2.configurationFile={}", config.display()));
    }
    c.arg("-cp").arg(kafka_libs().join("*")).arg(main_class);
    c
}

/// What a broker (or each broker of a cluster) offers besides PLAINTEXT.
#[derive(Clone, Debug)]
pub struct KafkaOptions {
    /// The address every listener binds and advertises.
    pub host: String,
    /// An SSL listener with this certificate (chain) and unencrypted PKCS#8 key, PEM.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// A SASL_PLAINTEXT listener (SCRAM-SHA-512) knowing this user and password.
    pub scram: Option<(String, String)>,
    /// More `server.properties` lines (`key`, `value`), after the harness's own.
    pub properties: Vec<(String, String)>,
}

impl Default for KafkaOptions {
    fn default() -> Self {
        KafkaOptions {
            host: "127.0.0.1".into(),
            tls: None,
            scram: None,
            properties: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Ports {
    plain: u16,
    controller: u16,
    tls: Option<u16>,
    sasl: Option<u16>,
}

struct Node {
    dir: PathBuf,
    ports: Ports,
    child: Option<Child>,
}

/// One Kafka broker or a cluster of them (see the module's text).
pub struct Kafka {
    opts: KafkaOptions,
    nodes: Vec<Node>,
    cluster_id: String,
    /// The temporary directory the nodes live in, when the harness made it.
    _own_dir: Option<tempfile::TempDir>,
}

impl Kafka {
    /// One broker on 127.0.0.1, PLAINTEXT only, in a directory of its own.
    pub fn start() -> Kafka {
        Self::start_with(KafkaOptions::default())
    }

    /// One broker on `host` (a test namespace's host end, which processes on the host
    /// reach too), advertising that address.
    pub fn start_at(host: &str) -> Kafka {
        Self::start_with(KafkaOptions {
            host: host.into(),
            ..Default::default()
        })
    }

    pub fn start_with(opts: KafkaOptions) -> Kafka {
        Self::launch(1, opts, None)
    }

    /// One broker keeping its data under `dir` (it is not removed on drop).
    pub fn start_in(dir: &Path, opts: KafkaOptions) -> Kafka {
        Self::launch(1, opts, Some(dir))
    }

    /// Three brokers (also the three KRaft voters): replication factor 3 by default and
    /// `min.insync.replicas=2`, so a producer with `acks=all` rides out one of them
    /// going away.
    pub fn cluster() -> Kafka {
        Self::launch(3, KafkaOptions::default(), None)
    }

    fn launch(n: usize, opts: KafkaOptions, dir: Option<&Path>) -> Kafka {
        let own_dir = match dir {
            Some(_) => None,
            None => Some(tempfile::tempdir().unwrap()),
        };
        let base = dir.unwrap_or_else(|| own_dir.as_ref().unwrap().path());
        let mut k = Kafka {
            nodes: (0..n)
                .map(|i| Node {
                    dir: base.join(format!("node-{i}")),
                    ports: new_ports(&opts),
                    child: None,
                })
                .collect(),
            opts,
            cluster_id: cluster_id(),
            _own_dir: own_dir,
        };
        for node in &k.nodes {
            std::fs::create_dir_all(&node.dir).unwrap();
        }
        k.write_configs();
        k.format();
        for attempt in 1..=BIND_ATTEMPTS {
            for i in 0..n {
                k.spawn(i);
            }
            match k.wait_ready(&(0..n).collect::<Vec<_>>()) {
                Ok(()) => return k,
                Err(lost) if attempt < BIND_ATTEMPTS => {
                    eprintln!("kafka: {lost}; starting again on new ports");
                    for i in 0..n {
                        k.kill(i);
                        k.nodes[i].ports = new_ports(&k.opts);
                    }
                    // The voters' ports are in the configuration only (a static voter
                    // set), never in the formatted storage: new ports need no new format.
                    k.write_configs();
                }
                Err(lost) => panic!("kafka: {lost}, {BIND_ATTEMPTS} times in a row"),
            }
        }
        unreachable!()
    }

    /// The PLAINTEXT bootstrap list (every node).
    pub fn brokers(&self) -> String {
        self.list(|p| Some(p.plain))
    }

    /// The SSL listeners' bootstrap list (with `KafkaOptions::tls`).
    pub fn tls_brokers(&self) -> String {
        self.list(|p| p.tls)
    }

    /// The SASL_PLAINTEXT listeners' bootstrap list (with `KafkaOptions::scram`).
    pub fn sasl_brokers(&self) -> String {
        self.list(|p| p.sasl)
    }

    fn list(&self, port: impl Fn(&Ports) -> Option<u16>) -> String {
        self.nodes
            .iter()
            .map(|n| {
                let p = port(&n.ports).expect("that listener was not asked for");
                format!("{}:{p}", self.opts.host)
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Node `i`'s process id (the transport bench reads its CPU time).
    pub fn pid(&self, i: usize) -> u32 {
        self.nodes[i].child.as_ref().expect("node running").id()
    }

    /// Node `i`'s directory (its `server.properties`, `server.log` and `data/`).
    pub fn dir(&self, i: usize) -> &Path {
        &self.nodes[i].dir
    }

    /// SIGKILL node `i` and reap it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM node `i` (a controlled shutdown: it hands its partitions' leadership
    /// over first) and wait for it to exit.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t = Instant::now();
            while c.try_wait().unwrap().is_none() {
                if t.elapsed() > Duration::from_secs(60) {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Start node `i` again (after `kill` or `stop`) on its ports and data, and wait
    /// until it answers. The other nodes know it by those ports, so it cannot move: a
    /// port someone took in the meantime is waited for.
    pub fn start_again(&mut self, i: usize) {
        assert!(self.nodes[i].child.is_none(), "node {i} is running");
        let t = Instant::now();
        loop {
            self.spawn(i);
            match self.wait_ready(&[i]) {
                Ok(()) => return,
                Err(lost) if t.elapsed() < Duration::from_secs(60) => {
                    eprintln!("kafka: {lost}; node {i} tries its ports again");
                    self.kill(i);
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(lost) => panic!("kafka: {lost} for 60 s"),
            }
        }
    }

    /// Kill node `i` and start it again on the same data.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.start_again(i);
    }

    /// Which node leads `topic`'s `partition` now (None: unknown or no leader).
    pub fn leader_of(&self, topic: &str, partition: i32) -> Option<usize> {
        let m = self.metadata(Some(topic))?;
        let t = m.topics().iter().find(|t| t.name() == topic)?;
        let p = t.partitions().iter().find(|p| p.id() == partition)?;
        (p.leader() >= 0).then_some(p.leader() as usize)
    }

    /// Whether every partition of `topic` has its whole replica set in sync.
    pub fn in_sync(&self, topic: &str) -> bool {
        self.metadata(Some(topic)).is_some_and(|m| {
            m.topics().iter().any(|t| {
                t.name() == topic
                    && t.error().is_none()
                    && !t.partitions().is_empty()
                    && t.partitions().iter().all(|p| {
                        p.leader() >= 0 && {
                            let mut r = p.replicas().to_vec();
                            let mut isr = p.isr().to_vec();
                            r.sort();
                            isr.sort();
                            r == isr
                        }
                    })
            })
        })
    }

    /// The replica count of each partition of `topic`.
    pub fn replicas(&self, topic: &str) -> Vec<usize> {
        self.metadata(Some(topic))
            .and_then(|m| {
                m.topics()
                    .iter()
                    .find(|t| t.name() == topic)
                    .map(|t| t.partitions().iter().map(|p| p.replicas().len()).collect())
            })
            .unwrap_or_default()
    }

    /// The live brokers' ids, as the cluster's metadata names them.
    fn live_ids(&self) -> Vec<usize> {
        self.metadata(None)
            .map(|m| m.brokers().iter().map(|b| b.id() as usize).collect())
            .unwrap_or_default()
    }

    fn metadata(&self, topic: Option<&str>) -> Option<rdkafka::metadata::Metadata> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .set_log_level(RDKafkaLogLevel::Emerg)
            .create()
            .ok()?;
        c.fetch_metadata(topic, Duration::from_secs(3)).ok()
    }

    /// `server.properties` of every node (node ids are their indices).
    fn write_configs(&self) {
        let n = self.nodes.len();
        let host = &self.opts.host;
        let voters: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, node)| format!("{i}@{host}:{}", node.ports.controller))
            .collect();
        let isr = n.min(2);
        for (i, node) in self.nodes.iter().enumerate() {
            let p = node.ports;
            let mut listeners = vec![
                format!("PLAINTEXT://{host}:{}", p.plain),
                format!("CONTROLLER://{host}:{}", p.controller),
            ];
            let mut advertised = vec![format!("PLAINTEXT://{host}:{}", p.plain)];
            let mut lines = vec![
                "process.roles=broker,controller".to_string(),
                format!("node.id={i}"),
                format!("controller.quorum.voters={}", voters.join(",")),
                "controller.listener.names=CONTROLLER".into(),
                "inter.broker.listener.name=PLAINTEXT".into(),
                format!("log.dirs={}", node.dir.join("data").display()),
                format!("default.replication.factor={n}"),
                format!("min.insync.replicas={isr}"),
                format!("offsets.topic.replication.factor={n}"),
                "offsets.topic.num.partitions=1".into(),
                format!("transaction.state.log.replication.factor={n}"),
                format!("transaction.state.log.min.isr={isr}"),
                format!("share.coordinator.state.topic.replication.factor={n}"),
                format!("share.coordinator.state.topic.min.isr={isr}"),
                "group.initial.rebalance.delay.ms=0".into(),
                // Few threads: a test machine may have 2 cores for several brokers.
                "num.network.threads=2".into(),
                "num.io.threads=2".into(),
                "background.threads=2".into(),
            ];
            let mut protocols = vec!["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"];
            if let (Some(port), Some((cert, key))) = (p.tls, &self.opts.tls) {
                listeners.push(format!("SSL://{host}:{port}"));
                advertised.push(format!("SSL://{host}:{port}"));
                protocols.push("SSL:SSL");
                // Kafka reads a PEM key store: the key, then the certificate chain.
                let store = node.dir.join("keystore.pem");
                let pem = [
                    std::fs::read_to_string(key).unwrap(),
                    std::fs::read_to_string(cert).unwrap(),
                ]
                .concat();
                std::fs::write(&store, pem).unwrap();
                lines.push("ssl.keystore.type=PEM".into());
                lines.push(format!("ssl.keystore.location={}", store.display()));
            }
            if let (Some(port), Some(_)) = (p.sasl, &self.opts.scram) {
                listeners.push(format!("SASL_PLAINTEXT://{host}:{port}"));
                advertised.push(format!("SASL_PLAINTEXT://{host}:{port}"));
                protocols.push("SASL_PLAINTEXT:SASL_PLAINTEXT");
                lines.push("sasl.enabled.mechanisms=SCRAM-SHA-512".into());
                lines.push(
                    "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=\
                     org.apache.kafka.common.security.scram.ScramLoginModule required;"
                        .into(),
                );
            }
            lines.push(format!("listeners={}", listeners.join(",")));
            lines.push(format!("advertised.listeners={}", advertised.join(",")));
            lines.push(format!(
                "listener.security.protocol.map={}",
                protocols.join(",")
            ));
            for (k, v) in &self.opts.properties {
                lines.push(format!("{k}={v}"));
            }
            std::fs::write(node.dir.join("server.properties"), lines.join("\n") + "\n").unwrap();
            std::fs::write(
                node.dir.join("log4j2.properties"),
                format!(
                    "status = warn\n\
                     appender.file.type = File\n\
                     appender.file.name = file\n\
                     appender.file.fileName = {}\n\
                     appender.file.layout.type = PatternLayout\n\
                     appender.file.layout.pattern = [%d] %p %m (%c)%n\n\
                     rootLogger.level = info\n\
                     rootLogger.appenderRef.file.ref = file\n\
                     logger.noisy.name = org.apache.kafka.common.config\n\
                     logger.noisy.level = warn\n",
                    node.dir.join("server.log").display()
                ),
            )
            .unwrap();
        }
    }

    /// Format every node's storage (in parallel: each is a JVM start of a few seconds).
    fn format(&self) {
        let children: Vec<(usize, Child)> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let mut c = kafka_java("kafka.tools.StorageTool", None);
                c.args(["format", "--ignore-formatted", "-t", &self.cluster_id, "-c"])
                    .arg(node.dir.join("server.properties"));
                if let Some((user, password)) = &self.opts.scram {
                    c.arg("--add-scram")
                        .arg(format!("SCRAM-SHA-512=[name={user},password={password}]"));
                }
                let child = c
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("java (Java 17; run ./scripts/setup.sh)");
                (i, child)
            })
            .collect();
        for (i, child) in children {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "kafka-storage format of node {i} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    fn spawn(&mut self, i: usize) {
        let node = &self.nodes[i];
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("stdout.log"))
            .unwrap();
        let child = kafka_java("kafka.Kafka", Some(&node.dir.join("log4j2.properties")))
            .arg(node.dir.join("server.properties"))
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("java (Java 17; run ./scripts/setup.sh)");
        self.nodes[i].child = Some(child);
    }

    /// Wait until nodes `which` are live brokers of the cluster. Err: one of them lost a
    /// port to someone else (retry on others); any other early exit panics with its log.
    fn wait_ready(&mut self, which: &[usize]) -> Result<(), String> {
        let t = Instant::now();
        loop {
            for &i in which {
                let exited = self.nodes[i]
                    .child
                    .as_mut()
                    .is_some_and(|c| c.try_wait().unwrap().is_some());
                if exited {
                    self.nodes[i].child = None;
                    let log = self.log_tail(i, 40);
                    if log.contains("Address already in use") {
                        return Err(format!("node {i} lost a port ({:?})", self.nodes[i].ports));
                    }
                    panic!("kafka node {i} exited while starting:\n{log}");
                }
            }
            let live = self.live_ids();
            if which.iter().all(|i| live.contains(i)) {
                return Ok(());
            }
            if t.elapsed() > START_WITHIN {
                let logs: Vec<String> = which
                    .iter()
                    .map(|&i| format!("node {i}:\n{}", self.log_tail(i, 15)))
                    .collect();
                panic!(
                    "kafka did not answer within {START_WITHIN:?} (live: {live:?}):\n{}",
                    logs.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The last `n` lines of node `i`'s log and its stdout.
    pub fn log_tail(&self, i: usize, n: usize) -> String {
        let mut text = String::new();
        for f in ["server.log", "stdout.log"] {
            let all = std::fs::read_to_string(self.nodes[i].dir.join(f)).unwrap_or_default();
            let lines: Vec<&str> = all.lines().collect();
            text += &lines[lines.len().saturating_sub(n)..].join("\n");
            text.push('\n');
        }
        text
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

fn new_ports(opts: &KafkaOptions) -> Ports {
    let port = || free_port_on(&opts.host);
    Ports {
        plain: port(),
        controller: port(),
        tls: opts.tls.as_ref().map(|_| port()),
        sasl: opts.scram.as_ref().map(|_| port()),
    }
}

/// A port of `host` nothing listens on right now (the broker's start is retried if
/// someone takes it first).
pub fn free_port_on(host: &str) -> u16 {
    std::net::TcpListener::bind((host, 0))
        .unwrap_or_else(|e| panic!("cannot bind {host}: {e}"))
        .local_addr()
        .unwrap()
        .port()
}

/// A new KRaft cluster id: 16 random bytes in URL-safe base64 without padding, as
/// `kafka-storage random-uuid` prints them (never starting with '-').
fn cluster_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    loop {
        let mut bytes = [0u8; 16];
        let mut f = std::fs::File::open("/dev/urandom").unwrap();
        std::io::Read::read_exact(&mut f, &mut bytes).unwrap();
        let mut bits = 0u32;
        let mut held = 0;
        let mut id = String::new();
        for b in bytes {
            bits = (bits << 8) | b as u32;
            held += 8;
            while held >= 6 {
                held -= 6;
                id.push(ALPHABET[((bits >> held) & 63) as usize] as char);
            }
        }
        if held > 0 {
            id.push(ALPHABET[((bits << (6 - held)) & 63) as usize] as char);
        }
        if !id.starts_with('-') {
            return id;
        }
    }
}

/// A runtime whose kafka-transport talks to `brokers`, granted the topics under
/// `granted`, with file logging and browsing under `dir/state/logs`.
pub fn kafka_runtime(
    dir: &std::path::Path,
    brokers: &str,
    granted: &str,
) -> std::sync::Arc<trellis::runtime::Runtime> {
    std::fs::create_dir_all(dir.join("state/logs")).unwrap();
    super::runtime(
        &format!(
            r#"
            [kafka]
            brokers = "{brokers}"
            [plugins.kafka-transport]
            kafka = {{ topics = ["{granted}"] }}
            config = {{ prefix = "trellis" }}
            [plugins.file-logging]
            dirs = [{{ host = "state/logs", guest = "/logs", mode = "read-write" }}]
            [plugins.file-browser]
            dirs = [{{ host = "state/logs", guest = "/logs" }}]
            "#
        ),
        dir,
        &[],
    )
}

/// An in-process agent `agent-1` (label `linux`) over `kafka`; it stops when the
/// returned sender is dropped or set.
pub fn spawn_agent(
    kafka: std::sync::Arc<trellis::runtime::Plugin>,
    dir: &std::path::Path,
    secret: &str,
) -> tokio::sync::watch::Sender<bool> {
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let cfg = trellis::agent::worker::AgentConfig {
        name: "agent-1".into(),
        labels: vec!["linux".into()],
        secret: secret.into(),
        workspace: dir.join("work"),
        heartbeat: Duration::from_millis(500),
        logs: None,
        state_dir: None,
        executors: 1,
    };
    tokio::spawn(trellis::agent::worker::run_agent(kafka, cfg, stop));
    stop_tx
}

//! OpenSearch 2.19.6 for the Elasticsearch plugins' suites: one node run in-process
//! from Maven Central's jars (`./scripts/setup.sh` fetches them and compiles
//! `tests/engines/opensearch/src/TestNode.java` into `$TRELLIS_OPENSEARCH_DIR`, by
//! default `~/.cache/trellis/opensearch-2.19.6`).
//!
//! * The node binds HTTP on port 0 and reports the port it got: no race for a port. A
//!   restart (the same data directory) asks for the same port, so the URLs in the
//!   daemons' configs stay right; if something else took it meanwhile, the start is
//!   retried on it for a while, then fails saying so.
//! * Ready means `GET /` answers and the cluster is at least yellow (after a restart:
//!   its indices are recovered).
//! * Stopped on drop: stdin closed (the node closes cleanly), killed if it has not ended
//!   within 30 s. A test binary that dies closes that pipe too: no node outlives it.
//! * [`OpenSearch::shared`]: one node per test binary, for tests that do not stop the
//!   store and use their own index names (a start costs 5-20 s of a 2-core machine).

use super::{es_call, try_es_call};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Where setup.sh put the jars and TestNode.class.
pub fn opensearch_dir() -> PathBuf {
    match std::env::var_os("TRELLIS_OPENSEARCH_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME"))
            .join(".cache/trellis/opensearch-2.19.6"),
    }
}

/// The class path: TestNode and every jar but randomizedtesting-runner (with it there,
/// `Randomness.get()` wants a RandomizedRunner context and the node does not start).
fn class_path() -> String {
    let dir = opensearch_dir();
    let libs = dir.join("libs");
    let ready = libs.join(".complete").exists() && dir.join("classes/TestNode.class").exists();
    assert!(
        ready,
        "OpenSearch is not in {} (TRELLIS_OPENSEARCH_DIR): run ./scripts/setup.sh",
        dir.display()
    );
    let mut parts = vec![dir.join("classes").display().to_string()];
    let mut jars: Vec<String> = std::fs::read_dir(&libs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jar"))
        .filter(|p| {
            !p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("randomizedtesting-runner")
        })
        .map(|p| p.display().to_string())
        .collect();
    jars.sort();
    parts.extend(jars);
    parts.join(":")
}

pub struct OpenSearch {
    home: PathBuf,
    /// The HTTP port (kept across restarts).
    pub port: u16,
    /// The node's output (all starts appended), for failure messages.
    pub log: PathBuf,
    delete_home: bool,
    node: Option<(Child, ChildStdin)>,
}

const START_WITHIN: Duration = Duration::from_secs(120);

impl OpenSearch {
    /// A node of its own, its home and data in `dir/opensearch`.
    pub fn start(dir: &Path) -> OpenSearch {
        Self::start_in(dir.join("opensearch"), false)
    }

    /// One node for the whole test binary (started on first use, home under the system's
    /// temporary directory, removed when the node stops at the binary's exit). Tests on
    /// it must not stop it and must use index names no other test in the binary uses.
    pub fn shared() -> &'static OpenSearch {
        static NODE: OnceLock<OpenSearch> = OnceLock::new();
        NODE.get_or_init(|| {
            let home = std::env::temp_dir().join(format!(
                "trellis-opensearch-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            ));
            Self::start_in(home, true)
        })
    }

    fn start_in(home: PathBuf, delete_home: bool) -> OpenSearch {
        std::fs::create_dir_all(&home).unwrap();
        let log = home.join("node.log"); // removed with the home
        let mut os = OpenSearch {
            home,
            port: 0,
            log,
            delete_home,
            node: None,
        };
        os.launch();
        os
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stop the node (cleanly) and wait for it to end.
    pub fn stop(&mut self) {
        if let Some((mut child, stdin)) = self.node.take() {
            drop(stdin); // the node closes itself on EOF
            let t = Instant::now();
            while child.try_wait().unwrap().is_none() {
                if t.elapsed() > Duration::from_secs(30) {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Start it again after [`OpenSearch::stop`]: the same data directory and HTTP port.
    pub fn start_again(&mut self) {
        assert!(self.node.is_none(), "the node is running");
        self.launch();
    }

    /// Start the node on `self.port` (0: any) until it is ready; retried while its port
    /// is taken.
    fn launch(&mut self) {
        let t = Instant::now();
        loop {
            match self.try_launch() {
                Ok(()) => {
                    // What a start costs shows in the test's output (with --nocapture).
                    println!(
                        "OpenSearch ready on port {} in {:.1} s",
                        self.port,
                        t.elapsed().as_secs_f64()
                    );
                    return;
                }
                Err(Launch::PortTaken) if t.elapsed() < Duration::from_secs(30) => {
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(Launch::PortTaken) => panic!(
                    "OpenSearch could not bind 127.0.0.1:{} again for 30 s (something else took it); log: {}\n{}",
                    self.port,
                    self.log.display(),
                    tail(&self.log)
                ),
                Err(Launch::Failed(why)) => panic!(
                    "OpenSearch did not start: {why}; log: {}\n{}",
                    self.log.display(),
                    tail(&self.log)
                ),
            }
        }
    }

    fn try_launch(&mut self) -> Result<(), Launch> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new("java");
        // Small: two cores and a few nodes at once. C1 only starts faster.
        cmd.args([
            "-Xms128m",
            "-Xmx512m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-Dlog4j2.level=WARN",
            "-cp",
            &class_path(),
            "TestNode",
        ])
        .arg(&self.home)
        .arg(self.port.to_string());
        if self.delete_home {
            cmd.arg("delete-home");
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log.try_clone().unwrap())
            .spawn()
            .expect("java (Java 17; run ./scripts/setup.sh)");
        let stdin = child.stdin.take().unwrap();
        // Everything the node prints goes to the log; its `http PORT` line comes here.
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut log = log;
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(port) = line.strip_prefix("http ").and_then(|p| p.parse().ok()) {
                    let _ = tx.send(port);
                }
                let _ = writeln!(log, "{line}");
            }
        });
        let t = Instant::now();
        let port: u16 = loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(port) => break port,
                Err(mpsc::RecvTimeoutError::Timeout) if t.elapsed() < START_WITHIN => {
                    if let Some(status) = child.try_wait().unwrap() {
                        return Err(self.ended(status));
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Launch::Failed(format!(
                        "no HTTP port within {START_WITHIN:?}"
                    )));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().unwrap();
                    return Err(self.ended(status));
                }
            }
        };
        self.port = port;
        self.node = Some((child, stdin));
        // Ready: `GET /` answers, and the indices it has are recovered.
        let addr = format!("127.0.0.1:{port}");
        loop {
            if let Ok((200, _)) = try_es_call(&addr, "GET", "/", "") {
                let health = "/_cluster/health?wait_for_status=yellow&timeout=30s";
                if let Ok((200, _)) = try_es_call(&addr, "GET", health, "") {
                    return Ok(());
                }
            }
            if t.elapsed() > START_WITHIN {
                self.stop();
                return Err(Launch::Failed(format!(
                    "port {port} bound but not ready within {START_WITHIN:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Why a node ended during its start.
    fn ended(&self, status: std::process::ExitStatus) -> Launch {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        if self.port != 0 && log.contains("BindException") {
            Launch::PortTaken
        } else {
            Launch::Failed(format!("the node ended ({status})"))
        }
    }

    /// `method path` with a JSON body; (status, body).
    pub fn call(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        es_call(&format!("127.0.0.1:{}", self.port), method, path, body)
    }

    /// Make what was written to `index` searchable now (that index only: other tests on
    /// a shared node may depend on their own index not being refreshed).
    pub fn refresh(&self, index: &str) {
        let (status, body) = self.call("POST", &format!("/{index}/_refresh"), "");
        assert_eq!(status, 200, "refresh {index}: {body}");
    }

    /// Create `index` with automatic refreshes off (documents become searchable only on
    /// a refresh), under whatever template matches it.
    pub fn create_unrefreshed_index(&self, index: &str) {
        let (status, body) = self.call(
            "PUT",
            &format!("/{index}"),
            r#"{"settings":{"index":{"refresh_interval":"-1","number_of_replicas":0}}}"#,
        );
        assert_eq!(status, 200, "create {index}: {body}");
    }

    /// `_count` of `index` after refreshing it; None if it does not exist.
    pub fn count(&self, index: &str) -> Option<u64> {
        let (status, body) = self.call("POST", &format!("/{index}/_refresh"), "");
        if status == 404 {
            return None;
        }
        assert_eq!(status, 200, "refresh {index}: {body}");
        let (status, body) = self.call("GET", &format!("/{index}/_count"), "");
        assert_eq!(status, 200, "count {index}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        Some(v["count"].as_u64().unwrap())
    }
}

enum Launch {
    PortTaken,
    Failed(String),
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

impl Drop for OpenSearch {
    fn drop(&mut self) {
        self.stop();
    }
}

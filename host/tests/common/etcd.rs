//! A three-member etcd cluster (Debian's etcd-server 3.4) on loopback, its data in a
//! temporary directory; members can be killed and restarted one by one.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct EtcdCluster {
    pub clients: Vec<String>,
    peers: Vec<String>,
    dir: PathBuf,
    members: Vec<Option<Child>>,
    /// Another address the members also serve clients on (a test namespace's host end).
    also_on: Option<String>,
}

impl EtcdCluster {
    pub fn start(dir: &std::path::Path) -> EtcdCluster {
        Self::start_also_on(dir, None)
    }

    /// Serving clients on loopback and, with `also_on`, on that address too (the same
    /// ports): for a controller inside a test's network namespace. A cluster whose member
    /// lost its port is started again on new ones (`retry_on_ports`).
    pub fn start_also_on(dir: &std::path::Path, also_on: Option<&str>) -> EtcdCluster {
        super::retry_on_ports("etcd", 6, |ports| Self::try_start(dir, also_on, ports))
    }

    /// The cluster with its client ports `ports[..3]` and peer ports `ports[3..]`, once
    /// every member answers; or, when a member exits before that (it lost its port,
    /// say), what it said (the others are killed). A fresh cluster each time: any data
    /// a failed start left is removed first.
    pub fn try_start(
        dir: &std::path::Path,
        also_on: Option<&str>,
        ports: &[u16],
    ) -> Result<EtcdCluster, String> {
        let addr = |p: &u16| format!("127.0.0.1:{p}");
        let mut c = EtcdCluster {
            clients: ports[..3].iter().map(addr).collect(),
            peers: ports[3..6].iter().map(addr).collect(),
            dir: dir.to_path_buf(),
            members: vec![None, None, None],
            also_on: also_on.map(String::from),
        };
        for i in 0..3 {
            let _ = std::fs::remove_dir_all(c.data_dir(i));
            c.start_member(i);
        }
        let t = Instant::now();
        while !c.healthy() {
            for i in 0..3 {
                let log = c.log(i);
                if let Some(said) = c.members[i]
                    .as_mut()
                    .and_then(|m| super::exited(m, &log, 10))
                {
                    return Err(format!("etcd member m{i} exited: {said}"));
                }
            }
            if t.elapsed() > Duration::from_secs(60) {
                // The test's directory goes with the panic: say what the members said.
                let tails: Vec<String> = (0..3)
                    .map(|i| format!("m{i}: {}", super::tail(&c.log(i), 4).replace('\n', " | ")))
                    .collect();
                panic!(
                    "etcd did not form a cluster within 60 s:\n{}",
                    tails.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(c)
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("etcd-m{i}"))
    }

    fn log(&self, i: usize) -> PathBuf {
        self.dir.join(format!("etcd-m{i}.log"))
    }

    pub fn start_member(&mut self, i: usize) {
        let cluster: Vec<String> = self
            .peers
            .iter()
            .enumerate()
            .map(|(j, p)| format!("m{j}=http://{p}"))
            .collect();
        let child = Command::new("etcd")
            .args(["--name", &format!("m{i}")])
            .arg("--data-dir")
            .arg(self.data_dir(i))
            .args(["--listen-client-urls", &self.listen_urls(i)])
            .args([
                "--advertise-client-urls",
                &format!("http://{}", self.clients[i]),
            ])
            .args(["--listen-peer-urls", &format!("http://{}", self.peers[i])])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://{}", self.peers[i]),
            ])
            .args(["--initial-cluster", &cluster.join(",")])
            .args(["--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.log(i)).unwrap())
            .spawn()
            .expect("etcd (Debian's etcd-server; run ./scripts/setup.sh)");
        self.members[i] = Some(child);
    }

    fn listen_urls(&self, i: usize) -> String {
        let mut urls = format!("http://{}", self.clients[i]);
        if let Some(ip) = &self.also_on {
            let port = self.clients[i].rsplit(':').next().unwrap();
            urls += &format!(",http://{ip}:{port}");
        }
        urls
    }

    /// The client ports (the same on every address the members serve).
    pub fn ports(&self) -> Vec<u16> {
        self.clients
            .iter()
            .map(|c| c.rsplit(':').next().unwrap().parse().unwrap())
            .collect()
    }

    /// SIGKILL member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn healthy(&self) -> bool {
        self.clients.iter().all(|c| {
            Command::new("etcdctl")
                .args(["--endpoints", c, "endpoint", "health"])
                .env("ETCDCTL_API", "3")
                .output()
                .is_ok_and(|o| o.status.success())
        })
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..3 {
            self.kill(i);
        }
    }
}

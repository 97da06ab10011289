//! The sushy-tools Redfish emulator (`pip install sushy-tools`, by ./scripts/setup.sh)
//! as a BMC on loopback: the fake driver, HTTPS with a certificate from the test's own
//! CA. Its fake systems apply a power change after a random 1-11 s, like a slow BMC.
//! Each emulator keeps its state in the test's own directory (see `start`), so tests
//! running at once do not share a system.

use std::time::{Duration, Instant};

pub struct Sushy {
    pub port: u16,
    /// The CA that signed the emulator's certificate (for `tls-ca`).
    pub ca: String,
    child: std::process::Child,
}

impl Sushy {
    /// The emulator on a fresh port; on another when it lost that one (`retry_on_port`).
    pub fn start(dir: &std::path::Path) -> Sushy {
        super::retry_on_port("sushy-emulator", |port| Self::try_start(dir, port))
    }

    /// The emulator on `port`, once it accepts connections; or, when it exits before
    /// that (it lost its port, say), what it said.
    pub fn try_start(dir: &std::path::Path, port: u16) -> Result<Sushy, String> {
        let (ca, cert, key) = super::tls_files(dir);
        let log = dir.join("sushy.log");
        let child = std::process::Command::new("sushy-emulator")
            .args(["--fake", "-i", "127.0.0.1", "-p", &port.to_string()])
            .args(["--ssl-certificate", &cert, "--ssl-key", &key])
            // The fake driver keeps its systems' state in <tmp>/sushy-emulator/, shared by
            // every emulator on the machine (same fixed system): each test gets its own.
            .env("TMPDIR", dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("sushy-emulator (run ./scripts/setup.sh)");
        let mut s = Sushy { port, ca, child };
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(said) = super::exited(&mut s.child, &log, 10) {
                return Err(format!("sushy-emulator exited: {said}"));
            }
            // Its Python start takes 30 s on a machine busy with builds.
            assert!(
                t.elapsed() < Duration::from_secs(90),
                "sushy-emulator did not listen on {port}: see {}",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(s)
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// `trellis fence` installed as the fence agent `agent` (a wrapper script, as an
    /// operator would install it) for the redfish-fence plugin, granted this emulator
    /// and its CA by `<config_dir>/fence.toml`.
    pub fn install_fence_agent(&self, agent: &std::path::Path, config_dir: &std::path::Path) {
        use std::os::unix::fs::PermissionsExt;
        let config = config_dir.join("fence.toml");
        std::fs::write(
            &config,
            format!(
                "[plugins.redfish-fence]\nhttp = [\"{}\"]\ntls-ca = [\"{}\"]\nlimits = {{ call-timeout = \"90s\" }}\n",
                self.url(),
                self.ca
            ),
        )
        .unwrap();
        std::fs::write(
            agent,
            format!(
                "#!/bin/sh\nexec {} fence --name fence_trellis_redfish --plugin {} --config {} \"$@\"\n",
                env!("CARGO_BIN_EXE_trellis"),
                super::bundle().join("redfish-fence").display(),
                config.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

impl Drop for Sushy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

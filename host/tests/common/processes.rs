//! The `trellis` binary as real processes: daemons killed on drop, CLI calls.

use std::path::Path;
use std::process::{Child, Command, Stdio};

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

/// A CLI command against `server`: (exit code, stdout, stderr).
pub fn cli(server: &str, args: &[&str]) -> (i32, String, String) {
    let out = trellis()
        .args(args)
        .env("TRELLIS_SERVER", server)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

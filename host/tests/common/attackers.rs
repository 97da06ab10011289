//! The link attackers of tests/link-attackers/ (Python processes): a man in the middle
//! of the TCP transport (`relay.py`) and a fake controller. Each prints the port it
//! listens on as its first line and takes commands on stdin.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

fn attacker(script: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/link-attackers")
        .join(script)
}

/// A Python attacker process, killed when dropped; the port it listens on.
pub struct Attacker {
    child: Child,
    stdin: Option<ChildStdin>,
    pub port: u16,
}

impl Attacker {
    pub fn start(script: &str, args: &[&str]) -> Attacker {
        let mut child = Command::new("python3")
            .arg(attacker(script))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let port = first.trim().parse().unwrap_or_else(|_| panic!("{first:?}"));
        Attacker {
            stdin: child.stdin.take(),
            child,
            port,
        }
    }

    /// One command line (see the script's docstring).
    pub fn command(&mut self, line: &str) {
        writeln!(self.stdin.as_mut().unwrap(), "{line}").unwrap();
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Point the agent's config at `port` instead of the controller's.
pub fn agent_via(agent_cfg: &Path, controller_port: u16, port: u16) {
    let text = std::fs::read_to_string(agent_cfg).unwrap();
    let from = format!("127.0.0.1:{controller_port}");
    assert!(text.contains(&from), "{text}");
    std::fs::write(agent_cfg, text.replace(&from, &format!("127.0.0.1:{port}"))).unwrap();
}

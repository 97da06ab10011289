//! Pacemaker drives a Trellis fence plugin. Debian's corosync and pacemaker run on one
//! node without systemd (`corosync -f`, then `pacemakerd -f`); a stonith resource made
//! with `cibadmin` uses `trellis fence` installed as `/usr/sbin/fence_trellis_redfish`
//! (the fencer looks for agents there) with the redfish-fence plugin; `stonith_admin
//! --fence` on a target turns the sushy emulator's system off, and Pacemaker's fencing
//! history records the success.
//!
//! Needs root: Pacemaker keeps its state and finds fence agents under system paths. The
//! test removes what it installed, and stops both daemons, when it ends.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const AGENT: &str = "/usr/sbin/fence_trellis_redfish";

/// Stops the cluster daemons and removes the installed agent, even on panic.
struct Cluster {
    daemons: Vec<Child>,
    agent: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // pacemakerd first (it stops its children), then corosync.
        for d in self.daemons.iter_mut().rev() {
            unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
            let t = Instant::now();
            while d.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(200));
            }
            let _ = d.kill();
            let _ = d.wait();
        }
        let _ = std::fs::remove_file(&self.agent);
    }
}

fn sh(cmd: &mut Command) -> (bool, String) {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (run ./scripts/setup.sh)"));
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    )
}

fn start(dir: &Path, log: &str, cmd: &mut Command) -> Child {
    cmd.stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(log)).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (run ./scripts/setup.sh)"))
}

#[test]
fn pacemaker_fences_through_a_trellis_plugin() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "Pacemaker's fencer needs root (its agents live in /usr/sbin)"
    );
    let (running, _) = sh(Command::new("pgrep").args(["-x", "pacemakerd"]));
    assert!(!running, "a pacemakerd is already running on this machine");
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let sushy = Sushy::start(dir);

    // The agent: trellis fence with the plugin, granted the BMC and its CA.
    sushy.install_fence_agent(Path::new(AGENT), dir);
    let mut cluster = Cluster {
        daemons: vec![],
        agent: AGENT.into(),
    };

    // One node, on loopback, from a clean configuration.
    for f in std::fs::read_dir("/var/lib/pacemaker/cib")
        .into_iter()
        .flatten()
        .flatten()
    {
        let _ = std::fs::remove_file(f.path());
    }
    let corosync_conf = dir.join("corosync.conf");
    std::fs::write(
        &corosync_conf,
        "totem {\n version: 2\n cluster_name: trellis-test\n crypto_cipher: none\n crypto_hash: none\n}\nnodelist {\n node {\n  ring0_addr: 127.0.0.1\n  name: node1\n  nodeid: 1\n }\n}\nquorum {\n provider: corosync_votequorum\n}\nlogging {\n to_stderr: yes\n to_syslog: no\n}\n",
    )
    .unwrap();
    cluster.daemons.push(start(
        dir,
        "corosync.log",
        Command::new("corosync")
            .args(["-f", "-c"])
            .arg(&corosync_conf),
    ));
    std::thread::sleep(Duration::from_secs(2));
    cluster.daemons.push(start(
        dir,
        "pacemaker.log",
        Command::new("pacemakerd").arg("-f"),
    ));
    let t = Instant::now();
    loop {
        let (_, mon) = sh(Command::new("crm_mon").arg("-1"));
        if mon.contains("Online: [ node1 ]") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "the node did not come online: {mon}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    eprintln!("pacemaker online after {:?}", t.elapsed());

    // The BMC's system on, so that fencing has something to turn off.
    let pw = "bmc-password-value";
    let device = |action: &str| {
        let mut c = Command::new(AGENT)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        write!(
            c.stdin.take().unwrap(),
            "ip=127.0.0.1\nipport={}\nusername=admin\npassword={pw}\naction={action}\n",
            sushy.port
        )
        .unwrap();
        c.wait_with_output().unwrap().status.code()
    };
    assert_eq!(device("on"), Some(0));
    assert_eq!(device("status"), Some(0), "on");

    // A stonith resource for node2 that uses the agent.
    let port = sushy.port.to_string();
    let attrs = [
        ("ip", "127.0.0.1"),
        ("ipport", port.as_str()),
        ("username", "admin"),
        ("password", pw),
        ("pcmk_host_list", "node2"),
    ];
    let nvpairs: String = attrs
        .iter()
        .map(|(k, v)| format!("<nvpair id=\"bmc-{k}\" name=\"{k}\" value=\"{v}\"/>"))
        .collect();
    let xml = format!(
        "<primitive id=\"bmc\" class=\"stonith\" type=\"fence_trellis_redfish\"><instance_attributes id=\"bmc-ia\">{nvpairs}</instance_attributes></primitive>"
    );
    let (ok, out) =
        sh(Command::new("cibadmin").args(["--create", "-o", "resources", "--xml-text", &xml]));
    assert!(ok, "{out}");
    // The fencer registers the device once the scheduler has placed it.
    let t = Instant::now();
    loop {
        let (_, list) = sh(Command::new("stonith_admin").args(["--list", "node2"]));
        if list.contains("bmc") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the fencer did not register the device: {list}\n{}",
            std::fs::read_to_string(dir.join("pacemaker.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_secs(1));
    }

    let t = Instant::now();
    let (ok, out) =
        sh(Command::new("stonith_admin").args(["--fence", "node2", "--timeout", "120"]));
    let took = t.elapsed();
    assert!(
        ok,
        "stonith_admin --fence failed: {out}\n{}",
        std::fs::read_to_string(dir.join("pacemaker.log")).unwrap_or_default()
    );
    eprintln!("fenced node2 through Pacemaker in {took:?}");
    assert_eq!(device("status"), Some(2), "the emulator's system is off");
    let (_, history) = sh(Command::new("stonith_admin").args(["--history", "node2", "--verbose"]));
    assert!(
        history.contains("successful") || history.contains("was able to"),
        "Pacemaker recorded no success: {history}"
    );
    drop(cluster);
}

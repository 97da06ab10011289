//! A network namespace the test creates: a veth pair with the host's end at
//! `10.<a>.<b>.1/30` and the namespace's at `.2`, the namespace's loopback up. Links are
//! cut with nftables rules inside the namespace (the host's own rules are never
//! touched). Deleted on drop (which removes the veth too). Needs root.

use std::process::Command;

pub struct Netns {
    pub name: String,
    /// The host's end: what processes in the namespace connect to.
    pub host_ip: String,
    /// The namespace's end: where the host reaches processes inside.
    pub ns_ip: String,
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    /// A namespace named `tr<tag><pid>`; `subnet` picks `10.213.<subnet>.0/30` (tests
    /// that run at once use different ones).
    pub fn create(tag: &str, subnet: u8) -> Result<Netns, String> {
        let pid = std::process::id() % 100_000;
        let name = format!("tr{tag}{pid}");
        let (host_if, ns_if) = (format!("{name}h"), format!("{name}n"));
        let host_ip = format!("10.213.{subnet}.1");
        let ns_ip = format!("10.213.{subnet}.2");
        let _ = run(&["ip", "netns", "del", &name]); // a leftover of a killed run
        run(&["ip", "netns", "add", &name])?;
        let ns = Netns {
            name: name.clone(),
            host_ip: host_ip.clone(),
            ns_ip: ns_ip.clone(),
        };
        run(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        run(&["ip", "link", "set", &ns_if, "netns", &name])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &host_if,
        ])?;
        run(&["ip", "link", "set", &host_if, "up"])?;
        ns.exec_ok(&["ip", "addr", "add", &format!("{ns_ip}/30"), "dev", &ns_if])?;
        ns.exec_ok(&["ip", "link", "set", &ns_if, "up"])?;
        ns.exec_ok(&["ip", "link", "set", "lo", "up"])?;
        // Other test-made addresses of the host (a storage address) through the veth.
        ns.exec_ok(&["ip", "route", "add", "default", "via", &host_ip])?;
        Ok(ns)
    }

    /// `program args...` run inside the namespace.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// `program` run with only its network namespace switched (`nsenter --net`), so
    /// that what it mounts is seen by the host: a FUSE client whose traffic leaves from
    /// the namespace's address.
    pub fn nsenter(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name))
            .arg(program);
        c
    }

    fn exec_ok(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["ip", "netns", "exec", &self.name];
        all.extend_from_slice(args);
        run(&all)
    }

    /// Drop everything the namespace sends to the host's end on these TCP ports: a
    /// partition between the processes inside and those services. Returns the rule
    /// set's name for [`Netns::heal`].
    pub fn cut(&self, ports: &[u16]) -> Result<(), String> {
        let ports = ports
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let rules = format!(
            "table inet partition {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n    ip daddr {} tcp dport {{ {ports} }} drop\n  }}\n}}\n",
            self.host_ip
        );
        let file = std::env::temp_dir().join(format!("{}.nft", self.name));
        std::fs::write(&file, rules).map_err(|e| e.to_string())?;
        self.exec_ok(&["nft", "-f", file.to_str().unwrap()])
    }

    /// Remove the partition.
    pub fn heal(&self) -> Result<(), String> {
        self.exec_ok(&["nft", "delete", "table", "inet", "partition"])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}

/// An address of the host's own, on its loopback interface (GlusterFS bricks need a
/// host address other than 127.0.0.1 that namespaces can reach, through their veth;
/// this kernel has no dummy interfaces). Removed on drop.
pub struct HostAddress {
    pub ip: String,
}

impl HostAddress {
    pub fn create(ip: &str) -> Result<HostAddress, String> {
        let _ = run(&["ip", "addr", "del", &format!("{ip}/32"), "dev", "lo"]);
        run(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "lo"])?;
        Ok(HostAddress { ip: ip.to_string() })
    }
}

impl Drop for HostAddress {
    fn drop(&mut self) {
        let _ = run(&["ip", "addr", "del", &format!("{}/32", self.ip), "dev", "lo"]);
    }
}

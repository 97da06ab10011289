//! Loopback ports for the services the tests start: chosen so that a race can hardly
//! take them, and a bounded retry on new ports for a service that lost one anyway.
//!
//! **Choosing** (`free_port`). A port the kernel just gave to `bind(0)` and that was
//! closed again is free for anyone: the next outgoing connection on the machine (etcd's
//! members dialling each other, an HTTP client) may get it as its local port before the
//! service binds it (`ha_gluster` once failed so: etcd's "bind: address already in
//! use"). So the port is *reserved* instead: bound, connected to, and closed from the
//! listening side first, which leaves it in TIME_WAIT for a minute (the trick of Yelp's
//! `ephemeral-port-reserve`). Meanwhile the kernel gives it to no `bind(0)` (another
//! test's `free_port`) and to no outgoing connection, while a service that binds it
//! with SO_REUSEADDR gets it at once. Every service the tests start sets it: Go's
//! listeners (etcd), Python's HTTP servers (sushy-tools, es-mock), Rust's std and tokio
//! listeners (the daemons' API, tansu), wasmtime's WASI sockets (tcp-transport) and
//! Java's server sockets (Kafka, OpenSearch). A service that does not would fail to bind
//! it every time; `retry_on_port` would then say so after its last try.
//!
//! **Retrying** (`retry_on_port`, `retry_on_ports`). Whatever is left (a port another
//! process names explicitly, a reservation older than a minute) is caught where the
//! service starts: its starter returns what the service said when it failed, and a
//! failure that says the address was in use is started again on new ports, at most
//! `PORT_TRIES` times. Any other failure fails the test with what the service said.

use std::path::Path;
use std::process::Child;

/// Starts of one service on new ports before the test gives up.
pub const PORT_TRIES: usize = 5;

/// A loopback TCP port nothing holds, reserved as the module docs say: a service that
/// binds it (with SO_REUSEADDR) gets it; `bind(0)` and outgoing connections do not,
/// for about a minute.
pub fn free_port() -> u16 {
    use std::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
    let addr = listener.local_addr().unwrap();
    let client = TcpStream::connect(addr).expect("connecting to the reserved port");
    let (accepted, _) = listener.accept().expect("accepting on the reserved port");
    // The listening side closes first: it is the one left in TIME_WAIT, on this port.
    drop(accepted);
    drop(client);
    addr.port()
}

/// Whether `output` (a service's log or error) says it could not bind an address that
/// something else holds: Go, Python, Rust and Java each say it their own way.
pub fn lost_its_port(output: &str) -> bool {
    let o = output.to_ascii_lowercase();
    [
        "address already in use", // Go, Python, Rust std (os error 98), Java
        "address-in-use",         // WASI's error code (tcp-transport)
        "addressinuse",
        "address in use",
        "eaddrinuse",
    ]
    .iter()
    .any(|s| o.contains(s))
}

/// Start a service on `n` fresh loopback ports, and again on new ones when it lost one:
/// `start` gets the ports and returns the running service, or what the service said
/// when it failed (its log's tail, its error). A failure that `lost_its_port` recognises
/// is retried, up to `PORT_TRIES` starts; any other fails the test with what was said.
pub fn retry_on_ports<T>(
    what: &str,
    n: usize,
    mut start: impl FnMut(&[u16]) -> Result<T, String>,
) -> T {
    let mut said = String::new();
    for attempt in 1..=PORT_TRIES {
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        match start(&ports) {
            Ok(service) => return service,
            Err(s) if lost_its_port(&s) => {
                eprintln!(
                    "{what} lost one of its ports {ports:?} to another process (start {attempt} of {PORT_TRIES}): starting it on new ones"
                );
                said = s;
            }
            Err(s) => panic!("{what} did not start on ports {ports:?}:\n{s}"),
        }
    }
    panic!(
        "{what} lost its ports {PORT_TRIES} times in a row (does it bind with SO_REUSEADDR? see tests/common/ports.rs); the last time it said:\n{said}"
    )
}

/// [`retry_on_ports`] for a service on one port.
pub fn retry_on_port<T>(what: &str, mut start: impl FnMut(u16) -> Result<T, String>) -> T {
    retry_on_ports(what, 1, |ports| start(ports[0]))
}

/// If `child` has exited: its status and the last `lines` lines of `log` (what a
/// starter returns as the service's failure).
pub fn exited(child: &mut Child, log: &Path, lines: usize) -> Option<String> {
    let status = child.try_wait().ok().flatten()?;
    Some(format!(
        "{status}; the end of {}:\n{}",
        log.display(),
        tail(log, lines)
    ))
}

/// The last `lines` lines of the file at `path` (empty if unreadable).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// A loopback port held the way a thief would hold it (an outgoing connection that got
/// it as its local port): bound without SO_REUSEADDR and not listening, so any service
/// that binds it fails with "address already in use" and a connection to it is
/// refused. For testing the retry with a real conflict; let go when dropped.
pub struct PortThief {
    pub port: u16,
    _socket: std::os::fd::OwnedFd,
}

impl PortThief {
    pub fn take() -> PortThief {
        PortThief::hold(0).unwrap_or_else(|e| panic!("bind: {e}"))
    }

    /// Hold `port` (0: any) the thief's way, if nothing else holds it.
    pub fn hold(port: u16) -> std::io::Result<PortThief> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        // SAFETY: plain socket calls on a descriptor this function owns; the address
        // structures are initialised and sized for the calls that read them.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let socket = OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as libc::sa_family_t;
            addr.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
            addr.sin_port = port.to_be();
            let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let bound = libc::bind(
                socket.as_raw_fd(),
                &addr as *const libc::sockaddr_in as *const libc::sockaddr,
                len,
            );
            if bound != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let named = libc::getsockname(
                socket.as_raw_fd(),
                &mut addr as *mut libc::sockaddr_in as *mut libc::sockaddr,
                &mut len,
            );
            assert_eq!(named, 0, "getsockname: {}", std::io::Error::last_os_error());
            Ok(PortThief {
                port: u16::from_be(addr.sin_port),
                _socket: socket,
            })
        }
    }
}

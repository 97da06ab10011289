//! The suite's own footing (issue 20, item 4): a service the tests start that finds
//! its port taken comes up on another, with a real conflict each time (a socket holds
//! the port the service is first given; see `common::ports`). And the ports
//! `free_port` reserves are not handed out to anyone else meanwhile.

mod common;

use common::*;
use std::net::TcpStream;
use std::path::Path;

/// `retry_on_ports` for `n` ports, the first start given the thief's port in place of
/// its first one. Returns the service and the ports of the start that came up.
fn start_past_a_thief<T>(
    what: &str,
    n: usize,
    thief: &PortThief,
    mut start: impl FnMut(&[u16]) -> Result<T, String>,
) -> (T, Vec<u16>, usize) {
    let mut starts = 0;
    let mut last = Vec::new();
    let service = retry_on_ports(what, n, |ports| {
        starts += 1;
        let mut ports = ports.to_vec();
        if starts == 1 {
            ports[0] = thief.port;
        }
        last = ports.clone();
        start(&ports)
    });
    (service, last, starts)
}

#[test]
fn a_reserved_port_is_given_to_no_one_else_but_a_service_binds_it() {
    let reserved: Vec<u16> = (0..200).map(|_| free_port()).collect();
    // Neither another free_port's bind(0) nor an outgoing connection's local port.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let to = server.local_addr().unwrap();
    for _ in 0..1000 {
        let any = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = any.local_addr().unwrap().port();
        assert!(!reserved.contains(&p), "bind(0) got reserved port {p}");
        let c = TcpStream::connect(to).unwrap();
        let (_accepted, _) = server.accept().unwrap();
        let p = c.local_addr().unwrap().port();
        assert!(!reserved.contains(&p), "a connection got reserved port {p}");
    }
    // A service binding it (with SO_REUSEADDR, as every one the tests start does).
    let service = std::net::TcpListener::bind(("127.0.0.1", reserved[0])).unwrap();
    TcpStream::connect(service.local_addr().unwrap()).unwrap();
}

#[test]
fn sushy_on_a_taken_port_comes_up_on_another() {
    let dir = tempfile::tempdir().unwrap();
    let thief = PortThief::take();
    let (sushy, ports, starts) = start_past_a_thief("sushy-emulator", 1, &thief, |p| {
        Sushy::try_start(dir.path(), p[0])
    });
    assert_eq!(starts, 2, "the first start was not refused its port");
    assert_ne!(sushy.port, thief.port);
    assert_eq!(sushy.port, ports[0]);
    assert!(
        std::fs::read_to_string(dir.path().join("sushy.log")).is_ok_and(|l| !lost_its_port(&l)),
        "the log is the second start's"
    );
    TcpStream::connect(("127.0.0.1", sushy.port)).expect("the emulator listens");
}

#[test]
fn etcd_with_a_taken_port_forms_its_cluster_on_others() {
    let dir = tempfile::tempdir().unwrap();
    let thief = PortThief::take();
    let (etcd, ports, starts) = start_past_a_thief("etcd", 6, &thief, |p| {
        EtcdCluster::try_start(dir.path(), None, p)
    });
    assert_eq!(starts, 2, "the first start was not refused its port");
    assert!(!ports.contains(&thief.port));
    assert_eq!(etcd.ports(), ports[..3].to_vec());
    let out = std::process::Command::new("etcdctl")
        .args(["--endpoints", &etcd.clients.join(","), "put", "k", "v"])
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// Controller and agent daemons over tcp-transport whose controller is given a taken
/// port: `start_daemons` starts it again on new ports, in both configs.
fn daemons_past_a_thief(dir: &Path, on_http: bool) {
    let thief = PortThief::take();
    let tcp = if on_http { free_port() } else { thief.port };
    let (controller, agent, http) = write_configs(dir, &Transport::Tcp { port: tcp });
    let http = if on_http {
        // The API port taken instead: the config and its token move to the thief's.
        let text = std::fs::read_to_string(&controller).unwrap();
        let text = text.replace(
            &format!("127.0.0.1:{http}\""),
            &format!("127.0.0.1:{}\"", thief.port),
        );
        std::fs::write(&controller, text).unwrap();
        use_token(thief.port, &token_for(http).unwrap());
        thief.port
    } else {
        http
    };
    let daemons = start_daemons(dir, &controller, &agent, http);
    let log = std::fs::read_to_string(&daemons.log).unwrap();
    assert!(lost_its_port(&log), "the first start did not fail: {log}");
    let moved = tcp_transport_port(&std::fs::read_to_string(&controller).unwrap()).unwrap();
    assert_ne!(moved, tcp, "the transport port did not move");
    assert!(
        std::fs::read_to_string(&agent)
            .unwrap()
            .contains(&format!("127.0.0.1:{moved}\"")),
        "the agent's config did not follow"
    );
    assert_ne!(daemons.http, thief.port);
    assert_eq!(daemons.server, format!("http://127.0.0.1:{}", daemons.http));
    let (code, out, err) = cli(&daemons.server, &["agents"]);
    assert!(code == 0 && out.contains("build-1"), "{out}{err}");
}

#[test]
fn a_controller_whose_transport_port_is_taken_comes_up_on_another() {
    let dir = tempfile::tempdir().unwrap();
    daemons_past_a_thief(dir.path(), false);
}

#[test]
fn a_controller_whose_api_port_is_taken_comes_up_on_another() {
    let dir = tempfile::tempdir().unwrap();
    daemons_past_a_thief(dir.path(), true);
}

/// A controller killed and started again on its own ports (its agents know them) finds
/// its API port held by another process for a while: `restart_controller` tries again
/// on the same port until it is let go.
#[test]
fn a_restarted_controller_waits_out_a_process_holding_its_port() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (controller, _agent, http) = write_configs(dir, &Transport::Tcp { port: free_port() });
    // A port that was never connected to, so that the thief can hold it once the
    // controller is gone (a reserved one sits in TIME_WAIT, which only SO_REUSEADDR
    // binds past).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = std::fs::read_to_string(&controller).unwrap();
    std::fs::write(
        &controller,
        text.replace(
            &format!("127.0.0.1:{http}\""),
            &format!("127.0.0.1:{port}\""),
        ),
    )
    .unwrap();
    let log = dir.join("daemons.log");
    let mut first = restart_controller(&controller, &log);
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let thief = PortThief::hold(port).expect("the killed controller's port is free");
    let holder = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(1500));
        drop(thief);
    });
    let _again = restart_controller(&controller, &log);
    holder.join().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        lost_its_port(&text),
        "no start found the port taken: {text}"
    );
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "the controller does not serve on its own port: {text}"
    );
}

/// A glusterfs brick is given its port by glusterd and can lose it between glusterd's
/// check and its own bind, which cannot be made to happen on demand. What can: a brick
/// that is down (killed here) while another process holds its port. `start_bricks`
/// starts it again, and it comes up on a port of glusterd's choosing.
#[test]
fn a_gluster_brick_that_is_down_with_its_port_taken_comes_up_on_another() {
    let _one = GLUSTER_LOCK.blocking_lock();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let g = Gluster::start(dir, &Gluster::hostname(), &[]);
    let (port, pid) = g.brick(dir, "b1").expect("brick b1 online after the start");
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_until(
        "the killed brick is still shown online",
        std::time::Duration::from_secs(20),
        || !g.bricks_down(dir).is_empty(),
    );
    // Held by a listener on every address (the brick's connections left the port in
    // TIME_WAIT, which only SO_REUSEADDR binds past; std's listeners set it).
    let thief = std::net::TcpListener::bind(("0.0.0.0", port))
        .expect("the dead brick's port is free to take");
    g.start_bricks(dir);
    let (again, _) = g.brick(dir, "b1").expect("brick b1 online again");
    assert_ne!(again, port, "the brick came up on the port the thief holds");
    drop(thief);
    assert!(g.bricks_down(dir).is_empty());
}

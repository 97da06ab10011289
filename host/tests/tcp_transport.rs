//! The bundled TCP transport through the host's adapters: a controller-side listener and
//! an agent-side link, two instances of the plugin talking over loopback.

mod common;

use common::*;
use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis::points::transport::{self, Link};
use trellis::runtime::{ErrorKind, Plugin, PluginError};
use trellis::wit::command_transport::{Frame, Lane};

async fn plugin(dir: &std::path::Path, port: u16, granted: bool) -> Arc<Plugin> {
    let sockets = if granted {
        format!("sockets = {{ bind = [\"127.0.0.1:{port}\"], connect = [\"127.0.0.1:{port}\"] }}")
    } else {
        String::new()
    };
    let rt = runtime(
        &format!(
            "[plugins.tcp-transport]\n{sockets}\nconfig = {{ address = \"127.0.0.1:{port}\", connect-timeout-ms = 2000 }}\n"
        ),
        dir,
        &[],
    );
    rt.load(&bundle().join("tcp-transport"))
        .await
        .unwrap_or_else(|p| panic!("{p}"))
}

fn frame(lane: Lane, seq: u64, payload: Vec<u8>) -> Frame {
    Frame { lane, seq, payload }
}

/// Receive until `n` frames arrived (or give up after 10 s).
async fn receive_n(link: &Link, n: usize) -> Vec<Frame> {
    let mut got = Vec::new();
    let t = Instant::now();
    while got.len() < n && t.elapsed() < Duration::from_secs(10) {
        got.extend(link.receive(200).await.unwrap());
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_flow_both_ways_in_order_and_a_broken_link_is_retryable() {
    let d = tempfile::tempdir().unwrap();
    let port = free_port();
    let p = plugin(d.path(), port, true).await;
    let listener = transport::listen(p.clone()).await.unwrap();
    assert!(
        listener.accept(50).await.unwrap().is_none(),
        "nobody connected yet"
    );
    let agent = Arc::new(transport::connect(p.clone(), "agent-1").await.unwrap());
    let controller = listener
        .accept(2000)
        .await
        .unwrap()
        .expect("the agent's connection");

    // Until the controller's host has sent twice on a link (its challenge, then its
    // welcome to an agent that proved its secret) the agent is unauthenticated and may
    // send no record over 64 KiB: the handshake's two sends first.
    for seq in [0, 0] {
        controller
            .send(vec![frame(Lane::Control, seq, b"handshake".to_vec())])
            .await
            .unwrap();
    }
    assert_eq!(receive_n(&agent, 2).await.len(), 2);

    // agent -> controller: bulk 1..=50, a 5 MiB bulk frame, and control frames; sent from
    // another task, since a large send waits for the reader.
    let big: Vec<u8> = (0..5 << 20).map(|i| (i % 251) as u8).collect();
    let sender = {
        let agent = agent.clone();
        let big = big.clone();
        tokio::spawn(async move {
            let mut frames: Vec<Frame> = (1..=50)
                .map(|s| frame(Lane::Bulk, s, format!("line {s}").into_bytes()))
                .collect();
            frames.push(frame(Lane::Bulk, 51, big));
            frames.push(frame(Lane::Control, 1, b"heartbeat".to_vec()));
            agent.send(frames).await.unwrap();
            agent
                .send(vec![frame(Lane::Control, 2, b"step-done".to_vec())])
                .await
                .unwrap();
        })
    };
    let got = receive_n(&controller, 53).await;
    sender.await.unwrap();
    assert_eq!(got.len(), 53);
    let bulk: Vec<u64> = got
        .iter()
        .filter(|f| f.lane == Lane::Bulk)
        .map(|f| f.seq)
        .collect();
    assert_eq!(bulk, (1..=51).collect::<Vec<_>>(), "bulk frames in order");
    let control: Vec<u64> = got
        .iter()
        .filter(|f| f.lane == Lane::Control)
        .map(|f| f.seq)
        .collect();
    assert_eq!(control, vec![1, 2]);
    // within one send, the control frame was put on the wire ahead of the bulk ones
    let first_control = got.iter().position(|f| f.lane == Lane::Control).unwrap();
    assert_eq!(first_control, 0, "control first");
    assert_eq!(got.iter().find(|f| f.seq == 51).unwrap().payload, big);

    // controller -> agent
    controller
        .send(vec![frame(Lane::Control, 1, b"cancel".to_vec())])
        .await
        .unwrap();
    let back = receive_n(&agent, 1).await;
    assert_eq!(back[0].payload, b"cancel");

    // The agent goes away: the controller's next receive says the link broke, retryably.
    drop(agent);
    let t = Instant::now();
    let err = loop {
        match controller.receive(200).await {
            Err(e) => break e,
            Ok(f) => assert!(f.is_empty()),
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "a closed connection went unnoticed"
        );
    };
    assert_eq!(err.kind(), Some(ErrorKind::Retryable), "{err}");

    // An unauthenticated peer announcing a huge record is dropped from its length alone.
    let agent = transport::connect(p.clone(), "agent-1").await.unwrap();
    let controller = listener.accept(2000).await.unwrap().expect("connected");
    agent
        .send(vec![frame(Lane::Control, 0, vec![0; 100 << 10])])
        .await
        .unwrap();
    let t = Instant::now();
    let err = loop {
        match controller.receive(200).await {
            Err(e) => break e,
            Ok(f) => assert!(f.is_empty(), "a 100 KiB record taken before authentication"),
        }
        assert!(t.elapsed() < Duration::from_secs(5), "never refused");
    };
    assert!(
        err.to_string()
            .contains("before the peer was authenticated"),
        "{err}"
    );
    drop(agent);

    // Reconnect: a new connection is accepted and works.
    let agent = transport::connect(p.clone(), "agent-1").await.unwrap();
    let controller = listener.accept(2000).await.unwrap().expect("reconnected");
    agent
        .send(vec![frame(Lane::Control, 3, b"hello again".to_vec())])
        .await
        .unwrap();
    assert_eq!(receive_n(&controller, 1).await[0].payload, b"hello again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_not_granted_is_denied() {
    let d = tempfile::tempdir().unwrap();
    let port = free_port();
    let p = plugin(d.path(), port, false).await;
    for r in [
        transport::listen(p.clone()).await.err(),
        transport::connect(p.clone(), "a").await.err(),
    ] {
        match r {
            Some(PluginError::Plugin {
                kind: ErrorKind::Denied,
                message,
                ..
            }) => assert!(message.contains("not granted"), "{message}"),
            other => panic!("expected denied, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_controller_is_a_retryable_error() {
    let d = tempfile::tempdir().unwrap();
    let port = free_port();
    let p = plugin(d.path(), port, true).await;
    match transport::connect(p, "a").await.err() {
        Some(e) => assert_eq!(e.kind(), Some(ErrorKind::Retryable), "{e}"),
        None => panic!("connected to nothing"),
    }
}

//! The command-transport suite: one plugin as both ends (listen and connect, where its
//! configuration says), frames both ways as the contract says (wit/command-transport.wit).

use super::Suite;
use crate::points::transport::{self, Link, Listener};
use crate::runtime::Plugin;
use crate::wit::command_transport::{Frame, Lane};
use std::sync::Arc;
use std::time::{Duration, Instant};

const AGENT: &str = "conformance-agent";

fn frame(lane: Lane, seq: u64, payload: Vec<u8>) -> Frame {
    Frame { lane, seq, payload }
}

fn payload(lane: Lane, seq: u64, len: usize) -> Vec<u8> {
    let tag = format!("{lane:?}-{seq}:");
    let mut p = tag.into_bytes();
    p.extend((0..len).map(|i| (i % 251) as u8));
    p
}

/// Receive on `link` until `want` frames came (or `within` passed).
async fn receive_n(link: &Link, want: usize, within: Duration) -> Result<Vec<Frame>, String> {
    let t = Instant::now();
    let mut got = Vec::new();
    while got.len() < want {
        if t.elapsed() > within {
            return Err(format!(
                "{} of {want} frames arrived within {within:?}",
                got.len()
            ));
        }
        let frames = link
            .receive(200)
            .await
            .map_err(|e| format!("receive: {e}"))?;
        got.extend(frames);
    }
    Ok(got)
}

/// Frames as `seq "first bytes"`, for a failure's reason.
fn describe(frames: &[Frame]) -> String {
    let shown: Vec<String> = frames
        .iter()
        .take(8)
        .map(|f| {
            let head = &f.payload[..f.payload.len().min(24)];
            format!("{:?} {} {:?}", f.lane, f.seq, String::from_utf8_lossy(head))
        })
        .collect();
    let more = frames.len().saturating_sub(8);
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// The frames of one lane must be exactly `want` (seq and payload), in order.
fn lane_in_order(got: &[Frame], lane: Lane, want: &[Frame]) -> Result<(), String> {
    let mine: Vec<&Frame> = got.iter().filter(|f| f.lane == lane).collect();
    if mine.len() != want.len() {
        return Err(format!(
            "{:?} lane: {} frames, expected {}",
            lane,
            mine.len(),
            want.len()
        ));
    }
    for (g, w) in mine.iter().zip(want) {
        if g.seq != w.seq {
            return Err(format!(
                "{lane:?} lane: seq {} where {} belongs (a transport keeps the host's numbers and their order)",
                g.seq, w.seq
            ));
        }
        if g.payload != w.payload {
            return Err(format!(
                "{lane:?} lane: frame {} arrived with {} bytes, sent with {}, or changed",
                w.seq,
                g.payload.len(),
                w.payload.len()
            ));
        }
    }
    Ok(())
}

/// Connect an agent end, accept it at the listener, and exchange a first frame each
/// way, the controller first (as the host's handshake does: a transport may position
/// its reader for a new link only when it accepts it, so frames the agent sends before
/// it hears from the controller may be lost; the host resends those).
async fn pair(plugin: &Arc<Plugin>, listener: &Listener) -> Result<(Link, Link), String> {
    let agent = transport::connect(plugin.clone(), AGENT)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let t = Instant::now();
    let controller = loop {
        if let Some(c) = listener
            .accept(500)
            .await
            .map_err(|e| format!("accept: {e}"))?
        {
            break c;
        }
        if t.elapsed() > Duration::from_secs(20) {
            return Err("no agent accepted within 20 s of connect".into());
        }
    };
    let hello = frame(Lane::Control, 1, b"hello from the controller".to_vec());
    controller
        .send(vec![hello.clone()])
        .await
        .map_err(|e| format!("the controller's first send: {e}"))?;
    let got = receive_n(&agent, 1, Duration::from_secs(20))
        .await
        .map_err(|e| format!("the controller's first frame to the agent: {e}"))?;
    lane_in_order(&got, Lane::Control, &[hello])
        .map_err(|e| format!("{e}; what arrived: {}", describe(&got)))?;
    let answer = frame(Lane::Control, 1, b"hello from the agent".to_vec());
    agent
        .send(vec![answer.clone()])
        .await
        .map_err(|e| format!("the agent's first send: {e}"))?;
    let got = receive_n(&controller, 1, Duration::from_secs(20))
        .await
        .map_err(|e| format!("the agent's first frame to the controller: {e}"))?;
    lane_in_order(&got, Lane::Control, &[answer])
        .map_err(|e| format!("{e}; what arrived: {}", describe(&got)))?;
    Ok((agent, controller))
}

pub async fn suite(plugin: Arc<Plugin>) -> Suite {
    let mut s = Suite::new(format!("command-transport: {}", plugin.name));
    let mut listener = None;
    s.check("listen", async {
        listener = Some(
            transport::listen(plugin.clone())
                .await
                .map_err(|e| e.to_string())?,
        );
        Ok(String::new())
    })
    .await;
    let Some(listener) = listener else {
        s.blocked(
            "the rest of the suite",
            "cannot listen (grant the plugin its address with --config)",
        );
        return s;
    };
    let mut links = None;
    s.check(
        "connect, the listener accepts, a first frame each way",
        async {
            links = Some(pair(&plugin, &listener).await?);
            Ok(String::new())
        },
    )
    .await;
    let Some((agent, controller)) = links else {
        s.blocked("the rest of the suite", "no link");
        return s;
    };

    s.check(
        "frames arrive in order per lane with their seqs, both ways",
        async {
            // Agent → controller: control 2..=41 (1 was its hello), bulk 1..=40, interleaved.
            let control: Vec<Frame> = (2..=41)
                .map(|i| frame(Lane::Control, i, payload(Lane::Control, i, 64)))
                .collect();
            let bulk: Vec<Frame> = (1..=40)
                .map(|i| frame(Lane::Bulk, i, payload(Lane::Bulk, i, 4096)))
                .collect();
            for (c, b) in control.chunks(5).zip(bulk.chunks(5)) {
                let mut batch = Vec::new();
                for (x, y) in c.iter().zip(b) {
                    batch.push(y.clone());
                    batch.push(x.clone());
                }
                agent
                    .send(batch)
                    .await
                    .map_err(|e| format!("agent send: {e}"))?;
            }
            let got = receive_n(&controller, 80, Duration::from_secs(20)).await?;
            lane_in_order(&got, Lane::Control, &control)
                .map_err(|e| format!("to the controller: {e}"))?;
            lane_in_order(&got, Lane::Bulk, &bulk)
                .map_err(|e| format!("to the controller: {e}"))?;
            // Controller → agent (1 was its hello).
            let down: Vec<Frame> = (2..=31)
                .map(|i| frame(Lane::Control, i, payload(Lane::Control, i, 100)))
                .collect();
            controller
                .send(down.clone())
                .await
                .map_err(|e| format!("controller send: {e}"))?;
            let got = receive_n(&agent, 30, Duration::from_secs(20)).await?;
            lane_in_order(&got, Lane::Control, &down).map_err(|e| format!("to the agent: {e}"))?;
            Ok("80 frames up, 30 down".into())
        },
    )
    .await;
    s.check("a 1.5 MB frame arrives whole", async {
        let big = frame(Lane::Bulk, 41, payload(Lane::Bulk, 41, 1_500_000));
        // Sent and received at once, as two processes would: a stream transport's send
        // blocks while the peer's buffer is full.
        let (sent, got) = tokio::join!(
            agent.send(vec![big.clone()]),
            receive_n(&controller, 1, Duration::from_secs(30))
        );
        sent.map_err(|e| format!("send: {e}"))?;
        let got = got?;
        lane_in_order(&got, Lane::Bulk, &[big])?;
        Ok(String::new())
    })
    .await;
    s.check(
        "a control frame is not stuck behind bulk frames queued before it",
        async {
            let mut batch: Vec<Frame> = (42..=49)
                .map(|i| frame(Lane::Bulk, i, payload(Lane::Bulk, i, 1 << 20)))
                .collect();
            let cancel = frame(Lane::Control, 42, b"cancel".to_vec());
            batch.push(cancel.clone());
            let (sent, got) = tokio::join!(
                agent.send(batch.clone()),
                receive_n(&controller, 9, Duration::from_secs(60))
            );
            sent.map_err(|e| format!("send: {e}"))?;
            let got = got?;
            let at = got
                .iter()
                .position(|f| f.lane == Lane::Control)
                .ok_or("the control frame did not arrive")?;
            lane_in_order(&got, Lane::Bulk, &batch[..8])?;
            if at == got.len() - 1 {
                return Err(
                    "the control frame arrived after every bulk frame sent before it in the same call: control must overtake queued bulk"
                        .into(),
                );
            }
            Ok(format!("arrived {} of 9", at + 1))
        },
    )
    .await;
    s.check("commit is accepted", async {
        controller
            .commit(Lane::Control, 42)
            .await
            .map_err(|e| format!("control: {e}"))?;
        controller
            .commit(Lane::Bulk, 49)
            .await
            .map_err(|e| format!("bulk: {e}"))?;
        Ok(String::new())
    })
    .await;
    if controller.is_event_driven() && agent.is_event_driven() {
        s.check(
            "readiness (0.3.0): the pollable wakes the host for every frame, and receive returns them all",
            async {
                // Whatever earlier checks left is taken first; then the link is idle.
                let _ = controller.receive(0).await;
                let _ = agent.receive(0).await;
                for (round, n) in [(0u64, 1u64), (1, 7)] {
                    let first = 60 + round * 10;
                    let batch: Vec<Frame> = (first..first + n)
                        .map(|i| frame(Lane::Control, i, payload(Lane::Control, i, 32)))
                        .collect();
                    agent
                        .send(batch.clone())
                        .await
                        .map_err(|e| format!("agent send: {e}"))?;
                    // Only the host's wait on the pollable: no receive until it is ready.
                    let mut got = Vec::new();
                    let t = Instant::now();
                    while got.len() < batch.len() {
                        let left = Duration::from_secs(20).saturating_sub(t.elapsed());
                        if left.is_zero() {
                            return Err(format!(
                                "{} of {} frames arrived within 20 s of the pollable's wakeups (a pollable that is not ready while frames wait, or a receive that keeps complete frames back)",
                                got.len(),
                                batch.len()
                            ));
                        }
                        let _ = tokio::time::timeout(left, controller.readable()).await;
                        got.extend(
                            controller
                                .receive_ready(false, Duration::ZERO)
                                .await
                                .map_err(|e| format!("receive: {e}"))?,
                        );
                    }
                    lane_in_order(&got, Lane::Control, &batch)?;
                }
                Ok(String::new())
            },
        )
        .await;
    }
    drop(agent);
    drop(controller);
    let mut relinked = None;
    s.check("a new link after a dropped one", async {
        relinked = Some(pair(&plugin, &listener).await?);
        Ok(String::new())
    })
    .await;
    let Some((_agent, controller)) = relinked else {
        s.blocked("committed frames are not delivered again", "no new link");
        return s;
    };
    // Everything the controller received above was committed: a transport that keeps a
    // read position (Kafka) must resume after it, not deliver those frames again.
    // (Uncommitted frames may come again; the host's session drops what it has seen.)
    s.check(
        "committed frames are not delivered again on a new link",
        async {
            let t = Instant::now();
            let mut again = Vec::new();
            while t.elapsed() < Duration::from_millis(1500) {
                again.extend(
                    controller
                        .receive(200)
                        .await
                        .map_err(|e| format!("receive: {e}"))?,
                );
            }
            if again.is_empty() {
                Ok("none in 1.5 s".into())
            } else {
                Err(format!(
                    "{} frame(s) came again after commit: {}",
                    again.len(),
                    describe(&again)
                ))
            }
        },
    )
    .await;
    s
}

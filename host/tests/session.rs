//! The session layer over the real TCP transport: the agent's secret handshake, and a
//! stream of output that survives the link being cut mid-way, every message delivered
//! exactly once and in order.

mod common;

use common::*;
use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis::points::transport::{self, Link, Listener};
use trellis::runtime::Plugin;
use trellis::session::Session;
use trellis::session::link::{
    AgentSession, HandshakeError, LinkDown, Liveness, challenge, exchange, introduce, welcome,
};
use trellis::session::seal::LinkSeal;
use trellis::wit::command_transport::Lane;

async fn tcp(dir: &std::path::Path) -> Arc<Plugin> {
    let port = free_port();
    let rt = runtime(
        &format!(
            "[plugins.tcp-transport]\nsockets = {{ bind = [\"127.0.0.1:{port}\"], connect = [\"127.0.0.1:{port}\"] }}\nconfig = {{ address = \"127.0.0.1:{port}\" }}\n"
        ),
        dir,
        &[],
    );
    rt.load(&bundle().join("tcp-transport")).await.unwrap()
}

fn secrets(name: &str) -> Option<String> {
    (name == "agent-1").then(|| "right-secret".to_string())
}

/// Connect an agent and run both ends of the handshake.
async fn handshake(
    p: &Arc<Plugin>,
    listener: &Listener,
    agent: &str,
    secret: &str,
    a: &mut AgentSession,
    c: &mut Session,
) -> Result<(Link, Link, LinkSeal, LinkSeal), (HandshakeError, Option<HandshakeError>)> {
    let agent_link = transport::connect(p.clone(), agent).await.unwrap();
    let controller_link = listener.accept(2000).await.unwrap().expect("accepted");
    let labels = ["linux".to_string()];
    let (agent_side, controller_side) = tokio::join!(
        introduce(&agent_link, agent, &labels, &[], 1, secret, vec![], a),
        async {
            let accepted = challenge(&controller_link, "epoch-1", secrets).await?;
            c.resync(accepted.hello.received);
            let seal = welcome(&controller_link, &accepted, c.received(), 0).await?;
            Ok::<_, HandshakeError>((accepted.hello, seal))
        }
    );
    match (agent_side, controller_side) {
        (Ok(introduced), Ok((hello, controller_seal))) => {
            assert_eq!(hello.labels, vec!["linux"]);
            Ok((
                agent_link,
                controller_link,
                introduced.seal,
                controller_seal,
            ))
        }
        (Err(e), c) => Err((e, c.err())),
        (Ok(_), Err(e)) => panic!("controller failed but the agent was welcomed: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_unknown_agent_is_refused_with_the_reason_on_both_sides() {
    let d = tempfile::tempdir().unwrap();
    let p = tcp(d.path()).await;
    let listener = transport::listen(p.clone()).await.unwrap();
    let (mut a, mut c) = (AgentSession::new(), Session::default());
    let (agent_err, controller_err) = handshake(&p, &listener, "agent-1", "wrong", &mut a, &mut c)
        .await
        .err()
        .expect("refused");
    assert!(
        agent_err
            .to_string()
            .contains("refused agent `agent-1`: wrong secret"),
        "{agent_err}"
    );
    assert!(
        matches!(controller_err, Some(HandshakeError::WrongSecret { .. })),
        "{controller_err:?}"
    );
    let (agent_err, controller_err) = handshake(&p, &listener, "intruder", "x", &mut a, &mut c)
        .await
        .err()
        .expect("refused");
    assert!(
        agent_err.to_string().contains("unknown agent `intruder`"),
        "{agent_err}"
    );
    assert!(matches!(
        controller_err,
        Some(HandshakeError::UnknownAgent { .. })
    ));
    // and the right secret is welcomed
    assert!(
        handshake(&p, &listener, "agent-1", "right-secret", &mut a, &mut c)
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_survives_a_cut_link_exactly_once_in_order() {
    let d = tempfile::tempdir().unwrap();
    let p = tcp(d.path()).await;
    let listener = transport::listen(p.clone()).await.unwrap();
    const N: usize = 20_000;
    let line = |i: usize| format!("line {i} {}", "x".repeat(1000));

    // The controller: accept, check the agent, pump until everything arrived.
    let controller = tokio::spawn(async move {
        let mut session = Session::default();
        let mut got: Vec<(Lane, Vec<u8>)> = Vec::new();
        let mut links = 0;
        let t = Instant::now();
        while got.len() < N + 1 {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "controller stalled at {} messages",
                got.len()
            );
            let Some(link) = listener.accept(500).await.unwrap() else {
                continue;
            };
            let Ok(accepted) = challenge(&link, "epoch-1", secrets).await else {
                continue;
            };
            session.resync(accepted.hello.received);
            let Ok(mut seal) = welcome(&link, &accepted, session.received(), 0).await else {
                continue;
            };
            links += 1;
            let mut live = Liveness::new(Duration::from_secs(1));
            while got.len() < N + 1
                && exchange(
                    &mut session,
                    &link,
                    &mut seal,
                    &mut live,
                    20,
                    true,
                    &mut got,
                )
                .await
                .is_ok()
            {}
            // let the last acks out
            for _ in 0..5 {
                let _ = exchange(
                    &mut session,
                    &link,
                    &mut seal,
                    &mut live,
                    20,
                    true,
                    &mut got,
                )
                .await;
            }
        }
        (got, links)
    });

    // The agent: queue a step's output, then keep (re)connecting; the first three links
    // are cut after a few rounds, mid-stream.
    let mut agent = AgentSession::new();
    for i in 0..N {
        agent.session.queue(Lane::Bulk, line(i).into_bytes());
    }
    agent.session.queue(Lane::Control, b"step-done".to_vec());
    let mut cuts = 0;
    let t = Instant::now();
    while agent.session.unacked() > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "agent stalled with {} unacknowledged",
            agent.session.unacked()
        );
        let link = match transport::connect(p.clone(), "agent-1").await {
            Ok(l) => l,
            Err(_) => continue,
        };
        let Ok(introduced) = introduce(
            &link,
            "agent-1",
            &[],
            &[],
            1,
            "right-secret",
            vec![],
            &mut agent,
        )
        .await
        else {
            continue;
        };
        let mut seal = introduced.seal;
        let rounds = if cuts < 3 { 4 } else { usize::MAX };
        let mut sink = Vec::new();
        let mut live = Liveness::new(Duration::from_secs(1));
        for _ in 0..rounds {
            if agent.session.unacked() == 0
                || exchange(
                    &mut agent.session,
                    &link,
                    &mut seal,
                    &mut live,
                    20,
                    true,
                    &mut sink,
                )
                .await
                .is_err()
            {
                break;
            }
        }
        if agent.session.unacked() > 0 {
            cuts += 1; // the agent's connection dies with frames in flight
        }
        drop(link);
    }
    let (got, links) = controller.await.unwrap();
    assert!(
        cuts >= 3 && links >= 4,
        "the link was cut mid-stream ({cuts} cuts, {links} links)"
    );
    let lines: Vec<String> = got
        .iter()
        .filter(|(l, _)| *l == Lane::Bulk)
        .map(|(_, p)| String::from_utf8(p.clone()).unwrap())
        .collect();
    assert_eq!(lines.len(), N, "no line lost or duplicated");
    assert!(
        lines.iter().enumerate().all(|(i, l)| *l == line(i)),
        "in order"
    );
    assert_eq!(got.iter().filter(|(l, _)| *l == Lane::Control).count(), 1);
}

/// Heartbeats keep an idle link up; a peer that falls silent (frozen, or a half-open
/// connection) is noticed within 5 intervals, instead of being waited on forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_links_heartbeat_and_a_silent_peer_is_given_up() {
    let d = tempfile::tempdir().unwrap();
    let p = tcp(d.path()).await;
    let listener = transport::listen(p.clone()).await.unwrap();
    let (mut a, mut c) = (AgentSession::new(), Session::default());
    let (agent_link, controller_link, mut agent_seal, mut controller_seal) =
        handshake(&p, &listener, "agent-1", "right-secret", &mut a, &mut c)
            .await
            .expect("welcomed");
    let interval = Duration::from_millis(50);
    let (mut agent_live, mut controller_live) = (Liveness::new(interval), Liveness::new(interval));
    let mut sink = Vec::new();
    // Both sides idle for 20 intervals, each heartbeating: the link stays up.
    let t = Instant::now();
    while t.elapsed() < interval * 20 {
        exchange(
            &mut a.session,
            &agent_link,
            &mut agent_seal,
            &mut agent_live,
            5,
            true,
            &mut sink,
        )
        .await
        .expect("an idle agent link with heartbeats stays up");
        exchange(
            &mut c,
            &controller_link,
            &mut controller_seal,
            &mut controller_live,
            5,
            true,
            &mut sink,
        )
        .await
        .expect("an idle controller link with heartbeats stays up");
    }
    assert!(sink.is_empty(), "heartbeats are not messages");
    // The controller freezes (keeps the connection open, says nothing).
    let t = Instant::now();
    let err = loop {
        match exchange(
            &mut a.session,
            &agent_link,
            &mut agent_seal,
            &mut agent_live,
            5,
            true,
            &mut sink,
        )
        .await
        {
            Ok(()) => assert!(t.elapsed() < Duration::from_secs(5), "never noticed"),
            Err(e) => break e,
        }
    };
    assert!(matches!(err, LinkDown::Silent(_)), "{err}");
    let took = t.elapsed();
    assert!(
        took >= interval * 4 && took < interval * 5 + Duration::from_millis(500),
        "gave up after {took:?}"
    );
    drop(controller_link);
}

/// An idle agent wakes about once per interval, and the controller still hears from it
/// every interval. Two things make it so, and the test fails without either (two wakes
/// per interval): the agent answers the controller's heartbeat in the round that woke
/// for it (`Liveness::answering`) instead of on a timer of its own racing it, and
/// tcp-transport's `receive` reads until the stream is drained, which is what ends the
/// host's wait on the channel (otherwise every message woke the link a second time, to
/// find nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_agent_answers_heartbeats_and_wakes_once_per_interval() {
    let d = tempfile::tempdir().unwrap();
    let p = tcp(d.path()).await;
    let listener = transport::listen(p.clone()).await.unwrap();
    let (mut a, mut c) = (AgentSession::new(), Session::default());
    let (agent_link, controller_link, mut agent_seal, mut controller_seal) =
        handshake(&p, &listener, "agent-1", "right-secret", &mut a, &mut c)
            .await
            .expect("welcomed");
    assert!(
        agent_link.is_event_driven(),
        "the bundle's tcp-transport has readiness"
    );
    const INTERVALS: u32 = 30;
    let interval = Duration::from_millis(100);
    let stop = Instant::now() + interval * INTERVALS;
    // Each side as the daemons run it: a round, then sleep until the link is readable
    // or something is due.
    let controller = tokio::spawn(async move {
        let mut live = Liveness::new(interval);
        let mut sink = Vec::new();
        let mut heard = live.last_heard();
        let mut longest = Duration::ZERO;
        while Instant::now() < stop {
            exchange(
                &mut c,
                &controller_link,
                &mut controller_seal,
                &mut live,
                0,
                true,
                &mut sink,
            )
            .await
            .expect("the controller's side stays up");
            if live.last_heard() != heard {
                longest = longest.max(live.last_heard() - heard);
                heard = live.last_heard();
            }
            tokio::select! {
                _ = controller_link.readable() => {}
                _ = tokio::time::sleep_until(live.next_due().min(stop).into()) => {}
            }
        }
        longest
    });
    let mut live = Liveness::answering(interval);
    let mut sink = Vec::new();
    let mut rounds = 0u32;
    while Instant::now() < stop {
        exchange(
            &mut a.session,
            &agent_link,
            &mut agent_seal,
            &mut live,
            0,
            true,
            &mut sink,
        )
        .await
        .expect("the agent's side stays up");
        rounds += 1;
        tokio::select! {
            _ = agent_link.readable() => {}
            _ = tokio::time::sleep_until(live.next_due().min(stop).into()) => {}
        }
    }
    let longest = controller.await.unwrap();
    assert!(sink.is_empty(), "heartbeats are not messages");
    // Once per interval, give or take a few: twice as many without answering.
    assert!(
        rounds <= INTERVALS + INTERVALS / 4,
        "the idle agent woke {rounds} times in {INTERVALS} intervals"
    );
    assert!(
        longest <= interval + interval / 2,
        "the controller went {longest:?} without hearing from the agent (interval {interval:?})"
    );
}

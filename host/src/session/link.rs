//! Driving a `Session` over a transport `Link`: the handshake, and the exchange rounds.
//!
//! Handshake (all seq-0 signals on the control lane):
//!
//! ```text
//! controller -> agent   CHALLENGE  nc(32) epoch                (epoch: this controller process)
//! agent -> controller   HELLO      mac(32) {agent, labels, nonce: na, received, session, ...}
//! controller -> agent   WELCOME    mac(32) {received, token}   or   REFUSED reason
//! ```
//!
//! The HELLO's MAC proves the agent's secret over the challenge and every byte of the
//! HELLO; the WELCOME's proves it back over the whole transcript and every byte of the
//! WELCOME (its fencing token included). Then both sides key the link (`seal`) and
//! every later frame, signals included, is sealed. No handshake frame may exceed
//! `seal::MAX_HANDSHAKE_FRAME`. The threat model is in `seal`'s docs.
//!
//! Sessions outlive links, and the agent's side outlives the controller process: an
//! agent that sees a new controller epoch forgets what it received from the old one (the
//! new process numbers from 1 again) but keeps every message of its own the old one had
//! not acknowledged; the new controller, knowing nothing, takes the agent's
//! `acked` as where the agent's messages resume. So a run's output survives a
//! controller restart: what was acknowledged was handled, the rest is sent again. A
//! controller that sees a new agent session id (a restarted agent process) starts that
//! session afresh.

use super::seal::{self, Challenge, LinkSeal, MAX_HANDSHAKE_FRAME, Side, Unsealed};
use super::{Incoming, Session, auth, signal};
use crate::points::transport::Link;
use crate::runtime::PluginError;
use crate::wit::command_transport::{Frame, Lane};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent's introduction, answering the controller's challenge. On the wire it
/// follows its MAC (`seal::hello_mac`), which covers every byte of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub agent: String,
    pub labels: Vec<String>,
    /// The agent's own fresh nonce `na`, hex (see `seal`).
    pub nonce: String,
    /// How far the agent has received, per lane (control, bulk).
    pub received: [u64; 2],
    /// Identifies the agent process (random per process).
    pub session: String,
    /// Per lane, the last of the agent's messages the controller acknowledged; the agent
    /// still holds everything after it (`Session::acked_through`).
    #[serde(default)]
    pub acked: [u64; 2],
    /// The runs this agent process has been given, so a restarted controller can tell
    /// a run the agent is working on from one whose order never reached it.
    #[serde(default)]
    pub runs: Vec<String>,
    /// The agent-side logging methods this agent has loaded: runs logged with one of
    /// them are placed only on agents that have it.
    #[serde(default)]
    pub log_methods: Vec<String>,
    /// How many runs the agent runs at once (`[agent] executors`); an agent from before
    /// the queue says nothing and has one.
    #[serde(default = "one_executor")]
    pub executors: u32,
}

fn one_executor() -> u32 {
    1
}

/// The controller's answer; on the wire it follows its MAC (`seal::welcome_mac`).
#[derive(Debug, Serialize, Deserialize)]
struct Welcome {
    received: [u64; 2],
    /// The controller's fencing token (0: no HA); see `ha::token`.
    #[serde(default)]
    token: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the controller refused agent `{agent}`: {reason}")]
    Refused { agent: String, reason: String },
    #[error("agent `{agent}` presented a wrong secret; it was told so and disconnected")]
    WrongSecret { agent: String },
    #[error("unknown agent `{agent}`: add it to the controller's agents, with its secret")]
    UnknownAgent { agent: String },
    #[error(
        "the controller did not prove agent `{agent}`'s secret: its welcome does not verify, so this is not the controller configured with this agent's secret (check that the agent's `secret` matches the controller's [agents] entry) or something in between altered the handshake; taking no orders from it"
    )]
    ControllerNotAuthentic { agent: String },
    #[error(
        "a handshake frame of {0} bytes: at most 64 KiB are taken before the peer is authenticated"
    )]
    TooLarge(usize),
    #[error("no handshake within {0:?}")]
    Timeout(Duration),
    #[error("handshake: unexpected message ({0})")]
    Protocol(String),
    #[error(transparent)]
    Link(#[from] PluginError),
}

fn sig(kind: u8, body: &[u8]) -> Frame {
    let mut payload = Vec::with_capacity(body.len() + 1);
    payload.push(kind);
    payload.extend_from_slice(body);
    Frame {
        lane: Lane::Control,
        seq: 0,
        payload,
    }
}

/// A signal whose body is a MAC and then the bytes it covers.
fn macd(kind: u8, mac: &[u8; 32], body: &[u8]) -> Frame {
    sig(kind, &[&mac[..], body].concat())
}

/// Split a MAC'd signal (kind byte already checked) into its MAC and body.
fn split_mac(msg: &[u8], what: &str) -> Result<([u8; 32], Vec<u8>), HandshakeError> {
    if msg.len() < 33 {
        return Err(HandshakeError::Protocol(format!(
            "a {what} without its MAC"
        )));
    }
    let mac: [u8; 32] = msg[1..33].try_into().expect("32 bytes");
    Ok((mac, msg[33..].to_vec()))
}

/// Wait for the next link-local signal (frames with seq 0). Frames that came after it in
/// the same batch go to `after`: a transport that delivers in batches (Kafka) can hand
/// over the welcome together with the controller's first messages, and dropping those
/// would leave a gap the session never fills. Until the peer is authenticated, any
/// frame over `MAX_HANDSHAKE_FRAME` ends the handshake.
///
/// The link decides how to wait (`Link::receive_ready`, `Link::readable`): on its
/// transport's readiness, or polling one without it (the controller's accepted links
/// share the listener's instance, so those never wait inside the plugin and a peer that
/// says nothing holds it for no one else's handshake or link).
async fn next_signal(
    link: &Link,
    deadline: Instant,
    after: &mut Vec<Frame>,
) -> Result<Vec<u8>, HandshakeError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HandshakeError::Timeout(HANDSHAKE_TIMEOUT));
        }
        let frames = link
            .receive_ready(false, left.min(Duration::from_millis(500)))
            .await?;
        if frames.is_empty() {
            let _ = tokio::time::timeout(left, link.readable()).await;
        }
        let mut frames = frames.into_iter();
        while let Some(f) = frames.next() {
            if f.payload.len() > MAX_HANDSHAKE_FRAME {
                return Err(HandshakeError::TooLarge(f.payload.len()));
            }
            if f.seq == 0 && f.payload.first() != Some(&signal::HEARTBEAT) {
                after.extend(frames);
                return Ok(f.payload);
            }
        }
    }
}

/// A HELLO that verified: the agent holds its secret. What `welcome` needs to answer
/// it and key the link.
pub struct Accepted {
    pub hello: Hello,
    secret: String,
    nc: [u8; 32],
    na: [u8; 32],
    transcript: [u8; 32],
}

/// Controller side: challenge a new link and check the agent's proof. `epoch`
/// identifies this controller process; `secret_of` gives an agent's secret (None:
/// unknown agent). On success the caller resyncs the agent's session with
/// `hello.received` (afresh if `hello.session` is new) and calls `welcome`.
pub async fn challenge(
    link: &Link,
    epoch: &str,
    secret_of: impl Fn(&str) -> Option<String>,
) -> Result<Accepted, HandshakeError> {
    let ch = Challenge {
        nonce: auth::nonce(),
        epoch: epoch.to_string(),
    };
    let mut body = ch.nonce.to_vec();
    body.extend_from_slice(epoch.as_bytes());
    link.send(vec![sig(signal::CHALLENGE, &body)]).await?;
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    // The agent sends nothing else before it is welcomed.
    let msg = next_signal(link, deadline, &mut Vec::new()).await?;
    if msg.first() != Some(&signal::HELLO) {
        return Err(HandshakeError::Protocol("expected hello".into()));
    }
    let (mac, body) = split_mac(&msg, "hello")?;
    // Parsed before it is verified, to learn whose secret verifies it: bounded above.
    let hello: Hello = serde_json::from_slice(&body)
        .map_err(|e| HandshakeError::Protocol(format!("bad hello: {e}")))?;
    let Some(secret) = secret_of(&hello.agent) else {
        let reason = format!("unknown agent `{}`", hello.agent);
        let _ = link
            .send(vec![sig(signal::REFUSED, reason.as_bytes())])
            .await;
        return Err(HandshakeError::UnknownAgent { agent: hello.agent });
    };
    let na: Option<[u8; 32]> = hex::decode(&hello.nonce)
        .ok()
        .and_then(|n| n.try_into().ok());
    let verified = auth::same(&seal::hello_mac(&secret, &ch, &body), &mac);
    let (true, Some(na)) = (verified, na) else {
        let reason = format!("wrong secret for agent `{}`", hello.agent);
        let _ = link
            .send(vec![sig(signal::REFUSED, reason.as_bytes())])
            .await;
        return Err(HandshakeError::WrongSecret { agent: hello.agent });
    };
    let transcript = seal::transcript(&ch, &body, &mac);
    Ok(Accepted {
        hello,
        secret,
        nc: ch.nonce,
        na,
        transcript,
    })
}

/// Controller side: accept the agent, telling it how far this side has received, with
/// the proof that this side holds the secret too. Returns the link's keys: every frame
/// from now on is sealed.
pub async fn welcome(
    link: &Link,
    accepted: &Accepted,
    received: [u64; 2],
    token: u64,
) -> Result<LinkSeal, HandshakeError> {
    let body = serde_json::to_vec(&Welcome { received, token }).expect("serialisable");
    let mac = seal::welcome_mac(&accepted.secret, &accepted.transcript, &body);
    link.send(vec![macd(signal::WELCOME, &mac, &body)]).await?;
    Ok(LinkSeal::derive(
        &accepted.secret,
        &accepted.nc,
        &accepted.na,
        &accepted.transcript,
        Side::Controller,
    ))
}

/// The agent's side of its session with the controller.
#[derive(Debug)]
pub struct AgentSession {
    pub session: Session,
    /// Random per agent process (see `Hello::session`).
    pub id: String,
    /// The controller process last talked to.
    pub controller_epoch: Option<String>,
    /// Its fencing token, from its (authenticated) welcome (0: no HA).
    pub controller_token: u64,
}

impl AgentSession {
    pub fn new() -> AgentSession {
        AgentSession {
            session: Session::default(),
            id: hex::encode(&auth::nonce()[..8]),
            controller_epoch: None,
            controller_token: 0,
        }
    }
}

impl Default for AgentSession {
    fn default() -> Self {
        Self::new()
    }
}

/// A welcomed agent link: its keys, and the frames that arrived right behind the
/// welcome (still sealed), for the caller to open and take like any others.
#[derive(Debug)]
pub struct Introduced {
    pub seal: LinkSeal,
    pub early: Vec<Frame>,
}

/// Agent side: answer the challenge, check the controller's proof, then resync the
/// session with the controller (afresh if the controller is a new process). Nothing of
/// the session changes until the controller proved the secret.
// What the agent declares (labels, logging methods, executors) is passed as it is
// configured, each explicit at the call.
#[allow(clippy::too_many_arguments)]
pub async fn introduce(
    link: &Link,
    agent: &str,
    labels: &[String],
    log_methods: &[String],
    executors: u32,
    secret: &str,
    runs: Vec<String>,
    s: &mut AgentSession,
) -> Result<Introduced, HandshakeError> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let mut after = Vec::new();
    let msg = next_signal(link, deadline, &mut after).await?;
    if msg.first() != Some(&signal::CHALLENGE) || msg.len() < 33 {
        return Err(HandshakeError::Protocol("expected a challenge".into()));
    }
    let (nonce, epoch) = msg[1..].split_at(32);
    let ch = Challenge {
        nonce: nonce.try_into().expect("32 bytes"),
        epoch: String::from_utf8_lossy(epoch).into_owned(),
    };
    let na = auth::nonce();
    let restarted = s.controller_epoch.as_ref().is_some_and(|e| *e != ch.epoch);
    let mut received = s.session.received();
    if restarted {
        received = [0; 2]; // what `peer_restarted` will make it, once this one is proven
    }
    let hello = Hello {
        agent: agent.to_string(),
        labels: labels.to_vec(),
        nonce: hex::encode(na),
        received,
        session: s.id.clone(),
        acked: s.session.acked_through(),
        runs,
        log_methods: log_methods.to_vec(),
        executors,
    };
    let body = serde_json::to_vec(&hello).expect("serialisable");
    let mac = seal::hello_mac(secret, &ch, &body);
    link.send(vec![macd(signal::HELLO, &mac, &body)]).await?;
    after.clear(); // before our hello nothing is for this session
    let msg = next_signal(link, deadline, &mut after).await?;
    match msg.first() {
        Some(&signal::WELCOME) => {
            let (welcome_mac, welcome_body) = split_mac(&msg, "welcome")?;
            let transcript = seal::transcript(&ch, &body, &mac);
            if !auth::same(
                &seal::welcome_mac(secret, &transcript, &welcome_body),
                &welcome_mac,
            ) {
                return Err(HandshakeError::ControllerNotAuthentic {
                    agent: agent.to_string(),
                });
            }
            let w: Welcome = serde_json::from_slice(&welcome_body)
                .map_err(|e| HandshakeError::Protocol(format!("bad welcome: {e}")))?;
            if restarted {
                tracing::info!(
                    agent,
                    "the controller restarted: resending what it had not acknowledged"
                );
                s.session.peer_restarted();
            }
            s.controller_epoch = Some(ch.epoch);
            s.session.resync(w.received);
            s.controller_token = w.token;
            Ok(Introduced {
                seal: LinkSeal::derive(secret, &ch.nonce, &na, &transcript, Side::Agent),
                early: after,
            })
        }
        Some(&signal::REFUSED) => Err(HandshakeError::Refused {
            agent: agent.to_string(),
            reason: String::from_utf8_lossy(&msg[1..]).into_owned(),
        }),
        _ => Err(HandshakeError::Protocol(
            "expected welcome or refusal".into(),
        )),
    }
}

/// Bulk bytes put on the wire per round, so control frames never wait long behind an
/// artifact.
pub const BULK_PER_ROUND: usize = 1 << 20;

/// Tell the transport that everything received so far has been handled (a transport
/// with a durable medium, like Kafka, moves its committed read position). `done` is
/// how far this link has committed, per lane. A failed commit is only logged: the
/// frames are handled, and at worst a later reader skips them as duplicates.
pub async fn commit_handled(session: &Session, link: &Link, done: &mut [u64; 2]) {
    for (i, lane) in super::LANES.into_iter().enumerate() {
        let received = session.received()[i];
        if received > done[i] {
            match link.commit(lane, received).await {
                Ok(()) => done[i] = received,
                Err(e) => tracing::warn!("committing the transport's read position: {e}"),
            }
        }
    }
}

/// How often an idle side says it is alive, unless configured otherwise.
pub use crate::config::defaults::DEFAULT_HEARTBEAT;

/// A link silent for this many heartbeat intervals is given up.
pub const SILENT_INTERVALS: u32 = 5;

/// Keeps one link honest. An idle side sends a heartbeat each interval; a side that has
/// heard nothing for `SILENT_INTERVALS` intervals gives the link up, so a half-open TCP
/// connection or a frozen peer is noticed instead of waited on forever.
///
/// An *answering* side (the agent) sends its heartbeat when it hears from its peer and
/// half an interval has passed since it last sent, in the round that woke it anyway; its
/// own timer is a fallback a quarter interval later than usual. An idle agent then wakes
/// once per interval (for the controller's heartbeat) instead of twice (that and its own
/// timer, which race each other by a millisecond), and the controller still hears from
/// it every interval.
#[derive(Debug)]
pub struct Liveness {
    interval: Duration,
    last_heard: Instant,
    last_sent: Instant,
    answering: bool,
}

impl Liveness {
    pub fn new(interval: Duration) -> Liveness {
        let now = Instant::now();
        Liveness {
            interval,
            last_heard: now,
            last_sent: now,
            answering: false,
        }
    }

    /// A side that answers its peer's heartbeats (see the type's docs).
    pub fn answering(interval: Duration) -> Liveness {
        Liveness {
            answering: true,
            ..Liveness::new(interval)
        }
    }

    /// When this side last heard from its peer.
    pub fn last_heard(&self) -> Instant {
        self.last_heard
    }

    /// How long after the last frame sent a heartbeat is due on this side's own timer.
    fn heartbeat_after(&self) -> Duration {
        if self.answering {
            self.interval + self.interval / 4
        } else {
            self.interval
        }
    }

    /// Whether a heartbeat is due on this side's own timer.
    fn heartbeat_due(&self) -> bool {
        self.last_sent.elapsed() >= self.heartbeat_after()
    }

    /// Whether an answering side answers what it just heard: half an interval passed
    /// since it last sent.
    fn answer_due(&self) -> bool {
        self.answering && self.last_sent.elapsed() >= self.interval / 2
    }

    fn silence_limit(&self) -> Duration {
        self.interval * SILENT_INTERVALS
    }

    /// When this side must act although nothing happened: a heartbeat is due out, or
    /// the peer's silence reaches the limit. An idle link sleeps until then.
    pub fn next_due(&self) -> Instant {
        let heartbeat = self.last_sent + self.heartbeat_after();
        // Just past the limit, so the round that wakes finds it passed.
        let silent = self.last_heard + self.silence_limit() + Duration::from_millis(1);
        heartbeat.min(silent)
    }
}

/// Why an exchange round gave the link up.
#[derive(Debug, thiserror::Error)]
pub enum LinkDown {
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error("the peer has been silent for {0:?} (no heartbeat)")]
    Silent(Duration),
    #[error(transparent)]
    Unsealed(#[from] Unsealed),
}

/// One round: send what is due (a heartbeat when nothing was sent for an interval),
/// then take what arrived, delivering new messages in order into `delivered`. A link
/// whose transport has readiness is asked only when it said something arrived (or
/// frames went out, so acks come back at once), waiting for that at most `wait_ms`
/// outside the plugin; one without is polled, waiting at most `wait_ms` inside the
/// plugin when its instance is its own (see `Link::receive_ready`). Between rounds
/// the caller waits for `Link::readable`, its own work, or `Liveness::next_due`. With
/// `take` false nothing is received (the caller cannot take more now: back-pressure)
/// but the link stays alive.
pub async fn exchange(
    session: &mut Session,
    link: &Link,
    seal: &mut LinkSeal,
    live: &mut Liveness,
    wait_ms: u32,
    take: bool,
    delivered: &mut Vec<(Lane, Vec<u8>)>,
) -> Result<(), LinkDown> {
    let mut out = session.outgoing(BULK_PER_ROUND);
    let busy = !out.is_empty();
    if !busy && live.heartbeat_due() {
        out.push(sig(signal::HEARTBEAT, &[]));
    }
    if !out.is_empty() {
        let out = out.into_iter().map(|f| seal.seal(f)).collect();
        link.send(out).await?;
        live.last_sent = Instant::now();
    }
    if !take {
        // Not listening on purpose: the peer's silence is not its fault.
        live.last_heard = Instant::now();
        return Ok(());
    }
    let frames = link
        .receive_ready(busy, Duration::from_millis(wait_ms as u64))
        .await?;
    let heard = !frames.is_empty();
    if heard {
        live.last_heard = Instant::now();
    } else if live.last_heard.elapsed() > live.silence_limit() {
        return Err(LinkDown::Silent(live.silence_limit()));
    }
    take_frames(session, seal, frames, delivered)?;
    if !busy && heard && live.answer_due() {
        // Answer now, in this round, rather than wake again for the timer.
        link.send(vec![seal.seal(sig(signal::HEARTBEAT, &[]))])
            .await?;
        live.last_sent = Instant::now();
    }
    Ok(())
}

/// Open frames from the link and take them into the session, delivering new messages
/// in order. A frame that does not open ends the link: nothing after it is taken (what
/// opened before it was genuine and stays delivered).
pub fn take_frames(
    session: &mut Session,
    seal: &mut LinkSeal,
    frames: Vec<Frame>,
    delivered: &mut Vec<(Lane, Vec<u8>)>,
) -> Result<(), Unsealed> {
    for f in frames {
        if let Incoming::Message(lane, payload) = session.on_frame(seal.open(f)?) {
            delivered.push((lane, payload));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hello_from_an_agent_before_the_queue_declares_one_executor() {
        let older = r#"{"agent":"build-1","labels":["linux"],"nonce":"00","received":[0,0],"session":"s1"}"#;
        let hello: Hello = serde_json::from_str(older).unwrap();
        assert_eq!(hello.executors, 1);
        let newer = serde_json::to_string(&Hello {
            executors: 4,
            ..hello
        })
        .unwrap();
        assert!(newer.contains("\"executors\":4"), "{newer}");
    }
}

//! Driving a `Session` over a transport `Link`: the handshake, and the exchange rounds.

use super::{Incoming, Session, auth, signal};
use crate::points::bindings::command_transport::{Frame, Lane};
use crate::points::transport::Link;
use crate::runtime::PluginError;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent's introduction, answering the controller's challenge.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub agent: String,
    pub labels: Vec<String>,
    /// HMAC-SHA256(secret, nonce || 0 || agent), hex.
    pub proof: String,
    /// How far the agent has received, per lane (control, bulk).
    pub received: [u64; 2],
}

#[derive(Debug, Serialize, Deserialize)]
struct Welcome {
    received: [u64; 2],
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the controller refused agent `{agent}`: {reason}")]
    Refused { agent: String, reason: String },
    #[error("agent `{agent}` presented a wrong secret; it was told so and disconnected")]
    WrongSecret { agent: String },
    #[error("unknown agent `{agent}`: add it to the controller's agents, with its secret")]
    UnknownAgent { agent: String },
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

/// Wait for the next link-local signal (frames with seq 0); other frames are left for
/// the session (none are expected before the handshake ends).
async fn next_signal(link: &Link, deadline: Instant) -> Result<Vec<u8>, HandshakeError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HandshakeError::Timeout(HANDSHAKE_TIMEOUT));
        }
        for f in link.receive(left.as_millis().min(500) as u32).await? {
            if f.seq == 0 && f.payload.first() != Some(&signal::HEARTBEAT) {
                return Ok(f.payload);
            }
        }
    }
}

/// Controller side: challenge a new link and check the agent's proof. `secret_of`
/// gives an agent's secret (None: unknown agent). On success the caller resyncs the
/// agent's session with `hello.received` and calls `welcome`.
pub async fn challenge(
    link: &Link,
    secret_of: impl Fn(&str) -> Option<String>,
) -> Result<Hello, HandshakeError> {
    let nonce = auth::nonce();
    link.send(vec![sig(signal::CHALLENGE, &nonce)]).await?;
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let msg = next_signal(link, deadline).await?;
    if msg.first() != Some(&signal::HELLO) {
        return Err(HandshakeError::Protocol("expected hello".into()));
    }
    let hello: Hello = serde_json::from_slice(&msg[1..])
        .map_err(|e| HandshakeError::Protocol(format!("bad hello: {e}")))?;
    let Some(secret) = secret_of(&hello.agent) else {
        let reason = format!("unknown agent `{}`", hello.agent);
        let _ = link
            .send(vec![sig(signal::REFUSED, reason.as_bytes())])
            .await;
        return Err(HandshakeError::UnknownAgent { agent: hello.agent });
    };
    let expected = auth::proof(&secret, &hello.agent, &nonce);
    let given = hex::decode(&hello.proof).unwrap_or_default();
    if !auth::same(&expected, &given) {
        let reason = format!("wrong secret for agent `{}`", hello.agent);
        let _ = link
            .send(vec![sig(signal::REFUSED, reason.as_bytes())])
            .await;
        return Err(HandshakeError::WrongSecret { agent: hello.agent });
    }
    Ok(hello)
}

/// Controller side: accept the agent, telling it how far this side has received.
pub async fn welcome(link: &Link, received: [u64; 2]) -> Result<(), HandshakeError> {
    let body = serde_json::to_vec(&Welcome { received }).expect("serialisable");
    link.send(vec![sig(signal::WELCOME, &body)]).await?;
    Ok(())
}

/// Agent side: answer the challenge. Returns how far the controller has received, for
/// `Session::resync`.
pub async fn introduce(
    link: &Link,
    agent: &str,
    labels: &[String],
    secret: &str,
    received: [u64; 2],
) -> Result<[u64; 2], HandshakeError> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let msg = next_signal(link, deadline).await?;
    if msg.first() != Some(&signal::CHALLENGE) {
        return Err(HandshakeError::Protocol("expected a challenge".into()));
    }
    let proof = hex::encode(auth::proof(secret, agent, &msg[1..]));
    let hello = Hello {
        agent: agent.to_string(),
        labels: labels.to_vec(),
        proof,
        received,
    };
    link.send(vec![sig(
        signal::HELLO,
        &serde_json::to_vec(&hello).expect("serialisable"),
    )])
    .await?;
    let msg = next_signal(link, deadline).await?;
    match msg.first() {
        Some(&signal::WELCOME) => {
            let w: Welcome = serde_json::from_slice(&msg[1..])
                .map_err(|e| HandshakeError::Protocol(format!("bad welcome: {e}")))?;
            Ok(w.received)
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

/// One round: send what is due, then take what arrived (waiting at most `wait_ms` when
/// nothing is due to go out), delivering new messages in order into `delivered`.
pub async fn exchange(
    session: &mut Session,
    link: &Link,
    wait_ms: u32,
    delivered: &mut Vec<(Lane, Vec<u8>)>,
) -> Result<(), PluginError> {
    let out = session.outgoing(BULK_PER_ROUND);
    let busy = !out.is_empty();
    if busy {
        link.send(out).await?;
    }
    for f in link.receive(if busy { 0 } else { wait_ms }).await? {
        if let Incoming::Message(lane, payload) = session.on_frame(f) {
            delivered.push((lane, payload));
        }
    }
    Ok(())
}

//! Sealed links: the handshake's proofs, the per-link keys, and the AEAD every frame
//! after the handshake travels in. Nothing here trusts the transport: a plugin, a TCP
//! path or a Kafka broker carries only what this module produced, and whatever it hands
//! back is opened (authenticated) before anything else looks at it.
//!
//! # Threat model
//!
//! Trusted: the agent's secret (known to that agent and to the controller only), the
//! two processes holding it, and the OS randomness they draw nonces from.
//!
//! Not trusted: everything that carries frames — the command-transport plugin (third
//! party code running in the host, with the sockets it was granted), the network, a
//! Kafka broker and anyone who can write to its topics or read its files — and any
//! process that connects to the controller's listener or answers an agent's connect.
//!
//! What the link layer guarantees, per link (one handshake):
//!
//! * **Mutual authentication.** The agent proves the secret with an HMAC over the
//!   controller's fresh nonce `nc`, the controller's epoch and its own HELLO (which
//!   carries its own fresh nonce `na`, its name, labels, session and how far it got):
//!   nothing in the HELLO can be changed on the way. The controller proves the secret
//!   back with an HMAC over the hash of that transcript and its WELCOME (which carries
//!   its fencing token). An agent takes no frame from a controller whose WELCOME does
//!   not verify ([`HandshakeError::ControllerNotAuthentic`]); a recorded WELCOME is
//!   useless, since it is bound to the agent's fresh `na`.
//! * **Confidentiality and integrity of every later frame.** Keys come from HKDF-SHA256
//!   (salt `nc || na`, key material the secret, info the transcript hash and the
//!   direction), one per direction, fresh per link. Every frame after the handshake —
//!   messages, acks, heartbeats alike — is sealed with AES-256-GCM. The nonce is the
//!   lane and a per-direction, per-lane counter; the lane and the frame's sequence
//!   number (which stay in clear for the transport: Kafka commits by them) are the
//!   associated data. The receiver only accepts the exact next counter on each lane, so
//!   a frame cannot be forged, altered, replayed (on this link or another: keys are
//!   per link), reordered within a lane, moved to the other lane, or dropped without the
//!   next frame on that lane failing to open.
//! * **Fail closed.** A frame that does not open ends the link ([`Unsealed`]); it is
//!   never delivered. The controller counts these (`trellis_link_frames_refused_total`
//!   in `/metrics`), the agent logs them. The session layer then resends over a new,
//!   freshly keyed link, so an attacker who flips a byte costs a reconnect, nothing
//!   more.
//! * **Bounded before authentication.** Handshake frames are at most
//!   [`MAX_HANDSHAKE_FRAME`] bytes; a larger one ends the handshake.
//!
//! What it does not protect against:
//!
//! * Someone who knows the agent's secret *is* that agent (or its controller).
//! * Traffic analysis: frame sizes, timing, lanes and sequence numbers are visible.
//! * Denial of service: whoever carries the frames can drop them, cut the link, or send
//!   an unauthenticated REFUSED (the controller cannot prove anything to an agent it
//!   does not know), which stops an agent the way a wrong secret does.
//! * A compromised controller or agent host.
//!
//! The secret is used as HMAC and HKDF key material as is: it should be long and random
//! (`openssl rand -hex 32`), not a password.

use super::auth::hmac_sha256;
use crate::wit::command_transport::{Frame, Lane};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicBool, Ordering};

/// The most a peer may make this side hold per frame before the handshake completes.
pub const MAX_HANDSHAKE_FRAME: usize = 64 << 10;

/// Bytes a sealed frame is longer than its payload (the AEAD tag).
pub const TAG_LEN: usize = 16;

const HELLO_LABEL: &[u8] = b"trellis link v1: hello\0";
const TRANSCRIPT_LABEL: &[u8] = b"trellis link v1: transcript\0";
const WELCOME_LABEL: &[u8] = b"trellis link v1: welcome\0";
const KEYS_LABEL: &[u8] = b"trellis link v1: keys\0";

/// What the controller said in its challenge.
#[derive(Debug, Clone)]
pub struct Challenge {
    pub nonce: [u8; 32],
    pub epoch: String,
}

impl Challenge {
    fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(32 + 4 + self.epoch.len());
        b.extend_from_slice(&self.nonce);
        b.extend_from_slice(&(self.epoch.len() as u32).to_le_bytes());
        b.extend_from_slice(self.epoch.as_bytes());
        b
    }
}

/// The agent's MAC over the challenge and its whole HELLO body.
pub fn hello_mac(secret: &str, challenge: &Challenge, hello_body: &[u8]) -> [u8; 32] {
    let mut msg = HELLO_LABEL.to_vec();
    msg.extend_from_slice(&challenge.bytes());
    msg.extend_from_slice(hello_body);
    hmac_sha256(secret.as_bytes(), &msg)
}

/// The hash of everything said up to the welcome: both sides compute it alike.
pub fn transcript(challenge: &Challenge, hello_body: &[u8], hello_mac: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(TRANSCRIPT_LABEL);
    h.update(challenge.bytes());
    h.update((hello_body.len() as u64).to_le_bytes());
    h.update(hello_body);
    h.update(hello_mac);
    h.finalize().into()
}

/// The controller's MAC over the transcript and its WELCOME body.
pub fn welcome_mac(secret: &str, transcript: &[u8; 32], welcome_body: &[u8]) -> [u8; 32] {
    let mut msg = WELCOME_LABEL.to_vec();
    msg.extend_from_slice(transcript);
    msg.extend_from_slice(welcome_body);
    hmac_sha256(secret.as_bytes(), &msg)
}

/// Which end of the link this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Controller,
    Agent,
}

/// A frame that did not open: the link is dropped, the frame never delivered.
#[derive(Debug, thiserror::Error)]
#[error(
    "a {lane:?}-lane frame (seq {seq}, {len} bytes) did not open: it was altered, forged, replayed or reordered on the way, or the peer does not hold the agent's secret; dropping the link"
)]
pub struct Unsealed {
    pub lane: Lane,
    pub seq: u64,
    pub len: usize,
}

/// Set only by the lines benchmark, to measure what sealing costs (see
/// `unsealed_links_for_benchmarks`).
static BENCH_UNSEALED: AtomicBool = AtomicBool::new(false);

/// Benchmarks only: links keyed after this call carry frames in clear. No configuration
/// or environment reaches it; the daemon never calls it.
#[doc(hidden)]
pub fn unsealed_links_for_benchmarks(on: bool) {
    BENCH_UNSEALED.store(on, Ordering::SeqCst);
}

/// The keys and counters of one link, for one side.
pub struct LinkSeal {
    /// None: the benchmark's unsealed baseline.
    keys: Option<(LessSafeKey, LessSafeKey)>,
    /// Per lane: the counter of the next frame to seal / to open.
    sent: [u64; 2],
    opened: [u64; 2],
}

impl std::fmt::Debug for LinkSeal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkSeal")
            .field("sealed", &self.keys.is_some())
            .field("sent", &self.sent)
            .field("opened", &self.opened)
            .finish()
    }
}

fn lane_byte(lane: Lane) -> u8 {
    super::lane_index(lane) as u8
}

impl LinkSeal {
    /// The keys both sides derive from the secret, both nonces and the transcript.
    pub fn derive(
        secret: &str,
        nc: &[u8; 32],
        na: &[u8; 32],
        transcript: &[u8; 32],
        side: Side,
    ) -> LinkSeal {
        let mut salt = nc.to_vec();
        salt.extend_from_slice(na);
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &salt).extract(secret.as_bytes());
        let key = |direction: &[u8]| {
            let info = [KEYS_LABEL, &transcript[..], direction];
            let okm = prk
                .expand(&info, &AES_256_GCM)
                .expect("32 bytes is a valid HKDF-SHA256 length");
            LessSafeKey::new(UnboundKey::from(okm))
        };
        let (to_agent, to_controller) = (key(b"controller to agent"), key(b"agent to controller"));
        let keys = match side {
            Side::Controller => (to_agent, to_controller),
            Side::Agent => (to_controller, to_agent),
        };
        LinkSeal {
            keys: (!BENCH_UNSEALED.load(Ordering::SeqCst)).then_some(keys),
            sent: [0; 2],
            opened: [0; 2],
        }
    }

    fn nonce(lane: Lane, counter: u64) -> Nonce {
        let mut n = [0u8; 12];
        n[0] = lane_byte(lane);
        n[4..].copy_from_slice(&counter.to_be_bytes());
        Nonce::assume_unique_for_key(n)
    }

    fn aad(lane: Lane, seq: u64) -> [u8; 9] {
        let mut a = [0u8; 9];
        a[0] = lane_byte(lane);
        a[1..].copy_from_slice(&seq.to_le_bytes());
        a
    }

    /// Seal a frame for the wire (its lane and seq stay readable, and bound).
    pub fn seal(&mut self, mut f: Frame) -> Frame {
        let Some((send, _)) = &self.keys else {
            return f;
        };
        let i = super::lane_index(f.lane);
        let counter = self.sent[i];
        self.sent[i] += 1;
        f.payload.reserve_exact(TAG_LEN);
        send.seal_in_place_append_tag(
            Self::nonce(f.lane, counter),
            Aad::from(Self::aad(f.lane, f.seq)),
            &mut f.payload,
        )
        .expect("AES-GCM seals any frame under 64 GiB");
        f
    }

    /// Open a frame from the wire: it must be the next one sealed on its lane.
    pub fn open(&mut self, mut f: Frame) -> Result<Frame, Unsealed> {
        let Some((_, receive)) = &self.keys else {
            return Ok(f);
        };
        let i = super::lane_index(f.lane);
        let unsealed = Unsealed {
            lane: f.lane,
            seq: f.seq,
            len: f.payload.len(),
        };
        let counter = self.opened[i];
        let plain = receive
            .open_in_place(
                Self::nonce(f.lane, counter),
                Aad::from(Self::aad(f.lane, f.seq)),
                &mut f.payload,
            )
            .map_err(|_| unsealed)?
            .len();
        f.payload.truncate(plain);
        self.opened[i] += 1;
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (LinkSeal, LinkSeal) {
        let (nc, na, t) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        (
            LinkSeal::derive("s3cret", &nc, &na, &t, Side::Controller),
            LinkSeal::derive("s3cret", &nc, &na, &t, Side::Agent),
        )
    }

    fn frame(lane: Lane, seq: u64, p: &[u8]) -> Frame {
        Frame {
            lane,
            seq,
            payload: p.to_vec(),
        }
    }

    #[test]
    fn frames_open_only_unaltered_in_order_on_their_lane() {
        let (mut c, mut a) = pair();
        let f1 = c.seal(frame(Lane::Control, 1, b"start run"));
        assert_ne!(&f1.payload[..9], b"start run", "not in clear");
        assert_eq!(f1.payload.len(), 9 + TAG_LEN);
        let f2 = c.seal(frame(Lane::Control, 0, b"\x06"));
        let b1 = c.seal(frame(Lane::Bulk, 1, b"bulk"));
        // lanes are independent: bulk first is fine
        assert_eq!(a.open(b1.clone()).unwrap().payload, b"bulk");
        // a byte flipped
        let mut bad = f1.clone();
        bad.payload[0] ^= 1;
        assert!(a.clone_for_test().open(bad).is_err());
        // seq or lane changed in clear
        let mut moved = f1.clone();
        moved.seq = 2;
        assert!(a.clone_for_test().open(moved).is_err());
        let mut other_lane = f1.clone();
        other_lane.lane = Lane::Bulk;
        assert!(a.clone_for_test().open(other_lane).is_err());
        // reordered
        assert!(a.clone_for_test().open(f2.clone()).is_err());
        assert_eq!(a.open(f1.clone()).unwrap().payload, b"start run");
        // replayed
        assert!(a.clone_for_test().open(f1.clone()).is_err());
        assert_eq!(a.open(f2).unwrap().payload, b"\x06");
        // the agent's own direction has another key: a reflected frame does not open
        let (mut c2, _) = pair();
        let echo = c2.seal(frame(Lane::Control, 1, b"x"));
        assert!(c.open(echo).is_err());
    }

    #[test]
    fn another_secret_or_nonce_gives_other_keys() {
        let (mut c, _) = pair();
        let f = c.seal(frame(Lane::Control, 1, b"order"));
        let t = [3u8; 32];
        for (secret, na) in [("other", [2u8; 32]), ("s3cret", [9u8; 32])] {
            let mut a = LinkSeal::derive(secret, &[1; 32], &na, &t, Side::Agent);
            assert!(a.open(f.clone()).is_err());
        }
    }

    impl LinkSeal {
        fn clone_for_test(&self) -> LinkSeal {
            // Keys cannot be cloned; derive the same ones again and copy the counters.
            let mut s = LinkSeal::derive("s3cret", &[1; 32], &[2; 32], &[3; 32], Side::Agent);
            s.opened = self.opened;
            s.sent = self.sent;
            s
        }
    }
}

//! The host's session layer over a command transport: what makes an unreliable link
//! reliable, so a transport plugin only has to move frames while its link lives.
//!
//! * Every message is a frame with a sequence number per lane (from 1). Frames with
//!   seq 0 are link-local signals (acks, handshake, heartbeats): never resent.
//! * Each side keeps what it sent until the peer acknowledges it (a cumulative ack per
//!   lane), and delivers what it receives exactly once, in order (duplicates dropped).
//! * After a reconnect, the handshake tells each side how far the other got, and
//!   everything after that is sent again.
//! * Both sides prove the agent's secret in the handshake, and every frame after it is
//!   sealed with per-link keys (`seal`, whose docs hold the threat model): the
//!   transport carries ciphertext it can neither read nor forge, replay or reorder.

pub mod auth;
pub mod link;
pub mod seal;

use crate::wit::command_transport::{Frame, Lane};
use std::collections::VecDeque;

pub fn lane_index(l: Lane) -> usize {
    match l {
        Lane::Control => 0,
        Lane::Bulk => 1,
    }
}

pub const LANES: [Lane; 2] = [Lane::Control, Lane::Bulk];

/// Link-local signals (seq 0), by their first byte.
pub mod signal {
    pub const ACK: u8 = 1;
    pub const CHALLENGE: u8 = 2;
    pub const HELLO: u8 = 3;
    pub const WELCOME: u8 = 4;
    pub const REFUSED: u8 = 5;
    pub const HEARTBEAT: u8 = 6;
}

/// One side's reliable-delivery state. Survives reconnects: it belongs to the peer, not
/// to a link.
#[derive(Debug, Default)]
pub struct Session {
    next_seq: [u64; 2],
    /// Sent (or to send) and not yet acknowledged, oldest first.
    unacked: [VecDeque<(u64, Vec<u8>)>; 2],
    /// On the current link, everything up to here has been put on the wire.
    sent: [u64; 2],
    /// Delivered in order up to here.
    received: [u64; 2],
    /// An ack is to be sent (something new to acknowledge, or the peer resent what it
    /// had acknowledged already).
    ack_due: [bool; 2],
    /// Acknowledge a message once the caller has handled it, not once it is delivered
    /// (`ack_when_handled`).
    ack_when_handled: bool,
    /// With `ack_when_handled`: handled in order up to here.
    handled: [u64; 2],
}

/// What an incoming frame meant.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A new message, to deliver (in order).
    Message(Lane, Vec<u8>),
    /// Already delivered once: dropped.
    Duplicate,
    /// A link-local signal (seq 0), for the caller: handshake, heartbeat.
    Signal(Vec<u8>),
    /// An ack, applied.
    Acked,
}

impl Session {
    /// Queue a message; it is sent by `outgoing` and kept until acknowledged.
    pub fn queue(&mut self, lane: Lane, payload: Vec<u8>) -> u64 {
        let i = lane_index(lane);
        self.next_seq[i] += 1;
        let seq = self.next_seq[i];
        self.unacked[i].push_back((seq, payload));
        seq
    }

    /// Frames to put on the wire now: acks due, then control before bulk, each lane in
    /// order, at most `max_bulk_bytes` of bulk payload (so control never waits long).
    pub fn outgoing(&mut self, max_bulk_bytes: usize) -> Vec<Frame> {
        let mut out = Vec::new();
        for lane in LANES {
            let i = lane_index(lane);
            if self.ack_due[i] {
                let mut p = vec![signal::ACK, i as u8];
                p.extend_from_slice(&self.ack_point()[i].to_le_bytes());
                out.push(Frame {
                    lane: Lane::Control,
                    seq: 0,
                    payload: p,
                });
                self.ack_due[i] = false;
            }
        }
        for lane in LANES {
            let i = lane_index(lane);
            let mut budget = if lane == Lane::Bulk {
                max_bulk_bytes
            } else {
                usize::MAX
            };
            let sent = self.sent[i];
            for (seq, payload) in self.unacked[i].iter().filter(|(s, _)| *s > sent) {
                // Always at least one bulk frame per round, however large.
                if lane == Lane::Bulk && payload.len() > budget && budget != max_bulk_bytes {
                    break;
                }
                budget = budget.saturating_sub(payload.len());
                out.push(Frame {
                    lane,
                    seq: *seq,
                    payload: payload.clone(),
                });
                self.sent[i] = *seq;
            }
        }
        out
    }

    pub fn on_frame(&mut self, f: Frame) -> Incoming {
        if f.seq == 0 {
            if f.payload.first() == Some(&signal::ACK) && f.payload.len() == 10 {
                let i = (f.payload[1] as usize).min(1);
                let upto = u64::from_le_bytes(f.payload[2..10].try_into().expect("8 bytes"));
                self.acked(i, upto);
                return Incoming::Acked;
            }
            return Incoming::Signal(f.payload);
        }
        let i = lane_index(f.lane);
        if f.seq <= self.received[i] {
            self.ack_due[i] = true; // the peer did not see our ack: say it again
            return Incoming::Duplicate;
        }
        if f.seq != self.received[i] + 1 {
            // Cannot happen on an ordered link after a resync; refuse to skip ahead.
            return Incoming::Duplicate;
        }
        self.received[i] = f.seq;
        // Acknowledged now, or once the caller says it is handled (`handled`).
        self.ack_due[i] = !self.ack_when_handled;
        Incoming::Message(f.lane, f.payload)
    }

    fn acked(&mut self, i: usize, upto: u64) {
        while self.unacked[i].front().is_some_and(|(s, _)| *s <= upto) {
            self.unacked[i].pop_front();
        }
    }

    /// How far this side has received, per lane (sent in the handshake).
    pub fn received(&self) -> [u64; 2] {
        self.received
    }

    /// From now on acks cover only what the caller reports handled (`handled`), not
    /// everything delivered. For a side that hands delivered messages to a task of its
    /// own (the controller): an ack lets the peer drop the message, so an ack for one
    /// not handled yet loses it if this process dies in between. (A failover lost a
    /// run's lines so: the old controller had acknowledged lines its handler never
    /// logged.) Everything delivered so far counts as handled.
    pub fn ack_when_handled(&mut self) {
        if !self.ack_when_handled {
            self.ack_when_handled = true;
            self.handled = self.received;
        }
    }

    /// Everything delivered up to `upto`, per lane, has been handled: acks may cover it.
    pub fn handled(&mut self, upto: [u64; 2]) {
        for (i, &up) in upto.iter().enumerate() {
            let up = up.min(self.received[i]);
            if up > self.handled[i] {
                self.handled[i] = up;
                self.ack_due[i] = true;
            }
        }
    }

    /// How far this side acknowledges, per lane: what it received, or with
    /// `ack_when_handled` what it handled. Also what a controller's welcome tells the
    /// agent it has (the agent drops its copies up to there).
    pub fn ack_point(&self) -> [u64; 2] {
        if self.ack_when_handled {
            std::array::from_fn(|i| self.handled[i].min(self.received[i]))
        } else {
            self.received
        }
    }

    /// Per lane, the last seq the peer acknowledged: everything up to it has been handled
    /// and dropped here; everything after it is still held (sent in the handshake, so a
    /// peer that lost its state — a restarted controller — knows where this side's
    /// messages resume).
    pub fn acked_through(&self) -> [u64; 2] {
        std::array::from_fn(|i| {
            self.unacked[i]
                .front()
                .map_or(self.next_seq[i], |(s, _)| s - 1)
        })
    }

    /// The peer is a new process that never saw anything of ours, while what we sent
    /// stays ours to deliver: forget what we received (its numbering starts again at 1)
    /// and keep every unacknowledged message, to be sent again on the new link.
    pub fn peer_restarted(&mut self) {
        self.received = [0; 2];
        self.handled = [0; 2];
        self.ack_due = [false; 2];
    }

    /// The peer says it has had everything up to `peer_acked` acknowledged (see
    /// `acked_through`). A side that lost its state (a new controller process) takes
    /// that as how far it has received, so it accepts the peer's next message instead
    /// of waiting for a seq 1 that was handled long ago. Never moves backwards.
    pub fn adopt_peer_acked(&mut self, peer_acked: [u64; 2]) {
        for (i, peer) in peer_acked.into_iter().enumerate() {
            self.received[i] = self.received[i].max(peer);
            // the earlier process handled them before it acknowledged them
            self.handled[i] = self.handled[i].max(peer);
        }
    }

    /// A new link: the peer has everything up to `peer_received`; resend the rest.
    pub fn resync(&mut self, peer_received: [u64; 2]) {
        for (i, &peer) in peer_received.iter().enumerate() {
            self.acked(i, peer);
            self.sent[i] = peer.max(
                self.unacked[i]
                    .front()
                    .map_or(self.next_seq[i], |(s, _)| s - 1),
            );
            self.ack_due[i] = self.ack_point()[i] > 0;
        }
    }

    /// Whether messages wait that were not put on the wire yet (bulk beyond a round's
    /// budget): the caller should come back at once rather than idle.
    pub fn has_unsent(&self) -> bool {
        (0..2).any(|i| {
            self.unacked[i]
                .back()
                .is_some_and(|(s, _)| *s > self.sent[i])
        })
    }

    /// Messages sent or waiting, not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.unacked.iter().map(|q| q.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Carry frames from a to b, optionally losing everything after the first `keep`.
    fn carry(a: &mut Session, b: &mut Session, keep: usize, delivered: &mut Vec<Vec<u8>>) {
        for (n, f) in a.outgoing(1 << 20).into_iter().enumerate() {
            if n >= keep {
                break;
            }
            if let Incoming::Message(_, p) = b.on_frame(f) {
                delivered.push(p);
            }
        }
    }

    #[test]
    fn exactly_once_in_order_across_lost_links() {
        let (mut agent, mut controller) = (Session::default(), Session::default());
        let mut got = Vec::new();
        for i in 0..100u32 {
            agent.queue(Lane::Bulk, i.to_le_bytes().to_vec());
        }
        // first link: only 30 frames make it, then the link dies
        carry(&mut agent, &mut controller, 30, &mut got);
        // acks from the controller are lost too; reconnect and resync
        agent.resync(controller.received());
        controller.resync(agent.received());
        carry(&mut agent, &mut controller, 50, &mut got);
        // this time the controller's ack arrives
        for f in controller.outgoing(1 << 20) {
            agent.on_frame(f);
        }
        // lose the link again before the rest; a stale resend is also replayed
        agent.resync([25, 25]); // an old view: frames 26.. come again, must be dropped
        carry(&mut agent, &mut controller, usize::MAX, &mut got);
        let seen: Vec<u32> = got
            .iter()
            .map(|p| u32::from_le_bytes(p[..4].try_into().unwrap()))
            .collect();
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
        for f in controller.outgoing(1 << 20) {
            agent.on_frame(f);
        }
        assert_eq!(agent.unacked(), 0, "everything acknowledged");
    }

    #[test]
    fn a_side_that_acks_when_handled_never_acks_what_it_has_not_handled() {
        let (mut agent, mut controller) = (Session::default(), Session::default());
        controller.ack_when_handled();
        let mut got = Vec::new();
        for i in 0..10u32 {
            agent.queue(Lane::Bulk, i.to_le_bytes().to_vec());
        }
        carry(&mut agent, &mut controller, usize::MAX, &mut got);
        assert_eq!(got.len(), 10, "delivered");
        // Delivered but not handled: no ack goes out, and the agent keeps all ten.
        assert!(controller.outgoing(1 << 20).is_empty());
        assert_eq!(controller.ack_point(), [0, 0]);
        // The first four are handled: the ack covers those only.
        controller.handled([0, 4]);
        for f in controller.outgoing(1 << 20) {
            agent.on_frame(f);
        }
        assert_eq!(agent.acked_through(), [0, 4]);
        // The controller dies with 5..=10 delivered and unhandled: a new process takes
        // the agent's word and gets exactly those again.
        let mut new = Session::default();
        new.ack_when_handled();
        agent.peer_restarted();
        new.adopt_peer_acked(agent.acked_through());
        agent.resync(new.ack_point());
        let mut again = Vec::new();
        carry(&mut agent, &mut new, usize::MAX, &mut again);
        let seen: Vec<u32> = again
            .iter()
            .map(|p| u32::from_le_bytes(p[..4].try_into().unwrap()))
            .collect();
        assert_eq!(seen, (4..10).collect::<Vec<_>>());
        // Handled beyond what was received is clamped; everything handled is acked.
        new.handled([0, 99]);
        for f in new.outgoing(1 << 20) {
            agent.on_frame(f);
        }
        assert_eq!(agent.unacked(), 0);
    }

    #[test]
    fn a_restarted_peer_gets_everything_it_had_not_acknowledged() {
        let (mut agent, mut old) = (Session::default(), Session::default());
        let mut got = Vec::new();
        for i in 0..10u32 {
            agent.queue(Lane::Bulk, i.to_le_bytes().to_vec());
        }
        old.queue(Lane::Control, b"order".to_vec());
        carry(&mut old, &mut agent, usize::MAX, &mut got);
        carry(&mut agent, &mut old, 7, &mut got); // the ack for the order, then 6 messages
        for f in old.outgoing(1 << 20) {
            agent.on_frame(f); // acks 1..=6
        }
        carry(&mut agent, &mut old, usize::MAX, &mut got); // 7..=10 handled, not acked
        assert_eq!(agent.acked_through(), [0, 6]);
        // The controller dies; a new one knows nothing. The agent keeps its messages.
        let mut new = Session::default();
        agent.peer_restarted();
        new.adopt_peer_acked(agent.acked_through());
        agent.resync(new.received());
        new.resync(agent.received());
        let mut again = Vec::new();
        new.queue(Lane::Control, b"next order".to_vec());
        carry(&mut new, &mut agent, usize::MAX, &mut again);
        carry(&mut agent, &mut new, usize::MAX, &mut again);
        let seen: Vec<Vec<u8>> = again;
        assert_eq!(
            seen[0], b"next order",
            "the new controller's seq 1 is accepted"
        );
        let resent: Vec<u32> = seen[1..]
            .iter()
            .map(|p| u32::from_le_bytes(p[..4].try_into().unwrap()))
            .collect();
        assert_eq!(
            resent,
            vec![6, 7, 8, 9],
            "exactly the unacknowledged ones again"
        );
        for f in new.outgoing(1 << 20) {
            agent.on_frame(f);
        }
        assert_eq!(agent.unacked(), 0);
        assert_eq!(agent.acked_through(), [0, 10]);
    }

    #[test]
    fn control_goes_before_bulk_and_bulk_is_bounded_per_round() {
        let mut s = Session::default();
        for _ in 0..10 {
            s.queue(Lane::Bulk, vec![0; 1000]);
        }
        s.queue(Lane::Control, b"cancel".to_vec());
        let first = s.outgoing(2500);
        assert_eq!(first[0].lane, Lane::Control);
        assert_eq!(
            first.iter().filter(|f| f.lane == Lane::Bulk).count(),
            2,
            "bulk limited per round"
        );
        let second = s.outgoing(2500);
        assert_eq!(second.iter().map(|f| f.seq).collect::<Vec<_>>(), vec![3, 4]);
        // a frame larger than the budget still goes, alone
        let mut s = Session::default();
        s.queue(Lane::Bulk, vec![0; 10_000]);
        assert_eq!(s.outgoing(2500).len(), 1);
    }
}

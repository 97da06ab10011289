//! The component: `command-transport` over Kafka, through the host's `kafka` capability.

use crate::{
    Piece, Reassembly, connect_topic, piece_headers, split, to_agent_topic, to_controller_topic,
};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;
use trellis_sdk::command_transport::{
    Channel, Frame, Guest, GuestChannel, GuestListener, Lane, Lifecycle, Listener,
};
use trellis_sdk::config::Config;
use trellis_sdk::kafka::{self, Consumer, Header, Outgoing, Producer, Start};
use trellis_sdk::records::{self, RecordsWriter};
use trellis_sdk::{Error, log};

static PREFIX: OnceLock<String> = OnceLock::new();

fn prefix() -> Result<&'static str, Error> {
    PREFIX
        .get()
        .map(String::as_str)
        .ok_or_else(|| Error::permanent("used before init"))
}

struct Component;

impl Lifecycle for Component {
    fn init(config: String) -> Result<(), Error> {
        let c = Config::parse(&config).map_err(Error::bad_config)?;
        let p = c
            .string("prefix")
            .map_err(Error::bad_config)?
            .unwrap_or("trellis")
            .to_string();
        if p.is_empty()
            || !p
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return Err(Error::bad_config(format!(
                "config key `prefix`: `{p}` is not a Kafka topic name part (letters, digits, . _ -)"
            )));
        }
        let _ = PREFIX.set(p);
        Ok(())
    }
}

/// A random id for a new link (std's hasher seeds come from wasi:random).
fn link_id() -> String {
    let a = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let b = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!("{a:016x}{b:016x}")
}

/// Both lane partitions of a topic.
fn lanes(topic: &str) -> Vec<(String, i32)> {
    vec![(topic.to_string(), 0), (topic.to_string(), 1)]
}

impl Guest for Component {
    type Channel = KafkaChannel;
    type Listener = KafkaListener;

    fn listen() -> Result<Listener, Error> {
        let p = prefix()?;
        let topic = connect_topic(p);
        kafka::ensure_topic(&topic, 1)?;
        // Only announcements from now on: an agent that announced before keeps retrying.
        let consumer = kafka::consume(
            &format!("{p}.controller"),
            &[(topic.clone(), 0)],
            Start::Latest,
        )?;
        Ok(Listener::new(KafkaListener { consumer }))
    }

    fn connect(agent: String) -> Result<Channel, Error> {
        let p = prefix()?;
        let (to_agent, to_controller) = (to_agent_topic(p, &agent), to_controller_topic(p, &agent));
        kafka::ensure_topic(&to_agent, 2)?;
        kafka::ensure_topic(&to_controller, 2)?;
        kafka::ensure_topic(&connect_topic(p), 1)?;
        // Position the reader first, then announce: the controller's first frame on
        // this link is produced after it read the announcement, so it cannot be missed.
        let consumer = kafka::consume(
            &format!("{p}.{agent}.agent"),
            &lanes(&to_agent),
            Start::Latest,
        )?;
        let link = link_id();
        kafka::produce(&[Outgoing {
            topic: connect_topic(p),
            partition: Some(0),
            key: Some(agent.clone().into_bytes()),
            headers: vec![Header {
                key: crate::LINK.into(),
                value: link.clone().into_bytes(),
            }],
            payload: Vec::new(),
        }])?;
        Ok(Channel::new(KafkaChannel::new(
            agent,
            link,
            to_controller,
            to_agent,
            consumer,
            1,
        )))
    }
}

pub struct KafkaListener {
    consumer: Consumer,
}

impl GuestListener for KafkaListener {
    /// Ready when an announcement is buffered for the listener's consumer: the host
    /// waits on it without calling the plugin.
    fn subscribe(&self) -> wasi::io::poll::Pollable {
        self.consumer.subscribe()
    }

    fn accept(&self, timeout_ms: u32) -> Result<Option<Channel>, Error> {
        let p = prefix()?;
        for r in self.consumer.poll(1, timeout_ms)? {
            let agent = r
                .key
                .as_deref()
                .and_then(|k| std::str::from_utf8(k).ok())
                .map(str::to_string);
            let link = r
                .headers
                .iter()
                .find(|h| h.key == crate::LINK)
                .and_then(|h| String::from_utf8(h.value.clone()).ok());
            let (Some(agent), Some(link)) = (agent, link) else {
                log::error(&format!(
                    "skipped a record at {}:{} offset {} that is not an agent announcement",
                    r.topic, r.partition, r.offset
                ));
                continue;
            };
            let (to_agent, to_controller) =
                (to_agent_topic(p, &agent), to_controller_topic(p, &agent));
            let consumer = kafka::consume(
                &format!("{p}.{agent}.controller"),
                &lanes(&to_controller),
                Start::Latest,
            )?;
            return Ok(Some(Channel::new(KafkaChannel::new(
                agent,
                link,
                to_agent,
                to_controller,
                consumer,
                2,
            ))));
        }
        Ok(None)
    }
}

pub struct KafkaChannel {
    agent: String,
    link: String,
    out_topic: String,
    in_topic: String,
    consumer: Consumer,
    /// Queues frames without waiting for the broker (the controller's links share one
    /// instance: a send waiting for acknowledgements would hold all of them). A record
    /// the broker did not take fails the next send, which breaks the link; the host
    /// resends what the peer did not acknowledge on the next one.
    producer: Producer,
    max_payload: usize,
    reassembly: RefCell<Reassembly>,
    /// (seq, offset of its last piece) per lane, for `commit`.
    offsets: RefCell<[VecDeque<(u64, i64)>; 2]>,
    /// Host sends so far on this link, and how many mean the peer is authenticated (a
    /// listener's link: the challenge, then the welcome sent only to an agent that
    /// proved its secret; an agent's link: its hello). Until then frames are bounded to
    /// `PRE_AUTH_FRAME`.
    sends: Cell<u32>,
    sends_until_authenticated: u32,
}

impl KafkaChannel {
    fn new(
        agent: String,
        link: String,
        out_topic: String,
        in_topic: String,
        consumer: Consumer,
        sends_until_authenticated: u32,
    ) -> KafkaChannel {
        let mut reassembly = Reassembly::default();
        reassembly.limit_to(crate::PRE_AUTH_FRAME);
        KafkaChannel {
            agent,
            link,
            out_topic,
            in_topic,
            consumer,
            producer: Producer::new(),
            max_payload: kafka::max_payload() as usize,
            reassembly: RefCell::new(reassembly),
            offsets: RefCell::default(),
            sends: Cell::new(0),
            sends_until_authenticated,
        }
    }
}

fn lane_index(l: Lane) -> u8 {
    match l {
        Lane::Control => 0,
        Lane::Bulk => 1,
    }
}

impl GuestChannel for KafkaChannel {
    /// Ready when a record is buffered for this link's consumer. `send` produces before
    /// it returns, so nothing waits here to go out; `receive` takes everything buffered
    /// (up to 512 records; past that the consumer stays ready), keeping only pieces of
    /// a frame still on the way, whose next record makes it ready again.
    fn subscribe(&self) -> wasi::io::poll::Pollable {
        self.consumer.subscribe()
    }

    fn send(&self, frames: Vec<Frame>) -> Result<(), Error> {
        let sends = self.sends.get().saturating_add(1);
        self.sends.set(sends);
        if sends == self.sends_until_authenticated {
            self.reassembly.borrow_mut().limit_to(crate::MAX_FRAME);
        }
        // Packed: one buffer across the component boundary, not a dozen values per
        // record (see the SDK's `records` module).
        let bytes: usize = frames.iter().map(|f| f.payload.len() + 160).sum();
        let mut records = RecordsWriter::with_capacity(bytes);
        for f in &frames {
            let lane = lane_index(f.lane);
            let pieces = split(&f.payload, self.max_payload);
            let chunks = pieces.len() as u32;
            for (i, data) in pieces.into_iter().enumerate() {
                records.record(
                    &self.out_topic,
                    lane as i32,
                    -1,
                    -1,
                    Some(self.agent.as_bytes()),
                );
                piece_headers(&self.link, lane, f.seq, i as u32, chunks, |k, v| {
                    records.header(k, v);
                });
                records.payload(data);
            }
        }
        self.producer.send_packed(&records.finish())?;
        Ok(())
    }

    fn receive(&self, timeout_ms: u32) -> Result<Vec<Frame>, Error> {
        let mut frames = Vec::new();
        let mut errors = Vec::new();
        let mut reassembly = self.reassembly.borrow_mut();
        let batch = self.consumer.poll_packed(512, timeout_ms)?;
        let batch = records::decode(&batch)
            .map_err(|e| Error::permanent(format!("the host's packed records: {e}")))?;
        for r in batch {
            if r.header(crate::FRAME).is_some_and(|v| {
                v.strip_prefix(self.link.as_bytes())
                    .is_none_or(|rest| !rest.starts_with(b" "))
            }) {
                continue; // another (older) link's record: skipped before parsing
            }
            let piece = match Piece::parse(r.headers()) {
                Ok(p) => p,
                Err(e) => {
                    log::error(&format!(
                        "{}:{} offset {}: {e}; skipped",
                        r.topic, r.partition, r.offset
                    ));
                    continue;
                }
            };
            if piece.link != self.link {
                continue; // another (older) link's record
            }
            if piece.lane as i32 != r.partition {
                log::error(&format!(
                    "{}:{} offset {}: a lane-{} frame on partition {}; skipped",
                    r.topic, r.partition, r.offset, piece.lane, r.partition
                ));
                continue;
            }
            if let Some((lane, seq, payload)) = reassembly.push(&piece, r.payload, &mut errors) {
                self.offsets.borrow_mut()[lane as usize].push_back((seq, r.offset));
                frames.push(Frame {
                    lane: if lane == 0 { Lane::Control } else { Lane::Bulk },
                    seq,
                    payload,
                });
            }
        }
        for e in errors {
            log::error(&format!("{}: {e}", self.in_topic));
        }
        // Control first; each lane keeps its order (the sort is stable).
        frames.sort_by_key(|f| lane_index(f.lane));
        Ok(frames)
    }

    fn commit(&self, lane: Lane, seq: u64) -> Result<(), Error> {
        let i = lane_index(lane);
        let mut upto = None;
        {
            let mut offsets = self.offsets.borrow_mut();
            let q = &mut offsets[i as usize];
            while q.front().is_some_and(|(s, _)| *s <= seq) {
                upto = q.pop_front().map(|(_, o)| o);
            }
        }
        if let Some(offset) = upto {
            self.consumer.commit(&self.in_topic, i as i32, offset)?;
        }
        Ok(())
    }
}

trellis_sdk::export_command_transport!(Component);

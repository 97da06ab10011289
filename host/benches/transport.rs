//! Command-transport benchmark: round-trip latency and throughput of frames through
//! the `kafka-transport` plugin, against raw rdkafka on the same broker and against the
//! `tcp-transport` plugin, all in one run.
//!
//! One Apache Kafka 4.4 broker (KRaft, `tests/common/kafka.rs`) on loopback is started
//! here, for the whole run.
//! Three contenders, each measured `TRELLIS_BENCH_ROUNDS` times (default 7),
//! interleaved so machine noise hits all alike, in an order rotated every round;
//! medians are reported. Every round runs on a fresh link with topics of its own
//! (no contender inherits another's history on the broker):
//!
//! * **kafka-transport**: the plugin in a `trellis::runtime::Runtime` (the host's
//!   `kafka` capability: one shared idempotent producer, a consumer per link side),
//!   driven through the host adapter (`points::transport`): `listen`, `connect`,
//!   `accept`, then `send`/`receive` on both ends. No session layer on top.
//! * **raw rdkafka**: the same crate and version the host links, with the host's own
//!   settings (`capabilities::kafka`: idempotent producer, `acks=all`, `linger.ms=1`;
//!   consumers with manual assignment at a concrete end offset, `fetch.wait.max.ms=10`),
//!   so the difference is the cost of our layers, not of different settings. One
//!   producer for both sides, like the host's.
//! * **tcp-transport**: the plugin over loopback TCP, for scale.
//! * **tcp-transport, 0.1.0 build** (`tests/fixtures/tcp-transport-v0-1`: the same
//!   source built for `trellis:plugin@0.1.0`), when `TRELLIS_FIXTURES_DIR` is set
//!   (`cargo xtask bench` sets it): what serving the previous contract costs, i.e. the
//!   host's 0.1.0 bindings and the frame conversions at the boundary, against the
//!   0.2.0 build in the same rounds.
//!
//! Measured per contender and round:
//!
//! * **Round trip** (`TRELLIS_BENCH_PINGS`, default 500, after
//!   `TRELLIS_BENCH_WARMUP`, default 50, untimed): side A (the agent) sends one frame of
//!   `TRELLIS_BENCH_PAYLOAD` bytes (default 200) on the control lane and waits for the
//!   `send` to return (Kafka: the broker acknowledged it), side B (the controller)
//!   receives it and sends it back, A receives it. RTT p50 and p99; also the median
//!   time of A's `send` call (raw: produce + delivery report), the part of the RTT spent
//!   getting the record acknowledged.
//! * **Throughput** (`TRELLIS_BENCH_FRAMES`, default 50,000): A sends the frames on the
//!   bulk lane in `send` calls of `TRELLIS_BENCH_BATCH` (default 100) from a task of its
//!   own (raw: queue a batch without awaiting the earlier ones' delivery reports, up to
//!   16 MiB unacknowledged, which is what the host's `producer` lets kafka-transport
//!   do; before 8 December 2026 the raw side awaited each batch's reports before the
//!   next, which made it 4x slower than the plugin), while B receives until it
//!   has them all, checking that every frame arrives once and in order. Frames/s = N
//!   over the time from the first send to the last receive; also the median time of
//!   one batch's `send` call, which bounds the rate (N / batch × that, plus the tail).
//!
//!     cargo xtask bench transport     (builds the bundle, then runs this in release)
//!
//! The broker runs from the Kafka jars `./scripts/setup.sh` fetches (`$TRELLIS_KAFKA_LIBS`).
//! TRELLIS_BENCH_ONLY=kafka|rdkafka|tcp|tcp01 runs one contender alone (for profiling;
//! `tcp,tcp01` runs those two);
//! TRELLIS_BENCH_RAW_HEADERS=1 gives the raw records the plugin's four headers (link,
//! lane, seq, chunk), to tell the cost of the headers from the cost of the layers;
//! TRELLIS_BENCH_RAW_PARTITIONS=2 gives the raw topics two partitions (the plugin's
//! per-lane layout; the consumers still read both), for the same purpose;
//! TRELLIS_BENCH_FETCH_WAIT_MS sets `fetch.wait.max.ms` (default 10, the host's) for the
//! raw consumers and, through the operator's `[kafka] properties`, for kafka-transport's:
//! what the broker's fetch wait costs in latency.
//! TRELLIS_BENCH_PINGS, _WARMUP, _FRAMES, _BATCH and _PAYLOAD are as above.
//!
//! The throughput lines also give CPU time per frame, of this process (both ends,
//! wasm, librdkafka's threads) and of the broker, read from /proc.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{Kafka, free_port, runtime};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis::points::transport::{self, Link};
use trellis::runtime::{Plugin, Runtime};
use trellis::wit::command_transport::{Frame, Lane};

/// The agent's name on the links (with the round's number) and the raw records' key.
const AGENT: &str = "bench-agent";

/// Any single wait longer than this is a failure, not a slow result.
const STUCK: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------
// Settings and results

struct Knobs {
    rounds: usize,
    pings: usize,
    warmup: usize,
    frames: u64,
    batch: u64,
    payload: usize,
    only: String,
    raw_headers: bool,
    raw_partitions: i32,
    fetch_wait_ms: u64,
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

impl Knobs {
    fn from_env() -> Knobs {
        Knobs {
            // 7: on a shared 2-vCPU VM single rounds scatter by +-10 %.
            rounds: env_num("TRELLIS_BENCH_ROUNDS", 7).max(1) as usize,
            pings: env_num("TRELLIS_BENCH_PINGS", 500).max(1) as usize,
            warmup: env_num("TRELLIS_BENCH_WARMUP", 50) as usize,
            frames: env_num("TRELLIS_BENCH_FRAMES", 50_000).max(1),
            batch: env_num("TRELLIS_BENCH_BATCH", 100).max(1),
            payload: env_num("TRELLIS_BENCH_PAYLOAD", 200).max(8) as usize,
            only: std::env::var("TRELLIS_BENCH_ONLY").unwrap_or_default(),
            raw_headers: std::env::var("TRELLIS_BENCH_RAW_HEADERS").is_ok_and(|v| v == "1"),
            raw_partitions: env_num("TRELLIS_BENCH_RAW_PARTITIONS", 1).clamp(1, 2) as i32,
            fetch_wait_ms: env_num("TRELLIS_BENCH_FETCH_WAIT_MS", 10),
        }
    }

    fn runs(&self, contender: &str) -> bool {
        self.only.is_empty() || self.only.split(',').any(|c| c == contender)
    }
}

/// One round of one contender.
struct Round {
    /// Round trips, sorted.
    rtt: Vec<Duration>,
    /// Side A's send calls during the round trips, sorted.
    send: Vec<Duration>,
    /// Throughput, frames per second.
    rate: f64,
    /// The median bulk `send` call (one batch: produced and acknowledged).
    batch: Duration,
    /// CPU time per frame during the throughput run: this process (both ends, the
    /// plugins, librdkafka's threads) and the broker.
    cpu: Duration,
    broker_cpu: Duration,
}

/// Throughput and CPU time per frame of one throughput run.
impl Round {
    fn of((rtt, send): (Vec<Duration>, Vec<Duration>), t: Throughput) -> Round {
        Round {
            rtt,
            send,
            rate: t.rate,
            batch: t.batch,
            cpu: t.cpu,
            broker_cpu: t.broker_cpu,
        }
    }
}

struct Throughput {
    rate: f64,
    batch: Duration,
    cpu: Duration,
    broker_cpu: Duration,
}

/// The broker's pid, to read its CPU time.
static BROKER_PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// CPU time used so far (user + system) by this process and by the broker.
fn cpu_now() -> (Duration, Duration) {
    // SAFETY: getrusage fills the struct it is given; nothing else is touched.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    let own = tv(u.ru_utime) + tv(u.ru_stime);
    // /proc/<pid>/stat: fields 14 and 15 (utime, stime) in clock ticks, after the
    // command name in parentheses.
    let broker = BROKER_PID
        .get()
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .and_then(|st| {
            let rest = &st[st.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            // SAFETY: sysconf only reads a configuration value.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
            Some(Duration::from_nanos(ticks * 1_000_000_000 / hz))
        })
        .unwrap_or_default();
    (own, broker)
}

impl Throughput {
    fn measure(
        n: u64,
        wall: Duration,
        cpu_start: (Duration, Duration),
        mut batches: Vec<Duration>,
    ) -> Throughput {
        let now = cpu_now();
        batches.sort();
        Throughput {
            rate: n as f64 / wall.as_secs_f64(),
            batch: quantile(&batches, 0.5),
            cpu: (now.0 - cpu_start.0) / n as u32,
            broker_cpu: (now.1 - cpu_start.1) / n as u32,
        }
    }
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn median_f64(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Medians over rounds: (RTT p50, RTT p99, send p50) in ms and frames/s.
struct Summary {
    p50: f64,
    p99: f64,
    send: f64,
    rate: f64,
    /// The median bulk send call, ms.
    batch: f64,
    /// CPU µs per frame: this process, the broker.
    cpu: f64,
    broker_cpu: f64,
}

fn summarize(rounds: &[Round]) -> Option<Summary> {
    if rounds.is_empty() {
        return None;
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let over = |f: &dyn Fn(&Round) -> f64| median_f64(rounds.iter().map(f).collect());
    Some(Summary {
        p50: over(&|r| ms(quantile(&r.rtt, 0.5))),
        p99: over(&|r| ms(quantile(&r.rtt, 0.99))),
        send: over(&|r| ms(quantile(&r.send, 0.5))),
        rate: over(&|r| r.rate),
        batch: over(&|r| ms(r.batch)),
        cpu: over(&|r| r.cpu.as_secs_f64() * 1e6),
        broker_cpu: over(&|r| r.broker_cpu.as_secs_f64() * 1e6),
    })
}

fn show_round(name: &str, r: &Round) {
    println!(
        "  {name:<16} rtt p50 {:>7.3} ms  p99 {:>7.3} ms  (send {:>5.3} ms)  \
         {:>7.0} frames/s  (send of a batch {:>5.3} ms)  cpu/frame {:>4.1} µs + broker {:>4.1} µs",
        quantile(&r.rtt, 0.5).as_secs_f64() * 1e3,
        quantile(&r.rtt, 0.99).as_secs_f64() * 1e3,
        quantile(&r.send, 0.5).as_secs_f64() * 1e3,
        r.rate,
        r.batch.as_secs_f64() * 1e3,
        r.cpu.as_secs_f64() * 1e6,
        r.broker_cpu.as_secs_f64() * 1e6,
    );
}

/// A payload of `len` bytes whose first 8 are `id` (little endian).
fn payload(id: u64, len: usize) -> Vec<u8> {
    let mut p = vec![b'x'; len];
    p[..8].copy_from_slice(&id.to_le_bytes());
    p
}

fn id_of(payload: &[u8]) -> u64 {
    u64::from_le_bytes(
        payload[..8]
            .try_into()
            .expect("a payload of at least 8 bytes"),
    )
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

// ---------------------------------------------------------------------------------
// The plugins: both ends of one link, through the host adapter

/// A transport plugin, loaded, with the controller's listener.
struct Side {
    plugin: Arc<Plugin>,
    listener: transport::Listener,
}

async fn side(rt: &Runtime, bundle: &Path, plugin: &str) -> Side {
    let p = rt
        .load(&bundle.join(plugin))
        .await
        .unwrap_or_else(|e| panic!("loading {plugin} from {}: {e}", bundle.display()));
    let listener = transport::listen(p.clone()).await.expect("listen");
    Side {
        plugin: p,
        listener,
    }
}

/// A controller-agent link: the agent's end and the controller's (accepted) end, with
/// the next sequence numbers to use.
struct Pair {
    agent: Arc<Link>,
    controller: Arc<Link>,
    agent_control: u64,
    controller_control: u64,
    bulk: u64,
    next_id: u64,
}

/// A new link for agent `agent` (for Kafka: topics of its own, so every round starts
/// on empty partitions: no round inherits another's history).
async fn pair(side: &Side, agent: &str) -> Pair {
    let link = transport::connect(side.plugin.clone(), agent)
        .await
        .expect("connect");
    let t = Instant::now();
    let controller = loop {
        if let Some(l) = side.listener.accept(500).await.expect("accept") {
            break l;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no link accepted");
    };
    Pair {
        agent: Arc::new(link),
        controller: Arc::new(controller),
        agent_control: 0,
        controller_control: 0,
        bulk: 0,
        next_id: 1,
    }
}

fn frame(lane: Lane, seq: u64, payload: Vec<u8>) -> Frame {
    Frame { lane, seq, payload }
}

/// Round trips; (RTTs, A's send calls), both sorted.
async fn link_rtt(p: &mut Pair, k: &Knobs) -> (Vec<Duration>, Vec<Duration>) {
    // The controller echoes every control frame back, until an empty one.
    let ctl = p.controller.clone();
    let mut cseq = p.controller_control;
    let echo = tokio::spawn(async move {
        loop {
            for f in ctl.receive(200).await.expect("controller receive") {
                assert_eq!(f.lane, Lane::Control, "a bulk frame during round trips");
                if f.payload.is_empty() {
                    return cseq;
                }
                cseq += 1;
                ctl.send(vec![frame(Lane::Control, cseq, f.payload)])
                    .await
                    .expect("controller send");
            }
        }
    });
    let (mut rtt, mut send) = (Vec::new(), Vec::new());
    for i in 0..k.warmup + k.pings {
        let id = p.next_id;
        p.next_id += 1;
        p.agent_control += 1;
        let t = Instant::now();
        p.agent
            .send(vec![frame(
                Lane::Control,
                p.agent_control,
                payload(id, k.payload),
            )])
            .await
            .expect("agent send");
        let sent = t.elapsed();
        loop {
            assert!(t.elapsed() < STUCK, "frame {id} did not come back");
            let back = p.agent.receive(1000).await.expect("agent receive");
            if let [f] = &back[..] {
                assert_eq!(id_of(&f.payload), id, "an unexpected frame came back");
                assert_eq!(f.payload.len(), k.payload);
                break;
            }
            assert!(back.is_empty(), "{} frames came back, not one", back.len());
        }
        if i >= k.warmup {
            rtt.push(t.elapsed());
            send.push(sent);
        }
    }
    p.agent_control += 1;
    p.agent
        .send(vec![frame(Lane::Control, p.agent_control, Vec::new())])
        .await
        .expect("agent send");
    p.controller_control = echo.await.expect("the echo task");
    rtt.sort();
    send.sort();
    (rtt, send)
}

/// Throughput: frames per second from the agent to the controller.
async fn link_throughput(p: &mut Pair, k: &Knobs) -> Throughput {
    let (first, n, batch, len) = (p.bulk + 1, k.frames, k.batch, k.payload);
    let agent = p.agent.clone();
    let cpu = cpu_now();
    let t0 = Instant::now();
    let sender = tokio::spawn(async move {
        let (mut seq, mut calls) = (first, Vec::new());
        while seq < first + n {
            let m = batch.min(first + n - seq);
            let frames = (seq..seq + m)
                .map(|s| frame(Lane::Bulk, s, payload(s, len)))
                .collect();
            let t = Instant::now();
            agent.send(frames).await.expect("agent send");
            calls.push(t.elapsed());
            seq += m;
        }
        calls
    });
    let mut expect = first;
    while expect < first + n {
        assert!(
            t0.elapsed() < STUCK,
            "throughput: frame {expect} of {first}..{} did not arrive",
            first + n
        );
        for f in p
            .controller
            .receive(1000)
            .await
            .expect("controller receive")
        {
            assert_eq!(f.lane, Lane::Bulk);
            assert_eq!(f.seq, expect, "frames lost, repeated or out of order");
            assert_eq!(id_of(&f.payload), expect);
            assert_eq!(f.payload.len(), len);
            expect += 1;
        }
    }
    let wall = t0.elapsed();
    let calls = sender.await.expect("the sending task");
    p.bulk = first + n - 1;
    Throughput::measure(n, wall, cpu, calls)
}

async fn link_round(p: &mut Pair, k: &Knobs) -> Round {
    let rtts = link_rtt(p, k).await;
    Round::of(rtts, link_throughput(p, k).await)
}

// ---------------------------------------------------------------------------------
// Raw rdkafka, with the host's settings

/// Mirrors `capabilities::kafka::MAX_PAYLOAD`.
const MAX_PAYLOAD: u32 = 900 << 10;

struct Raw {
    producer: FutureProducer,
    /// This round's topics.
    ping: String,
    pong: String,
    bulk_topic: String,
    /// Side A reads the pongs, side B the pings; `bulk` takes the throughput run.
    pongs: Arc<StreamConsumer>,
    pings: Arc<StreamConsumer>,
    bulk: StreamConsumer,
    next_id: u64,
    headers: bool,
}

/// As `KafkaClient::new` makes the host's producer.
fn raw_producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        .set("message.max.bytes", (MAX_PAYLOAD + (64 << 10)).to_string())
        .create()
        .expect("the producer")
}

/// As the host's `consume` with `Start::Latest`: manual assignment of every partition
/// at its end offset now.
fn raw_consumer(
    brokers: &str,
    group: &str,
    topic: &str,
    partitions: i32,
    fetch_wait_ms: u64,
) -> StreamConsumer {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", fetch_wait_ms.to_string())
        .set(
            "fetch.message.max.bytes",
            (MAX_PAYLOAD + (64 << 10)).to_string(),
        )
        .create()
        .expect("a consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        // A topic just created has no leader for a moment on Apache Kafka (the host
        // waits the same way: `capabilities::kafka::while_leaderless`).
        let t = std::time::Instant::now();
        let end = loop {
            match tokio::task::block_in_place(|| {
                c.fetch_watermarks(topic, p, Duration::from_secs(10))
            }) {
                Ok((_, end)) => break end,
                Err(e) if t.elapsed() < Duration::from_secs(30) => {
                    eprintln!("  (raw consumer: {e}; asking again)");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("watermarks of {topic}:{p}: {e}"),
            }
        };
        tpl.add_partition_offset(topic, p, Offset::Offset(end))
            .unwrap();
    }
    c.assign(&tpl).expect("assign");
    c
}

/// Fresh topics and consumers for `round` (see `pair`), on the one producer.
async fn raw(brokers: &str, k: &Knobs, producer: &FutureProducer, round: usize) -> Raw {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("the admin client");
    let [ping, pong, bulk] = ["ping", "pong", "bulk"].map(|t| format!("bench.{round}.{t}"));
    let topics: Vec<NewTopic> = [&ping, &pong, &bulk]
        .iter()
        .map(|t| NewTopic::new(t, k.raw_partitions, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for r in admin
        .create_topics(&topics, &opts)
        .await
        .expect("create topics")
    {
        r.expect("a topic");
    }
    let (n, w) = (k.raw_partitions, k.fetch_wait_ms);
    Raw {
        producer: producer.clone(),
        pongs: Arc::new(raw_consumer(brokers, "bench.a", &pong, n, w)),
        pings: Arc::new(raw_consumer(brokers, "bench.b", &ping, n, w)),
        bulk: raw_consumer(brokers, "bench.bulk", &bulk, n, w),
        ping,
        pong,
        bulk_topic: bulk,
        next_id: 1,
        headers: k.raw_headers,
    }
}

/// Unacknowledged payload bytes the raw producer may have queued: the host's bound for
/// one plugin `producer` (`capabilities::kafka::QUEUED_PER_PRODUCER`).
const QUEUED_BYTES: usize = 16 << 20;

/// Produce `payloads` to partition 0 of `topic` (queue all, then await every delivery
/// report, as the host's one-shot `produce` does).
async fn produce(p: &FutureProducer, topic: &str, payloads: &[Vec<u8>], headers: bool) {
    for f in queue(p, topic, payloads, headers) {
        delivered(f, topic).await;
    }
}

/// Await one delivery report.
async fn delivered(f: rdkafka::producer::DeliveryFuture, topic: &str) {
    match f.await {
        Ok(Ok(_)) => {}
        Ok(Err((e, _))) => panic!("produce to {topic}: {e}"),
        Err(_) => panic!("the producer went away"),
    }
}

/// Queue `payloads` for partition 0 of `topic`; their delivery reports.
fn queue(
    p: &FutureProducer,
    topic: &str,
    payloads: &[Vec<u8>],
    headers: bool,
) -> Vec<rdkafka::producer::DeliveryFuture> {
    let mut pending = Vec::with_capacity(payloads.len());
    for body in payloads {
        let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
            .payload(&body[..])
            .key(AGENT.as_bytes())
            .partition(0);
        if headers {
            // What the plugin puts on each record (see plugins/kafka-transport).
            let seq = id_of(body).to_string();
            let h = OwnedHeaders::new_with_capacity(4)
                .insert(Header {
                    key: "trellis-link",
                    value: Some("0123456789abcdef0123456789abcdef"),
                })
                .insert(Header {
                    key: "trellis-lane",
                    value: Some("control"),
                })
                .insert(Header {
                    key: "trellis-seq",
                    value: Some(seq.as_str()),
                })
                .insert(Header {
                    key: "trellis-chunk",
                    value: Some("0/1"),
                });
            rec = rec.headers(h);
        }
        match p.send_result(rec) {
            Ok(f) => pending.push(f),
            Err((e, _)) => panic!("produce to {topic}: {e}"),
        }
    }
    pending
}

/// The next record's payload (copied), waiting at most STUCK.
async fn next_payload(c: &StreamConsumer, what: &str) -> Vec<u8> {
    match tokio::time::timeout(STUCK, c.recv()).await {
        Ok(Ok(m)) => m.payload().unwrap_or_default().to_vec(),
        Ok(Err(e)) => panic!("{what}: {e}"),
        Err(_) => panic!("{what}: nothing within {STUCK:?}"),
    }
}

async fn raw_rtt(r: &mut Raw, k: &Knobs) -> (Vec<Duration>, Vec<Duration>) {
    // Side B echoes every ping as a pong, until an empty one.
    let (pings, producer, headers) = (r.pings.clone(), r.producer.clone(), r.headers);
    let pong = r.pong.clone();
    let echo = tokio::spawn(async move {
        loop {
            let body = next_payload(&pings, "side B").await;
            if body.is_empty() {
                return;
            }
            produce(&producer, &pong, &[body], headers).await;
        }
    });
    let (mut rtt, mut send) = (Vec::new(), Vec::new());
    for i in 0..k.warmup + k.pings {
        let id = r.next_id;
        r.next_id += 1;
        let t = Instant::now();
        produce(&r.producer, &r.ping, &[payload(id, k.payload)], r.headers).await;
        let sent = t.elapsed();
        let back = next_payload(&r.pongs, "side A").await;
        assert_eq!(id_of(&back), id, "an unexpected pong");
        assert_eq!(back.len(), k.payload);
        if i >= k.warmup {
            rtt.push(t.elapsed());
            send.push(sent);
        }
    }
    // The stop signal: an empty record (the 8-byte id check is not reached for it).
    r.producer
        .send_result(
            FutureRecord::<'_, [u8], [u8]>::to(&r.ping)
                .payload(&[][..])
                .partition(0),
        )
        .map_err(|(e, _)| e)
        .expect("produce the stop record")
        .await
        .expect("the producer")
        .map_err(|(e, _)| e)
        .expect("the stop record");
    echo.await.expect("the echo task");
    rtt.sort();
    send.sort();
    (rtt, send)
}

async fn raw_throughput(r: &mut Raw, k: &Knobs) -> Throughput {
    let (first, n, batch, len, headers) = (r.next_id, k.frames, k.batch, k.payload, r.headers);
    r.next_id += n;
    let (producer, topic) = (r.producer.clone(), r.bulk_topic.clone());
    let cpu = cpu_now();
    let t0 = Instant::now();
    // Batches are queued without waiting for the previous ones' delivery, up to the
    // bytes the host lets one producer have unacknowledged (`QUEUED_PER_PRODUCER`,
    // 16 MiB), as kafka-transport's queued sends are: the same pipelining on both sides.
    let sender = tokio::spawn(async move {
        let (mut id, mut calls) = (first, Vec::new());
        let mut in_flight: std::collections::VecDeque<(usize, rdkafka::producer::DeliveryFuture)> =
            Default::default();
        let mut queued_bytes = 0usize;
        while id < first + n {
            let m = batch.min(first + n - id);
            let bodies: Vec<Vec<u8>> = (id..id + m).map(|i| payload(i, len)).collect();
            let t = Instant::now();
            while queued_bytes + m as usize * len > QUEUED_BYTES
                && let Some((bytes, f)) = in_flight.pop_front()
            {
                delivered(f, &topic).await;
                queued_bytes -= bytes;
            }
            for f in queue(&producer, &topic, &bodies, headers) {
                in_flight.push_back((len, f));
            }
            queued_bytes += m as usize * len;
            calls.push(t.elapsed());
            id += m;
        }
        for (_, f) in in_flight {
            delivered(f, &topic).await;
        }
        calls
    });
    for expect in first..first + n {
        let body = next_payload(&r.bulk, "throughput").await;
        assert_eq!(
            id_of(&body),
            expect,
            "records lost, repeated or out of order"
        );
        assert_eq!(body.len(), len);
    }
    let wall = t0.elapsed();
    let calls = sender.await.expect("the producing task");
    Throughput::measure(n, wall, cpu, calls)
}

async fn raw_round(r: &mut Raw, k: &Knobs) -> Round {
    let rtts = raw_rtt(r, k).await;
    Round::of(rtts, raw_throughput(r, k).await)
}

// ---------------------------------------------------------------------------------

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let bundle = std::env::var_os("TRELLIS_BUNDLE_DIR")
        .map(std::path::PathBuf::from)
        .expect("run with `cargo xtask bench transport` (TRELLIS_BUNDLE_DIR is not set)");
    let k = Knobs::from_env();
    let broker = Kafka::start();
    let _ = BROKER_PID.set(broker.pid(0));
    let brokers = broker.brokers();
    let tcp_port = free_port();
    let tcp01_port = free_port();
    let fixtures = std::env::var_os("TRELLIS_FIXTURES_DIR").map(std::path::PathBuf::from);
    let base = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
        [kafka]
        brokers = "{brokers}"
        properties = {{ "fetch.wait.max.ms" = "{fetch_wait}" }}
        [plugins.kafka-transport]
        kafka = {{ topics = ["trellis."] }}
        config = {{ prefix = "trellis" }}
        [plugins.tcp-transport]
        sockets = {{ bind = ["127.0.0.1:{tcp_port}"], connect = ["127.0.0.1:{tcp_port}"] }}
        config = {{ address = "127.0.0.1:{tcp_port}" }}
        [plugins.tcp-transport-v0-1]
        sockets = {{ bind = ["127.0.0.1:{tcp01_port}"], connect = ["127.0.0.1:{tcp01_port}"] }}
        config = {{ address = "127.0.0.1:{tcp01_port}" }}
        "#,
        fetch_wait = k.fetch_wait_ms
    );
    let rt = runtime(&config, base.path(), &[]);

    println!(
        "trellis transport benchmark: round trips of one {}-byte frame ({} after {} warm-up), \
         {} frames of {} bytes in sends of {} (median of {} rounds; same run, same broker)",
        k.payload, k.pings, k.warmup, k.frames, k.payload, k.batch, k.rounds
    );
    println!(
        "broker: Apache Kafka 4.4 (one KRaft node) on {brokers}   load average: {}",
        load_average()
    );
    if k.raw_headers || k.raw_partitions > 1 || k.fetch_wait_ms != 10 {
        println!(
            "raw rdkafka variant: headers {}, {} partition(s) per topic, fetch.wait.max.ms {} (kafka-transport too)",
            if k.raw_headers {
                "as the plugin's"
            } else {
                "none"
            },
            k.raw_partitions,
            k.fetch_wait_ms
        );
    }

    let kafka = match k.runs("kafka") {
        true => Some(side(&rt, &bundle, "kafka-transport").await),
        false => None,
    };
    let tcp = match k.runs("tcp") {
        true => Some(side(&rt, &bundle, "tcp-transport").await),
        false => None,
    };
    let tcp01 = match (&fixtures, k.runs("tcp01")) {
        (Some(f), true) => Some(side(&rt, f, "tcp-transport-v0-1").await),
        _ => None,
    };
    let producer = raw_producer(&brokers);

    let (mut kr, mut rr, mut tr, mut t1) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..k.rounds {
        println!("round {}", round + 1);
        // Each round on fresh links and topics, and in a rotated order: a broker that
        // slows down as it fills (or warms up) must not favour whoever goes first.
        for turn in 0..4 {
            match (round + turn) % 4 {
                0 if kafka.is_some() => {
                    let side = kafka.as_ref().expect("checked");
                    let mut p = pair(side, &format!("{AGENT}-{round}")).await;
                    let r = link_round(&mut p, &k).await;
                    show_round("kafka-transport", &r);
                    kr.push(r);
                }
                1 if k.runs("rdkafka") => {
                    let mut raw = raw(&brokers, &k, &producer, round).await;
                    let r = raw_round(&mut raw, &k).await;
                    show_round("raw rdkafka", &r);
                    rr.push(r);
                }
                2 if tcp.is_some() => {
                    let side = tcp.as_ref().expect("checked");
                    let mut p = pair(side, &format!("{AGENT}-{round}")).await;
                    let r = link_round(&mut p, &k).await;
                    show_round("tcp-transport", &r);
                    tr.push(r);
                }
                3 if tcp01.is_some() => {
                    let side = tcp01.as_ref().expect("checked");
                    let mut p = pair(side, &format!("{AGENT}-{round}")).await;
                    let r = link_round(&mut p, &k).await;
                    show_round("tcp-transport 0.1.0", &r);
                    t1.push(r);
                }
                _ => {}
            }
        }
    }

    println!(
        "\nmedian of {} rounds     RTT p50     RTT p99   send p50     frames/s   \
         batch send   cpu µs/frame (+ broker)",
        k.rounds
    );
    let show = |name: &str, s: &Option<Summary>| {
        if let Some(s) = s {
            println!(
                "  {name:<18} {:>7.3} ms  {:>7.3} ms  {:>6.3} ms  {:>11.0}   {:>6.3} ms   \
                 {:>5.1} (+ {:.1})",
                s.p50, s.p99, s.send, s.rate, s.batch, s.cpu, s.broker_cpu
            );
        }
    };
    let (ks, rs, ts, t1s) = (
        summarize(&kr),
        summarize(&rr),
        summarize(&tr),
        summarize(&t1),
    );
    show("kafka-transport", &ks);
    show("raw rdkafka", &rs);
    show("tcp-transport", &ts);
    show("tcp 0.1.0 build", &t1s);
    println!("load average at the end: {}", load_average());

    if let (Some(ks), Some(rs)) = (&ks, &rs) {
        let verdict = |ok: bool| if ok { "met" } else { "NOT MET" };
        println!("\nratios, kafka-transport / raw rdkafka");
        let p50 = ks.p50 / rs.p50;
        let p99 = ks.p99 / rs.p99;
        let thr = ks.rate / rs.rate;
        println!(
            "  latency p50   {p50:>6.2}x   target <= 1.2x   {}",
            verdict(p50 <= 1.2)
        );
        println!(
            "  latency p99   {p99:>6.2}x   target <= 1.2x   {}",
            verdict(p99 <= 1.2)
        );
        println!(
            "  throughput    {thr:>6.2}x   target >= 0.9x   {}",
            verdict(thr >= 0.9)
        );
        // The same, paired: each round's two contenders ran back to back.
        let mut paired: Vec<f64> = kr.iter().zip(&rr).map(|(k, r)| k.rate / r.rate).collect();
        paired.sort_by(f64::total_cmp);
        if let (Some(lo), Some(hi)) = (paired.first(), paired.last()) {
            println!(
                "  throughput per round: median {:.2}x, range {lo:.2}x - {hi:.2}x",
                paired[paired.len() / 2]
            );
        }
    }
    if let (Some(ks), Some(ts)) = (&ks, &ts) {
        println!(
            "for scale, tcp-transport: RTT p50 {:.3} ms ({:.0}x faster than kafka-transport), \
             {:.0} frames/s ({:.1}x)",
            ts.p50,
            ks.p50 / ts.p50,
            ts.rate,
            ts.rate / ks.rate
        );
    }
    if let (Some(ts), Some(t1s)) = (&ts, &t1s) {
        // The same source, the same rounds: the cost of the 0.1.0 bindings and the frame
        // conversions. Paired per round, since the two ran back to back.
        let mut paired: Vec<f64> = t1.iter().zip(&tr).map(|(o, n)| o.rate / n.rate).collect();
        paired.sort_by(f64::total_cmp);
        println!(
            "\nserving 0.1.0 (tcp-transport's 0.1.0 build / its 0.2.0 build): RTT p50 {:.2}x, \
             frames/s {:.2}x (per round: median {:.2}x, range {:.2}x - {:.2}x), cpu/frame {:.2}x",
            t1s.p50 / ts.p50,
            t1s.rate / ts.rate,
            paired[paired.len() / 2],
            paired[0],
            paired[paired.len() - 1],
            t1s.cpu / ts.cpu
        );
    }
    drop(kafka);
    drop(tcp);
    drop(tcp01);
    drop(broker);
}

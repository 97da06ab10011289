//! `trellis:host/kafka`: produce and consume through the host's librdkafka client.
//!
//! The cluster (brokers, TLS, SASL, credentials) is the operator's `[kafka]` section;
//! a plugin names only topics, and only under the prefixes granted to it
//! (`[plugins.<name>] kafka = { topics = ["trellis."] }`). One producer and one admin
//! client serve every plugin; each `consume` makes a consumer with manual assignment
//! and manual commits, owned by the plugin instance that asked for it.
//!
//! A consumer is also a `wasi:io/poll` pollable (0.1.1, `consumer.subscribe`): ready when
//! a record is buffered for it. Waiting takes the next record from librdkafka's queue
//! and holds it (`peeked`) for the next `poll`, so the host can wait on many consumers
//! at once, in host code, with no plugin call while nothing arrives.

use crate::runtime::state::InstanceState;
use crate::wit::host_kafka::{
    Header, Host, HostConsumer, HostProducer, Incoming, KafkaError, Outgoing, Start,
};
use futures_util::FutureExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer as _, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError as RdError, RDKafkaErrorCode};
use rdkafka::message::{
    BorrowedMessage, Header as RdHeader, Headers, Message, OwnedHeaders, OwnedMessage,
};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wasmtime::component::Resource;
use wasmtime_wasi::p2::{DynPollable, Pollable};

/// Largest payload a plugin may produce in one record: under the broker default
/// `message.max.bytes` (1 MB) with room for key, headers and batch overhead.
pub const MAX_PAYLOAD: u32 = 900 << 10;

/// How long a fetch may wait at the broker for a record (see `consume`).
const FETCH_WAIT_MS: &str = "500";

/// How long a produce may take before it is reported `retryable`.
const PRODUCE_TIMEOUT: Duration = Duration::from_secs(30);

/// Payload bytes one `producer` may have queued and not yet acknowledged; past it,
/// `send-packed` waits. Bounds what a plugin can pile up in the shared client.
const QUEUED_PER_PRODUCER: usize = 16 << 20;

/// The operator's cluster settings, resolved (the password already read from the store).
#[derive(Clone)]
pub struct ClusterSettings {
    pub brokers: String,
    /// librdkafka properties (security.protocol, ssl.ca.location, sasl.mechanism, ...).
    pub properties: BTreeMap<String, String>,
    pub sasl_username: Option<String>,
    pub sasl_password: Option<String>,
}

impl std::fmt::Debug for ClusterSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSettings")
            .field("brokers", &self.brokers)
            .field("properties", &self.properties)
            .field("sasl_username", &self.sasl_username)
            .finish_non_exhaustive() // never the password
    }
}

/// How long admin requests and watermark look-ups may take: under a plugin's default
/// 10 s call deadline, so the plugin gets an error that says what went wrong instead of
/// being cut off.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The host's client for one cluster, shared by every plugin granted Kafka.
pub struct KafkaClient {
    settings: ClusterSettings,
    producer: FutureProducer<ClusterContext>,
    admin: AdminClient<ClusterContext>,
    context: ClusterContext,
}

/// librdkafka reports cluster-wide trouble (a refused login, a broker that cannot be
/// reached, a bad certificate) through a callback, not on the request that then times
/// out. The context keeps the latest few distinct errors so a timeout can say *why*
/// ("timed out" alone sends an operator looking in the wrong place). Several, because the
/// cause (a refused login) is followed at once by its consequence ("all brokers down").
#[derive(Clone, Default)]
pub struct ClusterContext {
    recent_errors: Arc<Mutex<Vec<(Instant, String)>>>,
}

/// How many distinct recent errors a timeout reports.
const RECENT_ERRORS: usize = 3;

/// Errors older than this are not blamed for a timeout.
const BLAME_WINDOW: Duration = Duration::from_secs(60);

impl ClusterContext {
    /// " (the cluster's recent errors: ...; ...)", or nothing when all was quiet.
    fn explain(&self) -> String {
        let recent = self.recent_errors.lock().unwrap();
        let fresh: Vec<&str> = recent
            .iter()
            .filter(|(at, _)| at.elapsed() < BLAME_WINDOW)
            .map(|(_, e)| e.as_str())
            .collect();
        if fresh.is_empty() {
            return String::new();
        }
        let mut hints: Vec<&str> = fresh.iter().map(|e| hint(e)).collect();
        hints.dedup();
        let hints = hints.concat();
        format!(
            " (the cluster's recent errors: {}{hints})",
            fresh.join("; ")
        )
    }

    fn record(&self, error: String) {
        let mut recent = self.recent_errors.lock().unwrap();
        recent.retain(|(_, e)| *e != error);
        recent.push((Instant::now(), error));
        if recent.len() > RECENT_ERRORS {
            recent.remove(0);
        }
    }
}

/// The operator's fix for errors with a known cause.
fn hint(error: &str) -> &'static str {
    let e = error.to_lowercase();
    if e.contains("authentication") || e.contains("sasl") {
        "; check [kafka] sasl-username, the secret named by sasl-password-secret and \"sasl.mechanisms\""
    } else if e.contains("ssl") || e.contains("certificate") {
        "; check [kafka] properties \"security.protocol\" and \"ssl.ca.location\""
    } else {
        ""
    }
}

impl ClientContext for ClusterContext {
    fn error(&self, error: RdError, reason: &str) {
        tracing::warn!(target: "trellis::kafka", "{error}: {reason}");
        self.record(format!("{error}: {reason}"));
    }
}

impl ConsumerContext for ClusterContext {}

impl KafkaClient {
    /// Make the clients. librdkafka connects lazily, so a broker that is down is not an
    /// error here; it shows as `retryable` on first use.
    pub fn new(settings: ClusterSettings) -> anyhow::Result<KafkaClient> {
        let base = base_config(&settings);
        let context = ClusterContext::default();
        let producer: FutureProducer<ClusterContext> = base
            .clone()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .set("message.max.bytes", (MAX_PAYLOAD + (64 << 10)).to_string())
            .create_with_context(context.clone())
            .map_err(|e| anyhow::anyhow!("cannot make the Kafka producer: {e}"))?;
        let admin = base
            .create_with_context(context.clone())
            .map_err(|e| anyhow::anyhow!("cannot make the Kafka admin client: {e}"))?;
        Ok(KafkaClient {
            settings,
            producer,
            admin,
            context,
        })
    }
}

fn base_config(s: &ClusterSettings) -> ClientConfig {
    let mut c = ClientConfig::new();
    apply_cluster(&mut c, s);
    c
}

/// The operator's cluster settings onto `c` (over what it has).
fn apply_cluster(c: &mut ClientConfig, s: &ClusterSettings) {
    c.set("bootstrap.servers", &s.brokers);
    for (k, v) in &s.properties {
        c.set(k, v);
    }
    if let Some(u) = &s.sasl_username {
        c.set("sasl.username", u);
    }
    if let Some(p) = &s.sasl_password {
        c.set("sasl.password", p);
    }
}

/// One plugin's access: its topic prefixes, the shared client.
#[derive(Clone, Default)]
pub struct KafkaGate {
    pub prefixes: Arc<Vec<String>>,
    pub client: Option<Arc<KafkaClient>>,
}

impl std::fmt::Debug for KafkaGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaGate")
            .field("prefixes", &self.prefixes)
            .field("cluster", &self.client.as_ref().map(|c| &c.settings))
            .finish()
    }
}

/// A consumer made for a plugin (lives in its instance's resource table).
pub struct Consumer {
    /// Always Some until dropped (see `Drop`).
    inner: Option<StreamConsumer<ClusterContext>>,
    /// The last offset handed to the plugin, per topic and partition. A consumer only
    /// moves forward, so a record at or below it is a redelivery: seen with tansu,
    /// where a reader positioned at the end got the next record again on every poll
    /// (the conformance kit's new-link check found it). Dropped here, once for all.
    delivered: std::sync::Mutex<std::collections::HashMap<(String, i32), i64>>,
    /// What a wait for readiness took from the queue (already counted in `delivered`):
    /// the next `poll` hands it out first.
    peeked: Option<Result<OwnedMessage, RdError>>,
}

impl Consumer {
    fn get(&self) -> &StreamConsumer<ClusterContext> {
        self.inner.as_ref().expect("present until dropped")
    }

    /// Whether `m` is past what was handed out already on its partition (and note it).
    fn fresh(&self, m: &BorrowedMessage<'_>) -> bool {
        let mut delivered = self.delivered.lock().unwrap_or_else(|p| p.into_inner());
        let last = delivered
            .entry((m.topic().to_string(), m.partition()))
            .or_insert(-1);
        if m.offset() > *last {
            *last = m.offset();
            return true;
        }
        tracing::debug!(
            topic = m.topic(),
            partition = m.partition(),
            offset = m.offset(),
            "a record delivered again by the client: dropped"
        );
        false
    }
}

/// Ready once a fresh record (or an error) is buffered. Cancel-safe (the host's waiter
/// drops this future whenever a link calls in): `recv` is, and a record it returned is
/// kept in `peeked` before anything else can be cancelled.
impl Pollable for Consumer {
    fn ready<'life0, 'async_trait>(
        &'life0 mut self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            while self.peeked.is_none() {
                let got = match self.get().recv().await {
                    Ok(m) if !self.fresh(&m) => continue,
                    Ok(m) => Ok(m.detach()),
                    Err(e) if passing(&e) => continue,
                    Err(e) => Err(e),
                };
                self.peeked = Some(got);
            }
        })
    }
}

/// A record from either place a `poll` takes them: held by a readiness wait, or
/// straight from the client's queue (no copy).
enum Got<'a> {
    Held(OwnedMessage),
    Queued(BorrowedMessage<'a>),
}

impl Got<'_> {
    fn topic(&self) -> &str {
        match self {
            Got::Held(m) => m.topic(),
            Got::Queued(m) => m.topic(),
        }
    }
    fn partition(&self) -> i32 {
        match self {
            Got::Held(m) => m.partition(),
            Got::Queued(m) => m.partition(),
        }
    }
    fn offset(&self) -> i64 {
        match self {
            Got::Held(m) => m.offset(),
            Got::Queued(m) => m.offset(),
        }
    }
    fn key(&self) -> Option<&[u8]> {
        match self {
            Got::Held(m) => m.key(),
            Got::Queued(m) => m.key(),
        }
    }
    fn payload(&self) -> Option<&[u8]> {
        match self {
            Got::Held(m) => m.payload(),
            Got::Queued(m) => m.payload(),
        }
    }
    fn timestamp_ms(&self) -> Option<i64> {
        match self {
            Got::Held(m) => m.timestamp().to_millis(),
            Got::Queued(m) => m.timestamp().to_millis(),
        }
    }
    /// Each header as (key, value); a header without a value has an empty one.
    fn each_header(&self, mut f: impl FnMut(&str, &[u8])) {
        match self {
            Got::Held(m) => {
                if let Some(hs) = m.headers() {
                    for h in hs.iter() {
                        f(h.key, h.value.unwrap_or_default());
                    }
                }
            }
            Got::Queued(m) => {
                if let Some(hs) = m.headers() {
                    for h in hs.iter() {
                        f(h.key, h.value.unwrap_or_default());
                    }
                }
            }
        }
    }
}

/// librdkafka's consumer close waits for the group coordinator with no timeout: with the
/// broker away, dropping a consumer on a runtime thread froze that thread — and the
/// runtime's shutdown — for good. It closes on a thread of its own instead (which ends
/// when the broker answers, or with the process).
impl Drop for Consumer {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            let _ = std::thread::Builder::new()
                .name("kafka-consumer-close".into())
                .spawn(move || drop(inner));
        }
    }
}

/// `fetch` (a watermark query, blocking), asked again while the partition is between
/// leaders or unknown to the client yet, for at most REQUEST_TIMEOUT.
async fn while_leaderless<T>(mut fetch: impl FnMut() -> Result<T, RdError>) -> Result<T, RdError> {
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
    loop {
        match blocking(&mut fetch) {
            Err(e) if tokio::time::Instant::now() < deadline && leaderless(&e) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            answer => return answer,
        }
    }
}

/// Whether `e` is a partition between leaders, or one the client's metadata does not
/// know yet (just created, or its leader gone).
fn leaderless(e: &RdError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownPartition
                | RDKafkaErrorCode::UnknownTopic
        )
    )
}

/// A consumer error librdkafka reports in passing and recovers from by itself: a broker
/// it lost its connection to (killed, restarting), a coordinator or leader that moved.
/// Handing one to the plugin would end its link for what the client rides out anyway;
/// a cluster that stays gone is noticed by the session's heartbeats instead.
fn passing(e: &RdError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::Resolve
                | RDKafkaErrorCode::NetworkException
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::BrokerNotAvailable
                | RDKafkaErrorCode::CoordinatorNotAvailable
                | RDKafkaErrorCode::CoordinatorLoadInProgress
                | RDKafkaErrorCode::NotCoordinator
                | RDKafkaErrorCode::WaitingForCoordinator
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::NotLeaderForPartition
        )
    )
}

fn classify(e: &RdError) -> KafkaError {
    let code = e.rdkafka_error_code();
    let msg = e.to_string();
    match code {
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidPartitions
            | RDKafkaErrorCode::InvalidReplicationFactor
            | RDKafkaErrorCode::UnknownPartition
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::GroupAuthorizationFailed,
        ) => KafkaError::Permanent(msg),
        _ => KafkaError::Retryable(msg),
    }
}

impl InstanceState {
    fn kafka_client(&self) -> Result<Arc<KafkaClient>, KafkaError> {
        self.kafka.client.clone().ok_or_else(|| {
            KafkaError::Denied(
                "no Kafka cluster is configured: the operator adds a [kafka] section with `brokers`"
                    .into(),
            )
        })
    }

    fn check_topic(&self, topic: &str) -> Result<(), KafkaError> {
        if self.kafka.prefixes.iter().any(|p| topic.starts_with(p)) {
            return Ok(());
        }
        self.metrics.denials.fetch_add(1, Relaxed);
        tracing::warn!(
            plugin = %self.plugin,
            "denied Kafka topic `{topic}`: not under a granted prefix {:?}; to allow it add its prefix to [plugins.{}] kafka.topics",
            self.kafka.prefixes,
            self.plugin
        );
        Err(KafkaError::Denied(format!(
            "topic `{topic}` is not under a prefix granted to plugin `{}`",
            self.plugin
        )))
    }
}

/// One record to produce, borrowed from either form a plugin may send (`outgoing`
/// values or a packed buffer).
struct ToProduce<'a> {
    topic: &'a str,
    partition: Option<i32>,
    key: Option<&'a [u8]>,
    headers: ProduceHeaders<'a>,
    payload: &'a [u8],
}

enum ProduceHeaders<'a> {
    Listed(&'a [Header]),
    Packed(trellis_sdk::records::RecordView<'a>),
}

impl<'a> ProduceHeaders<'a> {
    fn to_kafka(&self) -> OwnedHeaders {
        let add = |hs: OwnedHeaders, key: &str, value: &[u8]| {
            hs.insert(RdHeader {
                key,
                value: Some(value),
            })
        };
        match self {
            ProduceHeaders::Listed(l) => l
                .iter()
                .fold(OwnedHeaders::new_with_capacity(l.len()), |hs, h| {
                    add(hs, &h.key, &h.value)
                }),
            ProduceHeaders::Packed(r) => r
                .headers()
                .fold(OwnedHeaders::new_with_capacity(4), |hs, (k, v)| {
                    add(hs, k, v)
                }),
        }
    }
}

impl InstanceState {
    /// Check every record, queue all, then wait for all: in order per partition (the
    /// producer is idempotent). The offsets, in the records' order.
    async fn produce_all<'a>(
        &mut self,
        records: impl Iterator<Item = ToProduce<'a>>,
    ) -> Result<Vec<i64>, KafkaError> {
        let (client, pending) = self.queue_all(records)?;
        acknowledged(&client, pending).await
    }

    /// Check every record, then queue all in the client (in one go: nothing else
    /// queues in between, so they stay in order per partition).
    fn queue_all<'a>(
        &mut self,
        records: impl Iterator<Item = ToProduce<'a>>,
    ) -> Result<(Arc<KafkaClient>, Vec<DeliveryFuture>), KafkaError> {
        let client = self.kafka_client()?;
        let records: Vec<ToProduce<'a>> = records.collect();
        for r in &records {
            self.check_topic(r.topic)?;
            if r.payload.len() > MAX_PAYLOAD as usize {
                return Err(KafkaError::Permanent(format!(
                    "a payload of {} bytes is over the {MAX_PAYLOAD}-byte limit: split it (max-payload)",
                    r.payload.len()
                )));
            }
        }
        let mut pending = Vec::with_capacity(records.len());
        for r in &records {
            let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(r.topic)
                .payload(r.payload)
                .headers(r.headers.to_kafka());
            if let Some(k) = r.key {
                rec = rec.key(k);
            }
            if let Some(p) = r.partition {
                rec = rec.partition(p);
            }
            match client.producer.send_result(rec) {
                Ok(f) => pending.push(f),
                Err((e, _)) => return Err(classify(&e)),
            }
        }
        Ok((client, pending))
    }

    /// Up to `max` records to `each`: waits at most `timeout_ms` for the first, then
    /// takes only what is already here.
    async fn poll_each(
        &mut self,
        this: Resource<Consumer>,
        max: u32,
        timeout_ms: u32,
        mut each: impl FnMut(&Got<'_>),
    ) -> Result<(), KafkaError> {
        let c = self
            .table
            .get_mut(&this)
            .map_err(|e| KafkaError::Permanent(format!("no such consumer: {e}")))?;
        let mut n = 0;
        // What a readiness wait took first: it was read before anything still queued.
        if let Some(held) = c.peeked.take() {
            let m = held.map_err(|e| classify(&e).explained(c.get().context()))?;
            each(&Got::Held(m));
            n += 1;
        }
        let c = &*c;
        let mut next = if n > 0 {
            if n < max {
                c.get().recv().now_or_never()
            } else {
                None
            }
        } else {
            let until = tokio::time::Instant::now() + Duration::from_millis(timeout_ms as u64);
            loop {
                match tokio::time::timeout_at(until, c.get().recv()).await {
                    Err(_) => return Ok(()),
                    Ok(Err(e)) if passing(&e) => continue,
                    Ok(m) => break Some(m),
                }
            }
        };
        while let Some(m) = next.take() {
            let m = match m {
                Err(e) if passing(&e) => {
                    next = c.get().recv().now_or_never();
                    continue;
                }
                m => m.map_err(|e| classify(&e).explained(c.get().context()))?,
            };
            if c.fresh(&m) {
                each(&Got::Queued(m));
                n += 1;
            }
            if n < max {
                next = c.get().recv().now_or_never();
            }
        }
        Ok(())
    }
}

impl Host for InstanceState {
    async fn produce(&mut self, records: Vec<Outgoing>) -> Result<Vec<i64>, KafkaError> {
        self.produce_all(records.iter().map(|r| ToProduce {
            topic: &r.topic,
            partition: r.partition,
            key: r.key.as_deref(),
            headers: ProduceHeaders::Listed(&r.headers),
            payload: &r.payload,
        }))
        .await
    }

    async fn produce_packed(&mut self, records: Vec<u8>) -> Result<Vec<i64>, KafkaError> {
        let views = trellis_sdk::records::decode(&records).map_err(|e| {
            KafkaError::Permanent(format!(
                "{e}: write it with the SDK's records::RecordsWriter"
            ))
        })?;
        self.produce_all(views.iter().map(|r| ToProduce {
            topic: r.topic,
            partition: (r.partition >= 0).then_some(r.partition),
            key: r.key,
            headers: ProduceHeaders::Packed(*r),
            payload: r.payload,
        }))
        .await
    }
    async fn ensure_topic(&mut self, topic: String, partitions: u32) -> Result<(), KafkaError> {
        let client = self.kafka_client()?;
        self.check_topic(&topic)?;
        // -1: the cluster's own default.replication.factor (one broker: 1; three: 3).
        let t = NewTopic::new(&topic, partitions as i32, TopicReplication::Fixed(-1));
        let opts = AdminOptions::new()
            .operation_timeout(Some(REQUEST_TIMEOUT))
            .request_timeout(Some(REQUEST_TIMEOUT));
        let results = client
            .admin
            .create_topics([&t], &opts)
            .await
            .map_err(|e| classify(&e).explained(&client.context))?;
        for r in results {
            match r {
                Ok(_) => {}
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(classify(&RdError::AdminOp(code)).with_context(&name));
                }
            }
        }
        Ok(())
    }

    async fn max_payload(&mut self) -> u32 {
        MAX_PAYLOAD
    }

    async fn consume(
        &mut self,
        group: String,
        partitions: Vec<(String, i32)>,
        at: Start,
    ) -> Result<Resource<Consumer>, KafkaError> {
        let client = self.kafka_client()?;
        for (t, _) in &partitions {
            self.check_topic(t)?;
        }
        if !self.kafka.prefixes.iter().any(|p| group.starts_with(p)) {
            return Err(KafkaError::Denied(format!(
                "consumer group `{group}` is not under a prefix granted to plugin `{}`",
                self.plugin
            )));
        }
        // Tuning defaults first, so the operator's `[kafka] properties` can change them;
        // then what correctness needs, which they cannot. A fetch waits at the broker
        // for up to `fetch.wait.max.ms` and is answered as soon as a record arrives
        // (Apache Kafka), so a long wait costs no latency and keeps an idle consumer
        // from fetching 100 times a second (it was 10 ms for tansu, which held every
        // fetch for the full wait).
        let mut config = ClientConfig::new();
        config.set("fetch.wait.max.ms", FETCH_WAIT_MS).set(
            "fetch.message.max.bytes",
            (MAX_PAYLOAD + (64 << 10)).to_string(),
        );
        apply_cluster(&mut config, &client.settings);
        let consumer: StreamConsumer<ClusterContext> = config
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .create_with_context(client.context.clone())
            .map_err(|e| classify(&e))?;
        let mut tpl = TopicPartitionList::new();
        for (t, p) in &partitions {
            let offset = match at {
                Start::Committed => Offset::Stored,
                // The end *now*, as a concrete offset: `Offset::End` would be resolved
                // only when fetching starts, skipping what is produced in between.
                Start::Latest => Offset::Offset(
                    while_leaderless(|| consumer.fetch_watermarks(t, *p, REQUEST_TIMEOUT))
                        .await
                        .map_err(|e| {
                            classify(&e)
                                .with_context(&format!("{t}:{p}"))
                                .explained(&client.context)
                        })?
                        .1,
                ),
                Start::Offset(o) => Offset::Offset(o),
            };
            tpl.add_partition_offset(t, *p, offset)
                .map_err(|e| classify(&e))?;
        }
        consumer.assign(&tpl).map_err(|e| classify(&e))?;
        self.table
            .push(Consumer {
                inner: Some(consumer),
                delivered: Default::default(),
                peeked: None,
            })
            .map_err(|e| KafkaError::Retryable(format!("too many open consumers: {e}")))
    }
}

/// The offsets of `pending`, in order, once the broker acknowledged every one; the first
/// failure otherwise. One deadline for all (a timer per record showed in profiles).
async fn acknowledged(
    client: &KafkaClient,
    pending: Vec<DeliveryFuture>,
) -> Result<Vec<i64>, KafkaError> {
    let acks = async {
        let mut offsets = Vec::with_capacity(pending.len());
        for f in pending {
            match f.await {
                Ok(Ok(d)) => offsets.push(d.offset),
                Ok(Err((e, _))) => return Err(classify(&e)),
                Err(_) => return Err(KafkaError::Retryable("the producer went away".into())),
            }
        }
        Ok(offsets)
    };
    tokio::time::timeout(PRODUCE_TIMEOUT, acks)
        .await
        .unwrap_or_else(|_| {
            Err(KafkaError::Retryable(format!(
                "no acknowledgement from the broker within {PRODUCE_TIMEOUT:?}{}",
                client.context.explain()
            )))
        })
}

/// A producer made for a plugin (0.1.1, lives in its instance's resource table): each
/// `send-packed` queues and returns; a task per call awaits the broker's
/// acknowledgements, and the first failure is kept for every later call.
pub struct Producer {
    state: Arc<ProducerState>,
}

#[derive(Default)]
struct ProducerState {
    failed: Mutex<Option<KafkaError>>,
    /// Payload bytes queued and not yet acknowledged (or failed).
    queued: AtomicUsize,
    drained: tokio::sync::Notify,
}

impl ProducerState {
    fn failure(&self) -> Result<(), KafkaError> {
        match &*self.failed.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e.clone().map_message(|m| {
                format!("an earlier record of this producer was not written: {m}")
            })),
            None => Ok(()),
        }
    }

    /// Wait until `bytes` more fit under the bound (one call's worth always does).
    async fn room_for(&self, bytes: usize) -> Result<(), KafkaError> {
        let deadline = tokio::time::Instant::now() + PRODUCE_TIMEOUT;
        loop {
            let drained = self.drained.notified();
            let queued = self.queued.load(SeqCst);
            if queued == 0 || queued + bytes <= QUEUED_PER_PRODUCER {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, drained).await.is_err() {
                return Err(KafkaError::Retryable(format!(
                    "{queued} bytes queued on this producer got no acknowledgement within {PRODUCE_TIMEOUT:?}"
                )));
            }
            self.failure()?;
        }
    }
}

/// librdkafka's synchronous calls (watermarks, commits) block: keep them off the
/// async workers' backs where the runtime allows it.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl KafkaError {
    fn message(&self) -> &str {
        match self {
            KafkaError::Denied(m) | KafkaError::Retryable(m) | KafkaError::Permanent(m) => m,
        }
    }

    /// The same kind, with its message rewritten.
    fn map_message(self, f: impl FnOnce(String) -> String) -> KafkaError {
        match self {
            KafkaError::Denied(m) => KafkaError::Denied(f(m)),
            KafkaError::Retryable(m) => KafkaError::Retryable(f(m)),
            KafkaError::Permanent(m) => KafkaError::Permanent(f(m)),
        }
    }

    /// With the cluster's recent errors appended, if it had any lately.
    fn explained(self, context: &ClusterContext) -> KafkaError {
        let why = context.explain();
        self.map_message(|m| m + &why)
    }

    fn with_context(self, what: &str) -> KafkaError {
        self.map_message(|m| format!("{what}: {m}"))
    }
}

impl HostProducer for InstanceState {
    async fn new(&mut self) -> wasmtime::Result<Resource<Producer>> {
        Ok(self.table.push(Producer {
            state: Arc::default(),
        })?)
    }

    async fn send_packed(
        &mut self,
        this: Resource<Producer>,
        records: Vec<u8>,
    ) -> Result<(), KafkaError> {
        let state = self
            .table
            .get(&this)
            .map_err(|e| KafkaError::Permanent(format!("no such producer: {e}")))?
            .state
            .clone();
        state.failure()?;
        let views = trellis_sdk::records::decode(&records).map_err(|e| {
            KafkaError::Permanent(format!(
                "{e}: write it with the SDK's records::RecordsWriter"
            ))
        })?;
        let bytes: usize = views.iter().map(|r| r.payload.len()).sum();
        state.room_for(bytes).await?;
        let (client, pending) = self.queue_all(views.iter().map(|r| ToProduce {
            topic: r.topic,
            partition: (r.partition >= 0).then_some(r.partition),
            key: r.key,
            headers: ProduceHeaders::Packed(*r),
            payload: r.payload,
        }))?;
        state.queued.fetch_add(bytes, SeqCst);
        tokio::spawn(async move {
            if let Err(e) = acknowledged(&client, pending).await {
                tracing::warn!(target: "trellis::kafka", "a queued produce failed: {}", e.message());
                state
                    .failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(e);
            }
            state.queued.fetch_sub(bytes, SeqCst);
            state.drained.notify_waiters();
        });
        Ok(())
    }

    async fn drop(&mut self, this: Resource<Producer>) -> wasmtime::Result<()> {
        // Queued records are still written (their tasks hold what they need).
        self.table.delete(this)?;
        Ok(())
    }
}

impl HostConsumer for InstanceState {
    async fn poll(
        &mut self,
        this: Resource<Consumer>,
        max: u32,
        timeout_ms: u32,
    ) -> Result<Vec<Incoming>, KafkaError> {
        let mut out = Vec::new();
        self.poll_each(this, max, timeout_ms, |m| {
            out.push(Incoming {
                topic: m.topic().to_string(),
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                headers: {
                    let mut hs = Vec::new();
                    m.each_header(|key, value| {
                        hs.push(Header {
                            key: key.to_string(),
                            value: value.to_vec(),
                        })
                    });
                    hs
                },
                payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                timestamp_ms: m.timestamp_ms(),
            })
        })
        .await?;
        Ok(out)
    }

    async fn poll_packed(
        &mut self,
        this: Resource<Consumer>,
        max: u32,
        timeout_ms: u32,
    ) -> Result<Vec<u8>, KafkaError> {
        let mut out = trellis_sdk::records::RecordsWriter::new();
        self.poll_each(this, max, timeout_ms, |m| {
            out.record(
                m.topic(),
                m.partition(),
                m.offset(),
                m.timestamp_ms().unwrap_or(-1),
                m.key(),
            );
            m.each_header(|k, v| {
                out.header(k, v);
            });
            out.payload(m.payload().unwrap_or_default());
        })
        .await?;
        Ok(out.finish())
    }

    async fn commit(
        &mut self,
        this: Resource<Consumer>,
        topic: String,
        partition: i32,
        offset: i64,
    ) -> Result<(), KafkaError> {
        self.check_topic(&topic)?;
        let c = self
            .table
            .get(&this)
            .map_err(|e| KafkaError::Permanent(format!("no such consumer: {e}")))?;
        let mut tpl = TopicPartitionList::new();
        // Kafka's committed offset is the next one to read.
        tpl.add_partition_offset(&topic, partition, Offset::Offset(offset + 1))
            .map_err(|e| classify(&e))?;
        // Asynchronous: a synchronous commit has no timeout and blocks its thread for as
        // long as the broker is away (it hung links, and the runtime's shutdown, during
        // broker outages). A commit only moves where a reader restarts; a lost one means
        // records read again, which the host's session drops as duplicates.
        c.get()
            .commit(&tpl, CommitMode::Async)
            .map_err(|e| classify(&e))
    }

    async fn subscribe(
        &mut self,
        this: Resource<Consumer>,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        wasmtime_wasi::p2::subscribe(&mut self.table, this)
    }

    async fn drop(&mut self, this: Resource<Consumer>) -> wasmtime::Result<()> {
        self.table.delete(this)?;
        Ok(())
    }
}

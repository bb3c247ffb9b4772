//! The Kafka log sink: each commit writes an edge's readings and its new
//! high-water mark in one Kafka transaction, the pattern of Kafka Connect's
//! exactly-once sources (KIP-618).
//!
//! - Readings go to `readings_topic`, keyed by device id, with the headers
//!   `tributary-edge`, `tributary-epoch` and `tributary-seq`, and
//!   `tributary-stream` when the reading belongs to a topology stream.
//! - Readings the cloud refused (invalid, or of a stream the edge may not
//!   send) go to `refused_topic` in the same transaction, with the same
//!   headers and `tributary-refused`, the reason: kept for an operator, never
//!   in a stream they claim.
//! - Marks go to `hwm_topic`: compacted, one partition, keyed by edge id, with
//!   the JSON of [`Hwm`] as value.
//! - A cloud node writes through shard writers: shard `k` is one
//!   transactional producer, `transactional.id = <prefix>.shard.<k>` (a `.`
//!   never appears in an edge id), whose transactions carry the segments and
//!   marks of many edges at once. Opening it fences every earlier producer
//!   of that shard, in this process or another, and aborts the transaction
//!   it left open; then it reads every mark back once, and keeps them.
//! - A writer for one edge alone (`transactional.id = <prefix>-<edge>`) is
//!   the same with one edge: tools, tests and the benchmarks' baseline.
//! - The mark is read back with a `read_committed` consumer. It reads up to the
//!   high watermark, not only up to the last stable offset: a mark committed
//!   after another edge's still-open transaction lies above that offset, and
//!   missing it would let replays in twice. So an abandoned transaction of any
//!   edge delays every recovery until the broker aborts it, at most
//!   `transaction_timeout_ms` plus the broker's abort check interval
//!   (`transaction.abort.timed.out.transaction.cleanup.interval.ms`, 10 s by
//!   default).
//!
//! Every call blocks on broker round trips: call it from a blocking thread.
//! Each writer owns a librdkafka producer, which runs a few threads of its own.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use super::{EdgeCommit, EdgeLogWriter, Hwm, LogSink, SegmentBatch, ShardLogWriter, SinkError};

pub mod audit;
pub mod registry;
mod stages;
pub mod status;
pub use stages::{KafkaStageLog, KafkaStageLogConfig};

pub const DEFAULT_READINGS_TOPIC: &str = "tributary.readings";
pub const DEFAULT_HWM_TOPIC: &str = "tributary.hwm";
pub const DEFAULT_REFUSED_TOPIC: &str = "tributary.refused";
pub const DEFAULT_TRANSACTIONAL_ID_PREFIX: &str = "tributary-ingest";

/// The header that names the edge a reading came through.
pub const HEADER_EDGE: &str = "tributary-edge";
/// The header that carries the edge's epoch, in decimal.
pub const HEADER_EPOCH: &str = "tributary-epoch";
/// The header that carries the outbox segment's sequence number, in decimal.
pub const HEADER_SEQ: &str = "tributary-seq";
/// The topology stream of a reading, when it has one.
pub const HEADER_STREAM: &str = "tributary-stream";
/// Why the cloud refused a reading (records of the refused topic only).
pub const HEADER_REFUSED: &str = "tributary-refused";

/// The hwm topic has exactly one partition, so that one ordered read finds the
/// latest mark of every edge.
const HWM_PARTITION: i32 = 0;
/// Compaction never touches the active segment, and a recovery reads all of
/// it: small segments keep that read short (one mark is about 250 bytes with
/// its transaction marker, so this holds about 30k commits).
const HWM_SEGMENT_BYTES: &str = "8388608";
/// Kafka's own default for a topic's `max.message.bytes`.
const BROKER_MESSAGE_BYTES_DEFAULT: u64 = 1_048_588;
/// Room for the record batch framing around the largest single message.
const BATCH_FRAMING_BYTES: u64 = 1024;
/// The producer's tunables; `client_properties` may override them.
const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    // Bounds each writer's local queue: librdkafka's default is 1 GiB per
    // producer, too much with one producer per edge. A commit that fills it
    // waits for room.
    ("queue.buffering.max.kbytes", "32768"),
    // A commit flushes anyway; a short linger only groups the records
    // produced in one go.
    ("linger.ms", "5"),
    // No codec is compiled into librdkafka.
    ("compression.type", "none"),
    // Java clients' partitioner: a device lands on the same partition
    // whichever client wrote it.
    ("partitioner", "murmur2_random"),
];
/// How long a commit waits for room in a full local queue before trying again.
const QUEUE_FULL_BACKOFF_MS: u64 = 5;
/// How long a flush sleeps between polls for delivery reports, at first; each
/// sleep of one flush is twice the one before, up to [`FLUSH_SLEEP_MAX`].
/// A sleep, not `poll(1 ms)`: rdkafka 0.39's `poll(t)` always waits the whole
/// of `t`, and rounds 1 ms down to zero and spins.
const FLUSH_SLEEP_MIN: Duration = Duration::from_micros(100);
/// The longest sleep of a flush: the latency it adds to a commit at most.
/// Doubling up to it keeps a quick flush quick and a long one from waking
/// its thread every 200 µs (thousands of context switches a second on a
/// busy cloud node).
const FLUSH_SLEEP_MAX: Duration = Duration::from_millis(1);
/// How long one attempt of an abort waits before the writer serves the
/// delivery reports it waits for.
const ABORT_STEP_MS: u64 = 100;
/// How long a recovery waits per poll, so that it checks its deadline often.
const RECOVER_POLL_MS: u64 = 100;
/// Bounds how long a broker holds an empty fetch, so that a recovery notices
/// soon when an open transaction ends.
const RECOVER_FETCH_WAIT_MS: &str = "100";

/// How long to wait before asking again about a topic just created.
const SETTLE_RETRY_MS: u64 = 100;
/// The consumer group named by recovery consumers, which only assign.
const RECOVERY_GROUP_ID: &str = "tributary-hwm-recovery";

/// Client properties that the sink sets itself: overriding them would break
/// exactly-once delivery or the recovery of marks.
const RESERVED_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "transactional.id",
    "enable.idempotence",
    "transaction.timeout.ms",
    "acks",
    "request.required.acks",
    "max.in.flight",
    "max.in.flight.requests.per.connection",
    "retries",
    "message.send.max.retries",
    "queuing.strategy",
    "message.max.bytes",
    "isolation.level",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "enable.partition.eof",
    "auto.offset.reset",
    "group.id",
];

/// How the sink reaches Kafka. Every field but `bootstrap_servers` has a
/// default; [`KafkaSinkConfig::validate`] names the first bad field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// `host:port[,host:port...]`. No default.
    pub bootstrap_servers: String,
    /// Default `tributary.readings`.
    pub readings_topic: String,
    /// Partitions of the readings topic when the sink creates it. Default 3.
    pub readings_partitions: i32,
    /// Replication factor of the topics the sink creates; -1 (the default)
    /// takes the broker's `default.replication.factor`.
    pub replication_factor: i32,
    /// Default `tributary.hwm`.
    pub hwm_topic: String,
    /// Where refused readings go. Default `tributary.refused`.
    pub refused_topic: String,
    /// Each edge's producer has `transactional.id = <prefix>-<edge id>`.
    /// Default `tributary-ingest`.
    pub transactional_id_prefix: String,
    /// After this long without an end, the broker aborts a transaction. It
    /// bounds how long a crashed writer delays every recovery. Default 15000,
    /// the node's `transaction_timeout_ms`.
    pub transaction_timeout_ms: u64,
    /// Bound on one commit, from the first record to the broker's answer.
    /// Must be below `transaction_timeout_ms`. Default 10000, the node's
    /// `commit_timeout_ms`.
    pub commit_timeout_ms: u64,
    /// Bound on reading an edge's mark back. Default 30000.
    pub hwm_recover_timeout_ms: u64,
    /// Bound on creating or checking the topics, and on fencing the previous
    /// writer of an edge when opening a new one. Default 30000.
    pub open_timeout_ms: u64,
    /// The largest record (key, value and headers) the producer sends; the
    /// readings topic is created to accept it. Default 1000000.
    pub message_bytes_max: u32,
    /// Extra librdkafka properties for every client (security, tuning). The
    /// properties the sink sets itself are refused. Default empty.
    pub client_properties: BTreeMap<String, String>,
}

/// The node's `transaction_timeout_ms` and `commit_timeout_ms` default to these.
pub const TRANSACTION_TIMEOUT_MS_DEFAULT: u64 = 15_000;
pub const COMMIT_TIMEOUT_MS_DEFAULT: u64 = 10_000;

impl Default for KafkaSinkConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: String::new(),
            readings_topic: DEFAULT_READINGS_TOPIC.to_string(),
            readings_partitions: 3,
            replication_factor: -1,
            hwm_topic: DEFAULT_HWM_TOPIC.to_string(),
            refused_topic: DEFAULT_REFUSED_TOPIC.to_string(),
            transactional_id_prefix: DEFAULT_TRANSACTIONAL_ID_PREFIX.to_string(),
            transaction_timeout_ms: TRANSACTION_TIMEOUT_MS_DEFAULT,
            commit_timeout_ms: COMMIT_TIMEOUT_MS_DEFAULT,
            hwm_recover_timeout_ms: 30_000,
            open_timeout_ms: 30_000,
            message_bytes_max: 1_000_000,
            client_properties: BTreeMap::new(),
        }
    }
}

impl KafkaSinkConfig {
    /// The defaults, with the given bootstrap servers.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            ..Self::default()
        }
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), SinkError> {
        let bad = |key: &str, why: String| Err(SinkError::Config(format!("kafka {key}: {why}")));
        if self.bootstrap_servers.trim().is_empty() {
            return bad("bootstrap_servers", "is empty".into());
        }
        check_topic_name("readings_topic", &self.readings_topic)?;
        check_topic_name("hwm_topic", &self.hwm_topic)?;
        if self.readings_topic == self.hwm_topic {
            return bad("hwm_topic", "must differ from readings_topic".into());
        }
        check_topic_name("refused_topic", &self.refused_topic)?;
        if self.refused_topic == self.readings_topic || self.refused_topic == self.hwm_topic {
            return bad(
                "refused_topic",
                "must differ from readings_topic and hwm_topic".into(),
            );
        }
        if self.readings_partitions < 1 {
            return bad(
                "readings_partitions",
                format!("is {}, must be at least 1", self.readings_partitions),
            );
        }
        if self.replication_factor != -1
            && !(1..=i32::from(i16::MAX)).contains(&self.replication_factor)
        {
            return bad(
                "replication_factor",
                format!("is {}, must be -1 or at least 1", self.replication_factor),
            );
        }
        if self.transactional_id_prefix.is_empty() {
            return bad("transactional_id_prefix", "is empty".into());
        }
        // librdkafka takes every timeout as a C int of milliseconds.
        let ms_max = i32::MAX as u64;
        if !(1000..=ms_max).contains(&self.transaction_timeout_ms) {
            return bad(
                "transaction_timeout_ms",
                format!(
                    "is {}, must be in 1000..={ms_max}",
                    self.transaction_timeout_ms
                ),
            );
        }
        if self.commit_timeout_ms == 0 || self.commit_timeout_ms >= self.transaction_timeout_ms {
            return bad(
                "commit_timeout_ms",
                format!(
                    "is {}, must be above 0 and below transaction_timeout_ms ({})",
                    self.commit_timeout_ms, self.transaction_timeout_ms
                ),
            );
        }
        for (key, value) in [
            ("hwm_recover_timeout_ms", self.hwm_recover_timeout_ms),
            ("open_timeout_ms", self.open_timeout_ms),
        ] {
            if !(1..=ms_max).contains(&value) {
                return bad(key, format!("is {value}, must be in 1..={ms_max}"));
            }
        }
        // librdkafka's own bounds for message.max.bytes.
        if !(1000..=1_000_000_000).contains(&self.message_bytes_max) {
            return bad(
                "message_bytes_max",
                format!(
                    "is {}, must be in 1000..=1000000000",
                    self.message_bytes_max
                ),
            );
        }
        for key in self.client_properties.keys() {
            if RESERVED_PROPERTIES.contains(&key.as_str()) {
                return bad(
                    "client_properties",
                    format!("{key:?} is set by the sink itself and cannot be overridden"),
                );
            }
        }
        Ok(())
    }

    fn client_config(&self) -> ClientConfig {
        self.client_config_over(&[])
    }

    /// A client config with the sink's tunable `defaults`, which the extra
    /// client properties may override.
    fn client_config_over(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        for (key, value) in defaults {
            config.set(*key, *value);
        }
        for (key, value) in &self.client_properties {
            config.set(key, value);
        }
        config.set("bootstrap.servers", &self.bootstrap_servers);
        config
    }

    fn transactional_id(&self, edge_id: &str) -> String {
        format!("{}-{edge_id}", self.transactional_id_prefix)
    }

    fn shard_transactional_id(&self, shard: u32) -> String {
        format!("{}.shard.{shard}", self.transactional_id_prefix)
    }
}

fn check_topic_name(key: &str, name: &str) -> Result<(), SinkError> {
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty()
        || name.len() > 249
        || name == "."
        || name == ".."
        || !name.chars().all(legal)
    {
        return Err(SinkError::Config(format!(
            "kafka {key}: {name:?} is not a legal topic name (1 to 249 of [a-zA-Z0-9._-])"
        )));
    }
    Ok(())
}

/// What the sink has done since it started, for a metrics endpoint.
#[derive(Debug, Default)]
pub struct KafkaSinkCounters {
    /// Readings in committed transactions.
    pub records_sent: AtomicU64,
    pub transactions_committed: AtomicU64,
    pub transactions_aborted: AtomicU64,
    /// Writers that found themselves fenced by a newer writer of their edge.
    pub writers_fenced: AtomicU64,
}

/// A copy of [`KafkaSinkCounters`] at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KafkaSinkCountersSnapshot {
    pub records_sent: u64,
    pub transactions_committed: u64,
    pub transactions_aborted: u64,
    pub writers_fenced: u64,
}

impl KafkaSinkCounters {
    pub fn snapshot(&self) -> KafkaSinkCountersSnapshot {
        KafkaSinkCountersSnapshot {
            records_sent: self.records_sent.load(Ordering::Relaxed),
            transactions_committed: self.transactions_committed.load(Ordering::Relaxed),
            transactions_aborted: self.transactions_aborted.load(Ordering::Relaxed),
            writers_fenced: self.writers_fenced.load(Ordering::Relaxed),
        }
    }
}

/// Routes librdkafka's log lines and global errors into tracing.
struct LogContext {
    role: String,
}

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log_rdkafka(&self.role, level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if is_partition_eof(&error) {
            return;
        }
        tracing::warn!(role = %self.role, %error, reason, "kafka client error");
    }
}

impl ConsumerContext for LogContext {}

/// Creates a one-partition topic (the audit, status and registry topics)
/// with `topic_config` if it does not exist. Blocks on the broker.
fn create_topic_if_absent(
    client: &ClientConfig,
    topic: &str,
    topic_config: &[(&str, &str)],
    timeout: Duration,
) -> Result<(), String> {
    let admin: AdminClient<LogContext> = client
        .create_with_context(LogContext {
            role: format!("admin {topic}"),
        })
        .map_err(|e| format!("creating the admin client: {e}"))?;
    let options = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    let new = topic_config.iter().fold(
        NewTopic::new(topic, 1, TopicReplication::Fixed(-1)),
        |t, (k, v)| t.set(k, v),
    );
    let results = futures::executor::block_on(admin.create_topics([&new], &options))
        .map_err(|e| format!("creating topic {topic}: {e}"))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(format!("creating topic {topic}: {code}")),
        }
    }
    Ok(())
}

/// The end of a partition, which readers that ask for it (marks recovery,
/// checkpoints) also get as a client error: not one.
fn is_partition_eof(error: &KafkaError) -> bool {
    matches!(
        error,
        KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
    )
}

fn log_rdkafka(role: &str, level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::error!(role, fac, "librdkafka: {message}"),
        RDKafkaLogLevel::Warning => tracing::warn!(role, fac, "librdkafka: {message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(role, fac, "librdkafka: {message}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(role, fac, "librdkafka: {message}"),
    }
}

/// The producer's context: it keeps the first failed delivery of the current
/// transaction, whose reason is better than the one commit reports.
struct WriterContext {
    edge_id: String,
    delivery_failure: Mutex<Option<String>>,
}

impl WriterContext {
    fn take_delivery_failure(&self) -> Option<String> {
        self.delivery_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

impl ClientContext for WriterContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log_rdkafka(&self.edge_id, level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(edge = %self.edge_id, %error, reason, "kafka producer error");
    }
}

impl ProducerContext for WriterContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, message)) = result {
            let mut slot = self
                .delivery_failure
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert_with(|| format!("delivery to {} failed: {error}", message.topic()));
        }
    }
}

struct Shared {
    config: KafkaSinkConfig,
    /// Asks for high watermarks. It reads uncommitted: a `read_committed`
    /// client would get the last stable offset instead.
    watermarks: BaseConsumer<LogContext>,
    counters: Arc<KafkaSinkCounters>,
}

/// The log sink on a Kafka cluster. Cheap to clone; clones share counters.
#[derive(Clone)]
pub struct KafkaLog {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for KafkaLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaLog")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl KafkaLog {
    /// Validates the config, creates the topics if absent, and checks that an
    /// existing hwm topic is compacted and has one partition.
    pub fn new(config: KafkaSinkConfig) -> Result<KafkaLog, SinkError> {
        config.validate()?;
        let deadline = Instant::now() + Duration::from_millis(config.open_timeout_ms);
        ensure_topics(&config, deadline)?;

        let watermarks: BaseConsumer<LogContext> = config
            .client_config()
            .set("isolation.level", "read_uncommitted")
            .set("enable.auto.commit", "false")
            .create_with_context(LogContext {
                role: "hwm-watermarks".into(),
            })
            .map_err(|e| SinkError::Config(format!("creating the watermark client: {e}")))?;
        let topic = config.hwm_topic.as_str();
        until_settled(
            deadline,
            &format!("reading the metadata of {topic}"),
            |timeout| {
                let metadata = watermarks
                    .fetch_metadata(Some(topic), timeout)
                    .map_err(|e| e.to_string())?;
                let partitions = metadata
                    .topics()
                    .iter()
                    .find(|t| t.name() == topic && t.error().is_none())
                    .map_or(0, |t| t.partitions().len());
                match partitions {
                    // Not yet known to the broker answering, right after creation.
                    0 => Err("the topic has no partitions yet".into()),
                    1 => Ok(Ok(())),
                    n => Ok(Err(SinkError::Config(format!(
                        "topic {topic} has {n} partitions; the hwm topic must have exactly 1"
                    )))),
                }
            },
        )??;

        Ok(KafkaLog {
            shared: Arc::new(Shared {
                config,
                watermarks,
                counters: Arc::default(),
            }),
        })
    }

    /// The counters, shared with every writer of this log.
    pub fn counters(&self) -> Arc<KafkaSinkCounters> {
        self.shared.counters.clone()
    }

    pub fn config(&self) -> &KafkaSinkConfig {
        &self.shared.config
    }
}

fn ensure_topics(config: &KafkaSinkConfig, deadline: Instant) -> Result<(), SinkError> {
    let timeout = remaining(deadline);
    let admin: AdminClient<LogContext> = config
        .client_config()
        .create_with_context(LogContext {
            role: "admin".into(),
        })
        .map_err(|e| SinkError::Config(format!("creating the admin client: {e}")))?;
    let options = AdminOptions::new()
        .request_timeout(Some(timeout))
        .operation_timeout(Some(timeout));

    let topic_message_bytes = (u64::from(config.message_bytes_max) + BATCH_FRAMING_BYTES)
        .max(BROKER_MESSAGE_BYTES_DEFAULT)
        .to_string();
    let replication = || TopicReplication::Fixed(config.replication_factor);
    let readings = NewTopic::new(
        &config.readings_topic,
        config.readings_partitions,
        replication(),
    )
    .set("max.message.bytes", &topic_message_bytes);
    let hwm = NewTopic::new(&config.hwm_topic, 1, replication())
        .set("cleanup.policy", "compact")
        .set("segment.bytes", HWM_SEGMENT_BYTES);
    let refused = NewTopic::new(&config.refused_topic, 1, replication())
        .set("max.message.bytes", &topic_message_bytes);
    let results =
        futures::executor::block_on(admin.create_topics([&readings, &hwm, &refused], &options))
            .map_err(|e| SinkError::Config(format!("creating the topics: {e}")))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(SinkError::Config(format!("creating topic {topic}: {code}")));
            }
        }
    }

    // A hwm topic that deletes by age would lose the marks of quiet edges, and
    // their replays would be written twice.
    let topic = config.hwm_topic.as_str();
    let specifier = ResourceSpecifier::Topic(topic);
    until_settled(deadline, &format!("describing topic {topic}"), |_| {
        let described = futures::executor::block_on(admin.describe_configs([&specifier], &options))
            .map_err(|e| e.to_string())?;
        let resource = described
            .into_iter()
            .next()
            .ok_or("no answer")?
            .map_err(|code| code.to_string())?;
        // Right after creation, a broker may not know the topic's config yet.
        let policy = resource
            .get("cleanup.policy")
            .and_then(|e| e.value.clone())
            .ok_or("no cleanup.policy yet")?;
        if policy.split(',').map(str::trim).eq(["compact"]) {
            Ok(Ok(()))
        } else {
            Ok(Err(SinkError::Config(format!(
                "topic {topic} has cleanup.policy={policy:?}; the hwm topic must be compact only"
            ))))
        }
    })?
}

/// Repeats `attempt`, which fails while the cluster has not caught up with a
/// change, until it answers or the deadline passes. There is no event to wait
/// for: the broker must be asked again.
fn until_settled<T>(
    deadline: Instant,
    step: &str,
    mut attempt: impl FnMut(Duration) -> Result<T, String>,
) -> Result<T, SinkError> {
    loop {
        match attempt(remaining(deadline)) {
            Ok(answer) => return Ok(answer),
            Err(reason) if Instant::now() >= deadline => {
                return Err(SinkError::Config(format!("{step}: {reason}")));
            }
            Err(reason) => {
                tracing::debug!(step, %reason, "waiting for the cluster to settle");
                std::thread::sleep(Duration::from_millis(SETTLE_RETRY_MS).min(remaining(deadline)));
            }
        }
    }
}

impl LogSink for KafkaLog {
    fn open_edge(&self, edge_id: &str) -> Result<Box<dyn EdgeLogWriter>, SinkError> {
        if edge_id.is_empty() {
            return Err(SinkError::Config("the edge id is empty".into()));
        }
        let id = self.shared.config.transactional_id(edge_id);
        let mut writer = KafkaWriter::open(self.shared.clone(), edge_id.to_string(), id)?;
        writer.edge = Some(edge_id.to_string());
        Ok(Box::new(writer))
    }

    fn open_shard(&self, shard: u32) -> Result<Box<dyn ShardLogWriter>, SinkError> {
        let id = self.shared.config.shard_transactional_id(shard);
        Ok(Box::new(KafkaWriter::open(
            self.shared.clone(),
            format!("shard-{shard}"),
            id,
        )?))
    }
}

/// Why a writer can no longer commit.
#[derive(Debug, Clone)]
enum Dead {
    Fenced,
    /// A fatal producer error, or a failed abort after which the outcome of the
    /// transaction is unknown: only a new writer, which re-reads the mark, can
    /// tell what was committed.
    Broken(String),
}

/// A transactional writer: of one shard, or of one edge alone.
pub struct KafkaWriter {
    shared: Arc<Shared>,
    /// `shard-<k>`, or the edge id: what errors and logs name.
    name: String,
    /// The edge of a writer for one edge alone.
    edge: Option<String>,
    producer: BaseProducer<WriterContext>,
    /// The mark of a writer for one edge, once read; `Some(None)` means the
    /// edge has none yet.
    hwm: Option<Option<Hwm>>,
    dead: Option<Dead>,
}

/// Every edge's latest mark as read back, or why it does not parse.
type ReadMarks = super::Marks;

/// How one step of a commit failed.
enum Failure {
    Fenced,
    Fatal(String),
    Abortable(String),
    /// A reading cannot fit `message_bytes_max`: retrying cannot help.
    TooLarge(String),
}

impl KafkaWriter {
    fn open(
        shared: Arc<Shared>,
        name: String,
        transactional_id: String,
    ) -> Result<Self, SinkError> {
        let config = &shared.config;
        let edge_id = name.as_str();
        let fence_error = |reason: String| SinkError::Fence {
            edge: edge_id.to_string(),
            reason,
        };
        let producer: BaseProducer<WriterContext> = config
            .client_config_over(PRODUCER_DEFAULTS)
            .set("transactional.id", transactional_id)
            .set("enable.idempotence", "true")
            .set(
                "transaction.timeout.ms",
                config.transaction_timeout_ms.to_string(),
            )
            .set("message.max.bytes", config.message_bytes_max.to_string())
            .create_with_context(WriterContext {
                edge_id: edge_id.to_string(),
                delivery_failure: Mutex::new(None),
            })
            .map_err(|e| SinkError::Config(format!("creating the producer of {edge_id}: {e}")))?;
        // Fences earlier producers of this transactional id and waits until
        // the transaction they left open is aborted.
        producer
            .init_transactions(Duration::from_millis(config.open_timeout_ms))
            .map_err(|e| fence_error(e.to_string()))?;
        Ok(KafkaWriter {
            shared,
            name,
            edge: None,
            producer,
            hwm: None,
            dead: None,
        })
    }

    /// The latest mark of `only`, or of every edge, read back from the log.
    fn recover_marks(&self, only: Option<&str>) -> Result<ReadMarks, SinkError> {
        let config = &self.shared.config;
        let topic = config.hwm_topic.as_str();
        let deadline = Instant::now() + Duration::from_millis(config.hwm_recover_timeout_ms);
        let recover_error = |reason: String| SinkError::RecoverHwm {
            edge: self.name.clone(),
            reason,
        };

        // Fetched after init_transactions: every transaction of this edge has
        // ended, so the latest mark lies below this offset.
        // Right after the topic's creation a broker may not lead its partition
        // yet (NotLeaderForPartition): that settles, so ask again until the
        // deadline rather than fail the edge's connection.
        let (low, high) = until_settled(
            deadline,
            &format!("fetching the watermarks of {topic}"),
            |timeout| {
                self.shared
                    .watermarks
                    .fetch_watermarks(topic, HWM_PARTITION, timeout)
                    .map_err(|e| e.to_string())
            },
        )
        .map_err(|e| match e {
            SinkError::Config(reason) => recover_error(reason),
            other => other,
        })?;
        let mut latest = ReadMarks::new();
        if high <= low {
            return Ok(latest);
        }

        let consumer: BaseConsumer<LogContext> = config
            .client_config()
            .set("isolation.level", "read_committed")
            // librdkafka refuses assign() without a group; it never joins
            // it nor commits to it.
            .set("group.id", RECOVERY_GROUP_ID)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", RECOVER_FETCH_WAIT_MS)
            .create_with_context(LogContext {
                role: format!("hwm-recovery-{}", self.name),
            })
            .map_err(|e| recover_error(format!("creating the recovery consumer: {e}")))?;
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(topic, HWM_PARTITION, Offset::Beginning)
            .and_then(|()| consumer.assign(&assignment))
            .map_err(|e| recover_error(format!("assigning {topic}: {e}")))?;

        // The latest record of an edge wins; a malformed one only matters
        // if nothing newer replaces it.
        loop {
            if Instant::now() >= deadline {
                let at = position(&consumer, topic).map_or("none".to_string(), |o| o.to_string());
                return Err(recover_error(format!(
                    "timed out after {} ms at offset {at} of {high}; the likely cause is a \
                     transaction left open by a crashed writer, which holds read_committed \
                     reads back until the broker aborts it",
                    config.hwm_recover_timeout_ms
                )));
            }
            let poll = Duration::from_millis(RECOVER_POLL_MS).min(remaining(deadline));
            match consumer.poll(poll) {
                Some(Ok(message)) => {
                    let key = message.key().and_then(|k| std::str::from_utf8(k).ok());
                    if let Some(key) = key.filter(|k| only.is_none_or(|o| o == *k)) {
                        match message.payload() {
                            // A tombstone deletes the mark.
                            None => {
                                latest.remove(key);
                            }
                            Some(bytes) => {
                                let mark = serde_json::from_slice::<Hwm>(bytes)
                                    .map_err(|e| format!("offset {}: {e}", message.offset()));
                                latest.insert(key.to_owned(), mark);
                            }
                        }
                    }
                    if message.offset() + 1 >= high {
                        break;
                    }
                    continue;
                }
                Some(Err(KafkaError::PartitionEOF(_))) | None => {}
                Some(Err(KafkaError::MessageConsumptionFatal(code))) => {
                    return Err(recover_error(format!("reading {topic}: {code}")));
                }
                // librdkafka retries transient errors by itself; the deadline
                // bounds how long it may try.
                Some(Err(e)) => {
                    tracing::debug!(writer = %self.name, error = %e, "reading the hwm topic")
                }
            }
            // Control records and aborted records are never returned, so the
            // end may only show in the position.
            if position(&consumer, topic).is_some_and(|offset| offset >= high) {
                break;
            }
        }
        Ok(latest)
    }

    fn dead_error(&self, dead: &Dead) -> SinkError {
        match dead {
            Dead::Fenced => SinkError::Fenced {
                edge: self.name.clone(),
            },
            Dead::Broken(reason) => SinkError::Aborted {
                edge: self.name.clone(),
                reason: format!("the writer is unusable, open a new one: {reason}"),
            },
        }
    }

    /// Sorts an error of one commit step into what the writer can do about it.
    fn classify(&self, step: &str, error: KafkaError) -> Failure {
        let fenced = |code: RDKafkaErrorCode| {
            matches!(
                code,
                RDKafkaErrorCode::Fenced
                    | RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
            )
        };
        if let Some((code, reason)) = self.producer.client().fatal_error() {
            return if fenced(code) {
                Failure::Fenced
            } else {
                Failure::Fatal(format!("{step}: {reason}"))
            };
        }
        let delivery = self.producer.context().take_delivery_failure();
        let reason = match delivery {
            Some(delivery) => format!("{step}: {error} ({delivery})"),
            None => format!("{step}: {error}"),
        };
        match &error {
            KafkaError::Transaction(e) if e.is_fatal() => {
                if fenced(e.code()) {
                    Failure::Fenced
                } else {
                    Failure::Fatal(reason)
                }
            }
            KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge) => {
                Failure::TooLarge(reason)
            }
            _ => Failure::Abortable(reason),
        }
    }

    /// Ends a failed commit: aborts what can be aborted and decides whether
    /// the writer survives.
    fn fail(&mut self, failure: Failure) -> SinkError {
        let counters = &self.shared.counters;
        let failure = match failure {
            Failure::Abortable(ref first) | Failure::TooLarge(ref first) => {
                let timeout = Duration::from_millis(self.shared.config.commit_timeout_ms);
                match self.abort(timeout) {
                    Ok(()) => {
                        counters
                            .transactions_aborted
                            .fetch_add(1, Ordering::Relaxed);
                        failure
                    }
                    Err(e) => match self.classify("aborting", e) {
                        Failure::Fenced => Failure::Fenced,
                        Failure::Fatal(then)
                        | Failure::Abortable(then)
                        | Failure::TooLarge(then) => {
                            Failure::Fatal(format!("{first}; then {then}; the outcome is unknown"))
                        }
                    },
                }
            }
            other => other,
        };
        let edge = self.name.clone();
        match failure {
            Failure::Fenced => {
                counters.writers_fenced.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(writer = %edge, "the writer was fenced by a newer writer of its edge or shard");
                self.dead = Some(Dead::Fenced);
                SinkError::Fenced { edge }
            }
            Failure::Fatal(reason) => {
                tracing::warn!(writer = %edge, %reason, "the writer failed fatally");
                let error = SinkError::Aborted {
                    edge,
                    reason: format!("{reason}; the writer is unusable, open a new one"),
                };
                self.dead = Some(Dead::Broken(reason));
                error
            }
            Failure::Abortable(reason) => SinkError::Aborted { edge, reason },
            Failure::TooLarge(reason) => SinkError::Config(format!(
                "{edge}: {reason}; raise kafka message_bytes_max (now {})",
                self.shared.config.message_bytes_max
            )),
        }
    }

    /// Aborts the open transaction. The abort purges the queued records and
    /// waits for their delivery reports, which a base producer serves only
    /// when polled: it gives up after a step, and resumes when called again
    /// once they are served.
    fn abort(&self, timeout: Duration) -> Result<(), KafkaError> {
        let deadline = Instant::now() + timeout;
        loop {
            let step = Duration::from_millis(ABORT_STEP_MS).min(remaining(deadline));
            match self.producer.abort_transaction(step) {
                Ok(()) => return Ok(()),
                Err(KafkaError::Transaction(e))
                    if e.is_retriable() && !e.is_fatal() && Instant::now() < deadline =>
                {
                    self.flush(deadline)?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn flush(&self, deadline: Instant) -> Result<(), KafkaError> {
        flush_producer(&self.producer, deadline)
    }

    fn send(&self, record: BaseRecord<'_, str, [u8]>, deadline: Instant) -> Result<(), KafkaError> {
        send_record(&self.producer, record, deadline)
    }

    fn produce_all(&self, parts: &[Part<'_>], deadline: Instant) -> Result<(), Failure> {
        for part in parts {
            self.produce_edge(part, deadline)?;
        }

        // commit_transaction flushes too, but with its whole timeout: flushing
        // first keeps the two within the commit deadline.
        self.flush(deadline)
            .map_err(|e| self.classify("flushing", e))?;
        loop {
            match self.producer.commit_transaction(remaining(deadline)) {
                Ok(()) => return Ok(()),
                // A timed-out commit may be retried; it is still in progress.
                Err(KafkaError::Transaction(e))
                    if e.is_retriable()
                        && !e.is_fatal()
                        && !e.txn_requires_abort()
                        && Instant::now() < deadline => {}
                Err(e) => return Err(self.classify("committing", e)),
            }
        }
    }

    /// Produces one edge's readings, refused readings and mark.
    fn produce_edge(&self, part: &Part<'_>, deadline: Instant) -> Result<(), Failure> {
        let config = &self.shared.config;
        let (edge_id, hwm, batches) = (part.edge_id, part.hwm, part.batches);
        let hwm_json = serde_json::to_vec(&hwm)
            .map_err(|e| Failure::Abortable(format!("encoding the mark of {edge_id}: {e}")))?;
        let epoch = hwm.epoch.to_string();
        for batch in batches {
            let seq = batch.seq.to_string();
            for reading in &batch.readings {
                let value = reading.to_json();
                let mut headers = OwnedHeaders::new_with_capacity(4)
                    .insert(Header {
                        key: HEADER_EDGE,
                        value: Some(edge_id),
                    })
                    .insert(Header {
                        key: HEADER_EPOCH,
                        value: Some(&epoch),
                    })
                    .insert(Header {
                        key: HEADER_SEQ,
                        value: Some(&seq),
                    });
                if let Some(stream) = &reading.stream {
                    headers = headers.insert(Header {
                        key: HEADER_STREAM,
                        value: Some(stream),
                    });
                }
                let record = BaseRecord::to(&config.readings_topic)
                    .key(reading.device_id.as_str())
                    .payload(value.as_slice())
                    .headers(headers);
                self.send(record, deadline).map_err(|e| {
                    self.classify(&format!("producing a reading of {}", reading.device_id), e)
                })?;
            }
            for refused in &batch.refused {
                let reading = &refused.reading;
                let value = reading.to_json();
                let headers = OwnedHeaders::new_with_capacity(4)
                    .insert(Header {
                        key: HEADER_EDGE,
                        value: Some(edge_id),
                    })
                    .insert(Header {
                        key: HEADER_EPOCH,
                        value: Some(&epoch),
                    })
                    .insert(Header {
                        key: HEADER_SEQ,
                        value: Some(&seq),
                    })
                    .insert(Header {
                        key: HEADER_REFUSED,
                        value: Some(&refused.reason),
                    });
                let record = BaseRecord::to(&config.refused_topic)
                    .key(reading.device_id.as_str())
                    .payload(value.as_slice())
                    .headers(headers);
                self.send(record, deadline).map_err(|e| {
                    self.classify(
                        &format!("producing a refused reading of {}", reading.device_id),
                        e,
                    )
                })?;
            }
        }
        let record = BaseRecord::to(&config.hwm_topic)
            .partition(HWM_PARTITION)
            .key(edge_id)
            .payload(hwm_json.as_slice());
        self.send(record, deadline)
            .map_err(|e| self.classify(&format!("producing the mark of {edge_id}"), e))
    }

    /// One transaction holding every part.
    fn commit_parts(&mut self, parts: &[Part<'_>]) -> Result<(), SinkError> {
        if let Some(dead) = &self.dead {
            return Err(self.dead_error(dead));
        }
        let deadline = Instant::now() + Duration::from_millis(self.shared.config.commit_timeout_ms);
        self.producer.context().take_delivery_failure();
        if let Err(e) = self.producer.begin_transaction() {
            let failure = self.classify("beginning the transaction", e);
            return Err(self.fail(failure));
        }
        if let Err(failure) = self.produce_all(parts, deadline) {
            return Err(self.fail(failure));
        }
        let records: usize = parts
            .iter()
            .flat_map(|p| p.batches)
            .map(|b| b.readings.len())
            .sum();
        let counters = &self.shared.counters;
        counters
            .records_sent
            .fetch_add(records as u64, Ordering::Relaxed);
        counters
            .transactions_committed
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// One edge's part of a transaction.
struct Part<'a> {
    edge_id: &'a str,
    hwm: Hwm,
    batches: &'a [SegmentBatch],
}

impl KafkaWriter {
    fn check_alive_for_marks(&self) -> Result<(), SinkError> {
        match &self.dead {
            Some(Dead::Fenced) => Err(SinkError::Fenced {
                edge: self.name.clone(),
            }),
            // The outcome of its last commit may be unknown, and so the mark.
            Some(Dead::Broken(reason)) => Err(SinkError::RecoverHwm {
                edge: self.name.clone(),
                reason: format!("the writer is unusable, open a new one: {reason}"),
            }),
            None => Ok(()),
        }
    }
}

impl EdgeLogWriter for KafkaWriter {
    fn high_water_mark(&mut self) -> Result<Option<Hwm>, SinkError> {
        self.check_alive_for_marks()?;
        if let Some(hwm) = self.hwm {
            return Ok(hwm);
        }
        let edge = self.edge.clone().unwrap_or_else(|| self.name.clone());
        let hwm = match self.recover_marks(Some(&edge))?.remove(&edge) {
            None => None,
            Some(Ok(hwm)) => Some(hwm),
            Some(Err(reason)) => return Err(SinkError::CorruptHwm { edge, reason }),
        };
        self.hwm = Some(hwm);
        Ok(hwm)
    }

    fn commit(
        &mut self,
        edge_id: &str,
        hwm: Hwm,
        batches: &[SegmentBatch],
    ) -> Result<(), SinkError> {
        if self.edge.as_deref() != Some(edge_id) {
            return Err(SinkError::Config(format!(
                "the writer of {} was asked to commit for edge {edge_id}",
                self.name
            )));
        }
        self.commit_parts(&[Part {
            edge_id,
            hwm,
            batches,
        }])?;
        self.hwm = Some(Some(hwm));
        Ok(())
    }
}

impl ShardLogWriter for KafkaWriter {
    fn marks(&mut self) -> Result<super::Marks, SinkError> {
        self.check_alive_for_marks()?;
        self.recover_marks(None)
    }

    fn commit(&mut self, edges: &[EdgeCommit]) -> Result<(), SinkError> {
        let parts: Vec<Part<'_>> = edges
            .iter()
            .map(|e| Part {
                edge_id: &e.edge_id,
                hwm: e.hwm,
                batches: &e.batches,
            })
            .collect();
        self.commit_parts(&parts)
    }
}

/// Waits until every record is acknowledged and its delivery report
/// served. The base producer's own flush polls in steps of 100 ms, which
/// would add up to that much to every commit; `rd_kafka_flush` with a real
/// timeout waits for the delivery reports to be *served*, which only a poll
/// does, so it always ran to its timeout.
fn flush_producer(
    producer: &BaseProducer<WriterContext>,
    deadline: Instant,
) -> Result<(), KafkaError> {
    let mut sleep = FLUSH_SLEEP_MIN;
    loop {
        producer.poll(Duration::ZERO);
        if producer.in_flight_count() == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut));
        }
        std::thread::sleep(sleep.min(remaining(deadline)));
        sleep = (sleep * 2).min(FLUSH_SLEEP_MAX);
    }
}

/// Enqueues one record, waiting for room in a full local queue until the
/// deadline.
fn send_record(
    producer: &BaseProducer<WriterContext>,
    mut record: BaseRecord<'_, str, [u8]>,
    deadline: Instant,
) -> Result<(), KafkaError> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                if Instant::now() < deadline =>
            {
                // Serving delivery reports frees room in the queue.
                producer.poll(Duration::from_millis(QUEUE_FULL_BACKOFF_MS));
                record = back;
            }
            Err((error, _)) => return Err(error),
        }
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// The consumer's position in the partition, once it has one.
fn position(consumer: &BaseConsumer<LogContext>, topic: &str) -> Option<i64> {
    let positions = consumer.position().ok()?;
    match positions.find_partition(topic, HWM_PARTITION)?.offset() {
        Offset::Offset(offset) => Some(offset),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad_key(config: &KafkaSinkConfig) -> String {
        match config.validate() {
            Err(SinkError::Config(reason)) => reason,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid_once_bootstrap_is_set() {
        let config = KafkaSinkConfig::new("127.0.0.1:9092");
        config.validate().unwrap();
        assert_eq!(config.readings_topic, "tributary.readings");
        assert_eq!(config.hwm_topic, "tributary.hwm");
        assert_eq!(config.transactional_id_prefix, "tributary-ingest");
        assert_eq!(config.transaction_timeout_ms, 15_000);
        assert_eq!(config.transactional_id("edge-1"), "tributary-ingest-edge-1");
    }

    #[test]
    fn validation_names_the_bad_key() {
        assert!(bad_key(&KafkaSinkConfig::default()).contains("bootstrap_servers"));
        let good = KafkaSinkConfig::new("k:9092");

        let config = KafkaSinkConfig {
            hwm_topic: "bad topic".into(),
            ..good.clone()
        };
        assert!(bad_key(&config).contains("hwm_topic"));
        let config = KafkaSinkConfig {
            hwm_topic: good.readings_topic.clone(),
            ..good.clone()
        };
        assert!(bad_key(&config).contains("hwm_topic"));
        let config = KafkaSinkConfig {
            commit_timeout_ms: 60_000,
            ..good.clone()
        };
        assert!(bad_key(&config).contains("commit_timeout_ms"));
        let config = KafkaSinkConfig {
            readings_partitions: 0,
            ..good.clone()
        };
        assert!(bad_key(&config).contains("readings_partitions"));
        let config = KafkaSinkConfig {
            message_bytes_max: 10,
            ..good.clone()
        };
        assert!(bad_key(&config).contains("message_bytes_max"));
        let config = KafkaSinkConfig {
            hwm_recover_timeout_ms: 0,
            ..good.clone()
        };
        assert!(bad_key(&config).contains("hwm_recover_timeout_ms"));
        let mut config = good.clone();
        config
            .client_properties
            .insert("enable.idempotence".into(), "false".into());
        let reason = bad_key(&config);
        assert!(
            reason.contains("client_properties") && reason.contains("enable.idempotence"),
            "{reason}"
        );
        let mut config = good;
        config
            .client_properties
            .insert("security.protocol".into(), "ssl".into());
        config.validate().unwrap();
    }

    #[test]
    fn config_deserializes_with_defaults_and_refuses_unknown_keys() {
        let config: KafkaSinkConfig =
            serde_json::from_str(r#"{"bootstrap_servers":"k:9092","commit_timeout_ms":1000}"#)
                .unwrap();
        assert_eq!(
            config,
            KafkaSinkConfig {
                commit_timeout_ms: 1000,
                ..KafkaSinkConfig::new("k:9092")
            }
        );
        assert!(serde_json::from_str::<KafkaSinkConfig>(r#"{"bootstrap":"k:9092"}"#).is_err());
    }
}

/// One committed reading as a consumer sees it, for `node tail`.
#[derive(Debug, Clone, PartialEq)]
pub struct TailRecord {
    pub partition: i32,
    pub offset: i64,
    pub edge: Option<String>,
    pub seq: Option<String>,
    pub value: String,
}

/// Follows the readings topic with `read_committed` from its current end and
/// hands each new record to `on_record`, until `count` records (0: no limit)
/// or until `idle` passes without a record.
pub fn tail(
    config: &KafkaSinkConfig,
    count: usize,
    idle: Duration,
    mut on_record: impl FnMut(TailRecord),
) -> Result<usize, SinkError> {
    let consumer: BaseConsumer<LogContext> = config
        .client_config_over(&[])
        .set("group.id", "tributary-tail")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "latest")
        .create_with_context(LogContext {
            role: "tail".into(),
        })
        .map_err(|e| SinkError::Config(format!("creating the tail consumer: {e}")))?;
    consumer
        .subscribe(&[&config.readings_topic])
        .map_err(|e| SinkError::Config(format!("subscribing to {}: {e}", config.readings_topic)))?;
    let mut seen = 0;
    let mut last = Instant::now();
    while count == 0 || seen < count {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                last = Instant::now();
                let header = |name: &str| {
                    m.headers().and_then(|h| {
                        h.iter()
                            .find(|x| x.key == name)
                            .and_then(|x| x.value)
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                    })
                };
                on_record(TailRecord {
                    partition: m.partition(),
                    offset: m.offset(),
                    edge: header(HEADER_EDGE),
                    seq: header(HEADER_SEQ),
                    value: m
                        .payload()
                        .map(|p| String::from_utf8_lossy(p).into_owned())
                        .unwrap_or_default(),
                });
                seen += 1;
            }
            Some(Err(e)) => tracing::warn!(error = %e, "tail: consumer error"),
            None if last.elapsed() >= idle => break,
            None => {}
        }
    }
    Ok(seen)
}

//! The fleet's status, shared by the cloud nodes: each publishes the reports
//! of the nodes placed on it (and its own) to one compacted topic, keyed by
//! the reported node, and reads everyone's back, so that any cloud node's
//! dashboard shows the whole fleet.
//!
//! Status is a picture, not a record: a write that fails or finds the local
//! queue full is dropped and counted, and the next interval sends a newer
//! one. The topic has one partition (a fleet's status fits one), is
//! compacted (the newest record per node is what matters) and is read from
//! its start, so a node that starts sees every node's latest.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, Timestamp};
use rdkafka::producer::{BaseProducer, BaseRecord};
use rdkafka::{Offset, TopicPartitionList};

use super::{LogContext, SinkError};

/// Bound on creating the topic and joining it at start.
pub const STATUS_OPEN_TIMEOUT_MS: u64 = 10_000;
/// How long a status record may wait in the local queue; later ones replace it.
const STATUS_MESSAGE_TIMEOUT_MS: u64 = 5_000;
/// Records the local queue holds at most; past it a record is dropped.
const STATUS_QUEUE_RECORDS_MAX: usize = 100_000;

/// A record read back from the status topic.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusRecord {
    pub key: String,
    pub value: Vec<u8>,
    /// The producer's time, Unix milliseconds, if the record has one.
    pub timestamp_ms: Option<i64>,
}

/// Counts of what the status topic did; they only grow.
#[derive(Debug, Default)]
pub struct StatusCounters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    /// Dropped before the broker had them (queue full, a failed delivery).
    pub dropped: AtomicU64,
    pub errors: AtomicU64,
}

pub struct KafkaStatus {
    producer: BaseProducer,
    consumer: BaseConsumer<LogContext>,
    topic: String,
    record_bytes_max: usize,
    pub counters: StatusCounters,
}

impl KafkaStatus {
    /// Connects, creates the topic if absent and starts reading it from its
    /// start. Blocks on the broker: call it from a blocking thread.
    pub fn open(
        bootstrap_servers: &str,
        topic: &str,
        record_bytes_max: usize,
        node_id: &str,
    ) -> Result<Self, SinkError> {
        super::check_topic_name("status topic", topic)?;
        let mut config = rdkafka::ClientConfig::new();
        config.set("bootstrap.servers", bootstrap_servers);
        let bytes_max = record_bytes_max.to_string();
        super::create_topic_if_absent(
            &config,
            topic,
            &[
                ("cleanup.policy", "compact"),
                ("max.message.bytes", &bytes_max),
            ],
            Duration::from_millis(STATUS_OPEN_TIMEOUT_MS),
        )
        .map_err(SinkError::Config)?;
        let producer: BaseProducer = config
            .clone()
            .set("acks", "1")
            .set("linger.ms", "20")
            .set("compression.type", "lz4")
            .set("message.max.bytes", record_bytes_max.to_string())
            .set("message.timeout.ms", STATUS_MESSAGE_TIMEOUT_MS.to_string())
            .set(
                "queue.buffering.max.messages",
                STATUS_QUEUE_RECORDS_MAX.to_string(),
            )
            .create()
            .map_err(|e| SinkError::Config(format!("creating the status producer: {e}")))?;
        let consumer: BaseConsumer<LogContext> = config
            // librdkafka refuses assign() without a group; this one never
            // joins it nor commits to it.
            .set("group.id", format!("tributary-status-{node_id}"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("fetch.max.bytes", (record_bytes_max * 4).to_string())
            .create_with_context(LogContext {
                role: "status-reader".into(),
            })
            .map_err(|e| SinkError::Config(format!("creating the status reader: {e}")))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning)
            .and_then(|()| consumer.assign(&tpl))
            .map_err(|e| SinkError::Config(format!("reading the status topic {topic}: {e}")))?;
        Ok(Self {
            producer,
            consumer,
            topic: topic.to_owned(),
            record_bytes_max,
            counters: StatusCounters::default(),
        })
    }

    /// Queues one node's status; never blocks. Returns `false` (and counts
    /// it dropped) when it is over the record limit or the queue is full.
    pub fn publish(&self, key: &str, value: &[u8]) -> bool {
        if value.len() > self.record_bytes_max {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        match self.producer.send(
            BaseRecord::<str, [u8]>::to(&self.topic)
                .key(key)
                .payload(value),
        ) {
            Ok(()) => {
                self.counters.sent.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err((e, _)) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "a status record was dropped");
                false
            }
        }
    }

    /// What arrived since the last call, at most `records_max`; never
    /// blocks. Also serves the producer's deliveries.
    pub fn poll(&self, records_max: usize) -> Vec<StatusRecord> {
        self.producer.poll(Duration::ZERO);
        let mut out = Vec::new();
        while out.len() < records_max {
            match self.consumer.poll(Duration::ZERO) {
                None => break,
                Some(Ok(m)) => {
                    self.counters.received.fetch_add(1, Ordering::Relaxed);
                    let (Some(key), Some(value)) = (
                        m.key().and_then(|k| std::str::from_utf8(k).ok()),
                        m.payload(),
                    ) else {
                        // A tombstone, or a record of someone else: nothing to show.
                        continue;
                    };
                    let timestamp_ms = match m.timestamp() {
                        Timestamp::CreateTime(t) | Timestamp::LogAppendTime(t) => Some(t),
                        Timestamp::NotAvailable => None,
                    };
                    out.push(StatusRecord {
                        key: key.to_owned(),
                        value: value.to_vec(),
                        timestamp_ms,
                    });
                }
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => {
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(error = %e, "reading the status topic");
                    break;
                }
            }
        }
        out
    }
}

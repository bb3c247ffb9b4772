//! The cloud stages' consume-transform-produce on Kafka.
//!
//! A consumer in a consumer group reads the readings topic `read_committed`
//! (so it never sees a reading an edge's aborted transaction wrote); a
//! transactional producer writes the stages' outputs to the sink topics and,
//! in the same transaction, the group's offsets (`send_offsets_to_transaction`,
//! KIP-447). Outputs and progress are therefore committed together or not
//! at all: after a crash the stages start again from the committed offsets,
//! and what they emit from there was never committed before.
//!
//! Stage state is not checkpointed: a restarted cloud stage starts fresh from
//! the committed offsets. Exactly once holds for what was emitted; a window or
//! a held threshold that spanned the restart starts over.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use super::{
    ensure_topics, remaining, KafkaSinkConfig, LogContext, WriterContext, PRODUCER_DEFAULTS,
};
use crate::reading::Reading;
use crate::sink::{LogReading, SinkError, SinkRecord, StageLog};

/// The header naming the stream a sink record came from.
pub const HEADER_STAGE_STREAM: &str = "tributary-stream";
/// Malformed records are logged at most this often; all are counted.
const MALFORMED_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// Where and as whom the cloud stages read and write.
#[derive(Debug, Clone)]
pub struct KafkaStageLogConfig {
    pub sink: KafkaSinkConfig,
    /// The consumer group: one per topology, shared by its cloud nodes.
    pub group_id: String,
    /// One per cloud node of the topology: a restarted node fences its
    /// previous producer.
    pub transactional_id: String,
    /// Created if absent, like the readings topic.
    pub sink_topics: Vec<String>,
}

pub struct KafkaStageLog {
    config: KafkaStageLogConfig,
    consumer: BaseConsumer<LogContext>,
    producer: BaseProducer<WriterContext>,
    /// The next offset per partition of the readings topic, polled since the
    /// last commit.
    positions: BTreeMap<i32, i64>,
    malformed: u64,
    malformed_logged: Option<Instant>,
}

fn stages_error(step: &'static str) -> impl Fn(KafkaError) -> SinkError {
    move |e| SinkError::Stages {
        step,
        reason: e.to_string(),
    }
}

impl KafkaStageLog {
    /// Creates the topics if absent, joins the group and fences earlier
    /// producers of the same transactional id. Blocks on the broker.
    pub fn open(config: KafkaStageLogConfig) -> Result<Self, SinkError> {
        let sink = &config.sink;
        sink.validate()?;
        for t in &config.sink_topics {
            super::check_topic_name("sink topic", t)?;
        }
        let deadline = Instant::now() + Duration::from_millis(sink.open_timeout_ms);
        ensure_topics(sink, deadline)?;
        ensure_sink_topics(sink, &config.sink_topics, deadline)?;
        let consumer: BaseConsumer<LogContext> = sink
            .client_config()
            .set("group.id", &config.group_id)
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .create_with_context(LogContext {
                role: format!("stages-consumer {}", config.group_id),
            })
            .map_err(|e| SinkError::Config(format!("creating the stages' consumer: {e}")))?;
        consumer
            .subscribe(&[sink.readings_topic.as_str()])
            .map_err(stages_error("subscribing to the readings topic"))?;
        let producer: BaseProducer<WriterContext> = sink
            .client_config_over(PRODUCER_DEFAULTS)
            .set("transactional.id", &config.transactional_id)
            .set("enable.idempotence", "true")
            .set(
                "transaction.timeout.ms",
                sink.transaction_timeout_ms.to_string(),
            )
            .set("message.max.bytes", sink.message_bytes_max.to_string())
            .create_with_context(WriterContext {
                edge_id: config.transactional_id.clone(),
                delivery_failure: Mutex::new(None),
            })
            .map_err(|e| SinkError::Config(format!("creating the stages' producer: {e}")))?;
        producer
            .init_transactions(remaining(deadline))
            .map_err(stages_error("fencing the previous producer of the stages"))?;
        Ok(Self {
            config,
            consumer,
            producer,
            positions: BTreeMap::new(),
            malformed: 0,
            malformed_logged: None,
        })
    }

    fn transact(&mut self, outputs: &[SinkRecord], deadline: Instant) -> Result<(), SinkError> {
        self.producer
            .begin_transaction()
            .map_err(stages_error("beginning a transaction"))?;
        for o in outputs {
            let headers = OwnedHeaders::new_with_capacity(1).insert(Header {
                key: HEADER_STAGE_STREAM,
                value: Some(&o.stream),
            });
            let record = BaseRecord::to(&o.topic)
                .key(o.key.as_str())
                .payload(o.value.as_slice())
                .headers(headers);
            super::send_record(&self.producer, record, deadline)
                .map_err(stages_error("producing an output"))?;
        }
        super::flush_producer(&self.producer, deadline)
            .map_err(stages_error("flushing the outputs"))?;
        if let Some(reason) = self.producer.context().take_delivery_failure() {
            return Err(SinkError::Stages {
                step: "delivering the outputs",
                reason,
            });
        }
        let mut offsets = TopicPartitionList::new();
        for (&partition, &next) in &self.positions {
            offsets
                .add_partition_offset(
                    &self.config.sink.readings_topic,
                    partition,
                    Offset::Offset(next),
                )
                .map_err(stages_error("listing the offsets"))?;
        }
        if offsets.count() > 0 {
            let group = self
                .consumer
                .group_metadata()
                .ok_or_else(|| SinkError::Stages {
                    step: "reading the consumer group's metadata",
                    reason: "the consumer has none".into(),
                })?;
            self.producer
                .send_offsets_to_transaction(&offsets, &group, remaining(deadline))
                .map_err(stages_error("adding the offsets to the transaction"))?;
        }
        self.producer
            .commit_transaction(remaining(deadline))
            .map_err(stages_error("committing the transaction"))
    }
}

impl StageLog for KafkaStageLog {
    fn poll(
        &mut self,
        records_max: usize,
        timeout: Duration,
    ) -> Result<Vec<LogReading>, SinkError> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < records_max {
            // Wait for the first record only; then take what is already here.
            let wait = if out.is_empty() {
                remaining(deadline)
            } else {
                Duration::ZERO
            };
            let Some(next) = self.consumer.poll(wait) else {
                break;
            };
            let m = next.map_err(stages_error("polling the readings topic"))?;
            self.positions.insert(m.partition(), m.offset() + 1);
            let edge = m.headers().and_then(|h| {
                rdkafka::message::Headers::iter(h)
                    .find(|h| h.key == super::HEADER_EDGE)
                    .and_then(|h| h.value)
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .map(str::to_owned)
            });
            match (m.payload().map(serde_json::from_slice::<Reading>), edge) {
                (Some(Ok(reading)), Some(edge)) => out.push(LogReading {
                    partition: m.partition(),
                    offset: m.offset(),
                    edge,
                    reading,
                }),
                (other, _) => {
                    self.malformed += 1;
                    let due = self
                        .malformed_logged
                        .is_none_or(|t| t.elapsed() >= MALFORMED_LOG_INTERVAL);
                    if due {
                        self.malformed_logged = Some(Instant::now());
                        let reason = match other {
                            Some(Err(e)) => e.to_string(),
                            Some(Ok(_)) => format!("no {} header", super::HEADER_EDGE),
                            None => "no payload".into(),
                        };
                        tracing::warn!(partition = m.partition(), offset = m.offset(), %reason, malformed = self.malformed, "a record of the readings topic is not a reading; skipped");
                    }
                }
            }
            if Instant::now() >= deadline && !out.is_empty() {
                break;
            }
        }
        Ok(out)
    }

    fn commit(&mut self, outputs: &[SinkRecord]) -> Result<(), SinkError> {
        if outputs.is_empty() && self.positions.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_millis(self.config.sink.commit_timeout_ms);
        self.producer.context().take_delivery_failure();
        match self.transact(outputs, deadline) {
            Ok(()) => {
                self.positions.clear();
                Ok(())
            }
            Err(e) => {
                // The caller starts over from the committed offsets; an
                // abort that fails leaves it to the transaction timeout.
                if let Err(abort) = self.producer.abort_transaction(remaining(deadline)) {
                    tracing::warn!(error = %abort, "aborting the stages' transaction failed");
                }
                Err(e)
            }
        }
    }

    fn records_malformed(&self) -> u64 {
        self.malformed
    }
}

fn ensure_sink_topics(
    config: &KafkaSinkConfig,
    topics: &[String],
    deadline: Instant,
) -> Result<(), SinkError> {
    if topics.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<LogContext> = config
        .client_config()
        .create_with_context(LogContext {
            role: "admin".into(),
        })
        .map_err(|e| SinkError::Config(format!("creating the admin client: {e}")))?;
    let timeout = remaining(deadline);
    let options = AdminOptions::new()
        .request_timeout(Some(timeout))
        .operation_timeout(Some(timeout));
    // A name twice in one request makes librdkafka 2.x dereference a null
    // result (a segfault in rdkafka 0.39's build_topic_results): dedup first.
    let unique: std::collections::BTreeSet<&String> = topics.iter().collect();
    let new: Vec<NewTopic<'_>> = unique
        .into_iter()
        .map(|t| {
            NewTopic::new(
                t,
                config.readings_partitions,
                TopicReplication::Fixed(config.replication_factor),
            )
        })
        .collect();
    let results = futures::executor::block_on(admin.create_topics(&new, &options))
        .map_err(|e| SinkError::Config(format!("creating the sink topics: {e}")))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(SinkError::Config(format!(
                    "creating sink topic {topic}: {code}"
                )));
            }
        }
    }
    Ok(())
}

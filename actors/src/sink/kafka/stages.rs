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
//! The cloud nodes of a topology share one consumer group, so the group
//! spreads the readings topic's partitions over them and moves a crashed
//! node's partitions to the others.
//!
//! **State checkpoints.** The stages' state of each partition goes into the
//! same transaction as the outputs and offsets: one record on the *state
//! topic* (compacted, as many partitions as the readings topic; the state of
//! readings partition `p` is on state partition `p`, key `p`). A record is
//! [`Checkpoint`] in bincode: a format byte, the partition, the readings
//! offset it covers up to (the group's offset committed with it) and the
//! pipeline's snapshot. A node given partition `p` reads the group's offset
//! `o` of `p` (a stable read: the broker answers only once a transaction
//! that was moving it has ended) and the newest checkpoint of `p`. It
//! starts `p` from that state only when the checkpoint covers exactly up to
//! `o`; an older one is the state of a transaction whose markers are still
//! being written, so it reads again, until `restore_timeout_ms`.
//!
//! **Rebalances.** A partition revoked while a poll is collecting readings
//! takes its not yet returned readings with it: the stages never absorb a
//! reading they could not commit, and the next owner reads it from the
//! committed offset. A commit after this consumer was pushed out of the
//! group is refused by the broker (KIP-447: the group's generation goes
//! with the offsets), and the actor starts over.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use super::{
    ensure_topics, remaining, KafkaSinkConfig, LogContext, WriterContext, PRODUCER_DEFAULTS,
};
use crate::reading::Reading;
use crate::sink::{LogReading, Polled, SinkError, SinkRecord, StageLog};

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
    /// Compacted; created if absent with the readings topic's partitions.
    pub state_topic: String,
    /// How long the group waits for a silent node before it moves its
    /// partitions to the others; the broker bounds it
    /// (`group.min.session.timeout.ms`, 6 s by default).
    pub session_timeout_ms: u64,
    /// Bound on reading a partition's state when it is given to this node.
    pub restore_timeout_ms: u64,
}

/// One partition's state, as the state topic holds it.
#[derive(Debug, Clone, PartialEq, bincode::Encode, bincode::Decode)]
pub struct Checkpoint {
    /// [`CHECKPOINT_FORMAT`]; another is not read.
    pub format: u8,
    pub partition: i32,
    /// The readings offset the state covers up to: the group's offset of the
    /// partition committed in the same transaction.
    pub next_offset: i64,
    /// [`crate::pipeline::Pipeline::snapshot`].
    pub state: Vec<u8>,
}

pub const CHECKPOINT_FORMAT: u8 = 1;

/// How far back from the end of a state partition the first look for the
/// newest checkpoint starts; each miss looks 8 times further.
const CHECKPOINT_LOOKBACK_RECORDS: i64 = 16;
/// Pause between reads of a state partition whose newest checkpoint is
/// older than the group's offset.
const RESTORE_RETRY_MS: u64 = 50;

/// What the group did to this consumer, in order, since last asked.
#[derive(Debug, Clone, PartialEq)]
enum GroupEvent {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

struct StagesContext {
    role: String,
    topic: String,
    events: Mutex<Vec<GroupEvent>>,
}

impl StagesContext {
    fn partitions(&self, tpl: &TopicPartitionList) -> Vec<i32> {
        tpl.elements()
            .iter()
            .filter(|e| e.topic() == self.topic)
            .map(|e| e.partition())
            .collect()
    }

    fn take_events(&self) -> Vec<GroupEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl ClientContext for StagesContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        super::log_rdkafka(&self.role, level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if super::is_partition_eof(&error) {
            return;
        }
        tracing::warn!(role = %self.role, %error, reason, "kafka client error");
    }
}

impl ConsumerContext for StagesContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let event = GroupEvent::Revoked(self.partitions(tpl));
            self.events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(event);
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let event = GroupEvent::Assigned(self.partitions(tpl));
            self.events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(event);
        }
    }
}

pub struct KafkaStageLog {
    config: KafkaStageLogConfig,
    consumer: BaseConsumer<StagesContext>,
    /// Reads checkpoints back; assigned by hand, never in a group.
    state_reader: BaseConsumer<LogContext>,
    producer: BaseProducer<WriterContext>,
    /// The next offset per partition of the readings topic, polled since the
    /// last commit.
    positions: BTreeMap<i32, i64>,
    /// The group's offset of each partition held, as last committed.
    committed: BTreeMap<i32, i64>,
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
        super::check_topic_name("state topic", &config.state_topic)?;
        if config.session_timeout_ms < 1_000 || config.restore_timeout_ms == 0 {
            return Err(SinkError::Config(format!(
                "the stages' session_timeout_ms must be at least 1000 and restore_timeout_ms above 0 (got {} and {})",
                config.session_timeout_ms, config.restore_timeout_ms
            )));
        }
        ensure_sink_topics(sink, &config.sink_topics, &[], deadline)?;
        ensure_sink_topics(
            sink,
            std::slice::from_ref(&config.state_topic),
            &[("cleanup.policy", "compact")],
            deadline,
        )?;
        let consumer: BaseConsumer<StagesContext> = sink
            .client_config()
            .set("group.id", &config.group_id)
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", config.session_timeout_ms.to_string())
            .set(
                "heartbeat.interval.ms",
                (config.session_timeout_ms / 4).to_string(),
            )
            .create_with_context(StagesContext {
                role: format!("stages-consumer {}", config.group_id),
                topic: sink.readings_topic.clone(),
                events: Mutex::new(Vec::new()),
            })
            .map_err(|e| SinkError::Config(format!("creating the stages' consumer: {e}")))?;
        let state_reader: BaseConsumer<LogContext> = sink
            .client_config()
            .set("isolation.level", "read_committed")
            // librdkafka refuses assign() without a group; it never joins
            // it nor commits to it.
            .set("group.id", format!("{}-state-reader", config.group_id))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set("fetch.wait.max.ms", super::RECOVER_FETCH_WAIT_MS)
            .create_with_context(LogContext {
                role: format!("stages-state-reader {}", config.group_id),
            })
            .map_err(|e| SinkError::Config(format!("creating the state reader: {e}")))?;
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
            state_reader,
            producer,
            positions: BTreeMap::new(),
            committed: BTreeMap::new(),
            malformed: 0,
            malformed_logged: None,
        })
    }

    /// The newest checkpoint of `partition` on the state topic, if any.
    fn read_checkpoint(
        &self,
        partition: i32,
        deadline: Instant,
    ) -> Result<Option<Checkpoint>, SinkError> {
        let topic = self.config.state_topic.as_str();
        let (low, high) = self
            .state_reader
            .fetch_watermarks(topic, partition, remaining(deadline))
            .map_err(stages_error("fetching the state topic's watermarks"))?;
        let mut lookback = CHECKPOINT_LOOKBACK_RECORDS;
        loop {
            let start = high.saturating_sub(lookback).max(low);
            if high <= start {
                return Ok(None);
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(topic, partition, Offset::Offset(start))
                .and_then(|()| self.state_reader.assign(&tpl))
                .map_err(stages_error("assigning a state partition"))?;
            let mut newest = None;
            loop {
                if Instant::now() >= deadline {
                    return Err(SinkError::Stages {
                        step: "reading a partition's checkpoint",
                        reason: format!(
                            "timed out on {topic} partition {partition} between offsets {start} and {high}"
                        ),
                    });
                }
                let wait = Duration::from_millis(super::RECOVER_POLL_MS).min(remaining(deadline));
                match self.state_reader.poll(wait) {
                    Some(Ok(m)) => {
                        let decoded = m.payload().and_then(|bytes| {
                            bincode::decode_from_slice::<Checkpoint, _>(
                                bytes,
                                crate::reading::bincode_config(),
                            )
                            .ok()
                        });
                        match decoded {
                            Some((c, _))
                                if c.format == CHECKPOINT_FORMAT && c.partition == partition =>
                            {
                                newest = Some(c)
                            }
                            _ => tracing::warn!(partition, offset = m.offset(), "a record of the state topic is not a checkpoint of its partition; skipped"),
                        }
                        if m.offset() + 1 >= high {
                            break;
                        }
                    }
                    Some(Err(KafkaError::PartitionEOF(_))) => break,
                    Some(Err(e)) => return Err(stages_error("reading a checkpoint")(e)),
                    None => {}
                }
            }
            if newest.is_some() || start == low {
                return Ok(newest);
            }
            lookback = lookback.saturating_mul(8);
        }
    }

    /// The state committed with the group's offset of `partition`, which
    /// this consumer was just given.
    fn restore(&mut self, partition: i32) -> Result<Option<Vec<u8>>, SinkError> {
        let deadline = Instant::now() + Duration::from_millis(self.config.restore_timeout_ms);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.config.sink.readings_topic, partition);
        let offsets = self
            .consumer
            .committed_offsets(tpl, remaining(deadline))
            .map_err(stages_error("reading the group's offset of a partition"))?;
        let committed = match offsets.elements().first().map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        };
        match committed {
            Some(o) => self.committed.insert(partition, o),
            None => self.committed.remove(&partition),
        };
        loop {
            let checkpoint = self.read_checkpoint(partition, deadline)?;
            match (committed, checkpoint) {
                (None, None) => return Ok(None),
                (None, Some(c)) => {
                    tracing::warn!(partition, covers_to = c.next_offset, "a checkpoint but no offset of the group (expired or deleted): the partition is read from its start with fresh state");
                    return Ok(None);
                }
                (Some(o), None) => {
                    tracing::warn!(partition, offset = o, "the group has an offset but no checkpoint (written before checkpoints, or deleted): fresh state");
                    return Ok(None);
                }
                (Some(o), Some(c)) if c.next_offset == o => return Ok(Some(c.state)),
                (Some(o), Some(c)) if c.next_offset > o => {
                    tracing::warn!(partition, offset = o, covers_to = c.next_offset, "the group's offset is behind the newest checkpoint (reset by an operator?): fresh state");
                    return Ok(None);
                }
                (Some(o), Some(c)) => {
                    if Instant::now() >= deadline {
                        return Err(SinkError::Stages {
                            step: "restoring a partition's state",
                            reason: format!(
                                "the newest checkpoint of partition {partition} covers to offset {} but the group's offset is {o} (after {} ms)",
                                c.next_offset, self.config.restore_timeout_ms
                            ),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(RESTORE_RETRY_MS));
                }
            }
        }
    }

    /// Applies what the group did since the last call; `out` loses the
    /// readings of partitions that left.
    fn follow_group(
        &mut self,
        events: Vec<GroupEvent>,
        out: &mut Vec<LogReading>,
        polled: &mut Polled,
    ) -> Result<(), SinkError> {
        for event in events {
            match event {
                GroupEvent::Revoked(partitions) => {
                    out.retain(|r| !partitions.contains(&r.partition));
                    for p in &partitions {
                        self.positions.remove(p);
                        self.committed.remove(p);
                    }
                    polled.assigned.retain(|(p, _)| !partitions.contains(p));
                    polled.revoked.extend(partitions);
                }
                GroupEvent::Assigned(partitions) => {
                    for p in partitions {
                        let state = self.restore(p)?;
                        polled.revoked.retain(|r| *r != p);
                        polled.assigned.push((p, state));
                    }
                }
            }
        }
        Ok(())
    }

    fn take_message(&mut self, m: &impl Message, out: &mut Vec<LogReading>) {
        take_message(
            &mut self.positions,
            &mut self.malformed,
            &mut self.malformed_logged,
            m,
            out,
        );
    }

    fn transact(
        &mut self,
        outputs: &[SinkRecord],
        checkpoints: &[(i32, Vec<u8>)],
        deadline: Instant,
    ) -> Result<(), SinkError> {
        self.producer
            .begin_transaction()
            .map_err(stages_error("beginning a transaction"))?;
        for (partition, state) in checkpoints {
            let Some(&next_offset) = self
                .positions
                .get(partition)
                .or_else(|| self.committed.get(partition))
            else {
                // Nothing was ever read of it, so it holds no state.
                continue;
            };
            let checkpoint = Checkpoint {
                format: CHECKPOINT_FORMAT,
                partition: *partition,
                next_offset,
                state: state.clone(),
            };
            let bytes = bincode::encode_to_vec(&checkpoint, crate::reading::bincode_config())
                .map_err(|e| SinkError::Stages {
                    step: "encoding a checkpoint",
                    reason: e.to_string(),
                })?;
            let key = partition.to_string();
            let record = BaseRecord::to(&self.config.state_topic)
                .partition(*partition)
                .key(key.as_str())
                .payload(bytes.as_slice());
            super::send_record(&self.producer, record, deadline)
                .map_err(stages_error("producing a checkpoint"))?;
        }
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
    fn poll(&mut self, records_max: usize, timeout: Duration) -> Result<Polled, SinkError> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        let mut polled = Polled::default();
        while out.len() < records_max {
            // Wait for the first record only; then take what is already here.
            let wait = if out.is_empty() {
                remaining(deadline)
            } else {
                Duration::ZERO
            };
            let next = self.consumer.poll(wait);
            // A rebalance happens inside poll, before the message it returns:
            // follow it first, so that the stages see the partitions change
            // before any reading of the new ones. Rare, so the message is
            // copied out of the consumer's buffer only then.
            let events = self.consumer.context().take_events();
            if !events.is_empty() {
                let next = next.map(|r| r.map(|m| m.detach()));
                self.follow_group(events, &mut out, &mut polled)?;
                match next {
                    None => break,
                    Some(m) => {
                        let m = m.map_err(stages_error("polling the readings topic"))?;
                        self.take_message(&m, &mut out);
                    }
                }
            } else {
                let Some(next) = next else {
                    break;
                };
                let m = next.map_err(stages_error("polling the readings topic"))?;
                take_message(
                    &mut self.positions,
                    &mut self.malformed,
                    &mut self.malformed_logged,
                    &m,
                    &mut out,
                );
            }
            if Instant::now() >= deadline && !out.is_empty() {
                break;
            }
        }
        let events = self.consumer.context().take_events();
        self.follow_group(events, &mut out, &mut polled)?;
        polled.readings = out;
        Ok(polled)
    }

    fn commit(
        &mut self,
        outputs: &[SinkRecord],
        checkpoints: &[(i32, Vec<u8>)],
    ) -> Result<(), SinkError> {
        if outputs.is_empty() && self.positions.is_empty() && checkpoints.is_empty() {
            return Ok(());
        }
        if let Some(p) = self
            .positions
            .keys()
            .find(|p| !checkpoints.iter().any(|(c, _)| c == *p))
        {
            return Err(SinkError::Stages {
                step: "checking the checkpoints",
                reason: format!("partition {p} was polled but its state is not in the commit"),
            });
        }
        let deadline = Instant::now() + Duration::from_millis(self.config.sink.commit_timeout_ms);
        self.producer.context().take_delivery_failure();
        match self.transact(outputs, checkpoints, deadline) {
            Ok(()) => {
                self.committed.append(&mut self.positions);
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

/// Takes one record of the readings topic: a reading into `out`, anything
/// else counted; either way its offset moves on.
fn take_message(
    positions: &mut BTreeMap<i32, i64>,
    malformed: &mut u64,
    malformed_logged: &mut Option<Instant>,
    m: &impl Message,
    out: &mut Vec<LogReading>,
) {
    positions.insert(m.partition(), m.offset() + 1);
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
            *malformed += 1;
            let due = malformed_logged.is_none_or(|t| t.elapsed() >= MALFORMED_LOG_INTERVAL);
            if due {
                *malformed_logged = Some(Instant::now());
                let reason = match other {
                    Some(Err(e)) => e.to_string(),
                    Some(Ok(_)) => format!("no {} header", super::HEADER_EDGE),
                    None => "no payload".into(),
                };
                tracing::warn!(partition = m.partition(), offset = m.offset(), %reason, malformed = *malformed, "a record of the readings topic is not a reading; skipped");
            }
        }
    }
}

fn ensure_sink_topics(
    config: &KafkaSinkConfig,
    topics: &[String],
    topic_config: &[(&str, &str)],
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
            topic_config.iter().fold(
                NewTopic::new(
                    t,
                    config.readings_partitions,
                    TopicReplication::Fixed(config.replication_factor),
                ),
                |topic, (k, v)| topic.set(k, v),
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

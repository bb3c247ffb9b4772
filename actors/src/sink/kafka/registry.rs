//! The registry topic: compacted, one partition, keyed `<kind>/<id>` (see
//! [`crate::registry`] for the record format). Writers wait for the
//! broker's acknowledgement (all in-sync replicas); readers start at the
//! beginning and read to the end before they answer anyone, then follow.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use super::{remaining, LogContext, SinkError};
use crate::registry::{Change, Entry, Registry};

/// Bound on one registry write, and on creating the topic.
pub const REGISTRY_WRITE_TIMEOUT_MS: u64 = 10_000;
/// Records taken per [`KafkaRegistry::follow`] at most.
pub const REGISTRY_RECORDS_PER_POLL_MAX: usize = 10_000;

fn registry_error(step: &'static str) -> impl Fn(String) -> SinkError {
    move |reason| SinkError::Registry { step, reason }
}

pub struct KafkaRegistry {
    producer: FutureProducer,
    consumer: BaseConsumer<LogContext>,
    topic: String,
}

impl KafkaRegistry {
    /// Connects and creates the topic if absent; reads nothing yet. Blocks
    /// on the broker: call it from a blocking thread.
    pub fn open(bootstrap_servers: &str, topic: &str, reader: &str) -> Result<Self, SinkError> {
        super::check_topic_name("registry topic", topic)?;
        let mut config = rdkafka::ClientConfig::new();
        config.set("bootstrap.servers", bootstrap_servers);
        super::create_topic_if_absent(
            &config,
            topic,
            &[("cleanup.policy", "compact")],
            Duration::from_millis(REGISTRY_WRITE_TIMEOUT_MS),
        )
        .map_err(registry_error("creating the registry topic"))?;
        let producer: FutureProducer = config
            .clone()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", REGISTRY_WRITE_TIMEOUT_MS.to_string())
            .create()
            .map_err(|e| registry_error("creating the registry producer")(e.to_string()))?;
        let consumer: BaseConsumer<LogContext> = config
            // librdkafka refuses assign() without a group; this one never
            // joins it nor commits to it.
            .set("group.id", format!("tributary-registry-{reader}"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set("fetch.wait.max.ms", "50")
            .create_with_context(LogContext {
                role: "registry-reader".into(),
            })
            .map_err(|e| registry_error("creating the registry reader")(e.to_string()))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning)
            .and_then(|()| consumer.assign(&tpl))
            .map_err(|e| registry_error("assigning the registry topic")(e.to_string()))?;
        Ok(Self {
            producer,
            consumer,
            topic: topic.to_owned(),
        })
    }

    /// Reads everything the topic holds now into `registry`, within
    /// `timeout`. Blocks.
    pub fn catch_up(
        &self,
        registry: &mut Registry,
        timeout: Duration,
    ) -> Result<Vec<Change>, SinkError> {
        let deadline = Instant::now() + timeout;
        let (low, high) = self
            .consumer
            .fetch_watermarks(&self.topic, 0, remaining(deadline))
            .map_err(|e| registry_error("fetching the registry's watermarks")(e.to_string()))?;
        let mut changes = Vec::new();
        if high <= low {
            return Ok(changes);
        }
        loop {
            if Instant::now() >= deadline {
                return Err(registry_error("reading the registry")(format!(
                    "not at its end (offset {high}) after {} ms",
                    timeout.as_millis()
                )));
            }
            match self
                .consumer
                .poll(Duration::from_millis(100).min(remaining(deadline)))
            {
                Some(Ok(m)) => {
                    if let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) {
                        changes.push(registry.handle_record(key, m.payload()));
                    }
                    if m.offset() + 1 >= high {
                        return Ok(changes);
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => return Ok(changes),
                Some(Err(e)) => return Err(registry_error("reading the registry")(e.to_string())),
                None => {}
            }
        }
    }

    /// What arrived since the last call, applied to `registry`; never blocks.
    pub fn follow(&self, registry: &mut Registry) -> Vec<Change> {
        let mut changes = Vec::new();
        while changes.len() < REGISTRY_RECORDS_PER_POLL_MAX {
            match self.consumer.poll(Duration::ZERO) {
                Some(Ok(m)) => {
                    if let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) {
                        changes.push(registry.handle_record(key, m.payload()));
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) | None => break,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "reading the registry topic");
                    break;
                }
            }
        }
        changes
    }

    /// Writes `entry` and waits until the broker has it.
    pub fn write(&self, entry: &Entry) -> Result<(), SinkError> {
        let key = entry.key();
        let value = serde_json::to_vec(entry)
            .map_err(|e| registry_error("encoding an entry")(e.to_string()))?;
        let record = FutureRecord::to(&self.topic).key(&key).payload(&value);
        futures::executor::block_on(
            self.producer
                .send(record, Duration::from_millis(REGISTRY_WRITE_TIMEOUT_MS)),
        )
        .map(|_| ())
        .map_err(|(e, _)| registry_error("writing an entry")(e.to_string()))
    }
}

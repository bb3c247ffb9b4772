//! The audit trail of operators' actions: one record per action (a restart,
//! a paused uplink), keyed by the node it acted on, written before the
//! action runs, so that no action goes unrecorded.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::sink::SinkError;

/// How long one audit record may take to be acknowledged by the broker.
pub const AUDIT_WRITE_TIMEOUT_MS: u64 = 5_000;

/// Writes audit records to a topic; each write waits for the broker's
/// acknowledgement (all in-sync replicas).
pub struct KafkaAudit {
    producer: FutureProducer,
    topic: String,
}

impl KafkaAudit {
    /// Connects and creates the topic if it does not exist. Blocks on the
    /// broker: call it from a blocking thread.
    pub fn open(bootstrap_servers: &str, topic: &str) -> Result<Self, SinkError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", bootstrap_servers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", AUDIT_WRITE_TIMEOUT_MS.to_string());
        let producer: FutureProducer = config
            .create()
            .map_err(|e| SinkError::Config(format!("creating the audit producer: {e}")))?;
        super::create_topic_if_absent(
            &config,
            topic,
            &[],
            Duration::from_millis(AUDIT_WRITE_TIMEOUT_MS),
        )
        .map_err(|e| SinkError::Config(format!("the audit topic: {e}")))?;
        Ok(Self {
            producer,
            topic: topic.to_string(),
        })
    }

    /// Writes one record and waits until the broker has it.
    pub async fn record(&self, key: &str, value: &str) -> Result<(), SinkError> {
        let record = FutureRecord::to(&self.topic).key(key).payload(value);
        self.producer
            .send(record, Duration::from_millis(AUDIT_WRITE_TIMEOUT_MS))
            .await
            .map(|_| ())
            .map_err(|(e, _)| SinkError::Audit(e.to_string()))
    }
}

//! Tributary's cross-crate test harness.
//!
//! - [`broker`]: real Apache Kafka brokers (the shared one that `scripts/test.sh` starts,
//!   and private ones a test can kill and restart), topics.
//! - [`checker`]: reads a readings topic back with `read_committed` and checks it against
//!   the edges' ack logs: nothing acknowledged lost, nothing duplicated, order kept.
//! - [`proxy`]: a seeded userspace UDP fault proxy to cut, heal and degrade QUIC paths.
//! - [`tcp_proxy`]: a TCP proxy that cuts an edge's MQTT connection.
//! - [`fleet`]: many light edges in one process against a real cloud node.
//! - [`process`]: runs the `node` binary as a child process that tests can kill -9 or freeze.

pub mod broker;
pub mod chaos;
pub mod checker;
pub mod fixture;
pub mod fleet;
pub mod process;
pub mod proxy;
pub mod tcp_proxy;

use std::path::PathBuf;

/// What went wrong in the harness itself, named after the step that failed, so that a
/// failing scenario says whether the system under test or the harness broke.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("finding a free TCP port on 127.0.0.1: {0}")]
    FreePort(#[source] std::io::Error),
    #[error("creating a temporary directory: {0}")]
    TempDir(#[source] std::io::Error),
    #[error("no Kafka jars in {0}: run scripts/kafka.sh fetch (scripts/test.sh does)")]
    KafkaJarsMissing(PathBuf),
    #[error("running `scripts/kafka.sh {command}`: {source}")]
    KafkaScriptSpawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`scripts/kafka.sh {command}` failed ({status}):\n{output}")]
    KafkaScriptFailed {
        command: String,
        status: String,
        output: String,
    },
    #[error("the broker is not running: start or restart it first")]
    BrokerNotRunning,
    #[error("the broker is already running")]
    BrokerAlreadyRunning,
    #[error("Kafka client, {step}: {source}")]
    Kafka {
        step: &'static str,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("creating topic {topic}: {code}")]
    TopicCreate {
        topic: String,
        code: rdkafka::types::RDKafkaErrorCode,
    },
    #[error("{step}: not done after {waited_ms} ms{detail}")]
    Timeout {
        step: String,
        waited_ms: u64,
        detail: String,
    },
    #[error(
        "record at partition {partition} offset {offset} is not a Tributary reading: {detail}"
    )]
    RecordDecode {
        partition: i32,
        offset: i64,
        detail: String,
    },
    #[error("reading ack log {path}: {source}")]
    AckLogRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ack log {path} line {line_no} is malformed: {line:?}")]
    AckLogParse {
        path: PathBuf,
        line_no: usize,
        line: String,
    },
    #[error("binding the UDP proxy: {0}")]
    ProxyBind(#[source] std::io::Error),
    #[error("opening process log {path}: {source}")]
    ProcessLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spawning {program}: {source}")]
    ProcessSpawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("signalling process {pid} with {signal}: {detail}")]
    ProcessSignal {
        pid: u32,
        signal: &'static str,
        detail: String,
    },
    #[error("process {pid} exited ({status}) while {step}; its log ends with:\n{log_tail}")]
    ProcessExited {
        pid: u32,
        status: String,
        step: String,
        log_tail: String,
    },
    #[error("a blocking harness task panicked or was cancelled: {0}")]
    BlockingTask(String),
}

/// Runs blocking harness work (child processes, librdkafka's blocking calls) off the
/// async runtime, so that a current-thread test runtime keeps driving the system under
/// test while, say, a broker restarts.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, HarnessError>
where
    F: FnOnce() -> Result<T, HarnessError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| HarnessError::BlockingTask(e.to_string()))?
}

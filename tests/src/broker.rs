//! Kafka brokers and topics for tests.
//!
//! Most tests share the broker that `scripts/test.sh` starts ([`shared_bootstrap`]) and
//! isolate themselves with [`unique_topic`]. A test that kills or restarts Kafka starts a
//! [`Broker`] of its own, a single-node KRaft broker run by `scripts/kafka.sh`.

use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use crate::{blocking, HarnessError};

/// The environment variable naming the shared broker; `scripts/test.sh` sets it.
pub const BOOTSTRAP_ENV: &str = "TRIBUTARY_KAFKA_BOOTSTRAP";
/// The environment variable naming the directory of the Kafka jars.
pub const LIBS_ENV: &str = "TRIBUTARY_KAFKA_LIBS";

/// How long `scripts/kafka.sh start` waits for the broker to be ready. A restart after a
/// kill -9 waits out the old incarnation's session first, so this is generous.
pub const BROKER_START_TIMEOUT_S: u64 = 90;
/// How long a graceful stop may take before the script falls back to SIGKILL.
pub const BROKER_STOP_TIMEOUT_S: u64 = 30;
/// Margin over the script's own bounds before the harness gives up on the script.
const SCRIPT_MARGIN_S: u64 = 15;
/// How long topic creation, including the wait for partition leaders, may take.
pub const TOPIC_CREATE_TIMEOUT_MS: u64 = 30_000;
/// The pause between two metadata polls while waiting for a topic.
const METADATA_POLL_INTERVAL_MS: u64 = 100;
/// The longest a single metadata request may block.
const METADATA_REQUEST_TIMEOUT_MS: u64 = 5_000;
/// Private brokers listen on ports from here up to the ephemeral range.
const BROKER_PORT_LOW: u16 = 10_000;
/// Linux's default start of the ephemeral range, if /proc does not say.
const EPHEMERAL_PORT_LOW_DEFAULT: u16 = 32_768;
/// How many random ports to probe before letting the kernel choose one.
const FREE_PORT_TRIES: usize = 100;
/// How many times a private broker is started on fresh ports when another process took
/// the chosen ones in the meantime.
const START_ATTEMPTS_MAX: usize = 3;
/// The JVM heap of a private broker.
const PRIVATE_BROKER_HEAP: &str = "512m";

/// The repository root, found at compile time so that tests work from any cwd.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The Kafka jars: `TRIBUTARY_KAFKA_LIBS`, or the repository's `.cache/kafka/libs`.
pub fn kafka_libs() -> PathBuf {
    std::env::var_os(LIBS_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cache/kafka/libs"))
}

/// The bootstrap address of the broker that `scripts/test.sh` starts for all tests.
///
/// # Panics
/// When `TRIBUTARY_KAFKA_BOOTSTRAP` is not set: the tests need a real Kafka.
pub fn shared_bootstrap() -> String {
    match std::env::var(BOOTSTRAP_ENV) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => panic!(
            "{BOOTSTRAP_ENV} is not set: run scripts/test.sh, which starts Kafka \
             (or start one with scripts/kafka.sh start DIR PORT CONTROLLER_PORT and export \
             {BOOTSTRAP_ENV}=127.0.0.1:PORT)"
        ),
    }
}

static TOPIC_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A topic name no other test, process or earlier run uses: the prefix (made legal for
/// Kafka), the pid, a per-process counter and a random suffix.
pub fn unique_topic(prefix: &str) -> String {
    let clean: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(100)
        .collect();
    let n = TOPIC_COUNTER.fetch_add(1, Ordering::Relaxed);
    // RandomState is seeded randomly per process: enough to tell two runs apart.
    let salt = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish() as u32;
    format!("{clean}-{}-{n}-{salt:08x}", std::process::id())
}

/// Creates a topic with replication factor 1 and waits until every partition has a
/// leader, so that producing to it right away does not race the creation. A topic that
/// already exists counts as created.
pub async fn create_topic(
    bootstrap: &str,
    name: &str,
    partitions: i32,
    compacted: bool,
) -> Result<(), HarnessError> {
    let kafka = |step| move |source| HarnessError::Kafka { step, source };
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .map_err(kafka("creating the admin client"))?;
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    if compacted {
        topic = topic.set("cleanup.policy", "compact");
    }
    let timeout = Duration::from_millis(TOPIC_CREATE_TIMEOUT_MS);
    let opts = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    let results = tokio::time::timeout(timeout, admin.create_topics([&topic], &opts))
        .await
        .map_err(|_| HarnessError::Timeout {
            step: format!("creating topic {name}"),
            waited_ms: TOPIC_CREATE_TIMEOUT_MS,
            detail: String::new(),
        })?
        .map_err(kafka("creating a topic"))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(HarnessError::TopicCreate { topic, code }),
        }
    }
    let (bootstrap, name) = (bootstrap.to_owned(), name.to_owned());
    blocking(move || wait_for_leaders(&bootstrap, &name, partitions, timeout)).await
}

/// The number of partitions of a topic, once the topic exists with a leader for each.
pub async fn partition_count(bootstrap: &str, topic: &str) -> Result<i32, HarnessError> {
    let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
    let timeout = Duration::from_millis(TOPIC_CREATE_TIMEOUT_MS);
    blocking(move || topic_partitions(&bootstrap, &topic, None, timeout)).await
}

fn wait_for_leaders(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    timeout: Duration,
) -> Result<(), HarnessError> {
    topic_partitions(bootstrap, topic, Some(partitions), timeout).map(|_| ())
}

/// Polls metadata until the topic has `expected` partitions (or any, when `None`), each
/// with a leader. Blocking: librdkafka's metadata call is.
pub(crate) fn topic_partitions(
    bootstrap: &str,
    topic: &str,
    expected: Option<i32>,
    timeout: Duration,
) -> Result<i32, HarnessError> {
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .map_err(|source| HarnessError::Kafka {
            step: "creating a metadata client",
            source,
        })?;
    let started = Instant::now();
    let mut last = String::from("no metadata yet");
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        let request = left.min(Duration::from_millis(METADATA_REQUEST_TIMEOUT_MS));
        match client.fetch_metadata(Some(topic), request) {
            Ok(md) => {
                if let Some(t) = md.topics().iter().find(|t| t.name() == topic) {
                    let count = t.partitions().len() as i32;
                    let led = t
                        .partitions()
                        .iter()
                        .all(|p| p.leader() >= 0 && p.error().is_none());
                    if t.error().is_none()
                        && count > 0
                        && led
                        && expected.is_none_or(|e| e == count)
                    {
                        return Ok(count);
                    }
                    last = format!(
                        "{count} partitions, all led: {led}, topic error: {:?}",
                        t.error()
                    );
                }
            }
            Err(e) => last = e.to_string(),
        }
        if started.elapsed() >= timeout {
            return Err(HarnessError::Timeout {
                step: format!("waiting for topic {topic} to have leaders"),
                waited_ms: timeout.as_millis() as u64,
                detail: format!(" (last seen: {last})"),
            });
        }
        std::thread::sleep(Duration::from_millis(METADATA_POLL_INTERVAL_MS));
    }
}

/// A random number, without a generator to carry around: `RandomState` is seeded randomly.
fn random_u64() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// The first port of the kernel's ephemeral range, which outgoing connections draw from.
fn ephemeral_port_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(EPHEMERAL_PORT_LOW_DEFAULT)
}

/// A free port below the ephemeral range: there, no outgoing connection can take a
/// killed broker's port before it restarts.
fn free_port(avoid: &[u16]) -> Result<u16, HarnessError> {
    let high = ephemeral_port_low();
    if high > BROKER_PORT_LOW {
        for _ in 0..FREE_PORT_TRIES {
            let port = BROKER_PORT_LOW + (random_u64() % u64::from(high - BROKER_PORT_LOW)) as u16;
            if !avoid.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    // No room below the ephemeral range: let the kernel choose.
    let listener = TcpListener::bind("127.0.0.1:0").map_err(HarnessError::FreePort)?;
    Ok(listener
        .local_addr()
        .map_err(HarnessError::FreePort)?
        .port())
}

/// Runs `scripts/kafka.sh` with the given arguments, bounded by `timeout`.
fn run_script(args: &[&str], timeout: Duration) -> Result<String, HarnessError> {
    let command = args.join(" ");
    let script = repo_root().join("scripts/kafka.sh");
    let mut child = Command::new("bash")
        .arg(&script)
        .args(args)
        .env(LIBS_ENV, kafka_libs())
        .env("KAFKA_START_TIMEOUT_S", BROKER_START_TIMEOUT_S.to_string())
        .env("KAFKA_STOP_TIMEOUT_S", BROKER_STOP_TIMEOUT_S.to_string())
        .env("KAFKA_HEAP_MAX", PRIVATE_BROKER_HEAP)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|source| HarnessError::KafkaScriptSpawn {
            command: command.clone(),
            source,
        })?;
    // The script bounds itself; this bound only guards against a wedged script, so a
    // plain poll of its exit status is enough.
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if started.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(HarnessError::Timeout {
                    step: format!("scripts/kafka.sh {command}"),
                    waited_ms: timeout.as_millis() as u64,
                    detail: String::new(),
                });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(source) => {
                return Err(HarnessError::KafkaScriptSpawn {
                    command: command.clone(),
                    source,
                })
            }
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|source| HarnessError::KafkaScriptSpawn {
            command: command.clone(),
            source,
        })?;
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(output)
    } else {
        Err(HarnessError::KafkaScriptFailed {
            command,
            status: out.status.to_string(),
            output,
        })
    }
}

/// A private single-node KRaft broker in a temporary directory, on free loopback ports.
/// Dropping it kills the broker and deletes its data.
pub struct Broker {
    // Dropped after `Drop::drop` has killed the broker, so the data outlives the JVM.
    dir: tempfile::TempDir,
    port: u16,
    controller_port: u16,
    running: bool,
}

impl Broker {
    /// Formats and starts a fresh broker; returns once it serves requests.
    pub async fn start_private() -> Result<Broker, HarnessError> {
        let libs = kafka_libs();
        if !libs.join(".fetched").is_file() {
            return Err(HarnessError::KafkaJarsMissing(libs));
        }
        let dir = tempfile::Builder::new()
            .prefix("tributary-kafka-")
            .tempdir()
            .map_err(HarnessError::TempDir)?;
        let mut broker = Broker {
            dir,
            port: 0,
            controller_port: 0,
            running: false,
        };
        let mut attempt = 1;
        loop {
            broker.port = free_port(&[])?;
            broker.controller_port = free_port(&[broker.port])?;
            match broker.start().await {
                Ok(()) => return Ok(broker),
                Err(HarnessError::KafkaScriptFailed { output, .. })
                    if output.contains("already in use") && attempt < START_ATTEMPTS_MAX =>
                {
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `127.0.0.1:PORT`, for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's directory: `server.properties`, `kafka.log`, `data/`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The broker's own log, for a failing test to print.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("kafka.log")
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Stops the broker gracefully (SIGTERM, then SIGKILL after a bound).
    pub async fn stop(&mut self) -> Result<(), HarnessError> {
        self.signal("stop", BROKER_STOP_TIMEOUT_S).await
    }

    /// Kills the broker with SIGKILL: no controlled shutdown, no final flush.
    pub async fn kill(&mut self) -> Result<(), HarnessError> {
        self.signal("kill", 10).await
    }

    /// Starts the broker again in the same directory and on the same ports, keeping its
    /// data; stops it gracefully first if it still runs.
    pub async fn restart(&mut self) -> Result<(), HarnessError> {
        if self.running {
            self.stop().await?;
        }
        self.start().await
    }

    async fn start(&mut self) -> Result<(), HarnessError> {
        if self.running {
            return Err(HarnessError::BrokerAlreadyRunning);
        }
        let dir = self.dir_str();
        let (port, cport) = (self.port.to_string(), self.controller_port.to_string());
        let timeout = Duration::from_secs(BROKER_START_TIMEOUT_S + SCRIPT_MARGIN_S);
        blocking(move || run_script(&["start", &dir, &port, &cport], timeout)).await?;
        self.running = true;
        Ok(())
    }

    async fn signal(&mut self, how: &'static str, bound_s: u64) -> Result<(), HarnessError> {
        if !self.running {
            return Err(HarnessError::BrokerNotRunning);
        }
        let dir = self.dir_str();
        let timeout = Duration::from_secs(bound_s + SCRIPT_MARGIN_S);
        blocking(move || run_script(&[how, &dir], timeout)).await?;
        self.running = false;
        Ok(())
    }

    fn dir_str(&self) -> String {
        self.dir.path().to_string_lossy().into_owned()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if self.running {
            let dir = self.dir_str();
            if let Err(e) = run_script(&["kill", &dir], Duration::from_secs(SCRIPT_MARGIN_S)) {
                eprintln!("tributary-tests: could not kill the broker in {dir}: {e}");
            }
        }
    }
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("bootstrap", &self.bootstrap())
            .field("dir", &self.dir.path())
            .field("running", &self.running)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_topics_differ_and_are_legal() {
        let a = unique_topic("exactly once/α");
        let b = unique_topic("exactly once/α");
        assert_ne!(a, b);
        assert!(a.starts_with("exactly-once--"), "{a}");
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
            "{a}"
        );
    }
}

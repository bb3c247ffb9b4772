//! The MQTT source: devices that publish JSON telemetry to an MQTT broker.
//!
//! ```text
//! tributary.mqtt (MqttSource)      owns the MQTT session; parses, dispatches, acks
//! ├── poll task                    drives rumqttc's event loop, one permit per message
//! └── device actor per device id   one reading in flight to the gateway, in order
//! ```
//!
//! **Messages.** The source subscribes to `topic` (a filter such as
//! `plant-a/+/telemetry`) with QoS 1; the topic level `device_level` names the
//! device. The payload is a JSON object: `ts` is the device's timestamp in
//! **milliseconds** since the Unix epoch (an integer; the edge's clock if
//! absent), `unit` an optional object of metric name to unit, and every other
//! field a metric: integers become `I64`, other numbers `F64`, booleans
//! `Bool`, strings `Str`. Anything else (not JSON, nulls, arrays, a bad `ts`, an
//! empty or overlong device id, a topic outside the filter) is malformed: it
//! is acked (so the broker does not redeliver it forever), counted, and logged
//! at most once per [`MALFORMED_LOG_INTERVAL_MS`]. Every reading carries the
//! configured `stream` (the topology component the source is).
//!
//! **Acks.** Acks are manual: a PUBLISH is acked only after the gateway
//! answered that its reading is durable in the outbox (`Committed` or
//! `Duplicate`, or `Consumed` by the edge's stages). The session is persistent
//! (`clean_session = false`, a stable client id), so after a crash the broker
//! redelivers everything unacked: nothing acknowledged by the broker to its
//! publisher is lost.
//!
//! **Connections.** A packet id means something only on the connection that
//! carried it (and, once the broker loses the session, nothing at all). Each
//! connection gets a number; a message is acked only on the connection it
//! came on, never on a later one. When a connection ends, the poll task drops,
//! under the lock the acks are queued under, whatever rumqttc still holds of it
//! (queued PUBACKs, packets read but not yet handed over); the broker
//! redelivers those messages on the next connection of the session. A copy of
//! a message still held (same session, packet id, topic and payload) is
//! dropped and moves the original's ack to the copy's connection.
//!
//! **Redelivery and duplicates.** A redelivered message may already be in the
//! outbox (the crash came between the outbox's fsync and the PUBACK). Each
//! device has a *mark*, the highest `ts` made durable, and the source keeps
//! the exact keys `(device, ts)` of the last [`DURABLE_KEYS_PER_INFLIGHT`]
//! × `inflight_max` readings made durable. A reading is classified at the head
//! of its device's queue, once every earlier reading of the device is settled:
//! - `ts` above the mark: a new reading, forwarded;
//! - `ts` equal to the mark, or among the durable keys: a redelivery, skipped
//!   and acked once its key is in the synced store (its ack may be lost too,
//!   and by the next redelivery the mark may have moved on); counted `stale`,
//!   logged at debug with where the source learned it is durable: committed
//!   by this run, the marks store, or the outbox at start;
//! - `ts` below the mark and not known durable: the broker delivered it after
//!   a newer reading of its device (a broker that reorders a session's
//!   backlog, a publisher's own retry, two publishers). It is **forwarded**,
//!   counted `out_of_order` and logged (rate-limited, per device): it enters
//!   the outbox and the log after the newer reading. Dropping it instead (the
//!   old rule, `ts <= mark` is stale) would lose it; the gateway and the cloud
//!   take it as a new reading (they deduplicate retries and segments, not
//!   older timestamps), so it appears once.
//!
//! The marks and the keys are written to a small sled store (`marks_dir`) and
//! fsynced *before* the PUBACK is sent, with group commit. At start they are
//! read back, and the keys of the readings still in the outbox are added (read
//! by [`outbox_marks`] before the uplink can delete any), which covers a crash
//! between the outbox's fsync and the store's, however far the source's
//! bookkeeping lagged behind the gateway. So:
//! - a reading's identity is `(device, ts)` everywhere in Tributary: a second
//!   message with the `ts` of a durable one is a redelivery;
//! - a redelivery is recognised exactly while its key is kept: a broker
//!   redelivers what it had in flight at the crash (hundreds of messages, not
//!   thousands). A duplicate needs a reading whose segment the cloud
//!   acknowledged and the edge deleted before the store's fsync (a few
//!   milliseconds against a Kafka transaction, unless the source lags far
//!   behind), then a crash; or a redelivery older than the keys kept. Without
//!   `marks_dir` the keys are rebuilt from the outbox only;
//! - readings without `ts` are stamped on arrival, above the mark, so their
//!   redelivery cannot be recognised: exactly-once across a crash needs `ts`;
//! - retained messages are re-sent at each subscription; with `ts` they are
//!   recognised (a retained message is its device's latest, so its mark),
//!   without they are readings again.
//!
//! **Order.** rumqttc delivers in order per connection and each device actor
//! has one reading in flight, so a device's readings enter the outbox in the
//! order the broker delivered them. After a crash the broker redelivers the
//! unacked messages first, in their order, then the rest: redeliveries of
//! durable readings are skipped, so each device's readings enter the outbox
//! in increasing `ts`, each once, as long as the broker keeps a session's
//! order; when it does not, see `out_of_order` above.
//!
//! **Bounds and their policies.**
//! - `inflight_max` messages held unacked (queued for or in a device actor):
//!   when reached the poll task stops reading the socket, which backs the broker
//!   off through TCP and its own in-flight window. Paused past 1.5 keep-alives,
//!   the broker drops the connection; the session resumes with redelivery.
//! - `queued_requests_max`: rumqttc's request channel (acks and subscribes);
//!   it exceeds `inflight_max`, so an ack never waits for room.
//! - `devices_max` live device actors: a new device passivates the least
//!   recently active idle one; if none is idle its messages are parked (still
//!   within `inflight_max`) until one is.
//! - devices idle for `device_idle_ms` are passivated (stopped); marks are kept
//!   for up to [`MARKS_MAX`] devices, durable keys for the last
//!   [`DURABLE_KEYS_PER_INFLIGHT`] × `inflight_max` readings (oldest forgotten).
//! - a reading the gateway refuses as `Full` (the outbox is full under
//!   `block`), or that it does not answer (restarting), is retried every
//!   [`RETRY_MS`] for as long as it takes, unacked, so the backpressure reaches
//!   the broker (through `inflight_max`) and the broker keeps the data. Retries
//!   are counted (`retries_full`, `retries_unavailable`); an episode (from the
//!   first device waiting to the last one through) is logged when it starts
//!   and ends, and a device still waiting after [`RETRY_WARN_AFTER`] retries of
//!   one reading (and each multiple) warns, at most once per
//!   [`RETRY_LOG_INTERVAL_MS`] across devices.
//! - incoming packets above `packet_bytes_max` break the connection in rumqttc:
//!   set the broker's own limit (mosquitto's `message_size_limit`) at or below it,
//!   or such a message is redelivered forever.
//! - the broker's own in-flight window (mosquitto's `max_inflight_messages`,
//!   20 by default) bounds the throughput to about that many readings per outbox
//!   commit; raise it for high rates.
//! - rumqttc writes queued acks only while polled, and the poll task polls
//!   only with a permit: under a flood of redeliveries (Mosquitto 2.0.11 was
//!   seen re-sending ~600 messages on a reconnect, past its window) acks lag
//!   behind the readings' durability. That costs redeliveries, not exactness.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS, Request};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tributary_cluster::uplink::ReadRequest;

use super::gateway::{GatewayMsg, IngestReply};
use super::EdgeNames;
use crate::outbox::segment::decode_payload;
use crate::reading::{Metric, Reading, ReadingError, Value, DEVICE_ID_BYTES_MAX};

pub const MQTT_NAME: &str = "tributary.mqtt";
/// Acks waiting for room in the MQTT client's request queue; past it the
/// source fails and restarts (its held messages are redelivered, not lost).
pub const DEFERRED_ACKS_MAX: usize = 65_536;

/// How long a device actor waits for the gateway before retrying the same
/// reading (the gateway recognises the retry).
const INGEST_TIMEOUT_MS: u64 = 30_000;
/// The delay before retrying a reading refused as full, or when the gateway
/// is away (restarting).
pub const RETRY_MS: u64 = 50;
/// A device retrying one reading this many times (about a minute at
/// [`RETRY_MS`]) warns, and again at each multiple.
pub const RETRY_WARN_AFTER: u64 = 1_200;
/// The "still waiting" warnings of all devices together come at most this often.
pub const RETRY_LOG_INTERVAL_MS: u64 = 10_000;
/// Malformed messages are logged at most this often, with running totals.
pub const MALFORMED_LOG_INTERVAL_MS: u64 = 5_000;
/// A device logs its out-of-order readings at most this often, with counts.
pub const OUT_OF_ORDER_LOG_INTERVAL_MS: u64 = 5_000;
/// How often idle devices are looked for and the malformed summary is due.
const TICK_MS: u64 = 500;
/// Devices whose mark is remembered; past it, marks of passivated devices are
/// forgotten (only redelivery detection for those devices weakens).
pub const MARKS_MAX: usize = 100_000;
/// The durable keys kept per message the source may hold (`inflight_max`):
/// a redelivery comes from what the broker had in flight at the crash or the
/// disconnect (the source's held messages, and what it read no further);
/// 16 times leaves room for a broker that overruns its window or reorders.
pub const DURABLE_KEYS_PER_INFLIGHT: usize = 16;
/// sled's page cache for the marks store.
const MARKS_CACHE_BYTES_MAX: u64 = 4 * 1024 * 1024;
/// The marks store's tree of durable keys (the marks are in the default tree).
const DURABLE_TREE: &str = "durable-keys";
/// Bound on one call to the gateway while rebuilding the marks.
const GATEWAY_CALL_MS: u64 = 10_000;
/// Bound on a device actor's question to the source about an older reading.
const CLASSIFY_CALL_MS: u64 = 10_000;
/// Segments read per call while rebuilding the marks.
const SCAN_SEGMENTS_PER_READ: usize = 16;
/// rumqttc's request channel holds, beyond one ack per held message, the
/// subscribe of a reconnect: this is the headroom required for it.
pub const REQUEST_HEADROOM: usize = 8;

/// The MQTT source's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    /// Stable across restarts: the broker keeps the session (and what is
    /// unacked) under it.
    pub client_id: String,
    /// The subscription's topic filter.
    pub topic: String,
    /// The topic level (0-based) holding the device id.
    pub device_level: usize,
    pub devices_max: usize,
    pub device_idle_ms: u64,
    pub inflight_max: usize,
    pub queued_requests_max: usize,
    pub keep_alive_ms: u64,
    pub packet_bytes_max: usize,
    pub reconnect_backoff_initial_ms: u64,
    pub reconnect_backoff_max_ms: u64,
    /// Where the devices' marks and durable keys are kept across crashes;
    /// `None` keeps them in memory only (rebuilt from the outbox at start).
    pub marks_dir: Option<PathBuf>,
    /// The topology stream every reading of this source belongs to (the
    /// source's component name); `None` outside topologies.
    pub stream: Option<String>,
}

impl MqttConfig {
    /// Defaults for everything but the broker, the session and the filter;
    /// the device id is the filter's first `+` level.
    pub fn new(
        host: impl Into<String>,
        port: u16,
        client_id: impl Into<String>,
        topic: impl Into<String>,
    ) -> Result<Self, MqttConfigError> {
        let topic = topic.into();
        let device_level = first_wildcard_level(&topic).ok_or(MqttConfigError::NoDeviceLevel)?;
        let config = Self {
            host: host.into(),
            port,
            client_id: client_id.into(),
            topic,
            device_level,
            devices_max: 10_000,
            device_idle_ms: 60_000,
            inflight_max: 512,
            queued_requests_max: 1024,
            keep_alive_ms: 30_000,
            packet_bytes_max: 256 * 1024,
            reconnect_backoff_initial_ms: 100,
            reconnect_backoff_max_ms: 5_000,
            marks_dir: None,
            stream: None,
        };
        config.validate()?;
        Ok(config)
    }

    /// How many durable keys the source keeps (see [`DURABLE_KEYS_PER_INFLIGHT`]).
    pub fn durable_keys_max(&self) -> usize {
        self.inflight_max.saturating_mul(DURABLE_KEYS_PER_INFLIGHT)
    }

    pub fn validate(&self) -> Result<(), MqttConfigError> {
        use MqttConfigError as E;
        if self.host.is_empty() || self.port == 0 {
            return Err(E::Address);
        }
        if self.client_id.is_empty() || self.client_id.len() > 65_535 {
            return Err(E::ClientId);
        }
        if !valid_filter(&self.topic) {
            return Err(E::Topic(self.topic.clone()));
        }
        let levels: Vec<&str> = self.topic.split('/').collect();
        match levels.get(self.device_level) {
            Some(&"#") | None => return Err(E::DeviceLevel(self.device_level)),
            Some(_) => {}
        }
        if self.devices_max == 0 {
            return Err(E::Zero("devices_max"));
        }
        if self.device_idle_ms == 0 {
            return Err(E::Zero("device_idle_ms"));
        }
        if self.inflight_max == 0 {
            return Err(E::Zero("inflight_max"));
        }
        if self.queued_requests_max < self.inflight_max + REQUEST_HEADROOM {
            return Err(E::QueuedRequests);
        }
        if self.keep_alive_ms < 1_000 {
            return Err(E::KeepAlive);
        }
        if self.packet_bytes_max < 1024 {
            return Err(E::PacketBytes);
        }
        if self.reconnect_backoff_initial_ms == 0
            || self.reconnect_backoff_max_ms < self.reconnect_backoff_initial_ms
        {
            return Err(E::Backoff);
        }
        Ok(())
    }
}

/// A setting the MQTT source cannot run with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MqttConfigError {
    #[error("the broker address needs a host and a non-zero port")]
    Address,
    #[error("the client id must be 1 to 65535 bytes")]
    ClientId,
    #[error("{0:?} is not a valid MQTT topic filter")]
    Topic(String),
    #[error("the topic filter has no `+` level to take the device id from")]
    NoDeviceLevel,
    #[error("topic level {0} does not exist in the filter or is `#`")]
    DeviceLevel(usize),
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("queued_requests_max must be at least inflight_max + {REQUEST_HEADROOM}")]
    QueuedRequests,
    #[error("keep_alive_ms must be at least 1000 (MQTT counts it in seconds)")]
    KeepAlive,
    #[error("packet_bytes_max must be at least 1024")]
    PacketBytes,
    #[error("reconnect_backoff_max_ms must be at least reconnect_backoff_initial_ms, which must be positive")]
    Backoff,
}

/// Why a message was dropped as malformed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MessageError {
    #[error("topic does not match the subscription's filter")]
    TopicMismatch,
    #[error("the device id's topic level is empty")]
    EmptyDeviceId,
    #[error("device id is {0} bytes, more than the {DEVICE_ID_BYTES_MAX} allowed")]
    DeviceIdTooLong(usize),
    #[error("payload is not JSON: {0}")]
    NotJson(String),
    #[error("payload is not a JSON object")]
    NotObject,
    #[error("ts must be a non-negative integer of milliseconds since the Unix epoch")]
    BadTs,
    #[error("unit must be an object of metric name to string")]
    BadUnits,
    #[error("field {0:?} is not a number, a boolean or a string")]
    BadValue(String),
    #[error("payload has no metrics")]
    NoMetrics,
    #[error("reading refused: {0}")]
    Invalid(#[from] ReadingError),
}

impl MessageError {
    fn is_topic(&self) -> bool {
        matches!(
            self,
            Self::TopicMismatch | Self::EmptyDeviceId | Self::DeviceIdTooLong(_)
        )
    }
}

/// A parsed message: the device's reading without its timestamp resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub device_id: String,
    /// `ts` converted to microseconds, if the payload had one.
    pub ts_us: Option<i64>,
    pub metrics: Vec<Metric>,
}

/// The level of the first `+` in a topic filter.
pub fn first_wildcard_level(filter: &str) -> Option<usize> {
    filter.split('/').position(|l| l == "+")
}

/// Whether `filter` is a valid MQTT topic filter (`+` alone in a level, `#`
/// alone and last).
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| match *l {
        "+" => true,
        "#" => i == levels.len() - 1,
        l => !l.contains('+') && !l.contains('#'),
    })
}

/// Whether `topic` matches `filter` (MQTT 3.1.1 §4.7; `$` topics excepted).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') {
        return false;
    }
    let mut t = topic.split('/');
    for f in filter.split('/') {
        match (f, t.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (f, Some(l)) if f == l => {}
            _ => return false,
        }
    }
    t.next().is_none()
}

/// Parses one message of `topic` under `filter`, the device id at `device_level`.
pub fn parse_message(
    filter: &str,
    device_level: usize,
    topic: &str,
    payload: &[u8],
) -> Result<Parsed, MessageError> {
    if !topic_matches(filter, topic) {
        return Err(MessageError::TopicMismatch);
    }
    let device_id = topic
        .split('/')
        .nth(device_level)
        .filter(|d| !d.is_empty())
        .ok_or(MessageError::EmptyDeviceId)?;
    if device_id.len() > DEVICE_ID_BYTES_MAX {
        return Err(MessageError::DeviceIdTooLong(device_id.len()));
    }
    let json: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| MessageError::NotJson(e.to_string()))?;
    let serde_json::Value::Object(mut fields) = json else {
        return Err(MessageError::NotObject);
    };
    let ts_us = match fields.remove("ts") {
        None => None,
        Some(v) => Some(
            v.as_i64()
                .filter(|ms| *ms >= 0)
                .and_then(|ms| ms.checked_mul(1000))
                .ok_or(MessageError::BadTs)?,
        ),
    };
    let units = match fields.remove("unit") {
        None => serde_json::Map::new(),
        Some(serde_json::Value::Object(u)) if u.values().all(|v| v.is_string()) => u,
        Some(_) => return Err(MessageError::BadUnits),
    };
    let mut metrics = Vec::with_capacity(fields.len());
    for (name, v) in fields {
        let value = match v {
            serde_json::Value::Bool(b) => Value::Bool(b),
            serde_json::Value::String(s) => Value::Str(s),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::I64(i),
                None => Value::F64(
                    n.as_f64()
                        .ok_or_else(|| MessageError::BadValue(name.clone()))?,
                ),
            },
            _ => return Err(MessageError::BadValue(name)),
        };
        let unit = units.get(&name).and_then(|u| u.as_str()).map(str::to_owned);
        metrics.push(Metric { name, value, unit });
    }
    if metrics.is_empty() {
        return Err(MessageError::NoMetrics);
    }
    let parsed = Parsed {
        device_id: device_id.to_owned(),
        ts_us,
        metrics,
    };
    // Checks the bounds every reading must meet, before it holds any resource.
    Reading {
        device_id: parsed.device_id.clone(),
        device_ts_us: 0,
        edge_ts_us: 0,
        stream: None,
        metrics: parsed.metrics.clone(),
    }
    .validate()?;
    Ok(parsed)
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// The source's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MqttStats {
    pub received: u64,
    /// Made durable (or found durable, or consumed by the edge's stages) and acked.
    pub committed: u64,
    /// Of `committed`: older than their device's mark and not known durable,
    /// so forwarded after a newer reading of the device.
    pub out_of_order: u64,
    /// Redeliveries of readings known durable: acked, not forwarded.
    pub stale: u64,
    /// Copies of a message still held, dropped.
    pub redelivered_copies: u64,
    /// Acks not sent because the connection their message came on had ended
    /// (the broker redelivers those messages).
    pub acks_skipped: u64,
    /// Acks that found the client's request queue full and waited in the
    /// source's own bounded queue (`DEFERRED_ACKS_MAX`) for room.
    pub acks_deferred: u64,
    /// Retries of readings the gateway refused as full.
    pub retries_full: u64,
    /// Retries of readings the gateway did not answer (away or too slow).
    pub retries_unavailable: u64,
    pub bad_topic: u64,
    pub bad_payload: u64,
    pub passivated: u64,
    pub disconnects: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttStatus {
    pub connected: bool,
    /// The number of the current (or last) connection, from 1.
    pub connection: u64,
    pub devices_live: usize,
    pub held: usize,
    pub parked: usize,
    /// Devices whose head reading waits for the gateway (full or away).
    pub devices_waiting: usize,
    pub durable_keys: usize,
    pub stats: MqttStats,
}

/// Where the source learned that a reading is durable; logged with each
/// redelivery it skips.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KnownBy {
    /// Made durable by this run of the source.
    Committed,
    /// Read back from the marks store (`marks_dir`) at start.
    MarksStore,
    /// Found in the outbox at start.
    Outbox,
}

impl std::fmt::Display for KnownBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Committed => "committed by this run",
            Self::MarksStore => "the marks store",
            Self::Outbox => "the outbox at start",
        })
    }
}

/// A device's highest durable `ts`, and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mark {
    ts_us: i64,
    by: KnownBy,
}

/// What an arriving reading is, given what the source knows to be durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Above its device's mark: the next reading.
    New,
    /// Known durable: a redelivery, acked and skipped.
    Redelivery(KnownBy),
    /// Below the mark and not known durable: forwarded, out of order.
    OutOfOrder,
}

/// Classifies a reading of `device` stamped `ts_us`. Only a reading known
/// durable exactly is a redelivery: an older one that is not might never have
/// been seen, and dropping it would lose it.
fn classify(device: &str, ts_us: i64, mark: Option<Mark>, keys: &DurableKeys) -> Arrival {
    match mark {
        None => Arrival::New,
        Some(m) if ts_us > m.ts_us => Arrival::New,
        Some(m) if ts_us == m.ts_us => Arrival::Redelivery(m.by),
        Some(_) => match keys.get(device, ts_us) {
            Some(by) => Arrival::Redelivery(by),
            None => Arrival::OutOfOrder,
        },
    }
}

/// A change to the durable keys, for the marks store to mirror.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct KeysChange {
    /// The id the new key was stored under; `None` if it was known already.
    added: Option<u64>,
    /// The id of the oldest key, forgotten to make room.
    evicted: Option<u64>,
}

/// The exact keys `(device, ts)` of the last `keys_max` readings made durable,
/// oldest forgotten first, indexed by device.
#[derive(Debug)]
struct DurableKeys {
    keys_max: usize,
    /// Oldest first: (id, device, ts).
    order: VecDeque<(u64, String, i64)>,
    index: HashMap<String, HashMap<i64, KnownBy>>,
    next_id: u64,
}

impl DurableKeys {
    /// Keeps at least one key, whatever `keys_max` says.
    fn new(keys_max: usize) -> Self {
        Self {
            keys_max: keys_max.max(1),
            order: VecDeque::new(),
            index: HashMap::new(),
            next_id: 0,
        }
    }

    fn get(&self, device: &str, ts_us: i64) -> Option<KnownBy> {
        self.index.get(device)?.get(&ts_us).copied()
    }

    fn len(&self) -> usize {
        self.order.len()
    }

    /// Records a durable key under the next id; a key already known keeps its
    /// place and origin.
    fn insert(&mut self, device: &str, ts_us: i64, by: KnownBy) -> KeysChange {
        self.insert_with_id(self.next_id, device, ts_us, by)
    }

    /// Records a key read back from the store under its stored id (ids must
    /// come in increasing order).
    fn insert_with_id(&mut self, id: u64, device: &str, ts_us: i64, by: KnownBy) -> KeysChange {
        if self.get(device, ts_us).is_some() {
            return KeysChange::default();
        }
        self.next_id = self.next_id.max(id.saturating_add(1));
        let evicted = if self.order.len() >= self.keys_max {
            self.evict_oldest()
        } else {
            None
        };
        self.order.push_back((id, device.to_owned(), ts_us));
        self.index
            .entry(device.to_owned())
            .or_default()
            .insert(ts_us, by);
        KeysChange {
            added: Some(id),
            evicted,
        }
    }

    fn evict_oldest(&mut self) -> Option<u64> {
        let (id, device, ts) = self.order.pop_front()?;
        if let Some(keys) = self.index.get_mut(&device) {
            keys.remove(&ts);
            if keys.is_empty() {
                self.index.remove(&device);
            }
        }
        Some(id)
    }
}

/// A durable key as the marks store keeps it: `ts` (big-endian) then the device.
fn encode_key(device: &str, ts_us: i64) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + device.len());
    v.extend_from_slice(&ts_us.to_be_bytes());
    v.extend_from_slice(device.as_bytes());
    v
}

fn decode_key(bytes: &[u8]) -> Option<(String, i64)> {
    let (ts, device) = bytes.split_at_checked(8)?;
    let ts = i64::from_be_bytes(ts.try_into().ok()?);
    Some((String::from_utf8(device.to_vec()).ok()?, ts))
}

/// Retries of readings the gateway could not take, shared by the source's
/// device actors: counted, and logged by episode rather than by retry.
#[derive(Debug)]
pub struct RetryGauge {
    started: Instant,
    devices_waiting: AtomicUsize,
    full: AtomicU64,
    unavailable: AtomicU64,
    episode_retries: AtomicU64,
    /// When the episode started, in ms since `started`.
    episode_started_ms: AtomicU64,
    /// When a "still waiting" warning was last logged, in ms since `started` (+1).
    warned_ms: AtomicU64,
}

impl Default for RetryGauge {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            devices_waiting: AtomicUsize::new(0),
            full: AtomicU64::new(0),
            unavailable: AtomicU64::new(0),
            episode_retries: AtomicU64::new(0),
            episode_started_ms: AtomicU64::new(0),
            warned_ms: AtomicU64::new(0),
        }
    }
}

/// Why a device retries its reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    /// The outbox is full under `block`.
    Full,
    /// The gateway is away or did not answer in time.
    Unavailable,
}

impl RetryReason {
    fn as_str(self) -> &'static str {
        match self {
            Self::Full => "the outbox is full (policy block)",
            Self::Unavailable => "the gateway is away or slow",
        }
    }
}

impl RetryGauge {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// A device starts waiting: the first one opens an episode.
    fn wait_starts(&self, device: &str, reason: RetryReason) {
        if self.devices_waiting.fetch_add(1, Relaxed) == 0 {
            self.episode_retries.store(0, Relaxed);
            self.episode_started_ms.store(self.now_ms(), Relaxed);
            tracing::warn!(
                %device,
                reason = reason.as_str(),
                retry_ms = RETRY_MS,
                "mqtt: the gateway cannot take readings; devices hold them unacked and retry \
                 (the broker keeps them)"
            );
        }
    }

    /// One retry of one reading; `attempts` counts this reading's retries.
    fn retried(&self, device: &str, ts_us: i64, reason: RetryReason, attempts: u64) {
        match reason {
            RetryReason::Full => self.full.fetch_add(1, Relaxed),
            RetryReason::Unavailable => self.unavailable.fetch_add(1, Relaxed),
        };
        let episode = self.episode_retries.fetch_add(1, Relaxed) + 1;
        if !attempts.is_multiple_of(RETRY_WARN_AFTER) {
            return;
        }
        let now = self.now_ms() + 1;
        let last = self.warned_ms.load(Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= RETRY_LOG_INTERVAL_MS;
        if due
            && self
                .warned_ms
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            tracing::warn!(
                %device,
                ts_us,
                attempts,
                reason = reason.as_str(),
                devices_waiting = self.devices_waiting.load(Relaxed),
                episode_retries = episode,
                episode_ms = now.saturating_sub(1 + self.episode_started_ms.load(Relaxed)),
                "mqtt: a reading still waits for the gateway (logged at most every \
                 {RETRY_LOG_INTERVAL_MS} ms)"
            );
        }
    }

    /// A device stops waiting (its reading went through, or it stopped): the
    /// last one closes the episode.
    fn wait_ends(&self, through: bool) {
        if self.devices_waiting.fetch_sub(1, Relaxed) == 1 && through {
            tracing::info!(
                retries = self.episode_retries.load(Relaxed),
                episode_ms = self
                    .now_ms()
                    .saturating_sub(self.episode_started_ms.load(Relaxed)),
                "mqtt: the gateway takes readings again"
            );
        }
    }
}

/// What the device actor did with a reading.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Durable in the outbox (`Committed` or `Duplicate`), or `Consumed` by the
    /// edge's stages; `out_of_order` when it was older than its device's mark.
    Durable { ts_us: i64, out_of_order: bool },
    /// A redelivery of a reading known durable: acked, not forwarded.
    Redelivery { ts_us: i64, by: KnownBy },
    /// The gateway refused it for good.
    Refused(String),
}

/// What the poll task reports.
pub enum PollEvent {
    /// Connection number `connection` (from 1) is up.
    Connected {
        session_present: bool,
        connection: u64,
    },
    Subscribed {
        ok: bool,
    },
    Publish {
        publish: Publish,
        permit: OwnedSemaphorePermit,
        /// The connection it came on; it is acked on that one only.
        connection: u64,
    },
    Disconnected(String),
}

pub enum MqttMsg {
    Poll(PollEvent),
    Handled {
        device: String,
        token: u64,
        outcome: Outcome,
    },
    /// A device asks what its reading at or below its mark is.
    Classify(String, i64, RpcReplyPort<Arrival>),
    /// Syncs the marks and sends the PUBACKs that waited for them.
    SyncMarks,
    Tick,
    Status(RpcReplyPort<MqttStatus>),
}

impl ractor::Message for MqttMsg {}

pub enum DeviceMsg {
    Push {
        token: u64,
        ts_us: Option<i64>,
        metrics: Vec<Metric>,
    },
    Work,
}

impl ractor::Message for DeviceMsg {}

struct Queued {
    token: u64,
    ts_us: Option<i64>,
    metrics: Vec<Metric>,
}

/// One MQTT device: hands its readings to the gateway one at a time, in order.
#[derive(Clone, Default)]
pub struct MqttDevice;

pub struct MqttDeviceArgs {
    pub device_id: String,
    /// The device's mark: readings above it are new; at or below it the
    /// source says whether they are known durable.
    pub mark_us: i64,
    pub source: ActorRef<MqttMsg>,
    /// Set on every reading (the topology's stream).
    pub stream: Option<String>,
    pub gauge: Arc<RetryGauge>,
    /// Where the edge's gateway is registered.
    pub names: EdgeNames,
}

/// The head reading once built, so a retry sends the very same one.
struct Current {
    reading: Reading,
    out_of_order: bool,
    /// Retries of this reading so far.
    attempts: u64,
}

pub struct MqttDeviceState {
    args: MqttDeviceArgs,
    /// Bounded by the source's held messages (`inflight_max`).
    queue: VecDeque<Queued>,
    current: Option<Current>,
    working: bool,
    /// Whether this device counts in the gauge's waiting devices.
    waiting: bool,
    out_of_order_logged_at: Option<Instant>,
    out_of_order_unlogged: u64,
}

impl MqttDeviceState {
    fn note_out_of_order(&mut self, ts_us: i64) {
        self.out_of_order_unlogged += 1;
        let due = self
            .out_of_order_logged_at
            .is_none_or(|at| at.elapsed() >= Duration::from_millis(OUT_OF_ORDER_LOG_INTERVAL_MS));
        if !due {
            return;
        }
        tracing::warn!(
            device = %self.args.device_id,
            ts_us,
            mark_us = self.args.mark_us,
            readings = self.out_of_order_unlogged,
            "mqtt: the broker delivered a reading after a newer one of its device, and it is \
             not known durable: forwarded out of order (logged at most every \
             {OUT_OF_ORDER_LOG_INTERVAL_MS} ms per device)"
        );
        self.out_of_order_logged_at = Some(Instant::now());
        self.out_of_order_unlogged = 0;
    }

    fn stop_waiting(&mut self, through: bool) {
        if self.waiting {
            self.waiting = false;
            self.args.gauge.wait_ends(through);
        }
    }
}

impl Actor for MqttDevice {
    type Msg = DeviceMsg;
    type State = MqttDeviceState;
    type Arguments = MqttDeviceArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<DeviceMsg>,
        args: MqttDeviceArgs,
    ) -> Result<MqttDeviceState, ActorProcessingErr> {
        Ok(MqttDeviceState {
            args,
            queue: VecDeque::new(),
            current: None,
            working: false,
            waiting: false,
            out_of_order_logged_at: None,
            out_of_order_unlogged: 0,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<DeviceMsg>,
        msg: DeviceMsg,
        state: &mut MqttDeviceState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DeviceMsg::Push {
                token,
                ts_us,
                metrics,
            } => {
                state.queue.push_back(Queued {
                    token,
                    ts_us,
                    metrics,
                });
                if !state.working {
                    state.working = true;
                    myself.send_message(DeviceMsg::Work)?;
                }
                return Ok(());
            }
            DeviceMsg::Work => {}
        }
        let Some(head) = state.queue.front() else {
            state.working = false;
            return Ok(());
        };
        let (token, head_ts) = (head.token, head.ts_us);
        let mark = state.args.mark_us;
        if state.current.is_none() {
            let mut out_of_order = false;
            if let Some(ts) = head_ts.filter(|ts| *ts <= mark) {
                // Every earlier reading of this device is settled and reported
                // (the source handles messages in order), so the source's
                // answer covers them.
                let asked = ractor::call_t!(
                    state.args.source,
                    MqttMsg::Classify,
                    CLASSIFY_CALL_MS,
                    state.args.device_id.clone(),
                    ts
                );
                match asked {
                    Ok(Arrival::Redelivery(by)) => {
                        state.queue.pop_front();
                        finish(&myself, state, token, Outcome::Redelivery { ts_us: ts, by })?;
                        return Ok(());
                    }
                    Ok(Arrival::OutOfOrder) => {
                        out_of_order = true;
                        state.note_out_of_order(ts);
                    }
                    Ok(Arrival::New) => {}
                    Err(e) => {
                        tracing::debug!(device = %state.args.device_id, error = %e, "mqtt: asking the source about an older reading failed; retrying");
                        myself.send_after(Duration::from_millis(RETRY_MS), || DeviceMsg::Work);
                        return Ok(());
                    }
                }
            }
            // Without a ts the edge stamps one, above the mark so it stays unique.
            let ts = head_ts.unwrap_or_else(|| now_us().max(mark.saturating_add(1)));
            let metrics = state
                .queue
                .front()
                .map(|h| h.metrics.clone())
                .unwrap_or_default();
            state.current = Some(Current {
                reading: Reading {
                    device_id: state.args.device_id.clone(),
                    device_ts_us: ts,
                    edge_ts_us: 0,
                    stream: state.args.stream.clone(),
                    metrics,
                },
                out_of_order,
                attempts: 0,
            });
        }
        let current = state.current.as_ref().expect("built above");
        let reading = current.reading.clone();
        let (ts, out_of_order) = (reading.device_ts_us, current.out_of_order);
        let answer = match state.args.names.where_is_gateway() {
            Some(gateway) => {
                ractor::call_t!(gateway, GatewayMsg::Ingest, INGEST_TIMEOUT_MS, reading).ok()
            }
            None => None,
        };
        let outcome = match answer {
            Some(
                IngestReply::Committed { .. } | IngestReply::Duplicate | IngestReply::Consumed,
            ) => {
                state.args.mark_us = state.args.mark_us.max(ts);
                Outcome::Durable {
                    ts_us: ts,
                    out_of_order,
                }
            }
            Some(IngestReply::Invalid(reason)) => Outcome::Refused(reason),
            Some(IngestReply::Full) | None => {
                // Not acked: the broker keeps it; the same reading is retried.
                let reason = if answer.is_some() {
                    RetryReason::Full
                } else {
                    RetryReason::Unavailable
                };
                if !state.waiting {
                    state.waiting = true;
                    state.args.gauge.wait_starts(&state.args.device_id, reason);
                }
                let attempts = match state.current.as_mut() {
                    Some(c) => {
                        c.attempts += 1;
                        c.attempts
                    }
                    None => 1,
                };
                state
                    .args
                    .gauge
                    .retried(&state.args.device_id, ts, reason, attempts);
                myself.send_after(Duration::from_millis(RETRY_MS), || DeviceMsg::Work);
                return Ok(());
            }
        };
        state.stop_waiting(true);
        state.queue.pop_front();
        state.current = None;
        finish(&myself, state, token, outcome)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<DeviceMsg>,
        state: &mut MqttDeviceState,
    ) -> Result<(), ActorProcessingErr> {
        state.stop_waiting(false);
        Ok(())
    }
}

/// Reports the head's outcome and moves on to the next reading.
fn finish(
    myself: &ActorRef<DeviceMsg>,
    state: &mut MqttDeviceState,
    token: u64,
    outcome: Outcome,
) -> Result<(), ActorProcessingErr> {
    state.args.source.send_message(MqttMsg::Handled {
        device: state.args.device_id.clone(),
        token,
        outcome,
    })?;
    if state.queue.is_empty() {
        state.working = false;
    } else {
        myself.send_message(DeviceMsg::Work)?;
    }
    Ok(())
}

/// The connection the poll task is on. An ack is checked against it and queued
/// under its lock; the poll task marks the connection down and drops what
/// rumqttc still queues for it under the same lock, so no ack of an ended
/// connection can reach a later one.
#[derive(Debug, Default)]
struct Link {
    connection: u64,
    up: bool,
}

impl Link {
    /// Whether a message that came on `connection` may be acked now.
    fn ackable(&self, connection: u64) -> bool {
        self.up && self.connection == connection
    }
}

fn lock_link(link: &Mutex<Link>) -> std::sync::MutexGuard<'_, Link> {
    // The lock guards two plain fields; a panic elsewhere leaves them valid.
    link.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Drops what rumqttc holds of an ended connection: queued acks (their packet
/// ids belong to it) and packets read but not handed over (they were not
/// acked, so the broker redelivers them). Subscribes stay queued.
fn forget_connection(events: &mut EventLoop) {
    // `clean` also drains the request channel into `pending`, minus the acks.
    events.clean();
    events
        .pending
        .retain(|r| !matches!(r, Request::PubAck(_) | Request::PubRec(_)));
    events.state.events.clear();
}

/// Drives rumqttc's event loop. Takes a permit before each poll so that the
/// source never holds more than `inflight_max` messages; a message carries its
/// permit until acked.
async fn poll_loop(
    mut events: EventLoop,
    source: ActorRef<MqttMsg>,
    permits: Arc<Semaphore>,
    link: Arc<Mutex<Link>>,
    backoff_initial_ms: u64,
    backoff_max_ms: u64,
) {
    let mut delay_ms = backoff_initial_ms;
    let mut connection = 0;
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let event = match events.poll().await {
            Ok(Event::Incoming(Packet::Publish(publish))) => PollEvent::Publish {
                publish,
                permit,
                connection,
            },
            Ok(Event::Incoming(Packet::ConnAck(c))) => {
                delay_ms = backoff_initial_ms;
                let mut l = lock_link(&link);
                l.connection += 1;
                l.up = true;
                connection = l.connection;
                PollEvent::Connected {
                    session_present: c.session_present,
                    connection,
                }
            }
            Ok(Event::Incoming(Packet::SubAck(s))) => PollEvent::Subscribed {
                ok: s
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_))),
            },
            Ok(_) => continue,
            Err(e) => {
                {
                    let mut l = lock_link(&link);
                    l.up = false;
                    forget_connection(&mut events);
                }
                if source
                    .send_message(MqttMsg::Poll(PollEvent::Disconnected(e.to_string())))
                    .is_err()
                {
                    return;
                }
                drop(permit);
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                delay_ms = delay_ms.saturating_mul(2).min(backoff_max_ms);
                continue;
            }
        };
        if source.send_message(MqttMsg::Poll(event)).is_err() {
            return;
        }
    }
}

/// A message received and not yet acked.
struct Held<P> {
    publish: Publish,
    /// The session it arrived in: its packet id means nothing in another.
    session: u64,
    /// The connection its ack may go out on (0: none any more).
    connection: u64,
    _permit: P,
}

/// What a received message is to the held set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Received {
    /// A message to handle, under this token.
    New(u64),
    /// The broker's copy of a message still held: dropped.
    Copy,
}

/// The messages received and not yet acked, by token, with the broker's
/// packet ids to recognise its copies.
struct HeldSet<P> {
    /// By token, which grows with arrival: the first is the oldest.
    held: std::collections::BTreeMap<u64, Held<P>>,
    /// Held messages whose ack may go, waiting for an older one's.
    releasable: std::collections::BTreeSet<u64>,
    /// Held QoS 1 messages by (session, packet id).
    by_pkid: HashMap<(u64, u16), u64>,
    next_token: u64,
}

impl<P> HeldSet<P> {
    fn new() -> Self {
        Self {
            held: std::collections::BTreeMap::new(),
            releasable: std::collections::BTreeSet::new(),
            by_pkid: HashMap::new(),
            next_token: 0,
        }
    }

    fn len(&self) -> usize {
        self.held.len()
    }

    fn topic(&self, token: u64) -> Option<&str> {
        self.held.get(&token).map(|h| h.publish.topic.as_str())
    }

    fn receive(&mut self, publish: Publish, session: u64, connection: u64, permit: P) -> Received {
        let qos1 = publish.qos != QoS::AtMostOnce;
        if qos1 {
            if let Some(&token) = self.by_pkid.get(&(session, publish.pkid)) {
                if let Some(h) = self.held.get_mut(&token) {
                    if h.publish.topic == publish.topic && h.publish.payload == publish.payload {
                        // The broker re-sent it, perhaps on a new connection
                        // of the session: the original's ack goes there.
                        h.connection = h.connection.max(connection);
                        return Received::Copy;
                    }
                    // The packet id names another message now: the original's
                    // ack would acknowledge the wrong one.
                    tracing::warn!(
                        pkid = publish.pkid,
                        "mqtt: the broker reused the packet id of a message still held; \
                         that message will not be acked (the broker redelivers it)"
                    );
                    h.connection = 0;
                }
            }
        }
        let token = self.next_token;
        self.next_token += 1;
        if qos1 {
            self.by_pkid.insert((session, publish.pkid), token);
        }
        self.held.insert(
            token,
            Held {
                publish,
                session,
                connection,
                _permit: permit,
            },
        );
        Received::New(token)
    }

    /// Marks a held message as ready to ack, and returns those that may now
    /// be acked, oldest first: acks go out in arrival order, because
    /// Mosquitto 2.0.11 reorders a session's deliveries when PUBACKs come out
    /// of order (measured in BENCHMARKS.md), and stages skip readings older
    /// than their device's latest.
    fn release_in_order(&mut self, token: u64) -> Vec<Held<P>> {
        if !self.held.contains_key(&token) {
            return Vec::new();
        }
        self.releasable.insert(token);
        let mut out = Vec::new();
        while let Some(oldest) = self.held.keys().next().copied() {
            if !self.releasable.remove(&oldest) {
                break;
            }
            out.extend(self.take(oldest));
        }
        out
    }

    /// Removes a held message; the caller acks it if its connection allows.
    fn take(&mut self, token: u64) -> Option<Held<P>> {
        let h = self.held.remove(&token)?;
        if h.publish.qos != QoS::AtMostOnce {
            let key = (h.session, h.publish.pkid);
            if self.by_pkid.get(&key) == Some(&token) {
                self.by_pkid.remove(&key);
            }
        }
        Some(h)
    }
}

struct LiveDevice {
    actor: ActorRef<DeviceMsg>,
    pending: usize,
    last_active: Instant,
}

struct ParkedMsg {
    device: String,
    token: u64,
    ts_us: Option<i64>,
    metrics: Vec<Metric>,
}

#[derive(Clone, Default)]
pub struct MqttSource;

pub struct MqttSourceState {
    config: MqttConfig,
    client: AsyncClient,
    link: Arc<Mutex<Link>>,
    poll_task: JoinHandle<()>,
    connected: bool,
    connection: u64,
    /// Bumped when the broker starts a new session (its packet ids restart).
    session: u64,
    held: HeldSet<OwnedSemaphorePermit>,
    devices: HashMap<String, LiveDevice>,
    marks: HashMap<String, Mark>,
    keys: DurableKeys,
    marks_store: Option<MarksStore>,
    /// Durable readings whose PUBACK waits for their marks' fsync.
    awaiting_sync: Vec<u64>,
    sync_scheduled: bool,
    parked: VecDeque<ParkedMsg>,
    gauge: Arc<RetryGauge>,
    names: EdgeNames,
    stats: MqttStats,
    malformed_logged_at: Option<Instant>,
    malformed_unlogged: bool,
    last_malformed: String,
    /// Acks the client's request queue had no room for, oldest first:
    /// (stripped message, connection). They hold no permit, so the poll task
    /// keeps polling, which is what drains the client's queue.
    deferred_acks: VecDeque<(Publish, u64)>,
}

/// The marks (default tree: device → ts) and durable keys (id → key) on disk.
struct MarksStore {
    db: sled::Db,
    keys: sled::Tree,
}

impl MarksStore {
    fn open(dir: &std::path::Path) -> Result<Self, ActorProcessingErr> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(MARKS_CACHE_BYTES_MAX)
            .flush_every_ms(None)
            .open()
            .map_err(|e| format!("opening the MQTT marks in {}: {e}", dir.display()))?;
        let keys = db
            .open_tree(DURABLE_TREE)
            .map_err(|e| format!("opening the MQTT durable keys: {e}"))?;
        Ok(Self { db, keys })
    }

    /// Mirrors a change of the durable keys.
    fn apply(
        &self,
        change: KeysChange,
        device: &str,
        ts_us: i64,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(id) = change.added {
            self.keys
                .insert(id.to_be_bytes(), encode_key(device, ts_us))
                .map_err(|e| format!("writing a durable key of {device}: {e}"))?;
        }
        if let Some(id) = change.evicted {
            self.keys
                .remove(id.to_be_bytes())
                .map_err(|e| format!("forgetting a durable key: {e}"))?;
        }
        Ok(())
    }

    fn flush(&self) -> sled::Result<()> {
        // The keys tree shares the database's log: one flush covers both.
        self.db.flush().map(|_| ())
    }
}

fn raise_mark(marks: &mut HashMap<String, Mark>, device: &str, ts_us: i64, by: KnownBy) {
    if let Some(m) = marks.get_mut(device) {
        if ts_us > m.ts_us {
            *m = Mark { ts_us, by };
        }
    } else if marks.len() < MARKS_MAX {
        marks.insert(device.to_owned(), Mark { ts_us, by });
    }
}

impl MqttSourceState {
    fn status(&self) -> MqttStatus {
        let mut stats = self.stats.clone();
        stats.retries_full = self.gauge.full.load(Relaxed);
        stats.retries_unavailable = self.gauge.unavailable.load(Relaxed);
        MqttStatus {
            connected: self.connected,
            connection: self.connection,
            devices_live: self.devices.len(),
            held: self.held.len(),
            parked: self.parked.len(),
            devices_waiting: self.gauge.devices_waiting.load(Relaxed),
            durable_keys: self.keys.len(),
            stats,
        }
    }

    /// Releases a held message: it and any younger ones already released are
    /// acked (on the connection each came on, if still up) once every older
    /// one is.
    fn release(&mut self, token: u64) -> Result<(), ActorProcessingErr> {
        for h in self.held.release_in_order(token) {
            self.ack(h)?;
        }
        Ok(())
    }

    fn ack(&mut self, h: Held<OwnedSemaphorePermit>) -> Result<(), ActorProcessingErr> {
        if h.publish.qos == QoS::AtMostOnce {
            return Ok(());
        }
        self.flush_deferred_acks()?;
        let link = lock_link(&self.link);
        if link.ackable(h.connection) {
            if !self.deferred_acks.is_empty() || self.client.try_ack(&h.publish).is_err() {
                // rumqttc writes one queued request per poll but may read many
                // messages meanwhile: its queue can fill under a burst. Keep
                // the ack, in order, and retry; a crash here would only make
                // the broker redeliver everything held.
                if self.deferred_acks.len() >= DEFERRED_ACKS_MAX {
                    return Err(format!(
                        "queueing a PUBACK: {DEFERRED_ACKS_MAX} acks already wait for the MQTT client's queue"
                    )
                    .into());
                }
                let mut stripped = h.publish.clone();
                stripped.payload = Default::default();
                stripped.topic = String::new();
                self.deferred_acks.push_back((stripped, h.connection));
                self.stats.acks_deferred += 1;
                return Ok(());
            }
            tracing::trace!(
                pkid = h.publish.pkid,
                connection = h.connection,
                "mqtt: acked"
            );
        } else {
            tracing::trace!(
                pkid = h.publish.pkid,
                connection = h.connection,
                current = link.connection,
                "mqtt: ack skipped: its connection ended"
            );
            // Its packet id means nothing on the current connection; the
            // broker redelivers it there, and the durable keys recognise it.
            self.stats.acks_skipped += 1;
        }
        Ok(())
    }

    /// Sends the deferred acks the client's queue has room for, in order;
    /// those of an ended connection are skipped (the broker redelivers).
    fn flush_deferred_acks(&mut self) -> Result<(), ActorProcessingErr> {
        while let Some((publish, connection)) = self.deferred_acks.front() {
            if !lock_link(&self.link).ackable(*connection) {
                self.stats.acks_skipped += 1;
            } else if self.client.try_ack(publish).is_err() {
                return Ok(());
            }
            self.deferred_acks.pop_front();
        }
        Ok(())
    }

    fn malformed(&mut self, topic: &str, bad_topic: bool, problem: &dyn std::fmt::Display) {
        if bad_topic {
            self.stats.bad_topic += 1;
        } else {
            self.stats.bad_payload += 1;
        }
        // Bounded: a topic may be 64 KiB, the log line need not be.
        let topic: String = topic.chars().take(200).collect();
        self.last_malformed = format!("{topic}: {problem}");
        self.malformed_unlogged = true;
        self.log_malformed(false);
    }

    fn log_malformed(&mut self, tick: bool) {
        let due = self
            .malformed_logged_at
            .is_none_or(|at| at.elapsed() >= Duration::from_millis(MALFORMED_LOG_INTERVAL_MS));
        if !self.malformed_unlogged || !due {
            return;
        }
        self.malformed_unlogged = false;
        self.malformed_logged_at = Some(Instant::now());
        tracing::warn!(
            bad_payload_total = self.stats.bad_payload,
            bad_topic_total = self.stats.bad_topic,
            last = %self.last_malformed,
            summary = tick,
            "mqtt: malformed messages acked and dropped (logged at most every {MALFORMED_LOG_INTERVAL_MS} ms)"
        );
    }

    /// Records a reading known durable: its device's mark and its key, in
    /// memory and (unsynced) in the store.
    fn record_durable(
        &mut self,
        device: &str,
        ts: i64,
        by: KnownBy,
    ) -> Result<(), ActorProcessingErr> {
        if !self.marks.contains_key(device) && self.marks.len() >= MARKS_MAX {
            self.forget_idle_marks()?;
        }
        raise_mark(&mut self.marks, device, ts, by);
        let change = self.keys.insert(device, ts, by);
        if let Some(store) = &self.marks_store {
            if let Some(m) = self.marks.get(device) {
                store
                    .db
                    .insert(device.as_bytes(), &m.ts_us.to_be_bytes())
                    .map_err(|e| format!("writing the mark of {device}: {e}"))?;
            }
            store.apply(change, device, ts)?;
        }
        Ok(())
    }

    /// Keeps the marks of live devices only, in memory and on disk.
    fn forget_idle_marks(&mut self) -> Result<(), ActorProcessingErr> {
        let devices = &self.devices;
        self.marks.retain(|d, _| devices.contains_key(d));
        if let Some(store) = &self.marks_store {
            for key in store.db.iter().keys() {
                let key = key.map_err(|e| format!("reading the marks: {e}"))?;
                let live = std::str::from_utf8(&key).is_ok_and(|d| devices.contains_key(d));
                if !live {
                    store
                        .db
                        .remove(&key)
                        .map_err(|e| format!("forgetting a mark: {e}"))?;
                }
            }
        }
        tracing::warn!(
            marks_max = MARKS_MAX,
            "mqtt: too many device marks; forgot those of passivated devices"
        );
        Ok(())
    }

    /// Syncs the marks, then acks the readings that waited for them.
    fn sync_marks(&mut self) -> Result<(), ActorProcessingErr> {
        self.sync_scheduled = false;
        if let Some(store) = &self.marks_store {
            // The fsync blocks: let tokio move other tasks off this worker.
            let flush = || store.flush();
            let result = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
                Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
                    tokio::task::block_in_place(flush)
                }
                _ => flush(),
            };
            result.map_err(|e| format!("syncing the marks: {e}"))?;
        }
        for token in std::mem::take(&mut self.awaiting_sync) {
            self.release(token)?;
        }
        Ok(())
    }

    /// A slot for a new device actor: free, or made by passivating the least
    /// recently active idle device.
    fn make_room(&mut self) -> bool {
        if self.devices.len() < self.config.devices_max {
            return true;
        }
        let idle = self
            .devices
            .iter()
            .filter(|(_, d)| d.pending == 0)
            .min_by_key(|(_, d)| d.last_active)
            .map(|(id, _)| id.clone());
        match idle {
            Some(id) => {
                self.passivate(&id);
                true
            }
            None => false,
        }
    }

    fn passivate(&mut self, id: &str) {
        if let Some(d) = self.devices.remove(id) {
            d.actor.stop(Some("passivated".into()));
            self.stats.passivated += 1;
        }
    }

    async fn spawn_device(
        &mut self,
        myself: &ActorRef<MqttMsg>,
        device: &str,
    ) -> Result<(), ActorProcessingErr> {
        let args = MqttDeviceArgs {
            device_id: device.to_owned(),
            mark_us: self.marks.get(device).map_or(i64::MIN, |m| m.ts_us),
            source: myself.clone(),
            stream: self.config.stream.clone(),
            gauge: self.gauge.clone(),
            names: self.names.clone(),
        };
        let (actor, _) = Actor::spawn_linked(None, MqttDevice, args, myself.get_cell()).await?;
        self.devices.insert(
            device.to_owned(),
            LiveDevice {
                actor,
                pending: 0,
                last_active: Instant::now(),
            },
        );
        Ok(())
    }

    fn push(&mut self, m: ParkedMsg) -> Result<(), ActorProcessingErr> {
        let d = self.devices.get_mut(&m.device).expect("live device");
        d.pending += 1;
        d.last_active = Instant::now();
        d.actor.send_message(DeviceMsg::Push {
            token: m.token,
            ts_us: m.ts_us,
            metrics: m.metrics,
        })?;
        Ok(())
    }

    /// Hands a message to its device, or parks it when no device slot is free.
    /// A device's messages never overtake its parked ones.
    async fn dispatch(
        &mut self,
        myself: &ActorRef<MqttMsg>,
        m: ParkedMsg,
    ) -> Result<(), ActorProcessingErr> {
        if self.parked.iter().any(|p| p.device == m.device) {
            self.parked.push_back(m);
            return Ok(());
        }
        if !self.devices.contains_key(&m.device) {
            if !self.make_room() {
                if self.parked.is_empty() {
                    tracing::warn!(
                        devices_max = self.config.devices_max,
                        "mqtt: every device actor is busy; new devices wait"
                    );
                }
                self.parked.push_back(m);
                return Ok(());
            }
            self.spawn_device(myself, &m.device).await?;
        }
        self.push(m)
    }

    async fn unpark(&mut self, myself: &ActorRef<MqttMsg>) -> Result<(), ActorProcessingErr> {
        if self.parked.is_empty() {
            return Ok(());
        }
        let parked = std::mem::take(&mut self.parked);
        for m in parked {
            self.dispatch(myself, m).await?;
        }
        Ok(())
    }
}

/// The source's arguments.
#[derive(Debug, Clone)]
pub struct MqttSourceArgs {
    pub config: MqttConfig,
    /// What the outbox held before the uplink could delete anything (see
    /// [`outbox_marks`]): each device's mark, and the exact keys of the newest
    /// readings encoded as [`outbox_key_entry`]. The live outbox adds to it at
    /// each start.
    pub outbox_marks: Arc<HashMap<String, i64>>,
    /// Where the edge's gateway is registered.
    pub names: EdgeNames,
}

/// Separates a device from a ts in the exact keys [`outbox_marks`] returns. A
/// device id never holds it: MQTT forbids U+0000 in topics, and the scan skips
/// any reading whose device id does.
const KEY_SEPARATOR: char = '\0';
/// The newest readings of the outbox whose exact keys [`outbox_marks`] hands
/// to the source (older ones only raise the marks).
pub const OUTBOX_KEYS_MAX: usize = 16_384;

/// The entry of [`outbox_marks`]' map that says `(device, ts_us)` is in the outbox.
pub fn outbox_key_entry(device: &str, ts_us: i64) -> (String, i64) {
    (format!("{device}{KEY_SEPARATOR}{ts_us}"), ts_us)
}

/// Reads an entry of [`outbox_marks`]' map: a mark, or an exact key.
fn decode_outbox_entry(key: &str, ts_us: i64) -> OutboxEntry<'_> {
    match key.split_once(KEY_SEPARATOR) {
        None => OutboxEntry::Mark(key),
        Some((device, ts)) if ts.parse() == Ok(ts_us) => OutboxEntry::Key(device),
        Some(_) => OutboxEntry::Unknown,
    }
}

enum OutboxEntry<'a> {
    Mark(&'a str),
    Key(&'a str),
    Unknown,
}

/// Each device's highest ts among the readings in `outbox`, and the exact keys
/// of its newest [`OUTBOX_KEYS_MAX`] readings (see [`outbox_key_entry`]).
/// Called before the edge's actors start, because once the uplink runs, the
/// cloud's Welcome may delete segments whose readings' PUBACKs never reached
/// the broker: a redelivery of any of them must be recognised exactly, and
/// the mark alone recognises only the newest of each device.
pub fn outbox_marks<T>(
    outbox: &mut crate::outbox::Outbox<T>,
) -> Result<HashMap<String, i64>, crate::outbox::OutboxError> {
    let mut marks: HashMap<String, i64> = HashMap::new();
    let mut newest: VecDeque<(String, i64)> = VecDeque::new();
    let (mut from, through) = (outbox.acked_through() + 1, outbox.sealed_through());
    while from <= through {
        let frames = outbox.read(from, through, SCAN_SEGMENTS_PER_READ)?;
        let Some(last) = frames.last() else {
            break;
        };
        from = last.seq + 1;
        for f in frames {
            let Ok(readings) = decode_payload(&f.bytes, f.readings_count) else {
                continue;
            };
            for r in readings {
                if r.device_id.contains(KEY_SEPARATOR) {
                    continue;
                }
                if let Some(m) = marks.get_mut(&r.device_id) {
                    *m = (*m).max(r.device_ts_us);
                } else if marks.len() < MARKS_MAX {
                    marks.insert(r.device_id.clone(), r.device_ts_us);
                }
                if newest.len() >= OUTBOX_KEYS_MAX {
                    newest.pop_front();
                }
                newest.push_back((r.device_id, r.device_ts_us));
            }
        }
    }
    marks.extend(newest.iter().map(|(d, ts)| outbox_key_entry(d, *ts)));
    Ok(marks)
}

/// Reads the readings still in the outbox into the marks and the durable
/// keys (oldest first, so the newest stay); returns the keys added, for the
/// store.
async fn recover_from_outbox(
    names: &EdgeNames,
    marks: &mut HashMap<String, Mark>,
    keys: &mut DurableKeys,
) -> Result<Vec<(KeysChange, String, i64)>, ActorProcessingErr> {
    let gateway = names
        .where_is_gateway()
        .ok_or("the gateway is not running")?;
    let status = ractor::call_t!(gateway, GatewayMsg::Status, GATEWAY_CALL_MS)
        .map_err(|e| format!("asking the gateway for its status: {e}"))?;
    let mut changes = Vec::new();
    let (mut from, through) = (status.acked_through + 1, status.sealed_through);
    let (mut segments, mut damaged) = (0u64, 0u64);
    while from <= through {
        let req = ReadRequest {
            link_generation: 0,
            from_seq: from,
            through_seq: through,
            segments_max: SCAN_SEGMENTS_PER_READ,
        };
        let frames = ractor::call_t!(gateway, GatewayMsg::Read, GATEWAY_CALL_MS, req)
            .map_err(|e| format!("reading the outbox: {e}"))?
            .map_err(|e| format!("reading the outbox: {e}"))?;
        if frames.is_empty() {
            break;
        }
        for f in frames {
            from = f.seq + 1;
            segments += 1;
            match decode_payload(&f.bytes, f.readings_count) {
                Ok(readings) => {
                    for r in readings {
                        raise_mark(marks, &r.device_id, r.device_ts_us, KnownBy::Outbox);
                        let change = keys.insert(&r.device_id, r.device_ts_us, KnownBy::Outbox);
                        if change != KeysChange::default() {
                            changes.push((change, r.device_id, r.device_ts_us));
                        }
                    }
                }
                // The gateway verified the checksum; a payload that still does
                // not decode is the outbox's problem, reported there.
                Err(_) => damaged += 1,
            }
        }
    }
    tracing::info!(
        segments,
        damaged,
        devices = marks.len(),
        "mqtt: device marks rebuilt from the outbox"
    );
    Ok(changes)
}

/// Reads the marks store back: marks, then durable keys in the order they
/// were made durable.
fn load_store(
    store: &MarksStore,
    marks: &mut HashMap<String, Mark>,
    keys: &mut DurableKeys,
) -> Result<(), ActorProcessingErr> {
    for kv in store.db.iter() {
        let (k, v) = kv.map_err(|e| format!("reading the MQTT marks: {e}"))?;
        if let (Ok(device), Ok(ts)) = (
            String::from_utf8(k.to_vec()),
            <[u8; 8]>::try_from(v.as_ref()),
        ) {
            raise_mark(marks, &device, i64::from_be_bytes(ts), KnownBy::MarksStore);
        }
    }
    for kv in store.keys.iter() {
        let (k, v) = kv.map_err(|e| format!("reading the MQTT durable keys: {e}"))?;
        let (Ok(id), Some((device, ts))) = (<[u8; 8]>::try_from(k.as_ref()), decode_key(&v)) else {
            continue;
        };
        let change = keys.insert_with_id(u64::from_be_bytes(id), &device, ts, KnownBy::MarksStore);
        // A smaller `inflight_max` than last time: forget the oldest.
        if let Some(old) = change.evicted {
            store
                .keys
                .remove(old.to_be_bytes())
                .map_err(|e| format!("forgetting a durable key: {e}"))?;
        }
    }
    Ok(())
}

impl Actor for MqttSource {
    type Msg = MqttMsg;
    type State = MqttSourceState;
    type Arguments = MqttSourceArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<MqttMsg>,
        args: MqttSourceArgs,
    ) -> Result<MqttSourceState, ActorProcessingErr> {
        let config = args.config;
        config.validate()?;
        let mut marks = HashMap::new();
        let mut outbox_keys = Vec::new();
        for (entry, ts) in args.outbox_marks.iter() {
            match decode_outbox_entry(entry, *ts) {
                OutboxEntry::Mark(device) => raise_mark(&mut marks, device, *ts, KnownBy::Outbox),
                OutboxEntry::Key(device) => outbox_keys.push((device, *ts)),
                OutboxEntry::Unknown => {}
            }
        }
        // Oldest first, so that the newest stay if there are too many.
        outbox_keys.sort_unstable_by_key(|(_, ts)| *ts);
        let mut keys = DurableKeys::new(config.durable_keys_max());
        let marks_store = match &config.marks_dir {
            Some(dir) => {
                let store = MarksStore::open(dir)?;
                load_store(&store, &mut marks, &mut keys)?;
                Some(store)
            }
            None => None,
        };
        let restored = keys.len();
        let mut changes = Vec::new();
        for (device, ts) in outbox_keys {
            let change = keys.insert(device, ts, KnownBy::Outbox);
            if change != KeysChange::default() {
                changes.push((change, device.to_owned(), ts));
            }
        }
        changes.extend(recover_from_outbox(&args.names, &mut marks, &mut keys).await?);
        if let Some(store) = &marks_store {
            for (change, device, ts) in &changes {
                store.apply(*change, device, *ts)?;
            }
            store
                .flush()
                .map_err(|e| format!("syncing the MQTT durable keys: {e}"))?;
        }
        tracing::info!(
            marks = marks.len(),
            durable_keys = keys.len(),
            keys_from_store = restored,
            keys_from_outbox = changes.len(),
            durable_keys_max = config.durable_keys_max(),
            "mqtt: durable readings known at start"
        );
        let mut options =
            MqttOptions::new(config.client_id.clone(), config.host.clone(), config.port);
        options
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_keep_alive(Duration::from_millis(config.keep_alive_ms))
            .set_max_packet_size(config.packet_bytes_max, config.packet_bytes_max);
        let (client, events) = AsyncClient::new(options, config.queued_requests_max);
        let permits = Arc::new(Semaphore::new(config.inflight_max));
        let link = Arc::new(Mutex::new(Link::default()));
        let poll_task = tokio::spawn(poll_loop(
            events,
            myself.clone(),
            permits,
            link.clone(),
            config.reconnect_backoff_initial_ms,
            config.reconnect_backoff_max_ms,
        ));
        myself.send_after(Duration::from_millis(TICK_MS), || MqttMsg::Tick);
        tracing::info!(
            broker = %format!("{}:{}", config.host, config.port),
            client_id = %config.client_id,
            topic = %config.topic,
            device_level = config.device_level,
            "mqtt source starting"
        );
        Ok(MqttSourceState {
            config,
            names: args.names.clone(),
            client,
            link,
            poll_task,
            connected: false,
            connection: 0,
            session: 0,
            held: HeldSet::new(),
            deferred_acks: VecDeque::new(),
            devices: HashMap::new(),
            marks,
            keys,
            marks_store,
            awaiting_sync: Vec::new(),
            sync_scheduled: false,
            parked: VecDeque::new(),
            gauge: Arc::new(RetryGauge::default()),
            stats: MqttStats::default(),
            malformed_logged_at: None,
            malformed_unlogged: false,
            last_malformed: String::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<MqttMsg>,
        msg: MqttMsg,
        state: &mut MqttSourceState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            MqttMsg::Poll(PollEvent::Connected {
                session_present,
                connection,
            }) => {
                state.connected = true;
                state.connection = connection;
                if !session_present {
                    state.session += 1;
                }
                // Always (re)subscribe: a kept session may hold another filter
                // from an earlier configuration.
                state
                    .client
                    .try_subscribe(state.config.topic.clone(), QoS::AtLeastOnce)
                    .map_err(|e| format!("queueing the SUBSCRIBE: {e}"))?;
                tracing::info!(
                    session_present,
                    connection,
                    held = state.held.len(),
                    "mqtt connected"
                );
            }
            MqttMsg::Poll(PollEvent::Subscribed { ok }) => {
                if ok {
                    tracing::info!(topic = %state.config.topic, "mqtt subscribed");
                } else {
                    return Err(format!(
                        "the broker refused the subscription to {}",
                        state.config.topic
                    )
                    .into());
                }
            }
            MqttMsg::Poll(PollEvent::Disconnected(error)) => {
                if state.connected {
                    state.stats.disconnects += 1;
                    tracing::warn!(%error, connection = state.connection, held = state.held.len(), "mqtt connection lost; reconnecting");
                } else {
                    tracing::debug!(%error, "mqtt connection attempt failed");
                }
                state.connected = false;
            }
            MqttMsg::Poll(PollEvent::Publish {
                publish,
                permit,
                connection,
            }) => {
                state.stats.received += 1;
                let parsed = parse_message(
                    &state.config.topic,
                    state.config.device_level,
                    &publish.topic,
                    &publish.payload,
                );
                let topic = publish.topic.clone();
                let (pkid, dup) = (publish.pkid, publish.dup);
                let token = match state
                    .held
                    .receive(publish, state.session, connection, permit)
                {
                    Received::Copy => {
                        // The original's ack will acknowledge this copy too.
                        state.stats.redelivered_copies += 1;
                        tracing::trace!(
                            pkid,
                            dup,
                            connection,
                            "mqtt: copy of a held message dropped"
                        );
                        return Ok(());
                    }
                    Received::New(token) => token,
                };
                tracing::trace!(
                    pkid,
                    dup,
                    connection,
                    token,
                    %topic,
                    ts_us = ?parsed.as_ref().ok().and_then(|p| p.ts_us),
                    "mqtt: received"
                );
                match parsed {
                    Ok(p) => {
                        let m = ParkedMsg {
                            device: p.device_id,
                            token,
                            ts_us: p.ts_us,
                            metrics: p.metrics,
                        };
                        state.dispatch(&myself, m).await?;
                    }
                    Err(e) => {
                        state.malformed(&topic, e.is_topic(), &e);
                        state.release(token)?;
                    }
                }
            }
            MqttMsg::Classify(device, ts, reply) => {
                let mark = state.marks.get(&device).copied();
                let _ = reply.send(classify(&device, ts, mark, &state.keys));
            }
            MqttMsg::Handled {
                device,
                token,
                outcome,
            } => {
                let waits_for_sync = match outcome {
                    Outcome::Durable {
                        ts_us,
                        out_of_order,
                    } => {
                        state.stats.committed += 1;
                        tracing::trace!(%device, ts_us, out_of_order, token, "mqtt: durable");
                        if out_of_order {
                            state.stats.out_of_order += 1;
                        }
                        state.record_durable(&device, ts_us, KnownBy::Committed)?;
                        // Queued behind the Handled already in the mailbox, so
                        // one fsync covers them all (group commit).
                        state.awaiting_sync.push(token);
                        if !state.sync_scheduled {
                            state.sync_scheduled = true;
                            myself.send_message(MqttMsg::SyncMarks)?;
                        }
                        true
                    }
                    Outcome::Redelivery { ts_us, by } => {
                        state.stats.stale += 1;
                        // Its ack may be lost too, and by its next redelivery
                        // the mark may have moved on: its key must be in the
                        // synced store before the ack.
                        state.record_durable(&device, ts_us, by)?;
                        state.awaiting_sync.push(token);
                        if !state.sync_scheduled {
                            state.sync_scheduled = true;
                            myself.send_message(MqttMsg::SyncMarks)?;
                        }
                        tracing::debug!(
                            %device,
                            ts_us,
                            mark_us = state.marks.get(&device).map(|m| m.ts_us),
                            known_by = %by,
                            stale_total = state.stats.stale,
                            "mqtt: redelivery of a durable reading acked, not forwarded"
                        );
                        true
                    }
                    Outcome::Refused(reason) => {
                        let topic = state.held.topic(token).unwrap_or_default().to_owned();
                        let problem = format!("refused by the gateway: {reason}");
                        state.malformed(&topic, false, &problem);
                        false
                    }
                };
                if !waits_for_sync {
                    state.release(token)?;
                }
                if let Some(d) = state.devices.get_mut(&device) {
                    d.pending = d.pending.saturating_sub(1);
                    d.last_active = Instant::now();
                }
                state.unpark(&myself).await?;
            }
            MqttMsg::SyncMarks => state.sync_marks()?,
            MqttMsg::Tick => {
                state.flush_deferred_acks()?;
                let idle = Duration::from_millis(state.config.device_idle_ms);
                let expired: Vec<String> = state
                    .devices
                    .iter()
                    .filter(|(_, d)| d.pending == 0 && d.last_active.elapsed() >= idle)
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in expired {
                    state.passivate(&id);
                }
                state.unpark(&myself).await?;
                state.log_malformed(true);
                myself.send_after(Duration::from_millis(TICK_MS), || MqttMsg::Tick);
            }
            MqttMsg::Status(reply) => {
                let _ = reply.send(state.status());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<MqttMsg>,
        evt: SupervisionEvent,
        _state: &mut MqttSourceState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(_, reason) = evt {
            // Its held messages would never be acked: restart the source, so
            // that the broker redelivers them to a fresh set of devices.
            return Err(format!("an MQTT device actor failed: {reason}").into());
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<MqttMsg>,
        state: &mut MqttSourceState,
    ) -> Result<(), ActorProcessingErr> {
        // Dropping the connection without DISCONNECT keeps the session: what is
        // unacked is redelivered to the next incarnation, which must know the
        // marks of what is already durable.
        state.poll_task.abort();
        lock_link(&state.link).up = false;
        if let Some(store) = &state.marks_store {
            if let Err(e) = store.flush() {
                tracing::error!(error = %e, "syncing the MQTT marks at stop failed");
            }
        }
        for (_, d) in state.devices.drain() {
            d.actor.stop(Some("mqtt source stopping".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: &str = "plant-a/+/telemetry";

    #[test]
    fn filters_match_as_mqtt_says() {
        assert!(topic_matches(F, "plant-a/press-7/telemetry"));
        assert!(topic_matches(F, "plant-a//telemetry"));
        assert!(!topic_matches(F, "plant-a/press-7/telemetry/x"));
        assert!(!topic_matches(F, "plant-b/press-7/telemetry"));
        assert!(topic_matches("a/#", "a/b/c"));
        assert!(topic_matches("a/#", "a"));
        assert!(!topic_matches("#", "$SYS/x"));
        assert!(valid_filter(F) && valid_filter("a/#") && !valid_filter("a/#/b"));
        assert!(!valid_filter("a/b+/c"));
        assert_eq!(first_wildcard_level(F), Some(1));
    }

    #[test]
    fn a_payload_becomes_metrics() {
        let p = parse_message(
            F,
            1,
            "plant-a/press-7/telemetry",
            r#"{"ts": 1700000000123, "temperature": 21.5, "count": 3, "running": true,
                 "mode": "auto", "unit": {"temperature": "°C"}}"#
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(p.device_id, "press-7");
        assert_eq!(p.ts_us, Some(1_700_000_000_123_000));
        let get = |n: &str| p.metrics.iter().find(|m| m.name == n).unwrap().clone();
        assert_eq!(get("temperature").value, Value::F64(21.5));
        assert_eq!(get("temperature").unit.as_deref(), Some("°C"));
        assert_eq!(get("count").value, Value::I64(3));
        assert_eq!(get("running").value, Value::Bool(true));
        assert_eq!(get("mode").value, Value::Str("auto".into()));
        assert_eq!(p.metrics.len(), 4);
        let no_ts = parse_message(F, 1, "plant-a/d/telemetry", br#"{"v": 1}"#).unwrap();
        assert_eq!(no_ts.ts_us, None);
    }

    #[test]
    fn malformed_messages_name_their_problem() {
        let e = |topic: &str, payload: &[u8]| parse_message(F, 1, topic, payload).unwrap_err();
        let t = "plant-a/d/telemetry";
        assert!(matches!(e(t, b"not json"), MessageError::NotJson(_)));
        assert_eq!(e(t, b"[1, 2]"), MessageError::NotObject);
        assert_eq!(e(t, br#"{"ts": "x", "v": 1}"#), MessageError::BadTs);
        assert_eq!(e(t, br#"{"ts": -1, "v": 1}"#), MessageError::BadTs);
        assert_eq!(e(t, br#"{"ts": 1.5, "v": 1}"#), MessageError::BadTs);
        assert_eq!(
            e(t, br#"{"ts": 9223372036854775807, "v": 1}"#),
            MessageError::BadTs
        );
        assert_eq!(e(t, br#"{"v": null}"#), MessageError::BadValue("v".into()));
        assert_eq!(e(t, br#"{"v": [1]}"#), MessageError::BadValue("v".into()));
        assert_eq!(e(t, br#"{"v": 1, "unit": 3}"#), MessageError::BadUnits);
        assert_eq!(e(t, br#"{"ts": 1}"#), MessageError::NoMetrics);
        assert_eq!(e("plant-a//telemetry", b"{}"), MessageError::EmptyDeviceId);
        assert_eq!(e("plant-b/d/telemetry", b"{}"), MessageError::TopicMismatch);
        let long = format!("plant-a/{}/telemetry", "x".repeat(DEVICE_ID_BYTES_MAX + 1));
        assert!(matches!(e(&long, b"{}"), MessageError::DeviceIdTooLong(_)));
        let big = format!(r#"{{"v": "{}"}}"#, "x".repeat(5000));
        assert!(matches!(e(t, big.as_bytes()), MessageError::Invalid(_)));
        assert!(e("plant-a//telemetry", b"{}").is_topic());
        assert!(!e(t, b"x").is_topic());
    }

    #[test]
    fn config_is_checked() {
        let c = MqttConfig::new("127.0.0.1", 1883, "edge-1", F).unwrap();
        assert_eq!(c.device_level, 1);
        assert_eq!(
            MqttConfig::new("127.0.0.1", 1883, "edge-1", "a/b"),
            Err(MqttConfigError::NoDeviceLevel)
        );
        let mut bad = c.clone();
        bad.queued_requests_max = bad.inflight_max;
        assert_eq!(bad.validate(), Err(MqttConfigError::QueuedRequests));
        let mut bad = c.clone();
        bad.device_level = 7;
        assert_eq!(bad.validate(), Err(MqttConfigError::DeviceLevel(7)));
        let mut bad = c;
        bad.topic = "a/#/b".into();
        assert!(matches!(bad.validate(), Err(MqttConfigError::Topic(_))));
    }

    fn publish(pkid: u16, topic: &str, payload: &str) -> Publish {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, payload.as_bytes().to_vec());
        p.pkid = pkid;
        p
    }

    /// Mosquitto was seen (suspected) to deliver a new burst ahead of a
    /// session's redelivered backlog. Readings 80..=119 of a device become
    /// durable first, then the older backlog 59..=79 arrives: none of it is
    /// known durable, so none of it may be skipped; redeliveries of durable
    /// ones are.
    #[test]
    fn only_a_reading_known_durable_is_a_redelivery() {
        let mut keys = DurableKeys::new(1_000);
        let mut marks = HashMap::new();
        for ts in 80..=119 {
            raise_mark(&mut marks, "d", ts, KnownBy::Committed);
            keys.insert("d", ts, KnownBy::Committed);
        }
        let mark = marks.get("d").copied();
        assert_eq!(mark.map(|m| m.ts_us), Some(119));
        for ts in 59..=79 {
            assert_eq!(
                classify("d", ts, mark, &keys),
                Arrival::OutOfOrder,
                "ts {ts} was never durable: it must be forwarded, not skipped"
            );
        }
        for ts in 80..=119 {
            assert_eq!(
                classify("d", ts, mark, &keys),
                Arrival::Redelivery(KnownBy::Committed)
            );
        }
        assert_eq!(classify("d", 120, mark, &keys), Arrival::New);
        // Another device's keys say nothing about this one.
        assert_eq!(classify("e", 100, mark, &keys), Arrival::OutOfOrder);
        assert_eq!(classify("e", 100, None, &keys), Arrival::New);
        // The mark itself is durable, wherever it was learned.
        let from_store = Some(Mark {
            ts_us: 500,
            by: KnownBy::MarksStore,
        });
        assert_eq!(
            classify("f", 500, from_store, &keys),
            Arrival::Redelivery(KnownBy::MarksStore)
        );
        assert_eq!(classify("f", 499, from_store, &keys), Arrival::OutOfOrder);
    }

    #[test]
    fn durable_keys_forget_the_oldest_first() {
        let mut keys = DurableKeys::new(3);
        assert_eq!(
            keys.insert("a", 1, KnownBy::Outbox),
            KeysChange {
                added: Some(0),
                evicted: None
            }
        );
        keys.insert("a", 2, KnownBy::Committed);
        keys.insert("b", 1, KnownBy::Committed);
        // Known already: no change, no new id.
        assert_eq!(
            keys.insert("a", 1, KnownBy::Committed),
            KeysChange::default()
        );
        assert_eq!(keys.get("a", 1), Some(KnownBy::Outbox));
        let change = keys.insert("b", 2, KnownBy::Committed);
        assert_eq!(
            change,
            KeysChange {
                added: Some(3),
                evicted: Some(0)
            }
        );
        assert_eq!(keys.get("a", 1), None);
        assert_eq!(keys.get("a", 2), Some(KnownBy::Committed));
        assert_eq!(keys.len(), 3);
        // Restored ids carry on from the highest.
        let mut restored = DurableKeys::new(3);
        restored.insert_with_id(41, "a", 7, KnownBy::MarksStore);
        assert_eq!(restored.insert("a", 8, KnownBy::Committed).added, Some(42));
        assert_eq!(
            decode_key(&encode_key("dev/ü", -5)),
            Some(("dev/ü".into(), -5))
        );
        assert_eq!(decode_key(b"short"), None);
    }

    #[test]
    fn the_marks_store_keeps_marks_and_keys_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut keys = DurableKeys::new(2);
        {
            let store = MarksStore::open(dir.path()).unwrap();
            for ts in [10, 11, 12] {
                let change = keys.insert("d", ts, KnownBy::Committed);
                store.apply(change, "d", ts).unwrap();
                store.db.insert("d", &ts.to_be_bytes()).unwrap();
            }
            store.flush().unwrap();
        }
        let store = MarksStore::open(dir.path()).unwrap();
        let (mut marks, mut back) = (HashMap::new(), DurableKeys::new(2));
        load_store(&store, &mut marks, &mut back).unwrap();
        assert_eq!(
            marks.get("d"),
            Some(&Mark {
                ts_us: 12,
                by: KnownBy::MarksStore
            })
        );
        assert_eq!(back.get("d", 10), None, "evicted before the restart");
        assert_eq!(back.get("d", 11), Some(KnownBy::MarksStore));
        assert_eq!(back.get("d", 12), Some(KnownBy::MarksStore));
        assert_eq!(store.keys.len(), 2);
        // A smaller bound at the next start forgets the oldest, on disk too.
        let mut small = DurableKeys::new(1);
        load_store(&store, &mut HashMap::new(), &mut small).unwrap();
        assert_eq!(small.get("d", 12), Some(KnownBy::MarksStore));
        assert_eq!(store.keys.len(), 1);
    }

    #[test]
    fn acks_go_out_in_arrival_order() {
        let mut held: HeldSet<()> = HeldSet::new();
        let mut tokens = Vec::new();
        for pkid in 1..=3 {
            let Received::New(t) = held.receive(publish(pkid, "p/d/t", "x"), 1, 1, ()) else {
                panic!("each delivery is new");
            };
            tokens.push(t);
        }
        let pkids = |hs: Vec<Held<()>>| hs.iter().map(|h| h.publish.pkid).collect::<Vec<_>>();
        // The second is durable first: its ack waits for the first's.
        assert!(held.release_in_order(tokens[1]).is_empty());
        assert_eq!(pkids(held.release_in_order(tokens[0])), [1, 2]);
        assert_eq!(pkids(held.release_in_order(tokens[2])), [3]);
        // Releasing what is gone does nothing.
        assert!(held.release_in_order(tokens[2]).is_empty());
        assert_eq!(held.len(), 0);
    }

    #[test]
    fn a_copy_moves_the_ack_to_its_connection_and_never_crosses_sessions() {
        let mut held: HeldSet<()> = HeldSet::new();
        let Received::New(t1) = held.receive(publish(7, "p/d/t", "a"), 1, 1, ()) else {
            panic!("first delivery is new");
        };
        // The broker re-sends it on connection 2 of the same session.
        assert_eq!(
            held.receive(publish(7, "p/d/t", "a"), 1, 2, ()),
            Received::Copy
        );
        assert_eq!(held.held[&t1].connection, 2);
        // A new session (the broker lost the old one): packet id 7 is another message.
        let Received::New(t2) = held.receive(publish(7, "p/d/t", "a"), 2, 3, ()) else {
            panic!("a new session's message is new");
        };
        let h1 = held.take(t1).unwrap();
        let mut link = Link {
            connection: 3,
            up: true,
        };
        assert!(!link.ackable(h1.connection), "connection 2 is gone");
        assert!(link.ackable(held.take(t2).unwrap().connection));
        link.up = false;
        assert!(!link.ackable(3), "no ack while down");
        // The same packet id reused for another message while one is held: the
        // held one can no longer be acked.
        let Received::New(t3) = held.receive(publish(9, "p/d/t", "x"), 2, 3, ()) else {
            panic!("new");
        };
        let Received::New(t4) = held.receive(publish(9, "p/d/t", "y"), 2, 3, ()) else {
            panic!("another payload is another message");
        };
        assert_eq!(held.held[&t3].connection, 0);
        held.take(t3);
        assert_eq!(
            held.by_pkid.get(&(2, 9)),
            Some(&t4),
            "taking t3 keeps t4's entry"
        );
        held.take(t4);
        assert!(held.by_pkid.is_empty() && held.held.is_empty());
    }

    #[test]
    fn the_startup_scan_hands_over_marks_and_exact_keys() {
        use crate::outbox::{MemoryStore, Outbox, OutboxConfig};
        let store = MemoryStore::new();
        let (mut outbox, _) =
            Outbox::<()>::open(Box::new(store), OutboxConfig::default(), 1).unwrap();
        let now = std::time::Instant::now();
        for (device, ts) in [("d", 10), ("d", 12), ("e", 5), ("bad\0id", 7)] {
            let r = Reading {
                device_id: device.into(),
                device_ts_us: ts,
                edge_ts_us: 0,
                stream: None,
                metrics: vec![Metric {
                    name: "v".into(),
                    value: Value::I64(1),
                    unit: None,
                }],
            };
            outbox.handle_reading(now, r, ()).unwrap();
        }
        outbox.commit().unwrap().expect("a segment");
        let map = outbox_marks(&mut outbox).unwrap();
        let (mut marks, mut keys) = (Vec::new(), Vec::new());
        for (entry, ts) in &map {
            match decode_outbox_entry(entry, *ts) {
                OutboxEntry::Mark(d) => marks.push((d.to_owned(), *ts)),
                OutboxEntry::Key(d) => keys.push((d.to_owned(), *ts)),
                OutboxEntry::Unknown => panic!("{entry:?} is neither"),
            }
        }
        marks.sort();
        keys.sort();
        assert_eq!(marks, [("d".to_owned(), 12), ("e".to_owned(), 5)]);
        assert_eq!(
            keys,
            [
                ("d".to_owned(), 10),
                ("d".to_owned(), 12),
                ("e".to_owned(), 5)
            ],
            "a device id holding the separator is skipped"
        );
        assert!(matches!(
            decode_outbox_entry("d\u{0}11", 12),
            OutboxEntry::Unknown
        ));
    }

    #[test]
    fn retries_are_counted_by_reason_and_episodes_end_with_the_last_device() {
        let g = RetryGauge::default();
        g.wait_starts("a", RetryReason::Full);
        g.wait_starts("b", RetryReason::Unavailable);
        for attempt in 1..=3 {
            g.retried("a", 1, RetryReason::Full, attempt);
        }
        g.retried("b", 1, RetryReason::Unavailable, 1);
        assert_eq!(g.full.load(Relaxed), 3);
        assert_eq!(g.unavailable.load(Relaxed), 1);
        assert_eq!(g.episode_retries.load(Relaxed), 4);
        g.wait_ends(true);
        assert_eq!(g.devices_waiting.load(Relaxed), 1);
        g.wait_ends(true);
        assert_eq!(g.devices_waiting.load(Relaxed), 0);
        // A new episode counts from zero; the totals keep growing.
        g.wait_starts("a", RetryReason::Full);
        g.retried("a", 2, RetryReason::Full, 1);
        assert_eq!(g.episode_retries.load(Relaxed), 1);
        assert_eq!(g.full.load(Relaxed), 4);
    }

    #[test]
    fn a_config_has_no_stream_by_default() {
        let c = MqttConfig::new("127.0.0.1", 1883, "edge-1", F).unwrap();
        assert_eq!(c.stream, None);
        assert_eq!(c.durable_keys_max(), 512 * DURABLE_KEYS_PER_INFLIGHT);
    }
}

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
//! at most once per [`MALFORMED_LOG_INTERVAL_MS`].
//!
//! **Acks.** Acks are manual: a PUBLISH is acked only after the gateway
//! answered that its reading is durable in the outbox (`Committed` or
//! `Duplicate`). `Full` is retried after [`RETRY_MS`] without acking. The session
//! is persistent (`clean_session = false`, a stable client id), so after a
//! crash the broker redelivers everything unacked: nothing acknowledged by
//! the broker to its publisher is lost.
//!
//! **Redelivery and duplicates.** A redelivered message may already be in the
//! outbox (the crash came between the outbox's fsync and the PUBACK). Each
//! device therefore has a *mark*, the highest `ts` made durable, and a reading
//! at or below its device's mark is taken as a redelivery: acked and counted
//! as stale, not forwarded. A mark is written to a small sled store
//! (`marks_dir`) and fsynced *before* the PUBACK is sent, with group commit; at
//! start the marks are read back and raised by the readings still in the
//! outbox, which covers a crash between the outbox's fsync and the mark's. So:
//! - a device must stamp strictly increasing `ts` (the reading's identity is
//!   `(device, ts)` everywhere in Tributary); a reading older than one already
//!   committed is dropped as stale;
//! - a redelivered reading is recognised once its mark is synced, or while it
//!   is still in the outbox; only a crash after the cloud acknowledged its
//!   segment and the deletion was synced, but before the mark's fsync (a few
//!   milliseconds against a Kafka transaction's round trip and another outbox
//!   commit), can duplicate it. Without `marks_dir` marks are only rebuilt from
//!   the outbox, and the window grows to the PUBACK's own delay;
//! - readings without `ts` are stamped on arrival, so their redelivery cannot
//!   be recognised: exactly-once across a crash needs `ts`.
//! - retained messages are re-sent at each subscription; with `ts` they are
//!   recognised as stale, without they are readings again.
//!
//! A copy the broker redelivers while the original is still held (same session
//! and packet id) is dropped: the original's ack acknowledges both.
//!
//! **Order.** rumqttc delivers in order per connection and each device actor
//! has one reading in flight, so a device's readings enter the outbox in the
//! order published. After a crash the broker redelivers the unacked messages
//! first, in their order, then the rest; readings at or below the mark are
//! skipped, so each device's readings still enter the outbox in increasing
//! `ts`, each once.
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
//!   for up to [`MARKS_MAX`] devices.
//! - incoming packets above `packet_bytes_max` break the connection in rumqttc:
//!   set the broker's own limit (mosquitto's `message_size_limit`) at or below it,
//!   or such a message is redelivered forever.
//! - the broker's own in-flight window (mosquitto's `max_inflight_messages`,
//!   20 by default) bounds the throughput to about that many readings per outbox
//!   commit; raise it for high rates.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tributary_cluster::uplink::ReadRequest;

use super::gateway::{GatewayMsg, IngestReply};
use super::GATEWAY_NAME;
use crate::outbox::segment::decode_payload;
use crate::reading::{Metric, Reading, ReadingError, Value, DEVICE_ID_BYTES_MAX};

pub const MQTT_NAME: &str = "tributary.mqtt";

/// How long a device actor waits for the gateway before retrying the same
/// reading (the gateway recognises the retry).
const INGEST_TIMEOUT_MS: u64 = 30_000;
/// The delay before retrying a reading refused as full, or when the gateway
/// is away (restarting).
pub const RETRY_MS: u64 = 50;
/// Malformed messages are logged at most this often, with running totals.
pub const MALFORMED_LOG_INTERVAL_MS: u64 = 5_000;
/// How often idle devices are looked for and the malformed summary is due.
const TICK_MS: u64 = 500;
/// Devices whose mark is remembered; past it, marks of passivated devices are
/// forgotten (only redelivery detection for those devices weakens).
pub const MARKS_MAX: usize = 100_000;
/// sled's page cache for the marks store.
const MARKS_CACHE_BYTES_MAX: u64 = 4 * 1024 * 1024;
/// Bound on one call to the gateway while rebuilding the marks.
const GATEWAY_CALL_MS: u64 = 10_000;
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
    /// Where the devices' marks are kept across crashes; `None` keeps them in
    /// memory only (rebuilt from the outbox at start).
    pub marks_dir: Option<PathBuf>,
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
        };
        config.validate()?;
        Ok(config)
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
    /// Made durable (or found durable) and acked.
    pub committed: u64,
    /// At or below their device's mark: redeliveries, acked and skipped.
    pub stale: u64,
    /// Copies of a message still held, dropped.
    pub redelivered_copies: u64,
    pub bad_topic: u64,
    pub bad_payload: u64,
    pub passivated: u64,
    pub disconnects: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttStatus {
    pub connected: bool,
    pub devices_live: usize,
    pub held: usize,
    pub parked: usize,
    pub stats: MqttStats,
}

/// What the device actor did with a reading.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Durable in the outbox (`Committed` or `Duplicate`); `ts_us` is its ts.
    Durable { ts_us: i64 },
    /// At or below the device's mark: a redelivery.
    Stale,
    /// The gateway refused it for good.
    Refused(String),
}

/// What the poll task reports.
pub enum PollEvent {
    Connected { session_present: bool },
    Subscribed { ok: bool },
    Publish(Publish, OwnedSemaphorePermit),
    Disconnected(String),
}

pub enum MqttMsg {
    Poll(PollEvent),
    Handled {
        device: String,
        token: u64,
        outcome: Outcome,
    },
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
    /// The device's mark: readings with a ts at or below it are stale.
    pub mark_us: i64,
    pub source: ActorRef<MqttMsg>,
}

pub struct MqttDeviceState {
    args: MqttDeviceArgs,
    /// Bounded by the source's held messages (`inflight_max`).
    queue: VecDeque<Queued>,
    /// The head's reading once built, so a retry sends the very same one.
    current: Option<Reading>,
    working: bool,
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
        let token = head.token;
        let mark = state.args.mark_us;
        if state.current.is_none() {
            if head.ts_us.is_some_and(|ts| ts <= mark) {
                state.queue.pop_front();
                finish(&myself, state, token, Outcome::Stale)?;
                return Ok(());
            }
            // Without a ts the edge stamps one, above the mark so it stays unique.
            let ts = head
                .ts_us
                .unwrap_or_else(|| now_us().max(mark.saturating_add(1)));
            state.current = Some(Reading {
                device_id: state.args.device_id.clone(),
                device_ts_us: ts,
                edge_ts_us: 0,
                stream: None,
                metrics: head.metrics.clone(),
            });
        }
        let reading = state.current.clone().expect("built above");
        let ts = reading.device_ts_us;
        let answer = match ractor::registry::where_is(GATEWAY_NAME) {
            Some(cell) => {
                let gateway: ActorRef<GatewayMsg> = cell.into();
                ractor::call_t!(gateway, GatewayMsg::Ingest, INGEST_TIMEOUT_MS, reading).ok()
            }
            None => None,
        };
        let outcome = match answer {
            Some(IngestReply::Committed { .. }) | Some(IngestReply::Duplicate) => {
                state.args.mark_us = state.args.mark_us.max(ts);
                Outcome::Durable { ts_us: ts }
            }
            Some(IngestReply::Invalid(reason)) => Outcome::Refused(reason),
            Some(IngestReply::Full) | None => {
                // Not acked: the broker keeps it; the same reading is retried.
                myself.send_after(Duration::from_millis(RETRY_MS), || DeviceMsg::Work);
                return Ok(());
            }
        };
        state.queue.pop_front();
        state.current = None;
        finish(&myself, state, token, outcome)
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

/// Drives rumqttc's event loop. Takes a permit before each poll so that the
/// source never holds more than `inflight_max` messages; a message carries its
/// permit until acked.
async fn poll_loop(
    mut events: EventLoop,
    source: ActorRef<MqttMsg>,
    permits: Arc<Semaphore>,
    backoff_initial_ms: u64,
    backoff_max_ms: u64,
) {
    let mut delay_ms = backoff_initial_ms;
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let event = match events.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => PollEvent::Publish(p, permit),
            Ok(Event::Incoming(Packet::ConnAck(c))) => {
                delay_ms = backoff_initial_ms;
                PollEvent::Connected {
                    session_present: c.session_present,
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
struct Held {
    publish: Publish,
    /// The session it arrived in: its packet id means nothing in another.
    session: u64,
    _permit: OwnedSemaphorePermit,
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
    poll_task: JoinHandle<()>,
    connected: bool,
    /// Bumped when the broker starts a new session (its packet ids restart).
    session: u64,
    held: HashMap<u64, Held>,
    /// Held QoS 1 messages by (session, packet id), to spot the broker's copies.
    by_pkid: HashMap<(u64, u16), u64>,
    next_token: u64,
    devices: HashMap<String, LiveDevice>,
    marks: HashMap<String, i64>,
    marks_store: Option<sled::Db>,
    /// Durable readings whose PUBACK waits for their marks' fsync.
    awaiting_sync: Vec<u64>,
    sync_scheduled: bool,
    parked: VecDeque<ParkedMsg>,
    stats: MqttStats,
    malformed_logged_at: Option<Instant>,
    malformed_unlogged: bool,
    last_malformed: String,
}

impl MqttSourceState {
    fn status(&self) -> MqttStatus {
        MqttStatus {
            connected: self.connected,
            devices_live: self.devices.len(),
            held: self.held.len(),
            parked: self.parked.len(),
            stats: self.stats.clone(),
        }
    }

    /// Acks (when the session still knows it) and releases a held message.
    fn release(&mut self, token: u64) -> Result<(), ActorProcessingErr> {
        let Some(h) = self.held.remove(&token) else {
            return Ok(());
        };
        if h.publish.qos != QoS::AtMostOnce {
            self.by_pkid.remove(&(h.session, h.publish.pkid));
            // While disconnected the ack would go out on the next connection,
            // perhaps a new session where the packet id names another message;
            // skip it: the broker redelivers and the mark recognises it.
            if h.session == self.session && self.connected {
                self.client
                    .try_ack(&h.publish)
                    .map_err(|e| format!("queueing a PUBACK: {e}"))?;
            }
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

    fn set_mark(&mut self, device: &str, ts: i64) -> Result<(), ActorProcessingErr> {
        let mark = match self.marks.get_mut(device) {
            Some(m) => {
                *m = (*m).max(ts);
                *m
            }
            None => {
                if self.marks.len() >= MARKS_MAX {
                    self.forget_idle_marks()?;
                }
                self.marks.insert(device.to_owned(), ts);
                ts
            }
        };
        if let Some(db) = &self.marks_store {
            db.insert(device.as_bytes(), &mark.to_be_bytes())
                .map_err(|e| format!("writing the mark of {device}: {e}"))?;
        }
        Ok(())
    }

    /// Keeps the marks of live devices only, in memory and on disk.
    fn forget_idle_marks(&mut self) -> Result<(), ActorProcessingErr> {
        let devices = &self.devices;
        self.marks.retain(|d, _| devices.contains_key(d));
        if let Some(db) = &self.marks_store {
            for key in db.iter().keys() {
                let key = key.map_err(|e| format!("reading the marks: {e}"))?;
                let live = std::str::from_utf8(&key).is_ok_and(|d| devices.contains_key(d));
                if !live {
                    db.remove(&key)
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
        if let Some(db) = &self.marks_store {
            // The fsync blocks: let tokio move other tasks off this worker.
            let flush = || db.flush().map(|_| ());
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
            mark_us: self.marks.get(device).copied().unwrap_or(i64::MIN),
            source: myself.clone(),
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
    /// Marks read from the outbox before the uplink could delete anything
    /// (see [`outbox_marks`]); raised further by the live outbox at each start.
    pub outbox_marks: Arc<HashMap<String, i64>>,
}

/// Each device's highest ts among the readings in `outbox`. Called before the
/// edge's actors start, because once the uplink runs, the cloud's Welcome may
/// delete segments whose readings' PUBACKs never reached the broker.
pub fn outbox_marks<T>(
    outbox: &mut crate::outbox::Outbox<T>,
) -> Result<HashMap<String, i64>, crate::outbox::OutboxError> {
    let mut marks = HashMap::new();
    let (mut from, through) = (outbox.acked_through() + 1, outbox.sealed_through());
    while from <= through {
        let frames = outbox.read(from, through, SCAN_SEGMENTS_PER_READ)?;
        let Some(last) = frames.last() else {
            break;
        };
        from = last.seq + 1;
        for f in frames {
            if let Ok(readings) = decode_payload(&f.bytes, f.readings_count) {
                raise_marks(&mut marks, readings);
            }
        }
    }
    Ok(marks)
}

fn raise_marks(marks: &mut HashMap<String, i64>, readings: Vec<Reading>) {
    for r in readings {
        if let Some(m) = marks.get_mut(&r.device_id) {
            *m = (*m).max(r.device_ts_us);
        } else if marks.len() < MARKS_MAX {
            marks.insert(r.device_id, r.device_ts_us);
        }
    }
}

/// Rebuilds the devices' marks from the readings still in the outbox.
async fn recover_marks() -> Result<HashMap<String, i64>, ActorProcessingErr> {
    let gateway: ActorRef<GatewayMsg> = ractor::registry::where_is(GATEWAY_NAME)
        .ok_or("the gateway is not running")?
        .into();
    let status = ractor::call_t!(gateway, GatewayMsg::Status, GATEWAY_CALL_MS)
        .map_err(|e| format!("asking the gateway for its status: {e}"))?;
    let mut marks: HashMap<String, i64> = HashMap::new();
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
                Ok(readings) => raise_marks(&mut marks, readings),
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
    Ok(marks)
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
        let mut marks = (*args.outbox_marks).clone();
        let marks_store = match &config.marks_dir {
            Some(dir) => {
                let db = sled::Config::new()
                    .path(dir)
                    .cache_capacity(MARKS_CACHE_BYTES_MAX)
                    .flush_every_ms(None)
                    .open()
                    .map_err(|e| format!("opening the MQTT marks in {}: {e}", dir.display()))?;
                for kv in db.iter() {
                    let (k, v) = kv.map_err(|e| format!("reading the MQTT marks: {e}"))?;
                    if let (Ok(device), Ok(ts)) = (
                        String::from_utf8(k.to_vec()),
                        <[u8; 8]>::try_from(v.as_ref()),
                    ) {
                        let ts = i64::from_be_bytes(ts);
                        if let Some(m) = marks.get_mut(&device) {
                            *m = (*m).max(ts);
                        } else if marks.len() < MARKS_MAX {
                            marks.insert(device, ts);
                        }
                    }
                }
                Some(db)
            }
            None => None,
        };
        for (device, ts) in recover_marks().await? {
            let m = marks.entry(device).or_insert(ts);
            *m = (*m).max(ts);
        }
        let mut options =
            MqttOptions::new(config.client_id.clone(), config.host.clone(), config.port);
        options
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_keep_alive(Duration::from_millis(config.keep_alive_ms))
            .set_max_packet_size(config.packet_bytes_max, config.packet_bytes_max);
        let (client, events) = AsyncClient::new(options, config.queued_requests_max);
        let permits = Arc::new(Semaphore::new(config.inflight_max));
        let poll_task = tokio::spawn(poll_loop(
            events,
            myself.clone(),
            permits,
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
            client,
            poll_task,
            connected: false,
            session: 0,
            held: HashMap::new(),
            by_pkid: HashMap::new(),
            next_token: 0,
            devices: HashMap::new(),
            marks,
            marks_store,
            awaiting_sync: Vec::new(),
            sync_scheduled: false,
            parked: VecDeque::new(),
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
            MqttMsg::Poll(PollEvent::Connected { session_present }) => {
                state.connected = true;
                if !session_present {
                    state.session += 1;
                }
                // Always (re)subscribe: a kept session may hold another filter
                // from an earlier configuration.
                state
                    .client
                    .try_subscribe(state.config.topic.clone(), QoS::AtLeastOnce)
                    .map_err(|e| format!("queueing the SUBSCRIBE: {e}"))?;
                tracing::info!(session_present, "mqtt connected");
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
                    tracing::warn!(%error, held = state.held.len(), "mqtt connection lost; reconnecting");
                } else {
                    tracing::debug!(%error, "mqtt connection attempt failed");
                }
                state.connected = false;
            }
            MqttMsg::Poll(PollEvent::Publish(publish, permit)) => {
                state.stats.received += 1;
                let qos1 = publish.qos != QoS::AtMostOnce;
                if qos1 && state.by_pkid.contains_key(&(state.session, publish.pkid)) {
                    // The original's ack will acknowledge this copy too.
                    state.stats.redelivered_copies += 1;
                    return Ok(());
                }
                let token = state.next_token;
                state.next_token += 1;
                if qos1 {
                    state.by_pkid.insert((state.session, publish.pkid), token);
                }
                let parsed = parse_message(
                    &state.config.topic,
                    state.config.device_level,
                    &publish.topic,
                    &publish.payload,
                );
                let topic = publish.topic.clone();
                state.held.insert(
                    token,
                    Held {
                        publish,
                        session: state.session,
                        _permit: permit,
                    },
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
            MqttMsg::Handled {
                device,
                token,
                outcome,
            } => {
                let waits_for_sync = match outcome {
                    Outcome::Durable { ts_us } => {
                        state.stats.committed += 1;
                        state.set_mark(&device, ts_us)?;
                        // Queued behind the Handled already in the mailbox, so
                        // one fsync covers them all (group commit).
                        state.awaiting_sync.push(token);
                        if !state.sync_scheduled {
                            state.sync_scheduled = true;
                            myself.send_message(MqttMsg::SyncMarks)?;
                        }
                        true
                    }
                    Outcome::Stale => {
                        state.stats.stale += 1;
                        false
                    }
                    Outcome::Refused(reason) => {
                        let topic = state
                            .held
                            .get(&token)
                            .map(|h| h.publish.topic.clone())
                            .unwrap_or_default();
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
        if let Some(db) = &state.marks_store {
            if let Err(e) = db.flush() {
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
}

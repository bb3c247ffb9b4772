//! The MQTT source's decisions, as a sans-IO state machine in the manner of
//! quinn-proto: inputs through `handle_*`, outputs through `poll_*`, time
//! passed in. No sockets, no actors, no clock: the source actor drives it
//! with what its broker link and the gateway say, and the simulator drives
//! the same core against a simulated broker.
//!
//! - **Invariant:** a message is acknowledged to the broker only once it is
//!   *settled*: its reading is durable (in a segment or in the edge stages'
//!   input log), or it is a redelivery of a durable one, or it is refused
//!   for good (malformed, invalid, a skipped retained message).
//! - **Invariant:** acknowledgements go out in the order the messages
//!   arrived, each on the connection its message came on (or a later copy's);
//!   never on another connection, where its packet id means something else.
//! - **Invariant:** a message is skipped as a redelivery only if it is one:
//!   its packet id, topic and payload match a message made durable in the
//!   same broker session whose acknowledgement was not written on the
//!   connection it arrives on, and (unless `redelivery_requires_dup` is off)
//!   it carries DUP. A reading's key (device, timestamp) is never used.
//! - **Invariant:** each device's readings reach the gateway in the order the
//!   broker delivered them, numbered consecutively; the gateway takes them
//!   in that order or not at all (see `gateway`).
//! - **Bounded:** `inflight_max` messages held; `device_inflight_max` readings
//!   of one device at the gateway; one redelivery record per packet id
//!   (65,535 at most); [`FORWARD_BATCH_MAX`] readings per batch;
//!   `devices_max` device figures.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::config::MqttConfig;
use super::parse::{parse_message, MessageError};
use crate::edge::gateway::{BatchItem, SourceAnswer};
use crate::histogram::Histogram;
use crate::outbox::StateChange;
use crate::reading::Reading;

/// Readings sent to the gateway in one batch at most.
pub const FORWARD_BATCH_MAX: usize = 1024;
/// The delay before resending readings the gateway refused as full.
pub const RETRY_MS: u64 = 50;
/// Malformed messages are logged at most this often, with running totals.
pub const MALFORMED_LOG_INTERVAL_MS: u64 = 5_000;

/// A message as the broker delivered it.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub pkid: u16,
    /// QoS 1 or 2 (acknowledged); QoS 0 is fire and forget.
    pub acked: bool,
    pub dup: bool,
    pub retain: bool,
    pub topic: String,
    pub payload: Bytes,
}

/// What identifies a message's content: SHA-256 of its topic and payload,
/// cut to 128 bits.
pub type ContentHash = [u8; 16];

pub fn content_hash(topic: &str, payload: &[u8]) -> ContentHash {
    let mut h = Sha256::new();
    h.update((topic.len() as u64).to_le_bytes());
    h.update(topic.as_bytes());
    h.update(payload);
    let full = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&full[..16]);
    out
}

/// The record of a durable message, by packet id, in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record {
    generation: u64,
    hash: ContentHash,
    /// The connection its acknowledgement was written on, if it was.
    acked_on: Option<u64>,
}

/// The source's entries in the outbox's state table:
/// - `mqtt/<client id>/gen`: the broker session's generation, u64 LE;
/// - `mqtt/<client id>/p/<packet id u16 BE>`: generation u64 LE, then the
///   content hash (16 bytes) of the last message of that packet id made
///   durable. A packet id is reused by the broker only once its previous
///   message was acknowledged, so one record per packet id is enough.
#[derive(Debug, Clone)]
pub struct RecordKeys {
    prefix: Vec<u8>,
}

impl RecordKeys {
    pub fn new(client_id: &str) -> Self {
        let mut prefix = b"mqtt/".to_vec();
        prefix.extend_from_slice(client_id.as_bytes());
        prefix.push(b'/');
        Self { prefix }
    }

    /// The prefix of every entry of this client, for reading them back.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    pub fn generation(&self) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.extend_from_slice(b"gen");
        k
    }

    pub fn record(&self, pkid: u16) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.extend_from_slice(b"p/");
        k.extend_from_slice(&pkid.to_be_bytes());
        k
    }

    fn pkid_of(&self, key: &[u8]) -> Option<u16> {
        let rest = key
            .strip_prefix(self.prefix.as_slice())?
            .strip_prefix(b"p/")?;
        Some(u16::from_be_bytes(rest.try_into().ok()?))
    }
}

fn encode_record(generation: u64, hash: &ContentHash) -> Vec<u8> {
    let mut v = Vec::with_capacity(24);
    v.extend_from_slice(&generation.to_le_bytes());
    v.extend_from_slice(hash);
    v
}

fn decode_record(v: &[u8]) -> Option<(u64, ContentHash)> {
    let (g, h) = v.split_at_checked(8)?;
    Some((u64::from_le_bytes(g.try_into().ok()?), h.try_into().ok()?))
}

/// The source's counters; they only grow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MqttStats {
    pub received: u64,
    /// Readings made durable (stored, or taken by the edge's stages).
    pub committed: u64,
    /// Redeliveries of durable messages: acknowledged, not forwarded.
    pub redeliveries: u64,
    /// Copies of a message still held (the broker sent it again after a
    /// reconnect): dropped; the original's ack covers them.
    pub redelivered_copies: u64,
    /// Messages with DUP set that match no durable one: taken as new (a
    /// resend of a message that was never durable).
    pub dup_taken: u64,
    /// Retained messages acknowledged and skipped.
    pub retained_skipped: u64,
    /// Devices whose figures were forgotten to stay within `devices_max`.
    pub devices_forgotten: u64,
    pub bad_topic: u64,
    pub bad_payload: u64,
    /// Readings the gateway refused for good (a timestamp too far ahead...).
    pub refused: u64,
    /// Resends after the gateway refused readings as full.
    pub retries_full: u64,
    /// Messages the broker delivered past `inflight_max`: left unacked, to
    /// come again after a reconnect.
    pub overflow_unacked: u64,
    /// Reconnects the source asked for to get those back.
    pub forced_reconnects: u64,
    /// Acks not sent because their connection had ended (the broker
    /// redelivers those messages).
    pub acks_skipped: u64,
    pub disconnects: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttStatus {
    pub connected: bool,
    /// The number of the current (or last) connection, from 1.
    pub connection: u64,
    /// Devices whose figures the source keeps.
    pub devices: usize,
    pub held: usize,
    /// Readings waiting to go to the gateway, and at the gateway.
    pub queued: usize,
    pub at_gateway: usize,
    /// Readings of devices at their in-flight limit, waiting.
    pub device_waiting: usize,
    pub records: usize,
    pub stats: MqttStats,
    /// From a message's arrival to its acknowledgement going out (after its
    /// reading is durable), for every acknowledged message.
    pub ack_latency: Histogram,
}

/// What is known of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceFigures {
    pub first_seen_us: i64,
    pub last_seen_us: i64,
    pub readings: u64,
    /// Readings of it at the gateway or queued for it, not yet durable.
    inflight: usize,
}

#[derive(Debug)]
struct Held<P> {
    pkid: u16,
    acked: bool,
    hash: ContentHash,
    /// The broker session it arrived in (the source's count).
    session: u64,
    /// The record generation at arrival.
    generation: u64,
    /// The connection its ack may go out on (0: none any more).
    connection: u64,
    device: Option<String>,
    /// The reading and its record, kept until durable (for resends).
    item: Option<BatchItem>,
    arrived: Instant,
    permit: P,
}

/// Readings for the gateway: numbers `first_n..`.
#[derive(Debug)]
pub struct Forward {
    pub first_n: u64,
    pub items: Vec<BatchItem>,
}

/// The MQTT source's state; `P` is what a held message keeps until it is
/// acknowledged (the driver's permit).
pub struct MqttCore<P> {
    config: MqttConfig,
    keys: RecordKeys,
    records: HashMap<u16, Record>,
    generation: u64,
    /// Set when the generation changed and must be durable before any
    /// message of the new session is taken.
    generation_unsaved: bool,
    connected: bool,
    connection: u64,
    session: u64,
    held: BTreeMap<u64, Held<P>>,
    by_pkid: HashMap<(u64, u16), u64>,
    releasable: BTreeSet<u64>,
    next_token: u64,
    ready: VecDeque<u64>,
    blocked: HashMap<String, VecDeque<u64>>,
    blocked_len: usize,
    sent: BTreeMap<u64, u64>,
    next_n: u64,
    resend_from: Option<u64>,
    retry_at: Option<Instant>,
    acks: VecDeque<(u64, u16, P)>,
    overflowed: Option<u64>,
    devices: HashMap<String, DeviceFigures>,
    stats: MqttStats,
    ack_latency: Histogram,
    malformed_logged_at: Option<Instant>,
    malformed_unlogged: bool,
    last_malformed: String,
}

impl<P> MqttCore<P> {
    /// A core that knows what the outbox's state table holds for it
    /// (`entries`: every entry under [`RecordKeys::prefix`]).
    pub fn new(config: MqttConfig, entries: &[(Vec<u8>, Vec<u8>)]) -> Self {
        let keys = RecordKeys::new(&config.client_id);
        let generation_key = keys.generation();
        let generation = entries
            .iter()
            .find(|(k, _)| *k == generation_key)
            .and_then(|(_, v)| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map_or(0, u64::from_le_bytes);
        let mut records = HashMap::new();
        let mut damaged = 0;
        for (k, v) in entries {
            if *k == generation_key {
                continue;
            }
            match (keys.pkid_of(k), decode_record(v)) {
                (Some(pkid), Some((g, hash))) if g == generation => {
                    records.insert(
                        pkid,
                        Record {
                            generation: g,
                            hash,
                            acked_on: None,
                        },
                    );
                }
                // Of an earlier broker session: meaningless now.
                (Some(_), Some(_)) => {}
                _ => damaged += 1,
            }
        }
        if damaged > 0 {
            tracing::warn!(
                damaged,
                "mqtt: some redelivery records in the outbox do not decode; ignored"
            );
        }
        Self {
            config,
            keys,
            records,
            generation,
            generation_unsaved: false,
            connected: false,
            connection: 0,
            session: 0,
            held: BTreeMap::new(),
            by_pkid: HashMap::new(),
            releasable: BTreeSet::new(),
            next_token: 0,
            ready: VecDeque::new(),
            blocked: HashMap::new(),
            blocked_len: 0,
            sent: BTreeMap::new(),
            next_n: 0,
            resend_from: None,
            retry_at: None,
            acks: VecDeque::new(),
            overflowed: None,
            devices: HashMap::new(),
            stats: MqttStats::default(),
            ack_latency: Histogram::default(),
            malformed_logged_at: None,
            malformed_unlogged: false,
            last_malformed: String::new(),
        }
    }

    pub fn config(&self) -> &MqttConfig {
        &self.config
    }

    pub fn stats(&self) -> &MqttStats {
        &self.stats
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }

    pub fn device(&self, id: &str) -> Option<DeviceFigures> {
        self.devices.get(id).copied()
    }

    pub fn status(&self) -> MqttStatus {
        MqttStatus {
            connected: self.connected,
            connection: self.connection,
            devices: self.devices.len(),
            held: self.held.len(),
            queued: self.ready.len(),
            at_gateway: self.sent.len(),
            device_waiting: self.blocked_len,
            records: self.records.len(),
            stats: self.stats.clone(),
            ack_latency: self.ack_latency.clone(),
        }
    }

    /// A connection is up. A new broker session (no session present) makes
    /// every record meaningless: the generation moves on, and
    /// [`MqttCore::poll_state`] gives the change to make durable before the
    /// driver hands over any message of that connection.
    pub fn handle_connected(&mut self, connection: u64, session_present: bool) {
        self.connected = true;
        self.connection = connection;
        if !session_present {
            self.session += 1;
            // A generation record comes from the disk; at `u64::MAX` it
            // wraps past 0 ("no record"): the new session forgets every
            // record anyway.
            self.generation = self.generation.checked_add(1).unwrap_or(1);
            self.generation_unsaved = true;
            self.records.clear();
        }
    }

    /// The state change that must be durable before the driver goes on.
    pub fn poll_state(&mut self) -> Option<Vec<StateChange>> {
        if !self.generation_unsaved {
            return None;
        }
        self.generation_unsaved = false;
        Some(vec![(
            self.keys.generation(),
            Some(self.generation.to_le_bytes().to_vec()),
        )])
    }

    pub fn handle_disconnect(&mut self, connection: u64) {
        if self.connected && connection == self.connection {
            self.stats.disconnects += 1;
        }
        self.connected = false;
    }

    /// The broker delivered a message past `inflight_max`; the link left it
    /// unacknowledged (and leaves the rest of this connection's so too).
    /// Once everything held is acknowledged, [`MqttCore::poll_reconnect`]
    /// asks for a new connection, on which the broker sends them again.
    pub fn handle_overflow(&mut self, connection: u64) {
        self.stats.overflow_unacked += 1;
        if self.overflowed != Some(connection) {
            tracing::warn!(
                inflight_max = self.config.inflight_max,
                "mqtt: the broker sends more than the source holds; the excess stays unacked and \
                 comes again after a reconnect (set the broker's in-flight window, Mosquitto's \
                 max_inflight_messages, at or below mqtt_inflight_max)"
            );
        }
        self.overflowed = Some(connection);
    }

    /// Whether the driver should end the connection now (the session is
    /// kept) to get back what was left unacked.
    pub fn poll_reconnect(&mut self) -> bool {
        if self.connected && self.overflowed == Some(self.connection) && self.held.is_empty() {
            self.overflowed = None;
            self.stats.forced_reconnects += 1;
            return true;
        }
        false
    }

    /// A message arrived on `connection`; `now_us` (the edge's clock) stamps
    /// a reading without `ts`.
    pub fn handle_publish(
        &mut self,
        now: Instant,
        now_us: i64,
        connection: u64,
        msg: Message,
        permit: P,
    ) {
        self.stats.received += 1;
        let hash = content_hash(&msg.topic, &msg.payload);
        if msg.acked {
            if let Some(&token) = self.by_pkid.get(&(self.session, msg.pkid)) {
                if let Some(h) = self.held.get_mut(&token) {
                    if h.hash == hash {
                        // The broker sent it again on a new connection of
                        // the session: the original's ack goes there.
                        h.connection = h.connection.max(connection);
                        self.stats.redelivered_copies += 1;
                        return;
                    }
                    // The packet id names another message now: the held
                    // one's ack would acknowledge the wrong one.
                    tracing::warn!(
                        pkid = msg.pkid,
                        "mqtt: the broker reused the packet id of a message still held; \
                         that message will not be acked (the broker redelivers it)"
                    );
                    h.connection = 0;
                }
            }
        }
        let token = self.next_token;
        self.next_token += 1;
        let mut held = Held {
            pkid: msg.pkid,
            acked: msg.acked,
            hash,
            session: self.session,
            generation: self.generation,
            connection,
            device: None,
            item: None,
            arrived: now,
            permit,
        };
        if msg.acked {
            self.by_pkid.insert((self.session, msg.pkid), token);
            if self.is_redelivery(&msg, &hash, connection) {
                self.stats.redeliveries += 1;
                tracing::trace!(
                    pkid = msg.pkid,
                    dup = msg.dup,
                    "mqtt: redelivery of a durable message acked, not forwarded"
                );
                self.held.insert(token, held);
                self.release(now, token);
                return;
            }
            if msg.dup {
                self.stats.dup_taken += 1;
            }
        }
        if msg.retain && !self.config.take_retained {
            self.stats.retained_skipped += 1;
            self.held.insert(token, held);
            self.release(now, token);
            return;
        }
        match parse_message(
            &self.config.topic,
            self.config.device_level,
            &msg.topic,
            &msg.payload,
        ) {
            Err(e) => {
                self.count_malformed(&e);
                self.malformed(now, &msg.topic, &e);
                self.held.insert(token, held);
                self.release(now, token);
            }
            Ok(p) => {
                let reading = Reading {
                    device_id: p.device_id.clone(),
                    device_ts_us: p.ts_us.unwrap_or(now_us),
                    edge_ts_us: 0,
                    stream: self.config.stream.clone(),
                    metrics: p.metrics,
                };
                let state = if msg.acked {
                    vec![(
                        self.keys.record(msg.pkid),
                        Some(encode_record(self.generation, &hash)),
                    )]
                } else {
                    Vec::new()
                };
                held.item = Some(BatchItem { reading, state });
                let figures = self.touch_device(&p.device_id, now_us);
                let free = figures.inflight < self.config.device_inflight_max
                    && !self.blocked.contains_key(&p.device_id);
                held.device = Some(p.device_id.clone());
                self.held.insert(token, held);
                if free {
                    self.ready.push_back(token);
                    if let Some(d) = self.devices.get_mut(&p.device_id) {
                        d.inflight += 1;
                    }
                } else {
                    self.blocked
                        .entry(p.device_id)
                        .or_default()
                        .push_back(token);
                    self.blocked_len += 1;
                }
            }
        }
    }

    fn is_redelivery(&self, msg: &Message, hash: &ContentHash, connection: u64) -> bool {
        let Some(r) = self.records.get(&msg.pkid) else {
            return false;
        };
        // A broker resends only on a later connection than the one that
        // carried the ack: on that one, the packet id is a new message.
        r.generation == self.generation
            && r.hash == *hash
            && r.acked_on != Some(connection)
            && (msg.dup || !self.config.redelivery_requires_dup)
    }

    fn touch_device(&mut self, id: &str, now_us: i64) -> DeviceFigures {
        if !self.devices.contains_key(id) && self.devices.len() >= self.config.devices_max {
            self.forget_devices();
        }
        let d = self.devices.entry(id.to_owned()).or_insert(DeviceFigures {
            first_seen_us: now_us,
            last_seen_us: now_us,
            readings: 0,
            inflight: 0,
        });
        d.last_seen_us = now_us;
        d.readings += 1;
        *d
    }

    /// Forgets the least recently seen 1/16 of the devices with nothing in
    /// flight (they cost only their figures): in bulk, so that a stream of
    /// new device ids (a misconfigured or hostile publisher) costs a
    /// constant amount of work per message, not a scan of the table each.
    fn forget_devices(&mut self) {
        let mut idle: Vec<(i64, String)> = self
            .devices
            .iter()
            .filter(|(_, d)| d.inflight == 0)
            .map(|(k, d)| (d.last_seen_us, k.clone()))
            .collect();
        let n = (self.config.devices_max / 16).max(1).min(idle.len());
        if n == 0 {
            return;
        }
        idle.select_nth_unstable_by_key(n - 1, |(t, _)| *t);
        for (_, k) in idle.into_iter().take(n) {
            self.devices.remove(&k);
        }
        self.stats.devices_forgotten += n as u64;
    }

    /// What the gateway said about readings this core sent.
    pub fn handle_answer(&mut self, now: Instant, answer: SourceAnswer) {
        match answer {
            SourceAnswer::Durable { through_n } => {
                let done: Vec<(u64, u64)> = self
                    .sent
                    .range(..=through_n)
                    .map(|(n, t)| (*n, *t))
                    .collect();
                for (n, token) in done {
                    self.sent.remove(&n);
                    self.stats.committed += 1;
                    self.settle(now, token, true);
                }
            }
            SourceAnswer::Invalid { n, reason } => {
                if let Some(token) = self.sent.remove(&n) {
                    self.stats.refused += 1;
                    let topic = self
                        .held
                        .get(&token)
                        .and_then(|h| h.device.clone())
                        .unwrap_or_default();
                    self.malformed(now, &topic, &format!("refused by the gateway: {reason}"));
                    self.settle(now, token, false);
                }
            }
            SourceAnswer::Retry { from_n, full } => {
                if self.sent.contains_key(&from_n) {
                    // The gateway's next number only grows: the latest
                    // refusal says the most (an older one may arrive late,
                    // after the gateway took more).
                    self.resend_from = Some(self.resend_from.map_or(from_n, |r| r.max(from_n)));
                    if full {
                        self.stats.retries_full += 1;
                        self.retry_at = Some(now + Duration::from_millis(RETRY_MS));
                    }
                }
            }
        }
    }

    /// The gateway could not be reached: everything at it goes again later.
    pub fn handle_gateway_away(&mut self, now: Instant) {
        if let Some((&first, _)) = self.sent.first_key_value() {
            self.resend_from = Some(first);
            self.retry_at = Some(now + Duration::from_millis(RETRY_MS));
        }
    }

    /// A reading is done with: durable, or refused for good.
    fn settle(&mut self, now: Instant, token: u64, durable: bool) {
        let Some(h) = self.held.get_mut(&token) else {
            return;
        };
        h.item = None;
        let (pkid, hash, generation, acked) = (h.pkid, h.hash, h.generation, h.acked);
        if let Some(device) = h.device.clone() {
            self.device_done(&device);
        }
        if durable && acked && generation == self.generation {
            self.records.insert(
                pkid,
                Record {
                    generation,
                    hash,
                    acked_on: None,
                },
            );
        }
        self.release(now, token);
    }

    /// One reading of `device` left the gateway: the next waiting one of
    /// that device may go.
    fn device_done(&mut self, device: &str) {
        if let Some(d) = self.devices.get_mut(device) {
            d.inflight = d.inflight.saturating_sub(1);
        }
        let next = match self.blocked.get_mut(device) {
            Some(q) => {
                let next = q.pop_front();
                if q.is_empty() {
                    self.blocked.remove(device);
                }
                next
            }
            None => None,
        };
        if let Some(token) = next {
            self.blocked_len -= 1;
            self.ready.push_back(token);
            if let Some(d) = self.devices.get_mut(device) {
                d.inflight += 1;
            }
        }
    }

    /// Marks a held message ready to acknowledge; it and any younger ones
    /// already ready are acknowledged once every older one is (Mosquitto
    /// 2.0.11 reorders a session's deliveries when PUBACKs come out of order).
    fn release(&mut self, now: Instant, token: u64) {
        self.releasable.insert(token);
        while let Some(oldest) = self.held.keys().next().copied() {
            if !self.releasable.remove(&oldest) {
                break;
            }
            let Some(h) = self.held.remove(&oldest) else {
                break;
            };
            if !h.acked {
                continue;
            }
            let key = (h.session, h.pkid);
            if self.by_pkid.get(&key) == Some(&oldest) {
                self.by_pkid.remove(&key);
            }
            if self.connected && h.connection == self.connection && h.session == self.session {
                if let Some(r) = self.records.get_mut(&h.pkid) {
                    if r.hash == h.hash {
                        r.acked_on = Some(h.connection);
                    }
                }
                let waited = now.saturating_duration_since(h.arrived);
                self.ack_latency
                    .record_us(waited.as_micros().min(u64::MAX as u128) as u64);
                self.acks.push_back((h.connection, h.pkid, h.permit));
            } else {
                // Its packet id means nothing on the current connection;
                // the broker redelivers it there, and its record knows it.
                self.stats.acks_skipped += 1;
            }
        }
    }

    /// The next acknowledgement to send: (connection, packet id), with the
    /// message's permit, which the link may keep until the ack is written.
    pub fn poll_ack(&mut self) -> Option<(u64, u16, P)> {
        self.acks.pop_front()
    }

    /// The next readings for the gateway, if any may go at `now`: first what
    /// the gateway asked to have again, then new ones.
    pub fn poll_forward(&mut self, now: Instant) -> Option<Forward> {
        if self.retry_at.is_some_and(|t| now < t) {
            return None;
        }
        self.retry_at = None;
        if let Some(from) = self.resend_from.take() {
            // What is at the gateway from `from` on, under the numbers it was
            // sent with: a run of consecutive numbers, at most a batch; the
            // rest (past a batch, or past a gap left by a reading refused
            // for good) goes with the next call.
            let mut items = Vec::new();
            let mut first_n = None;
            for (&n, token) in self.sent.range(from..) {
                let next = first_n.map(|f: u64| f + items.len() as u64);
                if items.len() >= FORWARD_BATCH_MAX || next.is_some_and(|e| e != n) {
                    self.resend_from = Some(n);
                    break;
                }
                let Some(item) = self.held.get(token).and_then(|h| h.item.clone()) else {
                    debug_assert!(false, "a reading at the gateway is held with its item");
                    self.resend_from = Some(n + 1);
                    break;
                };
                first_n.get_or_insert(n);
                items.push(item);
            }
            if let Some(first_n) = first_n {
                return Some(Forward { first_n, items });
            }
        }
        let first_n = self.next_n;
        let mut items = Vec::new();
        while items.len() < FORWARD_BATCH_MAX {
            let Some(token) = self.ready.pop_front() else {
                break;
            };
            let Some(h) = self.held.get_mut(&token) else {
                continue;
            };
            let Some(item) = &h.item else {
                continue;
            };
            let n = self.next_n;
            self.next_n += 1;
            items.push(item.clone());
            self.sent.insert(n, token);
        }
        (!items.is_empty()).then_some(Forward { first_n, items })
    }

    /// When the core wants to be driven again (a resend after a refusal).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.retry_at
    }

    fn malformed(&mut self, now: Instant, topic: &str, problem: &dyn std::fmt::Display) {
        self.last_malformed = format!("{}: {problem}", topic.chars().take(200).collect::<String>());
        self.malformed_unlogged = true;
        self.log_malformed(now, false);
    }

    /// Counts a malformed message by what was wrong with it.
    fn count_malformed(&mut self, e: &MessageError) {
        if e.is_topic() {
            self.stats.bad_topic += 1;
        } else {
            self.stats.bad_payload += 1;
        }
    }

    /// Logs the malformed messages' running totals, at most once per
    /// [`MALFORMED_LOG_INTERVAL_MS`]; `tick` marks the periodic summary.
    pub fn log_malformed(&mut self, now: Instant, tick: bool) {
        let due = self.malformed_logged_at.is_none_or(|at| {
            now.saturating_duration_since(at) >= Duration::from_millis(MALFORMED_LOG_INTERVAL_MS)
        });
        if !self.malformed_unlogged || !due {
            return;
        }
        self.malformed_unlogged = false;
        self.malformed_logged_at = Some(now);
        tracing::warn!(
            bad_payload_total = self.stats.bad_payload,
            bad_topic_total = self.stats.bad_topic,
            refused_total = self.stats.refused,
            last = %self.last_malformed,
            summary = tick,
            "mqtt: malformed or refused messages acked and dropped (logged at most every {MALFORMED_LOG_INTERVAL_MS} ms)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::reading::Value;

    const F: &str = "p/+/t";

    fn config() -> MqttConfig {
        let mut c = MqttConfig::new("127.0.0.1", 1883, "edge-1", F).unwrap();
        c.device_inflight_max = 3;
        c
    }

    fn msg(pkid: u16, device: &str, payload: &str, dup: bool) -> Message {
        Message {
            pkid,
            acked: true,
            dup,
            retain: false,
            topic: format!("p/{device}/t"),
            payload: Bytes::from(payload.to_owned()),
        }
    }

    fn forward_all(core: &mut MqttCore<()>, now: Instant) -> Vec<Forward> {
        std::iter::from_fn(|| core.poll_forward(now)).collect()
    }

    fn acks(core: &mut MqttCore<()>) -> Vec<(u64, u16)> {
        std::iter::from_fn(|| core.poll_ack().map(|(c, p, ())| (c, p))).collect()
    }

    /// The record the gateway would have made durable with a reading.
    fn records_of(forwards: &[Forward]) -> Vec<(Vec<u8>, Vec<u8>)> {
        forwards
            .iter()
            .flat_map(|f| f.items.iter())
            .flat_map(|i| i.state.iter())
            .filter_map(|(k, v)| v.clone().map(|v| (k.clone(), v)))
            .collect()
    }

    #[test]
    fn two_readings_of_one_device_in_one_millisecond_are_both_taken() {
        let mut core = MqttCore::new(config(), &[]);
        let now = Instant::now();
        core.handle_connected(1, false);
        core.handle_publish(now, 0, 1, msg(1, "d", r#"{"ts": 5, "v": 1}"#, false), ());
        core.handle_publish(now, 0, 1, msg(2, "d", r#"{"ts": 5, "v": 2}"#, false), ());
        // Even byte-identical payloads are two messages: two packet ids.
        core.handle_publish(now, 0, 1, msg(3, "d", r#"{"ts": 5, "v": 2}"#, false), ());
        let f = forward_all(&mut core, now);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].first_n, 0);
        assert_eq!(f[0].items.len(), 3);
        assert!(f[0].items.iter().all(|i| i.reading.device_ts_us == 5_000));
        assert!(acks(&mut core).is_empty(), "no ack before durable");
        core.handle_answer(now, SourceAnswer::Durable { through_n: 2 });
        assert_eq!(acks(&mut core), [(1, 1), (1, 2), (1, 3)]);
        assert_eq!(core.stats().committed, 3);
    }

    #[test]
    fn after_a_crash_only_a_resend_of_a_durable_message_is_skipped() {
        let now = Instant::now();
        let mut before = MqttCore::new(config(), &[]);
        before.handle_connected(1, false);
        let generation = before.poll_state().unwrap();
        before.handle_publish(now, 0, 1, msg(7, "d", r#"{"ts": 5, "v": 1}"#, false), ());
        let f = forward_all(&mut before, now);
        // The batch became durable (records with it); the crash came before
        // the answer, so no ack went out.
        let mut entries = records_of(&f);
        entries.push((generation[0].0.clone(), generation[0].1.clone().unwrap()));
        let mut after: MqttCore<()> = MqttCore::new(config(), &entries);
        after.handle_connected(1, true);
        assert!(after.poll_state().is_none(), "same session");
        // The broker resends it: same id, same content, DUP.
        after.handle_publish(now, 0, 1, msg(7, "d", r#"{"ts": 5, "v": 1}"#, true), ());
        assert_eq!(after.stats().redeliveries, 1);
        assert!(forward_all(&mut after, now).is_empty());
        assert_eq!(acks(&mut after), [(1, 7)], "acked at once: it is durable");
        // Same id, other content: the broker reused the id, a new message.
        after.handle_publish(now, 0, 1, msg(8, "d", r#"{"ts": 5, "v": 9}"#, true), ());
        after.handle_publish(now, 0, 1, msg(7, "d", r#"{"ts": 6, "v": 2}"#, true), ());
        assert_eq!(forward_all(&mut after, now)[0].items.len(), 2);
        assert_eq!(after.stats().dup_taken, 2);
    }

    #[test]
    fn the_same_bytes_without_dup_or_on_the_ack_s_connection_are_a_new_message() {
        let now = Instant::now();
        let mut core = MqttCore::new(config(), &[]);
        core.handle_connected(1, false);
        core.handle_publish(now, 0, 1, msg(1, "d", r#"{"v": 1}"#, false), ());
        forward_all(&mut core, now);
        core.handle_answer(now, SourceAnswer::Durable { through_n: 0 });
        assert_eq!(acks(&mut core), [(1, 1)]);
        // The broker got the ack and reused id 1 for the same payload (a
        // device with a constant value and no ts): a new reading.
        core.handle_publish(now, 0, 1, msg(1, "d", r#"{"v": 1}"#, true), ());
        assert_eq!(
            forward_all(&mut core, now).len(),
            1,
            "on the ack's connection"
        );
        core.handle_answer(now, SourceAnswer::Durable { through_n: 1 });
        acks(&mut core);
        core.handle_disconnect(1);
        core.handle_connected(2, true);
        core.handle_publish(now, 0, 2, msg(1, "d", r#"{"v": 1}"#, false), ());
        assert_eq!(forward_all(&mut core, now).len(), 1, "without DUP");
        assert_eq!(core.stats().redeliveries, 0);
    }

    #[test]
    fn a_copy_of_a_held_message_moves_its_ack_to_the_new_connection() {
        let now = Instant::now();
        let mut core = MqttCore::new(config(), &[]);
        core.handle_connected(1, false);
        core.handle_publish(now, 0, 1, msg(4, "d", r#"{"v": 1}"#, false), ());
        forward_all(&mut core, now);
        core.handle_disconnect(1);
        core.handle_connected(2, true);
        core.handle_publish(now, 0, 2, msg(4, "d", r#"{"v": 1}"#, true), ());
        assert_eq!(core.stats().redelivered_copies, 1);
        assert!(forward_all(&mut core, now).is_empty());
        core.handle_answer(now, SourceAnswer::Durable { through_n: 0 });
        assert_eq!(acks(&mut core), [(2, 4)]);
    }

    #[test]
    fn acks_go_out_in_arrival_order_and_never_on_an_ended_connection() {
        let now = Instant::now();
        let mut core = MqttCore::new(config(), &[]);
        core.handle_connected(1, false);
        core.handle_publish(now, 0, 1, msg(1, "a", r#"{"v": 1}"#, false), ());
        core.handle_publish(now, 0, 1, msg(2, "b", "not json", false), ());
        core.handle_publish(now, 0, 1, msg(3, "c", r#"{"v": 1}"#, false), ());
        assert!(
            acks(&mut core).is_empty(),
            "the malformed one waits for the first"
        );
        forward_all(&mut core, now);
        core.handle_answer(now, SourceAnswer::Durable { through_n: 0 });
        assert_eq!(acks(&mut core), [(1, 1), (1, 2)]);
        core.handle_disconnect(1);
        core.handle_answer(now, SourceAnswer::Durable { through_n: 1 });
        assert!(acks(&mut core).is_empty());
        assert_eq!(core.stats().acks_skipped, 1);
        assert_eq!(core.stats().bad_payload, 1);
    }

    #[test]
    fn a_refusal_resends_the_same_readings_under_the_same_numbers() {
        let now = Instant::now();
        let mut core = MqttCore::new(config(), &[]);
        core.handle_connected(1, false);
        for i in 0..3 {
            core.handle_publish(
                now,
                0,
                1,
                msg(i + 1, &format!("d{i}"), r#"{"v": 1}"#, false),
                (),
            );
        }
        let first = forward_all(&mut core, now);
        core.handle_answer(now, SourceAnswer::Durable { through_n: 0 });
        core.handle_answer(
            now,
            SourceAnswer::Retry {
                from_n: 1,
                full: true,
            },
        );
        assert!(core.poll_forward(now).is_none(), "waits RETRY_MS");
        let later = now + Duration::from_millis(RETRY_MS);
        let again = forward_all(&mut core, later);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].first_n, 1);
        assert_eq!(again[0].items.len(), 2);
        assert_eq!(again[0].items[0].reading, first[0].items[1].reading);
        // New readings continue the numbering.
        core.handle_publish(later, 0, 1, msg(9, "e", r#"{"v": 1}"#, false), ());
        assert_eq!(forward_all(&mut core, later)[0].first_n, 3);
        assert_eq!(core.stats().retries_full, 1);
    }

    #[test]
    fn a_chatty_device_waits_for_its_own_readings_not_the_others() {
        let now = Instant::now();
        let mut core = MqttCore::new(config(), &[]);
        core.handle_connected(1, false);
        for i in 0..5 {
            core.handle_publish(
                now,
                0,
                1,
                msg(i + 1, "loud", &format!(r#"{{"v": {i}}}"#), false),
                (),
            );
        }
        core.handle_publish(now, 0, 1, msg(6, "quiet", r#"{"v": 1}"#, false), ());
        let f = forward_all(&mut core, now);
        let devices: Vec<&str> = f[0]
            .items
            .iter()
            .map(|i| i.reading.device_id.as_str())
            .collect();
        assert_eq!(devices, ["loud", "loud", "loud", "quiet"]);
        assert_eq!(core.status().device_waiting, 2);
        core.handle_answer(now, SourceAnswer::Durable { through_n: 1 });
        let f = forward_all(&mut core, now);
        let vs: Vec<String> = f[0]
            .items
            .iter()
            .map(|i| format!("{:?}", i.reading.metrics[0].value))
            .collect();
        assert_eq!(vs, ["I64(3)", "I64(4)"], "in order");
    }

    #[test]
    fn a_new_broker_session_forgets_every_record() {
        let now = Instant::now();
        let mut core = MqttCore::new(config(), &[]);
        core.handle_connected(1, false);
        let g1 = core.poll_state().unwrap();
        core.handle_publish(now, 0, 1, msg(1, "d", r#"{"v": 1}"#, false), ());
        forward_all(&mut core, now);
        core.handle_answer(now, SourceAnswer::Durable { through_n: 0 });
        core.handle_disconnect(1);
        // The broker lost the session: its packet ids start over.
        core.handle_connected(2, false);
        let g2 = core.poll_state().unwrap();
        assert_ne!(g1, g2);
        core.handle_publish(now, 0, 2, msg(1, "d", r#"{"v": 1}"#, true), ());
        assert_eq!(forward_all(&mut core, now).len(), 1, "not a redelivery");
    }

    #[test]
    fn an_overflow_asks_for_a_reconnect_once_everything_held_is_acked() {
        let now = Instant::now();
        let mut core = MqttCore::new(config(), &[]);
        core.handle_connected(1, false);
        core.handle_publish(now, 0, 1, msg(1, "d", r#"{"v": 1}"#, false), ());
        core.handle_overflow(1);
        assert!(!core.poll_reconnect(), "one is still held");
        forward_all(&mut core, now);
        core.handle_answer(now, SourceAnswer::Durable { through_n: 0 });
        assert!(core.poll_reconnect());
        assert!(!core.poll_reconnect(), "once");
    }

    #[test]
    fn retained_messages_and_qos0_are_handled() {
        let now = Instant::now();
        let mut core = MqttCore::new(config(), &[]);
        core.handle_connected(1, false);
        let mut retained = msg(1, "d", r#"{"v": 1}"#, false);
        retained.retain = true;
        core.handle_publish(now, 0, 1, retained, ());
        assert_eq!(acks(&mut core), [(1, 1)]);
        assert_eq!(core.stats().retained_skipped, 1);
        let mut q0 = msg(0, "d", r#"{"v": 2}"#, false);
        q0.acked = false;
        core.handle_publish(now, 77, 1, q0, ());
        let f = forward_all(&mut core, now);
        assert!(f[0].items[0].state.is_empty(), "no record for QoS 0");
        assert_eq!(f[0].items[0].reading.device_ts_us, 77, "stamped on arrival");
        core.handle_answer(now, SourceAnswer::Durable { through_n: 0 });
        assert!(acks(&mut core).is_empty(), "QoS 0 is never acked");
        assert_eq!(core.held(), 0);
    }

    #[test]
    fn a_late_refusal_never_relabels_the_readings_it_resends() {
        let now = Instant::now();
        let mut core = MqttCore::new(config(), &[]);
        core.handle_connected(1, false);
        for i in 0..10u16 {
            let d = format!("d{}", i % 5);
            core.handle_publish(
                now,
                0,
                1,
                msg(i + 1, &d, &format!(r#"{{"v": {i}}}"#), false),
                (),
            );
        }
        assert_eq!(forward_all(&mut core, now)[0].items.len(), 10);
        // What a gateway said, in the order a source can hear it: a refusal
        // at 2, then (after a resend) durable through 4 and a refusal at 5,
        // with the stale gap refusal at 2 of a batch sent before the resend.
        core.handle_answer(
            now,
            SourceAnswer::Retry {
                from_n: 2,
                full: true,
            },
        );
        core.handle_answer(now, SourceAnswer::Durable { through_n: 4 });
        core.handle_answer(
            now,
            SourceAnswer::Retry {
                from_n: 2,
                full: false,
            },
        );
        core.handle_answer(
            now,
            SourceAnswer::Retry {
                from_n: 5,
                full: true,
            },
        );
        // A reading refused for good leaves a gap in the numbers.
        core.handle_answer(
            now,
            SourceAnswer::Invalid {
                n: 7,
                reason: "no".into(),
            },
        );
        let later = now + Duration::from_millis(RETRY_MS);
        let f = forward_all(&mut core, later);
        let v = |i: &BatchItem| format!("{:?}", i.reading.metrics[0].value);
        assert_eq!(f[0].first_n, 5);
        assert_eq!(
            f[0].items.iter().map(v).collect::<Vec<_>>(),
            ["I64(5)", "I64(6)"]
        );
        assert_eq!(f[1].first_n, 8, "past the gap, under its own numbers");
        assert_eq!(
            f[1].items.iter().map(v).collect::<Vec<_>>(),
            ["I64(8)", "I64(9)"]
        );
    }

    /// A small deterministic generator for the model test.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    /// The core against a model gateway that takes readings strictly in
    /// order, refuses at random (full, or invalid), commits at random and
    /// answers late, and a broker that cuts the connection and resends
    /// everything unacknowledged with DUP: whatever happens, a number the
    /// gateway took always names the same reading, every reading is taken
    /// once, and what the broker counts as acknowledged was taken first.
    #[test]
    fn the_core_against_a_model_gateway_and_broker() {
        for seed in 0..40u64 {
            let mut rng = Lcg(seed);
            let mut core: MqttCore<()> = MqttCore::new(config(), &[]);
            let mut now = Instant::now();
            let mut connection = 1;
            core.handle_connected(connection, false);
            // Broker: messages by pkid, unacked in flight, in order.
            let mut published: Vec<String> = Vec::new();
            let mut inflight: VecDeque<(u16, usize)> = VecDeque::new();
            let mut broker_acked = std::collections::BTreeSet::new();
            // Gateway: number -> payload taken; answers not yet delivered.
            let mut taken: BTreeMap<u64, String> = BTreeMap::new();
            let mut next_n = 0u64;
            let mut uncommitted: Vec<u64> = Vec::new();
            let mut answers: VecDeque<SourceAnswer> = VecDeque::new();
            let mut invalid = std::collections::BTreeSet::new();
            for step in 0..400 {
                now += Duration::from_millis(10);
                match rng.next(10) {
                    0..=4 if published.len() < 150 => {
                        let k = published.len();
                        let payload = format!(r#"{{"v": {k}}}"#);
                        published.push(payload.clone());
                        let pkid = (k % 65_535 + 1) as u16;
                        inflight.push_back((pkid, k));
                        core.handle_publish(
                            now,
                            0,
                            connection,
                            msg(pkid, "d", &payload, false),
                            (),
                        );
                    }
                    4 => {
                        // A cut: the broker resends what is unacked, with DUP.
                        core.handle_disconnect(connection);
                        connection += 1;
                        core.handle_connected(connection, true);
                        for &(pkid, k) in inflight.clone().iter() {
                            core.handle_publish(
                                now,
                                0,
                                connection,
                                msg(pkid, "d", &published[k], true),
                                (),
                            );
                        }
                    }
                    5..=7 => {
                        if let Some(through) = uncommitted.iter().max().copied() {
                            answers.push_back(SourceAnswer::Durable { through_n: through });
                            uncommitted.clear();
                        }
                    }
                    _ => {}
                }
                while let Some(f) = core.poll_forward(now) {
                    if f.first_n > next_n {
                        answers.push_back(SourceAnswer::Retry {
                            from_n: next_n,
                            full: false,
                        });
                        continue;
                    }
                    for (i, item) in f.items.iter().enumerate() {
                        let n = f.first_n + i as u64;
                        let payload = format!(
                            r#"{{"v": {}}}"#,
                            match &item.reading.metrics[0].value {
                                Value::I64(v) => *v,
                                other => panic!("{other:?}"),
                            }
                        );
                        if n < next_n {
                            if let Some(p) = taken.get(&n) {
                                assert_eq!(
                                    *p, payload,
                                    "seed {seed} step {step}: number {n} relabelled"
                                );
                            }
                            continue;
                        }
                        match rng.next(12) {
                            0 => {
                                answers.push_back(SourceAnswer::Retry {
                                    from_n: n,
                                    full: true,
                                });
                                break;
                            }
                            1 => {
                                invalid.insert(payload.clone());
                                next_n = n + 1;
                                answers.push_back(SourceAnswer::Invalid {
                                    n,
                                    reason: "model".into(),
                                });
                            }
                            _ => {
                                assert!(
                                    !taken.values().any(|p| *p == payload),
                                    "seed {seed} step {step}: {payload} taken twice"
                                );
                                taken.insert(n, payload);
                                uncommitted.push(n);
                                next_n = n + 1;
                            }
                        }
                    }
                }
                // Answers arrive late, a few at a time, in order.
                for _ in 0..rng.next(4) {
                    if let Some(a) = answers.pop_front() {
                        core.handle_answer(now, a);
                    }
                }
                while let Some((c, pkid, ())) = core.poll_ack() {
                    if c == connection {
                        if let Some(i) = inflight.iter().position(|(p, _)| *p == pkid) {
                            let (_, k) = inflight.remove(i).expect("present");
                            broker_acked.insert(k);
                        }
                    }
                }
                for k in &broker_acked {
                    let p = &published[*k];
                    let durable = taken
                        .iter()
                        .any(|(n, t)| t == p && !uncommitted.contains(n));
                    assert!(
                        durable || invalid.contains(p),
                        "seed {seed} step {step}: {p} acked to the broker before it was durable"
                    );
                }
            }
        }
    }

    #[test]
    fn device_figures_stay_within_devices_max_in_bulk() {
        let now = Instant::now();
        let mut c = config();
        c.devices_max = 32;
        let mut core = MqttCore::new(c, &[]);
        core.handle_connected(1, false);
        for i in 0..200u16 {
            core.handle_publish(
                now,
                i as i64,
                1,
                msg(i + 1, &format!("d{i}"), r#"{"v": 1}"#, false),
                (),
            );
            let f = forward_all(&mut core, now);
            for f in f {
                let through_n = f.first_n + f.items.len() as u64 - 1;
                core.handle_answer(now, SourceAnswer::Durable { through_n });
            }
            assert!(core.status().devices <= 32);
        }
        assert!(core.stats().devices_forgotten >= 168);
        assert!(core.device("d199").is_some(), "the newest is kept");
        assert!(core.device("d0").is_none(), "the oldest went first");
    }
}

//! A simulated MQTT broker, and the link an edge's real [`MqttSource`]
//! reaches it through, in place of [`TcpBroker`].
//!
//! One [`Broker`] per MQTT-fed edge lives in the world, outside the edge's
//! turmoil host (shared as `Arc<Mutex<..>>`), so a crash and restart of the
//! edge reconnects to the same session, as it would to a Mosquitto that kept
//! running. Everything is driven by simulated time (the driver calls
//! [`Broker::advance`] before every step) and one seeded rng; ordered maps
//! only. It behaves like a real broker where exactly-once depends on it:
//! - **Persistent session** per client id (`clean_session = false`): the
//!   subscription, the queue and the in-flight messages outlive connections
//!   and edge crashes; CONNACK says `session_present` once it exists. A new
//!   connection of the client takes the session over and ends the old one
//!   [MQTT-3.1.4-2].
//! - **Publishers**: simulated devices publish QoS 1 JSON,
//!   `{"ts": <ms>, "n": <per-device seq>, "v": <f64>}` on
//!   `<prefix>/<device>/telemetry`, in bursts of 1 to `burst_max` messages
//!   sharing one `ts`. A message is *accepted* when it is queued for the
//!   session (a matching subscription exists): every accepted message must
//!   reach the log once, in order. The queue is bounded; a publish past the
//!   bound is refused and counted ([`BrokerStats::refused_queue_full`]), and
//!   never counted as accepted, so the check knows.
//! - **Packet ids** as Mosquitto assigns them: a per-session counter
//!   1..=65535 that wraps, skipping ids still in flight. Delivery is in
//!   order, within an in-flight window (`max_inflight_messages`); with
//!   `refill_on_ack` every PUBACK lets a whole window more out, whatever is
//!   in flight (the Mosquitto 2.0.11 behaviour that puts more in flight than
//!   the source holds).
//! - **Redelivery**: on a connection of an existing session, every unacked
//!   in-flight message is sent first, with DUP=1 and its original packet id,
//!   then the queue goes on.
//! - **Acks count only on their connection**: a PUBACK travels `latency_ms`;
//!   if its connection has ended by then it is ignored.
//! - **Cuts** ([`Broker::set_cut`]): the connection ends at once (what was on
//!   the wire to the edge, and acks on their way back, are lost) and no new
//!   one is accepted until the cut ends.
//!
//! The link ([`SimConnector`]) polls the broker every simulated millisecond.
//! It takes a permit per delivered message; out of permits it holds
//! deliveries back (the broker's sends wait on the wire, as in TCP), or, as
//! an `overflow` link, reads the message anyway, leaves it unacked and
//! reports [`LinkEvent::Overflow`], delivering nothing more on that
//! connection until the source asks for a reconnect (the path of a link
//! that cannot stop reading). It reconnects with the source's backoff.
//!
//! [`ForgetSameTs`] is the [`crate::Mutation::DedupByDeviceTs`] bug: a
//! wrapper that acks and drops a message whose (device, ts) it has seen.
//!
//! [`MqttSource`]: tributary_actors::edge::mqtt::MqttSource
//! [`TcpBroker`]: tributary_actors::edge::mqtt::link::TcpBroker

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tributary_actors::edge::mqtt::core::Message;
use tributary_actors::edge::mqtt::link::{
    EventSink, LinkEvent, LinkStats, MqttConnector, MqttLink,
};
use tributary_actors::edge::mqtt::{parse_message, topic_matches, MqttConfig};

/// Packet ids are 16 bits and never 0.
const PKIDS: usize = 65_535;
/// Messages the link hands over in one event.
const READ_BATCH_MAX: usize = 256;

/// Locks, ignoring poisoning (a panicking run fails on its own).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What one broker (and its publishers) does.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerSpec {
    /// The one client whose session this broker keeps (the edge's source).
    pub client_id: String,
    /// The filter the source subscribes to; publishers' topics match it,
    /// the device id at `device_level`.
    pub filter: String,
    pub device_level: usize,
    /// The publishers' device ids.
    pub devices: Vec<String>,
    /// Bursts per second per publisher, on average.
    pub rate_hz: f64,
    /// Messages per burst: 1 to this many, sharing one `ts`.
    pub burst_max: u32,
    /// In-flight window per session (`max_inflight_messages`).
    pub window: usize,
    /// Every PUBACK lets a whole window more out (Mosquitto 2.0.11).
    pub refill_on_ack: bool,
    /// Messages queued (not yet sent) per session, at most.
    pub queue_max: usize,
    /// One way, edge to broker and back.
    pub latency_ms: u64,
    pub seed: u64,
    /// Calendar time (ms since the Unix epoch) at simulated time 0: the
    /// publishers' `ts`.
    pub epoch_ms: i64,
    /// Publishers stop at this simulated time.
    pub stop_at_ms: u64,
}

impl BrokerSpec {
    /// About how many messages the publishers send in a run: the mean, and
    /// a little more for the seed's luck.
    pub fn messages_expected(&self) -> u64 {
        let bursts = self.devices.len() as f64 * self.rate_hz * self.stop_at_ms as f64 / 1000.0;
        let mean = bursts * (f64::from(self.burst_max.max(1)) + 1.0) / 2.0;
        (mean * 1.05) as u64 + 30
    }
}

/// A message a publisher sent and the broker accepted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Published {
    pub n: u64,
    pub ts_ms: i64,
    pub v: f64,
}

/// The broker's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct BrokerStats {
    pub published: u64,
    /// Queued for the session: these must all reach the log.
    pub accepted: u64,
    /// Published while no subscription matched (before the first SUBSCRIBE).
    pub unrouted: u64,
    /// Refused because the session's queue was at `queue_max`.
    pub refused_queue_full: u64,
    /// First sends, and resends with DUP after a reconnect.
    pub sent: u64,
    pub resent_dup: u64,
    pub acks: u64,
    /// PUBACKs that arrived after their connection had ended: ignored.
    pub acks_stale: u64,
    /// PUBACKs of a packet id not in flight.
    pub acks_unknown: u64,
    pub connections: u64,
    /// Connections ended by a newer one of the same client.
    pub takeovers: u64,
    pub cuts: u64,
    /// The most messages in flight at once.
    pub inflight_max_seen: u64,
}

struct Publisher {
    id: String,
    topic: String,
    next_at_ms: u64,
    n: u64,
    v: f64,
}

/// A message's publisher (index) and its `n`.
type MessageKey = (usize, u64);

struct InFlight {
    pkid: u16,
    key: MessageKey,
    message: Message,
}

#[derive(Default)]
struct Session {
    filters: BTreeSet<String>,
    /// The live connection, if any.
    conn: Option<u64>,
    queue: VecDeque<(MessageKey, Message)>,
    /// In send order.
    inflight: BTreeMap<u64, InFlight>,
    by_pkid: BTreeMap<u16, u64>,
    next_send: u64,
    last_pkid: u16,
    /// What is on its way to the client on `conn`: (arrives at ms, the
    /// in-flight message's send order, DUP).
    wire: VecDeque<(u64, u64, bool)>,
    /// PUBACKs on their way: (arrive at ms, connection, packet id).
    acks: VecDeque<(u64, u64, u16)>,
}

/// One simulated broker with its publishers.
pub struct Broker {
    spec: BrokerSpec,
    now_ms: u64,
    rng: SmallRng,
    publishers: Vec<Publisher>,
    /// Per publisher, in publish order: what must reach the log.
    accepted: Vec<Vec<Published>>,
    session: Option<Session>,
    cut: bool,
    next_conn: u64,
    stats: BrokerStats,
}

impl Broker {
    pub fn new(spec: BrokerSpec) -> Self {
        let mut rng = SmallRng::seed_from_u64(spec.seed);
        let period = period_ms(spec.rate_hz);
        let publishers = spec
            .devices
            .iter()
            .map(|id| Publisher {
                id: id.clone(),
                topic: topic_for(&spec.filter, spec.device_level, id),
                next_at_ms: rng.random_range(0..period.max(1)),
                n: 0,
                v: rng.random_range(-50.0..50.0),
            })
            .collect::<Vec<_>>();
        Self {
            accepted: vec![Vec::new(); publishers.len()],
            publishers,
            spec,
            now_ms: 0,
            rng,
            session: None,
            cut: false,
            next_conn: 1,
            stats: BrokerStats::default(),
        }
    }

    pub fn spec(&self) -> &BrokerSpec {
        &self.spec
    }

    pub fn stats(&self) -> BrokerStats {
        self.stats
    }

    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Per device id, what the broker accepted, in order.
    pub fn accepted(&self) -> impl Iterator<Item = (&str, &[Published])> {
        self.publishers
            .iter()
            .zip(&self.accepted)
            .map(|(p, a)| (p.id.as_str(), a.as_slice()))
    }

    /// (device, n) of every message the broker still holds for the
    /// session (queued or in flight): not delivered yet, so not lost.
    pub fn pending(&self) -> BTreeSet<(String, u64)> {
        let Some(s) = &self.session else {
            return BTreeSet::new();
        };
        let id = |(i, n): &MessageKey| (self.publishers[*i].id.clone(), *n);
        s.queue
            .iter()
            .map(|(k, _)| id(k))
            .chain(s.inflight.values().map(|f| id(&f.key)))
            .collect()
    }

    /// Messages queued or in flight.
    pub fn backlog(&self) -> (usize, usize) {
        self.session
            .as_ref()
            .map_or((0, 0), |s| (s.queue.len(), s.inflight.len()))
    }

    /// Messages the client has read and not yet acknowledged (in flight,
    /// off the wire).
    pub fn held(&self) -> usize {
        self.session.as_ref().map_or(0, |s| {
            if s.conn.is_some() {
                s.inflight.len().saturating_sub(s.wire.len())
            } else {
                0
            }
        })
    }

    /// Publishers are done and every accepted message was acknowledged.
    pub fn idle(&self) -> bool {
        self.now_ms >= self.spec.stop_at_ms && self.backlog() == (0, 0)
    }

    /// Moves to `now_ms`: publishers publish, PUBACKs land, the window moves.
    pub fn advance(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        self.publish_due();
        let landed = self.land_acks();
        self.pump(if self.spec.refill_on_ack {
            landed.saturating_mul(self.spec.window)
        } else {
            0
        });
    }

    fn publish_due(&mut self) {
        let period = period_ms(self.spec.rate_hz);
        let stop = self.spec.stop_at_ms.min(self.now_ms + 1);
        for i in 0..self.publishers.len() {
            while self.publishers[i].next_at_ms < stop {
                let at = self.publishers[i].next_at_ms;
                let burst = self.rng.random_range(1..=self.spec.burst_max.max(1));
                let ts_ms = self.spec.epoch_ms + at as i64;
                for _ in 0..burst {
                    let step = self.rng.random_range(-1.0..1.0);
                    self.publish(i, ts_ms, step);
                }
                let next = self.rng.random_range(period / 2..=period * 3 / 2).max(1);
                self.publishers[i].next_at_ms = at + next;
            }
        }
    }

    fn publish(&mut self, i: usize, ts_ms: i64, step: f64) {
        let p = &mut self.publishers[i];
        let n = p.n;
        p.n += 1;
        p.v += step;
        // Three decimals, so that the log's f64 is the one parsed here.
        let text = format!("{:.3}", p.v);
        let v: f64 = text.parse().unwrap_or(0.0);
        let payload = format!(r#"{{"ts": {ts_ms}, "n": {n}, "v": {text}}}"#);
        self.stats.published += 1;
        let topic = p.topic.clone();
        let Some(s) = self.session.as_mut() else {
            self.stats.unrouted += 1;
            return;
        };
        if !s.filters.iter().any(|f| topic_matches(f, &topic)) {
            self.stats.unrouted += 1;
            return;
        }
        if s.queue.len() >= self.spec.queue_max {
            self.stats.refused_queue_full += 1;
            return;
        }
        let message = Message {
            pkid: 0,
            acked: true,
            dup: false,
            retain: false,
            topic,
            payload: payload.into_bytes().into(),
        };
        s.queue.push_back(((i, n), message));
        self.accepted[i].push(Published { n, ts_ms, v });
        self.stats.accepted += 1;
    }

    /// PUBACKs that arrived by now; returns how many freed a message of the
    /// live connection.
    fn land_acks(&mut self) -> usize {
        let Some(s) = self.session.as_mut() else {
            return 0;
        };
        let mut landed = 0;
        while s.acks.front().is_some_and(|(at, ..)| *at <= self.now_ms) {
            let Some((_, conn, pkid)) = s.acks.pop_front() else {
                break;
            };
            if s.conn != Some(conn) {
                self.stats.acks_stale += 1;
                continue;
            }
            match s.by_pkid.remove(&pkid) {
                Some(order) => {
                    s.inflight.remove(&order);
                    self.stats.acks += 1;
                    landed += 1;
                }
                None => self.stats.acks_unknown += 1,
            }
        }
        landed
    }

    /// Sends what the window allows on the live connection, and `extra`
    /// past it.
    fn pump(&mut self, mut extra: usize) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        if s.conn.is_none() {
            return;
        }
        while !s.queue.is_empty() && s.inflight.len() < PKIDS {
            if s.inflight.len() >= self.spec.window {
                if extra == 0 {
                    break;
                }
                extra -= 1;
            }
            let Some((key, mut message)) = s.queue.pop_front() else {
                break;
            };
            // Mosquitto's counter, skipping ids still in flight.
            let mut pkid = s.last_pkid;
            loop {
                pkid = if pkid == u16::MAX { 1 } else { pkid + 1 };
                if !s.by_pkid.contains_key(&pkid) {
                    break;
                }
            }
            s.last_pkid = pkid;
            message.pkid = pkid;
            let order = s.next_send;
            s.next_send += 1;
            s.by_pkid.insert(pkid, order);
            s.wire
                .push_back((self.now_ms + self.spec.latency_ms, order, false));
            s.inflight.insert(order, InFlight { pkid, key, message });
            self.stats.sent += 1;
        }
        self.stats.inflight_max_seen = self.stats.inflight_max_seen.max(s.inflight.len() as u64);
    }

    /// A CONNECT of the client (`clean_session = false`): the connection
    /// and whether its session was present.
    pub fn connect(&mut self) -> Result<(u64, bool), String> {
        if self.cut {
            return Err("connecting to the broker: the network is cut".into());
        }
        let present = self.session.is_some();
        let s = self.session.get_or_insert_with(Session::default);
        if s.conn.is_some() {
            self.stats.takeovers += 1;
        }
        // What the old connection's client sent before this CONNECT has
        // arrived (TCP delivers it before the close).
        if let Some(old) = s.conn {
            land_acks_of(s, old, self.now_ms, &mut self.stats);
        }
        let conn = self.next_conn;
        self.next_conn += 1;
        s.conn = Some(conn);
        s.wire.clear();
        // Unacked messages first, with DUP and their packet ids.
        let at = self.now_ms + self.spec.latency_ms;
        for (order, f) in &s.inflight {
            debug_assert_eq!(f.pkid, f.message.pkid);
            s.wire.push_back((at, *order, true));
            self.stats.resent_dup += 1;
        }
        self.stats.connections += 1;
        self.pump(0);
        Ok((conn, present))
    }

    /// Whether `conn` is the live connection.
    pub fn alive(&self, conn: u64) -> bool {
        self.session.as_ref().is_some_and(|s| s.conn == Some(conn))
    }

    /// The client closed `conn`: what it wrote before (its PUBACKs on
    /// their way) arrives first, as TCP delivers it before the close.
    pub fn disconnect(&mut self, conn: u64) {
        self.close(conn, true);
    }

    /// Ends `conn`; unless `acks_first`, the PUBACKs still on their way are
    /// lost with it (they arrive after the end, and are ignored).
    fn close(&mut self, conn: u64, acks_first: bool) {
        if let Some(s) = self.session.as_mut() {
            if s.conn == Some(conn) {
                if acks_first {
                    land_acks_of(s, conn, u64::MAX, &mut self.stats);
                }
                s.conn = None;
                s.wire.clear();
            }
        }
    }

    pub fn subscribe(&mut self, conn: u64, filter: &str) -> bool {
        match self.session.as_mut() {
            Some(s) if s.conn == Some(conn) => {
                s.filters.insert(filter.to_owned());
                true
            }
            _ => false,
        }
    }

    /// A PUBACK written on `conn`; it lands `latency_ms` later.
    pub fn ack(&mut self, conn: u64, pkid: u16) {
        let at = self.now_ms + self.spec.latency_ms;
        if let Some(s) = self.session.as_mut() {
            s.acks.push_back((at, conn, pkid));
        }
    }

    /// Whether a message on `conn`'s wire has arrived.
    fn ready(&self, conn: u64) -> bool {
        self.session.as_ref().is_some_and(|s| {
            s.conn == Some(conn) && s.wire.front().is_some_and(|(at, ..)| *at <= self.now_ms)
        })
    }

    /// The next message on `conn`'s wire that has arrived, if any.
    fn take(&mut self, conn: u64) -> Option<Message> {
        if !self.ready(conn) {
            return None;
        }
        let s = self.session.as_mut()?;
        while let Some((_, order, dup)) = s.wire.pop_front() {
            // A message acked meanwhile is no longer in flight: gone.
            if let Some(f) = s.inflight.get(&order) {
                let mut m = f.message.clone();
                m.dup = dup;
                return Some(m);
            }
        }
        None
    }

    /// Starts (or ends) a cut of the network between the client and the
    /// broker: the live connection ends and none is accepted meanwhile.
    pub fn set_cut(&mut self, cut: bool) {
        self.cut = cut;
        if cut {
            self.stats.cuts += 1;
            if let Some(s) = self.session.as_mut() {
                s.conn = None;
                s.wire.clear();
            }
        }
    }
}

/// Lands the PUBACKs of `conn` sent by `by_ms` (all, with `u64::MAX`).
fn land_acks_of(s: &mut Session, conn: u64, by_ms: u64, stats: &mut BrokerStats) {
    let mut rest = VecDeque::with_capacity(s.acks.len());
    for (at, c, pkid) in std::mem::take(&mut s.acks) {
        if c != conn || at > by_ms {
            rest.push_back((at, c, pkid));
            continue;
        }
        match s.by_pkid.remove(&pkid) {
            Some(order) => {
                s.inflight.remove(&order);
                stats.acks += 1;
            }
            None => stats.acks_unknown += 1,
        }
    }
    s.acks = rest;
}

fn period_ms(rate_hz: f64) -> u64 {
    ((1000.0 / rate_hz.max(0.001)).round() as u64).max(2)
}

/// A topic under `filter` with `device` at `device_level`.
pub fn topic_for(filter: &str, device_level: usize, device: &str) -> String {
    filter
        .split('/')
        .enumerate()
        .map(|(i, l)| match l {
            _ if i == device_level => device,
            "+" => "x",
            "#" => "telemetry",
            l => l,
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The edge's connector to its simulated broker.
pub struct SimConnector {
    pub broker: Arc<Mutex<Broker>>,
    /// Out of permits, report `Overflow` instead of holding back.
    pub overflow: bool,
    /// The [`crate::Mutation::AcksLostOnReconnect`] bug: a reconnect the
    /// source asks for loses the acks it gave just before (what
    /// `TcpLink`'s task does when an ack and the reconnect come in one
    /// batch of requests: it returns before writing them).
    pub acks_lost_on_reconnect: bool,
}

struct LinkShared {
    /// The link's connection number (from 1), as the source knows it.
    connection: u64,
    /// The broker's id of the live connection.
    conn: Option<u64>,
    subscribes: VecDeque<String>,
    reconnect: bool,
    stats: LinkStats,
}

struct SimLink {
    broker: Arc<Mutex<Broker>>,
    shared: Arc<Mutex<LinkShared>>,
    task: JoinHandle<()>,
}

impl MqttConnector for SimConnector {
    fn connect(
        &self,
        config: &MqttConfig,
        events: EventSink,
        permits: Arc<Semaphore>,
    ) -> Box<dyn MqttLink> {
        let shared = Arc::new(Mutex::new(LinkShared {
            connection: 0,
            conn: None,
            subscribes: VecDeque::new(),
            reconnect: false,
            stats: LinkStats::default(),
        }));
        let task = tokio::spawn(drive(
            self.broker.clone(),
            shared.clone(),
            events,
            permits,
            (
                config.reconnect_backoff_initial_ms,
                config.reconnect_backoff_max_ms,
            ),
            (self.overflow, self.acks_lost_on_reconnect),
        ));
        Box::new(SimLink {
            broker: self.broker.clone(),
            shared,
            task,
        })
    }
}

impl MqttLink for SimLink {
    fn ack(&mut self, connection: u64, pkid: u16) {
        let mut sh = lock(&self.shared);
        if let (true, Some(conn)) = (sh.connection == connection, sh.conn) {
            let mut b = lock(&self.broker);
            if b.alive(conn) {
                b.ack(conn, pkid);
                sh.stats.acks_written += 1;
                return;
            }
        }
        sh.stats.acks_dropped += 1;
    }

    fn subscribe(&mut self, filter: &str) -> Result<(), String> {
        lock(&self.shared).subscribes.push_back(filter.to_owned());
        Ok(())
    }

    fn reconnect(&mut self) {
        lock(&self.shared).reconnect = true;
    }

    fn stats(&self) -> LinkStats {
        lock(&self.shared).stats
    }
}

impl Drop for SimLink {
    fn drop(&mut self) {
        // The process closes its socket: the broker sees the connection end
        // (the session stays).
        self.task.abort();
        let sh = lock(&self.shared);
        if let Some(conn) = sh.conn {
            lock(&self.broker).disconnect(conn);
        }
    }
}

enum LinkState {
    Down { retry_at_ms: u64 },
    Up { conn: u64 },
}

async fn drive(
    broker: Arc<Mutex<Broker>>,
    shared: Arc<Mutex<LinkShared>>,
    sink: EventSink,
    permits: Arc<Semaphore>,
    (backoff_initial, backoff_max): (u64, u64),
    (overflow, acks_lost_on_reconnect): (bool, bool),
) {
    let mut state = LinkState::Down { retry_at_ms: 0 };
    let mut backoff = backoff_initial;
    let mut paused = false;
    let mut overflowed = false;
    let mut every = tokio::time::interval(Duration::from_millis(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        every.tick().await;
        let mut events = Vec::new();
        {
            let mut sh = lock(&shared);
            let mut b = lock(&broker);
            let now = b.now_ms();
            if let LinkState::Up { conn } = state {
                if !b.alive(conn) {
                    sh.conn = None;
                    events.push(LinkEvent::Disconnected {
                        connection: sh.connection,
                        error: "the broker connection was reset".into(),
                    });
                    state = LinkState::Down {
                        retry_at_ms: now + backoff,
                    };
                    backoff = backoff.saturating_mul(2).min(backoff_max);
                } else if sh.reconnect {
                    b.close(conn, !acks_lost_on_reconnect);
                    sh.conn = None;
                    events.push(LinkEvent::Disconnected {
                        connection: sh.connection,
                        error: "reconnecting, as the source asked".into(),
                    });
                    state = LinkState::Down { retry_at_ms: now };
                }
            }
            if let LinkState::Down { retry_at_ms } = state {
                if now >= retry_at_ms {
                    sh.reconnect = false;
                    match b.connect() {
                        Ok((conn, session_present)) => {
                            sh.connection += 1;
                            sh.conn = Some(conn);
                            overflowed = false;
                            paused = false;
                            backoff = backoff_initial;
                            events.push(LinkEvent::Connected {
                                connection: sh.connection,
                                session_present,
                            });
                            state = LinkState::Up { conn };
                        }
                        Err(error) => {
                            events.push(LinkEvent::Disconnected {
                                connection: sh.connection,
                                error,
                            });
                            state = LinkState::Down {
                                retry_at_ms: now + backoff,
                            };
                            backoff = backoff.saturating_mul(2).min(backoff_max);
                        }
                    }
                }
            }
            if let LinkState::Up { conn } = state {
                while let Some(filter) = sh.subscribes.pop_front() {
                    let ok = b.subscribe(conn, &filter);
                    events.push(LinkEvent::Subscribed { ok });
                }
                let mut batch = Vec::new();
                let mut overflow_now = false;
                while !overflowed && batch.len() < READ_BATCH_MAX && b.ready(conn) {
                    match permits.clone().try_acquire_owned() {
                        Ok(permit) => {
                            paused = false;
                            if let Some(m) = b.take(conn) {
                                batch.push((m, permit));
                            }
                        }
                        Err(_) if overflow => {
                            // Read, and left unacked: it comes again after
                            // the reconnect the source will ask for.
                            let _ = b.take(conn);
                            overflowed = true;
                            overflow_now = true;
                            sh.stats.overflow_unacked += 1;
                        }
                        Err(_) => {
                            if !paused {
                                sh.stats.read_pauses += 1;
                                paused = true;
                            }
                            break;
                        }
                    }
                }
                if !batch.is_empty() {
                    events.push(LinkEvent::Publishes {
                        connection: sh.connection,
                        messages: batch,
                    });
                }
                if overflow_now {
                    events.push(LinkEvent::Overflow {
                        connection: sh.connection,
                    });
                }
            }
        }
        for e in events {
            if sink(e).is_err() {
                return;
            }
        }
    }
}

/// The old bug, as a wrapper: a message whose (device, ts) was seen before
/// is acknowledged and dropped before the source sees it.
pub struct ForgetSameTs {
    pub inner: Arc<dyn MqttConnector>,
    /// The keys seen, kept across the edge's restarts (the old code kept
    /// them in a synced store).
    pub seen: Arc<Mutex<BTreeSet<(String, i64)>>>,
}

struct ForgetSameTsLink {
    inner: Box<dyn MqttLink>,
    /// Acks of dropped messages, sent at the link's next call.
    pending: Arc<Mutex<Vec<(u64, u16)>>>,
}

impl ForgetSameTsLink {
    fn flush(&mut self) {
        let pending = std::mem::take(&mut *lock(&self.pending));
        for (connection, pkid) in pending {
            self.inner.ack(connection, pkid);
        }
    }
}

impl MqttConnector for ForgetSameTs {
    fn connect(
        &self,
        config: &MqttConfig,
        events: EventSink,
        permits: Arc<Semaphore>,
    ) -> Box<dyn MqttLink> {
        let pending: Arc<Mutex<Vec<(u64, u16)>>> = Arc::default();
        let (filter, level, seen, to_ack) = (
            config.topic.clone(),
            config.device_level,
            self.seen.clone(),
            pending.clone(),
        );
        // Whether a message is kept; a dropped one's ack is queued.
        let keep = move |connection: u64, m: &Message| -> bool {
            let Ok(p) = parse_message(&filter, level, &m.topic, &m.payload) else {
                return true;
            };
            let Some(ts) = p.ts_us else { return true };
            if lock(&seen).insert((p.device_id, ts)) {
                return true;
            }
            lock(&to_ack).push((connection, m.pkid));
            false
        };
        let wrapped: EventSink = Arc::new(move |e: LinkEvent| match e {
            LinkEvent::Publish {
                connection,
                message,
                permit,
            } => {
                if keep(connection, &message) {
                    events(LinkEvent::Publish {
                        connection,
                        message,
                        permit,
                    })
                } else {
                    Ok(())
                }
            }
            LinkEvent::Publishes {
                connection,
                messages,
            } => {
                let messages: Vec<(Message, OwnedSemaphorePermit)> = messages
                    .into_iter()
                    .filter(|(m, _)| keep(connection, m))
                    .collect();
                if messages.is_empty() {
                    Ok(())
                } else {
                    events(LinkEvent::Publishes {
                        connection,
                        messages,
                    })
                }
            }
            other => events(other),
        });
        Box::new(ForgetSameTsLink {
            inner: self.inner.connect(config, wrapped, permits),
            pending,
        })
    }
}

impl MqttLink for ForgetSameTsLink {
    fn ack(&mut self, connection: u64, pkid: u16) {
        self.flush();
        self.inner.ack(connection, pkid);
    }

    fn ack_holding(&mut self, connection: u64, pkid: u16, permit: OwnedSemaphorePermit) {
        self.flush();
        self.inner.ack_holding(connection, pkid, permit);
    }

    fn subscribe(&mut self, filter: &str) -> Result<(), String> {
        self.flush();
        self.inner.subscribe(filter)
    }

    fn reconnect(&mut self) {
        self.flush();
        self.inner.reconnect();
    }

    fn tick(&mut self) {
        self.flush();
        self.inner.tick();
    }

    fn stats(&self) -> LinkStats {
        self.inner.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> BrokerSpec {
        BrokerSpec {
            client_id: "c".into(),
            filter: "p/+/telemetry".into(),
            device_level: 1,
            devices: vec!["a".into(), "b".into()],
            rate_hz: 100.0,
            burst_max: 3,
            window: 4,
            refill_on_ack: false,
            queue_max: 1000,
            latency_ms: 1,
            seed: 7,
            epoch_ms: 1_000_000,
            stop_at_ms: 1_000,
        }
    }

    /// Connects and subscribes, as the source does.
    fn up(b: &mut Broker) -> (u64, bool) {
        let (conn, present) = b.connect().unwrap();
        assert!(b.subscribe(conn, "p/+/telemetry"));
        (conn, present)
    }

    fn drain_wire(b: &mut Broker, conn: u64) -> Vec<Message> {
        std::iter::from_fn(|| b.take(conn)).collect()
    }

    #[test]
    fn a_session_persists_resends_with_dup_and_ignores_stale_acks() {
        let mut b = Broker::new(spec());
        let (c1, present) = up(&mut b);
        assert!(!present);
        b.advance(100);
        assert!(drain_wire(&mut b, c1).is_empty(), "latency");
        b.advance(101);
        let first = drain_wire(&mut b, c1);
        assert_eq!(first.len(), 4, "the window");
        assert!(first.iter().all(|m| !m.dup));
        let pkids: Vec<u16> = first.iter().map(|m| m.pkid).collect();
        assert_eq!(pkids, [1, 2, 3, 4]);
        assert_eq!(b.held(), 4);
        // Ack one, then the connection ends before the ack lands.
        b.ack(c1, 1);
        b.set_cut(true);
        assert!(b.connect().is_err());
        b.set_cut(false);
        b.advance(102);
        assert_eq!(b.stats().acks_stale, 1);
        let (c2, present) = b.connect().unwrap();
        assert!(present);
        assert!(!b.alive(c1) && b.alive(c2));
        b.advance(103);
        let again = drain_wire(&mut b, c2);
        assert_eq!(again.len(), 4);
        assert!(again.iter().all(|m| m.dup));
        assert_eq!(again.iter().map(|m| m.pkid).collect::<Vec<_>>(), pkids);
        assert_eq!(again[0].payload, first[0].payload);
        // Acks on the live connection free the window; ids go on from 5.
        for p in pkids {
            b.ack(c2, p);
        }
        b.advance(104);
        b.advance(105);
        let next = drain_wire(&mut b, c2);
        assert_eq!(next[0].pkid, 5);
        assert!(!next[0].dup);
        assert_eq!(b.stats().acks, 4);
        // A new connection takes the session over.
        let (c3, _) = b.connect().unwrap();
        assert!(!b.alive(c2) && b.alive(c3));
        assert_eq!(b.stats().takeovers, 1);
    }

    #[test]
    fn bursts_share_a_millisecond_and_nothing_is_accepted_unsubscribed() {
        let mut b = Broker::new(spec());
        b.advance(50);
        assert!(b.stats().unrouted > 0);
        assert_eq!(b.stats().accepted, 0);
        up(&mut b);
        b.advance(999);
        b.advance(2_000);
        let mut shared_ts = false;
        for (_, a) in b.accepted() {
            assert!(a.windows(2).all(|w| w[0].n < w[1].n));
            shared_ts |= a.windows(2).any(|w| w[0].ts_ms == w[1].ts_ms);
        }
        assert!(shared_ts, "several readings of a device in one millisecond");
        assert_eq!(b.stats().published, b.stats().accepted + b.stats().unrouted);
    }

    #[test]
    fn packet_ids_wrap_and_skip_ids_in_flight() {
        let mut s = spec();
        s.window = 3;
        s.rate_hz = 1000.0;
        s.stop_at_ms = 1_000_000;
        let mut b = Broker::new(s);
        let (c, _) = up(&mut b);
        b.advance(1);
        // Keep pkid 1 in flight forever; ack the rest.
        let mut t = 2;
        let mut seen = Vec::new();
        while seen.len() < 70_000 {
            b.advance(t);
            t += 1;
            for m in drain_wire(&mut b, c) {
                if m.pkid != 1 {
                    b.ack(c, m.pkid);
                }
                seen.push(m.pkid);
            }
        }
        assert_eq!(seen.iter().filter(|p| **p == 1).count(), 1, "1 skipped");
        assert!(seen.contains(&u16::MAX) && seen.contains(&2));
        assert!(!seen.contains(&0));
    }

    #[test]
    fn refill_on_ack_puts_more_than_the_window_in_flight() {
        let mut s = spec();
        s.refill_on_ack = true;
        s.window = 2;
        s.rate_hz = 500.0;
        let mut b = Broker::new(s);
        let (c, _) = up(&mut b);
        for t in 0..200 {
            b.advance(t);
            // Ack only the first message of each step.
            if let Some(m) = drain_wire(&mut b, c).first() {
                b.ack(c, m.pkid);
            }
        }
        assert!(b.stats().inflight_max_seen > 10, "{:?}", b.stats());
    }

    #[test]
    fn topics_follow_the_filter() {
        assert_eq!(topic_for("p/+/telemetry", 1, "d"), "p/d/telemetry");
        assert_eq!(topic_for("+/a/+/#", 2, "d"), "x/a/d/telemetry");
    }
}

//! The source's link to its broker: a narrow trait, so that the simulator can
//! put a simulated broker behind the same core and actor, and its real
//! implementation on rumqttc.
//!
//! # Back-pressure without starving the keep-alive
//! The link reads a message from the broker only with a permit (one per
//! message held, `inflight_max` in all). rumqttc answers the broker's pings
//! only while it is polled, so the link never waits for a permit longer
//! than `pause_max` (a quarter of the keep-alive): then it reads on without
//! one. A message read without a permit is left unacknowledged (the broker
//! keeps it), and so is every later message of that connection, which keeps
//! each device's order; the source asks for a new connection once what it
//! holds is acknowledged, and the broker sends them again. A broker that
//! honours its in-flight window (at or below `inflight_max`) never sends a
//! message past the window, so none of this happens with it; Mosquitto
//! 2.0.11 is one that does not (it refills a client's window at every
//! PUBACK).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS, Request};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::config::MqttConfig;
use super::core::Message;

/// Acks waiting for room in rumqttc's request queue; past it an ack is
/// dropped (counted): the broker redelivers that message, and its record
/// recognises it.
pub const DEFERRED_ACKS_MAX: usize = 65_536;

/// What the link tells the source.
pub enum LinkEvent {
    /// Connection number `connection` (from 1) is up.
    Connected {
        connection: u64,
        session_present: bool,
    },
    Subscribed {
        ok: bool,
    },
    /// A message, with the permit it holds until it is acknowledged.
    Publish {
        connection: u64,
        message: Message,
        permit: OwnedSemaphorePermit,
    },
    /// The broker delivered a message past `inflight_max`: it and the rest
    /// of this connection's are left unacknowledged.
    Overflow {
        connection: u64,
    },
    Disconnected {
        connection: u64,
        error: String,
    },
}

/// Where the link sends its events; an error means the source is gone.
pub type EventSink = Arc<dyn Fn(LinkEvent) -> Result<(), ()> + Send + Sync>;

/// The link's own counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Acks that waited for room in the client's request queue.
    pub acks_deferred: u64,
    /// Acks dropped because that queue stayed full (the broker redelivers).
    pub acks_dropped: u64,
    /// Messages read past `inflight_max` and left unacknowledged.
    pub overflow_unacked: u64,
}

/// A connection to a broker, as the source uses it.
pub trait MqttLink: Send + 'static {
    /// Sends the PUBACK of `pkid`, if `connection` is still the current
    /// one (the ack of an ended connection is dropped: the broker
    /// redelivers its message).
    fn ack(&mut self, connection: u64, pkid: u16);
    /// Queues a SUBSCRIBE with QoS 1.
    fn subscribe(&mut self, filter: &str) -> Result<(), String>;
    /// Ends the current connection (the session is kept) and connects again.
    fn reconnect(&mut self);
    /// Called periodically: retries deferred work.
    fn tick(&mut self) {}
    fn stats(&self) -> LinkStats;
}

/// Makes links: rumqttc for real, a simulated broker in `sim`.
pub trait MqttConnector: Send + Sync + 'static {
    fn connect(
        &self,
        config: &MqttConfig,
        events: EventSink,
        permits: Arc<Semaphore>,
    ) -> Box<dyn MqttLink>;
}

/// The real broker, through rumqttc (MQTT 3.1.1, persistent session,
/// manual acks).
#[derive(Debug, Clone, Copy, Default)]
pub struct Rumqttc;

impl MqttConnector for Rumqttc {
    fn connect(
        &self,
        config: &MqttConfig,
        events: EventSink,
        permits: Arc<Semaphore>,
    ) -> Box<dyn MqttLink> {
        let mut options =
            MqttOptions::new(config.client_id.clone(), config.host.clone(), config.port);
        options
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_keep_alive(Duration::from_millis(config.keep_alive_ms))
            .set_max_packet_size(config.packet_bytes_max, config.packet_bytes_max);
        let (client, event_loop) = AsyncClient::new(options, config.queued_requests_max);
        let state = Arc::new(Mutex::new(LinkState::default()));
        let control = Arc::new(Control::default());
        let overflow = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(poll_loop(PollTask {
            events: event_loop,
            sink: events,
            permits,
            link: state.clone(),
            control: control.clone(),
            overflow: overflow.clone(),
            backoff_initial_ms: config.reconnect_backoff_initial_ms,
            backoff_max_ms: config.reconnect_backoff_max_ms,
            pause_max: config.pause_max(),
        }));
        Box::new(RumqttcLink {
            client,
            state,
            control,
            task,
            deferred: VecDeque::new(),
            overflow,
            stats: LinkStats::default(),
        })
    }
}

/// The connection the poll task is on. An ack is checked against it and queued
/// under its lock; the poll task marks the connection down and drops what
/// rumqttc still queues for it under the same lock, so no ack of an ended
/// connection can reach a later one.
#[derive(Debug, Default)]
struct LinkState {
    connection: u64,
    up: bool,
}

impl LinkState {
    fn ackable(&self, connection: u64) -> bool {
        self.up && self.connection == connection
    }
}

fn lock(link: &Mutex<LinkState>) -> std::sync::MutexGuard<'_, LinkState> {
    // The lock guards two plain fields; a panic elsewhere leaves them valid.
    link.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Default)]
struct Control {
    notify: Notify,
    reconnect: AtomicBool,
}

struct RumqttcLink {
    client: AsyncClient,
    state: Arc<Mutex<LinkState>>,
    control: Arc<Control>,
    task: JoinHandle<()>,
    /// (connection, pkid) of acks the client's queue had no room for.
    deferred: VecDeque<(u64, u16)>,
    overflow: Arc<AtomicU64>,
    stats: LinkStats,
}

fn ack_stub(pkid: u16) -> Publish {
    let mut p = Publish::new("", QoS::AtLeastOnce, Vec::new());
    p.pkid = pkid;
    p
}

impl RumqttcLink {
    fn flush_deferred(&mut self) {
        while let Some(&(connection, pkid)) = self.deferred.front() {
            let link = lock(&self.state);
            if link.ackable(connection) && self.client.try_ack(&ack_stub(pkid)).is_err() {
                return;
            }
            drop(link);
            self.deferred.pop_front();
        }
    }
}

impl MqttLink for RumqttcLink {
    fn ack(&mut self, connection: u64, pkid: u16) {
        self.flush_deferred();
        let link = lock(&self.state);
        if !link.ackable(connection) {
            return;
        }
        if self.deferred.is_empty() && self.client.try_ack(&ack_stub(pkid)).is_ok() {
            return;
        }
        drop(link);
        // rumqttc writes one queued request per poll but may read many
        // messages meanwhile: its queue can fill under a burst. Keep the
        // ack, in order, and retry.
        if self.deferred.len() >= DEFERRED_ACKS_MAX {
            self.stats.acks_dropped += 1;
        } else {
            self.deferred.push_back((connection, pkid));
            self.stats.acks_deferred += 1;
        }
    }

    fn subscribe(&mut self, filter: &str) -> Result<(), String> {
        self.client
            .try_subscribe(filter, QoS::AtLeastOnce)
            .map_err(|e| format!("queueing the SUBSCRIBE: {e}"))
    }

    fn reconnect(&mut self) {
        self.control.reconnect.store(true, Relaxed);
        self.control.notify.notify_one();
    }

    fn tick(&mut self) {
        self.flush_deferred();
    }

    fn stats(&self) -> LinkStats {
        LinkStats {
            overflow_unacked: self.overflow.load(Relaxed),
            ..self.stats
        }
    }
}

impl Drop for RumqttcLink {
    fn drop(&mut self) {
        // Dropping the connection without DISCONNECT keeps the session: what
        // is unacked is redelivered to the next incarnation.
        self.task.abort();
        lock(&self.state).up = false;
    }
}

/// Drops what rumqttc holds of an ended connection: queued acks (their packet
/// ids belong to it) and packets read but not handed over (they were not
/// acked, so the broker redelivers them). Subscribes stay queued.
fn forget_connection(events: &mut EventLoop) {
    // `clean` also drains the request channel into `pending`, minus the acks,
    // and drops the network, so the next poll connects again.
    events.clean();
    events
        .pending
        .retain(|r| !matches!(r, Request::PubAck(_) | Request::PubRec(_)));
    events.state.events.clear();
}

struct PollTask {
    events: EventLoop,
    sink: EventSink,
    permits: Arc<Semaphore>,
    link: Arc<Mutex<LinkState>>,
    control: Arc<Control>,
    overflow: Arc<AtomicU64>,
    backoff_initial_ms: u64,
    backoff_max_ms: u64,
    pause_max: Duration,
}

enum Polled {
    Control,
    Event(
        Option<OwnedSemaphorePermit>,
        Result<Event, rumqttc::ConnectionError>,
    ),
    Closed,
}

/// Drives rumqttc's event loop (see the module doc for the permits).
async fn poll_loop(mut t: PollTask) {
    let mut delay_ms = t.backoff_initial_ms;
    let mut connection = 0;
    // Set once a message was read without a permit: the rest of this
    // connection's are left unacknowledged too.
    let mut discarding = false;
    loop {
        let polled = {
            let permits = t.permits.clone();
            let pause_max = t.pause_max;
            let events = &mut t.events;
            let next = async move {
                let permit = if discarding {
                    None
                } else {
                    match tokio::time::timeout(pause_max, permits.acquire_owned()).await {
                        Ok(Ok(p)) => Some(p),
                        Ok(Err(_)) => return Polled::Closed,
                        Err(_) => None,
                    }
                };
                Polled::Event(permit, events.poll().await)
            };
            tokio::select! {
                biased;
                _ = t.control.notify.notified() => Polled::Control,
                p = next => p,
            }
        };
        let (permit, result) = match polled {
            Polled::Closed => return,
            Polled::Control => {
                if t.control.reconnect.swap(false, Relaxed) {
                    {
                        let mut l = lock(&t.link);
                        l.up = false;
                        forget_connection(&mut t.events);
                    }
                    discarding = false;
                    let event = LinkEvent::Disconnected {
                        connection,
                        error: "reconnecting to get back what was left unacknowledged".into(),
                    };
                    if (t.sink)(event).is_err() {
                        return;
                    }
                }
                continue;
            }
            Polled::Event(permit, result) => (permit, result),
        };
        let event = match result {
            Ok(Event::Incoming(Packet::Publish(p))) => match permit {
                Some(permit) => LinkEvent::Publish {
                    connection,
                    message: Message {
                        pkid: p.pkid,
                        acked: p.qos != QoS::AtMostOnce,
                        dup: p.dup,
                        retain: p.retain,
                        topic: p.topic,
                        payload: p.payload,
                    },
                    permit,
                },
                None => {
                    t.overflow.fetch_add(1, Relaxed);
                    if discarding {
                        continue;
                    }
                    discarding = true;
                    LinkEvent::Overflow { connection }
                }
            },
            Ok(Event::Incoming(Packet::ConnAck(c))) => {
                delay_ms = t.backoff_initial_ms;
                discarding = false;
                let mut l = lock(&t.link);
                l.connection += 1;
                l.up = true;
                connection = l.connection;
                LinkEvent::Connected {
                    connection,
                    session_present: c.session_present,
                }
            }
            Ok(Event::Incoming(Packet::SubAck(s))) => LinkEvent::Subscribed {
                ok: s
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_))),
            },
            Ok(_) => continue,
            Err(e) => {
                {
                    let mut l = lock(&t.link);
                    l.up = false;
                    forget_connection(&mut t.events);
                }
                discarding = false;
                let event = LinkEvent::Disconnected {
                    connection,
                    error: e.to_string(),
                };
                if (t.sink)(event).is_err() {
                    return;
                }
                drop(permit);
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                delay_ms = delay_ms.saturating_mul(2).min(t.backoff_max_ms);
                continue;
            }
        };
        if (t.sink)(event).is_err() {
            return;
        }
    }
}

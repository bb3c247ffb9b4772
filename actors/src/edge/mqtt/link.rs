//! The source's link to its broker: a narrow trait, so that the simulator can
//! put a simulated broker behind the same core and actor, and its real
//! implementation, an MQTT 3.1.1 connection on tokio with rumqttc's codec.
//!
//! # Why not rumqttc's event loop
//! rumqttc's client answers the broker's pings only while its event loop
//! is polled, and it writes one queued request (one PUBACK) per poll while
//! it may read many messages in the same time. An edge that applies
//! back-pressure by not polling loses its connection ("last pingreq isn't
//! acked"), and one that polls fast enough acks far behind what it made
//! durable: measured, tens of thousands of acks behind, which a broker
//! with a broken in-flight window (Mosquitto 2.0.11) turns into tens of
//! thousands of messages in flight, and, past 65,535, packet ids it reuses
//! while the old message is still in flight. So the link drives the
//! connection itself, with rumqttc's packet codec:
//! - **Back-pressure is TCP's.** A message is read only with a permit (one
//!   per message held, `inflight_max` in all); without one, the link stops
//!   reading the socket, and the broker's sends wait in TCP.
//! - **Pings do not depend on reading.** A PINGREQ goes out every half
//!   keep-alive whatever happens, so the broker never drops the connection
//!   for silence; the link declares the connection dead only when it has a
//!   permit (it is reading) and nothing at all arrived for two keep-alives.
//! - **Acks are written at once, in batches**, in the order the source gave
//!   them, each holding its message's permit until it is written: what the
//!   source holds plus what waits to be written stays within `inflight_max`.
//! - An ack of an ended connection is never written on a later one (its
//!   packet id means something else there).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, Packet, PubAck, Subscribe};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::config::MqttConfig;
use super::core::Message;

/// Messages read in one turn, handed to the source together.
const READ_BATCH_MAX: usize = 256;
/// Acks (and subscribes) written in one turn, in one write.
const WRITE_BATCH_MAX: usize = 1024;
/// Bound on a TCP connect plus the CONNECT/CONNACK exchange.
const CONNECT_TIMEOUT_MS: u64 = 10_000;
/// The socket's read buffer, grown up to a packet at most.
const READ_BUFFER_BYTES: usize = 64 * 1024;

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
    /// Several messages of one connection, in order.
    Publishes {
        connection: u64,
        messages: Vec<(Message, OwnedSemaphorePermit)>,
    },
    /// The broker delivered a message past `inflight_max` to a link that
    /// cannot stop reading: it and the rest of this connection's are left
    /// unacknowledged (the real link never sends this: it stops reading).
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
    /// PUBACKs written to the broker.
    pub acks_written: u64,
    /// Acks dropped because their connection had ended before they were
    /// written (the broker redelivers those messages).
    pub acks_dropped: u64,
    /// Times the link stopped reading because every permit was taken.
    pub read_pauses: u64,
    /// PINGREQs sent.
    pub pings: u64,
    /// Messages read past `inflight_max` and left unacknowledged (only links
    /// that cannot stop reading have any).
    pub overflow_unacked: u64,
}

/// A connection to a broker, as the source uses it.
pub trait MqttLink: Send + 'static {
    /// Sends the PUBACK of `pkid`, if `connection` is still the current
    /// one (the ack of an ended connection is dropped: the broker
    /// redelivers its message).
    fn ack(&mut self, connection: u64, pkid: u16);
    /// [`MqttLink::ack`], with the message's permit, which a link may keep
    /// until the ack is written (so that what waits to be written counts
    /// against `inflight_max`); by default it is released at once.
    fn ack_holding(&mut self, connection: u64, pkid: u16, permit: OwnedSemaphorePermit) {
        drop(permit);
        self.ack(connection, pkid);
    }
    /// Queues a SUBSCRIBE with QoS 1.
    fn subscribe(&mut self, filter: &str) -> Result<(), String>;
    /// Ends the current connection (the session is kept) and connects again.
    fn reconnect(&mut self);
    /// Called periodically: retries deferred work.
    fn tick(&mut self) {}
    fn stats(&self) -> LinkStats;
}

/// Makes links: a TCP connection for real, a simulated broker in `sim`.
pub trait MqttConnector: Send + Sync + 'static {
    fn connect(
        &self,
        config: &MqttConfig,
        events: EventSink,
        permits: Arc<Semaphore>,
    ) -> Box<dyn MqttLink>;
}

/// A real broker over TCP: MQTT 3.1.1, a persistent session
/// (`clean_session = false`), QoS 1, manual acks.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpBroker;

/// What the source asks of the connection task.
enum Request {
    Ack {
        connection: u64,
        pkid: u16,
        permit: Option<OwnedSemaphorePermit>,
    },
    Subscribe(String),
    Reconnect,
}

#[derive(Default)]
struct Counters {
    acks_written: AtomicU64,
    acks_dropped: AtomicU64,
    read_pauses: AtomicU64,
    pings: AtomicU64,
}

impl MqttConnector for TcpBroker {
    fn connect(
        &self,
        config: &MqttConfig,
        events: EventSink,
        permits: Arc<Semaphore>,
    ) -> Box<dyn MqttLink> {
        // Every ack holds a permit and subscribes are few: the bound is
        // never what stops a request.
        let (tx, rx) = mpsc::channel(config.queued_requests_max);
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(run(Task {
            config: config.clone(),
            sink: events,
            permits,
            requests: rx,
            counters: counters.clone(),
        }));
        Box::new(TcpLink {
            requests: tx,
            task,
            counters,
            refused: 0,
        })
    }
}

struct TcpLink {
    requests: mpsc::Sender<Request>,
    task: JoinHandle<()>,
    counters: Arc<Counters>,
    /// Requests the channel refused (it is sized so that none is).
    refused: u64,
}

impl TcpLink {
    fn send(&mut self, r: Request) {
        if self.requests.try_send(r).is_err() {
            // Only if the task ended (the source is stopping) or the queue
            // is smaller than `inflight_max` allows; an ack lost here is a
            // redelivery later, which the records recognise.
            self.refused += 1;
        }
    }
}

impl MqttLink for TcpLink {
    fn ack(&mut self, connection: u64, pkid: u16) {
        self.send(Request::Ack {
            connection,
            pkid,
            permit: None,
        });
    }

    fn ack_holding(&mut self, connection: u64, pkid: u16, permit: OwnedSemaphorePermit) {
        self.send(Request::Ack {
            connection,
            pkid,
            permit: Some(permit),
        });
    }

    fn subscribe(&mut self, filter: &str) -> Result<(), String> {
        self.requests
            .try_send(Request::Subscribe(filter.to_owned()))
            .map_err(|e| format!("queueing the SUBSCRIBE: {e}"))
    }

    fn reconnect(&mut self) {
        self.send(Request::Reconnect);
    }

    fn stats(&self) -> LinkStats {
        LinkStats {
            acks_written: self.counters.acks_written.load(Relaxed),
            acks_dropped: self.counters.acks_dropped.load(Relaxed) + self.refused,
            read_pauses: self.counters.read_pauses.load(Relaxed),
            pings: self.counters.pings.load(Relaxed),
            overflow_unacked: 0,
        }
    }
}

impl Drop for TcpLink {
    fn drop(&mut self) {
        // Dropping the connection without DISCONNECT keeps the session: what
        // is unacked is redelivered to the next incarnation.
        self.task.abort();
    }
}

struct Task {
    config: MqttConfig,
    sink: EventSink,
    permits: Arc<Semaphore>,
    requests: mpsc::Receiver<Request>,
    counters: Arc<Counters>,
}

/// Why a connection ended.
enum Ended {
    /// The source is gone: stop.
    Stop,
    /// Connect again (after the backoff when `backoff`).
    Again { error: String, backoff: bool },
}

async fn run(mut t: Task) {
    let mut delay_ms = t.config.reconnect_backoff_initial_ms;
    let mut connection = 0u64;
    // Subscribes survive a reconnect: the source queues one per connection,
    // but one queued while down must not be lost.
    let mut subscribes: VecDeque<String> = VecDeque::new();
    loop {
        let (stream, leftover) = match connect(&t.config).await {
            Ok((stream, session_present, leftover)) => {
                connection += 1;
                delay_ms = t.config.reconnect_backoff_initial_ms;
                let up = LinkEvent::Connected {
                    connection,
                    session_present,
                };
                if (t.sink)(up).is_err() {
                    return;
                }
                (stream, leftover)
            }
            Err(error) => {
                if (t.sink)(LinkEvent::Disconnected { connection, error }).is_err() {
                    return;
                }
                if !wait_backoff(&mut t, delay_ms, &mut subscribes).await {
                    return;
                }
                delay_ms = delay_ms
                    .saturating_mul(2)
                    .min(t.config.reconnect_backoff_max_ms);
                continue;
            }
        };
        let ended = serve(&mut t, stream, leftover, connection, &mut subscribes).await;
        let (error, backoff) = match ended {
            Ended::Stop => return,
            Ended::Again { error, backoff } => (error, backoff),
        };
        if (t.sink)(LinkEvent::Disconnected { connection, error }).is_err() {
            return;
        }
        if backoff {
            if !wait_backoff(&mut t, delay_ms, &mut subscribes).await {
                return;
            }
            delay_ms = delay_ms
                .saturating_mul(2)
                .min(t.config.reconnect_backoff_max_ms);
        }
    }
}

/// Waits out a reconnect delay, dropping acks (their connection is gone)
/// and keeping subscribes; false when the source is gone.
async fn wait_backoff(t: &mut Task, delay_ms: u64, subscribes: &mut VecDeque<String>) -> bool {
    let until = Instant::now() + Duration::from_millis(delay_ms);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(until) => return true,
            r = t.requests.recv() => match r {
                None => return false,
                Some(Request::Ack { .. }) => {
                    t.counters.acks_dropped.fetch_add(1, Relaxed);
                }
                Some(Request::Subscribe(f)) => subscribes.push_back(f),
                Some(Request::Reconnect) => {}
            },
        }
    }
}

/// Opens a TCP connection and exchanges CONNECT/CONNACK.
/// Returns the stream, whether the session was present, and what the broker
/// sent right after its CONNACK (a resumed session's redeliveries may come
/// in the same segment).
async fn connect(config: &MqttConfig) -> Result<(TcpStream, bool, BytesMut), String> {
    let attempt = async {
        let mut stream = TcpStream::connect((config.host.as_str(), config.port))
            .await
            .map_err(|e| format!("connecting to {}:{}: {e}", config.host, config.port))?;
        let _ = stream.set_nodelay(true);
        let mut connect = Connect::new(config.client_id.clone());
        connect.clean_session = false;
        connect.keep_alive = u16::try_from(config.keep_alive_ms / 1000).unwrap_or(u16::MAX);
        let mut out = BytesMut::new();
        Packet::Connect(connect)
            .write(&mut out, config.packet_bytes_max)
            .map_err(|e| format!("encoding CONNECT: {e}"))?;
        stream
            .write_all(&out)
            .await
            .map_err(|e| format!("sending CONNECT: {e}"))?;
        let mut buf = BytesMut::with_capacity(READ_BUFFER_BYTES);
        loop {
            match Packet::read(&mut buf, config.packet_bytes_max) {
                Ok(Packet::ConnAck(ack)) => {
                    return match ack.code {
                        rumqttc::mqttbytes::v4::ConnectReturnCode::Success => {
                            Ok((stream, ack.session_present, buf))
                        }
                        code => Err(format!("the broker refused the connection: {code:?}")),
                    };
                }
                Ok(other) => return Err(format!("expected CONNACK, got {other:?}")),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                    let n = stream
                        .read_buf(&mut buf)
                        .await
                        .map_err(|e| format!("reading CONNACK: {e}"))?;
                    if n == 0 {
                        return Err("the broker closed the connection before CONNACK".into());
                    }
                }
                Err(e) => return Err(format!("reading CONNACK: {e}")),
            }
        }
    };
    tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), attempt)
        .await
        .map_err(|_| format!("no CONNACK within {CONNECT_TIMEOUT_MS} ms"))?
}

/// Serves one connection until it ends.
async fn serve(
    t: &mut Task,
    stream: TcpStream,
    mut buf: BytesMut,
    connection: u64,
    subscribes: &mut VecDeque<String>,
) -> Ended {
    let (mut reader, mut writer) = stream.into_split();
    let keep_alive = Duration::from_millis(t.config.keep_alive_ms);
    let max = t.config.packet_bytes_max;
    let mut out = BytesMut::new();
    let mut next_ping = Instant::now() + keep_alive / 2;
    let mut last_rx = Instant::now();
    let mut next_pkid: u16 = 1;
    // A permit taken before reading, for the next message.
    let mut permit: Option<OwnedSemaphorePermit> = None;
    let mut waiting_for_permit = false;
    let mut written: Vec<OwnedSemaphorePermit> = Vec::new();
    // Subscribes queued while down go first.
    for filter in subscribes.drain(..) {
        encode_subscribe(&mut out, &filter, &mut next_pkid, max);
    }
    loop {
        if !out.is_empty() {
            if let Err(e) = write_all(&mut writer, &out, keep_alive).await {
                return Ended::Again {
                    error: e,
                    backoff: true,
                };
            }
            out.clear();
            // The acks these permits held are written: their slots free.
            written.clear();
        }
        // Decode what is buffered while permits allow.
        let mut batch = Vec::new();
        loop {
            if permit.is_none() {
                permit = t.permits.clone().try_acquire_owned().ok();
            }
            let Some(p) = permit.take() else {
                break;
            };
            match Packet::read(&mut buf, max) {
                Ok(Packet::Publish(publish)) => {
                    let message = Message {
                        pkid: publish.pkid,
                        acked: publish.qos != QoS::AtMostOnce,
                        dup: publish.dup,
                        retain: publish.retain,
                        topic: publish.topic,
                        payload: publish.payload,
                    };
                    batch.push((message, p));
                    if batch.len() >= READ_BATCH_MAX {
                        break;
                    }
                }
                Ok(Packet::PingResp) => permit = Some(p),
                Ok(Packet::SubAck(s)) => {
                    permit = Some(p);
                    let ok = s.return_codes.iter().all(|c| {
                        matches!(c, rumqttc::mqttbytes::v4::SubscribeReasonCode::Success(_))
                    });
                    if (t.sink)(LinkEvent::Subscribed { ok }).is_err() {
                        return Ended::Stop;
                    }
                }
                Ok(Packet::Disconnect) => {
                    return Ended::Again {
                        error: "the broker sent DISCONNECT".into(),
                        backoff: true,
                    }
                }
                Ok(other) => {
                    permit = Some(p);
                    tracing::debug!(packet = ?other, "mqtt: ignoring an unexpected packet");
                }
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                    permit = Some(p);
                    break;
                }
                Err(e) => {
                    return Ended::Again {
                        error: format!("a packet from the broker does not decode: {e}"),
                        backoff: true,
                    }
                }
            }
        }
        if !batch.is_empty() {
            let event = LinkEvent::Publishes {
                connection,
                messages: batch,
            };
            if (t.sink)(event).is_err() {
                return Ended::Stop;
            }
            continue;
        }
        let reading = permit.is_some();
        if !reading && !waiting_for_permit {
            t.counters.read_pauses.fetch_add(1, Relaxed);
        }
        waiting_for_permit = !reading;
        // Dead only if the link reads and nothing came for two keep-alives.
        if reading && last_rx.elapsed() >= keep_alive * 2 {
            return Ended::Again {
                error: format!(
                    "nothing from the broker for {} ms despite pings",
                    last_rx.elapsed().as_millis()
                ),
                backoff: true,
            };
        }
        if reading && buf.capacity() - buf.len() < READ_BUFFER_BYTES / 4 {
            buf.reserve(READ_BUFFER_BYTES);
        }
        let permits = t.permits.clone();
        tokio::select! {
            biased;
            r = t.requests.recv() => {
                let Some(first) = r else { return Ended::Stop };
                let mut next = Some(first);
                let mut n = 0;
                while let Some(r) = next.take() {
                    match r {
                        Request::Ack { connection: c, pkid, permit } => {
                            if c == connection {
                                let ok = Packet::PubAck(PubAck::new(pkid)).write(&mut out, max).is_ok();
                                if ok {
                                    t.counters.acks_written.fetch_add(1, Relaxed);
                                }
                                written.extend(permit);
                            } else {
                                t.counters.acks_dropped.fetch_add(1, Relaxed);
                            }
                        }
                        Request::Subscribe(filter) => {
                            encode_subscribe(&mut out, &filter, &mut next_pkid, max);
                        }
                        Request::Reconnect => {
                            return Ended::Again {
                                error: "reconnecting, as the source asked".into(),
                                backoff: false,
                            };
                        }
                    }
                    n += 1;
                    if n < WRITE_BATCH_MAX {
                        next = t.requests.try_recv().ok();
                    }
                }
            }
            _ = tokio::time::sleep_until(next_ping) => {
                let _ = Packet::PingReq.write(&mut out, max);
                t.counters.pings.fetch_add(1, Relaxed);
                next_ping = Instant::now() + keep_alive / 2;
            }
            r = reader.read_buf(&mut buf), if reading => {
                match r {
                    Ok(0) => {
                        return Ended::Again {
                            error: "the broker closed the connection".into(),
                            backoff: true,
                        }
                    }
                    Ok(_) => last_rx = Instant::now(),
                    Err(e) => {
                        return Ended::Again {
                            error: format!("reading from the broker: {e}"),
                            backoff: true,
                        }
                    }
                }
            }
            p = permits.acquire_owned(), if !reading => {
                match p {
                    Ok(p) => permit = Some(p),
                    Err(_) => return Ended::Stop,
                }
            }
        }
    }
}

fn encode_subscribe(out: &mut BytesMut, filter: &str, next_pkid: &mut u16, max: usize) {
    let mut s = Subscribe::new(filter, QoS::AtLeastOnce);
    s.pkid = *next_pkid;
    *next_pkid = next_pkid.checked_add(1).unwrap_or(1);
    if let Err(e) = Packet::Subscribe(s).write(out, max) {
        tracing::error!(error = %e, %filter, "mqtt: the SUBSCRIBE does not encode");
    }
}

async fn write_all(
    writer: &mut tokio::net::tcp::OwnedWriteHalf,
    bytes: &[u8],
    bound: Duration,
) -> Result<(), String> {
    match tokio::time::timeout(bound, writer.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("writing to the broker: {e}")),
        Err(_) => Err(format!(
            "the broker took no bytes for {} ms",
            bound.as_millis()
        )),
    }
}

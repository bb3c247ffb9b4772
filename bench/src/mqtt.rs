//! `bench mqtt`: MQTT ingest on one edge (issue #10), against a raw rumqttc
//! subscriber on the same broker, in the same run. One command, three parts:
//!
//! 1. **Ingest at several device counts** (`--devices 1,20,1000`): a fixed
//!    number of messages (`--readings`) per pass, the raw subscriber and the
//!    edge one after the other, in an order that alternates between
//!    repetitions; the figure is the time from the first publish to the last
//!    message in (received, for the raw subscriber; committed, i.e. fsynced
//!    in the outbox, for the edge). Each repetition also times the publisher
//!    alone (to a topic nobody reads, until the broker's last PUBACK), which
//!    says how fast the publisher and the broker's ingest can go.
//! 2. **One device, sustained** (`--sustained-s`): the publisher sends for
//!    `--window-warmup-s` plus `--sustained-s` seconds; the figure is the
//!    count taken in the window (after the warm-up) over its length.
//! 3. **Latency at half the maximum** (`--latency-s`): a paced publisher at
//!    half the edge's median sustained rate (or `--latency-rate`); the
//!    figure is the MQTT source's `ack_latency` histogram over the window
//!    (`Histogram::since` the warm-up): from a message's arrival at the
//!    source (the source actor handling the batch the link read it in) to
//!    its PUBACK being handed to the link, which follows the gateway's
//!    answer after the outbox's fsync. Not in it: the broker, TCP and the
//!    link's decoding before, the link's write of the PUBACK after.
//!
//! The parts:
//! - **The publisher** is a raw MQTT 3.1.1 client over TCP (rumqttc's codec
//!   for CONNECT, PUBLISH encoded by hand into one buffer per batch of
//!   [`PUBLISH_BATCH`] messages), QoS 1, so that it is much faster than any
//!   subscriber. Payloads are `{"ts": <unix ms>, "n": <seq>, "v": <f64>}`,
//!   `ts` read from the clock for each message (many share a millisecond),
//!   `n` the device's own sequence, to `<prefix>/dev-NNNN/telemetry`, the
//!   devices in turn. It never runs more than `--lead-max` messages ahead of
//!   what the subscriber under test has taken (Mosquitto drops a session's
//!   messages past `max_queued_messages`); the share of the time it waited
//!   at that bound is reported: near 100 %, the subscriber is the limit.
//! - **The baseline**: a rumqttc subscriber at QoS 1, clean session,
//!   automatic PUBACKs (each message acknowledged as it is received: a
//!   subscriber with no durability).
//! - **A second reference**: a raw socket subscriber (rumqttc's codec, as
//!   the edge's link), which acknowledges everything one read brought in one
//!   write: the least a QoS 1 subscriber can do, to tell the broker's limit
//!   from rumqttc's. `--subjects` picks which of the three run.
//! - **The edge**: the project's `MqttSource` feeding the `Gateway`, with the
//!   node's defaults: `MqttConfig::new`'s (`inflight_max` 4096, ...) and
//!   `OutboxConfig::default()` (segments of 1000 readings, 50 ms commit
//!   interval, 256 MiB budget, never reached here), on `SledStore::open(dir,
//!   16 MiB)` in a fresh temp dir. No uplink runs. Its persistent session
//!   is made (and subscribed) before it starts, and ended after.
//!
//! **Where the CPU goes.** The publisher, the poller and this orchestration
//! run on the main thread (a current-thread tokio runtime); the subject (the
//! raw subscriber, or the edge's actors and sled's threads) on a second,
//! multi-thread runtime of one worker per core, as the node runs. The
//! subject's CPU is the process's minus the main thread's. The broker's is
//! read from `/proc/<--broker-pid>/stat`. All from /proc ticks (10 ms).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use bytes::{BufMut, BytesMut};
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use rumqttc::mqttbytes::v4::Packet as RawPacket;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tributary_actors::edge::gateway::{Gateway, GatewayArgs, GatewayMsg, StoreFactory};
use tributary_actors::edge::mqtt::{
    MqttConfig, MqttMsg, MqttSource, MqttSourceArgs, MqttSourceStatus, MQTT_NAME,
};
use tributary_actors::edge::{EdgeNames, GATEWAY_NAME};
use tributary_actors::histogram::Histogram;
use tributary_actors::outbox::{OutboxConfig, OutboxStore, SledStore};

use crate::log::unique_suffix;
use crate::stats::{machine_cpu_s, median, print_table, process_cpu_s, thousands, Series};

/// Messages the publisher encodes into one write.
pub const PUBLISH_BATCH: usize = 128;
const KEEP_ALIVE_MS: u64 = 30_000;
const PACKET_BYTES_MAX: usize = 256 * 1024;
/// Bound on connecting, subscribing, and a session's set-up or clean-up.
const CONNECT_TIMEOUT_MS: u64 = 10_000;
/// How often the gateway is asked how many readings it committed: the edge
/// figure's resolution.
const PROGRESS_POLL_MS: u64 = 5;
/// The source's status (most held) is asked every this many polls.
const STATUS_EVERY_POLLS: u32 = 10;
/// How long a publisher at its lead waits before it looks again, in case a
/// wake-up came between its look and its wait.
const LEAD_RECHECK_MS: u64 = 10;
/// The raw subscriber wakes a waiting publisher every this many messages.
const NOTIFY_EVERY: u64 = 256;
/// Bound on one call to an edge actor, and on stopping one.
const ACTOR_CALL_MS: u64 = 10_000;
/// sled's page cache: the node's `sled_cache_bytes_max` default.
pub const SLED_CACHE_BYTES: u64 = 16 * 1024 * 1024;
/// Bound on the broker's PUBACKs of everything sent, at a publisher's end.
const ACKED_TIMEOUT_MS: u64 = 30_000;

#[derive(Debug, Clone)]
pub struct MqttOpts {
    /// host:port of the broker.
    pub broker: String,
    /// Device counts of part 1 (none: skip it).
    pub devices: Vec<usize>,
    /// Messages per pass of part 1.
    pub readings: u64,
    pub runs: usize,
    pub warmup: usize,
    /// What parts 1 and 2 measure, in turn.
    pub subjects: Vec<Subject>,
    pub publishers: usize,
    pub lead_max: u64,
    /// Part 2's window (0: skip it).
    pub sustained_s: u64,
    pub sustained_devices: usize,
    pub sustained_runs: usize,
    /// Part 3's window (0: skip it).
    pub latency_s: u64,
    pub latency_runs: usize,
    /// Part 3's rate; by default half the edge's sustained median.
    pub latency_rate: Option<f64>,
    /// Seconds dropped at the start of each window of parts 2 and 3.
    pub window_warmup_s: u64,
    pub dir: PathBuf,
    pub broker_pid: Option<u32>,
    pub timeout_s: u64,
}

pub fn split_broker(broker: &str) -> Result<(String, u16)> {
    let (host, port) = broker
        .rsplit_once(':')
        .with_context(|| format!("--broker {broker:?} is not host:port"))?;
    Ok((host.to_string(), port.parse().context("the broker's port")?))
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The 1-minute load average, as /proc/loadavg says it.
pub fn load_1min() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------
// The publisher

/// How far the subscriber under test has got; the publishers wait on it.
#[derive(Default)]
pub struct Progress {
    consumed: AtomicU64,
    notify: Notify,
}

impl Progress {
    pub fn set(&self, consumed: u64) {
        self.consumed.store(consumed, Ordering::Release);
        self.notify.notify_waiters();
    }

    pub fn get(&self) -> u64 {
        self.consumed.load(Ordering::Acquire)
    }
}

/// When a publisher stops: after `count` messages over all connections, or
/// at `until`, whichever comes first.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limit {
    pub count: Option<u64>,
    pub until: Option<tokio::time::Instant>,
}

impl Limit {
    pub fn count(n: u64) -> Self {
        Self {
            count: Some(n),
            until: None,
        }
    }

    pub fn until(t: tokio::time::Instant) -> Self {
        Self {
            count: None,
            until: Some(t),
        }
    }
}

/// What the publishers send.
pub struct Load {
    pub prefix: String,
    pub devices: usize,
    pub limit: Limit,
    /// Messages per second over all connections; `None`: as fast as the
    /// lead (and TCP) allow.
    pub rate: Option<f64>,
    /// The most messages sent ahead of `progress`; with no progress, none.
    pub lead_max: u64,
    pub progress: Option<Arc<Progress>>,
}

/// What the publishers did.
#[derive(Debug, Clone, Copy)]
pub struct Published {
    pub sent: u64,
    /// From the start to the last write.
    pub took: Duration,
    /// From the start to the broker's last PUBACK.
    pub acked_after: Duration,
    /// The longest any connection waited at its lead.
    pub waited: Duration,
}

impl Published {
    pub fn waited_share(&self) -> f64 {
        self.waited.as_secs_f64() / self.took.as_secs_f64().max(1e-9)
    }
}

/// A QoS 1 PUBLISH, encoded by hand (MQTT 3.1.1 §3.3).
fn encode_publish(out: &mut BytesMut, topic: &[u8], pkid: u16, payload: &[u8]) {
    let mut remaining = 2 + topic.len() + 2 + payload.len();
    out.put_u8(0x32);
    loop {
        let mut byte = (remaining % 128) as u8;
        remaining /= 128;
        if remaining > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if remaining == 0 {
            break;
        }
    }
    out.put_u16(topic.len() as u16);
    out.put_slice(topic);
    out.put_u16(pkid);
    out.put_slice(payload);
}

/// The payload of device sequence `n`, its `ts` from the clock.
pub fn payload(buf: &mut String, n: u64) {
    buf.clear();
    let v = 20.0 + (n % 1000) as f64 * 0.01;
    let _ = write!(buf, "{{\"ts\": {}, \"n\": {n}, \"v\": {v:.2}}}", unix_ms());
}

/// One publisher connection: what it writes with, and the broker's PUBACKs
/// counted by a reader task.
struct Conn {
    writer: OwnedWriteHalf,
    acked: Arc<AtomicU64>,
    reader: JoinHandle<()>,
}

async fn connect_raw(broker: &(String, u16), client_id: &str) -> Result<Conn> {
    let attempt = async {
        let mut stream = TcpStream::connect((broker.0.as_str(), broker.1))
            .await
            .with_context(|| format!("connecting to {}:{}", broker.0, broker.1))?;
        stream.set_nodelay(true)?;
        let mut connect = rumqttc::mqttbytes::v4::Connect::new(client_id);
        connect.clean_session = true;
        // No keep-alive: the publisher never has to ping.
        connect.keep_alive = 0;
        let mut out = BytesMut::new();
        RawPacket::Connect(connect)
            .write(&mut out, PACKET_BYTES_MAX)
            .map_err(|e| anyhow!("encoding CONNECT: {e}"))?;
        stream.write_all(&out).await?;
        let mut buf = BytesMut::with_capacity(64 * 1024);
        loop {
            match RawPacket::read(&mut buf, PACKET_BYTES_MAX) {
                Ok(RawPacket::ConnAck(_)) => break,
                Ok(other) => bail!("expected CONNACK, got {other:?}"),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                    if stream.read_buf(&mut buf).await? == 0 {
                        bail!("the broker closed the connection before CONNACK");
                    }
                }
                Err(e) => bail!("reading CONNACK: {e}"),
            }
        }
        let (mut reader, writer) = stream.into_split();
        let acked = Arc::new(AtomicU64::new(0));
        let count = acked.clone();
        let reader = tokio::spawn(async move {
            loop {
                loop {
                    match RawPacket::read(&mut buf, PACKET_BYTES_MAX) {
                        Ok(RawPacket::PubAck(_)) => {
                            count.fetch_add(1, Ordering::Release);
                        }
                        Ok(_) => {}
                        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                        Err(_) => return,
                    }
                }
                match reader.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
        Ok(Conn {
            writer,
            acked,
            reader,
        })
    };
    tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), attempt)
        .await
        .map_err(|_| anyhow!("connecting a publisher: no CONNACK in {CONNECT_TIMEOUT_MS} ms"))?
}

/// What one connection did.
struct ConnReport {
    sent: u64,
    last_write: tokio::time::Instant,
    waited: Duration,
}

/// Sends connection `p`'s share of `load`: message `k` (over all
/// connections) is device `k % devices`'s, on connection `device % conns`,
/// due at `k / rate` when paced.
async fn publish_conn(
    writer: &mut OwnedWriteHalf,
    p: usize,
    conns: usize,
    load: &Load,
    published: &AtomicU64,
    start: tokio::time::Instant,
) -> Result<ConnReport> {
    let topics: Vec<Vec<u8>> = (0..load.devices)
        .map(|d| format!("{}/dev-{d:04}/telemetry", load.prefix).into_bytes())
        .collect();
    let mut out = BytesMut::with_capacity(PUBLISH_BATCH * 128);
    let mut body = String::with_capacity(96);
    let mut pkid: u16 = 0;
    let mut k: u64 = 0;
    let mut sent = 0u64;
    let mut waited = Duration::ZERO;
    let mut last_write = start;
    enum Stop {
        Batch,
        Done,
        Pace(tokio::time::Instant),
        Lead,
    }
    loop {
        let mut stop = Stop::Batch;
        let now = tokio::time::Instant::now();
        if load.limit.until.is_some_and(|t| now >= t) {
            stop = Stop::Done;
        }
        let mut in_batch = 0;
        while matches!(stop, Stop::Batch) && in_batch < PUBLISH_BATCH {
            if load.limit.count.is_some_and(|n| k >= n) {
                stop = Stop::Done;
                break;
            }
            let device = (k % load.devices as u64) as usize;
            if device % conns != p {
                k += 1;
                continue;
            }
            if let Some(rate) = load.rate {
                let due = start + Duration::from_secs_f64(k as f64 / rate);
                if due > tokio::time::Instant::now() {
                    stop = Stop::Pace(due);
                    break;
                }
            }
            if let Some(progress) = &load.progress {
                let ahead = published
                    .load(Ordering::Relaxed)
                    .saturating_sub(progress.get());
                if ahead >= load.lead_max {
                    stop = Stop::Lead;
                    break;
                }
            }
            pkid = pkid.checked_add(1).unwrap_or(1);
            payload(&mut body, k / load.devices as u64);
            encode_publish(&mut out, &topics[device], pkid, body.as_bytes());
            published.fetch_add(1, Ordering::Relaxed);
            k += 1;
            sent += 1;
            in_batch += 1;
        }
        if !out.is_empty() {
            writer.write_all(&out).await.context("publishing")?;
            out.clear();
            last_write = tokio::time::Instant::now();
        }
        match stop {
            Stop::Batch => {}
            Stop::Done => break,
            Stop::Pace(due) => tokio::time::sleep_until(due).await,
            Stop::Lead => {
                let t0 = tokio::time::Instant::now();
                if let Some(progress) = &load.progress {
                    let woken = progress.notify.notified();
                    let ahead = published
                        .load(Ordering::Relaxed)
                        .saturating_sub(progress.get());
                    if ahead >= load.lead_max {
                        let _ = tokio::time::timeout(Duration::from_millis(LEAD_RECHECK_MS), woken)
                            .await;
                    }
                }
                waited += t0.elapsed();
            }
        }
    }
    Ok(ConnReport {
        sent,
        last_write,
        waited,
    })
}

/// Connected publishers, ready to send.
pub struct Publishers {
    conns: Vec<Conn>,
}

impl Publishers {
    pub async fn connect(broker: &(String, u16), count: usize, tag: &str) -> Result<Self> {
        let mut conns = Vec::new();
        for p in 0..count {
            conns.push(connect_raw(broker, &format!("bench-pub-{tag}-{p}")).await?);
        }
        Ok(Self { conns })
    }

    /// Sends `load`, then waits (bounded) for the broker's PUBACK of every
    /// message sent.
    pub async fn publish(&mut self, load: &Load) -> Result<Published> {
        let published = AtomicU64::new(0);
        let conns = self.conns.len();
        let start = tokio::time::Instant::now();
        let acked0: Vec<u64> = self
            .conns
            .iter()
            .map(|c| c.acked.load(Ordering::Acquire))
            .collect();
        let reports = futures::future::join_all(
            self.conns
                .iter_mut()
                .enumerate()
                .map(|(p, c)| publish_conn(&mut c.writer, p, conns, load, &published, start)),
        )
        .await;
        let mut sent = 0;
        let mut last_write = start;
        let mut waited = Duration::ZERO;
        for r in reports {
            let r = r?;
            sent += r.sent;
            last_write = last_write.max(r.last_write);
            waited = waited.max(r.waited);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(ACKED_TIMEOUT_MS);
        loop {
            let acked: u64 = self
                .conns
                .iter()
                .zip(&acked0)
                .map(|(c, a0)| c.acked.load(Ordering::Acquire) - a0)
                .sum();
            if acked >= sent {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "the broker acknowledged {acked} of {sent} publishes in {ACKED_TIMEOUT_MS} ms"
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(Published {
            sent,
            took: last_write.duration_since(start),
            acked_after: start.elapsed(),
            waited,
        })
    }

    pub async fn close(self) {
        for mut c in self.conns {
            // DISCONNECT.
            let _ = c.writer.write_all(&[0xE0, 0x00]).await;
            let _ = c.writer.shutdown().await;
            c.reader.abort();
        }
    }
}

// ---------------------------------------------------------------------------
// rumqttc helpers

fn options(broker: &(String, u16), client_id: &str, clean: bool) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, broker.0.clone(), broker.1);
    o.set_clean_session(clean)
        .set_keep_alive(Duration::from_millis(KEEP_ALIVE_MS))
        .set_max_packet_size(PACKET_BYTES_MAX, PACKET_BYTES_MAX);
    o
}

/// Polls `events` until `want` says an event is the one awaited, bounded.
async fn poll_until(
    events: &mut EventLoop,
    what: &str,
    want: impl Fn(&Event) -> bool,
) -> Result<()> {
    let wait = async {
        loop {
            let e = events.poll().await.map_err(|e| anyhow!("{what}: {e}"))?;
            if want(&e) {
                return Ok::<(), anyhow::Error>(());
            }
        }
    };
    tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), wait)
        .await
        .map_err(|_| anyhow!("{what}: no answer in {CONNECT_TIMEOUT_MS} ms"))?
}

fn is_connack(e: &Event) -> bool {
    matches!(e, Event::Incoming(Packet::ConnAck(_)))
}

fn is_suback(e: &Event) -> bool {
    matches!(e, Event::Incoming(Packet::SubAck(_)))
}

fn is_disconnect(e: &Event) -> bool {
    matches!(e, Event::Outgoing(rumqttc::Outgoing::Disconnect))
}

/// Creates a persistent session with its subscription before its owner
/// connects (so nothing published from the first instant is lost while it
/// subscribes), or, with `clean`, ends one.
pub async fn prepare_session(
    broker: &(String, u16),
    id: &str,
    filter: &str,
    clean: bool,
) -> Result<()> {
    let (client, mut events) = AsyncClient::new(options(broker, id, clean), 16);
    poll_until(&mut events, "opening the session", is_connack).await?;
    if !clean {
        client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .map_err(|e| anyhow!("subscribing the session: {e}"))?;
        poll_until(&mut events, "subscribing the session", is_suback).await?;
    }
    client
        .disconnect()
        .await
        .map_err(|e| anyhow!("closing the session's set-up: {e}"))?;
    // Until the DISCONNECT is on the wire: the session then ends as asked.
    poll_until(&mut events, "closing the session's set-up", is_disconnect).await
}

// ---------------------------------------------------------------------------
// The subjects

/// The raw subscriber, on the subject runtime: counts what it receives into
/// `progress` (rumqttc acks each on receipt); with `count`, returns when that
/// many arrived.
async fn start_raw(
    rt: &tokio::runtime::Handle,
    broker: &(String, u16),
    prefix: &str,
    progress: Arc<Progress>,
    count: Option<u64>,
) -> Result<JoinHandle<Result<Instant>>> {
    let filter = format!("{prefix}/+/telemetry");
    let id = format!("bench-raw-{}", prefix.replace('/', "-"));
    let (client, mut events) = AsyncClient::new(options(broker, &id, true), 64);
    let ready = rt
        .spawn(async move {
            poll_until(&mut events, "connecting the raw subscriber", is_connack).await?;
            client
                .subscribe(filter.as_str(), QoS::AtLeastOnce)
                .await
                .map_err(|e| anyhow!("subscribing: {e}"))?;
            poll_until(&mut events, "subscribing the raw subscriber", is_suback).await?;
            Ok::<_, anyhow::Error>((client, events))
        })
        .await??;
    let (client, mut events) = ready;
    Ok(rt.spawn(async move {
        // Kept alive with the event loop: dropping every client ends it.
        let _client = client;
        let mut done = 0u64;
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    done += 1;
                    progress.consumed.store(done, Ordering::Release);
                    if done.is_multiple_of(NOTIFY_EVERY) {
                        progress.notify.notify_waiters();
                    }
                    if count.is_some_and(|n| done >= n) {
                        progress.set(done);
                        return Ok(Instant::now());
                    }
                }
                Ok(_) => {}
                Err(e) => bail!("the raw subscriber's connection: {e}"),
            }
        }
    }))
}

/// The raw socket subscriber, on the subject runtime: a clean session over
/// TCP with rumqttc's codec (the edge's link decodes the same way), each
/// message's PUBACK queued as it is decoded and everything read at once
/// acknowledged in one write: the least a QoS 1 subscriber can do.
async fn start_socket(
    rt: &tokio::runtime::Handle,
    broker: &(String, u16),
    prefix: &str,
    progress: Arc<Progress>,
    count: Option<u64>,
) -> Result<JoinHandle<Result<Instant>>> {
    let filter = format!("{prefix}/+/telemetry");
    let id = format!("bench-sock-{}", prefix.replace('/', "-"));
    let broker = broker.clone();
    let ready = rt
        .spawn(async move {
            let mut stream = TcpStream::connect((broker.0.as_str(), broker.1)).await?;
            stream.set_nodelay(true)?;
            let mut connect = rumqttc::mqttbytes::v4::Connect::new(id);
            connect.clean_session = true;
            connect.keep_alive = 0;
            let mut out = BytesMut::new();
            RawPacket::Connect(connect)
                .write(&mut out, PACKET_BYTES_MAX)
                .map_err(|e| anyhow!("encoding CONNECT: {e}"))?;
            let mut sub = rumqttc::mqttbytes::v4::Subscribe::new(filter, QoS::AtLeastOnce);
            sub.pkid = 1;
            RawPacket::Subscribe(sub)
                .write(&mut out, PACKET_BYTES_MAX)
                .map_err(|e| anyhow!("encoding SUBSCRIBE: {e}"))?;
            stream.write_all(&out).await?;
            let mut buf = BytesMut::with_capacity(64 * 1024);
            let wait = async {
                loop {
                    match RawPacket::read(&mut buf, PACKET_BYTES_MAX) {
                        Ok(RawPacket::SubAck(_)) => return Ok::<(), anyhow::Error>(()),
                        Ok(_) => {}
                        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                            if stream.read_buf(&mut buf).await? == 0 {
                                bail!("the broker closed the connection before SUBACK");
                            }
                        }
                        Err(e) => bail!("reading SUBACK: {e}"),
                    }
                }
            };
            tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), wait)
                .await
                .map_err(|_| anyhow!("the socket subscriber: no SUBACK"))??;
            Ok::<_, anyhow::Error>((stream, buf))
        })
        .await??;
    let (mut stream, mut buf) = ready;
    Ok(rt.spawn(async move {
        let mut done = 0u64;
        let mut out = BytesMut::with_capacity(16 * 1024);
        loop {
            loop {
                match RawPacket::read(&mut buf, PACKET_BYTES_MAX) {
                    Ok(RawPacket::Publish(p)) => {
                        if p.qos != QoS::AtMostOnce {
                            out.put_slice(&[0x40, 0x02]);
                            out.put_u16(p.pkid);
                        }
                        done += 1;
                    }
                    Ok(_) => {}
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                    Err(e) => bail!("the socket subscriber: {e}"),
                }
            }
            if !out.is_empty() {
                stream.write_all(&out).await?;
                out.clear();
                progress.consumed.store(done, Ordering::Release);
                progress.notify.notify_waiters();
                if count.is_some_and(|n| done >= n) {
                    return Ok(Instant::now());
                }
            }
            if buf.capacity() - buf.len() < 16 * 1024 {
                buf.reserve(64 * 1024);
            }
            if stream.read_buf(&mut buf).await? == 0 {
                bail!("the broker closed the socket subscriber's connection");
            }
        }
    }))
}

/// What is measured in a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Subject {
    /// rumqttc's subscriber, acks on receipt: the baseline.
    Rumqttc,
    /// A socket subscriber, acks on receipt in one write per read.
    Socket,
    Edge,
}

const SUBJECTS: [Subject; 3] = [Subject::Rumqttc, Subject::Socket, Subject::Edge];

impl Subject {
    fn name(self) -> &'static str {
        match self {
            Subject::Rumqttc => "raw rumqttc subscriber, QoS 1, acks on receipt",
            Subject::Socket => "raw socket subscriber, acks on receipt, one write per read",
            Subject::Edge => "edge: MqttSource → Gateway → outbox on sled",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Subject::Rumqttc => "raw rumqttc",
            Subject::Socket => "raw socket",
            Subject::Edge => "edge",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The edge actors' parent: records why one of them ended, so that a run
/// fails at once with the reason instead of at its timeout.
struct Watcher;

type Ended = Arc<std::sync::Mutex<Option<String>>>;

impl Actor for Watcher {
    type Msg = ();
    type State = Ended;
    type Arguments = Ended;

    async fn pre_start(&self, _: ActorRef<()>, ended: Ended) -> Result<Ended, ActorProcessingErr> {
        Ok(ended)
    }

    async fn handle_supervisor_evt(
        &self,
        _: ActorRef<()>,
        evt: SupervisionEvent,
        ended: &mut Ended,
    ) -> Result<(), ActorProcessingErr> {
        let reason = match evt {
            SupervisionEvent::ActorFailed(who, e) => {
                Some(format!("{:?} failed: {e}", who.get_name()))
            }
            SupervisionEvent::ActorTerminated(who, _, why) => {
                Some(format!("{:?} stopped: {why:?}", who.get_name()))
            }
            _ => None,
        };
        if let (Some(r), Ok(mut slot)) = (reason, ended.lock()) {
            slot.get_or_insert(r);
        }
        Ok(())
    }
}

fn ended_reason(ended: &Ended) -> Option<String> {
    ended.lock().ok().and_then(|s| s.clone())
}

/// An edge: the gateway and the MQTT source, on the subject runtime.
struct Edge {
    gateway: ActorRef<GatewayMsg>,
    source: ActorRef<MqttMsg>,
    watcher: ActorRef<()>,
    ended: Ended,
    id: String,
    _dir: tempfile::TempDir,
}

/// What the edge's poller saw.
#[derive(Debug, Clone, Copy, Default)]
struct EdgeSeen {
    held_most: usize,
}

impl Edge {
    async fn start(
        rt: &tokio::runtime::Handle,
        broker: &(String, u16),
        o: &MqttOpts,
        prefix: &str,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tributary-bench-mqtt-")
            .tempdir_in(&o.dir)
            .with_context(|| format!("creating a directory in {}", o.dir.display()))?;
        let outbox_dir = dir.path().join("outbox");
        let store: StoreFactory = Arc::new(move || {
            Ok(Box::new(SledStore::open(&outbox_dir, SLED_CACHE_BYTES)?) as Box<dyn OutboxStore>)
        });
        let gateway_args = GatewayArgs {
            store,
            outbox: OutboxConfig::default(),
            ack_log: None,
            stages: None,
            names: EdgeNames::default(),
            clock: tributary_actors::clock::system(),
            device_clock_skew_max_ms: 300_000,
        };
        let filter = format!("{prefix}/+/telemetry");
        let id = format!("bench-edge-{}", prefix.replace('/', "-"));
        prepare_session(broker, &id, &filter, false).await?;
        let config = MqttConfig::new(broker.0.clone(), broker.1, id.clone(), filter)?;
        let source_args = MqttSourceArgs::new(
            config,
            EdgeNames::default(),
            tributary_actors::clock::system(),
        );
        let ended: Ended = Arc::default();
        let e = ended.clone();
        let (watcher, gateway, source) = rt
            .spawn(async move {
                let (watcher, _) = Actor::spawn(None, Watcher, e)
                    .await
                    .map_err(|e| anyhow!("starting the watcher: {e}"))?;
                let (gateway, _) = Actor::spawn_linked(
                    Some(GATEWAY_NAME.to_string()),
                    Gateway,
                    gateway_args,
                    watcher.get_cell(),
                )
                .await
                .map_err(|e| anyhow!("starting the gateway: {e}"))?;
                let (source, _) = Actor::spawn_linked(
                    Some(MQTT_NAME.to_string()),
                    MqttSource,
                    source_args,
                    watcher.get_cell(),
                )
                .await
                .map_err(|e| anyhow!("starting the MQTT source: {e}"))?;
                Ok::<_, anyhow::Error>((watcher, gateway, source))
            })
            .await??;
        let edge = Self {
            gateway,
            source,
            watcher,
            ended,
            id,
            _dir: dir,
        };
        let connected = async {
            loop {
                if edge.status().await?.core.connected {
                    return Ok::<(), anyhow::Error>(());
                }
                tokio::time::sleep(Duration::from_millis(PROGRESS_POLL_MS)).await;
            }
        };
        tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), connected)
            .await
            .map_err(|_| anyhow!("the MQTT source did not connect in {CONNECT_TIMEOUT_MS} ms"))??;
        Ok(edge)
    }

    async fn status(&self) -> Result<MqttSourceStatus> {
        ractor::call_t!(self.source, MqttMsg::Status, ACTOR_CALL_MS)
            .map_err(|e| anyhow!("asking the MQTT source for its status: {e}"))
    }

    /// (readings committed, commits).
    async fn committed(&self) -> Result<(u64, u64)> {
        let s = ractor::call_t!(self.gateway, GatewayMsg::Status, ACTOR_CALL_MS)
            .map_err(|e| anyhow!("asking the gateway for its status: {e}"))?;
        Ok((s.stats.readings_committed, s.commits))
    }

    /// Polls the committed count into `progress` until `count` (if any).
    fn poller(
        &self,
        progress: Arc<Progress>,
        count: Option<u64>,
    ) -> JoinHandle<Result<(Instant, EdgeSeen)>> {
        let (gateway, source, ended) = (
            self.gateway.clone(),
            self.source.clone(),
            self.ended.clone(),
        );
        tokio::spawn(async move {
            let mut seen = EdgeSeen::default();
            let mut polls = 0u32;
            loop {
                if let Some(reason) = ended_reason(&ended) {
                    bail!("an edge actor ended during the run: {reason}");
                }
                let s = ractor::call_t!(gateway, GatewayMsg::Status, ACTOR_CALL_MS)
                    .map_err(|e| anyhow!("asking the gateway for its status: {e}"))?;
                progress.set(s.stats.readings_committed);
                if count.is_some_and(|n| s.stats.readings_committed >= n) {
                    return Ok((Instant::now(), seen));
                }
                polls += 1;
                if polls.is_multiple_of(STATUS_EVERY_POLLS) {
                    if let Ok(st) = ractor::call_t!(source, MqttMsg::Status, ACTOR_CALL_MS) {
                        seen.held_most = seen.held_most.max(st.core.held);
                    }
                }
                tokio::time::sleep(Duration::from_millis(PROGRESS_POLL_MS)).await;
            }
        })
    }

    async fn stop(self, broker: &(String, u16)) -> Result<()> {
        self.source
            .stop_and_wait(None, Some(Duration::from_millis(ACTOR_CALL_MS)))
            .await
            .map_err(|e| anyhow!("stopping the MQTT source: {e}"))?;
        self.gateway
            .stop_and_wait(None, Some(Duration::from_millis(ACTOR_CALL_MS)))
            .await
            .map_err(|e| anyhow!("stopping the gateway: {e}"))?;
        self.watcher.stop(None);
        // A clean connect ends the persistent session (and drops what the
        // broker still queued for it).
        prepare_session(broker, &self.id, "", true).await
    }
}

// ---------------------------------------------------------------------------
// CPU

/// CPU seconds so far: this process, its main thread, the broker, the machine.
#[derive(Debug, Clone)]
struct CpuMark {
    at: Instant,
    process: f64,
    main: f64,
    broker: Option<f64>,
    busy: f64,
    load: f64,
    /// Nanoseconds each thread but the main one has waited on a run queue
    /// (`/proc/self/task/<tid>/schedstat`, second field), by thread id.
    waits: std::collections::HashMap<u32, u64>,
}

/// Every thread's run-queue wait but the main thread's.
fn run_queue_waits(main: u32) -> std::collections::HashMap<u32, u64> {
    let mut out = std::collections::HashMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in tasks.flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if tid == main {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        if let Some(wait) = stat.split_whitespace().nth(1).and_then(|v| v.parse().ok()) {
            out.insert(tid, wait);
        }
    }
    out
}

impl CpuMark {
    fn now(broker_pid: Option<u32>) -> Self {
        let pid = std::process::id();
        let (busy, _) = machine_cpu_s();
        Self {
            at: Instant::now(),
            process: process_cpu_s("self"),
            main: process_cpu_s(&format!("self/task/{pid}")),
            broker: broker_pid.map(|p| process_cpu_s(&p.to_string())),
            busy,
            load: load_1min(),
            waits: run_queue_waits(pid),
        }
    }
}

/// Where the CPU went between two marks.
#[derive(Debug, Clone, Copy)]
struct CpuSpan {
    wall_s: f64,
    /// The subject: the process minus its main thread.
    subject_s: f64,
    publisher_s: f64,
    broker_s: Option<f64>,
    machine_s: f64,
    /// The 1-minute load average at the start.
    load: f64,
    /// Seconds the subject's threads (those alive at both marks) waited
    /// for a CPU, on a run queue.
    subject_wait_s: f64,
}

impl CpuSpan {
    fn between(a: &CpuMark, b: &CpuMark) -> Self {
        let main = b.main - a.main;
        Self {
            wall_s: b.at.duration_since(a.at).as_secs_f64().max(1e-9),
            subject_s: (b.process - a.process - main).max(0.0),
            publisher_s: main,
            broker_s: a.broker.zip(b.broker).map(|(x, y)| y - x),
            machine_s: b.busy - a.busy,
            load: a.load,
            subject_wait_s: b
                .waits
                .iter()
                .filter_map(|(tid, w)| Some(w.saturating_sub(*a.waits.get(tid)?)))
                .sum::<u64>() as f64
                / 1e9,
        }
    }

    fn per_reading_us(s: f64, readings: u64) -> f64 {
        s * 1e6 / readings.max(1) as f64
    }
}

// ---------------------------------------------------------------------------
// Part 1: a fixed count at several device counts

/// One pass of part 1.
struct CountPass {
    took: Duration,
    cpu: CpuSpan,
    published: Published,
    /// Readings per commit (the edge).
    per_commit: Option<f64>,
    held_most: Option<usize>,
}

async fn bounded<T>(
    o: &MqttOpts,
    what: &str,
    f: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(Duration::from_secs(o.timeout_s), f)
        .await
        .map_err(|_| anyhow!("{what} took more than --timeout-s {}", o.timeout_s))?
}

/// Publishes `load` while `task` (which returns when the last reading is in)
/// runs; a task that fails ends the wait at once.
async fn race<T>(
    publishers: &mut Publishers,
    load: &Load,
    mut task: JoinHandle<Result<T>>,
) -> Result<(Published, T)> {
    let publish = publishers.publish(load);
    tokio::pin!(publish);
    tokio::select! {
        published = &mut publish => {
            let published = published?;
            Ok((published, task.await??))
        }
        done = &mut task => {
            let done = done??;
            Ok((publish.await?, done))
        }
    }
}

async fn count_pass(
    rt: &tokio::runtime::Handle,
    broker: &(String, u16),
    o: &MqttOpts,
    devices: usize,
    subject: Subject,
    prefix: &str,
) -> Result<CountPass> {
    let n = o.readings;
    let progress = Arc::new(Progress::default());
    let mut publishers = Publishers::connect(broker, o.publishers, prefix).await?;
    let load = Load {
        prefix: prefix.to_string(),
        devices,
        limit: Limit::count(n),
        rate: None,
        lead_max: o.lead_max,
        progress: Some(progress.clone()),
    };
    let pass = if subject == Subject::Edge {
        let e = Edge::start(rt, broker, o, prefix).await?;
        let poller = e.poller(progress.clone(), Some(n));
        let mark0 = CpuMark::now(o.broker_pid);
        let start = Instant::now();
        let run = bounded(o, "an edge pass", race(&mut publishers, &load, poller)).await;
        let mark1 = CpuMark::now(o.broker_pid);
        let (published, (end, seen)) = match run {
            Ok(r) => r,
            Err(err) => {
                let st = e.status().await.map(|s| s.core.stats);
                bail!(
                    "{err}: the gateway committed {} of {n}; the source: {st:?}",
                    progress.get()
                );
            }
        };
        let (committed, commits) = e.committed().await?;
        let st = e.status().await?;
        if committed != n || st.core.stats.bad_payload != 0 {
            bail!(
                "the edge committed {committed} of {n} (source: {:?})",
                st.core.stats
            );
        }
        e.stop(broker).await?;
        CountPass {
            took: end.duration_since(start),
            cpu: CpuSpan::between(&mark0, &mark1),
            published,
            per_commit: Some(committed as f64 / commits.max(1) as f64),
            held_most: Some(seen.held_most),
        }
    } else {
        let sub = if subject == Subject::Socket {
            start_socket(rt, broker, prefix, progress.clone(), Some(n)).await?
        } else {
            start_raw(rt, broker, prefix, progress.clone(), Some(n)).await?
        };
        let mark0 = CpuMark::now(o.broker_pid);
        let start = Instant::now();
        let (published, end) = bounded(o, "a raw pass", race(&mut publishers, &load, sub)).await?;
        let mark1 = CpuMark::now(o.broker_pid);
        CountPass {
            took: end.duration_since(start),
            cpu: CpuSpan::between(&mark0, &mark1),
            published,
            per_commit: None,
            held_most: None,
        }
    };
    publishers.close().await;
    Ok(pass)
}

/// The publisher alone: `n` messages to a topic nobody subscribes to, until
/// the broker's last PUBACK.
async fn publisher_alone(
    broker: &(String, u16),
    o: &MqttOpts,
    devices: usize,
    prefix: &str,
) -> Result<(f64, CpuSpan)> {
    let mut publishers = Publishers::connect(broker, o.publishers, prefix).await?;
    let load = Load {
        prefix: format!("{prefix}-nobody"),
        devices,
        limit: Limit::count(o.readings),
        rate: None,
        lead_max: u64::MAX,
        progress: None,
    };
    let mark0 = CpuMark::now(o.broker_pid);
    let p = bounded(o, "the publisher alone", publishers.publish(&load)).await?;
    let mark1 = CpuMark::now(o.broker_pid);
    publishers.close().await;
    Ok((
        p.sent as f64 / p.acked_after.as_secs_f64().max(1e-9),
        CpuSpan::between(&mark0, &mark1),
    ))
}

/// The passes of one subject at one device count.
#[derive(Default)]
struct Passes {
    rates: Vec<f64>,
    cpu: Vec<CpuSpan>,
    waited: Vec<f64>,
    pub_rates: Vec<f64>,
    per_commit: Vec<f64>,
    held_most: usize,
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn med(v: &[f64]) -> f64 {
    median(&sorted(v.to_vec()))
}

fn range(v: &[f64]) -> (f64, f64) {
    let s = sorted(v.to_vec());
    (
        s.first().copied().unwrap_or(0.0),
        s.last().copied().unwrap_or(0.0),
    )
}

/// "median (min–max)" of rates.
fn spread(v: &[f64]) -> String {
    let (lo, hi) = range(v);
    format!(
        "{} ({}–{})",
        thousands(med(v)),
        thousands(lo),
        thousands(hi)
    )
}

/// `a / b` to two places, or "–" when either side was not measured.
fn ratio(a: f64, b: f64) -> String {
    if a > 0.0 && b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "–".to_string()
    }
}

fn cores(s: Option<f64>, span: &CpuSpan) -> Option<f64> {
    s.map(|s| s / span.wall_s)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".to_string(), |v| format!("{v:.digits$}"))
}

/// The median over spans of a per-span figure.
fn med_of(spans: &[CpuSpan], f: impl Fn(&CpuSpan) -> Option<f64>) -> Option<f64> {
    let v: Vec<f64> = spans.iter().filter_map(f).collect();
    (!v.is_empty()).then(|| med(&v))
}

fn load_range(spans: &[CpuSpan]) -> String {
    let (lo, hi) = range(&spans.iter().map(|s| s.load).collect::<Vec<_>>());
    format!("{lo:.1}–{hi:.1}")
}

struct CountResult {
    devices: usize,
    /// By [`Subject::index`].
    subjects: [Passes; 3],
    alone: Vec<f64>,
    alone_cpu: Vec<CpuSpan>,
    /// edge/raw rumqttc and edge/raw socket of each repetition.
    ratios: [Vec<f64>; 2],
}

fn part1(
    rt_main: &tokio::runtime::Runtime,
    rt: &tokio::runtime::Handle,
    broker: &(String, u16),
    o: &MqttOpts,
    suffix: &str,
) -> Result<Vec<CountResult>> {
    let mut results = Vec::new();
    for &devices in &o.devices {
        if !o.readings.is_multiple_of(devices as u64) {
            bail!(
                "--readings {} is not a multiple of {devices} devices",
                o.readings
            );
        }
        let mut r = CountResult {
            devices,
            subjects: Default::default(),
            alone: Vec::new(),
            alone_cpu: Vec::new(),
            ratios: Default::default(),
        };
        for rep in 0..o.warmup + o.runs {
            let timed = rep >= o.warmup;
            let mut rep_rates = [0.0f64; 3];
            for turn in 0..o.subjects.len() {
                let subject = o.subjects[(rep + turn) % o.subjects.len()];
                let prefix = format!("bench-{suffix}-d{devices}-{rep}-{}", subject.index());
                let pass =
                    rt_main.block_on(count_pass(rt, broker, o, devices, subject, &prefix))?;
                let rate = o.readings as f64 / pass.took.as_secs_f64().max(1e-9);
                rep_rates[subject.index()] = rate;
                eprintln!(
                    "  {devices} devices, rep {}/{}{}: {} {} readings/s (publisher waited {:.0} % at its lead, load {:.1})",
                    rep + 1,
                    o.warmup + o.runs,
                    if timed { "" } else { " (warm-up)" },
                    subject.short(),
                    thousands(rate),
                    pass.published.waited_share() * 100.0,
                    pass.cpu.load,
                );
                if timed {
                    let p = &mut r.subjects[subject.index()];
                    p.rates.push(rate);
                    p.cpu.push(pass.cpu);
                    p.waited.push(pass.published.waited_share());
                    p.pub_rates.push(
                        pass.published.sent as f64 / pass.published.took.as_secs_f64().max(1e-9),
                    );
                    p.per_commit.extend(pass.per_commit);
                    p.held_most = p.held_most.max(pass.held_most.unwrap_or(0));
                }
            }
            let prefix = format!("bench-{suffix}-d{devices}-{rep}-alone");
            let (alone, span) = rt_main.block_on(publisher_alone(broker, o, devices, &prefix))?;
            if timed {
                let edge = rep_rates[Subject::Edge.index()];
                r.ratios[0].push(edge / rep_rates[Subject::Rumqttc.index()].max(1e-9));
                r.ratios[1].push(edge / rep_rates[Subject::Socket.index()].max(1e-9));
                r.alone.push(alone);
                r.alone_cpu.push(span);
            }
        }
        results.push(r);
    }
    Ok(results)
}

fn print_part1(o: &MqttOpts, results: &[CountResult]) {
    println!(
        "\n## 1. MQTT ingest: {} messages per pass, {} runs after {} warm-up, lead at most {}\n",
        thousands(o.readings as f64),
        o.runs,
        o.warmup,
        thousands(o.lead_max as f64)
    );
    for r in results {
        let series: Vec<Series> = SUBJECTS
            .iter()
            .map(|subject| {
                let mut s = Series::new(subject.name(), o.readings, 0);
                for rate in &r.subjects[subject.index()].rates {
                    s.push(Duration::from_secs_f64(o.readings as f64 / rate));
                }
                s
            })
            .collect();
        print_table(
            &format!(
                "{} device(s): readings/s from the first publish to the last in",
                r.devices
            ),
            &[
                (&series[0], None),
                (&series[1], Some(&series[0])),
                (&series[2], Some(&series[0])),
                (&series[2], Some(&series[1])),
            ],
        );
    }
    let rates = |r: &CountResult, s: Subject| r.subjects[s.index()].rates.clone();
    println!(
        "\n| devices | raw rumqttc readings/s, median (min–max) | raw socket | edge | edge/raw rumqttc \
         (ratio of medians; per repetition min–max) | goal ≥ 0.9 | edge/raw socket | load (1 min) |"
    );
    println!("|---:|---:|---:|---:|---:|---|---:|---|");
    for r in results {
        let edge = med(&rates(r, Subject::Edge));
        let raw = med(&rates(r, Subject::Rumqttc));
        let (lo, hi) = range(&r.ratios[0]);
        let (slo, shi) = range(&r.ratios[1]);
        let spans: Vec<CpuSpan> = r
            .subjects
            .iter()
            .flat_map(|p| p.cpu.iter().copied())
            .collect();
        println!(
            "| {} | {} | {} | {} | **{}** ({lo:.2}–{hi:.2}) | {} | {} ({slo:.2}–{shi:.2}) | {} |",
            r.devices,
            spread(&rates(r, Subject::Rumqttc)),
            spread(&rates(r, Subject::Socket)),
            spread(&rates(r, Subject::Edge)),
            ratio(edge, raw),
            match (edge > 0.0 && raw > 0.0, edge / raw >= 0.9) {
                (false, _) => "–",
                (true, true) => "met",
                (true, false) => "missed",
            },
            ratio(edge, med(&rates(r, Subject::Socket))),
            load_range(&spans),
        );
    }
    println!(
        "\n| devices | publisher alone, readings/s to the broker's last PUBACK (median, min–max) \
         | publisher's rate during the passes: raw rumqttc / raw socket / edge | waited at its lead \
         (median) |"
    );
    println!("|---:|---:|---:|---:|");
    for r in results {
        let p = |s: Subject| &r.subjects[s.index()];
        println!(
            "| {} | {} | {} / {} / {} | {:.0} % / {:.0} % / {:.0} % |",
            r.devices,
            spread(&r.alone),
            thousands(med(&p(Subject::Rumqttc).pub_rates)),
            thousands(med(&p(Subject::Socket).pub_rates)),
            thousands(med(&p(Subject::Edge).pub_rates)),
            med(&p(Subject::Rumqttc).waited) * 100.0,
            med(&p(Subject::Socket).waited) * 100.0,
            med(&p(Subject::Edge).waited) * 100.0,
        );
    }
    println!(
        "\n| devices | case | subject CPU µs/reading | main thread (publisher) CPU µs/reading | broker CPU µs/reading \
         | subject cores | broker cores | machine busy (cores) | subject waiting for a CPU (s per s) \
         | readings per commit | most held |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in results {
        let n = o.readings;
        let mut rows: Vec<(&str, &[CpuSpan], Option<&Passes>)> = SUBJECTS
            .iter()
            .map(|s| {
                let p = &r.subjects[s.index()];
                (s.short(), &p.cpu[..], Some(p))
            })
            .collect();
        rows.push(("publisher alone", &r.alone_cpu, None));
        for (name, spans, p) in rows {
            println!(
                "| {} | {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.devices,
                opt(
                    med_of(spans, |s| Some(CpuSpan::per_reading_us(s.subject_s, n))),
                    1
                ),
                opt(
                    med_of(spans, |s| Some(CpuSpan::per_reading_us(s.publisher_s, n))),
                    1
                ),
                opt(
                    med_of(spans, |s| s.broker_s.map(|b| CpuSpan::per_reading_us(b, n))),
                    1
                ),
                opt(med_of(spans, |s| cores(Some(s.subject_s), s)), 2),
                opt(med_of(spans, |s| cores(s.broker_s, s)), 2),
                opt(med_of(spans, |s| cores(Some(s.machine_s), s)), 2),
                opt(med_of(spans, |s| cores(Some(s.subject_wait_s), s)), 2),
                p.filter(|p| !p.per_commit.is_empty())
                    .map_or("–".to_string(), |p| format!("{:.0}", med(&p.per_commit))),
                p.filter(|p| p.held_most > 0)
                    .map_or("–".to_string(), |p| thousands(p.held_most as f64)),
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Parts 2 and 3: windows

/// What one window measured.
struct WindowPass {
    rate: f64,
    cpu: CpuSpan,
    published: Published,
    /// The edge: ack latency over the window, readings per commit, commits/s.
    latency: Option<Histogram>,
    per_commit: Option<f64>,
    commits_per_s: Option<f64>,
    held_most: Option<usize>,
}

/// Runs a subject for `warm + window` seconds under `rate` (None: as fast
/// as it takes), with `--sustained-devices` devices, and measures the window.
async fn window_pass(
    rt: &tokio::runtime::Handle,
    broker: &(String, u16),
    o: &MqttOpts,
    subject: Subject,
    rate: Option<f64>,
    window_s: u64,
    prefix: &str,
) -> Result<WindowPass> {
    let progress = Arc::new(Progress::default());
    let mut publishers = Publishers::connect(broker, o.publishers, prefix).await?;
    // The subject's task (the edge's poller, or the raw subscriber): it
    // ends only on an error, and is aborted after the window.
    type Task = std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>>>>;
    let (edge_actor, task, abort): (Option<Edge>, Task, tokio::task::AbortHandle) =
        if subject == Subject::Edge {
            let e = Edge::start(rt, broker, o, prefix).await?;
            let poller = e.poller(progress.clone(), None);
            let abort = poller.abort_handle();
            (
                Some(e),
                Box::pin(async move { poller.await?.map(|_| ()) }),
                abort,
            )
        } else {
            let sub = if subject == Subject::Socket {
                start_socket(rt, broker, prefix, progress.clone(), None).await?
            } else {
                start_raw(rt, broker, prefix, progress.clone(), None).await?
            };
            let abort = sub.abort_handle();
            (None, Box::pin(async move { sub.await?.map(|_| ()) }), abort)
        };
    let warm = Duration::from_secs(o.window_warmup_s);
    let window = Duration::from_secs(window_s);
    let start = tokio::time::Instant::now();
    let load = Load {
        prefix: prefix.to_string(),
        devices: o.sustained_devices,
        limit: Limit::until(start + warm + window + Duration::from_millis(200)),
        rate,
        lead_max: o.lead_max,
        progress: Some(progress.clone()),
    };
    let e = edge_actor.as_ref();
    let measure = async {
        tokio::time::sleep_until(start + warm).await;
        let mark0 = CpuMark::now(o.broker_pid);
        let c0 = progress.get();
        let (h0, k0) = match e {
            Some(e) => (
                Some(e.status().await?.core.ack_latency),
                Some(e.committed().await?),
            ),
            None => (None, None),
        };
        tokio::time::sleep_until(start + warm + window).await;
        let mark1 = CpuMark::now(o.broker_pid);
        let c1 = progress.get();
        let (h1, k1, held) = match e {
            Some(e) => {
                let st = e.status().await?;
                (
                    Some(st.core.ack_latency),
                    Some(e.committed().await?),
                    Some(st.core.held),
                )
            }
            None => (None, None, None),
        };
        Ok::<_, anyhow::Error>((mark0, mark1, c0, c1, h0, h1, k0, k1, held))
    };
    let run = async {
        let publish = publishers.publish(&load);
        tokio::pin!(publish);
        tokio::pin!(measure);
        let mut task = task;
        let mut measured = None;
        let mut published = None;
        while measured.is_none() || published.is_none() {
            tokio::select! {
                m = &mut measure, if measured.is_none() => measured = Some(m?),
                p = &mut publish, if published.is_none() => published = Some(p?),
                t = &mut task => {
                    t?;
                    bail!("the subject ended during the window");
                }
            }
        }
        abort.abort();
        Ok::<_, anyhow::Error>((
            measured.context("measured")?,
            published.context("published")?,
        ))
    };
    let ((mark0, mark1, c0, c1, h0, h1, k0, k1, held), published) =
        bounded(o, "a window pass", run).await?;
    let cpu = CpuSpan::between(&mark0, &mark1);
    let (per_commit, commits_per_s) = match (k0, k1) {
        (Some((r0, c0)), Some((r1, c1))) => (
            Some((r1 - r0) as f64 / (c1 - c0).max(1) as f64),
            Some((c1 - c0) as f64 / cpu.wall_s),
        ),
        _ => (None, None),
    };
    let latency = h0.zip(h1).map(|(a, b)| b.since(&a));
    if let Some(e) = edge_actor {
        e.stop(broker).await?;
    }
    publishers.close().await;
    Ok(WindowPass {
        rate: c1.saturating_sub(c0) as f64 / cpu.wall_s,
        cpu,
        published,
        latency,
        per_commit,
        commits_per_s,
        held_most: held,
    })
}

fn ms(us: Option<u64>) -> String {
    us.map_or("–".to_string(), |us| format!("{:.2}", us as f64 / 1000.0))
}

fn part2(
    rt_main: &tokio::runtime::Runtime,
    rt: &tokio::runtime::Handle,
    broker: &(String, u16),
    o: &MqttOpts,
    suffix: &str,
) -> Result<[Vec<WindowPass>; 3]> {
    let mut out: [Vec<WindowPass>; 3] = Default::default();
    for rep in 0..o.sustained_runs {
        for turn in 0..o.subjects.len() {
            let subject = o.subjects[(rep + turn) % o.subjects.len()];
            let prefix = format!("bench-{suffix}-sus-{rep}-{}", subject.index());
            let pass = rt_main.block_on(window_pass(
                rt,
                broker,
                o,
                subject,
                None,
                o.sustained_s,
                &prefix,
            ))?;
            eprintln!(
                "  sustained, rep {}/{}: {} {} readings/s (publisher waited {:.0} %, load {:.1})",
                rep + 1,
                o.sustained_runs,
                subject.short(),
                thousands(pass.rate),
                pass.published.waited_share() * 100.0,
                pass.cpu.load
            );
            out[subject.index()].push(pass);
        }
    }
    Ok(out)
}

fn print_windows_cpu(rows: &[(&str, &[WindowPass])]) {
    println!(
        "\n| case | subject CPU µs/reading | broker CPU µs/reading | subject cores | broker cores \
         | machine busy (cores) | subject threads waiting for a CPU (s per s) | publisher waited at its lead | load (1 min) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for (name, passes) in rows {
        let spans: Vec<CpuSpan> = passes.iter().map(|p| p.cpu).collect();
        let per = |f: &dyn Fn(&WindowPass) -> Option<f64>| {
            let v: Vec<f64> = passes.iter().filter_map(f).collect();
            (!v.is_empty()).then(|| med(&v))
        };
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} | {:.0} % | {} |",
            opt(
                per(&|p| Some(p.cpu.subject_s * 1e6 / (p.rate * p.cpu.wall_s).max(1.0))),
                1
            ),
            opt(
                per(&|p| p
                    .cpu
                    .broker_s
                    .map(|b| b * 1e6 / (p.rate * p.cpu.wall_s).max(1.0))),
                1
            ),
            opt(med_of(&spans, |s| cores(Some(s.subject_s), s)), 2),
            opt(med_of(&spans, |s| cores(s.broker_s, s)), 2),
            opt(med_of(&spans, |s| cores(Some(s.machine_s), s)), 2),
            opt(med_of(&spans, |s| cores(Some(s.subject_wait_s), s)), 2),
            per(&|p| Some(p.published.waited_share())).unwrap_or(0.0) * 100.0,
            load_range(&spans),
        );
    }
}

fn print_latency_rows(passes: &[WindowPass], target: Option<f64>) {
    println!(
        "\n| run | target readings/s | readings/s | acks in the window | p50 ms | p99 ms | p99.9 ms \
         | max ms | readings per commit | commits/s | most held (at the end) | edge cores | load (1 min) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for (i, p) in passes.iter().enumerate() {
        let h = p.latency.as_ref();
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.1} |",
            i + 1,
            target.map_or("as fast as it takes".to_string(), thousands),
            thousands(p.rate),
            h.map_or("–".to_string(), |h| thousands(h.total() as f64)),
            ms(h.and_then(|h| h.quantile_us(0.5))),
            ms(h.and_then(|h| h.quantile_us(0.99))),
            ms(h.and_then(|h| h.quantile_us(0.999))),
            ms(h.map(|h| h.max_us())),
            opt(p.per_commit, 0),
            opt(p.commits_per_s, 0),
            p.held_most.map_or("–".to_string(), |h| thousands(h as f64)),
            p.cpu.subject_s / p.cpu.wall_s,
            p.cpu.load,
        );
    }
}

fn print_part2(o: &MqttOpts, passes: &[Vec<WindowPass>; 3]) {
    println!(
        "\n## 2. {} device(s), sustained: {} s windows after {} s of warm-up, {} runs\n",
        o.sustained_devices, o.sustained_s, o.window_warmup_s, o.sustained_runs
    );
    let rates = |s: Subject| passes[s.index()].iter().map(|p| p.rate).collect::<Vec<_>>();
    let base = med(&rates(Subject::Rumqttc));
    println!(
        "| case | readings/s, median | min | max | ratio to raw rumqttc (medians) | goal ≥ 10,000/s |"
    );
    println!("|---|---:|---:|---:|---:|---|");
    for subject in SUBJECTS {
        let v = rates(subject);
        let (lo, hi) = range(&v);
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            subject.name(),
            thousands(med(&v)),
            thousands(lo),
            thousands(hi),
            match subject {
                Subject::Rumqttc => "baseline".to_string(),
                Subject::Edge => format!("**{}**", ratio(med(&v), base)),
                Subject::Socket => ratio(med(&v), base),
            },
            match subject {
                Subject::Edge if med(&v) >= 10_000.0 => "met",
                Subject::Edge => "missed",
                _ => "–",
            }
        );
    }
    let rows: Vec<(&str, &[WindowPass])> = SUBJECTS
        .iter()
        .map(|s| (s.short(), &passes[s.index()][..]))
        .collect();
    print_windows_cpu(&rows);
    println!(
        "\nThe edge at full rate (ack latency from arrival at the source to the PUBACK handed to the link):"
    );
    print_latency_rows(&passes[Subject::Edge.index()], None);
}

fn part3(
    rt_main: &tokio::runtime::Runtime,
    rt: &tokio::runtime::Handle,
    broker: &(String, u16),
    o: &MqttOpts,
    suffix: &str,
    rate: f64,
) -> Result<Vec<WindowPass>> {
    let mut out = Vec::new();
    for rep in 0..o.latency_runs {
        let prefix = format!("bench-{suffix}-lat-{rep}");
        let pass = rt_main.block_on(window_pass(
            rt,
            broker,
            o,
            Subject::Edge,
            Some(rate),
            o.latency_s,
            &prefix,
        ))?;
        let h = pass.latency.as_ref();
        eprintln!(
            "  latency, rep {}/{}: {} readings/s, p50 {} ms, p99 {} ms (load {:.1})",
            rep + 1,
            o.latency_runs,
            thousands(pass.rate),
            ms(h.and_then(|h| h.quantile_us(0.5))),
            ms(h.and_then(|h| h.quantile_us(0.99))),
            pass.cpu.load
        );
        out.push(pass);
    }
    Ok(out)
}

fn print_part3(o: &MqttOpts, passes: &[WindowPass], rate: f64, from: &str) {
    println!(
        "\n## 3. Ack latency at half the maximum: {} device(s) paced at {} readings/s ({from}), \
         {} s windows after {} s of warm-up, {} runs\n",
        o.sustained_devices,
        thousands(rate),
        o.latency_s,
        o.window_warmup_s,
        o.latency_runs
    );
    println!(
        "Measured: `MqttStatus.ack_latency` over the window, from a message's arrival at the \
         source (the source actor handling the link's batch) to its PUBACK handed to the link, \
         after the gateway's answer that follows the outbox's fsync."
    );
    print_latency_rows(passes, Some(rate));
    let mut all = Histogram::default();
    for p in passes {
        if let Some(h) = &p.latency {
            all.merge(h);
        }
    }
    let (p50, p99) = (all.quantile_us(0.5), all.quantile_us(0.99));
    let p50s: Vec<f64> = passes
        .iter()
        .filter_map(|p| p.latency.as_ref()?.quantile_us(0.5))
        .map(|v| v as f64 / 1000.0)
        .collect();
    let p99s: Vec<f64> = passes
        .iter()
        .filter_map(|p| p.latency.as_ref()?.quantile_us(0.99))
        .map(|v| v as f64 / 1000.0)
        .collect();
    let (a, b) = range(&p50s);
    let (c, d) = range(&p99s);
    println!(
        "\nAll runs together: p50 {} ms (runs {a:.2}–{b:.2}), p99 {} ms (runs {c:.2}–{d:.2}), {} acks. \
         Goal p50 ≤ 5 ms: {}; p99 ≤ 20 ms: {}.",
        ms(p50),
        ms(p99),
        thousands(all.total() as f64),
        if p50.is_some_and(|v| v <= 5_000) { "met" } else { "missed" },
        if p99.is_some_and(|v| v <= 20_000) { "met" } else { "missed" },
    );
    print_windows_cpu(&[("edge, paced", passes)]);
}

pub fn run(o: &MqttOpts) -> Result<()> {
    if o.publishers == 0 || o.lead_max == 0 || o.readings == 0 {
        bail!("--publishers, --lead-max and --readings must be positive");
    }
    if o.devices.contains(&0) || o.sustained_devices == 0 {
        bail!("device counts must be positive");
    }
    let broker = split_broker(&o.broker)?;
    println!(
        "mqtt: broker {}, {} publisher connection(s), QoS 1, lead at most {}; edge: MqttConfig::new \
         and OutboxConfig::default(), sled cache {} bytes, stores in {}; broker pid {:?}",
        o.broker,
        o.publishers,
        thousands(o.lead_max as f64),
        SLED_CACHE_BYTES,
        o.dir.display(),
        o.broker_pid,
    );
    let rt_main = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the main runtime")?;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .thread_name("bench-subject")
        .enable_all()
        .build()
        .context("building the subject runtime")?;
    let suffix = unique_suffix();
    // `--runs 0` skips part 1.
    let counts = if o.runs > 0 {
        part1(&rt_main, rt.handle(), &broker, o, &suffix)?
    } else {
        Vec::new()
    };
    if !counts.is_empty() {
        print_part1(o, &counts);
    }
    let sustained = if o.sustained_s > 0 {
        let s = part2(&rt_main, rt.handle(), &broker, o, &suffix)?;
        print_part2(o, &s);
        Some(s)
    } else {
        None
    };
    if o.latency_s > 0 {
        let (max, from) = match (&o.latency_rate, &sustained) {
            (Some(r), _) => (r * 2.0, "--latency-rate".to_string()),
            (None, Some(s)) => (
                med(&s[Subject::Edge.index()]
                    .iter()
                    .map(|p| p.rate)
                    .collect::<Vec<_>>()),
                "half the edge's sustained median".to_string(),
            ),
            (None, None) => match counts.iter().find(|c| c.devices == o.sustained_devices) {
                Some(c) => (
                    med(&c.subjects[Subject::Edge.index()].rates),
                    format!(
                        "half the edge's median at {} device(s) in part 1",
                        c.devices
                    ),
                ),
                None => bail!(
                    "--latency-s needs a maximum: --sustained-s, --latency-rate, or \
                     --sustained-devices among --devices"
                ),
            },
        };
        let rate = max / 2.0;
        let passes = part3(&rt_main, rt.handle(), &broker, o, &suffix, rate)?;
        print_part3(o, &passes, rate, &from);
    }
    rt.shutdown_timeout(Duration::from_secs(5));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hand_encoded_publish_decodes_as_rumqttc_reads_it() {
        let mut out = BytesMut::new();
        let mut body = String::new();
        payload(&mut body, 42);
        // A topic long enough for a two-byte remaining length.
        let topic = format!("bench/{}/telemetry", "d".repeat(200));
        encode_publish(&mut out, topic.as_bytes(), 7, body.as_bytes());
        match RawPacket::read(&mut out, PACKET_BYTES_MAX) {
            Ok(RawPacket::Publish(p)) => {
                assert_eq!(p.pkid, 7);
                assert_eq!(p.qos, QoS::AtLeastOnce);
                assert_eq!(p.topic, topic);
                assert_eq!(&p.payload[..], body.as_bytes());
            }
            other => panic!("{other:?}"),
        }
        assert!(out.is_empty());
    }

    #[test]
    fn the_payload_is_the_json_the_source_parses() {
        let mut body = String::new();
        payload(&mut body, 1234);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["n"], 1234);
        assert!(v["ts"].as_i64().unwrap() > 1_600_000_000_000);
        assert!((v["v"].as_f64().unwrap() - 22.34).abs() < 1e-9);
        let config = MqttConfig::new("h", 1, "c", "p/+/t").unwrap();
        tributary_actors::edge::mqtt::parse_message(
            &config.topic,
            config.device_level,
            "p/dev-0001/t",
            body.as_bytes(),
        )
        .unwrap();
    }
}

//! `bench mqtt`: MQTT ingest on one edge node against a raw MQTT subscriber
//! on the same broker, in the same run.
//!
//! - The publisher: rumqttc at QoS 1, `devices` devices publishing JSON
//!   `{"ts": <ms>, "temperature": <°C>}` to `<prefix>/<device>/telemetry`,
//!   `readings` messages in all, as fast as the broker takes them, but never
//!   more than `lead_max` ahead of what the subscriber under test has taken:
//!   Mosquitto drops, silently, a session's messages past its
//!   `max_queued_messages`, so an unbounded lead would lose readings instead
//!   of measuring them.
//! - The baseline: a raw rumqttc subscriber at QoS 1 (acks as it receives).
//!   Its figure is the time from the first publish to the last message
//!   received.
//! - The edge: the project's `MqttSource` (one `MqttDevice` actor per device)
//!   feeding the `Gateway`, which owns an outbox on sled in a temp dir, with
//!   the node's defaults (segments of 1000 readings, 50 ms commit interval,
//!   16 MiB sled cache, marks fsynced before each PUBACK) and an outbox budget
//!   nothing reaches. No uplink runs: segments stay in the outbox. Its figure
//!   is the time from the first publish to the gateway reporting the last
//!   reading committed (fsynced) in the outbox.
//!
//! Each runs on its own topic prefix, one after the other, in an order that
//! alternates between repetitions. Both run in this process on one tokio
//! runtime with the publisher, so they compete for the same cores.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tributary_actors::edge::gateway::{Gateway, GatewayArgs, GatewayMsg, StoreFactory};
use tributary_actors::edge::mqtt::config::REQUEST_HEADROOM;
use tributary_actors::edge::mqtt::{MqttConfig, MqttMsg, MqttSource, MqttSourceArgs, MQTT_NAME};
use tributary_actors::edge::{EdgeNames, GATEWAY_NAME};
use tributary_actors::outbox::{FullPolicy, OutboxConfig, OutboxStore, SledStore};

use crate::log::unique_suffix;
use crate::stats::{print_cpu_table, print_table, process_cpu_s, thousands, CpuPerReading, Series};

/// Publishes a client may have unacknowledged: enough that the publisher is
/// never waiting on the broker's PUBACKs round trip.
const PUBLISH_INFLIGHT: u16 = 1000;
/// rumqttc's request channel for every client here.
const REQUEST_CHANNEL_CAP: usize = 1024;
/// The raw subscriber's request channel: with delayed acks, every message
/// held may have its PUBACK queued at once.
const RAW_REQUEST_CHANNEL_CAP: usize = 1 << 20;
const KEEP_ALIVE_MS: u64 = 30_000;
const PACKET_BYTES_MAX: usize = 256 * 1024;
/// Bound on connecting, subscribing, and a session's set-up or clean-up.
const CONNECT_TIMEOUT_MS: u64 = 10_000;
/// How often the gateway is asked how many readings it committed: the edge
/// figure's resolution.
const PROGRESS_POLL_MS: u64 = 5;
/// How long a publisher at its lead waits before it looks again, in case
/// a wake-up came between its look and its wait.
const LEAD_RECHECK_MS: u64 = 10;
/// Bound on one call to an edge actor, and on stopping one.
const ACTOR_CALL_MS: u64 = 10_000;
/// Outbox budget: nothing blocks in a run.
const OUTBOX_BYTES_MAX: u64 = 1 << 40;
/// The node's defaults (node/src/config.rs).
const SEGMENT_BYTES_MAX: usize = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct MqttOpts {
    /// host:port of the broker.
    pub broker: String,
    pub readings: u64,
    pub devices: usize,
    pub publishers: usize,
    pub runs: usize,
    pub warmup: usize,
    pub lead_max: u64,
    /// The MQTT source's `inflight_max`.
    pub inflight_max: usize,
    /// The MQTT source's `queued_requests_max` (raised to inflight_max + headroom).
    pub queued_requests_max: usize,
    pub segment_readings: usize,
    pub commit_interval_ms: u64,
    pub cache_bytes_max: u64,
    pub dir: PathBuf,
    pub broker_pid: Option<u32>,
    pub timeout_s: u64,
}

/// How far the subscriber under test has got; the publishers wait on it.
#[derive(Default)]
struct Progress {
    consumed: AtomicU64,
    notify: Notify,
}

impl Progress {
    fn set(&self, consumed: u64) {
        self.consumed.store(consumed, Ordering::Release);
        self.notify.notify_waiters();
    }
}

fn split_broker(broker: &str) -> Result<(String, u16)> {
    let (host, port) = broker
        .rsplit_once(':')
        .with_context(|| format!("--broker {broker:?} is not host:port"))?;
    Ok((host.to_string(), port.parse().context("the broker's port")?))
}

fn options(broker: &(String, u16), client_id: &str, clean: bool) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, broker.0.clone(), broker.1);
    o.set_clean_session(clean)
        .set_keep_alive(Duration::from_millis(KEEP_ALIVE_MS))
        .set_max_packet_size(PACKET_BYTES_MAX, PACKET_BYTES_MAX)
        .set_inflight(PUBLISH_INFLIGHT);
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

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Connected publishers, ready to send.
struct Publishers {
    clients: Vec<(AsyncClient, JoinHandle<Result<()>>)>,
}

impl Publishers {
    async fn connect(broker: &(String, u16), o: &MqttOpts, tag: &str) -> Result<Self> {
        let mut clients = Vec::new();
        for p in 0..o.publishers {
            let id = format!("bench-pub-{tag}-{p}");
            let (client, mut events) =
                AsyncClient::new(options(broker, &id, true), REQUEST_CHANNEL_CAP);
            poll_until(&mut events, "connecting a publisher", is_connack).await?;
            let driver = tokio::spawn(async move {
                loop {
                    let e = events
                        .poll()
                        .await
                        .map_err(|e| anyhow!("a publisher's connection: {e}"))?;
                    if is_disconnect(&e) {
                        return Ok(());
                    }
                }
            });
            clients.push((client, driver));
        }
        Ok(Self { clients })
    }

    /// Sends every reading, spread over the publishers by device, each
    /// device's `ts` strictly growing. Returns when all are handed to rumqttc.
    async fn publish(&self, prefix: &str, o: &MqttOpts, progress: Arc<Progress>) -> Result<()> {
        let per_device = o.readings / o.devices as u64;
        // In the past, so the edge's clock and the devices' agree on order.
        let base_ms = unix_ms() - per_device as i64 - 1000;
        let published = Arc::new(AtomicU64::new(0));
        let mut senders = Vec::new();
        for (p, (client, _)) in self.clients.iter().enumerate() {
            let client = client.clone();
            let topics: Vec<String> = (p..o.devices)
                .step_by(o.publishers)
                .map(|d| format!("{prefix}/dev-{d:04}/telemetry"))
                .collect();
            let (progress, published, lead_max) = (progress.clone(), published.clone(), o.lead_max);
            senders.push(tokio::spawn(async move {
                for k in 0..per_device {
                    for topic in &topics {
                        loop {
                            let waiting = progress.notify.notified();
                            let ahead = published
                                .load(Ordering::Relaxed)
                                .saturating_sub(progress.consumed.load(Ordering::Acquire));
                            if ahead < lead_max {
                                break;
                            }
                            let _ = tokio::time::timeout(
                                Duration::from_millis(LEAD_RECHECK_MS),
                                waiting,
                            )
                            .await;
                        }
                        let payload = format!(
                            "{{\"ts\": {}, \"temperature\": {:.1}}}",
                            base_ms + k as i64,
                            21.5 + (k % 10) as f64 * 0.1
                        );
                        client
                            .publish(topic.as_str(), QoS::AtLeastOnce, false, payload)
                            .await
                            .map_err(|e| anyhow!("publishing: {e}"))?;
                        published.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok::<(), anyhow::Error>(())
            }));
        }
        for s in senders {
            s.await??;
        }
        Ok(())
    }

    async fn close(self) {
        for (client, mut driver) in self.clients {
            let _ = client.disconnect().await;
            // The driver ends once the DISCONNECT is out; abort covers a
            // connection that never gets there.
            let ended =
                tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), &mut driver).await;
            if ended.is_err() {
                driver.abort();
            }
        }
    }
}

/// What one subject measured in one run.
struct Pass {
    took: Duration,
    own_cpu_s: f64,
    broker_cpu_s: Option<f64>,
    /// Readings per outbox commit (the edge only).
    per_commit: Option<f64>,
    /// Readings the broker delivered after a newer one of their device (the
    /// raw subscriber checks; the edge's source counts them).
    out_of_order: u64,
    /// The most messages held unacked at once.
    held_most: usize,
}

fn broker_cpu(o: &MqttOpts) -> Option<f64> {
    o.broker_pid.map(|p| process_cpu_s(&p.to_string()))
}

/// Runs the publishers and waits, bounded, for `task` (which returns when the
/// last reading is in). A task that fails ends the wait at once: the
/// publishers would otherwise wait on it for their lead forever.
async fn finish<T>(
    mut task: JoinHandle<Result<T>>,
    publish: impl std::future::Future<Output = Result<()>>,
    o: &MqttOpts,
) -> Result<T> {
    let limit = Duration::from_secs(o.timeout_s);
    let work = async {
        tokio::pin!(publish);
        tokio::select! {
            published = &mut publish => {
                published?;
                task.await?
            }
            consumed = &mut task => {
                let end = consumed??;
                publish.await?;
                Ok(end)
            }
        }
    };
    tokio::time::timeout(limit, work)
        .await
        .map_err(|_| anyhow!("the run took more than --timeout-s {}", o.timeout_s))?
}

/// How the raw subscriber acknowledges.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Acks {
    /// rumqttc's automatic PUBACK on receipt: the baseline.
    OnReceipt,
    /// Each PUBACK sent this long after its message arrived, as the edge's
    /// acks wait for an outbox commit; a reading counts once acked.
    After(Duration),
}

/// Counts messages that arrive with a `ts` below one already seen for their
/// topic (their device): the broker's delivery order, seen by a subscriber.
#[derive(Default)]
struct OrderCheck {
    latest: HashMap<String, i64>,
    out_of_order: u64,
}

impl OrderCheck {
    fn see(&mut self, topic: &str, payload: &[u8]) {
        // The publisher's own format: `{"ts": <digits>, ...`.
        const KEY: &[u8] = b"\"ts\": ";
        let Some(at) = payload.windows(KEY.len()).position(|w| w == KEY) else {
            return;
        };
        let ts = payload[at + KEY.len()..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .fold(0i64, |n, b| n * 10 + i64::from(b - b'0'));
        match self.latest.get_mut(topic) {
            Some(last) if ts < *last => self.out_of_order += 1,
            Some(last) => *last = ts,
            None => {
                self.latest.insert(topic.to_string(), ts);
            }
        }
    }
}

async fn raw_pass(broker: &(String, u16), o: &MqttOpts, prefix: &str, acks: Acks) -> Result<Pass> {
    let filter = format!("{prefix}/+/telemetry");
    let id = format!("bench-raw-{}", prefix.replace('/', "-"));
    let mut opts = options(broker, &id, true);
    opts.set_manual_acks(acks != Acks::OnReceipt);
    // Delayed acks wait in rumqttc's request channel too: room for a backlog.
    let (client, mut events) = AsyncClient::new(opts, RAW_REQUEST_CHANNEL_CAP);
    poll_until(&mut events, "connecting the raw subscriber", is_connack).await?;
    client
        .subscribe(filter.as_str(), QoS::AtLeastOnce)
        .await
        .map_err(|e| anyhow!("subscribing: {e}"))?;
    poll_until(&mut events, "subscribing the raw subscriber", is_suback).await?;
    let publishers = Publishers::connect(broker, o, &format!("raw-{}", std::process::id())).await?;

    let progress = Arc::new(Progress::default());
    let n = o.readings;
    let (p, acker) = (progress.clone(), client.clone());
    let subscriber = tokio::spawn(async move {
        let mut order = OrderCheck::default();
        let mut held: VecDeque<(tokio::time::Instant, rumqttc::Publish)> = VecDeque::new();
        let mut held_most = 0usize;
        let mut done = 0u64;
        loop {
            let due = held.front().map(|(at, _)| *at);
            tokio::select! {
                event = events.poll() => match event {
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        order.see(&publish.topic, &publish.payload);
                        match acks {
                            Acks::OnReceipt => {
                                done += 1;
                                p.set(done);
                            }
                            Acks::After(delay) => {
                                held.push_back((tokio::time::Instant::now() + delay, publish));
                                held_most = held_most.max(held.len());
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => bail!("the raw subscriber's connection: {e}"),
                },
                _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)),
                    if due.is_some() => {
                    let now = tokio::time::Instant::now();
                    while held.front().is_some_and(|(at, _)| *at <= now) {
                        if let Some((_, publish)) = held.pop_front() {
                            acker
                                .try_ack(&publish)
                                .map_err(|e| anyhow!("queueing a PUBACK: {e}"))?;
                            done += 1;
                        }
                    }
                    p.set(done);
                }
            }
            if done == n {
                return Ok((Instant::now(), order.out_of_order, held_most));
            }
        }
    });
    let (cpu0, broker0) = (process_cpu_s("self"), broker_cpu(o));
    let start = Instant::now();
    let (end, out_of_order, held_most) =
        finish(subscriber, publishers.publish(prefix, o, progress), o).await?;
    let took = end.duration_since(start);
    let pass = Pass {
        took,
        own_cpu_s: process_cpu_s("self") - cpu0,
        broker_cpu_s: broker_cpu(o).zip(broker0).map(|(b1, b0)| b1 - b0),
        per_commit: None,
        out_of_order,
        held_most,
    };
    publishers.close().await;
    let _ = client.disconnect().await;
    Ok(pass)
}

/// Creates the source's persistent session with its subscription before the
/// source connects, so that nothing published from the first instant is lost
/// while the source is still subscribing.
async fn prepare_session(
    broker: &(String, u16),
    id: &str,
    filter: &str,
    clean: bool,
) -> Result<()> {
    let (client, mut events) = AsyncClient::new(options(broker, id, clean), REQUEST_CHANNEL_CAP);
    poll_until(&mut events, "opening the source's session", is_connack).await?;
    if !clean {
        client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .map_err(|e| anyhow!("subscribing the session: {e}"))?;
        poll_until(&mut events, "subscribing the source's session", is_suback).await?;
    }
    client
        .disconnect()
        .await
        .map_err(|e| anyhow!("closing the session's set-up: {e}"))?;
    // Until the DISCONNECT is on the wire: the session then ends as asked.
    poll_until(&mut events, "closing the session's set-up", is_disconnect).await
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

async fn gateway_committed(gateway: &ActorRef<GatewayMsg>) -> Result<(u64, u64)> {
    let s = ractor::call_t!(gateway, GatewayMsg::Status, ACTOR_CALL_MS)
        .map_err(|e| anyhow!("asking the gateway for its status: {e}"))?;
    Ok((s.stats.readings_committed, s.stats.segments_committed))
}

async fn edge_pass(broker: &(String, u16), o: &MqttOpts, prefix: &str) -> Result<Pass> {
    let dir = tempfile::Builder::new()
        .prefix("tributary-bench-mqtt-")
        .tempdir_in(&o.dir)
        .with_context(|| format!("creating a directory in {}", o.dir.display()))?;
    let outbox_dir = dir.path().join("outbox");
    let cache = o.cache_bytes_max;
    let store: StoreFactory =
        Arc::new(
            move || Ok(Box::new(SledStore::open(&outbox_dir, cache)?) as Box<dyn OutboxStore>),
        );
    let gateway_args = GatewayArgs {
        store,
        outbox: OutboxConfig {
            outbox_bytes_max: OUTBOX_BYTES_MAX,
            segment_readings_max: o.segment_readings,
            segment_bytes_max: SEGMENT_BYTES_MAX,
            commit_interval_ms: o.commit_interval_ms,
            full_policy: FullPolicy::Block,
        },
        ack_log: None,
        // Every reading goes to the outbox as it comes, as with no topology.
        stages: None,
        names: EdgeNames::default(),
        clock: tributary_actors::clock::system(),
        device_clock_skew_max_ms: 300_000,
    };
    let ended: Ended = Arc::default();
    let (watcher, _) = Actor::spawn(None, Watcher, ended.clone())
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

    let filter = format!("{prefix}/+/telemetry");
    let id = format!("bench-edge-{}", prefix.replace('/', "-"));
    prepare_session(broker, &id, &filter, false).await?;
    let mut config = MqttConfig::new(broker.0.clone(), broker.1, id.clone(), filter)?;
    config.inflight_max = o.inflight_max;
    config.queued_requests_max = o.queued_requests_max.max(o.inflight_max + REQUEST_HEADROOM);
    config.devices_max = config.devices_max.max(o.devices);
    config.device_inflight_max = config.inflight_max;
    let source_args = MqttSourceArgs::new(
        config,
        EdgeNames::default(),
        tributary_actors::clock::system(),
    );
    let (source, _) = Actor::spawn_linked(
        Some(MQTT_NAME.to_string()),
        MqttSource,
        source_args,
        watcher.get_cell(),
    )
    .await
    .map_err(|e| anyhow!("starting the MQTT source: {e}"))?;
    let connected = async {
        loop {
            let s = ractor::call_t!(source, MqttMsg::Status, ACTOR_CALL_MS)
                .map_err(|e| anyhow!("asking the MQTT source for its status: {e}"))?;
            if s.core.connected {
                return Ok::<(), anyhow::Error>(());
            }
            tokio::time::sleep(Duration::from_millis(PROGRESS_POLL_MS)).await;
        }
    };
    tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), connected)
        .await
        .map_err(|_| anyhow!("the MQTT source did not connect in {CONNECT_TIMEOUT_MS} ms"))??;
    let publishers =
        Publishers::connect(broker, o, &format!("edge-{}", std::process::id())).await?;

    let progress = Arc::new(Progress::default());
    let n = o.readings;
    let (p, g, e, src) = (
        progress.clone(),
        gateway.clone(),
        ended.clone(),
        source.clone(),
    );
    let poller = tokio::spawn(async move {
        // Polled, not pushed: the gateway has no subscription for commits.
        let mut held_most = 0usize;
        loop {
            if let Some(reason) = ended_reason(&e) {
                bail!("an edge actor ended during the run: {reason}");
            }
            let (committed, _) = gateway_committed(&g).await?;
            p.set(committed);
            if committed >= n {
                return Ok((Instant::now(), held_most));
            }
            if let Ok(s) = ractor::call_t!(src, MqttMsg::Status, ACTOR_CALL_MS) {
                held_most = held_most.max(s.core.held);
            }
            tokio::time::sleep(Duration::from_millis(PROGRESS_POLL_MS)).await;
        }
    });
    let (cpu0, broker0) = (process_cpu_s("self"), broker_cpu(o));
    let start = Instant::now();
    let (end, held_most) =
        match finish(poller, publishers.publish(prefix, o, progress.clone()), o).await {
            Ok(done) => done,
            Err(e) => {
                let status = ractor::call_t!(source, MqttMsg::Status, ACTOR_CALL_MS)
                    .map_err(|e| format!("{e} (the source is {:?})", source.get_status()));
                bail!(
                    "{e}: the gateway committed {} of {n} readings; the source: {status:?}",
                    progress.consumed.load(Ordering::Acquire)
                );
            }
        };
    let took = end.duration_since(start);
    let own_cpu_s = process_cpu_s("self") - cpu0;
    let broker_cpu_s = broker_cpu(o).zip(broker0).map(|(b1, b0)| b1 - b0);

    let (committed, segments) = gateway_committed(&gateway).await?;
    let status = ractor::call_t!(source, MqttMsg::Status, ACTOR_CALL_MS)
        .map_err(|e| anyhow!("asking the MQTT source for its status: {e}"))?;
    if committed != n || status.core.stats.bad_payload != 0 {
        bail!(
            "the edge committed {committed} readings of {n} (source: {:?})",
            status.core.stats
        );
    }
    publishers.close().await;
    source
        .stop_and_wait(None, Some(Duration::from_millis(ACTOR_CALL_MS)))
        .await
        .map_err(|e| anyhow!("stopping the MQTT source: {e}"))?;
    gateway
        .stop_and_wait(None, Some(Duration::from_millis(ACTOR_CALL_MS)))
        .await
        .map_err(|e| anyhow!("stopping the gateway: {e}"))?;
    watcher.stop(None);
    // A clean connect ends the persistent session, which the broker would
    // otherwise keep in memory.
    prepare_session(broker, &id, "", true).await?;
    Ok(Pass {
        took,
        own_cpu_s,
        broker_cpu_s,
        per_commit: Some(committed as f64 / segments.max(1) as f64),
        out_of_order: 0,
        held_most,
    })
}

/// One subject's runs.
struct Subject {
    /// How the raw subscriber acks; `None` for the edge.
    acks: Option<Acks>,
    series: Series,
    cpu: CpuPerReading,
    per_commit: Vec<f64>,
    out_of_order: u64,
    held_most: usize,
}

impl Subject {
    fn new(name: &str, acks: Option<Acks>, o: &MqttOpts, bytes: u64) -> Self {
        Self {
            acks,
            series: Series::new(name, o.readings, bytes),
            cpu: CpuPerReading::new(name),
            per_commit: Vec::new(),
            out_of_order: 0,
            held_most: 0,
        }
    }

    fn record(&mut self, pass: Pass, readings: u64) {
        self.series.push(pass.took);
        self.cpu.push(pass.own_cpu_s, pass.broker_cpu_s, readings);
        self.per_commit.extend(pass.per_commit);
        self.out_of_order += pass.out_of_order;
        self.held_most = self.held_most.max(pass.held_most);
    }
}

pub fn run(o: &MqttOpts) -> Result<()> {
    if o.devices == 0 || o.publishers == 0 || o.lead_max == 0 {
        bail!("--devices, --publishers and --lead-max must be positive");
    }
    if !o.readings.is_multiple_of(o.devices as u64) || o.readings == 0 {
        bail!("--readings must be a positive multiple of --devices");
    }
    let broker = split_broker(&o.broker)?;
    println!(
        "mqtt: {} readings per run from {} devices over {} publisher connection(s), QoS 1, \
         lead at most {}, broker {}; edge: inflight_max {}, queued_requests_max {}, segments of {}, commit interval \
         {} ms, sled cache {} bytes, stores in {}; {} runs after {} warm-up",
        thousands(o.readings as f64),
        o.devices,
        o.publishers,
        thousands(o.lead_max as f64),
        o.broker,
        o.inflight_max,
        o.queued_requests_max,
        o.segment_readings,
        o.commit_interval_ms,
        o.cache_bytes_max,
        o.dir.display(),
        o.runs,
        o.warmup,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    // The JSON payload's size, for MB/s.
    let payload_bytes = format!("{{\"ts\": {}, \"temperature\": 21.5}}", unix_ms()).len() as u64;
    let bytes = payload_bytes * o.readings;
    let ack_delay = Duration::from_millis(o.commit_interval_ms);
    let mut subjects = [
        Subject::new(
            "raw rumqttc subscriber, QoS 1",
            Some(Acks::OnReceipt),
            o,
            bytes,
        ),
        Subject::new(
            &format!(
                "raw subscriber, each PUBACK {} ms late",
                o.commit_interval_ms
            ),
            Some(Acks::After(ack_delay)),
            o,
            bytes,
        ),
        Subject::new(
            "edge: MqttSource → Gateway → outbox on sled",
            None,
            o,
            bytes,
        ),
    ];
    let suffix = unique_suffix();
    let count = subjects.len();
    for rep in 0..o.warmup + o.runs {
        let timed = rep >= o.warmup;
        for turn in 0..count {
            let index = (rep + turn) % count;
            let subject = &mut subjects[index];
            let prefix = format!("bench-{suffix}-{rep}-{index}");
            let pass = match subject.acks {
                Some(acks) => rt.block_on(raw_pass(&broker, o, &prefix, acks))?,
                None => rt.block_on(edge_pass(&broker, o, &prefix))?,
            };
            if timed {
                subject.record(pass, o.readings);
            }
        }
        eprintln!("  repetition {}/{} done", rep + 1, o.warmup + o.runs);
    }
    let [raw, late, edge] = &subjects;
    print_table(
        "MQTT ingest on one edge, QoS 1, readings/s from the first publish to the last in",
        &[
            (&raw.series, None),
            (&late.series, Some(&raw.series)),
            (&edge.series, Some(&raw.series)),
        ],
    );
    print_cpu_table(&[&raw.cpu, &late.cpu, &edge.cpu]);
    println!(
        "\n| case | delivered after a newer reading of their device | most held unacked at once \
         | readings per outbox commit (median) |"
    );
    println!("|---|---:|---:|---:|");
    for s in &subjects {
        let mut per_commit = s.per_commit.clone();
        per_commit.sort_by(f64::total_cmp);
        println!(
            "| {} | {} of {} | {} | {} |",
            s.series.name,
            thousands(s.out_of_order as f64),
            thousands((o.readings * o.runs as u64) as f64),
            thousands(s.held_most as f64),
            if per_commit.is_empty() {
                "–".to_string()
            } else {
                format!("{:.0}", crate::stats::median(&per_commit))
            },
        );
    }
    println!(
        "\ngoal: the edge at >= 0.80 of the raw subscriber: {:.2} ({:.2} of the raw subscriber \
         with late PUBACKs)",
        edge.series.median_rate() / raw.series.median_rate().max(1e-9),
        edge.series.median_rate() / late.series.median_rate().max(1e-9),
    );
    Ok(())
}

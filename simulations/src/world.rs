//! One deterministic run of real edge and cloud code in a simulated world.
//!
//! Each node is a turmoil host: its actors (the gateway, the uplink, the
//! simulated devices, the cloud's listener and ingest actors) are the ones a
//! `node` process runs, built from the same arguments. Only the side effects
//! are simulated, each behind the trait the real code already uses:
//! - **network:** QUIC (quinn, rustls with mutual TLS) over turmoil's UDP
//!   ([`tributary_cluster::net::TurmoilNetwork`]), where partitions, loss and
//!   latency are injected;
//! - **disk:** the outbox's [`OutboxStore`] is a [`MemoryStore`] that loses
//!   unsynced writes (and can tear one) when its host crashes;
//! - **log:** the cloud writes through [`LogSink`] into a [`MemoryLog`] with
//!   transactions and fencing, which outlives cloud crashes as a broker does;
//! - **clock:** readings are stamped by a [`Clock`] on simulated time, with a
//!   per-edge skew;
//! - **MQTT:** an MQTT-fed edge runs the real `MqttSource`, whose link
//!   reaches a simulated [`Broker`] with publishers (see [`crate::broker`]);
//!   the broker lives in the world, so its sessions outlive edge crashes.
//!
//! **The checks.** Readings of simulated devices are keyed (device, ts) and
//! compared with each edge's gateway ack log. MQTT readings are keyed
//! (device, n), `n` being the publisher's sequence number in the payload
//! (several readings of a device share a millisecond), and compared with
//! what the broker accepted from its publishers: at the end, the log must
//! hold no duplicate and nothing no publisher sent, each device's in order;
//! once the faults end and the backlog drains, every accepted message must
//! be in it (less what `drop-oldest` evicted, by the ack log's `D` lines).
//!
//! turmoil steps every host one millisecond at a time on one thread, so a
//! seed replays the same run. The driver injects the plan's faults, samples
//! each edge, and checks the invariants when the run ends.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ractor::ActorRef;
use tributary_actors::clock::Clock;
use tributary_actors::cloud::{CloudArgs, Listener};
use tributary_actors::edge::gateway::{EdgeStages, GatewayArgs, GatewayMsg, StoreFactory};
use tributary_actors::edge::mqtt::config::REQUEST_HEADROOM;
use tributary_actors::edge::mqtt::link::MqttConnector;
use tributary_actors::edge::mqtt::{MqttConfig, MqttMsg, MqttSourceStatus};
use tributary_actors::edge::uplink::{UplinkArgs, UplinkMsg};
use tributary_actors::edge::{start_edge, DevicesConfig, EdgeArgs, EdgeNames};
use tributary_actors::outbox::{
    segment, MemoryStore, OutboxConfig, OutboxStore, StateChange, StoreError, StoreMeta,
};
use tributary_actors::pipeline::StageRestarts;
use tributary_actors::reading::Value;
use tributary_actors::sink::memory::MemoryLog;
use tributary_actors::sink::{
    EdgeCommit, EdgeLogWriter, Hwm, LogSink, Marks, SegmentBatch, ShardLogWriter, SinkCalls,
    SinkError,
};
use tributary_actors::topology::{ComponentKind, Simulated, Source, Topology};
use tributary_cluster::net::TurmoilNetwork;
use tributary_cluster::quic::QuicConfig;
use tributary_cluster::tls::{self, NodeId, NodeIdentity, Role};
use tributary_cluster::uplink::link::{CloudTarget, EdgeConnector};
use tributary_cluster::uplink::{EdgeUplinkConfig, IngestConfig};

use crate::broker::{lock, Broker, BrokerSpec, ForgetSameTs, Published, SimConnector};
use crate::report::{EdgeSample, Sample, Timeline, TimelineEvent};
use crate::scenario::{FaultKind, Params, Plan, Scenario};

/// The simulated calendar starts here (2026-01-01T00:00:00Z), whatever the
/// real date, so that readings' timestamps replay too.
const EPOCH_US: i64 = 1_767_225_600_000_000;
const CLOUD_HOST: &str = "cloud";
/// The second cloud node, when the plan has two; faults strike only the first.
const CLOUD_B_HOST: &str = "cloud-b";
const CLOUD_PORT: u16 = 4433;
const FRAME_BYTES_MAX: usize = 1 << 20;
const TICK_MS: u64 = 1;
const COMMIT_INTERVAL_MS: u64 = 50;
const SAMPLE_INTERVAL_MS: u64 = 250;
/// How long a host whose software ended on its own (its supervisor gave up)
/// stays down before the "service manager" starts it again.
const SERVICE_RESTART_MS: u64 = 1_000;
/// A run never lasts longer than this much simulated time past its drain
/// budget, whatever the plan says.
const RUN_SLACK_MS: u64 = 10_000;
/// Readings a single run may see; beyond that the checks would cost more
/// than the run, so the run is refused up front.
pub const READINGS_PER_RUN_MAX: u64 = 5_000_000;

/// A deliberately broken variant of the system, to prove that the checks
/// would catch the real bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    /// The outbox's disk reports every other sync as done without doing it,
    /// so the gateway acknowledges readings before they are durable.
    AckBeforeFsync,
    /// The cloud's log forgets the edges' high-water marks, so a reconnecting
    /// edge's resent segments are written again.
    ForgetHwm,
    /// The MQTT source's old redelivery rule: a message whose (device, ts)
    /// was seen before is acknowledged and dropped, so the second of two
    /// readings of a device in one millisecond is lost.
    DedupByDeviceTs,
    /// The MQTT link loses the acks the source gave just before asking for
    /// a reconnect (after an overflow): what `TcpLink` does today when an
    /// ack and the reconnect come in one batch of requests. The broker
    /// resends what they acked, more than the source holds, so it overflows
    /// again: a livelock, caught as a backlog that never drains.
    AcksLostOnReconnect,
    /// The second cloud node names its shard writers apart from the
    /// first's, so that opening a shard there fences nothing here: two
    /// cloud nodes can then both commit one edge's segments.
    SplitBrainShards,
}

impl Mutation {
    pub const ALL: [Mutation; 5] = [
        Mutation::AckBeforeFsync,
        Mutation::ForgetHwm,
        Mutation::DedupByDeviceTs,
        Mutation::AcksLostOnReconnect,
        Mutation::SplitBrainShards,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mutation::AckBeforeFsync => "ack-before-fsync",
            Mutation::ForgetHwm => "forget-hwm",
            Mutation::DedupByDeviceTs => "dedup-device-ts",
            Mutation::AcksLostOnReconnect => "acks-lost-on-reconnect",
            Mutation::SplitBrainShards => "split-brain-shards",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// An edge node of the simulated cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct EdgeSpec {
    pub id: String,
    pub labels: Vec<String>,
}

impl EdgeSpec {
    /// An edge node with the labels a topology's selectors match.
    pub fn new(id: impl Into<String>, labels: &[&str]) -> Self {
        Self {
            id: id.into(),
            labels: labels.iter().map(|l| l.to_string()).collect(),
        }
    }
}

/// Everything one run needs.
#[derive(Clone)]
pub struct RunSpec {
    pub scenario: Scenario,
    pub params: Params,
    pub seed: u64,
    /// The user's topology; `None` runs devices that send raw readings.
    pub topology: Option<Arc<Topology>>,
    /// Edge nodes; empty for `edge-1..=params.edges`.
    pub edges: Vec<EdgeSpec>,
    pub mutation: Option<Mutation>,
    /// The command that runs this spec, minus the seed, for replay lines.
    pub command: String,
}

impl RunSpec {
    pub fn new(scenario: Scenario, seed: u64) -> Self {
        Self {
            scenario,
            params: Params::default(),
            seed,
            topology: None,
            edges: Vec::new(),
            mutation: None,
            command: format!(
                "cargo run -p tributary-simulations --release -- run --scenario {scenario}"
            ),
        }
    }

    /// The command that replays this run exactly.
    pub fn replay_command(&self) -> String {
        format!("{} --seed {}", self.command, self.seed)
    }

    fn edge_specs(&self) -> Vec<EdgeSpec> {
        if !self.edges.is_empty() {
            return self.edges.clone();
        }
        (1..=self.params.edges.max(1))
            .map(|i| EdgeSpec {
                id: format!("edge-{i}"),
                labels: Vec::new(),
            })
            .collect()
    }
}

/// An invariant that did not hold.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Violation {
    #[error("reading ({device}, {ts_us}) was acknowledged to its device but is not in the log")]
    Lost { device: String, ts_us: i64 },
    #[error("reading ({device}, {ts_us}) is in the log {times} times")]
    Duplicated {
        device: String,
        ts_us: i64,
        times: usize,
    },
    #[error("device {device} has reading {ts_us} after reading {after_us} in the log")]
    OutOfOrder {
        device: String,
        ts_us: i64,
        after_us: i64,
    },
    #[error("reading ({device}, {ts_us}) is in the log but no edge ever stored it")]
    Invented { device: String, ts_us: i64 },
    #[error("MQTT message {n} of {device} was accepted by the broker but is not in the log")]
    MessageLost { device: String, n: u64 },
    #[error("MQTT message {n} of {device} is in the log {times} times")]
    MessageDuplicated {
        device: String,
        n: u64,
        times: usize,
    },
    #[error("MQTT device {device} has message {n} after message {after} in the log")]
    MessageOutOfOrder { device: String, n: u64, after: u64 },
    #[error(
        "a reading of MQTT device {device} in the log is no message its publisher sent: {detail}"
    )]
    MessageInvented { device: String, detail: String },
    #[error("edge {edge} holds {bytes} bytes in its outbox, over its budget of {budget}")]
    OverBudget {
        edge: String,
        bytes: u64,
        budget: u64,
    },
    #[error("edge {edge} has {segments} segments in flight, over its window of {window}")]
    WindowExceeded {
        edge: String,
        segments: usize,
        window: usize,
    },
    #[error("the backlog did not drain within {budget_ms} ms after the faults stopped ({left})")]
    NoDrain { budget_ms: u64, left: String },
    #[error("the simulation failed: {0}")]
    Simulation(String),
    #[error("setting up the run failed: {0}")]
    Setup(String),
}

/// What a run measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures {
    pub readings_acked: u64,
    pub readings_dropped: u64,
    pub readings_in_log: u64,
    pub records_in_log: u64,
    pub edge_crashes: u64,
    pub cloud_crashes: u64,
    pub faults: u64,
    pub backlog_bytes_max: u64,
    pub drain_ms: Option<u64>,
    pub simulated_ms: u64,
    pub wall_ms: u64,
    /// MQTT-fed edges, and what their brokers and sources saw.
    pub mqtt_edges: u64,
    /// The largest room an MQTT-fed edge's outbox got for its records.
    pub mqtt_records_room: u64,
    pub mqtt: MqttFigures,
}

/// What the MQTT-fed edges' brokers and sources saw, summed over edges (and
/// over each source's incarnations).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MqttFigures {
    /// Messages the brokers accepted from their publishers.
    pub accepted: u64,
    /// Those in the log.
    pub in_log: u64,
    /// Publishes refused because a session's queue was full.
    pub refused_queue_full: u64,
    /// Resends with DUP after a reconnect.
    pub resent_dup: u64,
    /// PUBACKs that came after their connection ended.
    pub acks_stale: u64,
    pub connections: u64,
    pub cuts: u64,
    /// The most messages one broker had in flight.
    pub inflight_max_seen: u64,
    /// The sources' counts: redeliveries of durable messages recognised,
    /// copies of held ones, DUP messages taken as new, overflows, forced
    /// reconnects.
    pub redeliveries: u64,
    pub redelivered_copies: u64,
    pub dup_taken: u64,
    pub overflow_unacked: u64,
    pub forced_reconnects: u64,
    /// Resends after the gateway refused readings as full.
    pub retries_full: u64,
}

impl MqttFigures {
    /// Adds another run's (the most in flight is the larger of the two).
    pub fn add(&mut self, o: &MqttFigures) {
        self.accepted += o.accepted;
        self.in_log += o.in_log;
        self.refused_queue_full += o.refused_queue_full;
        self.resent_dup += o.resent_dup;
        self.acks_stale += o.acks_stale;
        self.connections += o.connections;
        self.cuts += o.cuts;
        self.inflight_max_seen = self.inflight_max_seen.max(o.inflight_max_seen);
        self.redeliveries += o.redeliveries;
        self.redelivered_copies += o.redelivered_copies;
        self.dup_taken += o.dup_taken;
        self.overflow_unacked += o.overflow_unacked;
        self.forced_reconnects += o.forced_reconnects;
        self.retries_full += o.retries_full;
    }
}

/// The result of one run.
pub struct Outcome {
    pub spec_seed: u64,
    pub verdict: Result<(), Violation>,
    /// A hash of every fault, sample and log record: equal seeds, equal hashes.
    pub trace_hash: u64,
    pub figures: Figures,
    pub timeline: Timeline,
    pub replay: String,
}

/// (stream, device, ts) of a reading an edge stored.
type Written = (Option<String>, String, i64);

/// What a simulated disk saw written, and the lying variant.
#[derive(Clone)]
struct SimDisk {
    disk: MemoryStore,
    /// (stream, device, ts) of every reading ever appended.
    written: Arc<Mutex<HashSet<Written>>>,
    lying: bool,
    syncs: Arc<AtomicU64>,
}

impl OutboxStore for SimDisk {
    fn load_meta(&mut self) -> Result<Option<StoreMeta>, StoreError> {
        self.disk.load_meta()
    }

    fn init_meta(&mut self, meta: StoreMeta) -> Result<(), StoreError> {
        self.disk.init_meta(meta)
    }

    fn write_batch(
        &mut self,
        segment: Option<(u64, &[u8])>,
        state: &[StateChange],
    ) -> Result<(), StoreError> {
        if let Some((seq, bytes)) = segment {
            if let Ok(seg) = segment::verify(bytes, seq) {
                if let Ok(readings) = segment::decode_payload(seg.payload, seg.readings_count) {
                    let mut w = self.written.lock().expect("written lock");
                    for r in readings {
                        w.insert((r.stream, r.device_id, r.device_ts_us));
                    }
                }
            }
        }
        self.disk.write_batch(segment, state)
    }

    fn load_state(&self) -> Result<tributary_actors::outbox::StateEntries, StoreError> {
        self.disk.load_state()
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        if self.lying && self.syncs.fetch_add(1, Relaxed) % 2 == 1 {
            return Ok(());
        }
        self.disk.sync()
    }

    fn list(&self) -> Result<Vec<(u64, u64)>, StoreError> {
        self.disk.list()
    }

    fn read_range(
        &self,
        from: u64,
        through: u64,
        max: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.disk.read_range(from, through, max)
    }

    fn remove(&mut self, seq: u64) -> Result<(), StoreError> {
        self.disk.remove(seq)
    }

    fn quarantine(&mut self, seq: u64) -> Result<(), StoreError> {
        self.disk.quarantine(seq)
    }

    fn quarantined(&self) -> Result<Vec<(u64, u64)>, StoreError> {
        self.disk.quarantined()
    }

    fn remove_quarantined(&mut self, seq: u64) -> Result<(), StoreError> {
        self.disk.remove_quarantined(seq)
    }
}

/// The log, optionally forgetting marks (the [`Mutation::ForgetHwm`] bug).
struct SimLog {
    log: MemoryLog,
    forget_hwm: bool,
    answer_after: Duration,
    /// Added to shard numbers to name their writers (the split-brain
    /// mutation's second cloud node).
    shard_id_offset: u32,
}

impl LogSink for SimLog {
    fn calls(&self) -> SinkCalls {
        SinkCalls::Inline {
            answer_after: self.answer_after,
        }
    }

    fn open_edge(&self, edge_id: &str) -> Result<Box<dyn EdgeLogWriter>, SinkError> {
        let writer = self.log.open_edge(edge_id)?;
        if self.forget_hwm {
            Ok(Box::new(Forgetful(writer)))
        } else {
            Ok(writer)
        }
    }

    fn open_shard(&self, shard: u32) -> Result<Box<dyn ShardLogWriter>, SinkError> {
        let writer = self.log.open_shard(shard + self.shard_id_offset)?;
        if self.forget_hwm {
            Ok(Box::new(ForgetfulShard(writer)))
        } else {
            Ok(writer)
        }
    }
}

/// A shard writer that reads no marks back: every restart of the cloud
/// forgets what its edges had committed.
struct ForgetfulShard(Box<dyn ShardLogWriter>);

impl ShardLogWriter for ForgetfulShard {
    fn marks(&mut self) -> Result<Marks, SinkError> {
        self.0.marks().map(|_| Marks::new())
    }

    fn commit(&mut self, edges: &[EdgeCommit]) -> Result<(), SinkError> {
        self.0.commit(edges)
    }
}

struct Forgetful(Box<dyn EdgeLogWriter>);

impl EdgeLogWriter for Forgetful {
    fn high_water_mark(&mut self) -> Result<Option<Hwm>, SinkError> {
        self.0.high_water_mark().map(|_| None)
    }

    fn commit(
        &mut self,
        edge_id: &str,
        hwm: Hwm,
        batches: &[SegmentBatch],
    ) -> Result<(), SinkError> {
        self.0.commit(edge_id, hwm, batches)
    }
}

/// Simulated calendar time, skewed per host.
#[derive(Debug)]
struct SimClock {
    skew_us: i64,
}

impl Clock for SimClock {
    fn now_us(&self) -> i64 {
        let elapsed = turmoil::sim_elapsed().unwrap_or_default();
        EPOCH_US + self.skew_us + elapsed.as_micros() as i64
    }
}

/// What an edge's sampler last saw, read by the driver.
#[derive(Debug, Clone, Default)]
struct EdgeSeen {
    /// Simulated time of the status these figures come from.
    at_ms: u64,
    backlog_readings: u64,
    /// Readings in the outbox the cloud has not confirmed, open ones
    /// included (the gateway's count; `backlog_bytes` also counts the state
    /// table, which an MQTT source or edge stages never empty).
    unconfirmed_readings: u64,
    backlog_bytes: u64,
    segments_stored: usize,
    link_up: bool,
    inflight_segments: usize,
}

struct EdgeShared {
    spec: EdgeSpec,
    disk: MemoryStore,
    written: Arc<Mutex<HashSet<Written>>>,
    syncs: Arc<AtomicU64>,
    ack_log: PathBuf,
    incarnation: AtomicU64,
    seen: Mutex<EdgeSeen>,
    violations: Mutex<Vec<Violation>>,
    devices: Vec<DevicesConfig>,
    stages: Option<EdgeStages>,
    skew_us: i64,
    /// The MQTT source and its broker, on an MQTT-fed edge.
    mqtt: Option<MqttEdge>,
    /// Its outbox budget: the plan's, plus room for the MQTT source's
    /// records (see [`mqtt_records_bytes`]).
    budget: u64,
    /// The MQTT source's last status, per incarnation of the edge.
    mqtt_status: Mutex<BTreeMap<u64, MqttSourceStatus>>,
}

/// An MQTT-fed edge's source and broker.
struct MqttEdge {
    config: MqttConfig,
    broker: Arc<Mutex<Broker>>,
    /// The publishers' device ids.
    devices: BTreeSet<String>,
    /// Whether its readings leave the edge (then the log must have them).
    uplinked: bool,
    /// The keys the [`Mutation::DedupByDeviceTs`] wrapper has seen.
    seen: Arc<Mutex<BTreeSet<(String, i64)>>>,
}

impl MqttEdge {
    /// Whether a reading of the log came from this source.
    fn owns(&self, stream: &Option<String>, device: &str) -> bool {
        *stream == self.config.stream
            && (self.config.stream.is_some() || self.devices.contains(device))
    }
}

/// The MQTT source a topology (or the plan) gives an edge.
struct MqttSourcePlan {
    filter: String,
    device_level: usize,
    stream: Option<String>,
    devices: Vec<String>,
    uplinked: bool,
}

/// What an edge runs.
struct EdgePlan {
    devices: Vec<DevicesConfig>,
    stages: Option<EdgeStages>,
    mqtt: Option<MqttSourcePlan>,
}

/// State table bytes the MQTT source's records take: one per packet id the
/// broker uses in the run (about one per message, at most 65,535), plus the
/// generation. The source never removes them (a record is what recognises
/// a redelivery of its packet id), so a real outbox needs room for 65,535.
fn mqtt_records_bytes(client_id: &str, messages_max: u64) -> u64 {
    let prefix = "mqtt/".len() + client_id.len() + 1;
    let record = (prefix + "p/".len() + 2 + 8 + 16) as u64;
    let generation = (prefix + "gen".len() + 8) as u64;
    messages_max.min(65_535) * record + generation
}

struct World {
    run_id: u64,
    seed: u64,
    plan: Plan,
    params: Params,
    mutation: Option<Mutation>,
    edges: Vec<Arc<EdgeShared>>,
    log: MemoryLog,
    cloud_incarnation: AtomicU64,
    pki: &'static Pki,
    stop_at_ms: u64,
}

/// Certificates for every node a simulation may run, made once per process
/// (key generation is the slow part of setting up a run).
struct Pki {
    _dir: tempfile::TempDir,
    cloud: NodeIdentity,
    edges: Mutex<HashMap<String, NodeIdentity>>,
    path: PathBuf,
}

fn pki() -> Result<&'static Pki, String> {
    static PKI: OnceLock<Result<Pki, String>> = OnceLock::new();
    PKI.get_or_init(|| {
        let dir = tempfile::tempdir().map_err(|e| format!("creating the PKI directory: {e}"))?;
        let path = dir.path().to_path_buf();
        tls::init_ca(&path).map_err(|e| e.to_string())?;
        let id = NodeId::new("cloud-1").map_err(|e| e.to_string())?;
        tls::issue(&path, &id, Role::Cloud, 30).map_err(|e| e.to_string())?;
        let cloud = NodeIdentity::load_from_dir(&path, &id).map_err(|e| e.to_string())?;
        Ok(Pki {
            _dir: dir,
            cloud,
            edges: Mutex::new(HashMap::new()),
            path,
        })
    })
    .as_ref()
    .map_err(Clone::clone)
}

impl Pki {
    fn edge(&self, id: &str) -> Result<NodeIdentity, String> {
        let mut edges = self.edges.lock().expect("pki lock");
        if let Some(i) = edges.get(id) {
            return Ok(i.clone());
        }
        let node = NodeId::new(id).map_err(|e| e.to_string())?;
        tls::issue(&self.path, &node, Role::Edge, 30).map_err(|e| e.to_string())?;
        let identity = NodeIdentity::load_from_dir(&self.path, &node).map_err(|e| e.to_string())?;
        edges.insert(id.to_string(), identity.clone());
        Ok(identity)
    }
}

static RUNS: AtomicU64 = AtomicU64::new(0);

fn quic() -> QuicConfig {
    QuicConfig::default()
}

/// The devices, MQTT source and stages an edge runs: the topology's part
/// for it, or simulated devices (and, on an MQTT-fed edge, an MQTT source
/// as a node without a topology runs them).
fn edge_plan(spec: &RunSpec, edge: &EdgeSpec, mqtt_fed: bool) -> Result<EdgePlan, String> {
    let params = &spec.params;
    let mqtt_devices = |prefix: &str| -> Vec<String> {
        (0..params.devices_per_edge.max(1))
            .map(|i| format!("{prefix}{i}"))
            .collect()
    };
    let Some(t) = &spec.topology else {
        let sim = Simulated::devices(params.devices_per_edge.max(1))
            .rate_hz(params.rate_hz)
            .seed(spec.seed)
            .id_prefix("dev-");
        let mut devices = sim.devices_config("");
        devices.stream = None;
        let mqtt = mqtt_fed.then(|| MqttSourcePlan {
            filter: format!("site-{}/+/telemetry", edge.id),
            device_level: 1,
            stream: None,
            devices: mqtt_devices("mq-"),
            uplinked: true,
        });
        return Ok(EdgePlan {
            devices: vec![devices],
            stages: None,
            mqtt,
        });
    };
    let labels: Vec<&str> = edge.labels.iter().map(String::as_str).collect();
    // The node's supervisor defaults: the simulated edge restarts as a
    // node would.
    let restarts = StageRestarts {
        restarts_max: 5,
        restart_period_ms: 10_000,
    };
    let part = tributary_actors::edge::plan::edge_part(t, &edge.id, &labels, restarts, 5_000)
        .map_err(|e| e.to_string())?;
    let mqtt = part.mqtt.map(|m| MqttSourcePlan {
        filter: m.topic_filter,
        device_level: m.device_level,
        devices: mqtt_devices(&format!("{}.mq", m.source)),
        stream: Some(m.source),
        uplinked: m.uplinked,
    });
    Ok(EdgePlan {
        devices: part.devices,
        stages: Some(part.stages),
        mqtt,
    })
}

/// The MQTT source of edge `index` and its broker; with the bytes its
/// records may need in the outbox.
fn mqtt_edge(
    params: &Params,
    plan: &Plan,
    index: usize,
    edge: &EdgeSpec,
    m: MqttSourcePlan,
    stop_at_ms: u64,
) -> Result<(MqttEdge, u64), String> {
    let client_id = format!("tributary-{}", edge.id);
    let mut config = MqttConfig::new("broker.sim", 1883, client_id.clone(), m.filter.clone())
        .map_err(|e| format!("the MQTT source of {}: {e}", edge.id))?;
    let inflight_max = plan.mqtt.inflight_max;
    config.device_level = m.device_level;
    config.inflight_max = inflight_max;
    config.device_inflight_max = plan.mqtt.device_inflight_max.min(inflight_max);
    config.queued_requests_max = inflight_max + REQUEST_HEADROOM;
    config.reconnect_backoff_initial_ms = 50;
    config.reconnect_backoff_max_ms = 1_000;
    config.stream = m.stream.clone();
    config
        .validate()
        .map_err(|e| format!("the MQTT source of {}: {e}", edge.id))?;
    let spec = BrokerSpec {
        client_id: client_id.clone(),
        filter: m.filter,
        device_level: m.device_level,
        devices: m.devices.clone(),
        rate_hz: params.mqtt_rate_hz,
        burst_max: params.mqtt_burst_max.max(1),
        window: plan.mqtt.window,
        refill_on_ack: plan.mqtt.refill_on_ack,
        queue_max: plan.mqtt.queue_max,
        latency_ms: plan.mqtt.latency_ms,
        seed: plan.mqtt.seed ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        epoch_ms: EPOCH_US / 1000,
        stop_at_ms,
    };
    let room = if params.mqtt_records_room {
        mqtt_records_bytes(&client_id, spec.messages_expected())
    } else {
        0
    };
    let edge = MqttEdge {
        config,
        broker: Arc::new(Mutex::new(Broker::new(spec))),
        devices: m.devices.into_iter().collect(),
        uplinked: m.uplinked,
        seen: Arc::default(),
    };
    Ok((edge, room))
}

async fn run_edge(world: Arc<World>, index: usize) -> turmoil::Result {
    let shared = world.edges[index].clone();
    let inc = shared.incarnation.fetch_add(1, Relaxed);
    let names = EdgeNames::scoped(format!("sim{}/{}#{inc}/", world.run_id, shared.spec.id));
    let identity = world.pki.edge(&shared.spec.id)?;
    let clouds = [CLOUD_HOST, CLOUD_B_HOST][..world.plan.clouds as usize]
        .iter()
        .map(|h| CloudTarget::Addr(SocketAddr::new(turmoil::lookup(*h), CLOUD_PORT)))
        .collect();
    let shard = tributary_actors::cloud::shard::shard_of(&shared.spec.id, world.plan.ingest_shards);
    let connector = EdgeConnector::to_clouds_on(
        &TurmoilNetwork::seeded(world.seed ^ (index as u64 + 1) << 32 ^ inc),
        &identity,
        clouds,
        &format!("shard/{shard}"),
        quic(),
        FRAME_BYTES_MAX,
    )?;
    let disk = SimDisk {
        disk: shared.disk.clone(),
        written: shared.written.clone(),
        lying: world.mutation == Some(Mutation::AckBeforeFsync),
        syncs: shared.syncs.clone(),
    };
    let store: StoreFactory = Arc::new(move || Ok(Box::new(disk.clone()) as Box<dyn OutboxStore>));
    let clock: Arc<dyn Clock> = Arc::new(SimClock {
        skew_us: shared.skew_us,
    });
    let stop_at_us = EPOCH_US + shared.skew_us + world.stop_at_ms as i64 * 1000;
    let devices = shared
        .devices
        .iter()
        .map(|d| DevicesConfig {
            stop_at_us: Some(stop_at_us),
            ..d.clone()
        })
        .collect();
    let plan = &world.plan;
    let (mqtt, mqtt_connector) = match &shared.mqtt {
        Some(m) => {
            let mut connector: Arc<dyn MqttConnector> = Arc::new(SimConnector {
                broker: m.broker.clone(),
                overflow: plan.mqtt.overflow_link,
                acks_lost_on_reconnect: world.mutation == Some(Mutation::AcksLostOnReconnect),
            });
            if world.mutation == Some(Mutation::DedupByDeviceTs) {
                connector = Arc::new(ForgetSameTs {
                    inner: connector,
                    seen: m.seen.clone(),
                });
            }
            (Some(m.config.clone()), Some(connector))
        }
        None => (None, None),
    };
    let args = EdgeArgs {
        gateway: GatewayArgs {
            store,
            outbox: OutboxConfig {
                outbox_bytes_max: shared.budget,
                segment_readings_max: plan.segment_readings_max,
                // The outbox wants room for at least four segments.
                segment_bytes_max: (plan.outbox_bytes_max / 4)
                    .saturating_sub(segment::HEADER_BYTES as u64)
                    .clamp(1024, 64 * 1024) as usize,
                commit_interval_ms: COMMIT_INTERVAL_MS,
                full_policy: plan.full_policy,
            },
            ack_log: Some(shared.ack_log.clone()),
            stages: shared.stages.clone(),
            names: names.clone(),
            clock,
            device_clock_skew_max_ms: 3_600_000,
        },
        uplink: UplinkArgs {
            edge_id: shared.spec.id.clone(),
            connector,
            core: EdgeUplinkConfig {
                inflight_segments_max: plan.inflight_segments_max,
                ..EdgeUplinkConfig::default()
            },
            reconnect_backoff_initial_ms: 100,
            reconnect_backoff_max_ms: 500,
            on_connect: None,
            names: names.clone(),
            jitter_seed: Some(world.seed ^ inc ^ (index as u64) << 40),
            // With two cloud nodes, edges that failed over come back.
            cloud_return_after_ms: if world.plan.clouds > 1 { 2_000 } else { 0 },
        },
        devices,
        mqtt,
        mqtt_connector,
        restarts_max: 5,
        restart_period_ms: 10_000,
        names: names.clone(),
        node_children: Vec::new(),
    };
    let (_root, handle) = start_edge(args).await?;
    let sampler = tokio::spawn(sample_edge(world.clone(), index, inc, names));
    let _ = handle.await;
    sampler.abort();
    Ok(())
}

/// Reads the edge's figures every sample interval, and checks its bounds.
async fn sample_edge(world: Arc<World>, index: usize, incarnation: u64, names: EdgeNames) {
    let shared = world.edges[index].clone();
    let call_ms = 1_000;
    let mut every = tokio::time::interval(Duration::from_millis(SAMPLE_INTERVAL_MS / 2));
    loop {
        every.tick().await;
        let Some(gateway) = names.where_is_gateway() else {
            continue;
        };
        let Ok(status) = ractor::call_t!(gateway, GatewayMsg::Status, call_ms) else {
            continue;
        };
        let uplink: Option<ActorRef<UplinkMsg>> =
            ractor::registry::where_is(names.uplink()).map(Into::into);
        let up = match uplink {
            Some(u) => ractor::call_t!(u, UplinkMsg::Status, call_ms).ok(),
            None => None,
        };
        if shared.mqtt.is_some() {
            let source: Option<ActorRef<MqttMsg>> =
                ractor::registry::where_is(names.mqtt()).map(Into::into);
            if let Some(source) = source {
                if let Ok(s) = ractor::call_t!(source, MqttMsg::Status, call_ms) {
                    lock(&shared.mqtt_status).insert(incarnation, s);
                }
            }
        }
        let backlog_readings = status
            .stats
            .readings_committed
            .saturating_sub(status.stats.readings_dropped)
            .saturating_sub(acked_readings(&status));
        let mut seen = shared.seen.lock().expect("seen lock");
        seen.at_ms = turmoil::sim_elapsed().unwrap_or_default().as_millis() as u64;
        seen.backlog_bytes = status.bytes_used;
        seen.backlog_readings = backlog_readings;
        seen.unconfirmed_readings = status.backlog_readings;
        seen.segments_stored = status.segments_stored;
        seen.link_up = up.as_ref().is_some_and(|u| u.up);
        seen.inflight_segments = up.as_ref().map_or(0, |u| u.inflight_segments);
        let mut v = shared.violations.lock().expect("violations lock");
        if status.bytes_used > shared.budget && v.len() < 16 {
            v.push(Violation::OverBudget {
                edge: shared.spec.id.clone(),
                bytes: status.bytes_used,
                budget: shared.budget,
            });
        }
        if seen.inflight_segments > world.plan.inflight_segments_max && v.len() < 16 {
            v.push(Violation::WindowExceeded {
                edge: shared.spec.id.clone(),
                segments: seen.inflight_segments,
                window: world.plan.inflight_segments_max,
            });
        }
    }
}

/// Readings the outbox no longer holds because the cloud confirmed them; the
/// outbox counts segments, so this is an estimate for the picture only.
fn acked_readings(status: &tributary_actors::edge::gateway::GatewayStatus) -> u64 {
    let segments = status.stats.segments_committed.max(1);
    status.stats.readings_committed * status.stats.segments_acked / segments
}

async fn run_cloud(world: Arc<World>, node: u32) -> turmoil::Result {
    let inc = world.cloud_incarnation.fetch_add(1, Relaxed);
    let args = CloudArgs {
        listen_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), CLOUD_PORT),
        identity: world.pki.cloud.clone(),
        quic: quic(),
        frame_bytes_max: FRAME_BYTES_MAX,
        hello_timeout_ms: 5_000,
        ingest: IngestConfig {
            commit_segments_max: world.plan.commit_segments_max,
            pending_segments_max: 64,
        },
        sink: Arc::new(SimLog {
            log: world.log.clone(),
            forget_hwm: world.mutation == Some(Mutation::ForgetHwm),
            answer_after: Duration::from_millis(world.plan.log_latency_ms),
            shard_id_offset: if node > 0 && world.mutation == Some(Mutation::SplitBrainShards) {
                1_000
            } else {
                0
            },
        }),
        shards: tributary_actors::cloud::shard::ShardConfig {
            shards_count: world.plan.ingest_shards,
            transaction_segments_max: world.plan.commit_segments_max * 2,
        },
        report_interval_ms: 0,
        on_session: None,
        on_report: None,
        admission: Default::default(),
        names_prefix: format!("sim{}/cloud{node}#{inc}/", world.run_id),
        network: Arc::new(TurmoilNetwork::seeded(world.seed ^ inc)),
        counters: Arc::default(),
        gate: None,
    };
    let (_listener, handle) = ractor::Actor::spawn(None, Listener, args).await?;
    let _ = handle.await;
    Ok(())
}

/// Counts of overlapping faults, so that the end of one does not heal
/// another still running.
#[derive(Default)]
struct Active {
    partitions: HashMap<usize, u32>,
    one_way: HashMap<(usize, bool), u32>,
    degraded: HashMap<usize, u32>,
    crashed: HashMap<usize, u32>,
    cloud_crashed: u32,
    broker_down: u32,
    disk_full: HashMap<usize, u32>,
    mqtt_cut: HashMap<usize, u32>,
}

/// The start or end of fault number `.1` of the plan.
enum Transition {
    Start(FaultKind, usize),
    End(FaultKind, usize),
}

/// How long a crash or a cut of an MQTT-fed edge may wait for a moment
/// when its source holds messages (read, not yet acknowledged): a strike
/// then is where exactly-once is hard, and a quiet edge (bursts come every
/// 250 ms by default) would mostly be struck between them.
const STRIKE_WAIT_MAX_MS: u64 = 1_000;

/// How far a fault was moved to strike at a busy moment.
#[derive(Default)]
struct Shift {
    by_ms: u64,
    started: bool,
    /// How far its end was moved so far.
    end_by_ms: u64,
}

/// Runs one seed to its verdict.
pub fn run(spec: &RunSpec) -> Outcome {
    let started = Instant::now();
    let replay = spec.replay_command();
    let edges = spec.edge_specs();
    // The plan strikes the edges that exist, whatever `params.edges` says.
    let params = Params {
        edges: edges.len(),
        ..spec.params.clone()
    };
    // A topology decides which edges MQTT feeds; without one, the plan does.
    let topology_fed: Option<Vec<bool>> = spec.topology.as_ref().map(|t| {
        edges
            .iter()
            .map(|e| {
                let labels: Vec<&str> = e.labels.iter().map(String::as_str).collect();
                t.part_for(&e.id, &labels, Role::Edge)
                    .sources
                    .iter()
                    .any(|c| matches!(c.kind, ComponentKind::Source(Source::Mqtt(_))))
            })
            .collect()
    });
    let plan = Plan::with_mqtt_edges(spec.scenario, &params, spec.seed, topology_fed.as_deref());
    let edge_ids: Vec<String> = edges.iter().map(|e| e.id.clone()).collect();
    let mut timeline = Timeline {
        title: format!("{} · seed {}", spec.scenario, spec.seed),
        replay_command: replay.clone(),
        edges: edge_ids.clone(),
        outbox_bytes_max: plan.outbox_bytes_max,
        drain_budget_ms: params.drain_budget_s * 1000,
        ..Timeline::default()
    };
    let fail = |v: Violation, timeline: Timeline| Outcome {
        spec_seed: spec.seed,
        verdict: Err(v),
        trace_hash: 0,
        figures: Figures::default(),
        timeline,
        replay: replay.clone(),
    };
    let expected = (params.faults_s + params.drain_budget_s) as f64
        * params.rate_hz
        * (params.devices_per_edge * edges.len()) as f64;
    if expected > READINGS_PER_RUN_MAX as f64 {
        return fail(
            Violation::Setup(format!(
                "about {expected:.0} readings, over the {READINGS_PER_RUN_MAX} a run may check"
            )),
            timeline,
        );
    }
    let pki = match pki() {
        Ok(p) => p,
        Err(e) => return fail(Violation::Setup(e), timeline),
    };
    let audit_dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => return fail(Violation::Setup(e.to_string()), timeline),
    };
    let faults_end_ms = plan
        .faults
        .iter()
        .map(|f| f.until_ms)
        .max()
        .unwrap_or(0)
        .max(params.faults_s * 1000);
    let mut shared_edges = Vec::new();
    let mut raw_streams: HashSet<Option<String>> = HashSet::new();
    for (i, e) in edges.iter().enumerate() {
        let fed = plan.mqtt.fed.get(i).copied().unwrap_or(false);
        let edge_plan = match edge_plan(spec, e, fed) {
            Ok(p) => p,
            Err(err) => return fail(Violation::Setup(err), timeline),
        };
        for d in &edge_plan.devices {
            raw_streams.insert(d.stream.clone());
        }
        let mut budget = plan.outbox_bytes_max;
        let mqtt = match edge_plan.mqtt {
            Some(m) => match mqtt_edge(&params, &plan, i, e, m, faults_end_ms) {
                Ok((edge, room)) => {
                    budget += room;
                    Some(edge)
                }
                Err(err) => return fail(Violation::Setup(err), timeline),
            },
            None => None,
        };
        shared_edges.push(Arc::new(EdgeShared {
            spec: e.clone(),
            disk: MemoryStore::new(),
            written: Arc::default(),
            syncs: Arc::default(),
            ack_log: audit_dir.path().join(format!("{}.acks", e.id)),
            incarnation: AtomicU64::new(0),
            seen: Mutex::default(),
            violations: Mutex::default(),
            devices: edge_plan.devices,
            stages: edge_plan.stages,
            skew_us: plan.clock_skew_us.get(i).copied().unwrap_or(0),
            mqtt,
            budget,
            mqtt_status: Mutex::default(),
        }));
    }
    let world = Arc::new(World {
        run_id: RUNS.fetch_add(1, Relaxed),
        seed: spec.seed,
        plan: plan.clone(),
        params,
        mutation: spec.mutation,
        edges: shared_edges,
        log: MemoryLog::new(),
        cloud_incarnation: AtomicU64::new(0),
        pki,
        stop_at_ms: faults_end_ms,
    });
    let budget_ms = world.params.drain_budget_s * 1000;
    let mut sim = turmoil::Builder::new()
        .rng_seed(spec.seed)
        .epoch(std::time::UNIX_EPOCH + Duration::from_micros(EPOCH_US as u64))
        .simulation_duration(Duration::from_millis(
            faults_end_ms + budget_ms + RUN_SLACK_MS * 2,
        ))
        .tick_duration(Duration::from_millis(TICK_MS))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(plan.latency_max_ms))
        .build();
    let w = world.clone();
    sim.host(CLOUD_HOST, move || run_cloud(w.clone(), 0));
    if plan.clouds > 1 {
        let w = world.clone();
        sim.host(CLOUD_B_HOST, move || run_cloud(w.clone(), 1));
    }
    for (i, e) in edges.iter().enumerate() {
        let w = world.clone();
        sim.host(e.id.as_str(), move || run_edge(w.clone(), i));
    }

    let mut transitions: BTreeMap<u64, Vec<Transition>> = BTreeMap::new();
    for (id, f) in plan.faults.iter().enumerate() {
        transitions
            .entry(f.at_ms)
            .or_default()
            .push(Transition::Start(f.kind, id));
        transitions
            .entry(f.until_ms)
            .or_default()
            .push(Transition::End(f.kind, id));
        timeline.events.push(TimelineEvent {
            at_ms: f.at_ms,
            until_ms: Some(f.until_ms),
            target: f.kind.target(&edge_ids),
            label: f.kind.label(),
        });
    }
    let mut trace = std::collections::hash_map::DefaultHasher::new();
    let mut active = Active::default();
    let mut figures = Figures {
        faults: plan.faults.len() as u64,
        ..Figures::default()
    };
    let mut service_down: HashMap<String, u64> = HashMap::new();
    let mut next_sample_ms = 0;
    let mut drained_at = None;
    let mut settled_at = None;
    let mut verdict: Result<(), Violation> = Ok(());
    let mut acked_so_far: Vec<AuditTail> = vec![AuditTail::default(); edges.len()];
    let mut shifts: BTreeMap<usize, Shift> = BTreeMap::new();
    let brokers: Vec<Arc<Mutex<Broker>>> = world
        .edges
        .iter()
        .filter_map(|e| e.mqtt.as_ref().map(|m| m.broker.clone()))
        .collect();
    loop {
        let now_ms = sim.elapsed().as_millis() as u64;
        // The brokers and their publishers move to this millisecond before
        // the hosts do.
        for b in &brokers {
            lock(b).advance(now_ms);
        }
        while let Some(entry) = transitions.first_entry() {
            if *entry.key() > now_ms {
                break;
            }
            for t in entry.remove() {
                let (start, kind, id) = match t {
                    Transition::Start(k, id) => (true, k, id),
                    Transition::End(k, id) => (false, k, id),
                };
                let shift = shifts.entry(id).or_default();
                if start {
                    if shift.by_ms < STRIKE_WAIT_MAX_MS && !busy_moment(&world, kind) {
                        shift.by_ms += 1;
                        let at = now_ms + 1;
                        transitions
                            .entry(at)
                            .or_default()
                            .push(Transition::Start(kind, id));
                        continue;
                    }
                    shift.started = true;
                    if shift.by_ms > 0 {
                        if let Some(e) = timeline.events.get_mut(id) {
                            e.at_ms += shift.by_ms;
                            e.until_ms = e.until_ms.map(|u| u + shift.by_ms);
                        }
                    }
                } else if !shift.started || shift.end_by_ms < shift.by_ms {
                    // Its start moved: its end moves as far.
                    let by = if shift.started {
                        shift.by_ms - shift.end_by_ms
                    } else {
                        1
                    };
                    shift.end_by_ms += by;
                    transitions
                        .entry(now_ms + by)
                        .or_default()
                        .push(Transition::End(kind, id));
                    continue;
                }
                (now_ms, start, format!("{kind:?}")).hash(&mut trace);
                apply(
                    &mut sim,
                    &world,
                    &mut active,
                    &edge_ids,
                    kind,
                    start,
                    &mut figures,
                );
            }
        }
        // A host whose software ended on its own is restarted, as a service
        // manager would, unless a fault holds it down.
        for (i, id) in edge_ids.iter().enumerate() {
            let held = active.crashed.get(&i).copied().unwrap_or(0) > 0;
            restart_if_ended(&mut sim, &mut service_down, id, held, now_ms, &mut timeline);
        }
        restart_if_ended(
            &mut sim,
            &mut service_down,
            CLOUD_HOST,
            active.cloud_crashed > 0,
            now_ms,
            &mut timeline,
        );
        if world.plan.clouds > 1 {
            restart_if_ended(
                &mut sim,
                &mut service_down,
                CLOUD_B_HOST,
                false,
                now_ms,
                &mut timeline,
            );
        }
        if let Err(e) = sim.step() {
            verdict = Err(Violation::Simulation(e.to_string()));
            break;
        }
        if now_ms >= next_sample_ms {
            next_sample_ms = now_ms + SAMPLE_INTERVAL_MS;
            let sample = take_sample(&mut sim, &world, now_ms, &mut acked_so_far);
            for e in &sample.edges {
                figures.backlog_bytes_max = figures.backlog_bytes_max.max(e.backlog_bytes);
                (e.backlog_bytes, e.link_up, e.running, e.acked_total).hash(&mut trace);
            }
            (now_ms, sample.log_readings_total).hash(&mut trace);
            for b in &brokers {
                lock(b).stats().hash(&mut trace);
            }
            timeline.samples.push(sample);
            if let Some(v) = world.edges.iter().find_map(|e| {
                e.violations
                    .lock()
                    .expect("violations lock")
                    .first()
                    .cloned()
            }) {
                verdict = Err(v);
                break;
            }
            if now_ms >= faults_end_ms {
                match drained(&mut sim, &world, &edge_ids, &raw_streams) {
                    Drain::Done => {
                        drained_at = Some(now_ms);
                        break;
                    }
                    // Nothing is left anywhere to bring what is missing:
                    // the check says what was lost.
                    Drain::Settled => {
                        settled_at = Some(now_ms);
                        break;
                    }
                    Drain::Busy => {}
                }
                if now_ms > faults_end_ms + budget_ms {
                    verdict = Err(Violation::NoDrain {
                        budget_ms,
                        left: left_over(&world),
                    });
                    break;
                }
            }
        }
    }
    figures.simulated_ms = sim.elapsed().as_millis() as u64;
    drop(sim);
    mqtt_figures(&world, &mut figures);
    // Missing readings are lost only if nothing could still bring them: the
    // run drained, or every outbox is empty (the cloud confirmed all of it).
    let complete = verdict.is_ok() || outboxes_empty(&world);
    let checked = check(&world, &raw_streams, complete, &mut figures, &mut trace);
    // A safety violation explains more than the liveness one it causes.
    if verdict.is_ok() || (matches!(verdict, Err(Violation::NoDrain { .. })) && checked.is_err()) {
        verdict = checked;
    }
    if verdict.is_ok() && drained_at.is_none() {
        // Settled with nothing missing by the check's count.
        drained_at = settled_at;
    }
    figures.drain_ms = drained_at.map(|t| t.saturating_sub(faults_end_ms));
    figures.wall_ms = started.elapsed().as_millis() as u64;
    timeline.faults_end_ms = faults_end_ms;
    timeline.drained_at_ms = drained_at;
    timeline.verdict = verdict.as_ref().map(|_| ()).map_err(|v| v.to_string());
    timeline.figures = figure_rows(&figures, &plan);
    Outcome {
        spec_seed: spec.seed,
        verdict,
        trace_hash: trace.finish(),
        figures,
        timeline,
        replay,
    }
}

/// Whether a fault may strike now: a crash or cut of an MQTT-fed edge waits
/// for its source to hold messages; every other fault strikes on time.
fn busy_moment(world: &World, kind: FaultKind) -> bool {
    let edge = match kind {
        FaultKind::EdgeCrash { edge, .. } | FaultKind::MqttCut { edge } => edge,
        _ => return true,
    };
    match world.edges.get(edge).and_then(|e| e.mqtt.as_ref()) {
        Some(m) => lock(&m.broker).held() > 0,
        None => true,
    }
}

fn restart_if_ended(
    sim: &mut turmoil::Sim<'_>,
    down: &mut HashMap<String, u64>,
    host: &str,
    held: bool,
    now_ms: u64,
    timeline: &mut Timeline,
) {
    if held || sim.is_host_running(host) {
        down.remove(host);
        return;
    }
    let since = *down.entry(host.to_string()).or_insert(now_ms);
    if now_ms >= since + SERVICE_RESTART_MS {
        sim.bounce(host);
        down.remove(host);
        timeline.events.push(TimelineEvent {
            at_ms: now_ms,
            until_ms: None,
            target: host.to_string(),
            label: "restarted after its supervisor gave up".into(),
        });
    }
}

fn apply(
    sim: &mut turmoil::Sim<'_>,
    world: &World,
    active: &mut Active,
    edges: &[String],
    kind: FaultKind,
    start: bool,
    figures: &mut Figures,
) {
    // Returns whether this transition changes the state: the first start or
    // the last end of overlapping faults of the same kind.
    fn count(n: &mut u32, start: bool) -> bool {
        if start {
            *n += 1;
            *n == 1
        } else {
            *n = n.saturating_sub(1);
            *n == 0
        }
    }
    match kind {
        FaultKind::Partition { edge } => {
            if count(active.partitions.entry(edge).or_default(), start) {
                if start {
                    sim.partition(edges[edge].as_str(), CLOUD_HOST);
                } else {
                    sim.repair(edges[edge].as_str(), CLOUD_HOST);
                }
            }
        }
        FaultKind::OneWay { edge, to_cloud } => {
            if count(active.one_way.entry((edge, to_cloud)).or_default(), start) {
                let (from, to) = if to_cloud {
                    (edges[edge].as_str(), CLOUD_HOST)
                } else {
                    (CLOUD_HOST, edges[edge].as_str())
                };
                if start {
                    sim.partition_oneway(from, to);
                } else {
                    sim.repair_oneway(from, to);
                }
            }
        }
        FaultKind::Degraded {
            edge,
            loss,
            latency_ms,
        } => {
            let n = active.degraded.entry(edge).or_default();
            let changed = count(n, start);
            let host = edges[edge].as_str();
            if start {
                sim.set_link_fail_rate(host, CLOUD_HOST, loss);
                sim.set_link_max_message_latency(
                    host,
                    CLOUD_HOST,
                    Duration::from_millis(latency_ms),
                );
            } else if changed {
                sim.set_link_fail_rate(host, CLOUD_HOST, 0.0);
                sim.set_link_max_message_latency(
                    host,
                    CLOUD_HOST,
                    Duration::from_millis(world.plan.latency_max_ms),
                );
            }
        }
        FaultKind::EdgeCrash {
            edge,
            unsynced_kept,
            torn,
        } => {
            if count(active.crashed.entry(edge).or_default(), start) {
                let host = edges[edge].as_str();
                if start {
                    sim.crash(host);
                    world.edges[edge].disk.crash(Some(unsynced_kept), torn);
                    figures.edge_crashes += 1;
                } else {
                    sim.bounce(host);
                }
            }
        }
        FaultKind::CloudCrash => {
            if count(&mut active.cloud_crashed, start) {
                if start {
                    sim.crash(CLOUD_HOST);
                    figures.cloud_crashes += 1;
                } else {
                    sim.bounce(CLOUD_HOST);
                }
            }
        }
        FaultKind::BrokerDown => {
            if count(&mut active.broker_down, start) {
                world.log.set_unavailable(start);
            }
        }
        FaultKind::DiskFull { edge } => {
            if count(active.disk_full.entry(edge).or_default(), start) {
                world.edges[edge].disk.set_sync_failing(start);
            }
        }
        FaultKind::MqttCut { edge } => {
            if count(active.mqtt_cut.entry(edge).or_default(), start) {
                if let Some(m) = &world.edges[edge].mqtt {
                    lock(&m.broker).set_cut(start);
                }
            }
        }
    }
}

fn take_sample(
    sim: &mut turmoil::Sim<'_>,
    world: &World,
    now_ms: u64,
    acked_so_far: &mut [AuditTail],
) -> Sample {
    let mut edges = Vec::new();
    for (i, e) in world.edges.iter().enumerate() {
        let running = sim.is_host_running(e.spec.id.as_str());
        let seen = e.seen.lock().expect("seen lock").clone();
        // The audit file is the ground truth for acknowledgements; reading
        // it each sample is cheap next to a simulated second.
        acked_so_far[i].read_more(&e.ack_log);
        edges.push(EdgeSample {
            backlog_readings: seen.backlog_readings,
            backlog_bytes: seen.backlog_bytes,
            acked_total: acked_so_far[i].acked,
            link_up: running && seen.link_up,
            running,
        });
    }
    Sample {
        t_ms: now_ms,
        edges,
        log_readings_total: world.log.records_len() as u64,
    }
}

/// Counts the acknowledgements in an edge's audit trail as it grows, reading
/// only what was appended since the last look.
#[derive(Debug, Clone, Default)]
struct AuditTail {
    offset: u64,
    acked: u64,
}

impl AuditTail {
    fn read_more(&mut self, path: &PathBuf) {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut file) = std::fs::File::open(path) else {
            return;
        };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut more = Vec::new();
        if file.read_to_end(&mut more).is_err() {
            return;
        }
        // Only whole lines: a line being written is counted next time.
        let whole = more.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        self.acked += more[..whole]
            .split(|b| *b == b'\n')
            .filter(|l| l.first() == Some(&b'A'))
            .count() as u64;
        self.offset += whole as u64;
    }
}

/// Whether every edge last reported an empty outbox after its devices stopped.
fn outboxes_empty(world: &World) -> bool {
    let settled_ms = world.stop_at_ms + COMMIT_INTERVAL_MS * 2;
    world.edges.iter().all(|e| {
        let seen = e.seen.lock().expect("seen lock");
        seen.at_ms >= settled_ms && seen.segments_stored == 0 && seen.unconfirmed_readings == 0
    })
}

/// Where the drain stands once the faults are over.
enum Drain {
    /// Every outbox is empty, every broker idle, and everything acknowledged
    /// (or accepted by a broker) is in the log.
    Done,
    /// Everything is empty and idle but something acknowledged or accepted
    /// is not in the log: nothing is left that could bring it.
    Settled,
    Busy,
}

/// Whether every edge's outbox is empty, by a status taken after the
/// devices stopped and their last readings were committed, every broker is
/// idle, and every reading acknowledged (or accepted) so far is in the log.
fn drained(
    sim: &mut turmoil::Sim<'_>,
    world: &World,
    edges: &[String],
    raw_streams: &HashSet<Option<String>>,
) -> Drain {
    let settled_ms = world.stop_at_ms + COMMIT_INTERVAL_MS * 2;
    let empty = world.edges.iter().zip(edges).all(|(e, id)| {
        let seen = e.seen.lock().expect("seen lock");
        sim.is_host_running(id.as_str())
            && seen.at_ms >= settled_ms
            && seen.segments_stored == 0
            && seen.unconfirmed_readings == 0
    });
    let idle = world
        .edges
        .iter()
        .all(|e| e.mqtt.as_ref().is_none_or(|m| lock(&m.broker).idle()));
    if !empty || !idle {
        return Drain::Busy;
    }
    let edge_index = edge_index(world);
    let mut in_log: HashSet<(&str, String, i64)> = HashSet::new();
    let mut messages: Vec<BTreeSet<(String, u64)>> = vec![BTreeSet::new(); world.edges.len()];
    let records = world.log.records();
    for r in &records {
        let rd = &r.reading;
        if let Some(&e) = edge_index.get(r.edge_id.as_str()) {
            if let Some(m) = &world.edges[e].mqtt {
                if m.owns(&rd.stream, &rd.device_id) {
                    if let Some(n) = seq_of(rd) {
                        messages[e].insert((rd.device_id.clone(), n));
                    }
                    continue;
                }
            }
        }
        if raw_streams.contains(&rd.stream) {
            in_log.insert((r.edge_id.as_str(), rd.device_id.clone(), rd.device_ts_us));
        }
    }
    let all = world.edges.iter().enumerate().all(|(i, e)| {
        let (acked, dropped) = read_audit(&e.ack_log);
        acked
            .into_iter()
            .filter(|(device, _)| !is_mqtt_device(e, device))
            .all(|(device, ts)| {
                in_log.contains(&(e.spec.id.as_str(), device.clone(), ts))
                    || dropped.contains_key(&(device, ts))
            })
            && e.mqtt
                .as_ref()
                .is_none_or(|m| mqtt_missing(m, &messages[i], &dropped).is_none())
    });
    if all {
        Drain::Done
    } else {
        Drain::Settled
    }
}

fn edge_index(world: &World) -> HashMap<&str, usize> {
    world
        .edges
        .iter()
        .enumerate()
        .map(|(i, e)| (e.spec.id.as_str(), i))
        .collect()
}

/// Whether an ack log's device is one of the edge's MQTT publishers (whose
/// readings are checked by (device, n), not (device, ts)).
fn is_mqtt_device(e: &EdgeShared, device: &str) -> bool {
    e.mqtt.as_ref().is_some_and(|m| m.devices.contains(device))
}

/// A reading's MQTT sequence number: the payload's `n`.
fn seq_of(r: &tributary_actors::reading::Reading) -> Option<u64> {
    match r.metric("n") {
        Some(Value::I64(n)) => u64::try_from(*n).ok(),
        _ => None,
    }
}

/// The first message the broker accepted that is not in the log (`present`),
/// not still held by the broker (queued or in flight: late, not lost; the
/// liveness check speaks for those), and not excused by a `D` line of the
/// ack log (a segment `drop-oldest` evicted; counted per (device, ts), since
/// several messages share one).
fn mqtt_missing(
    m: &MqttEdge,
    present: &BTreeSet<(String, u64)>,
    dropped: &HashMap<Key, usize>,
) -> Option<(String, u64)> {
    if !m.uplinked {
        return None;
    }
    let mut excused = dropped.clone();
    let b = lock(&m.broker);
    let pending = b.pending();
    for (device, accepted) in b.accepted() {
        let device = device.to_string();
        for p in accepted {
            let key = (device.clone(), p.n);
            if present.contains(&key) || pending.contains(&key) {
                continue;
            }
            match excused.get_mut(&(device.clone(), p.ts_ms * 1000)) {
                Some(c) if *c > 0 => *c -= 1,
                _ => return Some((device, p.n)),
            }
        }
    }
    None
}

fn left_over(world: &World) -> String {
    world
        .edges
        .iter()
        .map(|e| {
            let s = e.seen.lock().expect("seen lock");
            let mqtt = e.mqtt.as_ref().map_or(String::new(), |m| {
                let (queued, inflight) = lock(&m.broker).backlog();
                format!(", broker: {queued} queued, {inflight} in flight")
            });
            format!(
                "{}: {} segments, {} readings, {} bytes, link {}{mqtt}",
                e.spec.id,
                s.segments_stored,
                s.unconfirmed_readings,
                s.backlog_bytes,
                if s.link_up { "up" } else { "down" }
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

type Key = (String, i64);

/// An ack log: the acknowledged keys in order, and how many times each key
/// was dropped by `drop-oldest`.
fn read_audit(path: &PathBuf) -> (Vec<Key>, HashMap<Key, usize>) {
    let mut acked = Vec::new();
    let mut dropped: HashMap<Key, usize> = HashMap::new();
    if let Ok(text) = std::fs::read_to_string(path) {
        for line in text.lines() {
            let mut parts = line.split(' ');
            let (Some(tag), Some(device), Some(ts)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let Ok(ts) = ts.parse::<i64>() else { continue };
            match tag {
                "A" => acked.push((device.to_string(), ts)),
                "D" => *dropped.entry((device.to_string(), ts)).or_default() += 1,
                _ => {}
            }
        }
    }
    (acked, dropped)
}

/// What a broker accepted, per device and n.
type Accepted = BTreeMap<String, BTreeMap<u64, Published>>;

/// The safety checks of one MQTT reading of the log: a message its
/// publisher sent (same n, ts and value), not seen before, after the
/// device's previous one.
fn check_message(
    device: String,
    rd: &tributary_actors::reading::Reading,
    accepted: &Accepted,
    seen: &mut BTreeSet<(String, u64)>,
    last: &mut BTreeMap<String, u64>,
) -> Result<(), Violation> {
    let invented = |detail: String| Violation::MessageInvented {
        device: device.clone(),
        detail,
    };
    let Some(per_device) = accepted.get(&rd.device_id) else {
        return Err(invented("no publisher has this device id".into()));
    };
    let Some(n) = seq_of(rd) else {
        return Err(invented(format!("it has no n: {:?}", rd.metrics)));
    };
    let Some(p) = per_device.get(&n) else {
        return Err(invented(format!("the broker never accepted n = {n}")));
    };
    let v_ok = match rd.metric("v") {
        Some(Value::F64(v)) => (v - p.v).abs() <= 1e-9 * p.v.abs().max(1.0),
        _ => false,
    };
    if rd.device_ts_us != p.ts_ms * 1000 || !v_ok {
        return Err(invented(format!(
            "n = {n} has ts {} µs and v {:?}; it was published with ts {} ms and v {}",
            rd.device_ts_us,
            rd.metric("v"),
            p.ts_ms,
            p.v
        )));
    }
    if !seen.insert((rd.device_id.clone(), n)) {
        return Err(Violation::MessageDuplicated {
            device,
            n,
            times: 2,
        });
    }
    if let Some(prev) = last.insert(rd.device_id.clone(), n) {
        if n < prev {
            return Err(Violation::MessageOutOfOrder {
                device,
                n,
                after: prev,
            });
        }
    }
    Ok(())
}

/// The safety checks, on the whole log once the run is over (the log only
/// grows, so what it holds at the end it held from some point on). Device
/// ids are an edge's own (two edges may both have a `dev-0`), so every key
/// carries its edge.
fn check(
    world: &World,
    raw_streams: &HashSet<Option<String>>,
    complete: bool,
    figures: &mut Figures,
    trace: &mut impl Hasher,
) -> Result<(), Violation> {
    let records = world.log.records();
    figures.records_in_log = records.len() as u64;
    let edge_index = edge_index(world);
    let written: Vec<HashSet<Written>> = world
        .edges
        .iter()
        .map(|e| e.written.lock().expect("written lock").clone())
        .collect();
    let accepted: Vec<Accepted> = world
        .edges
        .iter()
        .map(|e| {
            e.mqtt.as_ref().map_or_else(Accepted::new, |m| {
                lock(&m.broker)
                    .accepted()
                    .map(|(d, a)| (d.to_string(), a.iter().map(|p| (p.n, *p)).collect()))
                    .collect()
            })
        })
        .collect();
    let mut messages: Vec<BTreeSet<(String, u64)>> = vec![BTreeSet::new(); world.edges.len()];
    let mut message_last: Vec<BTreeMap<String, u64>> = vec![BTreeMap::new(); world.edges.len()];
    let mut in_log: Vec<HashMap<Key, usize>> = vec![HashMap::new(); world.edges.len()];
    let mut last: HashMap<(usize, Option<String>, String), i64> = HashMap::new();
    let named = |edge: &str, device: &str| format!("{edge}/{device}");
    for r in &records {
        let rd = &r.reading;
        (&r.edge_id, r.epoch, r.seq, &rd.device_id, rd.device_ts_us).hash(trace);
        let Some(&e) = edge_index.get(r.edge_id.as_str()) else {
            return Err(Violation::Invented {
                device: named(&r.edge_id, &rd.device_id),
                ts_us: rd.device_ts_us,
            });
        };
        if let Some(m) = &world.edges[e].mqtt {
            if m.owns(&rd.stream, &rd.device_id) {
                check_message(
                    named(&r.edge_id, &rd.device_id),
                    rd,
                    &accepted[e],
                    &mut messages[e],
                    &mut message_last[e],
                )?;
                figures.mqtt.in_log += 1;
                continue;
            }
        }
        let key3 = (rd.stream.clone(), rd.device_id.clone(), rd.device_ts_us);
        if !written[e].contains(&key3) {
            return Err(Violation::Invented {
                device: named(&r.edge_id, &rd.device_id),
                ts_us: rd.device_ts_us,
            });
        }
        if let Some(prev) = last.insert(
            (e, rd.stream.clone(), rd.device_id.clone()),
            rd.device_ts_us,
        ) {
            if rd.device_ts_us == prev {
                return Err(Violation::Duplicated {
                    device: named(&r.edge_id, &rd.device_id),
                    ts_us: rd.device_ts_us,
                    times: 2,
                });
            }
            if rd.device_ts_us < prev {
                return Err(Violation::OutOfOrder {
                    device: named(&r.edge_id, &rd.device_id),
                    ts_us: rd.device_ts_us,
                    after_us: prev,
                });
            }
        }
        if raw_streams.contains(&rd.stream) {
            figures.readings_in_log += 1;
            *in_log[e]
                .entry((rd.device_id.clone(), rd.device_ts_us))
                .or_default() += 1;
        }
    }
    for (e, edge) in world.edges.iter().enumerate() {
        for (key, times) in &in_log[e] {
            if *times > 1 {
                return Err(Violation::Duplicated {
                    device: named(&edge.spec.id, &key.0),
                    ts_us: key.1,
                    times: *times,
                });
            }
        }
        let (acked, dropped) = read_audit(&edge.ack_log);
        figures.readings_acked += acked.len() as u64;
        figures.readings_dropped += dropped.values().sum::<usize>() as u64;
        for key in acked.iter().filter(|_| complete) {
            if is_mqtt_device(edge, &key.0) {
                continue;
            }
            if !in_log[e].contains_key(key) && !dropped.contains_key(key) {
                return Err(Violation::Lost {
                    device: named(&edge.spec.id, &key.0),
                    ts_us: key.1,
                });
            }
        }
        if let (true, Some(m)) = (complete, &edge.mqtt) {
            if let Some((device, n)) = mqtt_missing(m, &messages[e], &dropped) {
                return Err(Violation::MessageLost {
                    device: named(&edge.spec.id, &device),
                    n,
                });
            }
        }
    }
    Ok(())
}

/// Sums what the brokers and the MQTT sources counted.
fn mqtt_figures(world: &World, figures: &mut Figures) {
    let f = &mut figures.mqtt;
    for e in &world.edges {
        let Some(m) = &e.mqtt else { continue };
        figures.mqtt_edges += 1;
        figures.mqtt_records_room = figures
            .mqtt_records_room
            .max(e.budget - world.plan.outbox_bytes_max);
        let b = lock(&m.broker).stats();
        f.accepted += b.accepted;
        f.refused_queue_full += b.refused_queue_full;
        f.resent_dup += b.resent_dup;
        f.acks_stale += b.acks_stale;
        f.connections += b.connections;
        f.cuts += b.cuts;
        f.inflight_max_seen = f.inflight_max_seen.max(b.inflight_max_seen);
        for s in lock(&e.mqtt_status).values() {
            let c = &s.core.stats;
            f.redeliveries += c.redeliveries;
            f.redelivered_copies += c.redelivered_copies;
            f.dup_taken += c.dup_taken;
            f.overflow_unacked += c.overflow_unacked;
            f.forced_reconnects += c.forced_reconnects;
            f.retries_full += c.retries_full;
        }
    }
}

fn figure_rows(f: &Figures, plan: &Plan) -> Vec<(String, String)> {
    let speed = if f.wall_ms > 0 {
        format!("{:.0}×", f.simulated_ms as f64 / f.wall_ms as f64)
    } else {
        "-".into()
    };
    let mut rows = vec![
        ("readings acknowledged".into(), f.readings_acked.to_string()),
        ("readings in the log".into(), f.readings_in_log.to_string()),
        ("dropped by policy".into(), f.readings_dropped.to_string()),
        (
            "records in the log (incl. stage outputs)".into(),
            f.records_in_log.to_string(),
        ),
        ("faults".into(), f.faults.to_string()),
        ("edge crashes".into(), f.edge_crashes.to_string()),
        ("cloud crashes".into(), f.cloud_crashes.to_string()),
        (
            "largest backlog".into(),
            format!("{} B", f.backlog_bytes_max),
        ),
        (
            "drained after faults".into(),
            f.drain_ms.map_or("no".into(), |d| format!("{d} ms")),
        ),
        (
            "outbox budget".into(),
            if f.mqtt_records_room > 0 {
                format!(
                    "{} B (+{} B for MQTT records)",
                    plan.outbox_bytes_max, f.mqtt_records_room
                )
            } else {
                format!("{} B", plan.outbox_bytes_max)
            },
        ),
        ("full policy".into(), format!("{:?}", plan.full_policy)),
        (
            "segment readings max".into(),
            plan.segment_readings_max.to_string(),
        ),
        (
            "uplink window (segments)".into(),
            plan.inflight_segments_max.to_string(),
        ),
        (
            "simulated".into(),
            format!("{:.1} s", f.simulated_ms as f64 / 1000.0),
        ),
        (
            "wall clock".into(),
            format!("{:.2} s", f.wall_ms as f64 / 1000.0),
        ),
        ("speed".into(), speed),
    ];
    if f.mqtt_edges > 0 {
        let m = &f.mqtt;
        let mode = format!(
            "window {}{}, {} link, inflight_max {}, device_inflight_max {}, latency {} ms",
            plan.mqtt.window,
            if plan.mqtt.refill_on_ack {
                " (refilled at every PUBACK)"
            } else {
                ""
            },
            if plan.mqtt.overflow_link {
                "overflow"
            } else {
                "back-pressure"
            },
            plan.mqtt.inflight_max,
            plan.mqtt.device_inflight_max,
            plan.mqtt.latency_ms
        );
        rows.extend([
            ("MQTT-fed edges".into(), f.mqtt_edges.to_string()),
            ("MQTT broker".into(), mode),
            ("MQTT messages accepted".into(), m.accepted.to_string()),
            ("MQTT messages in the log".into(), m.in_log.to_string()),
            (
                "MQTT refused (queue full)".into(),
                m.refused_queue_full.to_string(),
            ),
            (
                "MQTT connections / cuts".into(),
                format!("{} / {}", m.connections, m.cuts),
            ),
            ("MQTT resent with DUP".into(), m.resent_dup.to_string()),
            ("MQTT stale PUBACKs".into(), m.acks_stale.to_string()),
            (
                "MQTT most in flight".into(),
                m.inflight_max_seen.to_string(),
            ),
            (
                "MQTT redeliveries recognised / copies / DUP taken".into(),
                format!(
                    "{} / {} / {}",
                    m.redeliveries, m.redelivered_copies, m.dup_taken
                ),
            ),
            (
                "MQTT overflows / forced reconnects".into(),
                format!("{} / {}", m.overflow_unacked, m.forced_reconnects),
            ),
            (
                "MQTT resends after a full outbox".into(),
                m.retries_full.to_string(),
            ),
        ]);
    }
    rows
}

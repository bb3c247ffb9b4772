//! Named fault scenarios, and the seeded plan of one run.
//!
//! A scenario is a preset: which faults happen and roughly how long they
//! last. The seed picks everything else: when each fault starts, its exact
//! length, which edge it hits, the outbox's budget and policy, the link's
//! latency. One seed and one scenario name are all a replay needs.

use std::fmt;

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use tributary_actors::outbox::FullPolicy;

/// The faults a simulation can inject.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FaultKind {
    /// Nothing passes between the edge and the cloud, either way.
    Partition { edge: usize },
    /// Datagrams from the edge to the cloud are lost; the other way works
    /// (or the reverse, with `to_cloud` false).
    OneWay { edge: usize, to_cloud: bool },
    /// The link loses `loss` of its datagrams and takes up to `latency_ms`.
    Degraded {
        edge: usize,
        loss: f64,
        latency_ms: u64,
    },
    /// The edge process dies; its disk keeps what was synced, plus the
    /// first `unsynced_kept` unsynced writes, the last one torn if `torn`.
    /// It restarts when the fault ends.
    EdgeCrash {
        edge: usize,
        unsynced_kept: usize,
        torn: bool,
    },
    /// The cloud process dies and restarts when the fault ends.
    CloudCrash,
    /// The log refuses every transaction.
    BrokerDown,
    /// The edge's disk refuses to sync, as a full disk would.
    DiskFull { edge: usize },
    /// The MQTT connection between an MQTT-fed edge and its broker ends (the
    /// broker keeps the session) and no new one can be made until the fault
    /// ends; the edge's source reconnects with its backoff.
    MqttCut { edge: usize },
}

impl FaultKind {
    /// Where the fault strikes, for reports.
    pub fn target(&self, edges: &[String]) -> String {
        let edge = |i: &usize| {
            edges
                .get(*i)
                .cloned()
                .unwrap_or_else(|| format!("edge #{i}"))
        };
        match self {
            FaultKind::Partition { edge: e } | FaultKind::Degraded { edge: e, .. } => {
                format!("link {}↔cloud", edge(e))
            }
            FaultKind::OneWay { edge: e, to_cloud } => {
                if *to_cloud {
                    format!("link {}→cloud", edge(e))
                } else {
                    format!("link cloud→{}", edge(e))
                }
            }
            FaultKind::EdgeCrash { edge: e, .. } | FaultKind::DiskFull { edge: e } => edge(e),
            FaultKind::MqttCut { edge: e } => format!("mqtt {}↔broker", edge(e)),
            FaultKind::CloudCrash => "cloud".into(),
            FaultKind::BrokerDown => "broker".into(),
        }
    }

    pub fn label(&self) -> String {
        match self {
            FaultKind::Partition { .. } => "partition".into(),
            FaultKind::OneWay { .. } => "one-way partition".into(),
            FaultKind::Degraded {
                loss, latency_ms, ..
            } => format!("loss {:.0}%, latency ≤{latency_ms} ms", loss * 100.0),
            FaultKind::EdgeCrash {
                unsynced_kept,
                torn,
                ..
            } => format!(
                "crash (keeps {unsynced_kept} unsynced write{}{})",
                if *unsynced_kept == 1 { "" } else { "s" },
                if *torn { ", last torn" } else { "" }
            ),
            FaultKind::CloudCrash => "crash".into(),
            FaultKind::BrokerDown => "broker unavailable".into(),
            FaultKind::DiskFull { .. } => "disk full".into(),
            FaultKind::MqttCut { .. } => "mqtt cut".into(),
        }
    }
}

/// One fault, from `at_ms` to `until_ms` of simulated time.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub at_ms: u64,
    pub until_ms: u64,
    pub kind: FaultKind,
}

/// The named presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Partition,
    OneWay,
    PartitionFlap,
    Degraded,
    EdgeCrash,
    CloudCrash,
    BrokerDown,
    DiskFull,
    ClockSkew,
    Mqtt,
    Random,
}

impl Scenario {
    pub const ALL: [Scenario; 11] = [
        Scenario::Partition,
        Scenario::OneWay,
        Scenario::PartitionFlap,
        Scenario::Degraded,
        Scenario::EdgeCrash,
        Scenario::CloudCrash,
        Scenario::BrokerDown,
        Scenario::DiskFull,
        Scenario::ClockSkew,
        Scenario::Mqtt,
        Scenario::Random,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Partition => "partition",
            Scenario::OneWay => "one-way",
            Scenario::PartitionFlap => "partition-flap",
            Scenario::Degraded => "degraded",
            Scenario::EdgeCrash => "edge-crash",
            Scenario::CloudCrash => "cloud-crash",
            Scenario::BrokerDown => "broker-down",
            Scenario::DiskFull => "disk-full",
            Scenario::ClockSkew => "clock-skew",
            Scenario::Mqtt => "mqtt",
            Scenario::Random => "random",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Scenario::Partition => {
                "full partitions between an edge and the cloud: `outages` of `outage_s` each"
            }
            Scenario::OneWay => {
                "one-way partitions: edge→cloud or cloud→edge datagrams lost, `outage_s` each"
            }
            Scenario::PartitionFlap => {
                "a flapping link: partitions of 0.2–3 s separated by 0.2–5 s, all through the fault phase"
            }
            Scenario::Degraded => {
                "high latency (up to 50–800 ms) and loss (5–40 %) on the links, `outage_s` each"
            }
            Scenario::EdgeCrash => {
                "edges crash (losing unsynced writes, sometimes tearing one) and restart 0.5–5 s later"
            }
            Scenario::CloudCrash => "the cloud crashes and restarts 0.5–5 s later",
            Scenario::BrokerDown => "the log refuses every transaction for `outage_s`",
            Scenario::DiskFull => {
                "an edge's disk refuses to sync for `outage_s`, while its outbox budget is nearly full"
            }
            Scenario::ClockSkew => {
                "edge clocks up to ±10 min off the cloud's, with partitions on top"
            }
            Scenario::Mqtt => {
                "every edge fed by a simulated MQTT broker (bursts of readings sharing a millisecond): \
                 `outages` edge crashes, 2×`outages` MQTT connection cuts, `outages` uplink partitions, \
                 and a disk that stops syncing, sometimes with a crash or a cut inside"
            }
            Scenario::Random => {
                "swarm testing: the seed enables a random subset of every fault above and times them, \
                 and decides which edges are MQTT-fed"
            }
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a user may set; the rest comes from the seed.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub edges: usize,
    pub devices_per_edge: usize,
    pub rate_hz: f64,
    /// How long faults are injected (the safety phase).
    pub faults_s: u64,
    /// How long each outage lasts, for scenarios with outages.
    pub outage_s: u64,
    /// How many outages, for scenarios with outages.
    pub outages: usize,
    /// The liveness budget: after the faults stop, everything acknowledged
    /// must reach the log within this long.
    pub drain_budget_s: u64,
    /// Overrides the seed's outbox budget.
    pub outbox_bytes_max: Option<u64>,
    /// Overrides the seed's choice of what a full outbox does.
    pub full_policy: Option<FullPolicy>,
    /// Which edges are fed by a simulated MQTT broker (without a topology;
    /// a topology's MQTT sources always are).
    pub mqtt: MqttEdges,
    /// Bursts per second each MQTT publisher sends (on average).
    pub mqtt_rate_hz: f64,
    /// Messages in one burst, 1 to this many, all with the same `ts`.
    pub mqtt_burst_max: u32,
    /// Overrides the seed's broker in-flight window (Mosquitto's
    /// `max_inflight_messages`).
    pub mqtt_window: Option<usize>,
    /// Overrides the seed's choice of broker: whether it refills its whole
    /// window at every PUBACK, as Mosquitto 2.0.11 does.
    pub mqtt_refill_on_ack: Option<bool>,
    /// Overrides the seed's choice of link: whether, out of permits, it
    /// reports `Overflow` instead of holding deliveries back.
    pub mqtt_overflow: Option<bool>,
    /// Whether an MQTT-fed edge's outbox budget gets room for the source's
    /// redelivery records on top of the seed's budget (they count against
    /// `outbox_bytes_max`); off shows what an outbox sized for readings
    /// alone does.
    pub mqtt_records_room: bool,
}

/// Which edges a run feeds from a simulated MQTT broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MqttEdges {
    /// The scenario decides: every edge in `mqtt`, the seed in `random`,
    /// none elsewhere.
    #[default]
    Scenario,
    All,
    None,
}

impl MqttEdges {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "scenario" => Some(Self::Scenario),
            "all" => Some(Self::All),
            "none" => Some(Self::None),
            _ => None,
        }
    }
}

impl Default for Params {
    fn default() -> Self {
        Self {
            edges: 2,
            devices_per_edge: 3,
            rate_hz: 10.0,
            faults_s: 30,
            outage_s: 5,
            outages: 2,
            drain_budget_s: 60,
            outbox_bytes_max: None,
            full_policy: None,
            mqtt: MqttEdges::Scenario,
            mqtt_rate_hz: 4.0,
            mqtt_burst_max: 4,
            mqtt_window: None,
            mqtt_refill_on_ack: None,
            mqtt_overflow: None,
            mqtt_records_room: true,
        }
    }
}

/// Everything one run does, derived from (scenario, params, seed).
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub faults: Vec<Fault>,
    /// Per edge, how far its clock is from the cloud's.
    pub clock_skew_us: Vec<i64>,
    pub outbox_bytes_max: u64,
    pub segment_readings_max: usize,
    pub full_policy: FullPolicy,
    pub inflight_segments_max: usize,
    pub commit_segments_max: usize,
    /// The cloud's log shards (1 to 3), from the seed alone.
    pub ingest_shards: u32,
    /// Cloud nodes (1 or 2), from the seed alone. Faults strike the first;
    /// with two, its edges fail over to the second and come back.
    pub clouds: u32,
    /// The links' base latency bound.
    pub latency_max_ms: u64,
    /// How long the log takes to answer a transaction it has committed.
    pub log_latency_ms: u64,
    /// The simulated MQTT brokers and the edges' MQTT sources.
    pub mqtt: MqttPlan,
}

/// What the seed decides about MQTT: which edges are fed by a broker, how
/// the broker behaves, and how the source is configured.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttPlan {
    /// Per edge, whether a broker feeds it (runs without a topology).
    pub fed: Vec<bool>,
    /// The broker's in-flight window per session.
    pub window: usize,
    /// The broker refills its whole window at every PUBACK (Mosquitto
    /// 2.0.11), so more than `window` (and than `inflight_max`) may be in
    /// flight.
    pub refill_on_ack: bool,
    /// The link reports `Overflow` when out of permits (and stops delivering
    /// until the source reconnects) instead of holding deliveries back.
    pub overflow_link: bool,
    /// The source's `inflight_max` and `device_inflight_max`.
    pub inflight_max: usize,
    pub device_inflight_max: usize,
    /// One-way latency between the edge and its broker.
    pub latency_ms: u64,
    /// Bounds on the broker's queue per session (messages not yet sent);
    /// a publish past it is refused and counted, never silently dropped.
    pub queue_max: usize,
    pub seed: u64,
}

impl MqttPlan {
    pub fn any(&self) -> bool {
        self.fed.iter().any(|f| *f)
    }
}

/// Bytes a reading takes in the outbox, roughly: budgets are set in readings.
const READING_BYTES_APPROX: u64 = 110;
/// The smallest budget a plan picks: four 1 KiB segments and their headers,
/// with room to spare.
const OUTBOX_BYTES_MIN: u64 = 8 * 1024;

impl Plan {
    pub fn new(scenario: Scenario, params: &Params, seed: u64) -> Self {
        Self::with_mqtt_edges(scenario, params, seed, None)
    }

    /// [`Plan::new`], with the edges a topology's MQTT sources feed (which
    /// then decide, rather than the scenario or the seed, where MQTT cuts
    /// strike).
    pub fn with_mqtt_edges(
        scenario: Scenario,
        params: &Params,
        seed: u64,
        mqtt_fed: Option<&[bool]>,
    ) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x7472_6962_7574_6172);
        let edges = params.edges.max(1);
        let faults_ms = params.faults_s * 1000;
        let outage_ms = params.outage_s.max(1) * 1000;
        let per_edge_rate = params.devices_per_edge as f64 * params.rate_hz;
        // Enough room for one outage of every device's readings, or a
        // fraction of it, so that the budget is sometimes hit.
        let outage_readings = (per_edge_rate * params.outage_s as f64).max(50.0) as u64;
        let mut outbox_bytes_max =
            outage_readings * READING_BYTES_APPROX * rng.random_range(1..=4) / 2;
        let drop_oldest = rng.random_bool(0.3);
        let full_policy = params.full_policy.unwrap_or(if drop_oldest {
            FullPolicy::DropOldest
        } else {
            FullPolicy::Block
        });
        let mut plan = Plan {
            faults: Vec::new(),
            clock_skew_us: vec![0; edges],
            outbox_bytes_max: 0,
            segment_readings_max: rng.random_range(5..=50),
            full_policy,
            inflight_segments_max: rng.random_range(1..=8),
            commit_segments_max: rng.random_range(1..=4),
            ingest_shards: (seed % 3) as u32 + 1,
            clouds: ((seed / 3) % 2) as u32 + 1,
            latency_max_ms: rng.random_range(1..=30),
            log_latency_ms: rng.random_range(1..=20),
            mqtt: MqttPlan::new(scenario, params, edges, seed, mqtt_fed),
        };
        let outages = |rng: &mut SmallRng,
                       plan: &mut Plan,
                       make: &dyn Fn(usize, &mut SmallRng) -> FaultKind| {
            for _ in 0..params.outages {
                let edge = rng.random_range(0..edges);
                let len = rng.random_range(outage_ms / 2..=outage_ms * 3 / 2);
                let at = rng.random_range(0..faults_ms.saturating_sub(len).max(1));
                let kind = make(edge, rng);
                plan.faults.push(Fault {
                    at_ms: at,
                    until_ms: at + len,
                    kind,
                });
            }
        };
        match scenario {
            Scenario::Partition => outages(&mut rng, &mut plan, &|edge, _| FaultKind::Partition {
                edge,
            }),
            Scenario::OneWay => outages(&mut rng, &mut plan, &|edge, rng| FaultKind::OneWay {
                edge,
                to_cloud: rng.random_bool(0.5),
            }),
            Scenario::PartitionFlap => plan.flap(
                &mut rng,
                rng_edge(&mut SmallRng::seed_from_u64(seed), edges),
                faults_ms,
            ),
            Scenario::Degraded => outages(&mut rng, &mut plan, &|edge, rng| degraded(edge, rng)),
            Scenario::EdgeCrash => plan.crashes(&mut rng, params, edges, faults_ms, true),
            Scenario::CloudCrash => plan.crashes(&mut rng, params, edges, faults_ms, false),
            Scenario::BrokerDown => outages(&mut rng, &mut plan, &|_, _| FaultKind::BrokerDown),
            Scenario::DiskFull => {
                // Nearly full: room for a fifth of an outage.
                outbox_bytes_max = (outage_readings * READING_BYTES_APPROX / 5).max(8192);
                outages(&mut rng, &mut plan, &|edge, _| FaultKind::DiskFull { edge })
            }
            Scenario::ClockSkew => {
                for skew in plan.clock_skew_us.iter_mut() {
                    *skew = rng.random_range(-600_000_000..=600_000_000);
                }
                outages(&mut rng, &mut plan, &|edge, _| FaultKind::Partition {
                    edge,
                })
            }
            Scenario::Mqtt => {
                plan.crashes(&mut rng, params, edges, faults_ms, true);
                outages(&mut rng, &mut plan, &|edge, _| FaultKind::Partition {
                    edge,
                });
                let mut m = SmallRng::seed_from_u64(seed ^ MQTT_SALT ^ 1);
                plan.mqtt_cuts(&mut m, params.outages * 2, faults_ms);
                plan.unsynced_window(&mut m, params, edges, faults_ms);
            }
            Scenario::Random => {
                plan.swarm(&mut rng, params, edges, faults_ms);
                // From an rng of their own, so that the other faults of a
                // seed are the same whether or not it has MQTT.
                let mut m = SmallRng::seed_from_u64(seed ^ MQTT_SALT ^ 1);
                if plan.mqtt.any() {
                    let n = m.random_range(0..=params.outages.max(1) * 2);
                    plan.mqtt_cuts(&mut m, n, faults_ms);
                }
            }
        }
        // The outbox needs room for four segments of at least 1 KiB.
        plan.outbox_bytes_max = params
            .outbox_bytes_max
            .unwrap_or(outbox_bytes_max.max(OUTBOX_BYTES_MIN));
        plan.faults.sort_by_key(|f| (f.at_ms, f.until_ms));
        plan
    }

    /// `n` cuts of MQTT connections of MQTT-fed edges, 0.1–3 s each.
    fn mqtt_cuts(&mut self, rng: &mut SmallRng, n: usize, faults_ms: u64) {
        let fed: Vec<usize> = (0..self.mqtt.fed.len())
            .filter(|e| self.mqtt.fed[*e])
            .collect();
        if fed.is_empty() {
            return;
        }
        for _ in 0..n {
            let edge = fed[rng.random_range(0..fed.len())];
            let len = rng.random_range(100..=3_000);
            let at = rng.random_range(0..faults_ms.saturating_sub(len).max(1));
            self.faults.push(Fault {
                at_ms: at,
                until_ms: at + len,
                kind: FaultKind::MqttCut { edge },
            });
        }
    }

    /// A disk that stops syncing on one edge for about `outage_s`, so that
    /// written batches (readings with their MQTT records) wait unsynced and
    /// unacknowledged; with even odds the edge crashes within it (keeping
    /// some unsynced writes, maybe tearing one), and with even odds its MQTT
    /// connection is cut within it (the broker resends what the source
    /// still holds).
    fn unsynced_window(
        &mut self,
        rng: &mut SmallRng,
        params: &Params,
        edges: usize,
        faults_ms: u64,
    ) {
        let edge = rng.random_range(0..edges);
        let len = rng.random_range(1_000..=params.outage_s.max(2) * 1000);
        let at = rng.random_range(0..faults_ms.saturating_sub(len).max(1));
        self.faults.push(Fault {
            at_ms: at,
            until_ms: at + len,
            kind: FaultKind::DiskFull { edge },
        });
        if rng.random_bool(0.5) {
            let crash_at = at + rng.random_range(len / 4..len);
            self.faults.push(Fault {
                at_ms: crash_at,
                until_ms: crash_at + rng.random_range(500..3_000),
                kind: FaultKind::EdgeCrash {
                    edge,
                    unsynced_kept: rng.random_range(0..4),
                    torn: rng.random_bool(0.3),
                },
            });
        }
        if rng.random_bool(0.5) {
            let cut_at = at + rng.random_range(len / 4..len);
            self.faults.push(Fault {
                at_ms: cut_at,
                until_ms: cut_at + rng.random_range(100..1_000),
                kind: FaultKind::MqttCut { edge },
            });
        }
    }

    fn flap(&mut self, rng: &mut SmallRng, edge: usize, faults_ms: u64) {
        let mut t = rng.random_range(0..2_000);
        while t < faults_ms {
            let len = rng.random_range(200..3_000);
            let until = (t + len).min(faults_ms);
            self.faults.push(Fault {
                at_ms: t,
                until_ms: until,
                kind: FaultKind::Partition { edge },
            });
            t = until + rng.random_range(200..5_000);
        }
    }

    fn crashes(
        &mut self,
        rng: &mut SmallRng,
        params: &Params,
        edges: usize,
        faults_ms: u64,
        edge: bool,
    ) {
        for _ in 0..params.outages.max(1) {
            let at = rng.random_range(0..faults_ms.max(1));
            let down = rng.random_range(500..5_000);
            let kind = if edge {
                FaultKind::EdgeCrash {
                    edge: rng.random_range(0..edges),
                    unsynced_kept: rng.random_range(0..4),
                    torn: rng.random_bool(0.3),
                }
            } else {
                FaultKind::CloudCrash
            };
            self.faults.push(Fault {
                at_ms: at,
                until_ms: at + down,
                kind,
            });
        }
    }

    /// Swarm testing: each seed turns on a random subset of fault kinds, so
    /// that rare combinations get runs of their own instead of being
    /// drowned out by the common ones.
    fn swarm(&mut self, rng: &mut SmallRng, params: &Params, edges: usize, faults_ms: u64) {
        const KINDS: usize = 8;
        let mut enabled = [false; KINDS];
        while !enabled.iter().any(|e| *e) {
            for e in enabled.iter_mut() {
                *e = rng.random_bool(0.4);
            }
        }
        for skew in self.clock_skew_us.iter_mut() {
            if enabled[7] {
                *skew = rng.random_range(-600_000_000..=600_000_000);
            }
        }
        let count = rng.random_range(1..=params.outages.max(1) * 3);
        for _ in 0..count {
            let kind = loop {
                let k = rng.random_range(0..KINDS);
                if enabled[k] {
                    break k;
                }
            };
            let edge = rng.random_range(0..edges);
            let len = rng.random_range(200..=params.outage_s.max(1) * 2000);
            let at = rng.random_range(0..faults_ms.max(1));
            let kind = match kind {
                0 => FaultKind::Partition { edge },
                1 => FaultKind::OneWay {
                    edge,
                    to_cloud: rng.random_bool(0.5),
                },
                2 => degraded(edge, rng),
                3 => FaultKind::EdgeCrash {
                    edge,
                    unsynced_kept: rng.random_range(0..4),
                    torn: rng.random_bool(0.3),
                },
                4 => FaultKind::CloudCrash,
                5 => FaultKind::BrokerDown,
                6 => FaultKind::DiskFull { edge },
                // Clock skew is set above; a partition keeps the count.
                _ => FaultKind::Partition { edge },
            };
            let len = match kind {
                FaultKind::EdgeCrash { .. } | FaultKind::CloudCrash => len.min(5_000),
                _ => len,
            };
            self.faults.push(Fault {
                at_ms: at,
                until_ms: (at + len).min(faults_ms.max(at + 1)),
                kind,
            });
        }
    }
}

/// Salts the MQTT choices' rng, so that they do not shift the others.
const MQTT_SALT: u64 = 0x6d71_7474_2d73_696d;

impl MqttPlan {
    fn new(
        scenario: Scenario,
        params: &Params,
        edges: usize,
        seed: u64,
        topology_fed: Option<&[bool]>,
    ) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed ^ MQTT_SALT);
        let mut fed = match (params.mqtt, scenario) {
            (MqttEdges::All, _) | (MqttEdges::Scenario, Scenario::Mqtt) => vec![true; edges],
            (MqttEdges::Scenario, Scenario::Random) if rng.random_bool(0.4) => {
                let mut fed: Vec<bool> = (0..edges).map(|_| rng.random_bool(0.6)).collect();
                if !fed.iter().any(|f| *f) {
                    fed[rng.random_range(0..edges)] = true;
                }
                fed
            }
            _ => vec![false; edges],
        };
        if let Some(t) = topology_fed {
            fed = (0..edges)
                .map(|e| t.get(e).copied().unwrap_or(false))
                .collect();
        }
        let windows = [2, 5, 20, 20, 100, 1000];
        let window = windows[rng.random_range(0..windows.len())];
        let inflights = [8, 32, 256, 4096];
        let inflight_max = inflights[rng.random_range(0..inflights.len())];
        let device_inflight_max = match rng.random_range(0..4) {
            0 => 1,
            1 => 4,
            2 => inflight_max / 2,
            _ => inflight_max,
        };
        // Drawn whether or not overridden, so that an override changes
        // nothing else.
        let refill_on_ack = rng.random_bool(0.25);
        let overflow_link = rng.random_bool(0.3);
        MqttPlan {
            fed,
            window: params.mqtt_window.unwrap_or(window).max(1),
            refill_on_ack: params.mqtt_refill_on_ack.unwrap_or(refill_on_ack),
            overflow_link: params.mqtt_overflow.unwrap_or(overflow_link),
            inflight_max,
            device_inflight_max: device_inflight_max.max(1),
            latency_ms: [0, 1, 2, 5, 10, 25][rng.random_range(0..6)],
            queue_max: 100_000,
            seed: rng.random(),
        }
    }
}

fn rng_edge(rng: &mut SmallRng, edges: usize) -> usize {
    rng.random_range(0..edges)
}

fn degraded(edge: usize, rng: &mut SmallRng) -> FaultKind {
    FaultKind::Degraded {
        edge,
        loss: rng.random_range(0.05..0.4),
        latency_ms: rng.random_range(50..=800),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_one_plan_and_faults_stay_in_the_fault_phase() {
        let params = Params::default();
        for scenario in Scenario::ALL {
            for seed in 0..50 {
                let a = Plan::new(scenario, &params, seed);
                assert_eq!(
                    a,
                    Plan::new(scenario, &params, seed),
                    "{scenario} seed {seed}"
                );
                for f in &a.faults {
                    assert!(f.at_ms < f.until_ms, "{scenario} seed {seed}: {f:?}");
                    assert!(f.at_ms < params.faults_s * 1000 + 1, "{scenario}: {f:?}");
                }
            }
        }
    }

    #[test]
    fn every_scenario_but_clock_skew_injects_faults_and_names_parse() {
        for scenario in Scenario::ALL {
            assert_eq!(Scenario::from_name(scenario.name()), Some(scenario));
            let plan = Plan::new(scenario, &Params::default(), 3);
            assert!(!plan.faults.is_empty(), "{scenario}");
        }
        let skewed = Plan::new(Scenario::ClockSkew, &Params::default(), 3);
        assert!(skewed.clock_skew_us.iter().any(|s| *s != 0));
    }
}

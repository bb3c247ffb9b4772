//! Seeded, deterministic simulations of Tributary's data path.
//!
//! The edge's [`Outbox`] and [`EdgeUplink`], and the cloud's [`Ingest`], are
//! sans-IO cores; here one thread drives them with a simulated disk
//! ([`MemoryStore`]), a simulated log with transactions ([`MemoryLog`]) and a
//! simulated link (two frame queues that a disconnect empties). A seed picks
//! every step, so a failing run replays exactly from its seed.
//!
//! Each run checks the invariants that matter to users:
//! - **Safety:** every reading acknowledged to its device is in the log
//!   exactly once; per device, the log keeps the device's order; nothing
//!   that was never produced appears.
//! - **Bounds:** the outbox stays within `outbox_bytes_max`.
//! - **Liveness:** once faults stop, the backlog drains within a step budget.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use tributary_actors::outbox::{segment, FullPolicy, MemoryStore, Outbox, OutboxConfig, Refusal};
use tributary_actors::reading::{Metric, Reading, Value};
use tributary_actors::sink::memory::MemoryLog;
use tributary_actors::sink::{EdgeLogWriter, Hwm, LogSink, SegmentBatch};
use tributary_cluster::uplink::{EdgeUplink, EdgeUplinkConfig, Frame, Ingest, IngestConfig};

const EDGE: &str = "edge-sim";
const DEVICES: usize = 3;

/// The knobs of one run; all derived from the seed unless set.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    /// Steps with faults, then the liveness phase.
    pub steps: usize,
    /// Steps allowed for the backlog to drain once faults stop.
    pub drain_steps_max: usize,
    pub outbox: OutboxConfig,
    pub inflight_segments_max: usize,
    pub commit_segments_max: usize,
    /// Prints every event: for replaying a failure.
    pub verbose: bool,
    /// A deliberate bug, to prove that the checks catch it.
    pub mutation: Option<Mutation>,
}

/// Deliberately broken variants of the system, for testing the simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    /// The edge acknowledges a reading when it is accepted, before the fsync.
    AckBeforeFsync,
    /// The cloud forgets the high-water mark it read from the log.
    ForgetHwm,
}

impl SimConfig {
    pub fn from_seed(seed: u64, steps: usize) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed);
        let policy = if rng.random_bool(0.3) {
            FullPolicy::DropOldest
        } else {
            FullPolicy::Block
        };
        let segment_bytes_max = 1024;
        Self {
            seed,
            steps,
            drain_steps_max: 20_000,
            outbox: OutboxConfig {
                outbox_bytes_max: rng.random_range(4u64..12) * (segment_bytes_max as u64 + 64),
                segment_readings_max: rng.random_range(1..8),
                segment_bytes_max,
                commit_interval_ms: 10,
                full_policy: policy,
            },
            inflight_segments_max: rng.random_range(1..5),
            commit_segments_max: rng.random_range(1..4),
            verbose: false,
            mutation: None,
        }
    }
}

/// What a run saw.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SimReport {
    pub readings_acked: usize,
    pub readings_dropped: usize,
    pub readings_in_log: usize,
    pub edge_crashes: usize,
    pub cloud_crashes: usize,
    pub disconnects: usize,
    pub log_outages: usize,
    pub drain_steps: usize,
    /// A hash of every step taken and its outcome: equal seeds, equal traces.
    pub trace_hash: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("reading {0:?} was acknowledged to its device but is not in the log")]
    Lost((String, i64)),
    #[error("reading {0:?} is in the log {1} times")]
    Duplicated((String, i64), usize),
    #[error("device {0} has reading {1} after reading {2} in the log")]
    OutOfOrder(String, i64, i64),
    #[error("reading {0:?} is in the log but was never produced")]
    Invented((String, i64)),
    #[error("the outbox holds {0} bytes, over its budget of {1}")]
    OverBudget(u64, u64),
    #[error("the backlog did not drain within {0} steps")]
    NoDrain(usize),
    #[error("a core refused a correct peer: {0}")]
    Protocol(String),
}

struct Edge {
    outbox: Outbox<(String, i64)>,
    uplink: EdgeUplink,
}

struct Cloud {
    ingest: Ingest,
    writer: Box<dyn EdgeLogWriter>,
}

pub struct Sim {
    cfg: SimConfig,
    rng: SmallRng,
    now: Instant,
    store: MemoryStore,
    log: MemoryLog,
    edge: Edge,
    cloud: Option<Cloud>,
    link_up: bool,
    to_cloud: VecDeque<Frame>,
    to_edge: VecDeque<Frame>,
    next_ts: Vec<i64>,
    produced: HashSet<(String, i64)>,
    acked: Vec<(String, i64)>,
    dropped: HashSet<(String, i64)>,
    report: SimReport,
    hasher: std::collections::hash_map::DefaultHasher,
}

fn reading(device: usize, ts: i64) -> Reading {
    Reading {
        device_id: format!("d{device}"),
        device_ts_us: ts,
        edge_ts_us: ts,
        stream: None,
        metrics: vec![Metric {
            name: "v".into(),
            value: Value::I64(ts),
            unit: None,
        }],
    }
}

impl Sim {
    pub fn new(cfg: SimConfig) -> Self {
        let store = MemoryStore::new();
        let edge = Self::boot_edge(&cfg, &store, 1);
        Self {
            rng: SmallRng::seed_from_u64(cfg.seed),
            now: Instant::now(),
            store,
            log: MemoryLog::new(),
            edge,
            cloud: None,
            link_up: false,
            to_cloud: VecDeque::new(),
            to_edge: VecDeque::new(),
            next_ts: vec![1; DEVICES],
            produced: HashSet::new(),
            acked: Vec::new(),
            dropped: HashSet::new(),
            report: SimReport::default(),
            hasher: Default::default(),
            cfg,
        }
    }

    fn boot_edge(cfg: &SimConfig, store: &MemoryStore, epoch: u64) -> Edge {
        let (outbox, rec) = Outbox::open(Box::new(store.clone()), cfg.outbox.clone(), epoch)
            .expect("the simulated disk never fails to open");
        let uplink = EdgeUplink::new(
            EdgeUplinkConfig {
                inflight_segments_max: cfg.inflight_segments_max,
                welcome_timeout_ms: 1000,
            },
            EDGE.into(),
            rec.epoch,
            rec.acked_through,
            rec.sealed_through,
        );
        Edge { outbox, uplink }
    }

    fn trace(&mut self, what: &str, n: u64) {
        use std::hash::Hasher;
        self.hasher.write(what.as_bytes());
        self.hasher.write_u64(n);
        if self.cfg.verbose && what != "step" {
            println!("{what} {n}");
        }
    }

    /// Runs the safety phase, then the liveness phase, then checks.
    pub fn run(mut self) -> Result<SimReport, Violation> {
        for _ in 0..self.cfg.steps {
            self.step(true)?;
        }
        // Liveness: no more faults; the link comes up and stays up.
        self.store.set_sync_failing(false);
        self.log.set_unavailable(false);
        let mut steps = 0;
        while !self.drained() {
            if steps >= self.cfg.drain_steps_max {
                return Err(Violation::NoDrain(steps));
            }
            self.step(false)?;
            steps += 1;
        }
        self.report.drain_steps = steps;
        self.check()
    }

    fn drained(&self) -> bool {
        self.link_up
            && self.edge.uplink.is_up()
            && self.edge.outbox.readings_open() == 0
            && self.edge.outbox.segments_stored() == 0
            && self.to_cloud.is_empty()
            && self.to_edge.is_empty()
    }

    fn step(&mut self, faults: bool) -> Result<(), Violation> {
        let roll = self.rng.random_range(0..100u32);
        self.now += Duration::from_millis(self.rng.random_range(0..5));
        match roll {
            0..=29 if faults => self.produce(),
            30..=39 => self.commit()?,
            40..=59 => self.deliver_to_cloud()?,
            60..=69 => self.cloud_commit()?,
            70..=89 => self.deliver_to_edge()?,
            90..=93 => self.connect(),
            94 if faults => self.disconnect(),
            95 if faults => self.crash_edge(),
            96 if faults => self.crash_cloud(),
            97 if faults => {
                let down = self.rng.random_bool(0.5);
                if down {
                    self.report.log_outages += 1;
                }
                self.log.set_unavailable(down);
            }
            98 if faults => {
                let failing = self.rng.random_bool(0.3);
                self.store.set_sync_failing(failing);
            }
            _ => {
                if !faults {
                    self.connect();
                    self.commit()?;
                }
            }
        }
        self.trace("step", roll as u64);
        let used = self.edge.outbox.bytes_used();
        if used > self.cfg.outbox.outbox_bytes_max {
            return Err(Violation::OverBudget(
                used,
                self.cfg.outbox.outbox_bytes_max,
            ));
        }
        Ok(())
    }

    fn produce(&mut self) {
        let d = self.rng.random_range(0..DEVICES);
        let ts = self.next_ts[d];
        let key = (format!("d{d}"), ts);
        match self
            .edge
            .outbox
            .handle_reading(self.now, reading(d, ts), key.clone())
        {
            Ok(()) => {
                if self.cfg.mutation == Some(Mutation::AckBeforeFsync) {
                    self.acked.push(key.clone());
                }
                self.produced.insert(key);
                self.next_ts[d] += 1;
                self.trace("produce", ts as u64);
            }
            // The device keeps the reading and retries it later.
            Err(Refusal::Full(..)) | Err(Refusal::SegmentFull(..)) => self.trace("full", ts as u64),
            Err(_) => unreachable!("simulated readings are valid"),
        }
        for d in self.edge.outbox.poll_dropped() {
            self.dropped.extend(d.keys);
        }
    }

    fn commit(&mut self) -> Result<(), Violation> {
        if !self.edge.outbox.commit_due(self.now) {
            self.now += Duration::from_millis(self.cfg.outbox.commit_interval_ms);
        }
        if let Ok(Some(c)) = self.edge.outbox.commit() {
            let seq = c.seq.expect("the model commits readings only");
            self.trace("commit", seq);
            if self.cfg.verbose {
                println!("  acked {:?}", c.tickets);
            }
            if self.cfg.mutation != Some(Mutation::AckBeforeFsync) {
                self.acked.extend(c.tickets);
            }
            self.edge.uplink.handle_segment_sealed(seq);
        }
        for d in self.edge.outbox.poll_dropped() {
            self.dropped.extend(d.keys);
        }
        self.pump_edge();
        Ok(())
    }

    fn pump_edge(&mut self) {
        if let Some(seq) = self.edge.uplink.poll_delete() {
            let _ = self.edge.outbox.handle_acked(seq);
        }
        while let Some(req) = self.edge.uplink.poll_read() {
            // A read can fail (it makes the outbox's "sent" mark durable
            // first, and the disk may be failing): the range is asked for
            // again, as the uplink actor does.
            match self
                .edge
                .outbox
                .read(req.from_seq, req.through_seq, req.segments_max)
            {
                Ok(segs) => self.edge.uplink.handle_segments_read(req, segs),
                Err(_) => {
                    self.edge.uplink.handle_read_failed(req);
                    break;
                }
            }
        }
        while let Some(f) = self.edge.uplink.poll_transmit() {
            if self.link_up {
                self.to_cloud.push_back(f);
            }
        }
    }

    fn pump_cloud(&mut self) {
        if let Some(c) = &mut self.cloud {
            while let Some(f) = c.ingest.poll_transmit() {
                if self.link_up {
                    self.to_edge.push_back(f);
                }
            }
        }
    }

    fn connect(&mut self) {
        if !self.link_up {
            self.link_up = true;
            self.edge.uplink.handle_link_up(self.now);
            self.trace("connect", 0);
            self.pump_edge();
        }
    }

    fn disconnect(&mut self) {
        if self.link_up {
            self.report.disconnects += 1;
            self.link_up = false;
            self.to_cloud.clear();
            self.to_edge.clear();
            self.edge.uplink.handle_link_down();
            self.cloud = None;
            self.trace("disconnect", 0);
        }
    }

    fn crash_edge(&mut self) {
        self.report.edge_crashes += 1;
        self.disconnect();
        let keep = self.rng.random_range(0..3);
        let tear = self.rng.random_bool(0.2);
        self.store.crash(Some(keep), tear);
        self.edge = Self::boot_edge(&self.cfg, &self.store, 1);
        self.trace("crash-edge", keep as u64);
    }

    fn crash_cloud(&mut self) {
        self.report.cloud_crashes += 1;
        self.disconnect();
        self.trace("crash-cloud", 0);
    }

    fn deliver_to_cloud(&mut self) -> Result<(), Violation> {
        let Some(frame) = self.to_cloud.pop_front() else {
            return Ok(());
        };
        self.trace("to-cloud", 0);
        match frame {
            Frame::Hello { epoch, .. } => {
                let mut writer = self.log.open_edge(EDGE).expect("memory log opens");
                let hwm = match writer.high_water_mark() {
                    Ok(_) if self.cfg.mutation == Some(Mutation::ForgetHwm) => None,
                    Ok(h) => h,
                    // The log is down: the cloud closes the link; the edge retries.
                    Err(_) => {
                        self.disconnect();
                        return Ok(());
                    }
                };
                let mut ingest = Ingest::new(
                    IngestConfig {
                        commit_segments_max: self.cfg.commit_segments_max,
                        pending_segments_max: 64,
                    },
                    EDGE.into(),
                    epoch,
                );
                ingest
                    .handle_hwm(hwm.map(|h| (h.epoch, h.seq)))
                    .map_err(|e| Violation::Protocol(e.to_string()))?;
                self.cloud = Some(Cloud { ingest, writer });
            }
            other => {
                let Some(c) = &mut self.cloud else {
                    return Ok(());
                };
                c.ingest
                    .handle_frame(other)
                    .map_err(|e| Violation::Protocol(e.to_string()))?;
            }
        }
        self.pump_cloud();
        Ok(())
    }

    fn cloud_commit(&mut self) -> Result<(), Violation> {
        let Some(c) = &mut self.cloud else {
            return Ok(());
        };
        let Some(batch) = c.ingest.poll_commit() else {
            return Ok(());
        };
        let batches: Vec<SegmentBatch> = batch
            .segments
            .iter()
            .map(|s| SegmentBatch {
                seq: s.seq,
                readings: segment::decode_payload(&s.bytes, s.readings_count)
                    .expect("segments decode"),
                refused: Vec::new(),
            })
            .collect();
        let hwm = Hwm {
            epoch: batch.epoch,
            seq: batch.seq_through,
        };
        match c.writer.commit(EDGE, hwm, &batches) {
            Ok(()) => {
                c.ingest.handle_commit_succeeded(&batch);
                self.trace("cloud-commit", batch.seq_through);
            }
            Err(_) => {
                // As the real ingest does: give up the link; the edge resends.
                self.trace("cloud-commit-failed", batch.seq_through);
                self.disconnect();
                return Ok(());
            }
        }
        self.pump_cloud();
        Ok(())
    }

    fn deliver_to_edge(&mut self) -> Result<(), Violation> {
        let Some(frame) = self.to_edge.pop_front() else {
            return Ok(());
        };
        self.trace("to-edge", 0);
        if let Err(e) = self.edge.uplink.handle_frame(frame) {
            return Err(Violation::Protocol(e.to_string()));
        }
        self.pump_edge();
        Ok(())
    }

    fn check(mut self) -> Result<SimReport, Violation> {
        let records = self.log.records();
        let mut count: HashMap<(String, i64), usize> = HashMap::new();
        for r in &records {
            let key = (r.reading.device_id.clone(), r.reading.device_ts_us);
            if !self.produced.contains(&key) {
                return Err(Violation::Invented(key));
            }
            *count.entry(key).or_default() += 1;
        }
        // Duplicates first: a replayed reading also breaks the order, and
        // "duplicated" names the cause.
        let mut dups: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
        dups.sort();
        if let Some((key, n)) = dups.first() {
            return Err(Violation::Duplicated((*key).clone(), **n));
        }
        let mut last: HashMap<&str, i64> = HashMap::new();
        for r in &records {
            let (device, ts) = (r.reading.device_id.as_str(), r.reading.device_ts_us);
            if let Some(prev) = last.insert(device, ts) {
                if ts <= prev {
                    return Err(Violation::OutOfOrder(device.to_string(), ts, prev));
                }
            }
        }
        for key in &self.acked {
            if !count.contains_key(key) && !self.dropped.contains(key) {
                return Err(Violation::Lost(key.clone()));
            }
        }
        self.report.readings_acked = self.acked.len();
        self.report.readings_dropped = self.dropped.len();
        self.report.readings_in_log = records.len();
        use std::hash::Hasher;
        self.report.trace_hash = self.hasher.finish();
        Ok(self.report)
    }
}

/// Runs one seed with its derived configuration.
pub fn run_seed(seed: u64, steps: usize) -> Result<SimReport, Violation> {
    Sim::new(SimConfig::from_seed(seed, steps)).run()
}

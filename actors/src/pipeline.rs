//! Runs one node's part of a topology's stages: a sans-IO router that feeds
//! each reading to the stages that read its stream, in topological order, and
//! returns what leaves the node.
//!
//! # Design
//! - **One core, two drivers.** The edge's gateway drives a pipeline inside
//!   its own turn, so that a reading and what it caused enter the outbox in
//!   order and under one budget. The cloud's stage runner drives one between
//!   reading a batch from the log and committing its outputs with the batch's
//!   offsets. Neither knows about the other.
//! - **Sans-IO.** No clock, no I/O. Time is event time; the driver moves the
//!   watermark on when input is quiet ([`Pipeline::advance_watermark`]).
//! - **Stages are supervised here.** A stage that panics is restarted from
//!   its spec with fresh state (its open windows are lost, and counted), at
//!   most `restarts_max` times per `restart_period_ms`; past that the
//!   pipeline fails with [`PipelineError::StageFailed`] and its driver's
//!   supervisor takes over. Restarts and the last failure are recorded per
//!   stage, for the dashboard.
//! - **Bounded.** One reading causes at most [`OUTPUTS_PER_READING_MAX`]
//!   outputs across the whole pipeline; a stage that emits more is cut off
//!   there and the excess counted, never buffered.

use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::reading::Reading;
use crate::stages::{Operator, Output, ParamError, StageSpec, StageStats};
use crate::topology::{Component, ComponentKind};

/// Outputs one input may cause across the pipeline, windows closing included.
pub const OUTPUTS_PER_READING_MAX: usize = 4096;
/// Restarts of one stage allowed within `restart_period_ms` unless told
/// otherwise: the supervisors' (and so the node's) defaults.
pub const STAGE_RESTARTS_MAX_DEFAULT: u32 = crate::supervision::RESTARTS_MAX_DEFAULT;
pub const STAGE_RESTART_PERIOD_MS_DEFAULT: u64 = crate::supervision::RESTART_PERIOD_MS_DEFAULT;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PipelineError {
    #[error("building stage {stage:?} failed: {error}")]
    Build {
        stage: String,
        #[source]
        error: ParamError,
    },
    #[error("{component:?} is not a stage")]
    NotAStage { component: String },
    #[error("this node runs no stage named {stage:?}")]
    UnknownStage { stage: String },
    #[error("setting {param:?} of stage {stage:?} failed: {error}")]
    SetParam {
        stage: String,
        param: String,
        #[source]
        error: ParamError,
    },
    #[error("stage {stage:?} failed {restarts} times within {period_ms} ms, more than its supervisor allows; last failure: {reason}")]
    StageFailed {
        stage: String,
        restarts: u32,
        period_ms: u64,
        reason: String,
    },
}

/// Something that leaves the pipeline: a reading or alert on a stream that
/// the node sends on (through the outbox, or to a sink).
#[derive(Debug, Clone, PartialEq)]
pub struct Emitted {
    /// The component that emitted it; for a reading, also `reading.stream`.
    pub stream: String,
    pub output: Output,
}

/// What the dashboard shows of one stage.
#[derive(Debug, Clone, PartialEq)]
pub struct StageReport {
    pub name: String,
    pub stats: StageStats,
    pub restarts: u32,
    /// Unix milliseconds and reason of the last failure.
    pub last_failure: Option<(i64, String)>,
}

/// How often a stage may fail before the pipeline gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageRestarts {
    pub restarts_max: u32,
    pub restart_period_ms: u64,
}

impl Default for StageRestarts {
    fn default() -> Self {
        Self {
            restarts_max: STAGE_RESTARTS_MAX_DEFAULT,
            restart_period_ms: STAGE_RESTART_PERIOD_MS_DEFAULT,
        }
    }
}

struct Slot {
    name: String,
    spec: StageSpec,
    op: Box<dyn Operator>,
    /// Stats of the operators a restart replaced, so counts only grow.
    stats_before: StageStats,
    restarts: u32,
    /// Unix ms of the restarts within the current period.
    recent_restarts_ms: VecDeque<i64>,
    last_failure: Option<(i64, String)>,
}

/// Counters of the pipeline as a whole; they only grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PipelineStats {
    pub received: u64,
    pub emitted: u64,
    /// Outputs past [`OUTPUTS_PER_READING_MAX`] for one input.
    pub outputs_cut: u64,
}

pub struct Pipeline {
    slots: Vec<Slot>,
    /// Stream name to the slots that read it, in topological order.
    readers: HashMap<String, Vec<usize>>,
    /// Streams whose readings and alerts leave the pipeline.
    exits: HashSet<String>,
    restarts: StageRestarts,
    stats: PipelineStats,
    queue: VecDeque<(String, Output)>,
}

/// One stage's part of a [`Pipeline::snapshot`].
#[derive(bincode::Encode, bincode::Decode)]
struct StageSnapshot {
    name: String,
    /// The spec as `Debug` shows it: a checkpoint of another spec (the
    /// topology changed between runs) is not taken back.
    spec: String,
    state: Option<Vec<u8>>,
}

/// What [`Pipeline::restore`] took back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restored {
    /// Stages whose state came back.
    pub stages: Vec<String>,
    /// Stages that start fresh, with why.
    pub fresh: Vec<(String, String)>,
}

fn panic_reason(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

impl Pipeline {
    /// A pipeline of `stages` (in topological order, as
    /// [`Topology::part_for`](crate::topology::Topology::part_for) gives
    /// them) whose streams in `exits` leave the node.
    pub fn new<'a>(
        stages: impl IntoIterator<Item = &'a Component>,
        exits: impl IntoIterator<Item = &'a str>,
        restarts: StageRestarts,
    ) -> Result<Self, PipelineError> {
        let mut slots = Vec::new();
        let mut readers: HashMap<String, Vec<usize>> = HashMap::new();
        for c in stages {
            let ComponentKind::Stage(spec) = &c.kind else {
                return Err(PipelineError::NotAStage {
                    component: c.name.clone(),
                });
            };
            let op = spec.build(&c.name).map_err(|error| PipelineError::Build {
                stage: c.name.clone(),
                error,
            })?;
            for input in &c.inputs {
                readers.entry(input.clone()).or_default().push(slots.len());
            }
            slots.push(Slot {
                name: c.name.clone(),
                spec: spec.clone(),
                op,
                stats_before: StageStats::default(),
                restarts: 0,
                recent_restarts_ms: VecDeque::new(),
                last_failure: None,
            });
        }
        Ok(Self {
            slots,
            readers,
            exits: exits.into_iter().map(str::to_owned).collect(),
            restarts,
            stats: PipelineStats::default(),
            queue: VecDeque::new(),
        })
    }

    /// Whether any stage here reads `stream`.
    pub fn reads(&self, stream: &str) -> bool {
        self.readers.contains_key(stream)
    }

    /// Whether `stream` leaves the node.
    pub fn exits(&self, stream: &str) -> bool {
        self.exits.contains(stream)
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Feeds `reading` of `stream` to the stages that read it, and appends to
    /// `out` what leaves the node because of it, in order. The input itself
    /// is not in `out`: the driver decides what to do with its own input.
    ///
    /// `now_ms` (Unix ms, the driver's clock) dates a failure, should a
    /// stage fail.
    pub fn handle(
        &mut self,
        now_ms: i64,
        stream: &str,
        reading: Reading,
        out: &mut Vec<Emitted>,
    ) -> Result<(), PipelineError> {
        self.stats.received += 1;
        self.queue.clear();
        let Some(first) = self.readers.get(stream).cloned() else {
            return Ok(());
        };
        let mut budget = OUTPUTS_PER_READING_MAX;
        for i in first {
            let outputs = self.run(now_ms, i, |op| op.handle(reading.clone()))?;
            self.enqueue(i, outputs, &mut budget);
        }
        self.drain(now_ms, out, &mut budget)
    }

    /// Moves every stage's watermark to `watermark_us`, closing what it
    /// passes, and appends what leaves the node to `out`.
    pub fn advance_watermark(
        &mut self,
        now_ms: i64,
        watermark_us: i64,
        out: &mut Vec<Emitted>,
    ) -> Result<(), PipelineError> {
        self.queue.clear();
        let mut budget = OUTPUTS_PER_READING_MAX;
        for i in 0..self.slots.len() {
            let outputs = self.run(now_ms, i, |op| op.advance_watermark(watermark_us))?;
            self.enqueue(i, outputs, &mut budget);
            // Outputs of earlier stages reach later ones before those move
            // their own watermark, so nothing they emit is late there.
            self.drain(now_ms, out, &mut budget)?;
        }
        Ok(())
    }

    /// Every stage's state, for a checkpoint; stages that cannot save theirs
    /// are listed without it.
    pub fn snapshot(&self) -> Vec<u8> {
        let stages: Vec<StageSnapshot> = self
            .slots
            .iter()
            .map(|s| StageSnapshot {
                name: s.name.clone(),
                spec: format!("{:?}", s.spec),
                state: s.op.snapshot(),
            })
            .collect();
        // Plain owned data always encodes.
        bincode::encode_to_vec(&stages, crate::reading::bincode_config())
            .expect("a pipeline snapshot encodes")
    }

    /// Takes back what [`Pipeline::snapshot`] saved, stage by stage, by name:
    /// a stage of another spec, one that saved nothing, or one whose state
    /// does not decode starts fresh (and says why).
    pub fn restore(&mut self, bytes: &[u8]) -> Result<Restored, String> {
        let (saved, _): (Vec<StageSnapshot>, _) =
            bincode::decode_from_slice(bytes, crate::reading::bincode_config())
                .map_err(|e| format!("the stages' checkpoint does not decode: {e}"))?;
        let mut by_name: HashMap<String, StageSnapshot> =
            saved.into_iter().map(|s| (s.name.clone(), s)).collect();
        let mut restored = Restored::default();
        for slot in &mut self.slots {
            let why = match by_name.remove(&slot.name) {
                None => "not in the checkpoint".to_owned(),
                Some(s) if s.spec != format!("{:?}", slot.spec) => {
                    "its spec changed since the checkpoint".to_owned()
                }
                Some(StageSnapshot { state: None, .. }) => {
                    "it saves no state (see CustomStage::snapshot)".to_owned()
                }
                Some(StageSnapshot {
                    state: Some(state), ..
                }) => match slot.op.restore(&state) {
                    Ok(()) => {
                        restored.stages.push(slot.name.clone());
                        continue;
                    }
                    Err(e) => {
                        // A half-restored operator is not trusted: start over.
                        if let Ok(fresh) = slot.spec.build(&slot.name) {
                            slot.op = fresh;
                        }
                        e
                    }
                },
            };
            restored.fresh.push((slot.name.clone(), why));
        }
        Ok(restored)
    }

    fn enqueue(&mut self, slot: usize, outputs: Vec<Output>, budget: &mut usize) {
        let name = &self.slots[slot].name;
        for mut o in outputs {
            if *budget == 0 {
                self.stats.outputs_cut += 1;
                continue;
            }
            *budget -= 1;
            if let Output::Reading(r) = &mut o {
                r.stream = Some(name.clone());
            }
            self.queue.push_back((name.clone(), o));
        }
    }

    fn drain(
        &mut self,
        now_ms: i64,
        out: &mut Vec<Emitted>,
        budget: &mut usize,
    ) -> Result<(), PipelineError> {
        while let Some((stream, output)) = self.queue.pop_front() {
            if let Output::Reading(r) = &output {
                if let Some(readers) = self.readers.get(&stream).cloned() {
                    for i in readers {
                        let outputs = self.run(now_ms, i, |op| op.handle(r.clone()))?;
                        self.enqueue(i, outputs, budget);
                    }
                }
            }
            if self.exits.contains(&stream) {
                self.stats.emitted += 1;
                out.push(Emitted { stream, output });
            }
        }
        Ok(())
    }

    /// Runs `f` on a stage's operator; a panic restarts the stage.
    fn run(
        &mut self,
        now_ms: i64,
        i: usize,
        f: impl FnOnce(&mut dyn Operator) -> Vec<Output>,
    ) -> Result<Vec<Output>, PipelineError> {
        let slot = &mut self.slots[i];
        match catch_unwind(AssertUnwindSafe(|| f(slot.op.as_mut()))) {
            Ok(outputs) => Ok(outputs),
            Err(payload) => {
                let reason = panic_reason(payload.as_ref());
                self.restart(now_ms, i, reason)?;
                Ok(Vec::new())
            }
        }
    }

    fn restart(&mut self, now_ms: i64, i: usize, reason: String) -> Result<(), PipelineError> {
        let policy = self.restarts;
        let slot = &mut self.slots[i];
        tracing::warn!(stage = %slot.name, %reason, "stage failed; restarting it with fresh state");
        slot.last_failure = Some((now_ms, reason.clone()));
        let horizon = now_ms.saturating_sub(policy.restart_period_ms as i64);
        while slot
            .recent_restarts_ms
            .front()
            .is_some_and(|&t| t < horizon)
        {
            slot.recent_restarts_ms.pop_front();
        }
        if slot.recent_restarts_ms.len() as u32 >= policy.restarts_max {
            return Err(PipelineError::StageFailed {
                stage: slot.name.clone(),
                restarts: slot.recent_restarts_ms.len() as u32,
                period_ms: policy.restart_period_ms,
                reason,
            });
        }
        slot.recent_restarts_ms.push_back(now_ms);
        slot.restarts += 1;
        // Built once already, so the spec builds again.
        let fresh = slot
            .spec
            .build(&slot.name)
            .map_err(|error| PipelineError::Build {
                stage: slot.name.clone(),
                error,
            })?;
        let old = std::mem::replace(&mut slot.op, fresh);
        // The failed operator's counters survive; its state does not.
        add_stats(&mut slot.stats_before, old.stats());
        Ok(())
    }

    /// Restarts a stage on request (a control call): fresh state, counted.
    pub fn restart_stage(&mut self, now_ms: i64, stage: &str) -> Result<(), PipelineError> {
        let i = self.index(stage)?;
        self.restart(now_ms, i, "restart requested".into())
    }

    /// Changes a stage's parameter, keeping its state; a later restart keeps
    /// the new value.
    pub fn set_param(&mut self, stage: &str, param: &str, value: f64) -> Result<(), PipelineError> {
        let i = self.index(stage)?;
        let slot = &mut self.slots[i];
        let err = |error| PipelineError::SetParam {
            stage: stage.to_owned(),
            param: param.to_owned(),
            error,
        };
        let spec = slot.spec.with_param(param, value).map_err(err)?;
        slot.op.set_param(param, value).map_err(err)?;
        slot.spec = spec;
        tracing::info!(stage, param, value, "stage parameter changed");
        Ok(())
    }

    fn index(&self, stage: &str) -> Result<usize, PipelineError> {
        self.slots
            .iter()
            .position(|s| s.name == stage)
            .ok_or_else(|| PipelineError::UnknownStage {
                stage: stage.to_owned(),
            })
    }

    pub fn stats(&self) -> PipelineStats {
        self.stats
    }

    pub fn reports(&self) -> Vec<StageReport> {
        self.slots
            .iter()
            .map(|s| {
                let mut stats = s.stats_before;
                add_stats(&mut stats, s.op.stats());
                StageReport {
                    name: s.name.clone(),
                    stats,
                    restarts: s.restarts,
                    last_failure: s.last_failure.clone(),
                }
            })
            .collect()
    }
}

/// Adds `from` into `into`, stage by stage by name, as one report of
/// several pipelines of the same stages (a cloud node's, one per partition).
pub fn merge_reports(into: &mut Vec<StageReport>, from: Vec<StageReport>) {
    for r in from {
        match into.iter_mut().find(|i| i.name == r.name) {
            Some(i) => {
                add_stats(&mut i.stats, r.stats);
                i.restarts += r.restarts;
                if r.last_failure.as_ref().map(|f| f.0) > i.last_failure.as_ref().map(|f| f.0) {
                    i.last_failure = r.last_failure;
                }
            }
            None => into.push(r),
        }
    }
}

impl PipelineStats {
    pub fn add(&mut self, other: PipelineStats) {
        self.received += other.received;
        self.emitted += other.emitted;
        self.outputs_cut += other.outputs_cut;
    }
}

fn add_stats(into: &mut StageStats, s: StageStats) {
    into.readings_in += s.readings_in;
    into.readings_out += s.readings_out;
    into.alerts_out += s.alerts_out;
    into.late += s.late;
    into.skipped += s.skipped;
    into.out_of_order += s.out_of_order;
    into.devices_evicted += s.devices_evicted;
    into.windows_sampled += s.windows_sampled;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::{Metric, Value};
    use crate::stages::{secs, Custom, CustomStage, Threshold, Window};
    use crate::topology::{Kafka, Simulated, Topology};
    use tributary_cluster::tls::Role;

    fn reading(device: &str, t_s: i64, temperature: f64) -> Reading {
        Reading {
            device_id: device.into(),
            device_ts_us: t_s * 1_000_000,
            edge_ts_us: 0,
            stream: Some("sim".into()),
            metrics: vec![Metric {
                name: "temperature".into(),
                value: Value::F64(temperature),
                unit: None,
            }],
        }
    }

    fn topology() -> Topology {
        Topology::builder("t")
            .edge("plant", |e| {
                e.source("sim", Simulated::devices(1)).stage(
                    "mean",
                    "sim",
                    Window::tumbling(secs(10)).mean("temperature"),
                )
            })
            .cloud(|c| {
                c.stage("hot", "mean", Threshold::above("temperature.mean", 50.0))
                    .sink("alerts", "hot", Kafka::topic("alerts"))
            })
            .build()
            .unwrap()
    }

    #[test]
    fn edge_and_cloud_parts_chain_through_the_streams_that_cross() {
        let t = topology();
        let edge = t.part_for("plant", &[], Role::Edge);
        let mut ep = Pipeline::new(
            edge.stages.iter().copied(),
            edge.uplink.iter().copied(),
            StageRestarts::default(),
        )
        .unwrap();
        assert!(ep.reads("sim") && !ep.exits("sim") && ep.exits("mean"));
        let mut out = Vec::new();
        for s in 0..25 {
            ep.handle(0, "sim", reading("d1", s, 60.0), &mut out)
                .unwrap();
        }
        // Two closed 10 s windows; the third is open.
        assert_eq!(out.len(), 2);
        let mean = out[0].output.as_reading().unwrap().clone();
        assert_eq!(mean.stream.as_deref(), Some("mean"));

        let cloud = t.part_for("cloud-1", &[], Role::Cloud);
        let sink_inputs: Vec<&str> = cloud
            .sinks
            .iter()
            .flat_map(|s| s.inputs.iter().map(String::as_str))
            .collect();
        let mut cp = Pipeline::new(
            cloud.stages.iter().copied(),
            sink_inputs,
            StageRestarts::default(),
        )
        .unwrap();
        let mut alerts = Vec::new();
        cp.handle(0, "mean", mean, &mut alerts).unwrap();
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].stream, "hot");
        assert!(alerts[0].output.as_alert().is_some());
    }

    struct Flaky {
        seen: u32,
    }

    impl CustomStage for Flaky {
        fn name(&self) -> &str {
            "flaky"
        }
        fn handle(&mut self, reading: Reading) -> Vec<Output> {
            self.seen += 1;
            if reading.device_ts_us == 3_000_000 {
                panic!("bad reading");
            }
            vec![Output::Reading(reading)]
        }
    }

    fn flaky_topology() -> Topology {
        Topology::builder("t")
            .edge("plant", |e| {
                e.source("sim", Simulated::devices(1)).stage(
                    "flaky",
                    "sim",
                    Custom::new(|| Flaky { seen: 0 }),
                )
            })
            .build()
            .unwrap()
    }

    #[test]
    fn a_panicking_stage_restarts_then_escalates_past_its_limit() {
        let t = flaky_topology();
        let part = t.part_for("plant", &[], Role::Edge);
        let policy = StageRestarts {
            restarts_max: 2,
            restart_period_ms: 60_000,
        };
        let mut p = Pipeline::new(
            part.stages.iter().copied(),
            part.uplink.iter().copied(),
            policy,
        )
        .unwrap();
        let mut out = Vec::new();
        for s in [1, 2, 3, 4] {
            p.handle(0, "sim", reading("d1", s, 1.0), &mut out).unwrap();
        }
        // The panicking reading produced nothing; the others passed.
        assert_eq!(out.len(), 3);
        let report = &p.reports()[0];
        assert_eq!(report.restarts, 1);
        assert!(report
            .last_failure
            .as_ref()
            .unwrap()
            .1
            .contains("bad reading"));
        p.handle(0, "sim", reading("d1", 3, 1.0), &mut out).unwrap();
        let err = p
            .handle(0, "sim", reading("d1", 3, 1.0), &mut out)
            .unwrap_err();
        assert!(
            matches!(err, PipelineError::StageFailed { ref stage, restarts: 2, .. } if stage == "flaky"),
            "{err}"
        );
    }

    #[test]
    fn set_param_changes_a_running_detector_and_names_bad_params() {
        let t = topology();
        let cloud = t.part_for("c", &[], Role::Cloud);
        let mut p = Pipeline::new(
            cloud.stages.iter().copied(),
            ["hot"],
            StageRestarts::default(),
        )
        .unwrap();
        let mut mean = reading("d1", 1, 40.0);
        mean.metrics[0].name = "temperature.mean".into();
        let mut out = Vec::new();
        p.handle(0, "mean", mean.clone(), &mut out).unwrap();
        assert!(out.is_empty());
        p.set_param("hot", "value", 30.0).unwrap();
        mean.device_ts_us += 1_000_000;
        p.handle(0, "mean", mean.clone(), &mut out).unwrap();
        assert_eq!(out.len(), 1);
        // A restart keeps the changed value.
        p.restart_stage(0, "hot").unwrap();
        mean.device_ts_us += 1_000_000;
        p.handle(0, "mean", mean, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert!(matches!(
            p.set_param("hot", "bogus", 1.0),
            Err(PipelineError::SetParam { .. })
        ));
        assert!(matches!(
            p.set_param("nope", "value", 1.0),
            Err(PipelineError::UnknownStage { .. })
        ));
        assert!(p.set_param("hot", "value", f64::NAN).is_err());
    }

    #[test]
    fn a_snapshot_brings_open_windows_back_and_a_changed_spec_starts_fresh() {
        let t = topology();
        let edge = t.part_for("plant", &[], Role::Edge);
        let new = || {
            Pipeline::new(
                edge.stages.iter().copied(),
                edge.uplink.iter().copied(),
                StageRestarts::default(),
            )
            .unwrap()
        };
        let mut before = new();
        let mut out = Vec::new();
        for s in 0..15 {
            before
                .handle(0, "sim", reading("d1", s, 60.0), &mut out)
                .unwrap();
        }
        assert_eq!(out.len(), 1, "one 10 s window closed, one open");
        let snapshot = before.snapshot();
        let mut after = new();
        let restored = after.restore(&snapshot).unwrap();
        assert_eq!(restored.stages, ["mean"]);
        assert!(restored.fresh.is_empty());
        // The open window holds 10..15 in both: closing it gives one mean.
        let (mut a, mut b) = (Vec::new(), Vec::new());
        before
            .handle(0, "sim", reading("d1", 20, 90.0), &mut a)
            .unwrap();
        after
            .handle(0, "sim", reading("d1", 20, 90.0), &mut b)
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 1);
        // A pipeline whose stage has another spec does not take it back.
        let other = Topology::builder("t")
            .edge("plant", |e| {
                e.source("sim", Simulated::devices(1)).stage(
                    "mean",
                    "sim",
                    Window::tumbling(secs(5)).mean("temperature"),
                )
            })
            .build()
            .unwrap();
        let part = other.part_for("plant", &[], Role::Edge);
        let mut changed = Pipeline::new(
            part.stages.iter().copied(),
            part.uplink.iter().copied(),
            StageRestarts::default(),
        )
        .unwrap();
        let restored = changed.restore(&snapshot).unwrap();
        assert!(restored.stages.is_empty());
        assert_eq!(restored.fresh[0].0, "mean");
        assert!(changed.restore(b"garbage").is_err());
    }
}

//! The cloud's stages: a thin actor around a [`Pipeline`] and a [`StageLog`].
//!
//! Each turn polls a batch of committed readings, feeds the ones whose stream
//! a cloud stage or sink reads, and commits what the stages emitted together
//! with the batch's offsets. When the log is quiet, the watermark follows the
//! wall clock (minus `watermark_lag_ms`) so that the last windows close.
//!
//! Per-device state is keyed by edge and device: a reading of `press-0`
//! through `edge-1` enters the stages as device `edge-1/press-0`, and so
//! leaves them in alerts and sink records.
//!
//! The state is kept per partition of the readings topic: one [`Pipeline`]
//! per partition this node's consumer holds. A device's readings all lie in
//! one partition (they are keyed by device), so its state is wholly in that
//! partition's pipeline, and moves with it: every commit carries a
//! checkpoint of each partition it moves the offsets of, and a node that is
//! given a partition (another node crashed, or the group rebalanced) starts
//! its pipeline from that checkpoint. A window or a held threshold that
//! spans the move therefore goes on where it was, and no alert is repeated.
//!
//! Any error of the log fails the actor: the stages' state has absorbed a
//! batch whose commit did not happen, so only a fresh start from the
//! committed offsets and checkpoints is consistent. Its supervisor restarts
//! it with backoff.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::pipeline::{
    merge_reports, Emitted, Pipeline, PipelineError, PipelineStats, StageReport, StageRestarts,
};
use crate::sink::{SinkError, SinkRecord, StageLog};
use crate::stages::Output;
use crate::topology::Component;

pub const CLOUD_STAGES_NAME: &str = "tributary.stages";

/// Opens the stages' log; called at every (re)start.
pub type StageLogFactory = Arc<dyn Fn() -> Result<Box<dyn StageLog>, SinkError> + Send + Sync>;

#[derive(Clone)]
pub struct CloudStagesArgs {
    pub open_log: StageLogFactory,
    /// In topological order.
    pub stages: Vec<Component>,
    /// (stream, topic): what each sink reads and where it writes.
    pub sinks: Vec<(String, String)>,
    pub restarts: StageRestarts,
    /// Readings per transaction at most.
    pub batch_readings_max: usize,
    /// How long one poll waits for the first reading.
    pub poll_ms: u64,
    pub watermark_lag_ms: u64,
    /// How often the actor logs what it did; 0 turns it off.
    pub report_interval_ms: u64,
    /// Where committed alerts are shown (the dashboard's feed); `None` for nowhere.
    pub alerts: Option<AlertFeed>,
}

/// The newest committed alerts, newest last, at most [`ALERTS_FED_MAX`].
#[derive(Debug, Clone, Default)]
pub struct AlertFeed(Arc<std::sync::Mutex<std::collections::VecDeque<crate::stages::Alert>>>);

/// Alerts an [`AlertFeed`] keeps; older ones leave it (they are in the log).
pub const ALERTS_FED_MAX: usize = 100;

impl AlertFeed {
    fn push(&self, alerts: impl IntoIterator<Item = crate::stages::Alert>) {
        let mut feed = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for a in alerts {
            if feed.len() == ALERTS_FED_MAX {
                feed.pop_front();
            }
            feed.push_back(a);
        }
    }

    /// The alerts kept, oldest first.
    pub fn recent(&self) -> Vec<crate::stages::Alert> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CloudStagesStatus {
    pub stages: Vec<StageReport>,
    pub pipeline: PipelineStats,
    pub readings_polled: u64,
    pub records_written: u64,
    pub transactions: u64,
    pub records_malformed: u64,
    /// Partitions of the readings topic this node's stages hold now.
    pub partitions_held: usize,
    /// Partitions taken with their committed state.
    pub partitions_restored: u64,
    /// Partitions taken without a checkpoint, or with one that does not decode.
    pub partitions_fresh: u64,
}

pub enum CloudStagesMsg {
    Poll,
    Status(RpcReplyPort<CloudStagesStatus>),
    SetStageParam {
        stage: String,
        param: String,
        value: f64,
        reply: RpcReplyPort<Result<(), String>>,
    },
}

impl ractor::Message for CloudStagesMsg {}

#[derive(Clone, Default)]
pub struct CloudStages;

pub struct CloudStagesState {
    args: CloudStagesArgs,
    log: Box<dyn StageLog>,
    /// One per partition held, by partition.
    pipelines: BTreeMap<i32, Pipeline>,
    /// What pipelines of partitions that left had counted, so counts only grow.
    retired_reports: Vec<StageReport>,
    retired_stats: PipelineStats,
    /// Parameters changed since the start, for pipelines made later.
    params: Vec<(String, String, f64)>,
    /// Stream to the topics its sinks write.
    routes: HashMap<String, Vec<String>>,
    out: Vec<Emitted>,
    records: Vec<SinkRecord>,
    readings_polled: u64,
    records_written: u64,
    transactions: u64,
    partitions_restored: u64,
    partitions_fresh: u64,
    last_report: std::time::Instant,
}

fn make_pipeline(
    args: &CloudStagesArgs,
    params: &[(String, String, f64)],
) -> Result<Pipeline, PipelineError> {
    let exits = args.sinks.iter().map(|(s, _)| s.as_str());
    let mut pipeline = Pipeline::new(&args.stages, exits, args.restarts)?;
    for (stage, param, value) in params {
        // Each was accepted by a pipeline of the same stages when it was set.
        pipeline.set_param(stage, param, *value)?;
    }
    Ok(pipeline)
}

/// Runs blocking broker work without stalling the runtime's other tasks.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

impl CloudStagesState {
    fn route(&mut self, e: Emitted) {
        let Some(topics) = self.routes.get(&e.stream) else {
            return;
        };
        let (key, value) = match &e.output {
            Output::Reading(r) => (r.device_id.clone(), r.to_json()),
            Output::Alert(a) => (a.device_id.clone(), a.to_json()),
        };
        for topic in topics {
            self.records.push(SinkRecord {
                topic: topic.clone(),
                key: key.clone(),
                value: value.clone(),
                stream: e.stream.clone(),
            });
        }
    }

    fn report(&mut self) {
        let every = self.args.report_interval_ms;
        if every == 0 || self.last_report.elapsed() < Duration::from_millis(every) {
            return;
        }
        self.last_report = std::time::Instant::now();
        tracing::info!(
            readings_polled = self.readings_polled,
            records_written = self.records_written,
            transactions = self.transactions,
            records_malformed = self.log.records_malformed(),
            outputs_cut = self.stats().outputs_cut,
            partitions_held = self.pipelines.len(),
            "cloud stages"
        );
        for st in self.reports() {
            tracing::info!(
                stage = %st.name,
                readings_in = st.stats.readings_in,
                readings_out = st.stats.readings_out,
                alerts_out = st.stats.alerts_out,
                late = st.stats.late,
                skipped = st.stats.skipped,
                restarts = st.restarts,
                "cloud stage"
            );
        }
    }

    fn stats(&self) -> PipelineStats {
        let mut stats = self.retired_stats;
        for p in self.pipelines.values() {
            stats.add(p.stats());
        }
        stats
    }

    fn reports(&self) -> Vec<StageReport> {
        let mut reports = self.retired_reports.clone();
        if reports.is_empty() {
            // Every stage is listed even before a partition came.
            if let Ok(p) = make_pipeline(&self.args, &self.params) {
                reports = p.reports();
            }
        }
        for p in self.pipelines.values() {
            merge_reports(&mut reports, p.reports());
        }
        reports
    }

    fn retire(&mut self, partition: i32) {
        if let Some(p) = self.pipelines.remove(&partition) {
            merge_reports(&mut self.retired_reports, p.reports());
            self.retired_stats.add(p.stats());
            tracing::info!(partition, "partition left this node's stages");
        }
    }

    fn take(&mut self, partition: i32, state: Option<Vec<u8>>) -> Result<(), PipelineError> {
        self.retire(partition);
        let mut pipeline = make_pipeline(&self.args, &self.params)?;
        let restored = match state {
            None => false,
            Some(bytes) => match pipeline.restore(&bytes) {
                Ok(r) => {
                    for (stage, why) in &r.fresh {
                        tracing::warn!(partition, stage = %stage, why = %why, "a stage starts fresh on a partition taken with state");
                    }
                    true
                }
                Err(error) => {
                    tracing::warn!(partition, %error, "the partition's checkpoint is unreadable; its stages start fresh");
                    false
                }
            },
        };
        if restored {
            self.partitions_restored += 1;
        } else {
            self.partitions_fresh += 1;
        }
        tracing::info!(partition, restored, "partition taken by this node's stages");
        self.pipelines.insert(partition, pipeline);
        Ok(())
    }

    fn turn(&mut self) -> Result<(), ActorProcessingErr> {
        let polled = blocking(|| {
            self.log.poll(
                self.args.batch_readings_max,
                Duration::from_millis(self.args.poll_ms),
            )
        })?;
        for partition in polled.revoked {
            self.retire(partition);
        }
        for (partition, state) in polled.assigned {
            self.take(partition, state)?;
        }
        let polled_any = !polled.readings.is_empty();
        let now_ms = now_us() / 1000;
        self.readings_polled += polled.readings.len() as u64;
        // Partitions whose state may have changed, or whose offsets move:
        // each gets its checkpoint in the commit.
        let mut touched = BTreeSet::new();
        for lr in polled.readings {
            touched.insert(lr.partition);
            let Some(stream) = lr.reading.stream.clone() else {
                continue;
            };
            let pipeline = match self.pipelines.entry(lr.partition) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                // A log that hands out readings of a partition it never
                // announced has no state for it to give.
                std::collections::btree_map::Entry::Vacant(e) => {
                    self.partitions_fresh += 1;
                    e.insert(make_pipeline(&self.args, &self.params)?)
                }
            };
            let mut reading = lr.reading;
            // Devices are named by their edges, which do not coordinate: two
            // edges may both have a `press-0`. On the cloud a device is
            // `<edge>/<device>` (an edge id holds no '/'), so their state
            // never mixes, and one edge cannot touch another's.
            reading.device_id = format!("{}/{}", lr.edge, reading.device_id);
            if pipeline.exits(&stream) {
                // A sink that reads an edge stream as it is.
                self.out.push(Emitted {
                    stream: stream.clone(),
                    output: Output::Reading(reading.clone()),
                });
            }
            if pipeline.reads(&stream) {
                pipeline.handle(now_ms, &stream, reading, &mut self.out)?;
            }
        }
        if !polled_any {
            let lag_us =
                i64::try_from(self.args.watermark_lag_ms.saturating_mul(1000)).unwrap_or(i64::MAX);
            let watermark_us = now_us().saturating_sub(lag_us);
            for (&partition, pipeline) in self.pipelines.iter_mut() {
                let before = self.out.len();
                pipeline.advance_watermark(now_ms, watermark_us, &mut self.out)?;
                if self.out.len() > before {
                    touched.insert(partition);
                }
            }
        }
        let out = std::mem::take(&mut self.out);
        let alerts: Vec<crate::stages::Alert> = match &self.args.alerts {
            Some(_) => out
                .iter()
                .filter_map(|e| match &e.output {
                    Output::Alert(a) => Some(a.clone()),
                    _ => None,
                })
                .collect(),
            None => Vec::new(),
        };
        for e in out {
            self.route(e);
        }
        if polled_any || !self.records.is_empty() || !touched.is_empty() {
            let checkpoints: Vec<(i32, Vec<u8>)> = touched
                .iter()
                .filter_map(|p| self.pipelines.get(p).map(|pl| (*p, pl.snapshot())))
                .collect();
            let records = std::mem::take(&mut self.records);
            blocking(|| self.log.commit(&records, &checkpoints))?;
            if let Some(feed) = &self.args.alerts {
                feed.push(alerts);
            }
            self.records_written += records.len() as u64;
            self.transactions += 1;
            self.records = records;
            self.records.clear();
        }
        Ok(())
    }
}

impl Actor for CloudStages {
    type Msg = CloudStagesMsg;
    type State = CloudStagesState;
    type Arguments = CloudStagesArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<CloudStagesMsg>,
        args: CloudStagesArgs,
    ) -> Result<CloudStagesState, ActorProcessingErr> {
        // Built once here so that a topology the stages cannot run fails
        // the start, not the first partition.
        make_pipeline(&args, &[])?;
        let mut routes: HashMap<String, Vec<String>> = HashMap::new();
        for (stream, topic) in &args.sinks {
            routes
                .entry(stream.clone())
                .or_default()
                .push(topic.clone());
        }
        let open = args.open_log.clone();
        let log = tokio::task::spawn_blocking(move || open()).await??;
        tracing::info!(
            stages = args.stages.len(),
            sinks = args.sinks.len(),
            "cloud stages consuming the log"
        );
        myself.send_message(CloudStagesMsg::Poll)?;
        Ok(CloudStagesState {
            args,
            log,
            pipelines: BTreeMap::new(),
            retired_reports: Vec::new(),
            retired_stats: PipelineStats::default(),
            params: Vec::new(),
            routes,
            out: Vec::new(),
            records: Vec::new(),
            readings_polled: 0,
            records_written: 0,
            transactions: 0,
            partitions_restored: 0,
            partitions_fresh: 0,
            last_report: std::time::Instant::now(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<CloudStagesMsg>,
        msg: CloudStagesMsg,
        state: &mut CloudStagesState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            CloudStagesMsg::Poll => {
                state.turn()?;
                state.report();
                // Through the mailbox, so that status and control calls get a turn.
                myself.send_message(CloudStagesMsg::Poll)?;
            }
            CloudStagesMsg::Status(reply) => {
                let _ = reply.send(CloudStagesStatus {
                    stages: state.reports(),
                    pipeline: state.stats(),
                    readings_polled: state.readings_polled,
                    records_written: state.records_written,
                    transactions: state.transactions,
                    records_malformed: state.log.records_malformed(),
                    partitions_held: state.pipelines.len(),
                    partitions_restored: state.partitions_restored,
                    partitions_fresh: state.partitions_fresh,
                });
            }
            CloudStagesMsg::SetStageParam {
                stage,
                param,
                value,
                reply,
            } => {
                // Tried on a pipeline of its own first, so that a refused
                // change touches no partition's state.
                let checked = make_pipeline(&state.args, &state.params)
                    .and_then(|mut p| p.set_param(&stage, &param, value));
                if checked.is_ok() {
                    for p in state.pipelines.values_mut() {
                        p.set_param(&stage, &param, value)?;
                    }
                    state.params.push((stage, param, value));
                }
                let _ = reply.send(checked.map_err(|e| e.to_string()));
            }
        }
        Ok(())
    }
}

//! The gateway actor: the one owner of the edge's outbox.
//!
//! It admits readings from device actors and the MQTT source, commits
//! segments on the outbox's schedule, answers each source only after its
//! segment is synced, serves the uplink's reads and deletes what the cloud
//! acknowledged. It is a thin driver around [`Outbox`].
//!
//! When the edge runs topology stages, the gateway drives them too (a
//! [`Pipeline`]), inside the same turn as the reading that feeds them: a
//! reading and what it caused enter the outbox in order, under one budget.
//! - A source reading whose stream leaves the edge is stored first; only once
//!   the outbox took it is it fed to the stages, so a refused reading (full)
//!   is not seen twice when its source retries.
//! - A source reading that only edge stages read is answered
//!   [`IngestReply::Consumed`] at once: it is not stored, and what the stages
//!   hold of it (an open window) is lost if the edge crashes.
//! - Stage outputs are stored without a source to answer. Under `block`, an
//!   output refused because the outbox is full is dropped and counted
//!   (`stage_outputs_dropped`); sources are held back before that happens
//!   while the outbox has less than one segment of room.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tributary_cluster::uplink::{ReadRequest, SegmentFrame};

use super::uplink::UplinkMsg;
use super::EdgeNames;
use crate::clock::SharedClock;
use crate::outbox::Outbox;
use crate::outbox::{Committed, OutboxConfig, OutboxStats, OutboxStore, Refusal, StoreError};
use crate::pipeline::{Emitted, Pipeline, PipelineError, StageReport, StageRestarts};
use crate::reading::Reading;
use crate::stages::Output;
use crate::topology::Component;

/// How many devices the gateway remembers the last accepted reading of, to
/// recognise a source's retry of a reading it already accepted.
const DEVICES_TRACKED_MAX: usize = 100_000;
/// Committed segments whose time and size the gateway remembers for the
/// backlog figures; past it the oldest are forgotten (the age then reads
/// younger than it is), not the segments.
const UNCONFIRMED_TRACKED_MAX: usize = 65_536;
/// How often the edge's stages are told that time moved on, so that a quiet
/// device's last window closes.
const STAGES_TICK_MS: u64 = 1_000;
/// How far behind the wall clock the stages' watermark trails when input is
/// quiet: readings up to this old still count as on time at the edge.
pub const STAGES_WATERMARK_LAG_MS: u64 = 5_000;

/// The answer to a source.
#[derive(Debug, Clone, PartialEq)]
pub enum IngestReply {
    /// The reading is durably in the outbox, in segment `seq`.
    Committed { seq: u64 },
    /// The same reading was accepted before (a retry); nothing was added.
    Duplicate,
    /// Taken by the edge's stages, which read its stream; the reading itself
    /// does not leave the edge, so it is not stored.
    Consumed,
    /// The outbox is full under `block`: retry later.
    Full,
    /// The reading is refused for good.
    Invalid(String),
}

pub type StoreFactory = Arc<dyn Fn() -> Result<Box<dyn OutboxStore>, StoreError> + Send + Sync>;

#[derive(Clone)]
pub struct GatewayArgs {
    pub store: StoreFactory,
    pub outbox: OutboxConfig,
    /// When set, each reading acknowledged to its source is appended as
    /// `A <device> <ts_us>` and each dropped one as `D <device> <ts_us>`:
    /// an audit trail that an exactly-once checker can compare with the log.
    pub ack_log: Option<PathBuf>,
    /// The stages this edge runs before the outbox; `None` stores every
    /// reading as it comes.
    pub stages: Option<EdgeStages>,
    /// Where the edge's uplink is registered.
    pub names: EdgeNames,
    /// Stamps readings on arrival, dates a new outbox's epoch, and moves the
    /// stages' watermark when input is quiet.
    pub clock: SharedClock,
}

/// The edge's part of a topology, as the gateway runs it.
#[derive(Debug, Clone)]
pub struct EdgeStages {
    /// In topological order.
    pub stages: Vec<Component>,
    /// The streams that leave the edge through the outbox.
    pub uplink: Vec<String>,
    pub restarts: StageRestarts,
}

/// The gateway's figures, for the uplink's start and for status reports.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayStatus {
    pub epoch: u64,
    pub sealed_through: u64,
    pub acked_through: u64,
    pub bytes_used: u64,
    pub segments_stored: usize,
    pub stats: OutboxStats,
    pub stages: Vec<StageReport>,
    /// Stage outputs refused by a full outbox.
    pub stage_outputs_dropped: u64,
    /// Readings in the outbox the cloud has not confirmed (open and sealed).
    /// Segments found on disk at start count as one reading each until
    /// confirmed: their count is not kept in memory.
    pub backlog_readings: u64,
    /// When the oldest reading the cloud has not confirmed was committed,
    /// by the edge's clock (µs since the epoch); at start, for segments
    /// found on disk, the start time.
    pub oldest_unconfirmed_us: Option<i64>,
}

pub enum GatewayMsg {
    Ingest(Reading, RpcReplyPort<IngestReply>),
    CommitDue {
        generation: u64,
    },
    StagesTick,
    Read(ReadRequest, RpcReplyPort<Result<Vec<SegmentFrame>, String>>),
    Acked(u64),
    Status(RpcReplyPort<GatewayStatus>),
    /// Changes a parameter of one of the edge's stages (a control call).
    SetStageParam {
        stage: String,
        param: String,
        value: f64,
        reply: RpcReplyPort<Result<(), String>>,
    },
}

impl ractor::Message for GatewayMsg {}

#[derive(Clone, Default)]
pub struct Gateway;

/// The runtime's notion of now: simulated under a simulation, so that the
/// outbox's commit timer follows simulated time.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

type Ticket = Option<RpcReplyPort<IngestReply>>;

fn answer(ticket: Ticket, reply: IngestReply) {
    if let Some(t) = ticket {
        let _ = t.send(reply);
    }
}

struct Stages {
    pipeline: Pipeline,
    uplink: std::collections::HashSet<String>,
    outputs_dropped: u64,
    /// Scratch space for one reading's outputs.
    out: Vec<Emitted>,
}

pub struct GatewayState {
    outbox: Outbox<Ticket>,
    stages: Option<Stages>,
    ack_log: Option<std::io::BufWriter<std::fs::File>>,
    /// The last reading admitted per device (in the open segment or later).
    admitted_ts: HashMap<String, i64>,
    /// The last reading made durable per device.
    committed_ts: HashMap<String, i64>,
    /// Retries of readings still in the open segment, answered at its commit;
    /// one per device at most.
    waiting: HashMap<String, (i64, RpcReplyPort<IngestReply>)>,
    timer_generation: u64,
    timer_armed: bool,
    /// Whether the last reading was refused as full, to log episodes, not readings.
    full: bool,
    names: EdgeNames,
    clock: SharedClock,
    /// Committed segments not yet confirmed: (seq, committed at µs,
    /// readings), oldest first, at most `UNCONFIRMED_TRACKED_MAX`.
    unconfirmed: std::collections::VecDeque<(u64, i64, u64)>,
}

impl GatewayState {
    fn status(&mut self) -> GatewayStatus {
        let confirmed = self.outbox.acked_through();
        while self
            .unconfirmed
            .front()
            .is_some_and(|(seq, ..)| *seq <= confirmed)
        {
            self.unconfirmed.pop_front();
        }
        let open = self.outbox.readings_open() as u64;
        let oldest = self.unconfirmed.front().map(|(_, at, _)| *at);
        GatewayStatus {
            backlog_readings: self.unconfirmed.iter().map(|(_, _, n)| n).sum::<u64>() + open,
            oldest_unconfirmed_us: oldest.or((open > 0).then(|| self.clock.now_us())),
            epoch: self.outbox.epoch(),
            sealed_through: self.outbox.sealed_through(),
            acked_through: self.outbox.acked_through(),
            bytes_used: self.outbox.bytes_used(),
            segments_stored: self.outbox.segments_stored(),
            stats: self.outbox.stats().clone(),
            stages: self
                .stages
                .as_ref()
                .map(|s| s.pipeline.reports())
                .unwrap_or_default(),
            stage_outputs_dropped: self.stages.as_ref().map_or(0, |s| s.outputs_dropped),
        }
    }

    fn audit(&mut self, tag: char, keys: &[(String, i64)]) {
        if let Some(log) = &mut self.ack_log {
            let mut ok = true;
            for (device, ts) in keys {
                ok &= writeln!(log, "{tag} {device} {ts}").is_ok();
            }
            ok &= log.flush().is_ok();
            if !ok {
                tracing::warn!("writing the ack log failed; the audit trail is incomplete");
            }
        }
    }

    /// Records what `drop-oldest` evicted, as soon as it happens.
    fn audit_dropped(&mut self) {
        for d in self.outbox.poll_dropped() {
            tracing::warn!(
                seq = d.seq,
                readings = d.readings,
                "outbox full: dropped the oldest segment"
            );
            self.audit('D', &d.keys);
        }
    }

    fn commit(&mut self, myself: &ActorRef<GatewayMsg>) {
        // The fsync blocks: tell tokio, so the runtime's other tasks (the
        // QUIC keep-alives among them) move to another worker meanwhile.
        let result = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
                tokio::task::block_in_place(|| self.outbox.commit())
            }
            _ => self.outbox.commit(),
        };
        match result {
            Ok(Some(Committed { seq, tickets, keys })) => {
                if self.unconfirmed.len() == UNCONFIRMED_TRACKED_MAX {
                    self.unconfirmed.pop_front();
                }
                self.unconfirmed
                    .push_back((seq, self.clock.now_us(), keys.len() as u64));
                // Only source readings carry a ticket; stage outputs are not
                // audited nor taken for a source's retry.
                let keys: Vec<(String, i64)> = keys
                    .into_iter()
                    .zip(&tickets)
                    .filter(|(_, t)| t.is_some())
                    .map(|(k, _)| k)
                    .collect();
                self.audit('A', &keys);
                for (device, ts) in &keys {
                    self.committed_ts.insert(device.clone(), *ts);
                    if self.waiting.get(device).is_some_and(|(t, _)| t == ts) {
                        if let Some((_, reply)) = self.waiting.remove(device) {
                            let _ = reply.send(IngestReply::Committed { seq });
                        }
                    }
                }
                for t in tickets {
                    answer(t, IngestReply::Committed { seq });
                }
                if let Some(uplink) = ractor::registry::where_is(self.names.uplink()) {
                    let _ = uplink.send_message(UplinkMsg::Sealed(seq));
                }
            }
            Ok(None) => {}
            Err(e) => {
                // The readings stay open and unacknowledged; retry on a timer.
                tracing::error!(error = %e, "outbox commit failed; will retry");
                self.arm_timer(
                    myself,
                    std::time::Duration::from_millis(self.outbox.config().commit_interval_ms),
                );
            }
        }
    }

    /// Whether the outbox has less than a segment of room: a reading that
    /// only feeds stages is then held back, before its outputs would be dropped.
    /// Feeds a reading to the stages and stores what leaves the edge. A
    /// stage failing past its restart limit fails the gateway, whose
    /// supervisor decides what follows.
    fn feed_stages(
        &mut self,
        stream: &str,
        reading: Reading,
        now: Instant,
    ) -> Result<(), PipelineError> {
        if let Some(st) = &mut self.stages {
            st.pipeline.handle(stream, reading, &mut st.out)?;
            self.store_outputs(now);
        }
        Ok(())
    }

    fn nearly_full(&self) -> bool {
        let cfg = self.outbox.config();
        self.outbox.bytes_used() + cfg.segment_bytes_max as u64 > cfg.outbox_bytes_max
    }

    /// Stores stage outputs (alerts cannot leave an edge; the topology
    /// refuses detectors there, so a custom stage's are counted and dropped).
    /// Every drop is counted; the 1st, 2nd, 4th, 8th... are logged, so that a
    /// long episode does not flood the log.
    fn store_outputs(&mut self, now: Instant) {
        let Some(stages) = &mut self.stages else {
            return;
        };
        for e in stages.out.drain(..) {
            let reading = match e.output {
                Output::Reading(r) => r,
                Output::Alert(a) => {
                    stages.outputs_dropped += 1;
                    if stages.outputs_dropped.is_power_of_two() {
                        tracing::warn!(dropped = stages.outputs_dropped, stage = %e.stream, device = %a.device_id, "an edge stage raised an alert; alerts are raised on the cloud, so it is dropped");
                    }
                    continue;
                }
            };
            match self.outbox.handle_reading(now, reading, None) {
                Ok(()) => {}
                Err(Refusal::Full(r, _) | Refusal::SegmentFull(r, _)) => {
                    stages.outputs_dropped += 1;
                    if stages.outputs_dropped.is_power_of_two() {
                        tracing::warn!(dropped = stages.outputs_dropped, stage = %e.stream, device = %r.device_id, "outbox full: a stage output was dropped");
                    }
                }
                Err(Refusal::Invalid(err, _)) => {
                    stages.outputs_dropped += 1;
                    if stages.outputs_dropped.is_power_of_two() {
                        tracing::warn!(dropped = stages.outputs_dropped, stage = %e.stream, error = %err, "a stage output was refused");
                    }
                }
                Err(Refusal::TooLarge(n, _)) => {
                    stages.outputs_dropped += 1;
                    if stages.outputs_dropped.is_power_of_two() {
                        tracing::warn!(dropped = stages.outputs_dropped, stage = %e.stream, bytes = n, "a stage output exceeds segment_bytes_max");
                    }
                }
            }
        }
    }

    fn after_append(&mut self, myself: &ActorRef<GatewayMsg>, now: Instant) {
        self.audit_dropped();
        if self.outbox.commit_due(now) {
            self.commit(myself);
        } else if !self.timer_armed {
            if let Some(deadline) = self.outbox.poll_timeout() {
                self.arm_timer(myself, deadline.saturating_duration_since(now));
            }
        }
    }

    fn arm_timer(&mut self, myself: &ActorRef<GatewayMsg>, after: std::time::Duration) {
        self.timer_generation += 1;
        self.timer_armed = true;
        let generation = self.timer_generation;
        myself.send_after(after, move || GatewayMsg::CommitDue { generation });
    }
}

/// Opens the audit trail for appending. A crash in the middle of a line
/// leaves a torn last line; its reading's answer was never sent (answers go
/// out after the trail is flushed), so the torn line is cut off rather than
/// glued to the next one.
fn open_ack_log(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::io::{Read, Seek, SeekFrom};
    /// Far longer than any line, so a torn line's start is always in it.
    const TAIL_BYTES_MAX: u64 = 64 * 1024;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)?;
    let len = file.metadata()?.len();
    if len > 0 {
        let tail_len = len.min(TAIL_BYTES_MAX);
        let mut tail = vec![0u8; tail_len as usize];
        file.seek(SeekFrom::Start(len - tail_len))?;
        file.read_exact(&mut tail)?;
        if tail.last() != Some(&b'\n') {
            let keep = match tail.iter().rposition(|b| *b == b'\n') {
                Some(i) => len - tail_len + i as u64 + 1,
                None if len <= TAIL_BYTES_MAX => 0,
                None => len,
            };
            tracing::warn!(path = %path.display(), bytes = len - keep, "the ack log ends in a torn line; cutting it off");
            file.set_len(keep)?;
        }
    }
    Ok(file)
}

impl Actor for Gateway {
    type Msg = GatewayMsg;
    type State = GatewayState;
    type Arguments = GatewayArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<GatewayMsg>,
        args: GatewayArgs,
    ) -> Result<GatewayState, ActorProcessingErr> {
        let store = (args.store)()?;
        // The epoch of a new outbox is its creation time, so that a newer
        // outbox always has a larger epoch than an older one.
        let (outbox, rec) = Outbox::open(store, args.outbox, args.clock.now_us().max(1) as u64)?;
        tracing::info!(
            epoch = rec.epoch,
            sealed_through = rec.sealed_through,
            segments = rec.segments,
            bytes = rec.bytes,
            quarantined = rec.quarantined,
            "outbox opened"
        );
        let ack_log = match &args.ack_log {
            Some(p) => {
                Some(std::io::BufWriter::new(open_ack_log(p).map_err(|e| {
                    format!("opening the ack log {}: {e}", p.display())
                })?))
            }
            None => None,
        };
        let stages = match args.stages {
            Some(plan) => {
                let pipeline = Pipeline::new(
                    &plan.stages,
                    plan.uplink.iter().map(String::as_str),
                    plan.restarts,
                )?;
                myself.send_interval(std::time::Duration::from_millis(STAGES_TICK_MS), || {
                    GatewayMsg::StagesTick
                });
                Some(Stages {
                    pipeline,
                    uplink: plan.uplink.into_iter().collect(),
                    outputs_dropped: 0,
                    out: Vec::new(),
                })
            }
            None => None,
        };
        Ok(GatewayState {
            outbox,
            stages,
            ack_log,
            admitted_ts: HashMap::new(),
            committed_ts: HashMap::new(),
            waiting: HashMap::new(),
            timer_generation: 0,
            timer_armed: false,
            full: false,
            unconfirmed: (rec.segments > 0)
                .then(|| (rec.sealed_through, args.clock.now_us(), rec.segments as u64))
                .into_iter()
                .collect(),
            names: args.names,
            clock: args.clock,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<GatewayMsg>,
        msg: GatewayMsg,
        state: &mut GatewayState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            GatewayMsg::Ingest(mut reading, reply) => {
                // A source's retry of a reading it already handed over: answer
                // only once that reading is durable, never before.
                let key = (reading.device_id.as_str(), reading.device_ts_us);
                if state.committed_ts.get(key.0) == Some(&key.1) {
                    let _ = reply.send(IngestReply::Duplicate);
                    return Ok(());
                }
                if state.admitted_ts.get(key.0) == Some(&key.1) {
                    // Replaces an older waiting retry of the same device, if any.
                    state.waiting.insert(key.0.to_string(), (key.1, reply));
                    return Ok(());
                }
                reading.edge_ts_us = state.clock.now_us();
                let now = now();
                let stream = reading.stream.clone().unwrap_or_default();
                let (feeds, stored) = match &state.stages {
                    Some(st) => (st.pipeline.reads(&stream), st.uplink.contains(&stream)),
                    None => (false, true),
                };
                if !stored {
                    if !feeds {
                        // A stream nothing reads: the topology's uplink list
                        // and this edge's sources disagree. Refuse loudly.
                        tracing::warn!(%stream, "a reading of a stream this edge neither stores nor processes");
                        let _ = reply.send(IngestReply::Invalid(format!(
                            "stream {stream:?} is not part of this edge's topology"
                        )));
                        return Ok(());
                    }
                    if state.nearly_full() {
                        let _ = reply.send(IngestReply::Full);
                        return Ok(());
                    }
                    state.feed_stages(&stream, reading, now)?;
                    let _ = reply.send(IngestReply::Consumed);
                    state.after_append(&myself, now);
                    return Ok(());
                }
                let copy = feeds.then(|| reading.clone());
                let (device, ts) = (reading.device_id.clone(), reading.device_ts_us);
                match state.outbox.handle_reading(now, reading, Some(reply)) {
                    Ok(()) => {
                        if state.full {
                            state.full = false;
                            tracing::info!("outbox has room again: sources resume");
                        }
                        if state.admitted_ts.len() >= DEVICES_TRACKED_MAX
                            && !state.admitted_ts.contains_key(&device)
                        {
                            // Forgetting only weakens retry detection; bounded memory wins.
                            state.admitted_ts.clear();
                            state.committed_ts.clear();
                        }
                        state.admitted_ts.insert(device, ts);
                        if let Some(copy) = copy {
                            state.feed_stages(&stream, copy, now)?;
                        }
                    }
                    Err(Refusal::Full(_, reply)) => {
                        if !state.full {
                            state.full = true;
                            tracing::warn!(
                                bytes_used = state.outbox.bytes_used(),
                                outbox_bytes_max = state.outbox.config().outbox_bytes_max,
                                "outbox full: sources wait (policy block)"
                            );
                        }
                        answer(reply, IngestReply::Full);
                    }
                    Err(Refusal::SegmentFull(_, reply)) => {
                        // The open segment waits for a commit that failed: the
                        // source retries after the next attempt.
                        answer(reply, IngestReply::Full);
                    }
                    Err(Refusal::Invalid(e, reply)) => {
                        tracing::warn!(%device, error = %e, "reading refused");
                        answer(reply, IngestReply::Invalid(e.to_string()));
                    }
                    Err(Refusal::TooLarge(n, reply)) => {
                        answer(
                            reply,
                            IngestReply::Invalid(format!(
                                "reading of {n} bytes exceeds segment_bytes_max"
                            )),
                        );
                    }
                }
                state.after_append(&myself, now);
            }
            GatewayMsg::StagesTick => {
                let now = now();
                if let Some(st) = &mut state.stages {
                    let watermark_us =
                        state.clock.now_us() - (STAGES_WATERMARK_LAG_MS * 1000) as i64;
                    st.pipeline.advance_watermark(watermark_us, &mut st.out)?;
                    if !st.out.is_empty() {
                        state.store_outputs(now);
                        state.after_append(&myself, now);
                    }
                }
            }
            GatewayMsg::CommitDue { generation } => {
                if generation == state.timer_generation {
                    state.timer_armed = false;
                    state.commit(&myself);
                    if !state.timer_armed {
                        if let Some(deadline) = state.outbox.poll_timeout() {
                            state.arm_timer(&myself, deadline.saturating_duration_since(now()));
                        }
                    }
                }
            }
            GatewayMsg::Read(req, reply) => {
                let result = state
                    .outbox
                    .read(req.from_seq, req.through_seq, req.segments_max)
                    .map_err(|e| e.to_string());
                let _ = reply.send(result);
            }
            GatewayMsg::Acked(seq) => {
                if let Err(e) = state.outbox.handle_acked(seq) {
                    tracing::error!(seq, error = %e, "deleting acknowledged segments failed; they will be resent and deduplicated");
                }
            }
            GatewayMsg::Status(reply) => {
                let _ = reply.send(state.status());
            }
            GatewayMsg::SetStageParam {
                stage,
                param,
                value,
                reply,
            } => {
                let result = match &mut state.stages {
                    Some(st) => st
                        .pipeline
                        .set_param(&stage, &param, value)
                        .map_err(|e| e.to_string()),
                    None => Err(format!("this edge runs no stage named {stage:?}")),
                };
                let _ = reply.send(result);
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<GatewayMsg>,
        state: &mut GatewayState,
    ) -> Result<(), ActorProcessingErr> {
        // Readings still open were never acknowledged; committing them now
        // (and answering their sources) spares the sources a retry.
        state.commit(&myself);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::open_ack_log;

    #[test]
    fn a_torn_last_line_of_the_ack_log_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acks");
        std::fs::write(&path, "A dev-0 100\nA dev-0 2").unwrap();
        let mut f = open_ack_log(&path).unwrap();
        writeln!(f, "A dev-1 300").unwrap();
        drop(f);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "A dev-0 100\nA dev-1 300\n");
        // A whole file is left as it is.
        let f = open_ack_log(&path).unwrap();
        drop(f);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        // A file that is one torn line is emptied.
        std::fs::write(&path, "A dev").unwrap();
        drop(open_ack_log(&path).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    }
}

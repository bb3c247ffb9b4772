//! The gateway actor: the one owner of the edge's outbox.
//!
//! It admits readings from device actors and the MQTT source, commits
//! batches, answers each source only after what it sent is synced, serves
//! the uplink's reads and deletes what the cloud acknowledged. It is a thin
//! driver around [`Outbox`].
//!
//! # Sources and their readings' identity
//! Every reading comes with an [`Origin`]: the source that sent it (a random
//! nonce per source incarnation) and its number within that source. The
//! number, not the reading's timestamp, is what identifies a source's retry:
//! two readings of one device may share a timestamp (a burst, a 1 kHz
//! sensor), and both are taken.
//! - A source that waits for each answer ([`GatewayMsg::Ingest`], the
//!   simulated devices) may resend a reading it got no answer for; a number
//!   the gateway already took is answered when durable, never stored twice.
//! - A source that streams ([`GatewayMsg::IngestBatch`], the MQTT source)
//!   sends its readings in order with consecutive numbers, many in flight.
//!   They are taken strictly in order: once one is refused (the outbox is
//!   full under `block`), every later one is refused too until the source
//!   resends from the refused one, so a source's readings enter the outbox
//!   in the order it sent them. Answers come through the source's
//!   [`AnswerSink`]: `Durable { through_n }` after each commit, `Retry`,
//!   `Invalid`.
//!
//! # Group commit
//! A batch is committed as soon as the previous fsync is done: after taking
//! a reading the gateway sends itself a `CommitNow`, which its mailbox
//! delivers after every message already queued, so one fsync covers all the
//! readings that arrived while the last one ran. A lone reading waits about
//! one fsync; under load, batches grow by themselves. A full segment is
//! committed at once, and `commit_interval_ms` stays the upper bound on the
//! wait.
//!
//! # Edge stages
//! When the edge runs topology stages, the gateway drives them too (a
//! [`Pipeline`]), inside the same turn as the reading that feeds them: a
//! reading and what it caused enter the outbox in order, under one budget.
//! - A source reading whose stream leaves the edge is stored first; only once
//!   the outbox took it is it fed to the stages, so a refused reading (full)
//!   is not seen twice when its source retries.
//! - **Durability before any ack.** Every reading the stages read is written
//!   to their *input log* (the outbox's state table, in the same batch as
//!   whatever the stages emitted because of it), and its source is answered
//!   (`Consumed` for a reading only the stages read) only once that batch is
//!   synced. So the MQTT source's PUBACK of a reading that only an edge
//!   window reads waits one fsync, not the window: a broker's in-flight
//!   window (20 messages by default in Mosquitto) could not hold a window's
//!   worth of readings. A watermark tick that closes windows is logged with
//!   what it closed.
//! - Every `stages_checkpoint_interval_ms` the stages' state is saved
//!   (`Pipeline::snapshot`, in chunks) and the input log before it removed,
//!   in one batch. After a crash the gateway restores the checkpoint and
//!   replays the log, throwing away what the replay emits: all of it was
//!   committed with the input that caused it. So an open window survives a
//!   crash of the edge, and a closed one is never emitted twice. (A custom
//!   stage that does not implement `CustomStage::snapshot` starts fresh and
//!   sees the log since the last checkpoint again.)
//! - Stage outputs are stored without a source to answer. Under `block`, an
//!   output refused because the outbox is full is dropped and counted
//!   (`stage_outputs_dropped`); sources are held back before that happens
//!   while the outbox has less than one segment of room.
//!
//! # Time
//! A reading stamped more than `device_clock_skew_max_ms` ahead of the
//! edge's clock is refused (`Invalid`) and counted (`readings_future`): one
//! reading from a device whose clock is years ahead would otherwise pin its
//! windows' watermark and close every later window as late.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bincode::{Decode, Encode};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tributary_cluster::uplink::{ReadRequest, SegmentFrame};

use super::uplink::UplinkMsg;
use super::EdgeNames;
use crate::clock::SharedClock;
use crate::outbox::{
    Committed, Outbox, OutboxConfig, OutboxStats, OutboxStore, Refusal, StateChange, StateRefusal,
    StoreError,
};
use crate::pipeline::{Emitted, Pipeline, PipelineError, StageReport, StageRestarts};
use crate::reading::{bincode_config, Reading};
use crate::stages::Output;
use crate::topology::Component;

/// Sources whose progress the gateway keeps (one per device actor
/// incarnation, one per MQTT source incarnation); past it the least recently
/// active one is forgotten, which only weakens the recognition of its retries.
const SOURCES_TRACKED_MAX: usize = 100_000;
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
/// How often the edge's stages save their state unless told otherwise.
pub const STAGES_CHECKPOINT_INTERVAL_MS_DEFAULT: u64 = 5_000;
/// Entries of the stages' input log past which a checkpoint is taken early.
pub const STAGES_INPUT_LOG_ENTRIES_MAX: u64 = 200_000;
/// The share of `outbox_bytes_max` (one part in this many) that the stages'
/// input log may take before a checkpoint is taken early: the log shares the
/// outbox's budget with the readings, and without this a small budget fills
/// with it between two timed checkpoints and refuses readings meanwhile.
pub const STAGES_INPUT_LOG_BUDGET_SHARE: u64 = 4;
/// A checkpoint is stored in values of at most this size (sled keeps values
/// inline, and synced, only below its blob threshold).
const CHECKPOINT_CHUNK_BYTES_MAX: usize = 256 * 1024;
/// How far ahead of the edge's clock a device's timestamp may be unless
/// told otherwise.
pub const DEVICE_CLOCK_SKEW_MAX_MS_DEFAULT: u64 = 300_000;

/// State table keys of the stages' input log: `stg/in/<seq u64 BE>`.
const INPUT_LOG_PREFIX: &[u8] = b"stg/in/";
/// State table keys of the stages' checkpoint: `stg/ckpt/<chunk u32 BE>`.
const CHECKPOINT_PREFIX: &[u8] = b"stg/ckpt/";
/// The highest input log seq taken as real; above it, a seq read back is
/// damage (2^63 inputs at ten million a second take 29,000 years).
const INPUT_SEQ_MAX: u64 = u64::MAX / 2;
/// The checkpoint's header (see [`CheckpointMeta`]).
const CHECKPOINT_META: &[u8] = b"stg/ckpt-meta";

/// The answer to a source that waits for it.
#[derive(Debug, Clone, PartialEq)]
pub enum IngestReply {
    /// The reading is durably in the outbox, in segment `seq`.
    Committed { seq: u64 },
    /// The same reading was taken before (a retry); nothing was added.
    Duplicate,
    /// Taken by the edge's stages, which read its stream: durably in their
    /// input log; the reading itself does not leave the edge.
    Consumed,
    /// The outbox is full under `block`: retry later.
    Full,
    /// The reading is refused for good.
    Invalid(String),
}

/// Which source sent a reading, and its number there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Origin {
    /// A random nonce per source incarnation.
    pub source: u64,
    /// Numbers a source's readings; a retry keeps its number.
    pub n: u64,
}

/// One reading of a source that waits for its answer.
#[derive(Debug, Clone)]
pub struct Ingest {
    pub reading: Reading,
    pub origin: Origin,
}

/// One reading of a streaming source, with the state changes (the source's
/// own bookkeeping) to make durable in the same batch.
#[derive(Debug, Clone)]
pub struct BatchItem {
    pub reading: Reading,
    pub state: Vec<StateChange>,
}

/// Readings `first_n, first_n + 1, ...` of a streaming source.
pub struct IngestBatch {
    pub source: u64,
    pub first_n: u64,
    pub items: Vec<BatchItem>,
    pub answers: Arc<dyn AnswerSink>,
}

/// What a streaming source hears back.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceAnswer {
    /// Every reading the gateway took from the source, through `through_n`,
    /// is durable (in a segment, or in the stages' input log).
    Durable { through_n: u64 },
    /// Reading `n` is refused for good (the source acks it: it will never
    /// be taken).
    Invalid { n: u64, reason: String },
    /// Readings from `from_n` on were not taken: resend them. `full` when
    /// the outbox is full (retry after a while), otherwise they came after
    /// a gap (an earlier one was refused).
    Retry { from_n: u64, full: bool },
}

/// Where a streaming source hears its answers.
pub trait AnswerSink: Send + Sync + 'static {
    fn answer(&self, answer: SourceAnswer);
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
    /// Readings stamped further ahead of the clock than this are refused.
    pub device_clock_skew_max_ms: u64,
}

/// The edge's part of a topology, as the gateway runs it.
#[derive(Debug, Clone)]
pub struct EdgeStages {
    /// In topological order.
    pub stages: Vec<Component>,
    /// The streams that leave the edge through the outbox.
    pub uplink: Vec<String>,
    pub restarts: StageRestarts,
    /// How often the stages' state is saved, and their input log cut.
    pub checkpoint_interval_ms: u64,
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
    /// Readings refused because their timestamp is too far ahead.
    pub readings_future: u64,
    /// Retries of readings already taken, recognised by their origin.
    pub retries_recognised: u64,
    /// The stages' checkpoints written, and the input log's entries since
    /// the last one.
    pub stage_checkpoints: u64,
    pub stage_input_log_entries: u64,
    /// Commits (fsyncs) done.
    pub commits: u64,
}

pub enum GatewayMsg {
    Ingest(Ingest, RpcReplyPort<IngestReply>),
    IngestBatch(IngestBatch),
    /// The commit of everything taken before it (see the module doc).
    CommitNow,
    /// The retry of a commit that failed.
    CommitDue {
        generation: u64,
    },
    StagesTick,
    Read(ReadRequest, RpcReplyPort<Result<Vec<SegmentFrame>, String>>),
    Acked(u64),
    /// The cloud refused the outbox's epoch, the log holding the one given:
    /// answers the outbox's new epoch, or why it cannot move.
    StaleEpoch(u64, RpcReplyPort<Result<u64, String>>),
    Status(RpcReplyPort<GatewayStatus>),
    /// The durable state entries whose keys start with the prefix (a source
    /// reading back its bookkeeping at start).
    ReadState(Vec<u8>, RpcReplyPort<Vec<(Vec<u8>, Vec<u8>)>>),
    /// State changes alone, answered once durable.
    WriteState(Vec<StateChange>, RpcReplyPort<Result<(), String>>),
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

/// Who waits for a reading or a state change.
enum Ticket {
    /// A stage output or the stages' own bookkeeping: nobody.
    None,
    /// A source waiting for its answer.
    Port(RpcReplyPort<IngestReply>, Origin),
    /// A streaming source's reading `n`.
    Stream { source: u64, n: u64 },
    /// A `WriteState` caller.
    State(RpcReplyPort<Result<(), String>>),
}

impl Ticket {
    /// Answers a waiting source at once (a refusal).
    fn answer(self, reply: IngestReply) {
        if let Ticket::Port(port, _) = self {
            let _ = port.send(reply);
        }
    }
}

/// What became of a reading offered to the outbox; a refused one gives its
/// ticket back.
enum Admission {
    Stored,
    Consumed,
    Full(Ticket),
    Invalid(String, Ticket),
}

/// A record of the stages' input log.
#[derive(Encode, Decode)]
enum InputRecord {
    Reading(Reading),
    Tick { watermark_us: i64 },
}

/// The header of a checkpoint.
#[derive(Encode, Decode)]
struct CheckpointMeta {
    /// The input log's last seq the checkpoint includes.
    input_through: u64,
    chunks: u32,
    bytes: u64,
    crc32: u32,
}

fn input_key(seq: u64) -> Vec<u8> {
    let mut k = INPUT_LOG_PREFIX.to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn chunk_key(i: u32) -> Vec<u8> {
    let mut k = CHECKPOINT_PREFIX.to_vec();
    k.extend_from_slice(&i.to_be_bytes());
    k
}

fn encode<T: Encode>(v: &T) -> Vec<u8> {
    // Plain owned data always encodes.
    bincode::encode_to_vec(v, bincode_config()).expect("plain data encodes")
}

struct Stages {
    pipeline: Pipeline,
    uplink: std::collections::HashSet<String>,
    outputs_dropped: u64,
    /// Scratch space for one reading's outputs.
    out: Vec<Emitted>,
    /// The input log's last seq written, and the first one after the last
    /// checkpoint.
    input_seq: u64,
    input_first: u64,
    /// Bytes of the input log since the last checkpoint.
    input_bytes: u64,
    checkpoint_interval: Duration,
    last_checkpoint: Instant,
    checkpoints: u64,
    /// Chunks of the last checkpoint written, to remove the extra ones.
    checkpoint_chunks: u32,
}

impl Stages {
    fn input_entries(&self) -> u64 {
        (self.input_seq + 1).saturating_sub(self.input_first)
    }
}

/// What the gateway knows of one source.
struct SourceProgress {
    /// The next number it takes; lower ones were taken.
    next_n: u64,
    /// The highest number known durable.
    committed_n: Option<u64>,
    /// A retry of a reading taken but not yet durable, answered at its commit.
    waiting: Option<(u64, RpcReplyPort<IngestReply>)>,
    answers: Option<Arc<dyn AnswerSink>>,
    /// For eviction: the gateway's activity counter when last seen.
    seen: u64,
}

pub struct GatewayState {
    outbox: Outbox<Ticket>,
    stages: Option<Stages>,
    ack_log: Option<std::io::BufWriter<std::fs::File>>,
    sources: HashMap<u64, SourceProgress>,
    activity: u64,
    commit_scheduled: bool,
    timer_generation: u64,
    /// Whether the last reading was refused as full, to log episodes, not readings.
    full: bool,
    names: EdgeNames,
    clock: SharedClock,
    device_clock_skew_max_us: i64,
    /// Committed segments not yet confirmed: (seq, committed at µs,
    /// readings), oldest first, at most `UNCONFIRMED_TRACKED_MAX`.
    unconfirmed: std::collections::VecDeque<(u64, i64, u64)>,
    readings_future: u64,
    retries_recognised: u64,
    commits: u64,
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
            readings_future: self.readings_future,
            retries_recognised: self.retries_recognised,
            stage_checkpoints: self.stages.as_ref().map_or(0, |s| s.checkpoints),
            stage_input_log_entries: self.stages.as_ref().map_or(0, Stages::input_entries),
            commits: self.commits,
        }
    }

    fn audit(&mut self, tag: char, keys: &[(String, i64)]) {
        if let Some(log) = &mut self.ack_log {
            let mut ok = true;
            for (device, ts) in keys {
                ok &= writeln!(log, "{tag} {} {ts}", audit_escape(device)).is_ok();
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

    fn progress(&mut self, source: u64, first_n: u64) -> &mut SourceProgress {
        self.activity += 1;
        let seen = self.activity;
        if !self.sources.contains_key(&source) && self.sources.len() >= SOURCES_TRACKED_MAX {
            let oldest = self
                .sources
                .iter()
                .min_by_key(|(_, p)| p.seen)
                .map(|(s, _)| *s);
            if let Some(s) = oldest {
                self.sources.remove(&s);
            }
        }
        let p = self.sources.entry(source).or_insert(SourceProgress {
            next_n: first_n,
            committed_n: None,
            waiting: None,
            answers: None,
            seen,
        });
        p.seen = seen;
        p
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
            Ok(Some(c)) => self.committed(c),
            Ok(None) => {}
            Err(e) => {
                // Everything stays open and unacknowledged; retry on a timer.
                tracing::error!(error = %e, "outbox commit failed; will retry");
                self.timer_generation += 1;
                let generation = self.timer_generation;
                let after = Duration::from_millis(self.outbox.config().commit_interval_ms);
                myself.send_after(after, move || GatewayMsg::CommitDue { generation });
            }
        }
    }

    /// Answers everyone a durable batch concerns.
    fn committed(&mut self, c: Committed<Ticket>) {
        let Committed {
            seq,
            tickets,
            keys,
            state_tickets,
        } = c;
        self.commits += 1;
        if let Some(seq) = seq {
            if self.unconfirmed.len() == UNCONFIRMED_TRACKED_MAX {
                self.unconfirmed.pop_front();
            }
            self.unconfirmed
                .push_back((seq, self.clock.now_us(), keys.len() as u64));
            // Only source readings are audited; stage outputs are not.
            let audited: Vec<(String, i64)> = keys
                .into_iter()
                .zip(&tickets)
                .filter(|(_, t)| !matches!(t, Ticket::None))
                .map(|(k, _)| k)
                .collect();
            self.audit('A', &audited);
            if let Some(uplink) = ractor::registry::where_is(self.names.uplink()) {
                let _ = uplink.send_message(UplinkMsg::Sealed(seq));
            }
        }
        // Ordered, so that the answers go out in the same order in a replay.
        let mut durable: BTreeMap<u64, u64> = BTreeMap::new();
        let answered = tickets
            .into_iter()
            .map(|t| {
                let reply = seq.map_or(IngestReply::Consumed, |seq| IngestReply::Committed { seq });
                (t, reply)
            })
            .chain(
                state_tickets
                    .into_iter()
                    .map(|t| (t, IngestReply::Consumed)),
            );
        for (ticket, reply) in answered {
            match ticket {
                Ticket::None => {}
                Ticket::Port(port, origin) => {
                    let _ = port.send(reply.clone());
                    if let Some(p) = self.sources.get_mut(&origin.source) {
                        p.committed_n = p.committed_n.max(Some(origin.n));
                        if p.waiting.as_ref().is_some_and(|(n, _)| *n <= origin.n) {
                            if let Some((_, w)) = p.waiting.take() {
                                let _ = w.send(reply);
                            }
                        }
                    }
                }
                Ticket::Stream { source, n } => {
                    let through = durable.entry(source).or_insert(n);
                    *through = (*through).max(n);
                }
                Ticket::State(port) => {
                    let _ = port.send(Ok(()));
                }
            }
        }
        for (source, through_n) in durable {
            if let Some(p) = self.sources.get_mut(&source) {
                p.committed_n = p.committed_n.max(Some(through_n));
                if let Some(a) = &p.answers {
                    a.answer(SourceAnswer::Durable { through_n });
                }
            }
        }
    }

    /// Offers a source's reading to the outbox (and the stages).
    fn admit(
        &mut self,
        now: Instant,
        mut reading: Reading,
        ticket: Ticket,
        mut state: Vec<StateChange>,
    ) -> Result<Admission, PipelineError> {
        let edge_now_us = self.clock.now_us();
        if reading.device_ts_us > edge_now_us.saturating_add(self.device_clock_skew_max_us) {
            self.readings_future += 1;
            if self.readings_future.is_power_of_two() {
                tracing::warn!(device = %reading.device_id, device_ts_us = reading.device_ts_us, edge_now_us, refused = self.readings_future, "a reading is stamped too far ahead of the edge's clock; refused (logged at powers of two)");
            }
            return Ok(Admission::Invalid(
                format!(
                    "its timestamp {} µs is more than {} ms ahead of the edge's clock ({edge_now_us} µs)",
                    reading.device_ts_us,
                    self.device_clock_skew_max_us / 1000
                ),
                ticket,
            ));
        }
        reading.edge_ts_us = edge_now_us;
        let stream = reading.stream.clone().unwrap_or_default();
        let (feeds, stored) = match &self.stages {
            Some(st) => (st.pipeline.reads(&stream), st.uplink.contains(&stream)),
            None => (false, true),
        };
        if !stored && !feeds {
            // A stream nothing reads: the topology's uplink list and this
            // edge's sources disagree. Refuse loudly.
            tracing::warn!(%stream, "a reading of a stream this edge neither stores nor processes");
            return Ok(Admission::Invalid(
                format!("stream {stream:?} is not part of this edge's topology"),
                ticket,
            ));
        }
        let logged = match (&self.stages, feeds) {
            (Some(st), true) => {
                let seq = st.input_seq + 1;
                let record = encode(&InputRecord::Reading(reading.clone()));
                let bytes = record.len() as u64;
                state.push((input_key(seq), Some(record)));
                Some((seq, bytes, reading.clone()))
            }
            _ => None,
        };
        if !stored {
            if self.nearly_full() {
                return Ok(Admission::Full(ticket));
            }
            return Ok(match self.outbox.handle_state(now, state, ticket) {
                Ok(()) => {
                    if let Some((seq, bytes, reading)) = logged {
                        self.feed_stages(&stream, seq, bytes, reading, now)?;
                    }
                    Admission::Consumed
                }
                Err(StateRefusal::Full(t)) => Admission::Full(t),
                Err(StateRefusal::TooLarge(n, t)) => {
                    Admission::Invalid(format!("a reading of {n} bytes is too large to log"), t)
                }
            });
        }
        let device = reading.device_id.clone();
        Ok(
            match self.outbox.handle_reading_with(now, reading, ticket, state) {
                Ok(()) => {
                    if self.full {
                        self.full = false;
                        tracing::info!("outbox has room again: sources resume");
                    }
                    if let Some((seq, bytes, reading)) = logged {
                        self.feed_stages(&stream, seq, bytes, reading, now)?;
                    }
                    Admission::Stored
                }
                Err(Refusal::Full(_, t)) => {
                    if !self.full {
                        self.full = true;
                        tracing::warn!(
                            bytes_used = self.outbox.bytes_used(),
                            outbox_bytes_max = self.outbox.config().outbox_bytes_max,
                            "outbox full: sources wait (policy block)"
                        );
                    }
                    Admission::Full(t)
                }
                // The open segment waits for a commit that failed: the
                // source retries after the next attempt.
                Err(Refusal::SegmentFull(_, t)) => Admission::Full(t),
                Err(Refusal::Invalid(e, t)) => {
                    tracing::warn!(%device, error = %e, "reading refused");
                    Admission::Invalid(e.to_string(), t)
                }
                Err(Refusal::TooLarge(n, t)) => {
                    Admission::Invalid(format!("reading of {n} bytes exceeds segment_bytes_max"), t)
                }
            },
        )
    }

    /// Feeds a reading the input log took (under `seq`) to the stages, and
    /// stores what leaves the edge. A stage failing past its restart limit
    /// fails the gateway, whose supervisor decides what follows.
    fn feed_stages(
        &mut self,
        stream: &str,
        seq: u64,
        bytes: u64,
        reading: Reading,
        now: Instant,
    ) -> Result<(), PipelineError> {
        let now_ms = self.clock.now_us() / 1000;
        if let Some(st) = &mut self.stages {
            debug_assert_eq!(
                seq,
                st.input_seq + 1,
                "the input log's seqs are consecutive"
            );
            st.input_seq = seq;
            st.input_bytes += bytes;
            st.pipeline.handle(now_ms, stream, reading, &mut st.out)?;
            self.store_outputs(now);
        }
        Ok(())
    }

    /// Whether the outbox has less than a segment of room: a reading that
    /// only feeds stages is then held back, before its outputs would be dropped.
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
            let problem = match self.outbox.handle_reading(now, reading, Ticket::None) {
                Ok(()) => continue,
                Err(Refusal::Full(r, _) | Refusal::SegmentFull(r, _)) => {
                    format!("outbox full: a stage output of {} was dropped", r.device_id)
                }
                Err(Refusal::Invalid(err, _)) => format!("a stage output was refused: {err}"),
                Err(Refusal::TooLarge(n, _)) => {
                    format!("a stage output of {n} bytes exceeds segment_bytes_max")
                }
            };
            stages.outputs_dropped += 1;
            if stages.outputs_dropped.is_power_of_two() {
                tracing::warn!(dropped = stages.outputs_dropped, stage = %e.stream, "{problem}");
            }
        }
    }

    /// Moves the stages' watermark on and stores what closes. A tick that
    /// closed something is logged with its outputs, in their batch, so that
    /// a replay closes the same windows at the same point and none is
    /// emitted twice. A tick that closed nothing is not logged: after a
    /// crash, a reading it would have made late may then count in its
    /// window, which changes a window's figures but never emits it twice.
    fn tick_stages(&mut self, now: Instant) -> Result<(), PipelineError> {
        let lag_us = i64::try_from(STAGES_WATERMARK_LAG_MS * 1000).unwrap_or(i64::MAX);
        let edge_now_us = self.clock.now_us();
        let watermark_us = edge_now_us.saturating_sub(lag_us);
        let Some(st) = &mut self.stages else {
            return Ok(());
        };
        st.pipeline
            .advance_watermark(edge_now_us / 1000, watermark_us, &mut st.out)?;
        if st.out.is_empty() {
            return Ok(());
        }
        let seq = st.input_seq + 1;
        let record = encode(&InputRecord::Tick { watermark_us });
        let bytes = record.len() as u64;
        match self
            .outbox
            .handle_state(now, vec![(input_key(seq), Some(record))], Ticket::None)
        {
            Ok(()) => {
                if let Some(st) = &mut self.stages {
                    st.input_seq = seq;
                    st.input_bytes += bytes;
                }
                self.store_outputs(now);
            }
            Err(_) => {
                // No room to log it: what it closed is dropped and counted;
                // since the tick is not logged either, a replay after a
                // crash closes those windows again, never twice.
                if let Some(st) = &mut self.stages {
                    let n = st.out.len() as u64;
                    st.out.clear();
                    st.outputs_dropped += n;
                    tracing::warn!(
                        dropped = st.outputs_dropped,
                        "outbox full: the stages' closed windows were dropped"
                    );
                }
            }
        }
        Ok(())
    }

    /// Saves the stages' state and cuts their input log, in one batch, when
    /// it is time.
    fn checkpoint_stages(&mut self, now: Instant) {
        let Some(st) = &self.stages else {
            return;
        };
        let due = st.last_checkpoint.elapsed() >= st.checkpoint_interval
            || st.input_entries() >= STAGES_INPUT_LOG_ENTRIES_MAX
            || st.input_bytes * STAGES_INPUT_LOG_BUDGET_SHARE
                >= self.outbox.config().outbox_bytes_max;
        if !due || st.input_entries() == 0 {
            return;
        }
        let snapshot = st.pipeline.snapshot();
        let chunks: Vec<&[u8]> = snapshot.chunks(CHECKPOINT_CHUNK_BYTES_MAX).collect();
        let meta = CheckpointMeta {
            input_through: st.input_seq,
            chunks: chunks.len() as u32,
            bytes: snapshot.len() as u64,
            crc32: crc32fast::hash(&snapshot),
        };
        let mut changes: Vec<StateChange> = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| (chunk_key(i as u32), Some(c.to_vec())))
            .collect();
        changes.extend((meta.chunks..st.checkpoint_chunks).map(|i| (chunk_key(i), None)));
        changes.push((CHECKPOINT_META.to_vec(), Some(encode(&meta))));
        changes.extend((st.input_first..=st.input_seq).map(|s| (input_key(s), None)));
        let (input_seq, chunk_count) = (st.input_seq, meta.chunks);
        match self.outbox.handle_state(now, changes, Ticket::None) {
            Ok(()) => {
                if let Some(st) = &mut self.stages {
                    st.input_first = input_seq + 1;
                    st.input_bytes = 0;
                    st.last_checkpoint = Instant::now();
                    st.checkpoints += 1;
                    st.checkpoint_chunks = chunk_count;
                }
            }
            Err(_) => {
                tracing::warn!(
                    bytes = snapshot.len(),
                    "no room for the stages' checkpoint; their input log keeps growing until there is"
                );
                if let Some(st) = &mut self.stages {
                    st.last_checkpoint = Instant::now();
                }
            }
        }
    }

    /// Commits what was just taken: at once if the segment is full or the
    /// wait is over, else after the mailbox drains (see the module doc).
    fn after_append(&mut self, myself: &ActorRef<GatewayMsg>, now: Instant) {
        self.audit_dropped();
        if self.outbox.commit_due(now) {
            self.commit(myself);
        } else if self.outbox.has_open() && !self.commit_scheduled {
            self.commit_scheduled = true;
            let _ = myself.send_message(GatewayMsg::CommitNow);
        }
    }
}

/// Escapes a device id for the ack log, whose lines are space-separated:
/// whitespace, `%` and control characters become `%XX`.
pub fn audit_escape(device: &str) -> std::borrow::Cow<'_, str> {
    if !device
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '%')
    {
        return device.into();
    }
    let mut out = String::with_capacity(device.len() + 8);
    for c in device.chars() {
        if c.is_whitespace() || c.is_control() || c == '%' {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out.into()
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

/// Rebuilds the stages from their checkpoint and input log (see the module
/// doc); returns the input log's last seq and the first after the checkpoint.
fn recover_stages(
    outbox: &Outbox<Ticket>,
    pipeline: &mut Pipeline,
    now_ms: i64,
) -> (u64, u64, u32, u64) {
    let meta = outbox
        .state_get(CHECKPOINT_META)
        .and_then(|b| bincode::decode_from_slice::<CheckpointMeta, _>(b, bincode_config()).ok())
        .map(|(m, _)| m);
    let mut input_through = 0;
    let mut chunks = 0;
    // Seqs come from the disk; one past `INPUT_SEQ_MAX` is damage (no edge
    // lives to take 2^63 inputs), and would overflow the next seq.
    let meta = meta.filter(|m| {
        let sane = m.input_through <= INPUT_SEQ_MAX;
        if !sane {
            tracing::error!(
                input_through = m.input_through,
                "the edge stages' checkpoint meta is damaged; they start fresh from the input log"
            );
        }
        sane
    });
    if let Some(meta) = meta {
        input_through = meta.input_through;
        // The meta comes from the disk unchecked: what it claims (2^32
        // chunks, a gigabyte) is bounded here by the chunk entries that are
        // really there, so a damaged meta costs no more than the checkpoint.
        let present = outbox.durable_state(CHECKPOINT_PREFIX);
        chunks = present
            .iter()
            .filter_map(|(k, _)| k.get(CHECKPOINT_PREFIX.len()..))
            .filter_map(|i| <[u8; 4]>::try_from(i).ok())
            .map(|i| u32::from_be_bytes(i).saturating_add(1))
            .max()
            .unwrap_or(0);
        let mut bytes = Vec::new();
        for (i, (key, c)) in present.iter().enumerate() {
            if i as u64 >= u64::from(meta.chunks) || *key != chunk_key(i as u32) {
                break;
            }
            bytes.extend_from_slice(c);
        }
        if bytes.len() as u64 != meta.bytes || crc32fast::hash(&bytes) != meta.crc32 {
            tracing::error!(
                "the edge stages' checkpoint is damaged; they start fresh from the input log"
            );
        } else {
            match pipeline.restore(&bytes) {
                Ok(r) => {
                    for (stage, why) in &r.fresh {
                        tracing::warn!(%stage, %why, "edge stage starts fresh");
                    }
                    tracing::info!(restored = ?r.stages, "edge stages restored from their checkpoint");
                }
                Err(e) => {
                    tracing::error!(error = %e, "the edge stages' checkpoint does not decode; they start fresh")
                }
            }
        }
    }
    let log = outbox.durable_state(INPUT_LOG_PREFIX);
    let (mut replayed, mut damaged, mut bytes) = (0u64, 0u64, 0u64);
    let mut last = input_through;
    let mut first = None;
    let mut out = Vec::new();
    for (key, value) in log {
        let Some(seq) = key
            .get(INPUT_LOG_PREFIX.len()..)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes)
        else {
            damaged += 1;
            continue;
        };
        if seq > INPUT_SEQ_MAX {
            damaged += 1;
            continue;
        }
        first.get_or_insert(seq);
        last = last.max(seq);
        if seq <= input_through {
            continue;
        }
        bytes += value.len() as u64;
        let Ok((record, _)) =
            bincode::decode_from_slice::<InputRecord, _>(&value, bincode_config())
        else {
            damaged += 1;
            continue;
        };
        // What the replay emits was committed with its input before the
        // crash: it is thrown away.
        let result = match record {
            InputRecord::Reading(r) => {
                let stream = r.stream.clone().unwrap_or_default();
                pipeline.handle(now_ms, &stream, r, &mut out)
            }
            InputRecord::Tick { watermark_us } => {
                pipeline.advance_watermark(now_ms, watermark_us, &mut out)
            }
        };
        out.clear();
        if let Err(e) = result {
            tracing::error!(error = %e, seq, "replaying the edge stages' input log failed; the rest is skipped");
            break;
        }
        replayed += 1;
    }
    if replayed > 0 || damaged > 0 {
        tracing::info!(
            replayed,
            damaged,
            "edge stages replayed their input log since the checkpoint"
        );
    }
    // Seqs come from the disk: `u64::MAX` must not overflow here.
    let first = first
        .unwrap_or_else(|| last.saturating_add(1))
        .min(input_through.saturating_add(1));
    (last, first, chunks, bytes)
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
            state_bytes = outbox.state_bytes(),
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
                let mut pipeline = Pipeline::new(
                    &plan.stages,
                    plan.uplink.iter().map(String::as_str),
                    plan.restarts,
                )?;
                let (input_seq, input_first, checkpoint_chunks, input_bytes) =
                    recover_stages(&outbox, &mut pipeline, args.clock.now_us() / 1000);
                myself.send_interval(Duration::from_millis(STAGES_TICK_MS), || {
                    GatewayMsg::StagesTick
                });
                Some(Stages {
                    pipeline,
                    uplink: plan.uplink.into_iter().collect(),
                    outputs_dropped: 0,
                    out: Vec::new(),
                    input_seq,
                    input_first,
                    input_bytes,
                    checkpoint_interval: Duration::from_millis(plan.checkpoint_interval_ms.max(1)),
                    last_checkpoint: Instant::now(),
                    checkpoints: 0,
                    checkpoint_chunks,
                })
            }
            None => None,
        };
        Ok(GatewayState {
            outbox,
            stages,
            ack_log,
            sources: HashMap::new(),
            activity: 0,
            commit_scheduled: false,
            timer_generation: 0,
            full: false,
            unconfirmed: (rec.segments > 0)
                .then(|| (rec.sealed_through, args.clock.now_us(), rec.segments as u64))
                .into_iter()
                .collect(),
            names: args.names,
            clock: args.clock,
            device_clock_skew_max_us: i64::try_from(
                args.device_clock_skew_max_ms.saturating_mul(1000),
            )
            .unwrap_or(i64::MAX),
            readings_future: 0,
            retries_recognised: 0,
            commits: 0,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<GatewayMsg>,
        msg: GatewayMsg,
        state: &mut GatewayState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            GatewayMsg::Ingest(ingest, reply) => {
                let Origin { source, n } = ingest.origin;
                let p = state.progress(source, n);
                if n < p.next_n {
                    // A retry of a reading already taken: answered when
                    // durable, never stored twice.
                    let done = p.committed_n.is_some_and(|c| c >= n);
                    if done {
                        let _ = reply.send(IngestReply::Duplicate);
                    } else {
                        // Replaces an older waiting retry, whose caller gave up.
                        p.waiting = Some((n, reply));
                    }
                    state.retries_recognised += 1;
                    return Ok(());
                }
                // A source that waits for each answer moves on only after
                // one: a number above the next follows an invalid reading.
                p.next_n = n;
                let now = now();
                let ticket = Ticket::Port(reply, ingest.origin);
                match state.admit(now, ingest.reading, ticket, Vec::new())? {
                    Admission::Stored | Admission::Consumed => {
                        state.progress(source, n).next_n = n + 1;
                    }
                    Admission::Full(ticket) => ticket.answer(IngestReply::Full),
                    Admission::Invalid(reason, ticket) => {
                        state.progress(source, n).next_n = n + 1;
                        ticket.answer(IngestReply::Invalid(reason));
                    }
                }
                state.after_append(&myself, now);
            }
            GatewayMsg::IngestBatch(batch) => {
                let now = now();
                let IngestBatch {
                    source,
                    first_n,
                    items,
                    answers,
                } = batch;
                let p = state.progress(source, first_n);
                p.answers = Some(answers.clone());
                if first_n > p.next_n {
                    // An earlier batch was refused in part: these come after
                    // the gap, so they wait for the source to resend it.
                    answers.answer(SourceAnswer::Retry {
                        from_n: p.next_n,
                        full: false,
                    });
                    return Ok(());
                }
                let mut next_n = p.next_n;
                tracing::trace!(
                    source,
                    first_n,
                    next_n,
                    items = items.len(),
                    "gateway: a batch"
                );
                for (i, item) in items.into_iter().enumerate() {
                    let n = first_n + i as u64;
                    if n < next_n {
                        // Resent, but taken already: its Durable answer covers it.
                        state.retries_recognised += 1;
                        continue;
                    }
                    let ticket = Ticket::Stream { source, n };
                    match state.admit(now, item.reading, ticket, item.state)? {
                        Admission::Stored | Admission::Consumed => {
                            next_n = n + 1;
                            // A full segment is committed before the next
                            // reading, which would not fit in it.
                            if state.outbox.segment_full() {
                                state.progress(source, first_n).next_n = next_n;
                                state.commit(&myself);
                            }
                        }
                        Admission::Invalid(reason, _) => {
                            next_n = n + 1;
                            answers.answer(SourceAnswer::Invalid { n, reason });
                        }
                        Admission::Full(_) => {
                            answers.answer(SourceAnswer::Retry {
                                from_n: n,
                                full: true,
                            });
                            break;
                        }
                    }
                }
                state.progress(source, first_n).next_n = next_n;
                state.after_append(&myself, now);
            }
            GatewayMsg::CommitNow => {
                state.commit_scheduled = false;
                state.commit(&myself);
            }
            GatewayMsg::CommitDue { generation } => {
                if generation == state.timer_generation {
                    state.commit(&myself);
                }
            }
            GatewayMsg::StagesTick => {
                let now = now();
                if state.stages.is_some() {
                    state.tick_stages(now)?;
                    state.checkpoint_stages(now);
                    state.after_append(&myself, now);
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
            GatewayMsg::StaleEpoch(log_epoch, reply) => {
                let result = state
                    .outbox
                    .handle_stale_epoch(log_epoch)
                    .map_err(|e| e.to_string());
                let _ = reply.send(result);
            }
            GatewayMsg::Status(reply) => {
                let _ = reply.send(state.status());
            }
            GatewayMsg::ReadState(prefix, reply) => {
                let _ = reply.send(state.outbox.durable_state(&prefix));
            }
            GatewayMsg::WriteState(changes, reply) => {
                let now = now();
                match state
                    .outbox
                    .handle_state(now, changes, Ticket::State(reply))
                {
                    Ok(()) => state.after_append(&myself, now),
                    Err(StateRefusal::Full(Ticket::State(reply))) => {
                        let _ = reply.send(Err("the outbox is full".into()));
                    }
                    Err(StateRefusal::TooLarge(n, Ticket::State(reply))) => {
                        let _ = reply.send(Err(format!("a state entry of {n} bytes is too large")));
                    }
                    Err(_) => {}
                }
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
        // What is still open was never acknowledged; committing it now (and
        // answering its sources) spares the sources a retry.
        state.commit(&myself);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::{audit_escape, open_ack_log};

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

    #[test]
    fn device_ids_cannot_forge_ack_log_lines() {
        assert_eq!(audit_escape("press-7"), "press-7");
        assert_eq!(audit_escape("a b\nA x 1"), "a%20b%0AA%20x%201");
        assert_eq!(audit_escape("50%"), "50%25");
    }
}

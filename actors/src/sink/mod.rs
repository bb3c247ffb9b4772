//! The log sink: where the cloud writes readings, exactly once.
//!
//! A cloud node writes through a bounded number of [`ShardLogWriter`]s, each
//! a transactional producer shared by the edges that hash to its shard. Each
//! call to [`ShardLogWriter::commit`] is one transaction that holds the
//! segments of one or more edges *and* each edge's new high-water mark, so
//! that a reader of the log and the recovery of a mark can never disagree.
//! [`EdgeLogWriter`] is the same for one edge alone (tools, tests and the
//! benchmarks' baseline).
//!
//! The trait is synchronous on purpose: the real implementation blocks on
//! broker round trips (the ingest actor runs it on a blocking thread), and the
//! simulated one must run inside a deterministic simulation.

pub mod kafka;
pub mod memory;

use std::time::Duration;

use crate::reading::Reading;

/// How far an edge's stream is durably in the log: every segment of `epoch`
/// up to and including `seq` is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Hwm {
    pub epoch: u64,
    pub seq: u64,
}

/// The readings of one outbox segment, as the cloud received them.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentBatch {
    pub seq: u64,
    /// The readings the cloud admitted, for the readings topic.
    pub readings: Vec<Reading>,
    /// The readings the cloud refused (invalid, or of a stream this edge may
    /// not send), for the refused topic, in the same transaction: the edge's
    /// mark moves past them, so they are kept, not lost, and never reach the
    /// streams they claim.
    pub refused: Vec<RefusedReading>,
}

impl SegmentBatch {
    /// A batch of admitted readings only.
    pub fn new(seq: u64, readings: Vec<Reading>) -> Self {
        Self {
            seq,
            readings,
            refused: Vec::new(),
        }
    }
}

/// A reading the cloud would not admit, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct RefusedReading {
    pub reading: Reading,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("configuring the log client failed: {0}")]
    Config(String),
    #[error("fencing the previous writer of {edge} failed: {reason}")]
    Fence { edge: String, reason: String },
    #[error("recovering the high-water marks of {edge} failed: {reason}")]
    RecoverHwm { edge: String, reason: String },
    #[error("a high-water mark record for edge {edge} is malformed: {reason}")]
    CorruptHwm { edge: String, reason: String },
    #[error("the transaction of {edge} failed and was aborted: {reason}")]
    Aborted { edge: String, reason: String },
    #[error("the cloud stages' log failed while {step}: {reason}")]
    Stages { step: &'static str, reason: String },
    #[error("writing an audit record failed: {0}")]
    Audit(String),
    #[error("the fleet registry failed while {step}: {reason}")]
    Registry { step: &'static str, reason: String },
    /// The writer was fenced by a newer one; it must not be used again.
    #[error("the writer of {edge} was fenced by a newer writer")]
    Fenced { edge: String },
}

impl SinkError {
    /// Whether a fresh writer may succeed where this one failed.
    pub fn is_retriable(&self) -> bool {
        !matches!(self, SinkError::Config(_) | SinkError::CorruptHwm { .. })
    }
}

/// Opens writers. One sink serves every edge of a cloud node.
pub trait LogSink: Send + Sync + 'static {
    /// Opens the writer for one edge. Opening fences any earlier writer of the
    /// same edge (in this process or another), so that a zombie cannot commit.
    fn open_edge(&self, edge_id: &str) -> Result<Box<dyn EdgeLogWriter>, SinkError>;

    /// Opens the writer of shard `shard`. Opening fences any earlier writer
    /// of the same shard (in this process or another) and ends the
    /// transaction it left open, so that a zombie cannot commit and the
    /// marks read next are final.
    fn open_shard(&self, shard: u32) -> Result<Box<dyn ShardLogWriter>, SinkError>;

    /// Where the ingest runs this sink's calls.
    fn calls(&self) -> SinkCalls {
        SinkCalls::Blocking
    }
}

/// Where the ingest runs a sink's calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkCalls {
    /// On a blocking thread: the calls wait on a broker.
    Blocking,
    /// On the ingest's own task: the calls answer at once, as a simulated
    /// log does, which must run on the simulation's thread to replay
    /// exactly. The answer reaches the ingest `answer_after` later, as a
    /// broker's reply would: a commit is already in the log while its
    /// answer travels, and a crash in between is a real case.
    Inline { answer_after: std::time::Duration },
}

/// The transactional writer of one edge's stream.
pub trait EdgeLogWriter: Send + 'static {
    /// The last committed mark of this edge, read back from the log.
    fn high_water_mark(&mut self) -> Result<Option<Hwm>, SinkError>;

    /// Writes the batches and the new mark in one transaction. On error,
    /// nothing of the batch is visible to read_committed consumers.
    fn commit(
        &mut self,
        edge_id: &str,
        hwm: Hwm,
        batches: &[SegmentBatch],
    ) -> Result<(), SinkError>;
}

/// Every edge's latest mark in the log, or why its record does not parse
/// (which matters only to that edge: its recovery fails).
pub type Marks = std::collections::HashMap<String, Result<Hwm, String>>;

/// One edge's part of a shard's transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct EdgeCommit {
    pub edge_id: String,
    /// The edge's mark once the transaction commits.
    pub hwm: Hwm,
    pub batches: Vec<SegmentBatch>,
}

impl EdgeCommit {
    /// Readings admitted to the readings topic.
    pub fn readings_count(&self) -> usize {
        self.batches.iter().map(|b| b.readings.len()).sum()
    }
}

/// The transactional writer of one shard: the segments of many edges, each
/// with its new mark, in one transaction.
pub trait ShardLogWriter: Send + 'static {
    /// The last committed mark of every edge in the log, read back after
    /// the opening fenced earlier writers of this shard. Marks of edges of
    /// other shards are included; the caller keeps what it needs.
    fn marks(&mut self) -> Result<Marks, SinkError>;

    /// Writes every edge's batches and new mark in one transaction. On
    /// error, nothing of it is visible to read_committed consumers, or the
    /// outcome is unknown: the writer must then be dropped and the marks
    /// read again through a new one.
    fn commit(&mut self, edges: &[EdgeCommit]) -> Result<(), SinkError>;
}

/// A committed reading read back from the log, for the cloud's stages.
#[derive(Debug, Clone, PartialEq)]
pub struct LogReading {
    pub partition: i32,
    pub offset: i64,
    /// The edge it came through, as the cloud certified it at ingest.
    pub edge: String,
    pub reading: Reading,
}

/// What one [`StageLog::poll`] brought.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Polled {
    pub readings: Vec<LogReading>,
    /// Partitions no longer this consumer's: drop their state, unsaved.
    pub revoked: Vec<i32>,
    /// Partitions newly this consumer's, each with the state committed with
    /// its offsets (`None`: start fresh). Applied before `readings`.
    pub assigned: Vec<(i32, Option<Vec<u8>>)>,
}

/// A record a cloud stage writes to a sink topic.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkRecord {
    pub topic: String,
    pub key: String,
    pub value: Vec<u8>,
    /// The stream it came from, written as a header.
    pub stream: String,
}

/// The cloud stages' view of the log: consume-transform-produce. Each
/// [`StageLog::commit`] writes the outputs, the stages' state of every
/// partition it touched (a checkpoint), *and* moves the consumer group's
/// offsets past everything polled so far, in one transaction, so that a
/// crash or a move of a partition to another cloud node never loses nor
/// repeats an output, and a window or a held threshold that spans the move
/// goes on where it was.
pub trait StageLog: Send + 'static {
    /// Up to `records_max` committed readings (`read_committed`), waiting at
    /// most `timeout` for the first, and the partitions that left or joined
    /// this consumer meanwhile. Records that are not readings are skipped
    /// and counted; their offsets still move on. Readings of a partition
    /// revoked during the poll are not returned (their next owner reads
    /// them).
    fn poll(&mut self, records_max: usize, timeout: Duration) -> Result<Polled, SinkError>;

    /// Writes `outputs` and each `(partition, state)` checkpoint and commits
    /// the offsets of everything polled, at once. Every partition polled
    /// since the last commit must have its checkpoint here. After an error
    /// the caller must start over from the committed offsets with the
    /// committed state (a new `StageLog`).
    fn commit(
        &mut self,
        outputs: &[SinkRecord],
        checkpoints: &[(i32, Vec<u8>)],
    ) -> Result<(), SinkError>;

    /// Records skipped because they were not readings.
    fn records_malformed(&self) -> u64;
}

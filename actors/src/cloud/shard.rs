//! A log shard: one transactional writer shared by every edge that hashes to
//! it, so that a cloud node runs a bounded number of producers (`shards_count`)
//! however many edges it serves.
//!
//! Design constraints:
//!
//! - **One transaction, many edges.** A transaction holds the segments of
//!   every edge whose commit is queued, each with its new mark, committed at
//!   once; each edge is acked (its ingest told) after the commit.
//! - **Pipelined, adaptive.** While one transaction commits, the next one
//!   fills: the queue is taken whole (up to `transaction_segments_max`) the
//!   moment the previous commit answers. When quiet, a lone commit goes out
//!   at once; under load, transactions grow by themselves. No timer.
//! - **Bounded.** Each ingest has at most one commit here at a time, so the
//!   queue holds at most one entry per connected edge, and the cloud bounds
//!   its connections; one transaction holds at most
//!   `transaction_segments_max` segments (a single edge's commit larger
//!   than that goes alone).
//! - **Fencing per shard.** The writer's `transactional.id` names the shard;
//!   opening it fences the previous writer of that shard in any process.
//!   The marks are read once, after that fencing, and then kept: only this
//!   writer commits marks of this shard's edges.
//! - **A mark is answered only when settled.** An ingest asking for its
//!   edge's mark while a commit of that edge (from its previous connection)
//!   is queued or committing waits for that commit: answering sooner would
//!   let the edge resend what that commit is about to write.
//! - **No overlap reaches the log.** Before a commit joins a transaction, its
//!   first segment must lie above the edge's mark (or be of a newer epoch).
//!   One that does not is refused, its ingest closes the link, and the edge
//!   reconnects to learn the mark. With the rule above this never happens;
//!   it is a second line against writing a segment twice.
//! - **Opened on demand.** A shard opens its writer when the first of its
//!   edges arrives, not at start: with several cloud nodes, opening every
//!   shard everywhere would fence the other nodes' writers.
//! - **Fenced means moved.** A transaction refused because a newer writer
//!   of this shard exists (another cloud node opened it) is not retried:
//!   the shard closes the links of all its edges here and stays closed, so
//!   that two cloud nodes never fence each other back and forth. The edges
//!   reconnect in their order of preference. For [`MOVED_HOLD_MS`] edges
//!   arriving here are refused and dial on; after it, one arriving opens
//!   the shard again, fencing the other node.
//! - **Failure.** Any other failed transaction fails the ingests in it (their
//!   links close, their edges reconnect), and the writer is dropped and
//!   opened again, which fences it and reads the marks back: its outcome may
//!   be unknown. Commits queued behind it wait for the new writer and pass
//!   the overlap check against the fresh marks. A failed opening fails every
//!   waiting ingest and is retried with backoff (up to
//!   [`REOPEN_BACKOFF_MS_MAX`]) while edges wait for it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::ingest::IngestMsg;
use super::CloudCounters;
use crate::clock::Clock;
use crate::sink::{EdgeCommit, Hwm, LogSink, ShardLogWriter, SinkError};

/// The first wait before opening a shard's writer again after a failed
/// opening; it doubles up to [`REOPEN_BACKOFF_MS_MAX`].
const REOPEN_BACKOFF_MS_MIN: u64 = 100;
/// The longest wait between two attempts to open a shard's writer.
pub const REOPEN_BACKOFF_MS_MAX: u64 = 5_000;
/// How long a shard that another cloud node took stays closed here: edges
/// arriving meanwhile are refused (and dial their next cloud node), so
/// that one edge which could not reach the new owner for a moment does not
/// take the shard back and throw out every other edge of it. Without this,
/// a thousand edges on three overloaded nodes passed shards back and forth
/// for tens of seconds.
pub const MOVED_HOLD_MS: u64 = 3_000;

/// The shard of an edge: FNV-1a of its id, so that every cloud node, of any
/// version, places an edge in the same shard.
pub fn shard_of(edge_id: &str, shards_count: u32) -> u32 {
    assert!(shards_count > 0, "at least one shard");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in edge_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(shards_count)) as u32
}

/// How a cloud node shards its log writers. Both are named limits of the
/// node's settings (`ingest_shards`, `ingest_transaction_segments_max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardConfig {
    /// Log writers (transactional producers) of a cloud node. The edge to
    /// shard mapping depends on it: every cloud node of a cluster must use
    /// the same count, and changing it needs every cloud node stopped.
    pub shards_count: u32,
    /// Segments one transaction may hold, over all its edges.
    pub transaction_segments_max: usize,
}

impl Default for ShardConfig {
    fn default() -> Self {
        Self {
            shards_count: 4,
            transaction_segments_max: 256,
        }
    }
}

pub struct ShardArgs {
    pub shard: u32,
    pub config: ShardConfig,
    pub sink: Arc<dyn LogSink>,
    pub counters: Arc<CloudCounters>,
}

/// A commit an ingest handed over, and where its answer goes.
pub struct Pending {
    pub commit: EdgeCommit,
    pub segments: usize,
    pub reply: ActorRef<IngestMsg>,
}

pub enum ShardMsg {
    /// An ingest asks for its edge's mark: answered with
    /// [`IngestMsg::Recovered`] once no commit of that edge is pending.
    Mark {
        edge_id: String,
        reply: ActorRef<IngestMsg>,
    },
    /// Answered with [`IngestMsg::Committed`].
    Commit(Pending),
    Opened(Result<(Box<dyn ShardLogWriter>, crate::sink::Marks), SinkError>),
    Committed(Box<dyn ShardLogWriter>, Vec<Pending>, Result<(), SinkError>),
    Reopen,
}

impl ractor::Message for ShardMsg {}

#[derive(Clone, Default)]
pub struct ShardActor;

pub struct ShardState {
    args: ShardArgs,
    writer: Option<Box<dyn ShardLogWriter>>,
    opening: bool,
    committing: bool,
    /// The marks of this shard's edges, as read at opening and committed since.
    marks: crate::sink::Marks,
    queue: VecDeque<Pending>,
    /// Commits of the transaction in flight, per edge.
    in_flight: HashMap<String, ()>,
    mark_waiters: Vec<(String, ActorRef<IngestMsg>)>,
    /// The ingest of each edge that asked for its mark here, told when the
    /// shard moves to another cloud node.
    members: HashMap<String, ActorRef<IngestMsg>>,
    backoff_ms: u64,
    /// A failed opening's backoff is running: open only when it ends.
    reopen_scheduled: bool,
    /// When another cloud node last took this shard.
    moved_at: Option<tokio::time::Instant>,
}

impl ShardState {
    /// Opens the writer if an edge waits for it and nothing else is under way.
    fn open_if_needed(&mut self, myself: &ActorRef<ShardMsg>) {
        let wanted = !self.mark_waiters.is_empty() || !self.queue.is_empty();
        if wanted
            && self.writer.is_none()
            && !self.opening
            && !self.committing
            && !self.reopen_scheduled
        {
            self.open(myself);
        }
    }

    fn open(&mut self, myself: &ActorRef<ShardMsg>) {
        self.opening = true;
        let sink = self.args.sink.clone();
        let shard = self.args.shard;
        super::ingest::run_sink(self.args.sink.calls(), myself.clone(), move || {
            let result = sink.open_shard(shard).and_then(|mut w| {
                let marks = w.marks()?;
                Ok((w, marks))
            });
            ShardMsg::Opened(result)
        });
    }

    fn pending_for(&self, edge_id: &str) -> bool {
        self.in_flight.contains_key(edge_id)
            || self.queue.iter().any(|p| p.commit.edge_id == edge_id)
    }

    fn mark_of(&self, edge_id: &str) -> Result<Option<Hwm>, SinkError> {
        match self.marks.get(edge_id) {
            None => Ok(None),
            Some(Ok(hwm)) => Ok(Some(*hwm)),
            Some(Err(reason)) => Err(SinkError::CorruptHwm {
                edge: edge_id.to_string(),
                reason: reason.clone(),
            }),
        }
    }

    /// Answers the ingests waiting for a mark that is now settled.
    fn answer_marks(&mut self) {
        // The marks are known once open, also while a transaction commits
        // (the writer is away then): an edge in it is pending and waits.
        if self.opening || (self.writer.is_none() && !self.committing) {
            return;
        }
        let waiters = std::mem::take(&mut self.mark_waiters);
        for (edge_id, reply) in waiters {
            if self.pending_for(&edge_id) {
                self.mark_waiters.push((edge_id, reply));
            } else {
                let _ = reply.send_message(IngestMsg::Recovered(self.mark_of(&edge_id)));
            }
        }
    }

    /// Starts the next transaction with what is queued, if none is in flight.
    fn pump(&mut self, myself: &ActorRef<ShardMsg>) {
        if self.committing || self.writer.is_none() || self.queue.is_empty() {
            return;
        }
        let mut taken: Vec<Pending> = Vec::new();
        let mut segments = 0;
        // The marks this transaction leaves, so that two commits of one edge
        // in it are checked against each other too.
        let mut after: HashMap<String, Hwm> = HashMap::new();
        while let Some(next) = self.queue.front() {
            if !taken.is_empty()
                && segments + next.segments > self.args.config.transaction_segments_max
            {
                break;
            }
            let p = self.queue.pop_front().expect("front exists");
            let edge = p.commit.edge_id.as_str();
            let mark = match after.get(edge) {
                Some(h) => Ok(Some(*h)),
                None => self.mark_of(edge),
            };
            match mark.and_then(|m| check_above(edge, m, &p.commit)) {
                Ok(()) => {
                    segments += p.segments;
                    after.insert(edge.to_string(), p.commit.hwm);
                    taken.push(p);
                }
                Err(e) => {
                    self.args.counters.log_errors.fetch_add(1, Relaxed);
                    tracing::warn!(shard = self.args.shard, edge, error = %e, "a commit was refused before the log");
                    let _ = p.reply.send_message(IngestMsg::Committed(Err(e)));
                }
            }
        }
        if taken.is_empty() {
            self.answer_marks();
            return;
        }
        self.in_flight = taken
            .iter()
            .map(|p| (p.commit.edge_id.clone(), ()))
            .collect();
        self.committing = true;
        let mut writer = self.writer.take().expect("checked above");
        let counters = self.args.counters.clone();
        super::ingest::run_sink(self.args.sink.calls(), myself.clone(), move || {
            let commits: Vec<EdgeCommit> = taken.iter().map(|p| p.commit.clone()).collect();
            let result = writer.commit(&commits);
            if result.is_ok() {
                // From the device's clock to the commit: what a reader of
                // the log waits, clock skew included.
                let now_us = crate::clock::SystemClock.now_us();
                for r in commits
                    .iter()
                    .flat_map(|c| &c.batches)
                    .flat_map(|b| &b.readings)
                {
                    let ms = (now_us - r.device_ts_us).max(0) as u64 / 1000;
                    counters.latency.record_ms(ms);
                }
            }
            ShardMsg::Committed(writer, taken, result)
        });
    }
}

/// A commit may join a transaction only if all of it lies above the edge's
/// mark: else a segment would be written twice.
fn check_above(edge: &str, mark: Option<Hwm>, commit: &EdgeCommit) -> Result<(), SinkError> {
    let Some(mark) = mark else { return Ok(()) };
    let first = commit.batches.first().map_or(commit.hwm.seq, |b| b.seq);
    let above =
        commit.hwm.epoch > mark.epoch || (commit.hwm.epoch == mark.epoch && first > mark.seq);
    if above {
        Ok(())
    } else {
        Err(SinkError::Aborted {
            edge: edge.to_string(),
            reason: format!(
                "segments from {} of epoch {} are not above the mark in the log (epoch {}, seq {}); \
                 the edge must reconnect to learn it",
                first, commit.hwm.epoch, mark.epoch, mark.seq
            ),
        })
    }
}

impl Actor for ShardActor {
    type Msg = ShardMsg;
    type State = ShardState;
    type Arguments = ShardArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<ShardMsg>,
        args: ShardArgs,
    ) -> Result<ShardState, ActorProcessingErr> {
        let state = ShardState {
            args,
            writer: None,
            opening: false,
            committing: false,
            marks: HashMap::new(),
            queue: VecDeque::new(),
            in_flight: HashMap::new(),
            mark_waiters: Vec::new(),
            members: HashMap::new(),
            backoff_ms: REOPEN_BACKOFF_MS_MIN,
            reopen_scheduled: false,
            moved_at: None,
        };
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<ShardMsg>,
        msg: ShardMsg,
        state: &mut ShardState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ShardMsg::Mark { edge_id, reply } => {
                let held = state
                    .moved_at
                    .filter(|t| t.elapsed() < Duration::from_millis(MOVED_HOLD_MS));
                if let (Some(t), None, false) = (held, &state.writer, state.opening) {
                    let _ = reply.send_message(IngestMsg::Recovered(Err(SinkError::Aborted {
                        edge: edge_id,
                        reason: format!(
                            "log shard {} moved to another cloud node {} ms ago; dial that one",
                            state.args.shard,
                            t.elapsed().as_millis()
                        ),
                    })));
                    return Ok(());
                }
                // Bounded by this shard's edges: ingests that ended go.
                state
                    .members
                    .retain(|_, r| r.get_status() != ractor::ActorStatus::Stopped);
                state.members.insert(edge_id.clone(), reply.clone());
                state.mark_waiters.push((edge_id, reply));
                state.open_if_needed(&myself);
                state.answer_marks();
            }
            ShardMsg::Commit(p) => {
                debug_assert!(
                    !state
                        .queue
                        .iter()
                        .any(|q| q.reply.get_id() == p.reply.get_id()),
                    "one commit per ingest at a time"
                );
                state.queue.push_back(p);
                state.open_if_needed(&myself);
                state.pump(&myself);
            }
            ShardMsg::Opened(Ok((writer, marks))) => {
                let (shard, count) = (state.args.shard, state.args.config.shards_count);
                state.marks = marks
                    .into_iter()
                    .filter(|(edge, _)| shard_of(edge, count) == shard)
                    .collect();
                tracing::info!(
                    shard,
                    edges_with_marks = state.marks.len(),
                    "log shard open"
                );
                state.writer = Some(writer);
                state.opening = false;
                state.backoff_ms = REOPEN_BACKOFF_MS_MIN;
                state.pump(&myself);
                state.answer_marks();
            }
            ShardMsg::Opened(Err(e)) => {
                state.opening = false;
                state.args.counters.log_errors.fetch_add(1, Relaxed);
                tracing::warn!(shard = state.args.shard, error = %e, retry_ms = state.backoff_ms, "opening a log shard failed");
                // The ingests waiting close their links; their edges retry.
                for (_, reply) in state.mark_waiters.drain(..) {
                    let _ = reply.send_message(IngestMsg::Recovered(Err(SinkError::Aborted {
                        edge: format!("shard-{}", state.args.shard),
                        reason: e.to_string(),
                    })));
                }
                for p in state.queue.drain(..) {
                    let _ = p
                        .reply
                        .send_message(IngestMsg::Committed(Err(SinkError::Aborted {
                            edge: p.commit.edge_id.clone(),
                            reason: e.to_string(),
                        })));
                }
                state.reopen_scheduled = true;
                myself.send_after(Duration::from_millis(state.backoff_ms), || ShardMsg::Reopen);
                state.backoff_ms = (state.backoff_ms * 2).min(REOPEN_BACKOFF_MS_MAX);
            }
            ShardMsg::Reopen => {
                state.reopen_scheduled = false;
                state.open_if_needed(&myself);
            }
            ShardMsg::Committed(writer, done, result) => {
                state.committing = false;
                state.in_flight.clear();
                let counters = &state.args.counters;
                match result {
                    Ok(()) => {
                        counters.transactions.fetch_add(1, Relaxed);
                        for p in done {
                            let readings = p.commit.readings_count() as u64;
                            state
                                .marks
                                .insert(p.commit.edge_id.clone(), Ok(p.commit.hwm));
                            let _ = p.reply.send_message(IngestMsg::Committed(Ok(readings)));
                        }
                        state.writer = Some(writer);
                    }
                    Err(e @ SinkError::Fenced { .. }) => {
                        // Another cloud node opened this shard: it is
                        // theirs now. Reopening would take it back and
                        // start a tug of war; the edges choose instead.
                        drop(writer);
                        counters.shards_moved.fetch_add(1, Relaxed);
                        tracing::warn!(
                            shard = state.args.shard,
                            edges = state.members.len(),
                            "another cloud node took this log shard; closing its edges' links here"
                        );
                        let reason = format!(
                            "log shard {} moved to another cloud node: {e}",
                            state.args.shard
                        );
                        for p in done.into_iter().chain(state.queue.drain(..)) {
                            let _ = p.reply.send_message(IngestMsg::Committed(Err(
                                SinkError::Aborted {
                                    edge: p.commit.edge_id.clone(),
                                    reason: reason.clone(),
                                },
                            )));
                        }
                        for (_, m) in state.members.drain() {
                            let _ = m.send_message(IngestMsg::ShardMoved(reason.clone()));
                        }
                        // Edges that arrived since go too: for a while the
                        // shard is the other node's (see MOVED_HOLD_MS).
                        for (edge, w) in state.mark_waiters.drain(..) {
                            let _ = w.send_message(IngestMsg::Recovered(Err(SinkError::Aborted {
                                edge,
                                reason: reason.clone(),
                            })));
                        }
                        state.marks.clear();
                        state.moved_at = Some(tokio::time::Instant::now());
                    }
                    Err(e) => {
                        // In an unknown state: drop it, and read the marks
                        // again through a new one.
                        drop(writer);
                        counters.log_errors.fetch_add(1, Relaxed);
                        tracing::warn!(shard = state.args.shard, edges = done.len(), error = %e, "a shard transaction failed");
                        for p in done {
                            let _ = p.reply.send_message(IngestMsg::Committed(Err(
                                SinkError::Aborted {
                                    edge: p.commit.edge_id.clone(),
                                    reason: e.to_string(),
                                },
                            )));
                        }
                        state.open(&myself);
                    }
                }
                state.answer_marks();
                state.open_if_needed(&myself);
                state.pump(&myself);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shard_gets_edges_and_the_mapping_is_fixed() {
        let mut counts = [0u32; 4];
        for i in 0..1000 {
            counts[shard_of(&format!("edge-{i}"), 4) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 150), "{counts:?}");
        // The mapping is part of the cluster's contract: it must not change
        // between versions.
        assert_eq!(shard_of("edge-1", 4), shard_of("edge-1", 4));
        assert_eq!(shard_of("", 1), 0);
    }

    fn commit(epoch: u64, from: u64, through: u64) -> EdgeCommit {
        EdgeCommit {
            edge_id: "e".into(),
            hwm: Hwm {
                epoch,
                seq: through,
            },
            batches: (from..=through)
                .map(|seq| crate::sink::SegmentBatch::new(seq, Vec::new()))
                .collect(),
        }
    }

    #[test]
    fn only_commits_above_the_mark_pass() {
        let mark = Some(Hwm { epoch: 2, seq: 5 });
        assert!(check_above("e", None, &commit(1, 1, 3)).is_ok());
        assert!(check_above("e", mark, &commit(2, 6, 8)).is_ok());
        assert!(check_above("e", mark, &commit(3, 1, 1)).is_ok());
        assert!(check_above("e", mark, &commit(2, 5, 8)).is_err());
        assert!(check_above("e", mark, &commit(2, 2, 3)).is_err());
        assert!(check_above("e", mark, &commit(1, 9, 9)).is_err());
    }

    /// A memory log whose answers arrive `answer_after` later, as a broker's.
    struct SlowLog(crate::sink::memory::MemoryLog, Duration);

    impl LogSink for SlowLog {
        fn calls(&self) -> crate::sink::SinkCalls {
            crate::sink::SinkCalls::Inline {
                answer_after: self.1,
            }
        }
        fn open_edge(
            &self,
            edge_id: &str,
        ) -> Result<Box<dyn crate::sink::EdgeLogWriter>, SinkError> {
            self.0.open_edge(edge_id)
        }
        fn open_shard(&self, shard: u32) -> Result<Box<dyn ShardLogWriter>, SinkError> {
            self.0.open_shard(shard)
        }
    }

    /// Stands in for an ingest: forwards what the shard answers.
    struct Probe;

    impl Actor for Probe {
        type Msg = IngestMsg;
        type State = tokio::sync::mpsc::Sender<IngestMsg>;
        type Arguments = tokio::sync::mpsc::Sender<IngestMsg>;

        async fn pre_start(
            &self,
            _: ActorRef<IngestMsg>,
            tx: Self::Arguments,
        ) -> Result<Self::State, ActorProcessingErr> {
            Ok(tx)
        }

        async fn handle(
            &self,
            _: ActorRef<IngestMsg>,
            msg: IngestMsg,
            tx: &mut Self::State,
        ) -> Result<(), ActorProcessingErr> {
            let _ = tx.send(msg).await;
            Ok(())
        }
    }

    struct Rig {
        log: crate::sink::memory::MemoryLog,
        counters: Arc<CloudCounters>,
        shard: ActorRef<ShardMsg>,
    }

    async fn rig() -> Rig {
        let log = crate::sink::memory::MemoryLog::new();
        let counters = Arc::new(CloudCounters::default());
        let (shard, _) = Actor::spawn(
            None,
            ShardActor,
            ShardArgs {
                shard: 0,
                config: ShardConfig {
                    shards_count: 1,
                    transaction_segments_max: 8,
                },
                sink: Arc::new(SlowLog(log.clone(), Duration::from_millis(50))),
                counters: counters.clone(),
            },
        )
        .await
        .unwrap();
        Rig {
            log,
            counters,
            shard,
        }
    }

    async fn probe() -> (ActorRef<IngestMsg>, tokio::sync::mpsc::Receiver<IngestMsg>) {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let (probe, _) = Actor::spawn(None, Probe, tx).await.unwrap();
        (probe, rx)
    }

    fn readings_commit(edge: &str, epoch: u64, from: u64, through: u64) -> Pending2 {
        let r = crate::reading::Reading {
            device_id: format!("{edge}-dev"),
            device_ts_us: 1,
            edge_ts_us: 1,
            stream: None,
            metrics: Vec::new(),
        };
        let batches: Vec<_> = (from..=through)
            .map(|seq| crate::sink::SegmentBatch::new(seq, vec![r.clone()]))
            .collect();
        Pending2 {
            commit: EdgeCommit {
                edge_id: edge.into(),
                hwm: Hwm {
                    epoch,
                    seq: through,
                },
                batches,
            },
            segments: (through - from + 1) as usize,
        }
    }

    struct Pending2 {
        commit: EdgeCommit,
        segments: usize,
    }

    fn send_commit(shard: &ActorRef<ShardMsg>, p: Pending2, reply: &ActorRef<IngestMsg>) {
        shard
            .send_message(ShardMsg::Commit(Pending {
                commit: p.commit,
                segments: p.segments,
                reply: reply.clone(),
            }))
            .unwrap();
    }

    async fn next(rx: &mut tokio::sync::mpsc::Receiver<IngestMsg>) -> IngestMsg {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("the shard answers in time")
            .expect("the probe lives")
    }

    #[tokio::test]
    async fn a_mark_asked_while_a_commit_of_that_edge_is_in_flight_waits_for_it() {
        let rig = rig().await;
        let (old, mut old_rx) = probe().await;
        let (new, mut new_rx) = probe().await;
        // The edge's previous connection hands over seqs 1..=3, and its new
        // connection asks for the mark while that commit is in flight.
        send_commit(&rig.shard, readings_commit("e", 1, 1, 3), &old);
        rig.shard
            .send_message(ShardMsg::Mark {
                edge_id: "e".into(),
                reply: new.clone(),
            })
            .unwrap();
        match next(&mut new_rx).await {
            IngestMsg::Recovered(Ok(mark)) => {
                assert_eq!(mark, Some(Hwm { epoch: 1, seq: 3 }))
            }
            _ => panic!("expected the settled mark"),
        }
        assert!(matches!(
            next(&mut old_rx).await,
            IngestMsg::Committed(Ok(3))
        ));
    }

    #[tokio::test]
    async fn commits_queued_behind_a_transaction_share_the_next_and_overlaps_are_refused() {
        let rig = rig().await;
        let (a, mut a_rx) = probe().await;
        let (b, mut b_rx) = probe().await;
        let (c, mut c_rx) = probe().await;
        // A mark is answered once the shard is open: commits sent while it
        // opens would all share the first transaction.
        rig.shard
            .send_message(ShardMsg::Mark {
                edge_id: "a".into(),
                reply: a.clone(),
            })
            .unwrap();
        assert!(matches!(
            next(&mut a_rx).await,
            IngestMsg::Recovered(Ok(None))
        ));
        send_commit(&rig.shard, readings_commit("a", 1, 1, 2), &a);
        send_commit(&rig.shard, readings_commit("b", 1, 1, 1), &b);
        send_commit(&rig.shard, readings_commit("c", 1, 1, 4), &c);
        for rx in [&mut a_rx, &mut b_rx, &mut c_rx] {
            assert!(matches!(next(rx).await, IngestMsg::Committed(Ok(_))));
        }
        // a alone, then b and c together.
        assert_eq!(rig.counters.transactions.load(Relaxed), 2);
        // A commit reaching back below the mark is refused before the log.
        send_commit(&rig.shard, readings_commit("a", 1, 2, 3), &a);
        assert!(matches!(
            next(&mut a_rx).await,
            IngestMsg::Committed(Err(_))
        ));
        send_commit(&rig.shard, readings_commit("a", 1, 3, 3), &a);
        assert!(matches!(next(&mut a_rx).await, IngestMsg::Committed(Ok(1))));
        let mut seen = std::collections::HashSet::new();
        for r in rig.log.records() {
            assert!(seen.insert((r.edge_id.clone(), r.seq)), "{r:?} twice");
        }
        assert_eq!(seen.len(), 2 + 1 + 4 + 1);
    }
}

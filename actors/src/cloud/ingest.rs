//! The ingest actor: one per connected edge, a thin driver around the
//! sans-IO [`Ingest`] core. It writes through its edge's log shard
//! ([`super::shard`]), which commits the segments of many edges in one
//! transaction: the ingest asks the shard for the edge's mark, then hands it
//! one commit at a time.
//!
//! On any log error the actor closes the link and stops: the edge reconnects
//! with backoff, and learns the mark again from the shard, whose writer was
//! fenced and opened anew. Transactions make that safe; retrying in place
//! would not be simpler once a producer is in an unknown state.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tributary_cluster::uplink::link::{AcceptedUplink, LinkError, LinkHandle};
use tributary_cluster::uplink::{CommitBatch, Frame, Ingest, IngestConfig, RefuseCode};

use super::shard::{Pending, ShardMsg};
use super::CloudCounters;
use crate::outbox::segment;
use crate::sink::{EdgeCommit, Hwm, RefusedReading, SegmentBatch, SinkCalls, SinkError};

/// Close code when the cloud gives up on a link (protocol error or log down).
const CLOSE_PROTOCOL: u32 = 1;
/// Close code of an orderly end.
const CLOSE_SHUTDOWN: u32 = 0;
/// How long the last frames (a Refuse) may take to leave before the close.
const CLOSE_DRAIN: std::time::Duration = std::time::Duration::from_secs(1);

pub struct IngestArgs {
    pub uplink: Box<AcceptedUplink>,
    /// What this edge may send.
    pub admission: super::admit::EdgeAdmission,
    /// The log shard of this edge.
    pub shard: ActorRef<ShardMsg>,
    pub core: IngestConfig,
    pub counters: Arc<CloudCounters>,
}

pub enum IngestMsg {
    Frame(Frame),
    LinkDown(String),
    /// The edge sent bytes that are not a valid frame.
    Malformed(String),
    /// The shard's answer: the edge's mark in the log.
    Recovered(Result<Option<Hwm>, SinkError>),
    /// The shard's answer to the commit in flight: readings committed.
    Committed(Result<u64, SinkError>),
    /// Another cloud node took this edge's shard (its writer fenced this
    /// one's): the link closes, and the edge reconnects to whichever cloud
    /// node it prefers now.
    ShardMoved(String),
}

impl ractor::Message for IngestMsg {}

#[derive(Clone, Default)]
pub struct IngestActor;

pub struct IngestState {
    edge_id: String,
    core: Ingest,
    shard: ActorRef<ShardMsg>,
    /// Whether the mark is known, so commits may start.
    recovered: bool,
    /// The commit the shard has, until it answers.
    committing: Option<CommitBatch>,
    /// `None` once stopping: dropping it lets the writer finish what is queued.
    tx: Option<mpsc::Sender<Frame>>,
    handle: LinkHandle,
    write_task: Option<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
    /// Why the cloud closes the link, once it decided to.
    closing: Option<(u32, String)>,
    counters: Arc<CloudCounters>,
    admission: super::admit::EdgeAdmission,
    /// When a refusal was last logged, so a flood logs once per interval.
    refused_logged_at: Option<std::time::Instant>,
}

/// At most one log line per interval about refused readings; the counter
/// has every one.
const REFUSED_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

impl IngestState {
    /// Closes the link after the frames already queued (a Refuse, most
    /// often) are written, so the edge learns why.
    fn fail(&mut self, myself: &ActorRef<IngestMsg>, reason: String) {
        tracing::warn!(edge = %self.edge_id, %reason, "closing the edge's link");
        self.flush_transmit();
        self.closing = Some((CLOSE_PROTOCOL, reason.clone()));
        myself.stop(Some(reason));
    }

    fn flush_transmit(&mut self) {
        let Some(tx) = &self.tx else { return };
        while let Some(frame) = self.core.poll_transmit() {
            // Sized for the window plus control frames; a full channel means
            // the edge stopped reading, and the link is closed anyway.
            if tx.try_send(frame).is_err() {
                break;
            }
        }
    }

    /// Splits a segment's readings into those admitted and those refused.
    fn admit(&mut self, seq: u64, readings: Vec<crate::reading::Reading>) -> SegmentBatch {
        let mut batch = SegmentBatch::new(seq, Vec::with_capacity(readings.len()));
        for reading in readings {
            match self.admission.check(&reading) {
                Ok(()) => batch.readings.push(reading),
                Err(reason) => batch.refused.push(RefusedReading { reading, reason }),
            }
        }
        if let Some(first) = batch.refused.first() {
            let total = self.counters.readings_refused.fetch_add(
                batch.refused.len() as u64,
                std::sync::atomic::Ordering::Relaxed,
            ) + batch.refused.len() as u64;
            let due = self
                .refused_logged_at
                .is_none_or(|t| t.elapsed() >= REFUSED_LOG_INTERVAL);
            if due {
                self.refused_logged_at = Some(std::time::Instant::now());
                tracing::warn!(edge = %self.edge_id, seq, refused = batch.refused.len(), total, reason = %first.reason, "readings refused; they go to the refused topic");
            }
        }
        batch
    }

    fn pump(&mut self, myself: &ActorRef<IngestMsg>) {
        self.flush_transmit();
        if self.committing.is_some() || !self.recovered || self.closing.is_some() {
            return;
        }
        let Some(batch) = self.core.poll_commit() else {
            return;
        };
        let mut batches = Vec::with_capacity(batch.segments.len());
        for seg in &batch.segments {
            match segment::decode_payload(&seg.bytes, seg.readings_count) {
                Ok(readings) => batches.push(self.admit(seg.seq, readings)),
                Err(e) => {
                    self.counters
                        .segments_malformed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.fail(myself, format!("segment {} does not decode: {e}", seg.seq));
                    return;
                }
            }
        }
        let pending = Pending {
            commit: EdgeCommit {
                edge_id: self.edge_id.clone(),
                hwm: Hwm {
                    epoch: batch.epoch,
                    seq: batch.seq_through,
                },
                batches,
            },
            segments: batch.segments.len(),
            reply: myself.clone(),
        };
        self.committing = Some(batch);
        if self.shard.send_message(ShardMsg::Commit(pending)).is_err() {
            self.fail(myself, "the log shard is gone".into());
        }
    }
}

/// Runs a sink call where it belongs and sends its answer to `me`: on a
/// blocking thread for a real broker; inline for a simulated log, so that
/// its effect happens at the same simulated instant on every replay, with the
/// answer delivered after the log's simulated round trip.
pub(super) fn run_sink<M: ractor::Message>(
    calls: SinkCalls,
    me: ActorRef<M>,
    f: impl FnOnce() -> M + Send + 'static,
) {
    match calls {
        SinkCalls::Blocking => {
            tokio::task::spawn_blocking(move || {
                let _ = me.send_message(f());
            });
        }
        SinkCalls::Inline { answer_after } if answer_after.is_zero() => {
            let _ = me.send_message(f());
        }
        SinkCalls::Inline { answer_after } => {
            let msg = f();
            tokio::spawn(async move {
                tokio::time::sleep(answer_after).await;
                let _ = me.send_message(msg);
            });
        }
    }
}

impl Actor for IngestActor {
    type Msg = IngestMsg;
    type State = IngestState;
    type Arguments = IngestArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<IngestMsg>,
        args: IngestArgs,
    ) -> Result<IngestState, ActorProcessingErr> {
        let up = *args.uplink;
        let edge_id = up.edge_id.to_string();
        let core = Ingest::new(args.core.clone(), edge_id.clone(), up.epoch);
        let (tx, mut rx) = mpsc::channel::<Frame>(args.core.pending_segments_max + 8);
        let mut writer = up.writer;
        let mut reader = up.reader;
        let me = myself.clone();
        let write_task = tokio::spawn(async move {
            while let Some(frame) = rx.recv().await {
                if let Err(e) = writer.send(&frame).await {
                    let _ = me.send_message(IngestMsg::LinkDown(e.to_string()));
                    return;
                }
            }
        });
        let me = myself.clone();
        let read_task = tokio::spawn(async move {
            loop {
                let msg = match reader.recv().await {
                    Ok(Some(frame)) => IngestMsg::Frame(frame),
                    Ok(None) => IngestMsg::LinkDown("the edge closed the uplink".into()),
                    Err(e @ (LinkError::Malformed(_) | LinkError::Truncated)) => {
                        IngestMsg::Malformed(e.to_string())
                    }
                    Err(e) => IngestMsg::LinkDown(e.to_string()),
                };
                let last = !matches!(msg, IngestMsg::Frame(_));
                if me.send_message(msg).is_err() || last {
                    return;
                }
            }
        });
        let me = myself.clone();
        let handle = up.handle.clone();
        let watch_task = tokio::spawn(async move {
            let reason = handle.closed().await;
            let _ = me.send_message(IngestMsg::LinkDown(reason));
        });
        // The shard answers once the mark is settled (no commit of this
        // edge's previous connection still pending).
        args.shard
            .send_message(ShardMsg::Mark {
                edge_id: edge_id.clone(),
                reply: myself.clone(),
            })
            .map_err(|_| "the log shard is gone")?;
        tracing::info!(edge = %edge_id, epoch = up.epoch, next_seq = up.next_seq, peer = %up.handle.remote_address(), "edge connected");
        tracing::debug!(edge = %edge_id, labels = ?up.labels, streams = ?args.admission.streams(), "what this edge may send");
        Ok(IngestState {
            edge_id,
            core,
            shard: args.shard,
            recovered: false,
            committing: None,
            tx: Some(tx),
            handle: up.handle,
            write_task: Some(write_task),
            tasks: vec![read_task, watch_task],
            closing: None,
            counters: args.counters,
            admission: args.admission,
            refused_logged_at: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<IngestMsg>,
        msg: IngestMsg,
        state: &mut IngestState,
    ) -> Result<(), ActorProcessingErr> {
        use std::sync::atomic::Ordering::Relaxed;
        match msg {
            IngestMsg::Recovered(Ok(hwm)) => {
                state.recovered = true;
                let mark = hwm.map(|h| (h.epoch, h.seq));
                tracing::info!(edge = %state.edge_id, hwm = ?mark, "high-water mark recovered");
                if let Err(e) = state.core.handle_hwm(mark) {
                    state.fail(&myself, e.to_string());
                    return Ok(());
                }
                state.pump(&myself);
            }
            IngestMsg::Recovered(Err(e)) => {
                state.counters.log_errors.fetch_add(1, Relaxed);
                state.fail(&myself, format!("the log is unavailable: {e}"));
            }
            IngestMsg::Frame(frame) => {
                let before = state.core.duplicates();
                if let Err(e) = state.core.handle_frame(frame) {
                    state.counters.protocol_errors.fetch_add(1, Relaxed);
                    state.fail(&myself, e.to_string());
                    return Ok(());
                }
                state
                    .counters
                    .segments_duplicate
                    .fetch_add(state.core.duplicates() - before, Relaxed);
                state.pump(&myself);
            }
            IngestMsg::ShardMoved(reason) => {
                state.fail(&myself, reason);
            }
            IngestMsg::Committed(result) => {
                let Some(batch) = state.committing.take() else {
                    // A bug: the shard answers only what it was given.
                    state.fail(&myself, "a commit answer without a commit".into());
                    return Ok(());
                };
                match result {
                    Ok(readings) => {
                        state.core.handle_commit_succeeded(&batch);
                        state
                            .counters
                            .readings_committed
                            .fetch_add(readings, Relaxed);
                        state
                            .counters
                            .segments_committed
                            .fetch_add(batch.segments.len() as u64, Relaxed);
                        tracing::debug!(edge = %state.edge_id, seq_through = batch.seq_through, readings, "committed");
                        state.pump(&myself);
                    }
                    Err(e) => {
                        state.core.handle_commit_failed(batch);
                        state.counters.log_errors.fetch_add(1, Relaxed);
                        state.fail(&myself, format!("the log transaction failed: {e}"));
                    }
                }
            }
            IngestMsg::LinkDown(reason) => {
                tracing::info!(edge = %state.edge_id, %reason, "edge link down");
                myself.stop(Some(reason));
            }
            IngestMsg::Malformed(reason) => {
                state.counters.protocol_errors.fetch_add(1, Relaxed);
                let reason = format!("malformed frame: {reason}");
                if let Some(tx) = &state.tx {
                    let _ = tx.try_send(Frame::Refuse {
                        code: RefuseCode::ProtocolViolation,
                        reason: reason.clone(),
                    });
                }
                state.fail(&myself, reason);
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<IngestMsg>,
        state: &mut IngestState,
    ) -> Result<(), ActorProcessingErr> {
        for t in state.tasks.drain(..) {
            t.abort();
        }
        // Let the writer send what is queued, then close, within a bound.
        state.tx = None;
        let (code, reason) = state
            .closing
            .take()
            .unwrap_or((CLOSE_SHUTDOWN, "ingest stopped".into()));
        let (write_task, handle) = (state.write_task.take(), state.handle.clone());
        tokio::spawn(async move {
            if let Some(t) = write_task {
                if tokio::time::timeout(CLOSE_DRAIN, t).await.is_err() {
                    tracing::debug!("the edge did not take the last frames in time");
                }
            }
            handle.close(code, &reason);
        });
        Ok(())
    }
}

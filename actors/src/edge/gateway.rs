//! The gateway actor: the one owner of the edge's outbox.
//!
//! It admits readings from device actors (and, later, MQTT sources), commits
//! segments on the outbox's schedule, answers each source only after its
//! segment is synced, serves the uplink's reads and deletes what the cloud
//! acknowledged. It is a thin driver around [`Outbox`].

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tributary_cluster::uplink::{ReadRequest, SegmentFrame};

use super::uplink::UplinkMsg;
use super::UPLINK_NAME;
use crate::outbox::Outbox;
use crate::outbox::{Committed, OutboxConfig, OutboxStats, OutboxStore, Refusal, StoreError};
use crate::reading::Reading;

/// How many devices the gateway remembers the last accepted reading of, to
/// recognise a source's retry of a reading it already accepted.
const DEVICES_TRACKED_MAX: usize = 100_000;

/// The answer to a source.
#[derive(Debug, Clone, PartialEq)]
pub enum IngestReply {
    /// The reading is durably in the outbox, in segment `seq`.
    Committed { seq: u64 },
    /// The same reading was accepted before (a retry); nothing was added.
    Duplicate,
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
}

pub enum GatewayMsg {
    Ingest(Reading, RpcReplyPort<IngestReply>),
    CommitDue { generation: u64 },
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

pub struct GatewayState {
    outbox: Outbox<RpcReplyPort<IngestReply>>,
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
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

impl GatewayState {
    fn status(&self) -> GatewayStatus {
        GatewayStatus {
            epoch: self.outbox.epoch(),
            sealed_through: self.outbox.sealed_through(),
            acked_through: self.outbox.acked_through(),
            bytes_used: self.outbox.bytes_used(),
            segments_stored: self.outbox.segments_stored(),
            stats: self.outbox.stats().clone(),
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
                    let _ = t.send(IngestReply::Committed { seq });
                }
                if let Some(uplink) = ractor::registry::where_is(UPLINK_NAME) {
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

    fn arm_timer(&mut self, myself: &ActorRef<GatewayMsg>, after: std::time::Duration) {
        self.timer_generation += 1;
        self.timer_armed = true;
        let generation = self.timer_generation;
        myself.send_after(after, move || GatewayMsg::CommitDue { generation });
    }
}

impl Actor for Gateway {
    type Msg = GatewayMsg;
    type State = GatewayState;
    type Arguments = GatewayArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<GatewayMsg>,
        args: GatewayArgs,
    ) -> Result<GatewayState, ActorProcessingErr> {
        let store = (args.store)()?;
        // The epoch of a new outbox is its creation time, so that a newer
        // outbox always has a larger epoch than an older one.
        let (outbox, rec) = Outbox::open(store, args.outbox, now_us() as u64)?;
        tracing::info!(
            epoch = rec.epoch,
            sealed_through = rec.sealed_through,
            segments = rec.segments,
            bytes = rec.bytes,
            quarantined = rec.quarantined,
            "outbox opened"
        );
        let ack_log = match &args.ack_log {
            Some(p) => Some(std::io::BufWriter::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| format!("opening the ack log {}: {e}", p.display()))?,
            )),
            None => None,
        };
        Ok(GatewayState {
            outbox,
            ack_log,
            admitted_ts: HashMap::new(),
            committed_ts: HashMap::new(),
            waiting: HashMap::new(),
            timer_generation: 0,
            timer_armed: false,
            full: false,
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
                reading.edge_ts_us = now_us();
                let (device, ts) = (reading.device_id.clone(), reading.device_ts_us);
                let now = Instant::now();
                match state.outbox.handle_reading(now, reading, reply) {
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
                        let _ = reply.send(IngestReply::Full);
                    }
                    Err(Refusal::SegmentFull(_, reply)) => {
                        // The open segment waits for a commit that failed: the
                        // source retries after the next attempt.
                        let _ = reply.send(IngestReply::Full);
                    }
                    Err(Refusal::Invalid(e, reply)) => {
                        tracing::warn!(%device, error = %e, "reading refused");
                        let _ = reply.send(IngestReply::Invalid(e.to_string()));
                    }
                    Err(Refusal::TooLarge(n, reply)) => {
                        let _ = reply.send(IngestReply::Invalid(format!(
                            "reading of {n} bytes exceeds segment_bytes_max"
                        )));
                    }
                }
                state.audit_dropped();
                if state.outbox.commit_due(now) {
                    state.commit(&myself);
                } else if !state.timer_armed {
                    if let Some(deadline) = state.outbox.poll_timeout() {
                        state.arm_timer(&myself, deadline.saturating_duration_since(now));
                    }
                }
            }
            GatewayMsg::CommitDue { generation } => {
                if generation == state.timer_generation {
                    state.timer_armed = false;
                    state.commit(&myself);
                    if !state.timer_armed {
                        if let Some(deadline) = state.outbox.poll_timeout() {
                            state.arm_timer(
                                &myself,
                                deadline.saturating_duration_since(Instant::now()),
                            );
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
                let _ = (param, value);
                let _ = reply.send(Err(format!("this edge runs no stage named {stage:?}")));
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

//! The uplink actor: owns the edge's link to the cloud and drives the
//! sans-IO [`EdgeUplink`] core.
//!
//! Each connection gets a generation number; messages from the tasks of an
//! older connection are recognised and ignored, so a late frame or a late
//! "closed" can never act on the current link.

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use tributary_cluster::backoff::Backoff;
use tributary_cluster::uplink::link::{EdgeConnector, LinkHandle};
use tributary_cluster::uplink::{
    EdgeUplink, EdgeUplinkConfig, Frame, ReadRequest, RefuseCode, SegmentFrame, UplinkError,
};

use super::gateway::{GatewayMsg, GatewayStatus};
use super::EdgeNames;

/// How long the uplink waits for the gateway to answer a read.
const GATEWAY_CALL_TIMEOUT_MS: u64 = 10_000;
/// How long to wait before asking the gateway again after a failed read.
const READ_RETRY: std::time::Duration = std::time::Duration::from_millis(200);
/// Close code sent when the edge itself gives up on a link.
const CLOSE_PROTOCOL: u32 = 1;

/// Runs on each new connection, e.g. to start the cluster session on it.
pub type ConnectHook = std::sync::Arc<dyn Fn(&LinkHandle) + Send + Sync>;

#[derive(Clone)]
pub struct UplinkArgs {
    pub edge_id: String,
    pub connector: EdgeConnector,
    pub core: EdgeUplinkConfig,
    pub reconnect_backoff_initial_ms: u64,
    pub reconnect_backoff_max_ms: u64,
    /// Called with each new connection, e.g. to start the cluster session on it.
    pub on_connect: Option<ConnectHook>,
    /// Where the edge's gateway is registered.
    pub names: EdgeNames,
    /// Seeds the reconnect jitter; `None` draws one, so that edges that lost
    /// the cloud together do not redial in step. A simulation sets it to
    /// replay a run.
    pub jitter_seed: Option<u64>,
    /// While on a cloud node other than its first choice, the edge tries
    /// the ones it prefers again after this long (stretched by up to as
    /// much again, different for every edge, so that edges that failed over
    /// together do not all move back at once). 0: never.
    pub cloud_return_after_ms: u64,
}

/// What the uplink reports about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct UplinkStatus {
    pub up: bool,
    pub acked_through: u64,
    pub sealed_through: u64,
    pub inflight_segments: usize,
    pub connects: u64,
    pub segments_sent: u64,
    pub rtt_ms: Option<u64>,
    /// Whether sending is paused (an operator's action).
    pub paused: bool,
}

pub enum UplinkMsg {
    Connect,
    Connected(u64, Box<tributary_cluster::uplink::link::DialedUplink>),
    ConnectFailed(u64, String),
    /// Time to try the cloud nodes preferred to the current one.
    TryPreferred(u64),
    /// One of them answered: move to it.
    Preferred(u64),
    Frame(u64, Frame),
    LinkDown(u64, String),
    Sealed(u64),
    Timer,
    /// Drives the core again (after a failed read).
    Pump,
    SetPaused(bool),
    Status(RpcReplyPort<UplinkStatus>),
}

impl ractor::Message for UplinkMsg {}

#[derive(Clone, Default)]
pub struct Uplink;

struct Live {
    generation: u64,
    /// The cloud node's place in this edge's order of preference.
    rank: usize,
    tx: mpsc::Sender<Frame>,
    handle: LinkHandle,
    tasks: Vec<JoinHandle<()>>,
}

pub struct UplinkState {
    args: UplinkArgs,
    core: EdgeUplink,
    backoff: Backoff,
    generation: u64,
    connecting: bool,
    live: Option<Live>,
    connects: u64,
    segments_sent: u64,
    /// The rank of the cloud node whose link went down last: dialled last
    /// on the next attempt.
    last_lost: Option<usize>,
}

impl UplinkState {
    fn gateway(&self) -> Option<ActorRef<GatewayMsg>> {
        self.args.names.where_is_gateway()
    }

    fn drop_link(&mut self, reason: &str) {
        if let Some(live) = self.live.take() {
            self.last_lost = Some(live.rank);
            live.handle.close(CLOSE_PROTOCOL, reason);
            for t in live.tasks {
                t.abort();
            }
        }
        self.core.handle_link_down();
    }

    /// When to try the preferred cloud nodes again: `cloud_return_after_ms`
    /// plus a share of it that depends on the edge and the connection.
    fn return_delay(&self, generation: u64) -> Duration {
        let base = self.args.cloud_return_after_ms;
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ generation;
        for b in self.args.edge_id.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        Duration::from_millis(base + h % base.max(1))
    }

    fn schedule_connect(&mut self, myself: &ActorRef<UplinkMsg>) {
        let delay = self.backoff.next_delay();
        myself.send_after(delay, || UplinkMsg::Connect);
    }

    /// Drains the core's outputs: deletions, reads, frames, the timer.
    async fn pump(&mut self, myself: &ActorRef<UplinkMsg>) {
        if let Some(seq) = self.core.poll_delete() {
            if let Some(g) = self.gateway() {
                let _ = g.send_message(GatewayMsg::Acked(seq));
            }
        }
        while let Some(req) = self.core.poll_read() {
            match self.read(req).await {
                Some(segments) => self.core.handle_segments_read(req, segments),
                None => {
                    // Ask again shortly; the range is kept, nothing is skipped.
                    self.core.handle_read_failed(req);
                    myself.send_after(READ_RETRY, || UplinkMsg::Pump);
                    break;
                }
            }
        }
        while let Some(frame) = self.core.poll_transmit() {
            let Some(live) = &self.live else { break };
            if matches!(frame, Frame::Segment(_)) {
                self.segments_sent += 1;
            }
            // The channel holds the window plus the handshake; the core never
            // has more than that outstanding, so a full channel is a bug.
            if live.tx.try_send(frame).is_err() {
                self.drop_link("the send queue overflowed");
                self.schedule_connect(myself);
                return;
            }
        }
        if let Some(deadline) = self.core.poll_timeout() {
            myself.send_after(
                deadline.saturating_duration_since(tokio::time::Instant::now().into_std()),
                || UplinkMsg::Timer,
            );
        }
    }

    /// The cloud refused the outbox's epoch as older than the log's: the
    /// outbox moves above it if it never sent anything; otherwise the edge
    /// keeps being refused, and says why, until an operator steps in.
    async fn stale_epoch(&mut self, log_epoch: u64) {
        let Some(g) = self.gateway() else { return };
        match ractor::call_t!(
            g,
            GatewayMsg::StaleEpoch,
            GATEWAY_CALL_TIMEOUT_MS,
            log_epoch
        ) {
            Ok(Ok(epoch)) if epoch > self.core.epoch() => self.core.handle_epoch_moved(epoch),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "the cloud refuses this edge's outbox"),
            Err(e) => tracing::warn!(error = %e, "the gateway did not answer about the epoch"),
        }
    }

    /// The segments asked for, or `None` when the gateway could not answer.
    async fn read(&mut self, req: ReadRequest) -> Option<Vec<SegmentFrame>> {
        let g = self.gateway()?;
        match ractor::call_t!(g, GatewayMsg::Read, GATEWAY_CALL_TIMEOUT_MS, req) {
            Ok(Ok(segments)) => Some(segments),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "reading segments from the outbox failed");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "the gateway did not answer a read");
                None
            }
        }
    }
}

impl Actor for Uplink {
    type Msg = UplinkMsg;
    type State = UplinkState;
    type Arguments = UplinkArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<UplinkMsg>,
        args: UplinkArgs,
    ) -> Result<UplinkState, ActorProcessingErr> {
        let g = args
            .names
            .where_is_gateway()
            .ok_or("the gateway is not running")?;
        let status: GatewayStatus =
            ractor::call_t!(g, GatewayMsg::Status, GATEWAY_CALL_TIMEOUT_MS)?;
        let core = EdgeUplink::new(
            args.core.clone(),
            args.edge_id.clone(),
            status.epoch,
            status.acked_through,
            status.sealed_through,
        );
        let seed = args.jitter_seed.unwrap_or_else(rand::random::<u64>);
        let backoff = Backoff::new(
            args.reconnect_backoff_initial_ms,
            args.reconnect_backoff_max_ms,
            seed,
        );
        myself.send_message(UplinkMsg::Connect)?;
        Ok(UplinkState {
            args,
            core,
            backoff,
            generation: 0,
            connecting: false,
            live: None,
            connects: 0,
            segments_sent: 0,
            last_lost: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<UplinkMsg>,
        msg: UplinkMsg,
        state: &mut UplinkState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            UplinkMsg::Connect => {
                if state.live.is_some() || state.connecting {
                    return Ok(());
                }
                state.connecting = true;
                state.generation += 1;
                let generation = state.generation;
                let connector = state.args.connector.clone();
                let me = myself.clone();
                let last_lost = state.last_lost;
                tokio::spawn(async move {
                    let msg = match connector.connect_avoiding(last_lost).await {
                        Ok(d) => UplinkMsg::Connected(generation, Box::new(d)),
                        Err(e) => UplinkMsg::ConnectFailed(generation, e.to_string()),
                    };
                    let _ = me.send_message(msg);
                });
            }
            UplinkMsg::ConnectFailed(generation, reason) => {
                if generation == state.generation {
                    state.connecting = false;
                    tracing::warn!(cloud = %state.args.connector.cloud_addr(), %reason, "connecting to the cloud failed");
                    state.schedule_connect(&myself);
                }
            }
            UplinkMsg::Connected(generation, dialed) => {
                if generation != state.generation {
                    dialed.handle.close(0, "superseded");
                    return Ok(());
                }
                state.connecting = false;
                state.connects += 1;
                let dialed = *dialed;
                let (tx, mut rx) =
                    mpsc::channel::<Frame>(state.args.core.inflight_segments_max + 4);
                let mut writer = dialed.writer;
                let mut reader = dialed.reader;
                let me = myself.clone();
                let write_task = tokio::spawn(async move {
                    while let Some(frame) = rx.recv().await {
                        if let Err(e) = writer.send(&frame).await {
                            let _ = me.send_message(UplinkMsg::LinkDown(generation, e.to_string()));
                            return;
                        }
                    }
                });
                let me = myself.clone();
                let read_task = tokio::spawn(async move {
                    loop {
                        match reader.recv().await {
                            Ok(Some(frame)) => {
                                if me
                                    .send_message(UplinkMsg::Frame(generation, frame))
                                    .is_err()
                                {
                                    return;
                                }
                            }
                            Ok(None) => {
                                let _ = me.send_message(UplinkMsg::LinkDown(
                                    generation,
                                    "the cloud closed the uplink".into(),
                                ));
                                return;
                            }
                            Err(e) => {
                                let _ =
                                    me.send_message(UplinkMsg::LinkDown(generation, e.to_string()));
                                return;
                            }
                        }
                    }
                });
                let me = myself.clone();
                let handle = dialed.handle.clone();
                let watch_task = tokio::spawn(async move {
                    let reason = handle.closed().await;
                    let _ = me.send_message(UplinkMsg::LinkDown(generation, reason));
                });
                if let Some(hook) = &state.args.on_connect {
                    hook(&dialed.handle);
                }
                tracing::info!(cloud = %dialed.handle.remote_address(), rank = dialed.rank, "uplink connected");
                if dialed.rank > 0 && state.args.cloud_return_after_ms > 0 {
                    myself.send_after(state.return_delay(generation), move || {
                        UplinkMsg::TryPreferred(generation)
                    });
                }
                state.live = Some(Live {
                    generation,
                    rank: dialed.rank,
                    tx,
                    handle: dialed.handle,
                    tasks: vec![write_task, read_task, watch_task],
                });
                state
                    .core
                    .handle_link_up(tokio::time::Instant::now().into_std());
                state.pump(&myself).await;
            }
            UplinkMsg::TryPreferred(generation) => {
                let Some(rank) = state
                    .live
                    .as_ref()
                    .filter(|l| l.generation == generation)
                    .map(|l| l.rank)
                else {
                    return Ok(());
                };
                let connector = state.args.connector.clone();
                let me = myself.clone();
                let retry = state.return_delay(generation.wrapping_add(state.connects));
                tokio::spawn(async move {
                    let msg = match connector.probe_above(rank).await {
                        Ok(_) => UplinkMsg::Preferred(generation),
                        Err(_) => {
                            // Still away: try again later.
                            me.send_after(retry, move || UplinkMsg::TryPreferred(generation));
                            return;
                        }
                    };
                    let _ = me.send_message(msg);
                });
            }
            UplinkMsg::Preferred(generation) => {
                // The probe only shows the preferred node is back; the move is
                // an ordinary reconnect, which dials it first.
                if state.live.as_ref().map(|l| l.generation) == Some(generation) {
                    tracing::info!("a preferred cloud node answers; moving to it");
                    state.drop_link("moving to a preferred cloud node");
                    state.backoff.reset();
                    myself.send_message(UplinkMsg::Connect)?;
                }
            }
            UplinkMsg::Frame(generation, frame) => {
                if state.live.as_ref().map(|l| l.generation) != Some(generation) {
                    return Ok(());
                }
                let was_up = state.core.is_up();
                if let Err(e) = state.core.handle_frame(frame) {
                    state.drop_link(&e.to_string());
                    if let UplinkError::Refused {
                        code: RefuseCode::StaleEpoch { log_epoch },
                        ..
                    } = e
                    {
                        state.stale_epoch(log_epoch).await;
                    } else {
                        tracing::error!(error = %e, "uplink protocol error; reconnecting");
                    }
                    state.schedule_connect(&myself);
                    return Ok(());
                }
                if !was_up && state.core.is_up() {
                    state.backoff.reset();
                    tracing::info!(
                        acked_through = state.core.acked_through(),
                        sealed_through = state.core.sealed_through(),
                        "uplink streaming"
                    );
                }
                state.pump(&myself).await;
            }
            UplinkMsg::LinkDown(generation, reason) => {
                if state.live.as_ref().map(|l| l.generation) == Some(generation) {
                    tracing::warn!(%reason, "uplink down; reconnecting");
                    state.drop_link(&reason);
                    state.schedule_connect(&myself);
                }
            }
            UplinkMsg::Sealed(seq) => {
                if seq > state.core.sealed_through() {
                    state.core.handle_segment_sealed(seq);
                    state.pump(&myself).await;
                }
            }
            UplinkMsg::Timer => {
                if let Err(e) = state
                    .core
                    .handle_timeout(tokio::time::Instant::now().into_std())
                {
                    tracing::warn!(error = %e, "uplink timed out; reconnecting");
                    state.drop_link(&e.to_string());
                    state.schedule_connect(&myself);
                }
            }
            UplinkMsg::Pump => state.pump(&myself).await,
            UplinkMsg::SetPaused(paused) => {
                state.core.set_paused(paused);
                state.pump(&myself).await;
            }
            UplinkMsg::Status(reply) => {
                let _ = reply.send(UplinkStatus {
                    up: state.core.is_up(),
                    acked_through: state.core.acked_through(),
                    sealed_through: state.core.sealed_through(),
                    inflight_segments: state.core.inflight_segments(),
                    connects: state.connects,
                    segments_sent: state.segments_sent,
                    rtt_ms: state
                        .live
                        .as_ref()
                        .map(|l| l.handle.rtt().as_millis() as u64),
                    paused: state.core.is_paused(),
                });
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<UplinkMsg>,
        state: &mut UplinkState,
    ) -> Result<(), ActorProcessingErr> {
        state.drop_link("the edge is stopping");
        Ok(())
    }
}

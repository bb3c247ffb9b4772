//! The cloud node: a listener that accepts edges over QUIC, one ingest actor
//! per connected edge, and the log shards they write through. The node puts
//! it under its root supervisor with the stages and its cluster actors:
//!
//! ```text
//! tributary.cloud                  one_for_one (the node's root)
//! ├── tributary.membership.<id>    who is up (node::cluster)
//! ├── tributary.cloud.control.<id> control calls
//! ├── tributary.listener           binds the endpoint, accepts connections
//! │   ├── shard/<k> ...            `shards_count` log writers, each one
//! │   │                            transactional producer for the edges that
//! │   │                            hash to it (a failure stops the listener)
//! │   └── ingest/<edge-id> ...     one per connected edge (linked, not restarted:
//! │                                the edge reconnects, which starts a new one)
//! └── tributary.stages             the cloud stages, when the topology has any
//! ```

pub mod admit;
pub mod ingest;
pub mod shard;
pub mod stages;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::task::JoinHandle;
use tributary_cluster::net::SharedNetwork;
use tributary_cluster::quic::QuicConfig;
use tributary_cluster::tls::NodeIdentity;
use tributary_cluster::uplink::link::{
    CloudEndpoint, IncomingConnection, IncomingStream, LinkHandle, SessionStreams,
};
use tributary_cluster::uplink::IngestConfig;

use crate::sink::LogSink;
use ingest::{IngestActor, IngestArgs};
use shard::{ShardActor, ShardArgs, ShardConfig, ShardMsg};

pub const LISTENER_NAME: &str = "tributary.listener";
/// How long a stale ingest for the same edge may take to stop.
const REPLACE_TIMEOUT_MS: u64 = 10_000;
/// Handshakes in progress at once; under load, attempts must first pass a
/// stateless Retry, and past this they are refused (never queued).
const CONNECTIONS_SETTING_UP_MAX: usize = 256;
/// Authenticated connections that have not opened their first stream yet.
/// Past it, the one that has waited longest is closed: an honest edge opens
/// its stream right after its handshake, so the oldest waiting is the least
/// likely to be one, and idle connections (a stolen certificate's siege)
/// cannot keep a new one out.
pub const CONNECTIONS_AWAITING_STREAM_MAX: usize = 1024;
/// Connections one certified peer may hold at once; more are refused.
pub const CONNECTIONS_PER_PEER_MAX: usize = 4;

/// Counters of the cloud's data path; they only grow.
#[derive(Debug, Default)]
pub struct CloudCounters {
    pub connections_accepted: AtomicU64,
    pub connections_refused: AtomicU64,
    /// Connection attempts answered with a Retry (address validation) under load.
    pub connections_retried: AtomicU64,
    /// Connections closed before their first stream to make room for a newer
    /// one (see [`CONNECTIONS_AWAITING_STREAM_MAX`]).
    pub connections_evicted: AtomicU64,
    pub readings_committed: AtomicU64,
    pub segments_committed: AtomicU64,
    pub segments_duplicate: AtomicU64,
    pub segments_malformed: AtomicU64,
    /// Readings not admitted (invalid, or of a stream the edge may not send),
    /// written to the refused topic instead.
    pub readings_refused: AtomicU64,
    pub transactions: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub log_errors: AtomicU64,
    /// Shards this node gave up because another cloud node opened them.
    pub shards_moved: AtomicU64,
    /// Connections refused or closed because the registry revoked or
    /// suspended their edge.
    pub connections_revoked: AtomicU64,
    /// From each reading's device timestamp to its commit.
    pub latency: LatencyHistogram,
}

/// Buckets of a latency histogram: bucket `i` counts values up to
/// `2^i` ms; the last one counts everything above.
pub const LATENCY_BUCKETS: usize = 24;

/// A lock-free histogram of latencies in powers of two of milliseconds
/// (1 ms to about 2.3 h), cheap enough to record every committed reading.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS],
    sum_ms: AtomicU64,
}

impl LatencyHistogram {
    pub fn record_ms(&self, ms: u64) {
        let i = (u64::BITS - ms.saturating_sub(1).leading_zeros()) as usize;
        self.buckets[i.min(LATENCY_BUCKETS - 1)].fetch_add(1, Relaxed);
        self.sum_ms.fetch_add(ms, Relaxed);
    }

    /// The counts so far, per bucket (not cumulative), and the sum in ms.
    pub fn counts(&self) -> ([u64; LATENCY_BUCKETS], u64) {
        let mut out = [0; LATENCY_BUCKETS];
        for (o, b) in out.iter_mut().zip(&self.buckets) {
            *o = b.load(Relaxed);
        }
        (out, self.sum_ms.load(Relaxed))
    }

    /// The upper bound in ms of bucket `i`.
    pub fn bucket_le_ms(i: usize) -> u64 {
        1u64 << i
    }

    /// The bucket bound under which `q` (0..1) of `counts` fall, in ms.
    pub fn quantile_ms(counts: &[u64; LATENCY_BUCKETS], q: f64) -> Option<u64> {
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Self::bucket_le_ms(i));
            }
        }
        Some(Self::bucket_le_ms(LATENCY_BUCKETS - 1))
    }
}

#[derive(Clone)]
pub struct CloudArgs {
    pub listen_addr: SocketAddr,
    pub identity: NodeIdentity,
    pub quic: QuicConfig,
    pub frame_bytes_max: usize,
    pub hello_timeout_ms: u64,
    pub ingest: IngestConfig,
    pub sink: Arc<dyn LogSink>,
    /// How many log writers, and how large their transactions.
    pub shards: ShardConfig,
    /// How often the listener logs what flows; 0 turns it off.
    pub report_interval_ms: u64,
    /// Serves a cluster session stream an edge opened; without it, session
    /// streams are dropped.
    pub on_session: Option<SessionHook>,
    /// Serves a report stream an edge opened (its dashboard reports, bound
    /// to its certificate); without it, report streams are dropped.
    pub on_report: Option<ReportHook>,
    /// Which readings the cloud admits from each edge.
    pub admission: admit::Admission,
    /// Prefixes the names the ingest actors register under; empty in a node
    /// process, unique per incarnation in a simulation that runs several
    /// clouds (or restarts one) in one process.
    pub names_prefix: String,
    /// Where the listener's UDP socket comes from.
    pub network: SharedNetwork,
    /// The data path's counters, shared with whoever reports them.
    pub counters: Arc<CloudCounters>,
    /// Why an edge may not connect now (revoked, suspended), asked of every
    /// new connection by its certified id; `None` admits every certified edge.
    pub gate: Option<EdgeGate>,
}

/// The reason an edge is refused, if it is: the fleet registry's answer.
pub type EdgeGate = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Takes over a session stream, with a handle on its connection.
pub type SessionHook = Arc<dyn Fn(LinkHandle, SessionStreams) + Send + Sync>;

/// Takes over a report stream; its reader knows the certified sender.
pub type ReportHook = Arc<dyn Fn(Box<tributary_cluster::reports::ReportReader>) + Send + Sync>;

/// What a connection's streams other than the uplink are handed to.
#[derive(Clone, Default)]
struct StreamHooks {
    on_session: Option<SessionHook>,
    on_report: Option<ReportHook>,
    gate: Option<EdgeGate>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CloudStatus {
    pub listen_addr: SocketAddr,
    pub readings_committed: u64,
    pub transactions: u64,
    pub edges_connected: usize,
}

pub enum ListenerMsg {
    Incoming(Box<tributary_cluster::uplink::link::AcceptedUplink>),
    Report,
    Status(RpcReplyPort<CloudStatus>),
    /// The registry no longer admits `edge`: close its live connection.
    Refuse {
        edge: String,
        reason: String,
    },
}

impl ractor::Message for ListenerMsg {}

#[derive(Clone, Default)]
pub struct Listener;

pub struct ListenerState {
    args: CloudArgs,
    endpoint: Arc<CloudEndpoint>,
    local_addr: SocketAddr,
    accept_task: JoinHandle<()>,
    counters: Arc<CloudCounters>,
    shards: Vec<ActorRef<ShardMsg>>,
    last_reported: u64,
    /// The connection of each running ingest, by the ingest's actor id: what
    /// a refusal closes. One per connected edge.
    links: HashMap<ractor::ActorId, (String, LinkHandle)>,
}

impl ListenerState {
    /// Children are the shards and one ingest per connected edge.
    fn edges_connected(&self, myself: &ActorRef<ListenerMsg>) -> usize {
        myself
            .get_children()
            .len()
            .saturating_sub(self.shards.len())
    }
}

fn ingest_name(prefix: &str, edge: &str) -> String {
    format!("{prefix}ingest/{edge}")
}

fn shard_name(prefix: &str, shard: u32) -> String {
    format!("{prefix}shard/{shard}")
}

/// Live connections per certified peer, so that one certificate cannot take
/// every connection slot (an edge needs one, two for a moment while a new
/// connection replaces a dead one).
#[derive(Clone, Default)]
struct PerPeer(Arc<Mutex<HashMap<String, usize>>>);

/// One connection's place in [`PerPeer`], given back when it ends.
struct PeerSlot {
    table: PerPeer,
    peer: String,
}

impl PerPeer {
    fn take(&self, peer: &str) -> Option<PeerSlot> {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = t.entry(peer.to_owned()).or_default();
        if *n >= CONNECTIONS_PER_PEER_MAX {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            table: self.clone(),
            peer: peer.to_owned(),
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut t = self.table.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = t.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                t.remove(&self.peer);
            }
        }
    }
}

/// Connections waiting for their first stream, oldest first.
#[derive(Clone)]
struct AwaitingStream {
    inner: Arc<Mutex<AwaitingInner>>,
    max: usize,
}

#[derive(Default)]
struct AwaitingInner {
    next_id: u64,
    queue: std::collections::VecDeque<(u64, Arc<tokio::sync::Notify>)>,
}

/// A connection's place among those waiting; it leaves on drop.
struct AwaitingTicket {
    pool: AwaitingStream,
    id: u64,
    evicted: Arc<tokio::sync::Notify>,
}

impl AwaitingStream {
    fn new(max: usize) -> Self {
        Self {
            inner: Arc::default(),
            max,
        }
    }

    /// Takes a place, evicting the oldest waiting connection when full.
    fn enter(&self, counters: &CloudCounters) -> AwaitingTicket {
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        while t.queue.len() >= self.max {
            let Some((_, oldest)) = t.queue.pop_front() else {
                break;
            };
            // notify_one keeps the wake-up even if the waiter is not polling yet.
            oldest.notify_one();
            counters.connections_evicted.fetch_add(1, Relaxed);
        }
        t.next_id += 1;
        let id = t.next_id;
        let evicted = Arc::new(tokio::sync::Notify::new());
        t.queue.push_back((id, evicted.clone()));
        debug_assert!(t.queue.len() <= self.max);
        AwaitingTicket {
            pool: self.clone(),
            id,
            evicted,
        }
    }
}

impl Drop for AwaitingTicket {
    fn drop(&mut self) {
        let mut t = self.pool.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = t.queue.iter().position(|(id, _)| *id == self.id) {
            t.queue.remove(i);
        }
    }
}

async fn serve_connection(
    conn: IncomingConnection,
    listener: ActorRef<ListenerMsg>,
    counters: Arc<CloudCounters>,
    hooks: StreamHooks,
    awaiting: AwaitingStream,
    per_peer: PerPeer,
) {
    let peer = match conn.peer() {
        Ok((id, _)) => id.to_string(),
        Err(e) => {
            counters.connections_refused.fetch_add(1, Relaxed);
            conn.close_identity_mismatch(&e.to_string());
            return;
        }
    };
    if let Some(reason) = hooks.gate.as_ref().and_then(|gate| gate(&peer)) {
        let n = counters.connections_revoked.fetch_add(1, Relaxed) + 1;
        // An edge refused for good reconnects every backoff: say so now and then.
        if n.is_power_of_two() {
            tracing::warn!(%peer, %reason, refused = n, "refusing a connection of an edge the registry does not admit (logged at powers of two)");
        }
        conn.close_refused(&reason);
        return;
    }
    let Some(_slot) = per_peer.take(&peer) else {
        counters.connections_refused.fetch_add(1, Relaxed);
        tracing::warn!(%peer, max = CONNECTIONS_PER_PEER_MAX, "a peer holds too many connections; refusing another");
        conn.close_refused("too many connections from this peer");
        return;
    };
    let mut first = true;
    loop {
        let next = if first {
            first = false;
            let ticket = awaiting.enter(&counters);
            tokio::select! {
                next = conn.first_stream() => next,
                () = ticket.evicted.notified() => {
                    tracing::debug!(%peer, "closing a connection that opened no stream, for a newer one");
                    conn.close_refused("evicted: too many connections waiting to open a stream");
                    return;
                }
            }
        } else {
            conn.next_stream().await
        };
        match next {
            Ok(IncomingStream::Uplink(up)) => {
                counters.connections_accepted.fetch_add(1, Relaxed);
                if listener.send_message(ListenerMsg::Incoming(up)).is_err() {
                    return;
                }
            }
            Ok(IncomingStream::Report(reports)) => match &hooks.on_report {
                Some(hook) => hook(reports),
                None => {
                    tracing::debug!(peer = %reports.peer, "no report stream served here; dropped")
                }
            },
            Ok(IncomingStream::Session(streams)) => match &hooks.on_session {
                Some(hook) => hook(conn.handle(), streams),
                None => {
                    tracing::debug!(peer = %conn.remote_address(), "no cluster session served here; stream dropped")
                }
            },
            Err(e) => {
                use tributary_cluster::uplink::link::UplinkSetupError as E;
                match &e {
                    E::IdentityMismatch { .. } | E::BadEdgeId { .. } => {
                        counters.connections_refused.fetch_add(1, Relaxed);
                        tracing::warn!(peer = %conn.remote_address(), error = %e, "edge refused");
                        conn.close_identity_mismatch(&e.to_string());
                    }
                    E::Quic(_) => {
                        tracing::debug!(peer = %conn.remote_address(), error = %e, "connection ended");
                    }
                    E::FirstStreamTimeout { .. } => {
                        counters.connections_refused.fetch_add(1, Relaxed);
                        tracing::info!(%peer, error = %e, "closing an idle connection");
                        conn.close_protocol_error(&e.to_string());
                    }
                    _ => {
                        counters.protocol_errors.fetch_add(1, Relaxed);
                        tracing::warn!(peer = %conn.remote_address(), error = %e, "edge broke the protocol");
                        conn.close_protocol_error(&e.to_string());
                    }
                }
                return;
            }
        }
    }
}

impl Actor for Listener {
    type Msg = ListenerMsg;
    type State = ListenerState;
    type Arguments = CloudArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ListenerMsg>,
        args: CloudArgs,
    ) -> Result<ListenerState, ActorProcessingErr> {
        let endpoint = Arc::new(CloudEndpoint::bind_on(
            args.network.as_ref(),
            args.listen_addr,
            &args.identity,
            args.quic.clone(),
            args.frame_bytes_max,
            args.hello_timeout_ms,
        )?);
        let local_addr = endpoint.local_addr()?;
        let counters = args.counters.clone();
        if args.shards.shards_count == 0 || args.shards.transaction_segments_max == 0 {
            return Err(format!("invalid shard settings: {:?}", args.shards).into());
        }
        let mut shards = Vec::with_capacity(args.shards.shards_count as usize);
        for k in 0..args.shards.shards_count {
            let shard_args = ShardArgs {
                shard: k,
                config: args.shards,
                sink: args.sink.clone(),
                counters: counters.clone(),
            };
            let name = shard_name(&args.names_prefix, k);
            let (shard, _) =
                Actor::spawn_linked(Some(name), ShardActor, shard_args, myself.get_cell()).await?;
            shards.push(shard);
        }
        let ep = endpoint.clone();
        let me = myself.clone();
        let c = counters.clone();
        let setting_up = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_SETTING_UP_MAX));
        let hooks = StreamHooks {
            on_session: args.on_session.clone(),
            on_report: args.on_report.clone(),
            gate: args.gate.clone(),
        };
        let per_peer = PerPeer::default();
        let awaiting = AwaitingStream::new(CONNECTIONS_AWAITING_STREAM_MAX);
        let accept_task = tokio::spawn(async move {
            while let Some(pending) = ep.accept().await {
                // Bounds the connections in setup (handshake, first stream);
                // an established connection gives its permit back. Under
                // load, an attempt must prove its address first (a stateless
                // Retry costs nothing to send); with no slot left it is
                // refused rather than waited for, so the accept loop never
                // stalls behind slow or idle peers.
                let free = setting_up.available_permits();
                if free < CONNECTIONS_SETTING_UP_MAX / 2 && !pending.address_validated() {
                    c.connections_retried.fetch_add(1, Relaxed);
                    pending.retry();
                    continue;
                }
                let Ok(permit) = setting_up.clone().try_acquire_owned() else {
                    c.connections_refused.fetch_add(1, Relaxed);
                    tracing::debug!(peer = %pending.remote_address(), "every set-up slot is taken; refusing a connection");
                    pending.refuse();
                    continue;
                };
                let (me, c, hooks, pp, aw) = (
                    me.clone(),
                    c.clone(),
                    hooks.clone(),
                    per_peer.clone(),
                    awaiting.clone(),
                );
                tokio::spawn(async move {
                    let done = pending.complete().await;
                    // The slot bounds handshakes; waiting for the first
                    // stream is bounded by `awaiting`.
                    drop(permit);
                    match done {
                        Ok(conn) => serve_connection(conn, me, c, hooks, aw, pp).await,
                        Err(e) => {
                            c.connections_refused.fetch_add(1, Relaxed);
                            tracing::warn!(error = %e, "handshake refused");
                        }
                    }
                });
            }
        });
        if args.report_interval_ms > 0 {
            myself.send_interval(Duration::from_millis(args.report_interval_ms), || {
                ListenerMsg::Report
            });
        }
        tracing::info!(addr = %local_addr, "cloud listening for edges");
        Ok(ListenerState {
            args,
            endpoint,
            local_addr,
            accept_task,
            counters,
            shards,
            last_reported: 0,
            links: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<ListenerMsg>,
        msg: ListenerMsg,
        state: &mut ListenerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ListenerMsg::Incoming(up) => {
                let name = ingest_name(&state.args.names_prefix, up.edge_id.as_str());
                // A reconnecting edge may find its previous ingest still alive
                // (its link not yet timed out): stop it first, so that one
                // writer per edge exists and goes back to the pool.
                if let Some(old) = ractor::registry::where_is(name.clone()) {
                    let _ = old
                        .stop_and_wait(
                            Some("replaced by a new connection".into()),
                            Some(Duration::from_millis(REPLACE_TIMEOUT_MS)),
                        )
                        .await;
                }
                let admission = state
                    .args
                    .admission
                    .for_edge(up.edge_id.as_str(), &up.labels);
                let link = (up.edge_id.to_string(), up.handle.clone());
                let k = shard::shard_of(up.edge_id.as_str(), state.args.shards.shards_count);
                let args = IngestArgs {
                    admission,
                    uplink: up,
                    shard: state.shards[k as usize].clone(),
                    core: state.args.ingest.clone(),
                    counters: state.counters.clone(),
                };
                match Actor::spawn_linked(Some(name), IngestActor, args, myself.get_cell()).await {
                    Ok((ingest, _)) => {
                        state.links.insert(ingest.get_id(), link);
                    }
                    Err(e) => tracing::error!(error = %e, "starting an ingest failed"),
                }
            }
            ListenerMsg::Report => {
                let committed = state.counters.readings_committed.load(Relaxed);
                let delta = committed - state.last_reported;
                state.last_reported = committed;
                let edges = state.edges_connected(&myself);
                let secs = state.args.report_interval_ms as f64 / 1000.0;
                tracing::info!(
                    edges,
                    readings_committed = committed,
                    readings_per_s = (delta as f64 / secs).round(),
                    transactions = state.counters.transactions.load(Relaxed),
                    duplicates_skipped = state.counters.segments_duplicate.load(Relaxed),
                    connections_refused = state.counters.connections_refused.load(Relaxed),
                    protocol_errors = state.counters.protocol_errors.load(Relaxed),
                    log_errors = state.counters.log_errors.load(Relaxed),
                    shards_moved = state.counters.shards_moved.load(Relaxed),
                    "cloud flow"
                );
            }
            ListenerMsg::Refuse { edge, reason } => {
                for (e, link) in state.links.values() {
                    if *e == edge {
                        state.counters.connections_revoked.fetch_add(1, Relaxed);
                        tracing::warn!(%edge, %reason, "closing the connection of an edge the registry no longer admits");
                        link.close(
                            u32::try_from(tributary_cluster::quic::CLOSE_REFUSED.into_inner())
                                .unwrap_or(u32::MAX),
                            &reason,
                        );
                    }
                }
            }
            ListenerMsg::Status(reply) => {
                let _ = reply.send(CloudStatus {
                    listen_addr: state.local_addr,
                    readings_committed: state.counters.readings_committed.load(Relaxed),
                    transactions: state.counters.transactions.load(Relaxed),
                    edges_connected: state.edges_connected(&myself),
                });
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<ListenerMsg>,
        evt: SupervisionEvent,
        state: &mut ListenerState,
    ) -> Result<(), ActorProcessingErr> {
        // An ingest ends with its link; the edge reconnects and a new one
        // starts. Its failure must not take the listener down. A shard
        // never stops on its own: if one does, the listener stops too, and
        // its supervisor starts the cloud's data path afresh.
        if let SupervisionEvent::ActorTerminated(cell, ..)
        | SupervisionEvent::ActorFailed(cell, _) = &evt
        {
            state.links.remove(&cell.get_id());
        }
        let shard_ended =
            |cell: &ractor::ActorCell| state.shards.iter().any(|s| s.get_id() == cell.get_id());
        match evt {
            SupervisionEvent::ActorFailed(cell, err) if shard_ended(&cell) => {
                return Err(format!("log shard {:?} failed: {err}", cell.get_name()).into());
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) if shard_ended(&cell) => {
                return Err(format!("log shard {:?} stopped: {reason:?}", cell.get_name()).into());
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                tracing::warn!(actor = ?cell.get_name(), error = %err, "ingest failed");
            }
            _ => {}
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<ListenerMsg>,
        state: &mut ListenerState,
    ) -> Result<(), ActorProcessingErr> {
        state.accept_task.abort();
        state.endpoint.close();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_oldest_connection_waiting_for_a_stream_makes_room() {
        let counters = CloudCounters::default();
        let pool = AwaitingStream::new(2);
        let a = pool.enter(&counters);
        let b = pool.enter(&counters);
        assert_eq!(counters.connections_evicted.load(Relaxed), 0);
        let c = pool.enter(&counters);
        assert_eq!(counters.connections_evicted.load(Relaxed), 1);
        // The eviction is kept until the oldest waiter looks.
        tokio::time::timeout(Duration::from_secs(1), a.evicted.notified())
            .await
            .expect("the oldest is told to go");
        // One that left on its own (its stream came) frees its place.
        drop(b);
        let _d = pool.enter(&counters);
        assert_eq!(counters.connections_evicted.load(Relaxed), 1);
        let _e = pool.enter(&counters);
        assert_eq!(counters.connections_evicted.load(Relaxed), 2);
        tokio::time::timeout(Duration::from_secs(1), c.evicted.notified())
            .await
            .expect("then the next oldest");
        assert_eq!(pool.inner.lock().unwrap().queue.len(), 2);
    }
}

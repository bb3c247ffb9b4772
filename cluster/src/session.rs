//! The ractor_cluster session, carried on a QUIC bi-stream.
//!
//! ractor_cluster brings remote actors and process groups; QUIC brings
//! encryption, mutual authentication and liveness. This module glues them:
//!
//! - The `NodeServer` listens on 127.0.0.1 only because it must listen
//!   somewhere; sessions that do not arrive through this module (over its TCP
//!   listener) are stopped as soon as they open.
//! - A session's life is tied to its QUIC connection both ways: when the
//!   session ends (lost stream, wrong cookie, duplicate), the connection is
//!   closed so the dialer reconnects; when the connection dies, the session
//!   ends with it.
//! - ractor's node name is not bound to the certificate, so the session
//!   guard ([`crate::guard`]) reads every frame the peer sends before ractor
//!   does: a handshake naming another node never reaches ractor (where it
//!   would win an election against that node's real session), and the
//!   session ends with [`CLOSE_IDENTITY_MISMATCH`]. The guard also holds a
//!   peer to its node's [`SessionPolicy`]: the process groups it may join,
//!   how many actors it may announce. Once a session authenticates, the name
//!   is compared with the certificate once more.
//!
//! Remote actors are found through process groups (`ractor::pg`), which are
//! process-global: namespace group names.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::{Connection, RecvStream, SendStream, VarInt};
use ractor::{Actor, ActorRef};
use ractor_cluster::node::{NodeConnectionMode, NodeServerSessionInformation};
use ractor_cluster::{
    BoxRead, BoxWrite, ClusterBidiStream, NodeEventSubscription, NodeServer, NodeServerMessage,
    NodeSessionMessage,
};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::watch;

use crate::guard::{self, Guard, GuardedRead, SessionPolicy, Violation};
use crate::quic::{
    self, QuicError, StreamKind, CLOSE_IDENTITY_MISMATCH, CLOSE_PROTOCOL_ERROR,
    CLOSE_SESSION_ENDED, CLOSE_SHUTDOWN,
};
use crate::tls::{self, NodeId, Role, TlsError};

/// The host part of every ractor node name (`<id>@tributary`). Fixed, so a
/// node name is a function of the node id alone and can be checked.
pub const NODE_HOST: &str = "tributary";

/// The largest ractor frame a peer may send. Every node must use the same
/// value. ractor's own default (16 MiB) is more than control traffic needs;
/// bulk data travels on the uplink stream.
pub const SESSION_FRAME_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// Peer labels of sessions opened by this module start with this; anything
/// else came in over the NodeServer's TCP listener and is refused.
const LABEL_PREFIX: &str = "quic/";

const REFUSE_TCP_SUBSCRIPTION_ID: &str = "tributary.session.refuse-tcp";

/// The ractor node name of node `id`.
pub fn ractor_node_name(id: &NodeId) -> String {
    format!("{id}@{NODE_HOST}")
}

/// The registry name of node `id`'s NodeServer actor. The registry is
/// process-global, so the name carries the id: two nodes can share a process.
pub fn node_server_actor_name(id: &NodeId) -> String {
    format!("{NODE_SERVER_PREFIX}{id}")
}

const NODE_SERVER_PREFIX: &str = "tributary.node_server.";

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("spawn the ractor NodeServer {name}: {reason}")]
    Spawn { name: String, reason: String },
    #[error("message the NodeServer (is it stopped?): {0}")]
    NodeServerGone(String),
    #[error("identify the peer from its certificate: {0}")]
    PeerIdentity(#[from] TlsError),
    #[error("open the session stream: {0}")]
    Stream(#[from] QuicError),
    #[error("the session with {peer} did not authenticate within {timeout_ms} ms")]
    AuthTimeout { peer: NodeId, timeout_ms: u64 },
    #[error(
        "the session with {peer} did not exchange its actors and groups within {timeout_ms} ms"
    )]
    ReadyTimeout { peer: NodeId, timeout_ms: u64 },
    #[error("the session with {peer} ended before it authenticated: {end}")]
    Ended { peer: NodeId, end: SessionEnd },
}

/// Why a session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// The ractor session stopped or its stream ended: the link was lost, the
    /// cookie was wrong, or a newer session with the same peer won.
    Stopped,
    /// The QUIC connection closed first, for this reason.
    ConnectionClosed(String),
    /// The ractor node name the peer presented is not the one in its certificate.
    IdentityMismatch { expected: String, presented: String },
    /// The peer did what its node's session policy forbids.
    PolicyViolation(String),
    /// [`SessionHandle::close`] was called.
    LocalClose,
}

impl fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionEnd::Stopped => f.write_str("the ractor session stopped"),
            SessionEnd::ConnectionClosed(why) => write!(f, "the QUIC connection closed: {why}"),
            SessionEnd::IdentityMismatch { expected, presented } => write!(
                f,
                "the peer presented ractor node name {presented:?}, its certificate says {expected:?}"
            ),
            SessionEnd::PolicyViolation(why) => write!(f, "refused by the session guard: {why}"),
            SessionEnd::LocalClose => f.write_str("closed locally"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionState {
    /// The stream is open; ractor's cookie handshake is under way.
    Opening,
    /// The cookie handshake passed and the node name matches the certificate.
    Authenticated,
    /// Authenticated, and the initial actor and process-group exchange is done.
    Ready,
    Ended(SessionEnd),
}

/// A QUIC bi-stream as ractor_cluster's transport.
pub struct QuicBidiStream {
    pub send: SendStream,
    pub recv: RecvStream,
    pub peer_label: String,
    /// Ends the session when ractor drops the read half (pitfall: a dead
    /// session otherwise leaves its connection open, kept up by keep-alives),
    /// and guards what ractor reads.
    on_read_drop: Option<(Arc<SessionShared>, Guard)>,
}

impl QuicBidiStream {
    /// A bare stream, not tied to any session bookkeeping. Sessions opened by
    /// [`dial_session`] and [`accept_session`] tie the stream to their connection.
    pub fn new(send: SendStream, recv: RecvStream, peer_label: String) -> Self {
        Self {
            send,
            recv,
            peer_label,
            on_read_drop: None,
        }
    }
}

impl fmt::Debug for QuicBidiStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicBidiStream")
            .field("peer_label", &self.peer_label)
            .finish()
    }
}

impl ClusterBidiStream for QuicBidiStream {
    fn split(self: Box<Self>) -> (BoxRead, BoxWrite) {
        let this = *self;
        let read: BoxRead = match this.on_read_drop {
            Some((shared, guard)) => {
                let s = shared.clone();
                let on_violation = Box::new(move |v: Violation| {
                    tracing::warn!(label = %s.label, violation = %v, "the session guard ends a session");
                    let end = match v {
                        Violation::Name {
                            expected,
                            presented,
                        } => SessionEnd::IdentityMismatch {
                            expected,
                            presented,
                        },
                        other => SessionEnd::PolicyViolation(other.to_string()),
                    };
                    s.end(end);
                });
                Box::new(GuardedRecv {
                    recv: GuardedRead::new(this.recv, guard, on_violation),
                    shared,
                })
            }
            None => Box::new(this.recv),
        };
        (read, Box::new(this.send))
    }

    fn peer_label(&self) -> Option<String> {
        Some(self.peer_label.clone())
    }
}

struct GuardedRecv {
    recv: GuardedRead<RecvStream>,
    shared: Arc<SessionShared>,
}

impl AsyncRead for GuardedRecv {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().recv).poll_read(cx, buf)
    }
}

impl Drop for GuardedRecv {
    fn drop(&mut self) {
        self.shared.end(SessionEnd::Stopped);
    }
}

/// What a session's stream, its event subscription, its connection watcher
/// and its handle share. Whichever notices the end first ends it for all.
struct SessionShared {
    label: String,
    /// The peer's id, from its certificate.
    peer: NodeId,
    expected_name: String,
    conn: Connection,
    state: watch::Sender<SessionState>,
    node_server: ActorRef<NodeServerMessage>,
    session_actor: Mutex<Option<ActorRef<NodeSessionMessage>>>,
}

impl SessionShared {
    fn end(&self, end: SessionEnd) {
        let first = self.state.send_if_modified(|state| {
            if matches!(state, SessionState::Ended(_)) {
                false
            } else {
                *state = SessionState::Ended(end.clone());
                true
            }
        });
        if !first {
            return;
        }
        tracing::info!(label = %self.label, "session ended: {end}");
        let (code, reason): (VarInt, &[u8]) = match end {
            SessionEnd::IdentityMismatch { .. } => (
                CLOSE_IDENTITY_MISMATCH,
                b"ractor node name does not match the certificate",
            ),
            SessionEnd::PolicyViolation(_) => {
                (CLOSE_PROTOCOL_ERROR, b"refused by the session guard")
            }
            SessionEnd::LocalClose => (CLOSE_SHUTDOWN, b"session closed"),
            SessionEnd::Stopped | SessionEnd::ConnectionClosed(_) => {
                (CLOSE_SESSION_ENDED, b"session ended")
            }
        };
        // Closing an already closed connection would replace the peer's
        // reason, which others awaiting `closed()` should see.
        if self.conn.close_reason().is_none() {
            self.conn.close(code, reason);
        }
        // Kept, not taken: SessionCloser::close_and_wait waits on it.
        let actor = self.session_actor.lock().ok().and_then(|a| a.clone());
        if let Some(actor) = actor {
            actor.stop(Some(format!("tributary: {end}")));
        }
        // Runs inside the NodeServer's handler when called from a callback;
        // a cast only queues, so this cannot deadlock.
        let _ = self
            .node_server
            .cast(NodeServerMessage::UnsubscribeToEvents(self.label.clone()));
    }

    fn advance(&self, to: SessionState) {
        self.state.send_if_modified(|state| {
            let forward = matches!(
                (&*state, &to),
                (
                    SessionState::Opening,
                    SessionState::Authenticated | SessionState::Ready
                ) | (SessionState::Authenticated, SessionState::Ready)
            );
            if forward {
                *state = to.clone();
            }
            forward
        });
    }
}

fn certified() -> &'static Mutex<std::collections::HashMap<u64, NodeId>> {
    static C: std::sync::OnceLock<Mutex<std::collections::HashMap<u64, NodeId>>> =
        std::sync::OnceLock::new();
    C.get_or_init(Default::default)
}

/// The certified id of the peer behind ractor node `ractor_node` (the node
/// part of a remote actor's id), while its session lives: what an actor
/// found in a process group is trusted as, whatever it claims.
pub fn certified_peer(ractor_node: u64) -> Option<NodeId> {
    certified().lock().ok()?.get(&ractor_node).cloned()
}

/// Follows one session through the NodeServer's events, matched by label.
struct SessionWatch(Arc<SessionShared>);

impl NodeEventSubscription for SessionWatch {
    fn node_session_opened(&self, ses: NodeServerSessionInformation) {
        if ses.peer_addr != self.0.label {
            return;
        }
        if let Ok(mut c) = certified().lock() {
            c.insert(ses.node_id, self.0.peer.clone());
        }
        if let Ok(mut actor) = self.0.session_actor.lock() {
            *actor = Some(ses.actor);
        }
    }

    fn node_session_authenticated(&self, ses: NodeServerSessionInformation) {
        if ses.peer_addr != self.0.label {
            return;
        }
        let presented = ses.peer_name.map(|name| name.name).unwrap_or_default();
        if presented == self.0.expected_name {
            self.0.advance(SessionState::Authenticated);
        } else {
            // This callback runs before the session is told it won the
            // election, so stopping it here (and closing the connection, which
            // cuts its stream) keeps the impostor's actors out of our groups.
            tracing::warn!(
                label = %self.0.label,
                expected = %self.0.expected_name,
                %presented,
                "ractor node name does not match the peer certificate; dropping the session"
            );
            if let Ok(mut actor) = self.0.session_actor.lock() {
                actor.get_or_insert(ses.actor);
            }
            self.0.end(SessionEnd::IdentityMismatch {
                expected: self.0.expected_name.clone(),
                presented,
            });
        }
    }

    fn node_session_ready(&self, ses: NodeServerSessionInformation) {
        if ses.peer_addr == self.0.label {
            self.0.advance(SessionState::Ready);
        }
    }

    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        if ses.peer_addr == self.0.label {
            if let Ok(mut c) = certified().lock() {
                c.remove(&ses.node_id);
            }
            self.0.end(SessionEnd::Stopped);
        }
    }
}

/// Stops sessions that did not come through this module: they arrived over
/// the NodeServer's TCP listener, without TLS or a certificate.
struct RefuseTcpSessions;

impl NodeEventSubscription for RefuseTcpSessions {
    fn node_session_opened(&self, ses: NodeServerSessionInformation) {
        if !ses.peer_addr.starts_with(LABEL_PREFIX) {
            tracing::warn!(peer = %ses.peer_addr, "refusing a ractor session that did not come over QUIC");
            ses.actor
                .stop(Some("tributary: sessions must come over QUIC".to_string()));
        }
    }
    fn node_session_disconnected(&self, _: NodeServerSessionInformation) {}
    fn node_session_authenticated(&self, _: NodeServerSessionInformation) {}
}

/// Spawns node `id`'s ractor NodeServer. Its TCP listener is bound to
/// 127.0.0.1 on a random port and refuses every session; sessions come over
/// QUIC through [`dial_session`] and [`accept_session`]. Isolated mode, since
/// transitive mode would dial peers over TCP.
pub async fn start_node_server(
    id: &NodeId,
    cookie: String,
) -> Result<ActorRef<NodeServerMessage>, SessionError> {
    let server = NodeServer::new(
        0,
        cookie,
        id.to_string(),
        NODE_HOST.to_string(),
        None,
        Some(NodeConnectionMode::Isolated),
    )
    .with_listen_addr(IpAddr::V4(Ipv4Addr::LOCALHOST))
    .with_max_inbound_frame_size(SESSION_FRAME_BYTES_MAX);
    let name = node_server_actor_name(id);
    let (actor, _join) = Actor::spawn(Some(name.clone()), server, ())
        .await
        .map_err(|e| SessionError::Spawn {
            name,
            reason: e.to_string(),
        })?;
    actor
        .cast(NodeServerMessage::SubscribeToEvents {
            id: REFUSE_TCP_SUBSCRIPTION_ID.to_string(),
            subscription: Box::new(RefuseTcpSessions),
        })
        .map_err(|e| SessionError::NodeServerGone(e.to_string()))?;
    Ok(actor)
}

/// A running session. Dropping the handle does not end the session; the
/// session keeps its connection alive until either ends.
pub struct SessionHandle {
    peer: NodeId,
    peer_role: Role,
    state: watch::Receiver<SessionState>,
    shared: Arc<SessionShared>,
}

impl fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionHandle")
            .field("peer", &self.peer)
            .field("peer_role", &self.peer_role)
            .field("label", &self.shared.label)
            .field("state", &*self.state.borrow())
            .finish()
    }
}

impl SessionHandle {
    /// The peer's id, from its certificate.
    pub fn peer(&self) -> &NodeId {
        &self.peer
    }

    pub fn peer_role(&self) -> Role {
        self.peer_role
    }

    /// The ractor node name the peer must present: [`ractor_node_name`] of [`Self::peer`].
    pub fn peer_node_name(&self) -> &str {
        &self.shared.expected_name
    }

    pub fn state(&self) -> SessionState {
        self.state.borrow().clone()
    }

    pub fn connection(&self) -> &Connection {
        &self.shared.conn
    }

    /// Waits until the session is authenticated and its peer's name checked.
    pub async fn authenticated(&mut self, timeout: Duration) -> Result<(), SessionError> {
        self.wait_past(
            timeout,
            |s| !matches!(s, SessionState::Opening),
            |peer, timeout_ms| SessionError::AuthTimeout { peer, timeout_ms },
        )
        .await
    }

    /// Waits until the session is ready: authenticated, and the peer's actors
    /// and process groups are known here, so its group members can be called.
    pub async fn ready(&mut self, timeout: Duration) -> Result<(), SessionError> {
        self.wait_past(
            timeout,
            |s| matches!(s, SessionState::Ready | SessionState::Ended(_)),
            |peer, timeout_ms| SessionError::ReadyTimeout { peer, timeout_ms },
        )
        .await
    }

    /// Waits until the state satisfies `reached`; an ended session is an error.
    async fn wait_past(
        &mut self,
        timeout: Duration,
        reached: impl FnMut(&SessionState) -> bool,
        timed_out: impl FnOnce(NodeId, u64) -> SessionError,
    ) -> Result<(), SessionError> {
        let state = match tokio::time::timeout(timeout, self.state.wait_for(reached)).await {
            Err(_) => {
                let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
                return Err(timed_out(self.peer.clone(), timeout_ms));
            }
            Ok(Ok(state)) => state.clone(),
            // The sender lives in `shared`, which this handle holds.
            Ok(Err(_)) => SessionState::Ended(SessionEnd::Stopped),
        };
        match state {
            SessionState::Ended(end) => Err(SessionError::Ended {
                peer: self.peer.clone(),
                end,
            }),
            _ => Ok(()),
        }
    }

    /// A handle that can end this session from elsewhere, e.g. when a newer
    /// session with the same peer replaces it.
    pub fn closer(&self) -> SessionCloser {
        SessionCloser(self.shared.clone())
    }

    /// Resolves when the session has ended, with the reason.
    pub async fn ended(&mut self) -> SessionEnd {
        match self
            .state
            .wait_for(|s| matches!(s, SessionState::Ended(_)))
            .await
        {
            Ok(state) => match &*state {
                SessionState::Ended(end) => end.clone(),
                _ => SessionEnd::Stopped,
            },
            Err(_) => SessionEnd::Stopped,
        }
    }

    /// Ends the session and closes its connection.
    pub fn close(&self) {
        self.shared.end(SessionEnd::LocalClose);
    }
}

/// Ends a session without owning its [`SessionHandle`]. Cheap to clone.
#[derive(Clone)]
pub struct SessionCloser(Arc<SessionShared>);

impl fmt::Debug for SessionCloser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SessionCloser").field(&self.0.label).finish()
    }
}

impl SessionCloser {
    /// Ends the session, closes its connection, and waits up to `timeout`
    /// for its ractor session actor to be gone. Returns whether it is gone.
    ///
    /// Waiting matters before a new session with the same peer is handed to
    /// the NodeServer: while the old one is registered there, ractor elects
    /// one of the two, and the loser may be the new one.
    pub async fn close_and_wait(&self, timeout: Duration) -> bool {
        let actor = self.0.session_actor.lock().ok().and_then(|a| a.clone());
        self.0.end(SessionEnd::LocalClose);
        match actor {
            Some(actor) => actor.wait(Some(timeout)).await.is_ok(),
            None => true,
        }
    }
}

/// The id and role of the peer of `link`, from its certificate: known before
/// any session on it starts.
pub fn peer_of(link: &crate::uplink::link::LinkHandle) -> Result<(NodeId, Role), SessionError> {
    Ok(tls::peer_identity(&quic::peer_certificates(
        link.connection(),
    ))?)
}

/// Derives `ractor::Message` for an enum that crosses the session (remote
/// casts and `#[rpc]` calls), so crates above need not know ractor_cluster.
pub use ractor_cluster::RactorClusterMessage;

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// Sets up the bookkeeping of a session on `conn` and returns its handle and
/// the stream to hand to ractor. Must run inside a tokio runtime.
fn prepare(
    node_server: &ActorRef<NodeServerMessage>,
    conn: &Connection,
    send: SendStream,
    recv: RecvStream,
) -> Result<(SessionHandle, QuicBidiStream), SessionError> {
    let (peer, peer_role) = tls::peer_identity(&quic::peer_certificates(conn))?;
    let local = node_server
        .get_name()
        .and_then(|n| n.strip_prefix(NODE_SERVER_PREFIX).map(str::to_owned))
        .unwrap_or_default();
    let policy: SessionPolicy = guard::policy_of(&local);
    let n = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
    let label = format!("{LABEL_PREFIX}{n}/{peer}@{}", conn.remote_address());
    let (state_tx, state_rx) = watch::channel(SessionState::Opening);
    let shared = Arc::new(SessionShared {
        label: label.clone(),
        peer: peer.clone(),
        expected_name: ractor_node_name(&peer),
        conn: conn.clone(),
        state: state_tx,
        node_server: node_server.clone(),
        session_actor: Mutex::new(None),
    });
    // Subscribe before the stream reaches the NodeServer: both are casts to
    // one mailbox, so the subscription sees the session's first event.
    node_server
        .cast(NodeServerMessage::SubscribeToEvents {
            id: label.clone(),
            subscription: Box::new(SessionWatch(shared.clone())),
        })
        .map_err(|e| SessionError::NodeServerGone(e.to_string()))?;
    let watcher = shared.clone();
    tokio::spawn(async move {
        let why = watcher.conn.closed().await;
        watcher.end(SessionEnd::ConnectionClosed(why.to_string()));
    });
    let guard = Guard::new(
        ractor_node_name(&peer),
        peer.clone(),
        peer_role,
        policy,
        SESSION_FRAME_BYTES_MAX,
    );
    let stream = QuicBidiStream {
        send,
        recv,
        peer_label: label,
        on_read_drop: Some((shared.clone(), guard)),
    };
    let handle = SessionHandle {
        peer,
        peer_role,
        state: state_rx,
        shared,
    };
    Ok((handle, stream))
}

/// Opens a session stream on `conn` and starts the ractor session as its
/// client. The peer's identity comes from its certificate.
pub async fn dial_session(
    node_server: &ActorRef<NodeServerMessage>,
    conn: &Connection,
) -> Result<SessionHandle, SessionError> {
    let (send, recv) = quic::open_stream(conn, StreamKind::Session).await?;
    let (handle, stream) = prepare(node_server, conn, send, recv)?;
    ractor_cluster::client_connect_external(node_server, Box::new(stream))
        .await
        .map_err(|e| {
            // The stream was dropped with the failed message, which ended the session.
            SessionError::NodeServerGone(e.to_string())
        })?;
    Ok(handle)
}

/// Starts the ractor session, as its server, on a stream the peer opened on
/// `conn` with [`StreamKind::Session`] (kind byte already read, as by
/// [`quic::accept_stream`]).
pub async fn accept_session(
    node_server: &ActorRef<NodeServerMessage>,
    conn: &Connection,
    send: SendStream,
    recv: RecvStream,
) -> Result<SessionHandle, SessionError> {
    let (handle, stream) = prepare(node_server, conn, send, recv)?;
    node_server
        .cast(NodeServerMessage::ConnectionOpenedExternal {
            stream: Box::new(stream),
            is_server: true,
        })
        .map_err(|e| SessionError::NodeServerGone(e.to_string()))?;
    Ok(handle)
}

/// A handle on a node's NodeServer, for crates that do not know ractor_cluster.
pub type NodeServerRef = ActorRef<NodeServerMessage>;

/// Dials the ractor session over the connection that carries an uplink.
pub async fn dial_session_on(
    node_server: &NodeServerRef,
    link: &crate::uplink::link::LinkHandle,
) -> Result<SessionHandle, SessionError> {
    dial_session(node_server, link.connection()).await
}

/// Accepts the ractor session the peer opened on `link`'s connection.
pub async fn accept_session_on(
    node_server: &NodeServerRef,
    link: &crate::uplink::link::LinkHandle,
    streams: crate::uplink::link::SessionStreams,
) -> Result<SessionHandle, SessionError> {
    accept_session(node_server, link.connection(), streams.send, streams.recv).await
}

//! The ractor cluster across nodes: each node runs a NodeServer, and every
//! edge-to-cloud QUIC connection also carries a ractor_cluster session (the
//! uplink has its own stream beside it).
//!
//! - [`membership`]: who is up, since when, at what round-trip time.
//! - [`control`]: control calls with timeouts, cloud to edge, through the
//!   edges' control actors found in process groups.
//!
//! Control messages ride the session; readings never do (casts queued
//! before a disconnect are lost, so the durable path has its own protocol).
//! A new session with a peer first ends the peer's previous one and waits
//! for it to be gone, so ractor never has two sessions to elect between
//! (its election may keep the stale one).

pub(crate) mod control;
mod membership;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::ActorRef;
use tokio::sync::watch;
use tributary_actors::cloud::SessionHook;
use tributary_actors::supervision::{ChildSpec, Restart};
use tributary_cluster::session::{self, NodeServerRef, SessionError, SessionHandle};
use tributary_cluster::tls::{NodeId, Role};
use tributary_cluster::uplink::link::LinkHandle;

pub use control::{call_edge, ControlReply, ControlRequest, CLOUD_CONTROL_GROUP};
pub use membership::{Member, MembershipMsg};

/// Called on each new uplink connection of an edge.
pub type OnConnect = Arc<dyn Fn(&LinkHandle) + Send + Sync>;

/// The limits of this node's part of the cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Peers the membership remembers; past it, the peer down the longest is
    /// forgotten, and a new peer is refused (its connection closed) when all
    /// are up.
    pub members_max: usize,
    /// How long a session may take to authenticate and exchange its actors
    /// and groups; past it, it is closed (with its connection) to start over.
    pub session_ready_timeout_ms: u64,
    /// How long a peer's previous session may take to stop before the new
    /// one starts anyway.
    pub stale_session_stop_timeout_ms: u64,
    /// How long the cloud waits for the status call it makes to each edge
    /// that comes up.
    pub control_call_timeout_ms: u64,
    /// How often members' round-trip times are sampled; 0 only at up.
    pub rtt_sample_interval_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            members_max: 10_000,
            session_ready_timeout_ms: 10_000,
            stale_session_stop_timeout_ms: 2_000,
            control_call_timeout_ms: 5_000,
            rtt_sample_interval_ms: 1_000,
        }
    }
}

/// What the rest of the node plugs into its links.
pub struct ClusterParts {
    /// For the edge's uplink: dials the cluster session on each connection.
    pub on_connect: Option<OnConnect>,
    /// For the cloud's listener: serves the session streams edges open.
    pub on_session: Option<SessionHook>,
    /// This node's members, updated at each change (and RTT sample).
    pub members: watch::Receiver<Vec<Member>>,
    /// An edge's dashboard reports, on each connection's report stream.
    pub reports: Option<crate::dashboard::reports::ReportLink>,
    /// This node's membership and control actors, for its root supervisor
    /// to start (they are not running before).
    pub children: Vec<ChildSpec>,
}

/// The registry name of node `id`'s membership actor. Names are
/// process-global, so two nodes in one process need the id in it.
pub fn membership_name(id: &NodeId) -> String {
    format!("tributary.membership.{id}")
}

/// What the session hooks share.
struct Node {
    id: NodeId,
    role: Role,
    node_server: NodeServerRef,
    config: ClusterConfig,
}

impl Node {
    /// The membership actor as it runs now: its supervisor may have
    /// restarted it, so it is found by name at each use.
    fn membership(&self) -> Option<ActorRef<MembershipMsg>> {
        ractor::registry::where_is(membership_name(&self.id)).map(Into::into)
    }

    fn cast_membership(&self, msg: MembershipMsg) {
        match self.membership() {
            Some(m) => {
                let _ = m.cast(msg);
            }
            None => {
                tracing::warn!("the membership is not running; a session change is not recorded")
            }
        }
    }
}

/// Starts this node's side of the cluster with the default limits.
pub async fn start(role: Role, id: &NodeId, cookie: String) -> anyhow::Result<ClusterParts> {
    start_with(role, id, cookie, ClusterConfig::default()).await
}

/// Starts this node's side of the cluster: its node server now; its
/// membership and its control actor as [`ClusterParts::children`], for the
/// node's root supervisor.
pub async fn start_with(
    role: Role,
    id: &NodeId,
    cookie: String,
    config: ClusterConfig,
) -> anyhow::Result<ClusterParts> {
    let node_server = session::start_node_server(id, cookie).await?;
    tributary_cluster::guard::set_policy(id, session_policy());
    let (publish, members) = watch::channel(Vec::new());
    let membership = ChildSpec::new(
        membership_name(id),
        Restart::Permanent,
        membership::Membership,
        membership::MembershipArgs {
            members_max: config.members_max,
            rtt_sample_interval_ms: config.rtt_sample_interval_ms,
            publish,
        },
    );
    let node = Arc::new(Node {
        id: id.clone(),
        role,
        node_server,
        config,
    });
    Ok(match role {
        Role::Edge => {
            let control = ChildSpec::new(
                control::edge_control_name(id.as_str()),
                Restart::Permanent,
                control::EdgeControl,
                id.to_string(),
            );
            let reports = crate::dashboard::reports::ReportLink::new();
            ClusterParts {
                on_connect: Some(edge_on_connect(node, reports.clone())),
                on_session: None,
                members,
                reports: Some(reports),
                children: vec![membership, control],
            }
        }
        Role::Cloud => {
            let control = ChildSpec::new(
                control::cloud_control_name(id.as_str()),
                Restart::Permanent,
                control::CloudControl,
                (),
            );
            ClusterParts {
                on_connect: None,
                on_session: Some(cloud_on_session(node)),
                members,
                reports: None,
                children: vec![membership, control],
            }
        }
    })
}

/// What a peer may do over its session: an edge may join only its own
/// control groups (so it can never stand in for another edge's control
/// actor), a cloud node the cloud's groups.
pub fn session_policy() -> tributary_cluster::guard::SessionPolicy {
    tributary_cluster::guard::SessionPolicy {
        may_join: Arc::new(|peer: &NodeId, role: Role, group: &str| match role {
            Role::Edge => {
                group == control::EDGE_CONTROL_GROUP
                    || group == control::edge_control_group(peer.as_str())
            }
            Role::Cloud => group == control::CLOUD_CONTROL_GROUP,
        }),
        ..Default::default()
    }
}

/// The edge's hook on each new uplink connection: dial the session on it,
/// and open the report stream.
fn edge_on_connect(node: Arc<Node>, reports: crate::dashboard::reports::ReportLink) -> OnConnect {
    Arc::new(move |link: &LinkHandle| {
        reports.attach(link);
        let (node, link) = (node.clone(), link.clone());
        tokio::spawn(async move {
            let ns = node.node_server.clone();
            let dial_link = link.clone();
            run_session(node, link, move || async move {
                session::dial_session_on(&ns, &dial_link).await
            })
            .await
        });
    })
}

/// The cloud's hook for session streams an edge opens: accept the session.
fn cloud_on_session(node: Arc<Node>) -> SessionHook {
    Arc::new(move |link, streams| {
        let node = node.clone();
        tokio::spawn(async move {
            let ns = node.node_server.clone();
            let accept_link = link.clone();
            run_session(node, link, move || async move {
                session::accept_session_on(&ns, &accept_link, streams).await
            })
            .await
        });
    })
}

const MEMBERSHIP_CALL_TIMEOUT_MS: u64 = 2_000;

/// Close code for a peer the membership has no room for.
fn close_refused_code() -> u32 {
    u32::try_from(tributary_cluster::quic::CLOSE_REFUSED.into_inner()).unwrap_or(u32::MAX)
}

/// One session's life on either side: end the peer's previous session,
/// start this one, report it up once ready and down when it ends.
async fn run_session<F, Fut>(node: Arc<Node>, link: LinkHandle, open: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<SessionHandle, SessionError>>,
{
    let (peer, role) = match session::peer_of(&link) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "a cluster session's peer has no usable identity");
            return;
        }
    };
    // Sessions join an edge to a cloud; any other pair (a cloud-role
    // certificate dialing a cloud, say) has no business on this node.
    let expected = match node.role {
        Role::Edge => Role::Cloud,
        Role::Cloud => Role::Edge,
    };
    if role != expected {
        tracing::warn!(peer = %peer, %role, "refusing a cluster session from a {role} node");
        link.close(
            close_refused_code(),
            "cluster sessions join edges to clouds only",
        );
        return;
    }
    let Some(membership) = node.membership() else {
        tracing::warn!(peer = %peer, "the membership is not running; no cluster session");
        return;
    };
    let opening = ractor::call_t!(
        membership,
        |reply| MembershipMsg::Opening {
            peer: peer.clone(),
            role,
            reply
        },
        MEMBERSHIP_CALL_TIMEOUT_MS
    );
    let (number, stale) = match opening {
        Ok(Ok(v)) => v,
        Ok(Err(full)) => {
            tracing::warn!(peer = %peer, error = %full, "refusing a cluster peer");
            link.close(close_refused_code(), &full.to_string());
            return;
        }
        Err(e) => {
            tracing::warn!(peer = %peer, error = %e, "the membership did not answer; no cluster session");
            return;
        }
    };
    if let Some(stale) = stale {
        let timeout = Duration::from_millis(node.config.stale_session_stop_timeout_ms);
        if !stale.close_and_wait(timeout).await {
            tracing::warn!(peer = %peer, "the previous cluster session did not stop in time; starting the new one anyway");
        } else {
            tracing::info!(peer = %peer, "previous cluster session ended: a new one replaces it");
        }
    }
    let down = |reason: String| {
        node.cast_membership(MembershipMsg::Down {
            peer: peer.clone(),
            session: number,
            reason,
        });
    };
    let mut s = match open().await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(peer = %peer, error = %e, "starting the cluster session failed");
            down(e.to_string());
            return;
        }
    };
    node.cast_membership(MembershipMsg::Attach {
        peer: peer.clone(),
        session: number,
        closer: s.closer(),
    });
    let ready = Duration::from_millis(node.config.session_ready_timeout_ms);
    if let Err(e) = s.ready(ready).await {
        tracing::warn!(peer = %peer, error = %e, "the cluster session did not get ready; closing it");
        s.close();
        down(e.to_string());
        return;
    }
    node.cast_membership(MembershipMsg::Up {
        peer: peer.clone(),
        session: number,
        link: link.clone(),
    });
    match node.role {
        Role::Edge => greet_cloud(&node.id),
        Role::Cloud => {
            let timeout = Duration::from_millis(node.config.control_call_timeout_ms);
            tokio::spawn(status_call(peer.clone(), link.clone(), timeout));
        }
    }
    let end = s.ended().await;
    down(end.to_string());
}

/// Greets the cloud's control actor: the edge-to-cloud direction.
fn greet_cloud(edge: &NodeId) {
    let remote = ractor::pg::get_members(&CLOUD_CONTROL_GROUP.to_string())
        .into_iter()
        .filter(|m| !m.get_id().is_local())
        .max_by_key(|m| m.get_id().node());
    match remote {
        Some(control) => {
            let _ = control.send_message(format!("hello from {edge}"));
            tracing::info!(actor = %control.get_id(), "remote actor reachable through process group {CLOUD_CONTROL_GROUP}");
        }
        None => tracing::warn!(
            "no cloud control actor in {CLOUD_CONTROL_GROUP} once the session was ready"
        ),
    }
}

/// The cloud's first control call to an edge that came up: proves the
/// cloud-to-edge direction and logs the answer.
async fn status_call(edge: NodeId, link: LinkHandle, timeout: Duration) {
    let started = Instant::now();
    match call_edge(edge.as_str(), ControlRequest::Status, timeout).await {
        Ok(ControlReply::Status(st)) => tracing::info!(
            peer = %edge,
            call_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            rtt_ms = u64::try_from(link.rtt().as_millis()).unwrap_or(u64::MAX),
            edge_id = %st.edge_id,
            uptime_ms = st.uptime_ms,
            "control call answered"
        ),
        Ok(other) => {
            tracing::warn!(peer = %edge, reply = ?other, "control call answered out of turn")
        }
        Err(e) => tracing::warn!(peer = %edge, error = %e, "control call failed"),
    }
}

#[cfg(test)]
mod tests;

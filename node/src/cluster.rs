//! The ractor cluster across nodes: each node runs a NodeServer, and every
//! edge-to-cloud QUIC connection also carries a ractor_cluster session (the
//! uplink has its own stream beside it).
//!
//! Control messages ride the session; readings never do (casts queued
//! before a disconnect are lost, so the durable path has its own protocol).
//! The cloud's control actor joins a process group, through which edges find
//! it: remote actors are not in the name registry.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tributary_actors::cloud::SessionHook;
use tributary_cluster::session::{self, NodeServerRef};
use tributary_cluster::tls::{NodeId, Role};
use tributary_cluster::uplink::link::LinkHandle;

/// Called on each new uplink connection of an edge.
pub type OnConnect = Arc<dyn Fn(&LinkHandle) + Send + Sync>;

/// What the rest of the node plugs into its links.
pub struct ClusterParts {
    /// For the edge's uplink: dials the cluster session on each connection.
    pub on_connect: Option<OnConnect>,
    /// For the cloud's listener: serves the session streams edges open.
    pub on_session: Option<SessionHook>,
}

/// Starts this node's side of the cluster: its node server, and on the cloud
/// the control actor.
pub async fn start(role: Role, id: &NodeId, cookie: String) -> anyhow::Result<ClusterParts> {
    let node_server = session::start_node_server(id, cookie).await?;
    Ok(match role {
        Role::Edge => ClusterParts {
            on_connect: Some(edge_on_connect(node_server, id.to_string())),
            on_session: None,
        },
        Role::Cloud => {
            Actor::spawn(Some("tributary.control".into()), Control, ()).await?;
            ClusterParts {
                on_connect: None,
                on_session: Some(cloud_on_session(node_server)),
            }
        }
    })
}

/// The process group of the cloud's control actors.
pub const CONTROL_GROUP: &str = "tributary.cloud.control";
/// How long a session may take to authenticate.
const SESSION_AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an edge looks for the cloud's control actor after its session is up.
const CONTROL_LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
const CONTROL_LOOKUP_POLL: Duration = Duration::from_millis(50);

/// The cloud's control actor: for now it greets edges that reach it, which
/// proves the path that remote control calls take.
#[derive(Clone, Default)]
pub struct Control;

impl Actor for Control {
    type Msg = String;
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, myself: ActorRef<String>, _: ()) -> Result<(), ActorProcessingErr> {
        ractor::pg::join(CONTROL_GROUP.to_string(), vec![myself.get_cell()]);
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<String>,
        msg: String,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        tracing::info!(%msg, "control message over the cluster session");
        Ok(())
    }
}

/// The edge's hook on each new uplink connection: dial the session on it,
/// then greet the cloud's control actor found through its process group.
fn edge_on_connect(node_server: NodeServerRef, edge_id: String) -> OnConnect {
    Arc::new(move |link: &LinkHandle| {
        let (ns, link, edge_id) = (node_server.clone(), link.clone(), edge_id.clone());
        tokio::spawn(async move {
            let mut s = match session::dial_session_on(&ns, &link).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "dialing the cluster session failed");
                    return;
                }
            };
            if let Err(e) = s.authenticated(SESSION_AUTH_TIMEOUT).await {
                tracing::warn!(error = %e, "the cluster session did not authenticate");
                return;
            }
            tracing::info!(peer = %s.peer(), "cluster session up");
            let deadline = tokio::time::Instant::now() + CONTROL_LOOKUP_TIMEOUT;
            loop {
                let remote = ractor::pg::get_members(&CONTROL_GROUP.to_string())
                    .into_iter()
                    .find(|m| !m.get_id().is_local());
                if let Some(control) = remote {
                    let _ = control.send_message(format!("hello from {edge_id}"));
                    tracing::info!(actor = %control.get_id(), "remote actor reachable through process group {CONTROL_GROUP}");
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    tracing::warn!(
                        "no cloud control actor in {CONTROL_GROUP} after the session came up"
                    );
                    break;
                }
                tokio::time::sleep(CONTROL_LOOKUP_POLL).await;
            }
            let end = s.ended().await;
            tracing::info!(?end, "cluster session ended");
        });
    })
}

/// The cloud's hook for session streams: accept the session, then log its end.
fn cloud_on_session(node_server: NodeServerRef) -> SessionHook {
    Arc::new(move |link, streams| {
        let ns = node_server.clone();
        tokio::spawn(async move {
            match session::accept_session_on(&ns, &link, streams).await {
                Ok(mut s) => {
                    if s.authenticated(SESSION_AUTH_TIMEOUT).await.is_ok() {
                        tracing::info!(peer = %s.peer(), "cluster session up");
                    }
                    let end = s.ended().await;
                    tracing::info!(peer = %s.peer(), ?end, "cluster session ended");
                }
                Err(e) => tracing::warn!(error = %e, "accepting a cluster session failed"),
            }
        });
    })
}

//! A cloud and edges in one process over a real QUIC link on loopback:
//! membership, control calls both ways, stale sessions, the members bound.
//!
//! ractor's registry and process groups are process-global, so node ids
//! and actor names here are unique to this file.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef};
use tokio::sync::{mpsc, watch};
use tributary_actors::edge::gateway::GatewayMsg;
use tributary_actors::edge::GATEWAY_NAME;
use tributary_actors::supervision::{ChildSpec, Restart, Strategy, Supervisor, SupervisorArgs};
use tributary_cluster::quic::QuicConfig;
use tributary_cluster::tls::{self, NodeId, NodeIdentity, Role};
use tributary_cluster::uplink::link::{CloudEndpoint, EdgeConnector, IncomingStream, LinkHandle};
use tributary_cluster::uplink::Frame;

use super::control::ControlError;
use super::*;

/// The bound on every wait. Generous: the machine is shared.
const WAIT: Duration = Duration::from_secs(10);
const COOKIE: &str = "node-cluster-test";
const FRAME_BYTES_MAX: usize = 1024 * 1024;
const HELLO_TIMEOUT_MS: u64 = 5_000;
const CALL: Duration = Duration::from_secs(5);
/// The issue's bound on noticing a lost peer.
const DOWN_DETECTION_MAX: Duration = Duration::from_secs(2);

async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: not done within {WAIT:?}"),
    }
}

fn id(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

struct Pki {
    _dir: tempfile::TempDir,
    identities: Vec<NodeIdentity>,
}

fn pki(nodes: &[(&str, Role)]) -> Pki {
    let dir = tempfile::tempdir().unwrap();
    tls::init_ca(dir.path()).unwrap();
    let identities = nodes
        .iter()
        .map(|(name, role)| {
            tls::issue(dir.path(), &id(name), *role, 1).unwrap();
            NodeIdentity::load_from_dir(dir.path(), &id(name)).unwrap()
        })
        .collect();
    Pki {
        _dir: dir,
        identities,
    }
}

/// Serves the cloud's endpoint the way its listener does: uplink streams
/// are held (and ignored), session streams go to the hook.
fn serve_cloud(endpoint: Arc<CloudEndpoint>, hook: SessionHook) {
    tokio::spawn(async move {
        while let Some(pending) = endpoint.accept().await {
            let hook = hook.clone();
            tokio::spawn(async move {
                let Ok(conn) = pending.complete().await else {
                    return;
                };
                let mut uplinks = Vec::new();
                while let Ok(stream) = conn.next_stream().await {
                    match stream {
                        IncomingStream::Uplink(up) => uplinks.push(up),
                        IncomingStream::Session(streams) => hook(conn.handle(), streams),
                        IncomingStream::Report(_) => {}
                    }
                }
            });
        }
    });
}

/// Dials the cloud as the edge's uplink does, and hands the connection to
/// the edge's hook.
async fn connect_edge(connector: &EdgeConnector, edge: &str, hook: &OnConnect) -> LinkHandle {
    let mut dialed = within("dialing the cloud", connector.connect())
        .await
        .unwrap();
    dialed
        .writer
        .send(&Frame::Hello {
            edge_id: edge.to_string(),
            epoch: 1,
            next_seq: 1,
        })
        .await
        .unwrap();
    hook(&dialed.handle);
    dialed.handle
}

async fn wait_members(
    rx: &mut watch::Receiver<Vec<Member>>,
    what: &str,
    ok: impl FnMut(&Vec<Member>) -> bool,
) -> Vec<Member> {
    within(what, rx.wait_for(ok)).await.unwrap().clone()
}

fn member<'a>(members: &'a [Member], peer: &str) -> Option<&'a Member> {
    members.iter().find(|m| m.peer == peer)
}

/// Stands in for the edge's gateway: knows one stage, reports each change.
struct FakeGateway;

impl Actor for FakeGateway {
    type Msg = GatewayMsg;
    type State = mpsc::Sender<(String, String, f64)>;
    type Arguments = mpsc::Sender<(String, String, f64)>;

    async fn pre_start(
        &self,
        _: ActorRef<GatewayMsg>,
        tx: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(tx)
    }

    async fn handle(
        &self,
        _: ActorRef<GatewayMsg>,
        msg: GatewayMsg,
        tx: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let GatewayMsg::SetStageParam {
            stage,
            param,
            value,
            reply,
        } = msg
        {
            if stage == "scale" {
                tx.send((stage, param, value)).await?;
                let _ = reply.send(Ok(()));
            } else {
                let _ = reply.send(Err(format!("no stage named {stage:?}")));
            }
        }
        Ok(())
    }
}

/// A supervised worker that reports each of its starts.
#[derive(Clone)]
struct Worker;

impl Actor for Worker {
    type Msg = ();
    type State = ();
    type Arguments = mpsc::Sender<ActorId>;

    async fn pre_start(
        &self,
        myself: ActorRef<()>,
        started: Self::Arguments,
    ) -> Result<(), ActorProcessingErr> {
        started.send(myself.get_id()).await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_control_calls_and_stale_sessions_over_quic() {
    tributary_cluster::install_crypto_provider();
    // Shown for failing tests only (the test writer is captured).
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let (cloud_id, edge_id, other_id) = ("cloud-ct", "edge-ct", "edge-ct-2");
    let pki = pki(&[
        (cloud_id, Role::Cloud),
        (edge_id, Role::Edge),
        (other_id, Role::Edge),
    ]);
    let quic = QuicConfig::default();
    // Room for one edge only, to see the bound refuse the second.
    let cloud_config = ClusterConfig {
        members_max: 1,
        ..ClusterConfig::default()
    };
    let cloud = start_with(Role::Cloud, &id(cloud_id), COOKIE.into(), cloud_config)
        .await
        .unwrap();
    let _cloud_root = supervise(&cloud).await;
    let edge = start_with(
        Role::Edge,
        &id(edge_id),
        COOKIE.into(),
        ClusterConfig::default(),
    )
    .await
    .unwrap();
    let _edge_root = supervise(&edge).await;
    let endpoint = Arc::new(
        CloudEndpoint::bind(
            "127.0.0.1:0".parse::<SocketAddr>().unwrap(),
            &pki.identities[0],
            quic.clone(),
            FRAME_BYTES_MAX,
            HELLO_TIMEOUT_MS,
        )
        .unwrap(),
    );
    let cloud_addr = endpoint.local_addr().unwrap();
    serve_cloud(endpoint, cloud.on_session.clone().unwrap());
    let connector = EdgeConnector::new(
        &pki.identities[1],
        cloud_addr,
        quic.clone(),
        FRAME_BYTES_MAX,
    )
    .unwrap();
    let edge_hook = edge.on_connect.clone().unwrap();

    // Membership, both ways.
    let first = connect_edge(&connector, edge_id, &edge_hook).await;
    let mut cloud_members = cloud.members.clone();
    let mut edge_members = edge.members.clone();
    let seen = wait_members(&mut cloud_members, "the cloud sees the edge up", |m| {
        member(m, edge_id).is_some_and(|e| e.up)
    })
    .await;
    let e = member(&seen, edge_id).unwrap();
    assert_eq!((e.role, e.ups), (Role::Edge, 1));
    assert!(e.rtt.is_some());
    let seen = wait_members(&mut edge_members, "the edge sees the cloud up", |m| {
        member(m, cloud_id).is_some_and(|c| c.up)
    })
    .await;
    assert_eq!(member(&seen, cloud_id).unwrap().role, Role::Cloud);

    // Status: the cloud-to-edge direction.
    match call_edge(edge_id, ControlRequest::Status, CALL).await {
        Ok(ControlReply::Status(st)) => assert_eq!(st.edge_id, edge_id),
        other => panic!("status: {other:?}"),
    }
    assert!(matches!(
        call_edge("edge-nobody", ControlRequest::Status, CALL).await,
        Err(ControlError::NotFound { .. })
    ));

    // Stage parameters go to the gateway, and its refusals come back.
    let (param_tx, mut param_rx) = mpsc::channel(4);
    let (gateway, _) = Actor::spawn(Some(GATEWAY_NAME.to_string()), FakeGateway, param_tx)
        .await
        .unwrap();
    let set = |stage: &str| ControlRequest::SetStageParam {
        stage: stage.into(),
        param: "factor".into(),
        value: 2.5,
    };
    assert_eq!(
        call_edge(edge_id, set("scale"), CALL).await.unwrap(),
        ControlReply::Done
    );
    assert_eq!(
        within("the gateway gets the change", param_rx.recv()).await,
        Some(("scale".into(), "factor".into(), 2.5))
    );
    match call_edge(edge_id, set("nope"), CALL).await {
        Err(ControlError::Refused { reason, .. }) => {
            assert!(reason.contains("no stage"), "{reason}")
        }
        other => panic!("unknown stage: {other:?}"),
    }
    gateway.stop(None);

    // Restarting a supervised actor by name; refusing unknown and unsupervised ones.
    let worker_name = "cluster-test.worker";
    let (started_tx, mut started_rx) = mpsc::channel(4);
    let mut sup_args = SupervisorArgs::new(
        Strategy::OneForOne,
        vec![ChildSpec::new(
            worker_name,
            Restart::Permanent,
            Worker,
            started_tx,
        )],
    );
    sup_args.backoff_initial_ms = 10;
    let (sup, _) = Actor::spawn(None, Supervisor, sup_args).await.unwrap();
    let first_worker = within("the worker starts", started_rx.recv())
        .await
        .unwrap();
    let restart = |name: &str| ControlRequest::RestartActor { name: name.into() };
    assert_eq!(
        call_edge(edge_id, restart(worker_name), CALL)
            .await
            .unwrap(),
        ControlReply::Done
    );
    let second_worker = within("the worker restarts", started_rx.recv())
        .await
        .unwrap();
    assert_ne!(first_worker, second_worker);
    for name in ["cluster-test.nobody", &control::edge_control_name(edge_id)] {
        assert!(
            matches!(
                call_edge(edge_id, restart(name), CALL).await,
                Err(ControlError::Refused { .. })
            ),
            "{name}"
        );
    }
    sup.stop(None);

    // A second connection from the same edge replaces the first session.
    let second = connect_edge(&connector, edge_id, &edge_hook).await;
    let why = within("the stale connection closes", first.closed()).await;
    assert!(!why.is_empty());
    let seen = wait_members(
        &mut cloud_members,
        "the edge is up on its new session",
        |m| member(m, edge_id).is_some_and(|e| e.up && e.ups == 2),
    )
    .await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    match call_edge(edge_id, ControlRequest::Status, CALL).await {
        Ok(ControlReply::Status(st)) => assert_eq!(st.edge_id, edge_id),
        other => panic!("status on the new session: {other:?}"),
    }

    // The members bound: one edge is up, so a second edge is refused.
    let other = start_with(
        Role::Edge,
        &id(other_id),
        COOKIE.into(),
        ClusterConfig::default(),
    )
    .await
    .unwrap();
    let _other_root = supervise(&other).await;
    let other_connector = EdgeConnector::new(
        &pki.identities[2],
        cloud_addr,
        quic.clone(),
        FRAME_BYTES_MAX,
    )
    .unwrap();
    let refused = connect_edge(&other_connector, other_id, &other.on_connect.unwrap()).await;
    let why = within(
        "the cloud refuses the edge past members_max",
        refused.closed(),
    )
    .await;
    assert!(why.contains("membership is full"), "{why}");

    // Losing the link is noticed at once when the connection closes.
    let lost = Instant::now();
    second.close(0, "test: link lost");
    let seen = wait_members(&mut cloud_members, "the cloud sees the edge down", |m| {
        member(m, edge_id).is_some_and(|e| !e.up)
    })
    .await;
    let took = lost.elapsed();
    assert!(took < DOWN_DETECTION_MAX, "down after {took:?}");
    assert_eq!(member(&seen, edge_id).unwrap().ups, 2);
}

/// Starts a node's cluster actors under a supervisor, as the node's root
/// would.
async fn supervise(parts: &ClusterParts) -> ActorRef<tributary_actors::supervision::SupervisorMsg> {
    let (sup, _) = Actor::spawn(
        None,
        Supervisor,
        SupervisorArgs::new(Strategy::OneForOne, parts.children.clone()),
    )
    .await
    .expect("starting the cluster's actors");
    sup
}

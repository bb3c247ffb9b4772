//! A crashing device actor is restarted by its supervisor, and the readings
//! the gateway accepted before the crash stay in the outbox.

use std::sync::Arc;
use std::time::Duration;

use ractor::{ActorRef, RpcReplyPort};
use tributary_actors::edge::device::{DeviceMsg, Signal};
use tributary_actors::edge::gateway::{GatewayArgs, GatewayMsg, GatewayStatus, StoreFactory};
use tributary_actors::edge::uplink::UplinkArgs;
use tributary_actors::edge::{
    start_edge, DevicesConfig, EdgeArgs, EdgeNames, DEVICES_NAME, GATEWAY_NAME,
};
use tributary_actors::outbox::{MemoryStore, OutboxConfig, OutboxStore};
use tributary_actors::supervision::{ChildStatus, SupervisorMsg};
use tributary_cluster::quic::QuicConfig;
use tributary_cluster::tls::{self, NodeId, NodeIdentity, Role};
use tributary_cluster::uplink::link::EdgeConnector;
use tributary_cluster::uplink::EdgeUplinkConfig;

const WAIT: Duration = Duration::from_secs(20);
const CALL_MS: u64 = 5_000;

async fn gateway_status() -> GatewayStatus {
    let g: ActorRef<GatewayMsg> = ractor::registry::where_is(GATEWAY_NAME)
        .expect("gateway")
        .into();
    ractor::call_t!(g, GatewayMsg::Status, CALL_MS).expect("gateway status")
}

async fn device_status() -> Vec<ChildStatus> {
    let s: ActorRef<SupervisorMsg> = ractor::registry::where_is(DEVICES_NAME)
        .expect("devices")
        .into();
    ractor::call_t!(s, |r: RpcReplyPort<_>| SupervisorMsg::Status(r), CALL_MS)
        .expect("devices status")
}

/// Polls `f` until it holds; actors have no event to await from outside.
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_device_restarts_and_accepted_readings_stay() {
    tributary_cluster::install_crypto_provider();
    let pki = tempfile::tempdir().unwrap();
    tls::init_ca(pki.path()).unwrap();
    let id = NodeId::new("edge-t").unwrap();
    tls::issue(pki.path(), &id, Role::Edge, 1).unwrap();
    let identity = NodeIdentity::load_from_dir(pki.path(), &id).unwrap();
    // No cloud listens here: the uplink keeps retrying, the outbox keeps everything.
    let nowhere = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let connector = EdgeConnector::new(&identity, nowhere, QuicConfig::default(), 1 << 20).unwrap();
    let disk = MemoryStore::new();
    let d = disk.clone();
    let store: StoreFactory = Arc::new(move || Ok(Box::new(d.clone()) as Box<dyn OutboxStore>));
    let args = EdgeArgs {
        gateway: GatewayArgs {
            store,
            outbox: OutboxConfig {
                commit_interval_ms: 10,
                ..Default::default()
            },
            ack_log: None,
            stages: None,
            names: EdgeNames::default(),
            clock: tributary_actors::clock::system(),
            device_clock_skew_max_ms: 60_000,
        },
        uplink: UplinkArgs {
            edge_id: id.to_string(),
            connector,
            core: EdgeUplinkConfig::default(),
            reconnect_backoff_initial_ms: 100,
            reconnect_backoff_max_ms: 1000,
            on_connect: None,
            names: EdgeNames::default(),
            jitter_seed: None,
            cloud_return_after_ms: 0,
        },
        devices: vec![DevicesConfig {
            count: 2,
            interval_ms: 5,
            signal: Signal::default(),
            seed: 1,
            id_prefix: "dev-".into(),
            readings_max: 0,
            stream: None,
            stop_at_us: None,
        }],
        mqtt: None,
        mqtt_connector: None,
        restarts_max: 5,
        restart_period_ms: 10_000,
        names: EdgeNames::default(),
        node_children: Vec::new(),
    };
    let (root, _handle) = start_edge(args).await.unwrap();

    eventually("readings committed", || async {
        gateway_status().await.stats.readings_committed >= 50
    })
    .await;
    let before = gateway_status().await;
    let device: ActorRef<DeviceMsg> = ractor::registry::where_is("device/dev-0")
        .expect("device")
        .into();
    device
        .send_message(DeviceMsg::Crash("a simulated sensor fault".into()))
        .unwrap();

    eventually("device restarted", || async {
        let s = device_status().await;
        s[0].restarts == 1 && s[0].running
    })
    .await;
    let status = device_status().await;
    assert_eq!(
        status[0].last_failure.as_deref(),
        Some("a simulated sensor fault")
    );
    assert_eq!(status[1].restarts, 0, "one_for_one restarted a sibling");

    // Everything accepted before the crash is still in the outbox, and the
    // restarted device adds to it.
    let before_committed = before.stats.readings_committed;
    eventually("the restarted device sends again", || async {
        gateway_status().await.stats.readings_committed > before_committed + 20
    })
    .await;
    let after = gateway_status().await;
    assert!(after.segments_stored >= before.segments_stored);
    assert_eq!(after.stats.segments_dropped, 0);
    let stored: Vec<u64> = disk
        .list()
        .unwrap()
        .into_iter()
        .map(|(seq, _)| seq)
        .collect();
    assert!(
        stored.len() as u64 >= before.sealed_through,
        "segments vanished: {stored:?}"
    );
    assert_eq!(stored.first(), Some(&1));
    root.stop(None);
}

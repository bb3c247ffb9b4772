//! The edge node: simulated devices under a device supervisor, the gateway
//! that owns the outbox, and the uplink that owns the link to the cloud.
//!
//! ```text
//! tributary.edge (rest_for_one)
//! ├── tributary.gateway          the outbox's only owner
//! ├── tributary.uplink           the link; reads from and acks to the gateway
//! ├── tributary.devices (one_for_one)
//! │   └── device/<id> ...        one simulated sensor each
//! └── tributary.mqtt             the MQTT source, when configured
//! ```
//!
//! rest_for_one because the uplink and the devices depend on the gateway: a
//! gateway restart re-reads the outbox, so the uplink must start again from
//! what the outbox says; a device failure concerns that device alone.

pub mod device;
pub mod gateway;
pub mod mqtt;
pub mod plan;
pub mod uplink;

use std::sync::Arc;

use ractor::{Actor, ActorRef, SpawnErr};
use tokio::task::JoinHandle;

use crate::supervision::{ChildSpec, Restart, Strategy, Supervisor, SupervisorArgs, SupervisorMsg};
use device::{DeviceArgs, Signal, SimulatedDevice};
use gateway::{Gateway, GatewayArgs};
use mqtt::link::MqttConnector;
use mqtt::{MqttConfig, MqttSource, MqttSourceArgs, MQTT_NAME};
use uplink::{Uplink, UplinkArgs};

pub const EDGE_NAME: &str = "tributary.edge";
pub const GATEWAY_NAME: &str = "tributary.gateway";
pub const UPLINK_NAME: &str = "tributary.uplink";
pub const DEVICES_NAME: &str = "tributary.devices";
/// The supervisor of the node's cluster actors (membership, control) on an edge.
pub const CLUSTER_NAME: &str = "tributary.edge-cluster";

/// The registered names of one edge's actors. A node process runs one edge,
/// under the fixed names above; a simulation runs several edges in one
/// process, and restarts them after crashes that leave the old names
/// registered, so it gives each edge incarnation its own prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EdgeNames {
    prefix: Arc<str>,
}

impl EdgeNames {
    /// Names that all start with `prefix`.
    pub fn scoped(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into().into(),
        }
    }

    fn name(&self, base: &str) -> String {
        format!("{}{base}", self.prefix)
    }

    pub fn edge(&self) -> String {
        self.name(EDGE_NAME)
    }

    pub fn gateway(&self) -> String {
        self.name(GATEWAY_NAME)
    }

    pub fn uplink(&self) -> String {
        self.name(UPLINK_NAME)
    }

    pub fn devices(&self) -> String {
        self.name(DEVICES_NAME)
    }

    pub fn cluster(&self) -> String {
        self.name(CLUSTER_NAME)
    }

    pub fn mqtt(&self) -> String {
        self.name(MQTT_NAME)
    }

    pub fn device(&self, id: &str) -> String {
        self.name(&format!("device/{id}"))
    }

    /// The gateway, if it is running.
    pub fn where_is_gateway(&self) -> Option<ActorRef<gateway::GatewayMsg>> {
        ractor::registry::where_is(self.gateway()).map(Into::into)
    }
}

/// The simulated devices of an edge.
#[derive(Debug, Clone)]
pub struct DevicesConfig {
    pub count: usize,
    pub interval_ms: u64,
    pub signal: Signal,
    pub seed: u64,
    /// Device ids are `<prefix><index>`.
    pub id_prefix: String,
    /// Readings each device sends before it stops; 0 for no end.
    pub readings_max: u64,
    /// The topology source these devices are, stamped on their readings.
    pub stream: Option<String>,
    /// Stops the devices once the edge's clock reaches this time (µs since
    /// the epoch); `None` for no end.
    pub stop_at_us: Option<i64>,
}

#[derive(Clone)]
pub struct EdgeArgs {
    pub gateway: GatewayArgs,
    pub uplink: UplinkArgs,
    /// Each group of simulated devices (a topology's simulated sources).
    pub devices: Vec<DevicesConfig>,
    /// The MQTT source; `None` for none.
    pub mqtt: Option<MqttConfig>,
    /// The MQTT source's broker link: rumqttc for real, `None` for that.
    pub mqtt_connector: Option<Arc<dyn MqttConnector>>,
    pub restarts_max: u32,
    pub restart_period_ms: u64,
    /// The names the edge's actors register under; the same value must be in
    /// the gateway's, uplink's and devices' arguments.
    pub names: EdgeNames,
    /// The node's own actors beside the data path (its cluster membership
    /// and control), started first (an uplink's first connection needs the
    /// membership) under a one_for_one supervisor of their own, so that a
    /// failure of theirs restarts only them.
    pub node_children: Vec<ChildSpec>,
}

/// Starts the edge's supervision tree.
pub async fn start_edge(
    args: EdgeArgs,
) -> Result<(ActorRef<SupervisorMsg>, JoinHandle<()>), SpawnErr> {
    let devices = args
        .devices
        .iter()
        .flat_map(|group| (0..group.count).map(move |i| (group, i)))
        .map(|(group, i)| {
            let id = format!("{}{i}", group.id_prefix);
            let dargs = DeviceArgs {
                device_id: id.clone(),
                interval_ms: group.interval_ms,
                signal: group.signal.clone(),
                seed: group.seed.wrapping_add(i as u64),
                readings_max: group.readings_max,
                stream: group.stream.clone(),
                stop_at_us: group.stop_at_us,
                names: args.names.clone(),
                clock: args.gateway.clock.clone(),
            };
            // Transient: a device that finished its readings stays stopped.
            ChildSpec::new(
                args.names.device(&id),
                Restart::Transient,
                SimulatedDevice,
                dargs,
            )
        })
        .collect();
    let mut device_sup = SupervisorArgs::new(Strategy::OneForOne, devices);
    device_sup.restarts_max = args.restarts_max;
    device_sup.restart_period_ms = args.restart_period_ms;
    let mut children = vec![
        ChildSpec::new(
            args.names.gateway(),
            Restart::Permanent,
            Gateway,
            args.gateway.clone(),
        ),
        ChildSpec::new(
            args.names.uplink(),
            Restart::Permanent,
            Uplink,
            args.uplink.clone(),
        ),
        ChildSpec::new(
            args.names.devices(),
            Restart::Permanent,
            Supervisor,
            device_sup,
        ),
    ];
    if let Some(config) = args.mqtt {
        let mut source =
            MqttSourceArgs::new(config, args.names.clone(), args.gateway.clock.clone());
        if let Some(connector) = args.mqtt_connector {
            source.connector = connector;
        }
        // Last: it depends on the gateway only, and a failure of its own
        // should not restart the uplink or the simulated devices.
        children.push(ChildSpec::new(
            args.names.mqtt(),
            Restart::Permanent,
            MqttSource,
            source,
        ));
    }
    if !args.node_children.is_empty() {
        let mut cluster = SupervisorArgs::new(Strategy::OneForOne, args.node_children);
        cluster.restarts_max = args.restarts_max;
        cluster.restart_period_ms = args.restart_period_ms;
        children.insert(
            0,
            ChildSpec::new(
                args.names.cluster(),
                Restart::Permanent,
                Supervisor,
                cluster,
            ),
        );
    }
    let mut root = SupervisorArgs::new(Strategy::RestForOne, children);
    root.restarts_max = args.restarts_max;
    root.restart_period_ms = args.restart_period_ms;
    Actor::spawn(Some(args.names.edge()), Supervisor, root).await
}

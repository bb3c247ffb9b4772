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
//!     └── one actor per MQTT device, spawned on its first message
//! ```
//!
//! rest_for_one because the uplink and the devices depend on the gateway: a
//! gateway restart re-reads the outbox, so the uplink must start again from
//! what the outbox says; a device failure concerns that device alone.

pub mod device;
pub mod gateway;
pub mod mqtt;
pub mod uplink;

use std::collections::HashMap;
use std::sync::Arc;

use ractor::{Actor, ActorRef, SpawnErr};
use tokio::task::JoinHandle;

use crate::outbox::Outbox;
use crate::supervision::{ChildSpec, Restart, Strategy, Supervisor, SupervisorArgs, SupervisorMsg};
use device::{DeviceArgs, Signal, SimulatedDevice};
use gateway::{Gateway, GatewayArgs};
use mqtt::{MqttConfig, MqttSource, MqttSourceArgs, MQTT_NAME};
use uplink::{Uplink, UplinkArgs};

pub const EDGE_NAME: &str = "tributary.edge";
pub const GATEWAY_NAME: &str = "tributary.gateway";
pub const UPLINK_NAME: &str = "tributary.uplink";
pub const DEVICES_NAME: &str = "tributary.devices";

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
}

#[derive(Clone)]
pub struct EdgeArgs {
    pub gateway: GatewayArgs,
    pub uplink: UplinkArgs,
    /// Each group of simulated devices (a topology's simulated sources).
    pub devices: Vec<DevicesConfig>,
    /// The MQTT source; `None` for none.
    pub mqtt: Option<MqttConfig>,
    pub restarts_max: u32,
    pub restart_period_ms: u64,
}

/// The MQTT devices' marks in the outbox, read before the uplink can delete
/// anything. A failure here is the gateway's to report when it opens the
/// outbox; the source then starts from its own marks store.
fn mqtt_outbox_marks(gateway: &GatewayArgs) -> HashMap<String, i64> {
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64);
    let scan = (gateway.store)()
        .map_err(|e| e.to_string())
        .and_then(|store| {
            Outbox::<()>::open(store, gateway.outbox.clone(), epoch).map_err(|e| e.to_string())
        })
        .and_then(|(mut outbox, _)| mqtt::outbox_marks(&mut outbox).map_err(|e| e.to_string()));
    match scan {
        Ok(marks) => marks,
        Err(e) => {
            tracing::warn!(error = %e, "reading the MQTT marks from the outbox failed");
            HashMap::new()
        }
    }
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
            };
            // Transient: a device that finished its readings stays stopped.
            ChildSpec::new(
                format!("device/{id}"),
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
            GATEWAY_NAME,
            Restart::Permanent,
            Gateway,
            args.gateway.clone(),
        ),
        ChildSpec::new(UPLINK_NAME, Restart::Permanent, Uplink, args.uplink.clone()),
        ChildSpec::new(DEVICES_NAME, Restart::Permanent, Supervisor, device_sup),
    ];
    if let Some(config) = args.mqtt {
        let outbox_marks = Arc::new(mqtt_outbox_marks(&args.gateway));
        // Last: it depends on the gateway only, and a failure of its own
        // should not restart the uplink or the simulated devices.
        children.push(ChildSpec::new(
            MQTT_NAME,
            Restart::Permanent,
            MqttSource,
            MqttSourceArgs {
                config,
                outbox_marks,
            },
        ));
    }
    let mut root = SupervisorArgs::new(Strategy::RestForOne, children);
    root.restarts_max = args.restarts_max;
    root.restart_period_ms = args.restart_period_ms;
    Actor::spawn(Some(EDGE_NAME.to_string()), Supervisor, root).await
}

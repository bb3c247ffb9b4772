//! Many light edges in one process, against a real cloud node: for the
//! tests and benchmarks of a fleet (hundreds or thousands of edges on one
//! cloud), where a `node` process per edge would not fit on one machine.
//!
//! A light edge is the real edge data path — simulated devices, the gateway
//! with its outbox and the uplink over QUIC with its own certificate — with
//! an in-memory outbox and without the cluster session, reports or MQTT.
//! What the cloud sees of it is what it sees of a `node --role edge`: the
//! same handshake, frames, sequence numbers and epochs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tributary_actors::cloud::shard::shard_of;
use tributary_actors::edge::device::Signal;
use tributary_actors::edge::gateway::{GatewayArgs, StoreFactory};
use tributary_actors::edge::uplink::UplinkArgs;
use tributary_actors::edge::{start_edge, DevicesConfig, EdgeArgs, EdgeNames};
use tributary_actors::outbox::{MemoryStore, OutboxConfig, OutboxStore};
use tributary_cluster::quic::QuicConfig;
use tributary_cluster::tls::{self, NodeId, NodeIdentity, Role};
use tributary_cluster::uplink::link::{CloudTarget, EdgeConnector};
use tributary_cluster::uplink::EdgeUplinkConfig;

/// What each light edge runs.
#[derive(Debug, Clone)]
pub struct FleetSpec {
    /// Edges, named `<prefix>-<i>` for i in 0..edges.
    pub edges: usize,
    pub id_prefix: String,
    /// Simulated devices per edge.
    pub devices: usize,
    /// Interval between one device's readings.
    pub interval_ms: u64,
    /// Readings each device sends before it stops (0: until the end).
    pub readings_max: u64,
    /// Readings per segment: small segments make many small commits, as a
    /// fleet of quiet edges does.
    pub segment_readings_max: usize,
    pub commit_interval_ms: u64,
    /// Where the ack logs go (one per edge, `<id>.acks`); None: no ack logs.
    pub ack_dir: Option<PathBuf>,
    /// The cluster's `ingest_shards`: with several cloud nodes, edges rank
    /// them by their shard, as `node` does.
    pub ingest_shards: u32,
}

/// A running fleet: dropping it stops every edge.
pub struct Fleet {
    pub ids: Vec<String>,
    pub ack_logs: Vec<PathBuf>,
    roots: Vec<ractor::ActorRef<tributary_actors::supervision::SupervisorMsg>>,
}

/// What starting a fleet failed at, with the edge it was for.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("edge {edge}: issuing its certificate: {source}")]
    Issue {
        edge: String,
        #[source]
        source: tls::TlsError,
    },
    #[error("edge {edge}: setting up its uplink: {source}")]
    Connector {
        edge: String,
        #[source]
        source: tributary_cluster::uplink::link::UplinkSetupError,
    },
    #[error("edge {edge}: starting its actors: {detail}")]
    Start { edge: String, detail: String },
}

impl Fleet {
    /// Issues a certificate for every edge from the CA in `pki` (the
    /// cloud's `tls_dir`) and starts them all, each given every cloud node
    /// of `clouds`.
    pub async fn start(
        spec: &FleetSpec,
        pki: &Path,
        clouds: &[SocketAddr],
    ) -> Result<Self, FleetError> {
        let mut fleet = Fleet {
            ids: Vec::with_capacity(spec.edges),
            ack_logs: Vec::new(),
            roots: Vec::with_capacity(spec.edges),
        };
        for i in 0..spec.edges {
            let id = format!("{}-{i}", spec.id_prefix);
            let node_id = NodeId::new(id.clone()).map_err(|source| FleetError::Issue {
                edge: id.clone(),
                source,
            })?;
            let issued = |source| FleetError::Issue {
                edge: id.clone(),
                source,
            };
            tls::issue(pki, &node_id, Role::Edge, 1).map_err(issued)?;
            let identity = NodeIdentity::load_from_dir(pki, &node_id).map_err(issued)?;
            let shard = shard_of(&id, spec.ingest_shards);
            let connector = EdgeConnector::to_clouds(
                &identity,
                clouds.iter().map(|a| CloudTarget::Addr(*a)).collect(),
                &format!("shard/{shard}"),
                QuicConfig::default(),
                tributary_cluster::uplink::frame::FRAME_BYTES_MAX_DEFAULT,
            )
            .map_err(|source| FleetError::Connector {
                edge: id.clone(),
                source,
            })?;
            let ack_log = spec.ack_dir.as_ref().map(|d| d.join(format!("{id}.acks")));
            if let Some(a) = &ack_log {
                fleet.ack_logs.push(a.clone());
            }
            // One store for the edge's life: a restarted gateway finds what
            // it had, as it would on disk.
            let disk = MemoryStore::new();
            let store: StoreFactory =
                Arc::new(move || Ok(Box::new(disk.clone()) as Box<dyn OutboxStore>));
            let names = EdgeNames::scoped(format!("{id}/"));
            let args = EdgeArgs {
                gateway: GatewayArgs {
                    store,
                    outbox: OutboxConfig {
                        outbox_bytes_max: 16 * 1024 * 1024,
                        segment_readings_max: spec.segment_readings_max,
                        segment_bytes_max: 256 * 1024,
                        commit_interval_ms: spec.commit_interval_ms,
                        ..OutboxConfig::default()
                    },
                    ack_log,
                    stages: None,
                    names: names.clone(),
                    clock: tributary_actors::clock::system(),
                    device_clock_skew_max_ms: 60_000,
                },
                uplink: UplinkArgs {
                    edge_id: id.clone(),
                    connector,
                    core: EdgeUplinkConfig::default(),
                    reconnect_backoff_initial_ms: 100,
                    reconnect_backoff_max_ms: 2_000,
                    on_connect: None,
                    names: names.clone(),
                    jitter_seed: None,
                    cloud_return_after_ms: 0,
                },
                devices: vec![DevicesConfig {
                    count: spec.devices,
                    interval_ms: spec.interval_ms,
                    signal: Signal::default(),
                    seed: i as u64,
                    id_prefix: format!("{id}-dev-"),
                    readings_max: spec.readings_max,
                    stream: None,
                    stop_at_us: None,
                }],
                mqtt: None,
                mqtt_connector: None,
                restarts_max: 5,
                restart_period_ms: 10_000,
                names,
                node_children: Vec::new(),
            };
            let (root, _handle) = start_edge(args).await.map_err(|e| FleetError::Start {
                edge: id.clone(),
                detail: e.to_string(),
            })?;
            fleet.roots.push(root);
            fleet.ids.push(id);
        }
        Ok(fleet)
    }

    /// Stops every edge.
    pub fn stop(&mut self) {
        for r in self.roots.drain(..) {
            r.stop(Some("the fleet stops".into()));
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A process's thread count and resident memory, from /proc (Linux).
#[derive(Debug, Clone, Copy)]
pub struct ProcessFootprint {
    pub threads: u64,
    pub rss_bytes: u64,
}

/// Reads `/proc/<pid>/status`; None where there is no /proc.
pub fn footprint(pid: u32) -> Option<ProcessFootprint> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some(ProcessFootprint {
        threads: field("Threads:")?,
        rss_bytes: field("VmRSS:")? * 1024,
    })
}

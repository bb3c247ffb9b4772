//! The `node` program as a library: the stock `node` binary calls
//! [`run_cli`] with no topology, and a user's own binary calls it with the
//! topology it defines in code, getting the same flags, settings and roles.
//! See `node --help`.

mod cluster;
mod config;
mod dashboard;
mod registry;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use ractor::ActorRef;
use tributary_actors::cloud::{CloudArgs, Listener, LISTENER_NAME};
use tributary_actors::edge::device::Signal;
use tributary_actors::edge::gateway::EdgeStages;
use tributary_actors::edge::gateway::{GatewayArgs, StoreFactory};
use tributary_actors::edge::mqtt::MqttConfig;
use tributary_actors::edge::uplink::UplinkArgs;
use tributary_actors::edge::{start_edge, DevicesConfig, EdgeArgs, EdgeNames};
use tributary_actors::outbox::{Outbox, OutboxStore, SledStore};
use tributary_actors::pipeline::StageRestarts;
use tributary_actors::sink::kafka::{KafkaLog, KafkaSinkConfig};
use tributary_actors::topology::{ComponentKind, Topology};
use tributary_cluster::tls::{self, NodeId, NodeIdentity, Role};
use tributary_cluster::uplink::link::EdgeConnector;
use tributary_cluster::uplink::{EdgeUplinkConfig, IngestConfig};

/// Tributary: carries industrial IoT readings from edge nodes into a durable
/// log, exactly once.
#[derive(Parser)]
#[command(name = "node", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Run as an edge node or a cloud node.
    #[arg(long, env = "TRIBUTARY_ROLE")]
    role: Option<Role>,
    /// A TOML file of settings; flags and TRIBUTARY_* variables override it.
    #[arg(long, env = "TRIBUTARY_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: config::Settings,
}

#[derive(Subcommand)]
enum Command {
    /// Manage the cluster's certificate authority and node certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Print records as they are committed to a topic (read_committed): the
    /// readings, or a sink topic of the cloud's stages (--readings-topic).
    Tail {
        #[command(flatten)]
        kafka: KafkaBootstrap,
        #[arg(
            long,
            env = "TRIBUTARY_READINGS_TOPIC",
            default_value = "tributary.readings"
        )]
        readings_topic: String,
        /// Stop after this many readings; 0 for no limit.
        #[arg(long, default_value_t = 10)]
        count: usize,
        /// Stop after this many seconds without a reading.
        #[arg(long, default_value_t = 30)]
        idle_s: u64,
    },
    /// The fleet registry: list edges, revoke, suspend and resume them.
    Fleet {
        #[command(flatten)]
        kafka: KafkaBootstrap,
        #[arg(
            long,
            env = "TRIBUTARY_REGISTRY_TOPIC",
            default_value = "tributary.registry"
        )]
        registry_topic: String,
        /// JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        command: registry::FleetCommand,
    },
}

/// Where the tools (`tail`, `fleet`) find Kafka.
#[derive(clap::Args)]
struct KafkaBootstrap {
    #[arg(
        long,
        env = "TRIBUTARY_KAFKA_BOOTSTRAP",
        default_value = "127.0.0.1:9092"
    )]
    kafka_bootstrap: String,
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a cluster CA (ca.pem, ca.key) in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a node certificate (<id>.pem, <id>.key) signed by the CA in DIR.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        id: String,
        #[arg(long)]
        role: Role,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Also lay out OUT as the node's tls_dir: ca.pem and its certificate
        /// and key, without the CA's key (an edge must not hold it).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Labels the topology places the node by (comma separated). They
        /// are part of the certificate, so the cloud accepts from an edge
        /// only the streams of the edge blocks its labels select.
        #[arg(long, value_delimiter = ',')]
        labels: Vec<String>,
    },
}

/// Parses the command line and runs what it asks for. With `topology`, an
/// edge runs the sources and stages the topology places on it (by its node id
/// and labels) and a cloud its stages and sinks; without, the settings'
/// simulated devices and MQTT source feed the log as they are.
pub fn run_cli(topology: Option<Topology>) -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    tributary_cluster::install_crypto_provider();
    match cli.command {
        Some(Command::Certs { command }) => certs(command),
        Some(Command::Fleet {
            kafka,
            registry_topic,
            json,
            command,
        }) => registry::fleet(&kafka.kafka_bootstrap, &registry_topic, json, command),
        Some(Command::Tail {
            kafka,
            readings_topic,
            count,
            idle_s,
        }) => {
            let config = KafkaSinkConfig {
                readings_topic,
                ..KafkaSinkConfig::new(kafka.kafka_bootstrap)
            };
            let n = tributary_actors::sink::kafka::tail(
                &config,
                count,
                std::time::Duration::from_secs(idle_s),
                |r| match (&r.edge, &r.seq) {
                    (Some(edge), Some(seq)) => {
                        println!(
                            "{edge} seq {seq} p{}@{}: {}",
                            r.partition, r.offset, r.value
                        )
                    }
                    // Records the cloud's stages wrote carry no edge headers.
                    _ => println!("p{}@{}: {}", r.partition, r.offset, r.value),
                },
            )?;
            eprintln!("{n} readings");
            Ok(())
        }
        None => {
            let role = cli
                .role
                .context("--role edge|cloud is required (or TRIBUTARY_ROLE)")?;
            let file = match &cli.config {
                Some(p) => config::load_file(p)?,
                None => config::Settings::default(),
            };
            let mut settings = cli.settings.resolve(file);
            settings.validate()?;
            // At least two workers even on a one-core edge: the gateway's fsync
            // blocks one, and the QUIC keep-alives must not wait behind it.
            let workers = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .enable_all()
                .build()?;
            runtime.block_on(run(role, settings, topology))
        }
    }
}

fn certs(command: CertsCommand) -> anyhow::Result<()> {
    match command {
        CertsCommand::Init { dir } => {
            let paths = tls::init_ca(&dir)?;
            println!("created the cluster CA: {}", paths.cert.display());
        }
        CertsCommand::Issue {
            dir,
            id,
            role,
            days,
            out,
            labels,
        } => {
            let id = NodeId::new(id)?;
            let paths = tls::issue_labelled(&dir, &id, role, &labels, days)?;
            println!(
                "issued {role} certificate for {id}: {}",
                paths.cert.display()
            );
            if let Some(out) = out {
                std::fs::create_dir_all(&out)
                    .with_context(|| format!("creating {}", out.display()))?;
                let to = tls::NodePaths::in_dir(&out, &id);
                let from_ca = dir.join("ca.pem");
                for (from, to) in [
                    (&paths.cert, &to.cert),
                    (&paths.key, &to.key),
                    (&from_ca, &to.ca),
                ] {
                    std::fs::copy(from, to).with_context(|| {
                        format!("copying {} to {}", from.display(), to.display())
                    })?;
                }
                println!("laid out {} as {id}'s tls_dir", out.display());
            }
        }
    }
    Ok(())
}

/// The cluster CA's key lets whoever holds it mint a certificate for any
/// node. An edge, in a place we do not control, must never hold it; a cloud
/// node may (it signs), but is warned.
fn check_no_ca_key(tls_dir: &std::path::Path, role: Role) -> anyhow::Result<()> {
    let key = tls_dir.join("ca.key");
    if !key.exists() {
        return Ok(());
    }
    match role {
        Role::Edge => bail!(
            "tls_dir {} holds the cluster CA's key (ca.key): whoever holds it can mint a certificate \
             for any node. An edge needs only ca.pem and its own certificate and key: move ca.key \
             off this machine",
            tls_dir.display()
        ),
        Role::Cloud => {
            tracing::warn!(path = %key.display(), "the cluster CA's key is in this cloud node's tls_dir: keep it readable by this node's signer only");
            Ok(())
        }
    }
}

/// The node's labels are its certificate's: the cloud places an edge, and
/// admits its streams, by what the CA signed. A `labels` setting may restate
/// them, but not differ.
fn certified_labels(s: &config::Resolved, identity: &NodeIdentity) -> anyhow::Result<String> {
    let mut set: Vec<&str> = s.labels();
    set.sort_unstable();
    set.dedup();
    let certified: Vec<&str> = identity.labels().iter().map(String::as_str).collect();
    if !set.is_empty() && set != certified {
        bail!(
            "labels is {:?}, but the certificate of {} carries {:?}: labels are part of a node's certificate (node certs issue --labels), so the cloud can trust them; reissue the certificate or drop the setting",
            s.labels,
            identity.id(),
            identity.labels().join(",")
        );
    }
    Ok(certified.join(","))
}

async fn run(
    role: Role,
    mut s: config::Resolved,
    topology: Option<Topology>,
) -> anyhow::Result<()> {
    let id = NodeId::new(s.node_id.clone())?;
    let identity = NodeIdentity::load_from_dir(&s.tls_dir, &id).with_context(|| {
        format!(
            "loading this node's certificate from tls_dir {}",
            s.tls_dir.display()
        )
    })?;
    if identity.role() != role {
        bail!(
            "the certificate of {id} is for role {}, but the node runs as {role}",
            identity.role()
        );
    }
    if identity.id() != &id {
        bail!(
            "node_id is {id}, but the certificate in tls_dir {} names {}: a node runs under the id its certificate gives",
            s.tls_dir.display(),
            identity.id()
        );
    }
    check_no_ca_key(&s.tls_dir, role)?;
    s.labels = certified_labels(&s, &identity)?;
    if let Some(t) = &topology {
        let labels = s.labels();
        let part = t.part_for(id.as_str(), &labels, role);
        // A cloud with no stages still ingests; an edge with nothing to run
        // is a placement mistake.
        if part.is_empty() && role == Role::Edge {
            bail!(
                "topology {:?} places nothing on {role} node {id} (labels: {labels:?}); check the edge blocks' node ids and labels",
                t.name()
            );
        }
        tracing::info!(
            topology = t.name(),
            sources = ?part.sources.iter().map(|c| &c.name).collect::<Vec<_>>(),
            stages = ?part.stages.iter().map(|c| &c.name).collect::<Vec<_>>(),
            sinks = ?part.sinks.iter().map(|c| &c.name).collect::<Vec<_>>(),
            "running this node's part of the topology"
        );
    }
    match role {
        Role::Edge => run_edge(id, identity, s, topology.as_ref()).await,
        Role::Cloud => run_cloud(identity, s, topology.as_ref()).await,
    }
}

/// The edge's sources and stages: from its part of the topology, or, without
/// one, the settings' simulated devices and MQTT source.
fn edge_plan(
    id: &NodeId,
    s: &config::Resolved,
    topology: Option<&Topology>,
) -> anyhow::Result<(Vec<DevicesConfig>, Option<MqttConfig>, Option<EdgeStages>)> {
    let from_settings = |stream: Option<String>| DevicesConfig {
        count: s.device_count,
        interval_ms: ((1000.0 / s.device_rate_hz).round() as u64).max(1),
        signal: Signal {
            base: s.signal_base,
            amplitude: s.signal_amplitude,
            period_s: s.signal_period_s,
            noise: s.signal_noise,
            spike_probability: s.spike_probability,
            spike_magnitude: s.spike_magnitude,
            spike_at_reading: 0,
        },
        seed: s.device_seed,
        id_prefix: s.device_id_prefix.clone(),
        readings_max: s.device_readings_max,
        stream,
        stop_at_us: None,
    };
    let Some(t) = topology else {
        return Ok((vec![from_settings(None)], s.mqtt()?, None));
    };
    // The topology's simulated sources say what their devices are.
    let ignored: Vec<&str> = [
        "device_count",
        "device_rate_hz",
        "device_seed",
        "device_id_prefix",
        "signal_base",
        "signal_amplitude",
        "signal_period_s",
        "signal_noise",
        "spike_probability",
        "spike_magnitude",
    ]
    .into_iter()
    .filter(|k| s.given.contains(k))
    .collect();
    if !ignored.is_empty() {
        tracing::warn!(settings = ?ignored, topology = %t.name(), "these settings are ignored: the topology defines its simulated devices in code (device_readings_max still applies)");
    }
    let restarts = StageRestarts {
        restarts_max: s.restarts_max,
        restart_period_ms: s.restart_period_ms,
    };
    let part = tributary_actors::edge::plan::edge_part(
        t,
        id.as_str(),
        &s.labels(),
        restarts,
        s.stages_checkpoint_interval_ms,
    )?;
    let devices = part
        .devices
        .into_iter()
        .map(|d| DevicesConfig {
            readings_max: s.device_readings_max,
            ..d
        })
        .collect();
    let mqtt = match part.mqtt {
        None => None,
        Some(m) => {
            let Some(mut config) = s.mqtt()? else {
                bail!(
                    "the topology's MQTT source {:?} needs a broker: set mqtt_addr",
                    m.source
                );
            };
            if m.qos != 1 {
                tracing::warn!(source = %m.source, qos = m.qos, "the MQTT source subscribes with QoS 1, so that nothing is acked before the outbox has it");
            }
            config.topic = m.topic_filter;
            config.device_level = m.device_level;
            config.stream = Some(m.source);
            Some(config)
        }
    };
    Ok((devices, mqtt, Some(part.stages)))
}

async fn run_edge(
    id: NodeId,
    identity: NodeIdentity,
    s: config::Resolved,
    topology: Option<&Topology>,
) -> anyhow::Result<()> {
    let (devices, mqtt, stages) = edge_plan(&id, &s, topology)?;
    // Edges of one log shard share a placement key, so that they prefer the
    // same cloud node, which then holds that shard's writer alone.
    let shard = tributary_actors::cloud::shard::shard_of(id.as_str(), s.ingest_shards);
    let connector = EdgeConnector::to_clouds(
        &identity,
        s.clouds()?,
        &format!("shard/{shard}"),
        s.quic(),
        s.frame_bytes_max,
    )?;
    let cluster = cluster::start(Role::Edge, &id, s.cluster_cookie.clone()).await?;
    let members = cluster.members.clone();
    let outbox_dir = s.outbox_dir.clone();
    let cache = s.sled_cache_bytes_max;
    let accept_damage = s.outbox_accept_damage;
    let open_store = move || {
        SledStore::open(&outbox_dir, cache)
            .map(|st| Box::new(st.accept_damage(accept_damage)) as Box<dyn OutboxStore>)
    };
    // Check the outbox before any actor starts, so that a damaged one is
    // refused with its own error rather than as an actor's startup failure.
    // A new outbox's epoch is its creation time, so newer outboxes have larger ones.
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64);
    let (_, recovery) =
        Outbox::<()>::open(open_store()?, s.outbox(), epoch).with_context(|| {
            format!(
                "opening the outbox in outbox_dir {}",
                s.outbox_dir.display()
            )
        })?;
    tracing::info!(
        segments = recovery.segments,
        bytes = recovery.bytes,
        "outbox checked"
    );
    let store: StoreFactory = Arc::new(open_store);
    let args = EdgeArgs {
        gateway: GatewayArgs {
            store,
            outbox: s.outbox(),
            ack_log: (!s.ack_log.as_os_str().is_empty()).then(|| s.ack_log.clone()),
            stages,
            names: EdgeNames::default(),
            clock: tributary_actors::clock::system(),
            device_clock_skew_max_ms: s.device_clock_skew_max_ms,
        },
        uplink: UplinkArgs {
            edge_id: id.to_string(),
            connector,
            core: EdgeUplinkConfig {
                inflight_segments_max: s.uplink_inflight_segments_max,
                welcome_timeout_ms: s.welcome_timeout_ms,
            },
            reconnect_backoff_initial_ms: s.reconnect_backoff_initial_ms,
            reconnect_backoff_max_ms: s.reconnect_backoff_max_ms,
            on_connect: cluster.on_connect,
            names: EdgeNames::default(),
            jitter_seed: None,
            cloud_return_after_ms: s.cloud_return_after_ms,
        },
        devices,
        mqtt,
        mqtt_connector: None,
        restarts_max: s.restarts_max,
        restart_period_ms: s.restart_period_ms,
        names: EdgeNames::default(),
        node_children: cluster.children,
    };
    let (root, handle) = start_edge(args)
        .await
        .context("starting the edge's actors")?;
    tracing::info!(edge = %id, clouds = %s.cloud_addr, mqtt = %s.mqtt_addr, outbox = %s.outbox_dir.display(), "edge running");
    // Reports go to the cloud's dashboard whether or not this edge serves
    // its own /metrics.
    let latest = dashboard::metrics::LatestReport::default();
    let reports = cluster
        .reports
        .clone()
        .context("an edge's cluster parts carry its report link")?;
    let _reporter =
        dashboard::server::spawn_edge_reporter(id.to_string(), latest.clone(), members, reports);
    let _metrics = match config::Resolved::addr(&s.metrics_addr) {
        Some(addr) => {
            let served = dashboard::server::serve_metrics(addr, latest).await?;
            tracing::info!(addr = %served.local_addr, "metrics serving");
            Some(served.task)
        }
        None => None,
    };
    let reporter = (s.report_interval_ms > 0).then(|| {
        tokio::spawn(report_edge(std::time::Duration::from_millis(
            s.report_interval_ms,
        )))
    });
    let result = wait_for_stop(root.get_cell(), handle).await;
    if let Some(r) = reporter {
        r.abort();
    }
    result
}

/// Logs what the edge holds and sends, every `every`: the edge's side of
/// the cloud's "cloud flow" line.
async fn report_edge(every: std::time::Duration) {
    use tributary_actors::edge::gateway::GatewayMsg;
    use tributary_actors::edge::uplink::UplinkMsg;
    use tributary_actors::edge::{GATEWAY_NAME, UPLINK_NAME};
    const CALL_MS: u64 = 2_000;
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let gateway: Option<ActorRef<GatewayMsg>> =
            ractor::registry::where_is(GATEWAY_NAME).map(Into::into);
        let uplink: Option<ActorRef<UplinkMsg>> =
            ractor::registry::where_is(UPLINK_NAME).map(Into::into);
        let (Some(g), Some(u)) = (gateway, uplink) else {
            continue;
        };
        let (Ok(gs), Ok(us)) = (
            ractor::call_t!(g, GatewayMsg::Status, CALL_MS),
            ractor::call_t!(u, UplinkMsg::Status, CALL_MS),
        ) else {
            continue;
        };
        tracing::info!(
            link_up = us.up,
            rtt_ms = us.rtt_ms,
            readings_received = gs.stats.readings_received,
            readings_committed = gs.stats.readings_committed,
            readings_refused_full = gs.stats.readings_refused_full,
            readings_dropped = gs.stats.readings_dropped,
            segments_stored = gs.segments_stored,
            outbox_bytes = gs.bytes_used,
            sealed_through = gs.sealed_through,
            acked_through = us.acked_through,
            segments_quarantined = gs.stats.segments_quarantined,
            quarantined_evicted = gs.stats.quarantined_evicted,
            readings_future = gs.readings_future,
            commits = gs.commits,
            stage_input_log = gs.stage_input_log_entries,
            "edge flow"
        );
        for st in &gs.stages {
            tracing::info!(
                stage = %st.name,
                readings_in = st.stats.readings_in,
                readings_out = st.stats.readings_out,
                late = st.stats.late,
                skipped = st.stats.skipped,
                restarts = st.restarts,
                "edge stage"
            );
        }
        if gs.stage_outputs_dropped > 0 {
            tracing::warn!(
                stage_outputs_dropped = gs.stage_outputs_dropped,
                "stage outputs were dropped because the outbox was full"
            );
        }
        report_mqtt(CALL_MS).await;
    }
}

/// Logs the MQTT source's counters, when there is one.
async fn report_mqtt(call_ms: u64) {
    use tributary_actors::edge::mqtt::{MqttMsg, MQTT_NAME};
    let Some(mqtt) = ractor::registry::where_is(MQTT_NAME).map(ActorRef::<MqttMsg>::from) else {
        return;
    };
    let Ok(st) = ractor::call_t!(mqtt, MqttMsg::Status, call_ms) else {
        return;
    };
    let (c, s) = (&st.core, &st.core.stats);
    tracing::info!(
        connected = c.connected,
        devices = c.devices,
        held = c.held,
        queued = c.queued,
        at_gateway = c.at_gateway,
        received = s.received,
        committed = s.committed,
        redeliveries = s.redeliveries,
        redelivered_copies = s.redelivered_copies,
        dup_taken = s.dup_taken,
        retained_skipped = s.retained_skipped,
        retries_full = s.retries_full,
        refused = s.refused,
        bad_payload = s.bad_payload,
        bad_topic = s.bad_topic,
        overflow_unacked = st.link.overflow_unacked,
        forced_reconnects = s.forced_reconnects,
        acks_written = st.link.acks_written,
        read_pauses = st.link.read_pauses,
        acks_dropped = st.link.acks_dropped,
        disconnects = s.disconnects,
        "mqtt flow"
    );
}

async fn run_cloud(
    identity: NodeIdentity,
    mut s: config::Resolved,
    topology: Option<&Topology>,
) -> anyhow::Result<()> {
    if s.transactional_id_prefix.is_empty() {
        // The same on every cloud node of the cluster (they share its CA),
        // so that any two fence each other; another cluster on the same
        // Kafka has its own.
        s.transactional_id_prefix = format!("tributary-{}", identity.cluster_fingerprint());
    }
    tracing::info!(transactional_id_prefix = %s.transactional_id_prefix, "fencing prefix");
    let sink_cfg = KafkaSinkConfig {
        bootstrap_servers: s.kafka_bootstrap.clone(),
        readings_topic: s.readings_topic.clone(),
        readings_partitions: s.readings_partitions,
        hwm_topic: s.hwm_topic.clone(),
        refused_topic: s.refused_topic.clone(),
        transactional_id_prefix: s.transactional_id_prefix.clone(),
        transaction_timeout_ms: s.transaction_timeout_ms,
        commit_timeout_ms: s.commit_timeout_ms,
        ..KafkaSinkConfig::default()
    };
    let stages_sink_cfg = sink_cfg.clone();
    let log = tokio::task::spawn_blocking(move || KafkaLog::new(sink_cfg))
        .await?
        .context("connecting to the log")?;
    // The registry is read to its end before any edge is admitted, so a
    // revoked edge is refused from the first connection on.
    let registry = registry::open_for_cloud(&s).await?;
    let cluster = cluster::start(Role::Cloud, identity.id(), s.cluster_cookie.clone())
        .await
        .context("starting the cluster's actors")?;
    let counters = Arc::new(tributary_actors::cloud::CloudCounters::default());
    let alerts = tributary_actors::cloud::stages::AlertFeed::default();
    let members = cluster.members.clone();
    let hub = Arc::new(std::sync::Mutex::new(dashboard::Hub::new(&s.node_id)));
    // Reports travel on a stream of the sender's own connection, so the hub
    // knows whose they are; without a dashboard they are not read.
    let on_report: Option<tributary_actors::cloud::ReportHook> =
        config::Resolved::addr(&s.dashboard_addr).map(|_| {
            let hub = hub.clone();
            Arc::new(
                move |reader: Box<tributary_cluster::reports::ReportReader>| {
                    tokio::spawn(dashboard::reports::serve(*reader, hub.clone()));
                },
            ) as tributary_actors::cloud::ReportHook
        });
    let admission = match topology {
        Some(t) => tributary_actors::cloud::admit::Admission::by_topology(Arc::new(t.clone())),
        None => tributary_actors::cloud::admit::Admission::any(),
    };
    let args = CloudArgs {
        listen_addr: s.listen_addr,
        identity,
        quic: s.quic(),
        frame_bytes_max: s.frame_bytes_max,
        hello_timeout_ms: s.hello_timeout_ms,
        ingest: IngestConfig {
            commit_segments_max: s.commit_segments_max,
            pending_segments_max: s.pending_segments_max,
        },
        sink: Arc::new(log),
        shards: tributary_actors::cloud::shard::ShardConfig {
            shards_count: s.ingest_shards,
            transaction_segments_max: s.ingest_transaction_segments_max,
        },
        report_interval_ms: s.report_interval_ms,
        on_session: cluster.on_session,
        on_report,
        admission,
        names_prefix: String::new(),
        network: tributary_cluster::net::os(),
        counters: counters.clone(),
        gate: Some(registry::gate(registry.clone())),
    };
    use tributary_actors::supervision::{ChildSpec, Restart, Strategy, Supervisor, SupervisorArgs};
    // One tree: the cluster's membership and control, the listener (and its
    // ingests and shards), the stages. Each restarts alone; past the
    // restart intensity the root fails and the node exits.
    let mut children = cluster.children;
    children.push(ChildSpec::new(
        LISTENER_NAME,
        Restart::Permanent,
        Listener,
        args,
    ));
    if let Some(t) = topology {
        if let Some(stages) = cloud_stages_args(t, &s, stages_sink_cfg, alerts.clone())? {
            children.push(ChildSpec::new(
                tributary_actors::cloud::stages::CLOUD_STAGES_NAME,
                Restart::Permanent,
                tributary_actors::cloud::stages::CloudStages,
                stages,
            ));
        }
    }
    let mut root = SupervisorArgs::new(Strategy::OneForOne, children);
    root.restarts_max = s.restarts_max;
    root.restart_period_ms = s.restart_period_ms;
    let (root, handle): (ActorRef<_>, _) =
        ractor::Actor::spawn(Some(CLOUD_ROOT_NAME.to_string()), Supervisor, root)
            .await
            .context("starting the cloud's actors")?;
    let _dashboard = start_dashboard(&s, hub, counters, alerts, members).await?;
    let _registry = registry::follow(registry, LISTENER_NAME.to_string());
    wait_for_stop(root.get_cell(), handle).await
}

/// The cloud's root supervisor.
pub const CLOUD_ROOT_NAME: &str = dashboard::report::CLOUD_ROOT;

/// The cloud's dashboard (and `/metrics`), when an address is set for
/// either; the ticker runs whenever one of them does.
async fn start_dashboard(
    s: &config::Resolved,
    hub: Arc<std::sync::Mutex<dashboard::Hub>>,
    counters: Arc<tributary_actors::cloud::CloudCounters>,
    alerts: tributary_actors::cloud::stages::AlertFeed,
    members: tokio::sync::watch::Receiver<Vec<cluster::Member>>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    use dashboard::server::{
        serve_dashboard, serve_metrics, spawn_cloud_ticker, CloudTicker, DashboardArgs,
    };
    let dashboard_addr = config::Resolved::addr(&s.dashboard_addr);
    let metrics_addr = config::Resolved::addr(&s.metrics_addr);
    if dashboard_addr.is_none() && metrics_addr.is_none() {
        return Ok(Vec::new());
    }
    let latest = dashboard::metrics::LatestReport::default();
    let mut tasks = Vec::new();
    let mut updates = None;
    if let Some(addr) = dashboard_addr {
        let audit = if s.dashboard_token.is_empty() {
            None
        } else {
            let (bootstrap, topic) = (s.kafka_bootstrap.clone(), s.audit_topic.clone());
            let audit = tokio::task::spawn_blocking(move || {
                tributary_actors::sink::kafka::audit::KafkaAudit::open(&bootstrap, &topic)
            })
            .await?
            .context("opening the audit topic for the dashboard's actions")?;
            Some(Arc::new(audit))
        };
        let (served, tx) = serve_dashboard(DashboardArgs {
            addr,
            hub: hub.clone(),
            latest: latest.clone(),
            token: Some(s.dashboard_token.clone()),
            audit,
            view_token_required: s.dashboard_view_token_required,
            connections_max: s.dashboard_connections_max,
            pages_per_client_max: s.dashboard_pages_per_client_max,
            header_read_timeout_ms: s.dashboard_header_read_timeout_ms,
        })
        .await?;
        tracing::info!(addr = %served.local_addr, actions = !s.dashboard_token.is_empty(), "dashboard serving");
        tasks.push(served.task);
        updates = Some(tx);
    }
    if let Some(addr) = metrics_addr {
        let served = serve_metrics(addr, latest.clone()).await?;
        tracing::info!(addr = %served.local_addr, "metrics serving");
        tasks.push(served.task);
    }
    let status = match (dashboard_addr, s.status_topic.as_str()) {
        (None, _) | (_, "off") => None,
        (Some(_), topic) => {
            let topic = if topic.is_empty() {
                format!("{}-status", s.transactional_id_prefix)
            } else {
                topic.to_owned()
            };
            let (bootstrap, bytes_max, node) = (
                s.kafka_bootstrap.clone(),
                s.status_record_bytes_max,
                s.node_id.clone(),
            );
            let t = topic.clone();
            let status = tokio::task::spawn_blocking(move || {
                tributary_actors::sink::kafka::status::KafkaStatus::open(
                    &bootstrap, &t, bytes_max, &node,
                )
            })
            .await?
            .with_context(|| {
                format!(
                    "opening the status topic {topic} (status_topic = \"off\" turns sharing off)"
                )
            })?;
            tracing::info!(%topic, "sharing the fleet's status with the other cloud nodes");
            Some(Arc::new(status))
        }
    };
    tasks.push(spawn_cloud_ticker(CloudTicker {
        node_id: s.node_id.clone(),
        listener: LISTENER_NAME.to_string(),
        counters,
        alerts,
        members,
        hub,
        latest,
        updates,
        status,
    }));
    Ok(tasks)
}

/// The cloud's stages and sinks, when the topology places any here: the
/// arguments of the consume-transform-produce actor.
fn cloud_stages_args(
    t: &Topology,
    s: &config::Resolved,
    sink: KafkaSinkConfig,
    alerts: tributary_actors::cloud::stages::AlertFeed,
) -> anyhow::Result<Option<tributary_actors::cloud::stages::CloudStagesArgs>> {
    use tributary_actors::cloud::stages::CloudStagesArgs;
    use tributary_actors::sink::kafka::{KafkaStageLog, KafkaStageLogConfig};
    use tributary_actors::sink::StageLog;
    use tributary_actors::topology::Sink;

    let part = t.part_for(&s.node_id, &s.labels(), Role::Cloud);
    if part.stages.is_empty() && part.sinks.is_empty() {
        return Ok(None);
    }
    let mut sinks = Vec::new();
    for c in &part.sinks {
        let ComponentKind::Sink(Sink::Kafka(k)) = &c.kind else {
            continue;
        };
        for input in &c.inputs {
            sinks.push((input.clone(), k.topic.clone()));
        }
    }
    if sinks.iter().any(|(_, topic)| *topic == s.readings_topic) {
        bail!(
            "a sink of topology {:?} writes to the readings topic {:?}, which the stages read: that would loop",
            t.name(),
            s.readings_topic
        );
    }
    let config = KafkaStageLogConfig {
        group_id: format!("{}-stages-{}", s.transactional_id_prefix, t.name()),
        transactional_id: format!(
            "{}-stages-{}-{}",
            s.transactional_id_prefix,
            t.name(),
            s.node_id
        ),
        sink_topics: sinks.iter().map(|(_, topic)| topic.clone()).collect(),
        state_topic: format!("{}-stages-{}-state", s.transactional_id_prefix, t.name()),
        session_timeout_ms: s.stages_session_timeout_ms,
        restore_timeout_ms: s.stages_restore_timeout_ms,
        sink,
    };
    let args = CloudStagesArgs {
        open_log: Arc::new(move || {
            KafkaStageLog::open(config.clone()).map(|l| Box::new(l) as Box<dyn StageLog>)
        }),
        stages: part.stages.iter().map(|c| (*c).clone()).collect(),
        sinks,
        restarts: StageRestarts {
            restarts_max: s.restarts_max,
            restart_period_ms: s.restart_period_ms,
        },
        batch_readings_max: s.stages_batch_readings_max,
        poll_ms: s.stages_poll_ms,
        watermark_lag_ms: s.stages_watermark_lag_ms,
        report_interval_ms: s.report_interval_ms,
        alerts: Some(alerts),
    };
    Ok(Some(args))
}

/// How long a graceful stop may take before the process exits anyway.
const SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Runs until the root actor ends or the process is asked to stop.
async fn wait_for_stop(
    root: ractor::ActorCell,
    handle: tokio::task::JoinHandle<()>,
) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; stopping"),
        _ = term.recv() => tracing::info!("terminated; stopping"),
        _ = handle => bail!("the node's root actor stopped after a child failed past its restart limit (see the errors above)"),
    }
    // Stop gracefully so the gateway commits what is open and answers its
    // sources; bounded, so a stuck actor cannot hold the process forever.
    root.stop_and_wait(Some("node stopping".into()), Some(SHUTDOWN_TIMEOUT))
        .await
        .map_err(|e| anyhow::anyhow!("stopping the node's actors: {e}"))?;
    Ok(())
}

//! Node settings. Every setting is a TOML key, a flag (`--outbox-bytes-max`)
//! and an environment variable (`TRIBUTARY_OUTBOX_BYTES_MAX`); a flag beats
//! the environment, which beats the file, which beats the default.
//!
//! Only this crate reads the CLI and the environment.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use tributary_actors::edge::mqtt::{first_wildcard_level, MqttConfig};
use tributary_actors::outbox::FullPolicy;

/// Declares the settings once: the clap flags with their env vars, the TOML
/// keys, the defaults and the merge, so the three can never drift apart.
macro_rules! settings {
    ($( $(#[doc = $doc:expr])* $name:ident : $ty:ty = $default:expr, $env:literal, $heading:literal; )*) => {
        #[derive(Debug, Clone, Default, clap::Args, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct Settings {
            $(
                $(#[doc = $doc])*
                #[arg(long, env = $env, help_heading = $heading)]
                #[serde(default)]
                pub $name: Option<$ty>,
            )*
        }

        /// Settings with every value resolved.
        #[derive(Debug, Clone)]
        pub struct Resolved {
            $( pub $name: $ty, )*
            /// The settings a flag, the environment or the file gave (the
            /// others are defaults), so that one that has no effect can be
            /// told.
            pub given: std::collections::BTreeSet<&'static str>,
        }

        impl Settings {
            /// Fills what `self` (flags and env) leaves open from `file`, then
            /// from the defaults.
            pub fn resolve(self, file: Settings) -> Resolved {
                let mut given = std::collections::BTreeSet::new();
                $( if self.$name.is_some() || file.$name.is_some() {
                    given.insert(stringify!($name));
                } )*
                Resolved {
                    $( $name: self.$name.or(file.$name).unwrap_or_else(|| $default), )*
                    given,
                }
            }
        }
    };
}

settings! {
    /// This node's id; its certificate must name it. [required]
    node_id: String = String::new(), "TRIBUTARY_NODE_ID", "Every node";
    /// Directory with ca.pem, <node_id>.pem and <node_id>.key.
    tls_dir: PathBuf = PathBuf::from("pki"), "TRIBUTARY_TLS_DIR", "Every node";
    /// Edge: the cloud nodes' QUIC addresses, comma-separated, each ip:port or dns-name:port (names are resolved at every dial). The edge dials them in an order every edge of its log shard shares, and fails over down that order [default: 127.0.0.1:7400].
    cloud_addr: String = "127.0.0.1:7400".to_string(), "TRIBUTARY_CLOUD_ADDR", "Edge";
    /// Edge: on a cloud node other than its first choice, try the preferred ones again after this long (up to twice it, spread over the edges); 0 never moves back [default: 30000].
    cloud_return_after_ms: u64 = 30_000, "TRIBUTARY_CLOUD_RETURN_AFTER_MS", "Edge";
    /// Cloud: the UDP address to accept edges on.
    listen_addr: SocketAddr = "127.0.0.1:7400".parse().expect("valid"), "TRIBUTARY_LISTEN_ADDR", "Cloud";
    /// Edge: the outbox directory [default: data/<node_id>/outbox].
    outbox_dir: PathBuf = PathBuf::new(), "TRIBUTARY_OUTBOX_DIR", "Edge";
    /// Edge: the most bytes the outbox may hold [default: 268435456].
    outbox_bytes_max: u64 = 256 * 1024 * 1024, "TRIBUTARY_OUTBOX_BYTES_MAX", "Edge";
    /// Edge: readings per segment before it is sealed [default: 1000].
    segment_readings_max: usize = 1000, "TRIBUTARY_SEGMENT_READINGS_MAX", "Edge";
    /// Edge: payload bytes per segment before it is sealed [default: 1048576].
    segment_bytes_max: usize = 1024 * 1024, "TRIBUTARY_SEGMENT_BYTES_MAX", "Edge";
    /// Edge: the longest a reading waits for its commit; commits follow each other as fast as the disk syncs, so this bounds only a flooded gateway [default: 50].
    commit_interval_ms: u64 = 50, "TRIBUTARY_COMMIT_INTERVAL_MS", "Edge";
    /// Edge: a reading stamped further ahead of the edge's clock than this is refused and counted [default: 300000].
    device_clock_skew_max_ms: u64 = 300_000, "TRIBUTARY_DEVICE_CLOCK_SKEW_MAX_MS", "Edge";
    /// Edge: how often the edge's stages save their state, which bounds their input log [default: 5000].
    stages_checkpoint_interval_ms: u64 = 5_000, "TRIBUTARY_STAGES_CHECKPOINT_INTERVAL_MS", "Edge";
    /// Edge: what a full outbox does: block or drop-oldest [default: block].
    full_policy: FullPolicy = FullPolicy::Block, "TRIBUTARY_FULL_POLICY", "Edge";
    /// Edge: open an outbox whose data falls short of its guard (damaged), carrying on with what is left; the loss is logged [default: false].
    outbox_accept_damage: bool = false, "TRIBUTARY_OUTBOX_ACCEPT_DAMAGE", "Edge";
    /// Edge: sled's page cache bound [default: 16777216].
    sled_cache_bytes_max: u64 = 16 * 1024 * 1024, "TRIBUTARY_SLED_CACHE_BYTES_MAX", "Edge";
    /// Edge: segments sent and not yet acknowledged; with small segments (few devices, quick commits) a window of 8 held one edge to about 60k readings/s [default: 32].
    uplink_inflight_segments_max: usize = 32, "TRIBUTARY_UPLINK_INFLIGHT_SEGMENTS_MAX", "Edge";
    /// Edge: how long to wait for the cloud's Welcome; above the cloud's mark recovery, which may wait out a crashed node's transaction [default: 40000].
    welcome_timeout_ms: u64 = 40_000, "TRIBUTARY_WELCOME_TIMEOUT_MS", "Edge";
    /// Edge: the first reconnect delay [default: 100].
    reconnect_backoff_initial_ms: u64 = 100, "TRIBUTARY_RECONNECT_BACKOFF_INITIAL_MS", "Edge";
    /// Edge: the longest reconnect delay; short, so that an edge rejoins within 1 s of a heal [default: 500].
    reconnect_backoff_max_ms: u64 = 500, "TRIBUTARY_RECONNECT_BACKOFF_MAX_MS", "Edge";
    /// Edge: append "A <device> <ts_us>" per acknowledged reading here (audit).
    ack_log: PathBuf = PathBuf::new(), "TRIBUTARY_ACK_LOG", "Edge";
    /// Edge: simulated devices to run [default: 10].
    device_count: usize = 10, "TRIBUTARY_DEVICE_COUNT", "Edge";
    /// Edge: readings per second per simulated device [default: 10].
    device_rate_hz: f64 = 10.0, "TRIBUTARY_DEVICE_RATE_HZ", "Edge";
    /// Edge: readings each simulated device sends before it stops, 0 for no end [default: 0].
    device_readings_max: u64 = 0, "TRIBUTARY_DEVICE_READINGS_MAX", "Edge";
    /// Edge: prefix of simulated device ids [default: <node_id>-dev-].
    device_id_prefix: String = String::new(), "TRIBUTARY_DEVICE_ID_PREFIX", "Edge";
    /// Edge: the signal's mean [default: 60].
    signal_base: f64 = 60.0, "TRIBUTARY_SIGNAL_BASE", "Edge";
    /// Edge: the sine's amplitude [default: 10].
    signal_amplitude: f64 = 10.0, "TRIBUTARY_SIGNAL_AMPLITUDE", "Edge";
    /// Edge: the sine's period in seconds [default: 60].
    signal_period_s: f64 = 60.0, "TRIBUTARY_SIGNAL_PERIOD_S", "Edge";
    /// Edge: half-width of the uniform noise [default: 0.5].
    signal_noise: f64 = 0.5, "TRIBUTARY_SIGNAL_NOISE", "Edge";
    /// Edge: the chance that a reading is a spike [default: 0.001].
    spike_probability: f64 = 0.001, "TRIBUTARY_SPIKE_PROBABILITY", "Edge";
    /// Edge: how far a spike jumps [default: 40].
    spike_magnitude: f64 = 40.0, "TRIBUTARY_SPIKE_MAGNITUDE", "Edge";
    /// Edge: the seed of the simulated signals [default: 1].
    device_seed: u64 = 1, "TRIBUTARY_DEVICE_SEED", "Edge";
    /// Cloud: Kafka bootstrap servers [default: 127.0.0.1:9092].
    kafka_bootstrap: String = "127.0.0.1:9092".into(), "TRIBUTARY_KAFKA_BOOTSTRAP", "Cloud";
    /// Cloud: the topic readings are written to [default: tributary.readings].
    readings_topic: String = "tributary.readings".into(), "TRIBUTARY_READINGS_TOPIC", "Cloud";
    /// Cloud: partitions of the readings topic when it is created [default: 3].
    readings_partitions: i32 = 3, "TRIBUTARY_READINGS_PARTITIONS", "Cloud";
    /// Cloud: the compacted topic of per-edge high-water marks [default: tributary.hwm].
    hwm_topic: String = "tributary.hwm".into(), "TRIBUTARY_HWM_TOPIC", "Cloud";
    /// Cloud: the compacted topic of the fleet registry (each edge's status); every cloud node reads it before it admits edges, then follows it, and refuses revoked and suspended edges [default: tributary.registry].
    registry_topic: String = "tributary.registry".into(), "TRIBUTARY_REGISTRY_TOPIC", "Cloud";
    /// Cloud: where readings the cloud refuses (invalid, or of a stream the topology does not place on their edge) are kept, with the reason [default: tributary.refused].
    refused_topic: String = "tributary.refused".into(), "TRIBUTARY_REFUSED_TOPIC", "Cloud";
    /// Cloud: prefix of the transactional.ids; empty derives it from the cluster's CA, so that every cloud node of a cluster has the same and fences the others (set it only for Kafka ACLs, and then the same on every cloud node) [default: tributary-<CA fingerprint>].
    transactional_id_prefix: String = String::new(), "TRIBUTARY_TRANSACTIONAL_ID_PREFIX", "Cloud";
    /// Cloud: the broker aborts a transaction left open this long; it bounds how long a crashed cloud node delays every edge's recovery [default: 15000].
    transaction_timeout_ms: u64 = tributary_actors::sink::kafka::TRANSACTION_TIMEOUT_MS_DEFAULT, "TRIBUTARY_TRANSACTION_TIMEOUT_MS", "Cloud";
    /// Cloud: bound on one log commit, below transaction_timeout_ms [default: 10000].
    commit_timeout_ms: u64 = tributary_actors::sink::kafka::COMMIT_TIMEOUT_MS_DEFAULT, "TRIBUTARY_COMMIT_TIMEOUT_MS", "Cloud";
    /// Cloud: segments of one edge per log transaction [default: 16].
    commit_segments_max: usize = 16, "TRIBUTARY_COMMIT_SEGMENTS_MAX", "Cloud";
    /// Log shards of the cluster: each is one Kafka transactional producer, opened by the cloud node its edges reach and shared by every edge that hashes to it. The same on every node of a cluster (edges rank the cloud nodes by their shard), changed only with all of them stopped [default: 4].
    ingest_shards: u32 = 4, "TRIBUTARY_INGEST_SHARDS", "Every node";
    /// Cloud: segments one shard transaction may hold over all its edges; under load transactions grow to it, when quiet a lone commit goes at once [default: 256].
    ingest_transaction_segments_max: usize = 256, "TRIBUTARY_INGEST_TRANSACTION_SEGMENTS_MAX", "Cloud";
    /// Cloud: segments an edge may have pending [default: 64].
    pending_segments_max: usize = 64, "TRIBUTARY_PENDING_SEGMENTS_MAX", "Cloud";
    /// Cloud: how long an edge has to say Hello [default: 5000].
    hello_timeout_ms: u64 = 5_000, "TRIBUTARY_HELLO_TIMEOUT_MS", "Cloud";
    /// Cloud: how long a new connection may take to open its first stream before it is closed [default: 5000].
    first_stream_timeout_ms: u64 = 5_000, "TRIBUTARY_FIRST_STREAM_TIMEOUT_MS", "Cloud";
    /// Cloud: how often to log what flows, 0 for never [default: 2000].
    report_interval_ms: u64 = 2_000, "TRIBUTARY_REPORT_INTERVAL_MS", "Cloud";
    /// Cloud: serve the supervision dashboard (and /metrics) here, e.g. 127.0.0.1:8080; empty for none [default: empty].
    dashboard_addr: String = String::new(), "TRIBUTARY_DASHBOARD_ADDR", "Dashboard (cloud)";
    /// Cloud: the bearer token the dashboard's actions require; empty turns actions off [default: empty].
    dashboard_token: String = String::new(), "TRIBUTARY_DASHBOARD_TOKEN", "Dashboard (cloud)";
    /// Cloud: require the dashboard token to view the page and its API too, not only for actions [default: false].
    dashboard_view_token_required: bool = false, "TRIBUTARY_DASHBOARD_VIEW_TOKEN_REQUIRED", "Dashboard (cloud)";
    /// Cloud: HTTP connections the dashboard serves at once; more are closed at once [default: 256].
    dashboard_connections_max: usize = 256, "TRIBUTARY_DASHBOARD_CONNECTIONS_MAX", "Dashboard (cloud)";
    /// Cloud: live pages (event streams) one client address may hold [default: 8].
    dashboard_pages_per_client_max: usize = 8, "TRIBUTARY_DASHBOARD_PAGES_PER_CLIENT_MAX", "Dashboard (cloud)";
    /// Cloud: how long a client may take to send a request's headers [default: 5000].
    dashboard_header_read_timeout_ms: u64 = 5_000, "TRIBUTARY_DASHBOARD_HEADER_READ_TIMEOUT_MS", "Dashboard (cloud)";
    /// Cloud: the topic every dashboard action is written to, for audit [default: tributary.audit].
    audit_topic: String = "tributary.audit".into(), "TRIBUTARY_AUDIT_TOPIC", "Dashboard (cloud)";
    /// Serve Prometheus /metrics here (any node), e.g. 127.0.0.1:9100; empty for none [default: empty].
    metrics_addr: String = String::new(), "TRIBUTARY_METRICS_ADDR", "Every node";
    /// The largest uplink frame accepted [default: 8388608].
    frame_bytes_max: usize = 8 * 1024 * 1024, "TRIBUTARY_FRAME_BYTES_MAX", "Every node";
    /// QUIC keep-alive period [default: 200].
    keep_alive_interval_ms: u64 = 200, "TRIBUTARY_KEEP_ALIVE_INTERVAL_MS", "Every node";
    /// QUIC idle timeout: a silent link is declared dead after this [default: 1500].
    idle_timeout_ms: u64 = 1_500, "TRIBUTARY_IDLE_TIMEOUT_MS", "Every node";
    /// QUIC handshake bound; raise it on links with a round trip near half of it [default: 1000].
    connect_timeout_ms: u64 = 1_000, "TRIBUTARY_CONNECT_TIMEOUT_MS", "Every node";
    /// The ractor cluster's shared cookie (QUIC's mutual TLS already authenticates peers) [default: tributary].
    cluster_cookie: String = "tributary".into(), "TRIBUTARY_CLUSTER_COOKIE", "Every node";
    /// Edge: the MQTT broker as host:port; empty for no MQTT source [default: empty].
    mqtt_addr: String = String::new(), "TRIBUTARY_MQTT_ADDR", "MQTT (edge)";
    /// Edge: the MQTT topic filter to subscribe to (QoS 1) [default: tributary/+/telemetry].
    mqtt_topic: String = "tributary/+/telemetry".into(), "TRIBUTARY_MQTT_TOPIC", "MQTT (edge)";
    /// Edge: the topic level (1-based) holding the device id; 0 for the filter's first `+` [default: 0].
    mqtt_device_level: usize = 0, "TRIBUTARY_MQTT_DEVICE_LEVEL", "MQTT (edge)";
    /// Edge: the MQTT client id; keep it stable, the broker keeps unacked messages under it [default: tributary-<node_id>].
    mqtt_client_id: String = String::new(), "TRIBUTARY_MQTT_CLIENT_ID", "MQTT (edge)";
    /// Edge: MQTT devices whose figures are kept (first and last seen, readings); the least recently seen is forgotten [default: 100000].
    mqtt_devices_max: usize = 100_000, "TRIBUTARY_MQTT_DEVICES_MAX", "MQTT (edge)";
    /// Edge: MQTT messages held unacknowledged, 1 to 65535; past it the source stops reading for a quarter of the keep-alive, then leaves the excess unacked until a reconnect [default: 4096].
    mqtt_inflight_max: usize = 4096, "TRIBUTARY_MQTT_INFLIGHT_MAX", "MQTT (edge)";
    /// Edge: readings of one MQTT device at the gateway and not yet durable; past it that device's next ones wait [default: 4096].
    mqtt_device_inflight_max: usize = 4096, "TRIBUTARY_MQTT_DEVICE_INFLIGHT_MAX", "MQTT (edge)";
    /// Edge: requests (acks, subscribes) queued for the MQTT client; at least mqtt_inflight_max + 8; 0 for exactly that [default: 0].
    mqtt_queued_requests_max: usize = 0, "TRIBUTARY_MQTT_QUEUED_REQUESTS_MAX", "MQTT (edge)";
    /// Edge: MQTT keep-alive in ms, 4000 to 65535000 (MQTT counts whole seconds) [default: 30000].
    mqtt_keep_alive_ms: u64 = 30_000, "TRIBUTARY_MQTT_KEEP_ALIVE_MS", "MQTT (edge)";
    /// Edge: a message is taken for a redelivery only with MQTT's DUP flag set, as the spec requires; turn off only for a broker that omits it [default: true].
    mqtt_redelivery_requires_dup: bool = true, "TRIBUTARY_MQTT_REDELIVERY_REQUIRES_DUP", "MQTT (edge)";
    /// Edge: take retained messages (sent again at each subscription) as readings [default: false].
    mqtt_take_retained: bool = false, "TRIBUTARY_MQTT_TAKE_RETAINED", "MQTT (edge)";
    /// Edge: the largest MQTT packet accepted; keep the broker's limit at or below it [default: 262144].
    mqtt_packet_bytes_max: usize = 256 * 1024, "TRIBUTARY_MQTT_PACKET_BYTES_MAX", "MQTT (edge)";
    /// Supervisors: restarts allowed per period before escalating [default: 5].
    restarts_max: u32 = tributary_actors::supervision::RESTARTS_MAX_DEFAULT, "TRIBUTARY_RESTARTS_MAX", "Every node";
    /// Supervisors: the period of restarts_max [default: 10000].
    restart_period_ms: u64 = tributary_actors::supervision::RESTART_PERIOD_MS_DEFAULT, "TRIBUTARY_RESTART_PERIOD_MS", "Every node";
    /// Cloud: readings per stages transaction at most [default: 1000].
    stages_batch_readings_max: usize = 1000, "TRIBUTARY_STAGES_BATCH_READINGS_MAX", "Cloud";
    /// Cloud: how long the stages wait for readings before a quiet turn [default: 200].
    stages_poll_ms: u64 = 200, "TRIBUTARY_STAGES_POLL_MS", "Cloud";
    /// How far the stages' watermark trails the wall clock when input is quiet [default: 5000].
    stages_watermark_lag_ms: u64 = 5_000, "TRIBUTARY_STAGES_WATERMARK_LAG_MS", "Cloud";
    /// Cloud: the compacted topic through which cloud nodes share the fleet's status, so that any one's dashboard shows every node; `off` keeps each page to the nodes placed on it [default: <transactional_id_prefix>-status].
    status_topic: String = String::new(), "TRIBUTARY_STATUS_TOPIC", "Dashboard (cloud)";
    /// Cloud: the largest status record (one node's complete report); a larger one is not shared, and counted [default: 1000000].
    status_record_bytes_max: usize = 1_000_000, "TRIBUTARY_STATUS_RECORD_BYTES_MAX", "Dashboard (cloud)";
    /// Cloud: how long the stages' consumer group waits for a silent cloud node before its partitions (and their state) move to the others; the broker's group.min.session.timeout.ms (6000 by default) bounds it from below [default: 10000].
    stages_session_timeout_ms: u64 = 10_000, "TRIBUTARY_STAGES_SESSION_TIMEOUT_MS", "Cloud";
    /// Cloud: bound on reading back a partition's state when the group gives it to this node; past it the stages restart [default: 30000].
    stages_restore_timeout_ms: u64 = 30_000, "TRIBUTARY_STAGES_RESTORE_TIMEOUT_MS", "Cloud";
    /// Labels of this node, comma-separated: a topology places edge blocks by node id or label. They are part of the certificate (certs issue --labels); set here, they must match it [default: the certificate's].
    labels: String = String::new(), "TRIBUTARY_LABELS", "Every node";
}

/// A bad setting, named by its key.
#[derive(Debug)]
pub struct SettingError {
    pub key: &'static str,
    pub problem: String,
}

impl std::fmt::Display for SettingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid setting {}: {}", self.key, self.problem)
    }
}

impl std::error::Error for SettingError {}

/// The setting an MQTT configuration error is about.
fn mqtt_key(e: &tributary_actors::edge::mqtt::MqttConfigError) -> &'static str {
    use tributary_actors::edge::mqtt::MqttConfigError as E;
    match e {
        E::Address => "mqtt_addr",
        E::ClientId => "mqtt_client_id",
        E::Topic(_) => "mqtt_topic",
        E::NoDeviceLevel | E::DeviceLevel(_) => "mqtt_device_level",
        E::Zero("devices_max") => "mqtt_devices_max",
        E::Zero("device_inflight_max") => "mqtt_device_inflight_max",
        E::Zero(_) | E::Inflight(_) => "mqtt_inflight_max",
        E::QueuedRequests => "mqtt_queued_requests_max",
        E::KeepAlive => "mqtt_keep_alive_ms",
        E::PacketBytes => "mqtt_packet_bytes_max",
        E::Backoff => "reconnect_backoff_max_ms",
    }
}

fn bad(key: &'static str, problem: impl Into<String>) -> SettingError {
    SettingError {
        key,
        problem: problem.into(),
    }
}

/// Reads the TOML file, refusing unknown keys (a typo must not silently
/// fall back to a default).
pub fn load_file(path: &std::path::Path) -> anyhow::Result<Settings> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading the config file {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("in the config file {}: {e}", path.display()))
}

impl Resolved {
    /// The edge's cloud nodes from `cloud_addr`.
    pub fn clouds(
        &self,
    ) -> Result<Vec<tributary_cluster::uplink::link::CloudTarget>, SettingError> {
        use tributary_cluster::uplink::link::CLOUDS_MAX;
        let mut out = Vec::new();
        for entry in self.cloud_addr.split(',').map(str::trim) {
            let target = entry.parse().map_err(|e: String| bad("cloud_addr", e))?;
            if out.contains(&target) {
                return Err(bad("cloud_addr", format!("{entry:?} is given twice")));
            }
            out.push(target);
        }
        if out.len() > CLOUDS_MAX {
            return Err(bad(
                "cloud_addr",
                format!("names {} cloud nodes, at most {CLOUDS_MAX}", out.len()),
            ));
        }
        Ok(out)
    }

    /// An address setting validated as `ip:port` or empty.
    pub fn addr(value: &str) -> Option<SocketAddr> {
        value.parse().ok()
    }

    /// Checks what the components' own validation cannot know about.
    pub fn validate(&mut self) -> Result<(), SettingError> {
        tributary_cluster::tls::NodeId::new(self.node_id.clone()).map_err(|e| {
            bad(
                "node_id",
                if self.node_id.is_empty() {
                    "is required".to_string()
                } else {
                    e.to_string()
                },
            )
        })?;
        if self.outbox_dir.as_os_str().is_empty() {
            self.outbox_dir = PathBuf::from("data").join(&self.node_id).join("outbox");
        }
        if self.device_id_prefix.is_empty() {
            self.device_id_prefix = format!("{}-dev-", self.node_id);
        }
        for (name, addr) in [
            ("dashboard_addr", &self.dashboard_addr),
            ("metrics_addr", &self.metrics_addr),
        ] {
            if !addr.is_empty() && addr.parse::<SocketAddr>().is_err() {
                return Err(bad(name, format!("must be an ip:port, not {addr:?}")));
            }
        }
        if self.dashboard_view_token_required && self.dashboard_token.is_empty() {
            return Err(bad(
                "dashboard_view_token_required",
                "needs dashboard_token to be set",
            ));
        }
        if self.dashboard_connections_max == 0 || self.dashboard_pages_per_client_max == 0 {
            return Err(bad(
                "dashboard_connections_max",
                "dashboard_connections_max and dashboard_pages_per_client_max must be at least 1",
            ));
        }
        if !(100..=600_000).contains(&self.dashboard_header_read_timeout_ms) {
            return Err(bad(
                "dashboard_header_read_timeout_ms",
                "must be between 100 and 600000",
            ));
        }
        if !self.dashboard_token.is_empty() && self.dashboard_token.len() < 16 {
            return Err(bad(
                "dashboard_token",
                "must be at least 16 characters (or empty, which turns actions off)",
            ));
        }
        if !(self.device_rate_hz > 0.0 && self.device_rate_hz <= 1000.0) {
            return Err(bad(
                "device_rate_hz",
                format!("must be in (0, 1000], not {}", self.device_rate_hz),
            ));
        }
        if self.device_count > 100_000 {
            return Err(bad("device_count", "must be at most 100000"));
        }
        if !(0.0..=1.0).contains(&self.spike_probability) {
            return Err(bad("spike_probability", "must be between 0 and 1"));
        }
        if self.uplink_inflight_segments_max == 0 || self.uplink_inflight_segments_max > 1024 {
            return Err(bad(
                "uplink_inflight_segments_max",
                "must be between 1 and 1024",
            ));
        }
        self.clouds()?;
        if !(1..=64).contains(&self.ingest_shards) {
            return Err(bad("ingest_shards", "must be 1 to 64"));
        }
        if !(self.commit_segments_max..=65_536).contains(&self.ingest_transaction_segments_max) {
            return Err(bad(
                "ingest_transaction_segments_max",
                "must be at least commit_segments_max and at most 65536",
            ));
        }
        if self.commit_segments_max == 0 || self.pending_segments_max < self.commit_segments_max {
            return Err(bad(
                "commit_segments_max",
                "must be at least 1 and at most pending_segments_max",
            ));
        }
        if self.pending_segments_max < self.uplink_inflight_segments_max {
            return Err(bad(
                "pending_segments_max",
                "must be at least the edges' uplink_inflight_segments_max",
            ));
        }
        if self.frame_bytes_max < self.segment_bytes_max + 1024 {
            return Err(bad(
                "frame_bytes_max",
                "must exceed segment_bytes_max by at least 1 KiB",
            ));
        }
        if self.reconnect_backoff_initial_ms == 0
            || self.reconnect_backoff_max_ms < self.reconnect_backoff_initial_ms
        {
            return Err(bad(
                "reconnect_backoff_max_ms",
                "must be at least reconnect_backoff_initial_ms, which must be positive",
            ));
        }
        if self.restarts_max == 0 {
            return Err(bad("restarts_max", "must be at least 1"));
        }
        if self.mqtt_client_id.is_empty() {
            self.mqtt_client_id = format!("tributary-{}", self.node_id);
        }
        if self.mqtt_queued_requests_max == 0 {
            self.mqtt_queued_requests_max = self
                .mqtt_inflight_max
                .saturating_add(tributary_actors::edge::mqtt::config::REQUEST_HEADROOM);
        }
        if self.stages_checkpoint_interval_ms == 0 || self.stages_checkpoint_interval_ms > 3_600_000
        {
            return Err(bad(
                "stages_checkpoint_interval_ms",
                "must be between 1 and 3600000",
            ));
        }
        if self.stages_watermark_lag_ms > 86_400_000 {
            return Err(bad(
                "stages_watermark_lag_ms",
                "must be at most 86400000 (a day)",
            ));
        }
        if self.device_clock_skew_max_ms > 86_400_000 * 365 {
            return Err(bad("device_clock_skew_max_ms", "must be at most a year"));
        }
        self.mqtt()?;
        Ok(())
    }

    /// The MQTT source's settings, or `None` when `mqtt_addr` is empty.
    pub fn mqtt(&self) -> Result<Option<MqttConfig>, SettingError> {
        if self.mqtt_addr.is_empty() {
            return Ok(None);
        }
        let (host, port) = self
            .mqtt_addr
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.trim_matches(|c| c == '[' || c == ']'), p.parse().ok()?)))
            .filter(|(h, p): &(&str, u16)| !h.is_empty() && *p != 0)
            .ok_or_else(|| bad("mqtt_addr", "must be host:port"))?;
        let device_level = match self.mqtt_device_level {
            0 => first_wildcard_level(&self.mqtt_topic).ok_or_else(|| {
                bad(
                    "mqtt_device_level",
                    "is 0 (the first `+`), but mqtt_topic has no `+` level",
                )
            })?,
            n => n - 1,
        };
        let c = MqttConfig {
            host: host.to_string(),
            port,
            client_id: self.mqtt_client_id.clone(),
            topic: self.mqtt_topic.clone(),
            device_level,
            devices_max: self.mqtt_devices_max,
            inflight_max: self.mqtt_inflight_max,
            device_inflight_max: self.mqtt_device_inflight_max,
            queued_requests_max: self.mqtt_queued_requests_max,
            keep_alive_ms: self.mqtt_keep_alive_ms,
            packet_bytes_max: self.mqtt_packet_bytes_max,
            reconnect_backoff_initial_ms: self.reconnect_backoff_initial_ms,
            reconnect_backoff_max_ms: self.reconnect_backoff_max_ms,
            redelivery_requires_dup: self.mqtt_redelivery_requires_dup,
            take_retained: self.mqtt_take_retained,
            stream: None,
        };
        c.validate().map_err(|e| bad(mqtt_key(&e), e.to_string()))?;
        Ok(Some(c))
    }

    /// This node's labels, for topology placement.
    pub fn labels(&self) -> Vec<&str> {
        self.labels
            .split(',')
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect()
    }

    pub fn outbox(&self) -> tributary_actors::outbox::OutboxConfig {
        tributary_actors::outbox::OutboxConfig {
            outbox_bytes_max: self.outbox_bytes_max,
            segment_readings_max: self.segment_readings_max,
            segment_bytes_max: self.segment_bytes_max,
            commit_interval_ms: self.commit_interval_ms,
            full_policy: self.full_policy,
        }
    }

    pub fn quic(&self) -> tributary_cluster::quic::QuicConfig {
        tributary_cluster::quic::QuicConfig {
            keep_alive_interval_ms: self.keep_alive_interval_ms,
            idle_timeout_ms: self.idle_timeout_ms,
            connect_timeout_ms: self.connect_timeout_ms,
            first_stream_timeout_ms: self.first_stream_timeout_ms,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_the_file_which_beats_defaults() {
        let file: Settings =
            toml::from_str("node_id = \"edge-1\"\noutbox_bytes_max = 5\ncommit_interval_ms = 7")
                .unwrap();
        let flags = Settings {
            commit_interval_ms: Some(9),
            ..Default::default()
        };
        let r = flags.resolve(file);
        assert_eq!(
            (
                r.outbox_bytes_max,
                r.commit_interval_ms,
                r.segment_readings_max
            ),
            (5, 9, 1000)
        );
        // What was given, from either place, is told apart from defaults.
        let given: Vec<&str> = r.given.iter().copied().collect();
        assert_eq!(given, ["commit_interval_ms", "node_id", "outbox_bytes_max"]);
    }

    #[test]
    fn mqtt_settings_resolve() {
        let file: Settings = toml::from_str(
            "node_id = \"edge-1\"\nmqtt_addr = \"127.0.0.1:1883\"\nmqtt_topic = \"p/+/t\"",
        )
        .unwrap();
        let mut r = Settings::default().resolve(file);
        r.validate().unwrap();
        let c = r.mqtt().unwrap().expect("configured");
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 1883));
        assert_eq!(c.client_id, "tributary-edge-1");
        assert_eq!(c.device_level, 1);
        assert_eq!(c.queued_requests_max, c.inflight_max + 8, "derived");
        assert!(c.redelivery_requires_dup && !c.take_retained);
        let mut off = Settings::default().resolve(toml::from_str("node_id = \"e\"").unwrap());
        off.validate().unwrap();
        assert!(off.mqtt().unwrap().is_none());
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let err = toml::from_str::<Settings>("outbox_byte_max = 5")
            .unwrap_err()
            .to_string();
        assert!(err.contains("outbox_byte_max"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let file: Settings = toml::from_str("node_id = \"edge-1\"\ndevice_rate_hz = 0.0").unwrap();
        let err = Settings::default().resolve(file).validate().unwrap_err();
        assert_eq!(err.key, "device_rate_hz");
        let err = Settings::default()
            .resolve(Settings::default())
            .validate()
            .unwrap_err();
        assert_eq!(err.key, "node_id");
        let file: Settings =
            toml::from_str("node_id = \"edge-1\"\nmqtt_addr = \"localhost\"").unwrap();
        let err = Settings::default().resolve(file).validate().unwrap_err();
        assert_eq!(err.key, "mqtt_addr");
        let file: Settings = toml::from_str(
            "node_id = \"edge-1\"\nmqtt_addr = \"localhost:1883\"\nmqtt_topic = \"a/b\"",
        )
        .unwrap();
        let err = Settings::default().resolve(file).validate().unwrap_err();
        assert_eq!(err.key, "mqtt_device_level");
        let err = toml::from_str::<Settings>("full_policy = \"drop-newest\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("full_policy"), "{err}");
    }

    fn clouds_of(list: &str) -> Result<Vec<String>, SettingError> {
        let file: Settings =
            toml::from_str(&format!("node_id = \"edge-1\"\ncloud_addr = \"{list}\"")).unwrap();
        let mut s = Settings::default().resolve(file);
        s.validate()?;
        Ok(s.clouds()?.iter().map(|c| c.to_string()).collect())
    }

    #[test]
    fn cloud_addr_takes_a_list_of_addresses_and_dns_names() {
        assert_eq!(
            clouds_of("10.0.0.5:7400, Cloud-2.Plant.example:7401,[::1]:7402").unwrap(),
            ["10.0.0.5:7400", "cloud-2.plant.example:7401", "[::1]:7402"]
        );
        for bad in [
            "10.0.0.5",
            "cloud:0",
            "cloud:70000",
            "clo ud:7400",
            "-cloud:7400",
            ":7400",
            "a:7400,a:7400",
            "a:7400,,b:7400",
        ] {
            let err = clouds_of(bad).unwrap_err();
            assert_eq!(err.key, "cloud_addr", "{bad}: {err}");
        }
        let many: Vec<String> = (0..17).map(|i| format!("10.0.0.{i}:7400")).collect();
        let err = clouds_of(&many.join(",")).unwrap_err();
        assert!(err.to_string().contains("at most 16"), "{err}");
    }
}

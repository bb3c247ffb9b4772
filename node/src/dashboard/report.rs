//! What a node says about itself: its supervision tree, its backlog and its
//! counters, collected from its actors once a second. An edge sends its
//! report to the cloud over the cluster session; every node serves its own
//! on `/metrics`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ractor::ActorRef;
use serde::{Deserialize, Serialize};
use tributary_actors::cloud::stages::{CloudStagesMsg, CLOUD_STAGES_NAME};
use tributary_actors::cloud::{CloudCounters, ListenerMsg, LATENCY_BUCKETS};
use tributary_actors::edge::gateway::GatewayMsg;
use tributary_actors::edge::mqtt::MqttMsg;
use tributary_actors::edge::uplink::UplinkMsg;
use tributary_actors::edge::{EdgeNames, DEVICES_NAME, EDGE_NAME, GATEWAY_NAME, UPLINK_NAME};
use tributary_actors::supervision::{ChildStatus, SupervisorMsg};

/// How long collecting waits for one actor's status.
const STATUS_CALL_MS: u64 = 1_000;
/// The cloud's root supervisor, as `node` names it.
pub const CLOUD_ROOT: &str = "tributary.cloud";

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The last failure of an actor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub reason: String,
    pub at_ms: u64,
}

/// One actor of a node's supervision tree. `id` is unique in the cluster
/// (`<node>/<path>`) and stable across restarts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActorView {
    pub id: String,
    pub parent: Option<String>,
    /// The name it is registered under (what a restart action names).
    pub name: String,
    pub kind: String,
    /// running, restarting, stopped or failed.
    pub status: String,
    pub restarts: u32,
    pub last_failure: Option<Failure>,
    pub messages: Option<u64>,
    /// ractor does not expose mailbox lengths: always `None` today.
    pub mailbox: Option<u64>,
    /// Whether a supervisor restarts it when it is stopped.
    pub restartable: bool,
}

/// The figures of one component, Vector-style: they only grow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentFigures {
    pub component: String,
    pub received: u64,
    pub sent: u64,
    pub errors: u64,
    pub dropped: u64,
}

/// An edge's outbox, as its gateway sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxFigures {
    pub readings: u64,
    pub bytes: u64,
    pub oldest_unconfirmed_ms: Option<u64>,
    /// Readings committed to the outbox so far, and how many of them the
    /// cloud confirmed: their difference over time is the drain rate.
    pub readings_committed: u64,
    pub readings_confirmed: u64,
    pub dropped_by_policy: u64,
    pub refused_full: u64,
}

/// A peer as this node sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkFigures {
    pub peer: String,
    pub up: bool,
    pub rtt_ms: Option<f64>,
}

/// Everything a node reports, once a second.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    pub node_id: String,
    /// edge or cloud.
    pub role: String,
    pub at_ms: u64,
    pub actors: Vec<ActorView>,
    pub outbox: Option<OutboxFigures>,
    pub uplink_paused: Option<bool>,
    pub uplink_up: Option<bool>,
    pub components: Vec<ComponentFigures>,
    pub links: Vec<LinkFigures>,
    /// The cloud's end-to-end latency histogram: counts per power-of-two
    /// bucket of milliseconds, and their sum.
    pub latency_buckets: Option<Vec<u64>>,
    pub latency_sum_ms: Option<u64>,
    /// `true`: `actors` is the whole tree. `false`: only the actors that
    /// changed since the node's previous report, and `actors_removed` the
    /// ids of those gone (an edge sends these between complete reports,
    /// so 10,000 quiet device actors cost nothing per second).
    #[serde(default = "complete")]
    pub actors_complete: bool,
    #[serde(default)]
    pub actors_removed: Vec<String>,
}

fn complete() -> bool {
    true
}

impl NodeReport {
    fn new(node_id: &str, role: &str) -> Self {
        Self {
            node_id: node_id.to_string(),
            role: role.to_string(),
            at_ms: now_ms(),
            actors: Vec::new(),
            outbox: None,
            uplink_paused: None,
            uplink_up: None,
            components: Vec::new(),
            links: Vec::new(),
            latency_buckets: None,
            latency_sum_ms: None,
            actors_complete: true,
            actors_removed: Vec::new(),
        }
    }

    /// This report with only the actors that differ from `sent` (which it
    /// then updates): what an edge sends between complete reports.
    pub fn delta(&self, sent: &mut std::collections::HashMap<String, ActorView>) -> NodeReport {
        let mut out = NodeReport {
            actors: Vec::new(),
            actors_complete: false,
            ..self.clone()
        };
        let current: std::collections::HashSet<&String> =
            self.actors.iter().map(|a| &a.id).collect();
        out.actors_removed = sent
            .keys()
            .filter(|id| !current.contains(id))
            .cloned()
            .collect();
        for id in &out.actors_removed {
            sent.remove(id);
        }
        for a in &self.actors {
            if sent.get(&a.id) != Some(a) {
                sent.insert(a.id.clone(), a.clone());
                out.actors.push(a.clone());
            }
        }
        out
    }
}

fn status_of(c: &ChildStatus) -> &'static str {
    match (c.running, c.restarts) {
        (true, _) => "running",
        (false, 0) => "stopped",
        (false, _) => "restarting",
    }
}

fn kind_of(name: &str) -> &'static str {
    match name {
        GATEWAY_NAME => "gateway",
        UPLINK_NAME => "uplink",
        DEVICES_NAME | tributary_actors::edge::CLUSTER_NAME => "supervisor",
        CLOUD_STAGES_NAME => "stages",
        tributary_actors::cloud::LISTENER_NAME => "listener",
        n if n.starts_with("tributary.membership.") => "membership",
        n if n.contains(".control") => "control",
        n if n.starts_with("device/") => "device",
        n if n.starts_with("ingest/") => "ingest",
        n if n.contains("mqtt") => "mqtt-source",
        _ => "actor",
    }
}

fn child_view(parent: &str, c: &ChildStatus, messages: Option<u64>) -> ActorView {
    ActorView {
        id: format!("{parent}/{}", c.name),
        parent: Some(parent.to_string()),
        name: c.name.clone(),
        kind: kind_of(&c.name).to_string(),
        status: status_of(c).to_string(),
        restarts: c.restarts,
        last_failure: c.last_failure.as_ref().map(|reason| Failure {
            reason: reason.clone(),
            at_ms: c.last_failure_at.map_or(0, epoch_ms),
        }),
        messages,
        mailbox: None,
        restartable: true,
    }
}

impl ActorView {
    fn root(node: &str, name: &str, kind: &str, status: &str) -> Self {
        Self {
            id: format!("{node}/{name}"),
            parent: None,
            name: name.to_string(),
            kind: kind.to_string(),
            status: status.to_string(),
            restarts: 0,
            last_failure: None,
            messages: None,
            mailbox: None,
            restartable: false,
        }
    }
}

async fn supervisor_children(name: &str) -> Option<Vec<ChildStatus>> {
    let sup: ActorRef<SupervisorMsg> = ractor::registry::where_is(name)?.into();
    ractor::call_t!(sup, SupervisorMsg::Status, STATUS_CALL_MS).ok()
}

/// Collects an edge's report from its actors (registered under the default
/// names, as in a node process).
pub async fn collect_edge(node_id: &str) -> NodeReport {
    let mut r = NodeReport::new(node_id, "edge");
    let names = EdgeNames::default();
    let root_id = format!("{node_id}/{EDGE_NAME}");
    let root = supervisor_children(EDGE_NAME).await;
    r.actors.push(ActorView::root(
        node_id,
        EDGE_NAME,
        "supervisor",
        if root.is_some() { "running" } else { "failed" },
    ));
    let gateway = match names.where_is_gateway() {
        Some(g) => ractor::call_t!(g, GatewayMsg::Status, STATUS_CALL_MS).ok(),
        None => None,
    };
    let uplink: Option<ActorRef<UplinkMsg>> =
        ractor::registry::where_is(names.uplink()).map(Into::into);
    let uplink = match uplink {
        Some(u) => ractor::call_t!(u, UplinkMsg::Status, STATUS_CALL_MS).ok(),
        None => None,
    };
    let mqtt: Option<ActorRef<MqttMsg>> = ractor::registry::where_is(names.mqtt()).map(Into::into);
    let mqtt = match mqtt {
        Some(m) => ractor::call_t!(m, MqttMsg::Status, STATUS_CALL_MS).ok(),
        None => None,
    };
    for c in root.unwrap_or_default() {
        let messages = match c.name.as_str() {
            GATEWAY_NAME => gateway.as_ref().map(|g| g.stats.readings_received),
            UPLINK_NAME => uplink.as_ref().map(|u| u.segments_sent),
            n if n.contains("mqtt") => mqtt.as_ref().map(|m| m.core.stats.received),
            _ => None,
        };
        let view = child_view(&root_id, &c, messages);
        let devices_id = view.id.clone();
        let is_devices = c.name == DEVICES_NAME;
        r.actors.push(view);
        if is_devices {
            for d in supervisor_children(DEVICES_NAME).await.unwrap_or_default() {
                r.actors.push(child_view(&devices_id, &d, None));
            }
        }
    }
    if let Some(g) = &gateway {
        let s = &g.stats;
        r.outbox = Some(OutboxFigures {
            readings: g.backlog_readings,
            bytes: g.bytes_used,
            oldest_unconfirmed_ms: g.oldest_unconfirmed_us.map(|us| (us / 1000).max(0) as u64),
            readings_committed: s.readings_committed,
            readings_confirmed: s
                .readings_committed
                .saturating_sub(s.readings_dropped)
                .saturating_sub(g.backlog_readings),
            dropped_by_policy: s.readings_dropped,
            refused_full: s.readings_refused_full,
        });
        r.components.push(ComponentFigures {
            component: "gateway".into(),
            received: s.readings_received,
            sent: s.readings_committed,
            // A quarantined segment is damage found on disk: an error.
            errors: s.commit_errors
                + s.readings_invalid
                + g.readings_future
                + s.segments_quarantined,
            dropped: s.readings_dropped + g.stage_outputs_dropped,
        });
    }
    if let Some(u) = &uplink {
        r.uplink_paused = Some(u.paused);
        r.uplink_up = Some(u.up);
        r.components.push(ComponentFigures {
            component: "uplink".into(),
            received: 0,
            sent: u.segments_sent,
            errors: u.connects.saturating_sub(1),
            dropped: 0,
        });
    }
    if let Some(m) = &mqtt {
        let s = &m.core.stats;
        // Redeliveries and copies are not drops: each is a message already
        // durable or held, counted once under `sent`.
        r.components.push(ComponentFigures {
            component: "mqtt".into(),
            received: s.received,
            sent: s.committed,
            errors: s.bad_topic + s.bad_payload + s.refused,
            dropped: s.retained_skipped,
        });
    }
    r
}

/// Collects the cloud's report: its tree (the root supervisor, its children,
/// the listener's ingests), its stages, its counters and the latency
/// histogram.
pub async fn collect_cloud(node_id: &str, listener: &str, counters: &CloudCounters) -> NodeReport {
    use std::sync::atomic::Ordering::Relaxed;
    let mut r = NodeReport::new(node_id, "cloud");
    let listener_cell = ractor::registry::where_is(listener);
    let listener_ref: Option<ActorRef<ListenerMsg>> = listener_cell.clone().map(Into::into);
    let status = match &listener_ref {
        Some(l) => ractor::call_t!(l, ListenerMsg::Status, STATUS_CALL_MS).ok(),
        None => None,
    };
    let stages: Option<ActorRef<CloudStagesMsg>> =
        ractor::registry::where_is(CLOUD_STAGES_NAME).map(Into::into);
    let st = match stages {
        Some(s) => ractor::call_t!(s, CloudStagesMsg::Status, STATUS_CALL_MS).ok(),
        None => None,
    };
    let root_id = format!("{node_id}/{CLOUD_ROOT}");
    let children = supervisor_children(CLOUD_ROOT).await;
    r.actors.push(ActorView::root(
        node_id,
        CLOUD_ROOT,
        "supervisor",
        if children.is_some() {
            "running"
        } else {
            "failed"
        },
    ));
    for c in children.unwrap_or_default() {
        let messages = if c.name == listener {
            status.as_ref().map(|s| s.readings_committed)
        } else if c.name == CLOUD_STAGES_NAME {
            st.as_ref().map(|s| s.readings_polled)
        } else {
            None
        };
        r.actors.push(child_view(&root_id, &c, messages));
    }
    let listener_id = format!("{root_id}/{listener}");
    if let Some(cell) = listener_cell {
        let mut ingests: Vec<String> = cell
            .get_children()
            .iter()
            .filter_map(|c| c.get_name())
            .collect();
        ingests.sort();
        for name in ingests {
            r.actors.push(ActorView {
                id: format!("{listener_id}/{name}"),
                parent: Some(listener_id.clone()),
                kind: kind_of(&name).to_string(),
                name,
                status: "running".into(),
                restarts: 0,
                last_failure: None,
                messages: None,
                mailbox: None,
                // An ingest is not restarted: its edge reconnects.
                restartable: false,
            });
        }
    }
    if let Some(s) = st {
        r.components.push(ComponentFigures {
            component: "stages".into(),
            received: s.readings_polled,
            sent: s.records_written,
            errors: s.records_malformed,
            dropped: s.pipeline.outputs_cut,
        });
    }
    r.components.push(ComponentFigures {
        component: "ingest".into(),
        // A refused reading was received, and written to the refused topic
        // rather than sent on: an error of its edge.
        received: counters.readings_committed.load(Relaxed)
            + counters.readings_refused.load(Relaxed),
        sent: counters.readings_committed.load(Relaxed),
        errors: counters.protocol_errors.load(Relaxed)
            + counters.log_errors.load(Relaxed)
            + counters.segments_malformed.load(Relaxed)
            + counters.readings_refused.load(Relaxed),
        dropped: counters.segments_duplicate.load(Relaxed),
    });
    let (buckets, sum) = counters.latency.counts();
    debug_assert_eq!(buckets.len(), LATENCY_BUCKETS);
    r.latency_buckets = Some(buckets.to_vec());
    r.latency_sum_ms = Some(sum);
    r
}

/// How often nodes collect their report.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);

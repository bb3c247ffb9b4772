//! The supervision dashboard: one live page of every node and actor, edge
//! and cloud together, served by the cloud node.
//!
//! - Every node collects a [`NodeReport`] once a second (its supervision
//!   tree, its outbox, its counters); edges send theirs to the cloud on a
//!   QUIC stream of their own, bound to their certificate ([`reports`]);
//!   every node serves its own on `/metrics`.
//! - The cloud's [`Hub`] keeps the latest report of each node, with when it
//!   came, so a partitioned edge shows its last known state, marked stale.
//!   Each second it builds an update (nodes, changed actors, throughput,
//!   latency, new alerts) and broadcasts it to the page's SSE stream; a page
//!   that connects (or falls behind) gets a full snapshot first, serialized
//!   once per tick.
//! - What a node reports is its own business only: a report is kept only
//!   as its sender's (the certificate's node), every actor id and parent in
//!   it must carry that node (`<node>/…`), and a node keeps at most
//!   [`ACTORS_PER_NODE_MAX`] actors; what breaks these is dropped and
//!   counted, so no node can rewrite another's tree or mark another's actors
//!   restartable.
//! - Several cloud nodes: each publishes the reports of the nodes placed on
//!   it, and its own, to the compacted status topic once a second, and
//!   reads everyone's back ([`RelayedStatus`], `sink::kafka::status`), so
//!   any cloud node's page shows the whole fleet. A relayed node shows which
//!   cloud node it is placed on (`via`), and goes stale (down) when that
//!   node stops relaying it, so a cloud node that died is marked down on
//!   the others' pages, with the edges it held until they report elsewhere.
//!   Reports are compared by when their cloud node received them, so cloud
//!   nodes' clocks must agree to well within `STALE_AFTER_MS`. The charts
//!   and the alerts feed are this node's own.
//! - Actions (restart an actor, pause or resume an edge's uplink) need the
//!   configured bearer token, are written to the audit topic first, and go to
//!   edges as control calls.

pub mod metrics;
pub mod report;
pub mod reports;
pub mod server;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};
use tributary_actors::cloud::{LatencyHistogram, LATENCY_BUCKETS};
use tributary_actors::stages::Alert;

pub use report::{ActorView, NodeReport};

use crate::cluster::Member;

/// Points of each chart kept: ten minutes at one a second.
pub const SERIES_POINTS_MAX: usize = 600;
/// Alerts the feed keeps.
pub const ALERTS_SHOWN_MAX: usize = 100;
/// Nodes the hub keeps reports of; reports of further nodes are dropped and
/// counted.
pub const NODES_MAX: usize = 10_000;
/// Actors the hub keeps of one node (an edge's roots and ~10,000 device
/// actors fit twice over); actors past it are dropped and counted.
pub const ACTORS_PER_NODE_MAX: usize = 20_000;
/// The longest id, parent, name, kind or status an actor may have; an actor
/// with a longer one is dropped and counted.
pub const ACTOR_TEXT_BYTES_MAX: usize = 512;
/// A failure's reason, a node's role, a component's or a peer's name is
/// cut to this many bytes.
pub const REPORT_TEXT_BYTES_MAX: usize = 1024;
/// Components and links kept of one report; the rest are cut.
pub const REPORT_ITEMS_MAX: usize = 64;
/// A node whose last report is older than this is stale.
pub const STALE_AFTER_MS: u64 = 3_000;
/// A link slower than this is degraded.
pub const DEGRADED_RTT_MS: f64 = 500.0;

/// An edge's backlog, as the page shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Backlog {
    pub readings: u64,
    pub bytes: u64,
    pub oldest_unacked_age_ms: Option<u64>,
    pub drain_rate_per_s: f64,
    pub dropped_by_policy: u64,
    pub refused_full: u64,
}

/// One node, as the page shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub id: String,
    pub role: String,
    /// up, down or degraded.
    pub link: String,
    pub rtt_ms: Option<f64>,
    pub last_seen_ms: u64,
    pub stale: bool,
    pub stale_since_ms: Option<u64>,
    pub uplink_paused: Option<bool>,
    pub backlog: Option<Backlog>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actors: Option<Vec<ActorView>>,
    /// The cloud node this one's report came through, when that is another
    /// cloud node (the node is placed there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
}

/// One record of the status topic: the latest complete report of a node,
/// as the cloud node it is placed on (`via`) received it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayedStatus {
    pub via: String,
    /// When `via` received it, Unix ms by `via`'s clock.
    pub received_ms: u64,
    pub report: NodeReport,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThroughputPoint {
    pub t_ms: u64,
    pub readings_per_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyPoint {
    pub t_ms: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertView {
    pub at_ms: u64,
    pub stage: String,
    pub device: String,
    pub text: String,
}

/// The whole picture: what a page gets first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub now_ms: u64,
    pub cloud_id: String,
    pub nodes: Vec<NodeView>,
    pub throughput: Vec<ThroughputPoint>,
    pub latency: Vec<LatencyPoint>,
    /// Newest first.
    pub alerts: Vec<AlertView>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ActorChanges {
    pub upsert: Vec<ActorView>,
    pub remove: Vec<String>,
}

/// What changed in the last second.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Update {
    pub now_ms: u64,
    /// Every node, without actors.
    pub nodes: Vec<NodeView>,
    pub actors: ActorChanges,
    pub throughput: Vec<ThroughputPoint>,
    pub latency: Vec<LatencyPoint>,
    /// Newest first.
    pub alerts: Vec<AlertView>,
}

struct Reported {
    /// The latest report, its actors moved into `tree`.
    report: NodeReport,
    /// The node's actors by id, in id order (parents before children).
    tree: BTreeMap<String, ActorView>,
    received_ms: u64,
    /// (at_ms, readings confirmed) of the previous report, for the drain rate.
    previous_confirmed: Option<(u64, u64)>,
    /// The other cloud node that relayed it; `None`: it reported here.
    via: Option<String>,
}

/// The cloud's view of the cluster, fed by reports and ticks.
pub struct Hub {
    cloud_id: String,
    reports: BTreeMap<String, Reported>,
    /// Reports refused because `NODES_MAX` nodes were already known.
    pub reports_refused: u64,
    /// Reports whose sender is not the node they describe (a report stream
    /// is bound to its connection's certificate).
    pub reports_spoofed: u64,
    /// Reports that did not decode.
    pub reports_undecodable: u64,
    /// Reports kept.
    pub reports_kept: u64,
    /// Relayed reports kept, and those older than what was here already.
    pub relayed_kept: u64,
    pub relayed_older: u64,
    /// Status records that did not decode.
    pub relayed_undecodable: u64,
    /// Actors dropped because their id or parent is not of the reporting
    /// node.
    pub actors_foreign: u64,
    /// Actors dropped because their node had `ACTORS_PER_NODE_MAX` already.
    pub actors_over_limit: u64,
    /// Actors dropped because a text of theirs is over `ACTOR_TEXT_BYTES_MAX`.
    pub actors_oversized: u64,
    members: Vec<Member>,
    throughput: VecDeque<ThroughputPoint>,
    latency: VecDeque<LatencyPoint>,
    alerts: VecDeque<AlertView>,
    /// Actors changed or removed since the last update, to send only those:
    /// (node, actor id), so that no node's report touches another's.
    actors_dirty: BTreeSet<(String, String)>,
    actors_removed: BTreeSet<(String, String)>,
    last_tick: Option<(u64, u64, [u64; LATENCY_BUCKETS])>,
}

fn node_link(member: Option<&Member>, fresh: bool, is_self: bool) -> (&'static str, Option<f64>) {
    if is_self {
        return ("up", None);
    }
    match member {
        Some(m) if m.up => {
            let rtt = m.rtt.map(|d| d.as_secs_f64() * 1000.0);
            let slow = rtt.is_some_and(|r| r > DEGRADED_RTT_MS);
            (if slow || !fresh { "degraded" } else { "up" }, rtt)
        }
        _ => ("down", None),
    }
}

fn alert_view(a: &Alert) -> AlertView {
    AlertView {
        at_ms: (a.device_ts_us / 1000).max(0) as u64,
        stage: a.stage.clone(),
        device: a.device_id.clone(),
        text: a.message.clone(),
    }
}

impl Hub {
    pub fn new(cloud_id: &str) -> Self {
        Self {
            cloud_id: cloud_id.to_string(),
            reports: BTreeMap::new(),
            reports_refused: 0,
            reports_spoofed: 0,
            reports_undecodable: 0,
            reports_kept: 0,
            relayed_kept: 0,
            relayed_older: 0,
            relayed_undecodable: 0,
            actors_foreign: 0,
            actors_over_limit: 0,
            actors_oversized: 0,
            members: Vec::new(),
            throughput: VecDeque::new(),
            latency: VecDeque::new(),
            alerts: VecDeque::new(),
            actors_dirty: BTreeSet::new(),
            actors_removed: BTreeSet::new(),
            last_tick: None,
        }
    }

    /// Keeps a report that came from `peer` (its certified id): a report of
    /// another node is refused and counted.
    pub fn put_report_from(&mut self, peer: &str, report: NodeReport, now_ms: u64) {
        if report.node_id != peer {
            self.reports_spoofed += 1;
            if self.reports_spoofed.is_power_of_two() {
                tracing::warn!(%peer, claimed = %report.node_id, spoofed = self.reports_spoofed, "a node sent a report for another node; refused (logged at powers of two)");
            }
            return;
        }
        self.put_report(report, now_ms);
    }

    /// Keeps `report` as its node's latest. A complete report replaces the
    /// node's tree; otherwise its actors are the changed ones and
    /// `actors_removed` the gone ones. Only the node's own actors are taken
    /// (ids and parents under `<node_id>/`), at most `ACTORS_PER_NODE_MAX`.
    pub fn put_report(&mut self, report: NodeReport, now_ms: u64) {
        self.put_report_via(report, now_ms, None);
    }

    /// Keeps a report another cloud node relayed, unless what is here is
    /// newer (a node that moved here reports directly, and the old node's
    /// last relay of it is older).
    pub fn put_relayed(&mut self, status: RelayedStatus) {
        let RelayedStatus {
            via,
            received_ms,
            report,
        } = status;
        if via == self.cloud_id || report.node_id == self.cloud_id || !report.actors_complete {
            return;
        }
        if self
            .reports
            .get(&report.node_id)
            .is_some_and(|r| r.received_ms >= received_ms)
        {
            self.relayed_older += 1;
            return;
        }
        self.relayed_kept += 1;
        self.put_report_via(report, received_ms, Some(via));
    }

    /// The complete latest report of every node that reported here (this
    /// node's own included) within `STALE_AFTER_MS`, for the status topic.
    pub fn direct_reports(&self, now_ms: u64) -> Vec<RelayedStatus> {
        self.reports
            .values()
            .filter(|r| r.via.is_none() && now_ms.saturating_sub(r.received_ms) <= STALE_AFTER_MS)
            .map(|r| {
                let mut report = r.report.clone();
                report.actors = r.tree.values().cloned().collect();
                report.actors_complete = true;
                report.actors_removed.clear();
                RelayedStatus {
                    via: self.cloud_id.clone(),
                    received_ms: r.received_ms,
                    report,
                }
            })
            .collect()
    }

    fn put_report_via(&mut self, mut report: NodeReport, now_ms: u64, via: Option<String>) {
        if !self.reports.contains_key(&report.node_id) && self.reports.len() >= NODES_MAX {
            self.reports_refused += 1;
            return;
        }
        self.reports_kept += 1;
        bound_fields(&mut report);
        let node = report.node_id.clone();
        let prefix = format!("{node}/");
        let own = |id: &str| id.starts_with(&prefix);
        let mut actors = std::mem::take(&mut report.actors);
        let removed = std::mem::take(&mut report.actors_removed);
        let before = actors.len();
        actors.retain(|a| own(&a.id) && a.parent.as_deref().is_none_or(own));
        let foreign = before - actors.len();
        let before = actors.len();
        actors.retain(actor_fits);
        let oversized = before - actors.len();
        for a in &mut actors {
            if let Some(f) = &mut a.last_failure {
                cut(&mut f.reason, REPORT_TEXT_BYTES_MAX);
            }
        }
        let mut over_limit = 0;
        if report.actors_complete && actors.len() > ACTORS_PER_NODE_MAX {
            // Parents come before their children in a report: the first
            // ones are the tree's top.
            over_limit += actors.len() - ACTORS_PER_NODE_MAX;
            actors.truncate(ACTORS_PER_NODE_MAX);
        }
        let entry = self
            .reports
            .entry(node.clone())
            .or_insert_with(|| Reported {
                report: report.clone(),
                tree: BTreeMap::new(),
                received_ms: now_ms,
                previous_confirmed: None,
                via: None,
            });
        entry.previous_confirmed = entry
            .report
            .outbox
            .as_ref()
            .map(|o| (entry.report.at_ms, o.readings_confirmed))
            .filter(|(at, _)| *at < report.at_ms);
        let key = |id: &String| (node.clone(), id.clone());
        if report.actors_complete {
            let keep: BTreeSet<&String> = actors.iter().map(|a| &a.id).collect();
            for gone in entry.tree.keys().filter(|id| !keep.contains(id)) {
                self.actors_dirty.remove(&key(gone));
                self.actors_removed.insert(key(gone));
            }
            entry.tree.retain(|id, _| keep.contains(id));
        }
        // Removals name ids in this node's tree only: another node's are
        // not there to remove.
        for id in removed {
            if entry.tree.remove(&id).is_some() {
                self.actors_dirty.remove(&key(&id));
                self.actors_removed.insert(key(&id));
            }
        }
        for a in actors {
            if entry.tree.get(&a.id) == Some(&a) {
                continue;
            }
            if !entry.tree.contains_key(&a.id) && entry.tree.len() >= ACTORS_PER_NODE_MAX {
                over_limit += 1;
                continue;
            }
            self.actors_removed.remove(&key(&a.id));
            self.actors_dirty.insert(key(&a.id));
            entry.tree.insert(a.id.clone(), a);
        }
        entry.report = report;
        entry.received_ms = now_ms;
        entry.via = via;
        self.count_dropped(&node, foreign, over_limit, oversized);
    }

    /// Counts the actors a report of `node` lost, and says so now and then.
    fn count_dropped(&mut self, node: &str, foreign: usize, over_limit: usize, oversized: usize) {
        for (n, counter, what) in [
            (foreign, &mut self.actors_foreign, "actors of another node"),
            (
                over_limit,
                &mut self.actors_over_limit,
                "actors past ACTORS_PER_NODE_MAX",
            ),
            (
                oversized,
                &mut self.actors_oversized,
                "actors with an oversized text",
            ),
        ] {
            if n == 0 {
                continue;
            }
            let before = *counter;
            *counter += n as u64;
            // Logged when the count passes a power of two: a node that
            // keeps sending them cannot flood the log.
            if (before + 1).next_power_of_two() <= *counter {
                tracing::warn!(%node, dropped = n, total = *counter, "a report carried {what}; dropped (logged at powers of two)");
            }
        }
    }

    pub fn set_members(&mut self, members: Vec<Member>) {
        self.members = members;
    }

    /// Adds the alerts committed since the last tick (`recent` is the feed,
    /// oldest first; those already shown are recognised and skipped).
    fn take_alerts(&mut self, recent: &[Alert]) -> Vec<AlertView> {
        let newest_shown = self.alerts.front().cloned();
        let views: Vec<AlertView> = recent.iter().map(alert_view).collect();
        let start = match newest_shown {
            Some(n) => views.iter().rposition(|v| *v == n).map_or(0, |i| i + 1),
            None => 0,
        };
        let mut new: Vec<AlertView> = views[start..].to_vec();
        new.reverse();
        for a in new.iter().rev() {
            self.alerts.push_front(a.clone());
        }
        self.alerts.truncate(ALERTS_SHOWN_MAX);
        new
    }

    fn view(&self, id: &str, r: &Reported, now_ms: u64, with_actors: bool) -> NodeView {
        let is_self = id == self.cloud_id;
        let member = self.members.iter().find(|m| m.peer == id);
        let fresh = now_ms.saturating_sub(r.received_ms) <= STALE_AFTER_MS;
        let (link, rtt_ms) = match &r.via {
            // Placed on another cloud node: up while that node relays it.
            Some(_) => (if fresh { "up" } else { "down" }, None),
            None => node_link(member, fresh, is_self),
        };
        let stale = !is_self && (!fresh || link == "down");
        let stale_since_ms = stale.then(|| match member {
            // Down: since the link went down, which is when it stopped reporting.
            Some(m) if !m.up && r.via.is_none() => epoch_ms_of(m.since),
            _ => r.received_ms + STALE_AFTER_MS,
        });
        let backlog = r.report.outbox.as_ref().map(|o| {
            let drain = match r.previous_confirmed {
                Some((at, confirmed)) if r.report.at_ms > at => {
                    o.readings_confirmed.saturating_sub(confirmed) as f64 * 1000.0
                        / (r.report.at_ms - at) as f64
                }
                _ => 0.0,
            };
            Backlog {
                readings: o.readings,
                bytes: o.bytes,
                oldest_unacked_age_ms: o
                    .oldest_unconfirmed_ms
                    .map(|t| r.report.at_ms.saturating_sub(t)),
                drain_rate_per_s: drain,
                dropped_by_policy: o.dropped_by_policy,
                refused_full: o.refused_full,
            }
        });
        NodeView {
            id: id.to_string(),
            role: r.report.role.clone(),
            link: link.to_string(),
            rtt_ms,
            last_seen_ms: r.received_ms,
            stale,
            stale_since_ms,
            uplink_paused: r.report.uplink_paused,
            backlog,
            actors: with_actors.then(|| r.tree.values().cloned().collect()),
            via: r.via.clone(),
        }
    }

    /// Edges that are members but never reported still appear, as down or
    /// waiting.
    fn unreported(&self, now_ms: u64) -> Vec<NodeView> {
        self.members
            .iter()
            .filter(|m| !self.reports.contains_key(&m.peer))
            .map(|m| NodeView {
                id: m.peer.clone(),
                role: m.role.as_str().to_string(),
                link: if m.up { "up" } else { "down" }.to_string(),
                rtt_ms: m.rtt.map(|d| d.as_secs_f64() * 1000.0),
                last_seen_ms: epoch_ms_of(m.since),
                stale: true,
                stale_since_ms: Some(epoch_ms_of(m.since).min(now_ms)),
                uplink_paused: None,
                backlog: None,
                actors: None,
                via: None,
            })
            .collect()
    }

    pub fn snapshot(&self, now_ms: u64) -> Snapshot {
        let mut nodes: Vec<NodeView> = self
            .reports
            .iter()
            .map(|(id, r)| self.view(id, r, now_ms, true))
            .collect();
        nodes.extend(self.unreported(now_ms));
        Snapshot {
            now_ms,
            cloud_id: self.cloud_id.clone(),
            nodes,
            throughput: self.throughput.iter().cloned().collect(),
            latency: self.latency.iter().cloned().collect(),
            alerts: self.alerts.iter().cloned().collect(),
        }
    }

    /// Moves the charts and the feed on by one tick and says what changed.
    pub fn tick(&mut self, now_ms: u64, alerts: &[Alert]) -> Update {
        let mut throughput = Vec::new();
        let mut latency = Vec::new();
        if let Some(cloud) = self.reports.get(&self.cloud_id) {
            let committed = cloud
                .report
                .components
                .iter()
                .find(|c| c.component == "ingest")
                .map_or(0, |c| c.sent);
            let mut buckets = [0u64; LATENCY_BUCKETS];
            if let Some(b) = &cloud.report.latency_buckets {
                for (o, v) in buckets.iter_mut().zip(b) {
                    *o = *v;
                }
            }
            if let Some((at, before, before_buckets)) = self.last_tick {
                let dt = now_ms.saturating_sub(at).max(1) as f64 / 1000.0;
                throughput.push(ThroughputPoint {
                    t_ms: now_ms,
                    readings_per_s: committed.saturating_sub(before) as f64 / dt,
                });
                let mut delta = [0u64; LATENCY_BUCKETS];
                for i in 0..LATENCY_BUCKETS {
                    delta[i] = buckets[i].saturating_sub(before_buckets[i]);
                }
                latency.push(LatencyPoint {
                    t_ms: now_ms,
                    p50_ms: LatencyHistogram::quantile_ms(&delta, 0.5).map(|v| v as f64),
                    p99_ms: LatencyHistogram::quantile_ms(&delta, 0.99).map(|v| v as f64),
                });
            }
            self.last_tick = Some((now_ms, committed, buckets));
        }
        for p in &throughput {
            if self.throughput.len() == SERIES_POINTS_MAX {
                self.throughput.pop_front();
            }
            self.throughput.push_back(p.clone());
        }
        for p in &latency {
            if self.latency.len() == SERIES_POINTS_MAX {
                self.latency.pop_front();
            }
            self.latency.push_back(p.clone());
        }
        let new_alerts = self.take_alerts(alerts);
        let mut nodes: Vec<NodeView> = self
            .reports
            .iter()
            .map(|(id, r)| self.view(id, r, now_ms, false))
            .collect();
        nodes.extend(self.unreported(now_ms));
        let mut changes = ActorChanges::default();
        let dirty = std::mem::take(&mut self.actors_dirty);
        for (node, id) in dirty {
            if let Some(a) = self.reports.get(&node).and_then(|r| r.tree.get(&id)) {
                changes.upsert.push(a.clone());
            }
        }
        changes.remove = std::mem::take(&mut self.actors_removed)
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        Update {
            now_ms,
            nodes,
            actors: changes,
            throughput,
            latency,
            alerts: new_alerts,
        }
    }

    /// The latest report of `node` (without its actors), if any.
    pub fn report(&self, node: &str) -> Option<&NodeReport> {
        self.reports.get(node).map(|r| &r.report)
    }

    /// Whether `node` reported a restartable actor registered as `name`.
    pub fn restartable(&self, node: &str, name: &str) -> bool {
        self.reports
            .get(node)
            .is_some_and(|r| r.tree.values().any(|a| a.name == name && a.restartable))
    }

    pub fn cloud_id(&self) -> &str {
        &self.cloud_id
    }
}

/// Whether every text of `a` is within `ACTOR_TEXT_BYTES_MAX`.
fn actor_fits(a: &ActorView) -> bool {
    [&a.id, &a.name, &a.kind, &a.status]
        .into_iter()
        .chain(a.parent.as_ref())
        .all(|t| t.len() <= ACTOR_TEXT_BYTES_MAX)
}

/// Cuts `s` to at most `max` bytes, at a character boundary.
fn cut(s: &mut String, max: usize) {
    if s.len() > max {
        let mut at = max;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
    }
}

/// Bounds what a report keeps besides its actors: its lists and texts.
fn bound_fields(r: &mut NodeReport) {
    cut(&mut r.role, REPORT_TEXT_BYTES_MAX);
    r.components.truncate(REPORT_ITEMS_MAX);
    for c in &mut r.components {
        cut(&mut c.component, REPORT_TEXT_BYTES_MAX);
    }
    r.links.truncate(REPORT_ITEMS_MAX);
    for l in &mut r.links {
        cut(&mut l.peer, REPORT_TEXT_BYTES_MAX);
    }
    if let Some(b) = &mut r.latency_buckets {
        b.truncate(LATENCY_BUCKETS);
    }
}

fn epoch_ms_of(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use tributary_actors::stages::AlertKind;
    use tributary_cluster::tls::Role;

    use super::report::{ComponentFigures, OutboxFigures};
    use super::*;

    const T0: u64 = 1_800_000_000_000;

    fn actor(node: &str, name: &str, restarts: u32) -> ActorView {
        ActorView {
            id: format!("{node}/{name}"),
            parent: None,
            name: name.into(),
            kind: "device".into(),
            status: "running".into(),
            restarts,
            last_failure: None,
            messages: None,
            mailbox: None,
            restartable: true,
        }
    }

    fn report(
        node: &str,
        role: &str,
        at_ms: u64,
        confirmed: u64,
        actors: Vec<ActorView>,
    ) -> NodeReport {
        NodeReport {
            node_id: node.into(),
            role: role.into(),
            at_ms,
            actors,
            outbox: (role == "edge").then(|| OutboxFigures {
                readings: 10,
                bytes: 1000,
                oldest_unconfirmed_ms: Some(at_ms - 500),
                readings_committed: confirmed + 10,
                readings_confirmed: confirmed,
                dropped_by_policy: 0,
                refused_full: 0,
            }),
            uplink_paused: (role == "edge").then_some(false),
            uplink_up: None,
            components: vec![ComponentFigures {
                component: "ingest".into(),
                received: confirmed,
                sent: confirmed,
                errors: 0,
                dropped: 0,
            }],
            links: Vec::new(),
            latency_buckets: None,
            latency_sum_ms: None,
            actors_complete: true,
            actors_removed: Vec::new(),
        }
    }

    fn member(peer: &str, up: bool, since_ms: u64) -> Member {
        Member {
            peer: peer.into(),
            role: Role::Edge,
            up,
            since: UNIX_EPOCH + Duration::from_millis(since_ms),
            rtt: Some(Duration::from_millis(3)),
            session: 1,
            ups: 1,
        }
    }

    /// Two cloud nodes: each page shows the nodes placed on the other,
    /// through the status the other publishes; a node that moved here is
    /// taken as it reports here, not as the other's last relay of it; and a
    /// cloud node that stops publishing is down with the edges it held.
    #[test]
    fn a_relayed_node_shows_where_it_is_placed_and_goes_down_with_its_cloud_node() {
        let mut one = Hub::new("cloud-1");
        let mut two = Hub::new("cloud-2");
        one.put_report(report("cloud-1", "cloud", T0, 0, Vec::new()), T0);
        one.put_report_from(
            "edge-1",
            report("edge-1", "edge", T0, 5, vec![actor("edge-1", "gateway", 0)]),
            T0,
        );
        for status in one.direct_reports(T0) {
            assert_eq!(status.via, "cloud-1");
            two.put_relayed(status);
        }
        // Its own report, relayed back, is not taken.
        for status in two.direct_reports(T0) {
            two.put_relayed(status);
        }
        let snap = two.snapshot(T0 + 500);
        let e = node(&snap, "edge-1");
        assert_eq!(
            (e.via.as_deref(), e.link.as_str(), e.stale),
            (Some("cloud-1"), "up", false),
            "{e:?}"
        );
        assert_eq!(e.actors.as_ref().map(Vec::len), Some(1));
        assert_eq!(node(&snap, "cloud-1").link, "up");

        // cloud-1 stops publishing: it and its edge go down on cloud-2's page.
        let late = T0 + STALE_AFTER_MS + 1_000;
        let snap = two.snapshot(late);
        for id in ["cloud-1", "edge-1"] {
            let n = node(&snap, id);
            assert!(n.stale && n.link == "down", "{n:?}");
        }

        // edge-1 moves to cloud-2 and reports there; cloud-1's old relay of
        // it, arriving late, does not take it back.
        two.set_members(vec![member("edge-1", true, late)]);
        two.put_report_from(
            "edge-1",
            report("edge-1", "edge", late, 9, Vec::new()),
            late,
        );
        let old = one.direct_reports(T0);
        for status in old {
            two.put_relayed(status);
        }
        let e = node(&two.snapshot(late), "edge-1").clone();
        assert_eq!((e.via, e.stale), (None, false));
        assert!(two.relayed_older >= 1);
        // Direct reports older than the stale bound are not published.
        assert!(one.direct_reports(late).is_empty());
    }

    fn node<'a>(s: &'a Snapshot, id: &str) -> &'a NodeView {
        s.nodes
            .iter()
            .find(|n| n.id == id)
            .expect("node in snapshot")
    }

    #[test]
    fn a_silent_or_partitioned_edge_is_stale_with_its_last_state() {
        let mut hub = Hub::new("cloud-1");
        hub.set_members(vec![member("edge-1", true, T0)]);
        hub.put_report(
            report(
                "edge-1",
                "edge",
                T0,
                100,
                vec![actor("edge-1", "device/d0", 0)],
            ),
            T0,
        );
        hub.put_report(
            report(
                "edge-1",
                "edge",
                T0 + 1000,
                300,
                vec![actor("edge-1", "device/d0", 0)],
            ),
            T0 + 1000,
        );
        let fresh = hub.snapshot(T0 + 1500);
        let e = node(&fresh, "edge-1");
        assert!(!e.stale);
        assert_eq!(e.link, "up");
        let b = e.backlog.as_ref().unwrap();
        assert_eq!(b.drain_rate_per_s, 200.0);
        assert_eq!(b.oldest_unacked_age_ms, Some(500));
        // Reports stop: stale after STALE_AFTER_MS, the figures kept.
        let silent = hub.snapshot(T0 + 1000 + STALE_AFTER_MS + 1);
        let e = node(&silent, "edge-1");
        assert!(e.stale);
        assert_eq!(e.link, "degraded");
        assert_eq!(e.stale_since_ms, Some(T0 + 1000 + STALE_AFTER_MS));
        assert_eq!(e.backlog.as_ref().unwrap().readings, 10);
        // The session went down: down and stale since then.
        hub.set_members(vec![member("edge-1", false, T0 + 1200)]);
        let down = hub.snapshot(T0 + 1300);
        let e = node(&down, "edge-1");
        assert_eq!((e.link.as_str(), e.stale), ("down", true));
        assert_eq!(e.stale_since_ms, Some(T0 + 1200));
    }

    #[test]
    fn updates_carry_only_changed_actors_and_new_alerts() {
        let mut hub = Hub::new("cloud-1");
        let actors = vec![
            actor("edge-1", "device/d0", 0),
            actor("edge-1", "device/d1", 0),
        ];
        hub.put_report(report("edge-1", "edge", T0, 0, actors.clone()), T0);
        let first = hub.tick(T0, &[]);
        assert_eq!(first.actors.upsert.len(), 2);
        let quiet = hub.tick(T0 + 1000, &[]);
        assert!(quiet.actors.upsert.is_empty() && quiet.actors.remove.is_empty());
        let changed = vec![actor("edge-1", "device/d0", 1)];
        hub.put_report(report("edge-1", "edge", T0 + 2000, 0, changed), T0 + 2000);
        let u = hub.tick(T0 + 2000, &[]);
        assert_eq!(u.actors.upsert, vec![actor("edge-1", "device/d0", 1)]);
        assert_eq!(u.actors.remove, vec!["edge-1/device/d1".to_string()]);

        let alert = |n: i64| Alert {
            device_id: "d0".into(),
            stage: "overheat".into(),
            kind: AlertKind::ThresholdAbove,
            metric: "t".into(),
            value: 1.0,
            device_ts_us: n * 1000,
            message: format!("alert {n}"),
        };
        let a = hub.tick(T0 + 3000, &[alert(1), alert(2)]);
        assert_eq!(
            a.alerts.iter().map(|a| a.text.as_str()).collect::<Vec<_>>(),
            ["alert 2", "alert 1"]
        );
        let b = hub.tick(T0 + 4000, &[alert(1), alert(2), alert(3)]);
        assert_eq!(
            b.alerts.iter().map(|a| a.text.as_str()).collect::<Vec<_>>(),
            ["alert 3"]
        );
        assert_eq!(hub.snapshot(T0 + 4000).alerts.len(), 3);
    }

    #[test]
    fn an_edge_sends_only_what_changed_between_complete_reports() {
        let mut hub = Hub::new("cloud-1");
        let full = report(
            "edge-1",
            "edge",
            T0,
            0,
            vec![
                actor("edge-1", "a", 0),
                actor("edge-1", "b", 0),
                actor("edge-1", "c", 0),
            ],
        );
        let mut sent = std::collections::HashMap::new();
        let first = full.delta(&mut sent);
        assert_eq!(first.actors.len(), 3, "everything is new the first time");
        hub.put_report(full, T0);
        hub.tick(T0, &[]);
        let next = report(
            "edge-1",
            "edge",
            T0 + 1000,
            0,
            vec![actor("edge-1", "a", 1), actor("edge-1", "c", 0)],
        );
        let delta = next.delta(&mut sent);
        assert!(!delta.actors_complete);
        assert_eq!(delta.actors, vec![actor("edge-1", "a", 1)]);
        assert_eq!(delta.actors_removed, vec!["edge-1/b".to_string()]);
        hub.put_report(delta, T0 + 1000);
        let u = hub.tick(T0 + 1000, &[]);
        assert_eq!(u.actors.upsert, vec![actor("edge-1", "a", 1)]);
        assert_eq!(u.actors.remove, vec!["edge-1/b".to_string()]);
        let s = hub.snapshot(T0 + 1000);
        let names: Vec<String> = node(&s, "edge-1")
            .actors
            .as_ref()
            .unwrap()
            .iter()
            .map(|a| a.name.clone())
            .collect();
        assert_eq!(names, ["a", "c"]);
        assert!(hub.restartable("edge-1", "a") && !hub.restartable("edge-1", "b"));
    }

    #[test]
    fn reports_of_too_many_nodes_are_refused_and_counted() {
        let mut hub = Hub::new("cloud-1");
        for i in 0..NODES_MAX {
            hub.put_report(report(&format!("e{i}"), "edge", T0, 0, Vec::new()), T0);
        }
        hub.put_report(report("one-more", "edge", T0, 0, Vec::new()), T0);
        assert_eq!(hub.reports_refused, 1);
        // A known node still updates.
        hub.put_report(report("e0", "edge", T0 + 1, 0, Vec::new()), T0 + 1);
        assert_eq!(hub.reports_refused, 1);
    }

    #[test]
    fn a_report_for_another_node_is_refused_and_counted() {
        let mut hub = Hub::new("cloud-1");
        let own = report(
            "edge-2",
            "edge",
            T0,
            0,
            vec![actor("edge-2", "device/d0", 0)],
        );
        hub.put_report_from("edge-2", own, T0);
        // edge-1's certificate, edge-2's name: refused, edge-2 untouched.
        let forged = report(
            "edge-2",
            "edge",
            T0 + 1,
            0,
            vec![actor("edge-2", "evil", 0)],
        );
        hub.put_report_from("edge-1", forged, T0 + 1);
        // And a node that does not exist is not made up either.
        hub.put_report_from("edge-1", report("ghost", "edge", T0, 0, Vec::new()), T0);
        assert_eq!(hub.reports_spoofed, 2);
        assert_eq!(hub.reports_kept, 1);
        let s = hub.snapshot(T0 + 1);
        assert!(s.nodes.iter().all(|n| n.id != "ghost" && n.id != "edge-1"));
        let names: Vec<&str> = node(&s, "edge-2")
            .actors
            .as_ref()
            .unwrap()
            .iter()
            .map(|a| a.name.as_str())
            .collect();
        assert_eq!(names, ["device/d0"]);
        assert_eq!(node(&s, "edge-2").last_seen_ms, T0);
        assert!(!hub.restartable("edge-2", "evil"));
    }

    #[test]
    fn actors_of_another_node_are_dropped_and_counted() {
        let mut hub = Hub::new("cloud-1");
        let mut victim = actor("edge-2", "device/d0", 0);
        victim.restartable = false;
        hub.put_report_from(
            "edge-2",
            report("edge-2", "edge", T0, 0, vec![victim.clone()]),
            T0,
        );
        hub.tick(T0, &[]);
        // edge-1 names edge-2's actor (to mark it restartable), hangs one of
        // its own under edge-2's, and tries to remove edge-2's.
        let mut claimed = victim.clone();
        claimed.restartable = true;
        let mut adopted = actor("edge-1", "device/d9", 0);
        adopted.parent = Some("edge-2/tributary.edge".into());
        let mut r = report(
            "edge-1",
            "edge",
            T0 + 1000,
            0,
            vec![claimed, adopted, actor("edge-1", "device/d1", 0)],
        );
        r.actors_removed = vec![victim.id.clone()];
        hub.put_report_from("edge-1", r.clone(), T0 + 1000);
        r.actors_complete = false;
        hub.put_report_from("edge-1", r, T0 + 1000);
        assert_eq!(hub.actors_foreign, 4);
        assert!(!hub.restartable("edge-2", "device/d0"));
        let u = hub.tick(T0 + 1000, &[]);
        assert_eq!(u.actors.upsert, vec![actor("edge-1", "device/d1", 0)]);
        assert!(u.actors.remove.is_empty(), "{:?}", u.actors.remove);
        let s = hub.snapshot(T0 + 1000);
        assert_eq!(node(&s, "edge-2").actors.as_deref(), Some(&[victim][..]));
        let e1: Vec<&str> = node(&s, "edge-1")
            .actors
            .as_ref()
            .unwrap()
            .iter()
            .map(|a| a.id.as_str())
            .collect();
        assert_eq!(e1, ["edge-1/device/d1"]);
        // A node whose id prefixes another's ("edge-1" and "edge-10") still
        // reaches only its own: ids carry the node and a slash.
        let r = report(
            "edge-1",
            "edge",
            T0 + 2000,
            0,
            vec![actor("edge-10", "device/d0", 0)],
        );
        hub.put_report_from("edge-1", r, T0 + 2000);
        assert_eq!(hub.actors_foreign, 5);
    }

    #[test]
    fn a_node_keeps_at_most_actors_per_node_max() {
        let mut hub = Hub::new("cloud-1");
        let many: Vec<ActorView> = (0..ACTORS_PER_NODE_MAX + 5)
            .map(|i| actor("edge-1", &format!("device/d{i:06}"), 0))
            .collect();
        hub.put_report_from("edge-1", report("edge-1", "edge", T0, 0, many), T0);
        assert_eq!(hub.actors_over_limit, 5);
        let tree_len = |hub: &Hub, n: &str| {
            hub.snapshot(T0)
                .nodes
                .iter()
                .find(|v| v.id == n)
                .and_then(|v| v.actors.as_ref().map(Vec::len))
        };
        assert_eq!(tree_len(&hub, "edge-1"), Some(ACTORS_PER_NODE_MAX));
        // Deltas cannot grow it past the bound either; a known actor still
        // updates.
        let mut delta = report(
            "edge-1",
            "edge",
            T0 + 1000,
            0,
            vec![
                actor("edge-1", "device/new", 0),
                actor("edge-1", "device/d000000", 3),
            ],
        );
        delta.actors_complete = false;
        hub.put_report_from("edge-1", delta, T0 + 1000);
        assert_eq!(hub.actors_over_limit, 6);
        assert_eq!(tree_len(&hub, "edge-1"), Some(ACTORS_PER_NODE_MAX));
        let s = hub.snapshot(T0 + 1000);
        let d0 = node(&s, "edge-1")
            .actors
            .as_ref()
            .unwrap()
            .iter()
            .find(|a| a.name == "device/d000000")
            .unwrap();
        assert_eq!(d0.restarts, 3);
        // Another node has its own room.
        hub.put_report_from(
            "edge-2",
            report("edge-2", "edge", T0, 0, vec![actor("edge-2", "a", 0)]),
            T0,
        );
        assert_eq!(tree_len(&hub, "edge-2"), Some(1));
        // Oversized texts: the actor is dropped; a long failure reason is cut.
        let mut long = actor("edge-2", &"n".repeat(ACTOR_TEXT_BYTES_MAX + 1), 0);
        long.kind = "device".into();
        let mut failed = actor("edge-2", "b", 1);
        failed.last_failure = Some(report::Failure {
            reason: "é".repeat(REPORT_TEXT_BYTES_MAX),
            at_ms: T0,
        });
        hub.put_report_from(
            "edge-2",
            report("edge-2", "edge", T0 + 1, 0, vec![long, failed]),
            T0 + 1,
        );
        assert_eq!(hub.actors_oversized, 1);
        let s = hub.snapshot(T0 + 1);
        let b = &node(&s, "edge-2").actors.as_ref().unwrap()[0];
        assert!(b.last_failure.as_ref().unwrap().reason.len() <= REPORT_TEXT_BYTES_MAX);
    }
}

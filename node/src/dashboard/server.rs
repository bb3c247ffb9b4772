//! The dashboard's and the metrics' HTTP side, and the once-a-second tasks
//! that feed them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tributary_actors::cloud::stages::AlertFeed;
use tributary_actors::cloud::CloudCounters;
use tributary_actors::sink::kafka::audit::KafkaAudit;

use super::inbox::send_report;
use super::metrics::{render, LatestReport};
use super::report::{collect_cloud, collect_edge, now_ms, LinkFigures, REPORT_INTERVAL};
use super::Hub;
use crate::cluster::Member;
use crate::cluster::{call_edge, ControlRequest};

/// Pages connected at once; more get 503 until one leaves.
const PAGES_MAX: usize = 64;
/// Updates queued per page; a page further behind gets a fresh snapshot.
const UPDATES_QUEUED_MAX: usize = 16;
/// How long an action's control call to an edge may take.
const ACTION_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Every how many reports an edge sends its whole tree; the others carry
/// only what changed.
const COMPLETE_REPORT_EVERY: u64 = 10;
/// The largest action request body.
const ACTION_BODY_BYTES_MAX: usize = 4 * 1024;

const INDEX_HTML: &str = include_str!("index.html");

#[derive(Clone)]
struct DashboardState {
    hub: Arc<Mutex<Hub>>,
    updates: broadcast::Sender<Arc<str>>,
    latest: LatestReport,
    /// `None`: actions are off (no token configured).
    token: Option<Arc<str>>,
    audit: Option<Arc<KafkaAudit>>,
    pages: Arc<tokio::sync::Semaphore>,
}

impl DashboardState {
    fn snapshot_json(&self) -> String {
        let hub = self.hub.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::to_string(&hub.snapshot(now_ms())).unwrap_or_else(|_| "{}".into())
    }
}

/// What the cloud's dashboard needs.
pub struct DashboardArgs {
    pub addr: SocketAddr,
    pub hub: Arc<Mutex<Hub>>,
    pub latest: LatestReport,
    pub token: Option<String>,
    pub audit: Option<Arc<KafkaAudit>>,
    /// The token is needed to view too (`dashboard_view_token_required`).
    pub view_token_required: bool,
    /// HTTP connections served at once (`dashboard_connections_max`).
    pub connections_max: usize,
    /// Live pages one client address may hold (`dashboard_pages_per_client_max`).
    pub pages_per_client_max: usize,
    /// How long a request's headers may take (`dashboard_header_read_timeout_ms`).
    pub header_read_timeout_ms: u64,
}

/// A bound server, serving until the process ends.
pub struct Served {
    pub local_addr: SocketAddr,
    pub task: JoinHandle<()>,
}

async fn bind(addr: SocketAddr, app: Router) -> anyhow::Result<Served> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the HTTP server to {addr}: {e}"))?;
    let local_addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the HTTP server stopped");
        }
    });
    Ok(Served { local_addr, task })
}

/// Serves the dashboard page, its API and `/metrics`; returns the update
/// sender the ticker feeds.
pub async fn serve_dashboard(
    args: DashboardArgs,
) -> anyhow::Result<(Served, broadcast::Sender<Arc<str>>)> {
    let (updates, _) = broadcast::channel(UPDATES_QUEUED_MAX);
    let state = DashboardState {
        hub: args.hub,
        updates: updates.clone(),
        latest: args.latest,
        token: args.token.filter(|t| !t.is_empty()).map(Into::into),
        audit: args.audit,
        pages: Arc::new(tokio::sync::Semaphore::new(PAGES_MAX)),
    };
    let app = Router::new()
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route("/api/snapshot", get(snapshot))
        .route("/api/events", get(events))
        .route("/api/actions/restart", post(restart))
        .route("/api/actions/uplink", post(uplink))
        .route("/metrics", get(metrics))
        .layer(axum::extract::DefaultBodyLimit::max(ACTION_BODY_BYTES_MAX))
        .with_state(state);
    Ok((bind(args.addr, app).await?, updates))
}

/// Serves `/metrics` alone (edges, or a cloud without a dashboard).
pub async fn serve_metrics(addr: SocketAddr, latest: LatestReport) -> anyhow::Result<Served> {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let latest = latest.clone();
            async move { metrics_response(&latest) }
        }),
    );
    bind(addr, app).await
}

fn metrics_response(latest: &LatestReport) -> Response {
    (
        // What prometheus-client writes: OpenMetrics text.
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        render(latest),
    )
        .into_response()
}

async fn metrics(State(st): State<DashboardState>) -> Response {
    metrics_response(&st.latest)
}

async fn snapshot(State(st): State<DashboardState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        st.snapshot_json(),
    )
        .into_response()
}

async fn events(State(st): State<DashboardState>) -> Response {
    let Ok(permit) = st.pages.clone().try_acquire_owned() else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{PAGES_MAX} pages are open already"),
        );
    };
    let rx = st.updates.subscribe();
    let first = st.snapshot_json();
    // The permit lives as long as the stream: a page that leaves frees it.
    let stream = futures::stream::unfold(
        (Some(first), rx, st, permit),
        |(first, mut rx, st, permit)| async move {
            if let Some(f) = first {
                let event = Event::default().event("snapshot").data(f);
                return Some((Ok::<_, Infallible>(event), (None, rx, st, permit)));
            }
            let event = match rx.recv().await {
                Ok(update) => Event::default().event("update").data(update.as_ref()),
                // Too far behind to patch: start the page over.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    Event::default().event("snapshot").data(st.snapshot_json())
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            Some((Ok(event), (None, rx, st, permit)))
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn refuse(status: StatusCode, error: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": error.into() }))).into_response()
}

/// Checks the bearer token; `Err` is the answer to send.
fn authorise(st: &DashboardState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let Some(token) = &st.token else {
        return Err(Box::new(refuse(
            StatusCode::FORBIDDEN,
            "actions are off: set dashboard_token on the cloud node",
        )));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme's name is case-insensitive (RFC 9110).
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    // Compared in full whatever the first difference, so the time taken
    // does not tell how much of a guess was right.
    let matches = given.is_some_and(|g| {
        g.len() == token.len()
            && g.bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if matches {
        Ok(())
    } else {
        Err(Box::new(refuse(
            StatusCode::UNAUTHORIZED,
            "not authorised: a valid bearer token is required",
        )))
    }
}

/// Writes the action to the audit topic before it runs.
async fn audit(
    st: &DashboardState,
    node: &str,
    action: serde_json::Value,
) -> Result<(), Box<Response>> {
    let record = serde_json::json!({ "at_ms": now_ms(), "node": node, "action": action });
    tracing::info!(%record, "dashboard action");
    match &st.audit {
        Some(a) => a.record(node, &record.to_string()).await.map_err(|e| {
            Box::new(refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the action was not run: {e}"),
            ))
        }),
        None => Ok(()),
    }
}

#[derive(Debug, Deserialize)]
struct RestartBody {
    node: String,
    actor: String,
}

#[derive(Debug, Deserialize)]
struct UplinkBody {
    node: String,
    paused: bool,
}

/// Checks the token, then the body: what every action does first.
fn admit<T>(
    st: &DashboardState,
    headers: &HeaderMap,
    body: Result<Json<T>, JsonRejection>,
) -> Result<T, Box<Response>> {
    authorise(st, headers)?;
    body.map(|Json(b)| b)
        .map_err(|e| Box::new(refuse(StatusCode::BAD_REQUEST, e.body_text())))
}

/// Runs an action on an edge through its control actor.
async fn on_edge(node: &str, request: ControlRequest) -> Response {
    match call_edge(node, request, ACTION_CALL_TIMEOUT).await {
        Ok(_) => Json(serde_json::json!({ "ok": true })).into_response(),
        Err(e) => refuse(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

async fn restart(
    State(st): State<DashboardState>,
    headers: HeaderMap,
    body: Result<Json<RestartBody>, JsonRejection>,
) -> Response {
    let body = match admit(&st, &headers, body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    // Only what the node reported as restartable: an operator cannot kill a
    // root or a listener by naming it.
    let (restartable, cloud) = {
        let hub = st.hub.lock().unwrap_or_else(|p| p.into_inner());
        (
            hub.restartable(&body.node, &body.actor),
            hub.cloud_id() == body.node,
        )
    };
    if !restartable {
        return refuse(
            StatusCode::NOT_FOUND,
            format!(
                "node {:?} reported no restartable actor {:?}",
                body.node, body.actor
            ),
        );
    }
    let action = serde_json::json!({ "restart": body.actor });
    if let Err(r) = audit(&st, &body.node, action).await {
        return *r;
    }
    if cloud {
        return match crate::cluster::control::restart_supervised(&body.actor).await {
            Ok(()) => Json(serde_json::json!({ "ok": true })).into_response(),
            Err(e) => refuse(StatusCode::CONFLICT, e),
        };
    }
    on_edge(
        &body.node,
        ControlRequest::RestartActor { name: body.actor },
    )
    .await
}

async fn uplink(
    State(st): State<DashboardState>,
    headers: HeaderMap,
    body: Result<Json<UplinkBody>, JsonRejection>,
) -> Response {
    let body = match admit(&st, &headers, body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let is_edge = {
        let hub = st.hub.lock().unwrap_or_else(|p| p.into_inner());
        hub.report(&body.node).is_some_and(|r| r.role == "edge")
    };
    if !is_edge {
        return refuse(
            StatusCode::NOT_FOUND,
            format!("{:?} is not an edge that reported", body.node),
        );
    }
    let action = serde_json::json!({ "uplink_paused": body.paused });
    if let Err(r) = audit(&st, &body.node, action).await {
        return *r;
    }
    let request = ControlRequest::SetUplinkPaused {
        paused: body.paused,
    };
    on_edge(&body.node, request).await
}

fn links(members: &watch::Receiver<Vec<Member>>) -> Vec<LinkFigures> {
    members
        .borrow()
        .iter()
        .map(|m| LinkFigures {
            peer: m.peer.clone(),
            up: m.up,
            rtt_ms: m.rtt.map(|d| d.as_secs_f64() * 1000.0),
        })
        .collect()
}

/// What the cloud's ticker reads each second.
pub struct CloudTicker {
    pub node_id: String,
    pub listener: String,
    pub counters: Arc<CloudCounters>,
    pub alerts: AlertFeed,
    pub members: watch::Receiver<Vec<Member>>,
    pub hub: Arc<Mutex<Hub>>,
    pub latest: LatestReport,
    /// `None` without a dashboard (metrics only).
    pub updates: Option<broadcast::Sender<Arc<str>>>,
}

/// Each second: the cloud's own report (for `/metrics` and the hub), then
/// one update to every page.
pub fn spawn_cloud_ticker(t: CloudTicker) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(REPORT_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let mut report = collect_cloud(&t.node_id, &t.listener, &t.counters).await;
            report.links = links(&t.members);
            t.latest.set(report.clone());
            let update = {
                let mut hub = t.hub.lock().unwrap_or_else(|p| p.into_inner());
                hub.set_members(t.members.borrow().clone());
                let now = now_ms();
                hub.put_report(report, now);
                hub.tick(now, &t.alerts.recent())
            };
            if let Some(tx) = &t.updates {
                if tx.receiver_count() > 0 {
                    if let Ok(json) = serde_json::to_string(&update) {
                        let _ = tx.send(json.into());
                    }
                }
            }
        }
    })
}

/// Each second: the edge's report, for its own `/metrics` and for the cloud.
pub fn spawn_edge_reporter(
    node_id: String,
    latest: LatestReport,
    members: watch::Receiver<Vec<Member>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(REPORT_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sent = std::collections::HashMap::new();
        let mut last_sessions = Vec::new();
        for n in 0u64.. {
            every.tick().await;
            let mut report = collect_edge(&node_id).await;
            report.links = links(&members);
            // A complete report now and then, and on every new session,
            // repairs what a lost cast (a partition, a cloud restart) left
            // out of the cloud's picture.
            let sessions: Vec<u64> = members.borrow().iter().map(|m| m.session).collect();
            if n % COMPLETE_REPORT_EVERY == 0 || sessions != last_sessions {
                last_sessions = sessions;
                sent = report
                    .actors
                    .iter()
                    .map(|a| (a.id.clone(), a.clone()))
                    .collect();
                send_report(&report);
            } else {
                send_report(&report.delta(&mut sent));
            }
            latest.set(report);
        }
    })
}

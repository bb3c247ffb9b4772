//! The dashboard's and the metrics' HTTP side, and the once-a-second tasks
//! that feed them.
//!
//! The HTTP side is bounded, so that no client can take it from the others:
//!
//! - Connections are served by our own accept loop on hyper, at most
//!   `dashboard_connections_max` at once: past it, a new connection is
//!   closed at once (and counted).
//! - A request's headers must arrive within
//!   `dashboard_header_read_timeout_ms` (a slowloris, or an idle keep-alive
//!   connection, is closed); a request other than the event stream must be
//!   answered within [`REQUEST_TIMEOUT`]; a write to a client that stops
//!   reading may stall for [`WRITE_STALL_TIMEOUT`] at most.
//! - One client address holds at most `dashboard_pages_per_client_max` live
//!   event streams (429 past it), all clients [`PAGES_MAX`] (503).
//! - The snapshot a page starts from (and `/api/snapshot`) is serialized
//!   once per tick by the ticker, never per request under the hub's lock.
//! - With `dashboard_view_token_required`, viewing needs the token too.
//!
//! What is refused or cut is counted, in the cloud's report (components
//! `dashboard-http`, `dashboard-pages`, `dashboard-auth`, and the hub's
//! `dashboard-reports` and `dashboard-actors`, so in `/metrics`), and
//! logged when a count passes a power of two.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{broadcast, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tower::ServiceExt;
use tracing::Instrument;
use tributary_actors::cloud::stages::AlertFeed;
use tributary_actors::cloud::CloudCounters;
use tributary_actors::sink::kafka::audit::KafkaAudit;

use super::metrics::{render, LatestReport};
use super::report::{
    collect_cloud, collect_edge, now_ms, ComponentFigures, LinkFigures, REPORT_INTERVAL,
};
use super::reports::ReportLink;
use super::Hub;
use crate::cluster::Member;
use crate::cluster::{call_edge, ControlRequest};

/// Pages connected at once, from all clients; more get 503 until one leaves.
pub const PAGES_MAX: usize = 64;
/// Updates queued per page; a page further behind gets a fresh snapshot.
const UPDATES_QUEUED_MAX: usize = 16;
/// How long an action's control call to an edge may take.
const ACTION_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Every how many reports an edge sends its whole tree; the others carry
/// only what changed.
const COMPLETE_REPORT_EVERY: u64 = 10;
/// The largest action request body.
const ACTION_BODY_BYTES_MAX: usize = 4 * 1024;
/// How long a request other than the event stream may take once its
/// headers are in, its answer included (an action's audit write and
/// control call take 5 s at most each); past it the client gets 408.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// A write to a client that makes no progress for this long ends the
/// connection: a client that stops reading (a page's stream included)
/// cannot hold its connection forever.
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// After a failed accept (out of file descriptors, say), the accept loop
/// waits this long before the next, rather than spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Connections a `/metrics`-only server (an edge's, or a cloud's
/// `metrics_addr`) serves at once.
const METRICS_CONNECTIONS_MAX: usize = 64;
/// How long a request's headers may take on a `/metrics`-only server.
const METRICS_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

const INDEX_HTML: &str = include_str!("index.html");

/// What the HTTP side accepted, refused and cut.
#[derive(Debug, Default)]
pub struct HttpCounters {
    connections_accepted: AtomicU64,
    /// Closed at once: `connections_max` were open.
    connections_refused: AtomicU64,
    /// Closed for not sending complete headers within the header-read
    /// timeout (idle keep-alive connections included).
    connections_cut_headers: AtomicU64,
    /// Closed because a write to them stalled past `WRITE_STALL_TIMEOUT`.
    writes_stalled: AtomicU64,
    /// Answered 408 after `REQUEST_TIMEOUT`.
    requests_timed_out: AtomicU64,
    pages_opened: AtomicU64,
    /// 429: the client had `pages_per_client_max` open.
    pages_refused_client: AtomicU64,
    /// 503: `PAGES_MAX` were open.
    pages_refused_full: AtomicU64,
    /// 401 on `/`, `/api/snapshot`, `/api/events` or `/metrics`.
    views_unauthorised: AtomicU64,
    /// 401 on an action.
    actions_unauthorised: AtomicU64,
}

/// Counts one more, and logs it when the count reaches a power of two (so
/// that a client repeating it cannot flood the log).
fn count(counter: &AtomicU64, what: &str) {
    let n = counter.fetch_add(1, Relaxed) + 1;
    if n.is_power_of_two() {
        tracing::warn!(total = n, "dashboard: {what} (logged at powers of two)");
    }
}

impl HttpCounters {
    /// The counters as components of the cloud's report (and so its
    /// `/metrics`): `received` what came, `sent` what was served,
    /// `dropped` what a limit refused or cut, `errors` what failed.
    pub fn components(&self) -> Vec<ComponentFigures> {
        let c = |a: &AtomicU64| a.load(Relaxed);
        let accepted = c(&self.connections_accepted);
        let refused = c(&self.connections_refused);
        let opened = c(&self.pages_opened);
        let pages_refused = c(&self.pages_refused_client) + c(&self.pages_refused_full);
        vec![
            ComponentFigures {
                component: "dashboard-http".into(),
                received: accepted + refused,
                sent: accepted,
                errors: c(&self.requests_timed_out) + c(&self.writes_stalled),
                dropped: refused + c(&self.connections_cut_headers),
            },
            ComponentFigures {
                component: "dashboard-pages".into(),
                received: opened + pages_refused,
                sent: opened,
                errors: 0,
                dropped: pages_refused,
            },
            ComponentFigures {
                component: "dashboard-auth".into(),
                received: 0,
                sent: 0,
                errors: c(&self.views_unauthorised) + c(&self.actions_unauthorised),
                dropped: 0,
            },
        ]
    }
}

/// The hub's refusals as components of the cloud's report: reports (kept,
/// or refused past `NODES_MAX`, spoofed or undecodable) and actors (of
/// another node, oversized, or past `ACTORS_PER_NODE_MAX`).
fn hub_components(hub: &Hub) -> [ComponentFigures; 3] {
    [
        ComponentFigures {
            component: "dashboard-relayed".into(),
            received: hub.relayed_kept + hub.relayed_older + hub.relayed_undecodable,
            sent: hub.relayed_kept,
            errors: hub.relayed_undecodable,
            dropped: hub.relayed_older,
        },
        ComponentFigures {
            component: "dashboard-reports".into(),
            received: hub.reports_kept
                + hub.reports_refused
                + hub.reports_spoofed
                + hub.reports_undecodable,
            sent: hub.reports_kept,
            errors: hub.reports_spoofed + hub.reports_undecodable,
            dropped: hub.reports_refused,
        },
        ComponentFigures {
            component: "dashboard-actors".into(),
            received: 0,
            sent: 0,
            errors: hub.actors_foreign + hub.actors_oversized,
            dropped: hub.actors_over_limit,
        },
    ]
}

fn status_component(
    status: &tributary_actors::sink::kafka::status::KafkaStatus,
) -> ComponentFigures {
    use std::sync::atomic::Ordering::Relaxed;
    let c = &status.counters;
    ComponentFigures {
        component: "status-topic".into(),
        received: c.received.load(Relaxed),
        sent: c.sent.load(Relaxed),
        errors: c.errors.load(Relaxed),
        dropped: c.dropped.load(Relaxed),
    }
}

/// What the ticker hands the pages: each second's update, and the snapshot
/// as of that update, serialized once.
#[derive(Clone)]
pub struct DashboardFeed {
    updates: broadcast::Sender<Arc<str>>,
    /// Replaced together with each update's send, under this lock, so that
    /// a page that starts from it gets exactly the updates after it.
    snapshot: Arc<Mutex<Arc<str>>>,
    counters: Arc<HttpCounters>,
}

impl DashboardFeed {
    fn new(first: Arc<str>) -> Self {
        let (updates, _) = broadcast::channel(UPDATES_QUEUED_MAX);
        Self {
            updates,
            snapshot: Arc::new(Mutex::new(first)),
            counters: Arc::default(),
        }
    }

    fn publish(&self, update: Arc<str>, snapshot: Arc<str>) {
        let mut current = self.snapshot.lock().unwrap_or_else(|p| p.into_inner());
        // No page listening is no error.
        let _ = self.updates.send(update);
        *current = snapshot;
    }

    /// The updates from now on, and the snapshot they apply to.
    fn subscribe(&self) -> (broadcast::Receiver<Arc<str>>, Arc<str>) {
        let current = self.snapshot.lock().unwrap_or_else(|p| p.into_inner());
        (self.updates.subscribe(), current.clone())
    }

    fn snapshot(&self) -> Arc<str> {
        self.snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The HTTP side's counters, for the cloud's report.
    pub fn counters(&self) -> &HttpCounters {
        &self.counters
    }
}

/// Live pages, by client.
struct Pages {
    all: Arc<Semaphore>,
    per_client_max: usize,
    by_client: Mutex<HashMap<IpAddr, usize>>,
}

/// One page's place: given back when its stream ends.
struct PageSlot {
    pages: Arc<Pages>,
    client: IpAddr,
    _all: OwnedSemaphorePermit,
}

impl Drop for PageSlot {
    fn drop(&mut self) {
        let mut by_client = self
            .pages
            .by_client
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = by_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                by_client.remove(&self.client);
            }
        }
    }
}

enum PageRefused {
    /// The client holds `per_client_max` pages.
    Client,
    /// `PAGES_MAX` pages are open.
    Full,
}

impl Pages {
    fn open(self: &Arc<Self>, client: IpAddr) -> Result<PageSlot, PageRefused> {
        let mut by_client = self.by_client.lock().unwrap_or_else(|p| p.into_inner());
        let n = by_client.entry(client).or_insert(0);
        if *n >= self.per_client_max {
            return Err(PageRefused::Client);
        }
        let all = self
            .all
            .clone()
            .try_acquire_owned()
            .map_err(|_| PageRefused::Full)?;
        *n += 1;
        Ok(PageSlot {
            pages: self.clone(),
            client,
            _all: all,
        })
    }
}

/// The address pages are counted by: an IPv4 address, or an IPv6 address's
/// /64 (what one host is usually given).
fn client_of(peer: SocketAddr) -> IpAddr {
    match peer.ip().to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        v4 => v4,
    }
}

#[derive(Clone)]
struct DashboardState {
    hub: Arc<Mutex<Hub>>,
    feed: DashboardFeed,
    latest: LatestReport,
    /// `None`: actions are off (no token configured).
    token: Option<Arc<str>>,
    /// Viewing needs the token too.
    view_token_required: bool,
    audit: Option<Arc<KafkaAudit>>,
    pages: Arc<Pages>,
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

/// The limits of one HTTP server.
struct HttpLimits {
    connections_max: usize,
    header_read_timeout: Duration,
}

async fn bind(
    addr: SocketAddr,
    app: Router,
    limits: HttpLimits,
    counters: Arc<HttpCounters>,
) -> anyhow::Result<Served> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the HTTP server to {addr}: {e}"))?;
    let local_addr = listener.local_addr()?;
    let span = tracing::info_span!("http", addr = %local_addr);
    let task = tokio::spawn(accept_loop(listener, app, limits, counters).instrument(span));
    Ok(Served { local_addr, task })
}

/// Accepts connections and serves each with hyper (HTTP/1.1), at most
/// `connections_max` at once: one past it is closed at once.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: HttpLimits,
    counters: Arc<HttpCounters>,
) {
    let slots = Arc::new(Semaphore::new(limits.connections_max.max(1)));
    let mut http = hyper::server::conn::http1::Builder::new();
    // hyper times nothing without a timer: the header-read timeout needs it.
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut accept_errors = 0u64;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                accept_errors += 1;
                if accept_errors.is_power_of_two() {
                    tracing::warn!(error = %e, total = accept_errors, "accepting an HTTP connection failed (logged at powers of two)");
                }
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            count(
                &counters.connections_refused,
                "a connection past dashboard_connections_max was closed",
            );
            drop(stream);
            continue;
        };
        counters.connections_accepted.fetch_add(1, Relaxed);
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone().map_request(
            move |mut req: axum::http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req
            },
        ));
        let io = TokioIo::new(StallGuard::new(
            stream,
            WRITE_STALL_TIMEOUT,
            counters.clone(),
        ));
        let conn = http.serve_connection(io, service);
        let counters = counters.clone();
        tokio::spawn(
            async move {
                if let Err(e) = conn.await {
                    if e.is_timeout() {
                        // Idle keep-alive connections end so too: counted,
                        // but not worth a warning.
                        let n = counters.connections_cut_headers.fetch_add(1, Relaxed) + 1;
                        tracing::debug!(%peer, total = n, "no complete request headers in time; connection closed");
                    } else {
                        tracing::debug!(%peer, error = %e, "an HTTP connection ended");
                    }
                }
                drop(permit);
            }
            .in_current_span(),
        );
    }
}

/// A connection's socket whose writes may not stall: a write (or flush)
/// that makes no progress for `stall` fails, which ends the connection.
struct StallGuard<S> {
    io: S,
    stall: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    counters: Arc<HttpCounters>,
}

impl<S> StallGuard<S> {
    fn new(io: S, stall: Duration, counters: Arc<HttpCounters>) -> Self {
        Self {
            io,
            stall,
            stalled: None,
            counters,
        }
    }

    fn guard<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let stall = self.stall;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        if timer.as_mut().poll(cx).is_ready() {
            self.stalled = None;
            count(
                &self.counters.writes_stalled,
                "a client stopped reading; its connection was closed",
            );
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("a write made no progress for {stall:?}"),
            )));
        }
        Poll::Pending
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallGuard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write(cx, buf);
        this.guard(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.guard(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_flush(cx);
        this.guard(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_shutdown(cx);
        this.guard(cx, poll)
    }
}

/// Answers 408 to a request not answered within `REQUEST_TIMEOUT`.
async fn request_timeout(
    State(counters): State<Arc<HttpCounters>>,
    req: Request,
    next: Next,
) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            count(
                &counters.requests_timed_out,
                "a request was not answered within REQUEST_TIMEOUT",
            );
            refuse(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "not answered within {REQUEST_TIMEOUT:?}; an action may still have run (see the audit topic)"
                ),
            )
        }
    }
}

/// Serves the dashboard page, its API and `/metrics`; returns the feed the
/// ticker publishes to.
pub async fn serve_dashboard(args: DashboardArgs) -> anyhow::Result<(Served, DashboardFeed)> {
    let first = {
        let hub = args.hub.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::to_string(&hub.snapshot(now_ms())).unwrap_or_else(|_| "{}".into())
    };
    let feed = DashboardFeed::new(first.into());
    let counters = feed.counters.clone();
    let token: Option<Arc<str>> = args.token.filter(|t| !t.is_empty()).map(Into::into);
    if args.view_token_required && token.is_none() {
        tracing::warn!(
            "dashboard_view_token_required without dashboard_token: every view is refused"
        );
    }
    let state = DashboardState {
        hub: args.hub,
        feed: feed.clone(),
        latest: args.latest,
        token,
        view_token_required: args.view_token_required,
        audit: args.audit,
        pages: Arc::new(Pages {
            all: Arc::new(Semaphore::new(PAGES_MAX)),
            per_client_max: args.pages_per_client_max.max(1),
            by_client: Mutex::new(HashMap::new()),
        }),
    };
    let views = Router::new()
        .route("/", get(index))
        .route("/api/snapshot", get(snapshot))
        .route("/metrics", get(metrics))
        .route_layer(from_fn_with_state(counters.clone(), request_timeout))
        // The event stream is long-lived by design: no request timeout (a
        // page that stops reading is cut by the write-stall guard).
        .route("/api/events", get(events))
        .route_layer(from_fn_with_state(state.clone(), view_guard));
    let actions = Router::new()
        .route("/api/actions/restart", post(restart))
        .route("/api/actions/uplink", post(uplink))
        .route_layer(from_fn_with_state(counters.clone(), request_timeout));
    let app = views
        .merge(actions)
        .layer(axum::extract::DefaultBodyLimit::max(ACTION_BODY_BYTES_MAX))
        .with_state(state);
    let limits = HttpLimits {
        connections_max: args.connections_max,
        header_read_timeout: Duration::from_millis(args.header_read_timeout_ms),
    };
    Ok((bind(args.addr, app, limits, counters).await?, feed))
}

/// Serves `/metrics` alone (edges, or a cloud's `metrics_addr`).
pub async fn serve_metrics(addr: SocketAddr, latest: LatestReport) -> anyhow::Result<Served> {
    let counters = Arc::new(HttpCounters::default());
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let latest = latest.clone();
                async move { metrics_response(&latest) }
            }),
        )
        .route_layer(from_fn_with_state(counters.clone(), request_timeout));
    let limits = HttpLimits {
        connections_max: METRICS_CONNECTIONS_MAX,
        header_read_timeout: METRICS_HEADER_READ_TIMEOUT,
    };
    bind(addr, app, limits, counters).await
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

async fn index() -> Response {
    (
        // The token may be in the page's URL: never pass it on.
        [
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Html(INDEX_HTML),
    )
        .into_response()
}

async fn metrics(State(st): State<DashboardState>) -> Response {
    metrics_response(&st.latest)
}

async fn snapshot(State(st): State<DashboardState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        String::from(&*st.feed.snapshot()),
    )
        .into_response()
}

async fn events(
    State(st): State<DashboardState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    let client = client_of(peer);
    let slot = match st.pages.open(client) {
        Ok(slot) => slot,
        Err(PageRefused::Client) => {
            count(
                &st.feed.counters.pages_refused_client,
                "a client asked for more pages than dashboard_pages_per_client_max: 429",
            );
            return refuse(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "{} pages are open from {client} already",
                    st.pages.per_client_max
                ),
            );
        }
        Err(PageRefused::Full) => {
            count(
                &st.feed.counters.pages_refused_full,
                "a page was refused: PAGES_MAX are open: 503",
            );
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{PAGES_MAX} pages are open already"),
            );
        }
    };
    st.feed.counters.pages_opened.fetch_add(1, Relaxed);
    let (rx, first) = st.feed.subscribe();
    // The slot lives as long as the stream: a page that leaves frees it.
    let stream = futures::stream::unfold(
        (Some(first), rx, st.feed, slot),
        |(first, mut rx, feed, slot)| async move {
            if let Some(f) = first {
                let event = Event::default().event("snapshot").data(&*f);
                return Some((Ok::<_, Infallible>(event), (None, rx, feed, slot)));
            }
            let event = match rx.recv().await {
                Ok(update) => Event::default().event("update").data(&*update),
                // Too far behind to patch: start the page over, from the
                // tick's snapshot and the updates after it.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let (fresh, snapshot) = feed.subscribe();
                    rx = fresh;
                    Event::default().event("snapshot").data(&*snapshot)
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            Some((Ok(event), (None, rx, feed, slot)))
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn refuse(status: StatusCode, error: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": error.into() }))).into_response()
}

/// The bearer token of `headers`, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme's name is case-insensitive (RFC 9110).
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
}

/// Compared in full whatever the first difference, so the time taken does
/// not tell how much of a guess was right.
fn same_token(given: &str, token: &str) -> bool {
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// `token=` of a URL's query, percent-decoded (an `EventSource` cannot set
/// headers, so a page passes its token so).
fn query_token(query: Option<&str>) -> Option<String> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))
        .and_then(percent_decode)
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// With `view_token_required`, a view needs the token: as a bearer header,
/// or as `?token=` in the URL (the page's own, and its event stream's).
async fn view_guard(State(st): State<DashboardState>, req: Request, next: Next) -> Response {
    if st.view_token_required {
        let given = st.token.as_deref().is_some_and(|token| {
            bearer(req.headers()).is_some_and(|g| same_token(g, token))
                || query_token(req.uri().query()).is_some_and(|g| same_token(&g, token))
        });
        if !given {
            count(
                &st.feed.counters.views_unauthorised,
                "a view without the token was refused: 401",
            );
            let mut r = refuse(
                StatusCode::UNAUTHORIZED,
                "not authorised: viewing needs the token, as a bearer header or ?token= in the URL",
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    next.run(req).await
}

/// Checks the bearer token; `Err` is the answer to send.
fn authorise(st: &DashboardState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let Some(token) = &st.token else {
        return Err(Box::new(refuse(
            StatusCode::FORBIDDEN,
            "actions are off: set dashboard_token on the cloud node",
        )));
    };
    if bearer(headers).is_some_and(|g| same_token(g, token)) {
        Ok(())
    } else {
        count(
            &st.feed.counters.actions_unauthorised,
            "an action without a valid token was refused: 401",
        );
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
    pub updates: Option<DashboardFeed>,
    /// The fleet's status shared with the other cloud nodes; `None`: this
    /// node's page shows only the nodes placed on it.
    pub status: Option<Arc<tributary_actors::sink::kafka::status::KafkaStatus>>,
}

/// Status records taken from the status topic per tick at most; the rest
/// wait for the next tick.
const STATUS_RECORDS_PER_TICK_MAX: usize = crate::dashboard::NODES_MAX;

/// Each second: the cloud's own report (for `/metrics` and the hub), then
/// one update to every page, and the snapshot pages start from.
pub fn spawn_cloud_ticker(t: CloudTicker) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(REPORT_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let mut report = collect_cloud(&t.node_id, &t.listener, &t.counters).await;
            report.links = links(&t.members);
            report.components.extend(hub_components(
                &t.hub.lock().unwrap_or_else(|p| p.into_inner()),
            ));
            if let Some(feed) = &t.updates {
                report.components.extend(feed.counters().components());
            }
            if let Some(status) = &t.status {
                report.components.push(status_component(status));
            }
            t.latest.set(report.clone());
            let relayed: Vec<_> = t
                .status
                .as_ref()
                .map(|s| s.poll(STATUS_RECORDS_PER_TICK_MAX))
                .unwrap_or_default();
            let (update, snapshot, direct) = {
                let mut hub = t.hub.lock().unwrap_or_else(|p| p.into_inner());
                hub.set_members(t.members.borrow().clone());
                let now = now_ms();
                hub.put_report(report, now);
                for record in relayed {
                    match serde_json::from_slice::<crate::dashboard::RelayedStatus>(&record.value) {
                        Ok(status) if status.report.node_id == record.key => {
                            hub.put_relayed(status)
                        }
                        _ => hub.relayed_undecodable += 1,
                    }
                }
                let direct = t.status.is_some().then(|| hub.direct_reports(now));
                let update = hub.tick(now, &t.alerts.recent());
                // Built here once a tick; requests serve it as it is.
                let snapshot = t.updates.is_some().then(|| hub.snapshot(now));
                (update, snapshot, direct)
            };
            if let (Some(status), Some(direct)) = (&t.status, direct) {
                // Serialized outside the hub's lock.
                for d in direct {
                    match serde_json::to_vec(&d) {
                        Ok(bytes) => {
                            status.publish(&d.report.node_id, &bytes);
                        }
                        Err(e) => tracing::warn!(error = %e, "serializing a status record failed"),
                    }
                }
            }
            if let (Some(feed), Some(snapshot)) = (&t.updates, snapshot) {
                // Serialized outside the hub's lock.
                match (
                    serde_json::to_string(&update),
                    serde_json::to_string(&snapshot),
                ) {
                    (Ok(u), Ok(s)) => feed.publish(u.into(), s.into()),
                    (Err(e), _) | (_, Err(e)) => {
                        tracing::warn!(error = %e, "serializing the dashboard's update failed")
                    }
                }
            }
        }
    })
}

/// Each second: the edge's report, for its own `/metrics` and for the cloud
/// (on the report stream of the edge's current connection, `link`).
pub fn spawn_edge_reporter(
    node_id: String,
    latest: LatestReport,
    members: watch::Receiver<Vec<Member>>,
    link: ReportLink,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(REPORT_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sent = std::collections::HashMap::new();
        let mut last_sessions = Vec::new();
        let mut dropped = false;
        for n in 0u64.. {
            every.tick().await;
            let mut report = collect_edge(&node_id).await;
            report.links = links(&members);
            // A complete report now and then, on every new session, and
            // after one was dropped, repairs what a lost report (a
            // partition, a cloud restart, a full queue) left out of the
            // cloud's picture.
            let sessions: Vec<u64> = members.borrow().iter().map(|m| m.session).collect();
            let queued = if dropped || n % COMPLETE_REPORT_EVERY == 0 || sessions != last_sessions {
                last_sessions = sessions;
                sent = report
                    .actors
                    .iter()
                    .map(|a| (a.id.clone(), a.clone()))
                    .collect();
                link.send(&report)
            } else {
                link.send(&report.delta(&mut sent))
            };
            dropped = !queued;
            if dropped {
                let total = link.dropped();
                if total.is_power_of_two() {
                    tracing::info!(total, "a dashboard report was dropped: the report stream is slow or down (logged at powers of two)");
                }
            }
            latest.set(report);
        }
    })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn a_token_in_the_query_is_percent_decoded() {
        assert_eq!(query_token(Some("token=abc")).as_deref(), Some("abc"));
        assert_eq!(
            query_token(Some("x=1&token=a%2Bb%20c+d")).as_deref(),
            Some("a+b c d")
        );
        assert_eq!(query_token(Some("mytoken=abc")), None);
        assert_eq!(query_token(Some("token=%zz")), None);
        assert_eq!(query_token(Some("token=%+1")), None);
        assert_eq!(query_token(Some("token=%2")), None);
        assert_eq!(query_token(None), None);
        assert!(same_token("abc", "abc") && !same_token("abd", "abc") && !same_token("ab", "abc"));
    }

    #[test]
    fn pages_are_counted_per_client_and_given_back() {
        let pages = Arc::new(Pages {
            all: Arc::new(Semaphore::new(3)),
            per_client_max: 2,
            by_client: Mutex::new(HashMap::new()),
        });
        let a = client_of("127.0.0.2:1".parse().unwrap());
        let b = client_of("[2001:db8::1]:1".parse().unwrap());
        // One host's /64 is one client.
        assert_eq!(b, client_of("[2001:db8::ffff]:2".parse().unwrap()));
        assert_eq!(
            client_of("[::ffff:127.0.0.2]:3".parse().unwrap()),
            a,
            "an IPv4-mapped address is its IPv4 one"
        );
        let a1 = pages.open(a).ok().unwrap();
        let _a2 = pages.open(a).ok().unwrap();
        assert!(matches!(pages.open(a), Err(PageRefused::Client)));
        let _b1 = pages.open(b).ok().unwrap();
        assert!(matches!(pages.open(b), Err(PageRefused::Full)));
        drop(a1);
        assert!(pages.open(a).is_ok());
        drop(_a2);
        assert!(pages.by_client.lock().unwrap().get(&a).is_none());
    }

    #[tokio::test]
    async fn a_write_that_stalls_ends_the_connection() {
        const STALL: Duration = Duration::from_millis(200);
        // The peer never reads: the write fails once STALL passes.
        let (a, _b) = tokio::io::duplex(64);
        let counters = Arc::new(HttpCounters::default());
        let mut g = StallGuard::new(a, STALL, counters.clone());
        let started = Instant::now();
        let e = g.write_all(&[0u8; 4096]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= STALL, "{:?}", started.elapsed());
        assert_eq!(counters.writes_stalled.load(Relaxed), 1);
        // A slow but steady reader is served in full.
        let (a, mut b) = tokio::io::duplex(64);
        let mut g = StallGuard::new(a, STALL, counters.clone());
        let reader = tokio::spawn(async move {
            let (mut buf, mut total) = ([0u8; 64], 0);
            while total < 2048 {
                total += b.read(&mut buf).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            total
        });
        g.write_all(&[0u8; 2048]).await.unwrap();
        assert_eq!(reader.await.unwrap(), 2048);
        assert_eq!(counters.writes_stalled.load(Relaxed), 1);
    }
}

//! The supervision dashboard (issue #5) on real processes and a real Kafka:
//! the page in headless Chromium follows the cluster live (restarts, backlog,
//! partitions), `/metrics` parses as Prometheus text with counters that only
//! grow, and actions need the bearer token and are audited before they run.
//! Its HTTP limits hold against real misbehaving clients on plain sockets: a
//! slowloris is cut after the header-read timeout, connections past the
//! limit are closed at once, one client cannot take every page, and a cloud
//! that wants the token to view refuses views without it (and serves the
//! page, in Chromium, with it in the URL).
//!
//! The browser is driven over WebDriver (chromedriver, plain http on
//! loopback); `scripts/test.sh` installs Chromium and chromedriver and names
//! them in `TRIBUTARY_CHROMIUM` and `TRIBUTARY_CHROMEDRIVER`. Every wait
//! polls the page, the API or a log with a deadline: none is a fixed sleep.

use std::collections::HashMap;
use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use fantoccini::key::Key;
use fantoccini::{Client, ClientBuilder, Locator};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{HeaderMap, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tributary_tests::broker::{shared_bootstrap, unique_topic};
use tributary_tests::checker::consume_values;
use tributary_tests::fixture::{Fixture, Workload, NODE_READY};
use tributary_tests::process::{node_binary, NodeProcess};

/// The cloud's bearer token for actions (the node wants at least 16 chars).
const TOKEN: &str = "dashboard-test-token-0123456789";
/// Devices keep sending for longer than any test runs.
const ENDLESS: u64 = 1_000_000;
/// Each edge of the browser test: ~20 devices, as the issue asks.
const BUSY: Workload = Workload {
    devices: 20,
    rate_hz: 20.0,
    readings: ENDLESS,
};
/// The metrics and actions tests need traffic, not a crowd.
const LIGHT: Workload = Workload {
    devices: 3,
    rate_hz: 20.0,
    readings: ENDLESS,
};

/// Bound on one HTTP exchange with a node or chromedriver.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one WebDriver command (a script, a click, a screenshot).
const WEBDRIVER_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on chromedriver saying which port it took.
const DRIVER_READY: Duration = Duration::from_secs(20);
/// Bound on the page showing a change the cluster made (reports come once a
/// second; the page gets an update once a second).
const PAGE_SHOWS: Duration = Duration::from_secs(20);
/// Bound on a partitioned edge turning stale (3 s without reports) and
/// fresh again after the heal (reconnect, then the next report).
const STALE_SHOWS: Duration = Duration::from_secs(20);
/// Bound on the API reflecting a report (edges joining, a restart landing).
const API_SHOWS: Duration = Duration::from_secs(30);
/// Bound on counters moving between two scrapes.
const METRICS_MOVE: Duration = Duration::from_secs(20);
/// Bound on reading the audit topic back.
const AUDIT_READ: Duration = Duration::from_secs(30);
/// How often waits look again.
const POLL: Duration = Duration::from_millis(100);
/// A paused uplink lets the outbox grow to at least this many readings
/// (2 s of the edge's 400 readings/s) before the page must show it.
const BACKLOG_RISEN_READINGS: u64 = 800;
/// After the resume, the page must show the backlog back below this: a
/// streaming edge holds a few segments of 50 readings in flight.
const BACKLOG_DRAINED_READINGS: u64 = 200;
/// The node's edges report this often; a report later than the action by
/// twice this was collected after it.
const REPORT_INTERVAL_MS: u64 = 1_000;
/// Chromium's flags: headless, and runnable as root in CI.
const CHROMIUM_ARGS: [&str; 4] = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--window-size=1400,900",
];
const CHROMIUM_ENV: &str = "TRIBUTARY_CHROMIUM";
const CHROMEDRIVER_ENV: &str = "TRIBUTARY_CHROMEDRIVER";
/// What chromedriver prints once it listens (`--port=0` lets it choose).
const DRIVER_STARTED: &str = "ChromeDriver was started successfully on port ";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_millis() as u64
}

// ---- HTTP --------------------------------------------------------------

/// A plain-http client for the nodes' API and `/metrics`.
struct Http(hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>);

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

impl Http {
    fn new() -> Self {
        Self(hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http())
    }

    async fn send(&self, method: Method, url: &str, auth: Option<&str>, body: &str) -> Answer {
        let mut req = Request::builder().method(method.clone()).uri(url);
        if !body.is_empty() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        if let Some(a) = auth {
            req = req.header(AUTHORIZATION, a);
        }
        let req = req
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("a valid request");
        let exchange = async {
            let res = self.0.request(req).await?;
            let (parts, body) = res.into_parts();
            let bytes = body.collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Answer {
                status: parts.status,
                headers: parts.headers,
                body: String::from_utf8_lossy(&bytes).into_owned(),
            })
        };
        match tokio::time::timeout(HTTP_TIMEOUT, exchange).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => panic!("{method} {url}: {e}"),
            Err(_) => panic!("{method} {url}: no answer within {HTTP_TIMEOUT:?}"),
        }
    }

    async fn get(&self, url: &str) -> Answer {
        self.send(Method::GET, url, None, "").await
    }

    async fn post(&self, url: &str, auth: Option<&str>, body: &Value) -> Answer {
        self.send(Method::POST, url, auth, &body.to_string()).await
    }
}

/// The address a node logged it serves on (`<what> serving addr=ip:port`):
/// the nodes bind port 0, so no free port is guessed and raced for.
async fn served_addr(p: &mut NodeProcess, what: &str) -> String {
    let line = p
        .wait_for_log_line(&format!("{what} serving addr="), NODE_READY)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let start = line.find(" addr=").expect("addr= in the line") + " addr=".len();
    let addr = line[start..].split_whitespace().next().unwrap_or_default();
    format!("http://{addr}")
}

/// The node `id` of a snapshot, if it is there.
fn node<'a>(snapshot: &'a Value, id: &str) -> Option<&'a Value> {
    snapshot["nodes"].as_array()?.iter().find(|n| n["id"] == id)
}

/// The actor registered as `name` on node `id`, if reported.
fn actor<'a>(snapshot: &'a Value, id: &str, name: &str) -> Option<&'a Value> {
    node(snapshot, id)?["actors"]
        .as_array()?
        .iter()
        .find(|a| a["name"] == name)
}

/// Polls `/api/snapshot` until `done` returns something.
async fn wait_snapshot<T>(
    http: &Http,
    base: &str,
    what: &str,
    logs: &dyn Fn() -> String,
    mut done: impl FnMut(&Value) -> Option<T>,
) -> T {
    let deadline = Instant::now() + API_SHOWS;
    loop {
        let snap = http.get(&format!("{base}/api/snapshot")).await;
        assert_eq!(snap.status, StatusCode::OK, "{}", snap.body);
        let snap = snap.json();
        if let Some(t) = done(&snap) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "the API did not show {what} within {API_SHOWS:?}; last snapshot:\n{snap:#}{}",
            logs()
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until `nodes` have all reported their supervision trees, devices included.
async fn wait_reported(http: &Http, base: &str, f: &Fixture, nodes: &[&str], devices: usize) {
    wait_snapshot(http, base, "every edge's devices", &|| f.log_tails(), |s| {
        nodes
            .iter()
            .all(|n| {
                node(s, n).is_some_and(|v| {
                    v["actors"].as_array().is_some_and(|a| {
                        a.iter().filter(|a| a["kind"] == "device").count() == devices
                    })
                })
            })
            .then_some(())
    })
    .await;
}

// ---- the browser -------------------------------------------------------

/// chromedriver in a process group of its own, with the Chromium it starts:
/// dropping it kills the whole group, so a failed test leaves no browser.
struct ChromeDriver {
    child: Child,
    url: String,
}

fn tool(env: &str, default: &str) -> PathBuf {
    std::env::var_os(env)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default))
}

impl ChromeDriver {
    async fn start(dir: &Path) -> Self {
        use std::os::unix::process::CommandExt;
        let program = tool(CHROMEDRIVER_ENV, "chromedriver");
        let log_path = dir.join("chromedriver.log");
        let log = File::create(&log_path).expect("creating chromedriver's log");
        let child = Command::new(&program)
            .arg("--port=0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning the log's handle"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "starting {}: {e}: run scripts/test.sh, which installs it \
                     (apt-get install chromium chromium-driver), or set {CHROMEDRIVER_ENV}",
                    program.display()
                )
            });
        let mut driver = ChromeDriver {
            child,
            url: String::new(),
        };
        let deadline = Instant::now() + DRIVER_READY;
        loop {
            let port = std::fs::read_to_string(&log_path)
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.split_once(DRIVER_STARTED).map(|(_, p)| p.to_string()));
            if let Some(p) = port {
                driver.url = format!("http://127.0.0.1:{}", p.trim_end_matches('.'));
                return driver;
            }
            if let Ok(Some(status)) = driver.child.try_wait() {
                panic!(
                    "chromedriver exited ({status}): {}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen within {DRIVER_READY:?}: {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
            // chromedriver only says it is ready on its output: poll the log.
            tokio::time::sleep(POLL).await;
        }
    }

    /// A new headless Chromium session, its profile under `dir`.
    async fn browser(&self, dir: &Path) -> Client {
        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|a| a.to_string()).collect();
        args.push(format!(
            "--user-data-dir={}",
            dir.join("chromium-profile").display()
        ));
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({ "binary": tool(CHROMIUM_ENV, "/usr/bin/chromium"), "args": args }),
        );
        let mut builder = ClientBuilder::new(HttpConnector::new());
        builder.capabilities(caps);
        let connect = builder.connect(&self.url);
        match tokio::time::timeout(WEBDRIVER_TIMEOUT, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => panic!("starting Chromium through chromedriver: {e}"),
            Err(_) => panic!("Chromium did not start within {WEBDRIVER_TIMEOUT:?}"),
        }
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        // The negative pid is the group: chromedriver and every Chromium
        // process it started (crash handlers leave once their browser dies).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}

/// Runs `script` in the page (a function body; `arguments` are `args`).
async fn js(page: &Client, script: &str, args: Vec<Value>) -> Value {
    match tokio::time::timeout(WEBDRIVER_TIMEOUT, page.execute(script, args)).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("running a script in the page: {e}\n{script}"),
        Err(_) => panic!("a script in the page took over {WEBDRIVER_TIMEOUT:?}\n{script}"),
    }
}

/// Polls `script` until `done` accepts what it returns.
async fn wait_page<T>(
    page: &Client,
    what: &str,
    timeout: Duration,
    script: &str,
    args: Vec<Value>,
    mut done: impl FnMut(&Value) -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let v = js(page, script, args.clone()).await;
        if let Some(t) = done(&v) {
            return t;
        }
        if Instant::now() >= deadline {
            let state = js(
                page,
                "return {conn: document.querySelector('#conn')?.textContent, \
                 updates: window.__tributary_updates, \
                 cards: [...document.querySelectorAll('[data-node][data-stale]')]\
                   .map((c) => [c.dataset.node, c.dataset.link, c.dataset.stale])};",
                vec![],
            )
            .await;
            panic!("the page did not show {what} within {timeout:?}; last value {v}; page {state}");
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn click(page: &Client, css: &str) {
    let found = tokio::time::timeout(WEBDRIVER_TIMEOUT, page.find(Locator::Css(css)))
        .await
        .unwrap_or_else(|_| panic!("finding {css} took over {WEBDRIVER_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("finding {css}: {e}"));
    tokio::time::timeout(WEBDRIVER_TIMEOUT, found.click())
        .await
        .unwrap_or_else(|_| panic!("clicking {css} took over {WEBDRIVER_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("clicking {css}: {e}"));
}

/// The card of node `id`: `[data-node]` with its `data-stale` (the backlog's
/// uplink buttons carry `data-node` too, but no `data-stale`).
const CARD: &str =
    "const c = document.querySelector(`[data-node=\"${CSS.escape(arguments[0])}\"][data-stale]`); \
     return c ? {stale: c.dataset.stale, link: c.dataset.link} : null;";
/// The row of actor `id`, if rendered.
const ACTOR_ROW: &str =
    "const r = document.querySelector(`[data-actor=\"${CSS.escape(arguments[0])}\"]`); \
     return r ? {restarts: r.dataset.restarts, status: r.dataset.status} : null;";
/// How many device rows the tree renders, and whether actor `id`'s is one.
const DEVICE_ROWS: &str =
    "return {rows: document.querySelectorAll('[data-actor*=\"/device/\"]').length, \
     shown: !!document.querySelector(`[data-actor=\"${CSS.escape(arguments[0])}\"]`)};";
/// The backlog of edge `id`, as the page shows it.
const BACKLOG: &str = "const r = document.querySelector(`[data-backlog=\"${CSS.escape(arguments[0])}\"][data-backlog-readings]`); \
     return r ? {readings: r.dataset.backlogReadings, bytes: r.dataset.backlogBytes} : null;";

/// Edge-2's pause/resume button in the backlog table.
const UPLINK_BUTTON: &str =
    "const b = document.querySelector('button[data-action=uplink][data-node=\"edge-2\"]'); \
     return b ? {paused: b.dataset.paused, disabled: b.disabled, text: b.textContent} : null;";

fn backlog_readings(v: &Value) -> Option<u64> {
    v["readings"].as_str()?.parse().ok()
}

async fn wait_stale(page: &Client, id: &str, stale: bool) {
    let want = stale.to_string();
    wait_page(
        page,
        &format!("{id} with data-stale={want}"),
        STALE_SHOWS,
        CARD,
        vec![json!(id)],
        |v| (v["stale"] == want.as_str()).then_some(()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_cluster_live_in_a_real_browser() {
    let t0 = Instant::now();
    let mut f = Fixture::new("dashboard", &shared_bootstrap(), &["edge-1", "edge-2"]);
    f.set_cloud("dashboard-addr", "127.0.0.1:0");
    f.set_cloud("dashboard-token", TOKEN);
    f.set_cloud("audit-topic", &unique_topic("dashboard-audit"));
    f.start_cloud().await;
    let base = served_addr(f.cloud(), "dashboard").await;
    f.proxy_edge(0).await;
    for i in 0..2 {
        f.workload(i, &BUSY);
        f.edges[i].start();
    }
    let http = Http::new();
    let bearer = format!("Bearer {TOKEN}");
    // Chromium starts while the edges connect.
    let driver = ChromeDriver::start(f.dir.path()).await;
    let page = driver.browser(f.dir.path()).await;
    // The page opens on the whole tree, so its first render is measured on it.
    wait_reported(&http, &base, &f, &["edge-1", "edge-2"], BUSY.devices).await;
    tokio::time::timeout(WEBDRIVER_TIMEOUT, page.goto(&base))
        .await
        .expect("the page loads in time")
        .expect("loading the page");

    for id in ["cloud-1", "edge-1", "edge-2"] {
        wait_page(
            &page,
            &format!("{id}'s card"),
            PAGE_SHOWS,
            CARD,
            vec![json!(id)],
            |v| (v["stale"] == "false").then_some(()),
        )
        .await;
    }
    let render_ms = js(&page, "return window.__tributary_render_ms;", vec![])
        .await
        .as_f64()
        .expect("window.__tributary_render_ms is a number once the tree is drawn");

    // A restart through the API shows on the device's row.
    let snap = http.get(&format!("{base}/api/snapshot")).await.json();
    let device = "device/edge-2-dev-3";
    let dev = actor(&snap, "edge-2", device).expect("edge-2 reported its device 3");
    let (dev_id, dev_parent) = (
        dev["id"].as_str().expect("an id").to_string(),
        dev["parent"].as_str().expect("a parent").to_string(),
    );
    assert_eq!(dev["restarts"], 0, "{dev}");
    if js(&page, ACTOR_ROW, vec![json!(dev_id)]).await.is_null() {
        // Devices sit under a collapsed supervisor: open it as a user would.
        let expander = format!("[data-expand=\"{dev_parent}\"]");
        let shown = js(
            &page,
            "return !!document.querySelector(`[data-expand=\"${CSS.escape(arguments[0])}\"]`);",
            vec![json!(dev_parent)],
        )
        .await;
        click(
            &page,
            if shown == true {
                &expander
            } else {
                "#expand-all"
            },
        )
        .await;
    }
    wait_page(
        &page,
        "the device's row",
        PAGE_SHOWS,
        ACTOR_ROW,
        vec![json!(dev_id)],
        |v| (v["restarts"] == "0").then_some(()),
    )
    .await;
    let restarted = http
        .post(
            &format!("{base}/api/actions/restart"),
            Some(&bearer),
            &json!({"node": "edge-2", "actor": device}),
        )
        .await;
    assert_eq!(restarted.status, StatusCode::OK, "{}", restarted.body);
    let restart_shown = Instant::now();
    wait_page(
        &page,
        "data-restarts=1",
        PAGE_SHOWS,
        ACTOR_ROW,
        vec![json!(dev_id)],
        |v| (v["restarts"] == "1" && v["status"] == "running").then_some(()),
    )
    .await;
    let restart_shown = restart_shown.elapsed();

    // The search box narrows the tree to the matching device, and Escape
    // brings the whole tree back.
    let search = page
        .find(Locator::Css("#search"))
        .await
        .expect("the search box");
    search
        .send_keys("edge-2-dev-3")
        .await
        .expect("typing a search");
    wait_page(
        &page,
        "only the searched device",
        PAGE_SHOWS,
        DEVICE_ROWS,
        vec![json!(dev_id)],
        |v| (v["shown"] == true && v["rows"] == 1).then_some(()),
    )
    .await;
    search
        .send_keys(&Key::Escape.to_string())
        .await
        .expect("pressing Escape in the search box");
    wait_page(
        &page,
        "every device again",
        PAGE_SHOWS,
        DEVICE_ROWS,
        vec![json!(dev_id)],
        |v| (v["rows"].as_u64() >= Some(BUSY.devices as u64)).then_some(()),
    )
    .await;

    // A paused uplink grows edge-2's backlog on the page: from a drained
    // outbox, so that the catch-up after the start does not count.
    let base_backlog = wait_page(
        &page,
        &format!("edge-2's backlog under {BACKLOG_DRAINED_READINGS} readings before the pause"),
        PAGE_SHOWS,
        BACKLOG,
        vec![json!("edge-2")],
        |v| backlog_readings(v).filter(|r| *r < BACKLOG_DRAINED_READINGS),
    )
    .await;
    let paused = http
        .post(
            &format!("{base}/api/actions/uplink"),
            Some(&bearer),
            &json!({"node": "edge-2", "paused": true}),
        )
        .await;
    assert_eq!(paused.status, StatusCode::OK, "{}", paused.body);
    wait_page(
        &page,
        "edge-2's uplink button offering to resume",
        PAGE_SHOWS,
        UPLINK_BUTTON,
        vec![],
        |v| (v["paused"] == "true").then_some(()),
    )
    .await;
    let peak = wait_page(
        &page,
        &format!("edge-2's backlog at {BACKLOG_RISEN_READINGS}+ readings"),
        PAGE_SHOWS,
        BACKLOG,
        vec![json!("edge-2")],
        |v| backlog_readings(v).filter(|r| *r >= BACKLOG_RISEN_READINGS),
    )
    .await;
    let shot = tokio::time::timeout(WEBDRIVER_TIMEOUT, page.screenshot())
        .await
        .expect("the screenshot in time")
        .expect("taking a screenshot");
    assert!(shot.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
    let shot_path = node_binary()
        .parent()
        .and_then(Path::parent)
        .expect("the node binary lives in target/<profile>")
        .join("dashboard.png");
    std::fs::write(&shot_path, &shot).expect("writing the screenshot");

    // Resumed from the page itself: its token box and its uplink button.
    let token_box = page
        .find(Locator::Css("#token"))
        .await
        .expect("the token input");
    token_box.send_keys(TOKEN).await.expect("typing the token");
    wait_page(
        &page,
        "edge-2's resume button enabled",
        PAGE_SHOWS,
        UPLINK_BUTTON,
        vec![],
        |v| (v["paused"] == "true" && v["disabled"] == false).then_some(()),
    )
    .await;
    click(&page, "button[data-action=uplink][data-node=\"edge-2\"]").await;
    wait_page(
        &page,
        "edge-2's uplink button offering to pause again",
        PAGE_SHOWS,
        UPLINK_BUTTON,
        vec![],
        |v| (v["paused"] == "false").then_some(()),
    )
    .await;
    let drained = wait_page(
        &page,
        &format!("edge-2's backlog back under {BACKLOG_DRAINED_READINGS} readings"),
        PAGE_SHOWS,
        BACKLOG,
        vec![json!("edge-2")],
        |v| backlog_readings(v).filter(|r| *r < BACKLOG_DRAINED_READINGS),
    )
    .await;
    let snap = http.get(&format!("{base}/api/snapshot")).await.json();
    assert_eq!(
        node(&snap, "edge-2").expect("edge-2")["uplink_paused"],
        false,
        "the page's resume button did not resume the uplink"
    );

    // A partition marks edge-1 stale, and the heal fresh again; edge-2 never.
    f.edges[0].proxy.as_ref().expect("edge-1's proxy").cut();
    let cut = Instant::now();
    wait_stale(&page, "edge-1", true).await;
    let stale_after = cut.elapsed();
    let other = js(&page, CARD, vec![json!("edge-2")]).await;
    assert_eq!(other["stale"], "false", "edge-2 turned stale too: {other}");
    f.edges[0].proxy.as_ref().expect("edge-1's proxy").heal();
    let healed = Instant::now();
    wait_stale(&page, "edge-1", false).await;
    let fresh_after = healed.elapsed();
    let updates = js(&page, "return window.__tributary_updates;", vec![]).await;
    assert!(
        updates.as_u64().is_some_and(|u| u > 0),
        "the page applied no update: {updates}"
    );

    // An alert stamped where no Date reaches (a device whose clock is far
    // off) renders, and the page goes on applying updates.
    let shown = js(
        &page,
        "applyUpdate({now_ms: S.nowMs, alerts: [\
           {at_ms: 1e19, stage: 'far-future', device: 'd', text: 'ts from the future'}, \
           {at_ms: -1e17, stage: 'far-past', device: null, text: 'ts from the past'}]}); \
         return [...document.querySelectorAll('#alerts li')].slice(0, 2).map((li) => li.textContent);",
        vec![],
    )
    .await;
    assert!(
        shown.to_string().contains("far-future") && shown.to_string().contains("far-past"),
        "the far-off alerts are not listed: {shown}"
    );
    let before = js(&page, "return window.__tributary_updates;", vec![]).await;
    wait_page(
        &page,
        "updates after a far-off alert",
        PAGE_SHOWS,
        "return window.__tributary_updates;",
        vec![],
        |v| (v.as_u64() > before.as_u64()).then_some(()),
    )
    .await;
    let _ = tokio::time::timeout(WEBDRIVER_TIMEOUT, page.close()).await;

    eprintln!(
        "dashboard: first tree render {render_ms:.1} ms; restart shown after {restart_shown:?}; \
         backlog {base_backlog} -> {peak} paused -> {drained} resumed; stale after {stale_after:?}, fresh \
         {fresh_after:?} after the heal; {updates} updates; screenshot {}; {:?} in all",
        shot_path.display(),
        t0.elapsed()
    );
}

// ---- /metrics ----------------------------------------------------------

/// One scrape: the parsed samples, and the raw text and content type.
struct Scrape {
    text: String,
    content_type: String,
    samples: Vec<prometheus_parse::Sample>,
}

impl Scrape {
    async fn take(http: &Http, url: &str) -> Scrape {
        let a = http.get(url).await;
        assert_eq!(a.status, StatusCode::OK, "{url}: {}", a.body);
        let content_type = a
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let parsed = prometheus_parse::Scrape::parse(a.body.lines().map(|l| Ok(l.to_string())))
            .unwrap_or_else(|e| panic!("{url} does not parse: {e}\n{}", a.body));
        Scrape {
            text: a.body,
            content_type,
            samples: parsed.samples,
        }
    }

    /// Which of `families` no sample belongs to.
    fn missing<'a>(&self, families: &[&'a str]) -> Vec<&'a str> {
        families
            .iter()
            .filter(|f| !self.samples.iter().any(|s| s.metric == **f))
            .copied()
            .collect()
    }

    /// Every `_total` series, keyed by name and labels.
    fn totals(&self) -> HashMap<String, f64> {
        self.samples
            .iter()
            .filter(|s| s.metric.ends_with("_total"))
            .map(|s| {
                let v = match s.value {
                    prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                    ref other => panic!("{} is not a number: {other:?}", s.metric),
                };
                (format!("{}{{{}}}", s.metric, s.labels), v)
            })
            .collect()
    }

    fn value(&self, metric: &str, label: (&str, &str)) -> Option<f64> {
        self.samples.iter().find_map(|s| {
            let matches = s.metric == metric && s.labels.get(label.0) == Some(label.1);
            match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v)
                    if matches =>
                {
                    Some(v)
                }
                _ => None,
            }
        })
    }
}

fn assert_content_type(scrape: &Scrape, who: &str) {
    // The body is OpenMetrics (`_total` only on samples, `# EOF`), so the
    // type must say so: a 0.0.4 parser types its counters as unknown.
    if scrape.text.trim_end().ends_with("# EOF") {
        assert!(
            scrape
                .content_type
                .starts_with("application/openmetrics-text"),
            "{who}'s /metrics is OpenMetrics text served as {:?}",
            scrape.content_type
        );
    }
}

/// The latency histogram of the cloud: cumulative buckets ending at +Inf,
/// which holds every observation.
fn assert_histogram(scrape: &Scrape) {
    let h = scrape
        .samples
        .iter()
        .find(|s| s.metric == "tributary_end_to_end_latency_seconds")
        .expect("the latency histogram");
    let prometheus_parse::Value::Histogram(buckets) = &h.value else {
        panic!("tributary_end_to_end_latency_seconds is not a histogram: {h:?}");
    };
    let count = scrape
        .value(
            "tributary_end_to_end_latency_seconds_count",
            ("node", "cloud-1"),
        )
        .expect("the histogram's _count");
    assert!(
        buckets.windows(2).all(|w| w[0].count <= w[1].count),
        "buckets are not cumulative: {buckets:?}"
    );
    let last = buckets.last().expect("buckets");
    assert!(last.less_than.is_infinite(), "no +Inf bucket: {buckets:?}");
    assert!(
        scrape.text.contains("le=\"+Inf\""),
        "the last bucket is not spelled le=\"+Inf\":\n{}",
        scrape.text
    );
    assert_eq!(
        last.count, count,
        "the +Inf bucket ({}) differs from _count ({count})",
        last.count
    );
}

/// Polls until some `_total` series of `url` is above its value in `first`.
async fn scrape_after_growth(http: &Http, url: &str, first: &Scrape, series: &str) -> Scrape {
    let before = first.totals();
    let deadline = Instant::now() + METRICS_MOVE;
    loop {
        let next = Scrape::take(http, url).await;
        let grew = next
            .totals()
            .get(series)
            .zip(before.get(series))
            .is_some_and(|(now, then)| now > then);
        if grew {
            return next;
        }
        assert!(
            Instant::now() < deadline,
            "{series} did not grow within {METRICS_MOVE:?} at {url}"
        );
        tokio::time::sleep(POLL).await;
    }
}

fn assert_only_grew(who: &str, first: &Scrape, second: &Scrape) {
    let (before, after) = (first.totals(), second.totals());
    assert!(!before.is_empty(), "{who} has no _total series");
    let mut grew = 0;
    for (series, then) in &before {
        let now = after
            .get(series)
            .unwrap_or_else(|| panic!("{who}: {series} vanished between scrapes"));
        assert!(
            now >= then,
            "{who}: {series} went down from {then} to {now}"
        );
        grew += usize::from(now > then);
    }
    assert!(grew > 0, "{who}: no _total series grew");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_counters_only_grow() {
    let mut f = Fixture::new("metrics", &shared_bootstrap(), &["edge-1"]);
    f.set_cloud("metrics-addr", "127.0.0.1:0");
    f.start_cloud().await;
    let cloud = format!("{}/metrics", served_addr(f.cloud(), "metrics").await);
    f.workload(0, &LIGHT);
    f.edges[0].set("metrics-addr", "127.0.0.1:0");
    f.edges[0].start();
    let edge = format!(
        "{}/metrics",
        served_addr(f.edges[0].process(), "metrics").await
    );
    let http = Http::new();

    let cloud_series = "tributary_component_received_total{component=\"ingest\",node=\"cloud-1\"}";
    let edge_series = "tributary_component_received_total{component=\"gateway\",node=\"edge-1\"}";
    let common = [
        "tributary_component_received_total",
        "tributary_component_sent_total",
        "tributary_component_errors_total",
        "tributary_component_dropped_total",
        "tributary_link_up",
    ];
    let mut edge_families = common.to_vec();
    edge_families.extend([
        "tributary_outbox_bytes",
        "tributary_outbox_readings",
        "tributary_uplink_up",
        "tributary_actor_restarts_total",
    ]);
    let mut cloud_families = common.to_vec();
    cloud_families.extend([
        "tributary_end_to_end_latency_seconds",
        "tributary_end_to_end_latency_seconds_count",
        "tributary_end_to_end_latency_seconds_sum",
    ]);
    // First scrapes once readings flow and every family is there (links
    // and the uplink appear once the session is up), so growth can show.
    let deadline = Instant::now() + API_SHOWS;
    let (cloud_1, edge_1) = loop {
        let (c, e) = (
            Scrape::take(&http, &cloud).await,
            Scrape::take(&http, &edge).await,
        );
        let flowing = |s: &Scrape, series| s.totals().get(series).is_some_and(|v| *v > 0.0);
        let missing = [c.missing(&cloud_families), e.missing(&edge_families)].concat();
        if flowing(&c, cloud_series) && flowing(&e, edge_series) && missing.is_empty() {
            break (c, e);
        }
        assert!(
            Instant::now() < deadline,
            "no readings counted or families {missing:?} missing within {API_SHOWS:?}:\n\
             cloud:\n{}\nedge:\n{}",
            c.text,
            e.text
        );
        tokio::time::sleep(POLL).await;
    };
    assert_content_type(&edge_1, "the edge");
    assert_content_type(&cloud_1, "the cloud");
    assert_histogram(&cloud_1);

    let cloud_2 = scrape_after_growth(&http, &cloud, &cloud_1, cloud_series).await;
    let edge_2 = scrape_after_growth(&http, &edge, &edge_1, edge_series).await;
    assert_only_grew("the cloud", &cloud_1, &cloud_2);
    assert_only_grew("the edge", &edge_1, &edge_2);
    assert_histogram(&cloud_2);
    let count = |s: &Scrape| {
        s.value(
            "tributary_end_to_end_latency_seconds_count",
            ("node", "cloud-1"),
        )
        .expect("_count")
    };
    assert!(
        count(&cloud_2) > count(&cloud_1),
        "the latency histogram did not count the new readings"
    );
}

// ---- actions -----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_need_the_token_and_are_audited() {
    let audit_topic = unique_topic("dashboard-actions-audit");
    let mut f = Fixture::new("actions", &shared_bootstrap(), &["edge-1"]);
    f.set_cloud("dashboard-addr", "127.0.0.1:0");
    f.set_cloud("dashboard-token", TOKEN);
    f.set_cloud("audit-topic", &audit_topic);
    f.start_cloud().await;
    let base = served_addr(f.cloud(), "dashboard").await;
    f.workload(0, &LIGHT);
    f.edges[0].start();
    let http = Http::new();
    wait_reported(&http, &base, &f, &["edge-1"], LIGHT.devices).await;

    let device = "device/edge-1-dev-1";
    let restart_url = format!("{base}/api/actions/restart");
    let uplink_url = format!("{base}/api/actions/uplink");
    let restart = json!({"node": "edge-1", "actor": device});
    let pause = json!({"node": "edge-1", "paused": true});
    let resume = json!({"node": "edge-1", "paused": false});
    let same_length_guess = format!("Bearer {}", "x".repeat(TOKEN.len()));
    let prefix = format!("Bearer {}", &TOKEN[..TOKEN.len() - 1]);
    let longer = format!("Bearer {TOKEN}x");
    let refused: [(&str, Option<&str>, &Value); 7] = [
        (&restart_url, None, &restart),
        (&uplink_url, None, &pause),
        (&restart_url, Some(&same_length_guess), &restart),
        (&restart_url, Some(&prefix), &restart),
        (&restart_url, Some(&longer), &restart),
        // The token without the scheme, and under another scheme.
        (&restart_url, Some(TOKEN), &restart),
        (&uplink_url, Some(&format!("Basic {TOKEN}")), &pause),
    ];
    for (url, auth, body) in refused {
        let a = http.post(url, auth, body).await;
        assert_eq!(
            a.status,
            StatusCode::UNAUTHORIZED,
            "{url} with {auth:?}: {}",
            a.body
        );
    }
    let bearer = format!("Bearer {TOKEN}");
    // Authorised but not runnable: refused before the audit.
    let unknown = http
        .post(
            &restart_url,
            Some(&bearer),
            &json!({"node": "edge-1", "actor": "device/nobody"}),
        )
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND, "{}", unknown.body);
    let root = http
        .post(
            &restart_url,
            Some(&bearer),
            &json!({"node": "edge-1", "actor": "tributary.edge"}),
        )
        .await;
    assert_eq!(root.status, StatusCode::NOT_FOUND, "{}", root.body);
    let malformed = http
        .post(&uplink_url, Some(&bearer), &json!({"node": "edge-1"}))
        .await;
    assert!(
        malformed.status.is_client_error(),
        "a body without `paused` was accepted: {} {}",
        malformed.status,
        malformed.body
    );

    for (url, body) in [
        (&restart_url, &restart),
        (&uplink_url, &pause),
        (&uplink_url, &resume),
    ] {
        let a = http.post(url, Some(&bearer), body).await;
        assert_eq!(a.status, StatusCode::OK, "{url} {body}: {}", a.body);
        assert_eq!(a.json()["ok"], true, "{}", a.body);
    }
    let accepted_ms = now_ms();

    // Exactly one restart happened: the refused ones came first, so a report
    // collected after the accepted one would count them too.
    let (restarts, paused) = wait_snapshot(
        &http,
        &base,
        "a report after the actions",
        &|| f.log_tails(),
        |s| {
            let edge = node(s, "edge-1")?;
            let seen = edge["last_seen_ms"].as_u64()?;
            (seen > accepted_ms + 2 * REPORT_INTERVAL_MS).then(|| {
                (
                    actor(s, "edge-1", device).map(|a| a["restarts"].clone()),
                    edge["uplink_paused"].clone(),
                )
            })
        },
    )
    .await;
    assert_eq!(restarts, Some(json!(1)), "restarts of {device}");
    assert_eq!(paused, false, "the uplink stayed paused");

    let records = consume_values(&shared_bootstrap(), &audit_topic, 3, AUDIT_READ)
        .await
        .expect("reading the audit topic");
    let actions: Vec<(&str, &Value, &Value)> = records
        .iter()
        .map(|r| (r.key.as_str(), &r.value["node"], &r.value["action"]))
        .collect();
    assert_eq!(
        actions,
        vec![
            ("edge-1", &json!("edge-1"), &json!({"restart": device})),
            ("edge-1", &json!("edge-1"), &json!({"uplink_paused": true})),
            ("edge-1", &json!("edge-1"), &json!({"uplink_paused": false})),
        ],
        "the audit topic holds exactly the accepted actions, in order"
    );
    for r in &records {
        let at = r.value["at_ms"].as_u64().expect("at_ms");
        assert!(at <= accepted_ms, "audited after the answer: {}", r.value);
    }

    // Without a configured token, actions are off altogether.
    let mut off = Fixture::new("actions-off", &shared_bootstrap(), &[]);
    off.set_cloud("dashboard-addr", "127.0.0.1:0");
    off.start_cloud().await;
    let off_base = served_addr(off.cloud(), "dashboard").await;
    for auth in [None, Some(bearer.as_str())] {
        let a = http
            .post(&format!("{off_base}/api/actions/restart"), auth, &restart)
            .await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{auth:?}: {}", a.body);
    }
}

// ---- HTTP limits (issue #11, finding 7) --------------------------------
//
// Each limit is shown by a real misbehaving client on plain TCP sockets
// (no HTTP library that would be polite for us), against a cloud process
// started with small limits.

/// A raw request's answer: its status, and its body (whole, for
/// `Connection: close` requests).
struct RawAnswer {
    status: u16,
    body: String,
}

/// The address of a `http://ip:port` base.
fn socket_addr(base: &str) -> SocketAddr {
    base.trim_start_matches("http://")
        .parse()
        .unwrap_or_else(|e| panic!("{base}: {e}"))
}

/// A TCP connection to `addr`, from loopback address `from` when given (so
/// the node sees another client: all of 127/8 is local).
async fn tcp(addr: SocketAddr, from: Option<IpAddr>) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("a TCP socket");
    if let Some(ip) = from {
        socket
            .bind(SocketAddr::new(ip, 0))
            .unwrap_or_else(|e| panic!("binding to {ip}: {e}"));
    }
    tokio::time::timeout(HTTP_TIMEOUT, socket.connect(addr))
        .await
        .unwrap_or_else(|_| panic!("connecting to {addr} took over {HTTP_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"))
}

fn get_request(addr: SocketAddr, path: &str, auth: Option<&str>, close: bool) -> String {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n");
    if close {
        req.push_str("Connection: close\r\n");
    }
    if let Some(a) = auth {
        req.push_str(&format!("Authorization: {a}\r\n"));
    }
    req.push_str("\r\n");
    req
}

/// Parses what a `Connection: close` request read to its end; `None` if the
/// server closed without a byte (a refused connection).
fn parse_answer(bytes: &[u8]) -> Option<RawAnswer> {
    if bytes.is_empty() {
        return None;
    }
    let text = String::from_utf8_lossy(bytes);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some(RawAnswer { status, body })
}

/// Reads `stream` to its end (a reset counts as an end).
async fn read_to_end(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(HTTP_TIMEOUT, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the server neither answered nor closed within {HTTP_TIMEOUT:?}"),
        }
    }
}

/// One `GET` on a fresh connection that closes after it: `None` if the
/// server closed the connection without an answer.
async fn raw_get(addr: SocketAddr, path: &str, auth: Option<&str>) -> Option<RawAnswer> {
    let mut s = tcp(addr, None).await;
    // A refused connection may be closed before the request is written.
    if s.write_all(get_request(addr, path, auth, true).as_bytes())
        .await
        .is_err()
    {
        return None;
    }
    parse_answer(&read_to_end(&mut s).await)
}

/// Waits until the server closes `stream` (which sends nothing more);
/// returns when, and what it sent before.
async fn closed_by_server(stream: &mut TcpStream, within: Duration) -> (Instant, Vec<u8>) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (Instant::now(), out),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "the server did not close the connection within {within:?}; it sent {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
}

/// Whether the server still holds `stream` open after `wait` (what it
/// sent meanwhile is read and dropped).
async fn still_open(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return true,
            Ok(Ok(0)) | Ok(Err(_)) => return false,
            Ok(Ok(_)) => continue,
        }
    }
}

/// A cloud-side counter of `/metrics` (`tributary_component_<what>_total`
/// of component `component`), through raw requests (so no pooled
/// connection takes a slot).
async fn component_counter(
    addr: SocketAddr,
    auth: Option<&str>,
    component: &str,
    what: &str,
) -> f64 {
    let a = raw_get(addr, "/metrics", auth)
        .await
        .expect("an answer from /metrics");
    assert_eq!(a.status, 200, "/metrics: {}", a.body);
    let parsed = prometheus_parse::Scrape::parse(a.body.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("/metrics does not parse: {e}\n{}", a.body));
    parsed
        .samples
        .iter()
        .find_map(|s| {
            let name = format!("tributary_component_{what}_total");
            match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v)
                    if s.metric == name && s.labels.get("component") == Some(component) =>
                {
                    Some(v)
                }
                _ => None,
            }
        })
        .unwrap_or(0.0)
}

/// Waits until the cloud's report (once a second) counts at least `min`.
async fn wait_counted(
    addr: SocketAddr,
    auth: Option<&str>,
    component: &str,
    what: &str,
    min: f64,
) -> f64 {
    let deadline = Instant::now() + METRICS_MOVE;
    loop {
        let v = component_counter(addr, auth, component, what).await;
        if v >= min {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{component} {what} stayed at {v} (< {min}) for {METRICS_MOVE:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The header-read timeout of the slowloris test.
const SLOW_HEADERS_MS: u64 = 1_000;
/// How often the slowloris sends one more byte of its headers.
const SLOWLORIS_BYTE_EVERY: Duration = Duration::from_millis(100);
/// Slack on top of a timeout before the test calls it missed (a loaded
/// 2-core machine runs Kafka, the nodes and the test).
const TIMER_SLACK: Duration = Duration::from_millis(2_000);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_is_cut_after_the_header_read_timeout() {
    let mut f = Fixture::new("slowloris", &shared_bootstrap(), &[]);
    f.set_cloud("dashboard-addr", "127.0.0.1:0");
    f.set_cloud(
        "dashboard-header-read-timeout-ms",
        &SLOW_HEADERS_MS.to_string(),
    );
    f.start_cloud().await;
    let addr = socket_addr(&served_addr(f.cloud(), "dashboard").await);
    let timeout = Duration::from_millis(SLOW_HEADERS_MS);

    // Headers byte by byte, never finished: 10 bytes a second keep any
    // per-read timeout happy, but not a deadline on the whole header.
    let stream = tcp(addr, None).await;
    let started = Instant::now();
    let (mut rx, mut tx) = stream.into_split();
    let dribble = tokio::spawn(async move {
        let mut sent = 0usize;
        for b in b"GET /api/snapshot HTTP/1.1\r\nHost: x\r\nX-Slow: "
            .iter()
            .chain(std::iter::repeat(&b'a'))
        {
            if tx.write_all(&[*b]).await.is_err() {
                break;
            }
            sent += 1;
            tokio::time::sleep(SLOWLORIS_BYTE_EVERY).await;
        }
        sent
    });
    // Meanwhile, an honest client is served.
    let honest = raw_get(addr, "/api/snapshot", None)
        .await
        .expect("the honest request's answer");
    assert_eq!(honest.status, 200, "{}", honest.body);
    let served_during = started.elapsed();
    let mut buf = [0u8; 1024];
    let cut = loop {
        match tokio::time::timeout(timeout + TIMER_SLACK, rx.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break started.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!(
                "the slowloris was not cut within {:?}",
                timeout + TIMER_SLACK
            ),
        }
    };
    let sent = dribble.await.expect("the dribbling task");
    assert!(
        cut >= timeout.saturating_sub(Duration::from_millis(50)),
        "cut after {cut:?}, before the {timeout:?} timeout"
    );
    assert!(cut < timeout + TIMER_SLACK, "cut only after {cut:?}");

    // A connection that sends nothing at all is cut the same way.
    let mut idle = tcp(addr, None).await;
    let idle_from = Instant::now();
    let (at, _) = closed_by_server(&mut idle, timeout + TIMER_SLACK).await;
    let idle_cut = at - idle_from;
    assert!(
        idle_cut >= timeout.saturating_sub(Duration::from_millis(50)),
        "{idle_cut:?}"
    );

    let counted = wait_counted(addr, None, "dashboard-http", "dropped", 2.0).await;
    eprintln!(
        "slowloris: cut after {cut:?} ({sent} header bytes sent, timeout {timeout:?}); an idle \
         connection cut after {idle_cut:?}; an honest request served {served_during:?} into it; \
         {counted} connections counted as cut"
    );
}

/// The connection limit of the connections test.
const CONNECTIONS_MAX: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_are_closed_at_once() {
    let mut f = Fixture::new("connections", &shared_bootstrap(), &[]);
    f.set_cloud("dashboard-addr", "127.0.0.1:0");
    f.set_cloud("dashboard-connections-max", &CONNECTIONS_MAX.to_string());
    // Idle connections hold their slots for the whole test.
    f.set_cloud("dashboard-header-read-timeout-ms", "60000");
    f.start_cloud().await;
    let addr = socket_addr(&served_addr(f.cloud(), "dashboard").await);

    // The limit's worth of idle connections, then one more: the server
    // accepts in order, so the last one is over the limit.
    let mut held = Vec::new();
    for _ in 0..CONNECTIONS_MAX {
        held.push(tcp(addr, None).await);
    }
    let mut extra = tcp(addr, None).await;
    let connected = Instant::now();
    let (closed, sent) = closed_by_server(&mut extra, HTTP_TIMEOUT).await;
    let refused_in = closed - connected;
    assert!(
        sent.is_empty(),
        "the extra connection got {:?}",
        String::from_utf8_lossy(&sent)
    );
    // Every held one is served (it was accepted, not queued), and stays.
    for (i, s) in held.iter_mut().enumerate() {
        s.write_all(get_request(addr, "/api/snapshot", None, false).as_bytes())
            .await
            .expect("writing on a held connection");
        let mut buf = [0u8; 12];
        tokio::time::timeout(HTTP_TIMEOUT, s.read_exact(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("held connection {i} got no answer"))
            .unwrap_or_else(|e| panic!("held connection {i}: {e}"));
        assert_eq!(&buf, b"HTTP/1.1 200", "held connection {i}");
    }
    // Still full: a normal request on a new connection is closed unanswered.
    assert!(
        raw_get(addr, "/api/snapshot", None).await.is_none(),
        "a request past the limit was answered"
    );
    assert!(still_open(&mut held[0], Duration::from_millis(300)).await);

    // One leaves: a normal request gets through again.
    drop(held.pop());
    let left = Instant::now();
    let deadline = left + HTTP_TIMEOUT;
    let answer = loop {
        if let Some(a) = raw_get(addr, "/api/snapshot", None).await {
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "no request got through within {HTTP_TIMEOUT:?} of a connection leaving"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let through_after = left.elapsed();
    assert_eq!(answer.status, 200, "{}", answer.body);
    serde_json::from_str::<Value>(&answer.body).expect("the snapshot is JSON");

    // The refusals are counted in the cloud's report (scraped through the
    // free slot: each raw request closes after its answer).
    let refused = wait_counted(addr, None, "dashboard-http", "dropped", 2.0).await;
    eprintln!(
        "connections: {CONNECTIONS_MAX} held, the next closed {refused_in:?} after it \
         connected; a request got through {through_after:?} after one left; {refused} refused \
         in all"
    );
    drop(held);
}

/// The card of node `id`, and the page's connection state.
const CARD_LIVE: &str =
    "const c = document.querySelector(`[data-node=\"${CSS.escape(arguments[0])}\"][data-stale]`); \
     return c ? {stale: c.dataset.stale, conn: document.querySelector('#conn').textContent} : null;";

/// Snapshots asked for in a row, at most, until two are the same bytes.
const SNAPSHOTS_ASKED_MAX: usize = 20;

/// Live pages one client may hold in the pages test.
const PAGES_PER_CLIENT: usize = 2;
/// The address the page hog connects from: another client than the
/// browser (127.0.0.1) to the node.
const HOG: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

/// Opens an event stream from `from`: its status, and the open stream once
/// the first snapshot came (for 200).
async fn open_events(addr: SocketAddr, from: IpAddr, path: &str) -> (u16, TcpStream) {
    let mut s = tcp(addr, Some(from)).await;
    s.write_all(get_request(addr, path, None, false).as_bytes())
        .await
        .expect("asking for the event stream");
    let mut seen = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = Instant::now() + HTTP_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => panic!("reading the event stream: {e}"),
            Err(_) => panic!(
                "no answer within {HTTP_TIMEOUT:?}: {}",
                String::from_utf8_lossy(&seen)
            ),
        };
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen);
        if let Some(status) = text
            .split_once("\r\n")
            .and_then(|(line, _)| line.split(' ').nth(1))
            .and_then(|s| s.parse::<u16>().ok())
        {
            if status != 200 || text.contains("event: snapshot") {
                return (status, s);
            }
        }
        assert!(n > 0, "the stream closed before its first snapshot: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_need_the_token_and_one_client_cannot_take_every_page() {
    let mut f = Fixture::new("view-token", &shared_bootstrap(), &[]);
    f.set_cloud("dashboard-addr", "127.0.0.1:0");
    f.set_cloud("dashboard-token", TOKEN);
    f.set_cloud("dashboard-view-token-required", "true");
    f.set_cloud(
        "dashboard-pages-per-client-max",
        &PAGES_PER_CLIENT.to_string(),
    );
    f.set_cloud("audit-topic", &unique_topic("dashboard-view-audit"));
    f.start_cloud().await;
    let base = served_addr(f.cloud(), "dashboard").await;
    let addr = socket_addr(&base);
    let bearer = format!("Bearer {TOKEN}");
    let in_url = format!("token={TOKEN}");
    let driver = ChromeDriver::start(f.dir.path()).await;

    // No token, or a wrong one: 401 on every view.
    let guess = format!("token={}", "x".repeat(TOKEN.len()));
    let mut refused = 0.0;
    for path in ["/", "/api/snapshot", "/api/events", "/metrics"] {
        for query in ["", &guess] {
            let url = if query.is_empty() {
                path.to_string()
            } else {
                format!("{path}?{query}")
            };
            let a = raw_get(addr, &url, None).await.expect("an answer");
            assert_eq!(a.status, 401, "{url}: {}", a.body);
            refused += 1.0;
        }
        let a = raw_get(
            addr,
            path,
            Some(&format!("Bearer {}", "x".repeat(TOKEN.len()))),
        )
        .await
        .expect("an answer");
        assert_eq!(a.status, 401, "{path} with a wrong bearer: {}", a.body);
        refused += 1.0;
    }
    // The token, in the URL or as a bearer header: served.
    for (path, auth) in [
        (format!("/?{in_url}"), None),
        (format!("/api/snapshot?{in_url}"), None),
        ("/api/snapshot".to_string(), Some(bearer.as_str())),
        ("/metrics".to_string(), Some(bearer.as_str())),
    ] {
        let a = raw_get(addr, &path, auth).await.expect("an answer");
        assert_eq!(a.status, 200, "{path} {auth:?}: {}", a.body);
    }

    // The snapshot is serialized once per tick: requests within one tick
    // get the same bytes (built per request, each would have its own
    // now_ms).
    let mut previous = String::new();
    let same = 'ask: {
        for i in 0..SNAPSHOTS_ASKED_MAX {
            let a = raw_get(addr, "/api/snapshot", Some(&bearer))
                .await
                .expect("an answer");
            if a.body == previous {
                break 'ask i;
            }
            previous = a.body;
        }
        panic!("{SNAPSHOTS_ASKED_MAX} snapshots in a row all differ: not cached");
    };

    // One client takes its share of pages; the next is refused with 429.
    let events = format!("/api/events?{in_url}");
    let mut hog = Vec::new();
    for i in 0..PAGES_PER_CLIENT {
        let (status, s) = open_events(addr, HOG, &events).await;
        assert_eq!(status, 200, "the hog's page {i}");
        hog.push(s);
    }
    let (status, _) = open_events(addr, HOG, &events).await;
    assert_eq!(status, 429, "a page past dashboard_pages_per_client_max");

    // Another client (Chromium, from 127.0.0.1) still gets its page, with
    // the token from its URL passed on to its event stream.
    let page = driver.browser(f.dir.path()).await;
    let opened = Instant::now();
    tokio::time::timeout(WEBDRIVER_TIMEOUT, page.goto(&format!("{base}/?{in_url}")))
        .await
        .expect("the page loads in time")
        .expect("loading the page");
    wait_page(
        &page,
        "cloud-1's card, live",
        PAGE_SHOWS,
        CARD_LIVE,
        vec![json!("cloud-1")],
        |v| (v["stale"] == "false" && v["conn"] == "live").then_some(()),
    )
    .await;
    let page_live_after = opened.elapsed();
    let updates = wait_page(
        &page,
        "an update",
        PAGE_SHOWS,
        "return window.__tributary_updates;",
        vec![],
        |v| v.as_u64().filter(|u| *u > 0),
    )
    .await;

    // A page the hog closes is given back.
    drop(hog.pop());
    let deadline = Instant::now() + HTTP_TIMEOUT;
    loop {
        let (status, s) = open_events(addr, HOG, &events).await;
        if status == 200 {
            hog.push(s);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the hog's closed page was not given back within {HTTP_TIMEOUT:?}"
        );
        tokio::time::sleep(POLL).await;
    }

    let pages_refused = wait_counted(addr, Some(&bearer), "dashboard-pages", "dropped", 1.0).await;
    let unauthorised = wait_counted(addr, Some(&bearer), "dashboard-auth", "errors", refused).await;
    let _ = tokio::time::timeout(WEBDRIVER_TIMEOUT, page.close()).await;
    eprintln!(
        "view token: {refused} views without it refused (counted {unauthorised}); the page live \
         {page_live_after:?} after opening it with ?token=, {updates} updates; \
         {PAGES_PER_CLIENT} pages from {HOG} then 429 (counted {pages_refused}); snapshot \
         {same} the same bytes as the one before it"
    );
}

/// Two cloud nodes, each edge placed on one of them: either node's page
/// shows the whole fleet, each edge marked with the node it is placed on;
/// when one cloud node is killed -9, the other's page marks it down, and
/// the edge that could only reach it stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_cloud_node_shows_the_whole_fleet_and_marks_a_dead_one_down() {
    let mut f = Fixture::new("fleet-view", &shared_bootstrap(), &["edge-1", "edge-2"]);
    f.set_cloud("dashboard-addr", "127.0.0.1:0");
    f.add_clouds(1);
    let (one, two) = (f.cloud_addr.to_string(), f.more_clouds[0].addr.to_string());
    f.edges[0].set("cloud-addr", &one);
    f.edges[1].set("cloud-addr", &two);
    f.start_cloud().await;
    f.start_more_cloud(0).await;
    let base_one = served_addr(f.cloud(), "dashboard").await;
    let base_two = served_addr(
        f.more_clouds[0].process.as_mut().expect("cloud-2 running"),
        "dashboard",
    )
    .await;
    for i in 0..2 {
        f.workload(i, &LIGHT);
        f.edges[i].start();
    }
    let http = Http::new();
    let shown = |s: &Value, id: &str, via: Option<&str>| {
        node(s, id)
            .is_some_and(|n| n["stale"] == false && n["link"] == "up" && n["via"].as_str() == via)
    };
    for (base, here, there, edge_here, edge_there) in [
        (&base_one, "cloud-1", "cloud-2", "edge-1", "edge-2"),
        (&base_two, "cloud-2", "cloud-1", "edge-2", "edge-1"),
    ] {
        wait_snapshot(
            &http,
            base,
            &format!("the whole fleet on {here}"),
            &|| f.log_tails(),
            |s| {
                (shown(s, edge_here, None)
                    && shown(s, edge_there, Some(there))
                    && shown(s, there, Some(there)))
                .then_some(())
            },
        )
        .await;
    }
    // The relayed edge's tree came along.
    let snap = http.get(&format!("{base_one}/api/snapshot")).await.json();
    let devices = node(&snap, "edge-2")
        .and_then(|n| n["actors"].as_array())
        .map_or(0, |a| a.iter().filter(|a| a["kind"] == "device").count());
    assert_eq!(devices, LIGHT.devices, "{snap:#}");

    f.more_clouds[0]
        .process
        .as_mut()
        .expect("cloud-2 running")
        .kill9()
        .expect("killing cloud-2");
    wait_snapshot(
        &http,
        &base_one,
        "cloud-2 and its edge down on cloud-1",
        &|| f.log_tails(),
        |s| {
            let down =
                |id: &str| node(s, id).is_some_and(|n| n["stale"] == true && n["link"] == "down");
            (down("cloud-2") && down("edge-2") && shown(s, "edge-1", None)).then_some(())
        },
    )
    .await;
}

//! The MQTT source against a real Mosquitto and a real Kafka, tried the way
//! devices and networks use it: bursts, one device far faster than its
//! clock's milliseconds, a broker holding a backlog while the edge's MQTT
//! connection is cut again and again, a kill -9 of the edge mid-stream, a
//! reading only an edge window reads, garbage, timestamps from the future.
//!
//! Every device numbers its readings (`n` = 0, 1, 2, ... in the payload);
//! the expected set is what the test published and the broker acknowledged,
//! never the edge's own ack log. Readings are told apart by their number,
//! because many share a timestamp.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::watch;
use tributary_tests::broker::{shared_bootstrap, unique_topic};
use tributary_tests::checker::{check_numbered, consume_all, consume_values, NumberedReport};
use tributary_tests::fixture::{Fixture, DRAIN, NODE_READY};
use tributary_tests::process::{node_binary, NodeProcess};
use tributary_tests::tcp_proxy::TcpProxy;

const MQTT_ENV: &str = "TRIBUTARY_MQTT_ADDR";
/// Bound on the broker acknowledging everything published to the test's publisher.
const PUBLISH_ACKED: Duration = Duration::from_secs(120);
/// Requests the publisher may queue before `publish` waits.
const PUBLISHER_QUEUE_MAX: usize = 1000;
/// Publishes the publisher may have unacknowledged by the broker.
const PUBLISHER_INFLIGHT_MAX: u16 = 500;
/// Delay between the publisher's reconnect attempts.
const PUBLISHER_RETRY: Duration = Duration::from_millis(100);
/// The edge's log lines quoted when a check fails: the MQTT source's.
const EDGE_LOG_LINES_MAX: usize = 200;
/// The nodes' log filter.
const LOG_FILTER: &str = "info";
/// Overrides [`LOG_FILTER`] (e.g. `tributary_actors::edge::mqtt=trace`).
const LOG_FILTER_ENV: &str = "TRIBUTARY_TEST_LOG";

type Expected = BTreeMap<String, BTreeSet<i64>>;

/// The Mosquitto broker `scripts/test.sh` starts.
fn mqtt_addr() -> SocketAddr {
    let addr = match std::env::var(MQTT_ENV) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => panic!(
            "{MQTT_ENV} is not set: run scripts/test.sh, which starts Mosquitto \
             (or run `mosquitto -p PORT` and export {MQTT_ENV}=127.0.0.1:PORT)"
        ),
    };
    addr.parse()
        .unwrap_or_else(|_| panic!("{MQTT_ENV}={addr} is not ip:port"))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A QoS 1 publisher that counts the broker's PUBACKs, numbering each
/// device's readings.
struct Publisher {
    client: AsyncClient,
    acked: watch::Receiver<usize>,
    sent: usize,
    next_n: BTreeMap<String, i64>,
    expected: Expected,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    fn start() -> Self {
        let broker = mqtt_addr();
        let mut o = MqttOptions::new(unique_topic("pub"), broker.ip().to_string(), broker.port());
        o.set_max_packet_size(1 << 20, 1 << 20);
        o.set_inflight(PUBLISHER_INFLIGHT_MAX);
        let (client, mut events) = AsyncClient::new(o, PUBLISHER_QUEUE_MAX);
        let (tx, acked) = watch::channel(0usize);
        let task = tokio::spawn(async move {
            let mut n = 0;
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        n += 1;
                        let _ = tx.send(n);
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(_)) | Event::Incoming(_)) => {}
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("publisher: {e}; retrying");
                        tokio::time::sleep(PUBLISHER_RETRY).await;
                    }
                }
            }
        });
        Publisher {
            client,
            acked,
            sent: 0,
            next_n: BTreeMap::new(),
            expected: Expected::new(),
            task,
        }
    }

    /// Publishes the next reading of `device` under `prefix`, stamped `ts_ms`.
    async fn reading(&mut self, prefix: &str, device: &str, ts_ms: i64) -> i64 {
        let n = *self
            .next_n
            .entry(device.to_owned())
            .and_modify(|n| *n += 1)
            .or_insert(0);
        let payload = format!(
            r#"{{"ts": {ts_ms}, "n": {n}, "v": {}, "unit": {{"v": "bar"}}}}"#,
            1.0 + (n % 100) as f64 / 8.0
        );
        self.raw(&format!("{prefix}/{device}/telemetry"), payload)
            .await;
        self.expected
            .entry(device.to_owned())
            .or_default()
            .insert(n);
        n
    }

    /// Publishes anything, counted but not expected in the log.
    async fn raw(&mut self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("queueing a publish");
        self.sent += 1;
    }

    /// Waits until the broker acknowledged everything published so far.
    async fn wait_acked(&mut self) {
        let sent = self.sent;
        let waited = tokio::time::timeout(PUBLISH_ACKED, self.acked.wait_for(|n| *n >= sent))
            .await
            .map(|r| r.is_ok());
        assert!(
            waited == Ok(true),
            "the broker acked only {} of {sent} publishes within {PUBLISH_ACKED:?}",
            *self.acked.borrow()
        );
    }

    fn total(&self) -> usize {
        self.expected.values().map(BTreeSet::len).sum()
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A fixture with one edge whose only source is MQTT on `<prefix>/+/telemetry`,
/// reaching the broker at `broker` (Mosquitto itself, or a proxy before it).
fn mqtt_fixture(name: &str, broker: SocketAddr) -> (Fixture, String) {
    let prefix = unique_topic(&format!("t-{name}"));
    let log_filter = std::env::var(LOG_FILTER_ENV).unwrap_or_else(|_| LOG_FILTER.to_string());
    let mut f = Fixture::new(name, &shared_bootstrap(), &["edge-1"])
        .with_program(node_binary(), &[("RUST_LOG", &log_filter)]);
    let e = &mut f.edges[0];
    e.set("device-count", "0");
    e.set("mqtt-addr", &broker.to_string());
    e.set("mqtt-topic", &format!("{prefix}/+/telemetry"));
    // Unique per test: the broker keeps the session under it.
    e.set("mqtt-client-id", &unique_topic(&format!("edge-{name}")));
    (f, prefix)
}

/// The MQTT source's log lines of an edge, the last ones: what a failed
/// check needs.
fn mqtt_log_lines(process: &NodeProcess) -> String {
    let log = std::fs::read_to_string(process.log_path()).unwrap_or_default();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("mqtt") || l.contains("outbox") || l.contains("ERROR"))
        .collect();
    let skip = lines.len().saturating_sub(EDGE_LOG_LINES_MAX);
    lines[skip..].join("\n")
}

/// Reads the topic back and checks it against what was published: each
/// reading once, in order per device, nothing else.
async fn check_published(f: &mut Fixture, expected: &Expected) -> NumberedReport {
    let total: usize = expected.values().map(BTreeSet::len).sum();
    let consumed = consume_all(&f.bootstrap, &f.topic, total, DRAIN)
        .await
        .expect("consuming the readings topic");
    let report = check_numbered(&consumed, expected);
    if !report.is_exactly_once() {
        // The nodes' logs and data outlive the test, for a post-mortem.
        f.dir.disable_cleanup(true);
        panic!(
            "{report}\nthe nodes' logs and data are kept in {}\nthe edge's MQTT log:\n{}",
            f.dir.path().display(),
            mqtt_log_lines(f.edges[0].process())
        );
    }
    assert_eq!(report.consumed, total, "{report}");
    report
}

fn devices(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("dev-{i}")).collect()
}

/// Waits until the edge has acknowledged `n` readings (its ack log).
async fn wait_edge_acked(f: &Fixture, n: usize, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    while f.edges[0].acked_lines() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the edge acknowledged {} of {n} readings within {timeout:?}",
            f.edges[0].acked_lines()
        );
        // The ack log is a file another process appends to: poll it.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_readings_arrive_exactly_once() {
    let (mut f, prefix) = mqtt_fixture("mqtt-once", mqtt_addr());
    f.start_cloud().await;
    f.edges[0].start();
    f.edges[0].wait_log("mqtt subscribed").await;
    let mut p = Publisher::start();
    for i in 0..40 {
        for d in devices(5) {
            p.reading(&prefix, &d, 1_700_000_000_000 + i).await;
        }
    }
    p.wait_acked().await;
    let expected = p.expected.clone();
    let report = check_published(&mut f, &expected).await;
    assert_eq!(report.consumed, 200);
}

/// One device publishing as fast as rumqttc can, stamped with the real clock
/// in milliseconds: thousands of readings share a millisecond, and every one
/// is in Kafka once, in order (the old source dropped most of them as stale).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_device_as_fast_as_it_can_many_readings_per_millisecond() {
    const READINGS: usize = 20_000;
    let (mut f, prefix) = mqtt_fixture("mqtt-fast", mqtt_addr());
    f.start_cloud().await;
    f.edges[0].start();
    f.edges[0].wait_log("mqtt subscribed").await;
    let mut p = Publisher::start();
    let mut stamps = BTreeSet::new();
    for _ in 0..READINGS {
        let ts = now_ms();
        stamps.insert(ts);
        p.reading(&prefix, "vibration-1", ts).await;
    }
    p.wait_acked().await;
    eprintln!(
        "{READINGS} readings in {} distinct milliseconds",
        stamps.len()
    );
    assert!(
        stamps.len() < READINGS / 2,
        "the test must put many readings in one millisecond ({} distinct of {READINGS})",
        stamps.len()
    );
    let expected = p.expected.clone();
    check_published(&mut f, &expected).await;
}

/// The broker holds a large backlog for the edge's session while the edge's
/// MQTT connection is cut and comes back, again and again, with the session
/// present each time: the broker redelivers what it had in flight, and the
/// edge takes each reading exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_survives_repeated_mqtt_cuts_with_the_session_present() {
    const DEVICES: usize = 20;
    const PER_DEVICE: i64 = 1_000;
    const CUTS: usize = 6;
    let proxy = TcpProxy::start(mqtt_addr()).await.expect("the MQTT proxy");
    let (mut f, prefix) = mqtt_fixture("mqtt-cuts", proxy.addr());
    f.start_cloud().await;
    f.edges[0].start();
    f.edges[0].wait_log("mqtt subscribed").await;
    // The broker queues everything for the session while the edge is away.
    proxy.cut();
    f.edges[0].wait_log("mqtt connection lost").await;
    let mut p = Publisher::start();
    let base = now_ms();
    for i in 0..PER_DEVICE {
        for d in devices(DEVICES) {
            p.reading(&prefix, &d, base + i / 4).await;
        }
    }
    p.wait_acked().await;
    let total = p.total();
    // The edge drains the backlog, cut off every few hundred readings.
    let mut connects = 1;
    for cut in 0..CUTS {
        proxy.heal();
        connects += 1;
        let line = f.edges[0].wait_log_count("mqtt connected", connects).await;
        assert!(line.contains("session_present=true"), "{line}");
        let before = f.edges[0].acked_lines();
        let target = (before + total / (CUTS + 1)).min(total);
        wait_edge_acked(&f, target, NODE_READY).await;
        proxy.cut();
        eprintln!(
            "cut {}: {} of {total} readings acknowledged",
            cut + 1,
            f.edges[0].acked_lines()
        );
    }
    proxy.heal();
    let expected = p.expected.clone();
    let report = check_published(&mut f, &expected).await;
    assert_eq!(report.consumed, total);
    assert!(
        proxy.accepted() as usize > CUTS,
        "the edge reconnected after each cut"
    );
}

/// 100 devices at 100 Hz for 30 s (10,000 readings/s), and a kill -9 of the
/// edge in the middle; it restarts on the same outbox while the devices go
/// on publishing. What the broker acknowledged to the devices is in Kafka
/// exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_devices_at_100_hz_across_a_kill_9_of_the_edge() {
    const DEVICES: usize = 100;
    const RATE_HZ: u64 = 100;
    const SECONDS: u64 = 30;
    const KILL_AT_S: u64 = 12;
    let (mut f, prefix) = mqtt_fixture("mqtt-100hz", mqtt_addr());
    f.start_cloud().await;
    f.edges[0].start();
    f.edges[0].wait_log("mqtt subscribed").await;
    let mut p = Publisher::start();
    let names = devices(DEVICES);
    let tick = Duration::from_millis(1000 / RATE_HZ);
    let start = tokio::time::Instant::now();
    let mut killed = false;
    for k in 0..RATE_HZ * SECONDS {
        // Paced against the schedule, so a slow turn does not slow the rate.
        tokio::time::sleep_until(start + tick * k as u32).await;
        let ts = now_ms();
        for d in &names {
            p.reading(&prefix, d, ts).await;
        }
        if !killed && start.elapsed() >= Duration::from_secs(KILL_AT_S) {
            killed = true;
            let acked = f.edges[0].acked_lines();
            f.edges[0].process().kill9().expect("kill -9 of the edge");
            eprintln!(
                "killed the edge at {:?} with {acked} of {} readings acknowledged",
                start.elapsed(),
                p.total()
            );
            f.edges[0].start();
        }
    }
    let publish_took = start.elapsed();
    p.wait_acked().await;
    eprintln!(
        "published {} readings in {publish_took:?} ({:.0}/s)",
        p.total(),
        p.total() as f64 / publish_took.as_secs_f64()
    );
    assert!(killed);
    let line = f.edges[0].wait_log("mqtt connected").await;
    assert!(line.contains("session_present=true"), "{line}");
    let expected = p.expected.clone();
    check_published(&mut f, &expected).await;
}

/// A reading that only an edge window reads is acknowledged to the broker
/// only once it is durable in the stages' input log; after a kill -9 before
/// its window closes, the window comes back: its output (counting every
/// reading the broker was told we have) is in the log, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_only_an_edge_window_reads_survives_a_kill_9() {
    const READINGS: i64 = 7;
    let bootstrap = shared_bootstrap();
    let windows = unique_topic("mqtt-windows");
    let prefix = unique_topic("t-mqtt-window");
    let topic = format!("{prefix}/+/telemetry");
    let mut f = Fixture::new("mqtt-window", &bootstrap, &["edge-1"]).with_program(
        PathBuf::from(env!("CARGO_BIN_EXE_topology-node")),
        &[
            ("TRIBUTARY_TEST_TOPOLOGY", "mqtt-window"),
            ("TRIBUTARY_TEST_MQTT_TOPIC", &topic),
            ("TRIBUTARY_TEST_WINDOWS_TOPIC", &windows),
        ],
    );
    let e = &mut f.edges[0];
    e.set("device-count", "0");
    e.set("mqtt-addr", &mqtt_addr().to_string());
    e.set("mqtt-client-id", &unique_topic("edge-mqtt-window"));
    f.start_cloud().await;
    f.edges[0].start();
    f.edges[0].wait_log("mqtt subscribed").await;
    // The readings of one 10 s window, stamped now: the edge's watermark
    // (its clock minus 5 s) closes it 5 s after its end.
    let window_start = (now_ms() / 10_000 + 1) * 10_000;
    tokio::time::sleep(Duration::from_millis(
        (window_start - now_ms()).max(0) as u64 + 100,
    ))
    .await;
    let mut p = Publisher::start();
    for i in 0..READINGS {
        p.reading(&prefix, "press-1", window_start + 100 + i * 10)
            .await;
    }
    p.wait_acked().await;
    // The edge took them (its report counts them durable), then dies before
    // the window closes.
    f.edges[0].wait_log(&format!("committed={READINGS} ")).await;
    f.edges[0].process().kill9().expect("kill -9 of the edge");
    f.edges[0].start();
    f.edges[0].wait_log("mqtt subscribed").await;
    let out = consume_values(&bootstrap, &windows, 1, DRAIN)
        .await
        .expect("the window's output");
    assert_eq!(out.len(), 1, "one window, once: {out:?}");
    let count = out[0].value["metrics"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == "v.count"))
        .and_then(|m| m["value"]["i64"].as_i64());
    assert_eq!(
        count,
        Some(READINGS),
        "every reading the broker was told the edge has counts: {out:?}"
    );
}

/// A reading stamped ten years ahead is refused and counted; the device's
/// other readings, and the other devices', flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_future_timestamp_is_refused_and_counted() {
    let (mut f, prefix) = mqtt_fixture("mqtt-future", mqtt_addr());
    f.start_cloud().await;
    f.edges[0].start();
    f.edges[0].wait_log("mqtt subscribed").await;
    let mut p = Publisher::start();
    let ten_years_ms = 10 * 365 * 24 * 3600 * 1000;
    for i in 0..20 {
        for d in devices(2) {
            p.reading(&prefix, &d, now_ms()).await;
        }
        if i == 10 {
            p.raw(
                &format!("{prefix}/dev-0/telemetry"),
                format!(r#"{{"ts": {}, "v": 1.0}}"#, now_ms() + ten_years_ms),
            )
            .await;
        }
    }
    p.wait_acked().await;
    f.edges[0].wait_log("stamped too far ahead").await;
    f.edges[0].wait_log("readings_future=1").await;
    let expected = p.expected.clone();
    check_published(&mut f, &expected).await;
}

/// A device's older readings that the broker delivers after newer ones (a
/// backlog behind a burst) are all taken: the edge no longer keeps a
/// per-device mark that would drop them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_readings_delivered_after_newer_ones_are_all_taken() {
    let (mut f, prefix) = mqtt_fixture("mqtt-older", mqtt_addr());
    f.start_cloud().await;
    f.edges[0].start();
    f.edges[0].wait_log("mqtt subscribed").await;
    let mut p = Publisher::start();
    let base = 1_700_000_000_000;
    for i in 40..80 {
        p.reading(&prefix, "dev-0", base + i).await;
    }
    p.wait_acked().await;
    wait_edge_acked(&f, 40, NODE_READY).await;
    for i in 0..40 {
        p.reading(&prefix, "dev-0", base + i).await;
    }
    p.wait_acked().await;
    let expected = p.expected.clone();
    check_published(&mut f, &expected).await;
}

/// kill -9 of the edge right after a burst, three times: the broker
/// redelivers what was unacked, and the edge recognises what it already has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_edge_right_after_a_burst_loses_nothing() {
    let (mut f, prefix) = mqtt_fixture("mqtt-kill", mqtt_addr());
    f.start_cloud().await;
    f.edges[0].start();
    f.edges[0].wait_log("mqtt subscribed").await;
    let mut p = Publisher::start();
    let devs = devices(8);
    const ROUNDS: usize = 3;
    const PER_DEVICE: usize = 40;
    for round in 0..ROUNDS {
        let before = f.edges[0].acked_lines();
        for _ in 0..PER_DEVICE {
            let ts = now_ms();
            for d in &devs {
                p.reading(&prefix, d, ts).await;
            }
        }
        p.wait_acked().await;
        // Mid-stream: the edge is making readings durable.
        wait_edge_acked(&f, before + 1 + round * 20, NODE_READY).await;
        f.edges[0].process().kill9().expect("kill -9 of the edge");
        eprintln!(
            "round {round}: killed with {} of {} readings acknowledged",
            f.edges[0].acked_lines(),
            p.total()
        );
        f.edges[0].start();
        // The broker kept the session, so what was unacked is redelivered.
        let line = f.edges[0].wait_log("mqtt connected").await;
        assert!(line.contains("session_present=true"), "{line}");
    }
    let expected = p.expected.clone();
    check_published(&mut f, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_counted_and_other_devices_flow() {
    let (mut f, prefix) = mqtt_fixture("mqtt-garbage", mqtt_addr());
    f.start_cloud().await;
    f.edges[0].start();
    f.edges[0].wait_log("mqtt subscribed").await;
    let mut p = Publisher::start();
    let bad_payloads: [&[u8]; 4] = [
        b"not json",
        b"[1, 2]",
        br#"{"ts": "yesterday", "v": 1}"#,
        br#"{"v": null}"#,
    ];
    let long_id = "x".repeat(200);
    for i in 0..30 {
        for d in devices(3) {
            p.reading(&prefix, &d, now_ms()).await;
        }
        match i {
            // A garbage device next to the good ones.
            5..=8 => {
                p.raw(
                    &format!("{prefix}/garbage/telemetry"),
                    bad_payloads[i - 5].to_vec(),
                )
                .await
            }
            // A good device sending one garbage message among its readings.
            10 => p.raw(&format!("{prefix}/dev-0/telemetry"), "{oops").await,
            // Topics whose device id is empty or too long.
            12 => p.raw(&format!("{prefix}//telemetry"), r#"{"v": 1}"#).await,
            14 => {
                p.raw(&format!("{prefix}/{long_id}/telemetry"), r#"{"v": 1}"#)
                    .await
            }
            _ => {}
        }
    }
    p.wait_acked().await;
    f.edges[0]
        .wait_log("bad_payload_total=5 bad_topic_total=2")
        .await;
    let expected = p.expected.clone();
    check_published(&mut f, &expected).await;
    let log = std::fs::read_to_string(f.edges[0].process().log_path()).expect("edge log");
    let warnings = log
        .lines()
        .filter(|l| l.contains("mqtt: malformed"))
        .count();
    assert!(
        warnings < 7,
        "malformed messages are not rate-limited: {warnings} warnings for 7 messages"
    );
}

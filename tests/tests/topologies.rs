//! Topologies across real processes (`topology-node`, a `node` with a
//! topology defined in code) against a real Kafka: edge stages before the
//! outbox, cloud stages consuming the log and writing alerts exactly once.

use std::path::PathBuf;

use tributary_tests::broker::{shared_bootstrap, unique_topic};
use tributary_tests::checker::{consume_values, wait_group_caught_up, ConsumedValue};
use tributary_tests::fixture::{Fixture, DRAIN};

const READINGS: usize = 300;
const SPIKE_AT: usize = 100;

fn metric(window: &ConsumedValue, name: &str) -> Option<f64> {
    window.value["metrics"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == name)?["value"]["f64"]
        .as_f64()
}

/// One spike (reading 100 of a device's 300) must give exactly one alert per
/// detector, even though the cloud is killed -9 right after the first alert
/// is committed: its stages restart from the offsets committed with that
/// alert, so they neither repeat nor skip it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_injected_anomaly_yields_exactly_one_alert_per_detector_across_a_cloud_crash() {
    let bootstrap = shared_bootstrap();
    let alerts = unique_topic("alerts");
    let windows = unique_topic("windows");
    let spike_at = SPIKE_AT.to_string();
    let mut f = Fixture::new("anomaly", &bootstrap, &["edge-a"]).with_program(
        PathBuf::from(env!("CARGO_BIN_EXE_topology-node")),
        &[
            ("TRIBUTARY_TEST_TOPOLOGY", "anomaly"),
            ("TRIBUTARY_TEST_ALERTS_TOPIC", &alerts),
            ("TRIBUTARY_TEST_WINDOWS_TOPIC", &windows),
            ("TRIBUTARY_TEST_SPIKE_AT", &spike_at),
        ],
    );
    f.set_cloud("stages-watermark-lag-ms", "1000");
    f.edges[0].set("device-readings-max", &READINGS.to_string());
    f.start_cloud().await;
    f.edges[0].start();
    f.edges[0]
        .wait_log("running this node's part of the topology")
        .await;

    let first = consume_values(&bootstrap, &alerts, 1, DRAIN)
        .await
        .expect("the first alert");
    assert!(!first.is_empty());
    f.cloud().kill9().expect("killing the cloud");
    f.start_cloud().await;

    // Everything the device sent is in the log and was processed.
    f.edges[0].wait_acked(READINGS, DRAIN).await;
    let group = format!("{}-stages-anomaly", f.txn_prefix);
    wait_group_caught_up(&bootstrap, &group, &f.topic, DRAIN)
        .await
        .expect("the cloud stages processed every reading");

    let alerts = consume_values(&bootstrap, &alerts, 2, DRAIN)
        .await
        .expect("reading the alerts");
    let stages: Vec<&str> = alerts
        .iter()
        .map(|a| a.value["stage"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(
        alerts.len(),
        2,
        "one alert per detector, got {stages:?}: {alerts:#?}"
    );
    for stage in ["overheat", "spike"] {
        let a = alerts
            .iter()
            .find(|a| a.value["stage"] == stage)
            .unwrap_or_else(|| panic!("no alert from {stage}: {alerts:#?}"));
        // Device ids are each edge's own: the cloud names the device by both.
        assert_eq!(a.key, "edge-a/sim-0");
        assert!(a.value["value"].as_f64().unwrap() > 400.0, "{a:?}");
    }

    // The edge's 1 s windows reached their sink through the log; exactly one
    // of them holds the spike.
    let windows = consume_values(&bootstrap, &windows, 4, DRAIN)
        .await
        .expect("reading the windows");
    let spiky: Vec<_> = windows
        .iter()
        .filter(|w| metric(w, "temperature.max").is_some_and(|m| m > 400.0))
        .collect();
    assert_eq!(spiky.len(), 1, "{windows:#?}");
    for w in &windows {
        assert_eq!(w.value["stream"], "per-second", "{w:?}");
        let mean = metric(w, "temperature.mean").expect("a mean");
        assert!((19.0..=35.0).contains(&mean), "{w:?}");
    }
}

/// What a held threshold (above `value` for at least `held_us`) must raise
/// over one device's readings in event-time order: the (device, time) of
/// each alert. The same rule as the stage's, written out again here so that
/// the test does not trust the code it checks.
fn held_alerts(
    device: &str,
    readings: &[(i64, f64)],
    value: f64,
    held_us: i64,
) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    let (mut since, mut fired) = (None, false);
    for &(t, v) in readings {
        if v <= value {
            since = None;
            fired = false;
            continue;
        }
        let s = *since.get_or_insert(t);
        if !fired && t - s >= held_us {
            fired = true;
            out.push((device.to_owned(), t));
        }
    }
    out
}

/// Cloud stages on two cloud nodes share the readings topic's partitions
/// through their consumer group. The second joins right after the first
/// alert, in the middle of every device's hot stretch, and takes some
/// partitions from the live first (a rebalance); then the first is killed
/// -9 and the rest move too. Each time the partitions move with the state
/// committed with their offsets, so a stretch already alerted is not
/// alerted again, and every alert the readings call for is in the topic
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_stages_on_two_nodes_alert_exactly_once_across_a_join_and_a_kill_9() {
    const PER_DEVICE: usize = 600;
    const EDGES: [&str; 2] = ["edge-a", "edge-b"];
    let bootstrap = shared_bootstrap();
    let alerts_topic = unique_topic("alerts");
    let mut f = Fixture::new("held", &bootstrap, &EDGES).with_program(
        PathBuf::from(env!("CARGO_BIN_EXE_topology-node")),
        &[
            ("TRIBUTARY_TEST_TOPOLOGY", "held"),
            ("TRIBUTARY_TEST_ALERTS_TOPIC", &alerts_topic),
        ],
    );
    // The broker's smallest session timeout: the killed node's partitions
    // move after it.
    f.set_cloud("stages-session-timeout-ms", "6000");
    f.set_cloud("stages-watermark-lag-ms", "1000");
    f.add_clouds(1);
    for e in &mut f.edges {
        e.set("device-readings-max", &PER_DEVICE.to_string());
        e.set("cloud-return-after-ms", "0");
    }
    f.start_cloud().await;
    for e in &mut f.edges {
        e.start();
    }

    let first = consume_values(&bootstrap, &alerts_topic, 1, DRAIN)
        .await
        .expect("the first alert");
    assert!(!first.is_empty());
    f.start_more_cloud(0).await;
    f.more_clouds[0]
        .process
        .as_mut()
        .expect("cloud-2 running")
        .wait_for_log_line("restored=true", DRAIN)
        .await
        .unwrap_or_else(|e| panic!("cloud-2 took no partition from the live cloud-1: {e}"));
    f.cloud().kill9().expect("killing cloud-1");

    for e in &f.edges {
        e.wait_acked(6 * PER_DEVICE, DRAIN).await;
    }
    let group = format!("{}-stages-held", f.txn_prefix);
    if let Err(e) = wait_group_caught_up(&bootstrap, &group, &f.topic, DRAIN).await {
        panic!(
            "the surviving node's stages did not process every reading: {e}{}",
            f.log_tails()
        );
    }

    // The oracle: every reading in the log, per edge and device.
    let readings = consume_values(&bootstrap, &f.topic, EDGES.len() * 6 * PER_DEVICE, DRAIN)
        .await
        .expect("reading the readings topic");
    let mut per_device: std::collections::BTreeMap<String, Vec<(i64, f64)>> = Default::default();
    let partitions: std::collections::BTreeSet<i32> =
        readings.iter().map(|r| r.partition).collect();
    let keys: std::collections::BTreeSet<(&str, i32)> = readings
        .iter()
        .map(|r| (r.key.as_str(), r.partition))
        .collect();
    assert_eq!(
        partitions.len(),
        3,
        "the devices must cover every partition, whichever the killed node held: {keys:?}"
    );
    for r in &readings {
        let edge = r.edge.clone().expect("an edge header");
        let device = format!(
            "{edge}/{}",
            r.value["device_id"].as_str().expect("a device")
        );
        let t = r.value["device_ts_us"].as_i64().expect("a timestamp");
        let v = metric(r, "temperature").expect("a temperature");
        per_device.entry(device).or_default().push((t, v));
    }
    let mut expected: Vec<(String, i64)> = Vec::new();
    for (device, rs) in &mut per_device {
        rs.sort_by_key(|(t, _)| *t);
        expected.extend(held_alerts(device, rs, 100.0, 500_000));
    }
    expected.sort();
    assert!(
        expected.len() >= 2 * EDGES.len() * 6,
        "the wave ran {} hot stretches",
        expected.len()
    );

    let alerts = consume_values(&bootstrap, &alerts_topic, expected.len(), DRAIN)
        .await
        .expect("reading the alerts");
    let mut got: Vec<(String, i64)> = alerts
        .iter()
        .map(|a| {
            (
                a.value["device_id"].as_str().unwrap_or("?").to_owned(),
                a.value["device_ts_us"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    got.sort();
    let repeated: Vec<_> = got.iter().filter(|a| !expected.contains(a)).collect();
    let missing: Vec<_> = expected.iter().filter(|a| !got.contains(a)).collect();
    assert!(
        got == expected,
        "{} alerts, {} expected; not expected: {repeated:?}; missing: {missing:?}",
        got.len(),
        expected.len()
    );

    // The move happened, and with the state.
    let survivor = std::fs::read_to_string(
        f.more_clouds[0]
            .process
            .as_ref()
            .expect("cloud-2 running")
            .log_path(),
    )
    .expect("reading cloud-2's log");
    let restored = survivor
        .lines()
        .filter(|l| {
            l.contains("partition taken by this node's stages") && l.contains("restored=true")
        })
        .count();
    assert!(
        restored > 0,
        "cloud-2 took no partition with its state:{}",
        f.log_tails()
    );
    println!(
        "stages across two cloud nodes: {} alerts, each once; cloud-2 took {restored} partition(s) with state",
        got.len()
    );
}

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

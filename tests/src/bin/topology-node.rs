//! A `node` with a topology defined in code, for the tests that run
//! topologies across real processes. The topology is chosen by
//! `TRIBUTARY_TEST_TOPOLOGY`; its topics by `TRIBUTARY_TEST_*` variables, so
//! that each test writes to its own.
//!
//! `anomaly`: one simulated device per edge, whose reading number
//! `TRIBUTARY_TEST_SPIKE_AT` (default 100) is a spike of +500. The edge
//! windows the raw stream into 1 s means and maxima; the cloud runs a
//! threshold and a z-score detector on the raw stream. Alerts go to
//! `TRIBUTARY_TEST_ALERTS_TOPIC`, windows to `TRIBUTARY_TEST_WINDOWS_TOPIC`.
//!
//! `held`: six simulated devices per edge (`kiln-0` … `kiln-5`) at 25 Hz on a slow wave (20 ±
//! 100 °C, a period of 8 s, no noise), so each is above 100 °C for about
//! 1.6 s in each period; the cloud raises `hot` when one stays above 100 °C
//! for 0.5 s, into `TRIBUTARY_TEST_ALERTS_TOPIC`. For the tests of cloud
//! stages whose state must move with their partitions.
//!
//! `mqtt-window`: an MQTT source on `TRIBUTARY_TEST_MQTT_TOPIC` that only an
//! edge window reads (10 s tumbling: the count of `v`, the largest `n`); the
//! windows go to `TRIBUTARY_TEST_WINDOWS_TOPIC`, the raw readings nowhere.
//!
//! `two-plants`: edges labelled `plant-a` run source `a-presses`, edges
//! labelled `plant-b` run `b-presses` (simulated devices, steady at 20 °C);
//! the cloud raises `a-hot` when a plant-a press passes 100 °C, into
//! `TRIBUTARY_TEST_ALERTS_TOPIC`. For the tests of what one edge may send.

use std::time::Duration;

use anyhow::{bail, Context};
use tributary_actors::edge::device::Signal;
use tributary_actors::stages::{secs, Threshold, Window, ZScore};
use tributary_actors::topology::{EdgeSelector, Kafka, Mqtt, Simulated, Topology};

fn var(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set"))
}

fn anomaly() -> anyhow::Result<Topology> {
    let spike_at = match std::env::var("TRIBUTARY_TEST_SPIKE_AT") {
        Ok(v) => v.parse().context("TRIBUTARY_TEST_SPIKE_AT")?,
        Err(_) => 100,
    };
    let signal = Signal {
        base: 20.0,
        amplitude: 0.0,
        period_s: 60.0,
        noise: 0.5,
        spike_probability: 0.0,
        spike_magnitude: 500.0,
        spike_at_reading: spike_at,
    };
    let (alerts, windows) = (
        var("TRIBUTARY_TEST_ALERTS_TOPIC")?,
        var("TRIBUTARY_TEST_WINDOWS_TOPIC")?,
    );
    Ok(Topology::builder("anomaly")
        .edge(EdgeSelector::all(), |e| {
            e.source(
                "sim",
                Simulated::devices(1).rate_hz(50.0).signal(signal.clone()),
            )
            .stage(
                "per-second",
                "sim",
                Window::tumbling(secs(1))
                    .mean("temperature")
                    .max("temperature"),
            )
        })
        .cloud(|c| {
            c.stage("overheat", "sim", Threshold::above("temperature", 100.0))
                .stage("spike", "sim", ZScore::new("temperature", secs(30), 6.0))
                .sink("alerts", ["overheat", "spike"], Kafka::topic(alerts))
                .sink("windows", "per-second", Kafka::topic(windows))
        })
        .build()?)
}

fn held() -> anyhow::Result<Topology> {
    let wave = Signal {
        base: 20.0,
        amplitude: 100.0,
        period_s: 8.0,
        noise: 0.0,
        spike_probability: 0.0,
        spike_magnitude: 0.0,
        spike_at_reading: 0,
    };
    let alerts = var("TRIBUTARY_TEST_ALERTS_TOPIC")?;
    Ok(Topology::builder("held")
        .edge(EdgeSelector::all(), |e| {
            // Named so that the six devices' keys cover all three
            // partitions of the readings topic (murmur2: 2, 0, 1, 0, 0, 1),
            // whichever ones the killed node held.
            e.source(
                "kiln",
                Simulated::devices(6)
                    .rate_hz(25.0)
                    .id_prefix("kiln-")
                    .signal(wave),
            )
        })
        .cloud(|c| {
            c.stage(
                "hot",
                "kiln",
                Threshold::above("temperature", 100.0).for_at_least(Duration::from_millis(500)),
            )
            .sink("alerts", "hot", Kafka::topic(alerts))
        })
        .build()?)
}

fn mqtt_window() -> anyhow::Result<Topology> {
    let (topic, windows) = (
        var("TRIBUTARY_TEST_MQTT_TOPIC")?,
        var("TRIBUTARY_TEST_WINDOWS_TOPIC")?,
    );
    Ok(Topology::builder("mqtt-window")
        .edge(EdgeSelector::all(), |e| {
            e.source("sensors", Mqtt::subscribe(topic)).stage(
                "per-10s",
                "sensors",
                Window::tumbling(secs(10)).count("v"),
            )
        })
        .cloud(|c| c.sink("windows", "per-10s", Kafka::topic(windows)))
        .build()?)
}

fn two_plants() -> anyhow::Result<Topology> {
    let alerts = var("TRIBUTARY_TEST_ALERTS_TOPIC")?;
    let steady = Signal {
        base: 20.0,
        amplitude: 0.0,
        period_s: 60.0,
        noise: 0.5,
        spike_probability: 0.0,
        spike_magnitude: 0.0,
        spike_at_reading: 0,
    };
    Ok(Topology::builder("two-plants")
        .edge(EdgeSelector::label("plant-a"), |e| {
            e.source(
                "a-presses",
                Simulated::devices(1).rate_hz(50.0).signal(steady.clone()),
            )
        })
        .edge(EdgeSelector::label("plant-b"), |e| {
            e.source(
                "b-presses",
                Simulated::devices(1).rate_hz(50.0).signal(steady.clone()),
            )
        })
        .cloud(|c| {
            c.stage("a-hot", "a-presses", Threshold::above("temperature", 100.0))
                .sink("alerts", "a-hot", Kafka::topic(alerts))
        })
        .build()?)
}

fn main() -> anyhow::Result<()> {
    let topology = match var("TRIBUTARY_TEST_TOPOLOGY")?.as_str() {
        "anomaly" => anomaly()?,
        "held" => held()?,
        "mqtt-window" => mqtt_window()?,
        "two-plants" => two_plants()?,
        other => bail!("no test topology named {other:?}"),
    };
    tributary_node::run_cli(Some(topology))
}

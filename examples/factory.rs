//! The whole factory: simulated presses and MQTT line sensors on the edges,
//! per-second windows before the outbox, detectors on the cloud, alerts in
//! Kafka, exactly once. One topology value; each node runs its own part.
//!
//! `scripts/demo.sh` runs it (Kafka, Mosquitto, a cloud node, two edges and
//! an MQTT publisher). By hand, with Kafka and an MQTT broker running and
//! certificates issued with `node certs` (see the README; an edge's labels
//! are part of its certificate):
//!
//! ```text
//! cargo build -p tributary-node -p tributary-examples --example factory
//! N=target/debug/node F=target/debug/examples/factory
//! $N certs init --dir pki && $N certs issue --dir pki --id cloud-1 --role cloud
//! for e in edge-1 edge-2; do
//!   $N certs issue --dir pki --id $e --role edge --labels plant-a --out pki/$e
//! done
//! $F --role cloud --node-id cloud-1 --tls-dir pki --kafka-bootstrap 127.0.0.1:9092
//! $F --role edge --node-id edge-1 --tls-dir pki/edge-1 --mqtt-addr 127.0.0.1:1883
//! $F --role edge --node-id edge-2 --tls-dir pki/edge-2
//! ```
//!
//! Every flag of `node` works here too (`--help`): the topology says *what*
//! runs, the settings say *where* (brokers, directories, limits).
//!
//! - Every edge labelled `plant-a` runs 10 presses and averages each press
//!   per second (mean, max, p95) before the outbox: only the windows travel.
//! - The edge `edge-1` also subscribes to `factory/<sensor>/telemetry`
//!   (`{"ts": <ms>, "vibration": 0.4}`); the raw readings travel.
//! - The cloud raises `overheat` when a press's per-second maximum passes
//!   95 °C, and `vibration` when a sensor's vibration is 4 standard
//!   deviations off its last minute; both go to `tributary.alerts`. The
//!   windows go to `tributary.presses.1s`.

use tributary_actors::edge::device::Signal;
use tributary_actors::stages::{secs, Threshold, Window, ZScore};
use tributary_actors::topology::{EdgeSelector, Kafka, Mqtt, Simulated, Topology, TopologyError};

pub const ALERTS_TOPIC: &str = "tributary.alerts";
pub const WINDOWS_TOPIC: &str = "tributary.presses.1s";

fn factory() -> Result<Topology, TopologyError> {
    let presses = Simulated::devices(10)
        .rate_hz(10.0)
        .id_prefix("press-")
        .signal(Signal {
            base: 70.0,
            amplitude: 10.0,
            period_s: 60.0,
            noise: 1.0,
            spike_probability: 0.002,
            spike_magnitude: 30.0,
            spike_at_reading: 0,
        });
    Topology::builder("factory")
        .edge("plant-a", |edge| {
            edge.source("presses", presses).stage(
                "presses-1s",
                "presses",
                Window::tumbling(secs(1))
                    .mean("temperature")
                    .max("temperature")
                    .p95("temperature"),
            )
        })
        .edge(EdgeSelector::id("edge-1"), |edge| {
            edge.source("line-sensors", Mqtt::subscribe("factory/+/telemetry"))
        })
        .cloud(|cloud| {
            cloud
                .stage(
                    "overheat",
                    "presses-1s",
                    Threshold::above("temperature.max", 95.0),
                )
                .stage(
                    "vibration",
                    "line-sensors",
                    ZScore::new("vibration", secs(60), 4.0),
                )
                .sink(
                    "alerts",
                    ["overheat", "vibration"],
                    Kafka::topic(ALERTS_TOPIC),
                )
                .sink("press-windows", "presses-1s", Kafka::topic(WINDOWS_TOPIC))
        })
        .build()
}

fn main() -> anyhow::Result<()> {
    tributary_node::run_cli(Some(factory()?))
}

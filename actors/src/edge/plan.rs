//! What an edge runs of a topology: its groups of simulated devices, its
//! MQTT source and its stages, checked once. The node, the simulator and
//! the benches build an edge's components from this one reading of the
//! topology, each adding what is its own (the node its settings, the
//! simulator its simulated broker).

use crate::edge::gateway::EdgeStages;
use crate::edge::DevicesConfig;
use crate::pipeline::StageRestarts;
use crate::topology::{ComponentKind, Role, Source, Topology};

/// The MQTT source a topology places on an edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttPart {
    /// The source's name: the stream its readings carry.
    pub source: String,
    pub topic_filter: String,
    /// The topic level that names the device.
    pub device_level: usize,
    pub qos: u8,
    /// Whether its readings leave the edge as they are (else only edge
    /// stages read them).
    pub uplinked: bool,
}

/// One edge's part of a topology, ready to run.
#[derive(Debug, Clone)]
pub struct EdgePart {
    pub devices: Vec<DevicesConfig>,
    pub mqtt: Option<MqttPart>,
    pub stages: EdgeStages,
}

/// Why a topology's part for an edge cannot run there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("two simulated sources on {edge} use the device id prefix {prefix:?}: give {component:?} its own with .id_prefix(..)")]
    DevicePrefixTwice {
        edge: String,
        prefix: String,
        component: String,
    },
    #[error("an edge runs one MQTT source, but {edge} is given a second, {component:?}: subscribe to a wider topic filter instead")]
    SecondMqttSource { edge: String, component: String },
    #[error("the MQTT source {component:?} names no device level in its topic filter")]
    NoDeviceLevel { component: String },
}

/// The part of `topology` that edge `edge` (with `labels`) runs.
pub fn edge_part(
    topology: &Topology,
    edge: &str,
    labels: &[&str],
    restarts: StageRestarts,
    checkpoint_interval_ms: u64,
) -> Result<EdgePart, PlanError> {
    let part = topology.part_for(edge, labels, Role::Edge);
    let mut devices = Vec::new();
    let mut mqtt: Option<MqttPart> = None;
    let mut prefixes = std::collections::HashSet::new();
    for c in &part.sources {
        match &c.kind {
            ComponentKind::Source(Source::Simulated(sim)) => {
                // Device ids are an edge's own: two groups with one prefix
                // would name two devices alike.
                if !prefixes.insert(sim.id_prefix.clone()) {
                    return Err(PlanError::DevicePrefixTwice {
                        edge: edge.to_owned(),
                        prefix: sim.id_prefix.clone(),
                        component: c.name.clone(),
                    });
                }
                devices.push(sim.devices_config(&c.name));
            }
            ComponentKind::Source(Source::Mqtt(m)) => {
                if mqtt.is_some() {
                    return Err(PlanError::SecondMqttSource {
                        edge: edge.to_owned(),
                        component: c.name.clone(),
                    });
                }
                let device_level = m.device_level().ok_or_else(|| PlanError::NoDeviceLevel {
                    component: c.name.clone(),
                })?;
                mqtt = Some(MqttPart {
                    source: c.name.clone(),
                    topic_filter: m.topic_filter.clone(),
                    device_level,
                    qos: m.qos,
                    uplinked: part.uplink.iter().any(|u| *u == c.name),
                });
            }
            _ => {}
        }
    }
    let stages = EdgeStages {
        stages: part.stages.iter().map(|c| (*c).clone()).collect(),
        uplink: part.uplink.iter().map(|n| n.to_string()).collect(),
        restarts,
        checkpoint_interval_ms,
    };
    Ok(EdgePart {
        devices,
        mqtt,
        stages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::{secs, Window};
    use crate::topology::{EdgeSelector, Kafka, Mqtt, Simulated};

    #[test]
    fn an_edge_gets_its_sources_and_stages_and_a_clash_is_named() {
        let t = Topology::builder("t")
            .edge(EdgeSelector::all(), |e| {
                e.source("sim", Simulated::devices(2))
                    .source("sensors", Mqtt::subscribe("plant/+/telemetry"))
                    .stage("per-10s", "sensors", Window::tumbling(secs(10)).count("v"))
            })
            .cloud(|c| {
                c.sink("raw", "sim", Kafka::topic("raw")).sink(
                    "windows",
                    "per-10s",
                    Kafka::topic("w"),
                )
            })
            .build()
            .unwrap();
        let part = edge_part(&t, "edge-1", &[], StageRestarts::default(), 5_000).unwrap();
        assert_eq!(part.devices.len(), 1);
        assert_eq!(part.devices[0].count, 2);
        let m = part.mqtt.expect("the MQTT source");
        assert_eq!(
            (m.source.as_str(), m.device_level, m.uplinked),
            ("sensors", 1, false)
        );
        assert_eq!(part.stages.stages.len(), 1);

        let twice = Topology::builder("t")
            .edge(EdgeSelector::all(), |e| {
                e.source("a", Simulated::devices(1))
                    .source("b", Simulated::devices(1))
            })
            .cloud(|c| c.sink("all", ["a", "b"], Kafka::topic("x")))
            .build()
            .unwrap();
        let err = edge_part(&twice, "edge-1", &[], StageRestarts::default(), 5_000).unwrap_err();
        assert!(matches!(err, PlanError::DevicePrefixTwice { .. }), "{err}");
        assert!(err.to_string().contains(".id_prefix"), "{err}");
    }
}

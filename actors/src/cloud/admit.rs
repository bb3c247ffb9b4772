//! What the cloud admits from an edge, decided from the edge's certificate
//! and the topology, never from what the edge says about itself.
//!
//! An edge is trusted with its own readings only. Every reading the cloud
//! receives is checked again here, as if the edge's own checks had not run:
//! a broken or stolen edge can send anything its certificate lets it open a
//! link with.
//!
//! - **Bounds.** [`Reading::validate`], the limits every reading had to pass
//!   at the edge.
//! - **Streams.** With a topology, a reading must belong to a stream that the
//!   topology places on *that* edge (by its certified id and labels) and that
//!   leaves the edge ([`crate::topology::Part::uplink`]). So an edge of
//!   plant-b cannot feed plant-a's detectors. Without a topology, the cloud
//!   has no streams to protect and admits any valid reading.
//!
//! A refused reading is not dropped: it goes to the refused topic in the same
//! transaction as the rest of its segment, so the edge's outbox drains and an
//! operator can see what was refused and why.

use std::collections::HashSet;
use std::sync::Arc;

use crate::reading::Reading;
use crate::topology::{Role, Topology};

/// The cloud's admission policy, shared by every ingest.
#[derive(Clone, Default)]
pub struct Admission {
    topology: Option<Arc<Topology>>,
}

impl Admission {
    /// Any valid reading, of any stream.
    pub fn any() -> Self {
        Self::default()
    }

    /// Only the streams `topology` places on the sending edge.
    pub fn by_topology(topology: Arc<Topology>) -> Self {
        Self {
            topology: Some(topology),
        }
    }

    /// The policy for one edge, from its certified id and labels.
    pub fn for_edge(&self, edge: &str, labels: &[String]) -> EdgeAdmission {
        let streams = self.topology.as_ref().map(|t| {
            let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
            t.part_for(edge, &labels, Role::Edge)
                .uplink
                .into_iter()
                .map(str::to_owned)
                .collect::<HashSet<String>>()
        });
        EdgeAdmission {
            streams,
            edge: edge.to_owned(),
            labels: labels.join(","),
            topology: self
                .topology
                .as_ref()
                .map(|t| t.name().to_owned())
                .unwrap_or_default(),
        }
    }
}

/// What one edge may send.
#[derive(Debug, Clone)]
pub struct EdgeAdmission {
    /// `None`: any stream.
    streams: Option<HashSet<String>>,
    edge: String,
    labels: String,
    topology: String,
}

impl EdgeAdmission {
    /// Why `reading` is refused, if it is.
    pub fn check(&self, reading: &Reading) -> Result<(), String> {
        reading.validate().map_err(|e| format!("invalid: {e}"))?;
        let Some(allowed) = &self.streams else {
            return Ok(());
        };
        match &reading.stream {
            Some(s) if allowed.contains(s) => Ok(()),
            Some(s) => Err(format!(
                "stream {s:?} is not one that topology {:?} places on {} (labels: {:?})",
                self.topology, self.edge, self.labels
            )),
            None => Err(format!(
                "no stream: every reading of topology {:?} belongs to one",
                self.topology
            )),
        }
    }

    /// The streams admitted, sorted; `None` for any.
    pub fn streams(&self) -> Option<Vec<&str>> {
        self.streams.as_ref().map(|s| {
            let mut v: Vec<&str> = s.iter().map(String::as_str).collect();
            v.sort_unstable();
            v
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::{Metric, Value};
    use crate::stages::{secs, Threshold, Window};
    use crate::topology::{Simulated, Topology};

    fn reading(stream: Option<&str>) -> Reading {
        Reading {
            device_id: "press-0".into(),
            device_ts_us: 1,
            edge_ts_us: 1,
            stream: stream.map(str::to_owned),
            metrics: vec![Metric {
                name: "temperature".into(),
                value: Value::F64(20.0),
                unit: None,
            }],
        }
    }

    fn two_plants() -> Arc<Topology> {
        Arc::new(
            Topology::builder("two-plants")
                .edge("plant-a", |e| {
                    e.source("a-presses", Simulated::devices(1)).stage(
                        "a-1s",
                        "a-presses",
                        Window::tumbling(secs(1)).mean("temperature"),
                    )
                })
                .edge("plant-b", |e| e.source("b-presses", Simulated::devices(1)))
                .cloud(|c| {
                    c.stage("a-hot", "a-1s", Threshold::above("temperature.mean", 90.0))
                        .stage("b-hot", "b-presses", Threshold::above("temperature", 90.0))
                })
                .build()
                .unwrap(),
        )
    }

    #[test]
    fn an_edge_sends_only_the_streams_its_certified_labels_place_on_it() {
        let policy = Admission::by_topology(two_plants());
        let a = policy.for_edge("edge-1", &["plant-a".into()]);
        assert_eq!(
            a.streams(),
            Some(vec!["a-1s"]),
            "a-presses stays on the edge"
        );
        assert!(a.check(&reading(Some("a-1s"))).is_ok());
        let err = a.check(&reading(Some("b-presses"))).unwrap_err();
        assert!(err.contains("b-presses") && err.contains("edge-1"), "{err}");
        // A stream the edge computes but does not send up is refused too.
        assert!(a.check(&reading(Some("a-presses"))).is_err());
        assert!(a.check(&reading(None)).unwrap_err().contains("no stream"));

        let b = policy.for_edge("edge-9", &["plant-b".into()]);
        assert!(b.check(&reading(Some("b-presses"))).is_ok());
        assert!(b.check(&reading(Some("a-1s"))).is_err());
        // No labels in the certificate: no edge block, no stream.
        let none = policy.for_edge("edge-7", &[]);
        assert_eq!(none.streams(), Some(vec![]));
        assert!(none.check(&reading(Some("a-1s"))).is_err());
    }

    #[test]
    fn without_a_topology_any_valid_reading_is_admitted() {
        let any = Admission::any().for_edge("edge-1", &[]);
        assert_eq!(any.streams(), None);
        assert!(any.check(&reading(None)).is_ok());
        assert!(any.check(&reading(Some("whatever"))).is_ok());
        let mut bad = reading(None);
        bad.metrics[0].value = Value::F64(f64::NAN);
        assert!(any.check(&bad).unwrap_err().starts_with("invalid"));
        let mut bad = reading(None);
        bad.device_id.clear();
        assert!(any.check(&bad).is_err());
    }
}

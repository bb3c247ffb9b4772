//! Prometheus `/metrics` of a node, from its latest [`NodeReport`]: one
//! source for the dashboard and the scrape, collected once a second.
//!
//! Names follow Prometheus' conventions: `tributary_` prefix, base units
//! (bytes, seconds), `_total` on counters (added by the encoder).

use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tributary_actors::cloud::LatencyHistogram;

use super::report::NodeReport;

/// The latest report of this node, shared by its collector and the scrape.
#[derive(Debug, Clone, Default)]
pub struct LatestReport(Arc<Mutex<Option<NodeReport>>>);

impl LatestReport {
    pub fn set(&self, report: NodeReport) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(report);
    }

    pub fn get(&self) -> Option<NodeReport> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[derive(Debug)]
struct ReportCollector(LatestReport);

type Labels = Vec<(&'static str, String)>;

fn counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    if values.is_empty() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in values {
        ConstCounter::new(*v).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauges(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(Labels, f64)],
) -> Result<(), std::fmt::Error> {
    if values.is_empty() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in values {
        ConstGauge::new(*v).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for ReportCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(r) = self.0.get() else {
            return Ok(());
        };
        let node = || ("node", r.node_id.clone());
        let per_component = |f: fn(&super::report::ComponentFigures) -> u64| -> Vec<(Labels, u64)> {
            r.components
                .iter()
                .map(|c| (vec![node(), ("component", c.component.clone())], f(c)))
                .collect()
        };
        counters(
            &mut encoder,
            "tributary_component_received",
            "Items a component took in.",
            &per_component(|c| c.received),
        )?;
        counters(
            &mut encoder,
            "tributary_component_sent",
            "Items a component passed on.",
            &per_component(|c| c.sent),
        )?;
        counters(
            &mut encoder,
            "tributary_component_errors",
            "Errors a component met.",
            &per_component(|c| c.errors),
        )?;
        counters(
            &mut encoder,
            "tributary_component_dropped",
            "Items a component dropped by policy.",
            &per_component(|c| c.dropped),
        )?;
        // One series per actor, but devices summed: thousands of series per
        // edge would swamp a Prometheus.
        let devices: u64 = r
            .actors
            .iter()
            .filter(|a| a.kind == "device")
            .map(|a| u64::from(a.restarts))
            .sum();
        if r.actors.iter().any(|a| a.kind == "device") {
            counters(
                &mut encoder,
                "tributary_device_actor_restarts",
                "Restarts of the simulated device actors, summed.",
                &[(vec![node()], devices)],
            )?;
        }
        let restarts: Vec<(Labels, u64)> = r
            .actors
            .iter()
            .filter(|a| a.restartable && a.kind != "device")
            .map(|a| {
                (
                    vec![node(), ("actor", a.name.clone())],
                    u64::from(a.restarts),
                )
            })
            .collect();
        counters(
            &mut encoder,
            "tributary_actor_restarts",
            "Restarts of a supervised actor by its supervisor.",
            &restarts,
        )?;
        if let Some(o) = &r.outbox {
            gauges(
                &mut encoder,
                "tributary_outbox_bytes",
                "Bytes the outbox holds, sealed and open.",
                &[(vec![node()], o.bytes as f64)],
            )?;
            gauges(
                &mut encoder,
                "tributary_outbox_readings",
                "Readings in the outbox the cloud has not confirmed.",
                &[(vec![node()], o.readings as f64)],
            )?;
            let age = o
                .oldest_unconfirmed_ms
                .map_or(0.0, |t| r.at_ms.saturating_sub(t) as f64 / 1000.0);
            gauges(
                &mut encoder,
                "tributary_outbox_oldest_unconfirmed_age_seconds",
                "Age of the oldest reading the cloud has not confirmed.",
                &[(vec![node()], age)],
            )?;
        }
        if let Some(paused) = r.uplink_paused {
            gauges(
                &mut encoder,
                "tributary_uplink_paused",
                "1 while an operator paused the uplink.",
                &[(vec![node()], f64::from(u8::from(paused)))],
            )?;
        }
        if let Some(up) = r.uplink_up {
            gauges(
                &mut encoder,
                "tributary_uplink_up",
                "1 while the uplink to the cloud is connected.",
                &[(vec![node()], f64::from(u8::from(up)))],
            )?;
        }
        let rtts: Vec<(Labels, f64)> = r
            .links
            .iter()
            .filter_map(|l| {
                l.rtt_ms
                    .map(|ms| (vec![node(), ("peer", l.peer.clone())], ms / 1000.0))
            })
            .collect();
        gauges(
            &mut encoder,
            "tributary_link_rtt_seconds",
            "Smoothed round-trip time of the link to a peer.",
            &rtts,
        )?;
        let ups: Vec<(Labels, f64)> = r
            .links
            .iter()
            .map(|l| {
                (
                    vec![node(), ("peer", l.peer.clone())],
                    f64::from(u8::from(l.up)),
                )
            })
            .collect();
        gauges(
            &mut encoder,
            "tributary_link_up",
            "1 while the cluster session with a peer is up.",
            &ups,
        )?;
        if let (Some(buckets), Some(sum_ms)) = (&r.latency_buckets, r.latency_sum_ms) {
            // The encoder accumulates the buckets itself, and writes `+Inf`
            // for `f64::MAX` only.
            let count: u64 = buckets.iter().sum();
            let bounds: Vec<(f64, u64)> = buckets
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let le = if i + 1 == buckets.len() {
                        f64::MAX
                    } else {
                        LatencyHistogram::bucket_le_ms(i) as f64 / 1000.0
                    };
                    (le, *c)
                })
                .collect();
            let mut family = encoder.encode_descriptor(
                "tributary_end_to_end_latency_seconds",
                "From a reading's device timestamp to its commit in the log.",
                None,
                MetricType::Histogram,
            )?;
            family
                .encode_family(&vec![node()])?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    sum_ms as f64 / 1000.0,
                    count,
                    &bounds,
                    None,
                )?;
        }
        Ok(())
    }
}

/// The text exposition of `latest`.
pub fn render(latest: &LatestReport) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ReportCollector(latest.clone())));
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &registry) {
        Ok(()) => out,
        Err(e) => format!("# encoding the metrics failed: {e}\n"),
    }
}

//! A custom stage: your own operator in a topology, next to the built-in ones.
//!
//! Run it with `cargo run -p tributary-examples --example custom_stage`.
//!
//! `RateOfChange` alerts when a device's temperature climbs faster than a
//! limit, in °C per second of event time. The example
//! 1. puts it on the cloud, behind a built-in window that averages each
//!    device's temperature per second on the edge;
//! 2. prints what an edge node and the cloud node would each run;
//! 3. drives both operators by hand with synthetic readings, as the nodes
//!    would, and prints what comes out;
//! 4. shows the error a topology with a typo gets, before anything runs.

use std::collections::HashMap;

use anyhow::Context;
use tributary_actors::reading::{Metric, Reading, Value};
use tributary_actors::stages::{
    secs, Alert, AlertKind, Custom, CustomStage, Operator, Output, Window,
};
use tributary_actors::topology::{
    Component, ComponentKind, Kafka, Part, Role, Simulated, Topology,
};

/// The topology's name for the custom stage; its alerts carry it too.
const CLIMB: &str = "fast-climb";
/// The synthetic readings start here: 2025-11-24 16:00:00 UTC, in µs.
const T0_US: i64 = 1_764_000_000_000_000;
const US_PER_S: i64 = 1_000_000;

// --- The custom stage ------------------------------------------------------

/// Devices a `RateOfChange` remembers; a new one past that makes it forget
/// the device it heard from least recently.
const DEVICES_MAX: usize = 10_000;

/// Alerts once when a device's metric rises faster than `rate_max_per_s`
/// between two readings, and again only after it has calmed down.
struct RateOfChange {
    stage: String,
    metric: String,
    rate_max_per_s: f64,
    devices: HashMap<String, Last>,
}

struct Last {
    ts_us: i64,
    value: f64,
    /// Already alerted for the climb in progress.
    alerted: bool,
}

impl RateOfChange {
    /// `stage` is the name the topology gives it: the trait is not told it.
    fn new(stage: &str, metric: &str, rate_max_per_s: f64) -> Self {
        Self {
            stage: stage.into(),
            metric: metric.into(),
            rate_max_per_s,
            devices: HashMap::new(),
        }
    }

    fn forget_least_recent(&mut self) {
        // A scan, but only when a new device arrives at the limit.
        let oldest = self
            .devices
            .iter()
            .min_by_key(|(_, last)| last.ts_us)
            .map(|(id, _)| id.clone());
        if let Some(id) = oldest {
            self.devices.remove(&id);
        }
    }
}

impl CustomStage for RateOfChange {
    fn name(&self) -> &str {
        "rate-of-change"
    }

    fn handle(&mut self, reading: Reading) -> Vec<Output> {
        let value = match reading.metric(&self.metric) {
            Some(Value::F64(v)) if v.is_finite() => *v,
            Some(Value::I64(v)) => *v as f64,
            // Not ours to judge: another stage may want it.
            _ => return Vec::new(),
        };
        let ts_us = reading.device_ts_us;
        let Some(last) = self.devices.get_mut(&reading.device_id) else {
            if self.devices.len() >= DEVICES_MAX {
                self.forget_least_recent();
            }
            let last = Last {
                ts_us,
                value,
                alerted: false,
            };
            self.devices.insert(reading.device_id, last);
            return Vec::new();
        };
        // Event time: a reading older than the latest says nothing about now.
        if ts_us <= last.ts_us {
            return Vec::new();
        }
        let rate_per_s = (value - last.value) / ((ts_us - last.ts_us) as f64 / US_PER_S as f64);
        let fast = rate_per_s > self.rate_max_per_s;
        let alert = fast && !last.alerted;
        *last = Last {
            ts_us,
            value,
            alerted: fast,
        };
        if !alert {
            return Vec::new();
        }
        vec![Output::Alert(Alert {
            device_id: reading.device_id,
            stage: self.stage.clone(),
            kind: AlertKind::Custom(self.name().into()),
            metric: self.metric.clone(),
            value,
            device_ts_us: ts_us,
            message: format!(
                "{} rose {rate_per_s:.1} °C/s, faster than {} °C/s",
                self.metric, self.rate_max_per_s
            ),
        })]
    }
}

// --- main ------------------------------------------------------------------

fn main() -> anyhow::Result<()> {
    println!("== 1. A topology with a custom stage ==");
    let topology = Topology::builder("furnaces")
        .edge("plant-a", |edge| {
            edge.source("sensors", Simulated::devices(2).rate_hz(4.0))
                .stage(
                    "per-second",
                    "sensors",
                    Window::tumbling(secs(1)).mean("temperature"),
                )
        })
        .cloud(|cloud| {
            cloud
                // A factory, not an instance: each node and each restart gets a fresh one.
                .stage(
                    CLIMB,
                    "per-second",
                    Custom::new(|| RateOfChange::new(CLIMB, "temperature.mean", 2.0)),
                )
                .sink("alerts", CLIMB, Kafka::topic("alerts"))
        })
        .build()?;
    for c in topology.components() {
        println!(
            "  {:<11} on {:<14} reads {:?}",
            c.name,
            c.placement.to_string(),
            c.inputs
        );
    }

    println!();
    println!("== 2. What each node runs (part_for) ==");
    let edge = topology.part_for("edge-1", &["plant-a"], Role::Edge);
    let cloud = topology.part_for("cloud-1", &[], Role::Cloud);
    show("edge-1 (labelled plant-a)", &edge);
    show("cloud-1", &cloud);

    println!();
    println!("== 3. Driving the operators with readings, in event time ==");
    println!("furnace-1 holds 600 °C for 3 s, then climbs 5 °C/s; furnace-2 holds 450 °C.");
    let mut per_second = operator(&edge, "per-second")?;
    let mut climb = operator(&cloud, CLIMB)?;
    // Four readings a second for 6 s, each device's in time order.
    for i in 0..24 {
        let t_us = T0_US + i * US_PER_S / 4;
        let elapsed_s = (t_us - T0_US) as f64 / US_PER_S as f64;
        let climbing = 5.0 * (elapsed_s - 3.0).max(0.0);
        for (device, temperature) in [("furnace-1", 600.0 + climbing), ("furnace-2", 450.0)] {
            let windows = per_second.handle(reading(device, t_us, temperature));
            pass_on(windows, climb.as_mut());
        }
    }
    // The devices fall silent: a node moves time on to close the last windows.
    println!("  (watermark moved to t=7 s: the last windows close)");
    pass_on(
        per_second.advance_watermark(T0_US + 7 * US_PER_S),
        climb.as_mut(),
    );
    let (window_stats, climb_stats) = (per_second.stats(), climb.stats());
    println!(
        "  stats: per-second took {} readings and emitted {}; {CLIMB} took {} and raised {} alert(s)",
        window_stats.readings_in,
        window_stats.readings_out,
        climb_stats.readings_in,
        climb_stats.alerts_out
    );

    println!();
    println!("== 4. A mistake, caught by build() ==");
    let typo = Topology::builder("furnaces")
        .edge("plant-a", |edge| {
            edge.source("sensors", Simulated::devices(2)).stage(
                "per-second",
                "sensors",
                Window::tumbling(secs(1)).mean("temperature"),
            )
        })
        .cloud(|cloud| {
            cloud.stage(
                CLIMB,
                "per-secnd",
                Custom::new(|| RateOfChange::new(CLIMB, "temperature.mean", 2.0)),
            )
        })
        .build();
    match typo {
        Ok(_) => anyhow::bail!("a topology reading an unknown stream was accepted"),
        Err(e) => println!("  Error: {e}"),
    }
    Ok(())
}

fn show(node: &str, part: &Part) {
    println!("  {node}:");
    println!(
        "    sources {:?}, stages {:?}, sinks {:?}",
        names(&part.sources),
        names(&part.stages),
        names(&part.sinks)
    );
    if !part.uplink.is_empty() {
        println!(
            "    sends {:?} to the cloud through its outbox",
            part.uplink
        );
    }
    if !part.from_log.is_empty() {
        println!("    reads {:?} from the log", part.from_log);
    }
}

fn names<'a>(components: &[&'a Component]) -> Vec<&'a str> {
    components.iter().map(|c| c.name.as_str()).collect()
}

/// A fresh operator for the stage `name` of a node's part.
fn operator(part: &Part, name: &str) -> anyhow::Result<Box<dyn Operator>> {
    let component = part
        .stages
        .iter()
        .find(|c| c.name == name)
        .with_context(|| format!("{name} is not in this part"))?;
    let ComponentKind::Stage(spec) = &component.kind else {
        anyhow::bail!("{name} is not a stage");
    };
    Ok(spec.build(name)?)
}

/// Prints the window's outputs and feeds them to the custom stage, as the
/// cloud would once they reach it through the log.
fn pass_on(windows: Vec<Output>, climb: &mut dyn Operator) {
    for out in windows {
        let Output::Reading(r) = out else { continue };
        if let Some(Value::F64(mean)) = r.metric("temperature.mean") {
            let start_s = secs_from_t0(r.device_ts_us);
            println!(
                "  edge  per-second  {} window {start_s}-{} s: mean {mean:.1} °C",
                r.device_id,
                start_s + 1
            );
        }
        for alert in climb.handle(r).iter().filter_map(Output::as_alert) {
            println!(
                "  cloud {CLIMB}  ALERT {} t={} s: {}",
                alert.device_id,
                secs_from_t0(alert.device_ts_us),
                alert.message
            );
        }
    }
}

fn reading(device: &str, t_us: i64, temperature: f64) -> Reading {
    Reading {
        device_id: device.into(),
        device_ts_us: t_us,
        edge_ts_us: t_us,
        stream: None,
        metrics: vec![Metric {
            name: "temperature".into(),
            value: Value::F64(temperature),
            unit: Some("°C".into()),
        }],
    }
}

fn secs_from_t0(t_us: i64) -> i64 {
    (t_us - T0_US) / US_PER_S
}

//! Simulating your own topology: "what happens to my plant if it loses its
//! uplink for 10 minutes, twice an hour, while the outbox disk is nearly
//! full?", answered before it happens, reproducibly, from a seed.
//!
//! Run it with
//! `cargo run -p tributary-examples --release --example simulate_plant -- [--seed N]`.
//!
//! The edge and cloud actors are the real ones; the network (QUIC over
//! simulated UDP), the disk, the log and the clock are simulated, so an hour
//! of plant time takes seconds. The example prints what the run measured,
//! whether every invariant held, and writes `plant-report.html`: the
//! backlog, the throughput and the link over the hour.

use std::sync::Arc;

use anyhow::Context;
use tributary_actors::outbox::FullPolicy;
use tributary_actors::stages::{secs, Window};
use tributary_actors::topology::{EdgeSelector, Kafka, Simulated, Topology};
use tributary_simulations::report::render_html;
use tributary_simulations::world::EdgeSpec;
use tributary_simulations::{run, RunSpec, Scenario};

fn plant() -> anyhow::Result<Topology> {
    Ok(Topology::builder("plant")
        .edge(EdgeSelector::label("plant-a"), |edge| {
            edge.source(
                "presses",
                Simulated::devices(10).rate_hz(10.0).id_prefix("press-"),
            )
            .stage(
                "presses-1m",
                "presses",
                Window::tumbling(secs(60)).mean("temperature"),
            )
        })
        .cloud(|cloud| {
            cloud.sink("raw", "presses", Kafka::topic("presses")).sink(
                "minutes",
                "presses-1m",
                Kafka::topic("presses.1m"),
            )
        })
        .build()?)
}

fn main() -> anyhow::Result<()> {
    // `-- 7` or `-- --seed 7` (the form the replay line prints).
    let seed = match std::env::args().filter(|a| a != "--seed").nth(1) {
        Some(s) => s.parse().context("the seed is a number")?,
        None => 1,
    };
    let mut spec = RunSpec::new(Scenario::Partition, seed);
    spec.topology = Some(Arc::new(plant()?));
    spec.edges = vec![EdgeSpec::new("plant-a-gw", &["plant-a"])];
    // An hour, with two outages of about 10 minutes (the seed picks 5–15).
    spec.params.faults_s = 3600;
    spec.params.outages = 2;
    spec.params.outage_s = 600;
    spec.params.drain_budget_s = 600;
    // Nearly full: 2 MB holds about 3 minutes of this plant's readings.
    spec.params.outbox_bytes_max = Some(2_000_000);
    spec.params.full_policy = Some(FullPolicy::DropOldest);
    spec.command = "cargo run -p tributary-examples --release --example simulate_plant --".into();

    let outcome = run(&spec);
    for (name, value) in &outcome.timeline.figures {
        println!("{name:<42} {value}");
    }
    let path = "plant-report.html";
    std::fs::write(path, render_html(&outcome.timeline)).context("writing the report")?;
    println!("report: {path}");
    match outcome.verdict {
        Ok(()) => println!(
            "every acknowledged reading reached the log once, in order; {} were dropped by the drop-oldest policy while the outbox was full",
            outcome.figures.readings_dropped
        ),
        Err(v) => {
            println!("invariant broken: {v}");
            println!("replay: {}", outcome.replay);
            std::process::exit(1);
        }
    }
    Ok(())
}

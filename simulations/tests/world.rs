//! The simulated cluster: real edge and cloud actors over simulated QUIC,
//! disk, log and clock. Every seed must keep the invariants; deliberately
//! broken variants must be caught; a seed must replay exactly.
//!
//! A failure names its seed and the command that replays it.

use std::sync::Arc;

use tributary_actors::outbox::FullPolicy;
use tributary_actors::stages::{secs, Window};
use tributary_actors::topology::{EdgeSelector, Kafka, Mqtt, Simulated, Topology};
use tributary_simulations::swarm::swarm;
use tributary_simulations::world::EdgeSpec;
use tributary_simulations::{run, Mutation, RunSpec, Scenario, Violation};

/// The CI swarm: the `random` scenario (each seed enables its own subset of
/// faults) over this many seeds.
const SWARM_SEEDS: u64 = 200;
/// Deliberate bugs must be caught within this many seeds of the scenario
/// that exposes them.
const MUTATION_SEEDS_MAX: u64 = 40;
/// Seeds of the `mqtt` scenario (edge crashes, MQTT cuts, uplink
/// partitions, every edge MQTT-fed) that must all pass.
const MQTT_SEEDS: u64 = 24;

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[test]
fn a_swarm_of_random_faults_keeps_every_invariant() {
    let spec = RunSpec::new(Scenario::Random, 0);
    let s = swarm(&spec, 0, SWARM_SEEDS, threads(), &|_, _| {});
    let failures: Vec<String> = s
        .failures
        .iter()
        .map(|f| format!("seed {}: {}\n  replay: {}", f.seed, f.violation, f.replay))
        .collect();
    assert_eq!(s.failed, 0, "{}", failures.join("\n"));
    assert_eq!(s.passed, SWARM_SEEDS);
    // The swarm must actually hurt the system, or passing means little.
    assert!(s.edge_crashes >= 20, "only {} edge crashes", s.edge_crashes);
    assert!(
        s.cloud_crashes >= 20,
        "only {} cloud crashes",
        s.cloud_crashes
    );
    assert!(s.faults >= SWARM_SEEDS, "only {} faults", s.faults);
    assert!(
        s.readings_acked >= SWARM_SEEDS * 1000,
        "only {} readings acknowledged",
        s.readings_acked
    );
    // Each seed decides whether edges are MQTT-fed; some must be.
    assert!(
        s.mqtt_seeds >= SWARM_SEEDS / 4,
        "only {} seeds with MQTT-fed edges",
        s.mqtt_seeds
    );
    assert!(s.mqtt.accepted > 0 && s.mqtt.cuts > 0, "{:?}", s.mqtt);
    println!(
        "{} seeds: {} readings, {} faults, {:.0}× real time, {:.0} seeds/min",
        s.seeds,
        s.readings_acked,
        s.faults,
        s.speedup(),
        s.seeds_per_minute()
    );
}

#[test]
fn every_named_scenario_keeps_every_invariant() {
    for scenario in Scenario::ALL {
        if scenario == Scenario::Random {
            continue;
        }
        for seed in 0..3 {
            let outcome = run(&RunSpec::new(scenario, seed));
            if let Err(v) = &outcome.verdict {
                panic!("{scenario} seed {seed}: {v}\n  replay: {}", outcome.replay);
            }
            assert!(outcome.figures.readings_acked > 0, "{scenario} seed {seed}");
            assert!(outcome.figures.faults > 0 || scenario == Scenario::ClockSkew);
            assert!(outcome.figures.drain_ms.is_some(), "{scenario} seed {seed}");
        }
    }
}

#[test]
fn one_seed_replays_the_same_trace() {
    // A seed with crashes, partitions and loss exercises the most timing.
    let spec = RunSpec::new(Scenario::Random, 11);
    let a = run(&spec);
    let b = run(&spec);
    assert!(a.verdict.is_ok() && b.verdict.is_ok());
    assert!(a.figures.faults > 0);
    assert_eq!(a.trace_hash, b.trace_hash, "seed 11 ran two different ways");
    assert_eq!(a.figures.readings_acked, b.figures.readings_acked);
    let other = run(&RunSpec::new(Scenario::Random, 12));
    assert_ne!(
        a.trace_hash, other.trace_hash,
        "the trace does not depend on the seed"
    );
}

#[test]
fn an_mqtt_seed_replays_the_same_trace() {
    // Seed 7: crashes and cuts while messages are held, so redeliveries.
    let spec = RunSpec::new(Scenario::Mqtt, 7);
    let a = run(&spec);
    let b = run(&spec);
    if let Err(v) = &a.verdict {
        panic!("{v}\n  replay: {}", a.replay);
    }
    assert!(b.verdict.is_ok());
    assert!(a.figures.mqtt.accepted > 0 && a.figures.mqtt.resent_dup > 0);
    assert_eq!(
        a.trace_hash, b.trace_hash,
        "mqtt seed 7 ran two different ways"
    );
    assert_eq!(a.figures.mqtt, b.figures.mqtt);
    assert_eq!(a.figures.readings_acked, b.figures.readings_acked);
}

#[test]
fn mqtt_fed_edges_keep_exactly_once_through_crashes_cuts_and_partitions() {
    let spec = RunSpec::new(Scenario::Mqtt, 0);
    let s = swarm(&spec, 0, MQTT_SEEDS, threads(), &|_, _| {});
    let failures: Vec<String> = s
        .failures
        .iter()
        .map(|f| format!("seed {}: {}\n  replay: {}", f.seed, f.violation, f.replay))
        .collect();
    assert_eq!(s.failed, 0, "{}", failures.join("\n"));
    assert_eq!(s.mqtt_seeds, MQTT_SEEDS);
    let m = &s.mqtt;
    println!("{MQTT_SEEDS} mqtt seeds: {m:?}");
    assert_eq!(m.in_log, m.accepted, "every accepted message is in the log");
    assert_eq!(m.refused_queue_full, 0, "no broker queue was full");
    // The hard paths were taken: crashes and cuts with messages held, so
    // resends with DUP of durable messages (recognised and acked, not
    // stored again) and of messages never made durable (taken as new), and
    // a broker with more in flight than the source holds (overflows).
    assert!(s.edge_crashes >= MQTT_SEEDS, "{} crashes", s.edge_crashes);
    assert!(m.cuts >= MQTT_SEEDS, "{} cuts", m.cuts);
    assert!(m.redeliveries > 0 && m.acks_stale > 0, "{m:?}");
    assert!(m.dup_taken > 0, "{m:?}");
    assert!(m.overflow_unacked > 0 && m.forced_reconnects > 0, "{m:?}");
}

/// The first seed below `MUTATION_SEEDS_MAX` whose run fails, with its violation.
fn first_failure(scenario: Scenario, mutation: Mutation) -> Option<(u64, Violation)> {
    (0..MUTATION_SEEDS_MAX).find_map(|seed| {
        let mut spec = RunSpec::new(scenario, seed);
        spec.mutation = Some(mutation);
        run(&spec).verdict.err().map(|v| (seed, v))
    })
}

#[test]
fn acking_before_the_fsync_shows_up_as_lost_readings() {
    let found = first_failure(Scenario::EdgeCrash, Mutation::AckBeforeFsync);
    let (seed, violation) = found.unwrap_or_else(|| {
        panic!("ack-before-fsync survived {MUTATION_SEEDS_MAX} seeds of edge-crash")
    });
    assert!(
        matches!(violation, Violation::Lost { .. }),
        "seed {seed}: expected a lost reading, got {violation}"
    );
    println!("ack-before-fsync caught at seed {seed}: {violation}");
}

#[test]
fn forgetting_the_high_water_mark_shows_up_as_duplicates() {
    let found = first_failure(Scenario::CloudCrash, Mutation::ForgetHwm);
    let (seed, violation) = found
        .unwrap_or_else(|| panic!("forget-hwm survived {MUTATION_SEEDS_MAX} seeds of cloud-crash"));
    // A segment written twice shows as a repeated or an older reading.
    assert!(
        matches!(
            violation,
            Violation::Duplicated { .. } | Violation::OutOfOrder { .. }
        ),
        "seed {seed}: expected a duplicate, got {violation}"
    );
    println!("forget-hwm caught at seed {seed}: {violation}");
}

#[test]
fn two_cloud_nodes_that_do_not_fence_each_other_write_segments_twice() {
    // The second cloud node names its shard writers apart from the first's:
    // an edge that failed over to it and comes back finds the first node's
    // writer unfenced, with marks that miss what the second committed.
    let found = first_failure(Scenario::Partition, Mutation::SplitBrainShards);
    let (seed, violation) = found.unwrap_or_else(|| {
        panic!("split-brain-shards survived {MUTATION_SEEDS_MAX} seeds of partition")
    });
    assert!(
        matches!(
            violation,
            Violation::Duplicated { .. } | Violation::OutOfOrder { .. }
        ),
        "seed {seed}: expected a duplicate, got {violation}"
    );
    println!("split-brain-shards caught at seed {seed}: {violation}");
}

#[test]
fn dedup_by_device_and_ts_shows_up_as_lost_messages() {
    // The MQTT source's old rule: a second reading of a device in the same
    // millisecond taken for a redelivery, acked and dropped.
    let (seed, violation) = first_failure(Scenario::Mqtt, Mutation::DedupByDeviceTs)
        .unwrap_or_else(|| panic!("dedup-device-ts survived {MUTATION_SEEDS_MAX} seeds of mqtt"));
    assert!(
        matches!(violation, Violation::MessageLost { .. }),
        "seed {seed}: expected a lost message, got {violation}"
    );
    println!("dedup-device-ts caught at seed {seed}: {violation}");
    // The same seeds pass without the bug.
    for s in 0..=seed {
        let outcome = run(&RunSpec::new(Scenario::Mqtt, s));
        if let Err(v) = &outcome.verdict {
            panic!("mqtt seed {s} unmutated: {v}\n  replay: {}", outcome.replay);
        }
    }
}

#[test]
fn a_users_topology_runs_under_faults() {
    // An edge that keeps 1 s windows of its presses and sends both the raw
    // readings and the windows up.
    let topology = Topology::builder("plant")
        .edge(EdgeSelector::label("plant-a"), |edge| {
            edge.source(
                "presses",
                Simulated::devices(4).rate_hz(20.0).id_prefix("press-"),
            )
            .stage(
                "presses-1s",
                "presses",
                Window::tumbling(secs(1)).mean("temperature"),
            )
        })
        .cloud(|cloud| {
            cloud.sink("raw", "presses", Kafka::topic("presses")).sink(
                "windows",
                "presses-1s",
                Kafka::topic("presses.1s"),
            )
        })
        .build()
        .expect("a valid topology");
    let mut spec = RunSpec::new(Scenario::Partition, 3);
    spec.topology = Some(Arc::new(topology));
    spec.edges = vec![
        EdgeSpec::new("edge-1", &["plant-a"]),
        EdgeSpec::new("edge-2", &["plant-a"]),
    ];
    let outcome = run(&spec);
    if let Err(v) = &outcome.verdict {
        panic!("{v}\n  replay: {}", outcome.replay);
    }
    let f = &outcome.figures;
    assert!(f.readings_acked > 1000, "{f:?}");
    // The windows are in the log too: more records than raw readings.
    assert!(f.records_in_log > f.readings_in_log, "{f:?}");
}

#[test]
fn an_mqtt_source_in_a_users_topology_runs_under_faults() {
    // The presses publish to a broker; the edge keeps 1 s windows of them
    // and sends both up. Edge crashes, MQTT cuts and partitions.
    let topology = Topology::builder("plant")
        .edge(EdgeSelector::label("plant-a"), |edge| {
            edge.source("presses", Mqtt::subscribe("plant-a/+/telemetry"))
                .stage("presses-1s", "presses", Window::tumbling(secs(1)).mean("v"))
        })
        .cloud(|cloud| {
            cloud.sink("raw", "presses", Kafka::topic("presses")).sink(
                "windows",
                "presses-1s",
                Kafka::topic("presses.1s"),
            )
        })
        .build()
        .expect("a valid topology");
    let mut spec = RunSpec::new(Scenario::Mqtt, 3);
    // Nothing dropped by policy: every accepted message must be in the log.
    spec.params.full_policy = Some(FullPolicy::Block);
    spec.topology = Some(Arc::new(topology));
    spec.edges = vec![
        EdgeSpec::new("edge-1", &["plant-a"]),
        EdgeSpec::new("edge-2", &["plant-a"]),
    ];
    let outcome = run(&spec);
    if let Err(v) = &outcome.verdict {
        panic!("{v}\n  replay: {}", outcome.replay);
    }
    let f = &outcome.figures;
    assert_eq!(f.mqtt_edges, 2, "{f:?}");
    assert!(f.mqtt.accepted > 1000, "{f:?}");
    assert_eq!(f.mqtt.in_log, f.mqtt.accepted, "{f:?}");
    // The windows are in the log too.
    assert!(f.records_in_log > f.mqtt.in_log, "{f:?}");
}

#[test]
fn a_backlog_that_cannot_drain_in_its_budget_is_reported() {
    // A partition that lasts to the end of the faults, and no time to drain.
    // Seed 2 has one cloud node (with two, the edge would fail over to the
    // second and drain there).
    let mut spec = RunSpec::new(Scenario::Partition, 2);
    spec.params.outages = 1;
    spec.params.outage_s = 20;
    spec.params.faults_s = 20;
    spec.params.drain_budget_s = 0;
    let outcome = run(&spec);
    match outcome.verdict {
        Err(Violation::NoDrain { .. }) => {}
        other => panic!("expected the liveness check to fail, got {other:?}"),
    }
}

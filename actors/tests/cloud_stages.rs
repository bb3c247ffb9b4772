//! The cloud stages actor over a simulated log: its outputs and its progress
//! are committed together, so a failed commit and the restart that follows
//! neither lose nor repeat an alert.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorRef};
use tributary_actors::cloud::stages::{CloudStages, CloudStagesArgs, CLOUD_STAGES_NAME};
use tributary_actors::pipeline::StageRestarts;
use tributary_actors::reading::{Metric, Reading, Value};
use tributary_actors::sink::memory::MemoryStageLog;
use tributary_actors::sink::StageLog;
use tributary_actors::stages::Threshold;
use tributary_actors::supervision::{
    ChildSpec, Restart, Strategy, Supervisor, SupervisorArgs, SupervisorMsg,
};
use tributary_actors::topology::{Kafka, Role, Simulated, Topology};

const WAIT: Duration = Duration::from_secs(20);
const T0_US: i64 = 1_764_000_000_000_000;

fn reading(i: usize, temperature: f64) -> Reading {
    Reading {
        device_id: "press-1".into(),
        device_ts_us: T0_US + i as i64 * 1_000_000,
        edge_ts_us: 0,
        stream: Some("sim".into()),
        metrics: vec![Metric {
            name: "temperature".into(),
            value: Value::F64(temperature),
            unit: None,
        }],
    }
}

/// The stages of a threshold held for 5 s (alerts to `alerts`), over `log`.
fn held_for_5_s(log: &MemoryStageLog) -> CloudStagesArgs {
    use tributary_actors::stages::secs;
    let topology = Topology::builder("t")
        .edge("plant", |e| e.source("sim", Simulated::devices(1)))
        .cloud(|c| {
            c.stage(
                "overheat",
                "sim",
                Threshold::above("temperature", 100.0).for_at_least(secs(5)),
            )
            .sink("alerts", "overheat", Kafka::topic("alerts"))
        })
        .build()
        .unwrap();
    let part = topology.part_for("cloud-1", &[], Role::Cloud);
    let l = log.clone();
    CloudStagesArgs {
        open_log: Arc::new(move || Ok(Box::new(l.open()) as Box<dyn StageLog>)),
        stages: part.stages.iter().map(|c| (*c).clone()).collect(),
        sinks: vec![("overheat".into(), "alerts".into())],
        restarts: StageRestarts::default(),
        batch_readings_max: 64,
        poll_ms: 5,
        watermark_lag_ms: 1_000,
        report_interval_ms: 0,
        alerts: None,
    }
}

/// Waits until `f` holds, checking every few milliseconds: the log is shared
/// state with no event to await.
async fn until(what: &str, f: impl Fn() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_restarts_the_stages_from_the_committed_offset() {
    let topology = Topology::builder("t")
        .edge("plant", |e| e.source("sim", Simulated::devices(1)))
        .cloud(|c| {
            c.stage("overheat", "sim", Threshold::above("temperature", 100.0))
                .sink("alerts", "overheat", Kafka::topic("alerts"))
        })
        .build()
        .unwrap();
    let part = topology.part_for("cloud-1", &[], Role::Cloud);
    let log = MemoryStageLog::new();
    let l = log.clone();
    let args = CloudStagesArgs {
        open_log: Arc::new(move || Ok(Box::new(l.open()) as Box<dyn StageLog>)),
        stages: part.stages.iter().map(|c| (*c).clone()).collect(),
        sinks: vec![("overheat".into(), "alerts".into())],
        restarts: StageRestarts::default(),
        batch_readings_max: 16,
        poll_ms: 5,
        watermark_lag_ms: 1_000,
        report_interval_ms: 0,
        alerts: None,
    };
    let mut sup = SupervisorArgs::new(
        Strategy::OneForOne,
        vec![ChildSpec::new(
            CLOUD_STAGES_NAME,
            Restart::Permanent,
            CloudStages,
            args,
        )],
    );
    sup.backoff_initial_ms = 10;
    sup.backoff_max_ms = 10;
    let (sup, _handle) = Actor::spawn(None, Supervisor, sup).await.unwrap();

    // The spike's batch fails to commit: the actor fails, and its restart
    // must read that batch again from the committed offset.
    log.fail_commits(1);
    log.append(
        "edge-1",
        (0..150).map(|i| reading(i, if i == 100 { 500.0 } else { 20.0 })),
    );
    until("the first 150 readings committed", || {
        log.committed_offset() == 150
    })
    .await;
    log.append("edge-1", (150..300).map(|i| reading(i, 20.0)));
    until("every reading committed", || log.committed_offset() == 300).await;

    let outputs = log.outputs();
    assert_eq!(outputs.len(), 1, "{outputs:?}");
    assert_eq!(outputs[0].topic, "alerts");
    assert_eq!(outputs[0].stream, "overheat");
    let alert: serde_json::Value = serde_json::from_slice(&outputs[0].value).unwrap();
    assert_eq!(alert["value"], 500.0);

    let sup: ActorRef<SupervisorMsg> = sup;
    let status = ractor::call_t!(sup, SupervisorMsg::Status, 5_000).unwrap();
    assert_eq!(status[0].restarts, 1, "{status:?}");
    assert!(status[0]
        .last_failure
        .as_deref()
        .unwrap_or_default()
        .contains("unavailable"));
}

/// Two edges that both name a device `press-1` feed two states: a condition
/// that holds on one edge for 3 s and then on the other for 3 s is not a
/// condition that held for 6 s, and an alert names its edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_is_kept_per_edge_and_device() {
    let log = MemoryStageLog::new();
    let args = held_for_5_s(&log);
    let (_stages, _handle) = Actor::spawn(None, CloudStages, args).await.unwrap();
    log.append("edge-1", (0..=3).map(|i| reading(i, 500.0)));
    log.append("edge-2", (3..=6).map(|i| reading(i, 500.0)));
    // Then edge-1 alone, hot for 6 s: that one alerts.
    log.append("edge-1", (10..=16).map(|i| reading(i, 500.0)));
    until("every reading committed", || log.committed_offset() == 15).await;
    let alerts: Vec<serde_json::Value> = log
        .outputs()
        .iter()
        .map(|o| serde_json::from_slice(&o.value).unwrap())
        .collect();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["device_id"], "edge-1/press-1");
}

/// A node that takes over a partition (here: a second stages actor on the
/// same log, after the first stopped) takes its state too: a threshold held
/// across the move alerts once, and re-arms as it would have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_threshold_that_spans_a_move_alerts_once() {
    let log = MemoryStageLog::new();
    let args = held_for_5_s(&log);
    let (first, handle) = Actor::spawn(None, CloudStages, args.clone()).await.unwrap();
    log.append("edge-1", (0..=7).map(|i| reading(i, 500.0)));
    until("the first node committed", || log.committed_offset() == 8).await;
    assert_eq!(log.outputs().len(), 1, "{:?}", log.outputs());
    assert!(log.checkpoint().is_some());
    first.stop(None);
    handle.await.unwrap();

    let (_second, _handle) = Actor::spawn(None, CloudStages, args).await.unwrap();
    // Still hot for 13 s more: the same episode, no new alert.
    log.append("edge-1", (8..=20).map(|i| reading(i, 500.0)));
    // Then cool for one reading, and hot again for 6 s: a second episode.
    log.append("edge-1", [reading(21, 20.0)]);
    log.append("edge-1", (22..=28).map(|i| reading(i, 500.0)));
    until("every reading committed", || log.committed_offset() == 29).await;
    let alerts: Vec<serde_json::Value> = log
        .outputs()
        .iter()
        .map(|o| serde_json::from_slice(&o.value).unwrap())
        .collect();
    assert_eq!(alerts.len(), 2, "{alerts:#?}");
    assert_eq!(alerts[0]["device_ts_us"], T0_US + 5_000_000, "{alerts:#?}");
    assert_eq!(alerts[1]["device_ts_us"], T0_US + 27_000_000, "{alerts:#?}");
}

//! The gateway on a simulated disk: what it answers a source, and what it
//! keeps across a crash (unsynced writes lost, the actor gone without its
//! `post_stop`).
//!
//! - Two readings of one device with the same timestamp are two readings.
//! - A retry (same origin) is taken once, whatever its timestamp.
//! - A reading stamped too far ahead of the edge's clock is refused.
//! - A reading that only an edge window reads is answered only once it is in
//!   the stages' input log; after a crash before its window closes, the
//!   window comes back and its output is stored exactly once.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorRef};
use tributary_actors::clock::Clock;
use tributary_actors::edge::gateway::{
    EdgeStages, Gateway, GatewayArgs, GatewayMsg, GatewayStatus, Ingest, IngestReply, Origin,
    StoreFactory,
};
use tributary_actors::edge::EdgeNames;
use tributary_actors::outbox::segment::decode_payload;
use tributary_actors::outbox::{MemoryStore, OutboxConfig, OutboxStore};
use tributary_actors::pipeline::StageRestarts;
use tributary_actors::reading::{Metric, Reading, Value};
use tributary_actors::stages::{secs, Window};
use tributary_actors::topology::{Simulated, Topology};
use tributary_cluster::tls::Role;
use tributary_cluster::uplink::ReadRequest;

const CALL_MS: u64 = 5_000;
const S: i64 = 1_000_000;
/// The edge's clock in these tests: a fixed day, moved by hand.
const T0_US: i64 = 1_764_000_000 * S;

#[derive(Debug)]
struct ManualClock(AtomicI64);

impl Clock for ManualClock {
    fn now_us(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

fn reading(device: &str, ts_us: i64, v: f64, stream: Option<&str>) -> Reading {
    Reading {
        device_id: device.into(),
        device_ts_us: ts_us,
        edge_ts_us: 0,
        stream: stream.map(str::to_owned),
        metrics: vec![Metric {
            name: "temperature".into(),
            value: Value::F64(v),
            unit: None,
        }],
    }
}

struct Edge {
    gateway: ActorRef<GatewayMsg>,
    names: EdgeNames,
}

async fn start(
    disk: &MemoryStore,
    stages: Option<EdgeStages>,
    clock: Arc<ManualClock>,
    name: &str,
) -> Edge {
    let d = disk.clone();
    let store: StoreFactory = Arc::new(move || Ok(Box::new(d.clone()) as Box<dyn OutboxStore>));
    let names = EdgeNames::scoped(format!("gateway-test/{name}/"));
    let args = GatewayArgs {
        store,
        outbox: OutboxConfig::default(),
        ack_log: None,
        stages,
        names: names.clone(),
        clock,
        device_clock_skew_max_ms: 60_000,
    };
    let (gateway, _) = Actor::spawn(Some(names.gateway()), Gateway, args)
        .await
        .expect("the gateway starts");
    Edge { gateway, names }
}

async fn ingest(edge: &Edge, reading: Reading, source: u64, n: u64) -> IngestReply {
    let ingest = Ingest {
        reading,
        origin: Origin { source, n },
    };
    ractor::call_t!(edge.gateway, GatewayMsg::Ingest, CALL_MS, ingest).expect("an answer")
}

async fn status(edge: &Edge) -> GatewayStatus {
    ractor::call_t!(edge.gateway, GatewayMsg::Status, CALL_MS).expect("status")
}

/// Every reading in the outbox, in order.
async fn stored(edge: &Edge) -> Vec<Reading> {
    let s = status(edge).await;
    let req = ReadRequest {
        link_generation: 0,
        from_seq: s.acked_through + 1,
        through_seq: s.sealed_through,
        segments_max: 1_000,
    };
    let frames = ractor::call_t!(edge.gateway, GatewayMsg::Read, CALL_MS, req)
        .expect("read")
        .expect("segments");
    frames
        .iter()
        .flat_map(|f| decode_payload(&f.bytes, f.readings_count).expect("decodes"))
        .collect()
}

/// A crash: the actor is killed (no `post_stop`), the unsynced writes are lost.
async fn crash(edge: Edge, disk: &MemoryStore) {
    edge.gateway.kill();
    let _ = edge
        .gateway
        .wait(Some(Duration::from_millis(CALL_MS)))
        .await;
    disk.crash(None, false);
    drop(edge.names);
}

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock(AtomicI64::new(T0_US)))
}

#[tokio::test]
async fn readings_sharing_a_timestamp_are_all_taken_and_a_retry_once() {
    let disk = MemoryStore::new();
    let edge = start(&disk, None, clock(), "same-ts").await;
    for n in 0..3 {
        let r = reading("d", T0_US, n as f64, None);
        assert!(matches!(
            ingest(&edge, r, 7, n).await,
            IngestReply::Committed { .. }
        ));
    }
    // A retry of number 1 with another timestamp: still that reading.
    let retry = reading("d", T0_US + 5, 1.0, None);
    assert_eq!(ingest(&edge, retry, 7, 1).await, IngestReply::Duplicate);
    // Another source's number 1 is another reading.
    assert!(matches!(
        ingest(&edge, reading("d", T0_US, 9.0, None), 8, 1).await,
        IngestReply::Committed { .. }
    ));
    let all = stored(&edge).await;
    assert_eq!(all.len(), 4);
    assert!(all.iter().all(|r| r.device_ts_us == T0_US));
    assert_eq!(status(&edge).await.retries_recognised, 1);
}

#[tokio::test]
async fn a_reading_from_the_far_future_is_refused_and_counted() {
    let disk = MemoryStore::new();
    let edge = start(&disk, None, clock(), "future").await;
    let year = 365 * 24 * 3600 * S;
    let answer = ingest(&edge, reading("d", T0_US + year, 1.0, None), 1, 0).await;
    assert!(
        matches!(&answer, IngestReply::Invalid(why) if why.contains("ahead")),
        "{answer:?}"
    );
    // Within the skew is fine.
    let near = reading("d", T0_US + 30 * S, 1.0, None);
    assert!(matches!(
        ingest(&edge, near, 1, 1).await,
        IngestReply::Committed { .. }
    ));
    let s = status(&edge).await;
    assert_eq!(s.readings_future, 1);
    assert_eq!(s.stats.readings_committed, 1);
}

fn window_stages(checkpoint_interval_ms: u64) -> EdgeStages {
    let topology = Topology::builder("plant")
        .edge("plant", |e| {
            e.source("sim", Simulated::devices(1)).stage(
                "mean",
                "sim",
                Window::tumbling(secs(10)).count("temperature"),
            )
        })
        .build()
        .expect("a valid topology");
    let part = topology.part_for("plant", &[], Role::Edge);
    EdgeStages {
        stages: part.stages.iter().map(|c| (*c).clone()).collect(),
        uplink: part.uplink.iter().map(|s| s.to_string()).collect(),
        restarts: StageRestarts::default(),
        checkpoint_interval_ms,
    }
}

fn count(r: &Reading) -> i64 {
    match r.metric("temperature.count") {
        Some(Value::I64(n)) => *n,
        other => panic!("no count in {r:?}: {other:?}"),
    }
}

/// Feeds five readings of the window [T0, T0 + 10 s), crashes, restarts,
/// then closes the window: one output, counting all five.
async fn crash_before_the_window_closes(checkpoint_interval_ms: u64, wait_for_checkpoint: bool) {
    let disk = MemoryStore::new();
    let clock = clock();
    let name = format!("window-{checkpoint_interval_ms}");
    let edge = start(
        &disk,
        Some(window_stages(checkpoint_interval_ms)),
        clock.clone(),
        &name,
    )
    .await;
    for n in 0..5 {
        let r = reading("press", T0_US + n as i64 * S, 20.0, Some("sim"));
        // Answered only once it is durable in the stages' input log.
        assert_eq!(ingest(&edge, r, 1, n).await, IngestReply::Consumed);
    }
    assert_eq!(status(&edge).await.stage_input_log_entries, 5);
    if wait_for_checkpoint {
        // The stages' tick (every second) takes the checkpoint.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while status(&edge).await.stage_checkpoints == 0 {
            assert!(tokio::time::Instant::now() < deadline, "no checkpoint");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(status(&edge).await.stage_input_log_entries, 0);
    }
    assert!(stored(&edge).await.is_empty(), "the window is still open");
    crash(edge, &disk).await;

    let edge = start(
        &disk,
        Some(window_stages(checkpoint_interval_ms)),
        clock.clone(),
        &format!("{name}-again"),
    )
    .await;
    // The next window's first reading closes [T0, T0 + 10 s).
    let next = reading("press", T0_US + 12 * S, 21.0, Some("sim"));
    assert_eq!(ingest(&edge, next, 2, 0).await, IngestReply::Consumed);
    let out = stored(&edge).await;
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].device_ts_us, T0_US);
    assert_eq!(count(&out[0]), 5, "every reading before the crash counts");

    // A crash after the output was committed: it is not emitted again.
    crash(edge, &disk).await;
    let edge = start(
        &disk,
        Some(window_stages(checkpoint_interval_ms)),
        clock,
        &format!("{name}-third"),
    )
    .await;
    let later = reading("press", T0_US + 25 * S, 22.0, Some("sim"));
    assert_eq!(ingest(&edge, later, 3, 0).await, IngestReply::Consumed);
    let out = stored(&edge).await;
    let starts: Vec<i64> = out.iter().map(|r| (r.device_ts_us - T0_US) / S).collect();
    assert_eq!(starts, [0, 10], "each window once: {out:?}");
    assert_eq!(count(&out[1]), 1);
}

#[tokio::test]
async fn an_open_window_survives_a_crash_from_the_input_log() {
    crash_before_the_window_closes(3_600_000, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_window_survives_a_crash_from_a_checkpoint() {
    crash_before_the_window_closes(1, true).await;
}

//! A fleet on one cloud node: 500 edges connected at once, every one of them
//! flowing exactly once, while the cloud's threads and memory do not grow
//! with the number of edges (its log writers are a fixed set of shards, not
//! one producer per edge).
//!
//! The cloud is a real `node --role cloud` process on the shared Kafka
//! broker; the edges are light edges in this process
//! ([`tributary_tests::fleet`]), each with its own certificate, outbox,
//! uplink and devices.

use std::time::Duration;

use tributary_tests::broker::shared_bootstrap;
use tributary_tests::checker::{check, consume_all, read_ack_logs};
use tributary_tests::fixture::Fixture;
use tributary_tests::fleet::{footprint, Fleet, FleetSpec};

const EDGES: usize = 500;
const READINGS_PER_EDGE: u64 = 20;
/// Bound on every edge having connected.
const CONNECTED: Duration = Duration::from_secs(120);
/// Bound on every reading reaching the topic.
const DRAIN: Duration = Duration::from_secs(180);
/// Threads the cloud may add while it serves the fleet: its shards' producers
/// exist before the first edge, so what grows with edges is only tokio's
/// blocking pool, bounded far below one thread per edge.
const THREADS_GROWTH_MAX: u64 = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_edges_on_one_cloud_all_flow_exactly_once() {
    let mut f = Fixture::new("fleet", &shared_bootstrap(), &[]);
    f.start_cloud().await;
    let pid = f.cloud().pid();
    let before = footprint(pid).expect("the cloud's /proc status");
    let spec = FleetSpec {
        edges: EDGES,
        id_prefix: "fleet".into(),
        devices: 1,
        interval_ms: 100,
        readings_max: READINGS_PER_EDGE,
        segment_readings_max: 10,
        commit_interval_ms: 20,
        ack_dir: Some(f.dir.path().to_path_buf()),
        ingest_shards: 4,
    };
    let pki = f.dir.path().join("pki");
    let fleet = Fleet::start(&spec, &pki, &[f.cloud_addr])
        .await
        .expect("starting the fleet");
    f.cloud()
        .wait_for_log_line(&format!("edges={EDGES} "), CONNECTED)
        .await
        .unwrap_or_else(|e| panic!("not every edge connected: {e}"));
    let during = footprint(pid).expect("the cloud's /proc status");

    let total = EDGES * READINGS_PER_EDGE as usize;
    let consumed = consume_all(&f.bootstrap, &f.topic, total, DRAIN)
        .await
        .expect("reading the topic back");
    let after = footprint(pid).expect("the cloud's /proc status");
    let acks = read_ack_logs(&fleet.ack_logs).expect("reading the ack logs");
    let report = check(&consumed, &acks);
    println!(
        "fleet: {EDGES} edges; cloud threads {} before, {} with every edge connected, {} after the drain; \
         RSS {:.1} MB, {:.1} MB, {:.1} MB",
        before.threads,
        during.threads,
        after.threads,
        before.rss_bytes as f64 / 1e6,
        during.rss_bytes as f64 / 1e6,
        after.rss_bytes as f64 / 1e6,
    );
    assert!(report.is_exactly_once(), "{report}");
    assert_eq!(report.acked, total, "every reading acknowledged: {report}");
    assert_eq!(
        report.distinct, total,
        "every reading in the topic: {report}"
    );
    assert_eq!(
        report.per_device.len(),
        EDGES,
        "one device per edge, each in the topic"
    );
    let grown = during.threads.max(after.threads) - before.threads.min(during.threads);
    assert!(
        grown <= THREADS_GROWTH_MAX,
        "the cloud's threads grew by {grown} for {EDGES} edges ({} before, {} during, {} after)",
        before.threads,
        during.threads,
        after.threads
    );
}

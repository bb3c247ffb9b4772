//! Exactly-once scenarios on real processes and a real Kafka broker: each
//! runs a cloud node and edges with simulated devices, injects a fault, lets
//! the finite workload drain, then reads the topic back with read_committed
//! and checks it against the edges' ack logs: 0 lost, 0 duplicated, in order.

use std::time::Duration;

use tributary_tests::broker::{shared_bootstrap, Broker};
use tributary_tests::fixture::{assert_exactly_once, Fixture, Workload, DRAIN};

const STEADY: Workload = Workload {
    devices: 4,
    rate_hz: 50.0,
    readings: 200,
};

/// Long enough for QUIC's idle timeout (2 s) to declare the link dead.
const CUT: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_flow_from_two_edges() {
    let mut f = Fixture::new("steady", &shared_bootstrap(), &["edge-1", "edge-2"]);
    f.start_cloud().await;
    for i in 0..2 {
        f.workload(i, &STEADY);
        f.edges[i].start();
    }
    for e in &f.edges {
        e.wait_acked(STEADY.total(), DRAIN).await;
    }
    let report = f.check().await;
    assert_exactly_once(&report);
    assert_eq!(report.acked, 2 * STEADY.total());
    assert_eq!(report.consumed, 2 * STEADY.total(), "{report}");
    assert!(
        report.unexpected.is_empty(),
        "readings nobody acknowledged:\n{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_cut_and_restored_several_times() {
    // Long enough for three rounds of cut, detection (about 2 s) and heal.
    let w = Workload {
        devices: 4,
        rate_hz: 50.0,
        readings: 1500,
    };
    let mut f = Fixture::new("linkcut", &shared_bootstrap(), &["edge-1"]);
    f.start_cloud().await;
    f.proxy_edge(0).await;
    f.workload(0, &w);
    f.edges[0].start();
    for round in 0..3 {
        f.edges[0]
            .wait_log_count("uplink streaming", round + 1)
            .await;
        let before = f.edges[0].acked();
        f.edges[0].wait_acked(before + 100, DRAIN).await;
        f.edges[0].proxy.as_ref().unwrap().cut();
        f.edges[0].wait_log_count("uplink down", round + 1).await;
        // Readings keep being acknowledged into the outbox while the link is down.
        let during = f.edges[0].acked();
        f.edges[0].wait_acked(during + 50, DRAIN).await;
        tokio::time::sleep(CUT).await;
        f.edges[0].proxy.as_ref().unwrap().heal();
        eprintln!("round {round}: healed after {before}..{during} acked");
    }
    f.edges[0].wait_acked(w.total(), DRAIN).await;
    let report = f.check().await;
    assert_exactly_once(&report);
    assert_eq!(report.consumed, w.total(), "{report}");
    assert!(
        f.edges[0].proxy.as_ref().unwrap().stats().dropped > 0,
        "the cuts dropped nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_edge_mid_stream() {
    let w = Workload {
        devices: 4,
        rate_hz: 50.0,
        readings: 300,
    };
    let mut f = Fixture::new("killedge", &shared_bootstrap(), &["edge-1"]);
    f.start_cloud().await;
    f.workload(0, &w);
    f.edges[0].start();
    f.edges[0].wait_acked(300, DRAIN).await;
    f.edges[0].process().kill9().unwrap();
    let before_restart = f.edges[0].acked();
    // The restarted edge reopens the same outbox; its devices send a fresh workload.
    f.edges[0].start();
    f.edges[0].wait_log("outbox opened").await;
    f.edges[0]
        .wait_acked(before_restart + w.total(), DRAIN)
        .await;
    let report = f.check().await;
    assert_exactly_once(&report);
    assert!(report.acked >= before_restart + w.total());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_cloud_mid_stream() {
    let w = Workload {
        devices: 4,
        rate_hz: 50.0,
        readings: 400,
    };
    let mut f = Fixture::new("killcloud", &shared_bootstrap(), &["edge-1"]);
    f.start_cloud().await;
    f.workload(0, &w);
    f.edges[0].start();
    f.edges[0].wait_acked(300, DRAIN).await;
    f.cloud().kill9().unwrap();
    f.edges[0].wait_log("uplink down").await;
    f.start_cloud().await;
    f.edges[0].wait_acked(w.total(), DRAIN).await;
    let report = f.check().await;
    assert_exactly_once(&report);
    assert_eq!(report.acked, w.total());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_stopped_for_seconds_then_restarted() {
    let mut broker = Broker::start_private()
        .await
        .expect("starting a private broker");
    let w = Workload {
        devices: 4,
        rate_hz: 50.0,
        readings: 400,
    };
    let mut f = Fixture::new("broker", &broker.bootstrap(), &["edge-1"]);
    f.start_cloud().await;
    f.workload(0, &w);
    f.edges[0].start();
    f.edges[0].wait_acked(300, DRAIN).await;
    broker.kill().await.expect("killing the broker");
    // The edge keeps accepting readings into its outbox while the log is gone.
    let during = f.edges[0].acked();
    f.edges[0].wait_acked(during + 200, DRAIN).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.restart().await.expect("restarting the broker");
    f.edges[0].wait_acked(w.total(), DRAIN).await;
    let report = f.check().await;
    assert_exactly_once(&report);
    assert_eq!(report.acked, w.total());
}

/// Outbox budget for the full-outbox scenarios: a few segments' worth.
const SMALL_OUTBOX: &str = "65536";

/// A cloud and one edge with a small outbox under `policy`, started while
/// its link is cut, so that the outbox fills.
async fn edge_with_a_small_outbox_cut_off(name: &str, policy: &str, w: &Workload) -> Fixture {
    let mut f = Fixture::new(name, &shared_bootstrap(), &["edge-1"]);
    f.start_cloud().await;
    f.proxy_edge(0).await;
    f.edges[0].proxy.as_ref().unwrap().cut();
    f.workload(0, w);
    f.edges[0].set("outbox-bytes-max", SMALL_OUTBOX);
    f.edges[0].set("segment-bytes-max", "8192");
    f.edges[0].set("full-policy", policy);
    f.edges[0].start();
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_blocks_the_devices_and_loses_nothing() {
    let w = Workload {
        devices: 4,
        rate_hz: 100.0,
        readings: 1500,
    };
    let mut f = edge_with_a_small_outbox_cut_off("block", "block", &w).await;
    f.edges[0].wait_log("outbox full: sources wait").await;
    let at_full = f.edges[0].acked();
    assert!(
        at_full < w.total(),
        "the outbox filled only after the whole workload"
    );
    f.edges[0].proxy.as_ref().unwrap().heal();
    f.edges[0].wait_log("outbox has room again").await;
    f.edges[0].wait_acked(w.total(), DRAIN).await;
    let report = f.check().await;
    assert_exactly_once(&report);
    assert_eq!(report.acked, w.total());
    assert_eq!(report.dropped, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_under_drop_oldest_misses_only_the_counted_drops() {
    let w = Workload {
        devices: 4,
        rate_hz: 100.0,
        readings: 1000,
    };
    let mut f = edge_with_a_small_outbox_cut_off("dropoldest", "drop-oldest", &w).await;
    // Devices never wait under drop-oldest: the whole workload is accepted while cut.
    f.edges[0].wait_acked(w.total(), DRAIN).await;
    f.edges[0].wait_log("dropped the oldest segment").await;
    f.edges[0].proxy.as_ref().unwrap().heal();
    let acks = f.ack_logs();
    assert!(!acks.dropped.is_empty(), "nothing was dropped");
    let report = f.check().await;
    assert_exactly_once(&report);
    // Everything acknowledged and not dropped arrived; what is missing was counted.
    assert_eq!(
        report.consumed + report.dropped - report.dropped_present.len(),
        report.acked,
        "{report}"
    );
}

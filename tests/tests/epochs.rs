//! Epochs the clock cannot strand, on real processes.
//!
//! An outbox's epoch is its creation time by the edge's clock. An outbox
//! created while the clock was behind has an epoch below the one the log
//! already holds for its edge, and the cloud refuses it as it would a
//! restored backup. Here the "clock behind" is made by order, not by a
//! fake clock: outbox B of edge-1 is created (and fills) while the cloud is
//! unreachable, then a newer outbox A of edge-1 commits, so the log's epoch
//! is A's, above B's. B never sent anything, so it must move its epoch above
//! the log's and deliver everything exactly once. A, which did send, is
//! afterwards a stale incarnation and must stay refused, with a clear error.

use std::time::Duration;

use tributary_tests::broker::shared_bootstrap;
use tributary_tests::checker::consume_all;
use tributary_tests::fixture::{assert_exactly_once, free_udp_addr, Fixture, Workload, DRAIN};

const READY: Duration = Duration::from_secs(60);
const EXIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_dated_behind_the_log_moves_its_epoch_once_and_a_sending_one_stays_refused() {
    let w = Workload {
        devices: 2,
        rate_hz: 50.0,
        readings: 100,
    };
    let mut f = Fixture::new("epochs", &shared_bootstrap(), &["edge-1"]);
    let outbox_a = f.dir.path().join("a.outbox");
    let outbox_b = f.dir.path().join("b.outbox");
    let cloud_addr = f.cloud_addr.to_string();
    f.workload(0, &w);

    // B: created first (so dated earlier), filled while no cloud answers.
    f.edges[0].set("outbox-dir", outbox_b.to_str().unwrap());
    f.edges[0].set("cloud-addr", &free_udp_addr().to_string());
    // Devices of their own per outbox: the log's per-device order is only
    // meaningful within one outbox's stream.
    f.edges[0].set("device-id-prefix", "b-");
    f.edges[0].start();
    f.edges[0].wait_acked(w.total(), READY).await;
    let line = f.edges[0].wait_log("outbox opened").await;
    let epoch_b = field(&line, "epoch");
    stop(&mut f).await;

    // A: a newer outbox of the same edge, which commits its readings.
    f.start_cloud().await;
    f.edges[0].set("outbox-dir", outbox_a.to_str().unwrap());
    f.edges[0].set("cloud-addr", &cloud_addr);
    f.edges[0].set("device-id-prefix", "a-");
    f.edges[0].start();
    let line = f.edges[0].wait_log("outbox opened").await;
    let epoch_a = field(&line, "epoch");
    assert!(
        epoch_a > epoch_b,
        "A ({epoch_a}) must be dated after B ({epoch_b})"
    );
    f.edges[0].wait_acked(2 * w.total(), READY).await;
    // A's readings are the only ones that can reach the log so far.
    let in_log = consume_all(&f.bootstrap, &f.topic, w.total(), DRAIN)
        .await
        .expect("consuming A's readings");
    assert_eq!(in_log.len(), w.total());
    stop(&mut f).await;

    // B again: refused as stale, never sent, so it moves above A's epoch and
    // delivers its readings. No devices from now on: only what the outboxes
    // hold may flow.
    f.edges[0].set("device-count", "0");
    f.edges[0].set("outbox-dir", outbox_b.to_str().unwrap());
    f.edges[0].start();
    let line = f.edges[0].wait_log("moves above").await;
    let moved = field(&line, "now");
    assert_eq!(moved, epoch_a + 1, "{line}");
    f.edges[0].wait_log("uplink streaming").await;
    let report = f.check().await;
    assert_exactly_once(&report);
    assert_eq!(report.consumed, 2 * w.total(), "{report}");
    stop(&mut f).await;

    // A again: it sent under its epoch, which is now below the log's. It is
    // a stale incarnation and must not move: refused, saying why.
    f.edges[0].set("outbox-dir", outbox_a.to_str().unwrap());
    f.edges[0].start();
    let line = f.edges[0].wait_log("refuses this edge's outbox").await;
    assert!(line.contains("restored backup"), "{line}");
    assert!(
        f.edges[0]
            .process()
            .log_tail()
            .matches("moves above")
            .count()
            == 0,
        "an outbox that sent must never move its epoch"
    );
    stop(&mut f).await;
    // And nothing was written twice meanwhile.
    let report = f.check().await;
    assert_exactly_once(&report);
    assert_eq!(report.consumed, 2 * w.total(), "{report}");
}

/// Stops edge-1, bounded.
async fn stop(f: &mut Fixture) {
    let p = f.edges[0].process();
    p.terminate().expect("stopping the edge");
    p.wait_exit(EXIT).await.expect("the edge exits");
}

/// The number after `name=` in a log line.
fn field(line: &str, name: &str) -> u64 {
    let key = format!("{name}=");
    let at = line
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} in {line}"));
    line[at + key.len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or_else(|e| panic!("{name} in {line}: {e}"))
}

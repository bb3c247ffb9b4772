//! The cluster layer on real processes: a cloud node and two edges, one of
//! them behind the fault proxy. Membership (who is up), partitions noticed
//! within 2 s, rejoins within 1 s of the heal, and a remote control call.
//!
//! Times are read from the `since_ms=` field of the nodes' `member up` and
//! `member down` lines (the instant the membership recorded the change), so
//! the log polling's own delay does not count.

use std::time::{Duration, SystemTime};

use tributary_tests::broker::shared_bootstrap;
use tributary_tests::fixture::{Fixture, Workload, NODE_READY};

/// Enough readings to keep both edges busy for the whole test.
const LIGHT: Workload = Workload {
    devices: 1,
    rate_hz: 20.0,
    readings: 1_000_000,
};
/// The bound on noticing a partition.
const DOWN_DETECTION_MAX_MS: u64 = 2_000;
/// The bound on rejoining after the heal.
const REJOIN_MAX_MS: u64 = 1_000;
/// How long each partition lasts. Past detection, so the edge is in its
/// reconnect loop at the heal; different lengths heal at different points
/// of a connect attempt, which is what decides how soon the edge rejoins.
const CUTS_MS: [u64; 3] = [2_500, 3_000, 3_500];

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_millis() as u64
}

/// The value of `name=<u64>` in a log line.
fn field(line: &str, name: &str) -> u64 {
    let key = format!(" {name}=");
    let start = line
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} in {line:?}"))
        + key.len();
    line[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} is not a number in {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_partitions_rejoins_and_a_control_call() {
    let mut f = Fixture::new("cluster", &shared_bootstrap(), &["edge-1", "edge-2"]);
    f.start_cloud().await;
    f.proxy_edge(0).await;
    for i in 0..2 {
        f.workload(i, &LIGHT);
        f.edges[i].start();
    }

    // Everyone sees everyone: the cloud both edges, each edge the cloud.
    for edge in ["edge-1", "edge-2"] {
        f.cloud()
            .wait_for_log_line(&format!("member up peer={edge}"), NODE_READY)
            .await
            .unwrap_or_else(|e| panic!("cloud: {e}"));
        // The cloud's status call crossed the session to the edge's control
        // actor (found through its process group) and came back.
        let answer = f
            .cloud()
            .wait_for_log_line(&format!("control call answered peer={edge}"), NODE_READY)
            .await
            .unwrap_or_else(|e| panic!("cloud: {e}"));
        assert!(answer.contains(&format!("edge_id={edge}")), "{answer}");
    }
    for e in &mut f.edges {
        e.wait_log("member up peer=cloud-1").await;
        e.wait_log("remote actor reachable through process group tributary.cloud.control")
            .await;
    }

    let proxy = f.edges[0].proxy.take().expect("edge-1 is behind the proxy");
    let mut detected = Vec::new();
    let mut rejoined = Vec::new();
    for (round, cut_for_ms) in CUTS_MS.into_iter().enumerate() {
        let cut_ms = now_ms();
        proxy.cut();
        let down = f
            .cloud()
            .wait_for_log_count("member down peer=edge-1", round + 1, NODE_READY)
            .await
            .unwrap_or_else(|e| panic!("cloud: {e}"));
        let edge_down = f.edges[0]
            .wait_log_count("member down peer=cloud-1", round + 1)
            .await;
        detected.push((
            field(&down, "since_ms").saturating_sub(cut_ms),
            field(&edge_down, "since_ms").saturating_sub(cut_ms),
        ));
        // This sleep is the partition itself, not a wait for an event.
        let elapsed = now_ms().saturating_sub(cut_ms);
        tokio::time::sleep(Duration::from_millis(cut_for_ms.saturating_sub(elapsed))).await;

        let heal_ms = now_ms();
        proxy.heal();
        let up = f
            .cloud()
            .wait_for_log_count("member up peer=edge-1", round + 2, NODE_READY)
            .await
            .unwrap_or_else(|e| panic!("cloud: {e}"));
        let edge_up = f.edges[0]
            .wait_log_count("member up peer=cloud-1", round + 2)
            .await;
        rejoined.push((
            field(&up, "since_ms").saturating_sub(heal_ms),
            field(&edge_up, "since_ms").saturating_sub(heal_ms),
        ));
        f.cloud()
            .wait_for_log_count("control call answered peer=edge-1", round + 2, NODE_READY)
            .await
            .unwrap_or_else(|e| panic!("cloud: {e}"));
    }
    eprintln!(
        "(cloud, edge) ms from the cut to member down: {detected:?}; \
         from the heal to member up: {rejoined:?}"
    );

    // The other edge never noticed.
    let cloud_log = std::fs::read_to_string(f.cloud().log_path()).expect("reading the cloud log");
    assert!(
        !cloud_log.contains("member down peer=edge-2"),
        "edge-2 went down though its link was never cut"
    );
    assert!(proxy.stats().dropped > 0, "the cuts dropped nothing");
    for (round, ((cloud, edge), (cloud_up, edge_up))) in detected.iter().zip(&rejoined).enumerate()
    {
        assert!(
            *cloud < DOWN_DETECTION_MAX_MS && *edge < DOWN_DETECTION_MAX_MS,
            "round {round}: the partition was noticed after {cloud} ms (cloud), {edge} ms (edge)"
        );
        assert!(
            *cloud_up < REJOIN_MAX_MS && *edge_up < REJOIN_MAX_MS,
            "round {round}: rejoined {cloud_up} ms (cloud), {edge_up} ms (edge) after the heal"
        );
    }
}

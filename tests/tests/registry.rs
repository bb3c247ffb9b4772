//! The fleet registry against a real Kafka and real node processes:
//! `node fleet revoke` closes the revoked edge's live connection and every
//! reconnect of it is refused, while the other edge flows; a cloud node
//! restarted from nothing rebuilds the registry from its topic and still
//! refuses it; `suspend` and `resume` do the same, for a while.

use std::time::{Duration, Instant};

use serde_json::Value;
use tributary_tests::broker::{shared_bootstrap, unique_topic};
use tributary_tests::checker::consume_all;
use tributary_tests::fixture::{Fixture, Workload, NODE_READY};
use tributary_tests::process::node_binary;

const ENDLESS: Workload = Workload {
    devices: 2,
    rate_hz: 20.0,
    readings: 1_000_000,
};
/// Bound on a CLI command, and on one event the test waits for.
const WAIT: Duration = Duration::from_secs(60);

/// Runs `node fleet <args>` against `topic`; its stdout.
async fn fleet(bootstrap: &str, topic: &str, args: &[&str]) -> String {
    let mut cmd = std::process::Command::new(node_binary());
    cmd.args([
        "fleet",
        "--kafka-bootstrap",
        bootstrap,
        "--registry-topic",
        topic,
    ])
    .args(args);
    let out = tokio::time::timeout(WAIT, tokio::task::spawn_blocking(move || cmd.output()))
        .await
        .expect("node fleet finishes in time")
        .expect("joining")
        .expect("running node fleet");
    assert!(
        out.status.success(),
        "node fleet {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Readings of `edge` committed to the readings topic.
async fn in_log(f: &Fixture, bootstrap: &str, edge: &str) -> usize {
    consume_all(bootstrap, &f.topic, 0, WAIT)
        .await
        .expect("reading the readings topic")
        .iter()
        .filter(|r| r.edge.as_deref() == Some(edge))
        .count()
}

/// Waits until `edge` has `more` readings in the log than `from`: it
/// flows. (Its outbox takes readings whether or not it is cut off, so its
/// own acknowledgements say nothing of that.)
async fn flows(f: &Fixture, bootstrap: &str, edge: &str, from: usize, more: usize) -> usize {
    let deadline = Instant::now() + WAIT;
    loop {
        let n = in_log(f, bootstrap, edge).await;
        if n >= from + more {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "{edge} did not flow: {n} readings in the log, {from} before{}",
            f.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_edge_is_cut_off_everywhere_and_the_others_flow() {
    let bootstrap = shared_bootstrap();
    let topic = unique_topic("registry");
    let mut f = Fixture::new("registry", &bootstrap, &["edge-1", "edge-2"]);
    f.set_cloud("registry-topic", &topic);
    for i in 0..2 {
        f.workload(i, &ENDLESS);
    }
    f.start_cloud().await;
    for e in &mut f.edges {
        e.start();
    }
    for e in &f.edges {
        e.wait_acked(40, NODE_READY).await;
    }

    // Revoke edge-1: its connection closes, the cloud says why.
    let revoked_at = Instant::now();
    let out = fleet(
        &bootstrap,
        &topic,
        &["revoke", "edge-1", "--reason", "stolen"],
    )
    .await;
    assert!(out.contains("edge-1 is now revoked"), "{out}");
    f.cloud()
        .wait_for_log_line(
            "closing the connection of an edge the registry no longer admits",
            WAIT,
        )
        .await
        .unwrap_or_else(|e| panic!("the cloud did not close edge-1's connection: {e}"));
    let closed_after = revoked_at.elapsed();
    // Its reconnects are refused: nothing more of it is acknowledged, while
    // edge-2 goes on.
    f.cloud()
        .wait_for_log_line(
            "refusing a connection of an edge the registry does not admit",
            WAIT,
        )
        .await
        .unwrap_or_else(|e| panic!("edge-1 did not try again, or was let in: {e}"));
    let edge1_after = in_log(&f, &bootstrap, "edge-1").await;
    let edge2 = in_log(&f, &bootstrap, "edge-2").await;
    flows(&f, &bootstrap, "edge-2", edge2, 60).await;
    assert_eq!(
        in_log(&f, &bootstrap, "edge-1").await,
        edge1_after,
        "a revoked edge's readings reached the log"
    );

    // A cloud node restarted from nothing reads the registry first.
    f.cloud().kill9().expect("killing the cloud");
    f.start_cloud().await;
    f.cloud()
        .wait_for_log_line(
            "refusing a connection of an edge the registry does not admit",
            WAIT,
        )
        .await
        .unwrap_or_else(|e| panic!("the restarted cloud let edge-1 in: {e}"));
    let edge2 = in_log(&f, &bootstrap, "edge-2").await;
    flows(&f, &bootstrap, "edge-2", edge2, 60).await;
    assert_eq!(
        in_log(&f, &bootstrap, "edge-1").await,
        edge1_after,
        "the restarted cloud admitted a revoked edge"
    );

    // Revocation is for good; suspension is not.
    let mut cmd = std::process::Command::new(node_binary());
    cmd.args([
        "fleet",
        "--kafka-bootstrap",
        &bootstrap,
        "--registry-topic",
        &topic,
        "resume",
        "edge-1",
    ]);
    let out = cmd.output().expect("running node fleet resume");
    assert!(
        !out.status.success(),
        "resuming a revoked edge must be refused"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("revoked"),
        "{out:?}"
    );

    fleet(
        &bootstrap,
        &topic,
        &["suspend", "edge-2", "--reason", "maintenance"],
    )
    .await;
    f.cloud()
        .wait_for_log_count(
            "closing the connection of an edge the registry no longer admits",
            1,
            WAIT,
        )
        .await
        .unwrap_or_else(|e| panic!("the cloud did not close edge-2's connection: {e}"));
    fleet(&bootstrap, &topic, &["resume", "edge-2"]).await;
    let edge2 = in_log(&f, &bootstrap, "edge-2").await;
    flows(&f, &bootstrap, "edge-2", edge2, 60).await;

    let listed: Value = serde_json::from_str(&fleet(&bootstrap, &topic, &["--json", "list"]).await)
        .expect("fleet list --json is JSON");
    let status = |id: &str| {
        listed
            .as_array()
            .and_then(|a| a.iter().find(|e| e["id"] == id))
            .map(|e| e["status"].as_str().unwrap_or("?").to_owned())
    };
    assert_eq!(status("edge-1").as_deref(), Some("revoked"), "{listed:#}");
    assert_eq!(status("edge-2").as_deref(), Some("active"), "{listed:#}");
    println!("revocation: edge-1's connection closed {closed_after:?} after `node fleet revoke` began (the command's own start included)");
}

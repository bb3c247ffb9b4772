//! Several cloud nodes: three cloud nodes and four edges, each edge given all
//! three. Mid-stream one cloud node is killed (-9) and later another is
//! frozen (SIGSTOP) for longer than the transaction timeout, then thawed: its
//! late commits must be refused (its shard writers were fenced by the node
//! that took the shards over). The edges fail over, the readings topic read
//! `read_committed` holds every acknowledged reading once and in order, and
//! the time from each fault to each moved edge streaming again is printed.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tributary_tests::broker::shared_bootstrap;
use tributary_tests::fixture::{assert_exactly_once, Fixture, Workload, NODE_READY};

const EDGES: [&str; 4] = ["edge-1", "edge-2", "edge-3", "edge-4"];
const LOAD: Workload = Workload {
    devices: 5,
    rate_hz: 50.0,
    readings: 1500,
};
/// Longer than the fixture's transaction timeout (10 s), so that the broker
/// aborts the frozen node's open transactions and its writers are fenced.
const FREEZE: Duration = Duration::from_secs(12);
/// Bound on all readings being acknowledged after the faults.
const ALL_ACKED: Duration = Duration::from_secs(120);

/// Seconds since midnight UTC of a log line's tracing timestamp.
fn line_time_s(line: &str) -> Option<f64> {
    let time = line.split_whitespace().next()?.split_once('T')?.1;
    let mut parts = time.trim_end_matches('Z').split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

fn now_s() -> f64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970");
    (d.as_secs_f64()) % 86_400.0
}

/// The cloud address of each edge's newest "uplink connected" line.
fn placement(f: &Fixture) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in &f.edges {
        let log = std::fs::read_to_string(e.process.as_ref().expect("running").log_path())
            .expect("reading the edge's log");
        let cloud = log
            .lines()
            .rev()
            .find(|l| l.contains("uplink connected"))
            .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("cloud=")))
            .map(str::to_owned);
        if let Some(c) = cloud {
            out.insert(e.id.clone(), c);
        }
    }
    out
}

/// The cloud node (by address) that most edges are on.
fn busiest(placement: &BTreeMap<String, String>, alive: &[String]) -> String {
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for c in placement.values() {
        *count.entry(c.as_str()).or_default() += 1;
    }
    alive
        .iter()
        .max_by_key(|a| count.get(a.as_str()).copied().unwrap_or(0))
        .expect("a live cloud node")
        .clone()
}

/// Waits until every edge that was on `cloud` streams again, and returns
/// each one's seconds from `fault_s` to its next "uplink streaming" line.
async fn failovers(
    f: &mut Fixture,
    before: &BTreeMap<String, String>,
    cloud: &str,
    streamed: &BTreeMap<String, usize>,
    fault_s: f64,
) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for e in &mut f.edges {
        if before.get(&e.id).map(String::as_str) != Some(cloud) {
            continue;
        }
        let n = streamed[&e.id] + 1;
        let line = e.wait_log_count("uplink streaming", n).await;
        let at = line_time_s(&line).expect("a timestamped line");
        let mut took = at - fault_s;
        if took < -43_200.0 {
            took += 86_400.0;
        }
        out.push((e.id.clone(), took));
    }
    out
}

fn streamed_counts(f: &Fixture) -> BTreeMap<String, usize> {
    f.edges
        .iter()
        .map(|e| {
            let log = std::fs::read_to_string(e.process.as_ref().expect("running").log_path())
                .expect("reading the edge's log");
            let n = log
                .lines()
                .filter(|l| l.contains("uplink streaming"))
                .count();
            (e.id.clone(), n)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_fail_over_across_three_cloud_nodes_through_a_kill_and_a_freeze() {
    let mut f = Fixture::new("failover", &shared_bootstrap(), &EDGES);
    f.add_clouds(2);
    for i in 0..EDGES.len() {
        f.workload(i, &LOAD);
        f.edges[i].set("cloud-return-after-ms", "0");
    }
    f.start_cloud().await;
    f.start_more_cloud(0).await;
    f.start_more_cloud(1).await;
    for e in &mut f.edges {
        e.start();
    }
    for e in &mut f.edges {
        e.wait_log("uplink streaming").await;
        e.wait_acked(200, NODE_READY).await;
    }
    let mut alive: Vec<String> = std::iter::once(f.cloud_addr)
        .chain(f.more_clouds.iter().map(|c| c.addr))
        .map(|a| a.to_string())
        .collect();

    // 1. kill -9 the cloud node holding the most edges.
    let before = placement(&f);
    let victim = busiest(&before, &alive);
    let streamed = streamed_counts(&f);
    let fault_s = now_s();
    kill_cloud(&mut f, &victim, Fault::Kill);
    alive.retain(|a| *a != victim);
    let killed = failovers(&mut f, &before, &victim, &streamed, fault_s).await;

    // 2. freeze the busiest of the other two past the transaction timeout.
    let before = placement(&f);
    let frozen = busiest(&before, &alive);
    let streamed = streamed_counts(&f);
    let fault_s = now_s();
    kill_cloud(&mut f, &frozen, Fault::Stop);
    let moved = failovers(&mut f, &before, &frozen, &streamed, fault_s).await;
    tokio::time::sleep(
        FREEZE.saturating_sub(Duration::from_secs_f64((now_s() - fault_s).max(0.0))),
    )
    .await;
    kill_cloud(&mut f, &frozen, Fault::Cont);

    for e in &f.edges {
        e.wait_acked(LOAD.total(), ALL_ACKED).await;
    }
    let report = f.check().await;
    println!("failover: after the kill -9 of {victim}: {killed:?} s; after the SIGSTOP of {frozen}: {moved:?} s; {report}");
    assert_exactly_once(&report);
    assert_eq!(report.acked, EDGES.len() * LOAD.total(), "{report}");
    assert!(!killed.is_empty(), "the killed cloud node held no edge");
    assert!(!moved.is_empty(), "the frozen cloud node held no edge");
}

enum Fault {
    Kill,
    Stop,
    Cont,
}

fn kill_cloud(f: &mut Fixture, addr: &str, fault: Fault) {
    let p = if f.cloud_addr.to_string() == addr {
        f.cloud.as_mut().expect("cloud-1 running")
    } else {
        f.more_clouds
            .iter_mut()
            .find(|c| c.addr.to_string() == addr)
            .and_then(|c| c.process.as_mut())
            .expect("a running cloud node at that address")
    };
    match fault {
        Fault::Kill => p.kill9(),
        Fault::Stop => p.sigstop(),
        Fault::Cont => p.sigcont(),
    }
    .expect("signalling the cloud node");
}

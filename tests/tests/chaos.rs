//! A short real-process chaos run for CI: a cloud and two edges behind fault proxies
//! against the shared Kafka, 25 s of seeded faults, then the exactly-once check.

use std::time::Duration;

use tributary_tests::broker::shared_bootstrap;
use tributary_tests::chaos::{run_chaos, schedule, ChaosConfig};

/// Its schedule (see `chaos --seed 48 --duration-s 25 --plan-only`) kills both edges and
/// the cloud, partitions an edge, adds loss and freezes the cloud.
const SEED: u64 = 48;
const FAULT_PHASE_S: u64 = 25;
/// Setup, the fault phase, the drain budget and the final read, with room to spare.
const RUN_BUDGET: Duration = Duration::from_secs(150);

fn config() -> ChaosConfig {
    ChaosConfig {
        seed: SEED,
        duration_s: FAULT_PHASE_S,
        edges: 2,
        devices_per_edge: 8,
        interval_ms: 50,
        drain_timeout_s: 45,
        ..ChaosConfig::with_bootstrap(shared_bootstrap())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_faults_on_real_processes_keep_exactly_once() {
    let cfg = config();
    let planned = schedule(&cfg);
    let outcome = tokio::time::timeout(RUN_BUDGET, run_chaos(cfg, |line| eprintln!("{line}")))
        .await
        .expect("the chaos run finished within its budget")
        .unwrap_or_else(|e| panic!("the harness failed: {e}"));
    eprintln!("{outcome}");
    assert!(outcome.passed(), "{outcome}");
    assert!(outcome.report.is_exactly_once(), "{outcome}");

    // The faults really happened, so that a run that injected nothing cannot pass.
    assert_eq!(outcome.faults.len(), planned.len(), "{outcome}");
    assert!(outcome.count("kill-edge") >= 1, "{outcome}");
    assert!(outcome.count("kill-cloud") >= 1, "{outcome}");
    assert!(outcome.count("partition") >= 1, "{outcome}");
    assert!(outcome.count("stop-cloud") >= 1, "{outcome}");
    for f in &outcome.faults {
        if f.fault.kind.is_kill() {
            assert!(f.detail.contains("restarted as pid"), "{}", f.detail);
        }
    }
    assert!(
        outcome.datagrams_dropped > 0,
        "the proxies dropped nothing:\n{outcome}"
    );

    // 2 edges x 8 devices x 20 Hz x 25 s is 8,000 readings; kills and the frozen cloud
    // cost some, a stalled pipeline would cost most.
    let floor = 4_000;
    assert!(
        outcome.acked >= floor,
        "only {} acked:\n{outcome}",
        outcome.acked
    );
    assert_eq!(outcome.missing, 0, "{outcome}");
    assert!(outcome.distinct >= outcome.acked, "{outcome}");
    assert!(outcome.drain_ms.is_some(), "{outcome}");
}

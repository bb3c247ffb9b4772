//! Many seeds of one scenario (or of `random`), spread over threads.
//!
//! Each run is deterministic on its own thread: turmoil keeps its world per
//! thread, and every run names its actors uniquely, so runs in parallel do
//! not meet.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::world::{run, MqttFigures, RunSpec};

/// The most failures a swarm keeps the details of; it counts the rest.
pub const FAILURES_KEPT_MAX: usize = 20;

/// One failed seed.
#[derive(Debug, Clone)]
pub struct Failure {
    pub seed: u64,
    pub violation: String,
    pub replay: String,
}

/// What a swarm saw.
#[derive(Debug, Clone, Default)]
pub struct SwarmSummary {
    pub seeds: u64,
    pub passed: u64,
    pub failed: u64,
    pub failures: Vec<Failure>,
    pub readings_acked: u64,
    pub faults: u64,
    pub edge_crashes: u64,
    pub cloud_crashes: u64,
    pub simulated: Duration,
    pub wall: Duration,
    /// The longest drain after faults, and its seed.
    pub drain_ms_max: (u64, u64),
    /// Seeds with MQTT-fed edges, and what their brokers and sources saw.
    pub mqtt_seeds: u64,
    pub mqtt: MqttFigures,
}

impl SwarmSummary {
    pub fn seeds_per_minute(&self) -> f64 {
        self.seeds as f64 / self.wall.as_secs_f64().max(1e-9) * 60.0
    }

    pub fn speedup(&self) -> f64 {
        self.simulated.as_secs_f64() / self.wall.as_secs_f64().max(1e-9)
    }
}

/// Runs `seeds` (first_seed..first_seed+seeds) of `base` on `threads`
/// threads; `progress` is called after each run with (done, failed).
pub fn swarm(
    base: &RunSpec,
    first_seed: u64,
    seeds: u64,
    threads: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> SwarmSummary {
    let started = Instant::now();
    let next = AtomicU64::new(first_seed);
    let end = first_seed + seeds;
    let done = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let summary = Mutex::new(SwarmSummary::default());
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, Relaxed);
                if seed >= end {
                    return;
                }
                let mut spec = base.clone();
                spec.seed = seed;
                let outcome = run(&spec);
                let f = &outcome.figures;
                let mut sum = summary.lock().expect("summary lock");
                sum.seeds += 1;
                sum.readings_acked += f.readings_acked;
                sum.faults += f.faults;
                sum.edge_crashes += f.edge_crashes;
                sum.cloud_crashes += f.cloud_crashes;
                sum.simulated += Duration::from_millis(f.simulated_ms);
                if f.mqtt_edges > 0 {
                    sum.mqtt_seeds += 1;
                    sum.mqtt.add(&f.mqtt);
                }
                if let Some(d) = f.drain_ms {
                    if d > sum.drain_ms_max.0 {
                        sum.drain_ms_max = (d, seed);
                    }
                }
                match outcome.verdict {
                    Ok(()) => sum.passed += 1,
                    Err(v) => {
                        sum.failed += 1;
                        failed.fetch_add(1, Relaxed);
                        if sum.failures.len() < FAILURES_KEPT_MAX {
                            sum.failures.push(Failure {
                                seed,
                                violation: v.to_string(),
                                replay: outcome.replay,
                            });
                        }
                    }
                }
                drop(sum);
                let d = done.fetch_add(1, Relaxed) + 1;
                progress(d, failed.load(Relaxed));
            });
        }
    });
    let mut summary = summary.into_inner().expect("summary lock");
    summary.failures.sort_by_key(|f| f.seed);
    summary.wall = started.elapsed();
    summary
}

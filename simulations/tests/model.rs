//! Model-based checks of the outbox and uplink cores: random sequences of
//! appends, commits, acks, disconnects, edge and cloud crashes (with lost and
//! torn writes), disk and log outages, each checked against the simple model
//! "every acknowledged reading is in the log once, in device order".

use tributary_simulations::model::{run_seed, Mutation, Sim, SimConfig, Violation};

/// Seeds per test run; each seed is a different configuration and schedule.
const SEEDS: u64 = 300;
const STEPS: usize = 3_000;

#[test]
fn every_seed_keeps_exactly_once_and_drains() {
    let mut acked = 0;
    let mut crashes = 0;
    for seed in 0..SEEDS {
        match run_seed(seed, STEPS) {
            Ok(r) => {
                acked += r.readings_acked;
                crashes += r.edge_crashes + r.cloud_crashes;
            }
            Err(v) => panic!(
                "seed {seed} broke an invariant: {v}\nreplay: cargo test -p tributary-simulations --test model -- replay_one --nocapture (with SIM_SEED={seed})"
            ),
        }
    }
    // The runs must actually exercise the system, or passing means nothing.
    assert!(
        acked > SEEDS as usize * 50,
        "only {acked} readings acked over {SEEDS} seeds"
    );
    assert!(
        crashes > SEEDS as usize,
        "only {crashes} crashes over {SEEDS} seeds"
    );
}

#[test]
fn a_seed_replays_to_the_same_trace() {
    for seed in [1, 7, 42] {
        let a = run_seed(seed, STEPS).unwrap();
        let b = run_seed(seed, STEPS).unwrap();
        assert_eq!(a, b, "seed {seed} is not deterministic");
    }
    assert_ne!(
        run_seed(1, STEPS).unwrap().trace_hash,
        run_seed(2, STEPS).unwrap().trace_hash
    );
}

/// Replays the seed in SIM_SEED, printing its report: the command a failure
/// message names.
#[test]
fn replay_one() {
    let Ok(seed) = std::env::var("SIM_SEED") else {
        return;
    };
    let seed: u64 = seed.parse().expect("SIM_SEED is a number");
    let mut cfg = SimConfig::from_seed(seed, STEPS);
    cfg.verbose = true;
    println!("{cfg:#?}");
    println!("{:#?}", Sim::new(cfg).run());
}

/// Seeds within which a deliberately broken variant must be caught.
const TEETH_SEEDS_MAX: u64 = 50;

fn first_failing_seed(mutation: Mutation) -> Option<(u64, Violation)> {
    (0..TEETH_SEEDS_MAX).find_map(|seed| {
        let mut cfg = SimConfig::from_seed(seed, STEPS);
        cfg.mutation = Some(mutation);
        Sim::new(cfg).run().err().map(|v| (seed, v))
    })
}

#[test]
fn acking_before_the_fsync_shows_up_as_lost_readings() {
    let (seed, v) = first_failing_seed(Mutation::AckBeforeFsync)
        .expect("acking before the fsync went unnoticed");
    assert!(matches!(v, Violation::Lost(_)), "seed {seed}: {v}");
}

#[test]
fn forgetting_the_high_water_mark_shows_up_as_duplicates() {
    let (seed, v) =
        first_failing_seed(Mutation::ForgetHwm).expect("forgetting the mark went unnoticed");
    assert!(matches!(v, Violation::Duplicated(..)), "seed {seed}: {v}");
}

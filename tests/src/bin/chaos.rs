//! `chaos`: a seeded chaos run against real `node` processes and a real Kafka.
//!
//! ```text
//! cargo build -p tributary-node
//! TRIBUTARY_KAFKA_BOOTSTRAP=127.0.0.1:29092 \
//!   cargo run -p tributary-tests --bin chaos -- --seed 7 --duration-s 60 --edges 2
//! ```
//!
//! Prints each fault as it happens, then a summary. Exit code 0: every invariant held;
//! 1: an invariant was violated (the summary names the replay command); 2: the harness
//! itself failed or the flags are wrong.

use std::process::ExitCode;

use clap::Parser;
use tributary_tests::broker::BOOTSTRAP_ENV;
use tributary_tests::chaos::{run_chaos, ChaosConfig};

#[derive(Debug, Parser)]
#[command(
    name = "chaos",
    about = "Seeded faults (partitions, loss, delay, SIGKILL, SIGSTOP) against real nodes \
             and a real Kafka, then an exactly-once check"
)]
struct Args {
    /// Decides the whole fault schedule.
    #[arg(long, default_value_t = ChaosConfig::default().seed)]
    seed: u64,
    /// Length of the fault phase.
    #[arg(long, default_value_t = ChaosConfig::default().duration_s)]
    duration_s: u64,
    #[arg(long, default_value_t = ChaosConfig::default().edges)]
    edges: usize,
    #[arg(long, default_value_t = ChaosConfig::default().devices_per_edge)]
    devices_per_edge: usize,
    /// Each simulated device sends one reading per interval.
    #[arg(long, default_value_t = ChaosConfig::default().interval_ms)]
    interval_ms: u64,
    /// After the heal, how long the devices may take to finish and Kafka to hold every
    /// acknowledged reading.
    #[arg(long, default_value_t = ChaosConfig::default().drain_timeout_s)]
    drain_timeout_s: u64,
    /// Keep the nodes' logs, ack logs and outboxes even when the run passes.
    #[arg(long)]
    keep_logs: bool,
    /// Kafka bootstrap servers.
    #[arg(long, env = BOOTSTRAP_ENV)]
    kafka_bootstrap: Option<String>,
    /// Only print the fault schedule of this seed; run nothing.
    #[arg(long)]
    plan_only: bool,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = Args::parse();
    let cfg = ChaosConfig {
        seed: args.seed,
        duration_s: args.duration_s,
        edges: args.edges,
        devices_per_edge: args.devices_per_edge,
        interval_ms: args.interval_ms,
        drain_timeout_s: args.drain_timeout_s,
        keep_logs: args.keep_logs,
        bootstrap: args.kafka_bootstrap.unwrap_or_default(),
    };
    if args.plan_only {
        for fault in tributary_tests::chaos::schedule(&cfg) {
            println!("{fault}");
        }
        return ExitCode::SUCCESS;
    }
    if cfg.bootstrap.trim().is_empty() {
        eprintln!(
            "chaos: {BOOTSTRAP_ENV} is not set: run scripts/test.sh, which starts Kafka \
             (or start one with scripts/kafka.sh start DIR PORT CONTROLLER_PORT and export \
             {BOOTSTRAP_ENV}=127.0.0.1:PORT), or pass --kafka-bootstrap"
        );
        return ExitCode::from(2);
    }
    let seed = cfg.seed;
    let run = run_chaos(cfg, |line| println!("{line}"));
    let result = tokio::select! {
        result = run => result,
        // Returning drops the run, which kills the nodes; their files stay behind.
        why = interrupted() => {
            eprintln!("chaos: {why} (seed {seed}); the nodes are killed, their files kept");
            return ExitCode::from(130);
        }
    };
    match result {
        Ok(outcome) => {
            print!("\n{outcome}");
            if outcome.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("chaos: {e}");
            ExitCode::from(2)
        }
    }
}

/// Resolves on SIGINT or SIGTERM, naming which.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return "interrupted";
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = term.recv() => "terminated",
    }
}

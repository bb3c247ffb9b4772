//! `sim`: runs deterministic simulations of an edge/cloud cluster.
//!
//! ```text
//! sim run --scenario partition-flap --seed 7 --report flap.html
//! sim run --scenario mqtt --seed 3 --mqtt-broker mosquitto-2.0.11 --mqtt-link overflow
//! sim run --scenario mqtt --seed 0 --mutation dedup-device-ts
//! sim swarm --seeds 1000
//! sim scenarios
//! ```
//!
//! MQTT-fed edges run the real MQTT source against a simulated broker whose
//! publishers send bursts of readings sharing a millisecond; their readings
//! are checked by (device, n), `n` being each publisher's sequence number.
//! The `mqtt` scenario feeds every edge so (with edge crashes, MQTT cuts and
//! uplink partitions), `random` lets each seed decide, `--mqtt all` feeds
//! every edge in any scenario. The seed picks the broker's in-flight
//! window, whether it refills it at every PUBACK (Mosquitto 2.0.11), and
//! whether the link holds back or overflows when the source is full;
//! `--mqtt-window`, `--mqtt-broker` and `--mqtt-link` override it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tributary_actors::outbox::FullPolicy;
use tributary_simulations::report::{render_html, render_svg};
use tributary_simulations::swarm::swarm;
use tributary_simulations::{run, MqttEdges, Mutation, Params, RunSpec, Scenario};

#[derive(Parser)]
#[command(
    name = "sim",
    about = "Deterministic simulations of a Tributary cluster"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs one seed and checks every invariant; a failure prints its replay.
    Run {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Writes a picture of the run: `.html` (with figures) or `.svg`.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Logs what the actors do (tracing at info; RUST_LOG overrides).
        #[arg(long)]
        verbose: bool,
    },
    /// Runs many seeds in parallel and summarises them.
    Swarm {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 100)]
        seeds: u64,
        #[arg(long, default_value_t = 0)]
        first_seed: u64,
        /// Threads; defaults to the machine's cores.
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Lists the scenarios.
    Scenarios,
}

#[derive(Args, Clone)]
struct Common {
    /// One of `sim scenarios`.
    #[arg(long, default_value = "random")]
    scenario: String,
    #[arg(long)]
    edges: Option<usize>,
    #[arg(long)]
    devices_per_edge: Option<usize>,
    #[arg(long)]
    rate_hz: Option<f64>,
    /// Simulated seconds of faults (the safety phase).
    #[arg(long)]
    faults_s: Option<u64>,
    /// Length of each outage, for scenarios with outages.
    #[arg(long)]
    outage_s: Option<u64>,
    /// Number of outages, for scenarios with outages.
    #[arg(long)]
    outages: Option<usize>,
    /// Simulated seconds allowed for the backlog to drain once faults stop.
    #[arg(long)]
    drain_budget_s: Option<u64>,
    /// Overrides the seed's choice of outbox budget.
    #[arg(long)]
    outbox_bytes_max: Option<u64>,
    /// Overrides the seed's choice of what a full outbox does: block or drop-oldest.
    #[arg(long)]
    full_policy: Option<String>,
    /// Runs a deliberately broken variant: ack-before-fsync, forget-hwm,
    /// dedup-device-ts (an MQTT message whose (device, ts) was seen before
    /// is acked and dropped: the MQTT source's old rule) or
    /// acks-lost-on-reconnect (the MQTT link drops the acks given just
    /// before a reconnect, as TcpLink does).
    #[arg(long)]
    mutation: Option<String>,
    /// Which edges a simulated MQTT broker feeds: scenario (every edge in
    /// `mqtt`, the seed's choice in `random`, none elsewhere), all or none.
    #[arg(long)]
    mqtt: Option<String>,
    /// Bursts per second of each MQTT publisher (default 4).
    #[arg(long)]
    mqtt_rate_hz: Option<f64>,
    /// Messages per burst, 1 to this many, sharing one `ts` (default 4).
    #[arg(long)]
    mqtt_burst_max: Option<u32>,
    /// The broker's in-flight window (Mosquitto's max_inflight_messages);
    /// by default the seed picks it.
    #[arg(long)]
    mqtt_window: Option<usize>,
    /// The broker: mosquitto (keeps its window) or mosquitto-2.0.11
    /// (refills a whole window at every PUBACK); by default the seed picks.
    #[arg(long)]
    mqtt_broker: Option<String>,
    /// The MQTT link out of permits: back-pressure (stops reading) or
    /// overflow (reports Overflow, the source reconnects); by default the
    /// seed picks.
    #[arg(long)]
    mqtt_link: Option<String>,
    /// Whether an MQTT-fed edge's outbox budget gets room for the source's
    /// redelivery records (true by default); false sizes it for readings
    /// alone.
    #[arg(long)]
    mqtt_records_room: Option<bool>,
}

impl Common {
    fn spec(&self, subcommand: &str) -> Result<RunSpec, String> {
        let scenario = Scenario::from_name(&self.scenario).ok_or_else(|| {
            format!(
                "unknown scenario {:?}; `sim scenarios` lists them",
                self.scenario
            )
        })?;
        let mutation = match &self.mutation {
            Some(m) => Some(Mutation::from_name(m).ok_or_else(|| {
                format!(
                    "unknown mutation {m:?}: ack-before-fsync, forget-hwm, dedup-device-ts or \
                     acks-lost-on-reconnect"
                )
            })?),
            None => None,
        };
        let full_policy = match self.full_policy.as_deref() {
            None => None,
            Some("block") => Some(FullPolicy::Block),
            Some("drop-oldest") => Some(FullPolicy::DropOldest),
            Some(other) => {
                return Err(format!(
                    "unknown --full-policy {other:?}: block or drop-oldest"
                ))
            }
        };
        let mqtt = match self.mqtt.as_deref() {
            None => MqttEdges::Scenario,
            Some(m) => MqttEdges::from_name(m)
                .ok_or_else(|| format!("unknown --mqtt {m:?}: scenario, all or none"))?,
        };
        let mqtt_refill_on_ack = match self.mqtt_broker.as_deref() {
            None => None,
            Some("mosquitto") => Some(false),
            Some("mosquitto-2.0.11") => Some(true),
            Some(other) => {
                return Err(format!(
                    "unknown --mqtt-broker {other:?}: mosquitto or mosquitto-2.0.11"
                ))
            }
        };
        let mqtt_overflow = match self.mqtt_link.as_deref() {
            None => None,
            Some("back-pressure") => Some(false),
            Some("overflow") => Some(true),
            Some(other) => {
                return Err(format!(
                    "unknown --mqtt-link {other:?}: back-pressure or overflow"
                ))
            }
        };
        let d = Params::default();
        let params = Params {
            edges: self.edges.unwrap_or(d.edges),
            devices_per_edge: self.devices_per_edge.unwrap_or(d.devices_per_edge),
            rate_hz: self.rate_hz.unwrap_or(d.rate_hz),
            faults_s: self.faults_s.unwrap_or(d.faults_s),
            outage_s: self.outage_s.unwrap_or(d.outage_s),
            outages: self.outages.unwrap_or(d.outages),
            drain_budget_s: self.drain_budget_s.unwrap_or(d.drain_budget_s),
            outbox_bytes_max: self.outbox_bytes_max,
            full_policy,
            mqtt,
            mqtt_rate_hz: self.mqtt_rate_hz.unwrap_or(d.mqtt_rate_hz),
            mqtt_burst_max: self.mqtt_burst_max.unwrap_or(d.mqtt_burst_max),
            mqtt_window: self.mqtt_window,
            mqtt_refill_on_ack,
            mqtt_overflow,
            mqtt_records_room: self.mqtt_records_room.unwrap_or(d.mqtt_records_room),
        };
        if params.edges == 0 || params.devices_per_edge == 0 {
            return Err("--edges and --devices-per-edge must be at least 1".into());
        }
        if !(params.rate_hz > 0.0 && params.rate_hz <= 1000.0) {
            return Err("--rate-hz must be above 0 and at most 1000".into());
        }
        if !(params.mqtt_rate_hz > 0.0 && params.mqtt_rate_hz <= 500.0) {
            return Err("--mqtt-rate-hz must be above 0 and at most 500".into());
        }
        if !(1..=1000).contains(&params.mqtt_burst_max) {
            return Err("--mqtt-burst-max must be 1 to 1000".into());
        }
        if params.mqtt_window == Some(0) {
            return Err("--mqtt-window must be at least 1".into());
        }
        let mut spec = RunSpec::new(scenario, 0);
        spec.params = params;
        spec.mutation = mutation;
        // The replay line repeats every option given, so it replays exactly.
        let mut command =
            format!("cargo run -p tributary-simulations --release -- run --scenario {scenario}");
        let flags: [(&str, Option<String>); 17] = [
            ("--edges", self.edges.map(|v| v.to_string())),
            (
                "--devices-per-edge",
                self.devices_per_edge.map(|v| v.to_string()),
            ),
            ("--rate-hz", self.rate_hz.map(|v| v.to_string())),
            ("--faults-s", self.faults_s.map(|v| v.to_string())),
            ("--outage-s", self.outage_s.map(|v| v.to_string())),
            ("--outages", self.outages.map(|v| v.to_string())),
            (
                "--drain-budget-s",
                self.drain_budget_s.map(|v| v.to_string()),
            ),
            (
                "--outbox-bytes-max",
                self.outbox_bytes_max.map(|v| v.to_string()),
            ),
            ("--full-policy", self.full_policy.clone()),
            ("--mutation", self.mutation.clone()),
            ("--mqtt", self.mqtt.clone()),
            ("--mqtt-rate-hz", self.mqtt_rate_hz.map(|v| v.to_string())),
            (
                "--mqtt-burst-max",
                self.mqtt_burst_max.map(|v| v.to_string()),
            ),
            ("--mqtt-window", self.mqtt_window.map(|v| v.to_string())),
            ("--mqtt-broker", self.mqtt_broker.clone()),
            ("--mqtt-link", self.mqtt_link.clone()),
            (
                "--mqtt-records-room",
                self.mqtt_records_room.map(|v| v.to_string()),
            ),
        ];
        for (flag, value) in flags {
            if let Some(v) = value {
                command.push_str(&format!(" {flag} {v}"));
            }
        }
        let _ = subcommand;
        spec.command = command;
        Ok(spec)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Scenarios => {
            for s in Scenario::ALL {
                println!("{:<16} {}", s.name(), s.description());
            }
            ExitCode::SUCCESS
        }
        Command::Run {
            common,
            seed,
            report,
            verbose,
        } => {
            if verbose {
                let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
                tracing_subscriber::fmt().with_env_filter(filter).init();
            }
            let mut spec = match common.spec("run") {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("sim: {e}");
                    return ExitCode::from(2);
                }
            };
            spec.seed = seed;
            let outcome = run(&spec);
            let f = &outcome.figures;
            for (name, value) in &outcome.timeline.figures {
                println!("{name:<42} {value}");
            }
            println!("{:<42} {:016x}", "trace hash", outcome.trace_hash);
            if let Some(path) = report {
                let body = if path.extension().is_some_and(|e| e == "svg") {
                    render_svg(&outcome.timeline)
                } else {
                    render_html(&outcome.timeline)
                };
                match std::fs::write(&path, body) {
                    Ok(()) => println!("report: {}", path.display()),
                    Err(e) => eprintln!("sim: writing the report {}: {e}", path.display()),
                }
            }
            match outcome.verdict {
                Ok(()) => {
                    println!(
                        "passed: {} readings acknowledged, every one in the log once, in order; drained {} ms after the faults",
                        f.readings_acked,
                        f.drain_ms.unwrap_or(0)
                    );
                    if f.mqtt_edges > 0 {
                        println!(
                            "        {} MQTT messages accepted by the brokers, every one in the log once, in order",
                            f.mqtt.accepted
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(v) => {
                    println!("FAILED (seed {}): {v}", outcome.spec_seed);
                    println!("replay: {}", outcome.replay);
                    ExitCode::FAILURE
                }
            }
        }
        Command::Swarm {
            common,
            seeds,
            first_seed,
            threads,
        } => {
            let spec = match common.spec("swarm") {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("sim: {e}");
                    return ExitCode::from(2);
                }
            };
            let threads = threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let bar = ProgressBar::new(seeds);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} seeds  {msg}  [{elapsed_precise}, eta {eta}]",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            let progress = |_done: u64, failed: u64| {
                bar.inc(1);
                bar.set_message(format!("{failed} failed"));
            };
            let s = swarm(&spec, first_seed, seeds, threads, &progress);
            bar.finish();
            println!(
                "{} seeds of {}: {} passed, {} failed",
                s.seeds, common.scenario, s.passed, s.failed
            );
            println!(
                "{} readings acknowledged, {} faults ({} edge crashes, {} cloud crashes)",
                s.readings_acked, s.faults, s.edge_crashes, s.cloud_crashes
            );
            println!(
                "{:.0} simulated s in {:.1} wall s on {threads} threads: {:.0}× real time, {:.0} seeds/min",
                s.simulated.as_secs_f64(),
                s.wall.as_secs_f64(),
                s.speedup(),
                s.seeds_per_minute()
            );
            println!(
                "longest drain after faults: {} ms (seed {})",
                s.drain_ms_max.0, s.drain_ms_max.1
            );
            if s.mqtt_seeds > 0 {
                let m = &s.mqtt;
                println!(
                    "{} seeds with MQTT-fed edges: {} messages accepted, {} resent with DUP, \
                     {} redeliveries recognised, {} copies, {} DUP taken as new, {} overflows, \
                     {} refused (queue full)",
                    s.mqtt_seeds,
                    m.accepted,
                    m.resent_dup,
                    m.redeliveries,
                    m.redelivered_copies,
                    m.dup_taken,
                    m.overflow_unacked,
                    m.refused_queue_full
                );
            }
            for f in &s.failures {
                println!(
                    "FAILED seed {}: {}\n  replay: {}",
                    f.seed, f.violation, f.replay
                );
            }
            if s.failed > s.failures.len() as u64 {
                println!("(and {} more failures)", s.failed - s.failures.len() as u64);
            }
            if s.failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

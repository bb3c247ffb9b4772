//! `bench`: Tributary's benchmarks. Speed is only ever reported as a ratio to
//! a baseline measured in the same run (raw sled for the outbox, a raw
//! rdkafka producer for the log), because absolute figures on a shared
//! machine move from one minute to the next. See BENCHMARKS.md.
//!
//! Run in release: `cargo run -p tributary-bench --release -- outbox`.
//! `stages`, `devices` and `mqtt` measure the stages' CPU cost, the memory
//! per device and MQTT ingest against their own baselines; `mqtt-rss` an
//! edge node's memory under MQTT load.

mod devices;
mod drain;
mod e2e;
mod fleet;
mod latency;
mod log;
mod mqtt;
mod mqtt_rss;
mod outbox;
mod registry;
mod stages;
mod stats;
mod workload;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bench",
    about = "Tributary's benchmarks, each against a same-run baseline"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Reps {
    /// Timed runs of each case; the tables give their median, min and max.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Untimed runs of each case first (caches, JIT of the broker, connections).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
}

#[derive(Subcommand)]
enum Command {
    /// The outbox on sled (write with fsync per segment, then drain) against raw sled.
    Outbox {
        #[command(flatten)]
        reps: Reps,
        /// Readings per run; a multiple of every segment size.
        #[arg(long, default_value_t = 200_000)]
        readings: u64,
        /// Segment sizes (readings per segment) to measure.
        #[arg(long, value_delimiter = ',', default_value = "1000,100")]
        segment_sizes: Vec<usize>,
        /// Where the temporary stores go [default: the system's temp dir].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// sled's page cache bound (the node's sled_cache_bytes_max default).
        #[arg(long, default_value_t = 16 * 1024 * 1024)]
        cache_bytes_max: u64,
        /// Segments per drain read (the edge's uplink_inflight_segments_max default).
        #[arg(long, default_value_t = 32)]
        drain_segments: usize,
    },
    /// The Kafka log sink against raw rdkafka producers.
    Log {
        #[command(flatten)]
        reps: Reps,
        /// Kafka bootstrap servers.
        #[arg(long)]
        bootstrap: String,
        /// Readings per run; a multiple of segment_readings × every batch size.
        #[arg(long, default_value_t = 64_000)]
        readings: u64,
        /// Segments per commit to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
        batches: Vec<usize>,
        #[arg(long, default_value_t = 1000)]
        segment_readings: usize,
        /// Partitions of the readings topics (the node's default).
        #[arg(long, default_value_t = 3)]
        partitions: i32,
        /// Keep the benchmark's topics instead of deleting them.
        #[arg(long)]
        keep_topics: bool,
        /// The broker's pid, if it runs here (scripts/kafka.sh writes
        /// DIR/kafka.pid): its CPU per reading is reported too.
        #[arg(long)]
        broker_pid: Option<u32>,
    },
    /// A cloud and an edge `node` process against the raw transactional producer.
    E2e {
        /// Kafka bootstrap servers.
        #[arg(long)]
        bootstrap: String,
        /// The node binary [default: `node` next to this binary, else target/debug/node].
        #[arg(long)]
        node: Option<PathBuf>,
        /// Simulated devices on the edge. Each waits for its reading's commit
        /// before the next, so below segment_readings_max (1000) devices the
        /// rate is devices per commit_interval_ms (50 ms), not the machine's
        /// limit; far above it, the devices' own actors eat the edge's CPU.
        #[arg(long, default_value_t = 1000)]
        devices: usize,
        /// Readings per second per device (at most 1000).
        #[arg(long, default_value_t = 1000.0)]
        rate_hz: f64,
        /// Seconds of flow before the window opens.
        #[arg(long, default_value_t = 8)]
        warmup_s: u64,
        /// Seconds of the measured window.
        #[arg(long, default_value_t = 20)]
        window_s: u64,
        /// Fresh cloud and edge pairs, one window each.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Readings per run of the raw producer baseline.
        #[arg(long, default_value_t = 64_000)]
        baseline_readings: u64,
        /// The broker's pid, if it runs here: its CPU share is reported too.
        #[arg(long)]
        broker_pid: Option<u32>,
        /// Also measure each reading's time from its device to committed
        /// (a read_committed consumer in this process).
        #[arg(long)]
        latency: bool,
    },
    /// Many light edges in this process into one cloud `node` process,
    /// against the raw transactional producer: readings/s, the cloud's CPU
    /// per reading, threads and RSS.
    Fleet {
        /// Kafka bootstrap servers.
        #[arg(long)]
        bootstrap: String,
        /// The node binary [default: `node` next to this binary, else target/debug/node].
        #[arg(long)]
        node: Option<PathBuf>,
        #[arg(long, default_value_t = 1000)]
        edges: usize,
        #[arg(long, default_value_t = 1)]
        devices_per_edge: usize,
        /// Each device's interval between readings.
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
        /// Readings per segment on each edge.
        #[arg(long, default_value_t = 100)]
        segment_readings_max: usize,
        #[arg(long, default_value_t = 10)]
        warmup_s: u64,
        #[arg(long, default_value_t = 20)]
        window_s: u64,
        /// Readings per run of the raw producer baseline.
        #[arg(long, default_value_t = 64_000)]
        baseline_readings: u64,
        /// Also measure each reading's time from its device to committed.
        #[arg(long)]
        latency: bool,
        /// Cloud node processes; every edge is given all of them.
        #[arg(long, default_value_t = 1)]
        clouds: usize,
        /// The cluster's ingest_shards.
        #[arg(long, default_value_t = 4)]
        ingest_shards: u32,
        /// After the window, kill -9 the busiest cloud node and time until
        /// every edge is connected again.
        #[arg(long)]
        kill_one: bool,
    },
    /// An edge and a cloud `node` process at a steady live rate, their link
    /// cut for --outage-s, then healed: how fast the backlog drains, as a
    /// ratio to the live rate, and the latency meanwhile.
    Drain {
        /// Kafka bootstrap servers.
        #[arg(long)]
        bootstrap: String,
        /// The node binary [default: `node` next to this binary, else target/debug/node].
        #[arg(long)]
        node: Option<PathBuf>,
        #[arg(long, default_value_t = 100)]
        devices: usize,
        /// Readings per second per device.
        #[arg(long, default_value_t = 50.0)]
        rate_hz: f64,
        #[arg(long, default_value_t = 8)]
        warmup_s: u64,
        /// Seconds over which the live rate is measured before the cut.
        #[arg(long, default_value_t = 10)]
        live_s: u64,
        #[arg(long, default_value_t = 60)]
        outage_s: u64,
    },
    /// The fleet registry: records taken, the revocation check, memory per entry.
    Registry {
        /// Entries in the registry (one in ten revoked).
        #[arg(long, default_value_t = 100_000)]
        entries: usize,
        /// Revocation checks timed (half of them ids the registry lacks).
        #[arg(long, default_value_t = 1_000_000)]
        checks: usize,
    },
    /// Each window and detector stage on one core against a running-mean loop.
    Stages {
        /// Timed runs of each case; the tables give their median, min and max.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Untimed runs first; they also advance event time, and 3 runs of
        /// 20 s fill the z-score's 60 s window.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Readings per run.
        #[arg(long, default_value_t = 200_000)]
        readings: u64,
        /// Devices the readings are spread over.
        #[arg(long, default_value_t = 1000)]
        devices: u64,
        /// Each device's interval between readings, in event time.
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
    },
    /// Memory per idle device actor (RSS), each kind in a fresh process,
    /// against a bare ractor actor.
    Devices {
        /// Actors per kind.
        #[arg(long, default_value_t = 100_000)]
        count: usize,
        /// Fresh processes per kind.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Kinds to measure (bare is the baseline).
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "bare,mqtt,simulated,tokio-task"
        )]
        kinds: Vec<devices::Kind>,
        /// The goal: 100k device actors in this many MB (10^6 bytes).
        #[arg(long, default_value_t = 512.0)]
        budget_mb: f64,
    },
    /// One measurement of `devices`, run by it in a child process.
    #[command(hide = true)]
    DevicesChild {
        #[arg(long, value_enum)]
        kind: devices::Kind,
        #[arg(long)]
        count: usize,
    },
    /// MQTT ingest on one edge (MqttSource, gateway, outbox on sled) against
    /// a raw rumqttc subscriber on the same broker: at each of --devices, one
    /// device sustained (--sustained-s), and the ack latency at half the
    /// maximum (--latency-s).
    Mqtt {
        #[command(flatten)]
        reps: Reps,
        /// The MQTT broker, host:port.
        #[arg(long, env = "TRIBUTARY_MQTT_ADDR", default_value = "127.0.0.1:28883")]
        broker: String,
        /// Device counts of part 1, one pass of each subject per run (`--runs 0`
        /// skips part 1).
        #[arg(long, value_delimiter = ',', default_value = "1,20,1000")]
        devices: Vec<usize>,
        /// What parts 1 and 2 measure, in turn: the raw rumqttc subscriber
        /// (the baseline), a raw socket subscriber, the edge.
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "rumqttc,socket,edge"
        )]
        subjects: Vec<mqtt::Subject>,
        /// Messages per pass of part 1; a multiple of every device count.
        #[arg(long, default_value_t = 200_000)]
        readings: u64,
        /// Publisher connections the devices are spread over.
        #[arg(long, default_value_t = 1)]
        publishers: usize,
        /// The most messages the publisher may be ahead of the subscriber under
        /// test: above what the edge holds (inflight_max, 4096), below the
        /// broker's max_queued_messages (past which Mosquitto drops messages).
        #[arg(long, default_value_t = 20_000)]
        lead_max: u64,
        /// Part 2: seconds of each window of one device publishing as fast as
        /// it is taken (0 to skip).
        #[arg(long, default_value_t = 20)]
        sustained_s: u64,
        /// The devices of parts 2 and 3.
        #[arg(long, default_value_t = 1)]
        sustained_devices: usize,
        /// Part 2's windows per subject (raw, edge), alternating.
        #[arg(long, default_value_t = 3)]
        sustained_runs: usize,
        /// Part 3: seconds of each window of a paced publisher at half the
        /// edge's sustained median (0 to skip).
        #[arg(long, default_value_t = 20)]
        latency_s: u64,
        /// Part 3's windows.
        #[arg(long, default_value_t = 3)]
        latency_runs: usize,
        /// Part 3's rate instead of half the measured maximum.
        #[arg(long)]
        latency_rate: Option<f64>,
        /// Seconds before each window of parts 2 and 3 opens.
        #[arg(long, default_value_t = 3)]
        window_warmup_s: u64,
        /// Where the temporary outboxes go [default: the system's temp dir].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The broker's pid, if it runs here: its CPU per reading is reported too.
        #[arg(long)]
        broker_pid: Option<u32>,
        /// Bound on one pass.
        #[arg(long, default_value_t = 300)]
        timeout_s: u64,
    },
    /// An edge `node` process with the MQTT source and no cloud: its RSS idle,
    /// while devices publish, and after; the outbox's bytes on disk.
    MqttRss {
        /// The MQTT broker, host:port.
        #[arg(long, env = "TRIBUTARY_MQTT_ADDR", default_value = "127.0.0.1:28883")]
        broker: String,
        /// The node binary [default: `node` next to this binary, else target/debug/node].
        #[arg(long)]
        node: Option<PathBuf>,
        /// Devices publishing (one topic each).
        #[arg(long, default_value_t = 1000)]
        devices: usize,
        /// Messages in all.
        #[arg(long, default_value_t = 10_000_000)]
        readings: u64,
        /// Publisher connections the devices are spread over.
        #[arg(long, default_value_t = 1)]
        publishers: usize,
        /// The most messages the publisher may be ahead of what the node
        /// reports committed (its `edge flow` lines, every --report-interval-ms).
        #[arg(long, default_value_t = 50_000)]
        lead_max: u64,
        /// The node's report interval: the lead's resolution.
        #[arg(long, default_value_t = 250)]
        report_interval_ms: u64,
        /// How often VmRSS is sampled.
        #[arg(long, default_value_t = 2_000)]
        sample_ms: u64,
        /// Seconds of idle sampling after the node subscribed, and of settling
        /// after the last reading is committed.
        #[arg(long, default_value_t = 10)]
        idle_s: u64,
        /// Publishing stops after this many seconds even if not all is sent.
        #[arg(long, default_value_t = 900)]
        time_limit_s: u64,
        /// The node's --outbox-bytes-max: room for every reading.
        #[arg(long, default_value_t = 4 * 1024 * 1024 * 1024)]
        outbox_bytes_max: u64,
        /// Where the node's directory goes [default: the system's temp dir].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Keep the node's directory (outbox, log) instead of deleting it.
        #[arg(long)]
        keep: bool,
        /// The broker's pid, if it runs here: its CPU is reported too.
        #[arg(long)]
        broker_pid: Option<u32>,
        /// KEY=VALUE set in the node's environment (repeatable), for
        /// experiments such as MALLOC_ARENA_MAX=2.
        #[arg(long)]
        node_env: Vec<String>,
    },
}

/// What the machine looked like when the benchmark started.
fn print_machine() {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    println!(
        "machine: {cores} cores available, load average {} (1, 5, 15 min)",
        load.join(" ")
    );
    if cfg!(debug_assertions) {
        println!("WARNING: a debug build; figures are meaningless. Use --release.");
    }
}

/// How busy the machine was over the whole benchmark, and how much of that
/// was this process: the rest is the broker, the nodes, and other people's work.
fn print_cpu_share(machine0: (f64, f64), own0: f64) {
    let (busy1, total1) = stats::machine_cpu_s();
    let cores = std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
    let wall_s = ((total1 - machine0.1) / cores).max(1e-9);
    let busy = (busy1 - machine0.0) / wall_s;
    let own = (stats::process_cpu_s("self") - own0) / wall_s;
    println!(
        "cpu over the benchmark: machine busy {busy:.2} of {cores} cores, this process {own:.2}, \
         everything else {:.2}",
        (busy - own).max(0.0)
    );
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    print_machine();
    let machine0 = stats::machine_cpu_s();
    let own0 = stats::process_cpu_s("self");
    match cli.command {
        Command::Outbox {
            reps,
            readings,
            segment_sizes,
            dir,
            cache_bytes_max,
            drain_segments,
        } => outbox::run(&outbox::OutboxOpts {
            readings,
            runs: reps.runs,
            warmup: reps.warmup,
            dir: dir.unwrap_or_else(std::env::temp_dir),
            cache_bytes_max,
            drain_segments,
            segment_sizes,
        }),
        Command::Log {
            reps,
            bootstrap,
            readings,
            batches,
            segment_readings,
            partitions,
            keep_topics,
            broker_pid,
        } => log::run(&log::LogOpts {
            bootstrap,
            readings,
            runs: reps.runs,
            warmup: reps.warmup,
            batch_sizes: batches,
            segment_readings,
            partitions,
            keep_topics,
            broker_pid,
        }),
        Command::E2e {
            bootstrap,
            node,
            devices,
            rate_hz,
            warmup_s,
            window_s,
            runs,
            baseline_readings,
            broker_pid,
            latency,
        } => e2e::run(&e2e::E2eOpts {
            bootstrap,
            node,
            devices,
            rate_hz,
            warmup_s,
            window_s,
            runs,
            baseline_readings,
            broker_pid,
            latency,
        }),
        Command::Drain {
            bootstrap,
            node,
            devices,
            rate_hz,
            warmup_s,
            live_s,
            outage_s,
        } => drain::run(&drain::DrainOpts {
            bootstrap,
            node,
            devices,
            rate_hz,
            warmup_s,
            live_s,
            outage_s,
        }),
        Command::Fleet {
            bootstrap,
            node,
            edges,
            devices_per_edge,
            interval_ms,
            segment_readings_max,
            warmup_s,
            window_s,
            baseline_readings,
            latency,
            clouds,
            ingest_shards,
            kill_one,
        } => fleet::run(&fleet::FleetOpts {
            bootstrap,
            node,
            edges,
            devices_per_edge,
            interval_ms,
            segment_readings_max,
            warmup_s,
            window_s,
            baseline_readings,
            latency,
            clouds,
            ingest_shards,
            kill_one,
        }),
        Command::Registry { entries, checks } => {
            registry::run(&registry::RegistryOpts { entries, checks })
        }
        Command::Stages {
            runs,
            warmup,
            readings,
            devices,
            interval_ms,
        } => stages::run(&stages::StagesOpts {
            readings,
            devices,
            interval_ms,
            runs,
            warmup,
        }),
        Command::Devices {
            count,
            runs,
            kinds,
            budget_mb,
        } => devices::run(&devices::DevicesOpts {
            count,
            runs,
            kinds,
            budget_mb,
        }),
        // The parent finds its one result line among the others.
        Command::DevicesChild { kind, count } => devices::child(kind, count),
        Command::Mqtt {
            reps,
            broker,
            devices,
            subjects,
            readings,
            publishers,
            lead_max,
            sustained_s,
            sustained_devices,
            sustained_runs,
            latency_s,
            latency_runs,
            latency_rate,
            window_warmup_s,
            dir,
            broker_pid,
            timeout_s,
        } => mqtt::run(&mqtt::MqttOpts {
            broker,
            devices,
            readings,
            runs: reps.runs,
            warmup: reps.warmup,
            subjects,
            publishers,
            lead_max,
            sustained_s,
            sustained_devices,
            sustained_runs,
            latency_s,
            latency_runs,
            latency_rate,
            window_warmup_s,
            dir: dir.unwrap_or_else(std::env::temp_dir),
            broker_pid,
            timeout_s,
        }),
        Command::MqttRss {
            broker,
            node,
            devices,
            readings,
            publishers,
            lead_max,
            report_interval_ms,
            sample_ms,
            idle_s,
            time_limit_s,
            outbox_bytes_max,
            dir,
            keep,
            broker_pid,
            node_env,
        } => mqtt_rss::run(&mqtt_rss::RssOpts {
            broker,
            node,
            devices,
            readings,
            publishers,
            lead_max,
            report_interval_ms,
            sample_ms,
            idle_s,
            time_limit_s,
            outbox_bytes_max,
            dir: dir.unwrap_or_else(std::env::temp_dir),
            keep,
            broker_pid,
            node_env,
        }),
    }?;
    print_cpu_share(machine0, own0);
    print_machine();
    Ok(())
}

//! `bench e2e`: a cloud and an edge `node` process on this machine, the edge
//! running many simulated devices at a high rate, against the raw
//! transactional producer measured in the same run.
//!
//! The figure is the rate of readings committed to Kafka, taken from the
//! cloud's `cloud flow` log lines (each carries the running total) over a
//! fixed window after a warm-up. The window is a span of time by nature, so
//! the benchmark sleeps through it. CPU time of both processes and of the
//! whole machine over the window says where the cores went.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::latency::{Latency, LatencyProbe};
use crate::log::{delete_topics, unique_suffix, LogOpts, RawTxBaseline};
use crate::stats::{
    machine_cpu_s, print_cpu_table, print_table, process_cpu_s, thousands, CpuPerReading, Series,
};

/// The cloud's report interval: one `cloud flow` line per this many ms.
const REPORT_INTERVAL_MS: u64 = 1000;
/// How long a node has to come up.
const READY_TIMEOUT_MS: u64 = 60_000;
/// How often the cloud's log is read while waiting for a line.
const LOG_POLL_MS: u64 = 100;
/// Segments per transaction: the node's `commit_segments_max` default, and
/// so the baseline's batch.
const COMMIT_SEGMENTS: usize = 16;
/// The second baseline's batch: a busy cloud commits about one segment per
/// transaction (the table's last column), not its maximum.
const SMALL_COMMIT_SEGMENTS: usize = 1;
/// Readings per segment: the node's `segment_readings_max` default.
const SEGMENT_READINGS: usize = 1000;
/// Partitions of the readings topic: the node's default.
const PARTITIONS: i32 = 3;

#[derive(Debug, Clone)]
pub struct E2eOpts {
    pub bootstrap: String,
    pub node: Option<PathBuf>,
    pub devices: usize,
    pub rate_hz: f64,
    pub warmup_s: u64,
    pub window_s: u64,
    pub runs: usize,
    pub baseline_readings: u64,
    pub broker_pid: Option<u32>,
    /// Also measure each reading's time from its device to committed.
    pub latency: bool,
}

/// `node` next to this binary (target/release when this is a release
/// build), else the debug build's.
fn node_binary(o: &E2eOpts) -> Result<PathBuf> {
    find_node(o.node.as_deref())
}

/// `explicit`, else `node` next to this binary, else the debug build's.
pub(crate) fn find_node(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe().context("finding this executable")?;
    let dir = exe.parent().context("this executable's directory")?;
    for candidate in [dir.join("node"), dir.join("../debug/node")] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "no node binary next to {}: build it (cargo build -p tributary-node [--release]) or pass --node",
        exe.display()
    )
}

pub(crate) fn node(bin: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "node {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A child process killed and reaped when dropped.
pub(crate) struct Proc {
    pub(crate) child: Child,
    log: PathBuf,
}

impl Proc {
    pub(crate) fn spawn(bin: &Path, args: &[String], log: PathBuf) -> Result<Self> {
        Self::spawn_with_env(bin, args, &[], log)
    }

    pub(crate) fn spawn_with_env(
        bin: &Path,
        args: &[String],
        env: &[(String, String)],
        log: PathBuf,
    ) -> Result<Self> {
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        Ok(Self { child, log })
    }

    pub(crate) fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub(crate) fn log_path(&self) -> &Path {
        &self.log
    }

    pub(crate) fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits, bounded, for a line containing `pattern`.
    pub(crate) fn wait_for(&mut self, pattern: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_text().contains(pattern) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before logging {pattern:?}:\n{}",
                    self.log.display(),
                    self.log_tail()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "no {pattern:?} in {} after {} ms:\n{}",
                    self.log.display(),
                    timeout.as_millis(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(LOG_POLL_MS));
        }
    }

    /// User plus system CPU seconds this process has used.
    pub(crate) fn cpu_s(&self) -> f64 {
        process_cpu_s(&self.child.id().to_string())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a `cloud flow` line says.
pub(crate) struct Flow {
    /// Seconds since midnight (UTC) of the line's timestamp.
    pub(crate) at_s: f64,
    pub(crate) readings_committed: u64,
    pub(crate) transactions: u64,
}

/// The last `cloud flow` line.
pub(crate) fn last_flow(log: &str) -> Option<Flow> {
    let line = log.lines().rev().find(|l| l.contains("cloud flow"))?;
    // tracing's timestamp: 2026-11-25T09:26:10.123456Z
    let time = line.split_whitespace().next()?.split_once('T')?.1;
    let time = time.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    let field = |name: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    Some(Flow {
        at_s: h * 3600.0 + m * 60.0 + s,
        readings_committed: field("readings_committed")?,
        transactions: field("transactions")?,
    })
}

/// What one window measured.
struct Window {
    readings_per_s: f64,
    readings_per_transaction: f64,
    cloud_cores: f64,
    edge_cores: f64,
    /// None when the broker's pid is unknown.
    broker_cores: Option<f64>,
    machine_cores: f64,
    latency: Option<Latency>,
}

pub(crate) fn free_udp_port() -> Result<u16> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
    Ok(s.local_addr()?.port())
}

fn one_run(
    o: &E2eOpts,
    bin: &Path,
    dir: &Path,
    run: usize,
    topics: &mut Vec<String>,
) -> Result<Window> {
    let pki = dir.join("pki");
    let pki = pki.to_str().context("a UTF-8 temp path")?;
    // The edge's own tls_dir (`certs issue --out`): no ca.key in it.
    let edge_pki = format!("{pki}/edge-1");
    let suffix = unique_suffix();
    let readings_topic = format!("bench-e2e-readings-{suffix}");
    let hwm_topic = format!("bench-e2e-hwm-{suffix}");
    topics.push(readings_topic.clone());
    topics.push(hwm_topic.clone());
    let addr = format!("127.0.0.1:{}", free_udp_port()?);
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let cloud_args = s(&[
        "--role",
        "cloud",
        "--node-id",
        "cloud-1",
        "--tls-dir",
        pki,
        "--listen-addr",
        &addr,
        "--kafka-bootstrap",
        &o.bootstrap,
        "--readings-topic",
        &readings_topic,
        "--hwm-topic",
        &hwm_topic,
        "--transactional-id-prefix",
        &format!("bench-e2e-{suffix}"),
        "--report-interval-ms",
        &REPORT_INTERVAL_MS.to_string(),
    ]);
    let outbox = dir.join(format!("edge-{run}.outbox"));
    let edge_args = s(&[
        "--role",
        "edge",
        "--node-id",
        "edge-1",
        "--tls-dir",
        &edge_pki,
        "--cloud-addr",
        &addr,
        "--outbox-dir",
        outbox.to_str().context("a UTF-8 temp path")?,
        "--device-count",
        &o.devices.to_string(),
        "--device-rate-hz",
        &o.rate_hz.to_string(),
    ]);
    let mut cloud = Proc::spawn(bin, &cloud_args, dir.join(format!("cloud-{run}.log")))?;
    cloud.wait_for(
        "cloud listening for edges",
        Duration::from_millis(READY_TIMEOUT_MS),
    )?;
    let mut edge = Proc::spawn(bin, &edge_args, dir.join(format!("edge-{run}.log")))?;
    edge.wait_for("edge running", Duration::from_millis(READY_TIMEOUT_MS))?;
    let probe = o
        .latency
        .then(|| LatencyProbe::start(&o.bootstrap, &readings_topic, PARTITIONS))
        .transpose()?;

    std::thread::sleep(Duration::from_secs(o.warmup_s));
    if let Some(p) = &probe {
        p.begin();
    }
    let Some(f0) = last_flow(&cloud.log_text()) else {
        bail!("the cloud reported no flow:\n{}", cloud.log_tail());
    };
    let broker = o.broker_pid.map(|p| p.to_string());
    let broker_cpu_s = || broker.as_deref().map(process_cpu_s);
    let (cloud0, edge0, broker0, (busy0, total0)) =
        (cloud.cpu_s(), edge.cpu_s(), broker_cpu_s(), machine_cpu_s());
    std::thread::sleep(Duration::from_secs(o.window_s));
    let Some(f1) = last_flow(&cloud.log_text()) else {
        bail!("the cloud's flow lines are gone:\n{}", cloud.log_tail());
    };
    let (cloud1, edge1, broker1, (busy1, total1)) =
        (cloud.cpu_s(), edge.cpu_s(), broker_cpu_s(), machine_cpu_s());
    if let Some(status) = edge.child.try_wait()? {
        bail!("the edge exited ({status}):\n{}", edge.log_tail());
    }
    let (c0, c1) = (f0.readings_committed, f1.readings_committed);
    let mut span = f1.at_s - f0.at_s;
    if span < 0.0 {
        span += 86_400.0;
    }
    if span <= 0.0 || c1 <= c0 {
        bail!(
            "nothing was committed in the window ({c0} then {c1}):\n{}",
            cloud.log_tail()
        );
    }
    // Wall time of the window from the machine's own clock, for CPU shares.
    let wall_s = ((total1 - total0)
        / std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64))
    .max(1e-9);
    Ok(Window {
        readings_per_s: (c1 - c0) as f64 / span,
        readings_per_transaction: (c1 - c0) as f64
            / f1.transactions.saturating_sub(f0.transactions).max(1) as f64,
        cloud_cores: (cloud1 - cloud0) / wall_s,
        edge_cores: (edge1 - edge0) / wall_s,
        broker_cores: broker0.zip(broker1).map(|(a, b)| (b - a) / wall_s),
        machine_cores: (busy1 - busy0) / wall_s,
        latency: probe.map(LatencyProbe::finish).transpose()?,
    })
}

pub fn run(o: &E2eOpts) -> Result<()> {
    let bin = node_binary(o)?;
    let bin = bin.canonicalize().unwrap_or(bin);
    println!(
        "e2e: node binary {}, {} devices at up to {} Hz each (closed loop: a device waits for \
         its reading's commit), warm-up {} s, window {} s, {} runs, broker {}",
        bin.display(),
        o.devices,
        o.rate_hz,
        o.warmup_s,
        o.window_s,
        o.runs,
        o.bootstrap
    );
    let dir = tempfile::Builder::new()
        .prefix("tributary-bench-e2e-")
        .tempdir()?;
    let pki = dir.path().join("pki");
    let pki_s = pki.to_str().context("a UTF-8 temp path")?;
    node(&bin, &["certs", "init", "--dir", pki_s])?;
    node(
        &bin,
        &[
            "certs", "issue", "--dir", pki_s, "--id", "cloud-1", "--role", "cloud",
        ],
    )?;
    node(
        &bin,
        &[
            "certs",
            "issue",
            "--dir",
            pki_s,
            "--id",
            "edge-1",
            "--role",
            "edge",
            "--out",
            &format!("{pki_s}/edge-1"),
        ],
    )?;

    let log_opts = LogOpts {
        bootstrap: o.bootstrap.clone(),
        readings: o.baseline_readings,
        runs: 1,
        warmup: 1,
        batch_sizes: vec![COMMIT_SEGMENTS],
        segment_readings: SEGMENT_READINGS,
        partitions: PARTITIONS,
        keep_topics: false,
        broker_pid: o.broker_pid,
    };
    if !o
        .baseline_readings
        .is_multiple_of((COMMIT_SEGMENTS * SEGMENT_READINGS) as u64)
    {
        bail!(
            "--baseline-readings must be a multiple of {}",
            COMMIT_SEGMENTS * SEGMENT_READINGS
        );
    }
    let mut baseline = RawTxBaseline::new(&log_opts, "e2eraw")?;
    baseline.run_once(COMMIT_SEGMENTS)?;

    let mut topics = Vec::new();
    let mut raw = Series::new(
        format!("raw tx producer, {COMMIT_SEGMENTS} segments per commit"),
        o.baseline_readings,
        0,
    );
    let mut raw_small = Series::new(
        format!("raw tx producer, {SMALL_COMMIT_SEGMENTS} segment per commit"),
        o.baseline_readings,
        0,
    );
    let mut raw_cpu = CpuPerReading::new(raw.name.clone());
    let mut raw_small_cpu = CpuPerReading::new(raw_small.name.clone());
    let broker = o.broker_pid.map(|p| p.to_string());
    let broker_cpu_s = || broker.as_deref().map(process_cpu_s);
    let mut rates = Vec::new();
    let mut windows = Vec::new();
    let result = (|| -> Result<()> {
        for run in 0..o.runs {
            let w = one_run(o, &bin, dir.path(), run, &mut topics)?;
            eprintln!(
                "  run {}/{}: {} readings/s committed",
                run + 1,
                o.runs,
                thousands(w.readings_per_s)
            );
            rates.push(w.readings_per_s);
            windows.push(w);
            for (batch, series, cpu) in [
                (COMMIT_SEGMENTS, &mut raw, &mut raw_cpu),
                (SMALL_COMMIT_SEGMENTS, &mut raw_small, &mut raw_small_cpu),
            ] {
                let (own0, broker0) = (process_cpu_s("self"), broker_cpu_s());
                series.push(baseline.run_once(batch)?);
                let (own1, broker1) = (process_cpu_s("self"), broker_cpu_s());
                let broker_s = broker0.zip(broker1).map(|(a, b)| b - a);
                cpu.push(own1 - own0, broker_s, o.baseline_readings);
            }
        }
        Ok(())
    })();
    baseline.finish();
    if let Err(e) = delete_topics(&o.bootstrap, &topics) {
        eprintln!("deleting the e2e topics failed: {e:#}");
    }
    result?;

    // A series whose runs each took one second for `rate` readings.
    let mut e2e = Series::new(
        format!(
            "edge + cloud nodes, {} devices × {} Hz",
            o.devices, o.rate_hz
        ),
        1,
        0,
    );
    for r in &rates {
        e2e.push(Duration::from_secs_f64(1.0 / r.max(1e-9)));
    }
    print_table(
        "end to end: readings/s committed to Kafka",
        &[
            (&raw, None),
            (&raw_small, Some(&raw)),
            (&e2e, Some(&raw)),
            (&e2e, Some(&raw_small)),
        ],
    );
    print_cpu_table(&[&raw_cpu, &raw_small_cpu]);
    println!(
        "\n| run | readings/s | cloud CPU (cores) | edge CPU (cores) | broker CPU (cores) \
         | machine busy (cores) | cloud µs/reading | edge µs/reading | broker µs/reading \
         | readings per transaction | p50 ms | p99 ms |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let cell =
        |v: Option<f64>, digits: usize| v.map_or("–".to_string(), |v| format!("{v:.digits$}"));
    for (i, w) in windows.iter().enumerate() {
        let per_reading = |cores: f64| cores * 1e6 / w.readings_per_s.max(1e-9);
        println!(
            "| {} | {} | {:.2} | {:.2} | {} | {:.2} | {:.1} | {:.1} | {} | {:.0} | {} | {} |",
            i + 1,
            thousands(w.readings_per_s),
            w.cloud_cores,
            w.edge_cores,
            cell(w.broker_cores, 2),
            w.machine_cores,
            per_reading(w.cloud_cores),
            per_reading(w.edge_cores),
            cell(w.broker_cores.map(per_reading), 1),
            w.readings_per_transaction,
            cell(w.latency.as_ref().map(|l| l.p50_ms), 1),
            cell(w.latency.as_ref().map(|l| l.p99_ms), 1),
        );
    }
    Ok(())
}

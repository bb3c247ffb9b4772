//! `bench fleet`: many light edges in this process ([`tributary_tests::fleet`])
//! into one cloud `node` process, against the raw transactional producer
//! measured in the same run. Reports readings/s committed, the cloud's CPU
//! per reading, its threads and RSS, and optionally each reading's time from
//! its device to committed.
//!
//! The light edges share this machine's two cores with the cloud and the
//! broker, so the rate is what the three together reach; the cloud's CPU
//! per reading is the figure that says what the cloud itself costs.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tributary_tests::fleet::{footprint, Fleet, FleetSpec};

use crate::e2e::{find_node, free_udp_port, last_flow, node, Proc};
use crate::latency::LatencyProbe;
use crate::log::{delete_topics, unique_suffix, LogOpts, RawTxBaseline};
use crate::stats::{print_table, process_cpu_s, thousands, Series};

/// The cloud nodes' report interval: their `cloud flow` lines, read for the
/// rates and for the failover time, which is known to within one interval.
const REPORT_INTERVAL_MS: u64 = 200;
const PARTITIONS: i32 = 3;
const SEGMENT_READINGS: usize = 1000;
/// The baseline's batch: the node's `commit_segments_max` default.
const COMMIT_SEGMENTS: usize = 16;
/// Bound on every edge having connected.
const CONNECTED_TIMEOUT_S: u64 = 300;
/// How often the cloud nodes' logs are read while waiting.
const POLL_MS: u64 = 100;

#[derive(Debug, Clone)]
pub struct FleetOpts {
    pub bootstrap: String,
    pub node: Option<std::path::PathBuf>,
    pub edges: usize,
    pub devices_per_edge: usize,
    pub interval_ms: u64,
    pub segment_readings_max: usize,
    pub warmup_s: u64,
    pub window_s: u64,
    pub baseline_readings: u64,
    pub latency: bool,
    /// Cloud nodes; the edges are given all of them.
    pub clouds: usize,
    pub ingest_shards: u32,
    /// After the window, kill -9 the busiest cloud node and time the
    /// failover of its edges.
    pub kill_one: bool,
}

pub fn run(o: &FleetOpts) -> Result<()> {
    let bin = find_node(o.node.as_deref())?;
    println!(
        "fleet: node binary {}, {} light edges × {} devices every {} ms, {} readings per segment, \
         warm-up {} s, window {} s, broker {}",
        bin.display(),
        o.edges,
        o.devices_per_edge,
        o.interval_ms,
        o.segment_readings_max,
        o.warmup_s,
        o.window_s,
        o.bootstrap
    );
    if !o
        .baseline_readings
        .is_multiple_of((COMMIT_SEGMENTS * SEGMENT_READINGS) as u64)
    {
        bail!(
            "--baseline-readings must be a multiple of {}",
            COMMIT_SEGMENTS * SEGMENT_READINGS
        );
    }
    let dir = tempfile::Builder::new()
        .prefix("tributary-bench-fleet-")
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

    let log_opts = LogOpts {
        bootstrap: o.bootstrap.clone(),
        readings: o.baseline_readings,
        runs: 1,
        warmup: 1,
        batch_sizes: vec![COMMIT_SEGMENTS],
        segment_readings: SEGMENT_READINGS,
        partitions: PARTITIONS,
        keep_topics: false,
        broker_pid: None,
    };
    let mut baseline = RawTxBaseline::new(&log_opts, "fleetraw")?;
    baseline.run_once(COMMIT_SEGMENTS)?;
    let mut raw = Series::new(
        format!("raw tx producer, {COMMIT_SEGMENTS} segments per commit"),
        o.baseline_readings,
        0,
    );
    let mut raw_small = Series::new(
        "raw tx producer, 1 segment per commit",
        o.baseline_readings,
        0,
    );
    let own_cpu0 = process_cpu_s("self");
    raw.push(baseline.run_once(COMMIT_SEGMENTS)?);
    let raw_cpu_us = (process_cpu_s("self") - own_cpu0) * 1e6 / o.baseline_readings as f64;
    raw_small.push(baseline.run_once(1)?);

    let suffix = unique_suffix();
    let readings_topic = format!("bench-fleet-readings-{suffix}");
    let hwm_topic = format!("bench-fleet-hwm-{suffix}");
    let topics = vec![readings_topic.clone(), hwm_topic.clone()];
    let result = measure(o, &bin, dir.path(), &readings_topic, &hwm_topic, &suffix);
    baseline.finish();
    if let Err(e) = delete_topics(&o.bootstrap, &topics) {
        eprintln!("deleting the fleet topics failed: {e:#}");
    }
    let m = result?;

    let mut fleet = Series::new(
        format!(
            "{} light edges × {} devices, {} cloud nodes",
            o.edges, o.devices_per_edge, o.clouds
        ),
        1,
        0,
    );
    fleet.push(Duration::from_secs_f64(1.0 / m.readings_per_s.max(1e-9)));
    print_table(
        "fleet: readings/s committed to Kafka",
        &[(&raw, None), (&raw_small, Some(&raw)), (&fleet, Some(&raw))],
    );
    let cloud_us = m.cloud_cores * 1e6 / m.readings_per_s.max(1e-9);
    println!(
        "\n| edges | cloud nodes | readings/s | readings per transaction | cloud CPU (cores) | cloud µs/reading \
         | raw producer µs/reading | ratio | cloud threads | cloud RSS (MB) | p50 ms | p99 ms | failover s (edges moved) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let cell = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.1}"));
    println!(
        "| {} | {} | {} | {:.0} | {:.2} | {:.1} | {:.1} | {:.2} | {} | {:.1} | {} | {} | {} |",
        o.edges,
        o.clouds,
        thousands(m.readings_per_s),
        m.readings_per_transaction,
        m.cloud_cores,
        cloud_us,
        raw_cpu_us,
        cloud_us / raw_cpu_us.max(1e-9),
        m.threads,
        m.rss_bytes as f64 / 1e6,
        cell(m.p50_ms),
        cell(m.p99_ms),
        m.failover
            .map_or("–".to_string(), |(s, n)| format!("{s:.1} ({n})")),
    );
    Ok(())
}

struct Measured {
    readings_per_s: f64,
    readings_per_transaction: f64,
    cloud_cores: f64,
    threads: u64,
    rss_bytes: u64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    /// Seconds from the kill -9 of one cloud node until every edge was
    /// connected again, and how many edges it held.
    failover: Option<(f64, usize)>,
}

/// `edges=` of the newest `cloud flow` line of a cloud node's log.
fn edges_connected(cloud: &Proc) -> u64 {
    cloud
        .log_text()
        .lines()
        .rev()
        .find(|l| l.contains("cloud flow"))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("edges=")?.parse().ok())
        })
        .unwrap_or(0)
}

fn measure(
    o: &FleetOpts,
    bin: &Path,
    dir: &Path,
    readings_topic: &str,
    hwm_topic: &str,
    suffix: &str,
) -> Result<Measured> {
    let pki = dir.join("pki");
    let pki_s = pki.to_str().context("a UTF-8 temp path")?;
    let mut clouds = Vec::new();
    let mut addrs = Vec::new();
    for k in 1..=o.clouds {
        let id = format!("cloud-{k}");
        if k > 1 {
            node(
                bin,
                &[
                    "certs", "issue", "--dir", pki_s, "--id", &id, "--role", "cloud",
                ],
            )?;
        }
        let addr = format!("127.0.0.1:{}", free_udp_port()?);
        let args: Vec<String> = [
            "--role",
            "cloud",
            "--node-id",
            &id,
            "--tls-dir",
            pki_s,
            "--listen-addr",
            &addr,
            "--kafka-bootstrap",
            &o.bootstrap,
            "--readings-topic",
            readings_topic,
            "--hwm-topic",
            hwm_topic,
            "--transactional-id-prefix",
            &format!("bench-fleet-{suffix}"),
            "--ingest-shards",
            &o.ingest_shards.to_string(),
            "--report-interval-ms",
            &REPORT_INTERVAL_MS.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut cloud = Proc::spawn(bin, &args, dir.join(format!("{id}.log")))?;
        cloud.wait_for("cloud listening for edges", Duration::from_secs(60))?;
        addrs.push(addr.parse().context("the cloud's address")?);
        clouds.push(cloud);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the fleet's runtime")?;
    let spec = FleetSpec {
        edges: o.edges,
        id_prefix: "fleet".into(),
        devices: o.devices_per_edge,
        interval_ms: o.interval_ms,
        readings_max: 0,
        segment_readings_max: o.segment_readings_max,
        commit_interval_ms: 50,
        ack_dir: None,
        ingest_shards: o.ingest_shards,
    };
    let started = Instant::now();
    let fleet = runtime
        .block_on(Fleet::start(&spec, &pki, &addrs))
        .context("starting the fleet")?;
    let all_connected =
        |clouds: &[Proc]| clouds.iter().map(edges_connected).sum::<u64>() >= o.edges as u64;
    let deadline = Instant::now() + Duration::from_secs(CONNECTED_TIMEOUT_S);
    while !all_connected(&clouds) {
        if Instant::now() >= deadline {
            bail!(
                "not every edge connected within {CONNECTED_TIMEOUT_S} s:\n{}",
                clouds[0].log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(POLL_MS));
    }
    eprintln!(
        "  {} edges connected {:.1} s after the first was started, over {} cloud nodes: {:?}",
        o.edges,
        started.elapsed().as_secs_f64(),
        o.clouds,
        clouds.iter().map(edges_connected).collect::<Vec<_>>()
    );
    let probe = o
        .latency
        .then(|| LatencyProbe::start(&o.bootstrap, readings_topic, PARTITIONS))
        .transpose()?;
    std::thread::sleep(Duration::from_secs(o.warmup_s));
    if let Some(p) = &probe {
        p.begin();
    }
    let flows = |clouds: &[Proc]| -> Result<Vec<crate::e2e::Flow>> {
        clouds
            .iter()
            .map(|c| {
                last_flow(&c.log_text())
                    .with_context(|| format!("a cloud node reported no flow:\n{}", c.log_tail()))
            })
            .collect()
    };
    let f0 = flows(&clouds)?;
    let cpu0: f64 = clouds.iter().map(Proc::cpu_s).sum();
    let wall0 = Instant::now();
    std::thread::sleep(Duration::from_secs(o.window_s));
    let f1 = flows(&clouds)?;
    let cloud_cores =
        (clouds.iter().map(Proc::cpu_s).sum::<f64>() - cpu0) / wall0.elapsed().as_secs_f64();
    let (mut rate, mut committed, mut transactions) = (0.0, 0u64, 0u64);
    for (a, b) in f0.iter().zip(&f1) {
        let mut span = b.at_s - a.at_s;
        if span < 0.0 {
            span += 86_400.0;
        }
        let c = b.readings_committed.saturating_sub(a.readings_committed);
        if span > 0.0 {
            rate += c as f64 / span;
        }
        committed += c;
        transactions += b.transactions.saturating_sub(a.transactions);
    }
    if committed == 0 {
        bail!(
            "nothing was committed in the window:\n{}",
            clouds[0].log_tail()
        );
    }
    let (threads, rss_bytes) = clouds
        .iter()
        .filter_map(|c| footprint(c.child.id()))
        .fold((0, 0), |(t, r), f| (t + f.threads, r + f.rss_bytes));
    let latency = probe.map(LatencyProbe::finish).transpose()?;
    let failover = if o.kill_one && clouds.len() > 1 {
        // The busiest node goes.
        let (victim, held) = clouds
            .iter()
            .map(edges_connected)
            .enumerate()
            .max_by_key(|(_, e)| *e)
            .expect("cloud nodes");
        let killed_at = Instant::now();
        let mut gone = clouds.remove(victim);
        let _ = gone.child.kill();
        let _ = gone.child.wait();
        // Its last flow line still counts its edges: count the others only.
        let deadline = killed_at + Duration::from_secs(CONNECTED_TIMEOUT_S);
        loop {
            if all_connected(&clouds) {
                break Some((killed_at.elapsed().as_secs_f64(), held as usize));
            }
            if Instant::now() >= deadline {
                bail!("the edges did not all fail over within {CONNECTED_TIMEOUT_S} s");
            }
            std::thread::sleep(Duration::from_millis(POLL_MS));
        }
    } else {
        None
    };
    drop(fleet);
    runtime.shutdown_timeout(Duration::from_secs(5));
    Ok(Measured {
        readings_per_s: rate,
        readings_per_transaction: committed as f64 / transactions.max(1) as f64,
        cloud_cores,
        threads,
        rss_bytes,
        p50_ms: latency.as_ref().map(|l| l.p50_ms),
        p99_ms: latency.as_ref().map(|l| l.p99_ms),
        failover,
    })
}

//! `bench drain`: an edge and a cloud `node` process at a steady live rate,
//! the link between them cut for `--outage-s` (a UDP proxy drops every
//! datagram), then healed. Measures how fast the backlog drains while live
//! readings keep arriving, as a ratio to the live rate measured in the same
//! run before the cut, and each reading's time from its device to committed
//! during the drain.
//!
//! The backlog is drained at the first moment the cloud has committed every
//! reading the edge had made durable when the link healed (the edge's own
//! `readings_committed` on its `edge flow` line).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tributary_tests::proxy::UdpProxy;

use crate::e2e::{find_node, free_udp_port, last_flow, node, Proc};
use crate::latency::LatencyProbe;
use crate::log::{delete_topics, unique_suffix};
use crate::stats::thousands;

const PARTITIONS: i32 = 3;
const READY_TIMEOUT_S: u64 = 60;
/// Bound on the drain; past it the run fails.
const DRAIN_TIMEOUT_S: u64 = 600;
const POLL_MS: u64 = 200;

#[derive(Debug, Clone)]
pub struct DrainOpts {
    pub bootstrap: String,
    pub node: Option<std::path::PathBuf>,
    pub devices: usize,
    pub rate_hz: f64,
    pub warmup_s: u64,
    pub live_s: u64,
    pub outage_s: u64,
}

/// A field of the last log line containing `marker`.
fn last_field(log: &str, marker: &str, field: &str) -> Option<u64> {
    let line = log.lines().rev().find(|l| l.contains(marker))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(field)?.strip_prefix('='))?
        .parse()
        .ok()
}

pub fn run(o: &DrainOpts) -> Result<()> {
    let bin = find_node(o.node.as_deref())?;
    println!(
        "drain: node binary {}, {} devices at {} Hz, warm-up {} s, live window {} s, outage {} s, broker {}",
        bin.display(),
        o.devices,
        o.rate_hz,
        o.warmup_s,
        o.live_s,
        o.outage_s,
        o.bootstrap
    );
    let dir = tempfile::Builder::new()
        .prefix("tributary-bench-drain-")
        .tempdir()?;
    let suffix = unique_suffix();
    let topics = vec![
        format!("bench-drain-readings-{suffix}"),
        format!("bench-drain-hwm-{suffix}"),
    ];
    let result = measure(o, &bin, dir.path(), &topics, &suffix);
    if let Err(e) = delete_topics(&o.bootstrap, &topics) {
        eprintln!("deleting the drain topics failed: {e:#}");
    }
    result
}

fn measure(o: &DrainOpts, bin: &Path, dir: &Path, topics: &[String], suffix: &str) -> Result<()> {
    let pki = dir.join("pki");
    let pki_s = pki.to_str().context("a UTF-8 temp path")?;
    node(bin, &["certs", "init", "--dir", pki_s])?;
    node(
        bin,
        &[
            "certs", "issue", "--dir", pki_s, "--id", "cloud-1", "--role", "cloud",
        ],
    )?;
    let edge_pki = format!("{pki_s}/edge-1");
    node(
        bin,
        &[
            "certs", "issue", "--dir", pki_s, "--id", "edge-1", "--role", "edge", "--out",
            &edge_pki,
        ],
    )?;
    let addr = format!("127.0.0.1:{}", free_udp_port()?);
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let cloud_args = s(&[
        "--role",
        "cloud",
        "--node-id",
        "cloud-1",
        "--tls-dir",
        pki_s,
        "--listen-addr",
        &addr,
        "--kafka-bootstrap",
        &o.bootstrap,
        "--readings-topic",
        &topics[0],
        "--hwm-topic",
        &topics[1],
        "--transactional-id-prefix",
        &format!("bench-drain-{suffix}"),
        "--report-interval-ms",
        "1000",
    ]);
    let mut cloud = Proc::spawn(bin, &cloud_args, dir.join("cloud.log"))?;
    cloud.wait_for(
        "cloud listening for edges",
        Duration::from_secs(READY_TIMEOUT_S),
    )?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the proxy's runtime")?;
    let (proxy, proxy_addr) = runtime
        .block_on(UdpProxy::start(
            addr.parse().context("the cloud's address")?,
        ))
        .context("starting the proxy")?;
    // The proxy's task runs on this runtime: drive it from a thread of its own.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let driver = std::thread::spawn(move || {
        runtime.block_on(async {
            let _ = stop_rx.await;
        })
    });
    let outbox = dir.join("edge.outbox");
    let edge_args = s(&[
        "--role",
        "edge",
        "--node-id",
        "edge-1",
        "--tls-dir",
        &edge_pki,
        "--cloud-addr",
        &proxy_addr.to_string(),
        "--outbox-dir",
        outbox.to_str().context("a UTF-8 temp path")?,
        "--device-count",
        &o.devices.to_string(),
        "--device-rate-hz",
        &o.rate_hz.to_string(),
        "--reconnect-backoff-max-ms",
        "1000",
    ]);
    let mut edge = Proc::spawn(bin, &edge_args, dir.join("edge.log"))?;
    edge.wait_for("edge running", Duration::from_secs(READY_TIMEOUT_S))?;
    let probe = LatencyProbe::start(&o.bootstrap, &topics[0], PARTITIONS)?;
    std::thread::sleep(Duration::from_secs(o.warmup_s));

    // The live rate, and the live latency, before the cut.
    probe.begin();
    let committed =
        |cloud: &Proc| last_flow(&cloud.log_text()).map(|f| (f.at_s, f.readings_committed));
    let Some((t0, c0)) = committed(&cloud) else {
        bail!("the cloud reported no flow:\n{}", cloud.log_tail());
    };
    std::thread::sleep(Duration::from_secs(o.live_s));
    let Some((t1, c1)) = committed(&cloud) else {
        bail!("the cloud's flow lines are gone:\n{}", cloud.log_tail());
    };
    let live = probe.finish()?;
    let live_rate = (c1 - c0) as f64 / (t1 - t0).max(1e-9);

    proxy.cut();
    std::thread::sleep(Duration::from_secs(o.outage_s));
    let probe = LatencyProbe::start(&o.bootstrap, &topics[0], PARTITIONS)?;
    probe.begin();
    let Some((_, at_heal)) = committed(&cloud) else {
        bail!("the cloud's flow lines are gone:\n{}", cloud.log_tail());
    };
    // The edge logs its durable count every second; take the newest line,
    // which is at most a second old, so the target is at most a second low.
    let Some(durable) = last_field(&edge.log_text(), "edge flow", "readings_committed") else {
        bail!("the edge logged no flow:\n{}", edge.log_tail());
    };
    proxy.heal();
    let healed = Instant::now();
    let deadline = healed + Duration::from_secs(DRAIN_TIMEOUT_S);
    let drained_after = loop {
        if committed(&cloud).is_some_and(|(_, c)| c >= durable) {
            break healed.elapsed();
        }
        if Instant::now() >= deadline {
            bail!(
                "the backlog did not drain within {DRAIN_TIMEOUT_S} s:\n{}",
                cloud.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(POLL_MS));
    };
    let during = probe.finish()?;
    let _ = stop_tx.send(());
    let _ = driver.join();
    eprintln!(
        "  latency samples: {} before the cut, {} during the drain",
        live.samples, during.samples
    );
    let backlog = durable.saturating_sub(at_heal);
    let drain_rate = backlog as f64 / drained_after.as_secs_f64().max(1e-9);
    println!(
        "\n| live readings/s | outage s | backlog (readings) | drained in s | backlog readings/s \
         | ratio to live | live p50 / p99 ms before | p50 / p99 ms during the drain |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {} | {} | {:.1} | {} | {:.1} | {:.0} / {:.0} | {:.0} / {:.0} |",
        thousands(live_rate),
        o.outage_s,
        thousands(backlog as f64),
        drained_after.as_secs_f64(),
        thousands(drain_rate),
        drain_rate / live_rate.max(1e-9),
        live.p50_ms,
        live.p99_ms,
        during.p50_ms,
        during.p99_ms,
    );
    Ok(())
}

//! `bench mqtt-rss`: the memory of a real edge `node` process with the MQTT
//! source, idle and while many devices publish, with no cloud, so that every
//! reading stays in the outbox (issue #10).
//!
//! - The node: the release build next to this binary, `--role edge
//!   --device-count 0 --mqtt-addr <broker> --mqtt-topic <prefix>/+/telemetry`,
//!   a cloud address where nothing listens, an outbox budget that holds
//!   everything (`--outbox-bytes-max`), every other setting its default.
//! - The publisher: the raw QoS 1 publisher of `bench mqtt`, `--devices`
//!   devices in turn, `--readings` in all, never more than `--lead-max`
//!   ahead of the `readings_committed` of the node's `edge flow` log lines
//!   (every `--report-interval-ms`), so that the broker's queue stays bounded.
//! - VmRSS (and at the end VmHWM, the peak) from `/proc/<pid>/status`: every
//!   second for `--idle-s` after the node subscribed (idle), every
//!   `--sample-ms` while publishing, and for `--idle-s` after the last
//!   reading was committed (the end). The outbox's bytes on disk are its
//!   files' allocated blocks, and the node's own `outbox_bytes`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::e2e::{find_node, free_udp_port, node, Proc};
use crate::log::unique_suffix;
use crate::mqtt::{load_1min, prepare_session, split_broker, Limit, Load, Progress, Publishers};
use crate::stats::{median, process_cpu_s, thousands};

/// How long the node has to come up and subscribe.
const READY_TIMEOUT_MS: u64 = 60_000;
/// How often the node's log is read for its committed count.
const TAIL_MS: u64 = 100;
/// Bound on the node committing what was sent, after the publisher's end.
const DRAIN_TIMEOUT_MS: u64 = 300_000;
/// Rows of the RSS curve printed.
const CURVE_ROWS: usize = 16;
const MB: f64 = 1e6;

#[derive(Debug, Clone)]
pub struct RssOpts {
    pub broker: String,
    pub node: Option<PathBuf>,
    pub devices: usize,
    pub readings: u64,
    pub publishers: usize,
    pub lead_max: u64,
    pub report_interval_ms: u64,
    pub sample_ms: u64,
    pub idle_s: u64,
    pub time_limit_s: u64,
    pub outbox_bytes_max: u64,
    pub dir: PathBuf,
    pub keep: bool,
    pub broker_pid: Option<u32>,
    /// KEY=VALUE pairs set in the node's environment (e.g. MALLOC_ARENA_MAX=2).
    pub node_env: Vec<String>,
}

/// A process's VmRSS or VmHWM, in bytes.
fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// One mapping of /proc/<pid>/smaps.
struct Mapping {
    name: String,
    size_kb: u64,
    rss_kb: u64,
}

fn smaps(pid: u32) -> Vec<Mapping> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if first.contains('-') && first.chars().next().is_some_and(|c| c.is_ascii_hexdigit()) {
            let name = line
                .split_whitespace()
                .nth(5)
                .unwrap_or("[anon]")
                .to_string();
            out.push(Mapping {
                name,
                size_kb: 0,
                rss_kb: 0,
            });
        } else if let Some(m) = out.last_mut() {
            let kb = || {
                words
                    .clone()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            match first {
                "Size:" => m.size_kb = kb(),
                "Rss:" => m.rss_kb = kb(),
                _ => {}
            }
        }
    }
    out
}

/// Where a process's RSS is: by kind of mapping. glibc's thread arenas are
/// anonymous mappings reserved 64 MiB at a time (in pieces: the used part
/// and the rest, reserved `---p`), thread stacks are 2 MiB or 8 MiB.
fn print_smaps(pid: u32) {
    let maps = smaps(pid);
    let mut kinds: std::collections::BTreeMap<&str, (u64, u64, usize)> = Default::default();
    for m in &maps {
        let kind = if m.name == "[heap]" {
            "[heap] (glibc's main arena)"
        } else if m.name.starts_with('/') {
            "files (the binary, libraries)"
        } else if m.name.starts_with('[') && m.name != "[anon]" {
            "other named ([stack], [vdso]...)"
        } else {
            "anonymous (thread arenas, stacks, large allocations)"
        };
        let e = kinds.entry(kind).or_default();
        e.0 += m.rss_kb;
        e.1 += m.size_kb;
        e.2 += 1;
    }
    println!("\n| the node's mappings at the end | RSS MB | mapped MB | mappings |");
    println!("|---|---:|---:|---:|");
    for (kind, (rss, size, n)) in &kinds {
        println!(
            "| {kind} | {:.1} | {:.1} | {n} |",
            *rss as f64 * 1024.0 / MB,
            *size as f64 * 1024.0 / MB
        );
    }
    let mut anon: Vec<&Mapping> = maps.iter().filter(|m| m.rss_kb >= 1024).collect();
    anon.sort_by_key(|m| std::cmp::Reverse(m.rss_kb));
    println!("\n| largest mappings by RSS | RSS MB | mapped MB |");
    println!("|---|---:|---:|");
    for m in anon.iter().take(10) {
        println!(
            "| {} | {:.1} | {:.1} |",
            m.name,
            m.rss_kb as f64 * 1024.0 / MB,
            m.size_kb as f64 * 1024.0 / MB
        );
    }
}

/// Removes ANSI escapes (tracing colours its fields on some terminals).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn field(line: &str, name: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))?
        .parse()
        .ok()
}

/// Reads what the node appended to its log since the last look.
struct LogTail {
    file: File,
    offset: u64,
    partial: String,
}

/// What the node's latest report lines said.
#[derive(Debug, Clone, Copy, Default)]
struct Reported {
    committed: u64,
    outbox_bytes: u64,
    segments: u64,
    commits: u64,
    mqtt_received: u64,
    mqtt_held: u64,
    redeliveries: u64,
    disconnects: u64,
    bad_payload: u64,
}

impl LogTail {
    fn open(path: &Path) -> Result<Self> {
        Ok(Self {
            file: File::open(path).with_context(|| format!("opening {}", path.display()))?,
            offset: 0,
            partial: String::new(),
        })
    }

    fn poll(&mut self, r: &mut Reported) -> Result<()> {
        self.file.seek(SeekFrom::Start(self.offset))?;
        let mut bytes = Vec::new();
        self.file.read_to_end(&mut bytes)?;
        self.offset += bytes.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&bytes));
        let Some(end) = self.partial.rfind('\n') else {
            return Ok(());
        };
        let complete: String = self.partial.drain(..=end).collect();
        for line in complete.lines() {
            if !line.contains("edge flow") && !line.contains("mqtt flow") {
                continue;
            }
            let line = strip_ansi(line);
            if line.contains("edge flow") {
                r.committed = field(&line, "readings_committed").unwrap_or(r.committed);
                r.outbox_bytes = field(&line, "outbox_bytes").unwrap_or(r.outbox_bytes);
                r.segments = field(&line, "segments_stored").unwrap_or(r.segments);
                r.commits = field(&line, "commits").unwrap_or(r.commits);
            } else {
                r.mqtt_received = field(&line, "received").unwrap_or(r.mqtt_received);
                r.mqtt_held = field(&line, "held").unwrap_or(r.mqtt_held);
                r.redeliveries = field(&line, "redeliveries").unwrap_or(r.redeliveries);
                r.disconnects = field(&line, "disconnects").unwrap_or(r.disconnects);
                r.bad_payload = field(&line, "bad_payload").unwrap_or(r.bad_payload);
            }
        }
        Ok(())
    }
}

/// Allocated and apparent bytes of the files under `dir`.
fn disk_bytes(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut allocated = 0;
    let mut apparent = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                allocated += m.blocks() * 512;
                apparent += m.len();
            }
        }
    }
    (allocated, apparent)
}

/// One RSS sample while publishing.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at_s: f64,
    committed: u64,
    rss: u64,
}

fn summary(v: &[u64]) -> (f64, f64, f64) {
    let mut s: Vec<f64> = v.iter().map(|b| *b as f64 / MB).collect();
    s.sort_by(f64::total_cmp);
    (
        s.first().copied().unwrap_or(0.0),
        median(&s),
        s.last().copied().unwrap_or(0.0),
    )
}

/// Least-squares slope of RSS (bytes) against committed readings.
fn slope(samples: &[Sample]) -> Option<f64> {
    let n = samples.len() as f64;
    if samples.len() < 3 {
        return None;
    }
    let mx = samples.iter().map(|s| s.committed as f64).sum::<f64>() / n;
    let my = samples.iter().map(|s| s.rss as f64).sum::<f64>() / n;
    let sxy: f64 = samples
        .iter()
        .map(|s| (s.committed as f64 - mx) * (s.rss as f64 - my))
        .sum();
    let sxx: f64 = samples
        .iter()
        .map(|s| (s.committed as f64 - mx).powi(2))
        .sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

fn sample_for(pid: u32, secs: u64, into: &mut Vec<u64>) {
    for _ in 0..secs.max(1) {
        std::thread::sleep(Duration::from_secs(1));
        into.extend(status_bytes(pid, "VmRSS"));
    }
}

pub fn run(o: &RssOpts) -> Result<()> {
    if o.devices == 0 || o.readings == 0 || o.publishers == 0 || o.lead_max == 0 {
        bail!("--devices, --readings, --publishers and --lead-max must be positive");
    }
    let broker = split_broker(&o.broker)?;
    let bin = find_node(o.node.as_deref())?;
    let bin = bin.canonicalize().unwrap_or(bin);
    let dir = tempfile::Builder::new()
        .prefix("tributary-bench-mqtt-rss-")
        .tempdir_in(&o.dir)?;
    let result = measure(o, &broker, &bin, dir.path());
    if o.keep {
        let kept = dir.keep();
        println!("kept {}", kept.display());
    }
    result
}

fn measure(o: &RssOpts, broker: &(String, u16), bin: &Path, dir: &Path) -> Result<()> {
    let pki = dir.join("pki");
    let pki_s = pki.to_str().context("a UTF-8 temp path")?;
    // An edge's tls_dir holds its own certificate and the CA's, never ca.key.
    let edge_pki = pki.join("edge-1");
    let edge_pki_s = edge_pki.to_str().context("a UTF-8 temp path")?;
    node(bin, &["certs", "init", "--dir", pki_s])?;
    node(
        bin,
        &[
            "certs", "issue", "--dir", pki_s, "--id", "edge-1", "--role", "edge", "--out",
            edge_pki_s,
        ],
    )?;
    let suffix = unique_suffix();
    let prefix = format!("bench-rss-{suffix}");
    let filter = format!("{prefix}/+/telemetry");
    let client_id = format!("bench-rss-{suffix}");
    let outbox = dir.join("outbox");
    let cloud_addr = format!("127.0.0.1:{}", free_udp_port()?);
    let args: Vec<String> = [
        "--role",
        "edge",
        "--node-id",
        "edge-1",
        "--tls-dir",
        edge_pki_s,
        "--cloud-addr",
        &cloud_addr,
        "--outbox-dir",
        outbox.to_str().context("a UTF-8 temp path")?,
        "--outbox-bytes-max",
        &o.outbox_bytes_max.to_string(),
        "--device-count",
        "0",
        "--mqtt-addr",
        &o.broker,
        "--mqtt-topic",
        &filter,
        "--mqtt-client-id",
        &client_id,
        "--report-interval-ms",
        &o.report_interval_ms.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    println!(
        "mqtt-rss: node {} {}\n{} devices, {} readings, lead at most {}, broker {}",
        bin.display(),
        args.join(" "),
        o.devices,
        thousands(o.readings as f64),
        thousands(o.lead_max as f64),
        o.broker
    );
    let env: Vec<(String, String)> = o
        .node_env
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--node-env {kv:?} is not KEY=VALUE"))
        })
        .collect::<Result<_>>()?;
    if !env.is_empty() {
        println!("the node's environment adds {env:?}");
    }
    let mut proc = Proc::spawn_with_env(bin, &args, &env, dir.join("edge.log"))?;
    let pid = proc.child.id();
    let out = (|| -> Result<()> {
        proc.wait_for("mqtt subscribed", Duration::from_millis(READY_TIMEOUT_MS))?;
        let load0 = load_1min();
        let mut idle = Vec::new();
        sample_for(pid, o.idle_s, &mut idle);

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let progress = Arc::new(Progress::default());
        let mut tail = LogTail::open(proc.log_path())?;
        let mut reported = Reported::default();
        tail.poll(&mut reported)?;
        let base = reported.committed;
        let broker_cpu = || o.broker_pid.map(|p| process_cpu_s(&p.to_string()));
        let (node_cpu0, broker_cpu0) = (proc.cpu_s(), broker_cpu());
        let start = Instant::now();
        let load_pub = load_1min();
        let (published, samples, reported, drained_after) = rt.block_on(async {
            let mut publishers = Publishers::connect(broker, o.publishers, &prefix).await?;
            let load = Load {
                prefix: prefix.clone(),
                devices: o.devices,
                limit: Limit {
                    count: Some(o.readings),
                    until: Some(tokio::time::Instant::now() + Duration::from_secs(o.time_limit_s)),
                },
                rate: None,
                lead_max: o.lead_max,
                progress: Some(progress.clone()),
            };
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(TAIL_MS));
            let every = (o.sample_ms / TAIL_MS).max(1);
            let mut ticks = 0u64;
            let mut published = None;
            let drain_deadline = Duration::from_secs(o.time_limit_s)
                + Duration::from_millis(DRAIN_TIMEOUT_MS);
            let mut publish = Box::pin(publishers.publish(&load));
            let drained_after = loop {
                tokio::select! {
                    p = &mut publish, if published.is_none() => {
                        let p = p?;
                        eprintln!("  published {} in {:.1} s", thousands(p.sent as f64), p.took.as_secs_f64());
                        published = Some(p);
                    }
                    _ = tick.tick() => {
                        tail.poll(&mut reported)?;
                        let committed = reported.committed - base;
                        progress.set(committed);
                        ticks += 1;
                        if ticks.is_multiple_of(every) {
                            if let Some(rss) = status_bytes(pid, "VmRSS") {
                                samples.push(Sample { at_s: start.elapsed().as_secs_f64(), committed, rss });
                            }
                            if ticks.is_multiple_of(every * 15) {
                                eprintln!(
                                    "  {:.0} s: {} committed, RSS {:.1} MB, held {}",
                                    start.elapsed().as_secs_f64(),
                                    thousands(committed as f64),
                                    samples.last().map_or(0.0, |s| s.rss as f64 / MB),
                                    reported.mqtt_held
                                );
                            }
                        }
                        if let Some(p) = &published {
                            if committed >= p.sent {
                                break start.elapsed();
                            }
                        }
                        if start.elapsed() > drain_deadline {
                            bail!("the node committed {committed} readings and no more");
                        }
                    }
                }
            };
            drop(publish);
            publishers.close().await;
            Ok::<_, anyhow::Error>((published.context("published")?, samples, reported, drained_after))
        })?;
        let (node_cpu1, broker_cpu1) = (proc.cpu_s(), broker_cpu());
        let mut end = Vec::new();
        sample_for(pid, o.idle_s, &mut end);
        let hwm = status_bytes(pid, "VmHWM").unwrap_or(0);
        let (allocated, apparent) = disk_bytes(&outbox);
        if let Some(status) = proc.child.try_wait()? {
            bail!("the node exited ({status}):\n{}", proc.log_tail());
        }
        let committed = reported.committed - base;
        let took = drained_after.as_secs_f64();
        report(
            o,
            &Report {
                idle: &idle,
                samples: &samples,
                end: &end,
                hwm,
                committed,
                sent: published.sent,
                took_s: took,
                publish_s: published.took.as_secs_f64(),
                waited_share: published.waited_share(),
                node_cpu_s: node_cpu1 - node_cpu0,
                broker_cpu_s: broker_cpu0.zip(broker_cpu1).map(|(a, b)| b - a),
                allocated,
                apparent,
                reported: &reported,
                loads: (load0, load_pub, load_1min()),
            },
        );
        print_smaps(pid);
        Ok(())
    })();
    drop(proc);
    // The node's persistent session, and whatever the broker still holds for it.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if let Err(e) = rt.block_on(prepare_session(broker, &client_id, "", true)) {
        eprintln!("ending the node's session failed: {e:#}");
    }
    out
}

struct Report<'a> {
    idle: &'a [u64],
    samples: &'a [Sample],
    end: &'a [u64],
    hwm: u64,
    committed: u64,
    sent: u64,
    took_s: f64,
    publish_s: f64,
    waited_share: f64,
    node_cpu_s: f64,
    broker_cpu_s: Option<f64>,
    allocated: u64,
    apparent: u64,
    reported: &'a Reported,
    loads: (f64, f64, f64),
}

fn report(o: &RssOpts, r: &Report) {
    let during: Vec<u64> = r.samples.iter().map(|s| s.rss).collect();
    println!(
        "\n### edge node RSS, {} MQTT devices, no cloud\n",
        o.devices
    );
    println!("| phase | VmRSS MB, min | median | max | samples | load (1 min) at the start |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, v, load) in [
        ("idle (connected and subscribed)", r.idle, r.loads.0),
        ("publishing", &during[..], r.loads.1),
        ("end (everything committed, settled)", r.end, r.loads.2),
    ] {
        let (lo, m, hi) = summary(v);
        println!(
            "| {name} | {lo:.1} | {m:.1} | {hi:.1} | {} | {load:.1} |",
            v.len()
        );
    }
    println!(
        "| peak (VmHWM at the end) | | | {:.1} | | |",
        r.hwm as f64 / MB
    );
    println!("\n| s | readings committed | VmRSS MB |");
    println!("|---:|---:|---:|");
    let step = r.samples.len().div_ceil(CURVE_ROWS).max(1);
    for (i, s) in r.samples.iter().enumerate() {
        if i % step == 0 || i + 1 == r.samples.len() {
            println!(
                "| {:.0} | {} | {:.1} |",
                s.at_s,
                thousands(s.committed as f64),
                s.rss as f64 / MB
            );
        }
    }
    // Flat? The samples past the first tenth of the readings (the caches
    // and buffers fill in it), fitted against readings.
    let tenth = r.committed / 10;
    let later: Vec<Sample> = r
        .samples
        .iter()
        .filter(|s| s.committed >= tenth)
        .copied()
        .collect();
    let first: Vec<u64> = later.iter().take(5).map(|s| s.rss).collect();
    let last: Vec<u64> = later.iter().rev().take(5).map(|s| s.rss).collect();
    let slope_mb = slope(&later).map(|b| b * 1e6 / MB);
    println!(
        "\nshape: after the first tenth of the readings, RSS {:.1} MB (median of the first 5 \
         samples) then {:.1} MB (the last 5); least-squares slope {} MB per million readings",
        summary(&first).1,
        summary(&last).1,
        slope_mb.map_or("–".to_string(), |s| format!("{s:+.3}")),
    );
    if r.committed < o.readings {
        let rate = r.committed as f64 / r.took_s.max(1e-9);
        let at_goal =
            slope_mb.map(|s| summary(&last).1 + s * (o.readings - r.committed) as f64 / 1e6);
        println!(
            "only {} of {} readings within --time-limit-s {}: at {} readings/s, {} would take {:.0} s; \
             extrapolated RSS at {}: {} MB",
            thousands(r.committed as f64),
            thousands(o.readings as f64),
            o.time_limit_s,
            thousands(rate),
            thousands(o.readings as f64),
            o.readings as f64 / rate.max(1e-9),
            thousands(o.readings as f64),
            at_goal.map_or("–".to_string(), |v| format!("{v:.1}")),
        );
    }
    let rate = r.committed as f64 / r.took_s.max(1e-9);
    println!(
        "\nreadings: {} sent in {:.1} s, {} committed after {:.1} s: {} readings/s; the publisher \
         waited at its lead {:.0} % of its time",
        thousands(r.sent as f64),
        r.publish_s,
        thousands(r.committed as f64),
        r.took_s,
        thousands(rate),
        r.waited_share * 100.0
    );
    let per = |s: f64| s * 1e6 / r.committed.max(1) as f64;
    println!(
        "CPU: the node {:.1} µs per reading ({:.2} cores), the broker {}",
        per(r.node_cpu_s),
        r.node_cpu_s / r.took_s.max(1e-9),
        r.broker_cpu_s.map_or("–".to_string(), |b| format!(
            "{:.1} µs per reading ({:.2} cores)",
            per(b),
            b / r.took_s.max(1e-9)
        ))
    );
    let rp = r.reported;
    println!(
        "outbox: {:.1} MB on disk ({:.1} MB apparent), {} B per reading; the node's outbox_bytes {:.1} MB \
         ({} B per reading), {} segments, {} commits ({:.0} readings per commit)",
        r.allocated as f64 / MB,
        r.apparent as f64 / MB,
        r.allocated / r.committed.max(1),
        rp.outbox_bytes as f64 / MB,
        rp.outbox_bytes / r.committed.max(1),
        thousands(rp.segments as f64),
        thousands(rp.commits as f64),
        r.committed as f64 / rp.commits.max(1) as f64,
    );
    println!(
        "mqtt: received {}, redeliveries {}, disconnects {}, bad payloads {}",
        thousands(rp.mqtt_received as f64),
        rp.redeliveries,
        rp.disconnects,
        rp.bad_payload
    );
    let end_med = summary(r.end).1;
    let flat = slope_mb.is_some_and(|s| s.abs() * (o.readings as f64 / 1e6) < 2.0);
    println!(
        "\ngoal ≤ 30 MB and flat: peak {:.1} MB, end {:.1} MB: {}; {}",
        r.hwm as f64 / MB,
        end_med,
        if (r.hwm as f64 / MB) <= 30.0 {
            "≤ 30 MB met"
        } else {
            "≤ 30 MB missed"
        },
        if flat {
            "flat (under 2 MB over the whole run by the slope)"
        } else {
            "not flat by the slope"
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_fields_are_read_through_colours() {
        let line = "2026-12-03T14:00:00Z  INFO tributary_node: edge flow \u{1b}[3mreadings_committed\u{1b}[0m\u{1b}[2m=\u{1b}[0m123 outbox_bytes=9";
        let line = strip_ansi(line);
        assert_eq!(field(&line, "readings_committed"), Some(123));
        assert_eq!(field(&line, "outbox_bytes"), Some(9));
        assert_eq!(field(&line, "commits"), None);
    }

    #[test]
    fn the_slope_is_bytes_per_reading() {
        let samples: Vec<Sample> = (0..10)
            .map(|i| Sample {
                at_s: i as f64,
                committed: i * 1000,
                rss: 1_000_000 + i * 2000,
            })
            .collect();
        assert!((slope(&samples).unwrap() - 2.0).abs() < 1e-9);
    }
}
